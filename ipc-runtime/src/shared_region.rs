//! Shared regions: memory one process writes again and again and its peer reads in place,
//! safe even when the writer is hostile.
//!
//! A [`SharedRegion`] is a memfd of fixed size that its creator maps writable once and then
//! seals with `F_SEAL_FUTURE_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`. Send its fd
//! (as a [`RegionView`] from [`SharedRegion::view`], or as an `OwnedFd`) once; from then on the
//! creator writes, tells the peer where to look with an ordinary call, and the peer reads the
//! bytes in place through its [`RegionView`]. No page is allocated per message and no byte is
//! copied by the transport, which is what makes this the fast path for big data (see
//! `docs/benchmarks-bulk.md`); the connection itself uses a region of this kind to move large
//! byte strings (see [`Connection`](crate::Connection)).
//!
//! # Who can write, and why reading is still safe
//!
//! - **Only the creator writes.** `F_SEAL_FUTURE_WRITE` forbids every *new* writable mapping
//!   and every `write(2)`, in any process, for good; the one writable mapping made before the
//!   seal is the creator's own, and it is not inherited by children (`MADV_DONTFORK`). So a
//!   receiver can neither write the creator's memory nor turn its read-only mapping writable
//!   (`mprotect` fails), and the creator's `&mut [u8]` is sound.
//! - **The size never changes.** `F_SEAL_SHRINK | F_SEAL_GROW`: a mapping stays fully backed,
//!   so no read can `SIGBUS`. A memfd on hugetlbfs (`MFD_HUGETLB`) is refused: a read there
//!   can still `SIGBUS`, where the huge page it needs cannot be had.
//! - **The reader never assumes the bytes hold still.** The creator may write while the
//!   reader reads (a hostile or buggy one will), so a [`RegionView`] never hands out `&[u8]`
//!   — that would be a data race, undefined behaviour, and a time-of-check/time-of-use hole.
//!   It reads in place through atomic loads instead ([`RegionView::words`]: relaxed loads
//!   compile to the same plain `mov`s as ordinary ones, though the compiler does not
//!   vectorise a loop of them), copies out ([`RegionView::copy_to`], [`RegionView::to_vec`])
//!   with a copy that is allowed to race, and reads through a window
//!   ([`RegionView::reader`]: `std::io::BufRead` over copies made 4 KiB at a time, for code
//!   that wants slices). The worst a writer can do is make the reader see bytes change: copy
//!   out what you must check before you trust it.
//!
//! The receiver does not trust the creator to have sealed: [`RegionView::from_fd`] (and
//! deserialization) checks the seals before mapping anything and refuses an fd that lacks
//! `F_SEAL_SHRINK | F_SEAL_GROW` or one of `F_SEAL_WRITE`/`F_SEAL_FUTURE_WRITE`. Nor does it
//! trust the creator's size: a region read is charged to the reader, so a connection refuses
//! one over its [`Limits::max_shared_len`](crate::Limits::max_shared_len) (default 1 GiB) with
//! [`Error::TooLarge`], closing the fd, and [`RegionView::from_fd`] one over
//! [`RegionView::DEFAULT_MAX_LEN`].
//!
//! Compared with [`SealedBuffer`](crate::shared_buffer::SealedBuffer), whose bytes can never
//! change again: a sealed buffer is a snapshot the reader may borrow as `&[u8]`, but every
//! message needs fresh pages; a region is reused for every message, and the reader gets atomic
//! reads rather than a slice.
//!
//! ```
//! # extern crate ipc_runtime as typed_ipc;
//! use std::sync::atomic::Ordering;
//! use typed_ipc::shared_region::{RegionView, SharedRegion};
//!
//! # fn main() -> typed_ipc::Result<()> {
//! let mut region = SharedRegion::new(4096)?;
//! let view: RegionView = region.view()?; // in real use: sent to the peer once
//! region[..5].copy_from_slice(b"hello");
//! assert_eq!(view.to_vec(0, 5)?, b"hello");
//! assert_eq!(view.words()[0].load(Ordering::Relaxed).to_le_bytes()[..5], *b"hello");
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering, fence};

use nix::fcntl::SealFlag;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::bulk_copy::copy_racy;
use crate::error::{Error, Limit, Result};
use crate::memfd::{Access, Demand, Mapping, add_seals, map_received, new_memfd};

mod reader;
pub use reader::RegionReader;

/// The seals [`SharedRegion::new`] applies once its writable mapping exists.
const APPLIED: SealFlag = SealFlag::F_SEAL_FUTURE_WRITE
    .union(SealFlag::F_SEAL_SHRINK)
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_SEAL);

const DEMAND: Demand = Demand {
    what: "a shared region",
    all: SealFlag::F_SEAL_SHRINK.union(SealFlag::F_SEAL_GROW),
    any: SealFlag::F_SEAL_WRITE.union(SealFlag::F_SEAL_FUTURE_WRITE),
    because: "its sender could resize it under the reader, or the reader could write it",
};

/// A memfd region this process writes and its peer reads: fixed size, mapped writable here
/// once, writable nowhere else. Derefs to `&mut [u8]`; give the peer a [`RegionView`].
pub struct SharedRegion {
    fd: OwnedFd,
    map: Mapping,
}

impl SharedRegion {
    /// A zero-filled region of `len` bytes (rounded up to whole pages), every page allocated
    /// now (`MADV_POPULATE_WRITE`; on kernels before 5.14 as written), then sealed so that no
    /// other mapping can ever write it.
    pub fn new(len: usize) -> Result<SharedRegion> {
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| p as usize);
        let len = len.checked_next_multiple_of(page).ok_or(Error::TooLarge {
            size: len as u64,
            limit: isize::MAX as u64,
            which: Limit::System,
            by_peer: false,
        })?;
        let fd = new_memfd(len)?;
        let map = Mapping::new(&fd, len, Access::ReadWrite)?;
        add_seals(&fd, APPLIED)?;
        Ok(SharedRegion { fd, map })
    }

    /// A read-only view of this region for the peer (its own fd and mapping): pass it as a
    /// parameter, and the peer receives a `RegionView` of the same pages.
    pub fn view(&self) -> Result<RegionView> {
        RegionView::from_fd(self.fd.try_clone()?)
    }

    /// Length in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Whether the region holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }
}

impl Deref for SharedRegion {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: a live mapping of `len` bytes owned by `self`. F_SEAL_FUTURE_WRITE was added
        // right after this (the only) writable mapping was made, before the fd was shared, and
        // the mapping is not inherited by forks, so only this value can write the bytes, and
        // `&self` rules that out while the slice lives. Peers only read, which is no race for
        // us; the size is sealed, so the mapping stays backed.
        unsafe { self.map.slice() }
    }
}

impl DerefMut for SharedRegion {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; the mapping is writable and `&mut self` makes this the only
        // reference to the bytes in this process.
        unsafe { self.map.slice_mut() }
    }
}

impl AsFd for SharedRegion {
    /// The memfd, to send to a peer: it is sealed, so the peer can only read it.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRegion")
            .field("fd", &self.fd)
            .field("len", &self.map.len)
            .finish()
    }
}

/// A peer's [`SharedRegion`], mapped read-only and read through atomic loads, because the peer
/// may be writing it at the same time (see the [module docs](self)).
pub struct RegionView {
    fd: OwnedFd,
    map: Mapping,
}

impl RegionView {
    /// The largest region [`RegionView::from_fd`] accepts: 1 GiB, the default of
    /// [`Limits::max_shared_len`](crate::Limits::max_shared_len), which bounds the regions a
    /// connection decodes (set it lower to accept less from an untrusted peer).
    pub const DEFAULT_MAX_LEN: usize = 1 << 30;

    /// Takes a received fd as a region, if it is one: a memfd sealed against resizing
    /// (`F_SEAL_SHRINK | F_SEAL_GROW`) and against writes by anyone but its creator
    /// (`F_SEAL_FUTURE_WRITE` or `F_SEAL_WRITE`), not on hugetlbfs, of at most
    /// [`RegionView::DEFAULT_MAX_LEN`] bytes. Anything else is refused with an [`Error::Io`]
    /// of kind `InvalidInput` (or [`Error::TooLarge`]), and the fd is closed.
    pub fn from_fd(fd: OwnedFd) -> Result<RegionView> {
        RegionView::from_fd_with_limit(fd, RegionView::DEFAULT_MAX_LEN)
    }

    /// [`RegionView::from_fd`] with another size limit.
    pub fn from_fd_with_limit(fd: OwnedFd, max_len: usize) -> Result<RegionView> {
        let map = map_received(&fd, &DEMAND, max_len, Limit::Given)?;
        Ok(RegionView { fd, map })
    }

    /// [`RegionView::from_fd_with_limit`] for an fd a peer sent (the connection's lane): one
    /// refused is closed by typed-ipc's closer, off this thread, as closing it may wait for as
    /// long as the peer likes (a pipe whose lock it holds, sent in place of a memfd).
    pub(crate) fn from_peer_fd(fd: OwnedFd, max_len: usize) -> Result<RegionView> {
        match map_received(&fd, &DEMAND, max_len, Limit::Given) {
            Ok(map) => Ok(RegionView { fd, map }),
            Err(e) => {
                crate::closer::close(fd);
                Err(e)
            }
        }
    }

    /// Another view of the same region, as [`File::try_clone`] is another handle on the
    /// same file: a duplicate of the fd ([`OwnedFd::try_clone`]), mapped read-only again, to
    /// pass the region on (to a second worker, or one that restarted) and keep reading it.
    /// Nothing is checked again: the seals this view was accepted with can never be removed,
    /// so the clone's size is fixed and nobody but the creator can write its pages, and it
    /// reads them as this view does, through atomic loads. Each owns its fd and its mapping:
    /// send or drop either, the other stays whole.
    ///
    /// ```
    /// # extern crate ipc_runtime as typed_ipc;
    /// use typed_ipc::shared_region::SharedRegion;
    ///
    /// # fn main() -> typed_ipc::Result<()> {
    /// let mut region = SharedRegion::new(4096)?;
    /// let view = region.view()?; // in real use: received from the creator
    /// let passed_on = view.try_clone()?; // in real use: sent to another process
    /// region[..5].copy_from_slice(b"hello");
    /// assert_eq!(passed_on.to_vec(0, 5)?, b"hello");
    /// assert_eq!(view.to_vec(0, 5)?, b"hello");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Fails as `dup` or `mmap` does: out of fds, or of address space.
    ///
    /// [`File::try_clone`]: std::fs::File::try_clone
    pub fn try_clone(&self) -> std::io::Result<RegionView> {
        let fd = self.fd.try_clone()?;
        let map = Mapping::new(&fd, self.map.len, Access::Read)?;
        Ok(RegionView { fd, map })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Whether the region holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// The region as native-endian 64-bit words, read in place with atomic loads
    /// (`Ordering::Relaxed` compiles to a plain load). Covers every byte: a length that is
    /// not a multiple of 8 rounds up. The bytes past the end are whatever the creator's
    /// mapping, which spans the whole last page, put there: zero for a [`SharedRegion`]
    /// (whole pages, nothing past the end), anything for a region a peer sized otherwise.
    ///
    /// The words can only be loaded: the mapping is read-only, so a store, a swap or even a
    /// compare-and-exchange would fault, which is why this is not an `&[AtomicU64]`.
    ///
    /// ```compile_fail,E0599
    /// # use std::sync::atomic::Ordering;
    /// # use ipc_runtime::shared_region::SharedRegion;
    /// let view = SharedRegion::new(4096).unwrap().view().unwrap();
    /// view.words()[0].store(1, Ordering::Relaxed);
    /// ```
    pub fn words(&self) -> &[RegionWord] {
        let words = self.map.len.div_ceil(8);
        // SAFETY: the mapping is page-aligned (an empty one's placeholder 8-aligned, for no
        // words at all) and readable up to the end of its last page, which covers
        // `len.div_ceil(8)` words; its size is sealed, so it stays backed while `self` lives.
        // `RegionWord` is a transparent `AtomicU64`, which has the size and alignment of `u64`,
        // and offers nothing but relaxed atomic loads, the only atomic access allowed on
        // read-only memory; they may race with the creator's writes.
        unsafe { std::slice::from_raw_parts(self.map.ptr().cast::<RegionWord>(), words) }
    }

    /// Copies `dst.len()` bytes starting at `offset` into `dst`. A creator writing meanwhile
    /// can change what is copied but cannot cause undefined behaviour: the copy is inline
    /// assembly equivalent to relaxed atomic byte loads, which may race, and runs at `memcpy`
    /// speed. Bytes outside the region are [`Error::Malformed`].
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check(offset, dst.len())?;
        // SAFETY: `offset..offset + dst.len()` lies inside the mapping (checked), which stays
        // mapped and backed while `self` lives; `dst` is ours and writable.
        unsafe { copy_racy(self.map.ptr().add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// `len` bytes starting at `offset`, copied into a `Vec` of their own (see
    /// [`RegionView::copy_to`]).
    pub fn to_vec(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        self.check(offset, len)?;
        let mut v = crate::spare::with_capacity(len);
        // SAFETY: as in `copy_to`; the destination is the Vec's capacity of at least `len`
        // bytes, which `copy_racy` initialises before `set_len` claims them.
        unsafe {
            copy_racy(self.map.ptr().add(offset), v.as_mut_ptr(), len);
            v.set_len(len);
        }
        Ok(v)
    }

    /// Bytes `offset..offset + len` as a [`RegionReader`]: [`std::io::Read`],
    /// [`std::io::BufRead`] and [`std::io::Seek`] over copies of the region made a 4 KiB
    /// window at a time, for code that wants slices (a parser, a hash, a decoder). A slice it
    /// hands out holds still whatever the creator writes meanwhile. Bytes outside the region
    /// are [`Error::Malformed`].
    ///
    /// ```
    /// # extern crate ipc_runtime as typed_ipc;
    /// use std::io::BufRead;
    /// use typed_ipc::shared_region::SharedRegion;
    ///
    /// # fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    /// let mut region = SharedRegion::new(4096)?;
    /// let view = region.view()?; // in real use: received from the creator
    /// region[..13].copy_from_slice(b"one\ntwo\nthree");
    /// let lines: Vec<String> = view.reader(0, 13)?.lines().collect::<Result<_, _>>()?;
    /// assert_eq!(lines, ["one", "two", "three"]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn reader(&self, offset: usize, len: usize) -> Result<RegionReader<'_>> {
        self.check(offset, len)?;
        Ok(RegionReader::new(self, offset, offset + len))
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::Malformed(format!(
                "bytes {offset}..+{len} lie outside a shared region of {} bytes",
                self.len()
            ))),
        }
    }
}

/// One 64-bit word of a peer's region ([`RegionView::words`]), which the peer may be writing:
/// it can only be loaded, atomically.
#[repr(transparent)]
pub struct RegionWord(AtomicU64);

impl RegionWord {
    /// The word's value now: a relaxed atomic load (a plain load on x86-64), followed for
    /// `Acquire` and `SeqCst` by a fence of that ordering. Panics on `Release` and `AcqRel`,
    /// as [`AtomicU64::load`] does.
    #[inline]
    pub fn load(&self, order: Ordering) -> u64 {
        let value = self.0.load(Ordering::Relaxed);
        match order {
            Ordering::Relaxed => {}
            Ordering::Acquire | Ordering::SeqCst => fence(order),
            _ => panic!("there is no such ordering for a load: {order:?}"),
        }
        value
    }
}

impl fmt::Debug for RegionWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.load(Ordering::Relaxed).fmt(f)
    }
}

impl AsFd for RegionView {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl TryFrom<OwnedFd> for RegionView {
    type Error = Error;
    /// [`RegionView::from_fd`].
    fn try_from(fd: OwnedFd) -> Result<RegionView> {
        RegionView::from_fd(fd)
    }
}

impl fmt::Debug for RegionView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionView")
            .field("fd", &self.fd)
            .field("len", &self.map.len)
            .finish()
    }
}

/// On the wire: the memfd, as an index into the message's fd table.
impl Serialize for RegionView {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        crate::codec::fd::serialize(&self.fd, s)
    }
}

/// Takes the memfd from the message's fd table and checks it as
/// [`RegionView::from_fd_with_limit`] does, with the decoding connection's
/// [`Limits::max_shared_len`](crate::Limits::max_shared_len) as the limit
/// ([`RegionView::DEFAULT_MAX_LEN`] outside a connection). A refused fd is closed, by
/// typed-ipc's closer (off this thread: the guide, "slow closes"), and fails decoding: one over
/// the limit as [`Error::TooLarge`] (a request's caller gets it `by_peer`), any
/// other as [`Error::Malformed`] (a request's caller gets [`Error::Remote`]). A sound region
/// this side fails to map for a failure of its own (a system call a seccomp filter refuses,
/// no address space left) fails it as [`Error::Io`] instead.
impl<'de> Deserialize<'de> for RegionView {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::codec::shared_fd(d, &DEMAND, |fd, map| RegionView { fd, map })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_alignment() {
        let mut region = SharedRegion::new(100).unwrap();
        assert_eq!(region.len(), 4096);
        for (i, b) in region.iter_mut().enumerate() {
            *b = i as u8;
        }
        let view = region.view().unwrap();
        // Short strings are one `rep movsb`, from 256 bytes a vector loop (`bulk_copy`).
        let lens = (0..40).chain([255, 256, 257, 300, 1000, 4000]);
        for offset in 0..17 {
            for len in lens.clone() {
                let want: Vec<u8> = (offset..offset + len).map(|i| i as u8).collect();
                assert_eq!(view.to_vec(offset, len).unwrap(), want, "{offset}+{len}");
                let mut got = vec![0; len];
                view.copy_to(offset, &mut got).unwrap();
                assert_eq!(got, want, "{offset}+{len}");
            }
        }
        assert!(matches!(view.to_vec(4090, 7), Err(Error::Malformed(_))));
        assert!(matches!(
            view.to_vec(usize::MAX, 2),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            view.copy_to(4097, &mut []),
            Err(Error::Malformed(_))
        ));
    }

    /// A peer may send an empty region (a sealed memfd it never sized), which maps nothing:
    /// its words are an empty slice, not a slice at the unaligned placeholder address.
    #[test]
    fn an_empty_region_has_no_words() {
        let fd = new_memfd(0).unwrap();
        add_seals(&fd, APPLIED).unwrap();
        let view = RegionView::from_fd(fd).unwrap();
        assert!(view.is_empty());
        let words = view.words();
        assert!(words.is_empty());
        assert!(words.as_ptr().is_aligned(), "{:p}", words.as_ptr());
        assert_eq!(view.to_vec(0, 0).unwrap(), b"");
    }

    /// The last page of a region sized to no multiple of 8 is the creator's to write past the
    /// end, and its last word shows those bytes: they are not zero, whatever the length says.
    #[test]
    fn the_last_word_shows_what_the_creator_wrote_past_the_end() {
        let fd = new_memfd(100).unwrap();
        let map = Mapping::new(&fd, 100, Access::ReadWrite).unwrap();
        // SAFETY: byte 100 lies in the mapping's only page, which nothing else accesses.
        unsafe { *map.ptr().add(100) = 0xff };
        add_seals(&fd, APPLIED).unwrap();
        let view = RegionView::from_fd(fd).unwrap();
        let last = view.words()[12].load(Ordering::Relaxed).to_le_bytes();
        assert_eq!(last, [0, 0, 0, 0, 0xff, 0, 0, 0], "bytes 96..104 of 100");
    }
}
