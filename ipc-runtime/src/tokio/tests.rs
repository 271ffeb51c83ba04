//! The non-blocking send underneath the async flavour: [`Socket::send_some`] and its cursor.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::socket::{SendCursor, Socket};

fn memfd(index: u32) -> OwnedFd {
    use std::io::Write;
    let fd = nix::sys::memfd::memfd_create("test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let mut file = std::fs::File::from(fd);
    file.write_all(&index.to_le_bytes()).unwrap();
    file.into()
}

fn index_of(fd: OwnedFd) -> u32 {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::from(fd);
    file.seek(SeekFrom::Start(0)).unwrap();
    let mut b = [0u8; 4];
    file.read_exact(&mut b).unwrap();
    u32::from_le_bytes(b)
}

/// An async connection on a current-thread runtime that nothing drives (its futures are
/// polled by hand, or in `block_on`), and its peer's raw socket.
fn undriven_connection() -> (::tokio::runtime::Runtime, super::AsyncConnection, Socket) {
    let (ours, theirs) = Socket::pair().unwrap();
    let runtime = current_thread_runtime();
    let conn = runtime.block_on(async { super::AsyncConnection::new(ours).unwrap() });
    (runtime, conn, theirs)
}

/// Sends small oneways on `conn`, each polled once by hand, until one finds the peer's queue
/// full (that one is dropped, none of it out): how many went out, all unread.
fn fill_with_oneways(conn: &super::AsyncConnection) -> usize {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let mut cx = Context::from_waker(Waker::noop());
    let mut unread = 0;
    while let Poll::Ready(sent) =
        Box::pin(conn.oneway(&crate::connection::tests::BULK, 1, (), None))
            .as_mut()
            .poll(&mut cx)
    {
        sent.unwrap();
        unread += 1;
        assert!(unread < 1 << 20, "the peer's queue never filled");
    }
    unread
}

fn wait_writable(socket: &Socket) {
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
    poll(&mut fds, PollTimeout::NONE).unwrap();
}

/// Sends a message too big for the socket buffer a piece at a time while the peer receives
/// it with a blocking `recv`; halfway, the sender swaps its borrowed fds for copies of the
/// ones not sent yet, as a cancelled async send does.
#[test]
fn a_message_goes_out_in_pieces_and_resumes_with_copies_of_the_unsent_fds() {
    let (a, b) = Socket::pair().unwrap();
    let payload: Vec<u8> = (0..24u32 << 20).map(|i| (i % 253) as u8).collect();
    let files: Vec<OwnedFd> = (0..700).map(memfd).collect();

    let mut cursor = SendCursor::new(payload.len(), files.len()).unwrap();
    assert!(!cursor.in_progress());
    let borrowed: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
    // Until the socket buffer is full. Nobody receives yet: a receiver draining meanwhile
    // could take the whole message before the sender ever has to stop.
    let sent_whole = a.send_some(&mut cursor, &payload, &borrowed).unwrap();
    assert!(!sent_whole, "24 MiB do not fit a socket buffer");
    assert!(cursor.in_progress() && cursor.fds_sent() > 0);
    let receiver = std::thread::spawn(move || b.recv().unwrap());
    // Copies of the fds still to go; the originals may now be closed.
    let unsent: Vec<OwnedFd> = files[cursor.fds_sent()..]
        .iter()
        .map(|f| f.try_clone().unwrap())
        .collect();
    drop(borrowed);
    drop(files);
    cursor.forget_sent_fds();
    let unsent_fds: Vec<BorrowedFd<'_>> = unsent.iter().map(|f| f.as_fd()).collect();
    while !a.send_some(&mut cursor, &payload, &unsent_fds).unwrap() {
        wait_writable(&a);
    }
    assert!(!cursor.in_progress());

    let frame = receiver.join().unwrap();
    assert!(frame.payload == payload, "the payload arrived intact");
    let indices: Vec<u32> = frame.fds.into_iter().map(index_of).collect();
    assert_eq!(
        indices,
        (0..700).collect::<Vec<u32>>(),
        "every fd, in order"
    );
}

#[test]
fn a_small_message_is_one_datagram_and_never_in_progress() {
    let (a, b) = Socket::pair().unwrap();
    let fd = memfd(7);
    let mut cursor = SendCursor::new(5, 1).unwrap();
    assert!(a.send_some(&mut cursor, b"hello", &[fd.as_fd()]).unwrap());
    assert!(!cursor.in_progress());
    let frame = b.recv().unwrap();
    assert_eq!(frame.payload, b"hello");
    assert_eq!(index_of(frame.fds.into_iter().next().unwrap()), 7);
}

/// The async flavour's side of `a_placed_reply_dropped_unread_gives_the_lane_back`: a call
/// dropped (here by its timeout) before its placed reply came leaves that reply unread, and
/// the lane must be given back all the same.
#[test]
fn an_async_call_dropped_before_its_placed_reply_gives_the_lane_back() {
    use std::time::Duration;

    use crate::codec::Bytes;
    use crate::connection::tests::{BULK, serve_gated};
    use crate::{Connection, Error};

    let (ours, theirs) = Socket::pair().unwrap();
    let server = Connection::new(theirs);
    let (open, serving) = serve_gated(&server);
    let runtime = current_thread_runtime();
    runtime.block_on(async {
        let client = super::AsyncConnection::new(ours).unwrap();
        let ping = || client.call::<_, u32>(&BULK, 2, (), None);
        assert_eq!(ping().await.unwrap(), 7);
        let data = vec![0x5a; 8 << 10];
        let short = Some(Duration::from_millis(1));
        let gave_up = client
            .call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), short)
            .await;
        assert!(matches!(gave_up, Err(Error::TimedOut)), "{gave_up:?}");
        open.send(()).unwrap();
        assert_eq!(ping().await.unwrap(), 7);
        assert_eq!(ping().await.unwrap(), 7);
        assert!(!server.lane_is_busy(), "the server's lane is still busy");
        open.send(()).unwrap();
        let Bytes(back) = client
            .call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), None)
            .await
            .unwrap();
        assert_eq!(back, data);
        client.close();
    });
    serving.join().unwrap().unwrap();
}

/// The async flavour's side of `a_placed_request_its_handler_never_decoded_gives_the_lane_back`:
/// an `AsyncCall` dropped without its arguments decoded gives their placement back.
/// Answers `SKIM`'s `skip` (1) with 0 without decoding its argument, and `len` with its
/// argument's length.
struct Skimmer;

impl super::AsyncService for Skimmer {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::SKIM
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            match call.command() {
                1 => call.reply(0u32).await,
                _ => {
                    let crate::codec::Bytes(data): crate::codec::Bytes<Vec<u8>> = call.args()?;
                    call.reply(data.len() as u64).await
                }
            }
        })
    }
}

/// A blocking client, and an async server on a current-thread runtime, over one socket pair.
fn client_and_async_server() -> (
    crate::Connection,
    ::tokio::runtime::Runtime,
    super::AsyncConnection,
) {
    let (runtime, server, theirs) = undriven_connection();
    (crate::Connection::new(theirs), runtime, server)
}

#[test]
fn an_async_request_never_decoded_gives_the_lane_back() {
    use crate::connection::tests::skim_twice;

    let (client, runtime, server) = client_and_async_server();
    // The client hangs up when its thread is done, which ends `serve`.
    let calling = std::thread::spawn(move || skim_twice(&client));
    runtime.block_on(server.serve(Skimmer)).unwrap();
    calling.join().unwrap();
}

/// The async flavour's [`crate::connection::tests::RunsAnyway`].
struct RunsAnyway;

impl super::AsyncService for RunsAnyway {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::SKIM
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        use crate::codec::Bytes;
        use crate::connection::tests::ANYWAY;
        Box::pin(async move {
            match call.args::<Bytes<Vec<u8>>>() {
                Ok(Bytes(data)) => call.reply(data.len() as u64).await,
                Err(_) => call.reply(Bytes(vec![0u8; ANYWAY])).await,
            }
        })
    }
}

/// `connection::tests::a_handler_that_ran_after_its_arguments_were_refused_is_not_reported_unrun`,
/// served by the async flavour.
#[test]
fn an_async_handler_that_ran_after_its_arguments_were_refused_is_not_reported_unrun() {
    use crate::connection::tests::{call_one_that_runs_anyway, limits_of_100_kib};
    let (ours, mut theirs) = Socket::pair().unwrap();
    theirs.set_limits(limits_of_100_kib());
    let runtime = current_thread_runtime();
    let server = runtime.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    let client = crate::Connection::new(ours);
    // The client hangs up when its thread is done, which ends `serve`.
    let calling = std::thread::spawn(move || call_one_that_runs_anyway(&client));
    runtime.block_on(server.serve(RunsAnyway)).unwrap();
    calling.join().unwrap();
}

/// A oneway message for an interface the async end does not serve is refused before any
/// handler sees it; a byte string it placed must still be released, or the sender, who hears
/// nothing back about a oneway, keeps its lane busy for good.
#[test]
fn an_async_refused_oneway_gives_the_lane_back() {
    use crate::codec::Bytes;
    use crate::connection::tests::SKIM;
    use crate::service::InterfaceInfo;

    static ELSEWHERE: InterfaceInfo = InterfaceInfo {
        name: "Elsewhere",
        id: 99,
        signature: 1,
        methods: &[],
    };

    let (client, runtime, server) = client_and_async_server();
    let calling = std::thread::spawn(move || {
        let data = vec![7u8; 8 << 10];
        let len = |bytes: &[u8]| client.call::<_, u64>(&SKIM, 2, &Bytes(bytes), None);
        assert_eq!(len(&data[..100]).unwrap(), 100); // both ends now know the other reads lanes
        client.oneway(&ELSEWHERE, 1, &Bytes(&data), None).unwrap();
        assert!(client.lane_is_busy(), "the oneway's string was placed");
        // The reply to this call carries the server's acknowledgement of the refused oneway.
        assert_eq!(len(&data[..100]).unwrap(), 100);
        assert!(
            !client.lane_is_busy(),
            "the refused oneway's placement is still held"
        );
    });
    runtime.block_on(server.serve(Skimmer)).unwrap();
    calling.join().unwrap();
}

/// Dropping the last handle of a connection shuts its socket down, and its reader then reads
/// the end of the stream as if the peer had hung up: the connection notes which it was, for
/// the traced line that says why it ended. `stop_reading` before the drop is what is said.
#[test]
fn the_end_is_noted_as_this_sides_when_the_last_handle_goes_or_it_stopped_reading() {
    use crate::connection::trace::EndedHere;

    let runtime = current_thread_runtime();
    let _entered = runtime.enter();
    let (a, _peer) = Socket::pair().unwrap();
    let conn = super::AsyncConnection::new(a).unwrap();
    let ended_here = conn.test_ended_here();
    let clone = conn.clone();
    drop(conn);
    assert_eq!(ended_here(), EndedHere::No, "a handle is left");
    drop(clone);
    assert_eq!(ended_here(), EndedHere::Dropped);

    let (a, _peer) = Socket::pair().unwrap();
    let conn = super::AsyncConnection::new(a).unwrap();
    let ended_here = conn.test_ended_here();
    conn.stop_reading();
    assert_eq!(ended_here(), EndedHere::StoppedReading);
    drop(conn);
    assert_eq!(
        ended_here(),
        EndedHere::StoppedReading,
        "said first, so said"
    );
}

/// A small message normally goes out at once from the sending thread's buffer; one that finds
/// the socket full takes its bytes along and waits, and the messages after it wait behind it
/// (even once there is room), in order, with their bytes intact.
#[test]
fn a_send_that_must_wait_keeps_its_bytes_and_the_messages_behind_it_in_order() {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use crate::codec::Bytes;
    use crate::connection::tests::BULK;

    let (runtime, client, theirs) = undriven_connection();
    // 512 bytes each (under the lane's 1 KiB), numbered.
    let bytes = |i: u32| i.to_le_bytes().repeat(128);
    let message = |i: u32| client.oneway(&BULK, 1, Bytes(bytes(i)), None);
    let mut cx = Context::from_waker(Waker::noop());
    // The peer reads nothing yet: send until its queue is full.
    let mut sent = 0u32;
    let mut waiting = loop {
        let mut send = Box::pin(message(sent));
        match send.as_mut().poll(&mut cx) {
            Poll::Ready(result) => result.unwrap(),
            Poll::Pending => break send,
        }
        sent += 1;
        assert!(sent < 1 << 20, "the peer's queue never filled");
    };
    let body = |i: u32| {
        let frame = theirs.recv().unwrap();
        assert!(
            frame.payload.ends_with(&bytes(i)),
            "message {i} arrived intact"
        );
    };
    for i in 0..sent {
        body(i);
    }
    // There is room now, but the waiting message has not been polled since: the next one
    // must not overtake it.
    let mut behind = pin!(message(sent + 1));
    assert!(
        behind.as_mut().poll(&mut cx).is_pending(),
        "it went past the one waiting"
    );
    runtime.block_on(async {
        waiting.as_mut().await.unwrap();
        behind.await.unwrap();
        // The thread's buffer gave its bytes to the waiting message: the next one is whole too.
        message(sent + 2).await.unwrap();
    });
    for i in sent..sent + 3 {
        body(i);
    }
}

/// A current-thread runtime, and an async connection on `ours` that has learnt from `peer`
/// (a message it sent) that the peer reads lanes.
fn client_of_a_lane_reader(
    ours: Socket,
    peer: &crate::Connection,
) -> (::tokio::runtime::Runtime, super::AsyncConnection) {
    let runtime = current_thread_runtime();
    let client = runtime.block_on(async {
        let client = super::AsyncConnection::new(ours).unwrap();
        peer.oneway(&crate::connection::tests::BULK, 2, &(), None)
            .unwrap();
        while !client.test_lane().peer_reads() {
            ::tokio::task::yield_now().await;
        }
        client
    });
    (runtime, client)
}

/// A send that has placed a byte string and then waits for the send lock (another message is
/// waiting for room with it) gives its placement back when it is cancelled there; otherwise
/// the lane stays busy, and every later byte string goes through the socket.
#[test]
fn a_send_cancelled_while_it_waits_for_the_send_lock_gives_its_placement_back() {
    use std::future::Future;
    use std::task::{Context, Waker};

    use crate::Connection;
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;

    let (ours, theirs) = Socket::pair().unwrap();
    let peer = Connection::new(theirs);
    let (_runtime, client) = client_of_a_lane_reader(ours, &peer);
    let mut cx = Context::from_waker(Waker::noop());
    // The peer reads nothing: send small messages until one waits for room, holding the
    // send lock.
    let mut sent = 0u32;
    let _waiting = loop {
        let mut send = Box::pin(client.oneway(&BULK, 1, Bytes(vec![0u8; 512]), None));
        if send.as_mut().poll(&mut cx).is_pending() {
            break send;
        }
        sent += 1;
        assert!(sent < 1 << 20, "the peer's queue never filled");
    };
    // A byte string the lane takes: placed while encoding, then the send waits for the lock.
    let mut placed = Box::pin(client.oneway(&BULK, 1, Bytes(vec![1u8; 4096]), None));
    assert!(placed.as_mut().poll(&mut cx).is_pending());
    assert!(client.test_lane().is_busy(), "the string was placed");
    drop(placed);
    assert!(
        !client.test_lane().is_busy(),
        "the cancelled send gave its placement back"
    );
}

// ---- cancelled calls and the lane ----

/// Echoes `BULK`'s `gated_echo` (1) at once, answers `ping` (2) with 7 (see `meeting`).
#[derive(Default)]
struct QuickEcho {
    /// If set, `ping` answers only once this many callers are inside it at once.
    meeting: Option<std::sync::Arc<::tokio::sync::Barrier>>,
}

impl super::AsyncService for QuickEcho {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::BULK
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            match call.command() {
                1 => {
                    let crate::codec::Bytes(data): crate::codec::Bytes<Vec<u8>> = call.args()?;
                    call.reply(crate::codec::Bytes(data)).await
                }
                _ => {
                    if let Some(meeting) = &self.meeting {
                        meeting.wait().await;
                    }
                    call.reply(7u32).await
                }
            }
        })
    }
}

/// A connection whose peer has gone says so before its reader has run to read the hang-up
/// (no `.await` between the peer's going and the question).
#[test]
fn a_connection_whose_peer_is_gone_is_closed_before_its_reader_runs() {
    current_thread_runtime().block_on(async {
        let (a, b) = crate::tokio::AsyncConnection::pair().unwrap();
        assert!(!a.is_closed());
        drop(b);
        assert!(a.is_closed());
    });
}

/// A runtime on the calling thread, with its I/O and time drivers.
fn current_thread_runtime() -> ::tokio::runtime::Runtime {
    ::tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn multi_thread_runtime(threads: usize) -> ::tokio::runtime::Runtime {
    ::tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap()
}

/// Round trips until neither lane is busy (late replies of cancelled calls settle).
async fn settle(client: &super::AsyncConnection, server: &super::AsyncConnection) -> bool {
    use crate::connection::tests::BULK;
    for _ in 0..200 {
        let pong: u32 = client.call(&BULK, 2, (), None).await.unwrap();
        assert_eq!(pong, 7);
        if !client.test_lane().is_busy() && !server.test_lane().is_busy() {
            return true;
        }
        ::tokio::task::yield_now().await;
    }
    eprintln!(
        "busy: client {} server {}",
        client.test_lane().is_busy(),
        server.test_lane().is_busy()
    );
    false
}

/// A cancel (envelope kind 7) for a call that is not running, with a body and an fd a
/// hostile peer put in, is dropped whole: the connection goes on. Before wire version 12 the
/// kind was unknown and ended the connection as malformed.
#[test]
fn an_async_cancel_of_no_call_is_ignored_with_what_it_holds() {
    use crate::connection::envelope::{self, Envelope};
    use crate::connection::tests::BULK;

    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (client, server) = super::AsyncConnection::pair().unwrap();
        server.add_service(QuickEcho::default());
        let mut cancel = vec![0u8; envelope::LEN];
        Envelope::cancel(77).write(&mut cancel);
        cancel.extend_from_slice(b"a body no cancel has");
        // A small message on an idle connection: the blocking send does not wait.
        client.socket().send(&cancel, &[memfd(1).as_fd()]).unwrap();
        assert_eq!(client.call::<_, u32>(&BULK, 2, (), None).await.unwrap(), 7);
    });
}

/// Calls cancelled at random moments, with placed byte strings both ways: afterwards no lane
/// is left busy.
#[test]
fn async_calls_cancelled_at_random_moments_leave_no_lane_busy() {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;
    use std::time::Duration;

    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (client, server) = super::AsyncConnection::pair().unwrap();
        server.add_service(QuickEcho::default());
        let mut x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        let rounds: u32 = std::env::var("ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3000);
        for _ in 0..rounds {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = [1024usize, 2000, 8 << 10, 60_000, 70_000, 300_000][(x % 6) as usize];
            let us = (x >> 8) % 200;
            let data = vec![(x >> 16) as u8; len];
            let got = ::tokio::time::timeout(
                Duration::from_micros(us),
                client.call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), None),
            )
            .await;
            if let Ok(got) = got {
                assert_eq!(got.unwrap().0, data);
            }
        }
        assert!(settle(&client, &server).await, "a lane stayed busy");
        let data = vec![3u8; 4096];
        let Bytes(back) = client
            .call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), None)
            .await
            .unwrap();
        assert_eq!(back, data);
    });
}

/// How long, in all, `an_async_call_dropped_as_its_placed_reply_arrives_gives_the_lane_back`
/// spins between a call and its drop.
const SPIN_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

/// Aims the drop of a call at the moment its placed reply arrives: the reply must be finished
/// (its placement acknowledged) whichever way the race goes. When replies went through a
/// one-shot channel per call, the dropped call could find the channel empty, the reader then
/// send the reply into it, and the receiver, dropped next, drop the frame with it unfinished:
/// the server's lane stayed busy for good. Aimed by spinning for about a round trip; a run of
/// 100,000 drops hit that window in 7 runs of 10 here. Now the slot is taken under the state
/// lock, and a drop that forgets to finish the reply it finds fails this test at once.
#[test]
fn an_async_call_dropped_as_its_placed_reply_arrives_gives_the_lane_back() {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    use std::time::Instant;

    let rt = multi_thread_runtime(1);
    let (client, server) = rt.block_on(async {
        let (client, server) = super::AsyncConnection::pair().unwrap();
        server.add_service(QuickEcho::default());
        (client, server)
    });
    let _enter = rt.enter();
    let mut cx = Context::from_waker(Waker::noop());
    let data = vec![5u8; 2048];
    let call = || client.call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), None);
    // The round trip's time, spinning.
    let mut rtt = Vec::new();
    for _ in 0..200 {
        let mut c = Box::pin(call());
        let start = Instant::now();
        loop {
            if let Poll::Ready(r) = c.as_mut().poll(&mut cx) {
                r.unwrap();
                break;
            }
        }
        rtt.push(start.elapsed().as_nanos() as u64);
    }
    rtt.sort();
    let median = rtt[rtt.len() / 2];
    eprintln!("median round trip {median} ns");
    let rounds: u64 = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    // Each round spins for about a round trip, and a round trip on a loaded machine, or on
    // one CPU, is a timeslice: 16 ms under `taskset -c 0` beside two busy loops, where 100,000
    // rounds took over 25 minutes (a hang, to CI's watchdog). The spinning is bounded, well
    // above what 100,000 rounds of an idle machine's round trip spin.
    let rounds = rounds.min(SPIN_BUDGET.as_nanos() as u64 / median.max(1));
    let mut x = 88172645463325252u64;
    let mut leaked_at = None;
    for i in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let wait = median / 2 + x % median;
        let mut c = Box::pin(call());
        let start = Instant::now();
        if c.as_mut().poll(&mut cx).is_ready() {
            continue;
        }
        while (start.elapsed().as_nanos() as u64) < wait {
            std::hint::spin_loop();
        }
        drop(c);
        if i % 500 == 499 && leaked_at.is_none() {
            let settled = rt.block_on(settle(&client, &server));
            if !settled {
                leaked_at = Some(i);
                break;
            }
        }
    }
    let settled = leaked_at.is_none() && rt.block_on(settle(&client, &server));
    assert!(
        settled,
        "a reply's placement leaked (by round {leaked_at:?})"
    );
}

/// An async oneway to a peer that has stopped reading fails with `TimedOut` once its timeout
/// has passed, having sent nothing: the byte string it had placed in the lane goes back to it,
/// and the next message follows the last one that was sent.
#[test]
fn an_async_oneway_that_cannot_be_sent_in_time_times_out_and_gives_its_placement_back() {
    use std::time::Duration;

    use crate::Connection;
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;
    use crate::error::Error;

    let (ours, theirs) = Socket::pair().unwrap();
    let peer = Connection::new(theirs);
    let (runtime, client) = client_of_a_lane_reader(ours, &peer);
    // 512 bytes each (under the lane's 1 KiB), numbered.
    let bytes = |i: u32| i.to_le_bytes().repeat(128);
    let soon = Some(Duration::from_millis(50));
    let sent = runtime.block_on(async {
        // The peer reads nothing: send until a message cannot go out in time.
        let mut sent = 0u32;
        loop {
            match client.oneway(&BULK, 1, Bytes(bytes(sent)), soon).await {
                Ok(()) => sent += 1,
                Err(Error::TimedOut) => break,
                Err(e) => panic!("message {sent}: {e}"),
            }
            assert!(sent < 1 << 20, "the peer's queue never filled");
        }
        // A byte string the lane takes: placed while encoding, then the send times out.
        let late = client.oneway(&BULK, 1, Bytes(vec![1u8; 4096]), soon).await;
        assert!(matches!(late, Err(Error::TimedOut)), "{late:?}");
        assert!(
            !client.test_lane().is_busy(),
            "the timed-out send gave its placement back"
        );
        sent
    });
    let body = |i: u32| {
        let frame = peer.socket().recv().unwrap();
        assert!(
            frame.payload.ends_with(&bytes(i)),
            "message {i} arrived intact, in order"
        );
    };
    for i in 0..sent {
        body(i);
    }
    runtime.block_on(async {
        client
            .oneway(&BULK, 1, Bytes(bytes(sent)), None)
            .await
            .unwrap()
    });
    body(sent);
}

/// The async side of `a_message_over_this_sides_limits_is_refused_unsent`: a call or oneway
/// over this side's limits fails before anything goes out, also while another message holds
/// the send lock (it would otherwise wait for it, then send), and gives back the byte string
/// it placed in the lane.
#[test]
fn an_async_message_over_this_sides_limits_is_refused_unsent() {
    use std::time::Duration;

    use crate::codec::{Bytes, Fd};
    use crate::connection::tests::SKIM;
    use crate::{Connection, Error, Limits};

    let limits = Limits {
        max_message_len: 1 << 20,
        max_fds: 4,
        ..Default::default()
    };
    let runtime = current_thread_runtime();
    // Refused with a placement in the lane, against a blocking server.
    let (mut ours, theirs) = Socket::pair().unwrap();
    ours.set_limits(limits);
    let server = Connection::new(theirs);
    let serving = {
        let server = server.clone();
        std::thread::spawn(move || server.serve(crate::connection::tests::Skimmer))
    };
    runtime.block_on(async {
        let client = super::AsyncConnection::new(ours).unwrap();
        let small = client.call::<_, u64>(&SKIM, 2, Bytes(vec![1u8; 100]), None);
        assert_eq!(small.await.unwrap(), 100); // both ends now know the other reads lanes
        let (placed, inline) = (vec![7u8; 8 << 10], vec![1u8; 2 << 20]);
        let refused = client
            .call::<_, u64>(&SKIM, 2, (Bytes(placed), Bytes(inline)), None)
            .await;
        assert!(
            matches!(
                refused,
                Err(Error::TooLarge { limit, which: crate::Limit::MaxMessageLen, .. })
                    if limit == 1 << 20
            ),
            "{refused:?}"
        );
        assert!(
            !client.test_lane().is_busy(),
            "the placement was given back"
        );
        let len = client.call::<_, u64>(&SKIM, 2, Bytes(vec![7u8; 8 << 10]), None);
        assert_eq!(len.await.unwrap(), 8 << 10, "the next placement is read");
        client.close();
    });
    serving.join().unwrap().unwrap();

    // Refused while another message holds the send lock: its peer reads nothing.
    let (mut ours, theirs) = Socket::pair().unwrap();
    ours.set_limits(limits);
    runtime.block_on(async {
        let client = super::AsyncConnection::new(ours).unwrap();
        let filler = {
            let client = client.clone();
            ::tokio::spawn(async move {
                loop {
                    let sent = client
                        .oneway(&SKIM, 1, Bytes(vec![0u8; 1 << 19]), None)
                        .await;
                    if sent.is_err() {
                        return;
                    }
                }
            })
        };
        // On this one thread, a filler that finds the socket full waits in its send, holding
        // the lock.
        while nix::poll::poll(
            &mut [PollFd::new(client.as_fd(), PollFlags::POLLOUT)],
            PollTimeout::ZERO,
        )
        .unwrap()
            == 1
        {
            ::tokio::task::yield_now().await;
        }
        let files: Vec<OwnedFd> = (0..5).map(memfd).collect();
        // (The timeout only keeps a regression from hanging: nobody reads the socket.)
        let refused = ::tokio::time::timeout(
            Duration::from_secs(60),
            client.call::<_, u32>(&SKIM, 1, Fd(&files), None),
        )
        .await
        .expect("refused at once, not sent after the filler");
        crate::connection::tests::assert_five_fds_over_this_sides_four(&refused);
        for (i, file) in files.into_iter().enumerate() {
            assert_eq!(index_of(file), i as u32, "the caller's fds are untouched");
        }
        client.close();
        filler.await.unwrap();
    });
    drop(theirs);
}

/// A call runs on a task that ran one before and waits for the next, if there is one. A burst
/// of concurrent calls starts a task for each, after which at most `IDLE_RUNNERS` stay; they
/// hold the connection only weakly and end with it, so `wait_closed` returns once the peer
/// hangs up.
#[test]
fn after_a_burst_of_calls_eight_tasks_wait_for_more_and_end_with_the_connection() {
    use super::connection::IDLE_RUNNERS;
    use crate::connection::tests::BULK;
    use std::time::Duration;

    const BURST: usize = 20;
    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (client, server) = super::AsyncConnection::pair().unwrap();
        let meeting = std::sync::Arc::new(::tokio::sync::Barrier::new(BURST));
        server.add_service(QuickEcho {
            meeting: Some(meeting),
        });
        let tasks = |server: &super::AsyncConnection| server.test_tasks();
        let calls = (0..BURST).map(|_| {
            let client = client.clone();
            ::tokio::spawn(async move { client.call::<_, u32>(&BULK, 2, (), None).await })
        });
        for call in calls.collect::<Vec<_>>() {
            assert_eq!(call.await.unwrap().unwrap(), 7);
        }
        // Each reply went out before its task went idle; a round trip more lets the last
        // ones get there.
        let settled = async {
            while tasks(&server) != (1 + IDLE_RUNNERS, IDLE_RUNNERS) {
                ::tokio::task::yield_now().await;
            }
        };
        ::tokio::time::timeout(Duration::from_secs(10), settled)
            .await
            .unwrap_or_else(|_| panic!("tasks (all, idle): {:?}", tasks(&server)));
        drop(client);
        ::tokio::time::timeout(Duration::from_secs(10), server.wait_closed())
            .await
            .expect("the idle tasks ended with the connection");
        assert_eq!(tasks(&server), (0, 0));
    });
}

/// `stop_reading` (graceful shutdown) lets requests already received run and their replies
/// go out: a call read after it, from what the socket already held, must be answered, not
/// refused because the services were dropped when the reader ended.
#[test]
fn a_call_received_before_the_read_side_closes_is_answered() {
    use crate::codec::Bytes;
    use crate::connection::tests::SKIM;

    let (client, runtime, server) = client_and_async_server();
    let calling = std::thread::spawn(move || {
        let got = client.call::<_, u64>(&SKIM, 2, &Bytes(&[1u8, 2, 3][..]), None);
        drop(client);
        got
    });
    let mut fds = [PollFd::new(server.socket().as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::NONE).unwrap(); // the call is in the socket
    server.stop_reading();
    runtime.block_on(server.serve(Skimmer)).unwrap();
    let got = calling.join().unwrap();
    assert_eq!(got.unwrap(), 3);
}

/// Answers every call with what a call back into the peer (`SKIM`'s command 2) answers, as
/// a service of `service_with` calling its client does.
struct AsyncCallsBack {
    back: super::AsyncConnection,
}

impl super::AsyncService for AsyncCallsBack {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::CALLS_BACK
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            let skim = &crate::connection::tests::SKIM;
            let n: u64 = self.back.call(skim, 2, (), None).await?;
            call.reply(n).await
        })
    }
}

/// A connection serving `AsyncCallsBack` on an undriven runtime, and its peer, which has sent
/// it a call, still unread in the socket.
fn a_call_back_unread() -> (::tokio::runtime::Runtime, super::AsyncConnection, Socket) {
    let (runtime, server, peer) = undriven_connection();
    server.add_service(AsyncCallsBack {
        back: server.clone(),
    });
    peer.send(&crate::connection::tests::calls_back_request(1), &[])
        .unwrap();
    (runtime, server, peer)
}

/// Serves `server` to its end, and checks that the peer's call did not run: it would have
/// called the peer back.
fn assert_served_without_the_call(
    runtime: &::tokio::runtime::Runtime,
    server: &super::AsyncConnection,
    peer: &Socket,
) {
    use std::time::Duration;

    let ran = runtime
        .block_on(async { ::tokio::time::timeout(Duration::from_secs(60), server.run()).await });
    assert!(matches!(ran, Ok(Ok(()))), "{ran:?}");
    let mut fds = [PollFd::new(peer.as_fd(), PollFlags::POLLIN)];
    let sent = poll(&mut fds, PollTimeout::ZERO).unwrap();
    assert_eq!(
        sent, 0,
        "the call ran after stop_reading: it called the peer back"
    );
}

/// `stop_reading` on a serving connection with none of the peer's requests in flight, and a
/// call of the peer's still unread in the socket: that call is dropped as one read while
/// draining is, not run. Run, its handler's call back into the peer failed with
/// `Disconnected` (the read side shut at once, the peer's reply could not be sent), the peer
/// alive: the graceful shutdown's promise of answers to call backs, broken for it.
#[test]
fn stop_reading_drops_a_call_still_unread_on_a_serving_connection() {
    let (runtime, server, peer) = a_call_back_unread();
    // The reader runs only while the runtime is driven: the call waits in the socket.
    server.stop_reading();
    assert_served_without_the_call(&runtime, &server, &peer);
}

/// `stop_reading` on a serving connection just as its reader has taken a call of the peer's
/// and checked that it may run it, before it counts it in flight: the call must be dropped
/// (the drain found nothing in flight and shut the read side), not run with its call back
/// into the peer failing.
#[test]
fn stop_reading_as_the_reader_takes_a_call_drops_it() {
    let (runtime, server, peer) = a_call_back_unread();
    let stopping = server.clone();
    super::connection::before_admit(Box::new(move || stopping.stop_reading()));
    assert_served_without_the_call(&runtime, &server, &peer);
}

/// `stop_reading` on a connection that serves nothing, with a request of the peer's held for
/// a server to come: nothing will run it, so nothing is waited for, and the connection ends
/// (its reader too) as when the read side is shut at once. (Draining for the replies of
/// requests in flight must not wait for requests that never run.)
#[test]
fn stop_reading_with_a_request_held_for_nobody_ends_the_connection() {
    use crate::codec::Bytes;
    use crate::connection::tests::SKIM;
    use crate::error::Error;
    use std::time::Duration;

    let (client, runtime, server) = client_and_async_server();
    let calling = std::thread::spawn(move || {
        let got = client.call::<_, u64>(&SKIM, 2, &Bytes(&[1u8, 2, 3][..]), None);
        drop(client);
        got
    });
    // The reader runs only while the runtime is driven.
    runtime.block_on(async {
        let held = ::tokio::time::timeout(Duration::from_secs(60), async {
            while !server.test_requests_in_flight() {
                ::tokio::task::yield_now().await;
            }
        });
        held.await.expect("the call is held");
    });
    server.stop_reading();
    let ended = runtime.block_on(async {
        ::tokio::time::timeout(Duration::from_secs(60), server.wait_closed()).await
    });
    assert!(
        ended.is_ok(),
        "the connection read on for a request nobody runs"
    );
    assert!(server.is_closed());
    drop(server);
    let got = calling.join().unwrap();
    assert!(matches!(got, Err(Error::Disconnected)), "{got:?}");
}

/// Blocks the first wake until `release` is dropped, after saying so on `entered`, and then
/// until `then` returns.
struct BlockingWaker {
    entered: parking_lot::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: parking_lot::Mutex<std::sync::mpsc::Receiver<()>>,
    then: Box<dyn Fn() + Send + Sync>,
}

impl std::task::Wake for BlockingWaker {
    fn wake(self: std::sync::Arc<Self>) {
        if let Some(entered) = self.entered.lock().take() {
            entered.send(()).unwrap();
            let _ = self.release.lock().recv(); // until the sender is dropped
            (self.then)();
        }
    }
}

/// What the connection has when its runtime closes (see [`request_as_the_runtime_closes`]).
#[derive(Clone, Copy, PartialEq)]
enum AtClose {
    /// Only the reader.
    Reader,
    /// Also a task that ran a call and waits idle for the next; the runtime has dropped it
    /// when the reader routes the request.
    IdleRunnerDropped,
}

/// Holds the reader of a connection serving `service` between a reply and the request
/// behind it (`kind`: a call or a oneway of the peer's) until its runtime, dropped meanwhile
/// on another thread, has closed itself to new tasks: the reader then routes the request as
/// the runtime shuts down. The reader is held by the waker of the call the reply answers,
/// which returns only once the runtime has dropped a task of its own (and, with `at_close`
/// [`AtClose::IdleRunnerDropped`], the connection's idle task). Returns whether dropping the
/// runtime returned, the connection, and the peer's end.
fn request_as_the_runtime_closes<S: super::AsyncService>(
    service: impl FnOnce(&super::AsyncConnection) -> S,
    kind: crate::tokio::envelope::Kind,
    at_close: AtClose,
) -> (bool, super::AsyncConnection, Socket) {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;
    use crate::tokio::envelope::{self, Envelope, Kind};
    use std::future::Future;
    use std::sync::mpsc;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    let rt = multi_thread_runtime(2);
    let (a, peer) = Socket::pair().unwrap();
    let conn = {
        let _in = rt.enter();
        super::AsyncConnection::new(a).unwrap()
    };
    conn.add_service(service(&conn));
    let message = |envelope: Envelope| {
        let mut payload = vec![0; envelope::LEN];
        envelope.write(&mut payload);
        payload
    };
    let echo = |kind: Kind, cookie: u64| {
        let mut echo = message(Envelope {
            kind,
            cmd: 1,
            cookie,
            interface: BULK.id,
            signature: BULK.signature,
        });
        crate::codec::encode(&Bytes(&b"hi"[..]), &mut echo, &mut Vec::new()).unwrap();
        echo
    };
    if at_close == AtClose::IdleRunnerDropped {
        peer.send(&echo(Kind::Call, 9), &[]).unwrap();
        peer.recv().unwrap();
        crate::connection::tests::wait_until("a task waits idle", || conn.test_tasks().1 == 1);
    }
    let (release, released) = mpsc::channel::<()>();
    // Dropped, releasing the waker, only when the runtime drops its tasks: it is closed then.
    rt.spawn(async move {
        let _release = release;
        std::future::pending::<()>().await
    });
    let (entered, in_wake) = mpsc::channel();
    let waker = Waker::from(std::sync::Arc::new(BlockingWaker {
        entered: parking_lot::Mutex::new(Some(entered)),
        release: parking_lot::Mutex::new(released),
        then: match at_close {
            AtClose::Reader => Box::new(|| {}),
            AtClose::IdleRunnerDropped => {
                let conn = conn.clone();
                Box::new(move || {
                    crate::connection::tests::wait_until("the runtime drops the idle task", || {
                        conn.test_tasks().0 == 1 // the reader's
                    })
                })
            }
        },
    }));
    let mut call = Box::pin(conn.call::<_, u32>(&BULK, 2, (), None));
    let mut cx = Context::from_waker(&waker);
    assert!(call.as_mut().poll(&mut cx).is_pending());

    // The reply to that call, then the peer's request, both in the socket at once.
    let request = peer.recv().unwrap();
    let asked = Envelope::read(&request.payload).unwrap();
    let mut reply = message(Envelope {
        kind: Kind::Reply,
        ..asked
    });
    reply.extend_from_slice(&7u32.to_le_bytes());
    peer.send(&reply, &[]).unwrap();
    let cookie = if kind == Kind::Call { 1 } else { 0 };
    peer.send(&echo(kind, cookie), &[]).unwrap();
    in_wake.recv().unwrap(); // the reader wakes the call, and waits there

    let (dropped, runtime_gone) = mpsc::channel();
    std::thread::spawn(move || {
        drop(rt);
        dropped.send(()).unwrap();
    });
    if runtime_gone.recv_timeout(Duration::from_secs(60)).is_err() {
        // The reader holds the state lock for good: dropping the call would wait for it.
        std::mem::forget(call);
        return (false, conn, peer);
    }
    // The reader ended with its runtime, failing the connection: the call has its reply or
    // the error.
    assert!(matches!(
        call.as_mut().poll(&mut Context::from_waker(Waker::noop())),
        Poll::Ready(_)
    ));
    drop(call);
    (true, conn, peer)
}

/// A call that reaches the reader as its runtime shuts down (on another worker, which has
/// closed the runtime to new tasks) gets a task the runtime drops at once, inside `spawn`.
/// That task's drop takes the state lock, which the reader held around the spawn: the reader
/// deadlocked, and dropping the runtime waited for it for good.
#[test]
fn a_call_that_arrives_as_the_runtime_shuts_down_does_not_deadlock_it() {
    use crate::tokio::envelope::Kind;

    let (returned, conn, peer) =
        request_as_the_runtime_closes(|_| QuickEcho::default(), Kind::Call, AtClose::Reader);
    assert!(
        returned,
        "dropping the runtime deadlocked in the connection's reader"
    );
    assert!(conn.is_closed());
    assert!(matches!(peer.recv(), Err(crate::Error::Disconnected)));
}

/// A call that reaches the reader as its runtime shuts down goes to a task that waits idle
/// for one; if the runtime has already dropped that task, the reader holds the last handle to
/// it. Dropped under the state lock, that handle finished the call it had just been handed,
/// which takes the state lock: the reader deadlocked, and dropping the runtime waited for it
/// for good (CI hung so in `hostile_floods`).
#[test]
fn a_call_handed_to_an_idle_task_the_runtime_dropped_does_not_deadlock_it() {
    use crate::tokio::envelope::Kind;

    let (returned, conn, peer) = request_as_the_runtime_closes(
        |_| QuickEcho::default(),
        Kind::Call,
        AtClose::IdleRunnerDropped,
    );
    assert!(
        returned,
        "dropping the runtime deadlocked in the connection's reader"
    );
    assert!(conn.is_closed());
    assert!(matches!(peer.recv(), Err(crate::Error::Disconnected)));
}

/// Holds a clone of its own connection, as a service that calls back may; says when it goes.
struct HoldingItsConnection {
    _connection: super::AsyncConnection,
    _alive: std::sync::mpsc::Sender<()>,
}

impl super::AsyncService for HoldingItsConnection {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::BULK
    }
    fn handle<'a>(
        &'a self,
        _call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// The first oneway, reaching the reader as the runtime shuts down, gets the task that runs
/// oneways, which the runtime drops at once, inside `spawn`, before it ever ran. That task
/// retires the services when it ends; dropped unstarted, it left the connection thinking it
/// still ran, so the services were never dropped, and one holding a clone of its connection
/// kept the connection (and its socket) for good.
#[test]
fn a_oneway_that_arrives_as_the_runtime_shuts_down_leaves_no_service_behind() {
    use crate::tokio::envelope::Kind;
    use std::sync::mpsc;

    let (alive, service_gone) = mpsc::channel();
    let service = |conn: &super::AsyncConnection| HoldingItsConnection {
        _connection: conn.clone(),
        _alive: alive,
    };
    let (returned, conn, _peer) =
        request_as_the_runtime_closes(service, Kind::Oneway, AtClose::Reader);
    assert!(returned, "dropping the runtime deadlocked");
    assert!(conn.is_closed());
    drop(conn);
    assert_eq!(
        service_gone.try_recv(),
        Err(mpsc::TryRecvError::Disconnected),
        "the service, and the connection it holds, are still there"
    );
}

/// `ORDERED` served async: the request numbered `at` does `action`; the other `note`s
/// (oneways) and `mark`s (calls) keep the numbers they are sent.
struct AsyncOrdered {
    at: u64,
    action: AtSeq,
    run: std::sync::Arc<parking_lot::Mutex<Vec<u64>>>,
}

/// What [`AsyncOrdered`] does with the request numbered `at`.
enum AtSeq {
    /// Says it started, then waits for `gate`.
    Hold {
        started: std::sync::mpsc::Sender<()>,
        gate: std::sync::Arc<::tokio::sync::Notify>,
    },
    /// Closes the connection (once).
    Close(parking_lot::Mutex<Option<super::AsyncConnection>>),
}

impl super::AsyncService for AsyncOrdered {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::ORDERED
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            let seq: u64 = call.args()?;
            match &self.action {
                _ if seq != self.at => self.run.lock().push(seq),
                AtSeq::Hold { started, gate } => {
                    started.send(()).unwrap();
                    gate.notified().await;
                }
                AtSeq::Close(connection) => connection.lock().take().expect("closed once").close(),
            }
            match call.command() {
                3 => Ok(()),
                _ => call.reply(()).await,
            }
        })
    }
}

/// Runs an async connection serving [`AsyncOrdered`] whose oneway `note` 0 holds the task
/// that runs oneways, with calls and oneways of the peer's (numbered 1 to 8, each carrying a
/// copy of a pipe's write end) received behind it: the oneways wait in that task's queue, the
/// calls for the oneways before them (a call of this end's read them before its reply).
/// Then `end` ends the connection (given it and the peer's end), the gate opens, and `run`
/// must return `Ok`. Returns what ran, sorted, and whether every copy of the pipe's write end
/// was closed by then, with the connection still held.
fn queued_behind_a_oneway(end: impl FnOnce(&super::AsyncConnection, Socket)) -> (Vec<u64>, bool) {
    use crate::connection::tests::{ordered_request, reply_to};
    use crate::tokio::envelope::Kind;

    let runtime = multi_thread_runtime(2);
    let (peer, theirs) = Socket::pair().unwrap();
    let (started, has_started) = std::sync::mpsc::channel();
    let gate = std::sync::Arc::new(::tokio::sync::Notify::new());
    let run = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
    let _server = runtime.block_on(async {
        let server = super::AsyncConnection::new(theirs).unwrap();
        let serving = ::tokio::spawn(server.serve(AsyncOrdered {
            at: 0,
            action: AtSeq::Hold {
                started,
                gate: gate.clone(),
            },
            run: run.clone(),
        }));
        peer.send(&ordered_request(Kind::Oneway, 3, 0, 0), &[])
            .unwrap();
        has_started.recv().unwrap();
        let calling = {
            let server = server.clone();
            ::tokio::spawn(async move {
                let iface = &crate::connection::tests::SKIM;
                server.call::<_, u32>(iface, 9, (), None).await
            })
        };
        let call = peer.recv().unwrap();
        for seq in 1..=8 {
            let (kind, cmd) = match seq % 2 {
                0 => (Kind::Call, 2),
                _ => (Kind::Oneway, 3),
            };
            peer.send(&ordered_request(kind, cmd, seq, seq), &[write_end.as_fd()])
                .unwrap();
        }
        peer.send(&reply_to(&call, &5u32), &[]).unwrap();
        assert_eq!(calling.await.unwrap().unwrap(), 5);
        drop(write_end);
        end(&server, peer);
        // The end read before the oneways go on: else a call whose oneways have all run
        // might start before it.
        until_ended(&server).await;
        gate.notify_one();
        serving.await.unwrap().unwrap();
        server
    });
    let mut ran = run.lock().clone();
    ran.sort();
    (ran, write_ends_closed(&read_end))
}

/// `close` drops the requests not started: the oneways queued behind the one running, and
/// the calls waiting for them; their fds are closed, and `run` returns `Ok` once the oneway
/// running is done. (They all ran after `close` before.)
#[test]
fn async_close_drops_the_requests_not_started_and_closes_their_fds() {
    let (ran, closed) = queued_behind_a_oneway(|server, _peer| server.close());
    assert_eq!(ran, [], "requests ran after close");
    assert!(closed, "the dropped requests still hold their fds");
}

/// When the peer hangs up instead, the oneways it sent before still run, and its calls,
/// whose replies can go nowhere now, are dropped unrun, as if it had cancelled each, their
/// fds closed. (They ran before, their replies failing.)
#[test]
fn async_a_peer_hanging_up_leaves_its_oneways_to_run_and_drops_its_calls() {
    let (ran, closed) = queued_behind_a_oneway(|_server, peer| drop(peer));
    assert_eq!(ran, [1, 3, 5, 7]);
    assert!(closed);
}

/// A connection serving [`AsyncOrdered`], whose handler of the call numbered 1 (sent by the
/// peer, carrying `fds`, and started) waits at a gate never opened.
struct HeldCall {
    runtime: ::tokio::runtime::Runtime,
    server: super::AsyncConnection,
    serving: ::tokio::task::JoinHandle<crate::Result<()>>,
    run: std::sync::Arc<parking_lot::Mutex<Vec<u64>>>,
}

impl HeldCall {
    /// The connection, at most `max_calls` running at once if given, and the peer's end.
    fn new(max_calls: Option<usize>, fds: &[BorrowedFd<'_>]) -> (HeldCall, Socket) {
        use crate::connection::tests::ordered_request;
        use crate::tokio::envelope::Kind;

        let runtime = multi_thread_runtime(2);
        let (peer, theirs) = Socket::pair().unwrap();
        let (started, has_started) = std::sync::mpsc::channel();
        let run = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (server, serving) = runtime.block_on(async {
            let server = super::AsyncConnection::new(theirs).unwrap();
            if let Some(n) = max_calls {
                server.set_max_calls_at_once(n);
            }
            let serving = ::tokio::spawn(server.serve(AsyncOrdered {
                at: 1,
                action: AtSeq::Hold {
                    started,
                    gate: std::sync::Arc::new(::tokio::sync::Notify::new()),
                },
                run: run.clone(),
            }));
            (server, serving)
        });
        peer.send(&ordered_request(Kind::Call, 2, 1, 1), fds)
            .unwrap();
        has_started.recv().unwrap();
        let held = HeldCall {
            runtime,
            server,
            serving,
            run,
        };
        (held, peer)
    }

    /// Waits until the server's `run` has returned `Ok`, which it does only once the handler
    /// at the gate is gone (failing, saying `why`, if it never does); returns what ran.
    fn served_to_the_end(self, why: &str) -> Vec<u64> {
        let serving = self.serving;
        self.runtime
            .block_on(async { ::tokio::time::timeout(HANG_GUARD, serving).await })
            .expect(why)
            .unwrap()
            .unwrap();
        self.run.lock().clone()
    }
}

/// Whether every copy of a pipe's write end is closed, `read_end` being its read end (those
/// dropped are closed on the closer's threads).
fn write_ends_closed(read_end: &OwnedFd) -> bool {
    crate::closer::wait_for_closes();
    nix::unistd::read(read_end, &mut [0; 1]) == Ok(0)
}

/// Waits until `server`'s state says the connection has ended (its reader has read the end).
async fn until_ended(server: &super::AsyncConnection) {
    ::tokio::time::timeout(HANG_GUARD, async {
        while !server.test_ended() {
            ::tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the end was never read");
}

/// A peer that hangs up cancels the calls it made, as a cancel of each would: the handler
/// running has its future dropped (its gate never opens, yet `run` returns), and the call
/// waiting for a slot (`set_max_calls_at_once(1)`) never runs, their fds closed. The oneway
/// sent after them still runs. Before, the handler ran on, and `run` waited for it for good.
#[test]
fn a_peer_hanging_up_cancels_its_running_and_waiting_calls_and_runs_its_oneways() {
    use crate::connection::tests::ordered_request;
    use crate::tokio::envelope::Kind;

    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
    let fd = [write_end.as_fd()];
    let (held, peer) = HeldCall::new(Some(1), &fd);
    peer.send(&ordered_request(Kind::Call, 2, 2, 2), &fd)
        .unwrap();
    peer.send(&ordered_request(Kind::Oneway, 3, 0, 3), &fd)
        .unwrap();
    drop((peer, write_end));
    let ran = held.served_to_the_end("the handler ran on after the peer hung up");
    assert_eq!(ran, [3]);
    assert!(write_ends_closed(&read_end), "an fd is still open");
}

/// Requests held for a server still to come when the peer hangs up: its oneways run once one
/// comes (a worker may send its last ones and exit before its parent serves), its calls
/// never do, their fds closed. (The calls ran before, their replies failing.)
#[test]
fn a_peer_that_hung_up_before_this_end_served_has_its_oneways_run_and_its_calls_dropped() {
    use crate::connection::tests::ordered_request;
    use crate::tokio::envelope::Kind;

    let runtime = multi_thread_runtime(2);
    let (peer, theirs) = Socket::pair().unwrap();
    let run = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
    runtime.block_on(async {
        let server = super::AsyncConnection::new(theirs).unwrap();
        let fd = [write_end.as_fd()];
        peer.send(&ordered_request(Kind::Oneway, 3, 0, 1), &fd)
            .unwrap();
        peer.send(&ordered_request(Kind::Call, 2, 1, 2), &fd)
            .unwrap();
        peer.send(&ordered_request(Kind::Oneway, 3, 0, 3), &fd)
            .unwrap();
        drop(peer);
        until_ended(&server).await;
        let service = AsyncOrdered {
            at: 0,
            action: AtSeq::Close(parking_lot::Mutex::new(None)),
            run: run.clone(),
        };
        ::tokio::time::timeout(HANG_GUARD, server.serve(service))
            .await
            .expect("serving never ended")
            .unwrap();
    });
    drop(write_end);
    assert_eq!(*run.lock(), [1, 3]);
    assert!(write_ends_closed(&read_end), "an fd is still open");
}

/// `close` cancels the calls running too, whose replies can go nowhere: the handler's future
/// is dropped (its gate never opens), its call's fds closed, no reply goes out, and `run`
/// returns. Before, `run` waited for it. With `half_closed`, the peer has shut only its
/// sending side (and still reads) first: the connection has ended then, its replies still to
/// go out, with nothing cancelled; before, `close` then found it ended and cancelled nothing.
fn close_cancels_the_running_call(half_closed: bool) {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
    let (held, peer) = HeldCall::new(None, &[write_end.as_fd()]);
    drop(write_end);
    if half_closed {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&peer.as_fd());
        nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write).unwrap();
        held.runtime.block_on(until_ended(&held.server));
    }
    held.server.close();
    let ran = held.served_to_the_end("the handler ran on after close");
    assert_eq!(ran, []);
    assert!(
        matches!(peer.recv(), Err(crate::Error::Disconnected)),
        "a reply came"
    );
    assert!(write_ends_closed(&read_end), "an fd is still open");
}

#[test]
fn async_close_cancels_a_running_call() {
    close_cancels_the_running_call(false);
}

#[test]
fn async_close_cancels_a_running_call_once_the_peer_shut_only_its_sending_side() {
    close_cancels_the_running_call(true);
}

/// A call waiting for a oneway that closes the connection never runs, also when its task is
/// first polled only after that oneway is done (the oneways dropped or run by then no longer
/// hold it back). Both requests are read at once, before either task runs.
#[test]
fn async_close_drops_a_call_whose_task_starts_after_it() {
    use crate::connection::tests::ordered_request;
    use crate::tokio::envelope::Kind;

    let (peer, theirs) = Socket::pair().unwrap();
    peer.send(&ordered_request(Kind::Oneway, 3, 0, 1), &[])
        .unwrap();
    peer.send(&ordered_request(Kind::Call, 2, 1, 2), &[])
        .unwrap();
    let run = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let runtime = current_thread_runtime();
    runtime.block_on(async {
        let server = super::AsyncConnection::new(theirs).unwrap();
        let service = AsyncOrdered {
            at: 1,
            action: AtSeq::Close(parking_lot::Mutex::new(Some(server.clone()))),
            run: run.clone(),
        };
        server.serve(service).await.unwrap();
    });
    assert_eq!(*run.lock(), [], "a call ran after close");
}

/// A connection whose runtime shuts down before its reader task ever ran (made in `block_on`
/// and the runtime dropped right after, or as the runtime closes to new tasks, when `spawn`
/// drops the reader at once) must end as one whose reader the runtime dropped mid-way does:
/// it was left open with nobody reading, so a call from another runtime waited for good for
/// a reply nobody would read, and the peer was never hung up on.
#[test]
fn a_connection_whose_runtime_shuts_down_before_its_reader_ran_ends() {
    use crate::connection::tests::BULK;
    use std::time::Duration;

    let current_thread = || current_thread_runtime();
    let (ours, peer) = Socket::pair().unwrap();
    let runtime = current_thread();
    let conn = runtime.block_on(async { super::AsyncConnection::new(ours).unwrap() });
    drop(runtime); // the reader, spawned in `new`, never ran
    let elsewhere = current_thread();
    let called =
        elsewhere.block_on(conn.call::<_, u32>(&BULK, 2, (), Some(Duration::from_secs(60))));
    match called {
        Err(crate::Error::Io(e)) => assert!(e.to_string().contains("shut down"), "{e}"),
        other => panic!("the call should fail as its runtime shut down: {other:?}"),
    }
    assert!(conn.is_closed());
    assert!(matches!(peer.recv(), Err(crate::Error::Disconnected)));
}

/// A connect that waits for a listener whose backlog is full (a server that does not accept:
/// stopped, stuck, or flooded), given up by its caller (here by a timeout), must not hold up
/// the runtime's shutdown: it ran on tokio's blocking pool, whose threads dropping the runtime
/// waits for, so dropping it waited for good for a listener that never accepted.
#[test]
fn a_connect_waiting_for_a_listener_that_never_accepts_does_not_hold_up_the_runtime_shutdown() {
    use nix::sys::socket::{self as ns, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    let name = format!("typed-ipc-test-full-backlog-{}", std::process::id());
    let addr = UnixAddr::new_abstract(name.as_bytes()).unwrap();
    let socket = |flags| ns::socket(AddressFamily::Unix, SockType::SeqPacket, flags, None);
    let listener = socket(SockFlag::SOCK_CLOEXEC).unwrap();
    ns::bind(listener.as_raw_fd(), &addr).unwrap();
    // A backlog of 0 holds one connection not accepted; it takes the next.
    ns::listen(&listener, Backlog::new(0).unwrap()).unwrap();
    let nonblocking = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let queued = socket(nonblocking).unwrap();
    ns::connect(queued.as_raw_fd(), &addr).unwrap();
    let refused = socket(nonblocking).unwrap();
    assert_eq!(
        ns::connect(refused.as_raw_fd(), &addr),
        Err(nix::errno::Errno::EAGAIN),
        "the listener's backlog is full"
    );

    let runtime = current_thread_runtime();
    let connecting = super::AsyncConnection::connect_abstract(name.as_bytes());
    let given_up = runtime
        .block_on(async { ::tokio::time::timeout(Duration::from_millis(100), connecting).await });
    assert!(
        given_up.is_err(),
        "the connect waits while the backlog is full"
    );
    let (dropped, runtime_gone) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(runtime);
        dropped.send(()).unwrap();
    });
    assert!(
        runtime_gone.recv_timeout(Duration::from_secs(60)).is_ok(),
        "dropping the runtime waits for the connect, for a listener that never accepts"
    );
    drop(listener);
}

/// A oneway that finds the peer gone while the reader waits for room at the backlog's bounds
/// does not wait for the reader to read why: it reads nothing until a request finishes,
/// which may be never (the requests may wait for this very oneway, sent from a handler).
/// Here the oneway running is held: the oneway sent waited for good (until its timeout).
#[test]
fn a_oneway_to_a_peer_gone_does_not_wait_for_a_reader_paused_at_the_bounds() {
    use crate::connection::tests::ORDERED;
    use std::time::Duration;

    let (runtime, peer, server, gate, serving) = paused_behind_a_held_oneway();
    drop(peer);
    let sent = runtime.block_on(server.oneway(&ORDERED, 3, 0u64, Some(Duration::from_secs(60))));
    assert!(matches!(sent, Err(crate::Error::Disconnected)), "{sent:?}");
    gate.notify_one();
    runtime.block_on(serving).unwrap().unwrap();
}

/// A connection served with its oneway task held by the first of the peer's oneways, and its
/// reader paused at the backlog's bounds: the others wait behind it, up to the bounds (the
/// one running counts), and one more waits in the socket. Notify the gate to let them run.
fn paused_behind_a_held_oneway() -> (
    ::tokio::runtime::Runtime,
    Socket,
    super::AsyncConnection,
    std::sync::Arc<::tokio::sync::Notify>,
    ::tokio::task::JoinHandle<crate::Result<()>>,
) {
    use crate::connection::backlog::MAX_REQUESTS;
    use crate::connection::tests::{ordered_request, wait_until};
    use crate::tokio::envelope::Kind;

    let runtime = multi_thread_runtime(2);
    let (peer, theirs) = Socket::pair().unwrap();
    let (started, has_started) = std::sync::mpsc::channel();
    let gate = std::sync::Arc::new(::tokio::sync::Notify::new());
    let server = runtime.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    let serving = runtime.spawn(server.serve(AsyncOrdered {
        at: 0,
        action: AtSeq::Hold {
            started,
            gate: gate.clone(),
        },
        run: Default::default(),
    }));
    for seq in 0..=MAX_REQUESTS as u64 {
        peer.send(&ordered_request(Kind::Oneway, 3, 0, seq), &[])
            .unwrap();
    }
    has_started.recv().unwrap();
    wait_until("the reader waits for room", || server.test_reader_paused());
    (runtime, peer, server, gate, serving)
}

/// A peer that fills the backlog's bounds with calls whose handlers never return, then hangs
/// up, has every one of them cancelled: the reader, paused at the bounds with no call of this
/// end waiting, still hears the hang-up, reads on to the end, and `run` returns. Before, the
/// paused reader never read that far, and the handlers waited for good.
#[test]
fn calls_filling_the_bounds_are_cancelled_when_their_peer_hangs_up() {
    use crate::connection::backlog::MAX_REQUESTS;
    use crate::connection::envelope::{self, Envelope, Kind};
    use crate::connection::tests::{BULK, wait_until};

    let runtime = multi_thread_runtime(2);
    let (peer, theirs) = Socket::pair().unwrap();
    let stuck = Stuck::default();
    let server = runtime.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    let serving = runtime.spawn(server.serve(stuck.clone()));
    for cookie in 1..=MAX_REQUESTS as u64 + 1 {
        let mut call = vec![0u8; envelope::LEN];
        Envelope {
            kind: Kind::Call,
            cmd: 1,
            cookie,
            interface: BULK.id,
            signature: BULK.signature,
        }
        .write(&mut call);
        peer.send(&call, &[]).unwrap();
    }
    wait_until("the reader waits for room", || server.test_reader_paused());
    drop(peer);
    runtime
        .block_on(async { ::tokio::time::timeout(HANG_GUARD, serving).await })
        .expect("the handlers ran on after the peer hung up")
        .unwrap()
        .unwrap();
    // Those read within the bounds started (their handlers can only have been dropped, as
    // none returns); the one read past them, once the peer had gone, may not have.
    let dropped = stuck.drops.load(std::sync::atomic::Ordering::SeqCst);
    assert!(dropped >= MAX_REQUESTS, "{dropped} handlers dropped");
}

/// `connection::tests::a_reader_whose_peer_hung_up_on_a_message_unread_still_reads_what_it_said`,
/// async: the peer says it speaks another wire version and hangs up with a message of this
/// end's unread while the reader task cannot run (its runtime is not driven), so its next
/// receive fails with `ECONNRESET` before the peer's header. It ended the connection as a
/// bare `Disconnected` there.
#[test]
fn an_async_reader_whose_peer_hung_up_on_a_message_unread_still_reads_what_it_said() {
    use crate::connection::tests::BULK;

    let runtime = current_thread_runtime();
    let (ours, theirs) = Socket::pair().unwrap();
    let conn = runtime.block_on(async {
        let conn = super::AsyncConnection::new(ours).unwrap();
        // Sent while the peer is there; it never reads it.
        conn.oneway(&BULK, 3, (), None).await.unwrap();
        conn
    });
    crate::connection::tests::say_another_version_and_hang_up(theirs);
    let ran = runtime.block_on(conn.run());
    assert!(
        matches!(ran, Err(crate::Error::VersionMismatch { .. })),
        "{ran:?}"
    );
}

/// The blocking flavour's
/// `a_caller_whose_peer_answered_and_hung_up_on_a_message_unread_gets_the_reply`, async: the
/// peer answers a call and hangs up with a later message of this end's unread while the
/// reader task cannot run (its runtime is not driven), so its next receive fails with
/// `ECONNRESET` before the reply. The call gets its reply, not `Disconnected`.
#[test]
fn an_async_caller_whose_peer_answered_and_hung_up_on_a_message_unread_gets_the_reply() {
    use crate::connection::tests::{BULK, reply_to};

    let runtime = current_thread_runtime();
    let (ours, theirs) = Socket::pair().unwrap();
    let conn = runtime.block_on(async { super::AsyncConnection::new(ours).unwrap() });
    let call = runtime.spawn({
        let conn = conn.clone();
        async move { conn.call::<_, u32>(&BULK, 2, (), None).await }
    });
    // The runtime is driven only until the call is out.
    let call_frame = runtime.block_on(async {
        loop {
            if let Some(frame) = theirs.try_recv().unwrap() {
                break frame;
            }
            ::tokio::task::yield_now().await;
        }
    });
    // Sent after the call; the peer never reads it.
    runtime.block_on(conn.oneway(&BULK, 3, (), None)).unwrap();
    theirs.send(&reply_to(&call_frame, &7u32), &[]).unwrap();
    drop(theirs);
    assert_eq!(runtime.block_on(call).unwrap().unwrap(), 7);
}

// ---- announcements ----

/// `lend_pages_to_peer` twice, the first announcement finding the socket full (so sent from
/// a task) and the second finding room: the peer must end with this end's last trust, as its
/// next large call shows (piped only to an end that reads pipes). The task sent its stale
/// announcement after the second: a peer told "no longer trusts", then "trusts", piped to an
/// end that refuses pipes and every such call failed; told the reverse, it never piped again.
fn lend_pages_twice_the_first_announcement_waiting_for_room(last: bool) {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use crate::SharedBytes;
    use crate::codec::Bytes;
    use crate::connection::tests::{BULK, SKIM};

    let (runtime, server, theirs) = undriven_connection();
    server.add_service(Skimmer);
    let client = crate::Connection::new(theirs);
    client.lend_pages_to_peer(true);
    // From `last` (sent at once, if a change), so that `!last` and then `last` are changes.
    server.lend_pages_to_peer(last);
    // The client reads nothing yet, and the runtime is not driven: send until the socket is
    // full. The send that finds it so is dropped: a small message is one datagram, none of it
    // went out, and the send lock is free again.
    let mut cx = Context::from_waker(Waker::noop());
    let mut unread = usize::from(last);
    while let Poll::Ready(sent) = Box::pin(server.oneway(&BULK, 1, (), None))
        .as_mut()
        .poll(&mut cx)
    {
        sent.unwrap();
        unread += 1;
        assert!(unread < 1 << 20, "the peer's queue never filled");
    }
    let (tasks, _) = server.test_tasks();
    server.lend_pages_to_peer(!last);
    assert_eq!(
        server.test_tasks().0,
        tasks + 1,
        "the announcement waits for room in a task"
    );
    // Room again before that task has run: the next announcement finds it.
    for _ in 0..unread {
        client.socket().recv().unwrap();
    }
    server.lend_pages_to_peer(last);
    runtime.block_on(async {
        while server.test_tasks().0 > tasks {
            ::tokio::task::yield_now().await;
        }
    });
    let (done, calls_done) = ::tokio::sync::oneshot::channel();
    let calling = std::thread::spawn(move || {
        // Its reply tells the client that the server reads lanes; the announcements came
        // before it.
        let small = client.call::<_, u64>(&SKIM, 2, &Bytes(&[1u8; 100][..]), None);
        assert_eq!(small.unwrap(), 100);
        let large = SharedBytes::from(vec![2u8; 200 << 10]);
        let len = client.call::<_, u64>(&SKIM, 2, &large, None);
        let _ = done.send(());
        len
    });
    runtime.block_on(calls_done).unwrap();
    let len = calling.join().unwrap();
    assert!(matches!(len, Ok(len) if len == 200 << 10), "{len:?}");
    assert_eq!(
        server.test_lane().reads_a_pipe(),
        last,
        "the client piped its string only to a server that reads pipes"
    );
}

#[test]
fn a_peer_told_late_that_this_end_trusts_pipes_does_not_pipe_once_it_no_longer_does() {
    lend_pages_twice_the_first_announcement_waiting_for_room(false);
}

#[test]
fn a_peer_told_late_that_this_end_no_longer_trusts_pipes_pipes_once_it_does_again() {
    lend_pages_twice_the_first_announcement_waiting_for_room(true);
}

/// A hostile peer acknowledges a placement before the message that carries it is out (it
/// stops reading to keep that message waiting, and guesses the sequence number): the lane is
/// idle, but the message still names the region's fd by its number. Giving the region back
/// then would close that number, the next file this process opened would take it, and the
/// message would carry that file to the peer. The region is kept until the message is out.
#[test]
fn a_region_named_by_a_message_still_going_out_is_not_given_back() {
    use std::future::Future;
    use std::task::{Context, Waker};

    use crate::codec::Bytes;
    use crate::connection::envelope::{self, Envelope};
    use crate::connection::tests::BULK;
    use crate::shared_region::RegionView;

    let (runtime, conn, theirs) = undriven_connection();
    let say = |lane: u32| {
        let mut msg = vec![0u8; envelope::LEN + 16];
        Envelope::announce().write(&mut msg);
        envelope::set_lane(&mut msg, lane);
        theirs.send(&msg, &[]).unwrap();
    };
    say(1 << 23); // reads lanes
    runtime.block_on(async {
        while !conn.test_lane().peer_reads() {
            ::tokio::task::yield_now().await;
        }
    });
    // Fill the socket, then a oneway whose byte string announces the region waits for room.
    let unread = fill_with_oneways(&conn);
    let mut cx = Context::from_waker(Waker::noop());
    let data = vec![5u8; 4096];
    let mut pending = Box::pin(conn.oneway(&BULK, 1, Bytes(&data[..]), None));
    assert!(pending.as_mut().poll(&mut cx).is_pending());
    assert!(conn.test_lane().is_busy());
    say(1 << 23 | 1); // acknowledges placement 1, which it has not received
    runtime.block_on(async {
        while conn.test_lane().is_busy() {
            ::tokio::task::yield_now().await;
        }
    });
    assert_eq!(
        conn.release_shared_memory(),
        0,
        "the region was given back while a message still names its fd"
    );
    let unrelated = memfd(0xdead); // takes the lowest free number, the region's if closed
    for _ in 0..unread {
        theirs.recv().unwrap();
    }
    runtime.block_on(async { pending.await.unwrap() });
    let frame = theirs.recv().unwrap();
    let fd = frame
        .fds
        .into_iter()
        .next()
        .expect("the message carries the region");
    assert_eq!(RegionView::from_fd(fd).unwrap().len(), 64 << 10);
    drop(unrelated);
    assert_eq!(
        conn.release_shared_memory(),
        64 << 10,
        "out: given back now"
    );
}

/// A send waiting for room in the socket of a peer that then shuts its reading side
/// (`shutdown(SHUT_RD)`) fails with `Disconnected`, as in the blocking flavour: no send can
/// ever go out to it again, though the socket never reads as writable nor hung up. Before,
/// the send waited until the peer read or hung up: for good, without a timeout. On a runtime
/// without the time driver, which the connection must not need for it; a oneway and a call.
#[test]
fn a_send_waiting_for_room_fails_once_the_peer_shuts_its_reading_side() {
    use std::future::{Future, poll_fn};
    use std::pin::pin;
    use std::sync::mpsc;
    use std::task::Poll;
    use std::time::{Duration, Instant};

    use crate::connection::tests::BULK;
    use crate::error::Error;
    for call in [false, true] {
        let (done, sent) = mpsc::channel();
        // On a thread of its own, so that a send that never ends fails the test instead.
        std::thread::spawn(move || {
            let (ours, theirs) = Socket::pair().unwrap();
            let runtime = ::tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .unwrap();
            runtime.block_on(async {
                let conn = super::AsyncConnection::new(ours).unwrap();
                // 32 MiB do not fit a socket buffer: the send waits for room, having sent
                // some.
                let big = "x".repeat(32 << 20);
                let mut send = pin!(async {
                    match call {
                        false => conn.oneway(&BULK, 1, big, None).await,
                        true => conn.call::<_, u32>(&BULK, 1, big, None).await.map(drop),
                    }
                });
                // Polled once by hand: it tries until the socket is full, then waits for it
                // to be writable (the peer's shutdown comes after its last try).
                poll_fn(|cx| match send.as_mut().poll(cx) {
                    Poll::Ready(sent) => panic!("not sent at once: {sent:?}"),
                    Poll::Pending => Poll::Ready(()),
                })
                .await;
                let later = Instant::now() + Duration::from_secs(3600);
                assert!(conn.socket().send_stalled_for(later).is_some());
                theirs.shutdown_read().unwrap();
                let _ = done.send(send.await);
            });
        });
        let sent = sent.recv_timeout(Duration::from_secs(60));
        assert!(
            matches!(sent, Ok(Err(Error::Disconnected))),
            "call {call}: {sent:?}"
        );
    }
}

// ---- cancelled sends and the version notice ----

/// A send of a message of several datagrams dropped before its first datagram went out (the
/// socket full: a timeout, a `select!`) must not leave the socket thinking a message is
/// part-way out: a peer of another wire version that speaks next is told this side's
/// version, as it would be had the send never started. Before, the notice was owed to a
/// message that would never end, and the peer saw a bare hang-up.
#[test]
fn a_send_of_several_datagrams_dropped_unstarted_does_not_hold_back_the_version_notice() {
    use std::future::Future;
    use std::task::{Context, Waker};

    use crate::connection::tests::BULK;

    let (runtime, conn, theirs) = undriven_connection();
    let unread = fill_with_oneways(&conn);
    let mut cx = Context::from_waker(Waker::noop());
    // A message of several datagrams waits for room for its first, and is dropped there.
    let big = vec![7u8; 1 << 20];
    let mut send = Box::pin(conn.oneway(&BULK, 1, big, None));
    assert!(send.as_mut().poll(&mut cx).is_pending());
    drop(send);
    for _ in 0..unread {
        theirs.recv().unwrap();
    }
    // The peer speaks another wire version.
    crate::connection::tests::say_another_version(&theirs);
    runtime.block_on(async {
        while !conn.is_closed() {
            ::tokio::task::yield_now().await;
        }
    });
    crate::connection::tests::assert_told_version(theirs.recv());
}

/// The runtime a connection was made on shuts down while a send from elsewhere (another
/// runtime, or no runtime at all) waits for room: the send must fail saying what happened
/// to the connection, as the calls waiting for replies do, not with the reactor's "A Tokio
/// 1.x context was found, but it is being shutdown", which speaks of a runtime the caller
/// may not even have.
#[test]
fn a_send_waiting_for_room_when_the_connections_runtime_shuts_down_says_so() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use crate::connection::tests::BULK;

    let (runtime, conn, _theirs) = undriven_connection();
    let mut cx = Context::from_waker(Waker::noop());
    // Polled here, outside any runtime: fill the peer's queue until a send waits for room.
    let mut sent = 0u32;
    let mut waiting = loop {
        let mut send = Box::pin(conn.oneway(&BULK, 1, (), None));
        if send.as_mut().poll(&mut cx).is_pending() {
            break send;
        }
        sent += 1;
        assert!(sent < 1 << 20, "the peer's queue never filled");
    };
    drop(runtime);
    let Poll::Ready(failed) = waiting.as_mut().poll(&mut cx) else {
        panic!("the send still waits, its runtime gone");
    };
    let said = failed.unwrap_err().to_string();
    assert!(
        said.contains("the tokio runtime running the connection shut down"),
        "{said}"
    );
}

/// A listener made on a runtime that has since shut down, accepting from elsewhere (another
/// runtime): the accept must fail saying that the listener's runtime is gone, not with the
/// reactor's "A Tokio 1.x context was found, but it is being shutdown", which speaks of a
/// runtime the caller may not even have.
#[test]
fn an_accept_on_a_listener_whose_runtime_shut_down_says_so() {
    let made_on = current_thread_runtime();
    let name = format!("typed-ipc-test-listener-runtime-{}", std::process::id());
    let listener = made_on
        .block_on(async { super::AsyncListener::bind_abstract(&name) })
        .unwrap();
    drop(made_on);
    let accepting_on = current_thread_runtime();
    let said = accepting_on
        .block_on(listener.accept())
        .unwrap_err()
        .to_string();
    assert!(
        said.contains("the tokio runtime this listener was made on has shut down"),
        "{said}"
    );
}

// ---- cancellation: the peer drops what a caller gave up on ----

/// A service whose `gated_echo` (command 1) never decodes its arguments and never returns:
/// it says it started, then waits for good holding a guard that says when it is dropped.
/// `ping` answers 7.
#[derive(Clone, Default)]
struct Stuck {
    started: std::sync::Arc<::tokio::sync::Notify>,
    dropped: std::sync::Arc<::tokio::sync::Notify>,
    /// How many guards were dropped, for a test that waits for more than one.
    drops: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Says on its `Notify` when dropped, and counts.
struct SaysDropped(
    std::sync::Arc<::tokio::sync::Notify>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
);

impl Drop for SaysDropped {
    fn drop(&mut self) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.notify_one();
    }
}

impl super::AsyncService for Stuck {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::BULK
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            match call.command() {
                1 => {
                    let _guard = SaysDropped(self.dropped.clone(), self.drops.clone());
                    self.started.notify_one();
                    std::future::pending::<()>().await;
                    unreachable!("never woken")
                }
                _ => call.reply(7u32).await,
            }
        })
    }
}

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(60);

/// A call dropped while its handler waits has the handler's future dropped on the server (its
/// guard says so), no reply, and the placement its request carried, never decoded, given back
/// by a message of the server's own, with no later call to carry the acknowledgement. Before
/// cancellation reached the peer, the handler waited for good (the guard never spoke) and the
/// client's lane stayed busy until the server sent something else.
#[test]
fn a_dropped_call_has_its_handler_dropped_and_its_placement_given_back() {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;

    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (client, server) = super::AsyncConnection::pair().unwrap();
        let stuck = Stuck::default();
        server.add_service(stuck.clone());
        // The server's reply says it reads lanes: the next string is placed.
        assert_eq!(client.call::<_, u32>(&BULK, 2, (), None).await.unwrap(), 7);
        let call = ::tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(vec![5u8; 8 << 10]), None)
                    .await
            }
        });
        stuck.started.notified().await;
        assert!(client.test_lane().is_busy(), "the string was placed");
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
        ::tokio::time::timeout(HANG_GUARD, stuck.dropped.notified())
            .await
            .expect("the handler was never dropped");
        ::tokio::time::timeout(HANG_GUARD, async {
            while client.test_lane().is_busy() {
                ::tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the client's lane stayed busy");
        assert_eq!(client.call::<_, u32>(&BULK, 2, (), None).await.unwrap(), 7);
    });
}

/// A call held for a server still to come, cancelled meanwhile, never runs once one comes:
/// the client hangs up and the server's `run` returns, which it would not with the stuck
/// handler running. Before, the held call ran when the service came, and `run` waited for it
/// for good.
#[test]
fn a_call_cancelled_while_held_for_a_server_never_runs() {
    use crate::connection::tests::BULK;
    use std::future::Future;
    use std::task::{Context, Waker};

    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (client, server) = super::AsyncConnection::pair().unwrap();
        {
            let mut call = Box::pin(client.call::<_, crate::codec::Bytes<Vec<u8>>>(
                &BULK,
                1,
                crate::codec::Bytes(vec![1]),
                None,
            ));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(
                call.as_mut().poll(&mut cx).is_pending(),
                "sent, no reply yet"
            );
        } // dropped: its cancel goes out
        // Sent after the cancel: once the server has taken it in, it has read the cancel.
        client.lend_pages_to_peer(true);
        ::tokio::time::timeout(HANG_GUARD, async {
            while !server.test_lane().peer_takes_pipes() {
                ::tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the announcement never came");
        let stuck = Stuck::default();
        server.add_service(stuck.clone());
        drop(client);
        ::tokio::time::timeout(HANG_GUARD, server.run())
            .await
            .expect("the cancelled call ran, and waits for good")
            .unwrap();
    });
}

/// A hostile peer's cancels: one for a call that is running, carrying a body and an fd it
/// should not, drops that call (its handler's guard speaks) and sends no reply for it; cancels
/// of cookies that run nothing (0, one never sent, the same one again) change nothing; and the
/// connection answers the next call, whose reply is the first message the peer gets.
#[test]
fn hostile_cancels_drop_only_the_call_they_name_and_send_nothing_back() {
    use crate::codec::{self, Bytes};
    use crate::connection::envelope::{self, Envelope, Kind};
    use crate::connection::tests::BULK;

    let (ours, theirs) = Socket::pair().unwrap();
    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let server = super::AsyncConnection::new(ours).unwrap();
        let stuck = Stuck::default();
        server.add_service(stuck.clone());
        let message = |kind, cmd, cookie, body: &dyn Fn(&mut Vec<u8>)| {
            let mut m = vec![0u8; envelope::LEN];
            Envelope {
                kind,
                cmd,
                cookie,
                interface: BULK.id,
                signature: BULK.signature,
            }
            .write(&mut m);
            body(&mut m);
            m
        };
        let echo_args = |m: &mut Vec<u8>| {
            codec::encode(&Bytes(vec![1u8, 2]), m, &mut Vec::new()).unwrap();
        };
        let call = message(Kind::Call, 1, 5, &echo_args);
        theirs.send(&call, &[]).unwrap();
        ::tokio::time::timeout(HANG_GUARD, stuck.started.notified())
            .await
            .expect("the call never started");
        let junk = |m: &mut Vec<u8>| m.extend_from_slice(&[0xff; 40]);
        for cookie in [0, 99, 5, 5] {
            let cancel = message(Kind::Cancel, 7, cookie, &junk);
            theirs
                .send(&cancel, &[memfd(cookie as u32).as_fd()])
                .unwrap();
        }
        ::tokio::time::timeout(HANG_GUARD, stuck.dropped.notified())
            .await
            .expect("the cancelled handler was never dropped");
        let ping = message(Kind::Call, 2, 6, &|_: &mut Vec<u8>| {});
        theirs.send(&ping, &[]).unwrap();
        let reply = ::tokio::task::spawn_blocking(move || theirs.recv().unwrap())
            .await
            .unwrap();
        let envelope = Envelope::read(&reply.payload).unwrap();
        assert_eq!(
            (envelope.kind, envelope.cookie),
            (Kind::Reply, 6),
            "nothing went out for the cancelled call"
        );
    });
}

/// A hostile peer that uses cookie 5 for two calls at once, both waiting for good, then
/// cancels 5: both are dropped (it waits for neither), nothing is sent for them, and the
/// cancel does not linger: a third call 5 after them is answered. Before, the cancel reached
/// only the first call (the second waited for good), and the runner that had a cancelled call
/// dropped a later call of the same cookie unrun.
#[test]
fn a_cancel_of_a_reused_cookie_drops_every_call_that_has_it_and_no_later_one() {
    use crate::connection::envelope::{self, Envelope, Kind};
    use crate::connection::tests::BULK;
    use std::sync::atomic::Ordering;

    let (ours, theirs) = Socket::pair().unwrap();
    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let server = super::AsyncConnection::new(ours).unwrap();
        let stuck = Stuck::default();
        server.add_service(stuck.clone());
        let message = |kind, cmd, cookie| {
            let mut m = vec![0u8; envelope::LEN];
            Envelope {
                kind,
                cmd,
                cookie,
                interface: BULK.id,
                signature: BULK.signature,
            }
            .write(&mut m);
            m
        };
        for _ in 0..2 {
            theirs.send(&message(Kind::Call, 1, 5), &[]).unwrap();
            ::tokio::time::timeout(HANG_GUARD, stuck.started.notified())
                .await
                .expect("the call never started");
        }
        theirs.send(&message(Kind::Cancel, 0, 5), &[]).unwrap();
        while stuck.drops.load(Ordering::SeqCst) < 2 {
            ::tokio::time::timeout(HANG_GUARD, stuck.dropped.notified())
                .await
                .expect("a call of the cookie cancelled was never dropped");
        }
        theirs.send(&message(Kind::Call, 2, 5), &[]).unwrap();
        let reply = ::tokio::task::spawn_blocking(move || theirs.recv().unwrap())
            .await
            .unwrap();
        let envelope = Envelope::read(&reply.payload).unwrap();
        assert_eq!(
            (envelope.kind, envelope.cookie),
            (Kind::Reply, 5),
            "nothing went out for the cancelled calls, and the later one was answered"
        );
    });
}

/// Echoes byte strings after yielding as many times as the first byte says (mod 4), so that
/// a cancel finds handlers at every point: unrun, waiting, replying.
#[derive(Clone, Default)]
struct YieldingEcho;

impl super::AsyncService for YieldingEcho {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::BULK
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            match call.command() {
                1 => {
                    let crate::codec::Bytes(data): crate::codec::Bytes<Vec<u8>> = call.args()?;
                    for _ in 0..data.first().map_or(0, |b| b % 4) {
                        ::tokio::task::yield_now().await;
                    }
                    call.reply(crate::codec::Bytes(data)).await
                }
                _ => call.reply(7u32).await,
            }
        })
    }
}

/// A string of `len` bytes no other round sends: its first byte says how often the handler
/// yields, the next eight the round.
fn storm_data(len: usize, round: u64, x: u64) -> Vec<u8> {
    let mut data = vec![(x >> 24) as u8; len];
    data[0] = x as u8;
    data[1..9].copy_from_slice(&round.to_le_bytes());
    data
}

/// Both ends call each other at once, each call dropped at a random moment, with strings
/// placed or piped both ways: every call that returns gets its own reply (never one that
/// crossed an earlier call's cancel), and afterwards no lane is left busy either way.
#[test]
fn calls_both_ways_cancelled_at_random_get_their_own_replies_and_leave_no_lane_busy() {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;
    use std::time::Duration;

    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (a, b) = super::AsyncConnection::pair().unwrap();
        a.add_service(YieldingEcho);
        b.add_service(YieldingEcho);
        a.lend_pages_to_peer(true);
        b.lend_pages_to_peer(true);
        let rounds: u64 = std::env::var("ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3000);
        let storm = |conn: super::AsyncConnection, seed: u64| async move {
            let mut x = seed | 1;
            let mut answered = 0u64;
            for round in 0..rounds {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = [16usize, 2000, 8 << 10, 70_000, 300_000][(x >> 3) as usize % 5];
                let data = storm_data(len, round, x);
                let us = (x >> 40) % 60;
                let got = ::tokio::time::timeout(
                    Duration::from_micros(us),
                    conn.call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), None),
                )
                .await;
                if let Ok(got) = got {
                    let Bytes(back) = got.unwrap();
                    assert!(back == data, "round {round}: another call's reply");
                    answered += 1;
                }
            }
            answered
        };
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("seed {seed}");
        let one = ::tokio::spawn(storm(a.clone(), seed));
        let two = ::tokio::spawn(storm(b.clone(), seed.rotate_left(17)));
        let answered = (one.await.unwrap(), two.await.unwrap());
        eprintln!("answered {answered:?} of {rounds} each");
        assert!(settle(&a, &b).await, "a lane stayed busy");
        assert!(settle(&b, &a).await, "a lane stayed busy");
        for conn in [&a, &b] {
            let data = storm_data(300_000, u64::MAX, 0x55);
            let Bytes(back) = conn
                .call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), None)
                .await
                .unwrap();
            assert!(back == data);
        }
    });
}

/// A blocking client whose calls time out at random moments, against an async server whose
/// handlers yield: every call that returns gets its own reply, and the connection and both
/// lanes are fine afterwards.
#[test]
fn blocking_calls_timing_out_at_random_against_an_async_server_get_their_own_replies() {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;
    use std::time::Duration;

    let (ours, theirs) = Socket::pair().unwrap();
    let rt = multi_thread_runtime(2);
    let server = rt.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    server.add_service(YieldingEcho);
    let client = crate::Connection::new(ours);
    let rounds: u64 = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {x}");
    let mut answered = 0;
    for round in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = [16usize, 2000, 8 << 10, 70_000, 300_000][(x >> 3) as usize % 5];
        let data = storm_data(len, round, x);
        let us = 1 + (x >> 40) % 60;
        match client.call::<_, Bytes<Vec<u8>>>(
            &BULK,
            1,
            &Bytes(data.clone()),
            Some(Duration::from_micros(us)),
        ) {
            Ok(Bytes(back)) => {
                assert!(back == data, "round {round}: another call's reply");
                answered += 1;
            }
            Err(crate::Error::TimedOut) => {}
            Err(e) => panic!("round {round}: {e}"),
        }
    }
    eprintln!("answered {answered} of {rounds}");
    for _ in 0..3 {
        let data = storm_data(300_000, u64::MAX, 0x55);
        let Bytes(back) = client
            .call::<_, Bytes<Vec<u8>>>(&BULK, 1, &Bytes(data.clone()), None)
            .unwrap();
        assert!(back == data);
    }
    assert_ne!(
        client.release_shared_memory(),
        0,
        "the client's lane stayed busy"
    );
    drop(client);
    drop(server);
    drop(rt);
}

/// Calls back into its caller (the same connection) and waits for that call's reply.
struct CallsBack {
    conn: std::sync::OnceLock<super::AsyncConnection>,
    dropped: std::sync::Arc<::tokio::sync::Notify>,
}

impl super::AsyncService for CallsBack {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::BULK
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            match call.command() {
                1 => {
                    let _guard = SaysDropped(self.dropped.clone(), Default::default());
                    let conn = self.conn.get().expect("set").clone();
                    let back: crate::codec::Bytes<Vec<u8>> = conn
                        .call(
                            &crate::connection::tests::BULK,
                            1,
                            crate::codec::Bytes(vec![1u8]),
                            None,
                        )
                        .await?;
                    call.reply(back).await
                }
                _ => call.reply(7u32).await,
            }
        })
    }
}

/// A handler cancelled while it waits for a call back into its caller drops that call, so
/// its caller's handler for it is dropped too (the chain of cancels goes back and forth on
/// one connection), and both ends answer calls afterwards.
#[test]
fn a_handler_cancelled_during_its_call_back_cancels_the_call_back() {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;

    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (a, b) = super::AsyncConnection::pair().unwrap();
        let stuck = Stuck::default();
        a.add_service(stuck.clone());
        let calls_back = std::sync::Arc::new(CallsBack {
            conn: std::sync::OnceLock::new(),
            dropped: Default::default(),
        });
        let _ = calls_back.conn.set(b.clone());
        struct Shared(std::sync::Arc<CallsBack>);
        impl super::AsyncService for Shared {
            fn info(&self) -> &'static crate::service::InterfaceInfo {
                &BULK
            }
            fn handle<'a>(
                &'a self,
                call: &'a mut super::AsyncCall,
            ) -> super::BoxFuture<'a, crate::Result<()>> {
                self.0.handle(call)
            }
        }
        b.add_service(Shared(calls_back.clone()));
        let outer = ::tokio::spawn({
            let a = a.clone();
            async move {
                a.call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(vec![2u8]), None)
                    .await
            }
        });
        ::tokio::time::timeout(HANG_GUARD, stuck.started.notified())
            .await
            .expect("the call back never started");
        outer.abort();
        assert!(outer.await.unwrap_err().is_cancelled());
        ::tokio::time::timeout(HANG_GUARD, calls_back.dropped.notified())
            .await
            .expect("the cancelled handler was never dropped");
        ::tokio::time::timeout(HANG_GUARD, stuck.dropped.notified())
            .await
            .expect("its call back's handler was never dropped");
        assert_eq!(a.call::<_, u32>(&BULK, 2, (), None).await.unwrap(), 7);
        assert_eq!(b.call::<_, u32>(&BULK, 2, (), None).await.unwrap(), 7);
        assert!(settle(&a, &b).await, "a lane stayed busy");
        let _ = calls_back.conn.get().map(super::AsyncConnection::close);
    });
}

/// A hostile peer's cancels that name no call of its own: the cookie of the call this end
/// is making to it (the other direction), the largest cookie, and a flood of cookies it never
/// used, each with an fd. None drops the peer's running call nor this end's own call, whose
/// reply still comes; the connection answers the next call.
#[test]
fn hostile_cancels_of_the_other_direction_drop_nothing() {
    use crate::connection::envelope::{self, Envelope, Kind};
    use crate::connection::tests::BULK;
    use std::future::Future;
    use std::task::{Context, Waker};

    let (ours, theirs) = Socket::pair().unwrap();
    let theirs = std::sync::Arc::new(theirs);
    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let server = super::AsyncConnection::new(ours).unwrap();
        let stuck = Stuck::default();
        server.add_service(stuck.clone());
        let message = |kind, cmd, cookie| {
            let mut m = vec![0u8; envelope::LEN];
            Envelope {
                kind,
                cmd,
                cookie,
                interface: BULK.id,
                signature: BULK.signature,
            }
            .write(&mut m);
            m
        };
        let recv = |socket: std::sync::Arc<Socket>| async move {
            ::tokio::task::spawn_blocking(move || socket.recv().unwrap())
                .await
                .unwrap()
        };
        // This end calls the peer.
        let ours_call = ::tokio::spawn({
            let server = server.clone();
            async move { server.call::<_, u32>(&BULK, 2, (), None).await }
        });
        let request = recv(theirs.clone()).await;
        let ours_cookie = Envelope::read(&request.payload).unwrap().cookie;
        // The peer's own call, which runs for good.
        let mut call = message(Kind::Call, 1, 5);
        crate::codec::encode(&crate::codec::Bytes(vec![1u8]), &mut call, &mut Vec::new()).unwrap();
        theirs.send(&call, &[]).unwrap();
        ::tokio::time::timeout(HANG_GUARD, stuck.started.notified())
            .await
            .expect("the call never started");
        let mut cookies = vec![ours_cookie, u64::MAX, u64::MAX - 1, 4, 6];
        cookies.extend((0..5000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1 << 63));
        for cookie in cookies {
            let cancel = message(Kind::Cancel, 0, cookie);
            let fd = memfd(1);
            let sent = ::tokio::task::spawn_blocking({
                let theirs = theirs.clone();
                move || theirs.send(&cancel, &[fd.as_fd()])
            });
            sent.await.unwrap().unwrap();
        }
        // The peer's ping, then its answer to this end's call.
        theirs.send(&message(Kind::Call, 2, 6), &[]).unwrap();
        let reply = recv(theirs.clone()).await;
        let envelope = Envelope::read(&reply.payload).unwrap();
        assert_eq!((envelope.kind, envelope.cookie), (Kind::Reply, 6));
        let mut dropped = std::pin::pin!(stuck.dropped.notified());
        assert!(
            dropped
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_pending(),
            "a cancel of no call of the peer's dropped its running call"
        );
        let mut answer = message(Kind::Reply, 2, ours_cookie);
        crate::codec::encode(&9u32, &mut answer, &mut Vec::new()).unwrap();
        theirs.send(&answer, &[]).unwrap();
        let got = ::tokio::time::timeout(HANG_GUARD, ours_call)
            .await
            .expect("this end's call never got its reply");
        assert_eq!(got.unwrap().unwrap(), 9, "this end's own call was dropped");
    });
}

/// Calls whose requests went out to a peer that reads nothing, dropped as their runtime shuts
/// down: their cancels cannot go at once (the socket is full) and the task that would send
/// them cannot run. Nothing panics, and the peer finds every message it reads whole.
#[test]
fn calls_dropped_as_the_runtime_shuts_down_with_the_socket_full_do_not_panic() {
    use crate::connection::envelope::{Envelope, Kind};
    use crate::connection::tests::BULK;

    let (ours, theirs) = Socket::pair().unwrap();
    let rt = multi_thread_runtime(2);
    let client = rt.block_on(async { super::AsyncConnection::new(ours).unwrap() });
    let calls: Vec<_> = (0..2000)
        .map(|_| {
            let client = client.clone();
            rt.spawn(async move {
                client
                    .call::<_, crate::codec::Bytes<Vec<u8>>>(
                        &BULK,
                        1,
                        crate::codec::Bytes(vec![3u8; 2000]),
                        None,
                    )
                    .await
            })
        })
        .collect();
    // Until the socket is full: a oneway's send from here would have to wait.
    rt.block_on(async {
        ::tokio::time::timeout(HANG_GUARD, async {
            while client
                .socket()
                .ready_now(PollFlags::POLLOUT)
                .contains(PollFlags::POLLOUT)
            {
                ::tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the socket never filled");
    });
    drop(calls);
    drop(client);
    drop(rt);
    // Everything that went out is whole: calls, then perhaps cancels.
    let mut read = 0;
    while let Ok(Some(frame)) = theirs.try_recv() {
        read += 1;
        let envelope = Envelope::read(&frame.payload).unwrap();
        assert!(matches!(
            envelope.kind,
            Kind::Call | Kind::Cancel | Kind::Announce
        ));
    }
    assert!(read > 0, "the calls went out");
}

/// A call from another runtime, waiting for room part-way through a message of many
/// datagrams, when the connection's own runtime shuts down: the caller hears why, and the
/// peer, which holds the first part of a message, sees the socket end after it rather than
/// waiting for the rest of a stream that cannot be resynchronised. The reader's end shuts the
/// socket down, which ends the wait for room, before the reactor goes (which would end it
/// too: `reactor_gone`).
#[test]
fn a_send_waiting_part_way_as_the_connections_runtime_shuts_down_leaves_the_peer_an_end() {
    use crate::connection::tests::BULK;
    use std::time::Instant;

    let (ours, theirs) = Socket::pair().unwrap();
    let home = multi_thread_runtime(1);
    let client = home.block_on(async { super::AsyncConnection::new(ours).unwrap() });
    let callers = multi_thread_runtime(1);
    let big = crate::codec::Bytes(vec![3u8; 16 << 20]);
    let call = callers.spawn({
        let client = client.clone();
        async move {
            let sent = client.call::<_, crate::codec::Bytes<Vec<u8>>>(&BULK, 1, big, None);
            sent.await
        }
    });
    // Until the socket is full: the call's send, part-way (the peer never announced that it
    // reads lanes, so the bytes go inline), waits for room.
    let deadline = Instant::now() + HANG_GUARD;
    while client
        .socket()
        .ready_now(PollFlags::POLLOUT)
        .contains(PollFlags::POLLOUT)
    {
        assert!(Instant::now() < deadline, "the socket never filled");
        std::thread::yield_now();
    }
    drop(home);
    let failed = callers
        .block_on(async { ::tokio::time::timeout(HANG_GUARD, call).await })
        .expect("the call waited on after its connection's runtime shut down")
        .unwrap();
    match failed {
        Err(crate::Error::Io(e)) => assert!(e.to_string().contains("shut down"), "{e}"),
        other => panic!("the call should fail as its runtime shut down: {other:?}"),
    }
    let mut frame = crate::frame::Frame::default();
    let read = theirs.recv_into(&mut frame, Some(Instant::now() + HANG_GUARD));
    assert!(
        !matches!(read, Ok(()) | Err(crate::Error::TimedOut)),
        "the peer should find the message cut off by the end: {read:?}"
    );
    drop(client);
}

// ---- methods on the blocking pool (`#[interface(async_server)]`) ----

/// An [`crate::service::run_blocking`] service, as `#[interface(async_server)]` generates:
/// `mark` counts its start, then runs on the blocking pool until the test opens the gate.
struct Pooled {
    started: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    gate: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl super::AsyncService for Pooled {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::ORDERED
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            let _seq: u64 = call.args()?;
            // In the poll that hands the method to the pool: once counted, it is there.
            self.started
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let unbounded = crate::service::PoolSlots::unbounded();
            crate::service::run_blocking(self.gate.clone(), &unbounded, |gate| {
                let (open, opened) = gate;
                let _open = opened.wait_while(open.lock().unwrap(), |o| !*o).unwrap();
            })
            .await;
            call.reply(()).await
        })
    }
}

/// A peer that cancels each call once its method is on the blocking pool must not get more
/// methods held there than the backlog's bounds let it have requests (the method, and the
/// arguments and fds it took, live on until it ends): the reader stops reading once that
/// many run. It read on: a cancel gave the call's place in the backlog back while its method
/// still ran, so a peer could pile up methods (and their fds) on the pool without bound.
#[test]
fn calls_cancelled_on_the_blocking_pool_still_count_against_the_backlog() {
    use crate::connection::backlog::MAX_REQUESTS;
    use crate::connection::tests::{ordered_request, wait_until};
    use crate::tokio::envelope::{Envelope, Kind};
    use std::sync::atomic::Ordering;

    let runtime = ::tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (peer, theirs) = Socket::pair().unwrap();
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gate = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let server = runtime.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    let serving = runtime.spawn(server.clone().serve(Pooled {
        started: started.clone(),
        gate: gate.clone(),
    }));
    let mut paused = false;
    for seq in 0..=MAX_REQUESTS as u64 {
        let cookie = seq + 1;
        peer.send(&ordered_request(Kind::Call, 2, cookie, seq), &[])
            .unwrap();
        wait_until("the call starts, or the reader stops", || {
            paused = server.test_reader_paused();
            paused || started.load(Ordering::SeqCst) > seq as usize
        });
        if paused {
            break;
        }
        let mut cancel = vec![0; crate::connection::envelope::LEN];
        Envelope::cancel(cookie).write(&mut cancel);
        peer.send(&cancel, &[]).unwrap();
    }
    let held = started.load(Ordering::SeqCst);
    // Opened before asserting: the runtime's drop waits for the methods on its pool.
    drop(peer);
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    runtime.block_on(serving).unwrap().unwrap();
    assert!(
        paused && held <= MAX_REQUESTS,
        "{held} methods held on the pool at once, the backlog's bound is {MAX_REQUESTS}"
    );
}

/// A hostile peer that sends calls over this end's limits (each answered with a failure,
/// its method never run) and reads none of the failures: the reader stops at the backlog's
/// bounds and the connection stays up, as for any request. Before,
/// the reader never paused for these, took them in up to twice the bounds and then ended the
/// connection, saying that this end had waited for a reply (it had none out).
#[test]
fn calls_over_the_limits_whose_failures_go_unread_pause_the_reader_at_the_bounds() {
    use crate::connection::envelope::{self, Envelope, Kind};
    use crate::connection::tests::BULK;

    let (mut ours, theirs) = Socket::pair().unwrap();
    ours.set_limits(crate::Limits {
        max_message_len: 64,
        // The failures fit: they go out (and wait, unread), as the replies of calls would.
        max_send_len: Some(1 << 20),
        ..crate::Limits::default()
    });
    let rt = multi_thread_runtime(2);
    let server = rt.block_on(async { super::AsyncConnection::new(ours).unwrap() });
    server.add_service(Stuck::default());
    // Nothing more goes out to the peer, which reads nothing: every failure waits to.
    fill_with_oneways(&server);
    let flood = std::thread::spawn(move || {
        let mut call = vec![0u8; envelope::LEN + 100];
        for cookie in 1..=4 * crate::connection::backlog::MAX_REQUESTS as u64 {
            Envelope {
                kind: Kind::Call,
                cmd: 2,
                cookie,
                interface: BULK.id,
                signature: BULK.signature,
            }
            .write(&mut call);
            if theirs.send(&call, &[]).is_err() {
                break; // this end hung up
            }
        }
        theirs // kept open: a hang-up would fail the failures waiting to go out
    });
    rt.block_on(async {
        ::tokio::time::timeout(HANG_GUARD, async {
            while !server.test_reader_paused() && !server.is_closed() {
                ::tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the reader neither paused nor ended");
    });
    let why = rt.block_on(async {
        match server.is_closed() {
            true => Some(server.run().await),
            false => None,
        }
    });
    assert!(why.is_none(), "the flood ended the connection: {why:?}");
    assert!(server.test_reader_paused());
    server.close();
    drop(flood.join().unwrap());
}

/// `set_max_calls_at_once(1)` with its one call held: the peer's other calls wait without a
/// task each (the reader's and the held call's are all the connection has), up to the
/// backlog's bounds, where the reader waits for room as it would with them all running. Let
/// go, they run one at a time in the order sent, on the held call's task: their replies come
/// in that order.
#[test]
fn calls_waiting_for_a_slot_hold_no_task_and_pause_the_reader_at_the_bounds() {
    use crate::connection::backlog::MAX_REQUESTS;
    use crate::connection::tests::{ordered_request, wait_until};
    use crate::tokio::envelope::Kind;

    let runtime = multi_thread_runtime(2);
    let (peer, theirs) = Socket::pair().unwrap();
    let (started, has_started) = std::sync::mpsc::channel();
    let gate = std::sync::Arc::new(::tokio::sync::Notify::new());
    let run = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let server = runtime.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    server.set_max_calls_at_once(1);
    let serving = runtime.spawn(server.serve(AsyncOrdered {
        at: 0,
        action: AtSeq::Hold {
            started,
            gate: gate.clone(),
        },
        run: run.clone(),
    }));
    // Call 0 holds the one slot; the others wait, up to the bounds (the one running counts),
    // and one more waits in the socket.
    for seq in 0..=MAX_REQUESTS as u64 {
        peer.send(&ordered_request(Kind::Call, 2, seq + 1, seq), &[])
            .unwrap();
    }
    has_started.recv().unwrap();
    wait_until("the reader waits for room", || server.test_reader_paused());
    assert_eq!(
        server.test_tasks().0,
        2,
        "the reader and the one call's task"
    );
    gate.notify_one();
    for cookie in 1..=MAX_REQUESTS as u64 + 1 {
        let reply = peer.recv().unwrap();
        assert_eq!(
            reply.payload[8..16],
            cookie.to_le_bytes(),
            "replies in order"
        );
    }
    assert_eq!(*run.lock(), (1..=MAX_REQUESTS as u64).collect::<Vec<_>>());
    drop(peer);
    runtime.block_on(serving).unwrap().unwrap();
}

/// A service that asks the server for its clients as it is dropped (a service's `Drop` is
/// the user's code, and may reach the server: its count of clients, its `Debug`), and says
/// what it heard.
struct AsksTheServerAsItGoes {
    serving: std::sync::Arc<std::sync::OnceLock<super::AsyncServing>>,
    said: std::sync::mpsc::Sender<Option<usize>>,
}

impl super::AsyncService for AsksTheServerAsItGoes {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::BULK
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move { call.reply(7u32).await })
    }
}

impl Drop for AsksTheServerAsItGoes {
    fn drop(&mut self) {
        let _ = self.said.send(self.serving.get().map(|s| s.clients()));
    }
}

/// A client that hung up before the listener served it has the services made for it dropped
/// as they are added (nothing will reach them). That ran, with the spawn of the client's task
/// (which drops the task's future at once on a runtime shutting down), under the server's
/// lock of its clients: a service whose `Drop` asked the server for its clients deadlocked
/// the listener. It hears the client counted: listed before it is served.
#[test]
fn a_service_dropped_as_its_client_is_served_may_ask_the_server_for_its_clients() {
    use std::sync::{Arc, OnceLock, mpsc};
    let rt = multi_thread_runtime(2);
    let serving = Arc::new(OnceLock::new());
    let (said, heard) = mpsc::channel();
    let server = super::AsyncServer::new().service_with({
        let serving = serving.clone();
        move |connection| {
            // Off the worker (which runs the connection's reader next), until it has read
            // the hang-up: the connection has ended before it is served.
            ::tokio::task::block_in_place(|| {
                // (Not `is_closed`, which says so once the kernel does, read or not.)
                crate::connection::tests::wait_until("the client's hang-up is read", || {
                    connection.test_ended()
                })
            });
            AsksTheServerAsItGoes {
                serving: serving.clone(),
                said: said.clone(),
            }
        }
    });
    let name = format!("typed-ipc-test-drop-asks-the-server-{}", std::process::id());
    {
        let _in = rt.enter();
        let listener = super::AsyncListener::bind_abstract(&name).unwrap();
        assert!(serving.set(server.listen(listener)).is_ok());
    }
    drop(Socket::connect_abstract(&name).unwrap());
    let Ok(clients) = heard.recv_timeout(HANG_GUARD) else {
        // The listener holds the clients' lock for good: dropping the runtime would wait.
        std::mem::forget(rt);
        panic!("the service's drop deadlocked on the server's lock of its clients");
    };
    assert_eq!(clients, Some(1));
}

/// `shut_down` while a message of this end's is part-way out (a large oneway that waits for
/// room, holding the send lock between its pieces) and the peer has just made room: the
/// notice must not go out between two pieces of that message, which the peer would read as
/// a protocol error (a whole message inside another) rather than as the notice. The async
/// flavour sends a message's pieces under its own send lock, not the socket's, which the
/// notice once took alone.
#[test]
fn a_shut_down_notice_never_goes_out_between_the_pieces_of_a_message() {
    use std::future::Future;
    use std::task::{Context, Waker};

    use std::os::fd::AsRawFd;

    use nix::sys::socket::{MsgFlags, recv};

    use crate::codec::Bytes;
    use crate::connection::envelope::{FRAMED_AT, Kind, LEN};
    use crate::connection::tests::BULK;

    let (runtime, server, peer) = undriven_connection();
    server.add_service(AsyncCallsBack {
        back: server.clone(),
    });
    let mut cx = Context::from_waker(Waker::noop());
    // Far more than a socket buffer holds: it stops part-way, the send lock held.
    let mut large = Box::pin(server.oneway(&BULK, 1, Bytes(vec![5u8; 8 << 20]), None));
    assert!(
        large.as_mut().poll(&mut cx).is_pending(),
        "8 MiB went out at once"
    );
    // The peer reads the pieces sent so far: there is room again, but the send has not been
    // polled since.
    let mut datagram = vec![0u8; 1 << 20];
    let read = |datagram: &mut [u8]| {
        recv(peer.as_fd().as_raw_fd(), datagram, MsgFlags::MSG_DONTWAIT).unwrap_or(0)
    };
    assert!(read(&mut datagram) > 0, "nothing of the message went out");
    while read(&mut datagram) > 0 {}
    server.shut_down();
    let notice =
        |piece: &[u8]| piece.len() == FRAMED_AT + LEN && piece[FRAMED_AT] == Kind::ShutDown as u8;
    let mut pieces = 0;
    loop {
        match read(&mut datagram) {
            0 => break, // the end, or nothing more for now
            n => {
                assert!(
                    !notice(&datagram[..n]),
                    "the notice went out after {pieces} more pieces, in the middle of a message"
                );
                pieces += 1;
            }
        }
    }
    drop(large);
    drop(server);
    drop(runtime);
}

/// Answers each `Ordered` call with 8 MiB (more than the socket buffer holds), noting the
/// number its argument says as its handler starts.
struct LargeReplies(std::sync::Arc<parking_lot::Mutex<Vec<u64>>>);

impl super::AsyncService for LargeReplies {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::ORDERED
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            let seq: u64 = call.args()?;
            self.0.lock().push(seq);
            call.reply(crate::codec::Bytes(vec![7u8; 8 << 20])).await
        })
    }
}

/// How the peer that left its replies unread ends [`calls_held_for_the_replies`].
enum HeldUntil {
    /// It cancels one of the calls held, then reads every reply.
    CancelledAndRead,
    /// It hangs up.
    HungUp,
    /// This end closes the connection.
    Closed,
}

/// A peer that reads no replies: once 16 MiB of them wait to go out (`MAX_REPLY_BYTES`, two
/// of 8 MiB, the first part-way out with the socket buffer full), the calls read after that
/// do not start their handlers, and nothing changes until the peer reads.
fn calls_held_for_the_replies(until: HeldUntil) {
    use crate::connection::envelope::{Envelope, Kind, LEN};
    use crate::connection::tests::{ordered_request, wait_until};

    const CALLS: u64 = 10;
    let runtime = multi_thread_runtime(2);
    let (peer, theirs) = Socket::pair().unwrap();
    let ran = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let server = runtime.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    let serving = runtime.spawn(server.serve(LargeReplies(ran.clone())));
    for seq in 0..CALLS {
        peer.send(&ordered_request(Kind::Call, 2, seq + 1, seq), &[])
            .unwrap();
    }
    let held = || server.test_calls_held_for_replies() as u64;
    wait_until("every call has started or waits", || {
        ran.lock().len() as u64 + held() == CALLS
    });
    let started = ran.lock().clone();
    assert!(
        (2..CALLS / 2).contains(&(started.len() as u64)),
        "handlers started: {started:?}"
    );
    match until {
        HeldUntil::CancelledAndRead => {
            let cancelled = (0..CALLS).rev().find(|seq| !started.contains(seq)).unwrap();
            let mut cancel = vec![0; LEN];
            Envelope {
                kind: Kind::Cancel,
                cmd: 0,
                cookie: cancelled + 1,
                interface: 0,
                signature: 0,
            }
            .write(&mut cancel);
            peer.send(&cancel, &[]).unwrap();
            let others = CALLS - started.len() as u64 - 1;
            wait_until("the call cancelled is dropped", || held() == others);
            let mut answered = Vec::new();
            for _ in 1..CALLS {
                let reply = peer.recv_timeout(HANG_GUARD).unwrap();
                let envelope = Envelope::read(&reply.payload).unwrap();
                assert_eq!(envelope.kind, Kind::Reply);
                assert_eq!(reply.payload.len(), LEN + 9 + (8 << 20), "a whole reply");
                answered.push(envelope.cookie - 1);
            }
            answered.sort_unstable();
            let all_but: Vec<u64> = (0..CALLS).filter(|&seq| seq != cancelled).collect();
            assert_eq!(answered, all_but);
            let mut ran = ran.lock().clone();
            ran.sort_unstable();
            assert_eq!(ran, all_but, "the call cancelled never ran");
            // Its place in the backlog given back, as every other's.
            wait_until("no request is in flight", || {
                !server.test_requests_in_flight()
            });
            drop(peer);
        }
        // The calls held never run: their replies could go nowhere. (They ran before when
        // the peer hung up, their replies failing.)
        HeldUntil::HungUp | HeldUntil::Closed => {
            match until {
                HeldUntil::HungUp => drop(peer),
                _ => server.close(),
            }
            let closed = async { ::tokio::time::timeout(HANG_GUARD, server.wait_closed()).await };
            runtime
                .block_on(closed)
                .expect("the connection never ended");
            assert_eq!(*ran.lock(), started);
            assert_eq!(held(), 0);
        }
    }
    runtime.block_on(serving).unwrap().unwrap();
}

#[test]
fn a_call_held_for_the_replies_cancelled_is_dropped_and_the_others_run_as_the_peer_reads() {
    calls_held_for_the_replies(HeldUntil::CancelledAndRead);
}

#[test]
fn calls_held_for_the_replies_never_run_once_the_peer_hangs_up() {
    calls_held_for_the_replies(HeldUntil::HungUp);
}

#[test]
fn calls_held_for_the_replies_never_run_once_this_end_closes() {
    calls_held_for_the_replies(HeldUntil::Closed);
}

/// `connection::tests::a_caller_waiting_for_room_gets_disconnected_once_the_peer_hangs_up`,
/// async: a call of this end (not a handler's) waits for room with the reader paused at the
/// backlog's bounds, its oneway task held; the peer hangs up. The call waited until a
/// request finished, here for good (the held oneway waits for the call's outcome).
#[test]
fn an_async_caller_waiting_for_room_gets_disconnected_once_the_peer_hangs_up() {
    use crate::connection::tests::{ORDERED, next_call};
    use std::time::Duration;

    // (Only keeps a regression from hanging.)
    const GUARD: Duration = Duration::from_secs(20);
    let (runtime, peer, server, gate, serving) = paused_behind_a_held_oneway();
    let (done, outcome) = std::sync::mpsc::channel();
    runtime.spawn({
        let server = server.clone();
        async move {
            let _ = done.send(server.call::<_, u64>(&ORDERED, 3, 0u64, None).await);
        }
    });
    next_call(&peer);
    drop(peer);
    let outcome = outcome.recv_timeout(GUARD);
    assert!(
        matches!(outcome, Ok(Err(crate::Error::Disconnected))),
        "the caller did not hear that the peer hung up: {outcome:?}"
    );
    gate.notify_one();
    runtime.block_on(serving).unwrap().unwrap();
}
