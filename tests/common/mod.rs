//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::os::fd::BorrowedFd;
use typed_ipc::Socket;
use typed_ipc::service::InterfaceInfo;

/// Open fds of this process, but for tokio's own sockets (see [`TOKIO_SOCKETS`]), once the
/// fds typed-ipc dropped so far are closed (it closes them on threads of its own).
pub fn open_fds() -> usize {
    no_stray_fd_from_malloc();
    typed_ipc::wait_for_closes();
    let tokio = TOKIO_SOCKETS.get().map_or(&[][..], Vec::as_slice);
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter(|e| {
            let link = e
                .as_ref()
                .ok()
                .and_then(|e| std::fs::read_link(e.path()).ok());
            link.is_none_or(|link| !tokio.contains(&link))
        })
        .count()
}

/// The fds open now, by number, and what each points at (`/proc/self/fd`), tokio's own
/// sockets left out, once the closer has closed what it was handed.
pub struct FdSnapshot(std::collections::BTreeMap<String, std::path::PathBuf>);

/// [`FdSnapshot`] of now.
pub fn fd_snapshot() -> FdSnapshot {
    no_stray_fd_from_malloc();
    typed_ipc::wait_for_closes();
    let tokio = TOKIO_SOCKETS.get().map_or(&[][..], Vec::as_slice);
    // The listing's own handle on the directory is not one of the test's.
    let listing = std::path::PathBuf::from(format!("/proc/{}/fd", std::process::id()));
    let fds = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let number = e.file_name().to_string_lossy().into_owned();
            Some((number, target))
                .filter(|(_, target)| !tokio.contains(target) && *target != listing)
        })
        .collect();
    FdSnapshot(fds)
}

impl FdSnapshot {
    /// Asserts that no fd is open now that was not open when this snapshot was taken: the
    /// test leaked none. Not a count: an fd of an earlier test's teardown (its thread's
    /// last moments run after it has let go of [`fd_count_lock`]) may be open in the
    /// snapshot and closed since, which is no leak of this test's.
    pub fn assert_nothing_new(&self) {
        let now = fd_snapshot();
        let new: Vec<_> = (now.0.iter())
            .filter(|(fd, target)| self.0.get(*fd) != Some(*target))
            .collect();
        assert!(
            new.is_empty(),
            "fds left open: {new:?}; before: {:?}",
            self.0
        );
    }
}

/// Tests that count fds take this, so threads of other tests don't move the count.
pub fn fd_count_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    no_stray_fd_from_malloc();
    #[cfg(feature = "tokio")]
    TOKIO_SOCKETS.get_or_init(tokio_sockets);
    guard
}

/// The sockets tokio keeps for itself, as `/proc/self/fd` names them: with its `signal`
/// feature on (for examples/daemon.rs), the first runtime with an IO driver makes a stream
/// socket pair that tokio keeps for the process's life, and each runtime holds a copy of one
/// end. They are not a connection's, so the counts leave them out.
static TOKIO_SOCKETS: std::sync::OnceLock<Vec<std::path::PathBuf>> = std::sync::OnceLock::new();

/// Finds tokio's sockets: the stream sockets a first runtime leaves behind.
#[cfg(feature = "tokio")]
fn tokio_sockets() -> Vec<std::path::PathBuf> {
    let sockets = || -> Vec<std::path::PathBuf> {
        fd_links()
            .filter(|l| l.to_string_lossy().starts_with("socket:"))
            .collect()
    };
    let before = sockets();
    drop(current_thread_runtime());
    let streams = std::fs::read_to_string("/proc/net/unix").unwrap();
    // A line ends "... <type> <state> <inode>[ <path>]"; a stream socket's type is 0001.
    let is_stream = |link: &std::path::PathBuf| {
        let inode = link.to_string_lossy();
        let inode = inode.trim_start_matches("socket:[").trim_end_matches(']');
        streams.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(4) == Some(&"0001") && fields.get(6) == Some(&inode)
        })
    };
    sockets()
        .into_iter()
        .filter(|s| !before.contains(s) && is_stream(s))
        .collect()
}

fn fd_links() -> impl Iterator<Item = std::path::PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
}

/// A memfd holding `contents`.
pub fn memfd(contents: &[u8]) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create("test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let mut f = File::from(fd);
    f.write_all(contents).unwrap();
    f.into()
}

/// Everything in the file behind `fd`, read from the start.
pub fn read_all(fd: OwnedFd) -> Vec<u8> {
    let mut f = File::from(fd);
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

/// This test binary, re-run to execute only the `#[ignore]`d test `name` as a child process.
pub fn child(name: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ]);
    c.stdout(std::process::Stdio::null()); // the child's test summary is noise here
    // Children take one copy whenever they may, as `one_copy_always` makes the tests do:
    // which path a measured choice takes depends on the machine the tests run on.
    c.env("TYPED_IPC_ONE_COPY", "always");
    c
}

/// Makes this process take one copy (written into a worker, read out of it) whenever it may,
/// for tests that check that it does: a measured choice depends on the machine.
pub fn one_copy_always() {
    typed_ipc::peer_memory::set_one_copy(typed_ipc::peer_memory::OneCopy::Always);
}

/// The envelope of a call to `iface`'s method `cmd` as a hand-written (possibly hostile)
/// client writes it, with a lane word saying it reads lanes; the arguments go after it.
pub fn call_envelope(iface: &InterfaceInfo, cmd: u32, cookie: u64) -> Vec<u8> {
    let mut msg = vec![1u8, 0, 0, 0x80]; // kind Call, lane word "reads lanes"
    msg.extend_from_slice(&cmd.to_le_bytes());
    msg.extend_from_slice(&cookie.to_le_bytes());
    msg.extend_from_slice(&iface.id.to_le_bytes());
    msg.extend_from_slice(&iface.signature.to_le_bytes());
    msg
}

/// Sends the raw call `msg` (its envelope from [`call_envelope`] with `cookie`) and returns
/// the payload of the reply, checked to be the reply to it.
pub fn raw_call(socket: &Socket, msg: &[u8], fds: &[BorrowedFd<'_>], cookie: u64) -> Vec<u8> {
    socket.send(msg, fds).unwrap();
    let reply = socket.recv().unwrap();
    assert_eq!(
        &reply.payload[8..16],
        &cookie.to_le_bytes(),
        "the reply to our call"
    );
    reply.payload
}

/// Checks that `payload` is a failure reply saying the request was `size` bytes, over the
/// server's `Limits::max_message_len` (`Failure::TooLarge`: variant 7, then size, limit, and
/// the setting's number, 1), and returns the limit.
pub fn assert_too_large(payload: &[u8], size: u64) -> u64 {
    assert_eq!(payload[0], 4, "a failure reply: {payload:?}");
    let body = &payload[payload.len() - 21..];
    assert_eq!(body[..4], 7u32.to_le_bytes(), "TooLarge: {payload:?}");
    assert_eq!(body[4..12], size.to_le_bytes(), "its size: {payload:?}");
    assert_eq!(body[20], 1, "over max_message_len: {payload:?}");
    u64::from_le_bytes(body[12..20].try_into().unwrap())
}

/// One end of a socket pair whose other end played a typed-ipc of another release refusing
/// this one: it said its wire version (a bare header) and hung up. Also that version.
pub fn peer_said_another_version() -> (Socket, u8) {
    use std::os::fd::{AsFd, AsRawFd};
    use typed_ipc::wire::{Header, Kind, VERSION};
    let (ours, theirs) = Socket::pair().unwrap();
    let other = VERSION.wrapping_add(1);
    let mut header = Header {
        kind: Kind::First,
        fds: 0,
        total_len: 0,
        total_fds: 0,
    }
    .encode();
    header[2] = other;
    let raw = theirs.as_fd().as_raw_fd();
    nix::sys::socket::send(raw, &header, nix::sys::socket::MsgFlags::empty()).unwrap();
    (ours, other)
}

/// Fds of this process whose `/proc/self/fd` link starts with `prefix` (`"pipe:"`,
/// `"/memfd:typed-ipc-buffer"`).
pub fn fds_named(prefix: &str) -> u64 {
    typed_ipc::wait_for_closes(); // see `open_fds`
    let tokio = TOKIO_SOCKETS.get().map_or(&[][..], Vec::as_slice);
    fd_links()
        .filter(|target| target.to_string_lossy().starts_with(prefix) && !tokio.contains(target))
        .count() as u64
}

/// Memfds of typed-ipc's (shared regions and buffers) open in this process.
pub fn regions() -> u64 {
    fds_named("/memfd:typed-ipc-buffer")
}

/// Mappings of typed-ipc's memfds (shared regions, and peers' regions mapped) in this
/// process: what a region kept alive shows as once its fd is closed.
pub fn memfd_mappings() -> u64 {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|line| line.contains("/memfd:typed-ipc-buffer"))
        .count() as u64
}

/// What a connection holds in this process: its ipc fds and typed-ipc's memfd mappings.
pub fn connection_resources() -> (u64, u64) {
    (ipc_fds(), memfd_mappings())
}

/// Whether [`connection_resources`] are back at `before`, for a poll that has run since
/// `since`: fails the test once that is `limit` ago, the resources of a departed client's
/// connection kept.
pub fn resources_back(before: (u64, u64), since: Instant, limit: Duration) -> bool {
    let now = connection_resources();
    assert!(
        now == before || since.elapsed() < limit,
        "a departed client's connection is kept: {now:?} fds and memfd mappings, for {before:?}"
    );
    now == before
}

/// Fds of the kinds a connection or a worker holds (sockets, pipes, memfds, pidfds): what a
/// leak of theirs shows as, without files the test harness may have open for a moment.
pub fn ipc_fds() -> u64 {
    ["socket:", "pipe:", "/memfd:", "anon_inode:[pidfd]"]
        .into_iter()
        .map(fds_named)
        .sum()
}

/// A checksum that depends on every byte and its position.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().enumerate().fold(0u64, |sum, (i, &b)| {
        sum.wrapping_mul(31).wrapping_add(b as u64 ^ i as u64)
    })
}

/// Fills `buf` with bytes that differ for every `seed`.
pub fn fill(buf: &mut [u8], seed: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = ((i as u64).wrapping_mul(seed | 1) >> 3) as u8 ^ seed as u8;
    }
}

/// `len` bytes made by [`fill`] with `seed`.
pub fn filled(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; len];
    fill(&mut v, seed);
    v
}

/// The random source of a storm test: xorshift64, seeded from the clock and printed (so a
/// failing run can be read back), and how many rounds it runs: `ROUNDS` from the
/// environment, or the test's default.
pub struct Storm {
    /// Rounds to run.
    pub rounds: u64,
    x: u64,
}

impl Storm {
    /// A storm of `ROUNDS` rounds, else `default_rounds`.
    pub fn new(default_rounds: u64) -> Storm {
        let rounds = std::env::var("ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_rounds);
        let x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        eprintln!("seed {x}");
        Storm { rounds, x }
    }

    /// The next random number.
    pub fn next(&mut self) -> u64 {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        self.x
    }
}

/// A current-thread tokio runtime, as a worker's `main` would start.
#[cfg(feature = "tokio")]
pub fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A multi-thread tokio runtime with two worker threads, one per CPU of these machines.
#[cfg(feature = "tokio")]
pub fn two_worker_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A result whose encoding fails: a reply the server cannot send.
#[derive(Debug, serde::Deserialize)]
pub struct Unsendable;

impl serde::Serialize for Unsendable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom(
            "this value refuses to be encoded",
        ))
    }
}

/// The lines `child` writes to its piped stderr, each echoed to this process's stderr as it
/// comes.
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    lines_of(child.stderr.take().unwrap())
}

/// The lines read from `stderr` (a child's), each echoed to this process's stderr as it comes.
pub fn lines_of(stderr: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = std::io::BufReader::new(stderr);
    std::thread::spawn(move || {
        // The loop owns `stderr` and closes it when it ends, before `tx` goes.
        for line in stderr.lines().map_while(Result::ok) {
            eprintln!("child: {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits for a line of `lines` that contains `what`; panics if none comes within `guard`
/// (a hang guard: a test that waits this long has failed anyway) or the child's stderr ends.
pub fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    what: &str,
    guard: std::time::Duration,
) {
    loop {
        match lines.recv_timeout(guard) {
            Ok(line) if line.contains(what) => return,
            Ok(_) => continue,
            Err(e) => panic!("the child never said {what:?} ({e:?})"),
        }
    }
}

/// Lowers this process's `RLIMIT_NOFILE` so that it may open exactly `room` more fds. The
/// limit caps fd numbers, and an fd above it (one inherited, say) stays open: the limit is
/// put where `room` numbers below it are free.
pub fn leave_room_for_fds(room: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let open: Vec<usize> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut limit = room;
    while limit - open.iter().filter(|&&fd| fd < limit).count() < room {
        limit += 1;
    }
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, limit as u64, hard).unwrap();
}

/// Starts `command`, a child test that listens on the abstract name `name` (passed in
/// `TYPED_IPC_TEST_LISTENER`), prints `listening` on stderr once it does, and shuts down when
/// its stdin ends; returns it once it listens, with the rest of its stderr, line by line.
pub fn start_listener_child(
    mut command: Command,
    name: &str,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut server = command
        .env("TYPED_IPC_TEST_LISTENER", name)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut server);
    wait_for_line(&lines, "listening", std::time::Duration::from_secs(60));
    (server, lines)
}

/// Checks that a listener survives running out of fds. The child test `child_name` serves
/// on the abstract name this passes in `TYPED_IPC_TEST_LISTENER`, with room for `room` more
/// fds, and prints `listening`; it shuts down when its stdin ends. More clients than it has
/// fds for connect and hang up once it says so; then `call` must be answered on a fresh
/// connection (it panics if not), and the child must say it accepts clients again.
pub fn check_survives_running_out_of_fds(
    child_name: &str,
    room: usize,
    call: impl FnOnce(typed_ipc::Connection),
) {
    // Only guards against a hang: a test that waits this long has failed anyway.
    let guard = std::time::Duration::from_secs(60);
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-{child_name}-{}", std::process::id());
    let (mut server, lines) = start_listener_child(child(child_name), &name);
    let wait_for = |what: &str| wait_for_line(&lines, what, guard);
    // More clients than the child has fds for. All of them connect (the kernel queues those
    // the child has not accepted yet), and the child runs out of fds accepting them: until
    // they hang up, each one it accepted holds an fd.
    let clients: Vec<_> = (0..3 * room)
        .map(|_| typed_ipc::Connection::connect_abstract(&name).unwrap())
        .collect();
    wait_for("Too many open files");
    drop(clients);
    // The child accepts the queued clients as the ones gone give their fds back, then this
    // one, whose call it answers. Accept loops used to end at the first EMFILE, and every
    // later client was refused or waited for good.
    call(typed_ipc::Connection::connect_abstract(&name).unwrap());
    wait_for("accepts clients again");
    drop(server.stdin.take()); // the child's cue to shut down
    finish_listener_child(server, lines);
}

/// Waits for a child of [`start_listener_child`] to exit, which it must do successfully
/// (close its stdin first: that is its cue), and for the thread reading its stderr to close
/// its end of the pipe: that thread drops its sender once it has, so the fd is gone before
/// the caller's fd lock is released (another test counts fds next).
pub fn finish_listener_child(
    mut server: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
) {
    assert!(server.wait().unwrap().success());
    for _ in lines.iter() {}
}

/// An authorizer with a bug of its own: it panics on the first `caller_pid` call it is asked
/// about and on every `count`, and allows the rest.
pub fn panicking_authorizer()
-> impl Fn(Option<&typed_ipc::PeerCredentials>, &InterfaceInfo, u32) -> Result<(), String>
+ Send
+ Sync
+ 'static {
    let first_call = std::sync::atomic::AtomicBool::new(true);
    move |_, iface, cmd| {
        let name = iface.method(cmd).map_or("?", |m| m.name);
        let first =
            name == "caller_pid" && first_call.swap(false, std::sync::atomic::Ordering::SeqCst);
        if first || name == "count" {
            panic!("the authorizer's own bug ({name})");
        }
        Ok(())
    }
}

/// Pins the calling thread, and so the threads it starts from now on, to one of the CPUs it
/// may run on: a thread woken by another then usually runs before the waker's thread goes on,
/// which makes the races of a thread that wakes a task and then lets go of something likely.
pub fn pin_to_one_cpu() {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let allowed = sched_getaffinity(Pid::from_raw(0)).unwrap();
    let cpu = (0..CpuSet::count())
        .find(|&cpu| allowed.is_set(cpu).unwrap_or(false))
        .expect("a CPU to run on");
    let mut one = CpuSet::new();
    one.set(cpu).unwrap();
    sched_setaffinity(Pid::from_raw(0), &one).unwrap();
}

/// The stack each thread asks for in a child set up by [`with_huge_thread_stacks`]: so large
/// that [`room_for_one_more_thread`] can leave room for one more thread, not two.
const HUGE_STACK: u64 = 256 << 20;

/// Has the child `command` starts give each thread a stack of 256 MiB, for the child to
/// run out of address space for threads with [`room_for_one_more_thread`].
pub fn with_huge_thread_stacks(command: &mut Command) -> &mut Command {
    command
        .env("RUST_MIN_STACK", HUGE_STACK.to_string())
        // One arena for all threads: a thread's own would take address space of its own.
        .env("MALLOC_ARENA_MAX", "1")
}

/// In a child started [`with_huge_thread_stacks`]: limits this process's address space to
/// what it has mapped now plus room for one more thread, not two ([`lift_address_space_limit`]
/// lifts it).
pub fn room_for_one_more_thread() {
    use nix::sys::resource::{Resource, setrlimit};
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap();
    let limit = vm_kib * 1024 + HUGE_STACK + HUGE_STACK / 2;
    setrlimit(Resource::RLIMIT_AS, limit, libc::RLIM_INFINITY).unwrap();
}

/// Lifts the limit [`room_for_one_more_thread`] set.
pub fn lift_address_space_limit() {
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(
        Resource::RLIMIT_AS,
        libc::RLIM_INFINITY,
        libc::RLIM_INFINITY,
    )
    .unwrap();
}

/// In a child process: any panic, on any thread, aborts the whole process (saying so on
/// stderr), so that its parent sees it end rather than a thread of it gone quietly.
pub fn abort_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("child panicked: {info}");
        std::process::abort();
    }));
}

/// Ends the whole test process (it aborts, saying `what`) if still alive after `limit`: a
/// hang guard for a wait that has no timeout of its own. Dropping it disarms it.
#[must_use = "dropped, the guard is disarmed at once"]
pub fn abort_after(what: &'static str, limit: Duration) -> std::sync::mpsc::Sender<()> {
    let (disarm, disarmed) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = disarmed.recv_timeout(limit) {
            eprintln!("hang guard: still waiting after {limit:?} for {what}");
            std::process::abort();
        }
    });
    disarm
}

/// Yields until `cond` holds (a client's hang-up reaching a server, say); panics after a
/// minute, a hang guard: a test that waits this long has failed anyway.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < give_up, "gave up waiting until {what}");
        std::thread::yield_now();
    }
}

/// A thread of this process holding the lock of the pipe whose write end is `write`, the way
/// a hostile peer can: sleeping in a `splice` into the pipe from a socket with nothing to
/// read. Returned once it sleeps, with the socket end whose byte lets it go.
pub fn hold_pipe_lock(
    write: OwnedFd,
) -> (
    std::thread::JoinHandle<OwnedFd>,
    std::os::unix::net::UnixStream,
) {
    use std::os::fd::AsRawFd;
    let (idle, wake) = std::os::unix::net::UnixStream::pair().unwrap();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        // SAFETY: plain fds of ours; splice only moves bytes between them. It sleeps, holding
        // the pipe's lock, until a byte arrives on `idle`.
        let n = unsafe {
            libc::splice(
                idle.as_raw_fd(),
                std::ptr::null_mut(),
                write.as_raw_fd(),
                std::ptr::null_mut(),
                4096,
                0,
            )
        };
        assert_eq!(n, 1);
        write
    });
    let stat = format!("/proc/self/task/{}/stat", tid_rx.recv().unwrap());
    while !std::fs::read_to_string(&stat).unwrap().contains(") S ") {
        std::thread::yield_now(); // until the holder sleeps in `splice`, the lock held
    }
    (holder, wake)
}

/// The threads of this process in uninterruptible sleep (`D`) inside the pipe code, by the
/// kernel's word for where they wait (`wchan`); but for typed-ipc's closer threads, which
/// close a peer's fds so that no other thread waits for that (their name, cut to 15 bytes).
pub fn threads_stuck_on_a_pipe() -> Vec<String> {
    let mut stuck = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if name.trim_end() == "typed-ipc-close" {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.chars().next());
        let wchan = std::fs::read_to_string(task.path().join("wchan")).unwrap_or_default();
        if state == Some('D') && wchan.starts_with("pipe") {
            stuck.push(wchan);
        }
    }
    stuck
}

/// Waits until `caller` has finished or a thread of this process is stuck on a pipe; then
/// lets the `holder` of the pipe's lock go, so that everything goes on, and returns what
/// `caller` returned and the pipe's write end, once no thread was found stuck (the server
/// would have been, waiting for the lock).
pub fn joined_never_stuck_on_the_pipe<T>(
    caller: std::thread::JoinHandle<T>,
    (holder, wake): (
        std::thread::JoinHandle<OwnedFd>,
        std::os::unix::net::UnixStream,
    ),
) -> (T, OwnedFd) {
    let stuck = loop {
        if caller.is_finished() {
            break Vec::new();
        }
        let stuck = threads_stuck_on_a_pipe();
        if !stuck.is_empty() {
            break stuck;
        }
        std::thread::yield_now();
    };
    std::io::Write::write_all(&mut &wake, b"x").unwrap();
    let write = holder.join().unwrap();
    let returned = caller.join().unwrap();
    assert!(
        stuck.is_empty(),
        "the server waited on the peer's pipe lock ({stuck:?})"
    );
    (returned, write)
}

/// Spares the fd counts a stray fd of glibc's: once a process has more than 8 threads that
/// allocate, glibc opens `/sys/devices/system/cpu/online` for a moment to size its malloc
/// arenas (strace shows it on whichever thread comes ninth), which a test counting fds then
/// sees as one too many or too few. With the arena limit set up front it never reads it.
fn no_stray_fd_from_malloc() {
    static SET: std::sync::Once = std::sync::Once::new();
    // SAFETY: mallopt only sets a malloc parameter; M_ARENA_MAX takes any positive count.
    SET.call_once(|| unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 16);
    });
}

/// A listening socket at `addr` (a path or an abstract name) whose queue holds one client not
/// yet accepted (backlog 0): a `connect` finds it full once a client is queued, and waits.
pub fn listening_for_one(addr: &nix::sys::socket::UnixAddr) -> OwnedFd {
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, bind, listen, socket};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), addr).unwrap();
    listen(&fd, Backlog::new(0).unwrap()).unwrap();
    fd
}

/// Takes the next client of `listener`, a socket of [`listening_for_one`].
pub fn accept(listener: &OwnedFd) -> OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    let raw = nix::sys::socket::accept(listener.as_raw_fd()).unwrap();
    // SAFETY: accept returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(raw) }
}
