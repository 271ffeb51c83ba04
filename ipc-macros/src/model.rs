//! What `#[interface]` knows about a trait once it is parsed: everything the generator needs,
//! so that it never looks at the syntax tree again.

use proc_macro2::Ident;
use syn::{Attribute, ItemTrait, Type, Visibility};

/// A trait marked `#[interface]`.
pub struct Interface {
    /// The trait as written, minus our helper attributes (`#[cmd]`, `#[oneway]`): emitted
    /// unchanged, since it is the server trait users implement.
    pub item: ItemTrait,
    /// The trait's name; the generated items are named after it.
    pub name: Ident,
    /// The trait's visibility, given to every generated item.
    pub vis: Visibility,
    /// The methods, in declaration order.
    pub methods: Vec<Method>,
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
    /// The doc comments, carried onto the client stub.
    pub docs: Vec<Attribute>,
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
