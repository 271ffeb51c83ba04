//! The client side: a hostile server.

use std::os::fd::OwnedFd;

use typed_ipc::wire::Kind;
use typed_ipc::{Connection, Error, Frame, Limits, Socket};

use crate::budget::{
    PATIENCE, base_seed, iterations, last_panic, panics_so_far, record_panics, serial,
};
use crate::datagrams::{Datagram, datagrams, describe, header, send_datagram};
use crate::mutations::{Op, Plan, random_plan};
use crate::rng::Rng;
use crate::seeds::{Seed, Seeds, capture_seeds};
use crate::server::{Finding, Tally, check_peak, finding, report};
use crate::{CMD_NOTE, CMD_PING, Record, TargetClient, common};

/// A real client of `Target`, of either flavour.
pub(crate) trait Caller: Sync {
    /// Calls the method with command id `cmd` (not `note`) with arguments of its own.
    fn call(&self, cmd: u32) -> typed_ipc::Result<()>;
    fn is_closed(&self) -> bool;
    /// Ends the connection and waits until it has let go of everything.
    fn close(&self);
}

impl Caller for TargetClient {
    fn call(&self, cmd: u32) -> typed_ipc::Result<()> {
        match cmd {
            0 => self.text("hostile".into()).map(drop),
            1 => self.bytes(vec![9; 32]).map(drop),
            2 => self
                .files(vec![common::memfd(b"x")], Some("l".into()))
                .map(drop),
            3 => self.one(common::memfd(b"y")).map(drop),
            4 => self.maybe(None).map(drop),
            5 => self.record(record_arg()).map(drop),
            _ => self.ping(5).map(drop),
        }
    }
    fn is_closed(&self) -> bool {
        self.connection().is_closed()
    }
    fn close(&self) {}
}

pub(crate) fn record_arg() -> Record {
    Record {
        name: "r".into(),
        blob: vec![1; 2048],
        file: common::memfd(b"z"),
        extra: None,
        tags: vec![],
    }
}

/// A real client on one connection, and the fuzzer's raw end of it.
pub(crate) struct ClientSide {
    pub(crate) caller: Box<dyn Caller>,
    pub(crate) fake: Socket,
}

/// A fresh raw socket pair for a client; every fourth one accepts messages of 16 KiB and 4
/// fds at most, so limits are reached with the sizes the seeds have.
pub(crate) fn client_socket(n: &mut u64) -> (Socket, Socket) {
    let (mut ours, theirs) = Socket::pair().unwrap();
    *n += 1;
    if *n % 4 == 0 {
        ours.set_limits(Limits {
            max_message_len: 16 << 10,
            max_fds: 4,
            ..Default::default()
        });
    }
    (ours, theirs)
}

/// The client's next message that is not a failure reply or an announcement: a client
/// answers a mutated message it took for a request over its limits with a failure (envelope
/// kind 4), before its next call, and one with small limits announces its fd limit (kind 5)
/// as it starts.
fn recv_call(fake: &Socket) -> typed_ipc::Result<Frame> {
    loop {
        let frame = fake.recv_timeout(PATIENCE)?;
        if !matches!(frame.payload.first(), Some(4 | 5)) {
            return Ok(frame);
        }
    }
}

/// The reply to `call` (a captured valid one of its command, cookie patched in).
fn valid_reply(replies: &[Seed], cmd: u32, cookie: u64) -> Datagram {
    let seed = replies
        .iter()
        .find(|s| s.cmd() == cmd)
        .unwrap_or(&replies[0]);
    let mut payload = seed.payload.clone();
    payload[8..16].copy_from_slice(&cookie.to_le_bytes());
    let fds: Vec<OwnedFd> = seed.fds.iter().map(|f| f.try_clone().unwrap()).collect();
    let mut bytes = header(Kind::First, fds.len(), payload.len(), fds.len());
    bytes.extend_from_slice(&payload);
    Datagram { bytes, fds }
}

/// One round: the client calls; the fake server answers with the mutated reply (the call's
/// cookie patched in unless the plan changes it), then the valid one. The call must return
/// (anything but a panic or a hang).
fn client_round(
    side: &ClientSide,
    plan: &Plan,
    seeds: &Seeds,
    cmd: u32,
) -> Result<String, Finding> {
    std::thread::scope(|s| {
        let call = s.spawn(|| side.caller.call(cmd));
        let outcome = match recv_call(&side.fake) {
            Ok(frame) if frame.payload.len() >= 24 => {
                let cookie = u64::from_le_bytes(frame.payload[8..16].try_into().unwrap());
                let mut patched = plan.clone();
                patched.ops.insert(0, Op::Cookie(cookie));
                for d in datagrams(&patched, &seeds.replies) {
                    if !send_datagram(&side.fake, &d).map_err(|w| finding("hang", w))? {
                        break;
                    }
                }
                let _ = send_datagram(&side.fake, &valid_reply(&seeds.replies, cmd, cookie));
                Ok(())
            }
            Ok(frame) => Err(finding(
                "bad client message",
                format!("{:02x?}", frame.payload),
            )),
            Err(Error::Disconnected) => Ok(()),
            Err(e) => Err(finding("hang", format!("the client sent no call: {e}"))),
        };
        let result = call.join();
        outcome?;
        match result {
            Ok(Ok(())) => Ok("Ok".into()),
            // Its valid reply came: a call that waits out its timeout was lost.
            Ok(Err(Error::TimedOut)) => Err(finding(
                "client hang",
                "the call timed out although its reply came",
            )),
            Ok(Err(e)) => Ok(format!("{e:?}")),
            Err(_) => Err(finding("panic", last_panic())),
        }
    })
}

/// Answers `iters` calls of clients made by `connect` with mutated replies; returns the
/// findings and what the calls returned.
pub(crate) fn fuzz_client(
    name: &str,
    connect: &mut dyn FnMut() -> ClientSide,
    seeds: &Seeds,
    iters: u64,
    seed: u64,
) -> (Vec<String>, Tally) {
    let before = common::open_fds();
    let panics = panics_so_far();
    let mut rng = Rng::new(seed);
    let mut side = Some(connect());
    let mut findings = Vec::new();
    let mut tally = Tally::default();
    for i in 0..iters {
        let plan = random_plan(&mut rng, &seeds.replies);
        let cmd = match rng.below(8) as u32 {
            CMD_NOTE => CMD_PING,
            cmd => cmd,
        };
        let live = side.as_ref().expect("connected");
        match client_round(live, &plan, seeds, cmd) {
            Ok(outcome) => tally.add(&outcome),
            Err(f) => {
                findings.push(format!(
                    "{} in {name}, iteration {i} (FUZZ_SEED={}): {}\n  call {cmd}, reply {}",
                    f.kind,
                    base_seed(),
                    f.detail,
                    describe(&plan, &seeds.replies).replace('\n', "\n  ")
                ));
                break;
            }
        }
        if panics_so_far() > panics {
            findings.push(format!("panic in {name}, iteration {i}: {}", last_panic()));
            break;
        }
        if live.caller.is_closed() || rng.chance(50) || i + 1 == iters {
            live.caller.close();
            drop(side.take());
            let now = common::open_fds();
            if now != before {
                findings.push(format!(
                    "fd leak in {name}, iteration {i}: {now} fds open after the connection ended, {before} before"
                ));
                break;
            }
            if i + 1 < iters {
                side = Some(connect());
            }
        }
    }
    if let Err(f) = check_peak("self") {
        findings.push(format!("{} in {name}: {}", f.kind, f.detail));
    }
    (findings, tally)
}

#[test]
fn a_client_survives_mutated_replies() {
    let _serial = serial();
    record_panics();
    let seeds = capture_seeds();
    let iters = iterations() / 2;
    let mut n = 0;
    let mut connect = || {
        let (ours, theirs) = client_socket(&mut n);
        ClientSide {
            caller: Box::new(TargetClient::new(Connection::new(ours)).with_timeout(PATIENCE)),
            fake: theirs,
        }
    };
    let (findings, tally) = fuzz_client(
        "a client",
        &mut connect,
        &seeds,
        iters,
        base_seed() ^ 0xc11e,
    );
    report("client", iters, &findings, &tally);
}
