use typed_ipc::interface;

// An interface is all `async fn` (the async flavour) or all `fn` (the blocking one).
#[interface]
pub trait Fetcher {
    async fn fetch(&self, url: String) -> Vec<u8>;
    fn cancel(&self, url: String);
}

fn main() {}
