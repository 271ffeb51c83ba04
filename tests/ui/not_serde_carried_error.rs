use std::os::fd::OwnedFd;

use serde::Serialize;
use typed_ipc::interface;

pub struct OpenError(u32);
pub struct DecodeError(u32);
pub struct BadInput(u32);
pub struct BadImage(u32);

// Serializes, but cannot be decoded: the other half of what a carried error needs.
#[derive(Serialize)]
pub struct HalfSerde(u32);

// The error of a `Result` whose `Ok` is fds or a byte string travels as a plain serde value:
// one that is not serde is reported at the type, as the error of a `Result<u32, E>` is, in
// a return type and in a parameter.
#[interface]
pub trait Convert {
    fn convert(&self, input: OwnedFd) -> Result<OwnedFd, OpenError>;
    fn decode(&self, image: Vec<u8>) -> Result<Vec<u8>, DecodeError>;
    fn check(&self, input: Result<Vec<OwnedFd>, BadInput>) -> u32;
    #[oneway]
    fn show(&self, image: Result<Vec<u8>, BadImage>);
    fn half(&self) -> Result<Option<OwnedFd>, HalfSerde>;
    fn plain_half(&self) -> Result<u32, HalfSerde>;
}

fn main() {}
