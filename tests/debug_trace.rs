//! `TYPED_IPC_DEBUG=1`: every message a process sends is printed with its values decoded
//! (arguments, replies, fds as their numbers, byte strings cut short), and every message it
//! receives with its size.
//!
//! The scenario runs in a child process (this test binary again, `child_traced`) with the
//! variable set, so that both of its ends trace: it starts a worker (`child_lab`, a
//! grandchild) and calls it. The test reads their stderr. With the `tokio` feature, the same
//! scenario runs again between the async flavour's client and server.

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Stdio;

use common::child;
use serde::{Deserialize, Serialize};
use typed_ipc::worker::{self, Worker};

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

/// Sends `child_lab_of_one_fd` a call it refuses unread (two fds), then one it answers.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_refused_traced() {
    let (mut lab, conn) = Worker::spawn(child("child_lab_of_one_fd")).unwrap();
    let client = LabClient::new(conn);
    let refused = client.count(two_files().0);
    assert!(
        matches!(
            refused,
            Err(typed_ipc::Error::TooManyFds { by_peer: true, .. })
        ),
        "{refused:?}"
    );
    assert_eq!(client.reverse("ab".into()).unwrap(), "ba");
    drop(client);
    lab.wait().unwrap();
}

/// The async flavour of [`child_refused_traced`].
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_refused_traced_async() {
    common::current_thread_runtime().block_on(async {
        let spawned = typed_ipc::tokio::worker::spawn(child("child_async_lab_of_one_fd"));
        let (mut lab, conn) = spawned.unwrap();
        let client = asynchronous::LabClient::new(conn);
        let refused = client.count(two_files().0).await;
        assert!(
            matches!(
                refused,
                Err(typed_ipc::Error::TooManyFds { by_peer: true, .. })
            ),
            "{refused:?}"
        );
        assert_eq!(client.reverse("ab".into()).await.unwrap(), "ba");
        drop(client);
        lab.wait().unwrap();
    });
}

/// A request refused before it could run (here for its fds) is printed as received too,
/// with why rather than the little kept of it, as is the failure it is answered with.
#[test]
fn a_refused_request_is_printed_as_received() {
    check_refused("child_refused_traced");
}

/// The same from the async flavour's client and server.
#[cfg(feature = "tokio")]
#[test]
fn a_refused_request_is_printed_as_received_async() {
    check_refused("child_refused_traced_async");
}

fn check_refused(scenario: &str) {
    let stderr = traced_stderr(scenario);
    let has = |want: &str| assert_line(&stderr, want);
    has(
        "<- Call #1 Lab::count (not received: message carries 2 file descriptors, over \
         Limits::max_fds (1))",
    );
    has("-> Failure #1: TooManyFds { count: 2, limit: 1, which: MaxFds }");
    has("<- Call #2 Lab::reverse (10 bytes, 0 fds)");
}

/// A listener that admits nobody, and a client of this process that it turns away.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_turned_away_traced() {
    let name = format!("typed-ipc-trace-turned-away-{}", std::process::id());
    let serving = typed_ipc::Server::new()
        .service_with(|_| LabServer::new(Impl))
        .admit(|_| Err("not you\n".into()))
        .listen(typed_ipc::Listener::bind_abstract(&name).unwrap())
        .unwrap();
    let client = LabClient::new(typed_ipc::Connection::connect_abstract(&name).unwrap());
    let refused = client.reverse("ab".into());
    assert!(
        matches!(refused, Err(typed_ipc::Error::Refused(_))),
        "{refused:?}"
    );
    drop(client);
    serving.shutdown();
}

/// A listener that turns a client away says so, with who and why (the reason escaped as the
/// peer's text is): the client was never a connection of the listener's, so until
/// 2026-12-06 only the client's end printed anything.
#[test]
fn a_client_turned_away_is_printed_by_the_listener() {
    let stderr = traced_stderr("child_turned_away_traced");
    let uid = nix::unistd::getuid().as_raw();
    let turned_away = stderr
        .lines()
        .find(|l| l.contains("-- Turned a client away"));
    let line = turned_away.unwrap_or_else(|| panic!("no line turning a client away:\n{stderr}"));
    let (_, rest) = line.split_once("] ").unwrap();
    let (who, why) = rest.split_once("): ").unwrap();
    assert!(who.starts_with("-- Turned a client away (pid "), "{line}");
    assert!(who.ends_with(&format!(", uid {uid}")), "{line}");
    assert_eq!(why, "not you\\n", "{line}");
}

/// A client whose limits refuse `reverse`'s reply of 5,000 bytes (not its request), over a
/// socket pair: its peer does not know them, and sends the reply inline.
fn small_replies() -> typed_ipc::Limits {
    typed_ipc::Limits {
        max_message_len: 1000,
        max_send_len: Some(1 << 20),
        ..Default::default()
    }
}

/// Calls `reverse` with 5,000 characters from an end whose limits refuse the reply.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_reply_over_limits_traced() {
    let (mut a, b) = typed_ipc::Socket::pair().unwrap();
    a.set_limits(small_replies());
    let server =
        std::thread::spawn(move || LabServer::new(Impl).serve(typed_ipc::Connection::new(b)));
    let client = LabClient::new(typed_ipc::Connection::new(a));
    let too_large = client.reverse("r".repeat(5000));
    assert!(
        matches!(
            too_large,
            Err(typed_ipc::Error::TooLarge { by_peer: false, .. })
        ),
        "{too_large:?}"
    );
    drop(client);
    server.join().unwrap().unwrap();
}

/// The async flavour of [`child_reply_over_limits_traced`].
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_reply_over_limits_traced_async() {
    common::current_thread_runtime().block_on(async {
        let (mut a, b) = typed_ipc::Socket::pair().unwrap();
        a.set_limits(small_replies());
        let server = asynchronous::LabServer::new(asynchronous::Impl);
        let serving =
            tokio::spawn(server.serve(typed_ipc::tokio::AsyncConnection::new(b).unwrap()));
        let client =
            asynchronous::LabClient::new(typed_ipc::tokio::AsyncConnection::new(a).unwrap());
        let too_large = client.reverse("r".repeat(5000)).await;
        assert!(
            matches!(
                too_large,
                Err(typed_ipc::Error::TooLarge { by_peer: false, .. })
            ),
            "{too_large:?}"
        );
        drop(client);
        serving.await.unwrap().unwrap();
    });
}

/// A reply refused for its size is printed with why, not with the envelope kept of it,
/// which read as a reply of no bytes.
#[test]
fn a_reply_over_this_sides_limits_is_printed_with_why() {
    check_reply_over_limits("child_reply_over_limits_traced");
}

/// The same from the async flavour's client and server.
#[cfg(feature = "tokio")]
#[test]
fn a_reply_over_this_sides_limits_is_printed_with_why_async() {
    check_reply_over_limits("child_reply_over_limits_traced_async");
}

fn check_reply_over_limits(scenario: &str) {
    let stderr = traced_stderr(scenario);
    assert_line(
        &stderr,
        "<- Reply #1 (not received: message of 5032 bytes, over Limits::max_message_len \
         (1000 bytes))",
    );
}

/// Sends a oneway to a peer already gone: the send fails, so nothing was sent.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_oneway_unsent() {
    let (ours, theirs) = typed_ipc::Connection::pair().unwrap();
    drop(theirs);
    let client = LabClient::new(ours);
    assert!(client.note(9).is_err(), "sent to a peer gone");
    assert!(client.reverse("ab".into()).is_err());
}

/// The async flavour of [`child_oneway_unsent`].
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_oneway_unsent_async() {
    common::current_thread_runtime().block_on(async {
        let (ours, theirs) = typed_ipc::tokio::AsyncConnection::pair().unwrap();
        drop(theirs);
        let client = asynchronous::LabClient::new(ours);
        assert!(client.note(9).await.is_err(), "sent to a peer gone");
        assert!(client.reverse("ab".into()).await.is_err());
    });
}

/// A message that was not sent is not printed as sent.
#[test]
fn a_oneway_that_could_not_be_sent_is_not_printed() {
    check_unsent("child_oneway_unsent");
}

/// The same from the async flavour.
#[cfg(feature = "tokio")]
#[test]
fn a_oneway_that_could_not_be_sent_is_not_printed_async() {
    check_unsent("child_oneway_unsent_async");
}

fn check_unsent(scenario: &str) {
    let stderr = traced_stderr(scenario);
    assert!(
        !stderr.contains("-> Oneway"),
        "a oneway never sent was printed:\n{stderr}"
    );
}

/// A call that times out: its peer holds the connection open and never answers.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_call_timed_out() {
    let (ours, _silent) = typed_ipc::Connection::pair().unwrap();
    let client = LabClient::new(ours).with_timeout(std::time::Duration::from_millis(1));
    let gave_up = client.reverse("ab".into());
    assert!(
        matches!(gave_up, Err(typed_ipc::Error::TimedOut)),
        "{gave_up:?}"
    );
}

/// The async flavour of [`child_call_timed_out`].
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_call_timed_out_async() {
    common::current_thread_runtime().block_on(async {
        let (ours, _silent) = typed_ipc::tokio::AsyncConnection::pair().unwrap();
        let client =
            asynchronous::LabClient::new(ours).with_timeout(std::time::Duration::from_millis(1));
        let gave_up = client.reverse("ab".into()).await;
        assert!(
            matches!(gave_up, Err(typed_ipc::Error::TimedOut)),
            "{gave_up:?}"
        );
    });
}

/// A call that timed out says so after its `->` line: otherwise the trace shows a call and
/// nothing more, and a reply that comes later only as received.
#[test]
fn a_call_that_timed_out_is_said_to_have_given_up() {
    check_gave_up("child_call_timed_out", "timed out");
}

/// The same from the async flavour.
#[cfg(feature = "tokio")]
#[test]
fn a_call_that_timed_out_is_said_to_have_given_up_async() {
    check_gave_up("child_call_timed_out_async", "timed out");
}

/// An async call whose future is dropped once its request is out, its peer silent.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_call_dropped_async() {
    common::current_thread_runtime().block_on(async {
        let (ours, _silent) = typed_ipc::tokio::AsyncConnection::pair().unwrap();
        let client =
            asynchronous::LabClient::new(ours).with_timeout(std::time::Duration::from_secs(600));
        let mut call = Box::pin(client.reverse("ab".into()));
        pending_after_one_poll(call.as_mut()).await;
        drop(call);
    });
}

/// A call whose future was dropped, though it had a timeout, is not said to have timed out.
#[cfg(feature = "tokio")]
#[test]
fn a_call_dropped_is_said_to_have_given_up_async() {
    check_gave_up("child_call_dropped_async", "its future was dropped");
}

/// An async call given up while its 16 MiB argument was part-way out: the rest goes out in
/// the background and the peer runs the call, so the trace must show it as sent.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_call_cut_off_async() {
    let (ours, theirs) = typed_ipc::Socket::pair().unwrap();
    common::current_thread_runtime().block_on(async {
        let conn = typed_ipc::tokio::AsyncConnection::new(ours).unwrap();
        let client = asynchronous::LabClient::new(conn.clone());
        // The peer reads nothing yet and never said it reads the lane: the argument goes
        // inline, more than the socket holds. A zero timeout polls the call once: it sends
        // what fits, and is dropped part-way.
        let call = client.echo(vec![7; 16 << 20]);
        let cut_off = tokio::time::timeout(std::time::Duration::ZERO, call).await;
        assert!(cut_off.is_err(), "{cut_off:?}");
        let peer = std::thread::spawn(move || theirs.recv().map(|frame| frame.payload.len()));
        let received = tokio::task::spawn_blocking(move || peer.join().unwrap()).await;
        assert!(
            received.unwrap().unwrap() > 16 << 20,
            "the whole call arrived"
        );
        drop(client);
        drop(conn);
    });
}

/// A call cut off part-way was sent all the same, by the connection: the trace says so.
#[cfg(feature = "tokio")]
#[test]
fn a_call_cut_off_part_way_is_printed_as_sent_async() {
    let stderr = traced_stderr("child_call_cut_off_async");
    let sent = stderr.lines().any(|l| l.contains("-> Call #1 Lab::echo("));
    assert!(
        sent,
        "the call the peer received is not printed as sent:\n{stderr}"
    );
    // Cut off by a timeout of its caller's, not the connection's: its future was dropped.
    check_gave_up("child_call_cut_off_async", "its future was dropped");
}

fn check_gave_up(scenario: &str, why: &str) {
    let stderr = traced_stderr(scenario);
    let cookie = stderr
        .lines()
        .find_map(|l| l.split_once("-> Call #")?.1.split_once(' '))
        .map(|(cookie, _)| cookie.to_owned())
        .unwrap_or_else(|| panic!("no call printed:\n{stderr}"));
    let want =
        format!("-- Call #{cookie} gave up waiting ({why}): a reply that comes later is dropped");
    assert_line(&stderr, &want);
}

/// The async flavour of [`child_traced`].
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_traced_async() {
    common::current_thread_runtime().block_on(async {
        let spawned = typed_ipc::tokio::worker::spawn(child("child_async_lab"));
        let (mut lab, conn) = spawned.unwrap();
        let client = asynchronous::LabClient::new(conn);
        assert_eq!(client.reverse("hello".into()).await.unwrap(), "olleh");
        let wide = Config {
            width: 4096,
            name: "cam0".into(),
        };
        assert_eq!(
            client.configure(wide).await.unwrap(),
            Err(Refusal::TooWide { max: 1920 })
        );
        let (files, raw) = two_files();
        assert_eq!(client.count(files).await.unwrap(), 2);
        assert_eq!(client.echo(vec![7u8; 100]).await.unwrap().len(), 100);
        client.note(9).await.unwrap();
        assert_eq!(client.reverse("ab".into()).await.unwrap(), "ba");
        assert_eq!(client.echo(vec![7u8; 2000]).await.unwrap().len(), 2000);
        assert_eq!(client.connection().release_shared_memory(), 64 << 10);
        client.connection().close();
        drop(client);
        lab.wait().unwrap();
        eprintln!("fds sent: fd({}), fd({})", raw[0], raw[1]);
    });
}

/// Two fds to send, and their numbers.
fn two_files() -> (Vec<OwnedFd>, Vec<i32>) {
    let files: Vec<OwnedFd> = (0..2)
        .map(|_| std::fs::File::open("/dev/null").unwrap().into())
        .collect();
    let raw = files.iter().map(AsRawFd::as_raw_fd).collect();
    (files, raw)
}

/// The traced scenario: at the end it names the fds it sent (their numbers vary).
#[test]
#[ignore = "run as a child process by other tests"]
fn child_traced() {
    let (mut lab, conn) = Worker::spawn(child("child_lab")).unwrap();
    let client = LabClient::new(conn);
    assert_eq!(client.reverse("hello".into()).unwrap(), "olleh");
    let wide = Config {
        width: 4096,
        name: "cam0".into(),
    };
    assert_eq!(
        client.configure(wide).unwrap(),
        Err(Refusal::TooWide { max: 1920 })
    );
    let (files, raw) = two_files();
    assert_eq!(client.count(files).unwrap(), 2);
    assert_eq!(client.echo(vec![7u8; 100]).unwrap().len(), 100);
    client.note(9).unwrap();
    // A call after the oneway: the worker has run the oneway once this returns.
    assert_eq!(client.reverse("ab".into()).unwrap(), "ba");
    // A string through the shared region, which is then given back.
    assert_eq!(client.echo(vec![7u8; 2000]).unwrap().len(), 2000);
    assert_eq!(client.connection().release_shared_memory(), 64 << 10);
    // An argument whose `Serialize` calls on the same connection, from the same thread.
    // Traced, it is described before the caller takes the reader role: described while the
    // caller held it, the nested call would wait for a reader that waits for it.
    TAG_CALLS.with(|c| *c.borrow_mut() = Some(client.clone()));
    assert_eq!(client.tag(Tag(5)).unwrap(), 5);
    TAG_CALLS.with(|c| *c.borrow_mut() = None);
    client.connection().close();
    drop(client);
    lab.wait().unwrap();
    eprintln!("fds sent: fd({}), fd({})", raw[0], raw[1]);
}

/// A worker that takes byte strings and answers with their lengths.
#[typed_ipc::interface]
pub trait Sink {
    fn len(&self, data: Vec<u8>) -> u64;
}

impl Sink for Impl {
    fn len(&self, data: Vec<u8>) -> u64 {
        data.len() as u64
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_sink() {
    SinkServer::new(Impl)
        .serve(worker::connection().unwrap())
        .unwrap();
}

/// Runs `f` with this process unable to make a file over 64 KiB, so a shared region too: its
/// memfd's `ftruncate` fails (`EFBIG`; `SIGXFSZ` ignored meanwhile).
fn files_up_to_64_kib<R>(f: impl FnOnce() -> R) -> R {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    use nix::sys::signal::{SigHandler, Signal, signal};
    let (soft, hard) = getrlimit(Resource::RLIMIT_FSIZE).unwrap();
    // SAFETY: SIG_IGN runs no code of ours; the old disposition is put back below.
    let old = unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }.unwrap();
    setrlimit(Resource::RLIMIT_FSIZE, 64 << 10, hard).unwrap();
    let result = f();
    setrlimit(Resource::RLIMIT_FSIZE, soft, hard).unwrap();
    // SAFETY: the disposition this process had.
    unsafe { signal(Signal::SIGXFSZ, old) }.unwrap();
    result
}

/// A region the worker maps, and none of ours: the larger region that was to replace it
/// could not be made, and its string went inline. Giving back our shared
/// memory then tells the worker to unmap the old region.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_region_unmade() {
    let (mut sink, conn) = Worker::spawn(child("child_sink")).unwrap();
    let client = SinkClient::new(conn);
    assert_eq!(client.len(Vec::new()).unwrap(), 0); // the worker has spoken
    assert_eq!(client.len(vec![7; 2000]).unwrap(), 2000); // a region of 64 KiB, mapped there
    let inline = files_up_to_64_kib(|| client.len(vec![7; 100_000]));
    assert_eq!(inline.unwrap(), 100_000);
    assert_eq!(
        client.connection().release_shared_memory(),
        0,
        "ours is gone"
    );
    client.connection().close();
    drop(client);
    sink.wait().unwrap();
}

/// The line that says the region was given back names the one the peer mapped: not "of 0
/// bytes" when this end held none.
#[test]
fn a_region_given_back_when_this_end_held_none_is_named_as_the_peer_mapped_it() {
    let stderr = traced_stderr("child_region_unmade");
    assert!(
        !stderr.contains("of 0 bytes"),
        "a region of 0 bytes given back:\n{stderr}"
    );
    assert_line(
        &stderr,
        "-> Announce (gave back its older shared region of 65536 bytes, which only the peer \
         still mapped)",
    );
}

/// Every message is printed: those sent with their values, those received with their sizes.
#[test]
fn every_message_is_printed_with_its_values() {
    check_trace("child_traced");
}

/// The same from the async flavour's client and server.
#[cfg(feature = "tokio")]
#[test]
fn every_message_is_printed_with_its_values_async() {
    check_trace("child_traced_async");
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

/// Runs `scenario` traced and checks what it printed.
fn check_trace(scenario: &str) {
    let stderr = traced_stderr(scenario);
    let has = |want: &str| assert_line(&stderr, want);
    // Calls as the client sent them; replies as the worker sent them.
    has(r#"-> Call #1 Lab::reverse("hello")"#);
    has(r#"-> Reply #1 "olleh""#);
    // Said before it is sent, so before the worker says it received it.
    let at = |want: &str| stderr.lines().position(|l| l.ends_with(want));
    let (sent, received) = (
        at(r#"-> Call #1 Lab::reverse("hello")"#),
        at("<- Call #1 Lab::reverse (13 bytes, 0 fds)"),
    );
    assert!(
        sent < received,
        "a call is said after its peer received it:\n{stderr}"
    );
    // A reply too: said before it is sent, so before its caller says it received it.
    let (sent, received) = (
        at(r#"-> Reply #1 "olleh""#),
        at("<- Reply #1 (13 bytes, 0 fds)"),
    );
    assert!(
        sent < received,
        "a reply is said after its caller received it:\n{stderr}"
    );
    has(r#"-> Call #2 Lab::configure(Config { width: 4096, name: "cam0" })"#);
    has("-> Reply #2 Err(TooWide { max: 1920 })");
    // Fds by their numbers in the sender.
    let sent = stderr
        .lines()
        .find_map(|l| l.strip_prefix("fds sent: "))
        .expect("the scenario names the fds it sent");
    has(&format!("-> Call #3 Lab::count([{sent}])"));
    has("-> Reply #3 2");
    // A byte string is cut short, and says how long it was.
    has(&format!(
        r#"-> Call #4 Lab::echo(b"{}"… (100 bytes))"#,
        r"\x07".repeat(32)
    ));
    // A oneway has no cookie to pair it with anything.
    has("-> Oneway Lab::note(9)");
    // What each end received, with its size and fds.
    has("<- Call #1 Lab::reverse (13 bytes, 0 fds)");
    has("<- Call #3 Lab::count (16 bytes, 2 fds)");
    has("<- Reply #1 (13 bytes, 0 fds)");
    has("<- Oneway Lab::note (8 bytes, 0 fds)");
    has("-> Announce (gave back its shared region of 65536 bytes)");
    // The connection ends: the client closed it, and the worker sees it hang up.
    has("-- Ended: closed by this side");
    has("-- Ended: peer disconnected");
    assert_ended_once_each(&stderr);
    // Each end names its connection by its number and the other end's pid.
    let names: std::collections::BTreeSet<_> = stderr.lines().filter_map(name_of).collect();
    let [client, worker] = [
        r#"-> Call #1 Lab::reverse("hello")"#,
        r#"-> Reply #1 "olleh""#,
    ]
    .map(|want| {
        stderr
            .lines()
            .find(|l| l.ends_with(want))
            .and_then(name_of)
            .unwrap()
    });
    assert_eq!(names, [client, worker].into(), "in:\n{stderr}");
    let pid = |name: &str| name.split_once(' ').unwrap().0.to_owned();
    assert!(
        client.ends_with(&format!(" peer {}", pid(worker))),
        "{client}"
    );
    assert!(
        worker.ends_with(&format!(" peer {}", pid(client))),
        "{worker}"
    );
}

/// The name of the connection a traced line is about, `1234 c2 peer 5678`.
fn name_of(line: &str) -> Option<&str> {
    let (name, _) = line.strip_prefix("typed-ipc[")?.split_once("] ")?;
    Some(name)
}

/// A host with two workers calls each once: both calls are #1, of different connections.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_two_workers() {
    let (mut a, to_a) = Worker::spawn(child("child_lab")).unwrap();
    let (mut b, to_b) = Worker::spawn(child("child_lab")).unwrap();
    let (a_client, b_client) = (LabClient::new(to_a), LabClient::new(to_b));
    assert_eq!(a_client.reverse("to a".into()).unwrap(), "a ot");
    assert_eq!(b_client.reverse("to b".into()).unwrap(), "b ot");
    a_client.connection().close();
    b_client.connection().close();
    drop((a_client, b_client));
    a.wait().unwrap();
    b.wait().unwrap();
    eprintln!("workers: {} {}", a.id(), b.id());
}

/// The async flavour of [`child_two_workers`].
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_two_workers_async() {
    common::current_thread_runtime().block_on(async {
        use typed_ipc::tokio::worker::spawn;
        let (mut a, to_a) = spawn(child("child_async_lab")).unwrap();
        let (mut b, to_b) = spawn(child("child_async_lab")).unwrap();
        let a_client = asynchronous::LabClient::new(to_a);
        let b_client = asynchronous::LabClient::new(to_b);
        assert_eq!(a_client.reverse("to a".into()).await.unwrap(), "a ot");
        assert_eq!(b_client.reverse("to b".into()).await.unwrap(), "b ot");
        a_client.connection().close();
        b_client.connection().close();
        drop((a_client, b_client));
        a.wait().unwrap();
        b.wait().unwrap();
        eprintln!("workers: {} {}", a.id(), b.id());
    });
}

/// A host's lines about two workers are told apart: each names its connection, and the
/// worker's pid; each worker's lines name the host.
#[test]
fn the_lines_of_two_connections_are_told_apart() {
    check_two_workers("child_two_workers");
}

/// The same in the async flavour.
#[cfg(feature = "tokio")]
#[test]
fn the_lines_of_two_async_connections_are_told_apart() {
    check_two_workers("child_two_workers_async");
}

fn check_two_workers(scenario: &str) {
    let stderr = traced_stderr(scenario);
    let workers: Vec<&str> = stderr
        .lines()
        .find_map(|l| l.strip_prefix("workers: "))
        .expect("the scenario names its workers")
        .split(' ')
        .collect();
    let named = |want: &str| {
        let line = stderr.lines().find(|l| l.ends_with(want));
        line.and_then(name_of)
            .unwrap_or_else(|| panic!("no {want:?} in:\n{stderr}"))
    };
    let to = [
        r#"-> Call #1 Lab::reverse("to a")"#,
        r#"-> Call #1 Lab::reverse("to b")"#,
    ];
    let [to_a, to_b] = to.map(named);
    assert_ne!(to_a, to_b);
    let host = to_a.split_once(' ').unwrap().0;
    assert_eq!(
        to_b.split_once(' ').unwrap().0,
        host,
        "one process, two connections"
    );
    for (name, worker, reply) in [(to_a, workers[0], "a ot"), (to_b, workers[1], "b ot")] {
        assert!(
            name.ends_with(&format!(" peer {worker}")),
            "{name} is not to {worker}"
        );
        // Every line of the host about this worker names it: the reply, the end.
        for want in [
            "<- Reply #1 (12 bytes, 0 fds)",
            "-- Ended: closed by this side",
        ] {
            let told = format!("typed-ipc[{name}] {want}");
            assert!(
                stderr.lines().any(|l| l == told),
                "no {told:?} in:\n{stderr}"
            );
        }
        // And the worker's lines name the host.
        let said = named(&format!("-> Reply #1 {reply:?}"));
        assert!(said.starts_with(&format!("{worker} ")), "{said}");
        assert!(said.ends_with(&format!(" peer {host}")), "{said}");
    }
    assert_ended_once_each(&stderr);
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

/// A thread that, once a call has come to `peer` (its caller now waits for a reply that never
/// comes), runs `close` and hangs `peer` up.
fn close_once_called(
    peer: typed_ipc::Socket,
    close: impl FnOnce() + Send + 'static,
) -> std::thread::JoinHandle<()> {
    use std::os::fd::AsFd;
    std::thread::spawn(move || {
        let mut request = [0u8; 256];
        let raw = peer.as_fd().as_raw_fd();
        nix::sys::socket::recv(raw, &mut request, nix::sys::socket::MsgFlags::empty()).unwrap();
        close();
    })
}

/// A thread that holds stderr's lock (as `writeln!(io::stderr().lock(), "{:?}", call())`
/// does while the call runs) and waits for a call on a connection that another thread
/// closes: the connection says its end once the lock is let go, and the call returns.
/// Said while the connection's state was locked, or before the call was woken, that line
/// waited for stderr, whose holder waited for the connection: both hung.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_closed_while_its_caller_holds_stderr() {
    let (a, b) = typed_ipc::Socket::pair().unwrap();
    let conn = typed_ipc::Connection::new(a);
    let client = LabClient::new(conn.clone());
    let stderr = std::io::stderr().lock();
    let closer = close_once_called(b, move || conn.close());
    let got = client.reverse("hi".into());
    drop(stderr);
    assert!(
        matches!(got, Err(typed_ipc::Error::Disconnected)),
        "{got:?}"
    );
    closer.join().unwrap();
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

/// [`child_closed_while_its_caller_holds_stderr`], async: the caller holds stderr's lock
/// around `block_on`, and the connection's tasks run on the runtime's workers.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_closed_while_its_async_caller_holds_stderr() {
    let runtime = common::two_worker_runtime();
    let (conn, b) = async_connection(&runtime);
    let client = asynchronous::LabClient::new(conn.clone());
    let stderr = std::io::stderr().lock();
    let closer = close_once_called(b, move || conn.close());
    let got = runtime.block_on(client.reverse("hi".into()));
    drop(stderr);
    assert!(
        matches!(got, Err(typed_ipc::Error::Disconnected)),
        "{got:?}"
    );
    closer.join().unwrap();
}

/// A connection closed while a caller holds stderr's lock says its end once the caller has
/// its answer and lets go: never with the connection's lock held, nor before the caller is
/// woken.
#[test]
fn the_end_is_said_after_a_caller_holding_stderr_is_answered() {
    let stderr = traced_stderr("child_closed_while_its_caller_holds_stderr");
    assert_line(&stderr, "-- Ended: closed by this side");
    assert_ended_once_each(&stderr);
}

/// The same, async.
#[cfg(feature = "tokio")]
#[test]
fn the_end_is_said_after_an_async_caller_holding_stderr_is_answered() {
    let stderr = traced_stderr("child_closed_while_its_async_caller_holds_stderr");
    assert_line(&stderr, "-- Ended: closed by this side");
    assert_ended_once_each(&stderr);
}

/// Serves on a thread, answers one call, then stops reading; serving returns. The client
/// stays until then: its hang-up would end the connection first.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_stopped_reading() {
    let (client, server) = typed_ipc::Connection::pair().unwrap();
    let serving = {
        let server = server.clone();
        std::thread::spawn(move || LabServer::new(Impl).serve(server))
    };
    let client = LabClient::new(client);
    assert_eq!(client.reverse("hi".into()).unwrap(), "ih");
    server.stop_reading();
    serving.join().unwrap().unwrap();
    drop(client);
}

/// [`child_stopped_reading`], async.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_stopped_reading_async() {
    use typed_ipc::tokio::AsyncConnection;
    common::current_thread_runtime().block_on(async {
        let (a, b) = typed_ipc::Socket::pair().unwrap();
        let server = AsyncConnection::new(a).unwrap();
        let client = asynchronous::LabClient::new(AsyncConnection::new(b).unwrap());
        let serving = asynchronous::LabServer::new(asynchronous::Impl).serve(server.clone());
        let calling = async {
            assert_eq!(client.reverse("hi".into()).await.unwrap(), "ih");
            server.stop_reading();
        };
        let (served, ()) = tokio::join!(serving, calling);
        served.unwrap();
    });
}

/// A connection whose reading this side stopped says so, not that the peer went: its reader
/// reads the end of the stream either way.
#[test]
fn a_connection_that_stopped_reading_says_so() {
    let stderr = traced_stderr("child_stopped_reading");
    assert_line(&stderr, "-- Ended: this side stopped reading");
    assert!(!stderr.contains("-- Ended: peer disconnected"), "{stderr}");
}

/// The same, async.
#[cfg(feature = "tokio")]
#[test]
fn an_async_connection_that_stopped_reading_says_so() {
    let stderr = traced_stderr("child_stopped_reading_async");
    assert_line(&stderr, "-- Ended: this side stopped reading");
}

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
    check_ended_by_garbage("child_served_garbage");
}

#[cfg(feature = "tokio")]
#[test]
fn a_connection_ended_by_a_protocol_error_says_the_error_async() {
    check_ended_by_garbage("child_served_garbage_async");
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
    let (mut names, conn) = Worker::spawn(child("child_names")).unwrap();
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
    let mut command = child("child_sends_a_bad_name");
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
    let mut command = child("child_sends_a_bad_name");
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

/// The reply a raw peer sends to `call` (as `socket.recv()` received it) from `Lab::reverse`:
/// its envelope as a reply, and `text` reversed.
fn reversed_reply(call: &typed_ipc::Frame, text: &str) -> Vec<u8> {
    let mut reply = call.payload[..24].to_vec();
    reply[0] = 3; // a reply
    reply[1..4].fill(0); // no lane word
    let reversed: String = text.chars().rev().collect();
    reply.extend_from_slice(&(reversed.len() as u64).to_le_bytes());
    reply.extend_from_slice(reversed.as_bytes());
    reply
}

/// An announcement, as a worker sends it first: an inbox at mailbox 0 (never written here).
fn announcement() -> Vec<u8> {
    let mut announce = vec![0u8; 24 + 16];
    announce[0] = 5;
    announce
}

/// A caller on another thread (`reverse("c")`) holds the reader role, its call received by
/// the raw peer `b`; then this thread takes stderr's lock, as
/// `writeln!(io::stderr().lock(), "{:?}", call())` does, and calls `reverse("m")`; once the
/// peer has that call it sends `peer_sends` (given both calls), which the first caller reads.
fn call_while_another_reads(peer_sends: fn(&typed_ipc::Frame, &typed_ipc::Frame) -> Vec<Vec<u8>>) {
    let (a, b) = typed_ipc::Socket::pair().unwrap();
    call_on_while_another_reads(a, b, move |b, first, second| {
        for message in peer_sends(first, second) {
            b.send(&message, &[]).unwrap();
        }
    });
}

/// [`call_while_another_reads`] on `a`, whose raw peer is `b`, where `peer_sends` sends what
/// it sends itself (fds too).
fn call_on_while_another_reads<F>(a: typed_ipc::Socket, b: typed_ipc::Socket, peer_sends: F)
where
    F: FnOnce(&typed_ipc::Socket, &typed_ipc::Frame, &typed_ipc::Frame) + Send + 'static,
{
    let (got, reader, peer) = call_holding_stderr_while_another_reads(a, b, |b, first, second| {
        peer_sends(&b, &first, &second);
        b
    });
    assert_eq!(got.unwrap(), "m");
    assert_eq!(reader.join().unwrap().unwrap(), "c");
    drop(peer.join().unwrap());
}

/// The calls of [`call_while_another_reads`] over `a`, whose raw peer `b` is `peer`'s (given
/// both calls as received, on a thread of its own): what this thread's `reverse("m")` got,
/// and the reader's and the peer's threads, for the caller to join in its own order.
fn call_holding_stderr_while_another_reads<P, R>(
    a: typed_ipc::Socket,
    b: typed_ipc::Socket,
    peer: P,
) -> (
    typed_ipc::Result<String>,
    std::thread::JoinHandle<typed_ipc::Result<String>>,
    std::thread::JoinHandle<R>,
)
where
    P: FnOnce(typed_ipc::Socket, typed_ipc::Frame, typed_ipc::Frame) -> R + Send + 'static,
    R: Send + 'static,
{
    let client = LabClient::new(typed_ipc::Connection::new(a));
    let reader = {
        let client = client.clone();
        std::thread::spawn(move || client.reverse("c".into()))
    };
    let first = recv_past_announcements(&b); // the reader's call: it holds the role
    let stderr = std::io::stderr().lock();
    let peer = std::thread::spawn(move || {
        let second = recv_past_announcements(&b);
        peer(b, first, second)
    });
    let got = client.reverse("m".into());
    drop(stderr);
    (got, reader, peer)
}

/// The next message on `socket` other than an announcement (an end whose fd limit is not
/// the default announces it as it starts).
fn recv_past_announcements(socket: &typed_ipc::Socket) -> typed_ipc::Frame {
    loop {
        let message = socket.recv().unwrap();
        if message.payload[0] != 5 {
            return message;
        }
    }
}

/// The peer announces an inbox while another thread reads: the reader's line for it.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_announced_while_its_caller_holds_stderr() {
    call_while_another_reads(|first, second| {
        vec![
            announcement(),
            reversed_reply(first, "c"),
            reversed_reply(second, "m"),
        ]
    });
}

/// A caller holding stderr's lock gets its reply although another thread reads the
/// announcement before it and says so: said with the connection's state locked, that line
/// waited for stderr, whose holder waited for the lock (or for a wake-up under it).
#[test]
fn an_announcement_is_said_without_the_connections_lock() {
    let stderr = traced_stderr("child_announced_while_its_caller_holds_stderr");
    assert_line(&stderr, "<- Announce (16 bytes, 0 fds)");
}

/// `call` (as `socket.recv()` received it: a call of `Lab::reverse`) made again by a raw
/// peer, with cookie `cookie` and argument `text`.
fn reverse_call_like(call: &typed_ipc::Frame, cookie: u64, text: &str) -> Vec<u8> {
    let mut message = call.payload[..24].to_vec();
    message[1..4].fill(0); // no lane word
    message[8..16].copy_from_slice(&cookie.to_le_bytes());
    message.extend_from_slice(&(text.len() as u64).to_le_bytes());
    message.extend_from_slice(text.as_bytes());
    message
}

/// The peer sends a call this end refuses (two fds, on an end that takes one) while another
/// thread reads: that reader answers it with a failure and says both.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_refused_a_call_while_its_caller_holds_stderr() {
    let (mut a, b) = typed_ipc::Socket::pair().unwrap();
    a.set_limits(one_fd());
    call_on_while_another_reads(a, b, |b, first, second| {
        let (files, _) = two_files();
        let fds: Vec<_> = files.iter().map(AsFd::as_fd).collect();
        b.send(&reverse_call_like(first, 77, "r"), &fds).unwrap();
        b.send(&reversed_reply(first, "c"), &[]).unwrap();
        b.send(&reversed_reply(second, "m"), &[]).unwrap();
    });
}

/// A caller holding stderr's lock gets its reply although another thread, reading for its
/// own, takes in a call this end refuses and says it: said with the reader role held (before
/// the failure went out and the role was given back), that line waited for stderr, whose
/// holder waited for the reader.
#[test]
fn a_refused_call_is_said_once_its_reader_has_let_the_role_go() {
    let stderr = traced_stderr("child_refused_a_call_while_its_caller_holds_stderr");
    let id = LAB_INFO.id;
    assert_line(
        &stderr,
        &format!(
            "<- Call #77 iface {id:#010x} cmd 0 (not received: message carries 2 file \
             descriptors, over Limits::max_fds (1))"
        ),
    );
    assert_line(
        &stderr,
        "-> Failure #77: TooManyFds { count: 2, limit: 1, which: MaxFds }",
    );
}

/// While another thread reads for its own call, on an end that takes one fd a message, this
/// thread holds stderr's lock and calls; the peer sends a oneway this end refuses (two fds),
/// a failure for this thread's call, and hangs up, which ends the reader's call.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_failed_and_hung_up_on_while_its_caller_holds_stderr() {
    let (mut a, b) = typed_ipc::Socket::pair().unwrap();
    a.set_limits(one_fd());
    let (got, reader, peer) = call_holding_stderr_while_another_reads(a, b, |b, first, second| {
        let mut oneway = reverse_call_like(&first, 0, "o");
        oneway[0] = 2;
        let (files, _) = two_files();
        let fds: Vec<_> = files.iter().map(AsFd::as_fd).collect();
        b.send(&oneway, &fds).unwrap();
        let mut failure = second.payload[..24].to_vec();
        failure[0] = 4;
        failure[1..4].fill(0);
        failure.extend_from_slice(&1u32.to_le_bytes()); // Failure::UnknownCommand
        failure.extend_from_slice(&7u32.to_le_bytes());
        b.send(&failure, &[]).unwrap();
    });
    assert!(matches!(got, Err(typed_ipc::Error::Remote(_))), "{got:?}");
    peer.join().unwrap();
    let ended = reader.join().unwrap();
    assert!(
        matches!(ended, Err(typed_ipc::Error::Disconnected)),
        "{ended:?}"
    );
}

/// A caller holding stderr's lock (and waiting with no timeout) gets its failure, while
/// another thread reads it, a oneway refused before it and the end after it: that reader
/// says each once the role is given back and the connection's lock let go.
#[test]
fn a_failure_a_refused_oneway_and_the_end_are_said_after_the_role_is_given_back() {
    let stderr = traced_stderr("child_failed_and_hung_up_on_while_its_caller_holds_stderr");
    assert_line(&stderr, "<- Failure #2 (8 bytes, 0 fds)");
    assert_line(&stderr, "-- Ended: peer disconnected");
    assert!(stderr.contains("a oneway message"), "{stderr}");
}

/// Whether `message` (as `socket.recv()` received it) is the reply to call `cookie`.
fn is_reply_to(message: &typed_ipc::Frame, cookie: u64) -> bool {
    message.payload[0] == 3 && message.payload[8..16] == cookie.to_le_bytes()
}

/// This end serves `Lab` on a thread, and this thread, holding stderr's lock, calls the raw
/// peer, which calls back (`reverse("yz")`) and answers only once it has its answer, as a
/// handler calling back into its caller does.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_called_back_while_its_caller_holds_stderr() {
    let (a, b) = typed_ipc::Socket::pair().unwrap();
    let conn = typed_ipc::Connection::new(a);
    let serving = {
        let conn = conn.clone();
        std::thread::spawn(move || LabServer::new(Impl).serve(conn))
    };
    let client = LabClient::new(conn.clone());
    let stderr = std::io::stderr().lock();
    let peer = std::thread::spawn(move || {
        let call = b.recv().unwrap();
        b.send(&reverse_call_like(&call, 99, "yz"), &[]).unwrap();
        assert!(
            is_reply_to(&b.recv().unwrap(), 99),
            "the callback is answered"
        );
        b.send(&reversed_reply(&call, "m"), &[]).unwrap();
        b
    });
    let got = client.reverse("m".into());
    drop(stderr);
    assert_eq!(got.unwrap(), "m");
    let b = peer.join().unwrap();
    conn.close();
    serving.join().unwrap().unwrap();
    drop(b);
}

/// A serving thread says what it runs and answers without waiting for stderr's lock: a
/// thread holding it (as `writeln!(io::stderr().lock(), "{:?}", call())` does) may be
/// waiting for a call whose answer waits for a request to this end, which only a serving
/// thread runs. Said waiting for the lock, the serving thread waited for that thread, which
/// waited for the peer, which waited for the serving thread.
#[test]
fn a_serving_thread_says_what_it_runs_without_waiting_for_stderr() {
    let stderr = traced_stderr("child_called_back_while_its_caller_holds_stderr");
    // Said as received, or, read by the caller before the serving thread was in `run`, as
    // held until it was.
    let said = [
        "<- Call #99 Lab::reverse (10 bytes, 0 fds)",
        "-- Call #99 held until served: Lab::reverse",
    ];
    let found = stderr
        .lines()
        .any(|l| said.iter().any(|s| l.ends_with(&format!("] {s}"))));
    assert!(found, "no line of {said:?} in:\n{stderr}");
    assert_line(&stderr, r#"-> Reply #99 "zy""#);
}

/// The peer answers this thread's call while another thread reads.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_answered_while_its_caller_holds_stderr() {
    call_while_another_reads(|first, second| {
        vec![reversed_reply(second, "m"), reversed_reply(first, "c")]
    });
}

/// A caller holding stderr's lock gets its reply when another thread reads it: said before
/// the reply reached its caller, the reader's line waited for stderr, whose holder waited for
/// the reply.
#[test]
fn a_reply_read_for_another_caller_reaches_it_before_it_is_said() {
    let stderr = traced_stderr("child_answered_while_its_caller_holds_stderr");
    assert_line(&stderr, "<- Reply #2 (9 bytes, 0 fds)");
    assert_line(&stderr, "<- Reply #1 (9 bytes, 0 fds)");
}

/// [`child_answered_while_its_caller_holds_stderr`], async: the caller holds stderr's lock
/// around `block_on`, and the connection's reader task, on a worker of the runtime, reads its
/// reply.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_answered_while_its_async_caller_holds_stderr() {
    let runtime = common::two_worker_runtime();
    let (conn, b) = async_connection(&runtime);
    async_call_holding_stderr(&runtime, conn, b, |b| {
        let call = b.recv().unwrap();
        b.send(&reversed_reply(&call, "m"), &[]).unwrap();
    });
}

/// The same, async: the reader task says the reply once its caller has it.
#[cfg(feature = "tokio")]
#[test]
fn a_reply_reaches_its_async_caller_before_it_is_said() {
    let stderr = traced_stderr("child_answered_while_its_async_caller_holds_stderr");
    assert_line(&stderr, "<- Reply #1 (9 bytes, 0 fds)");
}

/// [`child_called_back_while_its_caller_holds_stderr`], async, on `runtime`: this end serves
/// the async `Lab`, and this thread holds stderr's lock around `block_on`. The peer's
/// callback is `callback` (given the call); it answers once the callback is answered with a
/// message of kind `answered` (3 a reply, 4 a failure).
#[cfg(feature = "tokio")]
fn async_called_back(
    runtime: tokio::runtime::Runtime,
    callback: fn(&typed_ipc::Frame) -> Vec<u8>,
    answered: u8,
) {
    let (conn, b) = async_connection(&runtime);
    drop(asynchronous::LabServer::new(asynchronous::Impl).serve(conn.clone()));
    async_call_holding_stderr(&runtime, conn.clone(), b, move |b| {
        let call = b.recv().unwrap();
        b.send(&callback(&call), &[]).unwrap();
        let answer = b.recv().unwrap();
        assert_eq!(answer.payload[0], answered, "the callback's answer");
        assert_eq!(
            answer.payload[8..16],
            99u64.to_le_bytes(),
            "the callback's answer"
        );
        b.send(&reversed_reply(&call, "m"), &[]).unwrap();
    });
    conn.close();
    runtime.block_on(conn.wait_closed());
}

/// A runtime of one worker, whose handler task answers the peer's callback.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_async_called_back_on_one_worker_while_its_caller_holds_stderr() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    async_called_back(runtime, |call| reverse_call_like(call, 99, "yz"), 3);
}

/// A callback of a command this end does not have, which its handler task answers with a
/// failure.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_async_called_back_in_vain_while_its_caller_holds_stderr() {
    let unknown = |call: &typed_ipc::Frame| {
        let mut callback = reverse_call_like(call, 99, "yz");
        callback[4..8].copy_from_slice(&999u32.to_le_bytes());
        callback
    };
    async_called_back(common::two_worker_runtime(), unknown, 4);
}

/// The async flavour's tasks say what they send without waiting for stderr's lock: a thread
/// holding it around `block_on` may be waiting for a call whose answer waits for a request
/// to this end, and so for the runtime's workers, which the line would hold. Here the
/// handler task said its reply once it was out, holding the runtime's only worker, which the
/// reader task needed to read the caller's reply: both hung.
#[cfg(feature = "tokio")]
#[test]
fn async_tasks_say_what_they_send_without_waiting_for_stderr() {
    let stderr =
        traced_stderr("child_async_called_back_on_one_worker_while_its_caller_holds_stderr");
    assert_line(&stderr, r#"-> Reply #99 "zy""#);
}

/// The same for a failure, which the task said before it sent it: the peer waited for it
/// however many workers the runtime has.
#[cfg(feature = "tokio")]
#[test]
fn an_async_failure_goes_out_without_waiting_for_stderr() {
    let stderr = traced_stderr("child_async_called_back_in_vain_while_its_caller_holds_stderr");
    assert_line(&stderr, "-> Failure #99: UnknownCommand(999)");
}

/// Calls a worker, then drops the connection's last handle without closing it.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_dropped_traced() {
    let (mut lab, conn) = Worker::spawn(child("child_lab")).unwrap();
    let client = LabClient::new(conn);
    assert_eq!(client.reverse("hi".into()).unwrap(), "ih");
    drop(client);
    lab.wait().unwrap();
}

/// A connection whose last handle is dropped says so, as an async one does: it ended,
/// though no thread was there to read its end.
#[test]
fn a_connection_dropped_says_so() {
    let stderr = traced_stderr("child_dropped_traced");
    assert_line(
        &stderr,
        "-- Ended: closed by this side: its last handle was dropped",
    );
    assert_line(&stderr, "-- Ended: peer disconnected");
    assert_ended_once_each(&stderr);
}

/// Bytes `socket` sent that its peer has not read yet (`SIOCOUTQ`).
fn unread_by_peer(socket: &typed_ipc::Socket) -> i32 {
    let mut unread: libc::c_int = 0;
    let fd = std::os::fd::AsFd::as_fd(socket).as_raw_fd();
    // SAFETY: `fd` is a socket this function borrows; `TIOCOUTQ` (`SIOCOUTQ`) writes one int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut unread) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    unread
}

/// A thread sends a call larger than the socket buffer (64 MiB), which the raw peer `b` does
/// not read yet: it holds the connection's send lock, and reads meanwhile. This thread then takes
/// stderr's lock and calls, waiting for that send lock; the peer announces an inbox, which
/// the sending thread reads and says, and only then reads both calls and answers them.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_announced_to_a_sender_while_a_caller_holds_stderr() {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let (a, b) = typed_ipc::Socket::pair().unwrap();
    let client = LabClient::new(typed_ipc::Connection::new(a));
    let large = "x".repeat(64 << 20);
    let sender = {
        let (client, large) = (client.clone(), large.clone());
        std::thread::spawn(move || client.reverse(large))
    };
    // Part of the large call is in: its sender holds the send lock until the rest is out.
    let mut ready = [PollFd::new(b.as_fd(), PollFlags::POLLIN)];
    poll(&mut ready, PollTimeout::NONE).unwrap();
    let stderr = std::io::stderr().lock();
    let peer = std::thread::spawn(move || {
        b.send(&announcement(), &[]).unwrap();
        // Read by the only thread that may read now: the sender, mid-send.
        while unread_by_peer(&b) > 0 {
            std::thread::yield_now();
        }
        let large = b.recv().unwrap();
        let text = String::from_utf8(large.payload[32..].to_vec()).unwrap();
        b.send(&reversed_reply(&large, &text), &[]).unwrap();
        let small = b.recv().unwrap();
        b.send(&reversed_reply(&small, "m"), &[]).unwrap();
        b
    });
    let got = client.reverse("m".into());
    drop(stderr);
    assert_eq!(got.unwrap(), "m");
    assert_eq!(sender.join().unwrap().unwrap(), large);
    drop(peer.join().unwrap());
}

/// A thread waiting for room to send, which reads meanwhile holding the send lock, says what
/// it reads without waiting for stderr's lock: a caller holding it (as
/// `writeln!(io::stderr().lock(), "{:?}", call())` does) may be waiting for the send lock.
#[test]
fn a_sender_reading_says_what_it_reads_without_waiting_for_stderr() {
    let stderr = traced_stderr("child_announced_to_a_sender_while_a_caller_holds_stderr");
    assert_line(&stderr, "<- Announce (16 bytes, 0 fds)");
}

/// [`child_answered_while_its_async_caller_holds_stderr`], with a oneway of the peer's before
/// the reply: the reader task reads and says it first.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_answered_after_a_oneway_while_its_async_caller_holds_stderr() {
    let runtime = common::two_worker_runtime();
    let (conn, b) = async_connection(&runtime);
    async_call_holding_stderr(&runtime, conn, b, |b| {
        let call = b.recv().unwrap();
        let mut oneway = reversed_reply(&call, "");
        oneway[0] = 2; // a oneway, of no arguments
        oneway[8..16].fill(0);
        b.send(&oneway, &[]).unwrap();
        b.send(&reversed_reply(&call, "m"), &[]).unwrap();
    });
}

/// The async reader task says what it reads without waiting for stderr's lock: every call's
/// reply waits for it, and a caller may hold that lock until its reply comes.
#[cfg(feature = "tokio")]
#[test]
fn the_async_reader_says_what_it_reads_without_waiting_for_stderr() {
    let stderr = traced_stderr("child_answered_after_a_oneway_while_its_async_caller_holds_stderr");
    let id = LAB_INFO.id;
    let oneway = format!("<- Oneway iface {id:#010x} cmd 0 (8 bytes, 0 fds; not served yet)");
    assert_line(&stderr, &oneway);
    assert_line(&stderr, "<- Reply #1 (9 bytes, 0 fds)");
}

/// Serves an async connection whose peer hangs up, holding stderr's lock around `block_on`
/// (as `writeln!(io::stderr().lock(), "{:?}", rt.block_on(serve))` does): serving returns
/// once the reader task is done, and that task says the end.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_served_async_while_holding_stderr() {
    let runtime = common::two_worker_runtime();
    let (conn, b) = async_connection(&runtime);
    let serving = asynchronous::LabServer::new(asynchronous::Impl).serve(conn);
    let stderr = std::io::stderr().lock();
    drop(b);
    let served = runtime.block_on(serving);
    drop(stderr);
    served.unwrap();
}

/// The async reader task says the end without waiting for stderr's lock, whose holder may
/// wait for serving to return, which waits for that task.
#[cfg(feature = "tokio")]
#[test]
fn serving_returns_to_an_async_caller_holding_stderr() {
    let stderr = traced_stderr("child_served_async_while_holding_stderr");
    assert_line(&stderr, "-- Ended: peer disconnected");
    assert_ended_once_each(&stderr);
}

/// Two ends that trust each other with pipes, then one that no longer does: each end's
/// announcement is a message it sends, and the peer's line for it says it received one.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_lent_pages() {
    let (client, server) = typed_ipc::Connection::pair().unwrap();
    client.lend_pages_to_peer(true);
    server.lend_pages_to_peer(true);
    let serving = std::thread::spawn(move || LabServer::new(Impl).serve(server));
    let client = LabClient::new(client);
    assert_eq!(client.reverse("hi".into()).unwrap(), "ih");
    client.connection().lend_pages_to_peer(false);
    drop(client);
    serving.join().unwrap().unwrap();
}

/// [`child_lent_pages`], async.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_lent_pages_async() {
    use typed_ipc::tokio::AsyncConnection;
    common::current_thread_runtime().block_on(async {
        let (client, server) = AsyncConnection::pair().unwrap();
        client.lend_pages_to_peer(true);
        server.lend_pages_to_peer(true);
        let serving = asynchronous::LabServer::new(asynchronous::Impl).serve(server);
        let client = asynchronous::LabClient::new(client);
        assert_eq!(client.reverse("hi".into()).await.unwrap(), "ih");
        client.connection().lend_pages_to_peer(false);
        client.connection().close();
        drop(client);
        serving.await.unwrap();
    });
}

/// Fails unless `stderr` says both ends announced their trust, and one took it back.
fn check_lent_pages(scenario: &str) {
    let stderr = traced_stderr(scenario);
    let lines = |want: &str| {
        let suffix = format!("] {want}");
        stderr.lines().filter(|l| l.ends_with(&suffix)).count()
    };
    assert_eq!(
        lines("-> Announce (trusts the peer with pipes)"),
        2,
        "{stderr}"
    );
    assert_eq!(
        lines("-> Announce (no longer trusts the peer with pipes)"),
        1,
        "{stderr}"
    );
    assert_eq!(lines("<- Announce (16 bytes, 0 fds)"), 3, "{stderr}");
}

/// `TYPED_IPC_DEBUG` prints every message sent: also the one `lend_pages_to_peer` sends.
#[test]
fn a_connection_says_it_announces_its_trust_in_pipes() {
    check_lent_pages("child_lent_pages");
}

/// The same, async.
#[cfg(feature = "tokio")]
#[test]
fn an_async_connection_says_it_announces_its_trust_in_pipes() {
    check_lent_pages("child_lent_pages_async");
}

/// A traced worker whose stderr is a full pipe (its parent reads it only later, say), called
/// a few times; then the pipe is emptied, one more call made, and what the worker wrote
/// once there was room is printed here.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_traced_worker_with_a_full_stderr() {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use std::io::Read;
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    // Filled through the pipe's one open file, which the worker then shares: made
    // non-blocking only meanwhile.
    let blocking = OFlag::from_bits_truncate(fcntl(&write_end, FcntlArg::F_GETFL).unwrap());
    fcntl(&write_end, FcntlArg::F_SETFL(blocking | OFlag::O_NONBLOCK)).unwrap();
    let mut filled = 0;
    while let Ok(n) = nix::unistd::write(&write_end, &[b'.'; 4096]) {
        filled += n;
    }
    fcntl(&write_end, FcntlArg::F_SETFL(blocking)).unwrap();
    let mut command = child("child_lab");
    command.stderr(Stdio::from(write_end));
    let (mut lab, conn) = Worker::spawn(command).unwrap();
    let client = LabClient::new(conn);
    for _ in 0..3 {
        assert_eq!(client.reverse("abc".into()).unwrap(), "cba");
    }
    // The filler only: a line the worker writes once there is room (its `-> Reply #3` may
    // come after the parent has that reply) stays for the print below.
    let mut pipe = std::fs::File::from(read_end);
    pipe.read_exact(&mut vec![0u8; filled]).unwrap();
    assert_eq!(client.reverse("ab".into()).unwrap(), "ba");
    client.connection().close();
    drop(client);
    lab.wait().unwrap();
    let mut written = String::new();
    pipe.read_to_string(&mut written).unwrap();
    eprint!("{written}");
}

/// A traced process whose stderr is a pipe nobody empties goes on: the lines it cannot
/// write at once are left out, and counted in a line of their own once there is room.
/// Before, its first traced line waited for room, and with it the process's calls and
/// their callers: here the worker, and the parent calling it.
#[test]
fn a_full_stderr_holds_no_traced_process_up() {
    let stderr = traced_stderr("child_traced_worker_with_a_full_stderr");
    let said = |want: &str| {
        stderr
            .lines()
            .position(|l| l.starts_with("typed-ipc[") && l.ends_with(want))
            .unwrap_or_else(|| panic!("no line ending {want:?} in:\n{stderr}"))
    };
    let unprinted = said("not printed: stderr was full");
    assert!(said(r#"-> Reply #4 "ba""#) > unprinted, "{stderr}");
}

/// Serves `Lab` by replying to any call with 16 MiB, given up after one poll (a timeout
/// around [`AsyncCall::reply`](typed_ipc::tokio::AsyncCall::reply)): what the socket takes
/// goes out, the rest from the connection's task, as for a call cut off part-way; but a
/// reply has no traced line to print.
#[cfg(feature = "tokio")]
struct CutsOffItsReply;

#[cfg(feature = "tokio")]
impl typed_ipc::tokio::AsyncService for CutsOffItsReply {
    fn info(&self) -> &'static typed_ipc::service::InterfaceInfo {
        &asynchronous::LAB_INFO
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut typed_ipc::tokio::AsyncCall,
    ) -> typed_ipc::tokio::BoxFuture<'a, typed_ipc::Result<()>> {
        Box::pin(async move {
            let reply = call.reply("r".repeat(16 << 20));
            let cut_off = tokio::time::timeout(std::time::Duration::ZERO, reply).await;
            assert!(cut_off.is_err(), "{cut_off:?}");
            Ok(())
        })
    }
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

/// A call given up before any of it went out, after a reply on this thread was cut off
/// part-way: nothing of the call was sent.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_unsent_after_a_reply_cut_off_async() {
    common::current_thread_runtime().block_on(async {
        // A call that waits for the send lock, which a 16 MiB call part-way out to a peer
        // that reads nothing holds.
        let (ours, _theirs) = typed_ipc::Socket::pair().unwrap();
        let conn = typed_ipc::tokio::AsyncConnection::new(ours).unwrap();
        let stuck = asynchronous::LabClient::new(conn);
        let mut big = Box::pin(stuck.echo(vec![7; 16 << 20]));
        pending_after_one_poll(big.as_mut()).await;
        let mut unsent = Box::pin(stuck.reverse("never sent".into()));
        pending_after_one_poll(unsent.as_mut()).await;
        // Meanwhile, on another connection, a reply is cut off part-way.
        let (server, client) = typed_ipc::tokio::AsyncConnection::pair().unwrap();
        server.add_service(CutsOffItsReply);
        let client = asynchronous::LabClient::new(client);
        let answer = client.reverse("z".into()).await.unwrap();
        assert_eq!(answer.len(), 16 << 20);
        // Given up, unsent.
        drop(unsent);
    });
}

/// The call given up unsent is not printed as sent: the reply cut off part-way before it,
/// on the same thread, which the connection sent on in the background, is no call's.
#[cfg(feature = "tokio")]
#[test]
fn a_reply_cut_off_part_way_makes_no_unsent_call_print_as_sent_async() {
    let stderr = traced_stderr("child_unsent_after_a_reply_cut_off_async");
    assert!(
        stderr.contains("Lab::echo(") && stderr.contains("Reply #1"),
        "the scenario did not run:\n{stderr}"
    );
    // Said before its send started, and then that none of it went out.
    let said = stderr
        .lines()
        .position(|l| l.contains(r#"-> Call #2 Lab::reverse("never sent")"#));
    let unsent = stderr
        .lines()
        .position(|l| l.ends_with("-- Call #2 not sent: its future was dropped"));
    assert!(
        matches!((said, unsent), (Some(said), Some(unsent)) if said < unsent),
        "a call that never went out is not said to be unsent:\n{stderr}"
    );
    // The reply, said before its send started, went out from the connection's task.
    assert_line(
        &stderr,
        "-- Reply #1 went out in the background: its sender gave up part-way \
         (its future was dropped)",
    );
    // That reply is the call's answer: no failure follows it.
    assert!(!stderr.contains("-> Failure #1"), "{stderr}");
}

/// An interface no worker here serves: its calls name it by its id and command.
#[cfg_attr(feature = "tokio", typed_ipc::interface(async_client))]
#[cfg_attr(not(feature = "tokio"), typed_ipc::interface)]
pub trait Unserved {
    /// Never answered.
    fn first(&self);
    /// Never answered either.
    fn second(&self, n: u32) -> u32;
}

/// Calls `child_lab` on an interface it does not serve.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_called_unserved() {
    let (mut lab, conn) = Worker::spawn(child("child_lab")).unwrap();
    let unserved = UnservedClient::new(conn).second(7);
    assert!(unserved.is_err(), "{unserved:?}");
    lab.kill().unwrap();
}

/// The async flavour of [`child_called_unserved`].
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_called_unserved_async() {
    common::current_thread_runtime().block_on(async {
        let spawned = typed_ipc::tokio::worker::spawn(child("child_async_lab"));
        let (mut lab, conn) = spawned.unwrap();
        let unserved = UnservedAsyncClient::new(conn).second(7).await;
        assert!(unserved.is_err(), "{unserved:?}");
        lab.kill().unwrap();
    });
}

/// A request for an interface this end does not serve is named by its id and command, which
/// the peer's source says.
#[test]
fn a_request_not_served_is_named_by_its_ids() {
    check_unserved("child_called_unserved");
}

/// The same from the async flavour.
#[cfg(feature = "tokio")]
#[test]
fn a_request_not_served_is_named_by_its_ids_async() {
    check_unserved("child_called_unserved_async");
}

fn check_unserved(scenario: &str) {
    let stderr = traced_stderr(scenario);
    let (id, cmd) = (UNSERVED_INFO.id, UNSERVED_INFO.methods[1].cmd);
    assert_line(
        &stderr,
        &format!("<- Call #1 iface {id:#010x} cmd {cmd} (4 bytes, 0 fds)"),
    );
}

/// Requests that arrive while no thread serves: `b` reads `a`'s call and oneway while it
/// waits for the reply to its own call to `a`, before any thread runs `b`.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_held_until_served() {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let (a, b) = typed_ipc::Socket::pair().unwrap();
    let (a, b) = (typed_ipc::Connection::new(a), typed_ipc::Connection::new(b));
    let served = a.clone();
    std::thread::spawn(move || LabServer::new(Impl).serve(served));
    let from_a = LabClient::new(a);
    let early = std::thread::spawn({
        let from_a = from_a.clone();
        move || from_a.reverse("ab".into())
    });
    // Once `b` can read, the early call is in its socket, before the oneway.
    let mut ready = [PollFd::new(b.as_fd(), PollFlags::POLLIN)];
    poll(&mut ready, PollTimeout::NONE).unwrap();
    from_a.note(5).unwrap();
    assert_eq!(
        LabClient::new(b.clone()).reverse("xy".into()).unwrap(),
        "yx"
    );
    std::thread::spawn(move || LabServer::new(Impl).serve(b));
    assert_eq!(early.join().unwrap().unwrap(), "ba");
    // Runs once the oneway that arrived before it has.
    assert_eq!(from_a.reverse("cd".into()).unwrap(), "dc");
}

/// Such requests are said as received with their ids, not served yet, and named once they
/// run.
#[test]
fn a_request_held_until_served_is_named_when_it_is() {
    let stderr = traced_stderr("child_held_until_served");
    let note = LAB_INFO
        .methods
        .iter()
        .find(|m| m.name == "note")
        .unwrap()
        .cmd;
    let id = LAB_INFO.id;
    assert_line(
        &stderr,
        &format!("<- Call #1 iface {id:#010x} cmd 0 (10 bytes, 0 fds; not served yet)"),
    );
    assert_line(
        &stderr,
        &format!("<- Oneway iface {id:#010x} cmd {note} (8 bytes, 0 fds; not served yet)"),
    );
    assert_line(&stderr, "-- Call #1 held until served: Lab::reverse");
    assert_line(&stderr, "-- Oneway held until served: Lab::note");
    // Not said as received a second time as they run, by `b`, the second connection (`c2`).
    // Only `b`'s lines: `a`'s serving thread may not be in `run` yet as `b`'s call comes, so
    // `a` says that call as served at once or as held, as it happens.
    let said_by_b = |what: &str| {
        let b = stderr.lines().filter(|l| l.contains(" c2] "));
        b.filter(|l| l.ends_with(what)).count()
    };
    let call = said_by_b("<- Call #1 Lab::reverse (10 bytes, 0 fds)");
    assert_eq!(call, 0, "{stderr}");
    let oneway = said_by_b("<- Oneway Lab::note (8 bytes, 0 fds)");
    assert_eq!(oneway, 0, "{stderr}");
}

/// A request that arrives before its service is added (a worker's first, read as it gets its
/// connection), then served: `b` reads `a`'s call before the reply to its own call to `a`.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_held_until_served_async() {
    use typed_ipc::tokio::AsyncConnection;
    common::current_thread_runtime().block_on(async {
        let (a, b) = AsyncConnection::pair().unwrap();
        let serving = asynchronous::LabServer::new(asynchronous::Impl).serve(a.clone());
        let _serving = tokio::spawn(serving);
        let from_a = asynchronous::LabClient::new(a);
        let mut early = Box::pin(from_a.reverse("ab".into()));
        pending_after_one_poll(early.as_mut()).await;
        let from_b = asynchronous::LabClient::new(b.clone());
        assert_eq!(from_b.reverse("xy".into()).await.unwrap(), "yx");
        let serving = asynchronous::LabServer::new(asynchronous::Impl).serve(b);
        let _serving = tokio::spawn(serving);
        assert_eq!(early.await.unwrap(), "ba");
    });
}

/// Such a request is said as received with its ids, not served yet, and named once it is.
#[cfg(feature = "tokio")]
#[test]
fn a_request_held_until_served_is_named_when_it_is_async() {
    let stderr = traced_stderr("child_held_until_served_async");
    let id = LAB_INFO.id;
    assert_line(
        &stderr,
        &format!("<- Call #1 iface {id:#010x} cmd 0 (10 bytes, 0 fds; not served yet)"),
    );
    assert_line(&stderr, "-- Call #1 held until served: Lab::reverse");
}

/// Kills its worker through a `Killer` once it has answered, then calls it in vain.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_killed_traced() {
    let (mut lab, conn) = Worker::spawn(child("child_lab")).unwrap();
    let client = LabClient::new(conn);
    assert_eq!(client.reverse("hi".into()).unwrap(), "ih");
    lab.killer().unwrap().kill().unwrap();
    let after = client.reverse("hi".into());
    assert!(
        matches!(after, Err(typed_ipc::Error::Disconnected)),
        "{after:?}"
    );
    lab.wait().unwrap();
}

/// The async flavour of [`child_killed_traced`], with `Worker::kill`.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_killed_traced_async() {
    common::current_thread_runtime().block_on(async {
        let spawned = typed_ipc::tokio::worker::spawn(child("child_async_lab"));
        let (mut lab, conn) = spawned.unwrap();
        let client = asynchronous::LabClient::new(conn);
        assert_eq!(client.reverse("hi".into()).await.unwrap(), "ih");
        lab.kill().unwrap();
        let after = client.reverse("hi".into()).await;
        assert!(
            matches!(after, Err(typed_ipc::Error::Disconnected)),
            "{after:?}"
        );
    });
}

/// A worker this side killed is not said to have hung up.
#[test]
fn a_killed_worker_is_said_to_be_killed() {
    check_killed("child_killed_traced");
}

/// The same from the async flavour.
#[cfg(feature = "tokio")]
#[test]
fn a_killed_worker_is_said_to_be_killed_async() {
    check_killed("child_killed_traced_async");
}

fn check_killed(scenario: &str) -> String {
    let stderr = traced_stderr(scenario);
    assert_line(&stderr, "-- Ended: this side killed the worker");
    assert!(!stderr.contains("-- Ended: peer disconnected"), "{stderr}");
    stderr
}

/// A call is said before its send starts, so that the peer's lines about it come after it in
/// a shared stderr; one whose send then fails says so.
#[test]
fn a_call_whose_send_failed_says_so() {
    let stderr = check_killed("child_killed_traced");
    assert_line(&stderr, r#"-> Call #2 Lab::reverse("hi")"#);
    assert_line(&stderr, "-- Call #2 send failed: peer disconnected");
}

/// `Lab::reverse(text)` as a raw peer of `info`'s server sends it, with cookie `cookie`.
fn raw_reverse_call(info: &typed_ipc::service::InterfaceInfo, cookie: u64, text: &str) -> Vec<u8> {
    let mut message = vec![1, 0, 0, 0]; // a call, no lane word
    message.extend_from_slice(&0u32.to_le_bytes()); // `reverse`
    message.extend_from_slice(&cookie.to_le_bytes());
    message.extend_from_slice(&info.id.to_le_bytes());
    message.extend_from_slice(&info.signature.to_le_bytes());
    message.extend_from_slice(&(text.len() as u64).to_le_bytes());
    message.extend_from_slice(text.as_bytes());
    message
}

/// A raw parent calls its traced worker (`worker`, serving `info`) to reverse 16 MiB, more
/// than the socket holds, and reads none of the reply until the worker's stderr (a pipe of
/// its own) says it was sent: that line must come while the reply waits for room, which
/// only this end's reading makes. Then it reads the reply's first datagram and hangs up, so
/// the rest cannot go. Prints the worker's lines.
fn reply_held(worker: &str, info: &typed_ipc::service::InterfaceInfo) {
    use std::io::{BufRead, Read};
    let mut command = child(worker);
    command.stderr(Stdio::piped());
    let (mut lab, socket) = Worker::spawn_socket(command).unwrap();
    let mut said = std::io::BufReader::new(lab.take_stderr().unwrap());
    socket
        .send(&raw_reverse_call(info, 1, &"r".repeat(16 << 20)), &[])
        .unwrap();
    let mut lines = String::new();
    while !lines.lines().any(|l| l.contains("-> Reply #1 ")) {
        // Before the reply was said before its send, this waited for good (the hang guard).
        let read = said.read_line(&mut lines).unwrap();
        assert!(read > 0, "the worker ended, its reply unsaid:\n{lines}");
    }
    // Some of the reply's bytes are out (after its first datagram, which says its length,
    // the only one over 16 MiB): the rest is cut off.
    let mut datagram = vec![0u8; 1 << 20];
    let mut reply_started = false;
    loop {
        let fd = socket.as_fd().as_raw_fd();
        let n = nix::sys::socket::recv(fd, &mut datagram, nix::sys::socket::MsgFlags::empty());
        let n = n.unwrap();
        assert!(n > 0, "the worker hung up");
        let total = u32::from_le_bytes(datagram[8..12].try_into().unwrap());
        reply_started |= datagram[3] == 1 && total > 16 << 20;
        if reply_started && n > 16 {
            break;
        }
    }
    drop(socket);
    said.read_to_string(&mut lines).unwrap();
    let _ = lab.wait(); // its `serve` may fail with the cut-off reply
    eprint!("{lines}");
}

/// A reply held up by a parent that does not read, then cut off part-way.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_reply_held() {
    reply_held("child_lab", &LAB_INFO);
}

/// The async flavour of [`child_reply_held`].
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_reply_held_async() {
    reply_held("child_async_lab", &asynchronous::LAB_INFO);
}

/// A reply is said before its send starts, so that in a stderr shared with its caller the
/// caller's `<- Reply` line comes after it; a send that then fails says so. Before, a reply
/// was said once sent: here, never while its send waited for the caller to read.
#[test]
fn a_reply_is_said_before_it_is_sent_and_a_failed_send_says_so() {
    check_reply_held("child_reply_held", "send failed: peer disconnected");
}

/// The same from the async flavour, which also says how much of the reply went out.
#[cfg(feature = "tokio")]
#[test]
fn a_reply_is_said_before_it_is_sent_and_a_failed_send_says_so_async() {
    check_reply_held("child_reply_held_async", "send failed after ");
}

fn check_reply_held(scenario: &str, failed: &str) {
    let stderr = traced_stderr(scenario);
    let at = |want: &str| stderr.lines().position(|l| l.contains(want));
    let said = at(r#"-> Reply #1 "rrrr"#);
    let failed = at(&format!("-- Reply #1 {failed}"));
    assert!(
        matches!((said, failed), (Some(said), Some(failed)) if said < failed),
        "a reply cut off part-way is not said, then said to have failed:\n{stderr}"
    );
    if scenario.ends_with("_async") {
        let line = &stderr.lines().nth(failed.unwrap()).unwrap();
        let total = 24 + 8 + (16 << 20);
        assert!(
            line.ends_with(&format!(" of {total} bytes: peer disconnected")),
            "{line}"
        );
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_shut_down_traced() {
    use typed_ipc::{Connection, Listener, Server};
    let name = format!("typed-ipc-trace-shut-down-{}", std::process::id());
    let listener = Listener::bind_abstract(&name).unwrap();
    let serving = Server::new()
        .service(LabServer::new(Impl))
        .listen(listener)
        .unwrap();
    let client = LabClient::new(Connection::connect_abstract(&name).unwrap());
    assert_eq!(client.reverse("ab".into()).unwrap(), "ba");
    serving.shutdown();
    let after = client.reverse("ab".into());
    assert!(
        matches!(after, Err(typed_ipc::Error::ShutDown)),
        "{after:?}"
    );
}

/// The async flavour of [`child_shut_down_traced`].
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_shut_down_traced_async() {
    use typed_ipc::tokio::{AsyncConnection, AsyncListener, AsyncServer};
    common::current_thread_runtime().block_on(async {
        let name = format!("typed-ipc-trace-shut-down-async-{}", std::process::id());
        let serving = AsyncServer::new()
            .service(asynchronous::LabServer::new(asynchronous::Impl))
            .listen(AsyncListener::bind_abstract(&name).unwrap());
        let connection = AsyncConnection::connect_abstract(&name).await.unwrap();
        let client = asynchronous::LabClient::new(connection);
        assert_eq!(client.reverse("ab".into()).await.unwrap(), "ba");
        serving.shutdown().await;
        let after = client.reverse("ab".into()).await;
        assert!(
            matches!(after, Err(typed_ipc::Error::ShutDown)),
            "{after:?}"
        );
    });
}

/// A listener's graceful shutdown says so as its last message to each client, and the
/// client prints it received, and why its connection ended.
#[test]
fn a_shut_down_notice_is_printed_sent_and_received() {
    check_shut_down("child_shut_down_traced");
}

/// The same from the async flavour's server and client.
#[cfg(feature = "tokio")]
#[test]
fn a_shut_down_notice_is_printed_sent_and_received_async() {
    check_shut_down("child_shut_down_traced_async");
}

fn check_shut_down(scenario: &str) {
    let stderr = traced_stderr(scenario);
    let has = |want: &str| assert_line(&stderr, want);
    has("-> ShutDown (the calls not answered did not run)");
    has("<- ShutDown (0 bytes, 0 fds)");
    has("-- Ended: peer shut down before it ran the call");
}
