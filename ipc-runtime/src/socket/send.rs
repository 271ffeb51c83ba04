//! Sending: [`Socket::send`] and its kin, one datagram at a time or a large message in
//! pieces ([`SendCursor`]), and how long a send has waited for room ([`SendWait`]).

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::poll::PollFlags;
use parking_lot::MutexGuard;

use super::{Socket, over_limits};
use crate::error::{Error, Limit, Result};
use crate::sys;
use crate::wire::{FDS_PER_DATAGRAM, FIRST_MAX, HEADER_LEN, Header, Kind};

impl Socket {
    /// Sends one message, waiting as long as the peer's buffer is full.
    ///
    /// A message that fits one datagram (≤ 64 KiB and ≤ 253 fds) is one `sendmsg`; a larger
    /// one is split, and the peer reassembles it. A message over this side's own [`Limits`]
    /// (what it would refuse to receive, unless `max_send_len` or `max_send_fds` allows
    /// more) is refused with [`Error::TooLarge`] or
    /// [`Error::TooManyFds`] before any of it goes out, and so is one the wire format cannot
    /// express (≥ 4 GiB); the socket stays usable. The peer's limits decide what it accepts.
    ///
    /// [`Limits`]: crate::Limits
    pub fn send(&self, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.send_deadline(payload, fds, None)
    }

    /// [`Socket::send`] that gives up with [`Error::TimedOut`] once `timeout` has passed,
    /// whether it is waiting for room in the peer's buffer or for another thread's message
    /// on this socket to finish going out first (sends are serialised).
    ///
    /// A message is never left half-sent: if the deadline passes after part of a large
    /// message went out, the socket is shut down (the peer sees a hang-up) before
    /// `TimedOut` is returned.
    pub fn send_timeout(
        &self,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<()> {
        self.send_deadline(payload, fds, super::deadline_after(timeout))
    }

    #[inline]
    pub(crate) fn send_deadline(
        &self,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
    ) -> Result<()> {
        if !self.sends_whole(payload.len(), fds.len()) {
            return self.send_pieces(payload, fds, deadline, &mut |deadline| {
                self.wait(PollFlags::POLLOUT, deadline)
            });
        }
        let _guard = self.lock_send(deadline)?;
        let header = whole_header(payload.len(), fds.len());
        let send = || sys::send(self.fd.as_fd(), &header, payload, fds);
        if whole_sent(send)? {
            return Ok(());
        }
        self.wait_to_send_whole(deadline, send, &mut |deadline| {
            self.wait(PollFlags::POLLOUT, deadline)
        })
    }

    /// [`Socket::send_deadline`] of a message built in `framed` after [`HEADER_LEN`] bytes of
    /// room. The header is written into the room, so that a message of one datagram goes out
    /// from one buffer: a plain `send(2)` when it carries no fds ([`sys::send_framed`]).
    /// It waits for room in the socket buffer with `wait_for_room` (until `deadline`, failing
    /// with [`Error::TimedOut`] after it): the connection's, which reads meanwhile. That
    /// returns once there may be room, and is called again if there was none after all.
    /// `stamp` finishes the payload (after the header's room) once the send lock is taken,
    /// before any of it goes: what it writes goes out in the order of the sends.
    #[inline]
    pub(crate) fn send_framed(
        &self,
        framed: &mut [u8],
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
        stamp: impl Fn(&mut [u8]),
        wait_for_room: WaitForRoom<'_>,
    ) -> Result<()> {
        let len = framed.len() - HEADER_LEN;
        if !self.sends_whole(len, fds.len()) {
            let payload = &mut framed[HEADER_LEN..];
            return self.send_framed_pieces(payload, fds, deadline, &stamp, wait_for_room);
        }
        let _guard = self.lock_send(deadline)?;
        stamp(&mut framed[HEADER_LEN..]);
        let framed = write_whole_header(framed, fds.len());
        let send = || sys::send_framed(self.fd.as_fd(), framed, fds);
        if whole_sent(send)? {
            return Ok(());
        }
        self.wait_to_send_whole(deadline, send, wait_for_room)
    }

    /// The send lock, waited for until `deadline` at most: another thread's message may take
    /// long to go out (to a peer that does not read, for good), and a send with a deadline
    /// must not wait past it. Nothing is sent yet, so the socket stays usable.
    #[inline]
    fn lock_send(&self, deadline: Option<Instant>) -> Result<MutexGuard<'_, ()>> {
        match deadline {
            None => Ok(self.send_lock.lock()),
            Some(deadline) => self
                .send_lock
                .try_lock_until(deadline)
                .ok_or(Error::TimedOut),
        }
    }

    /// The rest of [`Socket::send_deadline`] for one datagram that found the peer's buffer
    /// full (out of line: the common send is one syscall), `send` sending it again. The
    /// caller holds the send lock.
    #[cold]
    #[inline(never)]
    fn wait_to_send_whole(
        &self,
        deadline: Option<Instant>,
        send: impl FnMut() -> std::io::Result<usize> + Copy,
        wait_for_room: WaitForRoom<'_>,
    ) -> Result<()> {
        // One datagram is never half-sent, so a full buffer is simply waited out.
        let mut waiting = self.send_wait();
        loop {
            waiting.waiting(0);
            wait_for_room_or_retry(wait_for_room, deadline)?;
            if whole_sent(send)? {
                return Ok(());
            }
        }
    }

    /// [`Socket::send_deadline`] of a message that needs several datagrams (or is over the
    /// limits).
    #[inline(never)]
    fn send_pieces(
        &self,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
        wait_for_room: WaitForRoom<'_>,
    ) -> Result<()> {
        self.check_outgoing(payload.len(), fds.len())?;
        let guard = self.lock_send(deadline)?;
        self.send_pieces_locked(payload, fds, deadline, wait_for_room, guard)
    }

    /// [`Socket::send_pieces`] of a message built for [`Socket::send_framed`], `stamp`ed
    /// under the send lock.
    #[inline(never)]
    fn send_framed_pieces(
        &self,
        payload: &mut [u8],
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
        stamp: &dyn Fn(&mut [u8]),
        wait_for_room: WaitForRoom<'_>,
    ) -> Result<()> {
        self.check_outgoing(payload.len(), fds.len())?;
        let guard = self.lock_send(deadline)?;
        stamp(payload);
        self.send_pieces_locked(payload, fds, deadline, wait_for_room, guard)
    }

    /// The datagrams of [`Socket::send_pieces`], the send lock taken (`_guard`).
    fn send_pieces_locked(
        &self,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
        wait_for_room: WaitForRoom<'_>,
        _guard: MutexGuard<'_, ()>,
    ) -> Result<()> {
        let mut cursor = SendCursor::new(payload.len(), fds.len())?;
        let mut waiting = self.send_wait();
        // The datagrams are `send_some`'s; blocking only adds waiting for room between them.
        while !self.send_some(&mut cursor, payload, fds)? {
            waiting.waiting(cursor.sent());
            if let Err(e) = wait_for_room_or_retry(wait_for_room, deadline) {
                if cursor.in_progress() {
                    // The peer holds part of a message; the stream cannot be resynchronised.
                    let _ = self.shutdown();
                    return Err(e);
                }
                self.send_given_up(&cursor);
                // Out already, if started: only a version notice owed meanwhile waited.
                return if cursor.started() { Ok(()) } else { Err(e) };
            }
        }
        Ok(())
    }

    /// Marks a send of this socket that has to wait for room (see [`SendWait`]).
    pub(crate) fn send_wait(&self) -> SendWait<'_> {
        SendWait {
            socket: self,
            sent: None,
        }
    }

    /// How long the send now waiting for room in the socket buffer, if one is, has waited
    /// with none of its message going out (at `now`): `None` if no send waits. A send to a
    /// peer that does not read waits for good; one to a peer that reads, however slowly,
    /// starts over from zero each time part of its message goes out.
    pub(crate) fn send_stalled_for(&self, now: Instant) -> Option<Duration> {
        self.stalled
            .lock()
            .map(|since| now.saturating_duration_since(since))
    }

    /// Sends a message built in `framed` (as for [`Socket::send_framed`]) if it fits one
    /// datagram and can go out at once: `Ok(false)`, with nothing sent, if it would have to
    /// wait — for room in the socket buffer, for another thread's message to finish, or
    /// because it needs several datagrams. For a thread that must not block while it holds
    /// something others wait for (the connection's reader role). A message over this side's
    /// limits is refused, as by [`Socket::send`]. `stamp` as for [`Socket::send_framed`].
    pub(crate) fn try_send_framed(
        &self,
        framed: &mut [u8],
        fds: &[BorrowedFd<'_>],
        stamp: impl FnOnce(&mut [u8]),
    ) -> Result<bool> {
        let len = framed.len() - HEADER_LEN;
        if !self.sends_whole(len, fds.len()) {
            self.check_outgoing(len, fds.len())?;
            return Ok(false);
        }
        let Some(_guard) = self.send_lock.try_lock() else {
            return Ok(false);
        };
        stamp(&mut framed[HEADER_LEN..]);
        let framed = write_whole_header(framed, fds.len());
        whole_sent(|| sys::send_framed(self.fd.as_fd(), framed, fds))
    }

    /// Runs `f` holding the send lock, if no other thread holds it now (`None` if one does):
    /// for a message that [`Socket::send_framed_now`] sends without waiting.
    pub(crate) fn try_locked<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        let _guard = self.send_lock.try_lock()?;
        Some(f())
    }

    /// Sends a message of one datagram and no fds built in `framed` (as for
    /// [`Socket::send_framed`]) if the socket has room now: `Ok(false)`, with nothing sent, if
    /// not. The caller holds the send lock: a `stamp` of [`Socket::send_framed`] (which runs
    /// under it, so the message goes out before the one stamped), or [`Socket::try_locked`].
    pub(crate) fn send_framed_now(&self, framed: &mut [u8]) -> Result<bool> {
        debug_assert!(self.send_lock.is_locked(), "sent under the send lock");
        debug_assert!(self.sends_whole(framed.len() - HEADER_LEN, 0));
        let framed = write_whole_header(framed, 0);
        whole_sent(|| sys::send_framed(self.fd.as_fd(), framed, &[]))
    }

    /// Whether a message of `len` bytes and `fds` fds goes out as one datagram, with no check
    /// beyond these two compares: it fits one, and is within this side's limits (for a
    /// message within them, the same as `fits_one_datagram`).
    #[inline(always)]
    fn sends_whole(&self, len: usize, fds: usize) -> bool {
        len <= self.whole_len && fds <= self.whole_fds
    }

    /// Refuses a message of `len` bytes and `fds` fds that is over what this side sends
    /// ([`Limits::send_len`], [`Limits::send_fds`]): nothing of it may go out.
    ///
    /// [`Limits::send_len`]: crate::Limits::send_len
    /// [`Limits::send_fds`]: crate::Limits::send_fds
    #[inline]
    pub(crate) fn check_outgoing(&self, len: usize, fds: usize) -> Result<()> {
        if len > self.limits.send_len() || fds > self.limits.send_fds() {
            return Err(over_limits(len, fds, &self.limits, true));
        }
        Ok(())
    }

    /// Sends as much of the message `cursor` tracks as the socket takes without waiting:
    /// `Ok(true)` once the whole message is out, `Ok(false)` when the socket buffer is full
    /// (wait until the socket is writable, then call again with the same cursor, payload and
    /// fds — or, after [`SendCursor::forget_sent_fds`], only the fds not sent yet). The
    /// datagrams are those [`Socket::send`] would send.
    ///
    /// This is the event-loop form of [`Socket::send`] and does not take its lock: the caller
    /// makes sure no other message goes out on this socket between the first and the last
    /// datagram of this one. An error after part of the message went out shuts the socket
    /// down, as [`Socket::send`] does, unless no send can go out any more (`EPIPE`).
    pub(crate) fn send_some(
        &self,
        cursor: &mut SendCursor,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<bool> {
        debug_assert_eq!(payload.len(), cursor.total_len as usize);
        debug_assert_eq!(cursor.fds_base + fds.len(), cursor.total_fds as usize);
        loop {
            let (header, bytes, these) = if !cursor.started {
                let whole = fits_one_datagram(payload, fds, self.chunk);
                let first_len = if whole { payload.len() } else { 0 };
                let first_fds = fds.len().min(FDS_PER_DATAGRAM);
                let header = Header {
                    kind: Kind::First,
                    fds: first_fds as u16,
                    total_len: cursor.total_len,
                    total_fds: cursor.total_fds,
                };
                if !whole {
                    self.version_notice.message_starts();
                }
                (header, &payload[..first_len], &fds[..first_fds])
            } else {
                let unsent = cursor.fds_sent - cursor.fds_base;
                let (bytes, fds) = (&payload[cursor.bytes_sent..], &fds[unsent..]);
                if bytes.is_empty() && fds.is_empty() {
                    return self.message_out();
                }
                let cap = self.datagram_cap.load(Ordering::Relaxed);
                let chunk = &bytes[..bytes.len().min(cap)];
                let these = &fds[..fds.len().min(FDS_PER_DATAGRAM)];
                let header = Header {
                    kind: Kind::More,
                    fds: these.len() as u16,
                    total_len: cursor.total_len,
                    total_fds: cursor.total_fds,
                };
                (header, chunk, these)
            };
            match sys::send(self.fd.as_fd(), &header.encode(), bytes, these) {
                Ok(_) => {
                    cursor.started = true;
                    cursor.bytes_sent += bytes.len();
                    cursor.fds_sent += these.len();
                    if !cursor.in_progress() {
                        if header.kind == Kind::More {
                            return self.message_out();
                        }
                        return Ok(true); // no need to go round again to find out
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    if !cursor.started && !fits_one_datagram(payload, fds, self.chunk) {
                        self.first_found_no_room();
                    }
                    return Ok(false);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && self.smaller(bytes.len()) => {}
                Err(e) => {
                    if !cursor.started {
                        self.send_given_up(cursor); // nothing went out: the socket stays usable
                    } else if e.raw_os_error() != Some(libc::EPIPE) {
                        // The peer holds part of a message; the stream cannot be resynchronised.
                        // Not after `EPIPE`: nothing can follow the fragment, and the peer (one
                        // that shut only its reading side) may still answer calls sent before.
                        let _ = self.shutdown();
                    }
                    return Err(e.into());
                }
            }
        }
    }

    /// The last datagram of a message of several is out: `Ok(true)`, or `Ok(false)` if a
    /// version notice owed meanwhile (see `VersionNotice`) found no room, so that the caller
    /// waits for room and calls [`Socket::send_some`] again, which tells it then. The message
    /// is out either way (the cursor is no longer [`SendCursor::in_progress`]).
    #[cold]
    #[inline(never)]
    fn message_out(&self) -> Result<bool> {
        loop {
            #[cfg(test)]
            before_message_over(self);
            // One step, which a notice falling due cannot come between: ended, or owed.
            if !self.version_notice.message_ends() {
                return Ok(true);
            }
            match self.tell_version() {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(false),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Told, or it cannot be (the peer is gone, say): the peer learns no more.
                _ => {
                    self.version_notice.message_over();
                    return Ok(true);
                }
            }
        }
    }

    /// The first datagram of a message of several found no room: none of it is out, so a
    /// notice may go out before it while it waits, rather than be owed to its end (a
    /// connection that reads the peer's header of another version shuts its socket down at
    /// once, and a notice owed is lost). One owed already stays owed; the next try marks the
    /// message part-way again (`message_starts`).
    #[cold]
    #[inline(never)]
    fn first_found_no_room(&self) {
        let _owed = self.version_notice.message_ends();
    }

    /// The send of the message `cursor` tracks is given up (timed out, or its future
    /// dropped), the send lock held: if none of it went out, or all of it (a version notice
    /// owed meanwhile found no room), it is no longer part-way out, as `send_some` marked it
    /// before its first try, and the notice is told now if there is room. Else the notice
    /// would wait for the end of a message that never comes.
    #[cold]
    #[inline(never)]
    pub(crate) fn send_given_up(&self, cursor: &SendCursor) {
        if !cursor.in_progress() && self.version_notice.message_over() {
            let _ = self.tell_version();
        }
    }

    /// Sends `payload` as a message of one datagram, at once or not at all (`MSG_DONTWAIT`):
    /// the last words to a peer this side will not serve, which must not wait on a peer that
    /// does not read. `payload` must fit a first datagram ([`FIRST_MAX`]).
    #[cold]
    #[inline(never)]
    pub(crate) fn send_now(&self, payload: &[u8]) -> std::io::Result<usize> {
        debug_assert!(payload.len() <= FIRST_MAX);
        let header = Header {
            kind: Kind::First,
            fds: 0,
            total_len: payload.len() as u32,
            total_fds: 0,
        };
        sys::send(self.fd.as_fd(), &header.encode(), payload, &[])
    }

    /// Tells a peer of another wire version this side's: a header of no message. Never waits
    /// (`MSG_DONTWAIT`).
    #[cold]
    #[inline(never)]
    pub(super) fn tell_version(&self) -> std::io::Result<usize> {
        let ours = Header {
            kind: Kind::First,
            fds: 0,
            total_len: 0,
            total_fds: 0,
        };
        sys::send(self.fd.as_fd(), &ours.encode(), &[], &[])
    }

    /// After `ENOBUFS` for a datagram of `len` payload bytes, which went out not at all:
    /// whether a smaller one may do, with `datagram_cap` now lowered to half of it.
    /// The kernel wants one contiguous block for nearly all of a large datagram (a 4 MiB one
    /// is an order-10 page allocation), and on a machine whose memory is fragmented it may
    /// have none; such a block gets no likelier on the next try, so the cap stays lowered for
    /// this socket's sends. Down to [`FIRST_MAX`] (a block of 16 KiB, the rest in pages),
    /// below which the failure is the caller's.
    #[cold]
    #[inline(never)]
    fn smaller(&self, len: usize) -> bool {
        if len <= FIRST_MAX {
            return false;
        }
        let half = (len / 2).max(FIRST_MAX) & !4095;
        self.datagram_cap.fetch_min(half, Ordering::Relaxed);
        true
    }
}

/// How a send waits for room in the socket buffer, until a deadline: by polling the socket
/// ([`Socket::send`]), or by the connection's wait, which reads meanwhile.
pub(crate) type WaitForRoom<'a> = &'a mut dyn FnMut(Option<Instant>) -> Result<()>;

/// How long a send waits for room before it tries again anyway (see
/// [`wait_for_room_or_retry`]).
pub(crate) const RETRY_SEND: Duration = Duration::from_secs(1);

/// Waits for room with `wait_for_room` until `deadline`, but no longer than [`RETRY_SEND`]
/// at a time: `Ok` then too, so that the send tries again. A peer that has shut its reading
/// side (`shutdown(SHUT_RD)`) while this end's messages fill its socket makes every send
/// fail (`EPIPE`: [`Error::Disconnected`]), but poll says nothing of it, neither room nor a
/// hang-up, until that peer reads or goes: only trying again finds out.
#[cold]
#[inline(never)]
fn wait_for_room_or_retry(wait_for_room: WaitForRoom<'_>, deadline: Option<Instant>) -> Result<()> {
    let retry = Instant::now() + RETRY_SEND;
    if deadline.is_some_and(|deadline| deadline <= retry) {
        return wait_for_room(deadline);
    }
    match wait_for_room(Some(retry)) {
        Err(Error::TimedOut) => Ok(()),
        waited => waited,
    }
}

/// The header of a message of `len` bytes and `fds` fds that goes out as one datagram.
#[inline(always)]
fn whole_header(len: usize, fds: usize) -> [u8; HEADER_LEN] {
    Header {
        kind: Kind::First,
        fds: fds as u16,
        total_len: len as u32,
        total_fds: fds as u32,
    }
    .encode()
}

/// `framed` (a message after [`HEADER_LEN`] bytes of room) with the header of a message of
/// one datagram carrying `fds` fds written into the room, ready to go out whole.
#[inline(always)]
fn write_whole_header(framed: &mut [u8], fds: usize) -> &[u8] {
    let len = framed.len() - HEADER_LEN;
    framed[..HEADER_LEN].copy_from_slice(&whole_header(len, fds));
    framed
}

/// The outcome of `send`, one syscall sending one whole datagram: `Ok(false)` if the socket
/// buffer is full; retried if a signal interrupted it.
#[inline(always)]
fn whole_sent(mut send: impl FnMut() -> std::io::Result<usize>) -> Result<bool> {
    loop {
        return match send() {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(false),
            Err(e) => Err(e.into()),
        };
    }
}

/// A send that has to wait for room in the socket buffer, for [`Socket::send_stalled_for`]:
/// stalled from its first wait, again from each wait after part of its message went out, and
/// no longer once dropped. One send at a time waits on a socket (sends are serialised).
pub(crate) struct SendWait<'a> {
    socket: &'a Socket,
    /// How far the message had gone out ([`SendCursor::sent`]) when the stall began.
    sent: Option<usize>,
}

impl SendWait<'_> {
    /// The send is about to wait for room, `sent` ([`SendCursor::sent`]; 0 for a message of
    /// one datagram) of its message out.
    pub(crate) fn waiting(&mut self, sent: usize) {
        if self.sent != Some(sent) {
            self.sent = Some(sent);
            *self.socket.stalled.lock() = Some(Instant::now());
        }
    }
}

impl Drop for SendWait<'_> {
    fn drop(&mut self) {
        if self.sent.is_some() {
            *self.socket.stalled.lock() = None;
        }
    }
}

/// Where a message stands that [`Socket::send_some`] is sending a piece at a time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SendCursor {
    total_len: u32,
    total_fds: u32,
    /// The first datagram went out.
    started: bool,
    bytes_sent: usize,
    fds_sent: usize,
    /// How many leading fds the caller no longer passes (see `forget_sent_fds`).
    fds_base: usize,
}

impl SendCursor {
    /// How far the message has gone out: grows with every datagram sent.
    pub(crate) fn sent(&self) -> usize {
        usize::from(self.started) + self.bytes_sent + self.fds_sent
    }

    /// A cursor at the start of a message of `len` payload bytes and `fds` fds; refuses
    /// what the wire format cannot express (≥ 4 GiB, ≥ 2³² fds), as [`Socket::send`] does.
    pub(crate) fn new(len: usize, fds: usize) -> Result<SendCursor> {
        let total_len = u32::try_from(len).map_err(|_| Error::TooLarge {
            size: len as u64,
            limit: u32::MAX as u64,
            which: Limit::WireFormat,
            by_peer: false,
        })?;
        let total_fds = u32::try_from(fds).map_err(|_| Error::TooManyFds {
            count: fds as u64,
            limit: u32::MAX as u64,
            which: Limit::WireFormat,
            by_peer: false,
        })?;
        Ok(SendCursor {
            total_len,
            total_fds,
            started: false,
            bytes_sent: 0,
            fds_sent: 0,
            fds_base: 0,
        })
    }

    /// How many of the message's payload bytes went out, and of how many.
    #[cfg(feature = "tokio")]
    #[cold]
    pub(crate) fn bytes(&self) -> (usize, usize) {
        (self.bytes_sent, self.total_len as usize)
    }

    /// Some of the message is out (perhaps all of it).
    pub(crate) fn started(&self) -> bool {
        self.started
    }

    /// Part of the message is out, but not all of it: stopping now would leave the peer
    /// holding a fragment.
    pub(crate) fn in_progress(&self) -> bool {
        self.started
            && (self.bytes_sent < self.total_len as usize
                || self.fds_sent < self.total_fds as usize)
    }

    /// How many of the message's fds have been sent.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn fds_sent(&self) -> usize {
        self.fds_sent
    }

    /// From now on the caller passes only the fds not sent yet (`fds[self.fds_sent()..]` of
    /// the original list), e.g. because it keeps copies of those alone.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn forget_sent_fds(&mut self) {
        self.fds_base = self.fds_sent;
    }
}

#[cfg(test)]
thread_local! {
    /// Run by this thread's next message of several datagrams once its last datagram is out,
    /// before it ends: where the scheduler may stop the sender while another thread receives
    /// the header of a peer of another wire version, made to happen in a test.
    static BEFORE_MESSAGE_OVER: std::cell::Cell<Option<fn(&Socket)>> =
        const { std::cell::Cell::new(None) };
}

#[cfg(test)]
fn before_message_over(socket: &Socket) {
    if let Some(f) = BEFORE_MESSAGE_OVER.take() {
        f(socket);
    }
}

/// Whether a message goes out as one datagram (what `send_some` decides for its first).
fn fits_one_datagram(payload: &[u8], fds: &[BorrowedFd<'_>], chunk: usize) -> bool {
    payload.len() <= FIRST_MAX.min(chunk) && fds.len() <= FDS_PER_DATAGRAM
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use nix::sys::socket as ns;

    use super::*;
    use crate::wire::{DATAGRAM_MAX, HEADER_LEN};

    /// Spins (yielding) until `cond` holds; fails the test after a minute.
    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let give_up = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(Instant::now() < give_up, "gave up waiting until {what}");
            std::thread::yield_now();
        }
    }

    /// Receives one datagram of `socket`'s, if one is there: its length.
    fn take_datagram(socket: &Socket) -> Option<usize> {
        let mut buf = vec![0; DATAGRAM_MAX + HEADER_LEN];
        let raw = socket.as_fd().as_raw_fd();
        match ns::recv(raw, &mut buf, ns::MsgFlags::MSG_DONTWAIT) {
            Ok(len) => Some(len),
            Err(nix::Error::EAGAIN) => None,
            Err(e) => panic!("{e}"),
        }
    }

    /// How many bytes `socket` has received and not read yet (`FIONREAD`: all its datagrams'
    /// for a `SOCK_SEQPACKET` socket).
    fn queued(socket: &Socket) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int, into `n`, which lives across the call.
        let r = unsafe { libc::ioctl(socket.as_fd().as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        n as usize
    }

    /// The datagrams of a message sent from a framed buffer (`send(2)` without fds) are
    /// byte for byte those `Socket::send` sends (`sendmsg` with the header apart), with and
    /// without fds, in one datagram and in several; and each arrives whole, fds included.
    #[test]
    fn a_framed_message_goes_out_as_the_same_datagrams() {
        use std::os::fd::FromRawFd;
        let file = std::fs::File::open("/dev/null").unwrap();
        let raw = |socket: &Socket| {
            let mut buf = vec![0; DATAGRAM_MAX + HEADER_LEN];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = ns::recvmsg::<()>(
                socket.as_fd().as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                ns::MsgFlags::MSG_DONTWAIT | ns::MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .unwrap();
            let mut fds = 0;
            for c in msg.cmsgs().unwrap() {
                if let ns::ControlMessageOwned::ScmRights(received) = c {
                    for fd in received {
                        // SAFETY: the kernel just installed this fd for this process.
                        drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
                        fds += 1;
                    }
                }
            }
            let len = msg.bytes;
            buf.truncate(len);
            (buf, fds)
        };
        for len in [0, 64, FIRST_MAX - 1, 3 * FIRST_MAX + 5] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            for fds in [&[][..], &[file.as_fd()][..]] {
                let (a, b) = Socket::pair().unwrap();
                let mut framed = vec![0xee; HEADER_LEN];
                framed.extend_from_slice(&payload);
                a.send_framed(&mut framed, fds, None, |_| (), &mut |d| {
                    a.wait(PollFlags::POLLOUT, d)
                })
                .unwrap();
                let mut sent_framed = Vec::new();
                while queued(&b) > 0 {
                    sent_framed.push(raw(&b));
                }
                a.send(&payload, fds).unwrap();
                let mut sent = Vec::new();
                while queued(&b) > 0 {
                    sent.push(raw(&b));
                }
                assert!(!sent.is_empty());
                assert_eq!(sent_framed, sent, "{len} bytes, {} fds", fds.len());

                a.send_framed(&mut framed, fds, None, |_| (), &mut |d| {
                    a.wait(PollFlags::POLLOUT, d)
                })
                .unwrap();
                let frame = b.recv().unwrap();
                assert_eq!(frame.payload, payload);
                assert_eq!(frame.fds.len(), fds.len());
                let mut framed = vec![0; HEADER_LEN + len.min(64)];
                assert!(a.try_send_framed(&mut framed, fds, |_| ()).unwrap());
                assert_eq!(b.recv().unwrap().payload.len(), len.min(64));
            }
        }
    }

    /// What a server shutting down looks for: a message of one datagram counts as stalled
    /// while it waits for room, and no longer once it is out; one that goes out at once
    /// never does.
    #[test]
    fn a_send_of_one_datagram_is_stalled_while_it_waits() {
        let (a, b) = Socket::pair().unwrap();
        let later = Instant::now() + Duration::from_secs(3600);
        let m = vec![7u8; 60 << 10];
        let mut framed = vec![0; HEADER_LEN + m.len()];
        let mut queued = 0;
        while a.try_send_framed(&mut framed, &[], |_| ()).unwrap() {
            queued += 1;
        }
        assert!(queued > 0);
        assert_eq!(
            a.send_stalled_for(later),
            None,
            "sends that went out at once"
        );
        std::thread::scope(|s| {
            let sender = s.spawn(|| a.send(&m, &[]));
            wait_until("the send waits", || a.send_stalled_for(later).is_some());
            wait_until("the send is out", || {
                take_datagram(&b);
                sender.is_finished()
            });
            sender.join().unwrap().unwrap();
        });
        assert_eq!(a.send_stalled_for(later), None, "a send that is out");
    }

    /// A message of many datagrams counts as stalled from its first wait, and again from each
    /// wait after part of it went out: a peer that reads keeps it from staying stalled.
    #[test]
    fn a_send_of_many_datagrams_is_stalled_again_after_each_progress() {
        let (a, b) = Socket::pair().unwrap();
        let later = Instant::now() + Duration::from_secs(3600);
        let big = vec![7u8; 32 << 20];
        std::thread::scope(|s| {
            let sender = s.spawn(|| a.send(&big, &[]));
            wait_until("the send waits", || a.send_stalled_for(later).is_some());
            let first = a.send_stalled_for(later).unwrap();
            // While it waits, what it sent is all queued: once that is read, it has room,
            // sends until the buffer is full again (its message is far larger), and waits
            // again with part of its message out.
            let mut sent_before = queued(&b);
            while sent_before > 0 {
                sent_before -= take_datagram(&b).expect("queued");
            }
            wait_until("the stall starts over", || {
                a.send_stalled_for(later).is_some_and(|since| since < first)
            });
            wait_until("the send is out", || {
                take_datagram(&b);
                sender.is_finished()
            });
            sender.join().unwrap().unwrap();
        });
        assert_eq!(a.send_stalled_for(later), None, "a send that is out");
    }

    /// A peer of another wire version is told this side's version between two messages, never
    /// inside one: a notice due while a message of several datagrams is part-way out waits for
    /// its last datagram. Else the peer saw "message interrupted by another", not the version.
    #[test]
    fn the_version_notice_waits_for_a_message_part_way_out() {
        let (a, b) = Socket::pair().unwrap();
        let payload: Vec<u8> = (0..32 << 20).map(|i: usize| (i % 253) as u8).collect();
        let mut cursor = SendCursor::new(payload.len(), 0).unwrap();
        assert!(!a.send_some(&mut cursor, &payload, &[]).unwrap());
        assert!(cursor.in_progress());
        // The peer takes what came so far (room for a notice now), then speaks another version.
        assert!(b.try_recv().unwrap().is_none());
        assert!(b.is_partial());
        crate::connection::tests::say_another_version(&b);
        assert!(matches!(a.try_recv(), Err(Error::VersionMismatch { .. })));
        // Each end closes once it is done, so that neither can wait for the other for good.
        let reader = std::thread::spawn(move || (b.recv(), b.recv()));
        let sent = loop {
            match a.send_some(&mut cursor, &payload, &[]) {
                Ok(false) => a.wait(PollFlags::POLLOUT, None).unwrap(),
                done => break done,
            }
        };
        drop(a);
        let (message, notice) = reader.join().unwrap();
        assert!(
            message.unwrap().payload == payload,
            "the message arrived changed"
        );
        crate::connection::tests::assert_told_version(notice);
        assert!(sent.unwrap());
    }

    /// A notice that falls due after the last datagram of a message of several is out, while
    /// its sender is about to end the message, is told then: the sender finds it owed. It was
    /// lost: the sender saw no notice owed, then ended the message and with it the owed
    /// notice, and the peer saw only the hang-up.
    #[test]
    fn a_notice_due_as_a_message_ends_is_told() {
        let (a, b) = Socket::pair().unwrap();
        // In `a`'s receive queue, read where the sender is about to end the message.
        crate::connection::tests::say_another_version(&b);
        BEFORE_MESSAGE_OVER.set(Some(|a| {
            assert!(matches!(a.try_recv(), Err(Error::VersionMismatch { .. })));
        }));
        // Several datagrams, which go out at once: the socket buffer holds them.
        let payload: Vec<u8> = (0..2 * FIRST_MAX).map(|i| (i % 251) as u8).collect();
        a.send(&payload, &[]).unwrap();
        assert!(BEFORE_MESSAGE_OVER.take().is_none(), "the notice fell due");
        drop(a);
        assert!(b.recv().unwrap().payload == payload);
        crate::connection::tests::assert_told_version(b.recv());
    }

    /// A notice that falls due while a message of several datagrams waits for room for its
    /// first is told at once: none of the message is out, so it cannot land inside it. It
    /// was owed to the message's end, and a connection, which shuts its socket down once it
    /// reads the peer's header of another version, so lost it: the peer saw the hang-up.
    #[test]
    fn a_notice_due_before_a_message_starts_going_out_is_told_at_once() {
        let (a, b) = Socket::pair().unwrap();
        let mut unread = 0;
        while a.send_timeout(b"x", &[], Duration::ZERO).is_ok() {
            unread += 1;
        }
        let payload = vec![7u8; 1 << 20];
        let mut cursor = SendCursor::new(payload.len(), 0).unwrap();
        assert!(!a.send_some(&mut cursor, &payload, &[]).unwrap());
        assert!(!cursor.started(), "the first datagram found no room");
        // The peer reads (room now), then speaks another version; this side's connection
        // reads that and ends, shutting its socket down.
        for _ in 0..unread {
            b.recv().unwrap();
        }
        crate::connection::tests::say_another_version(&b);
        assert!(matches!(a.try_recv(), Err(Error::VersionMismatch { .. })));
        a.shutdown().unwrap();
        crate::connection::tests::assert_told_version(b.recv());
    }

    /// A blocking send of a message of several datagrams that times out before its first
    /// datagram went out (the socket full) must not leave the socket thinking a message is
    /// part-way out: a peer of another wire version that speaks next is told this side's
    /// version. Before, the notice was owed to a message that would never end.
    #[test]
    fn a_send_timed_out_unstarted_does_not_hold_back_the_version_notice() {
        let (a, b) = Socket::pair().unwrap();
        let mut unread = 0;
        while a.send_timeout(b"x", &[], Duration::ZERO).is_ok() {
            unread += 1;
        }
        let payload = vec![7u8; 1 << 20];
        let sent = a.send_timeout(&payload, &[], Duration::ZERO);
        assert!(matches!(sent, Err(Error::TimedOut)), "{sent:?}");
        for _ in 0..unread {
            b.recv().unwrap();
        }
        crate::connection::tests::say_another_version(&b);
        assert!(matches!(a.try_recv(), Err(Error::VersionMismatch { .. })));
        drop(a);
        crate::connection::tests::assert_told_version(b.recv());
    }

    /// A send whose message is all out, while a version notice owed meanwhile waits for room
    /// and its deadline passes, succeeds: the message went out, and only the notice (which
    /// the peer then misses) is given up. It failed with `TimedOut` for a message delivered.
    #[test]
    fn a_send_whose_message_is_out_succeeds_while_only_the_notice_waits() {
        let (mut a, b) = Socket::pair().unwrap();
        // Datagrams of half the send buffer: two fill it (a datagram goes while the buffer
        // holds less than its size), so the send waits for the peer after every second one,
        // and after the last (an even count), the notice finds no room.
        ns::setsockopt(&a.fd, ns::sockopt::SndBuf, &4096).unwrap();
        let sndbuf = ns::getsockopt(&a.fd, ns::sockopt::SndBuf).unwrap();
        a.chunk = sndbuf / 2;
        a.datagram_cap = std::sync::atomic::AtomicUsize::new(a.chunk);
        let payload: Vec<u8> = (0..16 * a.chunk).map(|i| (i % 251) as u8).collect();
        let mut arrived = None;
        let mut told = false;
        // The wait for room plays the peer: it reads what came, and speaks another version
        // once; once the whole message is in, the send's deadline passes.
        let mut peer = |_deadline: Option<Instant>| {
            if let Some(frame) = b.try_recv().unwrap() {
                arrived = Some(frame);
                return Err(Error::TimedOut);
            }
            if !told {
                told = true;
                crate::connection::tests::say_another_version(&b);
                assert!(matches!(a.try_recv(), Err(Error::VersionMismatch { .. })));
            }
            Ok(())
        };
        // A deadline, which `peer` says has passed; without one, the send would try again.
        let sent = a.send_pieces(&payload, &[], Some(Instant::now()), &mut peer);
        assert!(arrived.is_some_and(|frame| frame.payload == payload));
        sent.unwrap();
    }

    /// A datagram the kernel cannot allocate (`ENOBUFS`: it wants one block of contiguous
    /// memory for nearly all of it, and a fragmented machine may have no 4 MiB block free)
    /// is sent again in smaller datagrams, not failed with the message half out. Forged here
    /// with datagrams above the largest block the kernel ever allocates (4 MiB + 68 KiB), which
    /// fail the same way on any machine.
    #[test]
    fn datagrams_the_kernel_cannot_allocate_go_out_smaller() {
        let (mut a, b) = Socket::pair().unwrap();
        // Room for such datagrams: more than `net.core.wmem_max` allows on a stock machine
        // (208 KiB, doubled), but root may force it.
        let _ = ns::setsockopt(&a.fd, ns::sockopt::SndBufForce, &(8 << 20));
        let sndbuf = ns::getsockopt(&a.fd, ns::sockopt::SndBuf).unwrap();
        if sndbuf <= 6 << 20 {
            eprintln!("not run: a send buffer of {sndbuf} B (needs root, or wmem_max ≥ 3 MiB)");
            return;
        }
        a.chunk = 6 << 20;
        a.datagram_cap = std::sync::atomic::AtomicUsize::new(a.chunk);
        let file = std::fs::File::open("/dev/null").unwrap();
        let payload: Vec<u8> = (0..20 << 20).map(|i: usize| (i * 7 % 251) as u8).collect();
        std::thread::scope(|s| {
            let receiver = s.spawn(|| b.recv());
            a.send(&payload, &[file.as_fd(); 300]).unwrap();
            let frame = receiver.join().unwrap().unwrap();
            assert!(frame.payload == payload, "the message arrived changed");
            assert_eq!(frame.fds.len(), 300);
        });
        assert!(a.datagram_cap.load(Ordering::Relaxed) <= DATAGRAM_MAX);
    }
}
