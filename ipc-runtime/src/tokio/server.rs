//! [`AsyncServer`]: serving async interfaces on one connection or on every client of an
//! [`AsyncListener`].

use std::future::{Future, poll_fn};
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ::tokio::sync::Notify;
use ::tokio::task::JoinHandle;

use super::{AsyncConnection, AsyncListener, AsyncService, WeakAsyncConnection};
use crate::accept_retry::{self, Failure, Trouble};
use crate::admission::{self, Admission};
use crate::error::{Error, Result};
use crate::frame::Limits;
use crate::service::InterfaceInfo;
use crate::socket::{PeerCredentials, Socket};
use crate::stall;

type SharedAuthorizer =
    Arc<dyn Fn(Option<&PeerCredentials>, &InterfaceInfo, u32) -> Result<(), String> + Send + Sync>;

/// What [`AsyncServer::service_with`] makes each connection's service with.
type MakeService = Arc<dyn Fn(&AsyncConnection) -> Arc<dyn AsyncService> + Send + Sync>;

/// One service a server serves: the same to every connection, or one made for each.
#[derive(Clone)]
enum Provided {
    Shared(Arc<dyn AsyncService>),
    PerConnection(MakeService),
}

impl Provided {
    /// Its interface's name, for `Debug`: `service_with` for one made per connection, whose
    /// interface is known only once one is made.
    fn name(&self) -> &'static str {
        match self {
            Provided::Shared(service) => service.info().name,
            Provided::PerConnection(_) => "service_with",
        }
    }
}

/// Serves a set of async interfaces: the async flavour of [`Server`](crate::Server).
///
/// Requests of one connection run concurrently, each call in a task of its own (at most
/// [`AsyncServer::max_calls_at_once`] at a time, if set); oneway messages from one peer run
/// one at a time, in the order sent, and a call starts only once the oneways that arrived
/// before it have run.
///
/// ```no_run
/// # use ipc_runtime::tokio::{AsyncListener, AsyncServer, AsyncService};
/// # async fn demo(my_service: impl AsyncService) -> ipc_runtime::Result<()> {
/// let serving = AsyncServer::new()
///     .service(my_service) // e.g. IpaServer::new(MyIpa)
///     .authorize(|peer, _iface, _cmd| match peer {
///         Some(p) if p.uid == 1000 => Ok(()),
///         _ => Err("only uid 1000 may call".into()),
///     })
///     .listen(AsyncListener::bind("/run/my.sock")?);
/// // ... later: stop accepting, let the calls in flight finish and reply, hang up.
/// serving.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AsyncServer {
    /// In the order they were added.
    services: Vec<Provided>,
    authorizer: Option<SharedAuthorizer>,
    stall_limit: Duration,
    client_limits: Limits,
    admission: Admission,
    /// [`AsyncServer::max_calls_at_once`]: no limit unless set.
    max_calls: Option<usize>,
}

/// The interfaces served, by name (`service_with` for one made per connection), and the
/// settings.
impl std::fmt::Debug for AsyncServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let services: Vec<&str> = self.services.iter().map(Provided::name).collect();
        f.debug_struct("AsyncServer")
            .field("services", &services)
            .field("max_calls_at_once", &self.max_calls)
            .field("authorize", &self.authorizer.is_some())
            .field("admit", &self.admission.admit.is_some())
            .field("max_clients", &self.admission.max_clients)
            .field("client_limits", &self.client_limits)
            .field("shutdown_stall_limit", &self.stall_limit)
            .finish()
    }
}

impl Default for AsyncServer {
    fn default() -> AsyncServer {
        AsyncServer {
            services: Vec::new(),
            authorizer: None,
            stall_limit: stall::DEFAULT_LIMIT,
            client_limits: Limits::default(),
            admission: Admission::default(),
            max_calls: None,
        }
    }
}

impl AsyncServer {
    /// A server with no interfaces yet.
    pub fn new() -> AsyncServer {
        AsyncServer::default()
    }

    /// Serves `service`'s interface too.
    ///
    /// # Panics
    ///
    /// If an interface of the same name is served already: the second would replace the
    /// first on every connection. Two traits of one name take names of their own with
    /// `#[interface(name = "...")]`.
    pub fn service(mut self, service: impl AsyncService) -> AsyncServer {
        let shared = self.services.iter().filter_map(|s| match s {
            Provided::Shared(s) => Some(s.info()),
            Provided::PerConnection(_) => None,
        });
        crate::service::assert_distinct(shared, service.info(), "AsyncServer");
        self.services.push(Provided::Shared(Arc::new(service)));
        self
    }

    /// Serves the interface of the services `make` makes, a service of its own for each
    /// connection: for every client [`AsyncServer::listen`] accepts, and for the connection
    /// [`AsyncServer::serve`] is given. A handler can then keep state for its one client, and
    /// call that client back: `make` may keep a clone of the connection (in a generated
    /// client, for an interface the client serves on its end).
    ///
    /// `make` runs once per connection, before any of its requests is served, in the task that
    /// accepts clients (or in the call to `serve`): the services of all the calls to `service`
    /// and `service_with` in the order they were made, so a slow `make` holds up the clients
    /// that connect meanwhile. Once the connection has ended and nothing will run its
    /// requests any more, its services are dropped, and with them the clones of the
    /// connection they hold: its socket and shared memory then go with the server's own
    /// handle (for `listen`, with the client's task, before any new client or
    /// [`AsyncServing::clients`]). A clone the service hands elsewhere (to a task or a global
    /// of its own) keeps the connection open as long as it lives: that one is the service's
    /// to drop. Wherever a listener drops a service, it holds no lock of its own: the
    /// service's `Drop` may ask the [`AsyncServing`] for its clients
    /// ([`AsyncServing::clients`]).
    ///
    /// A `make` that panics in the listener's task hangs up on that client (the panic is on
    /// stderr) and the listener accepts on; under `serve`, the panic is the caller's.
    ///
    /// # Panics
    ///
    /// An interface served twice is only known once `make` has made a service: when the
    /// first connection is served. Then `serve` panics, saying which interface it is, as
    /// [`AsyncServer::service`] does; `listen` hangs up on the client, stops accepting for
    /// good with that message as its error (on stderr, and from [`AsyncServing::accepting`]),
    /// and new clients are refused.
    ///
    /// ```no_run
    /// # use ipc_runtime::tokio::{AsyncCall, AsyncConnection, AsyncListener, AsyncServer};
    /// # use ipc_runtime::tokio::{AsyncService, BoxFuture};
    /// # use ipc_runtime::{Result, service::InterfaceInfo};
    /// # use std::sync::atomic::{AtomicU32, Ordering};
    /// # struct EventsClient(AsyncConnection);
    /// # impl EventsClient {
    /// #     fn new(connection: AsyncConnection) -> EventsClient { EventsClient(connection) }
    /// #     async fn frame_done(&self, _frame: u32) -> Result<()> { Ok(()) }
    /// # }
    /// # struct PlayerServer<T>(T);
    /// # impl<T> PlayerServer<T> { fn new(t: T) -> PlayerServer<T> { PlayerServer(t) } }
    /// # impl<T: Send + Sync + 'static> AsyncService for PlayerServer<T> {
    /// #     fn info(&self) -> &'static InterfaceInfo { unimplemented!() }
    /// #     fn handle<'a>(&'a self, _: &'a mut AsyncCall) -> BoxFuture<'a, Result<()>> {
    /// #         unimplemented!()
    /// #     }
    /// # }
    /// /// One client's `Player` (an `#[interface]` trait of `async fn`s): its own frame count,
    /// /// and a way to call that client's `Events` back.
    /// struct Session {
    ///     frames: AtomicU32,
    ///     caller: EventsClient,
    /// }
    ///
    /// impl Session {
    ///     // In `impl Player for Session`:
    ///     async fn play(&self) -> u32 {
    ///         let frame = self.frames.fetch_add(1, Ordering::SeqCst);
    ///         let _ = self.caller.frame_done(frame).await; // a call to the caller, mid-call
    ///         frame
    ///     }
    /// }
    ///
    /// # async fn demo() -> Result<()> {
    /// let serving = AsyncServer::new()
    ///     .service_with(|connection| {
    ///         PlayerServer::new(Session {
    ///             frames: AtomicU32::new(0),
    ///             caller: EventsClient::new(connection.clone()),
    ///         })
    ///     })
    ///     .listen(AsyncListener::bind("/run/my.sock")?);
    /// # Ok(()) }
    /// ```
    pub fn service_with<S: AsyncService>(
        mut self,
        make: impl Fn(&AsyncConnection) -> S + Send + Sync + 'static,
    ) -> AsyncServer {
        let make: MakeService = Arc::new(move |connection| Arc::new(make(connection)));
        self.services.push(Provided::PerConnection(make));
        self
    }

    /// How long, once [`AsyncServing::shutdown`] has begun, a send to a client may wait for
    /// room with none of its message going out before that client is hung up on: 5 seconds
    /// unless set. As the blocking flavour's
    /// [`Server::shutdown_stall_limit`](crate::Server::shutdown_stall_limit).
    pub fn shutdown_stall_limit(mut self, limit: Duration) -> AsyncServer {
        self.stall_limit = limit;
        self
    }

    /// The [`Limits`] every client [`AsyncServer::listen`] accepts is held to, as the
    /// blocking flavour's [`Server::client_limits`](crate::Server::client_limits): what it
    /// may send (a message's size and fds, [`Limits::max_shared_len`] for the sealed buffers
    /// and region views it hands over) and the most this end sends it. [`Limits::default`]
    /// unless set. Not for [`AsyncServer::serve`], whose connection's socket has its limits.
    pub fn client_limits(mut self, limits: Limits) -> AsyncServer {
        self.client_limits = limits;
        self
    }

    /// Lets `authorize` refuse calls: it sees the caller's credentials, the interface and the
    /// command id; its `Err(reason)` reaches the caller as [`Error::Refused`].
    ///
    /// It runs for every request, oneway messages too, before the method does, and may run
    /// on several threads at once; `iface.method(cmd)` names the method. A refused
    /// `#[oneway]` message is dropped: its sender already had `Ok(())`, and only this end's
    /// stderr says so (the first 10 failed oneways of a process, all of them under
    /// `TYPED_IPC_DEBUG=1`).
    pub fn authorize(
        mut self,
        authorize: impl Fn(Option<&PeerCredentials>, &InterfaceInfo, u32) -> Result<(), String>
        + Send
        + Sync
        + 'static,
    ) -> AsyncServer {
        self.authorizer = Some(Arc::new(authorize));
        self
    }

    /// Lets `admit` turn clients of [`AsyncServer::listen`] away when they connect, as the
    /// blocking flavour's [`Server::admit`](crate::Server::admit) does: it sees the client's
    /// credentials and returns `Err(reason)` for a client this server will never serve. It
    /// runs once per client, in the acceptor task, before [`AsyncServer::service_with`]'s
    /// `make` and before the client's task is spawned; the client is told why and hung up on
    /// at once, and its calls fail with [`Error::Refused`]. One that panics turns that client
    /// away ("the server's admission check panicked") and the listener accepts on. It runs in
    /// the acceptor task: it must not block for long.
    pub fn admit(
        mut self,
        admit: impl Fn(Option<&PeerCredentials>) -> Result<(), String> + Send + Sync + 'static,
    ) -> AsyncServer {
        self.admission.admit = Some(Arc::new(admit));
        self
    }

    /// Serves at most `n` clients of [`AsyncServer::listen`] at once, as the blocking
    /// flavour's [`Server::max_clients`](crate::Server::max_clients): a client that connects
    /// while `n` are connected is turned away, its calls failing with
    /// `Error::Refused("the server is at its limit of n clients")`, not left in the kernel's
    /// queue. A client counts until it has hung up and its calls have run (as
    /// [`AsyncServing::clients`] counts it). No limit unless set.
    ///
    /// As in the blocking flavour, a client that has just hung up may still count when the
    /// next one connects (its task has not yet run to its end). So at the limit, if some of
    /// the clients counted have hung up, the listener waits for one of their tasks to end, up
    /// to 1 second from when it found them gone, and serves the new client if one does: a
    /// client that reconnects at once is served. One that hung up with a call still running
    /// counts until that call's handler has stopped (cancelled, at its next `.await`; a
    /// method on tokio's blocking pool runs to its end): once that second is over, new
    /// clients are turned away
    /// at once again. If none of the clients counted has hung up, a new one is turned away at
    /// once. The clients that connect during that second wait in the kernel's queue. The
    /// second is timed on a thread of the listener's own, not on tokio's timer (the runtime
    /// needs no time driver); if no thread can be started, the new client is turned away at
    /// once.
    ///
    /// # Panics
    ///
    /// If `n` is 0: a server that serves nobody.
    pub fn max_clients(mut self, n: usize) -> AsyncServer {
        assert!(
            n > 0,
            "AsyncServer::max_clients(0): a server must serve a client"
        );
        self.admission.max_clients = Some(n);
        self
    }

    /// Runs at most `n` calls of each connection at once, the async flavour of
    /// [`Server::threads`](crate::Server::threads): on the connection
    /// [`AsyncServer::serve`] is given, and on each client of [`AsyncServer::listen`] (so `n`
    /// per client, not in all). The calls read while `n` run wait, without a task each, in
    /// the order they arrived; with `n = 1` a client's calls run one at a time, in arrival
    /// order, for a service not written for concurrency. No limit unless set: a client's
    /// calls all run at once, up to the 1,024 requests the connection reads ahead. As
    /// [`AsyncConnection::set_max_calls_at_once`], which says what counts: oneways do not,
    /// unlike the blocking flavour's threads, and a handler whose call makes its peer call
    /// this end back waits for good with `n = 1`.
    ///
    /// # Panics
    ///
    /// If `n` is 0: no call would ever run.
    pub fn max_calls_at_once(mut self, n: usize) -> AsyncServer {
        assert!(
            n > 0,
            "AsyncServer::max_calls_at_once(0): at least one call must run"
        );
        self.max_calls = Some(n);
        self
    }

    /// Serves `connection` (at once) and returns a future that resolves when the peer has
    /// hung up and every handler has finished: `Ok(())` on a clean close.
    ///
    /// # Panics
    ///
    /// If a service [`AsyncServer::service_with`] makes serves an interface served already. A
    /// `make` that panics has its panic go on to the caller. Either way the connection is left
    /// served by nothing, as it was before.
    pub fn serve(
        &self,
        connection: &AsyncConnection,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<> {
        // A `make` that panics (or two services of one interface) leaves the connection
        // served by nothing, as it was.
        let services = match self.services_coming(connection) {
            Ok(Ok(services)) => services,
            Ok(Err(twice)) => panic!("{twice}"),
            Err(panicked) => std::panic::resume_unwind(panicked),
        };
        self.serve_services(connection, services)
    }

    /// [`AsyncServer::services_for`], with `connection` marked as about to be served
    /// meanwhile ([`AsyncConnection::server_coming`]: what a task `make` starts reads waits
    /// for the services, past the bounds of the queue too, as for a server). If `make`
    /// panics, or two services serve one interface, the mark is taken back: the connection is
    /// served by nothing, as before.
    fn services_coming(
        &self,
        connection: &AsyncConnection,
    ) -> std::thread::Result<Result<Vec<Arc<dyn AsyncService>>, String>> {
        connection.server_coming();
        let made = catch_unwind(AssertUnwindSafe(|| self.services_for(connection)));
        if !matches!(made, Ok(Ok(_))) {
            connection.server_not_coming();
        }
        made
    }

    /// What `connection` serves, in the order added: the shared services, and one made for it
    /// by each [`AsyncServer::service_with`]. `Err` says which interface two of them serve.
    fn services_for(
        &self,
        connection: &AsyncConnection,
    ) -> Result<Vec<Arc<dyn AsyncService>>, String> {
        let mut services: Vec<Arc<dyn AsyncService>> = Vec::with_capacity(self.services.len());
        for provided in &self.services {
            let (service, added_by) = match provided {
                Provided::Shared(service) => (service.clone(), "AsyncServer::service"),
                Provided::PerConnection(make) => (make(connection), "AsyncServer::service_with"),
            };
            let served = services.iter().map(|s| s.info());
            crate::service::distinct(served, service.info(), added_by)?;
            services.push(service);
        }
        Ok(services)
    }

    /// [`AsyncServer::serve`] with the services made for `connection`.
    fn serve_services(
        &self,
        connection: &AsyncConnection,
        services: Vec<Arc<dyn AsyncService>>,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<> {
        // The authorizer first: adding a service starts serving, and no request may be
        // checked without it.
        if let Some(authorize) = &self.authorizer {
            let authorize = authorize.clone();
            connection.set_authorizer(move |peer, iface, cmd| authorize(peer, iface, cmd));
        }
        // Before serving starts too: the requests held until now obey it.
        if let Some(n) = self.max_calls {
            connection.set_max_calls_at_once(n);
        }
        // All at once: requests held until now are handled only once every service is there.
        connection.add_services(services);
        let connection = connection.clone();
        async move { connection.run().await }
    }

    /// Accepts clients on `listener` and serves each, until [`AsyncServing::shutdown`]. Must be
    /// called inside a tokio runtime.
    ///
    /// Each client costs its tasks and at least one file descriptor (its socket):
    /// [`AsyncServer::max_clients`] caps how many are connected at once, and
    /// [`AsyncServer::admit`] turns clients away by their credentials before anything is spent
    /// on them; without them, the process's limits (`RLIMIT_NOFILE`, memory) are what bound
    /// the clients. A client that hangs up costs nothing once its oneways have run and its
    /// calls' handlers have stopped (cancelled: their replies could go nowhere): its task
    /// ends, and its connection (socket, buffers, shared memory) goes with it.
    ///
    /// When accepting fails for want of resources — this process or the system is out of
    /// file descriptors (`EMFILE`, `ENFILE`) or memory (`ENOMEM`, `ENOBUFS`, a client's socket
    /// that cannot be registered with the runtime), or a security module refuses (`EPERM`) —
    /// the listener keeps going, as the blocking flavour's does: it says so on stderr (at most
    /// one line every 10 seconds, and one when it accepts again), waits (5 ms, doubling up to
    /// 1 s) and tries again. Clients that connect meanwhile wait, queued, until it can accept
    /// them (or until their calls time out). Any other error ends accepting for good: the
    /// listener prints it, closes its socket so that new clients are refused instead of left
    /// waiting (`ECONNREFUSED`, or `ENOENT` for a path, whose socket file is removed), and
    /// [`AsyncServing::accepting`] returns it; the clients already connected are served on.
    pub fn listen(self, listener: AsyncListener) -> AsyncServing {
        let stall_limit = self.stall_limit;
        let clients: Arc<Mutex<Vec<Client>>> = Arc::default();
        let ended: Arc<Mutex<Option<Error>>> = Arc::default();
        let stopped = Arc::new(AtomicBool::new(false));
        // Shared, not the task's: `AsyncServing` closes it at once when it stops, whether or
        // not the runtime runs the task meanwhile.
        let listener = Arc::new(Mutex::new(Some(listener)));
        let turnover: Arc<Turnover> = Arc::default();
        let acceptor = ::tokio::spawn({
            let (clients, ended, stopped) = (clients.clone(), ended.clone(), stopped.clone());
            let listener = CloseListener(listener.clone());
            // Dropped last, once `accepting` says why the acceptor ended, or with the task.
            let gone = AcceptorGone(turnover.clone());
            async move {
                let _gone = gone;
                let e = self
                    .accept_loop(&listener.0, &clients, &stopped, &_gone.0)
                    .await;
                // New clients are refused rather than queued for nobody, and the name or path
                // is free to listen on again. Said last, so that whoever reads it finds
                // `accepting` and the listener as it says.
                drop(listener);
                if stopped.load(Ordering::SeqCst) {
                    return; // `AsyncServing` stopped it (`EINVAL`): nothing went wrong
                }
                let said = e.to_string();
                *ended.lock() = Some(e);
                accept_retry::stopped(&said);
            }
        });
        AsyncServing {
            acceptor,
            listener,
            stopped,
            clients,
            ended,
            stall_limit,
            turnover,
        }
    }

    /// Accepts clients until accepting fails for good, or `stopped` is set, and returns why.
    async fn accept_loop(
        &self,
        listener: &Mutex<Option<AsyncListener>>,
        clients: &Mutex<Vec<Client>>,
        stopped: &Arc<AtomicBool>,
        turnover: &Arc<Turnover>,
    ) -> Error {
        let mut trouble = Trouble::new();
        loop {
            // Locked for a try at a time, never across a wait: `AsyncServing` may take it.
            let accepted = poll_fn(|cx| match &*listener.lock() {
                Some(listener) => listener.poll_accept_fd(cx),
                // `AsyncServing` closed it: as if it had been shut down.
                None => Poll::Ready(Err(io::Error::from_raw_os_error(libc::EINVAL))),
            });
            let fd = match accepted.await {
                Ok(fd) => fd,
                Err(e) => match accept_retry::classify(&e) {
                    Failure::ClientGone => continue,
                    Failure::OutOfResources => {
                        let wait = trouble.failed("cannot accept a client", &e);
                        back_off(wait, clients).await;
                        continue;
                    }
                    Failure::Fatal => return e.into(),
                },
            };
            // A failure from here on concerns this one client, which sees a hang-up.
            let limited = |mut socket: Socket| {
                socket.set_limits(self.client_limits);
                socket
            };
            let socket = match Socket::new(fd).map(limited) {
                Ok(socket) => socket,
                Err(e) => {
                    let wait = trouble.failed("cannot set up a client's connection", &e);
                    back_off(wait, clients).await;
                    continue;
                }
            };
            if let Some(max) = self.admission.max_clients {
                make_room(clients, max, &turnover.changed).await;
            }
            // Only the acceptor adds clients, so the count holds until it does.
            let connected = || pruned(clients).len();
            if let Err(reason) = self.admission.check(&socket, connected) {
                trouble.accepted();
                admission::turn_away(socket, &reason);
                continue;
            }
            match AsyncConnection::new(socket) {
                Ok(connection) => {
                    trouble.accepted();
                    // Served from now on, unless `make` fails. A `make` that panics (the
                    // panic hook has said so) fails this client only; it is hung up on, not
                    // only let go of, as `make` may have kept a handle.
                    let services = match self.services_coming(&connection) {
                        Ok(Ok(services)) => services,
                        Ok(Err(twice)) => {
                            connection.close();
                            return Error::Io(io::Error::other(twice));
                        }
                        Err(_panicked) => {
                            connection.close();
                            continue;
                        }
                    };
                    // Nothing of the user's runs under the clients' lock, which a service's
                    // `Drop` may take (asking the server its count of clients, its `Debug`):
                    // `spawn` drops the task's future at once on a runtime shutting down, and
                    // serving (`serve_services`) drops the services of a client that has
                    // hung up already, or spawns (and so may drop) its held calls. So the
                    // task is spawned first, waiting, and handed what it serves once the
                    // client is listed and the lock let go: `clients()` never misses a client
                    // that has already been served, and a stop sees it or stops it here.
                    let (closing, stopped_then) = (connection.clone(), stopped.clone());
                    let ended = Arc::new(AtomicBool::new(false));
                    let leaving = Leaving {
                        ended: ended.clone(),
                        turnover: turnover.clone(),
                    };
                    // Not a tokio oneshot: see `handoff`.
                    let (listed, serve) = super::handoff::channel();
                    let task = ::tokio::spawn(async move {
                        // Nothing to serve if the listener stopped before it listed the
                        // client (it hung up on it) or dropped the handoff unfinished.
                        let served = match serve.await {
                            // The future, with its handle of the connection, dropped first.
                            Some(serve) => serve.await,
                            None => Ok(()),
                        };
                        // Drained by a shutdown: hung up on now, not only once the shutdown
                        // reaches it, after every client that came before it, however long
                        // their handlers run.
                        if stopped_then.load(Ordering::SeqCst) {
                            closing.close();
                        }
                        drop(closing);
                        drop(leaving);
                        served
                    });
                    let mut listing = pruned(clients);
                    if stopped.load(Ordering::SeqCst) {
                        drop(listing);
                        return stopped_mid_accept(&connection);
                    }
                    listing.push(Client {
                        connection: connection.downgrade(),
                        task,
                        ended,
                        hung_up_since: None,
                    });
                    drop(listing);
                    turnover.changed.notify_waiters();
                    // The task owns the connection's only handles (apart from those the
                    // services keep) once this one goes, below: held weakly in the list, the
                    // connection, with its socket and shared memory, goes as soon as the task
                    // has served it to the end, not when the list is next pruned.
                    listed.give(self.serve_services(&connection, services));
                }
                Err(e) => {
                    let wait = trouble.failed("cannot set up a client's connection", &e);
                    back_off(wait, clients).await;
                }
            }
        }
    }
}

/// Hangs up on `connection`, accepted as [`AsyncServing`] stopped (dropped on another thread
/// while its `service_with` ran): `AsyncServing` set `stopped` before it took the clients,
/// under the lock the caller holds, so it has hung up on the others already and will never
/// see this one, which a task of its own would serve on for good. Returns the error the
/// stopped listener gives (`EINVAL`), which the acceptor keeps quiet about.
#[cold]
#[inline(never)]
fn stopped_mid_accept(connection: &AsyncConnection) -> Error {
    connection.close();
    Error::Io(io::Error::from_raw_os_error(libc::EINVAL))
}

/// At the limit of `max` clients, waits for the task of one of those that have hung up to
/// end, until [`admission::DEPARTURE_GRACE`] after it first found them gone (see
/// [`AsyncServer::max_clients`]). At once if there is room or none of them has hung up. The
/// count is the caller's to take again.
async fn make_room(clients: &Mutex<Vec<Client>>, max: usize, departures: &Notify) {
    let (leaving, deadline, connections) = {
        let mut clients = pruned(clients);
        if clients.len() < max {
            return;
        }
        let counted = clients
            .iter_mut()
            .map(|c| (c.connection.upgrade(), &mut c.hung_up_since, &c.ended));
        admission::departing(counted)
    };
    drop(connections);
    let Some(deadline) = deadline else {
        return; // none has hung up
    };
    let mut timer = None;
    loop {
        let mut ended = pin!(departures.notified());
        // Before the look: an end after it wakes this.
        ended.as_mut().enable();
        if leaving.iter().any(|ended| ended.load(Ordering::SeqCst)) {
            return;
        }
        if timer.is_none() {
            timer = match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => grace(left),
                _ => None,
            };
        }
        let Some(timer) = &mut timer else {
            return; // over already, or no thread to time it
        };
        let over = poll_fn(|cx| match ended.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(false),
            Poll::Pending => Pin::new(&mut timer.over).poll(cx).map(|_| true),
        });
        if over.await {
            return;
        }
    }
}

/// `left` of [`admission::DEPARTURE_GRACE`], timed on a thread of its own (see [`back_off`]),
/// which ends at once when this is dropped: `None` if no thread can be started.
fn grace(left: Duration) -> Option<Grace> {
    // Not a tokio oneshot: see `handoff`.
    let (over, grace) = super::handoff::channel();
    let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("typed-ipc-grace".into())
        .spawn(move || {
            let _ = cancelled.recv_timeout(left);
            over.give(());
        })
        .ok()?;
    Some(Grace {
        over: grace,
        _cancel: cancel,
    })
}

/// [`admission::DEPARTURE_GRACE`] being timed.
struct Grace {
    /// Resolves once it is over.
    over: super::handoff::Receive<()>,
    /// Dropped with this: the thread that times it ends at once.
    _cancel: std::sync::mpsc::Sender<()>,
}

/// Forgets the clients that have hung up, then waits `wait` before the next try to accept.
/// Not on tokio's timer: a runtime built without the time driver would panic here, and only
/// once out of file descriptors. Nor on tokio's blocking pool, where the methods of a
/// blocking trait run (`#[interface(async_server)]`): with every thread of the pool busy in
/// one, the listener waited for it to return, accepting nobody. On a thread of its own
/// (which needs no fd), or on the pool if none can be started.
async fn back_off(wait: Duration, clients: &Mutex<Vec<Client>>) {
    drop(pruned(clients));
    // Not a tokio oneshot: see `handoff`.
    let (waited, done) = super::handoff::channel();
    let sleeper = std::thread::Builder::new()
        .name("typed-ipc-back-off".into())
        .spawn(move || {
            std::thread::sleep(wait);
            waited.give(());
        });
    match sleeper {
        Ok(_) => drop(done.await),
        Err(_) => drop(::tokio::task::spawn_blocking(move || std::thread::sleep(wait)).await),
    }
}

/// The acceptor task's share of the listener it shares with [`AsyncServing`]: closes it
/// (unless `AsyncServing` took it first) when the task ends, and also when the runtime drops
/// the task unfinished (the runtime shut down, or the task panicked), which would otherwise
/// leave it listening, for clients to queue on for nobody, until `AsyncServing` goes.
struct CloseListener(Arc<Mutex<Option<AsyncListener>>>);

impl Drop for CloseListener {
    fn drop(&mut self) {
        let listener = self.0.lock().take();
        drop(listener);
    }
}

struct Client {
    /// Held weakly: the client's task owns the connection (see `accept_loop`).
    connection: WeakAsyncConnection,
    task: JoinHandle<Result<()>>,
    /// Set by its task once it has served the client to the end and let go of its
    /// connection ([`Leaving`]): the client no longer counts, though the task may not have
    /// finished yet.
    ended: Arc<AtomicBool>,
    /// When the acceptor, at its limit, first found its peer gone ([`make_room`]).
    hung_up_since: Option<Instant>,
}

/// Dropped by a client's task once it has served the client to the end (or as the task is
/// dropped unfinished): sets [`Client::ended`] and wakes the acceptor waiting in
/// [`make_room`], and those waiting in [`AsyncServing::wait_until_clients`].
struct Leaving {
    ended: Arc<AtomicBool>,
    turnover: Arc<Turnover>,
}

impl Drop for Leaving {
    fn drop(&mut self) {
        self.ended.store(true, Ordering::SeqCst);
        self.turnover.changed.notify_waiters();
    }
}

/// What tasks wait on for clients to come and go: the acceptor at its limit for one to end
/// ([`make_room`]), [`AsyncServing::wait_until_clients`] for their count to change.
#[derive(Default)]
struct Turnover {
    /// Notified when a client is listed, when a client's task has served it to the end, and
    /// when the acceptor ends.
    changed: Notify,
    /// Set once the acceptor has ended: no client is listed from then on.
    acceptor_gone: AtomicBool,
}

/// Dropped as the acceptor's task ends, however it ends (also dropped unfinished): those
/// waiting for a client to come stop waiting.
struct AcceptorGone(Arc<Turnover>);

impl Drop for AcceptorGone {
    fn drop(&mut self) {
        self.0.acceptor_gone.store(true, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

impl Client {
    /// The client, its connection held (`None`: gone with its task, which has ended).
    fn held(self) -> Held {
        Held {
            connection: self.connection.upgrade(),
            task: self.task,
        }
    }
}

/// A client [`AsyncServing`] stops, its connection held until it is closed.
struct Held {
    connection: Option<AsyncConnection>,
    task: JoinHandle<Result<()>>,
}

/// The clients, locked, once those whose tasks have let go of their connections are
/// forgotten ([`Client::ended`]: set before a task finishes, or as it is dropped unfinished).
fn pruned(clients: &Mutex<Vec<Client>>) -> MutexGuard<'_, Vec<Client>> {
    let mut clients = clients.lock();
    clients.retain(|c| !c.ended.load(Ordering::SeqCst));
    clients
}

/// An [`AsyncServer`] accepting clients on a listener. Dropping it stops accepting and hangs
/// up on every client at once (the listener is closed, whether or not its runtime is
/// running: new clients are refused, those that connected and were not accepted yet hung up
/// on, and its name or path is free to listen on again when the drop returns), cancelling
/// their calls still running ([`AsyncConnection::close`]); [`AsyncServing::shutdown`] lets
/// calls in flight finish first.
/// Dropped in a handler (a client asking the server to quit), it spares that handler's
/// client: that client is read from no more, and hung up on once its calls in flight, the
/// handler's among them, have replied.
pub struct AsyncServing {
    acceptor: JoinHandle<()>,
    /// The listener the acceptor accepts on: closed (its queue of clients not yet accepted
    /// hung up on, its name or path freed) when this stops, rather than once the runtime next
    /// polls the acceptor. Taken by whichever stops first, this or the acceptor.
    listener: Arc<Mutex<Option<AsyncListener>>>,
    /// Set when this stops the acceptor, which then says nothing of the error it gets, and
    /// serves no client it accepted meanwhile.
    stopped: Arc<AtomicBool>,
    clients: Arc<Mutex<Vec<Client>>>,
    /// Why the acceptor stopped, if it stopped on its own.
    ended: Arc<Mutex<Option<Error>>>,
    /// [`AsyncServer::shutdown_stall_limit`].
    stall_limit: Duration,
    /// Clients coming and going, for [`AsyncServing::wait_until_clients`].
    turnover: Arc<Turnover>,
}

impl AsyncServing {
    /// How many clients are connected now: those [`AsyncServer::max_clients`] counts, not
    /// those turned away.
    pub fn clients(&self) -> usize {
        pruned(&self.clients).len()
    }

    /// `Ok(())` while the listener accepts clients (or retries after running out of file
    /// descriptors or memory), the error that made it stop for good otherwise (see
    /// [`AsyncServer::listen`]; an error saying so if its task panicked or its runtime shut
    /// down). The clients
    /// already connected are served on either way.
    pub fn accepting(&self) -> Result<()> {
        // Before the error is read: a task that ended on its own has stored it.
        let finished = self.acceptor.is_finished();
        match &*self.ended.lock() {
            Some(e) => Err(e.duplicate()),
            None if finished => Err(Error::Io(io::Error::other(
                "the listener's task ended without a reason: it panicked, or its runtime shut down",
            ))),
            None => Ok(()),
        }
    }

    /// Waits until `until` holds for the number of clients connected (as
    /// [`AsyncServing::clients`] counts them), and returns `true`; or `false` once the count
    /// can no longer change and `until` does not hold: the listener has stopped accepting for
    /// good ([`AsyncServing::accepting`]) and no client is left.
    ///
    /// `until` is asked at once, then after each time clients are accepted or end, with the
    /// count as it is by then: changes close together may be seen as one, so a count that
    /// holds only for a moment (a client that comes and ends at once) may be missed.
    /// A client ends once the server has served it to the end and let go of its connection:
    /// its handlers have returned, their replies have gone out or failed, and the server
    /// holds nothing of it (the connection's socket is closed unless a service of yours kept
    /// a handle to it). Clients turned away never count. As in the blocking flavour
    /// ([`Serving::wait_until_clients`](crate::Serving::wait_until_clients)); give up after
    /// a while with `tokio::time::timeout`.
    ///
    /// A server that quits once it has had no client for a minute:
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # async fn demo(serving: ipc_runtime::tokio::AsyncServing) {
    /// let a_minute = Duration::from_secs(60);
    /// while serving.wait_until_clients(|n| n == 0).await {
    ///     let came = tokio::time::timeout(a_minute, serving.wait_until_clients(|n| n > 0));
    ///     if !matches!(came.await, Ok(true)) {
    ///         break;
    ///     }
    /// }
    /// serving.shutdown().await;
    /// # }
    /// ```
    pub async fn wait_until_clients(&self, mut until: impl FnMut(usize) -> bool) -> bool {
        loop {
            let mut changed = pin!(self.turnover.changed.notified());
            // Before the look: a change after it wakes this.
            changed.as_mut().enable();
            // The flag first: a client listed before the acceptor ended is counted below.
            let gone = self.turnover.acceptor_gone.load(Ordering::SeqCst);
            let clients = self.clients();
            if until(clients) {
                return true;
            }
            if gone && clients == 0 {
                return false;
            }
            changed.await;
        }
    }

    /// Stops accepting (the listener is closed), stops reading new requests, lets every call
    /// already running finish and send its reply, then returns. Each client sees a hang-up
    /// once its own calls have replied, whatever the other clients' handlers still do. Just
    /// before it, the client is told that this end has shut down
    /// ([`AsyncConnection::shut_down`]): its calls not answered (not read yet, or read only to
    /// be dropped) fail with [`Error::ShutDown`], which says that they did not run, rather
    /// than [`Error::Disconnected`]. Dropping `AsyncServing` hangs up on its clients at once,
    /// without it; and a client whose services were still being made
    /// ([`AsyncServer::service_with`]) as the shutdown began gets no notice either (its calls
    /// fail with `Disconnected`), as [`AsyncConnection::shut_down`] says of a connection that
    /// serves nothing yet.
    ///
    /// A handler that calls its client back (a service of [`AsyncServer::service_with`])
    /// gets the client's answers meanwhile: the connection reads on for them until its last
    /// call in flight has finished ([`AsyncConnection::stop_reading`]). So a client that
    /// never answers holds the shutdown up as a handler that never returns does: give such
    /// calls a timeout (the generated client's `with_timeout`).
    ///
    /// As in the blocking flavour ([`Serving::shutdown`](crate::Serving::shutdown)), a send
    /// to a client that does not read does not hold the shutdown up for good: once one has
    /// waited 5 seconds ([`AsyncServer::shutdown_stall_limit`]) with none of its message
    /// going out, that client's connection is closed: the send fails as if the client had
    /// hung up, and the calls still running for it are cancelled, the one whose reply
    /// stalled among them ([`AsyncConnection::close`]).
    /// A client that reads gets its replies, however long they take; handlers still running
    /// are waited for. The sends are watched from a thread of the shutdown's
    /// own, so this needs no time driver in the runtime. (If that thread cannot be started,
    /// every client is hung up on at once.)
    ///
    /// Dropping the returned future before it completes (under a timeout, in a `select!`)
    /// hangs up at once on every client it has not finished with, as dropping the
    /// `AsyncServing` does: their calls still running are cancelled
    /// ([`AsyncConnection::close`]), so a handler stuck at an `.await` lets its client's
    /// socket go.
    ///
    /// A handler may await this (a client asking the server to quit): the shutdown then waits
    /// for every other client, not for the one whose handler it runs in, which cannot have
    /// finished yet; that client's reply goes out once the handler returns, and its
    /// connection ends after it. (Only when awaited in the handler's own future: spawned
    /// into a task of its own, the shutdown waits for that client too, so the handler must
    /// not wait for that task.) A blocking method (`#[interface(async_server)]`) that blocks
    /// on this holds its place on the pool meanwhile, which the calls the shutdown waits for
    /// may be waiting for: under `max_running(n)`, it waits for good once all `n` are taken.
    /// Such a method should spawn the shutdown into a task and return.
    pub async fn shutdown(mut self) {
        self.stop_accepting();
        // Once it has ended, the listener is closed (and its socket file removed).
        let _ = (&mut self.acceptor).await;
        let clients = std::mem::take(&mut *self.clients.lock());
        if clients.is_empty() {
            return;
        }
        let mut clients: Vec<Held> = clients.into_iter().map(Client::held).collect();
        let connections = || clients.iter().filter_map(|c| c.connection.as_ref());
        for connection in connections() {
            connection.shut_down();
        }
        // A reply its client does not read must not hold the shutdown up for good.
        // Not a tokio oneshot: see `handoff`.
        let (ended, watch_ended) = super::handoff::channel::<()>();
        let watched = connections().cloned().collect();
        let watch = stall::watch(watched, self.stall_limit, move || ended.give(()));
        // Awaited in one of a client's handlers (a client asking the server to quit): that
        // client's task ends only once the handler has returned and its reply has gone out,
        // which the shutdown cannot wait for. Let go, it has stopped reading like the others;
        // its connection ends when its task does.
        let handling_here = |c: &Held| c.connection.as_ref().is_some_and(|c| c.handling_here());
        if let Some(own) = clients.iter().position(handling_here) {
            drop(clients.remove(own));
        }
        // Popped in the order they came; the rest are hung up on if this future is dropped.
        let mut open = Unfinished(clients);
        open.0.reverse();
        while let Some(client) = open.0.last_mut() {
            let _ = (&mut client.task).await;
            if let Some(connection) = &client.connection {
                connection.close();
            }
            open.0.pop();
        }
        drop(watch);
        // Until the watch has dropped its clones of the connections (closing their sockets).
        let _ = watch_ended.await;
    }
}

/// The clients [`AsyncServing::shutdown`] has taken and not yet closed: it owns them so that
/// a shutdown future dropped halfway still hangs up on them, as [`AsyncServing`]'s drop would
/// have, rather than leave their connections open (and their tasks running) for good.
struct Unfinished(Vec<Held>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        for connection in self.0.iter().filter_map(|c| c.connection.as_ref()) {
            connection.close();
        }
    }
}

impl AsyncServing {
    /// Stops accepting at once: the listener is closed (its socket file removed, its name
    /// free to listen on again), new clients are refused, those queued and not accepted yet
    /// hung up on, and the acceptor task aborted.
    fn stop_accepting(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        let listener = self.listener.lock().take();
        if let Some(listener) = listener {
            // Shut down and emptied as well as closed: a copy of the socket made elsewhere
            // would keep it listening.
            let listener = listener.listener();
            let _ = listener.shutdown();
            // Non-blocking, as `AsyncListener` made its socket: until none is left.
            while listener.accept_fd().is_ok() {}
        }
        self.acceptor.abort();
    }
}

/// How many clients are connected, and whether the listener accepts.
impl std::fmt::Debug for AsyncServing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncServing")
            .field("clients", &self.clients())
            .field("accepting", &self.accepting())
            .finish_non_exhaustive()
    }
}

impl Drop for AsyncServing {
    fn drop(&mut self) {
        self.stop_accepting();
        let clients = std::mem::take(&mut *self.clients.lock());
        // A client whose connection is gone has ended already.
        for connection in clients.iter().filter_map(|c| c.connection.upgrade()) {
            // Dropped in one of this client's handlers (a client asking the server to quit):
            // hung up on at once, it would not get that handler's reply. It stops reading, as
            // at a shutdown, and its connection ends once its calls in flight have replied.
            match connection.handling_here() {
                true => connection.shut_down(),
                false => connection.close(),
            }
        }
    }
}
