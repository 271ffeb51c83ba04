//! Helpers shared by the runtime's integration tests.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::process::Command;

/// Open fds of this process.
pub fn open_fds() -> usize {
    no_stray_fd_from_malloc();
    // Once the fds typed-ipc dropped on its own are closed (on its closer's threads).
    ipc_runtime::wait_for_closes();
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Taken by every test of a binary whose tests count fds, so that threads of other tests don't
/// move the count.
pub fn fd_count_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    no_stray_fd_from_malloc();
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    c
}

/// A payload whose bytes depend on their position, so misplaced bytes are caught.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect()
}

/// A memfd on hugetlbfs (`MFD_HUGETLB`) of one huge page, never written, with `seals` added,
/// as a hostile sender could make one. Needs no huge pages: none is allocated until a read.
pub fn hugetlb_memfd_with(seals: nix::fcntl::SealFlag) -> OwnedFd {
    use nix::sys::memfd::MFdFlags;
    let flags = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING | MFdFlags::MFD_HUGETLB;
    let fd = nix::sys::memfd::memfd_create(c"hostile", flags).unwrap();
    let page = nix::sys::statfs::fstatfs(&fd)
        .unwrap()
        .optimal_transfer_size();
    nix::unistd::ftruncate(&fd, page).unwrap();
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_ADD_SEALS(seals)).unwrap();
    fd
}

/// A memfd holding `content`, with `seals` added (none if empty), as a hostile sender could
/// make one.
pub fn memfd_with(content: &[u8], sealing: bool, seals: nix::fcntl::SealFlag) -> OwnedFd {
    let flags = if sealing {
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING
    } else {
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC
    };
    let fd = nix::sys::memfd::memfd_create(c"hostile", flags).unwrap();
    File::from(fd.try_clone().unwrap())
        .write_all(content)
        .unwrap();
    if !seals.is_empty() {
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_ADD_SEALS(seals)).unwrap();
    }
    fd
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

/// A classic-BPF statement, for a seccomp filter ([`install_seccomp`]).
pub fn bpf_stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

/// A classic-BPF jump: `jt` statements ahead if the accumulator equals `k`, else `jf`.
pub fn bpf_jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// Installs `program` as a seccomp filter on this thread and the threads it starts (with
/// `no_new_privs`, which an unprivileged filter needs): a child process's sandbox.
pub fn install_seccomp(program: &mut [libc::sock_filter]) {
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        0
    );
    // SAFETY: `fprog` points at `program`, alive for the call, which the kernel copies.
    let installed = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
        )
    };
    assert_eq!(installed, 0, "{}", std::io::Error::last_os_error());
}

/// A pipe whose write end the test sends (as many copies as it likes) and then drops: once
/// every copy the receiver got is closed too, the read end sees EOF.
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    nix::fcntl::fcntl(
        &read_end,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    (read_end, write_end)
}

/// Whether every copy of the pipe's write end is closed (EOF, where an open one would leave
/// the empty pipe waiting: `EAGAIN`).
pub fn all_closed(read_end: &OwnedFd) -> bool {
    // Once the fds the transport dropped are closed (on typed-ipc's closer threads).
    ipc_runtime::wait_for_closes();
    match nix::unistd::read(read_end, &mut [0u8; 1]) {
        Ok(0) => true,
        Err(nix::errno::Errno::EAGAIN) => false,
        other => panic!("a pipe read the test did not expect: {other:?}"),
    }
}
