//! Parameter and return types: how each travels, which ones cannot, and how a type is spelled
//! in a signature.
//!
//! Everything here reads the type as written. A macro cannot resolve names, so an alias of
//! `OwnedFd` or `Vec<u8>` is not recognised as one: it travels as a plain serde value (and an
//! `OwnedFd` behind an alias fails to compile, because `OwnedFd` is not `Serialize`). An
//! `OwnedFd` written inside an alias (`io::Result<OwnedFd>`) is rejected with a message that
//! says the alias is not seen through, and what to spell out.

use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::punctuated::Punctuated;
use syn::visit::{self, Visit};
use syn::{
    GenericArgument, Lifetime, Path, PathArguments, Token, Type, TypeImplTrait, TypeNever,
    TypeParamBound, TypeReference,
};

use crate::model::Wire;

/// Where a type appears, for error messages.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A parameter after `&self`.
    Param,
    /// The return type.
    Return,
}

/// How a value of type `ty` travels.
pub fn wire(ty: &Type) -> Wire {
    if is_fd_form(ty) || ok_arg(ty).is_some_and(is_fd_form) {
        Wire::Fd
    } else if is_byte_vec(ty) {
        Wire::Bytes
    } else if single_arg(ty, "Option")
        .or_else(|| ok_arg(ty))
        .is_some_and(is_byte_vec)
    {
        Wire::CarriedBytes
    } else {
        Wire::Serde
    }
}

/// The `E` of a `Result<T, E>` that travels as `wire` with its `T` carried by the codec (fds,
/// or a byte string): the one plain serde value inside a carrier.
pub fn carried_error(ty: &Type, wire: Wire) -> Option<&Type> {
    match wire {
        Wire::Fd | Wire::CarriedBytes => err_arg(ty),
        Wire::Serde | Wire::Bytes => None,
    }
}

/// `Vec<u8>`, as written.
fn is_byte_vec(ty: &Type) -> bool {
    single_arg(ty, "Vec").is_some_and(|inner| is_plain(inner, "u8"))
}

/// `OwnedFd`, `Option<OwnedFd>` or `Vec<OwnedFd>`: the shapes of fds the codec carries.
fn is_fd_form(ty: &Type) -> bool {
    is_fd(ty)
        || single_arg(ty, "Option")
            .or_else(|| single_arg(ty, "Vec"))
            .is_some_and(is_fd)
}

/// Rejects a type that cannot travel, at its span, saying what to write instead.
pub fn check(ty: &Type, role: Role, wire: Wire) -> syn::Result<()> {
    let mut checker = Checker {
        role,
        error: None,
        fds: 0,
    };
    checker.visit_type(ty);
    if let Some(error) = checker.error {
        return Err(error);
    }
    // The fd forms are a whole type (or a `Result`'s `Ok`): an `OwnedFd` anywhere else has
    // no way onto the wire. Each form names `OwnedFd` once.
    let misplaced = match wire {
        Wire::Fd => checker.fds > 1,
        _ => checker.fds > 0,
    };
    if misplaced {
        let forms = "an `OwnedFd` travels only as the whole type `OwnedFd`, `Option<OwnedFd>` \
                     or `Vec<OwnedFd>`, or as the `Ok` of a `Result<_, E>`";
        let message = match unrecognised_generic(ty) {
            Some(Unrecognised::ResultAlias(message)) => message,
            Some(Unrecognised::Other(name)) => format!(
                "{forms}, and `{name}<..>` is none of these: `#[interface]` sees only the \
                 type's tokens, not what an alias stands for, so if `{name}` is an alias of \
                 one of them, spell that out; inside your own serde type, mark the field \
                 `#[serde(with = \"typed_ipc::fd\")]`"
            ),
            None => format!(
                "{forms}; inside your own serde type, mark the field \
                 `#[serde(with = \"typed_ipc::fd\")]`"
            ),
        };
        return Err(syn::Error::new_spanned(ty, message));
    }
    Ok(())
}

/// A generic type holding an `OwnedFd` that is not one of the forms the codec carries, as
/// [`unrecognised_generic`] names it.
enum Unrecognised {
    /// `io::Result<OwnedFd>`: a `Result` with one argument, an alias the user most likely
    /// meant as a `Result<OwnedFd, E>`. The whole message.
    ResultAlias(String),
    /// Any other generic type (`Box<OwnedFd>`, an alias of one's own): its name.
    Other(String),
}

/// The generic type around a misplaced `OwnedFd` in `ty` (or in the `Ok` of a `Result<T, E>`)
/// that is not `Option`, `Vec` or `Result<T, E>`: most likely an alias of one of these,
/// which a macro, seeing tokens only, cannot recognise.
fn unrecognised_generic(ty: &Type) -> Option<Unrecognised> {
    let ty = ok_arg(ty).unwrap_or(ty);
    let Type::Path(p) = peel(ty) else { return None };
    let last = p.path.segments.last().filter(|_| p.qself.is_none())?;
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let name = last.ident.to_string();
    match (&*name, &args.args.iter().collect::<Vec<_>>()[..]) {
        ("Result", [GenericArgument::Type(ok)]) => {
            let (spelled, ok) = (spell(ty.to_token_stream()), spell(ok.to_token_stream()));
            let io = p.path.segments.iter().any(|s| s.ident == "io");
            let io_error = match io {
                true => " (`std::io::Error` is not: map it to an error type of your own)",
                false => "",
            };
            Some(Unrecognised::ResultAlias(format!(
                "`{spelled}` looks like a type alias of `Result` (it has one argument), and \
                 `#[interface]` does not recognise aliases: it sees only the type's tokens, \
                 not what an alias stands for, so the `OwnedFd` would have no way onto the \
                 wire; spell it out as `Result<{ok}, E>`, with `E` a serde type{io_error}"
            )))
        }
        ("Option" | "Vec" | "Result", _) => None,
        _ => Some(Unrecognised::Other(name)),
    }
}

/// Finds the first part of a type that cannot travel.
struct Checker {
    role: Role,
    error: Option<syn::Error>,
    /// How many `OwnedFd` path segments the type names.
    fds: usize,
}

impl Checker {
    fn fail(&mut self, tokens: &dyn ToTokens, message: String) {
        self.error
            .get_or_insert_with(|| syn::Error::new_spanned(tokens, message));
    }

    fn borrowed(&self) -> &'static str {
        match self.role {
            Role::Param => {
                "borrowed parameters are not supported: the server receives its own copy"
            }
            Role::Return => {
                "a borrowed return value is not supported: the client receives its own copy"
            }
        }
    }

    /// What to write instead: `take` a parameter type, `return` a return type.
    fn verb(&self) -> &'static str {
        match self.role {
            Role::Param => "take",
            Role::Return => "return",
        }
    }

    /// The error for an fd wrapper or a raw fd number spelled `name` (see [`fd_spelling`]).
    fn not_an_owned_fd(&mut self, p: &Path, name: &str) {
        let verb = self.verb();
        let mut message = match name {
            "RawFd" => format!(
                "a `RawFd` is only a number, meaningless in another process: {verb} `OwnedFd` \
                 instead, so that the fd itself is passed"
            ),
            "BorrowedFd" => format!(
                "a `BorrowedFd` cannot travel, it borrows an fd of this process: {verb} \
                 `OwnedFd` instead, so that the fd itself is passed"
            ),
            other => format!(
                "a `{other}` cannot travel as a value, only as a file descriptor: {verb} \
                 `OwnedFd` instead, which passes the fd itself"
            ),
        };
        message.push_str(" (`Option<OwnedFd>` and `Vec<OwnedFd>` travel too)");
        message.push_str(&match (name, self.role) {
            // The client stub of an `OwnedFd` parameter takes any `AsFd`.
            ("RawFd", Role::Param) => {
                "; the client stub then takes any `AsFd` (`BorrowedFd::borrow_raw` makes one)"
                    .to_string()
            }
            ("BorrowedFd", Role::Param) => {
                "; the client stub then takes any `AsFd`, your `BorrowedFd` included".to_string()
            }
            (_, Role::Param) => format!(
                "; the client stub then takes any `AsFd`: a `{name}`, or `&{name}` to keep it"
            ),
            ("BorrowedFd", Role::Return) => "; `fd.try_clone_to_owned()?` makes one".to_string(),
            (_, Role::Return) => "; the client converts it back with `.into()`".to_string(),
        });
        if p.segments.len() == 1 && matches!(name, "File" | "UnixStream") {
            message.push_str(&format!(
                ". If `{name}` is a serde type of your own, name it by its path (`crate::{name}`)"
            ));
        }
        self.fail(p, message);
    }
}

/// Whether `p` names one of the standard library's (or tokio's) fd wrappers or `RawFd`, by its
/// last segment: `File`, `UnixStream`, `BorrowedFd` or `RawFd`, written alone or under a path
/// that says where it comes from (`std::fs::File`, `fs::File`, `tokio::net::UnixStream`,
/// `std::os::fd::RawFd`). A type of your own with one of these names is left alone when its
/// path says it is yours (`crate::model::File`). Returns the name.
fn fd_spelling(p: &Path) -> Option<&'static str> {
    let last = p.segments.last()?;
    let name = ["File", "UnixStream", "BorrowedFd", "RawFd"]
        .into_iter()
        .find(|name| last.ident == name)?;
    let standard = match p.segments.len() {
        1 => true,
        n => {
            let (first, parent) = (&p.segments[0].ident, &p.segments[n - 2].ident);
            ["std", "core", "tokio"].iter().any(|c| first == c)
                || ["fs", "net", "fd", "io", "unix"]
                    .iter()
                    .any(|m| parent == m)
        }
    };
    standard.then_some(name)
}

/// Whether `p` names typed-ipc's writable shared memory, `SharedBuffer` or `SharedRegion`,
/// which only the process that made it may hold: written alone, or under a path that says
/// it is typed-ipc's (`typed_ipc::SharedBuffer`, `shared_region::SharedRegion`). A type of
/// your own of that name is left alone when its path says it is yours. Returns the name.
fn writable_memory(p: &Path) -> Option<&'static str> {
    let last = p.segments.last()?;
    let name = ["SharedBuffer", "SharedRegion"]
        .into_iter()
        .find(|name| last.ident == name)?;
    let ours = ["typed_ipc", "ipc_runtime", "shared_buffer", "shared_region"];
    let typed_ipc =
        p.segments.len() == 1 || p.segments.iter().any(|s| ours.iter().any(|o| s.ident == o));
    typed_ipc.then_some(name)
}

impl<'ast> Visit<'ast> for Checker {
    fn visit_type_reference(&mut self, r: &'ast TypeReference) {
        let (borrowed, verb) = (self.borrowed(), self.verb());
        let message = match borrowed_fd(&r.elem) {
            // `&File`, `&BorrowedFd`, `&impl AsFd`: the owned form that travels is an fd.
            Some(spelled) => {
                // A `RawFd` is a number: `as_fd` is not one of its methods.
                let why = match (is_plain(&r.elem, "RawFd"), self.role) {
                    (true, _) => {
                        "a `RawFd` is only a number, meaningless in another process".into()
                    }
                    // The client stub of an `OwnedFd` parameter takes any `AsFd`, borrowed.
                    (false, Role::Param) => format!(
                        "`{spelled}` cannot travel as a value; the client stub then takes any \
                         `AsFd`, a `&{spelled}` included, and the caller keeps its fd"
                    ),
                    (false, Role::Return) => format!(
                        "`{spelled}` cannot travel as a value; \
                         `.as_fd().try_clone_to_owned()?` makes one"
                    ),
                };
                format!("{borrowed}; {verb} `OwnedFd` instead, which passes the fd itself ({why})")
            }
            // `&dyn Trait`, `&impl Trait`: no owned form of these names one type.
            None if matches!(peel(&r.elem), Type::TraitObject(_) | Type::ImplTrait(_)) => {
                format!(
                    "{borrowed}; {verb} a concrete serde type instead: client and server are \
                     compiled apart and must agree on one type, which `{}` does not name",
                    spell(r.elem.to_token_stream())
                )
            }
            None => format!("{borrowed}; {verb} `{}` instead", owned_form(&r.elem)),
        };
        self.fail(r, message);
        // Not walking further: one message per type is enough.
    }

    fn visit_type_never(&mut self, never: &'ast TypeNever) {
        let message = match self.role {
            Role::Return => {
                "`!` cannot be a reply: a method that never returns has none to send; declare \
                 it without a return type (with `#[oneway]` if the caller should not wait: a \
                 call whose server process exits fails with `Error::Disconnected`)"
            }
            Role::Param => "`!` cannot be a parameter: no value of it exists to send",
        };
        self.fail(never, message.into());
    }

    fn visit_lifetime(&mut self, l: &'ast Lifetime) {
        if l.ident != "static" {
            let message = format!("{}; use an owned type (or `'static`)", self.borrowed());
            self.fail(l, message);
        }
    }

    fn visit_type_impl_trait(&mut self, t: &'ast TypeImplTrait) {
        let message = "`impl Trait` is not supported in an interface: client and server are \
                       compiled apart and must agree on one concrete type; name it \
                       (e.g. `Vec<T>` rather than `impl Iterator<Item = T>`)";
        self.fail(t, message.into());
    }

    fn visit_path(&mut self, p: &'ast Path) {
        if p.segments.first().is_some_and(|s| s.ident == "Self") {
            let message = "`Self` cannot travel: the client does not know the implementing \
                           type; name a concrete type";
            self.fail(p, message.into());
        }
        if let Some(name) = fd_spelling(p) {
            self.not_an_owned_fd(p, name);
        }
        if let Some(writable) = writable_memory(p) {
            let verb = self.verb();
            let message = match writable {
                "SharedBuffer" => format!(
                    "a `SharedBuffer` is this process's writable buffer and cannot travel: \
                     {verb} a `SealedBuffer` instead, which `buffer.seal()?` makes of it"
                ),
                _ => format!(
                    "a `SharedRegion` is its creator's writable mapping and cannot travel: \
                     {verb} a `RegionView` instead, which `region.view()?` makes of it"
                ),
            };
            self.fail(p, message);
        }
        if let Some(borrowed) = elided_cow(p) {
            // `Cow<str>` is `Cow<'_, str>`: without this, rustc asks for a lifetime on the
            // generated items, which have none to give.
            let message = format!(
                "{} (a `Cow` without a lifetime borrows); {} `{}` instead",
                self.borrowed(),
                self.verb(),
                owned_form(borrowed)
            );
            self.fail(p, message);
        }
        self.fds += p.segments.iter().filter(|s| s.ident == "OwnedFd").count();
        visit::visit_path(self, p);
    }
}

/// If `ty` is an `impl Future<..>` (by any path ending in `Future`), its `Output`:
/// `Some(None)` when the bound does not say.
pub fn future_output(ty: &Type) -> Option<Option<&Type>> {
    let Type::ImplTrait(t) = peel(ty) else {
        return None;
    };
    t.bounds.iter().find_map(|bound| {
        let syn::TypeParamBound::Trait(bound) = bound else {
            return None;
        };
        let last = bound.path.segments.last().filter(|s| s.ident == "Future")?;
        let PathArguments::AngleBracketed(args) = &last.arguments else {
            return Some(None);
        };
        Some(args.args.iter().find_map(|arg| match arg {
            GenericArgument::AssocType(a) if a.ident == "Output" => Some(&a.ty),
            _ => None,
        }))
    })
}

/// The `B` of a `Cow<B>` written without its lifetime (elided, so borrowed): `Cow<str>`, but
/// not `Cow<'static, str>`.
fn elided_cow(p: &Path) -> Option<&Type> {
    let last = p.segments.last().filter(|s| s.ident == "Cow")?;
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match &args.args.iter().collect::<Vec<_>>()[..] {
        [GenericArgument::Type(borrowed)] => Some(borrowed),
        _ => None,
    }
}

/// If a borrowed `&elem` is of an fd (`File`, `UnixStream`, `BorrowedFd`, `RawFd`, or a
/// `dyn`/`impl` `AsFd` or `AsRawFd`), `elem` as spelled: the owned form to suggest is then
/// `OwnedFd`, which passes the fd itself.
fn borrowed_fd(elem: &Type) -> Option<String> {
    let fd_trait = |bounds: &Punctuated<TypeParamBound, Token![+]>| {
        bounds.iter().any(|bound| match bound {
            TypeParamBound::Trait(t) => t
                .path
                .segments
                .last()
                .is_some_and(|s| s.ident == "AsFd" || s.ident == "AsRawFd"),
            _ => false,
        })
    };
    let fd = match peel(elem) {
        Type::Path(p) if p.qself.is_none() => fd_spelling(&p.path).is_some(),
        Type::TraitObject(t) => fd_trait(&t.bounds),
        Type::ImplTrait(t) => fd_trait(&t.bounds),
        _ => false,
    };
    fd.then(|| spell(elem.to_token_stream()))
}

/// The owned type to suggest for a borrowed `&elem`.
fn owned_form(elem: &Type) -> String {
    let elem = peel(elem);
    if is_plain(elem, "str") {
        return "String".into();
    }
    if is_plain(elem, "Path") {
        return "PathBuf".into();
    }
    if is_plain(elem, "OsStr") {
        return "OsString".into();
    }
    if is_plain(elem, "CStr") {
        return "CString".into();
    }
    if let Type::Slice(slice) = elem {
        return format!("Vec<{}>", spell(slice.elem.to_token_stream()));
    }
    spell(elem.to_token_stream())
}

/// `ty` without the parentheses and invisible groups (from `macro_rules!`) around it.
fn peel(ty: &Type) -> &Type {
    match ty {
        Type::Group(g) => peel(&g.elem),
        Type::Paren(p) => peel(&p.elem),
        other => other,
    }
}

/// Whether `ty` is a path ending in `name`, without generic arguments.
fn is_plain(ty: &Type, name: &str) -> bool {
    match peel(ty) {
        Type::Path(p) if p.qself.is_none() => p
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == name && s.arguments.is_none()),
        _ => false,
    }
}

/// Whether `ty` is a bare `OwnedFd` (not in an `Option`, `Vec` or `Result`).
pub(crate) fn is_fd(ty: &Type) -> bool {
    is_plain(ty, "OwnedFd")
}

/// The `T` of a `Result<T, E>` (any path ending in `Result`, with both arguments written).
fn ok_arg(ty: &Type) -> Option<&Type> {
    match generic_args(ty, "Result")?[..] {
        [GenericArgument::Type(ok), GenericArgument::Type(_)] => Some(ok),
        _ => None,
    }
}

/// The `E` of a `Result<T, E>`, as [`ok_arg`] finds its `T`.
fn err_arg(ty: &Type) -> Option<&Type> {
    match generic_args(ty, "Result")?[..] {
        [GenericArgument::Type(_), GenericArgument::Type(err)] => Some(err),
        _ => None,
    }
}

/// The `T` of a `name<T>` (any path ending in `name`).
fn single_arg<'a>(ty: &'a Type, name: &str) -> Option<&'a Type> {
    match generic_args(ty, name)?[..] {
        [GenericArgument::Type(inner)] => Some(inner),
        _ => None,
    }
}

/// The arguments of a `name<..>` (any path ending in `name`).
fn generic_args<'a>(ty: &'a Type, name: &str) -> Option<Vec<&'a GenericArgument>> {
    let Type::Path(p) = peel(ty) else { return None };
    let last = p
        .path
        .segments
        .last()
        .filter(|s| p.qself.is_none() && s.ident == name)?;
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    Some(args.args.iter().collect())
}

/// Spells tokens the way rustfmt writes a signature (`Result<Vec<u8>, E>`, `&'a str`,
/// `fn(u8) -> u8`), so that a signature's text does not depend on how it was spaced.
pub fn spell(tokens: TokenStream) -> String {
    let mut speller = Speller::default();
    speller.tokens(tokens);
    speller.out
}

/// [`spell`], with each identifier by its name (`r#gen` as `gen`, which a crate of edition
/// 2024 must spell raw and one of 2021 need not): what an interface signature compares.
pub fn spell_names(tokens: TokenStream) -> String {
    let mut speller = Speller {
        names: true,
        ..Speller::default()
    };
    speller.tokens(tokens);
    speller.out
}

#[derive(Default)]
struct Speller {
    /// Identifiers are written by name, without `r#`.
    names: bool,
    out: String,
    /// The last token was an identifier or literal: another one needs a space before it.
    after_word: bool,
    /// The next token gets a space before it (after `,`, `;`, `:`, `->`, ...).
    space: bool,
    /// The last identifier or literal.
    word: String,
    /// The last token was a `Joint` punctuation character (the first of `::`, `->`, `>>`).
    joint: Option<char>,
}

impl Speller {
    fn push(&mut self, text: &str, word: bool) {
        if self.space || (word && self.after_word) {
            self.out.push(' ');
        }
        self.out.push_str(text);
        self.space = false;
        self.after_word = word;
    }

    fn tokens(&mut self, tokens: TokenStream) {
        for token in tokens {
            let joint = self.joint.take();
            match token {
                TokenTree::Ident(ident) if self.names => {
                    self.word = ident.unraw().to_string();
                    self.push(&self.word.clone(), true);
                }
                TokenTree::Ident(_) | TokenTree::Literal(_) => {
                    self.word = token.to_string();
                    self.push(&self.word.clone(), true);
                }
                // An invisible group (a `$ty` from `macro_rules!`) is spelled as its contents.
                TokenTree::Group(g) if g.delimiter() == Delimiter::None => self.tokens(g.stream()),
                TokenTree::Group(g) => {
                    let (open, close) = match g.delimiter() {
                        Delimiter::Parenthesis => ("(", ")"),
                        Delimiter::Bracket => ("[", "]"),
                        _ => ("{", "}"),
                    };
                    // `Fn(u8)` and `fn(u8)` are calls in shape, `mut [u8]` and `dyn (A)` are not.
                    let keyword = matches!(self.word.as_str(), "mut" | "const" | "dyn" | "as");
                    self.space |= self.after_word && (keyword || open == "[");
                    self.push(open, false);
                    self.tokens(g.stream());
                    self.out.push_str(close);
                    (self.space, self.after_word, self.joint) = (false, false, None);
                }
                TokenTree::Punct(p) => {
                    let c = p.as_char();
                    match (joint, c) {
                        // The second half of `::`, `->`, `>>`, ...
                        (Some('-'), '>') => {
                            self.out.push('>');
                            self.space = true;
                        }
                        (Some(_), _) => self.out.push(c),
                        (None, '-') if p.spacing() == Spacing::Joint => self.out.push_str(" -"),
                        (None, ',' | ';') => {
                            self.out.push(c);
                            self.space = true;
                        }
                        (None, ':') if p.spacing() == Spacing::Alone => {
                            self.out.push(':');
                            self.space = true;
                        }
                        (None, '=' | '+') => {
                            self.out.push(' ');
                            self.out.push(c);
                            self.space = true;
                        }
                        (None, _) => self.push(&c.to_string(), false),
                    }
                    self.after_word = false;
                    if p.spacing() == Spacing::Joint {
                        self.joint = Some(c);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(s: &str) -> Type {
        syn::parse_str(s).unwrap()
    }

    #[test]
    fn spelling_is_rustfmt_like() {
        for (written, spelled) in [
            ("Vec < u8 >", "Vec<u8>"),
            ("Result<Caps,ConfigError>", "Result<Caps, ConfigError>"),
            ("::std::os::fd::OwnedFd", "::std::os::fd::OwnedFd"),
            ("Option<Vec<OwnedFd>>", "Option<Vec<OwnedFd>>"),
            ("&'static str", "&'static str"),
            ("&mut [u8]", "&mut [u8]"),
            ("[u8;4]", "[u8; 4]"),
            ("fn(u8)->u8", "fn(u8) -> u8"),
            (
                "Box<dyn Fn(u8) -> u8 + Send>",
                "Box<dyn Fn(u8) -> u8 + Send>",
            ),
            ("<T as Iterator>::Item", "<T as Iterator>::Item"),
            (
                "HashMap<String, Vec<(u8, i64)>>",
                "HashMap<String, Vec<(u8, i64)>>",
            ),
            ("*const u8", "*const u8"),
            ("&mut (u8, u16)", "&mut (u8, u16)"),
            ("Vec<[u8; 4]>", "Vec<[u8; 4]>"),
        ] {
            assert_eq!(spell(ty(written).to_token_stream()), spelled, "{written}");
        }
    }

    #[test]
    fn wire_follows_the_spelling() {
        assert_eq!(wire(&ty("OwnedFd")), Wire::Fd);
        assert_eq!(wire(&ty("std::os::fd::OwnedFd")), Wire::Fd);
        assert_eq!(wire(&ty("Option<OwnedFd>")), Wire::Fd);
        assert_eq!(wire(&ty("Vec<OwnedFd>")), Wire::Fd);
        assert_eq!(wire(&ty("Vec<u8>")), Wire::Bytes);
        assert_eq!(wire(&ty("Option<u8>")), Wire::Serde);
        assert_eq!(wire(&ty("Option<Vec<u8>>")), Wire::CarriedBytes);
        assert_eq!(wire(&ty("Result<Vec<u8>, E>")), Wire::CarriedBytes);
        assert_eq!(
            wire(&ty("std::result::Result<Vec<u8>, E>")),
            Wire::CarriedBytes
        );
        assert_eq!(wire(&ty("io::Result<Vec<u8>>")), Wire::Serde);
        assert_eq!(wire(&ty("Option<Vec<u16>>")), Wire::Serde);
        assert_eq!(wire(&ty("Result<E, Vec<u8>>")), Wire::Serde);
        assert_eq!(wire(&ty("Option<Option<Vec<u8>>>")), Wire::Serde);
        assert_eq!(wire(&ty("Vec<u16>")), Wire::Serde);
        assert_eq!(wire(&ty("Fd")), Wire::Serde);
        assert_eq!(wire(&ty("Result<OwnedFd, E>")), Wire::Fd);
        assert_eq!(wire(&ty("std::result::Result<Vec<OwnedFd>, E>")), Wire::Fd);
        assert_eq!(wire(&ty("Result<Option<OwnedFd>, E>")), Wire::Fd);
        // An alias's one argument says nothing of its error type.
        assert_eq!(wire(&ty("io::Result<OwnedFd>")), Wire::Serde);
        assert_eq!(wire(&ty("Result<u8, E>")), Wire::Serde);
        assert_eq!(wire(&ty("Option<Result<OwnedFd, E>>")), Wire::Serde);
    }

    #[test]
    fn a_carried_result_names_its_error() {
        let carried = |s: &str| {
            let t = ty(s);
            carried_error(&t, wire(&t)).map(|e| spell(e.to_token_stream()))
        };
        assert_eq!(carried("Result<OwnedFd, E>").as_deref(), Some("E"));
        assert_eq!(
            carried("std::result::Result<Vec<OwnedFd>, my::E>").as_deref(),
            Some("my::E")
        );
        assert_eq!(carried("Result<Vec<u8>, E>").as_deref(), Some("E"));
        // A plain serde `Result` is bounded as a whole; the other carriers hold no serde value.
        assert_eq!(carried("Result<u8, E>"), None);
        assert_eq!(carried("Option<OwnedFd>"), None);
        assert_eq!(carried("Option<Vec<u8>>"), None);
        assert_eq!(carried("Vec<u8>"), None);
    }

    #[test]
    fn borrowed_types_suggest_the_owned_one() {
        let message = |s: &str| {
            check(&ty(s), Role::Param, Wire::Serde)
                .unwrap_err()
                .to_string()
        };
        assert!(message("&str").ends_with("take `String` instead"));
        assert!(message("&[u8]").ends_with("take `Vec<u8>` instead"));
        assert!(message("&mut Config").ends_with("take `Config` instead"));
        assert!(message("Option<&Path>").ends_with("take `PathBuf` instead"));
        assert!(message("Cow<'_, str>").contains("use an owned type"));
        assert!(message("(OwnedFd, u8)").contains("typed_ipc::fd"));
        assert!(check(&ty("Cow<'static, str>"), Role::Param, Wire::Serde).is_ok());
        assert!(check(&ty("Vec<OwnedFd>"), Role::Param, Wire::Fd).is_ok());
        let fallible = |s: &str| check(&ty(s), Role::Return, wire(&ty(s)));
        assert!(fallible("Result<OwnedFd, OpenError>").is_ok());
        // The error half is a plain serde value: an fd there has no way onto the wire.
        let both = fallible("Result<OwnedFd, OwnedFd>")
            .unwrap_err()
            .to_string();
        assert!(both.contains("the `Ok` of a `Result"), "{both}");
        // An alias of `Result` is not seen through, and the message says so.
        let alias = fallible("std::io::Result<OwnedFd>")
            .unwrap_err()
            .to_string();
        assert!(alias.contains("type alias of `Result`"), "{alias}");
        assert!(alias.contains("`Result<OwnedFd, E>`"), "{alias}");
        assert!(alias.contains("`std::io::Error` is not"), "{alias}");
        let own = fallible("MyResult<Vec<OwnedFd>>").unwrap_err().to_string();
        assert!(own.contains("`MyResult<..>` is none of these"), "{own}");
        let ok = fallible("Result<Box<OwnedFd>, E>").unwrap_err().to_string();
        assert!(ok.contains("`Box<..>` is none of these"), "{ok}");
        let nested = fallible("Vec<Option<OwnedFd>>").unwrap_err().to_string();
        assert!(!nested.contains("none of these"), "{nested}");
        // A borrowed return type says what to return.
        let returned = check(&ty("&str"), Role::Return, Wire::Serde).unwrap_err();
        assert!(returned.to_string().ends_with("return `String` instead"));
    }

    /// The error `check` gives a type spelled `s`, as a serde value in `role`.
    fn message(s: &str, role: Role) -> String {
        check(&ty(s), role, Wire::Serde)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| panic!("{s} accepted"))
    }

    #[test]
    fn writable_shared_memory_suggests_what_to_send_instead() {
        for spelled in [
            "SharedBuffer",
            "typed_ipc::SharedBuffer",
            "Vec<SharedBuffer>",
        ] {
            let param = message(spelled, Role::Param);
            assert!(
                param.contains("take a `SealedBuffer`"),
                "{spelled}: {param}"
            );
        }
        let region = message("typed_ipc::shared_region::SharedRegion", Role::Return);
        assert!(region.contains("return a `RegionView`"), "{region}");
        // Types of your own with these names travel as serde values.
        assert!(check(&ty("crate::SharedBuffer"), Role::Param, Wire::Serde).is_ok());
        assert!(check(&ty("model::SharedRegion"), Role::Param, Wire::Serde).is_ok());
    }

    #[test]
    fn fd_wrappers_and_raw_fds_suggest_an_owned_fd() {
        for spelled in [
            "File",
            "std::fs::File",
            "fs::File",
            "::std::fs::File",
            "tokio::fs::File",
            "UnixStream",
            "std::os::unix::net::UnixStream",
            "Option<File>",
            "Vec<net::UnixStream>",
            "BorrowedFd<'static>",
            "RawFd",
            "std::os::fd::RawFd",
            "Vec<RawFd>",
        ] {
            let param = message(spelled, Role::Param);
            assert!(
                param.contains("take `OwnedFd` instead"),
                "{spelled}: {param}"
            );
            let ret = message(spelled, Role::Return);
            assert!(ret.contains("return `OwnedFd` instead"), "{spelled}: {ret}");
        }
        assert!(message("RawFd", Role::Param).contains("only a number"));
        assert!(message("File", Role::Param).contains("`crate::File`"));
        // A type of one's own that happens to share the name.
        for own in ["crate::model::File", "vfs::File", "Box<crate::File>"] {
            assert!(check(&ty(own), Role::Param, Wire::Serde).is_ok(), "{own}");
        }
    }
}
