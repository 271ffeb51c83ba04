//! The typed-ipc demo: a camera pipeline and its image-processing algorithm (IPA), the IPA
//! isolated in a worker process.
//!
//! The parent is the pipeline. It starts the IPA as a worker process (this same program,
//! re-executed with `--worker`), then talks to it only through the stubs `#[interface]`
//! generates from two traits:
//!
//! - [`Ipa`], served by the worker: `init`, `configure` (a `Result`: one configuration is
//!   rejected), and `queue_frame`, which hands over a frame buffer, a memfd, as an `OwnedFd`;
//! - [`Pipeline`], served by the parent: the worker calls back `stats_ready` with the frame's
//!   statistics (mean brightness, histogram) in a memfd of its own, also an `OwnedFd`.
//!
//! Both directions share one connection: the parent serves [`Pipeline`] on a thread while its
//! main thread calls [`Ipa`]. At the end the parent closes the connection and the worker,
//! seeing the hang-up, exits; the parent prints its exit status.
//!
//! ```text
//! cargo run --example demo                       # the story
//! TYPED_IPC_DEBUG=1 cargo run --example demo     # ... and every message, on stderr
//! cargo run --example demo -- --crash            # the worker crashes at frame 1
//! ```
//!
//! If the worker dies, the parent says so and exits non-zero.

use std::error::Error;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};

use nix::sys::memfd::{MFdFlags, memfd_create};
use serde::{Deserialize, Serialize};
use typed_ipc::interface;
use typed_ipc::worker::{self, Exit, Worker};

/// What the pipeline asks of the sensor, and so of the IPA.
#[derive(Debug, Serialize, Deserialize)]
pub struct SensorConfig {
    pub width: u32,
    pub height: u32,
}

/// What the IPA can do with an accepted configuration.
#[derive(Debug, Serialize, Deserialize)]
pub struct Caps {
    pub histogram_bins: u32,
}

/// Why the IPA rejects a configuration.
#[derive(Debug, Serialize, Deserialize)]
pub enum ConfigError {
    TooLarge { max_width: u32, max_height: u32 },
}

/// The IPA, served by the worker.
#[interface]
pub trait Ipa {
    /// Loads the algorithm; returns the process id it runs in.
    fn init(&self, name: String) -> u32;
    /// Prepares for frames of this size.
    fn configure(&self, config: SensorConfig) -> Result<Caps, ConfigError>;
    /// Processes a frame, one 8-bit grey pixel per byte; the stats come back through
    /// [`Pipeline::stats_ready`].
    #[oneway]
    fn queue_frame(&self, frame: u32, buffer: OwnedFd);
}

/// The pipeline, served by the parent: what the IPA reports back.
#[interface]
pub trait Pipeline {
    /// The statistics of `frame`, in a buffer laid out as [`Stats`].
    #[oneway]
    fn stats_ready(&self, frame: u32, stats: OwnedFd);
}

/// The frames of this demo: 8-bit grey.
const WIDTH: u32 = 64;
const HEIGHT: u32 = 48;
const MAX_WIDTH: u32 = 1920;
const MAX_HEIGHT: u32 = 1080;
const BINS: usize = 8;

/// What the camera sees: a name, and the pixel value of column x.
type Scene = (&'static str, fn(usize) -> u8);
const SCENES: [Scene; 3] = [
    ("gradient", |x| (x * 4) as u8),
    ("dark", |x| x as u8),
    ("bright", |x| 192 + x as u8),
];

/// A frame's statistics. In the stats buffer: the mean as an `f64`, then the histogram's
/// bins as `u32`s, all little-endian.
#[derive(Debug)]
pub struct Stats {
    mean: f64,
    histogram: [u32; BINS],
}

impl Stats {
    fn of(pixels: &[u8]) -> Stats {
        let mut histogram = [0; BINS];
        for &p in pixels {
            histogram[p as usize * BINS / 256] += 1;
        }
        let sum: u64 = pixels.iter().map(|&p| u64::from(p)).sum();
        let mean = sum as f64 / pixels.len().max(1) as f64;
        Stats { mean, histogram }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = self.mean.to_le_bytes().to_vec();
        for bin in self.histogram {
            bytes.extend(bin.to_le_bytes());
        }
        bytes
    }

    fn from_bytes(bytes: &[u8]) -> Option<Stats> {
        let (mean, bins) = bytes.split_first_chunk::<8>()?;
        let mut histogram = [0; BINS];
        for (bin, chunk) in histogram.iter_mut().zip(bins.chunks_exact(4)) {
            *bin = u32::from_le_bytes(chunk.try_into().ok()?);
        }
        (bins.len() == 4 * BINS).then_some(Stats {
            mean: f64::from_le_bytes(*mean),
            histogram,
        })
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let crash = args.iter().any(|a| a == "--crash");
    let (who, result) = if args.iter().any(|a| a == "--worker") {
        ("worker", run_worker(crash))
    } else {
        ("parent", run_parent(crash))
    };
    if let Err(e) = result {
        eprintln!("[{who}] error: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------------------
// The parent: the camera pipeline.
// ---------------------------------------------------------------------------------------

/// What the thread serving [`Pipeline`] hands to the main thread.
enum Event {
    Stats(u32, OwnedFd),
    /// The connection ended: the worker hung up or died (or we closed it).
    Ended,
}

/// Forwards `stats_ready` to the main thread.
struct Events(Sender<Event>);

impl Pipeline for Events {
    fn stats_ready(&self, frame: u32, stats: OwnedFd) {
        let _ = self.0.send(Event::Stats(frame, stats));
    }
}

fn run_parent(crash: bool) -> Result<(), Box<dyn Error>> {
    println!("[parent] pid {}: camera pipeline", std::process::id());
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("--worker");
    if crash {
        command.arg("--crash");
    }
    // The worker dies with this thread (the main one), however this process ends.
    worker::exit_with_parent(&mut command);
    let (mut worker, connection) = Worker::spawn(command)?;
    println!("[parent] started the IPA worker, pid {}", worker.id());

    // Serve `Pipeline` on a thread of its own, for the worker's callbacks: requests run only
    // on threads that serve, never on one waiting for a reply. (`spawn_serve` counts the
    // thread as serving before it runs, so callbacks that come at once wait for it.)
    let (events, received) = channel();
    let serving = connection.spawn_serve(PipelineServer::new(Events(events.clone())))?;
    // Once it returns (the worker hung up or died, or we closed), stop waiting for stats.
    let serving = std::thread::spawn(move || {
        let served = serving.join().expect("the watching thread panicked");
        let _ = events.send(Event::Ended);
        served
    });

    let driven = drive(&IpaClient::new(connection.clone()), &received);

    // Whatever happened: hang up, and see how the worker ended.
    connection.close();
    let served = serving.join().expect("the serving thread panicked");
    let exit = worker.wait()?;
    if let Err(e) = driven.and(served.map_err(Box::from)) {
        return Err(format!("{e}; the worker ended with {exit}").into());
    }
    println!("[parent] worker exited ({exit})");
    if exit != Exit::Code(0) {
        return Err("the worker failed".into());
    }
    Ok(())
}

/// The pipeline's work, through the generated `IpaClient` stub.
fn drive(ipa: &IpaClient, events: &Receiver<Event>) -> Result<(), Box<dyn Error>> {
    let pid = ipa.init("grey-stats".into())?;
    println!(
        "[parent] init ran in pid {pid}, not ours ({})",
        std::process::id()
    );
    if pid == std::process::id() {
        return Err("the IPA runs in our own process".into());
    }

    // The IPA refuses a sensor mode it cannot handle: an `Err` in the reply, not a failed call.
    for (width, height) in [(4096, 3072), (WIDTH, HEIGHT)] {
        let verdict = ipa.configure(SensorConfig { width, height })?;
        println!("[parent] configure {width}x{height} -> {verdict:?}");
    }
    let size = (WIDTH * HEIGHT) as usize;

    // Two frame buffers, reused in turn, as a camera's buffer pool would be.
    let buffers = [
        frame_buffer("frame-0", size)?,
        frame_buffer("frame-1", size)?,
    ];
    println!("[parent] allocated 2 frame buffers: memfds of {size} bytes");

    for (frame, (scene, pixel)) in (0..).zip(SCENES) {
        let buffer = &buffers[frame as usize % buffers.len()];
        let pixels: Vec<u8> = (0..size).map(|i| pixel(i % WIDTH as usize)).collect();
        buffer.write_all_at(&pixels, 0)?;
        println!("[parent] frame {frame}: {scene} scene -> worker");
        // Sent borrowed (`buffer` is a `&File`): the worker gets its own fd for the buffer;
        // ours stays open for the next frame, with no copy of it made for the call.
        ipa.queue_frame(frame, buffer)?;

        let Event::Stats(done, stats) = events.recv()? else {
            return Err(format!("the worker hung up before the stats of frame {frame}").into());
        };
        let stats = read_stats(stats)?;
        println!(
            "[parent] frame {done}: stats_ready: mean {:.1}, histogram {:?}",
            stats.mean, stats.histogram
        );
    }
    println!("[parent] done; closing the connection");
    Ok(())
}

/// A memfd of `size` bytes, to hold frames.
fn frame_buffer(name: &str, size: usize) -> Result<File, Box<dyn Error>> {
    let file = File::from(memfd_create(name, MFdFlags::MFD_CLOEXEC)?);
    file.set_len(size as u64)?;
    Ok(file)
}

/// Bytes of a stats buffer: the mean, then the bins.
pub const STATS_LEN: usize = 8 + 4 * BINS;

/// Reads the stats the worker sent. The worker is not trusted, and a bare fd is not checked
/// on its way in: the buffer is read into memory of the size stats take, never of the size
/// the worker's file says (a sparse memfd can claim a terabyte), and only from a regular file
/// (a pipe whose write end the worker kept would hold this read up for as long as it liked).
pub fn read_stats(stats: OwnedFd) -> Result<Stats, Box<dyn Error>> {
    let file = File::from(stats);
    let metadata = file.metadata()?;
    if !metadata.is_file() || metadata.len() != STATS_LEN as u64 {
        let what = format!("{:?} of {} bytes", metadata.file_type(), metadata.len());
        return Err(
            format!("a stats buffer must be a file of {STATS_LEN} bytes, not a {what}").into(),
        );
    }
    let mut bytes = [0; STATS_LEN];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(Stats::from_bytes(&bytes).ok_or("a malformed stats buffer")?)
}

// ---------------------------------------------------------------------------------------
// The worker: the image-processing algorithm.
// ---------------------------------------------------------------------------------------

struct GreyStats {
    /// Calls back into the parent.
    pipeline: PipelineClient,
    config: Mutex<Option<SensorConfig>>,
    /// `--crash`: die at frame 1, as a buggy IPA might.
    crash: bool,
}

impl Ipa for GreyStats {
    fn init(&self, name: String) -> u32 {
        println!("[worker] pid {}: IPA {name:?} loaded", std::process::id());
        std::process::id()
    }

    fn configure(&self, config: SensorConfig) -> Result<Caps, ConfigError> {
        if config.width > MAX_WIDTH || config.height > MAX_HEIGHT {
            return Err(ConfigError::TooLarge {
                max_width: MAX_WIDTH,
                max_height: MAX_HEIGHT,
            });
        }
        *self.config.lock().unwrap() = Some(config);
        Ok(Caps {
            histogram_bins: BINS as u32,
        })
    }

    fn queue_frame(&self, frame: u32, buffer: OwnedFd) {
        if self.crash && frame == 1 {
            println!("[worker] frame {frame}: crashing on purpose (--crash)");
            std::process::abort();
        }
        // A oneway call has no reply to carry an error: a worker that cannot process a frame
        // exits, and the parent sees it hang up.
        if let Err(e) = self.process(frame, buffer) {
            eprintln!("[worker] frame {frame}: {e}; exiting");
            std::process::exit(1);
        }
    }
}

impl GreyStats {
    fn process(&self, frame: u32, buffer: OwnedFd) -> Result<(), Box<dyn Error>> {
        let size = match &*self.config.lock().unwrap() {
            Some(c) => (c.width * c.height) as usize,
            None => return Err("not configured".into()),
        };
        // A real IPA would mmap the buffer; reading it is enough here.
        let mut pixels = vec![0; size];
        File::from(buffer).read_exact_at(&mut pixels, 0)?;
        let stats = Stats::of(&pixels);
        println!(
            "[worker] frame {frame}: read {size} bytes, mean {:.1}; stats -> memfd",
            stats.mean
        );

        let out = File::from(memfd_create("stats", MFdFlags::MFD_CLOEXEC)?);
        out.write_all_at(&stats.to_bytes(), 0)?;
        self.pipeline.stats_ready(frame, out)?; // ours is closed once sent
        Ok(())
    }
}

fn run_worker(crash: bool) -> Result<(), Box<dyn Error>> {
    let connection = worker::connection()?;
    let ipa = GreyStats {
        pipeline: PipelineClient::new(connection.clone()),
        config: Mutex::new(None),
        crash,
    };
    // Answers the parent until it hangs up.
    IpaServer::new(ipa).serve(connection)?;
    println!("[worker] the pipeline hung up; exiting");
    Ok(())
}
