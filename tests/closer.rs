//! Fds the transport drops on its own (nothing claimed them) are closed off the threads that
//! serve: closing one may wait for as long as the peer that sent it likes (the last fd of a
//! pipe whose lock the peer holds), and the connection must go on meanwhile.
//!
//! The hostile peer is a raw socket of this process; a thread of it holds the lock of the
//! pipe whose read end it sends (sleeping in a `splice` into the pipe), so that whoever closes
//! that read end, its last fd, waits until the peer lets go.

mod common;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use typed_ipc::service::InterfaceInfo;
use typed_ipc::{Connection, Socket};

#[typed_ipc::interface]
pub trait Echo {
    fn echo(&self, x: u32) -> u32;
}

/// Not served by the servers here: a call of it is refused unread, its fds unclaimed.
#[typed_ipc::interface]
pub trait Sink {
    fn take(&self, fd: OwnedFd);
}

struct Echoing;

impl Echo for Echoing {
    fn echo(&self, x: u32) -> u32 {
        x
    }
}

#[cfg(feature = "tokio")]
mod asynchronous {
    #[typed_ipc::interface]
    pub trait Echo {
        async fn echo(&self, x: u32) -> u32;
    }

    pub struct Echoing;

    impl Echo for Echoing {
        async fn echo(&self, x: u32) -> u32 {
            x
        }
    }
}

/// The peer's side: sends, on `ours`, a call of `iface`'s command 0 carrying the read end of
/// a pipe whose lock a thread of it holds (its one argument, the fd), and closes its own
/// copy, so that the server's close is the last. Then `serve` starts the server on the other
/// end, `theirs`; and the peer, through a client on `ours`, calls `Echo` and must get its
/// answer while the lock is still held. The lock is let go only once that call returned (or
/// after a minute, a hang turned into a failure).
fn next_call_gets_through_while_the_pipe_lock_is_held(
    iface: &InterfaceInfo,
    serve: impl FnOnce(Socket) -> JoinHandle<()>,
) {
    let (ours, theirs) = Socket::pair().unwrap();
    let (read, write) = nix::unistd::pipe().unwrap();
    let (holder, wake) = common::hold_pipe_lock(write);
    let mut take = common::call_envelope(iface, 0, 1 << 40); // no cookie of the client
    take.extend_from_slice(&0u32.to_le_bytes()); // the fd's index
    ours.send(&take, &[read.as_fd()]).unwrap();
    drop(read); // the message in flight holds the last reference now
    let server = serve(theirs);

    let (done_tx, done_rx) = channel();
    let caller = std::thread::spawn(move || {
        let echo = EchoClient::new(Connection::new(ours));
        done_tx.send(echo.echo(7)).unwrap();
        echo
    });
    let answered = done_rx.recv_timeout(Duration::from_secs(60));
    // Let go (the hang guard too, so that everything ends), and only now.
    std::io::Write::write_all(&mut &wake, b"x").unwrap();
    drop(holder.join().unwrap());
    match answered {
        Ok(answer) => assert_eq!(answer.unwrap(), 7),
        Err(RecvTimeoutError::Timeout) => {
            panic!("the next call waited for the close of the peer's pipe (lock held 60 s)")
        }
        Err(RecvTimeoutError::Disconnected) => panic!("the caller panicked"),
    }
    drop(caller.join().unwrap()); // hangs up: the server ends
    server.join().unwrap();
}

#[test]
fn blocking_server_serves_on_while_a_dropped_fd_of_the_peer_cannot_close() {
    next_call_gets_through_while_the_pipe_lock_is_held(&SINK_INFO, serve_blocking);
}

/// An `Echo` server on one thread: the one that refuses the call and drops its fd.
fn serve_blocking(theirs: Socket) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = EchoServer::new(Echoing).serve(Connection::new(theirs));
    })
}

/// An async `Echo` server on a current-thread runtime: one thread runs the whole
/// connection, its reader and its handlers.
#[cfg(feature = "tokio")]
fn serve_async(theirs: Socket) -> JoinHandle<()> {
    std::thread::spawn(move || {
        common::current_thread_runtime().block_on(async move {
            let connection = typed_ipc::tokio::AsyncConnection::new(theirs).unwrap();
            let _ = asynchronous::EchoServer::new(asynchronous::Echoing)
                .serve(connection)
                .await;
        })
    })
}

/// `socket` taking no fds: a request with one is over its limits.
fn taking_no_fds(mut socket: Socket) -> Socket {
    socket.set_limits(typed_ipc::Limits {
        max_fds: 0,
        ..typed_ipc::Limits::default()
    });
    socket
}

/// The same for a request over the server's limits (more fds than it takes): refused as it
/// is read, its fds dropped by the transport.
#[test]
fn blocking_server_serves_on_while_a_refused_fd_of_the_peer_cannot_close() {
    next_call_gets_through_while_the_pipe_lock_is_held(&SINK_INFO, |theirs| {
        serve_blocking(taking_no_fds(theirs))
    });
}

#[cfg(feature = "tokio")]
#[test]
fn async_server_serves_on_while_a_refused_fd_of_the_peer_cannot_close() {
    next_call_gets_through_while_the_pipe_lock_is_held(&SINK_INFO, |theirs| {
        serve_async(taking_no_fds(theirs))
    });
}

#[cfg(feature = "tokio")]
#[test]
fn async_server_serves_on_while_a_dropped_fd_of_the_peer_cannot_close() {
    next_call_gets_through_while_the_pipe_lock_is_held(&SINK_INFO, serve_async);
}

/// Served: a method whose argument checks the fd it takes, and refuses one that is not a
/// sealed memfd.
#[typed_ipc::interface]
pub trait Viewer {
    fn size(&self, buffer: typed_ipc::shared_buffer::SealedBuffer) -> u64;
}

struct Viewing;

impl Viewer for Viewing {
    fn size(&self, buffer: typed_ipc::shared_buffer::SealedBuffer) -> u64 {
        buffer.len() as u64
    }
}

/// A sealed buffer's fd the decode takes and then refuses (here a pipe's read end, not a
/// sealed memfd) is a peer's fd typed-ipc drops on its own: closed off the serving thread
/// like one no value claimed, so the next call gets through while its close waits.
#[test]
fn blocking_server_serves_on_while_a_refused_sealed_buffer_of_the_peer_cannot_close() {
    next_call_gets_through_while_the_pipe_lock_is_held(&VIEWER_INFO, |theirs| {
        std::thread::spawn(move || {
            let connection = Connection::new(theirs);
            connection.add_service(ViewerServer::new(Viewing));
            let _ = connection.serve(EchoServer::new(Echoing));
        })
    });
}

/// Sends one datagram as given, header and all, with `fd` attached if there is one.
fn raw_datagram(
    socket: &Socket,
    header: typed_ipc::wire::Header,
    body: &[u8],
    fd: Option<BorrowedFd>,
) {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let header = header.encode();
    let iov = [std::io::IoSlice::new(&header), std::io::IoSlice::new(body)];
    let fds: Vec<_> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs = if fds.is_empty() { &[][..] } else { &rights[..] };
    let raw = socket.as_fd().as_raw_fd();
    sendmsg::<()>(raw, &iov, cmsgs, MsgFlags::empty(), None).unwrap();
}

/// The fds of a message whose framing is broken, which the transport drops as it fails it
/// (part of a message another interrupts, or a continuation of a message that failed), are
/// closed off the receiving thread too: a receive that waits (a blocking connection's), one
/// that never does (an async connection's reader task), and one into a frame of the
/// caller's, which it drops (as the connections' readers do), report the failure while the
/// peer holds the lock of the pipe whose last fd one of them is.
#[test]
fn a_receive_failing_on_broken_framing_does_not_wait_for_the_close_of_the_peers_fd() {
    use typed_ipc::wire::{Header, Kind};
    let first = |total_len, fds| Header {
        kind: Kind::First,
        fds,
        total_len,
        total_fds: u32::from(fds),
    };
    let more = |header: Header| Header {
        kind: Kind::More,
        ..header
    };
    for receive in [
        "a receive that waits",
        "one that never waits",
        "one into a frame",
    ] {
        for case in ["interrupted", "continuation dropped", "unannounced"] {
            let (ours, theirs) = Socket::pair().unwrap();
            let (read, write) = nix::unistd::pipe().unwrap();
            let (holder, wake) = common::hold_pipe_lock(write);
            let fd = Some(read.as_fd());
            match case {
                "interrupted" => {
                    // Part of a message with the fd, then another message's first datagram.
                    raw_datagram(&ours, first(10, 1), b"abc", fd);
                    ours.send(b"other", &[]).unwrap();
                }
                "continuation dropped" => {
                    // A message that fails (more bytes than it announced), then a
                    // continuation of it with the fd, dropped unread.
                    raw_datagram(&ours, first(1, 0), b"abc", None);
                    raw_datagram(&ours, more(first(1, 1)), b"", fd);
                }
                _ => {
                    // A whole message with an fd its header does not announce.
                    raw_datagram(&ours, first(3, 0), b"abc", fd);
                }
            }
            ours.send(b"next", &[]).unwrap();
            drop(read); // the datagrams in flight hold the last references now
            let (done_tx, done_rx) = channel();
            let receiver = std::thread::spawn(move || {
                let recv = || match receive {
                    "a receive that waits" => theirs.recv(),
                    "one that never waits" => {
                        theirs.try_recv().map(|f| f.expect("all of it is queued"))
                    }
                    _ => {
                        let mut frame = typed_ipc::Frame::default();
                        let received = theirs.recv_into(&mut frame, None);
                        received.map(|()| frame)
                    }
                };
                let failed = recv();
                let next = recv();
                done_tx.send((failed, next)).unwrap();
            });
            let received = done_rx.recv_timeout(Duration::from_secs(60));
            std::io::Write::write_all(&mut &wake, b"x").unwrap();
            drop(holder.join().unwrap());
            receiver.join().unwrap();
            let context = format!("{receive}, {case}");
            match received {
                Ok((failed, next)) => {
                    assert!(
                        matches!(failed, Err(typed_ipc::Error::Malformed(_))),
                        "{context}"
                    );
                    assert_eq!(next.unwrap().payload, b"next", "{context}");
                }
                Err(_) => panic!("{context}: the receive waited for the close (lock held 60 s)"),
            }
        }
    }
}
