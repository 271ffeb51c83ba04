//! A runtime shutting down under a connection or listener: calls, oneways, sends and
//! accepts caught by it neither deadlock nor hang, and say what happened.

use super::*;

/// Blocks the first wake until `release` is dropped, after saying so on `entered`, and then
/// until `then` returns.
struct BlockingWaker {
    entered: parking_lot::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: parking_lot::Mutex<std::sync::mpsc::Receiver<()>>,
    then: Box<dyn Fn() + Send + Sync>,
}

impl std::task::Wake for BlockingWaker {
    fn wake(self: std::sync::Arc<Self>) {
        if let Some(entered) = self.entered.lock().take() {
            entered.send(()).unwrap();
            let _ = self.release.lock().recv(); // until the sender is dropped
            (self.then)();
        }
    }
}

/// What the connection has when its runtime closes (see [`request_as_the_runtime_closes`]).
#[derive(Clone, Copy, PartialEq)]
enum AtClose {
    /// Only the reader.
    Reader,
    /// Also a task that ran a call and waits idle for the next; the runtime has dropped it
    /// when the reader routes the request.
    IdleRunnerDropped,
}

/// Holds the reader of a connection serving `service` between a reply and the request
/// behind it (`kind`: a call or a oneway of the peer's) until its runtime, dropped meanwhile
/// on another thread, has closed itself to new tasks: the reader then routes the request as
/// the runtime shuts down. The reader is held by the waker of the call the reply answers,
/// which returns only once the runtime has dropped a task of its own (and, with `at_close`
/// [`AtClose::IdleRunnerDropped`], the connection's idle task). Returns whether dropping the
/// runtime returned, the connection, and the peer's end.
fn request_as_the_runtime_closes<S: super::AsyncService>(
    service: impl FnOnce(&super::AsyncConnection) -> S,
    kind: crate::tokio::envelope::Kind,
    at_close: AtClose,
) -> (bool, super::AsyncConnection, Socket) {
    use crate::codec::Bytes;
    use crate::connection::tests::BULK;
    use crate::tokio::envelope::{self, Envelope, Kind};
    use std::future::Future;
    use std::sync::mpsc;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    let rt = multi_thread_runtime(2);
    let (a, peer) = Socket::pair().unwrap();
    let conn = {
        let _in = rt.enter();
        super::AsyncConnection::new(a).unwrap()
    };
    conn.add_service(service(&conn));
    let message = |envelope: Envelope| {
        let mut payload = vec![0; envelope::LEN];
        envelope.write(&mut payload);
        payload
    };
    let echo = |kind: Kind, cookie: u64| {
        let mut echo = message(Envelope {
            kind,
            cmd: 1,
            cookie,
            interface: BULK.id,
            signature: BULK.signature,
        });
        crate::codec::encode(&Bytes(&b"hi"[..]), &mut echo, &mut Vec::new()).unwrap();
        echo
    };
    if at_close == AtClose::IdleRunnerDropped {
        peer.send(&echo(Kind::Call, 9), &[]).unwrap();
        peer.recv().unwrap();
        crate::connection::tests::wait_until("a task waits idle", || conn.test_tasks().1 == 1);
    }
    let (release, released) = mpsc::channel::<()>();
    // Dropped, releasing the waker, only when the runtime drops its tasks: it is closed then.
    rt.spawn(async move {
        let _release = release;
        std::future::pending::<()>().await
    });
    let (entered, in_wake) = mpsc::channel();
    let waker = Waker::from(std::sync::Arc::new(BlockingWaker {
        entered: parking_lot::Mutex::new(Some(entered)),
        release: parking_lot::Mutex::new(released),
        then: match at_close {
            AtClose::Reader => Box::new(|| {}),
            AtClose::IdleRunnerDropped => {
                let conn = conn.clone();
                Box::new(move || {
                    crate::connection::tests::wait_until("the runtime drops the idle task", || {
                        conn.test_tasks().0 == 1 // the reader's
                    })
                })
            }
        },
    }));
    let mut call = Box::pin(conn.call::<_, u32>(&BULK, 2, (), None));
    let mut cx = Context::from_waker(&waker);
    assert!(call.as_mut().poll(&mut cx).is_pending());

    // The reply to that call, then the peer's request, both in the socket at once.
    let request = peer.recv().unwrap();
    let asked = Envelope::read(&request.payload).unwrap();
    let mut reply = message(Envelope {
        kind: Kind::Reply,
        ..asked
    });
    reply.extend_from_slice(&7u32.to_le_bytes());
    peer.send(&reply, &[]).unwrap();
    let cookie = if kind == Kind::Call { 1 } else { 0 };
    peer.send(&echo(kind, cookie), &[]).unwrap();
    in_wake.recv().unwrap(); // the reader wakes the call, and waits there

    let (dropped, runtime_gone) = mpsc::channel();
    std::thread::spawn(move || {
        drop(rt);
        dropped.send(()).unwrap();
    });
    if runtime_gone.recv_timeout(Duration::from_secs(60)).is_err() {
        // The reader holds the state lock for good: dropping the call would wait for it.
        std::mem::forget(call);
        return (false, conn, peer);
    }
    // The reader ended with its runtime, failing the connection: the call has its reply or
    // the error.
    assert!(matches!(
        call.as_mut().poll(&mut Context::from_waker(Waker::noop())),
        Poll::Ready(_)
    ));
    drop(call);
    (true, conn, peer)
}

/// A call that reaches the reader as its runtime shuts down (on another worker, which has
/// closed the runtime to new tasks) gets a task the runtime drops at once, inside `spawn`.
/// That task's drop takes the state lock, which the reader held around the spawn: the reader
/// deadlocked, and dropping the runtime waited for it for good.
#[test]
fn a_call_that_arrives_as_the_runtime_shuts_down_does_not_deadlock_it() {
    use crate::tokio::envelope::Kind;

    let (returned, conn, peer) =
        request_as_the_runtime_closes(|_| QuickEcho::default(), Kind::Call, AtClose::Reader);
    assert!(
        returned,
        "dropping the runtime deadlocked in the connection's reader"
    );
    assert!(conn.is_closed());
    assert!(matches!(peer.recv(), Err(crate::Error::Disconnected)));
}

/// A call that reaches the reader as its runtime shuts down goes to a task that waits idle
/// for one; if the runtime has already dropped that task, the reader holds the last handle to
/// it. Dropped under the state lock, that handle finished the call it had just been handed,
/// which takes the state lock: the reader deadlocked, and dropping the runtime waited for it
/// for good (CI hung so in `hostile_floods`).
#[test]
fn a_call_handed_to_an_idle_task_the_runtime_dropped_does_not_deadlock_it() {
    use crate::tokio::envelope::Kind;

    let (returned, conn, peer) = request_as_the_runtime_closes(
        |_| QuickEcho::default(),
        Kind::Call,
        AtClose::IdleRunnerDropped,
    );
    assert!(
        returned,
        "dropping the runtime deadlocked in the connection's reader"
    );
    assert!(conn.is_closed());
    assert!(matches!(peer.recv(), Err(crate::Error::Disconnected)));
}

/// Holds a clone of its own connection, as a service that calls back may; says when it goes.
struct HoldingItsConnection {
    _connection: super::AsyncConnection,
    _alive: std::sync::mpsc::Sender<()>,
}

impl super::AsyncService for HoldingItsConnection {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::BULK
    }
    fn handle<'a>(
        &'a self,
        _call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// The first oneway, reaching the reader as the runtime shuts down, gets the task that runs
/// oneways, which the runtime drops at once, inside `spawn`, before it ever ran. That task
/// retires the services when it ends; dropped unstarted, it left the connection thinking it
/// still ran, so the services were never dropped, and one holding a clone of its connection
/// kept the connection (and its socket) for good.
#[test]
fn a_oneway_that_arrives_as_the_runtime_shuts_down_leaves_no_service_behind() {
    use crate::tokio::envelope::Kind;
    use std::sync::mpsc;

    let (alive, service_gone) = mpsc::channel();
    let service = |conn: &super::AsyncConnection| HoldingItsConnection {
        _connection: conn.clone(),
        _alive: alive,
    };
    let (returned, conn, _peer) =
        request_as_the_runtime_closes(service, Kind::Oneway, AtClose::Reader);
    assert!(returned, "dropping the runtime deadlocked");
    assert!(conn.is_closed());
    drop(conn);
    assert_eq!(
        service_gone.try_recv(),
        Err(mpsc::TryRecvError::Disconnected),
        "the service, and the connection it holds, are still there"
    );
}

/// A connection whose runtime shuts down before its reader task ever ran (made in `block_on`
/// and the runtime dropped right after, or as the runtime closes to new tasks, when `spawn`
/// drops the reader at once) must end as one whose reader the runtime dropped mid-way does:
/// it was left open with nobody reading, so a call from another runtime waited for good for
/// a reply nobody would read, and the peer was never hung up on.
#[test]
fn a_connection_whose_runtime_shuts_down_before_its_reader_ran_ends() {
    use crate::connection::tests::BULK;
    use std::time::Duration;

    let current_thread = || current_thread_runtime();
    let (ours, peer) = Socket::pair().unwrap();
    let runtime = current_thread();
    let conn = runtime.block_on(async { super::AsyncConnection::new(ours).unwrap() });
    drop(runtime); // the reader, spawned in `new`, never ran
    let elsewhere = current_thread();
    let called =
        elsewhere.block_on(conn.call::<_, u32>(&BULK, 2, (), Some(Duration::from_secs(60))));
    match called {
        Err(crate::Error::Io(e)) => assert!(e.to_string().contains("shut down"), "{e}"),
        other => panic!("the call should fail as its runtime shut down: {other:?}"),
    }
    assert!(conn.is_closed());
    assert!(matches!(peer.recv(), Err(crate::Error::Disconnected)));
}

/// A connect that waits for a listener whose backlog is full (a server that does not accept:
/// stopped, stuck, or flooded), given up by its caller (here by a timeout), must not hold up
/// the runtime's shutdown: it ran on tokio's blocking pool, whose threads dropping the runtime
/// waits for, so dropping it waited for good for a listener that never accepted.
#[test]
fn a_connect_waiting_for_a_listener_that_never_accepts_does_not_hold_up_the_runtime_shutdown() {
    use nix::sys::socket::{self as ns, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    let name = format!("typed-ipc-test-full-backlog-{}", std::process::id());
    let addr = UnixAddr::new_abstract(name.as_bytes()).unwrap();
    let socket = |flags| ns::socket(AddressFamily::Unix, SockType::SeqPacket, flags, None);
    let listener = socket(SockFlag::SOCK_CLOEXEC).unwrap();
    ns::bind(listener.as_raw_fd(), &addr).unwrap();
    // A backlog of 0 holds one connection not accepted; it takes the next.
    ns::listen(&listener, Backlog::new(0).unwrap()).unwrap();
    let nonblocking = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let queued = socket(nonblocking).unwrap();
    ns::connect(queued.as_raw_fd(), &addr).unwrap();
    let refused = socket(nonblocking).unwrap();
    assert_eq!(
        ns::connect(refused.as_raw_fd(), &addr),
        Err(nix::errno::Errno::EAGAIN),
        "the listener's backlog is full"
    );

    let runtime = current_thread_runtime();
    let connecting = super::AsyncConnection::connect_abstract(name.as_bytes());
    let given_up = runtime
        .block_on(async { ::tokio::time::timeout(Duration::from_millis(100), connecting).await });
    assert!(
        given_up.is_err(),
        "the connect waits while the backlog is full"
    );
    let (dropped, runtime_gone) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(runtime);
        dropped.send(()).unwrap();
    });
    assert!(
        runtime_gone.recv_timeout(Duration::from_secs(60)).is_ok(),
        "dropping the runtime waits for the connect, for a listener that never accepts"
    );
    drop(listener);
}

/// The runtime a connection was made on shuts down while a send from elsewhere (another
/// runtime, or no runtime at all) waits for room: the send must fail saying what happened
/// to the connection, as the calls waiting for replies do, not with the reactor's "A Tokio
/// 1.x context was found, but it is being shutdown", which speaks of a runtime the caller
/// may not even have.
#[test]
fn a_send_waiting_for_room_when_the_connections_runtime_shuts_down_says_so() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use crate::connection::tests::BULK;

    let (runtime, conn, _theirs) = undriven_connection();
    let mut cx = Context::from_waker(Waker::noop());
    // Polled here, outside any runtime: fill the peer's queue until a send waits for room.
    let mut sent = 0u32;
    let mut waiting = loop {
        let mut send = Box::pin(conn.oneway(&BULK, 1, (), None));
        if send.as_mut().poll(&mut cx).is_pending() {
            break send;
        }
        sent += 1;
        assert!(sent < 1 << 20, "the peer's queue never filled");
    };
    drop(runtime);
    let Poll::Ready(failed) = waiting.as_mut().poll(&mut cx) else {
        panic!("the send still waits, its runtime gone");
    };
    let said = failed.unwrap_err().to_string();
    assert!(
        said.contains("the tokio runtime running the connection shut down"),
        "{said}"
    );
}

/// A listener made on a runtime that has since shut down, accepting from elsewhere (another
/// runtime): the accept must fail saying that the listener's runtime is gone, not with the
/// reactor's "A Tokio 1.x context was found, but it is being shutdown", which speaks of a
/// runtime the caller may not even have.
#[test]
fn an_accept_on_a_listener_whose_runtime_shut_down_says_so() {
    let made_on = current_thread_runtime();
    let name = format!("typed-ipc-test-listener-runtime-{}", std::process::id());
    let listener = made_on
        .block_on(async { super::AsyncListener::bind_abstract(&name) })
        .unwrap();
    drop(made_on);
    let accepting_on = current_thread_runtime();
    let said = accepting_on
        .block_on(listener.accept())
        .unwrap_err()
        .to_string();
    assert!(
        said.contains("the tokio runtime this listener was made on has shut down"),
        "{said}"
    );
}

/// Calls whose requests went out to a peer that reads nothing, dropped as their runtime shuts
/// down: their cancels cannot go at once (the socket is full) and the task that would send
/// them cannot run. Nothing panics, and the peer finds every message it reads whole.
#[test]
fn calls_dropped_as_the_runtime_shuts_down_with_the_socket_full_do_not_panic() {
    use crate::connection::envelope::{Envelope, Kind};
    use crate::connection::tests::BULK;

    let (ours, theirs) = Socket::pair().unwrap();
    let rt = multi_thread_runtime(2);
    let client = rt.block_on(async { super::AsyncConnection::new(ours).unwrap() });
    let calls: Vec<_> = (0..2000)
        .map(|_| {
            let client = client.clone();
            rt.spawn(async move {
                client
                    .call::<_, crate::codec::Bytes<Vec<u8>>>(
                        &BULK,
                        1,
                        crate::codec::Bytes(vec![3u8; 2000]),
                        None,
                    )
                    .await
            })
        })
        .collect();
    // Until the socket is full: a oneway's send from here would have to wait.
    rt.block_on(async {
        ::tokio::time::timeout(HANG_GUARD, async {
            while client
                .socket()
                .ready_now(PollFlags::POLLOUT)
                .contains(PollFlags::POLLOUT)
            {
                ::tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the socket never filled");
    });
    drop(calls);
    drop(client);
    drop(rt);
    // Everything that went out is whole: calls, then perhaps cancels.
    let mut read = 0;
    while let Ok(Some(frame)) = theirs.try_recv() {
        read += 1;
        let envelope = Envelope::read(&frame.payload).unwrap();
        assert!(matches!(
            envelope.kind,
            Kind::Call | Kind::Cancel | Kind::Announce
        ));
    }
    assert!(read > 0, "the calls went out");
}

/// A call from another runtime, waiting for room part-way through a message of many
/// datagrams, when the connection's own runtime shuts down: the caller hears why, and the
/// peer, which holds the first part of a message, sees the socket end after it rather than
/// waiting for the rest of a stream that cannot be resynchronised. The reader's end shuts the
/// socket down, which ends the wait for room, before the reactor goes (which would end it
/// too: `reactor_gone`).
#[test]
fn a_send_waiting_part_way_as_the_connections_runtime_shuts_down_leaves_the_peer_an_end() {
    use crate::connection::tests::BULK;
    use std::time::Instant;

    let (ours, theirs) = Socket::pair().unwrap();
    let home = multi_thread_runtime(1);
    let client = home.block_on(async { super::AsyncConnection::new(ours).unwrap() });
    let callers = multi_thread_runtime(1);
    let big = crate::codec::Bytes(vec![3u8; 16 << 20]);
    let call = callers.spawn({
        let client = client.clone();
        async move {
            let sent = client.call::<_, crate::codec::Bytes<Vec<u8>>>(&BULK, 1, big, None);
            sent.await
        }
    });
    // Until the socket is full: the call's send, part-way (the peer never announced that it
    // reads lanes, so the bytes go inline), waits for room.
    let deadline = Instant::now() + HANG_GUARD;
    while client
        .socket()
        .ready_now(PollFlags::POLLOUT)
        .contains(PollFlags::POLLOUT)
    {
        assert!(Instant::now() < deadline, "the socket never filled");
        std::thread::yield_now();
    }
    drop(home);
    let failed = callers
        .block_on(async { ::tokio::time::timeout(HANG_GUARD, call).await })
        .expect("the call waited on after its connection's runtime shut down")
        .unwrap();
    match failed {
        Err(crate::Error::Io(e)) => assert!(e.to_string().contains("shut down"), "{e}"),
        other => panic!("the call should fail as its runtime shut down: {other:?}"),
    }
    let mut frame = crate::frame::Frame::default();
    let read = theirs.recv_into(&mut frame, Some(Instant::now() + HANG_GUARD));
    assert!(
        !matches!(read, Ok(()) | Err(crate::Error::TimedOut)),
        "the peer should find the message cut off by the end: {read:?}"
    );
    drop(client);
}
