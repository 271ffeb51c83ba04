//! `#[interface(async_server)]`: a blocking trait's implementation served on an async
//! connection, each call on tokio's blocking pool. Across processes it is driven in
//! `async_interop.rs` (fds, bytes, oneways in order, callbacks, peer death); here, in one
//! process, what is its own: calls run at once even on a current-thread runtime, the method
//! sees its caller, a panic is the caller's error, and a cancelled call's method runs to its
//! end without holding the connection up.

#![cfg(feature = "tokio")]

mod common;

use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{current_thread_runtime, fd_count_lock, fd_snapshot};
use typed_ipc::tokio::AsyncConnection;
use typed_ipc::{Error, current_peer};

/// A blocking interface, served by an async server; called through its async client.
#[typed_ipc::interface(async_server, async_client)]
pub trait Desk {
    /// Returns once `n` callers are in `meet` at the same time; false after `guard_ms` (the
    /// guard of a test that would otherwise hang, or the end of one where they cannot meet).
    fn meet(&self, n: u32, guard_ms: u64) -> bool;
    /// Waits until the test opens the gate; counts the return.
    fn wait_for_gate(&self);
    /// [`Desk::wait_for_gate`], holding `token` until it returns.
    fn wait_for_gate_holding(&self, token: OwnedFd);
    /// How many `wait_for_gate` calls have returned.
    fn returned(&self) -> u32;
    /// The pid of the caller, as the method sees it.
    fn caller_pid(&self) -> Option<i32>;
    fn panic(&self);
}

#[derive(Default)]
struct State {
    /// Callers in `meet` now, and the most there have been at once.
    meeting: u32,
    most_met: u32,
    waiting: u32,
    gate_open: bool,
    returned: u32,
}

/// The implementation: blocking waits on a condition variable.
#[derive(Default)]
struct Office {
    state: Mutex<State>,
    changed: Condvar,
}

impl Office {
    fn open_gate(&self) {
        self.state.lock().unwrap().gate_open = true;
        self.changed.notify_all();
    }

    /// Waits until `n` `wait_for_gate` calls have come to the gate (false after a minute).
    fn wait_until_waiting(&self, n: u32) -> bool {
        let state = self.state.lock().unwrap();
        let guard = Duration::from_millis(MINUTE);
        let (state, waited) = self
            .changed
            .wait_timeout_while(state, guard, |s| s.waiting < n)
            .unwrap();
        drop(state);
        !waited.timed_out()
    }

    /// Waits until `n` `wait_for_gate` calls have returned (false after a minute: the guard
    /// of a test that would otherwise hang).
    fn wait_until_returned(&self, n: u32) -> bool {
        let state = self.state.lock().unwrap();
        let guard = Duration::from_secs(60);
        let (state, waited) = self
            .changed
            .wait_timeout_while(state, guard, |s| s.returned < n)
            .unwrap();
        drop(state);
        !waited.timed_out()
    }
}

impl Desk for Office {
    fn meet(&self, n: u32, guard_ms: u64) -> bool {
        let mut state = self.state.lock().unwrap();
        state.meeting += 1;
        state.most_met = state.most_met.max(state.meeting);
        self.changed.notify_all();
        let guard = Duration::from_millis(guard_ms);
        // On the most ever in at once: a caller that has met and left does not make the
        // others wait again.
        let (mut state, waited) = self
            .changed
            .wait_timeout_while(state, guard, |s| s.most_met < n)
            .unwrap();
        state.meeting -= 1;
        !waited.timed_out()
    }
    fn wait_for_gate(&self) {
        let mut state = self.state.lock().unwrap();
        state.waiting += 1;
        self.changed.notify_all();
        let mut state = self.changed.wait_while(state, |s| !s.gate_open).unwrap();
        state.returned += 1;
        self.changed.notify_all();
    }
    fn wait_for_gate_holding(&self, token: OwnedFd) {
        self.wait_for_gate();
        drop(token);
    }
    fn returned(&self) -> u32 {
        self.state.lock().unwrap().returned
    }
    fn caller_pid(&self) -> Option<i32> {
        current_peer().map(|peer| peer.pid)
    }
    fn panic(&self) {
        panic!("the desk is on fire");
    }
}

/// The guard of a wait that only a failure makes long.
const MINUTE: u64 = 60_000;

/// What [`start`] returns: a client, the office its server answers with, the serving task.
type Started = (
    DeskAsyncClient,
    Arc<Office>,
    tokio::task::JoinHandle<typed_ipc::Result<()>>,
);

/// A client of an `Office` served by `DeskAsyncServer` on one end of a fresh pair.
fn start() -> Started {
    start_with(|server| server)
}

/// [`start`], the server first passed through `configure`.
fn start_with(
    configure: impl FnOnce(DeskAsyncServer<Office>) -> DeskAsyncServer<Office>,
) -> Started {
    let (client_end, server_end) = AsyncConnection::pair().unwrap();
    let office = Arc::new(Office::default());
    let server = configure(DeskAsyncServer::from_arc(Arc::clone(&office)));
    let serving = tokio::spawn(server.serve(server_end));
    (DeskAsyncClient::new(client_end), office, serving)
}

/// Whether three callers of `started`'s desk met (each waits `guard_ms` at most; all three
/// must say the same), once the server has seen the client hang up.
async fn three_meet((desk, _office, serving): Started, guard_ms: u64) -> bool {
    let (a, b, c) = tokio::join!(
        desk.meet(3, guard_ms),
        desk.meet(3, guard_ms),
        desk.meet(3, guard_ms)
    );
    let met = (a.unwrap(), b.unwrap(), c.unwrap());
    assert!(
        met == (true, true, true) || met == (false, false, false),
        "{met:?}"
    );
    drop(desk);
    serving.await.unwrap().unwrap();
    met.0
}

/// The async client and the pooled async server of a blocking trait are `Debug` whatever the
/// implementation is (`Office` is not), each naming its interface.
#[test]
fn the_async_client_and_server_of_a_blocking_trait_are_debug() {
    #[derive(Debug)]
    struct Front {
        desk: DeskAsyncClient,
        server: DeskAsyncServer<Office>,
    }
    // Its connection's and runtime's fds would move the count of the test that counts.
    let _fds = fd_count_lock();
    let runtime = current_thread_runtime();
    let _entered = runtime.enter();
    let (a, _b) = AsyncConnection::pair().unwrap();
    let front = Front {
        desk: DeskAsyncClient::new(a.clone()),
        server: DeskAsyncServer::new(Office::default()),
    };
    let desk =
        format!("DeskAsyncClient {{ interface: \"Desk\", connection: {a:?}, timeout: None }}");
    assert_eq!(format!("{:?}", front.desk), desk);
    let imp = std::any::type_name::<Office>();
    assert!(imp.ends_with("Office"), "{imp}");
    let server = format!("DeskAsyncServer {{ interface: \"Desk\", implementation: {imp:?}, .. }}");
    assert_eq!(format!("{:?}", front.server), server);
    assert_eq!(
        format!("{front:?}"),
        format!("Front {{ desk: {desk}, server: {server} }}")
    );
}

#[test]
fn blocking_methods_run_at_once_on_the_blocking_pool_even_on_a_current_thread_runtime() {
    // Its connection's and runtime's fds would move the count of the test that counts.
    let _fds = fd_count_lock();
    // Three callers meet only if their methods run at the same time: run on the runtime's
    // one thread, the first would block it, and the others would never start.
    current_thread_runtime().block_on(async {
        assert!(three_meet(start(), MINUTE).await);
    });
}

#[test]
fn a_blocking_method_sees_its_caller_on_the_blocking_pool() {
    // Its connection's and runtime's fds would move the count of the test that counts.
    let _fds = fd_count_lock();
    current_thread_runtime().block_on(async {
        let (desk, _office, serving) = start();
        // Both ends are this process: the caller's credentials are its own.
        let pid = std::process::id() as i32;
        assert_eq!(desk.caller_pid().await.unwrap(), Some(pid));
        drop(desk);
        serving.await.unwrap().unwrap();
    });
}

#[test]
fn a_panic_in_a_blocking_method_is_its_callers_error_and_the_connection_goes_on() {
    // Its connection's and runtime's fds would move the count of the test that counts.
    let _fds = fd_count_lock();
    current_thread_runtime().block_on(async {
        let (desk, _office, serving) = start();
        match desk.panic().await {
            Err(Error::Panicked(why)) => assert!(why.contains("the desk is on fire"), "{why}"),
            other => panic!("expected the method's panic, got {other:?}"),
        }
        assert_eq!(desk.returned().await.unwrap(), 0);
        drop(desk);
        serving.await.unwrap().unwrap();
    });
}

#[test]
fn a_cancelled_calls_blocking_method_runs_to_its_end_and_holds_nothing_up() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    current_thread_runtime().block_on(async {
        let (desk, office, serving) = start();
        // The call is dropped while its method waits at the gate...
        let cancelled = tokio::time::timeout(Duration::from_millis(10), desk.wait_for_gate());
        assert!(
            cancelled.await.is_err(),
            "the gate is shut: the call cannot return"
        );
        // ...and the connection answers other calls meanwhile.
        assert_eq!(desk.returned().await.unwrap(), 0);
        // A blocking method cannot be stopped: once the gate opens, it returns, unanswered.
        office.open_gate();
        desk.wait_for_gate().await.unwrap();
        let waiting = Arc::clone(&office);
        let both = tokio::task::spawn_blocking(move || waiting.wait_until_returned(2));
        assert!(
            both.await.unwrap(),
            "the cancelled call's method never returned"
        );
        assert_eq!(desk.returned().await.unwrap(), 2);
        drop(desk);
        serving.await.unwrap().unwrap();
    });
    before.assert_nothing_new();
}

#[test]
fn max_running_caps_the_methods_on_the_pool_at_once() {
    let _fds = fd_count_lock();
    current_thread_runtime().block_on(async {
        // Three callers can never meet while only two methods may run: each gives up after
        // its guard (which only sets how long the test takes).
        assert!(!three_meet(start_with(|server| server.max_running(2)), 300).await);
        // With three slots they meet.
        assert!(three_meet(start_with(|server| server.max_running(3)), MINUTE).await);
    });
}

#[test]
fn a_call_cancelled_while_it_waits_for_a_slot_never_runs() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    current_thread_runtime().block_on(async {
        let (desk, office, serving) = start_with(|server| server.max_running(1));
        // The first call holds the one slot at the gate...
        let first = tokio::spawn({
            let desk = desk.clone();
            async move { desk.wait_for_gate().await }
        });
        let waiting = Arc::clone(&office);
        let entered = tokio::task::spawn_blocking(move || waiting.wait_until_waiting(1));
        assert!(
            entered.await.unwrap(),
            "the first call never reached the gate"
        );
        // ...the second waits for it, and is dropped while it waits.
        let (token, held) = nix::unistd::pipe().unwrap();
        let second = desk.wait_for_gate_holding(held);
        let cancelled = tokio::time::timeout(Duration::from_millis(10), second);
        assert!(
            cancelled.await.is_err(),
            "the slot is taken: the call cannot return"
        );
        // The server dropped the waiting call on the cancel when the token's write end,
        // which the call's arguments held, is closed: only then may the slot come free.
        let closed = tokio::task::spawn_blocking(move || {
            std::fs::File::from(token).read_to_end(&mut Vec::new())
        });
        let closed = tokio::time::timeout(Duration::from_millis(MINUTE), closed).await;
        assert!(closed.is_ok(), "the cancelled call was never dropped");
        office.open_gate();
        first.await.unwrap().unwrap();
        // The semaphore hands slots out in order: had the second call still waited, it
        // would have run before this one.
        assert_eq!(desk.returned().await.unwrap(), 1, "the cancelled call ran");
        drop(desk);
        serving.await.unwrap().unwrap();
    });
    before.assert_nothing_new();
}
