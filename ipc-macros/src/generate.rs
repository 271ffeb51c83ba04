//! From the [`Interface`] model to Rust. [`Generator`] computes the generated names once and
//! has one method per emitted item; [`Generator::expand`] joins them. The two flavours share
//! the interface description and the request and response enums (the wire format), and differ
//! in the client, the server and the one method of each enum that touches a call: the async
//! flavour's are [`Generator::async_client`], [`Generator::async_server`] and friends.
//!
//! Every path in the output is absolute (`::typed_ipc::__private::…`, `::core::…`), so that
//! the user's own `Result`, `Option`, `core` or `std` cannot capture it; the user's types are
//! emitted as written, to resolve in the user's scope.

use proc_macro2::{Ident, Literal, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::{LitByteStr, ReturnType, TraitItem, parse_quote, parse_quote_spanned};

use crate::model::{Flavour, Interface, Method, Value, Wire};

/// The generated code of one interface.
pub struct Generator<'a> {
    iface: &'a Interface,
    /// `<Trait>Client`.
    client: Ident,
    /// `<Trait>Server`.
    server: Ident,
    /// `<Trait>Request`.
    request: Ident,
    /// `<Trait>Response`.
    response: Ident,
    /// `<TRAIT>_INFO`, the `InterfaceInfo` static.
    info: Ident,
}

/// Where the generated code finds the runtime.
fn private() -> TokenStream {
    quote!(::typed_ipc::__private)
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
            server: format_ident!("{}Server", name),
            request: format_ident!("{}Request", name),
            response: format_ident!("{}Response", name),
            info: format_ident!("{}_INFO", screaming, span = name.span()),
        }
    }

    /// The trait, followed by everything generated from it.
    pub fn expand(&self) -> TokenStream {
        match self.iface.flavour {
            Flavour::Blocking => {
                let item = &self.iface.item;
                let items = [
                    self.info_static(),
                    self.request_enum(),
                    self.response_enum(),
                    self.client(),
                    self.server(),
                ];
                quote!(#item #(#items)*)
            }
            Flavour::Async => {
                let (p, item) = (private(), self.async_trait());
                let items = [
                    self.info_static(),
                    self.request_enum(),
                    self.response_enum(),
                    self.async_client(),
                    self.async_server(),
                ];
                // Without the `tokio` feature, `async_interface!` is one clear error instead of
                // the generated items (which name what only that feature provides).
                quote!(#item #p::async_interface! { #(#items)* })
            }
        }
    }

    /// The trait of the async flavour: each `async fn m(&self, ..) -> R` becomes
    /// `fn m(&self, ..) -> impl Future<Output = R> + Send`, which an implementation still
    /// writes as `async fn`, and whose futures the server can spawn. A default body becomes an
    /// `async move` block.
    fn async_trait(&self) -> TokenStream {
        let mut item = self.iface.item.clone();
        for trait_item in &mut item.items {
            let TraitItem::Fn(f) = trait_item else {
                continue;
            };
            // At the `async` keyword: where rustc points when an implementation's future is
            // not `Send`.
            let span = f.sig.asyncness.take().map_or(Span::call_site(), |a| a.span);
            let output = match &f.sig.output {
                ReturnType::Default => quote!(()),
                ReturnType::Type(_, ty) => quote!(#ty),
            };
            f.sig.output = parse_quote_spanned! {span=>
                -> impl ::core::future::Future<Output = #output> + ::core::marker::Send
            };
            if let Some(body) = &f.default {
                f.default = Some(parse_quote!({ async move #body }));
            }
        }
        quote!(#item)
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
        let methods = self.iface.methods.iter().map(|m| {
            let (name, cmd, signature, oneway) =
                (m.name.unraw().to_string(), cmd(m), &m.signature, m.oneway);
            quote! {
                #p::MethodInfo { name: #name, cmd: #cmd, signature: #signature, oneway: #oneway }
            }
        });
        let docs = doc(format!(
            "What both ends of [`{name}`] compare before a call: its name, and every method's \
             command id and signature."
        ));
        quote! {
            #docs
            #[allow(dead_code)]
            #vis static #info: #p::InterfaceInfo = #p::InterfaceInfo {
                name: #name_text,
                id: #p::fnv1a(#name_bytes),
                signature: #p::fnv1a(#signature),
                methods: &[#(#methods),*],
            };
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
        quote! {
            #enum_docs
            #[allow(dead_code)]
            #vis enum #request {
                #(#variants,)*
            }

            #[allow(dead_code)]
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
                    #vis fn send(&self, call: &mut #p::Call<'_>) -> #ret_unit {
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
                    #vis async fn send(self, call: &mut #p::AsyncCall) -> #ret_unit {
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
        quote! {
            #enum_docs
            #[allow(dead_code)]
            #vis enum #response {
                #(#variants,)*
            }

            #[allow(dead_code)]
            impl #response {
                #send
            }
        }
    }

    /// `<Trait>Client`: the stub, one method per trait method.
    fn client(&self) -> TokenStream {
        let stubs: Vec<_> = self.iface.methods.iter().map(|m| self.stub(m)).collect();
        let name = &self.iface.name;
        let docs = format!(
            "The client side of [`{name}`]: each method calls the implementation at the other \
             end of the connection and waits for its reply (a `#[oneway]` method only sends).\n\n\
             Clones share the connection."
        );
        self.client_item(quote!(Connection), &docs, "", &stubs)
    }

    /// The client struct and its constructor, timeout and connection accessors around
    /// `stubs`, over `connection` (a type in the private module): shared by both flavours.
    fn client_item(
        &self,
        connection: TokenStream,
        docs: &str,
        timeout_note: &str,
        stubs: &[TokenStream],
    ) -> TokenStream {
        let (p, vis, client) = (private(), &self.iface.vis, &self.client);
        let docs = doc(docs.to_string());
        let with_timeout = doc(format!(
            "A copy of this client whose calls give up after `timeout` with `Error::TimedOut`:\n\
             a call that has no reply by then, and a `#[oneway]` message that cannot be sent\n\
             by then (the peer is not reading).{timeout_note}"
        ));
        quote! {
            #docs
            #[derive(::core::clone::Clone)]
            #[allow(dead_code)]
            #vis struct #client {
                connection: #p::#connection,
                timeout: ::core::option::Option<#p::Duration>,
            }

            // The stubs repeat the trait's parameter lists: the user's trait is where those
            // lints belong.
            #[allow(dead_code, clippy::too_many_arguments)]
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
        }
    }

    /// A stub's doc comment: the trait method's own, or a line naming it.
    fn stub_docs(&self, m: &Method) -> TokenStream {
        if m.docs.is_empty() {
            doc(format!(
                "Calls [`{}::{}`] on the server.",
                self.iface.name, m.name
            ))
        } else {
            let docs = &m.docs;
            quote!(#(#docs)*)
        }
    }

    /// The client method for `m`: same name and parameters, the result wrapped.
    fn stub(&self, m: &Method) -> TokenStream {
        let (p, vis, info, method) = (private(), &self.iface.vis, &self.info, &m.name);
        let (docs, params) = (self.stub_docs(m), stub_params(m));
        let args = m
            .args
            .iter()
            .map(|a| encode_arg(&a.name, a.value.wire, m.oneway));
        let cmd = cmd(m);
        let (ret, body) = match (&m.ret, m.oneway) {
            (_, true) => (
                quote!(()),
                quote!(self.connection.oneway(&#info, #cmd, &(#(#args,)*), self.timeout)),
            ),
            (None, false) => (
                quote!(()),
                quote!(self.connection.call::<_, ()>(&#info, #cmd, &(#(#args,)*), self.timeout)),
            ),
            (Some(ret), false) => {
                let (ty, decoded) = (&ret.ty, decode_type(ret));
                let call = quote! {
                    self.connection.call::<_, #decoded>(&#info, #cmd, &(#(#args,)*), self.timeout)
                };
                let body = match ret.wire {
                    Wire::Serde => call,
                    Wire::Fd => quote!(#call.map(|#p::Fd(value)| value)),
                    Wire::Bytes => quote!(#call.map(|#p::Bytes(value)| value)),
                };
                (quote!(#ty), body)
            }
        };
        let ret = result(ret);
        let serializable =
            serde_bounds(m.args.iter().map(|a| &a.value), Bound::Serialize, |_| true);
        quote! {
            #docs
            #vis fn #method(&self, #(#params),*) -> #ret #serializable {
                #body
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
        let run = quote!(<T as #name>::#method(&self.imp, #(#names),*)#then);
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

    /// The match arm of the blocking `handle` for `m`: decode the arguments, run the
    /// implementation, send its reply. The arguments are bound inside a block that only runs
    /// the implementation, so a parameter named like one of ours (`call`, `value`) cannot
    /// shadow it where it is used; their types are left to inference from the method's
    /// signature, since a user type named `T` would mean the server's type parameter here.
    fn handle_arm(&self, m: &Method) -> TokenStream {
        let (name, method, cmd) = (&self.iface.name, &m.name, cmd(m));
        let pats = m.args.iter().map(|a| decode_pattern(&a.name, &a.value));
        let names = m.args.iter().map(|a| &a.name);
        let run = quote! {{
            let (#(#pats,)*) = call.args()?;
            <T as #name>::#method(&self.imp, #(#names),*)
        }};
        match (&m.ret, m.oneway) {
            (_, true) => quote! {
                #cmd => {
                    #run;
                    ::core::result::Result::Ok(())
                }
            },
            (None, false) => quote! {
                #cmd => {
                    #run;
                    call.reply(&())
                }
            },
            (Some(ret), false) if ret.wire == Wire::Bytes => quote! {
                #cmd => {
                    let value = #run;
                    call.reply_bytes(value)
                }
            },
            (Some(ret), false) => {
                let reply = encode(quote!(&value), ret.wire);
                quote! {
                    #cmd => {
                        let value = #run;
                        call.reply(#reply)
                    }
                }
            }
        }
    }

    /// The server's `where` clause: every parameter type that travels as a plain serde value
    /// is `DeserializeOwned` (see [`serde_bounds`]). A type that names a `T` is left out: in the
    /// server's items it would mean the server's type parameter.
    fn server_bounds(&self) -> TokenStream {
        let params = self
            .iface
            .methods
            .iter()
            .flat_map(|m| m.args.iter().map(|a| &a.value));
        serde_bounds(params, Bound::DeserializeOwned, |ty| {
            !ty.clone().into_iter().any(|t| names_t(&t))
        })
    }

    /// `<Trait>Server`: owns the implementation and dispatches requests to it.
    fn server(&self) -> TokenStream {
        let (p, vis, server, name) = (private(), &self.iface.vis, &self.server, &self.iface.name);
        let (info, request, response) = (&self.info, &self.request, &self.response);
        // The arms bind the user's parameter names, so nothing of ours may be in scope there
        // but `self` (a parameter named `call` must not shadow the call being answered).
        let arms = self
            .iface
            .methods
            .iter()
            .map(|m| self.dispatch_arm(m, quote!()));
        let handle_arms = self.iface.methods.iter().map(|m| self.handle_arm(m));
        let bounds = quote!(#name + ::core::marker::Send + ::core::marker::Sync + 'static);
        let decodable = self.server_bounds();
        let ret_unit = result(quote!(()));
        let docs = doc(format!(
            "The server side of [`{name}`]: answers each request on a connection by calling \
             the implementation it owns."
        ));
        quote! {
            #docs
            #[allow(dead_code)]
            #vis struct #server<T> {
                imp: T,
            }

            #[allow(dead_code)]
            impl<T: #bounds> #server<T> {
                /// A server answering with `imp`.
                #vis fn new(imp: T) -> Self {
                    Self { imp }
                }

                /// Answers the requests that arrive on `connection` until the peer hangs up;
                /// `Ok(())` when it closes cleanly.
                #vis fn serve(self, connection: #p::Connection) -> #ret_unit #decodable {
                    connection.serve(self)
                }

                /// Runs `request` on the implementation: the response to send back, or `None`
                /// for a `#[oneway]` method.
                #vis fn dispatch(&self, request: #request) -> ::core::option::Option<#response> {
                    match request {
                        #(#arms)*
                    }
                }
            }

            impl<T: #bounds> #p::Service for #server<T> #decodable {
                fn info(&self) -> &'static #p::InterfaceInfo {
                    &#info
                }

                // What `dispatch(decode(call)?)` then `send` do, in one match: on the hot
                // path the request and response enums would only be built to be taken
                // apart again (measured: ~100 instructions a call).
                fn handle(&self, call: &mut #p::Call<'_>) -> #ret_unit {
                    match call.command() {
                        #(#handle_arms)*
                        _ => ::core::result::Result::Err(call.unknown_command()),
                    }
                }
            }
        }
    }
    /// `<Trait>Client` of the async flavour: `async fn` stubs over an `AsyncConnection`.
    fn async_client(&self) -> TokenStream {
        let stubs: Vec<_> = self
            .iface
            .methods
            .iter()
            .map(|m| self.async_stub(m))
            .collect();
        let name = &self.iface.name;
        let docs = format!(
            "The client side of [`{name}`]: each method calls the implementation at the other \
             end of the connection and resolves to its reply (a `#[oneway]` method resolves \
             once the message is sent). Dropping a call's future cancels the call.\n\n\
             Clones share the connection."
        );
        self.client_item(
            quote!(AsyncConnection),
            &docs,
            "\nThe runtime needs its time driver.",
            &stubs,
        )
    }

    /// The async client method for `m`: same name and parameters, the result wrapped.
    fn async_stub(&self, m: &Method) -> TokenStream {
        let (p, vis, info, method) = (private(), &self.iface.vis, &self.info, &m.name);
        let (docs, params) = (self.stub_docs(m), stub_params(m));
        // The arguments are moved into the call's future (fds borrowed: they are closed when
        // the stub's future ends), so that it is `Send` whenever they are.
        let args = m
            .args
            .iter()
            .map(|a| encode_arg(&a.name, a.value.wire, m.oneway));
        let cmd = cmd(m);
        let (ret, body) = match (&m.ret, m.oneway) {
            (_, true) => (
                quote!(()),
                quote!(self.connection.oneway(&#info, #cmd, (#(#args,)*), self.timeout).await),
            ),
            (None, false) => (
                quote!(()),
                quote! {
                    self.connection.call::<_, ()>(&#info, #cmd, (#(#args,)*), self.timeout).await
                },
            ),
            (Some(ret), false) => {
                let (ty, decoded) = (&ret.ty, decode_type(ret));
                let call = quote! {
                    self.connection
                        .call::<_, #decoded>(&#info, #cmd, (#(#args,)*), self.timeout)
                        .await
                };
                let body = match ret.wire {
                    Wire::Serde => call,
                    Wire::Fd => quote!(#call.map(|#p::Fd(value)| value)),
                    Wire::Bytes => quote!(#call.map(|#p::Bytes(value)| value)),
                };
                (quote!(#ty), body)
            }
        };
        let ret = result(ret);
        let serializable =
            serde_bounds(m.args.iter().map(|a| &a.value), Bound::Serialize, |_| true);
        quote! {
            #docs
            #vis async fn #method(&self, #(#params),*) -> #ret #serializable {
                #body
            }
        }
    }

    /// `<Trait>Server` of the async flavour: owns the implementation, and answers each request
    /// by awaiting it.
    fn async_server(&self) -> TokenStream {
        let (p, vis, server, name) = (private(), &self.iface.vis, &self.server, &self.iface.name);
        let (info, request, response) = (&self.info, &self.request, &self.response);
        // As in the blocking server: nothing of ours in scope in the arms but `self`.
        let arms = self
            .iface
            .methods
            .iter()
            .map(|m| self.dispatch_arm(m, quote!(.await)));
        let bounds = quote!(#name + ::core::marker::Send + ::core::marker::Sync + 'static);
        let decodable = self.server_bounds();
        let ret_unit = result(quote!(()));
        let docs = doc(format!(
            "The server side of [`{name}`]: answers each request on a connection by awaiting \
             the implementation it owns, concurrently with the others."
        ));
        quote! {
            #docs
            #[allow(dead_code)]
            #vis struct #server<T> {
                imp: T,
            }

            #[allow(dead_code)]
            impl<T: #bounds> #server<T> {
                /// A server answering with `imp`.
                #vis fn new(imp: T) -> Self {
                    Self { imp }
                }

                /// Starts answering the requests that arrive on `connection`, at once; the
                /// future resolves when the peer has hung up and every handler has finished
                /// (`Ok(())` on a clean close). Spawn it, or await it.
                #vis fn serve(
                    self,
                    connection: #p::AsyncConnection,
                ) -> impl ::core::future::Future<Output = #ret_unit>
                       + ::core::marker::Send
                       + 'static
                #decodable
                {
                    connection.serve(self)
                }

                /// Runs `request` on the implementation: the response to send back, or `None`
                /// for a `#[oneway]` method.
                #vis async fn dispatch(
                    &self,
                    request: #request,
                ) -> ::core::option::Option<#response> {
                    match request {
                        #(#arms)*
                    }
                }
            }

            impl<T: #bounds> #p::AsyncService for #server<T> #decodable {
                fn info(&self) -> &'static #p::InterfaceInfo {
                    &#info
                }

                fn handle<'a>(
                    &'a self,
                    call: &'a mut #p::AsyncCall,
                ) -> #p::BoxFuture<'a, #ret_unit> {
                    #p::boxed(async move {
                        match self.dispatch(#request::decode(call)?).await {
                            ::core::option::Option::Some(response) => response.send(call).await,
                            ::core::option::Option::None => ::core::result::Result::Ok(()),
                        }
                    })
                }
            }
        }
    }
}

/// What [`serde_bounds`] asks of a type.
#[derive(Clone, Copy)]
enum Bound {
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
/// `values` that travel as plain serde values and that `keep` accepts (given the type's tokens);
/// nothing if there are none.
///
/// The arguments travel as one tuple, and a tuple that is not serde is reported where it is
/// encoded or decoded, which in generated code is `#[interface]`. With the bound spelled out,
/// spanned at the type, a type that is not serde is reported at the type, in the trait; the
/// code inside can then rely on the bound.
fn serde_bounds<'v>(
    values: impl IntoIterator<Item = &'v Value>,
    bound: Bound,
    keep: impl Fn(&TokenStream) -> bool,
) -> TokenStream {
    let mut seen = Vec::new();
    let mut predicates = Vec::new();
    for value in values.into_iter().filter(|v| v.wire == Wire::Serde) {
        let ty = &value.ty;
        let tokens = quote!(#ty);
        let spelled = tokens.to_string();
        if seen.contains(&spelled) || ALWAYS_SERDE.contains(&&*spelled) || !keep(&tokens) {
            continue;
        }
        seen.push(spelled);
        // At the type's last token, so that the predicate covers the type as written.
        let span = match tokens.clone().into_iter().last() {
            Some(TokenTree::Group(g)) => g.span_close(),
            Some(other) => other.span(),
            None => Span::call_site(),
        };
        predicates.push(match bound {
            Bound::Serialize => quote_spanned!(span=> #ty: ::typed_ipc::__private::Serialize),
            Bound::DeserializeOwned => {
                quote_spanned!(span=> #ty: ::typed_ipc::__private::DeserializeOwned)
            }
        });
    }
    match predicates.is_empty() {
        true => TokenStream::new(),
        false => quote!(where #(#predicates,)*),
    }
}

/// Whether `token` is, or contains, the identifier `T`.
fn names_t(token: &TokenTree) -> bool {
    match token {
        TokenTree::Ident(ident) => ident == "T",
        TokenTree::Group(g) => g.stream().into_iter().any(|t| names_t(&t)),
        _ => false,
    }
}

/// A value the async flavour owns, wrapped for the codec and taken by value: `value`,
/// `Fd(&value)` (the fds stay with `value`, which outlives the send) or `Bytes(value)`.
fn encode_owned(value: TokenStream, wire: Wire) -> TokenStream {
    let p = private();
    match wire {
        Wire::Serde => value,
        Wire::Fd => quote!(#p::Fd(&#value)),
        Wire::Bytes => quote!(#p::Bytes(#value)),
    }
}

/// A reference to a value, wrapped for the codec: `value`, `Fd(value)` or `Bytes(value)`.
fn encode(value: TokenStream, wire: Wire) -> TokenStream {
    let p = private();
    match wire {
        Wire::Serde => value,
        Wire::Fd => quote!(&#p::Fd(#value)),
        Wire::Bytes => quote!(&#p::Bytes(#value)),
    }
}

/// A client argument in the tuple that is sent: moved in, or borrowed into its wrapper (the
/// parameter lives until the message is sent, and an fd is closed after). A call's `Vec<u8>`
/// is moved into `CallBytes`, which the connection may pipe (it then keeps the bytes until
/// the peer has read them).
fn encode_arg(name: &Ident, wire: Wire, oneway: bool) -> TokenStream {
    let p = private();
    match wire {
        Wire::Serde => quote!(#name),
        Wire::Fd => quote!(#p::Fd(&#name)),
        Wire::Bytes if oneway => quote!(#p::Bytes(&#name)),
        Wire::Bytes => quote!(#p::CallBytes::from(#name)),
    }
}

/// The type a value is decoded as: `T`, `Fd<T>` or `Bytes<T>`.
fn decode_type(value: &Value) -> TokenStream {
    let (p, ty) = (private(), &value.ty);
    match value.wire {
        Wire::Serde => quote!(#ty),
        Wire::Fd => quote!(#p::Fd<#ty>),
        Wire::Bytes => quote!(#p::Bytes<#ty>),
    }
}

/// The pattern that unwraps a decoded value into `name`.
fn decode_pattern(name: &Ident, value: &Value) -> TokenStream {
    let p = private();
    match value.wire {
        Wire::Serde => quote!(#name),
        Wire::Fd => quote!(#p::Fd(#name)),
        Wire::Bytes => quote!(#p::Bytes(#name)),
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

/// A stub's parameter list: the trait method's, as written.
fn stub_params(m: &Method) -> Vec<TokenStream> {
    m.args
        .iter()
        .map(|a| {
            let (name, ty) = (&a.name, &a.value.ty);
            quote!(#name: #ty)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_names() {
        assert_eq!(screaming_snake("Ipa"), "IPA");
        assert_eq!(screaming_snake("MyService"), "MY_SERVICE");
        assert_eq!(screaming_snake("HTTPServer"), "HTTP_SERVER");
        assert_eq!(screaming_snake("Ipa2Go"), "IPA2_GO");
        assert_eq!(screaming_snake("my_trait"), "MY_TRAIT");
    }
}
