//! `TYPED_IPC_DEBUG=1`: one line on stderr per message sent or received, for both flavours.

use std::cell::Cell;
use std::io::Write;
use std::os::fd::AsFd;

use serde::Serialize;

use super::describe::describe;
use super::envelope::{self, Envelope};
use super::failure::Failure;
use crate::frame::Frame;
use crate::service::InterfaceInfo;

/// Whether the environment asks for tracing; read once per connection.
pub(crate) fn enabled() -> bool {
    std::env::var_os("TYPED_IPC_DEBUG").is_some_and(|v| v != "0")
}

/// Writes one line to stderr in one `write`, so the lines of two processes sharing a terminal
/// do not interleave. Inside [`without_waiting_for_stderr`], without stderr's lock.
pub(crate) fn line(text: &str) {
    let text = format!("{text}\n");
    if WITHOUT_WAITING.get() {
        write_unlocked(text.as_bytes());
        return;
    }
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

thread_local! {
    /// This thread holds what other threads may wait for, so its lines do not wait for
    /// stderr's lock ([`without_waiting_for_stderr`]).
    static WITHOUT_WAITING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread's lines written without stderr's lock: for a thread that holds
/// what a thread holding stderr's lock may wait for (the send lock, while it reads waiting for
/// room; a serving thread, which requests wait for), which the line would then wait for in
/// turn, for good. Such a line may fall between the writes of a `write!` that holds the lock,
/// rather than after it.
pub(crate) fn without_waiting_for_stderr<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            WITHOUT_WAITING.set(self.0);
        }
    }
    let _restore = Restore(WITHOUT_WAITING.replace(true));
    f()
}

/// How a line reaches stderr: see [`line()`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stderr {
    /// Under stderr's lock, once its holder lets it go.
    Locked,
    /// Straight to its fd, as inside [`without_waiting_for_stderr`]: for a line said while
    /// its thread holds what a thread holding stderr's lock may wait for, and every line of
    /// the async flavour (see `AsyncConnection`'s module docs).
    WithoutWaiting,
}

/// [`line()`], written as `stderr` says.
fn say(text: &str, stderr: Stderr) {
    match stderr {
        Stderr::Locked => line(text),
        Stderr::WithoutWaiting => without_waiting_for_stderr(|| line(text)),
    }
}

/// Writes `bytes` to stderr's fd, not taking stderr's lock.
#[cold]
#[inline(never)]
fn write_unlocked(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        match nix::unistd::write(std::io::stderr().as_fd(), bytes) {
            Ok(0) => return,
            Ok(n) => bytes = &bytes[n..],
            Err(nix::Error::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// The most characters of a text from elsewhere (why a message failed) that a line shows.
const SHOWN_CHARS: usize = 1_000;

/// `text`, which may hold what the peer sent (a decoding error may quote it), as a line on
/// stderr may show it: with what a terminal would act on, or what reads other than it is
/// (control characters, bidirectional overrides), escaped as `{:?}` escapes it, and cut
/// short after [`SHOWN_CHARS`] characters, saying how many there were.
#[cold]
#[inline(never)]
pub(crate) fn printable(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars().take(SHOWN_CHARS) {
        match c {
            // Printable, though `escape_debug` escapes them (they delimit its literals).
            '"' | '\'' | '\\' => out.push(c),
            c => out.extend(c.escape_debug()),
        }
    }
    if text.chars().nth(SHOWN_CHARS).is_some() {
        out.push_str(&format!("… ({} chars)", text.chars().count()));
    }
    out
}

/// `value` described for [`outgoing`] or [`reply`] if tracing is `on`, `None` otherwise. Both
/// flavours describe what they send before sending it: the async flavour moves it into the
/// send, and describing runs the value's `Serialize` code, which may itself call, so a caller
/// must not hold the reader role meanwhile.
#[inline]
pub(crate) fn described<T: Serialize + ?Sized>(on: bool, value: &T) -> Option<String> {
    if on {
        return Some(describe_cold(value));
    }
    None
}

/// [`describe`], out of line: only ever run with tracing on.
#[cold]
#[inline(never)]
fn describe_cold<T: Serialize + ?Sized>(value: &T) -> String {
    describe(value)
}

/// A message this process sends, with its arguments (the tuple the generated client sends)
/// as [`described`] wrote them: `-> Call #3 Ipa::reverse("hello")`, written as `stderr`
/// says. Nothing without them (tracing off).
#[inline]
pub(crate) fn outgoing(
    envelope: &Envelope,
    iface: &InterfaceInfo,
    args: Option<&str>,
    stderr: Stderr,
) {
    if let Some(args) = args {
        outgoing_line(envelope, iface, args, stderr);
    }
}

#[cold]
#[inline(never)]
fn outgoing_line(envelope: &Envelope, iface: &InterfaceInfo, args: &str, stderr: Stderr) {
    let method = iface.method(envelope.cmd).map_or("?", |m| m.name);
    // A tuple of arguments reads `(a, b)` and no arguments `()`; anything else is wrapped.
    let (open, close) = if args.starts_with('(') {
        ("", "")
    } else {
        ("(", ")")
    };
    let text = format!(
        "typed-ipc[{}] -> {:?}{} {}::{method}{open}{args}{close}",
        std::process::id(),
        envelope.kind,
        cookie(envelope),
        iface.name
    );
    say(&text, stderr);
}

/// ` #3` for a call or a reply, which the cookie pairs; nothing for a oneway or an
/// announcement, whose cookie is always 0 and says nothing.
fn cookie(envelope: &Envelope) -> String {
    match envelope.kind {
        envelope::Kind::Oneway | envelope::Kind::Announce => String::new(),
        _ => format!(" #{}", envelope.cookie),
    }
}

/// `1 byte`, `2 bytes`.
fn counted(n: usize, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

/// What this end did that ended its connection, for the line [`ended`] says: the reader that
/// reads the end of the stream cannot tell a shutdown of ours from the peer's hang-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum EndedHere {
    /// Nothing: the peer hung up, or an error ended it.
    #[default]
    No,
    /// `close`.
    Closed,
    /// `stop_reading`.
    StoppedReading,
    /// The last handle of the connection was dropped.
    Dropped,
}

impl EndedHere {
    /// Back from `self as u8`, as the async flavour's atomic holds it.
    #[cfg(feature = "tokio")]
    pub(crate) fn from_u8(n: u8) -> EndedHere {
        match n {
            0 => EndedHere::No,
            1 => EndedHere::Closed,
            2 => EndedHere::StoppedReading,
            _ => EndedHere::Dropped,
        }
    }
}

/// The line saying that the connection ended, for [`line()`]: `why`, as every caller still
/// waiting gets it, or what this side did (`here`), which callers see as the peer gone.
/// Printed by the caller once it holds no lock of the connection's and has woken whoever
/// waits: a thread that holds stderr's lock may be waiting for the connection.
#[cold]
#[inline(never)]
pub(crate) fn ended(why: &crate::error::Error, here: EndedHere) -> String {
    let why = match (why, here) {
        (crate::error::Error::Disconnected, EndedHere::Closed) => "closed by this side",
        (crate::error::Error::Disconnected, EndedHere::StoppedReading) => {
            "this side stopped reading"
        }
        (crate::error::Error::Disconnected, EndedHere::Dropped) => {
            "closed by this side: its last handle was dropped"
        }
        (why, _) => &why.to_string(),
    };
    format!("typed-ipc[{}] -- Ended: {why}", std::process::id())
}

/// A reply this process sends, with its value as [`described`] wrote it:
/// `-> Reply #3 "olleh"`, written as `stderr` says. Nothing without it (tracing off).
#[inline]
pub(crate) fn reply(cookie: u64, value: Option<&str>, stderr: Stderr) {
    if let Some(value) = value {
        reply_line(cookie, value, stderr);
    }
}

#[cold]
#[inline(never)]
fn reply_line(cookie: u64, value: &str, stderr: Stderr) {
    let text = format!(
        "typed-ipc[{}] -> Reply #{cookie} {value}",
        std::process::id()
    );
    say(&text, stderr);
}

/// The failure this process answers call `cookie` with: `-> Failure #3: Unanswered("…")`.
/// Why may quote the peer's message (a decoding error may), so it is cut short.
#[cold]
#[inline(never)]
pub(crate) fn failure(cookie: u64, failure: &Failure) {
    line(&format!(
        "typed-ipc[{}] -> Failure #{cookie}: {}",
        std::process::id(),
        printable(&format!("{failure:?}"))
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
    served: impl Iterator<Item = &'i InterfaceInfo>,
) {
    line(&incoming_line(envelope, frame, served));
}

/// The line saying a message this process received, named after the served interface it is
/// for, if any: for [`line()`], which the reader of a reply calls once the reply is routed.
pub(crate) fn incoming_line<'i>(
    envelope: &Envelope,
    frame: &Frame,
    mut served: impl Iterator<Item = &'i InterfaceInfo>,
) -> String {
    let name = served
        .find(|i| i.id == envelope.interface)
        .map_or(String::new(), |i| {
            format!(
                " {}::{}",
                i.name,
                i.method(envelope.cmd).map_or("?", |m| m.name)
            )
        });
    format!(
        "typed-ipc[{}] <- {:?}{}{name} ({}, {})",
        std::process::id(),
        envelope.kind,
        cookie(envelope),
        counted(
            frame.payload.len() - envelope::LEN.min(frame.payload.len()),
            "byte"
        ),
        counted(frame.fds.len(), "fd")
    )
}

#[cfg(test)]
mod tests {
    use super::EndedHere;
    use crate::error::Error;

    #[test]
    fn the_end_says_what_this_side_did_when_the_peer_seems_gone() {
        let said = |why: Error, here| {
            super::ended(&why, here)
                .split_once("] ")
                .unwrap()
                .1
                .to_owned()
        };
        for (here, want) in [
            (EndedHere::No, "peer disconnected"),
            (EndedHere::Closed, "closed by this side"),
            (EndedHere::StoppedReading, "this side stopped reading"),
            (
                EndedHere::Dropped,
                "closed by this side: its last handle was dropped",
            ),
        ] {
            assert_eq!(said(Error::Disconnected, here), format!("-- Ended: {want}"));
        }
        // An error is said as it is, whatever this side did.
        let malformed = Error::Malformed("bad".into());
        let text = format!("-- Ended: {malformed}");
        assert_eq!(said(malformed, EndedHere::StoppedReading), text);
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn what_this_side_did_survives_the_atomic() {
        for here in [
            EndedHere::No,
            EndedHere::Closed,
            EndedHere::StoppedReading,
            EndedHere::Dropped,
        ] {
            assert_eq!(EndedHere::from_u8(here as u8), here);
        }
    }

    #[test]
    fn counts_read_as_words() {
        assert_eq!(super::counted(0, "fd"), "0 fds");
        assert_eq!(super::counted(1, "byte"), "1 byte");
        assert_eq!(super::counted(4096, "byte"), "4096 bytes");
    }
}
