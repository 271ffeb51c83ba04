//! The codec's fd tables: fds keep their order and identity at every table size, hostile
//! indices are errors that close everything, and no table outlives its encode or decode
//! (nested calls, panics). Messages field by field: the same bytes as the tuple through
//! serde, either way round, and hostile byte strings refused before anything is allocated.

mod common;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

use common::{memfd, open_fds, read_all};
use ipc_runtime::Error;
use ipc_runtime::codec::{self, Bytes, Fd, Value};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Tests that count this process's fds take this, so they do not see each other's.
static FD_COUNT: Mutex<()> = Mutex::new(());

fn fd_count_lock() -> std::sync::MutexGuard<'static, ()> {
    FD_COUNT.lock().unwrap_or_else(|e| e.into_inner())
}

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
    for n in [0usize, 2, 20] {
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

type Fields = (
    Value<String>,
    Bytes<Vec<u8>>,
    Value<u64>,
    Bytes<Vec<u8>>,
    Fd<OwnedFd>,
);
type Mixed = (
    Bytes<Vec<u8>>,
    Value<String>,
    Bytes<Vec<u8>>,
    Value<Vec<u16>>,
);
type Serde = (String, Bytes<Vec<u8>>, u64, Bytes<Vec<u8>>, Fd<OwnedFd>);

#[test]
fn fields_are_the_same_bytes_as_the_tuple_through_serde() {
    let _lock = fd_count_lock();
    let before = open_fds();
    let (text, small, big) = ("héllo".to_string(), vec![1u8, 2, 3], vec![9u8; 5000]);
    let file = memfd(b"contents");
    let (by_fields, by_serde, mut arrived) = {
        let (mut by_fields, mut fds_fields) = (Vec::new(), Vec::new());
        let fields = (
            Value(&text),
            Bytes(&small),
            Value(42u64),
            Bytes(&big),
            Fd(&file),
        );
        codec::encode_fields(&fields, &mut by_fields, &mut fds_fields).unwrap();
        let (mut by_serde, mut fds_serde) = (Vec::new(), Vec::new());
        let serde = (&text, Bytes(&small), 42u64, Bytes(&big), Fd(&file));
        codec::encode(&serde, &mut by_serde, &mut fds_serde).unwrap();
        assert_eq!((fds_fields.len(), fds_serde.len()), (1, 1));
        // What the peer would receive, once for each decode below.
        let arrived: Vec<OwnedFd> = (0..2)
            .map(|_| fds_fields[0].try_clone_to_owned().unwrap())
            .collect();
        (by_fields, by_serde, arrived)
    };
    assert_eq!(by_fields, by_serde);

    // Each decodes what the other wrote.
    let (Value(t), Bytes(s), Value(n), Bytes(b), Fd(fd)): Fields =
        codec::decode_fields(&by_serde, &mut vec![arrived.pop().unwrap()]).unwrap();
    assert_eq!((&t, &s, n, &b), (&text, &small, 42, &big));
    assert_eq!(read_all(fd), b"contents");
    let (t, Bytes(s), n, Bytes(b), Fd(fd)): Serde =
        codec::decode(&by_fields, vec![arrived.pop().unwrap()]).unwrap();
    assert_eq!((&t, &s, n, &b), (&text, &small, 42, &big));
    assert_eq!(read_all(fd), b"contents");
    drop(file);
    assert_eq!(open_fds(), before, "every fd closed");
}

fn malformed_fields(bytes: &[u8]) -> String {
    let fds: Vec<OwnedFd> = (0..3).map(|_| memfd(b"x")).collect();
    let result = codec::decode_fields::<(Value<u32>, Bytes<Vec<u8>>)>(bytes, &mut { fds });
    match result {
        Err(Error::Malformed(why)) => why,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn hostile_byte_strings_are_errors_that_close_every_fd() {
    let _lock = fd_count_lock();
    let before = open_fds();
    let mut message = 5u32.to_le_bytes().to_vec();
    // A byte string announcing 1 TiB in a message of a few bytes: refused, not allocated.
    let mut huge = message.clone();
    huge.push(0);
    huge.extend_from_slice(&(1u64 << 40).to_le_bytes());
    huge.extend_from_slice(b"abc");
    assert!(
        malformed_fields(&huge).contains("1099511627776 bytes"),
        "{}",
        malformed_fields(&huge)
    );
    // An unknown tag, a length cut short, bytes left over.
    let mut tag = message.clone();
    tag.push(7);
    assert!(malformed_fields(&tag).contains("tag 7"));
    let mut short = message.clone();
    short.extend_from_slice(&[0, 3, 0]);
    assert!(malformed_fields(&short).contains("bytes"));
    message.push(0);
    message.extend_from_slice(&2u64.to_le_bytes());
    message.extend_from_slice(b"ok!");
    assert!(malformed_fields(&message).contains("1 bytes left over"));
    // Out of line, but no store to read it from (not decoding on a connection).
    let mut placed = 5u32.to_le_bytes().to_vec();
    placed.push(1);
    for v in [1u32, u32::MAX] {
        placed.extend_from_slice(&v.to_le_bytes());
    }
    for v in [0u64, 4096] {
        placed.extend_from_slice(&v.to_le_bytes());
    }
    assert!(malformed_fields(&placed).contains("no shared region"));
    assert_eq!(open_fds(), before, "every fd closed");
}

#[test]
fn a_value_after_a_byte_string_reads_from_where_it_ended() {
    let (mut buf, mut fds) = (Vec::new(), Vec::new());
    let sent = (
        Bytes(b"abc"),
        Value("after"),
        Bytes(Vec::new()),
        Value(vec![1u16, 2]),
    );
    codec::encode_fields(&sent, &mut buf, &mut fds).unwrap();
    let got: Mixed = codec::decode_fields(&buf, &mut Vec::new()).unwrap();
    assert_eq!(got.0.0, b"abc");
    assert_eq!(got.1.0, "after");
    assert!(got.2.0.is_empty());
    assert_eq!(got.3.0, [1, 2]);
}
