use typed_ipc::interface;
use typed_ipc::tokio::AsyncConnection;

#[interface]
pub trait Blocking {
    fn ping(&self) -> u32;
}

#[interface]
pub trait Async {
    async fn ping(&self) -> u32;
}

struct Imp;

impl Blocking for Imp {
    fn ping(&self) -> u32 {
        1
    }
}

impl Async for Imp {
    async fn ping(&self) -> u32 {
        2
    }
}

// Each flavour's server on the other flavour's connection: the error says which server to use.
fn main() {
    let (a, b) = AsyncConnection::pair().unwrap();
    a.add_service(BlockingServer::new(Imp));
    let (c, _d) = typed_ipc::Connection::pair().unwrap();
    c.add_service(AsyncServer::new(Imp));
    drop(b);
}
