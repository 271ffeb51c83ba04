//! A camera host and its IPA plugins, built apart and upgraded at different times: each way
//! the plugin interface may evolve, run across real processes, an old plugin under a new
//! host and a new plugin under an old one. Every module below is one release of the plugin
//! interface, all under one wire name, as two builds of the trait would be; the child (this
//! test binary, re-run) serves the release `EVOLVE_PLUGIN` names, and the parent calls it
//! through another.
//!
//! What the interface check catches (methods added, retired, retyped, made oneway) fails
//! every call of the interface with `InterfaceMismatch`, naming what differs; an interface
//! renamed is another one, which the peer does not serve (`NotServed`, naming what it does
//! serve); what it cannot see without `#[interface(check_types)]` (the types' definitions)
//! fails to decode (`Remote`, `Malformed`) or, where the encodings happen to fit, decodes as
//! wrong values, pinned here so that nobody mistakes it for safe.

mod common;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use typed_ipc::worker::{self, Worker};
use typed_ipc::{Connection, Error, Server};

// Every test takes `common::fd_count_lock()`: one counts this process's fds, and the others
// open and close fds of their own.

/// Longer than any call here takes: a call that waits this long hangs, and fails as
/// `TimedOut` rather than hanging the test run.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// The wire name every release of the plugin interface keeps.
const IPA: &str = "org.example.camera.Ipa";

/// What the plugin says about itself, on every release: served beside the plugin interface
/// on the same connection, so its answers show the connection still works.
mod diag {
    #[typed_ipc::interface(name = "org.example.camera.Diag")]
    pub trait Diag {
        /// The plugin process's open fds.
        fn open_fds(&self) -> u64;
        /// How many `stats_ready` oneways its plugin interface ran.
        fn stats_seen(&self) -> u32;
    }
}

/// `stats_ready` oneways the plugin ran (in the child).
static STATS_SEEN: AtomicU32 = AtomicU32::new(0);

struct Diagnostics;

impl diag::Diag for Diagnostics {
    fn open_fds(&self) -> u64 {
        common::open_fds() as u64
    }
    fn stats_seen(&self) -> u32 {
        STATS_SEEN.load(Ordering::SeqCst)
    }
}

/// A second plugin interface, taking byte strings, which go out of the socket (a shared
/// region, or straight into a worker's memory) from 1 KiB on.
mod blob_v1 {
    #[typed_ipc::interface(name = "org.example.camera.Blob")]
    pub trait Blob {
        fn digest(&self, data: Vec<u8>) -> u64;
        #[oneway]
        fn hand_over(&self, buffer: std::os::fd::OwnedFd);
    }
}

/// Its next release, built without a name of its own.
mod blob_v2 {
    #[typed_ipc::interface(name = "org.example.camera.Blob")]
    pub trait Blob {
        fn digest(&self, data: Vec<u8>) -> u64;
        #[oneway]
        fn hand_over(&self, buffer: std::os::fd::OwnedFd);
        fn digest_many(&self, data: Vec<Vec<u8>>) -> Vec<u64>;
    }
}

impl blob_v1::Blob for Diagnostics {
    fn digest(&self, data: Vec<u8>) -> u64 {
        common::checksum(&data)
    }
    fn hand_over(&self, _buffer: OwnedFd) {}
}

/// The plugin, whichever release it implements.
struct Plugin;

/// The size of the file behind `buffer`: what `process` answers on every release.
fn file_len(buffer: OwnedFd) -> u64 {
    std::fs::File::from(buffer).metadata().unwrap().len()
}

/// Release 1: what the first hosts and plugins were built from.
mod v1 {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Config {
        pub width: u32,
        pub height: u32,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Caps {
        pub max_width: u32,
        pub max_height: u32,
    }

    #[typed_ipc::interface(name = "org.example.camera.Ipa")]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn exposure(&self) -> u32;
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64;
        #[oneway]
        fn stats_ready(&self, frame: u32);
        fn reset(&self);
        fn legacy_mode(&self) -> bool;
    }

    impl Ipa for Plugin {
        fn configure(&self, cfg: Config) -> Caps {
            Caps {
                max_width: cfg.width.min(1920),
                max_height: cfg.height.min(1080),
            }
        }
        fn exposure(&self) -> u32 {
            10_000
        }
        fn process(&self, _frame: u32, buffer: OwnedFd) -> u64 {
            file_len(buffer)
        }
        fn stats_ready(&self, _frame: u32) {
            STATS_SEEN.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&self) {}
        fn legacy_mode(&self) -> bool {
            true
        }
    }
}

/// Release 1 plus a method, at the end.
mod added {
    use super::v1::{Caps, Config};
    use super::*;

    #[typed_ipc::interface(name = "org.example.camera.Ipa")]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn exposure(&self) -> u32;
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64;
        #[oneway]
        fn stats_ready(&self, frame: u32);
        fn reset(&self);
        fn legacy_mode(&self) -> bool;
        fn gain(&self) -> f32;
    }

    impl Ipa for Plugin {
        fn configure(&self, cfg: Config) -> Caps {
            v1::Ipa::configure(self, cfg)
        }
        fn exposure(&self) -> u32 {
            10_000
        }
        fn process(&self, _frame: u32, buffer: OwnedFd) -> u64 {
            file_len(buffer)
        }
        fn stats_ready(&self, _frame: u32) {
            STATS_SEEN.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&self) {}
        fn legacy_mode(&self) -> bool {
            true
        }
        fn gain(&self) -> f32 {
            1.5
        }
    }
}

/// Release 1 with `legacy_mode` retired.
mod retired {
    use super::v1::{Caps, Config};
    use super::*;

    #[typed_ipc::interface(name = "org.example.camera.Ipa")]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn exposure(&self) -> u32;
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64;
        #[oneway]
        fn stats_ready(&self, frame: u32);
        fn reset(&self);
    }

    impl Ipa for Plugin {
        fn configure(&self, cfg: Config) -> Caps {
            v1::Ipa::configure(self, cfg)
        }
        fn exposure(&self) -> u32 {
            10_000
        }
        fn process(&self, _frame: u32, buffer: OwnedFd) -> u64 {
            file_len(buffer)
        }
        fn stats_ready(&self, _frame: u32) {
            STATS_SEEN.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&self) {}
    }
}

/// Release 1 with `exposure` returning a wider type.
mod widened_return {
    use super::v1::{Caps, Config};
    use super::*;

    #[typed_ipc::interface(name = "org.example.camera.Ipa")]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn exposure(&self) -> u64;
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64;
        #[oneway]
        fn stats_ready(&self, frame: u32);
        fn reset(&self);
        fn legacy_mode(&self) -> bool;
    }

    impl Ipa for Plugin {
        fn configure(&self, cfg: Config) -> Caps {
            v1::Ipa::configure(self, cfg)
        }
        fn exposure(&self) -> u64 {
            10_000
        }
        fn process(&self, _frame: u32, buffer: OwnedFd) -> u64 {
            file_len(buffer)
        }
        fn stats_ready(&self, _frame: u32) {
            STATS_SEEN.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&self) {}
        fn legacy_mode(&self) -> bool {
            true
        }
    }
}

/// Release 1 with `reset` made `#[oneway]`, its signature text unchanged.
mod reset_oneway {
    use super::v1::{Caps, Config};
    use super::*;

    #[typed_ipc::interface(name = "org.example.camera.Ipa")]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn exposure(&self) -> u32;
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64;
        #[oneway]
        fn stats_ready(&self, frame: u32);
        #[oneway]
        fn reset(&self);
        fn legacy_mode(&self) -> bool;
    }

    impl Ipa for Plugin {
        fn configure(&self, cfg: Config) -> Caps {
            v1::Ipa::configure(self, cfg)
        }
        fn exposure(&self) -> u32 {
            10_000
        }
        fn process(&self, _frame: u32, buffer: OwnedFd) -> u64 {
            file_len(buffer)
        }
        fn stats_ready(&self, _frame: u32) {
            STATS_SEEN.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&self) {}
        fn legacy_mode(&self) -> bool {
            true
        }
    }
}

/// Release 1's methods, each pinned to its id with `#[cmd]`, declared in another order.
mod reordered {
    use super::v1::{Caps, Config};
    use super::*;

    #[typed_ipc::interface(name = "org.example.camera.Ipa")]
    pub trait Ipa {
        #[cmd(1)]
        fn exposure(&self) -> u32;
        #[cmd(0)]
        fn configure(&self, cfg: Config) -> Caps;
        #[cmd(2)]
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64;
        #[cmd(3)]
        #[oneway]
        fn stats_ready(&self, frame: u32);
        #[cmd(4)]
        fn reset(&self);
        #[cmd(5)]
        fn legacy_mode(&self) -> bool;
    }

    impl Ipa for Plugin {
        fn exposure(&self) -> u32 {
            10_000
        }
        fn configure(&self, cfg: Config) -> Caps {
            v1::Ipa::configure(self, cfg)
        }
        fn process(&self, _frame: u32, buffer: OwnedFd) -> u64 {
            file_len(buffer)
        }
        fn stats_ready(&self, _frame: u32) {
            STATS_SEEN.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&self) {}
        fn legacy_mode(&self) -> bool {
            true
        }
    }
}

/// Release 1's trait renamed, its wire name kept: the same interface on the wire.
mod renamed_trait {
    use super::v1::{Caps, Config};
    use super::*;

    #[typed_ipc::interface(name = "org.example.camera.Ipa")]
    pub trait CameraIpa {
        fn configure(&self, cfg: Config) -> Caps;
        fn exposure(&self) -> u32;
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64;
        #[oneway]
        fn stats_ready(&self, frame: u32);
        fn reset(&self);
        fn legacy_mode(&self) -> bool;
    }
}

/// Release 1's methods under the trait's own name (no `name = ...`): another interface.
mod unnamed {
    use super::v1::{Caps, Config};
    use super::*;

    #[typed_ipc::interface]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn exposure(&self) -> u32;
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64;
        #[oneway]
        fn stats_ready(&self, frame: u32);
        fn reset(&self);
        fn legacy_mode(&self) -> bool;
    }
}

/// Release 1's trait as written, but `Config` has a field more: the signature text is the
/// same, so the interface check passes.
mod wider_config {
    use super::v1::Caps;
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Config {
        pub width: u32,
        pub height: u32,
        // What a serde user writes to make a field optional: bincode encodes by position,
        // so it does not.
        #[serde(default)]
        pub fps: u32,
    }

    #[typed_ipc::interface(name = "org.example.camera.Ipa")]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn exposure(&self) -> u32;
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64;
        #[oneway]
        fn stats_ready(&self, frame: u32);
        fn reset(&self);
        fn legacy_mode(&self) -> bool;
    }

    impl Ipa for Plugin {
        fn configure(&self, cfg: Config) -> Caps {
            Caps {
                max_width: cfg.width.min(1920),
                max_height: cfg.height.min(1080),
            }
        }
        fn exposure(&self) -> u32 {
            10_000
        }
        fn process(&self, _frame: u32, buffer: OwnedFd) -> u64 {
            file_len(buffer)
        }
        fn stats_ready(&self, _frame: u32) {
            STATS_SEEN.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&self) {}
        fn legacy_mode(&self) -> bool {
            true
        }
    }
}

/// Release 1's trait as written, but `Caps` repacked into the same eight bytes (two `u16`s
/// and a new `u32`): the signature text is the same, and so is the encoding's length.
mod repacked_caps {
    use super::v1::Config;
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Caps {
        pub max_width: u16,
        pub max_height: u16,
        pub max_fps: u32,
    }

    #[typed_ipc::interface(name = "org.example.camera.Ipa")]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn exposure(&self) -> u32;
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64;
        #[oneway]
        fn stats_ready(&self, frame: u32);
        fn reset(&self);
        fn legacy_mode(&self) -> bool;
    }

    impl Ipa for Plugin {
        fn configure(&self, cfg: Config) -> Caps {
            Caps {
                max_width: cfg.width.min(1920) as u16,
                max_height: cfg.height.min(1080) as u16,
                max_fps: 30,
            }
        }
        fn exposure(&self) -> u32 {
            10_000
        }
        fn process(&self, _frame: u32, buffer: OwnedFd) -> u64 {
            file_len(buffer)
        }
        fn stats_ready(&self, _frame: u32) {
            STATS_SEEN.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&self) {}
        fn legacy_mode(&self) -> bool {
            true
        }
    }
}

/// Release 1's trait as written, but `Caps` has a field more.
mod wider_caps {
    use super::v1::Config;
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Caps {
        pub max_width: u32,
        pub max_height: u32,
        pub max_fps: u32,
    }

    #[typed_ipc::interface(name = "org.example.camera.Ipa")]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn exposure(&self) -> u32;
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64;
        #[oneway]
        fn stats_ready(&self, frame: u32);
        fn reset(&self);
        fn legacy_mode(&self) -> bool;
    }

    impl Ipa for Plugin {
        fn configure(&self, cfg: Config) -> Caps {
            Caps {
                max_width: cfg.width.min(1920),
                max_height: cfg.height.min(1080),
                max_fps: 30,
            }
        }
        fn exposure(&self) -> u32 {
            10_000
        }
        fn process(&self, _frame: u32, buffer: OwnedFd) -> u64 {
            file_len(buffer)
        }
        fn stats_ready(&self, _frame: u32) {
            STATS_SEEN.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&self) {}
        fn legacy_mode(&self) -> bool {
            true
        }
    }
}

/// Release 2 done as docs/guide/interface-evolution.md says: a name of its own, so that a
/// plugin can serve it beside release 1 on one connection and a host can tell which one its
/// plugin serves.
mod v2 {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Config {
        pub width: u32,
        pub height: u32,
        pub fps: u32,
    }

    #[typed_ipc::interface(name = "org.example.camera.Ipa2")]
    pub trait Ipa2 {
        fn configure(&self, cfg: Config) -> v1::Caps;
        fn exposure(&self) -> u64;
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64;
        #[oneway]
        fn stats_ready(&self, frame: u32);
        fn gain(&self) -> f32;
    }

    impl Ipa2 for Plugin {
        fn configure(&self, cfg: Config) -> v1::Caps {
            v1::Caps {
                max_width: cfg.width.min(1920),
                max_height: cfg.height.min(1080),
            }
        }
        fn exposure(&self) -> u64 {
            20_000
        }
        fn process(&self, _frame: u32, buffer: OwnedFd) -> u64 {
            file_len(buffer)
        }
        fn stats_ready(&self, _frame: u32) {
            STATS_SEEN.fetch_add(1, Ordering::SeqCst);
        }
        fn gain(&self) -> f32 {
            1.5
        }
    }
}

/// Release 2 built from another copy of its trait, one whose `gain` returns an `f64`: a
/// plugin of a broken build, not an old one.
mod v2_other {
    use super::*;

    #[typed_ipc::interface(name = "org.example.camera.Ipa2")]
    pub trait Ipa2 {
        fn configure(&self, cfg: v2::Config) -> v1::Caps;
        fn exposure(&self) -> u64;
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64;
        #[oneway]
        fn stats_ready(&self, frame: u32);
        fn gain(&self) -> f64;
    }

    impl Ipa2 for Plugin {
        fn configure(&self, cfg: v2::Config) -> v1::Caps {
            v2::Ipa2::configure(self, cfg)
        }
        fn exposure(&self) -> u64 {
            v2::Ipa2::exposure(self)
        }
        fn process(&self, frame: u32, buffer: OwnedFd) -> u64 {
            v2::Ipa2::process(self, frame, buffer)
        }
        fn stats_ready(&self, frame: u32) {
            v2::Ipa2::stats_ready(self, frame)
        }
        fn gain(&self) -> f64 {
            1.5
        }
    }
}

/// The plugin process: serves the release `EVOLVE_PLUGIN` names, with `Diag` beside it.
#[test]
#[ignore = "run as a child process by other tests"]
fn plugin() {
    let server = Server::new()
        .service(diag::DiagServer::new(Diagnostics))
        .service(blob_v1::BlobServer::new(Diagnostics));
    let server = match std::env::var("EVOLVE_PLUGIN").unwrap().as_str() {
        "v1" => server.service(v1::IpaServer::new(Plugin)),
        // A plugin that may refuse callers (it lets everyone in).
        "v1 authorizing" => server
            .service(v1::IpaServer::new(Plugin))
            .authorize(|_, _, _| Ok(())),
        "added" => server.service(added::IpaServer::new(Plugin)),
        "retired" => server.service(retired::IpaServer::new(Plugin)),
        "widened_return" => server.service(widened_return::IpaServer::new(Plugin)),
        "reset_oneway" => server.service(reset_oneway::IpaServer::new(Plugin)),
        "reordered" => server.service(reordered::IpaServer::new(Plugin)),
        "wider_config" => server.service(wider_config::IpaServer::new(Plugin)),
        "wider_caps" => server.service(wider_caps::IpaServer::new(Plugin)),
        "repacked_caps" => server.service(repacked_caps::IpaServer::new(Plugin)),
        "v2" => server.service(v2::Ipa2Server::new(Plugin)),
        "v1+v2" => server
            .service(v1::IpaServer::new(Plugin))
            .service(v2::Ipa2Server::new(Plugin)),
        "v1+v2_other" => server
            .service(v1::IpaServer::new(Plugin))
            .service(v2_other::Ipa2Server::new(Plugin)),
        other => panic!("no plugin release {other}"),
    };
    server.serve(&worker::connection().unwrap()).unwrap();
}

/// A plugin process serving `release`, its connection, and its `Diag`.
fn spawn(release: &str) -> (Worker, Connection, diag::DiagClient) {
    let mut command = common::child("plugin");
    command.env("EVOLVE_PLUGIN", release);
    let (worker, conn) = Worker::spawn(command).unwrap();
    let diag = diag::DiagClient::new(conn.clone()).with_timeout(HANG_GUARD);
    (worker, conn, diag)
}

/// Hangs up on the plugin and checks it exited cleanly: nothing in it panicked.
fn hang_up(mut worker: Worker, conn: Connection) {
    conn.close();
    assert_eq!(worker.wait().unwrap(), worker::Exit::Code(0));
}

/// The text of an `InterfaceMismatch`; anything else fails the test.
#[track_caller]
fn mismatch<T: std::fmt::Debug>(result: Result<T, Error>) -> String {
    match result {
        Err(Error::InterfaceMismatch(why)) => why,
        other => panic!("expected Error::InterfaceMismatch, got {other:?}"),
    }
}

/// The text of a `NotServed`; anything else fails the test.
#[track_caller]
fn not_served<T: std::fmt::Debug>(result: Result<T, Error>) -> String {
    match result {
        Err(Error::NotServed(why)) => why,
        other => panic!("expected Error::NotServed, got {other:?}"),
    }
}

/// Every call of release 1's interface, from a client of another release, fails with
/// `InterfaceMismatch`; returns the first one's text.
fn every_v1_call_is_a_mismatch(ipa: &v1::IpaClient) -> String {
    let cfg = v1::Config {
        width: 4096,
        height: 3072,
    };
    let why = mismatch(ipa.configure(cfg));
    assert_eq!(mismatch(ipa.exposure()), why);
    let buffer = common::memfd(b"frame");
    assert_eq!(mismatch(ipa.process(1, buffer)), why);
    assert_eq!(mismatch(ipa.reset()), why);
    assert_eq!(mismatch(ipa.legacy_mode()), why);
    why
}

/// A plugin that gained a method, under a host of release 1, and release 1's plugin under a
/// host that expects the method: every call of the interface fails, the unchanged methods'
/// too, saying which method one side lacks; the connection serves its other interfaces on.
#[test]
fn a_method_added_at_one_end_fails_every_call_naming_it() {
    let _fds = common::fd_count_lock();
    let (worker, conn, diag) = spawn("added");
    let ipa = v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    let why = every_v1_call_is_a_mismatch(&ipa);
    assert_eq!(
        why,
        format!("interface `{IPA}`: the peer has method `gain` (cmd 6) that this side lacks")
    );
    assert_eq!(diag.stats_seen().unwrap(), 0);
    hang_up(worker, conn);

    let (worker, conn, diag) = spawn("v1");
    let ipa = added::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    let why = mismatch(ipa.gain());
    assert_eq!(
        why,
        format!("interface `{IPA}`: method `gain` (cmd 6) is missing on the peer")
    );
    assert_eq!(mismatch(ipa.exposure()), why);
    assert_eq!(diag.stats_seen().unwrap(), 0);
    hang_up(worker, conn);
}

/// A plugin that may refuse callers names its methods only to a caller of one it has: a
/// host calling the method it added gets an error that says so, not one that calls every
/// method missing; a call of a method both have gets the whole story.
#[test]
fn a_plugin_that_may_refuse_callers_is_not_said_to_lack_every_method() {
    let _fds = common::fd_count_lock();
    let (worker, conn, _diag) = spawn("v1 authorizing");
    let ipa = added::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    assert_eq!(
        mismatch(ipa.gain()),
        format!(
            "interface `{IPA}`: the peer's differs, and it named none of its methods (a peer \
             that may refuse callers names them only to a caller of a method it has, and none \
             names them past the limits of what it sends)"
        )
    );
    assert_eq!(
        mismatch(ipa.exposure()),
        format!("interface `{IPA}`: method `gain` (cmd 6) is missing on the peer")
    );
    hang_up(worker, conn);
}

/// A method retired at one end: the same, the other way round.
#[test]
fn a_method_retired_at_one_end_fails_every_call_naming_it() {
    let _fds = common::fd_count_lock();
    let (worker, conn, _diag) = spawn("retired");
    let ipa = v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    let why = every_v1_call_is_a_mismatch(&ipa);
    assert_eq!(
        why,
        format!("interface `{IPA}`: method `legacy_mode` (cmd 5) is missing on the peer")
    );
    hang_up(worker, conn);

    let (worker, conn, _diag) = spawn("v1");
    let ipa = retired::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    let why = mismatch(ipa.exposure());
    assert_eq!(
        why,
        format!(
            "interface `{IPA}`: the peer has method `legacy_mode` (cmd 5) that this side lacks"
        )
    );
    hang_up(worker, conn);
}

/// A return type changed as written: a mismatch quoting both signatures, never a decode of
/// a `u64` as a `u32` (which would fail, or with other values fit).
#[test]
fn a_return_type_changed_as_written_fails_every_call_quoting_both_signatures() {
    let _fds = common::fd_count_lock();
    let (worker, conn, _diag) = spawn("widened_return");
    let ipa = v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    let why = every_v1_call_is_a_mismatch(&ipa);
    assert_eq!(
        why,
        format!(
            "interface `{IPA}`: method 1 differs: here `fn exposure(&self) -> u32`, on the \
             peer `fn exposure(&self) -> u64`"
        )
    );
    hang_up(worker, conn);
}

/// A call made `#[oneway]` at one end: its text is unchanged, but the ends disagree about
/// whether it is answered. The mismatch is caught; the error says that a `#[oneway]`
/// differs, though not which (the peer's answer does not carry its `#[oneway]`s).
#[test]
fn a_call_made_oneway_at_one_end_fails_every_call_naming_it() {
    let _fds = common::fd_count_lock();
    let (worker, conn, _diag) = spawn("reset_oneway");
    let ipa = v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    let why = every_v1_call_is_a_mismatch(&ipa);
    assert_eq!(
        why,
        format!(
            "interface `{IPA}`: every method has the same id, name and signature at both \
             ends: a method is `#[oneway]` at one end only (the peer does not say which of \
             its methods are; `#[oneway]` here: `stats_ready`), or the ends' versions of \
             typed-ipc hash interfaces differently"
        )
    );
    hang_up(worker, conn);
}

/// Methods pinned to their ids with `#[cmd]` and declared in another order: every message
/// is as before, but the check compares declaration order too, so every call fails; the
/// error says that this is what differs.
#[test]
fn methods_declared_in_another_order_fail_every_call_saying_so() {
    let _fds = common::fd_count_lock();
    let (worker, conn, _diag) = spawn("reordered");
    let ipa = v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    let why = every_v1_call_is_a_mismatch(&ipa);
    assert_eq!(
        why,
        format!(
            "interface `{IPA}`: the methods are the same but declared in another order \
             (their ids here: 0, 1, 2, 3, 4, 5; on the peer: 1, 0, 2, 3, 4, 5), which the \
             interface check compares too"
        )
    );
    hang_up(worker, conn);
}

/// Renaming the trait keeps the wire, so long as `#[interface(name)]` is kept; dropping the
/// name (the trait's own is then the wire name) makes it an interface the plugin does not
/// serve, which the error names.
#[test]
fn the_wire_name_not_the_trait_name_is_the_interface() {
    let _fds = common::fd_count_lock();
    let (worker, conn, _diag) = spawn("v1");
    let ipa = renamed_trait::CameraIpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    assert_eq!(ipa.exposure().unwrap(), 10_000);
    let unnamed = unnamed::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    assert_eq!(
        not_served(unnamed.exposure()),
        format!(
            "the peer does not serve interface `Ipa` (it serves: org.example.camera.Diag, \
             org.example.camera.Blob, {IPA})"
        )
    );
    hang_up(worker, conn);
}

/// The files a refused call or a dropped oneway carried are closed at both ends: the
/// caller's once sent, the plugin's with the refused request.
#[test]
fn a_refused_call_leaks_no_fd_at_either_end() {
    let _fds = common::fd_count_lock();
    let (worker, conn, diag) = spawn("added");
    let ipa = v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    // One call first, so that whatever the connection sets up once is set up.
    mismatch(ipa.process(0, common::memfd(b"warm up")));
    let (ours, theirs) = (common::open_fds(), diag.open_fds().unwrap());
    for frame in 0..20 {
        mismatch(ipa.process(frame, common::memfd(b"frame")));
    }
    // Oneways too, which the plugin drops (and runs no later call before it has).
    let blob = blob_v2::BlobClient::new(conn.clone()).with_timeout(HANG_GUARD);
    for _ in 0..20 {
        blob.hand_over(common::memfd(b"frame")).unwrap();
    }
    assert_eq!(common::open_fds(), ours);
    assert_eq!(diag.open_fds().unwrap(), theirs);
    hang_up(worker, conn);
}

/// A oneway of a mismatched interface is sent (`Ok`), and dropped by the plugin, which says
/// so on its stderr: the host is not told. A host must find out which release its plugin
/// serves with a call before it relies on oneways.
#[test]
fn a_oneway_of_a_mismatched_interface_is_dropped_and_the_sender_is_not_told() {
    let _fds = common::fd_count_lock();
    let mut command = common::child("plugin");
    command.env("EVOLVE_PLUGIN", "v1");
    command.stderr(std::process::Stdio::piped());
    let (mut worker, conn) = Worker::spawn(command).unwrap();
    let mut stderr = worker.take_stderr().unwrap();
    let diag = diag::DiagClient::new(conn.clone()).with_timeout(HANG_GUARD);
    let ipa = added::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    for frame in 0..3 {
        ipa.stats_ready(frame).unwrap();
    }
    // A call runs only once the oneways sent ahead of it have run (or been dropped).
    assert_eq!(diag.stats_seen().unwrap(), 0);
    // The same oneway of the plugin's release runs.
    v1::IpaClient::new(conn.clone()).stats_ready(3).unwrap();
    assert_eq!(diag.stats_seen().unwrap(), 1);
    hang_up(worker, conn);
    let mut said = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut said).unwrap();
    let dropped = format!(
        "a oneway message {IPA}::stats_ready failed: the sender's interface differs from this \
         side's"
    );
    assert_eq!(said.matches(&dropped).count(), 3, "{said}");
}

/// A field added to a struct that a method takes: the trait's text is unchanged, so the
/// interface check passes and every other method works; the changed method's arguments do
/// not decode, in either direction (`#[serde(default)]` does not help: bincode encodes by
/// position, every field always), and the plugin did not run it.
#[test]
fn a_field_added_to_a_parameter_struct_fails_only_that_method_with_remote() {
    let _fds = common::fd_count_lock();
    // A host with the wider struct, a plugin without: four bytes left over.
    let (worker, conn, _diag) = spawn("v1");
    let ipa = wider_config::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    let cfg = wider_config::Config {
        width: 4096,
        height: 3072,
        fps: 30,
    };
    match ipa.configure(cfg) {
        Err(Error::Remote(why)) => {
            assert!(
                why.starts_with(&format!("the peer could not decode {IPA}::configure")),
                "{why}"
            );
            assert!(why.contains("4 bytes left over"), "{why}");
        }
        other => panic!("expected Error::Remote, got {other:?}"),
    }
    assert_eq!(ipa.exposure().unwrap(), 10_000);
    hang_up(worker, conn);

    // A host without, a plugin with: four bytes short.
    let (worker, conn, _diag) = spawn("wider_config");
    let ipa = v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    let cfg = v1::Config {
        width: 4096,
        height: 3072,
    };
    match ipa.configure(cfg) {
        Err(Error::Remote(why)) => {
            assert!(
                why.starts_with(&format!("the peer could not decode {IPA}::configure")),
                "{why}"
            );
        }
        other => panic!("expected Error::Remote, got {other:?}"),
    }
    assert_eq!(ipa.exposure().unwrap(), 10_000);
    hang_up(worker, conn);
}

/// A field added to a struct a method returns: the plugin ran the method, and the host
/// cannot decode the answer (`Malformed`, this side's error, not the peer's); the
/// connection and the other methods work on.
#[test]
fn a_field_added_to_a_returned_struct_fails_only_that_method_with_malformed() {
    let _fds = common::fd_count_lock();
    let (worker, conn, _diag) = spawn("wider_caps");
    let ipa = v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    let cfg = v1::Config {
        width: 4096,
        height: 3072,
    };
    match ipa.configure(cfg) {
        Err(Error::Malformed(why)) => assert!(why.contains("4 bytes left over"), "{why}"),
        other => panic!("expected Error::Malformed, got {other:?}"),
    }
    assert_eq!(ipa.exposure().unwrap(), 10_000);
    hang_up(worker, conn);
}

/// A struct a method returns, changed to fields of the same total size: nothing can tell,
/// and the host gets wrong values as a success. This is the limit of the interface check
/// without `#[interface(check_types)]` (it compares the trait's text, not the types'
/// definitions), pinned so that it is known: opt in (tests/type_shapes.rs makes the same
/// change under it, a mismatch naming the method), version such a type (a new name, so the
/// trait's text changes) or rebuild both ends.
#[test]
fn a_returned_struct_repacked_to_the_same_size_decodes_as_wrong_values() {
    let _fds = common::fd_count_lock();
    let (worker, conn, _diag) = spawn("repacked_caps");
    let ipa = v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    let cfg = v1::Config {
        width: 4096,
        height: 3072,
    };
    // The plugin answered { max_width: 1920, max_height: 1080, max_fps: 30 }: u16 1920 and
    // u16 1080 read as one u32, then 30.
    let caps = ipa.configure(cfg).unwrap();
    assert_eq!(
        caps,
        v1::Caps {
            max_width: 1920 | 1080 << 16,
            max_height: 30,
        }
    );
    hang_up(worker, conn);
}

/// Which release a plugin serves, found with a call: a host of release 2 that still
/// supports release 1 plugins.
enum Plugged {
    V2(v2::Ipa2Client),
    V1(v1::IpaClient),
}

/// Asks the plugin on `conn` for release 2 and falls back to release 1: a plugin that does
/// not serve release 2 answers `NotServed` without running anything. Any other failure is
/// the plugin's, not its age: a release 2 built from another copy of the trait answers
/// `InterfaceMismatch`, and must not be driven as release 1.
fn plug(conn: &Connection) -> Result<Plugged, Error> {
    let ipa2 = v2::Ipa2Client::new(conn.clone()).with_timeout(HANG_GUARD);
    match ipa2.exposure() {
        Ok(_) => Ok(Plugged::V2(ipa2)),
        Err(Error::NotServed(_)) => Ok(Plugged::V1(
            v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD),
        )),
        Err(other) => Err(other),
    }
}

/// The safe way to evolve it: release 2 under a name of its own. A plugin that serves both
/// on one connection works under old and new hosts; a new host finds an old plugin out with
/// a call and falls back; an old host under a plugin of release 2 only is told that its
/// interface is not served, and what is.
#[test]
fn release_2_under_its_own_name_lives_beside_release_1() {
    let _fds = common::fd_count_lock();
    let cfg2 = v2::Config {
        width: 4096,
        height: 3072,
        fps: 30,
    };
    let caps = v1::Caps {
        max_width: 1920,
        max_height: 1080,
    };
    // A plugin of both releases, under a host of each.
    let (worker, conn, diag) = spawn("v1+v2");
    let old_host = v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    assert_eq!(old_host.exposure().unwrap(), 10_000);
    assert!(old_host.legacy_mode().unwrap());
    let Ok(Plugged::V2(new_host)) = plug(&conn) else {
        panic!("the plugin serves release 2")
    };
    assert_eq!(new_host.configure(cfg2.clone()).unwrap(), caps);
    assert_eq!(new_host.gain().unwrap(), 1.5);
    new_host.stats_ready(1).unwrap();
    old_host.stats_ready(2).unwrap();
    assert_eq!(diag.stats_seen().unwrap(), 2);
    hang_up(worker, conn);

    // An old plugin under the new host: found out, and driven through release 1.
    let (worker, conn, diag) = spawn("v1");
    let Ok(Plugged::V1(fallback)) = plug(&conn) else {
        panic!("the plugin serves release 1 only")
    };
    assert_eq!(fallback.exposure().unwrap(), 10_000);
    fallback.stats_ready(1).unwrap();
    assert_eq!(diag.stats_seen().unwrap(), 1);
    hang_up(worker, conn);

    // A plugin of release 2 only under an old host.
    let (worker, conn, _diag) = spawn("v2");
    let old_host = v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    assert_eq!(
        not_served(old_host.exposure()),
        format!(
            "the peer does not serve interface `{IPA}` (it serves: org.example.camera.Diag, \
             org.example.camera.Blob, org.example.camera.Ipa2)"
        )
    );
    hang_up(worker, conn);
}

/// A plugin whose release 2 was built from another copy of the trait is not taken for an old
/// plugin: the new host's probe fails with `InterfaceMismatch`, naming the method, where an
/// old plugin's fails with `NotServed`; the plugin's release 1 still works.
#[test]
fn a_broken_release_2_is_not_mistaken_for_an_old_plugin() {
    let _fds = common::fd_count_lock();
    let (worker, conn, _diag) = spawn("v1+v2_other");
    match plug(&conn) {
        Err(Error::InterfaceMismatch(why)) => assert!(
            why.contains("fn gain(&self) -> f32") && why.contains("fn gain(&self) -> f64"),
            "{why}"
        ),
        Err(other) => panic!("expected Error::InterfaceMismatch, got {other:?}"),
        Ok(_) => panic!("a broken release 2 was plugged"),
    }
    let old_host = v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    assert_eq!(old_host.exposure().unwrap(), 10_000);
    hang_up(worker, conn);
}

/// Refused calls whose byte strings went out of the socket (into the connection's shared
/// region, or written straight into the worker's memory) give that room back: calls of
/// every size after them, refused or not, go through.
#[test]
fn refused_calls_carrying_byte_strings_leave_the_connection_working() {
    let _fds = common::fd_count_lock();
    common::one_copy_always();
    let (worker, conn, _diag) = spawn("v1");
    let old = blob_v1::BlobClient::new(conn.clone()).with_timeout(HANG_GUARD);
    let new = blob_v2::BlobClient::new(conn.clone()).with_timeout(HANG_GUARD);
    for len in [100, 4 << 10, 300 << 10, 2 << 20, 40 << 20] {
        let data = common::filled(len, len as u64);
        for _ in 0..3 {
            let why = mismatch(new.digest(data.clone()));
            assert!(
                why.contains("`digest_many` (cmd 2) is missing on the peer"),
                "{why}"
            );
        }
        assert_eq!(old.digest(data.clone()).unwrap(), common::checksum(&data));
    }
    hang_up(worker, conn);
}

/// Two releases under one wire name cannot be served side by side: the wire could not tell
/// them apart, and the server builder says so rather than let the second replace the first.
#[test]
#[should_panic(expected = "interface `org.example.camera.Ipa` is already served")]
fn two_releases_under_one_name_cannot_be_served_side_by_side() {
    let _ = Server::new()
        .service(v1::IpaServer::new(Plugin))
        .service(added::IpaServer::new(Plugin));
}
