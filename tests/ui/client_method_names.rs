use typed_ipc::interface;

// The generated `SessionClient` has `new`, `with_timeout` and `connection` of its own,
// `clone` and `clone_from` from `Clone`, and `to_owned` and `clone_into` from `ToOwned`.
#[interface]
pub trait Session {
    fn new(&self, name: String) -> u32;
    fn with_timeout(&self, millis: u64);
    fn connection(&self) -> String;
    fn clone(&self) -> u64;
    fn clone_from(&self, other: u32);
    fn to_owned(&self) -> String;
    fn clone_into(&self, target: String);
    fn close(&self);
}

fn main() {}
