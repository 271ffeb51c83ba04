use std::borrow::Cow;

use typed_ipc::interface;

#[interface]
pub trait Greeter {
    fn greet(&self, name: &str) -> String;
    // A `Cow` whose lifetime is elided borrows too.
    fn shout(&self, name: Cow<str>) -> String;
}

fn main() {}
