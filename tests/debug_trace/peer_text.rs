//! A connection ended by a protocol error says the error; the peer's text (a bad name, a
//! failure) is printed escaped and cut short.

use std::os::fd::AsRawFd;
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use typed_ipc::worker::{self, Worker};

use crate::common::child;
use crate::{Impl, LabServer, assert_ended_once_each, assert_line, scenario_stderr, traced_stderr};
#[cfg(feature = "tokio")]
use crate::{asynchronous, common};

/// Serves a peer that sends a datagram that is no message of this protocol, then says what
/// serving returned (`serve: ...`).
#[test]
#[ignore = "run as a child process by other tests"]
fn child_served_garbage() {
    let (a, b) = typed_ipc::Socket::pair().unwrap();
    let raw = std::os::fd::AsFd::as_fd(&b).as_raw_fd();
    nix::sys::socket::send(raw, b"not a message", nix::sys::socket::MsgFlags::empty()).unwrap();
    let served = LabServer::new(Impl).serve(typed_ipc::Connection::new(a));
    let e = served.expect_err("garbage ends the connection");
    eprintln!("serve: {e}");
    drop(b);
}

/// [`child_served_garbage`], async.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_served_garbage_async() {
    common::current_thread_runtime().block_on(async {
        let (a, b) = typed_ipc::Socket::pair().unwrap();
        let raw = std::os::fd::AsFd::as_fd(&b).as_raw_fd();
        nix::sys::socket::send(raw, b"not a message", nix::sys::socket::MsgFlags::empty()).unwrap();
        let conn = typed_ipc::tokio::AsyncConnection::new(a).unwrap();
        let served = asynchronous::LabServer::new(asynchronous::Impl)
            .serve(conn)
            .await;
        let e = served.expect_err("garbage ends the connection");
        eprintln!("serve: {e}");
        drop(b);
    });
}

/// A connection ended by a protocol error says so once, with the error.
fn check_ended_by_garbage(scenario: &str) {
    let stderr = traced_stderr(scenario);
    let why = stderr
        .lines()
        .find_map(|l| l.strip_prefix("serve: "))
        .unwrap_or_else(|| panic!("serving did not fail:\n{stderr}"));
    assert_line(&stderr, &format!("-- Ended: {why}"));
    assert_ended_once_each(&stderr);
}

#[test]
fn a_connection_ended_by_a_protocol_error_says_the_error() {
    check_ended_by_garbage("peer_text::child_served_garbage");
}

#[cfg(feature = "tokio")]
#[test]
fn a_connection_ended_by_a_protocol_error_says_the_error_async() {
    check_ended_by_garbage("peer_text::child_served_garbage_async");
}

/// A name: letters and digits only, checked as it is decoded.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(try_from = "String", into = "String")]
pub struct Name(pub String);

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(text: String) -> Result<Name, String> {
        match text.chars().all(char::is_alphanumeric) {
            true => Ok(Name(text)),
            // As a validating type may well say it: with the text it refused.
            false => Err(format!("not a name: {text}")),
        }
    }
}

impl From<Name> for String {
    fn from(name: Name) -> String {
        name.0
    }
}

/// What `child_names` serves.
#[typed_ipc::interface]
pub trait Names {
    /// Takes a name, answering nothing.
    #[oneway]
    fn greet(&self, name: Name);
    /// Answers once the oneways sent before have run.
    fn ping(&self) -> u32;
    /// How long a name is.
    fn measure(&self, name: Name) -> u64;
}

struct NamesImpl;

impl Names for NamesImpl {
    fn greet(&self, _name: Name) {}
    fn ping(&self) -> u32 {
        1
    }
    fn measure(&self, name: Name) -> u64 {
        name.0.len() as u64
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_names() {
    NamesServer::new(NamesImpl)
        .serve(worker::connection().unwrap())
        .unwrap();
}

/// Control characters (a terminal's escape sequences among them) and a long text, in a
/// name the worker refuses.
fn hostile_name() -> String {
    format!("\x1b[2J\x1b]0;owned\x07\u{202e}{}", "x".repeat(100_000))
}

/// Sends `child_names` a oneway with a name it refuses, then a call after it.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_sends_a_bad_name() {
    let (mut names, conn) = Worker::spawn(child("peer_text::child_names")).unwrap();
    let client = NamesClient::new(conn);
    client.greet(Name(hostile_name())).unwrap();
    // A call after the oneway: the worker has run the oneway once this returns.
    assert_eq!(client.ping().unwrap(), 1);
    let refused = client.measure(Name(hostile_name()));
    assert!(matches!(refused, Err(typed_ipc::Error::Remote(_))));
    drop(client);
    names.wait().unwrap();
}

/// A oneway that fails is said on stderr even untraced, with why, which may hold what the
/// peer sent (here a decoding error that quotes the text it refused): it is said escaped
/// and cut short, so that a peer can neither drive the terminal nor flood it.
#[test]
fn a_failed_oneway_is_said_escaped_and_cut_short() {
    let mut command = child("peer_text::child_sends_a_bad_name");
    command.env_remove("TYPED_IPC_DEBUG").stderr(Stdio::piped());
    let stderr = scenario_stderr(command);
    let said = stderr
        .lines()
        .find(|l| l.contains("a oneway message Names::greet failed"))
        .unwrap_or_else(|| panic!("the failed oneway is not said:\n{stderr:.2000}"));
    let start: String = said.chars().take(200).collect();
    assert!(
        !said.contains(['\x1b', '\x07', '\u{202e}']),
        "the peer's control characters reach stderr unescaped: {start:?}"
    );
    assert!(said.contains(r"not a name: \u{1b}[2J"), "{start:?}");
    assert!(
        said.len() < 2_000,
        "a line of {} bytes for one failed oneway",
        said.len()
    );
}

/// Traced, the failure a call is answered with is printed as sent, with why, which may
/// hold what the peer sent: cut short, as every value a traced line shows is.
#[test]
fn a_traced_failure_is_cut_short() {
    let mut command = child("peer_text::child_sends_a_bad_name");
    command.env("TYPED_IPC_DEBUG", "1").stderr(Stdio::piped());
    let stderr = scenario_stderr(command);
    let said = stderr
        .lines()
        .find(|l| l.contains("] -> Failure #"))
        .unwrap_or_else(|| panic!("the failure is not printed:\n{stderr:.2000}"));
    assert!(said.contains(r"not a name: \u{1b}[2J"));
    assert!(
        said.len() < 2_000,
        "a line of {} bytes for one failure",
        said.len()
    );
}
