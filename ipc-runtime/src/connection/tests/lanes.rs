//! Placements in the lane, the inbox buffer and fds: messages dropped, refused or timed out
//! give their byte strings back, regions are kept while named, the fd limit is announced.

use super::*;

/// Byte strings written into the peer, in one process (writing its own memory stands in
/// for a parent writing its worker's): a request refused unread leaves the inbox buffer to
/// the next string, and a string taken is acknowledged only once the inbox has a new
/// buffer.
#[test]
fn a_written_request_refused_unread_leaves_the_inbox_buffer_to_the_next() {
    // Written on any machine (a measured choice could take the region).
    crate::peer_memory::set_one_copy(crate::peer_memory::OneCopy::Always);
    let (a, b) = Connection::pair().unwrap();
    b.accept_writes_from_peer().unwrap();
    a.write_into_peer(crate::peer_memory::PeerMemory::of_pid(std::process::id()));
    let (open, server) = serve_gated(&b);
    let ping = || a.call::<_, u32>(&BULK, 2, &(), None).unwrap();
    assert_eq!(ping(), 7); // the announcement and the lane words are in
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    // An interface the server does not serve: refused before anything is decoded.
    assert!(a.call::<_, u32>(&PINGER, 1, &Bytes(&data), None).is_err());
    assert!(!a.lane_is_busy(), "the refusal gave the placement back");
    assert_eq!(
        b.shared.lane.inbox_generation(),
        Some(1),
        "nothing was taken"
    );
    // The next string is written into the same buffer, taken, and echoed back.
    open.send(()).unwrap();
    let Bytes(back) = a
        .call::<_, Bytes<Vec<u8>>>(&BULK, 1, &Bytes(&data), None)
        .unwrap();
    assert_eq!(back, data);
    assert_eq!(
        b.shared.lane.inbox_generation(),
        Some(2),
        "taken, and a new buffer made before the reply acknowledged it"
    );
    assert!(!a.lane_is_busy());
    a.close();
    server.join().unwrap().unwrap();
}

/// An end whose limits allow no fds does not read lanes (its socket would refuse the
/// region's fd), but strings written into its memory need no fd: they are still written,
/// and acknowledged, while the region's sizes go inline.
#[test]
fn strings_are_written_into_an_end_whose_limits_allow_no_fds() {
    // Written on any machine (a measured choice could take the region).
    crate::peer_memory::set_one_copy(crate::peer_memory::OneCopy::Always);
    let (a, mut b) = crate::Socket::pair().unwrap();
    b.set_limits(crate::Limits {
        max_fds: 0,
        ..crate::Limits::default()
    });
    let (a, b) = (Connection::new(a), Connection::new(b));
    b.accept_writes_from_peer().unwrap();
    a.write_into_peer(crate::peer_memory::PeerMemory::of_pid(std::process::id()));
    let (open, server) = serve_gated(&b);
    assert_eq!(a.call::<_, u32>(&BULK, 2, &(), None).unwrap(), 7);
    for (round, len) in [300_000, 2048, 300_000, 64 << 10, 300_000]
        .into_iter()
        .enumerate()
    {
        let data = vec![round as u8; len];
        open.send(()).unwrap();
        let Bytes(back) = a
            .call::<_, Bytes<Vec<u8>>>(&BULK, 1, &Bytes(&data), None)
            .unwrap();
        assert_eq!(back, data);
        assert!(!a.lane_is_busy(), "acknowledged");
    }
    assert_eq!(
        b.shared.lane.inbox_generation(),
        Some(4),
        "each 300,000-byte string was written into the inbox and taken"
    );
    a.close();
    server.join().unwrap().unwrap();
}

/// A reply that went through the lane but whose caller had given up is dropped unread. The
/// caller's end must still tell the peer it is done with that placement, or the peer's lane
/// stays busy, and its byte strings go through the socket, for the rest of the connection.
#[test]
fn a_placed_reply_dropped_unread_gives_the_lane_back() {
    let (a, b) = Connection::pair().unwrap();
    let (open, server) = serve_gated(&b);
    let ping = || a.call::<_, u32>(&BULK, 2, &(), None).unwrap();
    assert_eq!(ping(), 7); // both ends have now seen that the other reads lanes
    let data = vec![0x5a; 8 << 10];
    let gave_up =
        a.call::<_, Bytes<Vec<u8>>>(&BULK, 1, &Bytes(&data), Some(Duration::from_millis(1)));
    assert!(matches!(gave_up, Err(Error::TimedOut)), "{gave_up:?}");
    open.send(()).unwrap(); // now the server replies, through its lane
    // The first ping's reader receives the late reply and drops it; the second ping tells
    // the server so.
    assert_eq!(ping(), 7);
    assert_eq!(ping(), 7);
    assert!(!b.lane_is_busy(), "the server's lane is still busy");
    // And the lane works: a byte string round trip goes through it again.
    open.send(()).unwrap();
    let Bytes(back) = a
        .call::<_, Bytes<Vec<u8>>>(&BULK, 1, &Bytes(&data), None)
        .unwrap();
    assert_eq!(back, data);
    a.close();
    server.join().unwrap().unwrap();
}

#[test]
fn a_placed_request_its_handler_never_decoded_gives_the_lane_back() {
    let (a, server) = skimmed();
    skim_twice(&a);
    a.close();
    server.join().unwrap().unwrap();
}

/// A cancel (envelope kind 7) for a call that is not running, with a body and an fd a
/// hostile peer put in, is dropped whole: the connection goes on. Before wire version 12 the
/// kind was unknown and ended the connection as malformed.
#[test]
fn a_cancel_of_no_call_is_ignored_with_what_it_holds() {
    let (a, b) = Connection::pair().unwrap();
    let (open, serving) = serve_gated(&b);
    let mut cancel = vec![0u8; envelope::LEN];
    Envelope::cancel(77).write(&mut cancel);
    cancel.extend_from_slice(b"a body no cancel has");
    let fd = crate::memfd::new_memfd(8).unwrap();
    a.socket().send(&cancel, &[fd.as_fd()]).unwrap();
    open.send(()).unwrap();
    let Bytes(back): Bytes<Vec<u8>> = a.call(&BULK, 1, &Bytes(vec![1, 2, 3]), None).unwrap();
    assert_eq!(back, [1, 2, 3]);
    drop(a);
    serving.join().unwrap().unwrap();
}

/// A oneway to a peer that has stopped reading fails with `TimedOut` once its timeout has
/// passed, having sent nothing: the byte string it had placed in the lane goes back to it, the
/// connection goes on, and the messages sent before it arrive in order.
#[test]
fn a_oneway_that_cannot_be_sent_in_time_times_out_and_gives_its_placement_back() {
    let (a, b) = Connection::pair().unwrap();
    let (open, gate) = mpsc::channel();
    let noted = std::sync::Arc::new(Mutex::new(Vec::new()));
    let server = {
        let noted = noted.clone();
        std::thread::spawn(move || {
            b.serve(Held {
                gate: Mutex::new(gate),
                noted,
            })
        })
    };
    // The peer's lane word is in: `a` places byte strings of 1 KiB and more in the lane.
    assert_eq!(a.call::<_, u32>(&HELD, 3, &(), None).unwrap(), 7);
    // The peer's only serving thread waits for the gate; nobody reads its socket.
    a.oneway(&HELD, 1, &(), None).unwrap();
    let soon = Some(Duration::from_millis(50));
    let small = vec![0u8; 512]; // under the lane's 1 KiB: through the socket
    let mut sent = 0u64;
    loop {
        match a.oneway(&HELD, 2, &(sent, Bytes(&small)), soon) {
            Ok(()) => sent += 1,
            Err(Error::TimedOut) => break,
            Err(e) => panic!("note {sent}: {e}"),
        }
        assert!(sent < 1 << 20, "the peer's socket never filled");
    }
    assert!(!a.lane_is_busy());
    // A byte string the lane takes: placed while encoding, then the send times out.
    let placed = vec![1u8; 4096];
    let late = a.oneway(&HELD, 2, &(sent, Bytes(&placed)), soon);
    assert!(matches!(late, Err(Error::TimedOut)), "{late:?}");
    assert!(
        !a.lane_is_busy(),
        "the timed-out send gave its placement back"
    );
    assert!(!a.is_closed());
    // Let the peer read again: the next message follows the last one sent.
    open.send(()).unwrap();
    a.oneway(&HELD, 2, &(sent, Bytes(&placed)), None).unwrap();
    wait_until("the peer has run every note", || {
        noted.lock().unwrap().len() as u64 > sent
    });
    let expected: Vec<u64> = (0..=sent).collect();
    assert_eq!(*noted.lock().unwrap(), expected);
    a.close();
    server.join().unwrap().unwrap();
}

/// A oneway too large for one datagram whose timeout passes after its first part went out
/// cannot be taken back: the connection is shut down, and the peer sees a hang-up, never a
/// fragment or a message cut short.
#[test]
fn a_oneway_timing_out_part_way_shuts_the_connection_down_rather_than_send_a_fragment() {
    let (a, b) = Connection::pair().unwrap();
    // `b` reads nothing until the end; 32 MiB do not fit a socket buffer.
    let big = "x".repeat(32 << 20);
    let sent = a.oneway(&IFACE, 1, &big, Some(Duration::from_millis(50)));
    assert!(matches!(sent, Err(Error::TimedOut)), "{sent:?}");
    assert!(
        matches!(b.socket().recv(), Err(Error::Disconnected)),
        "the peer was left part of a message"
    );
    assert!(matches!(
        a.oneway(&IFACE, 1, &7u32, None),
        Err(Error::Disconnected)
    ));
}

/// The attack of the async flavour's
/// `a_region_named_by_a_message_still_going_out_is_not_given_back`, on this flavour: a thread
/// whose message announces the region waits for room, and reads meanwhile, so it is the one
/// that takes in the peer's early acknowledgement of that placement. The message still names
/// the region's fd by its number: given back, the number would go to the next file this
/// process opened, and the message would carry that file. The lane stays busy until the
/// message is out.
#[test]
fn a_region_named_by_a_message_waiting_for_room_is_not_given_back() {
    use crate::shared_region::RegionView;

    let (ours, theirs) = crate::Socket::pair().unwrap();
    let a = Connection::new(ours);
    // A call answered with a lane word that says the peer reads lanes.
    let caller = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u32>(&IFACE, 1, &(), None))
    };
    let mut reply = reply_to(&theirs.recv().unwrap(), &7u32);
    envelope::set_lane(&mut reply, 1 << 23);
    theirs.send(&reply, &[]).unwrap();
    assert_eq!(caller.join().unwrap().unwrap(), 7);
    // Fill the socket (a send that would wait is not sent), then a oneway whose byte string
    // announces the region waits for room.
    let mut unread = 0;
    while a.oneway(&IFACE, 1, &(), Some(Duration::ZERO)).is_ok() {
        unread += 1;
    }
    let sender = {
        let a = a.clone();
        std::thread::spawn(move || a.oneway(&IFACE, 1, &Bytes(&[5u8; 4096][..]), None))
    };
    wait_until("the oneway's string is placed", || a.lane_is_busy());
    // Acknowledges placement 1, which it has not received: the waiting sender reads it, and
    // lets the reader role go once the lane has taken it in (the only message it can read).
    let releases = a.shared.state.lock().releases;
    let mut ack = vec![0u8; envelope::LEN + 16];
    Envelope::announce().write(&mut ack);
    envelope::set_lane(&mut ack, 1 << 23 | 1);
    theirs.send(&ack, &[]).unwrap();
    wait_until("the sender reads the acknowledgement", || {
        a.shared.state.lock().releases != releases
    });
    assert!(a.shared.lane.is_acknowledged(), "acknowledged");
    assert!(a.lane_is_busy(), "busy until its message is out");
    // Asked of the lane: `release_shared_memory` would go on to tell the peer, and wait for
    // the send lock, which the sender holds.
    assert_eq!(
        a.shared.lane.retire_region(),
        None,
        "the region was given back while a message still names its fd"
    );
    // Takes the lowest free number: the region's, had it been closed.
    let unrelated =
        nix::sys::memfd::memfd_create("unrelated", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    for _ in 0..unread {
        theirs.recv().unwrap();
    }
    sender.join().unwrap().unwrap();
    let fd = theirs.recv().unwrap().fds.into_iter().next();
    let fd = fd.expect("the message carries the region");
    assert_eq!(RegionView::from_fd(fd).unwrap().len(), 64 << 10);
    drop(unrelated);
    assert_eq!(a.release_shared_memory(), 64 << 10, "out: given back now");
}

/// A TCP socket whose close waits while its unsent data stays unsent, for up to 10 minutes
/// (`SO_LINGER`), as a hostile peer may send one; and its receiving end, which has read
/// nothing yet: once it has read everything, a close no longer waits.
fn lingering_socket() -> (std::os::fd::OwnedFd, std::net::TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt::Linger};
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (silent, _) = listener.accept().unwrap();
    stream.set_nonblocking(true).unwrap();
    while stream.write(&[0u8; 1 << 16]).is_ok() {}
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 600,
    };
    setsockopt(&stream, Linger, &linger).unwrap();
    (stream.into(), silent)
}

/// Whether this process has an fd open on the socket of inode `inode`.
fn socket_open(inode: u64) -> bool {
    let name = format!("socket:[{inode}]");
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .any(|target| target.as_os_str() == name.as_str())
}

/// The fds of a message nothing takes (here a reply to a call nobody made) are closed with
/// the connection's lock let go. Closing an fd may wait for as long as the peer that sent it
/// likes (a TCP socket with unsent data and `SO_LINGER`, a pipe whose lock it holds): that
/// stalls the thread that read the message, as the guide says, and no other. Before, the
/// lock was held meanwhile, and every other thread of the connection waited for it, callers
/// with a timeout past their timeout.
#[test]
fn fds_nothing_takes_are_closed_without_the_connections_lock() {
    use std::os::fd::AsFd;
    let (ours, theirs) = crate::Socket::pair().unwrap();
    let a = Connection::new(ours);
    let (lingering, silent) = lingering_socket();
    let inode = nix::sys::stat::fstat(lingering.as_fd()).unwrap().st_ino;
    let mut for_nobody = vec![0; envelope::LEN];
    Envelope {
        kind: Kind::Reply,
        cmd: 1,
        cookie: 999,
        interface: IFACE.id,
        signature: IFACE.signature,
    }
    .write(&mut for_nobody);
    codec::encode(&0u64, &mut for_nobody, &mut Vec::new()).unwrap();
    theirs.send(&for_nobody, &[lingering.as_fd()]).unwrap();
    // Sent before anything reads, so that the close that waits is the reader's, not this.
    drop(lingering);
    let reader = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u64>(&IFACE, 1, &(), None))
    };
    let call = theirs.recv().unwrap();
    wait_until("the reader takes the reply for nobody", || !readable(&a));
    wait_until("the reader closes its socket", || !socket_open(inode));
    // The reader waits in `close` until the socket's data is out: for good, here.
    let (done, timed_out) = mpsc::channel();
    let impatient = {
        let a = a.clone();
        std::thread::spawn(move || {
            let called = a.call::<_, u64>(&IFACE, 2, &(), Some(Duration::from_millis(50)));
            let _ = done.send(called);
        })
    };
    let timed_out = timed_out.recv_timeout(Duration::from_secs(30));
    // Its data read, the socket closes. Read rather than dropped: a child another test forks
    // meanwhile may hold a copy of the receiving end, which would keep it open.
    let mut silent = silent;
    std::io::copy(&mut silent, &mut std::io::sink()).unwrap();
    assert!(
        matches!(timed_out, Ok(Err(Error::TimedOut))),
        "a caller with a timeout waited for the close: {timed_out:?}"
    );
    impatient.join().unwrap();
    theirs.send(&reply_to(&call, &42u64), &[]).unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), 42);
}

/// A socket pair whose first end accepts at most two fds a message (so its connection tells
/// its peer the limit) and is full: a socket used before, whose peer has not read what was
/// sent. Returns the pair and how many one-byte datagrams fill it.
fn full_socket_of_an_end_that_accepts_two_fds() -> (crate::Socket, crate::Socket, usize) {
    use nix::sys::socket::{MsgFlags, send};
    use std::os::fd::AsRawFd;

    let (mut ours, theirs) = crate::socket::Socket::pair().unwrap();
    ours.set_limits(crate::frame::Limits {
        max_fds: 2,
        ..Default::default()
    });
    let mut filler = 0;
    while send(ours.as_fd().as_raw_fd(), &[0u8], MsgFlags::MSG_DONTWAIT).is_ok() {
        filler += 1;
    }
    (ours, theirs, filler)
}

/// Reads the `filler` one-byte datagrams off `theirs`, making room in the peer's socket.
fn drain(theirs: &crate::Socket, filler: usize) {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    for _ in 0..filler {
        recv(theirs.as_fd().as_raw_fd(), &mut [0u8; 1], MsgFlags::empty()).unwrap();
    }
}

/// Fails unless `payload` is the announcement of an fd limit of two, saying (first) that
/// its sender reads lanes.
fn assert_announces_two_fds(payload: &[u8]) {
    assert_eq!(payload[0], Kind::Announce as u8, "not the announcement");
    assert_eq!(envelope::announcement(payload).unwrap(), (2, 2));
    let word = envelope::lane(payload);
    assert_ne!(word & super::lane::READS_LANES, 0, "{word:#x}");
}

/// An end whose fd limit cannot be told at once (its socket full as the connection starts:
/// one used before, whose peer does not read) does not wait to tell it: `Connection::new`
/// returns. It tells it before the next message it sends once there is room, and says that
/// it reads lanes from the announcement on: however many threads send, nothing that says
/// so reaches the peer first. Before, the end never told it, and its peer sent it every
/// large byte string inline for the connection's life.
#[test]
fn an_end_whose_socket_is_full_as_it_starts_tells_its_fd_limit_before_its_next_message() {
    const THREADS: usize = 4;
    const EACH: usize = 8;
    let (ours, theirs, filler) = full_socket_of_an_end_that_accepts_two_fds();
    let (made, started) = mpsc::channel();
    std::thread::spawn(move || made.send(Connection::new(ours)).unwrap());
    // A hang guard, not a timing: `new` waited for room before, for good.
    let a = started
        .recv_timeout(Duration::from_secs(60))
        .expect("Connection::new waited for room to tell its fd limit");
    drain(&theirs, filler);
    let senders: Vec<_> = (0..THREADS)
        .map(|_| {
            let a = a.clone();
            std::thread::spawn(move || {
                for _ in 0..EACH {
                    a.oneway(&IFACE, 1, &(), None).unwrap();
                }
            })
        })
        .collect();
    assert_announces_two_fds(&theirs.recv().unwrap().payload);
    for n in 0..THREADS * EACH {
        let message = theirs.recv().unwrap();
        assert_eq!(message.payload[0], Kind::Oneway as u8, "message {n}");
        let word = envelope::lane(&message.payload);
        assert_ne!(word & super::lane::READS_LANES, 0, "message {n}: {word:#x}");
    }
    for sender in senders {
        sender.join().unwrap();
    }
}

/// A message whose send starts while the socket is still full carries no announcement
/// before it, and goes out once there is room without saying that its end reads lanes (the
/// retry found no room, and did not wait for it); the next message brings the announcement.
#[test]
fn a_message_stamped_while_the_socket_is_full_leaves_the_announcement_to_the_next() {
    let (ours, theirs, filler) = full_socket_of_an_end_that_accepts_two_fds();
    let a = Connection::new(ours);
    let waiting = {
        let a = a.clone();
        std::thread::spawn(move || a.oneway(&IFACE, 1, &(), None))
    };
    wait_until("the oneway waits for room", || {
        a.socket().send_stalled_for(Instant::now()).is_some()
    });
    drain(&theirs, filler);
    waiting.join().unwrap().unwrap();
    let first = theirs.recv().unwrap();
    assert_eq!(
        first.payload[0],
        Kind::Oneway as u8,
        "the waiting oneway first"
    );
    let word = envelope::lane(&first.payload);
    assert_eq!(
        word & super::lane::READS_LANES,
        0,
        "says it reads lanes: {word:#x}"
    );
    a.oneway(&IFACE, 2, &(), None).unwrap();
    assert_announces_two_fds(&theirs.recv().unwrap().payload);
    let next = theirs.recv().unwrap();
    assert_eq!(next.payload[0], Kind::Oneway as u8);
    assert_ne!(envelope::lane(&next.payload) & super::lane::READS_LANES, 0);
}
