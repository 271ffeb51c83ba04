// What `#[interface(...)]` takes: one optional `name = "..."`, a name without spaces.
#[typed_ipc::interface(nme = "org.example.Typo")]
pub trait Typo {
    fn ping(&self) -> u32;
}

#[typed_ipc::interface(name = "")]
pub trait Empty {
    fn ping(&self) -> u32;
}

#[typed_ipc::interface(name = "org example Spaces")]
pub trait Spaces {
    fn ping(&self) -> u32;
}

#[typed_ipc::interface(name = "org.example.A", name = "org.example.B")]
pub trait Twice {
    fn ping(&self) -> u32;
}

#[typed_ipc::interface(name = org.example.Bare)]
pub trait Bare {
    fn ping(&self) -> u32;
}

fn main() {}
