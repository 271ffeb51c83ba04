//! [`AsyncCall`]: one request being handled by an [`AsyncService`](super::AsyncService).

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::connection::{Inner, SaidReply};
use super::envelope::{self, Envelope, Kind};
use crate::codec::{self, Bytes};
use crate::connection::trace;
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::socket::PeerCredentials;

/// One request being handled by an [`AsyncService`](super::AsyncService): the async
/// flavour's [`Call`](crate::service::Call).
pub struct AsyncCall {
    envelope: Envelope,
    /// The whole message: envelope, then the arguments.
    frame: Frame,
    peer: Option<PeerCredentials>,
    /// The connection: where the reply goes, and whose lane the arguments may be in.
    inner: Arc<Inner>,
    /// The call is answered: its reply went out, or started to and goes out whole in the
    /// background (its future was dropped part-way), or its send failed so that no other
    /// answer can follow.
    replied: bool,
    /// The arguments were refused as over this side's limits, and the handler has not tried
    /// to reply since (as for [`Call`](crate::service::Call)).
    unreceived: bool,
}

impl AsyncCall {
    pub(super) fn new(
        envelope: Envelope,
        frame: Frame,
        peer: Option<PeerCredentials>,
        inner: Arc<Inner>,
    ) -> AsyncCall {
        AsyncCall {
            envelope,
            frame,
            peer,
            inner,
            replied: false,
            unreceived: false,
        }
    }

    pub(super) fn replied(&self) -> bool {
        self.replied
    }

    /// Whether the arguments were refused as over this side's limits.
    pub(super) fn unreceived(&self) -> bool {
        self.unreceived
    }

    /// The command id of the method called.
    pub fn command(&self) -> u32 {
        self.envelope.cmd
    }

    /// Whether the caller waits for no reply.
    pub fn is_oneway(&self) -> bool {
        self.envelope.kind == Kind::Oneway
    }

    /// The caller's process credentials (pid, uid, gid), as the kernel recorded them for the
    /// connection.
    pub fn peer_credentials(&self) -> Option<PeerCredentials> {
        self.peer
    }

    /// Decodes the arguments, taking the fds that came with them. Fds not claimed are closed
    /// off the runtime's threads, by typed-ipc's closer (a peer's fd may be slow to close:
    /// the guide, "slow closes"); so are those of a call whose arguments are never decoded.
    /// Decode them once, as [`Call::args`](crate::service::Call::args) says.
    pub fn args<T: DeserializeOwned>(&mut self) -> Result<T> {
        let fds = std::mem::take(&mut self.frame.fds);
        let body = &self.frame.payload[envelope::LEN..];
        let args = codec::with_store(self.inner.lane(), || codec::decode(body, fds));
        if let Err(e) = &args {
            self.unreceived = e.is_over_limits();
        }
        args
    }

    /// Notes a reply that failed with `e`, as [`Call`](crate::service::Call)'s does; whether
    /// the call counts as answered anyway.
    #[cold]
    #[inline(never)]
    fn unsent(&mut self, e: &Error) -> bool {
        self.unreceived = false;
        if matches!(e, Error::Disconnected) {
            self.inner.cancel_calls_of_a_peer_gone();
        }
        !e.reply_may_follow()
    }

    /// Sends `value` as the reply. Ignored for oneway calls, which get no reply, and after the
    /// first reply.
    ///
    /// `value` is taken by value so that the future is `Send` whenever `value` is; the fds it
    /// carries stay open until the reply is out, and are closed with it.
    ///
    /// Dropped part-way out (a large reply, under a timeout), the rest of the reply goes out
    /// in the background and is the call's answer: later replies are ignored, and no failure
    /// is sent for the call. Dropped before any of it went out, the call is unanswered still,
    /// as if it had not been called.
    pub async fn reply<T: Serialize>(&mut self, value: T) -> Result<()> {
        if self.is_oneway() || self.replied {
            return Ok(());
        }
        let inner = self.inner.clone();
        let envelope = Envelope {
            kind: Kind::Reply,
            ..self.envelope
        };
        // Said before it is sent, as `Call::reply` says it (and how it ends, if not sent).
        let traced = trace::described(inner.trace, &value)
            .map(|value| SaidReply::said_now(inner.name, envelope.cookie, &value));
        // Set as soon as any of the reply is out: if this future is dropped then, the rest
        // goes out in the background, and that is the call's answer (no failure, nor a
        // second reply, may follow it).
        let sent = inner.send_noting(envelope, value, &mut self.replied).await;
        if let Some(mut traced) = traced {
            traced.over(&sent);
        }
        // As `Call::reply`: a reply that sent nothing leaves the call to be answered with why
        // (the reply's, not that the arguments were refused: the handler ran).
        self.replied = match &sent {
            Ok(_) => true,
            Err(e) => self.unsent(e),
        };
        sent.map(drop)
    }

    /// Sends `bytes` as the reply, as one byte string (what the generated code does for a
    /// `Vec<u8>` result), then keeps their allocation for the next byte string this thread
    /// receives. Ignored as [`AsyncCall::reply`] is.
    pub async fn reply_bytes(&mut self, bytes: Vec<u8>) -> Result<()> {
        let sent = self.reply(Bytes(&bytes)).await;
        crate::spare::keep(bytes);
        sent
    }

    /// An error for a command this interface does not have.
    pub fn unknown_command(&self) -> Error {
        Error::Malformed(format!("unknown command {}", self.envelope.cmd))
    }
}

impl Drop for AsyncCall {
    fn drop(&mut self) {
        // Done with the request, whether or not its arguments were decoded.
        self.inner.lane().finished(&self.frame.payload);
        // Fds the handler left unclaimed: not closed on the runtime's thread.
        self.frame.discard_fds();
    }
}

impl std::fmt::Debug for AsyncCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncCall")
            .field("command", &self.envelope.cmd)
            .field("cookie", &self.envelope.cookie)
            .field("oneway", &self.is_oneway())
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}
