//! A `#[oneway]` message to a worker that has stopped reading gives up after the client's
//! `with_timeout`, instead of waiting for as long as the worker's socket buffer stays full; the
//! connection goes on, and the messages that were sent arrive in order.
//!
//! The worker is this test binary run again for one `#[ignore]`d test (`child_sink`): it serves
//! on one thread, which the parent blocks on a pipe it writes to when it is done filling the
//! socket.

mod common;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::Duration;

use common::child;
use typed_ipc::Error;
use typed_ipc::worker::{self, Exit, Worker};

/// What the worker serves.
#[typed_ipc::interface]
pub trait Sink {
    /// Blocks the serving thread until a byte can be read from `gate`.
    #[oneway]
    fn hold(&self, gate: OwnedFd);
    /// Notes `seq`; `padding` makes the message bigger, so that the socket fills sooner.
    #[oneway]
    fn note(&self, seq: u64, padding: String);
    /// The numbers noted so far, in the order they came.
    fn noted(&self) -> Vec<u64>;
}

#[derive(Default)]
struct Notes(Mutex<Vec<u64>>);

impl Sink for Notes {
    fn hold(&self, gate: OwnedFd) {
        let mut byte = [0u8; 1];
        std::io::Read::read_exact(&mut std::fs::File::from(gate), &mut byte).unwrap();
    }
    fn note(&self, seq: u64, _padding: String) {
        self.0.lock().unwrap().push(seq);
    }
    fn noted(&self) -> Vec<u64> {
        self.0.lock().unwrap().clone()
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_sink() {
    // One serving thread: while it runs `hold`, nobody reads the socket.
    let conn = worker::connection().unwrap();
    SinkServer::new(Notes::default()).serve(conn).unwrap();
}

/// Under a datagram, so that a message that times out was not sent at all.
fn padding() -> String {
    "x".repeat(4096)
}

#[test]
fn a_oneway_to_a_worker_that_stopped_reading_times_out_and_the_connection_goes_on() {
    let (mut child, conn) = Worker::spawn(child("child_sink")).unwrap();
    let sink = SinkClient::new(conn);
    let (gate, open) = nix::unistd::pipe().unwrap();
    sink.hold(gate).unwrap();
    // The worker's only serving thread is in `hold` (or about to be): the socket fills.
    let impatient = sink.with_timeout(Duration::from_millis(100));
    let mut sent = 0u64;
    loop {
        match impatient.note(sent, padding()) {
            Ok(()) => sent += 1,
            Err(Error::TimedOut) => break,
            Err(e) => panic!("note {sent}: {e}"),
        }
        assert!(sent < 1 << 20, "the worker's socket never filled");
    }
    assert!(sent > 0, "the socket was full before the first note");
    assert!(!sink.connection().is_closed());
    // Let the worker go on: what was sent arrives, in order, and the connection still works.
    // Without the timeout from here on: the worker must first take in what filled its socket,
    // which a loaded machine may not do within 100 ms.
    std::fs::File::from(open).write_all(b"!").unwrap();
    sink.note(sent, padding()).unwrap();
    let expected: Vec<u64> = (0..=sent).collect();
    assert_eq!(sink.noted().unwrap(), expected);
    drop((impatient, sink));
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

/// The async flavour's client, against the same blocking worker.
#[cfg(feature = "tokio")]
mod async_client {
    use std::os::fd::OwnedFd;

    /// [`super::Sink`], async: the same interface on the wire.
    #[typed_ipc::interface]
    pub trait Sink {
        #[oneway]
        async fn hold(&self, gate: OwnedFd);
        #[oneway]
        async fn note(&self, seq: u64, padding: String);
        async fn noted(&self) -> Vec<u64>;
    }
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn an_async_oneway_to_a_worker_that_stopped_reading_times_out_and_the_connection_goes_on() {
    use async_client::SinkClient;

    let (mut child, conn) = typed_ipc::tokio::worker::spawn(child("child_sink")).unwrap();
    let sink = SinkClient::new(conn);
    let (gate, open) = nix::unistd::pipe().unwrap();
    sink.hold(gate).await.unwrap();
    let impatient = sink.with_timeout(Duration::from_millis(100));
    let mut sent = 0u64;
    loop {
        match impatient.note(sent, padding()).await {
            Ok(()) => sent += 1,
            Err(Error::TimedOut) => break,
            Err(e) => panic!("note {sent}: {e}"),
        }
        assert!(sent < 1 << 20, "the worker's socket never filled");
    }
    assert!(sent > 0, "the socket was full before the first note");
    assert!(!sink.connection().is_closed());
    // Without the timeout from here on, as in the blocking test.
    std::fs::File::from(open).write_all(b"!").unwrap();
    sink.note(sent, padding()).await.unwrap();
    let expected: Vec<u64> = (0..=sent).collect();
    assert_eq!(sink.noted().await.unwrap(), expected);
    drop((impatient, sink));
    let exit = typed_ipc::tokio::worker::wait(&mut child).await.unwrap();
    assert_eq!(exit, Exit::Code(0));
}
