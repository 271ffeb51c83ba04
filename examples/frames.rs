//! Frames through a shared region: typed-ipc's fastest path for big data, double-buffered.
//!
//! The parent, a camera, makes ONE [`SharedRegion`] big enough for two frames and sends the
//! worker (this program, re-run with `--worker`) a [`RegionView`] of it once, with `attach`.
//! From then on the transport copies no byte of a frame and allocates no page: the parent
//! writes the frame into the half not in use and calls `process(frame_no, offset, len)`;
//! the worker reads it in place ([`RegionView::words`]) and returns a small [`Summary`],
//! which the parent checks against its own.
//!
//! **When the parent may write a half again:** once the call that reads it has returned. The
//! worker reads a frame only inside `process`, so after its reply the half is free. With at
//! most one call in flight per half, the parent fills the next frame in one half while the
//! worker reads this one in the other: a second thread makes the calls, in order, and the
//! parent waits for frame `n - 2`'s reply before it writes frame `n` over it.
//!
//! **A hostile worker** can read the whole region for as long as it keeps the view (so put
//! nothing else in it), answer wrongly (the parent checks), stall or die. It cannot write
//! the region or resize it: the memfd is sealed (`F_SEAL_FUTURE_WRITE`, no shrinking or
//! growing), so no write or writable mapping of it can be made, and it cannot make the
//! parent's writes fault. **The worker**, for its part, cannot assume the bytes hold still:
//! a buggy parent may write while it reads. Reads are atomic loads, so that is no undefined
//! behaviour, only torn data; copy out (load once into a local) whatever you check before
//! trusting it, as the worker does with each frame's header.
//!
//! ```text
//! cargo run --example frames
//! ```
//!
//! `tests/frames.rs` runs [`run_parent`] and [`run_worker`] across real processes.

use std::process::{Command, ExitCode};
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, sync_channel};

use serde::{Deserialize, Serialize};
use typed_ipc::interface;
use typed_ipc::shared_region::{RegionView, RegionWord, SharedRegion};
use typed_ipc::worker::{self, Exit, Worker};

/// The example's errors: typed-ipc's, or a wrong answer of the worker's, said in words.
pub type Res<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Frames are 8-bit grey, 1280x720.
pub const WIDTH: usize = 1280;
/// A frame in the region: its number as a native-endian `u64` header, then the pixels. A
/// multiple of 8, so that both halves start on a word.
pub const FRAME_LEN: usize = 8 + WIDTH * 720;

/// What the worker computes from a frame, small enough to return by value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The sum of the pixels.
    pub sum: u64,
    /// How many pixels fall in each sixteenth of the 0..=255 range.
    pub histogram: [u32; 16],
}

impl Summary {
    /// The summary of `pixels`: the parent's over what it wrote, the worker's over what it read.
    pub fn of(pixels: impl IntoIterator<Item = u8>) -> Summary {
        let mut s = Summary::default();
        for p in pixels {
            s.sum += u64::from(p);
            s.histogram[usize::from(p >> 4)] += 1;
        }
        s
    }
}

/// Why the worker refuses a frame: an answer, not a failed call.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FrameError {
    /// `process` came before `attach`.
    NotAttached,
    /// `attach` came twice.
    AlreadyAttached,
    /// The bytes are not whole words inside the region.
    OutOfBounds,
    /// The header (this value, as the worker loaded it) is not the frame's number: the half
    /// was being rewritten.
    WrongHeader(u64),
}

/// The worker's interface.
#[interface]
pub trait Analyzer {
    /// Takes the region the frames will come in; sent once, before any frame.
    fn attach(&self, view: RegionView) -> Result<(), FrameError>;
    /// Summarises frame `frame_no`, the `len` bytes at `offset` in the region. The worker
    /// reads them only until it returns: then the parent may write them again.
    fn process(&self, frame_no: u32, offset: u64, len: u64) -> Result<Summary, FrameError>;
}

/// The worker's side: the view it was sent, once.
#[derive(Default)]
pub struct Analyst {
    view: OnceLock<RegionView>,
}

impl Analyzer for Analyst {
    fn attach(&self, view: RegionView) -> Result<(), FrameError> {
        println!("[worker] attached a region of {} bytes", view.len());
        // A second region is refused, not swapped in under frames that may still use the first.
        self.view.set(view).map_err(|_| FrameError::AlreadyAttached)
    }

    fn process(&self, frame_no: u32, offset: u64, len: u64) -> Result<Summary, FrameError> {
        let view = self.view.get().ok_or(FrameError::NotAttached)?;
        let words = frame_words(view, offset, len).ok_or(FrameError::OutOfBounds)?;
        let (header, pixels) = words.split_first().ok_or(FrameError::OutOfBounds)?;
        // Load the header once and check that copy: a second load could see another value.
        let found = header.load(Ordering::Relaxed);
        if found != u64::from(frame_no) {
            return Err(FrameError::WrongHeader(found));
        }
        println!("[worker] frame {frame_no}: reading {len} bytes at offset {offset} in place");
        // Each word is loaded once, in place; pixels rewritten meanwhile give a wrong summary,
        // nothing worse. Nothing is read after the reply: the half is the parent's again.
        let bytes = pixels
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_ne_bytes());
        Ok(Summary::of(bytes))
    }
}

/// The words of `len` bytes at `offset`, if they are whole words inside the region. The
/// bounds come from the peer; the region's size is sealed, so checking them once is enough.
fn frame_words(view: &RegionView, offset: u64, len: u64) -> Option<&[RegionWord]> {
    if offset % 8 != 0 || len % 8 != 0 {
        return None;
    }
    let start = usize::try_from(offset / 8).ok()?;
    let end = start.checked_add(usize::try_from(len / 8).ok()?)?;
    view.words().get(start..end)
}

/// What [`run_parent`] saw.
#[derive(Debug)]
pub struct Report {
    /// Per frame: its number, and whether the worker's summary matched the parent's.
    pub frames: Vec<(u32, bool)>,
    /// How the worker ended, after the parent hung up.
    pub exit: Exit,
}

/// The pixel at `i` of frame `n`: a gradient that moves from frame to frame.
fn pixel(n: u32, i: usize) -> u8 {
    (i % WIDTH + i / WIDTH + n as usize * 8) as u8
}

/// The camera: starts the worker with `command`, sends it `count` frames, checks each summary.
pub fn run_parent(mut command: Command, count: u32) -> Res<Report> {
    worker::exit_with_parent(&mut command);
    let (mut child, connection) = Worker::spawn(command)?;
    println!("[parent] worker pid {}", child.id());
    let analyzer = AnalyzerClient::new(connection.clone());
    let mut region = SharedRegion::new(2 * FRAME_LEN)?;
    analyzer
        .attach(region.view()?)?
        .map_err(|e| format!("attach refused: {e:?}"))?;
    println!("[parent] sent a view of {} bytes, once", region.len());

    // A second thread makes the calls, in order, so that this one can fill the next frame
    // meanwhile. What keeps a half from being written while it is read is the wait below for
    // the reply of the frame before last, not the channel.
    let (calls, queued) = sync_channel::<(u32, usize, Summary)>(0);
    let (replied, replies) = channel();
    let frames = std::thread::scope(|s| -> Res<Vec<(u32, bool)>> {
        let caller = &analyzer;
        s.spawn(move || {
            for (n, offset, expected) in queued {
                let got = caller.process(n, offset as u64, FRAME_LEN as u64);
                let _ = replied.send((n, got.map(|r| r == Ok(expected))));
            }
        });
        let mut frames = Vec::new();
        let mut check = |(n, matched): (u32, typed_ipc::Result<bool>)| -> Res<()> {
            let matched = matched?;
            let verdict = if matched { "matches ours" } else { "WRONG" };
            println!("[parent] frame {n}: the worker's summary {verdict}");
            frames.push((n, matched));
            Ok(())
        };
        for n in 0..count {
            if n >= 2 {
                // The call that read this half (frame n - 2) has returned: it is ours again.
                check(replies.recv()?)?;
            }
            let offset = (n as usize % 2) * FRAME_LEN;
            let half = &mut region[offset..offset + FRAME_LEN];
            half[..8].copy_from_slice(&u64::from(n).to_ne_bytes());
            for (i, p) in half[8..].iter_mut().enumerate() {
                *p = pixel(n, i);
            }
            let expected = Summary::of(half[8..].iter().copied());
            println!("[parent] frame {n}: written at offset {offset}");
            calls.send((n, offset, expected))?;
        }
        // Ends the caller thread once it has made the calls it holds.
        drop(calls);
        for reply in replies {
            check(reply)?;
        }
        Ok(frames)
    })?;

    connection.close();
    let exit = child.wait()?;
    println!("[parent] worker exited ({exit})");
    Ok(Report { frames, exit })
}

/// The worker's `main`: serves [`Analyzer`] until the parent hangs up.
pub fn run_worker() -> Res<()> {
    AnalyzerServer::new(Analyst::default()).serve(worker::connection()?)?;
    Ok(())
}

fn main() -> ExitCode {
    let result = if std::env::args().any(|a| a == "--worker") {
        run_worker()
    } else {
        let mut command = Command::new(std::env::current_exe().expect("this program's path"));
        command.arg("--worker");
        match run_parent(command, 6) {
            Ok(r) if r.exit == Exit::Code(0) && r.frames.iter().all(|f| f.1) => Ok(()),
            Ok(r) => Err(format!("{r:?}").into()),
            Err(e) => Err(e),
        }
    };
    if let Err(e) = result {
        eprintln!("[{}] error: {e}", std::process::id());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
