//! The runtime against a hostile peer: a deterministic mutation fuzzer.
//!
//! Valid messages of a real generated interface ([`Target`]) are captured once, by relaying a
//! real client's calls to a real server and recording both directions. Each iteration then
//! mutates one of them — bits and bytes of the wire header, the envelope and the body; lengths
//! and counts blown up to gigabytes; bodies cut short or extended; byte-string tags that name
//! regions, pipes or inboxes that do not exist; fds of every kind attached where none are
//! expected; a message split into datagrams sent out of order — and sends it:
//!
//! - to a server ([`Connection::serve`]) on the other end of a socket pair, on a thread of this
//!   process, and to one in a real child process;
//! - with the `tokio` feature, to the async flavour's server too;
//! - and, the other way round, as the *reply* to a real client's call.
//!
//! After each mutated message the peer must reply with an error, ignore it, or end the
//! connection; then a valid call still works (on the same connection if it is open, else on a
//! new one). Nothing may panic (a panic hook records every panic in this process; the child
//! counts its own), hang (every wait has a deadline, and the test fails rather than waits),
//! leak an fd (each connection's end brings the serving process's fd count back to its
//! baseline) or allocate without bound (peak RSS stays under [`MEMORY_LIMIT_KIB`]).
//!
//! The PRNG is a fixed-seed xorshift, so a run is reproducible. `FUZZ_ITERS=200000` runs more
//! iterations than the default (which is tuned to a few seconds in a debug build),
//! `FUZZ_SEED=n` other ones. A failure is reported with the mutations that trigger it,
//! reduced to the fewest that still do, and the datagrams they make, in hex.

mod common;

use std::fmt::Write as _;
use std::fs::File;
use std::io::{IoSlice, Write as _};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg, setsockopt, sockopt};
use serde::{Deserialize, Serialize};
use typed_ipc::wire::{HEADER_LEN, Header, Kind};
use typed_ipc::worker::{self, Worker};
use typed_ipc::{Connection, Error, Frame, Limits, Socket, interface};

// ---- the interface under attack ----

/// A struct argument: a string, a byte string, an fd, an option and a vector.
#[derive(Serialize, Deserialize)]
pub struct Record {
    /// A name.
    pub name: String,
    /// Bytes, as one byte string (placed out of line when large).
    #[serde(with = "typed_ipc::bytes")]
    pub blob: Vec<u8>,
    /// A file.
    #[serde(with = "typed_ipc::fd")]
    pub file: OwnedFd,
    /// Maybe a number.
    pub extra: Option<u32>,
    /// Some strings.
    pub tags: Vec<String>,
}

/// The methods the fuzzer's seeds call: every shape of argument the runtime decodes.
#[interface]
pub trait Target {
    /// The text reversed.
    fn text(&self, text: String) -> String;
    /// The bytes reversed.
    fn bytes(&self, data: Vec<u8>) -> Vec<u8>;
    /// How many files came, plus the label's length.
    fn files(&self, files: Vec<OwnedFd>, label: Option<String>) -> u64;
    /// The same fd back.
    fn one(&self, fd: OwnedFd) -> OwnedFd;
    /// The same fd back, if there was one.
    fn maybe(&self, fd: Option<OwnedFd>) -> Option<OwnedFd>;
    /// The record back, its name added to its tags.
    fn record(&self, record: Record) -> Record;
    /// Nothing back.
    #[oneway]
    fn note(&self, seq: u64, data: Vec<u8>);
    /// `n + 1`: the probe that shows a connection still works.
    fn ping(&self, n: u64) -> u64;
}

/// Command ids (a method's position in the trait), checked in [`capture_seeds`].
const CMD_BYTES: u32 = 1;
const CMD_RECORD: u32 = 5;
const CMD_NOTE: u32 = 6;
const CMD_PING: u32 = 7;

/// The implementation never panics and never touches the fds it gets (a pipe could block a
/// read): whatever goes wrong is the runtime's.
struct Impl;

impl Target for Impl {
    fn text(&self, text: String) -> String {
        text.chars().rev().collect()
    }
    fn bytes(&self, mut data: Vec<u8>) -> Vec<u8> {
        data.reverse();
        data
    }
    fn files(&self, files: Vec<OwnedFd>, label: Option<String>) -> u64 {
        files.len() as u64 + label.map_or(0, |l| l.len() as u64)
    }
    fn one(&self, fd: OwnedFd) -> OwnedFd {
        fd
    }
    fn maybe(&self, fd: Option<OwnedFd>) -> Option<OwnedFd> {
        fd
    }
    fn record(&self, mut record: Record) -> Record {
        record.tags.push(record.name.clone());
        record
    }
    fn note(&self, _seq: u64, _data: Vec<u8>) {}
    fn ping(&self, n: u64) -> u64 {
        n.wrapping_add(1)
    }
}

// ---- budget and oracles ----

/// Peak resident memory allowed of a serving process, however large the lengths it is sent.
const MEMORY_LIMIT_KIB: u64 = 256 << 10;
/// How long a reply may take before the test calls it a hang (generous: a debug build on a
/// loaded 2-CPU machine).
const PATIENCE: Duration = Duration::from_secs(20);
/// Iterations of the in-process server run when `FUZZ_ITERS` is not set; the other runs
/// take a fraction of it.
const DEFAULT_ITERS: u64 = 2000;

fn iterations() -> u64 {
    std::env::var("FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ITERS)
}

fn base_seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f00d)
}

/// The tests of this file count fds and memory of the whole process: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every panic in this process, by any thread, caught or not.
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn record_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current().name().unwrap_or("?").to_string();
            PANICS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("[{thread}] {info}"));
            previous(info);
        }));
    });
}

fn panics_so_far() -> usize {
    PANICS.lock().unwrap_or_else(|e| e.into_inner()).len()
}

fn last_panic() -> String {
    let panics = PANICS.lock().unwrap_or_else(|e| e.into_inner());
    panics.last().cloned().unwrap_or_default()
}

/// `VmHWM` (peak resident set) of process `pid` ("self" for this one), in KiB.
fn peak_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

// ---- a deterministic PRNG ----

/// xorshift64*: small, fast, and the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number below `n` (which is not 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Values that sit on the edges of whatever they are written into.
const INTERESTING_U64: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    16,
    24,
    0x7f,
    0x80,
    0xff,
    1023,
    1024,
    1025,
    4096,
    65535,
    65536,
    (64 << 10) - 24,
    1 << 20,
    32 << 20,
    (32 << 20) + 1,
    1 << 30,
    (1 << 30) + 1,
    u32::MAX as u64 - 1,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

// ---- fds a hostile peer can send ----

/// A kind of fd to attach.
#[derive(Clone, Copy, Debug)]
enum FdKind {
    /// A memfd anyone may write, holding this many bytes.
    Memfd(u32),
    /// A memfd sealed like a shared region (`SHRINK | GROW | WRITE`), this long (sparse).
    Region(u64),
    /// A memfd sealed against resizing only: writable, so no region.
    HalfSealed(u32),
    PipeRead,
    PipeWrite,
    /// A pipe's read end with this many bytes in it.
    PipeWithBytes(u32),
    Socket,
    DevNull,
    Directory,
}

const FD_KINDS: &[FdKind] = &[
    FdKind::Memfd(0),
    FdKind::Memfd(100),
    FdKind::Region(0),
    FdKind::Region(4096),
    FdKind::Region(64 << 10),
    FdKind::Region(32 << 20),
    FdKind::Region((32 << 20) + 4096),
    FdKind::Region(1 << 31),
    FdKind::HalfSealed(4096),
    FdKind::PipeRead,
    FdKind::PipeWrite,
    FdKind::PipeWithBytes(16),
    FdKind::PipeWithBytes(8192),
    FdKind::Socket,
    FdKind::DevNull,
    FdKind::Directory,
];

fn memfd_of(len: u64, sealing: bool) -> OwnedFd {
    let flags = match sealing {
        true => MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        false => MFdFlags::MFD_CLOEXEC,
    };
    let fd = memfd_create(c"hostile", flags).unwrap();
    let mut file = File::from(fd);
    let head: Vec<u8> = (0..len.min(4096)).map(|i| i as u8).collect();
    file.write_all(&head).unwrap();
    file.set_len(len).unwrap();
    file.into()
}

fn make_fd(kind: FdKind) -> OwnedFd {
    match kind {
        FdKind::Memfd(len) => memfd_of(len.into(), false),
        FdKind::Region(len) => {
            let fd = memfd_of(len, true);
            let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE;
            fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).unwrap();
            fd
        }
        FdKind::HalfSealed(len) => {
            let fd = memfd_of(len.into(), true);
            let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW;
            fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).unwrap();
            fd
        }
        FdKind::PipeRead => nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap().0,
        FdKind::PipeWrite => nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap().1,
        FdKind::PipeWithBytes(n) => {
            let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
            File::from(write)
                .write_all(&vec![0xa5; n as usize])
                .unwrap();
            read
        }
        FdKind::Socket => UnixStream::pair().unwrap().0.into(),
        FdKind::DevNull => File::open("/dev/null").unwrap().into(),
        FdKind::Directory => File::open("/").unwrap().into(),
    }
}

// ---- seeds: valid messages, captured ----

/// A message as it went over the wire: payload (envelope first) and fds.
struct Seed {
    name: String,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Seed {
    fn capture(name: &str, frame: &Frame) -> Seed {
        Seed {
            name: name.to_string(),
            payload: frame.payload.clone(),
            fds: frame.fds.iter().map(|fd| fd.try_clone().unwrap()).collect(),
        }
    }
    fn cmd(&self) -> u32 {
        u32::from_le_bytes(self.payload[4..8].try_into().unwrap())
    }
}

/// Valid calls (and oneways) of a real client, and the real server's replies to them.
struct Seeds {
    calls: Vec<Seed>,
    replies: Vec<Seed>,
}

/// Relays a real client's calls to a real server and records both directions: valid
/// messages of every shape, lane placements (regions, a pipe) included.
fn capture_seeds() -> Seeds {
    for (cmd, name) in [
        (CMD_BYTES, "bytes"),
        (CMD_RECORD, "record"),
        (CMD_NOTE, "note"),
        (CMD_PING, "ping"),
    ] {
        assert_eq!(TARGET_INFO.method(cmd).map(|m| m.name), Some(name));
    }
    let (client_end, relay_client) = Socket::pair().unwrap();
    let (relay_server, server_end) = Socket::pair().unwrap();
    let server =
        std::thread::spawn(move || Connection::new(server_end).serve(TargetServer::new(Impl)));
    let client = TargetClient::new(Connection::new(client_end)).with_timeout(PATIENCE);
    let (mut calls, mut replies) = (Vec::new(), Vec::new());
    let mut relay = |name: &str, call: &(dyn Fn(&TargetClient) + Sync), oneway: bool| {
        std::thread::scope(|s| {
            let caller = s.spawn(|| call(&client));
            let frame = relay_client.recv_timeout(PATIENCE).unwrap();
            calls.push(Seed::capture(name, &frame));
            send_frame(&relay_server, &frame);
            if !oneway {
                let reply = relay_server.recv_timeout(PATIENCE).unwrap();
                replies.push(Seed::capture(name, &reply));
                send_frame(&relay_client, &reply);
            }
            caller.join().unwrap();
        });
    };
    let memfd = || common::memfd(b"seed");
    let record = |blob: usize| Record {
        name: "frame-17".into(),
        blob: vec![0x5a; blob],
        file: memfd(),
        extra: Some(7),
        tags: vec!["a".into(), "bc".into()],
    };
    relay("ping", &|c| assert_eq!(c.ping(41).unwrap(), 42), false);
    relay(
        "text",
        &|c| drop(c.text("hello, hostile world".into()).unwrap()),
        false,
    );
    relay(
        "long text",
        &|c| drop(c.text("é".repeat(1500)).unwrap()),
        false,
    );
    relay(
        "small bytes",
        &|c| drop(c.bytes(vec![1; 16]).unwrap()),
        false,
    );
    relay(
        "files",
        &|c| {
            let pipe = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap().0;
            c.files(vec![memfd(), pipe], Some("label".into())).unwrap();
        },
        false,
    );
    relay(
        "no files",
        &|c| assert_eq!(c.files(vec![], None).unwrap(), 0),
        false,
    );
    relay("one", &|c| drop(c.one(memfd()).unwrap()), false);
    relay(
        "maybe some",
        &|c| drop(c.maybe(Some(memfd())).unwrap()),
        false,
    );
    relay("maybe none", &|c| drop(c.maybe(None).unwrap()), false);
    relay(
        "small record",
        &|c| drop(c.record(record(3)).unwrap()),
        false,
    );
    // From here on the client knows the server reads lanes: large byte strings are placed.
    relay(
        "placed bytes, region announced",
        &|c| drop(c.bytes(vec![2; 4096]).unwrap()),
        false,
    );
    relay(
        "placed bytes",
        &|c| drop(c.bytes(vec![3; 8192]).unwrap()),
        false,
    );
    relay(
        "placed record",
        &|c| drop(c.record(record(2048)).unwrap()),
        false,
    );
    relay("note", &|c| c.note(1, vec![4; 8]).unwrap(), true);
    relay(
        "ping after note",
        &|c| assert_eq!(c.ping(1).unwrap(), 2),
        false,
    );
    relay("placed note", &|c| c.note(2, vec![5; 3000]).unwrap(), true);
    relay(
        "ping after placed note",
        &|c| assert_eq!(c.ping(2).unwrap(), 3),
        false,
    );
    relay(
        "fragmented text",
        &|c| drop(c.text("x".repeat(100 << 10)).unwrap()),
        false,
    );
    client.connection().lend_pages_to_peer(true);
    relay(
        "piped bytes",
        &|c| drop(c.bytes(vec![7; 200 << 10]).unwrap()),
        false,
    );
    drop((client, relay_client, relay_server));
    server.join().unwrap().unwrap();
    let tagged = |calls: &[Seed], tag: u8| {
        calls
            .iter()
            .any(|s| s.cmd() == CMD_BYTES && s.payload.get(24) == Some(&tag))
    };
    assert!(
        tagged(&calls, 0) && tagged(&calls, 1) && tagged(&calls, 2),
        "the seeds cover tags 0-2"
    );
    Seeds { calls, replies }
}

fn send_frame(socket: &Socket, frame: &Frame) {
    let fds: Vec<_> = frame.fds.iter().map(|fd| fd.as_fd()).collect();
    socket.send_timeout(&frame.payload, &fds, PATIENCE).unwrap();
}

// ---- mutations ----

/// One change to a message, its random choices drawn up front (positions are taken modulo
/// the length at the time, so any subset of a plan's ops still applies): a plan is data,
/// replayed and reduced as such.
#[derive(Clone, Debug)]
enum Op {
    FlipBit {
        at: u64,
        bit: u8,
        envelope: bool,
    },
    SetByte {
        at: u64,
        value: u8,
    },
    SetU32 {
        at: u64,
        value: u32,
    },
    SetU64 {
        at: u64,
        value: u64,
    },
    /// A u64 that holds a plausible length (at most the bytes left) set to `value`.
    InflateLength {
        nth: u64,
        value: u64,
    },
    Truncate {
        at: u64,
    },
    Append {
        len: u32,
        byte: u8,
    },
    Insert {
        at: u64,
        bytes: Vec<u8>,
    },
    Delete {
        at: u64,
        len: u64,
    },
    Kind(u8),
    Cmd(u32),
    Cookie(u64),
    LaneWord(u32),
    Interface {
        id: u32,
        signature: u32,
    },
    /// The body of another seed (arguments of another method).
    BodyOf {
        seed: u64,
    },
    /// A byte string whose tag and reference are made up, as the body of `cmd`.
    Tagged {
        cmd: u32,
        tag: u8,
        fields: [u64; 4],
        fd_index: u32,
        tail: u32,
    },
    NoFds,
    DropFd {
        nth: u64,
    },
    AddFds {
        kind: FdKind,
        count: u32,
    },
    ShuffleFds {
        seed: u64,
    },
}

/// How the mutated message goes out as datagrams.
#[derive(Clone, Debug)]
enum Framing {
    /// As the transport frames it.
    Normal,
    /// Split into a first datagram and continuations of `chunk` bytes (`fds_first` fds in
    /// the first), then `reorder` applied.
    Split {
        chunk: u32,
        fds_first: u32,
        reorder: Reorder,
    },
    /// A header field of the first datagram changed.
    Header { field: HeaderField, value: u64 },
    /// Only the first `len` bytes (of header and payload) of the datagram.
    Short { len: u8 },
    /// A continuation, alone.
    LoneContinuation,
    /// Nothing at all: a zero-length datagram.
    Empty,
}

#[derive(Clone, Copy, Debug)]
enum Reorder {
    None,
    SwapTwo(u64),
    DropOne(u64),
    Duplicate(u64),
    ContinuationFirst,
}

#[derive(Clone, Copy, Debug)]
enum HeaderField {
    Magic,
    Version,
    Kind,
    Fds,
    Reserved,
    TotalLen,
    TotalFds,
}

/// A mutated message: which seed, what was done to it, how it is framed.
#[derive(Clone, Debug)]
struct Plan {
    seed: usize,
    ops: Vec<Op>,
    framing: Framing,
}

fn random_op(rng: &mut Rng, seeds: usize) -> Op {
    let at = rng.next();
    match rng.below(21) {
        0..=2 => Op::FlipBit {
            at,
            bit: rng.below(8) as u8,
            envelope: rng.chance(2),
        },
        3 => Op::SetByte {
            at,
            value: rng.pick(&[0, 1, 2, 3, 4, 5, 0x7f, 0x80, 0xfe, 0xff]),
        },
        4 => Op::SetU32 {
            at,
            value: rng.pick(INTERESTING_U64) as u32,
        },
        5 => Op::SetU64 {
            at,
            value: rng.pick(INTERESTING_U64),
        },
        6 | 7 => Op::InflateLength {
            nth: rng.next(),
            value: rng.pick(INTERESTING_U64),
        },
        8 => Op::Truncate { at },
        9 => {
            let len = match rng.chance(16) {
                true => rng.below(200 << 10) as u32,
                false => rng.below(64) as u32 + 1,
            };
            Op::Append {
                len,
                byte: rng.next() as u8,
            }
        }
        10 => {
            let bytes = (0..rng.below(12) + 1).map(|_| rng.next() as u8).collect();
            Op::Insert { at, bytes }
        }
        11 => Op::Delete {
            at,
            len: rng.below(16) + 1,
        },
        12 => Op::Kind(rng.below(8) as u8),
        13 => Op::Cmd(match rng.chance(4) {
            true => rng.next() as u32,
            false => rng.below(9) as u32,
        }),
        14 => Op::Cookie(rng.pick(INTERESTING_U64)),
        15 => Op::LaneWord(rng.next() as u32 & 0xff_ffff),
        16 => Op::Interface {
            id: match rng.chance(2) {
                true => TARGET_INFO.id,
                false => rng.next() as u32,
            },
            signature: rng.next() as u32,
        },
        17 => Op::BodyOf {
            seed: rng.below(seeds as u64),
        },
        18 => Op::Tagged {
            cmd: rng.pick(&[CMD_BYTES, CMD_BYTES, CMD_NOTE, CMD_RECORD]),
            tag: match rng.chance(8) {
                true => rng.next() as u8,
                false => rng.below(4) as u8,
            },
            fields: [0; 4].map(|_| match rng.chance(2) {
                true => rng.pick(INTERESTING_U64),
                false => rng.below(3) + 1,
            }),
            fd_index: match rng.below(3) {
                0 => u32::MAX,
                1 => 0,
                _ => rng.below(4) as u32,
            },
            tail: rng.below(64) as u32,
        },
        _ => match rng.below(8) {
            0 => Op::NoFds,
            1 => Op::DropFd { nth: rng.next() },
            2 => Op::ShuffleFds { seed: rng.next() },
            _ => Op::AddFds {
                kind: rng.pick(FD_KINDS),
                count: match rng.chance(20) {
                    true => rng.below(300) as u32 + 1,
                    false => rng.below(3) as u32 + 1,
                },
            },
        },
    }
}

fn random_framing(rng: &mut Rng) -> Framing {
    match rng.below(24) {
        0..=14 => Framing::Normal,
        15..=17 => Framing::Split {
            chunk: rng.pick(&[1, 7, 24, 100, 4096]),
            fds_first: rng.below(3) as u32,
            reorder: match rng.below(6) {
                0 | 1 => Reorder::None,
                2 => Reorder::SwapTwo(rng.next()),
                3 => Reorder::DropOne(rng.next()),
                4 => Reorder::Duplicate(rng.next()),
                _ => Reorder::ContinuationFirst,
            },
        },
        18..=20 => Framing::Header {
            field: rng.pick(&[
                HeaderField::Magic,
                HeaderField::Version,
                HeaderField::Kind,
                HeaderField::Fds,
                HeaderField::Reserved,
                HeaderField::TotalLen,
                HeaderField::TotalLen,
                HeaderField::TotalFds,
                HeaderField::TotalFds,
            ]),
            value: match rng.chance(2) {
                true => rng.pick(INTERESTING_U64),
                false => rng.below(8),
            },
        },
        21 => Framing::Short {
            len: rng.below(HEADER_LEN as u64 + 8) as u8,
        },
        22 => Framing::LoneContinuation,
        _ => match rng.chance(4) {
            true => Framing::Empty,
            false => Framing::Normal,
        },
    }
}

fn random_plan(rng: &mut Rng, seeds: &[Seed]) -> Plan {
    let n = match rng.below(8) {
        0 => 0,
        1..=4 => 1,
        5 | 6 => 2,
        _ => rng.below(6) + 1,
    };
    Plan {
        seed: rng.below(seeds.len() as u64) as usize,
        ops: (0..n).map(|_| random_op(rng, seeds.len())).collect(),
        framing: random_framing(rng),
    }
}

/// Where `at` lands in a buffer of `len` bytes (`None` if it is empty).
fn index(at: u64, len: usize) -> Option<usize> {
    (len > 0).then(|| (at % len as u64) as usize)
}

fn put(payload: &mut [u8], at: u64, bytes: &[u8]) {
    if payload.len() >= bytes.len() {
        let i = (at % (payload.len() - bytes.len() + 1) as u64) as usize;
        payload[i..i + bytes.len()].copy_from_slice(bytes);
    }
}

fn set_envelope(payload: &mut Vec<u8>, range: std::ops::Range<usize>, bytes: &[u8]) {
    if payload.len() < range.end {
        payload.resize(range.end, 0);
    }
    payload[range].copy_from_slice(bytes);
}

/// The body of a call to `cmd` whose byte string is tag `tag` with made-up fields.
fn tagged_body(cmd: u32, tag: u8, fields: [u64; 4], fd_index: u32, tail: u32) -> Vec<u8> {
    let mut s = vec![tag];
    match tag {
        0 => {
            s.extend_from_slice(&fields[0].to_le_bytes());
            s.extend(std::iter::repeat_n(
                0x61,
                (fields[0] as usize).min(tail as usize),
            ));
        }
        1 => {
            s.extend_from_slice(&(fields[0] as u32).to_le_bytes()); // seq
            s.extend_from_slice(&fd_index.to_le_bytes());
            s.extend_from_slice(&fields[1].to_le_bytes()); // offset
            s.extend_from_slice(&fields[2].to_le_bytes()); // len
        }
        2 => {
            s.extend_from_slice(&(fields[0] as u32).to_le_bytes()); // seq
            s.extend_from_slice(&fd_index.to_le_bytes());
            s.extend_from_slice(&fields[1].to_le_bytes()); // len in the pipe
            s.extend_from_slice(&fields[2].to_le_bytes()); // inline tail's length
            s.extend(std::iter::repeat_n(0x62, tail as usize));
        }
        3 => {
            s.extend_from_slice(&(fields[0] as u32).to_le_bytes()); // seq
            s.extend_from_slice(&fields[1].to_le_bytes()); // generation
            s.extend_from_slice(&fields[2].to_le_bytes()); // len
        }
        _ => s.extend(fields.iter().flat_map(|f| f.to_le_bytes())),
    }
    let mut body = Vec::new();
    match cmd {
        CMD_NOTE => {
            body.extend_from_slice(&9u64.to_le_bytes());
            body.extend_from_slice(&s);
        }
        CMD_RECORD => {
            body.extend_from_slice(&3u64.to_le_bytes());
            body.extend_from_slice(b"rec");
            body.extend_from_slice(&s);
            body.extend_from_slice(&0u32.to_le_bytes()); // fd index
            body.push(0); // extra: None
            body.extend_from_slice(&0u64.to_le_bytes()); // no tags
        }
        _ => body = s,
    }
    // A second out-of-line string in the same message, sometimes.
    if fields[3] == 2 {
        body.extend_from_slice(&body.clone());
    }
    body
}

/// The message a plan makes of its seed: payload and fds.
fn apply(plan: &Plan, seeds: &[Seed]) -> (Vec<u8>, Vec<OwnedFd>) {
    let seed = &seeds[plan.seed];
    let mut payload = seed.payload.clone();
    let mut fds: Vec<OwnedFd> = seed.fds.iter().map(|f| f.try_clone().unwrap()).collect();
    for op in &plan.ops {
        match op {
            Op::FlipBit { at, bit, envelope } => {
                let len = match envelope {
                    true => payload.len().min(24),
                    false => payload.len(),
                };
                if let Some(i) = index(*at, len) {
                    payload[i] ^= 1 << bit;
                }
            }
            Op::SetByte { at, value } => put(&mut payload, *at, &[*value]),
            Op::SetU32 { at, value } => put(&mut payload, *at, &value.to_le_bytes()),
            Op::SetU64 { at, value } => put(&mut payload, *at, &value.to_le_bytes()),
            Op::InflateLength { nth, value } => {
                let candidates: Vec<usize> = (24..payload.len().saturating_sub(7))
                    .filter(|&i| {
                        let v = u64::from_le_bytes(payload[i..i + 8].try_into().unwrap());
                        v > 0 && v <= (payload.len() - i - 8) as u64
                    })
                    .collect();
                if let Some(i) = index(*nth, candidates.len()) {
                    let i = candidates[i];
                    payload[i..i + 8].copy_from_slice(&value.to_le_bytes());
                }
            }
            Op::Truncate { at } => {
                let len = index(*at, payload.len() + 1).unwrap_or(0);
                payload.truncate(len);
            }
            Op::Append { len, byte } => {
                payload.extend(std::iter::repeat_n(*byte, *len as usize));
            }
            Op::Insert { at, bytes } => {
                let i = index(*at, payload.len() + 1).unwrap_or(0);
                payload.splice(i..i, bytes.iter().copied());
            }
            Op::Delete { at, len } => {
                if let Some(i) = index(*at, payload.len()) {
                    let end = (i + *len as usize).min(payload.len());
                    payload.drain(i..end);
                }
            }
            Op::Kind(kind) => set_envelope(&mut payload, 0..1, &[*kind]),
            Op::Cmd(cmd) => set_envelope(&mut payload, 4..8, &cmd.to_le_bytes()),
            Op::Cookie(cookie) => set_envelope(&mut payload, 8..16, &cookie.to_le_bytes()),
            Op::LaneWord(word) => set_envelope(&mut payload, 1..4, &word.to_le_bytes()[..3]),
            Op::Interface { id, signature } => {
                set_envelope(&mut payload, 16..20, &id.to_le_bytes());
                set_envelope(&mut payload, 20..24, &signature.to_le_bytes());
            }
            Op::BodyOf { seed } => {
                let other = &seeds[*seed as usize % seeds.len()];
                payload.truncate(24);
                payload.extend_from_slice(other.payload.get(24..).unwrap_or_default());
                fds.extend(other.fds.iter().map(|f| f.try_clone().unwrap()));
            }
            Op::Tagged {
                cmd,
                tag,
                fields,
                fd_index,
                tail,
            } => {
                payload.truncate(24);
                set_envelope(&mut payload, 4..8, &cmd.to_le_bytes());
                payload.extend_from_slice(&tagged_body(*cmd, *tag, *fields, *fd_index, *tail));
            }
            Op::NoFds => fds.clear(),
            Op::DropFd { nth } => {
                if let Some(i) = index(*nth, fds.len()) {
                    fds.remove(i);
                }
            }
            Op::AddFds { kind, count } => fds.extend((0..*count).map(|_| make_fd(*kind))),
            Op::ShuffleFds { seed } => {
                let mut rng = Rng::new(*seed);
                for i in (1..fds.len()).rev() {
                    fds.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
        }
    }
    (payload, fds)
}

/// One datagram: header and payload bytes, and the fds that go with it.
struct Datagram {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

fn header(kind: Kind, fds: usize, total_len: usize, total_fds: usize) -> Vec<u8> {
    Header {
        kind,
        fds: fds as u16,
        total_len: total_len as u32,
        total_fds: total_fds as u32,
    }
    .encode()
    .to_vec()
}

/// The datagrams of a message of `payload` and `fds`, split into continuations of `chunk`
/// bytes once the first (which has `fds_first` fds and no bytes) is out.
fn split(payload: &[u8], mut fds: Vec<OwnedFd>, chunk: usize, fds_first: usize) -> Vec<Datagram> {
    let (total_len, total_fds) = (payload.len(), fds.len());
    let first: Vec<OwnedFd> = fds.drain(..fds_first.min(fds.len())).collect();
    let mut out = vec![Datagram {
        bytes: header(Kind::First, first.len(), total_len, total_fds),
        fds: first,
    }];
    let mut rest = payload;
    while !rest.is_empty() || !fds.is_empty() {
        let (now, later) = rest.split_at(rest.len().min(chunk));
        let these: Vec<OwnedFd> = fds.drain(..fds.len().min(253)).collect();
        let mut bytes = header(Kind::More, these.len(), total_len, total_fds);
        bytes.extend_from_slice(now);
        out.push(Datagram { bytes, fds: these });
        rest = later;
    }
    out
}

/// The datagrams a plan sends.
fn datagrams(plan: &Plan, seeds: &[Seed]) -> Vec<Datagram> {
    let (payload, fds) = apply(plan, seeds);
    let normal =
        |payload: &[u8], fds: Vec<OwnedFd>| match payload.len() <= 60 << 10 && fds.len() <= 253 {
            true => {
                let mut bytes = header(Kind::First, fds.len(), payload.len(), fds.len());
                bytes.extend_from_slice(payload);
                vec![Datagram { bytes, fds }]
            }
            false => split(payload, fds, 60 << 10, 253),
        };
    match &plan.framing {
        Framing::Normal => normal(&payload, fds),
        Framing::Split {
            chunk,
            fds_first,
            reorder,
        } => {
            let chunk = (*chunk as usize).max(payload.len() / 64).max(1);
            let mut d = split(&payload, fds, chunk, *fds_first as usize);
            let n = d.len() as u64;
            match *reorder {
                Reorder::None => {}
                Reorder::SwapTwo(r) if n > 2 => d.swap(1 + (r % (n - 1)) as usize, 1),
                Reorder::DropOne(r) if n > 1 => drop(d.remove(1 + (r % (n - 1)) as usize)),
                Reorder::Duplicate(r) => {
                    let i = (r % n) as usize;
                    let fds = d[i].fds.iter().map(|f| f.try_clone().unwrap()).collect();
                    let copy = Datagram {
                        bytes: d[i].bytes.clone(),
                        fds,
                    };
                    d.insert(i, copy);
                }
                Reorder::ContinuationFirst if n > 1 => d.swap(0, 1),
                _ => {}
            }
            d
        }
        Framing::Header { field, value } => {
            let mut d = normal(&payload, fds);
            let b = &mut d[0].bytes;
            match field {
                HeaderField::Magic => b[*value as usize % 2] ^= 0x20,
                HeaderField::Version => b[2] = *value as u8,
                HeaderField::Kind => b[3] = *value as u8,
                HeaderField::Fds => b[4..6].copy_from_slice(&(*value as u16).to_le_bytes()),
                HeaderField::Reserved => b[6 + *value as usize % 2] = (*value as u8).max(1),
                HeaderField::TotalLen => b[8..12].copy_from_slice(&(*value as u32).to_le_bytes()),
                HeaderField::TotalFds => b[12..16].copy_from_slice(&(*value as u32).to_le_bytes()),
            }
            d
        }
        Framing::Short { len } => {
            let mut d = normal(&payload, fds);
            d.truncate(1);
            d[0].bytes.truncate(*len as usize);
            d
        }
        Framing::LoneContinuation => {
            let mut bytes = header(Kind::More, fds.len().min(253), payload.len(), fds.len());
            bytes.extend_from_slice(&payload[..payload.len().min(60 << 10)]);
            vec![Datagram {
                bytes,
                fds: fds.into_iter().take(253).collect(),
            }]
        }
        Framing::Empty => vec![Datagram {
            bytes: Vec::new(),
            fds: Vec::new(),
        }],
    }
}

/// The plan, its seed and its datagrams, for a report.
fn describe(plan: &Plan, seeds: &[Seed]) -> String {
    let mut s = format!(
        "seed #{} ({}), ops {:?}, framing {:?}\n",
        plan.seed, seeds[plan.seed].name, plan.ops, plan.framing
    );
    for (i, d) in datagrams(plan, seeds).iter().enumerate() {
        let shown = &d.bytes[..d.bytes.len().min(160)];
        let hex: String = shown.iter().fold(String::new(), |mut h, b| {
            let _ = write!(h, "{b:02x}");
            h
        });
        let more = match d.bytes.len() > shown.len() {
            true => format!("... ({} bytes)", d.bytes.len()),
            false => String::new(),
        };
        let _ = writeln!(s, "  datagram {i}: {} fds, {hex}{more}", d.fds.len());
    }
    s
}

/// Sends one datagram as it is, however wrong: `Ok(false)` if the peer is gone.
fn send_datagram(socket: &Socket, d: &Datagram) -> Result<bool, String> {
    let raw: Vec<RawFd> = d.fds.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(&d.bytes)];
    let fd = socket.as_fd().as_raw_fd();
    match sendmsg::<UnixAddr>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
        Ok(_) => Ok(true),
        Err(nix::Error::EPIPE | nix::Error::ECONNRESET | nix::Error::ENOTCONN) => Ok(false),
        // More fds than one datagram may carry, or more bytes than the socket takes: the
        // kernel refuses the datagram, and the peer never sees it.
        Err(nix::Error::EINVAL | nix::Error::EMSGSIZE | nix::Error::ETOOMANYREFS) => Ok(true),
        Err(nix::Error::EAGAIN) => Err("the peer stopped reading: a send timed out".into()),
        Err(e) => Err(format!("sendmsg: {e}")),
    }
}

/// Makes blocking sends on `socket` give up (with `EAGAIN`) rather than hang.
fn send_deadline(socket: &Socket) {
    let limit = nix::sys::time::TimeVal::new(PATIENCE.as_secs() as i64, 0);
    setsockopt(socket, sockopt::SendTimeout, &limit).unwrap();
}

// ---- the server side: targets, probes, oracles ----

/// What went wrong, by kind (distinct kinds are reported once each).
#[derive(Debug)]
struct Finding {
    kind: String,
    detail: String,
}

fn finding(kind: &str, detail: impl Into<String>) -> Finding {
    Finding {
        kind: kind.to_string(),
        detail: detail.into(),
    }
}

/// How a connection ended, as its server saw it.
struct Ended {
    /// `serve`'s result, as text.
    outcome: String,
    /// A panic happened in the serving process while it served.
    panicked: Option<String>,
}

/// A server to attack: each `connect` gives a fresh connection to it, and `finish` waits
/// for the server to be done with it (after our end is closed) and checks what it left.
trait Server {
    fn name(&self) -> String;
    fn connect(&mut self, rng: &mut Rng) -> Socket;
    fn finish(&mut self) -> Result<Ended, Finding>;
    /// After `finish`: the serving process's fds are back to what they were, and its peak
    /// memory is within bounds.
    fn check_resources(&mut self) -> Result<(), Finding>;
}

/// How a fuzzed connection is served: chosen at random for each one.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Setup {
    /// Keeps an inbox the peer may write byte strings into (it never shows it can).
    pub accept_writes: bool,
    /// Accepts messages of 16 KiB and 4 fds at most, so limits are reached with the sizes
    /// the seeds have.
    pub small_limits: bool,
    /// Serving threads: 1 runs requests in order, more queue them.
    pub threads: u32,
}

impl Setup {
    fn random(rng: &mut Rng) -> Setup {
        Setup {
            accept_writes: rng.chance(4),
            small_limits: rng.chance(4),
            threads: rng.pick(&[1, 1, 2]),
        }
    }
}

/// Serves `Target` on `socket` as `setup` says, until the connection ends; the socket is
/// closed when this returns.
fn serve_target(mut socket: Socket, setup: Setup) -> typed_ipc::Result<()> {
    if setup.small_limits {
        socket.set_limits(Limits {
            max_message_len: 16 << 10,
            max_fds: 4,
        });
    }
    let conn = Connection::new(socket);
    if setup.accept_writes {
        conn.accept_writes_from_peer()?;
    }
    let served = typed_ipc::Server::new()
        .service(TargetServer::new(Impl))
        .threads(setup.threads as usize)
        .serve(&conn);
    drop(conn);
    served
}

/// A server on a thread of this process, at the other end of a socket pair.
struct ThreadServer {
    done: Option<mpsc::Receiver<typed_ipc::Result<()>>>,
    baseline: usize,
    panics: usize,
}

impl ThreadServer {
    fn new() -> ThreadServer {
        ThreadServer {
            done: None,
            baseline: common::open_fds(),
            panics: panics_so_far(),
        }
    }
}

impl Server for ThreadServer {
    fn name(&self) -> String {
        "a server thread".into()
    }
    fn connect(&mut self, rng: &mut Rng) -> Socket {
        let (ours, theirs) = Socket::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let setup = Setup::random(rng);
        std::thread::Builder::new()
            .name("target-server".into())
            .spawn(move || {
                let _ = tx.send(serve_target(theirs, setup));
            })
            .unwrap();
        self.done = Some(rx);
        ours
    }
    fn finish(&mut self) -> Result<Ended, Finding> {
        let done = self.done.take().expect("connected");
        let outcome = match done.recv_timeout(PATIENCE) {
            Ok(result) => format!("{result:?}"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(finding(
                    "hang",
                    "the server did not return after its peer hung up",
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => "the server thread died".into(),
        };
        let panicked = (panics_so_far() > self.panics).then(last_panic);
        self.panics = panics_so_far();
        Ok(Ended { outcome, panicked })
    }
    fn check_resources(&mut self) -> Result<(), Finding> {
        let now = common::open_fds();
        if now != self.baseline {
            return Err(finding(
                "fd leak",
                format!(
                    "{now} fds open after the connection ended, {} before",
                    self.baseline
                ),
            ));
        }
        check_peak("self")
    }
}

fn check_peak(pid: &str) -> Result<(), Finding> {
    match peak_kib(pid) {
        kib if kib > MEMORY_LIMIT_KIB => Err(finding(
            "memory",
            format!("peak RSS {kib} KiB, over {MEMORY_LIMIT_KIB} KiB"),
        )),
        _ => Ok(()),
    }
}

/// What the server sent us, judged: our probe's reply (`Ok(true)`), something else a
/// server may send (`Ok(false)`), or a finding.
fn judge_incoming(frame: &Frame, probe: u64) -> Result<bool, Finding> {
    let p = &frame.payload;
    if p.len() < 24 {
        return Err(finding(
            "bad server message",
            format!("{} bytes, no envelope", p.len()),
        ));
    }
    let cookie = u64::from_le_bytes(p[8..16].try_into().unwrap());
    match p[0] {
        3 if cookie == probe => match p.get(24..) {
            Some(body) if body == (probe + 1).to_le_bytes() => Ok(true),
            _ => Err(finding(
                "probe failed",
                format!("the probe's reply is {p:02x?}"),
            )),
        },
        3 | 5 => Ok(false),
        4 => {
            // A Failure: bincode's variant index first. 0 is `Panicked`: our implementation
            // never panics, so that was the runtime.
            let variant = p
                .get(24..28)
                .map(|v| u32::from_le_bytes(v.try_into().unwrap()));
            let text = String::from_utf8_lossy(&p[24..]).into_owned();
            if variant == Some(0) {
                return Err(finding("panic reported by the server", text));
            }
            if cookie == probe {
                return Err(finding("probe failed", format!("the probe failed: {text}")));
            }
            Ok(false)
        }
        k => Err(finding(
            "bad server message",
            format!("envelope kind {k} from a server"),
        )),
    }
}

/// Whether the connection still answers a valid call.
enum Probe {
    Alive,
    Ended,
}

/// Sends a valid `ping` and reads until its reply (the connection works) or the hang-up.
fn probe(socket: &Socket, cookie: u64) -> Result<Probe, Finding> {
    let mut msg = common::call_envelope(&TARGET_INFO, CMD_PING, cookie);
    msg.extend_from_slice(&cookie.to_le_bytes());
    match socket.send_timeout(&msg, &[], PATIENCE) {
        Ok(()) => {}
        Err(Error::Disconnected) => return Ok(Probe::Ended),
        Err(Error::TimedOut) => return Err(finding("hang", "the server stopped reading")),
        Err(e) => return Err(finding("probe failed", format!("sending the probe: {e}"))),
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match socket.recv_timeout(left) {
            Ok(frame) => {
                if judge_incoming(&frame, cookie)? {
                    return Ok(Probe::Alive);
                }
            }
            Err(Error::Disconnected) => return Ok(Probe::Ended),
            Err(Error::TimedOut) => {
                return Err(finding("hang", "no reply to a valid call, and no hang-up"));
            }
            Err(e) => return Err(finding("bad server message", format!("receiving: {e}"))),
        }
    }
}

/// Sends a plan's datagrams then probes: `Ok(true)` if the connection still works.
fn attack(socket: &Socket, plan: &Plan, seeds: &[Seed], cookie: u64) -> Result<bool, Finding> {
    for d in datagrams(plan, seeds) {
        match send_datagram(socket, &d) {
            Ok(true) => {}
            Ok(false) => break,
            Err(why) => return Err(finding("hang", why)),
        }
    }
    Ok(matches!(probe(socket, cookie)?, Probe::Alive))
}

/// Checks how a connection ended and what it left behind.
fn check_end(server: &mut dyn Server) -> Result<String, Finding> {
    let ended = server.finish()?;
    if let Some(panic) = ended.panicked {
        return Err(finding("panic", panic));
    }
    if ended.outcome.contains("died") || ended.outcome.contains("panicked") {
        return Err(finding("panic", ended.outcome));
    }
    server.check_resources()?;
    Ok(ended.outcome)
}

/// A plan run on a fresh connection of its own (to reduce it): the finding, if any.
fn replay(server: &mut dyn Server, rng: &mut Rng, plan: &Plan, seeds: &[Seed]) -> Option<Finding> {
    let socket = server.connect(rng);
    send_deadline(&socket);
    let attacked = attack(&socket, plan, seeds, 1 << 40);
    drop(socket);
    let end = check_end(server);
    attacked.err().or(end.err())
}

/// Removes ops from a failing plan while it still fails the same way.
fn reduce(server: &mut dyn Server, plan: &Plan, seeds: &[Seed], kind: &str) -> Plan {
    let mut rng = Rng::new(1);
    let mut best = plan.clone();
    let mut i = best.ops.len();
    while i > 0 {
        i -= 1;
        let mut fewer = best.clone();
        fewer.ops.remove(i);
        if replay(server, &mut rng, &fewer, seeds).is_some_and(|f| f.kind == kind) {
            best = fewer;
        }
    }
    if !matches!(best.framing, Framing::Normal) {
        let plain = Plan {
            framing: Framing::Normal,
            ..best.clone()
        };
        if replay(server, &mut rng, &plain, seeds).is_some_and(|f| f.kind == kind) {
            best = plain;
        }
    }
    best
}

/// Outcomes seen, by kind, to show what the run covered.
#[derive(Default)]
struct Tally(std::collections::BTreeMap<String, u64>);

impl Tally {
    fn add(&mut self, what: &str) {
        let key: String = what.chars().take(60).collect();
        *self.0.entry(key).or_default() += 1;
    }
}

/// Attacks `server` with `iters` mutated messages; returns the findings (at most one per
/// kind, reduced) and what the connections ended with.
fn fuzz_server(
    server: &mut dyn Server,
    seeds: &[Seed],
    iters: u64,
    seed: u64,
) -> (Vec<String>, Tally) {
    let mut rng = Rng::new(seed);
    let mut findings: Vec<String> = Vec::new();
    let mut kinds: Vec<String> = Vec::new();
    let mut tally = Tally::default();
    let mut socket = Some(server.connect(&mut rng));
    send_deadline(socket.as_ref().unwrap());
    let mut cookie = 1u64 << 40;
    let mut report = |server: &mut dyn Server, plan: &Plan, f: Finding, iteration: u64| {
        if kinds.contains(&f.kind) {
            return;
        }
        kinds.push(f.kind.clone());
        let fatal = f.kind == "hang";
        let reduced = match fatal {
            true => plan.clone(), // a hung server cannot be asked again
            false => reduce(server, plan, seeds, &f.kind),
        };
        findings.push(format!(
            "{} against {}, iteration {iteration} (FUZZ_SEED={}): {}\n  {}",
            f.kind,
            server.name(),
            base_seed(),
            f.detail,
            describe(&reduced, seeds).replace('\n', "\n  ")
        ));
    };
    for i in 0..iters {
        let plan = random_plan(&mut rng, seeds);
        cookie += 1;
        let live = socket.as_ref().unwrap();
        let alive = match attack(live, &plan, seeds, cookie) {
            Ok(alive) => alive,
            Err(f) => {
                let fatal = f.kind == "hang";
                report(server, &plan, f, i);
                if fatal {
                    return (findings, tally);
                }
                false
            }
        };
        // Now and then hang up ourselves, to check what a connection leaves behind.
        if !alive || rng.chance(50) || i + 1 == iters {
            drop(socket.take());
            match check_end(server) {
                Ok(outcome) => tally.add(&outcome),
                Err(f) => {
                    let fatal = f.kind == "hang";
                    report(server, &plan, f, i);
                    if fatal {
                        return (findings, tally);
                    }
                }
            }
            if i + 1 < iters {
                socket = Some(server.connect(&mut rng));
                send_deadline(socket.as_ref().unwrap());
            }
        } else {
            tally.add("still serving");
        }
    }
    (findings, tally)
}

fn report(name: &str, iters: u64, findings: &[String], tally: &Tally) {
    eprintln!(
        "{name}: {iters} mutated messages (peak RSS of this process {} KiB); outcomes:",
        peak_kib("self")
    );
    for (what, n) in &tally.0 {
        eprintln!("  {n:>6}  {what}");
    }
    assert!(
        findings.is_empty(),
        "{name}: {} distinct failure(s):\n{}",
        findings.len(),
        findings.join("\n")
    );
}

#[test]
fn a_server_thread_survives_mutated_messages() {
    let _serial = serial();
    record_panics();
    let seeds = capture_seeds();
    let mut server = ThreadServer::new();
    let iters = iterations();
    let (findings, tally) = fuzz_server(&mut server, &seeds.calls, iters, base_seed());
    report("server thread", iters, &findings, &tally);
}

// ---- a server in a child process ----

/// What the child process serves its parent: one fuzzed connection at a time.
#[interface]
pub trait Host {
    /// Serves `socket` as a `Target` until the connection ends, then reports.
    fn serve_one(&self, socket: OwnedFd, setup: Setup) -> Served;
}

/// How one connection went in the child, and the state it left the child in.
#[derive(Debug, Serialize, Deserialize)]
pub struct Served {
    /// `serve`'s result.
    pub outcome: String,
    /// Open fds once the connection is gone.
    pub fds: u64,
    /// Peak RSS so far, KiB.
    pub peak_kib: u64,
    /// Panics in the child so far, the last one's message.
    pub panics: Vec<String>,
}

struct HostImpl;

impl Host for HostImpl {
    fn serve_one(&self, socket: OwnedFd, setup: Setup) -> Served {
        let outcome = match Socket::from_fd(socket) {
            Ok(socket) => format!("{:?}", serve_target(socket, setup)),
            Err(e) => format!("not a socket: {e}"),
        };
        let panics = PANICS.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Served {
            outcome,
            fds: common::open_fds() as u64,
            peak_kib: peak_kib("self"),
            panics,
        }
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_host() {
    record_panics();
    let conn = worker::connection().unwrap();
    HostServer::new(HostImpl).serve(conn).unwrap();
}

/// A server in a child process: each connection is handed to it over its worker connection.
struct ChildServer {
    _worker: Worker,
    host: HostClient,
    pid: u32,
    done: Option<mpsc::Receiver<typed_ipc::Result<Served>>>,
    baseline: Option<u64>,
    last: Option<Served>,
}

impl Server for ChildServer {
    fn name(&self) -> String {
        format!("a server in child process {}", self.pid)
    }
    fn connect(&mut self, rng: &mut Rng) -> Socket {
        let (ours, theirs) = Socket::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let host = self.host.clone();
        let setup = Setup::random(rng);
        std::thread::spawn(move || tx.send(host.serve_one(theirs.into(), setup)));
        self.done = Some(rx);
        ours
    }
    fn finish(&mut self) -> Result<Ended, Finding> {
        let done = self.done.take().expect("connected");
        let served = match done.recv_timeout(PATIENCE) {
            Ok(Ok(served)) => served,
            Ok(Err(e)) => return Err(finding("child died", format!("{e}"))),
            Err(_) => {
                return Err(finding(
                    "hang",
                    "the child did not return after its peer hung up",
                ));
            }
        };
        let ended = Ended {
            outcome: served.outcome.clone(),
            panicked: served.panics.last().cloned(),
        };
        self.last = Some(served);
        Ok(ended)
    }
    fn check_resources(&mut self) -> Result<(), Finding> {
        let served = self.last.as_ref().expect("finished");
        let baseline = *self.baseline.get_or_insert(served.fds);
        if served.fds != baseline {
            return Err(finding(
                "fd leak",
                format!(
                    "the child has {} fds open between connections, {baseline} before",
                    served.fds
                ),
            ));
        }
        match served.peak_kib {
            kib if kib > MEMORY_LIMIT_KIB => Err(finding(
                "memory",
                format!("the child's peak RSS is {kib} KiB, over {MEMORY_LIMIT_KIB} KiB"),
            )),
            _ => Ok(()),
        }
    }
}

#[test]
fn a_server_process_survives_mutated_messages() {
    let _serial = serial();
    record_panics();
    let seeds = capture_seeds();
    let mut command = common::child("child_host");
    // Its panics come back in `Served`; its stderr would only repeat the runtime's line
    // for every oneway the fuzzer breaks.
    command.stderr(std::process::Stdio::null());
    let (worker, conn) = Worker::spawn(command).unwrap();
    let mut server = ChildServer {
        pid: worker.id(),
        _worker: worker,
        host: HostClient::new(conn).with_timeout(PATIENCE * 2),
        done: None,
        baseline: None,
        last: None,
    };
    // A first connection, ended at once, sets the child's baseline.
    let mut rng = Rng::new(0);
    drop(server.connect(&mut rng));
    check_end(&mut server).unwrap();
    let iters = iterations() / 4;
    let (findings, tally) = fuzz_server(&mut server, &seeds.calls, iters, base_seed() ^ 0xc41d);
    if let Some(served) = &server.last {
        eprintln!("the child's peak RSS: {} KiB", served.peak_kib);
    }
    report("server process", iters, &findings, &tally);
}

// ---- the client side: a hostile server ----

/// A real client of `Target`, of either flavour.
trait Caller: Sync {
    /// Calls the method with command id `cmd` (not `note`) with arguments of its own.
    fn call(&self, cmd: u32) -> typed_ipc::Result<()>;
    fn is_closed(&self) -> bool;
    /// Ends the connection and waits until it has let go of everything.
    fn close(&self);
}

impl Caller for TargetClient {
    fn call(&self, cmd: u32) -> typed_ipc::Result<()> {
        match cmd {
            0 => self.text("hostile".into()).map(drop),
            1 => self.bytes(vec![9; 32]).map(drop),
            2 => self
                .files(vec![common::memfd(b"x")], Some("l".into()))
                .map(drop),
            3 => self.one(common::memfd(b"y")).map(drop),
            4 => self.maybe(None).map(drop),
            5 => self.record(record_arg()).map(drop),
            _ => self.ping(5).map(drop),
        }
    }
    fn is_closed(&self) -> bool {
        self.connection().is_closed()
    }
    fn close(&self) {}
}

fn record_arg() -> Record {
    Record {
        name: "r".into(),
        blob: vec![1; 2048],
        file: common::memfd(b"z"),
        extra: None,
        tags: vec![],
    }
}

/// A real client on one connection, and the fuzzer's raw end of it.
struct ClientSide {
    caller: Box<dyn Caller>,
    fake: Socket,
}

/// A fresh raw socket pair for a client; every fourth one accepts messages of 16 KiB and 4
/// fds at most, so limits are reached with the sizes the seeds have.
fn client_socket(n: &mut u64) -> (Socket, Socket) {
    let (mut ours, theirs) = Socket::pair().unwrap();
    *n += 1;
    if *n % 4 == 0 {
        ours.set_limits(Limits {
            max_message_len: 16 << 10,
            max_fds: 4,
        });
    }
    (ours, theirs)
}

/// The client's next message that is not a failure reply: a client answers a mutated
/// message it took for a request over its limits with one (envelope kind 4), before its
/// next call.
fn recv_call(fake: &Socket) -> typed_ipc::Result<Frame> {
    loop {
        let frame = fake.recv_timeout(PATIENCE)?;
        if frame.payload.first() != Some(&4) {
            return Ok(frame);
        }
    }
}

/// The reply to `call` (a captured valid one of its command, cookie patched in).
fn valid_reply(replies: &[Seed], cmd: u32, cookie: u64) -> Datagram {
    let seed = replies
        .iter()
        .find(|s| s.cmd() == cmd)
        .unwrap_or(&replies[0]);
    let mut payload = seed.payload.clone();
    payload[8..16].copy_from_slice(&cookie.to_le_bytes());
    let fds: Vec<OwnedFd> = seed.fds.iter().map(|f| f.try_clone().unwrap()).collect();
    let mut bytes = header(Kind::First, fds.len(), payload.len(), fds.len());
    bytes.extend_from_slice(&payload);
    Datagram { bytes, fds }
}

/// One round: the client calls; the fake server answers with the mutated reply (the call's
/// cookie patched in unless the plan changes it), then the valid one. The call must return
/// (anything but a panic or a hang).
fn client_round(
    side: &ClientSide,
    plan: &Plan,
    seeds: &Seeds,
    cmd: u32,
) -> Result<String, Finding> {
    std::thread::scope(|s| {
        let call = s.spawn(|| side.caller.call(cmd));
        let outcome = match recv_call(&side.fake) {
            Ok(frame) if frame.payload.len() >= 24 => {
                let cookie = u64::from_le_bytes(frame.payload[8..16].try_into().unwrap());
                let mut patched = plan.clone();
                patched.ops.insert(0, Op::Cookie(cookie));
                for d in datagrams(&patched, &seeds.replies) {
                    if !send_datagram(&side.fake, &d).map_err(|w| finding("hang", w))? {
                        break;
                    }
                }
                let _ = send_datagram(&side.fake, &valid_reply(&seeds.replies, cmd, cookie));
                Ok(())
            }
            Ok(frame) => Err(finding(
                "bad client message",
                format!("{:02x?}", frame.payload),
            )),
            Err(Error::Disconnected) => Ok(()),
            Err(e) => Err(finding("hang", format!("the client sent no call: {e}"))),
        };
        let result = call.join();
        outcome?;
        match result {
            Ok(Ok(())) => Ok("Ok".into()),
            // Its valid reply came: a call that waits out its timeout was lost.
            Ok(Err(Error::TimedOut)) => Err(finding(
                "client hang",
                "the call timed out although its reply came",
            )),
            Ok(Err(e)) => Ok(format!("{e:?}")),
            Err(_) => Err(finding("panic", last_panic())),
        }
    })
}

/// Answers `iters` calls of clients made by `connect` with mutated replies; returns the
/// findings and what the calls returned.
fn fuzz_client(
    name: &str,
    connect: &mut dyn FnMut() -> ClientSide,
    seeds: &Seeds,
    iters: u64,
    seed: u64,
) -> (Vec<String>, Tally) {
    let before = common::open_fds();
    let panics = panics_so_far();
    let mut rng = Rng::new(seed);
    let mut side = Some(connect());
    let mut findings = Vec::new();
    let mut tally = Tally::default();
    for i in 0..iters {
        let plan = random_plan(&mut rng, &seeds.replies);
        let cmd = match rng.below(8) as u32 {
            CMD_NOTE => CMD_PING,
            cmd => cmd,
        };
        let live = side.as_ref().expect("connected");
        match client_round(live, &plan, seeds, cmd) {
            Ok(outcome) => tally.add(&outcome),
            Err(f) => {
                findings.push(format!(
                    "{} in {name}, iteration {i} (FUZZ_SEED={}): {}\n  call {cmd}, reply {}",
                    f.kind,
                    base_seed(),
                    f.detail,
                    describe(&plan, &seeds.replies).replace('\n', "\n  ")
                ));
                break;
            }
        }
        if panics_so_far() > panics {
            findings.push(format!("panic in {name}, iteration {i}: {}", last_panic()));
            break;
        }
        if live.caller.is_closed() || rng.chance(50) || i + 1 == iters {
            live.caller.close();
            drop(side.take());
            let now = common::open_fds();
            if now != before {
                findings.push(format!(
                    "fd leak in {name}, iteration {i}: {now} fds open after the connection ended, {before} before"
                ));
                break;
            }
            if i + 1 < iters {
                side = Some(connect());
            }
        }
    }
    if let Err(f) = check_peak("self") {
        findings.push(format!("{} in {name}: {}", f.kind, f.detail));
    }
    (findings, tally)
}

#[test]
fn a_client_survives_mutated_replies() {
    let _serial = serial();
    record_panics();
    let seeds = capture_seeds();
    let iters = iterations() / 2;
    let mut n = 0;
    let mut connect = || {
        let (ours, theirs) = client_socket(&mut n);
        ClientSide {
            caller: Box::new(TargetClient::new(Connection::new(ours)).with_timeout(PATIENCE)),
            fake: theirs,
        }
    };
    let (findings, tally) = fuzz_client(
        "a client",
        &mut connect,
        &seeds,
        iters,
        base_seed() ^ 0xc11e,
    );
    report("client", iters, &findings, &tally);
}

// ---- the async flavour ----

#[cfg(feature = "tokio")]
mod async_flavour {
    use super::*;

    /// `Target` as `async fn`s: the same interface on the wire.
    mod asynchronous {
        use super::super::Record;
        use std::os::fd::OwnedFd;

        #[typed_ipc::interface]
        pub trait Target {
            async fn text(&self, text: String) -> String;
            async fn bytes(&self, data: Vec<u8>) -> Vec<u8>;
            async fn files(&self, files: Vec<OwnedFd>, label: Option<String>) -> u64;
            async fn one(&self, fd: OwnedFd) -> OwnedFd;
            async fn maybe(&self, fd: Option<OwnedFd>) -> Option<OwnedFd>;
            async fn record(&self, record: Record) -> Record;
            #[oneway]
            async fn note(&self, seq: u64, data: Vec<u8>);
            async fn ping(&self, n: u64) -> u64;
        }
    }

    impl asynchronous::Target for Impl {
        async fn text(&self, text: String) -> String {
            Target::text(self, text)
        }
        async fn bytes(&self, data: Vec<u8>) -> Vec<u8> {
            Target::bytes(self, data)
        }
        async fn files(&self, files: Vec<OwnedFd>, label: Option<String>) -> u64 {
            Target::files(self, files, label)
        }
        async fn one(&self, fd: OwnedFd) -> OwnedFd {
            fd
        }
        async fn maybe(&self, fd: Option<OwnedFd>) -> Option<OwnedFd> {
            fd
        }
        async fn record(&self, record: Record) -> Record {
            Target::record(self, record)
        }
        async fn note(&self, _seq: u64, _data: Vec<u8>) {}
        async fn ping(&self, n: u64) -> u64 {
            n.wrapping_add(1)
        }
    }

    /// An async server on a tokio runtime of this process.
    struct AsyncServer {
        runtime: tokio::runtime::Runtime,
        inner: ThreadServer,
    }

    impl Server for AsyncServer {
        fn name(&self) -> String {
            "an async server".into()
        }
        fn connect(&mut self, rng: &mut Rng) -> Socket {
            let (ours, mut theirs) = Socket::pair().unwrap();
            let (tx, rx) = mpsc::channel();
            let setup = Setup::random(rng);
            if setup.small_limits {
                theirs.set_limits(Limits {
                    max_message_len: 16 << 10,
                    max_fds: 4,
                });
            }
            self.runtime.spawn(async move {
                let conn = typed_ipc::tokio::AsyncConnection::new(theirs).unwrap();
                if setup.accept_writes {
                    conn.accept_writes_from_peer().unwrap();
                }
                let served = conn.serve(asynchronous::TargetServer::new(Impl));
                drop(conn);
                let _ = tx.send(served.await);
            });
            self.inner.done = Some(rx);
            ours
        }
        fn finish(&mut self) -> Result<Ended, Finding> {
            self.inner.finish()
        }
        fn check_resources(&mut self) -> Result<(), Finding> {
            self.inner.check_resources()
        }
    }

    /// An async client, called from a thread outside its runtime.
    struct AsyncCaller {
        runtime: tokio::runtime::Handle,
        client: asynchronous::TargetClient,
    }

    impl Caller for AsyncCaller {
        fn call(&self, cmd: u32) -> typed_ipc::Result<()> {
            let c = &self.client;
            let call = async move {
                match cmd {
                    0 => c.text("hostile".into()).await.map(drop),
                    1 => c.bytes(vec![9; 32]).await.map(drop),
                    2 => c
                        .files(vec![common::memfd(b"x")], Some("l".into()))
                        .await
                        .map(drop),
                    3 => c.one(common::memfd(b"y")).await.map(drop),
                    4 => c.maybe(None).await.map(drop),
                    5 => c.record(record_arg()).await.map(drop),
                    _ => c.ping(5).await.map(drop),
                }
            };
            self.runtime.block_on(async {
                tokio::time::timeout(PATIENCE, call)
                    .await
                    .unwrap_or(Err(Error::TimedOut))
            })
        }
        fn is_closed(&self) -> bool {
            self.client.connection().is_closed()
        }
        fn close(&self) {
            let conn = self.client.connection();
            conn.close();
            self.runtime.block_on(conn.wait_closed());
        }
    }

    #[test]
    fn an_async_client_survives_mutated_replies() {
        let _serial = serial();
        record_panics();
        let seeds = capture_seeds();
        let runtime = common::two_worker_runtime();
        let mut n = 0;
        let mut connect = || {
            let (ours, theirs) = client_socket(&mut n);
            let _entered = runtime.enter();
            let conn = typed_ipc::tokio::AsyncConnection::new(ours).unwrap();
            ClientSide {
                caller: Box::new(AsyncCaller {
                    runtime: runtime.handle().clone(),
                    client: asynchronous::TargetClient::new(conn),
                }),
                fake: theirs,
            }
        };
        let iters = iterations() / 2;
        let (findings, tally) = fuzz_client(
            "an async client",
            &mut connect,
            &seeds,
            iters,
            base_seed() ^ 0xac11,
        );
        report("async client", iters, &findings, &tally);
    }

    #[test]
    fn an_async_server_survives_mutated_messages() {
        let _serial = serial();
        record_panics();
        let seeds = capture_seeds();
        let runtime = common::two_worker_runtime();
        let mut server = AsyncServer {
            runtime,
            inner: ThreadServer::new(),
        };
        let iters = iterations() / 2;
        let (findings, tally) = fuzz_server(&mut server, &seeds.calls, iters, base_seed() ^ 0xa5c);
        report("async server", iters, &findings, &tally);
    }
}
