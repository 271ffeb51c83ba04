//! Whose line it is: two connections told apart; and how a connection says its end, after a
//! caller holding stderr is answered or once this side stopped reading.

use std::os::fd::AsRawFd;

use typed_ipc::worker::Worker;

use crate::common::child;
use crate::{
    Impl, LabClient, LabServer, assert_ended_once_each, assert_line, name_of, traced_stderr,
};
#[cfg(feature = "tokio")]
use crate::{async_connection, asynchronous, common};

/// A host with two workers calls each once: both calls are #1, of different connections.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_two_workers() {
    let (mut a, to_a) = Worker::spawn(child("child_lab")).unwrap();
    let (mut b, to_b) = Worker::spawn(child("child_lab")).unwrap();
    let (a_client, b_client) = (LabClient::new(to_a), LabClient::new(to_b));
    assert_eq!(a_client.reverse("to a".into()).unwrap(), "a ot");
    assert_eq!(b_client.reverse("to b".into()).unwrap(), "b ot");
    a_client.connection().close();
    b_client.connection().close();
    drop((a_client, b_client));
    a.wait().unwrap();
    b.wait().unwrap();
    eprintln!("workers: {} {}", a.id(), b.id());
}

/// The async flavour of [`child_two_workers`].
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_two_workers_async() {
    common::current_thread_runtime().block_on(async {
        use typed_ipc::tokio::worker::spawn;
        let (mut a, to_a) = spawn(child("child_async_lab")).unwrap();
        let (mut b, to_b) = spawn(child("child_async_lab")).unwrap();
        let a_client = asynchronous::LabClient::new(to_a);
        let b_client = asynchronous::LabClient::new(to_b);
        assert_eq!(a_client.reverse("to a".into()).await.unwrap(), "a ot");
        assert_eq!(b_client.reverse("to b".into()).await.unwrap(), "b ot");
        a_client.connection().close();
        b_client.connection().close();
        drop((a_client, b_client));
        a.wait().unwrap();
        b.wait().unwrap();
        eprintln!("workers: {} {}", a.id(), b.id());
    });
}

/// A host's lines about two workers are told apart: each names its connection, and the
/// worker's pid; each worker's lines name the host.
#[test]
fn the_lines_of_two_connections_are_told_apart() {
    check_two_workers("connections::child_two_workers");
}

/// The same in the async flavour.
#[cfg(feature = "tokio")]
#[test]
fn the_lines_of_two_async_connections_are_told_apart() {
    check_two_workers("connections::child_two_workers_async");
}

fn check_two_workers(scenario: &str) {
    let stderr = traced_stderr(scenario);
    let workers: Vec<&str> = stderr
        .lines()
        .find_map(|l| l.strip_prefix("workers: "))
        .expect("the scenario names its workers")
        .split(' ')
        .collect();
    let named = |want: &str| {
        let line = stderr.lines().find(|l| l.ends_with(want));
        line.and_then(name_of)
            .unwrap_or_else(|| panic!("no {want:?} in:\n{stderr}"))
    };
    let to = [
        r#"-> Call #1 Lab::reverse("to a")"#,
        r#"-> Call #1 Lab::reverse("to b")"#,
    ];
    let [to_a, to_b] = to.map(named);
    assert_ne!(to_a, to_b);
    let host = to_a.split_once(' ').unwrap().0;
    assert_eq!(
        to_b.split_once(' ').unwrap().0,
        host,
        "one process, two connections"
    );
    for (name, worker, reply) in [(to_a, workers[0], "a ot"), (to_b, workers[1], "b ot")] {
        assert!(
            name.ends_with(&format!(" peer {worker}")),
            "{name} is not to {worker}"
        );
        // Every line of the host about this worker names it: the reply, the end.
        for want in [
            "<- Reply #1 (12 bytes, 0 fds)",
            "-- Ended: closed by this side",
        ] {
            let told = format!("typed-ipc[{name}] {want}");
            assert!(
                stderr.lines().any(|l| l == told),
                "no {told:?} in:\n{stderr}"
            );
        }
        // And the worker's lines name the host.
        let said = named(&format!("-> Reply #1 {reply:?}"));
        assert!(said.starts_with(&format!("{worker} ")), "{said}");
        assert!(said.ends_with(&format!(" peer {host}")), "{said}");
    }
    assert_ended_once_each(&stderr);
}

/// A thread that, once a call has come to `peer` (its caller now waits for a reply that never
/// comes), runs `close` and hangs `peer` up.
fn close_once_called(
    peer: typed_ipc::Socket,
    close: impl FnOnce() + Send + 'static,
) -> std::thread::JoinHandle<()> {
    use std::os::fd::AsFd;
    std::thread::spawn(move || {
        let mut request = [0u8; 256];
        let raw = peer.as_fd().as_raw_fd();
        nix::sys::socket::recv(raw, &mut request, nix::sys::socket::MsgFlags::empty()).unwrap();
        close();
    })
}

/// A thread that holds stderr's lock (as `writeln!(io::stderr().lock(), "{:?}", call())`
/// does while the call runs) and waits for a call on a connection that another thread
/// closes: the connection says its end once the lock is let go, and the call returns.
/// Said while the connection's state was locked, or before the call was woken, that line
/// waited for stderr, whose holder waited for the connection: both hung.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_closed_while_its_caller_holds_stderr() {
    let (a, b) = typed_ipc::Socket::pair().unwrap();
    let conn = typed_ipc::Connection::new(a);
    let client = LabClient::new(conn.clone());
    let stderr = std::io::stderr().lock();
    let closer = close_once_called(b, move || conn.close());
    let got = client.reverse("hi".into());
    drop(stderr);
    assert!(
        matches!(got, Err(typed_ipc::Error::Disconnected)),
        "{got:?}"
    );
    closer.join().unwrap();
}

/// [`child_closed_while_its_caller_holds_stderr`], async: the caller holds stderr's lock
/// around `block_on`, and the connection's tasks run on the runtime's workers.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_closed_while_its_async_caller_holds_stderr() {
    let runtime = common::two_worker_runtime();
    let (conn, b) = async_connection(&runtime);
    let client = asynchronous::LabClient::new(conn.clone());
    let stderr = std::io::stderr().lock();
    let closer = close_once_called(b, move || conn.close());
    let got = runtime.block_on(client.reverse("hi".into()));
    drop(stderr);
    assert!(
        matches!(got, Err(typed_ipc::Error::Disconnected)),
        "{got:?}"
    );
    closer.join().unwrap();
}

/// A connection closed while a caller holds stderr's lock says its end once the caller has
/// its answer and lets go: never with the connection's lock held, nor before the caller is
/// woken.
#[test]
fn the_end_is_said_after_a_caller_holding_stderr_is_answered() {
    let stderr = traced_stderr("connections::child_closed_while_its_caller_holds_stderr");
    assert_line(&stderr, "-- Ended: closed by this side");
    assert_ended_once_each(&stderr);
}

/// The same, async.
#[cfg(feature = "tokio")]
#[test]
fn the_end_is_said_after_an_async_caller_holding_stderr_is_answered() {
    let stderr = traced_stderr("connections::child_closed_while_its_async_caller_holds_stderr");
    assert_line(&stderr, "-- Ended: closed by this side");
    assert_ended_once_each(&stderr);
}

/// Serves on a thread, answers one call, then stops reading; serving returns. The client
/// stays until then: its hang-up would end the connection first.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_stopped_reading() {
    let (client, server) = typed_ipc::Connection::pair().unwrap();
    let serving = {
        let server = server.clone();
        std::thread::spawn(move || LabServer::new(Impl).serve(server))
    };
    let client = LabClient::new(client);
    assert_eq!(client.reverse("hi".into()).unwrap(), "ih");
    server.stop_reading();
    serving.join().unwrap().unwrap();
    drop(client);
}

/// [`child_stopped_reading`], async.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_stopped_reading_async() {
    use typed_ipc::tokio::AsyncConnection;
    common::current_thread_runtime().block_on(async {
        let (a, b) = typed_ipc::Socket::pair().unwrap();
        let server = AsyncConnection::new(a).unwrap();
        let client = asynchronous::LabClient::new(AsyncConnection::new(b).unwrap());
        let serving = asynchronous::LabServer::new(asynchronous::Impl).serve(server.clone());
        let calling = async {
            assert_eq!(client.reverse("hi".into()).await.unwrap(), "ih");
            server.stop_reading();
        };
        let (served, ()) = tokio::join!(serving, calling);
        served.unwrap();
    });
}

/// A connection whose reading this side stopped says so, not that the peer went: its reader
/// reads the end of the stream either way.
#[test]
fn a_connection_that_stopped_reading_says_so() {
    let stderr = traced_stderr("connections::child_stopped_reading");
    assert_line(&stderr, "-- Ended: this side stopped reading");
    assert!(!stderr.contains("-- Ended: peer disconnected"), "{stderr}");
}

/// The same, async.
#[cfg(feature = "tokio")]
#[test]
fn an_async_connection_that_stopped_reading_says_so() {
    let stderr = traced_stderr("connections::child_stopped_reading_async");
    assert_line(&stderr, "-- Ended: this side stopped reading");
}
