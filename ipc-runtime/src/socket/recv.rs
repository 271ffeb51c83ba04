//! Receiving: [`Socket::recv`] and its kin, and the state a message part-way in leaves
//! behind ([`RecvState`]): its reassembly, or its dropping once it is over this side's limits.

use std::mem;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket as ns;
use parking_lot::MutexGuard;

use super::{Socket, over_limits};
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::sys;
use crate::wire::{DATAGRAM_MAX, FIRST_MAX, HEADER_LEN, Header, Kind};

/// What a receive leaves for the next: a message part-way in, or the rest of a failed one to
/// drop. A socket keeps it under its receive lock; a receiver that serialises its receives
/// itself keeps its own ([`Socket::take_recv_state`]). Two words, so that it moves cheaply.
#[derive(Debug, Default)]
pub(crate) struct RecvState {
    /// A message whose first datagram has arrived and whose rest has not (or is being
    /// dropped: see [`Refused`]). Boxed: only a receive that gives up part-way keeps one.
    partial: Option<Box<Partial>>,
    /// An earlier message failed part-way: drop its continuations before reading on.
    discarding: bool,
}

#[cfg(test)]
impl RecvState {
    /// A message is half received.
    pub(crate) fn is_partial(&self) -> bool {
        self.partial.is_some()
    }
}

#[derive(Debug)]
struct Partial {
    frame: Frame,
    total_len: usize,
    total_fds: usize,
    /// Fds the headers so far announced (the kernel may have dropped some of them).
    fds_announced: usize,
    /// The kernel dropped fds of this message (`MSG_CTRUNC`).
    dropped: bool,
    /// The message is over this side's limits: read to its end and dropped.
    refused: Option<Refused>,
}

impl Partial {
    /// Whether `len` payload bytes and the fds announced so far are the whole message;
    /// [`Error::Malformed`] if they are more than it announced.
    fn is_whole(&self, len: usize) -> Result<bool> {
        if len > self.total_len || self.fds_announced > self.total_fds {
            return Err(Error::Malformed(format!(
                "message announced {} bytes and {} fds, sent more",
                self.total_len, self.total_fds
            )));
        }
        Ok(len == self.total_len && self.fds_announced == self.total_fds)
    }
}

/// A message over this side's [`Limits`], read to its end and dropped, its fds closed as they
/// arrive: its [`Partial::frame`] keeps only its first [`REFUSED_KEPT`] bytes, so the layer
/// above can tell whose it was. Reported once all of it is in, and the stream is in sync.
///
/// [`Limits`]: crate::Limits
#[derive(Debug)]
struct Refused {
    /// What is reported: [`Error::TooLarge`] or [`Error::TooManyFds`].
    why: Error,
    /// Payload bytes of the message received so far, kept or not.
    len: usize,
}

/// Most payload bytes of a refused message a receive leaves in its frame (the first ones):
/// enough for the connection's envelope, which says whose the message was.
pub(crate) const REFUSED_KEPT: usize = 64;

/// The error (`ECONNRESET`) a receive fails with once, and with nothing taken, after the peer
/// closed its socket with messages of this side's unread: the datagrams the peer sent before
/// that are still queued behind it, and may say why it went (a peer of another wire version
/// says its own first). So a receive tries again: it takes those, and finds the hang-up only
/// once the queue is empty.
const PEER_RESET: i32 = libc::ECONNRESET;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    No,
    Forever,
    Until(Instant),
}

impl Socket {
    /// [`Socket::recv_into`] that never waits: `Ok(true)` if a whole message was received into
    /// `frame`, `Ok(false)` if none is ready (or another thread is receiving). A message that
    /// is part-way in is kept and completed by a later receive, so an event loop calls this
    /// whenever the socket is readable. Errors are those of [`Socket::recv_into`].
    pub fn try_recv_into(&self, frame: &mut Frame) -> Result<bool> {
        came(self.recv_inner(frame, Wait::No))
    }

    /// Receives the next message, waiting for it as long as it takes.
    pub fn recv(&self) -> Result<Frame> {
        let mut frame = Frame::default();
        self.recv_into(&mut frame, None)?;
        if frame.payload.capacity() > 2 * frame.payload.len() + 4096 {
            frame.payload.shrink_to_fit();
        }
        Ok(frame)
    }

    /// Receives the next message, or fails with [`Error::TimedOut`] once `timeout` has passed,
    /// whether it is waiting for a message or for another thread's receive on this socket to
    /// finish first (receives are serialised). A message that was part-way in is kept and
    /// completed by the next receive.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Frame> {
        let mut frame = Frame::default();
        self.recv_into(&mut frame, super::deadline_after(timeout))?;
        Ok(frame)
    }

    /// Receives a message if a whole one is ready, without waiting: `Ok(None)` otherwise
    /// (also while another thread is receiving on this socket).
    pub fn try_recv(&self) -> Result<Option<Frame>> {
        let mut frame = Frame::default();
        Ok(came(self.recv_inner(&mut frame, Wait::No))?.then_some(frame))
    }

    /// Receives the next message into `frame`, reusing its payload buffer; the fds `frame`
    /// held are closed. With `deadline`, fails with [`Error::TimedOut`] once it has passed, also
    /// while another thread's receive on this socket holds it up (receives are serialised).
    ///
    /// This is the allocation-free receive: a frame reused across calls needs no new memory
    /// for messages up to 64 KiB. On [`Error::FdsDropped`] the message was consumed whole and
    /// its payload is left in `frame` (without fds), so the caller can tell what it was.
    ///
    /// A message over this side's [`Limits`] is refused: it is read to its end and dropped,
    /// its fds handed as they arrive to typed-ipc's closer (its threads close them: a peer's
    /// fd may be slow to close, the guide's "slow closes"), and then reported as
    /// [`Error::TooLarge`] or [`Error::TooManyFds`] with its first 64 payload bytes (all, if
    /// it has fewer) left in `frame`; the stream is in sync. If another message interrupts it
    /// (a broken or hostile peer), it is reported at once with `frame` empty, and the other
    /// message is read next.
    ///
    /// [`Error::Disconnected`] comes once everything the peer sent before it hung up is read.
    ///
    /// [`Limits`]: crate::Limits
    #[inline]
    pub fn recv_into(&self, frame: &mut Frame, deadline: Option<Instant>) -> Result<()> {
        self.recv_inner(frame, deadline.map_or(Wait::Forever, Wait::Until))
    }

    /// [`Socket::recv_into`] for a receiver that keeps the receive state itself, `state`, and
    /// never receives on two threads at once (a connection's reader role): no lock is taken,
    /// which saves two atomic read-modify-writes a message. `state` must be the one this
    /// socket's receives left ([`Socket::take_recv_state`]), or a message part-way in is lost.
    #[inline(always)]
    pub(crate) fn recv_with_state(
        &self,
        state: &mut RecvState,
        frame: &mut Frame,
        deadline: Option<Instant>,
    ) -> Result<()> {
        frame.clear();
        self.recv_locked(state, frame, deadline.map_or(Wait::Forever, Wait::Until))
    }

    /// [`Socket::try_recv_into`] with the receive state kept by the receiver, as for
    /// [`Socket::recv_with_state`].
    pub(crate) fn try_recv_with_state(
        &self,
        state: &mut RecvState,
        frame: &mut Frame,
    ) -> Result<bool> {
        frame.clear();
        came(self.recv_locked(state, frame, Wait::No))
    }

    /// Takes the receive state out of this socket, for a receiver that keeps it from now on
    /// ([`Socket::recv_with_state`]); the socket's own receives start afresh.
    pub(crate) fn take_recv_state(&self) -> RecvState {
        mem::take(&mut self.recv.lock())
    }

    /// A message is half received.
    #[cfg(test)]
    pub(crate) fn is_partial(&self) -> bool {
        self.recv.lock().is_partial()
    }

    // The single-datagram path is inlined down to the syscall (`start_message`,
    // `recv_datagram`, `sys::recv`, and `send_whole`, `sys::send` when sending): each level
    // costs 15-20 instructions of prologue and epilogue per message, and together they were
    // ~100 of a small call's ~1,750 a side (`ipc-bench --bin instructions`).
    // Always: with a second caller in the connection (a sender reading while it waits), it
    // was no longer inlined, ~34 instructions a call.
    #[inline(always)]
    fn recv_inner(&self, frame: &mut Frame, wait: Wait) -> Result<()> {
        frame.clear();
        let mut state = match self.recv.try_lock() {
            Some(state) => state,
            None => self.lock_recv_contended(wait)?,
        };
        self.recv_locked(&mut state, frame, wait)
    }

    /// A receive with the receive state in hand (its lock held, or kept by the receiver).
    #[inline(always)]
    fn recv_locked(&self, state: &mut RecvState, frame: &mut Frame, wait: Wait) -> Result<()> {
        if state.discarding {
            self.discard(state, wait)?;
        }
        match state.partial.take() {
            Some(partial) => self.continue_message(state, *partial, frame, wait),
            None => self.start_message(state, frame, wait),
        }
    }

    #[inline(always)]
    fn start_message(&self, state: &mut RecvState, frame: &mut Frame, wait: Wait) -> Result<()> {
        frame.payload.reserve(FIRST_MAX);
        let (header, dropped) = match self.recv_datagram(frame, FIRST_MAX, wait) {
            Ok(received) => received,
            Err(e) => return Err(first_failed(state, frame, e)),
        };
        if header.kind != Kind::First {
            return Err(orphan(frame));
        }
        let (total_len, total_fds) = (header.total_len as usize, header.total_fds as usize);
        if total_len > self.limits.max_message_len || total_fds > self.limits.max_fds {
            return self.refuse(state, header, frame, wait);
        }
        if !dropped && frame.payload.len() == total_len && header.fds as usize == total_fds {
            return Ok(()); // the whole message in one datagram: the common case
        }
        let partial = Partial {
            frame: mem::take(frame),
            total_len,
            total_fds,
            fds_announced: header.fds as usize,
            dropped,
            refused: None,
        };
        self.continue_message(state, partial, frame, wait)
    }

    /// Refuses the message whose first datagram, with `header`, is in `frame`: it is over
    /// this side's limits. Its datagrams are read and dropped ([`Socket::drop_refused`]).
    #[cold]
    #[inline(never)]
    fn refuse(
        &self,
        state: &mut RecvState,
        header: Header,
        frame: &mut Frame,
        wait: Wait,
    ) -> Result<()> {
        let (total_len, total_fds) = (header.total_len as usize, header.total_fds as usize);
        let why = over_limits(total_len, total_fds, &self.limits, false);
        let len = frame.payload.len();
        frame.payload.truncate(REFUSED_KEPT);
        frame.discard_fds(); // to the closer: a hostile peer's fd may be slow to close
        let partial = Partial {
            frame: mem::take(frame),
            total_len,
            total_fds,
            fds_announced: header.fds as usize,
            dropped: false,
            refused: Some(Refused { why, len }),
        };
        self.continue_message(state, partial, frame, wait)
    }

    /// Reads datagrams until `p` is complete (or, refused, dropped whole); on a timeout keeps
    /// it in `state` for later.
    fn continue_message(
        &self,
        state: &mut RecvState,
        p: Partial,
        out: &mut Frame,
        wait: Wait,
    ) -> Result<()> {
        let result = match p.refused {
            None => self.complete(state, p, out, wait),
            Some(_) => self.drop_refused(state, p, out, wait),
        };
        if let Err(e) = &result {
            // The rest of a message that failed part-way must not be read as a new one. A
            // refusal is reported once its message is over (or interrupted by the next).
            state.discarding =
                !(matches!(e, Error::TimedOut | Error::FdsDropped { .. }) || e.is_over_limits());
        }
        result
    }

    /// Reads the rest of refused message `p` and drops it, closing its fds as they arrive;
    /// on a timeout keeps it in `state` for later. Reports the refusal once the whole
    /// message is in, with its first bytes in `out`; if a datagram that is not one of its
    /// continuations comes first, reports it at once with `out` empty, leaving that datagram
    /// to be read as usual.
    fn drop_refused(
        &self,
        state: &mut RecvState,
        mut p: Partial,
        out: &mut Frame,
        wait: Wait,
    ) -> Result<()> {
        let Refused { why, mut len } = p.refused.take().expect("a refused message");
        loop {
            if p.is_whole(len)? {
                *out = p.frame;
                return Err(why);
            }
            let (head, size) = match self.peek(wait) {
                Err(Error::TimedOut) => {
                    p.refused = Some(Refused { why, len });
                    state.partial = Some(Box::new(p));
                    return Err(Error::TimedOut);
                }
                r => r?,
            };
            let header = match Header::decode(&head, size.min(HEADER_LEN)) {
                Ok(h)
                    if h.kind == Kind::More
                        && h.total_len as usize == p.total_len
                        && h.total_fds as usize == p.total_fds =>
                {
                    h
                }
                _ => {
                    // The rest never came: nothing is left to tell whose this message was.
                    *out = p.frame;
                    out.discard();
                    return Err(why);
                }
            };
            // Take the datagram, keeping the bytes still short of `REFUSED_KEPT`; the kernel
            // cuts off the rest (`MSG_TRUNC`), and its fds are closed at once.
            let room = REFUSED_KEPT.saturating_sub(p.frame.payload.len());
            p.frame.payload.reserve(room);
            let got = loop {
                let mut head = [0u8; HEADER_LEN];
                let spare = &mut p.frame.payload.spare_capacity_mut()[..room];
                match sys::recv(self.fd.as_fd(), &mut head, spare, &mut p.frame.fds, true) {
                    Ok(got) => break got,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | PEER_RESET)) => {
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            let kept = got.len.saturating_sub(HEADER_LEN).min(room);
            // SAFETY: the kernel wrote `kept` bytes into the spare capacity handed to recvmsg.
            unsafe { p.frame.payload.set_len(p.frame.payload.len() + kept) };
            let arrived = p.frame.fds.len();
            p.frame.discard_fds();
            if arrived > header.fds as usize || (!got.fds_dropped && arrived != header.fds as usize)
            {
                return Err(Error::Malformed(format!(
                    "header announces {} fds, {arrived} arrived",
                    header.fds
                )));
            }
            len += size - HEADER_LEN;
            p.fds_announced += header.fds as usize;
        }
    }

    fn complete(
        &self,
        state: &mut RecvState,
        mut p: Partial,
        out: &mut Frame,
        wait: Wait,
    ) -> Result<()> {
        match self.read_rest(&mut p, wait) {
            Ok(()) => {}
            Err(Error::TimedOut) => {
                state.partial = Some(Box::new(p));
                return Err(Error::TimedOut);
            }
            Err(e) => {
                // To the closer: a hostile peer's fd may be slow to close.
                p.frame.discard_fds();
                return Err(e);
            }
        }
        *out = p.frame;
        if p.dropped {
            // The message is consumed whole, so the stream stays in sync; its bytes stay in
            // `out` so the layer above can tell whose message it was.
            let received = out.fds.len() as u64;
            // Closed here, not by the closer: this process is at its open-file limit (the
            // kernel had no room for them all), and the next message's fds need the room
            // now. (A peer can make this wait only while this process is at its limit.)
            out.fds.clear();
            return Err(Error::FdsDropped {
                expected: p.total_fds as u64,
                received,
            });
        }
        Ok(())
    }

    /// Reads datagrams into `p` until it is whole.
    fn read_rest(&self, p: &mut Partial, wait: Wait) -> Result<()> {
        loop {
            let have = p.frame.payload.len();
            if p.is_whole(have)? {
                return Ok(());
            }
            let room = (p.total_len - have).min(DATAGRAM_MAX);
            // Grow with what arrives, not with what the peer announced.
            let target = p.total_len.min((2 * have).max(have + room));
            p.frame.payload.reserve_exact(target - have);
            let (header, dropped) = self.recv_datagram(&mut p.frame, room, wait)?;
            if header.kind != Kind::More
                || header.total_len as usize != p.total_len
                || header.total_fds as usize != p.total_fds
            {
                return Err(Error::Malformed("message interrupted by another".into()));
            }
            p.fds_announced += header.fds as usize;
            p.dropped |= dropped;
        }
    }

    /// Receives one datagram, appending at most `room` payload bytes to `frame`, and checks
    /// it. Returns its header and whether the kernel dropped some of its fds.
    #[inline(always)]
    fn recv_datagram(&self, frame: &mut Frame, room: usize, wait: Wait) -> Result<(Header, bool)> {
        let mut head = [0u8; HEADER_LEN];
        let fds_before = frame.fds.len();
        let mut spin_until = match self.spin_ns.load(Ordering::Relaxed) {
            0 => None,
            _ if wait == Wait::No => None,
            ns => Some(spin_end(ns, wait)),
        };
        let got = loop {
            let spinning = spin_until.is_some_and(|end| Instant::now() < end);
            if !spinning {
                spin_until = None;
                if let Wait::Until(deadline) = wait {
                    self.wait(PollFlags::POLLIN, Some(deadline))?;
                }
            }
            let dont_wait = wait == Wait::No || spinning;
            let spare = &mut frame.payload.spare_capacity_mut()[..room];
            match sys::recv(self.fd.as_fd(), &mut head, spare, &mut frame.fds, dont_wait) {
                Ok(got) => break got,
                // The peer's reset is no datagram: the next try takes what the peer sent
                // before it, or finds the hang-up.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | PEER_RESET)) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && dont_wait => {
                    if wait == Wait::No {
                        return Err(Error::TimedOut);
                    }
                    std::hint::spin_loop();
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => self.nothing_yet(wait)?,
                Err(e) => return Err(e.into()),
            }
        };
        if got.len == 0 {
            return Err(self.nothing_received());
        }
        let len = got.len.saturating_sub(HEADER_LEN);
        // SAFETY: the kernel wrote `len` bytes into the spare capacity handed to recvmsg.
        unsafe { frame.payload.set_len(frame.payload.len() + len) };
        let header = match Header::decode(&head, got.len) {
            Ok(header) => header,
            Err(e) => return Err(self.refused_header(e)),
        };
        if got.truncated {
            return Err(Error::Truncated);
        }
        let arrived = frame.fds.len() - fds_before;
        if arrived > header.fds as usize || (!got.fds_dropped && arrived != header.fds as usize) {
            return Err(Error::Malformed(format!(
                "header announces {} fds, {arrived} arrived",
                header.fds
            )));
        }
        Ok((header, got.fds_dropped))
    }

    /// A datagram whose header this side refuses, as `e` says. A peer of another wire version
    /// is told this side's version, once, before the layer above hangs up: a header of no
    /// message, which its own receive refuses in turn as [`Error::VersionMismatch`]. Else it
    /// would see only the hang-up (`Disconnected`), although it speaks the other version.
    /// Never inside a message of several datagrams going out: that message's sender tells it
    /// after its last datagram (see `VersionNotice`).
    #[cold]
    #[inline(never)]
    fn refused_header(&self, e: Error) -> Error {
        if matches!(e, Error::VersionMismatch { .. }) && self.version_notice.due_now() {
            // A peer whose buffer is full sees the hang-up alone.
            let _ = self.tell_version();
            self.version_notice.told();
        }
        e
    }

    /// Drops the continuations of a message that failed, up to the next first datagram.
    fn discard(&self, state: &mut RecvState, wait: Wait) -> Result<()> {
        loop {
            let (mut head, n) = self.peek(wait)?;
            // Only a well-formed continuation belongs to the failed message; anything else
            // is read as usual (and reported, if it is garbage).
            if n < 4 || head[0..2] != *b"TI" || head[3] != Kind::More as u8 {
                state.discarding = false;
                return Ok(());
            }
            // Consume it; its bytes are cut off (MSG_TRUNC) and its fds go with `junk`.
            let mut junk = Frame::default();
            let taken = sys::recv(self.fd.as_fd(), &mut head, &mut [], &mut junk.fds, true);
            junk.discard_fds(); // to the closer: a hostile peer's fd may be slow to close
            match taken {
                Err(e) if !matches!(e.raw_os_error(), Some(libc::EINTR | PEER_RESET)) => {
                    return Err(e.into());
                }
                _ => {} // taken, or to be looked at again
            }
        }
    }

    /// The header of the next datagram, without taking it, and the datagram's whole length
    /// (`MSG_TRUNC`); [`Error::TimedOut`] if none comes in time. A datagram of no bytes is
    /// length 0 (no header: a receive reads it as usual and reports it); only a hang-up is
    /// [`Error::Disconnected`].
    fn peek(&self, wait: Wait) -> Result<([u8; HEADER_LEN], usize)> {
        loop {
            if let Wait::Until(deadline) = wait {
                self.wait(PollFlags::POLLIN, Some(deadline))?;
            }
            let mut head = [0u8; HEADER_LEN];
            let flags = ns::MsgFlags::MSG_PEEK
                | ns::MsgFlags::MSG_TRUNC
                | if wait == Wait::No {
                    ns::MsgFlags::MSG_DONTWAIT
                } else {
                    ns::MsgFlags::empty()
                };
            return match ns::recv(self.fd.as_raw_fd(), &mut head, flags) {
                Ok(0) if self.hung_up() => Err(Error::Disconnected),
                Ok(n) => Ok((head, n)),
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::ECONNRESET) => continue, // `PEER_RESET`
                Err(nix::Error::EAGAIN) if wait == Wait::No => Err(Error::TimedOut),
                Err(nix::Error::EAGAIN) => {
                    self.nothing_yet(wait)?;
                    continue;
                }
                Err(e) => Err(e.into()),
            };
        }
    }

    /// Whether a datagram is still queued.
    #[cold]
    #[inline(never)]
    fn more_queued(&self) -> bool {
        matches!(self.peek(Wait::No), Ok((_, n)) if n > 0)
    }

    /// After a receive that found nothing (`EAGAIN`) although it may wait, before it tries
    /// again: with a deadline, the next try polls for it first; waiting for good, the fd is
    /// non-blocking (`O_NONBLOCK`, left so by whoever made it), so this polls for a message.
    #[cold]
    #[inline(never)]
    fn nothing_yet(&self, wait: Wait) -> Result<()> {
        match wait {
            Wait::Forever => self.wait(PollFlags::POLLIN, None),
            Wait::No | Wait::Until(_) => Ok(()),
        }
    }

    /// The receive lock, which another thread's receive holds: possibly for long, blocked
    /// receiving, so a receive that must not wait past its deadline does not wait for the
    /// lock past it either ([`Error::TimedOut`]).
    #[cold]
    #[inline(never)]
    fn lock_recv_contended(&self, wait: Wait) -> Result<MutexGuard<'_, RecvState>> {
        match wait {
            Wait::Forever => Ok(self.recv.lock()),
            Wait::No => Err(Error::TimedOut),
            Wait::Until(deadline) => self.recv.try_lock_until(deadline).ok_or(Error::TimedOut),
        }
    }

    /// Why `recvmsg` returned no bytes: the peer hung up (or this end stopped reading), or
    /// it sent a datagram of no bytes, which no message of this protocol is. Only a hang-up
    /// leaves the socket shut for reading (`POLLRDHUP`), so the empty datagram, consumed, is
    /// told apart without waiting.
    ///
    /// But a peer that hung up may have sent an empty datagram before: a datagram still
    /// queued behind it says so (a hang-up shows only once the queue is empty), and it is
    /// garbage then too.
    #[cold]
    #[inline(never)]
    fn nothing_received(&self) -> Error {
        if self.hung_up() && !self.more_queued() {
            Error::Disconnected
        } else {
            Error::Malformed("a datagram of no bytes".into())
        }
    }

    /// Whether the socket is shut for reading (the peer hung up, or this end stopped reading),
    /// as opposed to holding a datagram of no bytes: what a receive of no bytes means.
    #[cold]
    #[inline(never)]
    fn hung_up(&self) -> bool {
        // nix names no POLLRDHUP.
        let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
        let hung_up = rdhup | PollFlags::POLLHUP | PollFlags::POLLERR;
        let open = loop {
            let mut fds = [PollFd::new(self.fd.as_fd(), rdhup)];
            match poll(&mut fds, PollTimeout::ZERO) {
                // It never waits, but a signal that comes while it looks fails it all the
                // same (whatever the handler's flags), having found nothing: no hang-up.
                Err(nix::Error::EINTR) => continue,
                polled => {
                    break polled.is_ok()
                        && fds[0].revents().is_some_and(|r| !r.intersects(hung_up));
                }
            }
        };
        !open
    }
}

/// A first datagram that was taken but failed, as `e` says: too large (`Truncated`), or fds
/// other than its header announced. The continuations of its message that may follow are
/// dropped before the next receive reads on, as for a message that failed part-way, not
/// reported one by one as continuations of no message. Nothing was taken on a timeout. The
/// fds it brought go to the closer, whoever `frame` is (a connection's reader drops it on
/// its own thread): a hostile peer's fd may be slow to close.
#[cold]
#[inline(never)]
fn first_failed(state: &mut RecvState, frame: &mut Frame, e: Error) -> Error {
    state.discarding = !matches!(e, Error::TimedOut);
    frame.discard_fds();
    e
}

/// What a receive that does not wait (`Wait::No`) says: `true` if a whole message came,
/// `false` if none was ready (its [`Error::TimedOut`]).
fn came(received: Result<()>) -> Result<bool> {
    match received {
        Ok(()) => Ok(true),
        Err(Error::TimedOut) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A continuation datagram with no message before it: its fds to the closer, as for
/// [`first_failed`].
#[cold]
#[inline(never)]
fn orphan(frame: &mut Frame) -> Error {
    frame.discard_fds();
    Error::Malformed("continuation datagram without a message".into())
}

/// When a receive that spins for `ns` before it blocks stops spinning: not after its
/// deadline, which a spin longer than the time left would overrun.
#[cold]
#[inline(never)]
fn spin_end(ns: u64, wait: Wait) -> Instant {
    let end = Instant::now() + Duration::from_nanos(ns);
    match wait {
        Wait::Until(deadline) => end.min(deadline),
        Wait::No | Wait::Forever => end,
    }
}
