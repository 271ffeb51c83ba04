use typed_ipc::interface;

#[interface]
pub trait Named {
    fn name(&self) -> &str;
}

fn main() {}
