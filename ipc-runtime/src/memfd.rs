//! The memfd plumbing under [`shared_buffer`](crate::shared_buffer) and
//! [`shared_region`](crate::shared_region): creating memfds, checking a received one's seals and
//! size, and mapping them.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap, munmap};
use nix::sys::stat::{SFlag, fstat};
use nix::sys::statfs::{HUGETLBFS_MAGIC, fstatfs};
use nix::unistd::ftruncate;

use crate::error::{Error, Limit, Result};

/// Whether `MFD_NOEXEC_SEAL` (Linux 6.3) was refused once, so we stop asking for it.
static NO_NOEXEC_SEAL: AtomicBool = AtomicBool::new(false);

/// A close-on-exec memfd that allows sealing, of `len` bytes.
pub(crate) fn new_memfd(len: usize) -> Result<OwnedFd> {
    const NAME: &std::ffi::CStr = c"typed-ipc-buffer";
    let base = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
    let fd = if NO_NOEXEC_SEAL.load(Ordering::Relaxed) {
        memfd_create(NAME, base)?
    } else {
        // Not executable, ever (and no kernel warning about memfds that could be).
        match memfd_create(
            NAME,
            base | MFdFlags::from_bits_retain(libc::MFD_NOEXEC_SEAL),
        ) {
            Err(Errno::EINVAL) => {
                NO_NOEXEC_SEAL.store(true, Ordering::Relaxed);
                memfd_create(NAME, base)?
            }
            r => r?,
        }
    };
    if len > 0 {
        let size = i64::try_from(len).map_err(|_| Error::TooLarge {
            size: len as u64,
            limit: i64::MAX as u64,
            which: Limit::System,
            by_peer: false,
        })?;
        ftruncate(&fd, size)?;
    }
    Ok(fd)
}

/// Adds `seals`. The kernel refuses `F_SEAL_WRITE` with `EBUSY` while anything still holds a
/// page of the file (a writable mapping, or a transient page reference, which it waits ~150 ms
/// for before giving up); seen once in thousands of seals under load, so a refusal is retried
/// twice before it is returned.
pub(crate) fn add_seals(fd: &OwnedFd, seals: SealFlag) -> Result<()> {
    let mut attempts = 0;
    loop {
        match fcntl(fd, FcntlArg::F_ADD_SEALS(seals)) {
            Err(Errno::EBUSY) if attempts < 2 => attempts += 1,
            r => return Ok(r.map(drop)?),
        }
    }
}

/// What a receiver demands of a memfd before mapping it.
pub(crate) struct Demand {
    /// What the fd must be, for error messages: "a sealed buffer".
    pub what: &'static str,
    /// Seals that must all be present.
    pub all: SealFlag,
    /// Seals of which at least one must be present (empty: none needed).
    pub any: SealFlag,
    /// Why the seals matter, for error messages.
    pub because: &'static str,
}

/// Checks a received fd against `demand` and maps it read-only: the fd must be a regular file
/// (a memfd, not on hugetlbfs) carrying the demanded seals, of at most `max_len` bytes (a
/// size the seals have fixed), and open for reading unless it is empty (nothing is mapped
/// then). A refusal is an [`Error::Io`] of kind `InvalidInput` (or [`Error::TooLarge`], which
/// names `max_len` as `which`, unless it is over what this process can map).
pub(crate) fn map_received(
    fd: &OwnedFd,
    demand: &Demand,
    max_len: usize,
    which: Limit,
) -> Result<Mapping> {
    let len = checked_len(fd, demand, max_len, which)?;
    Mapping::new(fd, len, Access::Read).map_err(|e| match e {
        // Sealed and a memfd, but opened write-only (reopened through /proc): as unreadable
        // as any other fd that is not a buffer, so refused alike, not a permission failure.
        Error::Io(e) if e.raw_os_error() == Some(libc::EACCES) => {
            refused(demand, "the fd is not open for reading".into())
        }
        e => e,
    })
}

/// The refusal of a received fd that is not what `demand` asks for.
#[cold]
fn refused(demand: &Demand, why: String) -> Error {
    Error::Io(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not {}: {why}", demand.what),
    ))
}

/// The size of a received fd that meets `demand` (see [`map_received`]).
fn checked_len(fd: &OwnedFd, demand: &Demand, max_len: usize, which: Limit) -> Result<usize> {
    let refuse = |why: String| refused(demand, why);
    let seals = match fcntl(fd, FcntlArg::F_GET_SEALS) {
        Ok(bits) => SealFlag::from_bits_retain(bits),
        Err(Errno::EINVAL) => {
            return Err(refuse(format!(
                "the fd cannot be sealed (not a memfd), so {}",
                demand.because
            )));
        }
        // The only other failure of F_GET_SEALS on an open fd: an O_PATH fd, which cannot be
        // read or mapped either.
        Err(Errno::EBADF) => return Err(refuse("the fd is not open for reading".into())),
        Err(e) => return Err(e.into()),
    };
    if !seals.contains(demand.all) {
        return Err(refuse(format!(
            "the memfd lacks the seals {:?}, so {}",
            demand.all.difference(seals),
            demand.because
        )));
    }
    if !demand.any.is_empty() && !seals.intersects(demand.any) {
        return Err(refuse(format!(
            "the memfd has none of the seals {:?}, so {}",
            demand.any, demand.because
        )));
    }
    // Sealed against shrinking and growing: the size read now is the size for good.
    let stat = fstat(fd)?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(refuse("the fd is not a regular file".into()));
    }
    if fstatfs(fd)?.filesystem_type() == HUGETLBFS_MAGIC {
        // Seals hold there too, but a huge page is allocated when a page the sender never
        // wrote is first read, and where none can be had (a hugetlb cgroup limit: it is
        // charged at fault time) the reader gets a `SIGBUS` instead of an error.
        return Err(refuse(
            "the memfd is on hugetlbfs (MFD_HUGETLB), where reading it can raise SIGBUS".into(),
        ));
    }
    let (limit, which) = if max_len > isize::MAX as usize {
        (isize::MAX as usize, Limit::System)
    } else {
        (max_len, which)
    };
    usize::try_from(stat.st_size)
        .ok()
        .filter(|&len| len <= limit)
        .ok_or(Error::TooLarge {
            size: stat.st_size as u64,
            limit: limit as u64,
            which,
            by_peer: false,
        })
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    ReadWrite,
}

/// A shared mapping of a whole file (private where the kernel refuses a shared one of a file
/// sealed against writing, as kernels before 6.7 do); unmapped on drop. Empty files are not
/// mapped (`mmap` refuses length 0) and get a dangling, never-dereferenced pointer, aligned
/// for the words a [`RegionView`](crate::shared_region::RegionView) reads: an empty slice of
/// them must still start at an aligned address.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    pub len: usize,
}

// SAFETY: a Mapping is an address range owned by one value; the bytes behind it are only
// accessed through borrows of its owner, whose types say how (see their SAFETY comments), so
// moving or sharing it across threads is as safe as for a `Box<[u8]>`.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn new(fd: &OwnedFd, len: usize, access: Access) -> Result<Mapping> {
        let Some(length) = NonZeroUsize::new(len) else {
            return Ok(Mapping {
                ptr: NonNull::<u64>::dangling().cast(),
                len: 0,
            });
        };
        let (prot, flags) = match access {
            // Not populated: a received buffer may be sparse, and reading a hole allocates a
            // page; the receiver pays only for what it reads.
            Access::Read => (ProtFlags::PROT_READ, MapFlags::MAP_SHARED),
            // Populated once it is kept from children forked meanwhile, below.
            Access::ReadWrite => (
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            ),
        };
        // SAFETY: a new shared mapping at an address the kernel picks cannot overlap memory
        // Rust already uses; the file is `len` bytes long (set by us, or fixed by seals), so
        // the whole range is backed.
        let ptr = match unsafe { mmap(None, length, prot, flags, fd, 0) } {
            // Kernels before 6.7 refuse any shared mapping of a file sealed against writing,
            // a read-only one too. Its bytes can never change, so a private read-only
            // mapping reads the very same pages.
            Err(Errno::EPERM) if access == Access::Read && write_sealed(fd) => {
                // SAFETY: as above, the mapping private instead of shared.
                unsafe { mmap(None, length, prot, MapFlags::MAP_PRIVATE, fd, 0)? }
            }
            mapped => mapped?,
        };
        let map = Mapping {
            ptr: ptr.cast(),
            len,
        };
        if access == Access::ReadWrite {
            // A child forked while we hold the writable view must not inherit it: it would
            // make sealing fail with EBUSY until it exits or execs, or write behind our back.
            // SAFETY: MADV_DONTFORK only changes what fork copies; the range is our mapping.
            unsafe { madvise(ptr, len, MmapAdvise::MADV_DONTFORK)? };
            // A new buffer is there to be filled, and allocating every page in one call is
            // cheaper than a page fault per page (about 15% at 16 MiB here). Only now, not by
            // `MAP_POPULATE` in the `mmap`: that takes milliseconds for a large buffer, and a
            // thread spawning a worker (a fork) meanwhile would copy the view into the child.
            // Kernels before 5.14 refuse the advice: the pages then come as they are written.
            // SAFETY: populating only allocates the pages of our own mapping, writable.
            let _ = unsafe { madvise(ptr, len, MmapAdvise::MADV_POPULATE_WRITE) };
            #[cfg(test)]
            tests::after_populate();
        }
        Ok(map)
    }

    /// The first byte. Page-aligned (8-aligned if `len` is 0), valid for reads of `len` bytes
    /// (and up to the end of the last page), for writes too if mapped writable.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// # Safety
    /// The caller guarantees nothing writes the mapped bytes while the slice lives.
    pub unsafe fn slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for reads of `len` bytes (a live mapping, or dangling with
        // len 0), `len` ≤ isize::MAX (checked before mapping), and the caller rules out writes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// # Safety
    /// The mapping must be writable, and nothing else may access the bytes while the slice
    /// lives.
    pub unsafe fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `slice`, plus writable and exclusive per the caller.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// Whether `fd` carries `F_SEAL_WRITE`, so that nobody can ever change its bytes.
fn write_sealed(fd: &OwnedFd) -> bool {
    fcntl(fd, FcntlArg::F_GET_SEALS)
        .is_ok_and(|seals| SealFlag::from_bits_retain(seals).contains(SealFlag::F_SEAL_WRITE))
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr`/`len` is a mapping this value made and nothing borrows any more.
            let _ = unsafe { munmap(self.ptr.cast(), self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::os::fd::AsRawFd;

    thread_local! {
        /// Run once by this thread's next writable mapping, once its pages are populated.
        static AFTER_POPULATE: Cell<Option<fn()>> = const { Cell::new(None) };
        /// The child forked by [`fork_a_waiting_child`], and the write end of the pipe it
        /// waits on.
        static CHILD: Cell<Option<(libc::pid_t, OwnedFd)>> = const { Cell::new(None) };
    }

    pub(super) fn after_populate() {
        if let Some(f) = AFTER_POPULATE.take() {
            f();
        }
    }

    /// Forks a child that waits until the pipe in [`CHILD`] is closed, then exits:
    /// a thread of a host spawning a worker (`fork`, then `exec`) at that moment.
    fn fork_a_waiting_child() {
        // Close-on-exec: a process another test spawns meanwhile must not keep it open.
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // SAFETY: the child makes only async-signal-safe calls (`close`, `read`, `_exit`)
        // before it exits, as a child forked from a threaded process must.
        match unsafe { libc::fork() } {
            0 => {
                let mut byte = 0u8;
                // SAFETY: the child lets go of its copy of the write end, so that the
                // parent's closing it ends the `read`, which writes at most one byte into
                // `byte`, ours.
                unsafe {
                    libc::close(write.as_raw_fd());
                    libc::read(read.as_raw_fd(), (&raw mut byte).cast(), 1);
                    libc::_exit(0);
                }
            }
            -1 => panic!("fork failed: {}", io::Error::last_os_error()),
            pid => CHILD.set(Some((pid, write))),
        }
    }

    /// A child forked while a new buffer's pages are populated (a worker spawned on another
    /// thread, say) gets no copy of its writable view, so the buffer can be sealed while the
    /// child lives. With the pages populated before the view was kept from children
    /// (`MAP_POPULATE`), a fork in those milliseconds made sealing fail with `EBUSY`.
    #[test]
    fn a_child_forked_as_a_buffer_is_populated_does_not_keep_it_from_being_sealed() {
        let fd = new_memfd(1 << 20).unwrap();
        AFTER_POPULATE.set(Some(fork_a_waiting_child));
        let map = Mapping::new(&fd, 1 << 20, Access::ReadWrite).unwrap();
        let (child, waits_on) = CHILD.take().expect("a child was forked");
        drop(map);
        let sealed = fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE));
        drop(waits_on); // the child reads the end of the pipe, and exits
        let child = nix::unistd::Pid::from_raw(child);
        nix::sys::wait::waitpid(child, None).unwrap();
        sealed.expect("sealed while the child forked meanwhile lives");
    }
}
