// `async_client` asks a trait of `fn`s for an async client as well, `blocking_client` a trait
// of `async fn`s for a blocking one, `async_server` a trait of `fn`s for an async server: each
// on the other trait is a mistake.
#[typed_ipc::interface(async_client)]
pub trait AlreadyAsync {
    async fn fetch(&self, url: String) -> Vec<u8>;
}

#[typed_ipc::interface(name = "org.example.AlreadyBlocking", blocking_client)]
pub trait AlreadyBlocking {
    fn fetch(&self, url: String) -> Vec<u8>;
}

#[typed_ipc::interface(async_server)]
pub trait AsyncFetcher {
    async fn fetch(&self, url: String) -> Vec<u8>;
}

// A trait that mixes `fn` and `async fn` is told that, and only that.
#[typed_ipc::interface(blocking_client)]
pub trait Mixed {
    async fn fetch(&self, url: String) -> Vec<u8>;
    fn cancel(&self, url: String);
}

fn main() {}
