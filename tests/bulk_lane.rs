//! Large byte strings through the connection's shared-memory lane: across real processes,
//! both ways, reused round after round, under concurrency, for oneways, and against a peer
//! that sends bad references or bad regions.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{checksum, child, fd_count_lock, fd_snapshot, filled, memfd_mappings, regions};
use typed_ipc::shared_region::SharedRegion;
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, Socket, interface};

#[interface]
pub trait Bulk {
    /// `data` with every byte incremented.
    fn bump(&self, data: Vec<u8>) -> Vec<u8>;
    /// The lengths of two byte strings sent in one message.
    fn lens(&self, a: Vec<u8>, b: Vec<u8>) -> (u64, u64);
    /// Remembers the checksum of `data`.
    #[oneway]
    fn feed(&self, data: Vec<u8>);
    /// The checksums of everything fed so far, in order.
    fn fed(&self) -> Vec<u64>;
    /// How many shared regions this process holds open.
    fn regions(&self) -> u64;
}

#[derive(Default)]
struct BulkImpl(Mutex<Vec<u64>>);

impl Bulk for BulkImpl {
    fn bump(&self, data: Vec<u8>) -> Vec<u8> {
        bumped(&data)
    }
    fn lens(&self, a: Vec<u8>, b: Vec<u8>) -> (u64, u64) {
        (a.len() as u64, b.len() as u64)
    }
    fn feed(&self, data: Vec<u8>) {
        self.0.lock().unwrap().push(checksum(&data));
    }
    fn fed(&self) -> Vec<u64> {
        self.0.lock().unwrap().clone()
    }
    fn regions(&self) -> u64 {
        regions()
    }
}

/// What `bump` returns for `data`.
fn bumped(data: &[u8]) -> Vec<u8> {
    data.iter().map(|b| b.wrapping_add(1)).collect()
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_bulk() {
    BulkServer::new(BulkImpl::default())
        .serve(worker::connection().unwrap())
        .unwrap();
}

/// `rounds` rounds of `bump` over `sizes`, each checked. The strings differ from round to
/// round while the same regions are rewritten, so stale bytes would show.
fn bump_rounds(bulk: &BulkClient, sizes: &[usize], rounds: u64) {
    for round in 0..rounds {
        for (i, &len) in sizes.iter().enumerate() {
            let data = filled(len, round * 100 + i as u64);
            let want = bumped(&data);
            assert!(
                bulk.bump(data).unwrap() == want,
                "{len} bytes, round {round}"
            );
        }
    }
}

#[test]
fn big_byte_strings_cross_through_shared_regions_both_ways() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (mut child, conn) = Worker::spawn(child("child_bulk")).unwrap();
    let bulk = BulkClient::new(conn);
    let sizes = [
        0,
        32 * 1024 - 1,
        32 * 1024,
        1 << 20,
        (5 << 20) + 3,
        32 << 20,
        (32 << 20) + 1,
    ];
    bump_rounds(&bulk, &sizes, 3);
    // Each side holds its own region and a view of the other's: the lane was used both ways.
    assert_eq!(regions(), 2);
    assert_eq!(bulk.regions().unwrap(), 2);
    // Two big strings in one message: one goes through the region, the other inline.
    assert_eq!(
        bulk.lens(vec![1; 100_000], vec![2; 200_000]).unwrap(),
        (100_000, 200_000)
    );
    drop(bulk);
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
    drop(child);
    before.assert_nothing_new();
}

/// Calls the worker until it holds `n` regions: a message that announces a region given
/// back is taken in by whichever of its threads reads it, which may still be at it when the
/// next call runs. Fails the test after 10 s.
fn worker_comes_to_hold(n: u64, regions: impl Fn() -> u64) {
    let since = Instant::now();
    while regions() != n {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "the worker still maps the region given back"
        );
    }
}

#[test]
fn shared_memory_released_goes_at_both_ends_and_comes_back_when_needed() {
    let _fds = fd_count_lock();
    let (mut child, conn) = Worker::spawn(child("child_bulk")).unwrap();
    let bulk = BulkClient::new(conn);
    bulk.regions().unwrap(); // the worker has spoken: the lane may be used from now on
    bump_rounds(&bulk, &[32 << 20], 1);
    assert_eq!((regions(), bulk.regions().unwrap()), (2, 2));
    assert_eq!(bulk.connection().release_shared_memory(), 32 << 20);
    assert_eq!(
        (regions(), memfd_mappings()),
        (1, 1),
        "ours is gone: only the worker's is left, mapped"
    );
    worker_comes_to_hold(1, || bulk.regions().unwrap());
    assert_eq!(
        bulk.connection().release_shared_memory(),
        0,
        "given back once"
    );
    // The next large string makes a new region, of its own size.
    bump_rounds(&bulk, &[100_000], 2);
    assert_eq!((regions(), bulk.regions().unwrap()), (2, 2));
    assert_eq!(bulk.connection().release_shared_memory(), 128 << 10);
    worker_comes_to_hold(1, || bulk.regions().unwrap());
    drop(bulk);
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

/// An interface the worker does not serve: it refuses its calls without reading them.
#[interface]
pub trait Unserved {
    fn take(&self, data: Vec<u8>) -> u64;
}

/// Our region is replaced by a larger one in a call the worker refuses unread (an interface
/// it does not serve): it closed the new region's fd unread and still maps the old one,
/// which we no longer have. Giving ours back must unmap that one there too.
#[test]
fn shared_memory_released_after_an_unread_region_goes_at_both_ends() {
    let _fds = fd_count_lock();
    let (mut child, conn) = Worker::spawn(child("child_bulk")).unwrap();
    let bulk = BulkClient::new(conn);
    let unserved = UnservedClient::new(bulk.connection().clone());
    bulk.regions().unwrap(); // the worker has spoken: the lane may be used from now on
    // Over the 1 MiB a parent may write into its worker: through our region (2 MiB).
    let small = bulk.lens(vec![1; (1 << 20) + 1], Vec::new()).unwrap();
    assert_eq!(small, ((1 << 20) + 1, 0));
    assert_eq!((regions(), bulk.regions().unwrap()), (1, 1));
    assert!(unserved.take(vec![2; 3 << 20]).is_err(), "refused unread");
    assert_eq!(bulk.connection().release_shared_memory(), 4 << 20);
    assert_eq!((regions(), memfd_mappings()), (0, 0), "ours is gone");
    worker_comes_to_hold(0, || bulk.regions().unwrap());
    drop((bulk, unserved));
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

#[test]
fn concurrent_bulk_callers_each_get_their_own_bytes() {
    let _fds = fd_count_lock(); // opens fds: keep them out of the counting tests' windows
    let (mut child, conn) = Worker::spawn(child("child_bulk")).unwrap();
    let bulk = BulkClient::new(conn);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let bulk = bulk.clone();
            std::thread::spawn(move || {
                for round in 0..20u64 {
                    let len = (256 << 10) + (round as usize * 97_003) % (2 << 20);
                    let data = filled(len, t * 1000 + round);
                    let want = bumped(&data);
                    assert!(bulk.bump(data).unwrap() == want, "thread {t} round {round}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(bulk);
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

#[test]
fn bulk_oneways_arrive_whole_and_in_order() {
    let _fds = fd_count_lock(); // opens fds: keep them out of the counting tests' windows
    let (mut child, conn) = Worker::spawn(child("child_bulk")).unwrap();
    let bulk = BulkClient::new(conn);
    bulk.regions().unwrap(); // the worker has spoken: the lane may be used from now on
    let sent: Vec<Vec<u8>> = (0..30)
        .map(|i| filled(100_000 + i * 4099, i as u64))
        .collect();
    for data in &sent {
        bulk.feed(data.clone()).unwrap();
    }
    let want: Vec<u64> = sent.iter().map(|d| checksum(d)).collect();
    assert_eq!(bulk.fed().unwrap(), want);
    drop(bulk);
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

/// A call of `bump` as a hostile client writes it: envelope (with a lane word saying it reads
/// lanes), then the argument as an out-of-line reference (`Placed`) to `region`'s fd.
fn raw_bump(socket: &Socket, cookie: u64, fd: Option<&OwnedFd>, offset: u64, len: u64) -> Vec<u8> {
    let mut msg = common::call_envelope(&BULK_INFO, 0, cookie); // cmd 0: bump
    msg.push(1); // tag: out of line
    msg.extend_from_slice(&(cookie as u32).to_le_bytes()); // seq
    msg.extend_from_slice(&(if fd.is_some() { 0u32 } else { u32::MAX }).to_le_bytes());
    msg.extend_from_slice(&offset.to_le_bytes());
    msg.extend_from_slice(&len.to_le_bytes());
    let fds: Vec<_> = fd.iter().map(|fd| fd.as_fd()).collect();
    common::raw_call(socket, &msg, &fds, cookie)
}

/// Fails unless `payload` is a failure reply that says `why`.
fn failure(payload: &[u8], why: &str) {
    assert_eq!(payload[0], 4, "a failure reply");
    let text = String::from_utf8_lossy(payload);
    assert!(text.contains(why), "{why:?} not in {text:?}");
}

#[test]
fn bad_references_and_bad_regions_fail_the_call_not_the_server() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (ours, theirs) = Socket::pair().unwrap();
    let server = std::thread::spawn(move || {
        BulkServer::new(BulkImpl::default()).serve(Connection::new(theirs))
    });
    // No region announced yet.
    failure(
        &raw_bump(&ours, 1, None, 0, 10),
        "announced no shared region",
    );
    // A memfd anyone can write is not a region.
    let writable: OwnedFd = common::memfd(&[7; 100]);
    failure(
        &raw_bump(&ours, 2, Some(&writable), 0, 10),
        "not a shared region",
    );
    // A real region, but bytes outside it, or more than the lane accepts.
    let mut region = SharedRegion::new(64 << 10).unwrap();
    let fd = region.as_fd().try_clone_to_owned().unwrap();
    failure(
        &raw_bump(&ours, 3, Some(&fd), 60 << 10, 8 << 10),
        "outside a shared region",
    );
    common::assert_too_large(&raw_bump(&ours, 4, None, 0, 1 << 40), 1 << 40);
    // And the server is still serving: a good reference is read from the region in place.
    // The region is announced again: a call that failed did not leave it with the server.
    region[..3].copy_from_slice(b"abc");
    let ok = raw_bump(&ours, 5, Some(&fd), 0, 3);
    assert_eq!(ok[0], 3, "a reply");
    assert!(ok.ends_with(b"bcd"), "{ok:?}");
    // The reply acknowledged placement 5 in its lane word.
    assert_eq!(&ok[1..4], &[5, 0, 0x80]);
    drop((ours, fd, writable, region));
    server.join().unwrap().unwrap();
    before.assert_nothing_new();
}

/// The lane's own cap on a placed string (32 MiB: no sender of ours places a larger one, it
/// goes inline).
const LANE_MAX: u64 = 32 << 20;

/// A server's limits above the lane's cap.
fn limits_above_the_lanes_cap() -> typed_ipc::Limits {
    typed_ipc::Limits {
        max_message_len: 2 * LANE_MAX as usize,
        ..typed_ipc::Limits::default()
    }
}

/// A hostile client's placements to a server whose `max_message_len` is above the lane's
/// cap: one over the cap but within the limit is malformed, and its failure does not name a
/// limit the string is within; one over the limit is `TooLarge`, over the limit set.
fn placements_over_the_lanes_cap_are_refused_for_what_they_are_over(ours: &Socket) {
    let payload = raw_bump(ours, 1, None, 0, LANE_MAX + 1);
    failure(
        &payload,
        &format!(
            "a placed byte string of {} bytes, over the lane's 32 MiB",
            LANE_MAX + 1
        ),
    );
    let text = String::from_utf8_lossy(&payload);
    assert!(!text.contains("max_message_len"), "{text:?}");
    let limit = common::assert_too_large(
        &raw_bump(ours, 2, None, 0, 2 * LANE_MAX + 1),
        2 * LANE_MAX + 1,
    );
    assert_eq!(limit, 2 * LANE_MAX, "the limit set, not the lane's cap");
}

#[test]
fn a_placement_over_the_lanes_cap_within_the_limit_is_malformed() {
    let _fds = fd_count_lock();
    let (ours, mut theirs) = Socket::pair().unwrap();
    theirs.set_limits(limits_above_the_lanes_cap());
    let server = std::thread::spawn(move || {
        BulkServer::new(BulkImpl::default()).serve(Connection::new(theirs))
    });
    placements_over_the_lanes_cap_are_refused_for_what_they_are_over(&ours);
    drop(ours);
    server.join().unwrap().unwrap();
}

/// Every other way a hostile client's out-of-line string can be refused closes the fds its
/// message carried: a region larger than any the lane accepts, a piped string to a server
/// that trusts no pipes, a string said to be written into a server that accepts no writes
/// (its message carrying a memfd all the same), and a second string out of line in one
/// message (which names a second region).
#[test]
fn refused_out_of_line_strings_leave_no_fd_open() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (ours, theirs) = Socket::pair().unwrap();
    let server = std::thread::spawn(move || {
        BulkServer::new(BulkImpl::default()).serve(Connection::new(theirs))
    });
    // Over 32 MiB: no region the lane makes or accepts is.
    let huge: OwnedFd = SharedRegion::new((32 << 20) + 4096)
        .unwrap()
        .as_fd()
        .try_clone_to_owned()
        .unwrap();
    failure(&raw_bump(&ours, 1, Some(&huge), 0, 10), "refused");
    let (read, write) = nix::unistd::pipe().unwrap();
    nix::unistd::write(&write, &[9; 100]).unwrap();
    let mut piped = common::call_envelope(&BULK_INFO, 0, 2); // cmd 0: bump
    piped.push(2); // tag: piped
    for word in [2u32, 0] {
        piped.extend_from_slice(&word.to_le_bytes()); // seq, fd index
    }
    piped.extend_from_slice(&100u64.to_le_bytes()); // piped length
    piped.extend_from_slice(&0u64.to_le_bytes()); // no tail
    failure(
        &common::raw_call(&ours, &piped, &[read.as_fd()], 2),
        "reads no pipes",
    );
    let memfd = common::memfd(&[1; 100]);
    let mut written = common::call_envelope(&BULK_INFO, 0, 3);
    written.push(3); // tag: written into the receiver
    written.extend_from_slice(&3u32.to_le_bytes()); // seq
    written.extend_from_slice(&1u64.to_le_bytes()); // generation
    written.extend_from_slice(&(256u64 << 10).to_le_bytes()); // length
    failure(
        &common::raw_call(&ours, &written, &[memfd.as_fd()], 3),
        "announced no inbox",
    );
    let mut region = SharedRegion::new(4096).unwrap();
    region[..2].copy_from_slice(b"ab");
    let mut two = common::call_envelope(&BULK_INFO, 1, 4); // cmd 1: lens
    for (seq, index) in [(4u32, 0u32), (5, 1)] {
        two.push(1); // tag: out of line
        two.extend_from_slice(&seq.to_le_bytes());
        two.extend_from_slice(&index.to_le_bytes());
        two.extend_from_slice(&0u64.to_le_bytes()); // offset
        two.extend_from_slice(&2u64.to_le_bytes()); // length
    }
    let fds = [region.as_fd(), region.as_fd()];
    failure(
        &common::raw_call(&ours, &two, &fds, 4),
        "a second out-of-line",
    );
    drop((ours, huge, read, write, memfd, region));
    server.join().unwrap().unwrap();
    before.assert_nothing_new();
}

/// A hostile client's placement names, in place of its region, the read end of a pipe whose
/// lock a thread of the client holds (a `splice` into the pipe that sleeps), the client's own
/// copy closed: whoever closes the server's copy, the last, waits until the client lets go.
/// The server refuses the fd (not a region), and a region over the string limit is refused
/// before it is looked at; either way it must not close the fd on a thread that serves.
#[test]
fn a_refused_region_fd_is_not_closed_on_the_serving_thread() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    for (cookie, len, why) in [(1, 10u64, "not a shared region"), (2, 1 << 40, "")] {
        let (ours, theirs) = Socket::pair().unwrap();
        let (read, write) = nix::unistd::pipe().unwrap();
        let mut msg = common::call_envelope(&BULK_INFO, 0, cookie); // cmd 0: bump
        msg.push(1); // tag: out of line
        msg.extend_from_slice(&(cookie as u32).to_le_bytes()); // seq
        msg.extend_from_slice(&0u32.to_le_bytes()); // fd index
        msg.extend_from_slice(&0u64.to_le_bytes()); // offset
        msg.extend_from_slice(&len.to_le_bytes());
        ours.send(&msg, &[read.as_fd()]).unwrap();
        // Before the server runs: its copy, queued in the socket, is then the last.
        drop(read);
        let held = common::hold_pipe_lock(write);
        let server = std::thread::spawn(move || {
            BulkServer::new(BulkImpl::default()).serve(Connection::new(theirs))
        });
        let caller = std::thread::spawn(move || {
            let reply = ours.recv().unwrap().payload;
            (ours, reply)
        });
        let ((ours, reply), write) = common::joined_never_stuck_on_the_pipe(caller, held);
        assert_eq!(reply[0], 4, "a failure reply");
        let text = String::from_utf8_lossy(&reply);
        assert!(text.contains(why), "{why:?} not in {text:?}");
        drop((ours, write));
        server.join().unwrap().unwrap();
    }
    before.assert_nothing_new();
}

/// The async flavour places and reads byte strings too, and shares regions with blocking
/// peers both ways.
#[cfg(feature = "tokio")]
mod async_flavour {
    use super::*;

    /// `Bulk` as `async fn`s: the same interface on the wire.
    mod asynchronous {
        #[typed_ipc::interface]
        pub trait Bulk {
            async fn bump(&self, data: Vec<u8>) -> Vec<u8>;
            async fn lens(&self, a: Vec<u8>, b: Vec<u8>) -> (u64, u64);
            #[oneway]
            async fn feed(&self, data: Vec<u8>);
            async fn fed(&self) -> Vec<u64>;
            async fn regions(&self) -> u64;
        }
    }

    #[derive(Default)]
    struct AsyncBulkImpl(BulkImpl);

    impl asynchronous::Bulk for AsyncBulkImpl {
        async fn bump(&self, data: Vec<u8>) -> Vec<u8> {
            self.0.bump(data)
        }
        async fn lens(&self, a: Vec<u8>, b: Vec<u8>) -> (u64, u64) {
            self.0.lens(a, b)
        }
        async fn feed(&self, data: Vec<u8>) {
            self.0.feed(data)
        }
        async fn fed(&self) -> Vec<u64> {
            self.0.fed()
        }
        async fn regions(&self) -> u64 {
            regions()
        }
    }

    #[test]
    #[ignore = "run as a child process by other tests"]
    fn child_bulk_async() {
        common::current_thread_runtime().block_on(async {
            let conn = typed_ipc::tokio::worker::connection().unwrap();
            asynchronous::BulkServer::new(AsyncBulkImpl::default())
                .serve(conn)
                .await
                .unwrap();
        });
    }

    /// `a_refused_region_fd_is_not_closed_on_the_serving_thread`, async, for a piped string
    /// (tag 2) cut off after its reference: the decode fails reading the rest of the string,
    /// and the fd the reference named, a pipe whose lock the client holds, must not be closed
    /// on the runtime's thread.
    #[test]
    fn an_async_server_leaves_the_pipe_of_a_string_cut_short_to_the_closer() {
        let _fds = fd_count_lock();
        let (ours, theirs) = Socket::pair().unwrap();
        let (read, write) = nix::unistd::pipe().unwrap();
        let mut msg = common::call_envelope(&BULK_INFO, 0, 1); // cmd 0: bump
        msg.push(2); // tag: piped
        msg.extend_from_slice(&1u32.to_le_bytes()); // seq
        msg.extend_from_slice(&0u32.to_le_bytes()); // fd index
        msg.extend_from_slice(&10u64.to_le_bytes()); // piped length; the message ends here
        ours.send(&msg, &[read.as_fd()]).unwrap();
        // Before the server runs: its copy, queued in the socket, is then the last.
        drop(read);
        let held = common::hold_pipe_lock(write);
        let server = std::thread::spawn(move || {
            common::current_thread_runtime().block_on(async move {
                let connection = typed_ipc::tokio::AsyncConnection::new(theirs).unwrap();
                asynchronous::BulkServer::new(AsyncBulkImpl::default())
                    .serve(connection)
                    .await
            })
        });
        let caller = std::thread::spawn(move || {
            // Up to the failure for the call, or the server's hang-up.
            while let Ok(reply) = ours.recv() {
                if reply.payload[0] == 4 {
                    break;
                }
            }
            ours
        });
        let (ours, write) = common::joined_never_stuck_on_the_pipe(caller, held);
        drop((ours, write));
        let _ = server.join().unwrap();
    }

    /// `a_kept_pipe_of_a_peer_no_longer_trusted_is_not_closed_on_the_serving_thread`
    /// (`tests/bulk_pipe.rs`), async: the pipe a peer once trusted lent the connection, its
    /// own copy closed and its lock held, must not be closed on the runtime's thread when
    /// the connection goes.
    #[test]
    fn an_async_connection_leaves_the_kept_pipe_of_a_peer_no_longer_trusted_to_the_closer() {
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        let (ours, theirs) = Socket::pair().unwrap();
        let (connection_tx, connection_rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            common::current_thread_runtime().block_on(async move {
                let connection = typed_ipc::tokio::AsyncConnection::new(theirs).unwrap();
                connection.lend_pages_to_peer(true);
                let served =
                    connection.serve(asynchronous::BulkServer::new(AsyncBulkImpl::default()));
                connection_tx.send(connection).unwrap();
                served.await
            })
        });
        let connection = connection_rx.recv().unwrap();
        assert_eq!(ours.recv().unwrap().payload[0], 5, "an announcement");
        let (read, write) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&write, &[9; 1000]).unwrap();
        let mut msg = common::call_envelope(&BULK_INFO, 0, 1); // cmd 0: bump
        msg.push(2); // tag: piped
        msg.extend_from_slice(&1u32.to_le_bytes()); // seq
        msg.extend_from_slice(&0u32.to_le_bytes()); // fd index
        msg.extend_from_slice(&1000u64.to_le_bytes()); // piped length
        msg.extend_from_slice(&0u64.to_le_bytes()); // no tail
        let reply = common::raw_call(&ours, &msg, &[read.as_fd()], 1);
        assert_eq!(reply[0], 3, "a reply: the pipe was read, and is kept");
        connection.lend_pages_to_peer(false);
        assert_eq!(ours.recv().unwrap().payload[0], 5, "trust taken back");
        drop(read); // the connection's copy is the last
        let held = common::hold_pipe_lock(write);
        let caller = std::thread::spawn(move || {
            drop(connection);
            drop(ours); // hang up: the runtime's thread lets go of the connection last
            server.join().unwrap()
        });
        let (served, write) = common::joined_never_stuck_on_the_pipe(caller, held);
        served.unwrap();
        drop(write);
        before.assert_nothing_new(); // the kept pipe too, closed once let go
    }

    /// `a_placement_over_the_lanes_cap_within_the_limit_is_malformed`, to an async server.
    #[test]
    fn a_placement_over_the_lanes_cap_within_the_limit_is_malformed_async() {
        let _fds = fd_count_lock();
        let (ours, mut theirs) = Socket::pair().unwrap();
        theirs.set_limits(limits_above_the_lanes_cap());
        let server = std::thread::spawn(move || {
            common::current_thread_runtime().block_on(async move {
                let connection = typed_ipc::tokio::AsyncConnection::new(theirs).unwrap();
                asynchronous::BulkServer::new(AsyncBulkImpl::default())
                    .serve(connection)
                    .await
            })
        });
        placements_over_the_lanes_cap_are_refused_for_what_they_are_over(&ours);
        drop(ours);
        server.join().unwrap().unwrap();
    }

    const SIZES: [usize; 5] = [1023, 1024, 100_000, (3 << 20) + 5, (32 << 20) + 1];

    #[test]
    fn an_async_parent_and_a_blocking_worker_share_regions() {
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        common::current_thread_runtime().block_on(async {
            let (mut child, conn) = typed_ipc::tokio::worker::spawn(child("child_bulk")).unwrap();
            let bulk = asynchronous::BulkClient::new(conn);
            for round in 0..2u64 {
                for (i, &len) in SIZES.iter().enumerate() {
                    let data = filled(len, round * 10 + i as u64);
                    let want = bumped(&data);
                    assert!(
                        bulk.bump(data).await.unwrap() == want,
                        "{len} B, round {round}"
                    );
                }
            }
            assert_eq!(regions(), 2, "our region and a view of the worker's");
            assert_eq!(bulk.regions().await.unwrap(), 2);
            let sent: Vec<Vec<u8>> = (0..10).map(|i| filled(5000 + i * 999, i as u64)).collect();
            for data in &sent {
                bulk.feed(data.clone()).await.unwrap();
            }
            let want: Vec<u64> = sent.iter().map(|d| checksum(d)).collect();
            assert_eq!(bulk.fed().await.unwrap(), want);
            drop(bulk);
            assert_eq!(
                typed_ipc::tokio::worker::wait(&mut child).await.unwrap(),
                Exit::Code(0)
            );
        });
        before.assert_nothing_new();
    }

    /// `release_shared_memory` from an async parent: the blocking worker unmaps the region
    /// too, and the next large string makes a new one.
    #[test]
    fn shared_memory_released_by_an_async_parent_goes_at_both_ends() {
        let _fds = fd_count_lock();
        common::current_thread_runtime().block_on(async {
            let (mut child, conn) = typed_ipc::tokio::worker::spawn(child("child_bulk")).unwrap();
            let bulk = asynchronous::BulkClient::new(conn);
            bulk.regions().await.unwrap(); // the worker has spoken: the lane may be used
            for len in [(3 << 20) + 5, 1024] {
                let data = filled(len, 7);
                assert!(bulk.bump(data.clone()).await.unwrap() == bumped(&data));
            }
            assert_eq!((regions(), bulk.regions().await.unwrap()), (2, 2));
            assert_eq!(bulk.connection().release_shared_memory(), 4 << 20);
            assert_eq!(
                (regions(), memfd_mappings()),
                (1, 1),
                "only the worker's is left"
            );
            let since = Instant::now();
            while bulk.regions().await.unwrap() != 1 {
                assert!(
                    since.elapsed() < Duration::from_secs(10),
                    "the worker still maps it"
                );
            }
            assert_eq!(
                bulk.connection().release_shared_memory(),
                0,
                "given back once"
            );
            let data = filled(5000, 8);
            assert!(bulk.bump(data.clone()).await.unwrap() == bumped(&data));
            assert_eq!(
                (regions(), bulk.regions().await.unwrap()),
                (2, 2),
                "a new one"
            );
            drop(bulk);
            assert_eq!(
                typed_ipc::tokio::worker::wait(&mut child).await.unwrap(),
                Exit::Code(0)
            );
        });
    }

    #[test]
    fn a_blocking_parent_and_an_async_worker_share_regions() {
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        let (mut child, conn) = Worker::spawn(child("async_flavour::child_bulk_async")).unwrap();
        let bulk = BulkClient::new(conn);
        bump_rounds(&bulk, &SIZES, 2);
        assert_eq!(regions(), 2, "our region and a view of the worker's");
        assert_eq!(bulk.regions().unwrap(), 2);
        assert_eq!(
            bulk.lens(vec![1; 10_000], vec![2; 20_000]).unwrap(),
            (10_000, 20_000)
        );
        drop(bulk);
        assert_eq!(child.wait().unwrap(), Exit::Code(0));
        drop(child);
        before.assert_nothing_new();
    }
}

#[test]
fn a_refused_call_that_announced_the_region_announces_it_again() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let _fds = fd_count_lock(); // opens fds: keep them out of the counting tests' windows
    let (ours, theirs) = Connection::pair().unwrap();
    let refuse = Arc::new(AtomicBool::new(true));
    theirs.set_authorizer({
        let refuse = refuse.clone();
        move |_, _, _| match refuse.load(Ordering::SeqCst) {
            true => Err("not now".into()),
            false => Ok(()),
        }
    });
    let server = std::thread::spawn(move || BulkServer::new(BulkImpl::default()).serve(theirs));
    let bulk = BulkClient::new(ours);
    // The first reply tells us the server reads regions; the second call's argument goes
    // into a new region, announced with that call, which the server refuses unread.
    assert!(matches!(
        bulk.bump(vec![1]),
        Err(typed_ipc::Error::Refused(_))
    ));
    assert!(matches!(
        bulk.bump(vec![1; 100_000]),
        Err(typed_ipc::Error::Refused(_))
    ));
    refuse.store(false, Ordering::SeqCst);
    for round in 0..3u8 {
        assert_eq!(
            bulk.bump(vec![round; 100_000]).unwrap(),
            vec![round + 1; 100_000]
        );
    }
    drop(bulk);
    server.join().unwrap().unwrap();
}

/// A worker whose handler decodes its arguments twice, calling the parent back in between.
#[interface]
pub trait Twice {
    /// What decoding `data` gave, then what decoding it again after `Poke::poke` gave (if it
    /// is 1 KiB or more: it may have come out of line).
    fn keep(&self, data: Vec<u8>) -> String;
    #[oneway]
    fn note(&self, data: Vec<u8>);
}

/// The parent's side: the worker calls it back.
#[interface]
pub trait Poke {
    fn poke(&self);
}

/// `Twice` by hand: `keep` calls `Call::args` twice, which the generated server never does.
struct DecodesTwice(PokeClient);

impl typed_ipc::service::Service for DecodesTwice {
    fn info(&self) -> &'static typed_ipc::service::InterfaceInfo {
        &TWICE_INFO
    }
    fn handle(&self, call: &mut typed_ipc::service::Call<'_>) -> typed_ipc::Result<()> {
        type Args = (typed_ipc::codec::Bytes<Vec<u8>>,);
        let (typed_ipc::codec::Bytes(first),): Args = call.args()?;
        if call.is_oneway() || first.len() < 1024 {
            return call.reply(&String::new()); // `note` (no reply), or a string kept inline
        }
        self.0.poke()?;
        let again = match call.args::<Args>() {
            Ok((typed_ipc::codec::Bytes(v),)) => format!("{:x}", checksum(&v)),
            Err(e) => format!("refused: {e}"),
        };
        call.reply(&format!("{:x} then {again}", checksum(&first)))
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_decodes_twice() {
    typed_ipc::Server::new()
        .service_with(|connection| DecodesTwice(PokeClient::new(connection.clone())))
        .serve(&worker::connection().unwrap())
        .unwrap();
}

/// Places a string of its own (a `note`) when poked: over the one the worker decoded first,
/// whose placement the poke acknowledged.
struct PlacesWhenPoked(TwiceClient);

impl Poke for PlacesWhenPoked {
    fn poke(&self) {
        self.0.note(filled(64 << 10, 0)).unwrap();
    }
}

/// A handler that decodes its arguments a second time, after its first decode acknowledged
/// the string placed in our region and we placed another there: the second decode must
/// fail, saying why, not return the other string's bytes.
#[test]
fn a_second_decode_of_a_large_argument_fails_rather_than_read_a_later_string() {
    let _fds = fd_count_lock(); // opens fds: keep them out of the counting tests' windows
    let (mut child, conn) = Worker::spawn(child("child_decodes_twice")).unwrap();
    let twice = TwiceClient::new(conn.clone());
    conn.add_service(PokeServer::new(PlacesWhenPoked(twice.clone())));
    let serving = std::thread::spawn({
        let conn = conn.clone();
        move || conn.run()
    });
    // The first string announces our region (its fd is taken by the first decode), the
    // second finds it announced.
    for round in 1..=2 {
        // Our lane is idle: the worker has spoken (the first time), or acknowledged the last
        // `note` (run before this call).
        twice.keep(vec![0; 10]).unwrap();
        let data = filled(64 << 10, round);
        let said = twice.keep(data.clone()).unwrap();
        let (first, again) = said.split_once(" then ").unwrap();
        assert_eq!(first, format!("{:x}", checksum(&data)));
        assert!(
            again.starts_with("refused: ") && again.contains("taken already"),
            "round {round}: decoded again: {again} (the later string's checksum is {:x})",
            checksum(&filled(64 << 10, 0))
        );
    }
    conn.close();
    serving.join().unwrap().unwrap();
    drop((twice, conn));
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

/// A value whose encoding fails, after the byte string before it was placed.
struct Unencodable;

impl serde::Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("not today"))
    }
}

/// Calls whose arguments fail to encode after a large byte string was placed use up a
/// sequence number each. Over a thousand of them in a row must not keep the worker from
/// acknowledging the next string it reads: our lane would stay busy for good (every later
/// string inline, and no shared memory to give back).
#[test]
fn many_calls_that_failed_to_encode_do_not_stop_the_lane() {
    let _fds = fd_count_lock(); // opens fds: keep them out of the counting tests' windows
    let (mut child, conn) = Worker::spawn(child("child_bulk")).unwrap();
    let bulk = BulkClient::new(conn);
    bulk.regions().unwrap(); // the worker has spoken: the lane may be used from now on
    bump_rounds(&bulk, &[64 << 10], 1); // the worker has read a string of ours
    let data = filled(64 << 10, 7);
    for _ in 0..1100 {
        let args = (typed_ipc::codec::Bytes(&data[..]), Unencodable);
        let failed = bulk
            .connection()
            .call::<_, Vec<u8>>(&BULK_INFO, 0, &args, None);
        assert!(
            matches!(failed, Err(typed_ipc::Error::Encode(_))),
            "{failed:?}"
        );
    }
    bump_rounds(&bulk, &[64 << 10], 1); // its reply acknowledges the string
    assert_eq!(
        bulk.connection().release_shared_memory(),
        64 << 10,
        "the lane is still busy with the string the worker read"
    );
    drop(bulk);
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

/// A worker that calls its parent back before it decodes `keep`'s argument, and whose
/// authorizer refuses `refused` unread.
#[interface]
pub trait Late {
    /// The checksum of `data`, decoded once `Poke::poke` has returned.
    fn keep(&self, data: Vec<u8>) -> u64;
    /// Never runs: refused before its argument is decoded.
    fn refused(&self, data: Vec<u8>) -> u64;
    #[oneway]
    fn note(&self, data: Vec<u8>);
}

/// `Late` by hand: `keep` calls the parent back before `Call::args`, which the generated
/// server never does (a handler free to decode when it likes).
struct PokesFirst(PokeClient);

impl typed_ipc::service::Service for PokesFirst {
    fn info(&self) -> &'static typed_ipc::service::InterfaceInfo {
        &LATE_INFO
    }
    fn handle(&self, call: &mut typed_ipc::service::Call<'_>) -> typed_ipc::Result<()> {
        if call.command() == 0 {
            self.0.poke()?;
        }
        let (typed_ipc::codec::Bytes(data),): (typed_ipc::codec::Bytes<Vec<u8>>,) = call.args()?;
        call.reply(&checksum(&data))
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_pokes_first() {
    typed_ipc::Server::new()
        .service_with(|connection| PokesFirst(PokeClient::new(connection.clone())))
        .authorize(|_, _, cmd| match cmd {
            1 => Err("not this one".into()),
            _ => Ok(()),
        })
        .serve(&worker::connection().unwrap())
        .unwrap();
}

/// Once armed, places a string of its own (a `note`) when poked.
struct NotesWhenArmed(LateClient, std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Poke for NotesWhenArmed {
    fn poke(&self) {
        if self.1.load(std::sync::atomic::Ordering::SeqCst) {
            self.0.note(filled(64 << 10, 0)).unwrap();
        }
    }
}

/// A request refused unread is acknowledged as done with by the worker only after its
/// failure reply has gone out, so we give its placement back (the failure says it went
/// unread) without having heard the worker's acknowledgement. Placements never sent (calls
/// whose arguments fail to encode) then bring the sequence numbers round to that one:
/// placed again, the worker's stale acknowledgement of it, in the next message it sends,
/// must not pass for this placement's, or we place our next string over it before the
/// worker has read it.
#[test]
fn a_placement_numbered_as_one_refused_a_lap_earlier_is_not_given_back_by_its_stale_ack() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let _fds = fd_count_lock(); // opens fds: keep them out of the counting tests' windows
    let (mut child, conn) = Worker::spawn(child("child_pokes_first")).unwrap();
    let late = LateClient::new(conn.clone());
    let armed = Arc::new(AtomicBool::new(false));
    conn.add_service(PokeServer::new(NotesWhenArmed(late.clone(), armed.clone())));
    let serving = std::thread::spawn({
        let conn = conn.clone();
        move || conn.run()
    });
    late.keep(vec![0; 10]).unwrap(); // the worker has spoken: the lane may be used from now on
    let first = filled(64 << 10, 1);
    assert_eq!(late.keep(first.clone()).unwrap(), checksum(&first)); // placement 1, read
    assert!(matches!(
        late.refused(filled(64 << 10, 2)), // placement 2, refused unread
        Err(typed_ipc::Error::Refused(_))
    ));
    // Placements 3 to 2,047, never sent; 1 is skipped (the last the worker said it read),
    // so the next placement is numbered 2 again.
    let data = filled(64 << 10, 3);
    for _ in 3..=2047 {
        let args = (typed_ipc::codec::Bytes(&data[..]), Unencodable);
        let failed = late.connection().call::<_, u64>(&LATE_INFO, 0, &args, None);
        assert!(
            matches!(failed, Err(typed_ipc::Error::Encode(_))),
            "{failed:?}"
        );
    }
    armed.store(true, Ordering::SeqCst);
    let last = filled(64 << 10, 4);
    assert_eq!(
        late.keep(last.clone()).unwrap(),
        checksum(&last),
        "the worker read another string (the note's checksum is {})",
        checksum(&filled(64 << 10, 0))
    );
    conn.close();
    serving.join().unwrap().unwrap();
    drop((late, conn));
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}
