//! The seccomp recipe of docs/guide/sandboxing.md, as a user would write it: a worker that
//! takes its connection, locks itself in with the `seccompiler` crate from
//! `worker::sandbox::SYSCALLS` (plus its own code's calls, and `tgkill` to its own pid only),
//! and serves. It serves calls with strings and fds under a filter that kills the process at
//! any other call; a call outside the list kills it (`SIGSYS`), as does signalling another
//! process, and an abort is still read as one (`SIGABRT`: the `tgkill` rule lets it through).
#![cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]

mod common;

use std::io::{Seek, SeekFrom};
use std::os::fd::OwnedFd;

use common::{child, fd_count_lock, fd_snapshot, memfd};
use typed_ipc::interface;
use typed_ipc::worker::{self, Exit, Worker};

#[interface]
pub trait Confined {
    /// `text`, reversed.
    fn reverse(&self, text: String) -> String;
    /// The length of the file behind `file` (the worker's own code seeks: `lseek`).
    fn file_len(&self, file: OwnedFd) -> u64;
    /// Opens `path`, which the filter does not allow: the worker dies of `SIGSYS`.
    fn open(&self, path: String) -> Result<u64, String>;
    /// Aborts: the worker dies of `SIGABRT`, as `tgkill` to its own pid is allowed.
    fn abort(&self);
    /// Signals process `pid` (signal 0, which only checks), which the `tgkill` rule refuses
    /// for any pid but the worker's own: the worker dies of `SIGSYS`.
    fn signal(&self, pid: u32) -> i64;
}

struct ConfinedImpl;

impl Confined for ConfinedImpl {
    fn reverse(&self, text: String) -> String {
        text.chars().rev().collect()
    }
    fn file_len(&self, file: OwnedFd) -> u64 {
        std::fs::File::from(file).seek(SeekFrom::End(0)).unwrap()
    }
    fn open(&self, path: String) -> Result<u64, String> {
        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        file.metadata().map(|m| m.len()).map_err(|e| e.to_string())
    }
    fn abort(&self) {
        std::process::abort();
    }
    fn signal(&self, pid: u32) -> i64 {
        let pid = libc::c_long::from(pid);
        // SAFETY: tgkill with signal 0 sends nothing; it takes integers only.
        unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, 0) }
    }
}

// The recipe, as the guide gives it.
mod recipe {
    use std::collections::BTreeMap;

    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule,
    };
    use typed_ipc::worker::sandbox::{Need, SYSCALLS};

    /// What this worker's own code calls on top of typed-ipc's list.
    const OWN_CODE: &[libc::c_long] = &[libc::SYS_lseek];

    /// Installs a filter on every thread of this process that allows what typed-ipc's
    /// serving needs (threads, and a crash read as what it is, included) and `OWN_CODE`, and
    /// kills the process at any other call.
    pub fn lock_in() -> Result<(), Box<dyn std::error::Error>> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = SYSCALLS
            .iter()
            .filter(|call| matches!(call.need, Need::Always | Need::Threads | Need::Crash))
            .map(|call| call.number)
            .chain(OWN_CODE.iter().copied())
            .map(|number| (number, vec![])) // no rule: any arguments
            .collect();
        // An abort signals this process, and only this one may be signalled.
        let this_process = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            std::process::id().into(),
        )?;
        rules.insert(
            libc::SYS_tgkill,
            vec![SeccompRule::new(vec![this_process])?],
        );
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::KillProcess, // any other call
            SeccompAction::Allow,
            std::env::consts::ARCH.try_into()?,
        )?;
        let program: BpfProgram = filter.try_into()?;
        // Sets `PR_SET_NO_NEW_PRIVS` first; the filter reaches threads started before.
        seccompiler::apply_filter_all_threads(&program)?;
        Ok(())
    }
}

#[test]
#[ignore = "run as a child process by other tests"]
fn child_confined() {
    let connection = worker::connection().unwrap();
    recipe::lock_in().unwrap();
    ConfinedServer::new(ConfinedImpl).serve(connection).unwrap();
}

/// Calls with a string and with an fd are served under the filter, and the worker exits
/// with 0 at the hang-up: its list was complete for them. No fd of the parent's is left.
#[test]
fn a_worker_locked_in_by_the_recipe_serves() {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let (mut worker, connection) = Worker::spawn(child("child_confined")).unwrap();
    let client = ConfinedClient::new(connection);
    assert_eq!(client.reverse("sandbox".into()).unwrap(), "xobdnas");
    for len in [0, 1234, 1 << 20] {
        assert_eq!(client.file_len(memfd(&vec![7; len])).unwrap(), len as u64);
    }
    drop(client);
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    drop(worker);
    before.assert_nothing_new();
}

/// Runs `call` on a worker under the recipe: its caller hears `Disconnected` at once (not a
/// timeout), and the worker's end says it died of `signal`.
fn dies_of<T: std::fmt::Debug>(
    call: impl FnOnce(&ConfinedClient) -> Result<T, typed_ipc::Error>,
    signal: i32,
) {
    let _fds = fd_count_lock();
    let (mut worker, connection) = Worker::spawn(child("child_confined")).unwrap();
    let client = ConfinedClient::new(connection);
    assert_eq!(client.reverse("ok".into()).unwrap(), "ko");
    let got = call(&client);
    assert!(
        matches!(got, Err(typed_ipc::Error::Disconnected)),
        "{got:?}"
    );
    assert_eq!(worker.wait().unwrap(), Exit::Signal(signal));
}

/// A call outside the list kills the worker: `SIGSYS`.
#[test]
fn a_call_outside_the_list_kills_the_worker() {
    dies_of(
        |client| client.open("/proc/self/status".into()),
        libc::SIGSYS,
    );
}

/// The `tgkill` rule lets the worker signal itself only: signalling its parent kills it.
#[test]
fn signalling_another_process_kills_the_worker() {
    dies_of(|client| client.signal(std::process::id()), libc::SIGSYS);
}

/// An abort still reads as one under the filter: `tgkill` to the worker's own pid passes
/// the rule.
#[test]
fn an_abort_under_the_filter_is_read_as_an_abort() {
    dies_of(|client| client.abort(), libc::SIGABRT);
}

/// The guide's recipe is this file's `recipe` module, line for line (indentation aside): what
/// the guide gives is what these tests run.
#[test]
fn the_guide_gives_the_recipe_tested_here() {
    let trimmed = |text: &str| -> Vec<String> {
        let lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
        lines.map(String::from).collect()
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let guide = std::fs::read_to_string(format!("{root}/docs/guide/sandboxing.md")).unwrap();
    let (_, recipe) = guide.split_once("## The recipe").unwrap();
    let (_, block) = recipe.split_once("```rust\n").unwrap();
    let (block, _) = block.split_once("// In the worker's main").unwrap();
    let guide = trimmed(block);
    let this = std::fs::read_to_string(format!("{root}/tests/seccomp_recipe.rs")).unwrap();
    let this = trimmed(&this);
    assert!(guide.len() > 30, "the guide's recipe: {guide:#?}");
    assert!(
        this.windows(guide.len())
            .any(|lines| lines == guide.as_slice()),
        "docs/guide/sandboxing.md's recipe is not this file's `recipe` module:\n{}",
        guide.join("\n")
    );
}
