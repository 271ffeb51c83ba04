use typed_ipc::interface;

#[interface]
pub struct Service {
    name: String,
}

fn main() {}
