//! Type shapes: what `#[interface(check_types)]` folds into an interface's signature, so that
//! two ends whose types differ in their bincode form (a `u32` split into two `u16`s, a `u32`
//! made an `f32`, fields of one type reordered) fail with `Error::InterfaceMismatch` naming
//! the method, instead of decoding wrong values.
//!
//! A [`Shape`] is a 64-bit hash of a type's *wire form*, computed at compile time: names do
//! not count (bincode writes none), order, count and each part's shape do. `#[derive(Shape)]`
//! (`typed_ipc::Shape`) writes it for your structs and enums; this module has the impls for
//! what serde and typed-ipc carry.
//!
//! The hash describes the structure, which is a little stricter than bincode's bytes: a field
//! group moved into a struct of its own (`(a, b, c)` → `(Pair(a, b), c)`) counts as a change
//! though bincode writes the same bytes, as do `[u32; 2]` against `(u32, u32)` and a map
//! against a `Vec` of pairs; `String` differs from `Vec<u8>`, and a `NonZeroU32` from a
//! `u32` (the receiver checks UTF-8, or refuses a 0). What is one form has one shape:
//! `HashMap` and `BTreeMap`, `Vec`, `VecDeque` and the sets, `&T`, `Box<T>` and `T`,
//! `usize` and `u64`. It cannot see a hand-written `Serialize`: such a type implements
//! `Shape` by hand, honestly (see [`Shape`]).
//!
//! The derive follows a type that names itself (`struct Tree { kids: Vec<Tree> }`, or
//! `Self`), with its own type arguments, directly or inside the standard containers (inside
//! another generic type, which may name itself too, it refuses, as it refuses a type of
//! yours named like one of them). A generic type names itself as `Self` or with its
//! parameters written out: named bare, it means its defaults, another type, and is refused.
//! Two types that name each
//! other, or a type named
//! through an alias of itself, are a compile error (a cycle evaluating `SHAPE`): implement
//! one of them by hand, the other's fields written out rather than its `SHAPE` named, with
//! [`RECURSION`] where it names the first, the whole inside [`recursive`].

use crate::service::MethodInfo;

mod impls;

/// A type's bincode wire form as a compile-time hash: what `#[interface(check_types)]`
/// compares between the ends, per method.
///
/// Derive it for your types, next to `Serialize` and `Deserialize`:
///
/// ```ignore
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, typed_ipc::Shape)]
/// pub struct Config {
///     pub width: u32,
///     pub height: u32,
///     #[serde(skip)] // not on the wire, not in the shape
///     pub cached: Option<String>,
/// }
/// ```
///
/// A type whose wire form the derive cannot see (a hand-written `Serialize`, or serde
/// attributes such as `with`, `flatten`, `tag` or `untagged`) implements it by hand, from
/// the shapes of what it writes, in order; the combinators are in [`shape`](self):
///
/// ```
/// # extern crate ipc_runtime as typed_ipc;
/// use typed_ipc::shape::{self, Shape};
/// // Written by hand as a `u64` of seconds followed by a `String`.
/// pub struct Stamp { /* ... */ }
/// impl Shape for Stamp {
///     const SHAPE: u64 = shape::product(&[u64::SHAPE, String::SHAPE]);
/// }
/// ```
///
/// `&T`, `Box<T>`, `Arc<T>`, `Rc<T>` and `Cow<T>` have `T`'s shape, as bincode writes them
/// as `T`; so does a type sent borrowed and received owned (`BorrowedFd` and `OwnedFd` are
/// both an fd index).
#[diagnostic::on_unimplemented(
    message = "`{Self}` has no wire shape, which `#[interface(check_types)]` compares",
    label = "`{Self}` does not implement `typed_ipc::Shape`",
    note = "add #[derive(typed_ipc::Shape)] to `{Self}` (next to its Serialize and Deserialize), \
            or implement `typed_ipc::Shape` by hand if its `Serialize` is hand-written",
    note = "a type of another crate's: in a field written by a `#[serde(with)]` module, say \
            what that writes (`#[shape(same_as = \"[u8; 16]\")]`); elsewhere wrap it in a \
            type of your own that implements `Shape`"
)]
pub trait Shape {
    /// The hash of the type's wire form.
    const SHAPE: u64;
}

/// Hashes one step: `shape` into `hash` (FNV-1a, 64 bits, over its bytes).
const fn mix(mut hash: u64, shape: u64) -> u64 {
    let bytes = shape.to_le_bytes();
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `tag` followed by `parts`, in order: the shape of a compound.
pub const fn compound(tag: u64, parts: &[u64]) -> u64 {
    let mut hash = start(tag, parts.len());
    let mut i = 0;
    while i < parts.len() {
        hash = mix(hash, parts[i]);
        i += 1;
    }
    finish(hash)
}

/// The hash of a compound of `tag` with `len` parts, before its parts.
const fn start(tag: u64, len: usize) -> u64 {
    mix(mix(0xcbf2_9ce4_8422_2325, tag), len as u64)
}

/// A compound's hash once its parts are in: never 0, which `MethodInfo::shape` keeps for
/// "not checked".
const fn finish(hash: u64) -> u64 {
    if hash == 0 { 1 } else { hash }
}

/// The tags of the shapes: one per kind of wire form. Stable: changing one changes every
/// signature of an interface that checks types.
mod tag {
    pub const BOOL: u64 = 1;
    pub const U8: u64 = 2;
    pub const U16: u64 = 3;
    pub const U32: u64 = 4;
    pub const U64: u64 = 5;
    pub const U128: u64 = 6;
    pub const I8: u64 = 7;
    pub const I16: u64 = 8;
    pub const I32: u64 = 9;
    pub const I64: u64 = 10;
    pub const I128: u64 = 11;
    pub const F32: u64 = 12;
    pub const F64: u64 = 13;
    pub const CHAR: u64 = 14;
    pub const STR: u64 = 15;
    pub const BYTE_STRING: u64 = 16;
    pub const OPTION: u64 = 17;
    pub const SEQ: u64 = 18;
    pub const MAP: u64 = 19;
    pub const ARRAY: u64 = 20;
    pub const PRODUCT: u64 = 21;
    pub const SUM: u64 = 22;
    pub const FD: u64 = 23;
    pub const SEALED_BUFFER: u64 = 24;
    pub const REGION_VIEW: u64 = 25;
    pub const RECURSION: u64 = 26;
    pub const METHOD: u64 = 27;
    pub const INTERFACE: u64 = 28;
    pub const RECURSIVE: u64 = 29;
    pub const NON_ZERO: u64 = 30;
}

/// A struct's, tuple's or enum variant's fields, in order (`&[]` for a unit struct or
/// variant).
pub const fn product(fields: &[u64]) -> u64 {
    compound(tag::PRODUCT, fields)
}

/// An enum's variants (each a [`product`] of its fields), in declaration order: bincode
/// writes the variant's index, then its fields.
pub const fn sum(variants: &[u64]) -> u64 {
    compound(tag::SUM, variants)
}

/// A sequence of `element`s, its length first (`Vec`, slices, sets).
pub const fn seq(element: u64) -> u64 {
    compound(tag::SEQ, &[element])
}

/// A map from `key`s to `value`s, its length first.
pub const fn map(key: u64, value: u64) -> u64 {
    compound(tag::MAP, &[key, value])
}

/// `len` `element`s, no length written (`[T; N]`).
pub const fn array(element: u64, len: usize) -> u64 {
    compound(tag::ARRAY, &[element, len as u64])
}

/// An `Option` of `some`: a one-byte tag, then the value.
pub const fn option(some: u64) -> u64 {
    compound(tag::OPTION, &[some])
}

/// One file descriptor, as its index in the message's fd table: `OwnedFd`, `BorrowedFd`, and
/// a field `#[serde(with = "typed_ipc::fd")]`.
pub const FD: u64 = compound(tag::FD, &[]);

/// A byte string as typed-ipc sends it (a tag, then the bytes inline or where they were
/// placed): a `Vec<u8>` parameter or result, `SharedBytes`, and a field
/// `#[serde(with = "typed_ipc::bytes")]`.
pub const BYTE_STRING: u64 = compound(tag::BYTE_STRING, &[]);

/// Where a directly recursive type (`struct Tree { kids: Vec<Tree> }`) names itself: the
/// derive writes this in place of the type, so that its shape is not defined by itself, and
/// wraps the type's shape in [`recursive`].
pub const RECURSION: u64 = compound(tag::RECURSION, &[]);

/// A type that names itself (`body` holds [`RECURSION`] where it does): the derive wraps such
/// a type's shape in this, so that a [`RECURSION`] says which type it stands for, the
/// nearest enclosing `recursive`. Without it, `struct A { g: (Vec<A>, u8), t: u16 }` and
/// `struct B { g: C, t: u16 }` with `struct C { kids: Vec<C>, b: u8 }` would have one shape,
/// though `A`'s vector holds `A`s and `C`'s holds `C`s.
pub const fn recursive(body: u64) -> u64 {
    compound(tag::RECURSIVE, &[body])
}

/// A method's shape: its parameters' shapes, in order, and its result's.
pub const fn method(params: &[u64], result: u64) -> u64 {
    compound(tag::METHOD, &[product(params), result])
}

/// An interface's signature with its methods' shapes folded in: `text` is the hash of the
/// trait's text, `methods` the methods in declaration order, each with its [`method`] shape.
/// 32 bits, as the signature travels in each request's envelope.
pub const fn signature(text: u32, methods: &[MethodInfo]) -> u32 {
    let mut shapes = start(tag::INTERFACE, methods.len());
    let mut i = 0;
    while i < methods.len() {
        shapes = mix(shapes, methods[i].shape);
        i += 1;
    }
    let hash = compound(tag::INTERFACE, &[text as u64, finish(shapes)]);
    (hash ^ (hash >> 32)) as u32
}

/// Stands for a directly recursive type inside its own definition (see [`RECURSION`]).
/// `Clone`, as a `Cow<[T]>` or `Cow<T>` asks of the type it stands for.
#[doc(hidden)]
#[derive(Clone)]
pub struct Recursion;

impl Shape for Recursion {
    const SHAPE: u64 = RECURSION;
}

/// The standard library's containers, whose shapes hold no [`recursive`] of their own: the
/// derive asks it of each generic type a [`RECURSION`] is given to, so that a look-alike of
/// the user's (a `LinkedList<T>` that names itself) cannot bind it as its own.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not the standard library's, and #[derive(typed_ipc::Shape)] follows \
               a type that names itself only inside the standard containers",
    label = "the type being derived is named inside this",
    note = "a generic type that names itself too would take the derived type's recursion for \
            its own: implement `typed_ipc::Shape` by hand"
)]
pub trait StandardContainer {}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
    use std::marker::PhantomData;
    use std::os::fd::{BorrowedFd, OwnedFd};
    use std::sync::Arc;

    use super::*;

    const fn of<T: Shape + ?Sized>() -> u64 {
        T::SHAPE
    }

    /// Forms of the same size that bincode would decode as one another are told apart.
    #[test]
    fn same_sized_forms_differ() {
        let four_bytes = [
            of::<u32>(),
            of::<i32>(),
            of::<f32>(),
            of::<(u16, u16)>(),
            of::<[u8; 4]>(),
            of::<[u16; 2]>(),
            of::<char>(),
        ];
        for (i, a) in four_bytes.iter().enumerate() {
            for b in &four_bytes[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_ne!(of::<Vec<u8>>(), of::<String>());
        assert_ne!(of::<Vec<u8>>(), BYTE_STRING);
        assert_ne!(of::<Option<u32>>(), of::<u32>());
        assert_ne!(of::<Option<u32>>(), of::<Result<u32, ()>>());
        assert_ne!(of::<(u32, f32)>(), of::<(f32, u32)>());
        assert_ne!(of::<Vec<u32>>(), of::<[u32; 1]>());
        assert_ne!(of::<Vec<(u32, u8)>>(), of::<HashMap<u32, u8>>());
        assert_ne!(of::<OwnedFd>(), of::<u32>());
        assert_ne!(of::<OwnedFd>(), of::<crate::shared_buffer::SealedBuffer>());
        assert_ne!(
            of::<crate::shared_buffer::SealedBuffer>(),
            of::<crate::shared_region::RegionView>()
        );
        // An enum's variants in another order.
        assert_ne!(
            sum(&[product(&[u32::SHAPE]), product(&[])]),
            sum(&[product(&[]), product(&[u32::SHAPE])])
        );
        assert_ne!(product(&[]), sum(&[]));
        assert_ne!(seq(of::<u8>()), seq(seq(of::<u8>())));
    }

    /// What bincode writes the same way has one shape.
    #[test]
    fn same_forms_are_equal() {
        assert_eq!(of::<&u32>(), of::<u32>());
        assert_eq!(of::<&str>(), of::<String>());
        assert_eq!(of::<Box<str>>(), of::<String>());
        assert_eq!(of::<Cow<'static, str>>(), of::<String>());
        assert_eq!(of::<Arc<Vec<u8>>>(), of::<Vec<u8>>());
        assert_eq!(of::<&[u32]>(), of::<Vec<u32>>());
        assert_eq!(of::<BTreeSet<u8>>(), of::<HashSet<u8>>());
        assert_eq!(of::<BTreeMap<u8, String>>(), of::<HashMap<u8, String>>());
        assert_eq!(of::<BorrowedFd<'static>>(), of::<OwnedFd>());
        assert_eq!(of::<crate::codec::Fd<OwnedFd>>(), of::<OwnedFd>());
        assert_eq!(of::<Option<OwnedFd>>(), option(FD));
        assert_eq!(
            of::<crate::SharedBytes>(),
            of::<crate::codec::Bytes<Vec<u8>>>()
        );
        assert_eq!(of::<crate::CallBytes<'static>>(), BYTE_STRING);
        use crate::codec::CarriedBytes;
        assert_eq!(of::<CarriedBytes<Option<Vec<u8>>>>(), option(BYTE_STRING));
        assert_ne!(
            of::<CarriedBytes<Option<Vec<u8>>>>(),
            of::<Option<Vec<u8>>>()
        );
        assert_eq!(
            of::<CarriedBytes<Result<Vec<u8>, String>>>(),
            sum(&[product(&[BYTE_STRING]), product(&[String::SHAPE])])
        );
        assert_ne!(
            of::<CarriedBytes<Result<Vec<u8>, String>>>(),
            of::<Result<Vec<u8>, String>>()
        );
        assert_eq!(of::<usize>(), of::<u64>());
        assert_eq!(of::<PhantomData<String>>(), of::<()>());
        assert_eq!(
            of::<Result<u8, String>>(),
            sum(&[product(&[u8::SHAPE]), product(&[String::SHAPE])])
        );
    }

    /// The standard types serde carries that an IPC type commonly holds, each as serde writes
    /// it for bincode (not human-readable).
    #[test]
    fn common_standard_types_have_their_serde_forms() {
        use std::cmp::Reverse;
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
        use std::num::{NonZeroU32, NonZeroUsize, Saturating, Wrapping};
        use std::ops::{Bound, Range, RangeInclusive};
        use std::path::{Path, PathBuf};
        assert_eq!(of::<PathBuf>(), of::<String>());
        assert_eq!(of::<&Path>(), of::<String>());
        assert_eq!(of::<Wrapping<u32>>(), of::<u32>());
        assert_eq!(of::<Saturating<u16>>(), of::<u16>());
        assert_eq!(of::<Reverse<u8>>(), of::<u8>());
        assert_eq!(of::<std::cell::RefCell<u8>>(), of::<u8>());
        assert_eq!(of::<std::sync::Mutex<u8>>(), of::<u8>());
        assert_eq!(of::<Range<u32>>(), of::<(u32, u32)>());
        assert_eq!(of::<RangeInclusive<u32>>(), of::<(u32, u32)>());
        assert_eq!(
            of::<Bound<u32>>(),
            sum(&[product(&[]), product(&[u32::SHAPE]), product(&[u32::SHAPE])])
        );
        // The same bytes, but the receiver refuses a 0, as it refuses a `String` that is not
        // UTF-8: a form of its own, as `String`'s is.
        assert_ne!(of::<NonZeroU32>(), of::<u32>());
        assert_ne!(of::<NonZeroU32>(), of::<std::num::NonZeroI32>());
        assert_ne!(of::<NonZeroUsize>(), of::<NonZeroU32>());
        assert_eq!(of::<Ipv4Addr>(), of::<[u8; 4]>());
        assert_eq!(of::<Ipv6Addr>(), of::<[u8; 16]>());
        assert_eq!(
            of::<IpAddr>(),
            sum(&[product(&[of::<Ipv4Addr>()]), product(&[of::<Ipv6Addr>()])])
        );
        assert_eq!(of::<SocketAddrV4>(), of::<(Ipv4Addr, u16)>());
        assert_eq!(of::<SocketAddrV6>(), of::<(Ipv6Addr, u16)>());
        assert_eq!(
            of::<SocketAddr>(),
            sum(&[
                product(&[of::<SocketAddrV4>()]),
                product(&[of::<SocketAddrV6>()])
            ])
        );
    }

    /// The folded signature differs from the text's alone and follows each method's shape.
    #[test]
    fn signatures_follow_the_shapes() {
        let text = 0x1234_5678;
        let a = method(&[u32::SHAPE], u32::SHAPE);
        let b = method(&[f32::SHAPE], u32::SHAPE);
        let signature = |shapes: &[u64]| {
            let methods: Vec<MethodInfo> = shapes
                .iter()
                .map(|&shape| MethodInfo {
                    name: "m",
                    cmd: 0,
                    signature: "fn m(&self)",
                    oneway: false,
                    shape,
                })
                .collect();
            super::signature(text, &methods)
        };
        assert_ne!(signature(&[a]), text);
        assert_ne!(signature(&[a]), signature(&[b]));
        assert_ne!(signature(&[a, b]), signature(&[b, a]));
        assert_eq!(signature(&[a]), signature(&[a]));
        assert_ne!(a, 0);
    }
}
