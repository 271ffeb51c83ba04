//! A worker whose socket outlives it: a child process started with `Worker::spawn` that
//! speaks the wire itself and sends the parent its own end of the connection (as a request
//! to a parent that serves nothing, which keeps requests with their fds for a service that
//! may come later). The child's death then closes nothing; a process it forked would do the
//! same. The parent must still see it go, whether its `Worker` says it has gone or nothing
//! waits for it: its calls fail with `Disconnected` at once, never wait for a reply from
//! nobody.

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use typed_ipc::worker::{Exit, Worker};
use typed_ipc::{Error, interface};

#[interface]
pub trait Hostile {
    fn ping(&self, n: u64) -> u64;
}

/// The variable that tells the child what to do after sending its socket.
const MODE: &str = "HOSTILE_WORKER_MODE";

/// An envelope as the hostile worker writes it for `Hostile`: `kind` 2 a oneway, 3 a reply.
fn envelope(kind: u8, cookie: u64) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(&0u32.to_le_bytes()); // `ping`
    m.extend_from_slice(&cookie.to_le_bytes());
    m.extend_from_slice(&HOSTILE_INFO.id.to_le_bytes());
    m.extend_from_slice(&HOSTILE_INFO.signature.to_le_bytes());
    m
}

/// The worker: sends its own end of the connection in a oneway (`ping` is no oneway, but a
/// parent that serves nothing cannot tell), then answers the parent's first call; then, in
/// mode `exit`, exits, in mode `hold`, reads on and never answers, until killed, and in mode
/// `die`, exits as soon as it has read the parent's next call.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_sends_its_own_socket() {
    let socket = typed_ipc::worker::socket().unwrap();
    let mut oneway = envelope(2, 0);
    oneway.extend_from_slice(&7u64.to_le_bytes());
    socket.send(&oneway, &[socket.as_fd()]).unwrap();
    let call = socket.recv().unwrap();
    let cookie = u64::from_le_bytes(call.payload[8..16].try_into().unwrap());
    let mut reply = envelope(3, cookie);
    reply.extend_from_slice(&2u64.to_le_bytes());
    socket.send(&reply, &[]).unwrap();
    match std::env::var(MODE).unwrap().as_str() {
        "hold" => loop {
            let _ = socket.recv();
        },
        "die" => {
            let _ = socket.recv();
            std::process::exit(3);
        }
        _ => {}
    }
}

fn worker(mode: &str) -> std::process::Command {
    let mut command = common::child("child_sends_its_own_socket");
    command.env(MODE, mode);
    command
}

/// What the parent's call gets once its worker has gone.
fn assert_gone(result: typed_ipc::Result<u64>) {
    assert!(
        matches!(result, Err(Error::Disconnected)),
        "{result:?} from a worker that has gone"
    );
}

/// A hang guard only: a call to a worker that has gone fails at once.
const GUARD: Duration = Duration::from_secs(60);

#[test]
fn a_worker_seen_to_exit_ends_its_connection_though_its_socket_lives_on() {
    let (mut worker, connection) = Worker::spawn(worker("exit")).unwrap();
    let client = HostileClient::new(connection).with_timeout(GUARD);
    assert_eq!(client.ping(1).unwrap(), 2);
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    assert_gone(client.ping(3));
}

#[test]
fn a_killed_worker_ends_its_connection_though_its_socket_lives_on() {
    let (mut worker, connection) = Worker::spawn(worker("hold")).unwrap();
    let client = HostileClient::new(connection).with_timeout(GUARD);
    // Answered after the oneway with the worker's socket, which the parent now holds.
    assert_eq!(client.ping(1).unwrap(), 2);
    // A call the worker reads and never answers: it waits until the kill ends it.
    let waiting = std::thread::spawn({
        let client = client.clone();
        move || client.ping(2)
    });
    worker.kill().unwrap();
    assert_gone(waiting.join().unwrap());
    assert_gone(client.ping(3));
    assert_eq!(worker.wait().unwrap(), Exit::Signal(9));
}

#[test]
fn a_worker_that_dies_unseen_ends_its_connection_though_its_socket_lives_on() {
    // The `Worker` is kept, but nothing waits for it: its death alone must end the call.
    let (_worker, connection) = Worker::spawn(worker("die")).unwrap();
    let client = HostileClient::new(connection).with_timeout(GUARD);
    assert_eq!(client.ping(1).unwrap(), 2);
    // The worker reads this call and exits without answering it.
    assert_gone(client.ping(2));
    assert_gone(client.ping(3));
}

#[cfg(feature = "tokio")]
mod asynchronous {
    #[typed_ipc::interface]
    pub trait Hostile {
        async fn ping(&self, n: u64) -> u64;
    }
}

/// The async flavour of [`a_worker_seen_to_exit_ends_its_connection_though_its_socket_lives_on`].
#[cfg(feature = "tokio")]
#[test]
fn an_async_worker_seen_to_exit_ends_its_connection_though_its_socket_lives_on() {
    common::current_thread_runtime().block_on(async {
        let (mut worker, connection) = typed_ipc::tokio::worker::spawn(worker("exit")).unwrap();
        let client = asynchronous::HostileClient::new(connection).with_timeout(GUARD);
        assert_eq!(client.ping(1).await.unwrap(), 2);
        let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
        assert_eq!(exit, Exit::Code(0));
        assert_gone(client.ping(3).await);
    });
}

/// The async flavour of [`a_killed_worker_ends_its_connection_though_its_socket_lives_on`].
#[cfg(feature = "tokio")]
#[test]
fn an_async_killed_worker_ends_its_connection_though_its_socket_lives_on() {
    common::current_thread_runtime().block_on(async {
        let (mut worker, connection) = typed_ipc::tokio::worker::spawn(worker("hold")).unwrap();
        let client = asynchronous::HostileClient::new(connection).with_timeout(GUARD);
        // Answered after the oneway with the worker's socket, which the parent now holds.
        assert_eq!(client.ping(1).await.unwrap(), 2);
        let waiting = tokio::spawn({
            let client = client.clone();
            async move { client.ping(2).await }
        });
        worker.kill().unwrap();
        assert_gone(waiting.await.unwrap());
        assert_gone(client.ping(3).await);
        let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
        assert_eq!(exit, Exit::Signal(9));
    });
}

/// [`a_worker_that_dies_unseen_ends_its_connection_though_its_socket_lives_on`], async.
#[cfg(feature = "tokio")]
#[test]
fn an_async_worker_that_dies_unseen_ends_its_connection_though_its_socket_lives_on() {
    common::current_thread_runtime().block_on(async {
        let (_worker, connection) = typed_ipc::tokio::worker::spawn(worker("die")).unwrap();
        let client = asynchronous::HostileClient::new(connection).with_timeout(GUARD);
        assert_eq!(client.ping(1).await.unwrap(), 2);
        assert_gone(client.ping(2).await);
        assert_gone(client.ping(3).await);
    });
}
