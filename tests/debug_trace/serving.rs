//! Requests not served or held until served, named by their ids; replies said before they are
//! sent; killed workers; shut-down notices.

use std::os::fd::{AsFd, AsRawFd};
use std::process::Stdio;

use typed_ipc::worker::Worker;

use crate::common::child;
use crate::{Impl, LAB_INFO, LabClient, LabServer, assert_line, traced_stderr};
#[cfg(feature = "tokio")]
use crate::{asynchronous, common, pending_after_one_poll};

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
    check_unserved("serving::child_called_unserved");
}

/// The same from the async flavour.
#[cfg(feature = "tokio")]
#[test]
fn a_request_not_served_is_named_by_its_ids_async() {
    check_unserved("serving::child_called_unserved_async");
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
    let stderr = traced_stderr("serving::child_held_until_served");
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
    let stderr = traced_stderr("serving::child_held_until_served_async");
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
    check_killed("serving::child_killed_traced");
}

/// The same from the async flavour.
#[cfg(feature = "tokio")]
#[test]
fn a_killed_worker_is_said_to_be_killed_async() {
    check_killed("serving::child_killed_traced_async");
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
    let stderr = check_killed("serving::child_killed_traced");
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
    check_reply_held(
        "serving::child_reply_held",
        "send failed: peer disconnected",
    );
}

/// The same from the async flavour, which also says how much of the reply went out.
#[cfg(feature = "tokio")]
#[test]
fn a_reply_is_said_before_it_is_sent_and_a_failed_send_says_so_async() {
    check_reply_held("serving::child_reply_held_async", "send failed after ");
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
    check_shut_down("serving::child_shut_down_traced");
}

/// The same from the async flavour's server and client.
#[cfg(feature = "tokio")]
#[test]
fn a_shut_down_notice_is_printed_sent_and_received_async() {
    check_shut_down("serving::child_shut_down_traced_async");
}

fn check_shut_down(scenario: &str) {
    let stderr = traced_stderr(scenario);
    let has = |want: &str| assert_line(&stderr, want);
    has("-> ShutDown (the calls not answered did not run)");
    has("<- ShutDown (0 bytes, 0 fds)");
    has("-- Ended: peer shut down before it ran the call");
}
