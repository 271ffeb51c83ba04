//! Waiting to send: a thread whose message finds the socket buffer full reads meanwhile
//! whenever nobody else does, so that two ends each sending the other more than its buffer
//! holds do not wait for each other for good (see the module docs of
//! [`connection`](super)).

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::reader::Reader;
use super::{Guard, Shared, State};
use crate::error::{Error, Result};
use crate::socket::poll_timeout;

/// Where in the state a thread waiting in [`Shared::poll_or_wake`] registers its eventfd, for
/// [`Shared::wake_all`] to signal.
pub(super) type WakeSlot = fn(&mut State) -> &mut Option<Arc<EventFd>>;

impl Shared {
    /// Sends a message built in `framed` (see [`Socket::send_framed`]), waiting for room as
    /// long as it takes (or until `deadline`) and reading meanwhile ([`Shared::wait_for_room`]).
    /// Its lane word's acknowledgement is written under the send lock
    /// ([`Shared::acknowledge_in`]).
    ///
    /// [`Socket::send_framed`]: crate::Socket
    #[inline(always)]
    pub(super) fn send_framed(
        &self,
        framed: &mut [u8],
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
    ) -> Result<()> {
        self.socket.send_framed(
            framed,
            fds,
            deadline,
            |payload| self.acknowledge_in(payload),
            &mut |deadline| self.wait_for_room(deadline),
        )
    }

    /// Waits until the socket may have room for a send that found its buffer full, reading
    /// meanwhile: this thread takes the reader role if it is free, and routes what comes as
    /// any reader does, taking nothing for itself (a request is queued for a serving thread,
    /// a reply goes to its caller). If another thread reads, this one waits for room or, when
    /// a message comes, for that reader to take it and let the role go, which it may then
    /// take, or for room, whichever comes first (`room_or_wake`). It reads what a serving
    /// thread would: nothing once the connection has ended, and nothing past the bounds of
    /// the request queue (see the module docs), until a request leaves it (`room_or_wake`
    /// again).
    ///
    /// The caller holds the socket's send lock throughout, so whatever the routing has to
    /// send (a failure owed for a call this end could not receive) is queued for a serving
    /// thread rather than sent here.
    #[cold]
    #[inline(never)]
    fn wait_for_room(&self, deadline: Option<Instant>) -> Result<()> {
        // Made the first time this thread waits for another reader (or for the queue to drain),
        // kept until it returns.
        let mut wake = None;
        loop {
            let mut state = self.state.lock();
            if state.closed.is_none() && state.backlog.full() {
                // It must read again once a request leaves the queue: the serving threads may
                // all wait to send behind it (a reply each), and the peer may read this end's
                // message only once its own requests are through. Out of fds, it waits for
                // room alone.
                let alone = |state: Guard<'_>| {
                    drop(state);
                    self.socket
                        .ready(PollFlags::POLLOUT, deadline)
                        .map(has_room)
                };
                if self.room_or_wake(state, deadline, &mut wake, alone)? {
                    return Ok(());
                }
                continue;
            }
            let may_read = state.closed.is_none();
            let reads = may_read && !state.reading;
            state.reading |= reads;
            let releases = state.releases;
            drop(state);
            let events = match may_read {
                true => PollFlags::POLLOUT | PollFlags::POLLIN,
                false => PollFlags::POLLOUT,
            };
            let ready = self.socket.ready(events, deadline);
            let ready = match ready {
                Ok(ready) => ready,
                Err(e) => {
                    if reads {
                        self.release_reader(&mut self.state.lock());
                    }
                    return Err(e);
                }
            };
            let mut room = has_room(ready);
            let message = ready.contains(PollFlags::POLLIN);
            if reads && message {
                self.read_while_sending();
            } else if reads {
                self.release_reader(&mut self.state.lock());
            } else if message && !room {
                // The reader takes it: once it lets the role go, this thread may take it, and
                // polls again. Not if it already has (and maybe taken the role again): the
                // message may be gone, and with it the next wake-up.
                // Room counts too: the reader may have taken the first part of a message and
                // wait for the rest, which the peer may send only once this end's message is
                // through (its own sender waiting on its own reader, say). Out of fds, it
                // waits on the condvar alone.
                let state = self.state.lock();
                if state.reading && state.releases == releases {
                    let alone = |state| {
                        drop(self.sleep(state, deadline));
                        Ok(false)
                    };
                    room = self.room_or_wake(state, deadline, &mut wake, alone)?;
                }
            }
            if room {
                return Ok(());
            }
        }
    }

    /// Waits, with `state` locked by a thread waiting to send (see
    /// [`Shared::wait_for_room`]), until the socket has room, or the connection's waiters are
    /// woken (the reader lets the role go, a request leaves the queue, the connection ends),
    /// or `deadline` passes: whether it has room. It waits on `wake` ([`Shared::poll_or_wake`],
    /// registered as `State::sender_wake`); without one (out of fds), `alone` waits instead.
    #[cold]
    #[inline(never)]
    fn room_or_wake<'a>(
        &'a self,
        state: Guard<'a>,
        deadline: Option<Instant>,
        wake: &mut Option<Arc<EventFd>>,
        alone: impl FnOnce(Guard<'a>) -> Result<bool>,
    ) -> Result<bool> {
        if poll_timeout(deadline).is_none() {
            return Err(Error::TimedOut);
        }
        debug_assert!(state.sender_wake.is_none(), "one thread sends at a time");
        let sender_wake: WakeSlot = |s| &mut s.sender_wake;
        match self.poll_or_wake(state, deadline, wake, sender_wake, PollFlags::POLLOUT) {
            Ok(ready) => Ok(has_room(ready)),
            Err(state) => alone(state),
        }
    }

    /// Waits, with `state` locked, until the socket reports one of `events` (or a hang-up or
    /// an error, which it reports whatever is asked), or the connection's waiters are woken,
    /// or `deadline` passes: what the socket reported (nothing if woken or timed out). It
    /// waits on `wake`, an eventfd made the first time (kept by the caller for its next
    /// waits) and signalled with the condvar while it is registered in `slot` of the state
    /// (it counts among `waiters`). Without one (out of fds) it gives `state` back, for the
    /// caller to wait its own way.
    #[cold]
    #[inline(never)]
    pub(super) fn poll_or_wake<'a>(
        &'a self,
        mut state: Guard<'a>,
        deadline: Option<Instant>,
        wake: &mut Option<Arc<EventFd>>,
        slot: WakeSlot,
        events: PollFlags,
    ) -> std::result::Result<PollFlags, Guard<'a>> {
        if wake.is_none() {
            let flags = EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK;
            *wake = EventFd::from_flags(flags).ok().map(Arc::new);
        }
        let Some(fd) = wake.as_ref() else {
            return Err(state);
        };
        *slot(&mut state) = Some(fd.clone());
        state.waiters += 1;
        drop(state);
        let ready = loop {
            let Some(timeout) = poll_timeout(deadline) else {
                break PollFlags::empty(); // the caller's next wait says so
            };
            let mut fds = [
                PollFd::new(self.socket.as_fd(), events),
                PollFd::new(fd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(0) | Err(nix::Error::EINTR) => continue,
                Ok(_) => break fds[0].revents().unwrap_or(PollFlags::empty()),
                // Not this wait's to report: the caller's next poll fails as well, or sees.
                Err(_) => break PollFlags::empty(),
            }
        };
        let mut state = self.state.lock();
        state.waiters -= 1;
        *slot(&mut state) = None;
        drop(state);
        // Nobody signals it any more: empty it for the next wait (non-blocking).
        let _ = fd.read();
        Ok(ready)
    }

    /// Receives the message that has come, if it is whole (a large one may take several
    /// tries: its datagrams are kept meanwhile), and routes it; lets the reader role go.
    fn read_while_sending(&self) {
        let (mut frame, mut recv) = {
            let mut state = self.state.lock();
            (
                std::mem::take(&mut state.buffer),
                std::mem::take(&mut state.recv),
            )
        };
        let result = match self.socket.try_recv_with_state(&mut recv, &mut frame) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::TimedOut), // not whole yet: the route lets the role go
            Err(e) => Err(e),
        };
        let result = self.received(&mut frame, result);
        let mut state = self.state.lock();
        state.recv = recv;
        let (_state, taken) = self.route(state, frame, result, Reader::Sender);
        debug_assert!(taken.is_none(), "a sender takes nothing for itself");
    }

    /// [`Shared::why_unsent`] for a call, which says its send failed if the call was said
    /// (`traced`: its cookie).
    #[cold]
    #[inline(never)]
    pub(super) fn why_call_unsent(
        &self,
        e: Error,
        deadline: Option<Instant>,
        traced: Option<u64>,
    ) -> Error {
        let e = self.why_unsent(e, deadline);
        // A traced call is said once its cookie is given (0: not yet), before its send.
        if let Some(cookie) = traced.filter(|&cookie| cookie != 0) {
            super::trace::send_failed(&self.name, "Call", cookie, &e, None);
        }
        e
    }

    /// Why a send failed, from its error `e`: for a peer gone (`Disconnected`: `EPIPE`), what
    /// the peer said before it went, if this end has not read it yet, so that the caller
    /// hears that the peer speaks another wire version, say, and not only that it hung up
    /// (a peer of another version says its own and hangs up on the first message it reads;
    /// a thread that only sends oneways would otherwise never learn why). This thread reads
    /// what has come if nobody else does, without waiting for more, and as a serving thread
    /// would: nothing past the bounds of the request queue (the requests there wait for a
    /// serving thread, which may come later; one more would end the connection if nothing
    /// serves), unless the peer has hung up for good (`POLLHUP`) and something serves: then
    /// it reads to the end, so that the peer's calls are dropped there ([`Shared::fail`]).
    /// If another thread reads and the peer has hung up for good, that
    /// reader is about to read the rest and the end, and this thread waits until it has, or
    /// until `deadline` (the send's): that reader may itself wait meanwhile (for stderr, say,
    /// to print a message it routes, whose lock this thread may hold). Once the connection
    /// has ended, the calls of a peer that has gone since are dropped
    /// ([`Shared::drop_calls_of_a_peer_gone`]).
    #[cold]
    #[inline(never)]
    pub(super) fn why_unsent(&self, e: Error, deadline: Option<Instant>) -> Error {
        if !matches!(e, Error::Disconnected) {
            return e;
        }
        loop {
            let mut state = self.state.lock();
            if let Some(closed) = &state.closed {
                let why = closed.duplicate();
                drop(state);
                self.drop_calls_of_a_peer_gone();
                return why;
            }
            let readable = self.socket.ready_now(PollFlags::POLLIN);
            if !state.reading {
                // Past the bounds once the peer has gone for good, if something serves: what
                // is left is bounded by what the socket held, and the end drops its calls.
                let gone = readable.contains(PollFlags::POLLHUP)
                    && (state.runners > 0 || state.runners_coming);
                if !readable.contains(PollFlags::POLLIN) || (state.backlog.full() && !gone) {
                    // Nothing to read (the peer shut only its reading side, say), or nothing
                    // this thread may read.
                    return e;
                }
                state.reading = true;
                drop(state);
                self.read_while_sending(); // one message, or the end
            } else if readable.contains(PollFlags::POLLHUP) && poll_timeout(deadline).is_some() {
                drop(self.sleep(state, deadline));
            } else {
                return e;
            }
        }
    }
}

/// Whether a socket polled as ready for `ready` may have room to send (or will fail at once).
fn has_room(ready: PollFlags) -> bool {
    ready.intersects(PollFlags::POLLOUT | PollFlags::POLLHUP | PollFlags::POLLERR)
}
