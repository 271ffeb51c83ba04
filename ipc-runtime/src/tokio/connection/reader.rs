//! The reader task: it receives each message and routes it (a reply to its call, a request
//! to be served), keeps what the peer's requests hold within the backlog's bounds (waiting
//! for room at them), and ends the connection when reading ends; then, while calls of the
//! peer's run on with their replies still to go out (a peer that shut only its sending side),
//! watches for the peer's hang-up to cancel them. Apart because it is the one task every
//! connection has, and the only one that reads.

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};

use ::tokio::io::Interest;
use ::tokio::sync::futures::Notified;

use super::serving::{Cancelled, reply_failure};
use super::{Inner, State, TaskGuard};
use crate::connection::backlog::Cost;
use crate::connection::trace;
use crate::connection::unreceived;
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::tokio::envelope::{self, Envelope, Kind};

/// Receives until the connection ends, routing each message, then cancels the peer's calls
/// that run on if the peer hangs up for good while they do
/// ([`Inner::cancel_calls_once_the_peer_goes`]). `ending` is made before the task is spawned,
/// so that it ends the connection however the task ends, also dropped before it ever ran (see
/// [`ReaderEnding`]).
pub(super) async fn read_loop(mut ending: ReaderEnding) {
    read_messages(ending.inner.clone()).await;
    ending.finished = true;
    // Nothing reads the socket any more, yet calls of the peer's may run on, their replies
    // still able to go out (the peer shut only its sending side, or this end stopped
    // reading): the connection has ended by now.
    if ending.inner.lock().calls_running > 0 {
        Box::pin(ending.inner.cancel_calls_once_the_peer_goes()).await;
    }
}

/// The end of the reader task, however it ends. Dropped unfinished when the runtime shuts
/// down, also before the task ever ran (the runtime dropped without running it, or closing,
/// which drops a task inside `spawn`): the connection must end then too, or its callers (on
/// other runtimes) wait for good for replies nobody reads, and its peer for a hang-up.
pub(super) struct ReaderEnding {
    inner: Arc<Inner>,
    finished: bool,
    /// Declared last: dropped after `inner`, as the task's last act (once the last guard
    /// goes, `run` returns).
    _guard: TaskGuard,
}

impl ReaderEnding {
    /// The end of the reader of `inner`, the task `guard` counts.
    pub(super) fn new(inner: Arc<Inner>, guard: TaskGuard) -> ReaderEnding {
        ReaderEnding {
            inner,
            finished: false,
            _guard: guard,
        }
    }
}

impl Drop for ReaderEnding {
    fn drop(&mut self) {
        if !self.finished {
            self.inner.fail(Error::Io(io::Error::other(
                "the tokio runtime running the connection shut down",
            )));
        }
        self.inner.retire_services(false);
    }
}

async fn read_messages(inner: Arc<Inner>) {
    let mut buffer = Frame::default();
    // This task is the socket's only receiver: it keeps the receive state itself, with a
    // message part-way in if the socket was received on before, and takes no lock for it.
    let mut recv = inner.socket().take_recv_state();
    // The peer has gone while the reader waited for room: it reads on to the end.
    let mut peer_gone = false;
    let why = loop {
        let mut ready = match inner.io.readable().await {
            Ok(ready) => ready,
            Err(e) => break Error::from(e),
        };
        let result = match inner.socket().try_recv_with_state(&mut recv, &mut buffer) {
            Ok(false) => {
                ready.clear_ready();
                continue;
            }
            Ok(true) => Ok(()),
            // The message was consumed whole without its fds, or refused for its size and
            // read to its end: its bytes (its envelope) say whose it was.
            Err(e @ Error::FdsDropped { .. }) => Err(e),
            Err(e) if e.is_over_limits() => Err(e),
            // (The peer's reset, said before what it sent, the receive reads past.)
            Err(e) => break e,
        };
        drop(ready);
        match inner.route(take_message(&mut buffer), result) {
            Ok(false) => {}
            Ok(true) => {
                if !inner.wait_for_room(&mut peer_gone).await {
                    // This end hung up meanwhile: what is still in the socket is not taken.
                    break Error::Disconnected;
                }
            }
            Err(why) => break why,
        }
    };
    inner.fail(why);
}

/// Waits for `room` to be signalled (`false`) or for `gone`, the peer's hang-up, whichever
/// comes first (`true`).
async fn hung_up_first(
    mut room: Pin<&mut Notified<'_>>,
    mut gone: Pin<&mut impl Future<Output = ()>>,
) -> bool {
    std::future::poll_fn(|cx| match room.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(false),
        Poll::Pending => gone.as_mut().poll(cx).map(|()| true),
    })
    .await
}

/// The message in `buffer`, leaving `buffer` ready for the next: a small message is copied out
/// so the 64 KiB receive buffer is reused rather than kept by every request in flight.
fn take_message(buffer: &mut Frame) -> Frame {
    let fds = std::mem::take(&mut buffer.fds);
    if buffer.payload.len() * 2 <= buffer.payload.capacity() {
        let payload = buffer.payload.clone(); // exactly its length
        buffer.payload.clear();
        Frame { payload, fds }
    } else {
        Frame {
            payload: std::mem::take(&mut buffer.payload),
            fds,
        }
    }
}

impl Inner {
    /// Routes one received message; `Err` ends the connection. A message received as an
    /// error (its fds dropped, or refused for its size) fails only its call, or is answered
    /// with a failure if it is a request, as long as its envelope is there to say whose.
    /// `Ok(true)`: the backlog is at its bounds and no call of this end waits for a reply, so
    /// the reader waits for room.
    fn route(self: &Arc<Self>, mut frame: Frame, received: Result<()>) -> Result<bool> {
        let envelope = match (Envelope::read(&frame.payload), received) {
            (Ok(envelope), received) => (envelope, received),
            (Err(_), Err(e)) => return Err(e),
            (Err(_), Ok(())) => {
                frame.discard_fds();
                return Err(Error::Malformed("bad envelope".into()));
            }
        };
        let (envelope, received) = envelope;
        // (Every arm that drops `frame` hands its fds to the closer: this is the connection's
        // only reader, and closing a peer's fd may wait as long as the peer likes.)
        // A reply is said once its caller has it: a write to stderr may block (a pipe nobody
        // empties), and this task is the only one that reads.
        let reply_line = match self.trace {
            true => self.trace_incoming(&envelope, &frame, received.as_ref().err()),
            false => None,
        };
        match &received {
            Ok(()) => self.lane.on_message(&mut frame.payload),
            // Delivered as an error, so never decoded; the lane word of a message refused for
            // its size or whose fds were dropped still counts (as in the blocking flavour's
            // `receive`).
            Err(e) => {
                if e.came_whole() {
                    self.lane.on_message(&mut frame.payload);
                }
                self.lane.finished(&frame.payload);
            }
        }
        match (envelope.kind, received) {
            (Kind::Reply | Kind::Failure, received) => {
                let (answered, pause) = {
                    let mut state = self.lock();
                    let answered = state
                        .pending
                        .answer(envelope.cookie, received.map(|()| frame));
                    (answered, self.must_pause(&state))
                };
                match answered {
                    Ok(Some(waker)) => waker.wake(),
                    Ok(None) => {} // it has not waited yet: it finds the reply when it does
                    // Its call was dropped: the frame is dropped here, its fds closed by the
                    // closer (not on this task: a close may wait as long as the peer likes).
                    Err(Ok(mut frame)) => {
                        self.lane.finished(&frame.payload);
                        frame.discard_fds();
                    }
                    Err(Err(_)) => {}
                }
                if let Some(line) = reply_line {
                    trace::line(&line);
                }
                return Ok(pause);
            }
            // This end closed the connection, or stopped reading and reads on only for the
            // replies its handlers wait for: what the peer sends is not run (dropped here,
            // closing its fds).
            (Kind::Call | Kind::Oneway, Err(_))
                if self.dropping_requests.load(Ordering::SeqCst) != 0 => {}
            (Kind::Call | Kind::Oneway, Ok(())) => {
                #[cfg(test)]
                super::run_before_admit();
                let mut state = self.lock();
                // Checked under the lock that `drain` sets it under: a request is either
                // counted in flight before a drain looks, or dropped.
                if self.dropping_requests.load(Ordering::SeqCst) != 0 {
                    drop(state);
                    frame.discard_fds();
                    return Ok(false);
                }
                let cost = match self.admit(&state, Cost::of(&frame)) {
                    Ok(cost) => cost,
                    Err(why) => {
                        drop(state);
                        frame.discard_fds();
                        return Err(why);
                    }
                };
                let task = match state.serving {
                    true => self.dispatch(&mut state, frame, envelope, cost),
                    false => {
                        state.held.push((frame, envelope, cost));
                        None
                    }
                };
                let pause = self.must_pause(&state);
                drop(state);
                if let Some(task) = task {
                    self.spawn(task); // not under the lock (see `spawn`)
                }
                return Ok(pause);
            }
            (Kind::Call, Err(e)) => {
                // Counted until its failure is out, as a request, and so pausing the reader
                // at the bounds as one does (a peer that reads none of the failures).
                let (cost, pause) = {
                    let state = self.lock();
                    let cost = self.admit(&state, Cost::default())?;
                    (cost, self.must_pause(&state))
                };
                let failure = unreceived(&e, false);
                let inner = self.clone();
                let guard = self.tasks.enter();
                self.runtime.spawn(async move {
                    let _ = reply_failure(inner.clone(), envelope, failure).await;
                    inner.finished(cost);
                    drop(inner); // before `guard`: once the last guard goes, `run` returns
                    drop(guard);
                });
                return Ok(pause);
            }
            (Kind::Oneway, Err(e)) => {
                // Nobody waits for a oneway's outcome, so say it here rather than lose it.
                let failure = unreceived(&e, true);
                self.oneway_failed(&envelope, &failure);
            }
            // The peer's last words: it hangs up after them.
            (Kind::Refusal, received) => {
                frame.discard_fds();
                return Err(received.map_or_else(|e| e, |()| envelope::refused(&frame.payload)));
            }
            // The peer's last words at a graceful shutdown: what it has not answered did not
            // run, nor will it.
            (Kind::ShutDown, received) => {
                frame.discard_fds();
                return Err(received.err().unwrap_or(Error::ShutDown));
            }
            // The peer gave up on its call: dropped here if it can be. Whatever else the
            // message holds (a hostile peer's body or fds) is dropped with it; its lane word
            // was taken in above.
            (Kind::Cancel, _) => {
                self.lane.finished(&frame.payload);
                frame.discard_fds();
                self.cancel_served(envelope.cookie);
            }
            (Kind::Announce, received) => {
                frame.discard_fds();
                let (mailbox, token) =
                    received.and_then(|()| envelope::announcement(&frame.payload))?;
                self.lane.on_announce(mailbox, token);
            }
        }
        Ok(false)
    }

    /// Takes a request that holds `cost` into the backlog, unless the connection must end
    /// instead: at the bounds, the reader reads only for a call of this end waiting for its
    /// reply, and takes requests in up to `HARD_FACTOR` times them if something serves, none
    /// if nothing does (see [`backlog`](crate::connection::backlog)). Past that if the peer
    /// has gone for good and something serves: what it left in the socket, bounded by its
    /// send buffer, is read to its end, so that its oneways run.
    #[inline]
    fn admit(&self, state: &State, cost: Cost) -> Result<Cost> {
        let backlog = self.backlog.get();
        if backlog.full() {
            let serving = state.serving || state.server_coming;
            // The kernel says whether the peer has gone (one `poll`, only past the cap).
            if let Some(why) = backlog.refuse(serving, || self.socket().has_ended()) {
                return Err(why);
            }
        }
        self.backlog.add(cost);
        Ok(cost)
    }

    /// Whether the reader must wait for room before it reads again: the backlog is at its
    /// bounds, and no call of this end needs it to read on. A call does if a handler of this
    /// connection made it (the requests held may wait for that handler), or if nothing serves
    /// yet (nothing would make room: an `AsyncServer::service_with` whose `make` calls the
    /// client serves only once that call is answered, and with nothing coming either, the
    /// reader reads on to end the connection rather than hold the call for good). Other calls
    /// wait for room with the reader, their replies read once handlers have finished (see
    /// [`backlog`](crate::connection::backlog)).
    #[inline]
    pub(super) fn must_pause(&self, state: &State) -> bool {
        let needed = match state.serving {
            true => !state.pending.no_handler_waits(),
            false => !state.pending.nobody_waits(),
        };
        !needed && self.backlog.get().full()
    }

    /// Waits until the reader may read again: the backlog is below its bounds, a call of
    /// this end needs it to read on, or the peer has gone (`true`); or this end hung up
    /// (`false`).
    ///
    /// Meanwhile it watches for the peer's hang-up, which nothing else would read until a
    /// request finishes, which may be never (a handler that waits for a call of this end's,
    /// or for good): once the peer has gone, it reads on to hear the end, so that waiting
    /// calls fail and the peer's calls are cancelled. What it reads then is bounded by what
    /// the peer had sent: nothing more can come. `peer_gone` is the reader's, kept from one
    /// wait to the next: once set, it waits no more.
    #[cold]
    async fn wait_for_room(&self, peer_gone: &mut bool) -> bool {
        // Made the first time it watches, kept for the rest of this wait: a request that
        // finishes signals `room`, and each would otherwise make and register a copy anew.
        let mut gone = None;
        loop {
            let mut room = pin!(self.room.notified());
            room.as_mut().enable();
            {
                let state = self.lock();
                // Set before the backlog is read, so that a request finishing after that
                // read sees it and signals `room` (both `SeqCst`).
                self.on_finish.fetch_or(super::PAUSED, Ordering::SeqCst);
                let hung_up = self.hung_up.load(Ordering::SeqCst);
                if hung_up || !self.must_pause(&state) || *peer_gone {
                    self.on_finish.fetch_and(!super::PAUSED, Ordering::SeqCst);
                    return !hung_up;
                }
            }
            // A sender waiting for this reader to read why the peer went waits no more
            // (`Inner::why_unsent`).
            self.ended.notify_waiters();
            let gone = gone.get_or_insert_with(|| Box::pin(self.peer_hangs_up(Interest::READABLE)));
            *peer_gone = hung_up_first(room, gone.as_mut()).await;
        }
    }

    /// Returns once the peer has hung up (or the socket fails), watched on a registration of
    /// a copy of the socket's fd: the reader's own readiness stays as it is, for the requests
    /// that wait in the socket (clearing it would lose their wake-up). Never, if the copy
    /// cannot be made (out of fds): the reader then waits for room alone, or the calls that
    /// outlive the end for a reply of theirs to fail.
    ///
    /// What a hang-up is, `interest` says: [`Interest::READABLE`], the peer's sending side
    /// shut (tokio's read-closed, `EPOLLRDHUP`, or `EPOLLHUP`); [`Interest::WRITABLE`], the
    /// socket shut both ways, the peer gone for good (write-closed, `EPOLLHUP`), once its
    /// sending side is shut already and read-closed says nothing new. The copy is closed as
    /// this returns or is dropped.
    #[cold]
    #[inline(never)]
    async fn peer_hangs_up(&self, interest: Interest) {
        let copy = self.socket().as_fd().try_clone_to_owned().ok();
        let Some(io) = copy.and_then(|fd| crate::tokio::register(fd).ok()) else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut ready) = io.ready(interest).await else {
                return; // the reader's next receive says why, or `has_ended`
            };
            // Only what `interest` asks for is there (tokio masks the rest).
            if ready.ready().is_read_closed() || ready.ready().is_write_closed() {
                return;
            }
            // The requests waiting in the socket (readable), or room to send (writable): so
            // until the next edge.
            ready.clear_ready();
        }
    }

    /// Once the connection has ended with calls of the peer's running and their replies
    /// still able to go out, watches for the peer to hang up for good, and cancels them then
    /// ([`Inner::cancel_calls_of_a_peer_gone`]), as a reply failing for it would: a handler
    /// that never replies on its own (it waits for good) would otherwise run on, and `run`
    /// wait for it. Run by the reader task after its end, so that `run` also waits for it.
    ///
    /// Until no call of the peer's is left ([`Inner::retire_services`] signals `room` as the
    /// last finishes), or the socket is shut both ways: the peer gone (the calls are cancelled),
    /// or this end hung up ([`Inner::hang_up`] signals `room`): after
    /// [`close`](super::AsyncConnection::close), which cancelled them itself, or as the last
    /// handle goes, which cancels them here, as a reader reading that end would. So the copy
    /// of the socket's fd it watches never keeps the socket open past the connection.
    #[cold]
    #[inline(never)]
    async fn cancel_calls_once_the_peer_goes(&self) {
        // Made the first time it watches, kept until it ends (as in `wait_for_room`).
        let mut gone = None;
        loop {
            let mut stop = pin!(self.room.notified());
            stop.as_mut().enable();
            if self.lock().calls_running == 0 {
                return;
            }
            // Shut both ways already: the peer has gone, or this end hung up.
            if self.socket().has_ended() {
                break;
            }
            let gone = gone.get_or_insert_with(|| Box::pin(self.peer_hangs_up(Interest::WRITABLE)));
            if hung_up_first(stop, gone.as_mut()).await {
                break;
            }
        }
        // (Nothing, if the watch failed without the peer gone: a failed reply says it then.)
        self.cancel_calls_of_a_peer_gone();
    }

    /// A request that held `cost` has finished: out of the backlog, and the reader told if
    /// it waits for room.
    pub(super) fn finished(&self, cost: Cost) {
        self.backlog.remove(cost);
        let on_finish = self.on_finish.load(Ordering::SeqCst);
        if on_finish != 0 {
            self.finished_while(on_finish);
        }
    }

    /// [`Inner::finished`] while the reader waits for room, or this end drains.
    #[cold]
    #[inline(never)]
    fn finished_while(&self, on_finish: u8) {
        if on_finish & super::PAUSED != 0 {
            self.room.notify_one();
        }
        if on_finish & super::DRAINING != 0 {
            self.stop_reading_once_idle();
        }
    }

    /// Ends the connection with `why`: every waiting call gets it, the oneway task finishes
    /// what it has, and the reader stops. Whether it ended it (not if it had ended already).
    pub(super) fn fail(&self, why: Error) -> bool {
        let mut state = self.lock();
        if state.closed.is_some() {
            return false;
        }
        if !matches!(why, Error::Disconnected) {
            // A protocol error leaves the stream unusable; make sure the peer sees it.
            let _ = self.socket().shutdown();
        }
        let waiting = state.pending.fail_all(&why);
        state.oneways = None;
        // The peer's calls are cancelled, as a cancel of the peer's would: their replies can
        // go nowhere now. Unless they still can: this end only stopped reading, or the peer
        // only shut its sending side.
        let replies_go = self.socket().replies_still_go(&why);
        let cancelled = match replies_go {
            true => Cancelled::default(),
            false => self.cancel_calls(&mut state),
        };
        // Requests held for a server still to come: oneways run if one comes, when the peer
        // hung up (as the blocking flavour's run what is left in the socket): a worker may
        // send its last oneways and exit before its parent serves. Calls too while their
        // replies can still go out. Dropped otherwise: this end closed, or the connection
        // broke (a protocol error, the bounds, the runtime gone).
        let held = match why {
            _ if replies_go => Vec::new(),
            Error::Disconnected | Error::ShutDown if !self.closed_here() => {
                let (calls, oneways) = std::mem::take(&mut state.held)
                    .into_iter()
                    .partition(|(_, envelope, _)| envelope.kind == Kind::Call);
                state.held = oneways;
                calls
            }
            _ => std::mem::take(&mut state.held),
        };
        // Let go after the lock, as a runner's drop may take it.
        let idle = std::mem::take(&mut state.idle_runners);
        // Said once the lock is let go and the waiting calls are woken: a write to stderr may
        // block.
        let traced = self.trace.then(|| {
            let here = trace::EndedHere::from_u8(self.ended_here.load(Ordering::SeqCst));
            trace::ended(&self.name, &why, here)
        });
        state.closed = Some(why);
        drop(state);
        self.ended.notify_waiters();
        // Calls waiting for the replies to go out wait no more (see `wait_for_reply_room`).
        self.reply_room.notify_waiters();
        for runner in idle {
            runner.stop();
        }
        waiting.into_iter().for_each(Waker::wake);
        if let Some(line) = traced {
            trace::line(&line);
        }
        self.drop_held(held);
        self.drop_cancelled(cancelled);
        true
    }

    /// The peer was found gone after the connection had ended with replies still able to go
    /// out (the peer shut only its sending side, or this end stopped reading, and the peer
    /// has hung up or died since): the peer's calls are cancelled now, those running and
    /// those waiting for a slot, as [`Inner::fail`] would have cancelled them had the peer
    /// gone first. (None is held for a server to come: calls run, so something serves.)
    /// Found by the reader task, which watches for the hang-up while such calls run
    /// ([`Inner::cancel_calls_once_the_peer_goes`]), or by a reply that fails first (the
    /// kernel's `EPIPE`), whichever comes first; nothing if this end closed the connection
    /// (which cancelled them itself) or the peer has not gone.
    #[cold]
    #[inline(never)]
    pub(in crate::tokio) fn cancel_calls_of_a_peer_gone(&self) {
        let cancelled = {
            let mut state = self.lock();
            if state.closed.is_none() || self.closed_here() || !self.socket().has_ended() {
                return;
            }
            self.cancel_calls(&mut state)
        };
        self.drop_cancelled(cancelled);
    }

    /// Drops requests held for a server still to come, unrun, saying the calls among them
    /// (after the line that says the end, which they follow from), their fds closed by the
    /// closer.
    pub(super) fn drop_held(&self, held: Vec<(Frame, Envelope, Cost)>) {
        self.say_oneways_unrun(&held);
        for (mut frame, envelope, _) in held {
            if self.trace && envelope.kind == Kind::Call {
                trace::dropped_cancelled(&self.name, envelope.cookie, false, true);
            }
            frame.discard_fds();
        }
    }

    /// Says on stderr that the oneways among `held`, the peer's, go unrun as the connection
    /// goes with nothing serving it ([`failure::oneways_unrun`]), if there are any.
    ///
    /// [`failure::oneways_unrun`]: crate::connection::failure::oneways_unrun
    pub(super) fn say_oneways_unrun(&self, held: &[(Frame, Envelope, Cost)]) {
        let mut oneways = held.iter().filter(|(_, e, _)| e.kind == Kind::Oneway);
        let Some((_, first, _)) = oneways.next() else {
            return;
        };
        if self.lock().server_coming {
            // A server was making its services: nothing was forgotten (as blocking).
            return;
        }
        let served: Vec<_> = self.services.read().iter().map(|s| s.info()).collect();
        crate::connection::failure::oneways_unrun(
            &self.name,
            self.trace,
            1 + oneways.count(),
            first,
            served,
            "Serve it (`AsyncConnection::add_service` or `serve`, or an `AsyncServer`): a \
             connection with no service runs nothing",
        );
    }

    /// Says a received message, or for a reply returns what to say once it is routed: a
    /// write to stderr may block, and the caller need not wait for it.
    #[cold]
    #[inline(never)]
    fn trace_incoming(
        &self,
        envelope: &Envelope,
        frame: &Frame,
        unreceived: Option<&Error>,
    ) -> Option<String> {
        // Copied out before printing: a write to stderr may block, and a service being added
        // (which waits for the write lock) would wait for it.
        let served: Vec<_> = self.services.read().iter().map(|s| s.info()).collect();
        // A request that comes before `serve` is held for it, and named once dispatched
        // (`start_serving`): it may be this very interface, not added yet.
        let held = match &*self.lock() {
            state if state.serving => trace::Held::No,
            state if state.server_coming => trace::Held::ServiceComing,
            _ => trace::Held::NotServed,
        };
        let served = served.into_iter();
        let line = trace::incoming_line(&self.name, envelope, frame, served, held, unreceived);
        match envelope.kind {
            Kind::Reply | Kind::Failure => Some(line),
            _ => {
                trace::line(&line);
                None
            }
        }
    }
}
