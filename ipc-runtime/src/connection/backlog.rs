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
//! backpressure) for as long as this end's serving threads or handlers drain what it holds. A call
//! of this end waiting for its reply waits for room too, and its reply is read once requests have
//! left: so a peer that reports progress with a oneway per item during a call is slowed to the pace
//! this end runs them, rather than ending the connection. (It still hears at once that the peer
//! hung up: it watches the socket for that meanwhile, in the blocking flavour
//! `Shared::sleep_watching_for_hang_up`, in the async one the paused reader's
//! `Inner::peer_hangs_up`. The async reader watches whether or not a call waits, and reads on to
//! the end once the peer has gone, so that the peer's calls are cancelled; in the blocking flavour
//! a serving thread whose reply found the peer gone does, `Shared::why_unsent`.) Only a call made
//! from a handler of this connection (a callback calling back into its peer) needs the reader to
//! read on: the requests held may wait for that handler (its serving thread, or the oneway it
//! runs), and its reply may come after more of them. So does any call while nothing serves on this
//! end yet: what serves may come only once the call is answered (a `service_with` whose `make`
//! calls the client). Then requests are taken in past the bounds, up to [`HARD_FACTOR`] times them,
//! and the connection ends past that (unless the peer has gone for good: what it left in the
//! socket, bounded by its send buffer, is read to its end); and at once if nothing serves on this
//! end nor is coming (nothing would ever take those requests: a caller reads on then, to end the
//! connection rather than wait for good). A call that a handler makes on another thread or task and
//! waits for is not known as the handler's: it waits for room as any call does.
//!
//! The replies waiting to go out are bounded too, in the async flavour: a handler that has
//! replied holds its reply's encoded bytes until the socket takes them, and a peer that
//! stops reading would otherwise pin as many replies as requests in flight (1,024 of 1 MiB:
//! a GiB, twice that with the values their handlers returned). A reply counts from the
//! moment it finds no room to go out at once until it is out (or given up, the connection
//! ended); at [`MAX_REPLY_BYTES`] in two replies or more, no new call starts its handler:
//! the calls read meanwhile wait, holding their requests only (counted above, so the reader
//! still stops at the bounds), and start as the replies go out. The handlers running by then
//! finish and send their replies, past the budget. The blocking flavour needs no such
//! budget: a serving thread waits for its reply to go out, so the replies waiting are at
//! most one per thread.

#[cfg(feature = "tokio")]
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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
/// Bytes of encoded replies (and failure replies) waiting to go out, in the async flavour,
/// at most before no new call starts its handler (see the [module docs](self)), once two
/// replies wait at least: one waits whatever its size. A reply through the shared region or
/// another lane counts only its message (one such placement is in flight at a time, in
/// memory the lane bounds). The values the handlers still hold for those replies (a
/// `Vec<u8>` returned, say) are beside it: about as much again for byte strings.
// Only the async flavour has the budget; the module docs name it in every build.
#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
pub(crate) const MAX_REPLY_BYTES: usize = 16 << 20;
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
    /// already took in [`HARD_FACTOR`] times them and the peer is still there
    /// (`peer_gone`, asked only then: what a peer gone for good left in the socket, bounded
    /// by its send buffer, is read to its end, so that its oneways run and this end's
    /// callers get their replies).
    #[cold]
    pub(crate) fn refuse(&self, serving: bool, peer_gone: impl FnOnce() -> bool) -> Option<Error> {
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
        (self.over_cap() && !peer_gone()).then(|| {
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
/// what it takes in, each request removes its own when it finishes. The requests and their
/// bytes share one word (the count above [`REQUEST_BYTES_BITS`] bits of bytes), so that a
/// request comes and goes with one atomic add each way, not two; the fds, which most
/// requests have none of, have a word of their own, touched only by those that do.
#[cfg(feature = "tokio")]
#[derive(Default)]
pub(crate) struct AtomicBacklog {
    requests_and_bytes: AtomicU64,
    fds: AtomicUsize,
}

/// The bits of [`AtomicBacklog`]'s word that count bytes: 1 TiB. What is held stays far
/// below: [`HARD_FACTOR`] times the bounds, and past them only what a peer gone for good left
/// in its send buffer. The 24 bits above count 16 million requests, where the same bounds
/// hold a few thousand, and a send buffer's worth of datagrams (each charged at least a few
/// hundred bytes of it, and at most 2 GiB) some millions.
#[cfg(feature = "tokio")]
const REQUEST_BYTES_BITS: u32 = 40;

/// One request in [`AtomicBacklog`]'s word, above its bytes.
#[cfg(feature = "tokio")]
const ONE_REQUEST: u64 = 1 << REQUEST_BYTES_BITS;

#[cfg(feature = "tokio")]
impl AtomicBacklog {
    /// What is held now (the requests and their bytes as one, the fds on their own: a bound,
    /// not a snapshot).
    #[inline]
    pub(crate) fn get(&self) -> Backlog {
        let word = self.requests_and_bytes.load(Ordering::SeqCst);
        Backlog {
            requests: (word >> REQUEST_BYTES_BITS) as usize,
            bytes: (word & (ONE_REQUEST - 1)) as usize,
            fds: self.fds.load(Ordering::SeqCst),
        }
    }

    /// The request and its bytes, as one addend of the word.
    #[inline]
    fn one(cost: Cost) -> u64 {
        ONE_REQUEST + cost.bytes as u64
    }

    #[inline]
    pub(crate) fn add(&self, cost: Cost) {
        self.requests_and_bytes
            .fetch_add(Self::one(cost), Ordering::SeqCst);
        if cost.fds > 0 {
            self.fds.fetch_add(cost.fds, Ordering::SeqCst);
        }
    }

    /// Removes what `add` added (SeqCst, so that a reader that paused after reading the
    /// counts is seen to have paused, see `tokio::connection`).
    #[inline]
    pub(crate) fn remove(&self, cost: Cost) {
        self.requests_and_bytes
            .fetch_sub(Self::one(cost), Ordering::SeqCst);
        if cost.fds > 0 {
            self.fds.fetch_sub(cost.fds, Ordering::SeqCst);
        }
    }
}

/// The replies waiting to go out on one connection of the async flavour, against
/// [`MAX_REPLY_BYTES`]: each reply adds itself as it starts to wait for room, and removes
/// itself once it is out or given up. Their bytes and how many they are in one word (the
/// count in the top 16 bits: they are at most the requests in flight, a few thousand), so
/// that whether they are at the budget is one load, and whether a removal took them below
/// it is exact.
#[cfg(feature = "tokio")]
#[derive(Default)]
pub(crate) struct ReplyBytes(AtomicU64);

/// One reply in [`ReplyBytes`]: its count, above its bytes.
#[cfg(feature = "tokio")]
const ONE_REPLY: u64 = 1 << 48;

#[cfg(feature = "tokio")]
impl ReplyBytes {
    /// At the budget: a call that has not started its handler waits.
    #[inline]
    pub(crate) fn over(&self) -> bool {
        Self::at_budget(self.0.load(Ordering::SeqCst))
    }

    /// Whether the replies `word` says are at the budget: [`MAX_REPLY_BYTES`] or more, in
    /// two replies at least. One reply waits whatever its size, as one request is taken
    /// whatever its size: a peer that waits for a handler to run before it reads, with one
    /// large reply unread, is not held up by it.
    #[inline]
    fn at_budget(word: u64) -> bool {
        word & (ONE_REPLY - 1) >= MAX_REPLY_BYTES as u64 && word >= 2 * ONE_REPLY
    }

    /// A reply of `bytes` waits to go out.
    #[inline]
    pub(crate) fn add(&self, bytes: usize) {
        self.0.fetch_add(ONE_REPLY + bytes as u64, Ordering::SeqCst);
    }

    /// A reply of `bytes` is out or given up: whether that took the replies waiting below
    /// the budget (a call waiting for that may start).
    #[inline]
    pub(crate) fn remove(&self, bytes: usize) -> bool {
        let one = ONE_REPLY + bytes as u64;
        let before = self.0.fetch_sub(one, Ordering::SeqCst);
        Self::at_budget(before) && !Self::at_budget(before - one)
    }
}

#[cfg(all(test, feature = "tokio"))]
mod tests {
    use super::{
        AtomicBacklog, Cost, MAX_REPLY_BYTES, MAX_REQUEST_BYTES, MAX_REQUEST_FDS, MAX_REQUESTS,
        ReplyBytes,
    };

    /// The requests, their bytes and their fds count apart, though two of them share a word:
    /// each bound is reached on its own, and what comes goes again to nothing.
    #[test]
    fn the_async_backlog_counts_requests_bytes_and_fds_apart() {
        let backlog = AtomicBacklog::default();
        let small = Cost { bytes: 64, fds: 0 };
        for _ in 0..MAX_REQUESTS - 1 {
            backlog.add(small);
        }
        let held = backlog.get();
        assert_eq!(
            (held.requests, held.bytes, held.fds),
            (MAX_REQUESTS - 1, 64 * (MAX_REQUESTS - 1), 0)
        );
        assert!(!held.full());
        backlog.add(small);
        assert!(backlog.get().full(), "at the bound of requests");
        for _ in 0..MAX_REQUESTS {
            backlog.remove(small);
        }
        assert!(backlog.get().is_empty() && backlog.get().bytes == 0);

        // The largest a peer gone for good could make it hold, by far: still its bytes.
        let huge = Cost {
            bytes: 1 << 39,
            fds: MAX_REQUEST_FDS - 1,
        };
        backlog.add(huge);
        let held = backlog.get();
        assert_eq!((held.requests, held.bytes), (1, 1 << 39));
        assert!(held.full(), "past the bound of bytes");
        backlog.remove(huge);
        backlog.add(Cost {
            bytes: MAX_REQUEST_BYTES - 1,
            fds: MAX_REQUEST_FDS,
        });
        let held = backlog.get();
        assert_eq!((held.requests, held.fds), (1, MAX_REQUEST_FDS));
        assert!(held.full(), "at the bound of fds");
    }

    /// The budget holds from `MAX_REPLY_BYTES` in two replies; a removal that takes the
    /// replies below it says so, once.
    #[test]
    fn the_reply_budget_holds_from_its_bytes_in_two_replies() {
        let replies = ReplyBytes::default();
        replies.add(2 * MAX_REPLY_BYTES);
        assert!(!replies.over(), "one reply waits whatever its size");
        replies.add(1);
        assert!(replies.over());
        assert!(replies.remove(1), "below it again");
        assert!(
            !replies.remove(2 * MAX_REPLY_BYTES),
            "it was not at the budget"
        );
        let half = MAX_REPLY_BYTES / 2;
        replies.add(half);
        replies.add(half - 1);
        assert!(!replies.over(), "one byte short");
        replies.add(1);
        assert!(replies.over());
        assert!(replies.remove(half), "below it again");
        assert!(!replies.over());
    }
}
