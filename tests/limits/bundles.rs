//! Fds beside a large byte string: a message with all the fds a side sends or its peer accepts
//! still carries one, both ways between processes; and an end whose socket started full.

use std::os::fd::OwnedFd;

use typed_ipc::worker::{Exit, Worker};
use typed_ipc::{Connection, Error, Limit, Limits, SharedBytes, Socket, interface};

use crate::common::{fd_count_lock, fd_snapshot, memfd};
use crate::{StringsClient, StringsImpl, StringsServer, memfds, spawn, worker_socket};

/// Fds around a large byte string.
#[interface]
pub trait Bundles {
    /// How many fds came, and how many bytes.
    fn check(&self, before: Vec<OwnedFd>, data: Vec<u8>, after: Vec<OwnedFd>) -> (u32, u64);
}

struct BundlesImpl;

impl Bundles for BundlesImpl {
    fn check(&self, before: Vec<OwnedFd>, data: Vec<u8>, after: Vec<OwnedFd>) -> (u32, u64) {
        ((before.len() + after.len()) as u32, data.len() as u64)
    }
}

/// A side that sends at most two fds a message (and accepts the default).
fn sends_two_fds() -> Limits {
    Limits {
        max_send_fds: Some(2),
        ..Limits::default()
    }
}

/// Two fds, split before and after the string in every way: the string is placed with the
/// fd table already full, half full, or empty (and filled after it).
const FD_SPLITS: [(usize, usize); 3] = [(2, 0), (1, 1), (0, 2)];

/// Through the region (a new one, which the message announces, each time the last
/// placement's was given back), and the pipe if lent (128 KiB to 1 MiB).
const BUNDLED_SIZES: [usize; 3] = [2 << 10, 64 << 10, 300 << 10];

/// Fails unless `got` is `TooManyFds` of the three fds the caller passed over its limit of
/// two (not four: the region's fd is no fd of the caller's).
fn assert_three_over_two<T: std::fmt::Debug>(got: Result<T, Error>) {
    match got {
        Err(
            e @ Error::TooManyFds {
                count: 3,
                limit: 2,
                which: Limit::MaxSendFds,
                by_peer: false,
                ..
            },
        ) => assert_eq!(
            e.to_string(),
            "message carries 3 file descriptors, over Limits::max_send_fds (2)"
        ),
        other => panic!("expected TooManyFds of 3 over this side's max_send_fds 2, got {other:?}"),
    }
}

/// A message carrying exactly as many fds as its side sends (`Limits::send_fds`) and a large
/// byte string goes out: the string inline if the region's or the pipe's fd, which the
/// message would carry too, leaves no room, however the fds and the string are ordered. One
/// with more fds than that is refused with the caller's count. Large strings go out of line
/// again afterwards.
#[test]
fn a_message_with_all_the_fds_a_side_sends_still_carries_a_large_string() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    for lend in [false, true] {
        let (bundles, conn, server) = bundled_rounds(sends_two_fds(), Limits::default(), lend);
        assert_three_over_two(bundles.check(memfds(3), vec![1; 64 << 10], memfds(0)));
        let got = bundles.check(memfds(0), vec![2; 64 << 10], memfds(0));
        assert_eq!(got.unwrap(), (0, 64 << 10), "lend {lend}");
        assert_ne!(
            conn.release_shared_memory(),
            0,
            "through the region, lend {lend}"
        );
        drop((bundles, conn));
        server.join().unwrap().unwrap();
    }
    before.assert_nothing_new();
}

/// A `Bundles` client whose connection has the limits `client`, of a server on a thread
/// whose connection has `server`, both lending pages to the peer or not (`lend`), once every
/// split of two fds ([`FD_SPLITS`]) beside each of [`BUNDLED_SIZES`] went through.
fn bundled_rounds(
    client: Limits,
    server: Limits,
    lend: bool,
) -> (
    BundlesClient,
    Connection,
    std::thread::JoinHandle<typed_ipc::Result<()>>,
) {
    let (mut a, mut b) = Socket::pair().unwrap();
    a.set_limits(client);
    b.set_limits(server);
    let b = Connection::new(b);
    b.lend_pages_to_peer(lend);
    let server = std::thread::spawn(move || BundlesServer::new(BundlesImpl).serve(b));
    let conn = Connection::new(a);
    conn.lend_pages_to_peer(lend);
    let bundles = BundlesClient::new(conn.clone());
    // The first reply says the server reads lanes.
    assert_eq!(bundles.check(memfds(0), vec![], memfds(0)).unwrap(), (0, 0));
    for (round, (first, then)) in FD_SPLITS.into_iter().enumerate() {
        for len in BUNDLED_SIZES {
            let got = bundles.check(memfds(first), vec![1; len], memfds(then));
            assert!(
                matches!(got, Ok((2, n)) if n == len as u64),
                "lend {lend}, round {round}, {len} bytes: {got:?}"
            );
        }
    }
    (bundles, conn, server)
}

/// A side that accepts at most two fds a message (and sends the default).
fn accepts_two_fds() -> Limits {
    Limits {
        max_fds: 2,
        ..Limits::default()
    }
}

/// A message carrying exactly as many fds as the peer accepts (`Limits::max_fds`) and a
/// large byte string is taken in, however the fds and the string are ordered: the peer
/// told this end its limit when the connection was made, so the string goes inline where
/// the region's or the pipe's fd would leave no room, and out of line where it would.
#[test]
fn a_message_with_all_the_fds_the_peer_accepts_still_carries_a_large_string() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    for lend in [false, true] {
        let (bundles, conn, server) = bundled_rounds(Limits::default(), accepts_two_fds(), lend);
        let got = bundles.check(memfds(1), vec![2; 64 << 10], memfds(0));
        assert_eq!(got.unwrap(), (1, 64 << 10), "lend {lend}");
        assert_ne!(
            conn.release_shared_memory(),
            0,
            "through the region beside one fd, lend {lend}"
        );
        drop((bundles, conn));
        server.join().unwrap().unwrap();
    }
    before.assert_nothing_new();
}

/// Fills `socket`'s buffer with one-byte datagrams its peer has not read (a socket used
/// before, handed over with data in it): how many.
fn fill_socket(socket: &Socket) -> usize {
    use nix::sys::socket::{MsgFlags, send};
    use std::os::fd::{AsFd, AsRawFd};
    let mut filler = 0;
    while send(socket.as_fd().as_raw_fd(), &[0u8], MsgFlags::MSG_DONTWAIT).is_ok() {
        filler += 1;
    }
    filler
}

/// A blocking end whose socket is full as its connection starts cannot tell its fd limit
/// then (it does not wait for room), and says it reads lanes only once it has: it tells the
/// limit before the next message it sends once there is room. From then on its peer sends
/// it large byte strings through the peer's region again. Before, it never told the limit,
/// and its peer sent it every string inline for the connection's life.
#[test]
fn an_end_whose_socket_was_full_as_it_started_has_large_strings_placed_once_it_sends() {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::{AsFd, AsRawFd};
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (mut a, b) = Socket::pair().unwrap();
    a.set_limits(accepts_two_fds());
    let filler = fill_socket(&a);
    let conn = Connection::new(a);
    for _ in 0..filler {
        recv(b.as_fd().as_raw_fd(), &mut [0u8; 1], MsgFlags::empty()).unwrap();
    }
    let b = Connection::new(b);
    let server_conn = b.clone();
    let server = std::thread::spawn(move || StringsServer::new(StringsImpl).serve(b));
    let strings = StringsClient::new(conn);
    // The first request, after the announcement, says that the client reads lanes.
    assert_eq!(strings.echo(vec![0; 10]).unwrap(), vec![0; 10]);
    assert_eq!(strings.make(64 << 10).unwrap(), vec![9; 64 << 10]);
    // This request acknowledges the reply's string, so the server's lane is idle again.
    assert_eq!(strings.echo(vec![0; 10]).unwrap(), vec![0; 10]);
    assert_ne!(
        server_conn.release_shared_memory(),
        0,
        "the server's reply came through its region"
    );
    drop((strings, server_conn));
    server.join().unwrap().unwrap();
    before.assert_nothing_new();
}

/// Fds beside a large byte string, as a reply.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Parcel {
    /// The fds.
    #[serde(with = "typed_ipc::fds")]
    pub files: Vec<OwnedFd>,
    /// The string.
    pub data: Vec<u8>,
}

/// Fds beside a large byte string, both ways, between processes.
#[interface]
pub trait Parcels {
    /// How many fds came, and how many bytes.
    fn check(&self, files: Vec<OwnedFd>, data: Vec<u8>) -> (u32, u64);
    /// [`Parcels::check`] of a string that may be piped.
    fn check_shared(&self, files: Vec<OwnedFd>, data: SharedBytes) -> (u32, u64);
    /// `n` new memfds beside `len` bytes.
    fn make(&self, n: u32, len: u64) -> Parcel;
}

struct ParcelsImpl;

impl Parcels for ParcelsImpl {
    fn check(&self, files: Vec<OwnedFd>, data: Vec<u8>) -> (u32, u64) {
        (files.len() as u32, data.len() as u64)
    }
    fn check_shared(&self, files: Vec<OwnedFd>, data: SharedBytes) -> (u32, u64) {
        (files.len() as u32, data.len() as u64)
    }
    fn make(&self, n: u32, len: u64) -> Parcel {
        let files = (0..n).map(|_| memfd(b"made")).collect();
        Parcel {
            files,
            data: vec![7; len as usize],
        }
    }
}

/// A worker serving [`Parcels`], lending its pages, with the limits the parent asked for.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_parcels() {
    let conn = Connection::new(worker_socket());
    conn.lend_pages_to_peer(true);
    conn.serve(ParcelsServer::new(ParcelsImpl)).unwrap();
}

/// Strings of 64 KiB to 1 MiB: the region, and the pipe (lent both ways).
const PARCEL_SIZES: [usize; 3] = [64 << 10, 300 << 10, 1 << 20];

/// An end that accepts one fd a message and one with the default limits, in two processes,
/// each way round: requests and replies carrying as many fds as the receiver accepts beside
/// a large byte string go through, whether the receiver is the server or the client.
#[test]
fn one_fd_and_a_large_string_cross_to_a_process_that_accepts_one() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let one = Limits {
        max_fds: 1,
        ..Limits::default()
    };
    for (parent, worker_fds) in [(Limits::default(), Some(1)), (one, None)] {
        let command = spawn("bundles::child_parcels", worker_fds);
        let (worker, conn) = Worker::spawn_with_limits(command, parent).unwrap();
        conn.lend_pages_to_peer(true);
        let parcels = ParcelsClient::new(conn);
        let whose = format!("parent {}, worker {worker_fds:?}", parent.max_fds);
        for round in 0..2 {
            for len in PARCEL_SIZES {
                let at = format!("{whose}, round {round}, {len} bytes");
                let got = parcels.check(memfds(1), vec![1; len]);
                assert_eq!(got.unwrap(), (1, len as u64), "{at}");
                let got = parcels.check_shared(memfds(1), SharedBytes::from(vec![2; len]));
                assert_eq!(got.unwrap(), (1, len as u64), "shared, {at}");
                let Parcel { files, data } = parcels.make(1, len as u64).unwrap();
                assert_eq!((files.len(), data.len()), (1, len), "made, {at}");
                assert!(data.iter().all(|&b| b == 7), "made, {at}");
            }
        }
        let mut worker = worker;
        drop(parcels);
        assert_eq!(worker.wait().unwrap(), Exit::Code(0), "{whose}");
    }
    before.assert_nothing_new();
}

/// The same, with an async parent and an async worker.
#[cfg(feature = "tokio")]
mod asynchronous {
    use std::os::fd::OwnedFd;

    use typed_ipc::tokio::AsyncConnection;
    use typed_ipc::worker::Exit;
    use typed_ipc::{SharedBytes, interface};

    use crate::asynchronous::runtime;
    use crate::common::{fd_count_lock, fd_snapshot, memfd};
    use crate::{memfds, spawn, worker_socket};

    /// [`super::Bundles`], async.
    #[interface]
    pub trait Bundles {
        async fn check(
            &self,
            before: Vec<OwnedFd>,
            data: Vec<u8>,
            after: Vec<OwnedFd>,
        ) -> (u32, u64);
    }

    struct BundlesImpl;

    impl Bundles for BundlesImpl {
        async fn check(
            &self,
            before: Vec<OwnedFd>,
            data: Vec<u8>,
            after: Vec<OwnedFd>,
        ) -> (u32, u64) {
            ((before.len() + after.len()) as u32, data.len() as u64)
        }
    }

    /// [`super::bundled_rounds`], async: the server is a task.
    async fn bundled_rounds(
        client: typed_ipc::Limits,
        server: typed_ipc::Limits,
        lend: bool,
    ) -> (
        BundlesClient,
        AsyncConnection,
        tokio::task::JoinHandle<typed_ipc::Result<()>>,
    ) {
        let (mut a, mut b) = typed_ipc::Socket::pair().unwrap();
        a.set_limits(client);
        b.set_limits(server);
        let b = AsyncConnection::new(b).unwrap();
        b.lend_pages_to_peer(lend);
        let serving = tokio::spawn(BundlesServer::new(BundlesImpl).serve(b));
        let conn = AsyncConnection::new(a).unwrap();
        conn.lend_pages_to_peer(lend);
        let bundles = BundlesClient::new(conn.clone());
        // The first reply says the server reads lanes.
        assert_eq!(
            bundles.check(memfds(0), vec![], memfds(0)).await.unwrap(),
            (0, 0)
        );
        for (round, (first, then)) in super::FD_SPLITS.into_iter().enumerate() {
            for len in super::BUNDLED_SIZES {
                let got = bundles
                    .check(memfds(first), vec![1; len], memfds(then))
                    .await;
                assert!(
                    matches!(got, Ok((2, n)) if n == len as u64),
                    "lend {lend}, round {round}, {len} bytes: {got:?}"
                );
            }
        }
        (bundles, conn, serving)
    }

    /// Ends [`bundled_rounds`]'s connection, and its server once that has seen it end.
    async fn finish_bundles(
        bundles: BundlesClient,
        conn: AsyncConnection,
        serving: tokio::task::JoinHandle<typed_ipc::Result<()>>,
    ) {
        drop(bundles);
        conn.close();
        conn.wait_closed().await;
        serving.await.unwrap().unwrap();
    }

    /// [`super::a_message_with_all_the_fds_a_side_sends_still_carries_a_large_string`], async.
    #[test]
    fn a_message_with_all_the_fds_a_side_sends_still_carries_a_large_string() {
        use typed_ipc::Limits;
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        runtime().block_on(async {
            for lend in [false, true] {
                let (bundles, conn, serving) =
                    bundled_rounds(super::sends_two_fds(), Limits::default(), lend).await;
                super::assert_three_over_two(
                    bundles.check(memfds(3), vec![1; 64 << 10], memfds(0)).await,
                );
                let got = bundles.check(memfds(0), vec![2; 64 << 10], memfds(0)).await;
                assert_eq!(got.unwrap(), (0, 64 << 10), "lend {lend}");
                assert_ne!(
                    conn.release_shared_memory(),
                    0,
                    "through the region, lend {lend}"
                );
                finish_bundles(bundles, conn, serving).await;
            }
        });
        before.assert_nothing_new();
    }

    /// [`super::a_message_with_all_the_fds_the_peer_accepts_still_carries_a_large_string`],
    /// async.
    #[test]
    fn a_message_with_all_the_fds_the_peer_accepts_still_carries_a_large_string() {
        use typed_ipc::Limits;
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        runtime().block_on(async {
            for lend in [false, true] {
                let (bundles, conn, serving) =
                    bundled_rounds(Limits::default(), super::accepts_two_fds(), lend).await;
                let got = bundles.check(memfds(1), vec![2; 64 << 10], memfds(0)).await;
                assert_eq!(got.unwrap(), (1, 64 << 10), "lend {lend}");
                assert_ne!(
                    conn.release_shared_memory(),
                    0,
                    "through the region beside one fd, lend {lend}"
                );
                finish_bundles(bundles, conn, serving).await;
            }
        });
        before.assert_nothing_new();
    }

    /// [`super::Parcels`], async.
    #[interface]
    pub trait Parcels {
        async fn check(&self, files: Vec<OwnedFd>, data: Vec<u8>) -> (u32, u64);
        async fn check_shared(&self, files: Vec<OwnedFd>, data: SharedBytes) -> (u32, u64);
        async fn make(&self, n: u32, len: u64) -> super::Parcel;
    }

    struct ParcelsImpl;

    impl Parcels for ParcelsImpl {
        async fn check(&self, files: Vec<OwnedFd>, data: Vec<u8>) -> (u32, u64) {
            (files.len() as u32, data.len() as u64)
        }
        async fn check_shared(&self, files: Vec<OwnedFd>, data: SharedBytes) -> (u32, u64) {
            (files.len() as u32, data.len() as u64)
        }
        async fn make(&self, n: u32, len: u64) -> super::Parcel {
            let files = (0..n).map(|_| memfd(b"made")).collect();
            super::Parcel {
                files,
                data: vec![7; len as usize],
            }
        }
    }

    /// [`super::child_parcels`], async.
    #[test]
    #[ignore = "run as a child process by other tests"]
    fn child_async_parcels() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let conn = AsyncConnection::new(worker_socket()).unwrap();
            conn.lend_pages_to_peer(true);
            ParcelsServer::new(ParcelsImpl).serve(conn).await.unwrap();
        });
    }

    /// [`super::one_fd_and_a_large_string_cross_to_a_process_that_accepts_one`], async.
    #[test]
    fn one_fd_and_a_large_string_cross_to_a_process_that_accepts_one() {
        use typed_ipc::Limits;
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        let one = Limits {
            max_fds: 1,
            ..Limits::default()
        };
        runtime().block_on(async {
            for (parent, worker_fds) in [(Limits::default(), Some(1)), (one, None)] {
                let command = spawn("bundles::asynchronous::child_async_parcels", worker_fds);
                let (mut worker, conn) =
                    typed_ipc::tokio::worker::spawn_with_limits(command, parent).unwrap();
                conn.lend_pages_to_peer(true);
                let parcels = ParcelsClient::new(conn.clone());
                let whose = format!("parent {}, worker {worker_fds:?}", parent.max_fds);
                for round in 0..2 {
                    for len in super::PARCEL_SIZES {
                        let at = format!("{whose}, round {round}, {len} bytes");
                        let got = parcels.check(memfds(1), vec![1; len]).await;
                        assert_eq!(got.unwrap(), (1, len as u64), "{at}");
                        let shared = SharedBytes::from(vec![2; len]);
                        let got = parcels.check_shared(memfds(1), shared).await;
                        assert_eq!(got.unwrap(), (1, len as u64), "shared, {at}");
                        let made = parcels.make(1, len as u64).await.unwrap();
                        assert_eq!((made.files.len(), made.data.len()), (1, len), "made, {at}");
                        assert!(made.data.iter().all(|&b| b == 7), "made, {at}");
                    }
                }
                drop(parcels);
                conn.close();
                conn.wait_closed().await;
                let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
                assert_eq!(exit, Exit::Code(0), "{whose}");
            }
        });
        before.assert_nothing_new();
    }
}
