//! Mutations, continued: the datagrams a mutated message goes out as, sent however wrong.

use std::fmt::Write as _;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg, setsockopt, sockopt};
use typed_ipc::Socket;
use typed_ipc::wire::{Header, Kind};

use crate::budget::PATIENCE;
use crate::mutations::{Framing, HeaderField, Plan, Reorder, apply};
use crate::seeds::Seed;

/// One datagram: header and payload bytes, and the fds that go with it.
pub(crate) struct Datagram {
    pub(crate) bytes: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
}

pub(crate) fn header(kind: Kind, fds: usize, total_len: usize, total_fds: usize) -> Vec<u8> {
    Header {
        kind,
        fds: fds as u16,
        total_len: total_len as u32,
        total_fds: total_fds as u32,
    }
    .encode()
    .to_vec()
}

/// The datagrams of a message of `payload` and `fds`, split into continuations of `chunk`
/// bytes once the first (which has `fds_first` fds and no bytes) is out.
fn split(payload: &[u8], mut fds: Vec<OwnedFd>, chunk: usize, fds_first: usize) -> Vec<Datagram> {
    let (total_len, total_fds) = (payload.len(), fds.len());
    let first: Vec<OwnedFd> = fds.drain(..fds_first.min(fds.len())).collect();
    let mut out = vec![Datagram {
        bytes: header(Kind::First, first.len(), total_len, total_fds),
        fds: first,
    }];
    let mut rest = payload;
    while !rest.is_empty() || !fds.is_empty() {
        let (now, later) = rest.split_at(rest.len().min(chunk));
        let these: Vec<OwnedFd> = fds.drain(..fds.len().min(253)).collect();
        let mut bytes = header(Kind::More, these.len(), total_len, total_fds);
        bytes.extend_from_slice(now);
        out.push(Datagram { bytes, fds: these });
        rest = later;
    }
    out
}

/// The datagrams a plan sends.
pub(crate) fn datagrams(plan: &Plan, seeds: &[Seed]) -> Vec<Datagram> {
    let (payload, fds) = apply(plan, seeds);
    let normal =
        |payload: &[u8], fds: Vec<OwnedFd>| match payload.len() <= 60 << 10 && fds.len() <= 253 {
            true => {
                let mut bytes = header(Kind::First, fds.len(), payload.len(), fds.len());
                bytes.extend_from_slice(payload);
                vec![Datagram { bytes, fds }]
            }
            false => split(payload, fds, 60 << 10, 253),
        };
    match &plan.framing {
        Framing::Normal => normal(&payload, fds),
        Framing::Split {
            chunk,
            fds_first,
            reorder,
        } => {
            let chunk = (*chunk as usize).max(payload.len() / 64).max(1);
            let mut d = split(&payload, fds, chunk, *fds_first as usize);
            let n = d.len() as u64;
            match *reorder {
                Reorder::None => {}
                Reorder::SwapTwo(r) if n > 2 => d.swap(1 + (r % (n - 1)) as usize, 1),
                Reorder::DropOne(r) if n > 1 => drop(d.remove(1 + (r % (n - 1)) as usize)),
                Reorder::Duplicate(r) => {
                    let i = (r % n) as usize;
                    let fds = d[i].fds.iter().map(|f| f.try_clone().unwrap()).collect();
                    let copy = Datagram {
                        bytes: d[i].bytes.clone(),
                        fds,
                    };
                    d.insert(i, copy);
                }
                Reorder::ContinuationFirst if n > 1 => d.swap(0, 1),
                _ => {}
            }
            d
        }
        Framing::Header { field, value } => {
            let mut d = normal(&payload, fds);
            let b = &mut d[0].bytes;
            match field {
                HeaderField::Magic => b[*value as usize % 2] ^= 0x20,
                HeaderField::Version => b[2] = *value as u8,
                HeaderField::Kind => b[3] = *value as u8,
                HeaderField::Fds => b[4..6].copy_from_slice(&(*value as u16).to_le_bytes()),
                HeaderField::Reserved => b[6 + *value as usize % 2] = (*value as u8).max(1),
                HeaderField::TotalLen => b[8..12].copy_from_slice(&(*value as u32).to_le_bytes()),
                HeaderField::TotalFds => b[12..16].copy_from_slice(&(*value as u32).to_le_bytes()),
            }
            d
        }
        Framing::Short { len } => {
            let mut d = normal(&payload, fds);
            d.truncate(1);
            d[0].bytes.truncate(*len as usize);
            d
        }
        Framing::LoneContinuation => {
            let mut bytes = header(Kind::More, fds.len().min(253), payload.len(), fds.len());
            bytes.extend_from_slice(&payload[..payload.len().min(60 << 10)]);
            vec![Datagram {
                bytes,
                fds: fds.into_iter().take(253).collect(),
            }]
        }
        Framing::Empty => vec![Datagram {
            bytes: Vec::new(),
            fds: Vec::new(),
        }],
    }
}

/// The plan, its seed and its datagrams, for a report.
pub(crate) fn describe(plan: &Plan, seeds: &[Seed]) -> String {
    let mut s = format!(
        "seed #{} ({}), ops {:?}, framing {:?}\n",
        plan.seed, seeds[plan.seed].name, plan.ops, plan.framing
    );
    for (i, d) in datagrams(plan, seeds).iter().enumerate() {
        let shown = &d.bytes[..d.bytes.len().min(160)];
        let hex: String = shown.iter().fold(String::new(), |mut h, b| {
            let _ = write!(h, "{b:02x}");
            h
        });
        let more = match d.bytes.len() > shown.len() {
            true => format!("... ({} bytes)", d.bytes.len()),
            false => String::new(),
        };
        let _ = writeln!(s, "  datagram {i}: {} fds, {hex}{more}", d.fds.len());
    }
    s
}

/// Sends one datagram as it is, however wrong: `Ok(false)` if the peer is gone.
pub(crate) fn send_datagram(socket: &Socket, d: &Datagram) -> Result<bool, String> {
    let raw: Vec<RawFd> = d.fds.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(&d.bytes)];
    let fd = socket.as_fd().as_raw_fd();
    match sendmsg::<UnixAddr>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
        Ok(_) => Ok(true),
        Err(nix::Error::EPIPE | nix::Error::ECONNRESET | nix::Error::ENOTCONN) => Ok(false),
        // More fds than one datagram may carry, or more bytes than the socket takes: the
        // kernel refuses the datagram, and the peer never sees it.
        Err(nix::Error::EINVAL | nix::Error::EMSGSIZE | nix::Error::ETOOMANYREFS) => Ok(true),
        Err(nix::Error::EAGAIN) => Err("the peer stopped reading: a send timed out".into()),
        Err(e) => Err(format!("sendmsg: {e}")),
    }
}

/// Makes blocking sends on `socket` give up (with `EAGAIN`) rather than hang.
pub(crate) fn send_deadline(socket: &Socket) {
    let limit = nix::sys::time::TimeVal::new(PATIENCE.as_secs() as i64, 0);
    setsockopt(socket, sockopt::SendTimeout, &limit).unwrap();
}
