//! A codec daemon on a Unix socket path, with clients in processes of their own.
//!
//! `cargo run --example codec_daemon --features tokio` starts the daemon as a child process,
//! then one client process per scenario, checks what each saw and what the daemon kept, and
//! exits 0:
//!
//! - a well-behaved client: a `#[oneway]` quality setting, frames in `SealedBuffer`s
//!   (zero copy), the daemon's own errors (`CodecError`), memfds passed as `Vec<OwnedFd>`,
//!   and the daemon calling it back (`CodecEvents::progress`) in the middle of each encode;
//!   run under `TYPED_IPC_DEBUG=1`, whose trace is checked;
//! - a client over the daemon's limits for untrusted clients (a frame too large, too many fds);
//! - a client whose call times out: the daemon's handler is cancelled, not left running;
//! - a client the daemon bans as it connects (`admit`), and one refused a method
//!   (`authorize`: the admin interface is for the daemon's parent only);
//! - a client that hangs up in the middle of a call, and one killed there: the daemon
//!   cancels their calls (no reply could reach them), and drops their sessions and their fds;
//! - a graceful shutdown (`SIGTERM`) while a call is in flight: the call gets its answer.
//!
//! Roles: `codec_daemon daemon <path>`, `codec_daemon client <path> <scenario>`.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use typed_ipc::shared_buffer::SealedBuffer;
use typed_ipc::tokio::{AsyncConnection, AsyncListener, AsyncServer, AsyncServing};
use typed_ipc::{Connection, Error, Limits, PeerCredentials};

/// Why the daemon refused to encode a frame or take a plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CodecError {
    /// The frame holds no bytes.
    EmptyFrame,
    /// The frame does not start with [`MAGIC`].
    BadMagic,
    /// The client answered the progress callback with "stop".
    Aborted,
    /// The client could not be called back: it hung up, most likely.
    ClientGone(String),
    /// Plane `index` is not a regular file.
    NotAFile(u32),
    /// Plane `index` is larger than [`MAX_PLANE`].
    PlaneTooLarge {
        /// Which plane.
        index: u32,
        /// Its size.
        len: u64,
    },
    /// Reading a plane failed.
    Io(String),
}

/// What one client's session has done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Frames encoded.
    pub frames: u64,
    /// Bytes of planes read.
    pub plane_bytes: u64,
    /// The quality the client set last.
    pub quality: u8,
}

/// What the daemon holds, for its parent to check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// Clients connected now (the admin's own connection among them).
    pub clients: u64,
    /// Fds open in the daemon, once typed-ipc's closer has closed what it was handed.
    pub open_fds: u64,
    /// Sessions made and dropped so far.
    pub sessions_made: u64,
    /// Sessions dropped so far: a client hung up and its calls ran.
    pub sessions_dropped: u64,
    /// Encodes cancelled mid-way: their caller gave up on them.
    pub cancelled: u64,
    /// Encodes whose client hung up while they called it back.
    pub clients_gone: u64,
}

/// The frame header the codec insists on.
pub const MAGIC: &[u8; 4] = b"FRM1";
/// The largest plane the daemon reads.
pub const MAX_PLANE: u64 = 1 << 20;

/// The daemon's service, one session per client.
#[typed_ipc::interface(name = "org.example.Codec")]
pub trait Codec {
    /// Encodes `frame` (run-length pairs after one byte of quality), calling the client's
    /// `CodecEvents::progress` half-way.
    async fn encode(&self, frame: SealedBuffer) -> Result<Vec<u8>, CodecError>;
    /// Reads the planes (regular files of at most [`MAX_PLANE`] bytes): their total size.
    async fn attach_planes(&self, planes: Vec<OwnedFd>) -> Result<u64, CodecError>;
    /// Sets the quality of the frames encoded from now on.
    #[oneway]
    async fn set_quality(&self, quality: u8);
    /// This client's session so far.
    async fn stats(&self) -> Stats;
}

/// What each client serves back to the daemon.
#[typed_ipc::interface(name = "org.example.CodecEvents")]
pub trait CodecEvents {
    /// Frame `frame` is `percent` done: `false` stops it.
    async fn progress(&self, frame: u64, percent: u8) -> bool;
}

/// The daemon's control interface, for the process that started it only.
#[typed_ipc::interface(name = "org.example.CodecAdmin", blocking_client)]
pub trait CodecAdmin {
    /// Turns clients of process `pid` away from now on.
    async fn ban(&self, pid: i32);
    /// What the daemon holds now.
    async fn status(&self) -> DaemonStatus;
}

/// State of the daemon's that sessions and the admin interface share.
#[derive(Default)]
struct Daemon {
    banned: Mutex<HashSet<i32>>,
    serving: Mutex<Option<AsyncServing>>,
    sessions_made: AtomicU64,
    sessions_dropped: AtomicU64,
    cancelled: AtomicU64,
    clients_gone: AtomicU64,
}

/// One client's state: its quality, its counts, and a client to call it back on.
struct Session {
    daemon: Arc<Daemon>,
    events: CodecEventsClient,
    quality: AtomicU8,
    frames: AtomicU64,
    plane_bytes: AtomicU64,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.daemon.sessions_dropped.fetch_add(1, Ordering::SeqCst);
    }
}

/// Counts an encode whose future was dropped before it finished: a cancelled call.
struct InFlight<'a> {
    daemon: &'a Daemon,
    finished: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.daemon.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Codec for Session {
    async fn encode(&self, frame: SealedBuffer) -> Result<Vec<u8>, CodecError> {
        let mut in_flight = InFlight {
            daemon: &self.daemon,
            finished: false,
        };
        let result = self.encode_frame(frame).await;
        in_flight.finished = true;
        result
    }

    async fn attach_planes(&self, planes: Vec<OwnedFd>) -> Result<u64, CodecError> {
        // An untrusted client's fd may be a FUSE file whose fstat or close stalls: off the
        // runtime's threads.
        let total = tokio::task::spawn_blocking(move || read_planes(planes))
            .await
            .map_err(|e| CodecError::Io(e.to_string()))??;
        self.plane_bytes.fetch_add(total, Ordering::SeqCst);
        Ok(total)
    }

    async fn set_quality(&self, quality: u8) {
        self.quality.store(quality, Ordering::SeqCst);
    }

    async fn stats(&self) -> Stats {
        Stats {
            frames: self.frames.load(Ordering::SeqCst),
            plane_bytes: self.plane_bytes.load(Ordering::SeqCst),
            quality: self.quality.load(Ordering::SeqCst),
        }
    }
}

impl Session {
    async fn encode_frame(&self, frame: SealedBuffer) -> Result<Vec<u8>, CodecError> {
        if frame.is_empty() {
            return Err(CodecError::EmptyFrame);
        }
        if !frame.starts_with(MAGIC) {
            return Err(CodecError::BadMagic);
        }
        let number = self.frames.fetch_add(1, Ordering::SeqCst) + 1;
        match self.events.progress(number, 50).await {
            Ok(true) => {}
            Ok(false) => return Err(CodecError::Aborted),
            Err(e) => {
                self.daemon.clients_gone.fetch_add(1, Ordering::SeqCst);
                return Err(CodecError::ClientGone(e.to_string()));
            }
        }
        Ok(run_length(
            self.quality.load(Ordering::SeqCst),
            &frame[MAGIC.len()..],
        ))
    }
}

/// One byte of quality, then (count, byte) pairs.
pub fn run_length(quality: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![quality];
    for chunk in bytes.chunk_by(|a, b| a == b) {
        for part in chunk.chunks(255) {
            out.extend([part.len() as u8, part[0]]);
        }
    }
    out
}

/// Checks each plane before reading it (a regular file, of at most [`MAX_PLANE`] bytes) and
/// reads it by position, as the docs ask of an fd from an untrusted peer.
fn read_planes(planes: Vec<OwnedFd>) -> Result<u64, CodecError> {
    let mut total = 0;
    for (index, fd) in planes.into_iter().enumerate() {
        let index = index as u32;
        let file = std::fs::File::from(fd);
        let meta = file.metadata().map_err(|e| CodecError::Io(e.to_string()))?;
        if !meta.is_file() {
            return Err(CodecError::NotAFile(index));
        }
        if meta.len() > MAX_PLANE {
            return Err(CodecError::PlaneTooLarge {
                index,
                len: meta.len(),
            });
        }
        let mut buf = vec![0; meta.len() as usize];
        let n = file
            .read_at(&mut buf, 0)
            .map_err(|e| CodecError::Io(e.to_string()))?;
        total += n as u64;
    }
    Ok(total)
}

impl CodecAdmin for Arc<Daemon> {
    async fn ban(&self, pid: i32) {
        self.banned.lock().unwrap().insert(pid);
    }

    async fn status(&self) -> DaemonStatus {
        let clients = (self.serving.lock().unwrap().as_ref()).map_or(0, |s| s.clients() as u64);
        // `wait_for_closes` blocks: not on a runtime thread.
        let open_fds = tokio::task::spawn_blocking(|| {
            typed_ipc::wait_for_closes();
            std::fs::read_dir("/proc/self/fd").unwrap().count() as u64 - 1
        })
        .await
        .unwrap();
        DaemonStatus {
            clients,
            open_fds,
            sessions_made: self.sessions_made.load(Ordering::SeqCst),
            sessions_dropped: self.sessions_dropped.load(Ordering::SeqCst),
            cancelled: self.cancelled.load(Ordering::SeqCst),
            clients_gone: self.clients_gone.load(Ordering::SeqCst),
        }
    }
}

/// What the daemon holds an untrusted client to: small requests, few fds, frames of at most
/// 1 MiB, while its own replies may be larger.
pub fn client_limits() -> Limits {
    #[allow(clippy::needless_update)]
    Limits {
        max_message_len: 64 << 10,
        max_fds: 4,
        max_shared_len: 1 << 20,
        max_send_len: Some(16 << 20),
        ..Limits::default()
    }
}

/// Prints a line the parent waits for.
fn say(what: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "codec-daemon: {what}").unwrap();
    out.flush().unwrap();
}

/// The daemon: serves `path` until `SIGTERM`, then shuts down gracefully.
pub fn run_daemon(path: &Path) -> Result<(), Error> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let daemon = Arc::new(Daemon::default());
        let parent = std::os::unix::process::parent_id() as i32;
        let fds_before = open_fds().await;
        let (admitting, sessions) = (daemon.clone(), daemon.clone());
        let serving = AsyncServer::new()
            .service(CodecAdminServer::new(daemon.clone()))
            .service_with(move |connection| {
                sessions.sessions_made.fetch_add(1, Ordering::SeqCst);
                CodecServer::new(Session {
                    daemon: sessions.clone(),
                    events: CodecEventsClient::new(connection.clone())
                        .with_timeout(Duration::from_secs(30)),
                    quality: AtomicU8::new(5),
                    frames: AtomicU64::new(0),
                    plane_bytes: AtomicU64::new(0),
                })
            })
            .client_limits(client_limits())
            .max_clients(16)
            .admit(move |peer: Option<&PeerCredentials>| match peer {
                Some(p) if admitting.banned.lock().unwrap().contains(&p.pid) => {
                    Err(format!("process {} is banned", p.pid))
                }
                _ => Ok(()),
            })
            .authorize(move |peer, iface, _cmd| match peer {
                _ if iface.name != CODEC_ADMIN_INFO.name => Ok(()),
                Some(p) if p.pid == parent => Ok(()),
                _ => Err("the admin interface is the daemon's parent's".into()),
            })
            .listen(AsyncListener::bind(path)?);
        *daemon.serving.lock().unwrap() = Some(serving);
        say("ready");
        sigterm.recv().await;
        say("shutting down");
        let serving = daemon.serving.lock().unwrap().take().unwrap();
        serving.shutdown().await;
        // Every client has gone, and with it what the daemon held for it: its session, and
        // every fd.
        let fds_after = open_fds().await;
        assert_eq!(fds_after, fds_before, "fds the daemon kept");
        let made = daemon.sessions_made.load(Ordering::SeqCst);
        let dropped = daemon.sessions_dropped.load(Ordering::SeqCst);
        assert_eq!(dropped, made, "sessions the daemon kept");
        say(&format!(
            "stopped: {made} sessions, {} cancelled, {} clients gone mid-call",
            daemon.cancelled.load(Ordering::SeqCst),
            daemon.clients_gone.load(Ordering::SeqCst)
        ));
        Ok(())
    })
}

/// How a client answers the daemon's progress callback.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    /// "Go on", at once.
    Go,
    /// Says `in-callback`, then waits for a line on stdin before it says "go on".
    WhenTold,
    /// Says `in-callback`, then never answers.
    Never,
}

/// The client's answer, and who to tell that the daemon called back.
struct Progress(Answer, Arc<tokio::sync::Notify>);

impl CodecEvents for Progress {
    async fn progress(&self, _frame: u64, _percent: u8) -> bool {
        if self.0 != Answer::Go {
            say("in-callback");
        }
        self.1.notify_one();
        match self.0 {
            Answer::Go => {}
            Answer::WhenTold => {
                let line = tokio::task::spawn_blocking(|| {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).map(|_| line)
                });
                line.await.unwrap().unwrap();
            }
            Answer::Never => std::future::pending().await,
        }
        true
    }
}

fn frame(body: &[u8]) -> SealedBuffer {
    SealedBuffer::copy_from(&[&MAGIC[..], body].concat()).unwrap()
}

fn memfd(contents: &[u8]) -> OwnedFd {
    let fd =
        nix::sys::memfd::memfd_create("plane", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    std::fs::File::from(fd.try_clone().unwrap())
        .write_all(contents)
        .unwrap();
    fd
}

/// A client process: plays `scenario` against the daemon at `path`; panics on a surprise.
pub fn run_client(path: &Path, scenario: &str) -> Result<(), Error> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        if scenario == "banned" {
            // Connects only once the parent has banned this process.
            tokio::task::spawn_blocking(|| std::io::stdin().read(&mut [0; 1]))
                .await
                .unwrap()?;
        }
        let fds_before = open_fds().await;
        let connection = AsyncConnection::connect(path).await?;
        let answer = match scenario {
            "shutdown" => Answer::WhenTold,
            "vanish" | "timeout" | "hangup" => Answer::Never,
            _ => Answer::Go,
        };
        let called_back = Arc::new(tokio::sync::Notify::new());
        let progress = Progress(answer, called_back.clone());
        connection.add_service(CodecEventsServer::new(progress));
        let codec = CodecClient::new(connection.clone());
        match scenario {
            "normal" => normal_client(&codec, &connection).await,
            "limits" => {
                let large = frame(&vec![7; 2 << 20]);
                match codec.encode(large).await {
                    Err(Error::TooLarge { by_peer: true, .. }) => {}
                    other => panic!("a 2 MiB frame: {other:?}"),
                }
                let planes = (0..5).map(|_| memfd(b"p")).collect();
                match codec.attach_planes(planes).await {
                    Err(Error::TooManyFds { by_peer: true, .. }) => {}
                    other => panic!("5 planes: {other:?}"),
                }
                // Still served after both.
                assert_eq!(
                    codec.encode(frame(b"ab")).await?,
                    Ok(vec![5, 1, b'a', 1, b'b'])
                );
            }
            "timeout" => {
                let impatient = codec.clone().with_timeout(Duration::from_millis(200));
                match impatient.encode(frame(b"zzz")).await {
                    Err(Error::TimedOut) => {}
                    other => panic!("an encode whose callback never returns: {other:?}"),
                }
                // The connection is still usable, and the frame was counted as started.
                assert_eq!(codec.stats().await?.frames, 1);
            }
            "banned" => match codec.stats().await {
                Err(Error::Refused(reason)) => assert!(reason.contains("banned"), "{reason}"),
                other => panic!("a banned client's call: {other:?}"),
            },
            "shutdown" => {
                assert_eq!(
                    codec.encode(frame(b"xxxy")).await?,
                    Ok(vec![5, 3, b'x', 1, b'y'])
                );
                say("answered");
            }
            "hangup" => {
                // Hangs up while its call is in flight, the daemon calling it back.
                let call = tokio::spawn({
                    let codec = codec.clone();
                    async move { codec.encode(frame(b"cut short")).await }
                });
                called_back.notified().await;
                connection.close();
                match call.await.unwrap() {
                    Err(Error::Disconnected) => {}
                    other => panic!("a call whose client hung up: {other:?}"),
                }
                // Its own handler of the daemon's callback, which never answers, was
                // cancelled by `close` (else `wait_closed` below would wait for it).
            }
            "vanish" => {
                let _ = codec.encode(frame(b"never answered")).await;
                unreachable!("the parent kills this client during its call");
            }
            other => panic!("no scenario {other}"),
        }
        connection.close();
        connection.wait_closed().await;
        drop((codec, connection));
        let fds_after = open_fds().await;
        assert_eq!(fds_after, fds_before, "fds the {scenario} client kept");
        Ok(())
    })
}

/// This process's open fds, once typed-ipc's closer has closed what it was handed.
async fn open_fds() -> Vec<(String, PathBuf)> {
    // `wait_for_closes` blocks: not on a runtime thread.
    tokio::task::spawn_blocking(|| {
        typed_ipc::wait_for_closes();
        let fds = std::fs::read_dir("/proc/self/fd").unwrap();
        let mut fds: Vec<_> = fds
            .filter_map(|e| {
                let e = e.ok()?;
                Some((
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read_link(e.path()).ok()?,
                ))
            })
            .collect();
        fds.sort();
        fds
    })
    .await
    .unwrap()
}

async fn normal_client(codec: &CodecClient, connection: &AsyncConnection) {
    // A oneway, then a call: the call starts only once the oneway has run.
    codec.set_quality(9).await.unwrap();
    let encoded = codec.encode(frame(b"aaab")).await.unwrap();
    assert_eq!(encoded, Ok(vec![9, 3, b'a', 1, b'b']));
    // A frame of 300 KiB, its encoding about as large: a reply over the daemon's 64 KiB
    // `max_message_len`, which `max_send_len` lets it send.
    let body: Vec<u8> = (0..300 << 10).map(|i| i as u8).collect();
    let encoded = codec.encode(frame(&body)).await.unwrap().unwrap();
    assert_eq!(encoded.len(), 1 + 2 * body.len());
    assert_eq!(
        codec
            .encode(SealedBuffer::copy_from(b"").unwrap())
            .await
            .unwrap(),
        Err(CodecError::EmptyFrame)
    );
    let bad = SealedBuffer::copy_from(b"JPEG....").unwrap();
    assert_eq!(codec.encode(bad).await.unwrap(), Err(CodecError::BadMagic));
    let planes = vec![memfd(b"abc"), memfd(b"defgh")];
    assert_eq!(codec.attach_planes(planes).await.unwrap(), Ok(8));
    let (read, _write) = nix::unistd::pipe().unwrap();
    assert_eq!(
        codec.attach_planes(vec![read]).await.unwrap(),
        Err(CodecError::NotAFile(0))
    );
    let stats = codec.stats().await.unwrap();
    assert_eq!(
        stats,
        Stats {
            frames: 2,
            plane_bytes: 8,
            quality: 9
        }
    );
    // The admin interface is the daemon's parent's.
    let admin = CodecAdminClient::new(connection.clone());
    match admin.status().await {
        Err(Error::Refused(reason)) => assert!(reason.contains("parent"), "{reason}"),
        other => panic!("a client calling the admin interface: {other:?}"),
    }
}

/// A child process of this program's, its stdout read line by line.
struct Process {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Process {
    fn start(mut command: Command) -> Process {
        command.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = command.spawn().expect("start a child process");
        let out = BufReader::new(child.stdout.take().unwrap());
        Process { child, out }
    }

    /// Waits for the child to say `what` (a line that starts so), and returns what the line
    /// says after it; other lines (a test harness's) are passed over.
    fn wait_for(&mut self, what: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.out.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "child {} ended before it said {what:?}",
                self.child.id()
            );
            if let Some(rest) = line
                .trim_end()
                .strip_prefix(&format!("codec-daemon: {what}"))
            {
                return rest.to_owned();
            }
        }
    }

    fn tell(&mut self) {
        self.child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(b"go\n")
            .unwrap();
    }

    /// Waits for the child to exit, and checks that it succeeded.
    fn succeeds(&mut self, what: &str) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{what}: {status}");
    }
}

impl Drop for Process {
    /// A child left running (the parent panicked) is killed, not orphaned.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What the parent saw, for a test to check further.
#[derive(Debug)]
pub struct Report {
    /// The daemon's status with only the admin connected, before any client.
    pub first: DaemonStatus,
    /// What the daemon said once it had shut down (having checked that it holds no session
    /// and no fd of its clients'): `: 7 sessions, 3 cancelled, 0 clients gone mid-call`.
    pub stopped: String,
    /// The well-behaved client's `TYPED_IPC_DEBUG=1` trace.
    pub trace: String,
}

/// Starts the daemon and every client as processes of their own (`spawn(args)` makes the
/// command for a role's `args`), checks what each does, and stops the daemon.
pub fn orchestrate(spawn: &dyn Fn(&[&str]) -> Command) -> Report {
    let path: PathBuf =
        std::env::temp_dir().join(format!("codec-daemon-{}.sock", std::process::id()));
    let path_arg = path.to_str().unwrap();
    let mut daemon = Process::start(spawn(&["daemon", path_arg]));
    daemon.wait_for("ready");
    let admin = CodecAdminBlockingClient::new(Connection::connect(&path).unwrap());
    let first = admin.status().unwrap();
    assert_eq!(first.clients, 1, "{first:?}");

    // The well-behaved client, traced.
    let mut command = spawn(&["client", path_arg, "normal"]);
    command.env("TYPED_IPC_DEBUG", "1").stderr(Stdio::piped());
    let mut normal = Process::start(command);
    let mut trace = String::new();
    normal
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut trace)
        .unwrap();
    normal.succeeds("the well-behaved client");

    for scenario in ["limits", "timeout", "hangup"] {
        Process::start(spawn(&["client", path_arg, scenario])).succeeds(scenario);
    }

    let mut banned = Process::start(spawn(&["client", path_arg, "banned"]));
    admin.ban(banned.child.id() as i32).unwrap();
    banned.tell();
    banned.succeeds("the banned client");

    let mut vanishing = Process::start(spawn(&["client", path_arg, "vanish"]));
    vanishing.wait_for("in-callback");
    vanishing.child.kill().unwrap();
    vanishing.child.wait().unwrap();

    drop(admin);

    // A graceful shutdown while a call is in flight: the call is answered.
    let mut in_flight = Process::start(spawn(&["client", path_arg, "shutdown"]));
    in_flight.wait_for("in-callback");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    daemon.wait_for("shutting down");
    in_flight.tell();
    in_flight.wait_for("answered");
    in_flight.succeeds("the client whose call was in flight at the shutdown");
    let stopped = daemon.wait_for("stopped");
    daemon.succeeds("the daemon");
    assert!(!path.exists(), "the daemon left its socket file behind");
    // Sessions: the admin's, the six clients' the daemon admitted. Cancelled: the handlers
    // of the timed-out call, of the client that hung up and of the killed one, each as it
    // waited for its callback, which none saw fail.
    assert_eq!(
        stopped,
        ": 7 sessions, 3 cancelled, 0 clients gone mid-call"
    );
    Report {
        first,
        stopped,
        trace,
    }
}

/// Runs the role `args` name (`daemon <path>` or `client <path> <scenario>`).
pub fn run_role(args: &[String]) -> Result<(), Error> {
    match args {
        [role, path] if role == "daemon" => run_daemon(Path::new(path)),
        [role, path, scenario] if role == "client" => run_client(Path::new(path), scenario),
        _ => panic!("usage: codec_daemon [daemon <path> | client <path> <scenario>]"),
    }
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.is_empty() {
        return run_role(&args);
    }
    let exe = std::env::current_exe()?;
    let report = orchestrate(&|args| {
        let mut command = Command::new(&exe);
        command.args(args);
        command
    });
    println!("daemon before clients: {:?}", report.first);
    println!("daemon stopped{}", report.stopped);
    println!("the well-behaved client's trace:\n{}", report.trace);
    Ok(())
}
