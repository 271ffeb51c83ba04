//! A worker that exits normally right after sending: its connection ends as its exit is seen
//! (the `Worker`'s watch on the child's pidfd, or a `wait`), yet every request it sent before
//! exiting still runs, in both flavours, however many wait in the socket behind a slow one.
//! And a worker that exited, or was killed, is gone as far as `is_closed` can tell, with
//! nothing reading its connection.
//!
//! Nothing here synchronises by sleeping.

mod common;

use std::sync::{Arc, Condvar, Mutex};

use typed_ipc::worker::{Exit, Worker};

/// Oneways the worker sends before it exits: more than a connection holds before its reader
/// stops reading for room (1024 requests), so that some still wait in the socket when the
/// parent sees the worker exit.
const SENT: u64 = 2000;

#[typed_ipc::interface]
pub trait Sink {
    /// The first blocks until the test releases it, so the rest pile up behind it.
    #[oneway]
    fn put(&self, n: u64);
}

/// What the parent's `put`s have seen.
#[derive(Default)]
struct Puts {
    /// The `n` of each `put` run, in the order they ran; and whether the first is released.
    state: Mutex<(Vec<u64>, bool)>,
    changed: Condvar,
}

impl Puts {
    fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }

    fn ran(&self) -> Vec<u64> {
        self.state.lock().unwrap().0.clone()
    }
}

#[derive(Clone, Default)]
struct SinkImpl(Arc<Puts>);

impl Sink for SinkImpl {
    fn put(&self, n: u64) {
        let mut state = self.0.state.lock().unwrap();
        while n == 0 && !state.1 {
            state = self.0.changed.wait(state).unwrap();
        }
        state.0.push(n);
    }
}

/// The worker: sends `SENT` oneways and exits at once, exit code 0.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_sends_oneways_and_exits() {
    let client = SinkClient::new(typed_ipc::worker::connection().unwrap());
    for n in 0..SENT {
        client.put(n).unwrap();
    }
}

/// The worker: takes its connection and exits at once, exit code 0.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_exits_at_once() {
    drop(typed_ipc::worker::connection().unwrap());
}

/// The worker: serves a `Sink` until killed.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_serves() {
    SinkServer::new(SinkImpl::default())
        .serve(typed_ipc::worker::connection().unwrap())
        .unwrap();
}

/// A host asking whether its worker is gone, with no thread of its reading the connection:
/// until 2026-12-06 the blocking flavour said `false` until a thread read the hang-up.
#[test]
fn a_worker_that_exited_or_was_killed_is_closed_with_nothing_reading() {
    let (mut worker, exited) = Worker::spawn(common::child("child_exits_at_once")).unwrap();
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    assert!(exited.is_closed(), "a worker that exited");

    let (mut worker, killed) = Worker::spawn(common::child("child_serves")).unwrap();
    assert!(!killed.is_closed(), "a worker still serving");
    worker.kill().unwrap();
    assert_eq!(worker.wait().unwrap(), Exit::Signal(9));
    assert!(killed.is_closed(), "a worker killed");
}

/// [`a_worker_that_exited_or_was_killed_is_closed_with_nothing_reading`], async: asked right
/// after the exit is seen, before the connection's reader has run again.
#[cfg(feature = "tokio")]
#[test]
fn an_async_worker_that_exited_or_was_killed_is_closed_before_its_reader_runs() {
    use typed_ipc::tokio::worker;
    common::current_thread_runtime().block_on(async {
        let (mut child, exited) = worker::spawn(common::child("child_exits_at_once")).unwrap();
        assert_eq!(worker::wait(&mut child).await.unwrap(), Exit::Code(0));
        assert!(exited.is_closed(), "a worker that exited");

        let (mut child, killed) = worker::spawn(common::child("child_serves")).unwrap();
        assert!(!killed.is_closed(), "a worker still serving");
        child.kill().unwrap();
        assert_eq!(worker::wait(&mut child).await.unwrap(), Exit::Signal(9));
        assert!(killed.is_closed(), "a worker killed");
    });
}

fn all_sent() -> Vec<u64> {
    (0..SENT).collect()
}

#[test]
fn every_request_a_worker_sent_before_it_exited_runs() {
    let (mut worker, connection) =
        Worker::spawn(common::child("child_sends_oneways_and_exits")).unwrap();
    let puts = SinkImpl::default();
    let serving = std::thread::spawn({
        let puts = puts.clone();
        move || SinkServer::new(puts).serve(connection)
    });
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    puts.0.release();
    serving.join().unwrap().unwrap();
    let ran = puts.0.ran();
    assert_eq!(ran.len(), all_sent().len(), "requests run");
    assert!(ran == all_sent(), "requests run out of order");
}

#[cfg(feature = "tokio")]
mod asynchronous {
    #[typed_ipc::interface]
    pub trait Sink {
        #[oneway]
        async fn put(&self, n: u64);
    }
}

#[cfg(feature = "tokio")]
impl asynchronous::Sink for SinkImpl {
    async fn put(&self, n: u64) {
        // Waits outside the runtime: a worker thread blocked in a task can leave the other
        // one parked away from the IO driver, and then nothing reads (it hung so under load).
        tokio::task::block_in_place(|| Sink::put(self, n));
    }
}

/// [`every_request_a_worker_sent_before_it_exited_runs`], async: the reader, stopped for
/// room behind the slow first `put`, must read on once there is room, not stop for good
/// because the worker's exit ended the connection.
#[cfg(feature = "tokio")]
#[test]
fn every_request_an_async_worker_sent_before_it_exited_runs() {
    common::two_worker_runtime().block_on(async {
        let (mut worker, connection) =
            typed_ipc::tokio::worker::spawn(common::child("child_sends_oneways_and_exits"))
                .unwrap();
        let puts = SinkImpl::default();
        let serving = tokio::spawn(asynchronous::SinkServer::new(puts.clone()).serve(connection));
        let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
        assert_eq!(exit, Exit::Code(0));
        puts.0.release();
        serving.await.unwrap().unwrap();
        let ran = puts.0.ran();
        assert_eq!(ran.len(), all_sent().len(), "requests run");
        assert!(ran == all_sent(), "requests run out of order");
    });
}
