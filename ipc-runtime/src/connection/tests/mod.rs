//! The blocking connection's unit tests: the services, requests and fixtures several of them
//! share, some also used by other modules' tests (`pub(crate)`). The tests are in the modules
//! below, by topic.

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

use super::{backlog, failure, lane};

mod ending;
mod handlers;
mod lanes;
mod limits;
mod peer_gone;
mod reader_role;

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

/// Fills `b`'s request queue to its bounds with the peer's requests of `kind` (oneways, or
/// calls each of a cookie of its own), numbered from 1 ([`take_in_through_a_call`]).
fn fill_the_queue_through_a_call(b: &Connection, peer: &crate::socket::Socket, kind: Kind) {
    let requests = (1..=super::backlog::MAX_REQUESTS as u64).map(|seq| match kind {
        Kind::Oneway => ordered_request(Kind::Oneway, 3, 0, seq),
        _ => ordered_request(Kind::Call, 2, 1 + seq, seq),
    });
    take_in_through_a_call(b, peer, requests);
    assert!(b.shared.state.lock().backlog.full());
}

/// Has `b` take `requests` of the peer's in: a handler's call back into the peer (a thread
/// serving `b`, as far as the call can tell) takes them in, as it reads, before its reply,
/// past the queue's bounds too (any other caller would wait for room with the serving
/// threads).
pub(super) fn take_in_through_a_call(
    b: &Connection,
    peer: &crate::socket::Socket,
    requests: impl Iterator<Item = Vec<u8>>,
) {
    let caller = {
        let b = b.clone();
        std::thread::spawn(move || {
            let _handler = b.test_handler_scope();
            b.call::<_, u32>(&IFACE, 9, &(), None)
        })
    };
    let call = peer.recv().unwrap();
    for request in requests {
        peer.send(&request, &[]).unwrap();
    }
    peer.send(&reply_to(&call, &5u32), &[]).unwrap();
    assert_eq!(caller.join().unwrap().unwrap(), 5);
}

/// A serving thread of `a` that has taken the reader role and waits for the receive lock,
/// which the guard holds until it is dropped.
fn run_held_up(a: &Connection) -> (impl Sized + '_, std::thread::JoinHandle<Result<()>>) {
    let held = a.hold_receive();
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
