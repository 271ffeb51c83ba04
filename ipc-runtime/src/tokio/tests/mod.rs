//! The async flavour's unit tests: the services and fixtures several of them share.
//! The tests themselves are in the modules below, by topic.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::socket::{SendCursor, Socket};

use super::{
    AsyncCall, AsyncConnection, AsyncListener, AsyncServer, AsyncService, AsyncServing, BoxFuture,
    connection,
};

mod backlog;
mod cancellation;
mod close;
mod lanes;
mod runtime_shutdown;
mod send;

fn memfd(index: u32) -> OwnedFd {
    use std::io::Write;
    let fd = nix::sys::memfd::memfd_create("test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let mut file = std::fs::File::from(fd);
    file.write_all(&index.to_le_bytes()).unwrap();
    file.into()
}

fn index_of(fd: OwnedFd) -> u32 {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::from(fd);
    file.seek(SeekFrom::Start(0)).unwrap();
    let mut b = [0u8; 4];
    file.read_exact(&mut b).unwrap();
    u32::from_le_bytes(b)
}

/// An async connection on a current-thread runtime that nothing drives (its futures are
/// polled by hand, or in `block_on`), and its peer's raw socket.
fn undriven_connection() -> (::tokio::runtime::Runtime, super::AsyncConnection, Socket) {
    let (ours, theirs) = Socket::pair().unwrap();
    let runtime = current_thread_runtime();
    let conn = runtime.block_on(async { super::AsyncConnection::new(ours).unwrap() });
    (runtime, conn, theirs)
}

/// Sends small oneways on `conn`, each polled once by hand, until one finds the peer's queue
/// full (that one is dropped, none of it out): how many went out, all unread.
fn fill_with_oneways(conn: &super::AsyncConnection) -> usize {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let mut cx = Context::from_waker(Waker::noop());
    let mut unread = 0;
    while let Poll::Ready(sent) =
        Box::pin(conn.oneway(&crate::connection::tests::BULK, 1, (), None))
            .as_mut()
            .poll(&mut cx)
    {
        sent.unwrap();
        unread += 1;
        assert!(unread < 1 << 20, "the peer's queue never filled");
    }
    unread
}

/// The async flavour's side of `a_placed_request_its_handler_never_decoded_gives_the_lane_back`:
/// an `AsyncCall` dropped without its arguments decoded gives their placement back.
/// Answers `SKIM`'s `skip` (1) with 0 without decoding its argument, and `len` with its
/// argument's length.
struct Skimmer;

impl super::AsyncService for Skimmer {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::SKIM
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            match call.command() {
                1 => call.reply(0u32).await,
                _ => {
                    let crate::codec::Bytes(data): crate::codec::Bytes<Vec<u8>> = call.args()?;
                    call.reply(data.len() as u64).await
                }
            }
        })
    }
}

/// A blocking client, and an async server on a current-thread runtime, over one socket pair.
fn client_and_async_server() -> (
    crate::Connection,
    ::tokio::runtime::Runtime,
    super::AsyncConnection,
) {
    let (runtime, server, theirs) = undriven_connection();
    (crate::Connection::new(theirs), runtime, server)
}

/// Echoes `BULK`'s `gated_echo` (1) at once, answers `ping` (2) with 7 (see `meeting`).
#[derive(Default)]
struct QuickEcho {
    /// If set, `ping` answers only once this many callers are inside it at once.
    meeting: Option<std::sync::Arc<::tokio::sync::Barrier>>,
}

impl super::AsyncService for QuickEcho {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::BULK
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            match call.command() {
                1 => {
                    let crate::codec::Bytes(data): crate::codec::Bytes<Vec<u8>> = call.args()?;
                    call.reply(crate::codec::Bytes(data)).await
                }
                _ => {
                    if let Some(meeting) = &self.meeting {
                        meeting.wait().await;
                    }
                    call.reply(7u32).await
                }
            }
        })
    }
}

/// A runtime on the calling thread, with its I/O and time drivers.
fn current_thread_runtime() -> ::tokio::runtime::Runtime {
    ::tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn multi_thread_runtime(threads: usize) -> ::tokio::runtime::Runtime {
    ::tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap()
}

/// Round trips until neither lane is busy (late replies of cancelled calls settle).
async fn settle(client: &super::AsyncConnection, server: &super::AsyncConnection) -> bool {
    use crate::connection::tests::BULK;
    for _ in 0..200 {
        let pong: u32 = client.call(&BULK, 2, (), None).await.unwrap();
        assert_eq!(pong, 7);
        if !client.test_lane().is_busy() && !server.test_lane().is_busy() {
            return true;
        }
        ::tokio::task::yield_now().await;
    }
    eprintln!(
        "busy: client {} server {}",
        client.test_lane().is_busy(),
        server.test_lane().is_busy()
    );
    false
}

/// Answers every call with what a call back into the peer (`SKIM`'s command 2) answers, as
/// a service of `service_with` calling its client does.
struct AsyncCallsBack {
    back: super::AsyncConnection,
}

impl super::AsyncService for AsyncCallsBack {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::CALLS_BACK
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            let skim = &crate::connection::tests::SKIM;
            let n: u64 = self.back.call(skim, 2, (), None).await?;
            call.reply(n).await
        })
    }
}

/// `ORDERED` served async: the request numbered `at` does `action`; the other `note`s
/// (oneways) and `mark`s (calls) keep the numbers they are sent.
struct AsyncOrdered {
    at: u64,
    action: AtSeq,
    run: std::sync::Arc<parking_lot::Mutex<Vec<u64>>>,
}

/// What [`AsyncOrdered`] does with the request numbered `at`.
enum AtSeq {
    /// Says it started, then waits for `gate`.
    Hold {
        started: std::sync::mpsc::Sender<()>,
        gate: std::sync::Arc<::tokio::sync::Notify>,
    },
    /// Closes the connection (once).
    Close(parking_lot::Mutex<Option<super::AsyncConnection>>),
}

impl super::AsyncService for AsyncOrdered {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::ORDERED
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            let seq: u64 = call.args()?;
            match &self.action {
                _ if seq != self.at => self.run.lock().push(seq),
                AtSeq::Hold { started, gate } => {
                    started.send(()).unwrap();
                    gate.notified().await;
                }
                AtSeq::Close(connection) => connection.lock().take().expect("closed once").close(),
            }
            match call.command() {
                3 => Ok(()),
                _ => call.reply(()).await,
            }
        })
    }
}

/// A service whose `gated_echo` (command 1) never decodes its arguments and never returns:
/// it says it started, then waits for good holding a guard that says when it is dropped.
/// `ping` answers 7.
#[derive(Clone, Default)]
struct Stuck {
    started: std::sync::Arc<::tokio::sync::Notify>,
    dropped: std::sync::Arc<::tokio::sync::Notify>,
    /// How many guards were dropped, for a test that waits for more than one.
    drops: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// How many handlers started, for a test that waits for more than one.
    starts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Says on its `Notify` when dropped, and counts.
struct SaysDropped(
    std::sync::Arc<::tokio::sync::Notify>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
);

impl Drop for SaysDropped {
    fn drop(&mut self) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.notify_one();
    }
}

impl super::AsyncService for Stuck {
    fn info(&self) -> &'static crate::service::InterfaceInfo {
        &crate::connection::tests::BULK
    }
    fn handle<'a>(
        &'a self,
        call: &'a mut super::AsyncCall,
    ) -> super::BoxFuture<'a, crate::Result<()>> {
        Box::pin(async move {
            match call.command() {
                1 => {
                    let _guard = SaysDropped(self.dropped.clone(), self.drops.clone());
                    self.starts
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    self.started.notify_one();
                    std::future::pending::<()>().await;
                    unreachable!("never woken")
                }
                _ => call.reply(7u32).await,
            }
        })
    }
}

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(60);
