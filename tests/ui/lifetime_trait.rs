// Lifetime parameters on the trait get the message lifetimes on a method get.
use typed_ipc::interface;

#[interface]
pub trait Named<'a> {
    fn name(&self) -> String;
}

fn main() {}
