//! Worker processes: start a child with one end of a connection, and watch it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::peer_memory::PeerMemory;
use crate::socket::Socket;

/// The fd number the child finds its end of the connection at.
const CHILD_FD: i32 = 3;
/// The environment variable that tells the child where its connection is.
pub const ENV: &str = "TYPED_IPC_FD";

/// A child process started with [`Worker::spawn`], connected to this one.
///
/// The child inherits exactly one extra fd, its end of the connection (at fd 3); every other
/// fd of this process stays close-on-exec. Dropping a `Worker` kills the child and reaps it,
/// so no zombie is left behind; call [`Worker::wait`] to let it finish instead.
#[derive(Debug)]
pub struct Worker {
    child: Child,
    pidfd: Option<OwnedFd>,
    status: Option<ExitStatus>,
}

/// How a worker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status code.
    Code(i32),
    /// A signal ended it (e.g. 9 for `SIGKILL`).
    Signal(i32),
}

impl Worker {
    /// Starts `command` as a worker and returns it with this side's [`Connection`]. In the
    /// child, [`connection`] yields the other side.
    ///
    /// The connection may write large byte strings straight into the child's memory
    /// ([`Connection::write_into_peer`]); a child that serves with [`connection`] accepts
    /// that.
    pub fn spawn(command: Command) -> Result<(Worker, Connection)> {
        let (worker, socket) = Worker::spawn_socket(command)?;
        let connection = Connection::new(socket);
        connection.write_into_peer(worker.memory());
        Ok((worker, connection))
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
        let theirs = OwnedFd::from(theirs);
        let raw = theirs.as_raw_fd();
        command.env(ENV, CHILD_FD.to_string());
        // SAFETY: the closure runs in the child between fork and exec and only calls dup2 and
        // fcntl, which are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
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
        let child = command.spawn()?;
        drop(theirs);
        let pidfd = pidfd_open(child.id());
        Ok((
            Worker {
                child,
                pidfd,
                status: None,
            },
            ours,
        ))
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends `SIGKILL`. Harmless if the child has already exited.
    pub fn kill(&mut self) -> Result<()> {
        if self.status.is_none() {
            self.child.kill()?;
        }
        Ok(())
    }

    /// Waits for the child to end and says how it ended.
    pub fn wait(&mut self) -> Result<Exit> {
        let status = match self.status {
            Some(status) => status,
            None => *self.status.insert(self.child.wait()?),
        };
        Ok(exit_of(status))
    }

    /// How the child ended, if it has; never blocks.
    pub fn try_wait(&mut self) -> Result<Option<Exit>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status.map(exit_of))
    }

    /// A pidfd for the child, where the kernel has them (Linux ≥ 5.3): it becomes readable
    /// when the child exits, so an event loop can watch it alongside its sockets.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|fd| fd.as_fd())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn exit_of(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        (None, None) => Exit::Code(-1),
    }
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative return is a new close-on-exec fd that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// In a process started by [`Worker::spawn`]: this side of the connection. Call it once;
/// later calls, and calls in a process that was not started as a worker, fail.
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

/// [`connection`] for the bare transport, in a process started by [`Worker::spawn_socket`].
pub fn socket() -> Result<Socket> {
    let not_worker = || {
        Error::Io(io::Error::new(
            io::ErrorKind::NotFound,
            format!("not started as a typed-ipc worker (no {ENV} in the environment)"),
        ))
    };
    let raw: i32 = std::env::var(ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(not_worker)?;
    // SAFETY: only reads the fd's flags; fails with EBADF if `raw` is not open.
    if raw < 0 || unsafe { libc::fcntl(raw, libc::F_GETFD) } == -1 {
        return Err(not_worker());
    }
    // SAFETY: the parent left this fd open for us and nothing in this process has claimed
    // it (we forget the variable below, so it is claimed once).
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: set_var/remove_var race with other threads reading the environment; a worker
    // calls this at startup, before it starts threads.
    unsafe { std::env::remove_var(ENV) };
    // Keep it out of anything this worker starts in turn.
    // SAFETY: sets the close-on-exec flag of an fd we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Socket::from_fd(fd)
}
