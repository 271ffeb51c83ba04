//! Oneway messages of the peer's that nothing on this end ever ran: when the connection goes
//! they are dropped unrun, and nobody waits for their outcome. Until 2026-12-07 that was
//! silent: a new user who forgot to serve the worker's progress callbacks got every call's
//! reply, no callback, and not a word (found by a usability review). Now the end says so on
//! stderr, once, with how many, the first one's method (by number if this end does not know
//! its interface), and what to do; both flavours, whether the connection is closed or dropped.
//! An end whose thread serves says nothing.
//!
//! Each scenario runs in a child process (this binary run again for one `#[ignore]`d test),
//! whose stderr the test reads; `UNSERVED_ENDING` says how the child's connection goes.
//! Nothing synchronises by sleeping: the worker's oneways go out before its reply, on the
//! same socket, so the caller has read them all once its call returns.

mod common;

use std::time::Duration;

use typed_ipc::{Connection, Socket};

#[cfg_attr(feature = "tokio", typed_ipc::interface(async_client))]
#[cfg_attr(not(feature = "tokio"), typed_ipc::interface)]
pub trait Job {
    /// Reports each of `steps` steps through `Reports::progress`, then returns `steps`.
    fn run(&self, steps: u32) -> u32;
}

#[typed_ipc::interface]
pub trait Reports {
    #[oneway]
    fn progress(&self, step: u32);
}

struct JobImpl(ReportsClient);

impl Job for JobImpl {
    fn run(&self, steps: u32) -> u32 {
        for step in 0..steps {
            self.0.progress(step).unwrap();
        }
        steps
    }
}

struct Ignored;

impl Reports for Ignored {
    fn progress(&self, _: u32) {}
}

/// Hang guard for reading the child.
const GUARD: Duration = Duration::from_secs(60);

/// What the line says, in every scenario that says it.
const SAID: [&str; 3] = [
    "3 oneway messages of the peer's were dropped unrun as the connection went",
    "nothing served this connection",
    "runs nothing",
];

/// The worker's end: serves `Job` on a thread over `theirs`, calling back through `Reports`.
fn start_worker(theirs: Socket) {
    let plugin = Connection::new(theirs);
    std::thread::spawn(move || {
        let reports = ReportsClient::new(plugin.clone());
        JobServer::new(JobImpl(reports)).serve(plugin)
    });
}

/// How the child's connection ends, from `UNSERVED_ENDING`: `drop`, `close`, `added` (its
/// `Reports` added but not served, then closed) or `served` (served on a thread, then closed).
fn ending() -> String {
    std::env::var("UNSERVED_ENDING").unwrap()
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_a_blocking_end_that_serves_nothing() {
    let (ours, theirs) = Socket::pair().unwrap();
    start_worker(theirs);
    let host = Connection::new(ours);
    let ending = ending();
    let serving = match ending.as_str() {
        "added" => {
            host.add_service(ReportsServer::new(Ignored));
            None
        }
        "served" => Some(host.spawn_serve(ReportsServer::new(Ignored)).unwrap()),
        _ => None,
    };
    let ran = JobClient::new(host.clone()).run(3).unwrap();
    eprintln!("ran {ran} steps");
    match ending.as_str() {
        "drop" => drop(host),
        _ => host.close(),
    }
    if let Some(serving) = serving {
        serving.join().unwrap().unwrap();
    }
    eprintln!("done");
}

#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_an_async_end_that_serves_nothing() {
    let (ours, theirs) = Socket::pair().unwrap();
    start_worker(theirs);
    let runtime = common::current_thread_runtime();
    runtime.block_on(async {
        let host = typed_ipc::tokio::AsyncConnection::new(ours).unwrap();
        let ran = JobAsyncClient::new(host.clone()).run(3).await.unwrap();
        eprintln!("ran {ran} steps");
        match ending().as_str() {
            "drop" => drop(host),
            _ => host.close(),
        }
    });
    // Its tasks go with the runtime, and the connection with its last task.
    drop(runtime);
    eprintln!("done");
}

/// The child's stderr lines, `child` run with `ending`, up to its last, `done`.
fn lines_of_child(child: &str, ending: &str) -> Vec<String> {
    let mut child = common::child(child)
        .env("UNSERVED_ENDING", ending)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::stderr_lines(&mut child);
    let mut said = Vec::new();
    loop {
        let line = lines.recv_timeout(GUARD).expect("the child says `done`");
        if line == "done" {
            break;
        }
        said.push(line);
    }
    assert!(child.wait().unwrap().success());
    said
}

/// Checks that `said` is the call's line and then the one saying what was dropped, naming
/// `first`.
fn assert_said_once(said: &[String], first: &str) {
    assert_eq!(said.len(), 2, "{said:?}");
    assert_eq!(said[0], "ran 3 steps");
    for what in SAID.iter().chain([&first]) {
        assert!(said[1].contains(what), "{what:?} not in {:?}", said[1]);
    }
}

#[test]
fn a_blocking_end_that_served_nothing_says_so_when_dropped() {
    let said = lines_of_child("child_a_blocking_end_that_serves_nothing", "drop");
    // The end does not know the interface: by number.
    assert_said_once(&said, "(the first: interface 0x");
}

#[test]
fn a_blocking_end_that_served_nothing_says_so_when_closed() {
    let said = lines_of_child("child_a_blocking_end_that_serves_nothing", "close");
    assert_said_once(&said, "(the first: interface 0x");
}

#[test]
fn a_blocking_end_with_the_service_added_but_not_served_names_the_method() {
    let said = lines_of_child("child_a_blocking_end_that_serves_nothing", "added");
    assert_said_once(&said, "(the first: Reports::progress)");
    assert!(
        said[1].contains("`add_service` alone runs nothing"),
        "{said:?}"
    );
}

#[test]
fn a_blocking_end_that_serves_says_nothing() {
    let said = lines_of_child("child_a_blocking_end_that_serves_nothing", "served");
    assert_eq!(said, ["ran 3 steps"]);
}

#[cfg(feature = "tokio")]
#[test]
fn an_async_end_that_served_nothing_says_so_when_dropped() {
    let said = lines_of_child("child_an_async_end_that_serves_nothing", "drop");
    assert_said_once(&said, "(the first: interface 0x");
}

#[cfg(feature = "tokio")]
#[test]
fn an_async_end_that_served_nothing_says_so_when_closed() {
    let said = lines_of_child("child_an_async_end_that_serves_nothing", "close");
    assert_said_once(&said, "(the first: interface 0x");
}
