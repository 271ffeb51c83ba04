use typed_ipc::interface;

#[interface]
pub trait Summer {
    fn sum(&self, values: impl IntoIterator<Item = u32>) -> u32;
}

fn main() {}
