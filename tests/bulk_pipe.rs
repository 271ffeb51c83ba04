//! Call arguments through the connection's pipe, on connections that lend their pages to the
//! peer (`lend_pages_to_peer`; off by default, and off means no pipe): across real processes,
//! with the string starting mid-page, with the owner's buffer rewritten between calls,
//! alongside the region, for oneways and replies (which never pipe), and against a peer that
//! announces bytes its pipe does not hold.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use common::{
    checksum, child, fd_count_lock, fd_snapshot, fds_named, fill, filled, hold_pipe_lock,
    joined_never_stuck_on_the_pipe,
};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, SharedBytes, Socket, interface};

#[interface]
pub trait Sink {
    /// The checksum of `data`.
    fn sum(&self, data: SharedBytes) -> u64;
    /// The checksum of a `Vec<u8>` argument (which pipes like `SharedBytes` in a call).
    fn sum_vec(&self, data: Vec<u8>) -> u64;
    /// The checksums of two strings sent in one message.
    fn sums(&self, a: SharedBytes, b: SharedBytes) -> (u64, u64);
    /// `len` bytes made by `fill` with `seed`: a reply of `SharedBytes`.
    fn make(&self, len: u64, seed: u64) -> SharedBytes;
    /// Remembers the checksum of `data`.
    #[oneway]
    fn feed(&self, data: SharedBytes);
    /// The checksums of everything fed or summed so far, in order.
    fn fed(&self) -> Vec<u64>;
    /// Pipes (either end) this process holds open.
    fn pipes(&self) -> u64;
    /// Tells the test it is here, then waits until the test lets it go.
    #[oneway]
    fn hold(&self);
}

#[derive(Default)]
struct SinkImpl {
    fed: Arc<Mutex<Vec<u64>>>,
    /// `hold`'s channels: "entered" to the test, "go" (closed) from it.
    gate: Option<(Sender<()>, Mutex<Receiver<()>>)>,
}

impl Sink for SinkImpl {
    fn sum(&self, data: SharedBytes) -> u64 {
        let sum = checksum(&data);
        self.fed.lock().unwrap().push(sum);
        sum
    }
    fn sum_vec(&self, data: Vec<u8>) -> u64 {
        self.sum(SharedBytes::from(data))
    }
    fn sums(&self, a: SharedBytes, b: SharedBytes) -> (u64, u64) {
        (checksum(&a), checksum(&b))
    }
    fn make(&self, len: u64, seed: u64) -> SharedBytes {
        SharedBytes::from(filled(len as usize, seed))
    }
    fn feed(&self, data: SharedBytes) {
        self.fed.lock().unwrap().push(checksum(&data));
    }
    fn fed(&self) -> Vec<u64> {
        self.fed.lock().unwrap().clone()
    }
    fn pipes(&self) -> u64 {
        pipes()
    }
    fn hold(&self) {
        if let Some((entered, go)) = &self.gate {
            entered.send(()).unwrap();
            let _ = go.lock().unwrap().recv();
        }
    }
}

/// Pipe ends open in this process.
fn pipes() -> u64 {
    fds_named("pipe:")
}

/// A worker serving `Sink`, a client of it that lends its pages if told to, and the pipes
/// each side held before anything could pipe.
struct Spawned {
    child: Worker,
    sink: SinkClient,
    our_pipes: u64,
    workers_pipes: u64,
}

fn spawn_sink(lend: bool) -> Spawned {
    let (child, conn) = Worker::spawn(child("child_sink")).unwrap();
    conn.lend_pages_to_peer(lend);
    let sink = SinkClient::new(conn);
    let (our_pipes, workers_pipes) = (pipes(), sink.pipes().unwrap());
    Spawned {
        child,
        sink,
        our_pipes,
        workers_pipes,
    }
}

impl Spawned {
    /// Hangs up; the worker exits cleanly.
    fn finish(self) {
        let Spawned {
            mut child, sink, ..
        } = self;
        drop(sink);
        assert_eq!(child.wait().unwrap(), Exit::Code(0));
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_sink() {
    // Trusts its parent with pipes: the parent's calls pipe once the parent lends too.
    let connection = worker::connection().unwrap();
    connection.lend_pages_to_peer(true);
    SinkServer::new(SinkImpl::default())
        .serve(connection)
        .unwrap();
}

#[test]
fn shared_bytes_cross_through_a_pipe_and_the_owner_may_rewrite_them_after_the_call() {
    let _fds = fd_count_lock();
    // The kinds a connection and a worker hold (its pipe, region, socket, pidfd). Counting
    // every fd, this test once found one more at its start than at its end, in a CI run
    // (not in 32 runs since): an fd of something else closing meanwhile, not a leak.
    let before = common::ipc_fds();
    let spawned = spawn_sink(true);
    let (sink, our_pipes, workers_pipes) =
        (&spawned.sink, spawned.our_pipes, spawned.workers_pipes);
    // One buffer, reused: after each call the owner is its only holder again and rewrites
    // it, so bytes read late (after the call) would show as a wrong checksum.
    let mut buf = Arc::new(vec![0u8; 3 << 20]);
    // (start, len): from the pipe's smallest string up to a whole MiB starting mid-page
    // (whose last bytes cannot fit the pipe and follow inline), then sizes for the region.
    let cases = [
        (0, 128 << 10),
        (1, 200_003),
        (4095, 1 << 20),
        (17, (1 << 20) - 17),
        (0, (1 << 20) + 1),
        (3, (128 << 10) - 1),
        (5, 2 << 20),
    ];
    for round in 0..3u64 {
        for (i, &(start, len)) in cases.iter().enumerate() {
            let seed = round * 100 + i as u64;
            fill(
                Arc::get_mut(&mut buf).expect("the connection let go of the bytes"),
                seed,
            );
            let want = checksum(&buf[start..start + len]);
            let bytes = SharedBytes::from(Arc::clone(&buf)).slice(start..start + len);
            assert_eq!(
                sink.sum(bytes).unwrap(),
                want,
                "{len} B at {start}, round {round}"
            );
        }
    }
    // The client made one pipe (both its ends stay here) and sent the worker its read end.
    assert_eq!(pipes(), our_pipes + 2);
    assert_eq!(sink.pipes().unwrap(), workers_pipes + 1);
    // Two big strings in one message: one through the pipe, the other through the region.
    let (a, b) = (vec![1u8; 200_000], vec![2u8; 300_000]);
    let (sa, sb) = (checksum(&a), checksum(&b));
    assert_eq!(
        sink.sums(SharedBytes::from(a), SharedBytes::from(b))
            .unwrap(),
        (sa, sb)
    );
    spawned.finish();
    assert_eq!(
        common::ipc_fds(),
        before,
        "the pipe is closed with its connection"
    );
}

#[test]
fn oneways_and_replies_do_not_pipe_and_arrive_whole() {
    let _fds = fd_count_lock();
    let spawned = spawn_sink(true);
    let (sink, our_pipes, workers_pipes) =
        (&spawned.sink, spawned.our_pipes, spawned.workers_pipes);
    let sent: Vec<Vec<u8>> = (0..8)
        .map(|i| filled((64 << 10) + i * 10_001, i as u64))
        .collect();
    for data in &sent {
        sink.feed(SharedBytes::from(data.clone())).unwrap();
    }
    let want: Vec<u64> = sent.iter().map(|d| checksum(d)).collect();
    assert_eq!(sink.fed().unwrap(), want);
    // A reply of `SharedBytes` is bytes like any other.
    let want = filled(500_000, 99);
    assert!(
        sink.make(500_000, 99).unwrap() == SharedBytes::from(want),
        "made bytes"
    );
    // Neither side made a pipe.
    assert_eq!(pipes(), our_pipes);
    assert_eq!(sink.pipes().unwrap(), workers_pipes);
    spawned.finish();
}

/// A call's `Vec<u8>` argument pipes too: the stub owns it, and hands it to the connection to
/// keep until the peer has read it.
#[test]
fn a_calls_vec_argument_pipes_when_large_enough() {
    let _fds = fd_count_lock();
    let spawned = spawn_sink(true);
    let (sink, our_pipes, workers_pipes) =
        (&spawned.sink, spawned.our_pipes, spawned.workers_pipes);
    let small = filled((128 << 10) - 1, 5);
    assert_eq!(sink.sum_vec(small.clone()).unwrap(), checksum(&small));
    assert_eq!(pipes(), our_pipes, "too small to pipe");
    for round in 0..3u64 {
        let data = filled(700_001, round);
        let want = checksum(&data);
        assert_eq!(sink.sum_vec(data).unwrap(), want, "round {round}");
    }
    assert_eq!(pipes(), our_pipes + 2);
    assert_eq!(sink.pipes().unwrap(), workers_pipes + 1);
    spawned.finish();
}

/// Lending pages is off by default: nothing pipes until the connection says so.
#[test]
fn a_connection_lends_its_pages_only_when_told_to() {
    let _fds = fd_count_lock();
    let spawned = spawn_sink(false);
    let (sink, our_pipes, workers_pipes) =
        (&spawned.sink, spawned.our_pipes, spawned.workers_pipes);
    let data = filled(700_001, 7);
    let want = checksum(&data);
    assert_eq!(sink.sum_vec(data.clone()).unwrap(), want);
    assert_eq!(sink.sum(SharedBytes::from(data.clone())).unwrap(), want);
    assert_eq!(pipes(), our_pipes, "through the region, not a pipe");
    sink.connection().lend_pages_to_peer(true);
    assert_eq!(sink.sum(SharedBytes::from(data)).unwrap(), want);
    assert_eq!(pipes(), our_pipes + 2);
    assert_eq!(sink.pipes().unwrap(), workers_pipes + 1);
    spawned.finish();
}

/// A peer that does not trust this end with pipes is not sent any: the call's bytes go
/// through the region, and the call works.
#[test]
fn a_connection_pipes_only_to_a_peer_that_trusts_it_too() {
    let _fds = fd_count_lock();
    let base = pipes();
    let (ours, theirs) = Connection::pair().unwrap();
    let server = std::thread::spawn(move || SinkServer::new(SinkImpl::default()).serve(theirs));
    ours.lend_pages_to_peer(true);
    let sink = SinkClient::new(ours);
    sink.pipes().unwrap(); // a first reply: the server reads lanes
    let data = vec![3; 200_000];
    assert_eq!(
        sink.sum(SharedBytes::from(data.clone())).unwrap(),
        checksum(&data)
    );
    assert_eq!(pipes(), base, "through the region, not a pipe");
    drop(sink);
    server.join().unwrap().unwrap();
}

/// A call of `sum` as a hostile client writes it: envelope (with a lane word saying it reads
/// lanes), then the argument as a piped reference to `pipe` (if given) claiming `len`
/// bytes, and `tail` inline.
fn raw_sum(socket: &Socket, cookie: u64, pipe: Option<&OwnedFd>, len: u64, tail: &[u8]) -> Vec<u8> {
    let mut msg = common::call_envelope(&SINK_INFO, 0, cookie); // cmd 0: sum
    msg.push(2); // tag: piped
    msg.extend_from_slice(&(cookie as u32).to_le_bytes()); // seq
    msg.extend_from_slice(&(if pipe.is_some() { 0u32 } else { u32::MAX }).to_le_bytes());
    msg.extend_from_slice(&len.to_le_bytes());
    msg.extend_from_slice(&(tail.len() as u64).to_le_bytes());
    msg.extend_from_slice(tail);
    let fds: Vec<_> = pipe.iter().map(|fd| fd.as_fd()).collect();
    common::raw_call(socket, &msg, &fds, cookie)
}

/// A server on `theirs` that trusts its peer with pipes, so that it reads the pipes a
/// hostile client (`ours`, whose announcement of that it takes in here) sends.
fn trusting_server(ours: &Socket, theirs: Socket) -> JoinHandle<typed_ipc::Result<()>> {
    let connection = Connection::new(theirs);
    connection.lend_pages_to_peer(true);
    let announced = ours.recv().unwrap();
    assert_eq!(announced.payload[0], 5, "an announcement first");
    std::thread::spawn(move || SinkServer::new(SinkImpl::default()).serve(connection))
}

#[test]
fn a_peer_announcing_bytes_its_pipe_lacks_fails_the_call_at_once_not_the_server() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (ours, theirs) = Socket::pair().unwrap();
    let server = trusting_server(&ours, theirs);
    let failure = |payload: &[u8], why: &str| {
        assert_eq!(payload[0], 4, "a failure reply");
        let text = String::from_utf8_lossy(payload);
        assert!(text.contains(why), "{why:?} not in {text:?}");
    };
    failure(&raw_sum(&ours, 1, None, 10, b""), "announced no pipe");
    // A memfd is not a pipe.
    let memfd: OwnedFd = common::memfd(&[7; 100]);
    failure(&raw_sum(&ours, 2, Some(&memfd), 10, b""), "not a pipe");
    // A pipe holding fewer bytes than announced: refused at once, nothing waits for more
    // (we keep the write end open, so a blocking read would hang).
    let (read, write) = nix::unistd::pipe().unwrap();
    nix::unistd::write(&write, &[9; 1000]).unwrap();
    failure(
        &raw_sum(&ours, 3, Some(&read), 5000, b""),
        "holds 1000 bytes",
    );
    // More than a pipe can hold, before anything is allocated.
    failure(
        &raw_sum(&ours, 4, None, 1 << 40, b""),
        "more than a pipe holds",
    );
    // And the server still serves: the 1000 bytes and a tail make one string.
    let ok = raw_sum(&ours, 5, None, 1000, b"xyz");
    assert_eq!(ok[0], 3, "a reply");
    let mut want = vec![9; 1000];
    want.extend_from_slice(b"xyz");
    assert!(ok.ends_with(&checksum(&want).to_le_bytes()), "{ok:?}");
    assert_eq!(
        &ok[1..4],
        &[5, 0, 0x80],
        "the reply acknowledged placement 5"
    );
    drop((ours, read, write, memfd));
    server.join().unwrap().unwrap();
    before.assert_nothing_new();
}

/// Every read of a pipe (`FIONREAD`, `read`, `vmsplice`) first takes the pipe's lock, and a
/// peer that holds the other end can hold that lock for as long as it likes: a `splice` from
/// a socket with nothing to read into the pipe sleeps with it held. A receiver that reads an
/// untrusted peer's pipe then waits in uninterruptible sleep, where not even `SIGKILL` ends
/// the process, until the peer lets go. So a server that trusts nobody must answer a piped
/// byte string without touching the pipe.
#[test]
fn a_peer_holding_its_pipes_lock_does_not_stall_the_server() {
    let _fds = fd_count_lock();
    let (ours, theirs) = Socket::pair().unwrap();
    let server = std::thread::spawn(move || {
        SinkServer::new(SinkImpl::default()).serve(Connection::new(theirs))
    });
    let (read, write) = nix::unistd::pipe().unwrap();
    let held = hold_pipe_lock(write);
    let caller = {
        let read = read.try_clone().unwrap();
        std::thread::spawn(move || {
            let reply = raw_sum(&ours, 1, Some(&read), 10, b"");
            (ours, reply)
        })
    };
    let ((ours, reply), write) = joined_never_stuck_on_the_pipe(caller, held);
    assert_eq!(reply[0], 4, "a failure reply");
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("reads no pipes from its peer"), "{text}");
    drop((ours, read, write));
    server.join().unwrap().unwrap();
}

/// A server over `ours`'s peer, its only serving thread held in `hold` (cmd 7), is sent
/// `sum` (cmd 0) with a piped string (seq 2, fd index 0, then `rest`) naming the read end of
/// a pipe whose lock this test then holds, its own copy closed, so that the server's queued
/// copy is the last; then the server is let go. Returns the client socket, the lock holder
/// (for `joined_never_stuck_on_the_pipe`) and the serving thread.
fn a_held_server_sent_a_peers_pipe(
    rest: &[u8],
) -> (
    Socket,
    (JoinHandle<OwnedFd>, std::os::unix::net::UnixStream),
    JoinHandle<typed_ipc::Result<()>>,
) {
    let (ours, theirs) = Socket::pair().unwrap();
    let (entered, held) = channel();
    let (go, wait) = channel();
    let sink = SinkImpl {
        fed: Arc::default(),
        gate: Some((entered, Mutex::new(wait))),
    };
    let server = std::thread::spawn(move || SinkServer::new(sink).serve(Connection::new(theirs)));
    // `hold` (cmd 7) keeps the only serving thread until `go`: the next call waits, queued.
    ours.send(&common::call_envelope(&SINK_INFO, 7, 1), &[])
        .unwrap();
    held.recv().unwrap();
    let (read, write) = nix::unistd::pipe().unwrap();
    let mut msg = common::call_envelope(&SINK_INFO, 0, 2); // cmd 0: sum, piped
    msg.push(2);
    for word in [2u32, 0] {
        msg.extend_from_slice(&word.to_le_bytes()); // seq, fd index
    }
    msg.extend_from_slice(rest);
    ours.send(&msg, &[read.as_fd()]).unwrap();
    drop(read); // the server's copy, queued, is the last
    let held = hold_pipe_lock(write);
    go.send(()).unwrap();
    (ours, held, server)
}

/// Closing a pipe's last fd takes the pipe's lock too (`pipe_release`): a hostile peer that
/// sends its pipe's read end, closes its own copy and holds the lock stalls whichever thread
/// of ours closes the fd. The server, which reads no pipes from this peer, refuses the piped
/// string unread: the fd it named goes to typed-ipc's closer, not closed on a serving thread.
#[test]
fn closing_a_peers_pipe_does_not_stall_the_server() {
    let _fds = fd_count_lock();
    let mut rest = 10u64.to_le_bytes().to_vec(); // piped length
    rest.extend_from_slice(&0u64.to_le_bytes()); // tail length
    let (ours, held, server) = a_held_server_sent_a_peers_pipe(&rest);
    let caller = std::thread::spawn(move || {
        let replies = [ours.recv().unwrap(), ours.recv().unwrap()];
        (ours, replies)
    });
    let ((ours, _replies), write) = joined_never_stuck_on_the_pipe(caller, held);
    drop((ours, write));
    server.join().unwrap().unwrap();
}

/// The same peer, its piped string cut off after the reference, before the rest of the
/// string (its tail): the decode has taken the fd from the message's table by then, and fails
/// reading the tail. The fd must still go to the closer, not be closed on the serving thread.
#[test]
fn a_peers_pipe_named_by_a_string_cut_short_does_not_stall_the_server() {
    let _fds = fd_count_lock();
    // The piped length, and no tail: the message ends.
    let (ours, held, server) = a_held_server_sent_a_peers_pipe(&10u64.to_le_bytes());
    let caller = std::thread::spawn(move || {
        // Whatever the server answers, up to its failure for the call, or its hang-up.
        while let Ok(reply) = ours.recv() {
            if reply.payload[0] == 4 {
                break;
            }
        }
        ours
    });
    let (ours, write) = joined_never_stuck_on_the_pipe(caller, held);
    drop((ours, write));
    let _ = server.join().unwrap();
}

/// A peer this end once trusted with pipes lent it one, which the connection keeps for the
/// next piped string; then the trust was taken back (`lend_pages_to_peer(false)`). The peer
/// closes its own copy of the read end and holds the pipe's lock: the connection's copy is
/// now the last, and closing it waits for the peer. When the connection goes, that close
/// must not stall whichever thread lets go of the connection last (here, the serving one).
#[test]
fn a_kept_pipe_of_a_peer_no_longer_trusted_is_not_closed_on_the_serving_thread() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (ours, theirs) = Socket::pair().unwrap();
    let connection = Connection::new(theirs);
    connection.lend_pages_to_peer(true);
    assert_eq!(ours.recv().unwrap().payload[0], 5, "an announcement");
    let server = {
        let connection = connection.clone();
        std::thread::spawn(move || SinkServer::new(SinkImpl::default()).serve(connection))
    };
    let (read, write) = nix::unistd::pipe().unwrap();
    nix::unistd::write(&write, &[9; 1000]).unwrap();
    let ok = raw_sum(&ours, 1, Some(&read), 1000, b"");
    assert_eq!(ok[0], 3, "a reply: the pipe was read, and is kept");
    connection.lend_pages_to_peer(false);
    assert_eq!(ours.recv().unwrap().payload[0], 5, "trust taken back");
    drop(read); // the connection's copy is the last
    let held = hold_pipe_lock(write);
    let caller = std::thread::spawn(move || {
        drop(connection);
        drop(ours); // hang up: the serving thread lets go of the connection last
        server.join().unwrap()
    });
    let (served, write) = joined_never_stuck_on_the_pipe(caller, held);
    served.unwrap();
    drop(write);
    before.assert_nothing_new(); // the kept pipe too, closed once let go
}

/// `codec::decode` promises that the fds a value does not claim are closed off the decoding
/// thread. A byte string out of line (placed, or piped) decoded with no connection to fetch it
/// from is refused; the fd its reference named is the peer's, and must go to the closer too.
#[test]
fn decoding_a_string_out_of_line_without_a_connection_leaves_its_fd_to_the_closer() {
    let _fds = fd_count_lock();
    for tag in [1u8, 2] {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&1u32.to_le_bytes()); // seq
        bytes.extend_from_slice(&0u32.to_le_bytes()); // fd index
        if tag == 1 {
            bytes.extend_from_slice(&0u64.to_le_bytes()); // offset
        }
        bytes.extend_from_slice(&10u64.to_le_bytes()); // length
        if tag == 2 {
            bytes.extend_from_slice(&0u64.to_le_bytes()); // tail length
        }
        let (read, write) = nix::unistd::pipe().unwrap();
        let held = hold_pipe_lock(write);
        let caller = std::thread::spawn(move || {
            typed_ipc::codec::decode::<SharedBytes>(&bytes, vec![read]).map(drop)
        });
        let (decoded, write) = joined_never_stuck_on_the_pipe(caller, held);
        assert!(
            decoded.is_err(),
            "tag {tag}: no connection to fetch it from"
        );
        drop(write);
    }
}

/// Bytes waiting in the pipe behind `fd` (either end).
fn bytes_in(fd: &OwnedFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is valid and ours.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(fd), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0);
    n as usize
}

/// `vmsplice` on a pipe's write end goes the other way: it would put the receiver's own
/// (uninitialised) memory into the peer's pipe, for the peer to read, and hand the call a
/// `Vec` of uninitialised bytes. So only a read end is taken as the peer's pipe.
#[test]
fn a_peer_sending_its_pipes_write_end_is_refused_and_gets_none_of_our_memory() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (ours, theirs) = Socket::pair().unwrap();
    let server = trusting_server(&ours, theirs);
    let (read, write) = nix::unistd::pipe().unwrap();
    nix::unistd::write(&write, &[9; 1000]).unwrap();
    let reply = raw_sum(&ours, 1, Some(&write), 1000, b"");
    assert_eq!(
        bytes_in(&read),
        1000,
        "the server put bytes of its own into the peer's pipe"
    );
    assert_eq!(reply[0], 4, "a failure reply: {reply:?}");
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("read end"), "{text:?}");
    // The server still serves.
    let ok = raw_sum(&ours, 2, Some(&read), 1000, b"");
    assert_eq!(ok[0], 3, "a reply");
    assert!(ok.ends_with(&checksum(&[9; 1000]).to_le_bytes()), "{ok:?}");
    drop((ours, read, write));
    server.join().unwrap().unwrap();
    before.assert_nothing_new();
}

/// `Sink` as `async fn`s: the same interface on the wire.
#[cfg(feature = "tokio")]
mod asynchronous {
    use typed_ipc::SharedBytes;

    #[typed_ipc::interface]
    pub trait Sink {
        async fn sum(&self, data: SharedBytes) -> u64;
        async fn sum_vec(&self, data: Vec<u8>) -> u64;
        async fn sums(&self, a: SharedBytes, b: SharedBytes) -> (u64, u64);
        async fn make(&self, len: u64, seed: u64) -> SharedBytes;
        #[oneway]
        async fn feed(&self, data: SharedBytes);
        async fn fed(&self) -> Vec<u64>;
        async fn pipes(&self) -> u64;
        #[oneway]
        async fn hold(&self);
    }
}

/// The async flavour pipes its calls' `SharedBytes` too, to a blocking worker.
#[cfg(feature = "tokio")]
#[test]
fn an_async_caller_pipes_shared_bytes_to_a_blocking_worker() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let runtime = common::two_worker_runtime();
    runtime.block_on(async {
        let (mut child, conn) = typed_ipc::tokio::worker::spawn(child("child_sink")).unwrap();
        conn.lend_pages_to_peer(true);
        let sink = asynchronous::SinkClient::new(conn);
        let workers_pipes = sink.pipes().await.unwrap();
        let mut buf = Arc::new(vec![0u8; 1 << 20]);
        for round in 0..3u64 {
            for len in [64 << 10, 300_001, (1 << 20) - 1] {
                fill(Arc::get_mut(&mut buf).expect("let go"), round ^ len as u64);
                let want = checksum(&buf[1..1 + len]);
                let bytes = SharedBytes::from(Arc::clone(&buf)).slice(1..1 + len);
                assert_eq!(
                    sink.sum(bytes).await.unwrap(),
                    want,
                    "{len} B, round {round}"
                );
            }
        }
        assert_eq!(sink.pipes().await.unwrap(), workers_pipes + 1);
        drop(sink);
        assert_eq!(
            typed_ipc::tokio::worker::wait(&mut child).await.unwrap(),
            Exit::Code(0)
        );
    });
    drop(runtime);
    before.assert_nothing_new();
}

/// An in-process server whose one serving thread is held in `hold`, reading nothing, until
/// `go` is dropped; the checksums it has summed; and a client that knows it reads lanes.
struct Held {
    sink: SinkClient,
    go: Sender<()>,
    fed: Arc<Mutex<Vec<u64>>>,
    server: JoinHandle<typed_ipc::Result<()>>,
}

/// Calls `sum` with `bytes`, which the held server cannot answer: the call times out.
fn give_up_sum(sink: &SinkClient, bytes: SharedBytes) {
    let late = sink
        .with_timeout(std::time::Duration::from_millis(20))
        .sum(bytes);
    assert!(matches!(late, Err(typed_ipc::Error::TimedOut)), "{late:?}");
}

fn held_server() -> Held {
    let (ours, theirs) = Connection::pair().unwrap();
    let (entered, held) = channel();
    let (go, wait) = channel();
    let fed = Arc::new(Mutex::new(Vec::new()));
    let sink = SinkImpl {
        fed: fed.clone(),
        gate: Some((entered, Mutex::new(wait))),
    };
    theirs.lend_pages_to_peer(true);
    let server = std::thread::spawn(move || SinkServer::new(sink).serve(theirs));
    ours.lend_pages_to_peer(true);
    let sink = SinkClient::new(ours);
    sink.pipes().unwrap(); // a first reply: the server reads lanes
    sink.hold().unwrap();
    held.recv().unwrap();
    Held {
        sink,
        go,
        fed,
        server,
    }
}

/// A call given up before the peer read its bytes leaves them pinned: the owner cannot
/// rewrite them (`Arc::get_mut` fails) until the peer has read them, so the peer reads what
/// was sent, late as it is.
#[test]
fn the_bytes_of_a_call_given_up_stay_pinned_until_the_peer_has_read_them() {
    let _fds = fd_count_lock(); // opens fds: keep them out of the counting tests' windows
    let Held {
        sink,
        go,
        fed,
        server,
    } = held_server();
    let mut buf = Arc::new(vec![0u8; 200_000]);
    fill(Arc::get_mut(&mut buf).unwrap(), 1);
    let want = checksum(&buf);
    give_up_sum(&sink, SharedBytes::from(Arc::clone(&buf)));
    assert!(
        Arc::get_mut(&mut buf).is_none(),
        "the connection still holds the bytes the server has not read"
    );
    drop(go);
    // The server read the given-up call's bytes as they were sent; its replies acknowledged
    // them, and the owner has its buffer back.
    assert_eq!(sink.fed().unwrap(), vec![want]);
    assert_eq!(*fed.lock().unwrap(), vec![want]);
    fill(Arc::get_mut(&mut buf).expect("let go once read"), 2);
    drop(sink);
    server.join().unwrap().unwrap();
}

/// A call refused unread leaves its bytes in the pipe: the sender empties it, announces the
/// pipe again (the refused message's fd was closed unread), and the next strings read right.
#[test]
fn a_refused_call_empties_the_pipe_and_announces_it_again() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let _fds = fd_count_lock(); // opens fds: keep them out of the counting tests' windows
    let (ours, theirs) = Connection::pair().unwrap();
    let refuse = Arc::new(AtomicBool::new(false));
    theirs.set_authorizer({
        let refuse = refuse.clone();
        move |_, _, _| match refuse.load(Ordering::SeqCst) {
            true => Err("not now".into()),
            false => Ok(()),
        }
    });
    theirs.lend_pages_to_peer(true);
    let server = std::thread::spawn(move || SinkServer::new(SinkImpl::default()).serve(theirs));
    ours.lend_pages_to_peer(true);
    let sink = SinkClient::new(ours);
    // The first reply tells us the server reads lanes.
    assert_eq!(sink.fed().unwrap(), Vec::<u64>::new());
    refuse.store(true, Ordering::SeqCst);
    for round in 0..2u8 {
        let refused = sink.sum(SharedBytes::from(vec![round; 200_000]));
        assert!(
            matches!(refused, Err(typed_ipc::Error::Refused(_))),
            "{refused:?}"
        );
    }
    refuse.store(false, Ordering::SeqCst);
    for round in 0..3u64 {
        let data = filled(300_000, round);
        let want = checksum(&data);
        assert_eq!(
            sink.sum(SharedBytes::from(data)).unwrap(),
            want,
            "round {round}"
        );
    }
    drop(sink);
    server.join().unwrap().unwrap();
}

/// A connection dropped with bytes its peer has not read yet takes them back: once their
/// owner lets go they may change, so the late request is refused rather than read.
#[test]
fn a_dropped_connection_takes_back_the_bytes_its_peer_had_not_read() {
    let _fds = fd_count_lock(); // opens fds: keep them out of the counting tests' windows
    let Held {
        sink,
        go,
        fed,
        server,
    } = held_server();
    give_up_sum(&sink, SharedBytes::from(vec![7; 200_000]));
    drop(sink);
    drop(go);
    server.join().unwrap().unwrap();
    assert_eq!(
        *fed.lock().unwrap(),
        Vec::<u64>::new(),
        "the late call was not run"
    );
}

/// A process keeps at most 16 pipes (a quarter of what all of a user's pipes may hold by
/// default); further connections use their regions, and a closed connection's pipe frees its
/// place for the next that wants one.
#[test]
fn a_process_keeps_at_most_sixteen_pipes_then_uses_regions() {
    let _fds = fd_count_lock();
    let base = pipes();
    let sum_big = |sink: &SinkClient, seed: u8| {
        let data = vec![seed; 200_000];
        assert_eq!(sink.sum_vec(data.clone()).unwrap(), checksum(&data));
    };
    let mut conns = Vec::new();
    for i in 0..17u8 {
        let (ours, theirs) = Connection::pair().unwrap();
        theirs.lend_pages_to_peer(true);
        let server = std::thread::spawn(move || SinkServer::new(SinkImpl::default()).serve(theirs));
        ours.lend_pages_to_peer(true);
        let sink = SinkClient::new(ours);
        sink.pipes().unwrap(); // a first reply: the server reads lanes
        sum_big(&sink, i);
        conns.push((sink, server));
    }
    // Each pipe is three fds here: both ends of the caller's, and the read end its server took.
    assert_eq!(
        pipes(),
        base + 16 * 3,
        "the 17th call went through the region"
    );
    let (first, server) = conns.remove(0);
    drop(first);
    server.join().unwrap().unwrap();
    assert_eq!(pipes(), base + 15 * 3);
    sum_big(&conns.last().unwrap().0, 99);
    assert_eq!(pipes(), base + 16 * 3, "the 17th connection has a pipe now");
    for (sink, server) in conns {
        drop(sink);
        server.join().unwrap().unwrap();
    }
    assert_eq!(pipes(), base);
}
