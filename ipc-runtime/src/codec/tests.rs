//! The out-of-line store seen from the codec: one placement per message, a second refused
//! on decoding, none from a plain encode.

use std::sync::Mutex;

use serde::Serializer;

use super::byte_strings::InlineBuf;
use super::*;
use crate::shared_buffer::SealedBuffer;

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

    fn take(&self, placed: &Placed, _: FdNamed) -> std::result::Result<Vec<u8>, Unfetched> {
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
        encode(&Bytes(&self.0), &mut inner, &mut Vec::new()).map_err(serde::ser::Error::custom)?;
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

/// Refuses every out-of-line byte string as over its limit of 10 bytes, as a receiver whose
/// limits are below the string's.
struct Refusing;

impl OutOfLine for Refusing {
    fn put(&self, _: &[u8]) -> Option<Placement> {
        None
    }

    fn take(&self, placed: &Placed, _: FdNamed) -> std::result::Result<Vec<u8>, Unfetched> {
        Err(Unfetched::OverLimit {
            len: placed.len,
            limit: 10,
        })
    }
}

/// A byte string that user code reads leniently: none if it cannot be read.
struct Lenient(Option<Vec<u8>>);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Lenient(
            Bytes::<Vec<u8>>::deserialize(d).ok().map(|Bytes(v)| v),
        ))
    }
}

/// A byte string over this side's limits fails the decode as `TooLarge`; but one that user
/// code let pass (the decode went on, the reference read whole) does not make a later,
/// unrelated failure of the same decode `TooLarge`: that message is malformed, and its
/// sender must not hear that it was too large.
#[test]
fn an_over_limit_string_let_pass_leaves_a_later_failure_malformed() {
    let big = vec![3u8; BIG];
    let (mut buf, mut fds) = (Vec::new(), Vec::new());
    let (placed, encoded) = encode_placing(
        &(Bytes(&big), 2u8),
        &mut buf,
        &mut fds,
        &Greedy::default(),
        false,
    );
    encoded.unwrap();
    assert_eq!(placed, 1);
    let refused: Result<(Bytes<Vec<u8>>, u8)> = with_store(&Refusing, || decode(&buf, vec![]));
    match refused {
        Err(Error::TooLarge {
            size,
            limit: 10,
            which: crate::Limit::MaxMessageLen,
            by_peer: false,
        }) if size == BIG as u64 => {}
        other => panic!("expected TooLarge, got {:?}", other.map(|_| ())),
    }
    // Let pass, the string leaves the decode to go on: the `bool` after it is 2, malformed.
    let malformed: Result<(Lenient, bool)> = with_store(&Refusing, || decode(&buf, vec![]));
    match malformed {
        Err(Error::Malformed(_)) => {}
        other => panic!("expected Malformed, got {:?}", other.map(|_| ())),
    }
    // Let pass and nothing else wrong, the value decodes.
    let (Lenient(none), two): (Lenient, u8) = with_store(&Refusing, || decode(&buf, vec![]))
        .expect("the decode goes on past the string let pass");
    assert_eq!((none, two), (None, 2));
}

/// [`Greedy`], on a connection that takes sealed buffers of at most 100 bytes.
#[derive(Default)]
struct SmallShared(Greedy);

impl OutOfLine for SmallShared {
    fn put(&self, bytes: &[u8]) -> Option<Placement> {
        self.0.put(bytes)
    }
    fn take(&self, placed: &Placed, fd: FdNamed) -> std::result::Result<Vec<u8>, Unfetched> {
        self.0.take(placed, fd)
    }
    fn max_shared_len(&self) -> usize {
        100
    }
}

/// A sealed buffer that user code reads leniently: none if it was refused.
struct LenientBuffer(Option<SealedBuffer>);

impl<'de> Deserialize<'de> for LenientBuffer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(LenientBuffer(SealedBuffer::deserialize(d).ok()))
    }
}

/// A sealed buffer over the store's `max_shared_len` fails the decode as `TooLarge`, and its
/// fd is closed; one at the limit passes; without a store the default limit holds.
#[test]
fn a_sealed_buffer_over_the_stores_limit_is_too_large() {
    let encoded = |len: usize| {
        let buffer = SealedBuffer::copy_from(&vec![1u8; len]).unwrap();
        let (mut buf, mut fds) = (Vec::new(), Vec::new());
        encode(&buffer, &mut buf, &mut fds).unwrap();
        let fd = fds[0].try_clone_to_owned().unwrap();
        (buf, fd)
    };
    let (buf, fd) = encoded(100);
    let at_limit: SealedBuffer = with_store(&SmallShared::default(), || decode(&buf, vec![fd]))
        .expect("a buffer at the limit passes");
    assert_eq!(at_limit.len(), 100);
    let (buf, fd) = encoded(101);
    let refused: Result<SealedBuffer> =
        with_store(&SmallShared::default(), || decode(&buf, vec![fd]));
    match refused {
        Err(Error::TooLarge {
            size: 101,
            limit: 100,
            which: crate::Limit::MaxSharedLen,
            by_peer: false,
        }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let (buf, fd) = encoded(101);
    let unbounded: SealedBuffer = decode(&buf, vec![fd]).expect("no store: the default limit");
    assert_eq!(unbounded.len(), 101);
}

/// A buffer over the limit that user code let pass neither counts as the message's one
/// out-of-line byte string (a string after it is still fetched) nor makes a later, unrelated
/// failure `TooLarge`.
#[test]
fn an_over_limit_buffer_let_pass_is_not_a_fetch_and_leaves_a_later_failure_malformed() {
    let store = SmallShared::default();
    let big = vec![3u8; BIG];
    let buffer = SealedBuffer::copy_from(&[1u8; 101]).unwrap();
    let value = (&buffer, Bytes(&big), 2u8);
    let (mut buf, mut fds) = (Vec::new(), Vec::new());
    let (placed, encoded) = encode_placing(&value, &mut buf, &mut fds, &store, false);
    encoded.unwrap();
    assert_eq!(placed, 1);
    let fd = || vec![fds[0].try_clone_to_owned().unwrap()];
    let (LenientBuffer(none), Bytes(string), two): (LenientBuffer, Bytes<Vec<u8>>, u8) =
        with_store(&store, || decode(&buf, fd())).expect("the string after it is fetched");
    assert!(none.is_none());
    assert_eq!((string, two), (big.clone(), 2));
    let malformed: Result<(LenientBuffer, Bytes<Vec<u8>>, bool)> =
        with_store(&store, || decode(&buf, fd()));
    match malformed {
        Err(Error::Malformed(_)) => {}
        other => panic!("expected Malformed, got {:?}", other.map(|_| ())),
    }
}
