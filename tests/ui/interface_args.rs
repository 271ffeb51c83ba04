// What `#[interface(...)]` takes: one optional `name = "..."`, a name without spaces, and one
// optional `async_client` or `blocking_client` and one optional `async_server`, bare words.
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

#[typed_ipc::interface(async_clients)]
pub trait Misspelt {
    fn ping(&self) -> u32;
}

#[typed_ipc::interface(async_client, name = "org.example.Repeated", async_client)]
pub trait Repeated {
    fn ping(&self) -> u32;
}

#[typed_ipc::interface(blocking_client, async_client)]
pub trait Both {
    fn ping(&self) -> u32;
}

#[typed_ipc::interface(async_client = true)]
pub trait Valued {
    fn ping(&self) -> u32;
}

#[typed_ipc::interface(blocking_client("Blocking"))]
pub trait Called {
    async fn ping(&self) -> u32;
}

#[typed_ipc::interface(async_server, async_server)]
pub trait ServedTwice {
    fn ping(&self) -> u32;
}

#[typed_ipc::interface(async_server = "pooled")]
pub trait ServerValued {
    fn ping(&self) -> u32;
}

fn main() {}
