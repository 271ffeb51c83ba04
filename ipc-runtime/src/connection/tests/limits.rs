//! This side's and the peer's limits: messages over them refused unsent or failed, and the
//! failures owed for them sent.

use super::*;

/// A call or oneway over this side's limits fails before anything is sent, leaves the
/// caller's fds open and the connection usable, and gives back the byte string it placed
/// in the lane.
#[test]
fn a_message_over_this_sides_limits_is_refused_unsent() {
    use crate::codec::Fd;
    let (a, b) = limited_pair(crate::frame::Limits {
        max_message_len: 64 << 10,
        max_fds: 4,
        ..Default::default()
    });
    let files: Vec<std::os::fd::OwnedFd> = (0..5)
        .map(|_| crate::memfd::new_memfd(1).unwrap())
        .collect();
    // (The timeout only keeps a regression from hanging: nobody would ever answer.)
    let refused = a.call::<_, u32>(&IFACE, 1, &Fd(&files), Some(Duration::from_secs(60)));
    assert_five_fds_over_this_sides_four(&refused);
    let refused = a.oneway(&IFACE, 2, &Fd(&files), None);
    assert_five_fds_over_this_sides_four(&refused);
    assert!(
        a.shared.state.lock().pending.is_empty(),
        "no call left waiting"
    );
    assert!(
        !a.shared.state.lock().reading,
        "the reader role was given back"
    );
    for file in &files {
        nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETFD).expect("still open");
    }
    assert!(b.socket().try_recv().unwrap().is_none(), "nothing went out");
    // A message within the limits goes out as usual, and is the first the peer sees.
    let four: Vec<_> = files.into_iter().take(4).collect();
    a.oneway(&IFACE, 3, &Fd(&four), None).unwrap();
    let first = b.socket().recv().unwrap();
    assert_eq!(Envelope::read(&first.payload).unwrap().cmd, 3);
    assert_eq!(first.fds.len(), 4);
    drop(b);
    let (a, server) = {
        let (a, b) = limited_pair(crate::frame::Limits {
            max_message_len: 64 << 10,
            max_fds: 4,
            ..Default::default()
        });
        (a, std::thread::spawn(move || b.serve(Skimmer)))
    };
    // Too large, with a byte string placed in the lane: the placement is given back.
    let small = a.call::<_, u64>(&SKIM, 2, &Bytes(&[1u8; 100][..]), None);
    assert_eq!(small.unwrap(), 100); // both ends now know the other reads lanes
    let (placed, inline) = (vec![7u8; 8 << 10], vec![1u8; 100 << 10]);
    let refused = a.call::<_, u64>(&SKIM, 2, &(Bytes(&placed), Bytes(&inline)), None);
    assert!(
        matches!(
            refused,
            Err(Error::TooLarge { limit, which: crate::Limit::MaxMessageLen, .. })
                if limit == 64 << 10
        ),
        "{refused:?}"
    );
    assert!(
        !a.lane_is_busy(),
        "the refused message's placement was given back"
    );
    // The next placement goes through the lane, announcing the region again.
    skim_twice(&a);
    a.close();
    server.join().unwrap().unwrap();
}

/// A reply over the caller's limits fails that call only, whoever reads it: here a serving
/// thread holds the reader role, so the refusal goes through the call's slot. Its fds are
/// closed, and the connection, and the serving thread, carry on.
#[test]
fn a_reply_over_the_callers_limits_read_by_another_thread_fails_that_call_only() {
    let (a, b) = limited_pair(crate::frame::Limits {
        max_message_len: 1 << 20,
        max_fds: 4,
        ..Default::default()
    });
    let runner = {
        let a = a.clone();
        std::thread::spawn(move || a.run())
    };
    wait_until("the serving thread reads", || a.shared.state.lock().reading);
    let call = |cmd| {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u32>(&IFACE, cmd, &(), None))
    };
    let first = call(1);
    let request = b.socket().recv().unwrap();
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
    let reply = reply_to(&request, &7u32);
    b.socket().send(&reply, &[write_end.as_fd(); 5]).unwrap();
    drop(write_end);
    let refused = first.join().unwrap();
    assert_five_fds_over_this_sides_four(&refused);
    // Every copy of the write end is closed: the empty pipe reads as ended, not as waiting
    // for a writer (`EAGAIN`).
    crate::closer::wait_for_closes(); // the fds dropped are closed on the closer's threads
    assert_eq!(nix::unistd::read(&read_end, &mut [0u8; 1]), Ok(0));
    // The next call is answered as usual.
    let second = call(2);
    let request = b.socket().recv().unwrap();
    b.socket().send(&reply_to(&request, &8u32), &[]).unwrap();
    assert_eq!(second.join().unwrap().unwrap(), 8);
    assert!(!a.is_closed());
    b.close();
    runner.join().unwrap().unwrap();
}

/// A caller with a timeout that takes in, while it reads for its reply, a request over this
/// side's limits owes the peer a failure for it; if the peer reads nothing, that failure
/// cannot go out, and the caller must still return once its timeout has passed, not wait
/// with it for as long as the peer does not read: a serving thread sends it, as it would a
/// reply.
#[test]
fn a_caller_owing_a_failure_to_a_peer_that_reads_nothing_still_times_out() {
    let (a, b) = limited_pair(crate::frame::Limits {
        max_message_len: 1 << 20,
        max_fds: 4,
        ..Default::default()
    });
    let (done, outcome) = mpsc::channel();
    let caller = {
        let a = a.clone();
        std::thread::spawn(move || {
            // Long enough for the request below to arrive first on a loaded machine.
            let timeout = Some(Duration::from_secs(1));
            done.send(a.call::<_, u32>(&IFACE, 1, &(), timeout))
                .unwrap();
        })
    };
    // The call is out; its caller reads for the reply.
    let request = b.socket().recv().unwrap();
    assert_eq!(Envelope::read(&request.payload).unwrap().kind, Kind::Call);
    // `b` reads nothing more: fill its socket buffer.
    let soon = Some(Duration::from_millis(10));
    let mut sent = 0u64;
    while a.oneway(&IFACE, 2, &"x".repeat(512), soon).is_ok() {
        sent += 1;
        assert!(sent < 1 << 20, "the peer's socket never filled");
    }
    // A request with more fds than `a` takes: refused, and answered with a failure.
    send_call_with_five_fds(b.socket(), 77);
    let outcome = outcome.recv_timeout(Duration::from_secs(60));
    // A serving thread sends the failure, once the peer reads.
    let runner = {
        let a = a.clone();
        std::thread::spawn(move || a.run())
    };
    // Let everything through before judging, so that a caller still stuck ends.
    let mut failure = None;
    while failure.is_none() {
        let message = b.socket().recv().unwrap();
        let envelope = Envelope::read(&message.payload).unwrap();
        if envelope.cookie == 77 {
            failure = Some(envelope.kind);
        }
    }
    caller.join().unwrap();
    assert!(
        matches!(outcome, Ok(Err(Error::TimedOut))),
        "a call with a timeout, owing the peer a failure: {outcome:?}"
    );
    assert_eq!(failure, Some(Kind::Failure), "the request was answered");
    assert!(!a.is_closed());
    b.close();
    runner.join().unwrap().unwrap();
}

/// A caller that takes in a call this end cannot receive answers it at once when the failure
/// can go out at once, on a connection no thread serves too: only a failure that would have to
/// wait is left to a serving thread.
#[test]
fn a_caller_owing_a_failure_to_a_peer_that_reads_sends_it_at_once() {
    let (a, b) = limited_pair(crate::frame::Limits {
        max_message_len: 1 << 20,
        max_fds: 4,
        ..Default::default()
    });
    // (The timeouts only keep a regression from hanging.)
    let watchdog = Duration::from_secs(30);
    std::thread::scope(|s| {
        let caller = s.spawn(|| a.call::<_, u32>(&IFACE, 1, &(), Some(watchdog)));
        let request = b.socket().recv().unwrap();
        let call = Envelope::read(&request.payload).unwrap();
        assert_eq!(call.kind, Kind::Call);
        send_call_with_five_fds(b.socket(), 77);
        // The failure comes while `a`'s caller still waits for its reply.
        let answer = b.socket().recv_timeout(watchdog).unwrap();
        let answer = Envelope::read(&answer.payload).unwrap();
        assert_eq!((answer.kind, answer.cookie), (Kind::Failure, 77));
        let mut reply = vec![0; envelope::LEN];
        Envelope {
            kind: Kind::Reply,
            ..call
        }
        .write(&mut reply);
        codec::encode(&7u32, &mut reply, &mut Vec::new()).unwrap();
        b.socket().send(&reply, &[]).unwrap();
        assert_eq!(caller.join().unwrap().unwrap(), 7);
    });
    assert!(!a.is_closed());
}

/// A thread reading while it waits to send, which takes in a call this end cannot receive,
/// does not send the failure itself: it holds the send lock, so the failure could only go out
/// after its own message, and it must not wait on itself. A serving thread sends it, once
/// the message that held the socket has gone out.
#[test]
fn a_failure_owed_by_a_thread_waiting_to_send_is_sent_by_a_serving_thread() {
    let (a, b) = limited_pair(crate::frame::Limits {
        max_message_len: 64 << 20,
        max_fds: 4,
        ..Default::default()
    });
    // (The timeout only keeps a regression from hanging.)
    let watchdog = Some(Duration::from_secs(60));
    std::thread::scope(|s| {
        let filler = s.spawn(|| a.oneway(&IFACE, 1, &"x".repeat(32 << 20), watchdog));
        wait_until("the filler waits for room", || !writable(&a));
        send_call_with_five_fds(b.socket(), 77);
        wait_until("the filler takes the call in and owes its failure", || {
            !a.shared.state.lock().owed.is_empty()
        });
        let runner = s.spawn(|| a.run());
        let oneway = b.socket().recv().unwrap();
        assert_eq!(Envelope::read(&oneway.payload).unwrap().cmd, 1);
        filler.join().unwrap().unwrap();
        let answer = b.socket().recv().unwrap();
        let answer = Envelope::read(&answer.payload).unwrap();
        assert_eq!((answer.kind, answer.cookie), (Kind::Failure, 77));
        a.close();
        runner.join().unwrap().unwrap();
    });
}

/// A caller that takes in a call this end cannot receive, and cannot send its failure at
/// once, leaves the failure to a serving thread. The serving thread asleep while the caller
/// read must not take the reader role before the failure is queued: a runner reading waits
/// in the socket, with no deadline, and nothing would send the failure until the peer sent
/// something more, while the peer waits for the failure. (Here the caller, with tracing on,
/// names the call for its line before it answers it, which waits for the registry's lock,
/// held here: a runner woken too early takes the role meanwhile. Without tracing it is the
/// same race, lost more rarely.)
#[test]
fn a_failure_owed_by_a_caller_is_sent_by_the_runner_it_wakes() {
    let (mut a, b) = limited_pair(crate::frame::Limits {
        max_message_len: 1 << 20,
        max_fds: 4,
        ..Default::default()
    });
    std::sync::Arc::get_mut(&mut a.shared).unwrap().trace = true;
    // The caller finds nobody reading: it reads for its reply.
    let caller = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u32>(&IFACE, 1, &(), None))
    };
    let request = b.socket().recv().unwrap();
    let runner = {
        let a = a.clone();
        std::thread::spawn(move || a.run())
    };
    wait_until("the serving thread sleeps while the caller reads", || {
        let state = a.shared.state.lock();
        state.runners == 1 && state.waiters == 1
    });
    // `b` reads nothing for now: fill its socket buffer, so that the failure cannot go out
    // at once.
    let soon = Some(Duration::from_millis(10));
    let mut sent = 0u64;
    while a.oneway(&IFACE, 2, &"x".repeat(16 << 10), soon).is_ok() {
        sent += 1;
        assert!(sent < 1 << 20, "the peer's socket never filled");
    }
    // The caller names the refused call, and waits for the registry meanwhile.
    let held = reader_holding_a_refused_call(&a, &b);
    drop(held);
    // `b` reads again: everything `a` sent, then the failure.
    let (done, answered) = mpsc::channel();
    let peer = std::thread::spawn(move || {
        loop {
            let Ok(message) = b.socket().recv() else {
                break;
            };
            let envelope = Envelope::read(&message.payload).unwrap();
            if envelope.cookie == 77 {
                let _ = done.send(envelope.kind);
            }
        }
        b
    });
    let answer = answered.recv_timeout(Duration::from_secs(60));
    // Either way, end the connection so that every thread returns.
    a.close();
    let b = peer.join().unwrap();
    assert_eq!(
        answer,
        Ok(Kind::Failure),
        "the failure owed for the refused call never went out"
    );
    assert!(matches!(caller.join().unwrap(), Err(Error::Disconnected)));
    runner.join().unwrap().unwrap();
    drop((b, request));
}

#[test]
fn a_handler_that_ran_after_its_arguments_were_refused_is_not_reported_unrun() {
    let (a, mut b) = crate::Socket::pair().unwrap();
    b.set_limits(limits_of_100_kib());
    let b = Connection::new(b);
    let server = std::thread::spawn(move || b.serve(RunsAnyway));
    let a = Connection::new(a);
    call_one_that_runs_anyway(&a);
    a.close();
    server.join().unwrap().unwrap();
}

/// A peer's refusal of a request over its limits names the peer's setting; one naming a
/// setting this version does not know (a later version's) reads as `Limit::Unknown`, with the
/// sizes the peer sent, rather than failing to decode.
#[test]
fn a_refusal_by_the_peer_names_its_setting_even_one_unknown_here() {
    use super::failure::{Failure, WireLimit};
    let (ours, theirs) = crate::Socket::pair().unwrap();
    let a = Connection::new(ours);
    for (code, which) in [(3, crate::Limit::MaxFds), (200, crate::Limit::Unknown)] {
        let caller = {
            let a = a.clone();
            std::thread::spawn(move || a.call::<_, u64>(&IFACE, 1, &(), None))
        };
        let call = theirs.recv().unwrap();
        let mut m = vec![0; envelope::LEN];
        Envelope {
            kind: Kind::Failure,
            cmd: 1,
            cookie: Envelope::read(&call.payload).unwrap().cookie,
            interface: IFACE.id,
            signature: IFACE.signature,
        }
        .write(&mut m);
        let failure = Failure::TooManyFds {
            count: 5,
            limit: 4,
            which: WireLimit(crate::Limit::MaxFds),
        };
        codec::encode(&failure, &mut m, &mut Vec::new()).unwrap();
        // The setting is the body's last byte.
        *m.last_mut().unwrap() = code;
        theirs.send(&m, &[]).unwrap();
        match caller.join().unwrap() {
            Err(
                e @ Error::TooManyFds {
                    count: 5,
                    limit: 4,
                    which: w,
                    by_peer: true,
                    ..
                },
            ) if w == which => {
                let whose = match which {
                    crate::Limit::Unknown => "the peer's limit".to_string(),
                    _ => format!("the peer's {which}"),
                };
                let want = format!("message carries 5 file descriptors, over {whose} (4)");
                assert_eq!(e.to_string(), want);
            }
            other => panic!("code {code}: expected TooManyFds naming {which:?}, got {other:?}"),
        }
    }
}
