//! tarpc 0.38 over a Unix stream socket: length-delimited frames, bincode (serde
//! transport), tokio current_thread runtime on both sides.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream as StdUnixStream;

use futures::StreamExt;
use tarpc::serde_transport;
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::LengthDelimitedCodec;
use tarpc::{client, context};
use tokio::net::UnixStream;
use tokio::runtime::{Builder, Runtime};

use crate::system::{Client, Kind, Launcher, System, inherited_fd};

/// The benchmark service, written the way a tarpc user would.
#[tarpc::service]
trait Bench {
    /// Small calls: returns `data` unchanged.
    async fn echo(data: Vec<u8>) -> Vec<u8>;
    /// Bulk calls: takes `data`, returns how many bytes arrived.
    async fn sink(data: Vec<u8>) -> u64;
}

#[derive(Clone)]
struct BenchServer;

impl Bench for BenchServer {
    async fn echo(self, _: context::Context, data: Vec<u8>) -> Vec<u8> {
        data
    }

    async fn sink(self, _: context::Context, data: Vec<u8>) -> u64 {
        data.len() as u64
    }
}

/// tarpc client and server, one connection, default configs.
pub struct Tarpc;

impl System for Tarpc {
    fn name(&self) -> &'static str {
        "tarpc"
    }

    fn kinds(&self) -> &'static [Kind] {
        &[Kind::Small, Kind::Bulk]
    }

    fn start(&self, launcher: &mut Launcher) -> io::Result<Box<dyn Client>> {
        let (ours, theirs) = StdUnixStream::pair()?;
        launcher.spawn_with_fd(theirs.into())?;
        let rt = Builder::new_current_thread().enable_all().build()?;
        let client = rt.block_on(async {
            let transport = serde_transport::new(framed(ours.into())?, Bincode::default());
            // spawn() puts the dispatch task on the runtime; it runs whenever the
            // client blocks on a call.
            io::Result::Ok(BenchClient::new(client::Config::default(), transport).spawn())
        })?;
        Ok(Box::new(TarpcClient {
            rt,
            client,
            payload: vec![0xa5; crate::system::MAX_PAYLOAD],
        }))
    }

    fn serve(&self, arg: &str) -> io::Result<()> {
        let sock = inherited_fd(arg)?;
        let rt = Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let transport = serde_transport::new(framed(sock)?, Bincode::default());
            // As in tarpc's examples: one task per request. The stream ends, and
            // with it the server, when the client disconnects.
            BaseChannel::with_defaults(transport)
                .execute(BenchServer.serve())
                .for_each(|request| async {
                    tokio::spawn(request);
                })
                .await;
            Ok(())
        })
    }
}

/// Wraps a connected stream socket in tokio's length-delimited framing. Must run
/// inside the runtime (tokio registers the socket with its reactor).
fn framed(
    sock: OwnedFd,
) -> io::Result<tarpc::tokio_util::codec::Framed<UnixStream, LengthDelimitedCodec>> {
    let sock = StdUnixStream::from(sock);
    sock.set_nonblocking(true)?;
    let sock = UnixStream::from_std(sock)?;
    // The default frame limit is 8 MiB: a 16 MiB payload fails, and the client only
    // sees its connection drop. Raise it past the largest payload plus encoding.
    Ok(LengthDelimitedCodec::builder()
        .max_frame_length(2 * crate::system::MAX_PAYLOAD)
        .new_framed(sock))
}

struct TarpcClient {
    rt: Runtime,
    client: BenchClient,
    /// Source of request bytes; each call copies from it into the owned `Vec` that
    /// tarpc's API takes by value.
    payload: Vec<u8>,
}

impl Client for TarpcClient {
    fn call(&mut self, kind: Kind, len: usize) -> io::Result<()> {
        let data = self.payload[..len].to_vec();
        let got = match kind {
            Kind::Small => self
                .rt
                .block_on(self.client.echo(context::current(), data))
                .map(|v| v.len()),
            Kind::Bulk => self
                .rt
                .block_on(self.client.sink(context::current(), data))
                .map(|n| n as usize),
        };
        match got.map_err(io::Error::other)? {
            n if n == len => Ok(()),
            n => Err(io::Error::other(format!(
                "tarpc: got {n} bytes back for {len}"
            ))),
        }
    }
}
