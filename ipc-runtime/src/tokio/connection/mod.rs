//! [`AsyncConnection`]: the blocking [`Connection`](crate::Connection)'s protocol, driven by
//! tasks on a tokio runtime.
//!
//! What the peer's requests hold is bounded (`Inner::backlog`, the numbers in
//! [`backlog`](crate::connection::backlog)): each request counts from the reader's receive
//! until its handler has finished (its reply out). At the bounds the reader waits for `room`
//! unless a call of this end needs it to read on (`Inner::must_pause`: one a handler made, or
//! any with nothing serving); then it reads on, up to twice the bounds (or none past them
//! with nothing serving), and ends the connection past that. The replies waiting for room to
//! go out are bounded too (`Inner::replies`): past their budget, a call waits for
//! `reply_room` before its handler starts.

mod calling;
mod pending;
mod reader;
mod sending;
mod serving;

pub(super) use sending::SaidReply;
#[cfg(test)]
pub(super) use serving::IDLE_RUNNERS;

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard, RwLock};

use ::tokio::io::unix::AsyncFd;
use ::tokio::runtime::Handle;
use ::tokio::sync::{Mutex as AsyncMutex, Notify, mpsc, watch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::AsyncService;
use super::envelope::{self, Envelope, Kind};
use crate::connection::Authorizer;
use crate::connection::backlog::{AtomicBacklog, Cost, ReplyBytes};
use crate::connection::lane::Lane;
use crate::connection::trace;
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::service::InterfaceInfo;
use crate::socket::{PeerCredentials, Socket};
use reader::{ReaderEnding, read_loop};
use sending::TracedSend;

/// A connection to a peer process on a tokio runtime: the async flavour of
/// [`Connection`](crate::Connection), speaking the same protocol.
///
/// Cloning is cheap and clones share the connection. It has tasks of its own on the runtime
/// it was created in (see the [module docs](super)): calls and served interfaces work as long
/// as that runtime runs. When the last clone is dropped the connection shuts down: the peer
/// sees a hang-up and the tasks end. A clone that a served implementation holds counts too
/// (a client of the peer, to call it back from a handler): the connection then stays up
/// after this end's other handles are gone, so hang up with [`AsyncConnection::close`].
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
        self.0.ended_here(trace::EndedHere::Dropped);
        self.0.hang_up(Socket::shutdown);
    }
}

/// An [`AsyncConnection`] held without keeping it open ([`AsyncConnection::downgrade`]).
pub(in crate::tokio) struct WeakAsyncConnection(std::sync::Weak<Owner>);

impl WeakAsyncConnection {
    /// The connection, unless every [`AsyncConnection`] handle of it is gone (which shut it
    /// down).
    pub(in crate::tokio) fn upgrade(&self) -> Option<AsyncConnection> {
        let owner = self.0.upgrade()?;
        Some(AsyncConnection {
            inner: owner.0.clone(),
            _owner: owner,
        })
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
    /// How traced lines name the connection.
    pub(super) name: trace::Name,
    /// Byte strings through shared memory, as in the blocking flavour.
    lane: Lane,
    /// How many oneway messages have run (or been passed over once the connection ended):
    /// a call waits until the oneways that arrived before it have run.
    oneways_run: watch::Sender<u64>,
    /// What the requests received and not finished hold (see
    /// [`backlog`](crate::connection::backlog)): held, queued for the oneway task, or in
    /// their handler's task until the reply is out.
    backlog: AtomicBacklog,
    /// The bytes of the replies waiting for room to go out (see
    /// [`backlog`](crate::connection::backlog)): at its budget, a call not started yet waits
    /// for `reply_room` before its handler runs.
    replies: ReplyBytes,
    /// Signalled as the replies waiting go below their budget, and as the connection ends:
    /// one call waiting for it at a time, which passes it on as it starts.
    reply_room: Notify,
    /// How many calls wait for `reply_room` (what tests look at).
    calls_held_for_replies: AtomicUsize,
    /// What a request that finishes must see to: [`PAUSED`], the reader waits for `room`, at
    /// the backlog's bounds with no call of this end waiting for a reply (set under the state
    /// lock; a call that starts meanwhile signals `room` too); [`DRAINING`], this end stopped
    /// reading while it served, and the read side shuts with the last request in flight.
    /// One word, so that a request's finish reads one atomic, as before there were two.
    on_finish: AtomicU8,
    room: Notify,
    /// This end shut the socket down (`hang_up`): a reader waiting for room reads no more.
    hung_up: AtomicBool,
    /// [`AsyncConnection::shut_down`]: the peer is told so (once) as the drain ends, before
    /// the socket shuts.
    says_shut_down: AtomicBool,
    /// A task sends cancels of cookie 0 (acknowledgements, `Inner::send_cancel`) until none
    /// is owed: one task at most, so that a peer that does not read, cancelling calls that
    /// claim placements, makes one task, not one each.
    ack_queued: AtomicBool,
    /// Acknowledgements owed to that task, counted: it sends again if one came after it
    /// read the count (its word may have been written before the acknowledgement).
    acks_owed: AtomicU64,
    /// [`CLOSED`]: this end closed the connection ([`AsyncConnection::close`]): the requests
    /// not started by then never run, and those read after it are dropped. [`DRAINING`]: it
    /// stopped reading while it served, and reads on only for the replies its handlers in
    /// flight wait for: the requests read meanwhile are dropped.
    dropping_requests: AtomicU8,
    /// What this end did that ended the connection ([`trace::EndedHere`] as a `u8`), for the
    /// traced line saying why: [`AsyncConnection::close`], else the first of
    /// [`AsyncConnection::stop_reading`] and dropping the last handle.
    ended_here: AtomicU8,
    /// Signalled once `State::closed` is set, and when the reader starts to wait for `room`
    /// (it reads nothing then), for a sender that found the peer gone and waits to learn why
    /// (`Inner::why_unsent`).
    ended: Notify,
}

#[derive(Default)]
struct State {
    /// Calls waiting for replies, by cookie.
    pending: pending::Pending,
    /// Why the connection ended; once set, it stays.
    closed: Option<Error>,
    /// Someone serves on this connection: requests are handled as they arrive.
    serving: bool,
    /// An [`AsyncServer`](crate::tokio::AsyncServer) is making this connection's services:
    /// requests a call of this end reads meanwhile are held for them, as for a server, past
    /// the bounds of the queue too (up to `HARD_FACTOR` times them).
    server_coming: bool,
    /// Requests that arrived before anyone served, in order.
    held: Vec<(Frame, Envelope, Cost)>,
    /// The task that runs oneway messages in order, once there is one (as many as the
    /// backlog's bounds let in).
    oneways: Option<mpsc::UnboundedSender<(Frame, Envelope, Cost)>>,
    /// How many oneway messages went to that task.
    oneways_queued: u64,
    /// That task is running (it may outlive `oneways`, finishing what it has).
    oneway_task: bool,
    /// Calls dispatched to a task and not yet done: they still look their service up, so the
    /// services are not dropped before they are ([`serving`]'s `call_done`).
    calls_running: usize,
    /// At most how many of them run at once
    /// ([`AsyncConnection::set_max_calls_at_once`]): no limit unless set.
    max_calls: MaxCalls,
    /// Calls read while `max_calls` ran, in arrival order: each holds its request only (no
    /// task), and the first goes to the task of the next call to finish. Not empty only while
    /// at least `max_calls` run, so a call waiting always has one to take it.
    waiting_calls: VecDeque<serving::Request>,
    /// Tasks that ran a call and wait for the next, the most recently idle last.
    idle_runners: Vec<Arc<serving::Runner>>,
    /// Every task that runs calls, idle or busy, each entered when it is made (held weakly:
    /// the last handle to a runner handed a call finishes that call, see `Runner`'s drop;
    /// those dropped leave when the next is made). Where a [`Kind::Cancel`] looks for the
    /// call it names, by the cookie each runner records for the call it has: a scan, as
    /// cancels are rare, rather than a map that every call would enter and leave.
    runners: Vec<std::sync::Weak<serving::Runner>>,
}

/// [`State::max_calls`]: a number no count of calls reaches unless set, so that the check as
/// each call is read is one comparison.
struct MaxCalls(usize);

impl Default for MaxCalls {
    fn default() -> MaxCalls {
        MaxCalls(usize::MAX)
    }
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
    /// bound to `path`. The `connect` syscall runs on a thread of its own: it can wait while
    /// the listener's backlog is full, and neither the runtime nor its shutdown waits for it.
    /// Its errors are [`Connection::connect`](crate::Connection::connect)'s. Bound the wait
    /// with [`AsyncConnection::connect_timeout`], whose thread gives up with the caller: a
    /// `tokio::time::timeout` around this one leaves the thread waiting on, until the
    /// listener takes the client or goes (it then closes its socket).
    pub async fn connect(path: impl AsRef<Path>) -> Result<AsyncConnection> {
        let path = path.as_ref().to_owned();
        AsyncConnection::new(connect_on_a_thread(move || Socket::connect(path)).await?)
    }

    /// Connects to a listener bound to a Linux abstract name (see [`AsyncConnection::connect`]).
    /// A client the server turns away (`admit`, `max_clients`) connects without error, and its
    /// first call fails with [`Error::Refused`].
    pub async fn connect_abstract(name: impl AsRef<[u8]>) -> Result<AsyncConnection> {
        let name = name.as_ref().to_owned();
        AsyncConnection::new(connect_on_a_thread(move || Socket::connect_abstract(name)).await?)
    }

    /// [`AsyncConnection::connect`], waiting at most `timeout` while the listener's queue of
    /// clients not yet accepted is full (a service that stopped accepting, with many clients
    /// queued), then failing with [`Error::TimedOut`], as the blocking
    /// [`Connection::connect_timeout`](crate::Connection::connect_timeout) does. The
    /// connecting thread times the wait itself (the runtime needs no time driver) and ends
    /// with it, whether or not the future is still awaited by then.
    pub async fn connect_timeout(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<AsyncConnection> {
        let path = path.as_ref().to_owned();
        let connect = move || Socket::connect_timeout(path, timeout);
        AsyncConnection::new(connect_on_a_thread(connect).await?)
    }

    /// [`AsyncConnection::connect_abstract`], waiting at most `timeout` as
    /// [`AsyncConnection::connect_timeout`] does.
    pub async fn connect_abstract_timeout(
        name: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<AsyncConnection> {
        let name = name.as_ref().to_owned();
        let connect = move || Socket::connect_abstract_timeout(name, timeout);
        AsyncConnection::new(connect_on_a_thread(connect).await?)
    }

    /// Runs a connection over `socket` on the current tokio runtime, which must have its IO
    /// driver enabled. Fails outside a runtime. Set `TYPED_IPC_DEBUG=1` in the environment to
    /// have every message printed to stderr.
    ///
    /// # Panics
    ///
    /// In a runtime built without its IO driver (no `enable_io()` or `enable_all()`), as
    /// tokio's `AsyncFd` does.
    pub fn new(socket: Socket) -> Result<AsyncConnection> {
        AsyncConnection::to(socket, None)
    }

    /// [`AsyncConnection::new`], to the worker `worker` if this process spawned it.
    pub(crate) fn to(socket: Socket, worker: Option<u32>) -> Result<AsyncConnection> {
        let io = super::register(Registered(socket))?;
        let runtime = Handle::current();
        let peer = io
            .get_ref()
            .0
            .peer_credentials()
            .ok()
            .map(|c| c.of_worker(worker));
        let limits = io.get_ref().0.limits();
        let lane = Lane::new(limits.max_message_len, limits.max_fds)
            .with_max_shared_len(limits.max_shared_len)
            .with_max_send_len(limits.send_len())
            .with_max_send_fds(limits.send_fds())
            .telling_max_fds();
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
            replies: ReplyBytes::default(),
            reply_room: Notify::new(),
            calls_held_for_replies: AtomicUsize::new(0),
            on_finish: AtomicU8::new(0),
            room: Notify::new(),
            hung_up: AtomicBool::new(false),
            says_shut_down: AtomicBool::new(false),
            ack_queued: AtomicBool::new(false),
            acks_owed: AtomicU64::new(0),
            dropping_requests: AtomicU8::new(0),
            ended_here: AtomicU8::new(trace::EndedHere::No as u8),
            ended: Notify::new(),
            next_cookie: AtomicU64::new(1),
            services: RwLock::new(Vec::new()),
            authorizer: RwLock::new(None),
            tasks,
            trace: trace::enabled(),
            name: trace::Name::next(worker, peer.as_ref()),
            lane,
        });
        if inner.lane.tells_max_fds() {
            inner.tell_max_fds();
        }
        // Not under any lock: a runtime closing drops the task at once, inside `spawn`, and
        // its `ReaderEnding` ends the connection, taking the state lock.
        let ending = ReaderEnding::new(inner.clone(), reader);
        inner.runtime.spawn(read_loop(ending));
        Ok(AsyncConnection {
            _owner: Arc::new(Owner(inner.clone())),
            inner,
        })
    }

    /// The peer's credentials, as the kernel recorded them when the connection was made; for a
    /// worker this process spawned, as [`Connection::peer_credentials`] says.
    ///
    /// [`Connection::peer_credentials`]: crate::Connection::peer_credentials
    pub fn peer_credentials(&self) -> Option<PeerCredentials> {
        self.inner.peer
    }

    /// The underlying socket. Its blocking methods must not be used on a runtime thread, nor
    /// its send and receive methods at all: the connection's tasks own the stream.
    pub fn socket(&self) -> &Socket {
        self.inner.socket()
    }

    /// How traced lines name this connection.
    pub(crate) fn trace_name(&self) -> trace::Name {
        self.inner.name
    }

    /// Trusts the peer with pipes, both ways: it may copy this end's large call arguments
    /// straight out of this process's pages, and this end reads the pipes it lends. Off by
    /// default, and only for a trusted peer. As
    /// [`Connection::lend_pages_to_peer`](crate::Connection::lend_pages_to_peer), which says
    /// why. The message that tells the peer goes out at once, before anything this end sends
    /// next, unless the socket is full: then from a task of the connection's runtime, after
    /// what this end sends meanwhile, saying the trust this end has when it goes. So the peer
    /// ends with the last word of several calls; turned off, its calls that pipe before the
    /// word reaches it fail.
    pub fn lend_pages_to_peer(&self, lend: bool) {
        if self.inner.lane.lend_pages(lend).is_some() {
            let name = self.inner.name;
            self.inner
                .announce(Lane::pipes_announcement, move |(_, lends)| {
                    trace::announce_pipes(&name, lends & 1 != 0);
                });
        }
    }

    /// Lets the peer write byte strings of 256 KiB to 1 MiB straight into this process's
    /// memory. As [`Connection::accept_writes_from_peer`][accept], which says when that is
    /// safe. The announcement goes out at once, before anything this
    /// end sends next, unless the socket is full: then from a task of the connection's
    /// runtime, after what this end sends meanwhile (until it arrives the peer sends its
    /// strings the other ways). Fails as that one does if this side's limits leave no room
    /// for the message.
    ///
    /// [accept]: crate::Connection::accept_writes_from_peer
    pub fn accept_writes_from_peer(&self) -> Result<()> {
        // As in the blocking flavour: over this side's limits the announcement could never go
        // out, and no inbox is made for nothing.
        let len = crate::connection::envelope::ANNOUNCE_LEN;
        (self.inner.socket().check_outgoing(len, 0))
            .inspect_err(|e| self.inner.announce_unsent(e))?;
        let announcement = self.inner.lane.accept_writes()?;
        let name = self.inner.name;
        self.inner
            .announce(move |_| announcement, move |_| trace::announce(&name));
        Ok(())
    }

    /// Writes this end's byte strings of 256 KiB to 1 MiB straight into `memory`, the
    /// peer's. As [`Connection::write_into_peer`](crate::Connection::write_into_peer).
    pub fn write_into_peer(&self, memory: crate::peer_memory::PeerMemory) {
        self.inner.lane.write_into_peer(memory);
    }

    /// Gives back the shared memory this end's large byte strings go through, now rather
    /// than when the connection ends, and tells the peer to unmap it too: its size in bytes,
    /// or 0 if there is none or the peer has not acknowledged the last large string yet (it
    /// does in its next message). As
    /// [`Connection::release_shared_memory`](crate::Connection::release_shared_memory),
    /// which says when to. The message that tells the peer goes out at once, unless the
    /// socket is full: then from a task of the connection's runtime.
    pub fn release_shared_memory(&self) -> usize {
        let Some(retired) = self.inner.lane.retire_region() else {
            return 0;
        };
        if let Some(announcement) = retired.announcement {
            // It may come after what this end sends meanwhile, also after a placement that
            // announces a new region: it names the region by inode, so that one stays mapped.
            let (len, older, name) = (retired.len, retired.older, self.inner.name);
            self.inner.announce(
                move |_| announcement,
                move |_| trace::announce_retired(&name, len, older),
            );
        }
        retired.len
    }

    /// The connection's lane, for tests of its state.
    #[cfg(test)]
    pub(crate) fn test_lane(&self) -> &crate::connection::lane::Lane {
        &self.inner.lane
    }

    /// The connection's tasks still running, and how many of them wait idle for a call.
    #[cfg(test)]
    pub(super) fn test_tasks(&self) -> (usize, usize) {
        let all = self.inner.tasks.count.load(Ordering::SeqCst);
        (all, self.inner.lock().idle_runners.len())
    }

    /// What this end did that ends the connection, as its traced line will say, read through
    /// a handle that does not keep the connection open.
    #[cfg(test)]
    pub(super) fn test_ended_here(&self) -> impl Fn() -> trace::EndedHere + use<> {
        let inner = Arc::clone(&self.inner);
        move || trace::EndedHere::from_u8(inner.ended_here.load(Ordering::SeqCst))
    }

    /// Whether any of the peer's requests is held, queued or running.
    #[cfg(test)]
    pub(super) fn test_requests_in_flight(&self) -> bool {
        !self.inner.backlog.get().is_empty()
    }

    /// How many calls wait for the replies waiting to go out before they start.
    #[cfg(test)]
    pub(super) fn test_calls_held_for_replies(&self) -> usize {
        self.inner.calls_held_for_replies.load(Ordering::SeqCst)
    }

    /// Whether the reader waits for room, at the backlog's bounds.
    #[cfg(test)]
    pub(super) fn test_reader_paused(&self) -> bool {
        let _state = self.inner.lock(); // set and cleared under it
        self.inner.reader_paused(Ordering::SeqCst)
    }

    /// Whether the connection's state says it has ended (its reader has read the end, say),
    /// where [`AsyncConnection::is_closed`] also asks the kernel whether the peer has gone.
    #[cfg(test)]
    pub(super) fn test_ended(&self) -> bool {
        self.inner.lock().closed.is_some()
    }

    /// A handle that does not keep the connection open: an
    /// [`AsyncServing`](super::AsyncServing) keeps one of each client's, so that the
    /// connection goes (its socket, buffers and shared memory) as soon as its task has
    /// served it to the end.
    pub(in crate::tokio) fn downgrade(&self) -> WeakAsyncConnection {
        WeakAsyncConnection(Arc::downgrade(&self._owner))
    }

    /// Whether this thread is running a handler of this connection's now: an
    /// [`AsyncServing`](super::AsyncServing) shut down from a handler does not wait for the
    /// connection it runs in.
    pub(in crate::tokio) fn handling_here(&self) -> bool {
        crate::service::handling_a_call_of(Arc::as_ptr(&self.inner).cast())
    }

    /// Whether the connection has ended (peer gone, closed, or a protocol error). A peer
    /// counts as gone as soon as its end of the socket is closed (a worker that exited or was
    /// killed) or shut both ways, before the connection's reader has run to read that far:
    /// this asks the kernel (one `poll`) unless the connection already knows. What the peer
    /// sent before it went may still be unread then: the reader still reads it, and its
    /// oneway messages still run (its calls are cancelled: see [`AsyncConnection::close`]).
    pub fn is_closed(&self) -> bool {
        // The poll with the lock let go.
        let known = self.inner.lock().closed.is_some();
        known || self.inner.socket().has_ended()
    }

    /// Ends the connection: the peer sees a hang-up, every waiting call returns
    /// [`Error::Disconnected`], and [`AsyncConnection::run`] returns `Ok` once the handlers
    /// still running are done. The peer's calls running are cancelled, as a cancel of the
    /// peer's would (see [`AsyncConnection::call`]): their replies could go nowhere, so each
    /// handler's future is dropped (it stops at its next `.await`), but for a method already
    /// on tokio's blocking pool (`#[interface(async_server)]`), which runs to its end; the
    /// oneway running is let finish. Requests of the peer's that have not started never run,
    /// and are dropped, the fds they carry closed by typed-ipc's closer (off this thread:
    /// the guide, "slow closes"): calls waiting for the oneways sent before them or for a slot
    /// at once, oneway messages waiting for the one running once it is done, requests held
    /// until something serves at once, and requests still unread in the socket as the
    /// connection's reader reads them. (A call with no oneway to wait for starts as soon as
    /// it is read.)
    ///
    /// When the peer hangs up instead (or dies, or breaks the protocol), its calls are
    /// cancelled the same way, those running and those waiting, and those held for a server
    /// still to come, while the oneway messages it sent before still run, in order, if
    /// something serves. After [`AsyncConnection::stop_reading`], whose replies still go out,
    /// the requests received by then run (those still unread in the socket too if it served
    /// nothing then: see there); so do those of a peer that shut only its sending side
    /// (`shutdown(SHUT_WR)`), which still reads, until it hangs up or dies since: the calls
    /// still running or waiting are then cancelled at once (the connection's reader task,
    /// done reading, watches for that while they run), whether or not any of them replies.
    pub fn close(&self) {
        self.inner
            .dropping_requests
            .fetch_or(CLOSED, Ordering::SeqCst);
        // Over a `stop_reading` or a drop before it: this is what ends the connection now.
        let closed = trace::EndedHere::Closed as u8;
        self.inner.ended_here.store(closed, Ordering::SeqCst);
        self.inner.hang_up(Socket::shutdown);
        // `fail` cancels the calls running and drops the requests held and the calls waiting
        // for a slot, now, not once the calls running have finished, which may be never. On
        // a connection that had ended already, it does nothing: the peer had hung up (its
        // oneways held for a server to come are kept), or the replies could still go out then
        // (this end stopped reading, or the peer shut only its sending side). Done here then.
        if !self.inner.fail(Error::Disconnected) {
            let (held, cancelled) = {
                let mut state = self.inner.lock();
                let held = std::mem::take(&mut state.held);
                (held, self.inner.cancel_calls(&mut state))
            };
            self.inner.drop_held(held);
            self.inner.drop_cancelled(cancelled);
        }
        // The calls waiting for oneways look again, and see they are not to run.
        self.inner.oneways_run.send_modify(|_| {});
    }

    /// Ends the connection as if the child had hung up, for a
    /// [`Worker`](crate::worker::Worker) to call once its child is gone, holding the
    /// connection weakly meanwhile. Only the socket is shut: a reader waiting for room reads
    /// on once there is some, so the oneway messages the child sent before it went still run
    /// (a hang-up of this end would drop those still in the socket; its calls are cancelled,
    /// as at any hang-up of the peer's). Nothing waits on the reader
    /// meanwhile: a call made now wakes it to read, and a send fails at once.
    pub(crate) fn closer(&self) -> crate::worker::Closer {
        let inner = Arc::downgrade(&self.inner);
        let killed = inner.clone();
        crate::worker::Closer::new(
            move || {
                if let Some(inner) = inner.upgrade() {
                    let _ = inner.socket().shutdown();
                }
            },
            move || {
                if let Some(inner) = killed.upgrade() {
                    inner.killed_here();
                }
            },
        )
    }

    /// Stops taking new requests, but keeps sending: requests already running finish and
    /// their replies go out, then [`AsyncConnection::run`] returns. Used for graceful
    /// shutdown.
    ///
    /// On a connection that serves, the requests received from then on are dropped, their
    /// callers told [`Error::Disconnected`] once the connection ends: those still unread in
    /// the socket too, which, run, could not have the answers to the calls their handlers
    /// make back into the peer. With none of the peer's requests in flight, the socket's read
    /// side is shut at once (the peer's sends fail). With some in flight, this end reads on
    /// until the last has finished, for the replies to those calls back (a service of
    /// [`AsyncServer::service_with`](super::AsyncServer::service_with) calling its client);
    /// should the peer hang up meanwhile, they are cancelled ([`AsyncConnection::close`]).
    /// On one that serves nothing yet, the read side is shut at once, and the requests held
    /// or still in the socket run if a service comes (their calls back fail).
    ///
    /// So a handler in flight whose call into the peer makes the peer call this end again
    /// (callbacks nested two deep) waits until the connection ends: that request is dropped
    /// and its caller, the peer's handler, is told only then. Give such calls a timeout.
    pub fn stop_reading(&self) {
        self.inner.ended_here(trace::EndedHere::StoppedReading);
        // Requests held for a server that has not come would never finish: nothing to wait
        // for (they run if one comes, as those still in the socket do then).
        let serving = self.inner.lock().serving;
        match serving {
            true => self.inner.drain(),
            false => self.inner.hang_up(Socket::shutdown_read),
        }
    }

    /// [`AsyncConnection::stop_reading`], telling the peer that this end has shut down: its calls
    /// not answered fail with [`Error::ShutDown`] rather than [`Error::Disconnected`], so that it
    /// knows they did not run and may send them elsewhere. The notice goes out once the requests in
    /// flight have finished and replied, and the socket then shuts both ways, not only its read
    /// side (this end sends nothing after its last word); every request read later is dropped
    /// unrun, and so is any still in the socket. A listening [`AsyncServer`](super::AsyncServer)
    /// does this to each client as it shuts down; a worker that means to exit may do it to its
    /// parent (its `run` then returns `Ok(())` once the requests in flight have replied).
    ///
    /// Best effort, never waiting: the notice is not sent if the socket has no room at once or
    /// another task's message is going out then, and the peer's calls then fail with
    /// `Disconnected`. Nor is it on a connection that serves nothing yet (the requests held would
    /// run if a service came, as after `stop_reading`). A `#[oneway]` message sent before it may or
    /// may not have run.
    pub fn shut_down(&self) {
        self.inner.says_shut_down.store(true, Ordering::SeqCst);
        self.stop_reading();
    }

    /// Answers calls to `service`'s interface on this connection. Several interfaces can be
    /// served on one connection; serving an interface twice replaces the first. Interfaces are
    /// told apart by name (the trait's, or the one `#[interface(name = "...")]` gives).
    ///
    /// Requests that arrive before the first service is added (or [`AsyncConnection::run`] is
    /// called) wait for it, as they would wait for a serving thread in the blocking flavour,
    /// up to the bounds of what a peer can make this end hold (see the [module docs](super));
    /// from then on each request is handled as it arrives, calls concurrently in tasks of
    /// their own (each once the oneways that arrived before it have run; at most
    /// [`AsyncConnection::set_max_calls_at_once`] at a time, if set), oneway messages one
    /// at a time in order. So a request for a second service added after the first may be
    /// refused as not served ([`Error::NotServed`]) if it came
    /// before it; [`AsyncServer::serve`](super::AsyncServer::serve) adds all of its services
    /// at once.
    ///
    /// The connection holds `service` until it has ended. A service that holds a clone of
    /// this connection (a generated client of the peer's interface) keeps it up: dropping
    /// every other handle then hangs up nothing, and a worker serving the other end never
    /// sees the hang-up. End such a connection with [`AsyncConnection::close`].
    pub fn add_service(&self, service: impl AsyncService) {
        self.add_services(vec![Arc::new(service)]);
    }

    /// Says that an [`AsyncServer`](crate::tokio::AsyncServer) is making this connection's
    /// services ([`State::server_coming`]), before it adds them.
    #[cold]
    #[inline(never)]
    pub(crate) fn server_coming(&self) {
        self.inner.lock().server_coming = true;
    }

    /// Takes [`AsyncConnection::server_coming`] back: no server will come (making a service
    /// panicked), and what is read from now on is held for nobody, as before.
    #[cold]
    #[inline(never)]
    pub(crate) fn server_not_coming(&self) {
        self.inner.lock().server_coming = false;
    }

    /// [`AsyncConnection::add_service`] for each of `services` at once: no request is handled
    /// before all of them are there, so that none held meanwhile is refused as not served
    /// because the first started serving before the others came.
    pub(crate) fn add_services(&self, added: Vec<Arc<dyn AsyncService>>) {
        {
            let mut services = self.inner.services.write();
            for service in added {
                services.retain(|s| s.info().id != service.info().id);
                services.push(service);
            }
        }
        self.inner.start_serving();
        // Added after the connection ended (the peer hung up before this end served): no
        // request will reach it, and one holding a clone of this connection would keep it
        // open for good, so it goes now as the others went.
        self.inner.retire_services(false);
    }

    /// Lets `authorize` refuse calls: it sees the peer's credentials, the interface and the
    /// command id, and its `Err(reason)` reaches the caller as [`Error::Refused`].
    ///
    /// It runs for every request, oneway messages too, before the method does, and may run
    /// on several threads at once; `iface.method(cmd)` names the method. A refused
    /// `#[oneway]` message is dropped: its sender already had `Ok(())`, and only this end's
    /// stderr says so (the first 10 failed oneways of a process, all of them under
    /// `TYPED_IPC_DEBUG=1`).
    pub fn set_authorizer(
        &self,
        authorize: impl Fn(Option<&PeerCredentials>, &InterfaceInfo, u32) -> Result<(), String>
        + Send
        + Sync
        + 'static,
    ) {
        *self.inner.authorizer.write() = Some(Box::new(authorize));
    }

    /// Runs at most `n` of the peer's calls on this connection at once, as the blocking
    /// flavour's [`Server::threads`](crate::Server::threads) does: the calls read while `n`
    /// run wait, in the order they arrived, and each starts as a running one finishes. With
    /// `n = 1` the peer's calls run one at a time, in arrival order. No limit unless set
    /// (each call runs as soon as it is read).
    /// [`AsyncServer::max_calls_at_once`](super::AsyncServer::max_calls_at_once) sets it on
    /// each connection it serves; set it here before [`AsyncConnection::add_service`] to have
    /// it hold for the first requests too. Set later, it holds from then on (the calls
    /// running go on); raised, it starts the calls waiting that now fit.
    ///
    /// A call waiting for a slot costs its request only (no task): it counts in what the
    /// peer's requests may hold, as it did while it ran, so a peer that keeps sending makes
    /// this end stop reading at those bounds (1,024 requests; see the [module docs](super))
    /// as ever. A call the peer cancels (its future dropped, or timed out) while it waits is
    /// dropped unrun; one it cancels while it runs frees its slot once its handler's future
    /// is dropped (a method of an `#[interface(async_server)]` already on tokio's blocking
    /// pool runs to its end first). A handler that panics frees its slot. Calls still waiting
    /// when the peer hangs up, or at [`AsyncConnection::close`], are dropped unrun, their fds
    /// closed: their replies could go nowhere. (A blocking server runs the calls it has
    /// queued all the same, as it runs those it has started.)
    ///
    /// Only calls count. Oneway messages run one at a time, in order, on a task of their
    /// own, beside the `n` calls (each call still starts only once the oneways sent ahead of
    /// it have run); the blocking flavour's threads run oneways too, so there one thread
    /// runs oneways and calls one at a time together. The calls a handler makes to the peer
    /// do not count either (the peer serves them), but a call of the peer's that one of them
    /// makes back into this end does: with `n = 1`, a handler whose call makes the peer call
    /// this end again waits for good (until a timeout of its call), as with a blocking
    /// server of one thread. Callbacks nested that way need `n` at least as deep as they
    /// nest.
    ///
    /// # Panics
    ///
    /// If `n` is 0: no call would ever run.
    pub fn set_max_calls_at_once(&self, n: usize) {
        assert!(
            n > 0,
            "AsyncConnection::set_max_calls_at_once(0): at least one call must run"
        );
        self.inner.set_max_calls(n);
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
    /// handler and send it started has finished. Returns `Ok(())` when the peer hung up (or
    /// shut down: [`Error::ShutDown`]) or [`AsyncConnection::close`] was called, and the
    /// error otherwise.
    ///
    /// Not to be awaited inside a handler of this same connection: it would wait for itself.
    pub async fn run(&self) -> Result<()> {
        self.inner.start_serving();
        self.wait_closed().await;
        match &self.inner.lock().closed {
            None | Some(Error::Disconnected | Error::ShutDown) => Ok(()),
            Some(e) => Err(e.duplicate()),
        }
    }

    /// Waits until the connection has ended and every task it started (its reader, handlers,
    /// sends finishing in the background) has finished. Does not start serving. Once it
    /// returns, dropping the last clone closes the socket at once. (A blocking
    /// [`Connection`](crate::Connection) has no tasks, and nothing reads it while no thread
    /// waits on it: its [`run`](crate::Connection::run) is what waits for the end, serving
    /// meanwhile, and [`is_closed`](crate::Connection::is_closed) says whether it came.)
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
    /// Dropping the future cancels the call: if its request went out and its reply has not
    /// come, the peer is told (a cancel message, best effort, sent without waiting): an async
    /// peer drops the call unrun if it has not started yet, or drops its handler's future
    /// (so the handler stops at its next `.await`), and sends no reply; a blocking peer drops
    /// the call if it is still queued, and lets a running handler finish (as an async server
    /// of a blocking trait lets a method already on the blocking pool). A reply that comes
    /// anyway (it crossed the cancel) is dropped and its fds closed. A call dropped while its
    /// request was part-way out (a large message, finished in the background) is not
    /// cancelled: its handler runs and its reply is dropped.
    pub async fn call<A: Serialize, R: DeserializeOwned>(
        &self,
        iface: &'static InterfaceInfo,
        cmd: u32,
        args: A,
        timeout: Option<Duration>,
    ) -> Result<R> {
        // Told to the call, so that the trace can say it timed out rather than was dropped.
        let deadline = deadline(timeout);
        let call = self.call_inner(iface, cmd, args, deadline);
        match deadline {
            None => call.await,
            Some(deadline) => ::tokio::time::timeout_at(deadline, call)
                .await
                .unwrap_or(Err(Error::TimedOut)),
        }
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
        let deadline = deadline(timeout);
        let traced = trace::described(self.inner.trace, &args)
            .map(|args| TracedSend::new(self.inner.name, envelope, iface, args, deadline));
        let send = async {
            match self.inner.send(envelope, args).await {
                Err(e) => Err(Box::pin(self.inner.why_unsent(e)).await),
                sent => sent,
            }
        };
        match deadline {
            None => send.await?,
            Some(deadline) => ::tokio::time::timeout_at(deadline, send)
                .await
                .unwrap_or(Err(Error::TimedOut))?,
        };
        if let Some(mut traced) = traced {
            traced.sent();
        }
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

/// When a `timeout` from now ends; none if it is too long to say (it never fires, as
/// `tokio::time::timeout`'s would not in this process's life).
fn deadline(timeout: Option<Duration>) -> Option<::tokio::time::Instant> {
    timeout.and_then(|timeout| ::tokio::time::Instant::now().checked_add(timeout))
}

/// Runs `connect` on a thread of its own and waits for it without blocking the runtime. Not
/// on tokio's blocking pool: a connect waits for as long as the listener's backlog is full (a
/// server that does not accept: stopped, stuck, or flooded), and dropping a runtime waits for
/// every thread of that pool, so a connect given up on held the runtime's shutdown up for
/// good. Given up on here, the socket is closed once the connect returns.
async fn connect_on_a_thread(
    connect: impl FnOnce() -> Result<Socket> + Send + 'static,
) -> Result<Socket> {
    // Not a tokio oneshot: see `handoff`.
    let (connected, outcome) = super::handoff::channel();
    std::thread::Builder::new()
        .name("typed-ipc-connect".into())
        .spawn(move || connected.give(connect()))?;
    outcome
        .await
        .ok_or_else(|| Error::Io(io::Error::other("the connecting thread panicked")))?
}

#[cfg(test)]
thread_local! {
    /// Run by this thread's reader once it has checked that a request it read may run,
    /// before it takes the state lock to count it in flight: where the scheduler may stop it
    /// while another thread calls `stop_reading`, made to happen in a test.
    static BEFORE_ADMIT: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::RefCell::new(None) };
}

/// Sets what this thread's reader runs before it next counts a request in flight.
#[cfg(test)]
pub(super) fn before_admit(f: Box<dyn FnOnce()>) {
    BEFORE_ADMIT.set(Some(f));
}

#[cfg(test)]
fn run_before_admit() {
    if let Some(f) = BEFORE_ADMIT.take() {
        f();
    }
}

/// In [`Inner::on_finish`]: the reader waits for room.
const PAUSED: u8 = 1;
/// In [`Inner::on_finish`] and [`Inner::dropping_requests`]: this end stopped reading while
/// it served (see [`AsyncConnection::stop_reading`]).
const DRAINING: u8 = 2;
/// In [`Inner::dropping_requests`]: this end closed the connection.
const CLOSED: u8 = 4;

impl Drop for Inner {
    /// Requests still held once nothing can serve them any more (the peer hung up, then
    /// every handle went with no server come), and any call left waiting for a slot: their
    /// fds to the closer, as for any request dropped, not closed on the thread that let the
    /// connection go. The oneways among the held are said on stderr: nobody else knows.
    fn drop(&mut self) {
        let held = std::mem::take(&mut self.state.get_mut().held);
        self.say_oneways_unrun(&held);
        for (mut frame, ..) in held {
            frame.discard_fds();
        }
        for request in &mut self.state.get_mut().waiting_calls {
            request.frame.discard_fds();
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

    pub(super) fn lane(&self) -> &Lane {
        &self.lane
    }

    /// This side is killing the worker at the other end: that ends the connection, over a
    /// [`AsyncConnection::stop_reading`] that may still be waiting for its requests.
    fn killed_here(&self) {
        use trace::EndedHere::{Killed, No, StoppedReading};
        let seq = Ordering::SeqCst;
        let _ = self.ended_here.fetch_update(seq, seq, |here| {
            (here == No as u8 || here == StoppedReading as u8).then_some(Killed as u8)
        });
    }

    /// Notes what this end did that ends the connection, unless it did something before.
    fn ended_here(&self, what: trace::EndedHere) {
        let (none, seq) = (trace::EndedHere::No as u8, Ordering::SeqCst);
        let _ = self.ended_here.compare_exchange(none, what as u8, seq, seq);
    }

    /// Whether this end closed the connection ([`AsyncConnection::close`]).
    #[inline]
    fn closed_here(&self) -> bool {
        self.dropping_requests.load(Ordering::SeqCst) & CLOSED != 0
    }

    /// Whether the reader waits for room at the backlog's bounds.
    #[inline]
    fn reader_paused(&self, order: Ordering) -> bool {
        self.on_finish.load(order) & PAUSED != 0
    }

    /// [`AsyncConnection::stop_reading`] on a connection that serves: the requests read from
    /// now on are dropped, and the read side shuts once none is in flight (at once if none
    /// is).
    #[cold]
    #[inline(never)]
    fn drain(&self) {
        // Under the state lock, which the reader checks it under before it counts a request
        // in flight: checked apart, a request taken as this finds nothing in flight ran
        // after the read side shut, its calls back failing.
        let state = self.lock();
        self.dropping_requests.fetch_or(DRAINING, Ordering::SeqCst);
        drop(state);
        // Before the backlog is read again, so that a request finishing after that read sees
        // it (both `SeqCst`).
        self.on_finish.fetch_or(DRAINING, Ordering::SeqCst);
        self.stop_reading_once_idle();
    }

    /// Shuts the read side once no request is in flight, while draining.
    fn stop_reading_once_idle(&self) {
        if self.backlog.get().is_empty() {
            // Told, shut both ways: a send of the peer's then fails on a socket the peer sees
            // shut for good (`POLLHUP`), and waits for the notice to be read (`why_unsent`),
            // where with the read side alone it could not tell that one had come.
            let told = self.says_shut_down.swap(false, Ordering::SeqCst) && self.say_shut_down();
            if told && self.trace {
                trace::said_shut_down(&self.name);
            }
            match told {
                true => self.hang_up(Socket::shutdown),
                false => self.hang_up(Socket::shutdown_read),
            }
        }
    }

    /// Sends the shut-down notice if it can go out at once ([`envelope::say_shut_down`]),
    /// under this flavour's send lock: a message part-way out holds it between its pieces
    /// (the socket's own lock only for each piece), and the notice must not go out in the
    /// middle of one, where the peer would read a protocol error. Whether it went out.
    fn say_shut_down(&self) -> bool {
        match self.send_lock.try_lock() {
            Ok(_sending) => envelope::say_shut_down(self.socket()),
            Err(_) => false,
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
}
