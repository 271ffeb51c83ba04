//! The blocking flavour's callers under contention, across a real process: many threads
//! calling at once on one connection with timeouts that pass wherever they happen to wait,
//! and calls nested through handlers both ways.
//!
//! The worker is this test binary run again for one `#[ignore]`d test (`child_*`).

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use common::{Storm, child, fd_count_lock, fd_snapshot};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, Error, interface};

/// What `echo` returns: what it was given.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Echoed {
    tag: u64,
    #[serde(with = "typed_ipc::fd")]
    fd: OwnedFd,
    text: String,
}

/// What the worker serves.
#[interface]
pub trait Echo {
    /// `fd` and `text` back, tagged with `tag`, once `hold_us` microseconds have passed: a
    /// handler that keeps the worker's one serving thread (and so its reading) busy.
    fn echo(&self, tag: u64, fd: OwnedFd, text: String, hold_us: u64) -> Echoed;
}

struct Echoer;

impl Echo for Echoer {
    fn echo(&self, tag: u64, fd: OwnedFd, text: String, hold_us: u64) -> Echoed {
        std::thread::sleep(Duration::from_micros(hold_us));
        Echoed { tag, fd, text }
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_echo() {
    // One serving thread: requests run in the order they came, and their replies go out in
    // that order; while a handler runs, nothing reads, so the parent's sends wait for room.
    worker::connection()
        .unwrap()
        .serve(EchoServer::new(Echoer))
        .unwrap();
}

/// Eight threads calling at once on one connection, most with timeouts from 1 µs to 2 ms
/// that pass wherever the call waits (for the send lock, for room, for its reply while
/// another thread reads, or reading itself), some with large messages and no timeout (a
/// large message cut off part-way would shut the connection down, as documented): every
/// call gets its own reply (its tag, text and fd) or `TimedOut`, never another error; the
/// fds of late replies are closed; and the connection serves on.
#[test]
fn threads_timing_out_at_random_each_get_their_own_reply_or_timed_out() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (mut worker, conn) = Worker::spawn(child("child_echo")).unwrap();
    let echo = EchoClient::new(conn.clone());
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let echo = echo.clone();
            s.spawn(move || {
                let mut storm = Storm::new(300);
                let (mut answered, mut timed_out) = (0, 0);
                for round in 0..storm.rounds {
                    let x = storm.next();
                    let tag = t << 32 | round;
                    let timeout = (x % 4 != 0).then(|| Duration::from_micros(1 + (x >> 8) % 2000));
                    let sizes = [16, 2000, 30_000, 200_000];
                    let len = sizes[(x >> 24) as usize % (3 + timeout.is_none() as usize)];
                    let text: String = (0..len)
                        .map(|i| (b'a' + ((i as u64 ^ tag) % 26) as u8) as char)
                        .collect();
                    let fd = memfd_tagged(tag);
                    let ino = inode(&fd);
                    let timed = match timeout {
                        Some(timeout) => echo.with_timeout(timeout),
                        None => echo.clone(),
                    };
                    match timed.echo(tag, fd, text.clone(), (x >> 40) % 200) {
                        Ok(back) => {
                            assert_eq!(back.tag, tag, "another call's reply");
                            assert!(back.text == text, "another call's text");
                            assert_eq!(inode(&back.fd), ino, "another call's fd");
                            answered += 1;
                        }
                        Err(Error::TimedOut) if timeout.is_some() => timed_out += 1,
                        Err(e) => panic!("thread {t} round {round}: {e:?}"),
                    }
                }
                eprintln!("thread {t}: {answered} answered, {timed_out} timed out");
            });
        }
    });
    // The worker answers in order: once this reply is in, every late one before it was read.
    let fd = memfd_tagged(1);
    let back = echo.echo(1, fd, "last".into(), 0).unwrap();
    assert_eq!((back.tag, back.text.as_str()), (1, "last"));
    drop(back);
    drop((echo, conn));
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    drop(worker);
    before.assert_nothing_new();
}

fn memfd_tagged(tag: u64) -> OwnedFd {
    common::memfd(&tag.to_le_bytes())
}

fn inode(fd: &OwnedFd) -> u64 {
    nix::sys::stat::fstat(fd.as_fd()).unwrap().st_ino
}

/// Bounces a call between two ends, each end's handler calling the other.
#[interface]
pub trait Bounce {
    /// `depth` plus what the peer's `bounce(depth - 1)` returns (0 at depth 0).
    fn bounce(&self, depth: u32) -> u32;
}

struct Bouncer(BounceClient);

impl Bounce for Bouncer {
    fn bounce(&self, depth: u32) -> u32 {
        match depth {
            0 => 0,
            _ => depth + self.0.bounce(depth - 1).unwrap(),
        }
    }
}

/// Serves `Bounce` on `threads` threads of `conn`, each handler calling the peer back.
fn serve_bounce(conn: &Connection, threads: usize) -> Vec<std::thread::JoinHandle<()>> {
    conn.add_service(BounceServer::new(Bouncer(BounceClient::new(conn.clone()))));
    (0..threads)
        .map(|_| {
            let conn = conn.clone();
            std::thread::spawn(move || conn.run().unwrap())
        })
        .collect()
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_bounce() {
    let threads = std::env::var("BOUNCE_THREADS").unwrap().parse().unwrap();
    let conn = worker::connection().unwrap();
    for thread in serve_bounce(&conn, threads) {
        thread.join().unwrap();
    }
}

/// Calls nested through handlers both ways (the parent calls the worker, whose handler
/// calls the parent, whose handler calls the worker, ...) need, as documented, as many
/// serving threads as calls nest on each end: with `t` on each, a bounce `2t - 1` deep
/// returns, the callers' threads reading for each other meanwhile.
#[test]
fn calls_nested_through_handlers_both_ways_return_with_a_thread_per_level() {
    let _fds = fd_count_lock();
    for threads in [1, 2, 3] {
        let mut command = child("child_bounce");
        command.env("BOUNCE_THREADS", threads.to_string());
        let (mut worker, conn) = Worker::spawn(command).unwrap();
        let serving = serve_bounce(&conn, threads);
        let depth = 2 * threads as u32 - 1;
        let bounce = BounceClient::new(conn.clone());
        let outcome = bounce.with_timeout(Duration::from_secs(60)).bounce(depth);
        assert_eq!(
            outcome.unwrap(),
            depth * (depth + 1) / 2,
            "{threads} threads"
        );
        conn.close();
        for thread in serving {
            thread.join().unwrap();
        }
        drop((bounce, conn));
        assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    }
}

/// The worker killed while eight threads call it, parked wherever a call waits at that
/// moment: each thread's call in flight fails with `Disconnected` (a short timeout may
/// pass first), never with `TimedOut` when it had no timeout or a long one, and so does
/// every call after; no fd is left open.
#[test]
fn a_worker_killed_under_calls_from_many_threads_fails_them_all_with_disconnected() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (mut worker, conn) = Worker::spawn(child("child_echo")).unwrap();
    let echo = EchoClient::new(conn.clone());
    let answered = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (echo, answered) = (echo.clone(), &answered);
            s.spawn(move || {
                let mut storm = Storm::new(0);
                for round in 0.. {
                    let x = storm.next();
                    let tag = t << 32 | round;
                    let timeout = match x % 3 {
                        0 => None,
                        1 => Some(Duration::from_secs(600)),
                        _ => Some(Duration::from_micros(1 + (x >> 8) % 2000)),
                    };
                    let short = timeout.is_some_and(|t| t < Duration::from_secs(1));
                    let len =
                        [16, 2000, 30_000, 200_000][(x >> 24) as usize % (3 + !short as usize)];
                    let timed = match timeout {
                        Some(timeout) => echo.with_timeout(timeout),
                        None => echo.clone(),
                    };
                    let text = "k".repeat(len);
                    match timed.echo(tag, memfd_tagged(tag), text, (x >> 40) % 200) {
                        Ok(back) => {
                            assert_eq!(back.tag, tag, "another call's reply");
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(Error::TimedOut) if short => {}
                        Err(Error::Disconnected) => break,
                        Err(e) => panic!("thread {t} round {round} ({timeout:?}): {e:?}"),
                    }
                }
                let after = echo.echo(0, memfd_tagged(0), String::new(), 0);
                assert!(
                    matches!(after.err(), Some(Error::Disconnected)),
                    "a call after"
                );
            });
        }
        common::wait_until("calls are answered", || {
            answered.load(Ordering::SeqCst) >= 200
        });
        worker.kill().unwrap();
    });
    assert!(conn.is_closed());
    assert_eq!(worker.wait().unwrap(), Exit::Signal(9));
    drop((echo, conn, worker));
    before.assert_nothing_new();
}

/// As above, four of the parent's threads bouncing at once: with a serving thread per level
/// per call on each end, every bounce returns its own sum.
#[test]
fn concurrent_calls_nested_through_handlers_both_ways_return_their_own_sums() {
    let _fds = fd_count_lock();
    let (callers, threads) = (4, 8);
    let mut command = child("child_bounce");
    command.env("BOUNCE_THREADS", threads.to_string());
    let (mut worker, conn) = Worker::spawn(command).unwrap();
    let serving = serve_bounce(&conn, threads);
    let bounce = BounceClient::new(conn.clone()).with_timeout(Duration::from_secs(60));
    std::thread::scope(|s| {
        for t in 0..callers {
            let bounce = bounce.clone();
            s.spawn(move || {
                for round in 0..200u32 {
                    let depth = 1 + (round + t) % 3;
                    let sum = bounce.bounce(depth).unwrap();
                    assert_eq!(sum, depth * (depth + 1) / 2, "thread {t} round {round}");
                }
            });
        }
    });
    conn.close();
    for thread in serving {
        thread.join().unwrap();
    }
    drop((bounce, conn));
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
}
