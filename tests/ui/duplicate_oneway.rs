use typed_ipc::interface;

#[interface]
pub trait Sink {
    #[oneway]
    #[oneway]
    fn put(&self, item: u32);
}

fn main() {}
