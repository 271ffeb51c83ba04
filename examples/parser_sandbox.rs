//! A parser sandbox: a host hands untrusted input to a parser isolated in a worker process,
//! and bounds what that worker may send back.
//!
//! The host (this program) starts the worker (this same program, re-executed with
//! `--parser-worker`) with [`Worker::spawn_with_limits`]: the worker parses input it must not
//! trust, so whatever it returns is held to [`limits`] (64 KiB a message, no fd at all),
//! while the host may still send it 16 MiB of input and a file to parse (`max_send_len`,
//! `max_send_fds`). The worker serves [`Parser`] and, while it parses, calls back the
//! host's [`ParseEvents::progress`], a `#[oneway]` the host serves on a thread of its own.
//!
//! The host checks that each outcome is the one the docs promise:
//!
//! - good input: the [`Parsed`] result; bad input: the parser's own [`ParseError`], inside
//!   `Ok` (the worker is fine);
//! - a file, as an `OwnedFd`: typed-ipc does not check a bare fd, so the worker does
//!   (`fstat`: a regular file of at most [`MAX_INPUT`] bytes) and refuses a pipe;
//! - a result over the host's limits: [`Error::TooLarge`], and the connection serves on;
//! - input that makes the parser panic: [`Error::Panicked`]; the parser keeps no state, so
//!   the worker serves on (restart it if a half-done change could matter);
//! - input it never finishes: [`Error::TimedOut`]; the host kills the worker and starts
//!   another;
//! - input that makes it abort: [`Error::Disconnected`]; the host reaps it (`SIGABRT`) and
//!   starts another.
//!
//! ```text
//! cargo run --example parser_sandbox
//! ```
//!
//! `tests/parser_sandbox.rs` runs [`run_host`] and [`run_worker`] across real processes.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::memfd::{MFdFlags, memfd_create};
use serde::{Deserialize, Serialize};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Error, Limits, interface};

/// The most input the parser takes, and so the host sends.
pub const MAX_INPUT: u64 = 16 << 20;

/// What the parser made of its input.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Parsed {
    pub words: u64,
    pub lines: u64,
    /// The longest word.
    pub longest: String,
}

/// Why the parser refused its input: the method's own error, not typed-ipc's.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub enum ParseError {
    /// Not UTF-8 from this byte on.
    NotUtf8 { at: u64 },
    /// The file handed over is not a regular file (a pipe could block the parser for good).
    NotAFile,
    /// The file is larger than [`MAX_INPUT`].
    TooBig(u64),
}

/// The parser, served by the worker.
#[interface(name = "org.example.Parser")]
pub trait Parser {
    /// Parses `input`.
    fn parse(&self, input: Vec<u8>) -> Result<Parsed, ParseError>;
    /// Parses the file behind `file`.
    fn parse_file(&self, file: OwnedFd) -> Result<Parsed, ParseError>;
}

/// The parser's reports, served by the host.
#[interface(name = "org.example.ParseEvents")]
pub trait ParseEvents {
    /// `done` bytes of `total` are parsed.
    #[oneway]
    fn progress(&self, done: u64, total: u64);
}

/// Inputs that make the parser fail, as parsers do.
const PANIC_MARK: &[u8] = b"#panic";
const HANG_MARK: &[u8] = b"#hang";
const ABORT_MARK: &[u8] = b"#abort";
/// Makes the parser return a longest word of 1 MiB: over the host's limits.
const HUGE_MARK: &[u8] = b"#huge";

/// The worker's parser: it reports its progress to the host.
struct Sandboxed {
    events: ParseEventsClient,
}

impl Sandboxed {
    fn parse_bytes(&self, input: &[u8]) -> Result<Parsed, ParseError> {
        if input.starts_with(PANIC_MARK) {
            panic!("the parser tripped over its input");
        }
        if input.starts_with(HANG_MARK) {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        if input.starts_with(ABORT_MARK) {
            std::process::abort();
        }
        if input.starts_with(HUGE_MARK) {
            let longest = "x".repeat(1 << 20);
            return Ok(Parsed {
                words: 1,
                lines: 1,
                longest,
            });
        }
        let text = std::str::from_utf8(input).map_err(|e| ParseError::NotUtf8 {
            at: e.valid_up_to() as u64,
        })?;
        let mut parsed = Parsed {
            words: 0,
            lines: 0,
            longest: String::new(),
        };
        let mut done = 0;
        for line in text.lines() {
            parsed.lines += 1;
            for word in line.split_whitespace() {
                parsed.words += 1;
                if word.len() > parsed.longest.len() {
                    parsed.longest = word.to_owned();
                }
            }
            // A report every 64 KiB: a oneway does not wait for the host, and the host
            // serves its reports, so they never pile up past its bounds.
            done += line.len() as u64 + 1;
            if done % (64 << 10) < line.len() as u64 + 1 {
                let _ = self.events.progress(done, input.len() as u64);
            }
        }
        // A oneway has no reply: a host gone meanwhile is the caller's `Disconnected`.
        let _ = self.events.progress(input.len() as u64, input.len() as u64);
        Ok(parsed)
    }
}

impl Parser for Sandboxed {
    fn parse(&self, input: Vec<u8>) -> Result<Parsed, ParseError> {
        self.parse_bytes(&input)
    }

    fn parse_file(&self, file: OwnedFd) -> Result<Parsed, ParseError> {
        // typed-ipc does not check a bare fd: its size and kind are the receiver's to check,
        // and a read must stop at what is expected, whatever the file claims.
        let mut file = File::from(file);
        let meta = file.metadata().map_err(|_| ParseError::NotAFile)?;
        if !meta.is_file() {
            return Err(ParseError::NotAFile);
        }
        if meta.len() > MAX_INPUT {
            return Err(ParseError::TooBig(meta.len()));
        }
        // The offset is shared with the sender, which may have left it anywhere (at the end,
        // having just written the file).
        file.rewind().map_err(|_| ParseError::NotAFile)?;
        let mut input = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_INPUT)
            .read_to_end(&mut input)
            .map_err(|_| ParseError::NotAFile)?;
        self.parse_bytes(&input)
    }
}

/// The worker: serves [`Parser`] until the host hangs up.
pub fn run_worker() -> typed_ipc::Result<()> {
    let connection = worker::connection()?;
    let events = ParseEventsClient::new(connection.clone());
    ParserServer::new(Sandboxed { events }).serve(connection)
}

/// The host's side of [`ParseEvents`]: counts the reports.
#[derive(Default)]
struct Progress {
    reports: AtomicU64,
}

impl ParseEvents for Progress {
    fn progress(&self, _done: u64, _total: u64) {
        self.reports.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the host accepts from a worker it does not trust: small results and no fd (no pipe
/// or FUSE file to block on), while it sends large input and one file.
pub fn limits() -> Limits {
    // `..Limits::default()` as its docs advise, for the fields it may gain.
    #[allow(clippy::needless_update)]
    Limits {
        max_message_len: 64 << 10,
        max_fds: 0,
        max_send_len: Some(MAX_INPUT as usize + (64 << 10)),
        max_send_fds: Some(1),
        ..Limits::default()
    }
}

/// A running worker, the stub that calls it, and the thread serving its reports.
struct Sandbox {
    worker: Worker,
    parser: ParserClient,
    serving: JoinHandle<typed_ipc::Result<()>>,
}

impl Sandbox {
    fn start(config: &HostConfig, progress: &Arc<Progress>) -> typed_ipc::Result<Sandbox> {
        let mut command = (config.worker)();
        // A parser stuck in its input must not outlive a host that dies without stopping it.
        worker::exit_with_parent(&mut command);
        let (worker, connection) = Worker::spawn_with_limits(command, limits())?;
        // The worker's reports need a thread that serves them, counted as serving at once
        // (they may come before it runs); it holds a clone of the connection, so the host
        // hangs up with `close()`, not by dropping the client.
        let serving = connection.spawn_serve(ParseEventsServer::from_arc(progress.clone()))?;
        let parser = ParserClient::new(connection).with_timeout(config.timeout);
        Ok(Sandbox {
            worker,
            parser,
            serving,
        })
    }

    /// Kills the worker, however it is doing, and says how it ended.
    fn kill(mut self) -> typed_ipc::Result<Exit> {
        // A worker that had died keeps the status it died with.
        self.worker.kill()?;
        let exit = self.worker.wait()?;
        // The connection ended with the worker, so the serving thread has returned.
        self.serving.join().expect("the serving thread panicked")?;
        Ok(exit)
    }

    /// Hangs up and waits for the worker to exit, killing it if it has not within `grace`.
    fn stop(mut self, grace: Duration) -> typed_ipc::Result<Exit> {
        self.parser.connection().close();
        self.serving.join().expect("the serving thread panicked")?;
        match self.worker.wait_timeout(grace)? {
            Some(exit) => Ok(exit),
            None => {
                self.worker.kill()?;
                self.worker.wait()
            }
        }
    }
}

/// What the host was asked to do.
pub struct HostConfig {
    /// A worker process's command: it must end up in [`run_worker`].
    pub worker: fn() -> Command,
    /// How long a call may take before the worker is deemed stuck (the first call also
    /// waits for the worker to start).
    pub timeout: Duration,
}

/// What [`run_host`] saw.
#[derive(Debug)]
pub struct Report {
    /// Each step, and whether its outcome was the one expected.
    pub checks: Vec<(String, bool)>,
    /// How many workers were started in all.
    pub started: usize,
    /// Progress reports the host ran (a reply may overtake the last reports of its call).
    pub reports: u64,
    /// Open fds of the host before it started anything, and after it shut everything down.
    pub fds_before: usize,
    pub fds_after: usize,
}

impl Report {
    fn check(&mut self, what: String, ok: bool) {
        println!("[host] {} {what}", if ok { "ok  " } else { "FAIL" });
        self.checks.push((what, ok));
    }
}

type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn memfd_with(bytes: &[u8]) -> Result<OwnedFd> {
    let mut file = File::from(memfd_create("parser-input", MFdFlags::MFD_CLOEXEC)?);
    file.write_all(bytes)?;
    Ok(file.into())
}

/// Runs the host: one worker at a time, restarted when it hangs or dies.
pub fn run_host(config: &HostConfig) -> Result<Report> {
    let mut report = Report {
        checks: Vec::new(),
        started: 1,
        reports: 0,
        fds_before: open_fds(),
        fds_after: 0,
    };
    let progress = Arc::new(Progress::default());
    let mut sandbox = Sandbox::start(config, &progress)?;

    let r = sandbox.parser.parse(b"the quick brown\nfox jumps\n");
    let good = Parsed {
        words: 5,
        lines: 2,
        longest: "quick".into(),
    };
    report.check(format!("good input: {r:?}"), r.ok() == Some(Ok(good)));

    let r = sandbox.parser.parse(b"caf\xc3");
    let refused = Err(ParseError::NotUtf8 { at: 3 });
    report.check(format!("bad input: {r:?}"), r.ok() == Some(refused));

    let r = sandbox.parser.parse_file(memfd_with(b"one two\nthree\n")?);
    let words = r
        .as_ref()
        .ok()
        .and_then(|r| r.as_ref().ok())
        .map(|p| p.words);
    report.check(format!("a file: {r:?}"), words == Some(3));

    // A pipe whose writer stays open: reading it would wait for good.
    let (pipe, writer) = nix::unistd::pipe()?;
    let r = sandbox.parser.parse_file(pipe);
    drop(writer);
    let refused = Err(ParseError::NotAFile);
    report.check(format!("a pipe: {r:?}"), r.ok() == Some(refused));

    // Input over what the host accepts, under what it sends.
    let big = "word ".repeat(1 << 18).into_bytes();
    let r = sandbox.parser.parse(big);
    let words = r
        .as_ref()
        .ok()
        .and_then(|r| r.as_ref().ok())
        .map(|p| p.words);
    report.check(
        format!("1.25 MiB of input: {words:?} words"),
        words == Some(1 << 18),
    );

    let r = sandbox.parser.parse(HUGE_MARK);
    let over = matches!(r, Err(Error::TooLarge { by_peer: false, .. }));
    report.check(format!("a result over the limits: {r:?}"), over);
    let r = sandbox.parser.parse(b"after");
    report.check(format!("then: {r:?}"), matches!(r, Ok(Ok(_))));

    let r = sandbox.parser.parse(PANIC_MARK);
    let panicked = matches!(&r, Err(Error::Panicked(why)) if why.contains("tripped"));
    report.check(format!("a panic: {r:?}"), panicked);
    let r = sandbox.parser.parse(b"after");
    report.check(
        format!("then, the same worker: {r:?}"),
        matches!(r, Ok(Ok(_))),
    );

    let r = sandbox.parser.parse(HANG_MARK);
    report.check(format!("a hang: {r:?}"), matches!(r, Err(Error::TimedOut)));
    let exit = sandbox.kill()?;
    report.check(
        format!("killed: {exit}"),
        exit == Exit::Signal(libc::SIGKILL),
    );
    sandbox = Sandbox::start(config, &progress)?;
    report.started += 1;
    let r = sandbox.parser.parse(b"after");
    report.check(format!("then, a new worker: {r:?}"), matches!(r, Ok(Ok(_))));

    let r = sandbox.parser.parse(ABORT_MARK);
    report.check(
        format!("an abort: {r:?}"),
        matches!(r, Err(Error::Disconnected)),
    );
    let exit = sandbox.kill()?;
    report.check(
        format!("it died: {exit}"),
        exit == Exit::Signal(libc::SIGABRT),
    );
    sandbox = Sandbox::start(config, &progress)?;
    report.started += 1;
    let r = sandbox.parser.parse(b"after");
    report.check(format!("then, a new worker: {r:?}"), matches!(r, Ok(Ok(_))));

    let exit = sandbox.stop(config.timeout)?;
    report.check(format!("hung up: {exit}"), exit == Exit::Code(0));
    report.reports = progress.reports.load(Ordering::Relaxed);
    println!("[host] {} progress reports", report.reports);
    // The fds typed-ipc dropped are closed on threads of its own.
    typed_ipc::wait_for_closes();
    report.fds_after = open_fds();
    Ok(report)
}

fn worker_command() -> Command {
    let mut command = Command::new(std::env::current_exe().expect("this program's path"));
    command.arg("--parser-worker");
    command
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--parser-worker") {
        return match run_worker() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("[parser {}] error: {e}", std::process::id());
                ExitCode::FAILURE
            }
        };
    }
    let config = HostConfig {
        worker: worker_command,
        timeout: Duration::from_secs(2),
    };
    match run_host(&config) {
        Ok(report) if report.checks.iter().all(|(_, ok)| *ok) => {
            if report.fds_after == report.fds_before {
                return ExitCode::SUCCESS;
            }
            eprintln!("[host] leaked {} fds", report.fds_after - report.fds_before);
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("[host] error: {e}");
            ExitCode::FAILURE
        }
    }
}
