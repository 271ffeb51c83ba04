use typed_ipc::interface;

// Without typed-ipc's `tokio` feature, the async server of a blocking trait is one clear
// error, at the argument that asks for it; the blocking items are still there.
#[interface(async_server)]
pub trait Fetcher {
    fn fetch(&self, url: String) -> Vec<u8>;
}

struct Imp;

impl Fetcher for Imp {
    fn fetch(&self, url: String) -> Vec<u8> {
        url.into_bytes()
    }
}

fn main() {
    let (a, _b) = typed_ipc::Connection::pair().unwrap();
    let _ = FetcherClient::new(a);
    let _ = FetcherServer::new(Imp);
}
