use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

use typed_ipc::interface;

// A borrowed fd, fd wrapper or trait object: the owned form to write is `OwnedFd`, or a
// concrete type, not the referent as spelled.
#[interface]
pub trait Borrows {
    fn size(&self, file: &File) -> u64;
    fn stat(&self, fd: &impl AsFd) -> u64;
    fn check(&self, fd: &dyn AsFd) -> bool;
    fn lend(&self, fd: &BorrowedFd<'_>);
    fn log(&self, value: &dyn std::fmt::Debug);
    fn shared(&self) -> &File;
    fn number(&self, fd: &std::os::fd::RawFd);
}

fn main() {}
