// A deprecated method's stub is deprecated too, in the client of either flavour: calling it
// warns where it is called, as calling the trait method would.
#![deny(deprecated)]

use typed_ipc::{Connection, interface};

#[interface]
pub trait Old {
    #[deprecated(note = "use `answer` instead")]
    fn legacy_answer(&self) -> u32;
    fn answer(&self) -> u32;
}

fn main() {
    let (a, _b) = Connection::pair().unwrap();
    let client = OldClient::new(a);
    let _ = client.answer();
    let _ = client.legacy_answer();
}
