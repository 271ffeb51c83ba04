//! The typed-ipc benchmark interfaces (blocking and async) and their servers, shared by the
//! `ipc-bench` harness (the `typed-ipc*` rows) and the `hot-path` and `instructions` binaries
//! (per-call counts); and pinning a process to a CPU, which all three do.

use std::hint::black_box;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::sys::resource::{UsageWho, getrusage};
use nix::unistd::Pid;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use typed_ipc::shared_buffer::SealedBuffer;
use typed_ipc::shared_region::{RegionView, RegionWord};
use typed_ipc::{SharedBytes, interface};

/// The runtime each side of the async rows runs on: current-thread, IO enabled (as a
/// single-threaded async worker would use).
pub fn current_thread_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
}

/// Pins the calling thread, and the threads and processes it starts later, to `cpu`.
pub fn pin(cpu: usize) -> std::io::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)?;
    Ok(())
}

/// The CPUs the calling thread may run on (`taskset`, a cpuset cgroup), ascending. Read it
/// before [`pin`] narrows it.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0))?;
    Ok((0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect())
}

/// The `n`th (from 0) of the CPUs this process could run on when it first asked, which is
/// before it first pinned itself through here: the single-purpose binaries (`hot-path`,
/// `instructions`, `copies`) pin to `nth_allowed_cpu(0)`, and a cross-CPU server to the next.
pub fn nth_allowed_cpu(n: usize) -> std::io::Result<usize> {
    static ALLOWED: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    let allowed = match ALLOWED.get() {
        Some(allowed) => allowed,
        None => ALLOWED.get_or_init(|| allowed_cpus().unwrap_or_default()),
    };
    allowed.get(n).copied().ok_or_else(|| {
        std::io::Error::other(format!(
            "this process may run on {} CPUs, and CPU number {n} (from 0) of them was asked for",
            allowed.len()
        ))
    })
}

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
    /// Reused zero copy: keeps the client's region (mapped once, written only by the client).
    fn attach_region(&self, region: RegionView);
    /// Reads the first `len` bytes of the attached region in place, with atomic loads,
    /// returns their [`checksum`].
    fn sum_region(&self, len: u64) -> u64;
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
/// code); only the sender differs: it sends part of a buffer it keeps, as
/// [`SharedBytes`], instead of giving up a `Vec` it would have to rebuild for the next call
/// (and on a connection that lends its pages, from 128 KiB to 1 MiB, the connection pipes it:
/// one copy). Producing the data is the caller's business, not the transport's, so the bulk
/// rows do not time it.
#[derive(Debug)]
pub enum Blob {
    /// Bytes of a buffer the sender keeps.
    Shared(SharedBytes),
    /// Received bytes.
    Owned(Vec<u8>),
}

impl Blob {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Blob::Shared(bytes) => bytes,
            Blob::Owned(v) => v,
        }
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Blob::Shared(bytes) => bytes.serialize(s),
            Blob::Owned(v) => typed_ipc::bytes::serialize(v, s),
        }
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
    region: Mutex<Option<RegionView>>,
    allocs: fn() -> u64,
}

impl BenchImpl {
    /// A server whose [`Bench::allocs`] reports `allocs()`.
    pub fn new(allocs: fn() -> u64) -> BenchImpl {
        BenchImpl {
            sunk: AtomicU64::new(0),
            region: Mutex::new(None),
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

    fn attach_region(&self, region: RegionView) {
        *self.region.lock().unwrap_or_else(PoisonError::into_inner) = Some(region);
    }

    fn sum_region(&self, len: u64) -> u64 {
        let region = self.region.lock().unwrap_or_else(PoisonError::into_inner);
        let region = region.as_ref().expect("attach_region first");
        checksum_words(region.words(), (len as usize).min(region.len()))
    }

    fn cpu_ns(&self) -> u64 {
        cpu_ns(UsageWho::RUSAGE_SELF)
    }

    fn allocs(&self) -> u64 {
        (self.allocs)()
    }
}

/// What the async rows call: [`Bench`]'s `echo` and `put` as `async fn`s, and `allocs` for
/// `hot-path`.
#[interface]
pub trait AsyncBench {
    /// Small calls: returns `data` unchanged.
    async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    /// Bulk: takes the bytes as an owned `Vec<u8>`, returns how many arrived.
    async fn put(&self, data: Blob) -> u64;
    /// Heap allocations this server process has made so far (0 unless its binary counts).
    async fn allocs(&self) -> u64;
}

/// The server side of [`AsyncBench`].
pub struct AsyncBenchImpl {
    allocs: fn() -> u64,
}

impl AsyncBenchImpl {
    /// A server whose [`AsyncBench::allocs`] reports `allocs()`.
    pub fn new(allocs: fn() -> u64) -> AsyncBenchImpl {
        AsyncBenchImpl { allocs }
    }
}

impl AsyncBench for AsyncBenchImpl {
    async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }

    async fn put(&self, data: Blob) -> u64 {
        black_box(data.as_bytes()).len() as u64
    }

    async fn allocs(&self) -> u64 {
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

/// [`checksum`] of the first `len` bytes of a shared region, read in place with relaxed atomic
/// loads (plain loads on x86-64): the creator may be writing, so there is no `&[u8]` to read.
pub fn checksum_words(words: &[RegionWord], len: usize) -> u64 {
    let full = len / 8;
    let mut sum = 0u64;
    for word in &words[..full] {
        sum = sum.wrapping_add(u64::from_le(word.load(Ordering::Relaxed)));
    }
    if len % 8 != 0 {
        let tail = words[full].load(Ordering::Relaxed).to_le_bytes();
        sum = tail[..len % 8]
            .iter()
            .fold(sum, |sum, &b| sum.wrapping_add(u64::from(b)));
    }
    sum
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_words_matches() {
        use typed_ipc::shared_region::SharedRegion;
        let mut region = SharedRegion::new(70_000).unwrap();
        for (i, b) in region.iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        let view = region.view().unwrap();
        for len in [0, 1, 7, 8, 9, 4096, 65_541] {
            assert_eq!(
                checksum_words(view.words(), len),
                checksum(&region[..len]),
                "{len}"
            );
        }
    }

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
