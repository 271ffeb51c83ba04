//! The plugin host of `examples/plugin_host.rs`, run across real processes: two workers of
//! an untrusted image filter, which abort on a frame, never return from another, panic on
//! another. The host must report each failure as what it is, restart the worker, carry on
//! with correct results, shut down cleanly (killing a worker that ignores the hang-up) and
//! leak no fd.

mod common;

#[path = "../examples/plugin_host.rs"]
#[allow(dead_code)]
mod plugin_host;

use std::time::Duration;

use plugin_host::{FilterError, HostConfig, Input, Outcome, run_host, run_worker};
use typed_ipc::worker::Exit;

/// The worker process: this test binary, re-run.
#[test]
#[ignore = "run as a child process by other tests"]
fn plugin_worker() {
    run_worker().unwrap();
}

#[test]
fn a_plugin_host_survives_a_crash_a_hang_and_a_panic_and_leaks_nothing() {
    let _fds = common::fd_count_lock();
    let config = HostConfig {
        worker: || common::child("plugin_worker"),
        width: 2048,
        height: 1024,
        // Only the hanging frame, and the worker that ignores the hang-up, wait this long;
        // the others are answered, and exit, long before.
        timeout: Duration::from_secs(5),
    };
    use Input::*;
    let inputs = [Good, Good, Crash, Hang, Short, Panic, Good, Linger];
    let report = run_host(&config, &inputs).unwrap();
    let outcomes = &report.outcomes;
    assert_eq!(outcomes.len(), 8, "{report:?}");

    let pid_of = |i: usize| match outcomes[i] {
        (_, Outcome::Filtered { pid, correct }) => {
            assert!(correct, "frame {i}: a wrong result: {report:?}");
            pid
        }
        ref other => panic!("frame {i}: {other:?}, not filtered: {report:?}"),
    };
    let (first_a, first_b) = (pid_of(0), pid_of(1));
    assert_ne!(first_a, first_b, "two workers");
    assert!(![first_a, first_b].contains(&std::process::id()));

    assert_eq!(
        outcomes[2],
        (0, Outcome::Crashed(Exit::Signal(6))),
        "SIGABRT"
    );
    assert_eq!(
        outcomes[3],
        (1, Outcome::TimedOut(Exit::Signal(9))),
        "killed"
    );
    assert_eq!(
        outcomes[4],
        (
            0,
            Outcome::Rejected(FilterError::SizeMismatch {
                expected: 2048 * 1024,
                got: 1024 * 1024
            })
        )
    );
    match &outcomes[5] {
        (1, Outcome::Panicked(why)) => assert!(why.contains("frame 5"), "{why}"),
        other => panic!("frame 5: {other:?}, not a panic"),
    }
    // The restarted workers serve: new processes.
    let (second_a, third_b) = (pid_of(6), pid_of(7));
    assert!(second_a != first_a && third_b != first_b, "{report:?}");

    assert_eq!(report.started, 5);
    // A exited when the host hung up; B lingered after frame 7 and was killed.
    assert_eq!(report.final_exits, [Exit::Code(0), Exit::Signal(9)]);
    assert_eq!(
        report.fds_after, report.fds_before,
        "fds leaked: {report:?}"
    );
}
