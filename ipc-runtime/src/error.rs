//! The one error type of typed-ipc.

use std::fmt;
use std::io;

/// Everything that can go wrong in typed-ipc, from the socket up to a remote call.
///
/// Every variant is something a caller may want to react to differently, so match on it rather
/// than on the message. Nothing a peer sends makes typed-ipc panic: bad input from the other
/// side ends up here.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The peer closed its end or died. Every caller waiting on the connection gets this at
    /// once; it is never reported as [`Error::TimedOut`]. It does not say why: for a worker,
    /// [`Worker::wait`](crate::worker::Worker::wait) says how it ended (an exit code, or the
    /// signal that killed it), and its stderr what it said.
    ///
    /// Nor does it say whether a call that fails so ran: the method may not have started, may
    /// have stopped part-way (the worker died in it), or may have run to its end with no reply
    /// sent. A caller that runs the call again (on another worker of a pool, say) must be
    /// able to run it twice. The arguments went with the failed call (an `OwnedFd` given among
    /// them is closed in this process): keep what a retry needs, such as the fd itself (a
    /// generated client sends an fd borrowed, `&file`, and leaves it yours) or the bytes to
    /// fill a new memfd with. A peer that shuts down gracefully says which calls did not run:
    /// [`Error::ShutDown`].
    Disconnected,
    /// The peer shut down gracefully before it ran this call, and the call did not run: it
    /// was never read, or read only to be dropped. It can be sent again (to another worker of
    /// a pool, a restarted one) without running twice. A peer says so as its last message
    /// when it shuts down, once every call of this end's that it ran has been answered: a
    /// listening server to each client as it stops
    /// ([`Serving::shutdown`](crate::Serving::shutdown) or its drop, the async flavour's
    /// `AsyncServing::shutdown`), a worker that means to exit to its parent
    /// ([`Connection::shut_down`](crate::Connection::shut_down)). The calls still waiting get
    /// this, and so does every later call or `#[oneway]` message on the connection. A oneway
    /// sent before it may or may not have run.
    ///
    /// A peer that could not say so (its socket buffer full, a reply stuck past
    /// [`Server::shutdown_stall_limit`](crate::Server::shutdown_stall_limit)), that died, or
    /// that closed its end in any other way, gives [`Error::Disconnected`], which says
    /// nothing of whether the call ran. Like it, this ends the connection: treat both as the
    /// peer gone.
    ShutDown,
    /// The deadline passed before the operation completed. The connection is still usable,
    /// unless the blocking flavour timed out sending a large message part of which had gone
    /// out: it shuts the connection down rather than leave the peer a fragment (see
    /// [`Connection::oneway`](crate::Connection::oneway)). A call that timed out waiting for
    /// its reply tells the peer that it gave up (a small cancel message, best effort: one
    /// try, not sent if the socket has no room at once): the peer drops the call if it has
    /// not started it (an async peer also drops a running handler's future, at its next
    /// `.await`), and sends no reply; a late reply is dropped here. A blocking handler that
    /// is already running runs on to its end, and a peer serving on one thread reads nothing
    /// meanwhile (so it neither sees the cancel nor answers another call until then): kill
    /// a worker that is stuck for good ([`Worker::kill`](crate::worker::Worker::kill)).
    TimedOut,
    /// A message is larger than the limit that applies to it: this side's
    /// [`Limits`](crate::Limits), whether it sends the message or receives it (and, sending,
    /// the 4 GiB the wire format can express), or the peer's, for a request it refused on
    /// receipt (`by_peer`). Refused when sending, nothing of it was sent; refused when
    /// receiving, it was read to its end and dropped, and only the call it answers fails; refused
    /// by the peer, the method did not run. Either way the connection is still usable.
    ///
    /// Also a [`SealedBuffer`](crate::shared_buffer::SealedBuffer) or
    /// [`RegionView`](crate::shared_region::RegionView) in a message, over its receiver's
    /// [`Limits::max_shared_len`](crate::Limits::max_shared_len): refused on receipt alike, its
    /// fd closed unmapped (a sender does not check it: the limit is the receiver's own).
    ///
    /// `which` names the limit, and the message says it as a user would look it up:
    /// `message of 5032 bytes, over Limits::max_send_len (4096 bytes)`, or `... over the
    /// peer's Limits::max_message_len (...)` when `by_peer`.
    #[non_exhaustive]
    TooLarge {
        /// The message's payload size in bytes (for a byte string that travelled out of the
        /// socket, through shared memory or a pipe, the string's; for a sealed buffer or
        /// region view, its file's).
        size: u64,
        /// The limit it exceeds.
        limit: u64,
        /// Which limit that is: the setting to raise, or a bound no setting moves.
        which: Limit,
        /// Whether the limit is the peer's: it refused this call's request on receipt.
        by_peer: bool,
    },
    /// A message carries more file descriptors than the limit that applies to it, refused as
    /// for [`Error::TooLarge`]. The fds of a refused incoming message are closed; those of an
    /// outgoing one are left to their owner. `which` names the limit, as for
    /// [`Error::TooLarge`]: `message carries 1 file descriptor, over Limits::max_send_fds (0)`.
    #[non_exhaustive]
    TooManyFds {
        /// How many the message carries.
        count: u64,
        /// The limit it exceeds.
        limit: u64,
        /// Which limit that is, as for [`Error::TooLarge`].
        which: Limit,
        /// Whether the limit is the peer's, as for [`Error::TooLarge`].
        by_peer: bool,
    },
    /// The kernel dropped file descriptors of this message (`MSG_CTRUNC`): this process is at
    /// its open-file limit (`RLIMIT_NOFILE`), or, more rarely, a security module refused to
    /// let it receive them. The message is discarded whole, the fds that did arrive are
    /// closed, and the stream stays in sync.
    FdsDropped {
        /// How many fds the message carried.
        expected: u64,
        /// How many of them reached this process.
        received: u64,
    },
    /// A datagram was larger than the protocol allows (`MSG_TRUNC`): the peer is broken or
    /// hostile. The message is discarded.
    Truncated,
    /// The peer sent bytes that are not a valid message: a bad header, or a body that does
    /// not decode as the type it should be. Also the peer's sending more requests than this
    /// end holds for it: most often this end's own mistake, a connection the peer calls
    /// back (`#[oneway]` progress reports, say) that nothing on this end serves, or that it
    /// runs more slowly than the peer sends them while it waits for a reply of its own (see
    /// [`Connection`](crate::Connection) for the bounds). The message says which.
    Malformed(String),
    /// The peer speaks another version of the wire format. The end that receives a message
    /// of another version tells the peer its own before it hangs up, so both ends report
    /// this, the caller of a method too, rather than a bare [`Error::Disconnected`]: also a
    /// caller whose send finds the peer already gone (a thread that only sends oneways, say),
    /// which reads what the peer said last to tell why.
    VersionMismatch {
        /// The version this side speaks.
        ours: u8,
        /// The version in the peer's header.
        theirs: u8,
    },
    /// A value could not be encoded (a `Serialize` implementation failed).
    Encode(String),
    /// The peer serves this interface, but built from another version of it: a method
    /// added, retired or changed, a `#[oneway]` differs, or the methods are in another order.
    /// The message names what differs (at most 16 differences, the rest counted). The call
    /// did not run.
    ///
    /// Here and in [`Error::NotServed`], [`Error::Refused`], [`Error::Panicked`] and
    /// [`Error::Remote`], text that came from the peer is escaped as `{:?}` escapes it
    /// (control characters, bidirectional overrides) and cut after 1,000 characters, so that
    /// printing the error is safe whatever the peer sent.
    InterfaceMismatch(String),
    /// The peer serves no interface of this one's wire name. The message lists what it
    /// serves, unless it may refuse callers (`authorize`), which tells a caller nothing of
    /// its interfaces. The call did not run.
    ///
    /// Apart from [`Error::InterfaceMismatch`] so that a caller can fall back to an older
    /// interface when a newer one is not served, without mistaking a peer built from a
    /// broken or other copy of the newer one for an old peer. The failed call's arguments are
    /// gone (fds given among them went to the peer, which closed them): find out which
    /// interface a peer serves once per connection, with a call that costs nothing, or send
    /// the fds borrowed (`&file`), which leaves them yours for the older interface's call.
    NotServed(String),
    /// The server refused this caller (see `Connection::set_authorizer`); the reason is the
    /// server's. Also every call of a client a listener turned away as it connected
    /// ([`Server::admit`](crate::Server::admit),
    /// [`Server::max_clients`](crate::Server::max_clients)): the connection has ended, and a
    /// caller whose send finds it gone reads the reason the server sent before it hung up, as
    /// for [`Error::VersionMismatch`].
    Refused(String),
    /// The peer's implementation of the method panicked; the message names the method and
    /// gives the panic's message. The peer caught the panic and serves on, so the connection
    /// is still usable, but the service may have been stopped half-way through a change to
    /// its state: a caller that cannot trust it after that restarts the peer (a worker:
    /// [`Worker::kill`](crate::worker::Worker::kill), then spawn it again).
    Panicked(String),
    /// The peer failed to handle this call: it does not know the command, it could not
    /// receive the request's fds or decode its arguments, or it could not send its answer.
    /// The message says which. The connection is still usable. (A request over the peer's
    /// [`Limits`](crate::Limits) is [`Error::TooLarge`] or [`Error::TooManyFds`], `by_peer`;
    /// a panic is [`Error::Panicked`].)
    Remote(String),
    /// An operating-system error, with its errno; or a local failure that has none, only a
    /// kind and a message (`raw_os_error()` is `None`): a process not started as a worker, a
    /// worker reaped elsewhere, an fd refused as a socket or a sealed buffer, the async
    /// flavour used outside a tokio runtime, a listener that serves an interface twice. An
    /// OS error from binding or connecting is worded with the path or name it was about and
    /// keeps the errno's kind (`ConnectionRefused`, `NotFound`), not the errno itself.
    Io(io::Error),
}

/// `Result` with [`Error`] as its error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Disconnected => f.write_str("peer disconnected"),
            Error::ShutDown => f.write_str("peer shut down before it ran the call"),
            Error::TimedOut => f.write_str("timed out"),
            Error::TooLarge {
                size,
                limit,
                which,
                by_peer,
            } => {
                let what = match which {
                    Limit::MaxSharedLen | Limit::Given => "sealed buffer or region view",
                    Limit::System => "memfd or mapping",
                    _ => "message",
                };
                write!(f, "{what} of {size} bytes, over ")?;
                over(f, *which, *by_peer)?;
                write!(f, " ({limit} bytes)")
            }
            Error::TooManyFds {
                count,
                limit,
                which,
                by_peer,
            } => {
                let s = if *count == 1 { "" } else { "s" };
                write!(f, "message carries {count} file descriptor{s}, over ")?;
                over(f, *which, *by_peer)?;
                write!(f, " ({limit})")
            }
            Error::FdsDropped { expected, received } => write!(
                f,
                "the kernel dropped file descriptors ({received} of {expected} arrived): \
                 this process is at its open-file limit (RLIMIT_NOFILE), or a security \
                 module refused them"
            ),
            Error::Truncated => f.write_str("peer sent a datagram larger than the protocol allows"),
            Error::Malformed(why) => write!(f, "malformed message: {why}"),
            Error::VersionMismatch { ours, theirs } => {
                write!(
                    f,
                    "peer speaks wire version {theirs}, this side speaks {ours}"
                )
            }
            Error::Encode(why) => write!(f, "cannot encode value: {why}"),
            Error::InterfaceMismatch(why) => write!(f, "interface mismatch: {why}"),
            // The message says it all: "the peer does not serve interface `X` ...".
            Error::NotServed(why) => f.write_str(why),
            Error::Refused(why) => write!(f, "call refused: {why}"),
            Error::Panicked(why) => write!(f, "remote call panicked: {why}"),
            Error::Remote(why) => write!(f, "remote call failed: {why}"),
            Error::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Names the limit a `TooLarge` or `TooManyFds` exceeded, and whose it is.
fn over(f: &mut fmt::Formatter<'_>, which: Limit, by_peer: bool) -> fmt::Result {
    match (which, by_peer) {
        (Limit::Unknown, true) => f.write_str("the peer's limit"),
        (Limit::Unknown, false) => f.write_str("the limit"),
        (which, true) => write!(f, "the peer's {which}"),
        (which, false) => write!(f, "{which}"),
    }
}

/// Which limit an [`Error::TooLarge`] or [`Error::TooManyFds`] exceeded: a setting of
/// [`Limits`](crate::Limits) (this side's, or the peer's if the error is `by_peer`), or a bound
/// that no setting moves. Its `Display` names it as a user would look it up
/// (`Limits::max_send_fds`).
///
/// New variants may be added, for limits checked in later versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// [`Limits::max_message_len`](crate::Limits::max_message_len): a message received, or a
    /// byte string that came out of the socket (through shared memory or a pipe); also a
    /// message sent while [`Limits::max_send_len`](crate::Limits::max_send_len) is `None`,
    /// which sends what `max_message_len` accepts (set `max_send_len` to send more). A
    /// byte string out of the socket within this limit but over the 32 MiB such a string may
    /// take, which no sender of this crate exceeds (it sends a larger one inline), is
    /// [`Error::Malformed`] instead.
    MaxMessageLen,
    /// [`Limits::max_send_len`](crate::Limits::max_send_len): a message sent.
    MaxSendLen,
    /// [`Limits::max_fds`](crate::Limits::max_fds): a message received; also a message sent
    /// while [`Limits::max_send_fds`](crate::Limits::max_send_fds) is `None`, which sends
    /// what `max_fds` accepts (set `max_send_fds` to send more).
    MaxFds,
    /// [`Limits::max_send_fds`](crate::Limits::max_send_fds): a message sent.
    MaxSendFds,
    /// [`Limits::max_shared_len`](crate::Limits::max_shared_len): a
    /// [`SealedBuffer`](crate::shared_buffer::SealedBuffer) or
    /// [`RegionView`](crate::shared_region::RegionView) a connection decoded (outside a
    /// connection, the default `Limits`' value).
    MaxSharedLen,
    /// What the wire format can express: a message sent of 4 GiB or more, or of 2³² fds or
    /// more (its header counts them in 32 bits).
    WireFormat,
    /// What this system holds: a memfd's size (`i64::MAX`) or a mapping's (`isize::MAX`).
    System,
    /// The `max_len` passed to
    /// [`SealedBuffer::from_fd_with_limit`](crate::shared_buffer::SealedBuffer::from_fd_with_limit)
    /// or
    /// [`RegionView::from_fd_with_limit`](crate::shared_region::RegionView::from_fd_with_limit),
    /// or `from_fd`'s `DEFAULT_MAX_LEN`.
    Given,
    /// A limit of the peer's that this version does not know: a later version named it.
    Unknown,
}

impl Limit {
    /// This limit's number in a failure reply (wire version 14): 0 for [`Limit::Unknown`].
    /// Numbers are never reused.
    pub(crate) fn code(self) -> u8 {
        match self {
            Limit::Unknown => 0,
            Limit::MaxMessageLen => 1,
            Limit::MaxSendLen => 2,
            Limit::MaxFds => 3,
            Limit::MaxSendFds => 4,
            Limit::MaxSharedLen => 5,
            Limit::WireFormat => 6,
            Limit::System => 7,
            Limit::Given => 8,
        }
    }

    /// The limit a failure reply names by `code`: [`Limit::Unknown`] for a number this
    /// version does not know (a later version's limit, or a hostile peer's).
    pub(crate) fn from_code(code: u8) -> Limit {
        match code {
            1 => Limit::MaxMessageLen,
            2 => Limit::MaxSendLen,
            3 => Limit::MaxFds,
            4 => Limit::MaxSendFds,
            5 => Limit::MaxSharedLen,
            6 => Limit::WireFormat,
            7 => Limit::System,
            8 => Limit::Given,
            _ => Limit::Unknown,
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::MaxMessageLen => "Limits::max_message_len",
            Limit::MaxSendLen => "Limits::max_send_len",
            Limit::MaxFds => "Limits::max_fds",
            Limit::MaxSendFds => "Limits::max_send_fds",
            Limit::MaxSharedLen => "Limits::max_shared_len",
            Limit::WireFormat => "what the wire format can express",
            Limit::System => "what this system can hold",
            Limit::Given => "from_fd_with_limit's max_len or from_fd's DEFAULT_MAX_LEN",
            Limit::Unknown => "a limit this version does not know",
        })
    }
}

impl Error {
    /// This error, if it is the OS's, saying what failed on what (an errno names no path):
    /// `connecting to /run/app.sock: No such file or directory (os error 2)`, of the same
    /// kind. Other errors are left as they are.
    #[cold]
    pub(crate) fn doing(self, what: impl FnOnce() -> String) -> Error {
        match self {
            Error::Io(e) => Error::Io(io::Error::new(e.kind(), format!("{}: {e}", what()))),
            other => other,
        }
    }

    /// Whether a call whose reply failed with this error may still be answered with a
    /// failure: unless the peer is gone. A reply refused before it went out (it could not be
    /// encoded, or was over the limits), or whose one datagram the kernel refused (it goes out
    /// whole or not at all), left the caller waiting; one cut off part-way shut the socket
    /// down, so the failure fails too, harmlessly.
    pub(crate) fn reply_may_follow(&self) -> bool {
        !matches!(self, Error::Disconnected | Error::ShutDown)
    }

    /// Why a connection ends whose failure owed to a caller could not be sent either, with
    /// this error: the caller would otherwise wait for good for an answer that never comes,
    /// and whatever refused it (a seccomp filter or a security module refusing `send`, say)
    /// would refuse the connection's next message too. `None` once the peer is gone.
    #[cold]
    #[inline(never)]
    pub(crate) fn unanswerable(&self) -> Option<Error> {
        let kind = match self {
            Error::Disconnected | Error::ShutDown => return None,
            Error::Io(e) => e.kind(),
            _ => std::io::ErrorKind::Other,
        };
        let why = format!("a call of the peer's could not be answered: {self}");
        Some(Error::Io(std::io::Error::new(kind, why)))
    }

    /// Whether this is a message over the [`Limits`](crate::Limits): refused before it was
    /// sent, or when received, read to its end (the stream stays in sync) with its first bytes
    /// kept, so its envelope says whose it was.
    pub(crate) fn is_over_limits(&self) -> bool {
        matches!(self, Error::TooLarge { .. } | Error::TooManyFds { .. })
    }

    /// Whether a receive that failed with this still took a whole message in, envelope
    /// included: its fds were dropped, or it was over the limits (and read to its end).
    pub(crate) fn came_whole(&self) -> bool {
        matches!(self, Error::FdsDropped { .. }) || self.is_over_limits()
    }

    /// A copy of this error for every caller a connection failure reaches.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Disconnected => Error::Disconnected,
            Error::ShutDown => Error::ShutDown,
            Error::TimedOut => Error::TimedOut,
            Error::TooLarge {
                size,
                limit,
                which,
                by_peer,
            } => Error::TooLarge {
                size: *size,
                limit: *limit,
                which: *which,
                by_peer: *by_peer,
            },
            Error::TooManyFds {
                count,
                limit,
                which,
                by_peer,
            } => Error::TooManyFds {
                count: *count,
                limit: *limit,
                which: *which,
                by_peer: *by_peer,
            },
            Error::FdsDropped { expected, received } => Error::FdsDropped {
                expected: *expected,
                received: *received,
            },
            Error::Truncated => Error::Truncated,
            Error::Malformed(s) => Error::Malformed(s.clone()),
            Error::VersionMismatch { ours, theirs } => Error::VersionMismatch {
                ours: *ours,
                theirs: *theirs,
            },
            Error::Encode(s) => Error::Encode(s.clone()),
            Error::InterfaceMismatch(s) => Error::InterfaceMismatch(s.clone()),
            Error::NotServed(s) => Error::NotServed(s.clone()),
            Error::Refused(s) => Error::Refused(s.clone()),
            Error::Panicked(s) => Error::Panicked(s.clone()),
            Error::Remote(s) => Error::Remote(s.clone()),
            Error::Io(e) => match e.raw_os_error() {
                Some(errno) => Error::Io(io::Error::from_raw_os_error(errno)),
                None => Error::Io(io::Error::new(e.kind(), e.to_string())),
            },
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN) => Error::Disconnected,
            _ if e.kind() == io::ErrorKind::TimedOut => Error::TimedOut,
            _ => Error::Io(e),
        }
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::from(io::Error::from(e))
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(e) => e,
            Error::Disconnected => io::Error::new(io::ErrorKind::BrokenPipe, e),
            Error::ShutDown => io::Error::new(io::ErrorKind::ConnectionAborted, e),
            Error::TimedOut => io::Error::new(io::ErrorKind::TimedOut, e),
            other => io::Error::other(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Error, Limit};

    #[test]
    fn a_count_of_fds_reads_as_words() {
        let fds = |count, which, by_peer| {
            let limit = 0;
            Error::TooManyFds {
                count,
                limit,
                which,
                by_peer,
            }
            .to_string()
        };
        assert_eq!(
            fds(1, Limit::MaxSendFds, false),
            "message carries 1 file descriptor, over Limits::max_send_fds (0)"
        );
        assert_eq!(
            fds(2, Limit::MaxFds, true),
            "message carries 2 file descriptors, over the peer's Limits::max_fds (0)"
        );
        assert_eq!(
            fds(2, Limit::Unknown, true),
            "message carries 2 file descriptors, over the peer's limit (0)"
        );
    }

    #[test]
    fn a_size_names_its_limit() {
        let large = |size, which, by_peer| {
            let limit = 100;
            Error::TooLarge {
                size,
                limit,
                which,
                by_peer,
            }
            .to_string()
        };
        assert_eq!(
            large(200, Limit::MaxSendLen, false),
            "message of 200 bytes, over Limits::max_send_len (100 bytes)"
        );
        assert_eq!(
            large(200, Limit::MaxMessageLen, true),
            "message of 200 bytes, over the peer's Limits::max_message_len (100 bytes)"
        );
        assert_eq!(
            large(4096, Limit::MaxSharedLen, false),
            "sealed buffer or region view of 4096 bytes, over Limits::max_shared_len (100 bytes)"
        );
        assert_eq!(
            large(4096, Limit::Given, false),
            "sealed buffer or region view of 4096 bytes, over from_fd_with_limit's max_len or \
             from_fd's DEFAULT_MAX_LEN (100 bytes)"
        );
    }

    /// Every limit survives a failure reply; a number this version does not know reads as
    /// `Unknown`, whatever it is.
    #[test]
    fn limits_round_trip_their_codes() {
        let all = [
            Limit::MaxMessageLen,
            Limit::MaxSendLen,
            Limit::MaxFds,
            Limit::MaxSendFds,
            Limit::MaxSharedLen,
            Limit::WireFormat,
            Limit::System,
            Limit::Given,
            Limit::Unknown,
        ];
        for limit in all {
            assert_eq!(Limit::from_code(limit.code()), limit);
        }
        for code in 9..=u8::MAX {
            assert_eq!(Limit::from_code(code), Limit::Unknown);
        }
    }
}
