//! Re-entrant calls across real processes: both ends serve and call at once. The parent
//! serves `Host`, the worker serves `Plugin`; `Plugin::run` at depth `d` calls `Host::step`
//! at `d - 1`, whose handler calls `Plugin::run` at `d - 2`, and so on down to 0: a chain of
//! `TOP + 1` levels alternating direction. Each level is handed a memfd holding its label and
//! checks it, checks that the `#[oneway]` note its caller sent just before the call has run
//! (a call runs only once the oneways sent before it have), and returns a memfd with the
//! trace of the levels below plus its own, which the top compares exactly. Every chain has a
//! tag of its own, so a reply, fd or note routed to the wrong chain shows.
//!
//! All four pairings of a blocking or async parent with a blocking or async worker; several
//! chains at once; failures mid-chain (a panic, a method's error, the worker SIGKILLed by
//! itself or by a level in the parent); and the top giving up (timeout, or its future
//! dropped) while the levels below still run. Where a test must know that a chain is still
//! running, its bottom parent level waits at a `Gate` the test opens: nothing waits on time.
//! Neither process keeps an fd once its connection is gone (the worker checks its own, and
//! exits 0 only if it kept none).
//!
//! The worker is this test binary run again for one `#[ignore]`d test (`child_*`).

mod common;

use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{abort_after, child, fd_count_lock, fd_snapshot, memfd, read_all};
use typed_ipc::Error;
use typed_ipc::worker::{Exit, Killer, Worker};

/// The depth of a chain's top level, a `Plugin::run` in the worker.
const TOP: u32 = 8;
/// Chains in flight at once.
const CHAINS: u32 = 4;
/// The chains of a test: `CHAINS` at once, `ROUNDS` each, tagged `100 * chain + round`.
const ROUNDS: u32 = 6;
/// Serving threads of a blocking end. A blocking handler keeps its thread while the levels
/// below it run (`Connection` docs: as many serving threads as calls may nest), so a chain
/// holds up to `TOP / 2 + 1` threads at each end, and one more runs the notes meanwhile.
const THREADS: usize = (CHAINS * (TOP / 2 + 1) + 1) as usize;
/// The parent's level nearest the bottom, where chains are held at the gate.
const HELD_AT: u32 = 1 - TOP % 2;
/// A worker's level near the bottom, which kills the worker; the one above is the parent's.
const KILLED_AT: u32 = 2 + TOP % 2;
/// How long a top waits before it gives up on a chain: any time will do, as the chain is
/// held at the gate until the top has given up.
const PATIENCE: Duration = Duration::from_millis(50);

/// What a chain's levels are told to do besides their work, each at the depth it names.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    None,
    PanicAt(u32),
    /// The method's own error.
    ErrorAt(u32),
    /// In the worker: SIGKILL itself. In the parent: `Killer::kill` the worker, and call on.
    KillAt(u32),
    /// The parent's level waits at the gate until the test opens it.
    GateAt(u32),
}

/// One level of one chain.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Level {
    pub tag: u32,
    pub depth: u32,
    pub fault: Fault,
}

mod blocking {
    use super::Level;
    use std::os::fd::OwnedFd;

    /// Served by the worker.
    #[typed_ipc::interface(name = "reentry.Plugin")]
    pub trait Plugin {
        /// `input` holds the level's label; returns the trace of the chain from here down.
        fn run(&self, level: Level, input: OwnedFd) -> Result<OwnedFd, String>;
        /// Sent before each call: the depth about to be called.
        #[oneway]
        fn note(&self, tag: u32, depth: u32);
        /// The notes received for `tag`, in the order they ran.
        fn notes(&self, tag: u32) -> Vec<u32>;
    }

    /// Served by the parent.
    #[typed_ipc::interface(name = "reentry.Host")]
    pub trait Host {
        fn step(&self, level: Level, input: OwnedFd) -> Result<OwnedFd, String>;
        #[oneway]
        fn note(&self, tag: u32, depth: u32);
    }
}

/// The same interfaces, async flavour: one wire with the blocking ones (`async` is not part
/// of the signature, and the names and types are spelled alike).
#[cfg(feature = "tokio")]
mod asynchronous {
    use super::Level;
    use std::os::fd::OwnedFd;

    #[typed_ipc::interface(name = "reentry.Plugin")]
    pub trait Plugin {
        async fn run(&self, level: Level, input: OwnedFd) -> Result<OwnedFd, String>;
        #[oneway]
        async fn note(&self, tag: u32, depth: u32);
        async fn notes(&self, tag: u32) -> Vec<u32>;
    }

    #[typed_ipc::interface(name = "reentry.Host")]
    pub trait Host {
        async fn step(&self, level: Level, input: OwnedFd) -> Result<OwnedFd, String>;
        #[oneway]
        async fn note(&self, tag: u32, depth: u32);
    }
}

// ---- what every level does, whatever its side and flavour ----

/// A level's name: `W8` in the worker, `H7` in the parent (host).
fn name(depth: u32) -> String {
    let side = if depth % 2 == TOP % 2 { 'W' } else { 'H' };
    format!("{side}{depth}")
}

impl Level {
    fn top(tag: u32, fault: Fault) -> Level {
        Level {
            tag,
            depth: TOP,
            fault,
        }
    }

    fn below(self) -> Level {
        Level {
            depth: self.depth - 1,
            ..self
        }
    }

    /// What the level is handed.
    fn label(self) -> OwnedFd {
        memfd(format!("{}:{}", self.tag, self.depth).as_bytes())
    }

    /// Whether its planned fault is `fault` here.
    fn is(self, fault: fn(u32) -> Fault) -> bool {
        self.fault == fault(self.depth)
    }
}

/// The trace a whole chain returns to its top.
fn full_trace(tag: u32) -> String {
    let levels: Vec<String> = (0..=TOP).map(name).collect();
    format!("#{tag} {}", levels.join(" "))
}

/// The method error a chain returns when level `at` failed with `why`: each level above
/// prefixes itself.
fn failed_at(at: u32, why: &str) -> String {
    let above: Vec<String> = (at + 1..=TOP).rev().map(name).collect();
    format!("{}<{why}", above.join("<"))
}

/// A typed-ipc error as the levels pass it up (its text varies, its kind is what counts).
fn kind(e: &Error) -> String {
    match e {
        Error::Panicked(_) => "Panicked".into(),
        other => format!("{other:?}"),
    }
}

type Outcome = Result<Result<OwnedFd, String>, Error>;

/// What an end remembers: the notes it received and the typed-ipc errors its levels saw
/// from the level below, each with its chain's tag.
#[derive(Default)]
struct Log {
    notes: Mutex<Vec<(u32, u32)>>,
    errors: Mutex<Vec<(u32, String)>>,
}

impl Log {
    fn note(&self, tag: u32, depth: u32) {
        self.notes.lock().unwrap().push((tag, depth));
    }

    fn notes(&self, tag: u32) -> Vec<u32> {
        let notes = self.notes.lock().unwrap();
        notes.iter().filter(|n| n.0 == tag).map(|n| n.1).collect()
    }

    /// The errors seen in chain `tag`, sorted.
    fn errors(&self, tag: u32) -> Vec<String> {
        let errors = self.errors.lock().unwrap();
        let mut seen: Vec<String> = errors
            .iter()
            .filter(|e| e.0 == tag)
            .map(|e| e.1.clone())
            .collect();
        seen.sort();
        seen
    }

    /// A level's checks before it calls the next one, and its planned failure. A check that
    /// fails is the method's error, which reaches the top and fails its exact comparison.
    fn enter(&self, level: Level, input: OwnedFd) -> Result<(), String> {
        let me = name(level.depth);
        let got = String::from_utf8_lossy(&read_all(input)).into_owned();
        if got != format!("{}:{}", level.tag, level.depth) {
            return Err(format!("{me}: handed {got:?}"));
        }
        // The caller sent the note just before the call: it has run, and was the chain's last.
        let last = self.notes(level.tag).last().copied();
        if last != Some(level.depth) {
            return Err(format!("{me}: the last note was {last:?}"));
        }
        if level.is(Fault::PanicAt) {
            panic!("{me}: panicking as planned");
        }
        if level.is(Fault::ErrorAt) {
            return Err(format!("{me}!"));
        }
        if level.is(Fault::KillAt) && me.starts_with('W') {
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).unwrap();
        }
        Ok(())
    }

    /// A level's answer, from the answer of the level below (`None` at the bottom).
    fn leave(&self, level: Level, inner: Option<Outcome>) -> Result<OwnedFd, String> {
        let me = name(level.depth);
        match inner {
            None => Ok(memfd(format!("#{} {me}", level.tag).as_bytes())),
            Some(Ok(Ok(fd))) => {
                let below = String::from_utf8_lossy(&read_all(fd)).into_owned();
                Ok(memfd(format!("{below} {me}").as_bytes()))
            }
            Some(Ok(Err(why))) => Err(format!("{me}<{why}")),
            Some(Err(e)) => {
                let seen = format!("{me}<{}", kind(&e));
                self.errors.lock().unwrap().push((level.tag, seen.clone()));
                Err(seen)
            }
        }
    }
}

/// The trace a chain returned, or its failure as text.
fn trace(outcome: Outcome) -> Result<String, String> {
    match outcome {
        Ok(Ok(fd)) => Ok(String::from_utf8_lossy(&read_all(fd)).into_owned()),
        Ok(Err(why)) => Err(why),
        Err(e) => Err(failure(&e)),
    }
}

/// A typed-ipc error as the top reports it.
fn failure(e: &Error) -> String {
    format!("typed-ipc: {}", kind(e))
}

fn disconnected() -> Result<String, String> {
    Err("typed-ipc: Disconnected".into())
}

/// Where the parent's levels wait when told to (`Fault::GateAt`), and how many of its
/// handlers run: a test knows from it that a chain is held mid-way, and when every handler
/// here has ended.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    open: bool,
    waiting: u32,
    running: u32,
}

/// A handler of the parent's, counted while it runs (or until its future is dropped).
struct Running<'a>(&'a Gate);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.update(|s| s.running -= 1);
    }
}

/// Opens the gate when dropped: a test that fails while chains are held at it lets them go,
/// and fails rather than waits for them for good.
struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.update(|s| s.open = true);
    }
}

impl Gate {
    fn update(&self, f: impl FnOnce(&mut GateState)) {
        f(&mut self.state.lock().unwrap());
        self.changed.notify_all();
    }

    fn running(&self) -> Running<'_> {
        self.update(|s| s.running += 1);
        Running(self)
    }

    fn pass(&self) {
        self.update(|s| s.waiting += 1);
        self.wait_until(|s| s.open);
        self.update(|s| s.waiting -= 1);
    }

    fn wait_until(&self, cond: impl Fn(&GateState) -> bool) {
        let state = self.state.lock().unwrap();
        drop(self.changed.wait_while(state, |s| !cond(s)).unwrap());
    }
}

/// A parent's `Host`, and what its tests read.
struct Parent<P> {
    plugin: P,
    log: Log,
    gate: Arc<Gate>,
    killer: Killer,
}

/// A worker's `Plugin`.
struct Child<H> {
    host: H,
    log: Log,
}

impl blocking::Plugin for Child<blocking::HostClient> {
    fn run(&self, level: Level, input: OwnedFd) -> Result<OwnedFd, String> {
        self.log.enter(level, input)?;
        let inner = (level.depth > 0).then(|| {
            // A note that does not arrive shows at the next level's check.
            let _ = self.host.note(level.tag, level.depth - 1);
            self.host.step(level.below(), level.below().label())
        });
        self.log.leave(level, inner)
    }

    fn note(&self, tag: u32, depth: u32) {
        self.log.note(tag, depth);
    }

    fn notes(&self, tag: u32) -> Vec<u32> {
        self.log.notes(tag)
    }
}

impl blocking::Host for Parent<blocking::PluginClient> {
    fn step(&self, level: Level, input: OwnedFd) -> Result<OwnedFd, String> {
        let _running = self.gate.running();
        self.log.enter(level, input)?;
        if level.is(Fault::GateAt) {
            self.gate.pass();
        }
        if level.is(Fault::KillAt) {
            self.killer.kill().unwrap();
        }
        let inner = (level.depth > 0).then(|| {
            let _ = self.plugin.note(level.tag, level.depth - 1);
            self.plugin.run(level.below(), level.below().label())
        });
        self.log.leave(level, inner)
    }

    fn note(&self, tag: u32, depth: u32) {
        self.log.note(tag, depth);
    }
}

#[cfg(feature = "tokio")]
impl asynchronous::Plugin for Child<asynchronous::HostClient> {
    async fn run(&self, level: Level, input: OwnedFd) -> Result<OwnedFd, String> {
        self.log.enter(level, input)?;
        let mut inner = None;
        if level.depth > 0 {
            let _ = self.host.note(level.tag, level.depth - 1).await;
            inner = Some(self.host.step(level.below(), level.below().label()).await);
        }
        self.log.leave(level, inner)
    }

    async fn note(&self, tag: u32, depth: u32) {
        self.log.note(tag, depth);
    }

    async fn notes(&self, tag: u32) -> Vec<u32> {
        self.log.notes(tag)
    }
}

#[cfg(feature = "tokio")]
impl asynchronous::Host for Parent<asynchronous::PluginClient> {
    async fn step(&self, level: Level, input: OwnedFd) -> Result<OwnedFd, String> {
        let _running = self.gate.running();
        self.log.enter(level, input)?;
        if level.is(Fault::GateAt) {
            let gate = self.gate.clone();
            tokio::task::spawn_blocking(move || gate.pass())
                .await
                .unwrap();
        }
        if level.is(Fault::KillAt) {
            self.killer.kill().unwrap(); // a signal and a flag: nothing that blocks
        }
        let mut inner = None;
        if level.depth > 0 {
            let _ = self.plugin.note(level.tag, level.depth - 1).await;
            inner = Some(self.plugin.run(level.below(), level.below().label()).await);
        }
        self.log.leave(level, inner)
    }

    async fn note(&self, tag: u32, depth: u32) {
        self.log.note(tag, depth);
    }
}

// ---- the workers ----

#[test]
#[ignore = "run as a child process by other tests"]
fn child_blocking_plugin() {
    let before = fd_snapshot();
    let conn = typed_ipc::worker::connection().unwrap();
    let plugin = Child {
        host: blocking::HostClient::new(conn.clone()),
        log: Log::default(),
    };
    let server = typed_ipc::Server::new().service(blocking::PluginServer::new(plugin));
    server.threads(THREADS).serve(&conn).unwrap();
    // Nothing outlives the connection here either: fds of calls given up, replies dropped.
    drop(conn);
    before.assert_nothing_new();
}

#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_async_plugin() {
    // A current-thread runtime, as a worker's `main` would start; the parent's has two.
    common::current_thread_runtime().block_on(async {
        let before = fd_snapshot();
        let conn = typed_ipc::tokio::worker::connection().unwrap();
        let host = asynchronous::HostClient::new(conn.clone());
        let plugin = Child {
            host,
            log: Log::default(),
        };
        asynchronous::PluginServer::new(plugin)
            .serve(conn)
            .await
            .unwrap();
        before.assert_nothing_new();
    });
}

// ---- what the parent expects, in either flavour ----

/// What chain `tag` is told to do, and what its top must see. Every other round fails
/// somewhere while the other chains run on: panics at both ends, errors at both ends and at
/// the bottom. Every level above the failing one says it saw the failure below.
fn plan(tag: u32) -> (Fault, Result<String, String>) {
    let error = |at| (Fault::ErrorAt(at), failed_at(at, &format!("{}!", name(at))));
    let failures = [
        (Fault::PanicAt(4), failed_at(4, "Panicked")),
        (Fault::PanicAt(3), failed_at(3, "Panicked")),
        error(5),
        error(2),
        error(0),
    ];
    match tag % 100 {
        round if round % 2 == 1 => {
            let (fault, why) = failures[(tag / 100 + round / 2) as usize % failures.len()].clone();
            (fault, Err(why))
        }
        _ => (Fault::None, Ok(full_trace(tag))),
    }
}

/// The notes of a chain that ran through, at the end whose levels are named `side…`.
fn notes_of(side: char) -> Vec<u32> {
    (0..=TOP)
        .rev()
        .filter(|&d| name(d).starts_with(side))
        .collect()
}

/// The errors the parent's levels from `at` up saw when the worker died at `at` (a held
/// chain's bottom level here, once past the gate, sees the worker gone too).
fn disconnected_from(at: u32) -> Vec<String> {
    let here = (at..=TOP).map(name).filter(|n| n.starts_with('H'));
    let mut seen: Vec<String> = here.map(|n| format!("{n}<Disconnected")).collect();
    seen.sort();
    seen
}

/// A hang guard that stays armed while a failure unwinds (its `Sender` is not dropped), in
/// case the unwinding itself waits for good.
fn hang_guard(what: &'static str) -> std::mem::ManuallyDrop<std::sync::mpsc::Sender<()>> {
    std::mem::ManuallyDrop::new(abort_after(what, Duration::from_secs(120)))
}

// ---- a blocking parent ----

type Serving = std::thread::JoinHandle<typed_ipc::Result<()>>;

/// A worker, and a thread serving its calls into this process.
fn start_blocking(worker: &str) -> (Worker, Arc<Parent<blocking::PluginClient>>, Serving) {
    let (worker, conn) = Worker::spawn(child(worker)).unwrap();
    let plugin = blocking::PluginClient::new(conn.clone());
    let (log, gate, killer) = (Log::default(), Arc::default(), worker.killer().unwrap());
    let parent = Arc::new(Parent {
        plugin,
        log,
        gate,
        killer,
    });
    let server = typed_ipc::Server::new().service(blocking::HostServer::from_arc(parent.clone()));
    let serving = std::thread::spawn(move || server.threads(THREADS).serve(&conn));
    (worker, parent, serving)
}

/// A chain from the top: the note its top level checks for, then the call.
fn chain(plugin: &blocking::PluginClient, tag: u32, fault: Fault) -> Result<String, String> {
    plugin.note(tag, TOP).map_err(|e| failure(&e))?;
    trace(plugin.run(Level::top(tag, fault), Level::top(tag, fault).label()))
}

fn blocking_parent(worker_name: &str) {
    let _fds = fd_count_lock();
    let before = fd_snapshot();
    let disarm = hang_guard("re-entrant chains of a blocking parent");
    let (mut worker, parent, serving) = start_blocking(worker_name);
    let _release = OpenOnDrop(parent.gate.clone());
    let (plugin, log) = (&parent.plugin, &parent.log);

    // Chains from several threads at once, checked exactly, notes included. Failures
    // mid-chain reach the top through every level, and the connection serves on.
    std::thread::scope(|s| {
        for thread in 0..CHAINS {
            s.spawn(move || {
                for tag in (0..ROUNDS).map(|round| thread * 100 + round) {
                    let (fault, want) = plan(tag);
                    assert_eq!(chain(plugin, tag, fault), want, "{fault:?}");
                    if fault == Fault::None {
                        assert_eq!(plugin.notes(tag).unwrap(), notes_of('W'));
                        assert_eq!(log.notes(tag), notes_of('H'));
                    }
                }
            });
        }
    });

    // The top gives up while the levels below it still run: the chain cannot end while its
    // bottom level here waits at the gate. A blocking level runs on when its caller gives up,
    // an async one is dropped; either way every level here ends once the gate opens, with
    // no error, and the connection serves on. (The client is a temporary: one kept would
    // keep the connection open past the hang-up below.)
    let timed_out = chain(&plugin.with_timeout(PATIENCE), 1200, Fault::GateAt(HELD_AT));
    assert_eq!(timed_out, Err("typed-ipc: TimedOut".into()));
    parent.gate.update(|s| s.open = true);
    assert_eq!(chain(plugin, 1201, Fault::None), Ok(full_trace(1201)));
    parent.gate.wait_until(|s| s.running == 0);
    assert_eq!(log.errors(1200), Vec::<String>::new());

    // The service holds a client of the worker: hang up with `close`.
    plugin.connection().close();
    serving.join().unwrap().unwrap();
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    drop((worker, parent));

    // The worker dies mid-chain: killing itself, or killed by a level of this process's.
    blocking_kill(worker_name, KILLED_AT);
    blocking_kill(worker_name, KILLED_AT + 1);

    before.assert_nothing_new();
    disarm.send(()).unwrap();
}

/// The worker killed at level `at` of one chain, while the others are held mid-way here.
fn blocking_kill(worker_name: &str, at: u32) {
    let (mut worker, parent, serving) = start_blocking(worker_name);
    let plugin = &parent.plugin;
    std::thread::scope(|s| {
        // In the scope: a failure lets the held chains go before the scope waits for them.
        let _release = OpenOnDrop(parent.gate.clone());
        let held: Vec<_> = (2000..2000 + CHAINS - 1)
            .map(|tag| s.spawn(move || chain(plugin, tag, Fault::GateAt(HELD_AT))))
            .collect();
        parent.gate.wait_until(|s| s.waiting == CHAINS - 1);
        assert_eq!(chain(plugin, 2100, Fault::KillAt(at)), disconnected());
        // The held chains' tops are told at once, though their bottom levels still wait.
        for chain in held {
            assert_eq!(chain.join().unwrap(), disconnected());
        }
        assert!(!parent.gate.state.lock().unwrap().open);
        // `Server::serve` returns only once its every thread's handler has run to its end.
        assert!(!serving.is_finished(), "serve ended early");
    });
    // Every handler here returns, each level having seen the worker go.
    serving.join().unwrap().unwrap();
    assert!(plugin.connection().is_closed());
    assert_eq!(chain(plugin, 2200, Fault::None), disconnected());
    assert_eq!(parent.log.errors(2100), disconnected_from(at));
    for tag in 2000..2000 + CHAINS - 1 {
        assert_eq!(parent.log.errors(tag), disconnected_from(HELD_AT));
    }
    assert_eq!(worker.wait().unwrap(), Exit::Signal(9));
}

#[test]
fn a_blocking_parent_and_a_blocking_worker_nest_calls() {
    blocking_parent("child_blocking_plugin");
}

#[cfg(feature = "tokio")]
#[test]
fn a_blocking_parent_and_an_async_worker_nest_calls() {
    blocking_parent("child_async_plugin");
}

// ---- an async parent ----

#[cfg(feature = "tokio")]
type AsyncServing = tokio::task::JoinHandle<typed_ipc::Result<()>>;

/// A worker, and the task serving its calls into this process.
#[cfg(feature = "tokio")]
fn start_async(
    worker: &str,
) -> (
    Worker,
    Arc<Parent<asynchronous::PluginClient>>,
    AsyncServing,
) {
    let (worker, conn) = typed_ipc::tokio::worker::spawn(child(worker)).unwrap();
    let plugin = asynchronous::PluginClient::new(conn.clone());
    let (log, gate, killer) = (Log::default(), Arc::default(), worker.killer().unwrap());
    let parent = Arc::new(Parent {
        plugin,
        log,
        gate,
        killer,
    });
    let serving = tokio::spawn(asynchronous::HostServer::from_arc(parent.clone()).serve(conn));
    (worker, parent, serving)
}

#[cfg(feature = "tokio")]
async fn chain_async(
    plugin: &asynchronous::PluginClient,
    tag: u32,
    fault: Fault,
) -> Result<String, String> {
    plugin.note(tag, TOP).await.map_err(|e| failure(&e))?;
    trace(
        plugin
            .run(Level::top(tag, fault), Level::top(tag, fault).label())
            .await,
    )
}

/// Waits on the gate off the runtime's threads.
#[cfg(feature = "tokio")]
async fn gate_until(gate: &Arc<Gate>, cond: fn(&GateState) -> bool) {
    let gate = gate.clone();
    tokio::task::spawn_blocking(move || gate.wait_until(cond))
        .await
        .unwrap();
}

/// As `blocking_parent`, with tasks for threads, and the top's future dropped too.
#[cfg(feature = "tokio")]
async fn async_parent(worker_name: &str, async_worker: bool) {
    let before = fd_snapshot();
    let disarm = hang_guard("re-entrant chains of an async parent");
    let (mut worker, parent, serving) = start_async(worker_name);
    let _release = OpenOnDrop(parent.gate.clone());
    let tasks: Vec<_> = (0..CHAINS)
        .map(|task| {
            let parent = parent.clone();
            tokio::spawn(async move {
                for tag in (0..ROUNDS).map(|round| task * 100 + round) {
                    let (fault, want) = plan(tag);
                    assert_eq!(
                        chain_async(&parent.plugin, tag, fault).await,
                        want,
                        "{fault:?}"
                    );
                    if fault == Fault::None {
                        assert_eq!(parent.plugin.notes(tag).await.unwrap(), notes_of('W'));
                        assert_eq!(parent.log.notes(tag), notes_of('H'));
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let (plugin, gate) = (&parent.plugin, &parent.gate);

    // The top's future dropped once its chain is held at the gate. An async worker then drops
    // its handler's future, which drops that handler's call into this process, whose handler
    // is dropped in turn, and so on down (docs/guide/connections.md, "Cancellation"): with an
    // async worker every handler here ends while the gate stays closed. A blocking worker's
    // handler runs on.
    let top = tokio::spawn({
        let parent = parent.clone();
        async move { chain_async(&parent.plugin, 1300, Fault::GateAt(HELD_AT)).await }
    });
    gate_until(gate, |s| s.waiting == 1).await;
    top.abort();
    assert!(top.await.unwrap_err().is_cancelled());
    if async_worker {
        gate_until(gate, |s| s.running == 0).await;
    }
    gate.update(|s| s.open = true);
    gate_until(gate, |s| s.running == 0 && s.waiting == 0).await;
    assert_eq!(parent.log.errors(1300), Vec::<String>::new());

    // The same with a timeout, where the chain may or may not have reached the gate yet.
    gate.update(|s| s.open = false);
    let impatient = plugin.with_timeout(PATIENCE);
    let timed_out = chain_async(&impatient, 1200, Fault::GateAt(HELD_AT)).await;
    drop(impatient); // a client kept would keep the connection open past the hang-up below
    assert_eq!(timed_out, Err("typed-ipc: TimedOut".into()));
    if async_worker {
        gate_until(gate, |s| s.running == 0).await;
    }
    gate.update(|s| s.open = true);
    assert_eq!(
        chain_async(plugin, 1201, Fault::None).await,
        Ok(full_trace(1201))
    );
    gate_until(gate, |s| s.running == 0 && s.waiting == 0).await;
    assert_eq!(parent.log.errors(1200), Vec::<String>::new());

    // The service holds a client of the worker: hang up with `close`.
    plugin.connection().close();
    serving.await.unwrap().unwrap();
    let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
    assert_eq!(exit, Exit::Code(0));
    drop((worker, parent));

    async_kill(worker_name, KILLED_AT).await;
    async_kill(worker_name, KILLED_AT + 1).await;

    before.assert_nothing_new();
    disarm.send(()).unwrap();
}

/// As `blocking_kill`, except that the worker's death cancels the handlers of its calls here.
#[cfg(feature = "tokio")]
async fn async_kill(worker_name: &str, at: u32) {
    let (mut worker, parent, serving) = start_async(worker_name);
    let release = OpenOnDrop(parent.gate.clone());
    let held: Vec<_> = (2000..2000 + CHAINS - 1)
        .map(|tag| {
            let parent = parent.clone();
            tokio::spawn(
                async move { chain_async(&parent.plugin, tag, Fault::GateAt(HELD_AT)).await },
            )
        })
        .collect();
    gate_until(&parent.gate, |s| s.waiting == CHAINS - 1).await;
    assert_eq!(
        chain_async(&parent.plugin, 2100, Fault::KillAt(at)).await,
        disconnected()
    );
    for chain in held {
        assert_eq!(chain.await.unwrap(), disconnected());
    }
    // The worker's death cancels the calls of its this process was running, whose replies
    // could reach nobody (connections.md, "Cancellation"): the held chains' handlers are dropped at
    // the gate, which stays closed, and `serve` resolves. Before, they waited there, and
    // `serve` with them. (A blocking parent's handlers run on: `blocking_kill`.)
    gate_until(&parent.gate, |s| s.running == 0).await;
    assert!(!parent.gate.state.lock().unwrap().open);
    serving.await.unwrap().unwrap();
    // The gate's blocking waits, left behind by the handlers dropped, let go.
    drop(release);
    gate_until(&parent.gate, |s| s.waiting == 0).await;
    let conn = parent.plugin.connection().clone();
    assert!(conn.is_closed());
    assert_eq!(
        chain_async(&parent.plugin, 2200, Fault::None).await,
        disconnected()
    );
    // A level dropped says nothing; one whose call saw the worker go as the cancel came (its
    // task polled just then) says so.
    let within = |tag: u32, from: u32| {
        let (seen, all) = (parent.log.errors(tag), disconnected_from(from));
        assert!(
            seen.iter().all(|e| all.contains(e)),
            "{seen:?}, not within {all:?}"
        );
    };
    within(2100, at);
    for tag in 2000..2000 + CHAINS - 1 {
        within(tag, HELD_AT);
    }
    let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
    assert_eq!(exit, Exit::Signal(9));
    drop((worker, parent));
    conn.wait_closed().await;
}

#[cfg(feature = "tokio")]
#[test]
fn an_async_parent_and_an_async_worker_nest_calls() {
    let _fds = fd_count_lock();
    common::two_worker_runtime().block_on(async_parent("child_async_plugin", true));
}

#[cfg(feature = "tokio")]
#[test]
fn an_async_parent_and_a_blocking_worker_nest_calls() {
    let _fds = fd_count_lock();
    common::two_worker_runtime().block_on(async_parent("child_blocking_plugin", false));
}
