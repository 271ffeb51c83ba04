//! Ending a connection: `stop_reading` and its drain, `close`, and a peer that hangs up: what
//! still runs, what is dropped with its fds closed, and threads parked on it failing.

use super::*;

/// A connection whose peer has gone says so before any thread reads the hang-up, so that a
/// host polling `is_closed` is not told that a dead worker lives (an audit found `false`
/// here until a thread read, where the async flavour's reader had read already).
#[test]
fn a_connection_whose_peer_is_gone_is_closed_before_anything_reads() {
    let (a, b) = Connection::pair().unwrap();
    assert!(!a.is_closed());
    drop(b);
    assert!(a.is_closed());
}

/// This end's own `stop_reading` shuts only its read side, which the kernel does not count
/// as a hang-up: the connection has not ended (it still sends) until a thread reads that far.
#[test]
fn stop_reading_alone_is_not_closed_until_read() {
    let (a, _b) = Connection::pair().unwrap();
    a.stop_reading();
    assert!(!a.is_closed());
    a.run().unwrap();
    assert!(a.is_closed());
}

/// After `stop_reading` (graceful shutdown) the connection still sends: a handler finishing
/// up may send a oneway, and it goes out although no call can be made any more. (A review
/// caught the early check of an ended connection refusing it.)
#[test]
fn a_oneway_goes_out_after_stop_reading() {
    let (a, b) = Connection::pair().unwrap();
    a.stop_reading();
    a.run().unwrap(); // reads the end of its read side
    assert!(a.is_closed());
    a.oneway(&IFACE, 1, &7u32, None).unwrap();
    let oneway = b.socket().recv().unwrap();
    let envelope = Envelope::read(&oneway.payload).unwrap();
    assert_eq!((envelope.kind, envelope.cmd), (Kind::Oneway, 1));
}

/// `stop_reading` on a connection that nothing serves, with a request of the peer's held for
/// a serving thread to come: nothing will run it, so nothing is waited for, and the read side
/// shuts at once: a call made then reads the end. (Draining for the replies of requests in
/// flight must not wait for requests that never run.)
#[test]
fn stop_reading_with_a_request_held_for_nobody_ends_the_connection() {
    let (a, b) = Connection::pair().unwrap();
    // Held by `a`'s caller, which reads it before its own reply.
    b.socket()
        .send(&ordered_request(Kind::Call, 1, 7, 0), &[])
        .unwrap();
    let caller = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u64>(&IFACE, 2, &(), None))
    };
    let call = b.socket().recv().unwrap();
    wait_until("the peer's call is held", || {
        !a.shared.state.lock().calls.is_empty()
    });
    b.socket().send(&reply_to(&call, &42u64), &[]).unwrap();
    assert_eq!(caller.join().unwrap().unwrap(), 42);
    a.stop_reading();
    // Nobody answers this call: it ends only with the read side shut (a hang guard else).
    let after = a.call::<_, u64>(&IFACE, 2, &(), Some(Duration::from_secs(60)));
    assert!(matches!(after, Err(Error::Disconnected)), "{after:?}");
    assert!(a.is_closed());
}

/// While this end drains (`stop_reading` with a request running), a request of the peer's
/// read by the running handler's call back, the only thread reading, is dropped, not queued
/// to run once the handler is done; the call back still gets its reply, and the handler's
/// caller its answer, and the read side shuts after it.
#[test]
fn a_request_read_by_a_call_back_while_draining_is_dropped() {
    let (a, b) = Connection::pair().unwrap();
    let (served, serving) = mpsc::channel();
    {
        let (a, back) = (a.clone(), a.clone());
        std::thread::spawn(move || served.send(a.serve(CallsBack { back })));
    }
    let peer = b.socket();
    let request = calls_back_request(1);
    peer.send(&request, &[]).unwrap();
    let back = peer.recv().unwrap(); // the handler waits for its reply, reading
    a.stop_reading();
    // Read before the reply, by the handler's call back. Were it queued, it would run once
    // the handler is done, and be answered (with a failure: `Ordered` is not served here).
    peer.send(&ordered_request(Kind::Call, 1, 2, 0), &[])
        .unwrap();
    peer.send(&reply_to(&back, &21u64), &[]).unwrap();
    let answer = peer.recv().unwrap();
    let envelope = Envelope::read(&answer.payload).unwrap();
    assert_eq!((envelope.kind, envelope.cookie), (Kind::Reply, 1));
    let body = &answer.payload[envelope::LEN..];
    assert_eq!(
        codec::decode_from::<u64>(body, &mut Vec::new()).unwrap(),
        21
    );
    // A hang guard: the read side shuts once the handler is done, and serving ends.
    let served = serving.recv_timeout(Duration::from_secs(60));
    assert!(matches!(served, Ok(Ok(()))), "{served:?}");
    assert!(
        !readable(&b),
        "the request read while draining was answered"
    );
}

/// A caller saying that a call of the peer's is held for nobody lets the lock go to say it
/// (`Shared::warn_unserved`); another caller may read its reply meanwhile. It looks for it
/// again before it reads or sleeps: before, it read the socket, where nothing more came, and
/// waited for good with its reply in its slot.
#[test]
fn a_reply_read_while_the_unserved_warning_is_said_is_found() {
    let (a, b) = Connection::pair().unwrap();
    let first = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u64>(&IFACE, 2, &(), None))
    };
    let peer = b.socket();
    let back = peer.recv().unwrap();
    peer.send(&ordered_request(Kind::Call, 1, 2, 0), &[])
        .unwrap();
    wait_until("the peer's call is held for nobody", || {
        a.shared.state.lock().calls.len() == 1
    });
    // The warning names the call held, from the registry: it waits here with the lock let go.
    let registry = a.test_hold_registry();
    wait_until("the caller says the call is held", || {
        a.shared.state.lock().unserved_said
    });
    let second = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u64>(&IFACE, 2, &(), None))
    };
    let back_second = peer.recv().unwrap();
    peer.send(&reply_to(&back, &21u64), &[]).unwrap();
    peer.send(&reply_to(&back_second, &22u64), &[]).unwrap();
    assert_eq!(second.join().unwrap().unwrap(), 22);
    drop(registry);
    let (done, first_done) = mpsc::channel();
    std::thread::spawn(move || done.send(first.join().unwrap()).unwrap());
    let got = first_done.recv_timeout(Duration::from_secs(60));
    drop(b); // a caller still reading, its reply read by the other, sees the end
    assert!(matches!(got, Ok(Ok(21))), "{got:?}");
}

/// While this end drains with its serving threads still to come, a cancel of the last call
/// queued for them ends the drain as that call's running would have: the read side shuts,
/// this end's own call waiting for a reply fails (none can be read now), and the peer's sends
/// fail. Before, nothing looked again once the call was dropped, and the drain (a listener's
/// shutdown with it) waited for whatever the peer did next: the caller until its timeout.
/// (The peer never replies: a reply sent after the cancel raced with the read side's shutting,
/// and failed with `Disconnected` in about one run in ten.)
#[test]
fn a_cancel_of_the_last_queued_call_ends_a_drain() {
    let (a, b) = Connection::pair().unwrap();
    a.runners_coming();
    let caller = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u64>(&IFACE, 9, &(), Some(Duration::from_secs(60))))
    };
    let peer = b.socket();
    peer.recv().unwrap(); // the caller reads, waiting for its reply
    peer.send(&ordered_request(Kind::Call, 1, 2, 0), &[])
        .unwrap();
    wait_until("the peer's call is queued for the threads to come", || {
        a.shared.state.lock().calls.len() == 1
    });
    a.stop_reading();
    let mut cancel = vec![0u8; envelope::LEN];
    Envelope::cancel(2).write(&mut cancel);
    peer.send(&cancel, &[]).unwrap();
    let call = caller.join().unwrap();
    assert!(
        matches!(call, Err(Error::Disconnected)),
        "the drain goes on, the read side open: the caller got {call:?}"
    );
    let after = peer.send(&ordered_request(Kind::Call, 1, 3, 0), &[]);
    assert!(
        matches!(after, Err(Error::Disconnected)),
        "the drain goes on, the read side open: {after:?}"
    );
}

/// `stop_reading` on a connection with a serving thread and none of the peer's requests in
/// flight, and a call of the peer's still unread in the socket: that call is dropped as one
/// read while draining is, not run. Run, its handler's call back into the peer failed with
/// `Disconnected` (the read side shut at once, the peer's reply could not be sent), the peer
/// alive: the graceful shutdown's promise of answers to call backs, broken for it. (The
/// serving thread is held up on the registry's lock, before its first read, so that the call
/// stays in the socket.)
#[test]
fn stop_reading_drops_a_call_still_unread_on_a_served_connection() {
    let (a, b) = Connection::pair().unwrap();
    b.add_service(CallsBack { back: b.clone() });
    let registry = b.shared.registry.lock();
    let runner = {
        let b = b.clone();
        std::thread::spawn(move || b.run())
    };
    wait_until("the serving thread waits for the registry", || {
        b.shared.state.lock().runners == 1
    });
    let request = calls_back_request(1);
    a.socket().send(&request, &[]).unwrap();
    b.stop_reading();
    drop(registry);
    runner.join().unwrap().unwrap();
    assert!(
        !readable(&a),
        "the call ran after stop_reading: it called the peer back"
    );
}

/// A message that ends the connection (one without an envelope, or an announcement of the
/// wrong size) has the fds it carried closed then: the connection keeps the message's buffer,
/// but must not keep the peer's fds with it for as long as a handle on it lives, since it
/// reads no more (the next read is what would have cleared them).
#[test]
fn the_fds_of_a_message_that_ends_the_connection_are_closed() {
    let mut announcement = vec![0; envelope::LEN + 3];
    Envelope::announce().write(&mut announcement);
    for message in [vec![9; 4], announcement] {
        let (a, b) = Connection::pair().unwrap();
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        b.socket().send(&message, &[write_end.as_fd()]).unwrap();
        drop(write_end);
        let outcome = a.call::<_, u32>(&IFACE, 1, &(), None);
        assert!(
            matches!(outcome, Err(Error::Malformed(_))),
            "a call answered by {message:?}: {outcome:?}"
        );
        // Every copy of the pipe's write end is closed once the connection closed its own
        // (handed to the closer, which closes it on a thread of its own).
        crate::closer::wait_for_closes();
        assert_eq!(
            nix::unistd::read(&read_end, &mut [0; 1]),
            Ok(0),
            "the connection still holds the fd of {message:?}, which ended it"
        );
    }
}

/// A thread `spawn_serve` made counts as serving before it runs (here held up before it runs
/// the connection, as a loaded machine may leave it unstarted): a call made right after,
/// which meets more of the peer's oneways than this end holds before its reply, stops
/// reading at that bound and waits for the thread, as for a thread serving. Spawned by hand
/// and not started yet, nothing served: the call read on to the bound and ended the
/// connection ("while nothing serves them"). Every oneway runs, in order.
#[test]
fn a_thread_spawn_serve_made_serves_before_it_runs() {
    let (a, b) = Connection::pair().unwrap();
    let (start, held) = mpsc::channel::<()>();
    *crate::connection::BEFORE_RUN.lock() = Some(Box::new(move || held.recv().unwrap()));
    let run = std::sync::Arc::new(Mutex::new(Vec::new()));
    let (started, _) = mpsc::channel();
    let (_, gate) = mpsc::channel();
    let server = b
        .spawn_serve(Ordered {
            started,
            gate: Mutex::new(gate),
            run: run.clone(),
        })
        .unwrap();
    let caller = {
        let b = b.clone();
        std::thread::spawn(move || b.call::<_, u32>(&IFACE, 9, &(), None))
    };
    let n = super::backlog::MAX_REQUESTS as u64 + 100;
    let peer = std::thread::spawn(move || {
        let peer = a.socket();
        let call = peer.recv().unwrap();
        for seq in 1..=n {
            peer.send(&ordered_request(Kind::Oneway, 3, 0, seq), &[])?;
        }
        peer.send(&reply_to(&call, &5u32), &[])?;
        Ok::<_, Error>(a)
    });
    wait_until(
        "the caller stops at the bound, or the connection ends",
        || {
            let state = b.shared.state.lock();
            state.backlog.full() || state.closed.is_some()
        },
    );
    assert!(
        !b.is_closed(),
        "the connection ended: nothing served the oneways"
    );
    start.send(()).unwrap();
    assert_eq!(caller.join().unwrap().unwrap(), 5);
    let a = peer.join().unwrap().unwrap();
    wait_until("every oneway has run", || {
        run.lock().unwrap().len() as u64 == n
    });
    assert!(
        run.lock().unwrap().iter().copied().eq(1..=n),
        "out of order"
    );
    drop(a);
    server.join().unwrap().unwrap();
}

/// `b` serving `Ordered` on one thread, which `hold` (cookie 1, sent by `a` by hand) keeps
/// busy until the returned gate is opened: nobody reads `b`'s socket meanwhile. Returns both
/// ends, the gate, the serving thread and what ran.
#[allow(clippy::type_complexity)]
fn serving_held() -> (
    Connection,
    Connection,
    mpsc::Sender<()>,
    std::thread::JoinHandle<Result<()>>,
    std::sync::Arc<Mutex<Vec<u64>>>,
) {
    let (a, b) = Connection::pair().unwrap();
    let (started, has_started) = mpsc::channel();
    let (open, gate) = mpsc::channel();
    let run = std::sync::Arc::new(Mutex::new(Vec::new()));
    let server = {
        let (b, run) = (b.clone(), run.clone());
        std::thread::spawn(move || {
            b.serve(Ordered {
                started,
                gate: Mutex::new(gate),
                run,
            })
        })
    };
    a.socket()
        .send(&ordered_request(Kind::Call, 1, 1, 0), &[])
        .unwrap();
    has_started.recv().unwrap();
    (a, b, open, server, run)
}

/// One serving thread runs requests strictly in the order they arrive (`Server::new`), also
/// those that a caller of the serving end took in while it waited for its own reply: a oneway
/// that arrived after a call does not run before it.
#[test]
fn one_serving_thread_runs_a_call_before_a_oneway_that_arrived_after_it() {
    let (a, b, open, server, run) = serving_held();
    let peer = a.socket();
    // A caller of `b` reads for its reply, and takes in a call and then a oneway before it.
    let caller = std::thread::spawn(move || b.call::<_, u32>(&IFACE, 9, &(), None));
    let call = peer.recv().unwrap();
    peer.send(&ordered_request(Kind::Call, 2, 2, 1), &[])
        .unwrap();
    peer.send(&ordered_request(Kind::Oneway, 3, 0, 2), &[])
        .unwrap();
    peer.send(&reply_to(&call, &5u32), &[]).unwrap();
    assert_eq!(caller.join().unwrap().unwrap(), 5);
    // Both wait in the queue; `hold` ends, and the serving thread runs them.
    open.send(()).unwrap();
    peer.send(&ordered_request(Kind::Call, 2, 3, 3), &[])
        .unwrap();
    for cookie in 1..=3 {
        let reply = Envelope::read(&peer.recv().unwrap().payload).unwrap();
        assert_eq!((reply.kind, reply.cookie), (Kind::Reply, cookie));
    }
    assert_eq!(*run.lock().unwrap(), [1, 2, 3], "run out of arrival order");
    a.close();
    server.join().unwrap().unwrap();
}

/// `b`, serving `Ordered` on one thread that `hold` (cookie 1) keeps busy, with calls and
/// oneways of the peer's (`mark` and `note`, numbered 1 to 8, each carrying a copy of the
/// returned pipe's write end) waiting in its queue: a caller of `b` took them in before its
/// reply. Then one more call (20, no fd) stays unread in the socket. Returns the peer's end,
/// the gate that ends `hold`, the serving thread, what ran and the pipe's read end.
#[allow(clippy::type_complexity)]
fn queued_behind_hold() -> (
    Connection,
    Connection,
    mpsc::Sender<()>,
    std::thread::JoinHandle<Result<()>>,
    std::sync::Arc<Mutex<Vec<u64>>>,
    std::os::fd::OwnedFd,
) {
    let (a, b, open, server, run) = serving_held();
    let peer = a.socket();
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
    let caller = {
        let b = b.clone();
        std::thread::spawn(move || b.call::<_, u32>(&IFACE, 9, &(), None))
    };
    let call = peer.recv().unwrap();
    for seq in 1..=8 {
        let (kind, cmd) = match seq % 2 {
            0 => (Kind::Call, 2),
            _ => (Kind::Oneway, 3),
        };
        peer.send(
            &ordered_request(kind, cmd, 1 + seq, seq),
            &[write_end.as_fd()],
        )
        .unwrap();
    }
    peer.send(&reply_to(&call, &5u32), &[]).unwrap();
    assert_eq!(caller.join().unwrap().unwrap(), 5);
    peer.send(&ordered_request(Kind::Call, 2, 20, 20), &[])
        .unwrap();
    (a, b, open, server, run, read_end)
}

/// `close` drops the peer's requests that have not started: those queued for a serving
/// thread (their fds closed at once, while the handler running goes on) and those still
/// unread in the socket (Linux delivers them after the shutdown); the handler running
/// finishes, and `serve` returns `Ok` once it has. (They all ran after `close` before.)
#[test]
fn close_drops_the_requests_not_started_and_closes_their_fds() {
    let (_a, b, open, server, run, read_end) = queued_behind_hold();
    b.close();
    crate::closer::wait_for_closes(); // they are closed on the closer's threads
    assert_eq!(
        nix::unistd::read(&read_end, &mut [0; 1]),
        Ok(0),
        "the queued requests still hold their fds after close"
    );
    open.send(()).unwrap();
    server.join().unwrap().unwrap();
    assert_eq!(*run.lock().unwrap(), [], "requests ran after close");
}

/// When the peer hangs up instead, its calls that have not started are dropped, as on
/// `close`, since their replies could go nowhere: those queued, and the one still unread in
/// the socket, read once the running call's reply finds the peer gone. Its oneways still run,
/// in order, and every fd the requests carried is closed. (Before, the calls ran too, for
/// nobody.) With `half_closed`, the peer shuts only its sending side first, and a caller of
/// this end reads that: the connection ends with the replies still to go out, and nothing
/// is dropped then, nor does anything read the socket after; the running call's reply is
/// where this end learns that the peer has gone since. (Before, every call ran then.)
fn a_peer_hanging_up_has_its_calls_queued_dropped(half_closed: bool) {
    let (a, b, open, server, run, read_end) = queued_behind_hold();
    if half_closed {
        let fd = a.socket().as_fd().as_raw_fd();
        nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write).unwrap();
        let call = b.call::<_, u32>(&IFACE, 9, &(), None);
        assert!(matches!(call, Err(crate::Error::Disconnected)), "{call:?}");
        let queued = b.shared.state.lock().calls.len();
        assert_eq!(queued, 5, "calls 2, 4, 6, 8 and 20 queued");
    }
    a.close();
    open.send(()).unwrap();
    server.join().unwrap().unwrap();
    assert_eq!(*run.lock().unwrap(), [1, 3, 5, 7]);
    crate::closer::wait_for_closes(); // the fds dropped are closed on the closer's threads
    assert_eq!(nix::unistd::read(&read_end, &mut [0; 1]), Ok(0));
    let state = b.shared.state.lock();
    assert!(state.calls.is_empty() && state.backlog.is_empty());
}

#[test]
fn a_peer_hanging_up_has_its_calls_not_started_dropped_and_its_oneways_run() {
    a_peer_hanging_up_has_its_calls_queued_dropped(false);
}

#[test]
fn a_peer_that_shuts_its_sending_side_then_hangs_up_has_its_calls_queued_dropped() {
    a_peer_hanging_up_has_its_calls_queued_dropped(true);
}

/// A peer that shuts only its sending side still reads: its calls, queued and unread, all run
/// after it did, in order, and their replies reach it.
#[test]
fn a_peer_that_shuts_only_its_sending_side_has_its_calls_run_and_answered() {
    let (a, _b, open, server, run, _read_end) = queued_behind_hold();
    let peer = a.socket();
    nix::sys::socket::shutdown(peer.as_fd().as_raw_fd(), nix::sys::socket::Shutdown::Write)
        .unwrap();
    open.send(()).unwrap();
    server.join().unwrap().unwrap();
    assert_eq!(*run.lock().unwrap(), [1, 2, 3, 4, 5, 6, 7, 8, 20]);
    let replied: Vec<_> = (0..6)
        .map(|_| {
            let reply = Envelope::read(&peer.recv().unwrap().payload).unwrap();
            (reply.kind, reply.cookie)
        })
        .collect();
    let calls = [1, 3, 5, 7, 9, 20];
    assert_eq!(replied, calls.map(|cookie| (Kind::Reply, cookie)));
}

/// A failure that finds the peer gone (here the answer to a command the service lacks,
/// refused before any handler runs) has the serving thread read what the peer sent to its
/// end too: the calls behind it never run. (With only a reply doing so, the first call behind
/// it ran, its reply the first to fail.)
#[test]
fn a_failure_that_finds_the_peer_gone_has_the_calls_behind_it_dropped() {
    let (a, b) = Connection::pair().unwrap();
    let peer = a.socket();
    peer.send(&ordered_request(Kind::Call, 99, 1, 0), &[])
        .unwrap();
    for seq in 1..=2 {
        peer.send(&ordered_request(Kind::Call, 2, 1 + seq, seq), &[])
            .unwrap();
    }
    a.close();
    let run = std::sync::Arc::new(Mutex::new(Vec::new()));
    let (started, _has_started) = mpsc::channel();
    let (_open, gate) = mpsc::channel();
    let ordered = Ordered {
        started,
        gate: Mutex::new(gate),
        run: run.clone(),
    };
    b.serve(ordered).unwrap();
    assert_eq!(*run.lock().unwrap(), []);
}

/// A peer that filled the request queue to its bounds with calls, and hung up, has none of
/// them run: the running call's reply finds it gone, and what it sent is read to its end,
/// past the bounds, where its calls are dropped. (Before, they all ran, for nobody; and with
/// only the calls dropped at the end, the first still ran, to let the end in.)
#[test]
fn calls_filling_the_queue_of_a_peer_that_hung_up_never_run() {
    let (a, b, open, server, run) = serving_held();
    let peer = a.socket();
    fill_the_queue_through_a_call(&b, peer, Kind::Call);
    peer.send(&ordered_request(Kind::Call, 2, 2_000, 2_000), &[])
        .unwrap();
    a.close();
    open.send(()).unwrap();
    server.join().unwrap().unwrap();
    let ran = run.lock().unwrap().len();
    assert_eq!(ran, 0, "{ran} of the calls ran");
    let state = b.shared.state.lock();
    assert!(state.calls.is_empty() && state.backlog.is_empty());
}

/// A peer that sent more requests than the queue holds and hung up before the reply to the
/// call running could go still has every oneway run, and `serve` returns `Ok`: the serving
/// thread whose reply finds it gone reads what is left to its end, past the bounds and past
/// the queue's hard cap too, which would otherwise end the connection as if the peer had
/// flooded a handler's call back (`Malformed`), dropping every oneway and making `serve`
/// fail. Here a handler's call back took the queue near that cap; a send buffer holds as much
/// alone where `net.core.wmem_max` allows one of 4 MiB (some 10,000 small requests).
#[test]
fn oneways_past_the_bounds_of_a_peer_that_hung_up_all_run() {
    let (a, b, open, server, run) = serving_held();
    let peer = a.socket();
    let cap = (super::backlog::HARD_FACTOR * super::backlog::MAX_REQUESTS) as u64;
    let oneway = |seq| ordered_request(Kind::Oneway, 3, 0, seq);
    take_in_through_a_call(&b, peer, (1..cap).map(oneway));
    for seq in cap..cap + 2 {
        peer.send(&ordered_request(Kind::Oneway, 3, 0, seq), &[])
            .unwrap();
    }
    a.close();
    open.send(()).unwrap();
    let served = server.join().unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert_eq!(*run.lock().unwrap(), (1..cap + 2).collect::<Vec<_>>());
}

/// A caller waiting for room at the bounds, which reads on once the peer has hung up, reads
/// past the queue's hard cap too: it gets the reply the peer sent before it went, behind more
/// requests than the cap, and every oneway runs. (Before, the request read past the cap ended
/// the connection with `Malformed`, as if the peer had flooded a handler's call back: the
/// caller got that, and the oneways were dropped.)
#[test]
fn a_caller_reading_after_a_hang_up_reads_past_the_cap_and_gets_its_reply() {
    let (a, b, open, server, run) = serving_held();
    let peer = a.socket();
    let cap = (super::backlog::HARD_FACTOR * super::backlog::MAX_REQUESTS) as u64;
    let oneway = |seq| ordered_request(Kind::Oneway, 3, 0, seq);
    take_in_through_a_call(&b, peer, (1..cap).map(oneway));
    let caller = {
        let b = b.clone();
        std::thread::spawn(move || b.call::<_, u32>(&IFACE, 9, &(), None))
    };
    let call = peer.recv().unwrap();
    for seq in cap..cap + 2 {
        peer.send(&oneway(seq), &[]).unwrap();
    }
    peer.send(&reply_to(&call, &7u32), &[]).unwrap();
    a.close();
    // Its reply read before the held call ends, with nothing taken from the queue meanwhile.
    assert_eq!(caller.join().unwrap().unwrap(), 7);
    open.send(()).unwrap();
    let served = server.join().unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert_eq!(*run.lock().unwrap(), (1..cap + 2).collect::<Vec<_>>());
}

/// How a connection ends under threads parked on it.
#[derive(Clone, Copy, Debug)]
enum Ending {
    PeerGone,
    Closed,
    /// This end stops reading: the filler's message still goes out, read by the peer.
    StoppedReading,
}

/// Threads parked at each place a blocking call waits (reading for its reply, waiting for
/// its reply while another reads, waiting for room with the send lock held, waiting for the
/// send lock, with and without timeouts) and a serving thread all return at once when the
/// connection ends: the callers with `Disconnected`, never `TimedOut`.
fn every_parked_thread_fails_with_disconnected(ending: Ending) {
    let (ours, theirs) = crate::Socket::pair().unwrap();
    let a = Connection::new(ours);
    let long = Some(Duration::from_secs(600));
    // The first caller reads for its reply, before a serving thread could take the role.
    let mut callers = vec![call_on(&a, 1, None)];
    next_call(&theirs);
    let runner = {
        let a = a.clone();
        std::thread::spawn(move || a.run())
    };
    wait_until("the runner runs", || a.shared.state.lock().runners == 1);
    for (cmd, timeout) in [(2, None), (3, long)] {
        callers.push(call_on(&a, cmd, timeout));
        next_call(&theirs);
    }
    let filler = {
        let a = a.clone();
        std::thread::spawn(move || a.oneway(&IFACE, 9, &"x".repeat(32 << 20), None))
    };
    wait_until("the filler waits for room", || !writable(&a));
    for (cmd, timeout) in [(4, None), (5, long)] {
        callers.push(call_on(&a, cmd, timeout));
    }
    wait_until("every caller waits", || {
        a.shared.state.lock().pending.len() == 4
    });
    match ending {
        Ending::PeerGone => drop(theirs),
        Ending::Closed => {
            a.close();
            drop(theirs);
        }
        Ending::StoppedReading => {
            a.stop_reading();
            // The peer reads on, until this end hangs up once every handle is gone.
            std::thread::spawn(move || while theirs.recv().is_ok() {});
        }
    }
    for (i, caller) in callers.into_iter().enumerate() {
        let outcome = caller.join().unwrap();
        assert!(
            matches!(outcome, Err(Error::Disconnected)),
            "{ending:?}: caller {i} got {outcome:?}"
        );
    }
    let sent = filler.join().unwrap();
    match ending {
        Ending::StoppedReading => assert!(sent.is_ok(), "a oneway goes out: {sent:?}"),
        _ => assert!(
            matches!(sent, Err(Error::Disconnected)),
            "{ending:?}: {sent:?}"
        ),
    }
    runner.join().unwrap().unwrap();
    assert!(a.shared.state.lock().pending.is_empty());
}

#[test]
fn a_peer_gone_fails_every_thread_parked_on_the_connection_with_disconnected() {
    every_parked_thread_fails_with_disconnected(Ending::PeerGone);
}

#[test]
fn close_fails_every_thread_parked_on_the_connection_with_disconnected() {
    every_parked_thread_fails_with_disconnected(Ending::Closed);
}

#[test]
fn stop_reading_fails_every_caller_parked_on_the_connection_with_disconnected() {
    every_parked_thread_fails_with_disconnected(Ending::StoppedReading);
}
