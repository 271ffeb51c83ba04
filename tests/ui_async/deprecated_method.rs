// A deprecated method's stub is deprecated too, in the async client and in the blocking
// client of an async trait: calling it warns where it is called.
#![deny(deprecated)]

use typed_ipc::tokio::AsyncConnection;
use typed_ipc::{Connection, interface};

#[interface(blocking_client)]
pub trait Old {
    #[deprecated(note = "use `answer` instead")]
    async fn legacy_answer(&self) -> u32;
    async fn answer(&self) -> u32;
}

async fn call(client: OldClient) {
    let _ = client.answer().await;
    let _ = client.legacy_answer().await;
}

fn main() {
    let (a, _b) = Connection::pair().unwrap();
    let blocking = OldBlockingClient::new(a);
    let _ = blocking.answer();
    let _ = blocking.legacy_answer();
    let (a, _b) = AsyncConnection::pair().unwrap();
    drop(call(OldClient::new(a)));
}
