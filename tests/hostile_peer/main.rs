//! The runtime against a hostile peer: a deterministic mutation fuzzer.
//!
//! Valid messages of a real generated interface ([`Target`]) are captured once, by relaying a
//! real client's calls to a real server and recording both directions. Each iteration then
//! mutates one of them — bits and bytes of the wire header, the envelope and the body; lengths
//! and counts blown up to gigabytes; bodies cut short or extended; byte-string tags that name
//! regions, pipes or inboxes that do not exist; fds of every kind attached where none are
//! expected; a message split into datagrams sent out of order — and sends it:
//!
//! - to a server ([`Connection::serve`](typed_ipc::Connection::serve)) on the other end of a
//!   socket pair, on a thread of this process, and to one in a real child process;
//! - with the `tokio` feature, to the async flavour's server too;
//! - and, the other way round, as the *reply* to a real client's call.
//!
//! After each mutated message the peer must reply with an error, ignore it, or end the
//! connection; then a valid call still works (on the same connection if it is open, else on a
//! new one). Nothing may panic (a panic hook records every panic in this process; the child
//! counts its own), hang (every wait has a deadline, and the test fails rather than waits),
//! leak an fd (each connection's end brings the serving process's fd count back to its
//! baseline) or allocate without bound (peak RSS stays under
//! [`MEMORY_LIMIT_KIB`](budget::MEMORY_LIMIT_KIB)).
//!
//! The PRNG is a fixed-seed xorshift, so a run is reproducible. `FUZZ_ITERS=200000` runs more
//! iterations than the default (which is tuned to a few seconds in a debug build),
//! `FUZZ_SEED=n` other ones. A failure is reported with the mutations that trigger it,
//! reduced to the fewest that still do, and the datagrams they make, in hex.

#[path = "../common/mod.rs"]
mod common;

#[cfg(feature = "tokio")]
mod async_flavour;
mod budget;
mod child;
mod client;
mod datagrams;
mod fds;
mod mutations;
mod rng;
mod seeds;
mod server;

use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};
use typed_ipc::interface;

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

/// Command ids (a method's position in the trait), checked in
/// [`capture_seeds`](seeds::capture_seeds).
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
