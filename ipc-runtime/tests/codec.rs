//! The codec's fd tables: fds keep their order and identity at every table size, hostile
//! indices are errors that close everything, and no table outlives its encode or decode
//! (nested calls, panics).

mod common;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};

use common::{fd_count_lock, memfd, open_fds, read_all};
use ipc_runtime::Error;
use ipc_runtime::codec::{self, Fd};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What the peer would receive for `fds`: new descriptors for the same files.
fn arrived(fds: &[BorrowedFd<'_>]) -> Vec<OwnedFd> {
    fds.iter()
        .map(|fd| fd.try_clone_to_owned().unwrap())
        .collect()
}

fn malformed(e: Error) -> String {
    match e {
        Error::Malformed(why) => why,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn fds_round_trip_in_order_at_every_table_size() {
    let _lock = fd_count_lock();
    let before = open_fds();
    // 16 is the largest table kept on the stack; 17 and 300 take the allocated one.
    for n in [0usize, 1, 2, 16, 17, 300] {
        let files: Vec<OwnedFd> = (0..n).map(|i| memfd(i.to_string().as_bytes())).collect();
        let value = (7u8, Fd(&files));
        let (mut buf, mut fds) = (Vec::new(), Vec::new());
        codec::encode(&value, &mut buf, &mut fds).unwrap();
        assert_eq!(fds.len(), n);
        let (seven, Fd(got)): (u8, Fd<Vec<OwnedFd>>) = codec::decode(&buf, arrived(&fds)).unwrap();
        assert_eq!(seven, 7);
        let contents: Vec<String> = got
            .into_iter()
            .map(|fd| String::from_utf8(read_all(fd)).unwrap())
            .collect();
        let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        assert_eq!(contents, want, "{n} fds");
    }
    assert_eq!(open_fds(), before, "every fd closed");
}

#[test]
fn fds_the_value_does_not_claim_are_closed() {
    let _lock = fd_count_lock();
    let before = open_fds();
    for extra in [1, 16, 40] {
        let fds: Vec<OwnedFd> = (0..extra).map(|_| memfd(b"x")).collect();
        let (mut buf, mut none) = (Vec::new(), Vec::new());
        codec::encode(&5u32, &mut buf, &mut none).unwrap();
        let five: u32 = codec::decode(&buf, fds).unwrap();
        assert_eq!(five, 5);
        assert_eq!(open_fds(), before, "{extra} unclaimed fds closed");
    }
}

#[test]
fn hostile_indices_are_errors_that_close_every_fd() {
    let _lock = fd_count_lock();
    let before = open_fds();
    for n in [0usize, 1, 2, 20] {
        let index = bincode_u32s(&[n as u32]);
        let fds: Vec<OwnedFd> = (0..n).map(|_| memfd(b"x")).collect();
        let why = malformed(codec::decode::<Fd<OwnedFd>>(&index, fds).unwrap_err());
        assert!(
            why.contains(&format!("out of range ({n} fds arrived)")),
            "{why}"
        );
        assert_eq!(
            open_fds(),
            before,
            "{n} fds closed after an index out of range"
        );
    }
    for n in [1usize, 20] {
        let twice = bincode_u32s(&[0, 0]);
        let fds: Vec<OwnedFd> = (0..n).map(|_| memfd(b"x")).collect();
        let why = malformed(codec::decode::<(Fd<OwnedFd>, Fd<OwnedFd>)>(&twice, fds).unwrap_err());
        assert!(why.contains("fd index 0 used twice"), "{why}");
        assert_eq!(
            open_fds(),
            before,
            "{n} fds closed after an index used twice"
        );
    }
}

/// Little-endian u32s, as the codec writes fd indices.
fn bincode_u32s(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn fds_outside_the_codec_are_an_error_not_a_crash() {
    let _lock = fd_count_lock();
    outside_the_codec_fails();
}

fn outside_the_codec_fails() {
    let fd = memfd(b"x");
    let err = bincode::serialize(&Fd(&fd)).unwrap_err().to_string();
    assert!(
        err.contains("can only be encoded by typed-ipc's codec"),
        "{err}"
    );
    let err = bincode::deserialize::<Fd<OwnedFd>>(&[0, 0, 0, 0])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("can only be decoded by typed-ipc's codec"),
        "{err}"
    );
}

/// Takes its fd, then panics: a decode that unwinds with a table set.
struct PanicsAfterTaking;

impl<'de> Deserialize<'de> for PanicsAfterTaking {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let _fd: OwnedFd = ipc_runtime::fd::deserialize(d)?;
        panic!("a user type panicking mid-decode");
    }
}

/// Panics before it takes any fd: a decode that unwinds with every fd still in the table.
struct PanicsUntaken;

impl<'de> Deserialize<'de> for PanicsUntaken {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("a user type panicking before it takes its fds");
    }
}

/// Registers its fd, then panics: an encode that unwinds with a table set.
struct PanicsAfterRegistering(OwnedFd);

impl Serialize for PanicsAfterRegistering {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let _ = ipc_runtime::fd::serialize(&self.0, s);
        panic!("a user type panicking mid-encode");
    }
}

#[test]
fn a_panicking_value_leaves_no_table_behind() {
    let _lock = fd_count_lock();
    let before = open_fds();
    let unwound =
        catch_unwind(|| codec::decode::<PanicsAfterTaking>(&bincode_u32s(&[0]), vec![memfd(b"x")]));
    assert!(unwound.is_err());
    // One fd (a table of one slot) and several (the general table): all closed unclaimed.
    for n in [1, 3] {
        let fds: Vec<OwnedFd> = (0..n).map(|_| memfd(b"x")).collect();
        let unwound = catch_unwind(|| codec::decode::<PanicsUntaken>(&[], fds));
        assert!(unwound.is_err());
    }
    let value = PanicsAfterRegistering(memfd(b"x"));
    let unwound = catch_unwind(AssertUnwindSafe(|| {
        let (mut buf, mut fds) = (Vec::new(), Vec::new());
        let _ = codec::encode(&value, &mut buf, &mut fds);
    }));
    assert!(unwound.is_err());
    drop(value);
    assert_eq!(open_fds(), before, "the unwinding closed what it held");
    // Had a table outlived its call, these would use it rather than fail.
    outside_the_codec_fails();
}

/// Encodes its fd as a message of its own, inside the outer encode, and writes that
/// message's bytes: what user `Serialize` code that itself sends a message does.
struct Nested(OwnedFd);

impl Serialize for Nested {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let inner = Fd(&self.0);
        let (mut buf, mut fds) = (Vec::new(), Vec::new());
        codec::encode(&inner, &mut buf, &mut fds).unwrap();
        assert_eq!(fds.len(), 1, "the inner message has its own table");
        assert_eq!(buf, bincode_u32s(&[0]));
        s.serialize_bytes(&buf)
    }
}

#[test]
fn a_nested_encode_keeps_its_own_table() {
    let _lock = fd_count_lock();
    let (a, b, c) = (memfd(b"a"), memfd(b"b"), memfd(b"c"));
    let value = (Fd(&a), Nested(b), Fd(&c));
    let (mut buf, mut fds) = (Vec::new(), Vec::new());
    codec::encode(&value, &mut buf, &mut fds).unwrap();
    assert_eq!(fds.len(), 2, "the outer message carries a and c only");
    let (Fd(a2), _inner, Fd(c2)): (Fd<OwnedFd>, serde_bytes_vec::Raw, Fd<OwnedFd>) =
        codec::decode(&buf, arrived(&fds)).unwrap();
    assert_eq!(read_all(a2), b"a");
    assert_eq!(read_all(c2), b"c");
    assert_eq!(
        fds[0].as_fd().try_clone_to_owned().map(read_all).unwrap(),
        b"a"
    );
}

mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer};

    /// A byte string read back as it was written with `serialize_bytes`.
    pub struct Raw;

    impl<'de> Deserialize<'de> for Raw {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Vec::<u8>::deserialize(d).map(|_| Raw)
        }
    }
}

/// A message that ends before the value it announces says so: bincode's own text for it is
/// empty ("io error: ").
#[test]
fn a_message_cut_short_says_so() {
    let value = "a string of some length".to_string();
    let (mut bytes, mut fds) = (Vec::new(), Vec::new());
    codec::encode(&value, &mut bytes, &mut fds).unwrap();
    bytes.truncate(bytes.len() - 5);
    let why = malformed(codec::decode::<String>(&bytes, Vec::new()).unwrap_err());
    assert!(
        why.contains("the message ends before the value it holds"),
        "{why}"
    );
}

/// A recursive parameter type, as a user's interface may have.
#[derive(Debug, Serialize, Deserialize)]
enum Tree {
    Leaf,
    Node(Box<Tree>),
}

/// A hostile message nesting a recursive type a million levels deep is an error, not a
/// stack overflow that aborts the receiving process: run in a child, which must exit well.
#[test]
fn a_deeply_nested_value_is_an_error_not_a_stack_overflow() {
    let _lock = fd_count_lock(); // spawning opens fds for a moment
    let status = common::child("deep_nesting_child").status().unwrap();
    assert!(status.success(), "the decoding process died: {status}");
}

#[test]
#[ignore = "run by a_deeply_nested_value_is_an_error_not_a_stack_overflow"]
fn deep_nesting_child() {
    let mut bytes = 1u32.to_le_bytes().repeat(1_000_000); // Node(Node(...
    bytes.extend_from_slice(&0u32.to_le_bytes()); // Leaf
    let why = malformed(codec::decode::<Tree>(&bytes, Vec::new()).unwrap_err());
    assert!(why.contains("nests deeper"), "{why}");
}

/// The same message decoded on a thread with a small stack (64 KiB, less than the bound's
/// 256 KiB): still an error, not an overflow. A call's answer is decoded on the calling thread,
/// whatever its stack. Run in a child, which must exit well.
#[test]
fn a_deeply_nested_value_is_an_error_on_a_small_stack_too() {
    let _lock = fd_count_lock(); // spawning opens fds for a moment
    let status = common::child("deep_nesting_small_stack_child")
        .status()
        .unwrap();
    assert!(status.success(), "the decoding process died: {status}");
}

#[test]
#[ignore = "run by a_deeply_nested_value_is_an_error_on_a_small_stack_too"]
fn deep_nesting_small_stack_child() {
    let decoding = std::thread::Builder::new().stack_size(64 << 10).spawn(|| {
        let mut bytes = 1u32.to_le_bytes().repeat(1_000_000); // Node(Node(...
        bytes.extend_from_slice(&0u32.to_le_bytes()); // Leaf
        let why = malformed(codec::decode::<Tree>(&bytes, Vec::new()).unwrap_err());
        assert!(why.contains("nests deeper"), "{why}");
        // A shallow value still decodes there.
        let mut bytes = 1u32.to_le_bytes().repeat(3);
        bytes.extend_from_slice(&0u32.to_le_bytes());
        codec::decode::<Tree>(&bytes, Vec::new()).unwrap();
    });
    decoding.unwrap().join().unwrap();
}

/// The bound on nesting leaves room for values deep in earnest (a debug build decodes some 900
/// levels of `Tree`, a release build some 4,000).
#[test]
fn a_value_hundreds_of_levels_deep_decodes() {
    let mut bytes = 1u32.to_le_bytes().repeat(300);
    bytes.extend_from_slice(&0u32.to_le_bytes());
    let mut tree = codec::decode::<Tree>(&bytes, Vec::new()).unwrap();
    let mut depth = 0;
    while let Tree::Node(inner) = tree {
        tree = *inner;
        depth += 1;
    }
    assert_eq!(depth, 300);
}

/// A hostile length for a sequence of values that take no bytes would run the decode as many
/// times as it says, reading nothing (2^64 is forever): it is refused at once.
#[test]
fn a_sequence_of_zero_byte_values_longer_than_the_message_allows_is_refused() {
    let bytes = u64::MAX.to_le_bytes();
    let why = malformed(codec::decode::<Vec<()>>(&bytes, Vec::new()).unwrap_err());
    assert!(
        why.contains("announces 18446744073709551615 elements"),
        "{why}"
    );
    // A map of them, as much.
    let why = malformed(codec::decode::<BTreeMap<(), ()>>(&bytes, Vec::new()).unwrap_err());
    assert!(why.contains("more than the message can hold"), "{why}");
    // Inside a tuple, an enum variant and an option: the bound holds at any depth.
    let mut bytes = vec![1u8]; // Some(
    bytes.extend_from_slice(&0u32.to_le_bytes()); // Variant::Units(
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    let why = malformed(codec::decode::<(Option<Variant>,)>(&bytes, Vec::new()).unwrap_err());
    assert!(why.contains("more than the message can hold"), "{why}");
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Variant {
    Units(Vec<()>),
}

/// The bound leaves honest zero-byte sequences room: a million units in an 8-byte message, and
/// sequences of bytes-taking values as long as the message holds.
#[test]
fn honest_sequences_decode_up_to_the_bound() {
    let units = vec![(); 1 << 20];
    let (mut bytes, mut fds) = (Vec::new(), Vec::new());
    codec::encode(&units, &mut bytes, &mut fds).unwrap();
    assert_eq!(codec::decode::<Vec<()>>(&bytes, Vec::new()).unwrap(), units);
    let why = malformed(
        codec::decode::<Vec<()>>(&((1u64 << 20) + 9).to_le_bytes(), Vec::new()).unwrap_err(),
    );
    assert!(why.contains("more than the message can hold"), "{why}");

    type Mixed = (Vec<Vec<u8>>, BTreeMap<u32, Variant>, Option<Vec<String>>);
    let value: Mixed = (
        (0..300).map(|i| vec![i as u8; i]).collect(),
        (0..50)
            .map(|i| (i, Variant::Units(vec![(); i as usize])))
            .collect(),
        Some(vec!["a".into(), String::new(), "ccc".into()]),
    );
    let (mut bytes, mut fds) = (Vec::new(), Vec::new());
    codec::encode(&value, &mut bytes, &mut fds).unwrap();
    assert_eq!(
        codec::decode::<(_, _, _)>(&bytes, Vec::new()).unwrap(),
        value
    );
}

/// An untagged enum, as users write them for JSON: decoding it needs `deserialize_any`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Untagged {
    Number(u32),
    Text(String),
}

/// A flattened field, as users write them for JSON: encoding it gives bincode a map of
/// unknown length.
#[derive(Debug, Serialize, Deserialize)]
struct Flattened {
    id: u32,
    #[serde(flatten)]
    inner: Inner,
}

#[derive(Debug, Serialize, Deserialize)]
struct Inner {
    x: u32,
}

/// The serde features bincode cannot follow fail with an error that names them, not only
/// bincode's own words, which name neither the type's attribute nor what to do.
#[test]
fn serde_features_bincode_cannot_follow_are_named() {
    let text = Untagged::Text("hi".into());
    let (mut buf, mut fds) = (Vec::new(), Vec::new());
    codec::encode(&text, &mut buf, &mut fds).unwrap();
    let why = malformed(codec::decode::<Untagged>(&buf, Vec::new()).unwrap_err());
    assert!(why.contains("#[serde(untagged)]"), "{why}");
    assert!(why.contains("serde_json::Value"), "{why}");
    let value = Flattened {
        id: 1,
        inner: Inner { x: 2 },
    };
    let (mut buf, mut fds) = (Vec::new(), Vec::new());
    match codec::encode(&value, &mut buf, &mut fds) {
        Err(Error::Encode(why)) => assert!(why.contains("#[serde(flatten)]"), "{why}"),
        other => panic!("expected Encode, got {other:?}"),
    }
}
