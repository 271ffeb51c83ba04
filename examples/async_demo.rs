//! The async typed-ipc demo: the camera pipeline of `demo.rs`, on tokio, its image-processing
//! algorithm (IPA) in a worker process.
//!
//! The parent is the pipeline. It starts the IPA as a worker (this program, re-executed with
//! `--worker`) and talks to it through the async stubs `#[interface]` generates from traits of
//! `async fn`s:
//!
//! - [`Ipa`], served by the worker: `init`, `configure` (a `Result`), and `process`, which
//!   takes a frame buffer (a memfd, as an `OwnedFd`) and, before it returns, calls back
//!   [`Pipeline::stats_ready`] on the parent with the frame's mean brightness;
//! - [`Pipeline`], served by the parent on the same connection.
//!
//! Four frames are processed at once (concurrent calls on one connection, each handled in a
//! task of its own in the worker); one call is abandoned by a timeout, which the connection
//! survives. At the end the parent closes the connection and waits for the worker to exit.
//!
//! ```text
//! cargo run --example async_demo --features tokio                        # the story
//! cargo run --example async_demo --features tokio -- --blocking-worker   # the worker blocking
//! cargo run --example async_demo --features tokio -- --crash             # the worker dies
//! ```
//!
//! `--blocking-worker` serves the *blocking* flavour of the same trait in the worker: the wire
//! format and the interface signature are the same, so the async parent cannot tell.

use std::error::Error;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::memfd::{MFdFlags, memfd_create};
use serde::{Deserialize, Serialize};
use typed_ipc::interface;
use typed_ipc::tokio::worker;
use typed_ipc::tokio::worker::Exit;

/// What the pipeline asks of the IPA.
#[derive(Debug, Serialize, Deserialize)]
pub struct SensorConfig {
    pub width: u32,
    pub height: u32,
}

/// The IPA, served by the worker.
#[interface]
pub trait Ipa {
    /// Loads the algorithm; returns the process id it runs in.
    async fn init(&self, name: String) -> u32;
    /// Prepares for frames of this size; refuses frames over 4096 pixels wide.
    async fn configure(&self, config: SensorConfig) -> Result<u32, String>;
    /// Processes a frame (8-bit grey pixels), reporting its statistics through
    /// [`Pipeline::stats_ready`] before it returns the frame's number.
    async fn process(&self, frame: u32, buffer: OwnedFd) -> u32;
    /// Takes `millis` milliseconds: the parent gives up on it sooner.
    async fn slow(&self, millis: u64);
}

/// The pipeline, served by the parent.
#[interface]
pub trait Pipeline {
    /// Frame `frame`'s mean brightness is `mean`.
    #[oneway]
    async fn stats_ready(&self, frame: u32, mean: u32);
}

/// The blocking flavour of [`Ipa`], for `--blocking-worker`: the same trait without `async`.
mod blocking {
    use std::os::fd::OwnedFd;

    // Types are compared as spelled: `SensorConfig`, not `super::SensorConfig`.
    use super::SensorConfig;

    #[typed_ipc::interface]
    pub trait Ipa {
        fn init(&self, name: String) -> u32;
        fn configure(&self, config: SensorConfig) -> Result<u32, String>;
        fn process(&self, frame: u32, buffer: OwnedFd) -> u32;
        fn slow(&self, millis: u64);
    }

    #[typed_ipc::interface]
    pub trait Pipeline {
        #[oneway]
        fn stats_ready(&self, frame: u32, mean: u32);
    }
}

const WIDTH: u32 = 64;
const HEIGHT: u32 = 48;

fn mean_of(buffer: OwnedFd) -> u32 {
    let mut pixels = vec![0u8; (WIDTH * HEIGHT) as usize];
    File::from(buffer).read_exact_at(&mut pixels, 0).unwrap();
    (pixels.iter().map(|&p| p as u64).sum::<u64>() / pixels.len() as u64) as u32
}

fn configure(config: SensorConfig) -> Result<u32, String> {
    match config.width {
        0..=4096 => Ok(config.width * config.height),
        width => Err(format!("{width} pixels wide is too wide")),
    }
}

/// The IPA of the async worker: calls back into the parent during `process`.
struct AsyncIpa {
    pipeline: PipelineClient,
    crash: bool,
}

impl Ipa for AsyncIpa {
    async fn init(&self, name: String) -> u32 {
        println!("[worker {}] loaded {name}", std::process::id());
        std::process::id()
    }
    async fn configure(&self, config: SensorConfig) -> Result<u32, String> {
        configure(config)
    }
    async fn process(&self, frame: u32, buffer: OwnedFd) -> u32 {
        if self.crash && frame == 1 {
            std::process::abort();
        }
        let mean = tokio::task::spawn_blocking(move || mean_of(buffer))
            .await
            .unwrap();
        self.pipeline.stats_ready(frame, mean).await.unwrap();
        frame
    }
    async fn slow(&self, millis: u64) {
        tokio::time::sleep(Duration::from_millis(millis)).await
    }
}

/// The IPA of the blocking worker.
struct BlockingIpa {
    pipeline: blocking::PipelineClient,
}

impl blocking::Ipa for BlockingIpa {
    fn init(&self, name: String) -> u32 {
        println!("[blocking worker {}] loaded {name}", std::process::id());
        std::process::id()
    }
    fn configure(&self, config: SensorConfig) -> Result<u32, String> {
        configure(config)
    }
    fn process(&self, frame: u32, buffer: OwnedFd) -> u32 {
        self.pipeline.stats_ready(frame, mean_of(buffer)).unwrap();
        frame
    }
    fn slow(&self, millis: u64) {
        std::thread::sleep(Duration::from_millis(millis))
    }
}

/// The parent's side of the callbacks.
struct Stats(AtomicU32);

impl Pipeline for Stats {
    async fn stats_ready(&self, frame: u32, mean: u32) {
        self.0.fetch_add(1, Ordering::SeqCst);
        println!("[pipeline] frame {frame}: mean brightness {mean}");
    }
}

/// A frame whose pixels are all `level`, in a memfd.
fn frame_buffer(level: u8) -> typed_ipc::Result<OwnedFd> {
    let fd = memfd_create("frame", MFdFlags::MFD_CLOEXEC)?;
    File::from(fd.try_clone()?).write_all_at(&vec![level; (WIDTH * HEIGHT) as usize], 0)?;
    Ok(fd)
}

async fn pipeline(args: &[String]) -> Result<ExitCode, Box<dyn Error>> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("--worker").args(args);
    let (mut child, connection) = worker::spawn(command)?;
    connection.add_service(PipelineServer::new(Stats(AtomicU32::new(0))));
    let ipa = IpaClient::new(connection.clone());

    let pid = ipa.init("grey-world".into()).await?;
    println!(
        "[pipeline {}] the IPA runs in process {pid}",
        std::process::id()
    );
    let config = SensorConfig {
        width: 8192,
        height: 8,
    };
    println!(
        "[pipeline] configure 8192x8: {:?}",
        ipa.configure(config).await?
    );
    let config = SensorConfig {
        width: WIDTH,
        height: HEIGHT,
    };
    println!(
        "[pipeline] configure {WIDTH}x{HEIGHT}: {:?}",
        ipa.configure(config).await?
    );

    // Four frames in flight at once.
    let frames = (0..4u32).map(|frame| {
        let ipa = ipa.clone();
        async move { ipa.process(frame, frame_buffer(frame as u8 * 60)?).await }
    });
    let mut tasks = Vec::new();
    for frame in frames {
        tasks.push(tokio::spawn(frame));
    }
    for task in tasks {
        match task.await? {
            Ok(frame) => println!("[pipeline] frame {frame} done"),
            Err(e) => {
                println!("[pipeline] the IPA failed: {e}");
                let exit = worker::wait(&mut child).await?;
                println!("[pipeline] the worker ended: {exit}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }

    // A call abandoned after 100 ms: its slot is freed and the worker is told (an async worker
    // drops the call at its next `.await`; a blocking one runs it on, and its late reply is
    // dropped here), and the connection goes on.
    let impatient = ipa.with_timeout(Duration::from_millis(100));
    println!(
        "[pipeline] a 500 ms call, 100 ms timeout: {:?}",
        impatient.slow(500).await
    );
    println!(
        "[pipeline] init again: {:?}",
        ipa.init("again".into()).await.is_ok()
    );

    connection.close();
    connection.run().await?;
    match worker::wait(&mut child).await? {
        Exit::Code(0) => println!("[pipeline] the worker exited cleanly"),
        exit => println!("[pipeline] the worker ended: {exit}"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn async_worker(crash: bool) -> Result<(), Box<dyn Error>> {
    let connection = worker::connection()?;
    let ipa = AsyncIpa {
        pipeline: PipelineClient::new(connection.clone()),
        crash,
    };
    // Returns once the parent hangs up and the handlers still running are done.
    IpaServer::new(ipa).serve(connection).await?;
    Ok(())
}

fn blocking_worker() -> Result<(), Box<dyn Error>> {
    let connection = typed_ipc::worker::connection()?;
    let pipeline = blocking::PipelineClient::new(connection.clone());
    connection.add_service(blocking::IpaServer::new(BlockingIpa { pipeline }));
    // Four frames at once: a few serving threads.
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let connection = connection.clone();
            std::thread::spawn(move || connection.run())
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn main() -> Result<ExitCode, Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    if flag("--worker") && flag("--blocking-worker") {
        blocking_worker()?;
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Runtime::new()?;
    if flag("--worker") {
        runtime.block_on(async_worker(flag("--crash")))?;
        return Ok(ExitCode::SUCCESS);
    }
    runtime.block_on(pipeline(&args))
}
