//! What `#[interface]` knows about a trait once it is parsed: everything the generator needs,
//! so that it never looks at the syntax tree again.

use proc_macro2::{Ident, Span};
use syn::{Attribute, ItemTrait, Type, Visibility};

/// A trait marked `#[interface]`.
pub struct Interface {
    /// The trait as written, minus our helper attributes (`#[cmd]`, `#[oneway]`): the server
    /// trait users implement. Emitted unchanged in the blocking flavour; in the async flavour
    /// each `async fn` becomes a `fn` returning a `Send` future (see [`Flavour::Async`]).
    pub item: ItemTrait,
    /// Blocking (`fn`) or async (`async fn`): every method of a trait is one or the other.
    pub flavour: Flavour,
    /// The trait's name; the generated items are named after it.
    pub name: Ident,
    /// The interface's name on the wire, which both ends compare (its hash is the
    /// interface's id): `#[interface(name = "...")]`, or else the trait's name.
    pub wire_name: String,
    /// `#[interface(async_client)]` on a blocking trait or `#[interface(blocking_client)]` on
    /// an async one: also a client of the other flavour, `<Trait>AsyncClient` or
    /// `<Trait>BlockingClient` (same wire, same interface). The argument's span, where an
    /// error about it (a missing `tokio` feature) points.
    pub other_client: Option<Span>,
    /// `#[interface(async_server)]` on a blocking trait: also `<Trait>AsyncServer`, serving an
    /// `AsyncConnection` with the blocking implementation, each call on tokio's blocking pool.
    /// The argument's span, where an error about it (a missing `tokio` feature) points.
    pub async_server: Option<Span>,
    /// `#[interface(check_types)]`: the methods' type shapes (`typed_ipc::Shape`) are folded
    /// into the signature, and each method's is recorded in its `MethodInfo`.
    pub check_types: bool,
    /// `#[interface(crate = "...")]`: the path the generated code names typed-ipc by, if not
    /// `::typed_ipc` (see [`crate::krate`]).
    pub krate: Option<syn::Path>,
    /// The trait's own `#[deprecated]`, kept on it and carried onto the generated clients and
    /// servers: those are what a program names to use the interface.
    pub deprecated: Vec<Attribute>,
    /// The trait is `#[doc(hidden)]`: so is every item generated from it, whose docs link to
    /// the trait.
    pub hidden: bool,
    /// The trait's visibility, given to every generated item.
    pub vis: Visibility,
    /// The methods, in declaration order.
    pub methods: Vec<Method>,
}

/// Which client and server an interface gets. The wire format, the request and response
/// enums and the interface signature are the same for both: a client of one flavour talks to a
/// server of the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// Every method is a `fn`: the client waits for the reply on its thread; the server runs
    /// on `Connection`.
    Blocking,
    /// Every method is an `async fn`: `async fn` client stubs over `AsyncConnection`, and a
    /// server on tokio. The trait's `async fn m(&self, ..) -> R` is emitted as
    /// `fn m(&self, ..) -> impl Future<Output = R> + Send`, so that implementations can still
    /// write `async fn` and the server can run their futures on any runtime thread.
    Async,
}

/// One method of an [`Interface`]: one command on the wire.
pub struct Method {
    /// The method's name, also the client stub's.
    pub name: Ident,
    /// The request and response variant: the name in UpperCamelCase.
    pub variant: Ident,
    /// The command id: `#[cmd(N)]`, or the position in the trait.
    pub cmd: u32,
    /// The parameters after `&self`.
    pub args: Vec<Arg>,
    /// The declared return type; `None` for `()`.
    pub ret: Option<Value>,
    /// Whether the method is `#[oneway]`: sent without waiting for a reply.
    pub oneway: bool,
    /// Whether the method asks `where Self: Sized`: then the server cannot call it on an
    /// unsized implementation (`dyn Trait`), and serves only sized ones.
    pub needs_sized: bool,
    /// The doc comments, carried onto the client stub.
    pub docs: Vec<Attribute>,
    /// `#[deprecated]`, carried onto the client stub: a call through the client is where a
    /// deprecated method is used.
    pub deprecated: Vec<Attribute>,
    /// The signature as written with whitespace normalised, e.g.
    /// `fn reverse(&self, text: String) -> String`: what both ends compare.
    pub signature: String,
}

/// A parameter after `&self`.
pub struct Arg {
    /// Its name, also the request variant's field.
    pub name: Ident,
    /// Its type, and how that type travels.
    pub value: Value,
}

/// A parameter or return type, and how it travels.
pub struct Value {
    /// The type as written: it is resolved in the user's scope.
    pub ty: Type,
    /// How the codec is told to carry it.
    pub wire: Wire,
    /// The `E` of a `Result<T, E>` whose `T` the codec carries (fds, a byte string): it
    /// travels inside the carrier as a plain serde value, and the carrier asks it to be both
    /// `Serialize` and `DeserializeOwned` whichever way it goes. `None` for every other type.
    pub carried_error: Option<Type>,
}

/// How a value travels, decided from the type's spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// Plain serde: the bincode encoding of the value.
    Serde,
    /// `OwnedFd`, `Option<OwnedFd>` or `Vec<OwnedFd>`: in the message's fd table, wrapped in
    /// the codec's `Fd`.
    Fd,
    /// `Vec<u8>`: one byte string, wrapped in the codec's `Bytes` (serde's default goes byte
    /// by byte).
    Bytes,
    /// `Option<Vec<u8>>` or `Result<Vec<u8>, E>`: the `Some` or `Ok` bytes as one byte
    /// string, wrapped in the codec's `CarriedBytes`.
    CarriedBytes,
}

impl Interface {
    /// The text both ends hash into `InterfaceInfo::signature`: one entry per method with its
    /// id, whether it is oneway, and its signature, in declaration order.
    pub fn canonical_signature(&self) -> String {
        let entries: Vec<String> = self
            .methods
            .iter()
            .map(|m| {
                let oneway = if m.oneway { "#[oneway] " } else { "" };
                format!("#[cmd({})] {oneway}{};", m.cmd, m.signature)
            })
            .collect();
        entries.join(" ")
    }
}
