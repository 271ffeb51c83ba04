use typed_ipc::interface;

#[interface]
pub trait Notifier {
    #[oneway]
    fn notify(&self, event: u32) -> bool;
}

fn main() {}
