//! Tracing never waits for stderr while holding what another thread needs (the connection's
//! lock, the reader's role, a reply for another caller): callers that hold stderr's lock.

use std::os::fd::{AsFd, AsRawFd};

use typed_ipc::worker::Worker;

use crate::common::child;
use crate::{
    Impl, LAB_INFO, LabClient, LabServer, assert_ended_once_each, assert_line, one_fd,
    traced_stderr, two_files,
};
#[cfg(feature = "tokio")]
use crate::{async_call_holding_stderr, async_connection, asynchronous, common};

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
    let stderr = traced_stderr("stderr_lock::child_announced_while_its_caller_holds_stderr");
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
    let stderr = traced_stderr("stderr_lock::child_refused_a_call_while_its_caller_holds_stderr");
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
/// says each once the role is given back and the connection's lock let go. The failure is
/// said with what it says (the runtime's own type reads back, unlike a reply's body).
#[test]
fn a_failure_a_refused_oneway_and_the_end_are_said_after_the_role_is_given_back() {
    let stderr =
        traced_stderr("stderr_lock::child_failed_and_hung_up_on_while_its_caller_holds_stderr");
    assert_line(&stderr, "<- Failure #2 (8 bytes, 0 fds): UnknownCommand(7)");
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
    let stderr = traced_stderr("stderr_lock::child_called_back_while_its_caller_holds_stderr");
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
    let stderr = traced_stderr("stderr_lock::child_answered_while_its_caller_holds_stderr");
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
    let stderr = traced_stderr("stderr_lock::child_answered_while_its_async_caller_holds_stderr");
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
    let stderr = traced_stderr(
        "stderr_lock::child_async_called_back_on_one_worker_while_its_caller_holds_stderr",
    );
    assert_line(&stderr, r#"-> Reply #99 "zy""#);
}

/// The same for a failure, which the task said before it sent it: the peer waited for it
/// however many workers the runtime has.
#[cfg(feature = "tokio")]
#[test]
fn an_async_failure_goes_out_without_waiting_for_stderr() {
    let stderr =
        traced_stderr("stderr_lock::child_async_called_back_in_vain_while_its_caller_holds_stderr");
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
    let stderr = traced_stderr("stderr_lock::child_dropped_traced");
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
    let stderr =
        traced_stderr("stderr_lock::child_announced_to_a_sender_while_a_caller_holds_stderr");
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
    let stderr = traced_stderr(
        "stderr_lock::child_answered_after_a_oneway_while_its_async_caller_holds_stderr",
    );
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
    let stderr = traced_stderr("stderr_lock::child_served_async_while_holding_stderr");
    assert_line(&stderr, "-- Ended: peer disconnected");
    assert_ended_once_each(&stderr);
}
