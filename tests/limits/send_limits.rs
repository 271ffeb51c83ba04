//! What a side sends apart from what it accepts (`max_send_len`, `max_send_fds`): more than it
//! accepts, fds when it accepts none, and calls with no room to send announcements.

use std::os::fd::OwnedFd;

use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, Error, Limit, Limits, SharedBytes, Socket, interface};

use crate::common::{child, fd_count_lock, fd_snapshot, memfd};
use crate::{MAX_FDS, checked, common, spawn, strings_between};

/// The most [`sends_more_than_it_accepts`] lets its client send.
const SENT_MAX: usize = 4 << 20;

/// Strings of every way out of a client that accepts 4 KiB and sends up to [`SENT_MAX`]:
/// inline, through its region or pipe (1 KiB up), and over several datagrams.
const SENT_SIZES: [usize; 4] = [3000, 200 << 10, 1 << 20, SENT_MAX - 13];

/// Limits for a client that accepts at most 4 KiB from its server but sends it up to
/// [`SENT_MAX`], and for a server that accepts anything.
fn sends_more_than_it_accepts() -> (Limits, Limits) {
    let client = Limits {
        max_message_len: 4096,
        max_send_len: Some(SENT_MAX),
        ..Limits::default()
    };
    (client, Limits::default())
}

/// Fails unless `got` is `TooLarge` over this side's `limit`, the setting `which` (whatever
/// the message's size, which counts its envelope).
fn assert_over<T: std::fmt::Debug>(
    got: Result<T, Error>,
    limit: usize,
    which: Limit,
    context: &str,
) {
    match got {
        Err(Error::TooLarge {
            limit: l,
            which: w,
            by_peer: false,
            ..
        }) if (l, w) == (limit as u64, which) => {}
        other => {
            panic!("{context}: expected TooLarge over this side's {which} ({limit}), got {other:?}")
        }
    }
}

/// A host that takes little back from a worker it does not trust may still send it large
/// requests (`Limits::max_send_len`): they cross, whichever way they go out; one over what it
/// sends is refused unsent, and a reply over what it accepts fails that call only.
#[test]
fn a_side_may_send_more_than_it_accepts() {
    let _fds = fd_count_lock();
    for lend in [false, true] {
        let (client, server) = sends_more_than_it_accepts();
        let (strings, server) = strings_between(client, server, lend);
        for (i, &len) in SENT_SIZES.iter().enumerate() {
            let byte = i as u8 + 1;
            let got = strings.check(vec![byte; len], byte).unwrap();
            assert_eq!(got, (len as u64, true), "{len} bytes, lend {lend}");
        }
        let unsent = strings.check(vec![1; SENT_MAX + 1], 1);
        assert_over(unsent, SENT_MAX, Limit::MaxSendLen, "unsent");
        assert_over(
            strings.make(8 << 10),
            4096,
            Limit::MaxMessageLen,
            "the reply",
        );
        drop(strings);
        server.join().unwrap().unwrap();
    }
}

/// What a host sends a worker it does not trust (a file, large images), and a file such a
/// worker would hand it back.
#[interface]
pub trait Images {
    /// What the file behind `image` holds, read through it.
    fn read(&self, image: OwnedFd) -> Vec<u8>;
    /// How many bytes `data` has, and whether each is `byte`.
    fn check(&self, data: Vec<u8>, byte: u8) -> (u64, bool);
    /// [`Images::check`] of shared bytes, which pipe once both ends lend their pages.
    fn check_shared(&self, data: SharedBytes, byte: u8) -> (u64, bool);
    /// `len` bytes: a reply large enough for the worker's region, were it the host's way.
    fn make(&self, len: u64) -> Vec<u8>;
    /// A file of the worker's.
    fn file(&self) -> OwnedFd;
}

struct ImagesImpl;

impl Images for ImagesImpl {
    fn read(&self, image: OwnedFd) -> Vec<u8> {
        common::read_all(image)
    }
    fn check(&self, data: Vec<u8>, byte: u8) -> (u64, bool) {
        checked(&data, byte)
    }
    fn check_shared(&self, data: SharedBytes, byte: u8) -> (u64, bool) {
        checked(&data, byte)
    }
    fn make(&self, len: u64) -> Vec<u8> {
        vec![9; len as usize]
    }
    fn file(&self) -> OwnedFd {
        memfd(b"from the worker")
    }
}

/// A worker serving [`Images`] with the default limits, trusting its parent with pipes.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_images() {
    let conn = worker::connection().unwrap();
    conn.lend_pages_to_peer(true);
    conn.serve(ImagesServer::new(ImagesImpl)).unwrap();
}

/// What a host sends its worker out of line: a string over the worker's memory (1 MiB), so
/// the host's region, and shared bytes for the host's pipe (128 KiB to 1 MiB).
const REGION_LEN: usize = 2 << 20;
const PIPED_LEN: usize = 512 << 10;

/// A host that accepts no fd from its worker, and little else, but sends it fds and large
/// strings (`Limits::max_send_fds`, `Limits::max_send_len`).
fn takes_no_fd_but_sends_some() -> Limits {
    Limits {
        max_message_len: 4096,
        max_fds: 0,
        max_send_len: Some(SENT_MAX),
        max_send_fds: Some(8),
        ..Limits::default()
    }
}

/// Fails unless `got` is `TooManyFds`: one fd over this side's limit of none.
fn assert_no_fd_taken<T: std::fmt::Debug>(got: Result<T, Error>, context: &str) {
    match got {
        Err(
            e @ Error::TooManyFds {
                count: 1,
                limit: 0,
                which: Limit::MaxFds,
                by_peer: false,
                ..
            },
        ) => assert_eq!(
            e.to_string(),
            "message carries 1 file descriptor, over Limits::max_fds (0)",
            "{context}"
        ),
        other => panic!("{context}: expected TooManyFds of 1 over this side's 0, got {other:?}"),
    }
}

/// A host that accepts no fd from a worker it does not trust still sends it fds (a file it
/// reads through) and large strings through its region and pipe (`Limits::max_send_fds`);
/// the worker's strings never come with an fd (its reply of 3 KiB, which its region would
/// carry to a host that took fds, crosses), and a file it returns fails that call, its fd
/// closed.
#[test]
fn a_side_may_send_fds_when_it_accepts_none() {
    let _fds = fd_count_lock();
    for lend in [false, true] {
        let command = child("send_limits::child_images");
        let (mut worker, conn) =
            Worker::spawn_with_limits(command, takes_no_fd_but_sends_some()).unwrap();
        conn.lend_pages_to_peer(lend);
        let images = ImagesClient::new(conn);
        let got = images.read(memfd(b"an image")).unwrap();
        assert_eq!(got, b"an image", "lend {lend}");
        let regions = common::regions();
        let got = images.check(vec![2; REGION_LEN], 2).unwrap();
        assert_eq!(got, (REGION_LEN as u64, true), "lend {lend}");
        assert!(
            common::regions() > regions,
            "through the host's region, lend {lend}"
        );
        let pipes = common::fds_named("pipe:");
        let shared = SharedBytes::from(vec![3; PIPED_LEN]);
        let got = images.check_shared(shared, 3).unwrap();
        assert_eq!(got, (PIPED_LEN as u64, true), "lend {lend}");
        assert_eq!(common::fds_named("pipe:") > pipes, lend, "piped if lent");
        assert_eq!(images.make(3000).unwrap(), vec![9; 3000], "lend {lend}");
        let before = fd_snapshot();
        assert_no_fd_taken(images.file(), &format!("lend {lend}"));
        before.assert_nothing_new();
        assert_eq!(
            images.read(memfd(b"after")).unwrap(),
            b"after",
            "still works"
        );
        images.connection().close();
        assert_eq!(
            worker.wait().unwrap(),
            Exit::Code(0),
            "the worker served to the end"
        );
    }
}

/// Sums of byte strings: a reply of 28 bytes, which a side sending at most 32 can send.
#[interface]
pub trait Sums {
    /// The bytes of `data`, added up.
    fn sum(&self, data: Vec<u8>) -> u32;
}

struct SumsImpl;

impl Sums for SumsImpl {
    fn sum(&self, data: Vec<u8>) -> u32 {
        sum(&data)
    }
}

fn sum(data: &[u8]) -> u32 {
    data.iter().fold(0u32, |sum, &b| sum.wrapping_add(b.into()))
}

/// The worker's end, sending at most 32 bytes a message (less than an announcement's 40),
/// accepting at most the fds the parent asked for ([`MAX_FDS`]), or the default.
fn little_sender_socket() -> Socket {
    let mut socket = worker::socket().unwrap();
    let max_fds =
        std::env::var(MAX_FDS).map_or(Limits::default().max_fds, |max| max.parse().unwrap());
    socket.set_limits(Limits {
        max_send_len: Some(32),
        max_fds,
        ..Limits::default()
    });
    socket
}

/// Fails unless `got` is the `TooLarge` of an announcement (40 bytes) over 32.
fn assert_no_room_to_announce(got: Result<(), Error>) {
    match got {
        Err(Error::TooLarge {
            size: 40,
            limit: 32,
            by_peer: false,
            ..
        }) => {}
        other => panic!("expected TooLarge of 40 bytes over 32, got {other:?}"),
    }
}

/// A worker serving [`Sums`] that sends at most 32 bytes a message: it cannot announce
/// that it accepts writes into its memory (which fails) nor that it trusts its parent with
/// pipes (dropped, as only its trace says).
#[test]
#[ignore = "run as a child process by other tests"]
fn child_sums_sending_little() {
    let conn = Connection::new(little_sender_socket());
    assert_no_room_to_announce(conn.accept_writes_from_peer());
    conn.lend_pages_to_peer(true);
    conn.serve(SumsServer::new(SumsImpl)).unwrap();
}

/// Inline, and sizes that would take the worker's pipe (if it could say it reads the
/// parent's) or its memory (if it could announce its inbox), and the region.
const SUMMED_SIZES: [usize; 5] = [16, 2 << 10, 64 << 10, 300 << 10, 2 << 20];

/// What `stderr` says until its end, read on a thread.
fn read_on_a_thread(mut stderr: std::process::ChildStderr) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut said = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut said).unwrap();
        said
    })
}

/// Fails unless the worker's trace says both its announcements did not go out.
fn assert_said_unsent(trace: &str, max_fds: Option<usize>) {
    let unsent = trace.matches("Announce not sent").count();
    assert_eq!(
        unsent, 2,
        "the trace says so of both announcements:\n{trace}"
    );
    // Nor the one of its fd limit, which a side whose limit is not the default sends as its
    // connection starts: the peer sends it every string inline instead.
    let told = trace.contains("Announce of its fd limit not sent");
    assert_eq!(told, max_fds == Some(2), "max_fds {max_fds:?}:\n{trace}");
}

/// A side whose `Limits::max_send_len` leaves no room for an announcement (40 bytes) does
/// without them: it cannot offer its peer its memory (`accept_writes_from_peer` fails with
/// `TooLarge`) nor its trust with pipes (dropped, which its trace says), and the peer's large
/// strings go through the peer's region, or inline to a side that takes no fds or cannot
/// tell the peer how many it takes (not the default). Every call works.
#[test]
fn calls_work_with_no_room_for_announcements() {
    let _fds = fd_count_lock();
    for max_fds in [None, Some(0), Some(2)] {
        let mut command = spawn("send_limits::child_sums_sending_little", max_fds);
        command
            .env("TYPED_IPC_DEBUG", "1")
            .stderr(std::process::Stdio::piped());
        let (mut worker, conn) = Worker::spawn(command).unwrap();
        let trace = read_on_a_thread(worker.take_stderr().expect("piped"));
        conn.lend_pages_to_peer(true);
        let sums = SumsClient::new(conn);
        for len in SUMMED_SIZES {
            let data = common::filled(len, len as u64);
            let got = sums.sum(data.clone());
            assert_eq!(got.unwrap(), sum(&data), "{len} bytes, {max_fds:?}");
        }
        sums.connection().close();
        assert_eq!(
            worker.wait().unwrap(),
            Exit::Code(0),
            "the worker served to the end"
        );
        assert_said_unsent(&trace.join().unwrap(), max_fds);
    }
}

/// The same, with an async parent and an async worker.
#[cfg(feature = "tokio")]
mod asynchronous {
    use std::os::fd::OwnedFd;

    use typed_ipc::tokio::AsyncConnection;
    use typed_ipc::worker::Exit;
    use typed_ipc::{Limit, SharedBytes, interface};

    use crate::asynchronous::{finish, runtime, strings_between};
    use crate::common::{fd_count_lock, fd_snapshot, memfd};
    use crate::spawn;

    /// [`super::a_side_may_send_more_than_it_accepts`], async.
    #[test]
    fn a_side_may_send_more_than_it_accepts() {
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        runtime().block_on(async {
            for lend in [false, true] {
                let (client, server) = super::sends_more_than_it_accepts();
                let (strings, served) = strings_between(client, server, lend);
                for (i, &len) in super::SENT_SIZES.iter().enumerate() {
                    let byte = i as u8 + 1;
                    let got = strings.check(vec![byte; len], byte).await.unwrap();
                    assert_eq!(got, (len as u64, true), "{len} bytes, lend {lend}");
                }
                let unsent = strings.check(vec![1; super::SENT_MAX + 1], 1).await;
                super::assert_over(unsent, super::SENT_MAX, Limit::MaxSendLen, "unsent");
                let reply = strings.make(8 << 10).await;
                super::assert_over(reply, 4096, Limit::MaxMessageLen, "the reply");
                finish(strings, served).await;
            }
        });
        before.assert_nothing_new();
    }

    /// [`super::Images`], async.
    #[interface]
    pub trait Images {
        /// What the file behind `image` holds, read through it.
        async fn read(&self, image: OwnedFd) -> Vec<u8>;
        /// How many bytes `data` has, and whether each is `byte`.
        async fn check(&self, data: Vec<u8>, byte: u8) -> (u64, bool);
        /// [`Images::check`] of shared bytes.
        async fn check_shared(&self, data: SharedBytes, byte: u8) -> (u64, bool);
        /// `len` bytes.
        async fn make(&self, len: u64) -> Vec<u8>;
        /// A file of the worker's.
        async fn file(&self) -> OwnedFd;
    }

    struct ImagesImpl;

    impl Images for ImagesImpl {
        async fn read(&self, image: OwnedFd) -> Vec<u8> {
            crate::common::read_all(image)
        }
        async fn check(&self, data: Vec<u8>, byte: u8) -> (u64, bool) {
            super::checked(&data, byte)
        }
        async fn check_shared(&self, data: SharedBytes, byte: u8) -> (u64, bool) {
            super::checked(&data, byte)
        }
        async fn make(&self, len: u64) -> Vec<u8> {
            vec![9; len as usize]
        }
        async fn file(&self) -> OwnedFd {
            memfd(b"from the worker")
        }
    }

    /// [`super::child_images`], async.
    #[test]
    #[ignore = "run as a child process by other tests"]
    fn child_async_images() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let conn = typed_ipc::tokio::worker::connection().unwrap();
            conn.lend_pages_to_peer(true);
            ImagesServer::new(ImagesImpl).serve(conn).await.unwrap();
        });
    }

    /// [`super::a_side_may_send_fds_when_it_accepts_none`], async.
    #[test]
    fn a_side_may_send_fds_when_it_accepts_none() {
        use super::{PIPED_LEN, REGION_LEN, assert_no_fd_taken};
        use crate::common::{self, fd_snapshot};
        let _fds = fd_count_lock();
        runtime().block_on(async {
            for lend in [false, true] {
                let command = super::child("send_limits::asynchronous::child_async_images");
                let limits = super::takes_no_fd_but_sends_some();
                let (mut worker, conn) =
                    typed_ipc::tokio::worker::spawn_with_limits(command, limits).unwrap();
                conn.lend_pages_to_peer(lend);
                let images = ImagesClient::new(conn.clone());
                let got = images.read(memfd(b"an image")).await.unwrap();
                assert_eq!(got, b"an image", "lend {lend}");
                let regions = common::regions();
                let got = images.check(vec![2; REGION_LEN], 2).await.unwrap();
                assert_eq!(got, (REGION_LEN as u64, true), "lend {lend}");
                assert!(
                    common::regions() > regions,
                    "through the host's region, lend {lend}"
                );
                let pipes = common::fds_named("pipe:");
                let shared = SharedBytes::from(vec![3; PIPED_LEN]);
                let got = images.check_shared(shared, 3).await.unwrap();
                assert_eq!(got, (PIPED_LEN as u64, true), "lend {lend}");
                assert_eq!(common::fds_named("pipe:") > pipes, lend, "piped if lent");
                let made = images.make(3000).await.unwrap();
                assert_eq!(made, vec![9; 3000], "lend {lend}");
                let before = fd_snapshot();
                assert_no_fd_taken(images.file().await, &format!("lend {lend}"));
                before.assert_nothing_new();
                let after = images.read(memfd(b"after")).await.unwrap();
                assert_eq!(after, b"after", "still works");
                drop(images);
                conn.close();
                conn.wait_closed().await;
                let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
                assert_eq!(exit, Exit::Code(0), "the worker served to the end");
            }
        });
    }

    /// [`super::Sums`], async.
    #[interface]
    pub trait Sums {
        async fn sum(&self, data: Vec<u8>) -> u32;
    }

    struct SumsImpl;

    impl Sums for SumsImpl {
        async fn sum(&self, data: Vec<u8>) -> u32 {
            super::sum(&data)
        }
    }

    /// [`super::child_sums_sending_little`], async.
    #[test]
    #[ignore = "run as a child process by other tests"]
    fn child_async_sums_sending_little() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let conn = AsyncConnection::new(super::little_sender_socket()).unwrap();
            super::assert_no_room_to_announce(conn.accept_writes_from_peer());
            conn.lend_pages_to_peer(true);
            SumsServer::new(SumsImpl).serve(conn).await.unwrap();
        });
    }

    /// [`super::calls_work_with_no_room_for_announcements`], async.
    #[test]
    fn calls_work_with_no_room_for_announcements() {
        let _fds = fd_count_lock();
        runtime().block_on(async {
            for max_fds in [None, Some(0), Some(2)] {
                let mut command = spawn(
                    "send_limits::asynchronous::child_async_sums_sending_little",
                    max_fds,
                );
                command
                    .env("TYPED_IPC_DEBUG", "1")
                    .stderr(std::process::Stdio::piped());
                let (mut worker, conn) = typed_ipc::tokio::worker::spawn(command).unwrap();
                let trace = super::read_on_a_thread(worker.take_stderr().expect("piped"));
                conn.lend_pages_to_peer(true);
                let sums = SumsClient::new(conn.clone());
                for len in super::SUMMED_SIZES {
                    let data = crate::common::filled(len, len as u64);
                    let got = sums.sum(data.clone()).await;
                    assert_eq!(got.unwrap(), super::sum(&data), "{len} bytes, {max_fds:?}");
                }
                drop(sums);
                conn.close();
                let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
                assert_eq!(exit, Exit::Code(0), "the worker served to the end");
                super::assert_said_unsent(&trace.join().unwrap(), max_fds);
            }
        });
    }
}
