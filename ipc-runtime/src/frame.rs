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
/// before anything is allocated for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes. Default 1 GiB; at most `u32::MAX`.
    pub max_message_len: usize,
    /// Most fds accepted in one message. Default 1024.
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
