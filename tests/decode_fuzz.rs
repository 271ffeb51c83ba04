//! A deterministic fuzz of the typed decode of untrusted bytes.
//!
//! `tests/hostile_peer` mutates the messages of one interface over real connections; this
//! drives [`codec::decode`] directly, type by type, where a failure points at the type
//! whose decode went wrong. For each type it feeds random bytes, valid encodings with bytes
//! flipped, cut short or extended, and valid encodings with a length prefix blown up, each
//! with 0..3 real fds attached. Every decode must return (a panic fails the test, with the
//! input in hex), allocate no more than a bound linear in the message, and leave no fd open.
//! Then [`garbage_calls_to_a_served_interface_get_failures_or_a_hangup`] sends such bodies as
//! calls to a served interface, whose server must answer each or hang up, never panic.
//!
//! The PRNG is a fixed-seed xorshift: a run is reproducible, and takes a few seconds;
//! `FUZZ_SEED=n` runs other inputs.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use typed_ipc::codec::{self, Fd};
use typed_ipc::shared_buffer::SealedBuffer;
use typed_ipc::{Error, SharedBytes};

use common::{fd_count_lock, fd_snapshot, memfd};

/// Counts the bytes this thread asked the allocator for, and the largest single request.
struct Counting;
thread_local! {
    static ASKED: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the allocator runs while thread-locals are torn down too.
    let _ = ASKED.try_with(|asked| asked.set(asked.get() + size));
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        note(new);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// xorshift64*: fixed seed, so every run decodes the same inputs.
struct Rng(u64);

impl Rng {
    /// `seed`, or another one by `FUZZ_SEED=n`, to explore more inputs.
    fn new(seed: u64) -> Rng {
        let other = std::env::var("FUZZ_SEED")
            .ok()
            .and_then(|n| n.parse::<u64>().ok());
        Rng(seed ^ other.unwrap_or(0).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Lengths a hostile peer would announce.
const HUGE: [u64; 7] = [
    u32::MAX as u64,
    u32::MAX as u64 + 1,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 7,
    1 << 20,
];

// ---- the types decoded ----

/// A byte string parameter.
#[derive(Serialize, Deserialize)]
struct Blob(#[serde(with = "typed_ipc::bytes")] Vec<u8>);

#[derive(Serialize, Deserialize)]
enum Shape {
    Unit,
    Point(i32, i32),
    Named {
        label: String,
        inner: Box<Option<Shape>>,
    },
    Many(Vec<Shape>),
    Map(BTreeMap<u16, String>),
}

#[derive(Serialize, Deserialize)]
struct Nested {
    id: u64,
    shapes: Vec<Shape>,
    #[serde(with = "typed_ipc::bytes")]
    raw: Vec<u8>,
    tags: Option<Vec<String>>,
    unit: Vec<()>,
    flag: bool,
    ch: char,
}

/// Fds inside a struct, as a user's parameter has them.
#[derive(Serialize, Deserialize)]
struct WithFds {
    name: String,
    #[serde(with = "typed_ipc::fd")]
    one: OwnedFd,
    #[serde(with = "typed_ipc::fds")]
    many: Vec<OwnedFd>,
    #[serde(with = "typed_ipc::fds")]
    maybe: Option<OwnedFd>,
}

/// A valid encoding of a type, and the fds it carries.
struct Seed {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

fn seed<T: Serialize>(value: &T) -> Seed {
    let (mut bytes, mut borrowed) = (Vec::new(), Vec::new());
    codec::encode(value, &mut bytes, &mut borrowed).unwrap();
    let fds = borrowed
        .iter()
        .map(|fd| fd.try_clone_to_owned().unwrap())
        .collect();
    Seed { bytes, fds }
}

/// One type under test: its name, its decode (the value dropped at once), and valid seeds.
struct Target {
    name: &'static str,
    decode: fn(&[u8], Vec<OwnedFd>) -> Result<(), Error>,
    seeds: Vec<Seed>,
}

fn decode_as<T: DeserializeOwned>(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<(), Error> {
    codec::decode::<T>(bytes, fds).map(drop)
}

fn shape_tree(depth: u32) -> Shape {
    match depth {
        0 => Shape::Point(-1, 2),
        _ => Shape::Named {
            label: "n".repeat(depth as usize),
            inner: Box::new(Some(Shape::Many(vec![
                shape_tree(depth - 1),
                Shape::Unit,
                Shape::Map([(1, "a".into()), (2, "bc".into())].into()),
            ]))),
        },
    }
}

fn targets() -> Vec<Target> {
    let sealed = SealedBuffer::copy_from(b"sealed contents").unwrap();
    let shared = SharedBytes::from(vec![7u8; 64]);
    vec![
        Target {
            name: "String",
            decode: decode_as::<String>,
            seeds: vec![seed(&"hello, wörld".to_string()), seed(&String::new())],
        },
        Target {
            name: "byte string",
            decode: decode_as::<Blob>,
            seeds: vec![seed(&Blob(vec![1, 2, 3, 4, 5])), seed(&Blob(vec![]))],
        },
        Target {
            name: "Vec<String>",
            decode: decode_as::<Vec<String>>,
            seeds: vec![seed(&vec!["a".to_string(), "bcd".into(), String::new()])],
        },
        Target {
            name: "Option<Vec<u64>>",
            decode: decode_as::<Option<Vec<u64>>>,
            seeds: vec![
                seed(&Some(vec![1u64, 2, u64::MAX])),
                seed(&None::<Vec<u64>>),
            ],
        },
        Target {
            name: "nested enums and structs",
            decode: decode_as::<Nested>,
            seeds: vec![seed(&Nested {
                id: 9,
                shapes: vec![shape_tree(3), Shape::Unit],
                raw: vec![0xaa; 10],
                tags: Some(vec!["x".into(), "yz".into()]),
                unit: vec![(), ()],
                flag: true,
                ch: 'é',
            })],
        },
        Target {
            name: "HashMap<String, Vec<u8>>",
            decode: decode_as::<HashMap<String, Vec<u8>>>,
            // Encoded from a map in a fixed order (the same bytes as a `HashMap`'s), so that
            // every run mutates the same seed.
            seeds: vec![seed(&BTreeMap::from([
                ("one".to_string(), vec![1u8]),
                ("two".to_string(), vec![2u8, 2]),
            ]))],
        },
        Target {
            name: "OwnedFd",
            decode: decode_as::<Fd<OwnedFd>>,
            seeds: vec![seed(&Fd(&memfd(b"one")))],
        },
        Target {
            name: "Vec<OwnedFd>",
            decode: decode_as::<Fd<Vec<OwnedFd>>>,
            seeds: vec![seed(&Fd(&vec![memfd(b"a"), memfd(b"b"), memfd(b"c")]))],
        },
        Target {
            name: "Option<OwnedFd>",
            decode: decode_as::<Fd<Option<OwnedFd>>>,
            seeds: vec![seed(&Fd(&Some(memfd(b"x")))), seed(&Fd(&None::<OwnedFd>))],
        },
        Target {
            name: "fds in a struct",
            decode: decode_as::<WithFds>,
            seeds: vec![seed(&WithFds {
                name: "f".into(),
                one: memfd(b"1"),
                many: vec![memfd(b"2"), memfd(b"3")],
                maybe: Some(memfd(b"4")),
            })],
        },
        Target {
            name: "SealedBuffer",
            decode: decode_as::<SealedBuffer>,
            seeds: vec![seed(&sealed)],
        },
        Target {
            name: "SharedBytes",
            decode: decode_as::<SharedBytes>,
            seeds: vec![seed(&shared)],
        },
        Target {
            name: "(String, byte string, Vec<OwnedFd>)",
            decode: decode_as::<(String, Blob, Fd<Vec<OwnedFd>>)>,
            seeds: vec![seed(&(
                "p".to_string(),
                Blob(vec![9; 3]),
                Fd(&vec![memfd(b"q")]),
            ))],
        },
    ]
}

// ---- mutations ----

/// Offsets in `bytes` where a little-endian u64 holds a value no larger than the bytes after
/// it: plausibly a length prefix.
fn length_prefixes(bytes: &[u8]) -> Vec<usize> {
    (0..bytes.len().saturating_sub(7))
        .filter(|&at| {
            let v = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
            v <= (bytes.len() - at - 8) as u64
        })
        .collect()
}

/// A hostile message made from `seed`: one of the three kinds of input, chosen by `round`.
fn mutate(rng: &mut Rng, seed: &[u8], round: usize) -> Vec<u8> {
    match round % 3 {
        0 => {
            let len = rng.below(64);
            rng.bytes(len)
        }
        1 => {
            let mut b = seed.to_vec();
            for _ in 0..1 + rng.below(4) {
                match rng.below(6) {
                    0 if !b.is_empty() => {
                        let at = rng.below(b.len());
                        b[at] ^= 1 << rng.below(8);
                    }
                    1 if !b.is_empty() => {
                        let at = rng.below(b.len());
                        b[at] = rng.next() as u8;
                    }
                    2 => b.truncate(rng.below(b.len() + 1)),
                    // A tag, variant or fd index: small values, or none at all.
                    3 if !b.is_empty() => {
                        let at = rng.below(b.len());
                        b[at] = rng.below(5) as u8;
                    }
                    4 if b.len() >= 4 => {
                        let at = rng.below(b.len() - 3);
                        let v = [0, 1, 2, 3, 16, 17, u32::MAX][rng.below(7)];
                        b[at..at + 4].copy_from_slice(&u32::to_le_bytes(v));
                    }
                    _ => {
                        let extra = rng.below(16);
                        b.extend(rng.bytes(extra));
                    }
                }
            }
            b
        }
        _ => {
            let mut b = seed.to_vec();
            let prefixes = length_prefixes(&b);
            if prefixes.is_empty() {
                b.extend(HUGE[rng.below(HUGE.len())].to_le_bytes());
            } else {
                for _ in 0..1 + rng.below(2) {
                    let at = prefixes[rng.below(prefixes.len())];
                    let huge = HUGE[rng.below(HUGE.len())];
                    b[at..at + 8].copy_from_slice(&huge.to_le_bytes());
                }
            }
            b
        }
    }
}

/// 0..3 fds to attach: the seed's own (cloned) first, then others of other kinds.
fn fds_for(rng: &mut Rng, seed: &Seed) -> Vec<OwnedFd> {
    let mut fds: Vec<OwnedFd> = match rng.below(3) {
        0 => Vec::new(),
        _ => seed.fds.iter().map(|fd| fd.try_clone().unwrap()).collect(),
    };
    for _ in 0..rng.below(3) {
        fds.push(match rng.below(3) {
            0 => memfd(b"stray"),
            1 => {
                let (r, _w) = nix::unistd::pipe().unwrap();
                r
            }
            _ => std::fs::File::open("/dev/null").unwrap().into(),
        });
    }
    fds
}

/// Allocation a decode of `len` bytes may make: its value (every element of which takes a
/// byte of the message, sized up to a few dozen bytes in memory) and an error's text.
fn allocation_bound(len: usize) -> usize {
    (256 << 10) + 256 * len
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const ROUNDS_PER_SEED: usize = 6000;

#[test]
fn hostile_bytes_decode_to_a_value_or_a_clean_error() {
    let _lock = fd_count_lock();
    let targets = targets();
    let before = fd_snapshot();
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let (mut decodes, mut ok) = (0usize, 0usize);
    let mut failures = Vec::new();
    for target in &targets {
        for (s, seed) in target.seeds.iter().enumerate() {
            // The seed itself decodes: the mutations start from a valid message.
            let fds = seed.fds.iter().map(|fd| fd.try_clone().unwrap()).collect();
            if let Err(e) = (target.decode)(&seed.bytes, fds) {
                panic!("{}: seed {s} does not decode: {e}", target.name);
            }
            for round in 0..ROUNDS_PER_SEED {
                let bytes = mutate(&mut rng, &seed.bytes, round);
                let fds = fds_for(&mut rng, seed);
                let n = fds.len();
                let (asked, largest) = (ASKED.with(Cell::get), LARGEST.with(|l| l.replace(0)));
                let result = catch_unwind(AssertUnwindSafe(|| (target.decode)(&bytes, fds)));
                let grew = ASKED.with(Cell::get) - asked;
                let peak = LARGEST.with(|l| l.replace(largest.max(l.get())));
                decodes += 1;
                let what = || format!("{} <- {} with {n} fds", target.name, hex(&bytes));
                match result {
                    Err(_) => failures.push(format!("panicked: {}", what())),
                    Ok(Ok(())) => ok += 1,
                    Ok(Err(Error::Malformed(_) | Error::TooLarge { .. })) => {}
                    Ok(Err(e)) => failures.push(format!("unexpected error {e:?}: {}", what())),
                }
                if grew > allocation_bound(bytes.len()) || peak > allocation_bound(bytes.len()) {
                    failures.push(format!("allocated {grew} (largest {peak}): {}", what()));
                }
            }
        }
    }
    drop(targets);
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), {
        failures.truncate(20);
        failures.join("\n")
    });
    // Not every input is refused: some flips land in the contents of a valid value.
    eprintln!("{decodes} decodes, {ok} to a value");
    assert!(ok > 0 && ok < decodes, "{ok} of {decodes} decoded");
    before.assert_nothing_new();
}

// ---- across a real connection ----

/// A small interface whose arguments are the shapes above.
#[typed_ipc::interface]
trait Fuzzed {
    /// The number of strings and bytes.
    fn strings(&self, s: Vec<String>, blob: Option<Vec<u64>>) -> u64;
    /// The map's size.
    fn map(&self, map: HashMap<String, Vec<u8>>, nested: Nested) -> u64;
    /// How many fds came.
    fn files(&self, one: OwnedFd, many: Vec<OwnedFd>, maybe: Option<OwnedFd>) -> u64;
    /// The sealed buffer's length.
    fn sealed(&self, buffer: SealedBuffer, bytes: Vec<u8>) -> u64;
}

struct Impl;

impl Fuzzed for Impl {
    fn strings(&self, s: Vec<String>, blob: Option<Vec<u64>>) -> u64 {
        (s.len() + blob.map_or(0, |b| b.len())) as u64
    }
    fn map(&self, map: HashMap<String, Vec<u8>>, nested: Nested) -> u64 {
        (map.len() + nested.shapes.len()) as u64
    }
    fn files(&self, _one: OwnedFd, many: Vec<OwnedFd>, maybe: Option<OwnedFd>) -> u64 {
        1 + many.len() as u64 + u64::from(maybe.is_some())
    }
    fn sealed(&self, buffer: SealedBuffer, bytes: Vec<u8>) -> u64 {
        (buffer.len() + bytes.len()) as u64
    }
}

/// Valid argument bodies of each method, by command id.
fn call_seeds() -> Vec<(u32, Seed)> {
    let nested = Nested {
        id: 1,
        shapes: vec![shape_tree(2)],
        raw: vec![3; 5],
        tags: None,
        unit: vec![()],
        flag: false,
        ch: 'x',
    };
    let map = BTreeMap::from([("k".to_string(), vec![1u8, 2])]);
    let sealed = SealedBuffer::copy_from(b"contents").unwrap();
    let many = vec![memfd(b"m1"), memfd(b"m2")];
    let command = |name: &str| {
        (FUZZED_INFO.methods.iter())
            .position(|m| m.name == name)
            .unwrap() as u32
    };
    vec![
        (
            command("strings"),
            seed(&(vec!["a".to_string(), "bc".into()], Some(vec![1u64, 2]))),
        ),
        (command("map"), seed(&(&map, &nested))),
        (
            command("files"),
            seed(&(Fd(&memfd(b"o")), Fd(&many), Fd(&Some(memfd(b"s"))))),
        ),
        (command("sealed"), seed(&(&sealed, Blob(vec![4; 9])))),
    ]
}

/// Mutated calls sent to the served interface.
const CALLS: usize = 4000;

/// Waits for the server's answer to the call `cookie` (`msg`): `true` for a reply or a
/// failure (not a panic of the server's), `false` if the server hung up. A deadline, so that
/// a server that neither answers nor hangs up fails the test rather than hangs it.
fn answer(client: &typed_ipc::Socket, cookie: u64, msg: &[u8]) -> bool {
    loop {
        let frame = match client.recv_timeout(std::time::Duration::from_secs(20)) {
            Ok(frame) => frame,
            Err(Error::TimedOut) => panic!("the server neither answered nor hung up: {}", hex(msg)),
            Err(_) => return false,
        };
        let p = &frame.payload;
        assert!(p.len() >= 24, "a message without an envelope: {p:02x?}");
        if u64::from_le_bytes(p[8..16].try_into().unwrap()) != cookie {
            continue; // an acknowledgement or announcement, not our answer
        }
        match p[0] {
            3 => return true,
            // A failure: its variant 0 is `Panicked`, and our implementation never panics.
            4 => {
                assert_ne!(
                    p.get(24..28),
                    Some(&[0u8; 4][..]),
                    "a panic for {}",
                    hex(msg)
                );
                return true;
            }
            _ => continue,
        }
    }
}

/// How a server ended: `None` if it panicked.
type Ended = Box<dyn FnOnce() -> Option<typed_ipc::Result<()>>>;

#[test]
fn garbage_calls_to_a_served_interface_get_failures_or_a_hangup() {
    let _lock = fd_count_lock();
    attack(|server| {
        let serving = std::thread::spawn(move || {
            let conn = typed_ipc::Connection::new(server);
            conn.serve(FuzzedServer::new(Impl))
        });
        Box::new(move || serving.join().ok())
    });
}

#[cfg(feature = "tokio")]
mod asynchronous {
    use super::{HashMap, Nested, OwnedFd, SealedBuffer};

    /// [`super::Fuzzed`], served by the async flavour.
    #[typed_ipc::interface]
    pub trait Fuzzed {
        /// The number of strings and bytes.
        async fn strings(&self, s: Vec<String>, blob: Option<Vec<u64>>) -> u64;
        /// The map's size.
        async fn map(&self, map: HashMap<String, Vec<u8>>, nested: Nested) -> u64;
        /// How many fds came.
        async fn files(&self, one: OwnedFd, many: Vec<OwnedFd>, maybe: Option<OwnedFd>) -> u64;
        /// The sealed buffer's length.
        async fn sealed(&self, buffer: SealedBuffer, bytes: Vec<u8>) -> u64;
    }
}

#[cfg(feature = "tokio")]
impl asynchronous::Fuzzed for Impl {
    async fn strings(&self, s: Vec<String>, blob: Option<Vec<u64>>) -> u64 {
        Fuzzed::strings(self, s, blob)
    }
    async fn map(&self, map: HashMap<String, Vec<u8>>, nested: Nested) -> u64 {
        Fuzzed::map(self, map, nested)
    }
    async fn files(&self, one: OwnedFd, many: Vec<OwnedFd>, maybe: Option<OwnedFd>) -> u64 {
        Fuzzed::files(self, one, many, maybe)
    }
    async fn sealed(&self, buffer: SealedBuffer, bytes: Vec<u8>) -> u64 {
        Fuzzed::sealed(self, buffer, bytes)
    }
}

#[cfg(feature = "tokio")]
#[test]
fn garbage_calls_to_an_async_served_interface_get_failures_or_a_hangup() {
    let _lock = fd_count_lock();
    let runtime = common::two_worker_runtime();
    attack(|server| {
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let conn = typed_ipc::tokio::AsyncConnection::new(server).unwrap();
            let served = conn.serve(asynchronous::FuzzedServer::new(Impl));
            drop(conn);
            let _ = tx.send(served.await);
        });
        // A task that panicked dropped its sender unsent.
        Box::new(move || rx.recv().ok())
    });
}

/// Sends [`CALLS`] mutated calls to servers that `serve` starts on a socket, a new one
/// whenever the last hung up, and checks each answered or hung up, and none panicked or
/// left an fd open.
fn attack(mut serve: impl FnMut(typed_ipc::Socket) -> Ended) {
    let seeds = call_seeds();
    let before = fd_snapshot();
    let mut rng = Rng::new(0x0123_4567_89ab_cdef);
    let (mut answered, mut hangups) = (0usize, 0usize);
    let mut round = 0;
    while round < CALLS {
        let (client, server) = typed_ipc::Socket::pair().unwrap();
        let ended = serve(server);
        // Mutated calls on this connection until the server hangs up.
        let mut cookie = 1u64;
        loop {
            let (cmd, seed) = &seeds[rng.below(seeds.len())];
            let cmd = match rng.below(8) {
                0 => rng.next() as u32 % 8,
                _ => *cmd,
            };
            let mut msg = common::call_envelope(&FUZZED_INFO, cmd, cookie);
            msg.extend(mutate(&mut rng, &seed.bytes, round));
            let fds = fds_for(&mut rng, seed);
            let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
            round += 1;
            if client.send(&msg, &borrowed).is_err() {
                hangups += 1;
                break;
            }
            drop(fds);
            if !answer(&client, cookie, &msg) {
                hangups += 1;
                break;
            }
            answered += 1;
            cookie += 1;
            if round >= CALLS {
                break;
            }
        }
        drop(client);
        // The server ends cleanly when we hang up (or already has, refusing us).
        if let Err(e) = ended().expect("the server panicked") {
            assert!(
                !matches!(e, Error::Io(_)),
                "the server ended on an error of its own: {e:?}"
            );
        }
    }
    eprintln!("{round} calls: {answered} answered, {hangups} hangups");
    assert!(answered > 0, "{answered} answered, {hangups} hangups");
    drop(seeds);
    before.assert_nothing_new();
}
