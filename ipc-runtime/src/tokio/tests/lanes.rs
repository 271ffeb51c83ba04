//! Placements in the lane: calls, requests and oneways dropped, refused or over the
//! limits give their byte strings back; the announcements of pages lent.

use super::*;

/// The async flavour's side of `a_placed_reply_dropped_unread_gives_the_lane_back`: a call
/// dropped (here by its timeout) before its placed reply came leaves that reply unread, and
/// the lane must be given back all the same.
#[test]
fn an_async_call_dropped_before_its_placed_reply_gives_the_lane_back() {
    use std::time::Duration;

    use crate::codec::Bytes;
    use crate::connection::tests::{BULK, serve_gated};
    use crate::{Connection, Error};

    let (ours, theirs) = Socket::pair().unwrap();
    let server = Connection::new(theirs);
    let (open, serving) = serve_gated(&server);
    let runtime = current_thread_runtime();
    runtime.block_on(async {
        let client = super::AsyncConnection::new(ours).unwrap();
        let ping = || client.call::<_, u32>(&BULK, 2, (), None);
        assert_eq!(ping().await.unwrap(), 7);
        let data = vec![0x5a; 8 << 10];
        let short = Some(Duration::from_millis(1));
        let gave_up = client
            .call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), short)
            .await;
        assert!(matches!(gave_up, Err(Error::TimedOut)), "{gave_up:?}");
        open.send(()).unwrap();
        assert_eq!(ping().await.unwrap(), 7);
        assert_eq!(ping().await.unwrap(), 7);
        assert!(!server.lane_is_busy(), "the server's lane is still busy");
        open.send(()).unwrap();
        let Bytes(back) = client
            .call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), None)
            .await
            .unwrap();
        assert_eq!(back, data);
        client.close();
    });
    serving.join().unwrap().unwrap();
}

#[test]
fn an_async_request_never_decoded_gives_the_lane_back() {
    use crate::connection::tests::skim_twice;

    let (client, runtime, server) = client_and_async_server();
    // The client hangs up when its thread is done, which ends `serve`.
    let calling = std::thread::spawn(move || skim_twice(&client));
    runtime.block_on(server.serve(Skimmer)).unwrap();
    calling.join().unwrap();
}

/// The async flavour's [`crate::connection::tests::RunsAnyway`].
struct RunsAnyway;

impl super::AsyncService for RunsAnyway {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::SKIM
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        use crate::codec::Bytes;
        use crate::connection::tests::ANYWAY;
        Box::pin(async move {
            match call.args::<Bytes<Vec<u8>>>() {
                Ok(Bytes(data)) => call.reply(data.len() as u64).await,
                Err(_) => call.reply(Bytes(vec![0u8; ANYWAY])).await,
            }
        })
    }
}

/// `connection::tests::a_handler_that_ran_after_its_arguments_were_refused_is_not_reported_unrun`,
/// served by the async flavour.
#[test]
fn an_async_handler_that_ran_after_its_arguments_were_refused_is_not_reported_unrun() {
    use crate::connection::tests::{call_one_that_runs_anyway, limits_of_100_kib};
    let (ours, mut theirs) = Socket::pair().unwrap();
    theirs.set_limits(limits_of_100_kib());
    let runtime = current_thread_runtime();
    let server = runtime.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    let client = crate::Connection::new(ours);
    // The client hangs up when its thread is done, which ends `serve`.
    let calling = std::thread::spawn(move || call_one_that_runs_anyway(&client));
    runtime.block_on(server.serve(RunsAnyway)).unwrap();
    calling.join().unwrap();
}

/// A oneway message for an interface the async end does not serve is refused before any
/// handler sees it; a byte string it placed must still be released, or the sender, who hears
/// nothing back about a oneway, keeps its lane busy for good.
#[test]
fn an_async_refused_oneway_gives_the_lane_back() {
    use crate::codec::Bytes;
    use crate::connection::tests::SKIM;
    use crate::service::InterfaceInfo;

    static ELSEWHERE: InterfaceInfo = InterfaceInfo {
        name: "Elsewhere",
        id: 99,
        signature: 1,
        methods: &[],
    };

    let (client, runtime, server) = client_and_async_server();
    let calling = std::thread::spawn(move || {
        let data = vec![7u8; 8 << 10];
        let len = |bytes: &[u8]| client.call::<_, u64>(&SKIM, 2, &Bytes(bytes), None);
        assert_eq!(len(&data[..100]).unwrap(), 100); // both ends now know the other reads lanes
        client.oneway(&ELSEWHERE, 1, &Bytes(&data), None).unwrap();
        assert!(client.lane_is_busy(), "the oneway's string was placed");
        // The reply to this call carries the server's acknowledgement of the refused oneway.
        assert_eq!(len(&data[..100]).unwrap(), 100);
        assert!(
            !client.lane_is_busy(),
            "the refused oneway's placement is still held"
        );
    });
    runtime.block_on(server.serve(Skimmer)).unwrap();
    calling.join().unwrap();
}

/// Calls cancelled at random moments, with placed byte strings both ways: afterwards no lane
/// is left busy.
#[test]
fn async_calls_cancelled_at_random_moments_leave_no_lane_busy() {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;
    use std::time::Duration;

    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (client, server) = super::AsyncConnection::pair().unwrap();
        server.add_service(QuickEcho::default());
        let mut x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        let rounds: u32 = std::env::var("ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3000);
        for _ in 0..rounds {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = [1024usize, 2000, 8 << 10, 60_000, 70_000, 300_000][(x % 6) as usize];
            let us = (x >> 8) % 200;
            let data = vec![(x >> 16) as u8; len];
            let got = ::tokio::time::timeout(
                Duration::from_micros(us),
                client.call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), None),
            )
            .await;
            if let Ok(got) = got {
                assert_eq!(got.unwrap().0, data);
            }
        }
        assert!(settle(&client, &server).await, "a lane stayed busy");
        let data = vec![3u8; 4096];
        let Bytes(back) = client
            .call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), None)
            .await
            .unwrap();
        assert_eq!(back, data);
    });
}

/// How long, in all, `an_async_call_dropped_as_its_placed_reply_arrives_gives_the_lane_back`
/// spins between a call and its drop.
const SPIN_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

/// Aims the drop of a call at the moment its placed reply arrives: the reply must be finished
/// (its placement acknowledged) whichever way the race goes. When replies went through a
/// one-shot channel per call, the dropped call could find the channel empty, the reader then
/// send the reply into it, and the receiver, dropped next, drop the frame with it unfinished:
/// the server's lane stayed busy for good. Aimed by spinning for about a round trip; a run of
/// 100,000 drops hit that window in 7 runs of 10 here. Now the slot is taken under the state
/// lock, and a drop that forgets to finish the reply it finds fails this test at once.
#[test]
fn an_async_call_dropped_as_its_placed_reply_arrives_gives_the_lane_back() {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    use std::time::Instant;

    let rt = multi_thread_runtime(1);
    let (client, server) = rt.block_on(async {
        let (client, server) = super::AsyncConnection::pair().unwrap();
        server.add_service(QuickEcho::default());
        (client, server)
    });
    let _enter = rt.enter();
    let mut cx = Context::from_waker(Waker::noop());
    let data = vec![5u8; 2048];
    let call = || client.call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), None);
    // The round trip's time, spinning.
    let mut rtt = Vec::new();
    for _ in 0..200 {
        let mut c = Box::pin(call());
        let start = Instant::now();
        loop {
            if let Poll::Ready(r) = c.as_mut().poll(&mut cx) {
                r.unwrap();
                break;
            }
        }
        rtt.push(start.elapsed().as_nanos() as u64);
    }
    rtt.sort();
    let median = rtt[rtt.len() / 2];
    eprintln!("median round trip {median} ns");
    let rounds: u64 = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    // Each round spins for about a round trip, and a round trip on a loaded machine, or on
    // one CPU, is a timeslice: 16 ms under `taskset -c 0` beside two busy loops, where 100,000
    // rounds took over 25 minutes (a hang, to CI's watchdog). The spinning is bounded, well
    // above what 100,000 rounds of an idle machine's round trip spin.
    let rounds = rounds.min(SPIN_BUDGET.as_nanos() as u64 / median.max(1));
    let mut x = 88172645463325252u64;
    let mut leaked_at = None;
    for i in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let wait = median / 2 + x % median;
        let mut c = Box::pin(call());
        let start = Instant::now();
        if c.as_mut().poll(&mut cx).is_ready() {
            continue;
        }
        while (start.elapsed().as_nanos() as u64) < wait {
            std::hint::spin_loop();
        }
        drop(c);
        if i % 500 == 499 && leaked_at.is_none() {
            let settled = rt.block_on(settle(&client, &server));
            if !settled {
                leaked_at = Some(i);
                break;
            }
        }
    }
    let settled = leaked_at.is_none() && rt.block_on(settle(&client, &server));
    assert!(
        settled,
        "a reply's placement leaked (by round {leaked_at:?})"
    );
}

/// The async side of `a_message_over_this_sides_limits_is_refused_unsent`: a call or oneway
/// over this side's limits fails before anything goes out, also while another message holds
/// the send lock (it would otherwise wait for it, then send), and gives back the byte string
/// it placed in the lane.
#[test]
fn an_async_message_over_this_sides_limits_is_refused_unsent() {
    use std::time::Duration;

    use crate::codec::{Bytes, Fd};
    use crate::connection::tests::SKIM;
    use crate::{Connection, Error, Limits};

    let limits = Limits {
        max_message_len: 1 << 20,
        max_fds: 4,
        ..Default::default()
    };
    let runtime = current_thread_runtime();
    // Refused with a placement in the lane, against a blocking server.
    let (mut ours, theirs) = Socket::pair().unwrap();
    ours.set_limits(limits);
    let server = Connection::new(theirs);
    let serving = {
        let server = server.clone();
        std::thread::spawn(move || server.serve(crate::connection::tests::Skimmer))
    };
    runtime.block_on(async {
        let client = super::AsyncConnection::new(ours).unwrap();
        let small = client.call::<_, u64>(&SKIM, 2, Bytes(vec![1u8; 100]), None);
        assert_eq!(small.await.unwrap(), 100); // both ends now know the other reads lanes
        let (placed, inline) = (vec![7u8; 8 << 10], vec![1u8; 2 << 20]);
        let refused = client
            .call::<_, u64>(&SKIM, 2, (Bytes(placed), Bytes(inline)), None)
            .await;
        assert!(
            matches!(
                refused,
                Err(Error::TooLarge { limit, which: crate::Limit::MaxMessageLen, .. })
                    if limit == 1 << 20
            ),
            "{refused:?}"
        );
        assert!(
            !client.test_lane().is_busy(),
            "the placement was given back"
        );
        let len = client.call::<_, u64>(&SKIM, 2, Bytes(vec![7u8; 8 << 10]), None);
        assert_eq!(len.await.unwrap(), 8 << 10, "the next placement is read");
        client.close();
    });
    serving.join().unwrap().unwrap();

    // Refused while another message holds the send lock: its peer reads nothing.
    let (mut ours, theirs) = Socket::pair().unwrap();
    ours.set_limits(limits);
    runtime.block_on(async {
        let client = super::AsyncConnection::new(ours).unwrap();
        let filler = {
            let client = client.clone();
            ::tokio::spawn(async move {
                loop {
                    let sent = client
                        .oneway(&SKIM, 1, Bytes(vec![0u8; 1 << 19]), None)
                        .await;
                    if sent.is_err() {
                        return;
                    }
                }
            })
        };
        // On this one thread, a filler that finds the socket full waits in its send, holding
        // the lock.
        while nix::poll::poll(
            &mut [PollFd::new(client.as_fd(), PollFlags::POLLOUT)],
            PollTimeout::ZERO,
        )
        .unwrap()
            == 1
        {
            ::tokio::task::yield_now().await;
        }
        let files: Vec<OwnedFd> = (0..5).map(memfd).collect();
        // (The timeout only keeps a regression from hanging: nobody reads the socket.)
        let refused = ::tokio::time::timeout(
            Duration::from_secs(60),
            client.call::<_, u32>(&SKIM, 1, Fd(&files), None),
        )
        .await
        .expect("refused at once, not sent after the filler");
        crate::connection::tests::assert_five_fds_over_this_sides_four(&refused);
        for (i, file) in files.into_iter().enumerate() {
            assert_eq!(index_of(file), i as u32, "the caller's fds are untouched");
        }
        client.close();
        filler.await.unwrap();
    });
    drop(theirs);
}

/// `lend_pages_to_peer` twice, the first announcement finding the socket full (so sent from
/// a task) and the second finding room: the peer must end with this end's last trust, as its
/// next large call shows (piped only to an end that reads pipes). The task sent its stale
/// announcement after the second: a peer told "no longer trusts", then "trusts", piped to an
/// end that refuses pipes and every such call failed; told the reverse, it never piped again.
fn lend_pages_twice_the_first_announcement_waiting_for_room(last: bool) {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use crate::SharedBytes;
    use crate::codec::Bytes;
    use crate::connection::tests::{BULK, SKIM};

    let (runtime, server, theirs) = undriven_connection();
    server.add_service(Skimmer);
    let client = crate::Connection::new(theirs);
    client.lend_pages_to_peer(true);
    // From `last` (sent at once, if a change), so that `!last` and then `last` are changes.
    server.lend_pages_to_peer(last);
    // The client reads nothing yet, and the runtime is not driven: send until the socket is
    // full. The send that finds it so is dropped: a small message is one datagram, none of it
    // went out, and the send lock is free again.
    let mut cx = Context::from_waker(Waker::noop());
    let mut unread = usize::from(last);
    while let Poll::Ready(sent) = Box::pin(server.oneway(&BULK, 1, (), None))
        .as_mut()
        .poll(&mut cx)
    {
        sent.unwrap();
        unread += 1;
        assert!(unread < 1 << 20, "the peer's queue never filled");
    }
    let (tasks, _) = server.test_tasks();
    server.lend_pages_to_peer(!last);
    assert_eq!(
        server.test_tasks().0,
        tasks + 1,
        "the announcement waits for room in a task"
    );
    // Room again before that task has run: the next announcement finds it.
    for _ in 0..unread {
        client.socket().recv().unwrap();
    }
    server.lend_pages_to_peer(last);
    runtime.block_on(async {
        while server.test_tasks().0 > tasks {
            ::tokio::task::yield_now().await;
        }
    });
    let (done, calls_done) = ::tokio::sync::oneshot::channel();
    let calling = std::thread::spawn(move || {
        // Its reply tells the client that the server reads lanes; the announcements came
        // before it.
        let small = client.call::<_, u64>(&SKIM, 2, &Bytes(&[1u8; 100][..]), None);
        assert_eq!(small.unwrap(), 100);
        let large = SharedBytes::from(vec![2u8; 200 << 10]);
        let len = client.call::<_, u64>(&SKIM, 2, &large, None);
        let _ = done.send(());
        len
    });
    runtime.block_on(calls_done).unwrap();
    let len = calling.join().unwrap();
    assert!(matches!(len, Ok(len) if len == 200 << 10), "{len:?}");
    assert_eq!(
        server.test_lane().reads_a_pipe(),
        last,
        "the client piped its string only to a server that reads pipes"
    );
}

#[test]
fn a_peer_told_late_that_this_end_trusts_pipes_does_not_pipe_once_it_no_longer_does() {
    lend_pages_twice_the_first_announcement_waiting_for_room(false);
}

#[test]
fn a_peer_told_late_that_this_end_no_longer_trusts_pipes_pipes_once_it_does_again() {
    lend_pages_twice_the_first_announcement_waiting_for_room(true);
}

/// A hostile peer acknowledges a placement before the message that carries it is out (it
/// stops reading to keep that message waiting, and guesses the sequence number), but the
/// message still names the region's fd by its number. Giving the region back then would close
/// that number, the next file this process opened would take it, and the message would carry
/// that file to the peer. The lane stays busy, and the region is kept, until the message is
/// out.
#[test]
fn a_region_named_by_a_message_still_going_out_is_not_given_back() {
    use std::future::Future;
    use std::task::{Context, Waker};

    use crate::codec::Bytes;
    use crate::connection::envelope::{self, Envelope};
    use crate::connection::tests::BULK;
    use crate::shared_region::RegionView;

    let (runtime, conn, theirs) = undriven_connection();
    let say = |lane: u32| {
        let mut msg = vec![0u8; envelope::LEN + 16];
        Envelope::announce().write(&mut msg);
        envelope::set_lane(&mut msg, lane);
        theirs.send(&msg, &[]).unwrap();
    };
    say(1 << 23); // reads lanes
    runtime.block_on(async {
        while !conn.test_lane().peer_reads() {
            ::tokio::task::yield_now().await;
        }
    });
    // Fill the socket, then a oneway whose byte string announces the region waits for room.
    let unread = fill_with_oneways(&conn);
    let mut cx = Context::from_waker(Waker::noop());
    let data = vec![5u8; 4096];
    let mut pending = Box::pin(conn.oneway(&BULK, 1, Bytes(&data[..]), None));
    assert!(pending.as_mut().poll(&mut cx).is_pending());
    assert!(conn.test_lane().is_busy());
    say(1 << 23 | 1); // acknowledges placement 1, which it has not received
    runtime.block_on(async {
        while !conn.test_lane().is_acknowledged() {
            ::tokio::task::yield_now().await;
        }
    });
    assert!(conn.test_lane().is_busy(), "busy until its message is out");
    assert_eq!(
        conn.release_shared_memory(),
        0,
        "the region was given back while a message still names its fd"
    );
    let unrelated = memfd(0xdead); // takes the lowest free number, the region's if closed
    for _ in 0..unread {
        theirs.recv().unwrap();
    }
    runtime.block_on(async { pending.await.unwrap() });
    let frame = theirs.recv().unwrap();
    let fd = frame
        .fds
        .into_iter()
        .next()
        .expect("the message carries the region");
    assert_eq!(RegionView::from_fd(fd).unwrap().len(), 64 << 10);
    drop(unrelated);
    assert_eq!(
        conn.release_shared_memory(),
        64 << 10,
        "out: given back now"
    );
}
