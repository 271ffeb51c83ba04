//! A tokio host drives a pool of three blocking thumbnail workers, each a real process (this
//! test binary, re-run for an `#[ignore]`d `child_*` test), written from the documentation as
//! a user would: 200 jobs in flight at once, each an image in a memfd; a worker that panics
//! on a poisoned image is restarted and its jobs (the poisoned one and those queued behind it,
//! which its death fails with `Disconnected`) re-dispatched elsewhere; a worker stuck in a
//! job timed out, killed and restarted; a worker killed from outside mid-call, whose caller
//! fails at once with `Disconnected`; a oneway broadcast every worker has run before its next
//! call; and a clean shutdown, every worker exiting 0 and no fd left open.
//!
//! Nothing here synchronises by sleeping; the timeouts only turn a hang into a failure, but
//! for the stuck worker's, which is the behaviour under test.

#![cfg(feature = "tokio")]

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use common::{child, fd_count_lock};
use serde::{Deserialize, Serialize};
use typed_ipc::Error;
use typed_ipc::shared_buffer::{SealedBuffer, SharedBuffer};
use typed_ipc::tokio::worker;
use typed_ipc::worker::{Exit, Worker};

/// A thumbnail, and who made it with which quality.
#[derive(Debug, Serialize, Deserialize)]
pub struct Thumb {
    /// The shrunk pixels: one byte string, not a sequence of `u8`s.
    #[serde(with = "typed_ipc::bytes")]
    pub pixels: Vec<u8>,
    /// The whole image at this quality, in a memfd the worker sealed: no copy through the
    /// socket, and it cannot change under the host.
    pub full: SealedBuffer,
    pub quality: u8,
    pub worker_pid: u32,
}

/// Why a worker refuses an image: an answer, not a failure of the worker.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThumbError {
    /// The image has no pixels.
    Empty,
    /// The fd is not a regular file (a memfd), or could not be read.
    NotAFile,
    /// The worker could not make the result's buffer.
    NoMemory(String),
}

/// What a worker has done so far.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    pub jobs: u64,
    pub quality: u8,
    pub worker_pid: u32,
}

/// The blocking workers' interface; the host is async, so it asks for the async client.
#[typed_ipc::interface(name = "org.example.pool.Thumbnailer", async_client)]
pub trait Thumbnailer {
    /// Shrinks the image in `image` (a memfd) to at most `max_side` pixels.
    fn thumbnail(&self, image: OwnedFd, max_side: u32) -> Result<Thumb, ThumbError>;
    fn stats(&self) -> Stats;
    #[oneway]
    fn set_quality(&self, q: u8);
}

/// An image that makes a fragile worker panic (a worker started with [`FRAGILE`] set).
const POISON: &[u8] = b"POISON";
/// Environment variable that makes a worker panic on [`POISON`]: a bug of the first
/// generation of slot 0, which its restart does not have.
const FRAGILE: &str = "POOL_WORKER_FRAGILE";
const JOBS: u32 = 200;
const SLOTS: usize = 3;
/// A hang guard: far beyond what any call here takes, unless it is broken.
const GUARD: Duration = Duration::from_secs(60);

/// The worker's implementation.
struct Thumbnail {
    quality: AtomicU8,
    jobs: AtomicU64,
    fragile: bool,
}

/// What the worker makes of `image`, and what the host expects of it.
fn shrink(image: &[u8], max_side: u32, quality: u8) -> Vec<u8> {
    let step = image.len().div_ceil(max_side.max(1) as usize).max(1);
    image.iter().step_by(step).map(|b| b / quality).collect()
}

impl Thumbnailer for Thumbnail {
    fn thumbnail(&self, image: OwnedFd, max_side: u32) -> Result<Thumb, ThumbError> {
        self.jobs.fetch_add(1, Ordering::Relaxed);
        let file = File::from(image);
        let meta = file.metadata().map_err(|_| ThumbError::NotAFile)?;
        if meta.file_type().is_fifo() {
            // A stuck decoder: it says it has started (so the host knows the call is
            // running), then never returns.
            let _ = (&file).write_all(b"!");
            loop {
                std::thread::park();
            }
        }
        if !meta.is_file() || meta.len() > 1 << 20 {
            return Err(ThumbError::NotAFile);
        }
        let mut bytes = vec![0; meta.len() as usize];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|_| ThumbError::NotAFile)?;
        if bytes.is_empty() {
            return Err(ThumbError::Empty);
        }
        if self.fragile && bytes.starts_with(POISON) {
            panic!("poisoned image");
        }
        let quality = self.quality.load(Ordering::Relaxed);
        let mut full =
            SharedBuffer::new(bytes.len()).map_err(|e| ThumbError::NoMemory(e.to_string()))?;
        full.copy_from_slice(&shrink(&bytes, u32::MAX, quality));
        Ok(Thumb {
            pixels: shrink(&bytes, max_side, quality),
            full: full
                .seal()
                .map_err(|e| ThumbError::NoMemory(e.to_string()))?,
            quality,
            worker_pid: std::process::id(),
        })
    }

    fn stats(&self) -> Stats {
        Stats {
            jobs: self.jobs.load(Ordering::Relaxed),
            quality: self.quality.load(Ordering::Relaxed),
            worker_pid: std::process::id(),
        }
    }

    fn set_quality(&self, q: u8) {
        self.quality.store(q, Ordering::Relaxed);
    }
}

/// A pool worker: serves until the host hangs up, then returns (the process exits 0).
#[test]
#[ignore = "run as a child process by other tests"]
fn child_thumbnailer() {
    let imp = Thumbnail {
        quality: AtomicU8::new(1),
        jobs: AtomicU64::new(0),
        fragile: std::env::var_os(FRAGILE).is_some(),
    };
    let connection = typed_ipc::worker::connection().unwrap();
    ThumbnailerServer::new(imp).serve(connection).unwrap();
}

/// One worker of the pool and its client; `generation` counts its restarts, so that the
/// failures of many calls to one dead worker restart it once.
struct Slot {
    worker: Worker,
    client: ThumbnailerAsyncClient,
    generation: u32,
}

/// Three workers, restarted as they fail; jobs go round-robin, a failed one to the next.
struct Pool {
    slots: Vec<tokio::sync::Mutex<Slot>>,
    /// Exits of workers the pool replaced, and how many calls panicked.
    replaced: std::sync::Mutex<Vec<Exit>>,
    panics: AtomicU64,
    /// The quality every worker is to use: a restarted worker is told it before any job.
    quality: AtomicU8,
}

/// A new worker, which panics on [`POISON`] if `fragile`; it dies with this process's
/// thread that started it (the test's, or a runtime thread's).
fn start(fragile: bool) -> (Worker, ThumbnailerAsyncClient) {
    let mut command = child("child_thumbnailer");
    if fragile {
        command.env(FRAGILE, "1");
    }
    typed_ipc::worker::exit_with_parent(&mut command);
    let (worker, connection) = worker::spawn(command).unwrap();
    (worker, ThumbnailerAsyncClient::new(connection))
}

impl Pool {
    fn new() -> Pool {
        let slots = (0..SLOTS)
            .map(|i| {
                let (worker, client) = start(i == 0);
                tokio::sync::Mutex::new(Slot {
                    worker,
                    client,
                    generation: 0,
                })
            })
            .collect();
        Pool {
            slots,
            replaced: Default::default(),
            panics: AtomicU64::new(0),
            quality: AtomicU8::new(1),
        }
    }

    /// A clone of `slot`'s client, and the generation of the worker it calls.
    async fn client(&self, slot: usize) -> (ThumbnailerAsyncClient, u32) {
        let slot = self.slots[slot].lock().await;
        (slot.client.clone(), slot.generation)
    }

    /// Kills and replaces the worker of `slot`, unless it was replaced since `generation`.
    async fn restart(&self, slot: usize, generation: u32) {
        let mut slot = self.slots[slot].lock().await;
        if slot.generation != generation {
            return;
        }
        slot.worker.kill().unwrap();
        let exit = worker::wait(&mut slot.worker).await.unwrap();
        self.replaced.lock().unwrap().push(exit);
        (slot.worker, slot.client) = start(false);
        slot.generation += 1;
        // Sent ahead of every job the new worker gets, so it runs before them all.
        let quality = self.quality.load(Ordering::Relaxed);
        slot.client.set_quality(quality).await.unwrap();
    }

    /// Tells every worker to use quality `q` from now on. Each slot is locked while it is
    /// told, so a worker restarted meanwhile is told by `restart` instead.
    async fn set_quality(&self, q: u8) {
        self.quality.store(q, Ordering::Relaxed);
        for slot in &self.slots {
            slot.lock().await.client.set_quality(q).await.unwrap();
        }
    }

    /// Runs one job, on slot `first` and, should its worker fail, on the next ones.
    async fn dispatch(&self, first: usize, image: &[u8], max_side: u32) -> Thumb {
        for attempt in 0..SLOTS * 2 {
            let slot = (first + attempt) % SLOTS;
            let (client, generation) = self.client(slot).await;
            // A failed call took its fd with it: each attempt sends a memfd of its own.
            match client.thumbnail(common::memfd(image), max_side).await {
                Ok(answer) => return answer.expect("a good image is thumbnailed"),
                // The worker's state may be half-changed: replace it.
                Err(Error::Panicked(why)) => {
                    assert_eq!(
                        why,
                        "org.example.pool.Thumbnailer::thumbnail: poisoned image"
                    );
                    self.panics.fetch_add(1, Ordering::Relaxed);
                    self.restart(slot, generation).await;
                }
                // It died (or was replaced) with the job queued or running.
                Err(Error::Disconnected) => self.restart(slot, generation).await,
                Err(other) => panic!("job on slot {slot}: {other}"),
            }
        }
        panic!("a job failed on every worker");
    }
}

/// A pipe whose write end, sent as an image, makes a worker write a byte to it (read from
/// the other end once it is in the call) and never return.
fn stuck_decoder_pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
}

/// The image of job `n`: fake pixels that differ per job, or poison.
fn image(n: u32) -> Vec<u8> {
    if n == 3 {
        return [POISON, &[9; 100]].concat();
    }
    (0..1000 + n).map(|i| (i * 7 + n) as u8).collect()
}

#[test]
fn a_pool_of_workers_survives_panics_hangs_and_kills() {
    let _fds = fd_count_lock();
    let before = common::fd_snapshot();
    let rt = common::two_worker_runtime();
    rt.block_on(async {
        tokio::time::timeout(GUARD * 5, pool_session())
            .await
            .expect("the session hung");
    });
    drop(rt);
    before.assert_nothing_new();
}

async fn pool_session() {
    let pool = std::sync::Arc::new(Pool::new());

    // 200 jobs at once, round-robin; job 3 is poison to slot 0's first worker, which panics,
    // is replaced, and fails the jobs queued behind it: all are run again elsewhere.
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..JOBS {
        let pool = pool.clone();
        tasks.spawn(async move {
            let image = image(n);
            let thumb = pool.dispatch(n as usize % SLOTS, &image, 64).await;
            assert_eq!(thumb.quality, 1);
            assert_eq!(thumb.pixels, shrink(&image, 64, 1), "job {n}");
            assert!(thumb.pixels.len() <= 64);
            assert_eq!(thumb.full[..], image[..], "job {n}, at quality 1");
            thumb.worker_pid
        });
    }
    let mut done = 0;
    while let Some(pid) = tasks.join_next().await {
        assert_ne!(pid.unwrap(), 0);
        done += 1;
    }
    assert_eq!(done, JOBS);
    assert_eq!(
        pool.panics.load(Ordering::Relaxed),
        1,
        "job 3 panicked slot 0"
    );
    assert_eq!(*pool.replaced.lock().unwrap(), [Exit::Signal(9)]);
    assert_eq!(pool.slots[0].lock().await.generation, 1);

    // A worker's own refusal is an answer, not a failure.
    let (client, _) = pool.client(1).await;
    let refused = client.thumbnail(common::memfd(b""), 64).await.unwrap();
    assert_eq!(refused.unwrap_err(), ThumbError::Empty);

    // Slot 1 gets stuck: its call times out (the behaviour under test), the worker is killed
    // and replaced. (Had the worker not started the call by then, it would drop it, told by
    // the client: the outcome here is the same.)
    let (client, generation) = pool.client(1).await;
    let (started, stuck) = stuck_decoder_pipe();
    let client = client.with_timeout(Duration::from_secs(1));
    let answer = client.thumbnail(stuck, 64).await;
    drop(started);
    assert!(matches!(answer, Err(Error::TimedOut)), "{answer:?}");
    pool.restart(1, generation).await;
    assert_eq!(pool.replaced.lock().unwrap()[1], Exit::Signal(9));

    // Slot 2 is killed from outside while its call runs, a stats call queued behind it: both
    // callers fail at once with `Disconnected` (they have no timeout: it cannot be
    // `TimedOut`).
    let (client, generation) = pool.client(2).await;
    let pid = pool.slots[2].lock().await.worker.id();
    let (started, stuck) = stuck_decoder_pipe();
    let stuck_call = client.clone();
    let call = tokio::spawn(async move { stuck_call.thumbnail(stuck, 64).await });
    tokio::task::spawn_blocking(move || File::from(started).read_exact(&mut [0; 1]).unwrap())
        .await
        .unwrap();
    let queued = tokio::spawn(async move { client.stats().await });
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let (answer, stats) = tokio::time::timeout(GUARD, async { tokio::join!(call, queued) })
        .await
        .expect("callers of a dead worker hung");
    let (answer, stats) = (answer.unwrap(), stats.unwrap());
    assert!(matches!(answer, Err(Error::Disconnected)), "{answer:?}");
    assert!(matches!(stats, Err(Error::Disconnected)), "{stats:?}");
    pool.restart(2, generation).await;
    assert_eq!(pool.replaced.lock().unwrap()[2], Exit::Signal(9));

    // A oneway to every worker, then a call to each: the call runs after the oneway.
    pool.set_quality(3).await;
    for slot in 0..SLOTS {
        let (client, _) = pool.client(slot).await;
        let stats = client.stats().await.unwrap();
        assert_eq!(stats.quality, 3, "slot {slot}");
        assert_eq!(stats.worker_pid, pool.slots[slot].lock().await.worker.id());
        let image = image(1000);
        let thumb = pool.dispatch(slot, &image, 10).await;
        assert_eq!(thumb.full[..], shrink(&image, u32::MAX, 3));
        assert_eq!((thumb.quality, thumb.pixels), (3, shrink(&image, 10, 3)));
    }

    // Slot 0, idle, is killed from outside: its next job fails with `Disconnected`, and the
    // pool replaces it and runs the job on slot 1; the new worker was told the quality too.
    let pid = pool.slots[0].lock().await.worker.id();
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let image = image(2000);
    let thumb = pool.dispatch(0, &image, 10).await;
    assert_eq!(pool.replaced.lock().unwrap()[3], Exit::Signal(9));
    assert_eq!(thumb.worker_pid, pool.slots[1].lock().await.worker.id());
    let thumb = pool.dispatch(0, &image, 10).await;
    assert_eq!(thumb.worker_pid, pool.slots[0].lock().await.worker.id());
    assert_eq!((thumb.quality, thumb.pixels), (3, shrink(&image, 10, 3)));

    // Shut down: hang up on each worker, which then returns from `serve` and exits 0.
    let pool = std::sync::Arc::into_inner(pool).expect("no job holds the pool");
    for slot in pool.slots {
        let mut slot = slot.into_inner();
        slot.client.connection().close();
        drop(slot.client);
        let exit = tokio::time::timeout(GUARD, worker::wait(&mut slot.worker))
            .await
            .expect("a worker did not exit once hung up on")
            .unwrap();
        assert_eq!(exit, Exit::Code(0));
    }
}
