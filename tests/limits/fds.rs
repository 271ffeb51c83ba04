//! Fds over `Limits::max_fds`: too many fail the call on the sender, in a reply only that call,
//! in a request are answered with a failure; and a server at its open-file limit says so.

use typed_ipc::worker::{Exit, Worker};
use typed_ipc::{Connection, Error, Limit};

use crate::common::{child, fd_count_lock, fd_snapshot, open_fds};
use crate::{FilesClient, FilesImpl, FilesServer, memfds, room_for_fds, spawn, worker_socket};

/// [`child_files`] in a process that can open only 10 more fds than it has open.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_files_at_the_open_file_limit() {
    use nix::sys::resource::{Resource, setrlimit};
    let conn = Connection::new(worker_socket());
    let limit = open_fds() as u64 + 10;
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit).unwrap();
    conn.serve(FilesServer::new(FilesImpl)).unwrap();
}

/// A request whose fds the server's kernel dropped (the server at its `RLIMIT_NOFILE`) fails
/// with an error that says so of the server: the caller's own limit is not the one to raise,
/// and the arguments' types are not in question.
#[test]
fn a_request_whose_fds_the_server_could_not_receive_says_whose_limit_it_hit() {
    let _fds = fd_count_lock();
    let (worker, conn) = Worker::spawn(child("fds::child_files_at_the_open_file_limit")).unwrap();
    let files = FilesClient::new(conn);
    match files.count(memfds(40)) {
        Err(Error::Remote(why)) => {
            assert!(why.contains("open-file limit"), "{why}");
            assert!(!why.contains("this process"), "{why}");
            assert!(!why.contains("decode"), "{why}");
            assert!(!why.contains("definitions of its types"), "{why}");
        }
        other => panic!("expected Error::Remote, got {other:?}"),
    }
    assert_eq!(
        files.count(memfds(2)).unwrap(),
        2,
        "the connection still works"
    );
    hang_up(worker, files);
}

/// A blocking parent and its worker, with the worker's limits as given.
fn blocking_worker(max_fds: Option<usize>) -> (Worker, FilesClient) {
    let (worker, conn) = Worker::spawn(spawn("child_files", max_fds)).unwrap();
    (worker, FilesClient::new(conn))
}

fn hang_up(mut worker: Worker, files: FilesClient) {
    files.connection().close();
    assert_eq!(
        worker.wait().unwrap(),
        Exit::Code(0),
        "the worker served to the end"
    );
}

#[test]
fn too_many_fds_fail_the_call_on_the_sender_and_the_connection_keeps_working() {
    let _fds = fd_count_lock();
    room_for_fds(2100);
    let (worker, files) = blocking_worker(None);
    assert_eq!(files.count(memfds(1)).unwrap(), 1);
    let before = fd_snapshot();
    let refused = files.count(memfds(2000));
    assert!(
        matches!(
            refused,
            Err(Error::TooManyFds {
                count: 2000,
                limit: 1024,
                which: Limit::MaxFds,
                by_peer: false,
                ..
            })
        ),
        "{refused:?}"
    );
    let refused = files.take(memfds(2000));
    assert!(
        matches!(
            refused,
            Err(Error::TooManyFds {
                count: 2000,
                limit: 1024,
                which: Limit::MaxFds,
                by_peer: false,
                ..
            })
        ),
        "{refused:?}"
    );
    before.assert_nothing_new();
    assert_eq!(
        files.count(memfds(3)).unwrap(),
        3,
        "the connection still works"
    );
    assert_eq!(files.count(memfds(1024)).unwrap(), 1024, "up to the limit");
    before.assert_nothing_new();
    hang_up(worker, files);
}

#[test]
fn a_reply_over_the_callers_limit_fails_that_call_only() {
    let _fds = fd_count_lock();
    room_for_fds(2100);
    // The worker may send (and receive) up to 4096 fds; this side takes 1024.
    let (worker, files) = blocking_worker(Some(4096));
    assert_eq!(files.make(1).unwrap().len(), 1);
    let before = fd_snapshot();
    let refused = files.make(2000);
    assert!(
        matches!(
            refused,
            Err(Error::TooManyFds {
                count: 2000,
                limit: 1024,
                which: Limit::MaxFds,
                by_peer: false,
                ..
            })
        ),
        "{refused:?}"
    );
    before.assert_nothing_new();
    assert_eq!(files.make(3).unwrap().len(), 3, "the next call works");
    assert_eq!(files.count(memfds(2)).unwrap(), 2);
    assert!(!files.connection().is_closed());
    before.assert_nothing_new();
    hang_up(worker, files);
}

#[test]
fn a_request_over_the_servers_limit_is_answered_with_a_failure() {
    let _fds = fd_count_lock();
    // The worker takes at most 8 fds; this side sends up to 1024.
    let (worker, files) = blocking_worker(Some(8));
    assert_eq!(files.count(memfds(8)).unwrap(), 8);
    let before = fd_snapshot();
    // The caller is told it was the server's limit, as a match on `TooManyFds` expects; the
    // method did not run.
    match files.count(memfds(10)) {
        Err(
            e @ Error::TooManyFds {
                count: 10,
                limit: 8,
                which: Limit::MaxFds,
                by_peer: true,
                ..
            },
        ) => assert_eq!(
            e.to_string(),
            "message carries 10 file descriptors, over the peer's Limits::max_fds (8)"
        ),
        other => panic!("expected the server's refusal, got {other:?}"),
    }
    before.assert_nothing_new();
    // A oneway over the server's limits goes out, and is dropped there (and said on its
    // stderr): the server keeps serving all the same.
    files.take(memfds(10)).unwrap();
    assert_eq!(
        files.count(memfds(3)).unwrap(),
        3,
        "the server keeps serving"
    );
    hang_up(worker, files);
}

/// The same, with an async parent and an async worker.
#[cfg(feature = "tokio")]
mod asynchronous {
    use typed_ipc::{Error, Limit};

    use crate::asynchronous::{async_worker, hang_up, runtime};
    use crate::common::{fd_count_lock, fd_snapshot};
    use crate::{memfds, room_for_fds};

    #[test]
    fn too_many_fds_fail_the_call_on_the_sender_and_the_connection_keeps_working() {
        let _fds = fd_count_lock();
        room_for_fds(2100);
        runtime().block_on(async {
            let (worker, files) = async_worker(None);
            assert_eq!(files.count(memfds(1)).await.unwrap(), 1);
            let before = fd_snapshot();
            let refused = files.count(memfds(2000)).await;
            assert!(
                matches!(
                    refused,
                    Err(Error::TooManyFds {
                        count: 2000,
                        limit: 1024,
                        which: Limit::MaxFds,
                        by_peer: false,
                        ..
                    })
                ),
                "{refused:?}"
            );
            let refused = files.take(memfds(2000)).await;
            assert!(
                matches!(
                    refused,
                    Err(Error::TooManyFds {
                        count: 2000,
                        limit: 1024,
                        which: Limit::MaxFds,
                        by_peer: false,
                        ..
                    })
                ),
                "{refused:?}"
            );
            before.assert_nothing_new();
            assert_eq!(files.count(memfds(3)).await.unwrap(), 3);
            assert_eq!(
                files.count(memfds(1024)).await.unwrap(),
                1024,
                "up to the limit"
            );
            before.assert_nothing_new();
            hang_up(worker, files).await;
        });
    }

    #[test]
    fn a_reply_over_the_callers_limit_fails_that_call_only() {
        let _fds = fd_count_lock();
        room_for_fds(2100);
        runtime().block_on(async {
            let (worker, files) = async_worker(Some(4096));
            assert_eq!(files.make(1).await.unwrap().len(), 1);
            let before = fd_snapshot();
            let refused = files.make(2000).await;
            assert!(
                matches!(
                    refused,
                    Err(Error::TooManyFds {
                        count: 2000,
                        limit: 1024,
                        which: Limit::MaxFds,
                        by_peer: false,
                        ..
                    })
                ),
                "{refused:?}"
            );
            before.assert_nothing_new();
            assert_eq!(files.make(3).await.unwrap().len(), 3, "the next call works");
            assert_eq!(files.count(memfds(2)).await.unwrap(), 2);
            assert!(!files.connection().is_closed());
            before.assert_nothing_new();
            hang_up(worker, files).await;
        });
    }

    #[test]
    fn a_request_over_the_servers_limit_is_answered_with_a_failure() {
        let _fds = fd_count_lock();
        runtime().block_on(async {
            let (worker, files) = async_worker(Some(8));
            assert_eq!(files.count(memfds(8)).await.unwrap(), 8);
            let before = fd_snapshot();
            match files.count(memfds(10)).await {
                Err(Error::TooManyFds {
                    count: 10,
                    limit: 8,
                    which: Limit::MaxFds,
                    by_peer: true,
                    ..
                }) => {}
                other => panic!("expected the server's refusal, got {other:?}"),
            }
            before.assert_nothing_new();
            files.take(memfds(10)).await.unwrap();
            assert_eq!(
                files.count(memfds(3)).await.unwrap(),
                3,
                "the server keeps serving"
            );
            hang_up(worker, files).await;
        });
    }
}
