//! Cancellation: a call its caller gave up on is dropped at the peer, and hostile cancels
//! drop only what they name.

use super::*;

/// A cancel (envelope kind 7) for a call that is not running, with a body and an fd a
/// hostile peer put in, is dropped whole: the connection goes on. Before wire version 12 the
/// kind was unknown and ended the connection as malformed.
#[test]
fn an_async_cancel_of_no_call_is_ignored_with_what_it_holds() {
    use crate::connection::envelope::{self, Envelope};
    use crate::connection::tests::BULK;

    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (client, server) = super::AsyncConnection::pair().unwrap();
        server.add_service(QuickEcho::default());
        let mut cancel = vec![0u8; envelope::LEN];
        Envelope::cancel(77).write(&mut cancel);
        cancel.extend_from_slice(b"a body no cancel has");
        // A small message on an idle connection: the blocking send does not wait.
        client.socket().send(&cancel, &[memfd(1).as_fd()]).unwrap();
        assert_eq!(client.call::<_, u32>(&BULK, 2, (), None).await.unwrap(), 7);
    });
}

/// A call dropped while its handler waits has the handler's future dropped on the server (its
/// guard says so), no reply, and the placement its request carried, never decoded, given back
/// by a message of the server's own, with no later call to carry the acknowledgement. Before
/// cancellation reached the peer, the handler waited for good (the guard never spoke) and the
/// client's lane stayed busy until the server sent something else.
#[test]
fn a_dropped_call_has_its_handler_dropped_and_its_placement_given_back() {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;

    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (client, server) = super::AsyncConnection::pair().unwrap();
        let stuck = Stuck::default();
        server.add_service(stuck.clone());
        // The server's reply says it reads lanes: the next string is placed.
        assert_eq!(client.call::<_, u32>(&BULK, 2, (), None).await.unwrap(), 7);
        let call = ::tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(vec![5u8; 8 << 10]), None)
                    .await
            }
        });
        stuck.started.notified().await;
        assert!(client.test_lane().is_busy(), "the string was placed");
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
        ::tokio::time::timeout(HANG_GUARD, stuck.dropped.notified())
            .await
            .expect("the handler was never dropped");
        ::tokio::time::timeout(HANG_GUARD, async {
            while client.test_lane().is_busy() {
                ::tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the client's lane stayed busy");
        assert_eq!(client.call::<_, u32>(&BULK, 2, (), None).await.unwrap(), 7);
    });
}

/// A call held for a server still to come, cancelled meanwhile, never runs once one comes:
/// the client hangs up and the server's `run` returns, which it would not with the stuck
/// handler running. Before, the held call ran when the service came, and `run` waited for it
/// for good.
#[test]
fn a_call_cancelled_while_held_for_a_server_never_runs() {
    use crate::connection::tests::BULK;
    use std::future::Future;
    use std::task::{Context, Waker};

    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (client, server) = super::AsyncConnection::pair().unwrap();
        {
            let mut call = Box::pin(client.call::<_, crate::codec::Bytes<Vec<u8>>>(
                &BULK,
                1,
                crate::codec::Bytes(vec![1]),
                None,
            ));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(
                call.as_mut().poll(&mut cx).is_pending(),
                "sent, no reply yet"
            );
        } // dropped: its cancel goes out
        // Sent after the cancel: once the server has taken it in, it has read the cancel.
        client.lend_pages_to_peer(true);
        ::tokio::time::timeout(HANG_GUARD, async {
            while !server.test_lane().peer_takes_pipes() {
                ::tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the announcement never came");
        let stuck = Stuck::default();
        server.add_service(stuck.clone());
        drop(client);
        ::tokio::time::timeout(HANG_GUARD, server.run())
            .await
            .expect("the cancelled call ran, and waits for good")
            .unwrap();
    });
}

/// A hostile peer's cancels: one for a call that is running, carrying a body and an fd it
/// should not, drops that call (its handler's guard speaks) and sends no reply for it; cancels
/// of cookies that run nothing (0, one never sent, the same one again) change nothing; and the
/// connection answers the next call, whose reply is the first message the peer gets.
#[test]
fn hostile_cancels_drop_only_the_call_they_name_and_send_nothing_back() {
    use crate::codec::{self, Bytes};
    use crate::connection::envelope::{self, Envelope, Kind};
    use crate::connection::tests::BULK;

    let (ours, theirs) = Socket::pair().unwrap();
    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let server = super::AsyncConnection::new(ours).unwrap();
        let stuck = Stuck::default();
        server.add_service(stuck.clone());
        let message = |kind, cmd, cookie, body: &dyn Fn(&mut Vec<u8>)| {
            let mut m = vec![0u8; envelope::LEN];
            Envelope {
                kind,
                cmd,
                cookie,
                interface: BULK.id,
                signature: BULK.signature,
            }
            .write(&mut m);
            body(&mut m);
            m
        };
        let echo_args = |m: &mut Vec<u8>| {
            codec::encode(&Bytes(vec![1u8, 2]), m, &mut Vec::new()).unwrap();
        };
        let call = message(Kind::Call, 1, 5, &echo_args);
        theirs.send(&call, &[]).unwrap();
        ::tokio::time::timeout(HANG_GUARD, stuck.started.notified())
            .await
            .expect("the call never started");
        let junk = |m: &mut Vec<u8>| m.extend_from_slice(&[0xff; 40]);
        for cookie in [0, 99, 5, 5] {
            let cancel = message(Kind::Cancel, 7, cookie, &junk);
            theirs
                .send(&cancel, &[memfd(cookie as u32).as_fd()])
                .unwrap();
        }
        ::tokio::time::timeout(HANG_GUARD, stuck.dropped.notified())
            .await
            .expect("the cancelled handler was never dropped");
        let ping = message(Kind::Call, 2, 6, &|_: &mut Vec<u8>| {});
        theirs.send(&ping, &[]).unwrap();
        let reply = ::tokio::task::spawn_blocking(move || theirs.recv().unwrap())
            .await
            .unwrap();
        let envelope = Envelope::read(&reply.payload).unwrap();
        assert_eq!(
            (envelope.kind, envelope.cookie),
            (Kind::Reply, 6),
            "nothing went out for the cancelled call"
        );
    });
}

/// A hostile peer that uses cookie 5 for two calls at once, both waiting for good, then
/// cancels 5: both are dropped (it waits for neither), nothing is sent for them, and the
/// cancel does not linger: a third call 5 after them is answered. Before, the cancel reached
/// only the first call (the second waited for good), and the runner that had a cancelled call
/// dropped a later call of the same cookie unrun.
#[test]
fn a_cancel_of_a_reused_cookie_drops_every_call_that_has_it_and_no_later_one() {
    use crate::connection::envelope::{self, Envelope, Kind};
    use crate::connection::tests::BULK;
    use std::sync::atomic::Ordering;

    let (ours, theirs) = Socket::pair().unwrap();
    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let server = super::AsyncConnection::new(ours).unwrap();
        let stuck = Stuck::default();
        server.add_service(stuck.clone());
        let message = |kind, cmd, cookie| {
            let mut m = vec![0u8; envelope::LEN];
            Envelope {
                kind,
                cmd,
                cookie,
                interface: BULK.id,
                signature: BULK.signature,
            }
            .write(&mut m);
            m
        };
        for _ in 0..2 {
            theirs.send(&message(Kind::Call, 1, 5), &[]).unwrap();
            ::tokio::time::timeout(HANG_GUARD, stuck.started.notified())
                .await
                .expect("the call never started");
        }
        theirs.send(&message(Kind::Cancel, 0, 5), &[]).unwrap();
        while stuck.drops.load(Ordering::SeqCst) < 2 {
            ::tokio::time::timeout(HANG_GUARD, stuck.dropped.notified())
                .await
                .expect("a call of the cookie cancelled was never dropped");
        }
        theirs.send(&message(Kind::Call, 2, 5), &[]).unwrap();
        let reply = ::tokio::task::spawn_blocking(move || theirs.recv().unwrap())
            .await
            .unwrap();
        let envelope = Envelope::read(&reply.payload).unwrap();
        assert_eq!(
            (envelope.kind, envelope.cookie),
            (Kind::Reply, 5),
            "nothing went out for the cancelled calls, and the later one was answered"
        );
    });
}

/// Echoes byte strings after yielding as many times as the first byte says (mod 4), so that
/// a cancel finds handlers at every point: unrun, waiting, replying.
#[derive(Clone, Default)]
struct YieldingEcho;

impl super::AsyncService for YieldingEcho {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::BULK
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            match call.command() {
                1 => {
                    let crate::codec::Bytes(data): crate::codec::Bytes<Vec<u8>> = call.args()?;
                    for _ in 0..data.first().map_or(0, |b| b % 4) {
                        ::tokio::task::yield_now().await;
                    }
                    call.reply(crate::codec::Bytes(data)).await
                }
                _ => call.reply(7u32).await,
            }
        })
    }
}

/// A string of `len` bytes no other round sends: its first byte says how often the handler
/// yields, the next eight the round.
fn storm_data(len: usize, round: u64, x: u64) -> Vec<u8> {
    let mut data = vec![(x >> 24) as u8; len];
    data[0] = x as u8;
    data[1..9].copy_from_slice(&round.to_le_bytes());
    data
}

/// Both ends call each other at once, each call dropped at a random moment, with strings
/// placed or piped both ways: every call that returns gets its own reply (never one that
/// crossed an earlier call's cancel), and afterwards no lane is left busy either way.
#[test]
fn calls_both_ways_cancelled_at_random_get_their_own_replies_and_leave_no_lane_busy() {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;
    use std::time::Duration;

    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (a, b) = super::AsyncConnection::pair().unwrap();
        a.add_service(YieldingEcho);
        b.add_service(YieldingEcho);
        a.lend_pages_to_peer(true);
        b.lend_pages_to_peer(true);
        let rounds: u64 = std::env::var("ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3000);
        let storm = |conn: super::AsyncConnection, seed: u64| async move {
            let mut x = seed | 1;
            let mut answered = 0u64;
            for round in 0..rounds {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = [16usize, 2000, 8 << 10, 70_000, 300_000][(x >> 3) as usize % 5];
                let data = storm_data(len, round, x);
                let us = (x >> 40) % 60;
                let got = ::tokio::time::timeout(
                    Duration::from_micros(us),
                    conn.call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), None),
                )
                .await;
                if let Ok(got) = got {
                    let Bytes(back) = got.unwrap();
                    assert!(back == data, "round {round}: another call's reply");
                    answered += 1;
                }
            }
            answered
        };
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("seed {seed}");
        let one = ::tokio::spawn(storm(a.clone(), seed));
        let two = ::tokio::spawn(storm(b.clone(), seed.rotate_left(17)));
        let answered = (one.await.unwrap(), two.await.unwrap());
        eprintln!("answered {answered:?} of {rounds} each");
        assert!(settle(&a, &b).await, "a lane stayed busy");
        assert!(settle(&b, &a).await, "a lane stayed busy");
        for conn in [&a, &b] {
            let data = storm_data(300_000, u64::MAX, 0x55);
            let Bytes(back) = conn
                .call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(data.clone()), None)
                .await
                .unwrap();
            assert!(back == data);
        }
    });
}

/// A blocking client whose calls time out at random moments, against an async server whose
/// handlers yield: every call that returns gets its own reply, and the connection and both
/// lanes are fine afterwards.
#[test]
fn blocking_calls_timing_out_at_random_against_an_async_server_get_their_own_replies() {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;
    use std::time::Duration;

    let (ours, theirs) = Socket::pair().unwrap();
    let rt = multi_thread_runtime(2);
    let server = rt.block_on(async { super::AsyncConnection::new(theirs).unwrap() });
    server.add_service(YieldingEcho);
    let client = crate::Connection::new(ours);
    let rounds: u64 = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {x}");
    let mut answered = 0;
    for round in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = [16usize, 2000, 8 << 10, 70_000, 300_000][(x >> 3) as usize % 5];
        let data = storm_data(len, round, x);
        let us = 1 + (x >> 40) % 60;
        match client.call::<_, Bytes<Vec<u8>>>(
            &BULK,
            1,
            &Bytes(data.clone()),
            Some(Duration::from_micros(us)),
        ) {
            Ok(Bytes(back)) => {
                assert!(back == data, "round {round}: another call's reply");
                answered += 1;
            }
            Err(crate::Error::TimedOut) => {}
            Err(e) => panic!("round {round}: {e}"),
        }
    }
    eprintln!("answered {answered} of {rounds}");
    for _ in 0..3 {
        let data = storm_data(300_000, u64::MAX, 0x55);
        let Bytes(back) = client
            .call::<_, Bytes<Vec<u8>>>(&BULK, 1, &Bytes(data.clone()), None)
            .unwrap();
        assert!(back == data);
    }
    assert_ne!(
        client.release_shared_memory(),
        0,
        "the client's lane stayed busy"
    );
    drop(client);
    drop(server);
    drop(rt);
}

/// Calls back into its caller (the same connection) and waits for that call's reply.
struct CallsBack {
    conn: std::sync::OnceLock<super::AsyncConnection>,
    dropped: std::sync::Arc<::tokio::sync::Notify>,
}

impl super::AsyncService for CallsBack {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::BULK
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            match call.command() {
                1 => {
                    let _guard = SaysDropped(self.dropped.clone(), Default::default());
                    let conn = self.conn.get().expect("set").clone();
                    let back: crate::codec::Bytes<Vec<u8>> = conn
                        .call(
                            &crate::connection::tests::BULK,
                            1,
                            crate::codec::Bytes(vec![1u8]),
                            None,
                        )
                        .await?;
                    call.reply(back).await
                }
                _ => call.reply(7u32).await,
            }
        })
    }
}

/// A handler cancelled while it waits for a call back into its caller drops that call, so
/// its caller's handler for it is dropped too (the chain of cancels goes back and forth on
/// one connection), and both ends answer calls afterwards.
#[test]
fn a_handler_cancelled_during_its_call_back_cancels_the_call_back() {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;

    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let (a, b) = super::AsyncConnection::pair().unwrap();
        let stuck = Stuck::default();
        a.add_service(stuck.clone());
        let calls_back = std::sync::Arc::new(CallsBack {
            conn: std::sync::OnceLock::new(),
            dropped: Default::default(),
        });
        let _ = calls_back.conn.set(b.clone());
        struct Shared(std::sync::Arc<CallsBack>);
        impl super::AsyncService for Shared {
            fn info(&self) -> &'static crate::service::InterfaceInfo {
                &BULK
            }
            fn handle<'a>(
                &'a self,
                call: &'a mut super::AsyncCall,
            ) -> super::BoxFuture<'a, crate::Result<()>> {
                self.0.handle(call)
            }
        }
        b.add_service(Shared(calls_back.clone()));
        let outer = ::tokio::spawn({
            let a = a.clone();
            async move {
                a.call::<_, Bytes<Vec<u8>>>(&BULK, 1, Bytes(vec![2u8]), None)
                    .await
            }
        });
        ::tokio::time::timeout(HANG_GUARD, stuck.started.notified())
            .await
            .expect("the call back never started");
        outer.abort();
        assert!(outer.await.unwrap_err().is_cancelled());
        ::tokio::time::timeout(HANG_GUARD, calls_back.dropped.notified())
            .await
            .expect("the cancelled handler was never dropped");
        ::tokio::time::timeout(HANG_GUARD, stuck.dropped.notified())
            .await
            .expect("its call back's handler was never dropped");
        assert_eq!(a.call::<_, u32>(&BULK, 2, (), None).await.unwrap(), 7);
        assert_eq!(b.call::<_, u32>(&BULK, 2, (), None).await.unwrap(), 7);
        assert!(settle(&a, &b).await, "a lane stayed busy");
        let _ = calls_back.conn.get().map(super::AsyncConnection::close);
    });
}

/// A hostile peer's cancels that name no call of its own: the cookie of the call this end
/// is making to it (the other direction), the largest cookie, and a flood of cookies it never
/// used, each with an fd. None drops the peer's running call nor this end's own call, whose
/// reply still comes; the connection answers the next call.
#[test]
fn hostile_cancels_of_the_other_direction_drop_nothing() {
    use crate::connection::envelope::{self, Envelope, Kind};
    use crate::connection::tests::BULK;
    use std::future::Future;
    use std::task::{Context, Waker};

    let (ours, theirs) = Socket::pair().unwrap();
    let theirs = std::sync::Arc::new(theirs);
    let rt = multi_thread_runtime(2);
    rt.block_on(async {
        let server = super::AsyncConnection::new(ours).unwrap();
        let stuck = Stuck::default();
        server.add_service(stuck.clone());
        let message = |kind, cmd, cookie| {
            let mut m = vec![0u8; envelope::LEN];
            Envelope {
                kind,
                cmd,
                cookie,
                interface: BULK.id,
                signature: BULK.signature,
            }
            .write(&mut m);
            m
        };
        let recv = |socket: std::sync::Arc<Socket>| async move {
            ::tokio::task::spawn_blocking(move || socket.recv().unwrap())
                .await
                .unwrap()
        };
        // This end calls the peer.
        let ours_call = ::tokio::spawn({
            let server = server.clone();
            async move { server.call::<_, u32>(&BULK, 2, (), None).await }
        });
        let request = recv(theirs.clone()).await;
        let ours_cookie = Envelope::read(&request.payload).unwrap().cookie;
        // The peer's own call, which runs for good.
        let mut call = message(Kind::Call, 1, 5);
        crate::codec::encode(&crate::codec::Bytes(vec![1u8]), &mut call, &mut Vec::new()).unwrap();
        theirs.send(&call, &[]).unwrap();
        ::tokio::time::timeout(HANG_GUARD, stuck.started.notified())
            .await
            .expect("the call never started");
        let mut cookies = vec![ours_cookie, u64::MAX, u64::MAX - 1, 4, 6];
        cookies.extend((0..5000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1 << 63));
        for cookie in cookies {
            let cancel = message(Kind::Cancel, 0, cookie);
            let fd = memfd(1);
            let sent = ::tokio::task::spawn_blocking({
                let theirs = theirs.clone();
                move || theirs.send(&cancel, &[fd.as_fd()])
            });
            sent.await.unwrap().unwrap();
        }
        // The peer's ping, then its answer to this end's call.
        theirs.send(&message(Kind::Call, 2, 6), &[]).unwrap();
        let reply = recv(theirs.clone()).await;
        let envelope = Envelope::read(&reply.payload).unwrap();
        assert_eq!((envelope.kind, envelope.cookie), (Kind::Reply, 6));
        let mut dropped = std::pin::pin!(stuck.dropped.notified());
        assert!(
            dropped
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_pending(),
            "a cancel of no call of the peer's dropped its running call"
        );
        let mut answer = message(Kind::Reply, 2, ours_cookie);
        crate::codec::encode(&9u32, &mut answer, &mut Vec::new()).unwrap();
        theirs.send(&answer, &[]).unwrap();
        let got = ::tokio::time::timeout(HANG_GUARD, ours_call)
            .await
            .expect("this end's call never got its reply");
        assert_eq!(got.unwrap().unwrap(), 9, "this end's own call was dropped");
    });
}
