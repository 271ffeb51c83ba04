use std::os::fd::OwnedFd;

use typed_ipc::interface;

#[interface]
pub trait Opener {
    fn open(&self, path: String) -> (OwnedFd, u64);
}

fn main() {}
