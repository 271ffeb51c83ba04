use typed_ipc::interface;

#[interface]
pub trait Fetcher {
    async fn fetch(&self, url: String) -> Vec<u8>;
}

fn main() {}
