//! A client stub's `Vec<u8>` parameter takes borrowed bytes too (`&[u8]`, `&Vec<u8>`,
//! `&[u8; N]`, `&mut` ones), sent from where they lie: every size arrives whole, the bytes are
//! read only while the message is encoded (a oneway's buffer may be rewritten as soon as the
//! stub returns), and they are never piped, since a pipe would read them after the call. It
//! takes `SharedBytes` too, sent as they are anywhere. Across real processes, in both
//! flavours.

mod common;

use std::sync::Mutex;

use common::{checksum, child, fd_count_lock, fd_snapshot, fds_named, fill, filled};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{SharedBytes, interface};

#[interface]
pub trait Frames {
    /// `data` with every byte incremented.
    fn bumped(&self, data: Vec<u8>) -> Vec<u8>;
    /// The checksums of `a` and `b`.
    fn checksums(&self, a: Vec<u8>, b: Vec<u8>) -> (u64, u64);
    /// Keeps the length and checksum of `data` for `kept`.
    #[oneway]
    fn keep(&self, data: Vec<u8>);
    /// What `keep` kept, in order.
    fn kept(&self) -> Vec<(u64, u64)>;
    /// Pipes this process holds open.
    fn pipes(&self) -> u64;
}

#[derive(Default)]
struct FramesImpl(Mutex<Vec<(u64, u64)>>);

impl Frames for FramesImpl {
    fn bumped(&self, data: Vec<u8>) -> Vec<u8> {
        bumped(&data)
    }
    fn checksums(&self, a: Vec<u8>, b: Vec<u8>) -> (u64, u64) {
        (checksum(&a), checksum(&b))
    }
    fn keep(&self, data: Vec<u8>) {
        let kept = (data.len() as u64, checksum(&data));
        self.0.lock().unwrap().push(kept);
    }
    fn kept(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
    fn pipes(&self) -> u64 {
        pipes()
    }
}

/// What `bumped` returns for `data`.
fn bumped(data: &[u8]) -> Vec<u8> {
    data.iter().map(|b| b.wrapping_add(1)).collect()
}

fn pipes() -> u64 {
    fds_named("pipe:")
}

/// Sizes on every path a byte string takes: inline byte by byte and copied in one go, the
/// shared region, the range a trusting peer's pipe or inbox takes, and over it.
const SIZES: [usize; 10] = [
    0,
    1,
    64,
    255,
    256,
    4096,
    64 << 10,
    300 << 10,
    1 << 20,
    (1 << 20) + 1,
];

#[test]
#[ignore = "run as a child process by other tests"]
fn child_frames() {
    FramesServer::new(FramesImpl::default())
        .serve(worker::connection().unwrap())
        .unwrap();
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_frames_lending() {
    let connection = worker::connection().unwrap();
    connection.lend_pages_to_peer(true);
    FramesServer::new(FramesImpl::default())
        .serve(connection)
        .unwrap();
}

/// Every size from one buffer the caller keeps, each kind of borrow, borrowed and owned bytes
/// in one call, and oneways whose buffer is rewritten as soon as each is sent.
fn round_trips(frames: &FramesClient) {
    let mut buffer = filled(SIZES[SIZES.len() - 1], 1);
    for len in SIZES {
        let want = bumped(&buffer[..len]);
        assert!(
            frames.bumped(&buffer[..len]).unwrap() == want,
            "{len} bytes"
        );
    }
    let owned = filled(4096, 2);
    assert_eq!(frames.bumped(&owned).unwrap(), bumped(&owned));
    assert_eq!(frames.bumped(&[1u8, 2, 3]).unwrap(), [2, 3, 4]);
    assert_eq!(frames.bumped(b"abc").unwrap(), b"bcd");
    assert_eq!(frames.bumped(vec![1, 2, 3]).unwrap(), [2, 3, 4]);
    assert_eq!(frames.bumped(Vec::new()).unwrap(), []);
    let mut scratch = filled(512, 4);
    assert_eq!(frames.bumped(&mut scratch).unwrap(), bumped(&scratch));
    assert_eq!(
        frames.bumped(&mut scratch[..64]).unwrap(),
        bumped(&scratch[..64])
    );
    let mut array = [7u8, 8, 9];
    assert_eq!(frames.bumped(&mut array).unwrap(), [8, 9, 10]);
    for len in SIZES {
        let shared = SharedBytes::from(filled(len, 5));
        assert!(
            frames.bumped(shared.clone()).unwrap() == bumped(&shared),
            "{len} bytes shared"
        );
    }
    let both = frames.checksums(&buffer[..300], owned.clone()).unwrap();
    assert_eq!(both, (checksum(&buffer[..300]), checksum(&owned)));

    let mut sent = Vec::new();
    for (round, len) in SIZES.into_iter().enumerate() {
        fill(&mut buffer, round as u64 + 10);
        frames.keep(&buffer[..len]).unwrap();
        sent.push((len as u64, checksum(&buffer[..len])));
        fill(&mut buffer, round as u64 + 100); // the oneway went with the bytes above
    }
    assert_eq!(frames.kept().unwrap(), sent);
}

#[test]
fn borrowed_bytes_of_every_size_arrive_whole() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (mut child, conn) = Worker::spawn(child("child_frames")).unwrap();
    let frames = FramesClient::new(conn);
    round_trips(&frames);
    drop(frames);
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
    drop(child);
    before.assert_nothing_new();
}

/// Whether `send`, on a fresh worker that the connection lends its pages to (and that lends
/// its own), makes a pipe: (in this process, in the worker).
fn piped_by(send: impl FnOnce(&FramesClient)) -> (bool, bool) {
    let (mut child, conn) = Worker::spawn(child("child_frames_lending")).unwrap();
    conn.lend_pages_to_peer(true);
    let frames = FramesClient::new(conn);
    let (ours, workers) = (pipes(), frames.pipes().unwrap());
    send(&frames);
    let piped = (pipes() > ours, frames.pipes().unwrap() > workers);
    drop(frames);
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
    piped
}

/// Between two ends that lend each other their pages, a call's 300 KiB `Vec` is piped (the
/// sender then keeps a pipe, and so does the receiver), and so are `SharedBytes` given for
/// the `Vec<u8>` parameter, but the same bytes borrowed are not: the pipe would let the peer
/// read the caller's pages after the call returned, when the caller may already be writing
/// to them.
#[test]
fn borrowed_bytes_are_never_piped() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let data = filled(300 << 10, 3);
    let borrowed = piped_by(|frames| {
        for _ in 0..3 {
            assert!(frames.bumped(&data).unwrap() == bumped(&data));
        }
    });
    assert_eq!(borrowed, (false, false), "borrowed bytes are piped");
    let owned = piped_by(|frames| assert!(frames.bumped(data.clone()).unwrap() == bumped(&data)));
    assert_eq!(owned, (true, true), "an owned Vec of this size is piped");
    let shared = SharedBytes::from(data.clone());
    let shared = piped_by(|frames| assert!(frames.bumped(shared).unwrap() == bumped(&data)));
    assert_eq!(
        shared,
        (true, true),
        "shared bytes are piped, as an owned Vec is"
    );
    before.assert_nothing_new();
}

/// The async flavour's stubs take borrowed bytes the same way; their futures borrow them.
#[cfg(feature = "tokio")]
mod async_flavour {
    use super::*;

    /// `Frames` as `async fn`s: the same interface on the wire.
    mod asynchronous {
        #[typed_ipc::interface]
        pub trait Frames {
            async fn bumped(&self, data: Vec<u8>) -> Vec<u8>;
            async fn checksums(&self, a: Vec<u8>, b: Vec<u8>) -> (u64, u64);
            #[oneway]
            async fn keep(&self, data: Vec<u8>);
            async fn kept(&self) -> Vec<(u64, u64)>;
            async fn pipes(&self) -> u64;
        }
    }

    fn is_send<T: Send>(value: T) -> T {
        value
    }

    /// Hangs up on the worker, which must then exit cleanly.
    async fn hang_up(frames: asynchronous::FramesClient, mut child: Worker) {
        drop(frames);
        let exit = typed_ipc::tokio::worker::wait(&mut child).await.unwrap();
        assert_eq!(exit, Exit::Code(0));
    }

    #[test]
    fn an_async_client_sends_borrowed_bytes_to_a_blocking_worker() {
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        common::current_thread_runtime().block_on(async {
            let (child, conn) = typed_ipc::tokio::worker::spawn(child("child_frames")).unwrap();
            let frames = asynchronous::FramesClient::new(conn);
            let mut buffer = filled(SIZES[SIZES.len() - 1], 4);
            for len in SIZES {
                let want = bumped(&buffer[..len]);
                // A future that borrows the bytes is still `Send`.
                let got = is_send(frames.bumped(&buffer[..len])).await.unwrap();
                assert!(got == want, "{len} bytes");
            }
            assert_eq!(frames.bumped(vec![1, 2, 3]).await.unwrap(), [2, 3, 4]);
            let owned = filled(4096, 5);
            let both = frames.checksums(&owned, &buffer[..64]).await.unwrap();
            assert_eq!(both, (checksum(&owned), checksum(&buffer[..64])));
            let mut sent = Vec::new();
            for (round, len) in SIZES.into_iter().enumerate() {
                fill(&mut buffer, round as u64 + 10);
                frames.keep(&buffer[..len]).await.unwrap();
                sent.push((len as u64, checksum(&buffer[..len])));
                fill(&mut buffer, round as u64 + 100);
            }
            assert_eq!(frames.kept().await.unwrap(), sent);
            hang_up(frames, child).await;
        });
        before.assert_nothing_new();
    }

    /// Every kind of argument a `Vec<u8>` parameter takes leaves the stub's future `Send`:
    /// sent from a task of its own (`tokio::spawn` asks `Send + 'static` of the task, whose
    /// futures borrow its own buffers across their awaits), a call and a oneway each.
    #[test]
    fn every_kind_of_bytes_is_sent_from_a_spawned_task() {
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        common::current_thread_runtime().block_on(async {
            let (child, conn) = typed_ipc::tokio::worker::spawn(child("child_frames")).unwrap();
            let frames = asynchronous::FramesClient::new(conn);
            let task = frames.clone();
            let sent = tokio::spawn(async move {
                let vec = filled(4096, 6);
                let array = [7u8; 300];
                assert_eq!(task.bumped(&vec[..100]).await.unwrap(), bumped(&vec[..100]));
                assert_eq!(task.bumped(&vec).await.unwrap(), bumped(&vec));
                assert_eq!(task.bumped(&array).await.unwrap(), bumped(&array));
                assert_eq!(task.bumped(b"abc").await.unwrap(), b"bcd");
                assert_eq!(task.bumped(vec.clone()).await.unwrap(), bumped(&vec));
                let mut scratch = vec.clone();
                assert_eq!(task.bumped(&mut scratch).await.unwrap(), bumped(&vec));
                let shared = SharedBytes::from(vec.clone());
                assert_eq!(task.bumped(shared).await.unwrap(), bumped(&vec));
                let both = task.checksums(&vec, &array).await.unwrap();
                assert_eq!(both, (checksum(&vec), checksum(&array)));
                for data in [&vec[..10], &vec[..], &array[..]] {
                    task.keep(data).await.unwrap();
                }
                task.keep(&array).await.unwrap();
                task.keep(vec.clone()).await.unwrap();
                [&vec[..10], &vec, &array, &array, &vec]
                    .map(|data| (data.len() as u64, checksum(data)))
                    .to_vec()
            });
            let sent = sent.await.unwrap();
            assert_eq!(frames.kept().await.unwrap(), sent);
            hang_up(frames, child).await;
        });
        before.assert_nothing_new();
    }
}
