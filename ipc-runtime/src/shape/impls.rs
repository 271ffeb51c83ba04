//! `Shape` for what serde carries from the standard library, and for typed-ipc's own wire
//! types.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, LinkedList, VecDeque};
use std::marker::PhantomData;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;

macro_rules! leaves {
    ($($ty:ty => $tag:expr),* $(,)?) => {
        $(impl Shape for $ty {
            const SHAPE: u64 = compound($tag, &[]);
        })*
    };
}

leaves! {
    bool => tag::BOOL,
    u8 => tag::U8, u16 => tag::U16, u32 => tag::U32, u64 => tag::U64, u128 => tag::U128,
    i8 => tag::I8, i16 => tag::I16, i32 => tag::I32, i64 => tag::I64, i128 => tag::I128,
    // bincode 1 writes `usize` and `isize` as 64-bit integers.
    usize => tag::U64, isize => tag::I64,
    f32 => tag::F32, f64 => tag::F64,
    char => tag::CHAR,
    str => tag::STR, String => tag::STR,
}

macro_rules! same_as_inner {
    ($($ty:ty),* $(,)?) => {
        $(impl<T: Shape + ?Sized> Shape for $ty {
            const SHAPE: u64 = T::SHAPE;
        })*
    };
}

same_as_inner!(&T, &mut T, Box<T>, Arc<T>, Rc<T>);

impl<T: Shape + ToOwned + ?Sized> Shape for Cow<'_, T> {
    const SHAPE: u64 = T::SHAPE;
}

macro_rules! sequences {
    ($($ty:ty),* $(,)?) => {
        $(impl<T: Shape> Shape for $ty {
            const SHAPE: u64 = seq(T::SHAPE);
        })*
    };
}

sequences!(
    Vec<T>,
    VecDeque<T>,
    LinkedList<T>,
    BinaryHeap<T>,
    BTreeSet<T>,
    [T]
);

impl<T: Shape, S> Shape for HashSet<T, S> {
    const SHAPE: u64 = seq(T::SHAPE);
}

impl<K: Shape, V: Shape, S> Shape for HashMap<K, V, S> {
    const SHAPE: u64 = map(K::SHAPE, V::SHAPE);
}

impl<K: Shape, V: Shape> Shape for BTreeMap<K, V> {
    const SHAPE: u64 = map(K::SHAPE, V::SHAPE);
}

impl<T: Shape, const N: usize> Shape for [T; N] {
    const SHAPE: u64 = array(T::SHAPE, N);
}

impl<T: Shape> Shape for Option<T> {
    const SHAPE: u64 = option(T::SHAPE);
}

/// As an enum of two variants, `Ok` first: bincode writes a `Result` as it writes such an
/// enum.
impl<T: Shape, E: Shape> Shape for Result<T, E> {
    const SHAPE: u64 = sum(&[product(&[T::SHAPE]), product(&[E::SHAPE])]);
}

impl<T: ?Sized> Shape for PhantomData<T> {
    const SHAPE: u64 = product(&[]);
}

/// serde writes a `Duration` as a struct of its seconds and nanoseconds.
impl Shape for Duration {
    const SHAPE: u64 = product(&[u64::SHAPE, u32::SHAPE]);
}

/// serde writes a `SystemTime` as its `Duration` since the epoch.
impl Shape for SystemTime {
    const SHAPE: u64 = Duration::SHAPE;
}

/// serde writes these as the value they wrap.
impl<T: Shape> Shape for std::num::Wrapping<T> {
    const SHAPE: u64 = T::SHAPE;
}

impl<T: Shape> Shape for std::num::Saturating<T> {
    const SHAPE: u64 = T::SHAPE;
}

impl<T: Shape> Shape for std::cmp::Reverse<T> {
    const SHAPE: u64 = T::SHAPE;
}

impl<T: Shape + ?Sized> Shape for std::cell::RefCell<T> {
    const SHAPE: u64 = T::SHAPE;
}

impl<T: Shape + Copy> Shape for std::cell::Cell<T> {
    const SHAPE: u64 = T::SHAPE;
}

impl<T: Shape + ?Sized> Shape for std::sync::Mutex<T> {
    const SHAPE: u64 = T::SHAPE;
}

impl<T: Shape + ?Sized> Shape for std::sync::RwLock<T> {
    const SHAPE: u64 = T::SHAPE;
}

/// serde writes a path as its text (and refuses one that is not UTF-8).
impl Shape for std::path::Path {
    const SHAPE: u64 = String::SHAPE;
}

impl Shape for std::path::PathBuf {
    const SHAPE: u64 = String::SHAPE;
}

/// serde writes a range as a struct of its ends.
impl<T: Shape> Shape for std::ops::Range<T> {
    const SHAPE: u64 = product(&[T::SHAPE, T::SHAPE]);
}

impl<T: Shape> Shape for std::ops::RangeInclusive<T> {
    const SHAPE: u64 = product(&[T::SHAPE, T::SHAPE]);
}

impl<T: Shape> Shape for std::ops::RangeFrom<T> {
    const SHAPE: u64 = product(&[T::SHAPE]);
}

impl<T: Shape> Shape for std::ops::RangeTo<T> {
    const SHAPE: u64 = product(&[T::SHAPE]);
}

/// As the enum `Unbounded`, `Included(T)`, `Excluded(T)`.
impl<T: Shape> Shape for std::ops::Bound<T> {
    const SHAPE: u64 = sum(&[product(&[]), product(&[T::SHAPE]), product(&[T::SHAPE])]);
}

/// The same bytes as the integer, but a receiver refuses a 0 (as it refuses a `String` that
/// is not UTF-8): a form of its own, so that an end that may send a 0 is not taken for one
/// that cannot.
macro_rules! non_zero {
    ($($ty:ty => $int:ty),* $(,)?) => {
        $(impl Shape for $ty {
            const SHAPE: u64 = compound(tag::NON_ZERO, &[<$int>::SHAPE]);
        })*
    };
}

non_zero! {
    std::num::NonZeroU8 => u8, std::num::NonZeroU16 => u16, std::num::NonZeroU32 => u32,
    std::num::NonZeroU64 => u64, std::num::NonZeroU128 => u128,
    std::num::NonZeroUsize => usize,
    std::num::NonZeroI8 => i8, std::num::NonZeroI16 => i16, std::num::NonZeroI32 => i32,
    std::num::NonZeroI64 => i64, std::num::NonZeroI128 => i128,
    std::num::NonZeroIsize => isize,
}

// serde writes addresses, for a format that is not human-readable (bincode), as their octets,
// a socket address as its IP and port, and each `V4`/`V6` choice as an enum.
impl Shape for std::net::Ipv4Addr {
    const SHAPE: u64 = <[u8; 4]>::SHAPE;
}

impl Shape for std::net::Ipv6Addr {
    const SHAPE: u64 = <[u8; 16]>::SHAPE;
}

impl Shape for std::net::IpAddr {
    const SHAPE: u64 = sum(&[
        product(&[std::net::Ipv4Addr::SHAPE]),
        product(&[std::net::Ipv6Addr::SHAPE]),
    ]);
}

impl Shape for std::net::SocketAddrV4 {
    const SHAPE: u64 = product(&[std::net::Ipv4Addr::SHAPE, u16::SHAPE]);
}

/// Its flow information and scope id are not written.
impl Shape for std::net::SocketAddrV6 {
    const SHAPE: u64 = product(&[std::net::Ipv6Addr::SHAPE, u16::SHAPE]);
}

impl Shape for std::net::SocketAddr {
    const SHAPE: u64 = sum(&[
        product(&[std::net::SocketAddrV4::SHAPE]),
        product(&[std::net::SocketAddrV6::SHAPE]),
    ]);
}

macro_rules! tuples {
    ($(($($t:ident),*)),* $(,)?) => {
        $(impl<$($t: Shape),*> Shape for ($($t,)*) {
            const SHAPE: u64 = product(&[$($t::SHAPE),*]);
        })*
    };
}

tuples! {
    (),
    (A),
    (A, B),
    (A, B, C),
    (A, B, C, D),
    (A, B, C, D, E),
    (A, B, C, D, E, F),
    (A, B, C, D, E, F, G),
    (A, B, C, D, E, F, G, H),
    (A, B, C, D, E, F, G, H, I),
    (A, B, C, D, E, F, G, H, I, J),
    (A, B, C, D, E, F, G, H, I, J, K),
    (A, B, C, D, E, F, G, H, I, J, K, L),
    (A, B, C, D, E, F, G, H, I, J, K, L, M),
    (A, B, C, D, E, F, G, H, I, J, K, L, M, N),
    (A, B, C, D, E, F, G, H, I, J, K, L, M, N, O),
    (A, B, C, D, E, F, G, H, I, J, K, L, M, N, O, P),
}

// typed-ipc's own wire types.

impl Shape for OwnedFd {
    const SHAPE: u64 = FD;
}

impl Shape for BorrowedFd<'_> {
    const SHAPE: u64 = FD;
}

/// The codec's fd marker has the shape of the fds it carries.
impl<T: Shape> Shape for crate::codec::Fd<T> {
    const SHAPE: u64 = T::SHAPE;
}

impl<T> Shape for crate::codec::Bytes<T> {
    const SHAPE: u64 = BYTE_STRING;
}

/// An `Option<Vec<u8>>` whose bytes travel as one byte string: not the shape of the
/// `Option<Vec<u8>>` serde writes element by element, so that two ends that disagree on how
/// it travels are told.
impl Shape for crate::codec::CarriedBytes<Option<Vec<u8>>> {
    const SHAPE: u64 = option(BYTE_STRING);
}

/// A `Result<Vec<u8>, E>` whose `Ok` bytes travel as one byte string: as a `Result`'s shape,
/// with [`BYTE_STRING`] for the `Ok`, so distinct from the serde form's.
impl<E: Shape> Shape for crate::codec::CarriedBytes<Result<Vec<u8>, E>> {
    const SHAPE: u64 = sum(&[product(&[BYTE_STRING]), product(&[E::SHAPE])]);
}

impl Shape for crate::SharedBytes {
    const SHAPE: u64 = BYTE_STRING;
}

impl Shape for crate::CallBytes<'_> {
    const SHAPE: u64 = BYTE_STRING;
}

/// An fd on the wire, as an `OwnedFd` is, but checked as a sealed buffer by its receiver:
/// a shape of its own, so that the two ends agree on what the fd is.
impl Shape for crate::shared_buffer::SealedBuffer {
    const SHAPE: u64 = compound(tag::SEALED_BUFFER, &[FD]);
}

/// As [`SealedBuffer`](crate::shared_buffer::SealedBuffer)'s, for a region's view.
impl Shape for crate::shared_region::RegionView {
    const SHAPE: u64 = compound(tag::REGION_VIEW, &[FD]);
}

/// The containers the derive follows a recursion through (`CONTAINERS` in the derive).
macro_rules! standard_containers {
    ($(<$($p:ident $(: ?$sized:ident)?),*> $ty:ty),* $(,)?) => {
        $(impl<$($p $(: ?$sized)?),*> StandardContainer for $ty {})*
    };
}

standard_containers! {
    <T: ?Sized> Box<T>, <T> Vec<T>, <T> Option<T>, <T, E> Result<T, E>,
    <T: ?Sized> Rc<T>, <T: ?Sized> Arc<T>, <T> VecDeque<T>, <T> LinkedList<T>,
    <T> BinaryHeap<T>, <T> BTreeSet<T>, <T, S> HashSet<T, S>, <K, V> BTreeMap<K, V>,
    <K, V, S> HashMap<K, V, S>, <T: ?Sized> PhantomData<T>,
    <T: ?Sized> std::cell::RefCell<T>, <T: ?Sized> std::cell::Cell<T>,
    <T: ?Sized> std::sync::Mutex<T>, <T: ?Sized> std::sync::RwLock<T>,
    <T> std::cmp::Reverse<T>, <T> std::num::Wrapping<T>, <T> std::num::Saturating<T>,
    <T> std::ops::Range<T>, <T> std::ops::RangeInclusive<T>, <T> std::ops::RangeFrom<T>,
    <T> std::ops::RangeTo<T>, <T> std::ops::Bound<T>,
}

impl<T: ToOwned + ?Sized> StandardContainer for Cow<'_, T> {}
