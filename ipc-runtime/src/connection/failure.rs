//! Why a call got no answer: the body of a failure reply, and how the caller words it.

use serde::{Deserialize, Serialize};

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

    /// The error the caller sees, worded against the caller's own view of the interface.
    pub fn into_error(self, ours: &InterfaceInfo, cmd: u32) -> Error {
        let method = ours.method(cmd).map_or("?", |m| m.name);
        let name = ours.name;
        match self {
            Failure::Panicked(msg) => Error::Remote(format!("{name}::{method} panicked: {msg}")),
            Failure::UnknownCommand(cmd) => {
                Error::Remote(format!("the peer's {name} has no command {cmd} ({method})"))
            }
            Failure::BadRequest(why) => {
                Error::Remote(format!("the peer could not decode {name}::{method}: {why}"))
            }
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
