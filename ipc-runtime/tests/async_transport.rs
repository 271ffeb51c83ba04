//! The async flavour's runtime without the macro: the non-blocking receive it is built on,
//! hand-written services on both flavours of connection talking to each other, protocol
//! errors, listeners.

#![cfg(feature = "tokio")]

mod common;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use common::{memfd, pattern, read_all};
use ipc_runtime::codec::Fd;
use ipc_runtime::service::{Call, InterfaceInfo, MethodInfo, Service, fnv1a};
use ipc_runtime::tokio::{AsyncCall, AsyncConnection, AsyncListener, AsyncService, BoxFuture};
use ipc_runtime::{Connection, Error, Frame, Socket};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Tests that count fds, or that must not see another test's, take this.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn wait_readable(fd: BorrowedFd<'_>) {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::NONE).unwrap();
}

#[test]
fn try_recv_into_resumes_a_partial_message() {
    use ipc_runtime::wire::{Header, Kind};
    let (a, b) = Socket::pair().unwrap();
    let first = Header {
        kind: Kind::First,
        fds: 0,
        total_len: 6,
        total_fds: 0,
    };
    let raw = |header: Header, body: &[u8]| {
        let head = header.encode();
        let iov = [std::io::IoSlice::new(&head), std::io::IoSlice::new(body)];
        let fd = std::os::fd::AsRawFd::as_raw_fd(&a.as_fd());
        nix::sys::socket::sendmsg::<()>(fd, &iov, &[], nix::sys::socket::MsgFlags::empty(), None)
            .unwrap();
    };
    let mut frame = Frame::default();
    raw(first, b"");
    assert!(
        !b.try_recv_into(&mut frame).unwrap(),
        "only the first datagram is in"
    );
    raw(
        Header {
            kind: Kind::More,
            ..first
        },
        b"abc",
    );
    assert!(
        !b.try_recv_into(&mut frame).unwrap(),
        "half of the bytes are in"
    );
    raw(
        Header {
            kind: Kind::More,
            ..first
        },
        b"def",
    );
    assert!(b.try_recv_into(&mut frame).unwrap(), "complete");
    assert_eq!(frame.payload, b"abcdef");
}

#[test]
fn try_recv_into_completes_a_message_that_arrives_in_pieces() {
    let (a, b) = Socket::pair().unwrap();
    let mut frame = Frame::default();
    assert!(!b.try_recv_into(&mut frame).unwrap(), "nothing sent yet");
    // 20 MiB and 600 fds: many datagrams, more than the socket buffer holds, so the receiver
    // sees the message part-way in many times.
    let payload = pattern(20 << 20);
    let sender = std::thread::spawn({
        let payload = payload.clone();
        move || {
            let files: Vec<OwnedFd> = (0..600u32).map(|i| memfd(&i.to_le_bytes())).collect();
            let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
            a.send(&payload, &fds).unwrap();
            a
        }
    });
    // How often the receiver finds the message part-way in depends on scheduling, so it is
    // not asserted here (see `try_recv_into_resumes_a_partial_message` for that).
    loop {
        wait_readable(b.as_fd());
        if b.try_recv_into(&mut frame).unwrap() {
            break;
        }
    }
    let _a = sender.join().unwrap();
    assert_eq!(frame.payload, payload);
    assert_eq!(frame.fds.len(), 600);
    for (i, fd) in frame.fds.drain(..).enumerate() {
        assert_eq!(read_all(fd), (i as u32).to_le_bytes());
    }
    assert!(!b.try_recv_into(&mut frame).unwrap());
}

static ECHO_INFO: InterfaceInfo = InterfaceInfo {
    name: "Echo",
    id: fnv1a(b"Echo"),
    signature: fnv1a(b"hand-written echo v1"),
    methods: &[
        MethodInfo {
            name: "echo",
            cmd: 0,
            signature: "fn echo(&self, text: String, fd: OwnedFd) -> (String, OwnedFd)",
            oneway: false,
            shape: 0,
        },
        MethodInfo {
            name: "explode",
            cmd: 1,
            signature: "fn explode(&self)",
            oneway: false,
            shape: 0,
        },
    ],
};

/// `echo` hands its arguments back; `explode` panics.
struct AsyncEcho;

impl AsyncService for AsyncEcho {
    fn info(&self) -> &'static InterfaceInfo {
        &ECHO_INFO
    }
    fn handle<'a>(&'a self, call: &'a mut AsyncCall) -> BoxFuture<'a, ipc_runtime::Result<()>> {
        Box::pin(async move {
            match call.command() {
                0 => {
                    let (text, Fd(fd)): (String, Fd<OwnedFd>) = call.args()?;
                    tokio::task::yield_now().await;
                    call.reply((format!("async {text}"), Fd(&fd))).await
                }
                1 => panic!("exploded"),
                _ => Err(call.unknown_command()),
            }
        })
    }
}

struct BlockingEcho;

impl Service for BlockingEcho {
    fn info(&self) -> &'static InterfaceInfo {
        &ECHO_INFO
    }
    fn handle(&self, call: &mut Call<'_>) -> ipc_runtime::Result<()> {
        match call.command() {
            0 => {
                let (text, Fd(fd)): (String, Fd<OwnedFd>) = call.args()?;
                call.reply(&(format!("blocking {text}"), Fd(&fd)))
            }
            _ => Err(call.unknown_command()),
        }
    }
}

#[test]
fn hand_written_services_answer_across_flavours() {
    let _serial = serial();
    runtime().block_on(async {
        // An async server, a blocking client.
        let (ours, theirs) = Socket::pair().unwrap();
        let server = AsyncConnection::new(theirs).unwrap();
        let serving = tokio::spawn(server.serve(AsyncEcho));
        let blocking = Connection::new(ours);
        tokio::task::spawn_blocking(move || {
            let fd = memfd(b"file");
            let (text, Fd(back)): (String, Fd<OwnedFd>) = blocking
                .call(&ECHO_INFO, 0, &("hi".to_string(), Fd(&fd)), None)
                .unwrap();
            assert_eq!(text, "async hi");
            assert_eq!(read_all(back), b"file");
            match blocking.call::<_, ()>(&ECHO_INFO, 1, &(), None) {
                Err(Error::Panicked(why)) => assert_eq!(why, "Echo::explode: exploded"),
                other => panic!("expected Panicked, got {other:?}"),
            }
            blocking.close();
        })
        .await
        .unwrap();
        serving.await.unwrap().unwrap();

        // A blocking server, an async client.
        let (ours, theirs) = Socket::pair().unwrap();
        let blocking = Connection::new(theirs);
        let serving = std::thread::spawn(move || blocking.serve(BlockingEcho));
        let client = AsyncConnection::new(ours).unwrap();
        let fd = memfd(b"file");
        let (text, Fd(back)): (String, Fd<OwnedFd>) = client
            .call(&ECHO_INFO, 0, ("hi".to_string(), Fd(&fd)), None)
            .await
            .unwrap();
        assert_eq!(text, "blocking hi");
        assert_eq!(read_all(back), b"file");
        match client.call::<_, ()>(&ECHO_INFO, 7, (), None).await {
            Err(Error::Remote(why)) => assert!(why.contains("no command 7"), "{why}"),
            other => panic!("expected Remote, got {other:?}"),
        }
        client.close();
        serving.join().unwrap().unwrap();
    });
}

#[test]
fn garbage_from_the_peer_ends_the_connection_with_the_error() {
    let _serial = serial();
    runtime().block_on(async {
        let (ours, theirs) = Socket::pair().unwrap();
        let connection = AsyncConnection::new(ours).unwrap();
        let waiting = tokio::spawn({
            let connection = connection.clone();
            async move { connection.call::<_, ()>(&ECHO_INFO, 0, (), None).await }
        });
        // Wait until the call is out, then answer with a message that has no envelope.
        tokio::task::spawn_blocking(move || {
            let _request = theirs.recv().unwrap();
            theirs.send(b"short", &[]).unwrap();
            theirs
        })
        .await
        .unwrap();
        assert!(matches!(waiting.await.unwrap(), Err(Error::Malformed(_))));
        assert!(connection.is_closed());
        assert!(matches!(connection.run().await, Err(Error::Malformed(_))));
    });
}

#[test]
fn listeners_accept_and_clean_up_and_connect_runs_off_the_runtime() {
    let _serial = serial();
    runtime().block_on(async {
        let dir = std::env::temp_dir().join(format!("typed-ipc-async-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("listener.sock");
        let listener = AsyncListener::bind(&path).unwrap();
        assert_eq!(listener.listener().path(), Some(path.as_path()));
        let client = tokio::spawn({
            let path = path.clone();
            async move { AsyncConnection::connect(&path).await.unwrap() }
        });
        let server = AsyncConnection::new(listener.accept().await.unwrap()).unwrap();
        let client = client.await.unwrap();
        let serving = tokio::spawn(server.serve(AsyncEcho));
        assert_eq!(
            client.peer_credentials().map(|p| p.pid),
            Some(std::process::id() as i32)
        );
        let fd = memfd(b"x");
        let (text, _): (String, Fd<OwnedFd>) = client
            .call(&ECHO_INFO, 0, ("there".to_string(), Fd(&fd)), None)
            .await
            .unwrap();
        assert_eq!(text, "async there");
        client.close();
        serving.await.unwrap().unwrap();
        drop(listener);
        assert!(!path.exists(), "the listener removes its socket file");
        std::fs::remove_dir(&dir).unwrap();
    });
}

#[test]
fn outside_a_runtime_construction_is_an_error_not_a_panic() {
    let (a, _b) = Socket::pair().unwrap();
    assert!(matches!(AsyncConnection::new(a), Err(Error::Io(_))));
    assert!(AsyncConnection::pair().is_err());
}

/// A service whose `handle` panics before it even returns its future.
struct PanicsAtOnce;

impl AsyncService for PanicsAtOnce {
    fn info(&self) -> &'static InterfaceInfo {
        &ECHO_INFO
    }
    fn handle<'a>(&'a self, _call: &'a mut AsyncCall) -> BoxFuture<'a, ipc_runtime::Result<()>> {
        panic!("no future for you")
    }
}

#[test]
fn a_panic_anywhere_in_a_handler_is_an_error_reply() {
    let _serial = serial();
    runtime().block_on(async {
        let (a, b) = AsyncConnection::pair().unwrap();
        let serving = tokio::spawn(b.serve(PanicsAtOnce));
        match a.call::<_, ()>(&ECHO_INFO, 1, (), None).await {
            Err(Error::Panicked(why)) => assert_eq!(why, "Echo::explode: no future for you"),
            other => panic!("expected Panicked, got {other:?}"),
        }
        a.close();
        serving.await.unwrap().unwrap();
    });
}
