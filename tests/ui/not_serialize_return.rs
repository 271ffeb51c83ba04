use serde::Deserialize;
use typed_ipc::interface;

#[derive(Deserialize)]
pub struct Report(u32);

#[derive(Deserialize)]
pub struct Failure(u32);

// A return type the server cannot send is reported at the type, as a parameter type is: the
// whole type, and a `Result` whose error is not `Serialize`.
#[interface]
pub trait Jobs {
    fn report(&self) -> Report;
    fn run(&self, id: u32) -> Result<u32, Failure>;
}

fn main() {}
