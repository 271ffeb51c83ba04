// A method that never returns has no reply: `!` is refused at the type, with what to write.
use typed_ipc::interface;

#[interface]
pub trait Shutdown {
    fn exit(&self, code: i32) -> !;
}

fn main() {}
