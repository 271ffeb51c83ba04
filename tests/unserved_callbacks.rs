//! A call whose peer calls back while nothing serves the caller's end (its services added with
//! `add_service`, no thread serving): the two ends wait for each other, silently until
//! 2026-12-06. Now the caller's end says so on stderr after two seconds, once, naming the call
//! it holds and what to do; and a thread that comes to serve later still runs that call.
//!
//! Nothing here synchronises by sleeping: the test reads the child's stderr and tells it, on
//! its stdin, when to start serving.

mod common;

use std::io::{BufRead, Write};
use std::process::Stdio;
use std::time::Duration;

use typed_ipc::Connection;

#[typed_ipc::interface]
pub trait Job {
    /// Reports each of `steps` steps back through `Events::progress`, then returns `steps`.
    fn run(&self, steps: u32) -> u32;
}

#[typed_ipc::interface]
pub trait Events {
    fn progress(&self, step: u32) -> u32;
}

struct JobImpl(EventsClient);

impl Job for JobImpl {
    fn run(&self, steps: u32) -> u32 {
        for step in 0..steps {
            assert_eq!(self.0.progress(step).unwrap(), step);
        }
        steps
    }
}

struct EventsImpl;

impl Events for EventsImpl {
    fn progress(&self, step: u32) -> u32 {
        step
    }
}

/// Hang guard for reading the child: far longer than the two seconds it takes to warn.
const GUARD: Duration = Duration::from_secs(60);

/// The process whose stderr the test reads: the plugin's `Job` serves on a thread over a pair,
/// and the host calls `run` with `Events` added but not served, until a line on stdin says to
/// serve it.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_calls_back_into_a_host_that_serves_late() {
    let (host, plugin) = Connection::pair().unwrap();
    std::thread::spawn(move || {
        let events = EventsClient::new(plugin.clone());
        JobServer::new(JobImpl(events)).serve(plugin)
    });
    host.add_service(EventsServer::new(EventsImpl));
    std::thread::spawn({
        let host = host.clone();
        move || {
            std::io::stdin().lock().lines().next();
            host.run()
        }
    });
    let ran = JobClient::new(host).run(3).unwrap();
    eprintln!("ran {ran} steps");
}

#[test]
fn a_call_held_for_a_thread_that_never_serves_is_said_once_and_runs_when_one_comes() {
    let mut command = common::child("child_calls_back_into_a_host_that_serves_late");
    let mut child = command
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::stderr_lines(&mut child);
    let mut said = Vec::new();
    let warning = loop {
        let line = lines.recv_timeout(GUARD).expect("the child warns");
        if line.contains("no thread serves this connection") {
            break line;
        }
        said.push(line);
    };
    for what in [
        "a call of this end's has waited 2 s for its reply",
        "the peer's call Events::progress waits here for a thread to serve it",
        "`add_service` alone runs nothing",
        // The way the guide serves callbacks, as the oneways' warning names it too.
        "`Connection::spawn_serve`",
    ] {
        assert!(warning.contains(what), "{what:?} not in {warning:?}");
    }
    // Serving now, the host runs the call held, and the rest without a word more.
    writeln!(child.stdin.take().unwrap(), "serve").unwrap();
    said.extend(lines.iter());
    assert!(child.wait().unwrap().success());
    assert_eq!(said, ["ran 3 steps"]);
}
