//! The closer: closes the fds typed-ipc drops on its own (fds of a message nothing claimed: a
//! request refused or not served, a reply nobody waits for, fds a value did not take), on
//! threads of its own rather than the thread that received them.
//!
//! Closing an fd may wait for as long as the peer that sent it likes: the last fd of a pipe
//! whose lock the peer holds (a `splice` into it that sleeps) waits until it lets go, a TCP
//! socket with unsent data and `SO_LINGER` for the linger time, a FUSE file for its server. On
//! the thread that read the message, that would stall a serving thread, or an async
//! connection's reader task (and a runtime worker with it). Handed here, such a close stalls
//! a closer thread only.
//!
//! Threads are started lazily, one more whenever fds wait and no closer thread is idle, up to
//! [`MAX_THREADS`]: a close that never returns holds one thread, and the next fds go to
//! another. Past the cap (that many closes stalled at once), fds wait in the queue, still
//! open, until a stalled close returns; none is lost. The first thread stays for the
//! process's life; the others end after [`LINGER`] idle.
//!
//! Fds your own code drops (an `OwnedFd` it received and let go) are closed where you drop
//! them, as Rust does: not here. Nor in a child forked (without exec) from a process that used
//! the closer: it closes them where they drop, since the parent may have forked it while one of
//! its threads held the closer's lock.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Most closer threads at once: as many closes may be stalled by peers before the next fds
/// wait in the queue for one of them.
pub(crate) const MAX_THREADS: usize = 16;

/// How long a closer thread other than the first waits idle for more fds before it ends.
pub(crate) const LINGER: Duration = Duration::from_secs(10);

struct Queue {
    fds: VecDeque<OwnedFd>,
    /// Closer threads alive, in this process.
    threads: usize,
    /// Of them, those waiting for fds.
    idle: usize,
    /// Fds taken from the queue and not yet closed.
    closing: usize,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    fds: VecDeque::new(),
    threads: 0,
    idle: 0,
    closing: 0,
});
/// The process that uses the closer: set before its first use of the queue's lock, so that a
/// child forked from it, even while the lock was held, knows not to take it.
static USER: AtomicU32 = AtomicU32::new(0);
/// Signalled when fds are queued for an idle thread.
static WORK: Condvar = Condvar::new();
/// Signalled when the queue is empty and nothing is being closed.
static DONE: Condvar = Condvar::new();

/// Whether this process may take the queue's lock: it is the closer's user, made so now if
/// no process was. A child forked from the user may have been forked while another thread
/// held the lock, which no thread of the child would ever let go.
fn is_user() -> bool {
    let pid = std::process::id();
    match USER.compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => true,
        Err(user) => user == pid,
    }
}

/// The queue's lock, taken only by the closer's user ([`is_user`]), which every path to it
/// has checked: claimed here too, so that no use of the lock comes before the claim. (So the
/// counts are only ever the user's: a child forked from a process that never claimed the
/// closer finds them as they started.)
fn lock() -> MutexGuard<'static, Queue> {
    let _ = is_user();
    // Nothing panics under the lock but an allocation; the counts stay sound either way.
    QUEUE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Closes the fds in `fds` (emptied, its capacity kept) on a closer thread.
#[cold]
#[inline(never)]
pub(crate) fn close_all(fds: &mut Vec<OwnedFd>) {
    hand(fds.drain(..));
}

/// `frame` with its fds handed to [`close_all`]; by value, so that the caller's frame need
/// not live in memory on its common path.
#[cold]
#[inline(never)]
pub(crate) fn frame_discarded(mut frame: crate::Frame) -> crate::Frame {
    close_all(&mut frame.fds);
    frame
}

/// Closes `fd` on a closer thread.
#[cold]
#[inline(never)]
pub(crate) fn close(fd: OwnedFd) {
    hand(std::iter::once(fd));
}

fn hand(fds: impl Iterator<Item = OwnedFd>) {
    // A child forked (without exec) from a process that used the closer may have been forked
    // while another thread held the queue's lock, which no thread of the child would ever let
    // go: it closes here, as it would without a closer, and never takes the lock.
    if !is_user() {
        fds.for_each(drop);
        return;
    }
    let mut queue = lock();
    queue.fds.extend(fds);
    if !queue.fds.is_empty() {
        queue = more_hands(queue);
    }
    drop(queue);
}

/// With fds waiting: leaves them to a closer thread that is not busy closing (waking it if
/// idle; one starting, or back from a close, takes them as it loops), or starts one if every
/// thread is busy and there are fewer than [`MAX_THREADS`]. If none can start and none is
/// alive, closes them here (never lost; this thread waits as it would without a closer).
///
/// Only a thread stalled in a close calls for another: a burst of fds handed one at a time
/// starts one thread, not one each. (Each thread costs a stack, and a process past 8 threads
/// that allocate has glibc open a file for a moment to size its arenas, which tests that
/// count fds saw as a stray fd.)
fn more_hands(mut queue: MutexGuard<'static, Queue>) -> MutexGuard<'static, Queue> {
    if queue.threads > queue.closing {
        if queue.idle > 0 {
            WORK.notify_one();
        }
        return queue;
    }
    if queue.threads >= MAX_THREADS {
        return queue; // waits for a stalled close to return
    }
    queue.threads += 1;
    let first = queue.threads == 1;
    let started = std::thread::Builder::new()
        .name("typed-ipc-closer".into())
        .spawn(move || run(first));
    if started.is_err() {
        queue.threads -= 1;
        if queue.threads == 0 {
            let fds = std::mem::take(&mut queue.fds);
            drop(queue);
            drop(fds);
            queue = lock();
            DONE.notify_all();
        }
    }
    queue
}

/// A closer thread: closes fds one at a time, with the lock let go, making sure before each
/// close that the fds behind it have a thread of their own to go to.
fn run(first: bool) {
    let mut queue = lock();
    loop {
        match queue.fds.pop_front() {
            Some(fd) => {
                queue.closing += 1;
                if !queue.fds.is_empty() {
                    queue = more_hands(queue);
                }
                drop(queue);
                drop(fd); // may wait as long as the peer that sent it likes
                queue = lock();
                queue.closing -= 1;
                if queue.closing == 0 && queue.fds.is_empty() {
                    DONE.notify_all();
                }
            }
            None => {
                queue.idle += 1;
                let (woken, waited) = match first {
                    true => (WORK.wait(queue), None),
                    false => {
                        let (woken, timeout) = WORK
                            .wait_timeout(queue, LINGER)
                            .unwrap_or_else(PoisonError::into_inner);
                        (Ok(woken), Some(timeout))
                    }
                };
                queue = woken.unwrap_or_else(PoisonError::into_inner);
                queue.idle -= 1;
                if waited.is_some_and(|w| w.timed_out()) && queue.fds.is_empty() {
                    queue.threads -= 1;
                    return;
                }
            }
        }
    }
}

/// Waits until every fd typed-ipc has dropped on its own so far is closed.
///
/// typed-ipc closes the fds it drops itself (those of a message nothing claimed: a request
/// refused or not served, a reply nobody waits for any more, fds a value did not take) on
/// threads of its own, because closing an fd from a hostile peer may block for as long as
/// that peer likes (the last fd of a pipe whose lock it holds). So right after such a drop,
/// `/proc/self/fd` may still list them: a test that counts fds to show that nothing leaked
/// calls this first. Fds your own code drops are closed where you drop them, as Rust does;
/// this does not concern them.
///
/// It waits for as long as a stalled close does, so it belongs in tests and at shutdown, not
/// on a path that must not block. It blocks the calling thread: a tokio program calls it
/// through `tokio::task::spawn_blocking`, not on a runtime thread. In a child forked
/// (without exec) from a process that used typed-ipc, which closes fds where they drop, it
/// returns at once.
///
/// ```
/// # extern crate ipc_runtime as typed_ipc;
/// # fn main() -> typed_ipc::Result<()> {
/// let (client, server) = typed_ipc::Connection::pair()?;
/// // ... calls that may leave fds for typed-ipc to drop: replies nobody waits for, say ...
/// drop((client, server));
/// typed_ipc::wait_for_closes();
/// // Counting `/proc/self/fd` now sees every fd typed-ipc dropped closed.
/// # Ok(())
/// # }
/// ```
pub fn wait_for_closes() {
    if !is_user() {
        return; // a forked child closes where fds drop: none wait for it
    }
    let mut queue = lock();
    while !queue.fds.is_empty() || queue.closing > 0 {
        queue = DONE.wait(queue).unwrap_or_else(PoisonError::into_inner);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc::channel;
    use std::thread::JoinHandle;

    /// A thread holding the lock of the pipe whose write end is `write` (sleeping in a
    /// `splice` into it), as a hostile peer can; returned once it sleeps, with the socket end
    /// whose byte lets it go.
    pub(crate) fn hold_pipe_lock(write: OwnedFd) -> (JoinHandle<OwnedFd>, UnixStream) {
        let (idle, wake) = UnixStream::pair().unwrap();
        let (tid_tx, tid_rx) = channel();
        let holder = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            // SAFETY: plain fds of ours; splice only moves bytes between them.
            let n = unsafe {
                let (null, raw) = (std::ptr::null_mut(), write.as_raw_fd());
                libc::splice(idle.as_raw_fd(), null, raw, null, 4096, 0)
            };
            assert_eq!(n, 1);
            write
        });
        let stat = format!("/proc/self/task/{}/stat", tid_rx.recv().unwrap());
        while !std::fs::read_to_string(&stat).unwrap().contains(") S ") {
            std::thread::yield_now(); // until the holder sleeps in `splice`, the lock held
        }
        (holder, wake)
    }

    /// Whether the read end of the pipe whose write end is `write` is closed, waiting up to
    /// a minute for it (a hang guard: it comes at once when it comes).
    fn reader_gone(write: &OwnedFd) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(write.as_fd(), PollFlags::empty())];
        poll(&mut fds, PollTimeout::try_from(60_000).unwrap()).unwrap();
        fds[0].revents().unwrap().contains(PollFlags::POLLERR)
    }

    /// A child forked while another thread held the closer's lock (a pre-forking server, say)
    /// closes what it drops itself: the lock's holder does not exist in the child, and taking
    /// the lock would wait for good.
    #[test]
    fn a_child_forked_with_the_lock_held_still_closes() {
        // This process is the closer's user.
        let (used, _) = nix::unistd::pipe().unwrap();
        close(used);
        assert!(
            closes_in_a_child_forked_with_the_lock_held(),
            "the forked child waited for the lock"
        );
    }

    /// Forks while a thread holds the queue's lock; the child closes a pipe's read end through
    /// [`close`] and exits. Whether the child closed it (a child stuck on the lock never does;
    /// a hang guard of a minute), once it is reaped.
    fn closes_in_a_child_forked_with_the_lock_held() -> bool {
        use nix::sys::wait::{WaitStatus, waitpid};
        use nix::unistd::{ForkResult, fork};
        let (read, write) = nix::unistd::pipe().unwrap();
        let (held_tx, held_rx) = channel();
        let (release_tx, release_rx) = channel::<()>();
        let holder = std::thread::spawn(move || {
            let _queue = lock();
            held_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        });
        held_rx.recv().unwrap();
        // SAFETY: the child only closes an fd (the code under test, which takes no lock in
        // a child) and exits with `_exit`, both async-signal-safe.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                drop(write);
                close(read);
                // SAFETY: ends the child at once, running nothing of the parent's.
                unsafe { libc::_exit(0) }
            }
            ForkResult::Parent { child } => {
                drop(read);
                release_tx.send(()).unwrap();
                holder.join().unwrap();
                // The child's close of the read end shows as an error on the write end.
                let gone = reader_gone(&write);
                if !gone {
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                }
                let ended = waitpid(child, None).unwrap();
                assert!(!gone || ended == WaitStatus::Exited(child, 0), "{ended:?}");
                gone
            }
        }
    }

    /// [`a_child_forked_while_wait_for_closes_held_the_lock_still_closes`], in a process of its own
    /// that has handed nothing to the closer yet.
    #[test]
    #[ignore = "run in a process of its own by the test below"]
    fn fork_while_only_wait_for_closes_used_the_lock() {
        assert_eq!(
            USER.load(Ordering::SeqCst),
            0,
            "this process handed an fd already"
        );
        // The lock as `wait_for_closes` takes it: the first use of the closer in this process.
        assert!(
            closes_in_a_child_forked_with_the_lock_held(),
            "the forked child waited for the lock wait_for_closes held"
        );
    }

    /// `wait_for_closes` (which tests call from any thread) takes the
    /// queue's lock too: a child forked meanwhile, in a process that had handed nothing to the
    /// closer yet, must still know the lock is not its to take.
    #[test]
    fn a_child_forked_while_wait_for_closes_held_the_lock_still_closes() {
        let name = "closer::tests::fork_while_only_wait_for_closes_used_the_lock";
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--ignored", "--test-threads=1"])
            .status()
            .unwrap();
        assert!(status.success(), "{status}");
    }

    /// A close that cannot finish (the last fd of a pipe whose lock is held) holds up neither
    /// the fds handed after it nor those handed with it; and `wait_for_closes` waits for it.
    #[test]
    fn a_stalled_close_holds_up_no_other() {
        let (stalled, held_write) = nix::unistd::pipe().unwrap();
        let (holder, wake) = hold_pipe_lock(held_write);
        let (read_a, write_a) = nix::unistd::pipe().unwrap();
        let (read_b, write_b) = nix::unistd::pipe().unwrap();
        // Handed together, the stalled one first.
        close_all(&mut vec![stalled, read_a]);
        close(read_b);
        let (a, b) = (reader_gone(&write_a), reader_gone(&write_b));
        let (idle_tx, idle_rx) = channel();
        let waiter = std::thread::spawn(move || {
            wait_for_closes();
            idle_tx.send(()).unwrap();
        });
        // Still stalled, so not idle. (Not a proof that it waits, but a `wait_for_closes` that
        // did not would usually have said so by the time the lock is let go.)
        let early = idle_rx.try_recv().is_ok();
        std::io::Write::write_all(&mut &wake, b"x").unwrap();
        drop(holder.join().unwrap());
        assert!(a && b, "closes waited behind a stalled one: {a} {b}");
        assert!(
            !early,
            "wait_for_closes returned with a close still stalled"
        );
        idle_rx.recv().unwrap();
        waiter.join().unwrap();
    }
}
