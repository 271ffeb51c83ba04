//! ipc-channel 0.23: typed channels (postcard-encoded), its raw bytes channels, and its
//! shared memory (`IpcSharedMemory`) sent inside a typed message.
//!
//! Bootstrap: the harness makes an `IpcOneShotServer` and passes its name to the
//! child; the child creates the request and reply channels and sends the parent the
//! request sender and the reply receiver through it.

use std::io;

use ipc_bench::{checksum, checksum_of_fill};
use ipc_channel::IpcError;
use ipc_channel::ipc::{
    self, IpcBytesReceiver, IpcBytesSender, IpcOneShotServer, IpcReceiver, IpcSender,
    IpcSharedMemory,
};
use serde::{Deserialize, Serialize};

use crate::system::{Client, Kind, Launcher, MAX_PAYLOAD, System};

/// How requests and replies travel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `IpcSender<Request>` plus one long-lived `IpcSender<Vec<u8>>` for replies.
    Typed,
    /// RPC style: every request carries a fresh `IpcSender<Vec<u8>>` for its reply
    /// (a new socketpair per call, sent as an fd).
    ReplyPerCall,
    /// `IpcBytesSender` both ways; the first byte of a request says echo or sink.
    Bytes,
    /// Bulk only: a fresh `IpcSharedMemory` per message (`from_bytes`, a memfd on Linux) sent
    /// inside a typed message; the server reads every byte in place and replies with their
    /// checksum (see [`SharedMemoryClient`] for what is timed).
    SharedMemory,
}

/// An ipc-channel row.
pub struct IpcChannel {
    /// Which way of using ipc-channel this row measures.
    pub mode: Mode,
}

/// A typed request: what to do, the bytes, and where to reply (if not the
/// long-lived reply channel).
#[derive(Serialize, Deserialize)]
struct Request {
    kind: Op,
    data: Vec<u8>,
    reply: Option<IpcSender<Vec<u8>>>,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
enum Op {
    Echo,
    Sink,
}

impl From<Kind> for Op {
    fn from(kind: Kind) -> Op {
        match kind {
            Kind::Small => Op::Echo,
            Kind::Bulk => Op::Sink,
        }
    }
}

/// What a server hands back through the one-shot server: its request sender and
/// its reply receiver.
type TypedBoot = (IpcSender<Request>, IpcReceiver<Vec<u8>>);
type BytesBoot = (IpcBytesSender, IpcBytesReceiver);
type SharedBoot = (IpcSender<SharedRequest>, IpcReceiver<u64>);

/// A bulk request of the shared-memory row: the bytes, in shared memory of their own.
#[derive(Serialize, Deserialize)]
struct SharedRequest {
    data: IpcSharedMemory,
}

impl System for IpcChannel {
    fn name(&self) -> &'static str {
        match self.mode {
            Mode::Typed => "ipc-channel",
            Mode::ReplyPerCall => "ipc-channel/reply-per-call",
            Mode::Bytes => "ipc-channel/bytes",
            Mode::SharedMemory => "ipc-channel/shared-memory",
        }
    }

    fn kinds(&self) -> &'static [Kind] {
        match self.mode {
            // A memfd created, mapped and sent per message is no way to echo 64 bytes.
            Mode::SharedMemory => &[Kind::Bulk],
            Mode::Typed | Mode::ReplyPerCall | Mode::Bytes => &[Kind::Small, Kind::Bulk],
        }
    }

    fn start(&self, launcher: &mut Launcher) -> io::Result<Box<dyn Client>> {
        // accept() has no timeout: if the child dies before connecting, this hangs
        // (its error is on stderr).
        if self.mode == Mode::Bytes {
            let (server, name) = IpcOneShotServer::<BytesBoot>::new()?;
            launcher.spawn(&name)?;
            let (_, (requests, replies)) = server.accept().map_err(io::Error::other)?;
            let mut payload = vec![0xa5; MAX_PAYLOAD + 1];
            payload[0] = 0;
            return Ok(Box::new(BytesClient {
                requests,
                replies,
                payload,
            }));
        }
        if self.mode == Mode::SharedMemory {
            let (server, name) = IpcOneShotServer::<SharedBoot>::new()?;
            launcher.spawn(&name)?;
            let (_, (requests, replies)) = server.accept().map_err(io::Error::other)?;
            return Ok(Box::new(SharedMemoryClient {
                requests,
                replies,
                payload: vec![FILL; MAX_PAYLOAD],
            }));
        }
        let (server, name) = IpcOneShotServer::<TypedBoot>::new()?;
        launcher.spawn(&name)?;
        let (_, (requests, replies)) = server.accept().map_err(io::Error::other)?;
        Ok(Box::new(TypedClient {
            requests,
            replies,
            per_call: self.mode == Mode::ReplyPerCall,
            payload: vec![0xa5; MAX_PAYLOAD],
        }))
    }

    fn serve(&self, name: &str) -> io::Result<()> {
        match self.mode {
            Mode::Bytes => return serve_bytes(name),
            Mode::SharedMemory => return serve_shared_memory(name),
            Mode::Typed | Mode::ReplyPerCall => {}
        }
        let (requests, inbox) = ipc::channel::<Request>()?;
        let (replies, outbox) = ipc::channel::<Vec<u8>>()?;
        IpcSender::<TypedBoot>::connect(name.to_owned())?
            .send((requests, outbox))
            .map_err(io::Error::other)?;
        while let Some(request) = next(inbox.recv())? {
            let reply = match request.kind {
                Op::Echo => request.data,
                Op::Sink => (request.data.len() as u64).to_le_bytes().to_vec(),
            };
            request
                .reply
                .as_ref()
                .unwrap_or(&replies)
                .send(reply)
                .map_err(io::Error::other)?;
        }
        Ok(())
    }
}

struct TypedClient {
    requests: IpcSender<Request>,
    replies: IpcReceiver<Vec<u8>>,
    per_call: bool,
    /// Source of request bytes; each call copies from it into the owned `Vec` that
    /// `IpcSender::send` takes by value.
    payload: Vec<u8>,
}

impl Client for TypedClient {
    fn call(&mut self, kind: Kind, len: usize) -> io::Result<()> {
        let data = self.payload[..len].to_vec();
        let reply = if self.per_call {
            let (tx, rx) = ipc::channel()?;
            self.requests
                .send(Request {
                    kind: kind.into(),
                    data,
                    reply: Some(tx),
                })
                .map_err(io::Error::other)?;
            rx.recv()
        } else {
            self.requests
                .send(Request {
                    kind: kind.into(),
                    data,
                    reply: None,
                })
                .map_err(io::Error::other)?;
            self.replies.recv()
        };
        check(kind, len, &reply.map_err(io::Error::other)?, 0)
    }
}

/// A received request, or `None` once the harness has dropped its sender.
fn next<T>(received: Result<T, IpcError>) -> io::Result<Option<T>> {
    match received {
        Ok(request) => Ok(Some(request)),
        Err(IpcError::Disconnected) => Ok(None),
        Err(e) => Err(io::Error::other(e)),
    }
}

/// Checks a reply: the echoed bytes (plus `prefix` tag bytes), or the sink count.
fn check(kind: Kind, len: usize, reply: &[u8], prefix: usize) -> io::Result<()> {
    let got = match kind {
        Kind::Small => reply.len().wrapping_sub(prefix),
        Kind::Bulk => reply.try_into().map(u64::from_le_bytes).unwrap_or(u64::MAX) as usize,
    };
    match got {
        n if n == len => Ok(()),
        n => Err(io::Error::other(format!(
            "ipc-channel: got {n} bytes back for {len}"
        ))),
    }
}

struct BytesClient {
    requests: IpcBytesSender,
    replies: IpcBytesReceiver,
    /// Tag byte then payload; the tag is rewritten per call, nothing is allocated
    /// on the sending side.
    payload: Vec<u8>,
}

impl Client for BytesClient {
    fn call(&mut self, kind: Kind, len: usize) -> io::Result<()> {
        self.payload[0] = (kind == Kind::Bulk) as u8;
        self.requests.send(&self.payload[..1 + len])?;
        check(
            kind,
            len,
            &self.replies.recv().map_err(io::Error::other)?,
            1,
        )
    }
}

fn serve_bytes(name: &str) -> io::Result<()> {
    let (requests, inbox) = ipc::bytes_channel()?;
    let (replies, outbox) = ipc::bytes_channel()?;
    IpcSender::<BytesBoot>::connect(name.to_owned())?
        .send((requests, outbox))
        .map_err(io::Error::other)?;
    while let Some(request) = next(inbox.recv())? {
        match request.first() {
            Some(0) => replies.send(&request)?,
            Some(1) => replies.send(&((request.len() - 1) as u64).to_le_bytes())?,
            _ => return Err(io::Error::other("bad bytes request")),
        }
    }
    Ok(())
}

/// The byte the shared-memory row's payload is made of (the other rows send 0xa5 too).
const FILL: u8 = 0xa5;

/// `ipc-channel/shared-memory`, as an `IpcSharedMemory` user sends bytes it has: each call
/// copies them into a fresh `IpcSharedMemory` and sends it inside a [`SharedRequest`]; the
/// server reads every byte in place (through `Deref`) and replies with their checksum.
///
/// Timed, as for `typed-ipc/shared` (a fresh sealed memfd per message, read in place): on the
/// client `memfd_create`, `ftruncate`, `mmap`, the copy from `payload` into the fresh pages
/// (faulting them in), the send (ipc-channel's `Serialize` clones the mapping to send it:
/// a `dup` and a second `mmap`, undone after the send), then `munmap` and `close`; on the
/// server `recvmsg`, `fstat`, `mmap`, the checksum (loads of every byte, faulting in the
/// mapping's pages), `munmap` and `close` before the reply (as typed-ipc's server drops the
/// buffer before replying); and the reply, a postcard `u64`. Not timed: producing the bytes,
/// which sit in a buffer the client keeps (as the `Blob` of typed-ipc's bulk rows does).
/// Unlike `typed-ipc/shared`, which fills its buffer in place, this copies from a source,
/// since that is what `from_bytes` does; and nothing seals the memory, so the server reads
/// pages the client could still change.
struct SharedMemoryClient {
    requests: IpcSender<SharedRequest>,
    replies: IpcReceiver<u64>,
    payload: Vec<u8>,
}

impl Client for SharedMemoryClient {
    fn call(&mut self, kind: Kind, len: usize) -> io::Result<()> {
        if kind != Kind::Bulk {
            return Err(io::Error::other(format!(
                "ipc-channel/shared-memory does not run {kind:?}"
            )));
        }
        let data = IpcSharedMemory::from_bytes(&self.payload[..len]);
        self.requests
            .send(SharedRequest { data })
            .map_err(io::Error::other)?;
        let sum = self.replies.recv().map_err(io::Error::other)?;
        match checksum_of_fill(FILL, len) {
            want if want == sum => Ok(()),
            want => Err(io::Error::other(format!(
                "ipc-channel/shared-memory: checksum {sum:#x} read in place, expected {want:#x}"
            ))),
        }
    }
}

fn serve_shared_memory(name: &str) -> io::Result<()> {
    let (requests, inbox) = ipc::channel::<SharedRequest>()?;
    let (replies, outbox) = ipc::channel::<u64>()?;
    IpcSender::<SharedBoot>::connect(name.to_owned())?
        .send((requests, outbox))
        .map_err(io::Error::other)?;
    while let Some(request) = next(inbox.recv())? {
        let sum = checksum(&request.data);
        drop(request); // Unmapped and closed before the reply, as typed-ipc's server does.
        replies.send(sum).map_err(io::Error::other)?;
    }
    Ok(())
}
