//! A server in a child process.

use std::os::fd::OwnedFd;
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use typed_ipc::worker::{self, Worker};
use typed_ipc::{Socket, interface};

use crate::budget::{
    MEMORY_LIMIT_KIB, PANICS, PATIENCE, base_seed, iterations, peak_kib, record_panics, serial,
};
use crate::common;
use crate::rng::Rng;
use crate::seeds::capture_seeds;
use crate::server::{
    Ended, Finding, Server, Setup, check_end, finding, fuzz_server, report, serve_target,
};

/// What the child process serves its parent: one fuzzed connection at a time.
#[interface]
pub trait Host {
    /// Serves `socket` as a `Target` until the connection ends, then reports.
    fn serve_one(&self, socket: OwnedFd, setup: Setup) -> Served;
}

/// How one connection went in the child, and the state it left the child in.
#[derive(Debug, Serialize, Deserialize)]
pub struct Served {
    /// `serve`'s result.
    pub outcome: String,
    /// Open fds once the connection is gone.
    pub fds: u64,
    /// Peak RSS so far, KiB.
    pub peak_kib: u64,
    /// Panics in the child so far, the last one's message.
    pub panics: Vec<String>,
}

struct HostImpl;

impl Host for HostImpl {
    fn serve_one(&self, socket: OwnedFd, setup: Setup) -> Served {
        let outcome = match Socket::from_fd(socket) {
            Ok(socket) => format!("{:?}", serve_target(socket, setup)),
            Err(e) => format!("not a socket: {e}"),
        };
        let panics = PANICS.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Served {
            outcome,
            fds: common::open_fds() as u64,
            peak_kib: peak_kib("self"),
            panics,
        }
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_host() {
    record_panics();
    let conn = worker::connection().unwrap();
    HostServer::new(HostImpl).serve(conn).unwrap();
}

/// A server in a child process: each connection is handed to it over its worker connection.
struct ChildServer {
    _worker: Worker,
    host: HostClient,
    pid: u32,
    done: Option<mpsc::Receiver<typed_ipc::Result<Served>>>,
    baseline: Option<u64>,
    last: Option<Served>,
}

impl Server for ChildServer {
    fn name(&self) -> String {
        format!("a server in child process {}", self.pid)
    }
    fn connect(&mut self, rng: &mut Rng) -> Socket {
        let (ours, theirs) = Socket::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let host = self.host.clone();
        let setup = Setup::random(rng);
        std::thread::spawn(move || tx.send(host.serve_one(theirs, setup)));
        self.done = Some(rx);
        ours
    }
    fn finish(&mut self) -> Result<Ended, Finding> {
        let done = self.done.take().expect("connected");
        let served = match done.recv_timeout(PATIENCE) {
            Ok(Ok(served)) => served,
            Ok(Err(e)) => return Err(finding("child died", format!("{e}"))),
            Err(_) => {
                return Err(finding(
                    "hang",
                    "the child did not return after its peer hung up",
                ));
            }
        };
        let ended = Ended {
            outcome: served.outcome.clone(),
            panicked: served.panics.last().cloned(),
        };
        self.last = Some(served);
        Ok(ended)
    }
    fn check_resources(&mut self) -> Result<(), Finding> {
        let served = self.last.as_ref().expect("finished");
        let baseline = *self.baseline.get_or_insert(served.fds);
        if served.fds != baseline {
            return Err(finding(
                "fd leak",
                format!(
                    "the child has {} fds open between connections, {baseline} before",
                    served.fds
                ),
            ));
        }
        match served.peak_kib {
            kib if kib > MEMORY_LIMIT_KIB => Err(finding(
                "memory",
                format!("the child's peak RSS is {kib} KiB, over {MEMORY_LIMIT_KIB} KiB"),
            )),
            _ => Ok(()),
        }
    }
}

#[test]
fn a_server_process_survives_mutated_messages() {
    let _serial = serial();
    record_panics();
    let seeds = capture_seeds();
    let mut command = common::child("child::child_host");
    // Its panics come back in `Served`; its stderr would only repeat the runtime's line
    // for every oneway the fuzzer breaks.
    command.stderr(std::process::Stdio::null());
    let (worker, conn) = Worker::spawn(command).unwrap();
    let mut server = ChildServer {
        pid: worker.id(),
        _worker: worker,
        host: HostClient::new(conn).with_timeout(PATIENCE * 2),
        done: None,
        baseline: None,
        last: None,
    };
    // A first connection, ended at once, sets the child's baseline.
    let mut rng = Rng::new(0);
    drop(server.connect(&mut rng));
    check_end(&mut server).unwrap();
    let iters = iterations() / 4;
    let (findings, tally) = fuzz_server(&mut server, &seeds.calls, iters, base_seed() ^ 0xc41d);
    if let Some(served) = &server.last {
        eprintln!("the child's peak RSS: {} KiB", served.peak_kib);
    }
    report("server process", iters, &findings, &tally);
}
