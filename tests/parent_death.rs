//! A worker busy in a method when its parent dies: `worker::exit_with_parent` kills it with
//! the parent; without it, it runs on, orphaned (as `Worker`'s docs say). Three processes:
//! this test, a parent it kills with `SIGKILL` (so that nothing of the parent's runs as it
//! ends: no `Worker` drop), and the parent's worker, which never returns from its start.
//! This test reaps the orphaned worker itself (it is its subreaper) and checks how it ended:
//! a worker that merely ended (one that is not stuck after all, or not the test meant) must
//! not pass for one killed with its parent.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Server, interface};

/// What the test asks of the parent process.
#[interface]
pub trait Parent {
    /// Starts a worker that never returns, with or without `exit_with_parent`, keeps it,
    /// and returns its pid.
    fn start_stuck_worker(&self, exit_with_parent: bool) -> u32;
}

/// The parent's workers, kept so that they are not killed by a `Worker`'s drop.
struct Workers(Mutex<Vec<Worker>>);

impl Parent for Workers {
    fn start_stuck_worker(&self, exit_with_parent: bool) -> u32 {
        let mut command = common::child("stuck_worker");
        if exit_with_parent {
            worker::exit_with_parent(&mut command);
        }
        let (stuck, _connection) = Worker::spawn(command).unwrap();
        let pid = stuck.id();
        self.0.lock().unwrap().push(stuck);
        pid
    }
}

/// The parent: serves `Parent` on this thread, which starts the workers and lives until the
/// test kills the process.
#[test]
#[ignore = "run as a child process by other tests"]
fn parent() {
    let server = Server::new().service(ParentServer::new(Workers(Mutex::default())));
    server.serve(&worker::connection().unwrap()).unwrap();
}

/// The worker, as stuck as a worker gets: it never takes its connection, never returns.
#[test]
#[ignore = "run as a child process by other tests"]
fn stuck_worker() {
    loop {
        std::thread::park();
    }
}

/// A hang guard only: a worker killed with its parent is gone long before.
const GUARD: Duration = Duration::from_secs(60);

/// A pidfd for `pid`, which becomes readable once the process has ended.
fn pidfd(pid: u32) -> OwnedFd {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: a non-negative return is a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Whether the process `pidfd` refers to ends within `timeout`.
fn ends_within(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd, which is valid for both.
    let ready = unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as libc::c_int) };
    assert!(ready >= 0, "poll: {}", std::io::Error::last_os_error());
    ready == 1
}

/// Makes this process the reaper of its descendants' orphans: a worker whose parent the test
/// kills becomes a child of this process, which can reap it and learn how it ended.
fn reap_orphans() {
    // SAFETY: prctl takes an option and an integer argument, and touches no memory of ours.
    let set = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
}

/// Reaps the orphan `pidfd` refers to, a child of this process since its parent died
/// ([`reap_orphans`]), once it has ended, and says how it ended.
fn reaped(pidfd: &OwnedFd) -> Exit {
    assert!(ends_within(pidfd, GUARD), "the worker outlived its parent");
    // SAFETY: an all-zero siginfo_t is a valid value for waitid to fill in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let fd = pidfd.as_raw_fd() as libc::id_t;
    // SAFETY: waitid writes one siginfo_t, which `info` is, valid for writes.
    let waited = unsafe { libc::waitid(libc::P_PIDFD, fd, &mut info, libc::WEXITED) };
    assert_eq!(waited, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: waitid filled `info` in for a child that ended, whose status it holds.
    let status = unsafe { info.si_status() };
    match info.si_code {
        libc::CLD_EXITED => Exit::Code(status),
        _ => Exit::Signal(status),
    }
}

/// Starts the parent, has it start a stuck worker, kills the parent and reaps it; returns a
/// pidfd for the worker, whose parent is now gone.
fn orphan_a_stuck_worker(exit_with_parent: bool) -> OwnedFd {
    reap_orphans();
    let (mut parent, connection) = Worker::spawn(common::child("parent")).unwrap();
    // Kept until the parent is reaped: a parent that saw this end hang up would return from
    // `serve` and drop its `Worker`s, killing the stuck worker itself, with `SIGKILL`, before
    // the test's own `SIGKILL` reached it.
    let client = ParentClient::new(connection).with_timeout(GUARD);
    let pid = client.start_stuck_worker(exit_with_parent).unwrap();
    let stuck = pidfd(pid);
    parent.kill().unwrap();
    assert_eq!(parent.wait().unwrap(), Exit::Signal(libc::SIGKILL));
    drop(client);
    stuck
}

#[test]
fn a_worker_started_to_exit_with_its_parent_dies_with_it() {
    let stuck = orphan_a_stuck_worker(true);
    // Killed, by the parent-death signal: nothing else signals it.
    assert_eq!(reaped(&stuck), Exit::Signal(libc::SIGKILL));
}

/// The control: the same worker, started without it, outlives its parent. It is sent
/// `SIGTERM` once its parent is reaped, and must end of that: the kernel sends the
/// parent-death signal as the parent exits, before the parent can be reaped, and a process
/// sent `SIGKILL` takes no other signal (it would end of the `SIGKILL`, however late).
#[test]
fn a_stuck_worker_started_without_it_runs_on_orphaned() {
    let stuck = orphan_a_stuck_worker(false);
    // SAFETY: pidfd_send_signal takes an fd, a signal number, a null siginfo and flags.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            stuck.as_raw_fd(),
            libc::SIGTERM,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    assert_eq!(sent, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(reaped(&stuck), Exit::Signal(libc::SIGTERM));
}
