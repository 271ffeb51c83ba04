use typed_ipc::interface;

#[interface]
pub trait Named {
    fn name<'a>(&'a self) -> &'a str;
}

fn main() {}
