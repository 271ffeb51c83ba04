//! `TYPED_IPC_DEBUG=1`: one line on stderr per message sent or received, for both flavours.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

use super::describe::describe;
use super::envelope::{self, Envelope};
use super::failure::Failure;
use crate::error::Error;
use crate::frame::Frame;
use crate::service::InterfaceInfo;
use crate::socket::PeerCredentials;

/// Whether the environment asks for tracing; read once per connection.
pub(crate) fn enabled() -> bool {
    std::env::var_os("TYPED_IPC_DEBUG").is_some_and(|v| v != "0")
}

/// Which connection a line is about, as its lines start: `typed-ipc[1234 c2 peer 5678]`,
/// this process's pid, the connection's number in this process, and the peer's pid where
/// it is known.
///
/// The number tells the connections of one process apart: cookies restart per connection,
/// and two connections may share a peer (a client that connects twice, the two ends of a
/// `Socket::pair`). It is counted per process from 1 and never reused, unlike an fd number.
/// The peer's pid lets a reader match the line with the peer's own lines. The kernel
/// records it (`SO_PEERCRED`) when a client connects to a listener; a socket pair records
/// its creator for both ends, so a pair's pid is shown only where it is another process's
/// (in a worker, the parent that made the pair), and a parent that spawned the worker
/// names the worker's pid instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Name {
    number: u64,
    peer: Option<u32>,
}

/// Connections this process made: the last [`Name`]'s number.
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

impl Name {
    /// The next connection's name: its peer is `worker` if this process spawned it, else
    /// what the kernel recorded (`credentials`; a pid in another pid namespace reads 0).
    /// Made for every connection, traced or not (a failed oneway is said untraced too), so
    /// it costs one atomic add: this process's pid, which `getpid` asks the kernel for, is
    /// left to the lines.
    pub(crate) fn next(worker: Option<u32>, credentials: Option<&PeerCredentials>) -> Name {
        let recorded = credentials
            .and_then(|c| u32::try_from(c.pid).ok())
            .filter(|&pid| pid != 0);
        Name {
            number: CONNECTIONS.fetch_add(1, Ordering::Relaxed) + 1,
            peer: worker.or(recorded),
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pid = std::process::id();
        write!(f, "typed-ipc[{pid} c{}", self.number)?;
        match self.peer {
            // A socket pair's creator, recorded for both its ends: not the peer.
            Some(peer) if peer != pid => write!(f, " peer {peer}]"),
            _ => f.write_str("]"),
        }
    }
}

/// Writes one line to stderr in one `write`, so the lines of two processes sharing a terminal
/// do not interleave; straight to fd 2, never waiting for stderr's lock. A line is said by
/// whichever thread sent or read the message, and that thread may hold what a thread holding
/// stderr's lock waits for: the reader role or a reply others wait for, the send lock, a
/// runtime's worker, a serving thread a callback needs (`writeln!(io::stderr().lock(), "{:?}",
/// client.call())` holds the lock while it calls). Waiting for the lock there hung such
/// programs, and only with tracing on. The price: a line may fall between the pieces of a
/// `write!` to stderr that another thread of this process makes, rather than after it.
///
/// Nor does it wait for room in a pipe or socket that nobody empties (a parent that reads a
/// worker's stderr only once it has exited, say): such a wait held up the calls of a traced
/// process, and their callers, for good. A line that does not fit is left out (or cut short,
/// if longer than the pipe writes at once), and the next line that goes out is preceded by one
/// saying how many were ([`UNPRINTED`]). Lines are still said, where they can be, with no lock
/// of the connection's held and whoever waits woken: a terminal or a file may block.
pub(crate) fn line(text: &str) {
    let unprinted = UNPRINTED.swap(0, Ordering::Relaxed);
    let (said, text) = match unprinted {
        0 => (0, format!("{text}\n")),
        n => unprinted_then(n, text),
    };
    let written = write_unlocked(text.as_bytes());
    if written < text.len() {
        let unsaid = if written < said { unprinted } else { 0 };
        left_out(unsaid, written > 0);
    }
}

/// Lines of this process left out because stderr had no room, not said yet.
static UNPRINTED: AtomicU64 = AtomicU64::new(0);
/// The last line written was cut short: the next starts on a line of its own.
static CUT: AtomicBool = AtomicBool::new(false);

/// Counts a line left out, with the `unprinted` ones its write did not say first; `cut` if
/// part of it went out.
#[cold]
#[inline(never)]
fn left_out(unprinted: u64, cut: bool) {
    UNPRINTED.fetch_add(unprinted + 1, Ordering::Relaxed);
    if cut {
        CUT.store(true, Ordering::Relaxed);
    }
}

/// The line saying that `n` lines were left out, then `text`'s line; and how many bytes
/// the first takes.
#[cold]
#[inline(never)]
fn unprinted_then(n: u64, text: &str) -> (usize, String) {
    let pid = std::process::id();
    let lines = counted(n as usize, "line");
    let start = if CUT.swap(false, Ordering::Relaxed) {
        "\n"
    } else {
        ""
    };
    let said = format!("{start}typed-ipc[{pid}] -- {lines} not printed: stderr was full\n");
    (said.len(), format!("{said}{text}\n"))
}

/// Writes `bytes` to stderr's fd, not taking stderr's lock, and not waiting for room in a
/// pipe or socket: how many of them went out.
fn write_unlocked(bytes: &[u8]) -> usize {
    let stderr = std::io::stderr();
    let mut written = 0;
    while written < bytes.len() {
        match write_now(stderr.as_fd(), &bytes[written..]) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(nix::Error::EINTR) => {}
            Err(_) => break,
        }
    }
    written
}

/// One `write` of `bytes` to `fd` that fails with `EAGAIN` rather than wait for room in a
/// pipe or socket (`pwritev2` with `RWF_NOWAIT`: `O_NONBLOCK` would change the file for every
/// process sharing it). Elsewhere a plain `write`, which may wait: a terminal takes no
/// `RWF_NOWAIT` (`EOPNOTSUPP`), and a file system that does may fail it for a wait on the
/// disk, which is no reason to leave a line out. So does any other failure of `pwritev2`:
/// a sandboxed worker's seccomp filter may refuse it alone, with whatever errno it chose
/// (`EPERM`, say), and a plain `write` fails the same way where the fd is at fault.
fn write_now(fd: BorrowedFd<'_>, bytes: &[u8]) -> nix::Result<usize> {
    let iov = [libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    }];
    // SAFETY: `iov` names `bytes`, which outlive the call and are only read; offset -1 writes
    // at the file's own position, as `write` does.
    let written = unsafe { libc::pwritev2(fd.as_raw_fd(), iov.as_ptr(), 1, -1, libc::RWF_NOWAIT) };
    match nix::Error::result(written) {
        Err(nix::Error::EAGAIN) if !is_pipe_or_socket(fd) => nix::unistd::write(fd, bytes),
        Err(e @ (nix::Error::EAGAIN | nix::Error::EINTR)) => Err(e),
        Err(_) => nix::unistd::write(fd, bytes),
        Ok(n) => Ok(n as usize),
    }
}

/// Whether `fd` is a pipe or a socket, whose lack of room `RWF_NOWAIT` reports.
#[cold]
fn is_pipe_or_socket(fd: BorrowedFd<'_>) -> bool {
    use nix::sys::stat::{SFlag, fstat};
    fstat(fd).is_ok_and(|stat| {
        let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
        kind == SFlag::S_IFIFO || kind == SFlag::S_IFSOCK
    })
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
/// as [`described`] wrote them: `-> Call #3 Ipa::reverse("hello")`. Nothing without them
/// (tracing off).
#[inline]
pub(crate) fn outgoing(
    name: &Name,
    envelope: &Envelope,
    iface: &InterfaceInfo,
    args: Option<&str>,
) {
    if let Some(args) = args {
        outgoing_line(name, envelope, iface, args);
    }
}

#[cold]
#[inline(never)]
fn outgoing_line(name: &Name, envelope: &Envelope, iface: &InterfaceInfo, args: &str) {
    let method = iface.method(envelope.cmd).map_or("?", |m| m.name);
    // A tuple of arguments reads `(a, b)` and no arguments `()`; anything else is wrapped.
    let (open, close) = if args.starts_with('(') {
        ("", "")
    } else {
        ("(", ")")
    };
    line(&format!(
        "{name} -> {:?}{} {}::{method}{open}{args}{close}",
        envelope.kind,
        cookie(envelope),
        iface.name
    ));
}

/// ` #3` for a call or a reply, which the cookie pairs; nothing for a oneway, an
/// announcement, a refusal or a shut-down notice, whose cookie is always 0 and says nothing.
fn cookie(envelope: &Envelope) -> String {
    match envelope.kind {
        envelope::Kind::Oneway
        | envelope::Kind::Announce
        | envelope::Kind::Refusal
        | envelope::Kind::ShutDown => String::new(),
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
    /// This side killed the worker at the other end (`Worker::kill`, a `Killer`, dropping
    /// the `Worker`).
    Killed,
}

impl EndedHere {
    /// Back from `self as u8`, as the async flavour's atomic holds it.
    #[cfg(feature = "tokio")]
    pub(crate) fn from_u8(n: u8) -> EndedHere {
        match n {
            0 => EndedHere::No,
            1 => EndedHere::Closed,
            2 => EndedHere::StoppedReading,
            3 => EndedHere::Dropped,
            _ => EndedHere::Killed,
        }
    }
}

/// The line saying that the connection ended, for [`line()`]: `why`, as every caller still
/// waiting gets it, or what this side did (`here`), which callers see as the peer gone.
/// Printed by the caller once it holds no lock of the connection's and has woken whoever
/// waits: a write to stderr may block.
#[cold]
#[inline(never)]
pub(crate) fn ended(name: &Name, why: &crate::error::Error, here: EndedHere) -> String {
    let why = match (why, here) {
        (crate::error::Error::Disconnected, EndedHere::Closed) => "closed by this side",
        (crate::error::Error::Disconnected, EndedHere::StoppedReading) => {
            "this side stopped reading"
        }
        (crate::error::Error::Disconnected, EndedHere::Dropped) => {
            "closed by this side: its last handle was dropped"
        }
        (crate::error::Error::Disconnected, EndedHere::Killed) => "this side killed the worker",
        (why, _) => &why.to_string(),
    };
    format!("{name} -- Ended: {why}")
}

/// A reply this process sends, with its value as [`described`] wrote it:
/// `-> Reply #3 "olleh"`. Nothing without it (tracing off).
#[inline]
pub(crate) fn reply(name: &Name, cookie: u64, value: Option<&str>) {
    if let Some(value) = value {
        reply_line(name, cookie, value);
    }
}

#[cold]
#[inline(never)]
fn reply_line(name: &Name, cookie: u64, value: &str) {
    line(&format!("{name} -> Reply #{cookie} {value}"));
}

/// A message whose sender gave up with it part-way out, `why` (its future dropped, or timed
/// out): `outgoing`'s line, since the rest goes out from a task and the peer gets it whole,
/// and then why the caller heard otherwise.
#[cfg(feature = "tokio")]
#[cold]
#[inline(never)]
pub(crate) fn finished_in_background(
    name: &Name,
    envelope: &Envelope,
    iface: &InterfaceInfo,
    args: &str,
    why: &str,
) {
    outgoing_line(name, envelope, iface, args);
    match envelope.kind {
        envelope::Kind::Call => gave_up(name, envelope.cookie, why),
        kind => line(&format!(
            "{name} -- {kind:?}{} went out in the background: its sender gave up part-way \
             ({why})",
            cookie(envelope)
        )),
    }
}

/// The send of this process's call or reply (`what`) `cookie`, said before it started,
/// failed (`e`): the peer got none of it, or, cut off part-way, the connection ends;
/// `cut_off`, where the sender knows it, says how many of the message's bytes went out first.
#[cold]
#[inline(never)]
pub(crate) fn send_failed(
    name: &Name,
    what: &str,
    cookie: u64,
    e: &Error,
    cut_off: Option<(usize, usize)>,
) {
    let after = match cut_off {
        Some((sent, total)) => format!(" after {sent} of {total} bytes"),
        None => String::new(),
    };
    line(&format!(
        "{name} -- {what} #{cookie} send failed{after}: {e}"
    ));
}

/// This process's call or reply (`what`) `cookie`, said before its send started, was given
/// up (`why`) before any of it went out.
#[cfg(feature = "tokio")]
#[cold]
#[inline(never)]
pub(crate) fn not_sent(name: &Name, what: &str, cookie: u64, why: &str) {
    line(&format!("{name} -- {what} #{cookie} not sent: {why}"));
}

/// This process's reply `cookie`, said before its send started, was given up (`why`)
/// part-way out: the rest goes out from a task, and the peer gets it whole.
#[cfg(feature = "tokio")]
#[cold]
#[inline(never)]
pub(crate) fn reply_in_background(name: &Name, cookie: u64, why: &str) {
    line(&format!(
        "{name} -- Reply #{cookie} went out in the background: its sender gave up part-way \
         ({why})"
    ));
}

/// This process stopped waiting for the reply to its call `cookie`, `why` (timed out, or
/// cancelled): the reply, if it comes, is dropped unprinted but for its `<-` line.
#[cold]
#[inline(never)]
pub(crate) fn gave_up(name: &Name, cookie: u64, why: &str) {
    line(&format!(
        "{name} -- Call #{cookie} gave up waiting ({why}): a reply that comes later is dropped"
    ));
}

/// This process told the peer that it no longer waits for the reply to call `cookie`
/// (`-> Cancel #3`), or, for cookie 0, only acknowledged a placement of a call it dropped.
#[cold]
#[inline(never)]
pub(crate) fn cancelled(name: &Name, cookie: u64) {
    match cookie {
        0 => line(&format!(
            "{name} -> Cancel #0 (acknowledges a dropped call's bytes)"
        )),
        cookie => line(&format!("{name} -> Cancel #{cookie}")),
    }
}

/// This process told the peer that it has shut down (`-> ShutDown`), its last message. Said
/// under the connection's lock, once: a line never waits for stderr's lock (see [`line()`]).
#[cold]
#[inline(never)]
pub(crate) fn said_shut_down(name: &Name) {
    line(&format!(
        "{name} -> ShutDown (the calls not answered did not run)"
    ));
}

/// A listener turned away the client `peer` (`admit`, `max_clients`) for `reason`, `told` so
/// or not (its socket had no room): the client never became a connection, so the line names
/// the process alone.
#[cold]
#[inline(never)]
pub(crate) fn turned_away(peer: Option<&PeerCredentials>, reason: &str, told: bool) {
    let pid = std::process::id();
    let who = peer.map_or(String::new(), |p| {
        format!(" (pid {}, uid {})", p.pid, p.uid)
    });
    let untold = match told {
        true => "",
        false => " (not told: its socket had no room)",
    };
    let why = printable(reason);
    line(&format!(
        "typed-ipc[{pid}] -- Turned a client away{who}: {why}{untold}"
    ));
}

/// The peer's call `cookie` was dropped on its cancel, or (`ended`) as the connection ended
/// with no reply to go out any more, before it ran (`running`: its handler was running, and
/// stopped), and gets no reply.
#[cold]
#[inline(never)]
pub(crate) fn dropped_cancelled(name: &Name, cookie: u64, running: bool, ended: bool) {
    line(&dropped_cancelled_line(name, cookie, running, ended));
}

/// The line [`dropped_cancelled`] says.
#[cold]
#[inline(never)]
pub(crate) fn dropped_cancelled_line(
    name: &Name,
    cookie: u64,
    running: bool,
    ended: bool,
) -> String {
    let how = match running {
        true => "its handler dropped",
        false => "unrun",
    };
    let by = match ended {
        true => "as the connection ended",
        false => "by the peer",
    };
    format!("{name} -- Call #{cookie} cancelled {by}: {how}, no reply")
}

/// The failure this process answers call `cookie` with: `-> Failure #3: Unanswered("…")`.
/// Why may quote the peer's message (a decoding error may), so it is cut short.
#[cold]
#[inline(never)]
pub(crate) fn failure(name: &Name, cookie: u64, failure: &Failure) {
    line(&format!(
        "{name} -> Failure #{cookie}: {}",
        printable(&format!("{failure:?}"))
    ));
}

/// This process announced its inbox: it accepts byte strings written into its memory.
pub(crate) fn announce(name: &Name) {
    line(&format!(
        "{name} -> Announce (accepts byte strings written into its memory)"
    ));
}

/// An announcement of this process's lane could not go out over this side's own limits
/// (`e`: a `Limits::max_send_len` below an announcement's 40 bytes): the peer goes on
/// sending its large byte strings the ways it did, which needs none of them.
#[cold]
#[inline(never)]
pub(crate) fn announce_unsent(name: &Name, e: &Error) {
    line(&format!(
        "{name} -- Announce not sent, the peer's large byte strings go the ways they went: {e}"
    ));
}

/// This process told its peer that it accepts at most `max_fds` fds in a message (its
/// `Limits::max_fds`, not the default), as its connection started.
pub(crate) fn announce_max_fds(name: &Name, max_fds: usize) {
    line(&format!(
        "{name} -> Announce (accepts {})",
        counted(max_fds, "fd")
    ));
}

/// The announcement of this process's fd limit could not go out over this side's own
/// limits (`e`): the peer sends it every large byte string inline.
#[cold]
#[inline(never)]
pub(crate) fn max_fds_unsent(name: &Name, e: &Error) {
    line(&format!(
        "{name} -- Announce of its fd limit not sent, the peer sends its large byte strings \
         inline: {e}"
    ));
}

/// This process announced whether it trusts its peer with pipes (`lend_pages_to_peer`).
pub(crate) fn announce_pipes(name: &Name, trusts: bool) {
    let trust = if trusts { "trusts" } else { "no longer trusts" };
    line(&format!("{name} -> Announce ({trust} the peer with pipes)"));
}

/// This process gave back its shared region of `len` bytes (0: it had none), and the one the
/// peer maps, of `older` bytes if that is another, older one
/// (`Connection::release_shared_memory`).
pub(crate) fn announce_retired(name: &Name, len: usize, older: Option<usize>) {
    let older_one = |len| format!("older shared region of {}", counted(len, "byte"));
    let what = match (len, older) {
        (len, None) => format!("its shared region of {}", counted(len, "byte")),
        (0, Some(mapped)) => format!(
            "its {}, which only the peer still mapped",
            older_one(mapped)
        ),
        (len, Some(mapped)) => format!(
            "its shared region of {}, and its {}, which only the peer still mapped",
            counted(len, "byte"),
            older_one(mapped)
        ),
    };
    line(&format!("{name} -> Announce (gave back {what})"));
}

/// The line saying a message this process received, named after the served interface it is
/// for, if any: for [`line()`], which the reader of a reply calls once the reply is routed.
/// A request for none of them is named by its interface's id and command, which the
/// sender's source says (`#[interface]`'s `…_INFO`). `held`: a request that waits for a
/// server to come (the async flavour's that arrive before `serve`, the blocking flavour's
/// that arrive with no thread serving), which [`held_until_served`] names once it has. A
/// message this end could not receive (`unreceived`: over its limits, its fds dropped) is
/// said with why, not with the bytes and fds kept of it, which are only its envelope's.
pub(crate) fn incoming_line<'i>(
    name: &Name,
    envelope: &Envelope,
    frame: &Frame,
    mut served: impl Iterator<Item = &'i InterfaceInfo>,
    held: Held,
    unreceived: Option<&Error>,
) -> String {
    let request = matches!(envelope.kind, envelope::Kind::Call | envelope::Kind::Oneway);
    let method = match served.find(|i| i.id == envelope.interface) {
        Some(i) => method_of(i, envelope.cmd),
        None if request => format!(" iface {:#010x} cmd {}", envelope.interface, envelope.cmd),
        None => String::new(),
    };
    let held = match held {
        Held::NotServed if request => "; not served yet",
        Held::ServiceComing if request => "; held while its service is made",
        _ => "",
    };
    let what = match unreceived {
        Some(e) => format!("not received: {}", printable(&e.to_string())),
        None => format!(
            "{}, {}",
            counted(
                frame.payload.len() - envelope::LEN.min(frame.payload.len()),
                "byte"
            ),
            counted(frame.fds.len(), "fd")
        ),
    };
    // A failure's body is the runtime's own type, so unlike a reply's it reads back.
    let failure = match (envelope.kind, unreceived) {
        (envelope::Kind::Failure, None) => failure_said(frame),
        _ => String::new(),
    };
    format!(
        "{name} <- {:?}{}{method} ({what}{held}){failure}",
        envelope.kind,
        cookie(envelope),
    )
}

/// Whether a request waits for something to serve it as it arrives, for its line
/// ([`incoming_line`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Held {
    /// Something serves it (or it is no request).
    No,
    /// Nothing serves this end yet: no thread in `run`, no async service.
    NotServed,
    /// An async server is making this connection's services: it runs once they are made.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    ServiceComing,
}

/// `: Panicked("…")`: a failure reply's body, as its sender said it ([`failure`]); nothing if
/// it does not decode.
fn failure_said(frame: &Frame) -> String {
    let body = frame.payload.get(envelope::LEN..).unwrap_or_default();
    match crate::codec::decode_from::<Failure>(body, &mut Vec::new()) {
        Ok(failure) => format!(": {}", printable(&format!("{failure:?}"))),
        Err(_) => String::new(),
    }
}

/// ` Lab::reverse`, or ` Lab::?` for a command `iface` lacks.
fn method_of(iface: &InterfaceInfo, cmd: u32) -> String {
    format!(
        " {}::{}",
        iface.name,
        iface.method(cmd).map_or("?", |m| m.name)
    )
}

/// The line naming a request that waited for a server to come ([`incoming_line`]'s `held`)
/// and is now dispatched to one of `served`: `-- Call #1 held until served: Lab::reverse`.
/// `None` if none of them is its interface (its failure says so).
#[cold]
#[inline(never)]
pub(crate) fn held_until_served<'i>(
    name: &Name,
    envelope: &Envelope,
    mut served: impl Iterator<Item = &'i InterfaceInfo>,
) -> Option<String> {
    let iface = served.find(|i| i.id == envelope.interface)?;
    Some(format!(
        "{name} -- {:?}{} held until served:{}",
        envelope.kind,
        cookie(envelope),
        method_of(iface, envelope.cmd)
    ))
}

#[cfg(test)]
mod tests {
    use super::{EndedHere, Name};
    use crate::error::Error;
    use crate::socket::PeerCredentials;

    #[test]
    fn the_end_says_what_this_side_did_when_the_peer_seems_gone() {
        let name = super::Name::next(None, None);
        let said = |why: Error, here| {
            super::ended(&name, &why, here)
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
            (EndedHere::Killed, "this side killed the worker"),
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
            EndedHere::Killed,
        ] {
            assert_eq!(EndedHere::from_u8(here as u8), here);
        }
    }

    /// A request held as it arrives says why: nothing serves yet, or a server is making
    /// the connection's services (which read like a failure when both said `not served`).
    #[test]
    fn a_held_request_says_what_it_waits_for() {
        use super::{Envelope, Held, envelope::Kind};
        let name = Name::next(None, None);
        let envelope = Envelope {
            kind: Kind::Oneway,
            cmd: 2,
            cookie: 0,
            interface: 0x1234,
            signature: 0,
        };
        let frame = crate::frame::Frame::default();
        let said = |held| super::incoming_line(&name, &envelope, &frame, [].iter(), held, None);
        assert!(said(Held::No).ends_with("iface 0x00001234 cmd 2 (0 bytes, 0 fds)"));
        assert!(said(Held::NotServed).ends_with("(0 bytes, 0 fds; not served yet)"));
        let coming = said(Held::ServiceComing);
        assert!(coming.ends_with("(0 bytes, 0 fds; held while its service is made)"));
    }

    #[test]
    fn a_name_tells_the_connections_of_a_process_apart() {
        let pid = std::process::id();
        let (first, second) = (Name::next(None, None), Name::next(None, None));
        let number = |name: Name| {
            let text = name.to_string();
            let rest = text.strip_prefix(&format!("typed-ipc[{pid} c")).unwrap();
            rest.strip_suffix(']').unwrap().parse::<u64>().unwrap()
        };
        assert!(number(second) > number(first));
        // Named as often as lines are said, a connection keeps its name.
        assert_eq!(first.to_string(), first.to_string());
    }

    #[test]
    fn a_name_shows_the_peers_pid_only_if_it_is_another_process() {
        let credentials = |pid| PeerCredentials {
            pid,
            uid: 0,
            gid: 0,
        };
        let shown = |name: Name| {
            name.to_string()
                .split_once(" peer ")
                .map(|(_, p)| p.to_owned())
        };
        let other = credentials(1);
        assert_eq!(shown(Name::next(None, Some(&other))), Some("1]".to_owned()));
        // A socket pair's end records this process, its creator: not the peer.
        let pair = credentials(std::process::id() as i32);
        assert_eq!(shown(Name::next(None, Some(&pair))), None);
        // A pid in another namespace reads 0.
        assert_eq!(shown(Name::next(None, Some(&credentials(0)))), None);
        // The worker this process spawned is its peer, whatever the pair recorded.
        assert_eq!(
            shown(Name::next(Some(7), Some(&pair))),
            Some("7]".to_owned())
        );
    }

    #[test]
    fn counts_read_as_words() {
        assert_eq!(super::counted(0, "fd"), "0 fds");
        assert_eq!(super::counted(1, "byte"), "1 byte");
        assert_eq!(super::counted(4096, "byte"), "4096 bytes");
    }
}
