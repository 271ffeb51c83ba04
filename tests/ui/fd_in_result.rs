use std::os::fd::OwnedFd;

use typed_ipc::interface;

#[interface]
pub trait Opener {
    fn open(&self, path: String) -> Result<OwnedFd, String>;
}

fn main() {}
