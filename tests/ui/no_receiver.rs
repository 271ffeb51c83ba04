use typed_ipc::interface;

#[interface]
pub trait Factory {
    fn create(size: u32) -> u32;
}

fn main() {}
