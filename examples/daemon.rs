//! A system daemon: "thumbnailer", an [`AsyncServer`] on a socket path that many client
//! processes use at once.
//!
//! A client connects, serves a `Progress` interface of its own on the same connection, and
//! asks for thumbnails: it hands the daemon an 8-bit grey image (a [`SealedBuffer`], or a
//! bare memfd as an `OwnedFd`), and while that call is in flight the daemon calls the client
//! back: `progress` oneways, then `proceed`, a call the client may answer `false` to decline
//! the job. The reply is a new sealed buffer, the image halved in each direction.
//!
//! The daemon serves only the uids it is told to, turning the others away as they connect
//! (`admit`), before any session is made for them; it serves at most `MAX_CLIENTS` clients at
//! once (`max_clients`), keeps per-client state (`service_with`), copes with clients that die
//! mid-call, flood it, or stop reading, and on `SIGTERM` stops accepting, lets the calls in
//! flight finish and reply, removes its socket file and exits 0.
//!
//! ```text
//! cargo run --example daemon --features tokio -- daemon /tmp/thumbnailer.sock &
//! cargo run --example daemon --features tokio -- client /tmp/thumbnailer.sock
//! kill %1
//! ```
//!
//! The clients are of the blocking flavour (`Connection::connect`, the generated
//! `ThumbnailerBlockingClient`), in processes of their own; `tests/daemon.rs` adds an async one
//! and checks what every side reports. Each interface is declared once, in the flavour of its
//! server, and asks for the client of the other flavour (`blocking_client`, `async_client`).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use typed_ipc::shared_buffer::SealedBuffer;
use typed_ipc::tokio::{AsyncListener, AsyncServer};
use typed_ipc::{Connection, Error, Limits, Result};

/// The size of an image, in pixels of one byte each.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

/// A thumbnail: the image halved in each direction, each pixel the mean of four.
#[derive(Debug, Serialize, Deserialize)]
pub struct Thumb {
    pub size: Size,
    pub pixels: SealedBuffer,
    /// The daemon's number for the job, as its `progress` callbacks named it.
    pub job: u64,
}

/// Why the daemon refuses a job: an answer, not a failure of the daemon.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ThumbError {
    /// The image does not hold `width * height` bytes.
    SizeMismatch { expected: u64, got: u64 },
    /// The client answered `proceed` with `false`.
    Declined { job: u64 },
    /// The client could not be asked (it hung up or died mid-call).
    ClientGone { job: u64 },
    /// The fd is not a readable file.
    Unreadable(String),
    /// The image is larger than the daemon takes.
    TooLarge { pixels: u64, max: u64 },
}

/// Who the daemon says is calling, and how many calls that connection has made.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Whoami {
    pub pid: i32,
    pub uid: u32,
    pub calls_here: u32,
}

/// The daemon's own view of itself.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub clients: u64,
    pub open_fds: u64,
    pub notes: u64,
}

/// What the daemon serves: an async trait, which the daemon implements. Its clients call it
/// through `ThumbnailerBlockingClient` (`blocking_client`); an async client, as in
/// `tests/daemon.rs`, through `ThumbnailerClient`.
#[typed_ipc::interface(name = "org.example.Thumbnailer", blocking_client)]
pub trait Thumbnailer {
    async fn thumbnail(&self, image: SealedBuffer, size: Size) -> Result<Thumb, ThumbError>;
    async fn thumbnail_fd(&self, image: OwnedFd, size: Size) -> Result<Thumb, ThumbError>;
    async fn whoami(&self) -> Whoami;
    #[oneway]
    async fn note(&self, seq: u64);
    async fn status(&self) -> Status;
}

/// What each client serves, on its connection to the daemon: a blocking trait, which the
/// daemon calls through `ProgressAsyncClient` (`async_client`).
#[typed_ipc::interface(name = "org.example.Thumbnailer.Progress", async_client)]
pub trait Progress {
    #[oneway]
    fn progress(&self, job: u64, rows_done: u32, rows: u32);
    fn proceed(&self, job: u64, pixels: u64) -> bool;
    /// The job was let proceed, and the daemon is reading the image.
    #[oneway]
    fn started(&self, job: u64);
}

/// The largest image the daemon takes: a sealed buffer's size is checked on receipt (the
/// clients' `max_shared_len`), a bare fd's by the daemon as it reads.
pub const MAX_PIXELS: u64 = 64 << 20;

/// What a client may send: its messages are small (the images are fds), and it hands over
/// one image at a time.
pub fn client_limits() -> Limits {
    // `..Limits::default()` as its docs advise, for the fields it may gain; clippy calls
    // that needless while every field is set.
    #[allow(clippy::needless_update)]
    Limits {
        max_message_len: 64 << 10,
        max_fds: 4,
        max_shared_len: MAX_PIXELS as usize,
        ..Limits::default()
    }
}

/// The most clients the daemon serves at once: each one costs a session and a socket, and a
/// local user must not be able to take them all. The next one is refused, told so.
pub const MAX_CLIENTS: usize = 256;

/// How long a client may take to answer the daemon's call back into it.
const CALLBACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a client may take to write an image it sends as a pipe: a pipe whose writer
/// never closes it would otherwise hold its call, and a graceful shutdown, up for good.
const PIPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Up to `limit` bytes of the file or pipe `image`.
async fn read_image(image: OwnedFd, limit: u64) -> Result<Vec<u8>, ThumbError> {
    use nix::sys::stat::{SFlag, fstat};
    let is_pipe = fstat(&image).map_err(|e| unreadable(&e))?.st_mode & SFlag::S_IFMT.bits()
        == SFlag::S_IFIFO.bits();
    if !is_pipe {
        // A file reads to its end at once: off the runtime's threads.
        let read = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut bytes = Vec::new();
            let file = std::fs::File::from(image);
            (&file).take(limit).read_to_end(&mut bytes).map(|_| bytes)
        });
        return read
            .await
            .map_err(|e| unreadable(&e))?
            .map_err(|e| unreadable(&e));
    }
    // A pipe is read on the runtime, for at most `PIPE_TIMEOUT`.
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(image);
    let pipe = pipe.map_err(|e| unreadable(&e))?;
    let mut bytes = Vec::new();
    let read_all = async {
        let mut chunk = [0u8; 4096];
        while (bytes.len() as u64) < limit {
            pipe.readable().await?;
            match pipe.try_read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(PIPE_TIMEOUT, read_all).await {
        Ok(Ok(())) => Ok(bytes),
        Ok(Err(e)) => Err(unreadable(&e)),
        Err(_) => Err(ThumbError::Unreadable(
            "the pipe was not closed in time".into(),
        )),
    }
}

/// The thumbnail of `pixels`, of `size`: each output pixel the mean of a 2x2 block.
pub fn halve(pixels: &[u8], size: Size) -> (Size, Vec<u8>) {
    let out = Size {
        width: size.width / 2,
        height: size.height / 2,
    };
    let w = size.width as usize;
    let mut thumb = Vec::with_capacity(out.width as usize * out.height as usize);
    for y in 0..out.height as usize {
        for x in 0..out.width as usize {
            let at = |dx, dy| pixels[(2 * y + dy) * w + 2 * x + dx] as u32;
            thumb.push(((at(0, 0) + at(1, 0) + at(0, 1) + at(1, 1)) / 4) as u8);
        }
    }
    (out, thumb)
}

/// A test image of `size`, different for every `seed`.
pub fn image(size: Size, seed: u8) -> Vec<u8> {
    let len = size.width as usize * size.height as usize;
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

// ---- the daemon ----

/// What the whole daemon counts.
#[derive(Default)]
struct Shared {
    /// Sessions alive: a client's goes once it has hung up and its calls have run.
    sessions: AtomicU64,
    jobs: AtomicU64,
    notes: AtomicU64,
}

/// One client's session: its calls, and a way to call it back.
struct Session {
    shared: std::sync::Arc<Shared>,
    progress: ProgressAsyncClient,
    calls: AtomicU32,
}

/// Open fds of this process.
pub fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Session {
    /// Tells the client how the job goes and asks it whether to proceed (the work here is
    /// too quick to report on as it goes: the reports stand for a long job's). `Ok(job)`:
    /// proceed.
    async fn ask(&self, size: Size) -> Result<u64, ThumbError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let job = self.shared.jobs.fetch_add(1, Ordering::Relaxed) + 1;
        // Oneways: the client's `proceed` runs only once they have all run.
        const STEPS: u32 = 4;
        for step in 1..=STEPS {
            let rows = size.height;
            if self
                .progress
                .progress(job, rows * step / STEPS, rows)
                .await
                .is_err()
            {
                return Err(ThumbError::ClientGone { job });
            }
        }
        let pixels = size.width as u64 * size.height as u64;
        match self.progress.proceed(job, pixels).await {
            Ok(true) => {}
            Ok(false) => return Err(ThumbError::Declined { job }),
            Err(_) => return Err(ThumbError::ClientGone { job }),
        }
        match self.progress.started(job).await {
            Ok(()) => Ok(job),
            Err(_) => Err(ThumbError::ClientGone { job }),
        }
    }
}

/// The thumbnail of `pixels`, which should be an image of `size`.
fn thumbnail_of(job: u64, pixels: &[u8], size: Size) -> Result<Thumb, ThumbError> {
    let expected = size.width as u64 * size.height as u64;
    if pixels.len() as u64 != expected {
        let got = pixels.len() as u64;
        return Err(ThumbError::SizeMismatch { expected, got });
    }
    let (size, thumb) = halve(pixels, size);
    let pixels = SealedBuffer::copy_from(&thumb).map_err(|e| unreadable(&e))?;
    Ok(Thumb { size, pixels, job })
}

fn unreadable(e: &dyn std::fmt::Display) -> ThumbError {
    ThumbError::Unreadable(e.to_string())
}

impl Thumbnailer for Session {
    async fn thumbnail(&self, image: SealedBuffer, size: Size) -> Result<Thumb, ThumbError> {
        let job = self.ask(size).await?;
        thumbnail_of(job, image.as_bytes(), size)
    }

    async fn thumbnail_fd(&self, image: OwnedFd, size: Size) -> Result<Thumb, ThumbError> {
        // A bare fd is not checked on receipt, and may be endless (`/dev/zero`): read at most
        // what the size says, plus one byte to tell a file too long, and only for a size the
        // daemon takes.
        let pixels = size.width as u64 * size.height as u64;
        if pixels > MAX_PIXELS {
            return Err(ThumbError::TooLarge {
                pixels,
                max: MAX_PIXELS,
            });
        }
        let job = self.ask(size).await?;
        let limit = pixels + 1;
        let pixels = read_image(image, limit).await?;
        thumbnail_of(job, &pixels, size)
    }

    async fn whoami(&self) -> Whoami {
        let calls_here = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let peer = typed_ipc::current_peer().expect("a listener's client has credentials");
        Whoami {
            pid: peer.pid,
            uid: peer.uid,
            calls_here,
        }
    }

    async fn note(&self, _seq: u64) {
        self.shared.notes.fetch_add(1, Ordering::Relaxed);
    }

    async fn status(&self) -> Status {
        Status {
            clients: self.shared.sessions.load(Ordering::SeqCst),
            open_fds: open_fds(),
            notes: self.shared.notes.load(Ordering::Relaxed),
        }
    }
}

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub path: std::path::PathBuf,
    /// The uids served; everyone else is refused as it connects.
    pub allowed_uids: Vec<u32>,
    /// How long a reply a client does not read may hold the shutdown up.
    pub stall_limit: std::time::Duration,
}

/// Runs the daemon until `SIGTERM`, then shuts down gracefully. Says `listening` on stderr
/// once clients may connect, `draining` once `SIGTERM` came, and `stopped` at the end.
pub fn run_daemon(config: DaemonConfig) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve_until_sigterm(config))
}

async fn serve_until_sigterm(config: DaemonConfig) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Before the socket exists: a SIGTERM sent once a client could connect is ours to handle.
    let mut term = signal(SignalKind::terminate())?;
    let shared = std::sync::Arc::new(Shared::default());
    let allowed = config.allowed_uids.clone();
    let listener = AsyncListener::bind(&config.path)?;
    let serving = AsyncServer::new()
        .service_with({
            let shared = shared.clone();
            move |connection| {
                shared.sessions.fetch_add(1, Ordering::SeqCst);
                ThumbnailerServer::new(Session {
                    shared: shared.clone(),
                    // A client that never answers must not hold its call, nor a graceful
                    // shutdown (which waits for the calls in flight), up for good.
                    progress: ProgressAsyncClient::new(connection.clone())
                        .with_timeout(CALLBACK_TIMEOUT),
                    calls: AtomicU32::new(0),
                })
            }
        })
        // Who may connect is all there is to decide: every uid served may call every method.
        // Decided once per client, before `service_with` makes a session for it.
        .admit(move |peer| match peer {
            Some(p) if allowed.contains(&p.uid) => Ok(()),
            Some(p) => Err(format!("uid {} may not use the thumbnailer", p.uid)),
            None => Err("no credentials".into()),
        })
        .max_clients(MAX_CLIENTS)
        .shutdown_stall_limit(config.stall_limit)
        .client_limits(client_limits())
        .listen(listener);
    eprintln!("thumbnailer: listening on {}", config.path.display());
    term.recv().await;
    eprintln!("thumbnailer: draining {} clients", serving.clients());
    serving.shutdown().await;
    eprintln!(
        "thumbnailer: stopped after {} jobs",
        shared.jobs.load(Ordering::Relaxed)
    );
    Ok(())
}

// ---- the clients (blocking flavour) ----

/// A client's `Progress`: counts the progress reports, and answers `proceed` with `decide`.
pub struct ClientProgress<F> {
    pub reports: AtomicU32,
    pub decide: F,
}

impl<F: Fn(u64, u32) -> bool + Send + Sync + 'static> Progress
    for std::sync::Arc<ClientProgress<F>>
{
    fn progress(&self, _job: u64, _rows_done: u32, _rows: u32) {
        self.reports.fetch_add(1, Ordering::SeqCst);
    }
    fn proceed(&self, job: u64, _pixels: u64) -> bool {
        // Every report sent before this call has run: oneways run before a later call.
        let reports = self.reports.swap(0, Ordering::SeqCst);
        (self.decide)(job, reports)
    }
    fn started(&self, _job: u64) {}
}

/// A connected client: its stub, and the thread that serves its `Progress`.
pub struct Client {
    pub thumbnailer: ThumbnailerBlockingClient,
    serving: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Client {
    /// Connects to the daemon at `path` and serves `progress` on the connection.
    pub fn connect<F>(path: &Path, progress: std::sync::Arc<ClientProgress<F>>) -> Result<Client>
    where
        F: Fn(u64, u32) -> bool + Send + Sync + 'static,
    {
        let connection = Connection::connect(path)?;
        // Counted as serving at once: the daemon's reports may come before the thread runs.
        let serving = connection.spawn_serve(ProgressServer::new(progress))?;
        Ok(Client {
            thumbnailer: ThumbnailerBlockingClient::new(connection),
            serving: Some(serving),
        })
    }

    /// Hangs up and waits for the serving thread.
    pub fn close(mut self) -> Result<()> {
        self.thumbnailer.connection().close();
        self.serving
            .take()
            .unwrap()
            .join()
            .expect("the serving thread panicked")
    }
}

/// What a well-behaved client saw.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientReport {
    pub whoami: Whoami,
    /// The thumbnails, as sent back and as computed here, compared.
    pub sealed_correct: bool,
    pub fd_correct: bool,
    pub mismatch: ThumbError,
    pub declined: ThumbError,
}

/// A client that behaves: asks who it is, then for thumbnails of both kinds, one of the
/// wrong size and one it declines.
pub fn run_client(path: &Path, seed: u8) -> Result<ClientReport> {
    const DECLINE: u32 = 4; // the fourth job: the one after the short image
    let asked = std::sync::Arc::new(AtomicU32::new(0));
    let progress = std::sync::Arc::new(ClientProgress {
        reports: AtomicU32::new(0),
        decide: {
            let asked = asked.clone();
            move |_job, reports| {
                assert_eq!(reports, 4, "every progress report before `proceed`");
                asked.fetch_add(1, Ordering::SeqCst) + 1 != DECLINE
            }
        },
    });
    let client = Client::connect(path, progress)?;
    let daemon = &client.thumbnailer;
    let whoami = daemon.whoami()?;
    let size = Size {
        width: 64,
        height: 48,
    };
    let pixels = image(size, seed);
    let expected = halve(&pixels, size);

    let thumb = daemon.thumbnail(SealedBuffer::copy_from(&pixels)?, size)?;
    let thumb = thumb.map_err(|e| Error::Io(std::io::Error::other(format!("{e:?}"))))?;
    let sealed_correct = (thumb.size, thumb.pixels.as_bytes().to_vec()) == expected;

    let memfd = memfd_with(&pixels)?;
    let thumb = daemon.thumbnail_fd(memfd, size)?;
    let thumb = thumb.map_err(|e| Error::Io(std::io::Error::other(format!("{e:?}"))))?;
    let fd_correct = (thumb.size, thumb.pixels.as_bytes().to_vec()) == expected;

    let short = SealedBuffer::copy_from(&pixels[..100])?;
    let mismatch = daemon.thumbnail(short, size)?.expect_err("a short image");
    let declined = daemon.thumbnail(SealedBuffer::copy_from(&pixels)?, size)?;
    let declined = declined.expect_err("declined");
    client.close()?;
    Ok(ClientReport {
        whoami,
        sealed_correct,
        fd_correct,
        mismatch,
        declined,
    })
}

/// A memfd holding `bytes`, its offset at the start (not sealed: a bare fd).
pub fn memfd_with(bytes: &[u8]) -> Result<OwnedFd> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use std::io::Write;
    let fd = memfd_create("thumbnailer-image", MFdFlags::MFD_CLOEXEC).map_err(io_error)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    std::io::Seek::rewind(&mut file)?;
    Ok(file.into())
}

fn io_error(e: nix::Error) -> Error {
    Error::Io(e.into())
}

/// A client that dies mid-call: inside the daemon's `proceed` callback it aborts.
pub fn run_vanishing_client(path: &Path) -> Result<()> {
    let progress = std::sync::Arc::new(ClientProgress {
        reports: AtomicU32::new(0),
        decide: |_job, _reports| std::process::abort(),
    });
    let client = Client::connect(path, progress)?;
    let size = Size {
        width: 8,
        height: 8,
    };
    let image = SealedBuffer::copy_from(&image(size, 7))?;
    let _ = client.thumbnailer.thumbnail(image, size);
    unreachable!("the process aborted in `proceed`");
}

/// A client that floods the daemon with oneways and calls from several threads, and says
/// `flooding` on stderr once it has sent `announce_after` oneways. Never returns.
pub fn run_flooding_client(path: &Path, announce_after: u64) -> Result<()> {
    let progress = std::sync::Arc::new(ClientProgress {
        reports: AtomicU32::new(0),
        decide: |_job, _reports| true,
    });
    let client = Client::connect(path, progress)?;
    let daemon = client.thumbnailer.clone();
    for _ in 0..4 {
        let daemon = daemon.clone();
        std::thread::spawn(move || while daemon.whoami().is_ok() {});
    }
    for seq in 0.. {
        daemon.note(seq)?;
        if seq == announce_after {
            eprintln!("flooding");
        }
    }
    unreachable!()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = Path::new(args.get(1).map_or("/tmp/thumbnailer.sock", String::as_str));
    let outcome = match args.first().map(String::as_str) {
        Some("daemon") => run_daemon(DaemonConfig {
            path: path.into(),
            allowed_uids: vec![nix::unistd::getuid().as_raw()],
            stall_limit: std::time::Duration::from_secs(5),
        }),
        Some("client") => run_client(path, 1).map(|report| println!("{report:#?}")),
        _ => {
            eprintln!("usage: daemon (daemon|client) [SOCKET_PATH]");
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
