use typed_ipc::interface;

#[interface]
pub trait Counter {
    fn increment(&mut self) -> u64;
}

fn main() {}
