use typed_ipc::interface;

#[interface]
pub trait Greeter {
    fn greet(&self, name: &str) -> String;
}

fn main() {}
