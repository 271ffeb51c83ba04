//! [`AsyncListener`]: a [`Listener`] that waits for clients on the tokio runtime.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::task::{Context, Poll, ready};

use ::tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use nix::fcntl::{FcntlArg, OFlag, fcntl};

use crate::error::Result;
use crate::listener::Listener;
use crate::socket::Socket;

/// A [`Listener`] whose `accept` waits on the tokio runtime instead of blocking a thread.
#[derive(Debug)]
pub struct AsyncListener {
    io: AsyncFd<Registered>,
}

#[derive(Debug)]
struct Registered(Listener);

impl AsRawFd for Registered {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

// SAFETY: a `Listener` owns its fd and closes it only when dropped.
unsafe impl super::OwnsFd for Registered {}

impl AsyncListener {
    /// Takes over `listener` (making its socket non-blocking) on the current tokio runtime.
    /// Fails outside a runtime.
    ///
    /// # Panics
    ///
    /// In a runtime built without its IO driver, as [`AsyncConnection::new`] does.
    ///
    /// [`AsyncConnection::new`]: super::AsyncConnection::new
    pub fn new(listener: Listener) -> Result<AsyncListener> {
        let flags = OFlag::from_bits_retain(fcntl(&listener, FcntlArg::F_GETFL)?);
        fcntl(&listener, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok(AsyncListener {
            io: super::register(Registered(listener))?,
        })
    }

    /// Listens on a filesystem path (see [`Listener::bind`]: who may connect, stale files).
    pub fn bind(path: impl AsRef<Path>) -> Result<AsyncListener> {
        AsyncListener::new(Listener::bind(path)?)
    }

    /// Listens on a Linux abstract socket name (see [`Listener::bind_abstract`]: anyone may
    /// connect).
    pub fn bind_abstract(name: impl AsRef<[u8]>) -> Result<AsyncListener> {
        AsyncListener::new(Listener::bind_abstract(name)?)
    }

    /// Waits for the next client and returns its socket; wrap it in
    /// [`AsyncConnection::new`](super::AsyncConnection::new) (after [`Socket::set_limits`], if
    /// need be). Fails with `EINVAL` once the listening socket is shut down
    /// ([`Listener::shutdown`]), and with an error saying so once the runtime it was made on
    /// has shut down (whichever runtime accepts).
    pub async fn accept(&self) -> Result<Socket> {
        Socket::new(self.accept_fd().await?)
    }

    /// Waits for the next client and returns its descriptor (retrying past `EINTR` and
    /// `ECONNABORTED`, as [`Listener`] does). Fails with `EINVAL` once the socket is shut down
    /// ([`Listener::shutdown`]), as a blocking accept does: a non-blocking one would say
    /// `EAGAIN` for good.
    pub(crate) async fn accept_fd(&self) -> io::Result<OwnedFd> {
        loop {
            let ready = self.io.readable().await.map_err(runtime_gone)?;
            if let Some(accepted) = try_accept(ready) {
                return accepted;
            }
        }
    }

    /// [`AsyncListener::accept_fd`] as a poll, for the one task that accepts on a listener it
    /// must not hold while it waits (`AsyncServer::listen`, whose `AsyncServing` closes the
    /// listener at once when dropped). Only the task that polled last is woken.
    pub(crate) fn poll_accept_fd(&self, cx: &mut Context<'_>) -> Poll<io::Result<OwnedFd>> {
        loop {
            let ready = ready!(self.io.poll_read_ready(cx)).map_err(runtime_gone)?;
            if let Some(accepted) = try_accept(ready) {
                return Poll::Ready(accepted);
            }
        }
    }

    /// The listening socket: its [`Listener::path`] and its [`Listener::shutdown`] (which
    /// wakes [`AsyncListener::accept`] with `EINVAL`), as a blocking listener has them.
    pub fn listener(&self) -> &Listener {
        &self.io.get_ref().0
    }
}

/// The listening socket's fd, as [`Listener`]'s. Still registered with the runtime: it
/// must stay non-blocking, and be accepted on only through this listener.
impl AsFd for AsyncListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener().as_fd()
    }
}

/// Why a wait for a client failed with `e`: the reactor the listener is registered with has
/// shut down with the runtime it was made on. Tokio's own words ("A Tokio 1.x context was
/// found, but it is being shutdown") would speak of a runtime the caller may not be on.
#[cold]
#[inline(never)]
fn runtime_gone(e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        "the tokio runtime this listener was made on has shut down: make an AsyncListener \
         on the runtime that accepts on it",
    )
}

/// Accepts a client on a listener that reads ready: `None` if none is queued after all (the
/// readiness is then cleared, to wait for the next).
fn try_accept(mut ready: AsyncFdReadyGuard<'_, Registered>) -> Option<io::Result<OwnedFd>> {
    // A listening socket reads as closed only once it is shut down.
    let shut_down = ready.ready().is_read_closed();
    match ready.try_io(|io| io.get_ref().0.accept_fd().map_err(io::Error::from)) {
        Ok(accepted) => Some(accepted),
        Err(_would_block) if shut_down => Some(Err(io::Error::from_raw_os_error(libc::EINVAL))),
        Err(_would_block) => None,
    }
}
