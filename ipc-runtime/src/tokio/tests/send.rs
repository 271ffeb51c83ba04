//! Sending: the non-blocking send and its cursor, sends that wait for room or for the
//! send lock, and the notices that must not go out inside a message.

use super::*;

fn wait_writable(socket: &Socket) {
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
    poll(&mut fds, PollTimeout::NONE).unwrap();
}

/// Sends a message too big for the socket buffer a piece at a time while the peer receives
/// it with a blocking `recv`; halfway, the sender swaps its borrowed fds for copies of the
/// ones not sent yet, as a cancelled async send does.
#[test]
fn a_message_goes_out_in_pieces_and_resumes_with_copies_of_the_unsent_fds() {
    let (a, b) = Socket::pair().unwrap();
    let payload: Vec<u8> = (0..24u32 << 20).map(|i| (i % 253) as u8).collect();
    let files: Vec<OwnedFd> = (0..700).map(memfd).collect();

    let mut cursor = SendCursor::new(payload.len(), files.len()).unwrap();
    assert!(!cursor.in_progress());
    let borrowed: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
    // Until the socket buffer is full. Nobody receives yet: a receiver draining meanwhile
    // could take the whole message before the sender ever has to stop.
    let sent_whole = a.send_some(&mut cursor, &payload, &borrowed).unwrap();
    assert!(!sent_whole, "24 MiB do not fit a socket buffer");
    assert!(cursor.in_progress() && cursor.fds_sent() > 0);
    let receiver = std::thread::spawn(move || b.recv().unwrap());
    // Copies of the fds still to go; the originals may now be closed.
    let unsent: Vec<OwnedFd> = files[cursor.fds_sent()..]
        .iter()
        .map(|f| f.try_clone().unwrap())
        .collect();
    drop(borrowed);
    drop(files);
    cursor.forget_sent_fds();
    let unsent_fds: Vec<BorrowedFd<'_>> = unsent.iter().map(|f| f.as_fd()).collect();
    while !a.send_some(&mut cursor, &payload, &unsent_fds).unwrap() {
        wait_writable(&a);
    }
    assert!(!cursor.in_progress());

    let frame = receiver.join().unwrap();
    assert!(frame.payload == payload, "the payload arrived intact");
    let indices: Vec<u32> = frame.fds.into_iter().map(index_of).collect();
    assert_eq!(
        indices,
        (0..700).collect::<Vec<u32>>(),
        "every fd, in order"
    );
}

#[test]
fn a_small_message_is_one_datagram_and_never_in_progress() {
    let (a, b) = Socket::pair().unwrap();
    let fd = memfd(7);
    let mut cursor = SendCursor::new(5, 1).unwrap();
    assert!(a.send_some(&mut cursor, b"hello", &[fd.as_fd()]).unwrap());
    assert!(!cursor.in_progress());
    let frame = b.recv().unwrap();
    assert_eq!(frame.payload, b"hello");
    assert_eq!(index_of(frame.fds.into_iter().next().unwrap()), 7);
}

/// A small message normally goes out at once from the sending thread's buffer; one that finds
/// the socket full takes its bytes along and waits, and the messages after it wait behind it
/// (even once there is room), in order, with their bytes intact.
#[test]
fn a_send_that_must_wait_keeps_its_bytes_and_the_messages_behind_it_in_order() {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use crate::codec::Bytes;
    use crate::connection::tests::BULK;

    let (runtime, client, theirs) = undriven_connection();
    // 512 bytes each (under the lane's 1 KiB), numbered.
    let bytes = |i: u32| i.to_le_bytes().repeat(128);
    let message = |i: u32| client.oneway(&BULK, 1, Bytes(bytes(i)), None);
    let mut cx = Context::from_waker(Waker::noop());
    // The peer reads nothing yet: send until its queue is full.
    let mut sent = 0u32;
    let mut waiting = loop {
        let mut send = Box::pin(message(sent));
        match send.as_mut().poll(&mut cx) {
            Poll::Ready(result) => result.unwrap(),
            Poll::Pending => break send,
        }
        sent += 1;
        assert!(sent < 1 << 20, "the peer's queue never filled");
    };
    let body = |i: u32| {
        let frame = theirs.recv().unwrap();
        assert!(
            frame.payload.ends_with(&bytes(i)),
            "message {i} arrived intact"
        );
    };
    for i in 0..sent {
        body(i);
    }
    // There is room now, but the waiting message has not been polled since: the next one
    // must not overtake it.
    let mut behind = pin!(message(sent + 1));
    assert!(
        behind.as_mut().poll(&mut cx).is_pending(),
        "it went past the one waiting"
    );
    runtime.block_on(async {
        waiting.as_mut().await.unwrap();
        behind.await.unwrap();
        // The thread's buffer gave its bytes to the waiting message: the next one is whole too.
        message(sent + 2).await.unwrap();
    });
    for i in sent..sent + 3 {
        body(i);
    }
}

/// A current-thread runtime, and an async connection on `ours` that has learnt from `peer`
/// (a message it sent) that the peer reads lanes.
fn client_of_a_lane_reader(
    ours: Socket,
    peer: &crate::Connection,
) -> (::tokio::runtime::Runtime, super::AsyncConnection) {
    let runtime = current_thread_runtime();
    let client = runtime.block_on(async {
        let client = super::AsyncConnection::new(ours).unwrap();
        peer.oneway(&crate::connection::tests::BULK, 2, &(), None)
            .unwrap();
        while !client.test_lane().peer_reads() {
            ::tokio::task::yield_now().await;
        }
        client
    });
    (runtime, client)
}

/// A send that has placed a byte string and then waits for the send lock (another message is
/// waiting for room with it) gives its placement back when it is cancelled there; otherwise
/// the lane stays busy, and every later byte string goes through the socket.
#[test]
fn a_send_cancelled_while_it_waits_for_the_send_lock_gives_its_placement_back() {
    use std::future::Future;
    use std::task::{Context, Waker};

    use crate::Connection;
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;

    let (ours, theirs) = Socket::pair().unwrap();
    let peer = Connection::new(theirs);
    let (_runtime, client) = client_of_a_lane_reader(ours, &peer);
    let mut cx = Context::from_waker(Waker::noop());
    // The peer reads nothing: send small messages until one waits for room, holding the
    // send lock.
    let mut sent = 0u32;
    let _waiting = loop {
        let mut send = Box::pin(client.oneway(&BULK, 1, Bytes(vec![0u8; 512]), None));
        if send.as_mut().poll(&mut cx).is_pending() {
            break send;
        }
        sent += 1;
        assert!(sent < 1 << 20, "the peer's queue never filled");
    };
    // A byte string the lane takes: placed while encoding, then the send waits for the lock.
    let mut placed = Box::pin(client.oneway(&BULK, 1, Bytes(vec![1u8; 4096]), None));
    assert!(placed.as_mut().poll(&mut cx).is_pending());
    assert!(client.test_lane().is_busy(), "the string was placed");
    drop(placed);
    assert!(
        !client.test_lane().is_busy(),
        "the cancelled send gave its placement back"
    );
}

/// An async oneway to a peer that has stopped reading fails with `TimedOut` once its timeout
/// has passed, having sent nothing: the byte string it had placed in the lane goes back to it,
/// and the next message follows the last one that was sent.
#[test]
fn an_async_oneway_that_cannot_be_sent_in_time_times_out_and_gives_its_placement_back() {
    use std::time::Duration;

    use crate::Connection;
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;
    use crate::error::Error;

    let (ours, theirs) = Socket::pair().unwrap();
    let peer = Connection::new(theirs);
    let (runtime, client) = client_of_a_lane_reader(ours, &peer);
    // 512 bytes each (under the lane's 1 KiB), numbered.
    let bytes = |i: u32| i.to_le_bytes().repeat(128);
    let soon = Some(Duration::from_millis(50));
    let sent = runtime.block_on(async {
        // The peer reads nothing: send until a message cannot go out in time.
        let mut sent = 0u32;
        loop {
            match client.oneway(&BULK, 1, Bytes(bytes(sent)), soon).await {
                Ok(()) => sent += 1,
                Err(Error::TimedOut) => break,
                Err(e) => panic!("message {sent}: {e}"),
            }
            assert!(sent < 1 << 20, "the peer's queue never filled");
        }
        // A byte string the lane takes: placed while encoding, then the send times out.
        let late = client.oneway(&BULK, 1, Bytes(vec![1u8; 4096]), soon).await;
        assert!(matches!(late, Err(Error::TimedOut)), "{late:?}");
        assert!(
            !client.test_lane().is_busy(),
            "the timed-out send gave its placement back"
        );
        sent
    });
    let body = |i: u32| {
        let frame = peer.socket().recv().unwrap();
        assert!(
            frame.payload.ends_with(&bytes(i)),
            "message {i} arrived intact, in order"
        );
    };
    for i in 0..sent {
        body(i);
    }
    runtime.block_on(async {
        client
            .oneway(&BULK, 1, Bytes(bytes(sent)), None)
            .await
            .unwrap()
    });
    body(sent);
}

/// A send waiting for room in the socket of a peer that then shuts its reading side
/// (`shutdown(SHUT_RD)`) fails with `Disconnected`, as in the blocking flavour: no send can
/// ever go out to it again, though the socket never reads as writable nor hung up. Before,
/// the send waited until the peer read or hung up: for good, without a timeout. On a runtime
/// without the time driver, which the connection must not need for it; a oneway and a call.
#[test]
fn a_send_waiting_for_room_fails_once_the_peer_shuts_its_reading_side() {
    use std::future::{Future, poll_fn};
    use std::pin::pin;
    use std::sync::mpsc;
    use std::task::Poll;
    use std::time::{Duration, Instant};

    use crate::connection::tests::BULK;
    use crate::error::Error;
    for call in [false, true] {
        let (done, sent) = mpsc::channel();
        // On a thread of its own, so that a send that never ends fails the test instead.
        std::thread::spawn(move || {
            let (ours, theirs) = Socket::pair().unwrap();
            let runtime = ::tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .unwrap();
            runtime.block_on(async {
                let conn = super::AsyncConnection::new(ours).unwrap();
                // 32 MiB do not fit a socket buffer: the send waits for room, having sent
                // some.
                let big = "x".repeat(32 << 20);
                let mut send = pin!(async {
                    match call {
                        false => conn.oneway(&BULK, 1, big, None).await,
                        true => conn.call::<_, u32>(&BULK, 1, big, None).await.map(drop),
                    }
                });
                // Polled once by hand: it tries until the socket is full, then waits for it
                // to be writable (the peer's shutdown comes after its last try).
                poll_fn(|cx| match send.as_mut().poll(cx) {
                    Poll::Ready(sent) => panic!("not sent at once: {sent:?}"),
                    Poll::Pending => Poll::Ready(()),
                })
                .await;
                let later = Instant::now() + Duration::from_secs(3600);
                assert!(conn.socket().send_stalled_for(later).is_some());
                theirs.shutdown_read().unwrap();
                let _ = done.send(send.await);
            });
        });
        let sent = sent.recv_timeout(Duration::from_secs(60));
        assert!(
            matches!(sent, Ok(Err(Error::Disconnected))),
            "call {call}: {sent:?}"
        );
    }
}

/// A send of a message of several datagrams dropped before its first datagram went out (the
/// socket full: a timeout, a `select!`) must not leave the socket thinking a message is
/// part-way out: a peer of another wire version that speaks next is told this side's
/// version, as it would be had the send never started. Before, the notice was owed to a
/// message that would never end, and the peer saw a bare hang-up.
#[test]
fn a_send_of_several_datagrams_dropped_unstarted_does_not_hold_back_the_version_notice() {
    use std::future::Future;
    use std::task::{Context, Waker};

    use crate::connection::tests::BULK;

    let (runtime, conn, theirs) = undriven_connection();
    let unread = fill_with_oneways(&conn);
    let mut cx = Context::from_waker(Waker::noop());
    // A message of several datagrams waits for room for its first, and is dropped there.
    let big = vec![7u8; 1 << 20];
    let mut send = Box::pin(conn.oneway(&BULK, 1, big, None));
    assert!(send.as_mut().poll(&mut cx).is_pending());
    drop(send);
    for _ in 0..unread {
        theirs.recv().unwrap();
    }
    // The peer speaks another wire version.
    crate::connection::tests::say_another_version(&theirs);
    runtime.block_on(async {
        while !conn.is_closed() {
            ::tokio::task::yield_now().await;
        }
    });
    crate::connection::tests::assert_told_version(theirs.recv());
}

/// `shut_down` while a message of this end's is part-way out (a large oneway that waits for
/// room, holding the send lock between its pieces) and the peer has just made room: the
/// notice must not go out between two pieces of that message, which the peer would read as
/// a protocol error (a whole message inside another) rather than as the notice. The async
/// flavour sends a message's pieces under its own send lock, not the socket's, which the
/// notice once took alone.
#[test]
fn a_shut_down_notice_never_goes_out_between_the_pieces_of_a_message() {
    use std::future::Future;
    use std::task::{Context, Waker};

    use std::os::fd::AsRawFd;

    use nix::sys::socket::{MsgFlags, recv};

    use crate::codec::Bytes;
    use crate::connection::envelope::{FRAMED_AT, Kind, LEN};
    use crate::connection::tests::BULK;

    let (runtime, server, peer) = undriven_connection();
    server.add_service(AsyncCallsBack {
        back: server.clone(),
    });
    let mut cx = Context::from_waker(Waker::noop());
    // Far more than a socket buffer holds: it stops part-way, the send lock held.
    let mut large = Box::pin(server.oneway(&BULK, 1, Bytes(vec![5u8; 8 << 20]), None));
    assert!(
        large.as_mut().poll(&mut cx).is_pending(),
        "8 MiB went out at once"
    );
    // The peer reads the pieces sent so far: there is room again, but the send has not been
    // polled since.
    let mut datagram = vec![0u8; 1 << 20];
    let read = |datagram: &mut [u8]| {
        recv(peer.as_fd().as_raw_fd(), datagram, MsgFlags::MSG_DONTWAIT).unwrap_or(0)
    };
    assert!(read(&mut datagram) > 0, "nothing of the message went out");
    while read(&mut datagram) > 0 {}
    server.shut_down();
    let notice =
        |piece: &[u8]| piece.len() == FRAMED_AT + LEN && piece[FRAMED_AT] == Kind::ShutDown as u8;
    let mut pieces = 0;
    loop {
        match read(&mut datagram) {
            0 => break, // the end, or nothing more for now
            n => {
                assert!(
                    !notice(&datagram[..n]),
                    "the notice went out after {pieces} more pieces, in the middle of a message"
                );
                pieces += 1;
            }
        }
    }
    drop(large);
    drop(server);
    drop(runtime);
}
