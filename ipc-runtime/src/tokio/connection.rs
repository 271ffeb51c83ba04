//! [`AsyncConnection`]: the blocking [`Connection`](crate::Connection)'s protocol, driven by
//! tasks on a tokio runtime.
//!
//! What the peer's requests hold is bounded (`Inner::backlog`, the numbers in
//! [`backlog`](crate::connection::backlog)): each request counts from the reader's receive
//! until its handler has finished (its reply out). At the bounds the reader waits for `room`
//! unless a call of this end waits for a reply; then it reads on, up to twice the bounds (or
//! none past them with nothing serving), and ends the connection past that.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard, RwLock};

use ::tokio::io::unix::AsyncFd;
use ::tokio::runtime::Handle;
use ::tokio::sync::{Mutex as AsyncMutex, Notify, OwnedMutexGuard, mpsc, oneshot, watch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::call::AsyncCall;
use super::envelope::{self, Envelope, Kind};
use super::failure::Failure;
use super::{AsyncService, BoxFuture};
use crate::connection::Authorizer;
use crate::connection::admit::admit;
use crate::connection::backlog::{AtomicBacklog, Cost};
use crate::connection::buffers::with_buffers;
use crate::connection::lane::Lane;
use crate::connection::trace;
use crate::connection::{decode_reply, unreceived};
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::service::{CallerScope, InterfaceInfo};
use crate::socket::{PeerCredentials, SendCursor, Socket};

/// A connection to a peer process on a tokio runtime: the async flavour of
/// [`Connection`](crate::Connection), speaking the same protocol.
///
/// Cloning is cheap and clones share the connection. It has tasks of its own on the runtime
/// it was created in (see the [module docs](super)): calls and served interfaces work as long
/// as that runtime runs. When the last clone is dropped the connection shuts down: the peer
/// sees a hang-up and the tasks end.
#[derive(Clone)]
pub struct AsyncConnection {
    inner: Arc<Inner>,
    /// Held by the user's clones only (not by the connection's own tasks): the last one to go
    /// shuts the connection down.
    _owner: Arc<Owner>,
}

/// Shuts the connection down when the last [`AsyncConnection`] is dropped.
struct Owner(Arc<Inner>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.hang_up(Socket::shutdown);
    }
}

/// The socket, as tokio's `AsyncFd` wants it.
struct Registered(Socket);

impl AsRawFd for Registered {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

// SAFETY: a `Socket` owns its fd and closes it only when dropped.
unsafe impl super::OwnsFd for Registered {}

pub(super) struct Inner {
    io: AsyncFd<Registered>,
    peer: Option<PeerCredentials>,
    runtime: Handle,
    /// Held from the first datagram of a message to its last.
    send_lock: Arc<AsyncMutex<()>>,
    state: Mutex<State>,
    next_cookie: AtomicU64,
    services: RwLock<Vec<Arc<dyn AsyncService>>>,
    authorizer: RwLock<Option<Box<Authorizer>>>,
    tasks: Arc<Tasks>,
    pub(super) trace: bool,
    /// Byte strings through shared memory, as in the blocking flavour.
    lane: Lane,
    /// How many oneway messages have run (or been passed over once the connection ended):
    /// a call waits until the oneways that arrived before it have run.
    oneways_run: watch::Sender<u64>,
    /// What the requests received and not finished hold (see
    /// [`backlog`](crate::connection::backlog)): held, queued for the oneway task, or in
    /// their handler's task until the reply is out.
    backlog: AtomicBacklog,
    /// The reader waits for `room`, at the backlog's bounds with no call of this end waiting
    /// for a reply. Set under the state lock; a request that finishes or a call that starts
    /// meanwhile signals `room`.
    paused: AtomicBool,
    room: Notify,
    /// This end shut the socket down (`hang_up`): a reader waiting for room reads no more.
    hung_up: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Calls waiting for replies, by cookie. A dropped receiver is a cancelled call.
    pending: HashMap<u64, oneshot::Sender<Result<Frame>>>,
    /// Why the connection ended; once set, it stays.
    closed: Option<Error>,
    /// Someone serves on this connection: requests are handled as they arrive.
    serving: bool,
    /// Requests that arrived before anyone served, in order.
    held: Vec<(Frame, Envelope, Cost)>,
    /// The task that runs oneway messages in order, once there is one (as many as the
    /// backlog's bounds let in).
    oneways: Option<mpsc::UnboundedSender<(Frame, Envelope, Cost)>>,
    /// How many oneway messages went to that task.
    oneways_queued: u64,
    /// That task is running (it may outlive `oneways`, finishing what it has).
    oneway_task: bool,
}

/// The connection's tasks still running, so that [`AsyncConnection::run`] can wait for them.
#[derive(Default)]
struct Tasks {
    count: AtomicUsize,
    idle: Notify,
}

/// One running task; dropped last in the task, after its `Arc<Inner>`.
struct TaskGuard(Arc<Tasks>);

impl Tasks {
    fn enter(self: &Arc<Self>) -> TaskGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        TaskGuard(self.clone())
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl AsyncConnection {
    /// A connected pair, e.g. for two tasks, or for a test.
    pub fn pair() -> Result<(AsyncConnection, AsyncConnection)> {
        let (a, b) = Socket::pair()?;
        Ok((AsyncConnection::new(a)?, AsyncConnection::new(b)?))
    }

    /// Connects to a [`Listener`](crate::Listener) (or an [`AsyncListener`](super::AsyncListener))
    /// bound to `path`. The `connect` syscall runs on tokio's blocking pool: it can wait while
    /// the listener's backlog is full.
    pub async fn connect(path: impl AsRef<Path>) -> Result<AsyncConnection> {
        let path = path.as_ref().to_owned();
        let socket = ::tokio::task::spawn_blocking(move || Socket::connect(path))
            .await
            .map_err(|e| Error::Io(io::Error::other(e)))??;
        AsyncConnection::new(socket)
    }

    /// Connects to a listener bound to a Linux abstract name (see [`AsyncConnection::connect`]).
    pub async fn connect_abstract(name: impl AsRef<[u8]>) -> Result<AsyncConnection> {
        let name = name.as_ref().to_owned();
        let socket = ::tokio::task::spawn_blocking(move || Socket::connect_abstract(name))
            .await
            .map_err(|e| Error::Io(io::Error::other(e)))??;
        AsyncConnection::new(socket)
    }

    /// Runs a connection over `socket` on the current tokio runtime, which must have its IO
    /// driver enabled. Fails outside a runtime. Set `TYPED_IPC_DEBUG=1` in the environment to
    /// have every message printed to stderr.
    pub fn new(socket: Socket) -> Result<AsyncConnection> {
        let io = super::register(Registered(socket))?;
        let runtime = Handle::current();
        let peer = io.get_ref().0.peer_credentials().ok();
        let lane = Lane::new(io.get_ref().0.limits().max_message_len);
        let tasks = Arc::new(Tasks::default());
        let reader = tasks.enter();
        let inner = Arc::new(Inner {
            io,
            peer,
            runtime,
            send_lock: Arc::new(AsyncMutex::new(())),
            state: Mutex::new(State::default()),
            oneways_run: watch::Sender::new(0),
            backlog: AtomicBacklog::default(),
            paused: AtomicBool::new(false),
            room: Notify::new(),
            hung_up: AtomicBool::new(false),
            next_cookie: AtomicU64::new(1),
            services: RwLock::new(Vec::new()),
            authorizer: RwLock::new(None),
            tasks,
            trace: trace::enabled(),
            lane,
        });
        inner.runtime.spawn(read_loop(inner.clone(), reader));
        Ok(AsyncConnection {
            _owner: Arc::new(Owner(inner.clone())),
            inner,
        })
    }

    /// The peer's credentials, as the kernel recorded them when the connection was made.
    pub fn peer_credentials(&self) -> Option<PeerCredentials> {
        self.inner.peer
    }

    /// The underlying socket. Its blocking methods must not be used on a runtime thread, nor
    /// its send and receive methods at all: the connection's tasks own the stream.
    pub fn socket(&self) -> &Socket {
        self.inner.socket()
    }

    /// Lets the peer copy this end's large call arguments straight out of this process's
    /// pages, through a pipe: off by default, and only for a peer trusted with this
    /// process's memory. As [`Connection::lend_pages_to_peer`](crate::Connection::lend_pages_to_peer),
    /// which says why.
    pub fn lend_pages_to_peer(&self, lend: bool) {
        self.inner.lane.lend_pages(lend);
    }

    /// Lets the peer write byte strings of 256 KiB to 1 MiB straight into this process's
    /// memory. As [`Connection::accept_writes_from_peer`](crate::Connection::accept_writes_from_peer),
    /// which says when that is safe.
    /// The announcement goes out from a task of the connection's runtime.
    pub fn accept_writes_from_peer(&self) -> Result<()> {
        let announcement = self.inner.lane.accept_writes()?;
        let inner = self.inner.clone();
        let guard = inner.tasks.enter();
        self.inner.runtime.spawn(async move {
            // A peer already gone shows on the connection itself.
            if inner.send(Envelope::announce(), announcement).await.is_ok() && inner.trace {
                trace::announce();
            }
            drop(guard);
        });
        Ok(())
    }

    /// Writes this end's byte strings of 256 KiB to 1 MiB straight into `memory`, the
    /// peer's. As [`Connection::write_into_peer`](crate::Connection::write_into_peer).
    pub fn write_into_peer(&self, memory: crate::peer_memory::PeerMemory) {
        self.inner.lane.write_into_peer(memory);
    }

    /// The connection's lane, for tests of its state.
    #[cfg(test)]
    pub(super) fn test_lane(&self) -> &crate::connection::lane::Lane {
        &self.inner.lane
    }

    /// Whether the connection has ended (peer gone, closed, or a protocol error).
    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed.is_some()
    }

    /// Ends the connection: the peer sees a hang-up, every waiting call returns
    /// [`Error::Disconnected`], and [`AsyncConnection::run`] returns `Ok` once the handlers
    /// still running are done.
    pub fn close(&self) {
        self.inner.hang_up(Socket::shutdown);
    }

    /// Stops taking new messages, as if the peer had gone quiet for good, but keeps sending:
    /// requests already running finish and their replies go out, then
    /// [`AsyncConnection::run`] returns. Used for graceful shutdown.
    pub fn stop_reading(&self) {
        self.inner.hang_up(Socket::shutdown_read);
    }

    /// Answers calls to `service`'s interface on this connection. Several interfaces can be
    /// served on one connection; serving an interface twice replaces the first. Interfaces are
    /// told apart by name (the trait's, or the one `#[interface(name = "...")]` gives).
    ///
    /// Requests that arrive before the first service is added (or [`AsyncConnection::run`] is
    /// called) wait for it, as they would wait for a serving thread in the blocking flavour,
    /// up to the bounds of what a peer can make this end hold (see the [module docs](super));
    /// from then on each request is handled as it arrives, calls concurrently in tasks of
    /// their own (each once the oneways that arrived before it have run), oneway messages one
    /// at a time in order.
    pub fn add_service(&self, service: impl AsyncService) {
        let service: Arc<dyn AsyncService> = Arc::new(service);
        {
            let mut services = self.inner.services.write();
            services.retain(|s| s.info().id != service.info().id);
            services.push(service);
        }
        self.inner.start_serving();
    }

    /// Lets `authorize` refuse calls: it sees the peer's credentials, the interface and the
    /// command id, and its `Err(reason)` reaches the caller as [`Error::Refused`].
    pub fn set_authorizer(
        &self,
        authorize: impl Fn(Option<&PeerCredentials>, &InterfaceInfo, u32) -> Result<(), String>
        + Send
        + Sync
        + 'static,
    ) {
        *self.inner.authorizer.write() = Some(Box::new(authorize));
    }

    /// Serves `service` ([`AsyncConnection::add_service`], at once) and returns a future that
    /// resolves when the connection has ended and every handler has finished
    /// ([`AsyncConnection::run`]): `Ok(())` on a clean close. Requests are answered whether or
    /// not the future is polled; it holds a clone of the connection, so spawning it keeps the
    /// connection up until the peer hangs up.
    pub fn serve<S: AsyncService>(
        &self,
        service: S,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<S> {
        self.add_service(service);
        let this = self.clone();
        async move { this.run().await }
    }

    /// Handles requests for the served interfaces (they are handled by the connection's tasks
    /// whether or not this is awaited) and waits until the connection has ended and every
    /// handler and send it started has finished. Returns `Ok(())` when the peer hung up or
    /// [`AsyncConnection::close`] was called, and the error otherwise.
    ///
    /// Not to be awaited inside a handler of this same connection: it would wait for itself.
    pub async fn run(&self) -> Result<()> {
        self.inner.start_serving();
        self.wait_closed().await;
        match &self.inner.lock().closed {
            None | Some(Error::Disconnected) => Ok(()),
            Some(e) => Err(e.duplicate()),
        }
    }

    /// Waits until the connection has ended and every task it started (its reader, handlers,
    /// sends finishing in the background) has finished. Does not start serving. Once it
    /// returns, dropping the last clone closes the socket at once.
    ///
    /// Not to be awaited inside a handler of this same connection: it would wait for itself.
    pub async fn wait_closed(&self) {
        let tasks = &self.inner.tasks;
        loop {
            let mut idle = pin!(tasks.idle.notified());
            idle.as_mut().enable();
            if tasks.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Calls method `cmd` of interface `iface` with `args` and waits for the reply, at most
    /// `timeout` if one is given. This is what generated async client stubs call.
    ///
    /// Dropping the future cancels the call: the reply, when it comes, is dropped and its fds
    /// closed. The implementation on the other side is not told; it runs to completion.
    pub async fn call<A: Serialize, R: DeserializeOwned>(
        &self,
        iface: &'static InterfaceInfo,
        cmd: u32,
        args: A,
        timeout: Option<Duration>,
    ) -> Result<R> {
        let call = self.call_inner(iface, cmd, args);
        match timeout {
            None => call.await,
            Some(timeout) => ::tokio::time::timeout(timeout, call)
                .await
                .unwrap_or(Err(Error::TimedOut)),
        }
    }

    async fn call_inner<A: Serialize, R: DeserializeOwned>(
        &self,
        iface: &'static InterfaceInfo,
        cmd: u32,
        args: A,
    ) -> Result<R> {
        let inner = &self.inner;
        let cookie = inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (slot, reply) = oneshot::channel();
        let mut reply = Reply { inner, rx: reply };
        {
            let mut state = inner.lock();
            if let Some(closed) = &state.closed {
                return Err(closed.duplicate());
            }
            // Registered before sending: the reply may come back before the send returns.
            state.pending.insert(cookie, slot);
            if inner.paused.load(Ordering::Relaxed) {
                // The reader waits for room in the backlog: it must read for this reply.
                inner.room.notify_one();
            }
        }
        let waiting = Waiting { inner, cookie };
        let envelope = Envelope {
            kind: Kind::Call,
            cmd,
            cookie,
            interface: iface.id,
            signature: iface.signature,
        };
        let traced = trace::described(inner.trace, &args);
        let placed = inner.send(envelope, args).await?;
        trace::outgoing(&envelope, iface, traced.as_deref());
        let received = (&mut reply.rx).await;
        std::mem::forget(waiting); // the slot is gone: the reader or `fail` took it
        let mut frame = received.unwrap_or(Err(Error::Disconnected))?;
        inner.lane.after_reply(placed, &frame);
        let result = decode_reply(&mut frame, iface, cmd, &inner.lane);
        inner.lane.finished(&frame.payload);
        result
    }

    /// Sends a oneway message to method `cmd` of interface `iface`: resolves once it is sent,
    /// and gets no reply. This is what generated async client stubs of `#[oneway]` methods
    /// call.
    ///
    /// Sending waits while the peer's socket buffer is full, which it is when the peer has
    /// stopped reading: with a `timeout`, for at most that long, then it fails with
    /// [`Error::TimedOut`]. A message none of which went out is not sent (its place in the
    /// shared memory region, if it had one, is given back); one that was part-way out is
    /// finished in the background, as when its future is dropped, so the peer never holds a
    /// fragment and the connection stays usable.
    pub async fn oneway<A: Serialize>(
        &self,
        iface: &'static InterfaceInfo,
        cmd: u32,
        args: A,
        timeout: Option<Duration>,
    ) -> Result<()> {
        let envelope = Envelope {
            kind: Kind::Oneway,
            cmd,
            cookie: 0,
            interface: iface.id,
            signature: iface.signature,
        };
        let traced = trace::described(self.inner.trace, &args);
        let send = self.inner.send(envelope, args);
        match timeout {
            None => send.await?,
            Some(timeout) => ::tokio::time::timeout(timeout, send)
                .await
                .unwrap_or(Err(Error::TimedOut))?,
        };
        trace::outgoing(&envelope, iface, traced.as_deref());
        Ok(())
    }
}

impl AsFd for AsyncConnection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.socket().as_fd()
    }
}

impl std::fmt::Debug for AsyncConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncConnection")
            .field("peer", &self.inner.peer)
            .finish_non_exhaustive()
    }
}

/// Where a call's reply arrives. A reply that arrived but was never taken, because the call
/// was dropped in between, is finished with unread (see [`Lane::finished`]).
struct Reply<'a> {
    inner: &'a Inner,
    rx: oneshot::Receiver<Result<Frame>>,
}

impl Drop for Reply<'_> {
    fn drop(&mut self) {
        // Closed first: a reply sent after an empty `try_recv` would otherwise be dropped
        // with the channel, unfinished.
        self.rx.close();
        if let Ok(Ok(frame)) = self.rx.try_recv() {
            self.inner.lane.finished(&frame.payload);
        }
    }
}

/// A call's slot in `pending`, removed if the call is dropped before its reply came.
struct Waiting<'a> {
    inner: &'a Inner,
    cookie: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // A reply arriving later finds no slot and is dropped, closing its fds.
        self.inner.lock().pending.remove(&self.cookie);
    }
}

/// Receives until the connection ends, routing each message.
async fn read_loop(inner: Arc<Inner>, guard: TaskGuard) {
    // Dropped unfinished when the runtime shuts down: the connection must end then too, or
    // its callers (on other runtimes) and its peer wait for good.
    let mut ending = ReaderEnding {
        inner: inner.clone(),
        finished: false,
    };
    read_messages(inner).await;
    ending.finished = true;
    drop(ending);
    drop(guard);
}

struct ReaderEnding {
    inner: Arc<Inner>,
    finished: bool,
}

impl Drop for ReaderEnding {
    fn drop(&mut self) {
        if !self.finished {
            self.inner.fail(Error::Io(io::Error::other(
                "the tokio runtime running the connection shut down",
            )));
        }
        self.inner.retire_services(false);
    }
}

async fn read_messages(inner: Arc<Inner>) {
    let mut buffer = Frame::default();
    let why = loop {
        let mut ready = match inner.io.readable().await {
            Ok(ready) => ready,
            Err(e) => break Error::from(e),
        };
        let result = match inner.socket().try_recv_into(&mut buffer) {
            Ok(false) => {
                ready.clear_ready();
                continue;
            }
            Ok(true) => Ok(()),
            // The message was consumed whole without its fds, or refused for its size and
            // read to its end: its bytes (its envelope) say whose it was.
            Err(e @ Error::FdsDropped { .. }) => Err(e),
            Err(e) if e.is_over_limits() => Err(e),
            Err(e) => break e,
        };
        drop(ready);
        match inner.route(take_message(&mut buffer), result) {
            Ok(false) => {}
            Ok(true) => {
                if !inner.wait_for_room().await {
                    // This end hung up meanwhile: what is still in the socket is not taken.
                    break Error::Disconnected;
                }
            }
            Err(why) => break why,
        }
    };
    inner.fail(why);
}

/// The message in `buffer`, leaving `buffer` ready for the next: a small message is copied out
/// so the 64 KiB receive buffer is reused rather than kept by every request in flight.
fn take_message(buffer: &mut Frame) -> Frame {
    let fds = std::mem::take(&mut buffer.fds);
    if buffer.payload.len() * 2 <= buffer.payload.capacity() {
        let payload = buffer.payload.clone(); // exactly its length
        buffer.payload.clear();
        Frame { payload, fds }
    } else {
        Frame {
            payload: std::mem::take(&mut buffer.payload),
            fds,
        }
    }
}

impl Inner {
    fn socket(&self) -> &Socket {
        &self.io.get_ref().0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Routes one received message; `Err` ends the connection. A message received as an
    /// error (its fds dropped, or refused for its size) fails only its call, or is answered
    /// with a failure if it is a request, as long as its envelope is there to say whose.
    /// `Ok(true)`: the backlog is at its bounds and no call of this end waits for a reply, so
    /// the reader waits for room.
    fn route(self: &Arc<Self>, frame: Frame, received: Result<()>) -> Result<bool> {
        let envelope = match (Envelope::read(&frame.payload), received) {
            (Ok(envelope), received) => (envelope, received),
            (Err(_), Err(e)) => return Err(e),
            (Err(_), Ok(())) => return Err(Error::Malformed("bad envelope".into())),
        };
        let (envelope, received) = envelope;
        if self.trace {
            self.trace_incoming(&envelope, &frame);
        }
        match &received {
            Ok(()) => self.lane.on_word(envelope::lane(&frame.payload)),
            // Delivered as an error, so never decoded; a refused message's lane word still
            // counts (the blocking flavour's `receive` takes it in too).
            Err(e) => {
                if e.is_over_limits() {
                    self.lane.on_word(envelope::lane(&frame.payload));
                }
                self.lane.finished(&frame.payload);
            }
        }
        match (envelope.kind, received) {
            (Kind::Reply | Kind::Failure, received) => {
                let (slot, pause) = {
                    let mut state = self.lock();
                    let slot = state.pending.remove(&envelope.cookie);
                    (slot, self.must_pause(&state))
                };
                let unread = match slot {
                    // If the call was dropped meanwhile, the frame comes back and is dropped
                    // here, closing its fds.
                    Some(slot) => slot.send(received.map(|()| frame)).err(),
                    None => Some(received.map(|()| frame)),
                };
                if let Some(Ok(frame)) = unread {
                    self.lane.finished(&frame.payload); // its caller gave up
                }
                return Ok(pause);
            }
            (Kind::Call | Kind::Oneway, Ok(())) => {
                let mut state = self.lock();
                let cost = self.admit(&state, Cost::of(&frame))?;
                match state.serving {
                    true => self.dispatch(&mut state, frame, envelope, cost),
                    false => state.held.push((frame, envelope, cost)),
                }
                return Ok(self.must_pause(&state));
            }
            (Kind::Call, Err(e)) => {
                // Counted until its failure is out, as a request.
                let cost = self.admit(&self.lock(), Cost::default())?;
                let failure = unreceived(&e, false);
                let inner = self.clone();
                let guard = self.tasks.enter();
                self.runtime.spawn(async move {
                    let _ = reply_failure(inner.clone(), envelope, failure).await;
                    inner.finished(cost);
                    drop(inner); // before `guard`: once the last guard goes, `run` returns
                    drop(guard);
                });
            }
            (Kind::Oneway, Err(e)) => {
                // Nobody waits for a oneway's outcome, so say it here rather than lose it.
                self.oneway_failed(&envelope, &unreceived(&e, true));
            }
            (Kind::Announce, received) => {
                let (mailbox, token) =
                    received.and_then(|()| envelope::announcement(&frame.payload))?;
                self.lane.on_announce(mailbox, token);
            }
        }
        Ok(false)
    }

    /// Takes a request that holds `cost` into the backlog, unless the connection must end
    /// instead: at the bounds, the reader reads only for a call of this end waiting for its
    /// reply, and takes requests in up to `HARD_FACTOR` times them if something serves, none
    /// if nothing does (see [`backlog`](crate::connection::backlog)).
    #[inline]
    fn admit(&self, state: &State, cost: Cost) -> Result<Cost> {
        let backlog = self.backlog.get();
        if backlog.full() {
            if let Some(why) = backlog.refuse(state.serving) {
                return Err(why);
            }
        }
        self.backlog.add(cost);
        Ok(cost)
    }

    /// Whether the reader must wait for room before it reads again: the backlog is at its
    /// bounds and no call of this end waits for a reply.
    #[inline]
    fn must_pause(&self, state: &State) -> bool {
        state.pending.is_empty() && self.backlog.get().full()
    }

    /// Waits until the reader may read again: the backlog is below its bounds, or a call of
    /// this end waits for a reply (`true`); or this end hung up (`false`).
    #[cold]
    async fn wait_for_room(&self) -> bool {
        loop {
            let mut room = pin!(self.room.notified());
            room.as_mut().enable();
            {
                let state = self.lock();
                // Set before the backlog is read, so that a request finishing after that
                // read sees it and signals `room` (both `SeqCst`).
                self.paused.store(true, Ordering::SeqCst);
                let hung_up = self.hung_up.load(Ordering::SeqCst);
                if hung_up || !self.must_pause(&state) {
                    self.paused.store(false, Ordering::SeqCst);
                    return !hung_up;
                }
            }
            room.await;
        }
    }

    /// Shuts the socket down with `shutdown` (all of it, or its reading side): the peer sees
    /// it, the reader sees the end, and a reader waiting for room (which reads nothing, so
    /// would not see it) stops waiting.
    fn hang_up(&self, shutdown: impl FnOnce(&Socket) -> Result<()>) {
        let _ = shutdown(self.socket());
        self.hung_up.store(true, Ordering::SeqCst);
        self.room.notify_one();
    }

    /// A request that held `cost` has finished: out of the backlog, and the reader told if
    /// it waits for room.
    fn finished(&self, cost: Cost) {
        self.backlog.remove(cost);
        if self.paused.load(Ordering::SeqCst) {
            self.room.notify_one();
        }
    }

    /// Starts handling requests: those held so far, then each as it arrives.
    fn start_serving(self: &Arc<Self>) {
        let mut state = self.lock();
        if state.serving {
            return;
        }
        state.serving = true;
        for (frame, envelope, cost) in std::mem::take(&mut state.held) {
            self.dispatch(&mut state, frame, envelope, cost);
        }
    }

    /// A call gets a task of its own, which runs once the oneways that arrived before it have
    /// run; a oneway goes to the task that runs them in order.
    fn dispatch(self: &Arc<Self>, state: &mut State, frame: Frame, envelope: Envelope, cost: Cost) {
        if envelope.kind == Kind::Call {
            let guard = self.tasks.enter();
            let after = state.oneways_queued;
            let request = run_request(self.clone(), frame, envelope, cost, after, guard);
            self.runtime.spawn(request);
            return;
        }
        if state.oneways.is_none() && state.closed.is_none() {
            let (tx, rx) = mpsc::unbounded_channel();
            let guard = self.tasks.enter();
            self.runtime.spawn(run_oneways(self.clone(), rx, guard));
            state.oneways = Some(tx);
            state.oneway_task = true;
        }
        let queued = match &state.oneways {
            Some(oneways) => oneways.send((frame, envelope, cost)).is_ok(),
            None => false,
        };
        match queued {
            true => state.oneways_queued += 1,
            false => self.finished(cost), // dropped: the connection has ended
        }
    }

    /// Ends the connection with `why`: every waiting call gets it, the oneway task finishes
    /// what it has, and the reader stops.
    fn fail(&self, why: Error) {
        let mut state = self.lock();
        if state.closed.is_some() {
            return;
        }
        if !matches!(why, Error::Disconnected) {
            // A protocol error leaves the stream unusable; make sure the peer sees it.
            let _ = self.socket().shutdown();
        }
        for (_, slot) in state.pending.drain() {
            let _ = slot.send(Err(why.duplicate()));
        }
        state.oneways = None;
        state.held.clear();
        state.closed = Some(why);
    }

    /// Says on stderr that the oneway `envelope` failed here (nobody waits for its outcome).
    fn oneway_failed(&self, envelope: &Envelope, failure: &Failure) {
        let services = self.services.read();
        let served = services.iter().map(|s| s.info());
        crate::connection::failure::oneway_failed(self.trace, envelope, served, failure);
    }

    /// Once the connection has ended and nothing will dispatch a request any more (the
    /// reader is done, and the oneway task if there is one), drops the services: one of them
    /// may hold a clone of this connection, a cycle that would keep it open for good.
    fn retire_services(&self, oneway_task_ending: bool) {
        let mut state = self.lock();
        if oneway_task_ending {
            state.oneway_task = false;
        }
        if state.closed.is_none() || state.oneway_task {
            return;
        }
        drop(state);
        let services = std::mem::take(&mut *self.services.write());
        drop(services);
    }

    /// Which service answers `envelope`, after the same checks as the blocking flavour.
    fn check(&self, envelope: &Envelope) -> Result<Arc<dyn AsyncService>, Failure> {
        let services = self.services.read();
        let authorizer = self.authorizer.read();
        admit(
            &services,
            |s| s.info(),
            envelope,
            authorizer.as_deref(),
            self.peer.as_ref(),
        )
        .cloned()
    }

    /// Encodes envelope + body and sends them as one message. `body` is taken by value so
    /// that the future is `Send` whenever the body is: the fds it carries stay open, borrowed,
    /// until the message is out.
    /// Returns the lane placement the message carries (0: none).
    pub(super) async fn send<A: Serialize>(
        self: &Arc<Self>,
        envelope: Envelope,
        body: A,
    ) -> Result<u32> {
        // Most messages go out at once: encoded in this thread's buffer and sent without
        // waiting, they allocate nothing. One that would have to wait (the socket full, or
        // another message going out) takes the bytes along.
        let (placed, unsent) = with_buffers(|framed, fds| {
            let placed = self.lane.encode(&envelope, &body, framed, fds)?;
            let sent = match self.send_lock.try_lock() {
                Ok(_lock) => self.socket().try_send_framed(framed, fds),
                // Refused here, as `try_send_framed` would, before the bytes are taken along.
                Err(_) => self
                    .socket()
                    .check_outgoing(framed.len() - envelope::FRAMED_AT, fds.len())
                    .map(|()| false),
            };
            match sent {
                Ok(true) => Ok((placed, None)),
                Ok(false) => Ok((placed, Some((std::mem::take(framed), fds.clone())))),
                Err(e) => {
                    self.lane.abort(placed);
                    Err(e)
                }
            }
        })?;
        if let Some((framed, fds)) = unsent {
            self.send_encoded(framed, &fds, placed).await?;
        }
        Ok(placed)
    }

    pub(super) fn lane(&self) -> &Lane {
        &self.lane
    }

    async fn send_encoded(
        self: &Arc<Self>,
        framed: Vec<u8>,
        fds: &[BorrowedFd<'_>],
        placed: u32,
    ) -> Result<()> {
        // Too large for the wire: never sent, so the placement goes back (from here on,
        // `Outgoing`'s drop gives it back if none of the message went out).
        let cursor = SendCursor::new(framed.len() - envelope::FRAMED_AT, fds.len())
            .inspect_err(|_| self.lane.abort(placed))?;
        // Made before waiting for the lock, so that a send cancelled while it waits gives its
        // placement back too.
        let mut out = Outgoing {
            inner: self,
            cursor,
            framed,
            fds,
            lock: None,
            finished: false,
            placed,
        };
        out.lock = Some(match self.send_lock.clone().try_lock_owned() {
            Ok(lock) => lock,
            Err(_) => self.send_lock.clone().lock_owned().await,
        });
        let result = drive(self, &mut out.cursor, &out.framed, out.fds).await;
        out.finished = true;
        result
    }

    fn trace_incoming(&self, envelope: &Envelope, frame: &Frame) {
        let services = self.services.read();
        trace::incoming(envelope, frame, services.iter().map(|s| s.info()));
    }
}

/// Sends what is left of the message `cursor` tracks, waiting for the socket to take it.
/// `framed` is the message as it was encoded, after room for the transport's header.
async fn drive(
    inner: &Inner,
    cursor: &mut SendCursor,
    framed: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<()> {
    let payload = &framed[envelope::FRAMED_AT..];
    // Try at once: the socket is writable far more often than not.
    if inner.socket().send_some(cursor, payload, fds)? {
        return Ok(());
    }
    let mut waiting = inner.socket().send_wait();
    loop {
        waiting.waiting(cursor.sent());
        let mut ready = inner.io.writable().await?;
        let attempt = ready.try_io(|io| match io.get_ref().0.send_some(cursor, payload, fds) {
            Ok(true) => Ok(Ok(())),
            Ok(false) => Err(io::ErrorKind::WouldBlock.into()),
            Err(e) => Ok(Err(e)),
        });
        match attempt {
            Ok(Ok(done)) => return done,
            Ok(Err(e)) => return Err(e.into()), // not produced by the closure
            Err(_would_block) => continue,
        }
    }
}

/// A message being sent. If its future is dropped part-way through the message, `drop`
/// hands the rest to a task of its own, so the peer never holds a fragment.
struct Outgoing<'a, 'f> {
    inner: &'a Arc<Inner>,
    cursor: SendCursor,
    /// The message after room for the transport's header (see `drive`).
    framed: Vec<u8>,
    fds: &'a [BorrowedFd<'f>],
    lock: Option<OwnedMutexGuard<()>>,
    finished: bool,
    /// The lane placement the message carries (0: none).
    placed: u32,
}

impl Drop for Outgoing<'_, '_> {
    fn drop(&mut self) {
        if !self.cursor.started() {
            // Failed or cancelled before any of it went out: the peer will never see this
            // placement.
            self.inner.lane.abort(self.placed);
        }
        if self.finished || !self.cursor.in_progress() {
            return; // done, or nothing of it sent: the stream is in sync
        }
        // The fds still to go are borrowed from the caller, who is gone: send copies.
        let unsent = &self.fds[self.cursor.fds_sent()..];
        let fds: io::Result<Vec<OwnedFd>> =
            unsent.iter().map(|fd| fd.try_clone_to_owned()).collect();
        let Ok(fds) = fds else {
            // Out of fds: the message cannot be completed, so the stream cannot continue.
            self.inner.hang_up(Socket::shutdown);
            return;
        };
        let mut cursor = self.cursor;
        cursor.forget_sent_fds();
        let rest = Remainder {
            inner: self.inner.clone(),
            cursor,
            framed: std::mem::take(&mut self.framed),
            fds,
            _lock: self.lock.take(),
            finished: false,
            _task: self.inner.tasks.enter(),
        };
        self.inner.runtime.spawn(async move {
            let mut rest = rest;
            let fds: Vec<BorrowedFd<'_>> = rest.fds.iter().map(|fd| fd.as_fd()).collect();
            // An error has shut the socket down already (`send_some` does, part-way).
            let _ = drive(&rest.inner, &mut rest.cursor, &rest.framed, &fds).await;
            rest.finished = true;
        });
    }
}

/// The rest of a message whose sender was dropped part-way. Holds the send lock until the
/// message is out; if it is dropped before that (the runtime shutting down), the connection
/// is shut down.
struct Remainder {
    inner: Arc<Inner>,
    cursor: SendCursor,
    framed: Vec<u8>,
    fds: Vec<OwnedFd>,
    _lock: Option<OwnedMutexGuard<()>>,
    finished: bool,
    /// Declared last: dropped after `inner`.
    _task: TaskGuard,
}

impl Drop for Remainder {
    fn drop(&mut self) {
        if !self.finished {
            self.inner.hang_up(Socket::shutdown);
        }
    }
}

/// Runs one call request and replies.
/// Runs a call once the first `after` oneway messages have run: a peer that sends a oneway
/// and then a call sees the call run after the oneway, as it would on one thread.
async fn run_request(
    inner: Arc<Inner>,
    frame: Frame,
    envelope: Envelope,
    cost: Cost,
    after: u64,
    guard: TaskGuard,
) {
    if *inner.oneways_run.borrow() < after {
        let mut run = inner.oneways_run.subscribe();
        // The sender lives in `inner`, which this task holds: no error to expect.
        let _ = run.wait_for(|&n| n >= after).await;
    }
    handle_request(inner.clone(), frame, envelope).await;
    inner.finished(cost);
    drop(inner); // before `guard`: once the last guard goes, `run` returns
    drop(guard);
}

/// Runs oneway messages one at a time, in the order they arrived, until the connection ends.
async fn run_oneways(
    inner: Arc<Inner>,
    mut queue: mpsc::UnboundedReceiver<(Frame, Envelope, Cost)>,
    guard: TaskGuard,
) {
    let weak = Arc::downgrade(&inner);
    drop(inner); // the queue's sender lives in `Inner`; holding it would keep the queue open
    while let Some((frame, envelope, cost)) = queue.recv().await {
        if let Some(inner) = weak.upgrade() {
            handle_request(inner.clone(), frame, envelope).await;
            inner.finished(cost);
            inner.oneways_run.send_modify(|n| *n += 1);
        }
    }
    if let Some(inner) = weak.upgrade() {
        inner.retire_services(true);
    }
    drop(guard);
}

/// Checks a request, runs it on its service, and replies unless it is oneway.
async fn handle_request(inner: Arc<Inner>, frame: Frame, envelope: Envelope) {
    let oneway = envelope.kind == Kind::Oneway;
    let failure = match inner.check(&envelope) {
        Err(failure) => {
            // Refused unread: a placement it carried is released now (a oneway's sender
            // hears nothing else, and its lane would stay busy).
            inner.lane().finished(&frame.payload);
            Some(failure)
        }
        Ok(service) => {
            let mut call = AsyncCall::new(envelope, frame, inner.peer, inner.clone());
            let peer = inner.peer;
            // `handle` itself may panic before it returns its future.
            let outcome = {
                let (service, call) = (&service, &mut call);
                let started = catch_unwind(AssertUnwindSafe(move || {
                    let (_caller, call) = (CallerScope::enter(peer), call); // FnOnce: moves `call`
                    service.handle(call)
                }));
                match started {
                    Ok(future) => Guarded { peer, future }.await,
                    Err(panic) => Err(panic),
                }
            };
            match (outcome, call.replied()) {
                (_, true) => None,
                (Ok(Ok(())), false) => {
                    (!oneway).then(|| Failure::Unanswered("the service sent no reply".into()))
                }
                (Ok(Err(e)), false) => Some(Failure::of_handler(&e)),
                (Err(panic), false) => Some(Failure::Panicked(panic_message(&panic))),
            }
        }
    };
    match failure {
        Some(failure) if !oneway => {
            let _ = reply_failure(inner, envelope, failure).await;
        }
        Some(failure) => {
            inner.oneway_failed(&envelope, &failure);
        }
        None => {}
    }
}

async fn reply_failure(inner: Arc<Inner>, call: Envelope, failure: Failure) -> Result<()> {
    let envelope = Envelope {
        kind: Kind::Failure,
        ..call
    };
    if inner.trace {
        trace::line(&format!(
            "typed-ipc[{}] -> Failure #{}: {failure:?}",
            std::process::id(),
            call.cookie
        ));
    }
    inner.send(envelope, failure).await.map(drop)
}

/// A handler's future, polled with [`current_peer`](crate::current_peer) set and its panics
/// caught.
struct Guarded<'a> {
    peer: Option<PeerCredentials>,
    future: BoxFuture<'a, Result<()>>,
}

impl Future for Guarded<'_> {
    type Output = std::thread::Result<Result<()>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let _caller = CallerScope::enter(self.peer);
        let future = self.future.as_mut();
        match catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(result)) => Poll::Ready(Ok(result)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".into(),
    }
}
