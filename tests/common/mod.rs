//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// Open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Tests that count fds take this, so threads of other tests don't move the count.
pub fn fd_count_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
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
