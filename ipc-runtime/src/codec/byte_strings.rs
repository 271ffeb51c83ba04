//! Byte strings: [`Bytes`] and [`bytes`] write a `Vec<u8>` in one go rather than element by
//! element, inline (tag 0) or where the out-of-line store put it (tags 1 to 3, see the
//! [codec](super)).

use std::os::fd::BorrowedFd;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::fd_carriers::{index_of, take};
use super::{
    CONTEXT, FdNamed, Fetched, NO_FD, OUT_OF_LINE_MIN, Piped, Placed, Placement, Unfetched,
    Written, place, place_shared, with_current_store,
};
use crate::error::Result;
use crate::shared_bytes::{CallBytes, SharedBytes};

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

/// A method's byte string that may be absent, `Option<Vec<u8>>`, or fallible,
/// `Result<Vec<u8>, E>`: the `Some` or `Ok` bytes as one byte string (a [`Bytes`]), the rest
/// as serde writes an `Option` or `Result`. Used through [`CarriedBytes`].
pub trait BytesCarrier: Sized {
    /// What a call stub sends for it: the bytes as a [`CallBytes`], which the connection
    /// may pipe.
    type Call: Serialize;
    /// Writes the value, its bytes as one byte string.
    fn serialize_bytes<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error>;
    /// Reads what [`serialize_bytes`](Self::serialize_bytes) (or the [`Call`](Self::Call))
    /// wrote.
    fn deserialize_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
    /// The value as a call stub sends it, taking its bytes.
    fn into_call(self) -> Self::Call;
}

impl BytesCarrier for Option<Vec<u8>> {
    type Call = Option<CallBytes<'static>>;
    fn serialize_bytes<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_ref().map(Bytes).serialize(s)
    }
    fn deserialize_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Option::<Bytes<Vec<u8>>>::deserialize(d)?.map(|Bytes(v)| v))
    }
    fn into_call(self) -> Self::Call {
        self.map(CallBytes::from)
    }
}

impl<E: Serialize + DeserializeOwned> BytesCarrier for std::result::Result<Vec<u8>, E> {
    type Call = std::result::Result<CallBytes<'static>, E>;
    fn serialize_bytes<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_ref().map(Bytes).serialize(s)
    }
    fn deserialize_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(std::result::Result::<Bytes<Vec<u8>>, E>::deserialize(d)?.map(|Bytes(v)| v))
    }
    fn into_call(self) -> Self::Call {
        self.map(CallBytes::from)
    }
}

/// Marks an `Option<Vec<u8>>` or a `Result<Vec<u8>, E>` as carrying a byte string (see
/// [`BytesCarrier`]): `CarriedBytes(&value)` serializes, `CarriedBytes<T>` deserializes. The
/// generated code wraps such parameters and results in it. A type of its own, not [`Bytes`]:
/// `Bytes<T>` serializes any `T: AsRef<[u8]>`, which the standard library may one day say of
/// an `Option` too.
#[derive(Debug)]
pub struct CarriedBytes<T>(pub T);

impl<T: BytesCarrier> Serialize for CarriedBytes<&T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_bytes(s)
    }
}

impl<'de, T: BytesCarrier> Deserialize<'de> for CarriedBytes<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize_bytes(d).map(CarriedBytes)
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
pub(super) struct InlineBuf(pub(super) Vec<u8>);

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
                        // Taken from the table only by the store, which hands an fd it
                        // refuses to the closer; one left there goes to the closer too.
                        with_current_store(|store| store.take(&placed, named_fd(placed.fd)))
                            .ok_or_else(|| {
                                A::Error::custom(
                                    "an out-of-line byte string, but no shared region to read it from",
                                )
                            })?
                            .map_err(unfetched)
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
    let tail = seq.next_element::<InlineBuf>()?.ok_or_else(missing)?;
    // The fd is taken from the table only now, by the store: taken before a tail that is
    // missing, it was dropped here, on the decoding thread, where closing a peer's pipe may
    // wait for as long as the peer likes (the guide, "slow closes").
    with_current_store(|store| store.take_piped(&piped, named_fd(piped.fd), &tail.0))
        .ok_or_else(|| A::Error::custom("a piped byte string, but no pipe to read it from"))?
        .map_err(unfetched)
}

/// The fd at `index` in the message's table ([`NO_FD`]: none), for the store to take with
/// the reference that named it.
fn named_fd(index: u32) -> FdNamed {
    match index {
        NO_FD => Ok(None),
        index => take(index).map(Some),
    }
}

/// Refuses a second out-of-line byte string in the message being decoded (see
/// [`Context::fetched`](super::Context::fetched)).
fn fetch_once<E: serde::de::Error>() -> Result<(), E> {
    let before = CONTEXT.with(|cx| {
        let before = cx.fetched.get();
        cx.fetched.set(Fetched(before.0 | Fetched::ONE));
        before
    });
    match before.0 & Fetched::ONE {
        0 => Ok(()),
        _ => Err(E::custom(
            "a second out-of-line byte string in one message (a sender places at most one)",
        )),
    }
}

/// The serde error for a byte string the store could not fetch. One over this side's
/// limits is also noted in the decode's context, so that the decode fails as
/// [`Error::TooLarge`](crate::Error::TooLarge) (see `undecodable`).
#[cold]
#[inline(never)]
fn unfetched<E: serde::de::Error>(why: Unfetched) -> E {
    match why {
        Unfetched::Bad(why) => E::custom(why),
        Unfetched::FailedHere(e) => super::refuse_here("the shared region it was sent through", &e),
        Unfetched::OverLimit { len, limit } => super::refuse_over_limit(super::OverLimit {
            what: "a byte string",
            size: len,
            limit,
            which: crate::error::Limit::MaxMessageLen,
        }),
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
        .map_err(unfetched)
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
