//! [`Connection`]: calls, replies and served interfaces multiplexed over one [`Socket`].
//!
//! # Threading model
//!
//! A connection has no thread of its own. Whichever thread is waiting on it — a caller
//! waiting for its reply, or a thread inside [`Connection::serve`] waiting for requests —
//! takes the *reader* role, receives the next message and routes it: a reply goes to the
//! caller whose cookie it carries, a request to a serving thread. So a lone caller sends its
//! call and receives its own reply: one send (`send`, or `sendmsg` with fds), one `recvmsg`,
//! no hand-off to another thread. A caller that finds nobody reading takes the role once its
//! message is encoded and before it sends, so its reply needs no routing; if its message
//! cannot go out at once it gives the role back, and waits for room as any sender does
//! (below). A serving thread that receives a request with nothing queued before it
//! runs it at once. When the reader's own wait is over it passes the role to the next
//! waiter.
//!
//! A thread waiting for room to send reads meanwhile: if nobody else is reading it takes the role,
//! and routes what comes as any reader does, taking nothing for itself (a request is queued for a
//! serving thread, a reply goes to its caller); if another thread reads, it takes the role once
//! that one lets it go, and sends on if room comes first (that reader may wait for the rest of a
//! message the peer sends only once ours is through). So two ends that each send the other more
//! than the socket buffer holds at once, each from its only thread, both get through: say a
//! worker's one serving thread, in a handler, sends its parent a large message while the parent's
//! one thread sends the worker a large call (messages go out as they are, apart from byte strings,
//! which go through shared memory). A thread waiting for another's message to finish going out
//! first (sends are serialised) does not read: the thread whose message it is does. Like a serving
//! thread, a waiting sender reads nothing past the bounds of the request queue (below), until a
//! request leaves it. While it waits on another reader, or on the queue, it holds one eventfd of
//! its own, to be woken either by room in the socket or by the others (out of fds, it waits as
//! before, without).
//!
//! Requests run only on threads inside [`Connection::serve`] (or [`Connection::run`]), never
//! on a thread waiting for a reply: a callback arriving while a caller waits is handed to a
//! serving thread, so there is no nested event loop and no re-entrancy. A connection that
//! receives calls must therefore have a serving thread, or those calls wait. Oneway messages
//! run in the order they were sent, one at a time, and a call runs only once the oneways that
//! arrived before it have run, on however many serving threads; a oneway starts only once
//! the calls that arrived before it have started (so one serving thread runs everything in
//! the order it arrived).
//!
//! When the peer hangs up or dies, the reader sees it at once and every waiting caller gets
//! [`Error::Disconnected`] — never [`Error::TimedOut`]. What the peer sent before it went is
//! read first (a peer of another wire version says its own, and callers get
//! [`Error::VersionMismatch`]). A send that finds the peer gone (`EPIPE`) reads that too if
//! nobody else reads (as a waiting sender does, `Reader::Sender`, but not holding the send
//! lock, and nothing past the request queue's bounds), or waits, at most until its deadline,
//! for the thread that reads to read the end (`Shared::why_unsent`).
//!
//! The peer's calls that have not started by then never run, as if the peer had cancelled
//! each: their replies could go nowhere. They are dropped as the end is read, their fds
//! closed; the peer's oneway messages still run, in order (a worker may send its last ones
//! as it exits). A handler already running runs to its end (a thread cannot be stopped), and
//! so does a call a serving thread read before the end could be seen, at most one per
//! thread: its reply finds the peer gone, and the thread then reads what is left to its end
//! (past the request queue's bounds and their hard cap too, if it serves: what is left is
//! what the socket held), so that the calls there are dropped rather than run one by one,
//! and a caller here still gets the reply the peer sent before it went. The same holds
//! when the stream breaks (a protocol error) or this end shuts the socket (a worker that
//! exited or was killed). Replies still go out after this end's
//! [`Connection::stop_reading`], and to a peer that shut only its sending side
//! (`shutdown(SHUT_WR)`), which still reads: their calls run and are answered. If that peer
//! then hangs up or dies, the first reply that finds it gone drops the calls still queued
//! (nothing reads a socket whose end was read, so that is where this end learns it).
//!
//! # What a peer can make this end hold
//!
//! The peer is not trusted, and no stream of valid messages makes this end hold memory or fds
//! without bound. Requests waiting for a serving thread (queued, not yet running; those running are
//! bounded by the threads) are bounded per connection: at most 1,024 requests, 32 MiB of message
//! buffers, or 4,096 fds (one request is always taken, whatever its size; a small request waits in
//! a buffer of its own size, not in the 64 KiB it was received into). At those bounds the serving
//! threads (and threads waiting to send) stop reading, so the peer's sends wait, until a request
//! leaves the queue. A caller waiting for its reply waits with them, and its reply is read after
//! the requests before it: a peer that reports progress with oneways during a call is slowed to
//! the pace this end runs them. A handler calling back into the peer still reads, since the queue
//! may wait for its thread and its reply may come after more requests (it would otherwise wait
//! forever); it takes requests in up to twice the bounds, then ends the connection with
//! [`Error::Malformed`] saying so. (A call made on another thread that a handler waits for is not
//! known as the handler's: it waits for room as any call does.) So does a call made before the
//! serving threads have started (a `Server::service_with` whose `make` calls the client: they start
//! once it is answered), up to twice the bounds. If no thread serves the connection at all, nothing
//! would ever take those requests: a caller that finds the bounds reached ends the connection at
//! once, and the requests held are dropped with their fds. Requests that arrive before a serving
//! thread starts therefore wait for it, up to the bounds. So does the failure a caller owes for a
//! call it took in that this end could not receive (over its limits, or its fds dropped) when the
//! failure cannot go out at once: a caller never waits to send it. The async flavour applies the
//! same bounds (see its module docs, `typed_ipc::tokio`). A handler that can only finish once a
//! later request from the peer arrives must not be relied on past the bounds; nor one that waits
//! for a call of this end made elsewhere (on a thread that holds a lock the handler needs, say): at
//! the bounds, that call's reply is read only once handlers have finished. Nor may two ends whose
//! handlers send to each other (a oneway answering a oneway, say) send each other requests past the
//! bounds without waiting for replies: once both queues are full and every serving thread of both
//! ends waits to send (or for another's send to finish), neither end reads, and both wait for good.
//! Bound what each end sends ahead of the other's answers (calls, or a window of oneways
//! acknowledged by a call) below the bounds.
//!
//! # Byte strings through shared memory
//!
//! A `Vec<u8>` (or `#[serde(with = "typed_ipc::bytes")]` field) of 1 KiB to 32 MiB does not go
//! through the socket: the sender copies it into a shared memory region it owns, made once per
//! connection, and the receiver copies it out into the `Vec` it hands over with a copy that
//! tolerates a hostile sender writing meanwhile (see [`shared_region`](crate::shared_region)).
//! Two copies instead of four, and no page allocated per message. One such string per
//! direction is in flight at a time; any other goes through the socket as before, so nothing
//! ever waits for the region. Each end that sends such strings keeps one region (64 KiB, or
//! the next power of two above the largest string it sent, up to 32 MiB) open for the
//! connection's lifetime. The async flavour does the same, on the same wire.
//!
//! Between two ends that trust each other ([`Connection::lend_pages_to_peer`] on both, off
//! by default), a call's `Vec<u8>` or
//! [`SharedBytes`](crate::SharedBytes) argument of 128 KiB to 1 MiB goes with one
//! copy instead: its pages are `vmsplice`d into a pipe the caller's end makes once per
//! connection (read end sent to the peer the first time), and the receiver copies them out
//! of the pipe into its `Vec`. The receiver reads the sender's own pages, so the lane keeps
//! a clone of the `SharedBytes` until the peer has read them (a call's reply says so; a
//! call given up keeps them until the peer's next message), and a connection dropped
//! before then empties the pipe, so the peer refuses the late request rather than read
//! bytes that may have changed. Oneway messages and replies never pipe: nothing would
//! bound how long their bytes stay pinned. Neither end waits on the pipe, and a peer
//! announcing bytes its pipe does not hold fails the call at once.
//!
//! Between a parent and the worker it started, byte strings of 256 KiB to 1 MiB take one
//! copy by default: the worker's end accepts writes into its memory
//! ([`Connection::accept_writes_from_peer`]), keeping a buffer ready and telling the parent
//! where it is, and the parent's end, given the worker's memory
//! ([`Connection::write_into_peer`]), copies the bytes straight into it with
//! `process_vm_writev`; the worker's `Vec` is that buffer. See
//! [`peer_memory`](crate::peer_memory) for why this is safe where lending pages is not.

pub(crate) mod admit;
pub(crate) mod backlog;
pub(crate) mod buffers;
mod describe;
pub(crate) mod envelope;
pub(crate) mod failure;
pub(crate) mod lane;
mod reader;
mod sending;
mod serving;
#[cfg(test)]
pub(crate) mod tests;
pub(crate) mod trace;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::peer_memory::PeerMemory;
use crate::service::{InterfaceInfo, Service};
use crate::socket::{PeerCredentials, RecvState, Socket, deadline_after};

use backlog::Backlog;
use buffers::{RETAIN_MAX, with_buffers, with_thread_frame};
use envelope::{Envelope, Kind};
use failure::Failure;
use lane::Lane;
pub(crate) use lane::pipes;
use reader::Queued;
pub(crate) use serving::Replier;
use serving::keep_buffer;

/// A connection to a peer process, over which both ends call each other's interfaces.
///
/// Cloning is cheap and clones share the connection: hand one to each thread that calls, and
/// one to each thread that serves. The socket closes when the last clone is dropped.
///
/// # Threads
///
/// A connection has no thread of its own: whichever thread waits on it (a caller waiting for
/// its reply, a thread in [`Connection::run`] or [`Connection::serve`] waiting for requests)
/// reads the socket and routes what comes, a reply to its caller, a request to a serving
/// thread. Requests run only on serving threads, never on a thread waiting for a reply, so
/// an end the peer calls or sends `#[oneway]` messages to (a host taking a worker's
/// callbacks, say) must have a thread in `run` or `serve` (or
/// [`Server::serve`](crate::Server::serve)): [`Connection::add_service`] alone runs nothing
/// (oneways dropped unrun for that when the connection goes are said on stderr).
/// It needs as many serving threads as calls may nest (one call at a time per thread),
/// added up over the calls in flight at once: `n` threads of the peer's each calling into a
/// chain that nests `k` handlers deep at this end hold `n * k` of its threads.
/// Oneway messages run one at a time, in the order sent, and a call runs only once the
/// oneways that arrived before it have run. When the peer hangs up or dies, every waiting
/// caller gets [`Error::Disconnected`] at once, and the peer's calls that have not started
/// never run (their replies could go nowhere): they are dropped, their fds closed, while its
/// oneway messages still run, in order. A handler already running runs to its end, and so
/// does a call a serving thread read before it could see the hang-up, at most one per
/// thread. A peer that shut only its sending side (`shutdown(SHUT_WR)`) still reads: its
/// calls run and are answered, until a reply finds that it has gone since, which drops the
/// calls still queued.
///
/// # What a peer can make this end hold
///
/// Requests waiting for a serving thread are bounded per connection: at most 1,024
/// requests, 32 MiB of message buffers, or 4,096 fds (one request is always taken, whatever
/// its size). At those bounds serving threads stop reading, so the peer's sends wait until
/// a serving thread takes a request. A caller waiting for its reply reads on, since its
/// reply may come after more requests: up to twice the bounds, then it ends the connection
/// with [`Error::Malformed`]. If no thread serves the connection at all, a caller that finds the
/// bounds reached ends it at once, and the requests held are dropped with their fds. Once
/// the peer has gone for good, what it left in the socket (which its send buffer bounds) is
/// read to its end, past both, if a thread serves. The async flavour applies the same bounds.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

/// A [`Connection`] held without keeping it open ([`Connection::downgrade`]).
pub(crate) struct WeakConnection(std::sync::Weak<Shared>);

impl WeakConnection {
    /// The connection, unless every [`Connection`] handle of it is gone.
    pub(crate) fn upgrade(&self) -> Option<Connection> {
        self.0.upgrade().map(|shared| Connection { shared })
    }
}

/// Decides whether a peer may call a method: `Err(reason)` refuses the call.
pub type Authorizer =
    dyn Fn(Option<&PeerCredentials>, &InterfaceInfo, u32) -> Result<(), String> + Send + Sync;

/// Everything a connection's clones share.
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
    /// Set once `State::closed` is, so a caller can fail before it encodes, without the lock.
    ended: AtomicBool,
    /// This end stopped reading ([`Connection::stop_reading`]), for the traced line saying
    /// why the connection ended. Not under the lock: `stop_reading` may be called from
    /// anywhere, a service's `Drop` too.
    stopped_reading: AtomicBool,
    /// [`Connection::shut_down`]: the peer is told so (once) as the drain ends, before
    /// the socket shuts.
    says_shut_down: AtomicBool,
    trace: bool,
    /// How traced lines name the connection.
    name: trace::Name,
    /// Large byte strings through shared memory.
    lane: Lane,
    /// Held by a test to hold up the reader's receive (`Connection::hold_receive`).
    #[cfg(test)]
    receive_gate: Mutex<()>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.trace {
            self.say_end_on_drop();
        }
        // No thread is left to run them (nor serves: it would hold a clone).
        let oneways = std::mem::take(&mut self.state.get_mut().oneways);
        self.say_oneways_unrun(oneways.iter());
    }
}

/// What a connection serves: the services, by interface, and who may call them.
#[derive(Clone, Default)]
struct Registry {
    /// Each with its interface, read once here rather than through `dyn` per request.
    services: Vec<(&'static InterfaceInfo, Arc<dyn Service>)>,
    authorizer: Option<Arc<Authorizer>>,
}

/// What the threads using a connection share, under one lock.
#[derive(Default)]
struct State {
    /// A thread is receiving.
    reading: bool,
    /// The socket's receive state (a message part-way in), taken out by the thread with the
    /// reader role for its receive and put back as it takes the lock again: the role already
    /// serialises receives, so the socket's receive lock, two atomic read-modify-writes a
    /// message, is not taken ([`Socket::recv_with_state`]).
    recv: RecvState,
    /// How many times the reader role was let go (wrapping): a thread waiting to send tells
    /// by it whether the reader it waits for has taken a message since it looked.
    releases: u64,
    /// The reader's buffer, reused from one message to the next.
    buffer: Frame,
    /// Calls waiting for replies, by cookie; `Some` once the reply is in.
    pending: HashMap<u64, Option<Result<Frame>>, BuildHasherDefault<CookieHasher>>,
    /// Calls for a serving thread to run, in the order they arrived.
    calls: VecDeque<Queued>,
    /// Oneway messages, run one at a time in order.
    oneways: VecDeque<Queued>,
    /// The fds of messages nothing took, closed by the reader that read them once it lets
    /// the lock go (`Shared::close_unclaimed`): closing one may wait for the peer.
    unclaimed: Vec<std::os::fd::OwnedFd>,
    /// Failures owed for calls this end could not receive (over its limits, or their fds
    /// dropped), taken in by a caller reading for its reply, that could not go out at once: a
    /// serving thread sends them, as it would a reply, so that the caller never waits for a
    /// peer that does not read.
    owed: VecDeque<(Envelope, Failure)>,
    /// What the requests in `calls` and `oneways` hold (see [`backlog`]).
    backlog: Backlog,
    /// What keeps the read side open while this end drains ([`Connection::stop_reading`]),
    /// with `backlog`: one for each request of the peer's taken from the queue or handed to a
    /// runner by its read, and each failure owed taken from `owed`, until it has finished;
    /// and one until this end drains. So it reaches 0 only while draining, with the last
    /// request's finish, which then needs no other test on its path (the server's hot one).
    holds: usize,
    /// This end stopped reading with a thread serving ([`Connection::stop_reading`]): it
    /// reads on only for the replies its handlers in flight wait for, drops the requests it
    /// reads meanwhile, and shuts its read side once the last in flight has finished.
    draining: bool,
    oneway_running: bool,
    /// Oneway messages that arrived, and that have run.
    oneways_arrived: u64,
    oneways_run: u64,
    /// Threads asleep on `wake`: a notify costs a futex syscall, so only wake if any.
    waiters: usize,
    /// The eventfd of a thread waiting to send that waits for the reader to let the role go
    /// (or, at the bounds of the request queue, for a request to leave it) and, meanwhile,
    /// for room (see [`Shared::wait_for_room`]): woken with the others (it counts among
    /// `waiters`).
    sender_wake: Option<Arc<nix::sys::eventfd::EventFd>>,
    /// The eventfd of a caller waiting for room at the bounds of the request queue that
    /// watches the socket for the peer's hang-up meanwhile (see
    /// `Shared::sleep_watching_for_hang_up`): woken with the others (it counts among
    /// `waiters`).
    hang_up_watch: Option<Arc<nix::sys::eventfd::EventFd>>,
    /// Threads inside `run`.
    runners: usize,
    /// A [`Server`](crate::Server) is setting up the threads that will serve this connection
    /// (making its services, starting the threads), which may not be in `run` yet: what they
    /// will read is to be served, and what others read meanwhile waits for them, as for
    /// threads in `run` (past the bounds of the queue too, up to `HARD_FACTOR` times them).
    runners_coming: bool,
    /// The cookie of the last call made.
    next_cookie: u64,
    /// Why the connection ended; once set, it stays.
    closed: Option<Error>,
    /// This end closed the connection ([`Connection::close`]): no request runs from then on,
    /// and those read after it are dropped.
    closed_here: bool,
    /// This side is killing the worker at the other end
    /// ([`Closer::killing`](crate::worker::Closer::killing)): its hang-up is this side's doing.
    killed_here: bool,
    /// [`Shared::warn_unserved`] has said that a call of the peer's waits here for a serving
    /// thread while a call of this end's waits for its reply, and none serves: once is
    /// enough.
    unserved_said: bool,
    /// The traced line saying why the connection ended, until a thread that let the lock go
    /// prints it ([`Shared::say_end`]): said under the lock, it would wait for stderr's
    /// lock, whose holder may be waiting for this connection.
    end_unsaid: Option<String>,
}

impl State {
    /// Whether the reader drops the requests it reads rather than queue or run them: this end
    /// closed the connection, or drains ([`Connection::stop_reading`]).
    #[inline]
    fn drops_requests(&self) -> bool {
        self.closed_here || self.draining
    }
}

impl Connection {
    /// A connected pair, for two threads or for a parent and the child it forks.
    pub fn pair() -> Result<(Connection, Connection)> {
        let (a, b) = Socket::pair()?;
        Ok((Connection::new(a), Connection::new(b)))
    }

    /// Connects to a [`Listener`](crate::Listener) bound to `path`.
    ///
    /// The errors are the kernel's, as [`Error::Io`] of the errno's kind, whose message names
    /// `path` (`connecting to /run/app.sock: No such file or directory (os error 2)`):
    /// `NotFound` (`ENOENT`), nothing at `path`; `ConnectionRefused` (`ECONNREFUSED`), a
    /// socket file nothing listens on, left by a listener that died (the next
    /// [`Listener::bind`](crate::Listener::bind) of it replaces it); `PermissionDenied`
    /// (`EACCES`), the socket file's mode does not let this user write it, which the
    /// listener's owner widens if this user is to be served. A client a server turns away
    /// ([`Server::admit`](crate::Server::admit),
    /// [`Server::max_clients`](crate::Server::max_clients)) connects without error: its
    /// first call fails with [`Error::Refused`], saying why.
    pub fn connect(path: impl AsRef<Path>) -> Result<Connection> {
        Ok(Connection::new(Socket::connect(path)?))
    }

    /// Connects to a [`Listener`](crate::Listener) bound to an abstract name. Its errors are
    /// [`Connection::connect`]'s; a client the server turns away (`admit`, `max_clients`)
    /// connects without error, and its first call fails with [`Error::Refused`].
    pub fn connect_abstract(name: impl AsRef<[u8]>) -> Result<Connection> {
        Ok(Connection::new(Socket::connect_abstract(name)?))
    }

    /// [`Connection::connect`], waiting at most `timeout` while the listener's queue of
    /// clients not yet accepted is full (a service that stopped accepting, with many clients
    /// queued), then failing with [`Error::TimedOut`]; `connect` waits for good. Async:
    /// `AsyncConnection::connect_timeout`.
    pub fn connect_timeout(path: impl AsRef<Path>, timeout: Duration) -> Result<Connection> {
        Ok(Connection::new(Socket::connect_timeout(path, timeout)?))
    }

    /// [`Connection::connect_abstract`], waiting at most `timeout` as
    /// [`Connection::connect_timeout`] does.
    pub fn connect_abstract_timeout(
        name: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Connection> {
        Ok(Connection::new(Socket::connect_abstract_timeout(
            name, timeout,
        )?))
    }

    /// Runs a connection over `socket`. Set `TYPED_IPC_DEBUG=1` in the environment to have
    /// every message printed to stderr. A message the socket had half received is finished by
    /// the connection; from now on the connection owns the socket's stream
    /// ([`Connection::socket`]).
    pub fn new(socket: Socket) -> Connection {
        Connection::to(socket, None)
    }

    /// [`Connection::new`], to the worker `worker` if this process spawned it.
    pub(crate) fn to(socket: Socket, worker: Option<u32>) -> Connection {
        let peer = socket.peer_credentials().ok().map(|c| c.of_worker(worker));
        let limits = socket.limits();
        // With a message part-way in, if the socket was received on before.
        let recv = socket.take_recv_state();
        let lane = Lane::new(limits.max_message_len, limits.max_fds)
            .with_max_shared_len(limits.max_shared_len)
            .with_max_send_len(limits.send_len())
            .with_max_send_fds(limits.send_fds())
            .telling_max_fds();
        let connection = Connection {
            shared: Arc::new(Shared {
                socket,
                peer,
                state: Mutex::new(State {
                    holds: 1, // until this end drains
                    recv,
                    ..State::default()
                }),
                wake: Condvar::new(),
                registry: Mutex::new(Arc::new(Registry::default())),
                registry_version: AtomicU64::new(0),
                ended: AtomicBool::new(false),
                stopped_reading: AtomicBool::new(false),
                says_shut_down: AtomicBool::new(false),
                trace: trace::enabled(),
                name: trace::Name::next(worker, peer.as_ref()),
                lane,
                #[cfg(test)]
                receive_gate: Mutex::new(()),
            }),
        };
        if connection.shared.lane.tells_max_fds() {
            connection.shared.tell_max_fds();
        }
        connection
    }

    /// The peer's credentials, as the kernel recorded them when the connection was made. For
    /// a worker this process spawned ([`Worker::spawn`](crate::worker::Worker::spawn)): the
    /// worker's pid, and the uid and gid it started with, which were this process's (the
    /// kernel records a socket pair's creator for both ends; a worker that changes its
    /// credentials later is not seen).
    pub fn peer_credentials(&self) -> Option<PeerCredentials> {
        self.shared.peer
    }

    /// The underlying socket: for what it says of the connection ([`Socket::limits`],
    /// [`Socket::peer_credentials`]) and for [`Socket::set_spin`]. Its send and receive
    /// methods must not be used on a connection that reads or sends: the connection owns the
    /// stream. A message received there is one the connection never sees (a caller may wait
    /// for it for good), and one half received there is not finished by the connection, whose
    /// reader keeps its own receive state ([`Connection::new`] takes over only what the socket
    /// had received before it became a connection).
    pub fn socket(&self) -> &Socket {
        &self.shared.socket
    }

    /// Holds up the reader's receive until the guard is dropped: a thread with the reader
    /// role waits for it before it takes anything out of the socket.
    #[cfg(test)]
    pub(crate) fn hold_receive(&self) -> impl Sized + '_ {
        self.shared.receive_gate.lock()
    }

    /// How traced lines name this connection.
    pub(crate) fn trace_name(&self) -> trace::Name {
        self.shared.name
    }

    /// Trusts the peer with pipes, both ways: it may copy this end's large call arguments
    /// (`Vec<u8>` and [`SharedBytes`](crate::SharedBytes) of 128 KiB to 1 MiB) straight out
    /// of this process's pages, through a pipe, one copy instead of two (1 MiB: 2.1–2.9x a
    /// `memcpy` instead of 3.7–3.9x); and this end reads the pipes the peer lends it. Calls
    /// pipe only between two ends that both turned this on (each tells the other, in a
    /// short message sent now); a piped string from a peer this end does not trust fails
    /// its call. Off by default, because it is only safe with a peer you trust: a peer can
    /// keep references to the pages it was lent (`tee(2)` duplicates them into a pipe of
    /// its own) and read, at any later time, whatever this process then stores in the same
    /// bytes of memory after the allocator reuses them; and a peer whose pipe this end reads
    /// can hold the pipe's lock (a `splice` into it that sleeps) and keep the reading thread
    /// waiting, where not even `SIGKILL` ends it, for as long as it likes (as a peer that
    /// reads this end's pipe can keep the thread that pipes the next string, or drops the
    /// connection, waiting). So turn it on between a worker and its parent that trust each
    /// other, say, never towards an untrusted side. Turned off, the peer's strings piped
    /// before it heard so fail their calls; the pipe it lent stays open, unread, until the
    /// connection goes (then closed off your threads, by typed-ipc's closer). See
    /// `docs/benchmarks-bulk.md`.
    pub fn lend_pages_to_peer(&self, lend: bool) {
        if let Some(announcement) = self.shared.lane.lend_pages(lend) {
            // A peer already gone shows on the connection itself.
            let sent = self.shared.send(&Envelope::announce(), &announcement, None);
            match sent {
                Ok(_) if self.shared.trace => trace::announce_pipes(&self.shared.name, lend),
                Err(e) => self.shared.announce_unsent(&e),
                Ok(_) => {}
            }
        }
    }

    /// Gives back the shared memory this end's large byte strings go through, now rather
    /// than when the connection ends, and tells the peer to unmap it too (in a short message
    /// sent now). Returns its size in bytes: 0 if this end holds none, or while the peer has
    /// not acknowledged the last large string this end sent (also one piped or written into
    /// its memory), or a message that carries one is still on its way out. The peer
    /// acknowledges in the next message it sends: a call's reply does, so try again once the
    /// call has returned; after a oneway message, or a reply this end sent, only once the
    /// peer sends something. A call given up on (timed out, its future dropped) is not
    /// answered: the peer acknowledges its string in a short message of its own once it has
    /// dropped the request (or in the reply it sends all the same, if the call ran on), which
    /// may come after its replies to later calls. Only a message the peer sends once it is done
    /// with that request is sure to carry the acknowledgement. The next large string makes a
    /// new region. The message waits
    /// for room in the socket like any other; a peer already gone shows on the connection
    /// itself, and the memory is given back all the same.
    ///
    /// A connection keeps its region between strings, so that their pages are allocated
    /// once. It grows with the largest string sent (a power of two, up to 32 MiB), and
    /// shrinks on its own only when a string of a quarter of its size or less is placed ten
    /// seconds or more after the last larger one: call this once a burst of large strings is
    /// over and the connection goes on without them. Strings written into the peer's memory
    /// or piped do not use the region.
    pub fn release_shared_memory(&self) -> usize {
        let Some(retired) = self.shared.lane.retire_region() else {
            return 0;
        };
        if let Some(announcement) = retired.announcement {
            let sent = self.shared.send(&Envelope::announce(), &announcement, None);
            match sent {
                Ok(_) if self.shared.trace => {
                    trace::announce_retired(&self.shared.name, retired.len, retired.older);
                }
                Err(e) => self.shared.announce_unsent(&e),
                Ok(_) => {}
            }
        }
        retired.len
    }

    /// Lets the peer write byte strings of 256 KiB to 1 MiB straight into this process's
    /// memory, one copy instead of two (1 MiB: ~1.8x a `memcpy` instead of ~3.5x): this end
    /// keeps a 1 MiB buffer ready for the next such string and tells the peer, in one short
    /// message sent now, where to find it. The peer writes only if it was given the right to
    /// ([`Connection::write_into_peer`]) and the kernel lets it (`process_vm_writev`: it may
    /// `ptrace` this process).
    ///
    /// Only for a peer you trust with this process's memory, such as the parent that
    /// started this worker ([`worker::connection`](crate::worker::connection) calls this):
    /// the strings it says it wrote are taken as written. The peer gets no access to this
    /// process beyond what the kernel already gave it, and none to memory other than the
    /// buffer through this connection. When the connection is dropped the buffer's pages
    /// go back to the kernel, but its address range (1 MiB) is never reused: a write under
    /// way at that moment must not land in memory the allocator has handed out since.
    /// See [`peer_memory`](crate::peer_memory).
    ///
    /// Fails with [`Error::TooLarge`] if this side's
    /// [`Limits::max_send_len`](crate::Limits::max_send_len) leaves no room for the message.
    pub fn accept_writes_from_peer(&self) -> Result<()> {
        // No inbox made for nothing: over this side's limits
        // ([`Limits::max_send_len`](crate::Limits::max_send_len)), the announcement could
        // never go out.
        let socket = &self.shared.socket;
        socket
            .check_outgoing(envelope::ANNOUNCE_LEN, 0)
            .inspect_err(|e| self.shared.announce_unsent(e))?;
        let announcement = self.shared.lane.accept_writes()?;
        self.shared
            .send(&Envelope::announce(), &announcement, None)?;
        if self.shared.trace {
            trace::announce(&self.shared.name);
        }
        Ok(())
    }

    /// Writes this end's byte strings of 256 KiB to 1 MiB straight into `memory`, the
    /// peer's, once the peer accepts that ([`Connection::accept_writes_from_peer`]).
    /// [`Worker::spawn`](crate::worker::Worker::spawn) does this for its worker's
    /// connection. If a write ever fails (the peer gone, or not this process's to write),
    /// the connection goes back to the shared region for good.
    pub fn write_into_peer(&self, memory: PeerMemory) {
        self.shared.lane.write_into_peer(memory);
    }

    /// Whether the connection has ended (peer gone, closed, or a protocol error). A peer
    /// counts as gone as soon as its end of the socket is closed (a worker that exited or was
    /// killed) or shut both ways, before any thread waiting on the connection has read that
    /// far: this asks the kernel (one `poll`) unless the connection already knows. What the
    /// peer sent before it went may still be unread then: a thread in [`Connection::run`]
    /// still runs its requests.
    pub fn is_closed(&self) -> bool {
        // The poll with the lock let go.
        let known = self.shared.state.lock().closed.is_some();
        known || self.shared.socket.has_ended()
    }

    /// Ends the connection: the peer sees a hang-up, and every thread waiting on this
    /// connection returns ([`Error::Disconnected`] for callers, `Ok` from `serve`). Requests
    /// of the peer's that have not started never run: those waiting in the queue for a
    /// serving thread are dropped at once, the fds they carry handed to typed-ipc's closer
    /// (its threads close them: the guide, "slow closes"), and those still unread
    /// in the socket are dropped if a thread waiting on the connection reads them, or else go
    /// with the socket when the last clone is dropped. Handlers already running finish (their
    /// replies fail), and each serving thread returns once its own is done. (When the peer
    /// hangs up instead, its calls not started are dropped too, while the oneway messages it
    /// sent before still run, in order: see [`Connection`]; after
    /// [`Connection::stop_reading`], the requests received by then run, and those still
    /// unread in the socket too if no thread was in [`Connection::run`]: see there.)
    pub fn close(&self) {
        let (calls, oneways, served) = self.shared.close_here();
        let _ = self.shared.socket.shutdown();
        if !served {
            self.shared.say_oneways_unrun(oneways.iter());
        }
        for mut queued in calls.into_iter().chain(oneways) {
            queued.frame.discard_fds(); // their fds to the closer
        }
        if self.shared.trace {
            // Once the socket is shut down: a caller reading it, which may hold stderr's
            // lock, has its answer first.
            self.shared.say_end_unlocked();
        }
    }

    /// [`Connection::close`], for a [`Worker`](crate::worker::Worker) to call once its child
    /// is gone, holding the connection weakly meanwhile.
    pub(crate) fn closer(&self) -> crate::worker::Closer {
        let shared = Arc::downgrade(&self.shared);
        let killed = shared.clone();
        crate::worker::Closer::new(
            move || {
                if let Some(shared) = shared.upgrade() {
                    let _ = shared.socket.shutdown();
                }
            },
            move || {
                if let Some(shared) = killed.upgrade() {
                    shared.state.lock().killed_here = true;
                }
            },
        )
    }

    /// Holds the registry's lock: a thread about to serve waits on it before it reads.
    #[cfg(test)]
    pub(crate) fn test_hold_registry(&self) -> impl Drop + '_ {
        self.shared.registry.lock()
    }

    /// Makes this thread one of this connection's handlers as far as its calls can tell (a
    /// call back into the peer reads past the bounds), until the scope is dropped.
    #[cfg(test)]
    pub(crate) fn test_handler_scope(&self) -> crate::service::CallerScope {
        crate::service::CallerScope::enter(None, Arc::as_ptr(&self.shared).cast())
    }

    /// Says that threads are being set up to serve this connection
    /// ([`State::runners_coming`]), before they are in [`Connection::run`].
    #[cold]
    #[inline(never)]
    pub(crate) fn runners_coming(&self) {
        self.shared.state.lock().runners_coming = true;
    }

    /// Takes [`Connection::runners_coming`] back: the threads will not come (making a
    /// service panicked), and what is read from now on is held for nobody, as before.
    #[cold]
    #[inline(never)]
    pub(crate) fn runners_not_coming(&self) {
        self.shared.state.lock().runners_coming = false;
    }

    /// A handle that does not keep the connection open: a listening [`Server`](crate::Server)
    /// keeps one of each client's, so that the connection goes (its socket, buffers and
    /// shared memory) as soon as its serving threads are done with it.
    pub(crate) fn downgrade(&self) -> WeakConnection {
        WeakConnection(Arc::downgrade(&self.shared))
    }

    /// Stops taking new requests, but keeps sending: requests already running finish and
    /// their replies go out. Serving threads return once they are done. Used for graceful
    /// shutdown.
    ///
    /// With a thread in [`Connection::run`] (or started for it by a listening
    /// [`Server`](crate::Server)), the requests received from then on are dropped,
    /// their callers told [`Error::Disconnected`] once the connection ends: those still unread
    /// in the socket too, which, run, could not have the answers to the calls their handlers
    /// make back into the peer. With none of the peer's requests in flight, the socket's read
    /// side is shut at once (the peer's sends fail). With some in flight (running, or queued
    /// for a serving thread), this end reads on until the last has finished, for the replies
    /// to those calls back (a service of [`Server::service_with`](crate::Server::service_with)
    /// calling its client). With no thread in `run` (nothing would run a request held for
    /// one), the read side is shut at once, and the requests still in the socket run if a
    /// thread comes (their calls back fail).
    pub fn stop_reading(&self) {
        self.shared.stopped_reading.store(true, Ordering::SeqCst);
        if !self.shared.drain() {
            let _ = self.shared.socket.shutdown_read();
        }
    }

    /// [`Connection::stop_reading`], telling the peer that this end has shut down: its calls not
    /// answered fail with [`Error::ShutDown`] rather than [`Error::Disconnected`], so that it knows
    /// they did not run and may send them elsewhere. The notice goes out once the requests in
    /// flight have finished and replied, and the socket then shuts both ways, not only its read
    /// side (this end sends nothing after its last word); every request read later is dropped
    /// unrun, and so is any still in the socket. A listening [`Server`](crate::Server) does this to
    /// each client as it shuts down; a worker that means to exit may do it to its parent (its `run`
    /// then returns `Ok(())` once the requests in flight have replied).
    ///
    /// Best effort, never waiting: the notice is not sent if the socket has no room at once or
    /// another thread's message is going out then, and the peer's calls then fail with
    /// `Disconnected`. Nor is it with no thread in [`Connection::run`] (the requests held would run
    /// if one came, as after `stop_reading`). A `#[oneway]` message sent before it may or may not
    /// have run.
    pub fn shut_down(&self) {
        self.shared.says_shut_down.store(true, Ordering::SeqCst);
        self.stop_reading();
    }

    /// Answers calls to `service`'s interface on this connection, from the threads that run
    /// [`Connection::run`]. Several interfaces can be served on one connection; serving an
    /// interface twice replaces the first. Interfaces are told apart by name (the trait's, or
    /// the one `#[interface(name = "...")]` gives), so two traits of one name need names of
    /// their own to be served side by side.
    ///
    /// Adding a service runs nothing: until a thread runs the connection, the peer's requests
    /// wait. A peer that calls back from inside a call of this end's then waits for a thread
    /// while this end waits for its reply; after two seconds of that, the waiting caller says
    /// so on stderr, once a connection (`tests/unserved_callbacks.rs`). Its oneways that a
    /// caller read while it waited are dropped unrun if the connection goes before a thread
    /// runs it, and that is said on stderr too (`tests/unserved_oneways.rs`); those still
    /// unread in the socket go with it unsaid. (The async flavour's `add_service` serves at
    /// once.)
    pub fn add_service(&self, service: impl Service) {
        let info = service.info();
        let service: Arc<dyn Service> = Arc::new(service);
        self.shared.update_registry(|registry| {
            registry.services.retain(|(served, _)| served.id != info.id);
            registry.services.push((info, service));
        });
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
        self.shared
            .update_registry(|registry| registry.authorizer = Some(Arc::new(authorize)));
    }

    /// Serves `service` on this thread until the peer hangs up ([`Connection::add_service`]
    /// then [`Connection::run`]). Returns `Ok(())` on a clean close.
    pub fn serve(&self, service: impl Service) -> Result<()> {
        self.add_service(service);
        self.run()
    }

    /// Serves `service` on a new thread ([`Connection::serve`] there), and returns the
    /// thread's handle: `join` it for what `serve` returned.
    ///
    /// Unlike spawning a thread that calls `serve`, this counts the new thread as serving from
    /// now on, not only once it runs. That matters to a call made right after: a peer that
    /// sends more requests than this end holds (1,024) while the call waits for its reply,
    /// oneways reporting progress say, would otherwise find nothing serving them if the new
    /// thread had not started yet (a loaded machine), and the call would end the connection
    /// as an end that serves nothing does ([`Error::Malformed`], "while nothing serves
    /// them"). Here the call stops reading at that bound instead, as with a thread serving,
    /// until the thread runs the requests.
    ///
    /// Fails with [`Error::Io`] only if the thread cannot be made; `service` stays added
    /// ([`Connection::add_service`]) for a thread that runs the connection. (A parent serving its
    /// worker's progress reports while it calls the worker: `tests/progress_during_a_call.rs`,
    /// `examples/parser_sandbox.rs`.)
    pub fn spawn_serve(
        &self,
        service: impl Service,
    ) -> Result<std::thread::JoinHandle<Result<()>>> {
        self.add_service(service);
        self.shared.state.lock().runners += 1; // the new thread's, counted from now on
        let connection = self.clone();
        std::thread::Builder::new()
            .name("typed-ipc serve".into())
            .spawn(move || {
                #[cfg(test)]
                before_run();
                connection.run_counted()
            })
            .map_err(|e| {
                self.runner_gone();
                Error::Io(e)
            })
    }

    /// Handles requests for the served interfaces on this thread, one at a time, until the
    /// connection ends. Returns `Ok(())` when the peer hung up (or shut down:
    /// [`Error::ShutDown`]) or [`Connection::close`] was called, and the error otherwise. Run
    /// it on several threads for concurrent requests.
    pub fn run(&self) -> Result<()> {
        self.shared.state.lock().runners += 1;
        self.run_counted()
    }

    /// [`Connection::run`] on a thread already counted among the runners.
    fn run_counted(&self) -> Result<()> {
        let result = self.run_loop();
        self.runner_gone();
        result
    }

    /// A thread counted among the runners is gone (or never came: [`Connection::spawn_serve`]
    /// could not make it).
    fn runner_gone(&self) {
        let shared = &*self.shared;
        let mut state = shared.state.lock();
        state.runners -= 1;
        // A caller may wait for room for this runner to make.
        shared.wake_all(&state);
        if state.runners == 0 && state.closed.is_some() {
            drop(state);
            // Nothing will be served any more: drop the implementations now, which also
            // breaks the cycle when one of them holds a clone of this connection.
            shared.update_registry(|registry| registry.services.clear());
        }
    }

    /// Calls method `cmd` of interface `iface` with `args` and waits for the reply, at most
    /// `timeout` if one is given. This is what generated client stubs call.
    ///
    /// A call whose timeout passes after its request went out tells the peer that it gave up
    /// (a cancel message; one try, after the timeout, not sent if the socket has no room at
    /// once): a blocking peer then drops the call if it is still queued (it reads the
    /// cancel only while one of its threads reads: a peer serving on one thread, busy with
    /// the call before it, runs this one first), and runs on a handler already running (it
    /// cannot be interrupted); an async peer drops the call unrun, or its handler's future.
    /// Either sends no reply, and a reply that crossed the cancel is dropped here.
    ///
    /// A request over this side's [`Limits`](crate::Limits) (the socket's) fails with
    /// [`Error::TooLarge`] or [`Error::TooManyFds`] before any of it is sent, and a reply
    /// over them fails this call the same way: either way the connection stays usable.
    pub fn call<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        iface: &'static InterfaceInfo,
        cmd: u32,
        args: &A,
        timeout: Option<Duration>,
    ) -> Result<R> {
        let shared = &*self.shared;
        let deadline = timeout.and_then(deadline_after);
        let envelope = Envelope {
            kind: Kind::Call,
            cmd,
            cookie: 0, // set once the message is encoded (below)
            interface: iface.id,
            signature: iface.signature,
        };
        // An ended connection fails the call before its arguments are encoded (a byte string
        // among them could be written into the peer or a region for nothing).
        shared.check_open()?;
        let traced = trace::described(shared.trace, args);
        // `Some` with the reader role taken, and the receive state taken with it.
        let (mut cookie, mut reads) = (0, None);
        // Encoded before this thread takes the reader role: encoding may write a byte string
        // into the peer's memory (`peer_memory`), which a hostile peer can make slow, and
        // nobody else's reply may wait for that.
        let placed = shared.encode_and(&envelope, args, |buf, fds| {
            // A caller that finds nobody reading becomes the reader before it sends: then its
            // reply can reach nobody else, so it needs no slot in `pending` and no lock
            // between its send and its receive, and it receives into a buffer of its thread's
            // (the lone caller's path: one lock to start, one to end).
            reads = {
                let mut state = shared.state.lock();
                if let Some(closed) = &state.closed {
                    return Err(closed.duplicate());
                }
                state.next_cookie += 1;
                cookie = state.next_cookie;
                // (At the queue's bounds it receives one message past them before it looks,
                // in `read_own`, and then waits for room as any caller does: not worth a
                // look on every call.)
                if state.reading {
                    // Registered before sending: the reply may come back before the send
                    // returns.
                    state.pending.insert(cookie, None);
                    None
                } else {
                    state.reading = true;
                    Some(std::mem::take(&mut state.recv))
                }
            };
            envelope::set_cookie(&mut buf[envelope::FRAMED_AT..], cookie);
            trace::outgoing(
                &shared.name,
                &Envelope { cookie, ..envelope },
                iface,
                traced.as_deref(),
            );
            if let Some(recv) = reads.take() {
                // A reader that waits to send gives the role back first: the wait reads only
                // with the role free for it to take (`wait_for_room`).
                let acknowledge = |payload: &mut [u8]| shared.acknowledge_in(payload);
                match shared.socket.try_send_framed(buf, fds, acknowledge) {
                    Ok(true) => {
                        reads = Some(recv);
                        return Ok(true);
                    }
                    // It would have had to wait: give the role back, then send as any caller
                    // (the message as it is encoded).
                    Ok(false) => shared.stop_reading(Some(cookie), recv),
                    Err(e) => {
                        shared.stop_reading(None, recv);
                        return Err(e);
                    }
                }
            }
            shared
                .send_framed(buf, fds, deadline)
                .map(|()| true)
                .inspect_err(|_| {
                    shared.state.lock().pending.remove(&cookie);
                })
        });
        let placed = placed
            .map_err(|e| shared.why_call_unsent(e, deadline, traced.as_ref().map(|_| cookie)))?
            .expect("the call's send sends the whole message or fails");
        let finish = |frame: &mut Frame| {
            shared.lane.after_reply(placed, frame);
            let result = decode_reply(frame, iface, cmd, &shared.lane);
            shared.lane.finished(&frame.payload);
            result
        };
        // A reply another thread read for this one comes in a frame of the connection's.
        let finish_routed = |mut frame: Frame| {
            let result = finish(&mut frame);
            shared.recycle(frame);
            result
        };
        if let Some(recv) = reads {
            return with_thread_frame(|frame| {
                match shared.read_own(cookie, recv, deadline, frame)? {
                    None => finish(frame),
                    Some(routed) => finish_routed(routed),
                }
            });
        }
        finish_routed(shared.wait_reply(cookie, deadline)?)
    }

    /// Sends a oneway message to method `cmd` of interface `iface`: returns once it is sent,
    /// and gets no reply. This is what generated client stubs of `#[oneway]` methods call.
    ///
    /// Sending waits while the peer's socket buffer is full, which it is when the peer has
    /// stopped reading (its serving threads all busy, say): with a `timeout`, for at most that
    /// long, then it fails with [`Error::TimedOut`]. A message that fits one datagram (up to
    /// 64 KiB and 253 fds) is then not sent at all, and the connection goes on as before. A
    /// larger one whose first part had already gone out cannot be taken back, and the peer
    /// must not be left holding a fragment: the connection is shut down before `TimedOut` is
    /// returned (the peer sees a hang-up, never a partial message), as for a
    /// [`Connection::call`] whose request could not be sent in time. The timeout also bounds
    /// the wait for another thread's message on this connection to finish going out first
    /// (sends are serialised).
    ///
    /// A message over this side's [`Limits`](crate::Limits) fails as in [`Connection::call`],
    /// unsent.
    pub fn oneway<A: Serialize + ?Sized>(
        &self,
        iface: &'static InterfaceInfo,
        cmd: u32,
        args: &A,
        timeout: Option<Duration>,
    ) -> Result<()> {
        let deadline = timeout.and_then(deadline_after);
        let envelope = Envelope {
            kind: Kind::Oneway,
            cmd,
            cookie: 0,
            interface: iface.id,
            signature: iface.signature,
        };
        // No early check of an ended connection here: after `stop_reading` it has ended for
        // calls, but still sends.
        // Described before the send (as everywhere: see `trace::described`), printed
        // once it went out, as in the async flavour: a oneway that was not sent is not said.
        let traced = trace::described(self.shared.trace, args);
        // A byte string the message placed in the lane goes back to it if the send fails
        // (`encode_and`).
        match self.shared.send(&envelope, args, deadline) {
            Ok(_) => {
                trace::outgoing(&self.shared.name, &envelope, iface, traced.as_deref());
                Ok(())
            }
            Err(e) => Err(self.shared.why_unsent(e, deadline)),
        }
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
    /// [`Connection::new`]. The async flavour has no `From`: its `AsyncConnection::new`
    /// fails outside a runtime.
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
    /// `Err` with why the connection ended, if it has.
    #[inline]
    fn check_open(&self) -> Result<()> {
        if self.ended.load(Ordering::Acquire) {
            return Err(self.why_ended());
        }
        Ok(())
    }

    /// Why the connection ended (out of line: kept off the call path).
    #[cold]
    #[inline(never)]
    fn why_ended(&self) -> Error {
        self.state
            .lock()
            .closed
            .as_ref()
            .map_or(Error::Disconnected, Error::duplicate)
    }

    /// Encodes envelope + body in this thread's buffer and sends them as one message,
    /// waiting for room as long as it takes (or until `deadline`). Returns the lane placement
    /// the message carries (0: none).
    #[inline]
    fn send<A: Serialize + ?Sized>(
        &self,
        envelope: &Envelope,
        body: &A,
        deadline: Option<Instant>,
    ) -> Result<u32> {
        self.encode_and(envelope, body, |buf, fds| {
            self.send_framed(buf, fds, deadline).map(|()| true)
        })
        .map(|placed| placed.expect("a waiting send sends the whole message or fails"))
    }

    /// Tells the peer how many fds this end accepts, as the connection starts, if the lane
    /// does ([`Lane::telling_max_fds`]). Not if this side's limits leave no room for the
    /// message: the peer then sends every large byte string inline. If the socket has no
    /// room at once (one used before, whose peer does not read: `Connection::new` must not
    /// wait on it), the announcement is owed ([`Lane::owe_max_fds`]), and the next message
    /// this end sends tries again first ([`Shared::acknowledge_in`]).
    #[cold]
    fn tell_max_fds(&self) {
        if let Err(e) = self.socket.check_outgoing(envelope::ANNOUNCE_LEN, 0) {
            if self.trace {
                trace::max_fds_unsent(&self.name, &e);
            }
            return;
        }
        self.lane.owe_max_fds();
        // No other thread has the connection yet: the send lock is free.
        self.socket
            .try_locked(|| self.lane.tell_owed(|framed| self.send_owed(framed)));
    }

    /// Writes this end's lane word into the outgoing message whose payload (envelope first)
    /// is `payload`, under the send lock ([`Lane::acknowledge_in_telling`]): first sending the
    /// announcement of this end's fd limit if it is owed, which the message's word then
    /// follows in saying that this end reads lanes. Every blocking send stamps its message
    /// so.
    #[inline(always)]
    pub(super) fn acknowledge_in(&self, payload: &mut [u8]) {
        self.lane
            .acknowledge_in_telling(payload, |framed| self.send_owed(framed));
    }

    /// Sends the owed announcement of this end's fd limit, built in `framed`, if the socket
    /// has room now (never waiting: if it has none, the next message tries again); the
    /// caller holds the send lock. Whether it went out. An error (the peer gone) shows on
    /// the message being sent, or on the connection.
    #[cold]
    #[inline(never)]
    fn send_owed(&self, framed: &mut [u8]) -> bool {
        let sent = matches!(self.socket.send_framed_now(framed), Ok(true));
        if sent && self.trace {
            // A trace line never waits: said under the send lock all the same.
            trace::announce_max_fds(&self.name, self.socket.limits().max_fds);
        }
        sent
    }

    /// Says that an announcement of this end's lane could not go out, if `e` says it was
    /// over this side's limits and tracing is on (a peer gone shows on the connection).
    #[cold]
    #[inline(never)]
    fn announce_unsent(&self, e: &Error) {
        if self.trace && e.is_over_limits() {
            trace::announce_unsent(&self.name, e);
        }
    }

    /// Tells the peer that this end no longer waits for the reply to its call `cookie`
    /// ([`Kind::Cancel`]): one try, never waiting (the caller has waited its timeout out
    /// already), so not sent if the socket has no room at once or another thread's message
    /// is going out. A peer gone shows on the connection itself.
    #[cold]
    #[inline(never)]
    pub(super) fn send_cancel(&self, cookie: u64) {
        let sent = self.encode_and(&Envelope::cancel(cookie), &(), |buf, fds| {
            let acknowledge = |payload: &mut [u8]| self.acknowledge_in(payload);
            self.socket.try_send_framed(buf, fds, acknowledge)
        });
        if self.trace && matches!(sent, Ok(Some(_))) {
            trace::cancelled(&self.name, cookie);
        }
    }

    /// Encodes envelope + body in this thread's buffer and hands them to `send`, framed (see
    /// [`Lane::encode`]), which says whether it sent them. A placement the message carried
    /// goes back to the lane if not.
    fn encode_and<A: Serialize + ?Sized>(
        &self,
        envelope: &Envelope,
        body: &A,
        send: impl FnOnce(&mut [u8], &[BorrowedFd<'_>]) -> Result<bool>,
    ) -> Result<Option<u32>> {
        with_buffers(|buf, fds| {
            let placed = self.lane.encode(envelope, body, buf, fds)?;
            #[cfg(test)]
            between_encode_and_send();
            let sent = send(buf, fds);
            self.lane.sent(placed);
            match sent {
                Ok(true) => Ok(Some(placed)),
                unsent => {
                    self.lane.abort(placed);
                    unsent.map(|_| None)
                }
            }
        })
    }

    /// Keeps a received buffer for the next read, unless it is too big to hoard.
    fn recycle(&self, mut frame: Frame) {
        frame.clear();
        // Checked here too, so that a huge buffer is freed (unmapped) outside the lock.
        if frame.payload.capacity() <= RETAIN_MAX {
            keep_buffer(&mut self.state.lock(), frame);
        }
    }
}

/// The value (or the failure) a reply to method `cmd` of `iface` carries, reading byte
/// strings from `lane`: for both flavours. Only replies reach here, their envelope checked
/// when they were routed.
pub(crate) fn decode_reply<R: DeserializeOwned>(
    frame: &mut Frame,
    iface: &InterfaceInfo,
    cmd: u32,
    lane: &Lane,
) -> Result<R> {
    let failed = envelope::kind_byte(&frame.payload) == Some(Kind::Failure as u8);
    let body = &frame.payload[envelope::LEN..];
    if failed {
        let failure: Failure = codec::decode_from(body, &mut frame.fds)?;
        return Err(failure.into_error(iface, cmd));
    }
    codec::with_store(lane, || codec::decode_from(body, &mut frame.fds))
}

#[cfg(test)]
thread_local! {
    /// Run by this thread's next message once it is encoded and before it is sent: where the
    /// scheduler may stop a thread while others send, made to happen in a test.
    pub(crate) static BETWEEN_ENCODE_AND_SEND: std::cell::Cell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::Cell::new(None) };
}

/// Run by a thread [`Connection::spawn_serve`] made before it runs the connection, if a test
/// set it: a thread the scheduler has not started yet, made to happen in a test.
#[cfg(test)]
pub(crate) static BEFORE_RUN: Mutex<Option<Box<dyn FnOnce() + Send>>> = Mutex::new(None);

#[cfg(test)]
fn before_run() {
    let f = BEFORE_RUN.lock().take();
    if let Some(f) = f {
        f();
    }
}

#[cfg(test)]
pub(crate) fn between_encode_and_send() {
    if let Some(f) = BETWEEN_ENCODE_AND_SEND.take() {
        f();
    }
}

// A refused message keeps its envelope.
const _: () = assert!(envelope::LEN <= crate::socket::REFUSED_KEPT);

/// Why a message this side received as `e` (refused for its size, or its fds dropped by the
/// kernel) is not run: for a call, the failure its caller gets; for a oneway, what stderr
/// says. For both flavours.
pub(crate) fn unreceived(e: &Error, oneway: bool) -> Failure {
    match *e {
        // Worded for the caller, whose process is not the one at its limit, and whose
        // arguments' types are not in question (a `BadRequest` would say so).
        Error::FdsDropped { expected, received } if !oneway => Failure::Unanswered(format!(
            "it could not receive the request's fds ({received} of {expected} arrived): it \
             is at its open-file limit (RLIMIT_NOFILE), or a security module refused them, \
             and the method did not run"
        )),
        _ => Failure::over_limits(e).unwrap_or_else(|| Failure::Unanswered(e.to_string())),
    }
}

/// Hashes call cookies, which are this end's own sequential numbers: a multiply spreads them
/// over the table, and SipHash (the default) would only cost time on every call. A peer can
/// only look cookies up, not insert them, so it cannot grow a probe sequence.
#[derive(Default)]
pub(crate) struct CookieHasher(u64);

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
