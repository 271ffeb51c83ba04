//! The pipe a connection's lane moves [`SharedBytes`](crate::SharedBytes) through: one copy
//! instead of two.
//!
//! The sender `vmsplice`s the bytes into a pipe: the pipe takes references to the sender's
//! pages, nothing is copied. The receiver then copies them out of the pipe into its `Vec`
//! (`vmsplice` towards user memory, which is `read` with a flag that matters, below). That is
//! one copy across the processes, where the shared region takes two (into the region, out of
//! it) and the socket four; at 1 MiB it is 2.9x a `memcpy` on average against 3.8x
//! (`docs/benchmarks-bulk.md`). The price is that the receiver copies from the sender's own
//! pages, so they must not change until it has: which is why only
//! [`SharedBytes`](crate::SharedBytes), whose bytes sit behind an `Arc` that the lane keeps
//! until the peer has read them, go this way.
//! And it lends the peer those pages for as long as the peer likes: a receiver can `tee`
//! the references into a pipe of its own and read, later, whatever the sender's allocator
//! has put in the same bytes since. No flag takes a page reference back, so a connection
//! pipes only when told that its peer is trusted with this process's memory
//! ([`Connection::lend_pages_to_peer`](crate::Connection::lend_pages_to_peer)).
//!
//! Nor is the receiver safe from a hostile sender: every read of a pipe (`read`, `vmsplice`,
//! even `FIONREAD`) first takes the pipe's lock, and the sender, which holds the pipe too, can
//! hold that lock as long as it likes (a `splice` into the pipe from a socket with nothing to
//! read sleeps with it held); the reading thread then waits, uninterruptibly, where not even
//! `SIGKILL` ends the process. The other way round too: the receiver holds the read end, and a
//! `splice` out of the pipe into a full socket sleeps with the lock held, so the sender's next
//! `vmsplice`, its drain of bytes given back unread, and its closing the pipe (as its
//! connection goes) wait as long as the receiver likes. So a receiver reads only the pipes of
//! a peer it trusts too (the same `lend_pages_to_peer`, which tells the peer so), and a sender
//! pipes only to a peer that said it does.
//!
//! Between such peers neither end waits on the pipe's contents. The sender splices without
//! blocking and sends only what fitted (the rest of the string goes inline in the message);
//! the receiver checks that the whole announced length is in the pipe before it allocates,
//! and reads without blocking. Both use `SPLICE_F_NONBLOCK` rather than `O_NONBLOCK`: the
//! peer holds the same open pipe and could clear a file status flag, but not a flag of our
//! call.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl};
use nix::sys::stat::{SFlag, fstat};

/// The pipe size asked for: the most an unprivileged process may set
/// (`/proc/sys/fs/pipe-max-size` by default). One page per slot, so a string starting
/// mid-page puts up to a page ([`page_size`]) less in the pipe than this.
pub(crate) const CAPACITY: usize = 1 << 20;

/// Most pipes this process keeps at once: 16 MiB of the 64 MiB that all of a user's pipes
/// may hold by default (`/proc/sys/fs/pipe-user-pages-soft`). Past that limit every new pipe
/// of the user (a shell's too) gets two pages, so typed-ipc takes a quarter at most; further
/// connections use their regions until a pipe is closed.
pub(crate) const MAX_PIPES: usize = 16;

/// This process's pipes ([`OutPipe`]s alive).
static PIPES: AtomicUsize = AtomicUsize::new(0);

/// Takes one of `max` slots counted by `count`, if one is free.
fn take_slot(count: &AtomicUsize, max: usize) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// The size of a page, which is what one slot of a pipe holds: 4 KiB on x86-64, up to 64 KiB
/// on some arm64 kernels.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf only reads a configuration value; _SC_PAGESIZE always has one.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

/// The sending end: the pipe this end made, both of its ends.
pub(crate) struct OutPipe {
    write: OwnedFd,
    /// Kept to empty the pipe of bytes the peer will never read (a message that was not
    /// sent, or that the peer refused unread), so the next string starts at the front.
    read: OwnedFd,
}

impl OutPipe {
    /// A new pipe of [`CAPACITY`]. Fails when this process keeps [`MAX_PIPES`] already, or
    /// when this user's pipes hold their share of memory (`/proc/sys/fs/pipe-user-pages-soft`):
    /// the lane then uses its region.
    pub(crate) fn new() -> io::Result<OutPipe> {
        if !take_slot(&PIPES, MAX_PIPES) {
            return Err(io::Error::other(
                "this process keeps as many pipes as it may",
            ));
        }
        let made = nix::unistd::pipe2(OFlag::O_CLOEXEC).and_then(|(read, write)| {
            fcntl(&write, FcntlArg::F_SETPIPE_SZ(CAPACITY as i32))?;
            Ok(OutPipe { write, read })
        });
        if made.is_err() {
            PIPES.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(made?)
    }

    /// The end to send the peer, once.
    pub(crate) fn read_end(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Puts as much of `bytes` in the pipe as fits without waiting; returns how much.
    pub(crate) fn splice(&self, bytes: &[u8]) -> usize {
        let mut done = 0;
        while done < bytes.len() {
            match nix::fcntl::vmsplice(
                &self.write,
                &[io::IoSlice::new(&bytes[done..])],
                SpliceFFlags::SPLICE_F_NONBLOCK,
            ) {
                Ok(0) | Err(_) => break,
                Ok(n) => done += n,
            }
        }
        done
    }

    /// Reads and drops whatever is in the pipe.
    pub(crate) fn drain(&self) {
        let mut scratch = vec![MaybeUninit::<u8>::uninit(); 64 << 10];
        while matches!(read_some(self.read.as_fd(), &mut scratch), Ok(n) if n > 0) {}
    }
}

impl Drop for OutPipe {
    fn drop(&mut self) {
        PIPES.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The receiving end: the peer's pipe, checked to be one. Closed by typed-ipc's closer when
/// dropped (with its connection): closing it may wait for as long as the peer likes, once
/// the peer has closed its own copy and holds the pipe's lock, and a peer trusted when it
/// lent the pipe may be trusted no longer.
pub(crate) struct InPipe {
    /// Always `Some` until dropped.
    fd: Option<OwnedFd>,
}

impl InPipe {
    /// Takes `fd` if it is a pipe (or any FIFO) open for reading only. `vmsplice` picks its
    /// direction by the fd's access mode: on an fd open for writing (a pipe's write end, a
    /// FIFO opened read-write) [`read_some`] would put this process's own memory into the
    /// peer's pipe instead of reading from it. A refused fd is the peer's, closed by typed-ipc's
    /// closer, off this thread: closing it may wait for as long as the peer likes.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<InPipe> {
        match InPipe::check(&fd) {
            Ok(()) => Ok(InPipe { fd: Some(fd) }),
            Err(e) => {
                crate::closer::close(fd);
                Err(e)
            }
        }
    }

    /// Whether `fd` is what [`InPipe::new`] takes.
    fn check(fd: &OwnedFd) -> io::Result<()> {
        let stat = fstat(fd)?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFIFO {
            return Err(io::Error::other(
                "the fd the peer sent as its pipe is not a pipe",
            ));
        }
        let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
        if flags & OFlag::O_ACCMODE != OFlag::O_RDONLY {
            return Err(io::Error::other(
                "the fd the peer sent as its pipe is not a pipe's read end",
            ));
        }
        Ok(())
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_ref().expect("taken only by drop").as_fd()
    }

    /// Reads exactly `len` bytes into a new `Vec` with room for `extra` more, or fails at
    /// once if the pipe does not hold them: checked before allocating, so a peer that
    /// announces bytes it never spliced costs an error, not memory or a wait.
    pub(crate) fn read_vec(&self, len: usize, extra: usize) -> io::Result<Vec<u8>> {
        let mut available: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which is valid and ours.
        if unsafe { libc::ioctl(self.fd().as_raw_fd(), libc::FIONREAD, &mut available) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if (available.max(0) as usize) < len {
            return Err(io::Error::other(format!(
                "the peer's pipe holds {available} bytes, the message said {len}"
            )));
        }
        let mut v = Vec::with_capacity(len + extra);
        let mut got = 0;
        while got < len {
            match read_some(self.fd(), &mut v.spare_capacity_mut()[got..len])? {
                0 => return Err(io::Error::other("the peer's pipe was closed mid-string")),
                n => got += n,
            }
        }
        // SAFETY: the kernel wrote the first `len` bytes of the spare capacity above.
        unsafe { v.set_len(len) };
        Ok(v)
    }
}

impl Drop for InPipe {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take() {
            crate::closer::close(fd);
        }
    }
}

/// One non-blocking `vmsplice` from a pipe into `buf` (`read` with `SPLICE_F_NONBLOCK`,
/// which no flag on the shared open file can turn off). `Ok(0)`: the pipe has no writer.
/// Made again when a signal interrupts it: the kernel checks for one once it has the pipe's
/// lock, before it copies anything, and a handler installed without `SA_RESTART` makes that
/// `EINTR`, which says nothing about the pipe (a drain that stopped there would leave a
/// string's bytes in front of the next one).
fn read_some(pipe: BorrowedFd<'_>, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    loop {
        // SAFETY: `iov` describes `buf`, writable memory of ours for the duration of the
        // call; `vmsplice` on a pipe's read end only writes into it (nix's wrapper takes
        // `IoSlice`s, read-only memory, so this direction goes through libc).
        let n = unsafe {
            libc::vmsplice(
                pipe.as_raw_fd(),
                &iov,
                1,
                libc::SPLICE_F_NONBLOCK as libc::c_uint,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_run_out_and_come_back() {
        let count = AtomicUsize::new(0);
        assert!((0..3).all(|_| take_slot(&count, 3)));
        assert!(!take_slot(&count, 3), "all three taken");
        assert_eq!(count.load(Ordering::Relaxed), 3, "a refusal takes nothing");
        count.fetch_sub(1, Ordering::AcqRel);
        assert!(take_slot(&count, 3));
    }

    /// Does nothing: a handler installed without `SA_RESTART`, so that a system call it
    /// interrupts fails with `EINTR` instead of starting again.
    extern "C" fn ignore(_: libc::c_int) {}

    /// The state letter of thread `tid` of this process (`/proc/.../stat`) and the system
    /// call it is in, if any (`/proc/.../syscall`).
    fn state_of(tid: libc::pid_t) -> (Option<char>, Option<libc::c_long>) {
        let task = format!("/proc/self/task/{tid}");
        let stat = std::fs::read_to_string(format!("{task}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.chars().next());
        let syscall = std::fs::read_to_string(format!("{task}/syscall")).unwrap_or_default();
        let syscall = syscall.split(' ').next().and_then(|n| n.parse().ok());
        (state, syscall)
    }

    /// Waits until thread `tid` is in `state` ([`state_of`]); fails the test if that takes a
    /// minute (a kernel whose pipes lock otherwise).
    fn wait_for(tid: libc::pid_t, state: (Option<char>, Option<libc::c_long>)) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while state_of(tid) != state {
            assert!(
                std::time::Instant::now() < deadline,
                "thread {tid} never reached {state:?}"
            );
            std::thread::yield_now();
        }
    }

    /// The kernel checks for a signal once a read of a pipe has the pipe's lock, before it
    /// copies anything, and a handler without `SA_RESTART` turns that into `EINTR`. A drain
    /// that stopped there would leave bytes the peer never read at the front of the pipe,
    /// where the peer would read them as the next string's. Made certain here: the read
    /// waits for the lock, which a `splice` from an empty socket holds, while the signal
    /// comes.
    #[test]
    fn a_drain_interrupted_by_a_signal_still_empties_the_pipe() {
        // SAFETY: a zeroed sigaction is a valid one (no flags, an empty mask); `ignore`
        // touches nothing, so it is safe whenever it runs. No other test uses SIGUSR2.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as libc::sighandler_t;
            assert_eq!(
                libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()),
                0
            );
        }
        let pipe = std::sync::Arc::new(OutPipe::new().unwrap());
        assert_eq!(
            pipe.splice(&[7; 10_000]),
            10_000,
            "a string the peer never read"
        );
        // A thread sleeping in a `splice` into the pipe holds its lock.
        let write = pipe.write.try_clone().unwrap();
        let (holder, mut wake) = crate::closer::tests::hold_pipe_lock(write);
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let drainer = {
            let pipe = pipe.clone();
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid_tx.send(unsafe { libc::gettid() }).unwrap();
                pipe.drain();
            })
        };
        let tid = tid_rx.recv().unwrap();
        // Until the drainer waits for the lock, in `vmsplice`.
        wait_for(tid, (Some('D'), Some(libc::SYS_vmsplice)));
        // SAFETY: tgkill only sends a signal, to a thread of this process that is alive: it
        // waits for the lock.
        let sent = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR2) };
        assert_eq!(sent, 0);
        std::io::Write::write_all(&mut wake, b"x").unwrap();
        holder.join().unwrap();
        drainer.join().unwrap();
        let mut left: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which is valid and ours.
        let r = unsafe { libc::ioctl(pipe.read.as_raw_fd(), libc::FIONREAD, &mut left) };
        assert_eq!(r, 0);
        assert_eq!(left, 0, "the drain left bytes in the pipe");
    }
}
