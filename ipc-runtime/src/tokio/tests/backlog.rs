//! The backlog's bounds: the tasks calls run on, a reader paused at the bounds, methods
//! on the blocking pool, and calls held back by unread replies.

use super::*;

/// A call runs on a task that ran one before and waits for the next, if there is one. A burst
/// of concurrent calls starts a task for each, after which at most `IDLE_RUNNERS` stay; they
/// hold the connection only weakly and end with it, so `wait_closed` returns once the peer
/// hangs up.
#[test]
fn after_a_burst_of_calls_eight_tasks_wait_for_more_and_end_with_the_connection() {
    use super::connection::IDLE_RUNNERS;
    use crate::connection::tests::BULK;
    use std::time::Duration;

    const BURST: usize = 20;
    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (client, server) = super::AsyncConnection::pair().unwrap();
        let meeting = std::sync::Arc::new(::tokio::sync::Barrier::new(BURST));
        server.add_service(QuickEcho {
            meeting: Some(meeting),
        });
        let tasks = |server: &super::AsyncConnection| server.test_tasks();
        let calls = (0..BURST).map(|_| {
            let client = client.clone();
            ::tokio::spawn(async move { client.call::<_, u32>(&BULK, 2, (), None).await })
        });
        for call in calls.collect::<Vec<_>>() {
            assert_eq!(call.await.unwrap().unwrap(), 7);
        }
        // Each reply went out before its task went idle; a round trip more lets the last
        // ones get there.
        let settled = async {
            while tasks(&server) != (1 + IDLE_RUNNERS, IDLE_RUNNERS) {
                ::tokio::task::yield_now().await;
            }
        };
        ::tokio::time::timeout(Duration::from_secs(10), settled)
            .await
            .unwrap_or_else(|_| panic!("tasks (all, idle): {:?}", tasks(&server)));
        drop(client);
        ::tokio::time::timeout(Duration::from_secs(10), server.wait_closed())
            .await
            .expect("the idle tasks ended with the connection");
        assert_eq!(tasks(&server), (0, 0));
    });
}

/// A oneway that finds the peer gone while the reader waits for room at the backlog's bounds
/// does not wait for the reader to read why: it reads nothing until a request finishes,
/// which may be never (the requests may wait for this very oneway, sent from a handler).
/// Here the oneway running is held: the oneway sent waited for good (until its timeout).
#[test]
fn a_oneway_to_a_peer_gone_does_not_wait_for_a_reader_paused_at_the_bounds() {
    use crate::connection::tests::ORDERED;
    use std::time::Duration;

    let (runtime, peer, server, gate, serving) = paused_behind_a_held_oneway();
    drop(peer);
    let sent = runtime.block_on(server.oneway(&ORDERED, 3, 0u64, Some(Duration::from_secs(60))));
    assert!(matches!(sent, Err(crate::Error::Disconnected)), "{sent:?}");
    gate.notify_one();
    runtime.block_on(serving).unwrap().unwrap();
}

/// A connection served with its oneway task held by the first of the peer's oneways, and its
/// reader paused at the backlog's bounds: the others wait behind it, up to the bounds (the
/// one running counts), and one more waits in the socket. Notify the gate to let them run.
fn paused_behind_a_held_oneway() -> (
    ::tokio::runtime::Runtime,
    Socket,
    super::AsyncConnection,
    std::sync::Arc<::tokio::sync::Notify>,
    ::tokio::task::JoinHandle<crate::Result<()>>,
) {
    use crate::connection::backlog::MAX_REQUESTS;
    use crate::connection::tests::{ordered_request, wait_until};
    use crate::tokio::envelope::Kind;

    let runtime = multi_thread_runtime(2);
    let (peer, theirs) = Socket::pair().unwrap();
    let (started, has_started) = std::sync::mpsc::channel();
    let gate = std::sync::Arc::new(::tokio::sync::Notify::new());
    let server = runtime.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    let serving = runtime.spawn(server.serve(AsyncOrdered {
        at: 0,
        action: AtSeq::Hold {
            started,
            gate: gate.clone(),
        },
        run: Default::default(),
    }));
    for seq in 0..=MAX_REQUESTS as u64 {
        peer.send(&ordered_request(Kind::Oneway, 3, 0, seq), &[])
            .unwrap();
    }
    has_started.recv().unwrap();
    wait_until("the reader waits for room", || server.test_reader_paused());
    (runtime, peer, server, gate, serving)
}

/// A peer that fills the backlog's bounds with calls whose handlers never return, then hangs
/// up, has every one of them cancelled: the reader, paused at the bounds with no call of this
/// end waiting, still hears the hang-up, reads on to the end, and `run` returns. Before, the
/// paused reader never read that far, and the handlers waited for good.
#[test]
fn calls_filling_the_bounds_are_cancelled_when_their_peer_hangs_up() {
    use crate::connection::backlog::MAX_REQUESTS;
    use crate::connection::envelope::{self, Envelope, Kind};
    use crate::connection::tests::{BULK, wait_until};

    let runtime = multi_thread_runtime(2);
    let (peer, theirs) = Socket::pair().unwrap();
    let stuck = Stuck::default();
    let server = runtime.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    let serving = runtime.spawn(server.serve(stuck.clone()));
    for cookie in 1..=MAX_REQUESTS as u64 + 1 {
        let mut call = vec![0u8; envelope::LEN];
        Envelope {
            kind: Kind::Call,
            cmd: 1,
            cookie,
            interface: BULK.id,
            signature: BULK.signature,
        }
        .write(&mut call);
        peer.send(&call, &[]).unwrap();
    }
    wait_until("the reader waits for room", || server.test_reader_paused());
    // Every call read within the bounds has started: a task not yet polled when the peer
    // hangs up is dropped unrun, its handler never started (and never dropped).
    let starts = || stuck.starts.load(std::sync::atomic::Ordering::SeqCst);
    wait_until("the calls within the bounds start", || {
        starts() >= MAX_REQUESTS
    });
    drop(peer);
    runtime
        .block_on(async { ::tokio::time::timeout(HANG_GUARD, serving).await })
        .expect("the handlers ran on after the peer hung up")
        .unwrap()
        .unwrap();
    // Those read within the bounds started (their handlers can only have been dropped, as
    // none returns); the one read past them, once the peer had gone, may not have.
    // (Before the wait for their starts, a loaded machine failed this now and then.)
    let dropped = stuck.drops.load(std::sync::atomic::Ordering::SeqCst);
    assert!(dropped >= MAX_REQUESTS, "{dropped} handlers dropped");
}

/// A peer that hung up behind more requests than the backlog's hard cap still has every
/// oneway run, and `serve` returns `Ok`: the reader, which reads on to the end once the peer
/// has gone, reads past the cap too (what is left is what the socket held). Before, the
/// request read past it ended the connection with `Malformed`, as if the peer had flooded a
/// handler's call back, and the oneways were dropped. Here a handler's call back took the
/// backlog near the cap; a send buffer of 4 MiB holds as much alone.
#[test]
fn oneways_past_the_cap_of_a_peer_that_hung_up_all_run() {
    use crate::connection::backlog::{HARD_FACTOR, MAX_REQUESTS};
    use crate::connection::tests::{calls_back_request, ordered_request, reply_to, wait_until};
    use crate::tokio::envelope::Kind;

    let runtime = multi_thread_runtime(2);
    let (peer, theirs) = Socket::pair().unwrap();
    let (started, has_started) = std::sync::mpsc::channel();
    let gate = std::sync::Arc::new(::tokio::sync::Notify::new());
    let run = std::sync::Arc::default();
    let server = runtime.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    server.add_service(AsyncCallsBack {
        back: server.clone(),
    });
    let ordered = AsyncOrdered {
        at: 0,
        action: AtSeq::Hold {
            started,
            gate: gate.clone(),
        },
        run: std::sync::Arc::clone(&run),
    };
    let serving = runtime.spawn(server.serve(ordered));
    // The call first (a call waits for the oneways before it), then the oneway that holds
    // the rest. Both count: one short of the cap while the handler's call back makes the
    // reader read on, then four more, once the peer has gone.
    peer.send(&calls_back_request(1), &[]).unwrap();
    let back = peer.recv().unwrap();
    let oneway = |seq| ordered_request(Kind::Oneway, 3, 0, seq);
    peer.send(&oneway(0), &[]).unwrap();
    has_started.recv().unwrap();
    let cap = (HARD_FACTOR * MAX_REQUESTS) as u64;
    for seq in 1..=cap - 3 {
        peer.send(&oneway(seq), &[]).unwrap();
    }
    peer.send(&reply_to(&back, &5u64), &[]).unwrap();
    for seq in cap - 2..=cap + 1 {
        peer.send(&oneway(seq), &[]).unwrap();
    }
    drop(peer);
    // Everything read (to the end, or to a refusal) before any oneway runs to make room.
    wait_until("the reader read to the end", || server.test_ended());
    gate.notify_one();
    let served = runtime
        .block_on(async { ::tokio::time::timeout(HANG_GUARD, serving).await })
        .expect("serve never returned")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert_eq!(*run.lock(), (1..=cap + 1).collect::<Vec<_>>());
}

/// An [`crate::service::run_blocking`] service, as `#[interface(async_server)]` generates:
/// `mark` counts its start, then runs on the blocking pool until the test opens the gate.
struct Pooled {
    started: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    gate: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl super::AsyncService for Pooled {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::ORDERED
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            let _seq: u64 = call.args()?;
            // In the poll that hands the method to the pool: once counted, it is there.
            self.started
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let unbounded = crate::service::PoolSlots::unbounded();
            crate::service::run_blocking(self.gate.clone(), &unbounded, |gate| {
                let (open, opened) = gate;
                let _open = opened.wait_while(open.lock().unwrap(), |o| !*o).unwrap();
            })
            .await;
            call.reply(()).await
        })
    }
}

/// A peer that cancels each call once its method is on the blocking pool must not get more
/// methods held there than the backlog's bounds let it have requests (the method, and the
/// arguments and fds it took, live on until it ends): the reader stops reading once that
/// many run. It read on: a cancel gave the call's place in the backlog back while its method
/// still ran, so a peer could pile up methods (and their fds) on the pool without bound.
#[test]
fn calls_cancelled_on_the_blocking_pool_still_count_against_the_backlog() {
    use crate::connection::backlog::MAX_REQUESTS;
    use crate::connection::tests::{ordered_request, wait_until};
    use crate::tokio::envelope::{Envelope, Kind};
    use std::sync::atomic::Ordering;

    let runtime = ::tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (peer, theirs) = Socket::pair().unwrap();
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gate = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let server = runtime.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    let serving = runtime.spawn(server.clone().serve(Pooled {
        started: started.clone(),
        gate: gate.clone(),
    }));
    let mut paused = false;
    for seq in 0..=MAX_REQUESTS as u64 {
        let cookie = seq + 1;
        peer.send(&ordered_request(Kind::Call, 2, cookie, seq), &[])
            .unwrap();
        wait_until("the call starts, or the reader stops", || {
            paused = server.test_reader_paused();
            paused || started.load(Ordering::SeqCst) > seq as usize
        });
        if paused {
            break;
        }
        let mut cancel = vec![0; crate::connection::envelope::LEN];
        Envelope::cancel(cookie).write(&mut cancel);
        peer.send(&cancel, &[]).unwrap();
    }
    let held = started.load(Ordering::SeqCst);
    // Opened before asserting: the runtime's drop waits for the methods on its pool.
    drop(peer);
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    runtime.block_on(serving).unwrap().unwrap();
    assert!(
        paused && held <= MAX_REQUESTS,
        "{held} methods held on the pool at once, the backlog's bound is {MAX_REQUESTS}"
    );
}

/// A hostile peer that sends calls over this end's limits (each answered with a failure,
/// its method never run) and reads none of the failures: the reader stops at the backlog's
/// bounds and the connection stays up, as for any request. Before,
/// the reader never paused for these, took them in up to twice the bounds and then ended the
/// connection, saying that this end had waited for a reply (it had none out).
#[test]
fn calls_over_the_limits_whose_failures_go_unread_pause_the_reader_at_the_bounds() {
    use crate::connection::envelope::{self, Envelope, Kind};
    use crate::connection::tests::BULK;

    let (mut ours, theirs) = Socket::pair().unwrap();
    ours.set_limits(crate::Limits {
        max_message_len: 64,
        // The failures fit: they go out (and wait, unread), as the replies of calls would.
        max_send_len: Some(1 << 20),
        ..crate::Limits::default()
    });
    let rt = multi_thread_runtime(2);
    let server = rt.block_on(async { super::AsyncConnection::new(ours).unwrap() });
    server.add_service(Stuck::default());
    // Nothing more goes out to the peer, which reads nothing: every failure waits to.
    fill_with_oneways(&server);
    let flood = std::thread::spawn(move || {
        let mut call = vec![0u8; envelope::LEN + 100];
        for cookie in 1..=4 * crate::connection::backlog::MAX_REQUESTS as u64 {
            Envelope {
                kind: Kind::Call,
                cmd: 2,
                cookie,
                interface: BULK.id,
                signature: BULK.signature,
            }
            .write(&mut call);
            if theirs.send(&call, &[]).is_err() {
                break; // this end hung up
            }
        }
        theirs // kept open: a hang-up would fail the failures waiting to go out
    });
    rt.block_on(async {
        ::tokio::time::timeout(HANG_GUARD, async {
            while !server.test_reader_paused() && !server.is_closed() {
                ::tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the reader neither paused nor ended");
    });
    let why = rt.block_on(async {
        match server.is_closed() {
            true => Some(server.run().await),
            false => None,
        }
    });
    assert!(why.is_none(), "the flood ended the connection: {why:?}");
    assert!(server.test_reader_paused());
    server.close();
    drop(flood.join().unwrap());
}

/// `set_max_calls_at_once(1)` with its one call held: the peer's other calls wait without a
/// task each (the reader's and the held call's are all the connection has), up to the
/// backlog's bounds, where the reader waits for room as it would with them all running. Let
/// go, they run one at a time in the order sent, on the held call's task: their replies come
/// in that order.
#[test]
fn calls_waiting_for_a_slot_hold_no_task_and_pause_the_reader_at_the_bounds() {
    use crate::connection::backlog::MAX_REQUESTS;
    use crate::connection::tests::{ordered_request, wait_until};
    use crate::tokio::envelope::Kind;

    let runtime = multi_thread_runtime(2);
    let (peer, theirs) = Socket::pair().unwrap();
    let (started, has_started) = std::sync::mpsc::channel();
    let gate = std::sync::Arc::new(::tokio::sync::Notify::new());
    let run = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let server = runtime.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    server.set_max_calls_at_once(1);
    let serving = runtime.spawn(server.serve(AsyncOrdered {
        at: 0,
        action: AtSeq::Hold {
            started,
            gate: gate.clone(),
        },
        run: run.clone(),
    }));
    // Call 0 holds the one slot; the others wait, up to the bounds (the one running counts),
    // and one more waits in the socket.
    for seq in 0..=MAX_REQUESTS as u64 {
        peer.send(&ordered_request(Kind::Call, 2, seq + 1, seq), &[])
            .unwrap();
    }
    has_started.recv().unwrap();
    wait_until("the reader waits for room", || server.test_reader_paused());
    assert_eq!(
        server.test_tasks().0,
        2,
        "the reader and the one call's task"
    );
    gate.notify_one();
    for cookie in 1..=MAX_REQUESTS as u64 + 1 {
        let reply = peer.recv().unwrap();
        assert_eq!(
            reply.payload[8..16],
            cookie.to_le_bytes(),
            "replies in order"
        );
    }
    assert_eq!(*run.lock(), (1..=MAX_REQUESTS as u64).collect::<Vec<_>>());
    drop(peer);
    runtime.block_on(serving).unwrap().unwrap();
}

/// Answers each `Ordered` call with 8 MiB (more than the socket buffer holds), noting the
/// number its argument says as its handler starts.
struct LargeReplies(std::sync::Arc<parking_lot::Mutex<Vec<u64>>>);

impl super::AsyncService for LargeReplies {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::ORDERED
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            let seq: u64 = call.args()?;
            self.0.lock().push(seq);
            call.reply(crate::codec::Bytes(vec![7u8; 8 << 20])).await
        })
    }
}

/// How the peer that left its replies unread ends [`calls_held_for_the_replies`].
enum HeldUntil {
    /// It cancels one of the calls held, then reads every reply.
    CancelledAndRead,
    /// It hangs up.
    HungUp,
    /// This end closes the connection.
    Closed,
}

/// A peer that reads no replies: once 16 MiB of them wait to go out (`MAX_REPLY_BYTES`, two
/// of 8 MiB, the first part-way out with the socket buffer full), the calls read after that
/// do not start their handlers, and nothing changes until the peer reads.
fn calls_held_for_the_replies(until: HeldUntil) {
    use crate::connection::envelope::{Envelope, Kind, LEN};
    use crate::connection::tests::{ordered_request, wait_until};

    const CALLS: u64 = 10;
    let runtime = multi_thread_runtime(2);
    let (peer, theirs) = Socket::pair().unwrap();
    let ran = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let server = runtime.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    let serving = runtime.spawn(server.serve(LargeReplies(ran.clone())));
    for seq in 0..CALLS {
        peer.send(&ordered_request(Kind::Call, 2, seq + 1, seq), &[])
            .unwrap();
    }
    let held = || server.test_calls_held_for_replies() as u64;
    wait_until("every call has started or waits", || {
        ran.lock().len() as u64 + held() == CALLS
    });
    let started = ran.lock().clone();
    assert!(
        (2..CALLS / 2).contains(&(started.len() as u64)),
        "handlers started: {started:?}"
    );
    match until {
        HeldUntil::CancelledAndRead => {
            let cancelled = (0..CALLS).rev().find(|seq| !started.contains(seq)).unwrap();
            let mut cancel = vec![0; LEN];
            Envelope {
                kind: Kind::Cancel,
                cmd: 0,
                cookie: cancelled + 1,
                interface: 0,
                signature: 0,
            }
            .write(&mut cancel);
            peer.send(&cancel, &[]).unwrap();
            let others = CALLS - started.len() as u64 - 1;
            wait_until("the call cancelled is dropped", || held() == others);
            let mut answered = Vec::new();
            for _ in 1..CALLS {
                let reply = peer.recv_timeout(HANG_GUARD).unwrap();
                let envelope = Envelope::read(&reply.payload).unwrap();
                assert_eq!(envelope.kind, Kind::Reply);
                assert_eq!(reply.payload.len(), LEN + 9 + (8 << 20), "a whole reply");
                answered.push(envelope.cookie - 1);
            }
            answered.sort_unstable();
            let all_but: Vec<u64> = (0..CALLS).filter(|&seq| seq != cancelled).collect();
            assert_eq!(answered, all_but);
            let mut ran = ran.lock().clone();
            ran.sort_unstable();
            assert_eq!(ran, all_but, "the call cancelled never ran");
            // Its place in the backlog given back, as every other's.
            wait_until("no request is in flight", || {
                !server.test_requests_in_flight()
            });
            drop(peer);
        }
        // The calls held never run: their replies could go nowhere. (They ran before when
        // the peer hung up, their replies failing.)
        HeldUntil::HungUp | HeldUntil::Closed => {
            match until {
                HeldUntil::HungUp => drop(peer),
                _ => server.close(),
            }
            let closed = async { ::tokio::time::timeout(HANG_GUARD, server.wait_closed()).await };
            runtime
                .block_on(closed)
                .expect("the connection never ended");
            assert_eq!(*ran.lock(), started);
            assert_eq!(held(), 0);
        }
    }
    runtime.block_on(serving).unwrap().unwrap();
}

#[test]
fn a_call_held_for_the_replies_cancelled_is_dropped_and_the_others_run_as_the_peer_reads() {
    calls_held_for_the_replies(HeldUntil::CancelledAndRead);
}

#[test]
fn calls_held_for_the_replies_never_run_once_the_peer_hangs_up() {
    calls_held_for_the_replies(HeldUntil::HungUp);
}

#[test]
fn calls_held_for_the_replies_never_run_once_this_end_closes() {
    calls_held_for_the_replies(HeldUntil::Closed);
}

/// `connection::tests::a_caller_waiting_for_room_gets_disconnected_once_the_peer_hangs_up`,
/// async: a call of this end (not a handler's) waits for room with the reader paused at the
/// backlog's bounds, its oneway task held; the peer hangs up. The call waited until a
/// request finished, here for good (the held oneway waits for the call's outcome).
#[test]
fn an_async_caller_waiting_for_room_gets_disconnected_once_the_peer_hangs_up() {
    use crate::connection::tests::{ORDERED, next_call};
    use std::time::Duration;

    // (Only keeps a regression from hanging.)
    const GUARD: Duration = Duration::from_secs(20);
    let (runtime, peer, server, gate, serving) = paused_behind_a_held_oneway();
    let (done, outcome) = std::sync::mpsc::channel();
    runtime.spawn({
        let server = server.clone();
        async move {
            let _ = done.send(server.call::<_, u64>(&ORDERED, 3, 0u64, None).await);
        }
    });
    next_call(&peer);
    drop(peer);
    let outcome = outcome.recv_timeout(GUARD);
    assert!(
        matches!(outcome, Ok(Err(crate::Error::Disconnected))),
        "the caller did not hear that the peer hung up: {outcome:?}"
    );
    gate.notify_one();
    runtime.block_on(serving).unwrap().unwrap();
}
