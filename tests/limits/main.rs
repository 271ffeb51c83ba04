//! `Limits` across real processes, in both flavours: a message over the sender's own limits
//! fails on the sender, unsent; a reply over the caller's limits fails that call only; a
//! request over the server's limits is answered with a failure. In every case the connection
//! keeps working and no fd is left open.
//!
//! The worker is this test binary run again for one `#[ignore]`d test (`child_*`); it takes
//! its limits from the environment ([`MAX_FDS`]). Every test takes `fd_count_lock`, so the
//! fd counts see only its own.

#[path = "../common/mod.rs"]
mod common;

mod bundles;
mod byte_strings;
mod fds;
mod send_limits;

use std::os::fd::OwnedFd;

use common::{child, memfd, open_fds};
use typed_ipc::worker;
use typed_ipc::{Connection, Limits, Socket, interface};

/// The worker's `Limits::max_fds`, if not the default.
const MAX_FDS: &str = "TYPED_IPC_TEST_MAX_FDS";

/// Fds both ways.
#[interface]
pub trait Files {
    /// How many fds came.
    fn count(&self, files: Vec<OwnedFd>) -> u32;
    /// `n` new memfds.
    fn make(&self, n: u32) -> Vec<OwnedFd>;
    /// Takes fds, and answers nothing.
    #[oneway]
    fn take(&self, files: Vec<OwnedFd>);
}

struct FilesImpl;

impl Files for FilesImpl {
    fn count(&self, files: Vec<OwnedFd>) -> u32 {
        files.len() as u32
    }
    fn make(&self, n: u32) -> Vec<OwnedFd> {
        (0..n).map(|_| memfd(b"made")).collect()
    }
    fn take(&self, _files: Vec<OwnedFd>) {}
}

fn memfds(n: usize) -> Vec<OwnedFd> {
    (0..n).map(|_| memfd(b"sent")).collect()
}

/// Lets this process (and the workers it starts) hold `n` more fds than it has open: the
/// usual soft limit, 1024, is below what these tests send.
fn room_for_fds(n: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let want = open_fds() as u64 + n;
    assert!(
        want <= hard,
        "these tests need {want} fds open at once; RLIMIT_NOFILE allows {hard}"
    );
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).unwrap();
    }
}

/// A worker running `name`, whose socket accepts at most `max_fds` fds per message if given.
fn spawn(name: &str, max_fds: Option<usize>) -> std::process::Command {
    let mut command = child(name);
    if let Some(max) = max_fds {
        command.env(MAX_FDS, max.to_string());
    }
    command
}

/// The worker's end, with the limits the parent asked for.
fn worker_socket() -> Socket {
    let mut socket = worker::socket().unwrap();
    if let Ok(max) = std::env::var(MAX_FDS) {
        socket.set_limits(Limits {
            max_fds: max.parse().unwrap(),
            ..Limits::default()
        });
    }
    socket
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_files() {
    let conn = Connection::new(worker_socket());
    conn.serve(FilesServer::new(FilesImpl)).unwrap();
}

/// The same, with an async parent and an async worker.
#[cfg(feature = "tokio")]
mod asynchronous {
    use std::os::fd::OwnedFd;

    use typed_ipc::interface;
    use typed_ipc::tokio::AsyncConnection;
    use typed_ipc::worker::{Exit, Worker};

    use super::{memfd, spawn, worker_socket};

    #[interface]
    pub trait Files {
        async fn count(&self, files: Vec<OwnedFd>) -> u32;
        async fn make(&self, n: u32) -> Vec<OwnedFd>;
        #[oneway]
        async fn take(&self, files: Vec<OwnedFd>);
    }

    struct FilesImpl;

    impl Files for FilesImpl {
        async fn count(&self, files: Vec<OwnedFd>) -> u32 {
            files.len() as u32
        }
        async fn make(&self, n: u32) -> Vec<OwnedFd> {
            (0..n).map(|_| memfd(b"made")).collect()
        }
        async fn take(&self, _files: Vec<OwnedFd>) {}
    }

    #[test]
    #[ignore = "run as a child process by other tests"]
    fn child_async_files() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let conn = AsyncConnection::new(worker_socket()).unwrap();
            FilesServer::new(FilesImpl).serve(conn).await.unwrap();
        });
    }

    pub(crate) fn runtime() -> tokio::runtime::Runtime {
        super::common::two_worker_runtime()
    }

    pub(crate) fn async_worker(max_fds: Option<usize>) -> (Worker, FilesClient) {
        let command = spawn("asynchronous::child_async_files", max_fds);
        let (worker, conn) = typed_ipc::tokio::worker::spawn(command).unwrap();
        (worker, FilesClient::new(conn))
    }

    pub(crate) async fn hang_up(mut worker: Worker, files: FilesClient) {
        let conn = files.connection().clone();
        drop(files);
        conn.close();
        conn.wait_closed().await;
        let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
        assert_eq!(exit, Exit::Code(0), "the worker served to the end");
    }

    /// [`super::Strings`], async.
    #[interface]
    pub trait Strings {
        /// `data`, back.
        async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
        /// `len` bytes.
        async fn make(&self, len: u64) -> Vec<u8>;
        /// How many bytes `data` has, and whether each is `byte`.
        async fn check(&self, data: Vec<u8>, byte: u8) -> (u64, bool);
    }

    struct StringsImpl;

    impl Strings for StringsImpl {
        async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
            data
        }
        async fn make(&self, len: u64) -> Vec<u8> {
            vec![9; len as usize]
        }
        async fn check(&self, data: Vec<u8>, byte: u8) -> (u64, bool) {
            super::checked(&data, byte)
        }
    }

    /// A client and a server of [`Strings`] (a task) whose sockets have these limits; the
    /// client lends its pages if `lend`.
    pub(crate) fn strings_between(
        client: typed_ipc::Limits,
        server: typed_ipc::Limits,
        lend: bool,
    ) -> (StringsClient, Served) {
        let (mut a, mut b) = typed_ipc::Socket::pair().unwrap();
        a.set_limits(client);
        b.set_limits(server);
        let b = AsyncConnection::new(b).unwrap();
        b.lend_pages_to_peer(lend); // pipes need the trust of both ends
        let serving = tokio::spawn(StringsServer::new(StringsImpl).serve(b));
        let conn = AsyncConnection::new(a).unwrap();
        conn.lend_pages_to_peer(lend);
        (StringsClient::new(conn.clone()), (conn, serving))
    }

    /// A client's connection, and the task serving it.
    pub(crate) type Served = (
        AsyncConnection,
        tokio::task::JoinHandle<typed_ipc::Result<()>>,
    );

    /// Hangs up `strings` and waits until its server is done.
    pub(crate) async fn finish(strings: StringsClient, (conn, serving): Served) {
        drop(strings);
        conn.close();
        conn.wait_closed().await;
        serving.await.unwrap().unwrap();
    }
}

/// Byte strings, which the connection moves through its shared region from 1 KiB.
#[interface]
pub trait Strings {
    /// `data`, back.
    fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    /// `len` bytes.
    fn make(&self, len: u64) -> Vec<u8>;
    /// How many bytes `data` has, and whether each is `byte`.
    fn check(&self, data: Vec<u8>, byte: u8) -> (u64, bool);
}

struct StringsImpl;

impl Strings for StringsImpl {
    fn echo(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
    fn make(&self, len: u64) -> Vec<u8> {
        vec![9; len as usize]
    }
    fn check(&self, data: Vec<u8>, byte: u8) -> (u64, bool) {
        checked(&data, byte)
    }
}

/// What [`Strings::check`] answers.
fn checked(data: &[u8], byte: u8) -> (u64, bool) {
    (data.len() as u64, data.iter().all(|&b| b == byte))
}

/// A [`Strings`] client, and the thread serving it.
type Served = (
    StringsClient,
    std::thread::JoinHandle<typed_ipc::Result<()>>,
);

/// A client and a server of [`Strings`] (on a thread) whose sockets have these limits; the
/// client lends its pages to the server if `lend` (and the server trusts it with pipes).
fn strings_between(client: Limits, server: Limits, lend: bool) -> Served {
    let (mut a, mut b) = Socket::pair().unwrap();
    a.set_limits(client);
    b.set_limits(server);
    let b = Connection::new(b);
    b.lend_pages_to_peer(lend); // pipes need the trust of both ends
    let server = std::thread::spawn(move || StringsServer::new(StringsImpl).serve(b));
    let conn = Connection::new(a);
    conn.lend_pages_to_peer(lend);
    (StringsClient::new(conn), server)
}
