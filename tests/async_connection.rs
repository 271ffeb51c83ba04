//! The async connection under load and faults, in one process: concurrency, out-of-order
//! replies, slow handlers, timeouts, cancellation, oneway order, listeners, authorization,
//! graceful shutdown. Cross-process scenarios (both flavours, callbacks, peer death) are in
//! `async_interop.rs`.
//!
//! Every test takes one lock, so that fd counts are not disturbed by another test. Nothing
//! here synchronises by sleeping: handlers wait for explicit releases, barriers and channels.

#![cfg(feature = "tokio")]

mod common;

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use common::{
    connection_resources, fd_count_lock, fd_snapshot, filled, ipc_fds, memfd, memfd_mappings,
    read_all, resources_back,
};
use tokio::sync::{Barrier, mpsc, watch};
use typed_ipc::tokio::{AsyncConnection, AsyncListener, AsyncServer, AsyncServing};
use typed_ipc::{Connection, Error, current_peer, interface};

/// The interface most scenarios use.
#[interface]
pub trait Lab {
    /// Echoes the bytes reversed; each fd must be a memfd holding its index.
    async fn echo(&self, data: Vec<u8>, files: Vec<OwnedFd>) -> Vec<u8>;
    /// Waits until `key` is released by [`Lab::release`] (or by the test).
    async fn wait_for(&self, key: u32) -> u32;
    /// Releases the callers of `wait_for(key)`.
    async fn release(&self, key: u32);
    /// The caller's pid as this side saw it.
    async fn caller_pid(&self) -> i32;
    #[oneway]
    async fn count(&self, seq: u64);
    /// Waits until `n` oneways arrived; true if they came in order.
    async fn counted(&self, n: u64) -> bool;
    /// Waits until `key` is released, then returns the fd the test left for it.
    async fn slow_fd(&self, key: u32) -> OwnedFd;
    /// Returns once `n` calls of `meet(n)` are inside the server at the same time.
    async fn meet(&self, n: u32) -> u32;
}

/// The implementation's state, shared with the test that drives it.
#[derive(Default)]
struct LabState {
    released: watch::Sender<Vec<u32>>,
    /// Oneways counted so far.
    counted: watch::Sender<u64>,
    in_order: AtomicBool,
    /// Keys whose `wait_for`/`slow_fd` has started, for the test to wait on.
    entered: Mutex<Option<mpsc::UnboundedSender<u32>>>,
    /// The fd each `slow_fd(key)` returns.
    late_fds: Mutex<HashMap<u32, OwnedFd>>,
    barriers: Mutex<HashMap<u32, Arc<Barrier>>>,
    /// What each `echo` received: (bytes, fds, whether each fd held its index).
    echoed: watch::Sender<Vec<(usize, usize, bool)>>,
}

#[derive(Clone)]
struct LabImpl(Arc<LabState>);

impl LabImpl {
    fn new() -> LabImpl {
        let state = LabState::default();
        state.in_order.store(true, Ordering::SeqCst);
        LabImpl(Arc::new(state))
    }

    /// A channel that reports each key whose `wait_for`/`slow_fd` has started.
    fn entries(&self) -> mpsc::UnboundedReceiver<u32> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.0.entered.lock().unwrap() = Some(tx);
        rx
    }

    fn release_key(&self, key: u32) {
        self.0.released.send_modify(|keys| keys.push(key));
    }

    async fn until_released(&self, key: u32) {
        if let Some(entered) = &*self.0.entered.lock().unwrap() {
            let _ = entered.send(key);
        }
        let mut released = self.0.released.subscribe();
        released.wait_for(|keys| keys.contains(&key)).await.unwrap();
    }
}

impl Lab for LabImpl {
    async fn echo(&self, data: Vec<u8>, files: Vec<OwnedFd>) -> Vec<u8> {
        let nfds = files.len();
        let indexed = files
            .into_iter()
            .enumerate()
            .all(|(i, f)| read_all(f) == (i as u32).to_le_bytes());
        let len = data.len();
        self.0.echoed.send_modify(|e| e.push((len, nfds, indexed)));
        let mut out = data;
        out.reverse();
        out
    }
    async fn wait_for(&self, key: u32) -> u32 {
        self.until_released(key).await;
        key
    }
    async fn release(&self, key: u32) {
        self.release_key(key);
    }
    async fn caller_pid(&self) -> i32 {
        current_peer().map_or(-1, |p| p.pid)
    }
    async fn count(&self, seq: u64) {
        let mut in_order = true;
        self.0.counted.send_modify(|n| {
            in_order = *n == seq;
            *n += 1;
        });
        if !in_order {
            self.0.in_order.store(false, Ordering::SeqCst);
        }
    }
    async fn counted(&self, n: u64) -> bool {
        let mut counted = self.0.counted.subscribe();
        counted.wait_for(|c| *c >= n).await.unwrap();
        self.0.in_order.load(Ordering::SeqCst)
    }
    async fn slow_fd(&self, key: u32) -> OwnedFd {
        // Taken before it waits: a call cancelled meanwhile has its future, and the fd with
        // it, dropped; one that runs on returns it.
        let fd = self.0.late_fds.lock().unwrap().remove(&key);
        self.until_released(key).await;
        fd.unwrap_or_else(|| memfd(b"late"))
    }
    async fn meet(&self, n: u32) -> u32 {
        let barrier = {
            let mut barriers = self.0.barriers.lock().unwrap();
            barriers
                .entry(n)
                .or_insert_with(|| Arc::new(Barrier::new(n as usize)))
                .clone()
        };
        barrier.wait().await;
        n
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// A client, the implementation its server runs (on the same runtime), and the server task.
struct Running {
    client: LabClient,
    lab: LabImpl,
    server: tokio::task::JoinHandle<typed_ipc::Result<()>>,
}

fn start() -> Running {
    let (a, b) = AsyncConnection::pair().unwrap();
    let lab = LabImpl::new();
    let server = tokio::spawn(LabServer::new(lab.clone()).serve(b));
    Running {
        client: LabClient::new(a),
        lab,
        server,
    }
}

impl Running {
    /// Hangs up, checks the server saw a clean close, and waits until both ends are gone.
    async fn stop(self) {
        let connection = self.client.connection().clone();
        drop(self.client);
        connection.close();
        self.server.await.unwrap().unwrap();
        connection.wait_closed().await;
    }
}

fn indexed_fds(n: usize) -> Vec<OwnedFd> {
    (0..n).map(|i| memfd(&(i as u32).to_le_bytes())).collect()
}

/// A pipe: the test keeps the read end and reads it to EOF, which comes once every copy of the
/// write end (the server's, and the one in a late reply) is closed.
fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe().unwrap()
}

async fn until_eof(read_end: OwnedFd) {
    use std::io::Read;
    let read = move || std::fs::File::from(read_end).read_to_end(&mut Vec::new());
    tokio::task::spawn_blocking(read).await.unwrap().unwrap();
}

#[test]
fn eight_tasks_times_two_thousand_mixed_calls_on_one_client() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = fd_snapshot();
    rt.block_on(async {
        let running = start();
        let mut tasks = Vec::new();
        for t in 0..8u32 {
            let client = running.client.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..2_000u32 {
                    let len = [0, 1, 64, 4096, 70_000][(i as usize + t as usize) % 5];
                    let nfds = (i % 3) as usize;
                    let data: Vec<u8> = (0..len).map(|j| (j as u32 ^ i ^ t) as u8).collect();
                    let mut expected = data.clone();
                    expected.reverse();
                    let echoed = client.echo(data, indexed_fds(nfds)).await.unwrap();
                    assert_eq!(echoed, expected);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let echoed = running.lab.0.echoed.borrow().clone();
        assert_eq!(echoed.len(), 16_000);
        assert!(echoed.iter().all(|&(_, _, indexed)| indexed));
        running.stop().await;
    });
    before.assert_nothing_new();
}

#[test]
fn replies_come_back_out_of_order_to_the_right_callers() {
    let _fds = fd_count_lock();
    runtime().block_on(async {
        let running = start();
        let mut entered = running.lab.entries();
        let first = tokio::spawn({
            let client = running.client.clone();
            async move { client.wait_for(1).await }
        });
        assert_eq!(entered.recv().await, Some(1));
        // `wait_for(1)` cannot return before `release(1)`: these replies overtake its own.
        running.client.release(2).await.unwrap();
        assert_eq!(running.client.wait_for(2).await.unwrap(), 2);
        assert!(!first.is_finished());
        running.client.release(1).await.unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        running.stop().await;
    });
}

#[test]
fn a_slow_handler_does_not_stall_the_others() {
    let _fds = fd_count_lock();
    runtime().block_on(async {
        let running = start();
        let mut entered = running.lab.entries();
        let slow = tokio::spawn({
            let client = running.client.clone();
            async move { client.wait_for(7).await }
        });
        assert_eq!(entered.recv().await, Some(7));
        // While `wait_for(7)` is parked in the server, 16 calls meet inside it: each returns
        // only once all 16 are running at the same time.
        let meetings: Vec<_> = (0..16)
            .map(|_| {
                let client = running.client.clone();
                tokio::spawn(async move { client.meet(16).await })
            })
            .collect();
        for meeting in meetings {
            assert_eq!(meeting.await.unwrap().unwrap(), 16);
        }
        assert_eq!(
            running.client.echo(vec![1, 2], vec![]).await.unwrap(),
            [2, 1]
        );
        assert!(!slow.is_finished());
        running.lab.release_key(7);
        assert_eq!(slow.await.unwrap().unwrap(), 7);
        running.stop().await;
    });
}

#[test]
fn a_timed_out_call_is_dropped_at_the_server_and_its_fds_closed() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = fd_snapshot();
    rt.block_on(async {
        let running = start();
        let (read_end, write_end) = pipe();
        running.lab.0.late_fds.lock().unwrap().insert(3, write_end);
        let quick = running.client.with_timeout(Duration::from_millis(20));
        // The server holds the call until released, so it cannot beat the timeout.
        assert!(matches!(quick.slow_fd(3).await, Err(Error::TimedOut)));
        // The original client has no timeout, and the connection is still fine.
        assert_eq!(
            running.client.caller_pid().await.unwrap(),
            std::process::id() as i32
        );
        running.lab.release_key(3);
        // The handler holds the pipe's write end: EOF means the server dropped it on the
        // call's cancel (or, had the reply crossed the cancel, sent it and this side dropped
        // it).
        until_eof(read_end).await;
        assert!(!running.client.connection().is_closed());
        running.stop().await;
    });
    before.assert_nothing_new();
}

/// A call dropped (by `select!`, or its task aborted) once the server has started on it has
/// its handler dropped there: the write end it holds closes (EOF), and the connection goes on.
#[test]
fn dropping_a_call_frees_its_slot_and_drops_its_handler() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = fd_snapshot();
    rt.block_on(async {
        let running = start();
        let mut entered = running.lab.entries();
        let (read_end, write_end) = pipe();
        running.lab.0.late_fds.lock().unwrap().insert(4, write_end);
        // A call abandoned by `select!` once the server has started on it.
        tokio::select! {
            reply = running.client.slow_fd(4) => panic!("the call cannot finish: {reply:?}"),
            key = entered.recv() => assert_eq!(key, Some(4)),
        }
        running.lab.release_key(4);
        until_eof(read_end).await;
        // And an aborted task's call.
        let (read_end, write_end) = pipe();
        running.lab.0.late_fds.lock().unwrap().insert(5, write_end);
        let task = tokio::spawn({
            let client = running.client.clone();
            async move { client.slow_fd(5).await }
        });
        assert_eq!(entered.recv().await, Some(5));
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        running.lab.release_key(5);
        until_eof(read_end).await;
        assert_eq!(running.client.wait_for(5).await.unwrap(), 5);
        running.stop().await;
    });
    before.assert_nothing_new();
}

#[test]
fn a_message_cancelled_half_sent_is_finished_and_the_stream_stays_in_sync() {
    let _fds = fd_count_lock();
    // One thread: the server cannot drain the socket while the call is being polled, so the
    // first poll is sure to stop part-way through the 64 MiB message.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let before = fd_snapshot();
    rt.block_on(async {
        let running = start();
        let data: Vec<u8> = (0..64 << 20).map(|i: u32| (i % 251) as u8).collect();
        let files = indexed_fds(600);
        let mut call = Box::pin(running.client.echo(data, files));
        let first = poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "64 MiB do not fit a socket buffer");
        drop(call);
        // The rest went out in the background (with copies of the fds not sent yet), before
        // this call's message: the server reads both.
        assert_eq!(
            running
                .client
                .echo(vec![1, 2, 3], indexed_fds(2))
                .await
                .unwrap(),
            [3, 2, 1]
        );
        let mut echoed = running.lab.0.echoed.subscribe();
        let echoed = echoed.wait_for(|e| e.len() == 2).await.unwrap().clone();
        assert!(echoed.contains(&(64 << 20, 600, true)), "{echoed:?}");
        assert!(echoed.contains(&(3, 2, true)), "{echoed:?}");
        running.stop().await;
    });
    before.assert_nothing_new();
}

#[test]
fn oneways_run_in_the_order_sent_while_calls_run_concurrently() {
    let _fds = fd_count_lock();
    runtime().block_on(async {
        let running = start();
        for seq in 0..10_000 {
            running.client.count(seq).await.unwrap();
        }
        assert!(running.client.counted(10_000).await.unwrap());
        running.stop().await;
    });
}

#[test]
fn closing_releases_every_waiting_call_with_disconnected() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = fd_snapshot();
    rt.block_on(async {
        let running = start();
        let mut entered = running.lab.entries();
        let waiting: Vec<_> = (0..4)
            .map(|_| {
                let client = running.client.clone();
                tokio::spawn(async move { client.wait_for(9).await })
            })
            .collect();
        for _ in 0..4 {
            assert_eq!(entered.recv().await, Some(9));
        }
        running.client.connection().close();
        for call in waiting {
            assert!(matches!(call.await.unwrap(), Err(Error::Disconnected)));
        }
        assert!(running.client.connection().is_closed());
        assert!(matches!(
            running.client.caller_pid().await,
            Err(Error::Disconnected)
        ));
        // The server's handlers are still parked: release them so that it can finish.
        running.lab.release_key(9);
        running.stop().await;
    });
    before.assert_nothing_new();
}

#[test]
fn dropping_every_handle_hangs_up() {
    let _fds = fd_count_lock();
    runtime().block_on(async {
        let running = start();
        running.client.release(0).await.unwrap();
        let Running { client, server, .. } = running;
        drop(client); // the last handle of that end
        server.await.unwrap().unwrap();
    });
}

/// A client that hung up takes its connection's resources with it, as in the blocking
/// flavour: the server's end of its socket, the shared-memory region the server's end sent
/// its byte strings through, and its mapping of the client's. Not at the next accept, nor
/// when the clients are next counted: a listener no client comes to again would keep them
/// for good.
#[test]
fn a_departed_async_clients_socket_and_shared_memory_go_once_its_serving_ends() {
    let _fds = fd_count_lock();
    let rt = runtime();
    rt.block_on(async {
        let name = format!("typed-ipc-async-departed-{}", std::process::id());
        let serving = AsyncServer::new()
            .service(LabServer::new(LabImpl::new()))
            .listen(AsyncListener::bind_abstract(&name).unwrap());
        let before @ (_, mapped_before) = connection_resources();
        let connection = AsyncConnection::connect_abstract(&name).await.unwrap();
        let client = LabClient::new(connection.clone());
        // Through the lane both ways: each end maps a region of its own and the other's.
        let data = filled(64 * 1024, 1);
        let mut expected = data.clone();
        expected.reverse();
        assert_eq!(client.echo(data, Vec::new()).await.unwrap(), expected);
        assert!(
            memfd_mappings() > mapped_before,
            "the echo went through shared memory"
        );
        drop(client);
        connection.close();
        connection.wait_closed().await;
        drop(connection);
        // The client's task on the server ends just after its hang-up; no event marks that
        // (and `AsyncServing::clients`, which would wait for it, also forgets it), so this
        // polls, bounded.
        let since = std::time::Instant::now();
        while !resources_back(before, since, HANG_GUARD) {
            tokio::task::yield_now().await;
        }
        serving.shutdown().await;
    });
}

#[test]
fn a_hundred_clients_of_both_flavours_on_one_listener() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = fd_snapshot();
    rt.block_on(async {
        let name = format!("typed-ipc-async-listener-{}", std::process::id());
        let listener = AsyncListener::bind_abstract(&name).unwrap();
        let serving = AsyncServer::new()
            .service(LabServer::new(LabImpl::new()))
            .listen(listener);
        let async_connected = Arc::new(Barrier::new(50));
        let blocking_connected = Arc::new(std::sync::Barrier::new(50));
        let mut clients = Vec::new();
        for i in 0..50u32 {
            let (name, all) = (name.clone(), async_connected.clone());
            clients.push(tokio::spawn(async move {
                let client =
                    LabClient::new(AsyncConnection::connect_abstract(&name).await.unwrap());
                all.wait().await;
                for j in 0..20u32 {
                    let data = (i * 1000 + j).to_le_bytes().to_vec();
                    let mut expected = data.clone();
                    expected.reverse();
                    assert_eq!(client.echo(data, indexed_fds(1)).await.unwrap(), expected);
                }
                let connection = client.connection().clone();
                drop(client);
                connection.close();
                connection.wait_closed().await;
            }));
        }
        for i in 50..100u32 {
            let (name, all) = (name.clone(), blocking_connected.clone());
            clients.push(tokio::task::spawn_blocking(move || {
                let connection = Connection::connect_abstract(&name).unwrap();
                let client = blocking::LabClient::new(connection);
                all.wait();
                for j in 0..20u32 {
                    let data = (i * 1000 + j).to_le_bytes().to_vec();
                    let mut expected = data.clone();
                    expected.reverse();
                    assert_eq!(client.echo(data, indexed_fds(1)).unwrap(), expected);
                }
            }));
        }
        for client in clients {
            client.await.unwrap();
        }
        serving.shutdown().await;
    });
    before.assert_nothing_new();
}

/// The blocking flavour of [`Lab`], for blocking clients of the async server.
mod blocking {
    use std::os::fd::OwnedFd;

    #[typed_ipc::interface]
    pub trait Lab {
        fn echo(&self, data: Vec<u8>, files: Vec<OwnedFd>) -> Vec<u8>;
        fn wait_for(&self, key: u32) -> u32;
        fn release(&self, key: u32);
        fn caller_pid(&self) -> i32;
        #[oneway]
        fn count(&self, seq: u64);
        fn counted(&self, n: u64) -> bool;
        fn slow_fd(&self, key: u32) -> OwnedFd;
        fn meet(&self, n: u32) -> u32;
    }
}

#[test]
fn the_implementation_sees_peer_credentials_and_the_server_can_refuse() {
    let _fds = fd_count_lock();
    runtime().block_on(async {
        let name = format!("typed-ipc-async-creds-{}", std::process::id());
        let server = AsyncServer::new()
            .service(LabServer::new(LabImpl::new()))
            .authorize(|peer, iface, cmd| {
                let release = iface
                    .methods
                    .iter()
                    .find(|m| m.name == "release")
                    .unwrap()
                    .cmd;
                match peer {
                    Some(p) if cmd == release && p.pid == std::process::id() as i32 => {
                        Err(format!("pid {} may not release", p.pid))
                    }
                    _ => Ok(()),
                }
            });
        let serving = server.listen(AsyncListener::bind_abstract(&name).unwrap());
        let client = LabClient::new(AsyncConnection::connect_abstract(&name).await.unwrap());
        assert_eq!(
            client.caller_pid().await.unwrap(),
            std::process::id() as i32
        );
        match client.release(1).await {
            Err(Error::Refused(why)) => assert!(why.contains("may not release"), "{why}"),
            other => panic!("expected Refused, got {other:?}"),
        }
        assert_eq!(
            client.caller_pid().await.unwrap(),
            std::process::id() as i32
        );
        assert_eq!(serving.clients(), 1);
        drop(client);
        serving.shutdown().await;
    });
}

/// A server of a [`LabImpl`] listening on `name`, a client of it, and that client's call
/// `wait_for(5)`, its handler started and waiting until the key is released.
async fn a_call_in_flight(
    name: &str,
) -> (
    LabImpl,
    AsyncServing,
    LabClient,
    tokio::task::JoinHandle<typed_ipc::Result<u32>>,
) {
    let lab = LabImpl::new();
    let mut entered = lab.entries();
    let serving = AsyncServer::new()
        .service(LabServer::new(lab.clone()))
        .listen(AsyncListener::bind_abstract(name).unwrap());
    let client = LabClient::new(AsyncConnection::connect_abstract(name).await.unwrap());
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.wait_for(5).await }
    });
    assert_eq!(entered.recv().await, Some(5));
    (lab, serving, client, in_flight)
}

#[test]
fn graceful_shutdown_finishes_calls_in_flight_and_stops_accepting() {
    let _fds = fd_count_lock();
    runtime().block_on(async {
        let name = format!("typed-ipc-async-shutdown-{}", std::process::id());
        let (lab, serving, client, in_flight) = a_call_in_flight(&name).await;
        let shutdown = tokio::spawn(serving.shutdown());
        // The server no longer reads, so the test releases the call itself; its reply still
        // goes out before the hang-up.
        lab.release_key(5);
        assert_eq!(in_flight.await.unwrap().unwrap(), 5);
        shutdown.await.unwrap();
        // Told, as its last message, that what it had not had answered did not run.
        assert!(matches!(client.caller_pid().await, Err(Error::ShutDown)));
        assert!(
            AsyncConnection::connect_abstract(&name).await.is_err(),
            "no longer accepting"
        );
    });
}

/// A shutdown given up (its future dropped as a timeout runs out) while a handler waits for
/// good hangs up on its client and cancels that call: the handler's future is dropped, and
/// the client's socket and shared memory go with its task. Before, the task ran on, holding
/// them, for as long as the handler waited: for good here.
#[test]
fn a_shutdown_given_up_cancels_the_calls_still_running() {
    let _fds = fd_count_lock();
    runtime().block_on(async {
        let name = format!("typed-ipc-async-given-up-{}", std::process::id());
        let before = connection_resources();
        let (lab, serving, client, in_flight) = a_call_in_flight(&name).await;
        // The handler never returns: the shutdown waits for good, until it is given up.
        let given_up = tokio::time::timeout(Duration::from_millis(50), serving.shutdown()).await;
        assert!(
            given_up.is_err(),
            "the shutdown did not wait for the handler"
        );
        assert!(matches!(in_flight.await.unwrap(), Err(Error::Disconnected)));
        // The handler's future, the only one waiting for a release, is dropped.
        tokio::time::timeout(HANG_GUARD, lab.0.released.closed())
            .await
            .expect("the handler ran on after the shutdown was given up");
        drop(client);
        // Its task ends just after; no event marks that, so this polls, bounded.
        let since = std::time::Instant::now();
        while !resources_back(before, since, HANG_GUARD) {
            tokio::task::yield_now().await;
        }
    });
}

/// Stops its own server, from inside a handler: a client asking the server to quit.
#[interface]
pub trait Quit {
    /// Awaits the server's `shutdown`, then answers 7.
    async fn quit(&self) -> u32;
    /// Drops the server, then answers 7.
    async fn quit_by_drop(&self) -> u32;
}

/// Holds the server it stops, put there once it listens.
struct Quitter(Arc<Mutex<Option<AsyncServing>>>);

impl Quit for Quitter {
    async fn quit(&self) -> u32 {
        let serving = self.0.lock().unwrap().take();
        serving.expect("asked to quit once").shutdown().await;
        7
    }
    async fn quit_by_drop(&self) -> u32 {
        drop(self.0.lock().unwrap().take().expect("asked to quit once"));
        7
    }
}

/// A handler that shuts its own server down cannot wait for itself: the shutdown hangs up on
/// the other clients, its handler's reply goes out, and its connection ends after. (It waited
/// for its own client's task, which ends only once that handler has returned: for good.) The
/// same when the handler drops the server instead (which hung up on its own client too, so
/// that its reply could not go out).
#[test]
fn a_handler_can_shut_its_own_server_down() {
    let _fds = fd_count_lock();
    // Sockets and the like: each run's runtime is dropped, whose own fds a thread of it may
    // hold for a moment after.
    let before = ipc_fds();
    // On several worker threads, the handler and the client's task may run on different
    // ones; on one, on the same.
    let ways = [false, true]
        .into_iter()
        .flat_map(|by_drop| [4, 1, 4, 1].map(|t| (by_drop, t)));
    for (run, (by_drop, threads)) in ways.enumerate() {
        let rt = match threads {
            1 => common::current_thread_runtime(),
            _ => runtime(),
        };
        rt.block_on(async {
            let name = format!("typed-ipc-async-quit-{}-{run}", std::process::id());
            let slot = Arc::new(Mutex::new(None));
            let serving = AsyncServer::new()
                .service(QuitServer::new(Quitter(slot.clone())))
                .listen(AsyncListener::bind_abstract(&name).unwrap());
            *slot.lock().unwrap() = Some(serving);
            // Accepted first: a client the shutdown hangs up on like any other.
            let other = AsyncConnection::connect_abstract(&name).await.unwrap();
            let client = QuitClient::new(AsyncConnection::connect_abstract(&name).await.unwrap());
            let outcome = match by_drop {
                false => tokio::time::timeout(HANG_GUARD, client.quit()).await,
                true => tokio::time::timeout(HANG_GUARD, client.quit_by_drop()).await,
            };
            let outcome = outcome.expect("the shutdown waited for the handler it was called from");
            assert_eq!(outcome.unwrap(), 7, "{threads} threads, by drop: {by_drop}");
            assert!(
                AsyncConnection::connect_abstract(&name).await.is_err(),
                "no longer accepting"
            );
            // Both connections end: the server's ends hang up.
            for connection in [&other, client.connection()] {
                let ended = tokio::time::timeout(HANG_GUARD, connection.wait_closed()).await;
                ended.expect("the server hangs up on every client");
            }
        });
    }
    // Every socket of the server's is closed, its own client's too.
    assert_eq!(ipc_fds(), before);
}

/// Dropping an `AsyncServing` stops accepting at once, also while its runtime does not run
/// (a handler that dropped its own server, a runtime between `block_on`s): a new client is
/// refused, and one that connected before and was not accepted yet is hung up on, rather
/// than left waiting.
#[test]
fn a_dropped_async_serving_refuses_clients_at_once() {
    let _fds = fd_count_lock();
    let before = ipc_fds();
    let rt = common::current_thread_runtime();
    let name = format!("typed-ipc-async-dropped-refuses-{}", std::process::id());
    let serving = {
        let _entered = rt.enter();
        AsyncServer::new()
            .service(LabServer::new(LabImpl::new()))
            .listen(AsyncListener::bind_abstract(&name).unwrap())
    };
    // Nothing has run the acceptor task: this client waits in the listener's queue.
    let queued = typed_ipc::Socket::connect_abstract(&name).unwrap();
    drop(serving);
    match typed_ipc::Socket::connect_abstract(&name) {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        other => panic!("a client connected to a dropped server: {other:?}"),
    }
    let got = queued.recv_timeout(HANG_GUARD);
    assert!(matches!(got, Err(Error::Disconnected)), "{got:?}");
    drop((queued, rt));
    assert_eq!(ipc_fds(), before);
}

/// Dropping an `AsyncServing` frees its name or path at once, as dropping a blocking
/// `Serving` does, although its runtime has not run the acceptor task since: a server
/// restarted in the same task (a current-thread runtime runs nothing else meanwhile) can
/// listen on the same name, and a path's socket file is gone (new clients get `ENOENT`).
/// The listener was the task's, closed only once the runtime dropped the aborted task.
#[test]
fn a_dropped_async_serving_frees_its_name_and_path_at_once() {
    let _fds = fd_count_lock();
    let before = ipc_fds();
    let rt = common::current_thread_runtime();
    let name = format!("typed-ipc-async-dropped-frees-{}", std::process::id());
    let serve = |listener| {
        AsyncServer::new()
            .service(LabServer::new(LabImpl::new()))
            .listen(listener)
    };
    rt.block_on(async {
        let serving = serve(AsyncListener::bind_abstract(&name).unwrap());
        drop(serving);
        let again = AsyncListener::bind_abstract(&name).expect("the name is free at once");
        serve(again).shutdown().await;
    });
    let path = std::env::temp_dir().join(format!("{name}.sock"));
    let serving = {
        let _entered = rt.enter();
        serve(AsyncListener::bind(&path).unwrap())
    };
    drop(serving);
    assert!(!path.exists(), "the socket file outlived its server");
    drop(rt);
    assert_eq!(ipc_fds(), before);
}

/// An `AsyncServing` that outlives its runtime has stopped accepting for good (the runtime
/// dropped the acceptor task, and the listener with it): a new client is refused rather than
/// queued for nobody, and the name is free to listen on again, as after any other end of
/// accepting. The listener, which `AsyncServing` shares with the task to close it, must not
/// be kept listening by the share `AsyncServing` holds.
#[test]
fn an_async_serving_that_outlived_its_runtime_refuses_clients_and_frees_its_name() {
    let _fds = fd_count_lock();
    let before = ipc_fds();
    let rt = common::current_thread_runtime();
    let name = format!("typed-ipc-async-outlived-{}", std::process::id());
    let serving = {
        let _entered = rt.enter();
        AsyncServer::new()
            .service(LabServer::new(LabImpl::new()))
            .listen(AsyncListener::bind_abstract(&name).unwrap())
    };
    drop(rt);
    assert!(serving.accepting().is_err(), "the acceptor has ended");
    match typed_ipc::Socket::connect_abstract(&name) {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        other => panic!("a client connected to a server whose runtime is gone: {other:?}"),
    }
    drop(typed_ipc::Listener::bind_abstract(&name).expect("the name is free again"));
    drop(serving);
    assert_eq!(ipc_fds(), before);
}

/// A client the acceptor task had accepted, and was setting up (its `service_with` ran),
/// when `AsyncServing` was dropped on another thread is hung up on like the clients served
/// already, not served on by a task that nothing ends any more.
#[test]
fn a_client_accepted_as_the_async_serving_is_dropped_is_hung_up_on() {
    let _fds = fd_count_lock();
    let before = ipc_fds();
    let rt = common::two_worker_runtime();
    let client_rt = common::current_thread_runtime();
    let name = format!("typed-ipc-async-dropped-mid-accept-{}", std::process::id());
    // Met twice by the client's `service_with`: once it runs, and once the test has dropped
    // the server.
    let meet = Arc::new(std::sync::Barrier::new(2));
    let serving = {
        let _entered = rt.enter();
        let meet = meet.clone();
        AsyncServer::new()
            .service_with(move |_| {
                meet.wait();
                meet.wait();
                LabServer::new(LabImpl::new())
            })
            .listen(AsyncListener::bind_abstract(&name).unwrap())
    };
    let client = client_rt.block_on(async {
        LabClient::new(AsyncConnection::connect_abstract(&name).await.unwrap())
    });
    meet.wait();
    drop(serving);
    meet.wait();
    let got =
        client_rt.block_on(async { tokio::time::timeout(HANG_GUARD, client.caller_pid()).await });
    let got = got.expect("the client is hung up on");
    assert!(matches!(got, Err(Error::Disconnected)), "{got:?}");
    drop((client, client_rt, rt));
    assert_eq!(ipc_fds(), before);
}

/// A dropped runtime's own fds (its epoll instance and its eventfd) are closed once the drop
/// returns, also when it connected and shut a server down. The threads of the library's own
/// those wait on (the connect, which may wait for good; the shutdown's watch of stalled sends)
/// told the waiting task through a tokio oneshot, whose sender holds the task's waker, and
/// through it the runtime, until it drops its half of the channel: just after the task may
/// have gone on. A runtime dropped meanwhile left its fds open until that thread ran again,
/// which on a loaded machine was after the next test had counted its fds. Pinned to one CPU,
/// the woken task usually runs first.
#[test]
fn a_dropped_runtime_closes_its_fds_although_it_connected_and_shut_a_server_down() {
    let _fds = fd_count_lock();
    common::pin_to_one_cpu();
    let runtime_fds =
        || common::fds_named("anon_inode:[eventfd]") + common::fds_named("anon_inode:[eventpoll]");
    let before = runtime_fds();
    for round in 0..100 {
        let rt = common::current_thread_runtime();
        rt.block_on(async {
            let name = format!("typed-ipc-runtime-fds-{}-{round}", std::process::id());
            let serving = AsyncServer::new()
                .service(LabServer::new(LabImpl::new()))
                .listen(AsyncListener::bind_abstract(&name).unwrap());
            let client = LabClient::new(AsyncConnection::connect_abstract(&name).await.unwrap());
            // Served: the shutdown has a client whose sends it watches.
            assert_eq!(
                client.caller_pid().await.unwrap(),
                std::process::id() as i32
            );
            serving.shutdown().await;
        });
        drop(rt);
        assert_eq!(
            runtime_fds(),
            before,
            "round {round}: the dropped runtime's fds are still open"
        );
    }
}

/// The authorizer is user code like a handler: a panic in it refuses that one request (its
/// caller hears so at once) and ends no task of the connection's, so the requests after it
/// still run — the calls that wait for a oneway it panicked on among them.
#[test]
fn a_panicking_authorizer_refuses_the_request_and_the_connection_serves_on() {
    let _fds = fd_count_lock();
    runtime().block_on(async {
        let (a, b) = AsyncConnection::pair().unwrap();
        let server = AsyncServer::new()
            .service(LabServer::new(LabImpl::new()))
            .authorize(common::panicking_authorizer());
        let serving = tokio::spawn(server.serve(&b));
        drop(b);
        // (The timeout only keeps a regression from hanging: the answer comes at once.)
        let client = LabClient::new(a).with_timeout(Duration::from_secs(60));
        match client.caller_pid().await {
            Err(Error::Refused(why)) => assert!(why.contains("authorizer panicked"), "{why}"),
            other => panic!("expected Refused, got {other:?}"),
        }
        // A oneway it panics on, then a call that runs only once that oneway is done with.
        client.count(0).await.unwrap();
        assert_eq!(
            client.caller_pid().await.unwrap(),
            std::process::id() as i32
        );
        drop(client);
        serving.await.unwrap().unwrap();
    });
}

// ---- a service per client: `AsyncServer::service_with` ----

/// What `AsyncServer::service_with` makes for each client here.
#[interface]
pub trait Tally {
    /// Adds one to this client's count and returns it.
    async fn bump(&self) -> u64;
    /// Asks the caller's `Back::times` for `n` times its factor, mid-call, and returns that.
    async fn ask_back(&self, n: u64) -> u64;
}

/// What each client serves on its end, for its `Tally` to call it back.
#[interface]
pub trait Back {
    /// `n` times this client's factor.
    async fn times(&self, n: u64) -> u64;
}

/// One client's `Tally`: its own count, and that client to call back. Says its client's id
/// on `dropped` when dropped.
struct TallyImpl {
    count: std::sync::atomic::AtomicU64,
    caller: BackClient,
    id: u64,
    dropped: mpsc::UnboundedSender<u64>,
}

impl Tally for TallyImpl {
    async fn bump(&self) -> u64 {
        self.count.fetch_add(1, Ordering::SeqCst) + 1
    }
    async fn ask_back(&self, n: u64) -> u64 {
        self.caller.times(n).await.unwrap()
    }
}

impl Drop for TallyImpl {
    fn drop(&mut self) {
        let _ = self.dropped.send(self.id);
    }
}

struct Factor(u64);

impl Back for Factor {
    async fn times(&self, n: u64) -> u64 {
        n * self.0
    }
}

/// A server of a `Tally` per client, numbered from 1 in the order they connect; each one's
/// id goes to `dropped` when it is dropped.
fn tally_per_client(dropped: mpsc::UnboundedSender<u64>) -> AsyncServer {
    let made = std::sync::atomic::AtomicU64::new(0);
    AsyncServer::new().service_with(move |connection| {
        TallyServer::new(TallyImpl {
            count: Default::default(),
            caller: BackClient::new(connection.clone()),
            id: made.fetch_add(1, Ordering::SeqCst) + 1,
            dropped: dropped.clone(),
        })
    })
}

/// A client of `name` that serves `Back` with `factor` on its end.
async fn tally_client(name: &str, factor: u64) -> TallyClient {
    let connection = AsyncConnection::connect_abstract(name).await.unwrap();
    connection.add_service(BackServer::new(Factor(factor)));
    TallyClient::new(connection)
}

/// Hangs `client` up and waits until its socket can close.
async fn hang_up(client: TallyClient) {
    let connection = client.connection().clone();
    drop(client);
    connection.close();
    connection.wait_closed().await;
}

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(60);

#[test]
fn service_with_gives_each_client_a_service_of_its_own_that_calls_it_back() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = fd_snapshot();
    rt.block_on(async {
        let name = format!("typed-ipc-async-per-client-{}", std::process::id());
        let (dropped, mut drops) = mpsc::unbounded_channel();
        let serving =
            tally_per_client(dropped).listen(AsyncListener::bind_abstract(&name).unwrap());
        let a = tally_client(&name, 2).await;
        assert_eq!(a.bump().await.unwrap(), 1);
        let b = tally_client(&name, 3).await;
        assert_eq!(a.bump().await.unwrap(), 2);
        assert_eq!(b.bump().await.unwrap(), 1, "b counts on its own");
        assert_eq!(a.bump().await.unwrap(), 3);
        // Each handler calls back its own caller, through the connection it was made with.
        assert_eq!(a.ask_back(5).await.unwrap(), 10);
        assert_eq!(b.ask_back(5).await.unwrap(), 15);
        // `a` hangs up: its service, which holds a clone of its connection, is dropped.
        hang_up(a).await;
        let a_dropped = tokio::time::timeout(HANG_GUARD, drops.recv()).await;
        assert_eq!(a_dropped, Ok(Some(1)), "a's service is dropped");
        // `b` is served on, with its own state.
        assert_eq!(b.bump().await.unwrap(), 2);
        assert_eq!(b.ask_back(7).await.unwrap(), 21);
        hang_up(b).await;
        let b_dropped = tokio::time::timeout(HANG_GUARD, drops.recv()).await;
        assert_eq!(b_dropped, Ok(Some(2)), "b's service is dropped");
        serving.shutdown().await;
    });
    // No cycle connection -> service -> connection kept a socket open.
    before.assert_nothing_new();
}

#[test]
fn serve_with_a_service_per_connection_closes_the_socket_once_the_peer_hangs_up() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = fd_snapshot();
    rt.block_on(async {
        let (dropped, mut drops) = mpsc::unbounded_channel();
        let (ours, theirs) = AsyncConnection::pair().unwrap();
        let served = tally_per_client(dropped).serve(&ours);
        drop(ours);
        theirs.add_service(BackServer::new(Factor(4)));
        let tally = TallyClient::new(theirs);
        assert_eq!(tally.bump().await.unwrap(), 1);
        assert_eq!(tally.ask_back(3).await.unwrap(), 12);
        hang_up(tally).await;
        served.await.unwrap();
        let dropped = tokio::time::timeout(HANG_GUARD, drops.recv()).await;
        assert_eq!(dropped, Ok(Some(1)));
    });
    // `ours` went with the future `serve` returned: nothing holds the socket any more.
    before.assert_nothing_new();
}

#[test]
fn serve_panics_on_an_interface_a_service_with_serves_twice() {
    let _fds = fd_count_lock();
    let rt = runtime();
    rt.block_on(async {
        let (ours, _theirs) = AsyncConnection::pair().unwrap();
        let (dropped, _drops) = mpsc::unbounded_channel();
        let again = dropped.clone();
        let server = tally_per_client(dropped).service_with(move |connection| {
            TallyServer::new(TallyImpl {
                count: Default::default(),
                caller: BackClient::new(connection.clone()),
                id: 0,
                dropped: again.clone(),
            })
        });
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(server.serve(&ours));
        }))
        .unwrap_err();
        let message = panic.downcast_ref::<String>().unwrap();
        assert!(
            message.contains("AsyncServer::service_with: interface `Tally` is already served"),
            "{message}"
        );
    });
}

/// [`a_call_to_a_peer_that_said_its_other_version_and_hung_up_reports_the_version`] of
/// `tests/connection.rs`, from the async flavour: a call, and a oneway, to a peer of another
/// wire version that said so and hung up report its version, not a bare `Disconnected`.
#[test]
fn a_send_to_a_peer_that_said_its_other_version_and_hung_up_reports_the_version() {
    let _fds = fd_count_lock();
    for oneway in [false, true] {
        let (ours, other) = common::peer_said_another_version();
        runtime().block_on(async {
            let client = LabClient::new(AsyncConnection::new(ours).unwrap());
            let sent = match oneway {
                true => client.count(1).await,
                false => client.caller_pid().await.map(drop),
            };
            match sent {
                Err(Error::VersionMismatch { theirs, .. }) => assert_eq!(theirs, other),
                sent => panic!("oneway {oneway}: expected VersionMismatch, got {sent:?}"),
            }
        });
    }
}

/// A client's `Back` that says when it is called, then answers only once released.
struct GatedBack {
    entered: mpsc::UnboundedSender<()>,
    release: watch::Receiver<bool>,
}

impl Back for GatedBack {
    async fn times(&self, n: u64) -> u64 {
        let _ = self.entered.send(());
        let _ = self.release.clone().wait_for(|&released| released).await;
        n * 2
    }
}

/// A graceful shutdown (`stop_reading`, as `AsyncServing::shutdown` does) lets the calls in
/// flight finish: one whose handler waits for a call back into its client, as a service of
/// `service_with` makes, gets that reply, and then the client its own. (The read side was
/// shut at once: the client's reply could not be sent, and the handler's call back failed
/// with `Disconnected` with the client alive and answering.)
#[test]
fn a_call_back_in_flight_when_the_server_stops_reading_is_answered() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = ipc_fds();
    rt.block_on(async {
        let (client_end, server_end) = AsyncConnection::pair().unwrap();
        let (dropped, _drops) = mpsc::unbounded_channel();
        // Spawned, as the blocking twin's serving thread: `serve`'s future holds a handle on
        // the connection until it has run to its end. Held unpolled, it kept the socket open
        // after the server's end: a `bump` that reached the server before its read side shut
        // (the reply to `ask_back` goes out before that call counts as finished) was dropped,
        // and its caller waited for a hang-up that only came with that handle.
        let serving = tokio::spawn(server_end.serve(TallyServer::new(TallyImpl {
            count: Default::default(),
            caller: BackClient::new(server_end.clone()),
            id: 1,
            dropped,
        })));
        let (entered, mut called_back) = mpsc::unbounded_channel();
        let (release, gate) = watch::channel(false);
        client_end.add_service(BackServer::new(GatedBack {
            entered,
            release: gate,
        }));
        let tally = TallyClient::new(client_end.clone());
        let call = tokio::spawn({
            let tally = tally.clone();
            async move { tally.ask_back(3).await }
        });
        called_back.recv().await.unwrap(); // the server's handler waits for the client
        server_end.stop_reading();
        drop(server_end);
        release.send(true).unwrap();
        let answered = tokio::time::timeout(HANG_GUARD, call)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answered.unwrap(), 6);
        // Then the server hangs up: later calls fail, and both ends end.
        let after = tokio::time::timeout(HANG_GUARD, tally.bump())
            .await
            .unwrap();
        assert!(matches!(after, Err(Error::Disconnected)), "{after:?}");
        tokio::time::timeout(HANG_GUARD, serving)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        drop(tally);
        client_end.close();
        client_end.wait_closed().await;
    });
    drop(rt);
    assert_eq!(ipc_fds(), before);
}
