use std::io;
use std::os::fd::OwnedFd;

use typed_ipc::interface;

pub type Fds<T> = Vec<T>;

// `#[interface]` sees a type's tokens only: an alias of `Result` (or of another form an fd
// travels in) is not recognised, and the error says so, and what to spell out instead.
#[interface]
pub trait Opener {
    fn open(&self, path: String) -> std::io::Result<OwnedFd>;
    fn open_all(&self, paths: Vec<String>) -> io::Result<Vec<OwnedFd>>;
    fn close_all(&self, fds: Fds<OwnedFd>);
    fn wrapped(&self) -> Box<OwnedFd>;
}

fn main() {}
