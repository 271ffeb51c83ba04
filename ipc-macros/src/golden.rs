//! The golden-file tests: the expansion of sample interfaces, pretty-printed, checked in as
//! `tests/golden/ipa.rs` (blocking) and `tests/golden/ipa_async.rs` (async), and with a client
//! of the other flavour as `tests/golden/ipa_async_client.rs` (`async_client` on the blocking
//! sample) and `tests/golden/ipa_blocking_client.rs` (`blocking_client` on the async one), and
//! with the types checked as `tests/golden/ipa_check_types.rs` (`check_types` on the blocking
//! sample), and with the async server of the blocking sample as
//! `tests/golden/ipa_async_server.rs` (`async_server`), so that every change to the generated
//! code shows up in review.
//! `TYPED_IPC_BLESS=1 cargo test -p ipc-macros` rewrites the files.

use std::path::Path;

use quote::quote;

/// The interface of the `#[interface]` issue, plus a byte buffer, an optional fd, a pinned
/// command id, and an optional and a fallible byte buffer.
fn sample() -> proc_macro2::TokenStream {
    quote! {
        /// An image-processing algorithm, running in its own process.
        pub trait Ipa {
            /// Reverses `text`.
            fn reverse(&self, text: String) -> String;
            /// The total length of `files`, in bytes.
            fn total_len(&self, files: Vec<OwnedFd>) -> u64;
            fn configure(&self, cfg: Config) -> Result<Caps, ConfigError>;
            /// A buffer to write frame `id` into.
            fn open_buffer(&self, id: u32) -> OwnedFd;
            /// Statistics for `frame` are ready in `stats`.
            #[oneway]
            fn stats_ready(&self, frame: u32, stats: OwnedFd);
            fn echo(&self, data: Vec<u8>) -> Vec<u8>;
            fn swap_fd(&self, fd: Option<OwnedFd>) -> Option<OwnedFd>;
            #[cmd(7)]
            fn ping(&self);
            fn decode(&self, image: Option<Vec<u8>>) -> Result<Vec<u8>, DecodeError>;
        }
    }
}

/// The same interface in the async flavour, with a default method body: same info static and
/// enums, async client and server, and the trait's methods returning `Send` futures.
fn async_sample() -> proc_macro2::TokenStream {
    quote! {
        /// An image-processing algorithm, running in its own process.
        pub trait Ipa {
            /// Reverses `text`.
            async fn reverse(&self, text: String) -> String;
            /// The total length of `files`, in bytes.
            async fn total_len(&self, files: Vec<OwnedFd>) -> u64;
            async fn configure(&self, cfg: Config) -> Result<Caps, ConfigError>;
            /// A buffer to write frame `id` into.
            async fn open_buffer(&self, id: u32) -> OwnedFd;
            /// Statistics for `frame` are ready in `stats`.
            #[oneway]
            async fn stats_ready(&self, frame: u32, stats: OwnedFd);
            async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
            async fn swap_fd(&self, fd: Option<OwnedFd>) -> Option<OwnedFd>;
            #[cmd(7)]
            async fn ping(&self) {}
            async fn decode(&self, image: Option<Vec<u8>>) -> Result<Vec<u8>, DecodeError>;
        }
    }
}

#[test]
fn expansion_matches_the_golden_file() {
    check(quote!(), sample(), "tests/golden/ipa.rs", "the sample");
}

#[test]
fn async_expansion_matches_the_golden_file() {
    check(
        quote!(),
        async_sample(),
        "tests/golden/ipa_async.rs",
        "the async sample",
    );
}

#[test]
fn async_client_expansion_matches_the_golden_file() {
    check(
        quote!(async_client),
        sample(),
        "tests/golden/ipa_async_client.rs",
        "`#[interface(async_client)]` on the sample",
    );
}

#[test]
fn blocking_client_expansion_matches_the_golden_file() {
    check(
        quote!(blocking_client),
        async_sample(),
        "tests/golden/ipa_blocking_client.rs",
        "`#[interface(blocking_client)]` on the async sample",
    );
}

#[test]
fn async_server_expansion_matches_the_golden_file() {
    check(
        quote!(async_server),
        sample(),
        "tests/golden/ipa_async_server.rs",
        "`#[interface(async_server)]` on the sample",
    );
}

#[test]
fn check_types_expansion_matches_the_golden_file() {
    check(
        quote!(check_types),
        sample(),
        "tests/golden/ipa_check_types.rs",
        "`#[interface(check_types)]` on the sample",
    );
}

/// Expands `#[interface(attr)] item` and compares it with the golden file at `golden` (or
/// rewrites the file).
fn check(
    attr: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
    golden: &str,
    sample: &str,
) {
    let tokens = crate::expand(attr, item);
    let mut file = syn::parse2::<syn::File>(tokens).expect("the expansion parses as a file");
    let unwrapped = unwrap_feature_gates(&mut file);
    let note = match unwrapped {
        Some(gate) => {
            let (what, shown) = match gate {
                "async_client" => ("The async client, the last item, is", "it is"),
                "async_server" => ("The async server, the last item, is", "it is"),
                _ => ("The items after the trait are", "they are"),
            };
            format!(
                "\n// {what} emitted inside `::typed_ipc::__private::{gate}! {{ .. }}`\n// (a \
                 compile error without the `tokio` feature); {shown} shown unwrapped here."
            )
        }
        None => String::new(),
    };
    let actual = format!(
        "// Generated by `TYPED_IPC_BLESS=1 cargo test -p ipc-macros`: the expansion of \
         {sample} in src/golden.rs.{note}\n\n{}",
        prettyplease::unparse(&file)
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(golden);
    if std::env::var_os("TYPED_IPC_BLESS").is_some() {
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if expected != actual {
        panic!(
            "the expansion changed; review it and rerun with TYPED_IPC_BLESS=1 to accept.\n\
             --- {}\n+++ actual\n{}",
            path.display(),
            line_diff(&expected, &actual)
        );
    }
}

/// Replaces an `async_interface! { items }`, `async_client! { items }` or
/// `async_server! { items }` invocation (which
/// need the `tokio` feature) by its items, so that they are pretty-printed too. Which macro
/// there was.
fn unwrap_feature_gates(file: &mut syn::File) -> Option<&'static str> {
    let mut found = None;
    let mut items = Vec::new();
    for item in std::mem::take(&mut file.items) {
        let gate = match &item {
            syn::Item::Macro(m) => {
                let name = &m.mac.path.segments.last().unwrap().ident;
                ["async_interface", "async_client", "async_server"]
                    .into_iter()
                    .find(|gate| name == gate)
            }
            _ => None,
        };
        match (gate, item) {
            (Some(gate), syn::Item::Macro(m)) => {
                let inner: syn::File = syn::parse2(m.mac.tokens).expect("items");
                items.extend(inner.items);
                found = Some(gate);
            }
            (_, other) => items.push(other),
        }
    }
    file.items = items;
    found
}

/// The lines that differ, enough to see what changed without a diff crate.
fn line_diff(expected: &str, actual: &str) -> String {
    let (old, new): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let mut out = String::new();
    for i in 0..old.len().max(new.len()) {
        let (o, n) = (old.get(i), new.get(i));
        if o != n {
            if let Some(o) = o {
                out.push_str(&format!("{:>4} - {o}\n", i + 1));
            }
            if let Some(n) = n {
                out.push_str(&format!("{:>4} + {n}\n", i + 1));
            }
        }
    }
    out
}
