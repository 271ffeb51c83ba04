//! The lane as the codec's out-of-line store ([`OutOfLine`]): byte strings placed, piped or
//! written by this end, and taken out of the peer's region, its pipe or this end's inbox.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;

use super::{INBOX_TAKEN, Lane, MAX, MIN, SEQ_MASK, idle, pipes};
use crate::codec::{FdNamed, NO_FD, OutOfLine, Piped, Placed, Placement, Unfetched, Written};
use crate::error::{Error, Result};
use crate::peer_memory;
use crate::pipe::{self, InPipe, OutPipe};
use crate::shared_bytes::SharedBytes;
use crate::shared_region::RegionView;

impl OutOfLine for Lane {
    fn max_shared_len(&self) -> usize {
        self.max_shared_len
    }

    fn put_shared(&self, bytes: &SharedBytes) -> Option<(Piped, Option<RawFd>)> {
        let len = bytes.len();
        // Over this side's limits, the string goes inline and the socket refuses the message
        // unsent (`TooLarge`), as it refuses any message over them.
        if !pipes(len)
            || len > self.max_send_len
            || self.max_send_fds == 0
            || !self.lends(Ordering::Relaxed)
            || !self.peer_takes_pipes()
            || !self.peer_reads.load(Ordering::Acquire)
            || !idle(self.busy.load(Ordering::Acquire))
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
        let token = self.start(out, true);
        let fd = out.pipe_sent.carry(token, read_end);
        out.pinned = Some((token, bytes.clone()));
        let piped = Piped {
            seq: token & SEQ_MASK,
            fd: NO_FD,
            len: spliced as u64,
        };
        Some((piped, fd))
    }

    fn take_piped(&self, piped: &Piped, fd: FdNamed, tail: &[u8]) -> Result<Vec<u8>, Unfetched> {
        let fd = fd.map(PeerFd);
        // Before the fd is touched: every read of a pipe takes its lock, which the peer can
        // hold (sleeping in a `splice` into it) for as long as it likes.
        if !self.lends(Ordering::Acquire) {
            return Err(untrusted_pipe());
        }
        // Read again, the pipe would give the bytes of the string piped after this one.
        let seq = piped.seq & SEQ_MASK;
        self.untaken(seq)?;
        let fd = fd?;
        let mut incoming = self.incoming_pipe.lock();
        if let Some(fd) = fd.kept() {
            *incoming = Some(InPipe::new(fd).map_err(|e| e.to_string())?);
        }
        let pipe = incoming
            .as_ref()
            .ok_or("a piped byte string, but the peer announced no pipe")?;
        let len = match usize::try_from(piped.len) {
            Ok(len) if len <= pipe::CAPACITY => len,
            _ => {
                return Err(format!(
                    "a piped byte string of {} bytes, more than a pipe holds ({} bytes)",
                    piped.len,
                    pipe::CAPACITY
                )
                .into());
            }
        };
        if len + tail.len() > self.max_len {
            return Err(self.refused("a piped byte string", (len + tail.len()) as u64));
        }
        let mut bytes = pipe.read_vec(len, tail.len()).map_err(|e| e.to_string())?;
        bytes.extend_from_slice(tail);
        self.took(seq);
        self.done_with(seq, 0);
        Ok(bytes)
    }

    fn put(&self, bytes: &[u8]) -> Option<Placement> {
        let len = bytes.len();
        // Not over this side's limits (`max_send_len`, at most `MAX`): such a string goes
        // inline, and the socket refuses the message unsent (`TooLarge`), as any over them.
        if !(MIN..=self.max_send_len).contains(&len) || !idle(self.busy.load(Ordering::Acquire)) {
            return None;
        }
        // A peer that does not read lanes takes no fd: no region, but it may still take a
        // string written into its memory (if it announced an inbox).
        let reads = self.peer_reads.load(Ordering::Acquire);
        let writes = (peer_memory::MIN..=peer_memory::CAPACITY).contains(&len);
        if !reads && !writes {
            return None;
        }
        let mut out = self.idle_out()?;
        if writes && let Some(generation) = out.writer.write(&self.peer_mailbox, bytes) {
            let token = self.start(&mut out, false);
            return Some(Placement::Written(Written {
                seq: token & SEQ_MASK,
                generation,
                len: len as u64,
            }));
        }
        if self.max_send_fds == 0 || !reads {
            return None; // the region's fd could never go out, or would be refused
        }
        let out = &mut *out;
        out.region_for(len)?;
        let token = self.start(out, false);
        let region = out.region.as_mut().expect("made above");
        crate::bulk_copy::copy_into(&mut region[..len], bytes);
        let fd = out.region_sent.carry(token, region.as_fd().as_raw_fd());
        let placed = Placed {
            seq: token & SEQ_MASK,
            fd: NO_FD,
            offset: 0,
            len: len as u64,
        };
        Some(Placement::Region(placed, fd))
    }

    /// Never sent: given back, and its send over ([`Lane::never_sent`]), as [`Lane::encode`]
    /// does when an encode fails.
    fn abandon(&self, seq: u32) {
        self.never_sent(self.token_of(seq));
    }

    fn take_written(&self, written: &Written) -> Result<Vec<u8>, Unfetched> {
        let seq = written.seq & SEQ_MASK;
        if seq == 0 {
            return Err("a byte string written by placement 0".into());
        }
        if written.len > self.max_len as u64 {
            return Err(self.refused("a byte string written into this process", written.len));
        }
        self.untaken(seq)?;
        let mut inbox = self.inbox.lock();
        let inbox = inbox
            .as_mut()
            .ok_or("a byte string written into this process, but it announced no inbox")?;
        let bytes = inbox.take(written.generation, written.len, seq)?;
        self.took(seq);
        // Acknowledged by `settle_inbox`, once the inbox has its next buffer.
        self.attention.fetch_or(INBOX_TAKEN, Ordering::AcqRel);
        Ok(bytes)
    }

    fn take(&self, placed: &Placed, fd: FdNamed) -> Result<Vec<u8>, Unfetched> {
        // Read again, the region may hold the peer's next string: the first read acknowledged
        // this one.
        let seq = placed.seq & SEQ_MASK;
        let fd = fd.map(PeerFd);
        self.untaken(seq)?;
        let fd = fd?;
        let (offset, len) = match (usize::try_from(placed.offset), usize::try_from(placed.len)) {
            (Ok(offset), Ok(len)) if len <= self.max_len => (offset, len),
            _ => return Err(self.refused("a placed byte string", placed.len)),
        };
        let announced = fd
            .kept()
            .map(|fd| RegionView::from_peer_fd(fd, MAX))
            .transpose()
            .map_err(|e| match e {
                e if crate::codec::failed_here(&e) => Unfetched::FailedHere(e),
                e => format!("the peer's shared region was refused: {e}").into(),
            })?;
        let mut incoming = self.incoming.lock();
        let view = announced
            .as_ref()
            .or(incoming.as_ref())
            .ok_or("an out-of-line byte string, but the peer announced no shared region")?;
        // The caller words the error as malformed; its own wording would say so twice.
        let bytes = view.to_vec(offset, len).map_err(|e| match e {
            Error::Malformed(why) => why,
            e => e.to_string(),
        })?;
        // Mapped from now on only with its string read: the peer takes a region this end
        // refused the string of as never taken (it is told "unread"), and goes on naming the
        // one before when it gives its memory back (`Lane::retire_region`).
        if announced.is_some() {
            *incoming = announced;
        }
        self.took(seq);
        self.done_with(seq, 0);
        Ok(bytes)
    }
}

impl Lane {
    /// Why `what`, a string of `len` bytes from the peer, over `max_len`, is refused: over
    /// this end's limit (`Limits::max_message_len`), it is too large; within it, over the
    /// lane's own cap ([`MAX`]) alone, which no sender of ours places over (such a string goes
    /// inline), it is malformed, and is not said to be over a limit set higher.
    #[cold]
    #[inline(never)]
    fn refused(&self, what: &str, len: u64) -> Unfetched {
        match len > self.max_message_len as u64 {
            true => Unfetched::OverLimit {
                len,
                limit: self.max_message_len as u64,
            },
            false => format!("{what} of {len} bytes, over the lane's {} MiB", MAX >> 20).into(),
        }
    }
}

/// The fd an out-of-line reference named (if any), until the lane keeps it. One refused or
/// never looked at is the peer's, and closing it may wait for as long as the peer likes (the
/// last fd of a pipe whose lock it holds, sent in place of a region or to an end that reads no
/// pipes): the closer closes it, off the decoding thread (the guide, "slow closes").
struct PeerFd(Option<OwnedFd>);

impl PeerFd {
    /// The fd, now the lane's to keep or to refuse (as [`RegionView::from_peer_fd`] and
    /// [`InPipe::new`] do, through the closer).
    fn kept(mut self) -> Option<OwnedFd> {
        self.0.take()
    }
}

impl Drop for PeerFd {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            crate::closer::close(fd);
        }
    }
}

#[cold]
fn untrusted_pipe() -> Unfetched {
    "a piped byte string, but this end reads no pipes from its peer: it does not trust it with \
     them (`lend_pages_to_peer`), since a peer can hold its pipe's lock and stall the reader"
        .into()
}
