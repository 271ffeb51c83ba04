//! The async listener when accepting fails: out of fds in a child process at a lowered
//! `RLIMIT_NOFILE` (it waits and accepts again), and for good (it says why and serves its
//! clients on). The blocking listener's twins are in `connection.rs`.
//!
//! Nothing here synchronises by sleeping; the timeouts only turn a hang into a failure.

#![cfg(feature = "tokio")]

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use common::{
    check_survives_running_out_of_fds, child, fd_count_lock, fd_snapshot, finish_listener_child,
    leave_room_for_fds, start_listener_child, two_worker_runtime, wait_for_line,
};
use typed_ipc::tokio::{AsyncConnection, AsyncListener, AsyncServer};
use typed_ipc::{Error, current_peer};

/// What the async servers here serve.
#[typed_ipc::interface]
pub trait Whom {
    /// The caller's pid as this side saw it.
    async fn caller_pid(&self) -> i32;
}

struct WhomImpl;

impl Whom for WhomImpl {
    async fn caller_pid(&self) -> i32 {
        current_peer().map_or(-1, |p| p.pid)
    }
}

/// The blocking flavour of [`Whom`], for clients that need no runtime.
mod blocking {
    #[typed_ipc::interface]
    pub trait Whom {
        fn caller_pid(&self) -> i32;
    }
}

/// How many more fds than it has open the child of
/// `an_async_listener_out_of_fds_says_so_and_accepts_again_once_clients_hang_up` may open.
const ROOM: usize = 8;

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(60);

#[test]
fn an_async_listener_out_of_fds_says_so_and_accepts_again_once_clients_hang_up() {
    check_survives_running_out_of_fds("child_serves_async_at_a_low_fd_limit", ROOM, |fresh| {
        let fresh = blocking::WhomClient::new(fresh).with_timeout(HANG_GUARD);
        assert_eq!(fresh.caller_pid().unwrap(), std::process::id() as i32);
    });
}

/// The child of `an_async_listener_out_of_fds_says_so_and_accepts_again_once_clients_hang_up`:
/// serves `Whom` on an async listener named by the parent, with room for [`ROOM`] more fds,
/// until its stdin ends; then checks that the listener still accepts.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_serves_async_at_a_low_fd_limit() {
    use std::io::Read;
    let name = std::env::var("TYPED_IPC_TEST_LISTENER").unwrap();
    // No time driver: the listener's back-off must not need tokio's timer.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .build()
        .unwrap();
    let serving = {
        let _in_runtime = runtime.enter();
        AsyncServer::new()
            .service(WhomServer::new(WhomImpl))
            .listen(AsyncListener::bind_abstract(&name).unwrap())
    };
    leave_room_for_fds(ROOM);
    eprintln!("listening");
    // The runtime's worker threads serve meanwhile.
    std::io::stdin().read_to_end(&mut Vec::new()).unwrap();
    serving.accepting().unwrap();
    runtime.block_on(serving.shutdown());
}

/// A blocking method, served on tokio's blocking pool (`#[interface(async_server)]`).
#[typed_ipc::interface(async_server)]
pub trait Hold {
    /// Says `holding` on stderr, then returns once the child's stdin ends.
    fn hold(&self);
}

/// Opened when the child of
/// `an_async_listener_out_of_fds_accepts_again_while_the_blocking_pool_is_busy` is told to
/// shut down.
static GATE: (std::sync::Mutex<bool>, std::sync::Condvar) =
    (std::sync::Mutex::new(false), std::sync::Condvar::new());

struct Holder;

impl Hold for Holder {
    fn hold(&self) {
        eprintln!("holding");
        let (open, opened) = &GATE;
        drop(
            opened
                .wait_while(open.lock().unwrap(), |open| !*open)
                .unwrap(),
        );
    }
}

/// The listener's back-off after running out of fds waited on tokio's blocking pool, where
/// the methods of a blocking trait run: with every thread of the pool busy in one (a long
/// poll, say), the listener waited for one of them to return before it tried again, and
/// accepted nobody meanwhile, however many fds the clients gone had given back.
#[test]
fn an_async_listener_out_of_fds_accepts_again_while_the_blocking_pool_is_busy() {
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-async-busy-pool-{}", std::process::id());
    let child_name = "child_serves_async_with_a_busy_blocking_pool_at_a_low_fd_limit";
    let (mut server, lines) = start_listener_child(child(child_name), &name);
    let wait_for = |what: &str| wait_for_line(&lines, what, HANG_GUARD);
    // The pool's one thread is taken until the child shuts down.
    let holder = typed_ipc::Connection::connect_abstract(&name).unwrap();
    let holding = std::thread::spawn(move || HoldClient::new(holder).hold());
    wait_for("holding");
    let clients: Vec<_> = (0..3 * ROOM)
        .map(|_| typed_ipc::Connection::connect_abstract(&name).unwrap())
        .collect();
    wait_for("Too many open files");
    drop(clients);
    let fresh = typed_ipc::Connection::connect_abstract(&name).unwrap();
    let fresh = blocking::WhomClient::new(fresh).with_timeout(HANG_GUARD);
    assert_eq!(
        fresh
            .caller_pid()
            .expect("the listener waited for the blocking pool"),
        std::process::id() as i32
    );
    wait_for("accepts clients again");
    drop(server.stdin.take()); // the child's cue to open the gate and shut down
    holding.join().unwrap().unwrap();
    finish_listener_child(server, lines);
}

/// The child of `an_async_listener_out_of_fds_accepts_again_while_the_blocking_pool_is_busy`:
/// serves `Whom` and `Hold` on an async listener named by the parent, on a runtime whose
/// blocking pool has one thread, with room for [`ROOM`] more fds, until its stdin ends.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_serves_async_with_a_busy_blocking_pool_at_a_low_fd_limit() {
    use std::io::Read;
    let name = std::env::var("TYPED_IPC_TEST_LISTENER").unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_io()
        .build()
        .unwrap();
    let serving = {
        let _in_runtime = runtime.enter();
        AsyncServer::new()
            .service(WhomServer::new(WhomImpl))
            .service(HoldAsyncServer::new(Holder))
            .listen(AsyncListener::bind_abstract(&name).unwrap())
    };
    leave_room_for_fds(ROOM);
    eprintln!("listening");
    std::io::stdin().read_to_end(&mut Vec::new()).unwrap();
    *GATE.0.lock().unwrap() = true;
    GATE.1.notify_all();
    serving.accepting().unwrap();
    runtime.block_on(serving.shutdown());
}

#[test]
fn an_async_listener_that_fails_for_good_says_why_and_serves_its_clients_on() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    two_worker_runtime().block_on(async {
        let name = format!("typed-ipc-async-listener-fails-{}", std::process::id());
        let listener = AsyncListener::bind_abstract(&name).unwrap();
        let same_socket = listener.listener().as_fd().try_clone_to_owned().unwrap();
        let serving = AsyncServer::new()
            .service(WhomServer::new(WhomImpl))
            .listen(listener);
        let client = WhomClient::new(AsyncConnection::connect_abstract(&name).await.unwrap());
        assert_eq!(
            client.caller_pid().await.unwrap(),
            std::process::id() as i32
        );
        serving.accepting().unwrap();
        // Shut down behind the server's back, the socket fails every accept with EINVAL.
        nix::sys::socket::shutdown(same_socket.as_raw_fd(), nix::sys::socket::Shutdown::Both)
            .unwrap();
        let since = Instant::now();
        let why = loop {
            match serving.accepting() {
                Ok(()) if since.elapsed() < HANG_GUARD => tokio::task::yield_now().await,
                Ok(()) => panic!("the server never noticed"),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(&why, Error::Io(e) if e.raw_os_error() == Some(libc::EINVAL)),
            "{why:?}"
        );
        // A new client is refused rather than left waiting.
        drop(same_socket);
        assert!(
            AsyncConnection::connect_abstract(&name).await.is_err(),
            "no longer accepting"
        );
        // And the name is free to listen on again, although `serving` lives on.
        drop(AsyncListener::bind_abstract(&name).expect("the name is free again"));
        // The client already connected is still served.
        assert_eq!(
            client.caller_pid().await.unwrap(),
            std::process::id() as i32
        );
        assert_eq!(serving.clients(), 1);
        drop(client);
        serving.shutdown().await;
    });
    before.assert_nothing_new();
}
