//! The reader role's hand-offs, which only the connection's insides can observe: threads
//! waiting to send, replies read by another thread, callers timing out at each stage.

use super::*;

/// A thread waiting for room to send reads meanwhile, also once the reader role it found
/// taken is let go: here the peer's only thread sends this end 1 MiB while this end's only
/// thread that could read waits to send 32 MiB to it. Neither fits the socket buffer, and
/// before, neither end read until its own send was done: both waited for good.
#[test]
fn a_thread_waiting_to_send_takes_the_reader_role_once_it_is_let_go() {
    let (a, b) = Connection::pair().unwrap();
    // A caller whose call goes out at once, and which then reads for its reply.
    let caller = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u64>(&IFACE, 2, &(), None))
    };
    let call = b.socket().recv().unwrap();
    // `b` reads nothing more until the end, so the filler waits for room, with the role
    // taken by the caller.
    let filler = {
        let a = a.clone();
        std::thread::spawn(move || a.oneway(&IFACE, 1, &"x".repeat(32 << 20), None))
    };
    wait_until("the filler waits for room", || !writable(&a));
    // The caller gets its reply and lets the role go: only the filler is left to read.
    b.socket().send(&reply_to(&call, &42u64), &[]).unwrap();
    assert_eq!(caller.join().unwrap().unwrap(), 42);
    let big = oneway_message(3, &"y".repeat(1 << 20));
    let big_len = big.len();
    let (done, sent) = mpsc::channel();
    let peer = {
        let b = b.clone();
        std::thread::spawn(move || done.send(b.socket().send(&big, &[])).unwrap())
    };
    let sent = sent.recv_timeout(Duration::from_secs(60));
    assert!(
        matches!(sent, Ok(Ok(()))),
        "nobody read while the filler waited to send: {sent:?}"
    );
    peer.join().unwrap();
    // Queued for a serving thread (`a` has none), whole, once its last datagram is read.
    wait_until("the filler queues the peer's oneway", || {
        !a.shared.state.lock().oneways.is_empty()
    });
    let queued = a.shared.state.lock().oneways.pop_front().unwrap().frame;
    assert_eq!(Envelope::read(&queued.payload).unwrap().cmd, 3);
    assert_eq!(queued.payload.len(), big_len);
    // Now let the filler's message through.
    let oneway = b.socket().recv().unwrap();
    assert_eq!(Envelope::read(&oneway.payload).unwrap().cmd, 1);
    filler.join().unwrap().unwrap();
}

/// A oneway message to method `cmd` of `IFACE` carrying `body` inline, as the peer would send
/// it by hand.
fn oneway_message(cmd: u32, body: &impl serde::Serialize) -> Vec<u8> {
    let mut message = vec![0; envelope::LEN];
    Envelope {
        kind: Kind::Oneway,
        cmd,
        cookie: 0,
        interface: IFACE.id,
        signature: IFACE.signature,
    }
    .write(&mut message);
    codec::encode(body, &mut message, &mut Vec::new()).unwrap();
    message
}

/// A send with a timeout gives up when another thread's message holds the socket for
/// longer (here a 32 MiB oneway to a peer that reads nothing), rather than wait for it to
/// finish going out: nothing of it was sent, and once the peer reads, the connection goes on.
#[test]
fn a_timeout_bounds_the_wait_for_another_threads_send() {
    let (a, b) = Connection::pair().unwrap();
    let filler = {
        let a = a.clone();
        std::thread::spawn(move || a.oneway(&IFACE, 1, &"x".repeat(32 << 20), None))
    };
    wait_until("the filler waits for room", || !writable(&a));
    // On a thread of its own, so that a send that waits for good fails the test rather than
    // hanging it.
    let (done, outcome) = mpsc::channel();
    let sender = {
        let a = a.clone();
        std::thread::spawn(move || {
            let timeout = Some(Duration::from_millis(50));
            done.send(a.oneway(&IFACE, 2, &7u32, timeout)).unwrap();
        })
    };
    let outcome = outcome.recv_timeout(Duration::from_secs(60));
    assert!(
        matches!(outcome, Ok(Err(Error::TimedOut))),
        "a oneway with a timeout behind another thread's send: {outcome:?}"
    );
    sender.join().unwrap();
    // The filler's message arrives whole, and nothing of the one that timed out.
    let oneway = b.socket().recv().unwrap();
    assert_eq!(Envelope::read(&oneway.payload).unwrap().cmd, 1);
    filler.join().unwrap().unwrap();
    a.oneway(&IFACE, 3, &8u32, None).unwrap();
    let next = b.socket().recv().unwrap();
    assert_eq!(Envelope::read(&next.payload).unwrap().cmd, 3);
}

/// A reply whose first datagram a caller read before it timed out is finished by whoever
/// reads next, not mistaken for a new message when its continuation arrives. The timeout must
/// outlast this thread's receive and send of the first datagram: 2 s, since a loaded machine
/// may stall a thread for hundreds of milliseconds (a flake hunt's suspicion at 500 ms).
#[test]
fn a_message_half_read_when_its_reader_gives_up_is_finished_by_the_next() {
    use crate::wire::{FIRST_MAX, Header, Kind as Part};
    let (a, b) = Connection::pair().unwrap();
    let first_call = {
        let a = a.clone();
        std::thread::spawn(move || {
            a.call::<_, Bytes<Vec<u8>>>(&IFACE, 1, &(), Some(Duration::from_secs(2)))
        })
    };
    // Reply with a message of two datagrams, and send only the first.
    let call = b.socket().recv().unwrap();
    let reply = reply_to(&call, &Bytes(vec![7u8; FIRST_MAX + 100]));
    let sock = b.socket().as_fd();
    let mut header = Header {
        kind: Part::First,
        fds: 0,
        total_len: reply.len() as u32,
        total_fds: 0,
    };
    crate::sys::send(sock, &header.encode(), &reply[..FIRST_MAX], &[]).unwrap();
    assert!(matches!(first_call.join().unwrap(), Err(Error::TimedOut)));
    assert!(
        a.shared.state.lock().recv.is_partial(),
        "the caller read the first datagram before giving up"
    );
    // The caller that gave up said so.
    let cancel = b.socket().recv().unwrap();
    let cancelled = Envelope::read(&cancel.payload).unwrap();
    assert_eq!(cancelled.kind, Kind::Cancel);
    assert_eq!(
        cancelled.cookie,
        Envelope::read(&call.payload).unwrap().cookie
    );
    // The next caller takes the half-read message with the role: the continuation
    // completes it (a late reply, dropped), then its own reply comes.
    let second_call = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u64>(&IFACE, 2, &(), None))
    };
    header.kind = Part::More;
    crate::sys::send(sock, &header.encode(), &reply[FIRST_MAX..], &[]).unwrap();
    let call = b.socket().recv().unwrap();
    b.socket().send(&reply_to(&call, &42u64), &[]).unwrap();
    assert_eq!(second_call.join().unwrap().unwrap(), 42);
}

/// A message part-way in when a socket becomes a connection is finished by the connection's
/// reader: the connection takes the socket's receive state over (it keeps its own, without
/// the socket's lock), rather than starting afresh and reading the rest as garbage.
#[test]
fn a_message_half_read_from_a_socket_is_finished_by_its_connection() {
    use crate::wire::{FIRST_MAX, Header, Kind as Part};
    let (ours, theirs) = crate::Socket::pair().unwrap();
    // A late reply (to no call of this end's) of two datagrams, the first of which `ours`
    // reads before it becomes a connection.
    let mut late = vec![0; envelope::LEN];
    Envelope {
        kind: Kind::Reply,
        cmd: 1,
        cookie: 1 << 40,
        interface: IFACE.id,
        signature: IFACE.signature,
    }
    .write(&mut late);
    codec::encode(&Bytes(vec![7u8; FIRST_MAX]), &mut late, &mut Vec::new()).unwrap();
    let mut header = Header {
        kind: Part::First,
        fds: 0,
        total_len: late.len() as u32,
        total_fds: 0,
    };
    crate::sys::send(theirs.as_fd(), &header.encode(), &late[..FIRST_MAX], &[]).unwrap();
    assert!(
        ours.try_recv().unwrap().is_none(),
        "only the first datagram has come"
    );
    let a = Connection::new(ours);
    assert!(a.shared.state.lock().recv.is_partial());
    let caller = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u64>(&IFACE, 2, &(), None))
    };
    let call = theirs.recv().unwrap();
    header.kind = Part::More;
    crate::sys::send(theirs.as_fd(), &header.encode(), &late[FIRST_MAX..], &[]).unwrap();
    theirs.send(&reply_to(&call, &42u64), &[]).unwrap();
    assert_eq!(caller.join().unwrap().unwrap(), 42);
    assert!(!a.shared.state.lock().recv.is_partial());
}

/// With tracing on, a reader that takes in another caller's reply says it only once the reply
/// is in its caller's slot and the role is given back: that caller may hold stderr's lock
/// until it has its reply. (Said with the role held, the caller waited for the reader, which
/// waited for stderr; said with the role given back first, the caller, woken, found its slot
/// still empty and read in the socket for a message that was not coming.)
#[test]
fn a_reply_traced_by_another_reader_reaches_its_caller() {
    let (mut a, b) = Connection::pair().unwrap();
    std::sync::Arc::get_mut(&mut a.shared).unwrap().trace = true;
    let call = |cmd| {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u32>(&IFACE, cmd, &(), None))
    };
    // The first caller finds nobody reading: it reads for both.
    let reader = call(1);
    let to_reader = b.socket().recv().unwrap();
    let (done, finished) = mpsc::channel();
    let second = {
        let a = a.clone();
        std::thread::spawn(move || done.send(a.call::<_, u32>(&IFACE, 2, &(), None)))
    };
    let to_second = b.socket().recv().unwrap();
    // The reader says the second caller's reply while this thread holds stderr's lock.
    let stderr = std::io::stderr().lock();
    b.socket().send(&reply_to(&to_second, &8u32), &[]).unwrap();
    let answer = finished.recv_timeout(Duration::from_secs(60));
    drop(stderr);
    let answer = answer.expect("the second caller's reply waited for stderr");
    assert_eq!(answer.unwrap(), 8);
    second.join().unwrap().unwrap();
    b.socket().send(&reply_to(&to_reader, &7u32), &[]).unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), 7);
}

/// With tracing on, a caller that finds nobody reading takes the reader role before it sends,
/// and says its call without waiting for stderr's lock: a thread holding it (as
/// `writeln!(io::stderr().lock(), "{:?}", call())` does, here this one) may be calling
/// meanwhile, and waits for that reader to read its reply. (Said waiting for the lock, the
/// reader waited for this thread, which waited for the reader: both hung.)
#[test]
fn a_caller_taking_the_reader_role_says_its_call_without_waiting_for_stderr() {
    let (mut a, b) = Connection::pair().unwrap();
    std::sync::Arc::get_mut(&mut a.shared).unwrap().trace = true;
    let stderr = std::io::stderr().lock();
    let reader = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u32>(&IFACE, 1, &(), None))
    };
    wait_until("the first caller takes the reader role", || {
        a.shared.state.lock().reading
    });
    // The peer answers each call with its command times ten.
    let peer = std::thread::spawn(move || {
        while let Ok(call) = b.socket().recv() {
            let cmd = Envelope::read(&call.payload).unwrap().cmd;
            let _ = b.socket().send(&reply_to(&call, &(cmd * 10)), &[]);
        }
    });
    // (Only keeps a regression from hanging: ends the connection, which wakes this caller.)
    let (answered, in_time) = mpsc::channel::<()>();
    let watchdog = {
        let a = a.clone();
        std::thread::spawn(move || {
            if in_time.recv_timeout(Duration::from_secs(60)) == Err(RecvTimeoutError::Timeout) {
                a.close();
            }
        })
    };
    let got = a.call::<_, u32>(&IFACE, 2, &(), None);
    drop(answered);
    drop(stderr);
    watchdog.join().unwrap();
    assert!(
        matches!(got, Ok(20)),
        "the call waited for a reader: {got:?}"
    );
    assert_eq!(reader.join().unwrap().unwrap(), 10);
    a.close();
    peer.join().unwrap();
}

/// A thread waiting for room to send that finds another thread reading, and a message
/// come, must still see the room its peer makes meanwhile: the reader may take the message
/// and then wait for the rest of it, which the peer may only send once this end's message
/// is through (as a peer whose own sender waits on its own reader does). Here the peer
/// sends the first datagram of a message whose rest it holds back until it has read this
/// end's 32 MiB oneway; the reader (a serving thread) is held up for a moment, so that the
/// sender sees that datagram before the reader takes it. The sender used to sleep until
/// the reader let the role go, which it does only once that message is whole: both ends
/// waited for good.
#[test]
fn a_thread_waiting_to_send_sees_room_while_the_reader_waits_for_the_rest_of_a_message() {
    use crate::wire::{Header, Kind as Part};
    use nix::sys::socket::{MsgFlags, send};
    use std::os::fd::AsRawFd;

    // (Only keeps a regression from hanging.)
    const GUARD: Duration = Duration::from_secs(20);
    let (a, b) = Connection::pair().unwrap();
    let (held, runner) = run_held_up(&a);
    let filler = {
        let a = a.clone();
        std::thread::spawn(move || a.oneway(&IFACE, 1, &"x".repeat(32 << 20), None))
    };
    wait_until("the filler waits for room", || !writable(&a));
    // The first datagram of a oneway that comes in two.
    let message = oneway_message(3, &"y".repeat(100));
    let header = |kind| Header {
        kind,
        fds: 0,
        total_len: message.len() as u32,
        total_fds: 0,
    };
    let fd = b.socket().as_fd().as_raw_fd();
    send(fd, &header(Part::First).encode(), MsgFlags::empty()).unwrap();
    // The filler sees it, and finds the role taken.
    wait_until("the filler waits for the reader", || {
        a.shared.state.lock().waiters == 1
    });
    // The reader takes the first datagram, and waits for the rest.
    drop(held);
    wait_until("the reader takes the first datagram", || !readable(&a));
    // The peer reads this end's oneway, and only then sends the rest of its own.
    let oneway = b.socket().recv_timeout(GUARD);
    let oneway = oneway.expect("the filler's oneway goes out as the peer reads it");
    assert_eq!(Envelope::read(&oneway.payload).unwrap().cmd, 1);
    filler.join().unwrap().unwrap();
    let mut more = header(Part::More).encode().to_vec();
    more.extend_from_slice(&message);
    send(fd, &more, MsgFlags::empty()).unwrap();
    // (Run, and refused: nothing is served.)
    wait_until("the serving thread runs the peer's oneway", || {
        a.shared.state.lock().oneways_run == 1
    });
    a.close();
    runner.join().unwrap().unwrap();
}

/// A caller that took the reader role before sending, and reads a oneway this end refuses
/// (over its limits), lets the role go and then the lock, to say so on stderr, before it waits
/// for its reply as any caller does: its call must be registered by then, or a reader that
/// takes the role meanwhile (here a thread waiting to send) takes its reply for one whose
/// caller gave up, and drops it. The caller then waited for good (here until its timeout).
#[test]
fn a_reply_read_while_its_caller_reports_a_refused_oneway_reaches_it() {
    // (Only keeps a regression from hanging.)
    const GUARD: Duration = Duration::from_secs(20);
    let (a, b) = limited_pair(crate::frame::Limits {
        max_message_len: 64 << 20,
        max_fds: 4,
        ..Default::default()
    });
    // Nobody reads: the caller takes the role before it sends, and reads for its reply.
    let caller = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u64>(&IFACE, 2, &(), Some(GUARD)))
    };
    let call = b.socket().recv().unwrap();
    let filler = {
        let a = a.clone();
        std::thread::spawn(move || a.oneway(&IFACE, 1, &"x".repeat(32 << 20), None))
    };
    wait_until("the filler waits for room", || !writable(&a));
    // The caller, once it has read the refused oneway, waits for this to say so.
    let held = a.shared.registry.lock();
    let releases = a.shared.state.lock().releases;
    let oneway = oneway_message(3, &());
    let (_read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
    b.socket().send(&oneway, &[write_end.as_fd(); 5]).unwrap();
    b.socket().send(&reply_to(&call, &42u64), &[]).unwrap();
    // The caller lets the role go, and the filler takes it and reads the reply.
    wait_until("the filler reads the reply", || {
        !readable(&a) && a.shared.state.lock().releases.wrapping_sub(releases) >= 2
    });
    drop(held);
    let answer = caller.join().unwrap();
    assert!(matches!(answer, Ok(42)), "the reply was lost: {answer:?}");
    let oneway = b.socket().recv().unwrap();
    assert_eq!(Envelope::read(&oneway.payload).unwrap().cmd, 1);
    filler.join().unwrap().unwrap();
}

/// A peer that answers one call twice (a reply, then a failure for the same cookie, as the
/// async server did for a reply its handler gave up on part-way) while another thread reads
/// for its caller: the first answer stays in the caller's slot, and the second is dropped.
/// Before, the second took the first's place, and the caller got the failure.
#[test]
fn a_second_answer_to_a_call_leaves_the_first_for_its_caller() {
    use super::failure::Failure;
    let (ours, theirs) = crate::Socket::pair().unwrap();
    let a = Connection::new(ours);
    // A caller on another thread, waiting (not reading) for the reply to its call 100.
    a.shared.state.lock().pending.insert(100, None);
    let reader = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u64>(&IFACE, 1, &(), None))
    };
    let call = theirs.recv().unwrap();
    let answer = |kind, cookie, body: &dyn Fn(&mut Vec<u8>)| {
        let mut m = vec![0; envelope::LEN];
        Envelope {
            kind,
            cmd: 1,
            cookie,
            interface: IFACE.id,
            signature: IFACE.signature,
        }
        .write(&mut m);
        body(&mut m);
        theirs.send(&m, &[]).unwrap();
    };
    answer(Kind::Reply, 100, &|m| {
        codec::encode(&5u64, m, &mut Vec::new()).unwrap()
    });
    answer(Kind::Failure, 100, &|m| {
        let failure = Failure::Unanswered("the service sent no reply".into());
        codec::encode(&failure, m, &mut Vec::new()).unwrap()
    });
    let cookie = Envelope::read(&call.payload).unwrap().cookie;
    answer(Kind::Reply, cookie, &|m| {
        codec::encode(&1u64, m, &mut Vec::new()).unwrap()
    });
    assert_eq!(reader.join().unwrap().unwrap(), 1);
    let first = a.shared.state.lock().pending.remove(&100);
    let first = first.flatten().expect("call 100 answered").unwrap();
    let kind = Envelope::read(&first.payload).unwrap().kind;
    assert_eq!(kind, Kind::Reply, "the first answer stays");
}

/// Sends a late reply to `call` carrying the write end of a new pipe, and returns its read
/// end: it reads the end of the file once this end has closed the write end it received.
fn late_reply_with_fd(theirs: &crate::Socket, call: &crate::frame::Frame) -> std::os::fd::OwnedFd {
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    let mut reply = vec![0; envelope::LEN];
    Envelope {
        kind: Kind::Reply,
        ..Envelope::read(&call.payload).unwrap()
    }
    .write(&mut reply);
    let (body, mut fds) = (crate::codec::Fd(&write_end), Vec::new());
    codec::encode(&body, &mut reply, &mut fds).unwrap();
    theirs.send(&reply, &fds).unwrap();
    read_end
}

/// Waits until the write end of the pipe `read_end` reads is closed everywhere.
fn assert_write_end_closed(read_end: &std::os::fd::OwnedFd, what: &str) {
    let mut fds = [PollFd::new(read_end.as_fd(), PollFlags::POLLIN)];
    // A bound so that a leak fails the test rather than hang it, not a timing assertion.
    let ready = poll(&mut fds, PollTimeout::from(60_000u16)).unwrap();
    assert_eq!(ready, 1, "{what}: the late reply's fd was never closed");
    assert_eq!(nix::unistd::read(read_end, &mut [0; 1]), Ok(0), "{what}");
}

/// Callers whose timeouts pass at each place a call waits — for its reply while another
/// thread reads, for the send lock held by a message waiting for room, for room itself
/// with the reader role held, and in the socket with the role held — each get `TimedOut`,
/// leave no slot behind, pass the role on to the caller still waiting (which gets its own
/// reply), have their late replies dropped with their fds closed, and leave the connection
/// usable.
#[test]
fn callers_timing_out_at_each_stage_leave_the_role_and_the_connection_to_the_others() {
    let (ours, theirs) = crate::Socket::pair().unwrap();
    let a = Connection::new(ours);
    let short = Some(Duration::from_millis(200));
    // A reader without a timeout, and a caller waiting for its reply meanwhile, which
    // gives up.
    let reader = call_on(&a, 1, None);
    let reader_call = next_call(&theirs);
    let waiter = call_on(&a, 2, short);
    let waiter_call = next_call(&theirs);
    assert!(matches!(waiter.join().unwrap(), Err(Error::TimedOut)));
    // A oneway waiting for room holds the send lock; a caller waiting for the lock gives up.
    let filler = {
        let a = a.clone();
        std::thread::spawn(move || a.oneway(&IFACE, 9, &"x".repeat(32 << 20), None))
    };
    wait_until("the filler waits for room", || !writable(&a));
    assert!(matches!(
        call_on(&a, 3, short).join().unwrap(),
        Err(Error::TimedOut)
    ));
    assert!(
        a.shared.state.lock().pending.is_empty(),
        "a slot left behind"
    );
    // The waiter's late reply, read by the reader, is dropped with its fd.
    let late = late_reply_with_fd(&theirs, &waiter_call);
    crate::closer::wait_for_closes();
    assert_write_end_closed(&late, "read by another caller");
    theirs.send(&reply_to(&reader_call, &7u64), &[]).unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), 7);
    // The filler's message through, the peer reads on.
    loop {
        let frame = theirs.recv().unwrap();
        if Envelope::read(&frame.payload).unwrap().cmd == 9 {
            break;
        }
    }
    filler.join().unwrap().unwrap();
    // A reader with a timeout gives up in the socket: the caller waiting behind it reads.
    let reader = call_on(&a, 4, short);
    let reader_call = next_call(&theirs);
    wait_until("the reader reads", || a.shared.state.lock().reading);
    let waiter = call_on(&a, 5, None);
    let waiter_call = next_call(&theirs);
    assert!(matches!(reader.join().unwrap(), Err(Error::TimedOut)));
    let late = late_reply_with_fd(&theirs, &reader_call);
    theirs.send(&reply_to(&waiter_call, &8u64), &[]).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), 8);
    crate::closer::wait_for_closes();
    assert_write_end_closed(&late, "read by the caller the role passed to");
    // Fill the socket (the peer reads nothing), then a caller waits for room, reading
    // meanwhile with nobody else to, and gives up.
    while a
        .oneway(
            &IFACE,
            10,
            &"y".repeat(512),
            Some(Duration::from_millis(20)),
        )
        .is_ok()
    {}
    assert!(matches!(
        call_on(&a, 6, short).join().unwrap(),
        Err(Error::TimedOut)
    ));
    assert!(
        !a.shared.state.lock().reading,
        "the role kept by a caller gone"
    );
    assert!(
        a.shared.state.lock().pending.is_empty(),
        "a slot left behind"
    );
    // The connection goes on: the peer reads what was sent, and answers the next call.
    let last = call_on(&a, 11, None);
    let last_call = next_call(&theirs);
    assert_eq!(Envelope::read(&last_call.payload).unwrap().cmd, 11);
    theirs.send(&reply_to(&last_call, &9u64), &[]).unwrap();
    assert_eq!(last.join().unwrap().unwrap(), 9);
}
