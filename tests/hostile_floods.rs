//! A hostile peer that sends many messages, each of them valid, or leaves what it is sent
//! unread: what the runtime keeps for them, and how long it waits for them, must stay
//! bounded.
//!
//! Every test takes `fd_count_lock`, so that the ones that count `/proc/self/fd` or measure
//! resident memory see only their own fds and memory (some tests grow it by tens of MiB).

mod common;

use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::Duration;

use typed_ipc::{Connection, Error, Listener, Server, Socket, interface};

#[interface]
pub trait Flood {
    fn ping(&self, n: u64) -> u64;
    fn bytes(&self, data: Vec<u8>) -> Vec<u8>;
    #[oneway]
    fn slow(&self, data: Vec<u8>);
}

/// `slow` waits until the gate closes (its sender is dropped), if there is one.
struct Impl(std::sync::Mutex<Option<mpsc::Receiver<()>>>);

impl Flood for Impl {
    fn ping(&self, n: u64) -> u64 {
        n + 1
    }
    fn bytes(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
    fn slow(&self, _data: Vec<u8>) {
        if let Some(gate) = self.0.lock().unwrap().as_ref() {
            let _ = gate.recv();
        }
    }
}

fn ungated() -> Impl {
    Impl(Default::default())
}

/// How much a client that serves nothing may grow, flooded with requests: the requests held
/// up to the bounds (32 MiB) may stay resident once dropped (the allocator keeps what it
/// freed, and the other tests of this binary allocate meanwhile), with some slack for that;
/// far below the ~125 MiB it held before the bounds. (Checked at 32 MiB, a CI run once saw
/// 32,940 KiB.)
const RSS_AT_THE_BOUNDS_KIB: u64 = 48 << 10;

/// Resident memory of this process, KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// An envelope as a hostile peer writes it (`lane`: the lane word's top byte).
fn envelope(kind: u8, cmd: u32, cookie: u64, lane: u8) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, lane];
    m.extend_from_slice(&cmd.to_le_bytes());
    m.extend_from_slice(&cookie.to_le_bytes());
    m.extend_from_slice(&FLOOD_INFO.id.to_le_bytes());
    m.extend_from_slice(&FLOOD_INFO.signature.to_le_bytes());
    m
}

/// A message of 60 KiB: `kind` of command `cmd` (1 `bytes`, 2 `slow`) whose byte string
/// fills it, inline; the lane word says the sender reads no lanes, so replies come inline.
fn sixty_kib(kind: u8, cmd: u32) -> Vec<u8> {
    let mut m = envelope(kind, cmd, 0, 0);
    m.push(0);
    m.extend_from_slice(&((60u64 << 10) - 24 - 9).to_le_bytes());
    m.resize(60 << 10, 7);
    m
}

/// Sends `m` up to `n` times (a new cookie each) until a send would wait 2 s: how many went.
fn flood(socket: &Socket, m: &mut [u8], n: u64) -> u64 {
    for i in 0..n {
        m[8..16].copy_from_slice(&(i + 1).to_le_bytes());
        if socket.send_timeout(m, &[], Duration::from_secs(2)).is_err() {
            return i;
        }
    }
    n
}

/// `Flood` as `async fn`s: the same interface on the wire.
#[cfg(feature = "tokio")]
mod asynchronous {
    #[typed_ipc::interface]
    pub trait Flood {
        async fn ping(&self, n: u64) -> u64;
        async fn bytes(&self, data: Vec<u8>) -> Vec<u8>;
        #[oneway]
        async fn slow(&self, data: Vec<u8>);
    }

    #[typed_ipc::interface]
    pub trait Held {
        async fn held(&self) -> u64;
    }

    #[typed_ipc::interface]
    pub trait Replies {
        async fn big(&self, len: u64, pad: Vec<u8>) -> Vec<u8>;
    }
}
#[cfg(feature = "tokio")]
struct Async;
#[cfg(feature = "tokio")]
impl asynchronous::Flood for Async {
    async fn ping(&self, n: u64) -> u64 {
        n + 1
    }
    async fn bytes(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
    async fn slow(&self, _data: Vec<u8>) {}
}

/// Requests a hostile server sends to a client that serves nothing (up to 2,000 calls of
/// 60 KiB, the first 20 with 200 fds each) while the client waits for its reply: the client
/// must read them to find its reply, and nothing will ever run them. It holds them up to
/// its bounds (1,024 requests, 32 MiB, 4,096 fds), then ends the connection with an error
/// that says why, rather than hold more, and drops them, fds included. (Before the bounds,
/// every one was kept, with its fds, until the connection ended: 125 MiB and 4,000 fds.)
#[test]
fn a_client_that_serves_nothing_keeps_no_unsolicited_requests() {
    let _fds = common::fd_count_lock();
    let (ours, theirs) = Socket::pair().unwrap();
    let client = FloodClient::new(Connection::new(ours));
    let (fds_before, rss_before) = (common::open_fds(), rss_kib());
    std::thread::scope(|s| {
        let call = s.spawn(|| client.ping(1));
        let frame = theirs.recv().unwrap();
        let cookie = u64::from_le_bytes(frame.payload[8..16].try_into().unwrap());
        let fd = common::memfd(b"x");
        let mut sent = 0;
        for i in 0..2000u64 {
            let mut m = envelope(1, 0, 1000 + i, 0);
            m.resize(60 << 10, 0);
            let fds: Vec<_> = (0..if i < 20 { 200 } else { 0 })
                .map(|_| fd.as_fd())
                .collect();
            if theirs.send(&m, &fds).is_err() {
                break; // the client ended the connection
            }
            sent += 1;
        }
        let mut reply = envelope(3, 0, cookie, 0);
        reply.extend_from_slice(&2u64.to_le_bytes());
        let _ = theirs.send(&reply, &[]);
        let result = call.join().unwrap();
        assert!(
            matches!(&result, Err(Error::Malformed(why)) if why.contains("nothing serves")),
            "{result:?} after {sent} requests"
        );
        assert!(sent < 2000, "the client took all {sent} requests");
    });
    let (fds, grown) = (common::open_fds(), rss_kib().saturating_sub(rss_before));
    assert!(fds < fds_before + 100, "{fds_before} fds before, {fds} now");
    assert!(grown < RSS_AT_THE_BOUNDS_KIB, "RSS grew {grown} KiB");
}

/// Small requests held count what they are, not the buffer they were received into (room
/// for a whole datagram, 64 KiB): a client that serves nothing holds 900 small unsolicited
/// calls, under its bound of 1,024 requests, and still gets its reply. (When each held a
/// 64 KiB buffer, the 32 MiB bound ended the connection at the 512th.)
#[test]
fn small_requests_held_count_their_size_not_the_receive_buffer() {
    let _fds = common::fd_count_lock();
    let (ours, theirs) = Socket::pair().unwrap();
    let client = FloodClient::new(Connection::new(ours));
    std::thread::scope(|s| {
        let call = s.spawn(|| client.ping(1));
        let frame = theirs.recv().unwrap();
        let cookie = u64::from_le_bytes(frame.payload[8..16].try_into().unwrap());
        for i in 0..900u64 {
            let mut m = envelope(1, 0, 1000 + i, 0);
            m.extend_from_slice(&i.to_le_bytes());
            theirs.send(&m, &[]).unwrap();
        }
        let mut reply = envelope(3, 0, cookie, 0);
        reply.extend_from_slice(&2u64.to_le_bytes());
        theirs.send(&reply, &[]).unwrap();
        assert_eq!(call.join().unwrap().unwrap(), 2);
    });
}

/// The async flavour holds them up to the same bounds (`held`, in `tokio/connection/mod.rs`),
/// then ends the connection (126 MiB kept before the bounds).
#[cfg(feature = "tokio")]
#[test]
fn an_async_client_that_serves_nothing_keeps_no_unsolicited_requests() {
    let _fds = common::fd_count_lock();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (ours, theirs) = Socket::pair().unwrap();
    let client = {
        let _entered = runtime.enter();
        asynchronous::FloodClient::new(typed_ipc::tokio::AsyncConnection::new(ours).unwrap())
    };
    let rss_before = rss_kib();
    // While no call waits for a reply, the client stops reading at its bounds (a hostile
    // sender's sends wait); once one waits, it must read, so it ends the connection there.
    let call = runtime.spawn(async move { client.ping(1).await });
    let frame = theirs.recv().unwrap();
    let cookie = u64::from_le_bytes(frame.payload[8..16].try_into().unwrap());
    let mut sent = 0;
    for i in 0..2000u64 {
        let mut m = envelope(1, 0, 1000 + i, 0);
        m.resize(60 << 10, 0);
        if theirs.send(&m, &[]).is_err() {
            break; // the client ended the connection
        }
        sent += 1;
    }
    let mut reply = envelope(3, 0, cookie, 0);
    reply.extend_from_slice(&2u64.to_le_bytes());
    let _ = theirs.send(&reply, &[]);
    let result = runtime.block_on(call).unwrap();
    assert!(
        matches!(&result, Err(typed_ipc::Error::Malformed(why)) if why.contains("nothing serves")),
        "{result:?} after {sent} requests"
    );
    assert!(sent < 2000, "the client took all {sent} requests");
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < RSS_AT_THE_BOUNDS_KIB, "RSS grew {grown} KiB");
}

/// A client that sends calls and never reads a reply: the async server's reader stops at
/// its bounds (32 MiB of requests not finished, ~512 of these), since each request counts
/// until its reply is out. (It used to start a task for every request as it arrived and
/// never stop reading: 4,000 calls of 60 KiB grew RSS by 705 MiB.)
#[cfg(feature = "tokio")]
#[test]
fn an_async_server_stops_reading_a_client_that_reads_no_replies() {
    let _fds = common::fd_count_lock();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (ours, theirs) = Socket::pair().unwrap();
    {
        let _entered = runtime.enter();
        let conn = typed_ipc::tokio::AsyncConnection::new(theirs).unwrap();
        runtime.spawn(conn.serve(asynchronous::FloodServer::new(Async)));
    }
    let sent = flood(&ours, &mut sixty_kib(1, 1), 4000);
    assert!(
        sent < 1000,
        "the server took {sent} calls of 60 KiB it cannot answer"
    );
}

/// The same client against the blocking server: its one thread, waiting for room to send a
/// reply, reads meanwhile (so that two ends each sending the other more than a socket buffer
/// holds both get through), but only up to the queue's bounds (32 MiB, ~512 of these): then
/// the client's sends wait: ~680 here, RSS up ~34 MiB. (Before it read while waiting, ~250.)
#[test]
fn a_server_waiting_to_send_reads_a_client_that_reads_no_replies_only_to_its_bounds() {
    let _fds = common::fd_count_lock();
    let rss_before = rss_kib();
    let (ours, theirs) = Socket::pair().unwrap();
    let server = std::thread::spawn(move || {
        Server::new()
            .service(FloodServer::new(ungated()))
            .serve(&Connection::new(theirs))
    });
    let sent = flood(&ours, &mut sixty_kib(1, 1), 4000);
    let grown = rss_kib().saturating_sub(rss_before);
    drop(ours);
    server.join().unwrap().unwrap();
    assert!(sent < 1000, "the server took {sent} calls of 60 KiB");
    assert!(grown < 96 << 10, "RSS grew {grown} KiB");
}

/// With a pool of threads, a oneway that takes its time leaves the other threads reading,
/// and every oneway they read is queued behind it (`state.oneways`): they stop reading at
/// the queue's bounds (32 MiB, ~512 of these). (4,000 of 60 KiB grew RSS by 245 MiB before.)
#[test]
fn a_pool_stops_reading_oneways_it_cannot_run() {
    let _fds = common::fd_count_lock();
    let (ours, theirs) = Socket::pair().unwrap();
    let (gate, closed) = mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        Server::new()
            .service(FloodServer::new(Impl(std::sync::Mutex::new(Some(closed)))))
            .threads(2)
            .serve(&Connection::new(theirs))
    });
    let sent = flood(&ours, &mut sixty_kib(2, 2), 4000);
    drop((gate, ours));
    server.join().unwrap().unwrap();
    assert!(sent < 1000, "the server queued {sent} oneways of 60 KiB");
}

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// The shutdown tests' `shutdown_stall_limit`: short, so that they do not wait the default
/// 5 s for the client that does not read, yet far from the guard above.
const STALL_LIMIT: Duration = Duration::from_millis(200);

/// Says it has started, then waits for its release before it replies.
#[interface]
pub trait Held {
    fn held(&self) -> u64;
}

struct HeldImpl {
    entered: mpsc::Sender<()>,
    release: std::sync::Mutex<mpsc::Receiver<()>>,
}

impl Held for HeldImpl {
    fn held(&self) -> u64 {
        let _ = self.entered.send(());
        let _ = self.release.lock().unwrap().recv();
        42
    }
}

/// A client that calls `bytes` with 64 MiB (inline: it reads no lanes, so the reply is
/// inline too, and cannot fit the socket) and never reads the reply: returned once the
/// reply has started (its first datagram is here, left unread).
fn a_client_that_reads_no_reply(name: &str) -> Socket {
    let hostile = Socket::connect_abstract(name).unwrap();
    let mut m = envelope(1, 1, 1, 0);
    m.push(0);
    m.extend_from_slice(&(64u64 << 20).to_le_bytes());
    m.resize(m.len() + (64 << 20), 1);
    hostile.send(&m, &[]).unwrap();
    let mut ready = [nix::poll::PollFd::new(
        hostile.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut ready, nix::poll::PollTimeout::NONE).unwrap();
    hostile
}

/// Whether the server shut `socket`'s connection down (this end can read no more: `POLLRDHUP`)
/// within `guard`.
fn cut_within(socket: &Socket, guard: Duration) -> bool {
    let rdhup = nix::poll::PollFlags::from_bits_retain(libc::POLLRDHUP);
    let mut fds = [nix::poll::PollFd::new(socket.as_fd(), rdhup)];
    let timeout = nix::poll::PollTimeout::try_from(guard).unwrap();
    loop {
        match nix::poll::poll(&mut fds, timeout) {
            Err(nix::errno::Errno::EINTR) => continue,
            polled => return polled.unwrap() > 0,
        }
    }
}

/// `Serving::shutdown` lets every call in flight send its reply, and a reply waits as long as
/// its client does not read: such a client kept `shutdown` (and `Serving`'s drop) from
/// returning until it hung up. Now a reply that has waited for room without any of it going
/// out for the server's limit (5 s by default; [`STALL_LIMIT`] here) gives up, and that
/// client's connection is shut down; a client that reads still gets the reply of its call in
/// flight, which here finishes only after that.
#[test]
fn shutdown_returns_although_a_client_does_not_read_its_reply() {
    let _fds = common::fd_count_lock();
    let before = common::fd_snapshot();
    let name = format!("typed-ipc-flood-{}", std::process::id());
    let (entered, started) = mpsc::channel();
    let (release, released) = mpsc::channel();
    let serving = Server::new()
        .service(FloodServer::new(ungated()))
        .service(HeldServer::new(HeldImpl {
            entered,
            release: std::sync::Mutex::new(released),
        }))
        .shutdown_stall_limit(STALL_LIMIT)
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    let good = HeldClient::new(Connection::connect_abstract(&name).unwrap());
    let in_flight = std::thread::spawn(move || good.held());
    started.recv().unwrap();
    let hostile = a_client_that_reads_no_reply(&name);
    let (done, shut) = mpsc::channel();
    std::thread::spawn(move || {
        serving.shutdown();
        let _ = done.send(());
    });
    let cut = cut_within(&hostile, HANG_GUARD);
    release.send(()).unwrap();
    let reply = in_flight.join().unwrap();
    let returned = shut.recv_timeout(HANG_GUARD).is_ok();
    drop(hostile); // lets the shutdown finish either way
    assert!(cut, "the client that does not read is still connected");
    assert_eq!(reply.unwrap(), 42, "the call in flight was answered");
    assert!(returned, "shutdown still waits");
    before.assert_nothing_new();
}

/// `Held` as an `async fn`: says it has started, then waits for its release.
#[cfg(feature = "tokio")]
struct AsyncHeld {
    entered: mpsc::Sender<()>,
    release: std::sync::Arc<tokio::sync::Semaphore>,
}
#[cfg(feature = "tokio")]
impl asynchronous::Held for AsyncHeld {
    async fn held(&self) -> u64 {
        let _ = self.entered.send(());
        let _ = self.release.acquire().await;
        42
    }
}

/// The async flavour waited for such a client in the same way (`AsyncServing::shutdown`
/// awaits every connection's tasks, the reply's among them), and bounds the wait the same way.
#[cfg(feature = "tokio")]
#[test]
fn async_shutdown_returns_although_a_client_does_not_read_its_reply() {
    use typed_ipc::tokio::{AsyncConnection, AsyncListener, AsyncServer};
    let _fds = common::fd_count_lock();
    let runtime = common::two_worker_runtime();
    let before = common::fd_snapshot();
    let name = format!("typed-ipc-async-flood-{}", std::process::id());
    let (entered, started) = mpsc::channel();
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let serving = {
        let _entered = runtime.enter();
        AsyncServer::new()
            .service(asynchronous::FloodServer::new(Async))
            .service(asynchronous::HeldServer::new(AsyncHeld {
                entered,
                release: release.clone(),
            }))
            .shutdown_stall_limit(STALL_LIMIT)
            .listen(AsyncListener::bind_abstract(&name).unwrap())
    };
    let connection = runtime
        .block_on(AsyncConnection::connect_abstract(&name))
        .unwrap();
    let good = asynchronous::HeldClient::new(connection.clone());
    let in_flight = runtime.spawn(async move { good.held().await });
    started.recv().unwrap();
    let hostile = a_client_that_reads_no_reply(&name);
    let shutdown = runtime.spawn(serving.shutdown());
    let cut = cut_within(&hostile, HANG_GUARD);
    release.add_permits(1);
    let reply = runtime.block_on(in_flight).unwrap();
    let returned = runtime.block_on(async { tokio::time::timeout(HANG_GUARD, shutdown).await });
    drop(hostile); // lets the shutdown finish either way
    connection.close();
    runtime.block_on(connection.wait_closed());
    drop(connection);
    assert!(cut, "the client that does not read is still connected");
    assert_eq!(reply.unwrap(), 42, "the call in flight was answered");
    assert!(returned.is_ok(), "shutdown still waits");
    before.assert_nothing_new();
}

/// `AsyncServing::shutdown` took the clients out of the `AsyncServing` before it waited for
/// their calls: a shutdown future dropped meanwhile (under `tokio::time::timeout`, in a
/// `select!`) left the `AsyncServing`'s drop no client to hang up on, so a client that does
/// not read its reply kept its connection, and the server its task, for good. Now every
/// client the dropped shutdown had not finished with is hung up on at once.
#[cfg(feature = "tokio")]
#[test]
fn a_dropped_async_shutdown_hangs_up_on_the_clients_it_had_not_finished_with() {
    use std::future::Future;
    use std::task::Poll;
    use typed_ipc::tokio::{AsyncListener, AsyncServer};
    let _fds = common::fd_count_lock();
    let runtime = common::two_worker_runtime();
    let name = format!("typed-ipc-async-dropped-shutdown-{}", std::process::id());
    let serving = {
        let _entered = runtime.enter();
        AsyncServer::new()
            .service(asynchronous::FloodServer::new(Async))
            // The shutdown must still be waiting for the client that does not read when it
            // is dropped.
            .shutdown_stall_limit(Duration::from_secs(3600))
            .listen(AsyncListener::bind_abstract(&name).unwrap())
    };
    // A client served (its call answered) whose sends fail once the shutdown has taken the
    // clients and stopped reading from them: it tells when that has happened.
    let probe = Socket::connect_abstract(&name).unwrap();
    let mut call = envelope(1, 1, 9, 0); // bytes(vec![])
    call.push(0);
    call.extend_from_slice(&0u64.to_le_bytes());
    common::raw_call(&probe, &call, &[], 9);
    let mut oneway = envelope(2, 2, 0, 0); // slow(vec![])
    oneway.push(0);
    oneway.extend_from_slice(&0u64.to_le_bytes());
    let hostile = a_client_that_reads_no_reply(&name);
    let mut shutdown = Box::pin(serving.shutdown());
    runtime.block_on(async {
        let since = std::time::Instant::now();
        loop {
            let polled = std::future::poll_fn(|cx| Poll::Ready(shutdown.as_mut().poll(cx))).await;
            assert!(polled.is_pending(), "shutdown returned: it did not wait");
            if probe.send(&oneway, &[]).is_err() {
                break;
            }
            assert!(
                since.elapsed() < HANG_GUARD,
                "the shutdown never stopped reading"
            );
            tokio::task::yield_now().await;
        }
    });
    drop(shutdown);
    let rdhup = nix::poll::PollFlags::from_bits_retain(libc::POLLRDHUP);
    let mut fds = [nix::poll::PollFd::new(hostile.as_fd(), rdhup)];
    let cut = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap() > 0;
    drop((hostile, probe));
    drop(runtime);
    assert!(cut, "the client that does not read is still connected");
}

/// A byte string that announces more bytes than the message holds is refused with a reason
/// (it used to be "malformed message: io error: ", bincode's empty `UnexpectedEof`).
#[test]
fn a_byte_string_cut_short_is_refused_with_a_reason() {
    let _fds = common::fd_count_lock();
    let (ours, theirs) = Socket::pair().unwrap();
    let server =
        std::thread::spawn(move || Connection::new(theirs).serve(FloodServer::new(ungated())));
    let mut m = envelope(1, 1, 7, 0x80); // bytes(data)
    m.push(0); // inline
    m.extend_from_slice(&100u64.to_le_bytes()); // 100 bytes announced
    m.extend_from_slice(&[1; 10]); // 10 present
    let reply = common::raw_call(&ours, &m, &[], 7);
    let text = String::from_utf8_lossy(&reply[24..]).into_owned();
    assert_eq!(reply[0], 4, "a failure reply");
    assert!(!text.ends_with("io error: "), "{text:?}");
    drop(ours);
    server.join().unwrap().unwrap();
}

/// A zero-length datagram reads as the peer hanging up (`recvmsg` returns 0): `serve`
/// returns `Ok(())` and the calls after it get `Disconnected`, as if the peer had left.
#[test]
fn a_zero_length_datagram_is_malformed_not_a_hang_up() {
    let _fds = common::fd_count_lock();
    let (ours, theirs) = Socket::pair().unwrap();
    let server =
        std::thread::spawn(move || Connection::new(theirs).serve(FloodServer::new(ungated())));
    let raw = std::os::fd::AsRawFd::as_raw_fd(&ours.as_fd());
    nix::sys::socket::send(raw, &[], nix::sys::socket::MsgFlags::empty()).unwrap();
    let served = server.join().unwrap();
    assert!(
        matches!(served, Err(typed_ipc::Error::Malformed(_))),
        "serve returned {served:?}"
    );
}

/// Counts the oneways it runs.
#[cfg(feature = "tokio")]
struct Counting(std::sync::Arc<std::sync::atomic::AtomicU64>);
#[cfg(feature = "tokio")]
impl asynchronous::Flood for Counting {
    async fn ping(&self, n: u64) -> u64 {
        n + 1
    }
    async fn bytes(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
    async fn slow(&self, _data: Vec<u8>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An async connection that serves nothing yet, with no call of its own waiting for a reply,
/// stops reading at its bounds (the sender waits) rather than fail: the requests it holds
/// and those the sender still has all run once it serves.
#[cfg(feature = "tokio")]
#[test]
fn requests_past_the_bounds_wait_for_an_async_server_that_comes_later() {
    past_the_bounds_wait_for_an_async_server(false);
}

/// The same after a call of its own was answered: that call waits no more, so it does not
/// keep the reader reading past its bounds.
#[cfg(feature = "tokio")]
#[test]
fn requests_past_the_bounds_wait_for_an_async_server_after_a_call_was_answered() {
    past_the_bounds_wait_for_an_async_server(true);
}

#[cfg(feature = "tokio")]
fn past_the_bounds_wait_for_an_async_server(call_first: bool) {
    let _fds = common::fd_count_lock();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (ours, theirs) = Socket::pair().unwrap();
    let conn = {
        let _entered = runtime.enter();
        typed_ipc::tokio::AsyncConnection::new(theirs).unwrap()
    };
    if call_first {
        let stub = asynchronous::FloodClient::new(conn.clone());
        let call = runtime.spawn(async move { stub.ping(41).await });
        let request = ours.recv().unwrap();
        let cookie = u64::from_le_bytes(request.payload[8..16].try_into().unwrap());
        let mut reply = envelope(3, 0, cookie, 0);
        reply.extend_from_slice(&42u64.to_le_bytes());
        ours.send(&reply, &[]).unwrap();
        assert_eq!(runtime.block_on(call).unwrap().unwrap(), 42);
    }
    let mut m = sixty_kib(2, 2);
    let sent = flood(&ours, &mut m, 2000);
    assert!(
        sent < 1000,
        "{sent} oneways of 60 KiB taken with nothing serving"
    );
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let served = runtime.spawn(conn.serve(asynchronous::FloodServer::new(Counting(ran.clone()))));
    for i in sent..2000 {
        m[8..16].copy_from_slice(&(i + 1).to_le_bytes());
        ours.send(&m, &[]).unwrap();
    }
    drop(ours);
    runtime.block_on(served).unwrap().unwrap();
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 2000);
    drop(conn);
}

/// Answers callbacks in groups: each once as many as its barrier counts have arrived.
#[cfg(feature = "tokio")]
struct Gated(tokio::sync::Barrier);
#[cfg(feature = "tokio")]
impl asynchronous::Flood for Gated {
    async fn ping(&self, n: u64) -> u64 {
        self.0.wait().await;
        n + 1
    }
    async fn bytes(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
    async fn slow(&self, _data: Vec<u8>) {}
}

/// Calls its peer back for every call.
#[cfg(feature = "tokio")]
struct CallsBack(asynchronous::FloodClient);
#[cfg(feature = "tokio")]
impl asynchronous::Flood for CallsBack {
    async fn ping(&self, n: u64) -> u64 {
        self.0.ping(n).await.unwrap() + 1
    }
    async fn bytes(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
    async fn slow(&self, _data: Vec<u8>) {}
}

/// A reader that stops at its bounds must still read the replies its handlers' calls wait
/// for: here 1,200 calls (more than the 1,024 requests an end holds before it stops reading)
/// each call their caller back, and the callbacks are answered in groups of `GROUP` once a
/// whole group has arrived. The server holds all 1,200, each handler's call back waiting for
/// its reply; the client stops at its bound with its own calls waiting (they are not its
/// handlers'), and reads on as its handlers finish. (With one group of all 1,200, the
/// client's handlers would wait for requests past its bound, which nothing reads: the docs
/// say not to rely on that.)
#[cfg(feature = "tokio")]
#[test]
fn nested_callbacks_past_the_bounds_do_not_deadlock() {
    let _fds = common::fd_count_lock();
    const N: u64 = 1200;
    const GROUP: usize = 200;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (client, server) = {
        let _entered = runtime.enter();
        typed_ipc::tokio::AsyncConnection::pair().unwrap()
    };
    let callback = asynchronous::FloodClient::new(server.clone());
    server.add_service(asynchronous::FloodServer::new(CallsBack(callback)));
    let gate = tokio::sync::Barrier::new(GROUP);
    client.add_service(asynchronous::FloodServer::new(Gated(gate)));
    let stub = asynchronous::FloodClient::new(client.clone());
    let replies = runtime.block_on(async {
        let calls: Vec<_> = (0..N)
            .map(|n| {
                let stub = stub.clone();
                tokio::spawn(async move { stub.ping(n).await })
            })
            .collect();
        let mut replies = Vec::new();
        for call in calls {
            replies.push(call.await.unwrap().unwrap());
        }
        replies
    });
    assert!(replies.iter().zip(0..).all(|(&r, n)| r == n + 2));
    client.close();
    server.close();
}

/// `Flood` whose `ping` calls back into the peer and hands the outcome over, and whose
/// `slow` waits at `gate`.
struct PingsBack {
    peer: FloodClient,
    gate: Impl,
    outcome: std::sync::Mutex<mpsc::Sender<Result<u64, Error>>>,
}

impl Flood for PingsBack {
    fn ping(&self, n: u64) -> u64 {
        let outcome = self.peer.ping(n);
        let _ = self.outcome.lock().unwrap().send(outcome);
        n
    }
    fn bytes(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
    fn slow(&self, data: Vec<u8>) {
        self.gate.slow(data)
    }
}

/// A handler that calls back into its peer still reads its connection once the serving
/// threads have stopped reading at the bounds: the requests held may wait for the handler's
/// thread, and its reply may come after more requests. But a peer that keeps sending requests
/// instead makes it end the connection at twice the bounds, with an error that says how to
/// bound them. (A call that is not a handler's waits for room instead, with the serving
/// threads: `progress_during_a_call.rs`.)
#[test]
fn a_handler_calling_back_reads_past_the_bounds_up_to_twice_them() {
    let _fds = common::fd_count_lock();
    let (ours, theirs) = Socket::pair().unwrap();
    let (gate, closed) = mpsc::channel::<()>();
    let (outcome, outcomes) = mpsc::channel();
    let conn = Connection::new(theirs);
    let pings_back = PingsBack {
        peer: FloodClient::new(conn.clone()),
        gate: Impl(std::sync::Mutex::new(Some(closed))),
        outcome: std::sync::Mutex::new(outcome),
    };
    let server = std::thread::spawn({
        let conn = conn.clone();
        move || {
            Server::new()
                .service(FloodServer::new(pings_back))
                .threads(2)
                .serve(&conn)
        }
    });
    // A `ping` whose handler calls back, the call back left unanswered; then `slow`s: the
    // other thread waits at the gate in the first, and the rest are held.
    let mut ping = envelope(1, 0, 1, 0);
    ping.extend_from_slice(&1u64.to_le_bytes());
    ours.send(&ping, &[]).unwrap();
    ours.recv().unwrap(); // the call back
    let sent = flood(&ours, &mut sixty_kib(2, 2), 4000);
    assert!(sent < 4000, "the handler took {sent} oneways of 60 KiB");
    let outcome = outcomes.recv().unwrap();
    for what in [
        "while a handler of this end waited for a reply",
        "acknowledged by a call",
    ] {
        assert!(
            matches!(&outcome, Err(Error::Malformed(why)) if why.contains(what)),
            "{what:?}: {outcome:?} after {sent} oneways"
        );
    }
    drop(gate);
    assert!(matches!(server.join().unwrap(), Err(Error::Malformed(_))));
}

/// A request an async connection read and held before it served anything, for the second of
/// the services an `AsyncServer` serves it with, runs once they are served: the first
/// service's arrival must not dispatch it while the second is not there yet (it was refused as
/// not served, the caller told to fall back to an interface it need not).
#[cfg(feature = "tokio")]
#[test]
fn a_held_request_for_the_second_service_of_an_async_server_runs() {
    use typed_ipc::tokio::{AsyncConnection, AsyncServer};
    let _fds = common::fd_count_lock();
    let runtime = common::two_worker_runtime();
    let (ours, theirs) = Socket::pair().unwrap();
    let conn = {
        let _entered = runtime.enter();
        AsyncConnection::new(theirs).unwrap()
    };
    // A call of its own, answered after a request for `Held` is in the socket: once the call
    // returns, the reader has read that request and holds it for a service to come.
    let stub = asynchronous::FloodClient::new(conn.clone());
    let call = runtime.spawn(async move { stub.ping(41).await });
    let request = ours.recv().unwrap();
    let cookie = u64::from_le_bytes(request.payload[8..16].try_into().unwrap());
    let held_cookie = 7;
    let held = common::call_envelope(&asynchronous::HELD_INFO, 0, held_cookie);
    ours.send(&held, &[]).unwrap();
    let mut reply = envelope(3, 0, cookie, 0);
    reply.extend_from_slice(&42u64.to_le_bytes());
    ours.send(&reply, &[]).unwrap();
    assert_eq!(runtime.block_on(call).unwrap().unwrap(), 42);

    let (entered, started) = mpsc::channel();
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
    let server = AsyncServer::new()
        .service(asynchronous::FloodServer::new(Async))
        .service(asynchronous::HeldServer::new(AsyncHeld {
            entered,
            release,
        }));
    let served = {
        let _entered = runtime.enter();
        runtime.spawn(server.serve(&conn))
    };
    let answer = ours.recv().unwrap();
    assert_eq!(
        answer.payload[0],
        3,
        "a reply, not a failure: {:?}",
        String::from_utf8_lossy(&answer.payload)
    );
    assert_eq!(&answer.payload[8..16], &held_cookie.to_le_bytes());
    started.recv().unwrap();
    drop(ours);
    runtime.block_on(served).unwrap().unwrap();
    drop(conn);
}

/// Answers `big` with `len` bytes of 7 (`pad` only makes the request larger), counting the
/// handlers that ran.
#[cfg(feature = "tokio")]
struct Big(std::sync::Arc<std::sync::atomic::AtomicU64>);
#[cfg(feature = "tokio")]
impl asynchronous::Replies for Big {
    async fn big(&self, len: u64, _pad: Vec<u8>) -> Vec<u8> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        vec![7; len as usize]
    }
}

/// A client that sends calls each answered with 256 KiB and reads none of the replies: the
/// async server starts no handler once 16 MiB of replies wait to go out (`MAX_REPLY_BYTES`),
/// and the calls read meanwhile wait, holding their requests only, until the reader stops at
/// its bounds (1,024 requests). Every handler used to run, each reply waiting, encoded, with
/// the value its handler returned: 1,000 replies of 1 MiB grew a daemon's RSS by 1.9 GiB
/// (here 520 MiB). Once the client reads, every call is answered in full.
#[cfg(feature = "tokio")]
#[test]
fn an_async_server_starts_no_handler_past_its_budget_of_replies_a_client_does_not_read() {
    use std::sync::atomic::{AtomicU64, Ordering};
    const LEN: u64 = 256 << 10;
    let _fds = common::fd_count_lock();
    let _guard = common::abort_after("replies to a client that reads late", HANG_GUARD * 4);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rss_before = rss_kib();
    let (ours, theirs) = Socket::pair().unwrap();
    let ran = std::sync::Arc::new(AtomicU64::new(0));
    let served = {
        let _entered = runtime.enter();
        let conn = typed_ipc::tokio::AsyncConnection::new(theirs).unwrap();
        runtime.spawn(conn.serve(asynchronous::RepliesServer::new(Big(ran.clone()))))
    };
    // Lane word 0: this client reads no lanes, so the replies come inline.
    let mut m = common::call_envelope(&asynchronous::REPLIES_INFO, 0, 0);
    m[3] = 0;
    m.extend_from_slice(&LEN.to_le_bytes());
    // Padded to 16 KiB, so that the socket buffer (4 MiB) fills soon after the 1,024
    // requests the server's reader takes before it stops (16 MiB, within its bounds).
    m.push(0);
    m.extend_from_slice(&(16u64 << 10).to_le_bytes());
    m.resize(m.len() + (16 << 10), 1);
    // Until the server's reader has stopped (a send waits 2 s), having read 1,024 calls:
    // without the budget their handlers all ran meanwhile; with it, those held do not start
    // however long this waits, as long as nothing is read.
    let sent = flood(&ours, &mut m, 4000);
    let (grown, started) = (
        rss_kib().saturating_sub(rss_before),
        ran.load(Ordering::SeqCst),
    );
    assert!((1024..4000).contains(&sent), "the server took {sent} calls");
    // 16 MiB of replies waiting, 16 in the socket buffer, a few started as the budget was
    // reached: ~90 (it was every call taken, ~1,050).
    assert!(
        started <= 256,
        "{started} handlers ran for a client that reads no replies ({sent} calls)"
    );
    // The requests taken (16 MiB), the replies waiting (16 MiB) and the values their
    // handlers returned (as much again), with slack as for `RSS_AT_THE_BOUNDS_KIB`; it was
    // 520 MiB.
    assert!(grown < 80 << 10, "RSS grew {grown} KiB");
    // Read late, every reply comes, whole: the calls held start as the replies go out.
    let mut answered = vec![false; sent as usize];
    for _ in 0..sent {
        let reply = ours.recv().unwrap().payload;
        assert_eq!(reply[0], 3, "a reply, not a failure");
        let cookie = u64::from_le_bytes(reply[8..16].try_into().unwrap());
        assert!(!std::mem::replace(&mut answered[cookie as usize - 1], true));
        let body = &reply[24..];
        assert_eq!(body[0], 0, "inline");
        assert_eq!(body[1..9], LEN.to_le_bytes());
        assert!(body.len() == 9 + LEN as usize && body[9..].iter().all(|&b| b == 7));
    }
    assert_eq!(ran.load(Ordering::SeqCst), sent);
    drop(ours);
    runtime.block_on(served).unwrap().unwrap();
}
