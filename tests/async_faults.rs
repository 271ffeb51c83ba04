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
    /// Answers 1.
    async fn ping(&self) -> u32;
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
    async fn ping(&self) -> u32 {
        1
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

/// The reply `CutsOffItsReply` starts: 16 MiB inline, and more fds than one datagram
/// carries, so that the rest, sent in the background, takes copies of fds along.
#[derive(serde::Serialize)]
struct BigReply {
    #[serde(with = "typed_ipc::bytes")]
    data: Vec<u8>,
    #[serde(with = "typed_ipc::fds")]
    files: Vec<OwnedFd>,
}

/// Serves `Faults` by hand: `echo` starts a 16 MiB reply and gives up on it after one poll
/// (a timeout around `reply`, say), which the connection finishes in the background; then,
/// if `again`, tries to reply once more. `back` gives up the same way on a small reply, which
/// finds the send lock held (by such a reply still going out). `ping` gets a reply of 1.
/// Says on `cut_off` whether the first poll left the reply unfinished.
struct CutsOffItsReply {
    again: bool,
    cut_off: std::sync::mpsc::SyncSender<bool>,
}

impl typed_ipc::tokio::AsyncService for CutsOffItsReply {
    fn info(&self) -> &'static typed_ipc::service::InterfaceInfo {
        &FAULTS_INFO
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut typed_ipc::tokio::AsyncCall,
    ) -> typed_ipc::tokio::BoxFuture<'a, typed_ipc::Result<()>> {
        Box::pin(async move {
            if call.command() == cmd("ping") {
                return call.reply(1u32).await;
            }
            if call.command() == cmd("back") {
                self.cut_off
                    .send(given_up_at_once(call.reply(2u32)).await)
                    .unwrap();
                return Ok(());
            }
            let big = BigReply {
                data: vec![7; 16 << 20],
                files: indexed_fds(300),
            };
            self.cut_off
                .send(given_up_at_once(call.reply(big)).await)
                .unwrap();
            if self.again {
                call.reply(2u32).await?;
            }
            Ok(())
        })
    }
}

/// Polls `reply` once and drops it, as a handler's timeout around it would: whether it was
/// still going then (given up part-way, or before any of it went out).
async fn given_up_at_once(reply: impl std::future::Future) -> bool {
    let mut reply = std::pin::pin!(reply);
    tokio::select! {
        biased;
        _ = &mut reply => false,
        () = std::future::ready(()) => true,
    }
}

/// The command id of `Faults`' method `name`.
fn cmd(name: &str) -> u32 {
    FAULTS_INFO
        .methods
        .iter()
        .find(|m| m.name == name)
        .unwrap()
        .cmd
}

/// A raw call to `Faults`, command `cmd`, no arguments, from a peer that reads no lanes (so
/// that a large reply comes inline, as several datagrams).
fn raw_call(cmd: u32, cookie: u64) -> Vec<u8> {
    let mut m = vec![1u8, 0, 0, 0]; // kind Call, lane word "reads no lanes"
    m.extend_from_slice(&cmd.to_le_bytes());
    m.extend_from_slice(&cookie.to_le_bytes());
    m.extend_from_slice(&FAULTS_INFO.id.to_le_bytes());
    m.extend_from_slice(&FAULTS_INFO.signature.to_le_bytes());
    m
}

/// A message's kind and cookie, as its envelope says.
fn kind_and_cookie(payload: &[u8]) -> (u8, u64) {
    (
        payload[0],
        u64::from_le_bytes(payload[8..16].try_into().unwrap()),
    )
}

/// A handler gives up on its reply part-way out (`again`: and then replies once more); the
/// rest goes out in the background, and that reply is the call's one answer: the raw peer,
/// having read it, makes one more call and hangs up its sending side, and what it reads to
/// the end is that call's reply alone. Before, the server also sent `Failure #5:
/// Unanswered("the service sent no reply")` (`again`: a second reply), as the call counted
/// as replied to only once `reply` returned.
fn check_a_reply_cut_off_part_way_is_the_only_answer(again: bool) {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = common::fd_snapshot();
    rt.block_on(async {
        let (server, peer, _) = a_reply_cut_off(again).await;
        let after = served_to_the_end(server, move || {
            let reply = peer.recv().unwrap();
            assert_eq!(kind_and_cookie(&reply.payload), (3, 5), "the reply");
            assert!(reply.payload.len() > 16 << 20, "all of it");
            assert_eq!(reply.fds.len(), 300);
            drop(reply);
            peer.send(&raw_call(cmd("ping"), 6), &[]).unwrap();
            rest_after_hanging_up(&peer)
        })
        .await;
        assert_eq!(
            after,
            [(3, 6)],
            "call 5 answered once (kind 3: reply, 4: failure)"
        );
    });
    drop(rt);
    before.assert_nothing_new();
}

/// A server of [`CutsOffItsReply`] (`again`) on one end of a socket pair, the other end,
/// which has sent it call 5 (`echo`) and seen its handler give up on the reply part-way, and
/// where the handler says how each later reply of its went.
async fn a_reply_cut_off(
    again: bool,
) -> (AsyncConnection, Socket, std::sync::mpsc::Receiver<bool>) {
    let (ours, peer) = Socket::pair().unwrap();
    let server = AsyncConnection::new(ours).unwrap();
    let (cut_off, was_cut_off) = std::sync::mpsc::sync_channel(1);
    server.add_service(CutsOffItsReply { again, cut_off });
    let sent = tokio::task::spawn_blocking(move || {
        peer.send(&raw_call(cmd("echo"), 5), &[]).unwrap();
        assert!(
            was_cut_off.recv().unwrap(),
            "the reply went out in one poll"
        );
        (peer, was_cut_off)
    });
    let (peer, was_cut_off) = tokio::time::timeout(Duration::from_secs(60), sent)
        .await
        .expect("the handler never gave up on its reply")
        .unwrap();
    (server, peer, was_cut_off)
}

/// Runs `peer` on a blocking thread while `server` serves, until the server has ended:
/// what `peer` returned.
async fn served_to_the_end<T: Send + 'static>(
    server: AsyncConnection,
    peer: impl FnOnce() -> T + Send + 'static,
) -> T {
    let read = tokio::task::spawn_blocking(peer);
    tokio::time::timeout(Duration::from_secs(60), server.run())
        .await
        .expect("the server did not end")
        .unwrap();
    drop(server);
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the peer did not read to the end")
        .unwrap()
}

/// Shuts `peer`'s sending side down (the server sees a hang-up, and answers what it has
/// read), then reads until the server has hung up too: each message's kind and cookie.
fn rest_after_hanging_up(peer: &Socket) -> Vec<(u8, u64)> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(peer));
    nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    loop {
        match peer.recv() {
            Ok(m) => rest.push(kind_and_cookie(&m.payload)),
            Err(Error::Disconnected) => return rest,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_reply_cut_off_part_way_is_the_calls_only_answer() {
    check_a_reply_cut_off_part_way_is_the_only_answer(false);
}

/// The same, the handler replying again once it gave up on its first reply.
#[test]
fn a_reply_cut_off_part_way_is_the_calls_only_answer_also_if_the_handler_replies_again() {
    check_a_reply_cut_off_part_way_is_the_only_answer(true);
}

/// The peer hangs up while the rest of a reply its handler gave up on is still going out in
/// the background: that send fails, and nothing is left behind: the connection's tasks end
/// (`run` returns), and the reply's fds, the copies the background send took among them,
/// are closed.
#[test]
fn a_reply_cut_off_part_way_to_a_peer_that_goes_leaves_nothing_behind() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = common::fd_snapshot();
    rt.block_on(async {
        let (server, peer, _) = a_reply_cut_off(false).await;
        drop(peer); // gone, the rest of the reply unread
        tokio::time::timeout(Duration::from_secs(60), server.run())
            .await
            .expect("the connection's tasks did not end")
            .unwrap();
        assert!(server.is_closed());
        drop(server);
    });
    drop(rt);
    before.assert_nothing_new();
}

/// A reply given up before any of it went out (it waited for the send lock, which the rest
/// of another reply holds) answers nothing: the call is answered with a failure once its
/// handler returns, after that other reply, and nothing else comes for it.
#[test]
fn a_reply_given_up_before_any_of_it_went_out_leaves_the_call_answered_by_a_failure() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = common::fd_snapshot();
    rt.block_on(async {
        let (server, peer, was_cut_off) = a_reply_cut_off(false).await;
        let rest = served_to_the_end(server, move || {
            peer.send(&raw_call(cmd("back"), 6), &[]).unwrap();
            assert!(was_cut_off.recv().unwrap(), "the small reply did not wait");
            let reply = peer.recv().unwrap();
            assert_eq!(kind_and_cookie(&reply.payload), (3, 5), "the big reply");
            drop(reply);
            rest_after_hanging_up(&peer)
        })
        .await;
        assert_eq!(rest, [(4, 6)], "call 6 answered by a failure alone");
    });
    drop(rt);
    before.assert_nothing_new();
}

/// Sends `numbered(n, [a file holding n])` for n in 0..3, then hangs up and exits, all before
/// its parent serves anything.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_sends_numbered_and_exits() {
    common::current_thread_runtime().block_on(async {
        let conn = typed_ipc::tokio::worker::connection().unwrap();
        let client = FaultsClient::new(conn.clone());
        for n in 0..3u64 {
            client
                .numbered(n, vec![memfd(&n.to_le_bytes())])
                .await
                .unwrap();
        }
        conn.close();
    });
}

/// Reports each `numbered` it runs, with what its files hold.
struct Numbers(tokio::sync::mpsc::UnboundedSender<(u64, Vec<Vec<u8>>)>);

impl Faults for Numbers {
    async fn echo(&self, _data: Vec<u8>, _files: Vec<OwnedFd>) -> Vec<u8> {
        unreachable!("the worker only sends oneways")
    }
    async fn numbered(&self, n: u64, files: Vec<OwnedFd>) {
        let _ = self.0.send((n, files.into_iter().map(read_all).collect()));
    }
    async fn back(&self, _n: u32) -> u32 {
        unreachable!("the worker only sends oneways")
    }
    async fn ping(&self) -> u32 {
        unreachable!("the worker only sends oneways")
    }
}

/// A worker that sent its oneways and exited, its hang-up read, before its parent served.
async fn gone_before_served() -> (typed_ipc::worker::Worker, AsyncConnection) {
    let (mut worker, conn) =
        typed_ipc::tokio::worker::spawn(child("child_sends_numbered_and_exits")).unwrap();
    let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
    assert!(matches!(exit, typed_ipc::worker::Exit::Code(0)), "{exit}");
    // The reader has read the hang-up (after the oneways before it) and ended the connection.
    tokio::time::timeout(Duration::from_secs(20), conn.wait_closed())
        .await
        .expect("the hang-up was never read");
    assert!(conn.is_closed());
    (worker, conn)
}

/// The oneways a worker sent before it exited, read and held while nothing served, run in
/// order once the parent serves, with their fds, as in the blocking flavour (whose serving
/// thread reads them from the socket then): `add_service` says that requests wait for the
/// first service, and `close` that requests sent before the peer hung up still run. Before,
/// reading the hang-up dropped them: the service never saw them.
#[test]
fn oneways_of_a_worker_gone_before_its_parent_served_still_run_in_order() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = common::fd_snapshot();
    rt.block_on(async {
        let (worker, conn) = gone_before_served().await;
        let (tx, mut ran) = tokio::sync::mpsc::unbounded_channel();
        let served = FaultsServer::new(Numbers(tx)).serve(conn.clone());
        tokio::time::timeout(Duration::from_secs(20), served)
            .await
            .expect("serving a connection that had ended did not return")
            .unwrap();
        for n in 0..3u64 {
            let got = ran
                .try_recv()
                .expect("a oneway sent before the hang-up never ran");
            assert_eq!(got, (n, vec![n.to_le_bytes().to_vec()]));
        }
        assert!(ran.try_recv().is_err());
        drop((conn, worker));
    });
    drop(rt);
    before.assert_nothing_new();
}

/// The same held oneways, and nothing ever serves: `close` drops them, or the last handle
/// going does, their fds closed either way.
#[test]
fn oneways_of_a_worker_gone_are_dropped_with_their_fds_if_nothing_serves() {
    let _fds = fd_count_lock();
    let rt = runtime();
    let before = common::fd_snapshot();
    rt.block_on(async {
        for close in [true, false] {
            let (worker, conn) = gone_before_served().await;
            if close {
                conn.close();
            }
            drop((conn, worker));
        }
    });
    drop(rt);
    before.assert_nothing_new();
}

#[typed_ipc::interface]
pub trait Notes {
    /// Panics for every `n` that is 1 modulo 3, before it notes it; notes the others.
    #[oneway]
    async fn note(&self, n: u32);
    /// What was noted, in order.
    async fn seen(&self) -> Vec<u32>;
}

#[derive(Default)]
struct NotesImpl(std::sync::Mutex<Vec<u32>>);

impl Notes for NotesImpl {
    async fn note(&self, n: u32) {
        tokio::task::yield_now().await;
        assert!(n % 3 != 1, "note {n} panics");
        self.0.lock().unwrap().push(n);
    }
    async fn seen(&self) -> Vec<u32> {
        self.0.lock().unwrap().clone()
    }
}

/// Oneways whose handler panics fail on this end's stderr only: the oneways after them still
/// run in the order sent, a call sent after them still runs after them all, and the
/// connection serves on.
#[test]
fn oneways_whose_handler_panics_leave_the_others_in_order_and_the_connection_serving() {
    let _fds = fd_count_lock();
    let rt = runtime();
    rt.block_on(async {
        let (a, b) = AsyncConnection::pair().unwrap();
        let serving = tokio::spawn(NotesServer::new(NotesImpl::default()).serve(b));
        let client = NotesClient::new(a);
        for n in 0..9 {
            client.note(n).await.unwrap();
        }
        let expected: Vec<u32> = (0..9).filter(|n| n % 3 != 1).collect();
        assert_eq!(client.seen().await.unwrap(), expected);
        client.note(9).await.unwrap();
        assert_eq!(client.seen().await.unwrap().last(), Some(&9));
        client.connection().close();
        serving.await.unwrap().unwrap();
    });
}

/// Connects to the abstract name in `NUMBERS_AT`, sends `numbered(n, [a file holding n])`
/// for n in 0..3, and hangs up at once, as a fire-and-forget client does.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_notifies_and_hangs_up() {
    common::current_thread_runtime().block_on(async {
        let name = std::env::var("NUMBERS_AT").unwrap();
        let conn = AsyncConnection::connect_abstract(name).await.unwrap();
        let client = FaultsClient::new(conn.clone());
        for n in 0..3u64 {
            client
                .numbered(n, vec![memfd(&n.to_le_bytes())])
                .await
                .unwrap();
        }
        conn.close();
    });
}

/// Whether `connection`'s socket holds nothing more to read but the peer's hang-up.
fn only_the_end_unread(connection: &typed_ipc::tokio::AsyncConnection) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::{AsFd, AsRawFd};
    let fd = connection.socket().as_fd().as_raw_fd();
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    matches!(recv(fd, &mut [0u8; 1], flags), Ok(0))
}

/// A client of a listener that sends its oneways and hangs up before the server has made
/// its service (`service_with`'s `make` runs until the connection has read the hang-up):
/// the oneways run all the same, in order. Before, reading the hang-up dropped them.
#[test]
fn oneways_of_a_client_gone_before_its_service_was_made_still_run() {
    use typed_ipc::tokio::{AsyncListener, AsyncServer};

    let _fds = fd_count_lock();
    let rt = runtime();
    let before = common::fd_snapshot();
    rt.block_on(async {
        let name = format!("typed-ipc-test-gone-before-made-{}", std::process::id());
        let (tx, mut ran) = tokio::sync::mpsc::unbounded_channel();
        let serving = AsyncServer::new()
            .service_with(move |connection| {
                // The acceptor's worker handed to another thread meanwhile, with the
                // connection's reader, which tokio would not otherwise run before `make`
                // returns (the task last spawned on a worker is not for others to take).
                // Until the reader has read all but the end: `is_closed` alone says so as
                // soon as the kernel knows the peer has gone, read or not (since 2026-12-06),
                // so the socket must also hold nothing more (a peek reads the end, 0 bytes).
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                tokio::task::block_in_place(|| {
                    while !(connection.is_closed() && only_the_end_unread(connection)) {
                        assert!(std::time::Instant::now() < deadline, "no hang-up read");
                        std::thread::yield_now();
                    }
                });
                FaultsServer::new(Numbers(tx.clone()))
            })
            .listen(AsyncListener::bind_abstract(&name).unwrap());
        let mut client = child("child_notifies_and_hangs_up");
        client.env("NUMBERS_AT", &name);
        let status = tokio::task::spawn_blocking(move || client.status().unwrap())
            .await
            .unwrap();
        assert!(status.success());
        for n in 0..3u64 {
            let got = tokio::time::timeout(Duration::from_secs(20), ran.recv())
                .await
                .expect("a oneway sent before the hang-up never ran");
            assert_eq!(got, Some((n, vec![n.to_le_bytes().to_vec()])));
        }
        serving.shutdown().await;
    });
    drop(rt);
    before.assert_nothing_new();
}
