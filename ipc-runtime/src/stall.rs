//! Bounding a server's graceful shutdown ([`Serving::shutdown`](crate::Serving::shutdown), and
//! the async flavour's): it lets the calls in flight send their replies, and a reply to a
//! client that does not read would wait for room in the socket buffer for good. A thread of
//! the shutdown's own watches the clients' sockets meanwhile and shuts down the connection of
//! any client whose send has made no progress for the server's limit
//! ([`Server::shutdown_stall_limit`](crate::Server::shutdown_stall_limit), 5 s unless set;
//! [`DEFAULT_LIMIT`]): the send then fails at once
//! (`EPIPE`, [`Error::Disconnected`](crate::Error::Disconnected)), as if the client had hung
//! up. Nothing of this runs before a shutdown: a send that has to wait only notes since when
//! ([`Socket::send_stalled_for`]), and one that goes out at once does not even do that.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use crate::connection::{Connection, trace};
use crate::socket::Socket;

/// How long, once its server is shutting down, a send to a client may wait for room with none
/// of its message going out before that client's connection is shut down, unless the server
/// says otherwise. Long enough for a client that reads to be scheduled on a loaded machine.
pub(crate) const DEFAULT_LIMIT: Duration = Duration::from_secs(5);

/// The watch looks at the sends at most this often, however short the limit.
const MIN_WAKE: Duration = Duration::from_millis(10);

/// A client's connection, as the watch sees it.
pub(crate) trait Watched: Send + 'static {
    /// Its socket, whose sends the watch checks.
    fn socket(&self) -> &Socket;
    /// Shuts the connection down both ways: a send waiting for room fails at once.
    fn close(&self);
    /// How its traced lines name it.
    fn name(&self) -> trace::Name;
}

impl Watched for Connection {
    fn socket(&self) -> &Socket {
        Connection::socket(self)
    }
    fn close(&self) {
        Connection::close(self);
    }
    fn name(&self) -> trace::Name {
        Connection::trace_name(self)
    }
}

#[cfg(feature = "tokio")]
impl Watched for crate::tokio::AsyncConnection {
    fn socket(&self) -> &Socket {
        crate::tokio::AsyncConnection::socket(self)
    }
    fn close(&self) {
        crate::tokio::AsyncConnection::close(self);
    }
    fn name(&self) -> trace::Name {
        crate::tokio::AsyncConnection::trace_name(self)
    }
}

/// Starts a thread that shuts down each of `clients` whose send has waited `limit` with none
/// of its message going out, until the returned sender is dropped (or sent to);
/// then it drops its clones of `clients` and runs `ended`. If the thread cannot be started,
/// nothing can bound the wait: every client is shut down at once, `ended` is dropped, and
/// `None` returned.
pub(crate) fn watch<C: Watched + Clone>(
    clients: Vec<C>,
    limit: Duration,
    ended: impl FnOnce() + Send + 'static,
) -> Option<Sender<()>> {
    let (stop, stopping) = mpsc::channel();
    let watched = clients.clone();
    let started = std::thread::Builder::new()
        .name("typed-ipc-shutdown".into())
        .spawn(move || {
            cut_stalled(watched, limit, &stopping);
            ended();
        });
    if started.is_err() {
        clients.iter().for_each(Watched::close);
        return None;
    }
    Some(stop)
}

/// The body of [`watch`]'s thread: it wakes when the first of the sends waiting now would
/// reach the limit, or after the limit (a send that starts waiting later cannot reach it
/// sooner).
fn cut_stalled<C: Watched>(mut clients: Vec<C>, limit: Duration, stopping: &Receiver<()>) {
    loop {
        let now = Instant::now();
        let mut next = limit;
        clients.retain(|client| match client.socket().send_stalled_for(now) {
            Some(stalled) if stalled >= limit => {
                client.close();
                trace::line(&stalled_line(&client.name(), limit));
                false
            }
            Some(stalled) => {
                next = next.min(limit - stalled);
                true
            }
            None => true,
        });
        // A limit of (nearly) zero must not make this a busy loop.
        let next = next.max(MIN_WAKE);
        if !matches!(stopping.recv_timeout(next), Err(RecvTimeoutError::Timeout)) {
            return;
        }
    }
}

/// The line saying that the shutdown hung up on the client of the connection `name`, whose
/// send waited `limit`: named as every other line about the connection (with the client's
/// pid, where known).
#[cold]
fn stalled_line(name: &trace::Name, limit: Duration) -> String {
    format!("{name}: shutting down: hung up on a client that left a message unread for {limit:?}")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::connection::trace::Name;

    /// The line that says a client was hung up on starts as every other line about that
    /// client's connection, with its name (number and peer pid): it said only this process's
    /// pid, and the client's in words of its own.
    #[test]
    fn the_hang_up_line_names_the_connection() {
        let name = Name::next(Some(7), None);
        let said = super::stalled_line(&name, Duration::from_secs(5));
        assert!(said.starts_with(&format!("{name}: ")), "{said}");
        assert!(said.contains(" peer 7]"), "{said}");
        assert!(said.ends_with("left a message unread for 5s"), "{said}");
    }
}
