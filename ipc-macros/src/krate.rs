//! The path the generated code names typed-ipc by: `::typed_ipc`, or the one a
//! `crate = "..."` argument gives (`#[interface(crate = "...")]`, `#[shape(crate = "...")]` on
//! a derived type), for a crate that reaches typed-ipc through a facade or under another name,
//! as serde's `crate` attribute. Set for one expansion at a time ([`Krate::set`]), so that
//! every helper of the generators names it alike without each being handed the path.

use std::cell::RefCell;

use proc_macro2::{Span, TokenStream};
use quote::quote;

thread_local! {
    /// The path given to the expansion running on this thread, if one was. (A proc macro
    /// expands one item at a time, on one thread.)
    static GIVEN: RefCell<Option<syn::Path>> = const { RefCell::new(None) };
}

/// The path to typed-ipc of the expansion running now.
pub fn path() -> TokenStream {
    GIVEN
        .with_borrow(|given| given.as_ref().map(|p| quote!(#p)))
        .unwrap_or_else(|| quote!(::typed_ipc))
}

/// [`path`] with every token at `span`: where an error about what it names points.
pub fn path_at(span: Span) -> TokenStream {
    path()
        .into_iter()
        .map(|mut token| {
            token.set_span(span);
            token
        })
        .collect()
}

/// The value of a `crate = "..."` argument: a path, an error in it pointing at the string.
pub fn parse(meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<syn::Path> {
    let value = meta.value()?;
    let lit: syn::LitStr = value.parse().map_err(|e| {
        let message = "`crate` is a path in a string: `crate = \"::my_facade::typed_ipc\"`";
        syn::Error::new(e.span(), message)
    })?;
    lit.parse().map_err(|e| {
        let message =
            format!("`crate` is the path to typed-ipc, such as \"::my_facade::typed_ipc\": {e}");
        syn::Error::new(lit.span(), message)
    })
}

/// The path given to an expansion, in force while this lives.
pub struct Krate(Option<syn::Path>);

impl Krate {
    /// Makes `given` (`None`: `::typed_ipc`) the path until the returned value is dropped.
    pub fn set(given: Option<&syn::Path>) -> Krate {
        Krate(GIVEN.replace(given.cloned()))
    }
}

impl Drop for Krate {
    fn drop(&mut self) {
        GIVEN.set(self.0.take());
    }
}
