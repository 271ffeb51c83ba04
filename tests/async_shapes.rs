//! Every shape `#[interface]` supports, in the async flavour: a trait of `async fn`s, served on
//! one end of `AsyncConnection::pair()` and called from the other, on one tokio runtime. Also
//! in-process interop with the blocking flavour of the same trait.
//!
//! The tests take one lock, so that each can count this process's open fds without another
//! test's fds coming and going.

#![cfg(feature = "tokio")]

mod common;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::{Unsendable, fd_count_lock, fd_snapshot};
use nix::sys::memfd::{MFdFlags, memfd_create};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;
use typed_ipc::tokio::AsyncConnection;
use typed_ipc::{Connection, Error, Socket, interface};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub gain: u32,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Caps {
    pub max_gain: u32,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum ConfigError {
    TooLoud { gain: u32, max: u32 },
}

/// A user type carrying an fd among its fields.
#[derive(Debug, Serialize, Deserialize)]
pub struct Labelled {
    pub label: String,
    #[serde(with = "typed_ipc::fd")]
    pub file: OwnedFd,
}

/// The async twin of `macro_shapes.rs`'s `Shapes`, method for method.
#[interface]
pub trait Shapes {
    async fn reverse(&self, text: String) -> String;
    /// Fds in: the sum of their files' sizes.
    async fn total_len(&self, files: Vec<OwnedFd>) -> u64;
    async fn configure(&self, cfg: Config) -> Result<Caps, ConfigError>;
    /// An fd out: a new file holding `content`.
    async fn open_buffer(&self, content: String) -> OwnedFd;
    /// An fd in: writes `content` into it.
    async fn write_into(&self, file: OwnedFd, content: String);
    async fn maybe_open(&self, content: Option<String>) -> Option<OwnedFd>;
    /// The first of `files`, or why there is none: fallible fds both ways.
    async fn first_of(
        &self,
        files: Result<Vec<OwnedFd>, String>,
    ) -> Result<Option<OwnedFd>, String>;
    /// Writes `content` into `file` if there is one; whether there was.
    async fn maybe_write(&self, file: Option<OwnedFd>, content: String) -> bool;
    /// `count` new files, the i-th holding `i`.
    async fn open_many(&self, count: u32) -> Vec<OwnedFd>;
    /// Writes the label into the file, and hands the item back.
    async fn labelled(&self, item: Labelled) -> Labelled;
    #[oneway]
    async fn stats_ready(&self, frame: u32, stats: OwnedFd);
    async fn nothing(&self);
    async fn zeroes(&self, len: u32) -> Vec<u8>;
    async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    async fn explode(&self, message: String) -> u32;
    async fn unsendable(&self) -> Unsendable;
    /// A default body: implementations may leave it out.
    async fn answer(&self) -> u32 {
        42
    }
}

struct Impl {
    /// Where `stats_ready` reports what it read.
    stats: UnboundedSender<(u32, String)>,
}

fn memfd(content: &str) -> OwnedFd {
    let fd = memfd_create("typed-ipc-test", MFdFlags::MFD_CLOEXEC).unwrap();
    File::from(fd.try_clone().unwrap())
        .write_all_at(content.as_bytes(), 0)
        .unwrap();
    fd
}

fn contents(fd: &OwnedFd) -> String {
    let file = File::from(fd.try_clone().unwrap());
    let mut buf = vec![0; file.metadata().unwrap().len() as usize];
    file.read_exact_at(&mut buf, 0).unwrap();
    String::from_utf8(buf).unwrap()
}

fn write(fd: OwnedFd, content: &str) {
    File::from(fd).write_all_at(content.as_bytes(), 0).unwrap();
}

impl Shapes for Impl {
    async fn reverse(&self, text: String) -> String {
        tokio::task::yield_now().await; // a real suspension point
        text.chars().rev().collect()
    }
    async fn total_len(&self, files: Vec<OwnedFd>) -> u64 {
        files
            .into_iter()
            .map(|f| File::from(f).metadata().unwrap().len())
            .sum()
    }
    async fn configure(&self, cfg: Config) -> Result<Caps, ConfigError> {
        match cfg.gain {
            gain @ 0..=10 => Ok(Caps {
                max_gain: 10 - gain,
            }),
            gain => Err(ConfigError::TooLoud { gain, max: 10 }),
        }
    }
    async fn open_buffer(&self, content: String) -> OwnedFd {
        memfd(&content)
    }
    async fn write_into(&self, file: OwnedFd, content: String) {
        write(file, &content)
    }
    async fn maybe_open(&self, content: Option<String>) -> Option<OwnedFd> {
        content.map(|c| memfd(&c))
    }
    async fn first_of(
        &self,
        files: Result<Vec<OwnedFd>, String>,
    ) -> Result<Option<OwnedFd>, String> {
        files.map(|files| files.into_iter().next())
    }
    async fn maybe_write(&self, file: Option<OwnedFd>, content: String) -> bool {
        file.map(|f| write(f, &content)).is_some()
    }
    async fn open_many(&self, count: u32) -> Vec<OwnedFd> {
        (0..count).map(|i| memfd(&i.to_string())).collect()
    }
    async fn labelled(&self, item: Labelled) -> Labelled {
        write(item.file.try_clone().unwrap(), &item.label);
        Labelled {
            label: format!("{} (seen)", item.label),
            file: item.file,
        }
    }
    async fn stats_ready(&self, frame: u32, stats: OwnedFd) {
        let _ = self.stats.send((frame, contents(&stats)));
    }
    async fn nothing(&self) {}
    async fn zeroes(&self, len: u32) -> Vec<u8> {
        vec![0; len as usize]
    }
    async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
    async fn explode(&self, message: String) -> u32 {
        tokio::task::yield_now().await;
        panic!("{message}")
    }
    async fn unsendable(&self) -> Unsendable {
        Unsendable
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// A client, and its server running on the same runtime.
struct Running {
    client: ShapesClient,
    server: JoinHandle<Result<(), Error>>,
    /// What the server's oneway method reports.
    stats: UnboundedReceiver<(u32, String)>,
}

fn start() -> Running {
    let (a, b) = AsyncConnection::pair().unwrap();
    let (tx, stats) = unbounded_channel();
    let server = tokio::spawn(ShapesServer::new(Impl { stats: tx }).serve(b));
    Running {
        client: ShapesClient::new(a),
        server,
        stats,
    }
}

impl Running {
    /// Hangs up, checks that the server saw a clean close, and waits until both ends are gone
    /// (their sockets closed).
    async fn stop(self) {
        let connection = self.client.connection().clone();
        drop(self.client);
        connection.close();
        self.server.await.unwrap().unwrap();
        connection.wait_closed().await;
    }
}

#[test]
fn plain_values_results_and_default_bodies() {
    let _serial = fd_count_lock();
    runtime().block_on(async {
        let running = start();
        let ipa = &running.client;
        assert_eq!(ipa.reverse("FooBar".into()).await.unwrap(), "raBooF");
        assert_eq!(
            ipa.configure(Config { gain: 3 }).await.unwrap(),
            Ok(Caps { max_gain: 7 })
        );
        assert_eq!(
            ipa.configure(Config { gain: 11 }).await.unwrap(),
            Err(ConfigError::TooLoud { gain: 11, max: 10 })
        );
        ipa.nothing().await.unwrap();
        assert_eq!(ipa.answer().await.unwrap(), 42);
        running.stop().await;
    });
}

#[test]
fn fds_in_and_out() {
    let _serial = fd_count_lock();
    let rt = runtime();
    let before = fd_snapshot();
    rt.block_on(async {
        let running = start();
        let ipa = &running.client;
        assert_eq!(
            contents(&ipa.open_buffer("from the server".into()).await.unwrap()),
            "from the server"
        );
        {
            let mine = memfd("");
            ipa.write_into(mine.try_clone().unwrap(), "from the client".into())
                .await
                .unwrap();
            assert_eq!(contents(&mine), "from the client");
        }
        {
            // Sent borrowed, and kept: the stub takes any `AsFd`, and its future is `Send`.
            fn send<F: Send>(future: F) -> F {
                future
            }
            let mine = memfd("");
            send(ipa.write_into(mine.as_fd(), "borrowed".into()))
                .await
                .unwrap();
            assert_eq!(contents(&mine), "borrowed");
            ipa.write_into(&mine, "borrowed again".into())
                .await
                .unwrap();
            assert_eq!(contents(&mine), "borrowed again");
        }
        {
            let files = ipa.maybe_open(Some("maybe".into())).await.unwrap();
            assert_eq!(contents(&files.unwrap()), "maybe");
            assert!(ipa.maybe_open(None).await.unwrap().is_none());
            let first = ipa.first_of(Ok(vec![memfd("one"), memfd("two")])).await;
            assert_eq!(contents(&first.unwrap().unwrap().unwrap()), "one");
            let why = ipa.first_of(Err("none here".into())).await.unwrap();
            assert_eq!(why.unwrap_err(), "none here");
            let mine = memfd("");
            let wrote = ipa.maybe_write(Some(mine.try_clone().unwrap()), "some".into());
            assert!(wrote.await.unwrap());
            assert_eq!(contents(&mine), "some");
            assert!(!ipa.maybe_write(None, "none".into()).await.unwrap());
        }
        {
            let files = ipa.open_many(3).await.unwrap();
            let texts: Vec<String> = files.iter().map(contents).collect();
            assert_eq!(texts, ["0", "1", "2"]);
            let total = ipa.total_len(vec![memfd("abc"), memfd("de"), memfd("")]);
            assert_eq!(total.await.unwrap(), 5);
            assert_eq!(ipa.total_len(Vec::new()).await.unwrap(), 0);
            // More fds than one datagram carries: the message is split.
            let many: Vec<OwnedFd> = (0..300).map(|_| memfd("x")).collect();
            assert_eq!(ipa.total_len(many).await.unwrap(), 300);
            assert_eq!(ipa.open_many(300).await.unwrap().len(), 300);
        }
        {
            let mine = memfd("");
            let item = Labelled {
                label: "label".into(),
                file: mine.try_clone().unwrap(),
            };
            let back = ipa.labelled(item).await.unwrap();
            assert_eq!(back.label, "label (seen)");
            assert_eq!(contents(&mine), "label");
            assert_eq!(contents(&back.file), "label");
        }
        running.stop().await;
    });
    before.assert_nothing_new();
}

#[test]
fn oneways_run_in_the_order_sent() {
    let _serial = fd_count_lock();
    runtime().block_on(async {
        let mut running = start();
        for frame in 0..100 {
            let stats = memfd(&format!("stats {frame}"));
            running.client.stats_ready(frame, stats).await.unwrap();
        }
        for frame in 0..100 {
            let report = running.stats.recv().await.unwrap();
            assert_eq!(report, (frame, format!("stats {frame}")));
        }
        running.stop().await;
    });
}

#[test]
fn byte_buffers_of_every_size() {
    let _serial = fd_count_lock();
    runtime().block_on(async {
        let running = start();
        let ipa = &running.client;
        let big = ipa.zeroes(1 << 20).await.unwrap();
        assert_eq!(big.len(), 1 << 20);
        assert!(big.iter().all(|&b| b == 0));
        for len in [0, 1, 65_000, 70_000, 5 << 20, 40 << 20] {
            let data: Vec<u8> = (0..len)
                .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
                .collect();
            assert_eq!(ipa.echo(data.clone()).await.unwrap(), data, "{len} bytes");
        }
        running.stop().await;
    });
}

#[test]
fn a_panic_is_an_error_reply_and_the_server_goes_on() {
    let _serial = fd_count_lock();
    runtime().block_on(async {
        let running = start();
        let ipa = &running.client;
        match ipa.explode("kaboom".into()).await {
            Err(Error::Panicked(why)) => assert_eq!(why, "Shapes::explode: kaboom"),
            other => panic!("expected Error::Panicked, got {other:?}"),
        }
        assert_eq!(
            ipa.reverse("still here".into()).await.unwrap(),
            "ereh llits"
        );
        running.stop().await;
    });
}

/// As in `macro_shapes.rs`: a result the server cannot encode gets a failure reply naming
/// why, instead of leaving the caller waiting.
#[test]
fn a_reply_that_cannot_be_encoded_is_an_error_reply() {
    let _serial = fd_count_lock();
    runtime().block_on(async {
        let running = start();
        let ipa = running.client.with_timeout(Duration::from_secs(60));
        match ipa.unsendable().await {
            Err(Error::Remote(why)) => assert!(
                why.contains("Shapes::unsendable could not answer")
                    && why.contains("this value refuses to be encoded"),
                "{why}"
            ),
            other => panic!("expected Error::Remote, got {other:?}"),
        }
        assert_eq!(
            ipa.reverse("still here".into()).await.unwrap(),
            "ereh llits"
        );
        drop(ipa);
        running.stop().await;
    });
}
#[test]
fn clones_and_timeouts_share_the_connection() {
    let _serial = fd_count_lock();
    runtime().block_on(async {
        let running = start();
        let ipa = &running.client;
        let other = ipa.with_timeout(Duration::from_secs(30));
        assert_eq!(other.reverse("ab".into()).await.unwrap(), "ba");
        let cloned = ipa.clone();
        assert_eq!(cloned.reverse("cd".into()).await.unwrap(), "dc");
        drop((other, cloned));
        assert!(!ipa.connection().is_closed());
        running.stop().await;
    });
}

#[test]
fn an_unknown_command_or_a_bad_body_gets_an_error_reply() {
    let _serial = fd_count_lock();
    let rt = runtime();
    let before = fd_snapshot();
    rt.block_on(async {
        let running = start();
        let ipa = &running.client;
        let fd = memfd("");
        let reply =
            ipa.connection()
                .call::<_, ()>(&SHAPES_INFO, 99, (typed_ipc::codec::Fd(&fd),), None);
        match reply.await {
            Err(Error::Remote(why)) => assert!(why.contains("99"), "{why}"),
            other => panic!("expected Error::Remote, got {other:?}"),
        }
        let reply =
            ipa.connection()
                .call::<_, String>(&SHAPES_INFO, 0, (typed_ipc::codec::Fd(&fd),), None);
        match reply.await {
            Err(Error::Remote(why)) => assert!(why.contains("reverse"), "{why}"),
            other => panic!("expected Error::Remote, got {other:?}"),
        }
        assert_eq!(ipa.reverse("ok".into()).await.unwrap(), "ko");
        drop(fd);
        running.stop().await;
    });
    before.assert_nothing_new();
}

/// Two builds of one interface that disagree about one method: one blocking, one async.
mod v1 {
    #[typed_ipc::interface]
    pub trait Versioned {
        fn same(&self) -> u32;
        fn lookup(&self, key: u32) -> String;
    }
}

mod v2 {
    #[typed_ipc::interface]
    pub trait Versioned {
        async fn same(&self) -> u32;
        async fn lookup(&self, key: String) -> String;
    }

    pub struct Impl;

    impl Versioned for Impl {
        async fn same(&self) -> u32 {
            2
        }
        async fn lookup(&self, key: String) -> String {
            key
        }
    }
}

/// The blocking flavour of `v2::Versioned`: the same trait, written without `async`.
mod v2_blocking {
    #[typed_ipc::interface]
    pub trait Versioned {
        fn same(&self) -> u32;
        fn lookup(&self, key: String) -> String;
    }
}

#[test]
fn the_signature_ignores_async_and_a_blocking_client_calls_an_async_server() {
    let _serial = fd_count_lock();
    assert_eq!(
        v2::VERSIONED_INFO.signature,
        v2_blocking::VERSIONED_INFO.signature
    );
    assert_ne!(v1::VERSIONED_INFO.signature, v2::VERSIONED_INFO.signature);
    runtime().block_on(async {
        let (ours, theirs) = Socket::pair().unwrap();
        let server = AsyncConnection::new(theirs).unwrap();
        let serving = tokio::spawn(v2::VersionedServer::new(v2::Impl).serve(server));
        let blocking = Connection::new(ours);
        // The blocking client waits on its thread, off the runtime.
        let calls = tokio::task::spawn_blocking(move || {
            let same = v2_blocking::VersionedClient::new(blocking.clone());
            assert_eq!(same.same().unwrap(), 2);
            assert_eq!(same.lookup("key".into()).unwrap(), "key");
            let old = v1::VersionedClient::new(blocking.clone());
            match old.lookup(7) {
                Err(Error::InterfaceMismatch(why)) => {
                    assert!(
                        why.contains("fn lookup(&self, key: u32) -> String"),
                        "{why}"
                    );
                    assert!(
                        why.contains("fn lookup(&self, key: String) -> String"),
                        "{why}"
                    );
                }
                other => panic!("expected Error::InterfaceMismatch, got {other:?}"),
            }
            blocking.close();
        });
        calls.await.unwrap();
        serving.await.unwrap().unwrap();
    });
}

#[test]
fn an_interface_the_peer_does_not_serve_is_named() {
    let _serial = fd_count_lock();
    runtime().block_on(async {
        let (a, b) = AsyncConnection::pair().unwrap();
        let server = tokio::spawn(v2::VersionedServer::new(v2::Impl).serve(b));
        let shapes = ShapesClient::new(a.clone());
        match shapes.reverse("x".into()).await {
            Err(Error::NotServed(why)) => {
                assert!(why.contains("Shapes") && why.contains("Versioned"), "{why}")
            }
            other => panic!("expected Error::NotServed, got {other:?}"),
        }
        assert_eq!(v2::VersionedClient::new(a.clone()).same().await.unwrap(), 2);
        a.close();
        server.await.unwrap().unwrap();
    });
}

#[test]
fn requests_wait_for_a_server_that_comes_later() {
    let _serial = fd_count_lock();
    runtime().block_on(async {
        let (a, b) = AsyncConnection::pair().unwrap();
        let client = v2::VersionedClient::new(a);
        // Sent before anything serves on `b`: held, as a blocking connection holds requests
        // until a thread serves.
        let early = tokio::spawn({
            let client = client.clone();
            async move { client.same().await }
        });
        tokio::task::yield_now().await;
        let server = tokio::spawn(v2::VersionedServer::new(v2::Impl).serve(b));
        assert_eq!(early.await.unwrap().unwrap(), 2);
        client.connection().close();
        server.await.unwrap().unwrap();
    });
}

/// A client's stubs are `Send`: they can be spawned.
#[test]
fn futures_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let _serial = fd_count_lock();
    runtime().block_on(async {
        let running = start();
        let client = running.client.clone();
        let call = async move { client.total_len(vec![memfd("abc")]).await };
        is_send(&call);
        assert_eq!(tokio::spawn(call).await.unwrap().unwrap(), 3);
        running.stop().await;
    });
}

#[test]
fn the_caller_is_known_inside_handlers() {
    #[interface]
    trait WhoAmI {
        async fn pid(&self) -> i32;
    }
    struct Me;
    impl WhoAmI for Me {
        async fn pid(&self) -> i32 {
            let before = typed_ipc::current_peer().map_or(-1, |p| p.pid);
            tokio::task::yield_now().await; // may resume on another thread
            let after = typed_ipc::current_peer().map_or(-1, |p| p.pid);
            assert_eq!(before, after);
            after
        }
    }
    let _serial = fd_count_lock();
    runtime().block_on(async {
        let (a, b) = AsyncConnection::pair().unwrap();
        let server = tokio::spawn(WhoAmIServer::new(Me).serve(b));
        let client = WhoAmIClient::new(a);
        assert_eq!(client.pid().await.unwrap(), std::process::id() as i32);
        client.connection().close();
        server.await.unwrap().unwrap();
    });
}

/// Oneway steps that take a while, and a call that counts them.
#[interface]
pub trait Steps {
    #[oneway]
    async fn slow_step(&self);
    async fn steps_done(&self) -> u32;
}

#[derive(Default)]
struct StepsImpl(std::sync::atomic::AtomicU32);

impl Steps for StepsImpl {
    async fn slow_step(&self) {
        for _ in 0..100 {
            tokio::task::yield_now().await; // time for the call behind it to arrive
        }
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    async fn steps_done(&self) -> u32 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Calls run concurrently, but not ahead of the oneways sent before them: a peer that sends
/// `slow_step` three times and then asks `steps_done` sees all three, on either kind of
/// runtime. (Before the fix a call ran as soon as it arrived, here while the first step was
/// still yielding.)
#[test]
fn a_call_runs_after_the_oneways_sent_before_it() {
    let _serial = fd_count_lock();
    for rt in [common::current_thread_runtime(), runtime()] {
        rt.block_on(async {
            let (a, b) = AsyncConnection::pair().unwrap();
            let server = tokio::spawn(StepsServer::new(StepsImpl::default()).serve(b));
            let client = StepsClient::new(a);
            for round in 1..=3 {
                for _ in 0..3 {
                    client.slow_step().await.unwrap();
                }
                assert_eq!(client.steps_done().await.unwrap(), round * 3);
            }
            let connection = client.connection().clone();
            drop(client);
            connection.close();
            server.await.unwrap().unwrap();
            connection.wait_closed().await;
        });
    }
}

/// `#[interface(name = "...")]` in the async flavour: the name is the interface's on the wire,
/// so a blocking client of the same name and methods reaches an async server of it.
mod async_named {
    #[typed_ipc::interface(name = "org.example.Named")]
    pub trait Named {
        async fn answer(&self) -> u32;
    }

    pub struct Impl;

    impl Named for Impl {
        async fn answer(&self) -> u32 {
            42
        }
    }
}

mod blocking_named {
    #[typed_ipc::interface(name = "org.example.Named")]
    pub trait Named {
        fn answer(&self) -> u32;
    }
}

#[test]
fn an_async_server_answers_under_its_wire_name() {
    let _serial = fd_count_lock();
    assert_eq!(async_named::NAMED_INFO.name, "org.example.Named");
    let (ours, theirs) = Socket::pair().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let server = std::thread::spawn(move || {
        runtime.block_on(async move {
            let conn = AsyncConnection::new(theirs).unwrap();
            async_named::NamedServer::new(async_named::Impl)
                .serve(conn)
                .await
        })
    });
    let client = blocking_named::NamedClient::new(Connection::new(ours));
    assert_eq!(client.answer().unwrap(), 42);
    drop(client);
    server.join().unwrap().unwrap();
}

#[test]
fn an_async_server_refuses_an_interface_it_serves_already() {
    let added = std::panic::catch_unwind(|| {
        typed_ipc::tokio::AsyncServer::new()
            .service(async_named::NamedServer::new(async_named::Impl))
            .service(async_named::NamedServer::new(async_named::Impl))
    });
    let panic = added.expect_err("the second `org.example.Named` is refused");
    let message = panic.downcast_ref::<String>().expect("a formatted message");
    assert!(
        message.contains("AsyncServer::service: interface `org.example.Named` is already served"),
        "{message}"
    );
}

/// The async flavour's clients and servers are `Debug` whatever the implementation is, so
/// that a struct holding them derives it; each names its interface by its wire name.
#[test]
fn clients_and_servers_are_debug_naming_their_interface() {
    // `async_named::Impl` is not `Debug`.
    #[derive(Debug)]
    struct Plugin {
        client: async_named::NamedClient,
        server: async_named::NamedServer<async_named::Impl>,
    }
    let _serial = fd_count_lock();
    let runtime = runtime();
    let _entered = runtime.enter();
    let (a, _b) = AsyncConnection::pair().unwrap();
    let plugin = Plugin {
        client: async_named::NamedClient::new(a.clone()).with_timeout(Duration::from_secs(5)),
        server: async_named::NamedServer::new(async_named::Impl),
    };
    let interface = "interface: \"org.example.Named\"";
    let client = format!("NamedClient {{ {interface}, connection: {a:?}, timeout: Some(5s) }}");
    assert!(client.contains("AsyncConnection {"), "{client}");
    assert_eq!(format!("{:?}", plugin.client), client);
    let imp = std::any::type_name::<async_named::Impl>();
    assert!(imp.ends_with("async_named::Impl"), "{imp}");
    let server = format!("NamedServer {{ {interface}, implementation: {imp:?}, .. }}");
    assert_eq!(format!("{:?}", plugin.server), server);
    assert_eq!(
        format!("{plugin:?}"),
        format!("Plugin {{ client: {client}, server: {server} }}")
    );
}

/// An async trait named like the server's type parameter.
mod named_t {
    #[typed_ipc::interface]
    pub trait T {
        async fn add(&self, a: u32, b: u32) -> u32;
    }

    pub struct Impl;

    impl T for Impl {
        async fn add(&self, a: u32, b: u32) -> u32 {
            a + b
        }
    }
}

#[test]
fn an_async_trait_named_t_works() {
    let _serial = fd_count_lock();
    runtime().block_on(async {
        let (a, b) = AsyncConnection::pair().unwrap();
        let server = tokio::spawn(named_t::TServer::new(named_t::Impl).serve(b));
        let client = named_t::TClient::new(a);
        assert_eq!(client.add(2, 3).await.unwrap(), 5);
        drop(client);
        server.await.unwrap().unwrap();
    });
}

/// A default body that uses `self`: its future holds `&Self`, which is `Send` only for a
/// `Sync` implementation (the only kind the server serves).
mod default_uses_self {
    #[typed_ipc::interface]
    pub trait Counter {
        async fn one(&self) -> u32;
        async fn two(&self) -> u32 {
            self.one().await + 1
        }
        async fn three(&self, plus: u32) -> u32
        where
            Self: Sized,
        {
            self.two().await + plus
        }
    }

    pub struct Impl;

    impl Counter for Impl {
        async fn one(&self) -> u32 {
            1
        }
    }
}

#[test]
fn a_default_body_may_use_self() {
    let _serial = fd_count_lock();
    runtime().block_on(async {
        let (a, b) = AsyncConnection::pair().unwrap();
        let server =
            tokio::spawn(default_uses_self::CounterServer::new(default_uses_self::Impl).serve(b));
        let client = default_uses_self::CounterClient::new(a);
        assert_eq!(client.two().await.unwrap(), 2);
        assert_eq!(client.three(1).await.unwrap(), 3);
        drop(client);
        server.await.unwrap().unwrap();
    });
}

/// Tuple parameters beside methods that take as many parameters as a tuple has elements, in
/// an async trait and in a blocking trait's async server: a server's
/// `where (u8, String): DeserializeOwned` must not decide what `resize`'s two arguments decode
/// as.
mod tuple_params {
    use std::os::fd::OwnedFd;

    #[typed_ipc::interface]
    pub trait AsyncPairs {
        async fn resize(&self, width: u32, height: u64) -> u64;
        async fn set_size(&self, size: (u8, String)) -> String;
        async fn write_at(&self, file: OwnedFd, offset: u32) -> u32;
    }

    #[typed_ipc::interface(async_server)]
    pub trait Pairs {
        fn resize(&self, width: u32, height: u64) -> u64;
        fn set_size(&self, size: (u8, String)) -> String;
        fn write_at(&self, file: OwnedFd, offset: u32) -> u32;
    }

    pub struct Impl;

    impl AsyncPairs for Impl {
        async fn resize(&self, width: u32, height: u64) -> u64 {
            u64::from(width) * height
        }
        async fn set_size(&self, size: (u8, String)) -> String {
            format!("{}{}", size.0, size.1)
        }
        async fn write_at(&self, file: OwnedFd, offset: u32) -> u32 {
            drop(file);
            offset + 1
        }
    }

    impl Pairs for Impl {
        fn resize(&self, width: u32, height: u64) -> u64 {
            u64::from(width) * height
        }
        fn set_size(&self, size: (u8, String)) -> String {
            format!("{}{}", size.0, size.1)
        }
        fn write_at(&self, file: OwnedFd, offset: u32) -> u32 {
            drop(file);
            offset + 1
        }
    }
}

#[test]
fn tuple_parameters_beside_methods_of_as_many_parameters() {
    use tuple_params::{AsyncPairsClient, AsyncPairsServer, PairsAsyncServer, PairsClient};
    let _serial = fd_count_lock();
    let rt = runtime();
    rt.block_on(async {
        let (a, b) = AsyncConnection::pair().unwrap();
        let server = tokio::spawn(AsyncPairsServer::new(tuple_params::Impl).serve(b));
        let client = AsyncPairsClient::new(a);
        assert_eq!(client.resize(3, 1 << 40).await.unwrap(), 3 << 40);
        assert_eq!(client.set_size((4, "x".into())).await.unwrap(), "4x");
        assert_eq!(client.write_at(memfd("a"), 6).await.unwrap(), 7);
        drop(client);
        server.await.unwrap().unwrap();
    });
    let (a, b) = Socket::pair().unwrap();
    let server = rt.spawn(PairsAsyncServer::new(tuple_params::Impl).serve({
        let _runtime = rt.enter();
        AsyncConnection::new(b).unwrap()
    }));
    let client = PairsClient::new(Connection::new(a));
    assert_eq!(client.resize(3, 1 << 40).unwrap(), 3 << 40);
    assert_eq!(client.set_size((4, "x".into())).unwrap(), "4x");
    assert_eq!(client.write_at(memfd("a"), 6).unwrap(), 7);
    drop(client);
    rt.block_on(server).unwrap().unwrap();
}
