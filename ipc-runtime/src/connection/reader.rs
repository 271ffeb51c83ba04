//! The reader role: whichever waiting thread receives the next message, and where what it
//! receives goes (see the module docs of [`connection`](super)).

use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::poll::PollFlags;
use nix::sys::eventfd::EventFd;

use super::backlog::Cost;
use super::envelope::{self, Envelope, Kind};
use super::failure;
use super::lane::Lane;
use super::sending::WakeSlot;
use super::serving::Run;
use super::{Guard, Shared, State, unreceived};
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::socket::RecvState;
use parking_lot::MutexGuard;

impl Shared {
    /// Gives up the reader role a caller took before sending, and registers `cookie`'s call
    /// to have its reply routed by whoever reads next.
    pub(super) fn stop_reading(&self, cookie: Option<u64>, recv: RecvState) {
        let mut state = self.state.lock();
        state.recv = recv;
        if let Some(cookie) = cookie {
            state.pending.insert(cookie, None);
        }
        self.release_reader(&mut state);
    }

    /// The wait of a caller that took the reader role before sending, receiving into its
    /// thread's `frame`: the next message is most likely its reply. Anything else is routed
    /// as any reader routes it, and the caller then waits as any caller does. Returns
    /// `None` if the reply is in `frame`, else the frame it came in.
    #[inline]
    pub(super) fn read_own(
        &self,
        cookie: u64,
        mut recv: RecvState,
        deadline: Option<Instant>,
        frame: &mut Frame,
    ) -> Result<Option<Frame>> {
        let result = self.receive(&mut recv, frame, deadline);
        let mut state = self.state.lock();
        state.recv = recv;
        if result.is_ok() && envelope::is_reply_to(&frame.payload, cookie) {
            // The common case, without `route`'s general matching: ours, and whole.
            self.release_reader(&mut state);
            drop(state);
            if self.trace {
                if let Ok(envelope) = Envelope::read(&frame.payload) {
                    self.trace_incoming(&envelope, frame);
                }
            }
            return Ok(None);
        }
        let frame = std::mem::take(frame);
        // Registered before the role is let go: routing may let the lock go too (to report a
        // refused oneway, say), and a reader that takes the role meanwhile may read the
        // reply, which must find its slot. (Our own reply, routed here, takes it out.)
        register(&mut state, cookie);
        let (state, own) = self.route(state, frame, result, Reader::Caller(cookie));
        if let Some(Taken::Reply(reply)) = own {
            return reply.map(Some);
        }
        drop(state);
        self.wait_reply(cookie, deadline).map(Some)
    }

    /// Waits for the reply to `cookie`, reading the socket whenever nobody else is.
    pub(super) fn wait_reply(&self, cookie: u64, deadline: Option<Instant>) -> Result<Frame> {
        let mut state = self.state.lock();
        // Since when this call has waited with a call of the peer's held for nobody.
        let mut unserved_since = None;
        // Its eventfd while it waits for room, made the first time, kept until it returns.
        let mut watch = None;
        loop {
            if let Entry::Occupied(slot) = state.pending.entry(cookie) {
                if slot.get().is_some() {
                    return slot.remove().expect("checked above");
                }
            }
            if let Some(closed) = state.closed.as_ref().map(Error::duplicate) {
                state.pending.remove(&cookie);
                return Err(closed);
            }
            let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
            if timed_out {
                // A late reply finds no slot and is dropped, closing its fds.
                state.pending.remove(&cookie);
                drop(state);
                if self.trace {
                    super::trace::gave_up(&self.name, cookie, "timed out");
                }
                // The request went out (this waits only for calls that sent theirs) and no
                // reply came: the peer may still queue or run it, for nobody.
                self.send_cancel(cookie);
                return Err(Error::TimedOut);
            }
            // A call of the peer's waiting here may wait for a thread that never serves.
            let until = match state.calls.is_empty() {
                true => deadline,
                false => match self.warn_unserved(&mut state, &mut unserved_since, deadline) {
                    Unserved::WaitUntil(until) => until,
                    Unserved::LookAgain => continue,
                },
            };
            if state.reading {
                state = self.sleep(state, until);
                continue;
            }
            if self.waits_for_room(&state) {
                let hung_up;
                (state, hung_up) = self.sleep_watching_for_hang_up(state, until, &mut watch);
                // Once the peer has hung up, it reads what the peer said and its end: nobody
                // else reads at the bounds.
                if !hung_up || state.reading {
                    continue;
                }
            }
            let own;
            (state, own) = self.read(state, until, Reader::Caller(cookie));
            if let Some(Taken::Reply(reply)) = own {
                return reply;
            }
        }
    }

    /// Whether a caller waiting for its reply leaves the socket unread at the bounds of the
    /// request queue, as the serving threads do: they drain it, and it is woken as they are
    /// once a request leaves (`dequeued`). Its reply is read then, after the requests before
    /// it. Not a call from a handler of this connection, which the queue may wait for (see
    /// [`backlog`](super::backlog)), nor one made while the serving threads are still to
    /// come (a `Server::service_with` whose `make` calls the client, whose threads come only
    /// once that call is answered): those read on.
    #[inline]
    fn waits_for_room(&self, state: &State) -> bool {
        state.backlog.full()
            && state.runners > 0
            && !crate::service::handling_a_call_of(std::ptr::from_ref(self).cast())
    }

    /// [`Shared::sleep`] for a caller waiting for room ([`Shared::waits_for_room`]), which
    /// also watches the socket for the peer's hang-up: nobody reads at the bounds, and the
    /// callers must hear at once that the peer went, not once a handler finishes (which may
    /// wait for one of them). One caller watches at a time, on `watch`
    /// ([`Shared::poll_or_wake`], registered as `State::hang_up_watch`); the others, or all
    /// if no eventfd can be made, sleep on the condvar. Returns whether the peer hung up (the
    /// caller then reads).
    #[cold]
    #[inline(never)]
    fn sleep_watching_for_hang_up<'a>(
        &'a self,
        state: Guard<'a>,
        deadline: Option<Instant>,
        watch: &mut Option<Arc<EventFd>>,
    ) -> (Guard<'a>, bool) {
        if state.hang_up_watch.is_some() {
            return (self.sleep(state, deadline), false);
        }
        if crate::socket::poll_timeout(deadline).is_none() {
            return (state, false); // the caller's next look says it timed out
        }
        let hang_up_watch: WakeSlot = |s| &mut s.hang_up_watch;
        // No events asked of the socket (the requests past the bounds are there to read): it
        // reports the peer's hang-up (`POLLHUP`) or an error, whatever is asked.
        match self.poll_or_wake(state, deadline, watch, hang_up_watch, PollFlags::empty()) {
            Ok(ready) => {
                let state = self.state.lock();
                // Another caller waiting for room watches next.
                self.wake_all(&state);
                (
                    state,
                    ready.intersects(PollFlags::POLLHUP | PollFlags::POLLERR),
                )
            }
            Err(state) => (self.sleep(state, deadline), false),
        }
    }

    /// For a caller waiting for its reply while a call of the peer's waits here: if it waits
    /// for a serving thread and none serves (see [`unserved`]), the two ends may well wait
    /// for each other for good, the peer having called back from inside the call this caller
    /// waits for, and nothing says so (a connection given services with `add_service` but
    /// never served: a new user's mistake). Once the caller has waited so for
    /// [`UNSERVED_WARNING`], this says it on stderr, once a connection. Says how the caller
    /// goes on ([`Unserved`]).
    #[cold]
    #[inline(never)]
    fn warn_unserved(
        &self,
        state: &mut Guard<'_>,
        since: &mut Option<Instant>,
        deadline: Option<Instant>,
    ) -> Unserved {
        if !unserved(state) {
            *since = None;
            return Unserved::WaitUntil(deadline);
        }
        let now = Instant::now();
        let warn_at = *since.get_or_insert(now) + UNSERVED_WARNING;
        if now < warn_at {
            return Unserved::WaitUntil(Some(deadline.map_or(warn_at, |d| d.min(warn_at))));
        }
        state.unserved_said = true;
        let held = state
            .calls
            .front()
            .map(|q| Envelope::read(&q.frame.payload));
        // Said with the lock let go: a write to stderr may wait.
        MutexGuard::unlocked(state, || self.say_unserved(held));
        Unserved::LookAgain
    }

    /// The line [`Shared::warn_unserved`] says, naming the call `held` (its envelope).
    fn say_unserved(&self, held: Option<Result<Envelope>>) {
        if let Some(Ok(envelope)) = held {
            let registry = Arc::clone(&self.registry.lock());
            let served = registry.services.iter().map(|(info, _)| *info);
            let method = failure::method_name(&envelope, served);
            super::trace::line(&format!(
                "{}: a call of this end's has waited {} s for its reply while the peer's call \
                 {method} waits here for a thread to serve it, and no thread serves this \
                 connection: the two may wait for each other for good. {SERVE_ON_A_THREAD}",
                self.name,
                UNSERVED_WARNING.as_secs(),
            ));
        }
    }

    /// Sleeps until woken or until `deadline`.
    pub(super) fn sleep<'a>(
        &'a self,
        mut state: Guard<'a>,
        deadline: Option<Instant>,
    ) -> Guard<'a> {
        state.waiters += 1;
        match deadline {
            None => self.wake.wait(&mut state),
            Some(d) => {
                let _ = self.wake.wait_until(&mut state, d);
            }
        }
        state.waiters -= 1;
        state
    }

    /// Gives the reader role back and wakes whoever may want it.
    #[inline]
    pub(super) fn release_reader(&self, state: &mut State) {
        state.reading = false;
        state.releases = state.releases.wrapping_add(1);
        self.wake_all(state);
    }

    /// Wakes every sleeper, if there is one: a lone caller pays no syscall for it.
    #[inline]
    pub(super) fn wake_all(&self, state: &State) {
        if state.waiters > 0 {
            self.wake_sleepers(state);
        }
    }

    /// [`Shared::wake_all`] once there are sleepers: on the condvar, a thread waiting to
    /// send that also waits for room (`State::sender_wake`), and a caller waiting for room
    /// that watches for the peer's hang-up (`State::hang_up_watch`).
    #[cold]
    #[inline(never)]
    fn wake_sleepers(&self, state: &State) {
        self.wake.notify_all();
        if let Some(sender) = &state.sender_wake {
            let _ = sender.write(1);
        }
        if let Some(watch) = &state.hang_up_watch {
            let _ = watch.write(1);
        }
    }

    /// Takes the reader role, receives one message and routes it: a reply to its caller's
    /// slot, a request to the queue serving threads take from. Returns the lock, re-taken;
    /// the waiters were woken under it, so they find the message routed. The role is
    /// released before returning. What the reader can handle itself is handed back rather
    /// than routed: a caller's own reply (its slot is gone), a request for a runner that
    /// nothing is queued before.
    pub(super) fn read<'a>(
        &'a self,
        mut state: Guard<'a>,
        deadline: Option<Instant>,
        reader: Reader,
    ) -> (Guard<'a>, Option<Taken>) {
        state.reading = true;
        let mut frame = std::mem::take(&mut state.buffer);
        let mut recv = std::mem::take(&mut state.recv);
        drop(state);
        let result = self.receive(&mut recv, &mut frame, deadline);
        let mut state = self.state.lock();
        state.recv = recv;
        if reader == Reader::Runner
            && result.is_ok()
            && envelope::kind_byte(&frame.payload) == Some(Kind::Call as u8)
            && state.calls.is_empty()
            && state.oneways_run == state.oneways_arrived
        {
            // The common case, without `route`'s general matching: a call to run now.
            self.release_reader(&mut state);
            return (state, Some(Taken::Request(frame, Run::CALL)));
        }
        self.route(state, frame, result, reader)
    }

    /// The reader's receive: the next message into `frame`, and its lane word taken in (also
    /// that of a message refused for its size, whose envelope the socket keeps).
    #[inline]
    pub(super) fn receive(
        &self,
        recv: &mut RecvState,
        frame: &mut Frame,
        deadline: Option<Instant>,
    ) -> Result<()> {
        #[cfg(test)]
        let _held = self.receive_gate.lock();
        let result = self.socket.recv_with_state(recv, frame, deadline);
        self.received(frame, result)
    }

    /// The outcome of a receive into `frame`, once the lane has taken in its lane word.
    #[inline(always)]
    pub(super) fn received(&self, frame: &mut Frame, result: Result<()>) -> Result<()> {
        if result.as_ref().is_ok() || result.as_ref().is_err_and(Error::came_whole) {
            self.lane.on_message(&mut frame.payload);
        }
        result
    }

    /// Releases the reader role (for a call this end could not receive, once it is answered)
    /// and routes what it received (see [`Shared::read`]). The readers take their common
    /// cases before calling this — a caller's own whole reply (`read_own`), a call a runner
    /// can run now (`read`) — so it never sees the latter. The fds of what nothing takes are
    /// closed with the lock let go ([`Shared::close_unclaimed`]).
    pub(super) fn route<'a>(
        &'a self,
        state: Guard<'a>,
        frame: Frame,
        result: Result<()>,
        reader: Reader,
    ) -> (Guard<'a>, Option<Taken>) {
        let (state, taken) = self.route_claimed(state, frame, result, reader);
        match state.unclaimed.is_empty() {
            true => (state, taken),
            false => (self.close_unclaimed(state), taken),
        }
    }

    /// Hands the fds of messages nothing took (`State::unclaimed`) to the
    /// [`closer`](crate::closer): closing an fd may wait for as long as the peer that sent it
    /// likes (a pipe whose lock it holds, a TCP socket whose unsent data lingers), and no
    /// thread of the connection's may wait for that. Handed with the lock let go (and taken
    /// again): the hand-off may start a closer thread, or, if none can start, close them here.
    #[cold]
    #[inline(never)]
    pub(super) fn close_unclaimed<'a>(&'a self, mut state: Guard<'a>) -> Guard<'a> {
        let mut unclaimed = std::mem::take(&mut state.unclaimed);
        drop(state);
        crate::closer::close_all(&mut unclaimed);
        self.state.lock()
    }

    /// [`Shared::route`], leaving the fds of what nothing takes in `State::unclaimed`.
    #[inline(always)]
    fn route_claimed<'a>(
        &'a self,
        mut state: Guard<'a>,
        mut frame: Frame,
        result: Result<()>,
        reader: Reader,
    ) -> (Guard<'a>, Option<Taken>) {
        // A message whose fds were dropped was still received whole, and one refused for its
        // size was read to its end with its envelope kept: either way the stream is in sync
        // and the envelope says whose it was, so only that message fails. Without an
        // envelope (a refused message interrupted by another), the connection ends.
        let whole = result.as_ref().is_ok() || result.as_ref().is_err_and(Error::came_whole);
        let envelope = match whole.then(|| Envelope::read(&frame.payload).ok()).flatten() {
            Some(envelope) => envelope,
            None => {
                self.release_reader(&mut state);
                match result {
                    Err(Error::TimedOut) => {}
                    Err(e) => self.fail(&mut state, e),
                    Ok(()) => self.fail(&mut state, Error::Malformed("bad envelope".into())),
                }
                keep_unread(&mut state, frame);
                return (self.say_end(state), None);
            }
        };
        // A reply is said once it is where its caller finds it and the role is given back: a
        // write to stderr may block (a pipe nobody empties), and neither the caller nor the
        // next reader need wait for it.
        let reply_line = match envelope.kind {
            Kind::Reply | Kind::Failure if self.trace => {
                Some(self.incoming_line(&envelope, &frame, result.as_ref().err()))
            }
            _ => None,
        };
        // A call this end could not receive is answered with the role still held: see
        // `answer_unreceived`, which gives it back.
        let owes = envelope.kind == Kind::Call && result.is_err() && !state.drops_requests();
        if !owes {
            self.release_reader(&mut state);
        }
        if result.is_err() {
            // Delivered as an error (its fds were dropped), so never decoded.
            self.lane.finished(&frame.payload);
        }
        match (envelope.kind, result) {
            (Kind::Reply | Kind::Failure, result) if reader == Reader::Caller(envelope.cookie) => {
                if !state.pending.is_empty() {
                    state.pending.remove(&envelope.cookie);
                }
                let state = self.say_unlocked(state, reply_line);
                return (state, Some(Taken::Reply(result.map(|()| frame))));
            }
            (Kind::Reply | Kind::Failure, result) => {
                match state.pending.get_mut(&envelope.cookie) {
                    Some(slot @ None) => *slot = Some(result.map(|()| frame)),
                    // Its caller gave up, or this is a second answer to one call (a peer that
                    // answers twice): dropped unread, the first left for its caller.
                    _ => {
                        self.lane.finished(&frame.payload);
                        unclaimed(&mut state, &mut frame);
                    }
                }
                state = self.say_unlocked(state, reply_line);
            }
            // This end closed the connection, or stopped reading and reads on only for the
            // replies its handlers wait for: what the peer sends is not run (dropped here,
            // closing its fds).
            (Kind::Call | Kind::Oneway, ref result) if state.drops_requests() => {
                state = self.trace_unlocked(state, &envelope, &frame, result.as_ref().err());
                keep_unread(&mut state, frame);
            }
            (Kind::Oneway, Ok(()))
                if reader == Reader::Runner
                    && state.oneways.is_empty()
                    && !state.oneway_running
                    && state.calls.is_empty() =>
            {
                state.oneway_running = true;
                state.oneways_arrived += 1;
                return (state, Some(Taken::Request(frame, Run::ONEWAY)));
            }
            // Refused by the backlog, which ends the connection.
            (Kind::Call | Kind::Oneway, Ok(())) if !self.admit(&mut state) => {
                state = self.trace_unlocked(state, &envelope, &frame, None);
            }
            (Kind::Call, Ok(())) => {
                let line = self.held_line(&state, &envelope, &frame);
                let frame = to_queue(&mut state, frame);
                let after = state.oneways_arrived;
                state.backlog.add(Cost::of(&frame));
                let held = line.is_some();
                state.calls.push_back(Queued { frame, after, held });
                state = self.say_unlocked(state, line);
            }
            (Kind::Oneway, Ok(())) => {
                let line = self.held_line(&state, &envelope, &frame);
                let frame = to_queue(&mut state, frame);
                state.oneways_arrived += 1;
                state.backlog.add(Cost::of(&frame));
                let (after, held) = (0, line.is_some());
                state.oneways.push_back(Queued { frame, after, held });
                state = self.say_unlocked(state, line);
            }
            (Kind::Call, Err(e)) => {
                state = self.answer_unreceived(state, &envelope, &frame, &e, reader);
                keep_unread(&mut state, frame);
            }
            (Kind::Oneway, Err(e)) => {
                drop(self.trace_unlocked(state, &envelope, &frame, Some(&e)));
                // Nobody waits for a oneway's outcome, so say it here rather than lose it.
                let registry = Arc::clone(&self.registry.lock());
                let served = registry.services.iter().map(|(info, _)| *info);
                failure::oneway_failed(
                    &self.name,
                    self.trace,
                    &envelope,
                    served,
                    &unreceived(&e, true),
                );
                drop(registry);
                state = self.state.lock();
                keep_unread(&mut state, frame);
            }
            // The peer's last words: it hangs up after them.
            (Kind::Refusal, result) => {
                state = self.trace_unlocked(state, &envelope, &frame, result.as_ref().err());
                let why = result.map_or_else(|e| e, |()| envelope::refused(&frame.payload));
                self.fail(&mut state, why);
                keep_unread(&mut state, frame);
            }
            // The peer's last words at a graceful shutdown: what it has not answered did not
            // run, nor will it.
            (Kind::ShutDown, result) => {
                state = self.trace_unlocked(state, &envelope, &frame, result.as_ref().err());
                self.fail(&mut state, result.err().unwrap_or(Error::ShutDown));
                keep_unread(&mut state, frame);
            }
            // The peer gave up on its call: dropped unrun if it is still queued (one running
            // cannot be stopped: it is this end's code, on a thread of its own). Whatever
            // else the message holds (a hostile peer's body or fds) is dropped with it.
            (Kind::Cancel, result) => {
                // Before it is said: the trace shows the call gone once it says the cancel.
                let dropped = self.cancel_queued(&mut state, envelope.cookie);
                state = self.trace_unlocked(state, &envelope, &frame, result.as_ref().err());
                if result.is_ok() {
                    self.lane.finished(&frame.payload);
                }
                keep_unread(&mut state, frame);
                if let Some(owed) = dropped {
                    state = self.dropped_cancelled(state, envelope.cookie, owed);
                    // The last request a drain waited for may be the one dropped: nothing
                    // finishes to say so then.
                    if state.draining {
                        self.stop_reading_once_idle(&state);
                    }
                }
            }
            (Kind::Announce, result) => {
                // Not with the lock held: a write to stderr may block.
                state = self.trace_unlocked(state, &envelope, &frame, result.as_ref().err());
                match result.and_then(|()| envelope::announcement(&frame.payload)) {
                    Ok((mailbox, token)) => self.lane.on_announce(mailbox, token),
                    Err(e) => self.fail(&mut state, e),
                }
                keep_unread(&mut state, frame);
            }
        }
        // Said here if this message ended the connection (`fail`, maybe by way of `admit`).
        (self.say_end(state), None)
    }

    /// Prints the line saying why the connection ended, if it is still unsaid, with the lock
    /// let go meanwhile (and taken again): a write to stderr may block, and the waiters are
    /// woken already (`fail`). Nothing without tracing.
    #[inline]
    fn say_end<'a>(&'a self, state: Guard<'a>) -> Guard<'a> {
        match self.trace {
            false => state,
            true => self.say_end_with_lock_let_go(state),
        }
    }

    #[cold]
    #[inline(never)]
    fn say_end_with_lock_let_go<'a>(&'a self, mut state: Guard<'a>) -> Guard<'a> {
        match state.end_unsaid.take() {
            None => state,
            Some(line) => {
                drop(state);
                super::trace::line(&line);
                self.state.lock()
            }
        }
    }

    /// Says `line`, if there is one, with the lock let go meanwhile (and taken again).
    #[inline]
    fn say_unlocked<'a>(&'a self, state: Guard<'a>, line: Option<String>) -> Guard<'a> {
        match line {
            None => state,
            Some(line) => self.say_with_lock_let_go(state, &line),
        }
    }

    #[cold]
    #[inline(never)]
    fn say_with_lock_let_go<'a>(&'a self, state: Guard<'a>, line: &str) -> Guard<'a> {
        drop(state);
        super::trace::line(line);
        self.state.lock()
    }

    /// [`Shared::say_end`] for a thread that does not hold the lock.
    #[cold]
    #[inline(never)]
    pub(super) fn say_end_unlocked(&self) {
        drop(self.say_end_with_lock_let_go(self.state.lock()));
    }

    /// The last handle is gone, and with it the connection: it says its end now if no
    /// thread read it (nothing reads a connection whose handles are all dropped). A hang-up
    /// of the peer's that nobody read is still the peer's; else this side ended it.
    #[cold]
    #[inline(never)]
    pub(super) fn say_end_on_drop(&self) {
        use super::trace::EndedHere;
        let mut state = self.state.lock();
        if state.closed.is_none() {
            let gone = self.socket.ready_now(PollFlags::POLLIN);
            let here = match self.ended_here(&state) {
                EndedHere::No if !gone.contains(PollFlags::POLLHUP) => EndedHere::Dropped,
                here => here,
            };
            state.end_unsaid = Some(super::trace::ended(&self.name, &Error::Disconnected, here));
        }
        if let Some(line) = state.end_unsaid.take() {
            drop(state);
            super::trace::line(&line);
        }
    }

    /// The line saying a request about to be queued as received, if tracing is on and nothing
    /// serves this end (no thread in `run`, none coming): it waits for a serving thread,
    /// which may never come (a connection that serves nothing, its peer's calls left to time
    /// out), so it is said now, `not served yet`, rather than only once it runs.
    #[inline]
    fn held_line(&self, state: &State, envelope: &Envelope, frame: &Frame) -> Option<String> {
        match self.trace && state.runners == 0 && !state.runners_coming {
            false => None,
            true => Some(self.held_incoming_line(envelope, frame)),
        }
    }

    /// Traces a message as received, if tracing is on: a request that will not run (a oneway
    /// refused for its size or its fds, a request refused by the backlog or read after
    /// `close`; a call refused for its size or fds is said by `answer_unreceived`, and one
    /// that runs when it does). Called with the role given back, and the lock is let go
    /// meanwhile: a write to stderr may wait, and other callers must not wait for it.
    #[inline]
    fn trace_unlocked<'a>(
        &'a self,
        state: Guard<'a>,
        envelope: &Envelope,
        frame: &Frame,
        unreceived: Option<&Error>,
    ) -> Guard<'a> {
        match self.trace {
            false => state,
            true => self.trace_with_lock_let_go(state, envelope, frame, unreceived),
        }
    }

    #[cold]
    #[inline(never)]
    fn trace_with_lock_let_go<'a>(
        &'a self,
        state: Guard<'a>,
        envelope: &Envelope,
        frame: &Frame,
        unreceived: Option<&Error>,
    ) -> Guard<'a> {
        drop(state);
        super::trace::line(&self.incoming_line(envelope, frame, unreceived));
        self.state.lock()
    }

    /// Answers a call this end could not receive (`e`: over its limits, or its fds dropped)
    /// with a failure. A caller reading for its reply must not wait to send it (its peer may
    /// not read, its timeout may pass), nor may a thread reading while it waits to send (it
    /// holds the send lock): it tries once, and if the failure would have to wait, a serving
    /// thread sends it (`owed`), as it would a reply.
    ///
    /// Called with the reader role held, and gives it back: a runner before it waits to
    /// send, a caller or sender only once the failure is out or queued. Otherwise a runner
    /// woken as the caller lets go could take the role first and wait in the socket, with no
    /// deadline, while the failure it would send is queued behind it: then nothing answers
    /// the peer until it sends something more, which it may not before it has its answer.
    ///
    /// The call (`frame`), and the failure if it went out, are said once the role is given
    /// back, with the lock let go: a write to stderr may block, and every caller may be
    /// waiting for the reader.
    #[cold]
    #[inline(never)]
    fn answer_unreceived<'a>(
        &'a self,
        mut state: Guard<'a>,
        envelope: &Envelope,
        frame: &Frame,
        e: &Error,
        reader: Reader,
    ) -> Guard<'a> {
        let wait = reader == Reader::Runner;
        if wait {
            self.release_reader(&mut state);
        }
        drop(state);
        let received = self
            .trace
            .then(|| self.incoming_line(envelope, frame, Some(e)));
        let failure = unreceived(e, false);
        let sent = self.send_failure(envelope, &failure, wait);
        let mut state = self.state.lock();
        let answered = match sent {
            Ok(true) => Some(failure),
            Ok(false) => {
                if self.admit(&mut state) {
                    state.backlog.add(Cost::default());
                    state.owed.push_back((*envelope, failure));
                }
                None
            }
            Err(e) => {
                // The caller would wait for good for an answer that cannot come.
                self.unanswerable(&mut state, &e);
                None
            }
        };
        if !wait {
            // Wakes the runners, which take the failure queued before they read.
            self.release_reader(&mut state);
        }
        let Some(received) = received else {
            return state;
        };
        drop(state);
        super::trace::line(&received);
        if let Some(failure) = answered {
            super::trace::failure(&self.name, envelope.cookie, &failure);
        }
        self.state.lock()
    }

    /// Whether a request the reader received may join the queue: not if the queue is at its
    /// bounds and either nothing serves (no thread in `run` would ever take it) or it is at
    /// [`HARD_FACTOR`](super::backlog::HARD_FACTOR) times them, unless the peer has gone
    /// for good (what it left in the socket, bounded by its send buffer, is read to its end,
    /// so that its oneways run and its callers here get their replies). Runners stop reading
    /// at the bounds (`run_loop`), so only a caller waiting for its reply, or a thread whose
    /// send found the peer gone, reads past them. A request refused ends the connection, and
    /// the queued ones are dropped (with their fds): nothing is to run after that.
    #[inline]
    fn admit(&self, state: &mut State) -> bool {
        if !state.backlog.full() {
            return true;
        }
        // Threads a listening server has started for this connection serve it once they are
        // in `run`: what is read before then waits for them, as for threads serving.
        let serving = state.runners > 0 || state.runners_coming;
        // Past the hard cap, the kernel says whether the peer has gone (one `poll`, only there).
        let Some(why) = state.backlog.refuse(serving, || self.socket.has_ended()) else {
            return true;
        };
        self.fail(state, why);
        let calls = std::mem::take(&mut state.calls);
        for mut queued in calls.into_iter().chain(std::mem::take(&mut state.oneways)) {
            unclaimed(state, &mut queued.frame);
        }
        state.owed.clear();
        state.backlog = Default::default();
        false
    }

    /// Ends the connection for [`Connection::close`](super::Connection::close): from now on
    /// no request runs (`route` drops those read later), and those queued are taken out,
    /// with the failures owed, for the caller to drop outside the lock (closing their fds),
    /// and whether anything served (a thread in `run`, or one coming). Everyone waiting is
    /// woken: the serving threads return once their handlers are done.
    #[cold]
    #[inline(never)]
    pub(super) fn close_here(&self) -> (VecDeque<Queued>, VecDeque<Queued>, bool) {
        let mut state = self.state.lock();
        let served = state.runners > 0 || state.runners_coming;
        state.closed_here = true;
        // A oneway owed for good (none runs, nor arrives, from now on): so the runner's
        // common case in `read` (a call with no oneway before it), which does not look at
        // `closed_here`, never takes a request again; `route` drops it.
        state.oneways_arrived = u64::MAX;
        state.owed.clear();
        state.backlog = Default::default();
        self.fail(&mut state, Error::Disconnected);
        let calls = std::mem::take(&mut state.calls);
        (calls, std::mem::take(&mut state.oneways), served)
    }

    /// Says on stderr that `oneways`, the peer's, go unrun as the connection goes with
    /// nothing serving it ([`failure::oneways_unrun`]), if there are any.
    #[cold]
    #[inline(never)]
    pub(super) fn say_oneways_unrun<'a>(&self, mut oneways: impl Iterator<Item = &'a Queued>) {
        let Some(Ok(first)) = oneways.next().map(|q| Envelope::read(&q.frame.payload)) else {
            return;
        };
        let registry = Arc::clone(&self.registry.lock());
        failure::oneways_unrun(
            &self.name,
            self.trace,
            1 + oneways.count(),
            &first,
            registry.services.iter().map(|(info, _)| *info),
            SERVE_ON_A_THREAD,
        );
    }

    /// [`Connection::stop_reading`](super::Connection::stop_reading) on a connection that
    /// serves: the requests read from now on are dropped (also those still in the socket,
    /// whose calls back into the peer would fail once the read side shuts), and the read side
    /// shuts once none of the peer's requests is in flight (running, or queued for the
    /// serving threads): at once if none is. Returns whether it drains; if not, the caller
    /// shuts the read side now. (Requests queued with no serving thread, none started
    /// either, would never finish: nothing to wait for; they run if one comes, as those still
    /// in the socket do then.)
    #[cold]
    #[inline(never)]
    pub(super) fn drain(&self) -> bool {
        let mut state = self.state.lock();
        if state.draining {
            return true;
        }
        if (state.runners == 0 && !state.runners_coming) || state.closed.is_some() {
            return false;
        }
        state.draining = true;
        state.holds -= 1; // the hold of reading as usual
        // As for `close_here`: a oneway owed for good, so that a runner's common case in
        // `read`, which does not look at `draining`, never takes a request again.
        state.oneways_arrived = u64::MAX;
        self.stop_reading_once_idle(&state);
        true
    }

    /// Shuts the read side once no request is in flight, while draining: the reader then
    /// reads the end, and the connection ends as if it had been shut at once.
    #[cold]
    #[inline(never)]
    pub(super) fn stop_reading_once_idle(&self, state: &State) {
        if state.holds == 0 && state.backlog.is_empty() {
            // Told, shut both ways: a send of the peer's then fails on a socket the peer sees
            // shut for good (`POLLHUP`), and waits for the notice to be read (`why_unsent`),
            // where with the read side alone it could not tell that one had come.
            let told = self.says_shut_down.swap(false, Ordering::SeqCst)
                && envelope::say_shut_down(&self.socket);
            if told && self.trace {
                super::trace::said_shut_down(&self.name);
            }
            let _ = match told {
                true => self.socket.shutdown(),
                false => self.socket.shutdown_read(),
            };
        }
    }

    /// What this end did that ends the connection, for the traced line saying why.
    fn ended_here(&self, state: &State) -> super::trace::EndedHere {
        use super::trace::EndedHere;
        match (
            state.closed_here,
            state.killed_here,
            self.stopped_reading.load(Ordering::SeqCst),
        ) {
            (true, ..) => EndedHere::Closed,
            (false, true, _) => EndedHere::Killed,
            (false, false, true) => EndedHere::StoppedReading,
            (false, false, false) => EndedHere::No,
        }
    }

    /// Ends the connection with `why` and wakes everyone waiting on it. Unless replies can
    /// still go out, drops the peer's calls queued ([`Shared::drop_calls_at_end`]).
    pub(super) fn fail(&self, state: &mut State, why: Error) {
        if state.closed.is_none() {
            if !matches!(why, Error::Disconnected) {
                // A protocol error leaves the stream unusable; make sure the peer sees it.
                let _ = self.socket.shutdown();
            }
            if self.trace {
                // Printed once the lock is let go, as a message's line (`say_end`).
                state.end_unsaid = Some(super::trace::ended(
                    &self.name,
                    &why,
                    self.ended_here(state),
                ));
            }
            // `close` takes what is queued itself. Else the peer hung up or died, or this end
            // shut the socket (a worker's closer), or the stream broke: the peer's calls are
            // dropped unless their replies can still go out (`SHUT_WR`, `stop_reading`).
            let replies_go = self.socket.replies_still_go(&why);
            state.closed = Some(why);
            self.ended.store(true, Ordering::Release);
            if !state.closed_here && !replies_go && !state.calls.is_empty() {
                let unsaid = self.drop_calls_at_end(state);
                debug_assert!(unsaid.is_none(), "said after the end's line, set above");
            }
        }
        self.wake_all(state);
    }

    /// A send found the peer gone after the connection had ended with replies still able to
    /// go out (the peer shut only its sending side, or this end stopped reading, and the peer
    /// has hung up or died since; [`Shared::why_unsent`]): its calls still queued are dropped
    /// now, as [`Shared::fail`] would have dropped them had the peer gone first. Nothing else
    /// watches a socket whose end has been read, so the kernel's `EPIPE` on the first reply
    /// that fails is where this end learns it.
    #[cold]
    #[inline(never)]
    pub(super) fn drop_calls_of_a_peer_gone(&self) {
        let mut state = self.state.lock();
        if state.closed.is_none()
            || state.closed_here
            || state.calls.is_empty()
            || !self.socket.has_ended()
        {
            return;
        }
        let said = self.drop_calls_at_end(&mut state);
        if !state.unclaimed.is_empty() {
            state = self.close_unclaimed(state);
        }
        drop(state);
        if let Some(said) = said {
            super::trace::line(said.trim_start_matches('\n'));
        }
    }

    /// As the connection ends with no reply able to go out: drops the peer's calls still
    /// queued, unrun, as the async flavour cancels them and as a cancel of the peer's would
    /// ([`Shared::cancel_queued`]): their fds closed once the lock is let go, a placement
    /// done with unread, each said after the line that says the end. Its oneways stay queued
    /// and still run, in order (a worker may send its last ones as it exits). With tracing
    /// on, the lines go after the end's line if that is still unsaid; else they are returned,
    /// each after a line break, to be said once the lock is let go.
    #[cold]
    #[inline(never)]
    fn drop_calls_at_end(&self, state: &mut State) -> Option<String> {
        let mut said = self.trace.then(String::new);
        for Queued { frame, .. } in std::mem::take(&mut state.calls) {
            if let Some(said) = said.as_mut()
                && let Ok(envelope) = Envelope::read(&frame.payload)
            {
                let line =
                    super::trace::dropped_cancelled_line(&self.name, envelope.cookie, false, true);
                said.push('\n');
                said.push_str(&line);
            }
            self.drop_queued(state, frame);
        }
        match (state.end_unsaid.as_mut(), said) {
            (Some(end), Some(said)) => {
                end.push_str(&said);
                None
            }
            (_, said) => said,
        }
    }
}

/// Who is reading, which decides what [`Shared::route`] hands back rather than routes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Reader {
    /// A caller waiting for the reply with this cookie.
    Caller(u64),
    /// A thread inside [`Connection::run`](super::Connection::run).
    Runner,
    /// A thread waiting for room to send, which takes nothing for itself
    /// ([`Shared::send_framed`]), or one whose send found the peer gone and reads why
    /// (`Shared::why_unsent`).
    Sender,
}

/// What to do about a connection that nothing serves, for the lines that find one.
const SERVE_ON_A_THREAD: &str = "Serve it on a thread of its own (`Connection::spawn_serve`, \
                                 `serve` or `run`, or a `Server`): `add_service` alone runs \
                                 nothing";

/// How long a caller waits with a call of the peer's held for nobody before
/// [`Shared::warn_unserved`] says so: far longer than a serving thread that is about to start
/// takes to start, even on a loaded machine.
const UNSERVED_WARNING: Duration = Duration::from_secs(2);

/// How a caller waiting for its reply goes on after [`Shared::warn_unserved`].
enum Unserved {
    /// Waits until this deadline: the caller's own, or the warning's if sooner.
    WaitUntil(Option<Instant>),
    /// Looks for its reply again before it reads or sleeps: the warning was said with the
    /// lock let go, and another reader may have read the reply, or the end, meanwhile.
    LookAgain,
}

/// Whether a call of the peer's waits for a serving thread and none serves or is coming, and
/// that has not been said yet ([`Shared::warn_unserved`]).
#[inline]
fn unserved(state: &State) -> bool {
    !state.calls.is_empty() && state.runners == 0 && !state.runners_coming && !state.unserved_said
}

/// A request waiting in the queue for a serving thread.
pub(super) struct Queued {
    pub(super) frame: Frame,
    /// For a call, the number of oneway messages that arrived before it: it runs once that
    /// many have run.
    pub(super) after: u64,
    /// It arrived while nothing served this end, and was said then, `not served yet`
    /// ([`Shared::held_line`]): once it runs, it is named
    /// ([`trace::held_until_served`](super::trace::held_until_served)).
    pub(super) held: bool,
}

/// A request about to wait in the queue, in a buffer of its own size if it is small: the
/// reader's receive buffer has room for a whole datagram (64 KiB), which a queued request
/// would otherwise hold, and count against the queue's bounds, however small it is. The
/// large buffer stays with the connection for the next read.
fn to_queue(state: &mut State, mut frame: Frame) -> Frame {
    let len = frame.payload.len();
    if frame.payload.capacity() / 2 < len {
        return frame; // mostly full already
    }
    let queued = Frame {
        payload: frame.payload.as_slice().to_vec(),
        fds: std::mem::take(&mut frame.fds),
    };
    frame.clear();
    super::serving::keep_buffer(state, frame);
    queued
}

/// What a reader handles itself.
pub(super) enum Taken {
    /// Its own reply (or why it will not come).
    Reply(Result<Frame>),
    /// A request to run now (a oneway one already marked running).
    Request(Frame, Run),
}

impl Shared {
    /// Drops the peer's call `cookie` unrun if it is still queued ([`Kind::Cancel`]): its
    /// fds closed once the lock is let go, a placement it carried done with unread. Returns
    /// whether it dropped one, and then whether it carried a placement: no reply will carry
    /// that acknowledgement, so this end owes the peer a message that does
    /// ([`Shared::dropped_cancelled`]). A cookie of no queued call (running, answered, or
    /// never sent) changes nothing.
    #[cold]
    #[inline(never)]
    fn cancel_queued(&self, state: &mut State, cookie: u64) -> Option<bool> {
        if cookie == 0 {
            return None;
        }
        let queued = state.calls.iter().position(|queued| {
            Envelope::read(&queued.frame.payload).is_ok_and(|e| e.cookie == cookie)
        });
        let call = state.calls.remove(queued?).expect("found above").frame;
        let owed = Lane::carries_placement(&call.payload);
        self.drop_queued(state, call);
        Some(owed)
    }

    /// Drops the peer's call `frame`, taken out of the queue, unrun: out of the backlog, a
    /// placement it carried done with unread, its fds closed once the lock is let go.
    fn drop_queued(&self, state: &mut State, mut frame: Frame) {
        self.dequeued(state, &frame);
        self.lane.finished(&frame.payload);
        unclaimed(state, &mut frame);
    }

    /// After [`Shared::cancel_queued`] dropped the peer's call `cookie`, with the lock let go:
    /// the trace says so (as the async flavour's does; the line that says the cancel cannot
    /// tell a call dropped from one that runs on), and if the call carried a placement, its
    /// acknowledgement goes out in a cancel of cookie 0, which cancels nothing: else the
    /// peer's lane stays busy until this end sends something else, which a server that only
    /// answers may not do for a long time (an async peer reads it at once, and its next large
    /// string goes out of line again). One try, never waiting, as for a cancel
    /// ([`Shared::send_cancel`]): if it cannot go at once, this end's next message says it.
    #[cold]
    #[inline(never)]
    fn dropped_cancelled<'a>(&'a self, state: Guard<'a>, cookie: u64, owed: bool) -> Guard<'a> {
        drop(state);
        if self.trace {
            super::trace::dropped_cancelled(&self.name, cookie, false, false);
        }
        if owed {
            self.send_cancel(0);
        }
        self.state.lock()
    }
}

/// Keeps the frame of a message that nothing takes as the read buffer: its memory, not its
/// fds, which are closed once the lock is let go ([`unclaimed`]; after a message that ended
/// the connection, nothing reads again to clear them).
#[cold]
fn keep_unread(state: &mut State, mut frame: Frame) {
    unclaimed(state, &mut frame);
    state.buffer = frame;
}

/// Takes the fds of `frame`, a message nothing takes, to be closed once the lock is let go
/// (`Shared::close_unclaimed`).
#[cold]
fn unclaimed(state: &mut State, frame: &mut Frame) {
    state.unclaimed.append(&mut frame.fds);
}

/// Registers call `cookie` to have its reply routed by whoever reads it (out of line: only a
/// caller that read something other than its reply does).
#[cold]
#[inline(never)]
fn register(state: &mut State, cookie: u64) {
    state.pending.insert(cookie, None);
}
