use typed_ipc::interface;

pub struct Handle(u32);

// A parameter type that is not serde is reported at the type, as a return type is.
#[interface]
pub trait Jobs {
    fn submit(&self, name: String, handle: Handle) -> u32;
    #[oneway]
    fn notify(&self, callback: Box<dyn Fn() + Send + Sync>);
}

fn main() {}
