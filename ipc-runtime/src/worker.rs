//! Worker processes: start a child with one end of a connection, and watch it.
//!
//! [`Worker::spawn`] hands the child its end of the connection at fd 3 and says so in the
//! environment variable [`ENV`], whose value names the fd and the socket on it:
//! `TYPED_IPC_FD=3:<inode>`, the socket's inode number. [`connection`] and [`socket`] in the
//! child take the fd only if it is that very socket (an `AF_UNIX` `SOCK_SEQPACKET` socket with
//! that inode), and only once per process. They never change the environment, so they may be
//! called at any time, from any thread (inside `#[tokio::main]`, say).
//!
//! The variable stays in the worker's environment, so processes the worker starts inherit
//! it. They do not take anything for it: the worker's end of the connection is close-on-exec
//! once taken, so such a process finds another fd 3 or none, and an fd that is not the
//! parent's socket is refused and left alone: it is never closed, whatever it is. The same
//! holds for a stale variable inherited from a shell. (A process the worker starts *before*
//! taking its connection inherits the socket itself, as it inherits any fd that is not
//! close-on-exec; take the connection first.)
//!
//! A worker that sandboxes itself (seccomp, dropped privileges) does so right after
//! [`connection`] returns: [`sandbox::SYSCALLS`] lists the system calls serving makes from
//! then on, and docs/guide/sandboxing.md what fails, and how, if one is refused.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    self as ns, AddressFamily, SockType, SockaddrLike, SockaddrStorage, sockopt,
};
use nix::sys::stat::{SFlag, fstat};

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::frame::Limits;
use crate::peer_memory::PeerMemory;
use crate::socket::{Socket, deadline_after, poll_timeout};

// Numbers for x86_64, whose list the sandbox tests check under a filter, and aarch64, named
// from libc's tables (not built here); the module is absent elsewhere rather than wrong.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub mod sandbox;

/// The fd number the child finds its end of the connection at.
const CHILD_FD: i32 = 3;
/// The environment variable that tells the child where its connection is: `<fd>:<inode>`,
/// the fd number and the inode number of the socket on it (see the [module docs](self)).
pub const ENV: &str = "TYPED_IPC_FD";

/// A child process started with [`Worker::spawn`], connected to this one.
///
/// The child inherits exactly one extra fd, its end of the connection (at fd 3): every other
/// fd above 2 is made close-on-exec in the child before the exec, even one this process left
/// inheritable (an fd it inherited itself, or one a library opened without `O_CLOEXEC`), so
/// fds go to the worker only over the connection. Dropping a `Worker` kills the child and reaps it,
/// so no zombie is left behind; call [`Worker::wait`] to let it finish instead. Keep it
/// while you use the connection: `let (_, connection) = Worker::spawn(command)?` drops it,
/// and kills the child, at once. Nothing kills the child if this process ends without
/// dropping it (killed, or [`std::process::exit`]): an idle worker sees the hang-up and its
/// `serve` returns (so does an async worker busy in a method, once that reaches an `.await`:
/// the hang-up cancels the parent's calls), but a blocking worker busy in a method (stuck,
/// say) runs on, orphaned, unless it was started with [`exit_with_parent`].
///
/// The connection [`Worker::spawn`] (or, async, `tokio::worker::spawn`) returned lives no
/// longer than the child process: once the child exits, or [`Worker::kill`] has signalled
/// it, the connection ends as if the child had hung up, even if the child's end of the socket
/// lives on (in a process the worker forked, or sent back over the connection): callers still
/// waiting get [`Error::Disconnected`] at once, the oneway messages the child sent before
/// still run, in order, and its calls not started are dropped (their replies could go
/// nowhere). A thread of this process, one per worker and asleep on the child's pidfd,
/// sees the exit; it ends once the child has exited, and [`Worker::wait`] and the drop wait
/// for it to let go of its copy of the pidfd, so counting fds after either finds none extra.
/// On kernels without pidfds (Linux < 5.3) there is no such thread, and the death is seen
/// only when the `Worker` is told ([`Worker::kill`], or [`Worker::wait`] and
/// [`Worker::try_wait`] seeing it end or finding it reaped elsewhere) or the socket's last
/// copy is closed. (A socket from [`Worker::spawn_socket`] is left to its owner.)
#[derive(Debug)]
pub struct Worker {
    child: Child,
    pidfd: Option<OwnedFd>,
    /// The kernel has pidfds, but the child was reaped before its pidfd could be opened
    /// (`SIGCHLD` ignored): its pid may be another process's now, so nothing uses it.
    gone: bool,
    /// How the child ended, once this has reaped it.
    exit: Option<Exit>,
    /// Closes the connection [`Worker::spawn`] returned, once the child is gone.
    closer: Option<Closer>,
    /// The thread that closes it as soon as the child exits, until this has reaped it.
    watch: Option<ExitWatch>,
}

/// Kills a worker through its pidfd: [`Worker::killer`]. Clones kill the same worker. Each
/// holds a copy of the pidfd (one fd, shared by its clones) until the last is dropped.
#[derive(Clone, Debug)]
pub struct Killer {
    pidfd: Arc<OwnedFd>,
    /// Ends the worker's connection, as [`Worker::kill`] does.
    closer: Option<Closer>,
}

impl Killer {
    /// Sends `SIGKILL` to the worker and ends its connection at once, as [`Worker::kill`]
    /// does: callers still waiting get [`Error::Disconnected`]. Harmless once the worker has
    /// ended, even reaped: its pidfd reaches no other process. The `Worker` still reaps it
    /// ([`Worker::wait`], or its drop).
    pub fn kill(&self) -> Result<()> {
        if let Some(closer) = &self.closer {
            closer.killing();
        }
        match pidfd_kill(self.pidfd.as_fd()) {
            Err(error) if error.raw_os_error() != Some(libc::ESRCH) => return Err(error.into()),
            _ => {}
        }
        if let Some(closer) = &self.closer {
            closer.close();
        }
        Ok(())
    }
}

/// Closes a connection to a worker once the worker is gone, without keeping it open
/// meanwhile: it holds the connection weakly. Closing twice is harmless, so the `Worker`
/// and the watch on the child's exit each hold one.
#[derive(Clone)]
pub(crate) struct Closer {
    close: Arc<dyn Fn() + Send + Sync>,
    killing: Arc<dyn Fn() + Send + Sync>,
}

impl Closer {
    /// `close` ends the connection; `killing` tells it, before this side kills the worker,
    /// that the hang-up its reader will see is this side's doing (for the traced line saying
    /// why it ended). Told before the kill, since the watch on the child's exit may close the
    /// connection as soon as the signal lands.
    pub(crate) fn new(
        close: impl Fn() + Send + Sync + 'static,
        killing: impl Fn() + Send + Sync + 'static,
    ) -> Closer {
        Closer {
            close: Arc::new(close),
            killing: Arc::new(killing),
        }
    }

    pub(crate) fn close(&self) {
        (self.close)()
    }

    /// This side is about to kill the worker.
    pub(crate) fn killing(&self) {
        (self.killing)()
    }
}

impl std::fmt::Debug for Closer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Closer")
    }
}

/// How a worker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status code.
    Code(i32),
    /// A signal ended it (e.g. 9 for `SIGKILL`).
    Signal(i32),
}

impl Exit {
    /// Whether the worker exited with status 0, as [`std::process::ExitStatus::success`].
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }

    /// The status code it exited with, if it exited rather than was killed by a signal, as
    /// [`std::process::ExitStatus::code`].
    pub fn code(self) -> Option<i32> {
        match self {
            Exit::Code(code) => Some(code),
            Exit::Signal(_) => None,
        }
    }

    /// The signal that ended it, if one did, as
    /// [`std::os::unix::process::ExitStatusExt::signal`].
    pub fn signal(self) -> Option<i32> {
        match self {
            Exit::Code(_) => None,
            Exit::Signal(signal) => Some(signal),
        }
    }
}

/// Written as std writes an `ExitStatus`, with the signal's name: `exit status: 0`,
/// `signal: 6 (SIGABRT)`. `SIGSYS` says what most often sends it to a worker: `signal: 31
/// (SIGSYS: a system call its seccomp filter refuses?)`.
impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Exit::Code(code) => write!(f, "exit status: {code}"),
            Exit::Signal(signal) => match nix::sys::signal::Signal::try_from(signal) {
                // A worker under a filter that kills (`SECCOMP_RET_KILL_PROCESS`), at a call
                // it forgot to allow; nothing else on screen would say so.
                Ok(name @ nix::sys::signal::Signal::SIGSYS) => write!(
                    f,
                    "signal: {signal} ({}: a system call its seccomp filter refuses?)",
                    name.as_str()
                ),
                Ok(name) => write!(f, "signal: {signal} ({})", name.as_str()),
                Err(_) => write!(f, "signal: {signal}"),
            },
        }
    }
}

impl Worker {
    /// Starts `command` as a worker and returns it with this side's [`Connection`]. In the
    /// child, [`connection`] yields the other side.
    ///
    /// The connection may write large byte strings straight into the child's memory
    /// ([`Connection::write_into_peer`]); a child that serves with [`connection`] accepts
    /// that.
    ///
    /// A program that cannot start fails with [`Error::Io`] of the OS error's kind
    /// (`NotFound`, `PermissionDenied`, ...), whose message names the program, and the
    /// command's working directory if it set one (a missing one is `NotFound` too). So does one
    /// whose exit cannot be watched (no thread could start): the child is killed then.
    ///
    /// Calls may go out at once; the worker reads them once it serves. So the first call
    /// waits for the worker's start-up too (its loading and initialisation, and whatever it
    /// does before it serves), and a short timeout on it may end a healthy worker that starts
    /// slowly: give the first call a timeout that allows for that. A worker that exits before
    /// it serves (a wrong argument, a missing library) fails that call with
    /// [`Error::Disconnected`], as any worker that dies; [`Worker::wait`] says how it ended,
    /// and its stderr why.
    pub fn spawn(command: Command) -> Result<(Worker, Connection)> {
        Worker::spawn_with_limits(command, Limits::default())
    }

    /// [`Worker::spawn`], with `limits` on this side's connection: what it accepts from the
    /// worker (a worker you do not trust: [`Limits::max_shared_len`] for the buffers it may
    /// hand you, say), and the most it sends.
    pub fn spawn_with_limits(command: Command, limits: Limits) -> Result<(Worker, Connection)> {
        let (mut worker, mut socket) = Worker::spawn_socket(command)?;
        socket.set_limits(limits);
        let connection = Connection::to(socket, Some(worker.id()));
        connection.write_into_peer(worker.memory());
        worker.closes(connection.closer())?;
        Ok((worker, connection))
    }

    /// Closes the connection `closer` holds once the child is gone (see [`Worker`]): when
    /// this sees it go, and, where the kernel has pidfds, as soon as it exits, which a
    /// thread watches for. Fails if that thread cannot start (dropping the worker then
    /// kills it).
    pub(crate) fn closes(&mut self, closer: Closer) -> Result<()> {
        self.closer = Some(closer.clone());
        if let Some(pidfd) = &self.pidfd {
            let watch = ExitWatch::start(pidfd.try_clone()?, closer)
                .map_err(|e| cannot_watch(self.id(), e))?;
            self.watch = Some(watch);
        }
        Ok(())
    }

    /// This side is about to kill the child: its connection's end is this side's doing.
    fn killing(&self) {
        if let Some(closer) = &self.closer {
            closer.killing();
        }
    }

    /// The child is gone, or as good as gone (killed): its connection ends, whoever else
    /// holds the socket's other end.
    fn gone(&mut self) {
        if let Some(closer) = self.closer.take() {
            closer.close();
        }
    }

    /// The child has ended and been reaped: its connection ends, and once this returns the
    /// watch on its exit has closed its copy of the pidfd, so a process that counts its fds
    /// after a `wait` or a drop finds none left over.
    fn ended(&mut self) {
        self.gone();
        if let Some(watch) = self.watch.take() {
            watch.finished();
        }
    }

    /// The child's memory, to give its connection when it was started with
    /// [`Worker::spawn_socket`] (see [`Connection::write_into_peer`]).
    pub fn memory(&self) -> PeerMemory {
        PeerMemory::of_child(&self.child)
    }

    /// [`Worker::spawn`] for the bare transport: this side's [`Socket`]; in the child,
    /// [`socket`] yields the other side.
    pub fn spawn_socket(mut command: Command) -> Result<(Worker, Socket)> {
        let (ours, theirs) = Socket::pair()?;
        let mut theirs = OwnedFd::from(theirs);
        if theirs.as_raw_fd() < CHILD_FD {
            theirs = above_stdio(&theirs)?;
        }
        let raw = theirs.as_raw_fd();
        // The child's fd 3 is the same open socket, so it has the same inode there.
        let inode = fstat(&theirs)?.st_ino;
        command.env(ENV, format!("{CHILD_FD}:{inode}"));
        // SAFETY: the closure runs in the child between fork and exec and only makes system
        // calls (close_range or getrlimit and fcntl, dup2), which are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                // Whatever this process left inheritable stays here.
                cloexec_above(CHILD_FD)?;
                if raw == CHILD_FD {
                    // Already in place: only clear close-on-exec.
                    if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, CHILD_FD) == -1 {
                    // dup2 leaves the new fd without close-on-exec: the one fd that crosses.
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| cannot_start(&command, e))?;
        drop(theirs);
        let (pidfd, gone) = match child_pidfd(child.id()) {
            Ok(pidfd) => (Some(pidfd), false),
            Err(error) => (None, error.raw_os_error() == Some(libc::ESRCH)),
        };
        Ok((
            Worker {
                child,
                pidfd,
                gone,
                exit: None,
                closer: None,
                watch: None,
            },
            ours,
        ))
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child's standard input, if its command piped it (`Stdio::piped()`), for this
    /// process to write to; `None` if it was not piped, or was taken before. Left here, it
    /// is closed by [`Worker::wait`], as [`Child::wait`] closes it, so that a child that
    /// reads it to the end can exit.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// The child's standard output, if its command piped it, for this process to read: a
    /// child that writes more than the pipe holds waits until it is read. `None` if it was
    /// not piped, or was taken before.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// The child's standard error, as [`Worker::take_stdout`] its standard output.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// A handle that kills the child from anywhere, for a watchdog that does not own this
    /// `Worker` (another thread or task waits for the child's end with it, say). Fails with
    /// an [`Error::Io`] of kind `Unsupported` where the child has no pidfd (see
    /// [`Worker::pidfd`]): only a pidfd cannot reach another process that took its pid.
    pub fn killer(&self) -> Result<Killer> {
        let Some(pidfd) = &self.pidfd else {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("worker {} has no pidfd to kill it through", self.id()),
            )));
        };
        Ok(Killer {
            pidfd: Arc::new(pidfd.try_clone()?),
            closer: self.closer.clone(),
        })
    }

    /// Sends `SIGKILL`. Harmless if the child has already exited, even if something else in
    /// this process has reaped it (`SIGCHLD` ignored, or a `waitpid(-1)`): where the kernel
    /// has pidfds, the signal goes through the child's pidfd, which cannot reach another
    /// process that took its pid since.
    pub fn kill(&mut self) -> Result<()> {
        if self.exit.is_none() {
            self.killing();
            self.send_kill()?;
        }
        self.gone();
        Ok(())
    }

    /// `SIGKILL` for the child, through its pidfd if it has one; a child already gone is no
    /// error.
    fn send_kill(&mut self) -> io::Result<()> {
        let sent = match &self.pidfd {
            Some(pidfd) => pidfd_kill(pidfd.as_fd()),
            None if self.gone => Ok(()),
            // Without a pidfd there is only the pid, which the child may no longer own.
            None => self.child.kill(),
        };
        match sent {
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            sent => sent,
        }
    }

    /// Waits for the child to end and says how it ended.
    ///
    /// Where the kernel can wait on pidfds (Linux ≥ 5.4), it waits through the child's pidfd,
    /// so it never reaps another process that took the child's pid. If something else in
    /// this process reaped the child first (`SIGCHLD` ignored, so that the kernel reaps
    /// children as they exit, or a `waitpid(-1)`), how it ended is lost: this fails at once
    /// with an [`Error::Io`] that says the worker was reaped elsewhere, rather than waiting
    /// for good.
    ///
    /// A piped standard input not taken ([`Worker::take_stdin`]) is closed first, as
    /// [`Child::wait`] does.
    ///
    /// It blocks the calling thread, as [`Worker::wait_timeout`] does: in async code (a worker
    /// from `typed_ipc::tokio::worker::spawn`, which returns this same `Worker`), wait with
    /// `typed_ipc::tokio::worker::wait(&mut worker).await` instead, which blocks no runtime
    /// thread. (`worker.wait().await` does not compile, and the compiler's fix, dropping the
    /// `.await`, blocks the runtime's thread until the worker ends.)
    pub fn wait(&mut self) -> Result<Exit> {
        drop(self.take_stdin());
        match self.exit {
            Some(exit) => Ok(exit),
            None => self.reap(true)?.ok_or_else(|| {
                // A blocking wait only returns once the child has ended.
                Error::Io(io::Error::other(
                    "waitid returned without a child that ended",
                ))
            }),
        }
    }

    /// [`Worker::wait`] for at most `timeout`: how the child ended, or `None` if it is still
    /// running by then (it is left running). A parent that has hung up on a worker it does
    /// not trust waits so, and kills it ([`Worker::kill`]) if it has not gone by then: a
    /// worker that ignores the hang-up would keep [`Worker::wait`] waiting for good.
    ///
    /// Where the kernel has pidfds, it waits on the child's pidfd; elsewhere it checks every
    /// 10 ms. Fails as [`Worker::wait`] does if something else in this process reaped the
    /// child, and closes a piped standard input not taken first, as it does.
    ///
    /// It blocks the calling thread: in async code, wait with
    /// `typed_ipc::tokio::worker::wait_timeout(&mut worker, timeout).await` instead.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<Exit>> {
        drop(self.take_stdin());
        let deadline = deadline_after(timeout);
        loop {
            if let Some(exit) = self.try_wait()? {
                return Ok(Some(exit));
            }
            let Some(poll_timeout) = poll_timeout(deadline) else {
                return Ok(None);
            };
            match &self.pidfd {
                // Readable once the child has exited; `try_wait` then reaps it.
                Some(pidfd) => {
                    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, poll_timeout) {
                        Ok(_) | Err(nix::Error::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// How the child ended, if it has; never blocks. Fails as [`Worker::wait`] does if
    /// something else in this process reaped the child.
    pub fn try_wait(&mut self) -> Result<Option<Exit>> {
        match self.exit {
            Some(exit) => Ok(Some(exit)),
            None => Ok(self.reap(false)?),
        }
    }

    /// Reaps the child once it has ended, waiting for that if `block`, and remembers how it
    /// ended; `None` if it is still running (only without `block`).
    fn reap(&mut self, block: bool) -> io::Result<Option<Exit>> {
        let reaped = match &self.pidfd {
            Some(pidfd) => match pidfd_reap(pidfd.as_fd(), block) {
                // A kernel with pidfds but without waitid(P_PIDFD) (Linux 5.3).
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => self.reap_by_pid(block),
                reaped => reaped,
            },
            None if self.gone => Err(io::Error::from_raw_os_error(libc::ECHILD)),
            // Without a pidfd there is only the pid, which the child may no longer own.
            None => self.reap_by_pid(block),
        };
        match reaped {
            Ok(exit) => {
                self.exit = exit;
                if exit.is_some() {
                    self.ended();
                }
                Ok(exit)
            }
            Err(error) if error.raw_os_error() == Some(libc::ECHILD) => {
                self.ended();
                Err(self.reaped_elsewhere())
            }
            Err(error) => Err(error),
        }
    }

    /// [`Worker::reap`] by the child's pid, where there is no other way.
    #[cold]
    fn reap_by_pid(&mut self, block: bool) -> io::Result<Option<Exit>> {
        if block {
            self.child.wait().map(|status| Some(exit_of(status)))
        } else {
            Ok(self.child.try_wait()?.map(exit_of))
        }
    }

    /// The error for a child that something else in this process reaped.
    #[cold]
    fn reaped_elsewhere(&self) -> io::Error {
        io::Error::other(format!(
            "worker {} was reaped elsewhere in this process (SIGCHLD ignored, or a \
             waitpid(-1)?): how it ended is lost",
            self.id()
        ))
    }

    /// A pidfd for the child, where the kernel has them (Linux ≥ 5.3): it becomes readable
    /// when the child exits, so an event loop can watch it alongside its sockets.
    ///
    /// It is opened just after the child starts (std cannot yet hand one over from the
    /// spawn itself), so a child that exits at once in a process that ignores `SIGCHLD`,
    /// where the kernel reaps it at once, may leave it `None`. Then `kill` does nothing and
    /// `wait` fails at once, saying the worker was reaped elsewhere: its pid may be another
    /// process's by then, so neither uses it. (Without pidfds, both use the pid. Linux 5.3,
    /// which cannot wait on a pidfd, cannot tell either: the pidfd is kept, and may then be
    /// that other process's, and `wait` reaps by the pid.)
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|fd| fd.as_fd())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A child the kill missed may still be running: waiting for it could hang. One reaped
        // elsewhere fails at once (ECHILD); nothing is left to do then.
        if self.exit.is_none() {
            self.killing();
        }
        if self.exit.is_none() && self.send_kill().is_ok() {
            let _ = self.reap(true);
        }
    }
}

/// A thread that closes a worker's connection as soon as the worker exits, whoever else
/// holds the socket's other end (a process the worker forked, say). A thread rather than a
/// task of the async flavour's runtime, so that [`ExitWatch::finished`] can wait for it
/// anywhere, inside a runtime too.
#[derive(Debug)]
struct ExitWatch {
    /// Whether the thread is done: it has closed its pidfd and let go of the connection.
    done: Arc<(Mutex<bool>, Condvar)>,
    thread: std::thread::ThreadId,
}

impl ExitWatch {
    /// Starts the thread, which waits for `pidfd` to become readable (its process has
    /// exited), closes it, then has `closer` close the connection. A failed wait closes
    /// nothing: the child's death is then seen through the socket, as without the watch.
    fn start(pidfd: OwnedFd, closer: Closer) -> io::Result<ExitWatch> {
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = std::thread::Builder::new()
            .name("typed-ipc-worker".into())
            .spawn({
                let done = done.clone();
                move || {
                    let exited = loop {
                        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
                        match poll(&mut fds, PollTimeout::NONE) {
                            Err(nix::Error::EINTR) => continue,
                            polled => break polled.is_ok(),
                        }
                    };
                    drop(pidfd);
                    if exited {
                        // It holds the connection for a moment: a caller that drops its own
                        // handles after a `wait` would otherwise find the socket still open.
                        closer.close();
                    }
                    *done.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
                    done.1.notify_all();
                }
            })?;
        let thread = thread.thread().id();
        Ok(ExitWatch { done, thread })
    }

    /// Waits until the thread is done: at once, once the process has exited. On the thread
    /// itself (the last handle of a connection it closed, dropped there, held the `Worker`),
    /// returns at once: its pidfd is closed by then.
    fn finished(self) {
        if std::thread::current().id() == self.thread {
            return;
        }
        let (done, changed) = &*self.done;
        let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = changed.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The error for a worker whose exit cannot be watched, which is not started.
#[cold]
fn cannot_watch(pid: u32, error: io::Error) -> Error {
    Error::Io(io::Error::new(
        error.kind(),
        format!("cannot start a thread to watch worker {pid}'s exit: {error}"),
    ))
}

/// A copy of `fd` numbered 3 or above: in a process that had closed a standard stream, the
/// socket can land on its number, where the child's stdio setup, which comes before
/// [`CommandExt::pre_exec`], would replace it (with `/dev/null`, say) before it reached fd 3.
#[cold]
fn above_stdio(fd: &OwnedFd) -> io::Result<OwnedFd> {
    let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(CHILD_FD))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Makes every open fd above `fd` close-on-exec. Runs in a forked child before exec, so it
/// only makes async-signal-safe system calls and does not allocate.
fn cloexec_above(fd: RawFd) -> io::Result<()> {
    let first = (fd + 1) as libc::c_uint;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on this process's fds.
    let marked = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if marked == 0 {
        return Ok(());
    }
    // Kernels before 5.11 lack the flag: mark the fds one by one, up to the limit on them.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into `limit`, which is valid for writes.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == -1 {
        return Err(io::Error::last_os_error());
    }
    let end = RawFd::try_from(limit.rlim_cur).unwrap_or(RawFd::MAX);
    for fd in fd + 1..end {
        // SAFETY: F_SETFD only sets the flag of `fd`, or fails with EBADF if it is not open.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

fn exit_of(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        (None, None) => Exit::Code(-1),
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative return is a new close-on-exec fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A pidfd for `pid`, a child this process just started; `ESRCH` if that child is gone,
/// reaped already. Opened after the spawn, it could name a stranger: a child that exited at
/// once in a process that ignores `SIGCHLD` is reaped by the kernel, and its pid may be taken
/// before the open; `kill` and the exit watch would then act on that other process. A
/// `waitid` that leaves the child as it is (`WNOWAIT`) fails with `ECHILD` for a process that
/// is not this one's child. Kept unchecked where the kernel lacks `waitid(P_PIDFD)` (5.3).
fn child_pidfd(pid: u32) -> io::Result<OwnedFd> {
    let pidfd = pidfd_open(pid)?;
    let options = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    match waitid_pidfd(pidfd.as_fd(), options) {
        Err(error) if error.raw_os_error() == Some(libc::ECHILD) => {
            Err(io::Error::from_raw_os_error(libc::ESRCH))
        }
        _ => Ok(pidfd),
    }
}

/// Sends `SIGKILL` to the process `pidfd` refers to; fails with `ESRCH` if it is gone.
fn pidfd_kill(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes an fd, a signal number, a null siginfo (the kernel
    // fills in its own) and flags; it reads no memory of this process.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if sent == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reaps the process `pidfd` refers to, a child of this one, once it has ended, waiting for
/// that if `block`, and says how it ended; `None` if it is still running (only without
/// `block`). Unlike a wait by pid, it cannot reap another child that took the pid after
/// something else in this process reaped this one: it fails with `ECHILD` instead. Fails with
/// `EINVAL` where the kernel lacks `waitid(P_PIDFD)` (Linux 5.3).
fn pidfd_reap(pidfd: BorrowedFd<'_>, block: bool) -> io::Result<Option<Exit>> {
    let options = if block {
        libc::WEXITED
    } else {
        libc::WEXITED | libc::WNOHANG
    };
    let info = waitid_pidfd(pidfd, options)?;
    // SAFETY: waitid succeeded, so `info` is the zeroes or what waitid wrote for a child, a
    // SIGCHLD siginfo, whose pid and status fields these read.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    Ok(match info.si_code {
        _ if pid == 0 => None,
        libc::CLD_EXITED => Some(Exit::Code(status)),
        libc::CLD_KILLED | libc::CLD_DUMPED => Some(Exit::Signal(status)),
        // WEXITED reports nothing else; stay total all the same.
        _ => Some(Exit::Code(-1)),
    })
}

/// `waitid(P_PIDFD, pidfd, ..., options)`, tried again when a signal interrupts it: the
/// `siginfo_t` it filled, or all zeroes (`si_pid` 0) for a child still running under
/// `WNOHANG`.
fn waitid_pidfd(pidfd: BorrowedFd<'_>, options: libc::c_int) -> io::Result<libc::siginfo_t> {
    loop {
        // SAFETY: `siginfo_t` is plain data, for which all zeroes is a valid value. Zeroed
        // afresh for each try: with WNOHANG, a child still running leaves it untouched.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let id = pidfd.as_raw_fd() as libc::id_t;
        // SAFETY: waitid writes only into `info`, which is valid for writes.
        if unsafe { libc::waitid(libc::P_PIDFD, id, &mut info, options) } == 0 {
            return Ok(info);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Makes the process `command` starts die (`SIGKILL`) when the thread that starts it ends,
/// which, from the main thread, is when this process ends, however it ends: a worker busy in
/// a method, or stuck, is not left running orphaned. Works with [`Worker::spawn`] and its
/// siblings (async too), or any `Command`; returns `command`, for chaining.
///
/// ```no_run
/// # use std::process::Command;
/// # use ipc_runtime::worker::{self, Worker};
/// let mut command = Command::new("ipa-plugin");
/// worker::exit_with_parent(&mut command);
/// let (worker, connection) = Worker::spawn(command)?;
/// # Ok::<(), ipc_runtime::Error>(())
/// ```
///
/// It is Linux's parent-death signal (`PR_SET_PDEATHSIG`), whose "parent" is the *thread*
/// that forked: start such workers from the main thread or from one that lives as long as
/// they should, not from a short-lived thread (a pool's, or tokio's blocking pool, whose idle
/// threads end after a while; a tokio runtime thread joins that pool once a task on it calls
/// `block_in_place`), or they die with it. If this process has already died when
/// the child sets it up, the child does not run the program (and the spawn fails): it tells
/// by this process's id, taken now, so call it in the process that spawns `command` (a
/// `command` set up before a `fork` and spawned in the forked process fails with `ESRCH`).
/// The setting survives `exec` of an ordinary program, and the `uid` and `gid` of
/// [`CommandExt`], which std applies before it is set. The kernel clears it whenever the
/// child's user or group IDs change after that: `exec` of a set-user-ID or set-group-ID
/// program or one with file capabilities, a `pre_exec` of yours added after this call that
/// changes them, or a worker that drops privileges itself (`setuid`, `setgid`: such a worker
/// must set it again, with `prctl`). The child may also clear it outright, so it is no
/// containment against a hostile worker: kill one from a process that outlives it.
pub fn exit_with_parent(command: &mut Command) -> &mut Command {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and only makes system
    // calls (prctl, getppid), which are async-signal-safe; it does not allocate.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                return Err(io::Error::last_os_error());
            }
            // This process died before the signal was set up: the child was handed to
            // another parent, and would never get it.
            // (An error made from a message would allocate, which a child forked from a
            // process of several threads must not.)
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    command
}

/// In a process started by [`Worker::spawn`]: this side of the connection. Call it once;
/// later calls, and calls in a process that was not started as a worker, fail.
///
/// It only reads the environment ([`ENV`]), so it may be called from any thread, at any
/// time, e.g. inside `#[tokio::main]`. A process that was not started as a worker, such as
/// one the worker started in turn, gets an error, and whatever fd the variable names is left
/// open (see the [module docs](self)).
///
/// The connection accepts byte strings of 256 KiB to 1 MiB written straight into this
/// process's memory by the parent ([`Connection::accept_writes_from_peer`]), which started
/// this process and may write its memory anyway. For a worker that must not, use
/// `Connection::new(worker::socket()?)`.
pub fn connection() -> Result<Connection> {
    let connection = Connection::new(socket()?);
    // A parent already gone shows on the first call; nothing to report here.
    let _ = connection.accept_writes_from_peer();
    Ok(connection)
}

/// Whether this process has taken its end of the connection from its parent.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// [`connection`] for the bare transport, in a process started by [`Worker::spawn_socket`].
///
/// Takes the fd named by [`ENV`] only if it is the socket the parent made for this process;
/// anything else is an error, and the fd is left open (see the [module docs](self)).
pub fn socket() -> Result<Socket> {
    let not_worker = |why: String| not_found(format!("not started as a typed-ipc worker: {why}"));
    let taken = || not_found("this worker has taken its connection already".into());
    let value =
        std::env::var(ENV).map_err(|_| not_worker(format!("no {ENV} in the environment")))?;
    let (raw, inode) = parse(&value)
        .ok_or_else(|| not_worker(format!("{ENV}={value:?} is not `<fd>:<inode>`")))?;
    if TAKEN.load(Ordering::Acquire) {
        return Err(taken());
    }
    // SAFETY: F_GETFD only reads the flags of whatever `raw` is, and fails with EBADF if it
    // is not open; it changes nothing.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } == -1 {
        return Err(not_worker(format!(
            "{ENV} names fd {raw}, which is not open"
        )));
    }
    // SAFETY: `raw` is open (just checked), and the borrow ends within this function, which
    // only queries it: it neither closes nor changes it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    if !is_the_socket(borrowed, inode) {
        return Err(not_worker(format!(
            "fd {raw} is not the socket {ENV} names (the variable came from another process?); \
             left open"
        )));
    }
    // Another thread may have checked the same fd at the same time: only one takes it.
    if TAKEN
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Err(taken());
    }
    // SAFETY: `raw` is the socket the parent made for this process (the same inode) and left
    // open for it, and nothing in this process has claimed it: `TAKEN` lets it be taken once.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Keep it out of anything this worker starts in turn.
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Socket::from_fd(fd)
}

/// Why `command` did not start, naming its program: std's error alone ("No such file or
/// directory") does not say which, and a host may start several. It names the working
/// directory too if `command` has one: a missing one fails with the same error as a missing
/// program. The kind stays; the OS error number is in the message only.
#[cold]
fn cannot_start(command: &Command, e: io::Error) -> Error {
    let program = command.get_program();
    let message = match command.get_current_dir() {
        Some(dir) => format!("cannot start worker {program:?} in {dir:?}: {e}"),
        None => format!("cannot start worker {program:?}: {e}"),
    };
    Error::Io(io::Error::new(e.kind(), message))
}

fn not_found(message: String) -> Error {
    Error::Io(io::Error::new(io::ErrorKind::NotFound, message))
}

/// The fd and inode number in a value of [`ENV`].
fn parse(value: &str) -> Option<(RawFd, u64)> {
    let (fd, inode) = value.split_once(':')?;
    let fd = fd.parse::<RawFd>().ok().filter(|fd| *fd >= 0)?;
    Some((fd, inode.parse().ok()?))
}

/// Whether `fd` is an `AF_UNIX` `SOCK_SEQPACKET` socket with inode number `inode`.
fn is_the_socket(fd: BorrowedFd<'_>, inode: u64) -> bool {
    let Ok(stat) = fstat(fd) else { return false };
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK
        && stat.st_ino == inode
        && ns::getsockopt(&fd, sockopt::SockType) == Ok(SockType::SeqPacket)
        && ns::getsockname::<SockaddrStorage>(fd.as_raw_fd())
            .is_ok_and(|addr| addr.family() == Some(AddressFamily::Unix))
}

#[cfg(test)]
mod tests {
    use super::{Exit, Worker, child_pidfd, exit_of, parse};
    use crate::Error;

    /// A pidfd opened after the spawn is kept only for a process that is still this one's
    /// child: a pid the kernel gave to another process (this one's parent here, as a stranger
    /// that took a reaped child's pid) gets none, so that nothing is killed through it.
    #[test]
    fn a_pidfd_is_kept_only_for_a_child_of_this_process() {
        let stranger = std::os::unix::process::parent_id();
        let error = child_pidfd(stranger).expect_err("a pidfd for this process's parent");
        assert_eq!(error.raw_os_error(), Some(libc::ESRCH), "{error}");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        assert!(child_pidfd(child.id()).is_ok(), "no pidfd for a child");
        child.wait().unwrap();
    }

    /// A worker that cannot start says which program, keeping the error's kind: a host
    /// starting several plugins learns which one is missing.
    #[test]
    fn a_worker_that_cannot_start_names_its_program() {
        let missing = std::process::Command::new("./no-such-typed-ipc-plugin");
        let Err(Error::Io(e)) = Worker::spawn(missing) else {
            panic!("a missing program started, or failed otherwise");
        };
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        let said = e.to_string();
        assert!(
            said.starts_with("cannot start worker \"./no-such-typed-ipc-plugin\": ")
                && said.contains("No such file or directory"),
            "{said}"
        );
    }

    /// A worker whose working directory is missing fails with the OS error of the `chdir`
    /// (`NotFound`), which alone reads as a missing program: the message names the directory
    /// too, in both flavours.
    #[test]
    fn a_worker_that_cannot_start_in_its_directory_names_the_directory() {
        let in_missing_dir = || {
            let mut command = std::process::Command::new("true");
            command.current_dir("/no-such-typed-ipc-dir");
            command
        };
        let check = |error: Error| {
            let Error::Io(e) = error else {
                panic!("failed otherwise: {error}");
            };
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
            let said = e.to_string();
            assert!(
                said.starts_with("cannot start worker \"true\" in \"/no-such-typed-ipc-dir\": "),
                "{said}"
            );
        };
        check(Worker::spawn(in_missing_dir()).expect_err("started in a missing directory"));
        #[cfg(feature = "tokio")]
        {
            let runtime = ::tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let spawned = runtime.block_on(async { crate::tokio::worker::spawn(in_missing_dir()) });
            check(spawned.expect_err("started in a missing directory"));
        }
    }

    #[test]
    fn an_exit_reads_as_std_writes_an_exit_status() {
        assert_eq!(Exit::Code(0).to_string(), "exit status: 0");
        assert_eq!(Exit::Signal(6).to_string(), "signal: 6 (SIGABRT)");
        assert_eq!(Exit::Signal(200).to_string(), "signal: 200");
        assert_eq!(
            Exit::Signal(libc::SIGSYS).to_string(),
            format!(
                "signal: {} (SIGSYS: a system call its seccomp filter refuses?)",
                libc::SIGSYS
            )
        );
    }

    /// `success`, `code` and `signal` answer as std's `ExitStatus` does for the same ending
    /// (`from_raw` takes a wait status: the code in the second byte, a signal in the first).
    #[test]
    fn an_exit_answers_as_std_s_exit_status() {
        use std::os::unix::process::ExitStatusExt;
        use std::process::ExitStatus;
        for (exit, raw) in [
            (Exit::Code(0), 0),
            (Exit::Code(3), 3 << 8),
            (Exit::Signal(9), 9),
        ] {
            let std = ExitStatus::from_raw(raw);
            assert_eq!(exit_of(std), exit);
            assert_eq!(exit.success(), std.success(), "{exit}");
            assert_eq!(exit.code(), std.code(), "{exit}");
            assert_eq!(exit.signal(), std.signal(), "{exit}");
        }
    }

    #[test]
    fn the_variable_names_an_fd_and_an_inode() {
        assert_eq!(parse("3:123456"), Some((3, 123456)));
        // The old form, a bare fd number, is not the parent's socket.
        assert_eq!(parse("3"), None);
        for bad in ["", ":", "3:", ":1", "-1:5", "3:x", "x:3", "3:5:7", " 3:5"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
