//! `admit` and `max_clients`, in both flavours: a client turned away as it connects is told
//! why (its calls fail with `Error::Refused`), no session is made for it (`service_with`'s
//! `make` never runs), its socket is closed on the server, and the listener serves on. The
//! client turned away by its credentials is another process (this test binary run again for
//! one `#[ignore]`d test, `child_*`), which checks the error it gets itself.
//!
//! Nothing here synchronises by sleeping; the timeouts only turn a hang into a failure.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{child, fd_count_lock, fd_snapshot, open_fds, wait_until};
use typed_ipc::{Connection, Error, Listener, PeerCredentials, Server, current_peer};

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// The abstract name the child connects to.
const NAME_VAR: &str = "TYPED_IPC_TEST_ADMISSION_NAME";
/// The reason the child expects to be turned away with, `{pid}` standing for its own pid.
const REASON_VAR: &str = "TYPED_IPC_TEST_ADMISSION_REASON";

/// What the servers here serve, blocking flavour.
#[typed_ipc::interface]
pub trait Probe {
    /// The caller's pid as the server saw it.
    fn caller_pid(&self) -> i32;
}

/// Counts the sessions `service_with` made.
struct Session;

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
    // A slot frees once a client has hung up and its calls have run.
    drop(first);
    wait_until("the server has seen the first client hang up", || {
        serving.clients() == 1
    });
    let fourth = connect();
    assert_eq!(fourth.caller_pid().unwrap(), std::process::id() as i32);
    assert_eq!(made.load(Ordering::SeqCst), 3);
    // The server's sockets of the clients turned away are closed: two clients, as before.
    assert_eq!(open_fds(), before, "fds of clients turned away leaked");
    drop((second, fourth));
    serving.shutdown();
}

#[test]
#[should_panic(expected = "a server must serve a client")]
fn a_server_of_no_clients_is_refused() {
    let _ = Server::new().max_clients(0);
}

#[cfg(feature = "tokio")]
mod asynchronous {
    use super::*;
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
            drop(first);
            wait_until("the server has seen the first client hang up", || {
                serving.clients() == 1
            });
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
}
