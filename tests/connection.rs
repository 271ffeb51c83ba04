//! The connection runtime under load and faults, across real processes where it matters.
//! Every test takes `fd_count_lock` so the ones that count `/proc/self/fd` see only their own.

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::Duration;

use common::*;
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, Error, Listener, Server, current_peer, interface};

/// The interface most scenarios use.
#[interface]
pub trait Lab {
    /// Echoes the bytes and `n` memfds, each holding its index.
    fn echo(&self, data: Vec<u8>, files: Vec<OwnedFd>) -> Vec<u8>;
    /// Blocks until `key` is released by [`Lab::release`].
    fn wait_for(&self, key: u32) -> u32;
    /// Releases the callers of `wait_for(key)`.
    fn release(&self, key: u32);
    /// The caller's pid as this side saw it.
    fn caller_pid(&self) -> i32;
    #[oneway]
    fn count(&self, seq: u64);
    /// Waits until `n` oneways arrived; true if they came in order.
    fn counted(&self, n: u64) -> bool;
    /// How many oneways have run, without waiting.
    fn counted_so_far(&self) -> u64;
}

/// A handle on the lab's state: the server owns one, a test may keep a clone to release
/// keys itself, without a call the server would have to read.
#[derive(Clone, Default)]
struct LabImpl(Arc<LabState>);

#[derive(Default)]
struct LabState {
    released: Mutex<Vec<u32>>,
    changed: Condvar,
    next_seq: AtomicU64,
    in_order: std::sync::atomic::AtomicBool,
}

impl std::ops::Deref for LabImpl {
    type Target = LabState;
    fn deref(&self) -> &LabState {
        &self.0
    }
}

impl LabImpl {
    fn new() -> LabImpl {
        let lab = LabImpl::default();
        lab.in_order.store(true, Ordering::SeqCst);
        lab
    }
    fn block_until_released(&self, key: u32) {
        let mut released = self.released.lock().unwrap();
        while !released.contains(&key) {
            released = self.changed.wait(released).unwrap();
        }
    }
}

impl Lab for LabImpl {
    fn echo(&self, data: Vec<u8>, files: Vec<OwnedFd>) -> Vec<u8> {
        let mut out = data;
        for (i, f) in files.into_iter().enumerate() {
            assert_eq!(read_all(f), (i as u32).to_le_bytes());
        }
        out.reverse();
        out
    }
    fn wait_for(&self, key: u32) -> u32 {
        self.block_until_released(key);
        key
    }
    fn release(&self, key: u32) {
        self.released.lock().unwrap().push(key);
        self.changed.notify_all();
    }
    fn caller_pid(&self) -> i32 {
        current_peer().map_or(-1, |p| p.pid)
    }
    fn count(&self, seq: u64) {
        if self.next_seq.fetch_add(1, Ordering::SeqCst) != seq {
            self.in_order.store(false, Ordering::SeqCst);
        }
        let _guard = self.released.lock().unwrap();
        self.changed.notify_all();
    }
    fn counted(&self, n: u64) -> bool {
        let mut guard = self.released.lock().unwrap();
        while self.next_seq.load(Ordering::SeqCst) < n {
            guard = self.changed.wait(guard).unwrap();
        }
        self.in_order.load(Ordering::SeqCst)
    }
    fn counted_so_far(&self) -> u64 {
        self.next_seq.load(Ordering::SeqCst)
    }
}

/// A client whose server runs `LabImpl` with `threads` threads on another thread.
fn lab(threads: usize) -> (LabClient, std::thread::JoinHandle<typed_ipc::Result<()>>) {
    let (a, b) = Connection::pair().unwrap();
    let server = Server::new()
        .service(LabServer::new(LabImpl::new()))
        .threads(threads);
    let handle = std::thread::spawn(move || server.serve(&b));
    (LabClient::new(a), handle)
}

fn indexed_fds(n: usize) -> Vec<OwnedFd> {
    (0..n).map(|i| memfd(&(i as u32).to_le_bytes())).collect()
}

#[test]
fn eight_threads_times_ten_thousand_mixed_calls_on_one_client() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (client, server) = lab(4);
    std::thread::scope(|s| {
        for t in 0..8u32 {
            let client = client.clone();
            s.spawn(move || {
                for i in 0..10_000u32 {
                    let len = [0, 1, 64, 4096, 70_000][(i as usize + t as usize) % 5];
                    let nfds = (i % 3) as usize;
                    let data: Vec<u8> = (0..len).map(|j| (j as u32 ^ i ^ t) as u8).collect();
                    let mut expected = data.clone();
                    expected.reverse();
                    assert_eq!(client.echo(data, indexed_fds(nfds)).unwrap(), expected);
                }
            });
        }
    });
    drop(client);
    server.join().unwrap().unwrap();
    before.assert_nothing_new();
}

#[test]
fn replies_come_back_out_of_order_to_the_right_callers() {
    let _fds = fd_count_lock();
    let (client, server) = lab(2);
    let first = {
        let client = client.clone();
        std::thread::spawn(move || client.wait_for(1))
    };
    // `wait_for(1)` cannot return before `release(1)`, so the second call's reply overtakes
    // the first's on the wire.
    assert_eq!(client.wait_for_released_by_self(), 2);
    client.release(1).unwrap();
    assert_eq!(first.join().unwrap().unwrap(), 1);
    drop(client);
    server.join().unwrap().unwrap();
}

impl LabClient {
    /// Releases key 2 and waits for it: a call that completes while another is pending.
    fn wait_for_released_by_self(&self) -> u32 {
        self.release(2).unwrap();
        self.wait_for(2).unwrap()
    }
}

/// A server whose one slow method waits for the test to open a gate.
#[interface]
pub trait Gated {
    /// Returns a memfd once the gate opens.
    fn slow_fd(&self) -> OwnedFd;
    /// Returns at once.
    fn ping(&self) -> u32;
}

struct Gate(Mutex<mpsc::Receiver<()>>);

impl Gated for Gate {
    fn slow_fd(&self) -> OwnedFd {
        self.0.lock().unwrap().recv().unwrap();
        memfd(b"late")
    }
    fn ping(&self) -> u32 {
        42
    }
}

#[test]
fn per_call_timeouts_drop_late_replies_and_close_their_fds() {
    let _fds = fd_count_lock();
    let (a, b) = Connection::pair().unwrap();
    let (open_gate, gate) = mpsc::channel();
    // One thread: calls run strictly in order.
    let server = std::thread::spawn(move || b.serve(GatedServer::new(Gate(Mutex::new(gate)))));
    let client = GatedClient::new(a);
    let before = fd_snapshot();
    let quick = client.with_timeout(Duration::from_millis(20));
    assert!(matches!(quick.slow_fd(), Err(Error::TimedOut)));
    open_gate.send(()).unwrap();
    // This reply follows the late one on the wire: once it is back, the late reply (and the
    // fd it carries) has been read and dropped.
    assert_eq!(client.ping().unwrap(), 42);
    before.assert_nothing_new();
    // The per-call override did not change the client's default (no timeout).
    open_gate.send(()).unwrap();
    drop(client.slow_fd().unwrap());
    drop((client, quick));
    server.join().unwrap().unwrap();
}

#[test]
fn oneways_run_in_the_order_sent_even_with_a_pool() {
    let _fds = fd_count_lock();
    let (client, server) = lab(4);
    for seq in 0..10_000 {
        client.count(seq).unwrap();
    }
    assert!(client.counted(10_000).unwrap());
    drop(client);
    server.join().unwrap().unwrap();
}

/// With a pool, calls run concurrently, but never ahead of the oneways sent before them: a
/// call that counts the oneways sees every one its caller sent first. (Before, a pool thread
/// ran a call as soon as it read it, while another thread was still running the oneways.)
#[test]
fn a_call_runs_after_the_oneways_sent_before_it_even_with_a_pool() {
    let _fds = fd_count_lock();
    let (client, server) = lab(4);
    let mut sent = 0;
    for _ in 0..500 {
        for _ in 0..5 {
            client.count(sent).unwrap();
            sent += 1;
        }
        assert_eq!(client.counted_so_far().unwrap(), sent);
    }
    assert!(client.counted(sent).unwrap());
    drop(client);
    server.join().unwrap().unwrap();
}

#[test]
fn a_hundred_concurrent_clients_on_one_listener() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let name = format!("typed-ipc-listener-{}", std::process::id());
    let listener = Listener::bind_abstract(&name).unwrap();
    let serving = Server::new()
        .service(LabServer::new(LabImpl::new()))
        .listen(listener)
        .unwrap();
    let all_connected = Barrier::new(100);
    std::thread::scope(|s| {
        for i in 0..100u32 {
            let (name, all_connected) = (&name, &all_connected);
            s.spawn(move || {
                let client = LabClient::new(Connection::connect_abstract(name).unwrap());
                all_connected.wait(); // all 100 connected at once
                for j in 0..20u32 {
                    let data = (i * 1000 + j).to_le_bytes().to_vec();
                    let mut expected = data.clone();
                    expected.reverse();
                    assert_eq!(client.echo(data, indexed_fds(1)).unwrap(), expected);
                }
            });
        }
    });
    serving.shutdown();
    before.assert_nothing_new();
}

/// A client that hung up takes its connection's resources with it: the server's end of its
/// socket, the shared-memory region the server's end sent its byte strings through, and its
/// mapping of the client's. Not at the next accept, nor when the clients are next counted:
/// a listener no client comes to again would keep them for good.
#[test]
fn a_departed_clients_socket_and_shared_memory_go_once_its_serving_ends() {
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-departed-{}", std::process::id());
    let serving = Server::new()
        .service(LabServer::new(LabImpl::new()))
        .threads(2)
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    let before @ (_, mapped_before) = connection_resources();
    let client =
        LabClient::new(Connection::connect_abstract(&name).unwrap()).with_timeout(HANG_GUARD);
    // Through the lane both ways: each end maps a region of its own and the other's.
    let data = filled(64 * 1024, 1);
    let mut expected = data.clone();
    expected.reverse();
    assert_eq!(client.echo(data, Vec::new()).unwrap(), expected);
    assert!(
        memfd_mappings() > mapped_before,
        "the echo went through shared memory"
    );
    drop(client);
    // The client's serving threads end just after its hang-up; no event marks that (and
    // `Serving::clients`, which would wait for it, also forgets it), so this polls, bounded.
    let since = std::time::Instant::now();
    while !resources_back(before, since, HANG_GUARD) {
        std::thread::yield_now();
    }
    serving.shutdown();
}

#[test]
fn the_implementation_sees_peer_credentials_and_the_server_can_refuse() {
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-creds-{}", std::process::id());
    let server = Server::new()
        .service(LabServer::new(LabImpl::new()))
        .authorize(|peer, iface, cmd| {
            let release = iface
                .methods
                .iter()
                .find(|m| m.name == "release")
                .unwrap()
                .cmd;
            match peer {
                Some(p) if cmd == release && p.pid == std::process::id() as i32 => {
                    Err(format!("pid {} may not release", p.pid))
                }
                _ => Ok(()),
            }
        });
    let serving = server
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    let client = LabClient::new(Connection::connect_abstract(&name).unwrap());
    assert_eq!(client.caller_pid().unwrap(), std::process::id() as i32);
    match client.release(1) {
        Err(Error::Refused(why)) => assert!(why.contains("may not release"), "{why}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_eq!(
        client.caller_pid().unwrap(),
        std::process::id() as i32,
        "still serving"
    );
    drop(client);
    serving.shutdown();
}

#[test]
fn graceful_shutdown_finishes_calls_in_flight_and_stops_accepting() {
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-shutdown-{}", std::process::id());
    let lab = LabImpl::new();
    let serving = Server::new()
        .service(LabServer::new(lab.clone()))
        .threads(2)
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    let client = LabClient::new(Connection::connect_abstract(&name).unwrap());
    let (entered_tx, entered) = mpsc::channel();
    let in_flight = {
        let client = client.clone();
        std::thread::spawn(move || {
            entered_tx.send(()).unwrap();
            client.wait_for(5)
        })
    };
    entered.recv().unwrap();
    // Make sure the call is running on the server before shutting down: a second call
    // through the same pool is answered only after the first was read.
    assert_eq!(client.caller_pid().unwrap(), std::process::id() as i32);
    let shutdown = std::thread::spawn(move || serving.shutdown());
    // Released once the shutdown has begun (the listener refuses), and by hand: a `release`
    // call could not get through, since the server stops reading (it used to try, and hung
    // both threads when the shutdown won the race).
    while let Ok(early) = Connection::connect_abstract(&name) {
        drop(early);
        std::thread::yield_now();
    }
    lab.release(5);
    assert_eq!(
        in_flight.join().unwrap().unwrap(),
        5,
        "the call in flight finished"
    );
    shutdown.join().unwrap();
    assert!(
        Connection::connect_abstract(&name).is_err(),
        "no longer accepting"
    );
}

/// Shuts its own server down, from inside a handler: a client asking the server to quit.
#[interface]
pub trait Quit {
    fn quit(&self) -> u32;
}

/// Holds the server it stops, put there once it listens.
struct Quitter(Arc<Mutex<Option<typed_ipc::Serving>>>);

impl Quit for Quitter {
    fn quit(&self) -> u32 {
        let serving = self.0.lock().unwrap().take();
        serving.expect("asked to quit once").shutdown();
        7
    }
}

/// A handler that shuts its own server down cannot wait for itself: the shutdown waits for
/// every other call in flight, then the handler's reply goes out. (It joined the very thread
/// it ran on: a panic on the client's serving thread, and, on a thread of its pool, a wait
/// for good, the client's serving thread waiting for that one to return.)
#[test]
fn a_handler_can_shut_its_own_server_down() {
    let _fds = fd_count_lock();
    let before = ipc_fds();
    // With two, the handler runs on either thread.
    for (run, threads) in [1, 2, 2, 2].into_iter().enumerate() {
        let name = format!("typed-ipc-quit-{}-{run}", std::process::id());
        let slot = Arc::new(Mutex::new(None));
        let serving = Server::new()
            .service(QuitServer::new(Quitter(slot.clone())))
            .threads(threads)
            .listen(Listener::bind_abstract(&name).unwrap())
            .unwrap();
        *slot.lock().unwrap() = Some(serving);
        let client =
            QuitClient::new(Connection::connect_abstract(&name).unwrap()).with_timeout(HANG_GUARD);
        let (done, outcome) = mpsc::channel();
        std::thread::spawn(move || done.send((client.quit(), client)));
        let (outcome, client) = outcome
            .recv_timeout(HANG_GUARD)
            .expect("the shutdown waited for the handler it was called from");
        assert_eq!(outcome.unwrap(), 7, "{threads} threads");
        assert!(
            Connection::connect_abstract(&name).is_err(),
            "no longer accepting"
        );
        // Its connection ends once the handler has replied: the server's end hangs up, saying
        // first that it shut down.
        let after = client.quit();
        assert!(
            matches!(after, Err(Error::ShutDown)),
            "{threads} threads: the quitting client's connection stays open, or it was not \
             told that the server shut down: {after:?}"
        );
        drop(client);
        // The quitting client's serving thread, which the shutdown could not wait for, closes
        // the server's end of its socket just after the hang-up the client saw. No event marks
        // that, so this polls (bounded): a socket left open would move the count of the next
        // test that counts fds.
        let since = std::time::Instant::now();
        while ipc_fds() != before {
            assert!(
                since.elapsed() < HANG_GUARD,
                "{threads} threads: the server's end of the quitting client's socket stays open"
            );
            std::thread::yield_now();
        }
    }
}

/// A server dropped on its acceptor thread, by the `service_with` of a client it is setting
/// up (a server of a fixed number of clients), stops as when dropped anywhere else: it hangs
/// up on every client, the one being set up too, and refuses new ones.
#[test]
fn a_server_dropped_by_its_own_service_with_stops_and_hangs_up_on_every_client() {
    let _fds = fd_count_lock();
    let before = ipc_fds();
    let name = format!("typed-ipc-dropped-by-make-{}", std::process::id());
    let slot: Arc<Mutex<Option<typed_ipc::Serving>>> = Arc::default();
    let made = Arc::new(AtomicU64::new(0));
    let serving = Server::new()
        .service_with({
            let (slot, made) = (slot.clone(), made.clone());
            move |_| {
                // The second client is one too many.
                if made.fetch_add(1, Ordering::SeqCst) == 1 {
                    drop(slot.lock().unwrap().take());
                }
                LabServer::new(LabImpl::new())
            }
        })
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    *slot.lock().unwrap() = Some(serving);
    let first =
        LabClient::new(Connection::connect_abstract(&name).unwrap()).with_timeout(HANG_GUARD);
    assert_eq!(first.caller_pid().unwrap(), std::process::id() as i32);
    let second =
        LabClient::new(Connection::connect_abstract(&name).unwrap()).with_timeout(HANG_GUARD);
    // The first is told that the server shut down; the second, whose service was being made,
    // is only hung up on (it was never served).
    let got = second.caller_pid();
    assert!(
        matches!(got, Err(Error::Disconnected)),
        "the second: {got:?}"
    );
    let got = first.caller_pid();
    assert!(matches!(got, Err(Error::ShutDown)), "the first: {got:?}");
    assert!(slot.lock().unwrap().is_none(), "dropped");
    assert!(
        Connection::connect_abstract(&name).is_err(),
        "no longer accepting"
    );
    drop((first, second));
    // The acceptor thread, which the drop could not wait for, closes the listener just after
    // the hang-ups. No event marks that, so this polls (bounded).
    let since = std::time::Instant::now();
    while ipc_fds() != before {
        assert!(
            since.elapsed() < HANG_GUARD,
            "a socket of the server's stays open"
        );
        std::thread::yield_now();
    }
}

/// How many more fds than it has open the child of
/// `a_listener_out_of_fds_says_so_and_accepts_again_once_clients_hang_up` may open.
const ROOM: usize = 8;

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(60);

#[test]
fn a_listener_out_of_fds_says_so_and_accepts_again_once_clients_hang_up() {
    check_survives_running_out_of_fds("child_serves_at_a_low_fd_limit", ROOM, |fresh| {
        let fresh = LabClient::new(fresh).with_timeout(HANG_GUARD);
        assert_eq!(fresh.caller_pid().unwrap(), std::process::id() as i32);
    });
}

/// The child of `a_listener_out_of_fds_says_so_and_accepts_again_once_clients_hang_up`:
/// serves `Lab` on the listener the parent names, with room for [`ROOM`] more fds, until its
/// stdin ends.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_serves_at_a_low_fd_limit() {
    use std::io::Read;
    let name = std::env::var("TYPED_IPC_TEST_LISTENER").unwrap();
    let serving = Server::new()
        .service(LabServer::new(LabImpl::new()))
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    leave_room_for_fds(ROOM);
    eprintln!("listening");
    std::io::stdin().read_to_end(&mut Vec::new()).unwrap();
    serving.accepting().unwrap();
    serving.shutdown();
}

#[test]
fn a_listener_out_of_threads_says_so_and_accepts_again_once_it_can_start_them() {
    use std::io::Write;
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-out-of-threads-{}", std::process::id());
    let mut command = child("child_serves_two_threads_a_client_at_a_low_memory_limit");
    common::with_huge_thread_stacks(&mut command);
    let (mut server, lines) = start_listener_child(command, &name);
    // The child has room for this client's first thread, not its second. Serving used to
    // start the second with `std::thread::spawn`, which panicked on the client's thread
    // (and the child, whose panics abort as a `panic = "abort"` build's do, died).
    let first = Connection::connect_abstract(&name).unwrap();
    wait_for_line(&lines, "cannot start a thread for a client", HANG_GUARD);
    drop(first);
    let mut stdin = server.stdin.take().unwrap();
    stdin.write_all(b"room\n").unwrap(); // the child's cue to lift its limit
    wait_for_line(&lines, "unlimited", HANG_GUARD);
    let fresh =
        LabClient::new(Connection::connect_abstract(&name).unwrap()).with_timeout(HANG_GUARD);
    assert_eq!(fresh.caller_pid().unwrap(), std::process::id() as i32);
    drop(fresh);
    wait_for_line(&lines, "accepts clients again", HANG_GUARD);
    drop(stdin); // the child's cue to shut down
    finish_listener_child(server, lines);
}

/// The child of `a_listener_out_of_threads_says_so_and_accepts_again_once_it_can_start_them`:
/// serves `Lab` with two threads a client on the listener the parent names, with address
/// space for one more thread only (`common::room_for_one_more_thread`), until a line on its
/// stdin lifts that limit; shuts down when its stdin ends. Any panic aborts it.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_serves_two_threads_a_client_at_a_low_memory_limit() {
    use std::io::BufRead;
    common::abort_on_panic();
    let name = std::env::var("TYPED_IPC_TEST_LISTENER").unwrap();
    let serving = Server::new()
        .service(LabServer::new(LabImpl::new()))
        .threads(2)
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    common::room_for_one_more_thread();
    eprintln!("listening");
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin.read_line(&mut line).unwrap();
    common::lift_address_space_limit();
    eprintln!("unlimited");
    while stdin.read_line(&mut line).unwrap() > 0 {}
    serving.accepting().unwrap();
    serving.shutdown();
}

#[test]
fn a_listener_that_fails_for_good_says_why_and_serves_its_clients_on() {
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-listener-fails-{}", std::process::id());
    let listener = Listener::bind_abstract(&name).unwrap();
    let same_socket = listener.as_fd().try_clone_to_owned().unwrap();
    let serving = Server::new()
        .service(LabServer::new(LabImpl::new()))
        .listen(listener)
        .unwrap();
    let client = LabClient::new(Connection::connect_abstract(&name).unwrap());
    assert_eq!(client.caller_pid().unwrap(), std::process::id() as i32);
    serving.accepting().unwrap();
    // Shut down behind the server's back, the socket fails every accept with EINVAL.
    nix::sys::socket::shutdown(same_socket.as_raw_fd(), nix::sys::socket::Shutdown::Both).unwrap();
    let since = std::time::Instant::now();
    let why = loop {
        match serving.accepting() {
            Ok(()) if since.elapsed() < HANG_GUARD => std::thread::yield_now(),
            Ok(()) => panic!("the server never noticed"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&why, Error::Io(e) if e.raw_os_error() == Some(libc::EINVAL)),
        "{why:?}"
    );
    // A new client is refused rather than left waiting, and the name is free to listen on
    // again, although `serving` lives on.
    drop(same_socket);
    assert!(
        Connection::connect_abstract(&name).is_err(),
        "no longer accepting"
    );
    drop(Listener::bind_abstract(&name).expect("the name is free again"));
    // The client already connected is still served.
    assert_eq!(client.caller_pid().unwrap(), std::process::id() as i32);
    drop(client);
    serving.shutdown();
}

// ---- across processes: callbacks and peer death ----

/// What the parent serves to its worker.
#[interface]
pub trait Events {
    /// A frame is done; returns how many the parent has seen.
    fn frame_done(&self, frame: u32) -> u32;
}

/// What the worker serves to the parent.
#[interface]
pub trait Pipeline {
    /// Processes `frames` frames, calling `Events::frame_done` on the parent for each one
    /// before returning.
    fn process(&self, frames: u32) -> u32;
    /// Writes a byte to `signal` then never returns.
    fn hang(&self, signal: OwnedFd);
}

struct Seen(AtomicU64);

impl Events for Seen {
    fn frame_done(&self, _frame: u32) -> u32 {
        self.0.fetch_add(1, Ordering::SeqCst) as u32 + 1
    }
}

#[test]
fn the_worker_calls_back_into_the_parent_during_a_call() {
    let _fds = fd_count_lock();
    let (mut child, conn) = Worker::spawn(child("child_pipeline")).unwrap();
    let seen = Arc::new(Seen(AtomicU64::new(0)));
    let serving = {
        let (conn, seen) = (conn.clone(), seen.clone());
        std::thread::spawn(move || conn.serve(EventsServer::new(ArcSeen(seen))))
    };
    let pipeline = PipelineClient::new(conn.clone());
    assert_eq!(pipeline.process(10).unwrap(), 10);
    assert_eq!(seen.0.load(Ordering::SeqCst), 10);
    conn.close();
    serving.join().unwrap().unwrap();
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

struct ArcSeen(Arc<Seen>);
impl Events for ArcSeen {
    fn frame_done(&self, frame: u32) -> u32 {
        self.0.frame_done(frame)
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_pipeline() {
    let conn = worker::connection().unwrap();
    let events = EventsClient::new(conn.clone());
    Server::new()
        .service(PipelineServer::new(Worker1 { events }))
        .threads(8)
        .serve(&conn)
        .unwrap();
}

struct Worker1 {
    events: EventsClient,
}

impl Pipeline for Worker1 {
    fn process(&self, frames: u32) -> u32 {
        let mut seen = 0;
        for frame in 0..frames {
            seen = self.events.frame_done(frame).unwrap();
        }
        seen
    }
    fn hang(&self, signal: OwnedFd) {
        use std::io::Write;
        std::fs::File::from(signal).write_all(b"!").unwrap();
        loop {
            std::thread::park();
        }
    }
}

#[test]
fn sigkill_during_calls_releases_every_caller_with_disconnected() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (mut child, conn) = Worker::spawn(child("child_pipeline")).unwrap();
    let pipeline = PipelineClient::new(conn.clone());
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (pipeline, signal) = (pipeline.clone(), write_end.try_clone().unwrap());
            std::thread::spawn(move || pipeline.hang(signal))
        })
        .collect();
    drop(write_end);
    // Every call is running in the worker once it has written its byte.
    let mut bytes = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::from(read_end), &mut bytes).unwrap();
    child.kill().unwrap();
    for caller in callers {
        // `hang` is oneway-less: it waits for a reply that never comes, until the peer dies.
        assert!(matches!(caller.join().unwrap(), Err(Error::Disconnected)));
    }
    assert!(
        conn.is_closed(),
        "a dead connection is told apart from a slow one"
    );
    assert!(matches!(pipeline.process(1), Err(Error::Disconnected)));
    assert_eq!(child.wait().unwrap(), Exit::Signal(9));
    drop((pipeline, conn, child));
    before.assert_nothing_new();
}

#[test]
fn a_worker_killed_between_calls_fails_the_next_call_at_once() {
    let _fds = fd_count_lock();
    let (mut child, conn) = Worker::spawn(child("child_pipeline")).unwrap();
    let pipeline = PipelineClient::new(conn);
    let events = std::thread::spawn({
        let conn = pipeline.connection().clone();
        move || {
            conn.serve(EventsServer::new(ArcSeen(Arc::new(Seen(AtomicU64::new(
                0,
            ))))))
        }
    });
    assert_eq!(pipeline.process(1).unwrap(), 1);
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap(), Exit::Signal(9));
    assert!(matches!(pipeline.process(1), Err(Error::Disconnected)));
    events.join().unwrap().unwrap();
}

/// The authorizer is user code like a handler: a panic in it refuses that one request (its
/// caller hears so at once) and kills no serving thread, so the requests after it still run
/// — the calls that wait for a oneway it panicked on among them.
#[test]
fn a_panicking_authorizer_refuses_the_request_and_the_connection_serves_on() {
    let _fds = fd_count_lock();
    let (a, b) = Connection::pair().unwrap();
    let server = Server::new()
        .service(LabServer::new(LabImpl::new()))
        .threads(2)
        .authorize(panicking_authorizer());
    let serving = std::thread::spawn(move || server.serve(&b));
    // (The timeout only keeps a regression from hanging: the answer comes at once.)
    let client = LabClient::new(a).with_timeout(Duration::from_secs(60));
    match client.caller_pid() {
        Err(Error::Refused(why)) => assert!(why.contains("authorizer panicked"), "{why}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    // A oneway it panics on, then a call that runs only once that oneway is done with.
    client.count(0).unwrap();
    assert_eq!(client.caller_pid().unwrap(), std::process::id() as i32);
    drop(client);
    serving.join().expect("no serving thread panicked").unwrap();
}

#[test]
fn a_client_of_another_wire_version_learns_the_servers_version_not_just_a_hang_up() {
    use typed_ipc::Socket;
    use typed_ipc::wire::{HEADER_LEN, Header, Kind, VERSION};
    let _fds = fd_count_lock();
    let (client, server_end) = Socket::pair().unwrap();
    let server = std::thread::spawn(move || {
        Connection::new(server_end).serve(LabServer::new(LabImpl::new()))
    });
    // `client` plays a typed-ipc of another release calling this one: its header carries
    // its own wire version.
    let mut theirs = Header {
        kind: Kind::First,
        fds: 0,
        total_len: 24,
        total_fds: 0,
    }
    .encode();
    let other = VERSION.wrapping_add(1);
    theirs[2] = other;
    let call = [theirs.as_slice(), &[1; 24]].concat();
    let raw = client.as_fd().as_raw_fd();
    nix::sys::socket::send(raw, &call, nix::sys::socket::MsgFlags::empty()).unwrap();
    assert!(matches!(
        server.join().unwrap(),
        Err(Error::VersionMismatch { theirs, .. }) if theirs == other
    ));
    // That release's stub reports `VersionMismatch`, as the guide promises, only if this end
    // told it its version before hanging up: its receive refuses a header of another version.
    let mut head = [0u8; 64];
    let n = nix::sys::socket::recv(raw, &mut head, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
        .expect("the server said nothing before it hung up");
    assert_eq!(
        n, HEADER_LEN,
        "the server hung up without saying its version"
    );
    assert_eq!(head[..3], [b'T', b'I', VERSION]);
}

// ---- a service per client: `Server::service_with` ----

/// What `Server::service_with` makes for each client here.
#[interface]
pub trait Tally {
    /// Adds one to this client's count and returns it.
    fn bump(&self) -> u64;
    /// Asks the caller's `Back::times` for `n` times its factor, mid-call, and returns that.
    fn ask_back(&self, n: u64) -> u64;
}

/// What each client serves on its end, for its `Tally` to call it back.
#[interface]
pub trait Back {
    /// `n` times this client's factor.
    fn times(&self, n: u64) -> u64;
}

/// One client's `Tally`: its own count, and that client to call back. Says its client's id
/// on `dropped` when dropped.
struct TallyImpl {
    count: AtomicU64,
    caller: BackClient,
    id: u64,
    dropped: mpsc::Sender<u64>,
}

impl Tally for TallyImpl {
    fn bump(&self) -> u64 {
        self.count.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn ask_back(&self, n: u64) -> u64 {
        self.caller.times(n).unwrap()
    }
}

impl Drop for TallyImpl {
    fn drop(&mut self) {
        let _ = self.dropped.send(self.id);
    }
}

struct Factor(u64);

impl Back for Factor {
    fn times(&self, n: u64) -> u64 {
        n * self.0
    }
}

/// A server of a `Tally` per client, numbered from 1 in the order they connect; each one's
/// id goes to `dropped` when it is dropped.
fn tally_per_client(dropped: mpsc::Sender<u64>) -> Server {
    let made = AtomicU64::new(0);
    Server::new().service_with(move |connection| {
        TallyServer::new(TallyImpl {
            count: AtomicU64::new(0),
            caller: BackClient::new(connection.clone()),
            id: made.fetch_add(1, Ordering::SeqCst) + 1,
            dropped: dropped.clone(),
        })
    })
}

/// A client of `name` that serves `Back` with `factor` on its end, on a thread of its own.
fn tally_client(
    name: &str,
    factor: u64,
) -> (
    TallyClient,
    Connection,
    std::thread::JoinHandle<typed_ipc::Result<()>>,
) {
    let connection = Connection::connect_abstract(name).unwrap();
    let serving = {
        let connection = connection.clone();
        std::thread::spawn(move || connection.serve(BackServer::new(Factor(factor))))
    };
    let tally = TallyClient::new(connection.clone()).with_timeout(HANG_GUARD);
    (tally, connection, serving)
}

#[test]
fn service_with_gives_each_client_a_service_of_its_own_that_calls_it_back() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let name = format!("typed-ipc-per-client-{}", std::process::id());
    let (dropped, drops) = mpsc::channel();
    let serving = tally_per_client(dropped)
        .threads(2)
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    let (a, a_connection, a_serving) = tally_client(&name, 2);
    assert_eq!(a.bump().unwrap(), 1);
    let (b, b_connection, b_serving) = tally_client(&name, 3);
    assert_eq!(a.bump().unwrap(), 2);
    assert_eq!(b.bump().unwrap(), 1, "b counts on its own");
    assert_eq!(a.bump().unwrap(), 3);
    // Each handler calls back its own caller, through the connection it was made with.
    assert_eq!(a.ask_back(5).unwrap(), 10);
    assert_eq!(b.ask_back(5).unwrap(), 15);
    // A client hangs up: its service, which holds a clone of its connection, is dropped.
    let hang_up = |(client, connection, serving): (TallyClient, Connection, _), dropped| {
        connection.close();
        let serving: std::thread::JoinHandle<typed_ipc::Result<()>> = serving;
        serving.join().unwrap().unwrap();
        drop((client, connection));
        assert_eq!(
            drops.recv_timeout(HANG_GUARD),
            Ok(dropped),
            "the service is dropped"
        );
    };
    hang_up((a, a_connection, a_serving), 1);
    // `b` is served on, with its own state.
    assert_eq!(b.bump().unwrap(), 2);
    assert_eq!(b.ask_back(7).unwrap(), 21);
    hang_up((b, b_connection, b_serving), 2);
    serving.shutdown();
    // No cycle connection -> service -> connection kept a socket open.
    before.assert_nothing_new();
}

#[test]
fn serve_with_a_service_per_connection_closes_the_socket_once_the_peer_hangs_up() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (dropped, drops) = mpsc::channel();
    let (ours, theirs) = Connection::pair().unwrap();
    let server = std::thread::spawn(move || tally_per_client(dropped).serve(&ours));
    let back = {
        let theirs = theirs.clone();
        std::thread::spawn(move || theirs.serve(BackServer::new(Factor(4))))
    };
    let tally = TallyClient::new(theirs.clone()).with_timeout(HANG_GUARD);
    assert_eq!(tally.bump().unwrap(), 1);
    assert_eq!(tally.ask_back(3).unwrap(), 12);
    theirs.close();
    back.join().unwrap().unwrap();
    server.join().unwrap().unwrap();
    assert_eq!(drops.recv_timeout(HANG_GUARD), Ok(1));
    drop((tally, theirs));
    // `ours` went with the server's thread: nothing holds the socket any more.
    before.assert_nothing_new();
}

/// A client's `Back` that says when it is called, then answers only once released.
struct GatedBack {
    entered: mpsc::Sender<()>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl Back for GatedBack {
    fn times(&self, n: u64) -> u64 {
        let _ = self.entered.send(());
        let _ = self.release.lock().unwrap().recv();
        n * 2
    }
}

/// A graceful shutdown (`stop_reading`, as `Serving::shutdown` does) lets the calls in
/// flight finish: one whose handler waits for a call back into its client, as a service of
/// `service_with` makes, gets that reply, and then the client its own. (The read side was
/// shut at once: the client's reply could not be read, and the handler's call back failed
/// with `Disconnected` with the client alive and answering.)
#[test]
fn a_call_back_in_flight_when_the_server_stops_reading_is_answered() {
    let _fds = fd_count_lock();
    let before = ipc_fds();
    let (client_end, server_end) = Connection::pair().unwrap();
    let (dropped, _drops) = mpsc::channel();
    let serving = {
        let service = TallyServer::new(TallyImpl {
            count: AtomicU64::new(0),
            caller: BackClient::new(server_end.clone()),
            id: 1,
            dropped,
        });
        let server_end = server_end.clone();
        std::thread::spawn(move || server_end.serve(service))
    };
    let (entered, called_back) = mpsc::channel();
    let (release, gate) = mpsc::channel();
    let back = {
        let service = BackServer::new(GatedBack {
            entered,
            release: Mutex::new(gate),
        });
        let client_end = client_end.clone();
        std::thread::spawn(move || client_end.serve(service))
    };
    let tally = TallyClient::new(client_end.clone()).with_timeout(HANG_GUARD);
    let call = {
        let tally = tally.clone();
        std::thread::spawn(move || tally.ask_back(3))
    };
    called_back.recv_timeout(HANG_GUARD).unwrap(); // the server's handler waits for the client
    server_end.stop_reading();
    drop(server_end);
    release.send(()).unwrap();
    assert_eq!(call.join().unwrap().unwrap(), 6);
    // Then the server hangs up: later calls fail, and both ends end.
    let after = tally.bump();
    assert!(matches!(after, Err(Error::Disconnected)), "{after:?}");
    serving.join().unwrap().unwrap();
    drop(tally);
    client_end.close();
    back.join().unwrap().unwrap();
    drop(client_end);
    assert_eq!(ipc_fds(), before);
}

#[test]
fn serve_panics_on_an_interface_a_service_with_serves_twice() {
    let _fds = fd_count_lock();
    let (ours, _theirs) = Connection::pair().unwrap();
    let (dropped, _drops) = mpsc::channel();
    let server = tally_per_client(dropped.clone()).service_with(move |connection| {
        TallyServer::new(TallyImpl {
            count: AtomicU64::new(0),
            caller: BackClient::new(connection.clone()),
            id: 0,
            dropped: dropped.clone(),
        })
    });
    let panic =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.serve(&ours))).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(
        message.contains("Server::service_with: interface `Tally` is already served"),
        "{message}"
    );
}

#[test]
fn a_listener_whose_service_with_serves_an_interface_twice_says_so_and_stops() {
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-served-twice-{}", std::process::id());
    let (mut server, lines) = start_listener_child(child("child_serves_tally_twice"), &name);
    let (tally, connection, serving) = tally_client(&name, 2);
    assert!(matches!(tally.bump(), Err(Error::Disconnected)));
    wait_for_line(
        &lines,
        // The shared one, added after the one made per client, is the second.
        "stopped accepting clients: Server::service: interface `Tally` is already served",
        HANG_GUARD,
    );
    connection.close();
    serving.join().unwrap().unwrap();
    drop(server.stdin.take()); // the child's cue to check and shut down
    finish_listener_child(server, lines);
}

/// The child of `a_listener_whose_service_with_serves_an_interface_twice_says_so_and_stops`:
/// serves `Tally` twice (once per client, once shared) on the listener the parent names,
/// until its stdin ends; then checks that the listener says why it stopped.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_serves_tally_twice() {
    use std::io::Read;
    let name = std::env::var("TYPED_IPC_TEST_LISTENER").unwrap();
    let (dropped, _drops) = mpsc::channel();
    let (ours, _theirs) = Connection::pair().unwrap();
    let shared = TallyImpl {
        count: AtomicU64::new(0),
        caller: BackClient::new(ours),
        id: 0,
        dropped: dropped.clone(),
    };
    let serving = tally_per_client(dropped)
        .service(TallyServer::new(shared))
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    eprintln!("listening");
    std::io::stdin().read_to_end(&mut Vec::new()).unwrap();
    let why = serving.accepting().unwrap_err().to_string();
    assert!(why.contains("interface `Tally` is already served"), "{why}");
    assert!(
        Connection::connect_abstract(&name).is_err(),
        "new clients are refused"
    );
    serving.shutdown();
}

/// A peer of another wire version that said so and hung up before this end sent anything:
/// the caller's send finds the socket gone, and reports what the peer said, not a bare
/// `Disconnected`; a thread that only sends oneways learns it too.
#[test]
fn a_call_to_a_peer_that_said_its_other_version_and_hung_up_reports_the_version() {
    let _fds = fd_count_lock();
    for oneway in [false, true] {
        let (ours, other) = common::peer_said_another_version();
        // (The timeout only keeps a regression from hanging.)
        let client = LabClient::new(Connection::new(ours)).with_timeout(Duration::from_secs(60));
        let sent = match oneway {
            true => client.count(1),
            false => client.caller_pid().map(drop),
        };
        match sent {
            Err(Error::VersionMismatch { theirs, .. }) => assert_eq!(theirs, other),
            sent => panic!("oneway {oneway}: expected VersionMismatch, got {sent:?}"),
        }
    }
}

/// An end that adds a service but runs no thread to serve it (`add_service` without
/// `Connection::run`), while its peer sends it oneways during a call, fails that call once
/// it holds too many: the error must say how to serve, not only that nothing does. It said
/// "nothing serves them", which a caller that had added the service could not act on.
#[test]
fn requests_past_the_bounds_of_an_end_that_runs_no_service_say_how_to_serve() {
    let _fds = fd_count_lock();
    let (host, worker) = Connection::pair().unwrap();
    host.add_service(LabServer::new(LabImpl::new()));
    let lab = LabImpl::new();
    let serving = {
        let (worker, lab) = (worker.clone(), lab.clone());
        std::thread::spawn(move || worker.serve(LabServer::new(lab)))
    };
    let flood = std::thread::spawn(move || {
        let to_host = LabClient::new(worker);
        // Past the documented bound of 1,024 held requests; the host ends the connection.
        for seq in 0..2_000 {
            if to_host.count(seq).is_err() {
                break;
            }
        }
        lab.released.lock().unwrap().push(1);
        lab.changed.notify_all();
    });
    let result = LabClient::new(host).wait_for(1);
    flood.join().unwrap();
    serving.join().unwrap().unwrap();
    assert!(
        matches!(&result, Err(Error::Malformed(why)) if why.contains("Connection::run")),
        "{result:?}"
    );
}

/// A timeout too long for the clock to add (`Duration::MAX`, or seconds from a config file)
/// means no timeout, as it does for std's `recv_timeout`; it must not panic.
#[test]
fn a_timeout_past_the_clocks_range_waits_as_if_there_were_none() {
    let _fds = fd_count_lock();
    let (a, b) = Connection::pair().unwrap();
    let serving = std::thread::spawn(move || LabServer::new(LabImpl::new()).serve(b));
    let lab = LabClient::new(a).with_timeout(Duration::MAX);
    lab.count(0).unwrap();
    assert!(lab.counted(1).unwrap(), "the oneway, then the call");

    let (x, y) = typed_ipc::Socket::pair().unwrap();
    x.send_timeout(b"hello", &[], Duration::MAX).unwrap();
    assert_eq!(y.recv_timeout(Duration::MAX).unwrap().payload, b"hello");

    drop(lab);
    serving.join().unwrap().unwrap();
}

/// A worker that takes its connection and hangs up, then runs on until killed: an
/// untrusted worker that does not exit when its parent hangs up.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_hangs_up_and_runs_on() {
    drop(worker::connection().unwrap());
    loop {
        std::thread::park();
    }
}

#[test]
fn wait_timeout_gives_up_on_a_worker_that_runs_on_and_reaps_one_that_ends() {
    let _fds = fd_count_lock();
    let before = ipc_fds();
    let (mut child, conn) = Worker::spawn(child("child_hangs_up_and_runs_on")).unwrap();
    // Its hang-up, seen here, says the child has taken its connection and is parking.
    let lab = LabClient::new(conn);
    assert!(matches!(lab.caller_pid(), Err(Error::Disconnected)));
    // It never exits by itself: however short the timeout, the answer is `None`.
    assert_eq!(child.wait_timeout(Duration::from_millis(50)).unwrap(), None);
    assert_eq!(child.try_wait().unwrap(), None, "left running");
    child.kill().unwrap();
    // A hang guard only: a killed child is reaped as soon as it has died.
    let exit = child.wait_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(exit, Some(Exit::Signal(9)));
    assert_eq!(child.wait().unwrap(), Exit::Signal(9), "remembered");
    drop((child, lab));
    assert_eq!(ipc_fds(), before);
}
