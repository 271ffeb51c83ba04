//! The `#[interface]` attribute of typed-ipc. Use it through the `typed-ipc` crate, as
//! `typed_ipc::interface`: the generated code names the runtime through `::typed_ipc`, or the
//! path a `crate = "..."` argument gives (`krate`).
//!
//! The attribute parses the trait into a small model (`parse` → `model`), rejecting the
//! shapes that cannot travel, and then writes the generated items from the model
//! (`generate`). `types` holds what is decided from a type's spelling.

mod generate;
mod krate;
mod model;
mod parse;
mod shape;
mod types;

#[cfg(test)]
mod golden;

use proc_macro2::TokenStream;
use quote::quote;

/// Turns a trait into a typed client stub, a server and a dispatcher.
///
/// ```ignore
/// use std::os::fd::OwnedFd;
/// use typed_ipc::{interface, Connection};
///
/// #[interface]
/// pub trait Ipa {
///     /// Reverses `text`.
///     fn reverse(&self, text: String) -> String;
///     fn total_len(&self, files: Vec<OwnedFd>) -> u64;
///     fn configure(&self, cfg: Config) -> Result<Caps, ConfigError>;
///     fn open_buffer(&self, id: u32) -> OwnedFd;
///     #[oneway]
///     fn stats_ready(&self, frame: u32, stats: OwnedFd);
/// }
///
/// let (a, b) = Connection::pair()?;
/// std::thread::spawn(move || IpaServer::new(MyIpa).serve(b));
/// let ipa = IpaClient::new(a);
/// assert_eq!(ipa.reverse("FooBar".into())?, "raBooF");
/// ```
///
/// # What it generates
///
/// Next to the trait, which is left as written and is what the server implements, with the
/// trait's visibility:
///
/// - `IpaClient`, cheap to clone:
///
///   | method | what it does |
///   | --- | --- |
///   | `new(Connection)` | a client over the connection |
///   | `with_timeout(&self, Duration) -> Self` | a copy whose calls give up after that long |
///   | `connection()` | the connection, to `close()` it, say |
///   | one per trait method, of its name | the call |
///
///   - **The calls** take the trait method's parameters (but for `OwnedFd`, any `AsFd`, and
///     `Vec<u8>`, borrowed bytes too: [Types](#types)), keep its doc comments and
///     `#[deprecated]`, and return `Result<R, typed_ipc::Error>` for a declared return type
///     `R`. A method declared `-> Result<Caps, ConfigError>` returns
///     `Result<Result<Caps, ConfigError>, Error>`: the outer error typed-ipc's, the inner the
///     method's own (`ipa.configure(cfg)??` where both convert into the caller's error). A
///     `#[oneway]` method returns `Ok(())` once the message is sent.
///   - **Timeouts.** A `with_timeout` copy's calls give up after that long with
///     `Error::TimedOut`, and its `#[oneway]` messages do if they cannot be sent by then
///     because the peer is not reading. By default, or with a timeout too long for the clock
///     (`Duration::MAX`), a call waits as long as the peer is alive. A call that times out
///     tells the peer, which drops it if it has not started it; a blocking method already
///     running runs on to its end, and with one serving thread later calls wait behind it.
///     The copy shares the connection and, like any clone, keeps its socket open until
///     dropped.
///   - **Reserved names.** A trait method cannot be named `new`, `with_timeout`, `connection`
///     or `clone` (whose stub would shadow `Clone::clone`): a compile error says so.
/// - `IpaServer<T: Ipa + Send + Sync + ?Sized + 'static>`: `new(T)`, `from_arc(Arc<T>)`
///   (an implementation the program keeps handles to, to read or change the state its calls
///   build; or an `Arc<dyn Ipa + Send + Sync>` chosen at run time, in the blocking flavour,
///   whose traits are object-safe), `serve(self, Connection)` (answers requests until the
///   peer hangs up; `Ok(())` on a clean close), `dispatch(&self, IpaRequest)`, and the
///   runtime's `Service` implementation. It holds the implementation in an `Arc`, so a clone
///   (cheap) answers with the same one, e.g. on each client of a listener in `service_with`.
/// - With `#[interface(async_server)]` on a trait of `fn`s (and typed-ipc's `tokio`
///   feature): `IpaAsyncServer<T>`, the same constructors, `serve(self, AsyncConnection)` (a
///   future), `max_running(n)` (at most `n` methods on the pool at once, across the
///   connections it and its clones serve), and the runtime's `AsyncService` implementation.
///   It runs each method on tokio's blocking pool, with `current_peer()` set there and a panic
///   turned into the caller's `Error::Panicked`; a cancelled call's method runs to its end.
/// - `IpaRequest` (a variant per method, holding its arguments; `command()`, `decode(call)`)
///   and `IpaResponse` (a variant per method that gets a reply, holding its return value;
///   `send(call)`).
/// - `IPA_INFO`: the interface's name, and each method's command id and signature, which both
///   ends compare: a client and a server built from different versions of the trait get
///   `Error::InterfaceMismatch` naming the method that differs (a `#[oneway]` added or
///   dropped is said, but not on which method: the peer does not say which of its methods
///   are oneway), never a garbage decode of a changed method; the call did not run, and a
///   oneway of a mismatched interface is dropped by the peer (see `#[oneway]`). The check is
///   of the interface as a whole: any difference, a method added at one end only too, fails
///   every call of it, those of unchanged methods too; a new version that must live beside
///   the old one takes a name of its own (below). The signature is the trait's text (names,
///   ids, the methods' order, types as spelled), not the definitions of the types it names:
///   a struct changed on one end only is not detected, and decodes as an error or, if its
///   encoding happens to fit, as wrong values. Rebuild both ends when a shared type changes,
///   version the type itself, or have the check cover the types with
///   `#[interface(check_types)]` (below).
/// - With `#[interface(async_client)]`, `IpaAsyncClient` too (below, "A client of the other
///   flavour"), and with `#[interface(async_server)]`, `IpaAsyncServer` (above).
/// - Every client and server is `Debug` (the interface's name; a server's implementation by
///   its type's name, so it need not be `Debug`): a `#[derive(Debug)]` struct can hold them.
/// - A `#[deprecated]` trait stays deprecated, and every client and server generated from it
///   is deprecated with the same note: a program that names them is warned, as one that
///   implements the trait is. The generated code's own uses warn nowhere. A `#[doc(hidden)]`
///   trait hides every item generated from it too.
///
/// # The interface's name
///
/// On the wire an interface is known by its name (a request carries the name's 32-bit FNV-1a
/// hash): by default the trait's name, so two traits called `Control` in two plugins are one
/// interface to a connection, and serving both on one connection would replace the first
/// with the second. Give each a name of its own:
///
/// ```ignore
/// #[interface(name = "org.example.camera.Control")]
/// pub trait Control { /* ... */ }
/// ```
///
/// The name is what both ends compare and what error messages and `TYPED_IPC_DEBUG` lines
/// show; the generated items are still named after the trait, so renaming the trait while
/// keeping the name keeps the wire. It takes up to 128 bytes, without spaces or control
/// characters. Both ends must use the same name, and a client of another name gets
/// `Error::NotServed` listing what the server serves.
///
/// # Through a facade, or under another name
///
/// The generated code names typed-ipc as `::typed_ipc`. A crate that reaches it otherwise (a
/// facade crate of yours re-exporting it, or a dependency renamed in `Cargo.toml`) gives the
/// path, as serde's `crate` attribute does; a derived `Shape` takes it too, and then knows
/// typed-ipc's `with` modules by that path:
///
/// ```ignore
/// #[camera_ipc::typed_ipc::interface(crate = "::camera_ipc::typed_ipc")]
/// pub trait Control { /* ... */ }
///
/// #[derive(Serialize, Deserialize, camera_ipc::typed_ipc::Shape)]
/// #[shape(crate = "::camera_ipc::typed_ipc")]
/// pub struct Frame {
///     #[serde(with = "::camera_ipc::typed_ipc::fd")]
///     pub buffer: OwnedFd,
/// }
/// ```
///
/// The path is the crate root of `typed-ipc` (what `typed_ipc` names in a crate that depends on
/// it), not of `ipc-runtime`. Only the generated code follows it: the wire is the same.
///
/// # The async flavour
///
/// A trait whose methods are all `async fn` gets an async client and server on tokio instead
/// (cargo feature `tokio` of `typed-ipc`; without it, such a trait is a compile error saying
/// so). Mixing `fn` and `async fn` in one trait is a compile error.
///
/// ```ignore
/// #[interface]
/// pub trait Ipa {
///     async fn reverse(&self, text: String) -> String;
///     #[oneway]
///     async fn stats_ready(&self, frame: u32, stats: OwnedFd);
/// }
///
/// impl Ipa for MyIpa {
///     async fn reverse(&self, text: String) -> String { text.chars().rev().collect() }
///     async fn stats_ready(&self, frame: u32, stats: OwnedFd) { /* ... */ }
/// }
///
/// let (a, b) = typed_ipc::tokio::AsyncConnection::pair()?;
/// tokio::spawn(IpaServer::new(MyIpa).serve(b));
/// let ipa = IpaClient::new(a);
/// assert_eq!(ipa.reverse("FooBar".into()).await?, "raBooF");
/// ```
///
/// - The trait is emitted with each `async fn m(&self, ..) -> R` as
///   `fn m(&self, ..) -> impl Future<Output = R> + Send`: implementations still write
///   `async fn`, and their futures must be `Send` (the server runs them on any runtime thread).
///   Default bodies are kept, their methods bounded `where Self: Sync` (the future holds
///   `&self`; the server serves only `Sync` implementations).
/// - `IpaClient` takes an `AsyncConnection`; its methods are `async fn`s with the same
///   parameters returning `Result<R, typed_ipc::Error>`. Dropping a call's future cancels the
///   call (the late reply is dropped, its fds closed). `with_timeout` needs tokio's time driver.
/// - `IpaServer<T: Ipa + Send + Sync + 'static>`: `new(T)`, `from_arc(Arc<T>)` and a cheap
///   `Clone` sharing the implementation, as in the blocking flavour (the trait is not
///   object-safe, so no `Arc<dyn Ipa>`), `serve(self, AsyncConnection)`
///   (starts serving at once and returns a `Send + 'static` future that resolves when the peer
///   has hung up and every handler has finished: spawn it or await it),
///   `async fn dispatch(&self, IpaRequest)`, and the runtime's `AsyncService` implementation.
///   Each call runs as a task of its own (at most `AsyncConnection::set_max_calls_at_once` at
///   a time, if set), once the oneway messages that arrived before it have run; oneway
///   messages run one at a time, in order.
/// - `IpaRequest`, `IpaResponse` and `IPA_INFO` are those of the blocking flavour (`decode`
///   takes an `AsyncCall`, and `send` is `async fn send(self, &mut AsyncCall)`), and the
///   interface signature does not include `async`: an async client talks to a blocking server
///   of the same trait and the other way round.
///
/// # A client of the other flavour
///
/// A server of one flavour with clients of the other (an async daemon with blocking clients,
/// a blocking worker driven by an async host) declares its trait once and asks for the other
/// client too, rather than declaring a second trait that must be kept identical by hand:
///
/// ```ignore
/// // An async daemon: `ThumbnailerServer` and `ThumbnailerClient` are async, and
/// // `ThumbnailerBlockingClient` is the blocking client of the same interface.
/// #[interface(name = "org.example.Thumbnailer", blocking_client)]
/// pub trait Thumbnailer {
///     async fn thumbnail(&self, image: OwnedFd, size: Size) -> Result<Thumb, ThumbError>;
/// }
///
/// // A blocking worker: `IpaServer` and `IpaClient` are blocking, and `IpaAsyncClient`
/// // (`async fn` stubs over an `AsyncConnection`) is the async host's client.
/// #[interface(async_client)]
/// pub trait Ipa {
///     fn reverse(&self, text: String) -> String;
/// }
/// ```
///
/// - `async_client`, on a trait of `fn`s, adds `IpaAsyncClient`: the async flavour's client,
///   as an `async fn` trait's `IpaClient` is. It needs typed-ipc's `tokio` feature; without
///   it, a compile error at `async_client` says so (the blocking items still compile).
/// - `blocking_client`, on a trait of `async fn`s, adds `IpaBlockingClient`: the blocking
///   flavour's client, as a `fn` trait's `IpaClient` is.
///
/// The added client calls the same `IPA_INFO`, so it talks to the trait's server (and any
/// server of the interface, of either flavour) and cannot drift from it. `async_client` on a
/// trait of `async fn`s, `blocking_client` on a trait of `fn`s, or both, are compile errors.
///
/// A server of the other flavour exists one way only: `async_server`, on a trait of `fn`s,
/// adds `IpaAsyncServer`, which serves an `AsyncConnection` with the blocking implementation,
/// each method on tokio's blocking pool (a hand-off per call; docs/guide/async.md,
/// "`async_server`", says what it keeps and costs). It needs the `tokio` feature as
/// `async_client` does, and is a compile error on a trait of `async fn`s, whose `IpaServer` is
/// async already. A blocking server of an async trait is not generated: it would need a
/// runtime to run each future on, which is what the async server is.
///
/// An interface crate shared by blocking workers and a tokio host need not pull tokio into
/// the workers: it asks for the async items under a feature of its own (`tokio =
/// ["typed-ipc/tokio"]` in its `[features]`). They do not change `IPA_INFO`, so both builds
/// talk to each other.
///
/// ```ignore
/// #[cfg_attr(feature = "tokio", interface(async_client, async_server))]
/// #[cfg_attr(not(feature = "tokio"), interface)]
/// pub trait Ipa {
///     fn reverse(&self, text: String) -> String;
/// }
/// ```
///
/// # Checking the types' definitions too
///
/// ```ignore
/// #[derive(Serialize, Deserialize, typed_ipc::Shape)]
/// pub struct Caps { pub max_width: u32, pub max_height: u32 }
///
/// #[interface(name = "org.example.camera.Ipa", check_types)]
/// pub trait Ipa {
///     fn configure(&self, cfg: Config) -> Caps;
/// }
/// ```
///
/// With `check_types`, the interface signature also covers each method's parameter and
/// return types' wire forms: their `typed_ipc::Shape`s, compile-time hashes of how bincode
/// writes them (field order, count and types; an enum's variants in order; not names).
/// `Caps` repacked at one end into `{ max_width: u16, max_height: u16, max_fps: u32 }`, the
/// same eight bytes, then fails every call of the interface with `Error::InterfaceMismatch`
/// (``"`configure`: same signature, but the definitions of its types differ"``) instead of
/// decoding wrong values. Renaming a field or a type, or adding a `#[serde(skip)]` field,
/// changes nothing. The signature is still a constant: a call does no more work.
///
/// - Every parameter and return type must implement `typed_ipc::Shape`: typed-ipc implements
///   it for the standard types serde carries and for its own (`OwnedFd`, `SealedBuffer`,
///   `SharedBytes`, ...); `#[derive(typed_ipc::Shape)]` writes it for your structs and enums
///   (fields with `#[serde(with = "typed_ipc::fd")]`, `"typed_ipc::fds"` or
///   `"typed_ipc::bytes"` included). A missing one is a compile error at the type.
/// - Both ends must ask for it: an end with `check_types` and one without have different
///   signatures, and the mismatch says that only one end checks.
/// - It sees what derives see: a type whose `Serialize` is written by hand implements
///   `Shape` by hand, and must describe what it writes honestly.
/// - The signature is a 32-bit hash: two different interfaces collide once in about 2^32.
///
/// (`check_types` rather than `shapes`: it says what the option does to the interface check,
/// to a reader of the trait who has not met `Shape`.)
///
/// # Method attributes
///
/// - `#[cmd(N)]` pins the method's command id to `N`; otherwise its id is its position in the
///   trait (0, 1, ...). Two methods with one id are a compile error. Pinned ids stay the same
///   when methods are inserted or removed (in `Error::InterfaceMismatch` messages, which
///   name methods by id, and for code that routes `IpaRequest`s itself; `TYPED_IPC_DEBUG`
///   lines name methods, not ids); the ends still compare the whole trait, so a client and a
///   server built from different versions of it get `Error::InterfaceMismatch` on every call,
///   as do two ends that declare the same methods with the same ids in another order.
/// - `#[oneway]`: the client sends and does not wait; the method must return `()`. Its
///   `Ok(())` says only that the message went out, handed to the socket: not that the peer
///   read it, let alone ran it. A peer that dies with it unread (one killed from outside
///   a moment before, whose exit this end has not seen yet) never runs it, and the sender
///   is not told. If the server does not run it (its
///   authorizer refuses it, its arguments do not decode, its interface differs at the two
///   ends) or it panics, the sender is not
///   told either; the server's stderr says so (the first 10 failed oneways of a process, all of
///   them under `TYPED_IPC_DEBUG=1`). Nothing waits for a oneway to run, so a sender can
///   outrun its server (one report per item parsed, say): the server's end holds up to
///   1,024 requests, then stops reading, but while it waits for a reply of its own (the call
///   the reports are about) it reads on and ends the connection at twice that, failing that
///   call with `Error::Malformed`. Bound what a method sends during a call: a report every
///   so often, or a window of them acknowledged by a call.
///
/// # Types
///
/// Parameters and return values are serde types, encoded with bincode, with these exceptions,
/// decided from how the type is spelled (its last path segment; an alias is not recognised):
///
/// - `OwnedFd`, `Option<OwnedFd>` and `Vec<OwnedFd>` travel in the message's fd table, and
///   so do they as the `Ok` of a `Result<_, E>` whose `E` is a serde type (a broker's
///   `fn open(&self, path: String) -> Result<OwnedFd, OpenError>`; `io::Result<OwnedFd>`
///   names no error type, and `io::Error` is not serde). A client stub takes an `OwnedFd`
///   parameter as any `impl AsFd`, sent from where it lies: an `OwnedFd` or `File` given is
///   closed once sent, one borrowed (`&file`, `fd.as_fd()`) stays the caller's, with no copy
///   of the fd made for the call (the peer gets its own fd for the same open file either
///   way). An `Option<OwnedFd>` or `Vec<OwnedFd>` parameter is taken as it is, and closed once
///   sent; a `File` or `UnixStream` goes in one with `.into()`. A parameter or return type spelled `File`, `UnixStream`, `BorrowedFd` or `RawFd` (alone
///   or under `std::`, `fs::`, `net::`, ...) is a compile error that says so, since only an
///   `OwnedFd` passes the fd itself (a `RawFd` would travel as a number, meaningless in the
///   other process; one spelled `i32` cannot be told apart).
///   An `OwnedFd` inside your own serde type needs `#[serde(with = "typed_ipc::fd")]` on the
///   field (`#[serde(with = "typed_ipc::fds")]` for an `Option<OwnedFd>` or `Vec<OwnedFd>`
///   field); an `OwnedFd` anywhere else in a parameter or return type is a compile error.
///   Nothing checks what an fd is: one from an untrusted peer may be a pipe or socket whose
///   reads never end, a FUSE file, or a sparse memfd whose size claims a terabyte. Check it
///   before you read it (`fstat`: a regular file, of at most the size you expect) and read
///   into a buffer of the size you expect, never of the size the file says (the demo's
///   `read_stats`); or take a `SealedBuffer`, which its receiver's
///   `Limits::max_shared_len` bounds and whose seals keep its sender from changing it.
/// - `Vec<u8>` travels as one byte string rather than byte by byte. A client stub takes a
///   `Vec<u8>` parameter as `impl Into<CallBytes<'bytes>>`: the `Vec` itself (its allocation
///   is kept for the reply, unless the connection pipes it: a large one, to a peer it lends
///   its pages to), `SharedBytes` the caller goes on sharing (sent as they are anywhere), or
///   borrowed bytes (`&[u8]`, `&Vec<u8>`, `&[u8; N]`, `&mut` ones: `ipa.echo(&frame[..n])`),
///   sent from where they lie without a `Vec` built for the call, and read only while the
///   message is encoded. The server's method gets its own
///   `Vec<u8>` either way. An argument that took its type from the parameter must now name
///   it: `ipa.echo(iter.collect())`, `ipa.echo(text.into())` or
///   `ipa.echo(Default::default())` is "type annotations needed" (E0283), where
///   `collect::<Vec<u8>>()`, `text.into_bytes()` or `Vec::new()` compiles. `Option<Vec<u8>>`
///   and `Result<Vec<u8>, E>` parameters are taken as written.
/// - typed-ipc's writable shared memory stays with the process that made it: a parameter or
///   return type spelled `SharedBuffer` or `SharedRegion` (alone or under typed-ipc's paths)
///   is a compile error that names the read-only form to send, a `SealedBuffer`
///   (`buffer.seal()?`) or a `RegionView` (`region.view()?`).
///
/// A parameter or return type that is not serde is reported at the type, as the bound the
/// generated code spells out: for a parameter, `where T: Serialize` on the client's stub,
/// `where T: DeserializeOwned` on the server (both ends of the interface are usually compiled
/// together); for a return type, `where T: Serialize` on the server (the client's stub
/// decodes it as that type, `DeserializeOwned`). A type named `T` is reported where the
/// arguments are decoded or the reply is sent instead, since in the server's items `T` is the
/// server's type parameter.
///
/// # Not supported (compile errors that say what to write instead)
///
/// Generic traits and methods, lifetime parameters, `impl Trait`, receivers other than `&self`,
/// a method `where Self:` bound other than `Sized`, `Send`, `Sync` or `'static` (the server
/// calls every method on any implementation: bound the trait instead),
/// methods without a receiver, more than 16 parameters after `&self` (they travel as one
/// tuple: group some into a struct), borrowed parameters and return values (`&str`, `&[u8]`,
/// `&T`: take or return `String`, `Vec<u8>`, `T`; each end gets its own copy either way),
/// `Self` in a parameter or return type, `-> !` (a method that never returns has no reply:
/// declare it without a return type), parameters that are patterns rather than names,
/// `unsafe fn`, traits that mix `fn` and `async fn`, and `#[cfg]` on a method or a parameter
/// (or a `#[cfg_attr]` that could add a `#[cfg]`, `#[oneway]` or `#[cmd]`; one that adds
/// anything else, such as docs or lint levels, `#[cfg_attr(docsrs, doc(cfg(..)))]`, is fine,
/// though docs added that way stay on the trait and do not reach the client's methods):
/// both ends must agree on
/// every command id and on the interface signature, so put the `#[cfg]` on the whole trait,
/// above `#[interface]`, or give the methods that differ an interface of their own.
#[proc_macro_attribute]
pub fn interface(
    attr: proc_macro::TokenStream,
    item: proc_macro::TokenStream,
) -> proc_macro::TokenStream {
    expand(attr.into(), item.into()).into()
}

/// Derives `typed_ipc::Shape`: the type's bincode wire form as a compile-time hash, which
/// `#[interface(check_types)]` compares between the two ends of an interface.
///
/// ```ignore
/// #[derive(Serialize, Deserialize, typed_ipc::Shape)]
/// pub struct Frame {
///     pub number: u32,
///     #[serde(with = "typed_ipc::fd")]
///     pub buffer: OwnedFd,
///     #[serde(skip)] // not on the wire, not in the shape
///     pub received: Option<Instant>,
/// }
///
/// #[derive(Serialize, Deserialize, typed_ipc::Shape)]
/// pub enum Mode { Off, Fixed(u32), Auto { min: u32, max: u32 } }
/// ```
///
/// The shape is of the fields in order (each by its type's `Shape`) and, for an enum, of the
/// variants in order; names do not count, as bincode writes none. Type parameters are bound
/// `T: Shape`.
///
/// serde attributes: `rename`, `alias`, `default`, `bound` and the like change nothing;
/// `skip`, `skip_serializing` and `skip_deserializing` leave the field out; `transparent` is
/// the shape of the one field; `with = "typed_ipc::fd"`, `"typed_ipc::fds"` and
/// `"typed_ipc::bytes"` are typed-ipc's own (named through the path of the type's
/// `#[shape(crate = "...")]` too, for a crate that reaches typed-ipc through a facade: see
/// `#[interface]`'s "Through a facade"). The others change the wire form in ways the
/// derive cannot see (`with`, `serialize_with`, `deserialize_with`, `flatten`,
/// `skip_serializing_if`, `tag`, `content`, `untagged`, `into`, `from`, `try_from`, `remote`,
/// a skipped variant, ...) and are compile errors at the attribute. A field whose `with`
/// writes the form of a type that has a shape says which, and may then use `with`,
/// `serialize_with` and `deserialize_with` (a field of another crate's type, which cannot
/// implement `Shape` here):
///
/// ```ignore
/// #[derive(Serialize, Deserialize, typed_ipc::Shape)]
/// pub struct Job {
///     #[serde(with = "uuid_as_bytes")] // writes the 16 bytes as a `[u8; 16]`
///     #[shape(same_as = "[u8; 16]")]
///     pub id: uuid::Uuid,
/// }
/// ```
///
/// Otherwise implement `Shape` by hand, from what is written, in order:
///
/// ```ignore
/// impl typed_ipc::Shape for Stamp {
///     const SHAPE: u64 = typed_ipc::shape::product(&[u64::SHAPE, String::SHAPE]);
/// }
/// ```
///
/// A type that names itself (`struct Tree { kids: Vec<Tree> }`, or `Self`) gets a fixed
/// marker where it does, so directly recursive types work. Types that name each other
/// (`A` holds a `B`, `B` an `A`) are a cycle rustc reports ("cycle detected when
/// const-evaluating"): implement `Shape` by hand for one of them, spelling out the other's
/// fields with `typed_ipc::shape::RECURSION` where the other names the first.
#[proc_macro_derive(Shape, attributes(shape))]
pub fn derive_shape(input: proc_macro::TokenStream) -> proc_macro::TokenStream {
    shape::derive(input.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// The whole expansion, on `proc_macro2` types so that tests can run it.
fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    match parse::interface(attr, item) {
        Ok(iface) => generate::Generator::new(&iface).expand(),
        // The item is still emitted (minus our attributes), so that code using the trait
        // does not add errors of its own to the one that matters.
        Err(parse::Rejected { item, error }) => {
            let error = error.to_compile_error();
            quote!(#item #error)
        }
    }
}
