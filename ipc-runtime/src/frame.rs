//! [`Frame`] and [`Limits`]: what the transport moves, and how much of it a receiver accepts.

use std::os::fd::OwnedFd;

/// One message as the transport moves it: payload bytes plus file descriptors, delivered
/// whole or not at all.
#[derive(Debug, Default)]
pub struct Frame {
    /// The payload.
    pub payload: Vec<u8>,
    /// The file descriptors, in the order they were sent. Each one is owned: dropping the
    /// frame closes them.
    pub fds: Vec<OwnedFd>,
}

impl Frame {
    /// Empties the frame, closing its fds (here, on this thread: the frame is yours) and
    /// keeping the payload's capacity for reuse.
    pub fn clear(&mut self) {
        self.payload.clear();
        self.fds.clear();
    }

    /// Empties the frame of a message the library itself drops (nothing claimed its fds):
    /// the fds go to the [`closer`](crate::closer), as closing one may wait as long as the
    /// peer that sent it likes.
    #[inline]
    pub(crate) fn discard(&mut self) {
        self.payload.clear();
        self.discard_fds();
    }

    /// Hands the fds left in the frame to the [`closer`](crate::closer).
    #[inline]
    pub(crate) fn discard_fds(&mut self) {
        if !self.fds.is_empty() {
            crate::closer::close_all(&mut self.fds);
        }
    }
}

/// What a receiver accepts from its peer. Checked against the sizes a message announces,
/// before anything is allocated for it; a message over them is read to its end and dropped,
/// and reported as [`Error::TooLarge`](crate::Error::TooLarge) or
/// [`Error::TooManyFds`](crate::Error::TooManyFds), whose `which` names the field exceeded
/// ([`Limit`](crate::Limit)).
///
/// A sender holds itself to its own `max_message_len` and `max_fds` too (or `max_send_len`
/// and `max_send_fds`, if set): a message over them is refused before any of it goes out,
/// with the same errors, since a peer with the same limits would refuse it.
/// On a connection, a request this side refuses fails its caller with the same errors,
/// `by_peer` (the method does not run); a byte string that came through shared memory or a
/// pipe counts against `max_message_len` on its own, as it would inline.
///
/// Only the message and the byte strings the connection moves for it count against
/// `max_message_len`: the files a message carries as fds do not, whatever their size. A
/// [`SealedBuffer`](crate::shared_buffer::SealedBuffer) or
/// [`RegionView`](crate::shared_region::RegionView) that a connection decodes (a method's
/// parameter or result, or a field of one) is bounded by `max_shared_len` instead: one over it
/// fails the call as [`Error::TooLarge`](crate::Error::TooLarge), with the buffer's size, and
/// its fd is closed unmapped. A bare `OwnedFd` is not checked at all.
///
/// New fields may be added: build `Limits` from [`Limits::default`], with its `with_*`
/// setters or with struct-update syntax (`Limits { max_shared_len: 64 << 20,
/// ..Limits::default() }`). Struct-update syntax that sets every field today earns clippy's
/// `needless_update`, which the setters do not (allow the lint there: the `..` is what keeps
/// your code compiling when a field comes).
///
/// ```
/// use ipc_runtime::Limits;
///
/// // A host's limits for a worker it does not trust, to which it sends 8 MiB images.
/// let limits = Limits::default()
///     .with_max_message_len(1 << 20)
///     .with_max_fds(0)
///     .with_max_shared_len(1 << 20)
///     .with_max_send_len((8 << 20) + 4096)
///     .with_max_send_fds(1);
/// assert_eq!((limits.max_message_len, limits.max_fds), (1 << 20, 0));
/// assert_eq!(limits.max_shared_len, 1 << 20);
/// assert_eq!(limits.send_len(), (8 << 20) + 4096);
/// assert_eq!(limits.send_fds(), 1);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes. Default 1 GiB; at most `u32::MAX`.
    pub max_message_len: usize,
    /// Most fds accepted in one message. Default 1024. With 0, the peer of a connection over
    /// this socket sends it no byte string through its shared region or pipe, which would
    /// pass their fd: they go inline (or are written into this end's memory, if it accepts
    /// that). Nor does this end, unless `max_send_fds` lets it send fds.
    ///
    /// A connection over a socket whose limit is neither 0 nor the default tells its peer
    /// the limit in a short message as it starts, and only from that message on says that
    /// it takes byte strings through the peer's shared region or pipe: until then (for good,
    /// if `max_send_len` leaves no room for the message) the peer sends them inline. It does
    /// not wait for room for the message: if the socket has none as the connection starts
    /// (one used before, with data the peer has not read), a blocking connection tries again
    /// as each later message of its own starts to go out, and sends it before the first
    /// that finds room; an async one sends it from a task once there is room. A
    /// string through the region or a pipe carries that one's fd the first time, so the
    /// peer sends inline any whose fd would take a message over the limit (a message
    /// carrying as many fds of its own as this end accepts, say).
    pub max_fds: usize,
    /// Largest [`SealedBuffer`](crate::shared_buffer::SealedBuffer) or
    /// [`RegionView`](crate::shared_region::RegionView) accepted in a message, in bytes: the
    /// size of its file, which is what reading it can make this process allocate. Default
    /// 1 GiB (their `DEFAULT_MAX_LEN`). Checked on receipt only: this side sends larger ones,
    /// and the peer's own limit decides.
    pub max_shared_len: usize,
    /// Largest payload this side sends, in bytes, counted as `max_message_len` counts it: a
    /// message over it is refused before any of it goes out. `None` (the default):
    /// `max_message_len`, what a peer with this side's limits accepts. Set it where the peer
    /// accepts more than this side does: a host that takes at most 1 MiB back from a worker
    /// it does not trust, and sends it 8 MiB images, sets `max_message_len: 1 << 20` and
    /// `max_send_len: Some((8 << 20) + 4096)`. A message is a little larger than the byte
    /// strings it carries (its envelope, the encoding's lengths, the other arguments: 33 bytes
    /// for one 8 MiB `Vec<u8>` alone), so leave room above the largest string; a limit of
    /// exactly `8 << 20` refuses that image as [`Error::TooLarge`](crate::Error::TooLarge). The
    /// peer's own limits still decide what it accepts.
    /// At most `u32::MAX`, as `max_message_len`. Below 40 bytes, the short messages in which
    /// a connection offers its peer faster ways for the peer's large byte strings cannot go
    /// out (`lend_pages_to_peer`'s is dropped, `accept_writes_from_peer` fails with
    /// `TooLarge`, a `max_fds` other than the default goes untold; `TYPED_IPC_DEBUG` says
    /// so): the peer then sends them through its shared region, or inline (always inline to
    /// a side whose `max_fds` went untold). Calls work all the same.
    pub max_send_len: Option<usize>,
    /// Most fds this side sends in one message: a message over it is refused before any of
    /// it goes out. `None` (the default): `max_fds`, what a peer with this side's limits
    /// accepts. Set it where this side accepts fewer fds than it sends: a host that takes
    /// no fd from a worker it does not trust (`max_fds: 0`, so the worker cannot hand it
    /// pipes, sockets or FUSE files to block on) may still pass it a memfd or dmabuf of an
    /// image, with `max_send_fds: Some(8)`. Its connection then also sends large byte
    /// strings through its shared region or pipe, whose fd the message carries, while the
    /// worker still sends it every string without one. The peer's own limits still decide
    /// what it accepts. A message that carries as many fds of its own as this side sends
    /// has no room left for that fd: its large byte string goes inline.
    pub max_send_fds: Option<usize>,
}

impl Limits {
    /// The largest payload this side sends: [`Limits::max_send_len`], or `max_message_len`
    /// if that is `None`.
    pub fn send_len(&self) -> usize {
        self.max_send_len.unwrap_or(self.max_message_len)
    }

    /// The most fds this side sends in one message: [`Limits::max_send_fds`], or `max_fds`
    /// if that is `None`.
    pub fn send_fds(&self) -> usize {
        self.max_send_fds.unwrap_or(self.max_fds)
    }

    /// These limits with [`Limits::max_message_len`] set to `len`.
    #[must_use]
    pub const fn with_max_message_len(mut self, len: usize) -> Limits {
        self.max_message_len = len;
        self
    }

    /// These limits with [`Limits::max_fds`] set to `fds`.
    #[must_use]
    pub const fn with_max_fds(mut self, fds: usize) -> Limits {
        self.max_fds = fds;
        self
    }

    /// These limits with [`Limits::max_shared_len`] set to `len`.
    #[must_use]
    pub const fn with_max_shared_len(mut self, len: usize) -> Limits {
        self.max_shared_len = len;
        self
    }

    /// These limits with [`Limits::max_send_len`] set to `Some(len)`.
    #[must_use]
    pub const fn with_max_send_len(mut self, len: usize) -> Limits {
        self.max_send_len = Some(len);
        self
    }

    /// These limits with [`Limits::max_send_fds`] set to `Some(fds)`.
    #[must_use]
    pub const fn with_max_send_fds(mut self, fds: usize) -> Limits {
        self.max_send_fds = Some(fds);
        self
    }
}

/// [`Limits::max_fds`] by default: what a connection takes its peer to accept until the peer
/// says otherwise (it does if its limit is another).
pub(crate) const DEFAULT_MAX_FDS: usize = 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_len: 1 << 30,
            max_fds: DEFAULT_MAX_FDS,
            max_shared_len: 1 << 30,
            max_send_len: None,
            max_send_fds: None,
        }
    }
}
