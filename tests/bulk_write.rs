//! Byte strings of 256 KiB to 1 MiB written straight into a worker's memory by its parent
//! (`Worker::spawn` gives the parent's connection the worker's memory, `worker::connection`
//! accepts writes): across real processes, with every string the worker was handed kept
//! and checked again at the end (a write into a buffer the worker's code already owns would
//! show), against a worker that opts out, a dead worker, and a peer that claims strings it
//! never wrote.

mod common;

use std::sync::Mutex;

use common::{checksum, child, fd_count_lock, fd_snapshot, filled, regions};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, Error, SharedBytes, Socket, interface};

#[interface]
pub trait Keep {
    /// Keeps `data`; returns its checksum and the capacity of the `Vec` it arrived in.
    fn keep(&self, data: Vec<u8>) -> (u64, u64);
    /// Keeps `data`, given as `SharedBytes`; returns its checksum.
    fn keep_shared(&self, data: SharedBytes) -> u64;
    /// The checksums of everything kept so far, computed now.
    fn kept(&self) -> Vec<u64>;
    /// Shared regions (memfds) this process holds open: the lane's, once a string used it.
    fn regions(&self) -> u64;
}

#[derive(Default)]
struct KeepImpl {
    kept: Mutex<Vec<SharedBytes>>,
}

impl Keep for KeepImpl {
    fn keep(&self, data: Vec<u8>) -> (u64, u64) {
        let capacity = data.capacity() as u64;
        (self.keep_shared(SharedBytes::from(data)), capacity)
    }
    fn keep_shared(&self, data: SharedBytes) -> u64 {
        let sum = checksum(&data);
        self.kept.lock().unwrap().push(data);
        sum
    }
    fn kept(&self) -> Vec<u64> {
        self.kept
            .lock()
            .unwrap()
            .iter()
            .map(|d| checksum(d))
            .collect()
    }
    fn regions(&self) -> u64 {
        regions()
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_keep() {
    KeepServer::new(KeepImpl::default())
        .serve(worker::connection().unwrap())
        .unwrap();
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_keep_without_writes() {
    KeepServer::new(KeepImpl::default())
        .serve(Connection::new(worker::socket().unwrap()))
        .unwrap();
}

const MIB: usize = 1 << 20;

#[test]
fn strings_of_256_kib_to_1_mib_are_written_into_the_worker_and_every_one_stays_intact() {
    let _fds = fd_count_lock();
    common::one_copy_always();
    let before = fd_snapshot();
    let (mut child, conn) = Worker::spawn(child("child_keep")).unwrap();
    let keep = KeepClient::new(conn);
    // A first call, so that the parent has heard from the worker (its announcement, and
    // that it reads lanes) before the big strings go.
    assert_eq!(keep.regions().unwrap(), 0);
    let mut sums = Vec::new();
    for round in 0..4u64 {
        for (i, len) in [256 << 10, (256 << 10) + 1, 700_001, MIB - 1, MIB]
            .into_iter()
            .enumerate()
        {
            let data = filled(len, round * 10 + i as u64);
            let want = checksum(&data);
            let (sum, capacity) = keep.keep(data).unwrap();
            assert_eq!(sum, want, "{len} B, round {round}");
            if len >= MIB / 2 {
                // Handed over in the inbox buffer it was written into: no copy was made.
                assert_eq!(capacity, MIB as u64, "{len} B arrived in the inbox buffer");
            } else {
                assert_eq!(capacity, len as u64, "a shorter string gives back the rest");
            }
            sums.push(want);
        }
        let data = filled(600_000, round);
        sums.push(checksum(&data));
        assert_eq!(
            keep.keep_shared(SharedBytes::from(data)).unwrap(),
            sums[sums.len() - 1]
        );
    }
    assert_eq!(
        keep.regions().unwrap(),
        0,
        "every string was written: no shared region was ever made"
    );
    // Outside the range, strings go through the region as before.
    for len in [(256 << 10) - 1, MIB + 1, 3 * MIB] {
        let data = filled(len, len as u64);
        sums.push(checksum(&data));
        assert_eq!(keep.keep(data).unwrap(), (sums[sums.len() - 1], len as u64));
    }
    assert_eq!(
        keep.regions().unwrap(),
        1,
        "the lane's region, for the others"
    );
    // Written again after the region was used, and every string the worker was ever handed
    // still holds what was sent: nothing was written into a buffer it already owned.
    let data = filled(MIB, 99);
    sums.push(checksum(&data));
    assert_eq!(keep.keep(data).unwrap(), (sums[sums.len() - 1], MIB as u64));
    assert_eq!(keep.kept().unwrap(), sums);
    drop(keep);
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
    drop(child);
    before.assert_nothing_new();
}

#[test]
fn a_worker_that_does_not_accept_writes_gets_its_strings_through_the_region() {
    let _fds = fd_count_lock();
    common::one_copy_always();
    let (mut child, conn) = Worker::spawn(child("child_keep_without_writes")).unwrap();
    let keep = KeepClient::new(conn);
    assert_eq!(keep.regions().unwrap(), 0);
    let data = filled(700_001, 1);
    let want = checksum(&data);
    assert_eq!(
        keep.keep(data).unwrap(),
        (want, 700_001),
        "copied out of the region"
    );
    assert_eq!(keep.regions().unwrap(), 1);
    drop(keep);
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

#[test]
fn the_workers_memory_may_be_given_after_its_announcement_arrived() {
    let _fds = fd_count_lock();
    common::one_copy_always();
    let (mut child, socket) = Worker::spawn_socket(child("child_keep")).unwrap();
    let keep = KeepClient::new(Connection::new(socket));
    // The announcement arrives with this reply; the connection cannot write yet.
    assert_eq!(keep.regions().unwrap(), 0);
    let data = filled(700_001, 1);
    let want = checksum(&data);
    assert_eq!(
        keep.keep(data.clone()).unwrap(),
        (want, 700_001),
        "through the region"
    );
    keep.connection().write_into_peer(child.memory());
    assert_eq!(
        keep.keep(data).unwrap(),
        (want, MIB as u64),
        "written into the inbox buffer, with the announcement taken in before"
    );
    drop(keep);
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

#[test]
fn a_dead_worker_is_not_written_and_its_callers_fail_at_once() {
    let _fds = fd_count_lock();
    common::one_copy_always();
    let (mut child, conn) = Worker::spawn(child("child_keep")).unwrap();
    let keep = KeepClient::new(conn);
    let data = filled(MIB, 1);
    assert_eq!(keep.keep(data.clone()).unwrap().0, checksum(&data));
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap(), Exit::Signal(9));
    // Reaped: its pid may belong to another process now. The parent's write finds no
    // mailbox there, and the call fails as any call to a dead peer does.
    assert!(matches!(keep.keep(data), Err(Error::Disconnected)));
}

/// The async flavour writes too: an async parent into an async worker.
#[cfg(feature = "tokio")]
mod asynchronous {
    use super::*;

    #[typed_ipc::interface]
    pub trait Keep {
        async fn keep(&self, data: Vec<u8>) -> (u64, u64);
        async fn keep_shared(&self, data: SharedBytes) -> u64;
        async fn kept(&self) -> Vec<u64>;
        async fn regions(&self) -> u64;
    }

    #[derive(Default)]
    struct AsyncKeepImpl(KeepImpl);

    impl Keep for AsyncKeepImpl {
        async fn keep(&self, data: Vec<u8>) -> (u64, u64) {
            super::Keep::keep(&self.0, data)
        }
        async fn keep_shared(&self, data: SharedBytes) -> u64 {
            super::Keep::keep_shared(&self.0, data)
        }
        async fn kept(&self) -> Vec<u64> {
            super::Keep::kept(&self.0)
        }
        async fn regions(&self) -> u64 {
            regions()
        }
    }

    #[test]
    #[ignore = "run as a child process by other tests"]
    fn child_keep_async() {
        common::current_thread_runtime().block_on(async {
            let conn = typed_ipc::tokio::worker::connection().unwrap();
            KeepServer::new(AsyncKeepImpl::default())
                .serve(conn)
                .await
                .unwrap();
        });
    }

    #[test]
    fn an_async_parent_writes_into_an_async_worker() {
        let _fds = fd_count_lock();
        common::one_copy_always();
        let before = fd_snapshot();
        common::current_thread_runtime().block_on(async {
            let (mut child, conn) =
                typed_ipc::tokio::worker::spawn(child("asynchronous::child_keep_async")).unwrap();
            let keep = KeepClient::new(conn);
            assert_eq!(keep.regions().await.unwrap(), 0);
            let mut sums = Vec::new();
            for round in 0..3u64 {
                for len in [300_000, MIB] {
                    let data = filled(len, round ^ len as u64);
                    sums.push(checksum(&data));
                    let (sum, capacity) = keep.keep(data).await.unwrap();
                    assert_eq!(sum, sums[sums.len() - 1], "{len} B, round {round}");
                    if len == MIB {
                        assert_eq!(capacity, MIB as u64, "handed over in the inbox buffer");
                    }
                }
            }
            assert_eq!(keep.regions().await.unwrap(), 0, "all written");
            assert_eq!(keep.kept().await.unwrap(), sums);
            drop(keep);
            assert_eq!(
                typed_ipc::tokio::worker::wait(&mut child).await.unwrap(),
                Exit::Code(0)
            );
        });
        before.assert_nothing_new();
    }
    /// Calls whose strings are written into the worker's inbox, dropped at random moments
    /// (a short timeout; the worker drops them unrun, or the reply crosses the cancel): the
    /// calls that return get their own answers, and afterwards strings are still written
    /// into the inbox (the inbox and the lane were given back each time), no region made.
    #[test]
    fn async_calls_written_into_the_inbox_dropped_at_random_leave_it_usable() {
        let _fds = fd_count_lock();
        common::one_copy_always();
        let before = fd_snapshot();
        common::current_thread_runtime().block_on(async {
            let (mut child, conn) =
                typed_ipc::tokio::worker::spawn(child("asynchronous::child_keep_async")).unwrap();
            let keep = KeepClient::new(conn);
            assert_eq!(keep.regions().await.unwrap(), 0);
            let mut storm = common::Storm::new(100);
            let mut answered = 0;
            for round in 0..storm.rounds {
                let x = storm.next();
                let len = [300_000, 700_000, MIB][(x >> 5) as usize % 3];
                let data = filled(len, round);
                let want = checksum(&data);
                let us = (x >> 40) % 3000;
                let got =
                    tokio::time::timeout(std::time::Duration::from_micros(us), keep.keep(data))
                        .await;
                if let Ok(got) = got {
                    assert_eq!(got.unwrap().0, want, "round {round}: another call's answer");
                    answered += 1;
                }
            }
            eprintln!("answered {answered} of {}", storm.rounds);
            for round in 0..3 {
                let data = filled(MIB, 1 << 40 | round);
                let want = checksum(&data);
                let (sum, capacity) = keep.keep(data).await.unwrap();
                assert_eq!(sum, want);
                assert_eq!(capacity, MIB as u64, "handed over in the inbox buffer");
            }
            assert_eq!(keep.regions().await.unwrap(), 0, "all written");
            drop(keep);
            assert_eq!(
                typed_ipc::tokio::worker::wait(&mut child).await.unwrap(),
                Exit::Code(0)
            );
        });
        before.assert_nothing_new();
    }
}

/// A call of `keep` as a hostile client writes it: its argument a reference to a string it
/// says it wrote into the server's inbox buffer `generation`.
fn raw_keep(socket: &Socket, cookie: u64, generation: u64, len: u64) -> Vec<u8> {
    let mut msg = common::call_envelope(&KEEP_INFO, 0, cookie); // cmd 0: keep
    msg.push(3); // tag: written
    msg.extend_from_slice(&(cookie as u32).to_le_bytes()); // seq
    msg.extend_from_slice(&generation.to_le_bytes());
    msg.extend_from_slice(&len.to_le_bytes());
    common::raw_call(socket, &msg, &[], cookie)
}

/// Writes `bytes` at `addr` in this process the way a peer writes an inbox.
fn write_into_self(addr: u64, bytes: &[u8]) {
    let local = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: `local` describes `bytes`; the remote range is the server's mailbox, whose
    // proof word nothing in this process reads without an atomic load.
    let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

fn failure(payload: &[u8], why: &str) {
    assert_eq!(payload[0], 4, "a failure reply");
    let text = String::from_utf8_lossy(payload);
    assert!(text.contains(why), "{why:?} not in {text:?}");
}

#[test]
fn a_peer_claiming_strings_it_did_not_write_fails_the_call_not_the_server() {
    let _fds = fd_count_lock();
    common::one_copy_always();
    let before = fd_snapshot();
    // A server that accepts no writes refuses any written string.
    let (ours, theirs) = Socket::pair().unwrap();
    let server = std::thread::spawn(move || {
        KeepServer::new(KeepImpl::default()).serve(Connection::new(theirs))
    });
    failure(&raw_keep(&ours, 1, 1, 10), "announced no inbox");
    drop(ours);
    server.join().unwrap().unwrap();

    // One that accepts them announces its inbox first...
    let (ours, theirs) = Socket::pair().unwrap();
    let server = std::thread::spawn(move || {
        let conn = Connection::new(theirs);
        conn.accept_writes_from_peer().unwrap();
        KeepServer::new(KeepImpl::default()).serve(conn)
    });
    let announce = ours.recv().unwrap().payload;
    assert_eq!(announce[0], 5, "an announcement");
    assert_eq!(
        announce.len(),
        24 + 16,
        "envelope, mailbox address and token"
    );
    let word = |i: usize| u64::from_ne_bytes(announce[24 + 8 * i..32 + 8 * i].try_into().unwrap());
    let (mailbox, token) = (word(0), word(1));
    // ...takes nothing as written from a peer that has not shown it can write there...
    failure(
        &raw_keep(&ours, 2, 1, 10),
        "has not shown it can write here",
    );
    // ...and once it has (the proof word after the mailbox's four, written as the kernel
    // lets a writer: this test is in the same process), still refuses a string in a buffer
    // it does not have, longer than its buffer, or from placement 0, before reading anything.
    write_into_self(mailbox + 32, &token.to_ne_bytes());
    failure(
        &raw_keep(&ours, 3, 7, 10),
        "inbox buffer 7, but the buffer is 1",
    );
    failure(
        &raw_keep(&ours, 4, 1, 2 << 20),
        "into an inbox buffer of 1048576",
    );
    failure(&raw_keep(&ours, 0, 1, 10), "by placement 0");
    // And it goes on serving.
    let mut msg = common::call_envelope(&KEEP_INFO, 0, 5);
    msg.push(0); // tag: inline
    msg.extend_from_slice(&3u64.to_le_bytes());
    msg.extend_from_slice(b"abc");
    let ok = common::raw_call(&ours, &msg, &[], 5);
    assert_eq!(ok[0], 3, "a reply");
    assert!(ok.ends_with(&3u64.to_le_bytes()), "capacity 3: {ok:?}");
    drop(ours);
    server.join().unwrap().unwrap();
    before.assert_nothing_new();
}
