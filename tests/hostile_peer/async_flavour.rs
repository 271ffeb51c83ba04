//! The async flavour (the `tokio` feature): an async server and client, fuzzed the same way.

use std::os::fd::OwnedFd;
use std::sync::mpsc;

use typed_ipc::{Error, Limits, Socket};

use crate::budget::{PATIENCE, base_seed, iterations, record_panics, serial};
use crate::client::{Caller, ClientSide, client_socket, fuzz_client, record_arg};
use crate::rng::Rng;
use crate::seeds::capture_seeds;
use crate::server::{Ended, Finding, Server, Setup, ThreadServer, fuzz_server, report};
use crate::{Impl, Record, Target, common};

/// `Target` as `async fn`s: the same interface on the wire.
mod asynchronous {
    use super::super::Record;
    use std::os::fd::OwnedFd;

    #[typed_ipc::interface]
    pub trait Target {
        async fn text(&self, text: String) -> String;
        async fn bytes(&self, data: Vec<u8>) -> Vec<u8>;
        async fn files(&self, files: Vec<OwnedFd>, label: Option<String>) -> u64;
        async fn one(&self, fd: OwnedFd) -> OwnedFd;
        async fn maybe(&self, fd: Option<OwnedFd>) -> Option<OwnedFd>;
        async fn record(&self, record: Record) -> Record;
        #[oneway]
        async fn note(&self, seq: u64, data: Vec<u8>);
        async fn ping(&self, n: u64) -> u64;
    }
}

impl asynchronous::Target for Impl {
    async fn text(&self, text: String) -> String {
        Target::text(self, text)
    }
    async fn bytes(&self, data: Vec<u8>) -> Vec<u8> {
        Target::bytes(self, data)
    }
    async fn files(&self, files: Vec<OwnedFd>, label: Option<String>) -> u64 {
        Target::files(self, files, label)
    }
    async fn one(&self, fd: OwnedFd) -> OwnedFd {
        fd
    }
    async fn maybe(&self, fd: Option<OwnedFd>) -> Option<OwnedFd> {
        fd
    }
    async fn record(&self, record: Record) -> Record {
        Target::record(self, record)
    }
    async fn note(&self, _seq: u64, _data: Vec<u8>) {}
    async fn ping(&self, n: u64) -> u64 {
        n.wrapping_add(1)
    }
}

/// An async server on a tokio runtime of this process.
struct AsyncServer {
    runtime: tokio::runtime::Runtime,
    inner: ThreadServer,
}

impl Server for AsyncServer {
    fn name(&self) -> String {
        "an async server".into()
    }
    fn connect(&mut self, rng: &mut Rng) -> Socket {
        let (ours, mut theirs) = Socket::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let setup = Setup::random(rng);
        if setup.small_limits {
            theirs.set_limits(Limits {
                max_message_len: 16 << 10,
                max_fds: 4,
                ..Default::default()
            });
        }
        self.runtime.spawn(async move {
            let conn = typed_ipc::tokio::AsyncConnection::new(theirs).unwrap();
            if setup.accept_writes {
                conn.accept_writes_from_peer().unwrap();
            }
            conn.lend_pages_to_peer(setup.trusts_pipes);
            let served = conn.serve(asynchronous::TargetServer::new(Impl));
            drop(conn);
            let _ = tx.send(served.await);
        });
        self.inner.done = Some(rx);
        ours
    }
    fn finish(&mut self) -> Result<Ended, Finding> {
        self.inner.finish()
    }
    fn check_resources(&mut self) -> Result<(), Finding> {
        self.inner.check_resources()
    }
}

/// An async client, called from a thread outside its runtime.
struct AsyncCaller {
    runtime: tokio::runtime::Handle,
    client: asynchronous::TargetClient,
}

impl Caller for AsyncCaller {
    fn call(&self, cmd: u32) -> typed_ipc::Result<()> {
        let c = &self.client;
        let call = async move {
            match cmd {
                0 => c.text("hostile".into()).await.map(drop),
                1 => c.bytes(vec![9; 32]).await.map(drop),
                2 => c
                    .files(vec![common::memfd(b"x")], Some("l".into()))
                    .await
                    .map(drop),
                3 => c.one(common::memfd(b"y")).await.map(drop),
                4 => c.maybe(None).await.map(drop),
                5 => c.record(record_arg()).await.map(drop),
                _ => c.ping(5).await.map(drop),
            }
        };
        self.runtime.block_on(async {
            tokio::time::timeout(PATIENCE, call)
                .await
                .unwrap_or(Err(Error::TimedOut))
        })
    }
    fn is_closed(&self) -> bool {
        self.client.connection().is_closed()
    }
    fn close(&self) {
        let conn = self.client.connection();
        conn.close();
        self.runtime.block_on(conn.wait_closed());
    }
}

#[test]
fn an_async_client_survives_mutated_replies() {
    let _serial = serial();
    record_panics();
    let seeds = capture_seeds();
    let runtime = common::two_worker_runtime();
    let mut n = 0;
    let mut connect = || {
        let (ours, theirs) = client_socket(&mut n);
        let _entered = runtime.enter();
        let conn = typed_ipc::tokio::AsyncConnection::new(ours).unwrap();
        ClientSide {
            caller: Box::new(AsyncCaller {
                runtime: runtime.handle().clone(),
                client: asynchronous::TargetClient::new(conn),
            }),
            fake: theirs,
        }
    };
    let iters = iterations() / 2;
    let (findings, tally) = fuzz_client(
        "an async client",
        &mut connect,
        &seeds,
        iters,
        base_seed() ^ 0xac11,
    );
    report("async client", iters, &findings, &tally);
}

#[test]
fn an_async_server_survives_mutated_messages() {
    let _serial = serial();
    record_panics();
    let seeds = capture_seeds();
    let runtime = common::two_worker_runtime();
    let mut server = AsyncServer {
        runtime,
        inner: ThreadServer::new(),
    };
    let iters = iterations() / 2;
    let (findings, tally) = fuzz_server(&mut server, &seeds.calls, iters, base_seed() ^ 0xa5c);
    report("async server", iters, &findings, &tally);
}
