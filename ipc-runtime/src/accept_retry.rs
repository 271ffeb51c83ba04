//! What the accept loops of both flavours ([`Server::listen`](crate::Server::listen) and the
//! async `AsyncServer::listen`) do when accepting fails: which errors are retried and which end
//! accepting, how long to wait between tries, and what stderr is told. Each flavour waits and
//! closes the sockets of the clients that hung up in its own way.

use std::fmt::Display;
use std::io;
use std::time::{Duration, Instant};

use crate::connection::trace;

/// What an accept loop does after accepting failed with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// That client is gone already (`EPROTO`, and `EINTR`, `ECONNABORTED` that the accept
    /// itself retries): try again at once.
    ClientGone,
    /// This process or the system is out of file descriptors (`EMFILE`, `ENFILE`) or memory
    /// (`ENOMEM`, `ENOBUFS`), or a security module refuses (`EPERM`): report, close the
    /// sockets of the clients that hung up, wait ([`Trouble::failed`]) and try again.
    OutOfResources,
    /// Anything else: accepting ends for good (report it with [`stopped`]).
    Fatal,
}

/// How an accept loop treats `error` from `accept`.
pub(crate) fn classify(error: &io::Error) -> Failure {
    match error.raw_os_error() {
        Some(libc::EPROTO | libc::EINTR | libc::ECONNABORTED) => Failure::ClientGone,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPERM) => {
            Failure::OutOfResources
        }
        _ => Failure::Fatal,
    }
}

/// Says on stderr that the listener stopped accepting clients for good, and why.
pub(crate) fn stopped(why: &dyn Display) {
    trace::line(&format!(
        "typed-ipc[{}]: the listener stopped accepting clients: {why}",
        std::process::id()
    ));
}

/// The first wait after accepting failed for want of resources; each failure in a row
/// doubles it, up to [`MAX_BACK_OFF`] (Go's `net/http` waits the same way).
const MIN_BACK_OFF: Duration = Duration::from_millis(5);
/// The longest wait between two tries to accept.
const MAX_BACK_OFF: Duration = Duration::from_secs(1);
/// While accepting keeps failing, at most one line on stderr this often.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// An accept loop's failures in a row: how long to wait before the next try, and what
/// stderr has been told (every failure with `TYPED_IPC_DEBUG=1`, else a line when failures
/// start and at most one every [`REPORT_EVERY`] after that).
pub(crate) struct Trouble {
    /// Failures since a client was last accepted.
    failures: u64,
    /// Failures not yet on stderr.
    unreported: u64,
    /// Whether a failure since the last accepted client is on stderr, so its end is too.
    reported: bool,
    last_report: Option<Instant>,
    back_off: Duration,
    trace: bool,
}

impl Trouble {
    /// No failures yet.
    pub(crate) fn new() -> Trouble {
        Trouble {
            failures: 0,
            unreported: 0,
            reported: false,
            last_report: None,
            back_off: MIN_BACK_OFF,
            trace: trace::enabled(),
        }
    }

    /// Reports the failure `what: why` (or counts it, to report later) and returns how long
    /// to wait before the next try, during which the caller closes the sockets of the clients
    /// that have hung up (else nothing may ever free an fd).
    pub(crate) fn failed(&mut self, what: &str, why: &dyn Display) -> Duration {
        self.report(what, why);
        let wait = self.back_off;
        self.back_off = (wait * 2).min(MAX_BACK_OFF);
        wait
    }

    fn report(&mut self, what: &str, why: &dyn Display) {
        self.failures += 1;
        self.unreported += 1;
        if self.trace || self.last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
            let count = match self.unreported {
                1 => String::new(),
                n => format!(" ({n} failures since the last report)"),
            };
            trace::line(&format!(
                "typed-ipc[{}]: the listener {what}: {why}{count}; retrying",
                std::process::id()
            ));
            self.unreported = 0;
            self.reported = true;
            self.last_report = Some(Instant::now());
        }
    }

    /// A client was accepted: says so on stderr if failures were reported, and starts over.
    pub(crate) fn accepted(&mut self) {
        if self.failures == 0 {
            return;
        }
        if self.reported {
            let failures = match self.failures {
                1 => "1 failure".to_string(),
                n => format!("{n} failures"),
            };
            trace::line(&format!(
                "typed-ipc[{}]: the listener accepts clients again, after {failures}",
                std::process::id()
            ));
            self.unreported = 0;
        }
        self.failures = 0;
        self.reported = false;
        self.back_off = MIN_BACK_OFF;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_waited_for_a_gone_client_is_skipped_anything_else_ends_accepting() {
        let class = |errno| classify(&io::Error::from_raw_os_error(errno));
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EPERM,
        ] {
            assert_eq!(class(errno), Failure::OutOfResources, "errno {errno}");
        }
        for errno in [libc::EPROTO, libc::EINTR, libc::ECONNABORTED] {
            assert_eq!(class(errno), Failure::ClientGone, "errno {errno}");
        }
        for errno in [libc::EINVAL, libc::EBADF, libc::ENOTSOCK] {
            assert_eq!(class(errno), Failure::Fatal, "errno {errno}");
        }
        assert_eq!(classify(&io::Error::other("no errno")), Failure::Fatal);
    }

    #[test]
    fn the_wait_doubles_up_to_a_second_and_starts_over_once_a_client_is_accepted() {
        let mut trouble = Trouble::new();
        let waits: Vec<_> = (0..10).map(|_| trouble.failed("test", &"why")).collect();
        assert_eq!(waits[0], MIN_BACK_OFF);
        assert_eq!(waits[1], MIN_BACK_OFF * 2);
        assert_eq!(waits[9], MAX_BACK_OFF);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        trouble.accepted();
        assert_eq!(trouble.failed("test", &"why"), MIN_BACK_OFF);
    }
}
