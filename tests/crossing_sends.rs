//! Both ends of a connection send each other a message larger than the socket buffer at the
//! same moment, each from its only thread: a worker's one serving thread, in a handler,
//! sends its parent a large oneway while the parent's one thread sends the worker a large
//! call. Neither message fits in the socket, so each sender must read while it waits for
//! room, or both wait for good.
//!
//! The worker is this test binary run again for one `#[ignore]`d test (`child_talker`).

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::child;
use typed_ipc::worker::{self, Exit, Worker};

/// What the worker serves.
#[typed_ipc::interface]
pub trait Talker {
    /// Sends the caller `len` bytes of text back, as a [`Hearer::heard`] oneway from this
    /// handler: on the worker's one serving thread, which reads nothing meanwhile.
    #[oneway]
    fn talk(&self, len: u32);
    /// How long `text` is, and whether it is all `'y'`.
    fn measure(&self, text: String) -> (u64, bool);
}

/// What the parent serves, once its call is back.
#[typed_ipc::interface]
pub trait Hearer {
    #[oneway]
    fn heard(&self, text: String);
}

/// Far over a socket buffer (about 200 KiB), and sent through the socket: strings do not go
/// through shared memory, byte strings do.
const BIG: u32 = 8 << 20;

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(60);

struct Talk(HearerClient);

impl Talker for Talk {
    fn talk(&self, len: u32) {
        self.0.heard("z".repeat(len as usize)).unwrap();
    }
    fn measure(&self, text: String) -> (u64, bool) {
        (text.len() as u64, text.bytes().all(|b| b == b'y'))
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_talker() {
    let conn = worker::connection().unwrap();
    let back = HearerClient::new(conn.clone());
    TalkerServer::new(Talk(back)).serve(conn).unwrap();
}

struct Heard(mpsc::Sender<String>);

impl Hearer for Heard {
    fn heard(&self, text: String) {
        self.0.send(text).unwrap();
    }
}

#[test]
fn large_messages_crossing_each_other_both_arrive() {
    let (mut child, conn) = Worker::spawn(child("child_talker")).unwrap();
    let talker = TalkerClient::new(conn.clone()).with_timeout(HANG_GUARD);
    // The worker's serving thread runs this at once, and starts sending.
    talker.talk(BIG).unwrap();
    // Nothing serves this end yet: only this call's wait to send can read the oneway.
    let text = "y".repeat(BIG as usize);
    assert_eq!(
        talker.measure(text).unwrap(),
        (BIG as u64, true),
        "the call crossing the worker's oneway"
    );
    // The oneway the call's send read meanwhile waits here for a serving thread.
    let (heard, hearing) = mpsc::channel();
    let serving = {
        let conn = conn.clone();
        std::thread::spawn(move || conn.serve(HearerServer::new(Heard(heard))))
    };
    let text = hearing
        .recv_timeout(HANG_GUARD)
        .expect("the oneway arrives");
    assert_eq!(text.len(), BIG as usize);
    assert!(text.bytes().all(|b| b == b'z'));
    conn.close();
    serving.join().unwrap().unwrap();
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

/// The same interfaces, async flavour: the same wire.
#[cfg(feature = "tokio")]
mod asynchronous {
    #[typed_ipc::interface]
    pub trait Talker {
        #[oneway]
        async fn talk(&self, len: u32);
        async fn measure(&self, text: String) -> (u64, bool);
    }

    #[typed_ipc::interface]
    pub trait Hearer {
        #[oneway]
        async fn heard(&self, text: String);
    }
}

#[cfg(feature = "tokio")]
struct AsyncHeard(tokio::sync::mpsc::UnboundedSender<String>);

#[cfg(feature = "tokio")]
impl asynchronous::Hearer for AsyncHeard {
    async fn heard(&self, text: String) {
        self.0.send(text).unwrap();
    }
}

/// An async parent, on a runtime of one thread, crossing the same worker's oneway with its
/// call: its reader reads on while the call waits to go out.
#[cfg(feature = "tokio")]
#[test]
fn large_messages_crossing_an_async_parents_call_both_arrive() {
    use asynchronous::{HearerServer, TalkerClient};
    common::current_thread_runtime().block_on(async {
        let (mut child, conn) = typed_ipc::tokio::worker::spawn(child("child_talker")).unwrap();
        let (heard, mut hearing) = tokio::sync::mpsc::unbounded_channel();
        conn.add_service(HearerServer::new(AsyncHeard(heard)));
        let talker = TalkerClient::new(conn.clone()).with_timeout(HANG_GUARD);
        talker.talk(BIG).await.unwrap();
        let text = "y".repeat(BIG as usize);
        assert_eq!(talker.measure(text).await.unwrap(), (BIG as u64, true));
        let text = tokio::time::timeout(HANG_GUARD, hearing.recv()).await;
        let text = text.expect("the oneway arrives").unwrap();
        assert_eq!(text.len(), BIG as usize);
        assert!(text.bytes().all(|b| b == b'z'));
        conn.close();
        assert_eq!(child.wait().unwrap(), Exit::Code(0));
    });
}
