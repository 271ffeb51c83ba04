//! Running requests: starting to serve, dispatching each request to a task (a call to its
//! own, a oneway to the one that runs them in order), checking and running it on its service,
//! and replying; and dropping the services once nothing will dispatch again. Apart because it
//! is where the user's handlers run.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use ::tokio::sync::{Notify, mpsc};

use super::{Inner, MaxCalls, State, TaskGuard};
use crate::connection::admit::admit;
use crate::connection::backlog::Cost;
use crate::connection::lane::Lane;
use crate::connection::trace;
use crate::error::Result;
use crate::frame::Frame;
use crate::service::CallerScope;
use crate::socket::PeerCredentials;
use crate::tokio::call::AsyncCall;
use crate::tokio::envelope::{Envelope, Kind};
use crate::tokio::failure::Failure;
use crate::tokio::{AsyncService, BoxFuture};

impl Inner {
    /// Starts handling requests: those held so far, then each as it arrives.
    pub(super) fn start_serving(self: &Arc<Self>) {
        let mut state = self.lock();
        if state.serving {
            return;
        }
        state.serving = true;
        let held = std::mem::take(&mut state.held);
        let envelopes: Vec<Envelope> = match self.trace {
            true => held.iter().map(|(_, envelope, _)| *envelope).collect(),
            false => Vec::new(),
        };
        // The connection ended before this end served, and `fail` kept them (the peer's
        // oneways, as it hung up; every request, as this end stopped reading): they run all
        // the same, their oneways on a task whose queue is closed once they are in, so that
        // it ends.
        let ended = state.closed.take();
        let tasks: Vec<Task> = held
            .into_iter()
            .filter_map(|(frame, envelope, cost)| self.dispatch(&mut state, frame, envelope, cost))
            .collect();
        if ended.is_some() {
            state.closed = ended;
            state.oneways = None;
        }
        drop(state);
        if !envelopes.is_empty() {
            self.say_held_until_served(&envelopes);
        }
        tasks.into_iter().for_each(|task| self.spawn(task));
    }

    /// Names the requests held for a server, now that it has come: they were said as received
    /// by their ids only. Before their tasks start, so that the lines precede their replies.
    #[cold]
    #[inline(never)]
    fn say_held_until_served(&self, envelopes: &[Envelope]) {
        let served: Vec<_> = self.services.read().iter().map(|s| s.info()).collect();
        for envelope in envelopes {
            if let Some(line) =
                trace::held_until_served(&self.name, envelope, served.iter().copied())
            {
                trace::line(&line);
            }
        }
    }

    /// A call goes to a task of its own, which runs it once the oneways that arrived before it
    /// have run: a task that ran a call before and waits for the next, or a new one; unless
    /// [`State::max_calls`] run: then it waits, taskless, for the first of them to finish,
    /// whose task runs it next ([`State::waiting_calls`]). A oneway goes to the task that runs
    /// them in order. A task to start (or the idle one handed the call) is returned, for
    /// [`Inner::spawn`] once the state lock is released.
    pub(super) fn dispatch(
        self: &Arc<Self>,
        state: &mut State,
        frame: Frame,
        envelope: Envelope,
        cost: Cost,
    ) -> Option<Task> {
        if envelope.kind == Kind::Call {
            let request = Request {
                frame,
                envelope,
                cost,
                after: state.oneways_queued,
            };
            // `usize::MAX` unless set, which no count reaches.
            if state.calls_running >= state.max_calls.0 {
                wait_for_a_slot(state, request);
                return None;
            }
            return Some(self.run_call(state, request));
        }
        let mut task = None;
        if state.oneways.is_none() && state.closed.is_none() {
            let (tx, rx) = mpsc::unbounded_channel();
            // Made here, so that the task retires the services however it ends, also dropped
            // before it ever ran (see `spawn`).
            let ending = OnewaysEnding {
                weak: Arc::downgrade(self),
                _guard: self.tasks.enter(),
            };
            task = Some(Task::Oneways(rx, ending));
            state.oneways = Some(tx);
            state.oneway_task = true;
        }
        let unqueued = match &state.oneways {
            Some(oneways) => oneways.send((frame, envelope, cost)).err().map(|e| e.0.0),
            None => Some(frame),
        };
        match unqueued {
            None => state.oneways_queued += 1,
            // Dropped: the connection has ended. Its fds to the closer, not closed on the
            // reader's thread.
            Some(mut frame) => {
                frame.discard_fds();
                self.finished(cost);
            }
        }
        task
    }

    /// Starts `request`, a call, on a task that ran a call before and waits for the next, or
    /// on a new one ([`Inner::dispatch`]); counted as running until it is done.
    fn run_call(self: &Arc<Self>, state: &mut State, request: Request) -> Task {
        // Counted until done, however its task ends (see `call_done`).
        state.calls_running += 1;
        let (runner, idle) = match state.idle_runners.pop() {
            Some(runner) => (runner, true),
            // Made here rather than in its task, so that a cancel finds the first call too.
            None => {
                let runner = Arc::new(Runner::new(Arc::downgrade(self)));
                // The runners gone since the last was made leave the list here, not in
                // their drop, which would take the lock and the connection with it.
                state.runners.retain(|runner| runner.strong_count() > 0);
                state.runners.push(Arc::downgrade(&runner));
                (runner, false)
            }
        };
        // Under the state lock, as a cancel reads it (and the task clears it, done).
        runner
            .cookie
            .store(request.envelope.cookie, Ordering::Relaxed);
        match idle {
            true => {
                runner.start(request);
                // Let go after the lock: if the runtime has dropped the runner's task, this
                // is its last handle, whose drop finishes the call, taking the lock.
                Task::Handed(runner)
            }
            false => Task::Calls(
                FirstCall {
                    inner: self.clone(),
                    request: Some(request),
                    runner,
                },
                self.tasks.enter(),
            ),
        }
    }

    /// Starts a task [`Inner::dispatch`] returned. Not under the state lock: a runtime that is
    /// shutting down drops the task at once, inside `spawn`, and a call's task takes the lock
    /// as it goes ([`FirstCall`]); so does the last handle to a [`Runner`] handed a call.
    pub(super) fn spawn(self: &Arc<Self>, task: Task) {
        match task {
            Task::Handed(runner) => drop(runner),
            Task::Calls(first, guard) => {
                self.runtime.spawn(run_calls(first, guard));
            }
            Task::Oneways(queue, ending) => {
                self.runtime.spawn(run_oneways(queue, ending));
            }
        }
    }

    /// The peer no longer waits for the reply to its call `cookie` ([`Kind::Cancel`]): a
    /// call held for a server to come is dropped unrun here; a dispatched one's task is told
    /// to drop it, unrun if it has not started, else its handler's future; no reply goes
    /// out. A cookie of no call held or running (its reply went already, or a hostile
    /// peer's) changes nothing.
    #[cold]
    #[inline(never)]
    pub(super) fn cancel_served(self: &Arc<Self>, cookie: u64) {
        if cookie == 0 {
            return; // cancels nothing: the message carried a lane word only
        }
        let mut state = self.lock();
        // Every runner that has the call: a hostile peer may have reused the cookie while
        // its first call ran, and waits for neither. Handles let go after the lock: one may
        // be the last (its task just ended), whose drop takes the lock.
        let runners: Vec<Arc<Runner>> = state
            .runners
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        let mut found = false;
        for runner in &runners {
            if runner.cookie.load(Ordering::Relaxed) == cookie {
                runner.cancel(cookie);
                found = true;
            }
        }
        // Calls waiting for a slot (`max_calls`) are dropped unrun: every one of the cookie,
        // as for the runners.
        let waiting = match state.waiting_calls.is_empty() {
            true => Vec::new(),
            false => take_waiting(&mut state.waiting_calls, cookie),
        };
        if found || !waiting.is_empty() {
            drop(state);
            drop(runners);
            for mut request in waiting {
                if self.trace {
                    trace::dropped_cancelled(&self.name, cookie, false, false);
                }
                self.dropped_unrun(&mut request.frame);
                self.finished(request.cost);
            }
            return;
        }
        let held = state
            .held
            .iter()
            .position(|(_, envelope, _)| envelope.kind == Kind::Call && envelope.cookie == cookie);
        let Some(at) = held else {
            drop(state);
            drop(runners);
            return;
        };
        let (mut frame, _, cost) = state.held.remove(at);
        drop(state);
        drop(runners);
        if self.trace {
            trace::dropped_cancelled(&self.name, cookie, false, false);
        }
        self.dropped_unrun(&mut frame);
        self.finished(cost);
    }

    /// As the connection ends with no reply of the peer's calls to go out any more
    /// ([`Inner::fail`], [`close`](super::AsyncConnection::close), under the state lock):
    /// every call running is told it is cancelled, as a cancel of the peer's would (its
    /// handler's future is dropped, or it never starts), and the calls waiting for a slot are
    /// taken, for [`Inner::drop_cancelled`] to drop unrun once the lock is let go.
    #[cold]
    #[inline(never)]
    pub(super) fn cancel_calls(&self, state: &mut State) -> Cancelled {
        let runners: Vec<Arc<Runner>> = state
            .runners
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        for runner in &runners {
            runner.cancel_at_end();
        }
        Cancelled {
            runners,
            waiting: std::mem::take(&mut state.waiting_calls),
        }
    }

    /// After [`Inner::cancel_calls`], with the state lock let go: the runners' handles go (one
    /// may be the last, whose drop takes the lock), and the calls that waited for a slot are
    /// dropped unrun, their fds closed.
    pub(super) fn drop_cancelled(&self, cancelled: Cancelled) {
        drop(cancelled.runners);
        for request in cancelled.waiting {
            if self.trace {
                trace::dropped_cancelled(&self.name, request.envelope.cookie, false, true);
            }
            self.drop_unstarted(request);
        }
    }

    /// A request dropped without a handler (its call cancelled): done with a placement it
    /// carried unread, which the peer then hears of in a message of its own, as no reply
    /// will carry it; its fds closed by the closer.
    fn dropped_unrun(self: &Arc<Self>, frame: &mut Frame) {
        let owed = Lane::carries_placement(&frame.payload);
        self.lane().finished(&frame.payload);
        frame.discard_fds();
        if owed {
            self.send_cancel(0);
        }
    }

    /// Says on stderr that the oneway `envelope` failed here (nobody waits for its outcome).
    #[cold]
    pub(super) fn oneway_failed(&self, envelope: &Envelope, failure: &Failure) {
        // Copied out before printing: a write to stderr may block (a pipe nobody empties),
        // and a service being added (which waits for the write lock) would wait for it.
        let served: Vec<_> = self.services.read().iter().map(|s| s.info()).collect();
        crate::connection::failure::oneway_failed(
            &self.name, self.trace, envelope, served, failure,
        );
    }

    /// Once the connection has ended and nothing will dispatch a request any more (the
    /// reader is done, and the oneway task if there is one), drops the services: one of them
    /// may hold a clone of this connection, a cycle that would keep it open for good.
    ///
    /// Called as each of those ends, the last call too: once no call is left after the end,
    /// the reader, if it watches for the peer's hang-up meanwhile, is told to stop
    /// ([`Inner::cancel_calls_once_the_peer_goes`]), or `run` would wait for that hang-up.
    pub(super) fn retire_services(&self, oneway_task_ending: bool) {
        let mut state = self.lock();
        if oneway_task_ending {
            state.oneway_task = false;
        }
        if state.closed.is_none() || state.calls_running > 0 {
            return;
        }
        let oneway_task = state.oneway_task;
        drop(state);
        self.room.notify_one();
        if oneway_task {
            return;
        }
        let services = std::mem::take(&mut *self.services.write());
        drop(services);
    }

    /// A call dispatched is done, or will never run (its task was dropped, the runtime shutting
    /// down): the last one retires the services if the connection has ended. Calls read before
    /// it ended still find their service (`stop_reading` lets them run).
    fn call_done(&self) {
        let mut state = self.lock();
        state.calls_running -= 1;
        // No task will take the calls waiting for a slot: the runtime is shutting down.
        let waiting = std::mem::take(&mut state.waiting_calls);
        let last = state.calls_running == 0 && state.closed.is_some();
        drop(state);
        for request in waiting {
            self.drop_unstarted(request);
        }
        if last {
            self.retire_services(false);
        }
    }

    /// [`AsyncConnection::set_max_calls_at_once`](super::AsyncConnection::set_max_calls_at_once):
    /// from now on at most `n` calls run at once; raised, the calls waiting that now fit
    /// start.
    #[cold]
    #[inline(never)]
    pub(super) fn set_max_calls(self: &Arc<Self>, n: usize) {
        let mut state = self.lock();
        state.max_calls = MaxCalls(n);
        let mut tasks = Vec::new();
        while state.calls_running < n
            && let Some(request) = state.waiting_calls.pop_front()
        {
            tasks.push(self.run_call(&mut state, request));
        }
        drop(state);
        tasks.into_iter().for_each(|task| self.spawn(task));
    }

    /// A call that waited for a slot, dropped unrun as the connection ends: its placement is
    /// done with, its fds go to the closer, and it leaves the backlog.
    fn drop_unstarted(&self, mut request: Request) {
        self.lane().finished(&request.frame.payload);
        request.frame.discard_fds();
        self.finished(request.cost);
    }

    /// Waits, before a call's handler starts, until the replies waiting to go out are below
    /// their budget ([`backlog::MAX_REPLY_BYTES`]) or the connection has ended (the call then
    /// runs, or is dropped if this end closed it, as a call waiting for a slot is), then
    /// passes the turn on to the next call waiting: one wakes at a time, each looking at the
    /// replies waiting as it starts, so that the calls waiting do not all start at once, as
    /// soon as one reply has gone, and queue up their replies past the budget again. Dropped
    /// (the call cancelled), a turn it was given goes to the next (tokio's `Notify` passes
    /// on a `notify_one` a dropped waiter had not taken).
    ///
    /// [`backlog::MAX_REPLY_BYTES`]: crate::connection::backlog::MAX_REPLY_BYTES
    #[cold]
    #[inline(never)]
    async fn wait_for_reply_room(&self) {
        // Counted while it waits, also if it is dropped (cancelled) meanwhile.
        self.calls_held_for_replies.fetch_add(1, Ordering::SeqCst);
        let _held = HeldForReplies(&self.calls_held_for_replies);
        loop {
            let mut room = pin!(self.reply_room.notified());
            room.as_mut().enable();
            // After `enable`: a reply going out after this look wakes a call waiting.
            if !self.replies.over() || self.lock().closed.is_some() {
                break;
            }
            room.await;
        }
        // A turn with no call waiting is kept for the next to wait, which looks again.
        self.reply_room.notify_one();
    }

    /// Which service answers `envelope`, after the same checks as the blocking flavour.
    fn check(&self, envelope: &Envelope) -> Result<Arc<dyn AsyncService>, Failure> {
        let services = self.services.read();
        let authorizer = self.authorizer.read();
        admit(
            &services,
            |s| s.info(),
            envelope,
            authorizer.as_deref(),
            self.peer.as_ref(),
        )
        .cloned()
    }
}

/// What [`Inner::cancel_calls`] took from the state, to let go once its lock is.
#[derive(Default)]
pub(super) struct Cancelled {
    runners: Vec<Arc<Runner>>,
    waiting: VecDeque<Request>,
}

/// A call waiting for the replies to go out ([`Inner::wait_for_reply_room`]), in
/// `Inner::calls_held_for_replies` until it starts or is dropped.
struct HeldForReplies<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for HeldForReplies<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many tasks that ran a call may wait idle for the next; past that, a task ends when
/// its call is done. A burst of concurrent calls starts as many tasks, and this many stay.
pub(in crate::tokio) const IDLE_RUNNERS: usize = 8;

/// A task for requests, made by [`Inner::dispatch`] and started by [`Inner::spawn`].
pub(super) enum Task {
    /// An idle [`run_calls`] task, already handed its call: only its handle to let go.
    Handed(Arc<Runner>),
    /// A new [`run_calls`] task, with its first call.
    Calls(FirstCall, TaskGuard),
    /// The [`run_oneways`] task, with its queue.
    Oneways(OnewayQueue, OnewaysEnding),
}

type OnewayQueue = mpsc::UnboundedReceiver<(Frame, Envelope, Cost)>;

/// A call request, as the reader hands it to the task that runs it.
pub(super) struct Request {
    pub(super) frame: Frame,
    envelope: Envelope,
    cost: Cost,
    /// The oneways that arrived before it: it runs once that many have run.
    after: u64,
}

/// A task that has run a call and waits for the next one ([`run_calls`]). Handing a call to
/// it costs a lock and a wake-up; spawning a task for each call cost a 128-byte-aligned
/// allocation (glibc's `posix_memalign`, several hundred instructions), and tokio copies the
/// call's future into and out of the new task.
pub(super) struct Runner {
    /// The call to run next; `None` when woken: the connection has ended.
    next: parking_lot::Mutex<Option<Request>>,
    wake: Notify,
    /// The connection, for a call handed over that the task never takes (see `Drop`).
    inner: std::sync::Weak<Inner>,
    /// The peer's cookie of the call this task has, from its dispatch until it is done (0:
    /// none), written and read under the state lock: where a cancel finds the call.
    cookie: AtomicU64,
    /// The cookie of the last call the peer cancelled while this task had it (0: none):
    /// the call it runs stops if it is this one. A cookie rather than a flag, so that a
    /// cancel that comes as one call finishes does not stop the next.
    cancelled: AtomicU64,
    /// The connection ended with its calls cancelled ([`Inner::cancel_calls`]): whatever
    /// call this task has stops, of any cookie (0 too: never one of typed-ipc's, whose
    /// cookies start at 1, but a broken or hostile peer's may be, and `cancelled` cannot
    /// name it). No call is handed to a task after that.
    ended: AtomicBool,
    /// The task's waker, once its call has waited (a call done in its first poll, the
    /// usual case, never stores it): a cancel wakes it.
    waker: parking_lot::Mutex<Option<Waker>>,
}

impl Drop for Runner {
    /// A call handed over and never taken (the task dropped, the runtime shutting down) is
    /// done all the same.
    fn drop(&mut self) {
        if self.next.get_mut().take().is_some()
            && let Some(inner) = self.inner.upgrade()
        {
            inner.call_done();
        }
    }
}

/// The call a new [`run_calls`] task starts with: if the task is dropped before it runs (the
/// runtime shutting down), the call is done all the same.
pub(super) struct FirstCall {
    inner: Arc<Inner>,
    request: Option<Request>,
    runner: Arc<Runner>,
}

impl Drop for FirstCall {
    fn drop(&mut self) {
        if self.request.is_some() {
            self.inner.call_done();
        }
    }
}

/// The call a [`run_calls`] task is running: if the task is dropped in the middle of it (the
/// runtime shutting down), the call is done all the same.
struct CallRunning<'a> {
    inner: &'a Inner,
    done: bool,
}

impl Drop for CallRunning<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.inner.call_done();
        }
    }
}

impl Runner {
    fn new(inner: std::sync::Weak<Inner>) -> Runner {
        Runner {
            next: parking_lot::Mutex::new(None),
            wake: Notify::new(),
            inner,
            cookie: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            waker: parking_lot::Mutex::new(None),
        }
    }

    /// Tells the task that the peer cancelled its call `cookie` (under the state lock, with
    /// the call still its `cookie`, so the task has not taken another since).
    fn cancel(&self, cookie: u64) {
        self.cancelled.store(cookie, Ordering::SeqCst);
        if let Some(waker) = self.waker.lock().as_ref() {
            waker.wake_by_ref();
        }
    }

    /// Tells the task that the connection ended with its calls cancelled (under the state
    /// lock): whatever call it has stops. Waking an idle task's old waker is harmless.
    #[cold]
    #[inline(never)]
    fn cancel_at_end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        if let Some(waker) = self.waker.lock().as_ref() {
            waker.wake_by_ref();
        }
    }

    /// Whether the peer cancelled call `cookie` (a cancel of the peer's for cookie 0, none,
    /// cancels nothing).
    #[inline(always)]
    fn cancelled_by_peer(&self, cookie: u64) -> bool {
        cookie != 0 && self.cancelled.load(Ordering::SeqCst) == cookie
    }

    /// Whether call `cookie` is to stop: the peer cancelled it, or the connection ended.
    #[inline(always)]
    fn stops(&self, cookie: u64) -> bool {
        self.cancelled_by_peer(cookie) || self.ended.load(Ordering::SeqCst)
    }

    /// Whether the call `cookie` was cancelled, leaving `waker` to be woken if it is later.
    fn cancelled(&self, cookie: u64, waker: &Waker) -> bool {
        {
            let mut stored = self.waker.lock();
            match &*stored {
                Some(stored) if stored.will_wake(waker) => {}
                _ => *stored = Some(waker.clone()),
            }
        }
        // After the waker is in: a cancel that stores its cookie later wakes it.
        self.stops(cookie)
    }

    fn start(&self, request: Request) {
        *self.next.lock() = Some(request);
        self.wake.notify_one(); // stored if the task is not waiting yet
    }

    /// Ends the idle task: the connection has ended.
    pub(super) fn stop(&self) {
        self.wake.notify_one();
    }
}

/// Runs `first`, then waits idle (see [`Runner`]) for more calls until the connection ends or
/// [`IDLE_RUNNERS`] others already wait. While idle it holds the connection weakly, like
/// the oneway task: the connection is not kept open by its idle tasks, which
/// [`Inner::fail`] wakes to end.
async fn run_calls(mut first: FirstCall, guard: TaskGuard) {
    let mut request = first.request.take().expect("a first call");
    let mut inner = first.inner.clone();
    let runner = first.runner.clone();
    drop(first);
    let weak = Arc::downgrade(&inner);
    loop {
        let mut running = CallRunning {
            inner: &inner,
            done: false,
        };
        run_request(&inner, &runner, request).await;
        running.done = true;
        drop(running);
        {
            let mut state = inner.lock();
            state.calls_running -= 1;
            // Done: a cancel that comes now finds nothing, and one that came since no longer
            // counts (should the peer use the cookie again for the next call).
            runner.cookie.store(0, Ordering::Relaxed);
            runner.cancelled.store(0, Ordering::Relaxed);
            // The slot it frees goes to the first call waiting for one, on this task.
            if !state.waiting_calls.is_empty()
                && let Some(next) = next_waiting(&mut state, &runner)
            {
                request = next;
                continue;
            }
            if state.closed.is_some() {
                drop(state);
                inner.retire_services(false); // if it was the last call: nothing looks them up
                break;
            }
            if state.idle_runners.len() >= IDLE_RUNNERS {
                break;
            }
            state.idle_runners.push(runner.clone());
        }
        drop(inner);
        runner.wake.notified().await;
        let next = runner.next.lock().take();
        match (next, weak.upgrade()) {
            (Some(next), Some(strong)) => (inner, request) = (strong, next),
            // Ended: the connection, or the only handle to it, is gone (a call handed over
            // meanwhile is dropped with it, closing its fds).
            ended => {
                drop(ended); // before `guard`, as below
                drop(guard);
                return;
            }
        }
    }
    drop(inner); // before `guard`: once the last guard goes, `run` returns
    drop(guard);
}

/// Has a call wait for a slot, as [`State::max_calls`] run ([`Inner::dispatch`]).
#[cold]
#[inline(never)]
fn wait_for_a_slot(state: &mut State, request: Request) {
    state.waiting_calls.push_back(request);
}

/// The first call waiting for a slot, for `runner`, whose call just finished (and left the
/// count), if the limit lets one more run: counted as running and named as the runner's.
#[cold]
#[inline(never)]
fn next_waiting(state: &mut State, runner: &Runner) -> Option<Request> {
    if state.calls_running >= state.max_calls.0 {
        return None; // the limit was lowered meanwhile
    }
    let request = state.waiting_calls.pop_front()?;
    state.calls_running += 1;
    // Under the state lock, as a cancel reads it.
    runner
        .cookie
        .store(request.envelope.cookie, Ordering::Relaxed);
    Some(request)
}

/// Takes the calls of `cookie` out of `waiting`, in order.
#[cold]
#[inline(never)]
fn take_waiting(waiting: &mut VecDeque<Request>, cookie: u64) -> Vec<Request> {
    let mut taken = Vec::new();
    let mut at = 0;
    while at < waiting.len() {
        match waiting[at].envelope.cookie == cookie {
            true => taken.extend(waiting.remove(at)),
            false => at += 1,
        }
    }
    taken
}

/// Runs one call request and replies, once the first `after` oneway messages have run: a
/// peer that sends a oneway and then a call sees the call run after the oneway, as it would
/// on one thread. Unless the peer cancels it meanwhile ([`Runner::cancel`]): then it is
/// dropped where it is, unrun or its handler's future, and nothing is sent for it (but an
/// acknowledgement of a placement it carried that no reply will carry now); once its
/// handler has handed a method to tokio's blocking pool (`#[interface(async_server)]`),
/// which nothing stops, it runs to its end and replies.
async fn run_request(inner: &Arc<Inner>, runner: &Runner, request: Request) {
    let Request {
        frame,
        envelope,
        cost,
        after,
    } = request;
    let cookie = envelope.cookie;
    let owes = Lane::carries_placement(&frame.payload);
    // Out here, not in the call's future: the frame is finished however the call ends
    // before its handler takes it (cancelled while it waits for the oneways before it, or
    // before its first poll; this end closed; the task dropped).
    let mut unrun = Unrun {
        inner,
        frame: Some(frame),
    };
    let cancelled = {
        let mut work = pin!(Some(serve_request(
            inner,
            &mut unrun.frame,
            envelope,
            after
        )));
        // Its handler handed a method to tokio's blocking pool (`run_blocking`), which no
        // cancel stops: the call then runs to its end, holding its place in the backlog.
        let mut on_the_pool = false;
        let cancelled = poll_fn(|cx| {
            let Some(future) = work.as_mut().as_pin_mut() else {
                return Poll::Ready(false);
            };
            // Checked before each poll, so that a call cancelled before it started never
            // does (one atomic load; the waker is stored only once the call waits, so a call
            // done in its first poll, the usual case, costs nothing more).
            if runner.stops(cookie) && !on_the_pool {
                return Poll::Ready(true);
            }
            // Cleared first: a oneway's handler polled on this thread may have set it.
            let _ = crate::service::on_the_pool();
            if future.poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            on_the_pool |= crate::service::on_the_pool();
            match !on_the_pool && runner.cancelled(cookie, cx.waker()) {
                true => Poll::Ready(true),
                false => Poll::Pending,
            }
        })
        .await;
        if cancelled {
            // Dropped in place, now: the handler's own drops run here (a guard of the
            // implementation's; its `AsyncCall`, which finishes the request and closes its
            // fds). A panic in them is the handler's, caught as one in its poll is (the hook
            // said it).
            let _ = catch_unwind(AssertUnwindSafe(|| work.as_mut().set(None)));
        }
        cancelled
    };
    let started = unrun.frame.is_none();
    drop(unrun); // before the acknowledgement below, which carries its lane word
    if cancelled {
        if inner.trace {
            // Cancelled by the peer (said so even if the connection then ended before this
            // task ran), or as the connection ended (`cancel_calls`).
            let ended = !runner.cancelled_by_peer(cookie);
            trace::dropped_cancelled(&inner.name, cookie, started, ended);
        }
        if owes {
            inner.send_cancel(0);
        }
    }
    inner.finished(cost);
}

/// A request's frame until its handler takes it: still here when the call ends (cancelled
/// while it waited for the oneways before it), it is finished unread and its fds go to the
/// closer.
struct Unrun<'a> {
    inner: &'a Inner,
    frame: Option<Frame>,
}

impl Drop for Unrun<'_> {
    fn drop(&mut self) {
        if let Some(frame) = &mut self.frame {
            self.inner.lane().finished(&frame.payload);
            frame.discard_fds();
        }
    }
}

/// [`run_request`]'s work: waits for the oneways before it, and for the replies waiting to
/// go out to be below their budget, then takes the request's `frame` and handles it and
/// replies, unless this end has closed the connection meanwhile, or the peer has gone while
/// it waited.
async fn serve_request(
    inner: &Arc<Inner>,
    frame: &mut Option<Frame>,
    envelope: Envelope,
    after: u64,
) {
    let mut waited = false;
    if *inner.oneways_run.borrow() < after {
        waited = true;
        let mut run = inner.oneways_run.subscribe();
        // The sender lives in `inner`, which this task holds: no error to expect. A call still
        // waiting when this end closes the connection never runs (`close` wakes it).
        let _ = run.wait_for(|&n| n >= after || inner.closed_here()).await;
    }
    // Nor while the replies waiting to go out are at their budget (a peer that does not read
    // them): it waits, holding its request only, until they go out.
    if inner.replies.over() {
        waited = true;
        inner.wait_for_reply_room().await;
    }
    // Nor does one whose task starts only once this end has closed it: the oneways before it
    // may all count as run by then (those dropped do too).
    if inner.closed_here() {
        return; // the frame is left to `Unrun`, which closes its fds
    }
    // Nor one that waited while the peer went: its reply could go nowhere. The reader cancels
    // such calls as it reads the end, but may not have read that far yet, while what the
    // hang-up set going here already has: the reply part-way out fails, and its room in
    // the budget lets the next call held for the replies go on. The kernel says (one `poll`,
    // only for a call that waited).
    if waited && inner.socket().has_ended() {
        if inner.trace {
            trace::dropped_cancelled(&inner.name, envelope.cookie, false, true);
        }
        return;
    }
    if let Some(frame) = frame.take() {
        handle_request(inner.clone(), frame, envelope).await;
    }
}

/// Runs oneway messages one at a time, in the order they arrived, until the connection ends.
/// `ending` retires the services when the task ends, also when it is dropped unfinished or
/// unstarted (the runtime shutting down): else `oneway_task` stays set and a service holding
/// a clone of this connection keeps it open for good. It holds the connection weakly: the
/// queue's sender lives in `Inner`, and holding it would keep the queue open.
async fn run_oneways(mut queue: OnewayQueue, ending: OnewaysEnding) {
    while let Some((mut frame, envelope, cost)) = queue.recv().await {
        let Some(inner) = ending.weak.upgrade() else {
            // The connection is gone: its fds to the closer, as for any oneway dropped.
            frame.discard_fds();
            continue;
        };
        // Once this end has closed the connection, those still queued are dropped unrun
        // (closing their fds), and still counted as run for the calls that wait for them.
        match inner.closed_here() {
            false => handle_request(inner.clone(), frame, envelope).await,
            true => frame.discard_fds(),
        }
        inner.finished(cost);
        inner.oneways_run.send_modify(|n| *n += 1);
    }
    drop(ending);
}

/// The end of the task that runs oneways, however it ends.
pub(super) struct OnewaysEnding {
    weak: std::sync::Weak<Inner>,
    /// Declared last: dropped after the services are retired.
    _guard: TaskGuard,
}

impl Drop for OnewaysEnding {
    fn drop(&mut self) {
        if let Some(inner) = self.weak.upgrade() {
            inner.retire_services(true);
        }
    }
}

/// Checks a request, runs it on its service, and replies unless it is oneway.
async fn handle_request(inner: Arc<Inner>, mut frame: Frame, envelope: Envelope) {
    let oneway = envelope.kind == Kind::Oneway;
    let failure = match inner.check(&envelope) {
        Err(failure) => {
            // Refused unread: a placement it carried is released now (a oneway's sender
            // hears nothing else, and its lane would stay busy).
            inner.lane().finished(&frame.payload);
            // Its fds unclaimed: closed by the closer, not on this runtime's thread.
            frame.discard_fds();
            Some(failure)
        }
        Ok(service) => {
            let mut call = AsyncCall::new(envelope, frame, inner.peer, inner.clone());
            let peer = inner.peer;
            // `handle` itself may panic before it returns its future.
            let outcome = {
                let (service, call) = (&service, &mut call);
                let connection = &*inner;
                let started = catch_unwind(AssertUnwindSafe(move || {
                    let scope = CallerScope::enter(peer, std::ptr::from_ref(connection).cast());
                    let (_caller, call) = (scope, call); // FnOnce: moves `call`
                    service.handle(call)
                }));
                match started {
                    Ok(future) => {
                        Guarded {
                            peer,
                            connection,
                            future,
                        }
                        .await
                    }
                    Err(panic) => Err(panic),
                }
            };
            Failure::of_outcome(outcome, call.replied(), call.unreceived(), oneway)
        }
    };
    match failure {
        Some(failure) if !oneway => {
            // Boxed, as the path is rare: inline, the send's future made the task that runs
            // calls 1,360 bytes instead of 544, which tokio copies into the task when it
            // starts and which each task waiting idle for a call keeps.
            let _ = Box::pin(reply_failure(inner, envelope, failure)).await;
        }
        Some(failure) => {
            inner.oneway_failed(&envelope, &failure);
        }
        None => {}
    }
}

pub(super) async fn reply_failure(
    inner: Arc<Inner>,
    call: Envelope,
    failure: Failure,
) -> Result<()> {
    let envelope = Envelope {
        kind: Kind::Failure,
        ..call
    };
    if inner.trace {
        trace::failure(&inner.name, call.cookie, &failure);
    }
    // Cut until it is within this side's limits (`Failure::shorter`).
    let mut failure = failure;
    let sent = loop {
        match inner.send(envelope, &failure).await {
            Err(e) => match failure.shorter(&e) {
                Some(shorter) => failure = shorter,
                None => break Err(e),
            },
            sent => break sent.map(drop),
        }
    };
    if let Err(e) = &sent {
        match e {
            crate::Error::Disconnected => inner.cancel_calls_of_a_peer_gone(),
            e => unanswerable(&inner, e),
        }
    }
    sent
}

/// After the failure owed to a caller could not be sent either (`e`): ends the connection
/// ([`crate::error::Error::unanswerable`]).
#[cold]
#[inline(never)]
fn unanswerable(inner: &Inner, e: &crate::error::Error) {
    if let Some(why) = e.unanswerable() {
        inner.fail(why);
    }
}

/// A handler's future, polled with [`current_peer`](crate::current_peer) (and
/// [`handling_a_call_of`](crate::service::handling_a_call_of) its connection) set and its
/// panics caught.
struct Guarded<'a> {
    peer: Option<PeerCredentials>,
    connection: &'a Inner,
    future: BoxFuture<'a, Result<()>>,
}

impl Future for Guarded<'_> {
    type Output = std::thread::Result<Result<()>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let _caller = CallerScope::enter(self.peer, std::ptr::from_ref(self.connection).cast());
        let future = self.future.as_mut();
        match catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(result)) => Poll::Ready(Ok(result)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}
