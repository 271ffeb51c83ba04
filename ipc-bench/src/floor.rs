//! The floor: bare `sendmsg`/`recvmsg` over a `SOCK_SEQPACKET` socketpair.
//!
//! Every message is a 16-byte header (op, length) plus the payload, as two iovecs.
//! Buffers are allocated once; a call allocates nothing. Bulk payloads larger than one
//! datagram go as fragments that the server reassembles into one buffer it owns.
//!
//! `floor+serde` adds to the floor exactly what a typed call's contract costs any
//! implementation: the caller's bytes encoded with bincode as one byte string where they lie
//! (a typed-ipc stub takes them borrowed), and each side decoding what it receives into a
//! fresh owned `Vec` (the server's is encoded back and dropped). No cookies, no locks, no
//! routing: the bar for typed-ipc's own machinery.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, getsockopt, setsockopt, socketpair, sockopt,
};
use nix::sys::stat::fstat;

use crate::sys;
use crate::system::{Client, Kind, Launcher, MAX_PAYLOAD, System, inherited_fd};

pub(crate) const ECHO: u32 = 1;
const BULK: u32 = 2;
pub(crate) const HEADER: usize = 16;

/// Bare SEQPACKET echo; `with_fd` attaches one fd each way (`SCM_RIGHTS`).
pub struct Floor {
    /// Send a `/dev/null` fd with every request and every reply.
    pub with_fd: bool,
    /// Small calls as a typed call's contract makes them (see the module docs).
    pub serde: bool,
}

impl System for Floor {
    fn name(&self) -> &'static str {
        match (self.with_fd, self.serde) {
            (true, _) => "floor+fd",
            (false, true) => "floor+serde",
            (false, false) => "floor",
        }
    }

    fn kinds(&self) -> &'static [Kind] {
        // Fd passing and serde are about small calls; the bulk floor is the plain one.
        if self.with_fd || self.serde {
            &[Kind::Small]
        } else {
            &[Kind::Small, Kind::Bulk]
        }
    }

    fn start(&self, launcher: &mut Launcher) -> io::Result<Box<dyn Client>> {
        let (ours, theirs) = seqpacket_pair()?;
        let fragment = raise_sndbuf(&ours)?;
        launcher.spawn_with_fd(theirs)?;
        Ok(Box::new(FloorClient {
            sock: ours,
            fd: if self.with_fd {
                Some(File::open("/dev/null")?)
            } else {
                None
            },
            payload: vec![0xa5; MAX_PAYLOAD],
            // Room for bincode's length prefix too.
            reply: vec![0; Kind::Small.largest() + 8],
            fragment,
            serde: self.serde.then(Vec::new),
        }))
    }

    fn serve(&self, arg: &str) -> io::Result<()> {
        serve(inherited_fd(arg)?, self.serde)
    }
}

/// A connected `SOCK_SEQPACKET` socketpair (close-on-exec; the child inherits its end
/// through `Launcher::spawn_with_fd`).
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Raises `SO_SNDBUF` to `net.core.wmem_max` so bulk goes in few fragments, and
/// returns the fragment size to try first: the read-back value (which the kernel
/// doubled) minus 32, the deduction ipc-channel found empirically. The kernel may
/// still refuse a datagram that big (one skb's linear part is capped near 4 MiB);
/// `send_bulk` then halves it.
fn raise_sndbuf(sock: &OwnedFd) -> io::Result<usize> {
    let max = std::fs::read_to_string("/proc/sys/net/core/wmem_max")?;
    let max: usize = max.trim().parse().map_err(io::Error::other)?;
    setsockopt(sock, sockopt::SndBuf, &max)?;
    Ok(getsockopt(sock, sockopt::SndBuf)? - 32)
}

pub(crate) fn header(op: u32, len: usize) -> [u8; HEADER] {
    let mut h = [0; HEADER];
    h[..4].copy_from_slice(&op.to_le_bytes());
    h[8..].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

pub(crate) fn parse(h: &[u8; HEADER]) -> (u32, usize) {
    let op = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
    (op, len as usize)
}

/// Client half; owns every buffer it needs.
struct FloorClient {
    sock: OwnedFd,
    /// The fd attached to requests (floor+fd only).
    fd: Option<File>,
    payload: Vec<u8>,
    reply: Vec<u8>,
    /// Largest datagram we send; shrinks if the kernel refuses one this big.
    fragment: usize,
    /// `floor+serde`: the buffer requests are encoded into.
    serde: Option<Vec<u8>>,
}

impl FloorClient {
    /// Receives the reply header and up to `reply.len()` bytes; checks the fd.
    fn recv_reply(&mut self, op: u32) -> io::Result<usize> {
        let mut h = [0; HEADER];
        let (n, fd) = sys::recv(
            self.sock.as_fd(),
            &mut [IoSliceMut::new(&mut h), IoSliceMut::new(&mut self.reply)],
        )?;
        if fd.is_some() != self.fd.is_some() {
            return Err(io::Error::other("reply fd missing or unexpected"));
        }
        // Dropping `fd` here closes it, like a real receiver would.
        match (n, parse(&h)) {
            (n, (got, len)) if n >= HEADER && got == op && len == n - HEADER => Ok(len),
            _ => Err(io::Error::other(format!("bad reply of {n} bytes"))),
        }
    }

    /// Sends `len` payload bytes as datagrams of at most `self.fragment` bytes.
    fn send_bulk(&mut self, len: usize) -> io::Result<()> {
        let h = header(BULK, len);
        let mut off = 0;
        loop {
            let first = off == 0;
            let room = if first {
                self.fragment - HEADER
            } else {
                self.fragment
            };
            let end = len.min(off + room);
            let chunk = IoSlice::new(&self.payload[off..end]);
            let sent = if first {
                sys::send(self.sock.as_fd(), &[IoSlice::new(&h), chunk], None)
            } else {
                sys::send(self.sock.as_fd(), &[chunk], None)
            };
            match sent {
                Ok(_) if end == len => return Ok(()),
                Ok(_) => off = end,
                // The doubled SO_SNDBUF can exceed what one skb may hold (ENOBUFS at
                // ~4 MiB here); nothing was sent, so halve the fragment and retry.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && self.fragment > 1 << 16 => {
                    self.fragment /= 2;
                    eprintln!("floor: ENOBUFS, bulk fragments now {} bytes", self.fragment);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl FloorClient {
    /// A `floor+serde` small call: the caller's bytes encoded where they lie (as a typed-ipc
    /// stub sends borrowed bytes); the reply decoded into a fresh `Vec`.
    fn call_serde(&mut self, len: usize) -> io::Result<()> {
        let mut out = self.serde.take().unwrap_or_default();
        out.clear();
        bincode::serialize_into(&mut out, serde_bytes::Bytes::new(&self.payload[..len]))
            .map_err(io::Error::other)?;
        let h = header(ECHO, out.len());
        let sent = sys::send(
            self.sock.as_fd(),
            &[IoSlice::new(&h), IoSlice::new(&out)],
            None,
        );
        self.serde = Some(out);
        sent?;
        let n = self.recv_reply(ECHO)?;
        let reply: serde_bytes::ByteBuf =
            bincode::deserialize(&self.reply[..n]).map_err(io::Error::other)?;
        match reply.len() {
            n if n == len => Ok(()),
            n => Err(io::Error::other(format!("echoed {n} bytes, sent {len}"))),
        }
    }
}

impl Client for FloorClient {
    fn call(&mut self, kind: Kind, len: usize) -> io::Result<()> {
        match kind {
            Kind::Small if self.serde.is_some() => self.call_serde(len),
            Kind::Small => {
                let h = header(ECHO, len);
                let iov = [IoSlice::new(&h), IoSlice::new(&self.payload[..len])];
                sys::send(self.sock.as_fd(), &iov, self.fd.as_ref().map(|f| f.as_fd()))?;
                match self.recv_reply(ECHO)? {
                    n if n == len => Ok(()),
                    n => Err(io::Error::other(format!("echoed {n} bytes, sent {len}"))),
                }
            }
            Kind::Bulk => {
                self.send_bulk(len)?;
                self.recv_reply(BULK)?;
                match u64::from_le_bytes(self.reply[..8].try_into().expect("8 bytes")) {
                    n if n == len as u64 => Ok(()),
                    n => Err(io::Error::other(format!(
                        "server got {n} bytes, sent {len}"
                    ))),
                }
            }
        }
    }
}

/// Server half: echoes small calls (with an fd iff the request had one; with `serde`,
/// decoded into an owned `Vec` and encoded back) and reassembles bulk messages into one
/// buffer, allocated once.
fn serve(sock: OwnedFd, serde: bool) -> io::Result<()> {
    raise_sndbuf(&sock)?;
    let devnull = File::open("/dev/null")?;
    let mut h = [0; HEADER];
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let mut out = Vec::new();
    loop {
        let (n, fd) = sys::recv(
            sock.as_fd(),
            &mut [IoSliceMut::new(&mut h), IoSliceMut::new(&mut buf)],
        )?;
        if n == 0 {
            return Ok(()); // Every message has a header: 0 is end of stream.
        }
        let (op, len) = parse(&h);
        let reply_fd: Option<BorrowedFd<'_>> = fd.as_ref().map(|_| devnull.as_fd());
        drop(fd); // The handler is done with it before replying.
        match op {
            ECHO if serde && n == HEADER + len => {
                let data: serde_bytes::ByteBuf =
                    bincode::deserialize(&buf[..len]).map_err(io::Error::other)?;
                out.clear();
                bincode::serialize_into(&mut out, &data).map_err(io::Error::other)?;
                drop(data);
                let h = header(ECHO, out.len());
                sys::send(sock.as_fd(), &[IoSlice::new(&h), IoSlice::new(&out)], None)?;
            }
            ECHO if n == HEADER + len => {
                sys::send(
                    sock.as_fd(),
                    &[IoSlice::new(&h), IoSlice::new(&buf[..len])],
                    reply_fd,
                )?;
            }
            BULK if len <= buf.len() => {
                let mut got = n - HEADER;
                while got < len {
                    match sys::recv(sock.as_fd(), &mut [IoSliceMut::new(&mut buf[got..len])])? {
                        (0, _) => {
                            return Err(io::Error::other("end of stream inside a bulk message"));
                        }
                        (_, Some(_)) => return Err(io::Error::other("fd inside a bulk message")),
                        (m, None) => got += m,
                    }
                }
                let got = (got as u64).to_le_bytes();
                sys::send(
                    sock.as_fd(),
                    &[IoSlice::new(&header(BULK, 8)), IoSlice::new(&got)],
                    None,
                )?;
            }
            _ => {
                return Err(io::Error::other(format!(
                    "bad request: op {op}, {n} bytes for {len}"
                )));
            }
        }
    }
}

/// The other way to move bulk bytes: a fresh sealed memfd per message, over the same bare
/// socket. The client writes the payload into a new memfd (`write(2)`, one copy), seals it
/// (`F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) and sends it with a 16-byte
/// header; the server checks the seals and the size, and copies the bytes out (`pread`)
/// into the buffer it reuses, as `floor` reassembles fragments into it.
pub struct FloorMemfd;

impl System for FloorMemfd {
    fn name(&self) -> &'static str {
        "floor/memfd"
    }

    fn kinds(&self) -> &'static [Kind] {
        &[Kind::Bulk]
    }

    fn start(&self, launcher: &mut Launcher) -> io::Result<Box<dyn Client>> {
        let (ours, theirs) = seqpacket_pair()?;
        launcher.spawn_with_fd(theirs)?;
        Ok(Box::new(MemfdClient {
            sock: ours,
            payload: vec![0xa5; MAX_PAYLOAD],
        }))
    }

    fn serve(&self, arg: &str) -> io::Result<()> {
        serve_memfd(inherited_fd(arg)?)
    }
}

const SEALS: SealFlag = SealFlag::F_SEAL_WRITE
    .union(SealFlag::F_SEAL_SHRINK)
    .union(SealFlag::F_SEAL_GROW);

struct MemfdClient {
    sock: OwnedFd,
    payload: Vec<u8>,
}

impl Client for MemfdClient {
    fn call(&mut self, _: Kind, len: usize) -> io::Result<()> {
        let memfd = memfd_create(
            c"floor-bulk",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let mut rest = &self.payload[..len];
        while !rest.is_empty() {
            rest = &rest[nix::unistd::write(&memfd, rest)?..];
        }
        // F_SEAL_WRITE may be refused (EBUSY) while the kernel still holds a transient
        // reference to a page; seen once under load. Retry, as the runtime does.
        let mut attempts = 0;
        loop {
            match fcntl(&memfd, FcntlArg::F_ADD_SEALS(SEALS | SealFlag::F_SEAL_SEAL)) {
                Err(nix::Error::EBUSY) if attempts < 2 => attempts += 1,
                r => {
                    r?;
                    break;
                }
            }
        }
        let h = header(BULK, len);
        sys::send(self.sock.as_fd(), &[IoSlice::new(&h)], Some(memfd.as_fd()))?;
        drop(memfd);
        let mut reply = [0u8; 8];
        let (n, fd) = sys::recv(
            self.sock.as_fd(),
            &mut [IoSliceMut::new(&mut h.clone()), IoSliceMut::new(&mut reply)],
        )?;
        if n != HEADER + 8 || fd.is_some() {
            return Err(io::Error::other(format!("bad reply of {n} bytes")));
        }
        match u64::from_le_bytes(reply) {
            n if n == len as u64 => Ok(()),
            n => Err(io::Error::other(format!(
                "server got {n} bytes, sent {len}"
            ))),
        }
    }
}

fn serve_memfd(sock: OwnedFd) -> io::Result<()> {
    let mut h = [0; HEADER];
    let mut buf = vec![0u8; MAX_PAYLOAD];
    loop {
        let (n, fd) = sys::recv(sock.as_fd(), &mut [IoSliceMut::new(&mut h)])?;
        if n == 0 {
            return Ok(());
        }
        let (op, len) = parse(&h);
        let memfd = fd.ok_or_else(|| io::Error::other("bulk message without its memfd"))?;
        let seals = SealFlag::from_bits_retain(fcntl(&memfd, FcntlArg::F_GET_SEALS)?);
        if op != BULK || !seals.contains(SEALS) {
            return Err(io::Error::other(format!(
                "bad request: op {op}, seals {seals:?}"
            )));
        }
        let size = fstat(&memfd)?.st_size as usize;
        if size != len || len > buf.len() {
            return Err(io::Error::other(format!("memfd of {size} bytes for {len}")));
        }
        let mut got = 0;
        while got < len {
            match nix::sys::uio::pread(&memfd, &mut buf[got..len], got as i64)? {
                0 => return Err(io::Error::other("memfd shorter than announced")),
                m => got += m,
            }
        }
        drop(memfd);
        let got = (got as u64).to_le_bytes();
        sys::send(
            sock.as_fd(),
            &[IoSlice::new(&header(BULK, 8)), IoSlice::new(&got)],
            None,
        )?;
    }
}
