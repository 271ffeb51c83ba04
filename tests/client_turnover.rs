//! Waiting for a listening server's clients to come and go (`Serving::wait_until_clients`,
//! `AsyncServing::wait_until_clients`), in both flavours: each client is another process
//! (this test binary run again for one `#[ignore]`d test, `child_*`), one leaving on its own
//! and one killed; once the count says they are gone, the server holds none of their fds. A
//! listener that fails for good ends a wait for a client that can no longer come.
//!
//! Nothing here synchronises by sleeping; the timeouts, and the guard that aborts the process
//! around the waits that have none, only turn a hang into a failure.

mod common;

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{abort_after, child, fd_count_lock, fd_snapshot};
use typed_ipc::{Connection, Error, Listener, Server, current_peer};

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// The abstract name the child connects to.
const NAME_VAR: &str = "TYPED_IPC_TEST_TURNOVER_NAME";

/// What the servers here serve: blocking, and on tokio's blocking pool in the async flavour.
#[cfg_attr(feature = "tokio", typed_ipc::interface(async_server))]
#[cfg_attr(not(feature = "tokio"), typed_ipc::interface)]
pub trait Whom {
    /// The caller's pid as the server saw it.
    fn caller_pid(&self) -> i32;
}

struct WhomImpl;

impl Whom for WhomImpl {
    fn caller_pid(&self) -> i32 {
        current_peer().map_or(-1, |p| p.pid)
    }
}

/// The child: connects to the name its parent gave, checks one call, then stays connected
/// until its standard input is closed.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_calls_then_stays_until_stdin_closes() {
    let name = std::env::var(NAME_VAR).expect(NAME_VAR);
    let client = WhomClient::new(Connection::connect_abstract(&name).unwrap());
    assert_eq!(
        client.with_timeout(HANG_GUARD).caller_pid().unwrap(),
        std::process::id() as i32
    );
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest).unwrap();
}

/// A client process of the server on `name`, connected until its stdin is closed.
fn client_process(name: &str) -> Child {
    child("child_calls_then_stays_until_stdin_closes")
        .env(NAME_VAR, name)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Lets `client` go (closing its stdin) and checks that it left as it should.
fn let_go(mut client: Child) {
    drop(client.stdin.take());
    assert!(client.wait().unwrap().success(), "the client failed");
}

/// Kills `client`, which has no chance to say goodbye.
fn kill(mut client: Child) {
    client.kill().unwrap();
    client.wait().unwrap();
}

/// A second handle on `listener`'s socket, to shut it down behind the server's back: every
/// accept then fails with `EINVAL`, and the server stops accepting for good.
fn same_socket(listener: &impl AsFd) -> OwnedFd {
    listener.as_fd().try_clone_to_owned().unwrap()
}

fn shut_down(socket: &OwnedFd) {
    use nix::sys::socket::{Shutdown, shutdown};
    shutdown(socket.as_raw_fd(), Shutdown::Both).unwrap();
}

#[test]
fn a_blocking_server_is_waited_on_as_clients_come_and_go() {
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-turnover-blocking-{}", std::process::id());
    let listener = Listener::bind_abstract(&name).unwrap();
    let same = same_socket(&listener);
    let serving = Server::new()
        .service(WhomServer::new(WhomImpl))
        .listen(listener)
        .unwrap();
    let before = fd_snapshot();
    assert!(
        !serving.wait_until_clients_timeout(Duration::ZERO, |n| n > 0),
        "a client before any connected"
    );

    let guard = abort_after("the blocking server's clients", HANG_GUARD);
    let first = client_process(&name);
    assert!(serving.wait_until_clients(|n| n == 1));
    let second = client_process(&name);
    assert!(serving.wait_until_clients_timeout(HANG_GUARD, |n| n == 2));
    let_go(first);
    assert!(serving.wait_until_clients_timeout(HANG_GUARD, |n| n == 1));
    kill(second);
    assert!(serving.wait_until_clients_timeout(HANG_GUARD, |n| n == 0));
    // Counted out once the server has let go of them: their sockets are closed.
    before.assert_nothing_new();

    // With no client left and none that can come, a wait for one ends at once.
    shut_down(&same);
    assert!(
        !serving.wait_until_clients(|n| n > 0),
        "a client came although the listener failed"
    );
    assert!(serving.accepting().is_err());
    assert!(serving.wait_until_clients(|n| n == 0));
    drop(guard);
    serving.shutdown();
}

#[cfg(feature = "tokio")]
#[test]
fn an_async_server_is_waited_on_as_clients_come_and_go() {
    use typed_ipc::tokio::{AsyncListener, AsyncServer};

    let _fds = fd_count_lock();
    let name = format!("typed-ipc-turnover-async-{}", std::process::id());
    common::two_worker_runtime().block_on(async {
        let listener = AsyncListener::bind_abstract(&name).unwrap();
        let same = same_socket(listener.listener());
        let serving = AsyncServer::new()
            .service(WhomAsyncServer::new(WhomImpl))
            .listen(listener);
        let before = fd_snapshot();

        let guard = abort_after("the async server's clients", HANG_GUARD);
        let first = client_process(&name);
        assert!(serving.wait_until_clients(|n| n == 1).await);
        let second = client_process(&name);
        assert!(within(serving.wait_until_clients(|n| n == 2)).await);
        // The children are waited for off the runtime: its threads serve them meanwhile.
        let_go_off_runtime(first).await;
        assert!(within(serving.wait_until_clients(|n| n == 1)).await);
        kill(second);
        assert!(within(serving.wait_until_clients(|n| n == 0)).await);
        before.assert_nothing_new();

        shut_down(&same);
        assert!(
            !serving.wait_until_clients(|n| n > 0).await,
            "a client came although the listener failed"
        );
        assert!(serving.accepting().is_err());
        drop(guard);
        serving.shutdown().await;
    });
}

#[cfg(feature = "tokio")]
async fn let_go_off_runtime(client: Child) {
    tokio::task::spawn_blocking(move || let_go(client))
        .await
        .unwrap();
}

/// `wait`'s answer, failing the test if it hangs.
#[cfg(feature = "tokio")]
async fn within(wait: impl std::future::Future<Output = bool>) -> bool {
    tokio::time::timeout(HANG_GUARD, wait)
        .await
        .expect("the wait hung")
}

#[test]
fn a_wait_holds_up_no_client_whose_thread_cannot_start() {
    use std::io::Write;
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-turnover-no-thread-{}", std::process::id());
    let mut command = child("child_waits_for_clients_at_a_low_memory_limit");
    common::with_huge_thread_stacks(&mut command);
    let (mut server, lines) = common::start_listener_child(command, &name);
    // The child is inside its wait's `until` now. This client's first thread starts, its
    // second cannot: the acceptor, holding the client list, used to drop the client's
    // `Leaving` there and block on the lock the wait then held while `until` ran, while the
    // wait, once `until` returned, blocked on the list.
    common::wait_for_line(&lines, "asked", HANG_GUARD);
    let first = Connection::connect_abstract(&name).unwrap();
    common::wait_for_line(&lines, "cannot start a thread for a client", HANG_GUARD);
    drop(first);
    let mut stdin = server.stdin.take().unwrap();
    stdin.write_all(b"room\n").unwrap(); // the child's cue to lift its limit and return
    common::wait_for_line(&lines, "unlimited", HANG_GUARD);
    let fresh = WhomClient::new(Connection::connect_abstract(&name).unwrap());
    assert_eq!(
        fresh.with_timeout(HANG_GUARD).caller_pid().unwrap(),
        std::process::id() as i32
    );
    common::wait_for_line(&lines, "came", HANG_GUARD);
    drop(fresh);
    drop(stdin); // the child's cue to shut down
    common::finish_listener_child(server, lines);
}

/// The child of `a_wait_holds_up_no_client_whose_thread_cannot_start`: serves `Whom` with
/// two threads a client, with address space for one more thread only, and
/// waits for a client; its `until`, asked first, holds the wait until a line on its stdin,
/// which lifts the limit. Shuts down when its stdin ends. Any panic aborts it.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_waits_for_clients_at_a_low_memory_limit() {
    use std::io::BufRead;
    common::abort_on_panic();
    let _guard = abort_after("the child's wait for clients", HANG_GUARD);
    let name = std::env::var("TYPED_IPC_TEST_LISTENER").unwrap();
    let serving = Server::new()
        .service(WhomServer::new(WhomImpl))
        .threads(2)
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    common::room_for_one_more_thread();
    eprintln!("listening");
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    let mut first = true;
    let came = serving.wait_until_clients(|n| {
        if std::mem::take(&mut first) {
            eprintln!("asked");
            stdin.read_line(&mut line).unwrap();
            common::lift_address_space_limit();
            eprintln!("unlimited");
        }
        n > 0
    });
    assert!(came);
    eprintln!("came");
    while stdin.read_line(&mut line).unwrap() > 0 {}
    serving.accepting().unwrap();
    serving.shutdown();
}

/// A client's `Whom` that asks the server for its clients as it is dropped (a service's
/// `Drop` is the user's code, and may reach the server: its count of clients, its `Debug`),
/// and says on stderr what it heard.
struct AsksTheServerAsItGoes {
    serving: std::sync::Arc<std::sync::Mutex<Option<typed_ipc::Serving>>>,
}

impl Whom for AsksTheServerAsItGoes {
    fn caller_pid(&self) -> i32 {
        current_peer().map_or(-1, |p| p.pid)
    }
}

impl Drop for AsksTheServerAsItGoes {
    fn drop(&mut self) {
        let clients = self.serving.lock().unwrap().as_ref().map(|s| s.clients());
        eprintln!("the server counts {clients:?} clients");
    }
}

#[test]
fn a_service_dropped_as_its_clients_thread_cannot_start_may_ask_the_server_for_its_clients() {
    use std::io::Write;
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-turnover-drop-asks-{}", std::process::id());
    let mut command = child("child_asks_for_its_clients_as_a_service_goes_at_a_low_memory_limit");
    common::with_huge_thread_stacks(&mut command);
    let (mut server, lines) = common::start_listener_child(command, &name);
    // This client's first thread starts, its second cannot: the service made for it is
    // dropped, never served. The acceptor used to drop it holding the client list, and its
    // `Drop`, asking for the clients, waited for that list for good (the child aborts).
    let first = Connection::connect_abstract(&name).unwrap();
    common::wait_for_line(&lines, "the server counts Some(0) clients", HANG_GUARD);
    common::wait_for_line(&lines, "cannot start a thread for a client", HANG_GUARD);
    // Hung up on, though its `make` kept a handle of the connection (as the child's does for
    // its first client): a call fails at once. Left open, the call's request was held for
    // serving threads that never came, and the call waited out its timeout (shorter than the
    // child's guard, whose abort would hang up too).
    let asked = WhomClient::new(first)
        .with_timeout(HANG_GUARD / 4)
        .caller_pid();
    assert!(matches!(asked, Err(Error::Disconnected)), "{asked:?}");
    let mut stdin = server.stdin.take().unwrap();
    stdin.write_all(b"room\n").unwrap(); // the child's cue to lift its limit
    common::wait_for_line(&lines, "unlimited", HANG_GUARD);
    // The listener accepts on, and serves the next client.
    let fresh = WhomClient::new(Connection::connect_abstract(&name).unwrap());
    assert_eq!(
        fresh.with_timeout(HANG_GUARD).caller_pid().unwrap(),
        std::process::id() as i32
    );
    common::wait_for_line(&lines, "accepts clients again", HANG_GUARD);
    // Its service goes as its client does, before the client stops counting.
    drop(fresh);
    common::wait_for_line(&lines, "the server counts Some(1) clients", HANG_GUARD);
    drop(stdin); // the child's cue to shut down
    common::finish_listener_child(server, lines);
}

/// The child of
/// `a_service_dropped_as_its_clients_thread_cannot_start_may_ask_the_server_for_its_clients`:
/// serves a `Whom` of each client's own that asks the server for its clients as it goes
/// ([`AsksTheServerAsItGoes`]), its `make` keeping the first client's connection, with two
/// threads a client, with address space for one more
/// thread only until a line on its stdin lifts the limit. Shuts down when its stdin ends.
/// Any panic aborts it, and so does a hang.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_asks_for_its_clients_as_a_service_goes_at_a_low_memory_limit() {
    use std::io::BufRead;
    common::abort_on_panic();
    // Shorter than the parent's guard, so that the parent sees this child end.
    let _guard = abort_after("the child's listener", HANG_GUARD / 2);
    let name = std::env::var("TYPED_IPC_TEST_LISTENER").unwrap();
    let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
    // The first client's connection, kept by its `make` (to call it later, say).
    let kept = std::sync::OnceLock::new();
    let serving = Server::new()
        .service_with({
            let slot = slot.clone();
            move |connection| {
                let _ = kept.set(connection.clone());
                WhomServer::new(AsksTheServerAsItGoes {
                    serving: slot.clone(),
                })
            }
        })
        .threads(2)
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    *slot.lock().unwrap() = Some(serving);
    common::room_for_one_more_thread();
    eprintln!("listening");
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin.read_line(&mut line).unwrap();
    common::lift_address_space_limit();
    eprintln!("unlimited");
    while stdin.read_line(&mut line).unwrap() > 0 {}
    let serving = slot.lock().unwrap().take().unwrap();
    serving.accepting().unwrap();
    serving.shutdown();
}
