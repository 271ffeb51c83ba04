//! typed-ipc itself: generated stubs of the [`Bench`] interface over one `Connection`, the
//! server a real child process serving it.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use ipc_bench::{BenchClient, BenchImpl, BenchServer, Blob, checksum_of_fill, cpu_ns};
use nix::sys::resource::UsageWho;
use typed_ipc::peer_memory::PeerMemory;
use typed_ipc::shared_buffer::{SealedBuffer, SharedBuffer};
use typed_ipc::shared_region::SharedRegion;
use typed_ipc::{Connection, SharedBytes, Socket};

use crate::system::{Client, Kind, Launcher, MAX_PAYLOAD, System, inherited_fd};

/// Which way of calling this row measures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `echo(Vec<u8>) -> Vec<u8>`; bulk: `put(bytes) -> u64`. Set up as `Worker::spawn` and
    /// `worker::connection` set up a worker's connection: from 256 KiB to 1 MiB the client
    /// writes the bytes straight into the server (`Connection::write_into_peer`) while one copy
    /// pays on the machine (`typed_ipc::peer_memory::OneCopy`).
    Plain,
    /// Bulk `put` on plain `Connection::new` connections: through the shared region.
    Region,
    /// Bulk `put` on a connection that lends its pages to the peer
    /// (`Connection::lend_pages_to_peer`): from 128 KiB to 1 MiB through a pipe, one copy.
    Lent,
    /// `echo_fd(Vec<u8>, OwnedFd) -> {Vec<u8>, OwnedFd}`: one fd each way.
    Fd,
    /// `#[oneway] sink(Vec<u8>)`, back to back.
    Oneway,
    /// `echo` with a bounded spin before blocking on receive, on both sides (cross-CPU only).
    Spin,
    /// Bulk as a fresh sealed memfd per message, copied out into an owned `Vec` by the server.
    Memfd,
    /// Zero copy: a fresh `SharedBuffer` per message, filled, sealed, read in place.
    Shared,
    /// Zero copy from one `SharedRegion` mapped once by both sides: the client fills it, the
    /// server reads it in place with atomic loads.
    SharedRegion,
}

/// A typed-ipc row.
pub struct TypedIpc {
    /// What this row calls.
    pub flavor: Flavor,
}

/// How long `typed-ipc/spin` polls before blocking (overridable with `IPC_BENCH_SPIN_US`).
pub const DEFAULT_SPIN: Duration = Duration::from_micros(20);

fn spin() -> Duration {
    std::env::var("IPC_BENCH_SPIN_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(DEFAULT_SPIN, Duration::from_micros)
}

pub(crate) fn other(e: typed_ipc::Error) -> io::Error {
    io::Error::other(e)
}

impl System for TypedIpc {
    fn name(&self) -> &'static str {
        match self.flavor {
            Flavor::Plain => "typed-ipc",
            Flavor::Region => "typed-ipc/region",
            Flavor::Lent => "typed-ipc/lent",
            Flavor::Fd => "typed-ipc+fd",
            Flavor::Oneway => "typed-ipc/oneway",
            Flavor::Spin => "typed-ipc/spin",
            Flavor::Memfd => "typed-ipc/memfd",
            Flavor::Shared => "typed-ipc/shared",
            Flavor::SharedRegion => "typed-ipc/shared-region",
        }
    }

    fn kinds(&self) -> &'static [Kind] {
        match self.flavor {
            Flavor::Plain => &[Kind::Small, Kind::Bulk],
            Flavor::Fd | Flavor::Oneway | Flavor::Spin => &[Kind::Small],
            Flavor::Region
            | Flavor::Lent
            | Flavor::Memfd
            | Flavor::Shared
            | Flavor::SharedRegion => &[Kind::Bulk],
        }
    }

    fn cross_cpu_only(&self) -> bool {
        // On one CPU a spinning receiver only keeps its peer from running.
        self.flavor == Flavor::Spin
    }

    fn start(&self, launcher: &mut Launcher) -> io::Result<Box<dyn Client>> {
        let (ours, theirs) = Socket::pair().map_err(other)?;
        let child = launcher.spawn_with_fd(OwnedFd::from(theirs))?;
        if self.flavor == Flavor::Spin {
            ours.set_spin(spin());
        }
        let connection = Connection::new(ours);
        connection.lend_pages_to_peer(self.flavor == Flavor::Lent);
        if self.flavor == Flavor::Plain {
            connection.write_into_peer(PeerMemory::of_child(child));
        }
        let client = BenchClient::new(connection);
        let pool = match self.flavor {
            Flavor::SharedRegion => {
                let region = SharedRegion::new(MAX_PAYLOAD).map_err(other)?;
                client
                    .attach_region(region.view().map_err(other)?)
                    .map_err(other)?;
                Some(region)
            }
            _ => None,
        };
        let fd = match self.flavor {
            Flavor::Fd => Some(File::open("/dev/null")?.into()),
            _ => None,
        };
        Ok(Box::new(TypedClient {
            flavor: self.flavor,
            client,
            payload: Arc::new(vec![0xa5; MAX_PAYLOAD]),
            fd,
            pool,
            sent: 0,
            fill: 0,
        }))
    }

    fn serve(&self, arg: &str) -> io::Result<()> {
        let socket = Socket::from_fd(inherited_fd(arg)?).map_err(other)?;
        if self.flavor == Flavor::Spin {
            socket.set_spin(spin());
        }
        let connection = Connection::new(socket);
        if self.flavor == Flavor::Plain {
            connection.accept_writes_from_peer().map_err(other)?;
        }
        // A parent that lends its pages pipes only to a worker that trusts it with pipes too.
        connection.lend_pages_to_peer(self.flavor == Flavor::Lent);
        BenchServer::new(BenchImpl::new(|| 0))
            .serve(connection)
            .map_err(other)
    }
}

struct TypedClient {
    flavor: Flavor,
    client: BenchClient,
    /// What small calls send (borrowed: a stub's `Vec<u8>` parameter takes `&[u8]`) and what
    /// bulk `put` sends from (not copied).
    payload: Arc<Vec<u8>>,
    /// typed-ipc+fd: the fd to send next (the one the last reply brought back).
    fd: Option<OwnedFd>,
    /// typed-ipc/shared-region: the region the server mapped too.
    pool: Option<SharedRegion>,
    /// typed-ipc/oneway: messages sent, checked against the server's count at the end.
    sent: u64,
    /// Zero-copy rows: the byte value of the next fill, so every call writes new data.
    fill: u8,
}

impl TypedClient {
    fn next_fill(&mut self) -> u8 {
        self.fill = self.fill % 254 + 1; // 1..=254, never the zero of a fresh page
        self.fill
    }
}

pub(crate) fn expect(what: &str, got: u64, want: u64) -> io::Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what}: got {got}, expected {want}"
        )))
    }
}

impl Client for TypedClient {
    fn call(&mut self, kind: Kind, len: usize) -> io::Result<()> {
        match (self.flavor, kind) {
            (Flavor::Plain | Flavor::Spin, Kind::Small) => {
                let reply = self.client.echo(&self.payload[..len]).map_err(other)?;
                expect("echoed bytes", reply.len() as u64, len as u64)
            }
            (Flavor::Fd, Kind::Small) => {
                let fd = self.fd.take().ok_or_else(|| io::Error::other("no fd"))?;
                let reply = self
                    .client
                    .echo_fd(&self.payload[..len], fd)
                    .map_err(other)?;
                self.fd = Some(reply.fd);
                expect("echoed bytes", reply.data.len() as u64, len as u64)
            }
            (Flavor::Oneway, Kind::Small) => {
                self.client.sink(&self.payload[..len]).map_err(other)?;
                self.sent += 1;
                Ok(())
            }
            (Flavor::Plain | Flavor::Region | Flavor::Lent, Kind::Bulk) => {
                let got = self
                    .client
                    .put(Blob::Shared(
                        SharedBytes::from(Arc::clone(&self.payload)).slice(..len),
                    ))
                    .map_err(other)?;
                expect("bytes received", got, len as u64)
            }
            (Flavor::Memfd, Kind::Bulk) => {
                let buffer = SealedBuffer::copy_from(&self.payload[..len]).map_err(other)?;
                let got = self.client.put_sealed(buffer).map_err(other)?;
                expect("bytes received", got, len as u64)
            }
            (Flavor::Shared, Kind::Bulk) => {
                let fill = self.next_fill();
                let mut buffer = SharedBuffer::new(len).map_err(other)?;
                buffer.fill(fill);
                let sealed = buffer.seal().map_err(other)?;
                let sum = self.client.sum_sealed(sealed).map_err(other)?;
                expect("checksum read in place", sum, checksum_of_fill(fill, len))
            }
            (Flavor::SharedRegion, Kind::Bulk) => {
                let fill = self.next_fill();
                let region = self.pool.as_mut().expect("region attached in start");
                region[..len].fill(fill);
                let sum = self.client.sum_region(len as u64).map_err(other)?;
                expect("checksum read in place", sum, checksum_of_fill(fill, len))
            }
            (flavor, kind) => Err(io::Error::other(format!(
                "{} does not run {kind:?}",
                TypedIpc { flavor }.name()
            ))),
        }
    }

    fn cpu_ns(&mut self) -> Option<(u64, u64)> {
        let server = self.client.cpu_ns().ok()?;
        Some((cpu_ns(UsageWho::RUSAGE_THREAD), server))
    }
}

impl Drop for TypedClient {
    fn drop(&mut self) {
        if self.flavor == Flavor::Oneway {
            // A call after the oneways arrives after them: every one must have been run.
            match self.client.sunk() {
                Ok(n) if n == self.sent => {}
                Ok(n) => eprintln!(
                    "ipc-bench: typed-ipc/oneway: the server ran {n} of {} messages",
                    self.sent
                ),
                Err(e) => eprintln!("ipc-bench: typed-ipc/oneway: {e}"),
            }
        }
    }
}
