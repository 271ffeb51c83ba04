use typed_ipc::interface;

// The generated `SessionClient` has `new`, `with_timeout` and `connection` of its own, and
// `clone` from `Clone`.
#[interface]
pub trait Session {
    fn new(&self, name: String) -> u32;
    fn with_timeout(&self, millis: u64);
    fn connection(&self) -> String;
    fn clone(&self) -> u64;
    fn close(&self);
}

fn main() {}
