//! Whether a listener takes a client in at all, asked once when it accepts the client, before
//! anything is spent on it: the same rules for both flavours' servers ([`Server::admit`],
//! [`Server::max_clients`]).
//!
//! [`Server::admit`]: crate::Server::admit
//! [`Server::max_clients`]: crate::Server::max_clients

use std::os::fd::{AsFd, BorrowedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::connection::{envelope, trace};
use crate::socket::{PeerCredentials, Socket};

/// What `Server::admit` asks about each client.
pub(crate) type Admit = Arc<dyn Fn(Option<&PeerCredentials>) -> Result<(), String> + Send + Sync>;

/// A listener's rules for taking clients in.
#[derive(Clone, Default)]
pub(crate) struct Admission {
    pub(crate) admit: Option<Admit>,
    pub(crate) max_clients: Option<usize>,
}

impl Admission {
    /// Whether the client on `socket` is taken in (`connected` counts the clients served
    /// already): `Err(reason)` if not. The limit first: a client over it costs no call to
    /// `admit`.
    #[inline]
    pub(crate) fn check(
        &self,
        socket: &Socket,
        connected: impl FnOnce() -> usize,
    ) -> Result<(), String> {
        match self.max_clients {
            Some(max) if connected() >= max => return Err(at_limit(max)),
            _ => {}
        }
        match &self.admit {
            Some(admit) => asked(admit, socket),
            None => Ok(()),
        }
    }
}

/// How long a listener at [`Admission::max_clients`] waits, before it turns a client away,
/// for one of the clients it counts that have hung up already to end (its calls run, its
/// threads or task done): a client that reconnects as soon as it has hung up would
/// otherwise find its old self still counted. Only for clients that have hung up, and from
/// when the listener first found each gone: a live client is never waited for, and one that
/// hangs up with a slow call running still counts once this has passed, every client after
/// that turned away at once. So the clients that connect meanwhile wait in the kernel's queue
/// for at most this long.
pub(crate) const DEPARTURE_GRACE: Duration = Duration::from_secs(1);

/// Which of the clients on `sockets` have hung up (or had their socket shut down here): those
/// a listener at its limit may wait for ([`DEPARTURE_GRACE`]). `None` is a client whose
/// connection has gone already, which has hung up. One `poll` for all, which never waits:
/// this runs for every client turned away at the limit.
#[cold]
#[inline(never)]
fn hung_up(sockets: &[Option<BorrowedFd<'_>>]) -> Vec<bool> {
    // The peer's shutdown or close. Not `POLLIN`, which a message to read sets too: whatever
    // is reported (`POLLRDHUP`, or `POLLHUP` and `POLLERR`, which are always) means the peer
    // has gone. nix names no `POLLRDHUP`, and its `revents` is `None` when it is set.
    let gone = PollFlags::from_bits_retain(libc::POLLRDHUP);
    let mut fds: Vec<PollFd<'_>> = sockets
        .iter()
        .flatten()
        .map(|s| PollFd::new(*s, gone))
        .collect();
    let polled = loop {
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => break true,
            Err(Errno::EINTR) => continue,
            // Nothing known of them: counted as live, never waited for.
            Err(_) => break false,
        }
    };
    let mut reported = fds
        .iter()
        .map(|fd| polled && fd.revents() != Some(PollFlags::empty()));
    sockets
        .iter()
        .map(|s| s.is_none() || reported.next() == Some(true))
        .collect()
}

/// Of the clients a listener at its limit counts, each with its connection (`None`: gone),
/// since when it was first found hung up, and the flag its thread or task sets once it no
/// longer counts: the flags of those that have hung up, when the grace for them is over
/// (`None`: none has hung up), and the connections, held while their sockets were polled, for
/// the caller to let go of once it has let go of its lock (the last handle of one may be
/// among them, and its services' drops are user code). A client's grace runs from when it
/// was first found gone, so that the clients queued meanwhile wait for the one grace, not for
/// one each.
#[cold]
#[inline(never)]
pub(crate) fn departing<'a, C: AsFd>(
    clients: impl Iterator<Item = (Option<C>, &'a mut Option<Instant>, &'a Arc<AtomicBool>)>,
) -> (Vec<Arc<AtomicBool>>, Option<Instant>, Vec<Option<C>>) {
    let (connections, marks): (Vec<_>, Vec<_>) = clients
        .map(|(connection, since, ended)| (connection, (since, ended)))
        .unzip();
    let sockets: Vec<_> = connections
        .iter()
        .map(|c| c.as_ref().map(AsFd::as_fd))
        .collect();
    let now = Instant::now();
    let mut deadline = None;
    let mut leaving = Vec::new();
    for ((since, ended), hung_up) in marks.into_iter().zip(hung_up(&sockets)) {
        if hung_up {
            let since = *since.get_or_insert(now);
            deadline = deadline.max(Some(since + DEPARTURE_GRACE));
            leaving.push(ended.clone());
        }
    }
    (leaving, deadline, connections)
}

/// The reason a client over [`Admission::max_clients`] is turned away with.
#[cold]
#[inline(never)]
fn at_limit(max: usize) -> String {
    let clients = if max == 1 { "client" } else { "clients" };
    format!("the server is at its limit of {max} {clients}")
}

/// `admit`'s answer about the peer of `socket`. User code: a panic (on stderr already, by the
/// panic hook) refuses this client, and must not unwind through the accept loop, which would
/// stop accepting for good.
#[cold]
#[inline(never)]
fn asked(admit: &Admit, socket: &Socket) -> Result<(), String> {
    let peer = socket.peer_credentials().ok();
    catch_unwind(AssertUnwindSafe(|| admit(peer.as_ref())))
        .unwrap_or_else(|_| Err("the server's admission check panicked".into()))
}

/// Tells the client on `socket` that it is turned away, and why, then hangs up on it: its
/// calls fail with [`Error::Refused`](crate::Error::Refused) rather than a bare
/// `Disconnected`. The refusal goes out at once or not at all: a client whose socket has no
/// room (one that does not read, with a receive buffer made tiny) sees the hang-up alone, and
/// the accept loop never waits on it. With `TYPED_IPC_DEBUG` set, this end says so too: the
/// client was never a connection of its own, so no other line would.
#[cold]
#[inline(never)]
pub(crate) fn turn_away(socket: Socket, reason: &str) {
    let told = socket.send_now(&envelope::refusal(reason)).is_ok();
    if trace::enabled() {
        trace::turned_away(socket.peer_credentials().ok().as_ref(), reason, told);
    }
    drop(socket);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::frame::Frame;

    /// A client whose socket has no room left (one that never reads, its queue full) is hung
    /// up on without the refusal, and the accept loop does not wait for it to read.
    #[test]
    fn a_client_with_no_room_is_hung_up_on_without_waiting() {
        let (server_end, client) = Socket::pair().unwrap();
        let filler = envelope::refusal("filler");
        while server_end.send_now(&filler).is_ok() {}
        turn_away(server_end, "not you");
        // What was queued before is still there; the end follows, with no refusal after it.
        let mut frame = Frame::default();
        loop {
            match client.recv_into(&mut frame, None) {
                Ok(()) => {
                    let said = envelope::refused(&frame.payload).to_string();
                    assert_eq!(said, "call refused: filler");
                }
                Err(Error::Disconnected) => break,
                Err(e) => panic!("{e}"),
            }
            frame.clear();
        }
    }

    /// A peer that hung up, and only one, is seen as hung up.
    #[test]
    fn hung_up_sees_the_peer_gone() {
        use std::os::fd::AsFd;
        let (socket, peer) = Socket::pair().unwrap();
        let (live, _its_peer) = Socket::pair().unwrap();
        let asked = || hung_up(&[Some(live.as_fd()), None, Some(socket.as_fd())]);
        assert_eq!(asked(), [false, true, false]);
        peer.send_now(b"unread").unwrap();
        assert_eq!(
            asked(),
            [false, true, false],
            "a message to read is no hang-up"
        );
        drop(peer);
        assert_eq!(asked(), [false, true, true]);
    }

    /// The limit is checked first, and an admit that panics refuses.
    #[test]
    fn the_limit_comes_first_and_a_panic_refuses() {
        let (socket, _peer) = Socket::pair().unwrap();
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let admission = Admission {
            admit: Some(Arc::new({
                let asked = asked.clone();
                move |_| {
                    asked.store(true, std::sync::atomic::Ordering::SeqCst);
                    panic!("a bug of the check's own")
                }
            })),
            max_clients: Some(1),
        };
        assert_eq!(
            admission.check(&socket, || 1).unwrap_err(),
            "the server is at its limit of 1 client"
        );
        assert!(!asked.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(
            admission.check(&socket, || 0).unwrap_err(),
            "the server's admission check panicked"
        );
    }
}
