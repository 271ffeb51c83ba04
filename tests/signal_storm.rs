//! Signals whose handler was installed without `SA_RESTART`, arriving all the time in both
//! processes while a representative workload runs through generated stubs: every system call
//! typed-ipc makes must try again after `EINTR`, or turn it into the right outcome (a deadline
//! kept, not started afresh; a timeout still honoured). Real programs have such handlers:
//! profilers (`SIGPROF`), `SIGCHLD` or `SIGUSR1` handlers installed with `sigaction` flags 0,
//! runtimes that preempt their threads with a signal.
//!
//! A storm ([`SignalStorm`]) is a thread that sends `SIGUSR1` to every other thread of its
//! process, over and over, until stopped; the handler only counts. The parent runs one while it
//! calls a worker (this test binary run again for one `#[ignore]`d test), which runs its own.
//! Every result is checked byte for byte, no call may fail, and no fd is left open. Nothing
//! waits on time but the hang guards; what a signal interrupts varies from run to run, the
//! outcome does not.

mod common;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{
    accept, checksum, child, fd_count_lock, fd_snapshot, filled, listening_for_one, memfd,
    read_all, wait_until,
};
use nix::sys::socket::UnixAddr;
use typed_ipc::shared_buffer::SealedBuffer;
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, Error, Limits, Listener, Server, SharedBytes, Socket};

/// Rounds of the workload in each flavour: a few seconds under the storms.
const ROUNDS: u64 = 6;

/// Tells a worker to take strings inline: its socket (and the parent's) accepts no fds, so
/// neither end places a string in a region, pipes or writes one.
const INLINE: &str = "TYPED_IPC_TEST_STORM_INLINE";

/// Longer than any wait of these tests should take: a wait this long has failed anyway.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Signals handled so far in this process.
static HANDLED: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_signal(_: libc::c_int) {
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

/// Installs [`count_signal`] for `SIGUSR1` without `SA_RESTART`: a system call it interrupts
/// fails with `EINTR` instead of starting again (and some, `poll` among them, always do).
fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid one (flags 0, so no SA_RESTART; an empty
        // mask); `count_signal` only adds to an atomic, which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = count_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            assert_eq!(
                libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()),
                0
            );
        }
    });
}

/// The threads of this process.
fn threads() -> Vec<libc::pid_t> {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Sends `SIGUSR1` to thread `tid` of this process: whether it was sent (not if the thread has
/// ended meanwhile).
fn signal(tid: libc::pid_t) -> bool {
    // SAFETY: getpid has no preconditions; tgkill only sends a signal, whose handler
    // (`count_signal`) is installed, to a thread of this process (none if it has ended).
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) == 0 }
}

/// A thread that sends `SIGUSR1` to every other thread of this process, threads started
/// meanwhile too, over and over, until stopped.
struct SignalStorm {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl SignalStorm {
    fn start() -> SignalStorm {
        install_handler();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                // SAFETY: gettid has no preconditions.
                let me = unsafe { libc::gettid() };
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) {
                    for tid in threads().into_iter().filter(|&tid| tid != me) {
                        sent += u64::from(signal(tid));
                    }
                    // Gives way to the threads it signals, on a machine of few CPUs.
                    std::thread::yield_now();
                }
                sent
            }
        });
        SignalStorm {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the storm; how many signals it sent.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("running").join().unwrap()
    }
}

impl Drop for SignalStorm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

mod blocking {
    use std::os::fd::OwnedFd;
    use typed_ipc::SharedBytes;
    use typed_ipc::shared_buffer::SealedBuffer;

    /// What the workload calls.
    #[typed_ipc::interface]
    pub trait Work {
        /// `n` times a constant.
        fn echo(&self, n: u64) -> u64;
        /// What each of `files` holds.
        fn contents(&self, files: Vec<OwnedFd>) -> Vec<Vec<u8>>;
        /// A memfd holding `filled(len, seed)`.
        fn file(&self, len: u64, seed: u64) -> OwnedFd;
        /// The checksum of `data`.
        fn sum(&self, data: Vec<u8>) -> u64;
        /// The checksum of `data` (piped, where both ends lend their pages).
        fn sum_shared(&self, data: SharedBytes) -> u64;
        /// `filled(len, seed)`.
        fn make(&self, len: u64, seed: u64) -> Vec<u8>;
        /// The checksum of `buffer`.
        fn measure(&self, buffer: SealedBuffer) -> u64;
        /// A sealed buffer holding `filled(len, seed)`.
        fn make_sealed(&self, len: u64, seed: u64) -> SealedBuffer;
        /// Keeps the checksum of `data`.
        #[oneway]
        fn feed(&self, data: Vec<u8>);
        /// The checksums kept so far, in order; forgets them.
        fn fed(&self) -> Vec<u64>;
        /// Returns `key` once [`Work::release`] has released it.
        fn wait_for(&self, key: u32) -> u32;
        /// Releases the callers of `wait_for(key)`.
        fn release(&self, key: u32);
        /// Signals this process has handled so far.
        fn signals_handled(&self) -> u64;
    }
}

#[cfg(feature = "tokio")]
mod asynchronous {
    use std::os::fd::OwnedFd;
    use typed_ipc::SharedBytes;
    use typed_ipc::shared_buffer::SealedBuffer;

    /// [`crate::blocking::Work`], in the async flavour (the same interface on the wire).
    #[typed_ipc::interface]
    pub trait Work {
        async fn echo(&self, n: u64) -> u64;
        async fn contents(&self, files: Vec<OwnedFd>) -> Vec<Vec<u8>>;
        async fn file(&self, len: u64, seed: u64) -> OwnedFd;
        async fn sum(&self, data: Vec<u8>) -> u64;
        async fn sum_shared(&self, data: SharedBytes) -> u64;
        async fn make(&self, len: u64, seed: u64) -> Vec<u8>;
        async fn measure(&self, buffer: SealedBuffer) -> u64;
        async fn make_sealed(&self, len: u64, seed: u64) -> SealedBuffer;
        #[oneway]
        async fn feed(&self, data: Vec<u8>);
        async fn fed(&self) -> Vec<u64>;
        async fn wait_for(&self, key: u32) -> u32;
        async fn release(&self, key: u32);
        async fn signals_handled(&self) -> u64;
    }
}

/// What `echo` multiplies by.
const ECHO: u64 = 0x9e37_79b9_7f4a_7c15;

#[derive(Default)]
struct WorkImpl {
    fed: Mutex<Vec<u64>>,
    released: Mutex<Vec<u32>>,
    changed: Condvar,
    #[cfg(feature = "tokio")]
    notify: tokio::sync::Notify,
}

impl WorkImpl {
    fn release_key(&self, key: u32) {
        self.released.lock().unwrap().push(key);
        self.changed.notify_all();
        #[cfg(feature = "tokio")]
        self.notify.notify_waiters();
    }
}

fn sealed(len: u64, seed: u64) -> SealedBuffer {
    SealedBuffer::copy_from(&filled(len as usize, seed)).unwrap()
}

impl blocking::Work for WorkImpl {
    fn echo(&self, n: u64) -> u64 {
        n.wrapping_mul(ECHO)
    }
    fn contents(&self, files: Vec<OwnedFd>) -> Vec<Vec<u8>> {
        files.into_iter().map(read_all).collect()
    }
    fn file(&self, len: u64, seed: u64) -> OwnedFd {
        memfd(&filled(len as usize, seed))
    }
    fn sum(&self, data: Vec<u8>) -> u64 {
        checksum(&data)
    }
    fn sum_shared(&self, data: SharedBytes) -> u64 {
        checksum(&data)
    }
    fn make(&self, len: u64, seed: u64) -> Vec<u8> {
        filled(len as usize, seed)
    }
    fn measure(&self, buffer: SealedBuffer) -> u64 {
        checksum(&buffer)
    }
    fn make_sealed(&self, len: u64, seed: u64) -> SealedBuffer {
        sealed(len, seed)
    }
    fn feed(&self, data: Vec<u8>) {
        self.fed.lock().unwrap().push(checksum(&data));
    }
    fn fed(&self) -> Vec<u64> {
        std::mem::take(&mut *self.fed.lock().unwrap())
    }
    fn wait_for(&self, key: u32) -> u32 {
        let mut released = self.released.lock().unwrap();
        while !released.contains(&key) {
            released = self.changed.wait(released).unwrap();
        }
        key
    }
    fn release(&self, key: u32) {
        self.release_key(key);
    }
    fn signals_handled(&self) -> u64 {
        HANDLED.load(Ordering::Relaxed)
    }
}

#[cfg(feature = "tokio")]
impl asynchronous::Work for WorkImpl {
    async fn echo(&self, n: u64) -> u64 {
        blocking::Work::echo(self, n)
    }
    async fn contents(&self, files: Vec<OwnedFd>) -> Vec<Vec<u8>> {
        blocking::Work::contents(self, files)
    }
    async fn file(&self, len: u64, seed: u64) -> OwnedFd {
        blocking::Work::file(self, len, seed)
    }
    async fn sum(&self, data: Vec<u8>) -> u64 {
        checksum(&data)
    }
    async fn sum_shared(&self, data: SharedBytes) -> u64 {
        checksum(&data)
    }
    async fn make(&self, len: u64, seed: u64) -> Vec<u8> {
        filled(len as usize, seed)
    }
    async fn measure(&self, buffer: SealedBuffer) -> u64 {
        checksum(&buffer)
    }
    async fn make_sealed(&self, len: u64, seed: u64) -> SealedBuffer {
        sealed(len, seed)
    }
    async fn feed(&self, data: Vec<u8>) {
        blocking::Work::feed(self, data)
    }
    async fn fed(&self) -> Vec<u64> {
        blocking::Work::fed(self)
    }
    async fn wait_for(&self, key: u32) -> u32 {
        loop {
            let mut notified = std::pin::pin!(self.notify.notified());
            notified.as_mut().enable();
            if self.released.lock().unwrap().contains(&key) {
                return key;
            }
            notified.await;
        }
    }
    async fn release(&self, key: u32) {
        self.release_key(key);
    }
    async fn signals_handled(&self) -> u64 {
        HANDLED.load(Ordering::Relaxed)
    }
}

/// Limits that accept no fds: a connection whose both ends have them sends every string
/// inline, in datagrams of the socket.
fn no_fds() -> Limits {
    Limits {
        max_fds: 0,
        ..Limits::default()
    }
}

/// Whether this worker was told to take strings inline ([`INLINE`]).
fn inline() -> bool {
    std::env::var_os(INLINE).is_some()
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_work() {
    let storm = SignalStorm::start();
    let connection = if inline() {
        let mut socket = worker::socket().unwrap();
        socket.set_limits(no_fds());
        Connection::new(socket)
    } else {
        let connection = worker::connection().unwrap();
        connection.lend_pages_to_peer(true);
        connection
    };
    // Threads, so that `release` runs while `wait_for` waits.
    Server::new()
        .service(blocking::WorkServer::new(WorkImpl::default()))
        .threads(4)
        .serve(&connection)
        .unwrap();
    assert!(storm.stop() > 0);
}

#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_async_work() {
    let storm = SignalStorm::start();
    common::current_thread_runtime().block_on(async {
        let connection = typed_ipc::tokio::worker::connection().unwrap();
        connection.lend_pages_to_peer(true);
        asynchronous::WorkServer::new(WorkImpl::default())
            .serve(connection)
            .await
            .unwrap();
    });
    assert!(storm.stop() > 0);
}

/// Sizes of the byte strings of the workload: inline in a first datagram; through the
/// region, or inline in several datagrams; written into the worker's memory, or piped
/// (from 128 KiB, up to 256 KiB); written (up to 1 MiB); through the region.
const SIZES: [usize; 5] = [3_000, 70_000, 200_000, 700_000, 1_100_000];

/// The contents of file `j` of round `round`.
fn file_contents(round: u64, j: u64) -> Vec<u8> {
    filled(100 + (j as usize) * 1000, round * 10 + j)
}

/// What one round feeds: its checksums, in order.
fn fed_in(round: u64) -> Vec<u64> {
    (0..SIZES.len() as u64)
        .map(|i| checksum(&filled(SIZES[i as usize], round * 100 + i)))
        .collect()
}

/// Strings the size of which a call pipes (128 KiB to 256 KiB, below what it writes into the
/// worker), each with its checksum: many, since a signal interrupts a read of the pipe only
/// in a short window.
fn pipe_strings(round: u64) -> Vec<(SharedBytes, u64)> {
    let all = SharedBytes::from(filled(400_000, round));
    (0..16)
        .map(|k| {
            let bytes = all.slice(k * 4099..k * 4099 + 140_000 + k * 1000);
            let sum = checksum(&bytes);
            (bytes, sum)
        })
        .collect()
}

/// Sums [`pipe_strings`] with `sum_shared`, checking each.
fn pipe_burst(round: u64, sum_shared: impl Fn(SharedBytes) -> u64) {
    for (bytes, want) in pipe_strings(round) {
        assert_eq!(sum_shared(bytes), want, "piped, round {round}");
    }
}

/// One round of the workload, the blocking flavour; `fds`: the connection carries fds
/// (strings go through its lane too), else only strings, inline.
fn blocking_round(work: &blocking::WorkClient, round: u64, fds: bool) {
    for n in round * 8..round * 8 + 8 {
        assert_eq!(work.echo(n).unwrap(), n.wrapping_mul(ECHO));
    }
    for (i, &len) in SIZES.iter().enumerate() {
        let seed = round * 100 + i as u64;
        let data = filled(len, seed);
        let want = checksum(&data);
        work.feed(data.clone()).unwrap();
        assert_eq!(
            work.sum(data.clone()).unwrap(),
            want,
            "{len} B, round {round}"
        );
        assert_eq!(work.make(len as u64, seed).unwrap(), data, "{len} B back");
        if fds {
            let shared = SharedBytes::from(data.clone());
            assert_eq!(work.sum_shared(shared).unwrap(), want, "{len} B shared");
            let buffer = SealedBuffer::copy_from(&data).unwrap();
            assert_eq!(work.measure(buffer).unwrap(), want, "{len} B sealed");
            let back = work.make_sealed(len as u64, seed).unwrap();
            assert_eq!(&back[..], &data[..], "{len} B sealed back");
        }
    }
    if fds {
        pipe_burst(round, |bytes| work.sum_shared(bytes).unwrap());
        let files = (0..3).map(|j| memfd(&file_contents(round, j))).collect();
        let want: Vec<_> = (0..3).map(|j| file_contents(round, j)).collect();
        assert_eq!(work.contents(files).unwrap(), want);
        let file = work.file(5000, round).unwrap();
        assert_eq!(read_all(file), filled(5000, round));
    }
    assert_eq!(
        work.fed().unwrap(),
        fed_in(round),
        "round {round}'s oneways"
    );
}

/// A call that times out under the storm does (the method waits until released), and the
/// connection goes on.
fn blocking_timeout(work: &blocking::WorkClient, key: u32) {
    let quick = work.with_timeout(Duration::from_millis(30));
    assert!(matches!(quick.wait_for(key), Err(Error::TimedOut)));
    work.release(key).unwrap();
    let guarded = work.with_timeout(HANG_GUARD);
    assert_eq!(guarded.wait_for(key).unwrap(), key);
    assert_eq!(guarded.echo(7).unwrap(), 7u64.wrapping_mul(ECHO));
}

/// A unique abstract socket name for this process.
fn abstract_name(what: &str) -> String {
    format!("typed-ipc-test-storm-{what}-{}", std::process::id())
}

/// Clients connect to a listener and call it, under the storm.
fn blocking_listener(clients: u64) {
    let name = abstract_name("listener");
    let listener = Listener::bind_abstract(&name).unwrap();
    let serving = std::thread::spawn(move || {
        for _ in 0..clients {
            let connection = Connection::new(listener.accept().unwrap());
            blocking::WorkServer::new(WorkImpl::default())
                .serve(connection)
                .unwrap();
        }
    });
    for n in 0..clients {
        let work = blocking::WorkClient::new(Connection::connect_abstract(&name).unwrap());
        assert_eq!(work.echo(n).unwrap(), n.wrapping_mul(ECHO));
        let data = filled(300_000, n);
        assert_eq!(work.sum(data.clone()).unwrap(), checksum(&data));
    }
    serving.join().unwrap();
}

#[test]
fn blocking_calls_get_every_result_right_under_signal_storms_in_both_processes() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let handled = HANDLED.load(Ordering::Relaxed);
    let storm = SignalStorm::start();
    let (mut lane_worker, connection) = Worker::spawn(child("child_work")).unwrap();
    connection.lend_pages_to_peer(true);
    let work = blocking::WorkClient::new(connection);
    for round in 0..ROUNDS {
        blocking_round(&work, round, true);
    }
    blocking_timeout(&work, 1);
    assert!(work.signals_handled().unwrap() > 0, "the worker's storm");
    drop(work);
    assert_eq!(lane_worker.wait().unwrap(), Exit::Code(0));
    drop(lane_worker);

    let mut command = child("child_work");
    command.env(INLINE, "1");
    let (mut inline_worker, mut socket) = Worker::spawn_socket(command).unwrap();
    socket.set_limits(no_fds());
    // Every call with a deadline: its waits are polls, which a signal always interrupts.
    let work = blocking::WorkClient::new(Connection::new(socket)).with_timeout(HANG_GUARD);
    for round in 0..ROUNDS / 2 {
        blocking_round(&work, round, false);
    }
    blocking_timeout(&work, 2);
    drop(work);
    let exit = inline_worker.wait_timeout(HANG_GUARD).unwrap();
    assert_eq!(exit, Some(Exit::Code(0)));
    drop(inline_worker);

    blocking_listener(8);
    assert!(storm.stop() > 0);
    assert!(
        HANDLED.load(Ordering::Relaxed) > handled,
        "this process's storm"
    );
    before.assert_nothing_new();
}

/// One round of the workload, the async flavour.
#[cfg(feature = "tokio")]
async fn async_round(work: &asynchronous::WorkClient, round: u64) {
    for n in round * 8..round * 8 + 8 {
        assert_eq!(work.echo(n).await.unwrap(), n.wrapping_mul(ECHO));
    }
    for (i, &len) in SIZES.iter().enumerate() {
        let seed = round * 100 + i as u64;
        let data = filled(len, seed);
        let want = checksum(&data);
        work.feed(data.clone()).await.unwrap();
        assert_eq!(work.sum(data.clone()).await.unwrap(), want, "{len} B");
        assert_eq!(
            work.make(len as u64, seed).await.unwrap(),
            data,
            "{len} B back"
        );
        let shared = SharedBytes::from(data.clone());
        assert_eq!(
            work.sum_shared(shared).await.unwrap(),
            want,
            "{len} B shared"
        );
        let buffer = SealedBuffer::copy_from(&data).unwrap();
        assert_eq!(work.measure(buffer).await.unwrap(), want, "{len} B sealed");
        let back = work.make_sealed(len as u64, seed).await.unwrap();
        assert_eq!(&back[..], &data[..], "{len} B sealed back");
    }
    for (bytes, want) in pipe_strings(round) {
        assert_eq!(work.sum_shared(bytes).await.unwrap(), want, "piped");
    }
    let files = (0..3).map(|j| memfd(&file_contents(round, j))).collect();
    let want: Vec<_> = (0..3).map(|j| file_contents(round, j)).collect();
    assert_eq!(work.contents(files).await.unwrap(), want);
    let file = work.file(5000, round).await.unwrap();
    assert_eq!(read_all(file), filled(5000, round));
    assert_eq!(
        work.fed().await.unwrap(),
        fed_in(round),
        "round {round}'s oneways"
    );
}

#[cfg(feature = "tokio")]
#[test]
fn async_calls_get_every_result_right_under_signal_storms_in_both_processes() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let handled = HANDLED.load(Ordering::Relaxed);
    let storm = SignalStorm::start();
    common::two_worker_runtime().block_on(async {
        let (mut worker, connection) =
            typed_ipc::tokio::worker::spawn(child("child_async_work")).unwrap();
        connection.lend_pages_to_peer(true);
        let work = asynchronous::WorkClient::new(connection.clone());
        for round in 0..ROUNDS {
            async_round(&work, round).await;
        }
        let quick = work.with_timeout(Duration::from_millis(30));
        assert!(matches!(quick.wait_for(1).await, Err(Error::TimedOut)));
        work.release(1).await.unwrap();
        assert_eq!(work.wait_for(1).await.unwrap(), 1);
        assert!(
            work.signals_handled().await.unwrap() > 0,
            "the worker's storm"
        );
        drop(work);
        connection.close();
        let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
        assert_eq!(exit, Exit::Code(0));
        drop(worker);
    });
    assert!(storm.stop() > 0);
    assert!(
        HANDLED.load(Ordering::Relaxed) > handled,
        "this process's storm"
    );
    before.assert_nothing_new();
}

/// The state letter of thread `tid` of this process (`/proc/.../stat`) and the system call
/// it is in, if any (`/proc/.../syscall`).
fn state_of(tid: libc::pid_t) -> (Option<char>, Option<libc::c_long>) {
    let task = format!("/proc/self/task/{tid}");
    let stat = std::fs::read_to_string(format!("{task}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(") ")
        .next()
        .and_then(|rest| rest.chars().next());
    let syscall = std::fs::read_to_string(format!("{task}/syscall")).unwrap_or_default();
    let syscall = syscall.split(' ').next().and_then(|n| n.parse().ok());
    (state, syscall)
}

/// Whether thread `tid` sleeps in `connect`.
fn sleeps_in_connect(tid: libc::pid_t) -> bool {
    state_of(tid) == (Some('S'), Some(libc::SYS_connect))
}

/// A `connect` that waits for room in a listener's queue is interrupted by a signal, and goes
/// on waiting: it connects once the listener takes a client, as if nothing had happened.
#[test]
fn a_connect_waiting_for_room_goes_on_after_a_signal() {
    let _fds = fd_count_lock();
    install_handler();
    let name = abstract_name("full-queue");
    let listener = listening_for_one(&UnixAddr::new_abstract(name.as_bytes()).unwrap());
    let queued = Socket::connect_abstract(&name).unwrap();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let connecting = std::thread::spawn({
        let name = name.clone();
        move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            Socket::connect_abstract(&name)
        }
    });
    let tid = tid_rx.recv().unwrap();
    wait_until("the connect waits", || sleeps_in_connect(tid));
    let handled = HANDLED.load(Ordering::Relaxed);
    assert!(signal(tid));
    // Until the signal is handled and the connect waits again, or has returned (failed).
    wait_until("the signal is handled", || {
        connecting.is_finished()
            || HANDLED.load(Ordering::Relaxed) > handled && sleeps_in_connect(tid)
    });
    let first = accept(&listener);
    let connected = connecting
        .join()
        .unwrap()
        .expect("connected after the signal");
    let second = accept(&listener);
    drop((queued, connected, first, second));
}

/// A `connect_timeout` that waits for room in a listener's queue under a storm of signals
/// times out, at its deadline: neither failing at the first signal nor waiting afresh after
/// each.
#[test]
fn a_connect_timeout_waiting_for_room_times_out_under_a_signal_storm() {
    let _fds = fd_count_lock();
    let name = abstract_name("full-queue-timeout");
    let listener = listening_for_one(&UnixAddr::new_abstract(name.as_bytes()).unwrap());
    let queued = Socket::connect_abstract(&name).unwrap();
    let storm = SignalStorm::start();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let connecting = std::thread::spawn(move || {
        let result = Socket::connect_abstract_timeout(&name, Duration::from_millis(200));
        done_tx.send(()).unwrap();
        result
    });
    // A connect that waited afresh after each signal would never return.
    done_rx
        .recv_timeout(HANG_GUARD)
        .expect("the connect timed out");
    let result = connecting.join().unwrap();
    assert!(storm.stop() > 0);
    assert!(matches!(result, Err(Error::TimedOut)), "{result:?}");
    drop((queued, listener));
}

/// A datagram of no bytes, which no message is, is told apart from the peer's hang-up while
/// signals come: by a `poll` that does not wait, which fails with `EINTR` when a signal comes
/// while it looks (whatever the handler's flags), having found nothing.
#[test]
fn an_empty_datagram_is_not_taken_for_a_hang_up_under_a_signal_storm() {
    let _fds = fd_count_lock();
    let (ours, theirs) = Socket::pair().unwrap();
    let storm = SignalStorm::start();
    for i in 0..20_000 {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&theirs));
        nix::sys::socket::send(raw, &[], nix::sys::socket::MsgFlags::empty()).unwrap();
        match ours.recv() {
            Err(Error::Malformed(why)) => assert!(why.contains("no bytes"), "{why}"),
            other => panic!("datagram {i}: {other:?}"),
        }
    }
    assert!(storm.stop() > 0);
}
