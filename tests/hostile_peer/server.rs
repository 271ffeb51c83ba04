//! The server side: targets, probes, oracles.

use std::sync::mpsc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use typed_ipc::{Connection, Error, Frame, Limits, Socket};

use crate::budget::{
    MEMORY_LIMIT_KIB, PATIENCE, base_seed, iterations, last_panic, panics_so_far, peak_kib,
    record_panics, serial,
};
use crate::datagrams::{datagrams, describe, send_datagram, send_deadline};
use crate::mutations::{Framing, Plan, random_plan};
use crate::rng::Rng;
use crate::seeds::{Seed, capture_seeds};
use crate::{CMD_PING, Impl, TARGET_INFO, TargetServer, common};

/// What went wrong, by kind (distinct kinds are reported once each).
#[derive(Debug)]
pub(crate) struct Finding {
    pub(crate) kind: String,
    pub(crate) detail: String,
}

pub(crate) fn finding(kind: &str, detail: impl Into<String>) -> Finding {
    Finding {
        kind: kind.to_string(),
        detail: detail.into(),
    }
}

/// How a connection ended, as its server saw it.
pub(crate) struct Ended {
    /// `serve`'s result, as text.
    pub(crate) outcome: String,
    /// A panic happened in the serving process while it served.
    pub(crate) panicked: Option<String>,
}

/// A server to attack: each `connect` gives a fresh connection to it, and `finish` waits
/// for the server to be done with it (after our end is closed) and checks what it left.
pub(crate) trait Server {
    fn name(&self) -> String;
    fn connect(&mut self, rng: &mut Rng) -> Socket;
    fn finish(&mut self) -> Result<Ended, Finding>;
    /// After `finish`: the serving process's fds are back to what they were, and its peak
    /// memory is within bounds.
    fn check_resources(&mut self) -> Result<(), Finding>;
}

/// How a fuzzed connection is served: chosen at random for each one.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Setup {
    /// Keeps an inbox the peer may write byte strings into (it never shows it can).
    pub accept_writes: bool,
    /// Accepts messages of 16 KiB and 4 fds at most, so limits are reached with the sizes
    /// the seeds have.
    pub small_limits: bool,
    /// Serving threads: 1 runs requests in order, more queue them.
    pub threads: u32,
    /// Trusts the peer with pipes (`lend_pages_to_peer`), so reads the pipes it sends.
    pub trusts_pipes: bool,
}

impl Setup {
    pub(crate) fn random(rng: &mut Rng) -> Setup {
        Setup {
            accept_writes: rng.chance(4),
            small_limits: rng.chance(4),
            threads: rng.pick(&[1, 1, 2]),
            trusts_pipes: rng.chance(2),
        }
    }
}

/// Serves `Target` on `socket` as `setup` says, until the connection ends; the socket is
/// closed when this returns.
pub(crate) fn serve_target(mut socket: Socket, setup: Setup) -> typed_ipc::Result<()> {
    if setup.small_limits {
        socket.set_limits(Limits {
            max_message_len: 16 << 10,
            max_fds: 4,
            ..Default::default()
        });
    }
    let conn = Connection::new(socket);
    if setup.accept_writes {
        conn.accept_writes_from_peer()?;
    }
    conn.lend_pages_to_peer(setup.trusts_pipes);
    let served = typed_ipc::Server::new()
        .service(TargetServer::new(Impl))
        .threads(setup.threads as usize)
        .serve(&conn);
    drop(conn);
    served
}

/// A server on a thread of this process, at the other end of a socket pair.
pub(crate) struct ThreadServer {
    pub(crate) done: Option<mpsc::Receiver<typed_ipc::Result<()>>>,
    baseline: usize,
    panics: usize,
}

impl ThreadServer {
    pub(crate) fn new() -> ThreadServer {
        ThreadServer {
            done: None,
            baseline: common::open_fds(),
            panics: panics_so_far(),
        }
    }
}

impl Server for ThreadServer {
    fn name(&self) -> String {
        "a server thread".into()
    }
    fn connect(&mut self, rng: &mut Rng) -> Socket {
        let (ours, theirs) = Socket::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let setup = Setup::random(rng);
        std::thread::Builder::new()
            .name("target-server".into())
            .spawn(move || {
                let _ = tx.send(serve_target(theirs, setup));
            })
            .unwrap();
        self.done = Some(rx);
        ours
    }
    fn finish(&mut self) -> Result<Ended, Finding> {
        let done = self.done.take().expect("connected");
        let outcome = match done.recv_timeout(PATIENCE) {
            Ok(result) => format!("{result:?}"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(finding(
                    "hang",
                    "the server did not return after its peer hung up",
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => "the server thread died".into(),
        };
        let panicked = (panics_so_far() > self.panics).then(last_panic);
        self.panics = panics_so_far();
        Ok(Ended { outcome, panicked })
    }
    fn check_resources(&mut self) -> Result<(), Finding> {
        let now = common::open_fds();
        if now != self.baseline {
            return Err(finding(
                "fd leak",
                format!(
                    "{now} fds open after the connection ended, {} before",
                    self.baseline
                ),
            ));
        }
        check_peak("self")
    }
}

pub(crate) fn check_peak(pid: &str) -> Result<(), Finding> {
    match peak_kib(pid) {
        kib if kib > MEMORY_LIMIT_KIB => Err(finding(
            "memory",
            format!("peak RSS {kib} KiB, over {MEMORY_LIMIT_KIB} KiB"),
        )),
        _ => Ok(()),
    }
}

/// What the server sent us, judged: our probe's reply (`Ok(true)`), something else a
/// server may send (`Ok(false)`), or a finding.
fn judge_incoming(frame: &Frame, probe: u64) -> Result<bool, Finding> {
    let p = &frame.payload;
    if p.len() < 24 {
        return Err(finding(
            "bad server message",
            format!("{} bytes, no envelope", p.len()),
        ));
    }
    let cookie = u64::from_le_bytes(p[8..16].try_into().unwrap());
    match p[0] {
        3 if cookie == probe => match p.get(24..) {
            Some(body) if body == (probe + 1).to_le_bytes() => Ok(true),
            _ => Err(finding(
                "probe failed",
                format!("the probe's reply is {p:02x?}"),
            )),
        },
        3 | 5 => Ok(false),
        4 => {
            // A Failure: bincode's variant index first. 0 is `Panicked`: our implementation
            // never panics, so that was the runtime.
            let variant = p
                .get(24..28)
                .map(|v| u32::from_le_bytes(v.try_into().unwrap()));
            let text = String::from_utf8_lossy(&p[24..]).into_owned();
            if variant == Some(0) {
                return Err(finding("panic reported by the server", text));
            }
            if cookie == probe {
                return Err(finding("probe failed", format!("the probe failed: {text}")));
            }
            Ok(false)
        }
        k => Err(finding(
            "bad server message",
            format!("envelope kind {k} from a server"),
        )),
    }
}

/// Whether the connection still answers a valid call.
enum Probe {
    Alive,
    Ended,
}

/// Sends a valid `ping` and reads until its reply (the connection works) or the hang-up.
fn probe(socket: &Socket, cookie: u64) -> Result<Probe, Finding> {
    let mut msg = common::call_envelope(&TARGET_INFO, CMD_PING, cookie);
    msg.extend_from_slice(&cookie.to_le_bytes());
    match socket.send_timeout(&msg, &[], PATIENCE) {
        Ok(()) => {}
        Err(Error::Disconnected) => return Ok(Probe::Ended),
        Err(Error::TimedOut) => return Err(finding("hang", "the server stopped reading")),
        Err(e) => return Err(finding("probe failed", format!("sending the probe: {e}"))),
    }
    let deadline = Instant::now() + PATIENCE;
    // A server that refused a header of another version tells its own, once a connection, in
    // a datagram that is a header only: to a peer of this version, an empty message.
    let mut told_version = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match socket.recv_timeout(left) {
            Ok(frame) if frame.payload.is_empty() && frame.fds.is_empty() && !told_version => {
                told_version = true;
            }
            Ok(frame) => {
                if judge_incoming(&frame, cookie)? {
                    return Ok(Probe::Alive);
                }
            }
            Err(Error::Disconnected) => return Ok(Probe::Ended),
            Err(Error::TimedOut) => {
                return Err(finding("hang", "no reply to a valid call, and no hang-up"));
            }
            Err(e) => return Err(finding("bad server message", format!("receiving: {e}"))),
        }
    }
}

/// Sends a plan's datagrams then probes: `Ok(true)` if the connection still works.
fn attack(socket: &Socket, plan: &Plan, seeds: &[Seed], cookie: u64) -> Result<bool, Finding> {
    for d in datagrams(plan, seeds) {
        match send_datagram(socket, &d) {
            Ok(true) => {}
            Ok(false) => break,
            Err(why) => return Err(finding("hang", why)),
        }
    }
    Ok(matches!(probe(socket, cookie)?, Probe::Alive))
}

/// Checks how a connection ended and what it left behind.
pub(crate) fn check_end(server: &mut dyn Server) -> Result<String, Finding> {
    let ended = server.finish()?;
    if let Some(panic) = ended.panicked {
        return Err(finding("panic", panic));
    }
    if ended.outcome.contains("died") || ended.outcome.contains("panicked") {
        return Err(finding("panic", ended.outcome));
    }
    server.check_resources()?;
    Ok(ended.outcome)
}

/// A plan run on a fresh connection of its own (to reduce it): the finding, if any.
fn replay(server: &mut dyn Server, rng: &mut Rng, plan: &Plan, seeds: &[Seed]) -> Option<Finding> {
    let socket = server.connect(rng);
    send_deadline(&socket);
    let attacked = attack(&socket, plan, seeds, 1 << 40);
    drop(socket);
    let end = check_end(server);
    attacked.err().or(end.err())
}

/// Removes ops from a failing plan while it still fails the same way.
fn reduce(server: &mut dyn Server, plan: &Plan, seeds: &[Seed], kind: &str) -> Plan {
    let mut rng = Rng::new(1);
    let mut best = plan.clone();
    let mut i = best.ops.len();
    while i > 0 {
        i -= 1;
        let mut fewer = best.clone();
        fewer.ops.remove(i);
        if replay(server, &mut rng, &fewer, seeds).is_some_and(|f| f.kind == kind) {
            best = fewer;
        }
    }
    if !matches!(best.framing, Framing::Normal) {
        let plain = Plan {
            framing: Framing::Normal,
            ..best.clone()
        };
        if replay(server, &mut rng, &plain, seeds).is_some_and(|f| f.kind == kind) {
            best = plain;
        }
    }
    best
}

/// Outcomes seen, by kind, to show what the run covered.
#[derive(Default)]
pub(crate) struct Tally(std::collections::BTreeMap<String, u64>);

impl Tally {
    pub(crate) fn add(&mut self, what: &str) {
        let key: String = what.chars().take(60).collect();
        *self.0.entry(key).or_default() += 1;
    }
}

/// Attacks `server` with `iters` mutated messages; returns the findings (at most one per
/// kind, reduced) and what the connections ended with.
pub(crate) fn fuzz_server(
    server: &mut dyn Server,
    seeds: &[Seed],
    iters: u64,
    seed: u64,
) -> (Vec<String>, Tally) {
    let mut rng = Rng::new(seed);
    let mut findings: Vec<String> = Vec::new();
    let mut kinds: Vec<String> = Vec::new();
    let mut tally = Tally::default();
    let mut socket = Some(server.connect(&mut rng));
    send_deadline(socket.as_ref().unwrap());
    let mut cookie = 1u64 << 40;
    let mut report = |server: &mut dyn Server, plan: &Plan, f: Finding, iteration: u64| {
        if kinds.contains(&f.kind) {
            return;
        }
        kinds.push(f.kind.clone());
        let fatal = f.kind == "hang";
        let reduced = match fatal {
            true => plan.clone(), // a hung server cannot be asked again
            false => reduce(server, plan, seeds, &f.kind),
        };
        findings.push(format!(
            "{} against {}, iteration {iteration} (FUZZ_SEED={}): {}\n  {}",
            f.kind,
            server.name(),
            base_seed(),
            f.detail,
            describe(&reduced, seeds).replace('\n', "\n  ")
        ));
    };
    for i in 0..iters {
        let plan = random_plan(&mut rng, seeds);
        cookie += 1;
        let live = socket.as_ref().unwrap();
        let (alive, ended) = match attack(live, &plan, seeds, cookie) {
            Ok(alive) => (alive, None),
            Err(f) if f.kind == "hang" => {
                report(server, &plan, f, i);
                return (findings, tally);
            }
            Err(f) => {
                // Reducing replays the plan on connections of its own, so this one ends
                // first (the server keeps one connection's outcome at a time).
                drop(socket.take());
                let ended = check_end(server);
                report(server, &plan, f, i);
                (false, Some(ended))
            }
        };
        // Now and then hang up ourselves, to check what a connection leaves behind.
        if !alive || rng.chance(50) || i + 1 == iters {
            let ended = ended.unwrap_or_else(|| {
                drop(socket.take());
                check_end(server)
            });
            match ended {
                Ok(outcome) => tally.add(&outcome),
                Err(f) => {
                    let fatal = f.kind == "hang";
                    report(server, &plan, f, i);
                    if fatal {
                        return (findings, tally);
                    }
                }
            }
            if i + 1 < iters {
                socket = Some(server.connect(&mut rng));
                send_deadline(socket.as_ref().unwrap());
            }
        } else {
            tally.add("still serving");
        }
    }
    (findings, tally)
}

pub(crate) fn report(name: &str, iters: u64, findings: &[String], tally: &Tally) {
    eprintln!(
        "{name}: {iters} mutated messages (peak RSS of this process {} KiB); outcomes:",
        peak_kib("self")
    );
    for (what, n) in &tally.0 {
        eprintln!("  {n:>6}  {what}");
    }
    assert!(
        findings.is_empty(),
        "{name}: {} distinct failure(s):\n{}",
        findings.len(),
        findings.join("\n")
    );
}

#[test]
fn a_server_thread_survives_mutated_messages() {
    let _serial = serial();
    record_panics();
    let seeds = capture_seeds();
    let mut server = ThreadServer::new();
    let iters = iterations();
    let (findings, tally) = fuzz_server(&mut server, &seeds.calls, iters, base_seed());
    report("server thread", iters, &findings, &tally);
}
