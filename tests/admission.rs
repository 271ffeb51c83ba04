//! `admit` and `max_clients`, in both flavours: a client turned away as it connects is told
//! why (its calls fail with `Error::Refused`), no session is made for it (`service_with`'s
//! `make` never runs), its socket is closed on the server, and the listener serves on. The
//! client turned away by its credentials is another process (this test binary run again for
//! one `#[ignore]`d test, `child_*`), which checks the error it gets itself.
//!
//! Nothing here synchronises by sleeping; the timeouts only turn a hang into a failure.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use common::{child, fd_count_lock, fd_snapshot, open_fds};
use typed_ipc::{Connection, Error, Listener, PeerCredentials, Server, current_peer};

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// The abstract name the child connects to.
const NAME_VAR: &str = "TYPED_IPC_TEST_ADMISSION_NAME";
/// The reason the child expects to be turned away with, `{pid}` standing for its own pid.
const REASON_VAR: &str = "TYPED_IPC_TEST_ADMISSION_REASON";
/// How many clients [`child_connects_calls_and_hangs_up_in_turn`] connects, one after the
/// other: before `max_clients` gave a client that had hung up time to end, about one in four
/// (blocking) or one in two (async) was turned away by a server of one client.
const IN_TURN: usize = 200;
/// Why a server of one client turns a client away.
const AT_LIMIT_OF_ONE: &str = "the server is at its limit of 1 client";

/// What the servers here serve, blocking flavour.
#[typed_ipc::interface]
pub trait Probe {
    /// The caller's pid as the server saw it.
    fn caller_pid(&self) -> i32;
}

/// Counts the sessions `service_with` made.
struct Session;

/// A call that runs on after its client has hung up, for as long as the test likes.
#[typed_ipc::interface]
pub trait Gated {
    /// Says it has started, then runs until the test opens the gate.
    #[oneway]
    fn hold(&self);
}

/// The gate [`Gated::hold`] waits at: it says it has come through `entered`, and waits for
/// `open` to send (or be dropped).
struct Gate {
    entered: mpsc::Sender<()>,
    open: Mutex<mpsc::Receiver<()>>,
}

impl Gated for Gate {
    fn hold(&self) {
        let _ = self.entered.send(());
        let _ = self.open.lock().unwrap().recv();
    }
}

impl Probe for Session {
    fn caller_pid(&self) -> i32 {
        current_peer().map_or(-1, |p| p.pid)
    }
}

fn unique_name(what: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    format!("typed-ipc-admission-{what}-{}-{n}", std::process::id())
}

/// Runs the child, which connects to `name` and expects to be turned away with `reason`.
fn child_turned_away(name: &str, reason: &str) {
    let status = child("child_is_turned_away")
        .env(NAME_VAR, name)
        .env(REASON_VAR, reason)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the child was not turned away as expected"
    );
}

/// The child of the tests that turn a client away by pid: connects, and checks that its
/// calls fail with `Refused` and the reason the parent gave, the second as the first.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_is_turned_away() {
    let name = std::env::var(NAME_VAR).expect(NAME_VAR);
    let reason = std::env::var(REASON_VAR).expect(REASON_VAR);
    let reason = reason.replace("{pid}", &std::process::id().to_string());
    let connection = Connection::connect_abstract(&name).unwrap();
    let probe = ProbeClient::new(connection).with_timeout(HANG_GUARD);
    for _ in 0..2 {
        match probe.caller_pid() {
            Err(Error::Refused(why)) => assert_eq!(why, reason),
            other => panic!("not turned away: {other:?}"),
        }
    }
}

/// The child of the tests of clients one after another: [`IN_TURN`] times, connects, calls
/// and hangs up, and checks that each of its clients is served.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_connects_calls_and_hangs_up_in_turn() {
    let name = std::env::var(NAME_VAR).expect(NAME_VAR);
    for round in 0..IN_TURN {
        let connection = Connection::connect_abstract(&name).unwrap();
        let probe = ProbeClient::new(connection).with_timeout(HANG_GUARD);
        match probe.caller_pid() {
            Ok(pid) => assert_eq!(pid, std::process::id() as i32),
            Err(e) => panic!("client {round} of {IN_TURN} not served: {e:?}"),
        }
        // Its only handle: the socket is closed here, before the next client connects.
        drop(probe);
    }
}

/// Runs the child that connects [`IN_TURN`] clients to `name` one after another.
fn child_connects_in_turn(name: &str) {
    let status = child("child_connects_calls_and_hangs_up_in_turn")
        .env(NAME_VAR, name)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "a client that connected after another had hung up was not served (its stderr says)"
    );
}

/// A server of `Probe` that counts the sessions it makes, and serves this process only.
fn this_process_only(made: &Arc<AtomicUsize>) -> Server {
    let made = made.clone();
    Server::new()
        .service_with(move |_| {
            made.fetch_add(1, Ordering::SeqCst);
            ProbeServer::new(Session)
        })
        .admit(this_process)
}

/// Admits this process only; the reason carries an escape the client must see escaped.
fn this_process(peer: Option<&PeerCredentials>) -> Result<(), String> {
    match peer {
        Some(p) if p.pid as u32 == std::process::id() => Ok(()),
        Some(p) => Err(format!("pid {} is not served\x1b[2J", p.pid)),
        None => Err("no credentials".into()),
    }
}

#[test]
fn a_client_turned_away_by_pid_is_told_why_and_costs_no_session() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let name = unique_name("pid");
    let made = Arc::new(AtomicUsize::new(0));
    let serving = this_process_only(&made)
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    // The peer's reason is escaped, as all its text is.
    child_turned_away(&name, "pid {pid} is not served\\u{1b}[2J");
    assert_eq!(
        made.load(Ordering::SeqCst),
        0,
        "a session for a client turned away"
    );
    let admitted = ProbeClient::new(Connection::connect_abstract(&name).unwrap());
    assert_eq!(admitted.caller_pid().unwrap(), std::process::id() as i32);
    assert_eq!(made.load(Ordering::SeqCst), 1);
    assert_eq!(serving.clients(), 1);
    drop(admitted);
    serving.shutdown();
    before.assert_nothing_new();
}

#[test]
fn an_admit_that_panics_turns_that_client_away_and_the_listener_serves_on() {
    let _fds = fd_count_lock();
    let name = unique_name("panics");
    let made = Arc::new(AtomicUsize::new(0));
    let serving = Server::new()
        .service_with({
            let made = made.clone();
            move |_| {
                made.fetch_add(1, Ordering::SeqCst);
                ProbeServer::new(Session)
            }
        })
        .admit(|peer| match peer {
            Some(p) if p.pid as u32 == std::process::id() => Ok(()),
            _ => panic!("the admission check's own bug"),
        })
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    child_turned_away(&name, "the server's admission check panicked");
    assert!(serving.accepting().is_ok());
    let admitted = ProbeClient::new(Connection::connect_abstract(&name).unwrap());
    assert_eq!(admitted.caller_pid().unwrap(), std::process::id() as i32);
    assert_eq!(made.load(Ordering::SeqCst), 1);
    drop(admitted);
    serving.shutdown();
}

#[test]
fn over_max_clients_a_client_is_told_so_and_a_slot_frees_when_a_client_hangs_up() {
    let _fds = fd_count_lock();
    let name = unique_name("max");
    let made = Arc::new(AtomicUsize::new(0));
    let serving = this_process_only(&made)
        .max_clients(2)
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    let connect =
        || ProbeClient::new(Connection::connect_abstract(&name).unwrap()).with_timeout(HANG_GUARD);
    let first = connect();
    let second = connect();
    assert!(first.caller_pid().is_ok() && second.caller_pid().is_ok());
    // A count, not a snapshot: the fourth client's sockets take the first one's place.
    let before = open_fds();
    // Clients over the limit, none of which ever reads: the listener turns each away without
    // waiting on it (in the kernel's order), and the one after them learns why.
    let silent: Vec<_> = (0..50)
        .map(|_| Connection::connect_abstract(&name).unwrap())
        .collect();
    let third = connect();
    match third.caller_pid() {
        Err(Error::Refused(why)) => assert_eq!(why, "the server is at its limit of 2 clients"),
        other => panic!("a third client served: {other:?}"),
    }
    assert_eq!(
        made.load(Ordering::SeqCst),
        2,
        "sessions for clients turned away"
    );
    drop((silent, third));
    // A slot frees once a client has hung up and its calls have run: the listener, at its
    // limit, gives the first client the time to end.
    drop(first);
    let fourth = connect();
    assert_eq!(fourth.caller_pid().unwrap(), std::process::id() as i32);
    assert_eq!(made.load(Ordering::SeqCst), 3);
    // The server's sockets of the clients turned away are closed: two clients, as before.
    assert_eq!(open_fds(), before, "fds of clients turned away leaked");
    drop((second, fourth));
    serving.shutdown();
}

/// A server of one client serves clients that connect, call and hang up one after another,
/// each of another process: the one before has hung up, and is given the time to end.
#[test]
fn clients_that_hang_up_in_turn_are_each_served_by_a_server_of_one_client() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let name = unique_name("in-turn");
    let serving = Server::new()
        .service(ProbeServer::new(Session))
        .max_clients(1)
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    child_connects_in_turn(&name);
    assert!(serving.accepting().is_ok());
    serving.shutdown();
    before.assert_nothing_new();
}

/// A client that hung up while a call of its runs still counts until the call has run: the
/// next client is turned away (after the grace for the first to end), and a server of one
/// client cannot be had by two by hanging up. Once the call has run, the next one is served.
#[test]
fn a_client_that_hung_up_mid_call_counts_until_its_call_has_run() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let name = unique_name("mid-call");
    let (entered, held) = mpsc::channel();
    let (open, gate) = mpsc::channel();
    let gate = Gate {
        entered,
        open: Mutex::new(gate),
    };
    let serving = Server::new()
        .service(ProbeServer::new(Session))
        .service(GatedServer::new(gate))
        .max_clients(1)
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    // Its only handle, dropped with the statement: the client has hung up once its call has
    // started, which runs on.
    GatedClient::new(Connection::connect_abstract(&name).unwrap())
        .hold()
        .unwrap();
    held.recv_timeout(HANG_GUARD).unwrap();
    child_turned_away(&name, AT_LIMIT_OF_ONE);
    open.send(()).unwrap();
    // The first client's grace was spent on the one turned away: from now until it has ended,
    // a new client is turned away at once.
    assert!(
        serving.wait_until_clients_timeout(HANG_GUARD, |n| n == 0),
        "the first client never ended"
    );
    let next = ProbeClient::new(Connection::connect_abstract(&name).unwrap());
    assert_eq!(next.caller_pid().unwrap(), std::process::id() as i32);
    drop(next);
    serving.shutdown();
    before.assert_nothing_new();
}

#[test]
#[should_panic(expected = "a server must serve a client")]
fn a_server_of_no_clients_is_refused() {
    let _ = Server::new().max_clients(0);
}

#[cfg(feature = "tokio")]
mod asynchronous {
    use super::*;
    use ::tokio::sync::Notify;
    use common::two_worker_runtime;
    use typed_ipc::tokio::{AsyncConnection, AsyncListener, AsyncServer};

    /// [`Probe`], async.
    #[typed_ipc::interface]
    pub trait Probe {
        async fn caller_pid(&self) -> i32;
    }

    impl Probe for Session {
        async fn caller_pid(&self) -> i32 {
            current_peer().map_or(-1, |p| p.pid)
        }
    }

    /// [`Gated`], async.
    #[typed_ipc::interface]
    pub trait Gated {
        /// Says it has started, then runs until the test opens the gate.
        #[oneway]
        async fn hold(&self);
    }

    /// The gate [`Gated::hold`] waits at: it says it has come on `entered`, and waits for
    /// `open`.
    struct Gate {
        entered: Arc<Notify>,
        open: Arc<Notify>,
    }

    impl Gated for Gate {
        async fn hold(&self) {
            self.entered.notify_one();
            self.open.notified().await;
        }
    }

    fn this_process_only(made: &Arc<AtomicUsize>) -> AsyncServer {
        let made = made.clone();
        AsyncServer::new()
            .service_with(move |_| {
                made.fetch_add(1, Ordering::SeqCst);
                ProbeServer::new(Session)
            })
            .admit(super::this_process)
    }

    #[test]
    fn a_client_turned_away_by_pid_is_told_why_and_costs_no_session() {
        let _fds = fd_count_lock();
        let runtime = two_worker_runtime();
        let snap = common::fd_snapshot();
        let name = unique_name("async-pid");
        let made = Arc::new(AtomicUsize::new(0));
        runtime.block_on(async {
            let serving =
                this_process_only(&made).listen(AsyncListener::bind_abstract(&name).unwrap());
            let child = {
                let name = name.clone();
                ::tokio::task::spawn_blocking(move || {
                    child_turned_away(&name, "pid {pid} is not served\\u{1b}[2J")
                })
            };
            child.await.unwrap();
            assert_eq!(
                made.load(Ordering::SeqCst),
                0,
                "a session for a client turned away"
            );
            let connection = AsyncConnection::connect_abstract(&name).await.unwrap();
            let admitted = ProbeClient::new(connection.clone());
            assert_eq!(
                admitted.caller_pid().await.unwrap(),
                std::process::id() as i32
            );
            assert_eq!(made.load(Ordering::SeqCst), 1);
            drop(admitted);
            // Its socket closes with its reader task, on a worker of the runtime: waited for,
            // not raced by the count below (which saw it open in 1 run in 20).
            connection.close();
            connection.wait_closed().await;
            drop(connection);
            serving.shutdown().await;
        });
        snap.assert_nothing_new();
    }

    #[test]
    fn an_admit_that_panics_turns_that_client_away_and_the_listener_serves_on() {
        let _fds = fd_count_lock();
        let runtime = two_worker_runtime();
        let name = unique_name("async-panics");
        runtime.block_on(async {
            let serving = AsyncServer::new()
                .service(ProbeServer::new(Session))
                .admit(|peer| match peer {
                    Some(p) if p.pid as u32 == std::process::id() => Ok(()),
                    _ => panic!("the admission check's own bug"),
                })
                .listen(AsyncListener::bind_abstract(&name).unwrap());
            let child = {
                let name = name.clone();
                ::tokio::task::spawn_blocking(move || {
                    child_turned_away(&name, "the server's admission check panicked")
                })
            };
            child.await.unwrap();
            assert!(serving.accepting().is_ok());
            let connection = AsyncConnection::connect_abstract(&name).await.unwrap();
            let admitted = ProbeClient::new(connection);
            assert_eq!(
                admitted.caller_pid().await.unwrap(),
                std::process::id() as i32
            );
            drop(admitted);
            serving.shutdown().await;
        });
    }

    #[test]
    fn over_max_clients_a_client_is_told_so_and_a_slot_frees_when_a_client_hangs_up() {
        let _fds = fd_count_lock();
        let runtime = two_worker_runtime();
        let name = unique_name("async-max");
        let made = Arc::new(AtomicUsize::new(0));
        runtime.block_on(async {
            let serving = this_process_only(&made)
                .max_clients(2)
                .listen(AsyncListener::bind_abstract(&name).unwrap());
            let connect = || async {
                let connection = AsyncConnection::connect_abstract(&name).await.unwrap();
                ProbeClient::new(connection).with_timeout(HANG_GUARD)
            };
            let first = connect().await;
            let second = connect().await;
            assert!(first.caller_pid().await.is_ok() && second.caller_pid().await.is_ok());
            // A count: the fourth client's sockets take the first one's place.
            let before = open_fds();
            let mut silent = Vec::new();
            for _ in 0..50 {
                silent.push(AsyncConnection::connect_abstract(&name).await.unwrap());
            }
            let third = connect().await;
            match third.caller_pid().await {
                Err(Error::Refused(why)) => {
                    assert_eq!(why, "the server is at its limit of 2 clients")
                }
                other => panic!("a third client served: {other:?}"),
            }
            assert_eq!(
                made.load(Ordering::SeqCst),
                2,
                "sessions for clients turned away"
            );
            // Each client's socket closes with its reader task, on a worker of the runtime:
            // waited for, so that the count below sees only the server's sockets (it saw a
            // client's open in 1 run in 150).
            let gone = silent
                .iter()
                .chain([third.connection(), first.connection()]);
            for connection in gone {
                connection.close();
                connection.wait_closed().await;
            }
            drop((silent, third));
            // No wait for the count: the listener gives the first client the time to end.
            drop(first);
            let fourth = connect().await;
            assert_eq!(
                fourth.caller_pid().await.unwrap(),
                std::process::id() as i32
            );
            assert_eq!(made.load(Ordering::SeqCst), 3);
            assert_eq!(open_fds(), before, "fds of clients turned away leaked");
            drop((second, fourth));
            serving.shutdown().await;
        });
    }

    /// As the blocking flavour's test of that name: each client of the child is served.
    #[test]
    fn clients_that_hang_up_in_turn_are_each_served_by_a_server_of_one_client() {
        let _fds = fd_count_lock();
        let runtime = two_worker_runtime();
        let before = fd_snapshot();
        let name = unique_name("async-in-turn");
        runtime.block_on(async {
            let serving = AsyncServer::new()
                .service(ProbeServer::new(Session))
                .max_clients(1)
                .listen(AsyncListener::bind_abstract(&name).unwrap());
            let child = {
                let name = name.clone();
                ::tokio::task::spawn_blocking(move || child_connects_in_turn(&name))
            };
            child.await.unwrap();
            assert!(serving.accepting().is_ok());
            serving.shutdown().await;
        });
        before.assert_nothing_new();
    }

    /// As the blocking flavour's test of that name: a client that hung up while a call of its
    /// runs counts until the call has run.
    #[test]
    fn a_client_that_hung_up_mid_call_counts_until_its_call_has_run() {
        let _fds = fd_count_lock();
        let runtime = two_worker_runtime();
        let before = fd_snapshot();
        let name = unique_name("async-mid-call");
        let (entered, open) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        runtime.block_on(async {
            let gate = Gate {
                entered: entered.clone(),
                open: open.clone(),
            };
            let serving = AsyncServer::new()
                .service(ProbeServer::new(Session))
                .service(GatedServer::new(gate))
                .max_clients(1)
                .listen(AsyncListener::bind_abstract(&name).unwrap());
            let first = AsyncConnection::connect_abstract(&name).await.unwrap();
            GatedClient::new(first.clone()).hold().await.unwrap();
            entered.notified().await;
            // Hung up, its call still running.
            first.close();
            first.wait_closed().await;
            drop(first);
            let child = {
                let name = name.clone();
                ::tokio::task::spawn_blocking(move || child_turned_away(&name, AT_LIMIT_OF_ONE))
            };
            child.await.unwrap();
            open.notify_one();
            // The first client's grace was spent on the one turned away: from now until it has
            // ended, a new client is turned away at once.
            let ended = serving.wait_until_clients(|n| n == 0);
            assert!(
                matches!(tokio::time::timeout(HANG_GUARD, ended).await, Ok(true)),
                "the first client never ended"
            );
            let connection = AsyncConnection::connect_abstract(&name).await.unwrap();
            let next = ProbeClient::new(connection.clone()).with_timeout(HANG_GUARD);
            assert_eq!(next.caller_pid().await.unwrap(), std::process::id() as i32);
            drop(next);
            // Its socket closes with its reader task: waited for, before the fds are counted.
            connection.close();
            connection.wait_closed().await;
            drop(connection);
            serving.shutdown().await;
        });
        before.assert_nothing_new();
    }
}
