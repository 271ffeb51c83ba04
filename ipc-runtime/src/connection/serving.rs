//! Running requests: what is served (the registry and the serving threads' snapshots of it),
//! the serving loop, and dispatching a request to its service and its reply back.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::Serialize;

use super::admit::admit;
use super::backlog::Cost;
use super::buffers::RETAIN_MAX;
use super::envelope::{self, Envelope, Kind};
use super::failure::{self, Failure};
use super::reader::{Queued, Reader, Taken};
use super::{Connection, Guard, Registry, Shared, State, trace};
use crate::codec;
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::service::Call;

impl Connection {
    /// The body of [`Connection::run`]: run what is queued, else read, until the end.
    pub(super) fn run_loop(&self) -> Result<()> {
        // Set once for all the requests this thread runs, rather than per request: the peer
        // `current_peer` names, and where out-of-line byte strings in requests are read from.
        // (A handler that serves another connection on this thread sets and restores its own.)
        let connection = Arc::as_ptr(&self.shared).cast();
        let _caller = crate::service::CallerScope::enter(self.shared.peer, connection);
        codec::with_store(&self.shared.lane, || self.run_requests())
    }

    /// [`Connection::run_loop`] once its scope is set.
    fn run_requests(&self) -> Result<()> {
        let shared = &*self.shared;
        let mut registry = shared.registry();
        let mut state = shared.state.lock();
        loop {
            if let Some((envelope, failure)) = state.owed.pop_front() {
                let was_full = state.backlog.full();
                state.backlog.remove(Cost::default());
                if was_full {
                    shared.wake_all(&state);
                }
                state.holds += 1;
                drop(state);
                shared.reply_failure(&envelope, &failure);
                state = shared.state.lock();
                shared.finished(&mut state);
                continue;
            }
            // A call waits for the oneways that arrived before it (they may run on another
            // thread of the pool). One that may run arrived before every oneway still queued,
            // so it starts first: with one thread, requests run in the order they arrived.
            if let Some(&Queued { after, .. }) = state.calls.front()
                && after <= state.oneways_run
            {
                let Queued { frame, held, .. } = state.calls.pop_front().expect("checked above");
                shared.dequeued(&mut state, &frame);
                state.holds += 1;
                if !state.oneway_running && !state.oneways.is_empty() {
                    // A oneway that waited for this call to start may start now, on a thread
                    // asleep while another reads.
                    shared.wake_all(&state);
                }
                drop(state);
                state = shared.run_request(frame, Run { held, ..Run::CALL }, &mut registry);
                continue;
            }
            if !state.oneway_running {
                if let Some(Queued { frame, held, .. }) = state.oneways.pop_front() {
                    state.oneway_running = true;
                    shared.dequeued(&mut state, &frame);
                    state.holds += 1;
                    drop(state);
                    state = shared.run_request(
                        frame,
                        Run {
                            held,
                            ..Run::ONEWAY
                        },
                        &mut registry,
                    );
                    continue;
                }
            }
            if let Some(closed) = &state.closed {
                return match closed {
                    Error::Disconnected | Error::ShutDown => Ok(()),
                    e => Err(e.duplicate()),
                };
            }
            // At the bounds of what the queue holds, a runner reads no more (the peer's
            // sends wait) until a request has left it: one runs on another thread of the pool
            // (a oneway, which all the queued requests wait for), and it wakes this one.
            if state.reading || state.backlog.full() {
                state = shared.sleep(state, None);
                continue;
            }
            // Become the reader. A request that arrives with nothing queued before it is
            // handed back and run by this same thread at once (no queue, no hand-off); one
            // that must wait its turn is queued and run from the top of the loop. Calls run
            // in arrival order, oneways one at a time.
            let taken;
            (state, taken) = shared.read(state, None, Reader::Runner);
            if let Some(Taken::Request(frame, run)) = taken {
                state.holds += 1;
                drop(state);
                state = shared.run_request(frame, run, &mut registry);
            }
        }
    }
}

impl Shared {
    /// What is served now.
    pub(super) fn registry(&self) -> Snapshot {
        let registry = self.registry.lock();
        Snapshot {
            version: self.registry_version.load(Ordering::Acquire),
            registry: registry.clone(),
        }
    }

    /// Changes what is served: a new registry, and a new version for the snapshots to see.
    pub(super) fn update_registry(&self, change: impl FnOnce(&mut Registry)) {
        let mut registry = self.registry.lock();
        let mut new = Registry::clone(&registry);
        change(&mut new);
        let old = std::mem::replace(&mut *registry, Arc::new(new));
        self.registry_version.fetch_add(1, Ordering::Release);
        drop(registry);
        drop(old); // may drop implementations, whose code must not run under our lock
    }

    /// Takes a request `frame` out of the queue's backlog: the runners asleep at its bounds
    /// may read again.
    #[inline]
    pub(super) fn dequeued(&self, state: &mut State, frame: &Frame) {
        let was_full = state.backlog.full();
        state.backlog.remove(Cost::of(frame));
        if was_full {
            self.wake_all(state);
        }
    }

    /// A request (or a failure owed) counted in `State::holds` has finished: while this end
    /// drains ([`Connection::stop_reading`]), the last one shuts the read side.
    #[inline]
    fn finished(&self, state: &mut State) {
        state.holds -= 1;
        if state.holds == 0 {
            self.stop_reading_once_idle(state);
        }
    }

    /// Runs a request (a oneway one marked running) against `registry`, brought up to date
    /// first, and takes the lock back to keep its buffer and, for a oneway, let the next one
    /// run.
    pub(super) fn run_request(&self, frame: Frame, run: Run, registry: &mut Snapshot) -> Guard<'_> {
        if self.registry_version.load(Ordering::Acquire) != registry.version {
            *registry = self.registry();
        }
        let oneway = run.oneway;
        let mut frame = self.dispatch(frame, run, &registry.registry);
        self.lane.finished(&frame.payload);
        if !frame.fds.is_empty() {
            frame = crate::closer::frame_discarded(frame);
        }
        frame.payload.clear();
        let mut state = self.state.lock();
        self.finished(&mut state);
        if oneway {
            state.oneway_running = false;
            state.oneways_run += 1;
            self.wake_all(&state);
        }
        keep_buffer(&mut state, frame);
        state
    }

    /// Runs one request against the service it names, and replies unless it is oneway.
    /// Returns the request's frame, for its buffer.
    pub(super) fn dispatch(&self, mut frame: Frame, run: Run, registry: &Registry) -> Frame {
        let Ok(envelope) = Envelope::read(&frame.payload) else {
            return frame;
        };
        let Run { oneway, held } = run;
        if self.trace {
            match held {
                false => self.trace_incoming(&envelope, &frame),
                true => self.trace_held(&envelope, registry),
            }
        }
        let checked = admit(
            &registry.services,
            |(info, _)| info,
            &envelope,
            registry.authorizer.as_deref(),
            self.peer.as_ref(),
        );
        let failure = match checked {
            Err(failure) => Some(failure),
            Ok((_, service)) => {
                let mut call = Call {
                    cmd: envelope.cmd,
                    body: &frame.payload[envelope::LEN..],
                    fds: std::mem::take(&mut frame.fds),
                    peer: self.peer,
                    replier: (!oneway).then_some(Replier {
                        shared: self,
                        envelope,
                    }),
                    replied: false,
                    unreceived: false,
                };
                // `current_peer` and the out-of-line store are the thread's (`run_loop`).
                let outcome = catch_unwind(AssertUnwindSafe(|| service.handle(&mut call)));
                let (replied, unreceived) = (call.replied, call.unreceived);
                frame.fds = std::mem::take(&mut call.fds); // emptied; its capacity is reused
                Failure::of_outcome(outcome, replied, unreceived, oneway)
            }
        };
        match failure {
            Some(failure) if !oneway => {
                // Done with a placement the request carried (refused unread, or its handler
                // done) before the failure goes out, so that the failure carries the
                // acknowledgement: a caller that gave up on the call (timed out, its future
                // dropped) finds nothing else to give its lane back, and this end may send
                // nothing more for a long time. As the async flavour does.
                self.lane.finished(&frame.payload);
                self.reply_failure(&envelope, &failure);
            }
            Some(failure) => {
                let served = registry.services.iter().map(|(info, _)| *info);
                failure::oneway_failed(&self.name, self.trace, &envelope, served, &failure);
            }
            None => {}
        }
        frame
    }

    /// Answers `call` with `failure`, waiting for room as long as it takes, and says so. If
    /// it cannot go out, the connection ends ([`Shared::unanswerable`]); if the peer has
    /// gone, what it sent is read to its end first, as after a reply ([`Replier::send`]).
    pub(super) fn reply_failure(&self, call: &Envelope, failure: &Failure) {
        match self.send_failure(call, failure, true) {
            Ok(_) if self.trace => trace::failure(&self.name, call.cookie, failure),
            Ok(_) => {}
            Err(e) => {
                let e = self.why_unsent(e, None);
                let mut state = self.state.lock();
                self.unanswerable(&mut state, &e);
                // The calls dropped as it ended ([`Shared::fail`]) hold fds to close.
                if !state.unclaimed.is_empty() {
                    drop(self.close_unclaimed(state));
                }
            }
        }
    }

    /// After the failure owed to a caller could not be sent either (`e`): ends the connection
    /// ([`Error::unanswerable`]).
    #[cold]
    #[inline(never)]
    pub(super) fn unanswerable(&self, state: &mut State, e: &Error) {
        if let Some(why) = e.unanswerable() {
            self.fail(state, why);
        }
    }

    /// Answers `call` with `failure`, unsaid. Without `wait`, only if it can go out at once:
    /// `Ok(false)` if it would have had to wait (nothing is sent then).
    pub(super) fn send_failure(
        &self,
        call: &Envelope,
        failure: &Failure,
        wait: bool,
    ) -> Result<bool> {
        let envelope = Envelope {
            kind: Kind::Failure,
            ..*call
        };
        // Cut until it is within this side's limits (`Failure::shorter`).
        let mut cut: Option<Failure> = None;
        loop {
            let failure = cut.as_ref().unwrap_or(failure);
            // Without `wait`, a deadline already passed: one try (a failure is one datagram,
            // so it goes out whole or not at all).
            match self.send(&envelope, failure, (!wait).then(Instant::now)) {
                Ok(_) => return Ok(true),
                Err(Error::TimedOut) if !wait => return Ok(false),
                Err(e) => match failure.shorter(&e) {
                    Some(shorter) => cut = Some(shorter),
                    None => return Err(e),
                },
            }
        }
    }

    pub(super) fn trace_incoming(&self, envelope: &Envelope, frame: &Frame) {
        trace::line(&self.incoming_line(envelope, frame, None));
    }

    /// Traces a request that was said as received when it arrived ([`Shared::held_line`]) as
    /// it starts to run: named now, if it is served (its failure says so otherwise).
    #[cold]
    #[inline(never)]
    fn trace_held(&self, envelope: &Envelope, registry: &Registry) {
        let served = registry.services.iter().map(|(info, _)| *info);
        if let Some(line) = trace::held_until_served(&self.name, envelope, served) {
            trace::line(&line);
        }
    }

    /// What [`Shared::held_line`] says: the request as received, `not served yet`.
    pub(super) fn held_incoming_line(&self, envelope: &Envelope, frame: &Frame) -> String {
        self.received_line(envelope, frame, trace::Held::NotServed, None)
    }

    /// What [`Shared::trace_incoming`] says.
    pub(super) fn incoming_line(
        &self,
        envelope: &Envelope,
        frame: &Frame,
        unreceived: Option<&Error>,
    ) -> String {
        self.received_line(envelope, frame, trace::Held::No, unreceived)
    }

    /// [`trace::incoming_line`] against what is served now (out of line: only ever with
    /// tracing on).
    #[cold]
    #[inline(never)]
    fn received_line(
        &self,
        envelope: &Envelope,
        frame: &Frame,
        held: trace::Held,
        unreceived: Option<&Error>,
    ) -> String {
        let registry = self.registry().registry;
        let served = registry.services.iter().map(|(info, _)| *info);
        trace::incoming_line(&self.name, envelope, frame, served, held, unreceived)
    }
}

/// What a serving thread knows of a request it runs, besides its frame.
#[derive(Clone, Copy)]
pub(super) struct Run {
    /// A oneway message, not a call.
    pub(super) oneway: bool,
    /// Said as received when it arrived, with nothing serving this end ([`Queued::held`]).
    pub(super) held: bool,
}

impl Run {
    /// A call read by the thread that runs it.
    pub(super) const CALL: Run = Run {
        oneway: false,
        held: false,
    };
    /// A oneway message read by the thread that runs it.
    pub(super) const ONEWAY: Run = Run {
        oneway: true,
        held: false,
    };
}

/// A serving thread's copy of the registry, and the version it was taken at.
pub(super) struct Snapshot {
    version: u64,
    registry: Arc<Registry>,
}

/// Keeps an emptied buffer for the next read if it is larger than the one kept, and not too
/// big to hoard.
#[inline]
pub(super) fn keep_buffer(state: &mut State, frame: Frame) {
    let capacity = frame.payload.capacity();
    if capacity <= RETAIN_MAX && state.buffer.payload.capacity() < capacity {
        state.buffer = frame;
    }
}

/// Where a [`Call`]'s reply goes.
pub(crate) struct Replier<'a> {
    shared: &'a Shared,
    envelope: Envelope,
}

impl Replier<'_> {
    pub(crate) fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<()> {
        let envelope = Envelope {
            kind: Kind::Reply,
            ..self.envelope
        };
        // Said before it is sent, so that the caller's `<-` line for it, in a stderr they
        // share, comes after it. This thread holds nothing another may wait for.
        if self.shared.trace {
            self.say(envelope.cookie, value);
        }
        let sent = self.shared.send(&envelope, value, None);
        if let Err(e) = &sent {
            self.failed(envelope.cookie, e);
        }
        sent.map(drop)
    }

    /// The reply to call `cookie` could not go out (`e`): says so, and if the peer has gone,
    /// reads what it sent to its end (as a send does, [`Shared::why_unsent`]), so that the
    /// calls still in the socket are dropped there rather than run for nobody: a serving
    /// thread would read and run them one by one, each before it could see the end. (The
    /// handler still gets `e`: borrowed, as the reply's path costs 10 instructions more a
    /// call when this takes it and returns what `why_unsent` says.)
    #[cold]
    #[inline(never)]
    fn failed(&self, cookie: u64, e: &Error) {
        if self.shared.trace {
            trace::send_failed(&self.shared.name, "Reply", cookie, e, None);
        }
        if matches!(e, Error::Disconnected) {
            self.shared.why_unsent(Error::Disconnected, None);
        }
    }

    /// Says the reply `value` to call `cookie` (out of line: only ever with tracing on).
    #[cold]
    #[inline(never)]
    fn say<T: Serialize + ?Sized>(&self, cookie: u64, value: &T) {
        let value = trace::described(true, value);
        trace::reply(&self.shared.name, cookie, value.as_deref());
    }
}
