//! Fds a hostile peer can send.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use nix::fcntl::{FcntlArg, OFlag, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

/// A kind of fd to attach.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FdKind {
    /// A memfd anyone may write, holding this many bytes.
    Memfd(u32),
    /// A memfd sealed like a shared region (`SHRINK | GROW | WRITE`), this long (sparse).
    Region(u64),
    /// A memfd sealed against resizing only: writable, so no region.
    HalfSealed(u32),
    PipeRead,
    PipeWrite,
    /// A pipe's read end with this many bytes in it.
    PipeWithBytes(u32),
    Socket,
    DevNull,
    Directory,
}

pub(crate) const FD_KINDS: &[FdKind] = &[
    FdKind::Memfd(0),
    FdKind::Memfd(100),
    FdKind::Region(0),
    FdKind::Region(4096),
    FdKind::Region(64 << 10),
    FdKind::Region(32 << 20),
    FdKind::Region((32 << 20) + 4096),
    FdKind::Region(1 << 31),
    FdKind::HalfSealed(4096),
    FdKind::PipeRead,
    FdKind::PipeWrite,
    FdKind::PipeWithBytes(16),
    FdKind::PipeWithBytes(8192),
    FdKind::Socket,
    FdKind::DevNull,
    FdKind::Directory,
];

fn memfd_of(len: u64, sealing: bool) -> OwnedFd {
    let flags = match sealing {
        true => MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        false => MFdFlags::MFD_CLOEXEC,
    };
    let fd = memfd_create(c"hostile", flags).unwrap();
    let mut file = File::from(fd);
    let head: Vec<u8> = (0..len.min(4096)).map(|i| i as u8).collect();
    file.write_all(&head).unwrap();
    file.set_len(len).unwrap();
    file.into()
}

pub(crate) fn make_fd(kind: FdKind) -> OwnedFd {
    match kind {
        FdKind::Memfd(len) => memfd_of(len.into(), false),
        FdKind::Region(len) => {
            let fd = memfd_of(len, true);
            let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE;
            fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).unwrap();
            fd
        }
        FdKind::HalfSealed(len) => {
            let fd = memfd_of(len.into(), true);
            let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW;
            fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).unwrap();
            fd
        }
        FdKind::PipeRead => nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap().0,
        FdKind::PipeWrite => nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap().1,
        FdKind::PipeWithBytes(n) => {
            let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
            File::from(write)
                .write_all(&vec![0xa5; n as usize])
                .unwrap();
            read
        }
        FdKind::Socket => UnixStream::pair().unwrap().0.into(),
        FdKind::DevNull => File::open("/dev/null").unwrap().into(),
        FdKind::Directory => File::open("/").unwrap().into(),
    }
}
