//! Why a call got no answer: the body of a failure reply, and how the caller words it.

use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use super::envelope::Envelope;
use super::trace;
use crate::error::Error;
use crate::service::InterfaceInfo;

/// Sent instead of a reply when a call could not be answered.
#[derive(Debug, Serialize, Deserialize)]
pub enum Failure {
    /// The implementation panicked; the message is the panic's.
    Panicked(String),
    /// The peer serves the interface but has no method with this command id.
    UnknownCommand(u32),
    /// The peer does not serve the interface at all; these are the ones it serves.
    NotServed(Vec<String>),
    /// The peer serves an interface of that name with other methods: its methods as
    /// `(cmd, name, signature)`.
    Mismatch(Vec<(u32, String, String)>),
    /// The request did not decode as the method's arguments.
    BadRequest(String),
    /// The server refused the caller.
    Refused(String),
    /// The method ran but its answer could not be sent (its result could not be encoded, or
    /// was over the limits), or the service sent none.
    Unanswered(String),
}

impl Failure {
    /// The failure for a request whose handler returned `error` without replying: its
    /// arguments did not decode, or its reply could not be sent.
    pub(crate) fn of_handler(error: &Error) -> Failure {
        match error {
            Error::Malformed(_) => Failure::BadRequest(error.to_string()),
            _ => Failure::Unanswered(error.to_string()),
        }
    }

    /// What a request's handler left to answer, from how it ended (`outcome`: returned, or
    /// panicked) and whether it `replied`: `None` if nothing is (it replied, or a oneway
    /// ended well). Both flavours' servers decide with this.
    #[inline]
    pub(crate) fn of_outcome(
        outcome: std::thread::Result<Result<(), Error>>,
        replied: bool,
        oneway: bool,
    ) -> Option<Failure> {
        match (outcome, replied) {
            (_, true) => None,
            (Ok(Ok(())), false) => {
                (!oneway).then(|| Failure::Unanswered("the service sent no reply".into()))
            }
            (Ok(Err(e)), false) => Some(Failure::of_handler(&e)),
            (Err(panic), false) => Some(Failure::Panicked(panic_message(&panic))),
        }
    }

    /// The error the caller sees, worded against the caller's own view of the interface.
    pub fn into_error(self, ours: &InterfaceInfo, cmd: u32) -> Error {
        let method = ours.method(cmd).map_or("?", |m| m.name);
        let name = ours.name;
        match self {
            Failure::Panicked(msg) => Error::Remote(format!("{name}::{method} panicked: {msg}")),
            Failure::UnknownCommand(cmd) => {
                Error::Remote(format!("the peer's {name} has no command {cmd} ({method})"))
            }
            Failure::BadRequest(why) => Error::Remote(format!(
                "the peer could not decode {name}::{method}: {why} (were both ends built from \
                 the same definitions of its types?)"
            )),
            Failure::Refused(why) => Error::Refused(why),
            Failure::Unanswered(why) => Error::Remote(format!(
                "the peer's {name}::{method} could not answer: {why}"
            )),
            Failure::NotServed(served) => Error::InterfaceMismatch(format!(
                "the peer does not serve interface `{name}` (it serves: {})",
                if served.is_empty() {
                    "nothing".to_string()
                } else {
                    served.join(", ")
                }
            )),
            Failure::Mismatch(theirs) => Error::InterfaceMismatch(describe(ours, &theirs)),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Panicked(msg) => write!(f, "it panicked: {msg}"),
            Failure::UnknownCommand(cmd) => write!(f, "this side has no command {cmd}"),
            Failure::NotServed(served) if served.is_empty() => {
                write!(f, "the interface is not served here")
            }
            Failure::NotServed(served) => write!(
                f,
                "the interface is not served here (served: {})",
                served.join(", ")
            ),
            Failure::Mismatch(_) => write!(
                f,
                "the sender's interface differs from this side's (built from another version \
                 of the trait)"
            ),
            Failure::BadRequest(why) => write!(f, "its arguments did not decode: {why}"),
            Failure::Refused(why) => write!(f, "refused: {why}"),
            Failure::Unanswered(why) => write!(f, "{why}"),
        }
    }
}

/// How many failed oneways a process reports on stderr without `TYPED_IPC_DEBUG`: a peer
/// sending bad oneways at message rate must not flood it.
const ONEWAY_REPORTS: u32 = 10;

/// Oneway failures reported so far in this process (without `TYPED_IPC_DEBUG`).
static ONEWAYS_REPORTED: AtomicU32 = AtomicU32::new(0);

/// Says on stderr that a oneway message failed on this side: nobody waits for its outcome,
/// so it would otherwise be lost, naming its method if `served` (the interfaces this side
/// serves) has its interface. Without tracing (`TYPED_IPC_DEBUG`), only the first few of a
/// process are said.
pub(crate) fn oneway_failed<'i>(
    tracing: bool,
    envelope: &Envelope,
    served: impl IntoIterator<Item = &'i InterfaceInfo>,
    failure: &Failure,
) {
    let more = if tracing {
        ""
    } else {
        match ONEWAYS_REPORTED.fetch_add(1, Ordering::Relaxed) {
            n if n < ONEWAY_REPORTS - 1 => "",
            n if n == ONEWAY_REPORTS - 1 => " (later ones are not shown: set TYPED_IPC_DEBUG=1)",
            _ => return,
        }
    };
    let iface = served.into_iter().find(|i| i.id == envelope.interface);
    let method = match iface {
        Some(iface) => match iface.method(envelope.cmd) {
            Some(m) => format!("{}::{}", iface.name, m.name),
            None => format!("{} command {}", iface.name, envelope.cmd),
        },
        None => format!(
            "interface {:#x} command {}",
            envelope.interface, envelope.cmd
        ),
    };
    // Why may quote the peer's message (a decoding error may): escaped and cut short.
    let why = trace::printable(&failure.to_string());
    trace::line(&format!(
        "typed-ipc[{}]: a oneway message {method} failed: {why}{more}",
        std::process::id()
    ));
}

/// Names the methods that differ between our interface and the peer's.
fn describe(ours: &InterfaceInfo, theirs: &[(u32, String, String)]) -> String {
    let mut diffs = Vec::new();
    for m in ours.methods {
        match theirs.iter().find(|(cmd, ..)| *cmd == m.cmd) {
            None => diffs.push(format!(
                "method `{}` (cmd {}) is missing on the peer",
                m.name, m.cmd
            )),
            Some((_, name, sig)) if name != m.name || sig != m.signature => diffs.push(format!(
                "method {} differs: here `{}`, on the peer `{sig}`",
                m.cmd, m.signature
            )),
            Some(_) => {}
        }
    }
    for (cmd, name, _) in theirs {
        if ours.method(*cmd).is_none() {
            diffs.push(format!(
                "the peer has method `{name}` (cmd {cmd}) that this side lacks"
            ));
        }
    }
    if diffs.is_empty() {
        diffs.push("the signature hashes differ".into());
    }
    format!("interface `{}`: {}", ours.name, diffs.join("; "))
}

/// The message a panic carried, if it was a string.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".into(),
    }
}
