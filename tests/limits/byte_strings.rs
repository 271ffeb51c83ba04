//! Byte strings through shared regions and pipes: within the limits they cross, over them they
//! fail with `TooLarge` on whichever side's limit it is; ends that accept no fds still get them.

use typed_ipc::{Connection, Error, Limit, Limits, Socket};

use crate::common::{fd_count_lock, fd_snapshot};
use crate::{Served, StringsClient, StringsImpl, StringsServer, common, strings_between};

/// A connection whose ends accept at most `client` and `server` bytes a message, serving
/// [`Strings`] on a thread, and ready to move byte strings through shared regions (and the
/// client's pipe, if it lends its pages).
fn strings_with_limits(client: usize, server: usize, lend: bool) -> Served {
    let limits = |max_message_len| Limits {
        max_message_len,
        ..Limits::default()
    };
    let (strings, server) = strings_between(limits(client), limits(server), lend);
    // An end places strings in its region once the peer's messages say it reads them: one
    // small call each way, so that the strings below take the region, not the socket.
    assert_eq!(strings.echo(vec![0; 10]).unwrap(), vec![0; 10]);
    (strings, server)
}

#[test]
fn byte_strings_within_the_limits_cross_whatever_region_they_come_in() {
    let _fds = fd_count_lock();
    // Limits below the shared region's smallest size (64 KiB): a string within them, large
    // enough to go through the region (1 KiB), still crosses both ways.
    let (strings, server) = strings_with_limits(4096, 4096, false);
    assert_eq!(strings.echo(vec![7; 3000]).unwrap(), vec![7; 3000]);
    drop(strings);
    server.join().unwrap().unwrap();

    // A server that accepts less than its client: a string over its limits fails that call
    // only, although the client's region grew for it past what the server accepts.
    let (strings, server) = strings_with_limits(1 << 30, 100 << 10, false);
    assert_eq!(strings.echo(vec![1; 2048]).unwrap(), vec![1; 2048]);
    // The caller is told it was the server's limit, as for a message over it that came
    // through the socket, not that the ends disagree on types.
    match strings.echo(vec![2; 200 << 10]) {
        Err(
            e @ Error::TooLarge {
                size: 204_800,
                limit: 102_400,
                which: Limit::MaxMessageLen,
                by_peer: true,
                ..
            },
        ) => assert_eq!(
            e.to_string(),
            "message of 204800 bytes, over the peer's Limits::max_message_len (102400 bytes)"
        ),
        other => panic!("expected the server's refusal, got {other:?}"),
    }
    assert_eq!(strings.echo(vec![3; 2048]).unwrap(), vec![3; 2048]);
    assert_eq!(strings.echo(vec![4; 50 << 10]).unwrap(), vec![4; 50 << 10]);
    drop(strings);
    server.join().unwrap().unwrap();
}

/// Fails unless `got` is `TooLarge` of `size` bytes over `limit`, `Limits::max_message_len`,
/// the peer's if `by_peer`; `context` starts the failure's message.
fn assert_too_large<T: std::fmt::Debug>(
    got: Result<T, Error>,
    size: u64,
    limit: u64,
    by_peer: bool,
    context: &str,
) {
    match got {
        Err(Error::TooLarge {
            size: s,
            limit: l,
            which: Limit::MaxMessageLen,
            by_peer: p,
            ..
        }) if (s, l, p) == (size, limit, by_peer) => {}
        other => panic!("{context}: expected TooLarge {size} over {limit}, got {other:?}"),
    }
}

/// A byte string that travels out of the socket (through the sender's shared region, or its
/// pipe when it lends its pages) and is over the receiver's limit fails its call as
/// `TooLarge`, as a message over them that came through the socket: `by_peer` when the
/// server refused the request (its method did not run), not when the client refused the
/// reply. Both ends keep working.
#[test]
fn a_byte_string_out_of_the_socket_over_the_receivers_limit_is_too_large() {
    let _fds = fd_count_lock();
    for lend in [false, true] {
        let (strings, server) = strings_with_limits(300 << 10, 100 << 10, lend);
        let pipes = common::fds_named("pipe:");
        assert_too_large(
            strings.echo(vec![2; 200 << 10]),
            204_800,
            102_400,
            true,
            &format!("lend {lend}"),
        );
        assert_eq!(common::fds_named("pipe:") > pipes, lend, "piped if lent");
        assert_eq!(strings.echo(vec![3; 50 << 10]).unwrap(), vec![3; 50 << 10]);
        drop(strings);
        server.join().unwrap().unwrap();
    }
    // A reply goes through the server's region (replies never pipe), which its limits allow
    // and the client's do not.
    let (strings, server) = strings_with_limits(300 << 10, 1 << 30, false);
    assert_too_large(
        strings.make(400 << 10),
        409_600,
        307_200,
        false,
        "the reply",
    );
    assert_eq!(strings.make(250 << 10).unwrap(), vec![9; 250 << 10]);
    drop(strings);
    server.join().unwrap().unwrap();
}

#[test]
fn a_byte_string_over_the_senders_limits_fails_unsent_with_too_large() {
    let _fds = fd_count_lock();
    let (strings, server) = strings_with_limits(4096, 1 << 30, false);
    // Over this side's limits: refused before it is sent, as any message over them, although
    // it would have travelled through the shared region rather than the socket.
    // With no `max_send_len`, what it sends is bounded by its `max_message_len`.
    match strings.echo(vec![7; 5000]) {
        Err(Error::TooLarge {
            limit: 4096,
            which: Limit::MaxMessageLen,
            by_peer: false,
            ..
        }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(strings.echo(vec![1; 2000]).unwrap(), vec![1; 2000]);
    drop(strings);
    server.join().unwrap().unwrap();
}

/// A server that cannot send even the failure it owes for a request it refused on receipt
/// (its own `max_send_len` is below the failure's size) ends the connection: its caller is
/// told at once, and does not wait for good for an answer that cannot come.
#[test]
fn a_failure_that_cannot_be_sent_for_a_refused_request_ends_the_connection() {
    let _fds = fd_count_lock();
    let client = Limits::default();
    let server = Limits {
        max_message_len: 100,
        max_send_len: Some(30),
        ..Limits::default()
    };
    let (strings, server) = strings_between(client, server, false);
    let strings = strings.with_timeout(std::time::Duration::from_secs(60)); // a hang guard
    let refused = strings.echo(vec![7; 200]);
    assert!(matches!(refused, Err(Error::Disconnected)), "{refused:?}");
    drop(strings);
    let served = server.join().unwrap();
    assert!(
        matches!(&served, Err(Error::Io(e)) if e.to_string().contains("could not be answered")),
        "{served:?}"
    );
}

/// A string over the server's limit comes in a region announced with it (the client's grew
/// for it): the server refuses the call unread, so the client takes it to map its old region
/// still, and names that one when it gives its memory back. The server must not have swapped
/// its view of the old region for the new one to find the string over its limit.
#[test]
fn shared_memory_released_after_a_string_over_the_peers_limit_goes_at_both_ends() {
    let _fds = fd_count_lock();
    let (strings, server) = strings_with_limits(1 << 30, 100 << 10, false);
    assert_eq!(strings.echo(vec![1; 2048]).unwrap(), vec![1; 2048]);
    // Each end's region (64 KiB) and its view of the other's.
    assert_eq!(common::regions(), 4);
    assert_too_large(
        strings.echo(vec![2; 200 << 10]),
        204_800,
        102_400,
        true,
        "over the server's limit",
    );
    let client = strings.connection();
    assert_eq!(client.release_shared_memory(), 256 << 10);
    // The server has taken in the announcement once it answers the next call (one thread
    // serves it, in order); that reply crosses inline.
    assert_eq!(strings.echo(vec![3; 10]).unwrap(), vec![3; 10]);
    assert_eq!(
        (common::regions(), common::memfd_mappings()),
        (2, 2),
        "only the server's region and the client's view of it are left"
    );
    drop(strings);
    server.join().unwrap().unwrap();
}

#[test]
fn byte_strings_cross_a_connection_whose_limits_allow_no_fds() {
    let _fds = fd_count_lock();
    let limits = Limits {
        max_fds: 0,
        ..Limits::default()
    };
    let (mut a, mut b) = Socket::pair().unwrap();
    a.set_limits(limits);
    b.set_limits(limits);
    let b = Connection::new(b);
    let server = std::thread::spawn(move || StringsServer::new(StringsImpl).serve(b));
    let strings = StringsClient::new(Connection::new(a));
    assert_eq!(strings.echo(vec![0; 10]).unwrap(), vec![0; 10]);
    // No fd in the call: the shared region's, which would carry it, must not make it one.
    for _ in 0..2 {
        assert_eq!(strings.echo(vec![5; 3000]).unwrap(), vec![5; 3000]);
    }
    drop(strings);
    server.join().unwrap().unwrap();
}

/// A connection whose client's socket accepts at most `client` fds a message and whose
/// server's at most `server`, serving [`Strings`] on a thread; the client lends its pages
/// (so a call's strings of 128 KiB to 1 MiB take the pipe) if `lend`.
fn strings_with_fds(client: usize, server: usize, lend: bool) -> Served {
    let limits = |max_fds| Limits {
        max_fds,
        ..Limits::default()
    };
    strings_between(limits(client), limits(server), lend)
}

/// Sizes that take every way a byte string goes out of line: the region (2 KiB, and
/// 64 KiB, its smallest size), the pipe if the client lends its pages (200 KiB), and a
/// region grown past the pipe's bound (2 MiB). Each a few times: every call must work,
/// the first ones as much as the later ones.
const OUT_OF_LINE_SIZES: [usize; 4] = [2 << 10, 64 << 10, 200 << 10, 2 << 20];

#[test]
fn byte_strings_cross_to_an_end_whose_limits_allow_no_fds() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    // (client, server): the server's socket takes no fds, then the client's, which would
    // each refuse a message that carries the region's or the pipe's fd.
    for (client, server) in [(1024, 0), (0, 1024)] {
        for lend in [false, true] {
            let (strings, handle) = strings_with_fds(client, server, lend);
            for round in 0..3 {
                for len in OUT_OF_LINE_SIZES {
                    let data = vec![round as u8 + 1; len];
                    let got = strings.echo(data.clone());
                    assert!(
                        got.as_ref().is_ok_and(|got| *got == data),
                        "fds {client}/{server}, lend {lend}, round {round}, {len} bytes: {:?}",
                        got.map(|got| got.len())
                    );
                }
            }
            drop(strings);
            handle.join().unwrap().unwrap();
        }
    }
    before.assert_nothing_new();
}

/// The same, with an async parent and an async worker.
#[cfg(feature = "tokio")]
mod asynchronous {
    use typed_ipc::Error;

    use crate::asynchronous::{finish, runtime, strings_between};
    use crate::common::{fd_count_lock, fd_snapshot};

    /// [`super::a_failure_that_cannot_be_sent_for_a_refused_request_ends_the_connection`],
    /// async.
    #[test]
    fn a_failure_that_cannot_be_sent_for_a_refused_request_ends_the_connection() {
        use typed_ipc::Limits;
        let _fds = fd_count_lock();
        runtime().block_on(async {
            let server = Limits {
                max_message_len: 100,
                max_send_len: Some(30),
                ..Limits::default()
            };
            let (strings, (conn, serving)) = strings_between(Limits::default(), server, false);
            let strings = strings.with_timeout(std::time::Duration::from_secs(60)); // a guard
            let refused = strings.echo(vec![7; 200]).await;
            assert!(matches!(refused, Err(Error::Disconnected)), "{refused:?}");
            drop((strings, conn));
            let served = serving.await.unwrap();
            assert!(
                matches!(&served, Err(Error::Io(e)) if e.to_string().contains("answered")),
                "{served:?}"
            );
        });
    }

    /// [`super::a_byte_string_out_of_the_socket_over_the_receivers_limit_is_too_large`],
    /// async: the server's refusal of a request's string in its region, or its pipe, and the
    /// client's of a reply's.
    #[test]
    fn a_byte_string_out_of_the_socket_over_the_receivers_limit_is_too_large() {
        use typed_ipc::Limits;
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        runtime().block_on(async {
            // The requests, as the server's refusal (in its region, or its pipe), then the
            // reply, as the client's.
            for (server_limit, lend) in [(100 << 10, false), (100 << 10, true), (1 << 30, false)] {
                let limits = |max_message_len| Limits {
                    max_message_len,
                    ..Limits::default()
                };
                let (strings, served) =
                    strings_between(limits(300 << 10), limits(server_limit), lend);
                assert_eq!(strings.echo(vec![1; 10]).await.unwrap(), vec![1; 10]);
                if server_limit < 200 << 10 {
                    let pipes = crate::common::fds_named("pipe:");
                    super::assert_too_large(
                        strings.echo(vec![2; 200 << 10]).await,
                        204_800,
                        102_400,
                        true,
                        &format!("lend {lend}"),
                    );
                    let piped = crate::common::fds_named("pipe:") > pipes;
                    assert_eq!(piped, lend, "piped if lent");
                    let after = strings.echo(vec![3; 50 << 10]).await;
                    assert_eq!(after.unwrap(), vec![3; 50 << 10]);
                } else {
                    super::assert_too_large(
                        strings.make(400 << 10).await,
                        409_600,
                        307_200,
                        false,
                        "the reply",
                    );
                    assert_eq!(strings.make(250 << 10).await.unwrap(), vec![9; 250 << 10]);
                }
                finish(strings, served).await;
            }
        });
        before.assert_nothing_new();
    }

    /// [`super::byte_strings_cross_to_an_end_whose_limits_allow_no_fds`], async.
    #[test]
    fn byte_strings_cross_to_an_end_whose_limits_allow_no_fds() {
        use typed_ipc::Limits;
        let _fds = fd_count_lock();
        let before = fd_snapshot();
        runtime().block_on(async {
            for (client, server) in [(1024, 0), (0, 1024)] {
                for lend in [false, true] {
                    let limits = |max_fds| Limits {
                        max_fds,
                        ..Limits::default()
                    };
                    let (strings, served) = strings_between(limits(client), limits(server), lend);
                    for round in 0..3 {
                        for len in super::OUT_OF_LINE_SIZES {
                            let data = vec![round as u8 + 1; len];
                            let got = strings.echo(data.clone()).await;
                            assert!(
                                got.as_ref().is_ok_and(|got| *got == data),
                                "fds {client}/{server}, lend {lend}, round {round}, {len} \
                                 bytes: {:?}",
                                got.map(|got| got.len())
                            );
                        }
                    }
                    finish(strings, served).await;
                }
            }
        });
        before.assert_nothing_new();
    }
}
