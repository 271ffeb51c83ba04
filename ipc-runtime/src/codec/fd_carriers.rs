//! Fds in serde types: [`Fd`] and its [`FdCarrier`]s write each fd as its index in the
//! message's fd table and take it back from there; [`fd`](mod@fd) and [`fds`](mod@fds) do the
//! same for `#[serde(with = "...")]` fields of your own types.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::CONTEXT;
use crate::error::Result;

/// Something that is one or more fds on the wire: [`OwnedFd`], `Option<OwnedFd>`,
/// `Vec<OwnedFd>`, and a `Result` whose `Ok` is one of these. Used through [`Fd`].
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

/// A method's fallible fds, `Result<OwnedFd, E>` (or of an `Option` or `Vec` of them): the
/// fds of `Ok` in the message's table, an `Err` as a plain serde value.
impl<T: FdCarrier, E: Serialize + DeserializeOwned> FdCarrier for std::result::Result<T, E> {
    fn serialize_fds<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_ref().map(Fd).serialize(s)
    }
    fn deserialize_fds<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(std::result::Result::<Fd<T>, E>::deserialize(d)?.map(|Fd(fds)| fds))
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

/// An fd a client stub sends without taking it: the stub of a method that takes an `OwnedFd`
/// takes any `impl AsFd` (an `OwnedFd`, which it closes once sent, or a `BorrowedFd`, `&File`
/// and the like, which the caller keeps) and wraps `as_fd()` in this. It is written as
/// `Fd(&owned_fd)` is, the fd's index in the message's table: the peer gets a new fd of its
/// own for the same open file either way.
#[derive(Clone, Copy, Debug)]
pub struct SendFd<'fd>(pub BorrowedFd<'fd>);

impl Serialize for SendFd<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_fd(self.0, s)
    }
}

pub(super) fn index_of(fd: BorrowedFd<'_>) -> Result<u32, &'static str> {
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

pub(super) fn take(index: u32) -> Result<OwnedFd, String> {
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
/// `OwnedFd`, or a `Result` whose `Ok` is one of these) inside your own serde types: the shapes
/// of fds a method's parameter may take, as fields.
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
