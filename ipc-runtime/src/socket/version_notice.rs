//! When a peer of another wire version is told this side's: between two messages, never
//! inside one.
//!
//! The notice is a datagram of its own, sent by whichever thread or task receives the peer's
//! header, while another may be sending a message of several datagrams (under the send lock,
//! or the async flavour's own, which the receiving side cannot take without waiting). A notice
//! between two of its datagrams would break that message: the peer would report "interrupted
//! by another" instead of the version. So a notice due while such a message is part-way out
//! is owed, and its sender tells it after its last datagram.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::SeqCst};

/// No message of several datagrams is part-way out, and no notice is going out.
const IDLE: u8 = 0;
/// A message of several datagrams is part-way out (or about to start).
const PART_WAY: u8 = 1;
/// As `PART_WAY`, and the notice follows the message's last datagram.
const OWED: u8 = 2;
/// The notice is going out now (one send that never waits).
const TELLING: u8 = 3;

/// Whether, and when, the peer is told this side's wire version (see the module docs).
#[derive(Debug, Default)]
pub(super) struct VersionNotice {
    state: AtomicU8,
    /// The notice was sent or is owed: once a connection is enough.
    given: AtomicBool,
}

impl VersionNotice {
    /// The peer speaks another version: `true` if the caller is to send the notice now, and
    /// call [`VersionNotice::told`] after; `false` if it is owed to the message part-way out,
    /// or was given already.
    pub(super) fn due_now(&self) -> bool {
        if self.given.swap(true, SeqCst) {
            return false;
        }
        loop {
            match self.state.compare_exchange(IDLE, TELLING, SeqCst, SeqCst) {
                Ok(_) => return true,
                // The message's sender tells it (`message_over`); if its last datagram went
                // out meanwhile, the state is `IDLE` again and this goes round.
                Err(PART_WAY) => {
                    if self
                        .state
                        .compare_exchange(PART_WAY, OWED, SeqCst, SeqCst)
                        .is_ok()
                    {
                        return false;
                    }
                }
                // `OWED` and `TELLING` come only from a notice, which `given` allows once.
                Err(_) => return false,
            }
        }
    }

    /// The notice [`VersionNotice::due_now`] allowed has gone out (or failed to).
    pub(super) fn told(&self) {
        self.state.store(IDLE, SeqCst);
    }

    /// A message of several datagrams is about to start going out, or to try its first
    /// datagram again: waits out a notice going out at this moment, then keeps any other
    /// from starting until [`VersionNotice::message_over`]. Sends are serialised, so a state
    /// already part-way is this message's own.
    #[cold]
    #[inline(never)]
    pub(super) fn message_starts(&self) {
        while let Err(TELLING) = self.state.compare_exchange(IDLE, PART_WAY, SeqCst, SeqCst) {
            // Another thread is in one send that never waits: a few microseconds.
            std::thread::yield_now();
        }
    }

    /// The last datagram of the message is out (or its first found no room, and it starts
    /// again later): ends the message (`false`), unless the notice is owed (`true`), which
    /// the caller tells, then calls [`VersionNotice::message_over`].
    /// One step: checked apart, a notice falling due between the check and the end was lost.
    pub(super) fn message_ends(&self) -> bool {
        self.state.compare_exchange(PART_WAY, IDLE, SeqCst, SeqCst) == Err(OWED)
    }

    /// The message is out, or failed before any of it went: `true` if the notice was owed,
    /// for the caller to send. A notice going out now (after a message of one datagram
    /// failed, say) is left alone.
    pub(super) fn message_over(&self) -> bool {
        let ended = self.state.fetch_update(SeqCst, SeqCst, |state| {
            matches!(state, PART_WAY | OWED).then_some(IDLE)
        });
        ended == Ok(OWED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Told at once between messages; owed to a message part-way out, and told at its end;
    /// once only either way.
    #[test]
    fn a_notice_is_told_once_and_never_inside_a_message() {
        let between = VersionNotice::default();
        assert!(between.due_now());
        between.told();
        assert!(!between.due_now(), "a second notice");
        between.message_starts();
        assert!(!between.message_over(), "nothing owed");

        let inside = VersionNotice::default();
        inside.message_starts();
        inside.message_starts(); // its first datagram tried again
        assert!(!inside.due_now(), "a notice inside a message");
        assert!(inside.message_ends(), "owed");
        assert!(inside.message_over(), "the owed notice");
        assert!(!inside.message_ends(), "told");
        assert!(
            !inside.due_now() && !inside.message_over(),
            "a second notice"
        );

        let telling = VersionNotice::default();
        assert!(telling.due_now());
        assert!(
            !telling.message_over(),
            "a message of one datagram failed meanwhile"
        );
        assert_eq!(telling.state.load(SeqCst), TELLING, "the notice going out");
    }
}
