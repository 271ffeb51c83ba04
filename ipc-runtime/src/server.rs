//! [`Server`]: which interfaces to serve, how many requests at once, who may call; on one
//! connection or on every client of a [`Listener`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};

use nix::sys::socket as ns;
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crate::accept_retry::{self, Failure, Trouble};
use crate::admission::{self, Admission};
use crate::connection::{Connection, WeakConnection};
use crate::error::{Error, Result};
use crate::frame::Limits;
use crate::listener::Listener;
use crate::service::{InterfaceInfo, Service};
use crate::socket::{PeerCredentials, Socket};
use crate::stall;

type SharedAuthorizer =
    Arc<dyn Fn(Option<&PeerCredentials>, &InterfaceInfo, u32) -> Result<(), String> + Send + Sync>;

/// What [`Server::service_with`] makes each connection's service with.
type MakeService = Arc<dyn Fn(&Connection) -> Arc<dyn Service> + Send + Sync>;

/// One service a server serves: the same to every connection, or one made for each.
#[derive(Clone)]
enum Provided {
    Shared(Arc<dyn Service>),
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

/// Serves a set of interfaces.
///
/// ```no_run
/// # use ipc_runtime::{Listener, Server, service::Service};
/// # fn demo(my_service: impl Service) -> ipc_runtime::Result<()> {
/// let server = Server::new()
///     .service(my_service)                      // e.g. IpaServer::new(MyIpa)
///     .threads(4)                               // up to 4 requests at once per client
///     .authorize(|peer, _iface, _cmd| match peer {
///         Some(p) if p.uid == 1000 => Ok(()),
///         _ => Err("only uid 1000 may call".into()),
///     });
/// let serving = server.listen(Listener::bind("/run/my.sock")?)?;
/// // ... later: stop accepting, let the calls in flight finish and reply, hang up.
/// serving.shutdown();
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Server {
    /// In the order they were added.
    services: Vec<Provided>,
    threads: usize,
    authorizer: Option<SharedAuthorizer>,
    stall_limit: Duration,
    client_limits: Limits,
    admission: Admission,
}

/// The interfaces served, by name (`service_with` for one made per connection), and the
/// settings.
impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let services: Vec<&str> = self.services.iter().map(Provided::name).collect();
        f.debug_struct("Server")
            .field("services", &services)
            .field("threads", &self.threads)
            .field("authorize", &self.authorizer.is_some())
            .field("admit", &self.admission.admit.is_some())
            .field("max_clients", &self.admission.max_clients)
            .field("client_limits", &self.client_limits)
            .field("shutdown_stall_limit", &self.stall_limit)
            .finish()
    }
}

impl Default for Server {
    fn default() -> Server {
        Server::new()
    }
}

impl Server {
    /// A server with no interfaces yet that runs each connection's requests strictly one
    /// after the other, in the order they arrive.
    pub fn new() -> Server {
        Server {
            services: Vec::new(),
            threads: 1,
            authorizer: None,
            stall_limit: stall::DEFAULT_LIMIT,
            client_limits: Limits::default(),
            admission: Admission::default(),
        }
    }

    /// Serves `service`'s interface too.
    ///
    /// # Panics
    ///
    /// If an interface of the same name is served already: the second would replace the
    /// first on every connection. Two traits of one name take names of their own with
    /// `#[interface(name = "...")]`.
    pub fn service(mut self, service: impl Service) -> Server {
        let shared = self.services.iter().filter_map(|s| match s {
            Provided::Shared(s) => Some(s.info()),
            Provided::PerConnection(_) => None,
        });
        crate::service::assert_distinct(shared, service.info(), "Server");
        self.services.push(Provided::Shared(Arc::new(service)));
        self
    }

    /// Serves the interface of the services `make` makes, a service of its own for each
    /// connection: for every client [`Server::listen`] accepts, and for the connection
    /// [`Server::serve`] is given. A handler can then keep state for its one client, and call
    /// that client back: `make` may keep a clone of the connection (in a generated client,
    /// for an interface the client serves on its end).
    ///
    /// `make` runs once per connection, before any of its requests is served, on the thread
    /// that accepts clients (or calls `serve`): the services of all the calls to `service` and
    /// `service_with` in the order they were made, so a slow `make` holds up the clients
    /// that connect meanwhile. Once the connection has ended and its requests have run, its
    /// services are dropped, and with them the clones of the connection they hold: its socket
    /// and shared memory then go with the server's own handles, at once (for `listen`, with
    /// the client's serving threads, before any new client or [`Serving::clients`]). A clone
    /// the service hands elsewhere (to a thread or a global of its own) keeps the connection
    /// open as long as it lives: that one is the service's to drop. A client whose serving
    /// threads cannot be started (for want of memory or threads: the listener says so and
    /// tries again, see [`Server::listen`]) is hung up on and has its services dropped on the
    /// listener's thread, never served. Wherever a listener drops a service, it holds no lock
    /// of its own: the service's `Drop` may ask the [`Serving`] for its clients
    /// ([`Serving::clients`]).
    ///
    /// A `make` that panics on a listener's thread hangs up on that client (the panic is on
    /// stderr) and the listener accepts on; under `serve`, the panic is the caller's.
    ///
    /// # Panics
    ///
    /// An interface served twice is only known once `make` has made a service: when the
    /// first connection is served. Then `serve` panics, saying which interface it is, as
    /// [`Server::service`] does; `listen` hangs up on the client, stops accepting for good
    /// with that message as its error (on stderr, and from [`Serving::accepting`]), and new
    /// clients are refused.
    ///
    /// ```no_run
    /// # use ipc_runtime::service::{Call, InterfaceInfo, Service};
    /// # use ipc_runtime::{Connection, Listener, Server};
    /// # use std::sync::atomic::{AtomicU32, Ordering};
    /// # struct EventsClient(Connection);
    /// # impl EventsClient {
    /// #     fn new(connection: Connection) -> EventsClient { EventsClient(connection) }
    /// #     fn frame_done(&self, _frame: u32) -> ipc_runtime::Result<()> { Ok(()) }
    /// # }
    /// # struct PlayerServer<T>(T);
    /// # impl<T> PlayerServer<T> { fn new(t: T) -> PlayerServer<T> { PlayerServer(t) } }
    /// # impl<T: Send + Sync + 'static> Service for PlayerServer<T> {
    /// #     fn info(&self) -> &'static InterfaceInfo { unimplemented!() }
    /// #     fn handle(&self, _: &mut Call<'_>) -> ipc_runtime::Result<()> { unimplemented!() }
    /// # }
    /// /// One client's `Player` (an `#[interface]` trait): its own frame count, and a way to
    /// /// call that client's `Events` back.
    /// struct Session {
    ///     frames: AtomicU32,
    ///     caller: EventsClient,
    /// }
    ///
    /// impl Session {
    ///     // In `impl Player for Session`:
    ///     fn play(&self) -> u32 {
    ///         let frame = self.frames.fetch_add(1, Ordering::SeqCst);
    ///         let _ = self.caller.frame_done(frame); // a call to the caller, mid-call
    ///         frame
    ///     }
    /// }
    ///
    /// # fn demo() -> ipc_runtime::Result<()> {
    /// let serving = Server::new()
    ///     .service_with(|connection| {
    ///         PlayerServer::new(Session {
    ///             frames: AtomicU32::new(0),
    ///             caller: EventsClient::new(connection.clone()),
    ///         })
    ///     })
    ///     .listen(Listener::bind("/run/my.sock")?)?;
    /// # Ok(()) }
    /// ```
    pub fn service_with<S: Service>(
        mut self,
        make: impl Fn(&Connection) -> S + Send + Sync + 'static,
    ) -> Server {
        let make: MakeService = Arc::new(move |connection| Arc::new(make(connection)));
        self.services.push(Provided::PerConnection(make));
        self
    }

    /// Runs up to `n` requests of one connection at once, on a pool of `n` threads (`n` = 1,
    /// the default, is strictly in order). Oneway messages from one peer still run one at a
    /// time, in the order sent, and a call waits for the oneways that arrived before it.
    ///
    /// The async flavour (feature `tokio`) runs every call of a connection at once unless
    /// told otherwise: its `AsyncServer::max_calls_at_once(n)` (and
    /// `AsyncConnection::set_max_calls_at_once`) is this bound, for calls only (oneways run
    /// on a task of their own there, beside the `n` calls). The server of a trait of `fn`s
    /// (`#[interface(async_server)]`) also has `max_running(n)`, a bound over all its
    /// connections.
    ///
    /// # Panics
    ///
    /// If `n` is 0: a connection nothing serves would queue its peer's requests unanswered.
    pub fn threads(mut self, n: usize) -> Server {
        assert!(
            n > 0,
            "Server::threads(0): a server needs at least one thread"
        );
        self.threads = n;
        self
    }

    /// The [`Limits`] every client [`Server::listen`] accepts is held to: the largest message
    /// and the most fds it may send, and the largest sealed buffer or region view it may hand
    /// over ([`Limits::max_shared_len`]); also the most this end sends it. [`Limits::default`]
    /// (1 GiB, 1,024 fds) unless set: a server for clients it does not trust (other users of
    /// the machine) sets what its interfaces need. Not for [`Server::serve`], whose
    /// connection's socket has its limits already ([`Socket::set_limits`]).
    pub fn client_limits(mut self, limits: Limits) -> Server {
        self.client_limits = limits;
        self
    }

    /// How long, once [`Serving::shutdown`] has begun, a send to a client (a reply, or a call
    /// or oneway a handler makes) may wait for room with none of its message going out before
    /// that client is hung up on: 5 seconds unless set. A client that reads is never hung up
    /// on, however long its replies take to go out; a shorter limit ends a shutdown sooner
    /// when a client has stopped reading, at the risk of cutting off one that is merely slow
    /// to be scheduled. Only the shutdown uses it: while serving, a send waits for a client
    /// that does not read for as long as the client stays connected.
    pub fn shutdown_stall_limit(mut self, limit: Duration) -> Server {
        self.stall_limit = limit;
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
    ) -> Server {
        self.authorizer = Some(Arc::new(authorize));
        self
    }

    /// Lets `admit` turn clients of [`Server::listen`] away when they connect: it sees the
    /// client's credentials (`None` if the kernel would not say) and returns `Err(reason)` for
    /// a client this server will never serve. Where [`Server::authorize`] refuses calls one by
    /// one, a client turned away costs nothing: `admit` runs once per client, on the thread
    /// that accepts, before [`Server::service_with`]'s `make` and before any of the client's
    /// threads starts; the client is told why and hung up on at once. Its calls then fail
    /// with [`Error::Refused`] (the reason escaped and cut, as the peer's text always is),
    /// also those it sends after the hang-up; a `#[oneway]` message it sent before it was
    /// turned away had `Ok(())` and is dropped unread.
    ///
    /// A slow `admit` holds up the clients that connect meanwhile, as a slow `make` does; one
    /// that panics turns that client away ("the server's admission check panicked", the panic
    /// on stderr) and the listener accepts on. Not for [`Server::serve`], whose connection is
    /// the caller's to take or not.
    ///
    /// ```no_run
    /// # use ipc_runtime::{Listener, Server};
    /// # fn demo() -> ipc_runtime::Result<()> {
    /// let serving = Server::new()
    ///     .admit(|peer| match peer {
    ///         Some(p) if p.uid == 1000 => Ok(()),
    ///         _ => Err("only uid 1000 may connect".into()),
    ///     })
    ///     .max_clients(64)
    ///     .listen(Listener::bind("/run/my.sock")?)?;
    /// # Ok(()) }
    /// ```
    pub fn admit(
        mut self,
        admit: impl Fn(Option<&PeerCredentials>) -> Result<(), String> + Send + Sync + 'static,
    ) -> Server {
        self.admission.admit = Some(Arc::new(admit));
        self
    }

    /// Serves at most `n` clients of [`Server::listen`] at once. A client that connects while
    /// `n` are connected is turned away, as by [`Server::admit`]: its calls fail with
    /// `Error::Refused("the server is at its limit of n clients")`, and it may try again later.
    /// It is not left waiting in the kernel's queue, where it would hold up the clients behind
    /// it and learn nothing. A client counts from its acceptance until it has hung up and its
    /// calls have run (as [`Serving::clients`] counts it); the limit is checked before
    /// `admit` runs. No limit unless set: the process's (`RLIMIT_NOFILE`, `RLIMIT_NPROC`,
    /// memory) are then what bound the clients, each of which costs its threads and at least
    /// one file descriptor.
    ///
    /// A client that has just hung up may still count when the next one connects (its threads
    /// have not yet seen the hang-up, or are finishing its last call). So at the limit, if
    /// some of the clients counted have hung up, the listener waits for one of them to end,
    /// up to 1 second from when it found them gone, and serves the new client if one does: a
    /// client that reconnects at once is served. A client that hung up with a call still
    /// running counts until that call has run, so hanging up gets no client past the limit:
    /// once that second is over, new clients are turned away at once again. If none of the
    /// clients counted has hung up, a new one is turned away at once. The clients that
    /// connect during that second wait in the kernel's queue.
    ///
    /// # Panics
    ///
    /// If `n` is 0: a server that serves nobody.
    pub fn max_clients(mut self, n: usize) -> Server {
        assert!(
            n > 0,
            "Server::max_clients(0): a server must serve a client"
        );
        self.admission.max_clients = Some(n);
        self
    }

    /// Serves `connection` until the peer hangs up, on this thread plus `threads - 1` more.
    /// Returns `Ok(())` on a clean close, once every one of those threads is done: a handler
    /// still running when the connection ends (one waiting for a reply from a peer that died
    /// gets [`Error::Disconnected`] first) runs to its end before `serve` returns. If a
    /// thread cannot be started, returns that error ([`Error::Io`] of the OS error's kind,
    /// saying which thread of [`Server::threads`] it was) without serving anything (the
    /// connection stays open).
    ///
    /// # Panics
    ///
    /// If a service [`Server::service_with`] makes serves an interface served already. A
    /// `make` that panics has its panic go on to the caller. Either way the connection is left
    /// served by nothing, as it was before.
    pub fn serve(&self, connection: &Connection) -> Result<()> {
        let helpers = self.start_helpers(connection)?;
        // A `make` that panics (or two services of one interface) leaves the connection
        // served by nothing, as it was: the helpers end without serving as they are dropped.
        let services = match self.services_coming(connection) {
            Ok(Ok(services)) => services,
            Ok(Err(twice)) => panic!("{twice}"),
            Err(panicked) => std::panic::resume_unwind(panicked),
        };
        self.run(connection, services, helpers)
    }

    /// [`Server::services_for`], with `connection` marked as about to be served meanwhile
    /// ([`Connection::runners_coming`]: what a thread `make` starts reads waits for the
    /// serving threads, past the bounds of the queue too, as for threads serving). If `make`
    /// panics, or two services serve one interface, the mark is taken back: the connection is
    /// served by nothing, as before.
    fn services_coming(
        &self,
        connection: &Connection,
    ) -> std::thread::Result<Result<Vec<Arc<dyn Service>>, String>> {
        connection.runners_coming();
        let made = catch_unwind(AssertUnwindSafe(|| self.services_for(connection)));
        if !matches!(made, Ok(Ok(_))) {
            connection.runners_not_coming();
        }
        made
    }

    /// What `connection` serves, in the order added: the shared services, and one made for it
    /// by each [`Server::service_with`]. `Err` says which interface two of them serve.
    fn services_for(&self, connection: &Connection) -> Result<Vec<Arc<dyn Service>>, String> {
        let mut services: Vec<Arc<dyn Service>> = Vec::with_capacity(self.services.len());
        for provided in &self.services {
            let (service, added_by) = match provided {
                Provided::Shared(service) => (service.clone(), "Server::service"),
                Provided::PerConnection(make) => (make(connection), "Server::service_with"),
            };
            let served = services.iter().map(|s| s.info());
            crate::service::distinct(served, service.info(), added_by)?;
            services.push(service);
        }
        Ok(services)
    }

    /// Starts the `threads - 1` threads that serve `connection` beside the one that calls
    /// [`Server::run`]; each waits for its go-ahead there. Starting them all before any serves
    /// lets a failure to start one (for want of memory or threads) be an error, not a panic
    /// on a connection half served: the ones started already end without serving.
    fn start_helpers(&self, connection: &Connection) -> io::Result<Vec<Helper>> {
        (1..self.threads)
            .map(|n| {
                let (go, told) = mpsc::channel::<()>();
                let connection = connection.clone();
                let thread = std::thread::Builder::new()
                    .spawn(move || match told.recv() {
                        Ok(()) => connection.run(),
                        Err(_) => Ok(()), // `go` dropped: serving never started
                    })
                    // The OS error alone ("Operation not permitted", from a seccomp filter
                    // that refuses `clone`) does not say what failed, nor what to change.
                    .map_err(|e| {
                        let threads = self.threads;
                        let why = format!(
                            "could not start serving thread {} of Server::threads({threads}): {e}",
                            n + 1
                        );
                        io::Error::new(e.kind(), why)
                    })?;
                Ok(Helper { go, thread })
            })
            .collect()
    }

    /// Serves `services` on `connection`, on this thread and on `helpers`, until the peer
    /// hangs up.
    fn run(
        &self,
        connection: &Connection,
        services: Vec<Arc<dyn Service>>,
        helpers: Vec<Helper>,
    ) -> Result<()> {
        self.install(connection, services);
        let helpers: Vec<_> = helpers
            .into_iter()
            .map(|helper| {
                let _ = helper.go.send(());
                helper.thread
            })
            .collect();
        let mut result = connection.run();
        for helper in helpers {
            let outcome = helper
                .join()
                // Handlers' panics are caught and answered, so this is a bug of this side's,
                // not anything the peer did.
                .unwrap_or_else(|_| Err(io::Error::other("a serving thread panicked").into()));
            result = result.and(outcome);
        }
        result
    }

    /// Accepts clients on `listener` and serves each on threads of its own, until
    /// [`Serving::shutdown`].
    ///
    /// Each client has [`Server::threads`] threads of its own for as long as it stays
    /// connected: each one costs its threads and at least one file descriptor (its socket).
    /// [`Server::max_clients`] caps how many are connected at once, and [`Server::admit`]
    /// turns clients away by their credentials before anything is spent on them; without
    /// them, the process's limits (`RLIMIT_NOFILE`, `RLIMIT_NPROC`, memory) are what bound
    /// the clients. A client that hangs up costs nothing once its calls have run: its threads
    /// end, and its connection (socket, buffers, shared memory) goes with them.
    ///
    /// When accepting fails for want of resources — this process or the system is out of
    /// file descriptors (`EMFILE`, `ENFILE`) or memory (`ENOMEM`, `ENOBUFS`, a thread that
    /// cannot be started), or a security module refuses (`EPERM`) — the listener keeps going:
    /// it says so on stderr (at most one line every 10 seconds, and one when it accepts
    /// again), waits (5 ms, doubling up to 1 s) and tries again. Clients that connect
    /// meanwhile wait, queued, until it can accept them (or until their calls time out). Any
    /// other error ends accepting for good: the listener prints it, closes its socket so that
    /// new clients are refused instead of left waiting (`ECONNREFUSED`, or `ENOENT` for a
    /// path, whose socket file is removed) and the name or path is free to listen on again,
    /// and [`Serving::accepting`] returns it; the clients already connected are served on.
    pub fn listen(self, listener: Listener) -> Result<Serving> {
        let stall_limit = self.stall_limit;
        // For `Serving` to wake the acceptor from its `accept`; the listener is the thread's.
        let listening = Arc::new(Mutex::new(Some(listener.as_fd().try_clone_to_owned()?)));
        let clients: Arc<Mutex<Vec<Client>>> = Arc::default();
        let ended: Arc<Mutex<Option<Error>>> = Arc::default();
        let shutting_down: Arc<AtomicBool> = Arc::default();
        let turnover: Arc<Turnover> = Arc::default();
        let (stop, stopping) = mpsc::channel();
        let acceptor = {
            let (listening, clients, ended) = (listening.clone(), clients.clone(), ended.clone());
            let (turnover, shutting_down) = (turnover.clone(), shutting_down.clone());
            std::thread::Builder::new().spawn(move || {
                // Dropped last, once `accepting` says why the acceptor ended.
                let _gone = AcceptorGone(turnover.clone());
                let accepted =
                    self.accept_loop(&listener, &clients, &turnover, &stopping, &shutting_down);
                // Closed, the dup too: new clients are refused rather than queued for
                // nobody, and the name or path is free to listen on again.
                drop(listening.lock().take());
                drop(listener);
                if let Err(e) = accepted {
                    // Said last, so that whoever reads it finds `accepting` and the listener
                    // as it says.
                    let said = e.to_string();
                    *ended.lock() = Some(e);
                    accept_retry::stopped(&said);
                }
            })?
        };
        Ok(Serving {
            stall_limit,
            listening,
            clients,
            acceptor: Some(acceptor),
            stop: Some(stop),
            turnover,
            ended,
            shutting_down,
        })
    }

    /// Accepts until [`Serving`] drops `stop`'s sender (`Ok`) or accepting fails for good.
    fn accept_loop(
        &self,
        listener: &Listener,
        clients: &Mutex<Vec<Client>>,
        turnover: &Arc<Turnover>,
        stop: &Receiver<()>,
        shutting_down: &Arc<AtomicBool>,
    ) -> Result<()> {
        let stopping = || matches!(stop.try_recv(), Err(TryRecvError::Disconnected));
        let mut trouble = Trouble::new();
        loop {
            let fd = match listener.accept_fd().map_err(io::Error::from) {
                Ok(fd) => fd,
                // Serving::stop shut the listening socket down (EINVAL), or it wants us to
                // stop while accepting fails anyway.
                Err(_) if stopping() => return Ok(()),
                Err(e) => match accept_retry::classify(&e) {
                    Failure::ClientGone => continue,
                    Failure::OutOfResources => {
                        if back_off(trouble.failed("cannot accept a client", &e), clients, stop) {
                            return Ok(());
                        }
                        continue;
                    }
                    Failure::Fatal => return Err(e.into()),
                },
            };
            // The listening socket's shutdown still hands out the clients queued before it:
            // once stopping, they are hung up on, not served.
            if stopping() {
                return Ok(());
            }
            // A failure from here on concerns this one client, which sees a hang-up.
            let connection = match Socket::new(fd) {
                Ok(mut socket) => {
                    socket.set_limits(self.client_limits);
                    if let Some(max) = self.admission.max_clients {
                        make_room(clients, max, turnover, stopping);
                        if stopping() {
                            return Ok(());
                        }
                    }
                    // Only the acceptor adds clients, so the count holds until it does.
                    let connected = || pruned(clients).len();
                    if let Err(reason) = self.admission.check(&socket, connected) {
                        trouble.accepted();
                        admission::turn_away(socket, &reason);
                        continue;
                    }
                    Connection::new(socket)
                }
                Err(e) => {
                    let wait = trouble.failed("cannot set up a client's socket", &e);
                    if back_off(wait, clients, stop) {
                        return Ok(());
                    }
                    continue;
                }
            };
            // Served from now on, unless `make` fails. A `make` that panics (the panic hook
            // has said so) fails this client only; it is hung up on, not only let go of, as
            // `make` may have kept a handle.
            let services = match self.services_coming(&connection) {
                Ok(Ok(services)) => services,
                Ok(Err(twice)) => {
                    connection.close();
                    return Err(Error::Io(io::Error::other(twice)));
                }
                Err(_panicked) => {
                    connection.close();
                    continue;
                }
            };
            // Nothing of the user's runs under the clients' lock, which a service's `Drop` may
            // take (asking the server for its clients, its `Debug`): so the client's threads
            // start before it is listed, and wait for what they serve. A thread that cannot
            // start has what it was handed dropped on this thread (by `spawn`), which is none
            // of the user's: the services, and the handles to the server, are still here.
            let (client, handoff) = match self.spawn_client(&connection, turnover, shutting_down) {
                Ok(started) => started,
                Err(e) => {
                    // Hung up on, as when its `make` panics: a handle the `make` kept (to
                    // call the client later) would otherwise keep it open, its requests held
                    // for serving threads that never come. The client's own services
                    // dropped first, under no lock.
                    connection.close();
                    drop((services, connection));
                    let wait = trouble.failed("cannot start a thread for a client", &e);
                    if back_off(wait, clients, stop) {
                        return Ok(());
                    }
                    continue;
                }
            };
            // Listed before it is served, so that `clients()` never misses a client that has
            // already been served; and under the lock a stop takes the clients with, so that
            // the stop either sees it or has it stopped here.
            let mut list = pruned(clients);
            if stopping() {
                drop(list);
                stopped_mid_accept(&connection, client, handoff);
                return Ok(()); // the services dropped as it returns, under no lock
            }
            trouble.accepted();
            list.push(client);
            // Once listed, where the waiters it wakes count it.
            drop(list);
            turnover.signal();
            // Let go of before the threads serve: they own the connection's only handles then
            // (apart from those the services keep), so that it goes as they are done.
            drop(connection);
            // The thread waits for this, and cannot have ended: it takes them. (Should it
            // not, they are dropped here, under no lock.) Nothing of the user's ran on this
            // thread since the listing: a stop made here would wait for the client's thread,
            // which would wait for this.
            let _ = handoff.send(Handoff {
                server: self.clone(),
                services,
            });
        }
    }

    /// Starts the threads that serve `connection`, waiting for the [`Handoff`] of what they
    /// serve; all started here so that a failure to start one is the acceptor's to report and
    /// wait out. They are handed nothing of the user's until they serve: a thread that cannot
    /// start has what it was to run dropped by `spawn`, on the acceptor's thread, and a client
    /// never listed ([`stopped_mid_accept`]) has its threads end without serving.
    ///
    /// Once handed what they serve, the threads own the connection's only handles (apart from
    /// those the services keep): the client's list entry holds it weakly, so that the
    /// connection, with its socket and shared memory, goes as soon as its serving is done,
    /// not when the list is next pruned. Once `shutting_down` is set ([`Serving::stop`]), the
    /// connection is hung up on as soon as its serving is done, whatever other handles there
    /// are.
    fn spawn_client(
        &self,
        connection: &Connection,
        turnover: &Arc<Turnover>,
        shutting_down: &Arc<AtomicBool>,
    ) -> std::io::Result<(Client, Sender<Handoff>)> {
        let helpers = self.start_helpers(connection)?;
        // Before the client is listed for `Serving::shutdown` to stop, and the threads take
        // a while to start: a call still in the socket then is dropped, as on a client whose
        // threads serve, not run once they come with its calls back failing.
        connection.runners_coming();
        let helper_threads = helpers.iter().map(|h| h.thread.thread().id()).collect();
        let (handoff, handed) = mpsc::channel::<Handoff>();
        let connection = connection.clone();
        let weak = connection.downgrade();
        let shutting_down = shutting_down.clone();
        let ended = Arc::new(AtomicBool::new(false));
        let (ended_there, turnover) = (ended.clone(), turnover.clone());
        let thread = std::thread::Builder::new().spawn(move || {
            let Ok(Handoff { server, services }) = handed.recv() else {
                // Never listed (the listener stopped as it accepted the client): the helpers
                // end without serving, their handles of the connection gone before this
                // thread, which the listener waits for.
                for Helper { go, thread } in helpers {
                    drop(go);
                    let _ = thread.join();
                }
                return Ok(());
            };
            // Made here, not before the spawn: a client whose thread never started, or that
            // was never listed, has no end to signal (and a spawn that fails drops the
            // closure on the acceptor).
            let leaving = Leaving {
                ended: ended_there,
                turnover,
            };
            let served = server.run(&connection, services, helpers);
            // Drained by a shutdown: hung up on now, not only once `Serving::stop` reaches it,
            // after every client that came before it, however long their handlers run.
            if shutting_down.load(Ordering::SeqCst) {
                connection.close();
            }
            // Everything of the client's let go of before it stops counting: once it does, a
            // shutdown no longer waits for this thread, and the server's services (user code)
            // must not be dropped after the shutdown has returned.
            drop((connection, server));
            drop(leaving);
            served
        })?;
        let client = Client {
            connection: weak,
            thread,
            helper_threads,
            ended,
            hung_up_since: None,
        };
        Ok((client, handoff))
    }

    fn install(&self, connection: &Connection, services: Vec<Arc<dyn Service>>) {
        // The authorizer first: adding a service starts serving, and no request may be
        // checked without it.
        if let Some(authorize) = &self.authorizer {
            let authorize = authorize.clone();
            connection.set_authorizer(move |peer, iface, cmd| authorize(peer, iface, cmd));
        }
        for service in services {
            connection.add_service(service);
        }
    }
}

/// What a listener's client's threads serve, handed to them once the client is listed
/// ([`Server::spawn_client`]).
struct Handoff {
    server: Server,
    services: Vec<Arc<dyn Service>>,
}

/// A thread started to serve a connection, waiting for `go` before it does.
struct Helper {
    go: Sender<()>,
    thread: JoinHandle<Result<()>>,
}

struct Client {
    /// Held weakly: the client's threads own the connection (see [`Server::spawn_client`]).
    connection: WeakConnection,
    thread: JoinHandle<Result<()>>,
    /// The helpers' threads (their handles are `thread`'s to join).
    helper_threads: Vec<ThreadId>,
    /// Set by its thread once it has served the client to the end and let go of its
    /// connection ([`Leaving`]): the client no longer counts, though the thread may not have
    /// returned yet.
    ended: Arc<AtomicBool>,
    /// When the acceptor, at its limit, first found its peer gone ([`make_room`]).
    hung_up_since: Option<Instant>,
}

impl Client {
    /// Whether `id` is one of the threads that serve this client: a handler on one of them
    /// that shuts the server down must not wait for them (it would wait for itself).
    fn served_on(&self, id: ThreadId) -> bool {
        self.thread.thread().id() == id || self.helper_threads.contains(&id)
    }
}

/// Where threads wait for clients to come and go: the acceptor at its limit for one to end
/// ([`make_room`]), [`Serving::wait_until_clients`] for their count to change.
#[derive(Default)]
struct Turnover {
    /// How many times `changed` was signalled: a waiter that looked at the clients between
    /// two signals tells by it that it must look again.
    changes: Mutex<u64>,
    /// Signalled when a client is listed, when a client's thread has served it to the end,
    /// when the acceptor ends, and when [`Serving`] stops.
    changed: Condvar,
    /// Set once the acceptor has ended: no client is listed from then on.
    acceptor_gone: AtomicBool,
}

impl Turnover {
    fn signal(&self) {
        *self.changes.lock() += 1;
        self.changed.notify_all();
    }
}

/// Dropped as the acceptor's thread ends, however it ends: those waiting for a client to come
/// stop waiting.
struct AcceptorGone(Arc<Turnover>);

impl Drop for AcceptorGone {
    fn drop(&mut self) {
        // Before the signal, which has the waiters look at it again.
        self.0.acceptor_gone.store(true, Ordering::SeqCst);
        self.0.signal();
    }
}

/// Dropped by a client's thread once the client's connection is let go (or as the thread
/// unwinds): sets [`Client::ended`] and tells the acceptor.
struct Leaving {
    ended: Arc<AtomicBool>,
    turnover: Arc<Turnover>,
}

impl Drop for Leaving {
    fn drop(&mut self) {
        // Before the signal: the acceptor looks at it under the lock the signal takes.
        self.ended.store(true, Ordering::SeqCst);
        self.turnover.signal();
    }
}

/// At the limit of `max` clients, waits for one of those that have hung up to end, until
/// [`admission::DEPARTURE_GRACE`] after it first found them gone (see [`Server::max_clients`]),
/// or for the server to stop. At once if there is room or none of them has hung up. The count
/// is the caller's to take again.
#[cold]
#[inline(never)]
fn make_room(
    clients: &Mutex<Vec<Client>>,
    max: usize,
    turnover: &Turnover,
    stopping: impl Fn() -> bool,
) {
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
    let mut changes = turnover.changes.lock();
    while !leaving.iter().any(|ended| ended.load(Ordering::SeqCst)) && !stopping() {
        if turnover
            .changed
            .wait_until(&mut changes, deadline)
            .timed_out()
        {
            return;
        }
    }
}

/// The clients, locked, once those whose threads have let go of their connections are
/// forgotten ([`Client::ended`]: set before a thread returns, or as it unwinds).
fn pruned(clients: &Mutex<Vec<Client>>) -> MutexGuard<'_, Vec<Client>> {
    let mut clients = clients.lock();
    clients.retain(|c| !c.ended.load(Ordering::SeqCst));
    clients
}

/// Hangs up on `connection`, accepted as [`Serving`] stopped without waiting for the acceptor
/// (dropped by the `service_with` of this very client, on the acceptor's thread): it dropped
/// `stop` before it took the clients, under the lock the caller has let go of since, so it
/// has hung up on the others already and will never see this one, which threads of its own
/// would serve on for good. They end without serving, `handoff` dropped, and are waited for:
/// nothing of the client's is left once the acceptor returns.
#[cold]
#[inline(never)]
fn stopped_mid_accept(connection: &Connection, client: Client, handoff: Sender<Handoff>) {
    connection.close();
    drop(handoff);
    let _ = client.thread.join();
}

/// Forgets the clients that have hung up, then waits `wait` before the next try to accept.
/// Returns whether the server is stopping.
fn back_off(wait: Duration, clients: &Mutex<Vec<Client>>, stop: &Receiver<()>) -> bool {
    drop(pruned(clients));
    !matches!(stop.recv_timeout(wait), Err(RecvTimeoutError::Timeout))
}

/// A [`Server`] accepting clients on a listener. Dropping it shuts it down.
pub struct Serving {
    /// [`Server::shutdown_stall_limit`].
    stall_limit: Duration,
    /// The listening socket, also, to shut down (which wakes the acceptor from `accept`):
    /// taken by whichever stops first, this or the acceptor, which owns the listener.
    listening: Arc<Mutex<Option<OwnedFd>>>,
    clients: Arc<Mutex<Vec<Client>>>,
    acceptor: Option<JoinHandle<()>>,
    /// Dropped to stop the acceptor, even while it waits between two tries.
    stop: Option<Sender<()>>,
    /// Signalled once `stop` is dropped, for an acceptor waiting for a client to end.
    turnover: Arc<Turnover>,
    /// Why the acceptor stopped, if it stopped on its own.
    ended: Arc<Mutex<Option<Error>>>,
    /// Set as the shutdown starts, before any client stops reading: each client's threads
    /// then hang up on it once they have served it to the end ([`Server::spawn_client`]).
    shutting_down: Arc<AtomicBool>,
}

impl Serving {
    /// How many clients are connected now: those [`Server::max_clients`] counts, not those
    /// turned away.
    pub fn clients(&self) -> usize {
        pruned(&self.clients).len()
    }

    /// `Ok(())` while the listener accepts clients (or retries after running out of file
    /// descriptors or memory), the error that made it stop for good otherwise (see
    /// [`Server::listen`]). The clients already connected are served on either way.
    pub fn accepting(&self) -> Result<()> {
        match &*self.ended.lock() {
            Some(e) => Err(e.duplicate()),
            None => Ok(()),
        }
    }

    /// Waits until `until` holds for the number of clients connected (as
    /// [`Serving::clients`] counts them), and returns `true`; or `false` once the count can no
    /// longer change and `until` does not hold: the listener has stopped accepting for good
    /// ([`Serving::accepting`]) and no client is left.
    ///
    /// `until` is asked at once, then after each time clients are accepted or end, with the
    /// count as it is by then: changes close together may be seen as one, so a count that
    /// holds only for a moment (a client that comes and ends at once) may be missed.
    /// A client ends once the server has served it to the end and let go of its connection:
    /// its handlers have returned, their replies have gone out or failed, and the server
    /// holds nothing of it (the connection's socket is closed unless a service of yours kept
    /// a handle to it). Clients turned away never count.
    ///
    /// A server that quits once it has had no client for a minute:
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # fn demo(serving: ipc_runtime::Serving) {
    /// while serving.wait_until_clients(|n| n == 0)
    ///     && serving.wait_until_clients_timeout(Duration::from_secs(60), |n| n > 0)
    /// {}
    /// serving.shutdown();
    /// # }
    /// ```
    pub fn wait_until_clients(&self, until: impl FnMut(usize) -> bool) -> bool {
        self.wait_for_clients(None, until)
    }

    /// [`Serving::wait_until_clients`], giving up after `timeout` (returning `false` if
    /// `until` does not hold by then). Async, put a `tokio::time::timeout` around
    /// `AsyncServing::wait_until_clients`.
    pub fn wait_until_clients_timeout(
        &self,
        timeout: Duration,
        until: impl FnMut(usize) -> bool,
    ) -> bool {
        // A deadline past any this process could reach stands for none.
        self.wait_for_clients(Instant::now().checked_add(timeout), until)
    }

    fn wait_for_clients(
        &self,
        deadline: Option<Instant>,
        mut until: impl FnMut(usize) -> bool,
    ) -> bool {
        let turnover = &self.turnover;
        loop {
            // Taken first: a change made after it, seen below or not, moves it on, and the
            // wait then looks again rather than sleeps. `until` runs under no lock.
            let seen = *turnover.changes.lock();
            // The flag before the count: a client listed before the acceptor ended is counted.
            let gone = turnover.acceptor_gone.load(Ordering::SeqCst);
            let clients = self.clients();
            if until(clients) {
                return true;
            }
            if gone && clients == 0 {
                return false;
            }
            let mut changes = turnover.changes.lock();
            while *changes == seen {
                match deadline {
                    Some(deadline) => {
                        if turnover
                            .changed
                            .wait_until(&mut changes, deadline)
                            .timed_out()
                        {
                            drop(changes);
                            return until(self.clients());
                        }
                    }
                    None => turnover.changed.wait(&mut changes),
                }
            }
        }
    }

    /// Stops accepting, stops reading new requests, lets every call already running finish
    /// and send its reply, then returns. Each client sees a hang-up once its own calls have
    /// replied, whatever the other clients' handlers still do. Just before it, the client is
    /// told that this end has shut down ([`Connection::shut_down`]): its calls not answered
    /// (not read yet, or read only to be dropped) fail with [`Error::ShutDown`], which says
    /// that they did not run, rather than [`Error::Disconnected`].
    ///
    /// A handler that calls its client back (a service of [`Server::service_with`]) gets the
    /// client's answers meanwhile: the connection reads on for them until its last call in
    /// flight has finished ([`Connection::stop_reading`]), as in the async flavour's
    /// `AsyncServing::shutdown`. So a client that never answers holds the shutdown up as a
    /// handler that never returns does: give such calls a timeout (the generated client's
    /// `with_timeout`).
    ///
    /// A reply waits for room in its client's socket buffer, and a client that does not read
    /// would make it wait for good: so once a send to a client (a reply, or a call or oneway a
    /// handler makes) has waited 5 seconds ([`Server::shutdown_stall_limit`]) with none of its
    /// message going out, that client's connection is shut down (and stderr says so), the
    /// send fails as if the client had hung up, and the shutdown goes on. A client that reads
    /// gets its replies, however long they take to go out, and the other clients are not
    /// affected. Handlers still running are waited for, however long they take. (If no
    /// thread can be started to watch the sends, for want of resources, every client is hung
    /// up on at once instead.) Dropping `Serving` does the same.
    ///
    /// A handler may call this (a client asking the server to quit), or drop the last owner
    /// of `Serving`: the shutdown then waits for every other client, not for the one whose
    /// handler it runs in, which cannot have finished yet; that client's reply goes out once
    /// the handler returns, and its connection ends after it. So may a `make` of
    /// [`Server::service_with`] (a server of so many clients): the client it makes a service
    /// for is hung up on, and the listener closes once `make` has returned.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        // Before the shutdown, so that the acceptor takes the error it causes for a stop.
        drop(self.stop.take());
        self.turnover.signal();
        if let Some(listening) = self.listening.lock().take() {
            let _ = ns::shutdown(listening.as_raw_fd(), ns::Shutdown::Both);
        }
        // Not when stopped on the acceptor's own thread (from a `service_with`), which would
        // wait for itself; the acceptor returns once that has returned.
        match self.acceptor.take() {
            Some(acceptor) if acceptor.thread().id() != std::thread::current().id() => {
                let _ = acceptor.join();
            }
            _ => {}
        }
        let clients = std::mem::take(&mut *self.clients.lock());
        if clients.is_empty() {
            return; // also the drop after `shutdown`
        }
        // Held from here to the close: a client whose connection is gone already has ended,
        // and its thread, which dropped it, is all that is left to wait for.
        let connections: Vec<Option<Connection>> =
            clients.iter().map(|c| c.connection.upgrade()).collect();
        for connection in connections.iter().flatten() {
            connection.shut_down();
        }
        // A reply its client does not read must not hold the shutdown up for good.
        let (ended, watch_ended) = mpsc::channel::<()>();
        let watched = connections.iter().flatten().cloned().collect();
        let watch = stall::watch(watched, self.stall_limit, move || drop(ended));
        let this = std::thread::current().id();
        for (client, connection) in clients.into_iter().zip(connections) {
            if client.served_on(this) {
                // Called from one of this client's handlers (or dropped there): its threads
                // end once that handler has returned and its reply has gone out, which the
                // shutdown cannot wait for.
                continue;
            }
            let _ = client.thread.join();
            if let Some(connection) = connection {
                connection.close();
            }
        }
        drop(watch);
        // Until the watch has dropped its clones of the connections (closing their sockets).
        let _ = watch_ended.recv();
    }
}

/// How many clients are connected, and whether the listener accepts.
impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving")
            .field("clients", &self.clients())
            .field("accepting", &self.accepting())
            .finish_non_exhaustive()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::{Client, Handoff, Server};
    use crate::Connection;
    use crate::connection::tests::CallsBack;
    use crate::service::Service;
    use std::sync::Arc;

    /// A listener's client of `connection`, served by [`CallsBack`], whose thread has started
    /// but waits to install its service until the returned registry lock is let go.
    fn held_before_serving(connection: &Connection) -> (Client, impl Drop + '_) {
        let services: Vec<Arc<dyn Service>> = vec![Arc::new(CallsBack {
            back: connection.clone(),
        })];
        let registry = connection.test_hold_registry();
        let server = Server::new();
        let (client, handoff) = server
            .spawn_client(connection, &Arc::default(), &Arc::default())
            .unwrap();
        handoff.send(Handoff { server, services }).ok().unwrap();
        (client, registry)
    }

    /// `Serving::shutdown` stopping a client accepted whose serving thread has not started
    /// yet (held here before it installs the services, on the registry's lock), with a call
    /// of the client's still in the socket: the call is dropped, as on a client whose thread
    /// serves. It ran once the thread came, the read side shut already: its handler's call
    /// back into the client failed with `Disconnected`, the client alive (seen under load,
    /// clients calling back while the server shut down).
    #[test]
    fn stop_reading_before_a_clients_thread_serves_drops_the_calls_in_the_socket() {
        use crate::connection::tests::{calls_back_request, readable};

        let (peer, connection) = Connection::pair().unwrap();
        let (client, registry) = held_before_serving(&connection);
        peer.socket().send(&calls_back_request(1), &[]).unwrap();
        connection.stop_reading();
        drop(registry);
        client.thread.join().unwrap().unwrap();
        assert!(
            !readable(&peer),
            "the call ran after stop_reading: it called the client back"
        );
    }

    /// A client accepted whose serving thread has not started yet (held here before it
    /// installs the services), called by a thread of the server's meanwhile (one a
    /// `service_with` started, say): the requests the call reads while it waits for its reply,
    /// past the bounds of the queue, wait for the serving thread coming, as they would for
    /// one serving. The call ended the connection instead, saying that nothing serves them.
    #[test]
    fn requests_read_before_a_clients_thread_serves_wait_for_it_past_the_bounds() {
        use crate::Socket;
        use crate::connection::backlog::MAX_REQUESTS;
        use crate::connection::tests::{CALLS_BACK, calls_back_request, reply_to};

        let (theirs, ours) = Socket::pair().unwrap();
        let connection = Connection::new(ours);
        let (client, registry) = held_before_serving(&connection);
        let caller = {
            let connection = connection.clone();
            std::thread::spawn(move || connection.call::<_, u64>(&CALLS_BACK, 1, &(), None))
        };
        // Read by the caller, the only thread reading. Once the connection has ended, they
        // fail to go out: the call's outcome says why.
        for cookie in 1..=MAX_REQUESTS as u64 + 1 {
            let _ = theirs.send(&calls_back_request(cookie), &[]);
        }
        let call = theirs.recv().unwrap();
        let _ = theirs.send(&reply_to(&call, &42u64), &[]);
        let answered = caller.join().unwrap();
        assert!(matches!(answered, Ok(42)), "{answered:?}");
        connection.close();
        drop(registry);
        client.thread.join().unwrap().unwrap();
    }

    #[test]
    #[should_panic(expected = "a server needs at least one thread")]
    fn a_server_of_no_threads_is_refused() {
        let _ = Server::new().threads(0);
    }
}
