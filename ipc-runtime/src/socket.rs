//! [`Socket`]: a connected `SOCK_SEQPACKET` socket that moves whole [`Frame`]s.

use parking_lot::Mutex;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{self as ns, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};

use crate::error::{Error, Result};
use crate::frame::{Frame, Limits};
use crate::sys;
use crate::wire::{DATAGRAM_MAX, FDS_PER_DATAGRAM, FIRST_MAX, HEADER_LEN, Header, Kind};

/// The peer process of a socket, as the kernel saw it when the connection was made
/// (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// A connected Unix `SOCK_SEQPACKET` socket that sends and receives whole [`Frame`]s.
///
/// Every method takes `&self` and the socket is `Sync`: one thread may send while another
/// receives. Sends are serialised so the datagrams of a large message never interleave with
/// another message's; receives likewise.
///
/// Blocking calls wait forever unless given a timeout; [`Socket::try_recv`] never waits, and
/// the socket is [`AsFd`] so an event loop can wait for readability instead. Sends never
/// block on a full socket buffer without a deadline to stop them: see [`Socket::send`].
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    limits: Limits,
    /// Most payload bytes this side puts in one continuation datagram (from `SO_SNDBUF`).
    chunk: usize,
    /// Most payload bytes and fds of a message that goes out as one datagram with no further
    /// check: one that fits a datagram and is within `limits` ([`Socket::sends_whole`]).
    whole_len: usize,
    whole_fds: usize,
    send_lock: Mutex<()>,
    recv: Mutex<RecvState>,
    /// Nanoseconds to poll for a message before blocking; 0 = block at once.
    spin_ns: AtomicU64,
    /// Since when the send waiting for room (if one is) has waited with none of its message
    /// going out: see [`Socket::send_stalled_for`]. Only a send that has to wait touches it.
    stalled: Mutex<Option<Instant>>,
}

#[derive(Debug, Default)]
struct RecvState {
    /// A message whose first datagram has arrived and whose rest has not (or is being
    /// dropped: see [`Refused`]).
    partial: Option<Partial>,
    /// An earlier message failed part-way: drop its continuations before reading on.
    discarding: bool,
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

impl Socket {
    /// A connected pair of sockets, like [`std::os::unix::net::UnixStream::pair`].
    pub fn pair() -> Result<(Socket, Socket)> {
        let (a, b) = ns::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Socket::new(a)?, Socket::new(b)?))
    }

    /// Connects to a [`Listener`](crate::Listener) bound to a filesystem path.
    pub fn connect(path: impl AsRef<Path>) -> Result<Socket> {
        Socket::connect_addr(&UnixAddr::new(path.as_ref())?)
    }

    /// Connects to a [`Listener`](crate::Listener) bound to a Linux abstract name.
    pub fn connect_abstract(name: impl AsRef<[u8]>) -> Result<Socket> {
        Socket::connect_addr(&UnixAddr::new_abstract(name.as_ref())?)
    }

    fn connect_addr(addr: &UnixAddr) -> Result<Socket> {
        let fd = ns::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        ns::connect(fd.as_raw_fd(), addr)?;
        Socket::new(fd)
    }

    /// Takes over a connected `SOCK_SEQPACKET` socket, for example one a parent process left
    /// open for its child. Any other kind of fd is refused.
    pub fn from_fd(fd: OwnedFd) -> Result<Socket> {
        if ns::getsockopt(&fd, sockopt::SockType)? != SockType::SeqPacket {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a SOCK_SEQPACKET socket",
            )));
        }
        Socket::new(fd)
    }

    pub(crate) fn new(fd: OwnedFd) -> Result<Socket> {
        // A bigger send buffer means bigger datagrams, so fewer syscalls for bulk data. The
        // kernel caps the request at net.core.wmem_max and doubles it; whatever we get, the
        // largest datagram it accepts is the buffer less 32 bytes of bookkeeping.
        let want = DATAGRAM_MAX + HEADER_LEN + 64;
        let _ = ns::setsockopt(&fd, sockopt::SndBuf, &want);
        let sndbuf = ns::getsockopt(&fd, sockopt::SndBuf)?;
        let chunk = sndbuf
            .saturating_sub(32 + HEADER_LEN)
            .clamp(4096, DATAGRAM_MAX);
        let limits = Limits::default();
        let (whole_len, whole_fds) = whole_sizes(chunk, limits);
        Ok(Socket {
            fd,
            limits,
            chunk,
            whole_len,
            whole_fds,
            send_lock: Mutex::new(()),
            recv: Mutex::new(RecvState::default()),
            spin_ns: AtomicU64::new(0),
            stalled: Mutex::new(None),
        })
    }

    /// Sets what this side accepts from the peer, which is also the most it sends: a message
    /// over these limits is refused before any of it goes out (see [`Socket::send`]).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        (self.whole_len, self.whole_fds) = whole_sizes(self.chunk, limits);
    }

    /// What this side accepts from the peer (and the most it sends).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Before a receive blocks, keep trying for up to `spin` (off, `Duration::ZERO`, by
    /// default).
    ///
    /// On a machine where an idle CPU halts, waking a process blocked on another CPU costs
    /// tens of microseconds, far more than the message itself; a receiver that spins a little
    /// catches a quick reply while its CPU is still awake. The price is CPU time: a waiting
    /// thread burns its CPU for up to `spin` per receive (non-blocking `recvmsg` calls back to
    /// back), so enable it for latency-critical request/reply traffic across CPUs only.
    pub fn set_spin(&self, spin: Duration) {
        let ns = u64::try_from(spin.as_nanos()).unwrap_or(u64::MAX);
        self.spin_ns.store(ns, Ordering::Relaxed);
    }

    /// The peer's pid, uid and gid as the kernel recorded them at connection time.
    pub fn peer_credentials(&self) -> Result<PeerCredentials> {
        let c = ns::getsockopt(&self.fd, sockopt::PeerCredentials)?;
        Ok(PeerCredentials {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        })
    }

    /// Shuts the socket down both ways: the peer sees a hang-up, and threads blocked on this
    /// socket wake with [`Error::Disconnected`].
    pub fn shutdown(&self) -> Result<()> {
        match ns::shutdown(self.fd.as_raw_fd(), ns::Shutdown::Both) {
            Err(nix::Error::ENOTCONN) => Ok(()),
            r => Ok(r?),
        }
    }

    /// Shuts the receiving side down: threads blocked receiving wake as if the peer had hung
    /// up, while sends still go out (graceful shutdown: answer what is in flight).
    pub fn shutdown_read(&self) -> Result<()> {
        match ns::shutdown(self.fd.as_raw_fd(), ns::Shutdown::Read) {
            Err(nix::Error::ENOTCONN) => Ok(()),
            r => Ok(r?),
        }
    }

    /// Sends one message, waiting as long as the peer's buffer is full.
    ///
    /// A message that fits one datagram (≤ 64 KiB and ≤ 253 fds) is one `sendmsg`; a larger
    /// one is split, and the peer reassembles it. A message over this side's own [`Limits`]
    /// (what it would refuse to receive) is refused with [`Error::TooLarge`] or
    /// [`Error::TooManyFds`] before any of it goes out, and so is one the wire format cannot
    /// express (≥ 4 GiB); the socket stays usable. The peer's limits decide what it accepts.
    pub fn send(&self, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.send_deadline(payload, fds, None)
    }

    /// [`Socket::send`] that gives up with [`Error::TimedOut`] once `timeout` has passed.
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
        self.send_deadline(payload, fds, Some(Instant::now() + timeout))
    }

    #[inline]
    pub(crate) fn send_deadline(
        &self,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
    ) -> Result<()> {
        if !self.sends_whole(payload, fds) {
            return self.send_pieces(payload, fds, deadline);
        }
        let _guard = self.send_lock.lock();
        if self.send_whole(payload, fds)? {
            return Ok(());
        }
        self.wait_to_send_whole(payload, fds, deadline)
    }

    /// The rest of [`Socket::send_deadline`] for one datagram that found the peer's buffer
    /// full (out of line: the common send is one `sendmsg`). The caller holds the send lock.
    #[cold]
    #[inline(never)]
    fn wait_to_send_whole(
        &self,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
    ) -> Result<()> {
        // One datagram is never half-sent, so a full buffer is simply waited out.
        let mut waiting = self.send_wait();
        loop {
            waiting.waiting(0);
            self.wait(PollFlags::POLLOUT, deadline)?;
            if self.send_whole(payload, fds)? {
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
    ) -> Result<()> {
        self.check_outgoing(payload.len(), fds.len())?;
        let _guard = self.send_lock.lock();
        let mut cursor = SendCursor::new(payload.len(), fds.len())?;
        let mut waiting = self.send_wait();
        // The datagrams are `send_some`'s; blocking only adds waiting for room between them.
        while !self.send_some(&mut cursor, payload, fds)? {
            waiting.waiting(cursor.sent());
            if let Err(e) = self.wait(PollFlags::POLLOUT, deadline) {
                if cursor.in_progress() {
                    // The peer holds part of a message; the stream cannot be resynchronised.
                    let _ = self.shutdown();
                }
                return Err(e);
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

    /// Sends a message that fits one datagram if it can go out at once: `Ok(false)`, with
    /// nothing sent, if it would have to wait — for room in the socket buffer, for another
    /// thread's message to finish, or because it needs several datagrams. For a thread that
    /// must not block while it holds something others wait for (the connection's reader
    /// role). A message over this side's limits is refused, as by [`Socket::send`].
    pub(crate) fn try_send(&self, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<bool> {
        if !self.sends_whole(payload, fds) {
            self.check_outgoing(payload.len(), fds.len())?;
            return Ok(false);
        }
        let Some(_guard) = self.send_lock.try_lock() else {
            return Ok(false);
        };
        self.send_whole(payload, fds)
    }

    /// Whether a message goes out as one datagram, with no check beyond these two compares:
    /// it fits one, and is within this side's limits (for a message within them, the same
    /// as `fits_one_datagram`).
    #[inline(always)]
    fn sends_whole(&self, payload: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
        payload.len() <= self.whole_len && fds.len() <= self.whole_fds
    }

    /// Refuses a message of `len` bytes and `fds` fds that is over this side's [`Limits`],
    /// which it would refuse to receive: nothing of it may go out.
    #[inline]
    pub(crate) fn check_outgoing(&self, len: usize, fds: usize) -> Result<()> {
        if len > self.limits.max_message_len || fds > self.limits.max_fds {
            return Err(over_limits(len, fds, self.limits));
        }
        Ok(())
    }

    /// One `sendmsg` of a message that fits one datagram: `Ok(false)` if the socket buffer
    /// is full. The caller holds the send lock.
    #[inline(always)]
    fn send_whole(&self, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<bool> {
        let header = Header {
            kind: Kind::First,
            fds: fds.len() as u16,
            total_len: payload.len() as u32,
            total_fds: fds.len() as u32,
        };
        loop {
            return match sys::send(self.fd.as_fd(), &header.encode(), payload, fds) {
                Ok(_) => Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(false),
                Err(e) => Err(e.into()),
            };
        }
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
    /// down, as [`Socket::send`] does.
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
                (header, &payload[..first_len], &fds[..first_fds])
            } else {
                let unsent = cursor.fds_sent - cursor.fds_base;
                let (bytes, fds) = (&payload[cursor.bytes_sent..], &fds[unsent..]);
                if bytes.is_empty() && fds.is_empty() {
                    return Ok(true);
                }
                let chunk = &bytes[..bytes.len().min(self.chunk)];
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
                        return Ok(true); // no need to go round again to find out
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(false),
                Err(e) => {
                    if cursor.started {
                        // The peer holds part of a message; the stream cannot be resynchronised.
                        let _ = self.shutdown();
                    }
                    return Err(e.into());
                }
            }
        }
    }

    /// [`Socket::recv_into`] that never waits: `Ok(true)` if a whole message was received into
    /// `frame`, `Ok(false)` if none is ready. A message that is part-way in is kept and
    /// completed by a later receive, so an event loop calls this whenever the socket is
    /// readable. Errors are those of [`Socket::recv_into`].
    pub fn try_recv_into(&self, frame: &mut Frame) -> Result<bool> {
        match self.recv_inner(frame, Wait::No) {
            Ok(()) => Ok(true),
            Err(Error::TimedOut) => Ok(false),
            Err(e) => Err(e),
        }
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

    /// Receives the next message, or fails with [`Error::TimedOut`] once `timeout` has passed.
    /// A message that was part-way in is kept and completed by the next receive.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Frame> {
        let mut frame = Frame::default();
        self.recv_into(&mut frame, Some(Instant::now() + timeout))?;
        Ok(frame)
    }

    /// Receives a message if a whole one is ready, without waiting: `Ok(None)` otherwise.
    pub fn try_recv(&self) -> Result<Option<Frame>> {
        let mut frame = Frame::default();
        match self.recv_inner(&mut frame, Wait::No) {
            Ok(()) => Ok(Some(frame)),
            Err(Error::TimedOut) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Receives the next message into `frame`, reusing its payload buffer; the fds `frame`
    /// held are closed. With `deadline`, fails with [`Error::TimedOut`] once it has passed.
    ///
    /// This is the allocation-free receive: a frame reused across calls needs no new memory
    /// for messages up to 64 KiB. On [`Error::FdsDropped`] the message was consumed whole and
    /// its payload is left in `frame` (without fds), so the caller can tell what it was.
    ///
    /// A message over this side's [`Limits`] is refused: it is read to its end and dropped,
    /// its fds closed as they arrive, and then reported as [`Error::TooLarge`] or
    /// [`Error::TooManyFds`] with its first 64 payload bytes (all, if it has fewer) left in
    /// `frame`; the stream is in sync. If another message interrupts it (a broken or hostile
    /// peer), it is reported at once with `frame` empty, and the other message is read next.
    #[inline]
    pub fn recv_into(&self, frame: &mut Frame, deadline: Option<Instant>) -> Result<()> {
        self.recv_inner(frame, deadline.map_or(Wait::Forever, Wait::Until))
    }

    /// A message is half received.
    #[cfg(test)]
    pub(crate) fn is_partial(&self) -> bool {
        self.recv.lock().partial.is_some()
    }

    // The single-datagram path is inlined down to the syscall (`start_message`,
    // `recv_datagram`, `sys::recv`, and `send_whole`, `sys::send` when sending): each level
    // costs 15-20 instructions of prologue and epilogue per message, and together they were
    // ~100 of a small call's ~1,750 a side (`ipc-bench --bin instructions`).
    #[inline]
    fn recv_inner(&self, frame: &mut Frame, wait: Wait) -> Result<()> {
        frame.clear();
        let mut state = self.recv.lock();
        if state.discarding {
            self.discard(&mut state, wait)?;
        }
        match state.partial.take() {
            Some(partial) => self.continue_message(&mut state, partial, frame, wait),
            None => self.start_message(&mut state, frame, wait),
        }
    }

    #[inline(always)]
    fn start_message(&self, state: &mut RecvState, frame: &mut Frame, wait: Wait) -> Result<()> {
        frame.payload.reserve(FIRST_MAX);
        let (header, dropped) = self.recv_datagram(frame, FIRST_MAX, wait)?;
        if header.kind != Kind::First {
            return Err(Error::Malformed(
                "continuation datagram without a message".into(),
            ));
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
        let why = over_limits(total_len, total_fds, self.limits);
        let len = frame.payload.len();
        frame.payload.truncate(REFUSED_KEPT);
        frame.fds.clear();
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
                    state.partial = Some(p);
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
                    out.clear();
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
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            let kept = got.len.saturating_sub(HEADER_LEN).min(room);
            // SAFETY: the kernel wrote `kept` bytes into the spare capacity handed to recvmsg.
            unsafe { p.frame.payload.set_len(p.frame.payload.len() + kept) };
            let arrived = p.frame.fds.len();
            p.frame.fds.clear();
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
        loop {
            let have = p.frame.payload.len();
            if p.is_whole(have)? {
                break;
            }
            let room = (p.total_len - have).min(DATAGRAM_MAX);
            // Grow with what arrives, not with what the peer announced.
            let target = p.total_len.min((2 * have).max(have + room));
            p.frame.payload.reserve_exact(target - have);
            let (header, dropped) = match self.recv_datagram(&mut p.frame, room, wait) {
                Err(Error::TimedOut) => {
                    state.partial = Some(p);
                    return Err(Error::TimedOut);
                }
                r => r?,
            };
            if header.kind != Kind::More
                || header.total_len as usize != p.total_len
                || header.total_fds as usize != p.total_fds
            {
                return Err(Error::Malformed("message interrupted by another".into()));
            }
            p.fds_announced += header.fds as usize;
            p.dropped |= dropped;
        }
        *out = p.frame;
        if p.dropped {
            // The message is consumed whole, so the stream stays in sync; its bytes stay in
            // `out` so the layer above can tell whose message it was.
            let received = out.fds.len() as u64;
            out.fds.clear();
            return Err(Error::FdsDropped {
                expected: p.total_fds as u64,
                received,
            });
        }
        Ok(())
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
            ns => Some(Instant::now() + Duration::from_nanos(ns)),
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
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && dont_wait => {
                    if wait == Wait::No {
                        return Err(Error::TimedOut);
                    }
                    std::hint::spin_loop();
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && wait != Wait::Forever => {}
                Err(e) => return Err(e.into()),
            }
        };
        if got.len == 0 {
            return Err(self.nothing_received());
        }
        let len = got.len.saturating_sub(HEADER_LEN);
        // SAFETY: the kernel wrote `len` bytes into the spare capacity handed to recvmsg.
        unsafe { frame.payload.set_len(frame.payload.len() + len) };
        let header = Header::decode(&head, got.len)?;
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
            // Consume it; its bytes are cut off (MSG_TRUNC) and its fds closed with `junk`.
            let mut junk = Frame::default();
            sys::recv(self.fd.as_fd(), &mut head, &mut [], &mut junk.fds, true)?;
        }
    }

    /// The header of the next datagram, without taking it, and the datagram's whole length
    /// (`MSG_TRUNC`); [`Error::TimedOut`] if none comes in time.
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
                Ok(0) => Err(Error::Disconnected),
                Ok(n) => Ok((head, n)),
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) if wait == Wait::No => Err(Error::TimedOut),
                Err(nix::Error::EAGAIN) if wait != Wait::Forever => continue,
                Err(e) => Err(e.into()),
            };
        }
    }

    /// Why `recvmsg` returned no bytes: the peer hung up (or this end stopped reading), or
    /// it sent a datagram of no bytes, which no message of this protocol is. Only a hang-up
    /// leaves the socket shut for reading (`POLLRDHUP`), so the empty datagram, consumed, is
    /// told apart without waiting.
    #[cold]
    #[inline(never)]
    fn nothing_received(&self) -> Error {
        // nix names no POLLRDHUP.
        let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
        let mut fds = [PollFd::new(self.fd.as_fd(), rdhup)];
        let hung_up = rdhup | PollFlags::POLLHUP | PollFlags::POLLERR;
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) if fds[0].revents().is_some_and(|r| !r.intersects(hung_up)) => {
                Error::Malformed("a datagram of no bytes".into())
            }
            _ => Error::Disconnected,
        }
    }

    /// Waits until the socket is ready for `events` or the deadline passes.
    fn wait(&self, events: PollFlags, deadline: Option<Instant>) -> Result<()> {
        loop {
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::TimedOut);
                    }
                    // Round up so we never wake just before the deadline and spin.
                    let ms = left.as_micros().div_ceil(1000);
                    PollTimeout::try_from(ms.min(i32::MAX as u128) as i32)
                        .unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.fd.as_fd(), events)];
            match poll(&mut fds, timeout) {
                Ok(0) => continue, // loop to re-check the deadline
                Ok(_) => return Ok(()),
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
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
        })?;
        let total_fds = u32::try_from(fds).map_err(|_| Error::TooManyFds {
            count: fds as u64,
            limit: u32::MAX as u64,
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

    /// Some of the message is out (perhaps all of it).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    No,
    Forever,
    Until(Instant),
}

/// Whether a message goes out as one datagram (what `send_some` decides for its first).
fn fits_one_datagram(payload: &[u8], fds: &[BorrowedFd<'_>], chunk: usize) -> bool {
    payload.len() <= FIRST_MAX.min(chunk) && fds.len() <= FDS_PER_DATAGRAM
}

/// The most payload bytes and fds of a message that fits one datagram and `limits`.
fn whole_sizes(chunk: usize, limits: Limits) -> (usize, usize) {
    let len = FIRST_MAX.min(chunk).min(limits.max_message_len);
    (len, FDS_PER_DATAGRAM.min(limits.max_fds))
}

/// Why a message of `len` bytes and `fds` fds is over `limits` (its size first).
#[cold]
fn over_limits(len: usize, fds: usize, limits: Limits) -> Error {
    if len > limits.max_message_len {
        Error::TooLarge {
            size: len as u64,
            limit: limits.max_message_len as u64,
        }
    } else {
        Error::TooManyFds {
            count: fds as u64,
            limit: limits.max_fds as u64,
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<Socket> for OwnedFd {
    fn from(s: Socket) -> OwnedFd {
        s.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// What a server shutting down looks for: a message of one datagram counts as stalled
    /// while it waits for room, and no longer once it is out; one that goes out at once
    /// never does.
    #[test]
    fn a_send_of_one_datagram_is_stalled_while_it_waits() {
        let (a, b) = Socket::pair().unwrap();
        let later = Instant::now() + Duration::from_secs(3600);
        let m = vec![7u8; 60 << 10];
        let mut queued = 0;
        while a.try_send(&m, &[]).unwrap() {
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
}
