//! `TYPED_IPC_DEBUG=1`: one line on stderr per message sent or received, for both flavours.

use std::io::Write;

use serde::Serialize;

pub(crate) use super::describe::describe;
use super::envelope::{self, Envelope};
use crate::frame::Frame;
use crate::service::InterfaceInfo;

/// Whether the environment asks for tracing; read once per connection.
pub(crate) fn enabled() -> bool {
    std::env::var_os("TYPED_IPC_DEBUG").is_some_and(|v| v != "0")
}

/// Writes one line to stderr in one `write`, so the lines of two processes sharing a terminal
/// do not interleave.
pub(crate) fn line(text: &str) {
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("{text}\n").as_bytes());
}

/// A message this process sends, with its arguments (the tuple the generated client sends)
/// as [`describe`] wrote them: `-> Call #3 Ipa::reverse("hello")`. The arguments are
/// described before the message is sent, and before a caller takes the reader role:
/// describing runs their `Serialize` code, which may itself call.
pub(crate) fn outgoing(envelope: &Envelope, iface: &InterfaceInfo, args: &str) {
    let method = iface.method(envelope.cmd).map_or("?", |m| m.name);
    // A tuple of arguments reads `(a, b)` and no arguments `()`; anything else is wrapped.
    let (open, close) = if args.starts_with('(') {
        ("", "")
    } else {
        ("(", ")")
    };
    line(&format!(
        "typed-ipc[{}] -> {:?} #{} {}::{method}{open}{args}{close}",
        std::process::id(),
        envelope.kind,
        envelope.cookie,
        iface.name
    ));
}

/// A reply this process sends, with its value: `-> Reply #3 "olleh"`.
#[cold]
#[inline(never)]
pub(crate) fn reply<T: Serialize + ?Sized>(cookie: u64, value: &T) {
    reply_described(cookie, &describe(value));
}

/// [`reply`] with its value described already (the async flavour describes it before the
/// value is moved into the send).
pub(crate) fn reply_described(cookie: u64, value: &str) {
    line(&format!(
        "typed-ipc[{}] -> Reply #{cookie} {value}",
        std::process::id()
    ));
}

/// This process announced its inbox: it accepts byte strings written into its memory.
pub(crate) fn announce() {
    line(&format!(
        "typed-ipc[{}] -> Announce (accepts byte strings written into its memory)",
        std::process::id()
    ));
}

/// A message this process received, named after the served interface it is for, if any.
pub(crate) fn incoming<'i>(
    envelope: &Envelope,
    frame: &Frame,
    mut served: impl Iterator<Item = &'i InterfaceInfo>,
) {
    let name = served
        .find(|i| i.id == envelope.interface)
        .map_or(String::new(), |i| {
            format!(
                " {}::{}",
                i.name,
                i.method(envelope.cmd).map_or("?", |m| m.name)
            )
        });
    line(&format!(
        "typed-ipc[{}] <- {:?} #{}{name} ({} bytes, {} fds)",
        std::process::id(),
        envelope.kind,
        envelope.cookie,
        frame.payload.len() - envelope::LEN.min(frame.payload.len()),
        frame.fds.len()
    ));
}
