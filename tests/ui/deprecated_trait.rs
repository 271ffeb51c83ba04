// A deprecated trait's client and server are deprecated too, with its note: naming them is
// where a program uses the interface. The generated code's own uses of them do not warn.
#![deny(deprecated)]

use typed_ipc::{Connection, interface};

#[deprecated(note = "use `Tuner2` instead")]
#[interface]
pub trait Tuner {
    fn gain(&self) -> u32;
}

pub struct Impl;

#[allow(deprecated)]
impl Tuner for Impl {
    fn gain(&self) -> u32 {
        1
    }
}

fn main() {
    let (a, b) = Connection::pair().unwrap();
    let _server = TunerServer::new(Impl).serve(b);
    let _ = TunerClient::new(a).gain();
}
