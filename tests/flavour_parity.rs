//! What one flavour offers, the other offers too, with the same outcome: each test here runs
//! the same situation through the blocking flavour and the async one.
//!
//! Every test takes the fd lock, so that fd counts are not disturbed by another test. Nothing
//! here synchronises by sleeping; the timeouts only turn a hang into a failure.

#![cfg(feature = "tokio")]

mod common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::{
    accept, current_thread_runtime, fd_count_lock, fd_snapshot, listening_for_one, wait_until,
};
use typed_ipc::service::{Call, InterfaceInfo, Service};
use typed_ipc::tokio::{AsyncCall, AsyncConnection, AsyncService, BoxFuture};
use typed_ipc::{Connection, Error};

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// The threads of this process whose name is `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// A service that stopped accepting, its queue of clients full: a connect with a timeout
/// fails with `TimedOut` once it has waited that long, in both flavours, by path and by
/// abstract name. The async one's connecting thread ends with it (a `tokio::time::timeout`
/// around `connect`, which was all the async flavour had, left that thread waiting until the
/// listener took the client or went), and neither leaves an fd open. Once the service accepts
/// again, both connect. Before, `AsyncConnection` had no `connect_timeout` (this did not
/// compile).
#[test]
fn a_connect_timeout_to_a_listener_whose_queue_is_full_times_out_in_both_flavours() {
    use nix::sys::socket::UnixAddr;
    let _fds = fd_count_lock();
    let dir = std::env::temp_dir().join(format!("typed-ipc-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("full.sock");
    let name = format!("typed-ipc-parity-full-{}", std::process::id());
    let runtime = current_thread_runtime();
    let by_path = listening_for_one(&UnixAddr::new(&path).unwrap());
    let by_name = listening_for_one(&UnixAddr::new_abstract(name.as_bytes()).unwrap());
    let queued = (
        Connection::connect_timeout(&path, HANG_GUARD).unwrap(),
        Connection::connect_abstract_timeout(&name, HANG_GUARD).unwrap(),
    );
    let before = fd_snapshot();
    let short = Duration::from_millis(1);

    let blocking = Connection::connect_timeout(&path, short).map(drop);
    assert!(matches!(blocking, Err(Error::TimedOut)), "{blocking:?}");
    let blocking = Connection::connect_abstract_timeout(&name, short).map(drop);
    assert!(matches!(blocking, Err(Error::TimedOut)), "{blocking:?}");
    let asynchronous = runtime.block_on(async {
        (
            AsyncConnection::connect_timeout(&path, short)
                .await
                .map(drop),
            AsyncConnection::connect_abstract_timeout(&name, short)
                .await
                .map(drop),
        )
    });
    assert!(
        matches!(asynchronous, (Err(Error::TimedOut), Err(Error::TimedOut))),
        "{asynchronous:?}"
    );
    wait_until("the connecting threads that timed out have ended", || {
        threads_named("typed-ipc-conne") == 0
    });
    before.assert_nothing_new();

    // Room in the queues again: each takes its client now.
    let accepted = (accept(&by_path), accept(&by_name));
    let blocking = Connection::connect_timeout(&path, HANG_GUARD).unwrap();
    let accepted_blocking = accept(&by_path);
    let asynchronous = runtime.block_on(async {
        AsyncConnection::connect_abstract_timeout(&name, HANG_GUARD)
            .await
            .unwrap()
    });
    let accepted_async = accept(&by_name);
    assert!(!blocking.is_closed() && !asynchronous.is_closed());
    drop((blocking, asynchronous, accepted_blocking, accepted_async));
    drop((queued, accepted, by_path, by_name, runtime));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A worker that runs on past a wait with a timeout is left running, and its `Worker` as it
/// was: in both flavours the wait says `None`, and a wait after the kill says how it ended.
/// The async one blocks no runtime thread meanwhile (`Worker::wait_timeout` in async code
/// blocked the runtime's thread for the whole timeout: there was no async counterpart, and
/// this did not compile).
#[test]
fn a_wait_with_a_timeout_on_a_running_worker_says_none_in_both_flavours() {
    use typed_ipc::worker::{Exit, Worker};
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let sleeper = || {
        let mut command = std::process::Command::new("sleep");
        command.arg("3600");
        command
    };
    let short = Duration::from_millis(1);

    let (mut blocking, connection) = Worker::spawn(sleeper()).unwrap();
    assert_eq!(blocking.wait_timeout(short).unwrap(), None);
    blocking.kill().unwrap();
    let exit = blocking.wait_timeout(HANG_GUARD).unwrap();
    assert_eq!(exit, Some(Exit::Signal(libc::SIGKILL)));

    let runtime = current_thread_runtime();
    runtime.block_on(async {
        let (mut asynchronous, _connection) = typed_ipc::tokio::worker::spawn(sleeper()).unwrap();
        let waited = typed_ipc::tokio::worker::wait_timeout(&mut asynchronous, short).await;
        assert_eq!(waited.unwrap(), None);
        assert_eq!(asynchronous.try_wait().unwrap(), None, "it runs on");
        asynchronous.kill().unwrap();
        let waited = typed_ipc::tokio::worker::wait_timeout(&mut asynchronous, HANG_GUARD).await;
        assert_eq!(waited.unwrap(), Some(Exit::Signal(libc::SIGKILL)));
    });
    drop((blocking, connection, runtime));
    before.assert_nothing_new();
}

/// A process not started as a worker asks for its end of a worker's connection: both
/// flavours fail with the same error, through `connection` and through the bare `socket`
/// (which `typed_ipc::tokio::worker` offers too, for a worker that accepts no writes into its
/// memory), and leave nothing open.
#[test]
fn a_process_not_started_as_a_worker_gets_the_same_error_from_both_flavours() {
    let _fds = fd_count_lock();
    assert!(std::env::var_os(typed_ipc::worker::ENV).is_none());
    let before = fd_snapshot();
    let said = |outcome: Result<(), Error>| match outcome {
        Err(Error::Io(e)) => (e.kind(), e.to_string()),
        other => panic!("not a worker, yet: {other:?}"),
    };
    let blocking = said(typed_ipc::worker::connection().map(drop));
    assert_eq!(blocking.0, std::io::ErrorKind::NotFound, "{blocking:?}");
    assert_eq!(said(typed_ipc::worker::socket().map(drop)), blocking);
    let runtime = current_thread_runtime();
    runtime.block_on(async {
        assert_eq!(
            said(typed_ipc::tokio::worker::connection().map(drop)),
            blocking
        );
        assert_eq!(said(typed_ipc::tokio::worker::socket().map(drop)), blocking);
    });
    drop(runtime);
    before.assert_nothing_new();
}

/// What [`DescribesItsCall`] serves, in both flavours.
#[typed_ipc::interface(async_client)]
pub trait Described {
    /// The call being handled, as `{:?}` writes it.
    fn describe(&self) -> String;
}

/// Serves [`Described`] by hand, in both flavours, as a service that logs its calls would.
struct DescribesItsCall;

impl Service for DescribesItsCall {
    fn info(&self) -> &'static InterfaceInfo {
        &DESCRIBED_INFO
    }
    fn handle(&self, call: &mut Call<'_>) -> typed_ipc::Result<()> {
        let said = format!("{call:?}");
        call.reply(&said)
    }
}

impl AsyncService for DescribesItsCall {
    fn info(&self) -> &'static InterfaceInfo {
        &DESCRIBED_INFO
    }
    fn handle<'a>(&'a self, call: &'a mut AsyncCall) -> BoxFuture<'a, typed_ipc::Result<()>> {
        Box::pin(async move {
            let said = format!("{call:?}");
            call.reply(said).await
        })
    }
}

/// A hand-written service can log the call it handles (`{:?}`, or a `#[tracing::instrument]`
/// on `handle`) in both flavours, and it says the same of it: the command, that it is no
/// oneway, and who called. Before, only the async flavour's `AsyncCall` was `Debug` (this
/// did not compile).
#[test]
fn a_call_being_handled_is_debug_in_both_flavours() {
    let _fds = fd_count_lock();
    let pid = std::process::id();
    let (client, server) = Connection::pair().unwrap();
    let serving = std::thread::spawn(move || server.serve(DescribesItsCall));
    let blocking = DescribedClient::new(client).describe().unwrap();
    serving.join().unwrap().unwrap();

    let runtime = current_thread_runtime();
    let asynchronous = runtime.block_on(async {
        let (client, server) = AsyncConnection::pair().unwrap();
        let serving = tokio::spawn(server.serve(DescribesItsCall));
        drop(server);
        let said = DescribedAsyncClient::new(client).describe().await.unwrap();
        serving.await.unwrap().unwrap();
        said
    });
    for (said, name) in [(&blocking, "Call"), (&asynchronous, "AsyncCall")] {
        assert!(
            said.starts_with(&format!("{name} {{ command: 0, ")),
            "{said}"
        );
        assert!(said.contains("oneway: false"), "{said}");
        assert!(said.contains(&format!("pid: {pid}")), "{said}");
    }
}

/// A listener's fd is there in both flavours (to `fchmod` its socket, say, or to hand it to
/// a process that serves on): the async listener's is the listener's it was made of. Before,
/// only the blocking `Listener` was `AsFd` (this did not compile).
#[test]
fn a_listener_lends_its_fd_in_both_flavours() {
    use std::os::fd::AsFd;
    use typed_ipc::Listener;
    use typed_ipc::tokio::AsyncListener;
    fn raw(fd: &impl AsFd) -> i32 {
        fd.as_fd().as_raw_fd()
    }
    let _fds = fd_count_lock();
    let name = format!("typed-ipc-parity-fd-{}", std::process::id());
    let blocking = Listener::bind_abstract(&name).unwrap();
    let raw_blocking = raw(&blocking);
    let runtime = current_thread_runtime();
    runtime.block_on(async {
        let asynchronous = AsyncListener::new(blocking).unwrap();
        assert_eq!(raw(&asynchronous), raw_blocking);
        assert_eq!(raw(&asynchronous), raw(asynchronous.listener()));
    });
}

/// A daemon's state, held in a `#[derive(Debug)]` struct as the generated clients and
/// servers, connections, listeners and workers can be: its server and what it serves, in
/// either flavour, say which interfaces they serve, how, and how many clients they have.
/// Before, neither flavour's `Server` nor `Serving` was `Debug` (this did not compile).
#[test]
fn a_server_and_its_serving_are_debug_in_both_flavours() {
    use typed_ipc::tokio::{AsyncListener, AsyncServer, AsyncServing};
    use typed_ipc::{Listener, Server, Serving};
    #[derive(Debug)]
    struct Daemon<S, L> {
        server: S,
        serving: L,
    }
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let name = format!("typed-ipc-parity-debug-{}", std::process::id());
    let server = Server::new()
        .service(DescribedServer::new(Quiet))
        .threads(2)
        .max_clients(3);
    let blocking = Daemon {
        serving: server
            .clone()
            .listen(Listener::bind_abstract(&name).unwrap())
            .unwrap(),
        server,
    };
    let said = format!("{blocking:?}");
    for part in [
        "Server { services: [\"Described\"], threads: 2, ",
        "max_clients: Some(3)",
        "Serving { clients: 0, accepting: Ok(())",
    ] {
        assert!(said.contains(part), "{part} in {said}");
    }
    let Daemon { server, serving }: Daemon<Server, Serving> = blocking;
    serving.shutdown();
    drop(server);

    let runtime = current_thread_runtime();
    runtime.block_on(async {
        let server = AsyncServer::new()
            .service_with(|_| DescribesItsCall)
            .max_calls_at_once(2)
            .max_clients(3);
        let asynchronous = Daemon {
            serving: server
                .clone()
                .listen(AsyncListener::bind_abstract(format!("{name}-async")).unwrap()),
            server,
        };
        let said = format!("{asynchronous:?}");
        for part in [
            "AsyncServer { services: [\"service_with\"], max_calls_at_once: Some(2), ",
            "max_clients: Some(3)",
            "AsyncServing { clients: 0, accepting: Ok(())",
        ] {
            assert!(said.contains(part), "{part} in {said}");
        }
        let Daemon { server, serving }: Daemon<AsyncServer, AsyncServing> = asynchronous;
        serving.shutdown().await;
        drop(server);
    });
    drop(runtime);
    before.assert_nothing_new();
}

/// An implementation of [`Described`] that says nothing of its calls.
struct Quiet;

impl Described for Quiet {
    fn describe(&self) -> String {
        String::new()
    }
}
