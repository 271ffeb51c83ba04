//! [`Socket`]: a connected `SOCK_SEQPACKET` socket that moves whole [`Frame`]s.
//!
//! This file holds the socket itself: how it is made, its options, shutdown, and what both
//! directions share (waiting for readiness, the limits a message is held to). Sending is in
//! `send.rs`, receiving in `recv.rs`.
//!
//! [`Frame`]: crate::Frame

use parking_lot::Mutex;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{self as ns, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
use nix::sys::time::TimeVal;

use crate::error::{Error, Limit, Result};
use crate::frame::Limits;
use crate::wire::{DATAGRAM_MAX, FDS_PER_DATAGRAM, FIRST_MAX, HEADER_LEN};

mod recv;
mod send;
mod version_notice;

pub(crate) use recv::REFUSED_KEPT;
pub(crate) use recv::RecvState;
#[cfg(feature = "tokio")]
pub(crate) use send::{RETRY_SEND, SendCursor};
use version_notice::VersionNotice;

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

impl PeerCredentials {
    /// The peer of a connection to `worker`, a child this process spawned with its end of a
    /// socket pair: the kernel records the pair's creator, this process, for both ends, so its
    /// pid is the worker's; its uid and gid are those the worker started with (this
    /// process's, as the kernel recorded them).
    pub(crate) fn of_worker(self, worker: Option<u32>) -> PeerCredentials {
        match worker.and_then(|pid| i32::try_from(pid).ok()) {
            Some(pid) => PeerCredentials { pid, ..self },
            None => self,
        }
    }
}

/// A connected Unix `SOCK_SEQPACKET` socket that sends and receives whole [`Frame`]s.
///
/// Every method but [`Socket::set_limits`] (set before the socket is shared) takes `&self`,
/// and the socket is `Sync`: one thread may send while another receives. Sends are
/// serialised so the datagrams of a large message never interleave with another message's;
/// receives likewise.
///
/// Blocking calls wait forever unless given a timeout; [`Socket::try_recv`] never waits, and
/// the socket is [`AsFd`] so an event loop can wait for readability instead. A send waits
/// while the peer's socket buffer is full, for as long as it takes ([`Socket::send`]: for
/// good, if the peer never reads) or until its timeout ([`Socket::send_timeout`]); once the
/// peer has shut its reading side (`shutdown(SHUT_RD)`), within a second, with
/// [`Error::Disconnected`] (no send can go out to it again, and poll never says so).
///
/// [`Frame`]: crate::Frame
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    limits: Limits,
    /// Most payload bytes this side puts in one continuation datagram (from `SO_SNDBUF`).
    chunk: usize,
    /// Most payload bytes this side puts in one continuation datagram now: `chunk`, or less
    /// once the kernel could not allocate one that large (see `Socket::send_some`).
    datagram_cap: AtomicUsize,
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
    /// When a peer of another wire version is told this side's (`Socket::refused_header`).
    version_notice: VersionNotice,
}

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

    /// Connects to a [`Listener`](crate::Listener) bound to a filesystem path. Waits, for
    /// good, while the listener's queue of clients not yet accepted is full (a listener that
    /// stopped accepting): see [`Socket::connect_timeout`]. An OS error names `path`, as
    /// [`Connection::connect`](crate::Connection::connect)'s do.
    pub fn connect(path: impl AsRef<Path>) -> Result<Socket> {
        Socket::connect_path(path.as_ref(), None)
    }

    /// [`Socket::connect`], waiting at most `timeout` while the listener's queue is full,
    /// then failing with [`Error::TimedOut`].
    pub fn connect_timeout(path: impl AsRef<Path>, timeout: Duration) -> Result<Socket> {
        Socket::connect_path(path.as_ref(), Some(timeout))
    }

    /// Connects to a [`Listener`](crate::Listener) bound to a Linux abstract name, waiting
    /// as [`Socket::connect`] does.
    pub fn connect_abstract(name: impl AsRef<[u8]>) -> Result<Socket> {
        Socket::connect_abstract_name(name.as_ref(), None)
    }

    /// [`Socket::connect_abstract`], waiting at most `timeout` as
    /// [`Socket::connect_timeout`] does.
    pub fn connect_abstract_timeout(name: impl AsRef<[u8]>, timeout: Duration) -> Result<Socket> {
        Socket::connect_abstract_name(name.as_ref(), Some(timeout))
    }

    /// Connects to `path`; an OS error names it.
    fn connect_path(path: &Path, timeout: Option<Duration>) -> Result<Socket> {
        UnixAddr::new(path)
            .map_err(Error::from)
            .and_then(|addr| Socket::connect_addr(&addr, timeout))
            .map_err(|e| e.doing(|| format!("connecting to {}", path.display())))
    }

    /// Connects to the abstract `name`; an OS error names it.
    fn connect_abstract_name(name: &[u8], timeout: Option<Duration>) -> Result<Socket> {
        UnixAddr::new_abstract(name)
            .map_err(Error::from)
            .and_then(|addr| Socket::connect_addr(&addr, timeout))
            .map_err(|e| e.doing(|| format!("connecting to {}", abstract_name(name))))
    }

    fn connect_addr(addr: &UnixAddr, timeout: Option<Duration>) -> Result<Socket> {
        let fd = ns::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // A `connect` that waits for room in the listener's queue fails with `EINTR` when a
        // signal comes whose handler was installed without `SA_RESTART` (and with one, too,
        // while it waits by a send timeout, below). The socket is left unconnected, so it is
        // made again, and waits only for what is left of the time it was given.
        let Some(timeout) = timeout else {
            loop {
                match ns::connect(fd.as_raw_fd(), addr) {
                    Err(nix::Error::EINTR) => continue,
                    connected => break connected?,
                }
            }
            return Socket::new(fd);
        };
        let deadline = deadline_after(timeout);
        let mut left = timeout;
        loop {
            // A Unix socket's `connect` waits for room in the listener's queue as long as
            // the socket's send timeout says, then fails with `EAGAIN`. Zero would mean for
            // good.
            let wait = left.max(Duration::from_micros(1));
            let secs = libc::time_t::try_from(wait.as_secs()).unwrap_or(libc::time_t::MAX);
            let wait = TimeVal::new(secs, wait.subsec_micros().into());
            ns::setsockopt(&fd, sockopt::SendTimeout, &wait)?;
            match ns::connect(fd.as_raw_fd(), addr) {
                Err(nix::Error::EAGAIN) => return Err(Error::TimedOut),
                Err(nix::Error::EINTR) => {
                    // No deadline: a timeout past what the clock can express, for good.
                    let now = Instant::now();
                    left = deadline.map_or(timeout, |d| d.saturating_duration_since(now));
                    if left.is_zero() {
                        return Err(Error::TimedOut);
                    }
                }
                connected => break connected?,
            }
        }
        // Sends wait by their own deadlines (`poll`), never by the socket's timeout.
        ns::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(0, 0))?;
        Socket::new(fd)
    }

    /// Takes over a connected `SOCK_SEQPACKET` socket, for example one a parent process left
    /// open for its child. Any other kind of fd is refused. A socket left non-blocking
    /// (`O_NONBLOCK`) works as any other: a receive without a deadline still waits. Options
    /// that make the kernel add credentials or a timestamp to every datagram received
    /// (`SO_PASSCRED`, `SO_PASSPIDFD`, `SO_PASSSEC`, `SO_TIMESTAMP`, as a service manager may
    /// set) are turned off: the peer is known by [`Socket::peer_credentials`].
    pub fn from_fd(fd: OwnedFd) -> Result<Socket> {
        if ns::getsockopt(&fd, sockopt::SockType)? != SockType::SeqPacket {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a SOCK_SEQPACKET socket",
            )));
        }
        stop_adding_control_messages(&fd);
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
            datagram_cap: AtomicUsize::new(chunk),
            whole_len,
            whole_fds,
            send_lock: Mutex::new(()),
            recv: Mutex::new(RecvState::default()),
            spin_ns: AtomicU64::new(0),
            stalled: Mutex::new(None),
            version_notice: VersionNotice::default(),
        })
    }

    /// Sets what this side accepts from the peer, which is also the most it sends unless
    /// [`Limits::max_send_len`] or [`Limits::max_send_fds`] says otherwise: a message over
    /// these limits is refused before any of it goes out (see [`Socket::send`]). Not
    /// `max_shared_len`, which only a connection made over this socket afterwards checks,
    /// on receipt (see [`Limits`]).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        (self.whole_len, self.whole_fds) = whole_sizes(self.chunk, limits);
    }

    /// What this side accepts from the peer (and the most it sends: [`Limits::send_len`],
    /// [`Limits::send_fds`]).
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

    /// Waits until the socket is ready for `events` or the deadline passes.
    fn wait(&self, events: PollFlags, deadline: Option<Instant>) -> Result<()> {
        self.ready(events, deadline).map(drop)
    }

    /// The events of `events` the socket has now, without waiting (none if the poll fails),
    /// with `POLLHUP` and `POLLERR`, which poll always reports.
    #[cold]
    #[inline(never)]
    pub(crate) fn ready_now(&self, events: PollFlags) -> PollFlags {
        let mut fds = [PollFd::new(self.fd.as_fd(), events)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => fds[0].revents().unwrap_or(PollFlags::empty()),
            Err(_) => PollFlags::empty(),
        }
    }

    /// Whether the socket has ended, by what the kernel says now, whether or not anything has
    /// read to its end: both ways shut (the peer closed its end, or either end shut it both
    /// ways) or an error pending (`POLLHUP`, `POLLERR`). This end's read side alone shut
    /// (`POLLRDHUP`) is not an end: it still sends.
    pub(crate) fn has_ended(&self) -> bool {
        self.ready_now(PollFlags::empty())
            .intersects(PollFlags::POLLHUP | PollFlags::POLLERR)
    }

    /// Whether the replies to the peer's calls can still go out as a connection on this socket
    /// ends with `why` (both flavours' `fail`): only while the socket still sends, after a
    /// read side shut alone, by this end (`stop_reading`) or by the peer (a peer that shut its
    /// sending side, `shutdown(SHUT_WR)`, still reads). Not once the peer has closed its end
    /// or broken the protocol, nor once this end has shut the socket both ways: the kernel
    /// says which (one `poll`, [`Socket::has_ended`]).
    pub(crate) fn replies_still_go(&self, why: &crate::Error) -> bool {
        matches!(why, crate::Error::Disconnected) && !self.has_ended()
    }

    /// Waits until the socket is ready for some of `events` or the deadline passes, and says
    /// what it is ready for (a hang-up or an error among it, whatever was asked).
    pub(crate) fn ready(&self, events: PollFlags, deadline: Option<Instant>) -> Result<PollFlags> {
        loop {
            let Some(timeout) = poll_timeout(deadline) else {
                return Err(Error::TimedOut);
            };
            let mut fds = [PollFd::new(self.fd.as_fd(), events)];
            match poll(&mut fds, timeout) {
                Ok(0) => continue, // loop to re-check the deadline
                Ok(_) => return Ok(fds[0].revents().unwrap_or(PollFlags::empty())),
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The deadline `timeout` from now, or none at all for a timeout past what the clock can
/// express (`Duration::MAX`, say), as std's `recv_timeout` takes one: adding it would panic.
/// Out of line: a call without a timeout, the usual one, carries none of it.
#[inline(never)]
pub(crate) fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// The timeout of a `poll` that must return by `deadline`: `None` once it has passed.
#[inline(always)]
pub(crate) fn poll_timeout(deadline: Option<Instant>) -> Option<PollTimeout> {
    let Some(deadline) = deadline else {
        return Some(PollTimeout::NONE);
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return None;
    }
    // Round up so we never wake just before the deadline and spin.
    let ms = left.as_micros().div_ceil(1000);
    Some(PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX))
}

/// Turns off the options under which the kernel adds a control message of its own
/// (credentials, a timestamp) to every datagram `fd` receives. A receive reads `SCM_RIGHTS`
/// alone, into room for the most fds one datagram carries: beside another message they no
/// longer fit, and the kernel drops fds (`MSG_CTRUNC`); and `SCM_PIDFD` installs an fd of its
/// own that nothing would close. (`SO_TIMESTAMP` off also turns `SO_TIMESTAMPNS` off. The
/// other options that add a message elsewhere, `SO_TIMESTAMPING`, `SO_RXQ_OVFL`,
/// `SO_RCVMARK` and `SO_RCVPRIORITY`, add none to a Unix socket's datagrams: checked on
/// Linux 6.18.)
#[cold]
fn stop_adding_control_messages(fd: &OwnedFd) {
    let off: libc::c_int = 0;
    let options = [
        libc::SO_PASSCRED,
        libc::SO_PASSPIDFD,
        libc::SO_PASSSEC,
        libc::SO_TIMESTAMP,
    ];
    for option in options {
        // SAFETY: `off` is a live c_int of the length given, only read by the call. A kernel
        // that lacks the option refuses it (`ENOPROTOOPT`), and then never adds its message.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&off as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// The most payload bytes and fds of a message that fits one datagram and `limits`.
fn whole_sizes(chunk: usize, limits: Limits) -> (usize, usize) {
    let len = FIRST_MAX.min(chunk).min(limits.send_len());
    (len, FDS_PER_DATAGRAM.min(limits.send_fds()))
}

/// Why a message of `len` bytes and `fds` fds is over `limits` (its size first): what this
/// side sends ([`Limits::send_len`], [`Limits::send_fds`]) for a message going out
/// (`sending`), what it accepts (`max_message_len`, `max_fds`) for one coming in. Names the
/// setting that bounds it: a send with no `max_send_len` (`max_send_fds`) is bounded by
/// `max_message_len` (`max_fds`).
#[cold]
#[inline(never)]
fn over_limits(len: usize, fds: usize, limits: &Limits, sending: bool) -> Error {
    let (max_len, len_limit) = match limits.max_send_len {
        Some(max) if sending => (max, Limit::MaxSendLen),
        _ => (limits.max_message_len, Limit::MaxMessageLen),
    };
    if len > max_len {
        return Error::TooLarge {
            size: len as u64,
            limit: max_len as u64,
            which: len_limit,
            by_peer: false,
        };
    }
    let (max_fds, fds_limit) = match limits.max_send_fds {
        Some(max) if sending => (max, Limit::MaxSendFds),
        _ => (limits.max_fds, Limit::MaxFds),
    };
    Error::TooManyFds {
        count: fds as u64,
        limit: max_fds as u64,
        which: fds_limit,
        by_peer: false,
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

/// An abstract socket name as `ss` and `netstat` show it: `@name`, with bytes that are not
/// printable ASCII escaped.
pub(crate) fn abstract_name(name: &[u8]) -> String {
    format!("@{}", name.escape_ascii())
}
