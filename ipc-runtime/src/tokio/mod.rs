//! The async flavour, on tokio (cargo feature `tokio`): [`AsyncConnection`], the
//! [`AsyncService`] trait that `#[interface]` implements for traits of `async fn`s, servers and
//! listeners, and worker processes.
//!
//! The wire format is the blocking flavour's, byte for byte: an async client talks to a
//! blocking server and a blocking client to an async server, across processes, as long as
//! both were generated from the same trait (the interface signature ignores `async`).
//!
//! # Model
//!
//! Everything runs on the tokio runtime the connection was created in, and no runtime thread
//! ever blocks in a syscall: the socket is registered with tokio's [`AsyncFd`] and every
//! `send`/`sendmsg`/`recvmsg` is non-blocking.
//!
//! - **One reader task per connection** receives whenever the socket is readable. A reply goes
//!   to the call waiting for its cookie; a call request gets a task of its own, so a slow
//!   handler stalls nobody else (a task that ran an earlier call and waits idle for the next,
//!   up to 8 a connection, or else a new one); oneway messages run one at a time, in the order
//!   sent, on one task. The reader itself never waits for a handler or for a send.
//! - **Sends** are whole messages. A message that fits one datagram (≤ 64 KiB, ≤ 253 fds) is
//!   one non-blocking `send` (`sendmsg` when it carries fds, or once it has had to wait for
//!   room or for another message to go out); a larger one goes out a datagram at a time as the
//!   socket takes them, under an async mutex so that no other message interleaves with it.
//! - **Cancellation**: dropping a call's future (a `select!`, a `timeout`, an aborted task) frees
//!   its slot; a reply that comes later is dropped and its fds are closed (by typed-ipc's
//!   closer, off the runtime's threads, as every fd typed-ipc drops: the guide, "slow
//!   closes"). A call dropped after its request went out and before its reply came also
//!   tells the peer (a cancel message, sent at once if the socket takes it, else from a
//!   task: a drop never waits). An async peer then drops the call: unrun if it has not
//!   started (held for a server, or waiting for the oneways before it), else its handler's
//!   future, at its next `.await` (the handler's locals are dropped, its fds closed); it
//!   sends no reply. A blocking peer drops the call only if it is still queued when it reads
//!   the cancel (see [`Error::TimedOut`]); so does an async server of a blocking trait
//!   (`#[interface(async_server)]`): once the method is on the blocking pool, it runs to its
//!   end. A call dropped before its request went out sends nothing; one dropped while its
//!   request was part-way out is not cancelled (see below).
//!   A message that was
//!   part-way out when its future was dropped is finished by a task of its own (with copies of
//!   its remaining fds), so the stream stays in sync; only if that is impossible (no fds left,
//!   the runtime shutting down) is the connection shut down instead.
//! - **Peer death**: when the peer hangs up or dies, every waiting call gets
//!   [`Error::Disconnected`] at once, and the calls it made here are cancelled, as its cancel
//!   of each would: their handlers' futures are dropped, and those not started never run
//!   (their replies could go nowhere). Its oneway messages still run, in order.
//!   ([`AsyncConnection::close`] says what becomes of each request; a blocking server drops
//!   the calls it has not started too, but runs those started to their end, as it cannot
//!   stop a handler: see [`Connection`](crate::Connection).)
//! - **Bounds**: the requests a connection has received and not finished (held for a server to
//!   come, queued for the oneway task, or in their handler's task until the reply is out) are at
//!   most 1,024, 32 MiB of message buffers, or 4,096 fds, as in the blocking flavour (see
//!   [`Connection`](crate::Connection); one request is always taken, whatever its size). At the
//!   bounds the reader stops reading, so the peer's sends wait, until a request finishes or the
//!   peer hangs up (it reads on to the end then). A call of this end waits for room too, its reply
//!   read after the requests before it: a peer that reports progress with oneways during a call is
//!   slowed to the pace this end runs them. Only a call a handler of this connection makes (calling
//!   back into the peer) makes it read on, taking requests in up to twice the bounds before it ends
//!   the connection with [`Error::Malformed`] (unless the peer has gone for good: what it left in
//!   the socket is read to its end); and any call does while nothing serves the connection yet (an
//!   `AsyncServer::service_with` whose `make` calls the client serves only once that call is
//!   answered), or ends it at the bounds if nothing is coming either (nothing would ever take
//!   them). A call that a handler makes on a task of its own and awaits is not known as the
//!   handler's, and waits for room as any call does (so a handler that waits for a call made
//!   elsewhere, or for a lock held across one, must not be relied on past the bounds). So a peer
//!   that sends calls and never reads the replies gets no further than the bounds. Nor do the
//!   replies it leaves unread: once 16 MiB of encoded replies (two or more: one waits whatever its
//!   size) wait for room to go out on a connection, a call read from then on does not start its
//!   handler (it waits, holding its request only, counted as above) until they are below that
//!   again; the handlers already running still reply. A peer that does not read then pins the
//!   requests at the bounds, those replies and the values their handlers returned (about as much
//!   again for byte strings), not one reply per request. A peer that reads is not held back: the
//!   replies go out as it reads, and the calls waiting start in turn while the replies waiting are
//!   below that budget (a call cancelled while it waits is dropped unrun). Oneways get no reply and
//!   are not held. As in the blocking flavour, two ends whose handlers send to each other must not
//!   send each other requests past the bounds without waiting for answers: with both readers paused
//!   and every handler waiting to send, both wait for good.
//! - **Byte strings** of 1 KiB to 32 MiB go through a shared memory region per connection and
//!   direction, as in the blocking flavour (see [`Connection`](crate::Connection)); a call
//!   cancelled before its message went out gives its place in the region back.
//!
//! Handlers are futures on the runtime: one that blocks its thread (heavy computation, a
//! blocking syscall) holds up the tasks scheduled on that thread, as in any tokio program; run
//! such work with `tokio::task::spawn_blocking`. [`current_peer`](crate::current_peer) works
//! inside handlers, as does [`AsyncCall::peer_credentials`].
//!
//! Connections and listeners need a runtime with the IO driver enabled (`enable_io()`,
//! `enable_all()` or `#[tokio::main]`): made outside a runtime they fail, but in a runtime
//! built without that driver tokio's `AsyncFd` panics. Timeouts ([`AsyncConnection::call`]
//! and [`AsyncConnection::oneway`] with a timeout, the generated clients' `with_timeout`)
//! need the time driver too (`enable_all()` or `#[tokio::main]`).

mod call;
mod connection;
mod handoff;
mod listener;
mod server;
#[cfg(test)]
mod tests;
pub mod worker;

// The envelope and failure replies are the blocking connection's, so the two flavours cannot
// drift apart on the wire.
use crate::connection::{envelope, failure};

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;

use ::tokio::io::unix::AsyncFd;

pub use call::AsyncCall;
pub use connection::AsyncConnection;
use connection::WeakAsyncConnection;
pub use listener::AsyncListener;
pub use server::{AsyncServer, AsyncServing};

use crate::error::{Error, Result};
use crate::service::InterfaceInfo;

/// A boxed future that can move between threads: what [`AsyncService::handle`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Boxes `future` as a [`BoxFuture`] (for generated code).
#[doc(hidden)]
pub fn boxed<'a, F: Future + Send + 'a>(future: F) -> BoxFuture<'a, F::Output> {
    Box::pin(future)
}

/// The server side of one interface in the async flavour: what `#[interface]` generates as
/// `<Trait>Server` for a trait of `async fn`s.
///
/// The connection checks that a request names this interface, with the same signature, and a
/// command it has, and asks the authorizer, before it calls [`AsyncService::handle`]; it turns
/// a panic in `handle` into an error reply for that call.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not serve an `AsyncConnection`",
    label = "not a server of the async flavour",
    note = "a trait of `fn`s is served on an `AsyncConnection` by `<Trait>AsyncServer`: ask for \
            it with `#[interface(async_server)]`; its `<Trait>Server` is for a blocking \
            `Connection`"
)]
pub trait AsyncService: Send + Sync + 'static {
    /// The interface this service answers.
    fn info(&self) -> &'static InterfaceInfo;

    /// Handles one request: decodes its arguments with [`AsyncCall::args`], runs the
    /// implementation, and answers with [`AsyncCall::reply`] (not for oneway methods).
    fn handle<'a>(&'a self, call: &'a mut AsyncCall) -> BoxFuture<'a, Result<()>>;
}

impl<S: AsyncService + ?Sized> AsyncService for std::sync::Arc<S> {
    fn info(&self) -> &'static InterfaceInfo {
        (**self).info()
    }
    fn handle<'a>(&'a self, call: &'a mut AsyncCall) -> BoxFuture<'a, Result<()>> {
        (**self).handle(call)
    }
}

/// Something that owns its fd: it stays open, and the same, as long as the value lives.
///
/// # Safety
///
/// `as_raw_fd` returns the same open fd for the value's whole life, and the value closes it
/// only when dropped.
unsafe trait OwnsFd: AsRawFd {}

// SAFETY: an `OwnedFd` owns its fd until dropped.
unsafe impl OwnsFd for OwnedFd {}

/// Registers `inner`'s fd with the current runtime's reactor.
fn register<T: OwnsFd>(inner: T) -> Result<AsyncFd<T>> {
    in_runtime()?;
    // SAFETY: `OwnsFd` promises what `register` requires: the fd stays open and the same for
    // as long as the `AsyncFd` owns `inner`.
    unsafe { AsyncFd::register(inner) }.map_err(|e| Error::from(io::Error::from(e)))
}

/// Fails outside a tokio runtime, where the async flavour cannot run (tokio would panic).
fn in_runtime() -> Result<()> {
    match ::tokio::runtime::Handle::try_current() {
        Ok(_) => Ok(()),
        Err(_) => Err(Error::Io(io::Error::other(
            "typed-ipc's async flavour must be used inside a tokio runtime",
        ))),
    }
}
