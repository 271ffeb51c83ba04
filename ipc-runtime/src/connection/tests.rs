//! The reader role's hand-offs, which only the connection's insides can observe.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::envelope::{self, Envelope, Kind};
use super::{Connection, lock};
use crate::codec;
use crate::service::InterfaceInfo;

static IFACE: InterfaceInfo = InterfaceInfo {
    name: "Test",
    id: 1,
    signature: 2,
    methods: &[],
};

/// Spins (yielding) until `cond` holds; fails the test after a minute.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < give_up, "gave up waiting until {what}");
        std::thread::yield_now();
    }
}

fn writable(c: &Connection) -> bool {
    let mut fds = [PollFd::new(c.as_fd(), PollFlags::POLLOUT)];
    poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
}

/// A caller that finds nobody reading takes the reader role before it sends. If its message
/// cannot go out at once it must give the role back before waiting, or nobody reads for as
/// long as it waits (a runner that needs to read sleeps, and a peer that needs us to read
/// first deadlocks with us).
#[test]
fn a_caller_waiting_to_send_does_not_hold_the_reader_role() {
    let (a, b) = Connection::pair().unwrap();
    // `b` reads nothing until the end. A 32 MiB oneway fills `a`'s socket buffer and keeps
    // the send lock while it waits for room.
    let filler = {
        let a = a.clone();
        std::thread::spawn(move || a.oneway(&IFACE, 1, &"x".repeat(32 << 20)))
    };
    wait_until("the filler waits for room", || !writable(&a));
    let caller = {
        let a = a.clone();
        std::thread::spawn(move || a.call::<_, u64>(&IFACE, 2, &(), None))
    };
    wait_until("the caller registers its call to be answered", || {
        !lock(&a.shared.state).pending.is_empty()
    });
    assert!(
        !lock(&a.shared.state).reading,
        "a caller waiting to send holds the reader role"
    );
    // Now let everything through, and answer the call by hand.
    let oneway = b.socket().recv().unwrap();
    assert_eq!(Envelope::read(&oneway.payload).unwrap().kind, Kind::Oneway);
    let call = b.socket().recv().unwrap();
    let envelope = Envelope::read(&call.payload).unwrap();
    assert_eq!((envelope.kind, envelope.cmd), (Kind::Call, 2));
    let mut reply = vec![0; envelope::LEN];
    Envelope {
        kind: Kind::Reply,
        ..envelope
    }
    .write(&mut reply);
    codec::encode(&42u64, &mut reply, &mut Vec::new()).unwrap();
    b.socket().send(&reply, &[]).unwrap();
    assert_eq!(caller.join().unwrap().unwrap(), 42);
    filler.join().unwrap().unwrap();
}
