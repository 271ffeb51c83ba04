//! `Limits` across real processes, in both flavours: a message over the sender's own limits
//! fails on the sender, unsent; a reply over the caller's limits fails that call only; a
//! request over the server's limits is answered with a failure. In every case the connection
//! keeps working and no fd is left open.
//!
//! The worker is this test binary run again for one `#[ignore]`d test (`child_*`); it takes
//! its limits from the environment ([`MAX_FDS`]). Every test takes `fd_count_lock`, so the
//! fd counts see only its own.

mod common;

use std::os::fd::OwnedFd;

use common::{child, fd_count_lock, fd_snapshot, memfd, open_fds};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, Error, Limit, Limits, SharedBytes, Socket, interface};

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

/// [`child_files`] in a process that can open only 10 more fds than it has open.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_files_at_the_open_file_limit() {
    use nix::sys::resource::{Resource, setrlimit};
    let conn = Connection::new(worker_socket());
    let limit = open_fds() as u64 + 10;
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit).unwrap();
    conn.serve(FilesServer::new(FilesImpl)).unwrap();
}

/// A request whose fds the server's kernel dropped (the server at its `RLIMIT_NOFILE`) fails
/// with an error that says so of the server: the caller's own limit is not the one to raise,
/// and the arguments' types are not in question.
#[test]
fn a_request_whose_fds_the_server_could_not_receive_says_whose_limit_it_hit() {
    let _fds = fd_count_lock();
    let (worker, conn) = Worker::spawn(child("child_files_at_the_open_file_limit")).unwrap();
    let files = FilesClient::new(conn);
    match files.count(memfds(40)) {
        Err(Error::Remote(why)) => {
            assert!(why.contains("open-file limit"), "{why}");
            assert!(!why.contains("this process"), "{why}");
            assert!(!why.contains("decode"), "{why}");
            assert!(!why.contains("definitions of its types"), "{why}");
        }
        other => panic!("expected Error::Remote, got {other:?}"),
    }
    assert_eq!(
        files.count(memfds(2)).unwrap(),
        2,
        "the connection still works"
    );
    hang_up(worker, files);
}

/// A blocking parent and its worker, with the worker's limits as given.
fn blocking_worker(max_fds: Option<usize>) -> (Worker, FilesClient) {
    let (worker, conn) = Worker::spawn(spawn("child_files", max_fds)).unwrap();
    (worker, FilesClient::new(conn))
}

fn hang_up(mut worker: Worker, files: FilesClient) {
    files.connection().close();
    assert_eq!(
        worker.wait().unwrap(),
        Exit::Code(0),
        "the worker served to the end"
    );
}

#[test]
fn too_many_fds_fail_the_call_on_the_sender_and_the_connection_keeps_working() {
    let _fds = fd_count_lock();
    room_for_fds(2100);
    let (worker, files) = blocking_worker(None);
    assert_eq!(files.count(memfds(1)).unwrap(), 1);
    let before = fd_snapshot();
    let refused = files.count(memfds(2000));
    assert!(
        matches!(
            refused,
            Err(Error::TooManyFds {
                count: 2000,
                limit: 1024,
                which: Limit::MaxFds,
                by_peer: false,
                ..
            })
        ),
        "{refused:?}"
    );
    let refused = files.take(memfds(2000));
    assert!(
        matches!(
            refused,
            Err(Error::TooManyFds {
                count: 2000,
                limit: 1024,
                which: Limit::MaxFds,
                by_peer: false,
                ..
            })
        ),
        "{refused:?}"
    );
    before.assert_nothing_new();
    assert_eq!(
        files.count(memfds(3)).unwrap(),
        3,
        "the connection still works"
    );
    assert_eq!(files.count(memfds(1024)).unwrap(), 1024, "up to the limit");
    before.assert_nothing_new();
    hang_up(worker, files);
}

#[test]
fn a_reply_over_the_callers_limit_fails_that_call_only() {
    let _fds = fd_count_lock();
    room_for_fds(2100);
    // The worker may send (and receive) up to 4096 fds; this side takes 1024.
    let (worker, files) = blocking_worker(Some(4096));
    assert_eq!(files.make(1).unwrap().len(), 1);
    let before = fd_snapshot();
    let refused = files.make(2000);
    assert!(
        matches!(
            refused,
            Err(Error::TooManyFds {
                count: 2000,
                limit: 1024,
                which: Limit::MaxFds,
                by_peer: false,
                ..
            })
        ),
        "{refused:?}"
    );
    before.assert_nothing_new();
    assert_eq!(files.make(3).unwrap().len(), 3, "the next call works");
    assert_eq!(files.count(memfds(2)).unwrap(), 2);
    assert!(!files.connection().is_closed());
    before.assert_nothing_new();
    hang_up(worker, files);
}

#[test]
fn a_request_over_the_servers_limit_is_answered_with_a_failure() {
    let _fds = fd_count_lock();
    // The worker takes at most 8 fds; this side sends up to 1024.
    let (worker, files) = blocking_worker(Some(8));
    assert_eq!(files.count(memfds(8)).unwrap(), 8);
    let before = fd_snapshot();
    // The caller is told it was the server's limit, as a match on `TooManyFds` expects; the
    // method did not run.
    match files.count(memfds(10)) {
        Err(
            e @ Error::TooManyFds {
                count: 10,
                limit: 8,
                which: Limit::MaxFds,
                by_peer: true,
                ..
            },
        ) => assert_eq!(
            e.to_string(),
            "message carries 10 file descriptors, over the peer's Limits::max_fds (8)"
        ),
        other => panic!("expected the server's refusal, got {other:?}"),
    }
    before.assert_nothing_new();
    // A oneway over the server's limits goes out, and is dropped there (and said on its
    // stderr): the server keeps serving all the same.
    files.take(memfds(10)).unwrap();
    assert_eq!(
        files.count(memfds(3)).unwrap(),
        3,
        "the server keeps serving"
    );
    hang_up(worker, files);
}

/// The same, with an async parent and an async worker.
#[cfg(feature = "tokio")]
mod asynchronous {
    use std::os::fd::OwnedFd;

    use typed_ipc::tokio::AsyncConnection;
    use typed_ipc::worker::{Exit, Worker};
    use typed_ipc::{Error, Limit, SharedBytes, interface};

    use super::{fd_count_lock, fd_snapshot, memfd, memfds, room_for_fds, spawn, worker_socket};

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

    fn runtime() -> tokio::runtime::Runtime {
        super::common::two_worker_runtime()
    }

    fn async_worker(max_fds: Option<usize>) -> (Worker, FilesClient) {
        let command = spawn("asynchronous::child_async_files", max_fds);
        let (worker, conn) = typed_ipc::tokio::worker::spawn(command).unwrap();
        (worker, FilesClient::new(conn))
    }

    async fn hang_up(mut worker: Worker, files: FilesClient) {
        let conn = files.connection().clone();
        drop(files);
        conn.close();
        conn.wait_closed().await;
        let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
        assert_eq!(exit, Exit::Code(0), "the worker served to the end");
    }

    #[test]
    fn too_many_fds_fail_the_call_on_the_sender_and_the_connection_keeps_working() {
        let _fds = fd_count_lock();
        room_for_fds(2100);
        runtime().block_on(async {
            let (worker, files) = async_worker(None);
            assert_eq!(files.count(memfds(1)).await.unwrap(), 1);
            let before = fd_snapshot();
            let refused = files.count(memfds(2000)).await;
            assert!(
                matches!(
                    refused,
                    Err(Error::TooManyFds {
                        count: 2000,
                        limit: 1024,
                        which: Limit::MaxFds,
                        by_peer: false,
                        ..
                    })
                ),
                "{refused:?}"
            );
            let refused = files.take(memfds(2000)).await;
            assert!(
                matches!(
                    refused,
                    Err(Error::TooManyFds {
                        count: 2000,
                        limit: 1024,
                        which: Limit::MaxFds,
                        by_peer: false,
                        ..
                    })
                ),
                "{refused:?}"
            );
            before.assert_nothing_new();
            assert_eq!(files.count(memfds(3)).await.unwrap(), 3);
            assert_eq!(
                files.count(memfds(1024)).await.unwrap(),
                1024,
                "up to the limit"
            );
            before.assert_nothing_new();
            hang_up(worker, files).await;
        });
    }

    #[test]
    fn a_reply_over_the_callers_limit_fails_that_call_only() {
        let _fds = fd_count_lock();
        room_for_fds(2100);
        runtime().block_on(async {
            let (worker, files) = async_worker(Some(4096));
            assert_eq!(files.make(1).await.unwrap().len(), 1);
            let before = fd_snapshot();
            let refused = files.make(2000).await;
            assert!(
                matches!(
                    refused,
                    Err(Error::TooManyFds {
                        count: 2000,
                        limit: 1024,
                        which: Limit::MaxFds,
                        by_peer: false,
                        ..
                    })
                ),
                "{refused:?}"
            );
            before.assert_nothing_new();
            assert_eq!(files.make(3).await.unwrap().len(), 3, "the next call works");
            assert_eq!(files.count(memfds(2)).await.unwrap(), 2);
            assert!(!files.connection().is_closed());
            before.assert_nothing_new();
            hang_up(worker, files).await;
        });
    }

    #[test]
    fn a_request_over_the_servers_limit_is_answered_with_a_failure() {
        let _fds = fd_count_lock();
        runtime().block_on(async {
            let (worker, files) = async_worker(Some(8));
            assert_eq!(files.count(memfds(8)).await.unwrap(), 8);
            let before = fd_snapshot();
            match files.count(memfds(10)).await {
                Err(Error::TooManyFds {
                    count: 10,
                    limit: 8,
                    which: Limit::MaxFds,
                    by_peer: true,
                    ..
                }) => {}
                other => panic!("expected the server's refusal, got {other:?}"),
            }
            before.assert_nothing_new();
            files.take(memfds(10)).await.unwrap();
            assert_eq!(
                files.count(memfds(3)).await.unwrap(),
                3,
                "the server keeps serving"
            );
            hang_up(worker, files).await;
        });
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

    /// [`super::a_failure_that_cannot_be_sent_for_a_refused_request_ends_the_connection`],
    /// async.
    #[test]
    fn a_failure_that_cannot_be_sent_for_a_refused_request_ends_the_connection() {
        use typed_ipc::Limits;
        let _fds = fd_count_lock();
        runtime().block_on(async {
            let server = Limits {
                max_message_len: 100,
                max_send_len: Some(30),
                ..Limits::default()
            };
            let (strings, (conn, serving)) = strings_between(Limits::default(), server, false);
            let strings = strings.with_timeout(std::time::Duration::from_secs(60)); // a guard
            let refused = strings.echo(vec![7; 200]).await;
            assert!(matches!(refused, Err(Error::Disconnected)), "{refused:?}");
            drop((strings, conn));
            let served = serving.await.unwrap();
            assert!(
                matches!(&served, Err(Error::Io(e)) if e.to_string().contains("answered")),
                "{served:?}"
            );
        });
    }

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
            super::common::read_all(image)
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
        use super::{PIPED_LEN, REGION_LEN, assert_no_fd_taken, common, fd_snapshot};
        let _fds = fd_count_lock();
        runtime().block_on(async {
            for lend in [false, true] {
                let command = super::child("asynchronous::child_async_images");
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
                let mut command = spawn("asynchronous::child_async_sums_sending_little", max_fds);
                command
                    .env("TYPED_IPC_DEBUG", "1")
                    .stderr(std::process::Stdio::piped());
                let (mut worker, conn) = typed_ipc::tokio::worker::spawn(command).unwrap();
                let trace = super::read_on_a_thread(worker.take_stderr().expect("piped"));
                conn.lend_pages_to_peer(true);
                let sums = SumsClient::new(conn.clone());
                for len in super::SUMMED_SIZES {
                    let data = super::common::filled(len, len as u64);
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

    /// A client and a server of [`Strings`] (a task) whose sockets have these limits; the
    /// client lends its pages if `lend`.
    fn strings_between(
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
    type Served = (
        AsyncConnection,
        tokio::task::JoinHandle<typed_ipc::Result<()>>,
    );

    /// Hangs up `strings` and waits until its server is done.
    async fn finish(strings: StringsClient, (conn, serving): Served) {
        drop(strings);
        conn.close();
        conn.wait_closed().await;
        serving.await.unwrap().unwrap();
    }

    /// [`super::a_byte_string_out_of_the_socket_over_the_receivers_limit_is_too_large`],
    /// async: the server's refusal of a request's string in its region, or its pipe, and the
    /// client's of a reply's.
    #[test]
    fn a_byte_string_out_of_the_socket_over_the_receivers_limit_is_too_large() {
        use typed_ipc::Limits;
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        runtime().block_on(async {
            // The requests, as the server's refusal (in its region, or its pipe), then the
            // reply, as the client's.
            for (server_limit, lend) in [(100 << 10, false), (100 << 10, true), (1 << 30, false)] {
                let limits = |max_message_len| Limits {
                    max_message_len,
                    ..Limits::default()
                };
                let (strings, served) =
                    strings_between(limits(300 << 10), limits(server_limit), lend);
                assert_eq!(strings.echo(vec![1; 10]).await.unwrap(), vec![1; 10]);
                if server_limit < 200 << 10 {
                    let pipes = super::common::fds_named("pipe:");
                    super::assert_too_large(
                        strings.echo(vec![2; 200 << 10]).await,
                        204_800,
                        102_400,
                        true,
                        &format!("lend {lend}"),
                    );
                    let piped = super::common::fds_named("pipe:") > pipes;
                    assert_eq!(piped, lend, "piped if lent");
                    let after = strings.echo(vec![3; 50 << 10]).await;
                    assert_eq!(after.unwrap(), vec![3; 50 << 10]);
                } else {
                    super::assert_too_large(
                        strings.make(400 << 10).await,
                        409_600,
                        307_200,
                        false,
                        "the reply",
                    );
                    assert_eq!(strings.make(250 << 10).await.unwrap(), vec![9; 250 << 10]);
                }
                finish(strings, served).await;
            }
        });
        before.assert_nothing_new();
    }

    /// [`super::byte_strings_cross_to_an_end_whose_limits_allow_no_fds`], async.
    #[test]
    fn byte_strings_cross_to_an_end_whose_limits_allow_no_fds() {
        use typed_ipc::Limits;
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        runtime().block_on(async {
            for (client, server) in [(1024, 0), (0, 1024)] {
                for lend in [false, true] {
                    let limits = |max_fds| Limits {
                        max_fds,
                        ..Limits::default()
                    };
                    let (strings, served) = strings_between(limits(client), limits(server), lend);
                    for round in 0..3 {
                        for len in super::OUT_OF_LINE_SIZES {
                            let data = vec![round as u8 + 1; len];
                            let got = strings.echo(data.clone()).await;
                            assert!(
                                got.as_ref().is_ok_and(|got| *got == data),
                                "fds {client}/{server}, lend {lend}, round {round}, {len} \
                                 bytes: {:?}",
                                got.map(|got| got.len())
                            );
                        }
                    }
                    finish(strings, served).await;
                }
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
                let command = spawn("asynchronous::child_async_parcels", worker_fds);
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
        let command = child("child_images");
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

/// A [`Strings`] client, and the thread serving it.
type Served = (
    StringsClient,
    std::thread::JoinHandle<typed_ipc::Result<()>>,
);

/// A connection whose ends accept at most `client` and `server` bytes a message, serving
/// [`Strings`] on a thread, and ready to move byte strings through shared regions (and the
/// client's pipe, if it lends its pages).
fn strings_with_limits(client: usize, server: usize, lend: bool) -> Served {
    let limits = |max_message_len| Limits {
        max_message_len,
        ..Limits::default()
    };
    let (strings, server) = strings_between(limits(client), limits(server), lend);
    // An end places strings in its region once the peer's messages say it reads them: one
    // small call each way, so that the strings below take the region, not the socket.
    assert_eq!(strings.echo(vec![0; 10]).unwrap(), vec![0; 10]);
    (strings, server)
}

#[test]
fn byte_strings_within_the_limits_cross_whatever_region_they_come_in() {
    let _fds = fd_count_lock();
    // Limits below the shared region's smallest size (64 KiB): a string within them, large
    // enough to go through the region (1 KiB), still crosses both ways.
    let (strings, server) = strings_with_limits(4096, 4096, false);
    assert_eq!(strings.echo(vec![7; 3000]).unwrap(), vec![7; 3000]);
    drop(strings);
    server.join().unwrap().unwrap();

    // A server that accepts less than its client: a string over its limits fails that call
    // only, although the client's region grew for it past what the server accepts.
    let (strings, server) = strings_with_limits(1 << 30, 100 << 10, false);
    assert_eq!(strings.echo(vec![1; 2048]).unwrap(), vec![1; 2048]);
    // The caller is told it was the server's limit, as for a message over it that came
    // through the socket, not that the ends disagree on types.
    match strings.echo(vec![2; 200 << 10]) {
        Err(
            e @ Error::TooLarge {
                size: 204_800,
                limit: 102_400,
                which: Limit::MaxMessageLen,
                by_peer: true,
                ..
            },
        ) => assert_eq!(
            e.to_string(),
            "message of 204800 bytes, over the peer's Limits::max_message_len (102400 bytes)"
        ),
        other => panic!("expected the server's refusal, got {other:?}"),
    }
    assert_eq!(strings.echo(vec![3; 2048]).unwrap(), vec![3; 2048]);
    assert_eq!(strings.echo(vec![4; 50 << 10]).unwrap(), vec![4; 50 << 10]);
    drop(strings);
    server.join().unwrap().unwrap();
}

/// Fails unless `got` is `TooLarge` of `size` bytes over `limit`, `Limits::max_message_len`,
/// the peer's if `by_peer`; `context` starts the failure's message.
fn assert_too_large<T: std::fmt::Debug>(
    got: Result<T, Error>,
    size: u64,
    limit: u64,
    by_peer: bool,
    context: &str,
) {
    match got {
        Err(Error::TooLarge {
            size: s,
            limit: l,
            which: Limit::MaxMessageLen,
            by_peer: p,
            ..
        }) if (s, l, p) == (size, limit, by_peer) => {}
        other => panic!("{context}: expected TooLarge {size} over {limit}, got {other:?}"),
    }
}

/// A byte string that travels out of the socket (through the sender's shared region, or its
/// pipe when it lends its pages) and is over the receiver's limit fails its call as
/// `TooLarge`, as a message over them that came through the socket: `by_peer` when the
/// server refused the request (its method did not run), not when the client refused the
/// reply. Both ends keep working.
#[test]
fn a_byte_string_out_of_the_socket_over_the_receivers_limit_is_too_large() {
    let _fds = fd_count_lock();
    for lend in [false, true] {
        let (strings, server) = strings_with_limits(300 << 10, 100 << 10, lend);
        let pipes = common::fds_named("pipe:");
        assert_too_large(
            strings.echo(vec![2; 200 << 10]),
            204_800,
            102_400,
            true,
            &format!("lend {lend}"),
        );
        assert_eq!(common::fds_named("pipe:") > pipes, lend, "piped if lent");
        assert_eq!(strings.echo(vec![3; 50 << 10]).unwrap(), vec![3; 50 << 10]);
        drop(strings);
        server.join().unwrap().unwrap();
    }
    // A reply goes through the server's region (replies never pipe), which its limits allow
    // and the client's do not.
    let (strings, server) = strings_with_limits(300 << 10, 1 << 30, false);
    assert_too_large(
        strings.make(400 << 10),
        409_600,
        307_200,
        false,
        "the reply",
    );
    assert_eq!(strings.make(250 << 10).unwrap(), vec![9; 250 << 10]);
    drop(strings);
    server.join().unwrap().unwrap();
}

#[test]
fn a_byte_string_over_the_senders_limits_fails_unsent_with_too_large() {
    let _fds = fd_count_lock();
    let (strings, server) = strings_with_limits(4096, 1 << 30, false);
    // Over this side's limits: refused before it is sent, as any message over them, although
    // it would have travelled through the shared region rather than the socket.
    // With no `max_send_len`, what it sends is bounded by its `max_message_len`.
    match strings.echo(vec![7; 5000]) {
        Err(Error::TooLarge {
            limit: 4096,
            which: Limit::MaxMessageLen,
            by_peer: false,
            ..
        }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(strings.echo(vec![1; 2000]).unwrap(), vec![1; 2000]);
    drop(strings);
    server.join().unwrap().unwrap();
}

/// A server that cannot send even the failure it owes for a request it refused on receipt
/// (its own `max_send_len` is below the failure's size) ends the connection: its caller is
/// told at once, and does not wait for good for an answer that cannot come.
#[test]
fn a_failure_that_cannot_be_sent_for_a_refused_request_ends_the_connection() {
    let _fds = fd_count_lock();
    let client = Limits::default();
    let server = Limits {
        max_message_len: 100,
        max_send_len: Some(30),
        ..Limits::default()
    };
    let (strings, server) = strings_between(client, server, false);
    let strings = strings.with_timeout(std::time::Duration::from_secs(60)); // a hang guard
    let refused = strings.echo(vec![7; 200]);
    assert!(matches!(refused, Err(Error::Disconnected)), "{refused:?}");
    drop(strings);
    let served = server.join().unwrap();
    assert!(
        matches!(&served, Err(Error::Io(e)) if e.to_string().contains("could not be answered")),
        "{served:?}"
    );
}

/// A string over the server's limit comes in a region announced with it (the client's grew
/// for it): the server refuses the call unread, so the client takes it to map its old region
/// still, and names that one when it gives its memory back. The server must not have swapped
/// its view of the old region for the new one to find the string over its limit.
#[test]
fn shared_memory_released_after_a_string_over_the_peers_limit_goes_at_both_ends() {
    let _fds = fd_count_lock();
    let (strings, server) = strings_with_limits(1 << 30, 100 << 10, false);
    assert_eq!(strings.echo(vec![1; 2048]).unwrap(), vec![1; 2048]);
    // Each end's region (64 KiB) and its view of the other's.
    assert_eq!(common::regions(), 4);
    assert_too_large(
        strings.echo(vec![2; 200 << 10]),
        204_800,
        102_400,
        true,
        "over the server's limit",
    );
    let client = strings.connection();
    assert_eq!(client.release_shared_memory(), 256 << 10);
    // The server has taken in the announcement once it answers the next call (one thread
    // serves it, in order); that reply crosses inline.
    assert_eq!(strings.echo(vec![3; 10]).unwrap(), vec![3; 10]);
    assert_eq!(
        (common::regions(), common::memfd_mappings()),
        (2, 2),
        "only the server's region and the client's view of it are left"
    );
    drop(strings);
    server.join().unwrap().unwrap();
}

#[test]
fn byte_strings_cross_a_connection_whose_limits_allow_no_fds() {
    let _fds = fd_count_lock();
    let limits = Limits {
        max_fds: 0,
        ..Limits::default()
    };
    let (mut a, mut b) = Socket::pair().unwrap();
    a.set_limits(limits);
    b.set_limits(limits);
    let b = Connection::new(b);
    let server = std::thread::spawn(move || StringsServer::new(StringsImpl).serve(b));
    let strings = StringsClient::new(Connection::new(a));
    assert_eq!(strings.echo(vec![0; 10]).unwrap(), vec![0; 10]);
    // No fd in the call: the shared region's, which would carry it, must not make it one.
    for _ in 0..2 {
        assert_eq!(strings.echo(vec![5; 3000]).unwrap(), vec![5; 3000]);
    }
    drop(strings);
    server.join().unwrap().unwrap();
}

/// A connection whose client's socket accepts at most `client` fds a message and whose
/// server's at most `server`, serving [`Strings`] on a thread; the client lends its pages
/// (so a call's strings of 128 KiB to 1 MiB take the pipe) if `lend`.
fn strings_with_fds(client: usize, server: usize, lend: bool) -> Served {
    let limits = |max_fds| Limits {
        max_fds,
        ..Limits::default()
    };
    strings_between(limits(client), limits(server), lend)
}

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

/// Sizes that take every way a byte string goes out of line: the region (2 KiB, and
/// 64 KiB, its smallest size), the pipe if the client lends its pages (200 KiB), and a
/// region grown past the pipe's bound (2 MiB). Each a few times: every call must work,
/// the first ones as much as the later ones.
const OUT_OF_LINE_SIZES: [usize; 4] = [2 << 10, 64 << 10, 200 << 10, 2 << 20];

#[test]
fn byte_strings_cross_to_an_end_whose_limits_allow_no_fds() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    // (client, server): the server's socket takes no fds, then the client's, which would
    // each refuse a message that carries the region's or the pipe's fd.
    for (client, server) in [(1024, 0), (0, 1024)] {
        for lend in [false, true] {
            let (strings, handle) = strings_with_fds(client, server, lend);
            for round in 0..3 {
                for len in OUT_OF_LINE_SIZES {
                    let data = vec![round as u8 + 1; len];
                    let got = strings.echo(data.clone());
                    assert!(
                        got.as_ref().is_ok_and(|got| *got == data),
                        "fds {client}/{server}, lend {lend}, round {round}, {len} bytes: {:?}",
                        got.map(|got| got.len())
                    );
                }
            }
            drop(strings);
            handle.join().unwrap().unwrap();
        }
    }
    before.assert_nothing_new();
}

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
        let mut command = spawn("child_sums_sending_little", max_fds);
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
        let command = spawn("child_parcels", worker_fds);
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
