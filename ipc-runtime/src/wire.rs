//! The transport's wire header: the one place its layout is defined.
//!
//! A *message* is a payload (bytes) plus a table of file descriptors. On the socket it is one
//! or more `SOCK_SEQPACKET` datagrams. Every datagram starts with this 16-byte header,
//! little-endian:
//!
//! | offset | size | field       | meaning                                                     |
//! |-------:|-----:|-------------|-------------------------------------------------------------|
//! | 0      | 2    | `magic`     | `b"TI"`                                                      |
//! | 2      | 1    | `version`   | [`VERSION`]; a peer with another version is refused          |
//! | 3      | 1    | `kind`      | 1 = first datagram of a message, 2 = continuation            |
//! | 4      | 2    | `fds`       | fds attached to *this* datagram (`SCM_RIGHTS`), ≤ 253        |
//! | 6      | 2    | `reserved`  | zero                                                         |
//! | 8      | 4    | `total_len` | payload bytes of the whole message                           |
//! | 12     | 4    | `total_fds` | fds of the whole message                                     |
//!
//! The payload bytes of the message follow the headers, split across datagrams in order. A
//! message that fits is one datagram (kind 1, all bytes, all fds): one `sendmsg`, one
//! `recvmsg`. A larger one, or one with more than 253 fds, is a first datagram carrying the
//! totals (and at most [`FIRST_MAX`] bytes) followed by continuations; the receiver knows it
//! is complete when it holds `total_len` bytes and `total_fds` fds. The receiver checks the
//! totals against its [`Limits`](crate::Limits) before it allocates anything.
//!
//! The transport knows nothing of commands or cookies: those live in the payload and belong
//! to the layer above.

use crate::error::{Error, Result};

/// Size of the header in bytes.
pub const HEADER_LEN: usize = 16;
/// Version of the wire format this crate speaks, payload conventions included, so that
/// peers built from different releases are refused with [`Error::VersionMismatch`] rather
/// than misreading each other (the end that refuses first sends a bare header of its own
/// version, so the other reports it too). 2: byte strings carry a tag (inline, or placed in
/// the connection's shared region) and the envelope's spare bytes carry the lane word. 3: the
/// lane word also names the placement its message carries. 4: a byte string may also be
/// piped (tag 2: its first bytes in the sender's pipe, the rest inline). 5: a byte string
/// may also be written into the receiver's inbox (tag 3), which the receiver announces in
/// a message of its own (envelope kind 5). 6: a failure reply may say that the request was
/// over the receiver's limits (`Failure::TooLarge`, `Failure::TooManyFds`). 7: an
/// announcement (kind 5) with mailbox 0 says whether its sender reads pipes (token 1 or 0),
/// and an end pipes only to a peer that said it does. 8: an announcement with mailbox 1 says
/// that its sender gave back its shared region (token: the region's inode number), which the
/// receiver unmaps too; with mailbox 0, the token's bits above bit 0 count the changes, and
/// the receiver keeps the latest change, whatever order two announcements arrive in. 9: a
/// refusal (envelope kind 6, its body the reason) is an end's last message before it hangs
/// up, which the receiver reports as `Error::Refused`: a listener's word to a client it turns
/// away at accept. 10: a mismatch reply (`Failure::Mismatch`) lists each method's type shape
/// too (its `MethodInfo::shape`), so that a method whose types alone differ is named. 11: a
/// method's `Option<Vec<u8>>` or `Result<Vec<u8>, E>` carries its bytes as one byte string,
/// as a `Vec<u8>` does, no longer as serde's sequence of `u8`s. 12: a cancel (envelope kind
/// 7, no body) tells the receiver that the sender no longer waits for the reply to its call
/// with that cookie, and the receiver drops that call if it can. 13: an announcement with
/// mailbox 2 says how many fds its sender accepts in one message (the token); an end whose
/// `Limits::max_fds` is neither 0 nor the default sends it as the first message whose lane
/// word says it reads lanes, and the receiver places nothing whose fd would take a message
/// over it. 14: a failure reply over the receiver's limits (`Failure::TooLarge`,
/// `Failure::TooManyFds`) also names the setting it exceeded (a byte after the limit, a
/// [`Limit`](crate::Limit); a number the receiver does not know reads as `Limit::Unknown`).
/// 15: a shut-down notice (envelope kind 8, no body) is an end's last message when it shuts
/// down gracefully (`Connection::shut_down`: a listener's shutdown, a worker about to exit),
/// once every call of the peer's that it ran has been answered: the peer's calls still
/// waiting, and later ones, fail with `Error::ShutDown`.
pub const VERSION: u8 = 15;
const MAGIC: [u8; 2] = *b"TI";
/// Most payload bytes a first datagram may carry: the receiver reads first datagrams into a
/// buffer of this size, so small messages need no allocation.
pub const FIRST_MAX: usize = 64 * 1024;
/// Most payload bytes any datagram may carry (what a 4 MiB `SO_SNDBUF` allows).
pub const DATAGRAM_MAX: usize = 4 * 1024 * 1024;
/// Most fds the kernel accepts in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const FDS_PER_DATAGRAM: usize = 253;

/// Which part of a message a datagram is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The first (often the only) datagram of a message.
    First = 1,
    /// A continuation of the message whose first datagram came before.
    More = 2,
}

/// A decoded datagram header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Which part of a message this datagram is.
    pub kind: Kind,
    /// Fds attached to this datagram.
    pub fds: u16,
    /// Payload bytes of the whole message.
    pub total_len: u32,
    /// Fds of the whole message.
    pub total_fds: u32,
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = VERSION;
        b[3] = self.kind as u8;
        b[4..6].copy_from_slice(&self.fds.to_le_bytes());
        b[8..12].copy_from_slice(&self.total_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.total_fds.to_le_bytes());
        b
    }

    /// Decodes and validates a header; `len` is how many header bytes actually arrived.
    #[inline]
    pub fn decode(b: &[u8; HEADER_LEN], len: usize) -> Result<Header> {
        if len < HEADER_LEN {
            return Err(Error::Malformed(format!(
                "datagram of {len} bytes has no complete header"
            )));
        }
        if b[0..2] != MAGIC {
            return Err(Error::Malformed(format!(
                "bad magic {:02x}{:02x}",
                b[0], b[1]
            )));
        }
        if b[2] != VERSION {
            return Err(Error::VersionMismatch {
                ours: VERSION,
                theirs: b[2],
            });
        }
        let kind = match b[3] {
            1 => Kind::First,
            2 => Kind::More,
            k => return Err(Error::Malformed(format!("unknown datagram kind {k}"))),
        };
        if b[6..8] != [0, 0] {
            return Err(Error::Malformed(
                "reserved header bytes are not zero".into(),
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Ok(Header {
            kind,
            fds: u16::from_le_bytes([b[4], b[5]]),
            total_len: u32_at(8),
            total_fds: u32_at(12),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let h = Header {
            kind: Kind::More,
            fds: 253,
            total_len: 0xdead_beef,
            total_fds: 300,
        };
        assert_eq!(Header::decode(&h.encode(), HEADER_LEN).unwrap(), h);
    }

    #[test]
    fn rejects_garbage() {
        let good = Header {
            kind: Kind::First,
            fds: 0,
            total_len: 1,
            total_fds: 0,
        }
        .encode();
        assert!(matches!(Header::decode(&good, 3), Err(Error::Malformed(_))));
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            Header::decode(&b, HEADER_LEN),
            Err(Error::Malformed(_))
        ));
        let mut b = good;
        // Another version whatever this one is.
        let other = VERSION.wrapping_add(1);
        b[2] = other;
        assert!(matches!(
            Header::decode(&b, HEADER_LEN),
            Err(Error::VersionMismatch {
                ours: VERSION,
                theirs,
            }) if theirs == other
        ));
        let mut b = good;
        b[3] = 7;
        assert!(matches!(
            Header::decode(&b, HEADER_LEN),
            Err(Error::Malformed(_))
        ));
        let mut b = good;
        b[7] = 1;
        assert!(matches!(
            Header::decode(&b, HEADER_LEN),
            Err(Error::Malformed(_))
        ));
    }
}
