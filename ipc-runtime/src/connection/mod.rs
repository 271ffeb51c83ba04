//! [`Connection`]: calls, replies and served interfaces multiplexed over one [`Socket`].
//!
//! # Threading model
//!
//! A connection has no thread of its own. Whichever thread is waiting on it — a caller
//! waiting for its reply, or a thread inside [`Connection::serve`] waiting for requests —
//! takes the *reader* role, receives the next message and routes it: a reply goes to the
//! caller whose cookie it carries, a request to a serving thread. So a lone caller sends its
//! call and receives its own reply: one `sendmsg`, one `recvmsg`, no hand-off to another
//! thread. A caller that finds nobody reading takes the role before it sends, so its reply
//! needs no routing; if its message cannot go out at once it gives the role back first,
//! since nobody else reads while the role is held. A serving thread that receives a request
//! with nothing queued before it runs it at once. When the reader's own wait is over it
//! passes the role to the next waiter.
//!
//! Requests run only on threads inside [`Connection::serve`] (or [`Connection::run`]), never
//! on a thread waiting for a reply: a callback arriving while a caller waits is handed to a
//! serving thread, so there is no nested event loop and no re-entrancy. A connection that
//! receives calls must therefore have a serving thread, or those calls wait. Oneway messages
//! run in the order they were sent, one at a time.
//!
//! When the peer hangs up or dies, the reader sees it at once and every waiting caller gets
//! [`Error::Disconnected`] — never [`Error::TimedOut`].
//!
//! # Byte strings through shared memory
//!
//! A `Vec<u8>` (or `#[serde(with = "typed_ipc::bytes")]` field) of 2 KiB to 32 MiB does not go
//! through the socket: the sender copies it into a shared memory region it owns, made once per
//! connection, and the receiver copies it out into the `Vec` it hands over with a copy that
//! tolerates a hostile sender writing meanwhile (see [`shared_region`](crate::shared_region)).
//! Two copies instead of four, and no page allocated per message. One such string per
//! direction is in flight at a time; any other goes through the socket as before, so nothing
//! ever waits for the region. Each end that sends such strings keeps one region (64 KiB, or
//! the next power of two above the largest string it sent, up to 32 MiB) open for the
//! connection's lifetime. The async flavour does the same, on the same wire.

pub(crate) mod admit;
pub(crate) mod envelope;
pub(crate) mod failure;
pub(crate) mod lane;
#[cfg(test)]
pub(crate) mod tests;
pub(crate) mod trace;

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::{AsFd, BorrowedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::service::{Call, InterfaceInfo, Service};
use crate::socket::{PeerCredentials, Socket};

use admit::admit;
use envelope::{Envelope, Kind};
use failure::Failure;
use lane::Lane;

/// A connection to a peer process, over which both ends call each other's interfaces.
///
/// Cloning is cheap and clones share the connection: hand one to each thread that calls, and
/// one to each thread that serves. The socket closes when the last clone is dropped.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

/// Decides whether a peer may call a method: `Err(reason)` refuses the call.
pub type Authorizer =
    dyn Fn(Option<&PeerCredentials>, &InterfaceInfo, u32) -> Result<(), String> + Send + Sync;

struct Shared {
    socket: Socket,
    peer: Option<PeerCredentials>,
    state: Mutex<State>,
    /// Signalled whenever a waiter may have something to do: a reply or request arrived,
    /// the reader role was released, or the connection ended.
    wake: Condvar,
    /// What is served, and who may call it: replaced whole when it changes, so a serving
    /// thread keeps a snapshot and only checks `registry_version` per request (no lock, no
    /// reference count on the request's path).
    registry: Mutex<Arc<Registry>>,
    registry_version: AtomicU64,
    trace: bool,
    /// Large byte strings through shared memory.
    lane: Lane,
}

#[derive(Clone, Default)]
struct Registry {
    services: Vec<Arc<dyn Service>>,
    authorizer: Option<Arc<Authorizer>>,
}

#[derive(Default)]
struct State {
    /// A thread is receiving.
    reading: bool,
    /// The reader's buffer, reused from one message to the next.
    buffer: Frame,
    /// Calls waiting for replies, by cookie; `Some` once the reply is in.
    pending: HashMap<u64, Option<Result<Frame>>, BuildHasherDefault<CookieHasher>>,
    /// Calls for a serving thread to run.
    calls: VecDeque<Frame>,
    /// Oneway messages, run one at a time in order.
    oneways: VecDeque<Frame>,
    oneway_running: bool,
    /// Threads asleep on `wake`: a notify costs a futex syscall, so only wake if any.
    waiters: usize,
    /// Threads inside `run`.
    runners: usize,
    /// The cookie of the last call made.
    next_cookie: u64,
    /// Why the connection ended; once set, it stays.
    closed: Option<Error>,
}

impl Connection {
    /// A connected pair, for two threads or for a parent and the child it forks.
    pub fn pair() -> Result<(Connection, Connection)> {
        let (a, b) = Socket::pair()?;
        Ok((Connection::new(a), Connection::new(b)))
    }

    /// Connects to a [`Listener`](crate::Listener) bound to `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Connection> {
        Ok(Connection::new(Socket::connect(path)?))
    }

    /// Connects to a [`Listener`](crate::Listener) bound to an abstract name.
    pub fn connect_abstract(name: impl AsRef<[u8]>) -> Result<Connection> {
        Ok(Connection::new(Socket::connect_abstract(name)?))
    }

    /// Runs a connection over `socket`. Set `TYPED_IPC_DEBUG=1` in the environment to have
    /// every message printed to stderr.
    pub fn new(socket: Socket) -> Connection {
        let peer = socket.peer_credentials().ok();
        let lane = Lane::new(socket.limits().max_message_len);
        Connection {
            shared: Arc::new(Shared {
                socket,
                peer,
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                registry: Mutex::new(Arc::new(Registry::default())),
                registry_version: AtomicU64::new(0),
                trace: trace::enabled(),
                lane,
            }),
        }
    }

    /// The peer's credentials, as the kernel recorded them when the connection was made.
    pub fn peer_credentials(&self) -> Option<PeerCredentials> {
        self.shared.peer
    }

    /// The underlying socket.
    pub fn socket(&self) -> &Socket {
        &self.shared.socket
    }

    /// Whether the connection has ended (peer gone, closed, or a protocol error).
    pub fn is_closed(&self) -> bool {
        lock(&self.shared.state).closed.is_some()
    }

    /// Ends the connection: the peer sees a hang-up, and every thread waiting on this
    /// connection returns ([`Error::Disconnected`] for callers, `Ok` from `serve`).
    pub fn close(&self) {
        let _ = self.shared.socket.shutdown();
    }

    /// Stops taking new messages, as if the peer had gone quiet for good, but keeps sending:
    /// requests already running finish and their replies go out. Serving threads return once
    /// they are done. Used for graceful shutdown.
    pub fn stop_reading(&self) {
        let _ = self.shared.socket.shutdown_read();
    }

    /// Answers calls to `service`'s interface on this connection, from the threads that run
    /// [`Connection::run`]. Several interfaces can be served on one connection; serving an
    /// interface twice replaces the first.
    pub fn add_service(&self, service: impl Service) {
        let service: Arc<dyn Service> = Arc::new(service);
        self.shared.update_registry(|registry| {
            registry
                .services
                .retain(|s| s.info().id != service.info().id);
            registry.services.push(service);
        });
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
        self.shared
            .update_registry(|registry| registry.authorizer = Some(Arc::new(authorize)));
    }

    /// Serves `service` on this thread until the peer hangs up ([`Connection::add_service`]
    /// then [`Connection::run`]). Returns `Ok(())` on a clean close.
    pub fn serve(&self, service: impl Service) -> Result<()> {
        self.add_service(service);
        self.run()
    }

    /// Handles requests for the served interfaces on this thread, one at a time, until the
    /// connection ends. Returns `Ok(())` when the peer hung up or [`Connection::close`] was
    /// called, and the error otherwise. Run it on several threads for concurrent requests.
    pub fn run(&self) -> Result<()> {
        let shared = &*self.shared;
        lock(&shared.state).runners += 1;
        let result = self.run_loop();
        let mut state = lock(&shared.state);
        state.runners -= 1;
        if state.runners == 0 && state.closed.is_some() {
            drop(state);
            // Nothing will be served any more: drop the implementations now, which also
            // breaks the cycle when one of them holds a clone of this connection.
            shared.update_registry(|registry| registry.services.clear());
        }
        result
    }

    fn run_loop(&self) -> Result<()> {
        let shared = &*self.shared;
        let mut registry = shared.registry();
        let mut state = lock(&shared.state);
        loop {
            if !state.oneway_running {
                if let Some(frame) = state.oneways.pop_front() {
                    state.oneway_running = true;
                    drop(state);
                    state = shared.run_request(frame, true, &mut registry);
                    continue;
                }
            }
            if let Some(frame) = state.calls.pop_front() {
                drop(state);
                state = shared.run_request(frame, false, &mut registry);
                continue;
            }
            if let Some(closed) = &state.closed {
                return match closed {
                    Error::Disconnected => Ok(()),
                    e => Err(e.duplicate()),
                };
            }
            if state.reading {
                state = shared.sleep(state, None);
                continue;
            }
            // Become the reader. A request that arrives with nothing queued before it is
            // handed back and run by this same thread at once (no queue, no hand-off); one
            // that must wait its turn is queued and run from the top of the loop. Calls run
            // in arrival order, oneways one at a time.
            let taken;
            (state, taken) = shared.read(state, None, Reader::Runner);
            if let Some(Taken::Request(frame, oneway)) = taken {
                drop(state);
                state = shared.run_request(frame, oneway, &mut registry);
            }
        }
    }

    /// Calls method `cmd` of interface `iface` with `args` and waits for the reply, at most
    /// `timeout` if one is given. This is what generated client stubs call.
    pub fn call<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        iface: &'static InterfaceInfo,
        cmd: u32,
        args: &A,
        timeout: Option<Duration>,
    ) -> Result<R> {
        let shared = &*self.shared;
        let deadline = timeout.map(|t| Instant::now() + t);
        // A caller that finds nobody reading becomes the reader before it sends: then its
        // reply can reach nobody else, so it needs no slot in `pending` and no lock between
        // its send and its receive, and it receives into a buffer of its thread's (the lone
        // caller's path: one lock to start, one to end).
        let (cookie, mut reader) = {
            let mut state = lock(&shared.state);
            if let Some(closed) = &state.closed {
                return Err(closed.duplicate());
            }
            state.next_cookie += 1;
            let cookie = state.next_cookie;
            if state.reading {
                // Registered before sending: the reply may come back before `send` returns.
                state.pending.insert(cookie, None);
                (cookie, None)
            } else {
                state.reading = true;
                (cookie, Some(FRAME.take()))
            }
        };
        let envelope = Envelope {
            kind: Kind::Call,
            cmd,
            cookie,
            interface: iface.id,
            signature: iface.signature,
        };
        shared.trace_out(&envelope, iface);
        let sent = match reader {
            // The reader must not block sending: others may wait for it to read.
            Some(_) => match shared.send(&envelope, args, deadline, Sending::IfNoWait) {
                Ok(None) => {
                    let frame = reader.take().expect("reader");
                    shared.stop_reading(frame, Some(cookie));
                    shared.send(&envelope, args, deadline, Sending::Wait)
                }
                sent => sent,
            },
            None => shared.send(&envelope, args, deadline, Sending::Wait),
        };
        let placed = match sent {
            Ok(placed) => placed.expect("sent whole"),
            Err(e) => {
                match reader {
                    Some(frame) => shared.stop_reading(frame, None),
                    None => drop(lock(&shared.state).pending.remove(&cookie)),
                }
                return Err(e);
            }
        };
        let (mut frame, ours) = match reader {
            Some(frame) => shared.read_own(cookie, deadline, frame)?,
            None => (shared.wait_reply(cookie, deadline)?, false),
        };
        shared.lane.after_reply(placed, &frame);
        let result = shared.decode_reply(&mut frame, iface, cmd);
        shared.lane.finished(&frame.payload);
        if ours {
            keep_thread_frame(frame);
        } else {
            shared.recycle(frame);
        }
        result
    }

    /// Sends a oneway message: returns once it is sent, and gets no reply.
    pub fn oneway<A: Serialize + ?Sized>(
        &self,
        iface: &'static InterfaceInfo,
        cmd: u32,
        args: &A,
    ) -> Result<()> {
        let envelope = Envelope {
            kind: Kind::Oneway,
            cmd,
            cookie: 0,
            interface: iface.id,
            signature: iface.signature,
        };
        self.shared.trace_out(&envelope, iface);
        self.shared
            .send(&envelope, args, None, Sending::Wait)
            .map(drop)
    }
}

#[cfg(test)]
impl Connection {
    /// A byte string this end placed in its lane is still in flight.
    pub(crate) fn lane_is_busy(&self) -> bool {
        self.shared.lane.is_busy()
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.shared.socket.as_fd()
    }
}

impl From<Socket> for Connection {
    fn from(socket: Socket) -> Connection {
        Connection::new(socket)
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.shared.peer)
            .finish_non_exhaustive()
    }
}

type Guard<'a> = MutexGuard<'a, State>;

impl Shared {
    /// What is served now.
    fn registry(&self) -> Snapshot {
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        Snapshot {
            version: self.registry_version.load(Ordering::Acquire),
            registry: registry.clone(),
        }
    }

    /// Changes what is served: a new registry, and a new version for the snapshots to see.
    fn update_registry(&self, change: impl FnOnce(&mut Registry)) {
        let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let mut new = Registry::clone(&registry);
        change(&mut new);
        let old = std::mem::replace(&mut *registry, Arc::new(new));
        self.registry_version.fetch_add(1, Ordering::Release);
        drop(registry);
        drop(old); // may drop implementations, whose code must not run under our lock
    }

    /// Encodes envelope + body in this thread's buffer and sends them as one message.
    /// Returns the lane placement the message carries (0: none), or `None` if `how` is
    /// [`Sending::IfNoWait`] and the message would have had to wait (then nothing was sent).
    fn send<A: Serialize + ?Sized>(
        &self,
        envelope: &Envelope,
        body: &A,
        deadline: Option<Instant>,
        how: Sending,
    ) -> Result<Option<u32>> {
        with_buffers(|buf, fds| {
            buf.resize(envelope::LEN, 0);
            envelope.write(buf);
            let placed = self.lane.encode(body, buf, fds)?;
            let sent = match how {
                Sending::Wait => self.socket.send_deadline(buf, fds, deadline).map(|()| true),
                Sending::IfNoWait => self.socket.try_send(buf, fds),
            };
            match sent {
                Ok(true) => Ok(Some(placed)),
                Ok(false) => {
                    self.lane.abort(placed);
                    Ok(None)
                }
                Err(e) => {
                    self.lane.abort(placed);
                    Err(e)
                }
            }
        })
    }

    /// Gives up the reader role a caller took with its thread's `frame`, and registers
    /// `cookie`'s call to have its reply routed by whoever reads next.
    fn stop_reading(&self, frame: Frame, cookie: Option<u64>) {
        keep_thread_frame(frame);
        let mut state = lock(&self.state);
        state.reading = false;
        if let Some(cookie) = cookie {
            state.pending.insert(cookie, None);
        }
        self.wake_all(&state);
    }

    /// The wait of a caller that took the reader role before sending, receiving into its
    /// thread's `frame`: the next message is most likely its reply. Anything else is routed
    /// as any reader routes it, and the caller then waits as any caller does. Returns the
    /// reply and whether it is in the thread's frame.
    fn read_own(
        &self,
        cookie: u64,
        deadline: Option<Instant>,
        mut frame: Frame,
    ) -> Result<(Frame, bool)> {
        let result = self.receive(&mut frame, deadline);
        if result.is_ok() && envelope::is_reply_to(&frame.payload, cookie) {
            // The common case, without `route`'s general matching: ours, and whole.
            let mut state = lock(&self.state);
            state.reading = false;
            self.wake_all(&state);
            drop(state);
            if self.trace {
                if let Ok(envelope) = Envelope::read(&frame.payload) {
                    self.trace_incoming(&envelope, &frame);
                }
            }
            return Ok((frame, true));
        }
        let (mut state, own) = self.route(lock(&self.state), frame, result, Reader::Caller(cookie));
        if let Some(Taken::Reply(reply)) = own {
            return reply.map(|frame| (frame, true));
        }
        state.pending.insert(cookie, None);
        drop(state);
        Ok((self.wait_reply(cookie, deadline)?, false))
    }

    /// Waits for the reply to `cookie`, reading the socket whenever nobody else is.
    fn wait_reply(&self, cookie: u64, deadline: Option<Instant>) -> Result<Frame> {
        let mut state = lock(&self.state);
        loop {
            if let Some(Some(_)) = state.pending.get(&cookie) {
                let reply = state
                    .pending
                    .remove(&cookie)
                    .flatten()
                    .expect("checked above");
                return reply;
            }
            if let Some(closed) = state.closed.as_ref().map(Error::duplicate) {
                state.pending.remove(&cookie);
                return Err(closed);
            }
            let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
            if timed_out {
                // A late reply finds no slot and is dropped, closing its fds.
                state.pending.remove(&cookie);
                return Err(Error::TimedOut);
            }
            if state.reading {
                state = self.sleep(state, deadline);
                continue;
            }
            let own;
            (state, own) = self.read(state, deadline, Reader::Caller(cookie));
            if let Some(Taken::Reply(reply)) = own {
                return reply;
            }
        }
    }

    /// Sleeps until woken or until `deadline`.
    fn sleep<'a>(&'a self, mut state: Guard<'a>, deadline: Option<Instant>) -> Guard<'a> {
        state.waiters += 1;
        let mut state = match deadline {
            None => self
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                self.wake
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
        state.waiters -= 1;
        state
    }

    /// Wakes every sleeper, if there is one: a lone caller pays no syscall for it.
    fn wake_all(&self, state: &State) {
        if state.waiters > 0 {
            self.wake.notify_all();
        }
    }

    /// Takes the reader role, receives one message and routes it: a reply to its caller's
    /// slot, a request to the queue serving threads take from. Returns the lock, re-taken;
    /// the waiters were woken under it, so they find the message routed. The role is
    /// released before returning. What the reader can handle itself is handed back rather
    /// than routed: a caller's own reply (its slot is gone), a request for a runner that
    /// nothing is queued before.
    fn read<'a>(
        &'a self,
        mut state: Guard<'a>,
        deadline: Option<Instant>,
        reader: Reader,
    ) -> (Guard<'a>, Option<Taken>) {
        state.reading = true;
        let mut frame = std::mem::take(&mut state.buffer);
        drop(state);
        let result = self.receive(&mut frame, deadline);
        let mut state = lock(&self.state);
        if reader == Reader::Runner
            && result.is_ok()
            && envelope::kind_byte(&frame.payload) == Some(Kind::Call as u8)
            && state.calls.is_empty()
        {
            // The common case, without `route`'s general matching: a call to run now.
            state.reading = false;
            self.wake_all(&state);
            return (state, Some(Taken::Request(frame, false)));
        }
        self.route(state, frame, result, reader)
    }

    /// The reader's receive: the next message into `frame`, and its lane word taken in.
    fn receive(&self, frame: &mut Frame, deadline: Option<Instant>) -> Result<()> {
        let result = self.socket.recv_into(frame, deadline);
        if result.is_ok() {
            self.lane.on_word(envelope::lane(&frame.payload));
        }
        result
    }

    /// Releases the reader role and routes what it received (see [`Shared::read`]).
    fn route<'a>(
        &'a self,
        mut state: Guard<'a>,
        frame: Frame,
        result: Result<()>,
        reader: Reader,
    ) -> (Guard<'a>, Option<Taken>) {
        state.reading = false;
        self.wake_all(&state);
        let envelope = match result.as_ref().map_or_else(
            |e| match e {
                Error::FdsDropped { .. } => Envelope::read(&frame.payload).ok(),
                _ => None,
            },
            |()| Envelope::read(&frame.payload).ok(),
        ) {
            Some(envelope) => envelope,
            None => {
                match result {
                    Err(Error::TimedOut) => {}
                    Err(e) => self.fail(&mut state, e),
                    Ok(()) => self.fail(&mut state, Error::Malformed("bad envelope".into())),
                }
                state.buffer = frame;
                return (state, None);
            }
        };
        if self.trace && matches!(envelope.kind, Kind::Reply | Kind::Failure) {
            self.trace_incoming(&envelope, &frame);
        }
        if result.is_err() {
            // Delivered as an error (its fds were dropped), so never decoded.
            self.lane.finished(&frame.payload);
        }
        match (envelope.kind, result) {
            (Kind::Reply | Kind::Failure, result) if reader == Reader::Caller(envelope.cookie) => {
                if !state.pending.is_empty() {
                    state.pending.remove(&envelope.cookie);
                }
                return (state, Some(Taken::Reply(result.map(|()| frame))));
            }
            (Kind::Reply | Kind::Failure, result) => {
                match state.pending.get_mut(&envelope.cookie) {
                    Some(slot) => *slot = Some(result.map(|()| frame)),
                    // Its caller gave up: dropped unread.
                    None => self.lane.finished(&frame.payload),
                }
            }
            (Kind::Call, Ok(())) if reader == Reader::Runner && state.calls.is_empty() => {
                return (state, Some(Taken::Request(frame, false)));
            }
            (Kind::Oneway, Ok(()))
                if reader == Reader::Runner
                    && state.oneways.is_empty()
                    && !state.oneway_running =>
            {
                state.oneway_running = true;
                return (state, Some(Taken::Request(frame, true)));
            }
            (Kind::Call, Ok(())) => state.calls.push_back(frame),
            (Kind::Oneway, Ok(())) => state.oneways.push_back(frame),
            (Kind::Call, Err(e)) => {
                drop(state);
                let why = format!("the server could not receive the request's fds: {e}");
                let _ = self.reply_failure(&envelope, &Failure::BadRequest(why));
                state = lock(&self.state);
                state.buffer = frame;
            }
            (Kind::Oneway, Err(_)) => state.buffer = frame,
        }
        (state, None)
    }

    /// Ends the connection with `why` and wakes everyone waiting on it.
    fn fail(&self, state: &mut State, why: Error) {
        if state.closed.is_none() {
            if !matches!(why, Error::Disconnected) {
                // A protocol error leaves the stream unusable; make sure the peer sees it.
                let _ = self.socket.shutdown();
            }
            state.closed = Some(why);
        }
        self.wake_all(state);
    }

    fn decode_reply<R: DeserializeOwned>(
        &self,
        frame: &mut Frame,
        iface: &InterfaceInfo,
        cmd: u32,
    ) -> Result<R> {
        // Only replies reach here, their envelope checked when they were routed.
        let failed = envelope::kind_byte(&frame.payload) == Some(Kind::Failure as u8);
        let body = &frame.payload[envelope::LEN..];
        if failed {
            let failure: Failure = codec::decode_from(body, &mut frame.fds)?;
            return Err(failure.into_error(iface, cmd));
        }
        codec::with_store(&self.lane, || codec::decode_from(body, &mut frame.fds))
    }

    /// Runs a request (a oneway one marked running) against `registry`, brought up to date
    /// first, and takes the lock back to keep its buffer and, for a oneway, let the next one
    /// run.
    fn run_request(&self, frame: Frame, oneway: bool, registry: &mut Snapshot) -> Guard<'_> {
        if self.registry_version.load(Ordering::Acquire) != registry.version {
            *registry = self.registry();
        }
        let mut frame = self.dispatch(frame, oneway, &registry.registry);
        self.lane.finished(&frame.payload);
        frame.clear(); // closes fds the request left unclaimed, outside the lock
        let mut state = lock(&self.state);
        if oneway {
            state.oneway_running = false;
            self.wake_all(&state);
        }
        keep_buffer(&mut state, frame);
        state
    }

    /// Runs one request against the service it names, and replies unless it is oneway.
    /// Returns the request's frame, for its buffer.
    fn dispatch(&self, mut frame: Frame, oneway: bool, registry: &Registry) -> Frame {
        let Ok(envelope) = Envelope::read(&frame.payload) else {
            return frame;
        };
        if self.trace {
            self.trace_incoming(&envelope, &frame);
        }
        let checked = admit(
            &registry.services,
            |s| s.info(),
            &envelope,
            registry.authorizer.as_deref(),
            self.peer.as_ref(),
        );
        let failure = match checked {
            Err(failure) => Some(failure),
            Ok(service) => {
                let mut call = Call {
                    cmd: envelope.cmd,
                    body: &frame.payload[envelope::LEN..],
                    fds: std::mem::take(&mut frame.fds),
                    peer: self.peer,
                    replier: (!oneway).then_some(Replier {
                        shared: self,
                        envelope,
                    }),
                    replied: false,
                };
                let _caller = crate::service::CallerScope::enter(self.peer);
                let outcome = codec::with_store(&self.lane, || {
                    catch_unwind(AssertUnwindSafe(|| service.handle(&mut call)))
                });
                let replied = call.replied;
                frame.fds = std::mem::take(&mut call.fds); // emptied; its capacity is reused
                match (outcome, replied) {
                    (_, true) => None,
                    (Ok(Ok(())), false) => {
                        (!oneway).then(|| Failure::BadRequest("the server sent no reply".into()))
                    }
                    (Ok(Err(e)), false) => Some(Failure::BadRequest(e.to_string())),
                    (Err(panic), false) => Some(Failure::Panicked(panic_message(&panic))),
                }
            }
        };
        match failure {
            Some(failure) if !oneway => {
                let _ = self.reply_failure(&envelope, &failure);
            }
            // Nobody waits for a oneway's outcome, so say it here rather than lose it.
            Some(failure) => trace::line(&format!(
                "typed-ipc[{}]: a oneway message (command {}) failed: {failure:?}",
                std::process::id(),
                envelope.cmd
            )),
            None => {}
        }
        frame
    }

    fn reply_failure(&self, call: &Envelope, failure: &Failure) -> Result<()> {
        let envelope = Envelope {
            kind: Kind::Failure,
            ..*call
        };
        self.send(&envelope, failure, None, Sending::Wait)?;
        if self.trace {
            trace::line(&format!(
                "typed-ipc[{}] -> failure #{}: {failure:?}",
                std::process::id(),
                call.cookie
            ));
        }
        Ok(())
    }

    /// Keeps a received buffer for the next read, unless it is too big to hoard.
    fn recycle(&self, mut frame: Frame) {
        frame.clear();
        if frame.payload.capacity() <= RETAIN_MAX {
            keep_buffer(&mut lock(&self.state), frame);
        }
    }

    fn trace_out(&self, envelope: &Envelope, iface: &InterfaceInfo) {
        if self.trace {
            trace::outgoing(envelope, iface);
        }
    }

    fn trace_incoming(&self, envelope: &Envelope, frame: &Frame) {
        let registry = self.registry().registry;
        trace::incoming(envelope, frame, registry.services.iter().map(|s| s.info()));
    }
}

/// A serving thread's copy of the registry, and the version it was taken at.
struct Snapshot {
    version: u64,
    registry: Arc<Registry>,
}

/// Keeps an emptied buffer for the next read if it is larger than the one kept, and not too
/// big to hoard.
fn keep_buffer(state: &mut State, frame: Frame) {
    let capacity = frame.payload.capacity();
    if capacity <= RETAIN_MAX && state.buffer.payload.capacity() < capacity {
        state.buffer = frame;
    }
}

/// Who is reading, which decides what [`Shared::route`] hands back rather than routes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// A caller waiting for the reply with this cookie.
    Caller(u64),
    /// A thread inside [`Connection::run`].
    Runner,
}

/// What a reader handles itself.
enum Taken {
    /// Its own reply (or why it will not come).
    Reply(Result<Frame>),
    /// A request to run now; `true` for a oneway one, already marked running.
    Request(Frame, bool),
}

/// Where a [`Call`]'s reply goes.
pub(crate) struct Replier<'a> {
    shared: &'a Shared,
    envelope: Envelope,
}

impl Replier<'_> {
    pub(crate) fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<()> {
        let envelope = Envelope {
            kind: Kind::Reply,
            ..self.envelope
        };
        if self.shared.trace {
            trace::reply(envelope.cookie);
        }
        self.shared
            .send(&envelope, value, None, Sending::Wait)
            .map(drop)
    }
}

/// Whether [`Shared::send`] may wait for the socket.
#[derive(Clone, Copy)]
enum Sending {
    /// As long as it takes (or until the deadline).
    Wait,
    /// Not at all: the message goes out whole at once, or not at all.
    IfNoWait,
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".into(),
    }
}

/// The largest buffer kept for reuse (per sending thread, and per connection for receiving).
/// Fresh pages cost more than copying into them (1 to 2.5 µs a page on these VMs), so bulk
/// transfers up to this size reuse memory that is already mapped.
const RETAIN_MAX: usize = 32 << 20;

thread_local! {
    /// The frame this thread's calls receive their replies into when they read them
    /// themselves: kept by the thread, so a lone caller takes no lock to get or give back a
    /// buffer.
    static FRAME: Cell<Frame> = const { Cell::new(Frame { payload: Vec::new(), fds: Vec::new() }) };
    /// This thread's encoding buffers, reused so a call allocates nothing.
    static BUFFERS: Cell<(Vec<u8>, Vec<BorrowedFd<'static>>)> =
        const { Cell::new((Vec::new(), Vec::new())) };
}

/// Keeps `frame`, emptied, as this thread's receive frame, unless it is too big to hoard.
fn keep_thread_frame(mut frame: Frame) {
    frame.clear();
    if frame.payload.capacity() <= RETAIN_MAX {
        // `with` + `replace` rather than `LocalKey::set`, which goes through its
        // initialisation path every time.
        drop(FRAME.with(|f| f.replace(frame)));
    }
}

/// Runs `f` with this thread's (emptied) byte and fd buffers.
fn with_buffers<'a, R>(f: impl FnOnce(&mut Vec<u8>, &mut Vec<BorrowedFd<'a>>) -> R) -> R {
    // Taken rather than borrowed: `f` runs user `Serialize` code, which may itself call.
    let (mut buf, fds) = BUFFERS.with(Cell::take);
    let mut fds: Vec<BorrowedFd<'a>> = fds;
    buf.clear();
    let result = f(&mut buf, &mut fds);
    fds.clear();
    // An empty vector changes lifetime without a new allocation (collected in place); a
    // plain `filter` could not change the element type.
    #[allow(clippy::unnecessary_filter_map)]
    let fds: Vec<BorrowedFd<'static>> = fds.into_iter().filter_map(|_| None).collect();
    if buf.capacity() > RETAIN_MAX {
        buf = Vec::new(); // don't keep a huge message's buffer per thread
    }
    drop(BUFFERS.with(|b| b.replace((buf, fds))));
    result
}

/// Hashes call cookies, which are this end's own sequential numbers: a multiply spreads them
/// over the table, and SipHash (the default) would only cost time on every call. A peer can
/// only look cookies up, not insert them, so it cannot grow a probe sequence.
#[derive(Default)]
struct CookieHasher(u64);

impl Hasher for CookieHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

fn lock(m: &Mutex<State>) -> Guard<'_> {
    // Nothing under this lock is left half-updated by a panic, so poisoning is noise.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
