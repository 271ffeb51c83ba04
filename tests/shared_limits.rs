//! `Limits::max_shared_len` across real processes, in both flavours: a `SealedBuffer` or
//! `RegionView` of the limit's size passes; one a byte larger fails its call with
//! `Error::TooLarge` (`by_peer` for a request, which the method never saw), its fd is closed on
//! the side that refused it, and the next call works. Requests are refused by the worker's
//! limit, replies by the parent's.
//!
//! The worker is this test binary run again for one `#[ignore]`d test (`child_*`), with its
//! limit from the environment ([`MAX_SHARED`]). Every test takes `fd_count_lock`, so the fd
//! counts see only its own.

mod common;

use common::{child, fd_count_lock, open_fds};
use typed_ipc::shared_buffer::{SealedBuffer, SharedBuffer};
use typed_ipc::shared_region::{RegionView, SharedRegion};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, Error, Limit, Limits, Socket};

/// The worker's `Limits::max_shared_len`.
const MAX_SHARED: &str = "TYPED_IPC_TEST_MAX_SHARED";

/// The limit both ends take in these tests.
const LIMIT: usize = 1 << 20;

mod blocking {
    use typed_ipc::shared_buffer::SealedBuffer;
    use typed_ipc::shared_region::RegionView;

    /// Shared memory both ways.
    #[typed_ipc::interface]
    pub trait Buffers {
        /// The buffer's length.
        fn measure(&self, buffer: SealedBuffer) -> u64;
        /// The region's length.
        fn measure_region(&self, region: RegionView) -> u64;
        /// A sealed buffer of `len` bytes.
        fn make(&self, len: u64) -> SealedBuffer;
        /// A region of `len` bytes.
        fn make_region(&self, len: u64) -> RegionView;
        /// Fds this process has open.
        fn open_fds(&self) -> u64;
        /// Takes the buffer, and nothing else.
        #[oneway]
        fn take(&self, buffer: SealedBuffer);
    }
}

#[cfg(feature = "tokio")]
mod asynchronous {
    use typed_ipc::shared_buffer::SealedBuffer;
    use typed_ipc::shared_region::RegionView;

    #[typed_ipc::interface]
    pub trait Buffers {
        async fn measure(&self, buffer: SealedBuffer) -> u64;
        async fn measure_region(&self, region: RegionView) -> u64;
        async fn make(&self, len: u64) -> SealedBuffer;
        async fn make_region(&self, len: u64) -> RegionView;
        async fn open_fds(&self) -> u64;
        #[oneway]
        async fn take(&self, buffer: SealedBuffer);
    }
}

fn sealed(len: usize) -> SealedBuffer {
    SharedBuffer::new(len).unwrap().seal().unwrap()
}

/// A view of a new region of `len` bytes; the region itself (the writer's side) is dropped,
/// the view keeps the memfd.
fn region(len: usize) -> RegionView {
    SharedRegion::new(len).unwrap().view().unwrap()
}

struct BuffersImpl;

impl blocking::Buffers for BuffersImpl {
    fn measure(&self, buffer: SealedBuffer) -> u64 {
        buffer.len() as u64
    }
    fn measure_region(&self, region: RegionView) -> u64 {
        region.len() as u64
    }
    fn make(&self, len: u64) -> SealedBuffer {
        sealed(len as usize)
    }
    fn make_region(&self, len: u64) -> RegionView {
        region(len as usize)
    }
    fn open_fds(&self) -> u64 {
        open_fds() as u64
    }
    fn take(&self, _buffer: SealedBuffer) {}
}

#[cfg(feature = "tokio")]
impl asynchronous::Buffers for BuffersImpl {
    async fn measure(&self, buffer: SealedBuffer) -> u64 {
        buffer.len() as u64
    }
    async fn measure_region(&self, region: RegionView) -> u64 {
        region.len() as u64
    }
    async fn make(&self, len: u64) -> SealedBuffer {
        sealed(len as usize)
    }
    async fn make_region(&self, len: u64) -> RegionView {
        region(len as usize)
    }
    async fn open_fds(&self) -> u64 {
        open_fds() as u64
    }
    async fn take(&self, _buffer: SealedBuffer) {}
}

/// The default limits, but for `max_shared_len`.
fn limits(max_shared_len: usize) -> Limits {
    Limits {
        max_shared_len,
        ..Limits::default()
    }
}

fn limited(mut socket: Socket, max_shared_len: usize) -> Socket {
    socket.set_limits(limits(max_shared_len));
    socket
}

/// Hangs up on the worker, which then exits cleanly.
#[cfg(feature = "tokio")]
async fn hang_up_and_reap(conn: &typed_ipc::tokio::AsyncConnection, worker: &mut Worker) {
    conn.close();
    assert_eq!(
        typed_ipc::tokio::worker::wait(worker).await.unwrap(),
        Exit::Code(0)
    );
}

/// The worker's socket, with the limit the parent asked for.
fn worker_socket() -> Socket {
    let max = std::env::var(MAX_SHARED).unwrap().parse().unwrap();
    limited(worker::socket().unwrap(), max)
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_buffers() {
    let conn = Connection::new(worker_socket());
    conn.serve(blocking::BuffersServer::new(BuffersImpl))
        .unwrap();
}

#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_async_buffers() {
    common::current_thread_runtime().block_on(async {
        let conn = typed_ipc::tokio::AsyncConnection::new(worker_socket()).unwrap();
        asynchronous::BuffersServer::new(BuffersImpl)
            .serve(conn)
            .await
            .unwrap();
    });
}

/// Starts the worker `name` with `LIMIT` as its limit, and gives this side's socket `LIMIT`
/// as its own.
fn spawn(name: &str) -> (Worker, Socket) {
    let mut command = child(name);
    command.env(MAX_SHARED, LIMIT.to_string());
    let (worker, socket) = Worker::spawn_socket(command).unwrap();
    (worker, limited(socket, LIMIT))
}

/// `spawn` with the worker's stderr in a file of its own (named after `name` and this process),
/// for a test to read what the worker reported; the file is gone once read.
fn spawn_reporting(name: &str) -> (Worker, Socket, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("{name}-{}.stderr", std::process::id()));
    let mut command = child(name);
    command.env(MAX_SHARED, LIMIT.to_string());
    command.stderr(std::fs::File::create(&path).unwrap());
    let (worker, socket) = Worker::spawn_socket(command).unwrap();
    (worker, limited(socket, LIMIT), path)
}

/// What the worker reported on stderr (see `spawn_reporting`).
fn reported(path: &std::path::Path) -> String {
    let report = std::fs::read_to_string(path).unwrap();
    std::fs::remove_file(path).unwrap();
    report
}

/// Whether `report` (a worker's stderr) says that a oneway `take` failed for a buffer over
/// its limit, as documented for a oneway whose arguments do not decode.
fn says_take_refused(report: &str) -> bool {
    report.lines().any(|line| {
        line.contains("a oneway message Buffers::take failed")
            && line.contains("over this side's limits")
            && line.contains(&format!(
                "{} bytes, at most {LIMIT} (Limits::max_shared_len)",
                LIMIT + 1
            ))
    })
}

/// Whether `result` is the refusal of a buffer one byte over `LIMIT` (or, for a region,
/// whose size is whole pages, one page over), by the peer or not, naming
/// `Limits::max_shared_len`.
fn refused<T>(result: &Result<T, Error>, by_peer: bool) -> bool {
    let over = [LIMIT as u64 + 1, (LIMIT + page_size()) as u64];
    matches!(
        *result,
        Err(Error::TooLarge { size, limit, which: Limit::MaxSharedLen, by_peer: whose, .. })
            if over.contains(&size) && limit == LIMIT as u64 && whose == by_peer
    )
}

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .unwrap()
        .unwrap() as usize
}

#[test]
fn a_request_buffer_over_the_workers_limit_fails_its_call_and_the_fd_is_closed() {
    let _fds = fd_count_lock();
    let (mut worker, socket) = spawn("child_buffers");
    let buffers = blocking::BuffersClient::new(Connection::new(socket));
    assert_eq!(buffers.measure(sealed(LIMIT)).unwrap(), LIMIT as u64);
    assert_eq!(buffers.measure_region(region(LIMIT)).unwrap(), LIMIT as u64);
    let before = buffers.open_fds().unwrap();
    let over = buffers.measure(sealed(LIMIT + 1));
    assert!(refused(&over, true), "{over:?}");
    assert_eq!(
        over.unwrap_err().to_string(),
        format!(
            "sealed buffer or region view of {} bytes, over the peer's Limits::max_shared_len \
             ({LIMIT} bytes)",
            LIMIT + 1
        ),
        "says which limit, and whose"
    );
    let over = buffers.measure_region(region(LIMIT + 1));
    assert!(refused(&over, true), "{over:?}");
    assert_eq!(
        buffers.open_fds().unwrap(),
        before,
        "the worker closed the refused fds"
    );
    assert_eq!(
        buffers.measure(sealed(1)).unwrap(),
        1,
        "the next call works"
    );
    buffers.connection().close();
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
}

#[test]
fn a_reply_buffer_over_the_callers_limit_fails_its_call_and_the_fd_is_closed() {
    let _fds = fd_count_lock();
    let (mut worker, socket) = spawn("child_buffers");
    let buffers = blocking::BuffersClient::new(Connection::new(socket));
    assert_eq!(buffers.make(LIMIT as u64).unwrap().len(), LIMIT);
    assert_eq!(buffers.make_region(LIMIT as u64).unwrap().len(), LIMIT);
    let before = open_fds();
    let over = buffers.make(LIMIT as u64 + 1);
    assert!(refused(&over, false), "{over:?}");
    let over = buffers.make_region(LIMIT as u64 + 1);
    assert!(refused(&over, false), "{over:?}");
    assert_eq!(open_fds(), before, "the refused fds are closed");
    assert_eq!(buffers.make(1).unwrap().len(), 1, "the next call works");
    buffers.connection().close();
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
}

/// A oneway carrying a buffer over the worker's limit: its sender learns nothing (the message
/// went out), the worker closes the fd, says so on its stderr, and serves on.
#[test]
fn a_oneway_buffer_over_the_workers_limit_is_dropped_reported_and_its_fd_closed() {
    let _fds = fd_count_lock();
    let (mut worker, socket, stderr) = spawn_reporting("child_buffers");
    let buffers = blocking::BuffersClient::new(Connection::new(socket));
    buffers.take(sealed(LIMIT)).unwrap();
    let before = buffers.open_fds().unwrap();
    buffers.take(sealed(LIMIT + 1)).unwrap();
    // A call runs after the oneways sent before it.
    assert_eq!(
        buffers.open_fds().unwrap(),
        before,
        "the worker closed the refused fd"
    );
    assert_eq!(
        buffers.measure(sealed(1)).unwrap(),
        1,
        "the next call works"
    );
    buffers.connection().close();
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    let report = reported(&stderr);
    assert!(says_take_refused(&report), "{report}");
}

/// The default limit is 1 GiB, as `DEFAULT_MAX_LEN` was before `max_shared_len`: a buffer
/// over `LIMIT` passes a connection whose limits say nothing of it.
#[test]
fn by_default_a_connection_takes_buffers_up_to_1_gib() {
    assert_eq!(
        Limits::default().max_shared_len,
        SealedBuffer::DEFAULT_MAX_LEN
    );
    assert_eq!(
        Limits::default().max_shared_len,
        RegionView::DEFAULT_MAX_LEN
    );
    let _fds = fd_count_lock();
    let (mut worker, socket) = spawn("child_buffers");
    let buffers = blocking::BuffersClient::new(Connection::new(limited(socket, 1 << 30)));
    assert_eq!(
        buffers.make(LIMIT as u64 + 1).unwrap().len(),
        LIMIT + 1,
        "a reply to a side with the default limit"
    );
    buffers.connection().close();
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
}

#[cfg(feature = "tokio")]
#[test]
fn async_a_request_buffer_over_the_workers_limit_fails_its_call_and_the_fd_is_closed() {
    let _fds = fd_count_lock();
    common::current_thread_runtime().block_on(async {
        let (mut worker, socket) = spawn("child_async_buffers");
        let conn = typed_ipc::tokio::AsyncConnection::new(socket).unwrap();
        let buffers = asynchronous::BuffersClient::new(conn.clone());
        assert_eq!(buffers.measure(sealed(LIMIT)).await.unwrap(), LIMIT as u64);
        let view = region(LIMIT);
        assert_eq!(buffers.measure_region(view).await.unwrap(), LIMIT as u64);
        let before = buffers.open_fds().await.unwrap();
        let over = buffers.measure(sealed(LIMIT + 1)).await;
        assert!(refused(&over, true), "{over:?}");
        let over = buffers.measure_region(region(LIMIT + 1)).await;
        assert!(refused(&over, true), "{over:?}");
        assert_eq!(
            buffers.open_fds().await.unwrap(),
            before,
            "the worker closed the refused fds"
        );
        assert_eq!(
            buffers.measure(sealed(1)).await.unwrap(),
            1,
            "the next call works"
        );
        hang_up_and_reap(&conn, &mut worker).await;
    });
}

#[cfg(feature = "tokio")]
#[test]
fn async_a_reply_buffer_over_the_callers_limit_fails_its_call_and_the_fd_is_closed() {
    let _fds = fd_count_lock();
    common::current_thread_runtime().block_on(async {
        let (mut worker, socket) = spawn("child_async_buffers");
        let conn = typed_ipc::tokio::AsyncConnection::new(socket).unwrap();
        let buffers = asynchronous::BuffersClient::new(conn.clone());
        assert_eq!(buffers.make(LIMIT as u64).await.unwrap().len(), LIMIT);
        assert_eq!(
            buffers.make_region(LIMIT as u64).await.unwrap().len(),
            LIMIT
        );
        let before = open_fds();
        let over = buffers.make(LIMIT as u64 + 1).await;
        assert!(refused(&over, false), "{over:?}");
        let over = buffers.make_region(LIMIT as u64 + 1).await;
        assert!(refused(&over, false), "{over:?}");
        assert_eq!(open_fds(), before, "the refused fds are closed");
        assert_eq!(
            buffers.make(1).await.unwrap().len(),
            1,
            "the next call works"
        );
        hang_up_and_reap(&conn, &mut worker).await;
    });
}

#[cfg(feature = "tokio")]
#[test]
fn async_a_oneway_buffer_over_the_workers_limit_is_dropped_reported_and_its_fd_closed() {
    let _fds = fd_count_lock();
    common::current_thread_runtime().block_on(async {
        let (mut worker, socket, stderr) = spawn_reporting("child_async_buffers");
        let conn = typed_ipc::tokio::AsyncConnection::new(socket).unwrap();
        let buffers = asynchronous::BuffersClient::new(conn.clone());
        buffers.take(sealed(LIMIT)).await.unwrap();
        let before = buffers.open_fds().await.unwrap();
        buffers.take(sealed(LIMIT + 1)).await.unwrap();
        assert_eq!(
            buffers.open_fds().await.unwrap(),
            before,
            "the worker closed the refused fd"
        );
        assert_eq!(
            buffers.measure(sealed(1)).await.unwrap(),
            1,
            "the next call works"
        );
        hang_up_and_reap(&conn, &mut worker).await;
        let report = reported(&stderr);
        assert!(says_take_refused(&report), "{report}");
    });
}

#[test]
fn a_worker_spawned_with_limits_has_its_replies_checked_against_them() {
    let _fds = fd_count_lock();
    let mut command = child("child_buffers");
    command.env(MAX_SHARED, LIMIT.to_string());
    let (mut worker, conn) = Worker::spawn_with_limits(command, limits(LIMIT)).unwrap();
    let buffers = blocking::BuffersClient::new(conn);
    assert_eq!(buffers.make(LIMIT as u64).unwrap().len(), LIMIT);
    let over = buffers.make(LIMIT as u64 + 1);
    assert!(refused(&over, false), "{over:?}");
    assert_eq!(buffers.make(1).unwrap().len(), 1, "the next call works");
    buffers.connection().close();
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
}

#[cfg(feature = "tokio")]
#[test]
fn async_a_worker_spawned_with_limits_has_its_replies_checked_against_them() {
    let _fds = fd_count_lock();
    common::current_thread_runtime().block_on(async {
        let mut command = child("child_async_buffers");
        command.env(MAX_SHARED, LIMIT.to_string());
        let (mut worker, conn) =
            typed_ipc::tokio::worker::spawn_with_limits(command, limits(LIMIT)).unwrap();
        let buffers = asynchronous::BuffersClient::new(conn.clone());
        assert_eq!(buffers.make(LIMIT as u64).await.unwrap().len(), LIMIT);
        let over = buffers.make(LIMIT as u64 + 1).await;
        assert!(refused(&over, false), "{over:?}");
        assert_eq!(
            buffers.make(1).await.unwrap().len(),
            1,
            "the next call works"
        );
        hang_up_and_reap(&conn, &mut worker).await;
    });
}

// ---- a listener's clients: `Server::client_limits`, `AsyncServer::client_limits` ----

/// A listening server bounds what each client it accepts may send: a buffer over its
/// `client_limits` fails the client's call, refused by the server (`by_peer`), and the next
/// call works. (Before `client_limits`, a server's clients had the default limits, 1 GiB,
/// with no way to lower them short of writing one's own accept loop.)
#[test]
fn a_listening_server_holds_its_clients_to_its_client_limits() {
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-client-limits-{}", std::process::id());
    let serving = typed_ipc::Server::new()
        .service(blocking::BuffersServer::new(BuffersImpl))
        .client_limits(limits(LIMIT))
        .listen(typed_ipc::Listener::bind_abstract(&name).unwrap())
        .unwrap();
    let buffers = blocking::BuffersClient::new(Connection::connect_abstract(&name).unwrap());
    assert_eq!(buffers.measure(sealed(LIMIT)).unwrap(), LIMIT as u64);
    let over = buffers.measure(sealed(LIMIT + 1));
    assert!(refused(&over, true), "{over:?}");
    assert_eq!(
        buffers.measure(sealed(1)).unwrap(),
        1,
        "the next call works"
    );
    drop(buffers);
    serving.shutdown();
}

#[cfg(feature = "tokio")]
#[test]
fn an_async_listening_server_holds_its_clients_to_its_client_limits() {
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-async-client-limits-{}", std::process::id());
    common::current_thread_runtime().block_on(async {
        let serving = typed_ipc::tokio::AsyncServer::new()
            .service(asynchronous::BuffersServer::new(BuffersImpl))
            .client_limits(limits(LIMIT))
            .listen(typed_ipc::tokio::AsyncListener::bind_abstract(&name).unwrap());
        let connection = typed_ipc::tokio::AsyncConnection::connect_abstract(&name).await;
        let buffers = asynchronous::BuffersClient::new(connection.unwrap());
        assert_eq!(buffers.measure(sealed(LIMIT)).await.unwrap(), LIMIT as u64);
        let over = buffers.measure(sealed(LIMIT + 1)).await;
        assert!(refused(&over, true), "{over:?}");
        assert_eq!(buffers.measure(sealed(1)).await.unwrap(), 1);
        drop(buffers);
        serving.shutdown().await;
    });
}
