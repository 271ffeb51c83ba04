//! The queue's bounds and a peer gone: sends waiting for room or at the bounds, and what a
//! peer that hung up or shut its reading side still has read.

use super::*;

/// `b` serving `Ordered` on one thread, which `hold`, sent by `peer` by hand as a oneway (no
/// reply to send when it ends), keeps busy until the returned gate is opened. Returns the
/// gate, the receiver of the `hold`s' starts (keep it: a `hold` that finds it gone panics),
/// and the serving thread.
#[allow(clippy::type_complexity)]
fn serving_a_held_oneway(
    b: &Connection,
    peer: &crate::socket::Socket,
) -> (
    mpsc::Sender<()>,
    mpsc::Receiver<()>,
    std::thread::JoinHandle<Result<()>>,
) {
    let (started, has_started) = mpsc::channel();
    let (open, gate) = mpsc::channel();
    let runner = {
        let b = b.clone();
        std::thread::spawn(move || {
            b.serve(Ordered {
                started,
                gate: Mutex::new(gate),
                run: Default::default(),
            })
        })
    };
    peer.send(&ordered_request(Kind::Oneway, 1, 0, 0), &[])
        .unwrap();
    has_started.recv().unwrap();
    (open, has_started, runner)
}

/// A thread waiting for room to send stops reading at the bounds of the request queue, as a
/// serving thread does, and must read again once requests leave the queue, as a serving
/// thread does. Here the peer's oneways fill the queue, with a call last, and its further
/// requests fill the socket buffer: the peer reads only once its last request is through.
/// The only serving thread runs the oneways, then the call, whose reply waits for the
/// sender's message to go out: only the sender can read. It used to wait for room alone, and
/// nothing woke it when the queue drained: both ends waited for good.
#[test]
fn a_thread_waiting_to_send_reads_again_once_requests_leave_the_full_queue() {
    use super::backlog::{MAX_REQUEST_BYTES, MAX_REQUESTS};
    use crate::wire::HEADER_LEN;

    // (Only keeps a regression from hanging.)
    const GUARD: Duration = Duration::from_secs(20);
    let (a, b) = Connection::pair().unwrap();
    let peer = a.socket();
    let (open, _started, runner) = serving_a_held_oneway(&b, peer);
    let filler = {
        let b = b.clone();
        std::thread::spawn(move || b.oneway(&IFACE, 1, &"x".repeat(32 << 20), None))
    };
    wait_until("the filler waits for room", || !writable(&b));
    // The filler reads the peer's requests meanwhile, and queues them up to the bounds.
    for seq in 1..MAX_REQUESTS as u64 {
        peer.send(&ordered_request(Kind::Oneway, 3, 0, seq), &[])
            .unwrap();
    }
    peer.send(&ordered_request(Kind::Call, 2, 2, 0), &[])
        .unwrap();
    wait_until("the filler stops reading at the bounds", || {
        b.shared.state.lock().backlog.full()
    });
    // More oneways (`hold`s of 60 KiB, which it does not decode: far fewer than the bounds
    // fill the socket buffer), until the peer's next send would wait; that last one waits.
    let mut hold = ordered_request(Kind::Oneway, 1, 0, 0);
    hold.resize(60 << 10, 0);
    let mut framed = vec![0; HEADER_LEN];
    framed.extend_from_slice(&hold);
    let mut holds = 1;
    while peer.try_send_framed(&mut framed, &[], |_| ()).unwrap() {
        holds += 1;
    }
    assert!(
        holds < MAX_REQUESTS / 2 && holds * (60 << 10) < MAX_REQUEST_BYTES / 2,
        "the socket buffer holds as much as the queue ({holds} of 60 KiB)"
    );
    let (done, last_sent) = mpsc::channel();
    let last = {
        let a = a.clone();
        std::thread::spawn(move || done.send(a.socket().send(&hold, &[])).unwrap())
    };
    // `hold` ends (and so will the others): the serving thread runs the queued oneways,
    // then the call.
    for _ in 0..=holds {
        open.send(()).unwrap();
    }
    let last_sent = last_sent.recv_timeout(GUARD);
    assert!(
        matches!(last_sent, Ok(Ok(()))),
        "nobody read the peer's requests once the queue had room: {last_sent:?}"
    );
    last.join().unwrap();
    // The peer reads now: the filler's message first.
    let oneway = peer.recv().unwrap();
    assert_eq!(Envelope::read(&oneway.payload).unwrap().cmd, 1);
    filler.join().unwrap().unwrap();
    b.close();
    runner.join().unwrap().unwrap();
}

/// A send with a timeout that waits, at the bounds of the request queue, for room or for a
/// request to leave the queue still gives up by its deadline: here nothing leaves the queue
/// (its only serving thread is held) and the peer reads nothing.
#[test]
fn a_send_waiting_at_the_bounds_of_the_queue_times_out() {
    let (a, b) = Connection::pair().unwrap();
    let peer = a.socket();
    let (open, _started, runner) = serving_a_held_oneway(&b, peer);
    fill_the_queue_through_a_call(&b, peer, Kind::Oneway);
    let timeout = Some(Duration::from_millis(50));
    let sent = b.oneway(&IFACE, 1, &"x".repeat(32 << 20), timeout);
    assert!(matches!(sent, Err(Error::TimedOut)), "{sent:?}");
    open.send(()).unwrap();
    b.close();
    runner.join().unwrap().unwrap();
}

/// A send that finds the peer gone while another thread holds the reader role: the peer
/// said something first (here that it speaks another wire version, as a peer of another
/// release says on the first message it reads, and hangs up), which that reader is about to
/// read. The sender waits until it has, and reports what the peer said rather than a bare
/// `Disconnected` (which it did, and a thread that only sends oneways never learnt more).
#[test]
fn a_send_to_a_peer_gone_waits_for_the_reader_to_read_why() {
    let (ours, theirs) = crate::Socket::pair().unwrap();
    let a = Connection::new(ours);
    let (held, runner) = run_held_up(&a);
    say_another_version_and_hang_up(theirs);
    let sender = {
        let a = a.clone();
        std::thread::spawn(move || a.oneway(&IFACE, 1, &"x", None))
    };
    wait_until("the sender waits for the reader", || {
        a.shared.state.lock().waiters == 1
    });
    drop(held);
    match sender.join().unwrap() {
        Err(Error::VersionMismatch { theirs, .. }) => assert_eq!(theirs, OTHER_VERSION),
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
    assert!(matches!(
        runner.join().unwrap(),
        Err(Error::VersionMismatch { .. })
    ));
}

/// A send that finds the peer gone does not read past the bounds of the request queue to
/// learn why, as a serving thread or a thread waiting for room would not: the requests
/// there wait for a serving thread that comes later, which may still run them, and the peer
/// (which stopped reading, as `Connection::stop_reading` does, but may still send oneways)
/// broke no rule. Here nothing serves yet: reading one request more ended the connection
/// with `Malformed` (nothing serves them), dropped the requests held, and reported that
/// instead of `Disconnected`.
#[test]
fn a_send_to_a_peer_gone_reads_nothing_past_the_bounds_of_the_queue() {
    use super::backlog::MAX_REQUESTS;

    let (a, b) = Connection::pair().unwrap();
    let peer = a.socket();
    fill_the_queue_through_a_call(&b, peer, Kind::Oneway);
    // One more, which nobody reads, and the peer reads no more: `b`'s sends fail (`EPIPE`).
    peer.send(&ordered_request(Kind::Oneway, 3, 0, 0), &[])
        .unwrap();
    peer.shutdown_read().unwrap();
    let sent = b.oneway(&IFACE, 1, &"x", None);
    assert!(matches!(sent, Err(Error::Disconnected)), "{sent:?}");
    let state = b.shared.state.lock();
    assert!(state.closed.is_none(), "ended: {:?}", state.closed);
    assert_eq!(state.oneways.len(), MAX_REQUESTS);
}

/// A send with a timeout that finds the peer gone while another thread holds the reader
/// role waits for that reader to read why only until its deadline. Here the reader, with
/// tracing on, names a call it cannot receive for its line before it answers it and lets
/// the role go, which waits for the registry's lock, held here (a reader may hold the role
/// as long for the rest of a message, or for the peer to take a failure): the sender waited
/// for good, past its timeout.
#[test]
fn a_send_to_a_peer_gone_waits_for_the_reader_only_until_its_deadline() {
    let (mut a, b) = limited_pair(crate::frame::Limits {
        max_message_len: 1 << 20,
        max_fds: 4,
        ..Default::default()
    });
    std::sync::Arc::get_mut(&mut a.shared).unwrap().trace = true;
    // The caller finds nobody reading: it reads.
    let reader = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u32>(&IFACE, 1, &(), None))
    };
    let _to_reader = b.socket().recv().unwrap();
    let held = reader_holding_a_refused_call(&a, &b);
    drop(b);
    let (done, sent) = mpsc::channel();
    let sender = {
        let a = a.clone();
        std::thread::spawn(move || {
            let sent = a.oneway(&IFACE, 3, &"x", Some(Duration::from_millis(100)));
            done.send(sent).unwrap();
        })
    };
    let sent = sent.recv_timeout(Duration::from_secs(60));
    drop(held);
    let sent = sent.expect("the sender waited past its deadline");
    assert!(matches!(sent, Err(Error::Disconnected)), "{sent:?}");
    sender.join().unwrap();
    assert!(matches!(reader.join().unwrap(), Err(Error::Disconnected)));
}

/// [`a_send_to_a_peer_gone_waits_for_the_reader_to_read_why`], with a message of this end's
/// that the peer never read when it hung up (this end sent two before the peer read the
/// first, say): the kernel then fails this end's next receive with `ECONNRESET`, once, before
/// the datagrams still queued, the peer's header among them. That receive ended the
/// connection as a bare `Disconnected`, unread: the serving thread returned `Ok`, and a
/// sender that found the peer gone reported `Disconnected` too, although the peer had said
/// why. (It reads first here: it waited for its receive lock as the peer said its version
/// and went.)
#[test]
fn a_reader_whose_peer_hung_up_on_a_message_unread_still_reads_what_it_said() {
    let (ours, theirs) = crate::Socket::pair().unwrap();
    let a = Connection::new(ours);
    // Sent while the peer is there; it never reads it.
    a.oneway(&IFACE, 1, &"x", None).unwrap();
    let (held, runner) = run_held_up(&a);
    say_another_version_and_hang_up(theirs);
    drop(held);
    let ran = runner.join().unwrap();
    assert!(matches!(ran, Err(Error::VersionMismatch { .. })), "{ran:?}");
    match a.oneway(&IFACE, 1, &"x", None) {
        Err(Error::VersionMismatch { theirs, .. }) => assert_eq!(theirs, OTHER_VERSION),
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
}

/// A peer that answers a call and hangs up with a later message of this end's unread (a
/// worker that replies and exits, say): the kernel fails the caller's next receive with
/// `ECONNRESET` once, and sets `POLLERR` and `POLLHUP`, while the reply is still queued. The
/// caller gets its reply, not `Disconnected`. (It receives only once the peer is gone: its
/// receive waits for the lock held here.)
#[test]
fn a_caller_whose_peer_answered_and_hung_up_on_a_message_unread_gets_the_reply() {
    let (ours, theirs) = crate::Socket::pair().unwrap();
    let a = Connection::new(ours);
    let held = a.hold_receive();
    let caller = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u32>(&IFACE, 1, &(), None))
    };
    let call = theirs.recv().unwrap();
    // Sent after the call; the peer never reads it.
    a.oneway(&IFACE, 1, &"x", None).unwrap();
    theirs.send(&reply_to(&call, &7u32), &[]).unwrap();
    drop(theirs);
    drop(held);
    assert_eq!(caller.join().unwrap().unwrap(), 7);
}

/// A send waiting for room in the socket of a peer that then shuts its reading side
/// (`shutdown(SHUT_RD)`) fails with `Disconnected`: no send can ever go out to it again
/// (`EPIPE`), though poll says nothing of it (neither room nor a hang-up). Before, the send
/// waited until the peer read or hung up: for good, without a timeout. A oneway and a call,
/// neither with a timeout.
#[test]
fn a_send_waiting_for_room_fails_once_the_peer_shuts_its_reading_side() {
    for call in [false, true] {
        let (ours, theirs) = crate::Socket::pair().unwrap();
        let a = Connection::new(ours);
        // 32 MiB do not fit a socket buffer: the send waits for room, having sent some.
        let big = "x".repeat(32 << 20);
        let (done, sent) = mpsc::channel();
        let sender = {
            let a = a.clone();
            std::thread::spawn(move || {
                let sent = match call {
                    false => a.oneway(&IFACE, 1, &big, None),
                    true => a.call::<_, u32>(&IFACE, 1, &big, None).map(drop),
                };
                let _ = done.send(sent);
            })
        };
        let later = Instant::now() + Duration::from_secs(3600);
        wait_until("the send waits for room", || {
            a.socket().send_stalled_for(later).is_some()
        });
        theirs.shutdown_read().unwrap();
        let sent = sent.recv_timeout(Duration::from_secs(60));
        assert!(
            matches!(sent, Ok(Err(Error::Disconnected))),
            "call {call}: {sent:?}"
        );
        sender.join().unwrap();
        drop(theirs);
    }
}

/// A send that fails part-way because the peer shut its reading side leaves this end able to
/// read: a call sent before gets the reply the peer sends after (as a server shutting down
/// gracefully answers the calls it has). Nothing can follow the fragment the peer holds, so
/// the socket need not be shut down for it.
#[test]
fn a_send_cut_short_by_the_peer_shutting_its_reading_side_leaves_replies_to_come() {
    let (ours, theirs) = crate::Socket::pair().unwrap();
    let a = Connection::new(ours);
    let caller = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u64>(&IFACE, 2, &(), None))
    };
    let call = theirs.recv().unwrap();
    let sender = {
        let a = a.clone();
        std::thread::spawn(move || a.oneway(&IFACE, 1, &"x".repeat(32 << 20), None))
    };
    let later = Instant::now() + Duration::from_secs(3600);
    wait_until("the send waits for room", || {
        a.socket().send_stalled_for(later).is_some()
    });
    theirs.shutdown_read().unwrap();
    let sent = sender.join().unwrap();
    assert!(matches!(sent, Err(Error::Disconnected)), "{sent:?}");
    theirs.send(&reply_to(&call, &42u64), &[]).unwrap();
    assert_eq!(caller.join().unwrap().unwrap(), 42);
}

/// A caller that waits for room at the bounds of the request queue (its serving thread busy)
/// still hears at once that the peer hung up: nobody else reads the socket then. It waited
/// until a handler finished, here for good (the handler waits for the caller's outcome).
#[test]
fn a_caller_waiting_for_room_gets_disconnected_once_the_peer_hangs_up() {
    // (Only keeps a regression from hanging.)
    const GUARD: Duration = Duration::from_secs(20);
    let (ours, theirs) = crate::Socket::pair().unwrap();
    let b = Connection::new(ours);
    let (open, _started, runner) = serving_a_held_oneway(&b, &theirs);
    fill_the_queue_through_a_call(&b, &theirs, Kind::Oneway);
    let (done, outcome) = mpsc::channel();
    let caller = {
        let b = b.clone();
        std::thread::spawn(move || done.send(b.call::<_, u32>(&IFACE, 9, &(), None)).unwrap())
    };
    next_call(&theirs);
    // The caller read for its reply (it found nobody reading): one request more, which it
    // takes in past the bounds, and then it waits for room.
    theirs
        .send(&ordered_request(Kind::Oneway, 3, 0, 0), &[])
        .unwrap();
    wait_until("the caller waits for room", || {
        b.shared.state.lock().waiters > 0
    });
    drop(theirs);
    let outcome = outcome.recv_timeout(GUARD);
    assert!(
        matches!(outcome, Ok(Err(Error::Disconnected))),
        "the caller did not hear that the peer hung up: {outcome:?}"
    );
    caller.join().unwrap();
    open.send(()).unwrap();
    runner.join().unwrap().unwrap();
}
