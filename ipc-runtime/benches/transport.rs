//! The transport against the bare syscall floor, in one run (`cargo bench -p ipc-runtime`).
//!
//! Both processes are pinned to CPU 0: on these VMs waking a process on the other CPU costs
//! tens of microseconds, which would hide the few hundred nanoseconds measured here.
//!
//! - `round_trip/*`: a 64-byte message (plus one fd each way in the `_fd` rows) sent to a child
//!   that echoes every datagram back as it came, with bare `sendmsg`/`recvmsg`. The `floor`
//!   client uses nix `sendmsg`/`recvmsg` with a 16-byte header iovec; the `transport` client
//!   uses `Socket::send` and `Socket::recv_into`. Same child, same bytes on the wire.
//! - `bulk/*`: N bytes one way to a child that receives them whole with `Socket::recv_into`
//!   and answers 8 bytes, against `memcpy` of N bytes.

use std::hint::black_box;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::process::Command;

use criterion::{BenchmarkId, Criterion, Throughput};
use ipc_runtime::worker::{self, Worker};
use ipc_runtime::{Frame, Socket};
use nix::sched::{CpuSet, sched_setaffinity};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use nix::unistd::Pid;

const CHILD: &str = "TRANSPORT_BENCH_CHILD";

fn pin() {
    let mut set = CpuSet::new();
    set.set(0).unwrap();
    sched_setaffinity(Pid::from_raw(0), &set).unwrap();
}

fn spawn(role: &str) -> (Worker, Socket) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.env(CHILD, role);
    Worker::spawn_socket(command).unwrap()
}

/// Child: echoes every datagram back unchanged, fds included (bare syscalls).
fn echo(socket: Socket) {
    let fd = socket.as_fd().as_raw_fd();
    let mut buf = vec![0u8; 70_000];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg =
            recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC).unwrap();
        let len = msg.bytes;
        if len == 0 {
            return;
        }
        let fds: Vec<OwnedFd> = msg
            .cmsgs()
            .unwrap()
            .filter_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => Some(fds),
                _ => None,
            })
            .flatten()
            // SAFETY: SCM_RIGHTS fds are new descriptors owned by nobody else.
            .map(|raw| unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) })
            .collect();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(
            fd,
            &[IoSlice::new(&buf[..len])],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }
}

/// Child: receives whole messages through the transport and answers their length.
fn sink(socket: Socket) {
    let mut frame = Frame::default();
    while socket.recv_into(&mut frame, None).is_ok() {
        socket
            .send(&(frame.payload.len() as u64).to_le_bytes(), &[])
            .unwrap();
    }
}

/// One bare round trip: header + payload out, the echo back into `back`.
fn floor_round_trip(fd: RawFd, header: &[u8; 16], payload: &[u8], fds: &[RawFd], back: &mut [u8]) {
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let iov = [IoSlice::new(header), IoSlice::new(payload)];
    sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::empty(), None).unwrap();
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(back)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC).unwrap();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(got) = c {
            for raw in got {
                // SAFETY: a new descriptor from SCM_RIGHTS, closed right here.
                drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
            }
        }
    }
}

fn round_trips(c: &mut Criterion) {
    let (_child, socket) = spawn("echo");
    let raw = socket.as_fd().as_raw_fd();
    let payload = [7u8; 64];
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let header = [0u8; 16];
    let mut back = vec![0u8; 70_000];
    let mut frame = Frame::default();
    let mut group = c.benchmark_group("round_trip");
    for (name, fds) in [("64B", vec![]), ("64B_fd", vec![devnull.as_fd()])] {
        let raw_fds: Vec<RawFd> = fds.iter().map(|f: &BorrowedFd| f.as_raw_fd()).collect();
        group.bench_function(BenchmarkId::new("floor", name), |b| {
            b.iter(|| floor_round_trip(raw, &header, black_box(&payload), &raw_fds, &mut back))
        });
        group.bench_function(BenchmarkId::new("transport", name), |b| {
            b.iter(|| {
                socket.send(black_box(&payload), &fds).unwrap();
                socket.recv_into(&mut frame, None).unwrap();
            })
        });
    }
    group.finish();
}

fn bulk(c: &mut Criterion) {
    let (_child, socket) = spawn("sink");
    let mut frame = Frame::default();
    let mut group = c.benchmark_group("bulk");
    group.sample_size(20);
    for len in [1usize << 20, 16 << 20] {
        let data = vec![1u8; len];
        let mut copy = vec![0u8; len];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(BenchmarkId::new("memcpy", len), |b| {
            b.iter(|| copy.copy_from_slice(black_box(&data)))
        });
        group.bench_function(BenchmarkId::new("transport", len), |b| {
            b.iter(|| {
                socket.send(black_box(&data), &[]).unwrap();
                socket.recv_into(&mut frame, None).unwrap();
            })
        });
    }
    group.finish();
}

fn main() {
    pin();
    match std::env::var(CHILD).as_deref() {
        Ok("echo") => return echo(worker::socket().unwrap()),
        Ok("sink") => return sink(worker::socket().unwrap()),
        _ => {}
    }
    let mut c = Criterion::default().configure_from_args();
    round_trips(&mut c);
    bulk(&mut c);
    c.final_summary();
}
