//! The envelope: the 24 bytes the connection puts before every body, inside the transport's
//! payload. The transport never looks at it.
//!
//! | offset | size | field       | meaning                                                  |
//! |-------:|-----:|-------------|----------------------------------------------------------|
//! | 0      | 1    | `kind`      | [`Kind`]: 1 call, 2 oneway, 3 reply, ... 8 shut down     |
//! | 1      | 3    | `lane`      | the blocking flavour's [lane word](super::lane); else 0  |
//! | 4      | 4    | `cmd`       | command id of the method (calls, oneways)                |
//! | 8      | 8    | `cookie`    | matches a reply to its call; 0 for oneways               |
//! | 16     | 4    | `interface` | [`fnv1a`](crate::service::fnv1a) of the interface name   |
//! | 20     | 4    | `signature` | the interface's signature hash                           |
//!
//! All little-endian. Replies echo the call's envelope with another `kind`. The lane word is
//! not part of [`Envelope`]: the blocking connection patches it in with [`set_lane`] and reads
//! it with [`lane`], and whoever ignores it writes zero.

use crate::error::{Error, Result};
use crate::socket::Socket;

/// Length of the envelope in bytes.
pub const LEN: usize = 24;

/// Where the envelope starts in a buffer a message is encoded into: after room for the
/// transport's header, which the socket writes there so that the message goes out from one
/// buffer ([`Socket::send_framed`](crate::Socket::send_framed)).
pub const FRAMED_AT: usize = crate::wire::HEADER_LEN;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A call that waits for a reply.
    Call = 1,
    /// A message that gets no reply.
    Oneway = 2,
    /// The successful reply to a call.
    Reply = 3,
    /// A call could not be answered: the body is a [`Failure`](super::failure::Failure).
    Failure = 4,
    /// Something about the sender's lane: the body is a mailbox address and a token (two
    /// `u64`s, [`announcement`]). An inbox's address: the sender accepts byte strings written
    /// into its memory there. Address 0: whether it reads the peer's pipes (bit 0 of the
    /// token; the bits above count the changes, and the receiver keeps the latest).
    /// Address 1: it gave back its shared region, whose inode number is the token. Address
    /// 2: it accepts at most the token's count of fds in one message. `cmd`, `cookie`,
    /// `interface` and `signature` are zero.
    Announce = 5,
    /// The sender will not serve the receiver and hangs up after this, its last message: the
    /// body is the reason (UTF-8, at most [`REASON_MAX`] bytes), which the receiver's calls
    /// fail with ([`refusal`]). `cmd`, `cookie`, `interface` and `signature` are zero.
    Refusal = 6,
    /// The sender no longer waits for the reply to its call `cookie` (it timed out, or its
    /// future was dropped): the receiver drops the call unrun if it is still queued, stops
    /// its handler if it can (the async flavour drops the handler's future), and sends no
    /// reply. A cookie the receiver does not know (the reply went already: a race, not an
    /// error) is ignored. Cookie 0 cancels nothing: the message only carries its sender's
    /// lane word, the acknowledgement of a placement whose request was dropped unread, which
    /// no reply carries now. No body, no fds (any the receiver finds are dropped); `cmd`,
    /// `interface` and `signature` are zero.
    Cancel = 7,
    /// The sender has shut down (`Connection::shut_down`: a listener's graceful shutdown, a worker
    /// that means to exit) and hangs up after this, its last message: every call of the receiver's
    /// that it ran has been answered before it, and it runs none it has not answered (it read them,
    /// or would have, only to drop them). The receiver's calls still waiting fail with
    /// [`Error::ShutDown`], and so does every later one. No body, no fds (any the receiver finds
    /// are dropped); `cmd`, `cookie`, `interface` and `signature` are zero.
    ShutDown = 8,
}

/// A decoded envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub kind: Kind,
    pub cmd: u32,
    pub cookie: u64,
    pub interface: u32,
    pub signature: u32,
}

impl Envelope {
    /// The envelope of an [`Kind::Announce`] message.
    pub fn announce() -> Envelope {
        Envelope {
            kind: Kind::Announce,
            cmd: 0,
            cookie: 0,
            interface: 0,
            signature: 0,
        }
    }

    /// The envelope of a [`Kind::Cancel`] message for the call `cookie` (0: none).
    pub fn cancel(cookie: u64) -> Envelope {
        Envelope {
            kind: Kind::Cancel,
            cookie,
            ..Envelope::announce()
        }
    }

    /// The envelope of a [`Kind::ShutDown`] message.
    pub fn shut_down() -> Envelope {
        Envelope {
            kind: Kind::ShutDown,
            ..Envelope::announce()
        }
    }

    /// Writes the envelope at the start of `buf`, which must hold at least [`LEN`] bytes.
    pub fn write(&self, buf: &mut [u8]) {
        buf[0] = self.kind as u8;
        buf[1..4].fill(0);
        buf[4..8].copy_from_slice(&self.cmd.to_le_bytes());
        buf[8..16].copy_from_slice(&self.cookie.to_le_bytes());
        buf[16..20].copy_from_slice(&self.interface.to_le_bytes());
        buf[20..24].copy_from_slice(&self.signature.to_le_bytes());
    }

    /// Reads the envelope at the start of a payload.
    pub fn read(payload: &[u8]) -> Result<Envelope> {
        let Some(b) = payload.get(..LEN) else {
            return Err(Error::Malformed(format!(
                "message of {} bytes has no envelope",
                payload.len()
            )));
        };
        let kind = match b[0] {
            1 => Kind::Call,
            2 => Kind::Oneway,
            3 => Kind::Reply,
            4 => Kind::Failure,
            5 => Kind::Announce,
            6 => Kind::Refusal,
            7 => Kind::Cancel,
            8 => Kind::ShutDown,
            k => return Err(Error::Malformed(format!("unknown message kind {k}"))),
        };
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Ok(Envelope {
            kind,
            cmd: u32_at(4),
            cookie: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            interface: u32_at(16),
            signature: u32_at(20),
        })
    }
}

/// Whether `payload` starts with the envelope of a reply (or failure reply) to `cookie`, read
/// without decoding the rest of the envelope.
pub fn is_reply_to(payload: &[u8], cookie: u64) -> bool {
    match payload.get(..LEN) {
        Some(b) => {
            (b[0] == Kind::Reply as u8 || b[0] == Kind::Failure as u8)
                && b[8..16] == cookie.to_le_bytes()
        }
        None => false,
    }
}

/// The kind byte of the envelope at the start of `payload`, if there is a whole envelope.
pub fn kind_byte(payload: &[u8]) -> Option<u8> {
    payload.get(..LEN).map(|b| b[0])
}

/// Writes the lane word (24 bits) into an envelope already written at the start of `buf`.
pub fn set_lane(buf: &mut [u8], word: u32) {
    buf[1..4].copy_from_slice(&word.to_le_bytes()[..3]);
}

/// Writes `cookie` into the envelope at the start of `buf`.
pub fn set_cookie(buf: &mut [u8], cookie: u64) {
    buf[8..16].copy_from_slice(&cookie.to_le_bytes());
}

/// The lane word of the envelope at the start of `payload` (0 if there is none).
pub fn lane(payload: &[u8]) -> u32 {
    match payload.get(1..4) {
        Some(b) => u32::from_le_bytes([b[0], b[1], b[2], 0]),
        None => 0,
    }
}

/// The payload length of an [`Kind::Announce`] message: its envelope, a mailbox address and
/// a token. A side whose `Limits::max_send_len` is below it sends no announcement.
pub const ANNOUNCE_LEN: usize = LEN + 16;

/// The mailbox address and token an [`Kind::Announce`] message carries after its envelope.
pub fn announcement(payload: &[u8]) -> Result<(u64, u64)> {
    match payload.get(LEN..) {
        Some(body) if body.len() == ANNOUNCE_LEN - LEN => Ok((
            u64::from_le_bytes(body[..8].try_into().expect("8 bytes")),
            u64::from_le_bytes(body[8..].try_into().expect("8 bytes")),
        )),
        _ => Err(Error::Malformed(format!(
            "an announcement of {} bytes",
            payload.len()
        ))),
    }
}

/// Writes an [`Kind::Announce`] message of `mailbox` and `token`, with the lane word `lane`,
/// into `payload`: what [`announcement`] reads. For a message built without the codec (the
/// blocking flavour's owed fd limit, sent from within another message's send).
pub fn write_announcement(
    payload: &mut [u8; ANNOUNCE_LEN],
    lane: u32,
    (mailbox, token): (u64, u64),
) {
    Envelope::announce().write(payload);
    set_lane(payload, lane);
    payload[LEN..LEN + 8].copy_from_slice(&mailbox.to_le_bytes());
    payload[LEN + 8..].copy_from_slice(&token.to_le_bytes());
}

/// Sends a [`Kind::ShutDown`] message on `socket` if it can go out at once (the send lock
/// free, room in the socket buffer): it never waits, so it may be sent under any lock.
/// Whether it went out. Its lane word is zero: it acknowledges nothing, as the connection
/// ends with it.
#[cold]
#[inline(never)]
pub fn say_shut_down(socket: &Socket) -> bool {
    let mut framed = [0u8; FRAMED_AT + LEN];
    Envelope::shut_down().write(&mut framed[FRAMED_AT..]);
    matches!(socket.try_send_framed(&mut framed, &[], |_| {}), Ok(true))
}

/// Most bytes of reason a [`Kind::Refusal`] carries: a small datagram, which a socket just
/// accepted has room for.
pub const REASON_MAX: usize = 4096;

/// A [`Kind::Refusal`] message saying `reason` (its first [`REASON_MAX`] bytes, cut between
/// two characters).
#[cold]
#[inline(never)]
pub fn refusal(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(REASON_MAX);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = vec![0u8; LEN + end];
    payload[0] = Kind::Refusal as u8;
    payload[LEN..].copy_from_slice(&reason.as_bytes()[..end]);
    payload
}

/// The error a [`Kind::Refusal`] message ends the connection with: the peer's reason, made
/// printable (it is the peer's text, and may be anything).
#[cold]
#[inline(never)]
pub fn refused(payload: &[u8]) -> Error {
    let reason = String::from_utf8_lossy(payload.get(LEN..).unwrap_or_default());
    Error::Refused(super::trace::printable(&reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let e = Envelope {
            kind: Kind::Failure,
            cmd: 7,
            cookie: u64::MAX,
            interface: 1,
            signature: 2,
        };
        let mut b = [0u8; LEN];
        e.write(&mut b);
        assert_eq!(Envelope::read(&b).unwrap(), e);
        assert!(matches!(
            Envelope::read(&b[..LEN - 1]),
            Err(Error::Malformed(_))
        ));
        set_lane(&mut b, 0x80_1234);
        assert_eq!(
            Envelope::read(&b).unwrap(),
            e,
            "the lane word is not the envelope's"
        );
        assert_eq!(lane(&b), 0x80_1234);
        assert!(is_reply_to(&b, u64::MAX), "a failure reply is a reply");
        assert!(!is_reply_to(&b, 7), "to another cookie");
        assert!(
            !is_reply_to(&b[..LEN - 1], u64::MAX),
            "a short envelope is none"
        );
        assert_eq!(kind_byte(&b), Some(Kind::Failure as u8));
        assert_eq!(kind_byte(&b[..LEN - 1]), None);
        assert_eq!(lane(&b[..2]), 0);
        let mut c = [0u8; LEN];
        let cancel = Envelope {
            kind: Kind::Cancel,
            cookie: 5,
            ..Envelope::announce()
        };
        cancel.write(&mut c);
        let cancel = Envelope::read(&c).unwrap();
        assert_eq!(
            (cancel.kind, cancel.cookie, cancel.cmd),
            (Kind::Cancel, 5, 0)
        );
        Envelope::shut_down().write(&mut c);
        let shut_down = Envelope::read(&c).unwrap();
        assert_eq!((shut_down.kind, shut_down.cookie), (Kind::ShutDown, 0));
        b[0] = 9;
        assert!(matches!(Envelope::read(&b), Err(Error::Malformed(_))));
    }

    /// A refusal carries its reason, cut between two characters, and the receiver's error
    /// shows it escaped.
    #[test]
    fn a_refusal_says_why_escaped_and_cut() {
        let message = refusal("not you\x1b[2J");
        assert_eq!(Envelope::read(&message).unwrap().kind, Kind::Refusal);
        match refused(&message) {
            Error::Refused(why) => assert_eq!(why, "not you\\u{1b}[2J"),
            other => panic!("{other:?}"),
        }
        let long = "é".repeat(REASON_MAX);
        let message = refusal(&long);
        assert_eq!(message.len(), LEN + REASON_MAX);
        assert!(std::str::from_utf8(&message[LEN..]).is_ok());
    }
}
