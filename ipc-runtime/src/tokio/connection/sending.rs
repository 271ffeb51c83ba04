//! Sending a message: at once when the socket takes it, else by a future that waits for
//! room under the send lock, and that hands a message dropped part-way to a task of its own
//! so the peer never holds a fragment. Apart because it is the only code that sends on the
//! socket.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::future::{Future, poll_fn};
use std::task::Poll;

use ::tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use nix::poll::PollFlags;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use ::tokio::sync::OwnedMutexGuard;
use serde::Serialize;

use super::{Inner, Registered, TaskGuard};
use crate::connection::buffers::with_buffers;
use crate::connection::lane::Lane;
use crate::connection::trace::{self, Name};
use crate::error::{Error, Result};
use crate::service::InterfaceInfo;
use crate::socket::{RETRY_SEND, SendCursor, Socket};
use crate::tokio::envelope::{self, Envelope};
use ::tokio::time::Instant;

thread_local! {
    /// A call, oneway or reply dropped part-way handed its rest to a task (`Outgoing::finish`,
    /// tracing on): for the [`TracedSend`] or [`SaidReply`] dropped next on this thread, in
    /// the same future as that send.
    static HANDED_OVER: Cell<bool> = const { Cell::new(false) };
    /// A send that waited for room failed part-way (tracing on): how many of its payload's
    /// bytes went out, and of how many. Set in the poll where the send fails, for its sender
    /// to take in that same poll; cleared as a traced send starts, as an earlier send's would
    /// otherwise be taken for a failure of one that sent nothing.
    static CUT_OFF: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
}

/// A message that could not go out at once: its bytes (after room for the transport's
/// header) and the fds it carries, borrowed from its body.
type Unsent<'b> = (Vec<u8>, Vec<BorrowedFd<'b>>);

/// How much of the traced send that just failed on this thread went out, if it was cut off
/// part-way ([`CUT_OFF`]).
#[cold]
fn take_cut_off() -> Option<(usize, usize)> {
    CUT_OFF.take()
}

/// A call's or oneway's traced line (tracing on) while its message is being sent. A oneway's
/// is printed by the caller once the send returns (a call's before it starts, and then what
/// became of it if the send does not finish: [`TracedSend::said_now`]), or, if the future is
/// dropped with the message part-way out, here: the rest goes out from a task and the peer
/// gets the message, so the trace must show it sent. Declared before the send's future, so
/// dropped after it, once `Outgoing::finish` has said whether it handed the rest over.
pub(in crate::tokio) struct TracedSend {
    name: Name,
    envelope: Envelope,
    iface: &'static InterfaceInfo,
    /// The arguments as described, until the line is printed or given up.
    args: Option<String>,
    /// When the sender's own timeout fires, if it has one: see [`why_given_up`].
    deadline: Option<Instant>,
    /// A call's line was said before its send started ([`TracedSend::said_now`]), and the
    /// send has not finished nor failed: dropped so, it says what became of the call.
    said_early: bool,
}

/// Why the sender of a message (a call, or a oneway) gave up on it, for the trace: the
/// timeout the connection was given fired (its `deadline` has passed), or the sender's future
/// was dropped (by the caller, or a timeout of the caller's own).
pub(in crate::tokio) fn why_given_up(deadline: Option<Instant>) -> &'static str {
    match deadline {
        Some(deadline) if Instant::now() >= deadline => "timed out",
        _ => "its future was dropped",
    }
}

impl TracedSend {
    #[cold]
    #[inline(never)]
    pub(in crate::tokio) fn new(
        name: Name,
        envelope: Envelope,
        iface: &'static InterfaceInfo,
        args: String,
        deadline: Option<Instant>,
    ) -> Box<TracedSend> {
        HANDED_OVER.set(false);
        CUT_OFF.set(None);
        // Boxed: the future of every call and oneway holds it, traced or not, and an
        // `Option<Box<_>>` is one word.
        Box::new(TracedSend {
            name,
            envelope,
            iface,
            args: Some(args),
            deadline,
            said_early: false,
        })
    }

    /// This traced send, a call's, its line said now, before its send starts: the peer's
    /// lines about it, in a stderr they share, come after it. Dropped before the send
    /// finished, it says whether any of it went out; [`TracedSend::failed`] says a failed send.
    #[cold]
    #[inline(never)]
    pub(in crate::tokio) fn said_now(mut self: Box<Self>) -> Box<TracedSend> {
        let args = self.args.take();
        trace::outgoing(&self.name, &self.envelope, self.iface, args.as_deref());
        self.said_early = true;
        self
    }

    /// How much of the message went out before its send failed, if part of it did: taken
    /// in the poll where the send failed, before its sender waits for anything.
    #[cold]
    #[inline(never)]
    pub(in crate::tokio) fn cut_off(&self) -> Option<(usize, usize)> {
        take_cut_off()
    }

    /// The send failed (`e`, after `cut_off`: [`TracedSend::cut_off`]): says so, for a call
    /// said before it.
    #[cold]
    #[inline(never)]
    pub(in crate::tokio) fn failed(&mut self, e: &Error, cut_off: Option<(usize, usize)>) {
        if std::mem::take(&mut self.said_early) {
            trace::send_failed(&self.name, "Call", self.envelope.cookie, e, cut_off);
        }
    }

    /// The message went out: prints its line.
    pub(in crate::tokio) fn sent(&mut self) {
        self.said_early = false;
        let args = self.args.take();
        trace::outgoing(&self.name, &self.envelope, self.iface, args.as_deref());
    }
}

impl Drop for TracedSend {
    fn drop(&mut self) {
        if self.said_early {
            // Part-way out, the rest goes out from a task: the call's reply is given up.
            let why = why_given_up(self.deadline);
            match HANDED_OVER.replace(false) {
                true => trace::gave_up(&self.name, self.envelope.cookie, why),
                false => trace::not_sent(&self.name, "Call", self.envelope.cookie, why),
            }
            return;
        }
        if let Some(args) = self.args.take()
            && HANDED_OVER.replace(false)
        {
            let why = why_given_up(self.deadline);
            let (name, envelope, iface) = (&self.name, &self.envelope, self.iface);
            trace::finished_in_background(name, envelope, iface, &args, why);
        }
    }
}

/// A reply's traced line (tracing on), said before its send starts, so that the caller's
/// `<-` line for it, in a stderr they share, comes after it. Its send failed, it says so
/// ([`SaidReply::over`]); dropped before its send finished (the handler gave up on
/// [`AsyncCall::reply`](crate::tokio::AsyncCall::reply)), it says whether the rest went out
/// from a task or none of it went out. Declared before the send's future, so dropped after
/// it, once `Outgoing::finish` has said whether it handed the rest over.
pub(in crate::tokio) struct SaidReply {
    name: Name,
    cookie: u64,
    /// The send finished or failed: nothing more to say.
    over: bool,
}

impl SaidReply {
    /// Says the reply to call `cookie` (`value`, as described) now, before its send starts.
    #[cold]
    #[inline(never)]
    pub(in crate::tokio) fn said_now(name: Name, cookie: u64, value: &str) -> Box<SaidReply> {
        HANDED_OVER.set(false);
        CUT_OFF.set(None);
        trace::reply(&name, cookie, Some(value));
        // Boxed, as `TracedSend`: the future of every reply holds it, traced or not.
        Box::new(SaidReply {
            name,
            cookie,
            over: false,
        })
    }

    /// The reply's send is over: `sent`, or failed as it says, taken in the poll where it
    /// failed (part-way, the line says how much went out).
    #[cold]
    #[inline(never)]
    pub(in crate::tokio) fn over(&mut self, sent: &Result<u32>) {
        self.over = true;
        if let Err(e) = sent {
            trace::send_failed(&self.name, "Reply", self.cookie, e, take_cut_off());
        }
    }
}

impl Drop for SaidReply {
    fn drop(&mut self) {
        if self.over {
            return;
        }
        // Its sender gave up: a reply has no timeout of the connection's.
        let why = why_given_up(None);
        match HANDED_OVER.replace(false) {
            true => trace::reply_in_background(&self.name, self.cookie, why),
            false => trace::not_sent(&self.name, "Reply", self.cookie, why),
        }
    }
}

impl Inner {
    /// Encodes envelope + body and sends them as one message. `body` is taken by value so
    /// that the future is `Send` whenever the body is: the fds it carries stay open, borrowed,
    /// until the message is out.
    /// Returns the lane placement the message carries (0: none).
    pub(in crate::tokio) async fn send<A: Serialize>(
        self: &Arc<Self>,
        envelope: Envelope,
        body: A,
    ) -> Result<u32> {
        let (placed, unsent) = self.send_at_once(&envelope, &body)?;
        if let Some((framed, fds)) = unsent {
            self.send_encoded(framed, &fds, placed, None, None).await?;
        }
        Ok(placed)
    }

    /// [`Inner::send`], setting `started` once any of the message has gone out, also if the
    /// future is then dropped: the peer then gets all of it (the rest goes out in the
    /// background) or the connection is shut down, so a reply that started is the call's
    /// answer, and none other may follow it.
    pub(in crate::tokio) async fn send_noting<A: Serialize>(
        self: &Arc<Self>,
        envelope: Envelope,
        body: A,
        started: &mut bool,
    ) -> Result<u32> {
        let (placed, unsent) = self.send_at_once(&envelope, &body)?;
        if let Some((framed, fds)) = unsent {
            self.send_encoded(framed, &fds, placed, None, Some(started))
                .await?;
        }
        Ok(placed)
    }

    /// Encodes envelope + body and sends them if they can go out at once: the placement, and
    /// the message and its fds if they must wait.
    #[inline]
    fn send_at_once<'b, A: Serialize>(
        &self,
        envelope: &Envelope,
        body: &'b A,
    ) -> Result<(u32, Option<Unsent<'b>>)> {
        // Most messages go out at once: encoded in this thread's buffer and sent without
        // waiting, they allocate nothing. One that would have to wait (the socket full, or
        // another message going out) takes the bytes along.
        with_buffers(|framed, fds| {
            let placed = self.lane.encode(envelope, body, framed, fds)?;
            #[cfg(test)]
            crate::connection::between_encode_and_send();
            match self.try_send_at_once(framed, fds) {
                Ok(true) => {
                    self.lane.sent(placed);
                    Ok((placed, None))
                }
                // `send_encoded` says when it is sent.
                Ok(false) => Ok((placed, Some((std::mem::take(framed), fds.clone())))),
                Err(e) => {
                    self.lane.never_sent(placed);
                    Err(e)
                }
            }
        })
    }

    /// Tells the peer what `made` makes of the lane: at once if the message can go out
    /// without waiting (the send lock free, room in the socket), so that it goes before
    /// anything this end sends next; else from a task, once there is room. Made under the
    /// send lock, as late as that: an announcement that waits says what is true when it goes
    /// (a later one may have gone out at once meanwhile), and the one sent last says what is
    /// true after the last change. `said` traces the announcement that went out. A peer
    /// already gone shows on the connection itself.
    #[cold]
    pub(super) fn announce(
        self: &Arc<Self>,
        made: impl Fn(&Lane) -> (u64, u64) + Send + 'static,
        said: impl FnOnce((u64, u64)) + Send + 'static,
    ) {
        if let Ok(_sending) = self.send_lock.try_lock() {
            let announcement = made(&self.lane);
            let sent = with_buffers(|framed, fds| {
                let placed = self
                    .lane
                    .encode(&Envelope::announce(), &announcement, framed, fds)?;
                let acknowledge = |payload: &mut [u8]| self.lane.acknowledge_in(payload);
                let sent = self.socket().try_send_framed(framed, fds, acknowledge);
                // An announcement places nothing (`placed` is 0), but every encode says when
                // its send is over, so that this stays right if that changes.
                match sent {
                    Ok(true) => self.lane.sent(placed),
                    _ => self.lane.never_sent(placed),
                }
                sent
            });
            match sent {
                Ok(false) => self.lane.announcement_unsent(announcement),
                Ok(true) => {
                    if self.trace {
                        said(announcement);
                    }
                    return;
                }
                Err(e) => {
                    self.lane.announcement_unsent(announcement);
                    return self.announce_unsent(&e);
                }
            }
        }
        // The connection is let go before the task counts as ended, also if the task is
        // dropped unstarted (a tuple drops its fields in order): once `wait_closed` returns,
        // dropping the last clone must close the socket at once.
        let task = (self.clone(), self.tasks.enter());
        self.runtime.spawn(async move {
            let (inner, guard) = task;
            let sending = inner.send_lock.clone().lock_owned().await;
            let announcement = made(&inner.lane);
            match inner.send_holding(sending, announcement).await {
                Ok(()) if inner.trace => said(announcement),
                Err(e) => {
                    inner.lane.announcement_unsent(announcement);
                    inner.announce_unsent(&e);
                }
                Ok(()) => {}
            }
            drop(inner);
            drop(guard);
        });
    }

    /// Tells the peer how many fds this end accepts, as the connection starts, if the lane
    /// does (as the blocking flavour's `Shared::tell_max_fds`, which says why): at once on a
    /// new socket, which has room.
    #[cold]
    pub(super) fn tell_max_fds(self: &Arc<Self>) {
        let len = crate::connection::envelope::ANNOUNCE_LEN;
        if let Err(e) = self.socket().check_outgoing(len, 0) {
            if self.trace {
                trace::max_fds_unsent(&self.name, &e);
            }
            return;
        }
        let (name, max_fds) = (self.name, self.socket().limits().max_fds);
        self.announce(Lane::max_fds_announcement, move |_| {
            trace::announce_max_fds(&name, max_fds);
        });
    }

    /// over this side's limits and tracing is on (a peer gone shows on the connection).
    #[cold]
    #[inline(never)]
    pub(super) fn announce_unsent(&self, e: &Error) {
        if self.trace && e.is_over_limits() {
            trace::announce_unsent(&self.name, e);
        }
    }

    /// Tells the peer that this end no longer waits for the reply to its call `cookie`, or,
    /// with cookie 0, only what this end's lane word says ([`Kind::Cancel`]). Never waits,
    /// as it is called from a drop: at once if the message can go out so (the send lock
    /// free, room in the socket), else from a task of the connection's runtime, after what
    /// is being sent meanwhile (a task rather than a queue the next sender empties: this end
    /// may send nothing more for a long time, and the peer would work on for nobody). Best
    /// effort: a runtime shutting down drops the task, and a peer gone shows on the
    /// connection itself.
    ///
    /// [`Kind::Cancel`]: crate::connection::envelope::Kind::Cancel
    #[cold]
    #[inline(never)]
    pub(super) fn send_cancel(self: &Arc<Self>, cookie: u64) {
        let envelope = Envelope::cancel(cookie);
        if let Ok(_sending) = self.send_lock.try_lock() {
            let sent = with_buffers(|framed, fds| {
                let placed = self.lane.encode(&envelope, &(), framed, fds)?;
                let acknowledge = |payload: &mut [u8]| self.lane.acknowledge_in(payload);
                let sent = self.socket().try_send_framed(framed, fds, acknowledge);
                // A cancel places nothing, but every encode says when its send is over.
                match sent {
                    Ok(true) => self.lane.sent(placed),
                    _ => self.lane.never_sent(placed),
                }
                sent
            });
            if self.trace && matches!(sent, Ok(true)) {
                trace::cancelled(&self.name, cookie);
            }
            if !matches!(sent, Ok(false)) {
                return;
            }
        }
        if cookie == 0 {
            self.acks_owed.fetch_add(1, Ordering::SeqCst);
            if self.ack_queued.swap(true, Ordering::SeqCst) {
                return; // the task sending them sends this one too
            }
        }
        // Let go before the task counts as ended, as for an announcement.
        let task = (self.clone(), self.tasks.enter());
        self.runtime.spawn(async move {
            let (inner, guard) = task;
            loop {
                // Read before the word is written (under the send lock, as it goes).
                let seen = inner.acks_owed.load(Ordering::SeqCst);
                let sent = inner.send(envelope, ()).await.is_ok();
                if sent && inner.trace {
                    trace::cancelled(&inner.name, cookie);
                }
                if cookie != 0 {
                    break;
                }
                inner.ack_queued.store(false, Ordering::SeqCst);
                // Owed since `seen`, and no task took it: this one sends again.
                let again = sent && inner.acks_owed.load(Ordering::SeqCst) != seen;
                if !again || inner.ack_queued.swap(true, Ordering::SeqCst) {
                    break;
                }
            }
            drop(inner);
            drop(guard);
        });
    }

    /// Sends `announcement` holding the send lock already (`sending`), waiting for room.
    #[cold]
    async fn send_holding(
        self: &Arc<Self>,
        sending: OwnedMutexGuard<()>,
        announcement: (u64, u64),
    ) -> Result<()> {
        let (framed, placed) = with_buffers(|framed, fds| {
            let placed = self
                .lane
                .encode(&Envelope::announce(), &announcement, framed, fds)?;
            debug_assert!(fds.is_empty(), "an announcement carries no fds");
            Ok::<_, Error>((framed.clone(), placed))
        })?;
        self.send_encoded(framed, &[], placed, Some(sending), None)
            .await
    }

    /// Sends the message in `framed` if it can go out without waiting (the send lock free,
    /// room in the socket, one datagram): whether it did. A message over the limits is
    /// refused either way, as `try_send_framed` would, before its bytes are taken along.
    #[inline]
    fn try_send_at_once(&self, framed: &mut [u8], fds: &[BorrowedFd<'_>]) -> Result<bool> {
        match self.send_lock.try_lock() {
            Ok(_lock) => {
                let acknowledge = |payload: &mut [u8]| self.lane.acknowledge_in(payload);
                self.socket().try_send_framed(framed, fds, acknowledge)
            }
            Err(_) => self
                .socket()
                .check_outgoing(framed.len() - envelope::FRAMED_AT, fds.len())
                .map(|()| false),
        }
    }

    /// Sends the message encoded in `framed`, waiting for room, with the send lock (`held`
    /// already, or taken here); sets `started`, if given, once any of it has gone out
    /// ([`Inner::send_noting`]).
    async fn send_encoded(
        self: &Arc<Self>,
        framed: Vec<u8>,
        fds: &[BorrowedFd<'_>],
        placed: u32,
        held: Option<OwnedMutexGuard<()>>,
        started: Option<&mut bool>,
    ) -> Result<()> {
        // Too large for the wire: never sent, so the placement goes back (from here on,
        // `Outgoing`'s drop gives it back if none of the message went out, and says when the
        // send is over).
        let cursor = SendCursor::new(framed.len() - envelope::FRAMED_AT, fds.len())
            .inspect_err(|_| self.lane.never_sent(placed))?;
        // A reply waiting for room counts against the connection's budget until it is out
        // or given up (`Outgoing`'s drop, or the `Remainder`'s it hands the rest to).
        let reply_bytes = match is_a_reply(&framed) {
            true => self.reply_waits(framed.capacity()),
            false => 0,
        };
        // Made before waiting for the lock, so that a send cancelled while it waits gives its
        // placement back too.
        let mut out = Outgoing {
            inner: self,
            cursor,
            framed,
            fds,
            lock: held,
            finished: false,
            placed,
            started,
            reply_bytes,
        };
        if out.lock.is_none() {
            out.lock = Some(match self.send_lock.clone().try_lock_owned() {
                Ok(lock) => lock,
                Err(_) => self.send_lock.clone().lock_owned().await,
            });
        }
        // Under the send lock, before any of it goes (`Lane::acknowledge_in`).
        self.lane
            .acknowledge_in(&mut out.framed[envelope::FRAMED_AT..]);
        let result = drive(self, &mut out.cursor, &out.framed, out.fds).await;
        out.finished = true;
        if result.is_err() && out.cursor.started() && !out.cursor.in_progress() {
            // The message is out: only a version notice owed meanwhile waited, and failed.
            self.socket().send_given_up(&out.cursor);
            return Ok(());
        }
        if result.is_err() && self.trace && out.cursor.in_progress() {
            CUT_OFF.set(Some(out.cursor.bytes()));
        }
        result
    }

    /// Why a send failed, from its error `e`: for a peer gone (`Disconnected`: `EPIPE`),
    /// what the peer said before it went, as the blocking flavour's `Shared::why_unsent`
    /// finds it. The reader task reads everything: if the peer has hung up for good
    /// (`POLLHUP`), it is about to read the rest and the end, and this waits until it has.
    /// Not while the reader waits for room at the backlog's bounds with no call waiting for
    /// a reply: it reads nothing until a request finishes, which may be never (the requests
    /// may wait for this very send, from a handler); it signals `ended` when it starts to.
    #[cold]
    #[inline(never)]
    pub(super) async fn why_unsent(&self, e: Error) -> Error {
        if !matches!(e, Error::Disconnected) {
            return e;
        }
        loop {
            let mut ended = pin!(self.ended.notified());
            ended.as_mut().enable();
            {
                let state = self.lock();
                if let Some(closed) = &state.closed {
                    return closed.duplicate();
                }
                // Set and cleared under the lock (`wait_for_room`).
                if self.reader_paused(Ordering::SeqCst) && self.must_pause(&state) {
                    return e;
                }
            }
            if !self
                .socket()
                .ready_now(PollFlags::POLLIN)
                .contains(PollFlags::POLLHUP)
            {
                return e; // the peer shut only its reading side, say
            }
            ended.await;
        }
    }
}

/// Sends what is left of the message `cursor` tracks, waiting for the socket to take it.
/// `framed` is the message as it was encoded, after room for the transport's header.
async fn drive(
    inner: &Inner,
    cursor: &mut SendCursor,
    framed: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<()> {
    let payload = &framed[envelope::FRAMED_AT..];
    // Try at once: the socket is writable far more often than not.
    if inner.socket().send_some(cursor, payload, fds)? {
        return Ok(());
    }
    // Boxed out of line: the waiting's state and code (its retry timer, two futures raced),
    // inline, cost every async call ~110 instructions (client) and ~200 (server) on the path
    // that never waits. A send that waits allocates once.
    waiting_send(inner, cursor, payload, fds).await
}

/// [`wait_and_send`], boxed out of line.
#[cold]
#[inline(never)]
fn waiting_send<'a>(
    inner: &'a Inner,
    cursor: &'a mut SendCursor,
    payload: &'a [u8],
    fds: &'a [BorrowedFd<'a>],
) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
    Box::pin(wait_and_send(inner, cursor, payload, fds))
}

/// [`drive`] once the socket had no room: waits for room, or for the time to try again
/// anyway, and sends the rest.
#[cold]
async fn wait_and_send(
    inner: &Inner,
    cursor: &mut SendCursor,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<()> {
    let mut waiting = inner.socket().send_wait();
    // Made at the first wait; none out of fds (the send then waits for room alone).
    let mut retry: Option<Option<AsyncFd<OwnedFd>>> = None;
    loop {
        waiting.waiting(cursor.sent());
        let retry = retry.get_or_insert_with(retry_timer).as_ref();
        let ready = match writable_or_retry(inner, retry).await {
            Ok(ready) => ready,
            Err(e) => return Err(inner.reactor_gone(e)),
        };
        let Some(mut ready) = ready else {
            // The time to try again came first.
            if inner.socket().send_some(cursor, payload, fds)? {
                return Ok(());
            }
            continue;
        };
        let attempt = ready.try_io(|io| match io.get_ref().0.send_some(cursor, payload, fds) {
            Ok(true) => Ok(Ok(())),
            Ok(false) => Err(io::ErrorKind::WouldBlock.into()),
            Err(e) => Ok(Err(e)),
        });
        match attempt {
            Ok(Ok(done)) => return done,
            Ok(Err(e)) => return Err(e.into()), // not produced by the closure
            Err(_would_block) => continue,
        }
    }
}

impl Inner {
    /// A reply of `bytes` waits for room to go out: counted against the budget of the
    /// replies waiting ([`backlog::MAX_REPLY_BYTES`]). Returns `bytes`, to give back with
    /// [`Inner::reply_out`].
    ///
    /// [`backlog::MAX_REPLY_BYTES`]: crate::connection::backlog::MAX_REPLY_BYTES
    #[cold]
    fn reply_waits(&self, bytes: usize) -> usize {
        self.replies.add(bytes);
        bytes
    }

    /// A reply of `bytes` counted by [`Inner::reply_waits`] is out or given up: if that takes
    /// the replies waiting below their budget, a call waiting for that starts (it wakes the
    /// next as it does).
    #[cold]
    fn reply_out(&self, bytes: usize) {
        if bytes > 0 && self.replies.remove(bytes) {
            self.reply_room.notify_one();
        }
    }

    /// Why a send failed whose wait for room failed with `e`: the reactor the socket is
    /// registered with has shut down with the connection's runtime, which ended the
    /// connection first (its reader's drop), saying so; tokio's own words ("A Tokio 1.x
    /// context was found, but it is being shutdown") would speak of a runtime the caller
    /// may not be on.
    #[cold]
    #[inline(never)]
    fn reactor_gone(&self, e: io::Error) -> Error {
        match &self.lock().closed {
            Some(why) => why.duplicate(),
            None => e.into(),
        }
    }
}

/// A timer that reads as readable every [`RETRY_SEND`] (a `timerfd`, since the runtime may
/// have no time driver), for a send waiting for room to try again (see
/// `wait_for_room_or_retry` in the blocking flavour, which says why); `None` if it cannot
/// be made.
#[cold]
#[inline(never)]
fn retry_timer() -> Option<AsyncFd<OwnedFd>> {
    let flags = TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC;
    let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, flags).ok()?;
    let every = Expiration::Interval(TimeSpec::from_duration(RETRY_SEND));
    timer.set(every, TimerSetTimeFlags::empty()).ok()?;
    crate::tokio::register(OwnedFd::from(timer)).ok()
}

/// Waits until the socket is writable, or until `retry` ticks (`None`), whichever comes
/// first.
#[cold]
#[inline(never)]
async fn writable_or_retry<'a>(
    inner: &'a Inner,
    retry: Option<&AsyncFd<OwnedFd>>,
) -> io::Result<Option<AsyncFdReadyGuard<'a, Registered>>> {
    let Some(retry) = retry else {
        return inner.io.writable().await.map(Some);
    };
    let mut writable = pin!(inner.io.writable());
    let mut tick = pin!(retry.readable());
    let mut timer_broke = false;
    poll_fn(|cx| {
        if let Poll::Ready(ready) = writable.as_mut().poll(cx) {
            return Poll::Ready(ready.map(Some));
        }
        if timer_broke {
            return Poll::Pending; // the send waits for room alone
        }
        match tick.as_mut().poll(cx) {
            Poll::Ready(Ok(mut ticked)) => {
                // Takes the ticks so far: the next makes it readable again.
                let _ = nix::unistd::read(ticked.get_inner(), &mut [0u8; 8]);
                ticked.clear_ready();
                Poll::Ready(Ok(None))
            }
            Poll::Ready(Err(_)) => {
                timer_broke = true;
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// A message being sent. If its future is dropped part-way through the message, `drop`
/// hands the rest to a task of its own, so the peer never holds a fragment.
struct Outgoing<'a, 'f> {
    inner: &'a Arc<Inner>,
    cursor: SendCursor,
    /// The message after room for the transport's header (see `drive`).
    framed: Vec<u8>,
    fds: &'a [BorrowedFd<'f>],
    lock: Option<OwnedMutexGuard<()>>,
    finished: bool,
    /// The lane placement the message carries (0: none).
    placed: u32,
    /// Set, if there, once any of the message has gone out ([`Inner::send_noting`]): told
    /// on drop, which comes also when the sender gives up part-way.
    started: Option<&'a mut bool>,
    /// The bytes a reply counts against the replies waiting ([`Inner::reply_waits`]; 0 for
    /// any other message): given back when the send is over, or by the [`Remainder`].
    reply_bytes: usize,
}

impl Drop for Outgoing<'_, '_> {
    fn drop(&mut self) {
        if let Some(started) = self.started.take() {
            *started |= self.cursor.started();
        }
        self.finish();
        // Sent, failed, or the rest handed over with copies of its fds: the message no longer
        // names the region's fd.
        self.inner.lane.sent(self.placed);
        // Zero if the rest was handed over: the `Remainder` gives it back.
        self.inner.reply_out(std::mem::take(&mut self.reply_bytes));
    }
}

impl Outgoing<'_, '_> {
    /// What is left to do when the send is over or given up.
    fn finish(&mut self) {
        if !self.cursor.started() {
            // Failed or cancelled before any of it went out: the peer will never see this
            // placement.
            self.inner.lane.abort(self.placed);
        }
        if !self.finished && !self.cursor.in_progress() && self.lock.is_some() {
            // None of it out, or all of it but a version notice owed meanwhile: the socket
            // counts the message part-way out from its first try. Only under the send lock,
            // as another message may be part-way out while this one waits for it.
            self.inner.socket().send_given_up(&self.cursor);
        }
        if self.finished || !self.cursor.in_progress() {
            return; // done, or nothing of it sent: the stream is in sync
        }
        // The fds still to go are borrowed from the caller, who is gone: send copies.
        let unsent = &self.fds[self.cursor.fds_sent()..];
        let fds: io::Result<Vec<OwnedFd>> =
            unsent.iter().map(|fd| fd.try_clone_to_owned()).collect();
        let Ok(fds) = fds else {
            // Out of fds: the message cannot be completed, so the stream cannot continue.
            self.inner.hang_up(Socket::shutdown);
            return;
        };
        if self.inner.trace && sent_by_a_traced_send(&self.framed) {
            HANDED_OVER.set(true);
        }
        let mut cursor = self.cursor;
        cursor.forget_sent_fds();
        let rest = Remainder {
            inner: self.inner.clone(),
            cursor,
            framed: std::mem::take(&mut self.framed),
            fds,
            _lock: self.lock.take(),
            finished: false,
            reply_bytes: std::mem::take(&mut self.reply_bytes),
            _task: self.inner.tasks.enter(),
        };
        self.inner.runtime.spawn(async move {
            let mut rest = rest;
            let fds: Vec<BorrowedFd<'_>> = rest.fds.iter().map(|fd| fd.as_fd()).collect();
            // An error has shut the socket down already (`send_some` does, part-way).
            let _ = drive(&rest.inner, &mut rest.cursor, &rest.framed, &fds).await;
            rest.finished = true;
        });
    }
}

/// Whether the message in `framed` answers a call (a reply or a failure): what counts
/// against the budget of the replies waiting.
fn is_a_reply(framed: &[u8]) -> bool {
    let kind = framed.get(envelope::FRAMED_AT).copied();
    kind == Some(envelope::Kind::Reply as u8) || kind == Some(envelope::Kind::Failure as u8)
}

/// Whether the message in `framed` is a call, a oneway or a reply, whose sender holds a
/// [`TracedSend`] or a [`SaidReply`] (tracing on) to take the flag: an announcement or a
/// failure has none, and its flag, left set, would make the next call given up on this
/// thread print as sent, though none of it went out.
#[cold]
fn sent_by_a_traced_send(framed: &[u8]) -> bool {
    let kind = framed.get(envelope::FRAMED_AT).copied();
    [
        envelope::Kind::Call,
        envelope::Kind::Oneway,
        envelope::Kind::Reply,
    ]
    .iter()
    .any(|&k| kind == Some(k as u8))
}

/// The rest of a message whose sender was dropped part-way. Holds the send lock until the
/// message is out; if it is dropped before that (the runtime shutting down), the connection
/// is shut down.
struct Remainder {
    inner: Arc<Inner>,
    cursor: SendCursor,
    framed: Vec<u8>,
    fds: Vec<OwnedFd>,
    _lock: Option<OwnedMutexGuard<()>>,
    finished: bool,
    /// What a reply counts against the replies waiting, handed over by its `Outgoing`.
    reply_bytes: usize,
    /// Declared last: dropped after `inner`.
    _task: TaskGuard,
}

impl Drop for Remainder {
    fn drop(&mut self) {
        if !self.finished {
            self.inner.hang_up(Socket::shutdown);
        }
        self.inner.reply_out(self.reply_bytes);
    }
}
