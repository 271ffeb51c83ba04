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
//! `connection/lane.rs`). [`SharedBytes`] may also be tag 2: a reference to the first bytes,
//! which the store moved through a pipe, and then the rest of the bytes. Tag 3 is a
//! reference to a buffer of the receiver's that the store wrote the bytes into
//! (`peer_memory.rs`).

use std::cell::Cell;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::shared_bytes::SharedBytes;

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
            fetched: Cell::new(false),
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
    /// so far (0: none; one per message): set by [`encode_placing`] for one message, and
    /// cleared by a plain [`encode`] nested in it, whose bytes must stay self-contained.
    placing: Cell<Option<Placing>>,
    /// The message being decoded has had an out-of-line byte string fetched: a sender places
    /// at most one per message, and a second is refused, so that a short hostile message
    /// cannot make the receiver fetch (and allocate) the same large string over and over.
    fetched: Cell<bool>,
}

/// Where the message being encoded may place a byte string.
#[derive(Clone, Copy)]
struct Placing {
    store: NonNull<dyn OutOfLine>,
    /// The placement made (0: none yet).
    seq: u32,
    /// [`SharedBytes`] may pipe ([`encode_placing`]'s `pipe`).
    pipe: bool,
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

/// Somewhere other than the message for large byte strings: the connection's shared region.
pub(crate) trait OutOfLine: Send + Sync {
    /// Offers `bytes` while encoding, at most once per message. `Some` if the store took
    /// them: where (its `seq` is never 0).
    fn put(&self, bytes: &[u8]) -> Option<Placement>;
    /// Fetches placed bytes while decoding; `fd` is the fd the reference named, if any.
    fn take(&self, placed: &Placed, fd: Option<OwnedFd>) -> std::result::Result<Vec<u8>, String>;
    /// Offers bytes whose owner the store may keep until the peer has read them, so that
    /// they can be read from the sender's own pages; at most once per message, like
    /// [`OutOfLine::put`]. `Some`: the reference to write (how many of the bytes went
    /// out of line: the rest follow it inline) and an fd the message must carry.
    fn put_shared(&self, _bytes: &SharedBytes) -> Option<(Piped, Option<RawFd>)> {
        None
    }
    /// Fetches piped bytes while decoding and appends `tail`, the rest of the string.
    fn take_piped(
        &self,
        _piped: &Piped,
        _fd: Option<OwnedFd>,
        _tail: &[u8],
    ) -> std::result::Result<Vec<u8>, String> {
        Err("a piped byte string, but no pipe to read it from".into())
    }
    /// Fetches a byte string the peer wrote into this process's memory while decoding.
    fn take_written(&self, _written: &Written) -> std::result::Result<Vec<u8>, String> {
        Err("a byte string written into this process, but it accepts no writes".into())
    }
}

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
        let placing = cx.placing.get()?;
        if placing.seq != 0 || pipe && !placing.pipe {
            return None;
        }
        let store = placing.store;
        // SAFETY: `placing` is set only by `encode_placing` from a reference that outlives
        // its serialization, and its `Swap` takes it out again (on unwinding too) before
        // returning; we are inside that serialization, on its thread.
        let (seq, placed) = put(unsafe { store.as_ref() })?;
        cx.placing.set(Some(Placing { seq, ..placing }));
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
            seq: 0,
            pipe,
        });
        let _placing = Swap::new(&cx.placing, placing);
        let encoded = options().serialize_into(&mut *buf, value);
        let placed = cx.placing.get().map_or(0, |placing| placing.seq);
        (placed, encoded.map_err(|e| Error::Encode(e.to_string())))
    })
}

/// Decodes a `T` from `bytes`, taking its fds from `fds`. Fds the value does not claim are
/// closed. Bytes left over, an index out of range or used twice, or an fd claimed but
/// missing are [`Error::Malformed`]; sizes announced in the bytes are checked against the
/// bytes actually present before anything is allocated.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], mut fds: Vec<OwnedFd>) -> Result<T> {
    decode_from(bytes, &mut fds)
}

/// [`decode`] that drains `fds`, leaving its capacity for the next message.
pub fn decode_from<T: DeserializeOwned>(bytes: &[u8], fds: &mut Vec<OwnedFd>) -> Result<T> {
    let deserialize = || options().with_limit(bytes.len() as u64).deserialize(bytes);
    let result = match fds.len() {
        0 => with_incoming(&mut [], deserialize),
        // The usual message with fds carries one: a table of one slot, nothing to fill or
        // walk (the general arm costs ~20 instructions more).
        1 => with_incoming(&mut [fds.pop()], deserialize),
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
            table[..n].iter_mut().for_each(|slot| drop(slot.take()));
            std::mem::forget(table);
            result
        }
        _ => with_incoming(
            &mut fds.drain(..).map(Some).collect::<Vec<_>>(),
            deserialize,
        ),
    }; // the table is dropped here, closing the fds the value did not claim
    result.map_err(|e| Error::Malformed(why_undecodable(*e)))
}

/// Words a decode error: bincode's own text for a message that ends early is empty.
fn why_undecodable(e: bincode::ErrorKind) -> String {
    match e {
        bincode::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the message ends before the value it holds (a length or a field is missing)".into()
        }
        e => e.to_string(),
    }
}

/// Runs `f` with `table` as the fds the decoder takes from.
fn with_incoming<R>(table: &mut [Option<OwnedFd>], f: impl FnOnce() -> R) -> R {
    let table = NonNull::from(table);
    CONTEXT.with(|cx| {
        let _outer = Swap::new(&cx.incoming, Some(table));
        let _fetched = Swap::new(&cx.fetched, false);
        f()
    })
}

/// Something that is one or more fds on the wire: [`OwnedFd`], `Option<OwnedFd>`,
/// `Vec<OwnedFd>`. Used through [`Fd`].
pub trait FdCarrier: Sized {
    /// Writes the fds' indices, registering the fds in the message's table.
    fn serialize_fds<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error>;
    /// Reads indices and takes the fds they name from the message's table.
    fn deserialize_fds<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
}

/// Writes an fd as its index in the message's table; for a human-readable serializer (the
/// `TYPED_IPC_DEBUG` lines, or serde_json), as `fd(N)`, its number in this process.
fn serialize_fd<S: Serializer>(fd: BorrowedFd<'_>, s: S) -> Result<S::Ok, S::Error> {
    if s.is_human_readable() {
        return s.serialize_newtype_struct("fd", &fd.as_raw_fd());
    }
    index_of(fd)
        .map_err(serde::ser::Error::custom)?
        .serialize(s)
}

impl FdCarrier for OwnedFd {
    fn serialize_fds<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_fd(self.as_fd(), s)
    }
    fn deserialize_fds<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        take(u32::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl FdCarrier for Option<OwnedFd> {
    fn serialize_fds<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_ref().map(Fd).serialize(s)
    }
    fn deserialize_fds<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Option::<Fd<OwnedFd>>::deserialize(d)?.map(|Fd(fd)| fd))
    }
}

impl FdCarrier for Vec<OwnedFd> {
    fn serialize_fds<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(Fd))
    }
    fn deserialize_fds<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Vec::<Fd<OwnedFd>>::deserialize(d)?
            .into_iter()
            .map(|Fd(fd)| fd)
            .collect())
    }
}

/// Marks a value as fds for the codec: `Fd(&owned_fd)` serializes, `Fd<OwnedFd>` (or
/// `Option<OwnedFd>`, `Vec<OwnedFd>`) deserializes. The generated code wraps fd parameters
/// and results in it.
#[derive(Debug)]
pub struct Fd<T>(pub T);

impl<T: FdCarrier> Serialize for Fd<&T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_fds(s)
    }
}

impl<'de, T: FdCarrier> Deserialize<'de> for Fd<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize_fds(d).map(Fd)
    }
}

fn index_of(fd: BorrowedFd<'_>) -> Result<u32, &'static str> {
    let Some(mut table) = CONTEXT.with(|cx| cx.outgoing.get()) else {
        return Err("file descriptors can only be encoded by typed-ipc's codec");
    };
    // SAFETY: the pointer was set by `encode` from the `&mut Vec` it was given, which it
    // does not touch while serializing and whose `Swap` takes the pointer out again before
    // it returns; we are inside that serialization, on its thread, and no other reference to
    // the table is live here (a nested `encode` sets and restores its own).
    let table = unsafe { table.as_mut() };
    // SAFETY: the fd comes from an `AsFd` inside the value being encoded, which `encode`
    // borrows for the table's lifetime, so it stays open as long as the table holds it.
    table.push(unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) });
    Ok(table.len() as u32 - 1)
}

fn take(index: u32) -> Result<OwnedFd, String> {
    let Some(mut table) = CONTEXT.with(|cx| cx.incoming.get()) else {
        return Err("file descriptors can only be decoded by typed-ipc's codec".into());
    };
    // SAFETY: the pointer was set by `with_incoming` from a `&mut` slice it holds for the
    // duration of the decode we are inside (its `Swap` takes it out before returning), and
    // nothing else touches the slice meanwhile.
    let table = unsafe { table.as_mut() };
    let arrived = table.len();
    match table.get_mut(index as usize) {
        Some(slot) => slot
            .take()
            .ok_or_else(|| format!("fd index {index} used twice")),
        None => Err(format!(
            "fd index {index} out of range ({arrived} fds arrived)"
        )),
    }
}

/// Marks a `Vec<u8>` (or `&[u8]` when sending) as a byte string: serde's default encodes
/// `Vec<u8>` element by element, this copies it in one go. The generated code wraps `Vec<u8>`
/// parameters and results in it.
#[derive(Debug)]
pub struct Bytes<T>(pub T);

impl<T: AsRef<[u8]>> Serialize for Bytes<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let bytes = self.0.as_ref();
        if s.is_human_readable() {
            // What it is, not how it travels (no tag, never out of line).
            return s.serialize_bytes(bytes);
        }
        let mut t = s.serialize_tuple(2)?;
        let placed = match bytes.len() {
            OUT_OF_LINE_MIN.. => place(bytes),
            _ => None,
        };
        match placed {
            Some(Placement::Region(mut placed, fd)) => {
                if let Some(fd) = fd {
                    // SAFETY: the store keeps this fd open until the message is sent.
                    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                    placed.fd = index_of(fd).map_err(serde::ser::Error::custom)?;
                }
                t.serialize_element(&1u8)?;
                t.serialize_element(&placed)?;
            }
            Some(Placement::Written(written)) => {
                t.serialize_element(&3u8)?;
                t.serialize_element(&written)?;
            }
            None => {
                t.serialize_element(&0u8)?;
                t.serialize_element(&Inline(bytes))?;
            }
        }
        t.end()
    }
}

/// Writes [`SharedBytes`]: through the store's pipe when it takes them (tag 2: the
/// reference to the piped part, then the rest inline), otherwise as any byte string.
pub(crate) fn serialize_shared<S: Serializer>(
    bytes: &SharedBytes,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeTuple;
    if s.is_human_readable() {
        return s.serialize_bytes(bytes.as_ref());
    }
    let Some((mut piped, fd)) = place_shared(bytes) else {
        return Bytes(bytes.as_ref()).serialize(s);
    };
    if let Some(fd) = fd {
        // SAFETY: the store keeps this fd open until the message is sent.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        piped.fd = index_of(fd).map_err(serde::ser::Error::custom)?;
    }
    let tail = usize::try_from(piped.len)
        .ok()
        .and_then(|piped| bytes.as_ref().get(piped..))
        .ok_or_else(|| serde::ser::Error::custom("the store piped more bytes than it was given"))?;
    let mut t = s.serialize_tuple(3)?;
    t.serialize_element(&2u8)?;
    t.serialize_element(&piped)?;
    t.serialize_element(&Inline(tail))?;
    t.end()
}

/// A byte string written in place, in one go.
struct Inline<'a>(&'a [u8]);

impl Serialize for Inline<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// Reads an in-place byte string.
struct InlineBuf(Vec<u8>);

impl<'de> Deserialize<'de> for InlineBuf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(crate::spare::copy_of(v))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        // `deserialize_bytes`: bincode hands over a slice of the message, which `copy_of` copies
        // into this thread's spare allocation, where `deserialize_byte_buf` would allocate.
        d.deserialize_bytes(Visitor).map(InlineBuf)
    }
}

impl<'de> Deserialize<'de> for Bytes<Vec<u8>> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a tagged byte string")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                use serde::de::Error as _;
                let missing = || A::Error::custom("a byte string ended early");
                match seq.next_element::<u8>()?.ok_or_else(missing)? {
                    0 => Ok(seq.next_element::<InlineBuf>()?.ok_or_else(missing)?.0),
                    1 => {
                        fetch_once()?;
                        let placed: Placed = seq.next_element()?.ok_or_else(missing)?;
                        let fd = match placed.fd {
                            NO_FD => None,
                            index => Some(take(index).map_err(A::Error::custom)?),
                        };
                        with_current_store(|store| store.take(&placed, fd))
                            .ok_or_else(|| {
                                A::Error::custom(
                                    "an out-of-line byte string, but no shared region to read it from",
                                )
                            })?
                            .map_err(A::Error::custom)
                    }
                    2 => take_piped(&mut seq),
                    3 => take_written(&mut seq),
                    tag => Err(A::Error::custom(format!("unknown byte string tag {tag}"))),
                }
            }
        }
        // Up to three elements: the tag, then the bytes (tag 0), a reference (tags 1 and 3),
        // or a reference and the rest of the bytes (tag 2).
        d.deserialize_tuple(3, Visitor).map(Bytes)
    }
}

/// The rest of a piped byte string (tag 2): out of line, so that the common tags' visitor
/// stays small enough to inline its element reads (the arm inline cost ~35 instructions a
/// decode).
#[cold]
#[inline(never)]
fn take_piped<'de, A: serde::de::SeqAccess<'de>>(seq: &mut A) -> Result<Vec<u8>, A::Error> {
    use serde::de::Error as _;
    fetch_once()?;
    let missing = || A::Error::custom("a byte string ended early");
    let piped: Piped = seq.next_element()?.ok_or_else(missing)?;
    let fd = match piped.fd {
        NO_FD => None,
        index => Some(take(index).map_err(A::Error::custom)?),
    };
    let tail = seq.next_element::<InlineBuf>()?.ok_or_else(missing)?;
    with_current_store(|store| store.take_piped(&piped, fd, &tail.0))
        .ok_or_else(|| A::Error::custom("a piped byte string, but no pipe to read it from"))?
        .map_err(A::Error::custom)
}

/// Refuses a second out-of-line byte string in the message being decoded (see
/// [`Context::fetched`]).
fn fetch_once<E: serde::de::Error>() -> Result<(), E> {
    match CONTEXT.with(|cx| cx.fetched.replace(true)) {
        false => Ok(()),
        true => Err(E::custom(
            "a second out-of-line byte string in one message (a sender places at most one)",
        )),
    }
}

/// A byte string the peer wrote into this process (tag 3): out of line, as [`take_piped`].
#[cold]
#[inline(never)]
fn take_written<'de, A: serde::de::SeqAccess<'de>>(seq: &mut A) -> Result<Vec<u8>, A::Error> {
    use serde::de::Error as _;
    fetch_once()?;
    let written: Written = seq
        .next_element()?
        .ok_or_else(|| A::Error::custom("a byte string ended early"))?;
    with_current_store(|store| store.take_written(&written))
        .ok_or_else(|| {
            A::Error::custom("a byte string written into this process, but it accepts no writes")
        })?
        .map_err(A::Error::custom)
}

/// `#[serde(with = "typed_ipc::fd")]` for an [`OwnedFd`] field (or any `AsFd` +
/// `From<OwnedFd>` type, such as `File`) inside your own serde types. For an
/// `Option<OwnedFd>` or `Vec<OwnedFd>` field, use [`fds`](mod@fds).
pub mod fd {
    use super::*;

    /// Registers the fd in the message's table and writes its index.
    pub fn serialize<F: AsFd, S: Serializer>(fd: &F, s: S) -> Result<S::Ok, S::Error> {
        serialize_fd(fd.as_fd(), s)
    }

    /// Takes the fd the index names from the message's table.
    pub fn deserialize<'de, F: From<OwnedFd>, D: Deserializer<'de>>(d: D) -> Result<F, D::Error> {
        OwnedFd::deserialize_fds(d).map(F::from)
    }
}

/// `#[serde(with = "typed_ipc::fds")]` for an `Option<OwnedFd>` or `Vec<OwnedFd>` field (or an
/// `OwnedFd`) inside your own serde types: the shapes of fds a method's parameter may take, as
/// fields.
pub mod fds {
    use super::*;

    /// Registers the fds in the message's table and writes their indices.
    pub fn serialize<T: FdCarrier, S: Serializer>(fds: &T, s: S) -> Result<S::Ok, S::Error> {
        fds.serialize_fds(s)
    }

    /// Takes the fds the indices name from the message's table.
    pub fn deserialize<'de, T: FdCarrier, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        T::deserialize_fds(d)
    }
}

/// `#[serde(with = "typed_ipc::bytes")]` for a `Vec<u8>` field inside your own serde types:
/// encoded as one byte string rather than element by element.
pub mod bytes {
    use super::*;

    /// Writes the bytes as one byte string.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        Bytes(v).serialize(s)
    }

    /// Reads a byte string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Bytes::<Vec<u8>>::deserialize(d).map(|Bytes(v)| v)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Takes every byte string it is offered, numbering placements from 1.
    #[derive(Default)]
    struct Greedy {
        taken: Mutex<Vec<Vec<u8>>>,
    }

    impl OutOfLine for Greedy {
        fn put(&self, bytes: &[u8]) -> Option<Placement> {
            let mut taken = self.taken.lock().unwrap();
            taken.push(bytes.to_vec());
            let placed = Placed {
                seq: taken.len() as u32,
                fd: NO_FD,
                offset: 0,
                len: bytes.len() as u64,
            };
            Some(Placement::Region(placed, None))
        }

        fn take(
            &self,
            placed: &Placed,
            _: Option<OwnedFd>,
        ) -> std::result::Result<Vec<u8>, String> {
            let taken = self.taken.lock().unwrap();
            Ok(taken[placed.seq as usize - 1].clone())
        }
    }

    const BIG: usize = OUT_OF_LINE_MIN;

    #[test]
    fn one_placement_per_message() {
        let store = Greedy::default();
        let (a, b) = (vec![1u8; BIG], vec![2u8; BIG]);
        let (mut buf, mut fds) = (Vec::new(), Vec::new());
        let (placed, encoded) =
            encode_placing(&(Bytes(&a), Bytes(&b)), &mut buf, &mut fds, &store, false);
        encoded.unwrap();
        assert_eq!(placed, 1);
        assert_eq!(
            store.taken.lock().unwrap().len(),
            1,
            "only the first string placed"
        );
        let (Bytes(x), Bytes(y)): (Bytes<Vec<u8>>, Bytes<Vec<u8>>) =
            with_store(&store, || decode(&buf, Vec::new())).unwrap();
        assert_eq!((x, y), (a, b));
    }

    #[test]
    fn a_second_out_of_line_string_in_one_message_is_refused() {
        let store = Greedy::default();
        let big = vec![3u8; BIG];
        let (mut one, mut fds) = (Vec::new(), Vec::new());
        let (placed, encoded) = encode_placing(&Bytes(&big), &mut one, &mut fds, &store, false);
        encoded.unwrap();
        assert_eq!(placed, 1);
        // A hostile sender repeats the one reference: each copy would fetch the string again.
        let twice = [one.as_slice(), one.as_slice()].concat();
        type Two = (Bytes<Vec<u8>>, Bytes<Vec<u8>>);
        let refused: Result<Two> = with_store(&store, || decode(&twice, Vec::new()));
        match refused {
            Err(Error::Malformed(why)) => assert!(why.contains("a second out-of-line"), "{why}"),
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        // Each message may still fetch its one string.
        for _ in 0..2 {
            let Bytes(v): Bytes<Vec<u8>> = with_store(&store, || decode(&one, Vec::new())).unwrap();
            assert_eq!(v, big);
        }
    }

    /// Encodes its bytes with the plain `encode` while being serialized, as user code may.
    struct EncodesInside(Vec<u8>);

    impl Serialize for EncodesInside {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut inner = Vec::new();
            encode(&Bytes(&self.0), &mut inner, &mut Vec::new())
                .map_err(serde::ser::Error::custom)?;
            s.serialize_bytes(&inner)
        }
    }

    #[test]
    fn a_plain_encode_never_places() {
        let store = Greedy::default();
        let big = vec![3u8; BIG];
        // Inside a scope that decodes with a store, as a server's handler runs.
        let mut alone = Vec::new();
        with_store(&store, || encode(&Bytes(&big), &mut alone, &mut Vec::new())).unwrap();
        // Nested in a message's encode that may place.
        let (mut outer, mut fds) = (Vec::new(), Vec::new());
        let (placed, encoded) = encode_placing(
            &EncodesInside(big.clone()),
            &mut outer,
            &mut fds,
            &store,
            false,
        );
        encoded.unwrap();
        assert_eq!(placed, 0);
        assert!(store.taken.lock().unwrap().is_empty());
        // Both decode without any store: the bytes are all there.
        let Bytes(v): Bytes<Vec<u8>> = decode(&alone, Vec::new()).unwrap();
        assert_eq!(v, big);
        let InlineBuf(inner) = decode(&outer, Vec::new()).unwrap();
        let Bytes(v): Bytes<Vec<u8>> = decode(&inner, Vec::new()).unwrap();
        assert_eq!(v, big);
    }
}
