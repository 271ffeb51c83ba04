//! What a benchmarked system is, and how its server process is started.
//!
//! A [`System`] is one row family of the report. Its client half runs in the harness
//! process; its server half runs in a child started by re-executing this binary as
//! `ipc-bench --serve <system> <cpu> <arg>` (see [`Launcher`]).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::stat::{SFlag, fstat};

/// The two workloads every size is measured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Round trip: the client sends N bytes, the server echoes the same N bytes back.
    Small,
    /// One way: the client sends N bytes, the server takes them as owned bytes and
    /// replies with a few bytes (the length it received).
    Bulk,
}

impl Kind {
    /// Payload sizes measured for this workload, ascending.
    pub fn sizes(self) -> &'static [usize] {
        match self {
            Kind::Small => &[0, 64, 4 << 10],
            Kind::Bulk => &[64 << 10, 1 << 20, 16 << 20],
        }
    }

    /// The largest payload of this workload.
    pub fn largest(self) -> usize {
        self.sizes().iter().copied().max().unwrap_or(0)
    }

    /// The system whose row at the same size and pass is the 1.00x reference.
    pub fn baseline(self) -> &'static str {
        match self {
            Kind::Small => "floor",
            Kind::Bulk => "memcpy",
        }
    }
}

/// Largest payload any workload uses; servers may size their buffers from it.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// One system under test (a row family in the report).
///
/// Adding a system is one module implementing this trait plus one line in
/// `main::SYSTEMS`.
pub trait System: Sync {
    /// Row label; also the name the child is started with, so it must be unique.
    fn name(&self) -> &'static str;

    /// Workloads this system runs; each is measured at every size of [`Kind::sizes`].
    fn kinds(&self) -> &'static [Kind];

    /// Harness side: start the server (usually through `launcher`) and connect to it.
    /// The server must exit by itself once the returned client is dropped.
    fn start(&self, launcher: &mut Launcher) -> io::Result<Box<dyn Client>>;

    /// Whether this system only makes sense with the two processes on different CPUs (it
    /// is skipped in the same-CPU pass).
    fn cross_cpu_only(&self) -> bool {
        false
    }

    /// Child side: run the server until the client goes away. `arg` is what the
    /// harness side passed to [`Launcher::spawn`] (or the fd number, for
    /// [`Launcher::spawn_with_fd`]; see [`inherited_fd`]).
    fn serve(&self, arg: &str) -> io::Result<()>;
}

/// The client half of a connected system.
pub trait Client {
    /// One complete call of `kind` with a payload of `len` bytes (≤ [`MAX_PAYLOAD`]):
    /// returns once the reply is in and checked. This is what the harness times.
    fn call(&mut self, kind: Kind, len: usize) -> io::Result<()>;

    /// CPU time used so far, in nanoseconds: (the client's thread, the server process), for
    /// systems that can tell. Sampled around each measurement to give CPU time per call.
    fn cpu_ns(&mut self) -> Option<(u64, u64)> {
        None
    }
}

/// Starts server children for one system and reaps them afterwards.
pub struct Launcher {
    system: &'static str,
    cpu: usize,
    children: Vec<Child>,
}

impl Launcher {
    /// A launcher whose children run `system`'s server pinned to `cpu`.
    pub fn new(system: &'static str, cpu: usize) -> Self {
        Launcher {
            system,
            cpu,
            children: Vec::new(),
        }
    }

    /// Starts `ipc-bench --serve <system> <cpu> <arg>`.
    pub fn spawn(&mut self, arg: &str) -> io::Result<&Child> {
        let child = Command::new(std::env::current_exe()?)
            .args(["--serve", self.system, &self.cpu.to_string(), arg])
            // stdout is the report; the child keeps stderr for its errors.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        self.children.push(child);
        Ok(self.children.last().expect("pushed above"))
    }

    /// Starts the server with `fd` inherited at the same number, which is passed as
    /// `arg`. The parent's copy is closed once the child has it.
    pub fn spawn_with_fd(&mut self, fd: OwnedFd) -> io::Result<&Child> {
        // Everything else the harness opens is close-on-exec (std, nix with
        // SOCK_CLOEXEC, tokio, ipc-channel), and children are started one at a time
        // from one thread, so only this fd leaks into this child.
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
        let arg = fd.as_raw_fd().to_string();
        let result = self.spawn(&arg);
        drop(fd);
        result
    }

    /// Waits for every child to exit (they should, once their client is dropped),
    /// killing any that is still there after a few seconds.
    pub fn reap(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut failed = None;
        for mut child in self.children.drain(..) {
            let status = loop {
                if let Some(status) = child.try_wait()? {
                    break status;
                }
                if Instant::now() > deadline {
                    child.kill()?;
                    break child.wait()?;
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            if !status.success() {
                failed = Some(status);
            }
        }
        match failed {
            Some(status) => Err(io::Error::other(format!(
                "{} server exited with {status}",
                self.system
            ))),
            None => Ok(()),
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        // On an error path the client may still hold the connection open: kill
        // rather than wait, so no server outlives the harness.
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Child side of [`Launcher::spawn_with_fd`]: takes ownership of the socket whose
/// number is `arg`.
pub fn inherited_fd(arg: &str) -> io::Result<OwnedFd> {
    let raw: RawFd = arg
        .parse()
        .map_err(|_| io::Error::other(format!("bad fd argument {arg:?}")))?;
    if raw <= 2 {
        return Err(io::Error::other(format!("refusing to adopt fd {raw}")));
    }
    // SAFETY: F_GETFD only queries flags of a number; it is harmless on any value.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open (checked above), it is not stdio, and the parent put
    // its number on our command line to hand it to us; nothing else in this
    // process knows it, so this is its only owner.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let kind = SFlag::from_bits_truncate(fstat(&fd)?.st_mode) & SFlag::S_IFMT;
    if kind != SFlag::S_IFSOCK {
        return Err(io::Error::other(format!("fd {raw} is not a socket")));
    }
    Ok(fd)
}
