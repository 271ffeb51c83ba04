//! A panic in a worker, and how to make one end it (docs/guide/workers.md, "When a panic
//! should end the worker"). By default a worker serves on after a panic: a call's caller gets
//! `Panicked`, a oneway's sender hears nothing. A worker whose state is not to be trusted
//! after a panic installs a panic hook that aborts: its parent's calls then fail with
//! `Disconnected` at once, a oneway's panic included, and `Worker::wait` says `SIGABRT`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::{child, fd_count_lock};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Error, interface};

#[interface]
pub trait Jobs {
    /// Adds `n` to the total; panics at 13.
    #[oneway]
    fn add(&self, n: u64);
    /// The total so far; panics if `fail`.
    fn total(&self, fail: bool) -> u64;
}

#[derive(Default)]
struct JobsImpl(AtomicU64);

impl Jobs for JobsImpl {
    fn add(&self, n: u64) {
        assert_ne!(n, 13, "unlucky");
        self.0.fetch_add(n, Ordering::SeqCst);
    }
    fn total(&self, fail: bool) -> u64 {
        assert!(!fail, "asked to fail");
        self.0.load(Ordering::SeqCst)
    }
}

/// The variable that has the worker install the hook.
const ABORT_ON_PANIC: &str = "PANIC_ENDS_WORKER_ABORT";

#[test]
#[ignore = "run as a child process by other tests"]
fn child_jobs() {
    if std::env::var_os(ABORT_ON_PANIC).is_some() {
        // As the guide gives it: std's own hook says what panicked, then the worker ends.
        let said = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |panic| {
            said(panic);
            std::process::abort();
        }));
    }
    let connection = worker::connection().unwrap();
    JobsServer::new(JobsImpl::default())
        .serve(connection)
        .unwrap();
}

fn spawn(abort_on_panic: bool) -> (Worker, JobsClient) {
    let mut command = child("child_jobs");
    if abort_on_panic {
        command.env(ABORT_ON_PANIC, "1");
    }
    let (worker, connection) = Worker::spawn(command).unwrap();
    (worker, JobsClient::new(connection))
}

/// By default the worker serves on: a oneway's panic is not heard by its sender (only the
/// worker's stderr says it), and a call's is `Panicked`.
#[test]
fn by_default_a_worker_serves_on_after_a_panic() {
    let _fds = fd_count_lock();
    let (mut worker, client) = spawn(false);
    client.add(1).unwrap();
    client.add(13).unwrap();
    client.add(2).unwrap();
    assert_eq!(
        client.total(false).unwrap(),
        3,
        "the panicking oneway added nothing"
    );
    let failed = client.total(true);
    assert!(
        matches!(&failed, Err(Error::Panicked(what)) if what.contains("asked to fail")),
        "{failed:?}"
    );
    assert_eq!(client.total(false).unwrap(), 3);
    drop(client);
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
}

/// With the hook, a oneway's panic ends the worker: the next call fails with `Disconnected`
/// at once, not at a timeout, and the worker ended with `SIGABRT`.
#[test]
fn a_worker_whose_panic_hook_aborts_ends_at_a_oneways_panic() {
    let _fds = fd_count_lock();
    let (mut worker, client) = spawn(true);
    client.add(1).unwrap();
    assert_eq!(client.total(false).unwrap(), 1);
    client.add(13).unwrap();
    let after = client.total(false);
    assert!(matches!(after, Err(Error::Disconnected)), "{after:?}");
    assert_eq!(worker.wait().unwrap(), Exit::Signal(libc::SIGABRT));
}

/// With the hook, a call's panic ends the worker too: its caller gets `Disconnected`, not
/// `Panicked`.
#[test]
fn a_worker_whose_panic_hook_aborts_ends_at_a_calls_panic() {
    let _fds = fd_count_lock();
    let (mut worker, client) = spawn(true);
    let failed = client.total(true);
    assert!(matches!(failed, Err(Error::Disconnected)), "{failed:?}");
    assert_eq!(worker.wait().unwrap(), Exit::Signal(libc::SIGABRT));
}
