//! The serde `where` clauses on the generated items that encode or decode parameters and
//! return values, so that a parameter or return type that is not serde is reported at the
//! type, in the trait: a type that travels as a plain serde value, and the error `E` of a
//! `Result` whose `Ok` the codec carries (fds, a byte string), which is reported at the `E`.

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{quote, quote_spanned};

use super::Generator;
use crate::model::{Method, Value, Wire};

impl Generator<'_> {
    /// The server's `where` clause: every parameter type that travels as a plain serde value
    /// is `DeserializeOwned`, and every such return type `Serialize` (see [`serde_bounds`]). A
    /// type that names the server's type parameter (`T`, or `Imp` for a trait named `T`) is
    /// left out: in the server's items it would mean that parameter.
    pub(super) fn server_bounds(&self) -> TokenStream {
        let methods = &self.iface.methods;
        let params = methods.iter().flat_map(|m| m.args.iter().map(|a| &a.value));
        let keep = |ty: &TokenStream| !ty.clone().into_iter().any(|t| names(&t, &self.imp));
        let mut predicates = serde_predicates(params, Bound::DeserializeOwned, keep);
        merge(
            &mut predicates,
            serde_predicates(self.returns(), Bound::Serialize, keep),
        );
        where_clause(predicates)
    }

    /// A client stub's `where` clause: its parameter types `Serialize` and, if it gets a reply,
    /// its return type `DeserializeOwned`, as the server's ask the other way (see
    /// [`serde_bounds`]).
    pub(super) fn stub_bounds(&self, m: &Method) -> TokenStream {
        let params = m.args.iter().map(|a| &a.value);
        let mut predicates = serde_predicates(params, Bound::Serialize, |_| true);
        let ret = m.ret.as_ref().filter(|_| !m.oneway);
        merge(
            &mut predicates,
            serde_predicates(ret, Bound::DeserializeOwned, |_| true),
        );
        where_clause(predicates)
    }

    /// The return types of the methods that get a reply.
    pub(super) fn returns(&self) -> impl Iterator<Item = &Value> {
        let methods = self.iface.methods.iter().filter(|m| !m.oneway);
        methods.filter_map(|m| m.ret.as_ref())
    }
}

/// What [`serde_bounds`] asks of a type.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Bound {
    /// Sent: the client encodes it.
    Serialize,
    /// Received: the server decodes it.
    DeserializeOwned,
}

/// Types that need no bound spelled out: serde supports them, and they are common enough that
/// listing them would only make the generated code harder to read.
const ALWAYS_SERDE: [&str; 17] = [
    "bool", "char", "u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128",
    "isize", "f32", "f64", "String",
];

/// `where A: Serialize, B: Serialize` (or `DeserializeOwned`) for the distinct types among
/// `values` that travel as plain serde values and that `keep` accepts (given the type's tokens),
/// and `E: Serialize + DeserializeOwned` for the error of a carried `Result` (see
/// [`serde_predicates`]); nothing if there are none.
///
/// The arguments travel as one tuple, and a tuple (or a return value) that is not serde is
/// reported where it is encoded or decoded, which in generated code is `#[interface]`. With
/// the bound spelled out, spanned at the type, a type that is not serde is reported at the
/// type, in the trait; the code inside can then rely on the bound.
pub(super) fn serde_bounds<'v>(
    values: impl IntoIterator<Item = &'v Value>,
    bound: Bound,
    keep: impl Fn(&TokenStream) -> bool,
) -> TokenStream {
    where_clause(serde_predicates(values, bound, keep))
}

/// One type's bounds in a `where` clause: a type is bounded once, by all it needs (a type
/// bounded twice is `clippy::type_repetition_in_bounds`, reported at the type, in the trait).
struct Predicate {
    /// The type, as written.
    ty: TokenStream,
    /// Its spelling, which tells one type from another.
    spelled: String,
    /// Sent: bounded `Serialize`.
    serialize: bool,
    /// Received: bounded `DeserializeOwned`.
    deserialize: bool,
}

impl Predicate {
    fn to_tokens(&self) -> TokenStream {
        let ty = &self.ty;
        // At the type's last token, so that the predicate covers the type as written.
        let span = match ty.clone().into_iter().last() {
            Some(TokenTree::Group(g)) => g.span_close(),
            Some(other) => other.span(),
            None => Span::call_site(),
        };
        let k = crate::krate::path_at(span);
        let p = quote_spanned!(span=> #k::__private);
        match (self.serialize, self.deserialize) {
            (true, false) => quote_spanned!(span=> #ty: #p::Serialize),
            (false, true) => quote_spanned!(span=> #ty: #p::DeserializeOwned),
            _ => quote_spanned!(span=> #ty: #p::Serialize + #p::DeserializeOwned),
        }
    }
}

/// Adds `more` to `predicates`: a type already there gets the bounds it did not have.
fn merge(predicates: &mut Vec<Predicate>, more: Vec<Predicate>) {
    for predicate in more {
        match predicates
            .iter_mut()
            .find(|p| p.spelled == predicate.spelled)
        {
            Some(existing) => {
                existing.serialize |= predicate.serialize;
                existing.deserialize |= predicate.deserialize;
            }
            None => predicates.push(predicate),
        }
    }
}

/// `where` and `predicates`, or nothing if there are none.
fn where_clause(predicates: Vec<Predicate>) -> TokenStream {
    let predicates = predicates.iter().map(Predicate::to_tokens);
    match predicates.len() {
        0 => TokenStream::new(),
        _ => quote!(where #(#predicates,)*),
    }
}

/// The predicates of [`serde_bounds`]. The error of a `Result` whose `Ok` the codec carries
/// (fds, a byte string) is a plain serde value too, inside the carrier: it is bounded on its
/// own, and both ways, as the carrier asks (without the bound, a type that is not serde is
/// reported inside the runtime, naming its carriers, at `#[interface]`).
fn serde_predicates<'v>(
    values: impl IntoIterator<Item = &'v Value>,
    bound: Bound,
    keep: impl Fn(&TokenStream) -> bool,
) -> Vec<Predicate> {
    let mut predicates = Vec::new();
    for value in values {
        let (ty, serialize, deserialize) = match (value.wire, &value.carried_error) {
            (Wire::Serde, _) => (
                &value.ty,
                bound == Bound::Serialize,
                bound == Bound::DeserializeOwned,
            ),
            (_, Some(error)) => (error, true, true),
            (_, None) => continue,
        };
        let ty = quote!(#ty);
        let spelled = ty.to_string();
        if ALWAYS_SERDE.contains(&&*spelled) || !keep(&ty) {
            continue;
        }
        let predicate = Predicate {
            ty,
            spelled,
            serialize,
            deserialize,
        };
        merge(&mut predicates, vec![predicate]);
    }
    predicates
}

/// Whether `token` is, or contains, the identifier `imp`.
pub(super) fn names(token: &TokenTree, imp: &proc_macro2::Ident) -> bool {
    match token {
        TokenTree::Ident(ident) => ident == imp,
        TokenTree::Group(g) => g.stream().into_iter().any(|t| names(&t, imp)),
        _ => false,
    }
}
