//! A camera-style host and its image-processing worker, confined as docs/guide/sandboxing.md
//! says, written from the README, the guide and rustdoc alone: frames go to the worker as
//! `SealedBuffer`s and bare memfds, results come back, the worker reports stats through a
//! `#[oneway]` callback, the host restarts it after each kind of crash (a panic, an abort, a
//! `SIGSEGV`, a hang caught by a timeout), and the worker tries, from inside, what its sandbox
//! must refuse.
//!
//! typed-ipc builds no filter: the guide tells a worker to install a seccomp filter of its own
//! after `worker::connection()` returns, and `worker::sandbox` lists the calls to allow. This
//! one is a short BPF program over `libc` that allows that list (plus what this worker's own
//! code needs), refuses with an errno what the probes try, and kills the process at any other
//! call. The host adds what the guide leaves to the user: new user, network and IPC namespaces
//! (`pre_exec`), rlimits in the worker, and `worker::exit_with_parent`.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use typed_ipc::shared_buffer::{SealedBuffer, SharedBuffer};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, Error, Limits, Server};

/// What a frame came to, computed by the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameResult {
    /// [`common::checksum`] of the frame's bytes.
    pub checksum: u64,
    /// The brightest pixel.
    pub peak: u8,
}

/// How the worker should crash.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum Crash {
    /// A panic in the method: the caller gets `Error::Panicked`.
    Panic,
    /// `std::process::abort`.
    Abort,
    /// A read of a page mapped `PROT_NONE`.
    Segv,
    /// Never answers.
    Hang,
}

/// What the worker tries from inside its sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Probe {
    /// Opens a file anyone may read.
    Open(String),
    /// Connects to a Unix socket path.
    ConnectUnix(String),
    /// Connects to a TCP port on the loopback.
    ConnectTcp(u16),
    /// `fork()`.
    Fork,
    /// Starts `/bin/true`.
    Exec,
    /// `ptrace(PTRACE_ATTACH)` on the host.
    Ptrace(i32),
    /// Reads the host's memory (`process_vm_readv`).
    ReadHostMemory(i32),
    /// Writes to an fd number.
    Write(i32),
    /// Whether an fd number is open (`fcntl(F_GETFD)`).
    HasFd(i32),
}

/// The image-processing plugin.
#[typed_ipc::interface(name = "org.example.camera.SandboxedIsp")]
pub trait Isp {
    /// Processes a frame passed as a sealed buffer.
    fn process(&self, index: u32, frame: SealedBuffer) -> FrameResult;
    /// Processes a frame passed as a bare memfd of at most `max_len` bytes.
    fn process_fd(&self, index: u32, frame: OwnedFd, max_len: u64) -> Result<FrameResult, String>;
    /// Processes a frame passed as bytes (through the connection's shared region, or
    /// written straight into the worker's memory).
    fn process_bytes(&self, index: u32, frame: Vec<u8>) -> FrameResult;
    /// Crashes as told.
    fn crash(&self, how: Crash) -> u32;
    /// Tries `what`: 0 if it worked, else the errno it failed with.
    fn probe(&self, what: Probe) -> i32;
}

/// A newer plugin's interface, which this worker does not serve.
#[typed_ipc::interface(name = "org.example.camera.SandboxedTuner")]
pub trait Tuner {
    /// Loads a tuning table.
    fn load_table(&self, table: OwnedFd) -> u32;
}

/// The host's callbacks.
#[typed_ipc::interface(name = "org.example.camera.SandboxedIspEvents")]
pub trait IspEvents {
    /// Statistics of a frame, sent while the worker processes it.
    #[oneway]
    fn frame_stats(&self, index: u32, mean: u32);
}

/// The worker's implementation.
struct Isp1 {
    events: IspEventsClient,
}

fn analyse(bytes: &[u8]) -> (FrameResult, u32) {
    let peak = bytes.iter().copied().max().unwrap_or(0);
    let sum: u64 = bytes.iter().map(|&b| b as u64).sum();
    let mean = sum.checked_div(bytes.len() as u64).unwrap_or(0) as u32;
    let checksum = common::checksum(bytes);
    (FrameResult { checksum, peak }, mean)
}

impl Isp for Isp1 {
    fn process(&self, index: u32, frame: SealedBuffer) -> FrameResult {
        let (result, mean) = analyse(&frame);
        self.events.frame_stats(index, mean).unwrap();
        result
    }

    fn process_fd(&self, index: u32, frame: OwnedFd, max_len: u64) -> Result<FrameResult, String> {
        // A bare fd is not checked by typed-ipc (transport-and-limits.md): check it is a regular
        // file no larger than expected, and read it by position.
        let stat = nix::sys::stat::fstat(&frame).map_err(|e| e.to_string())?;
        let kind = nix::sys::stat::SFlag::from_bits_truncate(stat.st_mode);
        if !kind.contains(nix::sys::stat::SFlag::S_IFREG) || stat.st_size as u64 > max_len {
            return Err(format!(
                "not a frame: mode {:o}, {} bytes",
                stat.st_mode, stat.st_size
            ));
        }
        let mut bytes = vec![0; stat.st_size as usize];
        std::fs::File::from(frame)
            .read_exact_at(&mut bytes, 0)
            .map_err(|e| e.to_string())?;
        let (result, mean) = analyse(&bytes);
        self.events.frame_stats(index, mean).unwrap();
        Ok(result)
    }

    fn process_bytes(&self, index: u32, frame: Vec<u8>) -> FrameResult {
        let (result, mean) = analyse(&frame);
        self.events.frame_stats(index, mean).unwrap();
        result
    }

    fn crash(&self, how: Crash) -> u32 {
        match how {
            Crash::Panic => panic!("the plugin choked on a frame"),
            Crash::Abort => std::process::abort(),
            Crash::Segv => {
                let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
                    .unwrap()
                    .unwrap() as usize;
                // SAFETY: a fresh anonymous mapping of no memory of Rust's.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        page,
                        libc::PROT_NONE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED);
                // SAFETY: the read faults (PROT_NONE), which is the point: the kernel kills
                // the process with SIGSEGV before any value is produced.
                unsafe { std::ptr::read_volatile(p as *const u8) as u32 }
            }
            Crash::Hang => loop {
                std::thread::park();
            },
        }
    }

    fn probe(&self, what: Probe) -> i32 {
        let errno = |r: std::io::Result<()>| r.err().map_or(0, |e| e.raw_os_error().unwrap_or(-1));
        match what {
            Probe::Open(path) => errno(std::fs::File::open(path).map(drop)),
            Probe::ConnectUnix(path) => {
                errno(std::os::unix::net::UnixStream::connect(path).map(drop))
            }
            Probe::ConnectTcp(port) => {
                errno(std::net::TcpStream::connect(("127.0.0.1", port)).map(drop))
            }
            // SAFETY: a child that starts runs only `_exit`, async-signal-safe.
            Probe::Fork => match unsafe { libc::fork() } {
                -1 => std::io::Error::last_os_error().raw_os_error().unwrap(),
                0 => {
                    // SAFETY: ends the forked child at once.
                    unsafe { libc::_exit(0) }
                }
                _ => 0,
            },
            Probe::Exec => errno(std::process::Command::new("/bin/true").status().map(drop)),
            Probe::Ptrace(pid) => {
                // SAFETY: PTRACE_ATTACH takes no pointers.
                let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0usize, 0usize) };
                if r == -1 {
                    std::io::Error::last_os_error().raw_os_error().unwrap()
                } else {
                    0
                }
            }
            Probe::ReadHostMemory(pid) => {
                let mut buf = [0u8; 8];
                let local = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: 8,
                };
                // Some address of the host's: a mapped one would do, none is needed for
                // the refusal.
                let remote = libc::iovec {
                    iov_base: 0x10000 as *mut _,
                    iov_len: 8,
                };
                // SAFETY: `local` points at `buf`, which lives across the call.
                let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
                if r == -1 {
                    std::io::Error::last_os_error().raw_os_error().unwrap()
                } else {
                    0
                }
            }
            Probe::Write(fd) => {
                // SAFETY: a write of a local buffer; `fd` is a number, owned by nobody here
                // if it is open at all.
                let r = unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
                if r == -1 {
                    std::io::Error::last_os_error().raw_os_error().unwrap()
                } else {
                    0
                }
            }
            Probe::HasFd(fd) => {
                // SAFETY: F_GETFD only reads the fd's flags.
                let r = unsafe { libc::fcntl(fd, libc::F_GETFD) };
                if r == -1 {
                    std::io::Error::last_os_error().raw_os_error().unwrap()
                } else {
                    0
                }
            }
        }
    }
}

/// The worker's sandbox: rlimits, `PR_SET_NO_NEW_PRIVS`, a seccomp filter.
mod sandbox {
    /// One BPF instruction.
    fn ins(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        }
    }
    const LD_W_ABS: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    const JEQ: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    const JSET: u32 = libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K;
    const RET: u32 = libc::BPF_RET | libc::BPF_K;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    /// `seccomp_data`: `nr` at 0, `arch` at 4, `args[0]`'s low half at 16 (little-endian).
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARG0: u32 = 16;

    fn errno(e: i32) -> u32 {
        libc::SECCOMP_RET_ERRNO | e as u32
    }

    /// The calls typed-ipc lists (the guide's table) for a blocking worker that runs threads
    /// and reports its crashes, less those decided below: `write` (stderr only), `clone`
    /// (threads only), `clone3` (`ENOSYS`) and `tgkill` (this process only).
    fn listed() -> Vec<libc::c_long> {
        use typed_ipc::worker::sandbox::{Need, SYSCALLS};
        SYSCALLS
            .iter()
            .filter(|call| {
                use Need::*;
                matches!(call.need, Always | Threads | DebugTrace | Crash)
            })
            .filter(|call| !["write", "clone", "clone3", "tgkill"].contains(&call.name))
            .map(|call| call.number)
            .collect()
    }

    /// What this worker's own code needs on top: reading a memfd by position.
    const OWN_CODE: &[libc::c_long] = &[libc::SYS_pread64];

    /// Refused with `EPERM`, so that the probes can tell; anything else outside the lists
    /// kills the process.
    const REFUSED: &[libc::c_long] = &[
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_execve,
        libc::SYS_execveat,
        // A panic's backtrace (`RUST_BACKTRACE`, inherited from the host's environment)
        // reads these: refused, it prints without file names; killed, a panic that the
        // host would see as `Panicked` kills the worker instead.
        libc::SYS_getcwd,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_statx,
        libc::SYS_stat,
        libc::SYS_lstat,
    ];

    fn program() -> Vec<libc::sock_filter> {
        let pid = std::process::id();
        let mut p = vec![
            ins(LD_W_ABS, ARCH, 0, 0),
            ins(JEQ, AUDIT_ARCH_X86_64, 1, 0),
            ins(RET, libc::SECCOMP_RET_KILL_PROCESS, 0, 0),
            ins(LD_W_ABS, NR, 0, 0),
        ];
        let mut each = |list: &[libc::c_long], action: u32| {
            for &nr in list {
                p.push(ins(JEQ, nr as u32, 0, 1));
                p.push(ins(RET, action, 0, 0));
            }
        };
        // Refusals some tests ask for, first: the first rule that matches decides.
        if std::env::var_os(super::REFUSE_PWRITEV2).is_some() {
            each(&[libc::SYS_pwritev2], errno(libc::EPERM));
        }
        if std::env::var_os(super::REFUSE_THREADS).is_some() {
            each(&[libc::SYS_clone3, libc::SYS_clone], errno(libc::EPERM));
        }
        each(&listed(), libc::SECCOMP_RET_ALLOW);
        each(OWN_CODE, libc::SECCOMP_RET_ALLOW);
        each(REFUSED, errno(libc::EPERM));
        // glibc falls back from clone3 to clone only on ENOSYS (the guide), and clone's flags
        // can be checked where clone3's, behind a pointer, cannot.
        each(&[libc::SYS_clone3], errno(libc::ENOSYS));
        // Each test below loads `args[0]` and so returns on both paths: the accumulator no
        // longer holds the number after it.
        let mut by_arg0 = |nr: libc::c_long, test: u32, value: u32| {
            p.push(ins(JEQ, nr as u32, 0, 4));
            p.push(ins(LD_W_ABS, ARG0, 0, 0));
            p.push(ins(test, value, 0, 1));
            p.push(ins(RET, libc::SECCOMP_RET_ALLOW, 0, 0));
            p.push(ins(RET, errno(libc::EPERM), 0, 0));
        };
        // Threads (the closer, `Server::threads`), never a new process.
        by_arg0(libc::SYS_clone, JSET, libc::CLONE_THREAD as u32);
        // stderr only.
        by_arg0(libc::SYS_write, JEQ, 2);
        // abort(): a signal to this process only.
        by_arg0(libc::SYS_tgkill, JEQ, pid);
        p.push(ins(RET, libc::SECCOMP_RET_KILL_PROCESS, 0, 0));
        p
    }

    /// Locks this process in. Call right after `worker::connection()`.
    pub fn confine() {
        use nix::sys::resource::{Resource, setrlimit};
        setrlimit(Resource::RLIMIT_CORE, 0, 0).unwrap(); // crashes leave no core
        // Not RLIMIT_FSIZE: it bounds the memfds of typed-ipc's shared region too, and writes
        // to a stderr that is a file (SIGXFSZ kills the worker at either).
        setrlimit(Resource::RLIMIT_NOFILE, 64, 64).unwrap();
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        assert_eq!(
            r,
            0,
            "PR_SET_NO_NEW_PRIVS: {}",
            std::io::Error::last_os_error()
        );
        let filter = program();
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut _,
        };
        // SAFETY: `prog` points at `filter`, alive across the call, which copies it.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_TSYNC,
                &prog as *const libc::sock_fprog,
            )
        };
        assert_eq!(r, 0, "seccomp: {}", std::io::Error::last_os_error());
    }
}

/// The worker: takes its connection, locks itself in, serves until the host hangs up.
#[test]
#[ignore = "the worker process of the tests below"]
fn sandboxed_isp_worker() {
    let connection = worker::connection().unwrap();
    sandbox::confine();
    let events = IspEventsClient::new(connection.clone());
    let served = Server::new()
        .service(IspServer::new(Isp1 { events }))
        .threads(2) // started by `serve`, so under the filter
        .serve(&connection);
    drop(connection);
    if let Err(e) = &served {
        eprintln!("serve: {e}");
    }
    // libtest would print its summary to stdout next, a write the filter refuses.
    std::process::exit(if served.is_ok() { 0 } else { 3 });
}

/// Set in a worker's environment, its filter refuses new threads too.
const REFUSE_THREADS: &str = "ISP_REFUSE_THREADS";

/// Set in a worker's environment, its filter refuses `pwritev2` with `EPERM`, as a filter
/// whose default is an errno refuses a call it does not list.
const REFUSE_PWRITEV2: &str = "ISP_REFUSE_PWRITEV2";

/// Stats the host received: (frame, mean).
type Stats = mpsc::Receiver<(u32, u32)>;

struct HostEvents(mpsc::Sender<(u32, u32)>);

impl IspEvents for HostEvents {
    fn frame_stats(&self, index: u32, mean: u32) {
        let _ = self.0.send((index, mean));
    }
}

/// A running worker, as the camera host keeps it.
struct Plugin {
    worker: Worker,
    connection: Connection,
    isp: IspClient,
    events: std::thread::JoinHandle<typed_ipc::Result<()>>,
    stats: Stats,
}

/// The limits the host holds an untrusted worker to: small answers, no fds back, large frames
/// out (transport-and-limits.md: `max_send_len`, `max_send_fds`, `max_fds: 0`).
fn host_limits() -> Limits {
    #[allow(clippy::needless_update)]
    Limits {
        max_message_len: 64 << 10,
        max_fds: 0,
        max_shared_len: 16 << 20,
        max_send_len: Some(8 << 20),
        max_send_fds: Some(4),
        ..Limits::default()
    }
}

impl Plugin {
    fn start() -> Plugin {
        Plugin::start_with(|_| {})
    }

    /// [`Plugin::start`], with `adjust` applied to the worker's command first.
    fn start_with(adjust: impl FnOnce(&mut std::process::Command)) -> Plugin {
        let mut command = common::child("sandboxed_isp_worker");
        adjust(&mut command);
        worker::exit_with_parent(&mut command);
        // SAFETY: unshare is a system call, safe between fork and exec.
        unsafe {
            command.pre_exec(|| {
                let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::CLONE_NEWIPC;
                if libc::unshare(flags) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (worker, connection) = Worker::spawn_with_limits(command, host_limits()).unwrap();
        let (tx, stats) = mpsc::channel();
        let serving = connection.clone();
        let events =
            std::thread::spawn(move || serving.serve(IspEventsServer::new(HostEvents(tx))));
        // Generous: the first call waits for the worker's start-up too (Worker::spawn).
        let isp = IspClient::new(connection.clone()).with_timeout(Duration::from_secs(30));
        Plugin {
            worker,
            connection,
            isp,
            events,
            stats,
        }
    }

    /// Hangs up and waits for the worker to end: how it ended. `kill` first for one that
    /// will not end by itself.
    fn stop(mut self, kill: bool) -> Exit {
        self.connection.close();
        if kill {
            self.worker.kill().unwrap();
        }
        let exit = self.worker.wait().unwrap();
        self.events.join().unwrap().unwrap();
        exit
    }

    /// A stat of frame `index`, as the worker's oneway reported it.
    fn stat_of(&self, index: u32) -> u32 {
        loop {
            // A hang guard, not a synchronisation: the stat is already on its way.
            let (i, mean) = self.stats.recv_timeout(Duration::from_secs(30)).unwrap();
            if i == index {
                return mean;
            }
        }
    }
}

/// A frame of `len` bytes for `seed`, as a sealed buffer filled in place.
fn sealed_frame(len: usize, seed: u64) -> SealedBuffer {
    let mut buffer = SharedBuffer::new(len).unwrap();
    common::fill(&mut buffer, seed);
    buffer.seal().unwrap()
}

fn expected(bytes: &[u8]) -> (FrameResult, u32) {
    analyse(bytes)
}

#[test]
fn frames_go_through_the_sandboxed_worker_and_it_is_restarted_after_each_crash() {
    let _lock = common::fd_count_lock();
    let before = common::fd_snapshot();
    // 512 KiB strings are then written into the worker whatever this machine measures.
    common::one_copy_always();
    let mut plugin = Plugin::start();
    let mut frame_index = 0;
    let mut check_frames = |plugin: &Plugin| {
        // Inline, through the shared region, written into the worker, shared region again.
        for len in [512usize, 4096, 512 << 10, 6 << 20] {
            frame_index += 1;
            let frame = sealed_frame(len, frame_index as u64);
            let (want, mean) = expected(&frame);
            assert_eq!(
                plugin
                    .isp
                    .process(frame_index, frame.try_clone().unwrap())
                    .unwrap(),
                want
            );
            assert_eq!(plugin.stat_of(frame_index), mean);
            frame_index += 1;
            let fd = common::memfd(&frame);
            let got = plugin.isp.process_fd(frame_index, fd, len as u64).unwrap();
            assert_eq!(got, Ok(want.clone()));
            assert_eq!(plugin.stat_of(frame_index), mean);
            frame_index += 1;
            let got = plugin
                .isp
                .process_bytes(frame_index, frame.to_vec())
                .unwrap();
            assert_eq!(got, want);
            assert_eq!(plugin.stat_of(frame_index), mean);
        }
    };
    check_frames(&plugin);

    // A panic is reported and the worker serves on; its state may be half-changed, so the
    // host restarts it (calling-and-errors.md): it ends cleanly once hung up on.
    match plugin.isp.crash(Crash::Panic) {
        Err(Error::Panicked(why)) => assert!(why.contains("choked"), "{why}"),
        other => panic!("a panic: {other:?}"),
    }
    check_frames(&plugin);
    assert_eq!(plugin.stop(false), Exit::Code(0));

    for (how, signal) in [(Crash::Abort, libc::SIGABRT), (Crash::Segv, libc::SIGSEGV)] {
        plugin = Plugin::start();
        check_frames(&plugin);
        match plugin.isp.crash(how) {
            Err(Error::Disconnected) => {}
            other => panic!("{how:?}: {other:?}"),
        }
        assert_eq!(plugin.stop(false), Exit::Signal(signal), "{how:?}");
    }

    plugin = Plugin::start();
    check_frames(&plugin);
    let impatient = plugin.isp.with_timeout(Duration::from_millis(500));
    match impatient.crash(Crash::Hang) {
        Err(Error::TimedOut) => {}
        other => panic!("a hang: {other:?}"),
    }
    drop(impatient);
    assert_eq!(plugin.stop(true), Exit::Signal(libc::SIGKILL));

    plugin = Plugin::start();
    check_frames(&plugin);
    assert_eq!(plugin.stop(false), Exit::Code(0));
    before.assert_nothing_new();
}

#[test]
fn the_sandbox_holds() {
    let _lock = common::fd_count_lock();
    let before = common::fd_snapshot();
    let dir = std::env::temp_dir().join(format!("image-sandbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let readable = dir.join("calibration.bin");
    std::fs::write(&readable, b"calibration").unwrap();
    let socket_path = dir.join("camera.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // An fd this process leaves inheritable by mistake: the worker must not get it.
    let leaked =
        nix::sys::memfd::memfd_create("leaked", nix::sys::memfd::MFdFlags::empty()).unwrap();

    let plugin = Plugin::start();
    // The frames still go through first: the sandbox lets serving through.
    let frame = sealed_frame(1 << 20, 7);
    assert_eq!(
        plugin.isp.process(1, frame.try_clone().unwrap()).unwrap(),
        expected(&frame).0
    );

    let host = std::process::id() as i32;
    let probes = [
        (Probe::Open(readable.to_str().unwrap().into()), libc::EPERM),
        (
            Probe::ConnectUnix(socket_path.to_str().unwrap().into()),
            libc::EPERM,
        ),
        (
            Probe::ConnectTcp(tcp.local_addr().unwrap().port()),
            libc::EPERM,
        ),
        (Probe::Fork, libc::EPERM),
        (Probe::Exec, libc::EPERM),
        (Probe::Ptrace(host), libc::EPERM),
        (Probe::ReadHostMemory(host), libc::EPERM),
        (Probe::HasFd(leaked.as_raw_fd()), libc::EBADF),
        (Probe::Write(leaked.as_raw_fd()), libc::EPERM),
        (Probe::Write(1), libc::EPERM),
    ];
    for (probe, errno) in probes {
        let got = plugin.isp.probe(probe.clone()).unwrap();
        assert_eq!(
            got,
            errno,
            "{probe:?}: {}",
            std::io::Error::from_raw_os_error(got)
        );
    }
    // Nothing reached this side's sockets.
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err());
    tcp.set_nonblocking(true).unwrap();
    assert!(tcp.accept().is_err());
    // The worker lives in namespaces of its own.
    let ns = |pid: u32, which: &str| std::fs::read_link(format!("/proc/{pid}/ns/{which}")).unwrap();
    for which in ["net", "ipc", "user"] {
        let pid = plugin.worker.id();
        assert_ne!(ns(pid, which), ns(std::process::id(), which), "{which}");
    }
    // A call of an interface the worker does not serve: its fd, claimed by nothing, is
    // closed on the closer's thread, which starts under the filter.
    let tuner = TunerClient::new(plugin.connection.clone());
    match tuner.load_table(common::memfd(b"gamma")) {
        Err(Error::NotServed(_)) => {}
        other => panic!("an interface not served: {other:?}"),
    }
    drop(tuner);
    // The worker serves on after every refusal.
    assert_eq!(
        plugin.isp.process(2, frame.try_clone().unwrap()).unwrap(),
        expected(&frame).0
    );
    assert_eq!(plugin.stop(false), Exit::Code(0));

    drop((listener, tcp, leaked, frame));
    std::fs::remove_dir_all(&dir).unwrap();
    before.assert_nothing_new();
}

#[test]
fn a_traced_worker_runs_in_the_sandbox() {
    traced_worker(false);
}

#[test]
fn a_traced_worker_whose_filter_refuses_pwritev2_still_traces() {
    traced_worker(true);
}

/// A worker run with `TYPED_IPC_DEBUG=1` traces a call, `pwritev2` refused or not.
fn traced_worker(refuse_pwritev2: bool) {
    let _lock = common::fd_count_lock();
    let before = common::fd_snapshot();
    let mut plugin = Plugin::start_with(|command| {
        if refuse_pwritev2 {
            command.env(REFUSE_PWRITEV2, "1");
        }
        command.env("TYPED_IPC_DEBUG", "1");
        command.stderr(std::process::Stdio::piped());
    });
    let stderr = plugin.worker.take_stderr().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());
    let frame = sealed_frame(4096, 3);
    let got = plugin.isp.process(1, frame.try_clone().unwrap());
    assert_eq!(got.unwrap(), expected(&frame).0);
    assert_eq!(plugin.stop(false), Exit::Code(0));
    let trace = reader.join().unwrap();
    assert!(
        trace.contains("<- Call #1 org.example.camera.SandboxedIsp::process ("),
        "{trace}"
    );
    drop(frame);
    before.assert_nothing_new();
}

#[test]
fn a_confined_worker_dies_with_the_thread_that_started_it() {
    let _lock = common::fd_count_lock();
    let before = common::fd_snapshot();
    // `exit_with_parent` ties the worker to the thread that spawned it, through the user
    // namespace it enters before exec.
    let mut plugin = std::thread::spawn(Plugin::start).join().unwrap();
    assert_eq!(plugin.worker.wait().unwrap(), Exit::Signal(libc::SIGKILL));
    assert!(matches!(
        plugin.isp.probe(Probe::Fork),
        Err(Error::Disconnected)
    ));
    assert_eq!(plugin.stop(false), Exit::Signal(libc::SIGKILL));
    before.assert_nothing_new();
}

#[test]
fn a_worker_that_cannot_start_its_serving_threads_says_why() {
    let _lock = common::fd_count_lock();
    let before = common::fd_snapshot();
    let mut plugin = Plugin::start_with(|command| {
        command.env(REFUSE_THREADS, "1");
        command.stderr(std::process::Stdio::piped());
    });
    let stderr = plugin.worker.take_stderr().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());
    let got = plugin.isp.process(1, sealed_frame(4096, 1));
    assert!(matches!(got, Err(Error::Disconnected)), "{got:?}");
    assert_eq!(plugin.stop(false), Exit::Code(3));
    // The bare OS error ("Operation not permitted") would not say what failed.
    let said = reader.join().unwrap();
    assert!(
        said.contains("serve: could not start serving thread 2 of Server::threads(2)"),
        "{said}"
    );
    before.assert_nothing_new();
}
