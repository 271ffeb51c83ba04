//! Zero-copy buffers: bytes that travel as a sealed memfd and are read in place.
//!
//! A [`SharedBuffer`] is a fresh memfd mapped writable into this process. Fill it, then
//! [`seal`](SharedBuffer::seal) it: the writable mapping goes away, the file gets the seals
//! `F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, and what remains is a
//! [`SealedBuffer`], a read-only view that derefs to `&[u8]`. A `SealedBuffer` is a serde type
//! whose bytes are one fd in the message's fd table, so it can be a parameter, a return value
//! or a field of a generated interface: the receiver gets its own `SealedBuffer` over the same
//! pages, and no byte of the payload is copied by the transport. [`SealedBuffer::copy_from`]
//! makes one from bytes you already have, with one copy and no writable mapping at all.
//!
//! # Why reading in place is safe
//!
//! The receiver holds `&[u8]` over memory the sender can also reach. That is sound only if
//! nobody can change those bytes, or the file's size, while the slice lives: a write would be
//! a data race (undefined behaviour in Rust, and a time-of-check/time-of-use hole in any
//! parser), and a truncation would turn reads into `SIGBUS`. Seals are how the kernel makes
//! that promise about a file *to every process that holds it*:
//!
//! - `F_SEAL_WRITE`: no `write(2)`, no new writable shared mapping, no hole punching, by
//!   anyone, ever. The kernel refuses to add it while any writable shared mapping of the file
//!   exists (in any process), which is why sealing unmaps the sender's view first.
//! - `F_SEAL_SHRINK`, `F_SEAL_GROW`: the size is fixed, so a mapping of `len` bytes stays
//!   fully backed.
//! - `F_SEAL_SEAL`: no further seals. Seals can never be removed, so this only keeps the file
//!   from changing character later; the receiver does not require it.
//!
//! The receiver does not trust the sender to have done this: [`SealedBuffer::from_fd`] (and
//! deserialization) reads the seals back with `F_GET_SEALS` and refuses any fd that lacks
//! `F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW` — an unsealed memfd, a plain file, a pipe —
//! before mapping anything. It also refuses a memfd on hugetlbfs (`MFD_HUGETLB`): there a read
//! of a page the sender never wrote allocates a huge page, and where none can be had (a
//! hugetlb cgroup limit is charged at that fault) the read is a `SIGBUS`. Only then is the
//! size read (it can no longer change) and the file mapped read-only. Copy-on-receive would
//! give the same safety at the price of a copy; sealing gives it for free, which is the point
//! of this type.
//!
//! # Cost
//!
//! Seals cannot be removed, so a sealed file is written once: every message is a fresh memfd
//! whose pages the kernel allocates and zeroes, and frees again when both sides drop it (see
//! `docs/benchmarks.md` for what that costs against `memcpy`). To reuse memory from message to
//! message, use a [`SharedRegion`](crate::shared_region::SharedRegion): only its creator can
//! write it, and its reader reads with atomic loads rather than through `&[u8]`.
//!
//! A received buffer is charged to whoever faults its pages in: reading a sparse (never
//! written) region allocates zeroed pages in the receiver. A connection therefore refuses
//! buffers over its [`Limits::max_shared_len`](crate::Limits::max_shared_len) (default 1 GiB):
//! the call fails with [`Error::TooLarge`], the fd is closed unmapped, and the connection
//! serves on. [`SealedBuffer::from_fd`] refuses files over [`SealedBuffer::DEFAULT_MAX_LEN`];
//! use [`SealedBuffer::from_fd_with_limit`] for another bound.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::SealFlag;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Limit, Result};
use crate::memfd::{Access, Demand, Mapping, add_seals, map_received, new_memfd};

/// The seals a receiver requires before it reads a buffer in place.
const REQUIRED: SealFlag = SealFlag::F_SEAL_WRITE
    .union(SealFlag::F_SEAL_SHRINK)
    .union(SealFlag::F_SEAL_GROW);

/// The seals [`SharedBuffer::seal`] applies.
const APPLIED: SealFlag = REQUIRED.union(SealFlag::F_SEAL_SEAL);

const DEMAND: Demand = Demand {
    what: "a sealed buffer",
    all: REQUIRED,
    any: SealFlag::empty(),
    because: "its sender could still change it while it is read",
};

/// A fresh memfd mapped writable: fill it, then [`seal`](SharedBuffer::seal) it to send it.
///
/// Not serializable and not `AsFd`: only a sealed buffer can travel, and nothing can write the
/// bytes behind `&self`'s back. Dropping it unmaps and closes it.
pub struct SharedBuffer {
    fd: OwnedFd,
    map: Mapping,
}

impl SharedBuffer {
    /// A zero-filled buffer of `len` bytes, backed by a new memfd. Every page is allocated
    /// (and zeroed by the kernel) here, in one call (`MADV_POPULATE_WRITE`, Linux 5.14; on
    /// older kernels as they are written), since the buffer is there to be filled.
    pub fn new(len: usize) -> Result<SharedBuffer> {
        let fd = new_memfd(len)?;
        let map = Mapping::new(&fd, len, Access::ReadWrite)?;
        Ok(SharedBuffer { fd, map })
    }

    /// Makes the buffer immutable and returns its read-only view: unmaps the writable mapping,
    /// adds `F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, maps it read-only.
    ///
    /// On an error (the kernel refused a seal or the mapping) the buffer is lost.
    pub fn seal(self) -> Result<SealedBuffer> {
        let SharedBuffer { fd, map } = self;
        let len = map.len;
        drop(map); // F_SEAL_WRITE is refused while a writable shared mapping exists.
        add_seals(&fd, APPLIED)?;
        let map = Mapping::new(&fd, len, Access::Read)?;
        Ok(SealedBuffer { fd, map })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }
}

impl Deref for SharedBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `map` is a readable mapping of `len` bytes that lives as long as `self`. The
        // memfd is new and private to this value until `seal` consumes it: its fd is never
        // handed out (no `AsFd`) and the mapping is not inherited by forks (MADV_DONTFORK), so
        // nothing but `&mut self` can write or resize it.
        unsafe { self.map.slice() }
    }
}

impl DerefMut for SharedBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and the mapping is writable; `&mut self` makes this the only
        // reference to the bytes within this process.
        unsafe { self.map.slice_mut() }
    }
}

impl AsRef<[u8]> for SharedBuffer {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for SharedBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl fmt::Debug for SharedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBuffer")
            .field("fd", &self.fd)
            .field("len", &self.map.len)
            .finish()
    }
}

/// Immutable bytes in a sealed memfd, mapped read-only: derefs to `&[u8]` and travels as one
/// fd (no copy of the bytes). See the [module docs](self) for why reading it in place is safe
/// even when the sender is hostile.
///
/// Code that reads the fd itself (a copy of it from [`AsFd`], sent on as an `OwnedFd`) must
/// read by position (`pread`, [`FileExt::read_at`](std::os::unix::fs::FileExt::read_at)):
/// the file offset is shared by every copy of the fd, the peer's too, and is not 0 in general
/// ([`SealedBuffer::copy_from`] leaves it at the end), so a plain `read` may find nothing.
pub struct SealedBuffer {
    fd: OwnedFd,
    map: Mapping,
}

impl SealedBuffer {
    /// The largest buffer [`SealedBuffer::from_fd`] accepts: 1 GiB, the default of
    /// [`Limits::max_shared_len`](crate::Limits::max_shared_len), which bounds the buffers a
    /// connection decodes (set it lower to accept less from an untrusted peer).
    pub const DEFAULT_MAX_LEN: usize = 1 << 30;

    /// A sealed buffer holding a copy of `bytes`, written with `write(2)`: one copy, and no
    /// writable mapping (so no page faults and no zeroing of pages that are then overwritten).
    pub fn copy_from(bytes: &[u8]) -> Result<SealedBuffer> {
        let fd = new_memfd(0)?;
        let mut rest = bytes;
        while !rest.is_empty() {
            match nix::unistd::write(&fd, rest) {
                Ok(n) => rest = &rest[n..],
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        add_seals(&fd, APPLIED)?;
        let map = Mapping::new(&fd, bytes.len(), Access::Read)?;
        Ok(SealedBuffer { fd, map })
    }

    /// Takes a received fd as a sealed buffer, if it is one: it must carry at least
    /// `F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW` (so its bytes and size can never change),
    /// not be on hugetlbfs, and be at most [`SealedBuffer::DEFAULT_MAX_LEN`] bytes. Anything
    /// else is refused with an [`Error::Io`] of kind `InvalidInput` (or [`Error::TooLarge`]),
    /// and the fd is closed.
    pub fn from_fd(fd: OwnedFd) -> Result<SealedBuffer> {
        SealedBuffer::from_fd_with_limit(fd, SealedBuffer::DEFAULT_MAX_LEN)
    }

    /// [`SealedBuffer::from_fd`] with another size limit.
    pub fn from_fd_with_limit(fd: OwnedFd, max_len: usize) -> Result<SealedBuffer> {
        let map = map_received(&fd, &DEMAND, max_len, Limit::Given)?;
        Ok(SealedBuffer { fd, map })
    }

    /// Another `SealedBuffer` over the same sealed memory, as [`File::try_clone`] is another
    /// handle on the same file: a duplicate of the fd ([`OwnedFd::try_clone`]), mapped
    /// read-only again. No byte is copied, and nothing is checked again: seals can never be
    /// removed, and those this buffer was made or accepted with fix its bytes and its size,
    /// so the clone reads these `len` bytes for good. Each owns its fd and its mapping: send or
    /// drop either, the other stays whole. The two fds share the file offset (see
    /// [`SealedBuffer`]).
    ///
    /// Generated clients take a buffer by value, so this is how a caller sends one and keeps
    /// it, to send it again to a worker that restarted, say:
    ///
    /// ```
    /// # extern crate ipc_runtime as typed_ipc;
    /// use std::os::fd::AsFd;
    /// use typed_ipc::Socket;
    /// use typed_ipc::shared_buffer::SealedBuffer;
    ///
    /// # fn main() -> typed_ipc::Result<()> {
    /// let frame = SealedBuffer::copy_from(b"frame 1")?;
    /// let (host, worker) = Socket::pair()?;
    /// for _worker_started in 0..2 {
    ///     // With a generated client: `client.process(frame.try_clone()?)`.
    ///     let copy = frame.try_clone()?;
    ///     host.send(b"frame", &[copy.as_fd()])?;
    ///     drop(copy);
    ///     let fd = worker.recv()?.fds.pop().unwrap();
    ///     assert_eq!(SealedBuffer::from_fd(fd)?.as_bytes(), b"frame 1");
    /// }
    /// assert_eq!(frame.as_bytes(), b"frame 1"); // still here
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Fails as `dup` or `mmap` does: out of fds, or of address space.
    ///
    /// [`File::try_clone`]: std::fs::File::try_clone
    pub fn try_clone(&self) -> std::io::Result<SealedBuffer> {
        let fd = self.fd.try_clone()?;
        let map = Mapping::new(&fd, self.map.len, Access::Read)?;
        Ok(SealedBuffer { fd, map })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// The bytes, read in place.
    pub fn as_bytes(&self) -> &[u8] {
        self
    }
}

impl Deref for SealedBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `map` is a read-only mapping of the whole file (`len` bytes), alive as long
        // as `self`. The file carries F_SEAL_WRITE, F_SEAL_SHRINK and F_SEAL_GROW — applied by
        // `seal`/`copy_from`, or checked by `from_fd_with_limit` before mapping — so no process
        // can change these bytes or the file's size while the slice lives: no data race, and
        // no SIGBUS from a truncation.
        unsafe { self.map.slice() }
    }
}

impl AsRef<[u8]> for SealedBuffer {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsFd for SealedBuffer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl TryFrom<OwnedFd> for SealedBuffer {
    type Error = Error;
    /// [`SealedBuffer::from_fd`].
    fn try_from(fd: OwnedFd) -> Result<SealedBuffer> {
        SealedBuffer::from_fd(fd)
    }
}

impl From<SealedBuffer> for OwnedFd {
    /// Unmaps the buffer and returns its (still sealed) memfd.
    fn from(buffer: SealedBuffer) -> OwnedFd {
        buffer.fd
    }
}

impl fmt::Debug for SealedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedBuffer")
            .field("fd", &self.fd)
            .field("len", &self.map.len)
            .finish()
    }
}

/// On the wire: the memfd, as an index into the message's fd table (no bytes are copied).
impl Serialize for SealedBuffer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        crate::codec::fd::serialize(&self.fd, s)
    }
}

/// Takes the memfd from the message's fd table and checks it as
/// [`SealedBuffer::from_fd_with_limit`] does, with the decoding connection's
/// [`Limits::max_shared_len`](crate::Limits::max_shared_len) as the limit
/// ([`SealedBuffer::DEFAULT_MAX_LEN`] outside a connection). A refused fd is closed, by
/// typed-ipc's closer (off this thread: the guide, "slow closes"), and fails decoding: one over
/// the limit as [`Error::TooLarge`] (a request's caller gets it `by_peer`), any
/// other as [`Error::Malformed`] (a request's caller gets [`Error::Remote`]: the server could
/// not decode it). A sound buffer this side fails to map for a failure of its own (a system
/// call a seccomp filter refuses, no address space left) fails it as [`Error::Io`] instead.
impl<'de> Deserialize<'de> for SealedBuffer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::codec::shared_fd(d, &DEMAND, |fd, map| SealedBuffer { fd, map })
    }
}
