//! What generated code plugs into a [`Connection`](crate::Connection): interface descriptions,
//! the [`Service`] trait servers implement, and the [`Call`] they answer.

use std::os::fd::OwnedFd;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, Bytes};
use crate::error::{Error, Result};
use crate::socket::PeerCredentials;

/// An interface as `#[interface]` saw it. Both ends compare these to make sure they speak the
/// same interface.
#[derive(Debug)]
pub struct InterfaceInfo {
    /// The interface's name: the trait's, or the one `#[interface(name = "...")]` gives.
    pub name: &'static str,
    /// [`fnv1a`] of `name`: how requests name their interface on the wire.
    pub id: u32,
    /// [`fnv1a`] of every method's id, name and signature: equal on both ends or the
    /// interface differs. With `#[interface(check_types)]`, the methods' [`MethodInfo::shape`]s
    /// are folded in too ([`shape::signature`](crate::shape::signature)).
    pub signature: u32,
    /// The methods, in declaration order.
    pub methods: &'static [MethodInfo],
}

/// One method of an [`InterfaceInfo`].
#[derive(Debug)]
pub struct MethodInfo {
    /// The method's name.
    pub name: &'static str,
    /// Its command id on the wire.
    pub cmd: u32,
    /// Its signature as written, e.g. `fn reverse(&self, text: String) -> String`.
    pub signature: &'static str,
    /// Whether it is `#[oneway]`: sent without waiting for a reply.
    pub oneway: bool,
    /// With `#[interface(check_types)]`, the hash of its parameters' and result's wire forms
    /// ([`shape::method`](crate::shape::method)), which names the method whose types differ
    /// when its text does not; 0 without (the types are not checked).
    pub shape: u64,
}

impl InterfaceInfo {
    /// The method with command id `cmd`.
    #[inline]
    pub fn method(&self, cmd: u32) -> Option<&'static MethodInfo> {
        // Command ids are the methods' positions unless `#[cmd]` says otherwise: look there
        // first, on every request's path.
        match self.methods.get(cmd as usize) {
            Some(method) if method.cmd == cmd => Some(method),
            _ => self.methods.iter().find(|m| m.cmd == cmd),
        }
    }
}

/// Panics if `adding` has the id of an interface in `served`: a server builder given two
/// services that the wire cannot tell apart would otherwise let the second replace the first
/// without a word.
pub(crate) fn assert_distinct<'i>(
    served: impl IntoIterator<Item = &'i InterfaceInfo>,
    adding: &InterfaceInfo,
    builder: &str,
) {
    if let Err(why) = distinct(served, adding, &format!("{builder}::service")) {
        panic!("{why}");
    }
}

/// Why `adding` may not join `served` (`method` names what added it), if it has the id of an
/// interface there: the message [`assert_distinct`] panics with.
pub(crate) fn distinct<'i>(
    served: impl IntoIterator<Item = &'i InterfaceInfo>,
    adding: &InterfaceInfo,
    method: &str,
) -> std::result::Result<(), String> {
    let Some(other) = served.into_iter().find(|s| s.id == adding.id) else {
        return Ok(());
    };
    // Two names of one hash are as indistinguishable as one name twice.
    let what = if other.name == adding.name {
        String::new()
    } else {
        format!(" (its name's hash is that of `{}`)", other.name)
    };
    Err(format!(
        "{method}: interface `{}` is already served{what}, and the wire cannot tell the two \
         apart (interfaces are known by name): give the traits names of their own with \
         #[interface(name = \"...\")], or serve each once",
        adding.name
    ))
}

/// FNV-1a, 32 bits: stable across builds and platforms, and usable in `const` items.
pub const fn fnv1a(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

/// The server side of one interface: what `#[interface]` generates as `<Trait>Server`.
///
/// The connection checks that a request names this interface, with the same signature, and a
/// command it has before it calls [`Service::handle`]; it turns a panic in `handle` into an
/// error reply for that call.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not serve a blocking `Connection`",
    label = "not a server of the blocking flavour",
    note = "a trait of `async fn`s has an async server, for an `AsyncConnection` \
            (`typed_ipc::tokio`); a trait of `fn`s has `<Trait>Server` for a `Connection`"
)]
pub trait Service: Send + Sync + 'static {
    /// The interface this service answers.
    fn info(&self) -> &'static InterfaceInfo;

    /// Handles one request: decodes its arguments with [`Call::args`], runs the
    /// implementation, and answers with [`Call::reply`] (not for oneway methods).
    fn handle(&self, call: &mut Call<'_>) -> Result<()>;
}

impl<S: Service + ?Sized> Service for std::sync::Arc<S> {
    fn info(&self) -> &'static InterfaceInfo {
        (**self).info()
    }
    fn handle(&self, call: &mut Call<'_>) -> Result<()> {
        (**self).handle(call)
    }
}

/// The call this thread is handling: its peer, and the connection it came on (only compared,
/// never read through; null outside a call).
#[derive(Clone, Copy)]
struct Caller {
    peer: Option<PeerCredentials>,
    connection: *const (),
}

thread_local! {
    static CALLER: std::cell::Cell<Caller> = const {
        std::cell::Cell::new(Caller {
            peer: None,
            connection: std::ptr::null(),
        })
    };
}

/// Inside an interface method while it handles a call: the credentials (pid, uid, gid) of the
/// process that made the call (for a worker this process spawned, see
/// [`Connection::peer_credentials`](crate::Connection::peer_credentials)). `None` outside a
/// call, or if the kernel gave none. (A thread
/// serving a connection of the blocking flavour names that connection's peer for as long as
/// it serves, between calls too: it sets it once, not per call.)
///
/// Implementations use it to decide per call; to refuse calls before they reach the
/// implementation, see [`Server::authorize`](crate::Server::authorize).
pub fn current_peer() -> Option<PeerCredentials> {
    CALLER.with(|c| c.get().peer)
}

/// Whether this thread is handling a call that came on `connection` (a pointer to the
/// connection's shared state, as given to [`CallerScope::enter`]; in the blocking flavour,
/// whether it serves that connection): a server shut down from a handler must not wait for
/// that handler's connection, and a call that a handler makes back to its own peer needs its
/// connection read past the bounds of what it holds (see
/// [`backlog`](crate::connection::backlog)).
pub(crate) fn handling_a_call_of(connection: *const ()) -> bool {
    CALLER.with(|c| std::ptr::eq(c.get().connection, connection))
}

/// Runs `f` on `imp` on tokio's blocking pool, with this call's [`current_peer`] (and
/// connection) current there too: how an async server answers with a blocking
/// implementation (`#[interface(async_server)]`). A panic in `f` resumes here, where the
/// serving code turns it into the caller's [`Error::Panicked`]. Once `f` is on the pool, the
/// peer's cancel no longer stops the call ([`on_the_pool`]): `f` runs to its end, as a
/// blocking server's handler does, and its call counts against the connection's bounds and
/// replies meanwhile (the caller drops the late reply).
#[cfg(feature = "tokio")]
#[doc(hidden)]
pub async fn run_blocking<T, R>(
    imp: std::sync::Arc<T>,
    slots: &PoolSlots,
    f: impl FnOnce(&T) -> R + Send + 'static,
) -> R
where
    T: ?Sized + Send + Sync + 'static,
    R: Send + 'static,
{
    // Taken before the method goes to the pool, so a call cancelled while it waits for a
    // slot is dropped unrun; held by the method, so a slot is free only once it has returned.
    let slot = match &slots.0 {
        Some(slots) => {
            let slots = std::sync::Arc::clone(slots);
            Some(
                slots
                    .acquire_owned()
                    .await
                    .expect("the slots are never closed"),
            )
        }
        None => None,
    };
    let Caller { peer, connection } = CALLER.with(|c| c.get());
    // The connection is only compared, never followed: its address is all that crosses.
    let connection = connection.addr();
    let task = tokio::task::spawn_blocking(move || {
        let _caller = CallerScope::enter(peer, std::ptr::without_provenance(connection));
        let _slot = slot;
        f(&imp)
    });
    ON_THE_POOL.with(|on| on.set(true));
    match task.await {
        Ok(value) => value,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Cancelled unrun: the runtime is shutting down, and drops this call with it.
        Err(_) => std::future::pending().await,
    }
}

/// How many methods of an async server of a blocking trait may run on tokio's blocking pool
/// at once (`max_running`): shared by the server and its clones. Unbounded, the pool's own
/// cap (`max_blocking_threads`) is the only one.
#[cfg(feature = "tokio")]
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct PoolSlots(Option<std::sync::Arc<tokio::sync::Semaphore>>);

#[cfg(feature = "tokio")]
impl PoolSlots {
    /// No cap of its own.
    pub fn unbounded() -> PoolSlots {
        PoolSlots(None)
    }

    /// At most `n` at once (at least one: with none, no method could ever run).
    pub fn new(n: usize) -> PoolSlots {
        let n = n.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        PoolSlots(Some(std::sync::Arc::new(tokio::sync::Semaphore::new(n))))
    }
}

#[cfg(feature = "tokio")]
thread_local! {
    /// Set by [`run_blocking`] once it has handed a method to the pool, in the poll of the
    /// handler that did; read by the task that runs the call ([`on_the_pool`]).
    static ON_THE_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the handler polled on this thread since the last ask handed its method to
/// tokio's blocking pool ([`run_blocking`]): its call then runs to its end whatever the peer
/// says. Dropping the handler's future on the peer's cancel would free the call's place in
/// the connection's bounds while the method, and the arguments and fds it took, live on: a
/// peer that cancels each call once it runs could pile up methods on the pool without bound.
#[cfg(feature = "tokio")]
pub(crate) fn on_the_pool() -> bool {
    ON_THE_POOL.with(|on| on.replace(false))
}

/// Sets [`current_peer`] (and, for the async flavour, `handling_a_call_of`) for the duration
/// of one call.
pub(crate) struct CallerScope(Caller);

impl CallerScope {
    pub(crate) fn enter(peer: Option<PeerCredentials>, connection: *const ()) -> CallerScope {
        CallerScope(CALLER.with(|c| c.replace(Caller { peer, connection })))
    }
}

impl Drop for CallerScope {
    fn drop(&mut self) {
        CALLER.with(|c| c.set(self.0));
    }
}

/// One request being handled by a [`Service`].
pub struct Call<'a> {
    pub(crate) cmd: u32,
    pub(crate) body: &'a [u8],
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) peer: Option<PeerCredentials>,
    /// `None` for oneway messages.
    pub(crate) replier: Option<crate::connection::Replier<'a>>,
    pub(crate) replied: bool,
    /// The arguments were refused as over this side's limits (a byte string sent out of
    /// the socket): the caller hears so as [`Error::TooLarge`]. Cleared if the handler
    /// goes on to reply (it ran) and its reply fails.
    pub(crate) unreceived: bool,
}

/// The command, whether it is oneway and the caller, as the async flavour's `AsyncCall` says
/// them (with its cookie), so that a service can log the calls it handles in either flavour.
impl std::fmt::Debug for Call<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("command", &self.cmd)
            .field("oneway", &self.is_oneway())
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Call<'_> {
    /// The command id of the method called.
    pub fn command(&self) -> u32 {
        self.cmd
    }

    /// Whether the caller waits for no reply.
    pub fn is_oneway(&self) -> bool {
        self.replier.is_none()
    }

    /// The caller's process credentials (pid, uid, gid), as the kernel recorded them for the
    /// connection.
    pub fn peer_credentials(&self) -> Option<PeerCredentials> {
        self.peer
    }

    /// Decodes the arguments, taking the fds that came with them. Fds not claimed are closed
    /// off this thread, by typed-ipc's closer (a peer's fd may be slow to close: the guide,
    /// "slow closes"); so are those of a call whose arguments the handler never decodes. An fd
    /// the arguments had already taken when a later part of them fails to decode is dropped
    /// on this thread ([`codec::decode`]).
    ///
    /// Decode them once: the first call takes the fds, and a large byte string that came
    /// through shared memory, out of the message. A second call on a message that carried
    /// either fails with [`Error::Malformed`] (for such a string, saying it was taken
    /// already): once this end has copied a string out, the peer may put its next one there.
    pub fn args<T: DeserializeOwned>(&mut self) -> Result<T> {
        codec::decode_from(self.body, &mut self.fds).map_err(|e| self.undecoded(e))
    }

    /// Notes why the arguments did not decode (see [`Call::unreceived`]).
    #[cold]
    #[inline(never)]
    fn undecoded(&mut self, e: Error) -> Error {
        self.unreceived = e.is_over_limits();
        e
    }

    /// Notes a reply that failed with `e`; whether the call counts as answered anyway (the
    /// peer is gone: see [`Error::reply_may_follow`]). The handler ran, whatever became of its
    /// arguments: a failure left to answer is the reply's, never that the arguments were
    /// refused (`unreceived`), which would tell the caller that the method did not run, with
    /// the reply's size for its request's.
    #[cold]
    #[inline(never)]
    fn unsent(&mut self, e: &Error) -> bool {
        self.unreceived = false;
        !e.reply_may_follow()
    }

    /// Sends `value` as the reply. Ignored for oneway calls, which get no reply, and after the
    /// first reply (one that failed having sent nothing does not count).
    pub fn reply<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        match &self.replier {
            Some(replier) if !self.replied => {
                // A reply that could not be encoded, or was refused before it went out,
                // answers nothing: the server still answers the call, with why.
                let sent = replier.send(value);
                self.replied = match &sent {
                    Ok(()) => true,
                    Err(e) => self.unsent(e),
                };
                sent
            }
            _ => Ok(()),
        }
    }

    /// Sends `bytes` as the reply, as one byte string (what the generated code does for a
    /// `Vec<u8>` result), then keeps their allocation for the next byte string this thread
    /// receives. Ignored for oneway calls, as [`Call::reply`].
    pub fn reply_bytes(&mut self, bytes: Vec<u8>) -> Result<()> {
        let sent = self.reply(&Bytes(&bytes));
        crate::spare::keep(bytes);
        sent
    }

    /// An error for a command this interface does not have.
    pub fn unknown_command(&self) -> Error {
        Error::Malformed(format!("unknown command {}", self.cmd))
    }
}

#[cfg(test)]
mod tests {
    use super::{InterfaceInfo, MethodInfo};

    const fn method(name: &'static str, cmd: u32) -> MethodInfo {
        MethodInfo {
            name,
            cmd,
            signature: "",
            oneway: false,
            shape: 0,
        }
    }

    /// `method` looks at the command id's position first, and still finds methods whose ids
    /// `#[cmd]` set elsewhere, or refuses ids no method has.
    #[test]
    fn methods_are_found_by_command_id_wherever_they_are() {
        static INFO: InterfaceInfo = InterfaceInfo {
            name: "T",
            id: 0,
            signature: 0,
            methods: &[
                method("a", 0),
                method("b", 7),
                method("c", 2),
                method("d", 1),
            ],
        };
        let name = |cmd| INFO.method(cmd).map(|m| m.name);
        assert_eq!(name(0), Some("a"));
        assert_eq!(name(7), Some("b"));
        assert_eq!(name(2), Some("c"));
        assert_eq!(name(1), Some("d"));
        assert_eq!(name(3), None);
        assert_eq!(name(u32::MAX), None);
    }
}
