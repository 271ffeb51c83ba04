use std::fs::File;
use std::os::fd::{BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use typed_ipc::interface;

// Only `OwnedFd` travels as a file descriptor; a `RawFd` would travel as a meaningless number.
#[interface]
pub trait Files {
    fn size(&self, file: File) -> u64;
    fn attach(&self, stream: UnixStream);
    fn peek(&self, fd: BorrowedFd<'static>) -> u8;
    fn close(&self, fd: RawFd);
    fn open(&self, path: String) -> std::fs::File;
}

fn main() {}
