//! Cancellation across processes: a caller that gives up on a call (its future dropped, or
//! its timeout passed) tells the worker, which drops the call if it can. What the worker
//! does is seen from the parent through pipes whose write ends the worker's handlers hold:
//! a byte when a handler starts, the end of the stream once every write end is closed, so
//! a handler dropped (or a request dropped unrun, its fds closed) shows as end of stream.
//!
//! The worker is this test binary run again for one `#[ignore]`d test (`child_*`).

#![cfg(feature = "tokio")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;

use common::{Storm, child, fd_count_lock, fd_snapshot};
use typed_ipc::Error;
use typed_ipc::worker::{Exit, Worker};

/// What `echo` returns: what it was given.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Echoed {
    tag: u64,
    #[serde(with = "typed_ipc::fd")]
    fd: OwnedFd,
    data: Vec<u8>,
}

/// The interface, blocking flavour.
mod blocking {
    use std::os::fd::OwnedFd;

    /// What the worker serves (also on tokio, each method on its blocking pool).
    #[typed_ipc::interface(async_server)]
    pub trait Camera {
        /// Writes a byte to `signal`, then never returns, holding `signal` open.
        fn hang(&self, signal: OwnedFd);
        /// Writes a byte to `signal` (`?` if `gate` is not a read end: `signal_at_gate`), then
        /// waits until `gate` reads end of stream.
        #[oneway]
        fn gate(&self, signal: OwnedFd, gate: OwnedFd);
        /// As `gate`, but the async flavour waits on the runtime's own thread, which then
        /// runs nothing else until `gate` ends (on a current-thread runtime, nothing at all).
        #[oneway]
        fn stall(&self, signal: OwnedFd, gate: OwnedFd);
        /// Writes a byte to `mark`: what a call that must never run does.
        fn mark(&self, mark: OwnedFd) -> u32;
        /// As `mark`, with a large byte string (placed in the caller's shared region).
        fn mark_data(&self, mark: OwnedFd, data: Vec<u8>) -> u32;
        /// `fd` and `data` back, tagged with `tag` (the async flavour yields first, as many
        /// times as `tag % 4`).
        fn echo(&self, tag: u64, fd: OwnedFd, data: Vec<u8>) -> super::Echoed;
        /// Keeps `signal` and `gate` for the refusing worker's authorizer: the next
        /// `mark_data` it refuses writes a byte to `signal`, then waits until `gate` reads end
        /// of stream, and only then refuses.
        fn arm(&self, signal: OwnedFd, gate: OwnedFd);
    }
}

/// The same interface, async flavour.
mod asynchronous {
    use std::os::fd::OwnedFd;

    #[typed_ipc::interface]
    pub trait Camera {
        async fn hang(&self, signal: OwnedFd);
        #[oneway]
        async fn gate(&self, signal: OwnedFd, gate: OwnedFd);
        #[oneway]
        async fn stall(&self, signal: OwnedFd, gate: OwnedFd);
        async fn mark(&self, mark: OwnedFd) -> u32;
        async fn mark_data(&self, mark: OwnedFd, data: Vec<u8>) -> u32;
        async fn echo(&self, tag: u64, fd: OwnedFd, data: Vec<u8>) -> super::Echoed;
        async fn arm(&self, signal: OwnedFd, gate: OwnedFd);
    }
}

fn write_byte(fd: &OwnedFd) {
    std::fs::File::from(fd.try_clone().unwrap())
        .write_all(b"!")
        .unwrap();
}

/// Writes a byte to `signal` as a handler reaches `gate`: `!` if the handler can wait on it
/// (it reads the gate to its end), `?` if `gate` is not open for reading, as the write end of
/// the pipe is not: a read of it fails at once, and the gate would not hold at all.
fn signal_at_gate(signal: &OwnedFd, gate: &OwnedFd) {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(gate, FcntlArg::F_GETFL).unwrap());
    let byte = match flags & OFlag::O_ACCMODE {
        OFlag::O_RDONLY | OFlag::O_RDWR => b"!",
        _ => b"?",
    };
    std::fs::File::from(signal.try_clone().unwrap())
        .write_all(byte)
        .unwrap();
}

/// Reads `fd` to its end.
fn read_to_end(fd: OwnedFd) -> Vec<u8> {
    let mut bytes = Vec::new();
    std::fs::File::from(fd).read_to_end(&mut bytes).unwrap();
    bytes
}

struct AsyncCamera;

impl asynchronous::Camera for AsyncCamera {
    async fn hang(&self, signal: OwnedFd) {
        write_byte(&signal);
        // Holds `signal` until this future is dropped.
        std::future::pending::<()>().await;
        drop(signal);
    }
    async fn gate(&self, signal: OwnedFd, gate: OwnedFd) {
        signal_at_gate(&signal, &gate);
        tokio::task::spawn_blocking(move || read_to_end(gate))
            .await
            .unwrap();
    }
    async fn stall(&self, signal: OwnedFd, gate: OwnedFd) {
        signal_at_gate(&signal, &gate);
        read_to_end(gate); // on the runtime's thread, on purpose
    }
    async fn mark(&self, mark: OwnedFd) -> u32 {
        write_byte(&mark);
        1
    }
    async fn mark_data(&self, mark: OwnedFd, data: Vec<u8>) -> u32 {
        write_byte(&mark);
        data.len() as u32
    }
    async fn echo(&self, tag: u64, fd: OwnedFd, data: Vec<u8>) -> Echoed {
        for _ in 0..tag % 4 {
            tokio::task::yield_now().await;
        }
        Echoed { tag, fd, data }
    }
    async fn arm(&self, signal: OwnedFd, gate: OwnedFd) {
        *ARMED.lock().unwrap() = Some((signal, gate));
    }
}

struct BlockingCamera;

impl blocking::Camera for BlockingCamera {
    fn hang(&self, signal: OwnedFd) {
        write_byte(&signal);
        // A blocking handler cannot be stopped: it holds `signal` until the worker is
        // killed.
        loop {
            std::thread::park();
        }
    }
    fn gate(&self, signal: OwnedFd, gate: OwnedFd) {
        signal_at_gate(&signal, &gate);
        read_to_end(gate);
    }
    fn stall(&self, signal: OwnedFd, gate: OwnedFd) {
        self.gate(signal, gate);
    }
    fn mark(&self, mark: OwnedFd) -> u32 {
        write_byte(&mark);
        1
    }
    fn mark_data(&self, mark: OwnedFd, data: Vec<u8>) -> u32 {
        write_byte(&mark);
        data.len() as u32
    }
    fn echo(&self, tag: u64, fd: OwnedFd, data: Vec<u8>) -> Echoed {
        Echoed { tag, fd, data }
    }
    fn arm(&self, signal: OwnedFd, gate: OwnedFd) {
        *ARMED.lock().unwrap() = Some((signal, gate));
    }
}

/// What `arm` left for the refusing worker's authorizer.
static ARMED: std::sync::Mutex<Option<(OwnedFd, OwnedFd)>> = std::sync::Mutex::new(None);

/// The refusing worker's authorizer: refuses `mark_data` (after the gate `arm` left, if
/// any), allows the rest.
fn refuse_data(iface: &typed_ipc::service::InterfaceInfo, cmd: u32) -> Result<(), String> {
    if iface.method(cmd).map(|m| m.name) != Some("mark_data") {
        return Ok(());
    }
    let armed = ARMED.lock().unwrap().take();
    if let Some((signal, gate)) = armed {
        signal_at_gate(&signal, &gate);
        read_to_end(gate);
    }
    Err("no data taken here".into())
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_async_camera() {
    serve_async_camera(tokio::runtime::Runtime::new().unwrap());
}

/// `child_async_camera` on a current-thread runtime: a handler that waits on the runtime's
/// thread (`stall`) holds up the connection's reader too.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_current_thread_camera() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    serve_async_camera(runtime.unwrap());
}

/// Serves `AsyncCamera` on this worker's connection, on `runtime`, until the parent hangs up.
fn serve_async_camera(runtime: tokio::runtime::Runtime) {
    runtime.block_on(async {
        let conn = typed_ipc::tokio::worker::connection().unwrap();
        asynchronous::CameraServer::new(AsyncCamera)
            .serve(conn)
            .await
            .unwrap();
    });
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_blocking_camera() {
    let conn = typed_ipc::worker::connection().unwrap();
    conn.add_service(blocking::CameraServer::new(BlockingCamera));
    // Two serving threads: one runs the gate while the other reads.
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let conn = conn.clone();
            std::thread::spawn(move || conn.run())
        })
        .collect();
    for thread in threads {
        let _ = thread.join().unwrap();
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_pooled_camera() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let conn = typed_ipc::tokio::worker::connection().unwrap();
        blocking::CameraAsyncServer::new(BlockingCamera)
            .serve(conn)
            .await
            .unwrap();
    });
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_refusing_async_camera() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let conn = typed_ipc::tokio::worker::connection().unwrap();
        // The gate is waited for off the runtime's threads: the reader reads on meanwhile.
        conn.set_authorizer(|_, iface, cmd| {
            tokio::task::block_in_place(|| refuse_data(iface, cmd))
        });
        asynchronous::CameraServer::new(AsyncCamera)
            .serve(conn)
            .await
            .unwrap();
    });
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_refusing_blocking_camera() {
    let conn = typed_ipc::worker::connection().unwrap();
    conn.set_authorizer(|_, iface, cmd| refuse_data(iface, cmd));
    conn.add_service(blocking::CameraServer::new(BlockingCamera));
    // Two serving threads: one refuses (after the gate) while the other reads.
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let conn = conn.clone();
            std::thread::spawn(move || conn.run())
        })
        .collect();
    for thread in threads {
        let _ = thread.join().unwrap();
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
}

/// Polls `call` once, which must send its request and wait, runs `while_pending` while the
/// call lives, then drops the call: its cancel goes out.
fn sent_then_dropped<F: std::future::Future>(call: F, while_pending: impl FnOnce()) {
    let mut call = Box::pin(call);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(
        call.as_mut().poll(&mut cx).is_pending(),
        "sent, not answered"
    );
    while_pending();
}

/// Waits until `conn`'s lane is idle again (`release_shared_memory` gives its region back);
/// fails with `why` after the hang guard.
async fn lane_idle_again(conn: &typed_ipc::tokio::AsyncConnection, why: &str) {
    tokio::time::timeout(HANG_GUARD, async {
        while conn.release_shared_memory() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect(why);
}

/// Reads one byte from `fd`, on a thread, so that a hang fails the test instead.
fn read_byte(fd: &OwnedFd) -> u8 {
    let mut file = std::fs::File::from(fd.try_clone().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8];
        let read = file.read_exact(&mut b).map(|()| b[0]);
        drop(file); // closed before the test goes on to count fds
        let _ = tx.send(read);
    });
    rx.recv_timeout(HANG_GUARD).expect("no byte came").unwrap()
}

/// Reads `fd` to its end, on a thread, so that a hang fails the test instead.
fn read_to_end_guarded(fd: OwnedFd, what: &str) -> Vec<u8> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read_to_end(fd));
    });
    rx.recv_timeout(HANG_GUARD)
        .unwrap_or_else(|_| panic!("{what}"))
}

/// Waits, on a thread, until every write end of the pipes whose read ends are `read_ends`
/// is closed: after a storm of calls that each sent one (and got it back in the reply), the
/// sign that the worker is done with every request (it closes a request's fds only once it
/// is done with the large string the request may have placed in the lane, read or not), and
/// that this end closed those the late replies brought back. Only where a reader takes in
/// late replies by itself (the async flavour): a blocking caller reads them as it calls
/// next. A hang fails the test instead.
fn all_closed(read_ends: Vec<OwnedFd>, what: &str) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for fd in read_ends {
            read_to_end(fd);
        }
        let _ = tx.send(());
    });
    rx.recv_timeout(HANG_GUARD)
        .unwrap_or_else(|_| panic!("{what}"));
}

/// How many of a storm's read ends a test keeps open before it waits for them all to close
/// ([`all_closed`]).
const KEPT_AT_MOST: usize = 200;

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A call whose future is dropped while its async handler waits has that handler's future
/// dropped in the worker: the fd it held is closed there. The connection goes on, and no fd
/// is left open in the parent. Before, the handler waited for good and so did this test.
#[test]
fn an_async_worker_drops_the_handler_of_a_call_whose_future_was_dropped() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let rt = runtime();
    rt.block_on(async {
        let (mut worker, conn) =
            typed_ipc::tokio::worker::spawn(child("child_async_camera")).unwrap();
        let camera = asynchronous::CameraClient::new(conn);
        let (signal, held) = pipe();
        let call = tokio::spawn({
            let camera = camera.clone();
            async move { camera.hang(held).await }
        });
        assert_eq!(read_byte(&signal), b'!', "the handler started");
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
        let rest = read_to_end_guarded(signal, "the worker's handler was never dropped");
        assert!(rest.is_empty());
        // The connection works on.
        let (mark, marked) = pipe();
        assert_eq!(camera.mark(marked).await.unwrap(), 1);
        assert_eq!(read_byte(&mark), b'!');
        drop(camera);
        assert!(matches!(worker.wait().unwrap(), Exit::Code(0)));
    });
    drop(rt);
    before.assert_nothing_new();
}

/// What the worker's trace says, line by line, read on a thread of its own, which ends (its
/// end of the pipe closed) once the worker has exited.
fn trace_lines(
    stderr: std::process::ChildStderr,
) -> (
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<()>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let reading = std::thread::spawn(move || send_lines(stderr, &tx));
    (rx, reading)
}

fn send_lines(stderr: std::process::ChildStderr, to: &std::sync::mpsc::Sender<String>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { return };
        let _ = to.send(line);
    }
}

/// How [`trace_and_signal_lines`] starts the line it puts among the worker's for each byte
/// read from the signal pipe, the byte after it: no line of the trace starts so.
const SIGNALLED: &str = "(a byte on the signal pipe) ";

/// As [`trace_lines`], with a [`SIGNALLED`] line for each byte read from `signal`, so that a
/// test can wait for whichever comes first. The returned thread ends once both the trace
/// and `signal` have ended.
fn trace_and_signal_lines(
    stderr: std::process::ChildStderr,
    signal: OwnedFd,
) -> (
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<()>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let bytes = tx.clone();
    let signalled = std::thread::spawn(move || {
        let mut file = std::fs::File::from(signal);
        let mut b = [0u8];
        loop {
            match file.read(&mut b) {
                Ok(1) => {
                    let _ = bytes.send(format!("{SIGNALLED}{}", char::from(b[0])));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => return,
            }
        }
    });
    let reading = std::thread::spawn(move || {
        send_lines(stderr, &tx);
        signalled.join().unwrap();
    });
    (rx, reading)
}

/// A worker, the test `test` of this binary (`child_async_camera`, `child_blocking_camera`),
/// run with `TYPED_IPC_DEBUG=1` and spawned from async code: the worker, the connection to
/// it, and its trace ([`trace_lines`]).
fn traced_async_worker(
    test: &str,
) -> (
    Worker,
    typed_ipc::tokio::AsyncConnection,
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<()>,
) {
    let mut command = child(test);
    command.env("TYPED_IPC_DEBUG", "1").stderr(Stdio::piped());
    let (mut worker, conn) = typed_ipc::tokio::worker::spawn(command).unwrap();
    let (lines, reading) = trace_lines(worker.take_stderr().expect("piped"));
    (worker, conn, lines, reading)
}

/// Waits until the worker's trace says `what`.
fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, what: &str) {
    loop {
        let line = lines
            .recv_timeout(HANG_GUARD)
            .unwrap_or_else(|_| panic!("the worker never said {what:?}"));
        if line.contains(what) {
            return;
        }
    }
}

/// A call queued behind a slow oneway in an async worker, its future dropped, is dropped
/// there unrun: it never writes its byte, whatever runs after, and its fd is closed. The
/// worker's trace says when it dropped the call, so the gate opens only after that.
/// Before, the call ran once the oneway was done.
#[test]
fn an_async_worker_never_runs_a_call_cancelled_while_it_waited_behind_a_oneway() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let rt = runtime();
    rt.block_on(async {
        let (mut worker, conn, lines, reading) = traced_async_worker("child_async_camera");
        let camera = asynchronous::CameraClient::new(conn);
        let (signal, signalled) = pipe();
        let (gated, gate) = pipe();
        camera.gate(signalled, gated).await.unwrap();
        assert_eq!(read_byte(&signal), b'!', "the gate is running");
        let (mark, marked) = pipe();
        sent_then_dropped(camera.mark(marked), || {});
        wait_for_line(&lines, "cancelled by the peer: unrun");
        drop(gate);
        let marks = read_to_end_guarded(mark, "the cancelled call's fd was never closed");
        assert!(marks.is_empty(), "the cancelled call ran");
        drop(camera);
        assert!(matches!(worker.wait().unwrap(), Exit::Code(0)));
        reading.join().unwrap();
    });
    drop(rt);
    before.assert_nothing_new();
}

/// A blocking call that times out tells the async worker, which drops its handler (or the
/// call unrun, if the cancel came first): the fd it held is closed either way.
/// A parent that hangs up mid-call (here with `close`; one killed does the same) has its
/// async worker cancel that call, whose reply could go nowhere: the handler's future is
/// dropped, closing the fd it held, and the trace says why. The call waiting behind a oneway
/// never runs; the oneway runs on to its end, and the worker's `serve` then returns, so it
/// exits. Before, the handler waited for good, and so did the worker: orphaned.
#[test]
fn an_async_worker_whose_parent_hangs_up_cancels_its_calls_and_runs_its_oneways() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let rt = runtime();
    rt.block_on(async {
        let (worker, conn, lines, reading) = traced_async_worker("child_async_camera");
        let camera = asynchronous::CameraClient::new(conn.clone());
        let (signal, held) = pipe();
        let hang = tokio::spawn({
            let camera = camera.clone();
            async move { camera.hang(held).await }
        });
        assert_eq!(read_byte(&signal), b'!', "the handler started");
        let (gate_signal, gate_signalled) = pipe();
        let (gated, gate) = pipe();
        camera.gate(gate_signalled, gated).await.unwrap();
        assert_eq!(read_byte(&gate_signal), b'!', "the gate is running");
        let (mark, marked) = pipe();
        let behind = tokio::spawn({
            let camera = camera.clone();
            async move { camera.mark(marked).await }
        });
        wait_for_line(&lines, "Camera::mark (");
        conn.close();
        assert!(matches!(hang.await.unwrap(), Err(Error::Disconnected)));
        assert!(matches!(behind.await.unwrap(), Err(Error::Disconnected)));
        let rest = read_to_end_guarded(signal, "the worker's handler was never dropped");
        assert!(rest.is_empty());
        // In either order: each call's task says it as it drops its call.
        let mut unsaid = vec![
            "cancelled as the connection ended: its handler dropped",
            "cancelled as the connection ended: unrun",
        ];
        while !unsaid.is_empty() {
            let line = lines
                .recv_timeout(HANG_GUARD)
                .unwrap_or_else(|_| panic!("the worker never said {unsaid:?}"));
            unsaid.retain(|what| !line.contains(what));
        }
        drop((camera, conn));
        never_ran_and_exits(mark, gate, worker, reading);
    });
    drop(rt);
    before.assert_nothing_new();
}

/// After a hang-up in mid-call: the call behind the oneway never ran (its `mark` pipe ends
/// unwritten, its fd closed); the oneway runs on to its end once its `gate` is dropped, and
/// the worker, its serving done, exits 0 (its trace, read by `reading`, ends with it).
fn never_ran_and_exits(
    mark: OwnedFd,
    gate: OwnedFd,
    mut worker: Worker,
    reading: std::thread::JoinHandle<()>,
) {
    let marks = read_to_end_guarded(mark, "the call behind the oneway kept its fd");
    assert!(marks.is_empty(), "the call behind the oneway ran");
    drop(gate);
    assert!(matches!(worker.wait().unwrap(), Exit::Code(0)));
    reading.join().unwrap();
}

/// A call the peer cancels just before it hangs up is said as cancelled by the peer, also when
/// its handler's task gets to run only after the connection has ended: the worker's reader
/// reads the cancel and the end in one go while a oneway holds up its only thread. Before, the
/// task read that the connection had ended by then, and said "as the connection ended".
#[test]
fn a_cancel_just_before_the_end_is_said_as_the_peers() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let rt = runtime();
    rt.block_on(async {
        let (mut worker, conn, lines, reading) = traced_async_worker("child_current_thread_camera");
        let camera = asynchronous::CameraClient::new(conn.clone());
        let (signal, held) = pipe();
        let mut hung = Box::pin(camera.hang(held));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(hung.as_mut().poll(&mut cx).is_pending(), "sent");
        assert_eq!(read_byte(&signal), b'!', "the call is running");
        let (stalled, stalling) = pipe();
        let (gated, gate) = pipe();
        camera.stall(stalling, gated).await.unwrap();
        assert_eq!(read_byte(&stalled), b'!', "the worker's thread is held up");
        drop(hung); // the cancel goes out
        conn.close(); // and the end right behind it
        drop(gate);
        wait_for_line(
            &lines,
            "-- Call #1 cancelled by the peer: its handler dropped",
        );
        assert!(matches!(worker.wait().unwrap(), Exit::Code(0)));
        drop((camera, conn, signal, stalled));
        reading.join().unwrap();
    });
    drop(rt);
    before.assert_nothing_new();
}

/// A parent that hangs up mid-call (here with `close`) has its blocking worker drop the call
/// it had not started, whose reply could go nowhere: the call queued behind a oneway never
/// runs, its fd is closed, and the trace says why. The oneway runs on to its end, and the
/// worker's serving threads then return, so it exits. Before, the call ran once the oneway
/// was done, for nobody. (The parent is async so that it knows the call went out before it
/// hangs up: the call's first poll sends it.)
#[test]
fn a_blocking_worker_whose_parent_hangs_up_drops_its_queued_calls_and_runs_its_oneways() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let rt = runtime();
    rt.block_on(async {
        let (worker, conn, lines, reading) = traced_async_worker("child_blocking_camera");
        let camera = asynchronous::CameraClient::new(conn.clone());
        let (signal, signalled) = pipe();
        let (gated, gate) = pipe();
        camera.gate(signalled, gated).await.unwrap();
        assert_eq!(read_byte(&signal), b'!', "the gate is running");
        let (mark, marked) = pipe();
        let mut behind = Box::pin(camera.mark(marked));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(behind.as_mut().poll(&mut cx).is_pending(), "sent");
        conn.close();
        assert!(matches!(behind.await, Err(Error::Disconnected)));
        wait_for_line(&lines, "cancelled as the connection ended: unrun");
        drop((camera, conn, signal));
        never_ran_and_exits(mark, gate, worker, reading);
    });
    drop(rt);
    before.assert_nothing_new();
}

#[test]
fn a_blocking_call_that_times_out_has_an_async_worker_drop_it() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (mut worker, conn) = Worker::spawn(child("child_async_camera")).unwrap();
    let camera = blocking::CameraClient::new(conn.clone());
    let (signal, held) = pipe();
    let timed = camera.with_timeout(Duration::from_millis(50));
    let hung = timed.hang(held);
    assert!(matches!(hung, Err(Error::TimedOut)), "{hung:?}");
    // A byte if the handler started before the cancel came, then the end.
    let rest = read_to_end_guarded(signal, "the worker's handler was never dropped");
    assert!(rest.len() <= 1);
    let (mark, marked) = pipe();
    assert_eq!(camera.mark(marked).unwrap(), 1);
    assert_eq!(read_byte(&mark), b'!');
    drop((mark, camera, timed, conn));
    assert!(matches!(worker.wait().unwrap(), Exit::Code(0)));
    drop(worker);
    before.assert_nothing_new();
}

/// A blocking worker drops a call still queued when its caller's timeout passes: queued
/// behind a oneway running on one serving thread while the other reads. The worker's trace
/// says when it dropped the call (as an async worker's does), so the gate opens only after
/// that. Before, the call ran once the oneway was done.
#[test]
fn a_blocking_worker_never_runs_a_queued_call_whose_caller_timed_out() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let mut command = child("child_blocking_camera");
    command.env("TYPED_IPC_DEBUG", "1").stderr(Stdio::piped());
    let (mut worker, conn) = Worker::spawn(command).unwrap();
    let (lines, reading) = trace_lines(worker.take_stderr().expect("piped"));
    let camera = blocking::CameraClient::new(conn.clone());
    let (signal, signalled) = pipe();
    let (gated, gate) = pipe();
    camera.gate(signalled, gated).unwrap();
    assert_eq!(read_byte(&signal), b'!', "the gate is running");
    let (mark, marked) = pipe();
    let timed = camera.with_timeout(Duration::from_millis(50));
    let marked = timed.mark(marked);
    assert!(matches!(marked, Err(Error::TimedOut)), "{marked:?}");
    wait_for_line(&lines, "cancelled by the peer: unrun");
    drop(gate);
    let marks = read_to_end_guarded(mark, "the cancelled call's fd was never closed");
    assert!(marks.is_empty(), "the cancelled call ran");
    drop((camera, timed, conn));
    assert!(matches!(worker.wait().unwrap(), Exit::Code(0)));
    reading.join().unwrap();
    drop((signal, worker));
    before.assert_nothing_new();
}

/// A call carrying a large byte string (placed in the parent's shared region), queued in the
/// worker behind a running oneway and cancelled there, gives the placement back: the worker
/// sends no reply for it, so it must say so in a message of its own (a cancel of cookie 0,
/// which its trace shows), and the parent's lane is idle again (`release_shared_memory` gives
/// the region back) before anything else is sent.
fn a_cancelled_queued_call_gives_its_placement_back(worker_test: &str) {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let rt = runtime();
    rt.block_on(async {
        let (mut worker, conn, lines, reading) = traced_async_worker(worker_test);
        let camera = asynchronous::CameraClient::new(conn.clone());
        // The worker's reply says it reads lanes: the next large string is placed.
        let (mark, marked) = pipe();
        assert_eq!(camera.mark(marked).await.unwrap(), 1);
        assert_eq!(read_byte(&mark), b'!');
        let (signal, signalled) = pipe();
        let (gated, gate) = pipe();
        camera.gate(signalled, gated).await.unwrap();
        assert_eq!(read_byte(&signal), b'!', "the gate is running");
        let (mark, marked) = pipe();
        sent_then_dropped(camera.mark_data(marked, vec![7u8; 64 << 10]), || {
            // Asked while the call lives: once its cancel is out, the worker may drop the call
            // and give the placement back before this thread gets to ask.
            assert_eq!(conn.release_shared_memory(), 0, "the string was placed");
        });
        // The worker says it dropped the call, then sends the acknowledgement no reply carries.
        wait_for_line(&lines, "cancelled by the peer: unrun, no reply");
        wait_for_line(&lines, "-> Cancel #0 (acknowledges a dropped call's bytes)");
        lane_idle_again(
            &conn,
            "the parent's lane stayed busy with the cancelled call's placement",
        )
        .await;
        drop(gate);
        let marks = read_to_end_guarded(mark, "the cancelled call's fd was never closed");
        assert!(marks.is_empty(), "the cancelled call ran");
        drop((camera, conn));
        assert!(matches!(worker.wait().unwrap(), Exit::Code(0)));
        reading.join().unwrap();
        drop((signal, worker));
    });
    drop(rt);
    before.assert_nothing_new();
}

#[test]
fn an_async_worker_gives_back_the_placement_of_a_queued_call_it_dropped() {
    a_cancelled_queued_call_gives_its_placement_back("child_async_camera");
}

#[test]
fn a_blocking_worker_gives_back_the_placement_of_a_queued_call_it_dropped() {
    a_cancelled_queued_call_gives_its_placement_back("child_blocking_camera");
}

/// A call carrying a large byte string (placed in the parent's shared region) that the worker
/// refuses (its authorizer) after the caller gave up on it (its future dropped) gives the
/// placement back all the same: the worker never reads the string, nobody waits for its
/// failure reply, and that reply must carry the acknowledgement (the worker sends nothing
/// else). The authorizer waits at a gate until the caller has given up, and the parent's
/// lane must then become idle (`release_shared_memory` gives the region back).
fn a_refused_cancelled_call_gives_its_placement_back(worker_test: &str) {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let rt = runtime();
    rt.block_on(async {
        let (mut worker, conn, lines, reading) = traced_async_worker(worker_test);
        let camera = asynchronous::CameraClient::new(conn.clone());
        // The worker's reply says it reads lanes: the next large string is placed.
        let (signal, signalled) = pipe();
        let (gated, gate) = pipe();
        camera.arm(signalled, gated).await.unwrap();
        let (mark, marked) = pipe();
        sent_then_dropped(camera.mark_data(marked, vec![7u8; 64 << 10]), || {
            assert_eq!(read_byte(&signal), b'!', "the authorizer is at the gate");
        });
        assert_eq!(conn.release_shared_memory(), 0, "the string was placed");
        wait_for_line(&lines, "<- Cancel #");
        drop(gate);
        wait_for_line(&lines, "-> Failure #");
        lane_idle_again(
            &conn,
            "the parent's lane stayed busy with the refused call's placement",
        )
        .await;
        let marks = read_to_end_guarded(mark, "the refused call's fd was never closed");
        assert!(marks.is_empty(), "the refused call ran");
        drop((camera, conn));
        assert!(matches!(worker.wait().unwrap(), Exit::Code(0)));
        reading.join().unwrap();
        drop((signal, worker));
    });
    drop(rt);
    before.assert_nothing_new();
}

#[test]
fn an_async_worker_acknowledges_the_placement_of_a_dropped_call_it_refused() {
    a_refused_cancelled_call_gives_its_placement_back("child_refusing_async_camera");
}

#[test]
fn a_blocking_worker_acknowledges_the_placement_of_a_dropped_call_it_refused() {
    a_refused_cancelled_call_gives_its_placement_back("child_refusing_blocking_camera");
}

/// What became of a blocking call the refusing worker's authorizer was to wait on, once its
/// timeout passed.
#[derive(Debug, PartialEq)]
enum Fate {
    /// The authorizer took it, and waits at the gate; the worker has read its cancel.
    AtTheGate,
    /// Its cancel came before the authorizer took it: the worker dropped it unrun.
    DroppedUnrun,
}

/// Waits until `lines` (from [`trace_and_signal_lines`]) say the [`Fate`] of the call that
/// just timed out.
fn fate(lines: &std::sync::mpsc::Receiver<String>) -> Fate {
    let (mut at_the_gate, mut cancel_read) = (false, false);
    loop {
        let line = lines
            .recv_timeout(HANG_GUARD)
            .expect("the worker neither authorized the call nor dropped it");
        if let Some(byte) = line.strip_prefix(SIGNALLED) {
            assert_eq!(byte, "!", "the authorizer is at the gate");
            at_the_gate = true;
        } else if line.contains("<- Cancel #") {
            cancel_read = true;
        } else if line.contains("cancelled by the peer: unrun") {
            assert!(!at_the_gate, "dropped unrun after the authorizer took it");
            return Fate::DroppedUnrun;
        }
        if at_the_gate && cancel_read {
            return Fate::AtTheGate;
        }
    }
}

/// The blocking twin: a blocking call that times out while the worker's authorizer waits at
/// the gate, refused afterwards. A thread of the parent's serves the connection (`run`), so
/// it reads what the worker sends though no call waits; the failure reply nobody waits for
/// must give the lane back.
///
/// A blocking call cannot wait for the authorizer before its timeout starts: on a loaded
/// machine the cancel may reach the worker before the authorizer takes the call, which the
/// worker then drops unrun (its trace says so). That is legal, and checked (the call never
/// ran, its placement came back); the call is then made again with twice the timeout, until
/// the authorizer's byte says it took the call before the cancel came.
fn a_refused_timed_out_call_gives_its_placement_back(worker_test: &str) {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let mut command = child(worker_test);
    command.env("TYPED_IPC_DEBUG", "1").stderr(Stdio::piped());
    let (mut worker, conn) = Worker::spawn(command).unwrap();
    let (signal, signalled) = pipe();
    let (lines, reading) = trace_and_signal_lines(worker.take_stderr().expect("piped"), signal);
    let serving = std::thread::spawn({
        let conn = conn.clone();
        move || conn.run()
    });
    let camera = blocking::CameraClient::new(conn.clone());
    let (gated, gate) = pipe();
    camera.arm(signalled, gated).unwrap();
    let mut timeout = Duration::from_millis(50);
    let mark = loop {
        let (mark, marked) = pipe();
        let refused = camera
            .with_timeout(timeout)
            .mark_data(marked, vec![7u8; 64 << 10]);
        assert!(matches!(refused, Err(Error::TimedOut)), "{refused:?}");
        if fate(&lines) == Fate::AtTheGate {
            break mark;
        }
        common::wait_until("the parent's lane is idle again", || {
            conn.release_shared_memory() != 0
        });
        let marks = read_to_end_guarded(mark, "the dropped call's fd was never closed");
        assert!(marks.is_empty(), "the dropped call ran");
        timeout *= 2;
        assert!(
            timeout < HANG_GUARD,
            "the authorizer never took a call in time"
        );
    };
    // The call waits in the authorizer, which holds its placement.
    assert_eq!(conn.release_shared_memory(), 0, "the string was placed");
    drop(gate);
    wait_for_line(&lines, "-> Failure #");
    common::wait_until("the parent's lane is idle again", || {
        conn.release_shared_memory() != 0
    });
    let marks = read_to_end_guarded(mark, "the refused call's fd was never closed");
    assert!(marks.is_empty(), "the refused call ran");
    conn.close();
    serving.join().unwrap().unwrap();
    drop((camera, conn));
    assert!(matches!(worker.wait().unwrap(), Exit::Code(0)));
    reading.join().unwrap();
    drop(worker);
    before.assert_nothing_new();
}

#[test]
fn an_async_worker_acknowledges_the_placement_of_a_timed_out_call_it_refused() {
    a_refused_timed_out_call_gives_its_placement_back("child_refusing_async_camera");
}

#[test]
fn a_blocking_worker_acknowledges_the_placement_of_a_timed_out_call_it_refused() {
    a_refused_timed_out_call_gives_its_placement_back("child_refusing_blocking_camera");
}

/// The storm's round `round`: its tag, and a string of one of the sizes that go inline, through
/// the shared region or through the pipe, its bytes the round's.
/// The most a request's string may hold and still fit one datagram inline (64 KiB, less
/// room for the envelope and the other arguments).
const ONE_DATAGRAM: usize = 60 << 10;

fn storm_round(x: u64, round: u64) -> (u64, Vec<u8>) {
    let len = [16usize, 2000, 8 << 10, 70_000, 300_000][(x >> 3) as usize % 5];
    let tag = round << 2 | (x & 3);
    (tag, common::filled(len, tag))
}

/// Calls to an async worker dropped at random moments (a short timeout), each with an fd and
/// a large string, which come back: every call that returns gets its own reply (tag, string,
/// the very fd it sent), never one that crossed an earlier call's cancel; the fds of the
/// replies that crossed a cancel are closed; afterwards large strings still go through the
/// shared region, and the connection works on.
#[test]
fn async_calls_to_an_async_worker_dropped_at_random_get_their_own_replies() {
    async_calls_dropped_at_random("child_async_camera");
}

/// As above, against a blocking worker (which runs on the handlers it has started).
#[test]
fn async_calls_to_a_blocking_worker_dropped_at_random_get_their_own_replies() {
    async_calls_dropped_at_random("child_blocking_camera");
}

/// As above, against an async worker running a blocking implementation on tokio's blocking
/// pool (`#[interface(async_server)]`), whose methods run on to their end and reply.
#[test]
fn async_calls_to_a_pooled_worker_dropped_at_random_get_their_own_replies() {
    async_calls_dropped_at_random("child_pooled_camera");
}

fn async_calls_dropped_at_random(worker_test: &str) {
    use std::os::fd::AsRawFd;
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let rt = runtime();
    rt.block_on(async {
        let (mut worker, conn) = typed_ipc::tokio::worker::spawn(child(worker_test)).unwrap();
        conn.lend_pages_to_peer(true);
        let camera = asynchronous::CameraClient::new(conn.clone());
        let mut storm = Storm::new(1000);
        let mut answered = 0;
        let mut kept = Vec::new();
        for round in 0..storm.rounds {
            let x = storm.next();
            let (tag, data) = storm_round(x, round);
            let (keep, sent) = pipe();
            let sent_ino = nix::sys::stat::fstat(&sent).unwrap().st_ino;
            let us = (x >> 40) % 100;
            let got = tokio::time::timeout(
                Duration::from_micros(us),
                camera.echo(tag, sent, data.clone()),
            )
            .await;
            if let Ok(got) = got {
                let Echoed {
                    tag: back_tag,
                    fd,
                    data: back,
                } = got.unwrap();
                assert_eq!(back_tag, tag, "round {round}: another call's reply");
                assert!(back == data, "round {round}: another call's string");
                let ino = nix::sys::stat::fstat(&fd).unwrap().st_ino;
                assert_eq!(ino, sent_ino, "round {round}: another call's fd");
                assert!(fd.as_raw_fd() >= 0);
                answered += 1;
            }
            kept.push(keep);
            if kept.len() == KEPT_AT_MOST {
                // Within a default `RLIMIT_NOFILE` of 1,024.
                let kept = std::mem::take(&mut kept);
                let what = "a storm call's fd was never closed";
                tokio::task::spawn_blocking(move || all_closed(kept, what))
                    .await
                    .unwrap();
            }
        }
        eprintln!("answered {answered} of {}", storm.rounds);
        // The placement of a call dropped here is acknowledged by a message of the worker's
        // own once it drops the request or is done with it, which may come after the reply to
        // a later call: only a reply sent once the worker is done with every call before it
        // is sure to carry it.
        let what = "a storm call's fd was never closed";
        tokio::task::spawn_blocking(move || all_closed(kept, what))
            .await
            .unwrap();
        let (tag, data) = storm_round(3, storm.rounds);
        let (_keep, sent) = pipe();
        let Echoed {
            tag: back_tag,
            data: back,
            ..
        } = camera.echo(tag, sent, data.clone()).await.unwrap();
        assert_eq!(back_tag, tag);
        assert!(back == data);
        assert_ne!(conn.release_shared_memory(), 0, "the lane stayed busy");
        drop((camera, conn));
        assert!(matches!(worker.wait().unwrap(), Exit::Code(0)));
    });
    drop(rt);
    before.assert_nothing_new();
}

/// The blocking twin: calls to an async worker that time out at random moments.
#[test]
fn blocking_calls_to_an_async_worker_timing_out_at_random_get_their_own_replies() {
    blocking_calls_timing_out_at_random("child_async_camera");
}

/// As above, against a blocking worker.
#[test]
fn blocking_calls_to_a_blocking_worker_timing_out_at_random_get_their_own_replies() {
    blocking_calls_timing_out_at_random("child_blocking_camera");
}

/// As above, against an async worker running a blocking implementation on the pool.
#[test]
fn blocking_calls_to_a_pooled_worker_timing_out_at_random_get_their_own_replies() {
    blocking_calls_timing_out_at_random("child_pooled_camera");
}

fn blocking_calls_timing_out_at_random(worker_test: &str) {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (mut worker, conn) = Worker::spawn(child(worker_test)).unwrap();
    conn.lend_pages_to_peer(true);
    let camera = blocking::CameraClient::new(conn.clone());
    let mut storm = Storm::new(1000);
    let mut answered = 0;
    // A request too large for one datagram (inline: its lane busy) whose timeout passed
    // while it waited for room, part of it sent: the connection is then shut down, as
    // `Connection::call` documents, and the next call fails with `Disconnected`.
    let mut maybe_cut_off = false;
    for round in 0..storm.rounds {
        let x = storm.next();
        let (tag, data) = storm_round(x, round);
        let (keep, sent) = pipe();
        let sent_ino = nix::sys::stat::fstat(&sent).unwrap().st_ino;
        let timed = camera.with_timeout(Duration::from_micros(1 + (x >> 40) % 100));
        let large = data.len() > ONE_DATAGRAM;
        match timed.echo(tag, sent, data.clone()) {
            Ok(Echoed {
                tag: back_tag,
                fd,
                data: back,
            }) => {
                assert_eq!(back_tag, tag, "round {round}: another call's reply");
                assert!(back == data, "round {round}: another call's string");
                let ino = nix::sys::stat::fstat(&fd).unwrap().st_ino;
                assert_eq!(ino, sent_ino, "round {round}: another call's fd");
                answered += 1;
                maybe_cut_off = false;
            }
            Err(Error::TimedOut) => maybe_cut_off = large,
            Err(Error::Disconnected) if maybe_cut_off => {
                eprintln!("round {round}: the last request was cut off part-way (documented)");
                drop(keep);
                drop((timed, camera, conn));
                worker.wait().unwrap();
                drop(worker);
                before.assert_nothing_new();
                return;
            }
            Err(e) => panic!("round {round}: {e}"),
        }
        drop(keep);
    }
    eprintln!("answered {answered} of {}", storm.rounds);
    let (tag, data) = storm_round(3, storm.rounds);
    let (keep, sent) = pipe();
    let Echoed {
        tag: back_tag,
        data: back,
        ..
    } = camera.echo(tag, sent, data.clone()).unwrap();
    drop(keep);
    assert_eq!(back_tag, tag);
    assert!(back == data);
    drop((camera, conn));
    assert!(matches!(worker.wait().unwrap(), Exit::Code(0)));
    drop(worker);
    before.assert_nothing_new();
}
