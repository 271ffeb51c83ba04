//! The transport: whole messages of any size with fds, limits, errors, leaks, processes.
//! Every test takes `fd_count_lock` so the ones that count `/proc/self/fd` see only their own.

mod common;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use common::*;
use ipc_runtime::wire::{FIRST_MAX, HEADER_LEN, Header, Kind};
use ipc_runtime::worker::{self, Exit, Worker};
use ipc_runtime::{Error, Frame, Limits, Listener, Socket};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

fn fds(n: usize) -> Vec<OwnedFd> {
    (0..n).map(|i| memfd(&i.to_le_bytes())).collect()
}

fn borrow(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

/// Checks that `received` are the fds of [`fds`], in order, and closes them.
fn assert_numbered(received: Vec<OwnedFd>) {
    for (i, fd) in received.into_iter().enumerate() {
        assert_eq!(read_all(fd), i.to_le_bytes(), "fd {i}");
    }
}

/// Sends `len` bytes and `nfds` fds from `a` to `b` and checks every byte and fd.
fn round_trip(a: &Socket, b: &Socket, len: usize, nfds: usize) {
    let payload = pattern(len);
    let sent = fds(nfds);
    std::thread::scope(|s| {
        s.spawn(|| a.send(&payload, &borrow(&sent)).unwrap());
        let frame = b.recv().unwrap();
        assert_eq!(frame.payload.len(), len);
        assert!(frame.payload == payload, "payload of {len} bytes differs");
        assert_eq!(frame.fds.len(), nfds);
        assert_numbered(frame.fds);
    });
}

#[test]
fn bytes_only_fds_only_both_and_empty() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    round_trip(&a, &b, 5, 0);
    round_trip(&a, &b, 0, 1);
    round_trip(&a, &b, 100, 3);
    round_trip(&a, &b, 0, 0);
}

#[test]
fn fd_counts_up_to_and_beyond_one_datagram() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    for n in [0, 1, 253, 254, 300, 1000] {
        round_trip(&a, &b, 10, n);
    }
}

#[test]
fn payload_sizes_around_every_boundary() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    let chunk = 4 * 1024 * 1024; // the largest continuation datagram
    let mut sizes = vec![0, 1, FIRST_MAX - 1, FIRST_MAX, FIRST_MAX + 1];
    sizes.extend([
        212_960 - HEADER_LEN,
        212_960,
        chunk - 1,
        chunk,
        chunk + 1,
        3 * chunk + 7,
    ]);
    for len in sizes {
        round_trip(&a, &b, len, 0);
        round_trip(&a, &b, len, 2);
    }
}

#[test]
fn a_256_mib_message_arrives_whole() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    round_trip(&a, &b, 256 << 20, 1);
}

#[test]
fn a_received_fd_is_the_same_open_file() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    let file = memfd(b"");
    a.send(b"", &[file.as_fd()]).unwrap();
    let received = b.recv().unwrap().fds.pop().unwrap();
    let mut w = std::fs::File::from(received);
    std::io::Write::write_all(&mut w, b"written by the receiver").unwrap();
    assert_eq!(read_all(file), b"written by the receiver");
}

#[test]
fn hang_up_while_receiving_is_disconnected() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| b.recv());
        drop(a);
        assert!(matches!(waiter.join().unwrap(), Err(Error::Disconnected)));
    });
}

#[test]
fn hang_up_in_the_middle_of_a_large_message_is_disconnected() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    let first = Header {
        kind: Kind::First,
        fds: 0,
        total_len: 10 << 20,
        total_fds: 0,
    };
    raw_send(&a, &first.encode(), &[]);
    let more = Header {
        kind: Kind::More,
        ..first
    };
    raw_send(&a, &more.encode(), &[7; 1000]);
    drop(a);
    assert!(matches!(b.recv(), Err(Error::Disconnected)));
}

/// A peer that exits with a message of this end's unread makes the kernel fail this end's
/// next receive once (`ECONNRESET`) before the datagrams the peer sent that are still queued,
/// also in the middle of a message of several. That receive dropped the part taken in (its
/// fds closed) and the rest after it: the peer's last message was lost, as a bare
/// `Disconnected`, although all of it had been sent.
#[test]
fn a_message_finished_by_a_peer_that_then_exits_with_ours_unread_arrives_whole() {
    let _fds = fd_count_lock();
    let before = open_fds();
    let (go_read, go_write) = nix::unistd::pipe().unwrap();
    let mut command = child("child_sends_a_message_in_two_parts_and_exits");
    command.stdin(std::process::Stdio::from(go_read));
    let (mut child, socket) = Worker::spawn_socket(command).unwrap();
    // The child never reads it, so its exit resets this end's socket.
    socket.send(b"unread", &[]).unwrap();
    let mut frame = Frame::default();
    let mut readable = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
    poll(&mut readable, PollTimeout::NONE).unwrap();
    assert!(
        !socket.try_recv_into(&mut frame).unwrap(),
        "only the first part is in"
    );
    nix::unistd::write(&go_write, b"!").unwrap();
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
    let message = socket.recv().expect("the message the child sent whole");
    assert!(message.payload == pattern(TWO_PARTS_LEN));
    assert_eq!(message.fds.len(), TWO_PARTS_FDS);
    assert_numbered(message.fds);
    assert!(matches!(socket.recv(), Err(Error::Disconnected)));
    drop((socket, go_write, child));
    assert_eq!(open_fds(), before);
}

/// The same at the start of a message: a worker that answers a request and exits with the
/// next one unread. The receive failed with `Disconnected`, the answer still queued behind
/// the reset, so that a worker's last answer was lost to a caller of `Socket::recv`.
#[test]
fn the_answer_of_a_worker_that_then_exits_with_ours_unread_arrives() {
    let _fds = fd_count_lock();
    let before = open_fds();
    let (mut child, socket) = Worker::spawn_socket(child("child_answers_once_and_exits")).unwrap();
    let sent = fds(2);
    socket.send(b"question", &borrow(&sent)).unwrap();
    socket.send(b"unread", &[]).unwrap();
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
    let answer = socket.recv().expect("the worker's answer");
    assert_eq!(answer.payload, b"answer");
    assert_eq!(answer.fds.len(), 2);
    assert_numbered(answer.fds);
    assert!(matches!(socket.recv(), Err(Error::Disconnected)));
    drop((socket, sent, child));
    assert_eq!(open_fds(), before);
}

/// The child of the test above: answers the first message with its fds, and exits without
/// reading the next.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_answers_once_and_exits() {
    let socket = worker::socket().unwrap();
    let question = socket.recv().unwrap();
    assert_eq!(question.payload, b"question");
    socket.send(b"answer", &borrow(&question.fds)).unwrap();
    // The next message is still queued: the exit resets the parent's socket.
    let mut queued = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
    poll(&mut queued, PollTimeout::NONE).unwrap();
}

const TWO_PARTS_LEN: usize = 100;
const TWO_PARTS_FDS: usize = 300;

/// The child of the test above: sends the first datagram of a message (253 fds), waits for a
/// byte on stdin, sends the rest (47 fds and the bytes) and exits, reading nothing.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_sends_a_message_in_two_parts_and_exits() {
    use std::io::Read;
    let socket = worker::socket().unwrap();
    let sent = fds(TWO_PARTS_FDS);
    let raw: Vec<_> = sent.iter().map(|fd| fd.as_raw_fd()).collect();
    let (first_fds, more_fds) = raw.split_at(253);
    let header = |kind, fds: &[i32]| Header {
        kind,
        fds: fds.len() as u16,
        total_len: TWO_PARTS_LEN as u32,
        total_fds: TWO_PARTS_FDS as u32,
    };
    let send = |kind, body: &[u8], fds: &[i32]| {
        raw_send_fds(&socket, &header(kind, fds).encode(), body, fds);
    };
    send(Kind::First, &[], first_fds);
    std::io::stdin().read_exact(&mut [0]).unwrap();
    send(Kind::More, &pattern(TWO_PARTS_LEN), more_fds);
}

/// Sends one raw datagram, bypassing the transport's framing.
fn raw_send(s: &Socket, header: &[u8], body: &[u8]) {
    raw_send_fds(s, header, body, &[]);
}

/// [`raw_send`] with `fds` in the datagram.
fn raw_send_fds(s: &Socket, header: &[u8], body: &[u8], fds: &[std::os::fd::RawFd]) {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let iov = [std::io::IoSlice::new(header), std::io::IoSlice::new(body)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs = if fds.is_empty() { &[][..] } else { &rights[..] };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&s.as_fd());
    sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::empty(), None).unwrap();
}

#[test]
fn an_oversized_announcement_is_refused_and_the_stream_stays_in_sync() {
    let _fds = fd_count_lock();
    let (a, mut b) = Socket::pair().unwrap();
    b.set_limits(Limits {
        max_message_len: 1 << 20,
        max_fds: 4,
        ..Default::default()
    });
    // Announces 4 GiB − 1, sends 1 MiB of it, then a good message follows.
    let huge = Header {
        kind: Kind::First,
        fds: 0,
        total_len: u32::MAX,
        total_fds: 0,
    };
    raw_send(&a, &huge.encode(), &[]);
    raw_send(
        &a,
        &Header {
            kind: Kind::More,
            ..huge
        }
        .encode(),
        &vec![0; 1 << 20],
    );
    a.send(b"after", &[]).unwrap();
    match b.recv() {
        Err(Error::TooLarge {
            size,
            limit,
            by_peer: false,
            ..
        }) => {
            assert_eq!((size, limit), (u32::MAX as u64, 1 << 20));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(b.recv().unwrap().payload, b"after");
    // Too many fds: refused, closed, and in sync.
    let before = open_fds();
    let many = fds(5);
    a.send(b"x", &borrow(&many)).unwrap();
    drop(many);
    assert!(matches!(
        b.recv(),
        Err(Error::TooManyFds {
            count: 5,
            limit: 4,
            by_peer: false,
            ..
        })
    ));
    assert_eq!(open_fds(), before);
    a.send(b"ok", &[]).unwrap();
    assert_eq!(b.recv().unwrap().payload, b"ok");
}

#[test]
fn garbage_is_malformed_and_the_stream_stays_in_sync() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    // A continuation out of the blue, then garbage of every kind, then a good message: all
    // sent before anything is read, so nothing depends on timing.
    let stray = Header {
        kind: Kind::More,
        fds: 0,
        total_len: 3,
        total_fds: 0,
    };
    raw_send(&a, &stray.encode(), b"abc");
    raw_send(&a, b"GARBAGE GARBAGE GARBAGE", &[]);
    raw_send(&a, b"TI", &[]);
    let mut old = Header {
        kind: Kind::First,
        fds: 0,
        total_len: 0,
        total_fds: 0,
    }
    .encode();
    old[2] = 99;
    raw_send(&a, &old, &[]);
    // A first datagram with more bytes than it announces.
    let liar = Header {
        kind: Kind::First,
        fds: 0,
        total_len: 1,
        total_fds: 0,
    };
    raw_send(&a, &liar.encode(), b"abc");
    a.send(b"still fine", &[]).unwrap();
    assert!(matches!(b.recv(), Err(Error::Malformed(_))));
    assert!(matches!(b.recv(), Err(Error::Malformed(_))));
    assert!(matches!(b.recv(), Err(Error::Malformed(_))));
    assert!(matches!(
        b.recv(),
        Err(Error::VersionMismatch { theirs: 99, .. })
    ));
    assert!(matches!(b.recv(), Err(Error::Malformed(_))));
    assert_eq!(b.recv().unwrap().payload, b"still fine");
}

#[test]
fn timeouts_and_try_recv() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    assert!(matches!(
        b.recv_timeout(Duration::from_millis(10)),
        Err(Error::TimedOut)
    ));
    assert!(b.try_recv().unwrap().is_none());
    a.send(b"now", &[]).unwrap();
    assert_eq!(b.try_recv().unwrap().unwrap().payload, b"now");
    assert!(matches!(
        b.recv_timeout(Duration::from_millis(10)),
        Err(Error::TimedOut)
    ));
    // A full buffer and nobody reading: the send gives up at its deadline.
    let big = vec![0u8; 60_000];
    let err = loop {
        if let Err(e) = a.send_timeout(&big, &[], Duration::from_millis(20)) {
            break e;
        }
    };
    assert!(matches!(err, Error::TimedOut));
}

/// A receive that spins before it blocks (`set_spin`) still receives what comes, during its
/// spin and after it, and a deadline bounds it: a spin longer than the time left stops at
/// the deadline. (It spun on past it, for as long as the spin lasted.)
#[test]
fn a_spinning_receive_gets_its_messages_and_keeps_its_deadline() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    let b = std::sync::Arc::new(b);
    // Far longer than the guard: only the deadline can end this receive in time. (Not a
    // scoped thread: a failing test must not wait for it.)
    b.set_spin(Duration::from_secs(3600));
    let (done, outcome) = std::sync::mpsc::channel();
    let receiver = {
        let b = b.clone();
        std::thread::spawn(move || {
            done.send(b.recv_timeout(Duration::from_millis(10)))
                .unwrap()
        })
    };
    let outcome = outcome
        .recv_timeout(HANG_GUARD)
        .expect("the receive spun past its deadline");
    assert!(matches!(outcome, Err(Error::TimedOut)), "{outcome:?}");
    receiver.join().unwrap();
    // A message that comes while it spins, with and without a deadline.
    a.send(b"during", &[]).unwrap();
    assert_eq!(b.recv_timeout(HANG_GUARD).unwrap().payload, b"during");
    std::thread::scope(|s| {
        let receiver = s.spawn(|| b.recv().unwrap().payload);
        a.send(b"later", &[]).unwrap();
        assert_eq!(receiver.join().unwrap(), b"later");
    });
    // And one that comes once a short spin has ended and the receive blocks.
    b.set_spin(Duration::from_micros(1));
    std::thread::scope(|s| {
        let receiver = s.spawn(|| b.recv().unwrap().payload);
        a.send(b"blocked", &[]).unwrap();
        assert_eq!(receiver.join().unwrap(), b"blocked");
    });
}

#[test]
fn no_fd_leaks_over_10_000_messages() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    let file = memfd(b"x");
    let before = open_fds();
    let mut frame = Frame::default();
    for i in 0..10_000u32 {
        a.send(&i.to_le_bytes(), &[file.as_fd(), file.as_fd()])
            .unwrap();
        b.recv_into(&mut frame, None).unwrap();
        assert_eq!(frame.payload, i.to_le_bytes());
        assert_eq!(frame.fds.len(), 2);
    }
    drop(frame);
    assert_eq!(open_fds(), before);
}

#[test]
fn peer_credentials_name_the_peer() {
    let _fds = fd_count_lock();
    let (a, _b) = Socket::pair().unwrap();
    let c = a.peer_credentials().unwrap();
    assert_eq!(c.pid as u32, std::process::id());
    assert_eq!(c.uid, nix::unistd::getuid().as_raw());
}

/// What an error from binding or connecting says: the path or name (the kernel's errno names
/// none) and the OS error, and it keeps the errno's kind.
fn assert_names(error: Error, kind: std::io::ErrorKind, errno: i32, named: &str) {
    let Error::Io(error) = error else {
        panic!("{error:?}: not an Io error");
    };
    assert_eq!(error.kind(), kind, "{error}");
    let message = error.to_string();
    assert!(
        message.contains(named),
        "{message:?} does not name {named:?}"
    );
    let os_error = format!("(os error {errno})");
    assert!(
        message.ends_with(&os_error),
        "{message:?} does not end {os_error:?}"
    );
}

#[test]
fn errors_binding_and_connecting_name_the_path() {
    let _fds = fd_count_lock();
    let dir = std::env::temp_dir().join(format!("typed-ipc-paths-{}", std::process::id()));
    let missing = dir.join("no-such-dir/sock");
    let name = missing.display().to_string();
    let error = Socket::connect(&missing).unwrap_err();
    assert_names(error, std::io::ErrorKind::NotFound, libc::ENOENT, &name);
    let error = Socket::connect_timeout(&missing, Duration::from_secs(60)).unwrap_err();
    assert_names(error, std::io::ErrorKind::NotFound, libc::ENOENT, &name);
    let error = Listener::bind(&missing).unwrap_err();
    assert_names(error, std::io::ErrorKind::NotFound, libc::ENOENT, &name);
    // A regular file in the way.
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("file");
    std::fs::write(&file, b"").unwrap();
    let error = Listener::bind(&file).unwrap_err();
    let name = file.display().to_string();
    assert_names(
        error,
        std::io::ErrorKind::AddrInUse,
        libc::EADDRINUSE,
        &name,
    );
    let error = Socket::connect(&file).unwrap_err();
    assert_names(
        error,
        std::io::ErrorKind::ConnectionRefused,
        libc::ECONNREFUSED,
        &name,
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // Nothing listening on an abstract name: named as `@name`, as ss and netstat show it.
    let abstract_name = format!("typed-ipc-nobody-{}", std::process::id());
    let error = Socket::connect_abstract(&abstract_name).unwrap_err();
    let shown = format!("@{abstract_name}");
    assert_names(
        error,
        std::io::ErrorKind::ConnectionRefused,
        libc::ECONNREFUSED,
        &shown,
    );
}

#[test]
fn listeners_on_paths_and_abstract_names() {
    let _fds = fd_count_lock();
    let dir = std::env::temp_dir().join(format!("typed-ipc-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sock");
    let listener = Listener::bind(&path).unwrap();
    let client = Socket::connect(&path).unwrap();
    let server = listener.accept().unwrap();
    round_trip(&client, &server, 3, 1);
    // A live listener is not replaced.
    assert!(Listener::bind(&path).is_err());
    drop(listener);
    // A stale socket file (its process died without cleaning up) is replaced.
    stale_socket_file(&path);
    let again = Listener::bind(&path).unwrap();
    let client = Socket::connect(&path).unwrap();
    round_trip(&client, &again.accept().unwrap(), 3, 0);
    drop(again);
    assert!(!path.exists(), "the listener removes its socket file");
    // A regular file is never touched.
    std::fs::write(&path, b"precious").unwrap();
    assert!(Listener::bind(&path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_dir_all(&dir).unwrap();

    let name = format!("typed-ipc-test-{}", std::process::id());
    let listener = Listener::bind_abstract(&name).unwrap();
    let client = Socket::connect_abstract(&name).unwrap();
    round_trip(&client, &listener.accept().unwrap(), 10, 2);
}

#[test]
fn a_listener_on_a_relative_path_removes_its_file_after_a_change_of_directory() {
    // Starting a child opens fds for a moment (its stdout's /dev/null, the exec pipe), which
    // a test counting fds meanwhile would take for its own.
    let _fds = fd_count_lock();
    // The current directory is the process's: changed in a process of its own.
    let status = child("child_binding_a_relative_path").status().unwrap();
    assert!(status.success(), "the socket file outlived its listener");
}

/// Binds a relative path, then changes directory, as a daemon does once set up: the path
/// the listener names, and removes when dropped, is still its socket file.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_binding_a_relative_path() {
    let dir = std::env::temp_dir().join(format!("typed-ipc-relative-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::env::set_current_dir(&dir).unwrap();
    let listener = Listener::bind("sock").unwrap();
    std::env::set_current_dir("/").unwrap();
    let file = dir.join("sock");
    assert_eq!(listener.path(), Some(file.as_path()));
    drop(listener);
    assert!(!file.exists(), "the socket file outlived its listener");
    std::fs::remove_dir(&dir).unwrap();
}

/// A pre-forking server's worker that drops its copy of the listener (returning from its
/// loop, say) must leave the socket file to the parent, which still listens on it.
#[test]
fn a_listener_dropped_in_a_forked_child_leaves_the_socket_file_to_the_parent() {
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};
    let _fds = fd_count_lock();
    let dir = std::env::temp_dir().join(format!("typed-ipc-test-fork-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sock");
    let listener = Listener::bind(&path).unwrap();
    // SAFETY: the child only drops the listener (a stat, an unlink of a short path that std
    // converts on the stack, a close: no allocation, no lock) and exits at once.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            drop(listener);
            // SAFETY: ends the forked child without running anything of the parent's.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
        }
    }
    assert!(
        path.exists(),
        "the child's drop removed the parent's socket file"
    );
    let client = Socket::connect(&path).unwrap();
    round_trip(&client, &listener.accept().unwrap(), 1, 0);
    drop(listener);
    assert!(!path.exists(), "the parent's drop left its socket file");
    std::fs::remove_dir(&dir).unwrap();
}

#[test]
fn a_live_listener_whose_queue_is_full_is_not_replaced_and_not_waited_for() {
    let _fds = fd_count_lock();
    let (dir, path, live) = listener_accepting_nobody("full");
    let _queued = Socket::connect(&path).unwrap();
    // Telling it from a stale file used to connect and wait for room in its queue: for good.
    let (tx, rx) = std::sync::mpsc::channel();
    let bound = {
        let path = path.clone();
        std::thread::spawn(move || tx.send(Listener::bind(&path).map(drop)).unwrap())
    };
    let outcome = rx
        .recv_timeout(HANG_GUARD)
        .expect("bind waited for the live listener");
    bound.join().unwrap();
    assert!(
        matches!(&outcome, Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::AddrInUse),
        "{outcome:?}"
    );
    drop(live);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A service that stopped accepting, its queue of clients full: a client that gives a
/// timeout is told at once it ran out, rather than wait for good, and leaks nothing; once
/// the service accepts again, it connects, and the connection sends as usual.
#[test]
fn a_connect_with_a_timeout_to_a_listener_whose_queue_is_full_times_out() {
    use nix::sys::socket::accept;
    use std::os::fd::FromRawFd;
    let _fds = fd_count_lock();
    let (dir, path, stuck) = listener_accepting_nobody("ctimeout");
    let queued = Socket::connect_timeout(&path, HANG_GUARD).unwrap();
    let before = open_fds();
    let (tx, rx) = std::sync::mpsc::channel();
    let connecting = {
        let path = path.clone();
        std::thread::spawn(move || {
            let outcome = Socket::connect_timeout(&path, Duration::from_millis(1)).map(drop);
            tx.send(outcome).unwrap()
        })
    };
    let outcome = rx
        .recv_timeout(HANG_GUARD)
        .expect("the connect waited for good");
    connecting.join().unwrap();
    assert!(matches!(outcome, Err(Error::TimedOut)), "{outcome:?}");
    assert_eq!(
        open_fds(),
        before,
        "the socket of the connect that timed out leaked"
    );
    // SAFETY: accept returned a new descriptor that nothing else owns.
    let first = unsafe { OwnedFd::from_raw_fd(accept(stuck.as_raw_fd()).unwrap()) };
    let second = Socket::connect_timeout(&path, HANG_GUARD).unwrap();
    // SAFETY: as above.
    let accepted = unsafe { OwnedFd::from_raw_fd(accept(stuck.as_raw_fd()).unwrap()) };
    round_trip(&second, &Socket::from_fd(accepted).unwrap(), 70_000, 1);
    round_trip(&queued, &Socket::from_fd(first).unwrap(), 10, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A live listener that accepts nobody yet, whose queue one client fills (backlog 0), on
/// `sock` in a directory of its own named after `test`: the directory, the path, the socket.
fn listener_accepting_nobody(test: &str) -> (std::path::PathBuf, std::path::PathBuf, OwnedFd) {
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    use nix::sys::socket::{bind, listen, socket};
    let dir = std::env::temp_dir().join(format!("typed-ipc-test-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sock");
    let live = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(live.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    listen(&live, Backlog::new(0).unwrap()).unwrap();
    (dir, path, live)
}

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Leaves a socket file that nobody listens on, as a process that died would.
fn stale_socket_file(path: &std::path::Path) {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &UnixAddr::new(path).unwrap(),
    )
    .unwrap();
    drop(fd);
    assert!(path.exists());
}

#[test]
fn inherited_non_socket_fds_are_refused() {
    let _fds = fd_count_lock();
    assert!(Socket::from_fd(memfd(b"")).is_err());
}

#[test]
fn round_trip_with_a_child_process() {
    let _fds = fd_count_lock();
    let (mut child, socket) = Worker::spawn_socket(child("child_echo")).unwrap();
    for (len, nfds) in [(6, 0), (0, 2), (300_000, 1), (5 << 20, 300)] {
        let payload = pattern(len);
        let sent = fds(nfds);
        socket.send(&payload, &borrow(&sent)).unwrap();
        let back = socket.recv().unwrap();
        let mut expected = payload.clone();
        expected.reverse();
        assert!(back.payload == expected);
        assert_eq!(back.fds.len(), nfds);
        for (i, fd) in back.fds.into_iter().enumerate() {
            assert_eq!(
                read_all(fd),
                i.to_le_bytes(),
                "fd {i} came back as another file"
            );
        }
    }
    drop(socket);
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

/// The child of `round_trip_with_a_child_process`: echoes reversed bytes and the same fds.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_echo() {
    let socket = worker::socket().unwrap();
    loop {
        match socket.recv() {
            Ok(mut frame) => {
                frame.payload.reverse();
                socket.send(&frame.payload, &borrow(&frame.fds)).unwrap();
            }
            Err(Error::Disconnected) => return,
            Err(e) => panic!("child: {e}"),
        }
    }
}

#[test]
fn fds_dropped_at_the_open_file_limit_are_reported_and_the_stream_stays_in_sync() {
    let _fds = fd_count_lock();
    let (mut child, socket) = Worker::spawn_socket(child("child_at_fd_limit")).unwrap();
    // The child lowers its limit, then says how many fds it can still take.
    let room = u32::from_le_bytes(socket.recv().unwrap().payload.try_into().unwrap()) as usize;
    let many = fds(room + 5);
    socket.send(b"too many", &borrow(&many)).unwrap();
    socket.send(b"then this", &[]).unwrap();
    let verdict = socket.recv().unwrap();
    assert_eq!(String::from_utf8_lossy(&verdict.payload), "ok");
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_at_fd_limit() {
    use nix::sys::resource::{Resource, setrlimit};
    let socket = worker::socket().unwrap();
    let open = open_fds() as u64;
    setrlimit(Resource::RLIMIT_NOFILE, open + 10, open + 10).unwrap();
    socket.send(&9u32.to_le_bytes(), &[]).unwrap();
    let first = socket.recv();
    let verdict = match first {
        Err(Error::FdsDropped {
            expected: 14,
            received,
        }) if received < 14 => match socket.recv() {
            Ok(f) if f.payload == b"then this" && open_fds() as u64 == open => "ok".to_string(),
            other => format!("after the drop: {other:?}"),
        },
        other => format!("expected FdsDropped, got {other:?}"),
    };
    socket.send(verdict.as_bytes(), &[]).unwrap();
}

#[test]
fn a_message_over_the_senders_own_limits_is_refused_before_any_of_it_goes_out() {
    let _fds = fd_count_lock();
    let (mut a, b) = Socket::pair().unwrap();
    a.set_limits(Limits {
        max_message_len: 100_000,
        max_fds: 300,
        ..Default::default()
    });
    let file = memfd(b"kept");
    // One datagram's worth, and more than one datagram's (fds, then bytes).
    let cases: [(usize, usize, &str); 4] = [
        (100_001, 0, "bytes"),
        (10, 301, "fds"),
        (100_001, 301, "bytes first"),
        (5 << 20, 1, "bytes"),
    ];
    for (len, nfds, what) in cases {
        let copies = vec![file.as_fd(); nfds];
        match a.send(&pattern(len), &copies) {
            Err(Error::TooLarge {
                size,
                limit,
                by_peer: false,
                ..
            }) if what != "fds" => {
                assert_eq!((size, limit), (len as u64, 100_000));
            }
            Err(Error::TooManyFds {
                count,
                limit,
                by_peer: false,
                ..
            }) if what == "fds" => {
                assert_eq!((count, limit), (nfds as u64, 300));
            }
            other => panic!("{len} bytes and {nfds} fds: expected a refusal, got {other:?}"),
        }
    }
    assert!(b.try_recv().unwrap().is_none(), "nothing went out");
    // The caller's fd is untouched, and the socket still sends what fits the limits.
    a.send(b"within", &vec![file.as_fd(); 300]).unwrap();
    let frame = b.recv().unwrap();
    assert_eq!(
        (frame.payload.as_slice(), frame.fds.len()),
        (&b"within"[..], 300)
    );
    drop(frame);
    assert_eq!(read_all(file), b"kept");
}

#[test]
fn a_refused_message_is_read_to_its_end_and_keeps_its_first_bytes() {
    let _fds = fd_count_lock();
    let (a, mut b) = Socket::pair().unwrap();
    b.set_limits(Limits {
        max_message_len: 100_000,
        max_fds: 4,
        ..Default::default()
    });
    let payload = pattern(1000);
    // 300 fds: a first datagram of fds only, then the bytes with the rest of the fds.
    let (read_end, write_end) = pipe();
    a.send(&payload, &vec![write_end.as_fd(); 300]).unwrap();
    drop(write_end);
    a.send(b"next", &[]).unwrap();
    let mut frame = Frame::default();
    match b.recv_into(&mut frame, None) {
        Err(Error::TooManyFds {
            count: 300,
            limit: 4,
            by_peer: false,
            ..
        }) => {}
        other => panic!("expected TooManyFds, got {other:?}"),
    }
    assert_eq!(frame.payload, payload[..64], "the first bytes are kept");
    assert!(frame.fds.is_empty());
    assert!(all_closed(&read_end), "every fd it carried is closed");
    assert_eq!(b.recv().unwrap().payload, b"next");
    // Too large, in several datagrams: the same, and the next message follows in sync.
    let big = pattern(300_000);
    std::thread::scope(|s| {
        s.spawn(|| {
            a.send(&big, &[]).unwrap();
            a.send(b"after", &[]).unwrap();
        });
        match b.recv_into(&mut frame, None) {
            Err(Error::TooLarge {
                size: 300_000,
                limit: 100_000,
                by_peer: false,
                ..
            }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(frame.payload, big[..64]);
        assert_eq!(b.recv().unwrap().payload, b"after");
    });
}

#[test]
fn a_refused_message_arriving_in_parts_is_reported_once_its_last_part_is_in() {
    let _fds = fd_count_lock();
    let (a, mut b) = Socket::pair().unwrap();
    b.set_limits(Limits {
        max_message_len: 100,
        max_fds: 4,
        ..Default::default()
    });
    let first = Header {
        kind: Kind::First,
        fds: 0,
        total_len: 200,
        total_fds: 0,
    };
    raw_send(&a, &first.encode(), &[]);
    let mut frame = Frame::default();
    assert!(!b.try_recv_into(&mut frame).unwrap(), "the rest is to come");
    assert!(matches!(
        b.recv_timeout(Duration::from_millis(1)),
        Err(Error::TimedOut)
    ));
    let more = Header {
        kind: Kind::More,
        ..first
    };
    raw_send(&a, &more.encode(), &pattern(150));
    assert!(
        !b.try_recv_into(&mut frame).unwrap(),
        "50 bytes are to come"
    );
    raw_send(&a, &more.encode(), &pattern(50));
    match b.try_recv_into(&mut frame) {
        Err(Error::TooLarge {
            size: 200,
            limit: 100,
            by_peer: false,
            ..
        }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(frame.payload, pattern(150)[..64]);
    a.send(b"next", &[]).unwrap();
    assert_eq!(b.recv().unwrap().payload, b"next");
}

#[test]
fn a_refused_message_whose_part_carries_fds_it_did_not_announce_is_malformed() {
    let _fds = fd_count_lock();
    let (a, mut b) = Socket::pair().unwrap();
    b.set_limits(Limits {
        max_message_len: 100,
        ..Default::default()
    });
    let before = open_fds();
    let first = Header {
        kind: Kind::First,
        fds: 0,
        total_len: 200,
        total_fds: 1,
    };
    raw_send(&a, &first.encode(), &[]);
    let more = Header {
        kind: Kind::More,
        ..first
    };
    // Says it carries none of the message's fds, and carries two, one more than it has.
    let extra = fds(2);
    let raw: Vec<_> = extra.iter().map(|f| f.as_raw_fd()).collect();
    raw_send_fds(&a, &more.encode(), &pattern(200), &raw);
    drop(extra);
    match b.recv() {
        Err(Error::Malformed(why)) => assert!(why.contains("announces 0 fds, 2 arrived"), "{why}"),
        other => panic!("expected Malformed, got {other:?}"),
    }
    assert_eq!(
        open_fds(),
        before,
        "the fds that came with the refused part are closed"
    );
}

/// Whether thread `tid` of this process is inside the system call `nr`.
fn in_syscall(tid: libc::pid_t, nr: libc::c_long) -> bool {
    let path = format!("/proc/self/task/{tid}/syscall");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<libc::c_long>().ok())
        == Some(nr)
}

/// A receive that must not wait — `try_recv`, or `recv_timeout` past its deadline — returns
/// while another thread is blocked in `recv` on the same socket (receives are serialised, but
/// waiting for the other receiver is waiting too).
#[test]
fn a_receive_with_a_deadline_does_not_wait_for_a_blocked_receiver() {
    let _fds = fd_count_lock();
    let (a, b) = Socket::pair().unwrap();
    let b = &b;
    std::thread::scope(|s| {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let blocked = s.spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            b.recv()
        });
        let tid = tid_rx.recv().unwrap();
        while !in_syscall(tid, libc::SYS_recvmsg) {
            std::thread::yield_now();
        }
        // The first thread holds the receive lock, blocked in recvmsg until a message comes.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        s.spawn(move || {
            let polled = b.try_recv().map(|f| f.is_none());
            let timed = b.recv_timeout(Duration::from_millis(1)).map(|_| ());
            done_tx.send((polled, timed)).unwrap();
        });
        // A watchdog, not a timing assertion: on failure the receives never return.
        let outcome = done_rx.recv_timeout(Duration::from_secs(30));
        a.send(b"wake", &[]).unwrap();
        assert_eq!(blocked.join().unwrap().unwrap().payload, b"wake");
        let (polled, timed) = outcome.expect("a receive that must not wait waited for another");
        assert!(polled.unwrap(), "try_recv: nothing was ready for it");
        assert!(matches!(timed, Err(Error::TimedOut)), "{timed:?}");
    });
}

/// A datagram of no bytes from a live peer is garbage, reported as [`Error::Malformed`] with
/// the stream kept in sync, also when it comes where the transport only peeks: in the middle
/// of a refused message, or after a message that failed part-way (whose continuations are
/// being dropped). It is not a hang-up: the peer is there and what it sends next is read.
#[test]
fn an_empty_datagram_mid_message_is_malformed_not_a_hang_up() {
    let _fds = fd_count_lock();
    let (a, mut b) = Socket::pair().unwrap();
    b.set_limits(Limits {
        max_message_len: 1 << 10,
        max_fds: 4,
        ..Default::default()
    });
    let first = |total_len: u32| Header {
        kind: Kind::First,
        fds: 0,
        total_len,
        total_fds: 0,
    };
    // A refused message interrupted by an empty datagram.
    raw_send(&a, &first(1 << 20).encode(), &[]);
    raw_send(&a, &[], &[]);
    a.send(b"after a refusal", &[]).unwrap();
    // A message whose continuation is larger than it announced (it fails part-way, and its
    // continuations are dropped), then an empty datagram.
    raw_send(&a, &first(10).encode(), b"abc");
    let more = Header {
        kind: Kind::More,
        ..first(10)
    };
    raw_send(&a, &more.encode(), &[0; 20]);
    raw_send(&a, &[], &[]);
    a.send(b"after a failure", &[]).unwrap();

    let r = b.recv();
    assert!(matches!(r, Err(Error::TooLarge { .. })), "{r:?}");
    let r = b.recv();
    assert!(matches!(r, Err(Error::Malformed(_))), "{r:?}");
    assert_eq!(b.recv().unwrap().payload, b"after a refusal");
    let r = b.recv();
    assert!(matches!(r, Err(Error::Truncated)), "{r:?}");
    let r = b.recv();
    assert!(matches!(r, Err(Error::Malformed(_))), "{r:?}");
    assert_eq!(b.recv().unwrap().payload, b"after a failure");
}

/// A datagram of no bytes in the middle of a message is garbage also from a peer that has
/// hung up since. It was taken for the peer's reset (said before what the peer sent), and
/// skipped: the message went on, and the fds the empty datagram carried were handed out as
/// the message's, past this side's limit on fds and past what its headers announced.
#[test]
fn an_empty_datagram_mid_message_from_a_peer_since_gone_is_malformed() {
    let _fds = fd_count_lock();
    let before = open_fds();
    let (a, mut b) = Socket::pair().unwrap();
    b.set_limits(Limits {
        max_message_len: 1 << 10,
        max_fds: 4,
        ..Default::default()
    });
    let first = Header {
        kind: Kind::First,
        fds: 0,
        total_len: 3,
        total_fds: 0,
    };
    raw_send(&a, &first.encode(), &[]);
    // No bytes, 200 fds.
    let (read_end, write_end) = pipe();
    raw_send_fds(&a, &[], &[], &[write_end.as_raw_fd(); 200]);
    drop(write_end);
    let more = Header {
        kind: Kind::More,
        ..first
    };
    raw_send(&a, &more.encode(), b"abc");
    drop(a);
    let r = b.recv();
    assert!(
        matches!(r, Err(Error::Malformed(_))),
        "{:?}",
        r.map(|f| f.fds.len())
    );
    assert!(matches!(b.recv(), Err(Error::Disconnected)));
    drop((b, read_end));
    assert_eq!(open_fds(), before);
}

/// A socket taken over with its fd non-blocking (`O_NONBLOCK`, as an event loop may have left
/// it) still waits in a receive without a deadline, rather than failing with `WouldBlock`.
#[test]
fn a_non_blocking_fd_taken_over_still_waits_to_receive() {
    let _fds = fd_count_lock();
    let (a, b) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
    )
    .unwrap();
    let (a, b) = (Socket::from_fd(a).unwrap(), Socket::from_fd(b).unwrap());
    std::thread::scope(|s| {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let receiver = s.spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            (b.recv(), b.recv_timeout(Duration::from_secs(30)))
        });
        let tid = tid_rx.recv().unwrap();
        // Sent only once the receiver waits (or has given up, as it did before).
        while !receiver.is_finished()
            && !in_syscall(tid, libc::SYS_poll)
            && !in_syscall(tid, libc::SYS_ppoll)
        {
            std::thread::yield_now();
        }
        a.send(b"first", &[]).unwrap();
        a.send(b"second", &[]).unwrap();
        let (first, second) = receiver.join().unwrap();
        assert_eq!(first.unwrap().payload, b"first");
        assert_eq!(second.unwrap().payload, b"second");
    });
}

/// A connected pair whose second end is taken over ([`Socket::from_fd`]) with the socket
/// option `option` (`SO_PASS...`) on, as a service manager may leave it.
fn taken_over_with(option: libc::c_int) -> (Socket, Socket) {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let on: libc::c_int = 1;
    // SAFETY: `on` is a live c_int of the length given, only read by the call.
    let r = unsafe {
        libc::setsockopt(
            b.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
    (Socket::from_fd(a).unwrap(), Socket::from_fd(b).unwrap())
}

#[test]
fn a_socket_taken_over_with_extra_control_messages_on_gets_every_fd_and_no_other() {
    let _fds = fd_count_lock();
    // Credentials (or a timestamp) beside a datagram's 253 fds left no room for all of them
    // (MSG_CTRUNC).
    for option in [libc::SO_PASSCRED, libc::SO_TIMESTAMP, libc::SO_TIMESTAMPNS] {
        let (a, b) = taken_over_with(option);
        round_trip(&a, &b, 10, 253);
    }
    // A pidfd came with every datagram, and nothing closed it.
    let (a, b) = taken_over_with(libc::SO_PASSPIDFD);
    let before = open_fds();
    for _ in 0..10 {
        a.send(b"x", &[]).unwrap();
        assert_eq!(b.recv().unwrap().payload, b"x");
    }
    assert_eq!(open_fds(), before, "fds left open by ten receives");
}

/// A side that sends more than it accepts (`Limits::max_send_len`) refuses what it receives
/// by what it accepts, and says so: a message over `max_message_len` is `TooLarge` over it,
/// one over `max_fds` only is `TooManyFds`, whatever this side sends.
#[test]
fn a_message_refused_on_receipt_is_over_what_this_side_accepts_not_what_it_sends() {
    let (a, mut b) = Socket::pair().unwrap();
    for max_send_len in [1 << 20, 100] {
        b.set_limits(Limits {
            max_message_len: 4096,
            max_fds: 2,
            max_send_len: Some(max_send_len),
            ..Limits::default()
        });
        a.send(&[1; 8192], &[]).unwrap();
        match b.recv() {
            Err(Error::TooLarge {
                size: 8192,
                limit: 4096,
                by_peer: false,
                ..
            }) => {}
            other => panic!("sending {max_send_len}: expected TooLarge over 4096, got {other:?}"),
        }
        let many = fds(3);
        a.send(&[2; 1000], &borrow(&many)).unwrap();
        match b.recv() {
            Err(Error::TooManyFds {
                count: 3,
                limit: 2,
                by_peer: false,
                ..
            }) => {}
            other => panic!("sending {max_send_len}: expected TooManyFds over 2, got {other:?}"),
        }
        a.send(b"after", &[]).unwrap();
        assert_eq!(b.recv().unwrap().payload, b"after");
    }
}

/// A side that sends more fds than it accepts (`Limits::max_send_fds`) sends up to that many,
/// in one datagram or in pieces, and refuses more unsent; what it receives it still refuses by
/// `max_fds`, and says so.
#[test]
fn a_side_sends_up_to_its_send_fds_and_refuses_what_it_receives_by_max_fds() {
    let _fds = fd_count_lock();
    let (mut a, b) = Socket::pair().unwrap();
    a.set_limits(Limits {
        max_fds: 0,
        max_send_fds: Some(3),
        ..Limits::default()
    });
    let before = open_fds();
    // One datagram, then a message large enough to go in pieces.
    for len in [10, 200 << 10] {
        a.send(&vec![1; len], &borrow(&fds(3))).unwrap();
        let got = b.recv().unwrap();
        assert_eq!(got.payload.len(), len);
        assert_numbered(got.fds);
    }
    match a.send(b"four", &borrow(&fds(4))) {
        Err(Error::TooManyFds {
            count: 4,
            limit: 3,
            by_peer: false,
            ..
        }) => {}
        other => panic!("expected TooManyFds over the 3 sent, got {other:?}"),
    }
    b.send(b"one", &borrow(&fds(1))).unwrap();
    match a.recv() {
        Err(Error::TooManyFds {
            count: 1,
            limit: 0,
            by_peer: false,
            ..
        }) => {}
        other => panic!("expected TooManyFds over the 0 accepted, got {other:?}"),
    }
    b.send(b"after", &[]).unwrap();
    assert_eq!(a.recv().unwrap().payload, b"after");
    assert_eq!(open_fds(), before, "every fd closed");
}
