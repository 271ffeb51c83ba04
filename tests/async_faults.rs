//! Faults of the async flavour found in review, each with the outcome it must have: a
//! per-connection service that holds its own connection, a connection outliving the runtime
//! that ran it, and a worker killed while calls are still going out. (A reply that cannot be
//! encoded is in `async_shapes.rs`.)
//!
//! Nothing here synchronises by sleeping; the timeouts only turn a hang into a failure.

#![cfg(feature = "tokio")]

mod common;

use std::os::fd::OwnedFd;
use std::time::Duration;

use common::{child, fd_count_lock, ipc_fds, memfd, read_all};
use typed_ipc::tokio::AsyncConnection;
use typed_ipc::{Error, Socket};

#[typed_ipc::interface]
pub trait Faults {
    async fn echo(&self, data: Vec<u8>, files: Vec<OwnedFd>) -> Vec<u8>;
    /// A oneway carrying fds, which it closes.
    #[oneway]
    async fn numbered(&self, n: u64, files: Vec<OwnedFd>);
    /// Calls `Back::ping` on the caller `n` times.
    async fn back(&self, n: u32) -> u32;
}

#[typed_ipc::interface]
pub trait Back {
    async fn ping(&self, n: u32) -> u32;
}

#[derive(Clone, Default)]
struct FaultsImpl {
    /// A client of the connection this implementation serves, for callbacks.
    back: Option<BackClient>,
}

impl Faults for FaultsImpl {
    async fn echo(&self, data: Vec<u8>, files: Vec<OwnedFd>) -> Vec<u8> {
        let indexed = files
            .into_iter()
            .enumerate()
            .all(|(i, f)| read_all(f) == (i as u32).to_le_bytes());
        assert!(indexed);
        let mut out = data;
        out.reverse();
        out
    }
    async fn numbered(&self, _n: u64, _files: Vec<OwnedFd>) {}
    async fn back(&self, n: u32) -> u32 {
        let back = self.back.as_ref().unwrap();
        let mut sum = 0;
        for i in 0..n {
            sum += back.ping(i).await.unwrap();
        }
        sum
    }
}

struct BackImpl;

impl Back for BackImpl {
    async fn ping(&self, n: u32) -> u32 {
        n + 1
    }
}

fn indexed_fds(n: usize) -> Vec<OwnedFd> {
    (0..n).map(|i| memfd(&(i as u32).to_le_bytes())).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    common::two_worker_runtime()
}

/// Holds its end of the connection and never reads it.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_deaf() {
    let _socket = typed_ipc::worker::socket().unwrap();
    loop {
        std::thread::park();
    }
}

/// A per-connection implementation that holds a client of its own connection (how a server
/// calls back) must not keep the connection open once the peer has hung up: the blocking
/// flavour drops its services when nothing serves any more, for this reason.
#[test]
fn a_service_holding_its_own_connection_is_freed_after_the_peer_hangs_up() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = ipc_fds();
    rt.block_on(async {
        let (a, b) = AsyncConnection::pair().unwrap();
        let imp = FaultsImpl {
            back: Some(BackClient::new(b.clone())),
        };
        let serving = tokio::spawn(FaultsServer::new(imp).serve(b));
        a.add_service(BackServer::new(BackImpl));
        let client = FaultsClient::new(a);
        assert_eq!(client.back(3).await.unwrap(), 6);
        drop(client); // the last handle of this end: the server sees a hang-up
        serving.await.unwrap().unwrap();
    });
    drop(rt);
    assert_eq!(ipc_fds(), before, "the serving end's socket is still open");
}

/// The runtime whose tasks ran a connection is dropped while the connection is kept: a call
/// made on another runtime must fail, not wait forever for a reply no task will read.
#[test]
fn a_connection_whose_runtime_is_gone_fails_its_callers() {
    let _fds = fd_count_lock();
    let (a_rt, b_rt) = (runtime(), runtime());
    let (sa, sb) = Socket::pair().unwrap();
    let a = a_rt.block_on(async { AsyncConnection::new(sa).unwrap() });
    let b = b_rt.block_on(async { AsyncConnection::new(sb).unwrap() });
    b_rt.spawn(FaultsServer::new(FaultsImpl::default()).serve(b));
    let client = FaultsClient::new(a).with_timeout(Duration::from_secs(10));
    assert_eq!(
        b_rt.block_on(client.echo(vec![1, 2], vec![])).unwrap(),
        [2, 1]
    );
    drop(a_rt);
    let got = b_rt.block_on(client.echo(vec![1, 2], vec![]));
    assert!(
        !matches!(got, Ok(_) | Err(Error::TimedOut)),
        "the call waited for a reply nobody reads: {got:?}"
    );
    assert!(client.connection().is_closed());
}

/// The peer's side of the same: the end that served is kept while its runtime is dropped.
/// Its peer must see a hang-up rather than wait for replies no task will send.
#[test]
fn a_served_connection_whose_runtime_is_gone_hangs_up_on_its_peer() {
    let _fds = fd_count_lock();
    let (a_rt, b_rt) = (runtime(), runtime());
    let (sa, sb) = Socket::pair().unwrap();
    let a = a_rt.block_on(async { AsyncConnection::new(sa).unwrap() });
    let b = b_rt.block_on(async { AsyncConnection::new(sb).unwrap() });
    b.add_service(FaultsServer::new(FaultsImpl::default()));
    let client = FaultsClient::new(a).with_timeout(Duration::from_secs(10));
    assert_eq!(
        a_rt.block_on(client.echo(vec![1, 2], vec![])).unwrap(),
        [2, 1]
    );
    drop(b_rt);
    let got = a_rt.block_on(client.echo(vec![1, 2], vec![]));
    assert!(matches!(got, Err(Error::Disconnected)), "{got:?}");
    drop(b);
}

/// Calls stopped part-way through their message (the worker reads nothing), calls waiting for
/// the send lock behind them, and a half-sent oneway cancelled and finishing in the
/// background; then the worker is killed. Every call ends with `Disconnected`, the
/// connection's tasks end, and no fd is left.
#[test]
fn calls_still_going_out_when_the_worker_is_killed_end_with_disconnected() {
    use std::future::Future;
    use std::task::{Context, Waker};

    let _fds = fd_count_lock();
    let rt = runtime();
    let before = ipc_fds();
    rt.block_on(async {
        let (mut worker, conn) = typed_ipc::tokio::worker::spawn(child("child_deaf")).unwrap();
        let client = FaultsClient::new(conn.clone());
        let mut cx = Context::from_waker(Waker::noop());
        let mut calls = Vec::new();
        for i in 0..20u32 {
            let c = client.clone();
            let (len, nfds) = match i {
                0 => (16 << 20, 600), // its first poll stops part-way
                _ => ([10, 2000, 70_000, 1 << 20][i as usize % 4], i as usize % 5),
            };
            let mut call = Box::pin(async move {
                c.echo(vec![i as u8; len], indexed_fds(nfds))
                    .await
                    .map(drop)
            });
            assert!(call.as_mut().poll(&mut cx).is_pending());
            calls.push(tokio::spawn(call));
        }
        let mut oneway = Box::pin(client.numbered(1, indexed_fds(300)));
        assert!(oneway.as_mut().poll(&mut cx).is_pending());
        drop(oneway);
        worker.kill().unwrap();
        for call in calls {
            let got = tokio::time::timeout(Duration::from_secs(20), call)
                .await
                .expect("a caller hung after the worker died")
                .unwrap();
            assert!(matches!(got, Err(Error::Disconnected)), "{got:?}");
        }
        assert!(conn.is_closed());
        tokio::time::timeout(Duration::from_secs(20), conn.wait_closed())
            .await
            .expect("the connection's tasks did not end");
        typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
        drop((client, conn, worker));
    });
    drop(rt);
    assert_eq!(ipc_fds(), before);
}

/// Async code starts, kills from another task and waits for a worker with
/// `typed_ipc::tokio::worker` alone: the types its functions return and take come from there
/// too. A caller waiting on the killed worker gets `Disconnected`, and `wait` says why.
#[test]
fn a_worker_is_managed_through_the_async_worker_module_alone() {
    use typed_ipc::tokio::worker::{self, Exit, Killer, Worker, exit_with_parent};

    let _fds = fd_count_lock();
    let rt = runtime();
    let before = ipc_fds();
    rt.block_on(async {
        let mut command = child("child_deaf");
        exit_with_parent(&mut command);
        let (mut started, conn): (Worker, AsyncConnection) = worker::spawn(command).unwrap();
        let client = FaultsClient::new(conn.clone());
        let call = tokio::spawn(async move { client.echo(vec![1; 8], vec![]).await });
        let killer: Killer = started.killer().unwrap();
        tokio::spawn(async move { killer.kill() })
            .await
            .unwrap()
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .expect("a caller hung after the worker died")
            .unwrap();
        assert!(matches!(got, Err(Error::Disconnected)), "{got:?}");
        let exit: Exit = worker::wait(&mut started).await.unwrap();
        assert!(matches!(exit, Exit::Signal(9)), "{exit}");
        conn.wait_closed().await;
    });
    drop(rt);
    assert_eq!(ipc_fds(), before);
}

/// The same service holding its own connection, with the task that runs oneways started (a
/// oneway has run), and the runtime dropped rather than the peer hanging up: the services
/// must be dropped all the same, or the cycle keeps the socket open for good.
#[test]
fn a_service_holding_its_own_connection_is_freed_when_the_runtime_is_dropped_after_a_oneway() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = ipc_fds();
    let client = rt.block_on(async {
        let (a, b) = AsyncConnection::pair().unwrap();
        let imp = FaultsImpl {
            back: Some(BackClient::new(b.clone())),
        };
        b.add_service(FaultsServer::new(imp));
        drop(b); // only the service holds this end now
        let client = FaultsClient::new(a);
        client.numbered(1, vec![]).await.unwrap();
        // Runs once the oneway has: the oneway task is up and waits for the next.
        assert_eq!(client.echo(vec![1, 2], vec![]).await.unwrap(), [2, 1]);
        client
    });
    drop(rt);
    drop(client);
    assert_eq!(ipc_fds(), before, "the serving end's socket is still open");
}

/// The same service, added only once the peer has hung up (it went before the server got to
/// serving its connection): nothing will dispatch a request again, so it must be dropped
/// all the same, or the cycle keeps the socket open for good.
#[test]
fn a_service_holding_its_own_connection_added_after_the_peer_hung_up_is_freed() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = ipc_fds();
    rt.block_on(async {
        let (a, b) = AsyncConnection::pair().unwrap();
        drop(a);
        b.wait_closed().await; // the reader has seen the hang-up and ended
        assert!(b.is_closed());
        let imp = FaultsImpl {
            back: Some(BackClient::new(b.clone())),
        };
        FaultsServer::new(imp).serve(b).await.unwrap();
    });
    drop(rt);
    assert_eq!(ipc_fds(), before, "the serving end's socket is still open");
}
