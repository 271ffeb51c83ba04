//! A plugin host: untrusted "image filter" plugins, each isolated in a worker process of its
//! own, fed frames of several MiB as sealed shared buffers.
//!
//! The host (this program) starts two workers (this same program, re-executed with
//! `--plugin-worker`) and sends each, in turn, a frame: a [`SealedBuffer`], one memfd that
//! the worker maps read-only, no byte copied by the transport. The plugin inverts it into a
//! sealed buffer of its own making, which comes back as the reply. Every call has a timeout.
//!
//! The plugin is buggy, as plugins are, and the host tells each failure apart:
//!
//! - it aborts on one frame: [`Error::Disconnected`]; the host reaps the worker (`SIGABRT`)
//!   and starts another;
//! - it never returns on another: [`Error::TimedOut`]; the host kills the stuck worker and
//!   starts another;
//! - it panics on another: [`Error::Panicked`]; the worker serves on, but the plugin's state
//!   is suspect, so the host starts another;
//! - it rejects a frame whose size does not match its header: an `Err` of the plugin's own,
//!   in a reply; the worker is fine;
//! - after one frame it ignores the host's hang-up.
//!
//! At the end the host hangs up, waits a while for both workers to exit, kills the one that
//! does not, and checks that it has as many fds open as it started with.
//!
//! ```text
//! cargo run --example plugin_host
//! ```
//!
//! `tests/plugin_host.rs` runs [`run_host`] and [`run_worker`] across real processes and
//! checks what they report.

use std::error::Error as StdError;
use std::fmt;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use typed_ipc::shared_buffer::{SealedBuffer, SharedBuffer};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Error, interface};

/// What a frame is, apart from its pixels.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct FrameInfo {
    pub seq: u32,
    pub width: u32,
    pub height: u32,
}

/// A filtered frame: the worker's own sealed buffer, and who made it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Filtered {
    pub pixels: SealedBuffer,
    pub worker_pid: u32,
}

/// Why the plugin refuses a frame: an answer, not a failure of the worker.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum FilterError {
    SizeMismatch { expected: u64, got: u64 },
}

/// The plugin's interface, served by each worker.
#[interface(name = "org.example.plugin.ImageFilter")]
pub trait ImageFilter {
    /// Inverts the 8-bit grey `pixels` of `frame` into a new buffer.
    fn invert(&self, frame: FrameInfo, pixels: SealedBuffer) -> Result<Filtered, FilterError>;
}

/// The frames the plugin mishandles start with these bytes.
pub const CRASH_MARK: &[u8; 8] = b"#ABORT#!";
pub const HANG_MARK: &[u8; 8] = b"#HANG#!!";
pub const LINGER_MARK: &[u8; 8] = b"#LINGER#";
pub const PANIC_MARK: &[u8; 8] = b"#PANIC#!";

/// One frame to filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// A good frame.
    Good,
    /// A frame the plugin aborts on.
    Crash,
    /// A frame the plugin never returns from.
    Hang,
    /// A frame the plugin panics on.
    Panic,
    /// A frame whose header says more pixels than it has.
    Short,
    /// A good frame, after which the plugin ignores the host's hang-up and runs on.
    Linger,
}

/// What the host saw for one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Filtered by worker `pid`; `correct` if the result is the inverse of the input.
    Filtered { pid: u32, correct: bool },
    /// The plugin refused the frame.
    Rejected(FilterError),
    /// The worker died mid-call; it ended thus, and was restarted.
    Crashed(Exit),
    /// No reply within the timeout; the worker was killed (ending thus) and restarted.
    TimedOut(Exit),
    /// The plugin panicked, saying this (the worker caught it and serves on, but its state
    /// may be half-changed); the worker was killed and restarted.
    Panicked(String),
    /// Anything else: a bug of the host or the library.
    Failed(String),
}

/// What the host was asked to do.
pub struct HostConfig {
    /// A worker process's command: it must end up in [`run_worker`].
    pub worker: fn() -> Command,
    pub width: u32,
    pub height: u32,
    /// How long a call may take before the worker is deemed stuck, and how long a worker
    /// may take to exit once the host has hung up.
    pub timeout: Duration,
}

/// What [`run_host`] did.
#[derive(Debug)]
pub struct Report {
    /// Each frame's worker slot (0 or 1) and outcome, in order.
    pub outcomes: Vec<(usize, Outcome)>,
    /// How many workers were started in all.
    pub started: usize,
    /// How the last two workers ended at shutdown: `Signal(9)` if the host had to kill one.
    pub final_exits: Vec<Exit>,
    /// Open fds of the host before it started anything, and after it shut everything down.
    pub fds_before: usize,
    pub fds_after: usize,
}

type Result<T, E = Box<dyn StdError + Send + Sync>> = std::result::Result<T, E>;

/// A running plugin worker and the stub that calls it.
struct Plugin {
    name: char,
    worker: Worker,
    filter: ImageFilterClient,
}

impl Plugin {
    fn start(name: char, config: &HostConfig) -> Result<Plugin> {
        // A plugin stuck in a frame must not outlive a host that dies without stopping it.
        let mut command = (config.worker)();
        worker::exit_with_parent(&mut command);
        let (worker, connection) = Worker::spawn(command)?;
        let filter = ImageFilterClient::new(connection).with_timeout(config.timeout);
        println!("[host] plugin {name}: started, pid {}", worker.id());
        Ok(Plugin {
            name,
            worker,
            filter,
        })
    }

    /// Hangs up and waits for the worker to exit, killing it if it has not within `grace`;
    /// says how it ended, and whether it was killed.
    fn stop(mut self, grace: Duration) -> Result<(Exit, bool)> {
        self.filter.connection().close();
        if let Some(exit) = self.worker.wait_timeout(grace)? {
            return Ok((exit, false));
        }
        self.worker.kill()?;
        Ok((self.worker.wait()?, true))
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The frame `seq` of kind `input`, and a checksum of its inverse.
fn make_frame(seq: u32, input: Input, config: &HostConfig) -> Result<(FrameInfo, SealedBuffer)> {
    let info = FrameInfo {
        seq,
        width: config.width,
        height: config.height,
    };
    let mut len = config.width as usize * config.height as usize;
    if input == Input::Short {
        len /= 2;
    }
    let mut pixels = SharedBuffer::new(len)?;
    for (i, p) in pixels.iter_mut().enumerate() {
        *p = (i as u32)
            .wrapping_mul(seq + 1)
            .wrapping_add(i as u32 >> 11) as u8;
    }
    match input {
        Input::Crash => pixels[..8].copy_from_slice(CRASH_MARK),
        Input::Hang => pixels[..8].copy_from_slice(HANG_MARK),
        Input::Linger => pixels[..8].copy_from_slice(LINGER_MARK),
        Input::Panic => pixels[..8].copy_from_slice(PANIC_MARK),
        Input::Good | Input::Short => {}
    }
    Ok((info, pixels.seal()?))
}

/// Runs the host: two plugin workers, `inputs` sent to them in turn.
pub fn run_host(config: &HostConfig, inputs: &[Input]) -> Result<Report> {
    let fds_before = open_fds();
    let mut plugins = vec![Plugin::start('A', config)?, Plugin::start('B', config)?];
    let mut started = 2;
    let mut outcomes = Vec::new();

    for (seq, &input) in (0..).zip(inputs) {
        let slot = seq as usize % plugins.len();
        let (info, frame) = make_frame(seq, input, config)?;
        let expected: Vec<u8> = frame.iter().map(|p| !p).collect();
        let plugin = &mut plugins[slot];
        let mib = frame.len() as f64 / (1 << 20) as f64;
        print!(
            "[host] frame {seq} ({input:?}, {mib:.1} MiB) -> plugin {}: ",
            plugin.name
        );
        let outcome = match plugin.filter.invert(info, frame) {
            Ok(Ok(filtered)) => Outcome::Filtered {
                pid: filtered.worker_pid,
                correct: filtered.pixels.as_bytes() == expected.as_slice(),
            },
            Ok(Err(refused)) => Outcome::Rejected(refused),
            // The worker hung up mid-call. Most likely it died, but an untrusted one may
            // have closed its socket and run on: kill it before waiting, or the wait could
            // last for good. A worker that had died keeps the status it died with.
            Err(Error::Disconnected) => {
                plugin.worker.kill()?;
                Outcome::Crashed(plugin.worker.wait()?)
            }
            // The worker's method runs on: a stuck worker is killed.
            Err(Error::TimedOut) => {
                plugin.worker.kill()?;
                Outcome::TimedOut(plugin.worker.wait()?)
            }
            // The worker is alive, but the plugin's state is suspect: start afresh.
            Err(Error::Panicked(why)) => {
                plugin.worker.kill()?;
                plugin.worker.wait()?;
                Outcome::Panicked(why)
            }
            Err(other) => Outcome::Failed(other.to_string()),
        };
        println!("{}", Described(&outcome));
        if matches!(
            outcome,
            Outcome::Crashed(_) | Outcome::TimedOut(_) | Outcome::Panicked(_)
        ) {
            let name = plugin.name;
            // The old worker is reaped; replacing it drops its `Worker` and connection.
            *plugin = Plugin::start(name, config)?;
            started += 1;
        }
        outcomes.push((slot, outcome));
    }

    let mut final_exits = Vec::new();
    for plugin in plugins {
        let name = plugin.name;
        let (exit, killed) = plugin.stop(config.timeout)?;
        if killed {
            let grace = config.timeout;
            println!("[host] plugin {name}: still running {grace:?} after the hang-up: killed");
        } else {
            println!("[host] plugin {name}: exited ({exit})");
        }
        final_exits.push(exit);
    }
    let fds_after = open_fds();
    println!("[host] open fds: {fds_before} before, {fds_after} after");
    Ok(Report {
        outcomes,
        started,
        final_exits,
        fds_before,
        fds_after,
    })
}

/// An outcome, as the host prints it.
struct Described<'a>(&'a Outcome);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Outcome::Filtered { pid, correct } => {
                let verdict = if *correct { "correct" } else { "WRONG" };
                write!(f, "filtered by pid {pid}, {verdict}")
            }
            Outcome::Rejected(why) => write!(f, "rejected by the plugin: {why:?}"),
            Outcome::Crashed(exit) => write!(f, "plugin crashed ({exit}); restarting it"),
            Outcome::TimedOut(exit) => {
                write!(f, "no reply in time; killed it ({exit}), restarting it")
            }
            Outcome::Panicked(why) => write!(f, "plugin panicked ({why}); restarting it"),
            Outcome::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// The plugin, as buggy as it says.
struct Inverter;

/// Whether the plugin has seen [`LINGER_MARK`]: it then leaves a thread running, as it were,
/// and does not exit when the host hangs up.
static LINGER: AtomicBool = AtomicBool::new(false);

impl ImageFilter for Inverter {
    fn invert(&self, frame: FrameInfo, pixels: SealedBuffer) -> Result<Filtered, FilterError> {
        let expected = u64::from(frame.width) * u64::from(frame.height);
        if pixels.len() as u64 != expected {
            return Err(FilterError::SizeMismatch {
                expected,
                got: pixels.len() as u64,
            });
        }
        if pixels.starts_with(CRASH_MARK) {
            std::process::abort();
        }
        if pixels.starts_with(LINGER_MARK) {
            LINGER.store(true, Ordering::Relaxed);
        }
        if pixels.starts_with(PANIC_MARK) {
            panic!("frame {}: cannot filter this", frame.seq);
        }
        if pixels.starts_with(HANG_MARK) {
            loop {
                std::thread::park();
            }
        }
        let mut out = SharedBuffer::new(pixels.len()).expect("a buffer for the result");
        for (o, p) in out.iter_mut().zip(pixels.iter()) {
            *o = !p;
        }
        Ok(Filtered {
            pixels: out.seal().expect("sealing the result"),
            worker_pid: std::process::id(),
        })
    }
}

/// A worker's `main`: serves the plugin until the host hangs up.
pub fn run_worker() -> Result<()> {
    // One line for a panic, which the host hears of too (`Error::Panicked`).
    std::panic::set_hook(Box::new(|info| {
        eprintln!("[plugin {}] {info}", std::process::id());
    }));
    ImageFilterServer::new(Inverter).serve(worker::connection()?)?;
    while LINGER.load(Ordering::Relaxed) {
        std::thread::park();
    }
    Ok(())
}

fn worker_command() -> Command {
    let mut command = Command::new(std::env::current_exe().expect("this program's path"));
    command.arg("--plugin-worker");
    command
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--plugin-worker") {
        return match run_worker() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("[plugin {}] error: {e}", std::process::id());
                ExitCode::FAILURE
            }
        };
    }
    let config = HostConfig {
        worker: worker_command,
        width: 2048,
        height: 1536,
        timeout: Duration::from_secs(2),
    };
    use Input::*;
    let inputs = [Good, Good, Crash, Hang, Short, Panic, Good, Linger];
    match run_host(&config, &inputs) {
        Ok(report) if report.fds_after == report.fds_before => ExitCode::SUCCESS,
        Ok(report) => {
            eprintln!("[host] leaked {} fds", report.fds_after - report.fds_before);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("[host] error: {e}");
            ExitCode::FAILURE
        }
    }
}
