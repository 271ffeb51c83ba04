//! Who the peer of a spawned worker's connection is, in the parent: the worker. The kernel
//! records a socket pair's creator (the parent) as the peer of both ends, so a parent that
//! took `SO_PEERCRED` at its word saw itself calling its own methods, and an `authorize` by
//! the worker's pid refused every call. Across real processes, both flavours.

mod common;

use common::{child, fd_count_lock};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, current_peer};

/// Served by the parent, called by the worker.
#[cfg_attr(feature = "tokio", typed_ipc::interface(async_server))]
#[cfg_attr(not(feature = "tokio"), typed_ipc::interface)]
pub trait Whoami {
    /// The pid of the caller, as the method sees it.
    fn caller_pid(&self) -> i32;
}

struct Parent;

impl Whoami for Parent {
    fn caller_pid(&self) -> i32 {
        current_peer().map_or(-1, |peer| peer.pid)
    }
}

/// Calls the parent back and exits 0 if the parent's method saw this process calling.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_asks_who_calls() {
    let parent = WhoamiClient::new(worker::connection().unwrap());
    let seen = parent.caller_pid().unwrap();
    let me = std::process::id() as i32;
    assert_eq!(
        seen, me,
        "the parent's method saw pid {seen} calling, not this worker"
    );
}

#[test]
fn a_parent_sees_its_worker_as_the_peer() {
    let _fds = fd_count_lock();
    let (mut worker, conn) = Worker::spawn(child("child_asks_who_calls")).unwrap();
    assert_eq!(
        conn.peer_credentials().map(|peer| peer.pid),
        Some(worker.id() as i32)
    );
    let serving = std::thread::spawn({
        let conn: Connection = conn.clone();
        move || WhoamiServer::new(Parent).serve(conn)
    });
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    conn.close();
    serving.join().unwrap().unwrap();
}

#[cfg(feature = "tokio")]
#[test]
fn an_async_parent_sees_its_worker_as_the_peer() {
    let _fds = fd_count_lock();
    common::current_thread_runtime().block_on(async {
        let (mut worker, conn) =
            typed_ipc::tokio::worker::spawn(child("child_asks_who_calls")).unwrap();
        assert_eq!(
            conn.peer_credentials().map(|peer| peer.pid),
            Some(worker.id() as i32)
        );
        let serving = tokio::spawn(WhoamiAsyncServer::new(Parent).serve(conn.clone()));
        let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
        assert_eq!(exit, Exit::Code(0));
        conn.close();
        serving.await.unwrap().unwrap();
    });
}
