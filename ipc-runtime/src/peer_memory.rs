//! Large byte strings written straight into the receiver's memory: one copy, for a receiver
//! that trusts its sender with its memory (a worker and the parent that started it).
//!
//! Through the lane's shared region a byte string is copied twice, and at 1 MiB two copies
//! through three buffers cost 2.4x a `memcpy` on these machines before anything else.
//! Lending the sender's pages through a pipe saves a copy but hands the receiver references
//! to the sender's memory (see
//! [`Connection::lend_pages_to_peer`](crate::Connection::lend_pages_to_peer)), so it is
//! only safe towards a trusted receiver: the wrong way round for a parent and its untrusted
//! worker. Writing is the right way round:
//!
//! 1. The *receiver* keeps an *inbox*: a 1 MiB buffer of its own, ready for the next
//!    string, and a small mailbox (a random token, the buffer's generation, address and
//!    capacity). It tells its peer once where the mailbox is, in a message of its own.
//! 2. For a byte string of 256 KiB to 1 MiB, the *sender* reads the mailbox
//!    (`process_vm_readv`), copies the bytes into the buffer (`process_vm_writev`, the
//!    kernel's copy from one process into another) and sends a reference to the buffer's
//!    generation instead of the bytes.
//! 3. The receiver hands the buffer over as the `Vec<u8>` itself, then makes the next
//!    buffer, updates the mailbox, and only then acknowledges the string: the sender reads
//!    the mailbox again only once it has the acknowledgement, so it never finds the old
//!    buffer there. The next buffer is made as late as that allows, when the receiver next
//!    sends (a call's reply): by then a handler has usually dropped the last string, and the
//!    allocator hands its pages, still in cache, to the next buffer.
//!
//! Who may do it, and why it is safe:
//! - The kernel lets a process write another's memory only if it may `ptrace` it: a parent
//!   its children under Yama's default, any process of the same user without Yama, root
//!   anything (a child that made itself non-dumpable refuses non-root parents). A receiver
//!   that announces an inbox therefore gives its sender nothing the sender could not do
//!   already, and trusts it to write what it says it wrote; and it takes nothing as
//!   written until the sender has shown it can write there (a proof word in the mailbox
//!   that only a writer can set to the token), so a peer the kernel does not let write gets
//!   an error, not the buffer's stale bytes. A worker's parent is such a sender: the
//!   receiver opts in
//!   ([`Connection::accept_writes_from_peer`](crate::Connection::accept_writes_from_peer)),
//!   and [`crate::worker::connection`] does.
//! - The sender only ever writes into the receiver: the receiver gets no reference to the
//!   sender's memory, unlike the pipe. The sender writes only into a process it names
//!   itself ([`PeerMemory::of_child`]: a child it started and has not reaped, so the pid is
//!   still the child's), never one the peer names, and only where that process's mailbox,
//!   holding the token, says: a process that has since `exec`ed, or a reused pid, does not
//!   hold the token there, and nothing is written (short of the exec or the reuse landing
//!   in the microseconds between reading the mailbox and writing).
//! - A receiver that lies only harms itself: it can announce any address of its own
//!   memory, and the sender's write lands there or fails (`EFAULT`); after any failure the
//!   sender uses the shared region for the rest of the connection. What a hostile receiver
//!   could do is make the write wait, with a buffer mapped from a file on a user-space
//!   (FUSE) filesystem it serves (`fusermount3` lets unprivileged users mount one on many
//!   distributions, unless a sandbox forbids it); a call's timeout does not cover that
//!   wait, and the async flavour writes on a runtime thread. Only the writing thread waits:
//!   a thread that only reads never waits for a write, and a caller encodes its message (and
//!   so writes) before it takes the reader role, so no other caller's reply waits for it.
//!   (`userfaultfd` cannot stall it:
//!   unprivileged processes may only catch their own user-mode faults, by default since
//!   Linux 5.11.)
//! - A dropped inbox zeroes its token first and then leaks its buffer's address range (its
//!   pages go back to the kernel): a write under way when the connection was dropped must
//!   not land in memory the allocator has handed out since. That is 1 MiB of address space
//!   and a 40-byte mailbox per connection that accepted writes.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::one_copy::{OneCopy, set_one_copy};

/// Smallest byte string written into the peer. Below it the region's two copies cost no
/// more than reading the mailbox and pinning the peer's pages: a call with a `Vec<u8>`
/// argument took, written / through the region (medians of 2,000, three runs each),
/// 7.2–7.5 / 6.7 µs at 64 KiB, 9.5–9.7 / 9.1–9.6 µs at 128 KiB, 13.9–14.0 / 15.0–15.2 µs
/// at 256 KiB and 24.6–25.7 / 32.9–33.0 µs at 512 KiB.
pub(crate) const MIN: usize = 256 << 10;
/// Capacity of every inbox buffer, and so the largest string written. Above it the
/// region's copies cost ~2x a `memcpy` already, and a receiver should not keep more than
/// this ready for strings that may never come.
pub(crate) const CAPACITY: usize = 1 << 20;

/// The right to write into another process's memory: the peer of a connection, named by
/// the side that started it. Give it to the connection with
/// [`Connection::write_into_peer`](crate::Connection::write_into_peer);
/// [`crate::worker::Worker::spawn`] does so itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerMemory {
    pid: libc::pid_t,
}

impl PeerMemory {
    /// The memory of `child`, a process this one started. Pass the child whose connection
    /// you give it to, before you wait for it: its pid stays its own until it is reaped.
    /// A reaped or re-executed child is recognised (its mailbox is gone) and not written; the
    /// window between reading the mailbox and writing is microseconds, in which the child
    /// would have to `exec`, or be reaped and its pid handed to a process of the same user.
    pub fn of_child(child: &std::process::Child) -> PeerMemory {
        PeerMemory::of_pid(child.id())
    }

    pub(crate) fn of_pid(pid: u32) -> PeerMemory {
        PeerMemory {
            pid: pid as libc::pid_t,
        }
    }

    /// The peer's mailbox at `addr`, if it still holds `token` there: where to write the
    /// next string (`(generation, buffer address, capacity)`).
    pub(crate) fn read_mailbox(&self, addr: u64, token: u64) -> io::Result<(u64, u64, u64)> {
        let mut words = [0u64; 4];
        let local = libc::iovec {
            iov_base: words.as_mut_ptr().cast(),
            iov_len: size_of_val(&words),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: size_of_val(&words),
        };
        // SAFETY: `local` describes `words`, writable for its whole length; the remote
        // range is only read, by the kernel, which checks it.
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != size_of_val(&words) || words[0] != token {
            return Err(io::Error::other("the peer's mailbox is gone"));
        }
        Ok((words[1], words[2], words[3]))
    }

    /// Shows the peer that this process can write its memory: the peer takes no string as
    /// written until its mailbox's proof word holds its token, which only a process the
    /// kernel lets write there can put there.
    pub(crate) fn prove(&self, mailbox: u64, token: u64) -> io::Result<()> {
        self.write(
            mailbox + std::mem::offset_of!(Mailbox, proof) as u64,
            &token.to_ne_bytes(),
        )
    }

    /// Copies `bytes` to `addr` in the peer, all of them or an error.
    pub(crate) fn write(&self, addr: u64, bytes: &[u8]) -> io::Result<()> {
        let local = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // SAFETY: `local` describes `bytes`, which the kernel only reads; the remote range
        // is the peer's (another process, or this one in unit tests), checked by the kernel,
        // and an inbox buffer or proof word no code of the peer's reads meanwhile.
        let n = unsafe { libc::process_vm_writev(self.pid, &local, 1, &remote, 1, 0) };
        match n {
            n if n < 0 => Err(io::Error::last_os_error()),
            n if n as usize == bytes.len() => Ok(()),
            n => Err(io::Error::other(format!(
                "wrote {n} of {} bytes into the peer",
                bytes.len()
            ))),
        }
    }
}

/// The mailbox, as the sender reads it: four words, the token first; then the proof word,
/// which the sender writes once ([`PeerMemory::prove`]).
#[repr(C)]
struct Mailbox {
    token: AtomicU64,
    generation: AtomicU64,
    addr: AtomicU64,
    capacity: AtomicU64,
    proof: AtomicU64,
}

/// The receiving side: the buffer the peer writes the next string into, and the mailbox
/// that says where it is.
pub(crate) struct Inbox {
    /// Leaked: a sender may read it after the inbox is gone (40 bytes per inbox).
    mailbox: &'static Mailbox,
    buffer: Vec<u8>,
    /// The placement whose string was taken out of the buffer, until the next buffer is
    /// made ([`Inbox::renew_taken`]).
    taken: Option<u32>,
}

impl Inbox {
    /// An inbox with a buffer (a fresh one is address space only until the peer first
    /// writes it) and a random token.
    pub(crate) fn new() -> io::Result<Inbox> {
        let mut token = [0u8; 8];
        loop {
            // SAFETY: getrandom writes at most `token.len()` bytes into `token`.
            let n = unsafe { libc::getrandom(token.as_mut_ptr().cast(), token.len(), 0) };
            if n == token.len() as isize {
                break;
            }
            // Interrupted only while it waits for the kernel's entropy (early in boot), by a
            // signal of this process's: made again, as every wait of typed-ipc's is.
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
        // glibc serves a 1 MiB request with a fresh mapping, whose pages the peer's write
        // would then fault in and zero one by one (~1 µs each here: 17x a `memcpy` at
        // 64 KiB), until the process frees such a mapping: from then on it keeps requests of
        // that size in its heap and reuses their pages. So free one now.
        drop(std::hint::black_box(Vec::<u8>::with_capacity(CAPACITY)));
        let mut inbox = Inbox {
            mailbox: Box::leak(Box::new(Mailbox {
                // Never 0: a zeroed token is a dropped inbox's.
                token: AtomicU64::new(u64::from_ne_bytes(token) | 1),
                generation: AtomicU64::new(0),
                addr: AtomicU64::new(0),
                capacity: AtomicU64::new(0),
                proof: AtomicU64::new(0),
            })),
            buffer: Vec::new(),
            taken: None,
        };
        inbox.renew();
        Ok(inbox)
    }

    /// The announcement for the peer: where the mailbox is, and its token.
    pub(crate) fn announcement(&self) -> (u64, u64) {
        let addr = self.mailbox as *const Mailbox as u64;
        (addr, self.mailbox.token.load(Ordering::Relaxed))
    }

    /// A new buffer in the mailbox, under the next generation.
    fn renew(&mut self) {
        self.buffer = Vec::with_capacity(CAPACITY);
        let m = self.mailbox;
        m.addr.store(self.buffer.as_ptr() as u64, Ordering::Relaxed);
        m.capacity.store(CAPACITY as u64, Ordering::Relaxed);
        m.generation.fetch_add(1, Ordering::Release);
    }

    /// The current buffer's generation.
    #[cfg(test)]
    pub(crate) fn generation(&self) -> u64 {
        self.mailbox.generation.load(Ordering::Relaxed)
    }

    /// After [`Inbox::take`]: the next buffer, and the placement to acknowledge now.
    pub(crate) fn renew_taken(&mut self) -> Option<u32> {
        let seq = self.taken.take()?;
        self.renew();
        Some(seq)
    }

    /// The string of `len` bytes the peer says it wrote into the buffer of `generation`,
    /// by placement `seq`. The inbox has no buffer until [`Inbox::renew_taken`].
    pub(crate) fn take(&mut self, generation: u64, len: u64, seq: u32) -> Result<Vec<u8>, String> {
        let token = self.mailbox.token.load(Ordering::Relaxed);
        if self.mailbox.proof.load(Ordering::Acquire) != token {
            return Err(
                "a byte string written into this process by a peer that has not shown it can write here"
                    .into(),
            );
        }
        if self.taken.is_some() {
            return Err("a second byte string written into the same inbox buffer".into());
        }
        let current = self.mailbox.generation.load(Ordering::Relaxed);
        if generation != current {
            return Err(format!(
                "a byte string written into inbox buffer {generation}, but the buffer is {current}"
            ));
        }
        let len = match usize::try_from(len) {
            Ok(len) if len <= self.buffer.capacity() => len,
            _ => {
                return Err(format!(
                    "a byte string of {len} bytes written into an inbox buffer of {}",
                    self.buffer.capacity()
                ));
            }
        };
        let mut bytes = std::mem::take(&mut self.buffer);
        // SAFETY: the peer wrote `len` bytes at the start of this buffer before sending the
        // message that says so; it may write this process's memory (the premise of an
        // inbox), and it is the only writer of the buffer, which nothing here has read. Only
        // that trust makes the bytes initialised: a peer that lied about `len` exposes
        // uninitialised memory, but such a peer can already write anywhere in this process,
        // which is why only a parent's worker accepts writes.
        unsafe { bytes.set_len(len) };
        self.taken = Some(seq);
        if len < CAPACITY / 2 {
            // Do not hand a 256 KiB string a 1 MiB allocation to keep.
            bytes.shrink_to_fit();
        }
        Ok(bytes)
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // A sender that reads the mailbox from now on finds no token and writes nothing.
        self.mailbox.token.store(0, Ordering::Release);
        // One that read it before may still be writing: the buffer's address range must
        // not go back to the allocator. Its whole pages go back to the kernel, though.
        let buffer = std::mem::take(&mut self.buffer);
        let start = buffer.as_ptr() as usize;
        let page = crate::pipe::page_size();
        let first = start.next_multiple_of(page);
        let end = (start + buffer.capacity()) / page * page;
        if end > first {
            // SAFETY: [first, end) lies inside the buffer's allocation, which is leaked
            // below and so never used again by anything; MADV_DONTNEED only drops its pages.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED) };
        }
        std::mem::forget(buffer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> PeerMemory {
        PeerMemory::of_pid(std::process::id())
    }

    #[test]
    fn a_string_written_through_the_mailbox_is_taken_whole_and_the_next_buffer_is_new() {
        let mut inbox = Inbox::new().unwrap();
        let (mailbox, token) = inbox.announcement();
        let memory = ours();
        let (generation, addr, capacity) = memory.read_mailbox(mailbox, token).unwrap();
        assert_eq!((generation, capacity), (1, CAPACITY as u64));
        let data: Vec<u8> = (0..CAPACITY).map(|i| (i * 7) as u8).collect();
        memory.write(addr, &data).unwrap();
        assert!(
            inbox
                .take(generation, 1, 4)
                .unwrap_err()
                .contains("has not shown"),
            "nothing is taken as written before the writer has shown it can write"
        );
        memory.prove(mailbox, token).unwrap();
        let taken = inbox.take(generation, data.len() as u64, 5).unwrap();
        assert_eq!(taken, data);
        assert_eq!(taken.as_ptr() as u64, addr, "handed over, not copied");
        // Until the next buffer is made the mailbox still names this one, so taking again
        // is refused, and the acknowledgement waits.
        assert!(
            inbox
                .take(generation, 1, 6)
                .unwrap_err()
                .contains("second byte string")
        );
        assert_eq!(inbox.renew_taken(), Some(5));
        assert_eq!(inbox.renew_taken(), None);
        let (next, next_addr, _) = memory.read_mailbox(mailbox, token).unwrap();
        assert_eq!(next, 2);
        assert_ne!(next_addr, addr, "the taken buffer is still ours to use");
        // A short string gives back the rest of its buffer.
        memory.write(next_addr, &data[..1000]).unwrap();
        let short = inbox.take(next, 1000, 7).unwrap();
        assert_eq!((short.len(), short.capacity()), (1000, 1000));
        assert_eq!(short, data[..1000]);
    }

    #[test]
    fn claims_the_inbox_cannot_hold_are_refused() {
        let mut inbox = Inbox::new().unwrap();
        let (mailbox, token) = inbox.announcement();
        ours().prove(mailbox, token).unwrap();
        assert!(
            inbox
                .take(2, 1, 1)
                .unwrap_err()
                .contains("buffer 2, but the buffer is 1")
        );
        let too_long = inbox.take(1, CAPACITY as u64 + 1, 1).unwrap_err();
        assert!(too_long.contains("inbox buffer of 1048576"), "{too_long}");
        assert!(inbox.take(1, u64::MAX, 1).is_err());
    }

    #[test]
    fn a_mailbox_without_its_token_is_never_written() {
        let inbox = Inbox::new().unwrap();
        let (mailbox, token) = inbox.announcement();
        let memory = ours();
        assert!(
            memory.read_mailbox(mailbox, token ^ 2).is_err(),
            "another token"
        );
        assert!(memory.read_mailbox(8, token).is_err(), "no mailbox there");
        drop(inbox);
        // The mailbox outlives its inbox (a late reader finds it), but without a token.
        assert!(
            memory.read_mailbox(mailbox, token).is_err(),
            "a dropped inbox"
        );
    }
}
