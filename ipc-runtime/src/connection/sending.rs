//! Waiting to send: a thread whose message finds the socket buffer full reads meanwhile
//! whenever nobody else does, so that two ends each sending the other more than its buffer
//! holds do not wait for each other for good (see the module docs of
//! [`connection`](super)).

use std::os::fd::BorrowedFd;
use std::time::Instant;

use nix::poll::PollFlags;

use super::Shared;
use super::reader::Reader;
use crate::error::{Error, Result};

impl Shared {
    /// Sends a message built in `framed` (see [`Socket::send_framed`]), waiting for room as
    /// long as it takes (or until `deadline`) and reading meanwhile ([`Shared::wait_for_room`]).
    ///
    /// [`Socket::send_framed`]: crate::Socket
    #[inline(always)]
    pub(super) fn send_framed(
        &self,
        framed: &mut [u8],
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
    ) -> Result<()> {
        self.socket
            .send_framed(framed, fds, deadline, &mut |deadline| {
                self.wait_for_room(deadline)
            })
    }

    /// Waits until the socket may have room for a send that found its buffer full, reading
    /// meanwhile: this thread takes the reader role if it is free, and routes what comes as
    /// any reader does, taking nothing for itself (a request is queued for a serving thread,
    /// a reply goes to its caller). If another thread reads, this one waits for room or, when
    /// a message comes, for that reader to take it and let the role go, which it may then
    /// take. It reads what a serving thread would: nothing once the connection has ended, and
    /// nothing past the bounds of the request queue (see the module docs).
    ///
    /// The caller holds the socket's send lock throughout, so whatever the routing has to
    /// send (a failure owed for a call this end could not receive) is queued for a serving
    /// thread rather than sent here.
    #[cold]
    #[inline(never)]
    fn wait_for_room(&self, deadline: Option<Instant>) -> Result<()> {
        loop {
            let mut state = self.state.lock();
            let may_read = state.closed.is_none() && !state.backlog.full();
            let reads = may_read && !state.reading;
            state.reading |= reads;
            let releases = state.releases;
            drop(state);
            let events = match may_read {
                true => PollFlags::POLLOUT | PollFlags::POLLIN,
                false => PollFlags::POLLOUT,
            };
            let ready = self.socket.ready(events, deadline);
            let ready = match ready {
                Ok(ready) => ready,
                Err(e) => {
                    if reads {
                        self.release_reader(&mut self.state.lock());
                    }
                    return Err(e);
                }
            };
            let room =
                ready.intersects(PollFlags::POLLOUT | PollFlags::POLLHUP | PollFlags::POLLERR);
            let message = ready.contains(PollFlags::POLLIN);
            if reads && message {
                self.read_while_sending();
            } else if reads {
                self.release_reader(&mut self.state.lock());
            } else if message && !room {
                // The reader takes it: once it lets the role go, this thread may take it, and
                // polls again. Not if it already has (and maybe taken the role again): the
                // message may be gone, and with it the next wake-up.
                let state = self.state.lock();
                if state.reading && state.releases == releases {
                    drop(self.sleep(state, deadline));
                }
            }
            if room {
                return Ok(());
            }
        }
    }

    /// Receives the message that has come, if it is whole (a large one may take several
    /// tries: its datagrams are kept meanwhile), and routes it; lets the reader role go.
    fn read_while_sending(&self) {
        let mut frame = std::mem::take(&mut self.state.lock().buffer);
        let result = match self.socket.try_recv_into(&mut frame) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::TimedOut), // not whole yet: the route lets the role go
            Err(e) => Err(e),
        };
        let result = self.received(&mut frame, result);
        let (_state, taken) = self.route(self.state.lock(), frame, result, Reader::Sender);
        debug_assert!(taken.is_none(), "a sender takes nothing for itself");
    }
}
