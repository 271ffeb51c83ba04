//! A server's failure replies across real processes, in both flavours: a failure whose text
//! is longer than the server may send (a long panic message, with the strict limits a server
//! of untrusted clients sets) still reaches its caller, cut, as that failure; the connection
//! serves on.
//!
//! The server is this test binary run again for one `#[ignore]`d test (`child_*`).

mod common;

use common::{child, fd_count_lock};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, Error, Limits, interface};

/// What the servers here send at most: a server of clients it does not trust holds them to
/// what its interfaces need, and itself to the same.
const SERVER_LIMIT: usize = 4096;

/// How long the panic messages here are: well over [`SERVER_LIMIT`].
const LONG: u32 = 3 * SERVER_LIMIT as u32;

/// A method that panics, and one that does not.
#[interface]
pub trait Faulty {
    /// Panics with a message of `len` `x`s.
    fn explode(&self, len: u32) -> u32;
    /// 7.
    fn ping(&self) -> u32;
}

struct FaultyImpl;

impl Faulty for FaultyImpl {
    fn explode(&self, len: u32) -> u32 {
        panic!("{}", "x".repeat(len as usize))
    }
    fn ping(&self) -> u32 {
        7
    }
}

/// The server's socket, held to [`SERVER_LIMIT`]; its panics not on stderr (they are long).
fn strict_socket() -> typed_ipc::Socket {
    std::panic::set_hook(Box::new(|_| {}));
    let mut socket = worker::socket().unwrap();
    socket.set_limits(Limits {
        max_message_len: SERVER_LIMIT,
        ..Limits::default()
    });
    socket
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_strict_faulty() {
    let conn = Connection::new(strict_socket());
    typed_ipc::Server::new()
        .threads(2)
        .service(FaultyServer::new(FaultyImpl))
        .serve(&conn)
        .unwrap();
}

/// Fails unless `got` is the panic of a message of [`LONG`] `x`s, cut.
fn assert_long_panic(got: Result<u32, Error>) {
    match got {
        Err(Error::Panicked(why)) => {
            assert!(why.starts_with("Faulty::explode: xxxx"), "{why:.80}");
            assert!(why.len() < LONG as usize, "not cut: {} bytes", why.len());
        }
        other => panic!("expected Error::Panicked, got {other:?}"),
    }
}

/// A handler whose panic message is longer than its server may send: its caller gets
/// `Panicked`, the message cut, and the connection serves on. The server ended the connection
/// instead ("a call of the peer's could not be answered"): the caller, and every other call
/// in flight on it, got `Disconnected`.
#[test]
fn a_panic_message_over_the_servers_limits_reaches_the_caller_cut() {
    let _fds = fd_count_lock();
    let (mut worker, conn) = Worker::spawn(child("child_strict_faulty")).unwrap();
    let faulty = FaultyClient::new(conn).with_timeout(std::time::Duration::from_secs(60));
    assert_long_panic(faulty.explode(LONG));
    assert_eq!(faulty.ping().unwrap(), 7, "the connection serves on");
    faulty.connection().close();
    assert_eq!(worker.wait().unwrap(), Exit::Code(0), "served to the end");
}

#[cfg(feature = "tokio")]
mod asynchronous {
    use super::*;
    use typed_ipc::tokio::AsyncConnection;

    /// [`Faulty`], async; the parent calls it with its blocking client.
    #[interface(name = "Faulty", blocking_client)]
    pub trait AsyncFaulty {
        /// Panics with a message of `len` `x`s.
        async fn explode(&self, len: u32) -> u32;
        /// 7.
        async fn ping(&self) -> u32;
    }

    struct AsyncFaultyImpl;

    impl AsyncFaulty for AsyncFaultyImpl {
        async fn explode(&self, len: u32) -> u32 {
            panic!("{}", "x".repeat(len as usize))
        }
        async fn ping(&self) -> u32 {
            7
        }
    }

    #[test]
    #[ignore = "run as a child process by other tests"]
    fn child_async_strict_faulty() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let conn = AsyncConnection::new(strict_socket()).unwrap();
            AsyncFaultyServer::new(AsyncFaultyImpl)
                .serve(conn)
                .await
                .unwrap();
        });
    }

    /// [`super::a_panic_message_over_the_servers_limits_reaches_the_caller_cut`], async.
    #[test]
    fn a_panic_message_over_the_servers_limits_reaches_the_caller_cut() {
        let _fds = fd_count_lock();
        let command = child("asynchronous::child_async_strict_faulty");
        let (mut worker, conn) = Worker::spawn(command).unwrap();
        let faulty =
            AsyncFaultyBlockingClient::new(conn).with_timeout(std::time::Duration::from_secs(60));
        assert_long_panic(faulty.explode(LONG));
        assert_eq!(faulty.ping().unwrap(), 7, "the connection serves on");
        faulty.connection().close();
        assert_eq!(worker.wait().unwrap(), Exit::Code(0), "served to the end");
    }
}
