use typed_ipc::interface;

#[interface]
pub trait Lister {
    fn list(&self) -> impl Iterator<Item = String>;
}

fn main() {}
