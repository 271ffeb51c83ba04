//! The async flavour: the trait rewritten to return `Send` futures, the client and its
//! `async fn` stubs over an `AsyncConnection`, and the server that awaits the implementation.

use proc_macro2::{Ident, Span, TokenStream};
use quote::quote;
use syn::{ReturnType, TraitItem, parse_quote, parse_quote_spanned};

use super::wire::{decode_type, encode_arg};
use super::{Generator, cmd, doc, private, result, stub_params};
use crate::model::{Method, Wire};

impl Generator<'_> {
    /// The trait of the async flavour: each `async fn m(&self, ..) -> R` becomes
    /// `fn m(&self, ..) -> impl Future<Output = R> + Send`, which an implementation still
    /// writes as `async fn`, and whose futures the server can spawn. A default body becomes an
    /// `async move` block, and its method gets `where Self: Sync`.
    pub(super) fn async_trait(&self) -> TokenStream {
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
                // The block holds `&self`, which is `Send` only if `Self` is `Sync` (as every
                // implementation the server serves is).
                let clause = f.sig.generics.make_where_clause();
                clause
                    .predicates
                    .push(parse_quote!(Self: ::core::marker::Sync));
            }
        }
        quote!(#item)
    }

    /// `<Trait>Client` of the async flavour (or `<Trait>AsyncClient` of a blocking trait,
    /// `client`): `async fn` stubs over an `AsyncConnection`.
    pub(super) fn async_client(&self, client: &Ident) -> TokenStream {
        let stubs: Vec<_> = self
            .iface
            .methods
            .iter()
            .map(|m| self.async_stub(m))
            .collect();
        let (name, note) = (&self.iface.name, self.other_client_note(client));
        let docs = format!(
            "The client side of [`{name}`]: each method calls the implementation at the other \
             end of the connection and resolves to its reply (a `#[oneway]` method resolves \
             once the message is sent). Dropping a call's future cancels the call.\n\n\
             Clones share the connection.{note}"
        );
        self.client_item(
            client,
            quote!(AsyncConnection),
            &docs,
            "\nThe runtime needs its time driver.",
            &stubs,
        )
    }

    /// The async client method for `m`: same name and parameters (a `Vec<u8>` taken as
    /// anything that converts into `CallBytes`), the result wrapped.
    fn async_stub(&self, m: &Method) -> TokenStream {
        let (p, vis, info, method) = (private(), &self.iface.vis, &self.info, &m.name);
        let (docs, (generics, params)) = (self.stub_docs(m), stub_params(m));
        // The arguments are moved into the call's future (fds borrowed: they are closed when
        // the stub's future ends), so that it is `Send` whenever they are.
        let args = m
            .args
            .iter()
            .map(|a| encode_arg(&a.name, &a.value, m.oneway));
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
                    Wire::CarriedBytes => quote!(#call.map(|#p::CarriedBytes(value)| value)),
                };
                (quote!(#ty), body)
            }
        };
        let ret = result(ret);
        let serde = self.stub_bounds(m);
        quote! {
            #docs
            #vis async fn #method #generics(&self, #(#params),*) -> #ret #serde {
                #body
            }
        }
    }

    /// `<Trait>Server` of the async flavour: holds the implementation, and answers each request
    /// by awaiting it.
    pub(super) fn async_server(&self) -> TokenStream {
        let (vis, server, name) = (&self.iface.vis, &self.server, &self.iface.name);
        let (request, response) = (&self.request, &self.response);
        // As in the blocking server: nothing of ours in scope in the arms but `self`.
        let arms = self
            .iface
            .methods
            .iter()
            .map(|m| self.dispatch_arm(m, quote!(.await)));
        let (imp, name_lints) = (&self.imp, self.user_name_lints());
        let bounds = self.server_bounds_on_imp();
        let docs = doc(format!(
            "The server side of [`{name}`]: answers each request on a connection by awaiting \
             the implementation it holds, concurrently with the others."
        ));
        let server_struct = self.server_struct(server, docs, false);
        let constructors = self.server_constructors(false);
        let serve = self.async_serve();
        let service = self.async_service(
            server,
            quote! {
                match self.dispatch(#request::decode(call)?).await {
                    ::core::option::Option::Some(response) => response.send(call).await,
                    ::core::option::Option::None => ::core::result::Result::Ok(()),
                }
            },
        );
        quote! {
            #server_struct

            // The trait and its methods are the user's to deprecate (and to name): calling them
            // here is no use of the user's.
            #[allow(dead_code, deprecated #name_lints)]
            impl<#imp: #bounds> #server<#imp> {
                #constructors

                #serve

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

            #service
        }
    }
    /// The `serve` method of an async server.
    pub(super) fn async_serve(&self) -> TokenStream {
        let (p, vis) = (private(), &self.iface.vis);
        let (ret_unit, decodable) = (result(quote!(())), self.server_bounds());
        quote! {
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
        }
    }

    /// The runtime's `AsyncService` for `server`, whose `handle` is `body` (in an
    /// `async move` block that has `self` and `call`).
    pub(super) fn async_service(&self, server: &Ident, body: TokenStream) -> TokenStream {
        let (p, info, imp) = (private(), &self.info, &self.imp);
        let (bounds, decodable) = (self.server_bounds_on_imp(), self.server_bounds());
        let (ret_unit, name_lints) = (result(quote!(())), self.user_name_lints());
        quote! {
            #[allow(deprecated #name_lints)]
            impl<#imp: #bounds> #p::AsyncService for #server<#imp> #decodable {
                fn info(&self) -> &'static #p::InterfaceInfo {
                    &#info
                }

                fn handle<'a>(
                    &'a self,
                    call: &'a mut #p::AsyncCall,
                ) -> #p::BoxFuture<'a, #ret_unit> {
                    #p::boxed(async move { #body })
                }
            }
        }
    }
}
