//! Mutations: one change to a message, and the plans that make a mutated message of a seed.

use std::os::fd::OwnedFd;

use typed_ipc::wire::HEADER_LEN;

use crate::fds::{FD_KINDS, FdKind, make_fd};
use crate::rng::{INTERESTING_U64, Rng};
use crate::seeds::Seed;
use crate::{CMD_BYTES, CMD_NOTE, CMD_RECORD, TARGET_INFO};

/// One change to a message, its random choices drawn up front (positions are taken modulo
/// the length at the time, so any subset of a plan's ops still applies): a plan is data,
/// replayed and reduced as such.
#[derive(Clone, Debug)]
pub(crate) enum Op {
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
pub(crate) enum Framing {
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
pub(crate) enum Reorder {
    None,
    SwapTwo(u64),
    DropOne(u64),
    Duplicate(u64),
    ContinuationFirst,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum HeaderField {
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
pub(crate) struct Plan {
    pub(crate) seed: usize,
    pub(crate) ops: Vec<Op>,
    pub(crate) framing: Framing,
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

pub(crate) fn random_plan(rng: &mut Rng, seeds: &[Seed]) -> Plan {
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
pub(crate) fn apply(plan: &Plan, seeds: &[Seed]) -> (Vec<u8>, Vec<OwnedFd>) {
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
