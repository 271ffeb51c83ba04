//! How much a peer can make this end hold for the requests it sent: the bounds both flavours
//! apply, in one place (the module docs of [`connection`](super) and of the async flavour
//! state them in words; keep those in step with the numbers here).
//!
//! A request counts from the moment the reader receives it until it no longer holds its
//! frame: in the blocking flavour while it waits in the queue for a serving thread (the
//! requests running are bounded by the threads), in the async flavour until its handler has
//! finished and its reply is out (its task holds the frame and the reply meanwhile). Its
//! bytes are its buffer's capacity, what it really keeps allocated.
//!
//! When the bounds are reached, the reader stops reading (the peer's sends wait: socket
//! backpressure) for as long as this end's serving threads or handlers drain what it holds.
//! A call of this end waiting for its reply waits for room too, and its reply is read once
//! requests have left: so a peer that reports progress with a oneway per item during a call
//! is slowed to the pace this end runs them, rather than ending the connection. Only a call
//! made from a handler of this connection (a callback calling back into its peer) needs the
//! reader to read on: the requests held may wait for that handler (its serving thread, or the
//! oneway it runs), and its reply may come after more of them. Then requests are taken in
//! past the bounds, up to [`HARD_FACTOR`] times them, and the connection ends past that; and
//! at once if nothing serves on this end (nothing would ever take those requests: a caller
//! reads on then, to end the connection rather than wait for good). A call that a handler
//! makes on another thread or task and waits for is not known as the handler's: it waits
//! for room as any call does.

#[cfg(feature = "tokio")]
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::Error;
use crate::frame::Frame;

/// Requests held at most before the reader stops reading.
pub(crate) const MAX_REQUESTS: usize = 1024;
/// Bytes of the frames of the requests held at most before the reader stops reading. A
/// request is taken whatever its size when less is held (the transport's own limit,
/// [`Limits::max_message_len`](crate::Limits), bounds one message).
pub(crate) const MAX_REQUEST_BYTES: usize = 32 << 20;
/// Fds carried by the requests held at most before the reader stops reading.
pub(crate) const MAX_REQUEST_FDS: usize = 4096;
/// How many times the bounds a reader that must read (a call of this end waits for its
/// reply) takes in before it ends the connection.
pub(crate) const HARD_FACTOR: usize = 2;

/// What one request holds.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Cost {
    bytes: usize,
    fds: usize,
}

impl Cost {
    /// What `frame` holds.
    #[inline]
    pub(crate) fn of(frame: &Frame) -> Cost {
        Cost {
            bytes: frame.payload.capacity(),
            fds: frame.fds.len(),
        }
    }
}

/// The requests held: how many, their bytes and their fds.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Backlog {
    requests: usize,
    bytes: usize,
    fds: usize,
}

impl Backlog {
    /// At the bounds: the reader stops unless it must read.
    #[inline]
    pub(crate) fn full(&self) -> bool {
        self.requests >= MAX_REQUESTS
            || self.bytes >= MAX_REQUEST_BYTES
            || self.fds >= MAX_REQUEST_FDS
    }

    /// Nothing held: no request in flight (async), none waiting for a serving thread nor any
    /// failure owed (blocking).
    pub(crate) fn is_empty(&self) -> bool {
        self.requests == 0
    }

    /// Past what even a reader that must read takes in.
    fn over_cap(&self) -> bool {
        self.requests >= HARD_FACTOR * MAX_REQUESTS
            || self.bytes >= HARD_FACTOR * MAX_REQUEST_BYTES
            || self.fds >= HARD_FACTOR * MAX_REQUEST_FDS
    }

    #[inline]
    pub(crate) fn add(&mut self, cost: Cost) {
        self.requests += 1;
        self.bytes += cost.bytes;
        self.fds += cost.fds;
    }

    #[inline]
    pub(crate) fn remove(&mut self, cost: Cost) {
        self.requests = self.requests.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(cost.bytes);
        self.fds = self.fds.saturating_sub(cost.fds);
    }

    /// Why the connection must end rather than take one more request, if it must: the
    /// bounds are reached and nothing serves on this end (`serving` false), or the reader
    /// already took in [`HARD_FACTOR`] times them.
    #[cold]
    pub(crate) fn refuse(&self, serving: bool) -> Option<Error> {
        if !self.full() {
            return None;
        }
        let (n, mib, fds) = (MAX_REQUESTS, MAX_REQUEST_BYTES >> 20, MAX_REQUEST_FDS);
        if !serving {
            // Most often this end's own mistake, not the peer's: say how to serve.
            return Some(Error::Malformed(format!(
                "the peer sent more requests than this end holds while nothing serves them \
                 ({n} requests, {mib} MiB or {fds} fds): an end the peer calls or sends \
                 oneways to must serve them (a thread in `Connection::run` or `serve`, since \
                 `add_service` alone runs nothing; async: `add_service` or `serve`)"
            )));
        }
        self.over_cap().then(|| {
            let (n, mib, fds) = (HARD_FACTOR * n, HARD_FACTOR * mib, HARD_FACTOR * fds);
            // Most often a peer that reports progress with a oneway per item while a handler
            // of this end calls back into it: say how to bound it.
            Error::Malformed(format!(
                "the peer sent more than {n} requests ({mib} MiB, {fds} fds) that wait to run \
                 while a handler of this end waited for a reply to its call back into the \
                 peer, which may come only after them: it sent faster than this end runs them \
                 (oneways run one at a time); keep what it sends while it handles a call back \
                 bounded (a window of oneways acknowledged by a call, or a call per report)"
            ))
        })
    }
}

/// A [`Backlog`] that the tasks of the async flavour update without a lock: the reader adds
/// what it takes in, each request removes its own when it finishes.
#[cfg(feature = "tokio")]
#[derive(Default)]
pub(crate) struct AtomicBacklog {
    requests: AtomicUsize,
    bytes: AtomicUsize,
    fds: AtomicUsize,
}

#[cfg(feature = "tokio")]
impl AtomicBacklog {
    /// What is held now (each count read on its own: a bound, not a snapshot).
    #[inline]
    pub(crate) fn get(&self) -> Backlog {
        Backlog {
            requests: self.requests.load(Ordering::SeqCst),
            bytes: self.bytes.load(Ordering::SeqCst),
            fds: self.fds.load(Ordering::SeqCst),
        }
    }

    #[inline]
    pub(crate) fn add(&self, cost: Cost) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(cost.bytes, Ordering::SeqCst);
        if cost.fds > 0 {
            self.fds.fetch_add(cost.fds, Ordering::SeqCst);
        }
    }

    /// Removes what `add` added (SeqCst, so that a reader that paused after reading the
    /// counts is seen to have paused, see `tokio::connection`).
    #[inline]
    pub(crate) fn remove(&self, cost: Cost) {
        self.requests.fetch_sub(1, Ordering::SeqCst);
        self.bytes.fetch_sub(cost.bytes, Ordering::SeqCst);
        if cost.fds > 0 {
            self.fds.fetch_sub(cost.fds, Ordering::SeqCst);
        }
    }
}
