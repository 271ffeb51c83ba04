//! `TYPED_IPC_DEBUG=1`: every message a process sends is printed with its values decoded
//! (arguments, replies, fds as their numbers, byte strings cut short), and every message it
//! receives with its size.
//!
//! The scenario runs in a child process (this test binary again, `child_traced`) with the
//! variable set, so that both of its ends trace: it starts a worker (`child_lab`, a
//! grandchild) and calls it. The test reads their stderr. With the `tokio` feature, the same
//! scenario runs again between the async flavour's client and server.

#[path = "../common/mod.rs"]
mod common;

mod connections;
mod messages;
mod peer_text;
mod pipes_and_stalls;
mod refused;
mod serving;
mod stderr_lock;

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;

use common::child;
use serde::{Deserialize, Serialize};
use typed_ipc::worker;

/// A configuration, to show how a struct reads.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Config {
    /// Frame width.
    pub width: u32,
    /// A name.
    pub name: String,
}

/// Why a configuration was refused.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Wider than this.
    TooWide {
        /// The widest accepted.
        max: u32,
    },
}

/// What the worker serves.
#[typed_ipc::interface]
pub trait Lab {
    /// `text` reversed.
    fn reverse(&self, text: String) -> String;
    /// Accepts configurations up to 1920 wide.
    fn configure(&self, config: Config) -> Result<u32, Refusal>;
    /// How many fds arrived.
    fn count(&self, files: Vec<OwnedFd>) -> u64;
    /// `data` back.
    fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    /// Nothing back.
    #[oneway]
    fn note(&self, seq: u64);
    /// `tag` back.
    fn tag(&self, tag: Tag) -> u32;
}

/// A number whose `Serialize` first makes a call on the client this thread set
/// (`TAG_CALLS`), as user serialization code may: traced, it runs twice (once to be sent,
/// once to be described).
#[derive(Debug)]
pub struct Tag(pub u32);

std::thread_local! {
    static TAG_CALLS: std::cell::RefCell<Option<LabClient>> =
        const { std::cell::RefCell::new(None) };
}

impl Serialize for Tag {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if let Some(client) = TAG_CALLS.with(|c| c.borrow().clone()) {
            assert_eq!(client.reverse("tag".into()).unwrap(), "gat");
        }
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Tag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Tag, D::Error> {
        u32::deserialize(d).map(Tag)
    }
}

struct Impl;

impl Lab for Impl {
    fn reverse(&self, text: String) -> String {
        text.chars().rev().collect()
    }
    fn configure(&self, config: Config) -> Result<u32, Refusal> {
        match config.width {
            ..=1920 => Ok(config.width),
            _ => Err(Refusal::TooWide { max: 1920 }),
        }
    }
    fn count(&self, files: Vec<OwnedFd>) -> u64 {
        files.len() as u64
    }
    fn echo(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
    fn note(&self, _seq: u64) {}
    fn tag(&self, tag: Tag) -> u32 {
        tag.0
    }
}

/// The same interface, async flavour.
#[cfg(feature = "tokio")]
mod asynchronous {
    use std::os::fd::OwnedFd;

    use super::{Config, Refusal};

    #[typed_ipc::interface]
    pub trait Lab {
        async fn reverse(&self, text: String) -> String;
        async fn configure(&self, config: Config) -> Result<u32, Refusal>;
        async fn count(&self, files: Vec<OwnedFd>) -> u64;
        async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
        #[oneway]
        async fn note(&self, seq: u64);
    }

    pub struct Impl;

    impl Lab for Impl {
        async fn reverse(&self, text: String) -> String {
            super::Lab::reverse(&super::Impl, text)
        }
        async fn configure(&self, config: Config) -> Result<u32, Refusal> {
            super::Lab::configure(&super::Impl, config)
        }
        async fn count(&self, files: Vec<OwnedFd>) -> u64 {
            files.len() as u64
        }
        async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
            data
        }
        async fn note(&self, _seq: u64) {}
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_lab() {
    LabServer::new(Impl)
        .serve(worker::connection().unwrap())
        .unwrap();
}

#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_async_lab() {
    common::current_thread_runtime().block_on(async {
        let conn = typed_ipc::tokio::worker::connection().unwrap();
        let server = asynchronous::LabServer::new(asynchronous::Impl);
        server.serve(conn).await.unwrap();
    });
}

/// A worker that accepts one fd a message, so that `count` with two is refused unread.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_lab_of_one_fd() {
    let mut socket = worker::socket().unwrap();
    socket.set_limits(one_fd());
    LabServer::new(Impl)
        .serve(typed_ipc::Connection::new(socket))
        .unwrap();
}

/// The async flavour of [`child_lab_of_one_fd`].
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_async_lab_of_one_fd() {
    common::current_thread_runtime().block_on(async {
        let mut socket = worker::socket().unwrap();
        socket.set_limits(one_fd());
        let conn = typed_ipc::tokio::AsyncConnection::new(socket).unwrap();
        let server = asynchronous::LabServer::new(asynchronous::Impl);
        server.serve(conn).await.unwrap();
    });
}

fn one_fd() -> typed_ipc::Limits {
    typed_ipc::Limits {
        max_fds: 1,
        ..Default::default()
    }
}

/// Two fds to send, and their numbers.
fn two_files() -> (Vec<OwnedFd>, Vec<i32>) {
    let files: Vec<OwnedFd> = (0..2)
        .map(|_| std::fs::File::open("/dev/null").unwrap().into())
        .collect();
    let raw = files.iter().map(AsRawFd::as_raw_fd).collect();
    (files, raw)
}

/// Runs the scenario `command` starts (a child of this test binary) to its end, and returns
/// what it and its worker wrote to stderr; fails the test if it failed.
fn scenario_stderr(mut command: std::process::Command) -> String {
    let scenario = command.spawn().unwrap();
    let pid = nix::unistd::Pid::from_raw(scenario.id() as i32);
    let (done, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(scenario.wait_with_output()));
    // A hang guard only: the scenario takes milliseconds.
    let Ok(out) = output.recv_timeout(std::time::Duration::from_secs(60)) else {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        panic!("the scenario {command:?} hung");
    };
    let out = out.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "the scenario failed:\n{stderr}");
    stderr
}

/// What `scenario` (a child of this test binary) and its worker print to stderr, traced.
fn traced_stderr(scenario: &str) -> String {
    let mut command = child(scenario);
    command.env("TYPED_IPC_DEBUG", "1").stderr(Stdio::piped());
    scenario_stderr(command)
}

/// Fails unless `stderr` has the traced line `want`, after its `typed-ipc[pid] ` prefix.
fn assert_line(stderr: &str, want: &str) {
    let found = stderr.lines().any(|l| {
        l.strip_prefix("typed-ipc[")
            .and_then(|l| l.split_once("] "))
            .is_some_and(|(_, rest)| rest == want)
    });
    assert!(found, "no line {want:?} in:\n{stderr}");
}

/// The name of the connection a traced line is about, `1234 c2 peer 5678`.
fn name_of(line: &str) -> Option<&str> {
    let (name, _) = line.strip_prefix("typed-ipc[")?.split_once("] ")?;
    Some(name)
}

/// Fails unless every connection in `stderr` said its end exactly once.
fn assert_ended_once_each(stderr: &str) {
    let mut ends = std::collections::BTreeMap::<&str, usize>::new();
    for l in stderr.lines() {
        if let Some((name, rest)) = l
            .strip_prefix("typed-ipc[")
            .and_then(|l| l.split_once("] "))
        {
            let count = ends.entry(name).or_default();
            *count += usize::from(rest.starts_with("-- Ended: "));
        }
    }
    assert!(
        !ends.is_empty() && ends.values().all(|&n| n == 1),
        "ends said per process {ends:?} in:\n{stderr}"
    );
}

/// An async connection made on `runtime`, and its peer's end.
#[cfg(feature = "tokio")]
fn async_connection(
    runtime: &tokio::runtime::Runtime,
) -> (typed_ipc::tokio::AsyncConnection, typed_ipc::Socket) {
    let (a, b) = typed_ipc::Socket::pair().unwrap();
    let conn = runtime
        .block_on(async { typed_ipc::tokio::AsyncConnection::new(a) })
        .unwrap();
    (conn, b)
}

/// Calls `reverse("m")` through `conn` on `runtime`, this thread holding stderr's lock around
/// `block_on`, while `peer` answers through `b` on a thread of its own; the call returns "m".
#[cfg(feature = "tokio")]
fn async_call_holding_stderr(
    runtime: &tokio::runtime::Runtime,
    conn: typed_ipc::tokio::AsyncConnection,
    b: typed_ipc::Socket,
    peer: impl FnOnce(&typed_ipc::Socket) + Send + 'static,
) {
    let client = asynchronous::LabClient::new(conn);
    let stderr = std::io::stderr().lock();
    let peer = std::thread::spawn(move || {
        peer(&b);
        b
    });
    let got = runtime.block_on(client.reverse("m".into()));
    drop(stderr);
    assert_eq!(got.unwrap(), "m");
    drop(peer.join().unwrap());
}

/// Polls `future` once, and says it is still pending.
#[cfg(feature = "tokio")]
async fn pending_after_one_poll<F: std::future::Future>(future: std::pin::Pin<&mut F>) {
    tokio::select! {
        biased;
        _ = future => panic!("it finished"),
        () = std::future::ready(()) => {}
    }
}
