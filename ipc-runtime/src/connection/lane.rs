//! The lane: large byte strings through a shared region instead of the socket.
//!
//! Over the socket a byte string is copied four times: into the encode buffer, into the
//! kernel, out of it, and into the `Vec` the receiver gets. Through the lane it is copied
//! twice: by the sender into a [`SharedRegion`] it owns, and by the receiver out of it, with
//! atomic loads, into the `Vec` ([`RegionView::to_vec`]). The region is made once per
//! connection and direction (grown by replacement when a larger string comes) and its pages
//! are reused, so no page is allocated per message — which on these VMs costs more than the
//! copy itself. The receiver stays safe against a hostile sender for the reasons given in
//! [`shared_region`](crate::shared_region): it only ever reads the region with atomic loads,
//! into memory of its own, and the region's size is sealed.
//!
//! # Protocol
//!
//! - A byte string of [`MIN`] (1 KiB) to [`MAX`] (32 MiB) bytes is *placed* in the sender's region, at offset
//!   0, when the lane is idle and the peer has said that it reads lanes; it is then a
//!   [`Placed`] reference on the wire (the codec's tag 1), carrying the region's fd the first
//!   time. At most one string per message is placed; everything else stays inline.
//! - Every message's envelope carries a *lane word* (bytes 1..4): bit 23 says "I read lanes",
//!   bits 11..21 the sequence number of the placement this message carries (0: none), bits
//!   0..10 that of the last placement this end is done with, and bit 22 that it was done
//!   with that one *unread*. A peer that leaves the word zero is never sent a placement.
//!   Both flavours (this connection and the async one) keep a `Lane` and speak this
//!   protocol.
//! - An end is done with a placement once it has copied it out, or once it is done with the
//!   message that carried it without having read it (a reply whose caller gave up, a request
//!   whose handler never decoded its arguments): the carried sequence number in the
//!   envelope is what lets it say so without decoding the body. A placement done with unread
//!   is treated by its sender as never sent: if its message announced the region, the
//!   region's fd was closed unread, so the next placement announces it again. Sequence
//!   numbers run from 1 to 2047 and wrap; with one placement in flight at a time, "newer" is
//!   well defined.
//! - A placement keeps the lane busy until the peer's lane word acknowledges it, or until a
//!   failure reply to the call that carried it arrives (the request may never have been
//!   decoded, so a region it announced is announced again), or the message carrying it
//!   turns out never to have been sent (an error, or an async send cancelled before its
//!   first datagram). While it is busy, byte strings go inline: nobody waits, and nothing
//!   deadlocks. A peer that never acknowledges (a oneway stream it never answers, a hostile
//!   peer) costs speed, not correctness.
//! - On a connection that lends its pages to its (trusted) peer, a call's [`SharedBytes`] of
//!   [`PIPE_MIN`] to 1 MiB are *piped* instead (the codec's tag 2): `vmsplice`d into this end's pipe ([`crate::pipe`]), which the receiver copies them
//!   out of, one copy instead of two. Same sequence numbers, acknowledgement and busy lane;
//!   in addition the lane keeps a clone of the bytes until the acknowledgement (the receiver
//!   reads the sender's own pages), and a placement given back unread is emptied out of the
//!   pipe before the lane is idle again, so the next one starts at the front.
//! - On a connection given the peer's memory ([`PeerMemory`]), once the peer has announced
//!   an inbox, byte strings of [`peer_memory::MIN`] (256 KiB) to [`peer_memory::CAPACITY`]
//!   (1 MiB) are *written* into the peer's inbox buffer instead (the codec's tag 3;
//!   [`crate::peer_memory`]), one copy. Same sequence numbers, acknowledgement and busy
//!   lane; the receiver acknowledges only once its inbox names a new buffer
//!   ([`Lane::settle_inbox`]), so the sender never finds a buffer the receiver has handed
//!   over. Only while one copy costs less than the region's two on this machine, as
//!   measured now ([`crate::one_copy`]); otherwise the region.

use parking_lot::{Mutex, MutexGuard};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use serde::Serialize;

use super::envelope::{self, Envelope, Kind};
use crate::codec::{self, NO_FD, OutOfLine, Piped, Placed, Placement, Written};
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::one_copy;
use crate::peer_memory::{self, Inbox, PeerMemory};
use crate::pipe::{self, InPipe, OutPipe};
use crate::shared_bytes::SharedBytes;
use crate::shared_region::{RegionView, SharedRegion};

/// Smallest byte string placed. Placing saves the kernel's two copies of the bytes; at 4 KiB
/// that took an echo from 1.35–1.41x to 1.24–1.28x the bare-socket floor (A/B runs of
/// `ipc-bench`, docs/benchmarks-bulk.md). Smaller strings were not measured and stay inline.
pub(crate) const MIN: usize = codec::OUT_OF_LINE_MIN;
/// Largest byte string placed, and the largest region made or accepted (larger strings go
/// inline, in fragments).
pub(crate) const MAX: usize = 32 << 20;
/// Smallest region made (grown to the next power of two above a larger string): small
/// strings cost a connection 64 KiB of shared memory per direction, not the largest size.
const MIN_REGION: usize = 64 << 10;
/// Smallest [`SharedBytes`] piped; smaller ones go the way of any byte string. Measured
/// (randomised A/B, docs/benchmarks-bulk.md): at 64 KiB the pipe's page pinning and
/// page-by-page copy cost more than the region's two copies, at 128 KiB the same, from
/// 256 KiB less.
const PIPE_MIN: usize = 128 << 10;
/// Whether a call's [`SharedBytes`] of `len` bytes would be piped (if the lane is free).
#[inline]
pub(crate) fn pipes(len: usize) -> bool {
    (PIPE_MIN..=pipe::CAPACITY).contains(&len)
}

const READS_LANES: u32 = 1 << 23;
/// Bits of a sequence number in the lane word.
const SEQ_BITS: u32 = 11;
const SEQ_MASK: u32 = (1 << SEQ_BITS) - 1;
/// In the lane word: the placement acknowledged was done with unread.
const UNREAD: u32 = 1 << 22;

/// One connection's lane: its outgoing region and its view of the peer's.
pub(crate) struct Lane {
    out: Mutex<Outgoing>,
    /// Sequence number of the placement the peer has not released yet; 0 when idle.
    busy: AtomicU32,
    /// The last placement of ours the peer's lane words said it was done with: the next
    /// placement never takes this number, so an old acknowledgement can never pass for
    /// its (after 2,047 placements that were never sent, the numbers would come round).
    peer_done: AtomicU32,
    /// The peer's lane words say it reads lanes.
    peer_reads: AtomicBool,
    /// This end may pipe: lend the peer its pages ([`Lane::lend_pages`]).
    lends: AtomicBool,
    /// The peer's region, as last announced.
    incoming: Mutex<Option<RegionView>>,
    /// The peer's pipe, as last announced.
    incoming_pipe: Mutex<Option<InPipe>>,
    /// The peer's inbox mailbox and its token, as announced. A lock of its own, held only to
    /// copy them: a reader that takes in an announcement must never wait for a write into
    /// the peer (which holds `out`, and could be slow).
    peer_mailbox: Mutex<Option<(u64, u64)>>,
    /// Sequence number of the last placement of the peer's this end is done with, with
    /// [`UNREAD`] if it was not read.
    consumed: AtomicU32,
    /// Largest string (and region) accepted from the peer.
    max_len: usize,
    /// Where the peer writes strings into this process, once this end accepts that.
    inbox: Mutex<Option<Inbox>>,
    /// A string was taken out of the inbox and its placement is not acknowledged yet: the
    /// inbox needs a new buffer first ([`Lane::settle_inbox`]).
    inbox_taken: AtomicBool,
}

#[derive(Default)]
struct Outgoing {
    region: Option<SharedRegion>,
    /// Whether the peer has the region's fd.
    region_sent: Announcement,
    last_seq: u32,
    /// This end's pipe, made when first wanted (and tried again while it cannot be made:
    /// this process's pipes at their limit, or this user's).
    pipe: Option<OutPipe>,
    /// Whether the peer has the pipe's read end.
    pipe_sent: Announcement,
    /// The bytes of the placement in the pipe, kept unchanged until the peer has read them.
    pinned: Option<(u32, SharedBytes)>,
    /// This end's way into the peer's memory.
    writer: Writer,
}

/// This end's way into the peer's memory ([`crate::peer_memory`]). It needs the peer's
/// memory and the peer's mailbox ([`Lane::peer_mailbox`]), which may come in either order
/// (an async connection's reader may take in the announcement first).
#[derive(Default)]
struct Writer {
    /// The peer's memory, if this end may write strings into it.
    memory: Option<PeerMemory>,
    /// This end has shown the peer that it can write its memory (once per connection).
    proven: bool,
    /// A read or write failed: no more writing on this connection.
    failed: bool,
}

impl Writer {
    /// Writes `bytes` into the inbox buffer of the peer whose mailbox is `mailbox`; the
    /// buffer's generation if it did. Any failure ends writing for the connection: the peer
    /// cannot be written (it is gone, or not this process's to write), or announced a
    /// buffer that is not one.
    fn write(&mut self, mailbox: &Mutex<Option<(u64, u64)>>, bytes: &[u8]) -> Option<u64> {
        let memory = self.memory.as_ref().filter(|_| !self.failed)?;
        if !one_copy::pays() {
            return None;
        }
        let (mailbox, token) = (*mailbox.lock())?;
        let written =
            memory
                .read_mailbox(mailbox, token)
                .and_then(|(generation, addr, capacity)| {
                    if (bytes.len() as u64) > capacity {
                        return Ok(None); // a smaller buffer than ours: not for this string
                    }
                    if one_copy::too_close(bytes.as_ptr() as usize, addr) {
                        return Ok(None); // the kernel's copy would be slow: the region
                    }
                    if !self.proven {
                        memory.prove(mailbox, token)?;
                        self.proven = true;
                    }
                    memory.write(addr, bytes).map(|()| Some(generation))
                });
        written.unwrap_or_else(|_| {
            self.failed = true;
            None
        })
    }
}

/// Whether the peer has been sent an fd of this end's (the region's, the pipe's), and by
/// which placement's message.
#[derive(Default)]
struct Announcement {
    /// The placement whose message carried the fd.
    by: Option<u32>,
    done: bool,
}

impl Announcement {
    /// `fd`, if placement `seq`'s message must carry it (the first placement since the fd
    /// was made or given back).
    #[inline]
    fn carry(&mut self, seq: u32, fd: RawFd) -> Option<RawFd> {
        if self.done {
            return None;
        }
        self.done = true;
        self.by = Some(seq);
        Some(fd)
    }

    /// Placement `seq` was never read: if its message carried the fd, the peer closed it
    /// unread, so the next placement carries it again.
    fn unread(&mut self, seq: u32) {
        if self.by == Some(seq) {
            *self = Announcement::default();
        }
    }
}

impl Outgoing {
    /// The next placement's sequence number, made this end's only one in flight. Skips
    /// `peer_done`, the number the peer says it is done with: while this end is idle the
    /// peer can only be reporting that one.
    #[inline]
    fn start(&mut self, busy: &AtomicU32, peer_done: &AtomicU32) -> u32 {
        let mut seq = (self.last_seq % SEQ_MASK) + 1;
        if seq == peer_done.load(Ordering::Relaxed) {
            seq = (seq % SEQ_MASK) + 1;
        }
        self.last_seq = seq;
        busy.store(seq, Ordering::Release);
        seq
    }

    /// Lets go of the bytes placement `seq` piped, if it did; with `drain`, after emptying
    /// the pipe of what the peer left of them (it will never read them), so the next string
    /// starts at the front of the pipe.
    fn unpin(&mut self, seq: u32, drain: bool) {
        if self
            .pinned
            .as_ref()
            .is_some_and(|(pinned, _)| *pinned == seq)
        {
            if let (true, Some(pipe)) = (drain, &self.pipe) {
                pipe.drain();
            }
            self.pinned = None;
        }
    }
}

impl Lane {
    /// A lane that accepts strings (and regions) of at most `max_len` bytes from the peer.
    pub(crate) fn new(max_len: usize) -> Lane {
        Lane {
            out: Mutex::new(Outgoing::default()),
            busy: AtomicU32::new(0),
            peer_done: AtomicU32::new(0),
            peer_reads: AtomicBool::new(false),
            lends: AtomicBool::new(false),
            incoming: Mutex::new(None),
            incoming_pipe: Mutex::new(None),
            peer_mailbox: Mutex::new(None),
            consumed: AtomicU32::new(0),
            max_len: max_len.min(MAX),
            inbox: Mutex::new(None),
            inbox_taken: AtomicBool::new(false),
        }
    }

    /// Lets this end write byte strings of [`peer_memory::MIN`] to
    /// [`peer_memory::CAPACITY`] bytes straight into `memory`, the peer's, once the peer
    /// announces an inbox ([`Lane::on_announce`]).
    pub(crate) fn write_into_peer(&self, memory: PeerMemory) {
        let mut out = self.out.lock();
        out.writer.memory = Some(memory);
    }

    /// Makes this end's inbox (once) and returns the announcement for the peer: the
    /// mailbox's address and token.
    pub(crate) fn accept_writes(&self) -> std::io::Result<(u64, u64)> {
        let mut inbox = self.inbox.lock();
        if inbox.is_none() {
            *inbox = Some(Inbox::new()?);
        }
        Ok(inbox.as_ref().expect("made above").announcement())
    }

    /// The peer announced its inbox: written into from now on, if this end may write it.
    pub(crate) fn on_announce(&self, mailbox: u64, token: u64) {
        *self.peer_mailbox.lock() = Some((mailbox, token));
    }

    /// Whether calls may pipe their large byte strings: the peer then reads this process's
    /// own pages, and can keep references to them (`tee`) to read whatever the process
    /// stores there later, so only towards a trusted peer (`Connection::lend_pages_to_peer`).
    pub(crate) fn lend_pages(&self, lend: bool) {
        self.lends.store(lend, Ordering::Relaxed);
    }

    /// The outgoing side, if the lane is idle and nobody else is placing: the one place a
    /// placement starts. Only a placement makes the lane busy, and only under `out`'s lock,
    /// so a lane idle here stays idle until [`Outgoing::start`]: no compare-and-swap needed
    /// (an atomic read-modify-write costs ~7 ns on these VMs).
    #[inline]
    fn idle_out(&self) -> Option<MutexGuard<'_, Outgoing>> {
        let out = self.out.try_lock()?;
        (self.busy.load(Ordering::Acquire) == 0).then_some(out)
    }

    /// The generation of this end's inbox buffer, if it accepts writes.
    #[cfg(test)]
    pub(crate) fn inbox_generation(&self) -> Option<u64> {
        let inbox = self.inbox.lock();
        inbox.as_ref().map(Inbox::generation)
    }

    /// The peer's lane words have said it reads lanes.
    #[cfg(all(test, feature = "tokio"))]
    pub(crate) fn peer_reads(&self) -> bool {
        self.peer_reads.load(Ordering::Relaxed)
    }

    /// A placement of this end's is in flight.
    #[cfg(test)]
    pub(crate) fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire) != 0
    }

    /// The lane word for an outgoing envelope that carries placement `placed` (0: none).
    #[inline]
    pub(crate) fn word(&self, placed: u32) -> u32 {
        self.settle_inbox_if_taken();
        READS_LANES | placed << SEQ_BITS | self.consumed.load(Ordering::Acquire)
    }

    /// Gives the inbox its next buffer and only then acknowledges the string taken out of
    /// the last one: the peer reads the mailbox again once it sees the acknowledgement, and
    /// must not find the old buffer there (the receiver's user owns it now). Done as late
    /// as the acknowledgement allows, when the next message goes out or the next
    /// acknowledgement is recorded ([`Lane::done_with`]): by then a handler
    /// has usually dropped the last string, and the allocator hands its pages, still in
    /// cache, to the next buffer.
    #[inline]
    fn settle_inbox_if_taken(&self) {
        if self.inbox_taken.load(Ordering::Acquire) {
            self.settle_inbox();
        }
    }

    /// [`Lane::settle_inbox_if_taken`]'s work, when a string was taken.
    #[cold]
    fn settle_inbox(&self) {
        let mut inbox = self.inbox.lock();
        if let Some(seq) = inbox.as_mut().and_then(Inbox::renew_taken) {
            self.inbox_taken.store(false, Ordering::Release);
            self.record_done(seq, 0);
        }
    }

    /// This end is done with the message whose payload (envelope first) is `payload`: if it
    /// carried a placement, the peer may reuse the region, whether or not it was read.
    pub(crate) fn finished(&self, payload: &[u8]) {
        let carried = envelope::lane(payload) >> SEQ_BITS & SEQ_MASK;
        if carried != 0 {
            // If it was read, `take` recorded it already and this changes nothing.
            self.done_with(carried, UNREAD);
        }
    }

    /// Records placement `seq` as done with (`how`: 0 read, or [`UNREAD`]), unless it or a
    /// newer one already is (messages may be finished out of order: a request's handler can
    /// outlive the next placement).
    fn done_with(&self, seq: u32, how: u32) {
        if seq == 0 {
            return;
        }
        self.settle_inbox_if_taken(); // its acknowledgement comes first
        self.record_done(seq, how);
    }

    fn record_done(&self, seq: u32, how: u32) {
        let _ = self
            .consumed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                newer(seq, last & SEQ_MASK).then_some(seq | how)
            });
    }

    /// Takes in the lane word of an envelope the peer sent.
    pub(crate) fn on_word(&self, word: u32) {
        if word & READS_LANES == 0 {
            return;
        }
        if !self.peer_reads.load(Ordering::Relaxed) {
            self.peer_reads.store(true, Ordering::Relaxed);
        }
        let seq = word & SEQ_MASK;
        if seq == 0 {
            return;
        }
        if self.peer_done.load(Ordering::Relaxed) != seq {
            self.peer_done.store(seq, Ordering::Relaxed);
        }
        if self.busy.load(Ordering::Acquire) != seq {
            return; // nothing in flight, or an acknowledgement seen before
        }
        match word & UNREAD {
            0 => self.release(seq),
            _ => self.abort_for_reader(seq),
        }
    }

    /// The placement `seq` is no longer read by the peer: the lane is idle again, and bytes
    /// it piped may change. (A stale [`Announcement::by`] left behind only matters to an `abort` of
    /// the same sequence number, which would announce the fd once more: harmless.)
    pub(crate) fn release(&self, seq: u32) {
        if self
            .busy
            .compare_exchange(seq, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let mut out = self.out.lock();
            out.unpin(seq, false);
        }
    }

    /// The peer will never read placement `seq`: its message was not sent, or was refused
    /// unread. If it announced the region, the peer never took the fd, so the next placement
    /// announces it again. Placement 0 (none) is ignored.
    pub(crate) fn abort(&self, seq: u32) {
        if seq == 0 {
            return;
        }
        let mut out = self.out.lock();
        self.abort_locked(&mut out, seq);
    }

    /// [`Lane::abort`] for the connection's reader, which must never wait for a write into
    /// the peer: once the lane is no longer busy with `seq` (a failure reply released it
    /// meanwhile), another thread may hold `out` for such a write, and there is nothing left
    /// to do. While it is busy with `seq`, `out` is only ever held briefly.
    fn abort_for_reader(&self, seq: u32) {
        while self.busy.load(Ordering::Acquire) == seq {
            let Some(mut out) = self.out.try_lock() else {
                std::thread::yield_now();
                continue;
            };
            self.abort_locked(&mut out, seq);
            return;
        }
    }

    fn abort_locked(&self, out: &mut Outgoing, seq: u32) {
        out.region_sent.unread(seq);
        out.pipe_sent.unread(seq);
        // Emptied before the lane is idle again (and under `out`, which a new placement
        // needs), so the next string cannot land behind these bytes.
        out.unpin(seq, true);
        let _ = self
            .busy
            .compare_exchange(seq, 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Encodes a message into the emptied `buf`: room for the transport's header (see
    /// [`envelope::FRAMED_AT`]), `envelope` with this lane's word, then `body`, placing a byte
    /// string in this lane if it can. Returns the placement the message carries (0: none);
    /// the caller sends the message, and calls [`Lane::abort`] with the placement if it fails
    /// to. Only a call's [`SharedBytes`] may pipe.
    pub(crate) fn encode<'a, A: Serialize + ?Sized>(
        &self,
        envelope: &Envelope,
        body: &'a A,
        buf: &mut Vec<u8>,
        fds: &mut Vec<BorrowedFd<'a>>,
    ) -> Result<u32> {
        debug_assert!(buf.is_empty());
        // Written on the stack first: at constant offsets, without a bounds check each.
        let mut head = [0; envelope::FRAMED_AT + envelope::LEN];
        envelope.write(&mut head[envelope::FRAMED_AT..]);
        buf.extend_from_slice(&head);
        // Only a call's request pipes: its reply acknowledges the bytes, so the lane holds
        // them for the length of a call, not until some later message (a oneway's or a
        // reply's bytes could be pinned long after the sender is done with them).
        let pipe = envelope.kind == Kind::Call;
        let (placed, encoded) = codec::encode_placing(body, buf, fds, self, pipe);
        // Read after encoding: acknowledges what was copied out up to this moment.
        envelope::set_lane(&mut buf[envelope::FRAMED_AT..], self.word(placed));
        match encoded {
            Ok(()) => Ok(placed),
            Err(e) => {
                self.abort(placed);
                Err(e)
            }
        }
    }

    /// The reply to a call that carried placement `placed` arrived. A failure reply may
    /// mean the request was refused unread: the peer will neither read nor acknowledge the
    /// placement, nor have taken a region it announced, so it is given back as unsent.
    pub(crate) fn after_reply(&self, placed: u32, reply: &Frame) {
        if placed != 0 && envelope::kind_byte(&reply.payload) == Some(Kind::Failure as u8) {
            self.abort(placed);
        }
    }
}

/// Whether sequence number `a` comes after `b` (0: none yet, before everything). Numbers
/// run 1..=SEQ_MASK and wrap; only one placement is in flight at a time, so anything within
/// half the range ahead is newer.
fn newer(a: u32, b: u32) -> bool {
    if b == 0 {
        return a != 0;
    }
    let ahead = (a + SEQ_MASK - b) % SEQ_MASK;
    ahead != 0 && ahead < SEQ_MASK / 2
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        // Bytes still pinned were never acknowledged (a call given up, then the connection
        // dropped): once their owner lets go they may change, so the peer must not read
        // them. A late read finds the pipe short and refuses the message.
        if let Some((seq, _)) = self.pinned {
            self.unpin(seq, true);
        }
    }
}

impl OutOfLine for Lane {
    fn put_shared(&self, bytes: &SharedBytes) -> Option<(Piped, Option<RawFd>)> {
        let len = bytes.len();
        if !pipes(len)
            || !self.lends.load(Ordering::Relaxed)
            || !self.peer_reads.load(Ordering::Relaxed)
            || self.busy.load(Ordering::Acquire) != 0
        {
            return None;
        }
        let mut out = self.idle_out()?;
        let out = &mut *out;
        if out.pipe.is_none() {
            out.pipe = Some(OutPipe::new().ok()?);
        }
        let pipe = out.pipe.as_ref()?;
        // All of it, or all but up to a page when it starts mid-page (the pipe holds whole
        // pages); anything less means the pipe was not empty (a peer that
        // acknowledged bytes it did not read), and the bytes would mostly go inline.
        let spliced = pipe.splice(bytes);
        if spliced + pipe::page_size() < len {
            pipe.drain();
            return None;
        }
        let read_end = pipe.read_end().as_raw_fd();
        let seq = out.start(&self.busy, &self.peer_done);
        let fd = out.pipe_sent.carry(seq, read_end);
        out.pinned = Some((seq, bytes.clone()));
        let piped = Piped {
            seq,
            fd: NO_FD,
            len: spliced as u64,
        };
        Some((piped, fd))
    }

    fn take_piped(
        &self,
        piped: &Piped,
        fd: Option<OwnedFd>,
        tail: &[u8],
    ) -> Result<Vec<u8>, String> {
        let mut incoming = self.incoming_pipe.lock();
        if let Some(fd) = fd {
            *incoming = Some(InPipe::new(fd).map_err(|e| e.to_string())?);
        }
        let pipe = incoming
            .as_ref()
            .ok_or("a piped byte string, but the peer announced no pipe")?;
        let len = match usize::try_from(piped.len) {
            Ok(len) if len <= pipe::CAPACITY && len + tail.len() <= self.max_len => len,
            _ => {
                return Err(format!(
                    "a piped byte string of {} + {} bytes (at most {} accepted)",
                    piped.len,
                    tail.len(),
                    self.max_len.min(pipe::CAPACITY)
                ));
            }
        };
        let mut bytes = pipe.read_vec(len, tail.len()).map_err(|e| e.to_string())?;
        bytes.extend_from_slice(tail);
        self.done_with(piped.seq & SEQ_MASK, 0);
        Ok(bytes)
    }

    fn put(&self, bytes: &[u8]) -> Option<Placement> {
        let len = bytes.len();
        if !(MIN..=MAX).contains(&len)
            || !self.peer_reads.load(Ordering::Relaxed)
            || self.busy.load(Ordering::Acquire) != 0
        {
            return None;
        }
        let mut out = self.idle_out()?;
        if (peer_memory::MIN..=peer_memory::CAPACITY).contains(&len)
            && let Some(generation) = out.writer.write(&self.peer_mailbox, bytes)
        {
            let seq = out.start(&self.busy, &self.peer_done);
            return Some(Placement::Written(Written {
                seq,
                generation,
                len: len as u64,
            }));
        }
        if out.region.as_ref().is_none_or(|r| r.len() < len) {
            let region = SharedRegion::new(len.next_power_of_two().clamp(MIN_REGION, MAX)).ok()?;
            out.region = Some(region);
            out.region_sent = Announcement::default();
        }
        let out = &mut *out;
        let seq = out.start(&self.busy, &self.peer_done);
        let region = out.region.as_mut().expect("made above");
        crate::bulk_copy::copy_into(&mut region[..len], bytes);
        let fd = out.region_sent.carry(seq, region.as_fd().as_raw_fd());
        let placed = Placed {
            seq,
            fd: NO_FD,
            offset: 0,
            len: len as u64,
        };
        Some(Placement::Region(placed, fd))
    }

    fn take_written(&self, written: &Written) -> Result<Vec<u8>, String> {
        let seq = written.seq & SEQ_MASK;
        if seq == 0 || written.len > self.max_len as u64 {
            return Err(format!(
                "a byte string of {} bytes written by placement {} (at most {} accepted)",
                written.len, written.seq, self.max_len
            ));
        }
        let mut inbox = self.inbox.lock();
        let inbox = inbox
            .as_mut()
            .ok_or("a byte string written into this process, but it announced no inbox")?;
        let bytes = inbox.take(written.generation, written.len, seq)?;
        // Acknowledged by `settle_inbox`, once the inbox has its next buffer.
        self.inbox_taken.store(true, Ordering::Release);
        Ok(bytes)
    }

    fn take(&self, placed: &Placed, fd: Option<OwnedFd>) -> Result<Vec<u8>, String> {
        let mut incoming = self.incoming.lock();
        if let Some(fd) = fd {
            let view = RegionView::from_fd_with_limit(fd, self.max_len)
                .map_err(|e| format!("the peer's shared region was refused: {e}"))?;
            *incoming = Some(view);
        }
        let view = incoming
            .as_ref()
            .ok_or("an out-of-line byte string, but the peer announced no shared region")?;
        let (offset, len) = match (usize::try_from(placed.offset), usize::try_from(placed.len)) {
            (Ok(offset), Ok(len)) if len <= self.max_len => (offset, len),
            _ => {
                return Err(format!(
                    "an out-of-line byte string of {} bytes (at most {} accepted)",
                    placed.len, self.max_len
                ));
            }
        };
        // The caller words the error as malformed; its own wording would say so twice.
        let bytes = view.to_vec(offset, len).map_err(|e| match e {
            Error::Malformed(why) => why,
            e => e.to_string(),
        })?;
        self.done_with(placed.seq & SEQ_MASK, 0);
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_placement_never_takes_the_number_the_peer_last_acknowledged() {
        let (busy, peer_done) = (AtomicU32::new(0), AtomicU32::new(0));
        let mut out = Outgoing::default();
        assert_eq!(out.start(&busy, &peer_done), 1);
        // The peer still reports 5 as done with (say 2,046 placements since were never
        // sent): 5 is skipped, or that old acknowledgement would release the new one.
        out.last_seq = 4;
        peer_done.store(5, Ordering::Relaxed);
        assert_eq!(out.start(&busy, &peer_done), 6);
        assert_eq!(busy.load(Ordering::Relaxed), 6);
        // Also where the numbers wrap.
        out.last_seq = SEQ_MASK;
        peer_done.store(1, Ordering::Relaxed);
        assert_eq!(out.start(&busy, &peer_done), 2);
    }
}
