// A deprecated trait's clients and servers of every flavour are deprecated too: those of an
// async trait, and the async ones generated for a blocking trait. The generated code's own
// uses of them do not warn.
#![deny(deprecated)]

use typed_ipc::tokio::AsyncConnection;
use typed_ipc::{Connection, interface};

#[deprecated(note = "use `Tuner2` instead")]
#[interface(blocking_client)]
pub trait Tuner {
    async fn gain(&self) -> u32;
}

#[deprecated(note = "use `Meter2` instead")]
#[interface(async_client, async_server)]
pub trait Meter {
    fn level(&self) -> u32;
}

fn main() {
    let (a, _b) = AsyncConnection::pair().unwrap();
    let _ = TunerClient::new(a);
    let (a, _b) = Connection::pair().unwrap();
    let _ = TunerBlockingClient::new(a);
    let _ = std::mem::size_of::<TunerServer<()>>();
    let (a, _b) = AsyncConnection::pair().unwrap();
    let _ = MeterAsyncClient::new(a);
    let _ = std::mem::size_of::<MeterAsyncServer<()>>();
}
