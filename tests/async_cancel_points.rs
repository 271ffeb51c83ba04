//! Async calls and oneways given up at each place they wait (for room in the socket, for the
//! send lock, for the reply), and a peer that goes while callers wait at each of them: what
//! was given up goes out whole or not at all, its fds are closed, the connection serves on,
//! every caller gets its own reply, and a peer gone reads as `Disconnected`, never as a
//! timeout.
//!
//! Nothing here synchronises by sleeping; the timeouts only turn a hang into a failure.

#![cfg(feature = "tokio")]

mod common;

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::{fd_count_lock, fd_snapshot, filled, memfd, read_all};
use typed_ipc::tokio::AsyncConnection;
use typed_ipc::{Connection, Error, Socket};

/// What `echo` returns: what it was given.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Back {
    n: u64,
    data: Vec<u8>,
    #[serde(with = "typed_ipc::fds")]
    files: Vec<OwnedFd>,
}

mod blocking {
    use std::os::fd::OwnedFd;

    /// The peer, blocking flavour (served on a thread of its own).
    #[typed_ipc::interface(async_server)]
    pub trait Peer {
        /// Notes `n`; closes `files`.
        #[oneway]
        fn note(&self, n: u64, files: Vec<OwnedFd>);
        /// Notes `n`; gives everything back.
        fn echo(&self, n: u64, data: Vec<u8>, files: Vec<OwnedFd>) -> super::Back;
    }
}

mod asynchronous {
    use std::os::fd::OwnedFd;

    /// The same interface, async flavour.
    #[typed_ipc::interface]
    pub trait Peer {
        #[oneway]
        async fn note(&self, n: u64, files: Vec<OwnedFd>);
        async fn echo(&self, n: u64, data: Vec<u8>, files: Vec<OwnedFd>) -> super::Back;
    }
}

use asynchronous::PeerClient;

/// The `n`s the peer's methods saw, in order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<u64>>>);

impl blocking::Peer for Seen {
    fn note(&self, n: u64, _files: Vec<OwnedFd>) {
        self.0.lock().unwrap().push(n);
    }
    fn echo(&self, n: u64, data: Vec<u8>, files: Vec<OwnedFd>) -> Back {
        self.0.lock().unwrap().push(n);
        Back { n, data, files }
    }
}

impl asynchronous::Peer for Seen {
    async fn note(&self, n: u64, _files: Vec<OwnedFd>) {
        self.0.lock().unwrap().push(n);
    }
    async fn echo(&self, n: u64, data: Vec<u8>, files: Vec<OwnedFd>) -> Back {
        // Yields as many times as `n % 3`, so that replies cross cancels and one another.
        for _ in 0..n % 3 {
            tokio::task::yield_now().await;
        }
        self.0.lock().unwrap().push(n);
        Back { n, data, files }
    }
}

/// What the sends given up carry as `n`: the peer must never see it.
const GIVEN_UP: u64 = u64::MAX;

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
}

/// Whether every write end of the pipe whose read end is `read` is closed (none in flight in
/// a socket either): a state, polled without waiting.
fn write_ends_gone(read: &OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    typed_ipc::wait_for_closes();
    let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).unwrap();
    fds[0]
        .revents()
        .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

/// `future`, polled once by hand (its waker a no-op): it must be waiting.
fn waiting<F: Future>(future: F, what: &str) -> Pin<Box<F>> {
    let mut future = Box::pin(future);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(future.as_mut().poll(&mut cx).is_pending(), "{what}");
    future
}

/// Sends oneways numbered from 0, each polled once by hand, until one finds the peer's queue
/// full: that one is dropped (none of it went out, as it is one datagram). How many went out.
fn fill(client: &PeerClient) -> u64 {
    let mut cx = Context::from_waker(Waker::noop());
    let mut sent = 0;
    loop {
        let mut note = Box::pin(client.note(sent, Vec::new()));
        if note.as_mut().poll(&mut cx).is_pending() {
            return sent;
        }
        sent += 1;
        assert!(sent < 1 << 20, "the peer's queue never filled");
    }
}

/// A oneway and a call dropped while they wait for room in a full socket, and a call and a
/// oneway dropped while they wait for the send lock behind a call that waits for room: none
/// of them reaches the peer, whole or in part, and the fds they were given are closed (not
/// in flight either). The call that held the lock then goes out and gets its own reply, the
/// peer sees the oneways that went out in order, and a call after them all is answered.
#[test]
fn sends_given_up_waiting_for_room_or_the_send_lock_go_out_not_at_all_and_close_their_fds() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let rt = common::current_thread_runtime();
    let (ours, theirs) = Socket::pair().unwrap();
    let peer = Connection::new(theirs);
    let seen = Seen::default();
    rt.block_on(async {
        let conn = AsyncConnection::new(ours).unwrap();
        let client = PeerClient::new(conn.clone());
        // The peer serves nothing yet, so reads nothing.
        let filled = fill(&client);
        let mut given_up = Vec::new();
        let (read, write) = pipe();
        drop(waiting(
            client.note(GIVEN_UP, vec![write]),
            "waits for room",
        ));
        given_up.push(read);
        let (read, write) = pipe();
        drop(waiting(
            client.echo(GIVEN_UP, vec![7; 100], vec![write]),
            "waits for room",
        ));
        given_up.push(read);
        // One call waits for room, holding the send lock; two more wait for the lock.
        let (kept_read, kept_write) = pipe();
        let kept_ino = nix::sys::stat::fstat(&kept_write).unwrap().st_ino;
        let kept = waiting(
            client.echo(1 << 40, vec![1, 2, 3], vec![kept_write]),
            "waits for room",
        );
        for oneway in [false, true] {
            let (read, write) = pipe();
            match oneway {
                false => drop(waiting(
                    client.echo(GIVEN_UP, Vec::new(), vec![write]),
                    "waits for the lock",
                )),
                true => drop(waiting(
                    client.note(GIVEN_UP, vec![write]),
                    "waits for the lock",
                )),
            }
            given_up.push(read);
        }
        for (i, read) in given_up.iter().enumerate() {
            assert!(
                write_ends_gone(read),
                "the fd of given-up send {i} is open or in flight"
            );
        }
        let serving = {
            let seen = seen.clone();
            std::thread::spawn(move || peer.serve(blocking::PeerServer::new(seen)))
        };
        let back = tokio::time::timeout(HANG_GUARD, kept)
            .await
            .expect("the call holding the send lock hung")
            .unwrap();
        assert_eq!((back.n, back.data.as_slice()), (1 << 40, &[1u8, 2, 3][..]));
        assert_eq!(back.files.len(), 1);
        let ino = nix::sys::stat::fstat(&back.files[0]).unwrap().st_ino;
        assert_eq!(ino, kept_ino, "another call's fd");
        drop(back);
        let file = memfd(b"after");
        let back = client.echo(2 << 40, vec![9; 70_000], vec![file]).await;
        let back = back.unwrap();
        assert_eq!((back.n, back.data.len()), (2 << 40, 70_000));
        assert_eq!(read_all(back.files.into_iter().next().unwrap()), b"after");
        let mut expected: Vec<u64> = (0..filled).collect();
        expected.extend([1 << 40, 2 << 40]);
        assert_eq!(*seen.0.lock().unwrap(), expected);
        drop((client, conn));
        serving.join().unwrap().unwrap();
        // Once the peer's thread is done: it drops the fd it echoed after its reply is out,
        // which this end may have read and dropped first.
        assert!(write_ends_gone(&kept_read), "the echoed fd was not closed");
    });
    drop(rt);
    before.assert_nothing_new();
}

/// A call or oneway waiting somewhere, and where.
type Parked = (
    &'static str,
    Pin<Box<dyn Future<Output = typed_ipc::Result<()>>>>,
);

/// A call of `client` (`n`, with a string and an fd), as a future that owns the client.
fn call(client: &PeerClient, n: u64) -> impl Future<Output = typed_ipc::Result<()>> + 'static {
    let client = client.clone();
    async move {
        let got = client.echo(n, vec![1; 100], vec![memfd(b"x")]).await;
        got.map(drop)
    }
}

/// A oneway of `client` (`n`, with an fd), as a future that owns the client.
fn note(client: &PeerClient, n: u64) -> impl Future<Output = typed_ipc::Result<()>> + 'static {
    let client = client.clone();
    async move { client.note(n, vec![memfd(b"x")]).await }
}

/// `future`, waiting at `what` (see [`waiting`]), parked.
fn park(
    what: &'static str,
    future: impl Future<Output = typed_ipc::Result<()>> + 'static,
) -> Parked {
    (what, waiting(future, what))
}

/// Parks callers of `client`, whose peer serves nothing, at each place they wait: for their
/// replies (with a timeout and without), for room in the full socket, and for the send lock
/// behind that (calls and oneways, with a timeout and without). Polled on a runtime, for the
/// timeouts.
fn park_everywhere(client: &PeerClient) -> Vec<Parked> {
    let (c, t) = (client, &client.with_timeout(HANG_GUARD));
    let mut parked = vec![park("reply, timed", call(t, 1)), park("reply", call(c, 2))];
    fill(client);
    parked.extend([
        park("room, timed", call(t, 3)),
        park("lock, timed", call(t, 4)),
        park("lock", call(c, 5)),
        park("oneway lock, timed", note(t, 6)),
        park("oneway lock", note(c, 7)),
    ]);
    parked
}

/// Awaits every parked caller, each of which must fail as `failed` says, and at once (a
/// hang fails the test after the hang guard, as a timeout of the caller's own).
async fn all_fail(parked: Vec<Parked>, failed: impl Fn(&typed_ipc::Result<()>) -> bool) {
    for (what, call) in parked {
        let got = tokio::time::timeout(HANG_GUARD, call)
            .await
            .unwrap_or_else(|_| panic!("{what}: hung"));
        assert!(failed(&got), "{what}: {got:?}");
    }
}

/// The peer goes while callers wait at each place ([`park_everywhere`]). Every one of them
/// ends at once with `Disconnected`: none times out, none hangs, and a call after them fails
/// the same way.
#[test]
fn callers_waiting_anywhere_when_the_peer_goes_end_with_disconnected_not_a_timeout() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let rt = common::current_thread_runtime();
    let (ours, theirs) = Socket::pair().unwrap();
    // Serves nothing: reads nothing, answers nothing.
    let peer = Connection::new(theirs);
    rt.block_on(async {
        let conn = AsyncConnection::new(ours).unwrap();
        let client = PeerClient::new(conn.clone());
        let parked = park_everywhere(&client);
        drop(peer);
        let disconnected = |got: &typed_ipc::Result<()>| matches!(got, Err(Error::Disconnected));
        all_fail(parked, disconnected).await;
        assert!(conn.is_closed());
        let timed = client.with_timeout(HANG_GUARD);
        let after = call(&timed, 8).await;
        assert!(disconnected(&after), "after: {after:?}");
        drop((client, timed));
        tokio::time::timeout(HANG_GUARD, conn.wait_closed())
            .await
            .expect("the connection's tasks did not end");
    });
    drop(rt);
    before.assert_nothing_new();
}

/// This end closes the connection while callers wait at each place ([`park_everywhere`]):
/// every one of them ends at once with `Disconnected`, and the peer sees the hang-up.
#[test]
fn callers_waiting_anywhere_when_this_end_closes_end_with_disconnected() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let rt = common::current_thread_runtime();
    let (ours, theirs) = Socket::pair().unwrap();
    rt.block_on(async {
        let conn = AsyncConnection::new(ours).unwrap();
        let client = PeerClient::new(conn.clone());
        let parked = park_everywhere(&client);
        conn.close();
        let disconnected = |got: &typed_ipc::Result<()>| matches!(got, Err(Error::Disconnected));
        all_fail(parked, disconnected).await;
        drop(client);
        tokio::time::timeout(HANG_GUARD, conn.wait_closed())
            .await
            .expect("the connection's tasks did not end");
    });
    // What went out before the close, then the end.
    while theirs.recv().is_ok() {}
    drop((rt, theirs));
    before.assert_nothing_new();
}

/// The runtime that runs a connection shuts down while callers on another runtime wait at
/// each place ([`park_everywhere`]): every one of them fails at once saying so (not a
/// timeout, nor in the reactor's own words), and no fd is left.
#[test]
fn callers_waiting_anywhere_when_the_connections_runtime_shuts_down_fail_saying_so() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let conn_rt = common::current_thread_runtime();
    let callers_rt = common::two_worker_runtime();
    let (ours, theirs) = Socket::pair().unwrap();
    let peer = Connection::new(theirs);
    let conn = conn_rt.block_on(async { AsyncConnection::new(ours).unwrap() });
    let client = PeerClient::new(conn.clone());
    let parked = callers_rt.block_on(async { park_everywhere(&client) });
    drop(conn_rt);
    callers_rt.block_on(async {
        let said_so = |got: &typed_ipc::Result<()>| {
            let said = got.as_ref().map_err(|e| e.to_string()).err();
            said.is_some_and(|said| said.contains("runtime running the connection shut down"))
        };
        all_fail(parked, said_so).await;
        assert!(conn.is_closed());
    });
    drop((client, conn, peer));
    drop(callers_rt);
    before.assert_nothing_new();
}

/// Eight tasks call concurrently on one connection, with strings of sizes that go out at
/// once, wait for the send lock, go part-way or through the lane, and fds; each call given
/// up at a random moment (its timeout) or, one in eight, its task's future dropped at its
/// next wait. Every call that returns has its own reply (its `n`, its string, its fd), no
/// task hangs, the connection serves on, and once it is gone no fd is left.
fn concurrent_calls_cancelled_at_random(async_peer: bool) {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let rt = common::two_worker_runtime();
    // Another each run; `SEED=n` runs one again.
    let seed = std::env::var("SEED").ok().and_then(|s| s.parse().ok());
    let seed = seed.unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.unwrap().as_nanos() as u64
    });
    eprintln!("seed {seed} (SEED={seed} to run it again)");
    let rounds: u64 = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if async_peer { 200 } else { 60 });
    // A blocking peer runs one call at a time, the calls given up and already started too:
    // given as long as an async peer, its callers would give up nearly every call.
    let longest_us = if async_peer { 4_000 } else { 100_000 };
    rt.block_on(async {
        let (ours, theirs) = Socket::pair().unwrap();
        let conn = AsyncConnection::new(ours).unwrap();
        let (serving, peer) = match async_peer {
            true => {
                let peer = AsyncConnection::new(theirs).unwrap();
                let serve = peer.serve(asynchronous::PeerServer::new(Seen::default()));
                (None, Some((tokio::spawn(serve), peer)))
            }
            false => {
                let serve = move || {
                    Connection::new(theirs).serve(blocking::PeerServer::new(Seen::default()))
                };
                (Some(std::thread::spawn(serve)), None)
            }
        };
        let client = PeerClient::new(conn.clone());
        let tasks: Vec<_> = (0..8u64)
            .map(|task| {
                let client = client.clone();
                let mut x = (seed ^ task.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
                tokio::spawn(async move {
                    let mut answered = 0;
                    for round in 0..rounds {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let n = task << 32 | round;
                        let len = [16usize, 3000, 70_000, 300_000][x as usize % 4];
                        let data = filled(len, n);
                        let files: Vec<OwnedFd> =
                            (0..(x >> 8) % 3).map(|_| memfd(&n.to_le_bytes())).collect();
                        let nfds = files.len();
                        let call = client.echo(n, data.clone(), files);
                        let got = match (x >> 16) % 8 {
                            0 => {
                                // Dropped at its first wait, whatever that is.
                                let mut call = std::pin::pin!(call);
                                let first =
                                    std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx)))
                                        .await;
                                match first {
                                    Poll::Ready(got) => Some(got),
                                    Poll::Pending => None,
                                }
                            }
                            _ => {
                                let us = (x >> 24) % longest_us;
                                tokio::time::timeout(Duration::from_micros(us), call)
                                    .await
                                    .ok()
                            }
                        };
                        let Some(got) = got else { continue };
                        let back = got.unwrap();
                        assert_eq!(back.n, n, "another call's reply");
                        assert!(back.data == data, "{n:#x}: another call's string");
                        assert_eq!(back.files.len(), nfds, "{n:#x}: another call's fds");
                        for file in back.files {
                            assert_eq!(read_all(file), n.to_le_bytes(), "another call's fd");
                        }
                        answered += 1;
                    }
                    answered
                })
            })
            .collect();
        let mut answered = 0;
        for task in tasks {
            answered += tokio::time::timeout(HANG_GUARD, task)
                .await
                .expect("a caller hung")
                .unwrap();
        }
        eprintln!("answered {answered} of {}", 8 * rounds);
        let back = client.echo(7, vec![7; 300_000], vec![memfd(b"7")]).await;
        let back = back.unwrap();
        assert_eq!((back.n, back.data.len(), back.files.len()), (7, 300_000, 1));
        drop(back);
        drop((client, conn));
        if let Some(serving) = serving {
            tokio::task::spawn_blocking(move || serving.join().unwrap().unwrap())
                .await
                .unwrap();
        }
        if let Some((serving, peer)) = peer {
            drop(peer);
            tokio::time::timeout(HANG_GUARD, serving)
                .await
                .expect("the peer's serving hung")
                .unwrap()
                .unwrap();
        }
    });
    drop(rt);
    before.assert_nothing_new();
}

#[test]
fn concurrent_calls_to_a_blocking_peer_cancelled_at_random_get_their_own_replies() {
    concurrent_calls_cancelled_at_random(false);
}

#[test]
fn concurrent_calls_to_an_async_peer_cancelled_at_random_get_their_own_replies() {
    concurrent_calls_cancelled_at_random(true);
}

/// A raw peer's reply to `cookie`, the envelope that of the request `call` (a reply to its
/// method), its body `back`, and `extra` fds after those `back` carries (named by nothing).
fn reply(peer: &Socket, call: &typed_ipc::Frame, cookie: u64, back: &Back, extra: &[&OwnedFd]) {
    let mut payload = call.payload[..24].to_vec();
    payload[0] = 3; // kind Reply
    payload[1..4].fill(0); // lane word: reads no lanes, acknowledges nothing
    payload[8..16].copy_from_slice(&cookie.to_le_bytes());
    let mut fds = Vec::new();
    typed_ipc::codec::encode(back, &mut payload, &mut fds).unwrap();
    fds.extend(extra.iter().map(|fd| fd.as_fd()));
    peer.send(&payload, &fds).unwrap();
}

/// The next call or cancel the raw peer receives (lane announcements passed over): its kind
/// and cookie, and the message.
fn next_request(peer: &Socket) -> (u8, u64, typed_ipc::Frame) {
    loop {
        let frame = peer.recv().unwrap();
        let (kind, cookie) = (
            frame.payload[0],
            u64::from_le_bytes(frame.payload[8..16].try_into().unwrap()),
        );
        if kind != 5 {
            return (kind, cookie, frame);
        }
    }
}

/// A hostile peer answers a call given up after its request went out (past its cancel), a
/// cookie no call ever had, and a live call twice, each of those with fds of its own: the
/// live call gets its one reply, the others are dropped with every fd they carried, and the
/// next call is answered.
#[test]
fn replies_to_a_call_given_up_to_no_call_or_twice_are_dropped_with_their_fds() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let rt = common::current_thread_runtime();
    let (ours, theirs) = Socket::pair().unwrap();
    let (reads, writes): (Vec<OwnedFd>, Vec<OwnedFd>) = (0..3).map(|_| pipe()).unzip();
    let peer = std::thread::spawn(move || {
        let (kind, a, given_up) = next_request(&theirs);
        assert_eq!(kind, 1);
        let (kind, b, live) = next_request(&theirs);
        assert_eq!(kind, 1);
        let (kind, cancelled, _) = next_request(&theirs);
        assert_eq!((kind, cancelled), (7, a), "the given-up call's cancel");
        let back = |n: u64, len: usize, call: &typed_ipc::Frame| Back {
            n,
            data: vec![n as u8; len],
            files: (call.fds.iter())
                .map(|fd| fd.try_clone().unwrap())
                .collect(),
        };
        reply(
            &theirs,
            &given_up,
            a,
            &back(1, 10, &given_up),
            &[&writes[0]],
        );
        reply(
            &theirs,
            &given_up,
            u64::MAX / 3,
            &back(1, 10, &given_up),
            &[&writes[1]],
        );
        reply(&theirs, &live, b, &back(2, 20, &live), &[]);
        reply(&theirs, &live, b, &back(2, 20, &live), &[&writes[2]]);
        drop((given_up, live, writes));
        let (kind, c, next) = next_request(&theirs);
        assert!(kind == 1 && c > b, "a later call's cookie: {c} after {b}");
        reply(&theirs, &next, c, &back(3, 30, &next), &[]);
        // Until the client hangs up, so that the connection's end is the client's doing.
        while theirs.recv().is_ok() {}
    });
    rt.block_on(async {
        let conn = AsyncConnection::new(ours).unwrap();
        let client = PeerClient::new(conn.clone());
        let given_up = waiting(client.echo(1, vec![1; 10], vec![memfd(b"1")]), "sent");
        let live = waiting(client.echo(2, vec![2; 20], vec![memfd(b"2")]), "sent");
        drop(given_up);
        let back = tokio::time::timeout(HANG_GUARD, live)
            .await
            .expect("hung")
            .unwrap();
        assert_eq!((back.n, back.data.as_slice()), (2, &[2u8; 20][..]));
        let back_fds: Vec<Vec<u8>> = back.files.into_iter().map(read_all).collect();
        assert_eq!(back_fds, [b"2".to_vec()]);
        let next = client.echo(3, vec![3; 30], vec![memfd(b"3")]);
        let back = tokio::time::timeout(HANG_GUARD, next)
            .await
            .expect("hung")
            .unwrap();
        assert_eq!((back.n, back.data.len(), back.files.len()), (3, 30, 1));
        drop(back);
        // Every reply before the last was routed before it: dropped ones too.
        for (i, read) in reads.iter().enumerate() {
            assert!(write_ends_gone(read), "reply {i}'s fd is still open");
        }
        assert!(!conn.is_closed());
        drop((client, conn));
    });
    drop(reads);
    peer.join().unwrap();
    drop(rt);
    before.assert_nothing_new();
}
