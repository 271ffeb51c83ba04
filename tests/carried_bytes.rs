//! `Option<Vec<u8>>` and `Result<Vec<u8>, E>` parameters and results carry their bytes as one
//! byte string, as a bare `Vec<u8>` does: a large one goes through the connection's shared
//! region, not inline byte by byte. Across real processes, in both flavours.

mod common;

use std::sync::Mutex;

use common::{child, fd_count_lock, fd_snapshot, filled, regions};
use typed_ipc::interface;
use typed_ipc::worker::{self, Exit, Worker};

#[interface]
pub trait Images {
    /// `image` with every byte incremented; `Err` without one, or for an empty one.
    fn decode(&self, image: Option<Vec<u8>>) -> Result<Vec<u8>, String>;
    /// The `Ok` bytes incremented; `None` for an `Err`.
    fn recover(&self, result: std::result::Result<Vec<u8>, String>) -> Option<Vec<u8>>;
    /// Keeps the length of `image` (0 for none) for `kept`.
    #[oneway]
    fn keep(&self, image: Option<Vec<u8>>);
    /// The lengths `keep` kept, in order.
    fn kept(&self) -> Vec<u64>;
    /// How many shared regions this process holds open.
    fn regions(&self) -> u64;
}

#[derive(Default)]
struct ImagesImpl(Mutex<Vec<u64>>);

impl Images for ImagesImpl {
    fn decode(&self, image: Option<Vec<u8>>) -> Result<Vec<u8>, String> {
        match image {
            Some(image) if !image.is_empty() => Ok(bumped(&image)),
            Some(_) => Err("empty image".into()),
            None => Err("no image".into()),
        }
    }
    fn recover(&self, result: std::result::Result<Vec<u8>, String>) -> Option<Vec<u8>> {
        result.ok().map(|data| bumped(&data))
    }
    fn keep(&self, image: Option<Vec<u8>>) {
        self.0
            .lock()
            .unwrap()
            .push(image.map_or(0, |i| i.len() as u64));
    }
    fn kept(&self) -> Vec<u64> {
        self.0.lock().unwrap().clone()
    }
    fn regions(&self) -> u64 {
        regions()
    }
}

/// What `decode` returns for `data`.
fn bumped(data: &[u8]) -> Vec<u8> {
    data.iter().map(|b| b.wrapping_add(1)).collect()
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_images() {
    ImagesServer::new(ImagesImpl::default())
        .serve(worker::connection().unwrap())
        .unwrap();
}

/// Over a MiB: too large for the pipe a call's `Vec<u8>` may take, so that a byte string
/// both ways goes through the shared regions.
const LARGE: usize = (1 << 20) + 1;

/// Every `Some`, `None`, `Ok` and `Err`, both ways, with a MiB of bytes: each round trip
/// checked, then that both ends hold their own region and a view of the other's (a value that
/// went inline, byte by byte, would have made none).
fn round_trips(images: &ImagesClient) {
    for (round, len) in [LARGE, 100, LARGE].into_iter().enumerate() {
        let data = filled(len, round as u64);
        let want = bumped(&data);
        assert!(images.decode(Some(data.clone())).unwrap() == Ok(want.clone()));
        assert!(images.recover(Ok(data)).unwrap() == Some(want));
    }
    assert_eq!(images.decode(None).unwrap(), Err("no image".into()));
    assert_eq!(
        images.decode(Some(vec![])).unwrap(),
        Err("empty image".into())
    );
    assert_eq!(images.recover(Err("bad".into())).unwrap(), None);
    images.keep(Some(filled(LARGE, 9))).unwrap();
    images.keep(None).unwrap();
    assert_eq!(images.kept().unwrap(), [LARGE as u64, 0]);
}

#[test]
fn optional_and_fallible_byte_strings_cross_through_shared_regions() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (mut child, conn) = Worker::spawn(child("child_images")).unwrap();
    let images = ImagesClient::new(conn);
    round_trips(&images);
    assert_eq!(regions(), 2, "our region and a view of the worker's");
    assert_eq!(images.regions().unwrap(), 2);
    drop(images);
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
    drop(child);
    before.assert_nothing_new();
}

/// The async flavour's clients and servers carry them the same way, and talk to blocking ones.
#[cfg(feature = "tokio")]
mod async_flavour {
    use super::*;

    /// `Images` as `async fn`s: the same interface on the wire.
    mod asynchronous {
        #[typed_ipc::interface]
        pub trait Images {
            async fn decode(&self, image: Option<Vec<u8>>) -> Result<Vec<u8>, String>;
            async fn recover(
                &self,
                result: std::result::Result<Vec<u8>, String>,
            ) -> Option<Vec<u8>>;
            #[oneway]
            async fn keep(&self, image: Option<Vec<u8>>);
            async fn kept(&self) -> Vec<u64>;
            async fn regions(&self) -> u64;
        }
    }

    impl asynchronous::Images for ImagesImpl {
        async fn decode(&self, image: Option<Vec<u8>>) -> Result<Vec<u8>, String> {
            Images::decode(self, image)
        }
        async fn recover(&self, result: std::result::Result<Vec<u8>, String>) -> Option<Vec<u8>> {
            Images::recover(self, result)
        }
        async fn keep(&self, image: Option<Vec<u8>>) {
            Images::keep(self, image)
        }
        async fn kept(&self) -> Vec<u64> {
            Images::kept(self)
        }
        async fn regions(&self) -> u64 {
            regions()
        }
    }

    #[test]
    #[ignore = "run as a child process by other tests"]
    fn child_images_async() {
        common::current_thread_runtime().block_on(async {
            let conn = typed_ipc::tokio::worker::connection().unwrap();
            asynchronous::ImagesServer::new(ImagesImpl::default())
                .serve(conn)
                .await
                .unwrap();
        });
    }

    #[test]
    fn an_async_parent_and_a_blocking_worker_share_regions() {
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        common::current_thread_runtime().block_on(async {
            let (mut child, conn) = typed_ipc::tokio::worker::spawn(child("child_images")).unwrap();
            let images = asynchronous::ImagesClient::new(conn);
            for (round, len) in [LARGE, 100, LARGE].into_iter().enumerate() {
                let data = filled(len, round as u64);
                let want = bumped(&data);
                let decoded = images.decode(Some(data.clone())).await.unwrap();
                assert!(decoded == Ok(want.clone()));
                assert!(images.recover(Ok(data)).await.unwrap() == Some(want));
            }
            let none = images.decode(None).await.unwrap();
            assert_eq!(none, Err("no image".into()));
            assert_eq!(images.recover(Err("bad".into())).await.unwrap(), None);
            images.keep(Some(filled(LARGE, 9))).await.unwrap();
            images.keep(None).await.unwrap();
            assert_eq!(images.kept().await.unwrap(), [LARGE as u64, 0]);
            assert_eq!(regions(), 2, "our region and a view of the worker's");
            assert_eq!(images.regions().await.unwrap(), 2);
            drop(images);
            assert_eq!(
                typed_ipc::tokio::worker::wait(&mut child).await.unwrap(),
                Exit::Code(0)
            );
        });
        before.assert_nothing_new();
    }

    #[test]
    fn a_blocking_parent_and_an_async_worker_share_regions() {
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        let (mut child, conn) = Worker::spawn(child("async_flavour::child_images_async")).unwrap();
        let images = ImagesClient::new(conn);
        round_trips(&images);
        assert_eq!(regions(), 2, "our region and a view of the worker's");
        assert_eq!(images.regions().unwrap(), 2);
        drop(images);
        assert_eq!(child.wait().unwrap(), Exit::Code(0));
        drop(child);
        before.assert_nothing_new();
    }
}
