//! Worker processes from async code: [`crate::worker`] with an [`AsyncConnection`].
//!
//! Either end may be either flavour: a worker started with [`spawn`] can serve with the
//! blocking [`crate::worker::connection`], and one started with
//! [`crate::worker::Worker::spawn`] can serve with [`connection`].

use std::process::Command;
use std::time::Duration;

use super::AsyncConnection;
use crate::error::Result;
use crate::frame::Limits;
// What this module's functions return and take, and what a worker's command is given, so that
// async code needs no import from the blocking `crate::worker` beside this module.
pub use crate::worker::{Exit, Killer, Worker, exit_with_parent, socket};

/// Starts `command` as a worker (see [`Worker::spawn`]) and returns it with this side's
/// [`AsyncConnection`]. Must be called inside a tokio runtime: outside one it fails before it
/// starts the worker. The runtime needs its IO driver (`enable_io` or `enable_all` on the
/// builder; `#[tokio::main]` has it): without it tokio panics as the connection registers its
/// socket, once the worker has started (the worker is killed as the panic unwinds).
///
/// The worker starts from the calling thread, which is what a `command` given
/// [`exit_with_parent`] dies with. A thread of tokio's blocking pool (`spawn_blocking`) ends
/// once idle for a while, and would take such a worker with it. So may a runtime's own
/// thread: a task on it that calls `tokio::task::block_in_place` (yours, or a library's)
/// hands its place to a new thread and turns it into one of the blocking pool, which ends
/// once idle (after `thread_keep_alive`, 10 s by default), and the worker is killed. Start
/// such workers from the thread that runs `#[tokio::main]`'s `async fn main` (the main
/// thread, in `block_on`) or from a thread of your own that lives as long as they should.
pub fn spawn(command: Command) -> Result<(Worker, AsyncConnection)> {
    spawn_with_limits(command, Limits::default())
}

/// [`spawn`], with `limits` on this side's connection, as
/// [`Worker::spawn_with_limits`](crate::worker::Worker::spawn_with_limits).
pub fn spawn_with_limits(command: Command, limits: Limits) -> Result<(Worker, AsyncConnection)> {
    // Checked first: a worker started only to be killed again may already have acted.
    super::in_runtime()?;
    let (mut worker, mut socket) = Worker::spawn_socket(command)?;
    socket.set_limits(limits);
    let connection = AsyncConnection::to(socket, Some(worker.id()))?;
    connection.write_into_peer(worker.memory());
    worker.closes(connection.closer())?;
    Ok((worker, connection))
}

/// In a process started as a worker (by [`spawn`] or [`Worker::spawn`]): this side of the
/// connection, on the current tokio runtime. Call it once (see
/// [`crate::worker::connection`]); it leaves the environment alone, so runtime threads may
/// already be running.
///
/// Like the blocking one, it accepts byte strings written into this process by the parent
/// ([`AsyncConnection::accept_writes_from_peer`]). For a worker that must not, use
/// `AsyncConnection::new(socket()?)` (this module's [`socket`], the blocking flavour's), as a
/// blocking worker uses `Connection::new`.
///
/// Outside a runtime it fails and leaves the socket for a later call inside one. A runtime
/// without its IO driver makes tokio panic, as in [`spawn`]. If the kernel refuses to watch
/// the socket (`epoll_ctl` failing for want of memory, or at `fs.epoll.max_user_watches`),
/// it fails with that error and the socket is closed, taken for good: the parent sees the
/// worker hang up.
pub fn connection() -> Result<AsyncConnection> {
    // Checked before the socket is taken, which can be taken only once.
    super::in_runtime()?;
    let connection = AsyncConnection::new(crate::worker::socket()?)?;
    // The socket is taken for good by now, so a worker that cannot accept writes (a sandbox
    // that refuses `getrandom`, say) still gets its connection, on the shared region, as a
    // blocking one does; an error here would lose the connection.
    let _ = connection.accept_writes_from_peer();
    Ok(connection)
}

/// Waits for `worker` to end without blocking a runtime thread, and says how it ended. Uses
/// the worker's pidfd where the kernel has them (Linux ≥ 5.3); elsewhere it checks every
/// 10 ms (on tokio's timer: the runtime needs its time driver there). Fails at once, as
/// [`Worker::wait`] does, if something else in this process reaped the worker (`SIGCHLD`
/// ignored, say). Closes a piped standard input not taken first, as [`Worker::wait`] does.
///
/// Dropping the future leaves the worker running and its `Worker` as it was (its standard
/// input closed): wait again, or [`wait_timeout`] to give up after a while.
pub async fn wait(worker: &mut Worker) -> Result<Exit> {
    drop(worker.take_stdin());
    let pidfd = match worker.pidfd().map(|fd| fd.try_clone_to_owned()) {
        Some(Ok(fd)) => Some(super::register(fd)?),
        _ => None,
    };
    loop {
        if let Some(exit) = worker.try_wait()? {
            return Ok(exit);
        }
        match &pidfd {
            // Readable once the process has exited; `try_wait` then reaps it.
            Some(pidfd) => pidfd.readable().await?.retain_ready(),
            None => ::tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// [`wait`] for at most `timeout`: how the worker ended, or `None` if it is still running by
/// then (it is left running), as the blocking [`Worker::wait_timeout`] says, which blocks
/// the runtime's thread for as long as it waits. A parent that has hung up on a worker it
/// does not trust waits so, and kills it ([`Worker::kill`]) if it has not gone by then. The
/// runtime needs its time driver (`enable_all()` or `#[tokio::main]`). Fails and closes a
/// piped standard input as [`wait`] does.
pub async fn wait_timeout(worker: &mut Worker, timeout: Duration) -> Result<Option<Exit>> {
    match ::tokio::time::timeout(timeout, wait(worker)).await {
        Ok(ended) => ended.map(Some),
        // A last look, as the blocking one takes: a worker that ended as the time ran out.
        Err(_elapsed) => worker.try_wait(),
    }
}
