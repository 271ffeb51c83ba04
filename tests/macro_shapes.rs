//! Every shape `#[interface]` supports, over `Connection::pair()` with the server on a thread.
//!
//! The tests take one lock, so that each can count this process's open fds without another
//! test's fds coming and going.

mod common;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use common::Unsendable;
use nix::sys::memfd::{MFdFlags, memfd_create};
use serde::{Deserialize, Serialize};
use typed_ipc::{Connection, Error, interface};

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

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum OpenError {
    Empty,
}

/// A user type carrying fds among its fields.
#[derive(Debug, Serialize, Deserialize)]
pub struct Labelled {
    pub label: String,
    #[serde(with = "typed_ipc::fd")]
    pub file: OwnedFd,
    #[serde(with = "typed_ipc::fds")]
    pub maybe: Option<OwnedFd>,
    #[serde(with = "typed_ipc::fds")]
    pub more: Vec<OwnedFd>,
}

#[interface]
pub trait Shapes {
    fn reverse(&self, text: String) -> String;
    /// Fds in: the sum of their files' sizes.
    fn total_len(&self, files: Vec<OwnedFd>) -> u64;
    fn configure(&self, cfg: Config) -> Result<Caps, ConfigError>;
    /// An fd out: a new file holding `content`.
    fn open_buffer(&self, content: String) -> OwnedFd;
    /// An fd in: writes `content` into it.
    fn write_into(&self, file: OwnedFd, content: String);
    fn maybe_open(&self, content: Option<String>) -> Option<OwnedFd>;
    /// A file of its own holding `content`, if there is any: a fallible fd.
    fn open_nonempty(&self, content: String) -> Result<OwnedFd, OpenError>;
    /// The first of `files`, or why there is none: fallible fds both ways.
    fn first_of(&self, files: Result<Vec<OwnedFd>, String>) -> Result<Option<OwnedFd>, String>;
    /// Writes `content` into `file` if there is one; whether there was.
    fn maybe_write(&self, file: Option<OwnedFd>, content: String) -> bool;
    /// `count` new files, the i-th holding `i`.
    fn open_many(&self, count: u32) -> Vec<OwnedFd>;
    /// Writes the label into the file, and hands the item back.
    fn labelled(&self, item: Labelled) -> Labelled;
    #[oneway]
    fn stats_ready(&self, frame: u32, stats: OwnedFd);
    fn nothing(&self);
    fn zeroes(&self, len: u32) -> Vec<u8>;
    fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    /// A new string of `len` bytes, starting with the addresses of `data` and of itself.
    fn addresses(&self, data: Vec<u8>, len: u32) -> Vec<u8>;
    fn explode(&self, message: String) -> u32;
    fn unsendable(&self) -> Unsendable;
}

struct Impl {
    /// Where `stats_ready` reports what it read.
    stats: Mutex<Sender<(u32, String)>>,
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
    fn reverse(&self, text: String) -> String {
        text.chars().rev().collect()
    }
    fn total_len(&self, files: Vec<OwnedFd>) -> u64 {
        files
            .into_iter()
            .map(|f| File::from(f).metadata().unwrap().len())
            .sum()
    }
    fn configure(&self, cfg: Config) -> Result<Caps, ConfigError> {
        match cfg.gain {
            gain @ 0..=10 => Ok(Caps {
                max_gain: 10 - gain,
            }),
            gain => Err(ConfigError::TooLoud { gain, max: 10 }),
        }
    }
    fn open_buffer(&self, content: String) -> OwnedFd {
        memfd(&content)
    }
    fn write_into(&self, file: OwnedFd, content: String) {
        write(file, &content)
    }
    fn maybe_open(&self, content: Option<String>) -> Option<OwnedFd> {
        content.map(|c| memfd(&c))
    }
    fn open_nonempty(&self, content: String) -> Result<OwnedFd, OpenError> {
        match content.is_empty() {
            true => Err(OpenError::Empty),
            false => Ok(memfd(&content)),
        }
    }
    fn first_of(&self, files: Result<Vec<OwnedFd>, String>) -> Result<Option<OwnedFd>, String> {
        files.map(|files| files.into_iter().next())
    }
    fn maybe_write(&self, file: Option<OwnedFd>, content: String) -> bool {
        file.map(|f| write(f, &content)).is_some()
    }
    fn open_many(&self, count: u32) -> Vec<OwnedFd> {
        (0..count).map(|i| memfd(&i.to_string())).collect()
    }
    fn labelled(&self, item: Labelled) -> Labelled {
        write(item.file.try_clone().unwrap(), &item.label);
        // The optional fd and the list come back swapped: the list's first, and the rest
        // with the optional one after them.
        let mut more = item.more;
        let maybe = (!more.is_empty()).then(|| more.remove(0));
        more.extend(item.maybe);
        Labelled {
            label: format!("{} (seen)", item.label),
            file: item.file,
            maybe,
            more,
        }
    }
    fn stats_ready(&self, frame: u32, stats: OwnedFd) {
        let report = (frame, contents(&stats));
        self.stats.lock().unwrap().send(report).unwrap();
    }
    fn nothing(&self) {}
    fn zeroes(&self, len: u32) -> Vec<u8> {
        vec![0; len as usize]
    }
    fn echo(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
    fn addresses(&self, data: Vec<u8>, len: u32) -> Vec<u8> {
        let mut out = vec![0; len as usize];
        out[..8].copy_from_slice(&(data.as_ptr() as u64).to_le_bytes());
        let at = out.as_ptr() as u64;
        out[8..16].copy_from_slice(&at.to_le_bytes());
        out
    }
    fn explode(&self, message: String) -> u32 {
        panic!("{message}")
    }
    fn unsendable(&self) -> Unsendable {
        Unsendable
    }
}

static SERIAL: Mutex<()> = Mutex::new(());

/// One test at a time (see the module docs); a failed test does not fail the next.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The fds a leak of the tests' shows as (sockets, pipes, memfds: [`common::ipc_fds`]), listed
/// for a failure to name. Not every fd: the test harness and the threads of tests still
/// starting open files of their own for a moment (`/proc/<pid>/maps` was seen), which no lock
/// of the tests' keeps out of a count.
fn open_fds() -> u64 {
    typed_ipc::wait_for_closes(); // typed-ipc closes what it drops on its own
    let v: Vec<_> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .collect();
    eprintln!("{v:?}");
    common::ipc_fds()
}

/// A client, and its server running on a thread.
struct Running {
    client: ShapesClient,
    server: JoinHandle<Result<(), Error>>,
    /// What the server's oneway method reports.
    stats: Receiver<(u32, String)>,
}

fn start() -> Running {
    let (a, b) = Connection::pair().unwrap();
    let (tx, stats) = channel();
    let imp = Impl {
        stats: Mutex::new(tx),
    };
    let server = std::thread::spawn(move || ShapesServer::new(imp).serve(b));
    Running {
        client: ShapesClient::new(a),
        server,
        stats,
    }
}

impl Running {
    /// Hangs up and checks that the server saw a clean close.
    fn stop(self) {
        drop(self.client);
        self.server.join().unwrap().unwrap();
    }
}

#[test]
fn plain_values_and_results() {
    let _serial = serial();
    let running = start();
    let ipa = &running.client;
    assert_eq!(ipa.reverse("FooBar".into()).unwrap(), "raBooF");
    assert_eq!(
        ipa.configure(Config { gain: 3 }).unwrap(),
        Ok(Caps { max_gain: 7 })
    );
    assert_eq!(
        ipa.configure(Config { gain: 11 }).unwrap(),
        Err(ConfigError::TooLoud { gain: 11, max: 10 })
    );
    ipa.nothing().unwrap();
    running.stop();
}

#[test]
fn fds_in_and_out() {
    let _serial = serial();
    let before = open_fds();
    let running = start();
    let ipa = &running.client;

    // OwnedFd out: the server wrote it, we read it.
    assert_eq!(
        contents(&ipa.open_buffer("from the server".into()).unwrap()),
        "from the server"
    );
    {
        // OwnedFd in: the server writes through its copy, we read through ours.
        let mine = memfd("");
        ipa.write_into(mine.try_clone().unwrap(), "from the client".into())
            .unwrap();
        assert_eq!(contents(&mine), "from the client");
    }
    {
        // Any `AsFd` goes in: a `File` given (closed once sent), or one borrowed, which the
        // caller keeps, as it does a `BorrowedFd`: no copy of the fd made for the call.
        let file = File::from(memfd(""));
        let written = || contents(&file.try_clone().unwrap().into());
        let open = open_fds();
        ipa.write_into(&file, "via &File".into()).unwrap();
        assert_eq!(written(), "via &File");
        ipa.write_into(file.as_fd(), "via BorrowedFd".into())
            .unwrap();
        assert_eq!(written(), "via BorrowedFd");
        assert_eq!(open_fds(), open, "the borrowed fd is still the only one");
        let given = file.try_clone().unwrap();
        ipa.write_into(given, "via a File given".into()).unwrap();
        assert_eq!(open_fds(), open, "the given fd was closed once sent");
        assert_eq!(written(), "via a File given");
    }
    {
        // Option<OwnedFd> both ways.
        assert_eq!(
            contents(&ipa.maybe_open(Some("maybe".into())).unwrap().unwrap()),
            "maybe"
        );
        assert!(ipa.maybe_open(None).unwrap().is_none());
        let mine = memfd("");
        assert!(
            ipa.maybe_write(Some(mine.try_clone().unwrap()), "some".into())
                .unwrap()
        );
        assert_eq!(contents(&mine), "some");
        assert!(!ipa.maybe_write(None, "none".into()).unwrap());
    }
    {
        // Result<OwnedFd, E>, Result<Vec<OwnedFd>, E> and Result<Option<OwnedFd>, E>.
        let opened = ipa.open_nonempty("fallible".into()).unwrap();
        assert_eq!(contents(&opened.unwrap()), "fallible");
        let refused = ipa.open_nonempty(String::new()).unwrap();
        assert_eq!(refused.unwrap_err(), OpenError::Empty);
        let first = ipa.first_of(Ok(vec![memfd("one"), memfd("two")])).unwrap();
        assert_eq!(contents(&first.unwrap().unwrap()), "one");
        assert!(ipa.first_of(Ok(Vec::new())).unwrap().unwrap().is_none());
        let why = ipa.first_of(Err("none here".into())).unwrap();
        assert_eq!(why.unwrap_err(), "none here");
    }
    {
        // Vec<OwnedFd> both ways.
        let files = ipa.open_many(3).unwrap();
        let texts: Vec<String> = files.iter().map(contents).collect();
        assert_eq!(texts, ["0", "1", "2"]);
        assert_eq!(
            ipa.total_len(vec![memfd("abc"), memfd("de"), memfd("")])
                .unwrap(),
            5
        );
        assert_eq!(ipa.total_len(Vec::new()).unwrap(), 0);
        assert!(ipa.open_many(0).unwrap().is_empty());
    }
    {
        // An OwnedFd inside a user type, both ways.
        let mine = memfd("");
        let item = Labelled {
            label: "label".into(),
            file: mine.try_clone().unwrap(),
            maybe: Some(memfd("maybe")),
            more: vec![memfd("a"), memfd("b")],
        };
        let back = ipa.labelled(item).unwrap();
        assert_eq!(back.label, "label (seen)");
        assert_eq!(contents(&mine), "label");
        assert_eq!(contents(&back.file), "label");
        assert_eq!(back.maybe.as_ref().map(contents).as_deref(), Some("a"));
        let more: Vec<String> = back.more.iter().map(contents).collect();
        assert_eq!(more, ["b", "maybe"]);
        // None and an empty list travel too.
        let back = ipa
            .labelled(Labelled {
                label: String::new(),
                file: memfd(""),
                maybe: None,
                more: Vec::new(),
            })
            .unwrap();
        assert!(back.maybe.is_none() && back.more.is_empty());
    }
    running.stop();
    assert_eq!(open_fds(), before, "every fd opened by the test was closed");
}

#[test]
fn oneway_sends_without_waiting_for_a_reply() {
    let _serial = serial();
    let running = start();
    let ipa = &running.client;
    for frame in 0..3 {
        ipa.stats_ready(frame, memfd(&format!("stats {frame}")))
            .unwrap();
    }
    // Oneway messages run in the order they were sent.
    for frame in 0..3 {
        assert_eq!(
            running.stats.recv().unwrap(),
            (frame, format!("stats {frame}"))
        );
    }
    running.stop();
}

#[test]
fn byte_buffers() {
    let _serial = serial();
    let running = start();
    let ipa = &running.client;
    let big = ipa.zeroes(1 << 20).unwrap();
    assert_eq!(big.len(), 1 << 20);
    assert!(big.iter().all(|&b| b == 0));
    let data: Vec<u8> = (0..=255).cycle().take(100_000).collect();
    assert_eq!(ipa.echo(data.clone()).unwrap(), data);
    assert_eq!(ipa.echo(Vec::new()).unwrap(), Vec::<u8>::new());
    running.stop();
}

/// A generated stub keeps the allocation of the `Vec<u8>` it sent for the next byte string its
/// thread receives, and a generated server that of the `Vec<u8>` it replied with: an echo-like
/// call then frees and allocates nothing on either side. The second strings are half as long
/// as the first, so that `malloc` (which sorts freed chunks by size) would not hand out the
/// first ones' memory again by itself.
#[test]
fn a_sent_byte_string_lends_its_memory_to_the_next_received() {
    let _serial = serial();
    let running = start();
    let ipa = &running.client;
    let addresses = |reply: &[u8]| {
        let word = |i: usize| u64::from_le_bytes(reply[i..i + 8].try_into().unwrap());
        (word(0), word(8))
    };
    let first = vec![1u8; 600];
    let first_at = first.as_ptr();
    let (_, first_reply_at) = addresses(&ipa.addresses(first, 600).unwrap());
    let second = ipa.addresses(vec![2u8; 300], 300).unwrap();
    let (second_request_at, _) = addresses(&second);
    assert_eq!(
        second.as_ptr(),
        first_at,
        "the client received into the first request's memory"
    );
    assert_eq!(
        second_request_at, first_reply_at,
        "the server received into the first reply's memory"
    );
    assert_eq!(second.len(), 300);
    assert!(second[16..].iter().all(|&b| b == 0), "nothing stale shows");
    running.stop();
}

#[test]
fn a_panic_is_an_error_reply_and_the_server_goes_on() {
    let _serial = serial();
    let running = start();
    let ipa = &running.client;
    match ipa.explode("kaboom".into()) {
        Err(Error::Panicked(why)) => assert_eq!(why, "Shapes::explode: kaboom"),
        other => panic!("expected Error::Panicked, got {other:?}"),
    }
    assert_eq!(ipa.reverse("still here".into()).unwrap(), "ereh llits");
    running.stop();
}

/// A result the server cannot encode gets a failure reply naming why: until that was fixed,
/// the call counted as answered and the caller waited for good (the timeout here only turns
/// such a hang into a failure).
#[test]
fn a_reply_that_cannot_be_encoded_is_an_error_reply() {
    let _serial = serial();
    let running = start();
    let ipa = running
        .client
        .with_timeout(std::time::Duration::from_secs(60));
    match ipa.unsendable() {
        Err(Error::Remote(why)) => assert!(
            why.contains("Shapes::unsendable could not answer")
                && why.contains("this value refuses to be encoded"),
            "{why}"
        ),
        other => panic!("expected Error::Remote, got {other:?}"),
    }
    assert_eq!(ipa.reverse("still here".into()).unwrap(), "ereh llits");
    drop(ipa);
    running.stop();
}

#[test]
fn clones_and_timeouts_share_the_connection() {
    let _serial = serial();
    let running = start();
    let ipa = &running.client;
    let other = ipa.with_timeout(std::time::Duration::from_secs(30));
    assert_eq!(other.reverse("ab".into()).unwrap(), "ba");
    let cloned = ipa.clone();
    assert_eq!(cloned.reverse("cd".into()).unwrap(), "dc");
    drop((other, cloned));
    assert!(!ipa.connection().is_closed());
    running.stop();
}

#[test]
fn an_unknown_command_gets_an_error_reply() {
    let _serial = serial();
    let before = open_fds();
    let running = start();
    let ipa = &running.client;
    // Only a hand-made call can name a command the interface lacks; it carries an fd, which
    // the server must close.
    let fd = memfd("");
    let fds = (typed_ipc::codec::Fd(&fd),);
    let reply = ipa.connection().call::<_, ()>(&SHAPES_INFO, 99, &fds, None);
    match reply {
        Err(Error::Remote(why)) => assert!(why.contains("99"), "{why}"),
        other => panic!("expected Error::Remote, got {other:?}"),
    }
    // A body that does not decode as the method's arguments.
    match ipa
        .connection()
        .call::<_, String>(&SHAPES_INFO, 0, &fds, None)
    {
        Err(Error::Remote(why)) => assert!(why.contains("reverse"), "{why}"),
        other => panic!("expected Error::Remote, got {other:?}"),
    }
    assert_eq!(ipa.reverse("ok".into()).unwrap(), "ko");
    drop(fd);
    running.stop();
    assert_eq!(open_fds(), before);
}

/// Two builds of one interface that disagree about one method.
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
        fn same(&self) -> u32;
        fn lookup(&self, key: String) -> String;
    }

    pub struct Impl;

    impl Versioned for Impl {
        fn same(&self) -> u32 {
            2
        }
        fn lookup(&self, key: String) -> String {
            key
        }
    }
}

#[test]
fn a_different_interface_is_a_mismatch_that_names_the_method() {
    let _serial = serial();
    let (a, b) = Connection::pair().unwrap();
    let server = std::thread::spawn(move || v2::VersionedServer::new(v2::Impl).serve(b));
    let client = v1::VersionedClient::new(a.clone());
    match client.lookup(7) {
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
    // The whole interface is refused, not just the method that differs.
    assert!(matches!(client.same(), Err(Error::InterfaceMismatch(_))));
    // An interface the server does not serve at all is another error, and named.
    let shapes = ShapesClient::new(a.clone());
    match shapes.reverse("x".into()) {
        Err(Error::NotServed(why)) => assert!(why.contains("Shapes"), "{why}"),
        other => panic!("expected Error::NotServed, got {other:?}"),
    }
    // The matching client works on the same connection.
    assert_eq!(v2::VersionedClient::new(a.clone()).same().unwrap(), 2);
    drop((client, shapes, a));
    server.join().unwrap().unwrap();
}

/// A server that may refuse callers tells a caller what it serves only once the caller is let
/// in: a refused caller of another version of the trait gets `Refused`, not the server's
/// method signatures, and one of an interface not served learns no names.
#[test]
fn a_refused_caller_learns_nothing_of_what_is_served() {
    let _serial = serial();
    let (a, b) = Connection::pair().unwrap();
    let server = typed_ipc::Server::new()
        .service(v2::VersionedServer::new(v2::Impl))
        .authorize(|_, _, _| Err("nobody may call".into()));
    let server = std::thread::spawn(move || server.serve(&b));
    match v1::VersionedClient::new(a.clone()).lookup(7) {
        Err(Error::Refused(why)) => assert_eq!(why, "nobody may call"),
        other => panic!("expected Error::Refused, got {other:?}"),
    }
    match ShapesClient::new(a.clone()).reverse("x".into()) {
        Err(Error::NotServed(why)) => {
            assert!(!why.contains("Versioned"), "{why}");
            // Nor that it serves nothing, which it does not say either.
            assert!(why.contains("named none that it does"), "{why}");
            assert!(!why.contains("nothing"), "{why}");
        }
        other => panic!("expected Error::NotServed, got {other:?}"),
    }
    drop(a);
    server.join().unwrap().unwrap();
}

/// Two plugins that each call their interface `Control`: named on the wire, both are
/// served on one connection, each answering its own clients.
mod camera_plugin {
    #[typed_ipc::interface(name = "org.example.camera.Control")]
    pub trait Control {
        fn exposure(&self) -> u32;
    }

    pub struct Impl;

    impl Control for Impl {
        fn exposure(&self) -> u32 {
            33
        }
    }
}

mod audio_plugin {
    #[typed_ipc::interface(name = "org.example.audio.Control")]
    pub trait Control {
        fn volume(&self) -> u8;
    }

    pub struct Impl;

    impl Control for Impl {
        fn volume(&self) -> u8 {
            7
        }
    }
}

/// The same trait as `camera_plugin`'s, under its Rust name only: another interface on the
/// wire.
mod unnamed_camera_plugin {
    #[typed_ipc::interface]
    pub trait Control {
        fn exposure(&self) -> u32;
    }

    impl Control for super::camera_plugin::Impl {
        fn exposure(&self) -> u32 {
            34
        }
    }
}

/// Another plugin's `Control`, unnamed too: the wire cannot tell it from the one above.
mod unnamed_audio_plugin {
    #[typed_ipc::interface]
    pub trait Control {
        fn volume(&self) -> u8;
    }

    impl Control for super::audio_plugin::Impl {
        fn volume(&self) -> u8 {
            8
        }
    }
}

#[test]
fn a_server_refuses_two_interfaces_the_wire_cannot_tell_apart() {
    let added = std::panic::catch_unwind(|| {
        typed_ipc::Server::new()
            .service(unnamed_camera_plugin::ControlServer::new(
                camera_plugin::Impl,
            ))
            .service(unnamed_audio_plugin::ControlServer::new(audio_plugin::Impl))
    });
    let panic = added.expect_err("the second `Control` is refused");
    let message = panic.downcast_ref::<String>().expect("a formatted message");
    assert!(
        message.contains("interface `Control` is already served"),
        "{message}"
    );
    assert!(
        message.contains("#[interface(name = \"...\")]"),
        "{message}"
    );
    // Named, both are served (`traits_of_one_name_are_told_apart_by_their_wire_names`); and
    // an unnamed `Control` beside a named one is another interface too.
    typed_ipc::Server::new()
        .service(unnamed_camera_plugin::ControlServer::new(
            camera_plugin::Impl,
        ))
        .service(camera_plugin::ControlServer::new(camera_plugin::Impl));
}

#[test]
fn traits_of_one_name_are_told_apart_by_their_wire_names() {
    let _serial = serial();
    assert_eq!(
        camera_plugin::CONTROL_INFO.name,
        "org.example.camera.Control"
    );
    assert_eq!(
        camera_plugin::CONTROL_INFO.id,
        typed_ipc::service::fnv1a(b"org.example.camera.Control")
    );
    assert_ne!(
        camera_plugin::CONTROL_INFO.id,
        audio_plugin::CONTROL_INFO.id
    );
    assert_eq!(unnamed_camera_plugin::CONTROL_INFO.name, "Control");
    // A name changes the id, not what the methods look like.
    assert_eq!(
        camera_plugin::CONTROL_INFO.signature,
        unnamed_camera_plugin::CONTROL_INFO.signature
    );

    let (a, b) = Connection::pair().unwrap();
    let server = typed_ipc::Server::new()
        .service(camera_plugin::ControlServer::new(camera_plugin::Impl))
        .service(audio_plugin::ControlServer::new(audio_plugin::Impl));
    let server = std::thread::spawn(move || server.serve(&b));
    assert_eq!(
        camera_plugin::ControlClient::new(a.clone())
            .exposure()
            .unwrap(),
        33
    );
    assert_eq!(
        audio_plugin::ControlClient::new(a.clone())
            .volume()
            .unwrap(),
        7
    );
    // Without the name, the same methods are another interface, which this server does not
    // serve: the error names what it serves.
    match unnamed_camera_plugin::ControlClient::new(a.clone()).exposure() {
        Err(Error::NotServed(why)) => {
            assert!(why.contains("org.example.camera.Control"), "{why}");
            assert!(why.contains("org.example.audio.Control"), "{why}");
        }
        other => panic!("expected Error::NotServed, got {other:?}"),
    }
    drop(a);
    server.join().unwrap().unwrap();
}

/// Clients and servers are `Debug` whatever the implementation is, so that a struct holding
/// them derives it; each names its interface by its wire name.
#[test]
fn clients_and_servers_are_debug_naming_their_interface() {
    let _serial = serial();
    // `camera_plugin::Impl` is not `Debug`.
    #[derive(Debug)]
    struct Plugin {
        client: camera_plugin::ControlClient,
        server: camera_plugin::ControlServer<camera_plugin::Impl>,
        shared: camera_plugin::ControlServer<dyn camera_plugin::Control + Send + Sync>,
    }
    let (a, _b) = Connection::pair().unwrap();
    let client = camera_plugin::ControlClient::new(a.clone());
    let shared: std::sync::Arc<dyn camera_plugin::Control + Send + Sync> =
        std::sync::Arc::new(camera_plugin::Impl);
    let plugin = Plugin {
        client: client.with_timeout(std::time::Duration::from_secs(5)),
        server: camera_plugin::ControlServer::new(camera_plugin::Impl),
        shared: camera_plugin::ControlServer::from_arc(shared),
    };
    let interface = "interface: \"org.example.camera.Control\"";
    assert_eq!(
        format!("{client:?}"),
        format!("ControlClient {{ {interface}, connection: {a:?}, timeout: None }}")
    );
    let client = format!("ControlClient {{ {interface}, connection: {a:?}, timeout: Some(5s) }}");
    assert_eq!(format!("{:?}", plugin.client), client);
    let server = |imp| format!("ControlServer {{ {interface}, implementation: {imp:?}, .. }}");
    let (server, shared) = (
        server(std::any::type_name::<camera_plugin::Impl>()),
        server(std::any::type_name::<
            dyn camera_plugin::Control + Send + Sync,
        >()),
    );
    assert!(server.contains("camera_plugin::Impl\""), "{server}");
    assert_eq!(format!("{:?}", plugin.server), server);
    assert!(
        shared.contains("dyn macro_shapes::camera_plugin::Control"),
        "{shared}"
    );
    assert_eq!(format!("{:?}", plugin.shared), shared);
    assert_eq!(
        format!("{plugin:?}"),
        format!("Plugin {{ client: {client}, server: {server}, shared: {shared} }}")
    );
}

#[test]
fn interface_info_describes_the_trait() {
    assert_eq!(SHAPES_INFO.name, "Shapes");
    let reverse = SHAPES_INFO.method(0).unwrap();
    assert_eq!(
        reverse.signature,
        "fn reverse(&self, text: String) -> String"
    );
    let stats = SHAPES_INFO
        .methods
        .iter()
        .find(|m| m.name == "stats_ready")
        .unwrap();
    assert!(stats.oneway);
    assert_ne!(v1::VERSIONED_INFO.signature, v2::VERSIONED_INFO.signature);
    assert_eq!(v1::VERSIONED_INFO.id, v2::VERSIONED_INFO.id);
}

/// A trait, and a method, whose `where` clause only bounds `Self`: not generic.
mod self_bounded {
    #[typed_ipc::interface]
    pub trait SelfBounded
    where
        Self: Send + Sync,
    {
        fn double(&self, n: u32) -> u32;
        fn triple(&self, n: u32) -> u32
        where
            Self: Sized;
    }

    pub struct Impl;

    impl SelfBounded for Impl {
        fn double(&self, n: u32) -> u32 {
            2 * n
        }
        fn triple(&self, n: u32) -> u32 {
            3 * n
        }
    }
}

#[test]
fn where_clauses_on_self_are_not_generic() {
    let _serial = serial();
    let (a, b) = Connection::pair().unwrap();
    let server = std::thread::spawn(move || {
        self_bounded::SelfBoundedServer::new(self_bounded::Impl).serve(b)
    });
    let client = self_bounded::SelfBoundedClient::new(a);
    assert_eq!(client.double(21).unwrap(), 42);
    assert_eq!(client.triple(14).unwrap(), 42);
    drop(client);
    server.join().unwrap().unwrap();
}

/// A deprecated method, in a trait that is deprecated as a whole: the generated server calls
/// them, which is no use of the user's and must not warn (`-D warnings` would fail the build
/// at the trait, where nothing can silence it).
#[deny(deprecated)]
mod deprecated_method {
    #[deprecated(note = "use `Old2` instead")]
    #[typed_ipc::interface]
    pub trait Old {
        #[deprecated(note = "use `answer` instead")]
        fn legacy_answer(&self) -> u32;
        fn answer(&self) -> u32;
    }

    pub struct Impl;

    #[allow(deprecated)]
    impl Old for Impl {
        fn legacy_answer(&self) -> u32 {
            41
        }
        fn answer(&self) -> u32 {
            42
        }
    }
}

/// A deprecated type in an interface's signatures, the deprecation allowed where the trait is
/// declared: the generated items name the type too, and must not warn (`-D warnings` would
/// fail the build in code the user cannot annotate).
#[deny(deprecated)]
mod deprecated_type {
    #[deprecated(note = "use `Config2` instead")]
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Config {
        pub gain: u32,
    }

    #[allow(deprecated)]
    #[typed_ipc::interface]
    pub trait Tuner {
        fn tune(&self, config: Config) -> Config;
        #[oneway]
        fn nudge(&self, config: Config);
    }

    pub struct Impl;

    #[allow(deprecated)]
    impl Tuner for Impl {
        fn tune(&self, config: Config) -> Config {
            Config {
                gain: config.gain + 1,
            }
        }
        fn nudge(&self, _config: Config) {}
    }
}

#[test]
#[allow(deprecated)]
fn deprecated_types_are_served_without_warnings() {
    use deprecated_type::Config;
    let _serial = serial();
    let (a, b) = Connection::pair().unwrap();
    let server = std::thread::spawn(move || {
        deprecated_type::TunerServer::new(deprecated_type::Impl).serve(b)
    });
    let client = deprecated_type::TunerClient::new(a);
    assert_eq!(client.tune(Config { gain: 1 }).unwrap(), Config { gain: 2 });
    client.nudge(Config { gain: 0 }).unwrap();
    drop(client);
    server.join().unwrap().unwrap();
}

// Calling `legacy_answer` through the client is a use of it, and warns (its stub is
// deprecated too): allowed here, the caller's to allow.
#[test]
#[allow(deprecated)]
fn deprecated_methods_are_served_without_warnings() {
    let _serial = serial();
    let (a, b) = Connection::pair().unwrap();
    let server = std::thread::spawn(move || {
        deprecated_method::OldServer::new(deprecated_method::Impl).serve(b)
    });
    let client = deprecated_method::OldClient::new(a);
    assert_eq!(client.legacy_answer().unwrap(), 41);
    assert_eq!(client.answer().unwrap(), 42);
    drop(client);
    server.join().unwrap().unwrap();
}

/// Tuple parameters beside methods that take as many parameters as a tuple has elements: the
/// server's `where (u8, String): DeserializeOwned` must not decide what `resize`'s two
/// arguments decode as.
mod tuple_params {
    use std::os::fd::OwnedFd;

    #[typed_ipc::interface]
    pub trait Pairs {
        fn resize(&self, width: u32, height: u64) -> u64;
        fn set_size(&self, size: (u8, String)) -> String;
        fn write_at(&self, file: OwnedFd, offset: u32) -> u32;
        fn place(&self, at: (u16, u32));
        fn one(&self, x: u64) -> u64;
        fn single(&self, t: (u8,)) -> u8;
    }

    pub struct Impl;

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
        fn place(&self, _at: (u16, u32)) {}
        fn one(&self, x: u64) -> u64 {
            x + 1
        }
        fn single(&self, t: (u8,)) -> u8 {
            t.0 + 1
        }
    }
}

#[test]
fn tuple_parameters_beside_methods_of_as_many_parameters() {
    use tuple_params::{PairsClient, PairsServer};
    let _serial = serial();
    let (a, b) = Connection::pair().unwrap();
    let server = std::thread::spawn(move || PairsServer::new(tuple_params::Impl).serve(b));
    let client = PairsClient::new(a);
    assert_eq!(client.resize(3, 1 << 40).unwrap(), 3 << 40);
    assert_eq!(client.set_size((4, "x".into())).unwrap(), "4x");
    assert_eq!(client.write_at(memfd("a"), 6).unwrap(), 7);
    client.place((1, 2)).unwrap();
    assert_eq!(client.one(1 << 40).unwrap(), (1 << 40) + 1);
    assert_eq!(client.single((8,)).unwrap(), 9);
    drop(client);
    server.join().unwrap().unwrap();
}
