//! The typed-ipc benchmark interface and its server, shared by the `ipc-bench` harness (the
//! `typed-ipc*` rows) and the `hot-path` binary (syscall and allocation counts per call).

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use nix::sys::resource::{UsageWho, getrusage};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use typed_ipc::interface;
use typed_ipc::shared_buffer::SealedBuffer;

/// Every method the benchmarks call, written the way a typed-ipc user would.
#[interface]
pub trait Bench {
    /// No payload at all: what the runtime costs by itself.
    fn ping(&self, x: u64) -> u64;
    /// Small calls: returns `data` unchanged.
    fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    /// Small calls with one fd each way: returns `data` and `fd` (the fd that arrived goes
    /// back, as the kernel's new number for it).
    fn echo_fd(&self, data: Vec<u8>, fd: OwnedFd) -> Echoed;
    /// Fire and forget.
    #[oneway]
    fn sink(&self, data: Vec<u8>);
    /// How many `sink` messages have arrived so far.
    fn sunk(&self) -> u64;
    /// Bulk through the transport (fragmented above 64 KiB): takes the bytes as an owned
    /// `Vec<u8>`, returns how many arrived.
    fn put(&self, data: Blob) -> u64;
    /// Bulk as a fresh sealed memfd: checks the seals, copies the bytes out into an owned
    /// `Vec<u8>`, returns how many.
    fn put_sealed(&self, data: SealedBuffer) -> u64;
    /// Zero copy: reads every byte of the sealed buffer in place, returns its [`checksum`].
    fn sum_sealed(&self, data: SealedBuffer) -> u64;
    /// Pooled zero copy: maps `region` once (size-sealed, not write-sealed).
    fn attach_pool(&self, region: OwnedFd);
    /// Reads the first `len` bytes of the attached region in place, returns their
    /// [`checksum`].
    fn sum_pool(&self, len: u64) -> u64;
    /// CPU time this server process has used so far, in nanoseconds (user + system).
    fn cpu_ns(&self) -> u64;
    /// Heap allocations this server process has made so far (0 unless its binary counts).
    fn allocs(&self) -> u64;
}

/// The reply of [`Bench::echo_fd`]: bytes and an fd, in a user type.
#[derive(Debug, Serialize, Deserialize)]
pub struct Echoed {
    /// The bytes, as one byte string.
    #[serde(with = "typed_ipc::bytes")]
    pub data: Vec<u8>,
    /// The fd.
    #[serde(with = "typed_ipc::fd")]
    pub fd: OwnedFd,
}

/// Bulk bytes: sent from a buffer the sender already has, received as an owned `Vec<u8>`.
///
/// On the wire this is exactly a `Vec<u8>` parameter (one byte string, decoded by the same
/// code); only the sender differs, which serializes a slice of a shared buffer instead of
/// giving up a `Vec` it would have to rebuild for the next call. Producing the data is the
/// caller's business, not the transport's, so the bulk rows do not time it.
#[derive(Debug)]
pub enum Blob {
    /// The first `.1` bytes of a buffer the sender keeps.
    Shared(Arc<Vec<u8>>, usize),
    /// Received bytes.
    Owned(Vec<u8>),
}

impl Blob {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Blob::Shared(buf, len) => &buf[..*len],
            Blob::Owned(v) => v,
        }
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        typed_ipc::bytes::serialize(self.as_bytes(), s)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        typed_ipc::bytes::deserialize(d).map(Blob::Owned)
    }
}

/// The server side of [`Bench`].
pub struct BenchImpl {
    sunk: AtomicU64,
    pool: Mutex<Option<Region>>,
    allocs: fn() -> u64,
}

impl BenchImpl {
    /// A server whose [`Bench::allocs`] reports `allocs()`.
    pub fn new(allocs: fn() -> u64) -> BenchImpl {
        BenchImpl {
            sunk: AtomicU64::new(0),
            pool: Mutex::new(None),
            allocs,
        }
    }
}

impl Bench for BenchImpl {
    fn ping(&self, x: u64) -> u64 {
        x + 1
    }

    fn echo(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }

    fn echo_fd(&self, data: Vec<u8>, fd: OwnedFd) -> Echoed {
        Echoed { data, fd }
    }

    fn sink(&self, data: Vec<u8>) {
        black_box(&data);
        self.sunk.fetch_add(1, Ordering::Relaxed);
    }

    fn sunk(&self) -> u64 {
        self.sunk.load(Ordering::Relaxed)
    }

    fn put(&self, data: Blob) -> u64 {
        black_box(data.as_bytes()).len() as u64
    }

    fn put_sealed(&self, data: SealedBuffer) -> u64 {
        let owned: Vec<u8> = data.to_vec();
        drop(data);
        black_box(owned).len() as u64
    }

    fn sum_sealed(&self, data: SealedBuffer) -> u64 {
        checksum(&data)
    }

    fn attach_pool(&self, region: OwnedFd) {
        let region = Region::map(region, false).expect("mapping the pool region");
        *self.pool.lock().unwrap_or_else(PoisonError::into_inner) = Some(region);
    }

    fn sum_pool(&self, len: u64) -> u64 {
        let pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        let region = pool.as_ref().expect("attach_pool first");
        // SAFETY: the only writer is the benchmark client, which writes the region before a
        // call and not again until it has the reply, so nothing writes while we read.
        let bytes = unsafe { region.bytes() };
        checksum(&bytes[..len as usize])
    }

    fn cpu_ns(&self) -> u64 {
        cpu_ns(UsageWho::RUSAGE_SELF)
    }

    fn allocs(&self) -> u64 {
        (self.allocs)()
    }
}

/// Reads every byte of `bytes`: the wrapping sum of its little-endian `u64` words, plus the
/// bytes of a tail shorter than a word. Compiles to loads and adds, so it runs at the speed
/// memory delivers the bytes, which is what a receiver reading in place is measured on.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    let mut sum = 0u64;
    for word in &mut words {
        sum = sum.wrapping_add(u64::from_le_bytes(word.try_into().expect("8 bytes")));
    }
    words
        .remainder()
        .iter()
        .fold(sum, |sum, &b| sum.wrapping_add(u64::from(b)))
}

/// What [`checksum`] gives for `len` bytes all equal to `fill`.
pub fn checksum_of_fill(fill: u8, len: usize) -> u64 {
    let word = u64::from_le_bytes([fill; 8]);
    (len as u64 / 8)
        .wrapping_mul(word)
        .wrapping_add((len as u64 % 8) * u64::from(fill))
}

/// CPU time (user + system) of `who`, in nanoseconds.
pub fn cpu_ns(who: UsageWho) -> u64 {
    let Ok(usage) = getrusage(who) else {
        return 0;
    };
    let ns =
        |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000_000 + t.tv_usec() as u64 * 1000;
    ns(usage.user_time()) + ns(usage.system_time())
}

/// A memfd region mapped once and reused for every message: the pooled zero-copy variant.
/// It is sealed against shrinking and growing (so a mapping never loses its pages and reads
/// cannot `SIGBUS`), but not against writing, so reading it in place is only safe between
/// parties that follow a protocol — here: the client writes, then calls, and waits.
pub struct Region {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is an address range; access goes through `bytes`/`bytes_mut`, whose
// callers uphold the protocol above.
unsafe impl Send for Region {}

impl Region {
    /// A new size-sealed memfd of `len` bytes (> 0), mapped writable.
    pub fn create(len: usize) -> nix::Result<Region> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let fd = memfd_create(
            c"ipc-bench-pool",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        nix::unistd::ftruncate(&fd, len as i64)?;
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
        )?;
        Region::map(fd, true)
    }

    /// Maps a received region (checking that its size is sealed), writable or not.
    pub fn map(fd: OwnedFd, writable: bool) -> nix::Result<Region> {
        let seals = SealFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GET_SEALS)?);
        if !seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW) {
            return Err(nix::Error::EINVAL);
        }
        let len = nix::sys::stat::fstat(&fd)?.st_size as usize;
        let length = NonZeroUsize::new(len).ok_or(nix::Error::EINVAL)?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a fresh shared mapping at a kernel-chosen address; the file's size is sealed
        // at `len`, so every page of the range stays backed.
        let ptr = unsafe { mmap(None, length, prot, MapFlags::MAP_SHARED, &fd, 0)? };
        Ok(Region {
            fd,
            ptr: ptr.cast(),
            len,
        })
    }

    /// The memfd, to send to the peer.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The bytes, read in place.
    ///
    /// # Safety
    /// Nothing (in any process) may write the region while the slice lives.
    pub unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: a live mapping of `len` bytes; the caller rules out writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, for writing (the region must have been mapped writable).
    ///
    /// # Safety
    /// Nothing (in any process) may read or write the region while the slice lives.
    pub unsafe fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: a live writable mapping of `len` bytes; the caller rules out other access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer borrowed.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_fill() {
        for len in [0, 1, 7, 8, 9, 4096, 65_541] {
            for fill in [1u8, 0x5a, 254] {
                assert_eq!(
                    checksum(&vec![fill; len]),
                    checksum_of_fill(fill, len),
                    "{len} × {fill}"
                );
            }
        }
    }
}
