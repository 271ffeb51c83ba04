//! A worker that reports progress with a `#[oneway]` per item while its parent waits for the
//! call's reply, faster than the parent runs the reports: the parent's product pattern
//! (`stats_ready` during a call). The parent's reader stops reading at the bounds of what it
//! holds (1,024 requests), so the worker's sends wait until the parent has run some, and the
//! call gets its reply once every report before it has been read. Until 2026-12-06 the
//! parent read on past the bounds to look for its reply, and ended the connection at twice
//! them with `Malformed` (the worker saw only `Disconnected`).
//!
//! The parent's first report waits at a gate, so the reports pile up behind it whatever the
//! speeds. The worker sends with a short timeout: when one times out, the parent has stopped
//! reading, and the worker says so on stderr and sends on without one. The test opens the
//! gate once it reads that line. Before the fix the worker never waited: the parent ended the
//! connection first, and the worker's first line said its report failed. Both flavours of
//! the parent; nothing synchronises by sleeping.

mod common;

use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{abort_after, child, lines_of};
use typed_ipc::worker::Worker;

/// Reports a job sends: more than the parent holds (1,024 requests) and its socket buffer
/// holds (a few thousand of these, in 8 MiB), so that the worker's sends wait.
const REPORTS: u32 = 8 * 1024;
/// Bytes in each report: under 1 KiB, so that they go through the socket, not a shared
/// region.
const SIZE: usize = 900;
/// Hang guard: far longer than the test takes.
const GUARD: Duration = Duration::from_secs(120);
/// What the worker says when a report's send waits for the parent to read.
const WAITS: &str = "the parent stopped reading";

#[cfg_attr(feature = "tokio", typed_ipc::interface(async_client))]
#[cfg_attr(not(feature = "tokio"), typed_ipc::interface)]
pub trait Job {
    /// Sends `reports` reports through `Progress::report`, then returns how many it sent.
    fn run(&self, reports: u32) -> Result<u32, String>;
}

#[typed_ipc::interface]
pub trait Progress {
    #[oneway]
    fn report(&self, n: u32, data: Vec<u8>);
}

/// `Progress` as `async fn`s: the same interface on the wire.
#[cfg(feature = "tokio")]
mod asynchronous {
    #[typed_ipc::interface]
    pub trait Progress {
        #[oneway]
        async fn report(&self, n: u32, data: Vec<u8>);
    }
}

/// A report's bytes, which the parent checks.
fn data(n: u32) -> Vec<u8> {
    let mut data = vec![n as u8; SIZE];
    data[..4].copy_from_slice(&n.to_le_bytes());
    data
}

/// The worker's `Job`: reports through `patient` once `hasty` (the same client with a short
/// timeout) has timed out, and says so on stderr the first time.
struct JobImpl {
    hasty: ProgressClient,
    patient: ProgressClient,
}

impl Job for JobImpl {
    fn run(&self, reports: u32) -> Result<u32, String> {
        let mut waited = false;
        for n in 0..reports {
            let sent = match waited {
                true => self.patient.report(n, data(n)),
                false => match self.hasty.report(n, data(n)) {
                    Err(typed_ipc::Error::TimedOut) => {
                        waited = true;
                        eprintln!("{WAITS} at report {n}");
                        self.patient.report(n, data(n))
                    }
                    sent => sent,
                },
            };
            if let Err(e) = sent {
                eprintln!("report {n} failed: {e}");
                return Err(e.to_string());
            }
        }
        Ok(reports)
    }
}

/// The worker: serves `Job` until its parent hangs up.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_reports_progress() {
    let conn = typed_ipc::worker::connection().unwrap();
    let patient = ProgressClient::new(conn.clone());
    let hasty = patient.with_timeout(Duration::from_millis(100));
    JobServer::new(JobImpl { hasty, patient })
        .serve(conn)
        .unwrap();
}

/// The reports the parent has run, in order; whether the gate is open.
#[derive(Default)]
struct Reports {
    state: Mutex<(Vec<u32>, bool)>,
    changed: Condvar,
}

impl Reports {
    fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }

    /// Records report `n`; the first waits for the gate.
    fn record(&self, n: u32, bytes: &[u8]) {
        assert_eq!(bytes, data(n), "report {n}'s bytes");
        let mut state = self.state.lock().unwrap();
        while n == 0 && !state.1 {
            state = self.changed.wait(state).unwrap();
        }
        state.0.push(n);
        self.changed.notify_all();
    }

    /// Waits until the last report has run (the call's reply may be read while the last
    /// reports still wait for the serving thread), and checks that every report ran once, in
    /// the order sent.
    fn check(&self) {
        let mut state = self.state.lock().unwrap();
        while state.0.last() != Some(&(REPORTS - 1)) {
            state = self.changed.wait(state).unwrap();
        }
        assert!(
            state.0.iter().copied().eq(0..REPORTS),
            "reports lost or out of order"
        );
    }
}

#[derive(Clone, Default)]
struct ProgressImpl(Arc<Reports>);

impl Progress for ProgressImpl {
    fn report(&self, n: u32, data: Vec<u8>) {
        self.0.record(n, &data);
    }
}

#[cfg(feature = "tokio")]
impl asynchronous::Progress for ProgressImpl {
    async fn report(&self, n: u32, data: Vec<u8>) {
        // A blocking wait on a runtime thread: the test's runtime has a thread to spare, and
        // the oneways of a connection run one at a time anyway.
        tokio::task::block_in_place(|| self.0.record(n, &data));
    }
}

/// The worker with its stderr piped, and its lines.
fn worker_command() -> std::process::Command {
    let mut command = child("child_reports_progress");
    command.stderr(Stdio::piped());
    command
}

/// Waits for the worker's first line, opens the gate, and checks that the line says that the
/// worker's sends waited.
fn open_once_the_worker_waits(lines: &std::sync::mpsc::Receiver<String>, reports: &Reports) {
    let first = lines
        .recv_timeout(GUARD)
        .expect("the worker says something");
    // Opened before asserting, so that a failure ends the test rather than leave the
    // parent's serving thread (or the runtime's drop) waiting at the gate.
    reports.open();
    assert!(
        first.contains(WAITS),
        "the worker's reports should have waited for the parent to read: {first}"
    );
}

#[test]
fn reports_during_a_call_wait_for_the_parent_to_run_them() {
    let _guard = abort_after("the job's reply", GUARD);
    let (mut worker, conn) = Worker::spawn(worker_command()).unwrap();
    let lines = lines_of(worker.take_stderr().unwrap());
    let progress = ProgressImpl::default();
    // Counted as serving at once: a thread spawned by hand to serve may start only after the
    // job's call has read 1,024 reports, and the call would then end the connection as one
    // nothing serves (seen once in a loaded full run).
    let serving = conn
        .spawn_serve(ProgressServer::new(progress.clone()))
        .unwrap();
    let job = std::thread::spawn({
        let conn = conn.clone();
        move || JobClient::new(conn).run(REPORTS)
    });
    open_once_the_worker_waits(&lines, &progress.0);
    assert_eq!(job.join().unwrap().unwrap(), Ok(REPORTS));
    progress.0.check();
    conn.close();
    serving.join().unwrap().unwrap();
    assert!(worker.wait().unwrap().success());
}

#[cfg(feature = "tokio")]
#[test]
fn reports_during_an_async_call_wait_for_the_parent_to_run_them() {
    let _guard = abort_after("the job's reply", GUARD);
    let runtime = common::two_worker_runtime();
    let _entered = runtime.enter();
    let (mut worker, conn) = typed_ipc::tokio::worker::spawn(worker_command()).unwrap();
    let lines = lines_of(worker.take_stderr().unwrap());
    let progress = ProgressImpl::default();
    conn.add_service(asynchronous::ProgressServer::new(progress.clone()));
    let job = runtime.spawn({
        let conn = conn.clone();
        async move { JobAsyncClient::new(conn).run(REPORTS).await }
    });
    open_once_the_worker_waits(&lines, &progress.0);
    assert_eq!(runtime.block_on(job).unwrap().unwrap(), Ok(REPORTS));
    progress.0.check();
    conn.close();
    let exit = runtime.block_on(typed_ipc::tokio::worker::wait(&mut worker));
    assert!(exit.unwrap().success());
}
