//! `#[interface(crate = "...")]` and `#[shape(crate = "...")]`: an interface and a type
//! declared in a crate that reaches typed-ipc through a facade (here a module re-exporting it
//! under another name) compile and work, in both flavours, with every optional item
//! generated; typed-ipc's `with` modules named through the facade are known to the derive.
//! That the expansion names typed-ipc only by the given path is checked in `ipc-macros`
//! (`generate::tests`).

use std::io::{Seek, Write};
use std::os::fd::OwnedFd;

/// What a facade crate would be: typed-ipc, re-exported under a name of its own.
pub mod facade {
    pub use ::typed_ipc as ipc;
}

/// A type whose shape is derived through the facade, its fd and bytes written by
/// typed-ipc's `with` modules named through it.
#[derive(serde::Serialize, serde::Deserialize, facade::ipc::Shape)]
#[shape(crate = "crate::facade::ipc")]
pub struct Labelled {
    pub label: String,
    #[serde(with = "crate::facade::ipc::fd")]
    pub file: OwnedFd,
    #[serde(with = "crate::facade::ipc::bytes")]
    pub data: Vec<u8>,
}

/// The same type, derived as usual: the same shape.
#[derive(serde::Serialize, serde::Deserialize, typed_ipc::Shape)]
pub struct LabelledDirectly {
    pub label: String,
    #[serde(with = "typed_ipc::fd")]
    pub file: OwnedFd,
    #[serde(with = "typed_ipc::bytes")]
    pub data: Vec<u8>,
}

/// A blocking interface named through the facade (with its async client where there is one).
#[cfg_attr(
    feature = "tokio",
    typed_ipc::interface(crate = "crate::facade::ipc", async_client, check_types)
)]
#[cfg_attr(
    not(feature = "tokio"),
    typed_ipc::interface(crate = "crate::facade::ipc", check_types)
)]
pub trait Files {
    /// The total length of `files`, in bytes.
    fn total_len(&self, files: Vec<OwnedFd>) -> u64;
    /// `data`, reversed.
    fn reversed(&self, data: Vec<u8>) -> Vec<u8>;
    /// The file's length, and the label and bytes as they came.
    fn inspect(&self, labelled: Labelled) -> (String, u64, Vec<u8>);
}

struct FilesImpl;

impl Files for FilesImpl {
    fn total_len(&self, files: Vec<OwnedFd>) -> u64 {
        let len = |fd: OwnedFd| std::fs::File::from(fd).metadata().unwrap().len();
        files.into_iter().map(len).sum()
    }

    fn reversed(&self, mut data: Vec<u8>) -> Vec<u8> {
        data.reverse();
        data
    }

    fn inspect(&self, labelled: Labelled) -> (String, u64, Vec<u8>) {
        let len = std::fs::File::from(labelled.file).metadata().unwrap().len();
        (labelled.label, len, labelled.data)
    }
}

#[test]
fn a_shape_derived_through_a_facade_is_the_one_derived_directly() {
    use typed_ipc::Shape;
    assert_eq!(Labelled::SHAPE, LabelledDirectly::SHAPE);
}

/// A file of `len` bytes.
fn file_of(len: usize) -> OwnedFd {
    let mut file = tempfile_in_memory();
    file.write_all(&vec![7; len]).unwrap();
    file.rewind().unwrap();
    file.into()
}

fn tempfile_in_memory() -> std::fs::File {
    let fd = nix::sys::memfd::memfd_create(c"crate-path", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .unwrap();
    std::fs::File::from(fd)
}

#[test]
fn a_blocking_interface_named_through_a_facade_serves_and_calls() {
    use facade::ipc::Connection;

    let (ours, theirs) = Connection::pair().unwrap();
    let server = std::thread::spawn(move || theirs.serve(FilesServer::new(FilesImpl)));
    let client = FilesClient::new(ours);
    assert_eq!(client.total_len(vec![file_of(3), file_of(4)]).unwrap(), 7);
    assert_eq!(client.reversed(vec![1, 2, 3]).unwrap(), vec![3, 2, 1]);
    let labelled = Labelled {
        label: "frame".into(),
        file: file_of(5),
        data: vec![9; 3],
    };
    assert_eq!(
        client.inspect(labelled).unwrap(),
        ("frame".to_string(), 5, vec![9; 3])
    );
    drop(client);
    server.join().unwrap().unwrap();
}

#[cfg(feature = "tokio")]
mod asynchronous {
    use super::facade;

    /// An async interface named through the facade, with a blocking client too.
    #[typed_ipc::interface(crate = "super::facade::ipc", blocking_client, check_types)]
    pub trait Counter {
        /// `n` plus one.
        async fn next(&self, n: u64) -> u64;
    }

    struct CounterImpl;

    impl Counter for CounterImpl {
        async fn next(&self, n: u64) -> u64 {
            n + 1
        }
    }

    #[test]
    fn an_async_interface_named_through_a_facade_serves_and_calls() {
        use facade::ipc::tokio::AsyncConnection;

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (ours, theirs) = AsyncConnection::pair().unwrap();
            let serving = tokio::spawn(theirs.serve(CounterServer::new(CounterImpl)));
            let client = CounterClient::new(ours);
            assert_eq!(client.next(41).await.unwrap(), 42);
            drop(client);
            serving.await.unwrap().unwrap();
        });
    }
}
