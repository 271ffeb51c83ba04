//! Across processes, in every pairing of flavours: an async parent with an async worker, an
//! async parent with a blocking worker, a blocking parent with an async worker; and a worker
//! that serves the blocking trait's implementation on tokio (`#[interface(async_server)]`,
//! each call on the blocking pool), driven by both kinds of parent. Each pairing
//! runs typed fds both ways, `Result`s, oneways in order, concurrent calls, callbacks from the
//! worker into the parent during a call, and peer death (the worker killed with SIGKILL while
//! calls wait).
//!
//! The worker is this test binary run again for one `#[ignore]`d test (`child_*`).

#![cfg(feature = "tokio")]

mod common;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{child, fd_count_lock, fd_snapshot, memfd, read_all};
use typed_ipc::Error;
use typed_ipc::worker::{Exit, Worker};

/// The two interfaces, blocking flavour.
mod blocking {
    use std::os::fd::OwnedFd;

    /// What the worker serves.
    #[typed_ipc::interface(async_server)]
    pub trait Lab {
        /// The bytes reversed; each fd must be a memfd holding its index.
        fn echo(&self, data: Vec<u8>, files: Vec<OwnedFd>) -> Vec<u8>;
        fn configure(&self, gain: u32) -> Result<u32, String>;
        /// A memfd holding `content`.
        fn open(&self, content: String) -> OwnedFd;
        #[oneway]
        fn count(&self, seq: u64);
        /// How many oneways came so far, if they came in order.
        fn counted(&self) -> Option<u64>;
        /// Calls `Events::frame_done` on the caller for each frame before returning.
        fn process(&self, frames: u32) -> u32;
        /// Writes a byte to `signal`, then never returns.
        fn hang(&self, signal: OwnedFd);
    }

    /// What the parent serves to the worker.
    #[typed_ipc::interface]
    pub trait Events {
        /// A frame is done; returns how many the parent has seen.
        fn frame_done(&self, frame: u32) -> u32;
    }
}

/// The same two interfaces, async flavour.
mod asynchronous {
    use std::os::fd::OwnedFd;

    #[typed_ipc::interface]
    pub trait Lab {
        async fn echo(&self, data: Vec<u8>, files: Vec<OwnedFd>) -> Vec<u8>;
        async fn configure(&self, gain: u32) -> Result<u32, String>;
        async fn open(&self, content: String) -> OwnedFd;
        #[oneway]
        async fn count(&self, seq: u64);
        async fn counted(&self) -> Option<u64>;
        async fn process(&self, frames: u32) -> u32;
        async fn hang(&self, signal: OwnedFd);
    }

    #[typed_ipc::interface]
    pub trait Events {
        async fn frame_done(&self, frame: u32) -> u32;
    }
}

#[test]
fn both_flavours_of_a_trait_have_one_signature() {
    assert_eq!(
        blocking::LAB_INFO.signature,
        asynchronous::LAB_INFO.signature
    );
    assert_eq!(blocking::LAB_INFO.id, asynchronous::LAB_INFO.id);
    assert_eq!(
        blocking::EVENTS_INFO.signature,
        asynchronous::EVENTS_INFO.signature
    );
}

// ---- the implementations, one per flavour, the same behaviour ----

fn reversed_if_indexed(data: Vec<u8>, files: Vec<OwnedFd>) -> Vec<u8> {
    for (i, f) in files.into_iter().enumerate() {
        assert_eq!(read_all(f), (i as u32).to_le_bytes());
    }
    let mut out = data;
    out.reverse();
    out
}

fn configure(gain: u32) -> Result<u32, String> {
    match gain {
        0..=10 => Ok(10 - gain),
        _ => Err(format!("gain {gain} is too loud")),
    }
}

/// Oneways seen, and whether they came in order (all-ones once one did not).
#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    const OUT_OF_ORDER: u64 = u64::MAX;
    fn count(&self, seq: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(if n == seq { n + 1 } else { Self::OUT_OF_ORDER })
            });
    }
    fn counted(&self) -> Option<u64> {
        Some(self.0.load(Ordering::SeqCst)).filter(|&n| n != Self::OUT_OF_ORDER)
    }
}

fn signal_then_park(signal: OwnedFd) {
    use std::io::Write;
    std::fs::File::from(signal).write_all(b"!").unwrap();
}

/// The blocking implementation, served by a blocking worker and, on tokio's blocking pool, by
/// an async one: they differ in how they call the parent back.
struct BlockingLab {
    frame_done: Box<dyn Fn(u32) -> u32 + Send + Sync>,
    counter: Counter,
}

impl blocking::Lab for BlockingLab {
    fn echo(&self, data: Vec<u8>, files: Vec<OwnedFd>) -> Vec<u8> {
        reversed_if_indexed(data, files)
    }
    fn configure(&self, gain: u32) -> Result<u32, String> {
        configure(gain)
    }
    fn open(&self, content: String) -> OwnedFd {
        memfd(content.as_bytes())
    }
    fn count(&self, seq: u64) {
        self.counter.count(seq)
    }
    fn counted(&self) -> Option<u64> {
        self.counter.counted()
    }
    fn process(&self, frames: u32) -> u32 {
        (0..frames)
            .map(|f| (self.frame_done)(f))
            .last()
            .unwrap_or(0)
    }
    fn hang(&self, signal: OwnedFd) {
        signal_then_park(signal);
        loop {
            std::thread::park();
        }
    }
}

struct AsyncLab {
    events: asynchronous::EventsClient,
    counter: Counter,
}

impl asynchronous::Lab for AsyncLab {
    async fn echo(&self, data: Vec<u8>, files: Vec<OwnedFd>) -> Vec<u8> {
        reversed_if_indexed(data, files)
    }
    async fn configure(&self, gain: u32) -> Result<u32, String> {
        configure(gain)
    }
    async fn open(&self, content: String) -> OwnedFd {
        memfd(content.as_bytes())
    }
    async fn count(&self, seq: u64) {
        self.counter.count(seq)
    }
    async fn counted(&self) -> Option<u64> {
        self.counter.counted()
    }
    async fn process(&self, frames: u32) -> u32 {
        let mut seen = 0;
        for f in 0..frames {
            seen = self.events.frame_done(f).await.unwrap();
        }
        seen
    }
    async fn hang(&self, signal: OwnedFd) {
        signal_then_park(signal);
        std::future::pending::<()>().await
    }
}

#[derive(Clone, Default)]
struct Seen(Arc<AtomicU64>);

impl Seen {
    fn frame_done(&self) -> u32 {
        self.0.fetch_add(1, Ordering::SeqCst) as u32 + 1
    }
}

impl blocking::Events for Seen {
    fn frame_done(&self, _frame: u32) -> u32 {
        Seen::frame_done(self)
    }
}

impl asynchronous::Events for Seen {
    async fn frame_done(&self, _frame: u32) -> u32 {
        Seen::frame_done(self)
    }
}

// ---- the workers ----

#[test]
#[ignore = "run as a child process by other tests"]
fn child_async_lab() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let conn = typed_ipc::tokio::worker::connection().unwrap();
        let lab = AsyncLab {
            events: asynchronous::EventsClient::new(conn.clone()),
            counter: Counter::default(),
        };
        asynchronous::LabServer::new(lab).serve(conn).await.unwrap();
    });
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_blocking_lab() {
    let conn = typed_ipc::worker::connection().unwrap();
    let events = blocking::EventsClient::new(conn.clone());
    conn.add_service(blocking::LabServer::new(BlockingLab {
        frame_done: Box::new(move |frame| events.frame_done(frame).unwrap()),
        counter: Counter::default(),
    }));
    // Enough serving threads for the concurrent calls and the hanging ones.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let conn = conn.clone();
            std::thread::spawn(move || conn.run())
        })
        .collect();
    for thread in threads {
        thread.join().unwrap().unwrap();
    }
}

/// The blocking implementation served by an async worker: each call runs on tokio's blocking
/// pool, from where it calls the parent back through the async client.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_pooled_lab() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let conn = typed_ipc::tokio::worker::connection().unwrap();
        let (events, runtime) = (
            asynchronous::EventsClient::new(conn.clone()),
            tokio::runtime::Handle::current(),
        );
        let lab = BlockingLab {
            frame_done: Box::new(move |f| runtime.block_on(events.frame_done(f)).unwrap()),
            counter: Counter::default(),
        };
        blocking::LabAsyncServer::new(lab)
            .serve(conn)
            .await
            .unwrap();
    });
}

fn indexed_fds(n: usize) -> Vec<OwnedFd> {
    (0..n).map(|i| memfd(&(i as u32).to_le_bytes())).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

// ---- an async parent ----

/// Everything an async parent does with a worker of either flavour (the wire is the same).
async fn drive_from_async(worker: &str) {
    let (mut child, conn) = typed_ipc::tokio::worker::spawn(child(worker)).unwrap();
    let seen = Seen::default();
    conn.add_service(asynchronous::EventsServer::new(seen.clone()));
    let lab = asynchronous::LabClient::new(conn.clone());

    // Typed fds both ways, Results.
    assert_eq!(
        lab.echo(vec![1, 2, 3], indexed_fds(3)).await.unwrap(),
        [3, 2, 1]
    );
    assert_eq!(
        read_all(lab.open("from the worker".into()).await.unwrap()),
        b"from the worker"
    );
    assert_eq!(lab.configure(3).await.unwrap(), Ok(7));
    assert_eq!(
        lab.configure(11).await.unwrap(),
        Err("gain 11 is too loud".into())
    );
    // Oneways, in order.
    for seq in 0..1000 {
        lab.count(seq).await.unwrap();
    }
    // Calls in flight at once, of all sizes.
    let tasks: Vec<_> = (0..8u32)
        .map(|t| {
            let lab = lab.clone();
            tokio::spawn(async move {
                for i in 0..200u32 {
                    let len = [0, 100, 70_000, 300_000][(i + t) as usize % 4];
                    let data: Vec<u8> = (0..len).map(|j| (j as u32 ^ i ^ t) as u8).collect();
                    let mut expected = data.clone();
                    expected.reverse();
                    let nfds = (i % 3) as usize;
                    assert_eq!(lab.echo(data, indexed_fds(nfds)).await.unwrap(), expected);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(lab.counted().await.unwrap(), Some(1000));
    // The worker calls back into this process while this call waits for its reply.
    assert_eq!(lab.process(10).await.unwrap(), 10);
    assert_eq!(seen.0.load(Ordering::SeqCst), 10);

    conn.close();
    conn.run().await.unwrap();
    assert_eq!(
        typed_ipc::tokio::worker::wait(&mut child).await.unwrap(),
        Exit::Code(0)
    );
}

#[test]
fn an_async_parent_drives_an_async_worker() {
    let _fds = fd_count_lock();
    runtime().block_on(drive_from_async("child_async_lab"));
}

#[test]
fn an_async_parent_drives_a_blocking_worker() {
    let _fds = fd_count_lock();
    runtime().block_on(drive_from_async("child_blocking_lab"));
}

#[test]
fn an_async_parent_drives_an_async_worker_serving_a_blocking_implementation() {
    let _fds = fd_count_lock();
    runtime().block_on(drive_from_async("child_pooled_lab"));
}

/// SIGKILL while calls wait: every waiting future gets `Disconnected`, the connection is seen
/// to be dead, and nothing leaks.
async fn killed_under_async_calls(worker: &str) {
    let before = fd_snapshot();
    let (mut child, conn) = typed_ipc::tokio::worker::spawn(child(worker)).unwrap();
    let lab = asynchronous::LabClient::new(conn.clone());
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let (lab, signal) = (lab.clone(), write_end.try_clone().unwrap());
            tokio::spawn(async move { lab.hang(signal).await })
        })
        .collect();
    drop(write_end);
    // Every call is running in the worker once it has written its byte.
    tokio::task::spawn_blocking(move || {
        let mut bytes = [0u8; 4];
        std::io::Read::read_exact(&mut std::fs::File::from(read_end), &mut bytes).unwrap();
    })
    .await
    .unwrap();
    child.kill().unwrap();
    for call in calls {
        assert!(matches!(call.await.unwrap(), Err(Error::Disconnected)));
    }
    assert!(
        conn.is_closed(),
        "a dead connection is told apart from a slow one"
    );
    assert!(matches!(lab.configure(1).await, Err(Error::Disconnected)));
    let exit = typed_ipc::tokio::worker::wait(&mut child).await.unwrap();
    assert_eq!(exit, Exit::Signal(9));
    drop((lab, child));
    conn.wait_closed().await;
    drop(conn);
    before.assert_nothing_new();
}

#[test]
fn sigkill_releases_every_async_caller_of_an_async_worker() {
    let _fds = fd_count_lock();
    runtime().block_on(killed_under_async_calls("child_async_lab"));
}

#[test]
fn sigkill_releases_every_async_caller_of_a_blocking_worker() {
    let _fds = fd_count_lock();
    runtime().block_on(killed_under_async_calls("child_blocking_lab"));
}

#[test]
fn sigkill_releases_every_async_caller_of_an_async_worker_serving_a_blocking_implementation() {
    let _fds = fd_count_lock();
    runtime().block_on(killed_under_async_calls("child_pooled_lab"));
}

#[test]
fn an_async_worker_killed_between_calls_fails_the_next_call_at_once() {
    let _fds = fd_count_lock();
    runtime().block_on(async {
        let (mut child, conn) = typed_ipc::tokio::worker::spawn(child("child_async_lab")).unwrap();
        let lab = asynchronous::LabClient::new(conn.clone());
        assert_eq!(lab.configure(0).await.unwrap(), Ok(10));
        child.kill().unwrap();
        let exit = typed_ipc::tokio::worker::wait(&mut child).await.unwrap();
        assert_eq!(exit, Exit::Signal(9));
        assert!(matches!(lab.configure(0).await, Err(Error::Disconnected)));
        conn.run().await.unwrap();
    });
}

// ---- a blocking parent ----

#[test]
fn a_blocking_parent_drives_an_async_worker() {
    let _fds = fd_count_lock();
    drive_from_blocking("child_async_lab");
}

#[test]
fn a_blocking_parent_drives_an_async_worker_serving_a_blocking_implementation() {
    let _fds = fd_count_lock();
    drive_from_blocking("child_pooled_lab");
}

/// Everything a blocking parent does with an async worker.
fn drive_from_blocking(worker: &str) {
    let (mut child, conn) = Worker::spawn(child(worker)).unwrap();
    let seen = Seen::default();
    conn.add_service(blocking::EventsServer::new(seen.clone()));
    let serving = {
        let conn = conn.clone();
        std::thread::spawn(move || conn.run())
    };
    let lab = blocking::LabClient::new(conn.clone());

    assert_eq!(lab.echo(vec![1, 2, 3], indexed_fds(3)).unwrap(), [3, 2, 1]);
    assert_eq!(
        read_all(lab.open("from the worker".into()).unwrap()),
        b"from the worker"
    );
    assert_eq!(lab.configure(3).unwrap(), Ok(7));
    assert_eq!(
        lab.configure(11).unwrap(),
        Err("gain 11 is too loud".into())
    );
    for seq in 0..1000 {
        lab.count(seq).unwrap();
    }
    std::thread::scope(|s| {
        for t in 0..8u32 {
            let lab = lab.clone();
            s.spawn(move || {
                for i in 0..200u32 {
                    let len = [0, 100, 70_000, 300_000][(i + t) as usize % 4];
                    let data: Vec<u8> = (0..len).map(|j| (j as u32 ^ i ^ t) as u8).collect();
                    let mut expected = data.clone();
                    expected.reverse();
                    let nfds = (i % 3) as usize;
                    assert_eq!(lab.echo(data, indexed_fds(nfds)).unwrap(), expected);
                }
            });
        }
    });
    assert_eq!(lab.counted().unwrap(), Some(1000));
    assert_eq!(lab.process(10).unwrap(), 10);
    assert_eq!(seen.0.load(Ordering::SeqCst), 10);

    conn.close();
    serving.join().unwrap().unwrap();
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

#[test]
fn sigkill_releases_every_blocking_caller_of_an_async_worker() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (mut child, conn) = Worker::spawn(child("child_async_lab")).unwrap();
    let lab = blocking::LabClient::new(conn.clone());
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (lab, signal) = (lab.clone(), write_end.try_clone().unwrap());
            std::thread::spawn(move || lab.hang(signal))
        })
        .collect();
    drop(write_end);
    let mut bytes = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::from(read_end), &mut bytes).unwrap();
    child.kill().unwrap();
    for caller in callers {
        assert!(matches!(caller.join().unwrap(), Err(Error::Disconnected)));
    }
    assert!(conn.is_closed());
    assert_eq!(child.wait().unwrap(), Exit::Signal(9));
    drop((lab, conn, child));
    before.assert_nothing_new();
}
