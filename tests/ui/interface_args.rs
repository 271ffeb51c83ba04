// What `#[interface(...)]` takes: one optional `name = "..."`, a name without spaces, one
// optional `async_client` or `blocking_client` and one optional `async_server`, bare words,
// and one optional `crate = "..."`, a path.
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

#[typed_ipc::interface(crate = "::my facade")]
pub trait NotAPath {
    fn ping(&self) -> u32;
}

#[typed_ipc::interface(crate = "::a", crate = "::b")]
pub trait PathTwice {
    fn ping(&self) -> u32;
}

#[typed_ipc::interface(crate = my_facade)]
pub trait PathBare {
    fn ping(&self) -> u32;
}

fn main() {}
