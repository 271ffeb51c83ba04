//! `#[interface(check_types)]` across real processes: the interface check also covers the
//! definitions of the types a method names (their bincode shape, `typed_ipc::Shape`), so a
//! struct repacked into the same number of bytes at one end fails every call with
//! `InterfaceMismatch` naming the method, where without the opt-in it decodes as wrong values
//! (tests/interface_evolution.rs pins that). What does not change the bincode form (a field or
//! struct renamed, a `#[serde(skip)]` field added) still talks. The child (this test binary,
//! re-run) serves the release `SHAPES_PLUGIN` names; the parent calls it through release 1.

mod common;

use std::os::fd::OwnedFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use typed_ipc::worker::{self, Worker};
use typed_ipc::{Connection, Error, Server};

/// Longer than any call here takes: a call that waits this long hangs, and fails as
/// `TimedOut` rather than hanging the test run.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// The plugin, whichever release it implements.
struct Plugin;

fn file_len(buffer: OwnedFd) -> u64 {
    std::fs::File::from(buffer).metadata().unwrap().len()
}

/// A frame handed over inside a struct of its own: the fd travels through
/// `#[serde(with = "typed_ipc::fd")]`, which the derive sees through.
#[derive(Debug, Serialize, Deserialize, typed_ipc::Shape)]
pub struct Frame {
    pub number: u32,
    #[serde(with = "typed_ipc::fd")]
    pub buffer: OwnedFd,
    #[serde(with = "typed_ipc::fds")]
    pub stats: Option<OwnedFd>,
}

/// Release 1: what the host is built from.
mod v1 {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, typed_ipc::Shape)]
    pub struct Config {
        pub width: u32,
        pub height: u32,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, typed_ipc::Shape)]
    pub struct Caps {
        pub max_width: u32,
        pub max_height: u32,
    }

    // The async client needs the `tokio` feature; the blocking tests run without it.
    #[cfg_attr(
        feature = "tokio",
        typed_ipc::interface(name = "org.example.camera.ShapedIpa", check_types, async_client)
    )]
    #[cfg_attr(
        not(feature = "tokio"),
        typed_ipc::interface(name = "org.example.camera.ShapedIpa", check_types)
    )]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn process(&self, frame: Frame) -> u64;
        fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    }

    impl Ipa for Plugin {
        fn configure(&self, cfg: Config) -> Caps {
            Caps {
                max_width: cfg.width.min(1920),
                max_height: cfg.height.min(1080),
            }
        }
        fn process(&self, frame: Frame) -> u64 {
            let stats = frame.stats.map_or(0, file_len);
            frame.number as u64 + file_len(frame.buffer) + stats
        }
        fn echo(&self, data: Vec<u8>) -> Vec<u8> {
            data
        }
    }
}

/// Release 1's trait as written, but `Caps` repacked into the same eight bytes (two `u16`s
/// and a new `u32`): without `check_types`, `configure` answers wrong values.
mod repacked {
    use super::v1::Config;
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, typed_ipc::Shape)]
    pub struct Caps {
        pub max_width: u16,
        pub max_height: u16,
        pub max_fps: u32,
    }

    #[typed_ipc::interface(name = "org.example.camera.ShapedIpa", check_types)]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn process(&self, frame: Frame) -> u64;
        fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    }

    impl Ipa for Plugin {
        fn configure(&self, cfg: Config) -> Caps {
            Caps {
                max_width: cfg.width.min(1920) as u16,
                max_height: cfg.height.min(1080) as u16,
                max_fps: 30,
            }
        }
        fn process(&self, frame: Frame) -> u64 {
            frame.number as u64 + file_len(frame.buffer)
        }
        fn echo(&self, data: Vec<u8>) -> Vec<u8> {
            data
        }
    }
}

/// Release 1's `Config` with its `u32`s made `f32`s: same size, other meaning.
mod float_config {
    use super::v1::Caps;
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, typed_ipc::Shape)]
    pub struct Config {
        pub width: f32,
        pub height: f32,
    }

    #[typed_ipc::interface(name = "org.example.camera.ShapedIpa", check_types)]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn process(&self, frame: Frame) -> u64;
        fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    }

    impl Ipa for Plugin {
        fn configure(&self, cfg: Config) -> Caps {
            Caps {
                max_width: cfg.width as u32,
                max_height: cfg.height as u32,
            }
        }
        fn process(&self, frame: Frame) -> u64 {
            frame.number as u64 + file_len(frame.buffer)
        }
        fn echo(&self, data: Vec<u8>) -> Vec<u8> {
            data
        }
    }
}

/// Release 1 with `Caps` renamed (`Capabilities`, still written `Caps` in the trait through
/// an alias) and its fields renamed, and a `#[serde(skip)]` field added to `Config`: none of
/// it changes the bincode form.
mod renamed {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, typed_ipc::Shape)]
    pub struct Config {
        pub w: u32,
        #[serde(rename = "h")]
        pub height: u32,
        #[serde(skip)]
        pub seen_at: Option<std::time::Instant>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, typed_ipc::Shape)]
    pub struct Capabilities {
        pub widest: u32,
        pub highest: u32,
    }

    pub type Caps = Capabilities;

    #[typed_ipc::interface(name = "org.example.camera.ShapedIpa", check_types)]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn process(&self, frame: Frame) -> u64;
        fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    }

    impl Ipa for Plugin {
        fn configure(&self, cfg: Config) -> Caps {
            assert!(cfg.seen_at.is_none(), "a skipped field does not travel");
            Capabilities {
                widest: cfg.w.min(1920),
                highest: cfg.height.min(1080),
            }
        }
        fn process(&self, frame: Frame) -> u64 {
            let stats = frame.stats.map_or(0, file_len);
            frame.number as u64 + file_len(frame.buffer) + stats
        }
        fn echo(&self, data: Vec<u8>) -> Vec<u8> {
            data
        }
    }
}

/// Release 1's trait and types, without `check_types`: the same text, the shapes unchecked.
mod unchecked {
    use super::v1::{Caps, Config};
    use super::*;

    #[typed_ipc::interface(name = "org.example.camera.ShapedIpa")]
    pub trait Ipa {
        fn configure(&self, cfg: Config) -> Caps;
        fn process(&self, frame: Frame) -> u64;
        fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    }

    impl Ipa for Plugin {
        fn configure(&self, cfg: Config) -> Caps {
            <Plugin as super::v1::Ipa>::configure(self, cfg)
        }
        fn process(&self, frame: Frame) -> u64 {
            <Plugin as super::v1::Ipa>::process(self, frame)
        }
        fn echo(&self, data: Vec<u8>) -> Vec<u8> {
            data
        }
    }
}

/// The plugin process: serves the release `SHAPES_PLUGIN` names.
#[test]
#[ignore = "run by the tests below, in a child process"]
fn plugin() {
    let server = Server::new();
    let server = match std::env::var("SHAPES_PLUGIN").unwrap().as_str() {
        "v1" => server.service(v1::IpaServer::new(Plugin)),
        "repacked" => server.service(repacked::IpaServer::new(Plugin)),
        "float_config" => server.service(float_config::IpaServer::new(Plugin)),
        "renamed" => server.service(renamed::IpaServer::new(Plugin)),
        "unchecked" => server.service(unchecked::IpaServer::new(Plugin)),
        other => panic!("no plugin release {other}"),
    };
    server.serve(&worker::connection().unwrap()).unwrap();
}

/// A plugin process serving `release`, and a release 1 client of it.
fn spawn(release: &str) -> (Worker, Connection, v1::IpaClient) {
    let mut command = common::child("plugin");
    command.env("SHAPES_PLUGIN", release);
    let (worker, conn) = Worker::spawn(command).unwrap();
    let ipa = v1::IpaClient::new(conn.clone()).with_timeout(HANG_GUARD);
    (worker, conn, ipa)
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

fn config() -> v1::Config {
    v1::Config {
        width: 4096,
        height: 3072,
    }
}

fn frame(number: u32) -> Frame {
    Frame {
        number,
        buffer: common::memfd(b"frame"),
        stats: Some(common::memfd(b"stats!")),
    }
}

/// The repack that decodes as wrong values without the opt-in is a mismatch with it, on
/// every call of the interface (the unchanged methods' too), naming the method whose types
/// differ although its text is the same.
#[test]
fn a_returned_struct_repacked_to_the_same_size_is_a_mismatch_naming_the_method() {
    let _fds = common::fd_count_lock();
    let (worker, conn, ipa) = spawn("repacked");
    let why = mismatch(ipa.configure(config()));
    assert_eq!(
        why,
        "interface `org.example.camera.ShapedIpa`: `configure`: same signature, but the \
         definitions of its types differ"
    );
    assert_eq!(mismatch(ipa.process(frame(1))), why);
    assert_eq!(mismatch(ipa.echo(b"abc".to_vec())), why);
    hang_up(worker, conn);
}

/// A parameter's struct with `u32`s made `f32`s: the same, for a parameter.
#[test]
fn a_parameter_struct_of_floats_for_integers_is_a_mismatch_naming_the_method() {
    let _fds = common::fd_count_lock();
    let (worker, conn, ipa) = spawn("float_config");
    let why = mismatch(ipa.configure(config()));
    assert!(
        why.ends_with("`configure`: same signature, but the definitions of its types differ"),
        "{why}"
    );
    hang_up(worker, conn);
}

/// Renames (of fields, of a struct) and a `#[serde(skip)]` field are not shape changes: the
/// calls go through, fds in a struct of one's own too.
#[test]
fn renames_and_skipped_fields_still_talk() {
    let _fds = common::fd_count_lock();
    let (worker, conn, ipa) = spawn("renamed");
    let caps = ipa.configure(config()).unwrap();
    assert_eq!(
        caps,
        v1::Caps {
            max_width: 1920,
            max_height: 1080
        }
    );
    assert_eq!(ipa.process(frame(10)).unwrap(), 10 + 5 + 6);
    assert_eq!(ipa.echo(vec![7; 100_000]).unwrap(), vec![7; 100_000]);
    hang_up(worker, conn);
}

/// Both ends checking the same types: everything works, fds included.
#[test]
fn the_same_types_at_both_ends_talk() {
    let _fds = common::fd_count_lock();
    let (worker, conn, ipa) = spawn("v1");
    assert_eq!(ipa.configure(config()).unwrap().max_width, 1920);
    assert_eq!(ipa.process(frame(1)).unwrap(), 1 + 5 + 6);
    hang_up(worker, conn);
}

/// An end that checks types and one that does not differ, and the message says that only
/// one end checks, rather than blaming the types.
#[test]
fn checking_at_one_end_only_is_a_mismatch_that_says_so() {
    let _fds = common::fd_count_lock();
    let (worker, conn, ipa) = spawn("unchecked");
    let why = mismatch(ipa.configure(config()));
    assert!(
        why.ends_with(
            "interface `org.example.camera.ShapedIpa`: only one end checks its types (this side \
             has #[interface(check_types)], the peer not)"
        ),
        "{why}"
    );
    hang_up(worker, conn);
}

/// The async client `#[interface(check_types, async_client)]` generates checks the same
/// shapes: against the repacked plugin it gets the same mismatch.
#[cfg(feature = "tokio")]
#[test]
fn the_async_client_checks_the_same_shapes() {
    let _fds = common::fd_count_lock();
    let runtime = common::current_thread_runtime();
    runtime.block_on(async {
        let mut command = common::child("plugin");
        command.env("SHAPES_PLUGIN", "repacked");
        let (mut worker, conn) = typed_ipc::tokio::worker::spawn(command).unwrap();
        let ipa = v1::IpaAsyncClient::new(conn.clone()).with_timeout(HANG_GUARD);
        let why = mismatch(ipa.configure(config()).await);
        assert!(
            why.ends_with("the definitions of its types differ"),
            "{why}"
        );
        drop(ipa);
        conn.close();
        conn.run().await.unwrap();
        let exit = typed_ipc::tokio::worker::wait(&mut worker).await.unwrap();
        assert_eq!(exit, worker::Exit::Code(0));
    });
}

/// The async flavour: an async server of repacked types and an async client of release 1's,
/// both checking types.
#[cfg(feature = "tokio")]
mod async_flavour {
    use super::*;

    mod repacked_async {
        use super::super::repacked::Caps;
        use super::super::v1::Config;
        use super::*;

        #[typed_ipc::interface(name = "org.example.camera.ShapedIpa", check_types)]
        pub trait Ipa {
            async fn configure(&self, cfg: Config) -> Caps;
            async fn process(&self, frame: Frame) -> u64;
            async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
        }

        impl Ipa for Plugin {
            async fn configure(&self, cfg: Config) -> Caps {
                <Plugin as super::super::repacked::Ipa>::configure(self, cfg)
            }
            async fn process(&self, frame: Frame) -> u64 {
                frame.number as u64
            }
            async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
                data
            }
        }
    }

    mod v1_async {
        use super::super::v1::{Caps, Config};
        use super::*;

        #[typed_ipc::interface(name = "org.example.camera.ShapedIpa", check_types)]
        pub trait Ipa {
            async fn configure(&self, cfg: Config) -> Caps;
            async fn process(&self, frame: Frame) -> u64;
            async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
        }
    }

    #[test]
    fn an_async_interface_checks_types_too() {
        // The blocking trait and the async one of the same text and types agree.
        assert_eq!(v1::IPA_INFO.signature, v1_async::IPA_INFO.signature);
        let runtime = common::current_thread_runtime();
        runtime.block_on(async {
            let (a, b) = typed_ipc::tokio::AsyncConnection::pair().unwrap();
            tokio::spawn(repacked_async::IpaServer::new(Plugin).serve(b));
            let ipa = v1_async::IpaClient::new(a).with_timeout(HANG_GUARD);
            let why = mismatch(ipa.configure(config()).await);
            assert!(
                why.ends_with("the definitions of its types differ"),
                "{why}"
            );
        });
    }
}

/// The opt-in changes the signature: a trait's text alone hashes otherwise.
#[test]
fn checking_types_changes_the_signature_and_the_types_change_it_again() {
    assert_ne!(v1::IPA_INFO.signature, unchecked::IPA_INFO.signature);
    assert_ne!(v1::IPA_INFO.signature, repacked::IPA_INFO.signature);
    assert_eq!(v1::IPA_INFO.signature, renamed::IPA_INFO.signature);
    // Each method's own shape, which the mismatch message compares.
    let shapes = |info: &typed_ipc::service::InterfaceInfo| -> Vec<u64> {
        info.methods.iter().map(|m| m.shape).collect()
    };
    assert_eq!(shapes(&unchecked::IPA_INFO), vec![0, 0, 0]);
    let (v1, repacked) = (shapes(&v1::IPA_INFO), shapes(&repacked::IPA_INFO));
    assert_ne!(v1[0], repacked[0]);
    assert_eq!(v1[1..], repacked[1..]);
}

/// What `#[derive(Shape)]` makes of structs and enums: the fields and variants in order, by
/// their types' shapes, names left out; serde's `skip` and `transparent` followed.
mod derived {
    use std::borrow::Cow;
    use std::fs::File;
    use std::os::fd::OwnedFd;

    use serde::{Deserialize, Serialize};
    use typed_ipc::Shape;
    use typed_ipc::shape;

    fn of<T: Shape + ?Sized>() -> u64 {
        T::SHAPE
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct Pair {
        a: u32,
        b: u32,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct PairRenamed {
        #[serde(rename = "x")]
        first: u32,
        second: u32,
        #[serde(skip)]
        _cache: Vec<String>,
        #[serde(skip_serializing, skip_deserializing)]
        _more: Option<u64>,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct PairTuple(u32, u32);

    #[derive(Serialize, Deserialize, Shape)]
    struct Halves {
        a: u16,
        b: u16,
        c: u32,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct Floats {
        a: f32,
        b: f32,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct Swapped {
        a: u32,
        b: f32,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct SwappedBack {
        b: f32,
        a: u32,
    }

    #[derive(Serialize, Deserialize, Shape)]
    enum Mode {
        Off,
        Fixed(u32),
        Auto { min: u32, max: u32 },
    }

    #[derive(Serialize, Deserialize, Shape)]
    enum ModeReordered {
        Fixed(u32),
        Off,
        Auto { min: u32, max: u32 },
    }

    #[derive(Serialize, Deserialize, Shape)]
    enum ModeRenamed {
        Disabled,
        Manual(u32),
        #[serde(rename = "automatic")]
        Automatic {
            low: u32,
            high: u32,
        },
    }

    #[derive(Serialize, Deserialize, Shape)]
    #[serde(transparent)]
    struct Meters {
        value: f64,
        #[serde(skip)]
        _unit: (),
    }

    /// serde's `transparent` leaves `PhantomData` fields out, unskipped: the one field is
    /// what travels.
    #[derive(Serialize, Deserialize, Shape)]
    #[serde(transparent)]
    struct TypedId<T> {
        raw: u64,
        _kind: std::marker::PhantomData<T>,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct Wrapper<T> {
        inner: T,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct Tree<T> {
        value: T,
        kids: Vec<Tree<T>>,
        parent: Option<Box<Self>>,
    }

    /// A type that names itself inside a `Cow`, which asks it to be `Clone`.
    #[derive(Clone, Serialize, Deserialize, Shape)]
    struct Borrowing<'a> {
        name: Cow<'a, str>,
        kids: Cow<'a, [Borrowing<'a>]>,
    }

    /// A type that names itself only in a skipped field, inside a type the derive does not
    /// follow a recursion through: nothing of it travels, so nothing of it is followed.
    #[derive(Serialize, Deserialize, Shape)]
    struct WithParent {
        value: u32,
        #[serde(skip)]
        _parent: Option<std::rc::Weak<WithParent>>,
        #[serde(skip)]
        _cache: Option<Box<Wrapper<Self>>>,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct WithFd {
        #[serde(with = "typed_ipc::fd")]
        fd: OwnedFd,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct WithFile {
        #[serde(with = "::typed_ipc::fd")]
        file: File,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct WithFds {
        #[serde(with = "typed_ipc::fds")]
        fds: Vec<OwnedFd>,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct WithBytes {
        #[serde(with = "typed_ipc::bytes")]
        data: Vec<u8>,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct WithPlainBytes {
        data: Vec<u8>,
    }

    /// Names do not count; order, count and each field's type do.
    #[test]
    fn structs() {
        assert_eq!(of::<Pair>(), of::<PairRenamed>());
        assert_eq!(of::<Pair>(), of::<PairTuple>());
        assert_eq!(of::<Pair>(), of::<(u32, u32)>());
        assert_ne!(of::<Pair>(), of::<Halves>());
        assert_ne!(of::<Pair>(), of::<Floats>());
        assert_ne!(of::<Pair>(), of::<(u16, u16)>());
        assert_ne!(of::<Pair>(), of::<u64>());
        assert_ne!(of::<Swapped>(), of::<SwappedBack>());
        assert_ne!(of::<Option<Pair>>(), of::<Pair>());
        assert_eq!(of::<Meters>(), of::<f64>());
        let id = TypedId::<String> {
            raw: 7,
            _kind: std::marker::PhantomData,
        };
        assert_eq!(
            bincode::serialize(&id).unwrap(),
            bincode::serialize(&7u64).unwrap()
        );
        assert_eq!(of::<TypedId<String>>(), of::<u64>());
        assert_ne!(of::<Wrapper<u32>>(), of::<Wrapper<f32>>());
        assert_eq!(of::<Wrapper<&str>>(), of::<Wrapper<String>>());
    }

    /// Variants count in order, each by its fields; their names do not.
    #[test]
    fn enums() {
        assert_ne!(of::<Mode>(), of::<ModeReordered>());
        assert_eq!(of::<Mode>(), of::<ModeRenamed>());
        assert_ne!(of::<Mode>(), of::<Option<u32>>());
    }

    /// A type that names itself has a shape, and it follows its type parameters.
    #[test]
    fn directly_recursive_types() {
        assert_ne!(of::<Tree<u32>>(), of::<Tree<f32>>());
        assert_eq!(of::<Tree<u32>>(), of::<Tree<u32>>());
        assert_ne!(of::<Tree<u32>>(), of::<Wrapper<u32>>());
        assert_eq!(of::<WithParent>(), of::<(u32,)>());
        assert_eq!(
            of::<Borrowing<'static>>(),
            shape::recursive(shape::product(&[
                of::<String>(),
                shape::seq(shape::RECURSION)
            ]))
        );
    }

    /// A recursive type nested in a field group of its own, `(Vec<Self>, u8)`, and the same
    /// fields with the recursion moved into a struct (`Inner`): each `Vec` holds a whole
    /// `Nested` (with its `u16`) in one, an `Inner` (without) in the other, so the bytes of
    /// one are not the other's. Where the recursion points has to be in the shape.
    #[derive(Debug, PartialEq, Serialize, Deserialize, Shape)]
    struct Nested {
        group: (Vec<Nested>, u8),
        tail: u16,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize, Shape)]
    struct OfInner {
        group: Inner,
        tail: u16,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize, Shape)]
    struct Inner {
        kids: Vec<Inner>,
        byte: u8,
    }

    #[test]
    fn where_a_recursion_points_is_in_the_shape() {
        let leaf = Nested {
            group: (vec![], 1),
            tail: 2,
        };
        let bytes = bincode::serialize(&Nested {
            group: (vec![leaf], 3),
            tail: 4,
        })
        .unwrap();
        let read: Result<OfInner, _> = bincode::deserialize(&bytes);
        assert!(
            read.is_err() || bincode::serialize(&read.unwrap()).unwrap() != bytes,
            "the forms differ"
        );
        assert_ne!(of::<Nested>(), of::<OfInner>());
    }

    /// What serde asks of a type parameter, the derive asks of it too, no more: a handle typed
    /// by what it refers to (only in a `PhantomData`), a skipped cache of `T`, or a field of an
    /// associated type (`C::Wire`, which is what needs a shape, not `C`).
    struct NoShape;

    trait Codec {
        type Wire;
    }

    impl Codec for NoShape {
        type Wire = u32;
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct Handle<T> {
        id: u32,
        #[serde(skip)]
        _cache: Option<T>,
        _kind: std::marker::PhantomData<T>,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct Encoded<C: Codec> {
        wire: C::Wire,
    }

    #[test]
    fn parameters_are_bound_as_serde_binds_them() {
        assert_eq!(of::<Handle<NoShape>>(), of::<(u32, ())>());
        assert_eq!(of::<Encoded<NoShape>>(), of::<(u32,)>());
    }

    /// typed-ipc's own `with` modules: an fd is an fd, whatever type holds it, and one sent
    /// borrowed has the shape of one received owned.
    #[test]
    fn typed_ipcs_own_with_modules() {
        assert_eq!(of::<WithFd>(), of::<WithFile>());
        assert_eq!(of::<WithFd>(), shape::product(&[shape::FD]));
        assert_eq!(of::<std::os::fd::BorrowedFd<'static>>(), of::<OwnedFd>());
        assert_eq!(of::<WithFds>(), shape::product(&[of::<Vec<OwnedFd>>()]));
        assert_eq!(of::<WithBytes>(), shape::product(&[shape::BYTE_STRING]));
        assert_ne!(of::<WithBytes>(), of::<WithPlainBytes>());
        assert_ne!(of::<WithFd>(), of::<(u32,)>());
    }

    /// A type of another crate's, which cannot implement `Shape` here, written by a `with`
    /// module as a `[u8; 16]`.
    #[derive(Debug, PartialEq)]
    pub struct Foreign(u128);

    mod as_bytes {
        pub fn serialize<S: serde::Serializer>(
            v: &super::Foreign,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            serde::Serialize::serialize(&v.0.to_le_bytes(), s)
        }
        pub fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<super::Foreign, D::Error> {
            let bytes: [u8; 16] = serde::Deserialize::deserialize(d)?;
            Ok(super::Foreign(u128::from_le_bytes(bytes)))
        }
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize, Shape)]
    struct Job {
        #[serde(with = "as_bytes")]
        #[shape(same_as = "[u8; 16]")]
        id: Foreign,
        step: u32,
    }

    #[derive(Serialize, Deserialize, Shape)]
    struct JobAsWritten {
        id: [u8; 16],
        step: u32,
    }

    /// `#[shape(same_as)]` lets a field of a type without a shape through a `with` module,
    /// with the shape of what the module writes, which is what bincode writes.
    #[test]
    fn a_field_says_what_its_with_module_writes() {
        assert_eq!(of::<Job>(), of::<JobAsWritten>());
        assert_ne!(of::<Job>(), of::<(u128, u32)>());
        let job = Job {
            id: Foreign(7 << 100),
            step: 3,
        };
        let written = bincode::serialize(&job).unwrap();
        let as_written = JobAsWritten {
            id: (7u128 << 100).to_le_bytes(),
            step: 3,
        };
        assert_eq!(written, bincode::serialize(&as_written).unwrap());
        assert_eq!(bincode::deserialize::<Job>(&written).unwrap(), job);
    }
}
