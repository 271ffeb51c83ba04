//! Bytes and fds for serde types. The only module that calls bincode, so the byte encoding
//! can be swapped in one place.
//!
//! Bytes are bincode 1.3 with fixed-size little-endian integers. A file descriptor is not
//! bytes: [`encode`] collects every fd a value carries into the message's fd table and writes
//! its index (a `u32`) in the bytes; [`decode`] hands each index back as the `OwnedFd` that
//! arrived. Fd-carrying fields mark themselves with [`Fd`] or `#[serde(with = "typed_ipc::fd")]`;
//! a thread-local points at the message's fd table for the duration of one `encode`/`decode`
//! call, which is how serde's data model can carry something that is not data.
//!
//! Byte strings ([`Bytes`], [`bytes`]) are a tag byte and then either the bytes (tag 0) or,
//! when the encoder runs with an out-of-line store that takes them (tag 1), a reference to
//! where the store put them (sequence number, fd index, offset, length): the connection uses
//! this to move byte strings through a shared region instead of the socket (see
//! `connection/lane/mod.rs`). [`SharedBytes`] may also be tag 2: a reference to the first bytes,
//! which the store moved through a pipe, and then the rest of the bytes. Tag 3 is a
//! reference to a buffer of the receiver's that the store wrote the bytes into
//! (`peer_memory.rs`).

mod bounded;
mod byte_strings;
mod fd_carriers;
mod reader;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Limit, Result};
use crate::shared_bytes::SharedBytes;
use bounded::{Bounded, Budget};
use reader::Reader;

pub(crate) use byte_strings::serialize_shared;
pub use byte_strings::{Bytes, BytesCarrier, CarriedBytes, bytes};
pub use fd_carriers::{Fd, FdCarrier, SendFd, fd, fds};

thread_local! {
    /// What the encode or decode running on this thread works with. Pointers rather than
    /// owned tables: they point at the caller's fd table (encoding) and at a table on
    /// `decode_from`'s stack (decoding), and [`Swap`] puts the outer values back on return
    /// and on unwinding. Nothing here has a destructor, so reaching it is a plain
    /// thread-local load; the earlier tables-per-thread (four `RefCell`s and two spares,
    /// swapped in and out on every message) cost about 180 instructions a message.
    static CONTEXT: Context = const {
        Context {
            outgoing: Cell::new(None),
            incoming: Cell::new(None),
            store: Cell::new(None),
            placing: Cell::new(None),
            fetched: Cell::new(Fetched::NOTHING),
            over_limit: Cell::new(OverLimit {
                what: "",
                size: 0,
                limit: 0,
                which: Limit::Unknown,
            }),
        }
    };
}

struct Context {
    /// The fd table of the message being encoded: the `fds` passed to [`encode`].
    outgoing: Cell<Option<NonNull<Vec<BorrowedFd<'static>>>>>,
    /// The fds of the message being decoded, each taken at most once.
    incoming: Cell<Option<NonNull<[Option<OwnedFd>]>>>,
    /// Where out-of-line byte strings are read from while decoding.
    store: Cell<Option<NonNull<dyn OutOfLine>>>,
    /// Where byte strings may go out of line while encoding, and the placement made there
    /// so far (0: none; one per message): set by [`encode_placing`] for one message (a
    /// pointer, which costs the swap less than the value did), and cleared by a plain
    /// [`encode`] nested in it, whose bytes must stay self-contained.
    placing: Cell<Option<NonNull<Placing>>>,
    /// Whether the message being decoded has had an out-of-line byte string fetched: a sender
    /// places at most one per message, and a second is refused, so that a short hostile
    /// message cannot make the receiver fetch (and allocate) the same large string over and
    /// over. Also whether it has had something refused as over this side's limits.
    fetched: Cell<Fetched>,
    /// The last thing refused as over this side's limits ([`Fetched::OVER_LIMIT`]): read only
    /// in that state, which is the current decode's, so never a stale value. Kept apart from
    /// `fetched`, which every decode swaps: carried in it, they made that swap cost 8
    /// instructions a call on each side.
    over_limit: Cell<OverLimit>,
}

/// What the message being decoded has fetched out of line, and whether it has had something
/// refused as over this side's limits: two bits, since a refusal a lenient field lets pass
/// must not count as a fetch (nor a fetch undo a refusal).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Fetched(u8);

impl Fetched {
    const NOTHING: Fetched = Fetched(0);
    /// One byte string (or a try at one).
    const ONE: u8 = 1;
    /// A byte string, sealed buffer or region view over this side's limits, refused
    /// ([`Context::over_limit`]): the decode fails with [`Error::TooLarge`] rather than
    /// [`Error::Malformed`].
    const OVER_LIMIT: u8 = 2;
    /// Shared memory this side failed to map ([`refuse_here`]): the decode fails with
    /// [`Error::Io`] rather than [`Error::Malformed`].
    const FAILED_HERE: u8 = 4;
}

/// Something refused as over this side's limits while decoding: what (`"a byte string"`,
/// `"a sealed buffer"`), its size, the limit, and which limit that is.
#[derive(Clone, Copy)]
struct OverLimit {
    what: &'static str,
    size: u64,
    limit: u64,
    which: Limit,
}

/// Where the message being encoded may place a byte string: on [`encode_with`]'s stack,
/// which [`Context::placing`] points at while it serializes.
///
/// Dropped only if the serialization unwinds (a panic in user `Serialize` code; forgotten
/// on return, at no cost there), when it gives back the placement made: the caller never
/// learns of it, and the store's lane would stay busy for good with a message never sent.
struct Placing {
    store: NonNull<dyn OutOfLine>,
    /// The placement made (0: none yet).
    seq: Cell<u32>,
    /// [`SharedBytes`] may pipe ([`encode_placing`]'s `pipe`).
    pipe: bool,
}

impl Drop for Placing {
    #[cold]
    fn drop(&mut self) {
        let seq = self.seq.get();
        if seq != 0 {
            // SAFETY: as in `place_with`: `store` outlives the serialization, which is
            // unwinding through the frame this lives in.
            unsafe { self.store.as_ref() }.abandon(seq);
        }
    }
}

/// Sets a context cell for a scope and puts the outer value back when dropped, also when
/// the scope unwinds, so no pointer outlives what it points at.
struct Swap<'c, T: Copy> {
    cell: &'c Cell<T>,
    outer: T,
}

impl<'c, T: Copy> Swap<'c, T> {
    fn new(cell: &'c Cell<T>, value: T) -> Self {
        Swap {
            outer: cell.replace(value),
            cell,
        }
    }
}

impl<T: Copy> Drop for Swap<'_, T> {
    fn drop(&mut self) {
        self.cell.set(self.outer);
    }
}

/// Fd tables of up to this many fds live on the stack while decoding; larger ones (rare)
/// are allocated.
const SMALL_TABLE: usize = 16;

/// Why an [`OutOfLine`] store could not fetch a byte string.
#[derive(Debug)]
pub(crate) enum Unfetched {
    /// The string is over this side's limits: `len` bytes, `limit` allowed. The decode fails
    /// with [`Error::TooLarge`], so that the sender hears its string was too large, as for
    /// one that came inline.
    OverLimit { len: u64, limit: u64 },
    /// The reference is bad, or the bytes could not be read: [`Error::Malformed`].
    Bad(String),
    /// The peer's shared memory could not be mapped for a failure of this side's own (a
    /// system call refused by a seccomp filter, memory): [`Error::Io`], not the peer's fault.
    FailedHere(Error),
}

impl From<String> for Unfetched {
    fn from(why: String) -> Self {
        Unfetched::Bad(why)
    }
}

impl From<&str> for Unfetched {
    fn from(why: &str) -> Self {
        Unfetched::Bad(why.into())
    }
}

/// Somewhere other than the message for large byte strings: the connection's shared region.
pub(crate) trait OutOfLine: Send + Sync {
    /// Offers `bytes` while encoding, at most once per message. `Some` if the store took
    /// them: where (its `seq` is never 0).
    fn put(&self, bytes: &[u8]) -> Option<Placement>;
    /// Fetches placed bytes while decoding; `fd` is the fd the reference named, if any, or
    /// why the message's table does not hold it: a message decoded twice has no fds left,
    /// and the store says that its string was taken already rather than that.
    fn take(&self, placed: &Placed, fd: FdNamed) -> std::result::Result<Vec<u8>, Unfetched>;
    /// Offers bytes whose owner the store may keep until the peer has read them, so that
    /// they can be read from the sender's own pages; at most once per message, like
    /// [`OutOfLine::put`]. `Some`: the reference to write (how many of the bytes went
    /// out of line: the rest follow it inline) and an fd the message must carry.
    fn put_shared(&self, _bytes: &SharedBytes) -> Option<(Piped, Option<RawFd>)> {
        None
    }
    /// Fetches piped bytes while decoding and appends `tail`, the rest of the string; `fd`
    /// as in [`OutOfLine::take`].
    fn take_piped(
        &self,
        _piped: &Piped,
        _fd: FdNamed,
        _tail: &[u8],
    ) -> std::result::Result<Vec<u8>, Unfetched> {
        Err("a piped byte string, but no pipe to read it from".into())
    }
    /// Fetches a byte string the peer wrote into this process's memory while decoding.
    fn take_written(&self, _written: &Written) -> std::result::Result<Vec<u8>, Unfetched> {
        Err("a byte string written into this process, but it accepts no writes".into())
    }
    /// The largest sealed buffer or region view a decode with this store accepts
    /// (`Limits::max_shared_len`).
    fn max_shared_len(&self) -> usize {
        crate::Limits::default().max_shared_len
    }
    /// The encode that placed `seq` unwound (a panic in user `Serialize` code): its message
    /// will never be sent, and its caller never learns of the placement.
    fn abandon(&self, _seq: u32) {}
}

/// The fd an out-of-line reference named (`None`: it named none), or why the message's table
/// does not hold it.
pub(crate) type FdNamed = std::result::Result<Option<OwnedFd>, String>;

/// Where [`OutOfLine::put`] put a byte string.
pub(crate) enum Placement {
    /// In a shared region (tag 1), with an fd the message must carry (a region the peer has
    /// not seen yet), which the store keeps open until the message is sent.
    Region(Placed, Option<RawFd>),
    /// Into the peer's memory (tag 3).
    Written(Written),
}

impl Placement {
    fn seq(&self) -> u32 {
        match self {
            Placement::Region(placed, _) => placed.seq,
            Placement::Written(written) => written.seq,
        }
    }
}

/// A byte string the sender wrote into the receiver's inbox buffer: the wire form of tag 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Written {
    /// Which placement of the sender's store this is (acknowledged back to it).
    pub seq: u32,
    /// Which of the receiver's inbox buffers it went into.
    pub generation: u64,
    /// Its length.
    pub len: u64,
}

/// Where the first bytes of a piped byte string are: the wire form of tag 2, followed by
/// the rest of the string inline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Piped {
    /// Which placement of the sender's store this is (acknowledged back to it).
    pub seq: u32,
    /// Index of the pipe's fd in the message's table, or [`NO_FD`]: the pipe announced
    /// before.
    pub fd: u32,
    /// How many bytes are in the pipe.
    pub len: u64,
}

/// Where an out-of-line byte string is: the wire form of tag 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Placed {
    /// Which placement of the sender's store this is (acknowledged back to it).
    pub seq: u32,
    /// Index of an fd in the message's table that the bytes live in, or `u32::MAX`: where
    /// the previous placement's fd said.
    pub fd: u32,
    /// Offset of the bytes there.
    pub offset: u64,
    /// Their length.
    pub len: u64,
}

/// Byte strings shorter than this always go inline: no store is asked to take them, so
/// small messages pay nothing for the out-of-line path. Measured on 2026-12-02 (randomised
/// A/B, echo round trips against the floor): a 1 KiB echo through the lane 1.14x, inline
/// 1.17x; 256 B and 512 B the same either way (`docs/benchmarks-bulk.md`).
pub(crate) const OUT_OF_LINE_MIN: usize = 1 << 10;

/// No fd in [`Placed::fd`].
pub(crate) const NO_FD: u32 = u32::MAX;

/// Runs `f` with `store` giving out-of-line byte strings to the decodes on this thread.
pub(crate) fn with_store<R>(store: &(dyn OutOfLine + 'static), f: impl FnOnce() -> R) -> R {
    CONTEXT.with(|cx| {
        let _outer = Swap::new(&cx.store, Some(NonNull::from(store)));
        f()
    })
}

/// Runs `f` with this thread's out-of-line store for decoding, if one is set.
fn with_current_store<R>(f: impl FnOnce(&dyn OutOfLine) -> R) -> Option<R> {
    // SAFETY: a pointer in `store` was made by `with_store` from a reference that outlives
    // the `f` it runs, and its `Swap` takes it out again (on unwinding too) before returning;
    // we are on the same thread, inside that `f`, so the reference is still live.
    CONTEXT
        .with(|cx| cx.store.get())
        .map(|store| f(unsafe { store.as_ref() }))
}

/// Offers `bytes` to the store of the [`encode_placing`] running on this thread, unless it
/// has placed a byte string for this message already.
fn place(bytes: &[u8]) -> Option<Placement> {
    place_with(false, |store| {
        store
            .put(bytes)
            .map(|placement| (placement.seq(), placement))
    })
}

/// [`place`] for bytes the store may keep hold of ([`OutOfLine::put_shared`]).
fn place_shared(bytes: &SharedBytes) -> Option<(Piped, Option<RawFd>)> {
    place_with(true, |store| {
        store
            .put_shared(bytes)
            .map(|(piped, fd)| (piped.seq, (piped, fd)))
    })
}

/// Runs `put` on the store of the message being encoded if it has placed nothing yet (and,
/// for `pipe`, may pipe), and records the placement it made.
fn place_with<R>(pipe: bool, put: impl FnOnce(&dyn OutOfLine) -> Option<(u32, R)>) -> Option<R> {
    CONTEXT.with(|cx| {
        // SAFETY: `placing` is set only by `encode_with`, to a `Placing` on its stack made
        // from a store that outlives its serialization, and its `Swap` takes it out again (on
        // unwinding too) before either goes; we are inside that serialization, on its thread.
        let placing = unsafe { cx.placing.get()?.as_ref() };
        if placing.seq.get() != 0 || pipe && !placing.pipe {
            return None;
        }
        // SAFETY: as above.
        let (seq, placed) = put(unsafe { placing.store.as_ref() })?;
        placing.seq.set(seq);
        Some(placed)
    })
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
}

/// Appends the encoding of `value` to `buf`, and the fds it carries to `fds` (borrowed from
/// `value`, so they stay open until the message is sent). An fd's index on the wire is its
/// position in `fds`, so `fds` starts out as the message's (usually empty) fd table.
pub fn encode<'a, T: Serialize + ?Sized>(
    value: &'a T,
    buf: &mut Vec<u8>,
    fds: &mut Vec<BorrowedFd<'a>>,
) -> Result<()> {
    encode_with(value, buf, fds, None, false).1
}

/// [`encode`] that offers `store` the first byte string of [`OUT_OF_LINE_MIN`] bytes or more,
/// and with `pipe` the first [`SharedBytes`] ([`OutOfLine::put_shared`]). Returns the `seq`
/// of the placement the store made (0: none), also when encoding failed, so the caller can
/// give it back.
pub(crate) fn encode_placing<'a, T: Serialize + ?Sized>(
    value: &'a T,
    buf: &mut Vec<u8>,
    fds: &mut Vec<BorrowedFd<'a>>,
    store: &(dyn OutOfLine + 'static),
    pipe: bool,
) -> (u32, Result<()>) {
    encode_with(value, buf, fds, Some(NonNull::from(store)), pipe)
}

/// The two encodes: `store` set for this message only, or cleared so that a plain encode
/// nested in a message's never places.
fn encode_with<'a, T: Serialize + ?Sized>(
    value: &'a T,
    buf: &mut Vec<u8>,
    fds: &mut Vec<BorrowedFd<'a>>,
    store: Option<NonNull<dyn OutOfLine>>,
    pipe: bool,
) -> (u32, Result<()>) {
    // Only the lifetime is erased: `index_of` pushes fds that `value` holds, and `value`
    // is borrowed for 'a.
    let table = NonNull::from(fds).cast::<Vec<BorrowedFd<'static>>>();
    CONTEXT.with(|cx| {
        let _outer = Swap::new(&cx.outgoing, Some(table));
        let placing = store.map(|store| Placing {
            store,
            seq: Cell::new(0),
            pipe,
        });
        // Declared after `placing`, the scope ends before it, also when unwinding: the
        // context never points at a `Placing` gone.
        let scope = Swap::new(&cx.placing, placing.as_ref().map(NonNull::from));
        let encoded = options().serialize_into(&mut *buf, value);
        drop(scope);
        let placed = placing.as_ref().map_or(0, |placing| placing.seq.get());
        // Returned: the caller gives the placement back if need be.
        std::mem::forget(placing);
        (
            placed,
            encoded.map_err(|e| Error::Encode(why_unencodable(e))),
        )
    })
}

/// Decodes a `T` from `bytes`, taking its fds from `fds`. Fds the value does not claim are
/// closed off this thread, by typed-ipc's closer (a peer's fd may be slow to close: the guide,
/// "slow closes"), also when the decode fails; but an fd the value had already taken when a
/// later part of the message fails to decode is dropped with the half-built value, on this
/// thread (one of the guide's "two gaps"). Bytes left over, an index out of range or used
/// twice, or an fd claimed but missing are [`Error::Malformed`]; sizes announced in the bytes
/// are checked against the bytes actually present before anything is allocated. A message's
/// sequences and maps may announce as many elements, all told, as it has bytes, plus 2^20 for
/// values that take no bytes (`Vec<()>`); more is `Malformed`, and serde preallocates for no
/// more than the message can hold.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], mut fds: Vec<OwnedFd>) -> Result<T> {
    decode_from(bytes, &mut fds)
}

/// [`decode`] that drains `fds`, leaving its capacity for the next message.
pub fn decode_from<T: DeserializeOwned>(bytes: &[u8], fds: &mut Vec<OwnedFd>) -> Result<T> {
    let deserialize = || {
        let mut rest = bytes;
        let reader = Reader::new(&mut rest);
        let budget = Budget::new(bytes.len());
        let mut bincode = bincode::Deserializer::with_bincode_read(reader, options());
        let value = T::deserialize(Bounded {
            inner: &mut bincode,
            budget: &budget,
        })
        .map_err(undecodable)?;
        match rest.is_empty() {
            true => Ok(value),
            false => Err(Error::Malformed(format!(
                "{} bytes left over after the value",
                rest.len()
            ))),
        }
    };
    match fds.len() {
        0 => with_incoming(&mut [], deserialize),
        // The usual message with fds carries one: a table of one slot, nothing to fill or
        // walk (the general arm costs ~20 instructions more).
        1 => {
            let mut table = [fds.pop()];
            let result = with_incoming(&mut table, deserialize);
            let [slot] = table;
            close_unclaimed(slot);
            result
        }
        n if n <= SMALL_TABLE => {
            let mut table: [Option<OwnedFd>; SMALL_TABLE] = [const { None }; SMALL_TABLE];
            for (slot, fd) in table.iter_mut().zip(fds.drain(..)) {
                *slot = Some(fd);
            }
            let result = with_incoming(&mut table[..n], deserialize);
            // Close the fds the value did not claim. Only the first `n` slots were ever
            // filled, so the rest need no drop: dropping the whole array would test all
            // sixteen (~50 instructions a message with fds). A panic in `deserialize`
            // unwinds past this and drops the whole table, which is as correct.
            table[..n]
                .iter_mut()
                .for_each(|slot| close_unclaimed(slot.take()));
            std::mem::forget(table);
            result
        }
        _ => {
            let mut table = fds.drain(..).map(Some).collect::<Vec<_>>();
            let result = with_incoming(&mut table, deserialize);
            unclaimed_of_many(table);
            result
        }
    }
}

/// Hands the fds the value did not claim, of a message with more than `SMALL_TABLE`, to the
/// [`closer`](crate::closer). Out of line: rare, and inline it grew the common path.
#[cold]
#[inline(never)]
fn unclaimed_of_many(table: Vec<Option<OwnedFd>>) {
    table.into_iter().for_each(close_unclaimed);
}

/// Hands an fd the value did not claim, if any, to the [`closer`](crate::closer): it is the
/// peer's, and closing it may wait for as long as the peer likes.
#[inline]
fn close_unclaimed(slot: Option<OwnedFd>) {
    if let Some(fd) = slot {
        crate::closer::close(fd);
    }
}

/// The error of a decode that failed: [`Error::TooLarge`] if it failed with the refusal of a
/// byte string over this side's limits, else [`Error::Malformed`]. The serde error only has
/// its text, so it must be that refusal's, not just come after it: user code may let the
/// refusal pass (a lenient field), and the decode then fail for another reason, which the
/// sender must hear as such. Called while the decode's context is current.
#[cold]
#[inline(never)]
fn undecodable(e: Box<bincode::ErrorKind>) -> Error {
    CONTEXT.with(|cx| {
        let refused = cx.over_limit.get();
        let fetched = cx.fetched.get().0;
        match (fetched & Fetched::OVER_LIMIT, &*e) {
            (Fetched::OVER_LIMIT, bincode::ErrorKind::Custom(why))
                if *why == over_limit(refused) =>
            {
                Error::TooLarge {
                    size: refused.size,
                    limit: refused.limit,
                    which: refused.which,
                    by_peer: false,
                }
            }
            (_, bincode::ErrorKind::Custom(why))
                if fetched & Fetched::FAILED_HERE != 0 && why.starts_with(FAILED_HERE) =>
            {
                Error::Io(std::io::Error::other(why.clone()))
            }
            _ => Error::Malformed(why_undecodable(*e)),
        }
    })
}

/// The text of the serde error that refuses something over this side's limit (see
/// [`undecodable`]).
#[cold]
fn over_limit(refused: OverLimit) -> String {
    let OverLimit {
        what,
        size,
        limit,
        which,
    } = refused;
    format!("{what} of {size} bytes, over this side's {which} ({limit} bytes)")
}

/// Notes `refused` in the decode's context, so that the decode fails as [`Error::TooLarge`]
/// (see [`undecodable`]), and returns the serde error that refuses it.
#[cold]
#[inline(never)]
fn refuse_over_limit<E: serde::de::Error>(refused: OverLimit) -> E {
    CONTEXT.with(|cx| {
        cx.fetched
            .set(Fetched(cx.fetched.get().0 | Fetched::OVER_LIMIT));
        cx.over_limit.set(refused);
    });
    E::custom(over_limit(refused))
}

/// How the text of a [`refuse_here`] refusal starts, which tells it from any other serde
/// error (see [`undecodable`]). Worded for the peer, which is told it.
const FAILED_HERE: &str = "the receiver could not map ";

/// Whether `e`, from mapping a received sealed memfd, is a failure of this side's own (a
/// system call refused, memory) rather than a refusal of the fd ([`crate::memfd`] words
/// those as `InvalidInput`) or of its size.
pub(crate) fn failed_here(e: &Error) -> bool {
    matches!(e, Error::Io(e) if e.kind() != std::io::ErrorKind::InvalidInput)
}

/// Notes in the decode's context that this side failed to map `what` (`e`, a
/// [`failed_here`] error), so that the decode fails as [`Error::Io`] (see [`undecodable`]),
/// and returns the serde error that says so.
#[cold]
#[inline(never)]
pub(crate) fn refuse_here<E: serde::de::Error>(what: &str, e: &Error) -> E {
    CONTEXT.with(|cx| {
        cx.fetched
            .set(Fetched(cx.fetched.get().0 | Fetched::FAILED_HERE));
    });
    E::custom(format!("{FAILED_HERE}{what}: {e}"))
}

/// Takes the fd of a received sealed buffer or region view and checks it against `demand`,
/// under the limit of the connection decoding it (its store's
/// [`OutOfLine::max_shared_len`]; the default outside a connection), then `make`s the value
/// of it. One over the limit fails the decode as [`Error::TooLarge`], as a byte string over the
/// limits does; any other refusal as [`Error::Malformed`], and a failure of this side's own to
/// map it ([`failed_here`]) as [`Error::Io`]. A refused fd is the peer's, dropped
/// by typed-ipc: closed by the [`closer`](crate::closer), as closing it may wait for as long
/// as the peer likes (a pipe whose lock it holds sent in place of a memfd).
pub(crate) fn shared_fd<'de, T, D: serde::Deserializer<'de>>(
    d: D,
    demand: &crate::memfd::Demand,
    make: impl FnOnce(OwnedFd, crate::memfd::Mapping) -> T,
) -> std::result::Result<T, D::Error> {
    let fd: OwnedFd = fd::deserialize(d)?;
    let limit = with_current_store(|store| store.max_shared_len())
        .unwrap_or(crate::Limits::default().max_shared_len);
    match crate::memfd::map_received(&fd, demand, limit, Limit::MaxSharedLen) {
        Ok(map) => Ok(make(fd, map)),
        Err(e) => Err(refused_shared_fd(fd, demand.what, e)),
    }
}

/// The decode error for a sealed buffer or region view (`what`) whose fd was refused, the fd
/// handed to the closer.
#[cold]
#[inline(never)]
fn refused_shared_fd<E: serde::de::Error>(fd: OwnedFd, what: &'static str, e: Error) -> E {
    crate::closer::close(fd);
    match e {
        Error::TooLarge {
            size, limit, which, ..
        } => refuse_over_limit(OverLimit {
            what,
            size,
            limit,
            which,
        }),
        e if failed_here(&e) => refuse_here(what, &e),
        e => E::custom(e),
    }
}

/// The serde features that need a self-describing format, named where bincode refuses one:
/// its own words name neither the type's attribute nor what to do.
const SELF_DESCRIBING: &str = "bincode writes no field names or types, so it cannot decode \
    what needs them: `serde_json::Value`, `#[serde(untagged)]`, `#[serde(tag = \"...\")]`, \
    `#[serde(flatten)]`, or a `deserialize_with` that calls `deserialize_any`; use plain \
    structs and enums (or send such a value as a JSON `String`)";

/// Words an encode error, naming what most often makes bincode refuse a value.
#[cold]
#[inline(never)]
fn why_unencodable(e: bincode::Error) -> String {
    match *e {
        bincode::ErrorKind::SequenceMustHaveLength => format!(
            "{e}: a `#[serde(flatten)]` field, or a `Serialize` that gives no length \
             (`serialize_seq(None)`), cannot be encoded; write the fields out"
        ),
        e => e.to_string(),
    }
}

/// Words a decode error: bincode's own text for a message that ends early is empty, and its
/// text for [`Reader`]'s refusal of a deep value starts "io error".
fn why_undecodable(e: bincode::ErrorKind) -> String {
    match e {
        bincode::ErrorKind::DeserializeAnyNotSupported => {
            format!("the type cannot be decoded from bincode: {SELF_DESCRIBING}")
        }
        bincode::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the message ends before the value it holds (a length or a field is missing)".into()
        }
        bincode::ErrorKind::Io(io) => io.to_string(),
        e => e.to_string(),
    }
}

/// Runs `f` with `table` as the fds the decoder takes from.
fn with_incoming<R>(table: &mut [Option<OwnedFd>], f: impl FnOnce() -> R) -> R {
    let table = NonNull::from(table);
    CONTEXT.with(|cx| {
        let _outer = Swap::new(&cx.incoming, Some(table));
        let _fetched = Swap::new(&cx.fetched, Fetched::NOTHING);
        f()
    })
}
