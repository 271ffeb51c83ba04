//! Sequence numbers: a new placement never takes the number the peer last acknowledged.

use super::*;

#[test]
fn a_new_placement_never_takes_the_number_the_peer_last_acknowledged() {
    let peer_done = AtomicU32::new(0);
    let mut out = Outgoing::default();
    assert_eq!(out.start(&peer_done) & SEQ_MASK, 1);
    // The peer still reports 5 as done with (say 2,046 placements since were never
    // sent): 5 is skipped, or that old acknowledgement would release the new one.
    out.last_seq = 4;
    peer_done.store(5, Ordering::Relaxed);
    assert_eq!(out.start(&peer_done) & SEQ_MASK, 6);
    // Also where the numbers wrap.
    out.last_seq = SEQ_MASK;
    peer_done.store(1, Ordering::Relaxed);
    assert_eq!(out.start(&peer_done) & SEQ_MASK, 2);
}

/// A write into the peer that stalls (a hostile worker can make it wait as long as it likes,
/// with a buffer served by a user-space filesystem; here a `userfaultfd` nobody answers, which
/// needs privilege: skipped without it) holds the outgoing side. A call whose failure reply
/// arrived after its placement was acknowledged must not wait for that write: only the
/// writing thread waits.
#[test]
fn a_stalled_write_into_the_peer_holds_up_no_other_call() {
    use crate::codec::{OutOfLine, Placement};
    use crate::peer_memory::{OneCopy, PeerMemory, set_one_copy};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    const LEN: usize = 1 << 20;
    // SAFETY: userfaultfd takes flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        eprintln!(
            "skipped: no userfaultfd ({})",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: a new fd that nothing else owns.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = [0xAAu64, 0, 0]; // struct uffdio_api { api, features, ioctls }
    // SAFETY: UFFDIO_API reads and writes the 24-byte struct, which is ours.
    assert_eq!(
        unsafe { libc::ioctl(uffd.as_raw_fd(), 0xc018_aa3f, api.as_mut_ptr()) },
        0
    );
    // SAFETY: a fresh private anonymous mapping, unmapped never (leaked: the test ends).
    let target = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(target, libc::MAP_FAILED);
    // struct uffdio_register { start, len, mode (MISSING), ioctls }
    let mut register = [target as u64, LEN as u64, 1, 0];
    // SAFETY: UFFDIO_REGISTER reads and writes the 32-byte struct, which is ours.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), 0xc020_aa00, register.as_mut_ptr()) };
    if r != 0 {
        eprintln!(
            "skipped: UFFDIO_REGISTER ({})",
            std::io::Error::last_os_error()
        );
        return;
    }

    set_one_copy(OneCopy::Always);
    let lane = Arc::new(Lane::new(MAX, usize::MAX));
    lane.on_word(READS_LANES, &[]);
    // The peer's mailbox (this process stands in for the peer): its buffer is the mapping.
    let token = 0x5eed_u64 | 1;
    let mailbox: &'static [AtomicU64; 5] = Box::leak(Box::new([
        AtomicU64::new(token),
        AtomicU64::new(1),
        AtomicU64::new(target as u64),
        AtomicU64::new(LEN as u64),
        AtomicU64::new(0),
    ]));
    lane.on_announce(mailbox.as_ptr() as u64, token);
    lane.write_into_peer(PeerMemory::of_pid(std::process::id()));

    // A call places a string in the region; the peer acknowledges it (read).
    let Some(Placement::Region(placed, _)) = lane.put(&[1u8; 4096]) else {
        panic!("placed in the region");
    };
    lane.sent(placed.seq); // its message is out
    lane.on_word(READS_LANES | placed.seq, &[]);
    assert!(!lane.is_busy());
    // Another call writes a string into the peer, and the write stalls.
    let writer = {
        let lane = Arc::clone(&lane);
        std::thread::spawn(move || lane.put(&vec![2u8; 256 << 10]).is_some())
    };
    let mut fault = [0u8; 32];
    // SAFETY: reads one 32-byte uffd_msg into `fault`, ours: the writer has faulted.
    let n = unsafe { libc::read(uffd.as_raw_fd(), fault.as_mut_ptr().cast(), fault.len()) };
    assert_eq!(n, 32);
    // The first call's failure reply arrives (its lane word acknowledged the placement).
    let failure = failure_reply();
    let (tx, rx) = std::sync::mpsc::channel();
    let caller = {
        let lane = Arc::clone(&lane);
        std::thread::spawn(move || {
            lane.after_reply(placed.seq, &failure);
            let _ = tx.send(());
        })
    };
    // Only a bound on a hang: a caller that waits for the write never returns by itself.
    let returned = rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok();
    drop(uffd); // the fault is served the ordinary way: the write completes
    assert!(writer.join().unwrap(), "the write went through in the end");
    caller.join().unwrap();
    assert!(
        returned,
        "a call whose reply arrived waited for another call's write into the peer"
    );
}

/// `a` places `bytes` in its region for `b`, which takes nothing yet, and its message is out:
/// the placement, with a copy of the region's fd if its message announces it.
#[cfg(test)]
fn place(a: &Lane, bytes: &[u8]) -> (crate::codec::Placed, Option<std::os::fd::OwnedFd>) {
    use crate::codec::{OutOfLine, Placement};
    use std::os::fd::BorrowedFd;
    let Some(Placement::Region(placed, fd)) = a.put(bytes) else {
        panic!("placed in the region");
    };
    a.sent(placed.seq); // its message is out
    // SAFETY: the region's fd, open while `a` keeps its region (the whole test).
    let fd = fd.map(|fd| {
        unsafe { BorrowedFd::borrow_raw(fd) }
            .try_clone_to_owned()
            .unwrap()
    });
    (placed, fd)
}

/// `a` and `b`, and `a`'s placements taken by `b` and acknowledged until the next one
/// takes the sequence number of `first`, which `b` took.
#[cfg(test)]
fn a_lap_of_placements() -> (Lane, Lane, u32, Vec<u8>) {
    use crate::codec::OutOfLine;
    let (a, b) = (Lane::new(MAX, usize::MAX), Lane::new(MAX, usize::MAX));
    a.on_word(READS_LANES, &[]);
    let first = vec![1u8; 4096];
    let (placed, fd) = place(&a, &first);
    b.on_message(&mut carrying(placed.seq));
    assert_eq!(b.take(&placed, Ok(fd)).unwrap(), first);
    a.on_word(b.word(0), &[]);
    for _ in 0..SEQ_MASK - 1 {
        let (p, fd) = place(&a, &first);
        b.on_message(&mut carrying(p.seq));
        b.take(&p, Ok(fd)).unwrap();
        a.on_word(b.word(0), &[]);
    }
    (a, b, placed.seq, first)
}

/// A failure reply to a call whose placement the peer read arrives a lap of sequence numbers
/// later (2,047 placements, by other calls): it must not give back the placement in flight
/// under the same number, which the peer has yet to copy out.
#[test]
fn a_failure_reply_a_lap_later_does_not_give_back_the_placement_of_its_number() {
    use crate::codec::OutOfLine;
    let (a, b, old, _) = a_lap_of_placements();
    let new = vec![2u8; 4096];
    let (placed, _) = place(&a, &new);
    assert_eq!(placed.seq, old, "a lap later");
    let failure = failure_reply();
    a.after_reply(old, &failure); // the old call's failure
    let _ = a.put(&[3u8; 4096]); // the next string, if the lane were idle
    b.on_message(&mut carrying(placed.seq));
    assert!(
        b.take(&placed, Ok(None)).unwrap() == new,
        "the bytes placed were overwritten"
    );
}

/// A request's handler outlives a lap of sequence numbers (2,047 placements, by other
/// calls); when it ends, the placement in flight has the number its request carried. Its
/// end must not give that new placement back as unread: the peer would overwrite it while
/// this end has yet to copy it out. The same message finished before anything else came in
/// does give its placement back.
#[test]
fn a_message_finished_a_lap_later_does_not_give_back_the_placement_of_its_number() {
    use crate::codec::OutOfLine;
    let (a, b, old, _) = a_lap_of_placements();
    // The old request, whose string `b` read, taken in by `b`'s reader before the lap.
    let mut request = carrying(old);
    b.on_message(&mut request);
    let new = vec![2u8; 4096];
    let (placed, _) = place(&a, &new);
    assert_eq!(placed.seq, old, "a lap later");
    let mut newer_request = carrying(placed.seq);
    b.on_message(&mut newer_request);
    b.finished(&request); // the old handler ends
    a.on_word(b.word(0), &[]);
    let _ = a.put(&[3u8; 4096]); // the next string, if the lane were idle
    assert!(
        b.take(&placed, Ok(None)).unwrap() == new,
        "the bytes placed were overwritten"
    );
    b.finished(&newer_request);
    a.on_word(b.word(0), &[]);
    assert!(!a.is_busy(), "the placement read was acknowledged");
    // A request refused unread (say), finished before anything else came in: its end gives
    // its placement back.
    let (refused, _) = place(&a, &[4u8; 4096]);
    let mut refused_request = carrying(refused.seq);
    b.on_message(&mut refused_request);
    b.finished(&refused_request);
    assert_eq!(b.word(0) & (SEQ_MASK | UNREAD), refused.seq | UNREAD);
    a.on_word(b.word(0), &[]);
    assert!(!a.is_busy(), "the placement finished unread was given back");
}

/// A failure reply's frame (envelope only), as a call of interface 1 would receive it.
fn failure_reply() -> crate::frame::Frame {
    let mut payload = vec![0; envelope::LEN];
    Envelope {
        kind: Kind::Failure,
        cmd: 1,
        cookie: 1,
        interface: 1,
        signature: 0,
    }
    .write(&mut payload);
    crate::frame::Frame {
        payload,
        fds: Vec::new(),
    }
}

/// A message's payload (envelope only) whose lane word carries the peer's placement `seq`.
fn carrying(seq: u32) -> Vec<u8> {
    let mut payload = vec![0u8; envelope::LEN];
    envelope::set_lane(&mut payload, READS_LANES | seq << SEQ_BITS);
    payload
}

/// A byte string out of the socket over the lane's limit is refused as over the limits (the
/// decode then fails as `TooLarge`), whichever way it came: the peer's region, its pipe, or
/// this process's inbox. Checked before anything is read or allocated.
#[test]
fn a_byte_string_over_the_limit_is_refused_as_over_it_whichever_way_it_came() {
    use crate::codec::{NO_FD, OutOfLine, Piped, Unfetched, Written};
    let lane = Lane::new(1500, usize::MAX);
    let over = |got: Result<Vec<u8>, Unfetched>| match got {
        Err(Unfetched::OverLimit { len, limit }) => (len, limit),
        other => panic!("expected OverLimit, got {other:?}"),
    };
    // The peer's region, announced with this string, whose limits allow more.
    let peer = Lane::new(MAX, usize::MAX);
    peer.on_word(READS_LANES, &[]);
    let (placed, fd) = place(&peer, &[7; 2000]);
    assert!(fd.is_some(), "the message announces the region");
    assert_eq!(over(lane.take(&placed, Ok(fd))), (2000, 1500));
    // A pipe, announced with this string (read only from a peer this end trusts with pipes):
    // its bytes and the tail inline count together.
    let _ = lane.lend_pages(true);
    let (read, _write) = nix::unistd::pipe().unwrap();
    let piped = Piped {
        seq: 2,
        fd: NO_FD,
        len: 1400,
    };
    assert_eq!(
        over(lane.take_piped(&piped, Ok(Some(read)), &[0; 101])),
        (1501, 1500)
    );
    let written = Written {
        seq: 3,
        generation: 1,
        len: 5000,
    };
    assert_eq!(over(lane.take_written(&written)), (5000, 1500));
}

/// Under limits above the lane's own cap ([`MAX`]), a byte string out of the socket over
/// the cap but within the limits is malformed (no sender of ours places one: it goes inline),
/// not over `Limits::max_message_len`, whichever way it came; one over the limits is over
/// them, and says so with the limit set, not the cap.
#[test]
fn a_byte_string_over_the_lanes_cap_but_within_the_limit_is_malformed() {
    use crate::codec::{NO_FD, OutOfLine, Piped, Placed, Unfetched, Written};
    let limit = 2 * MAX;
    let lane = Lane::new(limit, usize::MAX);
    let _ = lane.lend_pages(true);
    let bad = |got: Result<Vec<u8>, Unfetched>, what: &str| match got {
        Err(Unfetched::Bad(why)) => {
            let want = format!("{what} of {} bytes, over the lane's 32 MiB", MAX + 1);
            assert!(why.contains(&want), "{want:?} not in {why:?}");
        }
        other => panic!("expected Bad for {what}, got {other:?}"),
    };
    let over = |got: Result<Vec<u8>, Unfetched>| match got {
        Err(Unfetched::OverLimit { len, limit }) => (len, limit),
        other => panic!("expected OverLimit, got {other:?}"),
    };
    let placed = |len: usize| Placed {
        seq: 1,
        fd: NO_FD,
        offset: 0,
        len: len as u64,
    };
    bad(
        lane.take(&placed(MAX + 1), Ok(None)),
        "a placed byte string",
    );
    let over_limit = (limit as u64 + 1, limit as u64);
    assert_eq!(over(lane.take(&placed(limit + 1), Ok(None))), over_limit);
    // A pipe: its bytes and the tail inline count together.
    let (read, _write) = nix::unistd::pipe().unwrap();
    let piped = Piped {
        seq: 2,
        fd: NO_FD,
        len: 1000,
    };
    let tail = vec![0; MAX + 1 - 1000];
    bad(
        lane.take_piped(&piped, Ok(Some(read)), &tail),
        "a piped byte string",
    );
    let tail = vec![0; limit + 1 - 1000];
    assert_eq!(over(lane.take_piped(&piped, Ok(None), &tail)), over_limit);
    let written = |len: usize| Written {
        seq: 3,
        generation: 1,
        len: len as u64,
    };
    bad(
        lane.take_written(&written(MAX + 1)),
        "a byte string written into this process",
    );
    assert_eq!(over(lane.take_written(&written(limit + 1))), over_limit);
}

/// The sizing rule alone, on a clock of the test's: a region grows at once, and shrinks to
/// fit the strings it held only once none of more than a quarter of its size came for
/// [`SHRINK_AFTER`].
#[test]
fn a_region_shrinks_to_its_strings_only_after_the_period_without_a_large_one() {
    use outgoing::SHRINK_AFTER;
    let t0 = std::time::Instant::now();
    let at = |s: u64| move || t0 + std::time::Duration::from_secs(s);
    let mut out = Outgoing::default();
    assert_eq!(
        out.resize(10, 0, at(0)),
        Some(MIN_REGION),
        "none yet: the smallest"
    );
    assert_eq!(
        out.resize(3 << 20, 1 << 20, at(0)),
        Some(4 << 20),
        "too small: grown"
    );
    assert_eq!(out.resize(MAX, MAX, at(0)), None, "it fits");
    assert_eq!(
        out.resize(1000, MIN_REGION, at(100)),
        None,
        "the smallest never shrinks"
    );
    // A 16 MiB region that held a 5 MiB string (over a quarter of it) at 0 s.
    let region = 16 << 20;
    assert_eq!(out.resize(5 << 20, region, at(0)), None);
    assert_eq!(out.resize(100 << 10, region, at(3)), None, "too soon");
    let later = SHRINK_AFTER.as_secs();
    assert_eq!(
        out.resize(2000, region, at(later - 1)),
        None,
        "still too soon"
    );
    assert_eq!(
        out.resize(2000, region, at(later)),
        Some(128 << 10),
        "shrunk to fit the largest string since (100 KiB), not the last"
    );
    // A new region starts a period of its own (`region_for`): here a new `Outgoing`. A string
    // of over a quarter starts the period again, one of a quarter does not.
    let mut out = Outgoing::default();
    assert_eq!(out.resize(5 << 20, region, at(0)), None);
    assert_eq!(out.resize((4 << 20) + 1, region, at(later - 1)), None);
    assert_eq!(
        out.resize(1000, region, at(later)),
        None,
        "too soon after it"
    );
    assert_eq!(
        out.resize(4 << 20, region, at(2 * later - 1)),
        Some(4 << 20),
        "a quarter is small"
    );
}

/// Across two lanes: a region that held no large string for the period is replaced by a
/// smaller one at the next placement, announced anew, and the peer maps that one instead.
#[test]
fn a_region_replaced_by_a_smaller_one_is_announced_and_mapped_instead() {
    use crate::codec::OutOfLine;
    let (a, b) = (Lane::new(MAX, usize::MAX), Lane::new(MAX, usize::MAX));
    a.on_word(READS_LANES, &[]);
    let exchange = |len: usize| {
        let bytes = vec![len as u8; len];
        let (placed, fd) = place(&a, &bytes);
        let announced = fd.is_some();
        assert!(b.take(&placed, Ok(fd)).unwrap() == bytes);
        a.on_word(b.word(0), &[]);
        announced
    };
    let mapped = || b.incoming.lock().as_ref().map(RegionView::len);
    assert!(exchange(4 << 20), "the first string announces the region");
    assert!(!exchange(4096), "then it is reused");
    assert_eq!(mapped(), Some(4 << 20));
    a.out.lock().age(outgoing::SHRINK_AFTER);
    assert!(exchange(8192), "a new region, announced");
    assert_eq!(
        a.out.lock().region.as_ref().map(|r| r.len()),
        Some(MIN_REGION)
    );
    assert_eq!(mapped(), Some(MIN_REGION), "the peer maps the new one only");
    assert!(exchange(1 << 20), "grown again when needed");
    assert_eq!(mapped(), Some(1 << 20));
}

/// A region given back is unmapped by the peer too, if it is the one the peer maps; an
/// announcement that comes after a newer region's (the async flavour may send it late)
/// leaves the newer one mapped. A busy lane keeps its region.
#[test]
fn a_retired_region_is_unmapped_by_the_peer_if_it_is_the_one_mapped() {
    use crate::codec::OutOfLine;
    let (a, b) = (Lane::new(MAX, usize::MAX), Lane::new(MAX, usize::MAX));
    a.on_word(READS_LANES, &[]);
    assert_eq!(a.retire_region(), None, "no region yet");
    let bytes = vec![7u8; 1 << 20];
    let (placed, fd) = place(&a, &bytes);
    assert_eq!(a.retire_region(), None, "a string in flight keeps it");
    b.take(&placed, Ok(fd)).unwrap();
    a.on_word(b.word(0), &[]);
    let Retired {
        len, announcement, ..
    } = a.retire_region().expect("idle: given back");
    assert_eq!(len, 1 << 20);
    let (mailbox, inode) = announcement.expect("the peer had it");
    assert_eq!(a.retire_region(), None, "given back once");
    b.on_announce(mailbox, inode);
    assert!(b.incoming.lock().is_none(), "the peer unmapped it");

    // Late: after the next region was announced and taken.
    let (placed, fd) = place(&a, &bytes);
    assert!(fd.is_some(), "a new region, announced anew");
    let newer = a.retire_region().and_then(|r| r.announcement);
    assert!(newer.is_none(), "busy: kept");
    b.take(&placed, Ok(fd)).unwrap();
    a.on_word(b.word(0), &[]);
    b.on_announce(mailbox, inode);
    assert_eq!(
        b.incoming.lock().as_ref().map(RegionView::len),
        Some(1 << 20)
    );
}

/// The peer reads a placement and acknowledges it before the sending thread is back from its
/// send (a fast peer, or a scheduler that stops the sender): the acknowledgement still
/// counts once the send is over. The lane is idle then, and the region its message
/// announced is the one the peer maps, which giving it back tells the peer to unmap.
#[test]
fn an_acknowledgement_that_comes_before_the_send_is_over_counts_once_it_is() {
    use crate::codec::{OutOfLine, Placement};
    use std::os::fd::BorrowedFd;
    let (a, b) = (Lane::new(MAX, usize::MAX), Lane::new(MAX, usize::MAX));
    a.on_word(READS_LANES, &[]);
    let Some(Placement::Region(placed, Some(fd))) = a.put(&[7u8; 4096]) else {
        panic!("placed in the region, announced");
    };
    // SAFETY: the region's fd, open while `a` keeps its region (until `retire_region`).
    let fd = unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .unwrap();
    assert_eq!(b.take(&placed, Ok(Some(fd))).unwrap(), [7u8; 4096]);
    a.on_word(b.word(0), &[]); // the acknowledgement, before `sent`
    assert!(a.is_busy(), "its message may still name the region's fd");
    a.sent(placed.seq);
    assert!(!a.is_busy(), "acknowledged and sent: idle");
    let retired = a.retire_region().expect("idle: given back");
    assert_eq!(retired.len, 64 << 10);
    assert!(
        retired.announcement.is_some(),
        "the peer maps the region its message announced"
    );
}

/// Two announcements of whether this end reads pipes that reach the peer in the other order
/// (two threads of the blocking flavour each sending its own, or the async flavour's task
/// overtaken): the peer keeps the later change, not the later arrival.
#[test]
fn the_peer_keeps_the_latest_word_on_pipes_whatever_order_it_comes_in() {
    let (a, b) = (Lane::new(MAX, usize::MAX), Lane::new(MAX, usize::MAX));
    let on = a.lend_pages(true).expect("a change");
    let off = a.lend_pages(false).expect("a change");
    assert_eq!(a.lend_pages(false), None, "no change, no announcement");
    b.on_announce(off.0, off.1);
    b.on_announce(on.0, on.1);
    assert!(
        !b.peer_takes_pipes(),
        "the older word was taken over the newer"
    );
    let again = a.lend_pages(true).expect("a change");
    b.on_announce(again.0, again.1);
    assert!(b.peer_takes_pipes());
}

/// A region replaced by a smaller one whose announcing message the peer never read (a reply
/// to a caller that gave up, a request refused unread): the peer still maps the old region,
/// which this end no longer has. Giving the region back must tell the peer to unmap that one.
#[test]
fn a_region_given_back_after_its_announcement_went_unread_is_unmapped_by_the_peer_too() {
    use crate::codec::OutOfLine;
    let (a, b) = (Lane::new(MAX, usize::MAX), Lane::new(MAX, usize::MAX));
    a.on_word(READS_LANES, &[]);
    let (placed, fd) = place(&a, &vec![1u8; 1 << 20]);
    b.take(&placed, Ok(fd)).unwrap();
    a.on_word(b.word(0), &[]);
    a.out.lock().age(outgoing::SHRINK_AFTER);
    let (placed, fd) = place(&a, &[2u8; 4096]);
    assert!(fd.is_some(), "a new, smaller region, announced");
    // The message carrying it is done with unread: its fd closed unread.
    let mut message = carrying(placed.seq);
    b.on_message(&mut message);
    drop(fd);
    b.finished(&message);
    a.on_word(b.word(0), &[]);
    assert!(!a.is_busy(), "given back unread");
    assert_eq!(
        b.incoming.lock().as_ref().map(RegionView::len),
        Some(1 << 20)
    );
    let Retired {
        len, announcement, ..
    } = a.retire_region().expect("idle: given back");
    assert_eq!(len, MIN_REGION);
    if let Some((mailbox, token)) = announcement {
        b.on_announce(mailbox, token);
    }
    assert!(
        b.incoming.lock().is_none(),
        "the peer still maps the region of 1 MiB"
    );
}

/// A placement acknowledged before its message is out (a hostile peer's early word): the lane
/// stays busy, and the region its message names by fd number is neither given back nor
/// replaced, until the message is sent ([`Lane::sent`]); a string goes inline meanwhile.
#[test]
fn a_region_is_kept_while_a_message_naming_it_is_on_its_way_out() {
    use crate::codec::{OutOfLine, Placement};
    let a = Lane::new(MAX, usize::MAX);
    a.on_word(READS_LANES, &[]);
    let Some(Placement::Region(placed, fd)) = a.put(&[1u8; 4096]) else {
        panic!("placed in the region");
    };
    assert!(fd.is_some(), "the message announces the region");
    a.on_word(READS_LANES | placed.seq, &[]); // acknowledged before it was sent
    assert!(a.is_acknowledged());
    assert!(a.is_busy(), "busy until its message is out");
    assert_eq!(
        a.retire_region(),
        None,
        "given back while a message names its fd"
    );
    assert!(
        a.put(&vec![2u8; 1 << 20]).is_none(),
        "grown: the old fd closed"
    );
    assert!(
        a.put(&[3u8; 4096]).is_none(),
        "placed over the string on its way out"
    );
    a.sent(placed.seq);
    assert!(!a.is_busy());
    assert!(
        a.put(&vec![2u8; 1 << 20]).is_some(),
        "grown once the message is out"
    );
}

/// A message decoded twice (a handler calling `Call::args` again): its placement was
/// acknowledged by the first decode, so the peer may have placed its next string over it.
/// The second decode must fail, saying so, and not hand out whatever the region holds now.
#[test]
fn a_placement_is_taken_once_per_message_that_carries_it() {
    use crate::codec::{OutOfLine, Unfetched};
    let (a, b) = (Lane::new(MAX, usize::MAX), Lane::new(MAX, usize::MAX));
    a.on_word(READS_LANES, &[]);
    let first = vec![1u8; 4096];
    let (placed, fd) = place(&a, &first);
    b.on_message(&mut carrying(placed.seq));
    assert!(b.take(&placed, Ok(fd)).unwrap() == first);
    a.on_word(b.word(0), &[]);
    let (next, _) = place(&a, &[2u8; 4096]); // over the first, at offset 0
    match b.take(&placed, Ok(None)) {
        Err(Unfetched::Bad(why)) => assert!(why.contains("taken already"), "{why}"),
        Ok(bytes) => panic!(
            "decoded again: {} bytes, of value {}",
            bytes.len(),
            bytes[0]
        ),
        Err(e) => panic!("{e:?}"),
    }
    // The next message's string is its own, once.
    b.on_message(&mut carrying(next.seq));
    assert!(b.take(&next, Ok(None)).unwrap() == [2u8; 4096]);
    assert!(b.take(&next, Ok(None)).is_err());
}

/// The same through a pipe: a second decode would read the next string's bytes out of the
/// pipe, and that string's own message would then find the pipe short.
#[test]
fn a_piped_string_is_taken_once_per_message_that_carries_it() {
    use crate::codec::OutOfLine;
    use crate::shared_bytes::SharedBytes;
    use std::os::fd::BorrowedFd;
    let (a, b) = (Lane::new(MAX, usize::MAX), Lane::new(MAX, usize::MAX));
    a.on_word(READS_LANES, &[]);
    let (_, a_lends) = a.lend_pages(true).expect("a change");
    let (mailbox, b_lends) = b.lend_pages(true).expect("a change");
    a.on_announce(mailbox, b_lends);
    b.on_announce(mailbox, a_lends);
    let pipe = |bytes: &SharedBytes| {
        let (piped, fd) = a.put_shared(bytes).expect("piped");
        a.sent(piped.seq);
        // SAFETY: the pipe's read end, open while `a` keeps its pipe (the whole test).
        let fd = fd.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned());
        (piped, fd.transpose().unwrap())
    };
    let len = 256 << 10;
    let first = SharedBytes::from(vec![1u8; len]);
    let (piped, fd) = pipe(&first);
    b.on_message(&mut carrying(piped.seq));
    assert!(b.take_piped(&piped, Ok(fd), &[]).unwrap() == *first);
    a.on_word(b.word(0), &[]);
    let second = SharedBytes::from(vec![2u8; len]);
    let (next, _) = pipe(&second);
    b.on_message(&mut carrying(next.seq));
    assert!(
        b.take_piped(&piped, Ok(None), &[]).is_err(),
        "the first message decoded again"
    );
    assert!(b.take_piped(&next, Ok(None), &[]).unwrap() == *second);
}

/// A value whose `Deserialize` decodes a byte string of the message as a message of its own,
/// as user code may: the nested decode is a decode of its own, with the store still set.
struct DecodesInside;

impl<'de> serde::Deserialize<'de> for DecodesInside {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use crate::codec::Bytes;
        let Bytes(inner): Bytes<Vec<u8>> = serde::Deserialize::deserialize(d)?;
        let _: Bytes<Vec<u8>> =
            codec::decode(&inner, Vec::new()).map_err(serde::de::Error::custom)?;
        Ok(DecodesInside)
    }
}

/// A hostile message names the one placement it carries twice, the second time inside a
/// byte string that a nested decode reads: each decode may fetch one string, but the
/// placement is fetched once.
#[test]
fn a_nested_decode_does_not_take_the_placement_of_its_message_again() {
    use crate::codec::{Bytes, OutOfLine};
    let (a, b) = (Lane::new(MAX, usize::MAX), Lane::new(MAX, usize::MAX));
    a.on_word(READS_LANES, &[]);
    let (announcing, fd) = place(&a, &[4u8; 4096]);
    b.on_message(&mut carrying(announcing.seq));
    b.take(&announcing, Ok(fd)).unwrap();
    a.on_word(b.word(0), &[]);
    let big = vec![5u8; 4096];
    let (placed, fd) = place(&a, &big);
    assert!(fd.is_none(), "the region is announced already");
    let mut reference = Vec::new();
    codec::encode(&(1u8, placed), &mut reference, &mut Vec::new()).unwrap();
    let mut body = reference.clone();
    codec::encode(&Bytes(&reference), &mut body, &mut Vec::new()).unwrap();
    b.on_message(&mut carrying(placed.seq));
    type Both = (Bytes<Vec<u8>>, DecodesInside);
    match codec::with_store(&b, || codec::decode::<Both>(&body, Vec::new())) {
        Err(crate::Error::Malformed(why)) => assert!(why.contains("taken already"), "{why}"),
        Ok(_) => panic!("the placement was fetched twice"),
        Err(e) => panic!("{e:?}"),
    }
}

/// Placements whose messages never went out (encodes that failed, sends that timed out
/// before any of it went) still use up sequence numbers. Half a lap of them in a row (1,024)
/// and the next placement's number looks older to the peer than the one it last read: it
/// must still acknowledge it, or this end's lane stays busy for good (every later string
/// inline, `release_shared_memory` 0).
#[test]
fn placements_never_sent_do_not_keep_the_peer_from_acknowledging_the_next() {
    use crate::codec::{OutOfLine, Placement};
    let (a, b) = (Lane::new(MAX, usize::MAX), Lane::new(MAX, usize::MAX));
    a.on_word(READS_LANES, &[]);
    let (placed, fd) = place(&a, &[1u8; 4096]);
    b.on_message(&mut carrying(placed.seq));
    b.take(&placed, Ok(fd)).unwrap();
    a.on_word(b.word(0), &[]);
    for _ in 0..SEQ_MASK / 2 + 1 {
        let Some(Placement::Region(unsent, _)) = a.put(&[2u8; 4096]) else {
            panic!("placed in the region");
        };
        a.abandon(unsent.seq); // its encode failed: never sent
    }
    let (placed, _) = place(&a, &[3u8; 4096]);
    b.on_message(&mut carrying(placed.seq));
    assert!(b.take(&placed, Ok(None)).unwrap() == [3u8; 4096]);
    a.on_word(b.word(0), &[]);
    assert!(
        !a.is_busy(),
        "the peer did not acknowledge the string it read"
    );
}

/// Two threads of the peer each send a message, the first stopped between encoding its
/// message and sending it (as the scheduler may stop it) while the peer reads this end's
/// next placement and the second sends. The first's lane word must not reach this end after
/// the second's with what the peer was done with before: the number this end skips
/// ([`Outgoing::start`]) would go back to the older placement's. Placements never sent then
/// bring the numbers round to the newer one, the next placement takes it, and the peer's
/// next word gives it back before the peer has read it: the next string overwrites it.
#[test]
fn a_lane_word_read_before_another_does_not_reach_this_end_after_it() {
    use super::super::{BETWEEN_ENCODE_AND_SEND, Connection};
    use crate::codec::OutOfLine;
    let (a, b) = crate::Socket::pair().unwrap();
    let (a, b) = (Connection::new(a), Connection::new(b));
    let (a, b) = (a.shared.clone(), b.shared.clone());
    a.lane.on_word(READS_LANES, &[]);
    let (first, fd) = place(&a.lane, &[1u8; 4096]);
    b.lane.on_message(&mut carrying(first.seq));
    b.lane.take(&first, Ok(fd)).unwrap();
    a.lane.on_word(b.lane.word(0), &[]); // an earlier message of the peer's
    let oneway = Envelope {
        kind: Kind::Oneway,
        cmd: 1,
        cookie: 0,
        interface: 1,
        signature: 0,
    };
    let (a2, b2) = (a.clone(), b.clone());
    let meanwhile = move || {
        let (second, _) = place(&a2.lane, &[2u8; 4096]);
        b2.lane.on_message(&mut carrying(second.seq));
        b2.lane.take(&second, Ok(None)).unwrap();
        b2.send(&oneway, &(), None).unwrap(); // the second thread's message
    };
    BETWEEN_ENCODE_AND_SEND.set(Some(Box::new(meanwhile)));
    b.send(&oneway, &(), None).unwrap(); // the first thread's
    a_lap_after_the_peers_two_messages(&a, &b.lane);
}

/// The end of the two tests of lane words sent out of order: this end (`a`) takes in the
/// peer's two messages, gives up a lap of placements less two before their messages go out
/// (arguments that fail to encode, say) with no word from the peer meanwhile, and places a
/// string, which the peer's next word must not give back before the peer reads it.
fn a_lap_after_the_peers_two_messages(a: &super::super::Shared, peer: &Lane) {
    use crate::codec::{OutOfLine, Placement};
    let mut frame = crate::frame::Frame {
        payload: Vec::new(),
        fds: Vec::new(),
    };
    let mut recv = std::mem::take(&mut a.state.lock().recv);
    for _ in 0..2 {
        a.receive(&mut recv, &mut frame, None).unwrap();
    }
    a.state.lock().recv = recv;
    assert!(!a.lane.is_busy(), "the second placement was acknowledged");
    for _ in 0..SEQ_MASK - 2 {
        let Some(Placement::Region(unsent, _)) = a.lane.put(&[3u8; 4096]) else {
            panic!("placed in the region");
        };
        a.lane.abandon(unsent.seq);
    }
    let new = vec![4u8; 4096];
    let (placed, _) = place(&a.lane, &new);
    peer.on_message(&mut carrying(placed.seq));
    a.lane.on_word(peer.word(0), &[]); // the peer's next message, before it reads the string
    let _ = a.lane.put(&[5u8; 4096]); // the next string, if the lane were idle
    assert!(
        peer.take(&placed, Ok(None)).unwrap() == new,
        "the bytes placed (placement {}) were overwritten",
        placed.seq
    );
}

/// [`a_lane_word_read_before_another_does_not_reach_this_end_after_it`] in the async flavour:
/// the peer's task is stopped between encoding its message and sending it (a test-only hook in
/// its send, where a runtime may run other tasks on other threads meanwhile) while the peer
/// reads this end's next placement and a second message of the peer's goes out at once.
#[cfg(feature = "tokio")]
#[test]
fn an_async_lane_word_read_before_another_does_not_reach_this_end_after_it() {
    use super::super::{BETWEEN_ENCODE_AND_SEND, Connection};
    use crate::codec::OutOfLine;
    use crate::service::InterfaceInfo;
    use crate::tokio::AsyncConnection;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    static LANES: InterfaceInfo = InterfaceInfo {
        name: "Lanes",
        id: 1,
        signature: 0,
        methods: &[],
    };
    let (ours, theirs) = crate::Socket::pair().unwrap();
    let a = Connection::new(ours);
    let a = a.shared.clone();
    let runtime = ::tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let b = runtime.block_on(async { AsyncConnection::new(theirs).unwrap() });
    a.lane.on_word(READS_LANES, &[]);
    let (first, fd) = place(&a.lane, &[1u8; 4096]);
    b.test_lane().on_message(&mut carrying(first.seq));
    b.test_lane().take(&first, Ok(fd)).unwrap();
    a.lane.on_word(b.test_lane().word(0), &[]); // an earlier message of the peer's
    let (a2, b2) = (a.clone(), b.clone());
    let meanwhile = move || {
        let (second, _) = place(&a2.lane, &[2u8; 4096]);
        b2.test_lane().on_message(&mut carrying(second.seq));
        b2.test_lane().take(&second, Ok(None)).unwrap();
        // The second task's message, which finds the socket free and goes out at once.
        let second = std::pin::pin!(b2.oneway(&LANES, 1, (), None));
        let sent = second.poll(&mut Context::from_waker(Waker::noop()));
        assert!(
            matches!(sent, Poll::Ready(Ok(()))),
            "sent at once: {sent:?}"
        );
    };
    BETWEEN_ENCODE_AND_SEND.set(Some(Box::new(meanwhile)));
    runtime.block_on(b.oneway(&LANES, 1, (), None)).unwrap(); // the first task's
    a_lap_after_the_peers_two_messages(&a, b.test_lane());
}

/// The acknowledgement written under the send lock replaces only bits 0..10, 22 and 23 of the
/// word (what the receiver's [`Lane::on_word`] reads as the acknowledgement and "reads
/// lanes"): the kind byte, the placement carried (bits 11..21) and the rest of the envelope
/// stay, and a message stamped again (it waited for room) carries the newer acknowledgement.
#[test]
fn an_acknowledgement_written_under_the_send_lock_keeps_the_rest_of_the_envelope() {
    let lane = Lane::new(MAX, usize::MAX);
    let envelope = Envelope {
        kind: Kind::Reply,
        cmd: 0xdead_beef,
        cookie: u64::MAX,
        interface: 7,
        signature: 9,
    };
    let mut payload = vec![0xee; envelope::LEN + 4];
    envelope.write(&mut payload);
    envelope::set_lane(&mut payload, SEQ_MASK << SEQ_BITS | UNREAD | SEQ_MASK); // stale bits
    let kept = payload.clone();
    lane.record_done(SEQ_MASK - 1, UNREAD, None);
    lane.acknowledge_in(&mut payload);
    let word = SEQ_MASK << SEQ_BITS | READS_LANES | UNREAD | (SEQ_MASK - 1);
    assert_eq!(envelope::lane(&payload), word);
    assert_eq!(
        lane.word(SEQ_MASK),
        word,
        "as the word read at encode time was"
    );
    assert_eq!(payload[0], kept[0]);
    assert_eq!(payload[4..], kept[4..]);
    lane.record_done(1, 0, None);
    lane.acknowledge_in(&mut payload);
    assert_eq!(
        envelope::lane(&payload),
        SEQ_MASK << SEQ_BITS | READS_LANES | 1
    );
    // An end whose limits allow no fds does not say it reads lanes; nor is a payload too
    // short for an envelope touched.
    let no_fds = Lane::new(MAX, 0);
    no_fds.acknowledge_in(&mut payload);
    assert_eq!(envelope::lane(&payload), SEQ_MASK << SEQ_BITS);
    let mut short = [Kind::Oneway as u8, 0xff, 0xff];
    no_fds.acknowledge_in(&mut short);
    assert_eq!(short, [Kind::Oneway as u8, 0xff, 0xff]);
}

/// An end that accepts fds, but not the default count, says it reads lanes first in the
/// message that tells its limit, and the peer takes the limit in with that message's lane
/// word: before the word lets it place anything, so no placement's fd can take a message
/// over the limit. Ends with the default, or no fds, tell nothing.
#[test]
fn a_peer_learns_an_fd_limit_before_it_may_place() {
    let b = Lane::new(MAX, 2).telling_max_fds();
    assert!(b.tells_max_fds());
    assert_eq!(b.word(0) & READS_LANES, 0, "not before its limit is told");
    b.owe_max_fds();
    let mut told = None;
    b.tell_owed(|framed| {
        told = Some(framed[envelope::FRAMED_AT..].to_vec());
        true
    });
    let mut payload = told.expect("told");
    assert_eq!(
        envelope::announcement(&payload).unwrap(),
        (MAX_FDS_MAILBOX, 2)
    );
    assert_ne!(
        envelope::lane(&payload) & READS_LANES,
        0,
        "from that message on"
    );
    assert_ne!(b.word(0) & READS_LANES, 0);
    let a = Lane::new(MAX, usize::MAX);
    assert_eq!(a.peer_max_fds.load(Ordering::Relaxed), DEFAULT_MAX_FDS);
    a.on_message(&mut payload);
    assert!(a.peer_reads.load(Ordering::Relaxed));
    assert_eq!(a.peer_max_fds.load(Ordering::Relaxed), 2);
    for max_fds in [0, DEFAULT_MAX_FDS] {
        let lane = Lane::new(MAX, max_fds).telling_max_fds();
        assert!(!lane.tells_max_fds(), "{max_fds}");
        assert_eq!(lane.word(0) & READS_LANES != 0, max_fds != 0, "{max_fds}");
    }
}

/// A blocking end that owes the peer its fd limit (no room for it as the connection
/// started) sends it from the next message's stamp, under the send lock, before that
/// message: while it finds no room, the message does not say that the end reads lanes and
/// the next one tries again; once it went, every message says so and none sends it again.
/// Its acknowledgement is the end's latest, as any message's, and acknowledgements recorded
/// meanwhile keep it owed.
#[test]
fn an_owed_fd_limit_goes_out_before_the_first_message_that_finds_room() {
    let lane = Lane::new(MAX, 2).telling_max_fds();
    lane.owe_max_fds();
    let mut payload = vec![0; envelope::LEN];
    Envelope::announce().write(&mut payload);
    payload[0] = Kind::Oneway as u8;
    let mut tries = 0;
    lane.acknowledge_in_telling(&mut payload, |_| {
        tries += 1;
        false // no room
    });
    assert_eq!(tries, 1);
    assert_eq!(
        envelope::lane(&payload),
        0,
        "neither reads lanes nor owes, on the wire"
    );
    lane.record_done(5, 0, None);
    let mut told = Vec::new();
    lane.acknowledge_in_telling(&mut payload, |framed| {
        told.push(framed[envelope::FRAMED_AT..].to_vec());
        true
    });
    assert_eq!(told.len(), 1, "still owed after the acknowledgement");
    assert_eq!(envelope::lane(&told[0]), READS_LANES | 5);
    assert_eq!(envelope::kind_byte(&told[0]), Some(Kind::Announce as u8));
    assert_eq!(envelope::lane(&payload), READS_LANES | 5);
    lane.acknowledge_in_telling(&mut payload, |_| panic!("told once only"));
    lane.record_done(6, UNREAD, None);
    lane.acknowledge_in(&mut payload);
    assert_eq!(envelope::lane(&payload), READS_LANES | UNREAD | 6);
}

/// An async end whose fd limit cannot be told at once (its socket full as the connection
/// starts) tells it from a task: no message of its own may say that it reads lanes before
/// that announcement, or the peer places strings whose region's fd it would refuse. Here a
/// oneway sent as the connection starts goes out first, which must not say so.
#[cfg(feature = "tokio")]
#[test]
fn an_async_end_whose_fd_limit_waits_says_it_reads_lanes_first_in_the_announcement() {
    use crate::frame::Limits;
    use crate::service::InterfaceInfo;
    use crate::tokio::AsyncConnection;
    use nix::sys::socket::{MsgFlags, recv, send};
    use std::os::fd::{AsFd, AsRawFd};

    static LANES: InterfaceInfo = InterfaceInfo {
        name: "Lanes",
        id: 1,
        signature: 0,
        methods: &[],
    };
    let (mut ours, theirs) = crate::Socket::pair().unwrap();
    ours.set_limits(Limits {
        max_fds: 2,
        ..Limits::default()
    });
    let mut filler = 0;
    while send(ours.as_fd().as_raw_fd(), &[0u8], MsgFlags::MSG_DONTWAIT).is_ok() {
        filler += 1;
    }
    let peer = std::thread::spawn(move || {
        for _ in 0..filler {
            recv(theirs.as_fd().as_raw_fd(), &mut [0u8; 1], MsgFlags::empty()).unwrap();
        }
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let frame = theirs.recv().unwrap();
            seen.push((frame.payload[0], envelope::lane(&frame.payload)));
        }
        seen
    });
    let runtime = ::tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seen = runtime.block_on(async {
        let a = AsyncConnection::new(ours).unwrap();
        a.oneway(&LANES, 1, (), None).await.unwrap();
        // Awaited, so that a task still telling the limit gets to run.
        let seen = ::tokio::task::spawn_blocking(|| peer.join().unwrap()).await;
        drop(a);
        seen.unwrap()
    });
    let first = seen.iter().find(|(_, word)| word & READS_LANES != 0);
    assert_eq!(
        first.map(|(kind, _)| *kind),
        Some(Kind::Announce as u8),
        "the first message saying it reads lanes: {seen:?}"
    );
}

/// Whatever fd limit a hostile or buggy peer announces (0, 1, `u64::MAX`; in its first word
/// that says it reads lanes or later, again and again, or from a peer with the default), it
/// only bounds whether this end's strings go out of line: no panic, and a string whose
/// region's fd would take its message over the latest limit goes inline.
#[test]
fn any_fd_limit_a_peer_announces_only_decides_where_strings_go() {
    use crate::codec::Bytes;
    let told = |token: u64| {
        let mut payload = [0u8; envelope::ANNOUNCE_LEN];
        envelope::write_announcement(&mut payload, READS_LANES, (MAX_FDS_MAILBOX, token));
        payload.to_vec()
    };
    // How many fds a oneway carrying a 64 KiB string carries: the new region's, or none.
    let fds_of_a_string = |lane: &Lane| {
        let (mut buf, mut fds) = (Vec::new(), Vec::new());
        let oneway = Envelope {
            kind: Kind::Oneway,
            cmd: 1,
            cookie: 0,
            interface: 1,
            signature: 0,
        };
        let string = Bytes(vec![1u8; 64 << 10]);
        let placed = lane.encode(&oneway, &string, &mut buf, &mut fds);
        lane.never_sent(placed.unwrap());
        fds.len()
    };
    for (token, carried) in [(0, 0), (1, 1), (u64::MAX, 1), (DEFAULT_MAX_FDS as u64, 1)] {
        let first = Lane::new(MAX, usize::MAX);
        first.on_message(&mut told(token));
        assert_eq!(fds_of_a_string(&first), carried, "told first: {token}");
        let later = Lane::new(MAX, usize::MAX);
        later.on_word(READS_LANES, &[]);
        for again in [1, 0, token] {
            let mut announcement = told(again);
            later.on_message(&mut announcement);
            later.on_announce(MAX_FDS_MAILBOX, again);
        }
        assert_eq!(fds_of_a_string(&later), carried, "told later: {token}");
    }
}
