//! The thumbnailer daemon of `examples/daemon.rs`, run across real processes: the daemon in a
//! process of its own, well-behaved blocking clients in others, one that dies inside the
//! daemon's callback, one that floods it and then stops (never reading again), a client of a
//! uid the daemon refuses, and an async client in this process whose call is in flight when
//! the daemon gets `SIGTERM`. The daemon must answer each as it should, serve on past the
//! bad ones, drain on `SIGTERM` (the call in flight answered), remove its socket file, exit 0,
//! and this process must hold no fd more than it started with.

#![cfg(feature = "tokio")]

mod common;

#[path = "../examples/daemon.rs"]
#[allow(dead_code)]
mod daemon;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use daemon::{DaemonConfig, Size, ThumbError, ThumbnailerClient};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use typed_ipc::Error;
use typed_ipc::shared_buffer::SealedBuffer;
use typed_ipc::tokio::AsyncConnection;

const PATH_VAR: &str = "TYPED_IPC_TEST_DAEMON_PATH";
const UIDS_VAR: &str = "TYPED_IPC_TEST_DAEMON_UIDS";

fn path_from_env() -> PathBuf {
    std::env::var_os(PATH_VAR).expect(PATH_VAR).into()
}

fn my_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

// ---- the child processes: this test binary, re-run ----

#[test]
#[ignore = "run as a child process by other tests"]
fn daemon_process() {
    let uids = std::env::var(UIDS_VAR).expect(UIDS_VAR);
    daemon::run_daemon(DaemonConfig {
        path: path_from_env(),
        allowed_uids: uids.split(',').map(|u| u.parse().unwrap()).collect(),
        stall_limit: Duration::from_millis(500),
    })
    .unwrap();
}

#[test]
#[ignore = "run as a child process by other tests"]
fn client_process() {
    let report = daemon::run_client(&path_from_env(), 3).unwrap();
    assert_eq!(report.whoami.pid as u32, std::process::id());
    assert_eq!(report.whoami.uid, my_uid());
    assert_eq!(report.whoami.calls_here, 1, "a session of its own");
    assert!(report.sealed_correct && report.fd_correct, "{report:?}");
    let expected = 64 * 48;
    assert_eq!(
        report.mismatch,
        ThumbError::SizeMismatch { expected, got: 100 }
    );
    assert!(matches!(report.declined, ThumbError::Declined { .. }));
}

#[test]
#[ignore = "run as a child process by other tests"]
fn vanishing_client_process() {
    daemon::run_vanishing_client(&path_from_env()).unwrap();
}

#[test]
#[ignore = "run as a child process by other tests"]
fn flooding_client_process() {
    daemon::run_flooding_client(&path_from_env(), 10_000).unwrap();
}

// ---- the test ----

/// A daemon process, its stderr line by line.
struct Daemon {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

const GUARD: Duration = Duration::from_secs(60);

fn start_daemon(path: &std::path::Path, uids: &[u32]) -> Daemon {
    let uids: Vec<String> = uids.iter().map(u32::to_string).collect();
    let mut child = common::child("daemon_process")
        .env(PATH_VAR, path)
        .env(UIDS_VAR, uids.join(","))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::stderr_lines(&mut child);
    common::wait_for_line(&lines, "listening", GUARD);
    Daemon { child, lines }
}

impl Daemon {
    fn sigterm(&self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
    }

    /// Waits for the daemon to exit; it must exit 0, having said `stopped`.
    fn exited(mut self) {
        common::wait_for_line(&self.lines, "stopped", GUARD);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the daemon: {status:?}");
        until_closed(self.lines);
    }
}

/// Waits until the thread reading a child's stderr has seen its end and closed the pipe.
fn until_closed(lines: std::sync::mpsc::Receiver<String>) {
    while lines.recv_timeout(GUARD).is_ok() {}
}

fn client(name: &str, path: &std::path::Path) -> Command {
    let mut command = common::child(name);
    command.env(PATH_VAR, path);
    command
}

/// The async client serves `Progress` with an async server, which needs a trait of that
/// flavour: the example's is blocking (its clients are), so this is its async twin, held to
/// it by `the_async_progress_is_the_examples`.
mod asynchronous {
    #[typed_ipc::interface(name = "org.example.Thumbnailer.Progress")]
    pub trait Progress {
        #[oneway]
        async fn progress(&self, job: u64, rows_done: u32, rows: u32);
        async fn proceed(&self, job: u64, pixels: u64) -> bool;
        #[oneway]
        async fn started(&self, job: u64);
    }
}

#[test]
fn the_async_progress_is_the_examples() {
    assert_eq!(asynchronous::PROGRESS_INFO.id, daemon::PROGRESS_INFO.id);
    assert_eq!(
        asynchronous::PROGRESS_INFO.signature,
        daemon::PROGRESS_INFO.signature
    );
}

/// The async client's `Progress`: says when it is asked to let a job proceed, and when a
/// job has started; answers `proceed` only with a permit of `answer`.
struct WatchedProgress {
    reports: AtomicU32,
    started: tokio::sync::Notify,
    asked: tokio::sync::Notify,
    answer: tokio::sync::Semaphore,
}

impl asynchronous::Progress for Arc<WatchedProgress> {
    async fn progress(&self, _job: u64, _rows_done: u32, _rows: u32) {
        self.reports.fetch_add(1, Ordering::SeqCst);
    }
    async fn proceed(&self, _job: u64, _pixels: u64) -> bool {
        self.asked.notify_one();
        self.answer.acquire().await.unwrap().forget();
        true
    }
    async fn started(&self, _job: u64) {
        self.started.notify_one();
    }
}

fn socket_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("typed-ipc-{what}-{}.sock", std::process::id()))
}

#[test]
fn a_thumbnailer_daemon_serves_survives_bad_clients_and_drains_on_sigterm() {
    let _fds = common::fd_count_lock();
    let fds_before = common::ipc_fds();
    let path = socket_path("thumbnailer");
    let daemon = start_daemon(&path, &[my_uid()]);
    let runtime = common::two_worker_runtime();

    // The async client, in this process: it serves its own `Progress` on the connection.
    let progress = Arc::new(WatchedProgress {
        reports: AtomicU32::new(0),
        started: tokio::sync::Notify::new(),
        asked: tokio::sync::Notify::new(),
        answer: tokio::sync::Semaphore::new(1), // for the piped job
    });
    let connection = runtime.block_on(AsyncConnection::connect(&path)).unwrap();
    connection.add_service(asynchronous::ProgressServer::new(progress.clone()));
    let thumbnailer = ThumbnailerClient::new(connection.clone());
    let baseline = runtime.block_on(thumbnailer.status()).unwrap();
    assert_eq!(baseline.clients, 1, "{baseline:?}");

    // Images over what the daemon takes: a sealed buffer is refused on receipt, by the
    // daemon's limits for its clients; a bare fd by the daemon itself, before it reads.
    let huge = daemon::MAX_PIXELS as usize + 1;
    let buffer = typed_ipc::shared_buffer::SharedBuffer::new(huge).unwrap();
    let size = Size {
        width: huge as u32,
        height: 1,
    };
    let refused = runtime.block_on(thumbnailer.thumbnail(buffer.seal().unwrap(), size));
    match refused {
        Err(Error::TooLarge { by_peer: true, .. }) => {}
        other => panic!("not refused by the daemon's limits: {other:?}"),
    }
    let endless = std::fs::File::open("/dev/zero").unwrap();
    let refused = runtime.block_on(thumbnailer.thumbnail_fd(endless, size));
    let max = daemon::MAX_PIXELS;
    let expected = ThumbError::TooLarge {
        pixels: max + 1,
        max,
    };
    assert_eq!(refused.unwrap().unwrap_err(), expected);

    // Three well-behaved blocking clients at once, each in a process of its own.
    let clients: Vec<Child> = (0..3)
        .map(|_| client("client_process", &path).spawn().unwrap())
        .collect();
    for mut c in clients {
        assert!(c.wait().unwrap().success(), "a client failed");
    }

    // One that dies inside the daemon's `proceed` callback.
    let status = client("vanishing_client_process", &path).status().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status:?}");

    // The daemon let go of every departed client: sessions and fds as before.
    let since = Instant::now();
    loop {
        let now = runtime.block_on(thumbnailer.status()).unwrap();
        if now.clients == 1 && now.open_fds == baseline.open_fds {
            break;
        }
        assert!(
            since.elapsed() < GUARD,
            "the daemon keeps what left: {now:?}"
        );
        // Each round is a call to the daemon: nothing to sleep for, and no sleep to tune.
    }

    // One that floods it, then stops for good (SIGSTOP): it never reads its replies again.
    let mut flooder = client("flooding_client_process", &path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let flooder_lines = common::stderr_lines(&mut flooder);
    common::wait_for_line(&flooder_lines, "flooding", GUARD);
    let flooder_pid = Pid::from_raw(flooder.id() as i32);
    kill(flooder_pid, Signal::SIGSTOP).unwrap();
    let status = runtime.block_on(thumbnailer.status()).unwrap();
    assert!(status.notes > 0 && status.clients == 2, "{status:?}");

    // Two calls in flight when SIGTERM comes: the daemon reads one's image from a pipe that
    // this client writes only once the daemon is draining; the other waits in the daemon's
    // call back into this client (`proceed`), answered only then.
    let size = Size {
        width: 16,
        height: 8,
    };
    let pixels = daemon::image(size, 9);
    let (image, mut writer) = std::io::pipe().unwrap();
    let piped = runtime.spawn({
        let thumbnailer = thumbnailer.clone();
        async move { thumbnailer.thumbnail_fd(image, size).await }
    });
    runtime.block_on(progress.asked.notified());
    runtime.block_on(progress.started.notified());
    let sealed = runtime.spawn({
        let thumbnailer = thumbnailer.clone();
        let image = SealedBuffer::copy_from(&pixels).unwrap();
        async move { thumbnailer.thumbnail(image, size).await }
    });
    runtime.block_on(progress.asked.notified());
    daemon.sigterm();
    common::wait_for_line(&daemon.lines, "draining", GUARD);
    std::io::Write::write_all(&mut writer, &pixels).unwrap();
    drop(writer);
    progress.answer.add_permits(1);
    for in_flight in [piped, sealed] {
        let thumb = runtime.block_on(in_flight).unwrap();
        let thumb = thumb.expect("the call in flight is answered");
        let thumb = thumb.expect("a thumbnail");
        assert_eq!(
            (thumb.size, thumb.pixels.as_bytes().to_vec()),
            daemon::halve(&pixels, size)
        );
    }
    assert_eq!(progress.reports.load(Ordering::SeqCst), 8);

    daemon.exited();
    assert!(!path.exists(), "the socket file is removed");
    // The daemon hung up on this client once its call was answered, saying that it shut down:
    // what it had not answered did not run.
    match runtime.block_on(thumbnailer.whoami()) {
        Err(Error::ShutDown) => {}
        other => panic!("{other:?}"),
    }
    kill(flooder_pid, Signal::SIGKILL).unwrap();
    flooder.wait().unwrap();
    until_closed(flooder_lines);
    drop((thumbnailer, connection));
    drop(runtime);
    drop(flooder);
    assert_eq!(common::ipc_fds(), fds_before, "fds leaked");
}

#[test]
fn a_uid_the_daemon_does_not_serve_is_refused_by_name() {
    // It starts processes, whose pipes the other test would count.
    let _fds = common::fd_count_lock();
    let path = socket_path("thumbnailer-refusing");
    let daemon = start_daemon(&path, &[my_uid().wrapping_add(1)]);
    let connection = typed_ipc::Connection::connect(&path).unwrap();
    let thumbnailer = daemon::ThumbnailerBlockingClient::new(connection);
    match thumbnailer.whoami() {
        // Turned away as it connected (`admit`), before any session was made for it.
        Err(Error::Refused(why)) => {
            assert_eq!(why, format!("uid {} may not use the thumbnailer", my_uid()))
        }
        other => panic!("not refused: {other:?}"),
    }
    drop(thumbnailer);
    daemon.sigterm();
    daemon.exited();
    assert!(!path.exists());
}
