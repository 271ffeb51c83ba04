//! The transport against a peer that breaks the framing on purpose: each case is followed by
//! a good message, which must arrive (the stream in sync), and every fd the broken datagrams
//! carried must be closed. Every test takes `fd_count_lock`.

mod common;

use std::os::fd::{AsFd, AsRawFd, RawFd};

use common::*;
use ipc_runtime::wire::{FIRST_MAX, Header, Kind};
use ipc_runtime::{Error, Limits, Socket};
use nix::sys::socket::{ControlMessage, MsgFlags, UnixCredentials, sendmsg};

/// Sends one datagram as given, header and all, with `fds` and perhaps credentials.
fn raw(s: &Socket, header: &[u8], body: &[u8], fds: &[RawFd], creds: bool) {
    let iov = [std::io::IoSlice::new(header), std::io::IoSlice::new(body)];
    let ucred = UnixCredentials::new();
    let mut cmsgs = Vec::new();
    if creds {
        cmsgs.push(ControlMessage::ScmCredentials(&ucred));
    }
    if !fds.is_empty() {
        cmsgs.push(ControlMessage::ScmRights(fds));
    }
    sendmsg::<()>(s.as_fd().as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None).unwrap();
}

fn header(kind: Kind, fds: u16, total_len: u32, total_fds: u32) -> [u8; 16] {
    Header {
        kind,
        fds,
        total_len,
        total_fds,
    }
    .encode()
}

fn malformed(got: ipc_runtime::Result<ipc_runtime::Frame>, says: &str) {
    match got {
        Err(Error::Malformed(why)) => assert!(why.contains(says), "{why}"),
        other => panic!("expected Malformed ({says}), got {other:?}"),
    }
}

#[test]
fn a_message_announced_then_abandoned_by_a_peer_that_hangs_up_closes_its_fds() {
    let _fds = fd_count_lock();
    let (a, mut b) = Socket::pair().unwrap();
    b.set_limits(Limits {
        max_message_len: 64 << 20,
        ..Default::default()
    });
    let (read_end, write_end) = pipe();
    let w = write_end.as_raw_fd();
    raw(&a, &header(Kind::First, 1, 64 << 20, 2), &[], &[w], false);
    raw(
        &a,
        &header(Kind::More, 0, 64 << 20, 2),
        &[7; 1000],
        &[],
        false,
    );
    drop(write_end);
    assert!(b.try_recv().unwrap().is_none(), "the rest is to come");
    drop(a);
    assert!(matches!(b.recv(), Err(Error::Disconnected)));
    assert!(all_closed(&read_end));
}

#[test]
fn a_message_interrupted_by_another_is_malformed_and_the_rest_is_skipped() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    let (read_end, write_end) = pipe();
    let w = write_end.as_raw_fd();
    raw(&a, &header(Kind::First, 1, 200, 1), &[1; 100], &[w], false);
    raw(&a, &header(Kind::First, 1, 5, 1), b"hello", &[w], false);
    raw(&a, &header(Kind::More, 0, 200, 1), &[2; 100], &[], false);
    raw(&a, &header(Kind::More, 1, 5, 1), &[], &[w], false);
    drop(write_end);
    a.send(b"next", &[]).unwrap();
    malformed(b.recv(), "interrupted");
    assert_eq!(b.recv().unwrap().payload, b"next");
    assert!(all_closed(&read_end));
}

#[test]
fn datagrams_past_the_announced_end_are_malformed_and_their_fds_closed() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    let (read_end, write_end) = pipe();
    let w = write_end.as_raw_fd();
    raw(&a, &header(Kind::First, 0, 10, 0), &[1; 5], &[], false);
    raw(&a, &header(Kind::More, 0, 10, 0), &[2; 5], &[], false);
    raw(&a, &header(Kind::More, 1, 10, 0), &[3; 5], &[w], false);
    drop(write_end);
    a.send(b"next", &[]).unwrap();
    assert_eq!(b.recv().unwrap().payload, [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
    malformed(b.recv(), "continuation");
    assert_eq!(b.recv().unwrap().payload, b"next");
    assert!(all_closed(&read_end));
}

#[test]
fn fds_on_a_continuation_arrive_if_announced_and_are_closed_if_not() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    let (read_end, write_end) = pipe();
    let w = write_end.as_raw_fd();
    raw(&a, &header(Kind::First, 0, 4, 2), b"ab", &[], false);
    raw(&a, &header(Kind::More, 2, 4, 2), b"cd", &[w, w], false);
    let frame = b.recv().unwrap();
    assert_eq!(
        (frame.payload.as_slice(), frame.fds.len()),
        (&b"abcd"[..], 2)
    );
    drop(frame);
    // Unannounced, on the last part, and one fd more than the message announced.
    raw(&a, &header(Kind::First, 0, 4, 0), b"ab", &[], false);
    raw(&a, &header(Kind::More, 0, 4, 0), b"cd", &[w], false);
    raw(&a, &header(Kind::First, 1, 4, 1), b"ab", &[w], false);
    raw(&a, &header(Kind::More, 1, 4, 1), b"cd", &[w], false);
    drop(write_end);
    a.send(b"next", &[]).unwrap();
    malformed(b.recv(), "announces 0 fds, 1 arrived");
    malformed(b.recv(), "sent more");
    assert_eq!(b.recv().unwrap().payload, b"next");
    assert!(all_closed(&read_end));
}

#[test]
fn fds_on_a_datagram_too_short_for_a_header_are_closed() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    let (read_end, write_end) = pipe();
    let w = write_end.as_raw_fd();
    raw(&a, b"TI", &[], &[w, w], false);
    raw(&a, &[], &[], &[w], false);
    drop(write_end);
    a.send(b"next", &[]).unwrap();
    malformed(b.recv(), "no complete header");
    malformed(b.recv(), "no bytes");
    assert_eq!(b.recv().unwrap().payload, b"next");
    assert!(all_closed(&read_end));
}

#[test]
fn credentials_a_peer_attaches_are_not_taken_for_fds() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    let (read_end, write_end) = pipe();
    let w = write_end.as_raw_fd();
    raw(&a, &header(Kind::First, 1, 3, 1), b"abc", &[w], true);
    raw(&a, &header(Kind::First, 0, 3, 0), b"def", &[], true);
    drop(write_end);
    let frame = b.recv().unwrap();
    assert_eq!(
        (frame.payload.as_slice(), frame.fds.len()),
        (&b"abc"[..], 1)
    );
    drop(frame);
    let frame = b.recv().unwrap();
    assert_eq!(
        (frame.payload.as_slice(), frame.fds.len()),
        (&b"def"[..], 0)
    );
    assert!(all_closed(&read_end));
}

/// A first datagram that is taken but fails (too large, or with fds its header does not
/// announce) fails its message: the continuations that follow are dropped with it, as those
/// of a message that failed part-way are, not reported one by one as continuations of no
/// message. Both through a receive that waits and one that never does (an event loop's,
/// the async flavour's).
#[test]
fn a_first_datagram_that_fails_takes_its_continuations_with_it() {
    let _fds = fd_count_lock();
    for waits in [true, false] {
        let (a, b) = Socket::pair().unwrap();
        let (read_end, write_end) = pipe();
        let w = write_end.as_raw_fd();
        let total = (FIRST_MAX + 1000) as u32;
        let big = vec![1; FIRST_MAX + 500];
        raw(&a, &header(Kind::First, 1, total, 2), &big, &[w], false);
        raw(&a, &header(Kind::More, 1, total, 2), &[2; 500], &[w], false);
        raw(&a, &header(Kind::First, 0, 10, 1), &[3; 5], &[w], false);
        raw(&a, &header(Kind::More, 1, 10, 1), &[4; 5], &[w], false);
        drop(write_end);
        a.send(b"next", &[]).unwrap();
        let recv = || match waits {
            true => b.recv(),
            false => b.try_recv().map(|f| f.expect("all of it is queued")),
        };
        assert!(matches!(recv(), Err(Error::Truncated)), "waits: {waits}");
        malformed(recv(), "announces 0 fds, 1 arrived");
        assert_eq!(recv().unwrap().payload, b"next", "waits: {waits}");
        assert!(all_closed(&read_end));
    }
}

#[test]
fn a_refused_message_interrupted_by_another_is_reported_and_the_other_read() {
    let _fds = fd_count_lock();
    let (a, mut b) = Socket::pair().unwrap();
    b.set_limits(Limits {
        max_message_len: 100,
        ..Default::default()
    });
    let (read_end, write_end) = pipe();
    let w = write_end.as_raw_fd();
    raw(&a, &header(Kind::First, 1, 200, 1), &[1; 100], &[w], false);
    drop(write_end);
    a.send(b"next", &[]).unwrap();
    let mut frame = ipc_runtime::Frame::default();
    assert!(matches!(
        b.recv_into(&mut frame, None),
        Err(Error::TooLarge { size: 200, .. })
    ));
    assert!(frame.payload.is_empty() && frame.fds.is_empty());
    assert_eq!(b.recv().unwrap().payload, b"next");
    assert!(all_closed(&read_end));
}

/// A send whose deadline passes with part of its message out hangs up rather than leave the
/// peer holding a fragment that the next message would be read into: the peer, which got
/// the fragment (and its fd), sees the hang-up and closes the fd; the sender's later sends
/// fail as sends to a peer gone.
#[test]
fn a_send_timed_out_part_way_hangs_up_and_the_peer_closes_the_fragments_fds() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    let (read_end, write_end) = pipe();
    let big = vec![5u8; 64 << 20];
    let sent = a.send_timeout(&big, &[write_end.as_fd()], std::time::Duration::ZERO);
    drop(write_end);
    assert!(matches!(sent, Err(Error::TimedOut)), "{sent:?}");
    assert!(matches!(b.recv(), Err(Error::Disconnected)));
    assert!(all_closed(&read_end));
    assert!(matches!(a.send(b"after", &[]), Err(Error::Disconnected)));
}
