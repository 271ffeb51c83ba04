//! This end's outgoing side ([`Outgoing`]): its region, its pipe and the bytes pinned in it,
//! its way into the peer's memory ([`Writer`]), and whether the peer has been sent an fd of
//! this end's ([`Announcement`]).

use parking_lot::Mutex;
use std::os::fd::{AsFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

#[cfg(doc)]
use super::Lane;
use super::{MAX, MIN_REGION, SEQ_BITS, SEQ_MASK, inode_of};
use crate::one_copy;
use crate::peer_memory::PeerMemory;
use crate::pipe::OutPipe;
use crate::shared_bytes::SharedBytes;
use crate::shared_region::SharedRegion;

#[derive(Default)]
pub(super) struct Outgoing {
    pub(super) region: Option<SharedRegion>,
    /// Whether the peer has the region's fd.
    pub(super) region_sent: Announcement,
    /// When the region last held a string of more than a quarter of its size (or was made),
    /// and the largest string it held since: what [`Outgoing::region_for`] sizes it by.
    large_at: Option<Instant>,
    small_max: usize,
    /// The inode number and size of the region the peer maps: the last one whose fd it took
    /// (it read the placement that carried it). Not always the current one: if that one's
    /// announcement went unread, or it could not be made, the peer maps the one before,
    /// which this end no longer has, and only [`Outgoing::take_region`] can name.
    peer_maps: Option<(u64, usize)>,
    pub(super) last_seq: u32,
    /// The number of the last placement given back because a failure reply to its call came
    /// ([`Lane::after_reply`]): the peer may say that it is done with it, unread, after that
    /// reply, in a message not read yet, so [`Outgoing::start`] skips it as it skips the
    /// number the peer last said it was done with.
    pub(super) failed: u32,
    /// Placements started, for [`Outgoing::start`]'s tokens (wrapping).
    started: u32,
    /// This end's pipe, made when first wanted (and tried again while it cannot be made:
    /// this process's pipes at their limit, or this user's).
    pub(super) pipe: Option<OutPipe>,
    /// Whether the peer has the pipe's read end.
    pub(super) pipe_sent: Announcement,
    /// The bytes of the placement (its token) in the pipe, kept unchanged until the peer has
    /// read them.
    pub(super) pinned: Option<(u32, SharedBytes)>,
    /// This end's way into the peer's memory.
    pub(super) writer: Writer,
}

/// This end's way into the peer's memory ([`crate::peer_memory`]). It needs the peer's
/// memory and the peer's mailbox ([`Lane::peer_mailbox`]), which may come in either order
/// (an async connection's reader may take in the announcement first).
#[derive(Default)]
pub(super) struct Writer {
    /// The peer's memory, if this end may write strings into it.
    pub(super) memory: Option<PeerMemory>,
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
    pub(super) fn write(
        &mut self,
        mailbox: &Mutex<Option<(u64, u64)>>,
        bytes: &[u8],
    ) -> Option<u64> {
        let memory = self.memory.as_ref().filter(|_| !self.failed)?;
        // The mailbox first: a peer that announced none takes no writes, so the probe behind
        // `pays` (~0.5 ms, and again every 10 s) would be for nothing.
        let (mailbox, token) = (*mailbox.lock())?;
        if !one_copy::pays() {
            return None;
        }
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

/// How long a region goes without a string of more than a quarter of its size before the
/// next string placed replaces it with one sized for the strings it held since. Making a
/// 32 MiB region costs ~20 ms here and dropping it ~7 ms, so strings whose sizes swing
/// between large and small pay for at most one such swing per period: under 0.3% of a CPU.
/// Shorter would shrink and regrow regions that are used every few seconds; longer would keep
/// the pages of a burst that has ended for that much longer.
pub(super) const SHRINK_AFTER: Duration = Duration::from_secs(10);

/// Whether the peer has been sent an fd of this end's (the region's, the pipe's), and by
/// which placement's message.
#[derive(Default)]
pub(super) struct Announcement {
    /// The placement (its token) whose message carried the fd.
    by: Option<u32>,
    done: bool,
}

impl Announcement {
    /// `fd`, if placement `seq`'s message must carry it (the first placement since the fd
    /// was made or given back).
    #[inline]
    pub(super) fn carry(&mut self, seq: u32, fd: RawFd) -> Option<RawFd> {
        if self.done {
            return None;
        }
        self.done = true;
        self.by = Some(seq);
        Some(fd)
    }

    /// Placement `seq` was never read: if its message carried the fd, the peer closed it
    /// unread, so the next placement carries it again.
    pub(super) fn unread(&mut self, seq: u32) {
        if self.by == Some(seq) {
            *self = Announcement::default();
        }
    }
}

impl Outgoing {
    /// The next placement, which the caller makes this end's only one in flight: its token, the
    /// sequence number (bits 0..11, the number on the wire) and the count of placements started
    /// (above). Skips `peer_done`, the number the peer says it is done with, and the one given back
    /// on a failure reply (`failed`), which the peer may say it is done with next: while this end
    /// is idle the peer can only be reporting one of those, and a placement that took its number
    /// would be taken for acknowledged before the peer read it, its bytes overwritten by the next
    /// (placements never sent bring the numbers round to either without a word from the peer). The
    /// count tells a placement from one that had the same number a lap (2,047 placements) earlier:
    /// a late failure reply to the older one's call must not give the newer one back. Tokens repeat
    /// only after 2^21 x 2,047 placements.
    #[inline]
    pub(super) fn start(&mut self, peer_done: &AtomicU32) -> u32 {
        let peer_done = peer_done.load(Ordering::Relaxed);
        let mut seq = (self.last_seq % SEQ_MASK) + 1;
        while seq == peer_done || seq == self.failed {
            seq = (seq % SEQ_MASK) + 1;
        }
        self.last_seq = seq;
        self.started = self.started.wrapping_add(1);
        seq | self.started << SEQ_BITS
    }

    /// Readies `region` for a string of `len` bytes (at most [`MAX`]): keeps the current one,
    /// or makes a new one, announced anew, if there is none or it is too small, or if it is
    /// over four times the size the strings it held for [`SHRINK_AFTER`] need. A region grows
    /// to the next power of two above its string, at least [`MIN_REGION`]. `None` if a new
    /// one cannot be made (out of memory, or of fds): the string goes inline. Called on an
    /// idle lane only, so no message on its way out names the old one's fd (`Lane::busy`).
    pub(super) fn region_for(&mut self, len: usize) -> Option<()> {
        let current = self.region.as_ref().map_or(0, SharedRegion::len);
        if let Some(size) = self.resize(len, current, Instant::now) {
            // The old one first: both at once could be 64 MiB.
            self.region = None;
            self.region = Some(SharedRegion::new(size).ok()?);
            self.region_sent = Announcement::default();
            (self.large_at, self.small_max) = (Some(Instant::now()), 0);
        }
        self.region.as_ref().map(drop)
    }

    /// The size of the region to make for a string of `len` bytes, if the `current` one (0:
    /// none) will not do. Reads the clock (`now`) only if the region could shrink.
    pub(super) fn resize(
        &mut self,
        len: usize,
        current: usize,
        now: impl FnOnce() -> Instant,
    ) -> Option<usize> {
        let fit = |len: usize| len.next_power_of_two().clamp(MIN_REGION, MAX);
        if current < len {
            return Some(fit(len));
        }
        if current <= MIN_REGION {
            return None;
        }
        let now = now();
        if len > current / 4 {
            (self.large_at, self.small_max) = (Some(now), 0);
            return None;
        }
        self.small_max = self.small_max.max(len);
        let since = self
            .large_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        (since >= SHRINK_AFTER).then(|| fit(self.small_max))
    }

    /// Makes the region's last string of more than a quarter of its size `by` older.
    #[cfg(test)]
    pub(super) fn age(&mut self, by: Duration) {
        self.large_at = self.large_at.and_then(|t| t.checked_sub(by));
    }

    /// Placement `token` was read: if its message carried the region's fd, the peer maps this
    /// region now, and no older one. Out of line: inlined, it cost the reader of every
    /// message, placement or not, two instructions.
    #[inline(never)]
    pub(super) fn read(&mut self, token: u32) {
        if self.region_sent.by == Some(token) {
            self.peer_maps = self
                .region
                .as_ref()
                .and_then(|r| Some((inode_of(r.as_fd())?, r.len())));
        }
    }

    /// Gives back the region, if there is one, and the inode number and size of the one the
    /// peer maps (which may be an older one), if it maps one: from now on it maps none.
    pub(super) fn take_region(&mut self) -> (Option<SharedRegion>, Option<(u64, usize)>) {
        self.region_sent = Announcement::default();
        (self.large_at, self.small_max) = (None, 0);
        (self.region.take(), self.peer_maps.take())
    }

    /// Lets go of the bytes placement `seq` piped, if it did; with `drain`, after emptying
    /// the pipe of what the peer left of them (it will never read them), so the next string
    /// starts at the front of the pipe.
    pub(super) fn unpin(&mut self, seq: u32, drain: bool) {
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
