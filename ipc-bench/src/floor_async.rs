//! The async floor: the bare `floor` echo driven by tokio, so the async flavour has a
//! reference of its own.
//!
//! Each side runs a current-thread runtime (as `typed-ipc/async` does) with its socket
//! non-blocking in an `AsyncFd`; every send and receive is tried first and waits for readiness
//! only if the kernel says it would block. No tasks, no channels, no allocation per call: what
//! tokio's reactor adds to a round trip, and nothing else.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, OwnedFd};

use ipc_bench::current_thread_runtime;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::runtime::Runtime;

use crate::floor::{ECHO, HEADER, header, parse, seqpacket_pair};
use crate::sys;
use crate::system::{Client, Kind, Launcher, System, inherited_fd};

/// The `floor/async` row: small calls only.
pub struct FloorAsync;

impl System for FloorAsync {
    fn name(&self) -> &'static str {
        "floor/async"
    }

    fn kinds(&self) -> &'static [Kind] {
        &[Kind::Small]
    }

    fn start(&self, launcher: &mut Launcher) -> io::Result<Box<dyn Client>> {
        let (ours, theirs) = seqpacket_pair()?;
        launcher.spawn_with_fd(theirs)?;
        let runtime = current_thread_runtime()?;
        let sock = {
            let _context = runtime.enter(); // the fd registers with this runtime's reactor
            non_blocking(ours)?
        };
        Ok(Box::new(AsyncFloorClient {
            sock,
            runtime,
            payload: vec![0xa5; Kind::Small.largest()],
            reply: vec![0; Kind::Small.largest()],
        }))
    }

    fn serve(&self, arg: &str) -> io::Result<()> {
        let sock = inherited_fd(arg)?;
        current_thread_runtime()?.block_on(async {
            let sock = non_blocking(sock)?;
            let mut h = [0; HEADER];
            let mut buf = vec![0u8; Kind::Small.largest()];
            loop {
                let (n, _) = sock
                    .async_io(Interest::READABLE, |fd| {
                        sys::recv(
                            fd.as_fd(),
                            &mut [IoSliceMut::new(&mut h), IoSliceMut::new(&mut buf)],
                        )
                    })
                    .await?;
                if n == 0 {
                    return Ok(()); // Every message has a header: 0 is end of stream.
                }
                match parse(&h) {
                    (ECHO, len) if n == HEADER + len => {
                        let iov = [IoSlice::new(&h), IoSlice::new(&buf[..len])];
                        sock.async_io(Interest::WRITABLE, |fd| sys::send(fd.as_fd(), &iov, None))
                            .await?;
                    }
                    (op, len) => {
                        return Err(io::Error::other(format!(
                            "bad request: op {op}, {n} bytes for {len}"
                        )));
                    }
                }
            }
        })
    }
}

/// `sock`, non-blocking, registered with the current runtime.
fn non_blocking(sock: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    let flags = OFlag::from_bits_retain(fcntl(&sock, FcntlArg::F_GETFL)?);
    fcntl(&sock, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    // SAFETY: an `OwnedFd` keeps the same fd open until it is dropped, and the `AsyncFd` owns
    // it from here on.
    unsafe { AsyncFd::register(sock) }.map_err(io::Error::from)
}

struct AsyncFloorClient {
    sock: AsyncFd<OwnedFd>,
    runtime: Runtime,
    payload: Vec<u8>,
    reply: Vec<u8>,
}

impl Client for AsyncFloorClient {
    fn call(&mut self, _: Kind, len: usize) -> io::Result<()> {
        let AsyncFloorClient {
            sock,
            runtime,
            payload,
            reply,
        } = self;
        let h = header(ECHO, len);
        let iov = [IoSlice::new(&h), IoSlice::new(&payload[..len])];
        let mut rh = [0; HEADER];
        let n = runtime.block_on(async {
            sock.async_io(Interest::WRITABLE, |fd| sys::send(fd.as_fd(), &iov, None))
                .await?;
            let (n, fd) = sock
                .async_io(Interest::READABLE, |fd| {
                    sys::recv(
                        fd.as_fd(),
                        &mut [IoSliceMut::new(&mut rh), IoSliceMut::new(reply)],
                    )
                })
                .await?;
            match fd {
                None => Ok::<_, io::Error>(n),
                Some(_) => Err(io::Error::other("unexpected fd in the reply")),
            }
        })?;
        match (n, parse(&rh)) {
            (n, (ECHO, got)) if n == HEADER + len && got == len => Ok(()),
            _ => Err(io::Error::other(format!(
                "bad reply of {n} bytes for {len}"
            ))),
        }
    }
}
