//! The codec daemon of `examples/codec_daemon.rs`, run across real processes: a daemon
//! serving clients of a socket path, each in a process of its own, that must see what the docs
//! promise (their own errors, the daemon's limits, a ban, a refusal, a timeout that cancels
//! the daemon's handler, a client killed mid-call, a graceful shutdown that answers the call
//! in flight), with no fd left behind in the daemon, in any client, or in this process.

#![cfg(feature = "tokio")]

mod common;

#[path = "../examples/codec_daemon.rs"]
#[allow(dead_code)]
mod codec_daemon;

/// The daemon and the clients: this test binary, re-run with their arguments.
#[test]
#[ignore = "run as a child process by other tests"]
fn codec_daemon_role() {
    let args = std::env::var("CODEC_DAEMON_ARGS").unwrap();
    let args: Vec<String> = args.split('\n').map(String::from).collect();
    codec_daemon::run_role(&args).unwrap();
}

#[test]
fn a_codec_daemon_serves_its_clients_as_promised_and_leaks_nothing() {
    let _fds = common::fd_count_lock();
    let before = common::fd_snapshot();
    let report = codec_daemon::orchestrate(&|args| {
        let mut command = common::child("codec_daemon_role");
        command.env("CODEC_DAEMON_ARGS", args.join("\n"));
        command
    });
    // The daemon checked that it holds what it held before any client came, once they have
    // gone, and said so.
    let stopped = ": 7 sessions, 3 cancelled, 0 clients gone mid-call";
    assert_eq!(report.stopped, stopped, "{report:?}");
    assert_eq!(report.first.sessions_made, 1, "the admin's: {report:?}");
    // What TYPED_IPC_DEBUG=1 said in the well-behaved client: its calls with their values,
    // the daemon's callbacks and its own answers, the refusal, and the hang-up.
    let lines: Vec<&str> = report.trace.lines().collect();
    let said = |what: &str| {
        assert!(
            lines.iter().any(|line| line.contains(what)),
            "no line saying {what:?} in:\n{}",
            report.trace
        );
    };
    said("-> Oneway org.example.Codec::set_quality(9)");
    said("-> Call #1 org.example.Codec::encode(fd(");
    said("<- Call #1 org.example.CodecEvents::progress (");
    said("-> Reply #1 true");
    said("org.example.Codec::attach_planes([fd(");
    said("-> Call #8 org.example.CodecAdmin::status()");
    said("<- Failure #8 (");
    said("-- Ended: closed by this side");
    // Each line names this client's connection and the daemon's pid as its peer.
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("typed-ipc[") && l.contains(" c1 peer "))
    );
    before.assert_nothing_new();
}
