use typed_ipc::interface;

#[interface]
pub trait Store {
    fn put<T: serde::Serialize>(&self, value: T);
}

fn main() {}
