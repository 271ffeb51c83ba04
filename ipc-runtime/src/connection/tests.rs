//! The reader role's hand-offs, which only the connection's insides can observe.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::Connection;
use super::envelope::{self, Envelope, Kind};
use crate::codec::{self, Bytes};
use crate::error::{Error, Result};
use crate::service::{Call, InterfaceInfo, MethodInfo, Service};

static IFACE: InterfaceInfo = InterfaceInfo {
    name: "Test",
    id: 1,
    signature: 2,
    methods: &[],
};

/// Spins (yielding) until `cond` holds; fails the test after a minute.
pub(crate) fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < give_up, "gave up waiting until {what}");
        std::thread::yield_now();
    }
}

pub(crate) fn readable(c: &Connection) -> bool {
    let mut fds = [PollFd::new(c.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
}

fn writable(c: &Connection) -> bool {
    let mut fds = [PollFd::new(c.as_fd(), PollFlags::POLLOUT)];
    poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
}

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

pub(crate) static BULK: InterfaceInfo = InterfaceInfo {
    name: "Bulk",
    id: 3,
    signature: 4,
    methods: &[
        MethodInfo {
            name: "gated_echo",
            cmd: 1,
            signature: "fn gated_echo(&self, data: Vec<u8>) -> Vec<u8>",
            oneway: false,
            shape: 0,
        },
        MethodInfo {
            name: "ping",
            cmd: 2,
            signature: "fn ping(&self) -> u32",
            oneway: false,
            shape: 0,
        },
    ],
};

/// Echoes byte strings once the test lets it (one message on `gate` per call).
struct Gated {
    gate: Mutex<mpsc::Receiver<()>>,
}

impl Service for Gated {
    fn info(&self) -> &'static InterfaceInfo {
        &BULK
    }
    fn handle(&self, call: &mut Call<'_>) -> Result<()> {
        match call.command() {
            1 => {
                let Bytes(data): Bytes<Vec<u8>> = call.args()?;
                self.gate.lock().unwrap().recv().unwrap();
                call.reply(&Bytes(data))
            }
            _ => call.reply(&7u32),
        }
    }
}

/// Serves [`Gated`] on `server` from a thread of its own: the sender opens the gate once per
/// `gated_echo` call, and the thread returns `serve`'s result.
pub(crate) fn serve_gated(
    server: &Connection,
) -> (mpsc::Sender<()>, std::thread::JoinHandle<Result<()>>) {
    let (open, gate) = mpsc::channel();
    let server = server.clone();
    let serving = std::thread::spawn(move || {
        server.serve(Gated {
            gate: Mutex::new(gate),
        })
    });
    (open, serving)
}

/// A connection, and a thread serving `Skimmer` on its peer until it hangs up.
fn skimmed() -> (Connection, std::thread::JoinHandle<Result<()>>) {
    let (a, b) = Connection::pair().unwrap();
    (a, std::thread::spawn(move || b.serve(Skimmer)))
}

/// An argument whose encoding waits for a call another thread makes on the same connection,
/// as a slow write into the peer's memory makes its caller wait while it encodes.
struct WaitsForAnotherCall<'a>(&'a Connection);

impl serde::Serialize for WaitsForAnotherCall<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let other = self.0.clone();
        let len = std::thread::spawn(move || {
            let data = [5u8; 10];
            other.call::<_, u64>(&SKIM, 2, &Bytes(&data[..]), Some(Duration::from_secs(10)))
        })
        .join()
        .unwrap();
        assert_eq!(len.unwrap(), 10, "the other caller's reply was read");
        Bytes(&[1u8, 2, 3][..]).serialize(s)
    }
}

/// A lone caller encodes its message before it takes the reader role, so a caller whose
/// encoding takes long (a byte string written into a peer that makes the write wait) holds
/// up nobody else's reply.
#[test]
fn a_caller_still_encoding_does_not_hold_the_reader_role() {
    let (a, server) = skimmed();
    let len = a.call::<_, u64>(&SKIM, 2, &WaitsForAnotherCall(&a), None);
    assert_eq!(len.unwrap(), 3);
    a.close();
    server.join().unwrap().unwrap();
}

/// An argument whose encoding makes a call on the same connection from the same thread.
struct CallsWhenEncoded<'a>(&'a Connection);

impl serde::Serialize for CallsWhenEncoded<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let data = [5u8; 10];
        let len = self.0.call::<_, u64>(&SKIM, 2, &Bytes(&data[..]), None);
        assert_eq!(len.unwrap(), 10, "the call made while encoding");
        Bytes(&[1u8, 2, 3][..]).serialize(s)
    }
}

std::thread_local! {
    /// The connection [`CallsWhenDecoded`] calls on.
    static DECODER_CALLS: std::cell::RefCell<Option<Connection>> =
        const { std::cell::RefCell::new(None) };
}

/// A reply whose decoding makes a call on the same connection from the same thread.
struct CallsWhenDecoded(u64, u64);

impl<'de> serde::Deserialize<'de> for CallsWhenDecoded {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let len = u64::deserialize(d)?;
        let data = [6u8; 12];
        let connection = DECODER_CALLS.with(|c| c.borrow().clone()).unwrap();
        let inner = connection.call::<_, u64>(&SKIM, 2, &Bytes(&data[..]), None);
        Ok(CallsWhenDecoded(len, inner.unwrap()))
    }
}

/// A thread reuses its encoding buffers and its receive frame from call to call. User code
/// that runs while they are in use (`Serialize` of an argument, `Deserialize` of a reply) may
/// itself call on the same thread: that call gets buffers of its own, and both calls get
/// their replies.
#[test]
fn a_call_made_while_encoding_or_decoding_gets_its_own_buffers() {
    let (a, server) = skimmed();
    let len = a.call::<_, u64>(&SKIM, 2, &CallsWhenEncoded(&a), None);
    assert_eq!(len.unwrap(), 3);
    DECODER_CALLS.with(|c| *c.borrow_mut() = Some(a.clone()));
    let data = [7u8; 5];
    let reply = a.call::<_, CallsWhenDecoded>(&SKIM, 2, &Bytes(&data[..]), None);
    DECODER_CALLS.with(|c| *c.borrow_mut() = None);
    let CallsWhenDecoded(outer, inner) = reply.unwrap();
    assert_eq!((outer, inner), (5, 12));
    // And the thread's own buffers still work afterwards.
    assert_eq!(
        a.call::<_, u64>(&SKIM, 2, &Bytes(&data[..2]), None)
            .unwrap(),
        2
    );
    a.close();
    server.join().unwrap().unwrap();
}

/// An argument whose encoding panics, as user `Serialize` code may.
struct PanicsWhenEncoded;

impl serde::Serialize for PanicsWhenEncoded {
    fn serialize<S: serde::Serializer>(&self, _: S) -> std::result::Result<S::Ok, S::Error> {
        panic!("this argument cannot be encoded");
    }
}

/// A call whose argument panics while encoded leaves the connection usable: it never took the
/// reader role (it takes it only once the message is encoded), so nobody waits for a reader
/// that is gone. (Found by a review: when the role came first, every later caller hung.)
#[test]
fn a_panic_while_encoding_leaves_the_connection_usable() {
    let (a, server) = skimmed();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        a.call::<_, u64>(&SKIM, 2, &PanicsWhenEncoded, None)
    }));
    assert!(panicked.is_err());
    let data = [9u8; 7];
    let len = a.call::<_, u64>(&SKIM, 2, &Bytes(&data[..]), Some(Duration::from_secs(10)));
    assert_eq!(len.unwrap(), 7, "the next call is answered");
    a.close();
    server.join().unwrap().unwrap();
}

/// A call whose argument panics while encoded, after a byte string of it was placed in the
/// lane: the message is never sent, so the placement goes back (the lane idle, and nothing
/// counted as on its way out). It stayed the lane's for good: every later string went
/// through the socket, and `release_shared_memory` never gave the region back.
#[test]
fn a_panic_while_encoding_after_a_placement_gives_the_placement_back() {
    let (a, server) = skimmed();
    let data = [9u8; 4096];
    for _ in 0..2 {
        // The first goes inline (neither end has heard that the other reads lanes), the
        // second through the lane, which makes and announces the region.
        let len = a.call::<_, u64>(&SKIM, 2, &Bytes(&data[..]), None);
        assert_eq!(len.unwrap(), 4096);
    }
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        a.call::<_, u64>(&SKIM, 2, &(Bytes(&data[..]), PanicsWhenEncoded), None)
    }));
    assert!(panicked.is_err());
    assert!(
        !a.lane_is_busy(),
        "the placement of a message never sent is kept"
    );
    assert_eq!(a.release_shared_memory(), 64 << 10, "the region is kept");
    let len = a.call::<_, u64>(&SKIM, 2, &Bytes(&data[..]), None);
    assert_eq!(
        len.unwrap(),
        4096,
        "the next string goes through a new region"
    );
    assert_eq!(a.release_shared_memory(), 64 << 10);
    a.close();
    server.join().unwrap().unwrap();
}

/// A call on a connection that has ended fails with why it ended before its arguments are
/// encoded, so no byte string is copied into a region or written into the peer for nothing
/// (`PanicsWhenEncoded` would panic).
#[test]
fn an_ended_connection_fails_calls_before_encoding() {
    let (a, b) = Connection::pair().unwrap();
    drop(b);
    a.run().unwrap(); // reads the hang-up
    assert!(a.is_closed());
    let call = a.call::<_, u64>(&SKIM, 2, &PanicsWhenEncoded, None);
    assert!(matches!(call, Err(Error::Disconnected)), "{call:?}");
}

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

pub(crate) static CALLS_BACK: InterfaceInfo = InterfaceInfo {
    name: "CallsBack",
    id: 9,
    signature: 10,
    methods: &[MethodInfo {
        name: "ask_back",
        cmd: 1,
        signature: "fn ask_back(&self) -> u64",
        oneway: false,
        shape: 0,
    }],
};

/// A call of `CALLS_BACK`'s `ask_back`, as the peer would send it by hand.
pub(crate) fn calls_back_request(cookie: u64) -> Vec<u8> {
    let mut request = vec![0; envelope::LEN];
    Envelope {
        kind: Kind::Call,
        cmd: 1,
        cookie,
        interface: CALLS_BACK.id,
        signature: CALLS_BACK.signature,
    }
    .write(&mut request);
    codec::encode(&(), &mut request, &mut Vec::new()).unwrap();
    request
}

/// Answers every call with what a call back into the peer (`IFACE`'s command 9) answers.
pub(crate) struct CallsBack {
    pub(crate) back: Connection,
}

impl Service for CallsBack {
    fn info(&self) -> &'static InterfaceInfo {
        &CALLS_BACK
    }
    fn handle(&self, call: &mut Call<'_>) -> Result<()> {
        let n: u64 = self.back.call(&IFACE, 9, &(), None)?;
        call.reply(&n)
    }
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

static PINGER: InterfaceInfo = InterfaceInfo {
    name: "Pinger",
    id: 5,
    signature: 6,
    methods: &[MethodInfo {
        name: "ping",
        cmd: 1,
        signature: "fn ping(&self) -> u32",
        oneway: false,
        shape: 0,
    }],
};

struct Pinger;

impl Service for Pinger {
    fn info(&self) -> &'static InterfaceInfo {
        &PINGER
    }
    fn handle(&self, call: &mut Call<'_>) -> Result<()> {
        call.reply(&9u32)
    }
}

/// A serving thread keeps a snapshot of what is served: a service or an authorizer added
/// while it serves must still reach the next request.
#[test]
fn services_and_authorizers_added_while_serving_take_effect() {
    let (a, b) = Connection::pair().unwrap();
    let (_open, server) = serve_gated(&b);
    assert_eq!(a.call::<_, u32>(&BULK, 2, &(), None).unwrap(), 7);
    b.add_service(Pinger);
    assert_eq!(a.call::<_, u32>(&PINGER, 1, &(), None).unwrap(), 9);
    b.set_authorizer(|_, iface, _| match iface.name {
        "Bulk" => Err("not today".into()),
        _ => Ok(()),
    });
    let refused = a.call::<_, u32>(&BULK, 2, &(), None);
    assert!(
        matches!(&refused, Err(Error::Refused(why)) if why == "not today"),
        "{refused:?}"
    );
    assert_eq!(a.call::<_, u32>(&PINGER, 1, &(), None).unwrap(), 9);
    a.close();
    server.join().unwrap().unwrap();
}

pub(crate) static SKIM: InterfaceInfo = InterfaceInfo {
    name: "Skim",
    id: 7,
    signature: 8,
    methods: &[
        MethodInfo {
            name: "skip",
            cmd: 1,
            signature: "fn skip(&self, data: Vec<u8>) -> u32",
            oneway: false,
            shape: 0,
        },
        MethodInfo {
            name: "len",
            cmd: 2,
            signature: "fn len(&self, data: Vec<u8>) -> u64",
            oneway: false,
            shape: 0,
        },
    ],
};

/// Answers `skip` without ever decoding its argument, and `len` by decoding it.
pub(crate) struct Skimmer;

impl Service for Skimmer {
    fn info(&self) -> &'static InterfaceInfo {
        &SKIM
    }
    fn handle(&self, call: &mut Call<'_>) -> Result<()> {
        match call.command() {
            1 => call.reply(&0u32),
            _ => {
                let Bytes(data): Bytes<Vec<u8>> = call.args()?;
                call.reply(&(data.len() as u64))
            }
        }
    }
}

/// Calls `skip` with a placed byte string (the first placement, so it also announces the
/// caller's region), then `len` with another: the server never read the first, so the caller
/// must get its lane back and announce its region again, or the second cannot be read.
pub(crate) fn skim_twice(client: &Connection) {
    let data = vec![7u8; 8 << 10];
    // A small call first, so both ends have seen that the other reads lanes.
    let small = client.call::<_, u64>(&SKIM, 2, &Bytes(&data[..100]), None);
    assert_eq!(small.unwrap(), 100);
    assert_eq!(
        client
            .call::<_, u32>(&SKIM, 1, &Bytes(&data), None)
            .unwrap(),
        0
    );
    let read = client.call::<_, u64>(&SKIM, 2, &Bytes(&data), None);
    assert_eq!(
        read.unwrap(),
        data.len() as u64,
        "the second placement was read"
    );
    assert!(!client.lane_is_busy(), "the caller's lane is still busy");
}

#[test]
fn a_placed_request_its_handler_never_decoded_gives_the_lane_back() {
    let (a, server) = skimmed();
    skim_twice(&a);
    a.close();
    server.join().unwrap().unwrap();
}

/// The reply to `call` (a frame the peer read by hand), with `body` encoded inline.
pub(crate) fn reply_to(call: &crate::frame::Frame, body: &impl serde::Serialize) -> Vec<u8> {
    let envelope = Envelope::read(&call.payload).unwrap();
    let mut reply = vec![0; envelope::LEN];
    Envelope {
        kind: Kind::Reply,
        ..envelope
    }
    .write(&mut reply);
    codec::encode(body, &mut reply, &mut Vec::new()).unwrap();
    reply
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
        a.shared.socket.is_partial(),
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

static HELD: InterfaceInfo = InterfaceInfo {
    name: "Held",
    id: 5,
    signature: 6,
    methods: &[
        MethodInfo {
            name: "hold",
            cmd: 1,
            signature: "fn hold(&self)",
            oneway: true,
            shape: 0,
        },
        MethodInfo {
            name: "note",
            cmd: 2,
            signature: "fn note(&self, seq: u64, padding: Vec<u8>)",
            oneway: true,
            shape: 0,
        },
        MethodInfo {
            name: "ping",
            cmd: 3,
            signature: "fn ping(&self) -> u32",
            oneway: false,
            shape: 0,
        },
    ],
};

/// `hold` blocks its serving thread until the test opens the gate; `note` keeps the numbers
/// it is sent, in order.
struct Held {
    gate: Mutex<mpsc::Receiver<()>>,
    noted: std::sync::Arc<Mutex<Vec<u64>>>,
}

impl Service for Held {
    fn info(&self) -> &'static InterfaceInfo {
        &HELD
    }
    fn handle(&self, call: &mut Call<'_>) -> Result<()> {
        match call.command() {
            1 => {
                self.gate.lock().unwrap().recv().unwrap();
                Ok(())
            }
            2 => {
                let (seq, Bytes(_)): (u64, Bytes<Vec<u8>>) = call.args()?;
                self.noted.lock().unwrap().push(seq);
                Ok(())
            }
            _ => call.reply(&7u32),
        }
    }
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

/// A connection over a socket with `limits`, and its peer with the default ones. The
/// announcement of the first's fd limit, if it sends one, is taken out of the peer's socket
/// already: the tests read that socket themselves, and large strings are none of theirs.
fn limited_pair(limits: crate::frame::Limits) -> (Connection, Connection) {
    let (mut a, b) = crate::socket::Socket::pair().unwrap();
    a.set_limits(limits);
    let (a, b) = (Connection::new(a), Connection::new(b));
    if a.shared.lane.tells_max_fds() {
        let told = b.socket().recv().unwrap();
        let told = (envelope::announcement(&told.payload)).unwrap();
        assert_eq!(told, (2, limits.max_fds as u64), "the fd limit");
    }
    (a, b)
}

/// Fails unless `refused` is this side's refusal of 5 fds over its limit of 4: its
/// `max_fds`, which bounds what it sends while `max_send_fds` is `None`.
pub(crate) fn assert_five_fds_over_this_sides_four<T: std::fmt::Debug>(refused: &Result<T>) {
    assert!(
        matches!(
            refused,
            Err(Error::TooManyFds {
                count: 5,
                limit: 4,
                which: crate::Limit::MaxFds,
                by_peer: false,
                ..
            })
        ),
        "{refused:?}"
    );
}

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

/// Has `a`'s reader, which waits for a message, take in a call (77, from `b`) with more fds
/// than `a` takes while `a`'s registry is held: the reader then keeps its role, naming the
/// refused call, until the registry returned is dropped.
fn reader_holding_a_refused_call<'a>(a: &'a Connection, b: &Connection) -> impl Sized + 'a {
    let held = a.shared.registry.lock();
    send_call_with_five_fds(b.socket(), 77);
    wait_until(
        "the reader takes the call in, holding the reader role",
        || !readable(a) && a.shared.state.lock().reading,
    );
    held
}

/// Sends, on `socket`, a call (cookie `cookie`) with five fds: more than `limited_pair`'s
/// `max_fds: 4`, so the other end cannot receive it and owes a failure for it.
fn send_call_with_five_fds(socket: &crate::socket::Socket, cookie: u64) {
    let mut call = vec![0; envelope::LEN];
    Envelope {
        kind: Kind::Call,
        cmd: 3,
        cookie,
        interface: IFACE.id,
        signature: IFACE.signature,
    }
    .write(&mut call);
    codec::encode(&(), &mut call, &mut Vec::new()).unwrap();
    let (_read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
    socket.send(&call, &[write_end.as_fd(); 5]).unwrap();
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

pub(crate) static ORDERED: InterfaceInfo = InterfaceInfo {
    name: "Ordered",
    id: 7,
    signature: 8,
    methods: &[
        MethodInfo {
            name: "hold",
            cmd: 1,
            signature: "fn hold(&self)",
            oneway: false,
            shape: 0,
        },
        MethodInfo {
            name: "mark",
            cmd: 2,
            signature: "fn mark(&self, seq: u64)",
            oneway: false,
            shape: 0,
        },
        MethodInfo {
            name: "note",
            cmd: 3,
            signature: "fn note(&self, seq: u64)",
            oneway: true,
            shape: 0,
        },
    ],
};

/// `hold` says it started, then blocks its serving thread until the test opens the gate;
/// `mark` (a call) and `note` (a oneway) keep the numbers they are sent, in the order run.
struct Ordered {
    started: mpsc::Sender<()>,
    gate: Mutex<mpsc::Receiver<()>>,
    run: std::sync::Arc<Mutex<Vec<u64>>>,
}

impl Service for Ordered {
    fn info(&self) -> &'static InterfaceInfo {
        &ORDERED
    }
    fn handle(&self, call: &mut Call<'_>) -> Result<()> {
        if call.command() == 1 {
            self.started.send(()).unwrap();
            self.gate.lock().unwrap().recv().unwrap();
        } else {
            let seq: u64 = call.args()?;
            self.run.lock().unwrap().push(seq);
        }
        match call.command() {
            3 => Ok(()),
            _ => call.reply(&()),
        }
    }
}

/// A request of `ORDERED`, as the peer would send it by hand.
pub(crate) fn ordered_request(kind: Kind, cmd: u32, cookie: u64, seq: u64) -> Vec<u8> {
    let mut message = vec![0; envelope::LEN];
    Envelope {
        kind,
        cmd,
        cookie,
        interface: ORDERED.id,
        signature: ORDERED.signature,
    }
    .write(&mut message);
    codec::encode(&seq, &mut message, &mut Vec::new()).unwrap();
    message
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
/// nobody.)
#[test]
fn a_peer_hanging_up_has_its_calls_not_started_dropped_and_its_oneways_run() {
    let (a, b, open, server, run, read_end) = queued_behind_hold();
    a.close();
    open.send(()).unwrap();
    server.join().unwrap().unwrap();
    assert_eq!(*run.lock().unwrap(), [1, 3, 5, 7]);
    crate::closer::wait_for_closes(); // the fds dropped are closed on the closer's threads
    assert_eq!(nix::unistd::read(&read_end, &mut [0; 1]), Ok(0));
    let state = b.shared.state.lock();
    assert!(state.calls.is_empty() && state.backlog.is_empty());
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

/// Fills `b`'s request queue to its bounds with the peer's requests of `kind` (oneways, or
/// calls each of a cookie of its own): a handler's call back into the peer (a thread serving
/// `b`, as far as the call can tell) takes them in, as it reads, before its reply. (Any
/// other caller would wait for room with the serving threads.)
fn fill_the_queue_through_a_call(b: &Connection, peer: &crate::socket::Socket, kind: Kind) {
    let caller = {
        let b = b.clone();
        std::thread::spawn(move || {
            let _handler = b.test_handler_scope();
            b.call::<_, u32>(&IFACE, 9, &(), None)
        })
    };
    let call = peer.recv().unwrap();
    for seq in 1..=super::backlog::MAX_REQUESTS as u64 {
        let request = match kind {
            Kind::Oneway => ordered_request(Kind::Oneway, 3, 0, seq),
            _ => ordered_request(Kind::Call, 2, 1 + seq, seq),
        };
        peer.send(&request, &[]).unwrap();
    }
    peer.send(&reply_to(&call, &5u32), &[]).unwrap();
    assert_eq!(caller.join().unwrap().unwrap(), 5);
    assert!(b.shared.state.lock().backlog.full());
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

/// A serving thread of `a` that has taken the reader role and waits for the receive lock,
/// which the guard holds until it is dropped.
fn run_held_up(a: &Connection) -> (impl Sized + '_, std::thread::JoinHandle<Result<()>>) {
    let held = a.socket().hold_recv();
    let runner = {
        let a = a.clone();
        std::thread::spawn(move || a.run())
    };
    wait_until("the serving thread takes the reader role", || {
        a.shared.state.lock().reading
    });
    (held, runner)
}

/// The wire version of a peer of another release (the next one).
pub(crate) const OTHER_VERSION: u8 = crate::wire::VERSION.wrapping_add(1);

/// Plays, on `theirs`, a peer of another release refusing this end: it says its version
/// (a bare header, as `Socket::refused_header` sends) and hangs up.
pub(crate) fn say_another_version_and_hang_up(theirs: crate::Socket) {
    say_another_version(&theirs);
}

/// Checks that `received`, the next message the peer read, is this side's version notice: a
/// header of no message, which a peer of this side's version reads as an empty message (one
/// of the other version refuses it).
pub(crate) fn assert_told_version(received: Result<crate::Frame>) {
    assert!(
        matches!(&received, Ok(frame) if frame.payload.is_empty() && frame.fds.is_empty()),
        "the peer was not told this side's version: {received:?}"
    );
}

/// Sends, on `theirs`, a bare header of another wire version ([`OTHER_VERSION`]): what a
/// peer of another release sends.
pub(crate) fn say_another_version(theirs: &crate::Socket) {
    use crate::wire::{Header, Kind};
    use nix::sys::socket::{MsgFlags, send};
    use std::os::fd::AsRawFd;
    let mut header = Header {
        kind: Kind::First,
        fds: 0,
        total_len: 0,
        total_fds: 0,
    }
    .encode();
    header[2] = OTHER_VERSION;
    send(theirs.as_fd().as_raw_fd(), &header, MsgFlags::empty()).unwrap();
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

/// `SKIM`'s `len`, answered with its argument's bytes; if they were refused (over this
/// side's limits), the handler runs anyway and answers 200 KiB of zeros instead, more than
/// this side's limits let it send.
pub(crate) struct RunsAnyway;

/// How large the answer of [`RunsAnyway`] to a refused argument is.
pub(crate) const ANYWAY: usize = 200 << 10;

impl Service for RunsAnyway {
    fn info(&self) -> &'static InterfaceInfo {
        &SKIM
    }
    fn handle(&self, call: &mut Call<'_>) -> Result<()> {
        match call.args::<Bytes<Vec<u8>>>() {
            Ok(Bytes(data)) => call.reply(&(data.len() as u64)),
            Err(_) => call.reply(&Bytes(vec![0u8; ANYWAY])),
        }
    }
}

/// Calls [`RunsAnyway`] (on a server whose limits allow 100 KiB) with a string over its
/// limits, which travels through the caller's region and is refused by the server's
/// decode: the handler ran all the same, and its answer could not be sent. The caller must
/// not hear `TooLarge` `by_peer` (its request refused, the method not run, with the size of
/// the answer as if it were the request's), but that the answer could not be sent.
pub(crate) fn call_one_that_runs_anyway(client: &Connection) {
    let small = client.call::<_, u64>(&SKIM, 2, &Bytes(&[1u8; 10][..]), None);
    assert_eq!(
        small.unwrap(),
        10,
        "both ends now know the other reads lanes"
    );
    let data = vec![7u8; 150 << 10];
    match client.call::<_, u64>(&SKIM, 2, &Bytes(&data), None) {
        Err(Error::Remote(why)) => assert!(why.contains("over Limits::max_message_len"), "{why}"),
        other => panic!("expected the answer's refusal, got {other:?}"),
    }
    let small = client.call::<_, u64>(&SKIM, 2, &Bytes(&[1u8; 10][..]), None);
    assert_eq!(small.unwrap(), 10, "the connection still works");
}

/// Limits of 100 KiB a message.
pub(crate) fn limits_of_100_kib() -> crate::Limits {
    crate::Limits {
        max_message_len: 100 << 10,
        ..crate::Limits::default()
    }
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
    let held = a.socket().hold_recv();
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

/// The attack of the async flavour's
/// `a_region_named_by_a_message_still_going_out_is_not_given_back`, on this flavour: a thread
/// whose message announces the region waits for room, and reads meanwhile, so it is the one
/// that takes in the peer's early acknowledgement of that placement. The lane is idle then,
/// but the message still names the region's fd by its number: given back, the number would
/// go to the next file this process opened, and the message would carry that file.
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
    assert!(!a.lane_is_busy(), "acknowledged");
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
/// stalls the thread that read the message, as the README says, and no other. Before, the
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

/// A call of method `cmd` of `IFACE` on a thread of its own, returning a `u64`.
fn call_on(
    a: &Connection,
    cmd: u32,
    timeout: Option<Duration>,
) -> std::thread::JoinHandle<Result<u64>> {
    let a = a.clone();
    std::thread::spawn(move || a.call::<_, u64>(&IFACE, cmd, &(), timeout))
}

/// The next call `theirs` receives, skipping what else this end sends (cancels, oneways).
pub(crate) fn next_call(theirs: &crate::Socket) -> crate::frame::Frame {
    loop {
        let frame = theirs.recv().unwrap();
        if Envelope::read(&frame.payload).unwrap().kind == Kind::Call {
            return frame;
        }
    }
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
