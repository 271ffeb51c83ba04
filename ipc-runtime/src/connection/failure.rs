//! Why a call got no answer: the body of a failure reply, and how the caller words it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use super::envelope::Envelope;
use super::trace::{self, printable};
use crate::error::{Error, Limit};
use crate::service::InterfaceInfo;

/// A method of the peer's interface, as a mismatch reply lists it: `(cmd, name, signature,
/// shape)`, from its `MethodInfo`.
pub type PeerMethod = (u32, String, String, u64);

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
    /// `(cmd, name, signature, shape)` (the shape 0 if its interface does not check types).
    Mismatch(Vec<PeerMethod>),
    /// The request did not decode as the method's arguments.
    BadRequest(String),
    /// The server refused the caller.
    Refused(String),
    /// The method ran but its answer could not be sent (its result could not be encoded, or
    /// was over the limits), or the service sent none; or the request's fds could not be
    /// received, so the method did not run.
    Unanswered(String),
    /// The request was over the receiver's limits: `size` payload bytes (or a byte string's,
    /// sent out of the socket, or a sealed buffer's or region view's file), `limit` allowed,
    /// by the receiver's setting `which` (wire version 14). The method did not run.
    TooLarge {
        size: u64,
        limit: u64,
        which: WireLimit,
    },
    /// The request carried more fds than the receiver's limits allow (its setting `which`, as
    /// for `TooLarge`). The method did not run.
    TooManyFds {
        count: u64,
        limit: u64,
        which: WireLimit,
    },
}

/// A [`Limit`] as a failure reply carries it: one byte, [`Limit::code`]. A number this end does
/// not know (a later version's limit, or a hostile peer's) decodes as [`Limit::Unknown`], not
/// as an error: the failure still says the request was over the peer's limits, and how far.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct WireLimit(pub Limit);

impl Serialize for WireLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.0.code())
    }
}

impl<'de> Deserialize<'de> for WireLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<WireLimit, D::Error> {
        u8::deserialize(d).map(|code| WireLimit(Limit::from_code(code)))
    }
}

/// Traced as the limit's name (`MaxFds`), not as a number.
impl std::fmt::Debug for WireLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Failure {
    /// The failure for a request whose handler returned `error` without replying: its
    /// arguments did not decode (`unreceived`: they were over this side's limits), or its
    /// reply could not be sent.
    pub(crate) fn of_handler(error: &Error, unreceived: bool) -> Failure {
        match error {
            Error::Malformed(_) => Failure::BadRequest(error.to_string()),
            _ if unreceived => Failure::over_limits(error)
                .unwrap_or_else(|| Failure::BadRequest(error.to_string())),
            _ => Failure::Unanswered(error.to_string()),
        }
    }

    /// The failure for a request refused as over this side's limits (`error`, as the socket
    /// or the decoding of its arguments reports it), if it is that.
    pub(crate) fn over_limits(error: &Error) -> Option<Failure> {
        match *error {
            Error::TooLarge {
                size, limit, which, ..
            } => Some(Failure::TooLarge {
                size,
                limit,
                which: WireLimit(which),
            }),
            Error::TooManyFds {
                count,
                limit,
                which,
                ..
            } => Some(Failure::TooManyFds {
                count,
                limit,
                which: WireLimit(which),
            }),
            _ => None,
        }
    }

    /// What a request's handler left to answer, from how it ended (`outcome`: returned, or
    /// panicked) and whether it `replied`: `None` if nothing is (it replied, or a oneway
    /// ended well). `unreceived`: its arguments were refused as over this side's limits.
    /// Both flavours' servers decide with this.
    #[inline]
    pub(crate) fn of_outcome(
        outcome: std::thread::Result<Result<(), Error>>,
        replied: bool,
        unreceived: bool,
        oneway: bool,
    ) -> Option<Failure> {
        match (outcome, replied) {
            (_, true) => None,
            (Ok(Ok(())), false) => {
                (!oneway).then(|| Failure::Unanswered("the service sent no reply".into()))
            }
            (Ok(Err(e)), false) => Some(Failure::of_handler(&e, unreceived)),
            (Err(panic), false) => Some(Failure::Panicked(panic_message(&panic))),
        }
    }

    /// A shorter failure to send instead of this one, which its sender could not send
    /// (`error`) for being over its own limits: its text halved (a long panic message, under
    /// the strict limits of a server of untrusted clients), or its list of names left out, as
    /// a peer that names none sends it. `None` if `error` is another, or nothing is left to
    /// cut. Both flavours cut the failure owed to a caller until it fits: otherwise the
    /// caller would get no answer, and its connection would end for want of one.
    #[cold]
    #[inline(never)]
    pub(crate) fn shorter(&self, error: &Error) -> Option<Failure> {
        if !matches!(error, Error::TooLarge { by_peer: false, .. }) {
            return None;
        }
        // Halved at a character boundary, marked as cut.
        let half = |text: &String| {
            let mut at = text.len() / 2;
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            (text.len() > 8).then(|| format!("{}…", &text[..at]))
        };
        match self {
            Failure::Panicked(text) => half(text).map(Failure::Panicked),
            Failure::BadRequest(text) => half(text).map(Failure::BadRequest),
            Failure::Refused(text) => half(text).map(Failure::Refused),
            Failure::Unanswered(text) => half(text).map(Failure::Unanswered),
            Failure::NotServed(served) if !served.is_empty() => {
                Some(Failure::NotServed(Vec::new()))
            }
            Failure::Mismatch(methods) if !methods.is_empty() => {
                Some(Failure::Mismatch(Vec::new()))
            }
            _ => None,
        }
    }

    /// The error the caller sees, worded against the caller's own view of the interface. The
    /// peer's text in it (a panic message, a reason, names) is made [`printable`] and lists
    /// are cut at [`LISTED`] entries: a caller may print the error, and a hostile peer must
    /// not reach its terminal or fill its logs through it.
    pub fn into_error(self, ours: &InterfaceInfo, cmd: u32) -> Error {
        let method = ours.method(cmd).map_or("?", |m| m.name);
        let name = ours.name;
        match self {
            Failure::Panicked(msg) => {
                Error::Panicked(format!("{name}::{method}: {}", printable(&msg)))
            }
            Failure::UnknownCommand(cmd) => {
                Error::Remote(format!("the peer's {name} has no command {cmd} ({method})"))
            }
            Failure::BadRequest(why) => Error::Remote(format!(
                "the peer could not decode {name}::{method}: {} (were both ends built from \
                 the same definitions of its types?)",
                printable(&why)
            )),
            Failure::Refused(why) => Error::Refused(printable(&why)),
            Failure::Unanswered(why) => Error::Remote(format!(
                "the peer's {name}::{method} could not answer: {}",
                printable(&why)
            )),
            // A peer that may refuse callers names none of its interfaces (`admit`): that
            // says nothing of whether it serves any.
            Failure::NotServed(served) if served.is_empty() => Error::NotServed(format!(
                "the peer does not serve interface `{name}`, and named none that it does"
            )),
            Failure::NotServed(served) => Error::NotServed(format!(
                "the peer does not serve interface `{name}` (it serves: {})",
                listed(served.iter(), |s| printable(s), ", ")
            )),
            Failure::Mismatch(theirs) => Error::InterfaceMismatch(describe(ours, &theirs)),
            Failure::TooLarge { size, limit, which } => Error::TooLarge {
                size,
                limit,
                which: which.0,
                by_peer: true,
            },
            Failure::TooManyFds {
                count,
                limit,
                which,
            } => Error::TooManyFds {
                count,
                limit,
                which: which.0,
                by_peer: true,
            },
        }
    }
}

/// How many entries of a list the peer sent an error names; the rest are counted.
const LISTED: usize = 16;

/// The first [`LISTED`] of `items`, each written by `show`, joined with `separator`, and how
/// many more there were (counted, not written: a hostile list may be long).
fn listed<T>(
    mut items: impl Iterator<Item = T>,
    show: impl Fn(T) -> String,
    separator: &str,
) -> String {
    let shown: Vec<String> = items.by_ref().take(LISTED).map(show).collect();
    let more = items.count();
    let mut text = shown.join(separator);
    if more > 0 {
        text.push_str(&format!("{separator}and {more} more"));
    }
    text
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
            Failure::TooLarge { size, limit, which } => write!(
                f,
                "the request is over this side's limits: {size} bytes, at most {limit} ({})",
                which.0
            ),
            Failure::TooManyFds {
                count,
                limit,
                which,
            } => write!(
                f,
                "the request is over this side's limits: {count} file descriptors, at most \
                 {limit} ({})",
                which.0
            ),
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
    name: &trace::Name,
    tracing: bool,
    envelope: &Envelope,
    served: impl IntoIterator<Item = &'i InterfaceInfo>,
    failure: &Failure,
) {
    let Some(more) = reported(tracing, &ONEWAYS_REPORTED) else {
        return;
    };
    let method = method_name(envelope, served);
    // Why may quote the peer's message (a decoding error may): escaped and cut short.
    let why = trace::printable(&failure.to_string());
    trace::line(&format!(
        "{name}: a oneway message {method} failed: {why}{more}"
    ));
}

/// Says on stderr that `count` oneway messages of the peer's, `first` the first of them, were
/// dropped unrun as the connection went, nothing having served it: nobody waits for their
/// outcome, so it would otherwise be silent, and a forgotten `serve` shows only this way (the
/// calls' replies all came). `served` names the method if this end has its interface;
/// `serve_how` says what to do. Counted among the oneway failures a process reports without
/// `TYPED_IPC_DEBUG` (one line a connection at most).
pub(crate) fn oneways_unrun<'i>(
    name: &trace::Name,
    tracing: bool,
    count: usize,
    first: &Envelope,
    served: impl IntoIterator<Item = &'i InterfaceInfo>,
    serve_how: &str,
) {
    let Some(more) = reported(tracing, &ONEWAYS_REPORTED) else {
        return;
    };
    let method = method_name(first, served);
    let messages = match count {
        1 => "message of the peer's was",
        _ => "messages of the peer's were",
    };
    trace::line(&format!(
        "{name}: {count} oneway {messages} dropped unrun as the connection went (the first: \
         {method}): nothing served this connection. {serve_how}{more}"
    ));
}

/// Whether a report of lost oneways is said, and what it adds: always with tracing on;
/// without it, the first [`ONEWAY_REPORTS`] that `reports` counts (the process's,
/// [`ONEWAYS_REPORTED`]; `None` after them), the last of which says that later ones are not
/// shown.
fn reported(tracing: bool, reports: &AtomicU32) -> Option<&'static str> {
    if tracing {
        return Some("");
    }
    match reports.fetch_add(1, Ordering::Relaxed) {
        n if n < ONEWAY_REPORTS - 1 => Some(""),
        n if n == ONEWAY_REPORTS - 1 => Some(" (later ones are not shown: set TYPED_IPC_DEBUG=1)"),
        _ => None,
    }
}

/// The method a request's envelope names, `Interface::method` if `served` (the interfaces
/// this side serves) has its interface, else by number.
pub(crate) fn method_name<'i>(
    envelope: &Envelope,
    served: impl IntoIterator<Item = &'i InterfaceInfo>,
) -> String {
    let iface = served.into_iter().find(|i| i.id == envelope.interface);
    match iface {
        Some(iface) => match iface.method(envelope.cmd) {
            Some(m) => format!("{}::{}", iface.name, m.name),
            None => format!("{} command {}", iface.name, envelope.cmd),
        },
        None => format!(
            "interface {:#x} command {}",
            envelope.interface, envelope.cmd
        ),
    }
}

/// Names the methods that differ between our interface and the peer's.
fn describe(ours: &InterfaceInfo, theirs: &[PeerMethod]) -> String {
    if theirs.is_empty() {
        // Sent by a peer that may refuse callers, to a caller of a command it lacks
        // (`admit`), or by one whose list was over its limits (`Failure::shorter`): it says
        // nothing of which methods it has, and none may be called missing.
        return format!(
            "interface `{}`: the peer's differs, and it named none of its methods (a peer that \
             may refuse callers names them only to a caller of a method it has, and none \
             names them past the limits of what it sends)",
            ours.name
        );
    }
    // Looked up by id, not searched: the peer's list is as long as its message allows.
    let mut by_cmd = HashMap::with_capacity(theirs.len().min(ours.methods.len()));
    let our_cmds: HashSet<u32> = ours.methods.iter().map(|m| m.cmd).collect();
    for entry in theirs.iter().filter(|(cmd, ..)| our_cmds.contains(cmd)) {
        by_cmd.entry(entry.0).or_insert(entry);
    }
    let differing = ours
        .methods
        .iter()
        .filter_map(|m| match by_cmd.get(&m.cmd) {
            None => Some(format!(
                "method `{}` (cmd {}) is missing on the peer",
                m.name, m.cmd
            )),
            Some((_, name, sig, _)) if *name != m.name || *sig != m.signature => Some(format!(
                "method {} differs: here `{}`, on the peer `{}`",
                m.cmd,
                m.signature,
                printable(sig)
            )),
            // Said once for the interface, when one end alone checks.
            Some((.., shape)) if (*shape == 0) != (m.shape == 0) => None,
            Some((.., shape)) if *shape != m.shape => Some(format!(
                "`{}`: same signature, but the definitions of its types differ",
                m.name
            )),
            Some(_) => None,
        });
    // The peer's methods that this side lacks, written only if shown.
    let extra = theirs.iter().filter(|(cmd, ..)| !our_cmds.contains(cmd));
    let show = |diff: Result<String, &PeerMethod>| match diff {
        Ok(written) => written,
        Err((cmd, name, ..)) => format!(
            "the peer has method `{}` (cmd {cmd}) that this side lacks",
            printable(name)
        ),
    };
    let one_end = one_end_checks(ours, theirs);
    let mut diffs = listed(
        one_end
            .map(Ok)
            .into_iter()
            .chain(differing.map(Ok))
            .chain(extra.map(Err)),
        show,
        "; ",
    );
    if diffs.is_empty() {
        diffs = unlisted_difference(ours, theirs);
    }
    format!("interface `{}`: {diffs}", ours.name)
}

/// Whether only one end checks the types (`#[interface(check_types)]`, which gives every
/// method a shape), said once: every method's shape differs then.
#[cold]
fn one_end_checks(ours: &InterfaceInfo, theirs: &[PeerMethod]) -> Option<String> {
    let we_check = ours.methods.iter().any(|m| m.shape != 0);
    let they_check = theirs.iter().any(|(.., shape)| *shape != 0);
    let (checks, does_not) = match (we_check, they_check) {
        (true, false) => ("this side", "the peer"),
        (false, true) => ("the peer", "this side"),
        _ => return None,
    };
    Some(format!(
        "only one end checks its types ({checks} has #[interface(check_types)], {does_not} \
         not)"
    ))
}

/// What differs between two interfaces whose methods agree in id, name and signature: what
/// the signature hash covers and the peer's list does not show, the order the methods are
/// declared in (which the list keeps) and their `#[oneway]`s (which it does not).
#[cold]
fn unlisted_difference(ours: &InterfaceInfo, theirs: &[PeerMethod]) -> String {
    let declared_here = ours.methods.iter().map(|m| m.cmd);
    if !declared_here
        .clone()
        .eq(theirs.iter().map(|(cmd, ..)| *cmd))
    {
        let ids = |cmds: &mut dyn Iterator<Item = u32>| listed(cmds, |c| c.to_string(), ", ");
        return format!(
            "the methods are the same but declared in another order (their ids here: {}; on \
             the peer: {}), which the interface check compares too",
            ids(&mut declared_here.clone()),
            ids(&mut theirs.iter().map(|(cmd, ..)| *cmd))
        );
    }
    let oneways = ours.methods.iter().filter(|m| m.oneway);
    let oneways = match listed(oneways, |m| format!("`{}`", m.name), ", ") {
        none if none.is_empty() => "none".to_string(),
        some => some,
    };
    format!(
        "every method has the same id, name and signature at both ends: a method is \
         `#[oneway]` at one end only (the peer does not say which of its methods are; \
         `#[oneway]` here: {oneways}), or the ends' versions of typed-ipc hash interfaces \
         differently"
    )
}

/// The message a panic carried, if it was a string.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::MethodInfo;

    /// Reports of lost oneways, a failed one's or those dropped unrun, share one budget a
    /// process without tracing; the last one said says so, whichever kind it is.
    #[test]
    fn the_last_report_of_lost_oneways_said_says_that_later_ones_are_not() {
        let reports = AtomicU32::new(0);
        for _ in 1..ONEWAY_REPORTS {
            assert_eq!(reported(false, &reports), Some(""));
        }
        let last = reported(false, &reports).expect("the last one said");
        assert!(last.contains("later ones are not shown"), "{last:?}");
        assert_eq!(reported(false, &reports), None);
        assert_eq!(
            reported(true, &reports),
            Some(""),
            "traced: all said, plainly"
        );
    }

    static IFACE: InterfaceInfo = InterfaceInfo {
        name: "Ipa",
        id: 1,
        signature: 1,
        methods: &[MethodInfo {
            name: "reverse",
            cmd: 0,
            signature: "fn reverse(&self, text: String) -> String",
            oneway: false,
            shape: 0,
        }],
    };

    /// What a terminal would act on, and far more of it than a line should hold.
    fn hostile() -> String {
        format!("\x1b[2J\x1b]0;owned\x07\u{202e}{}", "x".repeat(100_000))
    }

    fn text(error: Error) -> String {
        match error {
            Error::Remote(why)
            | Error::Panicked(why)
            | Error::Refused(why)
            | Error::InterfaceMismatch(why)
            | Error::NotServed(why) => why,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The peer's text reaches the caller's error escaped and cut short, and the lists it
    /// sends are cut at [`LISTED`] entries, whichever failure carries them.
    #[test]
    fn the_peers_text_in_an_error_is_escaped_and_bounded() {
        let many = |n: usize| {
            (0..n)
                .map(|i| (100 + i as u32, hostile(), hostile(), 0))
                .collect()
        };
        let failures = [
            Failure::Panicked(hostile()),
            Failure::BadRequest(hostile()),
            Failure::Refused(hostile()),
            Failure::Unanswered(hostile()),
            Failure::NotServed(vec![hostile(); 20]),
            Failure::Mismatch(many(20)),
            Failure::Mismatch(vec![(0, "reverse".into(), hostile(), 0)]),
            // No method differs, and the order is said: its ids are listed.
            Failure::Mismatch(vec![
                (
                    0,
                    "reverse".into(),
                    IFACE.methods[0].signature.into(),
                    0
                );
                100_000
            ]),
        ];
        for failure in failures {
            let shown = format!("{failure:?}").chars().take(40).collect::<String>();
            let why = text(failure.into_error(&IFACE, 0));
            let start = why.chars().take(80).collect::<String>();
            assert!(
                !why.chars().any(|c| c.is_control() || c == '\u{202e}'),
                "{shown}: {start:?}"
            );
            assert!(why.len() < 40_000, "{shown}: {} bytes", why.len());
        }
        let why = text(Failure::NotServed(vec!["A".into(); 20]).into_error(&IFACE, 0));
        assert!(why.ends_with("A, and 4 more)"), "{why}");
        // Each of ours found among many of theirs, the rest counted.
        let mut theirs: Vec<_> = (1..=100_000)
            .map(|cmd| (cmd, "x".into(), "y".into(), 0))
            .collect();
        theirs.push((0, "reverse".into(), IFACE.methods[0].signature.into(), 0));
        let why = text(Failure::Mismatch(theirs).into_error(&IFACE, 0));
        assert!(why.ends_with("; and 99984 more"), "{why}");
        assert!(!why.contains("`reverse`"), "{why}");
    }

    /// One end opting in to check_types is said once, not once for each method (all of
    /// them differ then); a method that differs otherwise is still named.
    #[test]
    fn checking_at_one_end_only_is_said_once() {
        const fn method(name: &'static str, cmd: u32, signature: &'static str) -> MethodInfo {
            MethodInfo {
                name,
                cmd,
                signature,
                oneway: false,
                shape: 7,
            }
        }
        static CHECKED: InterfaceInfo = InterfaceInfo {
            name: "Ipa",
            id: 1,
            signature: 2,
            methods: &[
                method("a", 0, "fn a(&self)"),
                method("b", 1, "fn b(&self)"),
                method("c", 2, "fn c(&self)"),
            ],
        };
        let unchecked = |changed: &str| -> Vec<PeerMethod> {
            CHECKED
                .methods
                .iter()
                .map(|m| match m.name == changed {
                    true => (m.cmd, m.name.into(), "fn other(&self)".into(), 0),
                    false => (m.cmd, m.name.into(), m.signature.into(), 0),
                })
                .collect()
        };
        let one_end = "only one end checks its types (this side has \
                       #[interface(check_types)], the peer not)";
        let why = text(Failure::Mismatch(unchecked("")).into_error(&CHECKED, 0));
        assert_eq!(why, format!("interface `Ipa`: {one_end}"));
        let why = text(Failure::Mismatch(unchecked("b")).into_error(&CHECKED, 0));
        assert_eq!(
            why,
            format!(
                "interface `Ipa`: {one_end}; method 1 differs: here `fn b(&self)`, on the peer \
                 `fn other(&self)`"
            )
        );
    }

    /// A method whose text is the same at both ends but whose shape is not is named, saying
    /// whether its types differ or only one end checks them.
    #[test]
    fn a_method_whose_shape_alone_differs_is_named() {
        static CHECKED: InterfaceInfo = InterfaceInfo {
            name: "Ipa",
            id: 1,
            signature: 2,
            methods: &[MethodInfo {
                name: "reverse",
                cmd: 0,
                signature: "fn reverse(&self, text: String) -> String",
                oneway: false,
                shape: 7,
            }],
        };
        let peer = |shape| {
            let sig = CHECKED.methods[0].signature.to_string();
            Failure::Mismatch(vec![(0, "reverse".into(), sig, shape)])
        };
        let why = text(peer(8).into_error(&CHECKED, 0));
        assert_eq!(
            why,
            "interface `Ipa`: `reverse`: same signature, but the definitions of its types differ"
        );
        let why = text(peer(0).into_error(&CHECKED, 0));
        assert_eq!(
            why,
            "interface `Ipa`: only one end checks its types (this side has \
             #[interface(check_types)], the peer not)"
        );
        let why = text(peer(7).into_error(&IFACE, 0));
        assert!(
            why.contains("only one end checks its types (the peer has"),
            "{why}"
        );
        // The same shape: what differs is elsewhere (here, the oneways or the hash).
        let why = text(peer(7).into_error(&CHECKED, 0));
        assert!(why.contains("every method has the same id"), "{why}");
    }

    /// A failure over its sender's own limits is cut: text halved at a character boundary,
    /// lists of names left out; one with nothing to cut, or refused for anything else, is not.
    #[test]
    fn a_failure_over_the_senders_limits_is_cut_and_nothing_else_is() {
        let over = Error::TooLarge {
            size: 9000,
            limit: 4096,
            which: Limit::MaxSendLen,
            by_peer: false,
        };
        let text = "é".repeat(11); // 22 bytes: half falls inside a character
        match Failure::Panicked(text).shorter(&over) {
            Some(Failure::Panicked(cut)) => assert_eq!(cut, format!("{}…", "é".repeat(5))),
            other => panic!("{other:?}"),
        }
        let methods = vec![(0, "reverse".into(), "fn reverse(&self)".into(), 0)];
        assert!(matches!(
            Failure::Mismatch(methods).shorter(&over),
            Some(Failure::Mismatch(m)) if m.is_empty()
        ));
        assert!(matches!(
            Failure::NotServed(vec!["Ipa".into()]).shorter(&over),
            Some(Failure::NotServed(s)) if s.is_empty()
        ));
        assert!(Failure::Panicked("short".into()).shorter(&over).is_none());
        assert!(Failure::Mismatch(Vec::new()).shorter(&over).is_none());
        assert!(Failure::UnknownCommand(3).shorter(&over).is_none());
        let by_peer = Error::TooLarge {
            size: 9000,
            limit: 4096,
            which: Limit::MaxSendLen,
            by_peer: true,
        };
        let long = Failure::Panicked("x".repeat(100));
        assert!(long.shorter(&by_peer).is_none());
        assert!(long.shorter(&Error::Disconnected).is_none());
    }
}
