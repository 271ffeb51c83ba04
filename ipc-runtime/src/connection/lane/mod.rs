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
//! - A byte string of [`MIN`] (1 KiB) to [`MAX`] (32 MiB) bytes is *placed* in the sender's
//!   region, at offset 0, when the lane is idle and the peer has said that it reads lanes; it
//!   is then a [`Placed`] reference on the wire (the codec's tag 1), carrying the region's fd
//!   the first time. At most one string per message is placed; everything else stays inline.
//! - Every message's envelope carries a *lane word* (bytes 1..4): bit 23 says "I read lanes",
//!   bits 11..21 the sequence number of the placement this message carries (0: none), bits
//!   0..10 that of the last placement this end is done with, and bit 22 that it was done
//!   with that one *unread*. A peer that leaves the word zero is never sent a placement.
//!   An end whose limits allow no fds (`Limits::max_fds` 0) leaves bit 23 clear: its socket
//!   would refuse every message carrying the region's or the pipe's fd, so it is sent
//!   strings inline, or written into its memory if it announced an inbox (no fd needed);
//!   its acknowledgements (bits 0..10, 22) count all the same. What it sends is another
//!   limit (`Limits::send_fds`): one that accepts no fd but sends some still places and
//!   pipes its own strings, if the peer reads lanes. An end that accepts fds, but not the
//!   default 1,024, tells the peer how many in an announcement with mailbox
//!   [`MAX_FDS_MAILBOX`], the first message whose lane word sets bit 23; a string whose
//!   placement's fd would take its message over that (or over what this end sends) goes
//!   inline.
//!   Both flavours (this connection and the async one) keep a `Lane` and speak this
//!   protocol.
//! - An end is done with a placement once it has copied it out, or once it is done with the
//!   message that carried it without having read it (a reply whose caller gave up, a request
//!   whose handler never decoded its arguments): the carried sequence number in the
//!   envelope is what lets it say so without decoding the body. A placement done with unread
//!   is treated by its sender as never sent: if its message announced the region, the
//!   region's fd was closed unread, so the next placement announces it again. Sequence
//!   numbers run from 1 to 2047 and wrap, and placements never sent use numbers too; with
//!   one placement in flight at a time, the latest is the one in flight. A new placement
//!   never takes a number the peer may still be reporting (the last it said it was done
//!   with, or one whose request it refused, which it finishes after its failure reply):
//!   its stale acknowledgement would give back the new one unread. Once copied out,
//!   a placement is not read again: a second decode of its message (`Call::args` called
//!   twice, a decode nested in a decode) is refused, as the peer may have placed its next
//!   string over it by then ([`Lane::taken`]); a message carrying the same number makes it
//!   readable again (2,047 placements later).
//! - A placement keeps the lane busy until the peer's lane word acknowledges it, or until a
//!   failure reply to the call that carried it arrives (the request may never have been
//!   decoded, so a region it announced is announced again), or the message carrying it
//!   turns out never to have been sent (an error, or an async send cancelled before its
//!   first datagram); and in any case until that message is out (or given up), as it names
//!   the region's fd by number. While it is busy, byte strings go inline: nobody waits, and
//!   nothing deadlocks. A peer that never acknowledges (a oneway stream it never answers, a
//!   hostile peer) costs speed, not correctness.
//! - The region is replaced (announced anew, and the peer maps the new one instead) by a
//!   larger one when a string does not fit, and by a smaller one when a string of a quarter
//!   of its size or less is placed [`SHRINK_AFTER`] or more after the last larger one: so a
//!   burst of large strings does not keep its pages for the rest of the connection, and
//!   sizes that swing cost one new region per period at most. An idle lane's region can also
//!   be given back at once (`release_shared_memory`): an announcement with mailbox
//!   [`RETIRED_MAILBOX`] and the inode number of the last region whose announcing placement
//!   the peer read (an older one, if this one's went unread) tells the peer to unmap it,
//!   if it is the one it maps (an async end may send it after a newer region's placement).
//! - On a connection that lends its pages to its (trusted) peer, once that peer has said it
//!   trusts this end too (an announcement with mailbox [`PIPES_MAILBOX`]: it reads pipes
//!   only then, since a pipe's holder can stall its reader), a call's [`SharedBytes`] of
//!   [`PIPE_MIN`] to 1 MiB are *piped* instead (the codec's tag 2): `vmsplice`d into this
//!   end's pipe ([`crate::pipe`]), which the receiver copies them out of, one copy instead of
//!   two. Same sequence numbers, acknowledgement and busy lane; in addition the lane keeps a
//!   clone of the bytes until the acknowledgement (the receiver reads the sender's own
//!   pages), and a placement given back unread is emptied out of the pipe before the lane is
//!   idle again, so the next one starts at the front.
//! - On a connection given the peer's memory ([`PeerMemory`]), once the peer has announced
//!   an inbox, byte strings of [`peer_memory::MIN`] (256 KiB) to [`peer_memory::CAPACITY`]
//!   (1 MiB) are *written* into the peer's inbox buffer instead (the codec's tag 3;
//!   [`crate::peer_memory`]), one copy. Same sequence numbers, acknowledgement and busy
//!   lane; the receiver acknowledges only once its inbox names a new buffer
//!   ([`Lane::settle_inbox`]), so the sender never finds a buffer the receiver has handed
//!   over. Only while one copy costs less than the region's two on this machine, as
//!   measured now ([`crate::one_copy`]); otherwise the region.

mod out_of_line;
mod outgoing;
#[cfg(test)]
mod tests;

use parking_lot::{Mutex, MutexGuard};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use serde::Serialize;

use super::envelope::{self, Envelope, Kind};
use crate::codec;
use crate::error::Result;
use crate::frame::{DEFAULT_MAX_FDS, Frame};
use crate::peer_memory::{Inbox, PeerMemory};
use crate::pipe::{self, InPipe};
use crate::shared_region::RegionView;
#[cfg(doc)]
use crate::{codec::Placed, peer_memory, shared_bytes::SharedBytes, shared_region::SharedRegion};
use outgoing::Outgoing;
#[cfg(doc)]
use outgoing::{Announcement, SHRINK_AFTER};

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

pub(super) const READS_LANES: u32 = 1 << 23;
/// The mailbox address of an announcement that says whether its sender reads this end's pipes
/// (no inbox lies at address 0).
const PIPES_MAILBOX: u64 = 0;
/// The mailbox address of an announcement that says its sender gave back its region, whose
/// inode number is the token (no inbox lies at address 1 either): the peer unmaps it too,
/// if it is the one it maps. By inode, not by order: an async end may send the announcement
/// from a task, after a placement that announced a new region.
const RETIRED_MAILBOX: u64 = 1;
/// The mailbox address of an announcement that says how many fds its sender accepts in one
/// message (the token), sent by an end whose limit is not the default a peer assumes
/// ([`DEFAULT_MAX_FDS`]) as the first message in which it says it reads lanes: the peer
/// then places no string whose message would carry more fds than that with the region's or
/// the pipe's.
const MAX_FDS_MAILBOX: u64 = 2;
/// In [`Lane::attention`]: a string was taken out of the inbox and its placement is not
/// acknowledged yet; the inbox needs a new buffer first ([`Lane::settle_inbox`]).
const INBOX_TAKEN: u8 = 1;
/// In [`Lane::attention`]: the blocking end owes the peer the announcement of its fd limit
/// ([`MAX_FDS_MAILBOX`]), which found no room in the socket as the connection started. The
/// next message this end sends tries again first, under its send lock
/// ([`Lane::acknowledge_in_telling`]).
const TELL_OWED: u8 = 2;
/// Bits of a sequence number in the lane word.
const SEQ_BITS: u32 = 11;
const SEQ_MASK: u32 = (1 << SEQ_BITS) - 1;
/// In the lane word: the placement acknowledged was done with unread.
const UNREAD: u32 = 1 << 22;
/// Words of [`Lane::taken`]: a bit for every sequence number.
const TAKEN_WORDS: usize = (SEQ_MASK as usize + 1) / 64;
/// In [`Lane::busy`], above the token: the message that carries the placement may still be on
/// its way out ([`Lane::sent`] clears it).
const SENDING: u64 = 1 << 32;
/// In [`Lane::busy`]: the peer said it read the placement; once its message is sent too, the
/// lane is idle, and the next [`Lane::idle_out`] finishes the release ([`Lane::release`]).
const ACKED: u64 = 1 << 33;
/// In [`Lane::busy`]: the placement piped bytes that the lane keeps a clone of until the
/// acknowledgement, which lets go of them at once.
const PINNED: u64 = 1 << 34;

/// What [`Lane::retire_region`] gave back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Retired {
    /// The size of this end's region (0: it had none).
    pub(crate) len: usize,
    /// The announcement that tells the peer to unmap the region of this end's it maps
    /// (`None`: it maps none).
    pub(crate) announcement: Option<(u64, u64)>,
    /// The size of the region the peer maps, if that is an older one than this end's (which
    /// it never took), or this end had none.
    pub(crate) older: Option<usize>,
}

/// One connection's lane: its outgoing region and its view of the peer's.
pub(crate) struct Lane {
    out: Mutex<Outgoing>,
    /// The latest placement: its token ([`Outgoing::start`]; low 32 bits, 0: none) and its
    /// state ([`SENDING`], [`ACKED`], [`PINNED`]). The lane is busy with it until its
    /// message is sent (or given up) *and* the peer has acknowledged it or it was given
    /// back: only then may the region be replaced or given back. A message names the
    /// region's fd by its number, borrowed from the lane, and a peer may acknowledge a
    /// placement before its message is out (a hostile one, guessing its number): the number
    /// closed, the next file this process opened would take it, and the message would carry
    /// that file to the peer. One word, so that the send and the acknowledgement each cost
    /// one atomic read-modify-write and no lock (some 8 ns each on these VMs).
    busy: AtomicU64,
    /// The last placement of ours the peer's lane words said it was done with: the next
    /// placement never takes this number, so an old acknowledgement can never pass for
    /// its (after 2,047 placements that were never sent, the numbers would come round).
    peer_done: AtomicU32,
    /// The peer's lane words say it reads lanes.
    peer_reads: AtomicBool,
    /// Bit 0: this end trusts the peer with its pipes both ways ([`Lane::lend_pages`]): it
    /// may lend the peer its pages, and it reads the pipes the peer lends it. Above: how many
    /// times that changed. The word is the token of the announcement that tells the peer.
    lends: AtomicU64,
    /// The token of the latest announcement ([`PIPES_MAILBOX`]) in which the peer said
    /// whether it reads this end's pipes (bit 0): only then does this end pipe, since the
    /// peer refuses pipes from a peer it does not trust. Latest by the count of changes it
    /// carries, not by arrival: two announcements may arrive in the other order (sent by two
    /// threads, or one from a task that another overtook).
    peer_takes_pipes: AtomicU64,
    /// The peer's region, as last announced.
    incoming: Mutex<Option<RegionView>>,
    /// The peer's pipe, as last announced.
    incoming_pipe: Mutex<Option<InPipe>>,
    /// The peer's inbox mailbox and its token, as announced. A lock of its own, held only to
    /// copy them: a reader that takes in an announcement must never wait for a write into
    /// the peer (which holds `out`, and could be slow).
    peer_mailbox: Mutex<Option<(u64, u64)>>,
    /// The sequence number of the last placement of the peer's this end is done with, with
    /// [`UNREAD`] if it was not read, and [`READS_LANES`] if this end reads lanes (fixed,
    /// kept here so that [`Lane::acknowledge_in`] costs no other load).
    consumed: AtomicU32,
    /// How many of the peer's messages that carry a placement have been taken in (wrapping),
    /// which [`Lane::on_message`] stamps into each (see [`Lane::finished`]). Written by the
    /// connection's reader alone (one thread or task at a time, handing the role over under
    /// a lock): a load and a store, not an atomic read-modify-write (~8 ns on these VMs).
    arrivals: AtomicU32,
    /// One bit per sequence number: a decode has taken the peer's placement of that number
    /// since a message carrying it last came in. A message decoded again (a handler calling
    /// `Call::args` twice) must not take its string again: the first decode acknowledged it,
    /// so the peer may have placed its next string over it, or piped it behind it.
    taken: [AtomicU64; TAKEN_WORDS],
    /// Largest string accepted from the peer out of line: this end's limit
    /// (`max_message_len`), or the lane's own cap, [`MAX`], if that is smaller. Not its
    /// region's bound: a region may be larger than the strings this end accepts (at least
    /// 64 KiB, grown for the largest string the peer sent, even one refused here), and
    /// refusing it would fail every later string with it. Regions of up to [`MAX`] are
    /// accepted; only the bytes of a string (at most `max_len`) are ever read from one.
    max_len: usize,
    /// This end's `Limits::max_message_len`, as set: a string over `max_len` is refused as
    /// over it (`TooLarge`) only if it is over this too; one within it is over the lane's
    /// cap alone, which no sender of ours places (such a string goes inline): malformed.
    max_message_len: usize,
    /// Largest string this end sends out of line (`Limits::send_len`); one over it goes
    /// inline, where the socket refuses its message unsent (`TooLarge`).
    max_send_len: usize,
    /// Largest sealed buffer or region view a decode on this connection accepts
    /// (`Limits::max_shared_len`): the codec asks the store it decodes with
    /// ([`OutOfLine::max_shared_len`](crate::codec::OutOfLine::max_shared_len)).
    max_shared_len: usize,
    /// Most fds a message this end sends may carry (`Limits::send_fds`; the peer's
    /// [`Lane::peer_max_fds`] bounds it too): the region's and
    /// the pipe's travel so, and a message carrying one over this would be refused unsent
    /// (`TooManyFds`) although its sender passed no more fds than it may send. With none,
    /// strings go inline (or into the peer's memory, which needs no fd); a message whose own
    /// fds leave no room for the lane's is encoded again with its string inline
    /// ([`Lane::encode`]). Whether this end reads the peer's lanes is `max_fds`'s alone
    /// ([`READS_LANES`] in `consumed`): an end may send fds and accept none.
    max_send_fds: usize,
    /// Most fds a message this end accepts (`Limits::max_fds`), which it tells the peer if
    /// that is not the default ([`Lane::telling_max_fds`]).
    max_fds: usize,
    /// Most fds a message the peer accepts: the default until the peer says otherwise, which
    /// it does before its lane words say it reads lanes ([`MAX_FDS_MAILBOX`]). A placement
    /// whose fd would take a message over it gives way to the string inline, as one over
    /// `max_send_fds` does.
    peer_max_fds: AtomicUsize,
    /// Where the peer writes strings into this process, once this end accepts that.
    inbox: Mutex<Option<Inbox>>,
    /// What the next acknowledgement must see to first, rarely anything: [`INBOX_TAKEN`],
    /// [`TELL_OWED`]. One byte, so that a message's stamp tests both with one load.
    attention: AtomicU8,
}

impl Lane {
    /// A lane that accepts strings of at most `max_len` bytes from the peer, and sends none
    /// larger out of line; through its region or pipe only if a message may carry an fd
    /// (`max_fds`, this end's limits, unless [`Lane::with_max_send_fds`] says otherwise).
    /// For the same reason it tells the peer that it reads lanes only if the messages it
    /// accepts may carry an fd: the one a placement announces.
    pub(crate) fn new(max_len: usize, max_fds: usize) -> Lane {
        Lane {
            out: Mutex::new(Outgoing::default()),
            busy: AtomicU64::new(0),
            peer_done: AtomicU32::new(0),
            peer_reads: AtomicBool::new(false),
            lends: AtomicU64::new(0),
            peer_takes_pipes: AtomicU64::new(0),
            incoming: Mutex::new(None),
            incoming_pipe: Mutex::new(None),
            peer_mailbox: Mutex::new(None),
            consumed: AtomicU32::new(if max_fds > 0 { READS_LANES } else { 0 }),
            arrivals: AtomicU32::new(0),
            taken: [const { AtomicU64::new(0) }; TAKEN_WORDS],
            max_len: max_len.min(MAX),
            max_message_len: max_len,
            max_send_len: max_len.min(MAX),
            max_send_fds: max_fds,
            max_fds,
            peer_max_fds: AtomicUsize::new(DEFAULT_MAX_FDS),
            inbox: Mutex::new(None),
            attention: AtomicU8::new(0),
            max_shared_len: crate::Limits::default().max_shared_len,
        }
    }

    /// This lane, with decodes on it accepting sealed buffers and region views of at most
    /// `max_shared_len` bytes.
    pub(crate) fn with_max_shared_len(self, max_shared_len: usize) -> Lane {
        Lane {
            max_shared_len,
            ..self
        }
    }

    /// This lane, sending its region's or pipe's fd if this end sends up to `max_send_fds`
    /// fds a message rather than the `max_fds` it accepts
    /// ([`Limits::send_fds`](crate::Limits::send_fds)). What it tells the peer it reads
    /// stays `max_fds`'s: a peer that sent this end an fd out of line would have its message
    /// refused.
    pub(crate) fn with_max_send_fds(self, max_send_fds: usize) -> Lane {
        Lane {
            max_send_fds,
            ..self
        }
    }

    /// This lane, sending strings of at most `max_send_len` bytes out of line rather than the
    /// `max_len` it accepts ([`Limits::send_len`](crate::Limits::send_len)).
    pub(crate) fn with_max_send_len(self, max_send_len: usize) -> Lane {
        Lane {
            max_send_len: max_send_len.min(MAX),
            ..self
        }
    }

    /// This lane, if the peer cannot assume how many fds this end accepts (its `max_fds` is
    /// neither 0, when it reads no lanes, nor the default), saying that it reads lanes only
    /// once it has told the peer, which the connection does as it starts (the blocking one, if
    /// the socket is full then, before the next message it sends: [`Lane::owe_max_fds`]): a
    /// message carrying as many fds as this end accepts beside a string whose placement
    /// announces the region would be refused with the region's fd. Without the announcement
    /// (no room for it under `Limits::max_send_len`) the peer sends this end every string
    /// inline.
    pub(crate) fn telling_max_fds(self) -> Lane {
        match self.tells_max_fds() {
            true => Lane {
                consumed: AtomicU32::new(0),
                ..self
            },
            false => self,
        }
    }

    /// Whether this end tells the peer how many fds it accepts ([`Lane::telling_max_fds`]).
    pub(crate) fn tells_max_fds(&self) -> bool {
        self.max_fds != 0 && self.max_fds != DEFAULT_MAX_FDS
    }

    /// The announcement that tells the peer how many fds this end accepts, made under the
    /// send lock of the message carrying it: this end says it reads lanes from that message
    /// on, so the peer knows the limit before it places anything. The async flavour's; the
    /// blocking one owes it instead ([`Lane::owe_max_fds`]).
    #[cfg(feature = "tokio")]
    pub(crate) fn max_fds_announcement(&self) -> (u64, u64) {
        self.consumed.fetch_or(READS_LANES, Ordering::AcqRel);
        (MAX_FDS_MAILBOX, self.max_fds as u64)
    }

    /// `announcement` did not go out: if it told this end's fd limit, this end no longer says
    /// it reads lanes (until a later try makes the announcement again), lest a message of its
    /// own say so first and the peer place strings whose fd this end refuses. Called under
    /// the send lock the announcement was made under where the caller still holds it (an
    /// async task's send that failed has let it go: the peer is gone, as a rule).
    #[cfg(feature = "tokio")]
    pub(crate) fn announcement_unsent(&self, (mailbox, _): (u64, u64)) {
        if mailbox == MAX_FDS_MAILBOX && self.tells_max_fds() {
            self.consumed.fetch_and(!READS_LANES, Ordering::AcqRel);
        }
    }

    /// This end owes the peer the announcement of how many fds it accepts (the blocking
    /// flavour, as its connection starts, on a lane [`Lane::telling_max_fds`]): the next
    /// message this end sends tries to send it first, under the same send lock
    /// ([`Lane::acknowledge_in_telling`]), and this end says it reads lanes once it went out.
    /// So the announcement never waits for room (`Connection::new` must not, on a socket
    /// used before whose peer does not read), yet goes before any message saying that this
    /// end reads lanes, however many threads send: they stamp their words one at a time,
    /// under the send lock.
    pub(crate) fn owe_max_fds(&self) {
        self.attention.fetch_or(TELL_OWED, Ordering::AcqRel);
    }

    /// Sends the announcement this end owes ([`Lane::owe_max_fds`]) through `tell`, which
    /// gets it framed (see [`envelope::FRAMED_AT`]) and says whether it went out; called
    /// under the send lock. If it went, this end says that it reads lanes from now on.
    /// Out of line: owed, if ever, until the first message after the connection starts.
    #[cold]
    #[inline(never)]
    pub(crate) fn tell_owed(&self, tell: impl FnOnce(&mut [u8]) -> bool) {
        let mut framed = [0; envelope::FRAMED_AT + envelope::ANNOUNCE_LEN];
        let payload = framed.last_chunk_mut().expect("ANNOUNCE_LEN bytes");
        // Its acknowledgement too, as any message's (`acknowledge_in`).
        let word = self.consumed.load(Ordering::Acquire) | READS_LANES;
        envelope::write_announcement(payload, word, (MAX_FDS_MAILBOX, self.max_fds as u64));
        if tell(&mut framed) {
            // Only the send lock's holder reads or changes `TELL_OWED`, as here.
            self.consumed.fetch_or(READS_LANES, Ordering::AcqRel);
            self.attention.fetch_and(!TELL_OWED, Ordering::AcqRel);
        } // else still owed: the next message tries again
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

    /// The peer announced its inbox: written into from now on, if this end may write it. Or,
    /// with [`PIPES_MAILBOX`], whether it reads this end's pipes (bit 0 of `token`), kept if it
    /// is the latest change (the count above); or, with [`RETIRED_MAILBOX`], that it gave back
    /// its region; or, with [`MAX_FDS_MAILBOX`], how many fds it accepts (taken in already
    /// with the lane word of its message, [`Lane::peer_reads_from`]).
    pub(crate) fn on_announce(&self, mailbox: u64, token: u64) {
        match mailbox {
            PIPES_MAILBOX => {
                self.peer_takes_pipes.fetch_max(token, Ordering::Relaxed);
            }
            RETIRED_MAILBOX => self.unmap_retired(token),
            MAX_FDS_MAILBOX => self.peer_accepts_fds(token),
            _ => *self.peer_mailbox.lock() = Some((mailbox, token)),
        }
    }

    /// The peer accepts at most `max_fds` fds in a message.
    fn peer_accepts_fds(&self, max_fds: u64) {
        let max_fds = usize::try_from(max_fds).unwrap_or(usize::MAX);
        self.peer_max_fds.store(max_fds, Ordering::Relaxed);
    }

    /// The peer gave back its region whose inode number is `inode`: unmapped here too, if it
    /// is the one mapped, so that its pages go back to the kernel. The peer's next placement
    /// announces a new region.
    #[cold]
    fn unmap_retired(&self, inode: u64) {
        let mut incoming = self.incoming.lock();
        if incoming.as_ref().and_then(|view| inode_of(view.as_fd())) == Some(inode) {
            let view = incoming.take();
            drop(incoming);
            drop(view); // not under the lock: unmapping 32 MiB takes milliseconds
        }
    }

    /// Gives back this end's region, unless a string in it is still in flight (the peer has
    /// not copied it out), and tells the peer to unmap the region of this end's it maps
    /// ([`Retired`]). That may be an older region than this one, which this end dropped when
    /// it made this one: if the message that announced this one went unread, the peer never
    /// took it; if this one could not be made, this end has none. `None` if there is nothing
    /// to give back at either end, or the lane is busy.
    pub(crate) fn retire_region(&self) -> Option<Retired> {
        let mut out = self.idle_out()?;
        let (region, mapped) = out.take_region();
        drop(out);
        if region.is_none() && mapped.is_none() {
            return None;
        }
        let current = region.as_ref().and_then(|r| inode_of(r.as_fd()));
        Some(Retired {
            len: region.map_or(0, |r| r.len()),
            announcement: mapped.map(|(inode, _)| (RETIRED_MAILBOX, inode)),
            older: mapped
                .filter(|&(inode, _)| Some(inode) != current)
                .map(|(_, len)| len),
        })
    }

    /// Whether this end trusts the peer with pipes (`Connection::lend_pages_to_peer`), both
    /// ways: calls may pipe their large byte strings (once the peer trusts this end too), and
    /// the peer's pipes are read. Lending lets the peer read this process's own pages and keep
    /// references to them (`tee`), to read whatever the process stores there later; reading
    /// the peer's pipe lets the peer hold the pipe's lock (a `splice` into it that sleeps) and
    /// so keep the reading thread waiting, uninterruptibly, for as long as it likes. So only
    /// with a trusted peer. Returns the announcement that tells the peer, if this changed.
    pub(crate) fn lend_pages(&self, lend: bool) -> Option<(u64, u64)> {
        let lend = u64::from(lend);
        // One more change, to `lend`.
        let next = |word: u64| ((word >> 1) + 1) << 1 | lend;
        let changed = self
            .lends
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                (word & 1 != lend).then(|| next(word))
            });
        changed.ok().map(|word| (PIPES_MAILBOX, next(word)))
    }

    /// Whether this end trusts the peer with pipes ([`Lane::lend_pages`]).
    #[inline]
    fn lends(&self, order: Ordering) -> bool {
        self.lends.load(order) & 1 != 0
    }

    /// The announcement that tells the peer whether this end reads its pipes now (the async
    /// flavour makes it under its send lock).
    #[cfg(feature = "tokio")]
    pub(crate) fn pipes_announcement(&self) -> (u64, u64) {
        (PIPES_MAILBOX, self.lends.load(Ordering::Acquire))
    }

    /// The outgoing side, if the lane is idle and nobody else is placing: the one place a
    /// placement starts. Only a placement makes the lane busy, and only under `out`'s lock,
    /// so a lane idle here stays idle until [`Outgoing::start`]: no compare-and-swap needed
    /// (an atomic read-modify-write costs ~7 ns on these VMs). A placement acknowledged
    /// since the last one started is released here first.
    #[inline]
    fn idle_out(&self) -> Option<MutexGuard<'_, Outgoing>> {
        let mut out = self.out.try_lock()?;
        let busy = self.busy.load(Ordering::Acquire);
        if !idle(busy) {
            return None;
        }
        if busy != 0 {
            self.finish_release(&mut out, busy as u32);
        }
        Some(out)
    }

    /// What the peer's acknowledgement of placement `token` freed ([`Lane::release`]), once
    /// its message is sent: the region its message announced is the one the peer maps (a
    /// stale [`Announcement::by`] left behind only matters to an `abort` of the same
    /// placement, which would announce the fd once more: harmless). Under `out`, with the lane
    /// idle: nothing else changes `busy` then.
    #[inline(never)]
    fn finish_release(&self, out: &mut Outgoing, token: u32) {
        out.unpin(token, false); // if this came before the acknowledgement's own unpin
        out.read(token);
        self.busy.store(0, Ordering::Release);
    }

    /// The next placement ([`Outgoing::start`]): the lane is busy with it, as on its way out,
    /// until its message is sent or given up ([`Lane::sent`]). `pinned`: the lane keeps a
    /// clone of its bytes until the peer acknowledges it.
    #[inline]
    fn start(&self, out: &mut Outgoing, pinned: bool) -> u32 {
        let token = out.start(&self.peer_done);
        let pinned = if pinned { PINNED } else { 0 };
        self.busy
            .store(u64::from(token) | SENDING | pinned, Ordering::Release);
        token
    }

    /// The message that carried placement `placed` (its token; 0: none) is out, or will never
    /// go out whole (its send failed, or was given up before any of it went): it no longer
    /// names the region's fd ([`SENDING`]). Every message [`Lane::encode`] returned a
    /// placement for must come here once. (That is the latest placement: none starts while
    /// its message may be on its way out.)
    #[inline]
    pub(crate) fn sent(&self, placed: u32) {
        if placed != 0 {
            self.placement_sent();
        }
    }

    /// The message that carried placement `placed` (0: none) will never be sent: given back
    /// ([`Lane::abort`]), and its send over ([`Lane::sent`]).
    pub(crate) fn never_sent(&self, placed: u32) {
        self.abort(placed);
        self.sent(placed);
    }

    /// [`Lane::sent`] for a message that carried a placement (out of line: a small one
    /// carries none).
    #[inline(never)]
    fn placement_sent(&self) {
        self.busy.fetch_and(!SENDING, Ordering::AcqRel);
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

    /// This end has taken in a pipe the peer lent it.
    #[cfg(all(test, feature = "tokio"))]
    pub(crate) fn reads_a_pipe(&self) -> bool {
        self.incoming_pipe.lock().is_some()
    }

    /// The peer said it reads this end's pipes (its latest word).
    #[inline]
    pub(crate) fn peer_takes_pipes(&self) -> bool {
        self.peer_takes_pipes.load(Ordering::Relaxed) & 1 != 0
    }

    /// A placement of this end's is in flight.
    #[cfg(test)]
    pub(crate) fn is_busy(&self) -> bool {
        !idle(self.busy.load(Ordering::Acquire))
    }

    /// The peer acknowledged this end's latest placement (its message may still be on its
    /// way out).
    #[cfg(test)]
    pub(crate) fn is_acknowledged(&self) -> bool {
        self.busy.load(Ordering::Acquire) & ACKED != 0
    }

    /// The lane word for an outgoing envelope that carries placement `placed` (0: none), as
    /// [`Lane::acknowledge_in`] writes it.
    #[cfg(test)]
    pub(crate) fn word(&self, placed: u32) -> u32 {
        self.settle_inbox_if_taken();
        // `consumed` holds `READS_LANES` too, if this end reads lanes.
        placed << SEQ_BITS | self.consumed.load(Ordering::Acquire)
    }

    /// [`Lane::acknowledge_in_telling`] for an end that never owes the announcement of its
    /// fd limit: the async flavour's, which sends it from a task instead.
    #[cfg(any(test, feature = "tokio"))]
    #[inline]
    pub(crate) fn acknowledge_in(&self, payload: &mut [u8]) {
        self.acknowledge_in_telling(payload, |_| false);
    }

    /// Writes this end's acknowledgement into the lane word of the encoded message whose
    /// payload (envelope first) is `payload`, keeping the placement it carries. Called under
    /// the socket's send lock, before any of the message goes out (again if it goes out
    /// later after all), so that lane words leave in the order they were read: a word read
    /// before the peer is done with a placement, sent after one read since, would tell the
    /// peer that this end is done with an older one than it is, and the peer's next
    /// placement could take the newer one's number ([`Outgoing::start`]), which this end
    /// still reports. However many threads send, the peer then sees this end's
    /// acknowledgements in the order they were made.
    ///
    /// If this end owes the peer the announcement of its fd limit ([`Lane::owe_max_fds`]),
    /// `tell` is handed it first ([`Lane::tell_owed`]): sent, it goes out before this
    /// message, whose word then says that this end reads lanes.
    #[inline]
    pub(crate) fn acknowledge_in_telling(
        &self,
        payload: &mut [u8],
        tell: impl FnOnce(&mut [u8]) -> bool,
    ) {
        if self.attention.load(Ordering::Acquire) != 0 {
            return self.acknowledge_in_attending(payload, tell);
        }
        self.write_word(payload);
    }

    /// [`Lane::acknowledge_in_telling`] when something needs seeing to first
    /// ([`Lane::attention`]): the inbox's next buffer, before the acknowledgement of the
    /// string taken out of it; the announcement this end owes, before this message. Out of
    /// line, so that the small message's path pays one load and one branch for both.
    #[cold]
    #[inline(never)]
    fn acknowledge_in_attending(&self, payload: &mut [u8], tell: impl FnOnce(&mut [u8]) -> bool) {
        self.settle_inbox_if_taken();
        if self.attention.load(Ordering::Acquire) & TELL_OWED != 0 {
            self.tell_owed(tell);
        }
        self.write_word(payload);
    }

    /// Writes this end's acknowledgement into the lane word of `payload`
    /// ([`Lane::acknowledge_in_telling`]).
    #[inline(always)]
    fn write_word(&self, payload: &mut [u8]) {
        // The word is bytes 1..4: one load and one store of the first four, which keep the
        // kind (byte 0) and the placement carried.
        let Some(head) = payload.first_chunk_mut::<4>() else {
            return;
        };
        let kept = u32::from_le_bytes(*head) & (0xff | (SEQ_MASK << SEQ_BITS) << 8);
        // `consumed` holds `READS_LANES` too, if this end reads lanes.
        let acknowledged = self.consumed.load(Ordering::Acquire) << 8;
        *head = (kept | acknowledged).to_le_bytes();
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
        if self.attention.load(Ordering::Acquire) & INBOX_TAKEN != 0 {
            self.settle_inbox();
        }
    }

    /// [`Lane::settle_inbox_if_taken`]'s work, when a string was taken.
    #[cold]
    fn settle_inbox(&self) {
        let mut inbox = self.inbox.lock();
        if let Some(seq) = inbox.as_mut().and_then(Inbox::renew_taken) {
            self.attention.fetch_and(!INBOX_TAKEN, Ordering::AcqRel);
            self.record_done(seq, 0, None);
        }
    }

    /// This end is done with the message whose payload (envelope first) is `payload`, taken
    /// in by [`Lane::on_message`]: if it carried a placement, the peer may reuse the region,
    /// whether or not it was read.
    ///
    /// Only while no other message carrying a placement has come in since this one (the
    /// stamp `on_message` left in its lane word is still the count): the peer places one
    /// string at a time, so a later placement means this one was acknowledged already (read,
    /// when it was decoded), and its number, which wraps after 2,047, may now be a newer
    /// placement's, in flight and not yet read, which this must not give back. (The stamp
    /// keeps 11 bits of the count: a message finished a multiple of 2,048 placements late
    /// that also carried the number of the one in flight would still pass for it.)
    pub(crate) fn finished(&self, payload: &[u8]) {
        let word = envelope::lane(payload);
        let carried = word >> SEQ_BITS & SEQ_MASK;
        if carried == 0 {
            return;
        }
        self.settle_inbox_if_taken(); // its acknowledgement comes first
        self.record_done(carried, UNREAD, Some(word & SEQ_MASK));
    }

    /// Whether the message whose payload (envelope first) is `payload` carries a placement
    /// of the peer's: done with it unread ([`Lane::finished`]) without a reply to carry the
    /// acknowledgement, this end owes the peer a message that does (a call dropped on the
    /// peer's cancel).
    #[inline]
    pub(crate) fn carries_placement(payload: &[u8]) -> bool {
        envelope::lane(payload) >> SEQ_BITS & SEQ_MASK != 0
    }

    /// Records placement `seq` as done with (`how`: 0 read, or [`UNREAD`]), unless it already
    /// is.
    fn done_with(&self, seq: u32, how: u32) {
        if seq == 0 {
            return;
        }
        self.settle_inbox_if_taken(); // its acknowledgement comes first
        self.record_done(seq, how, None);
    }

    /// Records placement `seq` as done with (`how`), unless it already is; with a `stamp`
    /// ([`Lane::finished`]), only if no placement-carrying message came in since the one
    /// stamped so. The count is read afresh for each try of the compare-and-swap, after the
    /// acknowledgement it swaps: one that came in after that read is a placement the peer
    /// made once this end had acknowledged the one before (it places one at a time), so
    /// either the acknowledgement read is `seq`'s and nothing is swapped, or one taken since
    /// changed it, and the swap fails and reads again. Or the peer made it after a failure
    /// reply to the call that carried `seq`, which acknowledges nothing: its next number
    /// then skips `seq` ([`Outgoing::start`] skips the one given back on a failure), so the
    /// swap gives back nothing in flight. Only some 2,046 placements of the peer's that were
    /// never sent, all while this thread stands between the read and the swap, could bring
    /// the number round (as with the stamp's 11 bits, [`Lane::finished`]).
    ///
    /// Any other number is the peer's latest placement, whatever its distance from the last
    /// one recorded: a read is of the one placement in flight (a message decoded again takes
    /// nothing, [`Lane::taken`]), an inbox's deferred acknowledgement comes before the next
    /// ([`Lane::settle_inbox_if_taken`]), and a message finished out of order fails its
    /// stamp. The peer's numbers are not consecutive: placements whose messages never went
    /// out (an encode that failed, a send that timed out) use up numbers too, so a rule that
    /// took a number half a lap ahead (1,024) for an older one would leave the placement
    /// after that many unacknowledged, and the peer's lane busy for good.
    fn record_done(&self, seq: u32, how: u32, stamp: Option<u32>) {
        let _ = self
            .consumed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                let latest =
                    stamp.is_none_or(|s| self.arrivals.load(Ordering::Acquire) & SEQ_MASK == s);
                let reads = last & READS_LANES;
                (latest && seq != last & SEQ_MASK).then_some(seq | how | reads)
            });
    }

    /// Takes in the lane word of a message the peer sent, whose payload (envelope first) is
    /// `payload`; if it carries a placement, stamps it for [`Lane::finished`]: the count of
    /// such messages taken in (11 bits of it) replaces the acknowledgement the word carried,
    /// which is taken in by then.
    #[inline]
    pub(crate) fn on_message(&self, payload: &mut [u8]) {
        let word = envelope::lane(payload);
        self.on_word(word, payload);
        let carried = word >> SEQ_BITS & SEQ_MASK;
        if carried != 0 {
            self.stamp(payload, word);
        }
    }

    /// [`Lane::on_message`] for a message that carries a placement (out of line: small
    /// messages carry none).
    #[inline(never)]
    fn stamp(&self, payload: &mut [u8], word: u32) {
        self.arrived(word >> SEQ_BITS & SEQ_MASK);
        // The reader's alone to write ([`Lane::arrivals`]).
        let count = self.arrivals.load(Ordering::Relaxed).wrapping_add(1);
        self.arrivals.store(count, Ordering::Release);
        let stamp = count & SEQ_MASK;
        envelope::set_lane(payload, word & !SEQ_MASK | stamp);
    }

    /// A message carrying the peer's placement `seq` came in: its string is there to take,
    /// once ([`Lane::taken`]). A load and a store, not an atomic read-modify-write: see
    /// [`Lane::took`].
    fn arrived(&self, seq: u32) {
        let (word, bit) = taken_bit(seq);
        let taken = &self.taken[word];
        taken.store(taken.load(Ordering::Relaxed) & !bit, Ordering::Relaxed);
    }

    /// Refuses the peer's placement `seq` if a decode took it since the message carrying
    /// it came in: the message is being decoded again. (Decodes of one message run on one
    /// thread, one after the other; the reader hands messages over under a lock.)
    fn untaken(&self, seq: u32) -> std::result::Result<(), codec::Unfetched> {
        let (word, bit) = taken_bit(seq);
        match self.taken[word].load(Ordering::Relaxed) & bit {
            0 => Ok(()),
            _ => Err(taken_already(seq)),
        }
    }

    /// A decode took the peer's placement `seq`. A load and a store, not an atomic
    /// read-modify-write (~8 ns each on these VMs): the bits are written by the reader, as
    /// a placement arrives, and by the one decode that takes it, never both at once while
    /// the peer keeps to one placement in flight. The take comes before its
    /// acknowledgement, and the peer places its next string only once it has that. A peer
    /// that breaks the protocol can only lose itself an update: a message of its refused as
    /// taken already, or one decoded twice taking its string twice, which the peer could
    /// have changed under it anyway.
    fn took(&self, seq: u32) {
        let (word, bit) = taken_bit(seq);
        let taken = &self.taken[word];
        taken.store(taken.load(Ordering::Relaxed) | bit, Ordering::Relaxed);
    }

    /// Takes in the lane word of an envelope the peer sent, in the message `payload`. Its
    /// acknowledgement counts even if the peer does not read lanes: one whose limits allow
    /// no fds takes strings written into its memory all the same (a peer that ignores lanes
    /// acknowledges nothing).
    #[inline(always)]
    fn on_word(&self, word: u32, payload: &[u8]) {
        if word & READS_LANES != 0 && !self.peer_reads.load(Ordering::Relaxed) {
            self.peer_reads_from(payload);
        }
        let seq = word & SEQ_MASK;
        if seq == 0 {
            return;
        }
        if self.peer_done.load(Ordering::Relaxed) != seq {
            self.peer_done.store(seq, Ordering::Relaxed);
        }
        let token = in_flight(self.busy.load(Ordering::Acquire));
        if token & SEQ_MASK != seq {
            return; // nothing in flight, or an acknowledgement seen before
        }
        match word & UNREAD {
            0 => self.release(token),
            _ => self.abort(token),
        }
    }

    /// The peer read placement `token`: once its message is sent, the lane is idle again,
    /// and a region its message announced is the one the peer maps
    /// ([`Lane::finish_release`], when the next placement starts). One read-modify-write and
    /// no lock; only bytes it piped are let go of at once (they are the caller's, and may
    /// change now).
    fn release(&self, token: u32) {
        let acked = self
            .busy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |busy| {
                (in_flight(busy) == token).then_some(busy | ACKED)
            });
        if let Ok(busy) = acked
            && busy & PINNED != 0
        {
            self.unpin_acked(token);
        }
    }

    /// Lets go of the bytes acknowledged placement `token` piped, unless the next placement
    /// already did ([`Lane::finish_release`]).
    #[cold]
    fn unpin_acked(&self, token: u32) {
        let acked = |busy: u64| busy as u32 == token && busy & ACKED != 0;
        self.while_busy(acked, |out| out.unpin(token, false));
    }

    /// The peer will never read placement `token` (as [`Lane::encode`] returned it): its
    /// message was not sent, or was refused unread. If it announced the region, the peer
    /// never took the fd, so the next placement announces it again. Placement 0 (none) is
    /// ignored, and so is a placement the lane is no longer busy with (acknowledged or given
    /// back meanwhile: nothing left to do).
    pub(crate) fn abort(&self, token: u32) {
        if token == 0 {
            return;
        }
        self.while_busy_with(token, |out| self.abort_locked(out, token));
    }

    /// Runs `f` with the outgoing side if placement `token` is in flight (not acknowledged,
    /// nor given back), holding `out` all the while: no other placement starts until `f`
    /// is done. Once it is no longer in flight there is nothing left to do.
    fn while_busy_with(&self, token: u32, f: impl FnOnce(&mut Outgoing)) {
        self.while_busy(|busy| in_flight(busy) == token, f);
    }

    /// Runs `f` with the outgoing side if `busy` holds for the lane's word, holding `out`.
    /// Never waits for a write into the peer, which holds `out` (and could be slow): such a
    /// write starts only on an idle lane, which is no longer busy as `busy` says (the
    /// placement it starts takes the word), and while `busy` holds another thread holds `out`
    /// only briefly. So neither the connection's reader nor a caller whose reply has arrived
    /// waits for another caller's write. The word may change meanwhile without `out` (the
    /// send over, an acknowledgement), but only a holder of `out` starts or finishes a
    /// placement.
    fn while_busy(&self, busy: impl Fn(u64) -> bool, f: impl FnOnce(&mut Outgoing)) {
        while busy(self.busy.load(Ordering::Acquire)) {
            let Some(mut out) = self.out.try_lock() else {
                std::thread::yield_now();
                continue;
            };
            if busy(self.busy.load(Ordering::Acquire)) {
                f(&mut out);
            }
            return;
        }
    }

    /// Gives back placement `seq`, in flight. An acknowledgement that comes in meanwhile
    /// (only from a peer that breaks the protocol) finds it gone, or leaves it acknowledged
    /// after all: either is harmless, as the placement is given back under `out` already.
    fn abort_locked(&self, out: &mut Outgoing, seq: u32) {
        out.region_sent.unread(seq);
        out.pipe_sent.unread(seq);
        // Emptied before the lane is idle again (and under `out`, which a new placement
        // needs), so the next string cannot land behind these bytes.
        out.unpin(seq, true);
        // Busy still, while its message may be on its way out.
        let _ = self
            .busy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |busy| {
                (in_flight(busy) == seq).then_some(busy & SENDING)
            });
    }

    /// Encodes a message into the emptied `buf`: room for the transport's header (see
    /// [`envelope::FRAMED_AT`]), `envelope` with this lane's word, then `body`, placing a byte
    /// string in this lane if it can. Returns the token of the placement the message carries
    /// (0: none); the caller sends the message, calls [`Lane::abort`] with it if it fails
    /// to, and [`Lane::sent`] once the send is over either way. Only a call's
    /// [`SharedBytes`] may pipe.
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
        // Encoded again, inline, by the same call of the encoder with a store that places
        // nothing, if a placement's fd finds no room: a second call of the encoder for `A`
        // would cost the small call's path, though it never runs there (measured: 55
        // instructions a call, each side).
        let mut store: &(dyn codec::OutOfLine + 'static) = self;
        loop {
            let (placed, encoded) = codec::encode_placing(body, buf, fds, store, pipe);
            // The acknowledgement goes in under the send lock ([`Lane::acknowledge_in`]).
            let placed = match placed {
                0 => 0,
                seq => match self.carried_if_room(buf, fds, seq, encoded.is_ok()) {
                    Some(token) => token,
                    None => {
                        store = &Inline;
                        continue;
                    }
                },
            };
            return match encoded {
                Ok(()) => Ok(placed),
                Err(e) => {
                    self.never_sent(placed);
                    Err(e)
                }
            };
        }
    }

    /// The first lane word that says the peer reads lanes came in `payload`. If that message
    /// is the peer's announcement of how many fds it accepts ([`MAX_FDS_MAILBOX`]), which it
    /// sends as its first such message, the limit is taken in before anything is placed.
    #[cold]
    #[inline(never)]
    fn peer_reads_from(&self, payload: &[u8]) {
        if envelope::kind_byte(payload) == Some(Kind::Announce as u8)
            && let Ok((MAX_FDS_MAILBOX, max_fds)) = envelope::announcement(payload)
        {
            self.peer_accepts_fds(max_fds);
        }
        // Released: a placement that sees it sees the limit too.
        self.peer_reads.store(true, Ordering::Release);
    }

    /// [`Lane::carried`] placement `seq` in the message encoded into `buf`, if the message
    /// has room for the fds it carries (`encoded`: its encode went well). If not, the region's
    /// or pipe's fd did not fit beside the message's own (placed before them, the string
    /// could not know how many would follow; the room is what this end sends and the peer
    /// accepts, whichever is less): the placement is given back and the message
    /// emptied to its envelope, for [`Lane::encode`] to encode again with every string
    /// inline; it then goes out after all, or, with more fds of its own than this end sends,
    /// is refused with their count rather than one more. Out of line: a small call places
    /// nothing.
    #[inline(never)]
    fn carried_if_room(
        &self,
        buf: &mut Vec<u8>,
        fds: &mut Vec<BorrowedFd<'_>>,
        seq: u32,
        encoded: bool,
    ) -> Option<u32> {
        let room = (self.max_send_fds).min(self.peer_max_fds.load(Ordering::Relaxed));
        if encoded && fds.len() > room {
            self.never_sent(self.token_of(seq));
            buf.truncate(envelope::FRAMED_AT + envelope::LEN);
            fds.clear();
            return None;
        }
        Some(self.carried(&mut buf[envelope::FRAMED_AT..], seq))
    }

    /// [`Lane::token_of`] placement `seq`, which the message being encoded, whose payload
    /// (envelope first) is `payload`, carries: its lane word says so. Only called from
    /// [`Lane::carried_if_room`], out of line already.
    fn carried(&self, payload: &mut [u8], seq: u32) -> u32 {
        envelope::set_lane(payload, seq << SEQ_BITS);
        self.token_of(seq)
    }

    /// The token of placement `seq`, which a message being encoded carries: the lane stays
    /// busy with it until the message is sent, unless a peer acknowledged a placement it has
    /// not been sent (then a token that matches nothing, and the lane is no longer this
    /// message's to give back; [`Lane::sent`] still ends its [`SENDING`]).
    fn token_of(&self, seq: u32) -> u32 {
        let token = in_flight(self.busy.load(Ordering::Acquire));
        if token != 0 && token & SEQ_MASK == seq {
            token
        } else {
            !SEQ_MASK
        }
    }

    /// The reply to a call that carried placement `placed` (its token) arrived. A failure
    /// reply may mean the request was refused unread: the peer will neither read nor
    /// acknowledge the placement, nor have taken a region it announced, so it is given back
    /// as unsent.
    pub(crate) fn after_reply(&self, placed: u32, reply: &Frame) {
        if placed != 0 && envelope::kind_byte(&reply.payload) == Some(Kind::Failure as u8) {
            self.failed(placed);
        }
    }

    /// [`Lane::after_reply`]'s giving back, remembering the placement's number: the peer
    /// finishes a request it refused after its failure reply has gone out, so it may say it
    /// is done with this number in a later message ([`Outgoing::start`] skips it).
    #[cold]
    fn failed(&self, token: u32) {
        self.while_busy_with(token, |out| {
            out.failed = token & SEQ_MASK;
            self.abort_locked(out, token);
        });
    }
}

/// Whether the lane is idle with `busy` as its word ([`Lane::busy`]): no placement, or the
/// latest one acknowledged and its message sent.
fn idle(busy: u64) -> bool {
    busy == 0 || busy & (SENDING | ACKED) == ACKED
}

/// The token of the placement in flight with `busy` as the lane's word ([`Lane::busy`]): not
/// acknowledged nor given back (0: none).
fn in_flight(busy: u64) -> u32 {
    match busy & ACKED {
        0 => busy as u32,
        _ => 0,
    }
}

/// Where sequence number `seq` is in [`Lane::taken`]: its word and its bit there.
fn taken_bit(seq: u32) -> (usize, u64) {
    let seq = (seq & SEQ_MASK) as usize;
    (seq / 64, 1 << (seq % 64))
}

/// Why a second decode of a message gets no out-of-line string: the first took it.
#[cold]
fn taken_already(seq: u32) -> codec::Unfetched {
    format!(
        "its large byte string (placement {seq}) was taken already: the message was decoded \
         before, and such a string is taken out of the peer's shared memory once, as an fd is \
         (decode a message once)"
    )
    .into()
}

/// The inode number of the memfd `fd`, which names a region to its peer; `None` if `fstat`
/// fails, which it does not on an open fd.
fn inode_of(fd: BorrowedFd<'_>) -> Option<u64> {
    nix::sys::stat::fstat(fd).ok().map(|stat| stat.st_ino)
}

/// A store that places nothing: [`Lane::encode`]'s second encode of a message whose
/// placement's fd found no room.
struct Inline;

impl codec::OutOfLine for Inline {
    fn put(&self, _bytes: &[u8]) -> Option<codec::Placement> {
        None
    }
    fn take(
        &self,
        _placed: &codec::Placed,
        _fd: codec::FdNamed,
    ) -> std::result::Result<Vec<u8>, codec::Unfetched> {
        Err("placed bytes, but this store places nothing".into())
    }
}
