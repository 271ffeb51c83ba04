//! Ending a connection: `stop_reading`, `close` and a peer that hangs up (also before it
//! is served): what still runs, and what is dropped with its fds closed.

use super::*;

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
    /// Lets the held handler go on (to reply).
    gate: std::sync::Arc<::tokio::sync::Notify>,
}

impl HeldCall {
    /// The connection, at most `max_calls` running at once if given, and the peer's end.
    fn new(max_calls: Option<usize>, fds: &[BorrowedFd<'_>]) -> (HeldCall, Socket) {
        HeldCall::of_cookie(1, max_calls, fds)
    }

    /// [`HeldCall::new`], the held call sent with `cookie`.
    fn of_cookie(
        cookie: u64,
        max_calls: Option<usize>,
        fds: &[BorrowedFd<'_>],
    ) -> (HeldCall, Socket) {
        use crate::connection::tests::ordered_request;
        use crate::tokio::envelope::Kind;

        let runtime = multi_thread_runtime(2);
        let (peer, theirs) = Socket::pair().unwrap();
        let (started, has_started) = std::sync::mpsc::channel();
        let run = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let gate = std::sync::Arc::new(::tokio::sync::Notify::new());
        let (server, serving) = runtime.block_on(async {
            let server = super::AsyncConnection::new(theirs).unwrap();
            if let Some(n) = max_calls {
                server.set_max_calls_at_once(n);
            }
            let serving = ::tokio::spawn(server.serve(AsyncOrdered {
                at: 1,
                action: AtSeq::Hold {
                    started,
                    gate: gate.clone(),
                },
                run: run.clone(),
            }));
            (server, serving)
        });
        peer.send(&ordered_request(Kind::Call, 2, cookie, 1), fds)
            .unwrap();
        has_started.recv().unwrap();
        let held = HeldCall {
            runtime,
            server,
            serving,
            run,
            gate,
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
/// With `half_closed`, the peer shuts only its sending side first: the connection ends with
/// the replies still to go out, nothing cancelled, and nothing reads the socket after; the
/// reader then watches for the peer's hang-up, which cancels the calls as above. With
/// `replies`, the held call is let go once the peer has hung up and replies (which fails), so
/// that whichever of the watch and the failed reply comes first cancels the waiting call.
/// (Before, the waiting call then ran; and without `replies`, nothing but a failed reply
/// told this end that the peer had gone, so the handler ran on and `run` waited for good.)
fn a_peer_hanging_up_cancels_its_calls(half_closed: bool, replies: bool) {
    use crate::connection::tests::ordered_request;
    use crate::tokio::envelope::Kind;

    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
    let fd = [write_end.as_fd()];
    let (held, peer) = HeldCall::new(Some(1), &fd);
    peer.send(&ordered_request(Kind::Call, 2, 2, 2), &fd)
        .unwrap();
    peer.send(&ordered_request(Kind::Oneway, 3, 0, 3), &fd)
        .unwrap();
    if half_closed {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&peer.as_fd());
        nix::sys::socket::shutdown(raw, nix::sys::socket::Shutdown::Write).unwrap();
        held.runtime.block_on(until_ended(&held.server));
    }
    drop((peer, write_end));
    if replies {
        held.gate.notify_one(); // its reply, if it is not cancelled first, finds the peer gone
    }
    let ran = held.served_to_the_end("the handler ran on after the peer hung up");
    assert_eq!(ran, [3]);
    assert!(write_ends_closed(&read_end), "an fd is still open");
}

#[test]
fn a_peer_hanging_up_cancels_its_running_and_waiting_calls_and_runs_its_oneways() {
    a_peer_hanging_up_cancels_its_calls(false, false);
}

#[test]
fn a_peer_that_shuts_its_sending_side_then_hangs_up_has_its_calls_cancelled() {
    a_peer_hanging_up_cancels_its_calls(true, true);
}

#[test]
fn a_peer_that_shuts_its_sending_side_then_hangs_up_has_a_call_that_never_replies_cancelled() {
    a_peer_hanging_up_cancels_its_calls(true, false);
}

/// A peer that shuts only its sending side and stays: its call runs and is answered, and
/// `run` returns once it has, the peer still there. The reader, which watches for the peer's
/// hang-up while the call runs, stops watching as the call finishes (it would otherwise wait
/// for that hang-up, and `run` with it), leaving no copy of the socket's fd open.
#[test]
fn a_half_closed_peer_that_stays_has_its_call_answered_and_run_returns() {
    let (held, peer) = HeldCall::new(None, &[]);
    let raw = std::os::fd::AsRawFd::as_raw_fd(&peer.as_fd());
    nix::sys::socket::shutdown(raw, nix::sys::socket::Shutdown::Write).unwrap();
    held.runtime.block_on(until_ended(&held.server));
    held.gate.notify_one();
    let inode = nix::sys::stat::fstat(held.server.socket().as_fd())
        .unwrap()
        .st_ino;
    let server = held.server.clone();
    let ran = held.served_to_the_end("run waited for the peer to hang up");
    assert_eq!(ran, [] as [u64; 0]);
    let reply = peer.recv().unwrap();
    assert_eq!(
        crate::tokio::envelope::Envelope::read(&reply.payload)
            .unwrap()
            .kind,
        crate::tokio::envelope::Kind::Reply
    );
    assert_eq!(
        fds_of_socket(inode),
        1,
        "a copy of the socket is still open"
    );
    drop(server);
}

/// How many fds of this process are the socket whose inode is `inode`.
fn fds_of_socket(inode: u64) -> usize {
    let name = std::ffi::OsString::from(format!("socket:[{inode}]"));
    let fds = std::fs::read_dir("/proc/self/fd").unwrap();
    let fds = fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok());
    fds.filter(|target| target.as_os_str() == name).count()
}

/// After the peer shut only its sending side, this end watches for it to hang up for good,
/// on a copy of the socket's fd, while a call of the peer's runs. This end closing the
/// connection, or dropping its last handle, ends that watch at once: the handler that never
/// replies is cancelled (its future dropped, its fds closed), the peer sees the hang-up, and
/// no copy of the socket is left open once the connection is gone. (Before, dropping the last
/// handle cancelled nothing: the handler ran on, holding the connection and its socket open
/// for good.)
fn this_end_ending_a_half_closed_connection_leaves_no_copy_of_its_socket(close: bool) {
    use crate::connection::tests::ordered_request;
    use crate::tokio::envelope::Kind;

    let runtime = multi_thread_runtime(2);
    let (peer, theirs) = Socket::pair().unwrap();
    let inode = nix::sys::stat::fstat(theirs.as_fd()).unwrap().st_ino;
    let (started, has_started) = std::sync::mpsc::channel();
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
    let server = runtime.block_on(async {
        let server = super::AsyncConnection::new(theirs).unwrap();
        // No task of the test's holds a handle: the one here is the last.
        server.add_service(AsyncOrdered {
            at: 1,
            action: AtSeq::Hold {
                started,
                gate: std::sync::Arc::new(::tokio::sync::Notify::new()),
            },
            run: std::sync::Arc::default(),
        });
        server
    });
    peer.send(&ordered_request(Kind::Call, 2, 1, 1), &[write_end.as_fd()])
        .unwrap();
    drop(write_end);
    has_started.recv().unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&peer.as_fd());
    nix::sys::socket::shutdown(raw, nix::sys::socket::Shutdown::Write).unwrap();
    runtime.block_on(until_ended(&server));
    if close {
        server.close();
    }
    drop(server);
    runtime.block_on(async {
        ::tokio::time::timeout(HANG_GUARD, async {
            while fds_of_socket(inode) != 0 {
                ::tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a copy of the socket stayed open after this end let the connection go")
    });
    assert!(
        matches!(peer.recv(), Err(crate::Error::Disconnected)),
        "the peer did not see the hang-up"
    );
    assert!(write_ends_closed(&read_end), "an fd is still open");
}

#[test]
fn closing_a_half_closed_connection_leaves_no_copy_of_its_socket() {
    this_end_ending_a_half_closed_connection_leaves_no_copy_of_its_socket(true);
}

#[test]
fn dropping_a_half_closed_connection_cancels_its_calls_and_leaves_no_copy_of_its_socket() {
    this_end_ending_a_half_closed_connection_leaves_no_copy_of_its_socket(false);
}

/// A call of cookie 0, which typed-ipc never sends (its cookies start at 1) but a broken or
/// hostile peer may, is cancelled as the peer hangs up, as any other call is: its handler's
/// future is dropped and `run` returns. Before, a runner with cookie 0 counted as idle at the
/// end, and the handler ran on for good.
#[test]
fn a_peer_hanging_up_cancels_its_running_call_of_cookie_0() {
    let (held, peer) = HeldCall::of_cookie(0, None, &[]);
    drop(peer);
    let ran = held.served_to_the_end("the handler of cookie 0 ran on after the peer hung up");
    assert_eq!(ran, [] as [u64; 0]);
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
