//! From the [`Interface`] model to Rust. [`Generator`] computes the generated names once and
//! has one method per emitted item; [`Generator::expand`] joins them. The two flavours share
//! the interface description and the request and response enums (the wire format), and differ
//! in the client, the server and the one method of each enum that touches a call: the async
//! flavour's are [`Generator::async_client`], [`Generator::async_server`] and friends.
//!
//! Every path in the output is absolute (`::typed_ipc::__private::…`, `::core::…`), so that
//! the user's own `Result`, `Option`, `core` or `std` cannot capture it, and a trait's method
//! is called by the trait's path (`::core::clone::Clone::clone(&x)`), as a module without the
//! prelude (`#[no_implicit_prelude]`) has no trait in scope; the user's types are emitted as
//! written, to resolve in the user's scope.

mod asynchronous;
mod blocking;
mod bounds;
mod pooled;
mod wire;

use proc_macro2::{Ident, Literal, Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::LitByteStr;
use syn::ext::IdentExt;
use syn::spanned::Spanned;

use crate::krate::{self, Krate};
use crate::model::{Flavour, Interface, Method, Wire};
use bounds::{Bound, serde_bounds};
use wire::{decode_pattern, decode_type, encode, encode_owned};

/// The generated code of one interface.
pub struct Generator<'a> {
    iface: &'a Interface,
    /// `<Trait>Client`.
    client: Ident,
    /// `<Trait>AsyncClient` of a blocking trait, `<Trait>BlockingClient` of an async one: the
    /// client of the other flavour, with `#[interface(async_client)]` or `blocking_client`.
    other_client: Ident,
    /// `<Trait>Server`.
    server: Ident,
    /// `<Trait>AsyncServer`: the async server of a blocking trait, with
    /// `#[interface(async_server)]`.
    async_server: Ident,
    /// `<Trait>Request`.
    request: Ident,
    /// `<Trait>Response`.
    response: Ident,
    /// `<TRAIT>_INFO`, the `InterfaceInfo` static.
    info: Ident,
    /// The server's type parameter, the implementation's type: `T`, or `Imp` for a trait
    /// named `T` (which the parameter would shadow in the server's items).
    imp: Ident,
}

/// Where the generated code finds the runtime.
fn private() -> TokenStream {
    let k = krate::path();
    quote!(#k::__private)
}

/// `Result<ok, typed_ipc::Error>`.
fn result(ok: TokenStream) -> TokenStream {
    let p = private();
    quote!(::core::result::Result<#ok, #p::Error>)
}

/// A command id, unsuffixed (it reads better, and its type is always clear from context).
fn cmd(method: &Method) -> Literal {
    Literal::u32_unsuffixed(method.cmd)
}

/// `text` as doc comments: one `#[doc = " line"]` per line, as `///` would write them.
fn doc(text: String) -> TokenStream {
    let lines = text.lines().map(|line| match line {
        "" => String::new(),
        line => format!(" {line}"),
    });
    quote!(#(#[doc = #lines])*)
}

impl<'a> Generator<'a> {
    /// Names the generated items after the trait.
    pub fn new(iface: &'a Interface) -> Self {
        let name = &iface.name;
        let screaming = screaming_snake(&name.unraw().to_string());
        Generator {
            iface,
            client: format_ident!("{}Client", name),
            other_client: match iface.flavour {
                Flavour::Blocking => format_ident!("{}AsyncClient", name),
                Flavour::Async => format_ident!("{}BlockingClient", name),
            },
            server: format_ident!("{}Server", name),
            async_server: format_ident!("{}AsyncServer", name),
            request: format_ident!("{}Request", name),
            response: format_ident!("{}Response", name),
            info: format_ident!("{}_INFO", screaming, span = name.span()),
            imp: match name.unraw() == "T" {
                true => format_ident!("Imp"),
                false => format_ident!("T"),
            },
        }
    }

    /// The trait, followed by everything generated from it.
    pub fn expand(&self) -> TokenStream {
        let _krate = Krate::set(self.iface.krate.as_ref());
        match self.iface.flavour {
            Flavour::Blocking => {
                let item = &self.iface.item;
                let items = [
                    self.info_static(),
                    self.request_enum(),
                    self.response_enum(),
                    self.client(&self.client),
                    self.server(),
                ];
                // Without the `tokio` feature, `async_client!` is one clear error, at the
                // argument that asked for it, instead of the client (which names what only
                // that feature provides).
                let async_client = self.iface.other_client.map(|span| {
                    let client = self.async_client(&self.other_client);
                    let k = krate::path_at(span);
                    quote_spanned!(span=> #k::__private::async_client! { #client })
                });
                let async_server = self.iface.async_server.map(|span| {
                    let server = self.pooled_server();
                    let k = krate::path_at(span);
                    quote_spanned!(span=> #k::__private::async_server! { #server })
                });
                quote!(#item #(#items)* #async_client #async_server)
            }
            Flavour::Async => {
                let (p, item) = (private(), self.async_trait());
                let blocking_client = self
                    .iface
                    .other_client
                    .map(|_| self.client(&self.other_client));
                let items = [
                    self.info_static(),
                    self.request_enum(),
                    self.response_enum(),
                    self.async_client(&self.client),
                    self.async_server(),
                ];
                // Without the `tokio` feature, `async_interface!` is one clear error instead of
                // the generated items (which name what only that feature provides).
                quote!(#item #p::async_interface! { #(#items)* #blocking_client })
            }
        }
    }

    /// The type of the call the request and response enums read from and reply to.
    fn call_type(&self) -> TokenStream {
        let p = private();
        match self.iface.flavour {
            Flavour::Blocking => quote!(#p::Call<'_>),
            Flavour::Async => quote!(#p::AsyncCall),
        }
    }

    /// `<TRAIT>_INFO`: what both ends compare before a call.
    fn info_static(&self) -> TokenStream {
        let (p, vis, info, name) = (private(), &self.iface.vis, &self.info, &self.iface.name);
        let name_text = &self.iface.wire_name;
        let name_bytes = LitByteStr::new(name_text.as_bytes(), Span::call_site());
        let signature = self.iface.canonical_signature();
        let signature = LitByteStr::new(signature.as_bytes(), Span::call_site());
        let signature = quote!(#p::fnv1a(#signature));
        let methods = self.iface.methods.iter().map(|m| {
            let (name, cmd, signature, oneway) =
                (m.name.unraw().to_string(), cmd(m), &m.signature, m.oneway);
            let shape = match self.iface.check_types {
                true => method_shape(m),
                false => quote!(0),
            };
            quote! {
                #p::MethodInfo {
                    name: #name, cmd: #cmd, signature: #signature, oneway: #oneway, shape: #shape
                }
            }
        });
        let docs = doc(format!(
            "What both ends of [`{name}`] compare before a call: its name, and every method's \
             command id and signature."
        ));
        // With the types checked, the signature folds in the methods' shapes, written once in
        // the methods' list.
        let value = match self.iface.check_types {
            false => quote! {
                #p::InterfaceInfo {
                    name: #name_text,
                    id: #p::fnv1a(#name_bytes),
                    signature: #signature,
                    methods: &[#(#methods),*],
                }
            },
            // Named after the static (`IPA_METHODS`), not a name a user type or constant in
            // the methods' signatures could have and this would shadow.
            true => {
                let list = format_ident!("{}_METHODS", info.to_string().trim_end_matches("_INFO"));
                quote! {{
                    const #list: &[#p::MethodInfo] = &[#(#methods),*];
                    #p::InterfaceInfo {
                        name: #name_text,
                        id: #p::fnv1a(#name_bytes),
                        signature: #p::shape::signature(#signature, #list),
                        methods: #list,
                    }
                }}
            }
        };
        let hidden = self.hidden();
        quote! {
            #docs
            #hidden
            #[allow(dead_code, deprecated)]
            #vis static #info: #p::InterfaceInfo = #value;
        }
    }

    /// `<Trait>Request`: one variant per method, holding its arguments.
    fn request_enum(&self) -> TokenStream {
        let (vis, request, name) = (&self.iface.vis, &self.request, &self.iface.name);
        let methods = &self.iface.methods;
        let variants = methods.iter().map(|m| {
            let (variant, method) = (&m.variant, &m.name);
            let docs = doc(format!("The arguments of [`{name}::{method}`]."));
            let fields = m.args.iter().map(|a| {
                let (field, ty) = (&a.name, &a.value.ty);
                let docs = doc(format!("The `{}` argument.", field.unraw()));
                quote!(#docs #field: #ty)
            });
            match m.args.is_empty() {
                true => quote!(#docs #variant),
                false => quote!(#docs #variant { #(#fields),* }),
            }
        });
        let commands = methods.iter().map(|m| {
            let (variant, cmd) = (&m.variant, cmd(m));
            match m.args.is_empty() {
                true => quote!(Self::#variant => #cmd),
                false => quote!(Self::#variant { .. } => #cmd),
            }
        });
        let decoders = methods.iter().map(|m| {
            let (variant, cmd) = (&m.variant, cmd(m));
            let pats = m.args.iter().map(|a| decode_pattern(&a.name, &a.value));
            let tys = m.args.iter().map(|a| decode_type(&a.value));
            let names = m.args.iter().map(|a| &a.name);
            let value = match m.args.is_empty() {
                true => quote!(Self::#variant),
                false => quote!(Self::#variant { #(#names),* }),
            };
            quote! {
                #cmd => {
                    let (#(#pats,)*): (#(#tys,)*) = call.args()?;
                    ::core::result::Result::Ok(#value)
                }
            }
        });
        let ret_self = result(quote!(Self));
        let call_type = self.call_type();
        let params = methods.iter().flat_map(|m| m.args.iter().map(|a| &a.value));
        let decodable = serde_bounds(params, Bound::DeserializeOwned, |_| true);
        let enum_docs = doc(format!(
            "A request of [`{name}`]: one variant per method, holding its arguments."
        ));
        // Every item that names the user's types allows `deprecated`: a deprecated type in a
        // signature is the user's to allow where the trait is declared, and cannot be here.
        // So with the user's names (see `Generator::type_name_lints`).
        let (hidden, type_lints, name_lints) = (
            self.hidden(),
            self.type_name_lints(),
            self.user_name_lints(),
        );
        quote! {
            #enum_docs
            #hidden
            #[allow(dead_code, deprecated #type_lints #name_lints)]
            #vis enum #request {
                #(#variants,)*
            }

            #[allow(dead_code, deprecated #name_lints)]
            impl #request {
                /// The command id of the method this request calls.
                #vis fn command(&self) -> ::core::primitive::u32 {
                    match self {
                        #(#commands,)*
                    }
                }

                /// Decodes the request `call` carries, taking the fds that came with it.
                #vis fn decode(call: &mut #call_type) -> #ret_self #decodable {
                    match call.command() {
                        #(#decoders)*
                        _ => ::core::result::Result::Err(call.unknown_command()),
                    }
                }
            }
        }
    }

    /// `<Trait>Response`: one variant per method that gets a reply, holding its return value.
    fn response_enum(&self) -> TokenStream {
        let (p, vis, response, name) =
            (private(), &self.iface.vis, &self.response, &self.iface.name);
        let replied: Vec<&Method> = self.iface.methods.iter().filter(|m| !m.oneway).collect();
        let variants = replied.iter().map(|m| {
            let (variant, method) = (&m.variant, &m.name);
            let docs = doc(format!("The return value of [`{name}::{method}`]."));
            match &m.ret {
                Some(ret) => {
                    let ty = &ret.ty;
                    quote!(#docs #variant(#ty))
                }
                None => quote!(#docs #variant),
            }
        });
        let ret_unit = result(quote!(()));
        // The response enum is not generic: a type named `T` here is the user's.
        let serializable = serde_bounds(self.returns(), Bound::Serialize, |_| true);
        let send = match self.iface.flavour {
            Flavour::Blocking => {
                let senders = replied.iter().map(|m| {
                    let variant = &m.variant;
                    match &m.ret {
                        Some(ret) => {
                            let value = encode(quote!(value), ret.wire);
                            quote!(Self::#variant(value) => call.reply(#value))
                        }
                        None => quote!(Self::#variant => call.reply(&())),
                    }
                });
                // An interface of oneway methods only has an empty response enum, which only
                // `*self` matches exhaustively.
                let scrutinee = if replied.is_empty() {
                    quote!(*self)
                } else {
                    quote!(self)
                };
                quote! {
                    /// Sends this value as the reply to `call`.
                    #vis fn send(&self, call: &mut #p::Call<'_>) -> #ret_unit #serializable {
                        match #scrutinee {
                            #(#senders,)*
                        }
                    }
                }
            }
            Flavour::Async => {
                let senders = replied.iter().map(|m| {
                    let variant = &m.variant;
                    match &m.ret {
                        Some(ret) if ret.wire == Wire::Bytes => {
                            quote!(Self::#variant(value) => call.reply_bytes(value).await)
                        }
                        Some(ret) => {
                            let value = encode_owned(quote!(value), ret.wire);
                            quote!(Self::#variant(value) => call.reply(#value).await)
                        }
                        None => quote!(Self::#variant => call.reply(()).await),
                    }
                });
                // `call` is unused when every method is oneway.
                let allow = replied
                    .is_empty()
                    .then(|| quote!(#[allow(unused_variables)]));
                quote! {
                    /// Sends this value as the reply to `call`. Takes the value, so that the
                    /// future is `Send` whenever the value is.
                    #allow
                    #vis async fn send(self, call: &mut #p::AsyncCall) -> #ret_unit
                    #serializable
                    {
                        match self {
                            #(#senders,)*
                        }
                    }
                }
            }
        };
        let enum_docs = doc(format!(
            "A reply of [`{name}`]: one variant per method that is not `#[oneway]`, holding its \
             return value."
        ));
        let (hidden, type_lints) = (self.hidden(), self.type_name_lints());
        quote! {
            #enum_docs
            #hidden
            #[allow(dead_code, deprecated #type_lints)]
            #vis enum #response {
                #(#variants,)*
            }

            #[allow(dead_code, deprecated)]
            impl #response {
                #send
            }
        }
    }

    /// The client struct `client` and its constructor, timeout and connection accessors
    /// around `stubs`, over `connection` (a type in the private module): shared by both
    /// flavours.
    fn client_item(
        &self,
        client: &Ident,
        connection: TokenStream,
        docs: &str,
        timeout_note: &str,
        stubs: &[TokenStream],
    ) -> TokenStream {
        let (p, vis, interface) = (private(), &self.iface.vis, &self.iface.wire_name);
        let (docs, deprecated) = (doc(docs.to_string()), &self.iface.deprecated);
        let (allow_deprecated, hidden) = (self.allow_deprecated(), self.hidden());
        let (type_lints, name_lints) = (self.type_name_lints(), self.user_name_lints());
        let client_name = client.unraw().to_string();
        let with_timeout = doc(format!(
            "A copy of this client whose calls give up after `timeout` with `Error::TimedOut`:\n\
             a call that has no reply by then, and a `#[oneway]` message that cannot be sent\n\
             by then (the peer is not reading). A call whose request went out tells the peer\n\
             (a small cancel message), which drops the call if it has not started it (an async\n\
             peer also drops a running handler's future); a blocking method already running\n\
             runs on to its end, and a server with one thread runs nothing else meanwhile, so\n\
             later calls wait behind it (kill a worker that is stuck for good). The time counts\n\
             from the call, including any wait behind the peer's other calls, not from when\n\
             the method starts.{timeout_note}"
        ));
        quote! {
            #docs
            #hidden
            #(#deprecated)*
            #[derive(::core::clone::Clone)]
            #[allow(dead_code #type_lints)]
            #vis struct #client {
                connection: #p::#connection,
                timeout: ::core::option::Option<#p::Duration>,
            }

            // The stubs repeat the trait's names and parameter lists: the user's trait is where
            // those lints belong.
            #[allow(dead_code, deprecated, clippy::too_many_arguments #name_lints)]
            impl #client {
                /// A client calling the server at the other end of `connection`; its calls
                /// wait as long as the peer is alive.
                #vis fn new(connection: #p::#connection) -> Self {
                    Self { connection, timeout: ::core::option::Option::None }
                }

                #with_timeout
                #vis fn with_timeout(&self, timeout: #p::Duration) -> Self {
                    Self {
                        connection: ::core::clone::Clone::clone(&self.connection),
                        timeout: ::core::option::Option::Some(timeout),
                    }
                }

                /// The connection this client calls over.
                #vis fn connection(&self) -> &#p::#connection {
                    &self.connection
                }

                #(#stubs)*
            }

            // By hand, and the same for every client: the interface first, so that a
            // `#[derive(Debug)]` struct holding clients shows which one each is.
            #allow_deprecated
            impl ::core::fmt::Debug for #client {
                fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                    f.debug_struct(#client_name)
                        .field("interface", &#interface)
                        .field("connection", &self.connection)
                        .field("timeout", &self.timeout)
                        .finish()
                }
            }
        }
    }

    /// What the docs of the client of the other flavour add: which one it is, and that it
    /// calls the same servers as `<Trait>Client`. Empty for `<Trait>Client`.
    fn other_client_note(&self, client: &Ident) -> String {
        if *client != self.other_client {
            return String::new();
        }
        let own = &self.client;
        let (flavour, argument) = match self.iface.flavour {
            Flavour::Blocking => ("async", "async_client"),
            Flavour::Async => ("blocking", "blocking_client"),
        };
        format!(
            "\n\nThe {flavour} counterpart of [`{own}`], generated by \
             `#[interface({argument})]`: it calls the same servers, of either flavour (the wire \
             and the interface signature are the same)."
        )
    }

    /// A stub's doc comment: the trait method's own, or a line naming it; and the method's
    /// `#[deprecated]`, so that a call through the client warns as a call of the method would.
    fn stub_docs(&self, m: &Method) -> TokenStream {
        let deprecated = &m.deprecated;
        if m.docs.is_empty() {
            let docs = doc(format!(
                "Calls [`{}::{}`] on the server.",
                self.iface.name, m.name
            ));
            quote!(#docs #(#deprecated)*)
        } else {
            let docs = &m.docs;
            quote!(#(#docs)* #(#deprecated)*)
        }
    }

    /// `, non_camel_case_types` for the items named after a trait whose name rustc warns about
    /// (`libfoo`): it says so at the trait, where the user's `#[allow]` reaches, and is not to
    /// say it again at `libfooClient`. Nothing for a name in style, so that a crate that
    /// forbids the lint gets no `allow` of it, which rustc refuses there (E0453).
    fn type_name_lints(&self) -> Option<TokenStream> {
        let name = self.iface.name.unraw().to_string();
        // The generated names add a word in camel case (`Client`), after which an
        // underscore ending the trait's name (`Foo_`, in style alone) is out of style.
        let in_style = is_camel_case(&name) && is_camel_case(&format!("{name}Client"));
        (!in_style).then(|| quote!(, non_camel_case_types))
    }

    /// As [`Generator::type_name_lints`], for the items that repeat the methods' and
    /// parameters' names: `, non_snake_case` for a name out of style (`GetURL`), and
    /// `, clippy::used_underscore_binding` for a parameter named `_reserved`, which the user's
    /// code leaves unused and ours uses.
    fn user_name_lints(&self) -> TokenStream {
        let methods = &self.iface.methods;
        let params = || methods.iter().flat_map(|m| &m.args).map(|a| a.name.unraw());
        let names = methods.iter().map(|m| m.name.unraw()).chain(params());
        // As rustc tells: no capitals, no `__` between words.
        let not_snake = |name: String| {
            name.chars().any(char::is_uppercase) || name.trim_matches('_').contains("__")
        };
        let snake = names.map(|name| name.to_string()).any(not_snake);
        let underscore = params().any(|name| name.to_string().starts_with('_'));
        let snake = snake.then(|| quote!(, non_snake_case));
        let underscore = underscore.then(|| quote!(, clippy::used_underscore_binding));
        quote!(#snake #underscore)
    }

    /// `#[doc(hidden)]` for each item generated from a hidden trait; nothing otherwise.
    fn hidden(&self) -> Option<TokenStream> {
        self.iface.hidden.then(|| quote!(#[doc(hidden)]))
    }

    /// `#[allow(deprecated)]` for an impl of a client or server of a deprecated trait (which
    /// are deprecated too), where naming them is no use of the user's; nothing otherwise.
    fn allow_deprecated(&self) -> Option<TokenStream> {
        let deprecated = !self.iface.deprecated.is_empty();
        deprecated.then(|| quote!(#[allow(deprecated)]))
    }

    /// The server struct, shared by both flavours: it holds the implementation behind an
    /// `Arc`, so that `from_arc` can serve one the program keeps a handle to (or a
    /// `dyn Trait`, in the blocking flavour), and cloning the server shares it.
    /// The async server of a blocking trait (`pooled`) also holds the slots its methods take
    /// on tokio's blocking pool, shared with its clones.
    fn server_struct(&self, server: &Ident, docs: TokenStream, pooled: bool) -> TokenStream {
        let (p, vis, imp) = (private(), &self.iface.vis, &self.imp);
        let (interface, server_name) = (&self.iface.wire_name, server.unraw().to_string());
        let (deprecated, allow_deprecated) = (&self.iface.deprecated, self.allow_deprecated());
        let (hidden, type_lints) = (self.hidden(), self.type_name_lints());
        let (field, cloned) = match pooled {
            true => (
                quote!(slots: #p::PoolSlots,),
                quote!(slots: ::core::clone::Clone::clone(&self.slots),),
            ),
            false => (quote!(), quote!()),
        };
        quote! {
            #docs
            #hidden
            #(#deprecated)*
            #[allow(dead_code #type_lints)]
            #vis struct #server<#imp: ?::core::marker::Sized> {
                imp: #p::Arc<#imp>,
                #field
            }

            #allow_deprecated
            impl<#imp: ?::core::marker::Sized> ::core::clone::Clone for #server<#imp> {
                /// Another server answering with the same implementation.
                fn clone(&self) -> Self {
                    Self {
                        imp: ::core::clone::Clone::clone(&self.imp),
                        #cloned
                    }
                }
            }

            // The implementation by its type's name: asking it to be `Debug` would narrow
            // which servers a `#[derive(Debug)]` struct can hold.
            #allow_deprecated
            impl<#imp: ?::core::marker::Sized> ::core::fmt::Debug for #server<#imp> {
                fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                    f.debug_struct(#server_name)
                        .field("interface", &#interface)
                        .field("implementation", &::core::any::type_name::<#imp>())
                        .finish_non_exhaustive()
                }
            }
        }
    }

    /// What the server asks of its implementation: the trait, `Send + Sync + 'static`, and
    /// `?Sized` unless a method asks `where Self: Sized` (the server could not call it on a
    /// `dyn Trait`).
    fn server_bounds_on_imp(&self) -> TokenStream {
        let name = &self.iface.name;
        let unsized_ok = match self.iface.methods.iter().any(|m| m.needs_sized) {
            true => quote!(),
            false => quote!(+ ?::core::marker::Sized),
        };
        quote!(#name + ::core::marker::Send + ::core::marker::Sync #unsized_ok + 'static)
    }

    /// The server's two constructors, shared by both flavours (`pooled`: see
    /// [`Generator::server_struct`]).
    fn server_constructors(&self, pooled: bool) -> TokenStream {
        let (p, vis, imp) = (private(), &self.iface.vis, &self.imp);
        let slots = match pooled {
            true => quote!(slots: #p::PoolSlots::unbounded(),),
            false => quote!(),
        };
        quote! {
            /// A server answering with `imp`.
            #vis fn new(imp: #imp) -> Self
            where
                #imp: ::core::marker::Sized,
            {
                Self::from_arc(#p::Arc::new(imp))
            }

            /// A server answering with an implementation the program shares: its state stays
            /// reachable through the other handles while the server runs.
            #vis fn from_arc(imp: #p::Arc<#imp>) -> Self {
                Self { imp, #slots }
            }
        }
    }

    /// The server's match arm for `m`: run the implementation (followed by `then`, e.g.
    /// `.await`) with the request's fields, and wrap its result in the response variant.
    fn dispatch_arm(&self, m: &Method, then: TokenStream) -> TokenStream {
        let (name, request, response) = (&self.iface.name, &self.request, &self.response);
        let (variant, method) = (&m.variant, &m.name);
        let names: Vec<&Ident> = m.args.iter().map(|a| &a.name).collect();
        let pattern = match names.is_empty() {
            true => quote!(#request::#variant),
            false => quote!(#request::#variant { #(#names),* }),
        };
        let imp = &self.imp;
        let run = quote!(<#imp as #name>::#method(&*self.imp, #(#names),*)#then);
        match (&m.ret, m.oneway) {
            (_, true) => quote! {
                #pattern => {
                    #run;
                    ::core::option::Option::None
                }
            },
            (None, false) => quote! {
                #pattern => {
                    #run;
                    ::core::option::Option::Some(#response::#variant)
                }
            },
            (Some(_), false) => {
                quote!(#pattern => ::core::option::Option::Some(#response::#variant(#run)),)
            }
        }
    }
}

/// `MyService` → `MY_SERVICE`, `HTTPServer` → `HTTP_SERVER`.
fn screaming_snake(camel: &str) -> String {
    let chars: Vec<char> = camel.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let prev = i.checked_sub(1).map(|j| chars[j]);
        let next = chars.get(i + 1);
        let boundary = c.is_uppercase()
            && prev.is_some_and(|p| {
                p.is_lowercase()
                    || p.is_numeric()
                    || (p.is_uppercase() && next.is_some_and(|n| n.is_lowercase()))
            });
        if boundary && !out.ends_with('_') {
            out.push('_');
        }
        out.extend(c.to_uppercase());
    }
    out
}

/// `m`'s shape, `typed_ipc::shape::method` of its parameters' and result's, as they travel: a
/// `Vec<u8>` as a byte string; an `Option<Vec<u8>>` or `Result<Vec<u8>, E>` as the shape of
/// its `CarriedBytes` (an `Option` or `Result` of a byte string, distinct from the serde
/// form's `Option` or `Result` of a sequence of `u8`s, as the bytes on the wire are); the
/// rest as their types' `Shape`s (a missing one is reported at the type).
fn method_shape(m: &Method) -> TokenStream {
    let p = private();
    let shape = |value: &crate::model::Value| match value.wire {
        Wire::Bytes => quote!(#p::shape::BYTE_STRING),
        Wire::CarriedBytes => {
            let ty = &value.ty;
            quote_spanned!(ty.span()=> <#p::CarriedBytes<#ty> as #p::Shape>::SHAPE)
        }
        Wire::Serde | Wire::Fd => {
            let ty = &value.ty;
            quote_spanned!(ty.span()=> <#ty as #p::Shape>::SHAPE)
        }
    };
    let params = m.args.iter().map(|a| shape(&a.value));
    let result = match &m.ret {
        Some(ret) => shape(ret),
        None => quote!(<() as #p::Shape>::SHAPE),
    };
    quote!(#p::shape::method(&[#(#params),*], #result))
}

/// A stub's generic parameters and parameter list: the trait method's, a `Vec<u8>` taken as
/// anything that converts into `CallBytes<'bytes>` ([`wire::stub_param_type`]). The lifetime
/// is named since an anonymous one in an argument's `impl Trait` is unstable.
fn stub_params(m: &Method) -> (Option<TokenStream>, Vec<TokenStream>) {
    let lifetime = quote!('bytes);
    let borrows = m.args.iter().any(|a| a.value.wire == Wire::Bytes);
    let params = m
        .args
        .iter()
        .map(|a| {
            let (name, ty) = (&a.name, wire::stub_param_type(&a.value, &lifetime));
            quote!(#name: #ty)
        })
        .collect();
    (borrows.then(|| quote!(<#lifetime>)), params)
}

/// Whether rustc's `non_camel_case_types` leaves `name` alone, by its rule: once the
/// underscores around it are trimmed, no lowercase start, no `__`, and no underscore next to
/// a letter with case (`V1_2` is in style, `Foo_Bar` is not).
fn is_camel_case(name: &str) -> bool {
    let has_case = |c: char| c.to_lowercase().ne(c.to_uppercase());
    let name = name.trim_matches('_');
    let chars: Vec<char> = name.chars().collect();
    !chars.first().is_some_and(|c| c.is_lowercase())
        && !name.contains("__")
        && !chars
            .windows(2)
            .any(|w| has_case(w[0]) && w[1] == '_' || w[0] == '_' && has_case(w[1]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::ToTokens;

    /// The items an expansion defines, those inside the `async_client!`-style feature gates
    /// too.
    fn items(tokens: TokenStream) -> Vec<syn::Item> {
        let file: syn::File = syn::parse2(tokens).expect("the expansion parses");
        file.items
            .into_iter()
            .flat_map(|item| match item {
                syn::Item::Macro(m) => items(m.mac.tokens),
                other => vec![other],
            })
            .collect()
    }

    /// A `#[doc(hidden)]` trait's clients, servers, enums and info static are hidden too: they
    /// are what a program names to use it, and their docs link to the trait.
    #[test]
    fn a_hidden_trait_hides_what_is_generated_from_it() {
        let item = quote! {
            /// Internal.
            #[doc(hidden)]
            pub trait Internal {
                fn ping(&self) -> u32;
            }
        };
        let attr = quote!(async_client, async_server, check_types);
        let iface = crate::parse::interface(attr, item)
            .unwrap_or_else(|rejected| panic!("{}", rejected.error));
        let mut checked = 0;
        for item in items(Generator::new(&iface).expand()) {
            let (name, attrs) = match &item {
                syn::Item::Struct(s) => (s.ident.to_string(), &s.attrs),
                syn::Item::Enum(e) => (e.ident.to_string(), &e.attrs),
                syn::Item::Static(s) => (s.ident.to_string(), &s.attrs),
                syn::Item::Trait(t) => (t.ident.to_string(), &t.attrs),
                _ => continue,
            };
            let hidden = attrs.iter().any(|a| {
                a.path().is_ident("doc") && a.to_token_stream().to_string().contains("hidden")
            });
            assert!(hidden, "{name} is not hidden");
            checked += 1;
        }
        // The trait, the info static, the two enums, the two clients and the two servers.
        assert_eq!(checked, 8);
    }

    /// With `crate = "..."`, every path to typed-ipc in the expansion is the one given, in
    /// both flavours and every optional item: no `::typed_ipc` is left to fail in a crate that
    /// reaches typed-ipc only through a facade. Without it, the paths are `::typed_ipc`.
    #[test]
    fn the_crate_argument_names_typed_ipc_everywhere() {
        let blocking = quote! {
            pub trait Lab {
                fn echo(&self, data: Vec<u8>, fd: Option<OwnedFd>) -> Result<Vec<u8>, Oops>;
                #[oneway]
                fn note(&self, cfg: Config);
            }
        };
        let asynchronous = quote! {
            pub trait Lab {
                async fn echo(&self, data: Vec<u8>, fd: Option<OwnedFd>) -> Result<u8, Oops>;
                #[oneway]
                async fn note(&self, cfg: Config);
            }
        };
        let expand = |attr: TokenStream, item: &TokenStream| {
            let iface = crate::parse::interface(attr, item.clone())
                .unwrap_or_else(|rejected| panic!("{}", rejected.error));
            Generator::new(&iface).expand().to_string()
        };
        let cases = [
            (&blocking, quote!(async_client, async_server, check_types)),
            (&asynchronous, quote!(blocking_client, check_types)),
        ];
        for (item, args) in cases {
            let given = expand(quote!(crate = "::facade::ipc", #args), item);
            assert!(!given.contains("typed_ipc"), "{given}");
            assert!(given.contains(":: facade :: ipc :: __private"), "{given}");
            let default = expand(args, item);
            assert!(!default.contains("facade"), "{default}");
            assert!(default.contains(":: typed_ipc :: __private"), "{default}");
        }
        // And after an expansion that named another, the next names its own (`::typed_ipc`).
        assert!(expand(quote!(), &blocking).contains(":: typed_ipc ::"));
    }

    #[test]
    fn static_names() {
        assert_eq!(screaming_snake("Ipa"), "IPA");
        assert_eq!(screaming_snake("MyService"), "MY_SERVICE");
        assert_eq!(screaming_snake("HTTPServer"), "HTTP_SERVER");
        assert_eq!(screaming_snake("Ipa2Go"), "IPA2_GO");
        assert_eq!(screaming_snake("my_trait"), "MY_TRAIT");
    }
}
