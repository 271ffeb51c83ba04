use typed_ipc::interface;

#[interface]
pub trait Worker {
    fn finish(self) -> u32;
}

fn main() {}
