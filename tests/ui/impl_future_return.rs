// A method returning a future, as rustdoc shows the async flavour's trait, is declared
// `async fn`: the error says so rather than asking for a concrete type.
use std::future::Future;

#[typed_ipc::interface]
pub trait Fetcher {
    fn fetch(&self, url: String) -> impl Future<Output = Vec<u8>> + Send;
    fn head(&self, url: String) -> impl Future<Output = ()>;
}

fn main() {}
