//! A server's faults, in both flavours. Across real processes: a failure whose text is
//! longer than the server may send (a long panic message, with the strict limits a server of
//! untrusted clients sets) still reaches its caller, cut, as that failure; the connection
//! serves on. On a listener: requests a client sends while its service is being made wait
//! for it, also past the bounds of the queue, when a thread of the server's reads them. In one
//! process: a `make` that panics inside `serve` leaves the connection served by nothing.
//!
//! The server is this test binary run again for one `#[ignore]`d test (`child_*`).

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use common::{child, fd_count_lock};
use nix::sys::socket::sockopt::SndBufForce;
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, Error, Limits, Listener, Server, interface};

/// Bounds a wait that would otherwise hang a failing test.
const HANG_GUARD: Duration = Duration::from_secs(60);

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

/// A `service_with` whose `make` panics inside `Server::serve` leaves the connection served by
/// nothing, as before `serve`: a call of this end that reads more requests than it holds for
/// nobody fails at once, saying nothing serves them. The connection stayed marked as about to
/// be served, so the call held them for serving threads that never came (up to twice the
/// bounds) and waited for its reply until its timeout.
#[test]
fn a_make_that_panics_in_serve_leaves_the_connection_served_by_nothing() {
    let (ours, theirs) = Connection::pair().unwrap();
    let server = Server::new().service_with(|_: &Connection| -> FaultyServer<FaultyImpl> {
        panic!("make fails (expected)")
    });
    let served = catch_unwind(AssertUnwindSafe(|| server.serve(&ours)));
    assert!(served.is_err(), "make's panic goes on to serve's caller");
    // The notes go from a thread (the socket buffer may not hold them all), which hands the
    // sink back rather than drop it: it hangs up only once the call has returned. Dropped
    // in the thread, it could hang up before the call's request went out (the buffer here holds all
    // the notes, and under load the calling thread may not run until they are sent): then
    // the call's send fails (`EPIPE`), and a send that finds the peer gone reads nothing past
    // the bounds of the queue to learn why, as documented (a serving thread may still come
    // for the requests held: `a_send_to_a_peer_gone_reads_nothing_past_the_bounds_of_the_queue`
    // in the connection's unit tests), so the call failed with `Disconnected`, 1,024 notes
    // held and the rest unread. With the sink alive the request goes out, and the call reads
    // as a caller waiting for its reply must, past the bounds.
    let notes = std::thread::spawn(move || {
        let sink = SinkClient::new(theirs);
        // Sends fail once the call has ended the connection.
        for _ in 0..PAST_THE_BOUNDS {
            if sink.note().is_err() {
                break;
            }
        }
        sink
    });
    assert_refused_as_served_by_nothing(FaultyClient::new(ours).with_timeout(HANG_GUARD).ping());
    drop(notes.join().unwrap());
}

/// The other order of the test above, made certain: the peer sends its notes, more than the
/// queue holds, and hangs up before this end's call goes out. The call's send fails, and it
/// reads to learn why only up to the bounds (a serving thread may still come for the requests
/// held), so it fails with `Disconnected`, the connection not ended: nothing the peer sent
/// before it went is lost, and a serving thread that comes later runs every note, then sees
/// the hang-up.
#[test]
fn a_call_whose_peer_hung_up_first_leaves_its_requests_to_a_later_server() {
    use std::os::fd::AsFd;

    let (ours, theirs) = typed_ipc::Socket::pair().unwrap();
    // Room for all the notes, which nothing reads as they go: more than a stock
    // `net.core.wmem_max` allows (208 KiB, doubled: ~550 notes), but root may force it.
    let room = 8 << 20;
    let _ = nix::sys::socket::setsockopt(&theirs.as_fd(), SndBufForce, &room);
    let sink = SinkClient::new(Connection::new(theirs)).with_timeout(Duration::ZERO);
    for sent in 0..PAST_THE_BOUNDS {
        if let Err(e) = sink.note() {
            assert!(matches!(e, Error::TimedOut), "{e:?}");
            eprintln!("not run: the send buffer held {sent} notes (needs root, or wmem_max)");
            return;
        }
    }
    drop(sink);
    let ours = Connection::new(ours);
    let got = FaultyClient::new(ours.clone())
        .with_timeout(HANG_GUARD)
        .ping();
    assert!(matches!(got, Err(Error::Disconnected)), "{got:?}");
    let notes = std::sync::Arc::new(Notes::default());
    let _guard = common::abort_after("the late server to see the hang-up", HANG_GUARD);
    ours.serve(SinkServer::from_arc(notes.clone())).unwrap();
    assert_eq!(notes.0.load(Ordering::SeqCst), PAST_THE_BOUNDS);
}

/// A `service_with` whose `make` keeps a handle of its client (to call it later) and then
/// panics on a listener: the client is hung up on, as `Server::service_with` says, and a call
/// of the kept handle fails at once. The acceptor only dropped its own handle: the client's
/// call went unread until its timeout, and the kept handle held the client's requests for
/// serving threads that never came.
#[test]
fn a_make_that_panics_on_a_listener_hangs_up_on_its_client() {
    let name = format!("typed-ipc-make-panics-{}", std::process::id());
    let (kept, handle) = mpsc::channel();
    let kept = Mutex::new(kept);
    let serving = Server::new()
        .service_with(move |connection| -> FaultyServer<FaultyImpl> {
            let _ = kept.lock().unwrap().send(connection.clone());
            panic!("make fails (expected)")
        })
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    let theirs = Connection::connect_abstract(&name).unwrap();
    let ours = handle.recv_timeout(HANG_GUARD).unwrap();
    let asked = FaultyClient::new(theirs).with_timeout(HANG_GUARD).ping();
    assert!(matches!(asked, Err(Error::Disconnected)), "{asked:?}");
    assert_failed_at_once(FaultyClient::new(ours).with_timeout(HANG_GUARD).ping());
    serving.shutdown();
}

/// Fails unless `got` failed, and not by waiting for its timeout.
fn assert_failed_at_once(got: Result<u32, Error>) {
    assert!(!matches!(got, Ok(_) | Err(Error::TimedOut)), "{got:?}");
}

/// Fails unless `got` is the failure of a connection that read more requests than it holds
/// with nothing serving them.
fn assert_refused_as_served_by_nothing(got: Result<u32, Error>) {
    match got {
        Err(Error::Malformed(why)) => assert!(why.contains("nothing serves"), "{why}"),
        other => panic!("expected the requests refused as served by nothing, got {other:?}"),
    }
}

/// More requests than a connection queues for its serving threads (1,024).
const PAST_THE_BOUNDS: u64 = 1100;

/// What a server serves each client: notes, counted.
#[interface]
pub trait Sink {
    #[oneway]
    fn note(&self);
    /// How many notes ran.
    fn noted(&self) -> u64;
}

#[derive(Default)]
struct Notes(AtomicU64);

impl Sink for Notes {
    fn note(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn noted(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a client serves its server: a greeting, which first sends the server
/// [`PAST_THE_BOUNDS`] notes.
#[interface]
pub trait Greeter {
    fn hello(&self) -> u32;
}

struct Greets(SinkClient);

impl Greeter for Greets {
    fn hello(&self) -> u32 {
        for _ in 0..PAST_THE_BOUNDS {
            self.0.note().unwrap();
        }
        1
    }
}

/// A `service_with` whose `make` greets its client from a thread of its own, and returns once
/// the greeting is answered (a session set up with the client's help): the notes the client
/// sends first, more than the queue holds, are read by that call while nothing serves yet.
/// They wait for the service being made, which runs them all. The call ended the connection
/// instead ("nothing serves them"), and the client's session was lost.
#[test]
fn requests_read_while_a_clients_service_is_made_wait_for_it_past_the_bounds() {
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-greeted-{}", std::process::id());
    let (greeted, greeting) = mpsc::channel();
    let greeted = Mutex::new(greeted);
    let serving = Server::new()
        .service_with(move |connection| {
            let greeter = GreeterClient::new(connection.clone()).with_timeout(HANG_GUARD);
            let answer = std::thread::spawn(move || greeter.hello()).join().unwrap();
            let _ = greeted.lock().unwrap().send(answer);
            SinkServer::new(Notes::default())
        })
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    be_greeted(&name, &greeting);
    serving.shutdown();
}

/// The client of the `requests_read_while_a_clients_service_is_made…` tests: connects to the
/// server listening at `name`, serves its greeting (which floods it with notes first), and
/// checks that the server's `make` heard the greeting (`greeting`) and every note ran.
fn be_greeted(name: &str, greeting: &mpsc::Receiver<typed_ipc::Result<u32>>) {
    let connection = Connection::connect_abstract(name).unwrap();
    let sink = SinkClient::new(connection.clone()).with_timeout(HANG_GUARD);
    let client = {
        let (connection, sink) = (connection.clone(), sink.clone());
        std::thread::spawn(move || connection.serve(GreeterServer::new(Greets(sink))))
    };
    let answer = greeting.recv_timeout(HANG_GUARD).unwrap();
    assert!(matches!(answer, Ok(1)), "{answer:?}");
    assert_eq!(sink.noted().unwrap(), PAST_THE_BOUNDS, "every note ran");
    connection.close();
    client.join().unwrap().unwrap();
}

/// A call that waits at a gate, and one that does not.
#[interface]
pub trait Gated {
    /// Says it started, then returns once the gate opens.
    fn wait(&self) -> u32;
    /// 7.
    fn ping(&self) -> u32;
}

struct Gate {
    entered: Mutex<mpsc::Sender<()>>,
    gate: Mutex<mpsc::Receiver<()>>,
}

impl Gated for Gate {
    fn wait(&self) -> u32 {
        self.entered.lock().unwrap().send(()).unwrap();
        let _ = self.gate.lock().unwrap().recv();
        5
    }
    fn ping(&self) -> u32 {
        7
    }
}

/// A shutdown hangs up on each client as soon as that client's calls are done, not once the
/// clients that came before it are: here the second client, with no call in flight, sees the
/// hang-up (its thread serving callbacks returns) while the first client's handler still
/// runs. It saw it only once that handler had returned (for good, for one that never does):
/// the shutdown held every connection open and closed them one after the other, in the order
/// the clients came, so that a client whose call the shutdown dropped unread waited as long.
#[test]
fn a_shutdown_hangs_up_on_each_client_once_its_calls_are_done_not_in_turn() {
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-hang-up-in-turn-{}", std::process::id());
    let (entered, entering) = mpsc::channel();
    let (open, gate) = mpsc::channel();
    let serving = Server::new()
        .service(GatedServer::new(Gate {
            entered: Mutex::new(entered),
            gate: Mutex::new(gate),
        }))
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    hung_up_in_turn(
        &name,
        &entering,
        || open.send(()).unwrap(),
        || {
            let shutdown = std::thread::spawn(move || serving.shutdown());
            move || shutdown.join().unwrap()
        },
    );
}

/// The clients of the `a_shutdown_hangs_up_on_each_client…` tests, of a server listening at
/// `name` that serves `Gated`: the first waits in `wait` (it says so on `entering`) while
/// `shut_down` starts the shutdown (returning what waits for it to end); the second, with no
/// call in flight, must be hung up on before `open` lets the first's handler return.
fn hung_up_in_turn<W: FnOnce()>(
    name: &str,
    entering: &mpsc::Receiver<()>,
    open: impl FnOnce(),
    shut_down: impl FnOnce() -> W,
) {
    let first = GatedClient::new(Connection::connect_abstract(name).unwrap());
    let waiting = {
        let first = first.clone();
        std::thread::spawn(move || first.wait())
    };
    entering.recv_timeout(HANG_GUARD).unwrap();
    let second = Connection::connect_abstract(name).unwrap();
    let client = GatedClient::new(second.clone()).with_timeout(HANG_GUARD);
    assert_eq!(client.ping().unwrap(), 7, "served");
    let (ended, hung_up) = mpsc::channel();
    std::thread::spawn(move || ended.send(second.run()));
    let shutdown = shut_down();
    let second_served = hung_up.recv_timeout(HANG_GUARD);
    open();
    assert_eq!(
        waiting.join().unwrap().unwrap(),
        5,
        "the call in flight finished"
    );
    shutdown();
    assert!(
        matches!(second_served, Ok(Ok(()))),
        "the second client was not hung up on while the first's handler ran: \
         {second_served:?}"
    );
}

#[cfg(feature = "tokio")]
mod asynchronous {
    use super::*;
    use std::sync::Arc;
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

    /// `a_make_that_panics_in_serve_leaves_the_connection_served_by_nothing`, with an async
    /// server: the requests were held for it up to twice the bounds.
    #[test]
    fn a_make_that_panics_in_serve_leaves_the_connection_served_by_nothing() {
        use typed_ipc::tokio::AsyncServer;
        let runtime = common::two_worker_runtime();
        let (ours, theirs) = typed_ipc::Socket::pair().unwrap();
        let ours = {
            let _in_runtime = runtime.enter();
            AsyncConnection::new(ours).unwrap()
        };
        let server = AsyncServer::new().service_with(
            |_: &AsyncConnection| -> AsyncFaultyServer<AsyncFaultyImpl> {
                panic!("make fails (expected)")
            },
        );
        let served = catch_unwind(AssertUnwindSafe(|| {
            let _in_runtime = runtime.enter();
            drop(server.serve(&ours))
        }));
        assert!(served.is_err(), "make's panic goes on to serve's caller");
        let sink = SinkClient::new(Connection::new(theirs));
        // The async reader takes requests in as they come: the notes end the connection.
        for _ in 0..PAST_THE_BOUNDS {
            if sink.note().is_err() {
                break;
            }
        }
        let faulty = AsyncFaultyClient::new(ours).with_timeout(HANG_GUARD);
        assert_refused_as_served_by_nothing(runtime.block_on(faulty.ping()));
        drop(sink);
    }

    /// `a_make_that_panics_on_a_listener_hangs_up_on_its_client`, with an async server.
    #[test]
    fn a_make_that_panics_on_a_listener_hangs_up_on_its_client() {
        use typed_ipc::tokio::{AsyncListener, AsyncServer};
        let runtime = common::two_worker_runtime();
        let name = format!("typed-ipc-async-make-panics-{}", std::process::id());
        let (kept, handle) = mpsc::channel();
        let kept = Mutex::new(kept);
        let serving = {
            let _in_runtime = runtime.enter();
            AsyncServer::new()
                .service_with(
                    move |connection: &AsyncConnection| -> AsyncFaultyServer<AsyncFaultyImpl> {
                        let _ = kept.lock().unwrap().send(connection.clone());
                        panic!("make fails (expected)")
                    },
                )
                .listen(AsyncListener::bind_abstract(&name).unwrap())
        };
        let theirs = Connection::connect_abstract(&name).unwrap();
        let ours = handle.recv_timeout(HANG_GUARD).unwrap();
        let asked = FaultyClient::new(theirs).with_timeout(HANG_GUARD).ping();
        assert!(matches!(asked, Err(Error::Disconnected)), "{asked:?}");
        let kept = AsyncFaultyClient::new(ours).with_timeout(HANG_GUARD);
        assert_failed_at_once(runtime.block_on(kept.ping()));
        runtime.block_on(serving.shutdown());
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

    /// [`Sink`], async.
    #[interface(name = "Sink")]
    pub trait AsyncSink {
        #[oneway]
        async fn note(&self);
        async fn noted(&self) -> u64;
    }

    #[derive(Default)]
    struct AsyncNotes(AtomicU64);

    impl AsyncSink for AsyncNotes {
        async fn note(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        async fn noted(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// [`Greeter`], async: how the async server calls its blocking client.
    #[interface(name = "Greeter")]
    pub trait AsyncGreeter {
        async fn hello(&self) -> u32;
    }

    /// [`super::requests_read_while_a_clients_service_is_made_wait_for_it_past_the_bounds`],
    /// with an async server: its `make` waits for the greeting (on a thread of its own, so
    /// that the runtime runs the greeting meanwhile).
    #[test]
    fn requests_read_while_a_clients_service_is_made_wait_for_it_past_the_bounds() {
        use typed_ipc::tokio::{AsyncListener, AsyncServer};
        let _fds = fd_count_lock();
        let runtime = common::two_worker_runtime();
        let name = format!("typed-ipc-async-greeted-{}", std::process::id());
        let (greeted, greeting) = mpsc::channel();
        let greeted = Arc::new(Mutex::new(greeted));
        let serving = {
            let _in_runtime = runtime.enter();
            AsyncServer::new()
                .service_with(move |connection| {
                    let greeter = AsyncGreeterClient::new(connection.clone());
                    let (answered, answer) = mpsc::channel();
                    tokio::spawn(async move {
                        let _ = answered.send(greeter.with_timeout(HANG_GUARD).hello().await);
                    });
                    let answer = tokio::task::block_in_place(|| answer.recv().unwrap());
                    let _ = greeted.lock().unwrap().send(answer);
                    AsyncSinkServer::new(AsyncNotes::default())
                })
                .listen(AsyncListener::bind_abstract(&name).unwrap())
        };
        super::be_greeted(&name, &greeting);
        runtime.block_on(serving.shutdown());
    }

    /// [`Gated`], async.
    #[interface(name = "Gated")]
    pub trait AsyncGated {
        async fn wait(&self) -> u32;
        async fn ping(&self) -> u32;
    }

    struct AsyncGate {
        entered: Mutex<mpsc::Sender<()>>,
        gate: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    }

    impl AsyncGated for AsyncGate {
        async fn wait(&self) -> u32 {
            self.entered.lock().unwrap().send(()).unwrap();
            let gate = self.gate.lock().unwrap().take().expect("one wait");
            let _ = gate.await;
            5
        }
        async fn ping(&self) -> u32 {
            7
        }
    }

    /// [`super::a_shutdown_hangs_up_on_each_client_once_its_calls_are_done_not_in_turn`],
    /// with an async server.
    #[test]
    fn a_shutdown_hangs_up_on_each_client_once_its_calls_are_done_not_in_turn() {
        use typed_ipc::tokio::{AsyncListener, AsyncServer};
        let _fds = fd_count_lock();
        let runtime = common::two_worker_runtime();
        let name = format!("typed-ipc-async-hang-up-in-turn-{}", std::process::id());
        let (entered, entering) = mpsc::channel();
        let (open, gate) = tokio::sync::oneshot::channel();
        let serving = {
            let _in_runtime = runtime.enter();
            AsyncServer::new()
                .service(AsyncGatedServer::new(AsyncGate {
                    entered: Mutex::new(entered),
                    gate: Mutex::new(Some(gate)),
                }))
                .listen(AsyncListener::bind_abstract(&name).unwrap())
        };
        super::hung_up_in_turn(
            &name,
            &entering,
            || open.send(()).unwrap(),
            || {
                let shutdown = runtime.spawn(serving.shutdown());
                let runtime = &runtime;
                move || runtime.block_on(shutdown).unwrap()
            },
        );
    }
}
