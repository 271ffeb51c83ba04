use std::os::fd::OwnedFd;

use typed_ipc::interface;

pub struct OpenError(u32);
pub struct DecodeError(u32);
pub struct BadInput(u32);
pub struct BadImage(u32);

// As in a blocking trait: the error of a `Result` whose `Ok` is fds or a byte string is
// reported at the type when it is not serde.
#[interface]
pub trait Convert {
    async fn convert(&self, input: OwnedFd) -> Result<OwnedFd, OpenError>;
    async fn decode(&self, image: Vec<u8>) -> Result<Vec<u8>, DecodeError>;
    async fn check(&self, input: Result<Vec<OwnedFd>, BadInput>) -> u32;
    #[oneway]
    async fn show(&self, image: Result<Vec<u8>, BadImage>);
}

fn main() {}
