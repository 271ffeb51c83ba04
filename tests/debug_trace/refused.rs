//! Messages refused, over limits, unsent, timed out, dropped or cut off part-way: what the
//! trace says of each, in both flavours.

use typed_ipc::worker::Worker;

use crate::common::child;
use crate::{Impl, LabClient, LabServer, assert_line, traced_stderr, two_files};
#[cfg(feature = "tokio")]
use crate::{asynchronous, common, pending_after_one_poll};

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
    check_refused("refused::child_refused_traced");
}

/// The same from the async flavour's client and server.
#[cfg(feature = "tokio")]
#[test]
fn a_refused_request_is_printed_as_received_async() {
    check_refused("refused::child_refused_traced_async");
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
    let stderr = traced_stderr("refused::child_turned_away_traced");
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
    check_reply_over_limits("refused::child_reply_over_limits_traced");
}

/// The same from the async flavour's client and server.
#[cfg(feature = "tokio")]
#[test]
fn a_reply_over_this_sides_limits_is_printed_with_why_async() {
    check_reply_over_limits("refused::child_reply_over_limits_traced_async");
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
    check_unsent("refused::child_oneway_unsent");
}

/// The same from the async flavour.
#[cfg(feature = "tokio")]
#[test]
fn a_oneway_that_could_not_be_sent_is_not_printed_async() {
    check_unsent("refused::child_oneway_unsent_async");
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
    check_gave_up("refused::child_call_timed_out", "timed out");
}

/// The same from the async flavour.
#[cfg(feature = "tokio")]
#[test]
fn a_call_that_timed_out_is_said_to_have_given_up_async() {
    check_gave_up("refused::child_call_timed_out_async", "timed out");
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
    check_gave_up(
        "refused::child_call_dropped_async",
        "its future was dropped",
    );
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
    let stderr = traced_stderr("refused::child_call_cut_off_async");
    let sent = stderr.lines().any(|l| l.contains("-> Call #1 Lab::echo("));
    assert!(
        sent,
        "the call the peer received is not printed as sent:\n{stderr}"
    );
    // Cut off by a timeout of its caller's, not the connection's: its future was dropped.
    check_gave_up(
        "refused::child_call_cut_off_async",
        "its future was dropped",
    );
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
