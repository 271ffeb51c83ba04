use typed_ipc::interface;

// Without typed-ipc's `tokio` feature, an async interface is one clear error.
#[interface]
pub trait Fetcher {
    async fn fetch(&self, url: String) -> Vec<u8>;
}

struct Imp;

impl Fetcher for Imp {
    async fn fetch(&self, url: String) -> Vec<u8> {
        url.into_bytes()
    }
}

fn main() {}
