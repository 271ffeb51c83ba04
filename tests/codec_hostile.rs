//! The codec against hand-made hostile messages, one case each: fd indices out of range,
//! repeated, out of order or left unused; lengths that announce more than the message holds;
//! nesting as deep as the bytes say; tags, UTF-8 and trailing bytes that are wrong; and a
//! peer's failure reply that is huge or malformed. `tests/decode_fuzz.rs` throws random
//! mutations at the same decode; here each case says what it must come to.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use typed_ipc::codec::{self, Fd};
use typed_ipc::{Connection, Error, Socket};

use common::{fd_count_lock, fd_snapshot, memfd, read_all};

/// Counts the bytes this thread asked the allocator for.
struct Counting;
thread_local! {
    static ASKED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ASKED.try_with(|a| a.set(a.get() + layout.size()));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let _ = ASKED.try_with(|a| a.set(a.get() + new));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The error of a decode expected to fail as malformed, with what it said.
fn malformed<T: DeserializeOwned>(bytes: &[u8], fds: Vec<OwnedFd>) -> String {
    match codec::decode::<T>(bytes, fds) {
        Err(Error::Malformed(why)) => why,
        Err(other) => panic!("expected Malformed, got {other:?}"),
        Ok(_) => panic!("expected Malformed, got a value"),
    }
}

/// The little-endian bytes of fd indices, as the codec writes them.
fn indices(of: &[u32]) -> Vec<u8> {
    of.iter().flat_map(|i| i.to_le_bytes()).collect()
}

/// A pipe: the read end kept here, the write end to send. Whether the write end is closed
/// everywhere shows as end of file on the read end, without waiting.
fn pipe() -> (File, OwnedFd) {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
    (File::from(read), write)
}

/// Whether the write end of the pipe `read` is closed: end of file rather than "nothing yet".
fn writer_closed(read: &mut File) -> bool {
    match read.read(&mut [0u8; 1]) {
        Ok(0) => true,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        other => panic!("{other:?}"),
    }
}

/// Opens fds that take the lowest numbers free, which are those a decode just closed, then
/// waits for typed-ipc's closer and checks each is still open and still what was opened: a
/// second close of a number the decode freed would have closed one of these. (A second close
/// of a number not reused yet aborts a debug build: std checks for `EBADF` on dropping an
/// `OwnedFd`.)
fn assert_no_second_close() {
    let sentinels: Vec<File> = (0..16).map(|_| File::open("/dev/null").unwrap()).collect();
    typed_ipc::wait_for_closes();
    for file in &sentinels {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()));
        assert_eq!(
            link.ok().as_deref(),
            Some(std::path::Path::new("/dev/null")),
            "fd {} closed under its owner",
            file.as_raw_fd()
        );
    }
}

type Two = (Fd<OwnedFd>, Fd<OwnedFd>);

/// An index past the fds that arrived is malformed; every fd of the message is closed, once.
#[test]
fn an_fd_index_out_of_range_is_malformed_and_every_fd_closed_once() {
    let _lock = fd_count_lock();
    let before = fd_snapshot();
    for (at, arrived) in [(1u32, 1usize), (5, 2), (u32::MAX, 3), (16, 16), (17, 17)] {
        let fds = (0..arrived).map(|_| memfd(b"x")).collect();
        let why = malformed::<Fd<OwnedFd>>(&indices(&[at]), fds);
        assert!(
            why.contains(&format!("fd index {at} out of range")),
            "{why}"
        );
        assert_no_second_close();
    }
    before.assert_nothing_new();
}

/// One index named by two `OwnedFd`s is malformed: the fd is given out once, and the one taken
/// first is closed when the half-built value is dropped, on the decoding thread, as the guide
/// says (transport-and-limits.md, "Two gaps remain").
#[test]
fn an_fd_index_used_twice_is_malformed_and_the_fd_closed_once() {
    let _lock = fd_count_lock();
    let before = fd_snapshot();
    let (mut read, write) = pipe();
    let why = malformed::<Two>(&indices(&[0, 0]), vec![write]);
    assert!(why.contains("fd index 0 used twice"), "{why}");
    assert!(
        writer_closed(&mut read),
        "closed before the decode returned"
    );
    assert_no_second_close();
    drop(read);
    // The same in a `Vec<OwnedFd>`, whose first two fds are taken before the repeat.
    let mut bytes = 3u64.to_le_bytes().to_vec();
    bytes.extend(indices(&[1, 0, 1]));
    let (mut reads, writes): (Vec<File>, Vec<OwnedFd>) = (0..2).map(|_| pipe()).unzip();
    let why = malformed::<Fd<Vec<OwnedFd>>>(&bytes, writes);
    assert!(why.contains("fd index 1 used twice"), "{why}");
    assert!(reads.iter_mut().all(writer_closed));
    assert_no_second_close();
    drop(reads);
    before.assert_nothing_new();
}

/// Indices in another order than the table's are the fds they name: no error, no fd swapped
/// or lost.
#[test]
fn fd_indices_out_of_order_name_their_fds() {
    let _lock = fd_count_lock();
    let before = fd_snapshot();
    for n in [2usize, 3, 20] {
        let order: Vec<u32> = (0..n as u32).rev().collect();
        let mut bytes = (n as u64).to_le_bytes().to_vec();
        bytes.extend(indices(&order));
        let fds = (0..n).map(|i| memfd(&[i as u8])).collect();
        let Fd(got): Fd<Vec<OwnedFd>> = codec::decode(&bytes, fds).unwrap();
        let contents: Vec<u8> = got.into_iter().map(|fd| read_all(fd)[0]).collect();
        let expected: Vec<u8> = order.iter().map(|&i| i as u8).collect();
        assert_eq!(contents, expected);
    }
    before.assert_nothing_new();
}

/// Fds the value names none of are closed, once (by typed-ipc's closer, which
/// [`assert_no_second_close`] waits for), whether the decode succeeds or fails; the one the
/// value took stays the caller's. Tables of one fd, of the stack's 16 and past it.
#[test]
fn fds_no_value_uses_are_closed_once_by_the_closer() {
    let _lock = fd_count_lock();
    let before = fd_snapshot();
    for arrived in [1usize, 2, 16, 17, 40] {
        let (mut reads, writes): (Vec<File>, Vec<OwnedFd>) = (0..arrived).map(|_| pipe()).unzip();
        let at = arrived as u32 - 1;
        let Fd(kept): Fd<OwnedFd> = codec::decode(&indices(&[at]), writes).unwrap();
        assert_no_second_close();
        let (last, rest) = reads.split_last_mut().unwrap();
        assert!(rest.iter_mut().all(writer_closed), "{arrived}: closed");
        assert!(!writer_closed(last), "{arrived}: the value's fd is open");
        drop(kept);
        assert!(writer_closed(last));
        // And with the decode failing past the value: the unused fds as well.
        let (mut reads, writes): (Vec<File>, Vec<OwnedFd>) = (0..arrived).map(|_| pipe()).unzip();
        let mut bytes = indices(&[0]);
        bytes.push(2); // not a bool
        malformed::<(Fd<OwnedFd>, bool)>(&bytes, writes);
        assert!(
            writer_closed(&mut reads[0]),
            "taken: closed on the decoding thread"
        );
        assert_no_second_close();
        assert!(reads.iter_mut().all(writer_closed));
    }
    before.assert_nothing_new();
}

/// Allocation a decode of `len` bytes may make: its value, and an error's text.
fn allocation_bound(len: usize) -> usize {
    (64 << 10) + 64 * len
}

/// Decodes `bytes` as `T`, which must fail as malformed saying `says` (or one of the things
/// `|` separates in it), allocating no more
/// than [`allocation_bound`].
fn refused<T: DeserializeOwned>(bytes: &[u8], says: &str) {
    let asked = ASKED.with(Cell::get);
    let why = malformed::<T>(bytes, Vec::new());
    let grew = ASKED.with(Cell::get) - asked;
    let name = std::any::type_name::<T>();
    assert!(says.split('|').any(|s| why.contains(s)), "{name}: {why}");
    assert!(
        grew <= allocation_bound(bytes.len()),
        "{name}: {grew} bytes allocated for {} bytes",
        bytes.len()
    );
}

/// A length prefix and then the bytes that follow it.
fn prefixed(len: u64, rest: &[u8]) -> Vec<u8> {
    let mut b = len.to_le_bytes().to_vec();
    b.extend_from_slice(rest);
    b
}

const EARLY: &str = "the message ends before the value";
/// Refused as announcing more than the message holds, or, below the 2^20 elements allowed
/// beyond its bytes, as ending early.
const ANNOUNCES: &str = "more than the message can hold|the message ends before";

/// Lengths past what the message holds, at the top or nested, in sequences, strings, byte
/// strings and maps, are refused before anything is allocated for them.
#[test]
fn lengths_past_the_message_are_refused_without_allocating_them() {
    for len in [16u64, 1 << 20, 1 << 40, u64::MAX] {
        refused::<String>(&prefixed(len, b"abc"), EARLY);
        refused::<Vec<u64>>(&prefixed(len, &[0; 8]), ANNOUNCES);
        refused::<HashMap<u32, u32>>(&prefixed(len, &[0; 8]), ANNOUNCES);
        // A byte string: tag 0, then its length.
        let mut blob = vec![0u8];
        blob.extend(prefixed(len, b"xy"));
        refused::<Blob>(&blob, EARLY);
        // Nested: an outer sequence of one, whose element lies.
        refused::<Vec<Vec<u8>>>(&prefixed(1, &prefixed(len, &[1, 2])), ANNOUNCES);
        refused::<Vec<String>>(&prefixed(1, &prefixed(len, b"a")), EARLY);
        refused::<Option<HashMap<String, Vec<u16>>>>(
            &[&[1u8][..], &prefixed(len, &[])].concat(),
            ANNOUNCES,
        );
    }
    // Elements that take no bytes: 2^20 beyond the message's bytes, no more.
    let zero_bytes = |n: u64| prefixed(n, &[]);
    let free = 1u64 << 20;
    let v: Vec<()> = codec::decode(&zero_bytes(free + 8), Vec::new()).unwrap();
    assert_eq!(v.len() as u64, free + 8);
    refused::<Vec<()>>(&zero_bytes(free + 9), ANNOUNCES);
    // Announced across many sequences rather than in one.
    let mut many = prefixed(3, &[]);
    for _ in 0..3 {
        many.extend((free / 2).to_le_bytes());
    }
    refused::<Vec<Vec<()>>>(&many, ANNOUNCES);
}

/// Tags, characters and text that no value has, and bytes after the value, are malformed.
#[test]
fn bad_tags_text_and_trailing_bytes_are_malformed() {
    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    enum Three {
        A,
        B(u8),
        C { x: u16 },
    }
    for tag in [3u32, 4, 1 << 31, u32::MAX] {
        refused::<Three>(&tag.to_le_bytes(), "variant index 0 <= i < 3");
    }
    refused::<bool>(&[2], "expected 0 or 1, found 2");
    refused::<Option<u8>>(&[2, 0], "tag");
    refused::<String>(&prefixed(2, &[0xc3, 0x28]), "not valid utf8");
    refused::<Vec<String>>(&prefixed(1, &prefixed(1, &[0xff])), "not valid utf8");
    for ch in [[0xffu8, 0, 0, 0], [0xed, 0xa0, 0x80, 0], [0xc3, 0, 0, 0]] {
        refused::<char>(&ch, "char");
    }
    refused::<Blob>(&[7, 0, 0, 0], "unknown byte string tag 7");
    refused::<u8>(&[1, 2], "1 bytes left over");
    refused::<Three>(&[1, 0, 0, 0, 9, 0, 0], "2 bytes left over");
}

/// A byte string field of a struct.
#[derive(Deserialize)]
#[allow(dead_code)]
struct Blob(#[serde(with = "typed_ipc::bytes")] Vec<u8>);

#[derive(Deserialize)]
#[allow(dead_code)]
enum Tree {
    Leaf,
    Node(Box<Tree>),
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Nest(Vec<Nest>);

#[derive(Deserialize)]
#[allow(dead_code)]
struct Chain(u8, Option<Box<Chain>>);

/// Runs `f` on a thread with a 2 MiB stack, std's and tokio's default, which the stack
/// budget of a decode is sized for.
fn on_default_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .expect("the decode did not overflow the stack");
}

/// A value that nests as deep as its bytes say is refused past the decode's stack budget,
/// not decoded until the stack overflows and aborts the process.
#[test]
fn nesting_as_deep_as_the_bytes_say_is_refused_not_a_stack_overflow() {
    const DEEP: usize = 1_000_000;
    const TOO_DEEP: &str = "nests deeper than a decode may";
    on_default_stack(|| {
        let mut tree = 1u32.to_le_bytes().repeat(DEEP);
        tree.extend(0u32.to_le_bytes());
        refused::<Tree>(&tree, TOO_DEEP);
        let mut nest = 1u64.to_le_bytes().repeat(DEEP);
        nest.extend(0u64.to_le_bytes());
        refused::<Nest>(&nest, TOO_DEEP);
        let mut chain = [0u8, 1].repeat(DEEP);
        chain.extend([0, 0]);
        refused::<Chain>(&chain, TOO_DEEP);
        // Through fds carried in the nesting too: the fd taken at the top is closed.
        let mut deep = indices(&[0]);
        deep.extend(&tree);
        let (mut read, write) = pipe();
        malformed::<(Fd<OwnedFd>, Tree)>(&deep, vec![write]);
        assert!(writer_closed(&mut read));
    });
}

/// A method whose failure replies a hostile server makes up.
#[typed_ipc::interface]
trait Echo {
    /// `text` back.
    fn echo(&self, text: String) -> String;
}

#[cfg(feature = "tokio")]
mod asynchronous {
    /// [`super::Echo`], called from the async flavour.
    #[typed_ipc::interface]
    pub trait Echo {
        /// `text` back.
        async fn echo(&self, text: String) -> String;
    }
}

/// Which flavour calls.
#[derive(Clone, Copy, Debug)]
enum Flavour {
    Blocking,
    #[cfg(feature = "tokio")]
    Async,
}

const FLAVOURS: &[Flavour] = &[
    Flavour::Blocking,
    #[cfg(feature = "tokio")]
    Flavour::Async,
];

/// Calls `echo` through a real connection of `flavour` whose server answers the call with
/// `body` as a failure reply (envelope kind 4) carrying `fds`, and returns the error the call
/// got.
fn failure_reply(flavour: Flavour, body: Vec<u8>, fds: Vec<OwnedFd>) -> Error {
    answer(flavour, 4, body, fds)
}

/// What a client's call fails with when its peer answers with a message of envelope kind
/// `kind`, the call's envelope otherwise, followed by `body` and `fds`.
fn answer(flavour: Flavour, kind: u8, body: Vec<u8>, fds: Vec<OwnedFd>) -> Error {
    let (client, server) = Socket::pair().unwrap();
    let serving = std::thread::spawn(move || {
        let call = server.recv().unwrap();
        let mut reply = call.payload[..24].to_vec();
        reply[0] = kind;
        reply[1..4].fill(0);
        reply.extend(body);
        let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
        server.send(&reply, &borrowed).unwrap();
        // Until the client hangs up.
        while server.recv().is_ok() {}
    });
    let error = match flavour {
        Flavour::Blocking => {
            let echo = EchoClient::new(Connection::new(client));
            echo.echo("hi".into()).expect_err("an error")
        }
        #[cfg(feature = "tokio")]
        Flavour::Async => {
            let runtime = common::current_thread_runtime();
            runtime.block_on(async {
                let connection = typed_ipc::tokio::AsyncConnection::new(client).unwrap();
                let echo = asynchronous::EchoClient::new(connection);
                echo.echo("hi".into()).await.expect_err("an error")
            })
        }
    };
    serving.join().unwrap();
    error
}

/// A failure reply whose reason is huge, not UTF-8, or of a kind this side does not know, or
/// with bytes or fds past it, is a clear error whose text is bounded; every fd it carried is
/// closed.
#[test]
fn a_peers_malformed_or_huge_failure_reply_is_a_clear_bounded_error() {
    let _lock = fd_count_lock();
    let before = fd_snapshot();
    for &flavour in FLAVOURS {
        failure_replies(flavour);
    }
    typed_ipc::wait_for_closes();
    before.assert_nothing_new();
}

/// A shut-down notice that carries bytes and an fd (a real one carries neither) still fails
/// the call waiting with `ShutDown`, and the fd is closed.
#[test]
fn a_shut_down_notice_with_a_body_and_fds_fails_the_call_and_closes_them() {
    let _lock = fd_count_lock();
    let before = fd_snapshot();
    for &flavour in FLAVOURS {
        let (mut read, write) = pipe();
        match answer(flavour, 8, b"stray".to_vec(), vec![write]) {
            Error::ShutDown => {}
            other => panic!("{flavour:?}: {other:?}"),
        }
        typed_ipc::wait_for_closes();
        assert!(
            writer_closed(&mut read),
            "{flavour:?}: the notice's fd is closed"
        );
    }
    typed_ipc::wait_for_closes();
    before.assert_nothing_new();
}

fn failure_replies(flavour: Flavour) {
    // `Failure::Panicked` (variant 0) with a reason of 8 MiB.
    let huge = "\u{1b}[2J".repeat(2 << 20);
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend(prefixed(huge.len() as u64, huge.as_bytes()));
    match failure_reply(flavour, body, vec![memfd(b"stray")]) {
        Error::Panicked(why) => {
            assert!(why.len() < 16 << 10, "{} bytes", why.len());
            assert!(!why.chars().any(char::is_control), "escaped");
        }
        other => panic!("{flavour:?}: {other:?}"),
    }
    // A kind past the last one this side knows, and a huge one.
    for kind in [9u32, u32::MAX] {
        match failure_reply(flavour, kind.to_le_bytes().to_vec(), Vec::new()) {
            Error::Malformed(why) => assert!(why.contains("variant index"), "{why}"),
            other => panic!("{flavour:?}: {other:?}"),
        }
    }
    // A reason that is not UTF-8, one longer than the message, one with bytes after it.
    let bodies = [
        (
            [0u32.to_le_bytes().as_slice(), &prefixed(2, &[0xc3, 0x28])].concat(),
            "not valid utf8",
        ),
        (
            [5u32.to_le_bytes().as_slice(), &prefixed(u64::MAX, b"no")].concat(),
            EARLY,
        ),
        (
            [3u32.to_le_bytes().as_slice(), &prefixed(0, &[1, 2, 3])].concat(),
            "left over",
        ),
    ];
    for (body, says) in bodies {
        let (mut read, write) = pipe();
        match failure_reply(flavour, body, vec![write]) {
            Error::Malformed(why) => assert!(why.contains(says), "{why}"),
            other => panic!("{flavour:?}: {other:?}"),
        }
        typed_ipc::wait_for_closes();
        assert!(
            writer_closed(&mut read),
            "{flavour:?}: the reply's fd is closed"
        );
    }
}
