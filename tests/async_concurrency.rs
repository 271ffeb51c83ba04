//! `AsyncServer::max_calls_at_once` and `AsyncConnection::set_max_calls_at_once`: at most `n`
//! of a connection's calls run at once, the others wait in arrival order without a task; a
//! waiting call cancelled never runs, a panicking handler frees its slot, a listener bounds
//! each client on its own, and the fds of the calls waiting when the server closes are closed.
//!
//! The server runs on one current-thread runtime, with the client over a real socket pair or
//! a listener (in a process of its own in one test), so that what ran is seen in the order it
//! ran: each handler reports its entry and exit on one channel, and a oneway `ping` sent after
//! a call reports on it too. Oneways do not count against the limit and run on their own
//! task, so once a `ping` sent after a call has run, that call had started if it could (the
//! reader hands it to its task before it reads the ping, and the task runs first): "not
//! started" is seen by the ping coming first, never by waiting. No sleeps; gates are opened
//! by the test. Every test takes the fd count lock, so that the fd checks see no other test's
//! sockets.

#![cfg(feature = "tokio")]

mod common;

use std::future::{Future, poll_fn};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use common::{abort_after, current_thread_runtime, fd_count_lock, fd_snapshot};
use tokio::sync::{mpsc, watch};
use typed_ipc::tokio::{AsyncConnection, AsyncListener, AsyncServer};
use typed_ipc::{Error, interface};

#[interface]
pub trait Gated {
    /// Reports its entry, waits until the test opens gate `id`, reports its exit (or panics
    /// there if `panics`).
    async fn hold(&self, id: u32, panics: bool) -> u32;
    /// As `hold`, holding `fd` meanwhile.
    async fn hold_fd(&self, id: u32, fd: OwnedFd) -> u32;
    /// Reports `id`.
    #[oneway]
    async fn ping(&self, id: u32);
}

#[derive(Debug, PartialEq, Eq)]
enum Event {
    In(u32),
    Out(u32),
    Ping(u32),
}

#[derive(Clone)]
struct Gates {
    events: mpsc::UnboundedSender<Event>,
    opened: Arc<watch::Sender<Vec<u32>>>,
}

impl Gates {
    fn new() -> (Gates, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        let opened = Arc::new(watch::Sender::new(Vec::new()));
        (Gates { events, opened }, rx)
    }

    fn open(&self, id: u32) {
        self.opened.send_modify(|opened| opened.push(id));
    }

    async fn pass(&self, id: u32) {
        let _ = self.events.send(Event::In(id));
        let mut opened = self.opened.subscribe();
        opened
            .wait_for(|opened| opened.contains(&id))
            .await
            .unwrap();
    }
}

impl Gated for Gates {
    async fn hold(&self, id: u32, panics: bool) -> u32 {
        self.pass(id).await;
        assert!(!panics, "call {id} panics, as told");
        let _ = self.events.send(Event::Out(id));
        id
    }
    async fn hold_fd(&self, id: u32, fd: OwnedFd) -> u32 {
        self.pass(id).await;
        drop(fd);
        let _ = self.events.send(Event::Out(id));
        id
    }
    async fn ping(&self, id: u32) {
        let _ = self.events.send(Event::Ping(id));
    }
}

type Call<T> = Pin<Box<dyn Future<Output = typed_ipc::Result<T>> + 'static>>;

/// Starts `call`: its first poll sends its request (small, to a socket with room, the send
/// lock free), so calls started one after the other arrive in that order.
async fn started<T>(call: impl Future<Output = typed_ipc::Result<T>> + 'static) -> Call<T> {
    let mut call: Call<T> = Box::pin(call);
    poll_fn(|cx| {
        assert!(
            call.as_mut().poll(cx).is_pending(),
            "a held call cannot be done"
        );
        Poll::Ready(())
    })
    .await;
    call
}

/// A client of a server of `gates` on a pair, at most `n` calls at once; the server's end.
fn serve(gates: &Gates, n: usize) -> (GatedClient, AsyncConnection) {
    let (a, b) = AsyncConnection::pair().unwrap();
    let server = AsyncServer::new()
        .service(GatedServer::new(gates.clone()))
        .max_calls_at_once(n);
    tokio::spawn(server.serve(&b));
    (GatedClient::new(a), b)
}

/// Sends a ping and waits for it, checking that nothing else happened first.
async fn ping_comes_next(client: &GatedClient, events: &mut mpsc::UnboundedReceiver<Event>) {
    client.ping(999).await.unwrap();
    assert_eq!(events.recv().await, Some(Event::Ping(999)));
}

#[test]
fn one_at_a_time_runs_calls_strictly_one_after_another_in_arrival_order() {
    let _fds = fd_count_lock();
    let _guard = abort_after("calls limited to one at a time", Duration::from_secs(60));
    current_thread_runtime().block_on(async {
        let (gates, mut events) = Gates::new();
        let (client, _server) = serve(&gates, 1);
        let first = started(client.clone().hold_owned(1)).await;
        assert_eq!(events.recv().await, Some(Event::In(1)));
        let calls = [
            started(client.clone().hold_owned(2)).await,
            started(client.clone().hold_owned(3)).await,
            started(client.clone().hold_owned(4)).await,
        ];
        // Read by now, and not started while the first is held.
        ping_comes_next(&client, &mut events).await;
        // Opened in the reverse order: they still run in the order they came.
        for id in [4, 3, 2, 1] {
            gates.open(id);
        }
        assert_eq!(first.await.unwrap(), 1);
        for (call, id) in calls.into_iter().zip(2..) {
            assert_eq!(call.await.unwrap(), id);
        }
        let mut seen = Vec::new();
        while seen.len() < 7 {
            seen.push(events.recv().await.unwrap());
        }
        use Event::{In, Out};
        let expected = [Out(1), In(2), Out(2), In(3), Out(3), In(4), Out(4)];
        assert_eq!(seen, expected, "one at a time, in arrival order");
        client.connection().close();
    });
}

#[test]
fn two_at_once_lets_exactly_two_run() {
    let _fds = fd_count_lock();
    let _guard = abort_after("calls limited to two at once", Duration::from_secs(60));
    current_thread_runtime().block_on(async {
        let (gates, mut events) = Gates::new();
        let (client, _server) = serve(&gates, 2);
        let one = started(client.clone().hold_owned(1)).await;
        let two = started(client.clone().hold_owned(2)).await;
        assert_eq!(events.recv().await, Some(Event::In(1)));
        assert_eq!(events.recv().await, Some(Event::In(2)));
        let three = started(client.clone().hold_owned(3)).await;
        ping_comes_next(&client, &mut events).await;
        gates.open(2);
        assert_eq!(two.await.unwrap(), 2);
        assert_eq!(events.recv().await, Some(Event::Out(2)));
        // The slot call 2 freed goes to call 3; call 1 still holds the other.
        assert_eq!(events.recv().await, Some(Event::In(3)));
        let four = started(client.clone().hold_owned(4)).await;
        ping_comes_next(&client, &mut events).await;
        for id in [1, 3, 4] {
            gates.open(id);
        }
        assert_eq!(one.await.unwrap(), 1);
        assert_eq!(three.await.unwrap(), 3);
        assert_eq!(four.await.unwrap(), 4);
        client.connection().close();
    });
}

#[test]
fn a_waiting_call_cancelled_never_runs_and_its_fds_are_closed() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let _guard = abort_after("a cancelled waiting call", Duration::from_secs(60));
    current_thread_runtime().block_on(async {
        let (gates, mut events) = Gates::new();
        let (client, server) = serve(&gates, 1);
        let first = started(client.clone().hold_owned(1)).await;
        assert_eq!(events.recv().await, Some(Event::In(1)));
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let waiting = started(client.clone().hold_fd_owned(2, write_end)).await;
        drop(waiting); // its cancel goes out at once: the server drops the call where it waits
        // Its timeout fires on this end while it waits there (it cannot run before call 1
        // is let go: nothing about time is asserted), and its cancel goes out before the
        // ping below, both sent from this task.
        let timed_out = client.with_timeout(Duration::from_millis(20));
        let second = started(async move { timed_out.hold(3, false).await }).await;
        assert!(matches!(second.await, Err(Error::TimedOut)));
        ping_comes_next(&client, &mut events).await;
        // Closed without ever reaching a handler: the only other copy of the write end went
        // with the call's request.
        until_eof(read_end).await;
        gates.open(2);
        gates.open(3);
        gates.open(1);
        assert_eq!(first.await.unwrap(), 1);
        assert_eq!(events.recv().await, Some(Event::Out(1)));
        // The slot is free and the connection serves on: neither cancelled call ran.
        gates.open(5);
        assert_eq!(client.hold(5, false).await.unwrap(), 5);
        assert_eq!(events.recv().await, Some(Event::In(5)));
        assert_eq!(events.recv().await, Some(Event::Out(5)));
        client.connection().close();
        server.wait_closed().await;
    });
    before.assert_nothing_new();
}

#[test]
fn a_panicking_handler_frees_its_slot() {
    let _fds = fd_count_lock();
    let _guard = abort_after("a call after a panic", Duration::from_secs(60));
    current_thread_runtime().block_on(async {
        let (gates, mut events) = Gates::new();
        let (client, _server) = serve(&gates, 1);
        let panics = started({
            let client = client.clone();
            async move { client.hold(1, true).await }
        })
        .await;
        assert_eq!(events.recv().await, Some(Event::In(1)));
        let next = started(client.clone().hold_owned(2)).await;
        ping_comes_next(&client, &mut events).await;
        gates.open(2);
        gates.open(1);
        assert!(matches!(panics.await, Err(Error::Panicked(_))));
        assert_eq!(events.recv().await, Some(Event::In(2)));
        assert_eq!(next.await.unwrap(), 2);
        client.connection().close();
    });
}

#[test]
fn a_listener_bounds_each_client_on_its_own() {
    let _fds = fd_count_lock();
    let _guard = abort_after("two clients of a listener", Duration::from_secs(60));
    current_thread_runtime().block_on(async {
        let (gates, mut events) = Gates::new();
        let name = format!("typed-ipc-test-concurrency-{}", std::process::id());
        let serving = AsyncServer::new()
            .service(GatedServer::new(gates.clone()))
            .max_calls_at_once(1)
            .listen(AsyncListener::bind_abstract(&name).unwrap());
        let a = GatedClient::new(AsyncConnection::connect_abstract(&name).await.unwrap());
        let b = GatedClient::new(AsyncConnection::connect_abstract(&name).await.unwrap());
        // One each, at once: the bound is per client.
        let a1 = started(a.clone().hold_owned(1)).await;
        assert_eq!(events.recv().await, Some(Event::In(1)));
        let b2 = started(b.clone().hold_owned(2)).await;
        assert_eq!(events.recv().await, Some(Event::In(2)));
        // A second of either waits.
        let a3 = started(a.clone().hold_owned(3)).await;
        let b4 = started(b.clone().hold_owned(4)).await;
        ping_comes_next(&a, &mut events).await;
        ping_comes_next(&b, &mut events).await;
        gates.open(1);
        assert_eq!(a1.await.unwrap(), 1);
        assert_eq!(events.recv().await, Some(Event::Out(1)));
        assert_eq!(events.recv().await, Some(Event::In(3)));
        for id in [2, 3, 4] {
            gates.open(id);
        }
        assert_eq!(b2.await.unwrap(), 2);
        assert_eq!(a3.await.unwrap(), 3);
        assert_eq!(b4.await.unwrap(), 4);
        a.connection().close();
        b.connection().close();
        serving.shutdown().await;
    });
}

#[test]
fn closing_cancels_the_call_running_and_drops_those_waiting_closing_their_fds() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let _guard = abort_after(
        "calls waiting as the server closes",
        Duration::from_secs(60),
    );
    current_thread_runtime().block_on(async {
        let (gates, mut events) = Gates::new();
        let (client, server) = serve(&gates, 1);
        let first = started(client.clone().hold_owned(1)).await;
        assert_eq!(events.recv().await, Some(Event::In(1)));
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let waiting = started(client.clone().hold_fd_owned(2, write_end)).await;
        ping_comes_next(&client, &mut events).await;
        // The call running holds its slot for good: the waiting one goes with the close, not
        // once a slot frees; and the one running is cancelled, its reply having nowhere to go:
        // the connection's tasks end with its gate still closed.
        server.close();
        assert!(matches!(waiting.await, Err(Error::Disconnected)));
        until_eof(read_end).await;
        assert!(matches!(first.await, Err(Error::Disconnected)));
        server.wait_closed().await;
        drop(client);
        // Call 1 never got out of its handler (before, it did once its gate opened), and call
        // 2 never ran.
        gates.open(1);
        gates.open(2);
        assert_eq!(events.try_recv().ok(), None);
    });
    before.assert_nothing_new();
}

#[test]
fn raising_the_limit_starts_the_calls_that_now_fit() {
    let _fds = fd_count_lock();
    let _guard = abort_after("a raised limit", Duration::from_secs(60));
    current_thread_runtime().block_on(async {
        let (gates, mut events) = Gates::new();
        let (a, b) = AsyncConnection::pair().unwrap();
        b.set_max_calls_at_once(1);
        let served = b.serve(GatedServer::new(gates.clone()));
        let client = GatedClient::new(a);
        let one = started(client.clone().hold_owned(1)).await;
        assert_eq!(events.recv().await, Some(Event::In(1)));
        let two = started(client.clone().hold_owned(2)).await;
        let three = started(client.clone().hold_owned(3)).await;
        ping_comes_next(&client, &mut events).await;
        b.set_max_calls_at_once(3);
        assert_eq!(events.recv().await, Some(Event::In(2)));
        assert_eq!(events.recv().await, Some(Event::In(3)));
        for id in [1, 2, 3] {
            gates.open(id);
        }
        assert_eq!(one.await.unwrap(), 1);
        assert_eq!(two.await.unwrap(), 2);
        assert_eq!(three.await.unwrap(), 3);
        client.connection().close();
        served.await.unwrap();
    });
}

/// Across processes: a client process's calls to a listener's `max_calls_at_once(1)` run one
/// at a time in the order sent, and one it gives up on while it waits never runs, its fd
/// closed by the server (the child sees its pipe's end). The child is
/// [`child_gated_client`]; it is told on its stdin when its first call has started.
#[test]
fn a_client_process_calls_run_one_at_a_time_and_one_it_gives_up_on_never_runs() {
    use std::io::Write;

    let _fds = fd_count_lock();
    let _guard = abort_after("a client process", Duration::from_secs(60));
    current_thread_runtime().block_on(async {
        let (gates, mut events) = Gates::new();
        let name = format!("typed-ipc-test-concurrency-child-{}", std::process::id());
        let serving = AsyncServer::new()
            .service(GatedServer::new(gates.clone()))
            .max_calls_at_once(1)
            .listen(AsyncListener::bind_abstract(&name).unwrap());
        let mut child = common::child("child_gated_client")
            .env("TYPED_IPC_TEST_LISTENER", &name)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert_eq!(events.recv().await, Some(Event::In(1)));
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        drop(stdin);
        // Calls 2 (given up on), 3 and 4 came before the ping: none started.
        assert_eq!(events.recv().await, Some(Event::Ping(999)));
        for id in [4, 3, 2, 1] {
            gates.open(id);
        }
        use Event::{In, Out};
        for expected in [Out(1), In(3), Out(3), In(4), Out(4)] {
            assert_eq!(events.recv().await, Some(expected));
        }
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap();
        assert!(status.unwrap().success(), "the client process failed");
        serving.shutdown().await;
    });
}

/// The client process of
/// [`a_client_process_calls_run_one_at_a_time_and_one_it_gives_up_on_never_runs`].
#[test]
#[ignore = "run as a child process by its parent test"]
fn child_gated_client() {
    let name = std::env::var("TYPED_IPC_TEST_LISTENER").unwrap();
    current_thread_runtime().block_on(async {
        let connection = AsyncConnection::connect_abstract(&name).await.unwrap();
        let client = GatedClient::new(connection);
        let first = started(client.clone().hold_owned(1)).await;
        let go = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        });
        assert_eq!(go.await.unwrap().unwrap(), "go\n");
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        drop(started(client.clone().hold_fd_owned(2, write_end)).await);
        let third = started(client.clone().hold_owned(3)).await;
        let fourth = started(client.clone().hold_owned(4)).await;
        client.ping(999).await.unwrap();
        // The server closed its copy of the write end, dropping call 2 where it waited.
        until_eof(read_end).await;
        assert_eq!(first.await.unwrap(), 1);
        assert_eq!(third.await.unwrap(), 3);
        assert_eq!(fourth.await.unwrap(), 4);
        client.connection().close();
    });
}

#[test]
#[should_panic(expected = "AsyncServer::max_calls_at_once(0)")]
fn zero_calls_at_once_panics() {
    let _ = AsyncServer::new().max_calls_at_once(0);
}

/// Reads `read_end` to its end, which comes once every copy of the write end is closed.
async fn until_eof(read_end: OwnedFd) {
    use std::io::Read;
    let read = move || std::fs::File::from(read_end).read_to_end(&mut Vec::new());
    tokio::task::spawn_blocking(read).await.unwrap().unwrap();
}

/// Owned calls, so that a started call's future holds its client.
trait Owned {
    fn hold_owned(self, id: u32) -> Call<u32>;
    fn hold_fd_owned(self, id: u32, fd: OwnedFd) -> Call<u32>;
}

impl Owned for GatedClient {
    fn hold_owned(self, id: u32) -> Call<u32> {
        Box::pin(async move { self.hold(id, false).await })
    }
    fn hold_fd_owned(self, id: u32, fd: OwnedFd) -> Call<u32> {
        Box::pin(async move { self.hold_fd(id, fd).await })
    }
}
