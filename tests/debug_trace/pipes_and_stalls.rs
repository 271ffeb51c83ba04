//! A connection's trust in pipes announced (pages lent), a traced worker whose stderr is full,
//! and an async reply cut off part-way.

use std::process::Stdio;

use typed_ipc::worker::Worker;

use crate::common::child;
use crate::{Impl, LabClient, LabServer, traced_stderr};
#[cfg(feature = "tokio")]
use crate::{assert_line, asynchronous, common, pending_after_one_poll};

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
    check_lent_pages("pipes_and_stalls::child_lent_pages");
}

/// The same, async.
#[cfg(feature = "tokio")]
#[test]
fn an_async_connection_says_it_announces_its_trust_in_pipes() {
    check_lent_pages("pipes_and_stalls::child_lent_pages_async");
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
    let stderr = traced_stderr("pipes_and_stalls::child_traced_worker_with_a_full_stderr");
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
    let stderr = traced_stderr("pipes_and_stalls::child_unsent_after_a_reply_cut_off_async");
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
