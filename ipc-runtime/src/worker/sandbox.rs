//! The system calls a worker makes once it has taken its connection, as data: what a seccomp
//! filter installed right after [`connection`](super::connection) returns must allow.
//!
//! [`SYSCALLS`] lists them for the architecture being compiled (x86_64 or aarch64, whose
//! numberings and names differ: aarch64 has no `poll` or `epoll_wait`), each with the
//! [`Need`] it answers, so that a worker allows only what it uses. docs/guide/sandboxing.md
//! says what fails, and how, when each is refused. Your own code's calls (reading the
//! files it is given, say) come on top. typed-ipc builds no filter itself: any seccomp
//! library, or a short BPF program over `libc`, takes the numbers.
//!
//! ```
//! # extern crate ipc_runtime as typed_ipc;
//! use typed_ipc::worker::sandbox::{Need, SYSCALLS};
//!
//! // A blocking worker with `Server::threads(4)` that never lends its pages (nor runs tokio,
//! // nor traces); it allows what a crash needs, so that its host sees an abort as `SIGABRT`.
//! let allowed: Vec<libc::c_long> = SYSCALLS
//!     .iter()
//!     .filter(|call| matches!(call.need, Need::Always | Need::Threads | Need::Crash))
//!     .map(|call| call.number)
//!     .collect();
//! assert!(allowed.contains(&libc::SYS_recvmsg));
//! assert!(!allowed.contains(&libc::SYS_vmsplice));
//! ```

/// What a worker needs a system call for: which calls it may leave out of its filter depends
/// on what it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Need {
    /// Serving at all: messages, waiting on the socket, received fds and shared memory,
    /// the allocator, locks, the clock, stderr, the exit.
    Always,
    /// Threads: [`Server::threads`](crate::Server::threads)'s, and the closer thread, started
    /// the first time the worker drops fds nothing claimed (a call of an interface it does not
    /// serve, fds a value did not take). Refused with an errno, the closer closes on the
    /// serving thread and `threads(n > 1)` fails; refused with a kill, such fds kill the
    /// worker, and so does a thread started before the filter when it ends (std's threads
    /// call `sigaltstack` and `rt_sigprocmask` then). Also a value that nests past 8 KiB of
    /// stack, decoded on a thread other than the main one: that thread finds the end of its
    /// stack once (glibc's `pthread_getattr_np` calls `sched_getaffinity`). Refused with an
    /// errno, the decode is bounded by its 256 KiB alone; with a kill, such a value kills the
    /// worker.
    Threads,
    /// Pipes, only between ends that both
    /// [`lend_pages_to_peer`](crate::Connection::lend_pages_to_peer) (never towards an
    /// untrusted worker).
    Pipes,
    /// The async flavour: tokio's I/O driver.
    Async,
    /// `TYPED_IPC_DEBUG`'s lines. Refused with an errno, they go out with `write` instead;
    /// refused with a kill, a worker run with `TYPED_IPC_DEBUG=1` dies at its first line.
    DebugTrace,
    /// A crash read as what it is: `abort` (a panic under `panic = "abort"` too) signals the
    /// process with `tgkill` (allow it to this process's own pid only), and std's handler of
    /// a segmentation fault puts the default action back with `rt_sigaction`. Refused, the
    /// worker dies of `SIGSYS` instead of `SIGABRT` or `SIGSEGV`.
    Crash,
}

/// One system call a worker makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Syscall {
    /// Its name, as `strace` and the kernel's tables spell it.
    pub name: &'static str,
    /// Its number on the architecture being compiled (`libc::SYS_<name>`).
    pub number: libc::c_long,
    /// What the worker needs it for.
    pub need: Need,
}

/// `Syscall { name: "recvmsg", number: libc::SYS_recvmsg, need: Need::Always }` from
/// `SYS_recvmsg: Always`: the name and the number come from one identifier, so they cannot
/// disagree.
macro_rules! calls {
    ($($(#[$cfg:meta])* $sys:ident: $need:ident,)*) => {
        &[$($(#[$cfg])* Syscall {
            name: unprefixed(stringify!($sys)),
            number: libc::$sys,
            need: Need::$need,
        },)*]
    };
}

/// `recvmsg` for `SYS_recvmsg`.
const fn unprefixed(sys: &'static str) -> &'static str {
    let (_, name) = sys.as_bytes().split_at(4);
    match core::str::from_utf8(name) {
        Ok(name) => name,
        Err(_) => panic!("a libc::SYS_ name is ASCII"),
    }
}

/// The system calls a worker makes once it has taken its connection, on this architecture,
/// in the order of the table in docs/guide/sandboxing.md. Each name appears once.
pub const SYSCALLS: &[Syscall] = calls! {
    // Messages: `send` without fds, `sendmsg` with fds or several datagrams; `recvfrom`
    // peeks at a hang-up.
    SYS_recvmsg: Always,
    SYS_sendto: Always,
    SYS_sendmsg: Always,
    SYS_recvfrom: Always,
    // Waiting for room for a large reply; ending a connection that cannot go on; a sender
    // waiting while another thread reads.
    #[cfg(target_arch = "x86_64")]
    SYS_poll: Always,
    #[cfg(target_arch = "aarch64")]
    SYS_ppoll: Always,
    SYS_shutdown: Always,
    SYS_eventfd2: Always,
    // Fds received and dropped; a region's or buffer's seals, `try_clone`.
    SYS_close: Always,
    SYS_fcntl: Always,
    // A received memfd's size, and that it is not on hugetlbfs.
    SYS_fstat: Always,
    SYS_newfstatat: Always,
    SYS_fstatfs: Always,
    // The allocator; mapping regions and buffers.
    SYS_mmap: Always,
    SYS_munmap: Always,
    SYS_mprotect: Always,
    SYS_madvise: Always,
    SYS_mremap: Always,
    SYS_brk: Always,
    // The worker's own shared region.
    SYS_memfd_create: Always,
    SYS_ftruncate: Always,
    // Locks; starting and ending threads.
    SYS_futex: Always,
    SYS_clone3: Threads,
    SYS_clone: Threads,
    SYS_rseq: Threads,
    SYS_set_robust_list: Threads,
    SYS_rt_sigprocmask: Threads,
    SYS_sigaltstack: Threads,
    SYS_prctl: Threads,
    SYS_sched_getaffinity: Threads,
    // Ends any thread, one started before the filter too; refused, glibc retries for good.
    SYS_exit: Always,
    // Bookkeeping, the clock where the vDSO cannot serve it, the exit, stderr.
    SYS_getpid: Always,
    SYS_gettid: Always,
    SYS_clock_gettime: Always,
    SYS_sched_yield: Always,
    SYS_rt_sigreturn: Always,
    SYS_restart_syscall: Always,
    SYS_exit_group: Always,
    SYS_write: Always,
    SYS_pwritev2: DebugTrace,
    // Pipes (`FIONREAD`); the pipe of a worker that lends its own pages.
    SYS_ioctl: Pipes,
    SYS_vmsplice: Pipes,
    SYS_pipe2: Pipes,
    // tokio's I/O driver.
    #[cfg(target_arch = "x86_64")]
    SYS_epoll_wait: Async,
    SYS_epoll_pwait: Async,
    SYS_epoll_ctl: Async,
    // A crash's signal.
    SYS_tgkill: Crash,
    SYS_rt_sigaction: Crash,
};
