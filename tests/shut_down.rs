//! A peer that shuts down gracefully tells its clients which of their calls did not run:
//! those it has not answered fail with `Error::ShutDown`, not `Disconnected`, so a caller
//! can send them elsewhere without running anything twice. A listening server does so as it
//! stops, a worker when it means to exit (`shut_down` on its connection), in both flavours.
//!
//! Each test checks the promise itself: every call answered ran, and no call told
//! `ShutDown` did. Nothing here synchronises by sleeping; the timeouts only turn a hang into
//! a failure.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{child, fd_count_lock, fd_snapshot, memfd, read_all};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, Error, Listener, Server, interface};

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// What the servers here serve.
#[interface]
pub trait Counter {
    /// Counts one run, and returns how many have run.
    fn tick(&self) -> u64;
    /// Waits until the test lets it go ([`Counting::let_go`]), then returns 7.
    fn hold(&self) -> u64;
    /// Does nothing.
    #[oneway]
    fn note(&self);
    /// Shuts this end of the connection down (`Connection::shut_down`), keeping `tally`, into
    /// which the worker writes how many ticks ran once it has stopped serving.
    fn retire(&self, tally: OwnedFd);
}

/// The state of one server, which the test keeps a handle on.
#[derive(Clone, Default)]
struct Counting(Arc<CountingState>);

#[derive(Default)]
struct CountingState {
    ticks: AtomicU64,
    /// (a `hold` has entered, the test let it go)
    gate: Mutex<(bool, bool)>,
    changed: Condvar,
    /// The worker's connection to its parent, for `retire`.
    connection: Mutex<Option<Connection>>,
    tally: Mutex<Option<OwnedFd>>,
}

impl Counting {
    fn ticks(&self) -> u64 {
        self.0.ticks.load(Ordering::SeqCst)
    }
    /// Waits until a `hold` is running.
    fn wait_entered(&self) {
        let mut gate = self.0.gate.lock().unwrap();
        while !gate.0 {
            gate = self.0.changed.wait(gate).unwrap();
        }
    }
    fn let_go(&self) {
        self.0.gate.lock().unwrap().1 = true;
        self.0.changed.notify_all();
    }
}

impl Counter for Counting {
    fn tick(&self) -> u64 {
        self.0.ticks.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn hold(&self) -> u64 {
        let mut gate = self.0.gate.lock().unwrap();
        gate.0 = true;
        self.0.changed.notify_all();
        while !gate.1 {
            gate = self.0.changed.wait(gate).unwrap();
        }
        7
    }
    fn note(&self) {}
    fn retire(&self, tally: OwnedFd) {
        *self.0.tally.lock().unwrap() = Some(tally);
        let connection = self.0.connection.lock().unwrap().clone();
        connection.expect("served by a worker").shut_down();
    }
}

/// Calls `tick` until a call fails, checking that each answer counts one more run than the
/// last; returns how many were answered, and the error.
fn tick_until_refused(client: &CounterClient, mut answered: u64) -> (u64, Error) {
    loop {
        match client.tick() {
            Ok(n) => {
                answered += 1;
                assert_eq!(n, answered, "a tick ran that was not answered");
            }
            Err(e) => return (answered, e),
        }
    }
}

/// A listening server's graceful shutdown: the call in flight finishes and its reply goes
/// out, and every call its client makes after that is told that it did not run. A client
/// calling as the shutdown reaches it gets its answers up to there, and `ShutDown` from
/// then on (for calls sent before its server's end stopped reading and after alike: which
/// it gets varies from run to run); a `#[oneway]` message is refused the same way. Before,
/// all of them failed with `Disconnected`, which says nothing of whether they ran.
#[test]
fn a_graceful_shutdown_tells_each_client_that_its_calls_did_not_run() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let name = format!("typed-ipc-shut-down-{}", std::process::id());
    let counting = Counting::default();
    let serving = Server::new()
        .service(CounterServer::new(counting.clone()))
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    let connect = || {
        CounterClient::new(Connection::connect_abstract(&name).unwrap()).with_timeout(HANG_GUARD)
    };
    let (holding, ticking) = (connect(), connect());
    assert_eq!(ticking.tick().unwrap(), 1);
    let held = {
        let holding = holding.clone();
        std::thread::spawn(move || holding.hold())
    };
    counting.wait_entered();
    let shutdown = std::thread::spawn(move || serving.shutdown());

    let (answered, ended) = tick_until_refused(&ticking, 1);
    assert!(matches!(ended, Error::ShutDown), "{ended:?}");
    assert!(matches!(ticking.tick(), Err(Error::ShutDown)));
    assert!(matches!(ticking.note(), Err(Error::ShutDown)));

    counting.let_go();
    assert_eq!(
        held.join().unwrap().unwrap(),
        7,
        "the call in flight replied"
    );
    shutdown.join().unwrap();
    let after = holding.tick();
    assert!(matches!(after, Err(Error::ShutDown)), "{after:?}");
    assert_eq!(
        counting.ticks(),
        answered,
        "a call told it did not run, ran"
    );
    drop((holding, ticking));
    before.assert_nothing_new();
}

/// A worker that means to exit shuts its connection down from a handler: the calls its
/// parent had in flight are answered (a tick running on its other thread), the rest fail with
/// `ShutDown`, its `serve` returns `Ok(())` and it exits. The count of ticks it ran, written
/// as it exits, is the count its parent had answered.
#[test]
fn a_worker_that_shuts_down_tells_its_parent_which_calls_did_not_run() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (mut worker, connection) = Worker::spawn(child("child_retires")).unwrap();
    let client = CounterClient::new(connection).with_timeout(HANG_GUARD);
    let (first, answered_once) = std::sync::mpsc::channel();
    let ticker = {
        let client = client.clone();
        std::thread::spawn(move || {
            assert_eq!(client.tick().unwrap(), 1);
            first.send(()).unwrap();
            tick_until_refused(&client, 1)
        })
    };
    answered_once.recv().unwrap();
    let tally = memfd(b"");
    client.retire(tally.try_clone().unwrap()).unwrap();
    let (answered, ended) = ticker.join().unwrap();
    assert!(matches!(ended, Error::ShutDown), "{ended:?}");
    assert!(matches!(client.note(), Err(Error::ShutDown)));
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    assert_eq!(
        read_all(tally),
        answered.to_le_bytes(),
        "ticks run / answered"
    );
    drop((client, worker));
    before.assert_nothing_new();
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_retires() {
    let connection = worker::connection().unwrap();
    let counting = Counting::default();
    *counting.0.connection.lock().unwrap() = Some(connection.clone());
    Server::new()
        .service(CounterServer::new(counting.clone()))
        .threads(2)
        .serve(&connection)
        .unwrap();
    // Served to the end: every tick that ran has been answered.
    let tally = counting.0.tally.lock().unwrap().take().expect("retired");
    File::from(tally)
        .write_all(&counting.ticks().to_le_bytes())
        .unwrap();
}

/// The same in the async flavour.
#[cfg(feature = "tokio")]
mod asynchronous {
    use super::*;
    use common::{current_thread_runtime, ipc_fds, two_worker_runtime};
    use tokio::sync::Semaphore;
    use typed_ipc::tokio::{AsyncConnection, AsyncListener, AsyncServer};

    /// [`Counter`], async.
    #[interface]
    pub trait AsyncCounter {
        /// Counts one run, and returns how many have run.
        async fn tick(&self) -> u64;
        /// Waits until the test lets it go (a permit of `gate`), then returns 7.
        async fn hold(&self) -> u64;
        /// Does nothing.
        #[oneway]
        async fn note(&self);
        /// Shuts this end of the connection down (`AsyncConnection::shut_down`), keeping
        /// `tally`, into which the worker writes how many ticks ran once it has stopped
        /// serving.
        async fn retire(&self, tally: OwnedFd);
    }

    #[derive(Clone)]
    struct Counting(Arc<CountingState>);

    struct CountingState {
        ticks: AtomicU64,
        /// A permit for each `hold` that has started.
        entered: Semaphore,
        /// A permit for each `hold` to return.
        gate: Semaphore,
        connection: Mutex<Option<AsyncConnection>>,
        tally: Mutex<Option<OwnedFd>>,
    }

    impl Counting {
        fn new() -> Counting {
            Counting(Arc::new(CountingState {
                ticks: AtomicU64::new(0),
                entered: Semaphore::new(0),
                gate: Semaphore::new(0),
                connection: Mutex::new(None),
                tally: Mutex::new(None),
            }))
        }
        fn ticks(&self) -> u64 {
            self.0.ticks.load(Ordering::SeqCst)
        }
    }

    impl AsyncCounter for Counting {
        async fn tick(&self) -> u64 {
            self.0.ticks.fetch_add(1, Ordering::SeqCst) + 1
        }
        async fn hold(&self) -> u64 {
            self.0.entered.add_permits(1);
            self.0.gate.acquire().await.unwrap().forget();
            7
        }
        async fn note(&self) {}
        async fn retire(&self, tally: OwnedFd) {
            *self.0.tally.lock().unwrap() = Some(tally);
            let connection = self.0.connection.lock().unwrap().clone();
            connection.expect("served by a worker").shut_down();
        }
    }

    /// [`super::tick_until_refused`], async.
    async fn tick_until_refused(client: &AsyncCounterClient, mut answered: u64) -> (u64, Error) {
        loop {
            match client.tick().await {
                Ok(n) => {
                    answered += 1;
                    assert_eq!(n, answered, "a tick ran that was not answered");
                }
                Err(e) => return (answered, e),
            }
        }
    }

    /// [`super::a_graceful_shutdown_tells_each_client_that_its_calls_did_not_run`], with an
    /// `AsyncServer` and async clients on one runtime.
    #[test]
    fn a_graceful_shutdown_tells_each_async_client_that_its_calls_did_not_run() {
        let _fds = fd_count_lock();
        let before = ipc_fds();
        let runtime = two_worker_runtime();
        let counting = Counting::new();
        runtime.block_on(async {
            let name = format!("typed-ipc-async-shut-down-{}", std::process::id());
            let serving = AsyncServer::new()
                .service(AsyncCounterServer::new(counting.clone()))
                .listen(AsyncListener::bind_abstract(&name).unwrap());
            let connect = || async {
                let connection = AsyncConnection::connect_abstract(&name).await.unwrap();
                AsyncCounterClient::new(connection).with_timeout(HANG_GUARD)
            };
            let (holding, ticking) = (connect().await, connect().await);
            assert_eq!(ticking.tick().await.unwrap(), 1);
            let held = tokio::spawn({
                let holding = holding.clone();
                async move { holding.hold().await }
            });
            counting.0.entered.acquire().await.unwrap().forget();
            let shutdown = tokio::spawn(serving.shutdown());

            let (answered, ended) = tick_until_refused(&ticking, 1).await;
            assert!(matches!(ended, Error::ShutDown), "{ended:?}");
            assert!(matches!(ticking.tick().await, Err(Error::ShutDown)));
            assert!(matches!(ticking.note().await, Err(Error::ShutDown)));

            counting.0.gate.add_permits(1);
            let held = held.await.unwrap();
            assert_eq!(held.unwrap(), 7, "the call in flight replied");
            shutdown.await.unwrap();
            let after = holding.tick().await;
            assert!(matches!(after, Err(Error::ShutDown)), "{after:?}");
            assert_eq!(
                counting.ticks(),
                answered,
                "a call told it did not run, ran"
            );
        });
        drop(runtime);
        assert_eq!(ipc_fds(), before);
    }

    /// [`super::a_worker_that_shuts_down_tells_its_parent_which_calls_did_not_run`], with an
    /// async worker and parent.
    #[test]
    fn an_async_worker_that_shuts_down_tells_its_parent_which_calls_did_not_run() {
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        current_thread_runtime().block_on(async {
            let (mut worker, connection) =
                typed_ipc::tokio::worker::spawn(child("asynchronous::child_retires_async"))
                    .unwrap();
            let client = AsyncCounterClient::new(connection).with_timeout(HANG_GUARD);
            assert_eq!(client.tick().await.unwrap(), 1);
            let ticker = tokio::spawn({
                let client = client.clone();
                async move { tick_until_refused(&client, 1).await }
            });
            let tally = memfd(b"");
            client.retire(tally.try_clone().unwrap()).await.unwrap();
            let (answered, ended) = ticker.await.unwrap();
            assert!(matches!(ended, Error::ShutDown), "{ended:?}");
            assert!(matches!(client.note().await, Err(Error::ShutDown)));
            let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
            assert_eq!(exit, Exit::Code(0));
            assert_eq!(
                read_all(tally),
                answered.to_le_bytes(),
                "ticks run / answered"
            );
        });
        before.assert_nothing_new();
    }

    #[test]
    #[ignore = "run as a child process by other tests"]
    fn child_retires_async() {
        current_thread_runtime().block_on(async {
            let connection = typed_ipc::tokio::worker::connection().unwrap();
            let counting = Counting::new();
            *counting.0.connection.lock().unwrap() = Some(connection.clone());
            let server = AsyncCounterServer::new(counting.clone());
            server.serve(connection).await.unwrap();
            // Served to the end: every tick that ran has been answered.
            let tally = counting.0.tally.lock().unwrap().take().expect("retired");
            File::from(tally)
                .write_all(&counting.ticks().to_le_bytes())
                .unwrap();
        });
    }
}
