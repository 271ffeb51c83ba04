//! The traced scenario: every message printed, those sent with their values and those received
//! with their sizes; and a region given back named as the peer mapped it.

use typed_ipc::worker::{self, Worker};

use crate::common::child;
use crate::{
    Config, Impl, LabClient, Refusal, TAG_CALLS, Tag, assert_ended_once_each, assert_line, name_of,
    traced_stderr, two_files,
};
#[cfg(feature = "tokio")]
use crate::{asynchronous, common};

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
    let (mut sink, conn) = Worker::spawn(child("messages::child_sink")).unwrap();
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
    let stderr = traced_stderr("messages::child_region_unmade");
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
    check_trace("messages::child_traced");
}

/// The same from the async flavour's client and server.
#[cfg(feature = "tokio")]
#[test]
fn every_message_is_printed_with_its_values_async() {
    check_trace("messages::child_traced_async");
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
