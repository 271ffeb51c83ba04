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
    /// Empties the frame, closing its fds and keeping the payload's capacity for reuse.
    pub fn clear(&mut self) {
        self.payload.clear();
        self.fds.clear();
    }
}

/// What a receiver accepts from its peer. Checked against the sizes a message announces,
/// before anything is allocated for it; a message over them is read to its end and dropped,
/// and reported as [`Error::TooLarge`](crate::Error::TooLarge) or
/// [`Error::TooManyFds`](crate::Error::TooManyFds).
///
/// A sender holds itself to its own limits too: a message over them is refused before any
/// of it goes out, with the same errors, since a peer with the same limits would refuse it.
/// On a connection, a request this side refuses fails its caller with the same errors,
/// `by_peer` (the method does not run); a byte string that came through shared memory or a
/// pipe counts against `max_message_len` on its own, as it would inline.
///
/// Only the message and the byte strings the connection moves for it count: the files a
/// message carries as fds do not, whatever their size. A
/// [`SealedBuffer`](crate::shared_buffer::SealedBuffer) or
/// [`RegionView`](crate::shared_region::RegionView) is one fd, checked on receipt against its
/// own bound (1 GiB, `DEFAULT_MAX_LEN`); to accept less from an untrusted peer, take an
/// `OwnedFd` and use its `from_fd_with_limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes. Default 1 GiB; at most `u32::MAX`.
    pub max_message_len: usize,
    /// Most fds accepted in one message. Default 1024. With 0, a connection over this socket
    /// also moves byte strings neither way through its shared region or pipe, which would
    /// pass their fd: they go inline (or are written into this end's memory, if it accepts
    /// that).
    pub max_fds: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_len: 1 << 30,
            max_fds: 1024,
        }
    }
}
