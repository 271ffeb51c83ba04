//! A call of this end, from its slot in `pending` to its decoded reply, and the guards that
//! clean up after a call whose future is dropped on the way. Apart from
//! [`AsyncConnection::call`], which only adds the timeout, so that the public API in
//! [`connection`](super) reads in one piece.

use std::sync::atomic::Ordering;

use ::tokio::sync::oneshot;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{AsyncConnection, Inner};
use crate::connection::decode_reply;
use crate::connection::trace;
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::service::InterfaceInfo;
use crate::tokio::envelope::{Envelope, Kind};

impl AsyncConnection {
    pub(super) async fn call_inner<A: Serialize, R: DeserializeOwned>(
        &self,
        iface: &'static InterfaceInfo,
        cmd: u32,
        args: A,
    ) -> Result<R> {
        let inner = &self.inner;
        let cookie = inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (slot, reply) = oneshot::channel();
        let mut reply = Reply { inner, rx: reply };
        {
            let mut state = inner.lock();
            if let Some(closed) = &state.closed {
                return Err(closed.duplicate());
            }
            // Registered before sending: the reply may come back before the send returns.
            state.pending.insert(cookie, slot);
            if inner.paused.load(Ordering::Relaxed) {
                // The reader waits for room in the backlog: it must read for this reply.
                inner.room.notify_one();
            }
        }
        let waiting = Waiting { inner, cookie };
        let envelope = Envelope {
            kind: Kind::Call,
            cmd,
            cookie,
            interface: iface.id,
            signature: iface.signature,
        };
        let traced = trace::described(inner.trace, &args);
        let placed = inner.send(envelope, args).await?;
        trace::outgoing(&envelope, iface, traced.as_deref());
        let received = (&mut reply.rx).await;
        std::mem::forget(waiting); // the slot is gone: the reader or `fail` took it
        let mut frame = received.unwrap_or(Err(Error::Disconnected))?;
        inner.lane.after_reply(placed, &frame);
        let result = decode_reply(&mut frame, iface, cmd, &inner.lane);
        inner.lane.finished(&frame.payload);
        result
    }
}

/// Where a call's reply arrives. A reply that arrived but was never taken, because the call
/// was dropped in between, is finished with unread (see [`Lane::finished`]).
///
/// [`Lane::finished`]: crate::connection::lane::Lane::finished
struct Reply<'a> {
    inner: &'a Inner,
    rx: oneshot::Receiver<Result<Frame>>,
}

impl Drop for Reply<'_> {
    fn drop(&mut self) {
        // Closed first: a reply sent after an empty `try_recv` would otherwise be dropped
        // with the channel, unfinished.
        self.rx.close();
        if let Ok(Ok(frame)) = self.rx.try_recv() {
            self.inner.lane.finished(&frame.payload);
        }
    }
}

/// A call's slot in `pending`, removed if the call is dropped before its reply came.
struct Waiting<'a> {
    inner: &'a Inner,
    cookie: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // A reply arriving later finds no slot and is dropped, closing its fds.
        self.inner.lock().pending.remove(&self.cookie);
    }
}
