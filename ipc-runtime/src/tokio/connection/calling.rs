//! A call of this end, from its slot in `pending` to its decoded reply, and the guard that
//! cleans up after a call whose future is dropped on the way. Apart from
//! [`AsyncConnection::call`], which only adds the timeout, so that the public API in
//! [`connection`](super) reads in one piece.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;
use serde::de::DeserializeOwned;

use ::tokio::time::Instant;

use super::sending::{TracedSend, why_given_up};
use super::{AsyncConnection, Inner};
use crate::connection::decode_reply;
use crate::connection::trace;
use crate::error::{Error, Result};
use crate::service::InterfaceInfo;
use crate::tokio::envelope::{Envelope, Kind};

impl AsyncConnection {
    pub(super) async fn call_inner<A: Serialize, R: DeserializeOwned>(
        &self,
        iface: &'static InterfaceInfo,
        cmd: u32,
        args: A,
        deadline: Option<Instant>,
    ) -> Result<R> {
        let inner = &self.inner;
        let cookie = inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        // Asked here, in the call's first poll: a handler that awaits its call polls it with
        // its scope set (`serving::Guarded`).
        let from_handler = crate::service::handling_a_call_of(Arc::as_ptr(inner).cast());
        {
            let mut state = inner.lock();
            if let Some(closed) = &state.closed {
                return Err(closed.duplicate());
            }
            // Registered before sending: the reply may come back before the send returns.
            state.pending.insert(cookie, from_handler);
            if inner.reader_paused(Ordering::Relaxed) {
                // The reader waits for room in the backlog: it may have to read for this reply
                // (it looks again).
                inner.room.notify_one();
            }
        }
        let mut waiting = Waiting {
            inner,
            cookie,
            sent: false,
            deadline,
        };
        let envelope = Envelope {
            kind: Kind::Call,
            cmd,
            cookie,
            interface: iface.id,
            signature: iface.signature,
        };
        let traced = trace::described(inner.trace, &args)
            .map(|args| TracedSend::new(inner.name, envelope, iface, args, deadline).said_now());
        let placed = match inner.send(envelope, args).await {
            Ok(placed) => placed,
            // Boxed, as the path is rare (see `serving::handle_request`).
            Err(e) => return Err(Box::pin(inner.unsent_call(e, traced)).await),
        };
        if let Some(mut traced) = traced {
            traced.sent();
        }
        waiting.sent = true;
        let received = poll_fn(|cx| inner.lock().pending.poll_take(cookie, cx)).await;
        std::mem::forget(waiting); // the slot is gone with the reply
        let mut frame = received?;
        inner.lane.after_reply(placed, &frame);
        let result = decode_reply(&mut frame, iface, cmd, &inner.lane);
        inner.lane.finished(&frame.payload);
        result
    }
}

impl Inner {
    /// Why a call's send failed (`e`), said if the call was ([`TracedSend::failed`]).
    async fn unsent_call(&self, e: Error, traced: Option<Box<TracedSend>>) -> Error {
        // Before waiting: another send on this thread may fail meanwhile.
        let cut_off = traced.as_ref().and_then(|traced| traced.cut_off());
        let e = self.why_unsent(e).await;
        if let Some(mut traced) = traced {
            traced.failed(&e, cut_off);
        }
        e
    }
}

/// A call's slot in `pending`, removed if the call is dropped before it took its reply. A
/// reply that arrived but was not taken is finished unread (see [`Lane::finished`]) and
/// dropped, closing its fds; one arriving later finds no slot and the reader does the same.
/// A call dropped after its request went out and before its reply came tells the peer to
/// drop it ([`Kind::Cancel`], by [`Inner::send_cancel`]: never waiting, as this is a drop).
///
/// [`Lane::finished`]: crate::connection::lane::Lane::finished
struct Waiting<'a> {
    inner: &'a Arc<Inner>,
    cookie: u64,
    /// The call went out: dropped now, its caller gave up waiting for the reply (a timeout,
    /// or its future dropped), which the trace says.
    sent: bool,
    /// When the call's own timeout fires, if it has one: a drop after it is that timeout.
    deadline: Option<Instant>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.sent && self.inner.trace {
            let why = why_given_up(self.deadline);
            trace::gave_up(&self.inner.name, self.cookie, why);
        }
        let unread = {
            let mut state = self.inner.lock();
            let unread = state.pending.cancel(self.cookie);
            // No reply yet, and the request is out: the peer may still queue or run the
            // call, for nobody. A connection that has ended has no peer to tell.
            (unread, state.closed.is_none())
        };
        match unread {
            (Ok(mut frame), _) => {
                self.inner.lane.finished(&frame.payload);
                frame.discard_fds();
            }
            (Err(true), true) if self.sent => self.inner.send_cancel(self.cookie),
            _ => {}
        }
    }
}
