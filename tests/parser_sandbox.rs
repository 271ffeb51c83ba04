//! The parser sandbox of `examples/parser_sandbox.rs`, run across real processes: a host
//! that holds an untrusted parser worker to limits of its own, feeds it input and files,
//! serves its progress reports, and must see each failure as the error the docs promise
//! (the parser's own, over the limits, a panic, a hang, an abort), restart the worker where
//! it must, and leak no fd.

mod common;

#[path = "../examples/parser_sandbox.rs"]
#[allow(dead_code)]
mod parser_sandbox;

use std::time::Duration;

use parser_sandbox::{HostConfig, run_host, run_worker};

/// The worker process: this test binary, re-run.
#[test]
#[ignore = "run as a child process by other tests"]
fn parser_worker() {
    run_worker().unwrap();
}

#[test]
fn a_parser_host_gets_the_promised_errors_from_an_untrusted_worker_and_leaks_nothing() {
    let _fds = common::fd_count_lock();
    let config = HostConfig {
        worker: || common::child("parser_worker"),
        // Only the hanging input waits this long; the rest is answered long before.
        timeout: Duration::from_secs(5),
    };
    let report = run_host(&config).unwrap();
    let failed: Vec<_> = report.checks.iter().filter(|(_, ok)| !ok).collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(report.checks.len(), 16, "{report:?}");
    // One worker, then one after the hang and one after the abort.
    assert_eq!(report.started, 3);
    assert_eq!(
        report.fds_after, report.fds_before,
        "fds leaked: {report:?}"
    );
}
