//! A trait declared once, with the client of the other flavour generated from it
//! (`#[interface(async_client)]`, `#[interface(blocking_client)]`), across processes: an async
//! client of a blocking trait calls its blocking server in a worker, and a blocking client of
//! an async trait calls its async server in a worker. Each runs an fd parameter and an fd
//! return, a `Result`, oneways in order, and `with_timeout` on a call the worker holds.
//!
//! The worker is this test binary run again for one `#[ignore]`d test (`child_*`).

#![cfg(feature = "tokio")]

mod common;

use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::Duration;

use common::{child, fd_count_lock, fd_snapshot, memfd, read_all};
use typed_ipc::Error;
use typed_ipc::worker::{Exit, Worker};

/// The blocking trait: its worker serves it with `StoreServer`, the parent calls it with
/// `StoreAsyncClient`.
mod blocking_trait {
    use std::os::fd::OwnedFd;

    #[typed_ipc::interface(name = "org.example.Store", async_client)]
    pub trait Store {
        /// The length of `file`'s contents, under `key`; `Err` for an empty key.
        fn put(&self, key: String, file: OwnedFd) -> Result<u64, String>;
        /// A memfd holding `content`.
        fn open(&self, content: String) -> OwnedFd;
        #[oneway]
        fn note(&self, seq: u64);
        /// How many notes came so far, if they came in order.
        fn noted(&self) -> Option<u64>;
        /// Returns once every writer of `release` has closed it.
        fn hold(&self, release: OwnedFd);
    }
}

/// The async trait: its worker serves it with `StoreServer`, the parent calls it with
/// `StoreBlockingClient`.
mod async_trait {
    use std::os::fd::OwnedFd;

    #[typed_ipc::interface(name = "org.example.Store", blocking_client)]
    pub trait Store {
        async fn put(&self, key: String, file: OwnedFd) -> Result<u64, String>;
        async fn open(&self, content: String) -> OwnedFd;
        #[oneway]
        async fn note(&self, seq: u64);
        async fn noted(&self) -> Option<u64>;
        async fn hold(&self, release: OwnedFd);
    }
}

/// What both workers do, whichever flavour serves it.
struct Store {
    /// The next note expected, or `None` once one came out of order.
    next_note: Mutex<Option<u64>>,
}

impl Store {
    fn new() -> Store {
        Store {
            next_note: Mutex::new(Some(0)),
        }
    }

    fn put(&self, key: String, file: OwnedFd) -> Result<u64, String> {
        match key.is_empty() {
            true => Err("the key is empty".into()),
            false => Ok(read_all(file).len() as u64),
        }
    }

    fn note(&self, seq: u64) {
        let mut next = self.next_note.lock().unwrap();
        *next = next.filter(|&n| n == seq).map(|n| n + 1);
    }

    fn noted(&self) -> Option<u64> {
        *self.next_note.lock().unwrap()
    }
}

/// Reads `release` until its writers have all closed it.
fn wait_for_eof(release: OwnedFd) {
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(release), &mut rest).unwrap();
}

impl blocking_trait::Store for Store {
    fn put(&self, key: String, file: OwnedFd) -> Result<u64, String> {
        Store::put(self, key, file)
    }
    fn open(&self, content: String) -> OwnedFd {
        memfd(content.as_bytes())
    }
    fn note(&self, seq: u64) {
        Store::note(self, seq)
    }
    fn noted(&self) -> Option<u64> {
        Store::noted(self)
    }
    fn hold(&self, release: OwnedFd) {
        wait_for_eof(release)
    }
}

impl async_trait::Store for Store {
    async fn put(&self, key: String, file: OwnedFd) -> Result<u64, String> {
        Store::put(self, key, file)
    }
    async fn open(&self, content: String) -> OwnedFd {
        memfd(content.as_bytes())
    }
    async fn note(&self, seq: u64) {
        Store::note(self, seq)
    }
    async fn noted(&self) -> Option<u64> {
        Store::noted(self)
    }
    async fn hold(&self, release: OwnedFd) {
        tokio::task::spawn_blocking(move || wait_for_eof(release))
            .await
            .unwrap()
    }
}

// ---- the workers ----

#[test]
#[ignore = "run as a child process by other tests"]
fn child_blocking_store() {
    let conn = typed_ipc::worker::connection().unwrap();
    blocking_trait::StoreServer::new(Store::new())
        .serve(conn)
        .unwrap();
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_async_store() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let conn = typed_ipc::tokio::worker::connection().unwrap();
        async_trait::StoreServer::new(Store::new())
            .serve(conn)
            .await
            .unwrap();
    });
}

/// The timeout of a call the worker holds until it is released: it times out whatever its
/// length, as the worker answers only once the test closes the pipe.
const HELD: Duration = Duration::from_millis(20);

#[test]
fn the_async_client_of_a_blocking_trait_calls_its_blocking_server() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let runtime = common::two_worker_runtime();
    runtime.block_on(async {
        let (mut worker, conn) =
            typed_ipc::tokio::worker::spawn(child("child_blocking_store")).unwrap();
        let store = blocking_trait::StoreAsyncClient::new(conn.clone());

        assert_eq!(store.put("k".into(), memfd(b"12345")).await.unwrap(), Ok(5));
        assert_eq!(
            store.put(String::new(), memfd(b"1")).await.unwrap(),
            Err("the key is empty".to_string())
        );
        assert_eq!(
            read_all(store.open("from the worker".into()).await.unwrap()),
            b"from the worker"
        );
        for seq in 0..100 {
            store.note(seq).await.unwrap();
        }
        assert_eq!(store.noted().await.unwrap(), Some(100));

        let (release, hold) = nix::unistd::pipe().unwrap();
        let held = store.with_timeout(HELD).hold(release).await;
        assert!(matches!(held, Err(Error::TimedOut)), "{held:?}");
        drop(hold);
        // The worker's one thread is free again once the held call has ended; its late
        // reply is dropped, and the client calls on.
        assert_eq!(store.noted().await.unwrap(), Some(100));

        drop(store);
        conn.close();
        conn.run().await.unwrap();
        assert_eq!(
            typed_ipc::tokio::worker::wait(&mut worker).await.unwrap(),
            Exit::Code(0)
        );
    });
    drop(runtime);
    before.assert_nothing_new();
}

#[test]
fn the_blocking_client_of_an_async_trait_calls_its_async_server() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (mut worker, conn) = Worker::spawn(child("child_async_store")).unwrap();
    let store = async_trait::StoreBlockingClient::new(conn.clone());

    assert_eq!(store.put("k".into(), memfd(b"12345")).unwrap(), Ok(5));
    assert_eq!(
        store.put(String::new(), memfd(b"1")).unwrap(),
        Err("the key is empty".to_string())
    );
    assert_eq!(
        read_all(store.open("from the worker".into()).unwrap()),
        b"from the worker"
    );
    for seq in 0..100 {
        store.note(seq).unwrap();
    }
    assert_eq!(store.noted().unwrap(), Some(100));

    let (release, hold) = nix::unistd::pipe().unwrap();
    let held = store.with_timeout(HELD).hold(release);
    assert!(matches!(held, Err(Error::TimedOut)), "{held:?}");
    drop(hold);
    assert_eq!(store.noted().unwrap(), Some(100));

    drop(store);
    conn.close();
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    drop((worker, conn));
    before.assert_nothing_new();
}

#[test]
fn a_client_of_the_other_flavour_shares_the_interface_of_the_trait() {
    // The same static: the other-flavour client compares what the trait's server compares.
    assert_eq!(blocking_trait::STORE_INFO.name, "org.example.Store");
    assert_eq!(
        blocking_trait::STORE_INFO.signature,
        async_trait::STORE_INFO.signature
    );
    assert_eq!(blocking_trait::STORE_INFO.id, async_trait::STORE_INFO.id);
}
