//! The blocking flavour: the client and its stubs, and the server with its `dispatch` and
//! the `handle` that answers a call in one match.

use proc_macro2::{Ident, Span, TokenStream};
use quote::quote;

use super::bounds::names;
use super::wire::{decode_pattern, decode_type, encode, encode_arg, encode_owned};
use super::{Generator, cmd, doc, private, result, stub_params};
use crate::model::{Method, Wire};

/// Where a blocking trait's server runs the implementation.
#[derive(Clone, Copy)]
pub(super) enum Runs {
    /// On the thread that serves the call: the blocking server.
    Inline,
    /// On tokio's blocking pool, awaited: the async server of a blocking trait
    /// (`#[interface(async_server)]`).
    Pooled,
}

impl Generator<'_> {
    /// `<Trait>Client` of a blocking trait (or `<Trait>BlockingClient` of an async one,
    /// `client`): the stub, one method per trait method.
    pub(super) fn client(&self, client: &Ident) -> TokenStream {
        let stubs: Vec<_> = self.iface.methods.iter().map(|m| self.stub(m)).collect();
        let (name, note) = (&self.iface.name, self.other_client_note(client));
        let docs = format!(
            "The client side of [`{name}`]: each method calls the implementation at the other \
             end of the connection and waits for its reply (a `#[oneway]` method only sends).\n\n\
             Clones share the connection.{note}"
        );
        self.client_item(client, quote!(Connection), &docs, "", &stubs)
    }

    /// The client method for `m`: same name and parameters (a `Vec<u8>` taken as anything
    /// that converts into `CallBytes`), the result wrapped.
    fn stub(&self, m: &Method) -> TokenStream {
        let (p, vis, info, method) = (private(), &self.iface.vis, &self.info, &m.name);
        let (docs, (generics, params)) = (self.stub_docs(m), stub_params(m));
        let args = m
            .args
            .iter()
            .map(|a| encode_arg(&a.name, &a.value, m.oneway));
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
                    Wire::CarriedBytes => quote!(#call.map(|#p::CarriedBytes(value)| value)),
                };
                (quote!(#ty), body)
            }
        };
        let ret = result(ret);
        let serde = self.stub_bounds(m);
        quote! {
            #docs
            #vis fn #method #generics(&self, #(#params),*) -> #ret #serde {
                #body
            }
        }
    }

    /// The match arm of a blocking trait's `handle` for `m`: decode the arguments, run the
    /// implementation where `runs` says, send its reply. The arguments are bound inside a block
    /// that only runs the implementation, so a parameter named like one of ours (`call`,
    /// `value`) cannot shadow it where it is used. Their types are spelled out (see
    /// [`Generator::args_type`]): left to inference, they would be taken from the server's
    /// `where` clause when another method's tuple parameter has as many elements (`where (u8,
    /// String): DeserializeOwned` would make `resize(w: u32, h: u64)` decode a `u8` and a
    /// `String`, and not compile). On the pool, the implementation's handle in the closure is
    /// hygienic (`Span::mixed_site`), so a parameter named `imp` is the parameter.
    pub(super) fn handle_arm(&self, m: &Method, runs: Runs) -> TokenStream {
        let (p, name, method, cmd) = (private(), &self.iface.name, &m.name, cmd(m));
        let pats = m.args.iter().map(|a| decode_pattern(&a.name, &a.value));
        let tys = self.args_type(m);
        let names: Vec<&Ident> = m.args.iter().map(|a| &a.name).collect();
        let imp = &self.imp;
        let (run, then, unit) = match runs {
            Runs::Inline => (
                quote!(<#imp as #name>::#method(&*self.imp, #(#names),*)),
                quote!(),
                quote!(&()),
            ),
            Runs::Pooled => {
                let this = Ident::new("imp", Span::mixed_site());
                let shared = quote!(::core::clone::Clone::clone(&self.imp));
                let run = quote! {
                    #p::run_blocking(#shared, &self.slots, move |#this: &#imp| {
                        <#imp as #name>::#method(#this, #(#names),*)
                    })
                    .await
                };
                (run, quote!(.await), quote!(()))
            }
        };
        let run = quote! {{
            let (#(#pats,)*): #tys = call.args()?;
            #run
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
                    call.reply(#unit)#then
                }
            },
            (Some(ret), false) if ret.wire == Wire::Bytes => quote! {
                #cmd => {
                    let value = #run;
                    call.reply_bytes(value)#then
                }
            },
            (Some(ret), false) => {
                let reply = match runs {
                    Runs::Inline => encode(quote!(&value), ret.wire),
                    Runs::Pooled => encode_owned(quote!(value), ret.wire),
                };
                quote! {
                    #cmd => {
                        let value = #run;
                        call.reply(#reply)#then
                    }
                }
            }
        }
    }

    /// The type `m`'s arguments decode as, in the server: the tuple of their decoded types,
    /// but `_` for a type that names the server's type parameter (a user type named `T`, which
    /// there would mean the parameter), left to inference from the method's signature.
    fn args_type(&self, m: &Method) -> TokenStream {
        let p = private();
        let tys = m.args.iter().map(|a| {
            let ty = &a.value.ty;
            if !quote!(#ty).into_iter().any(|t| names(&t, &self.imp)) {
                return decode_type(&a.value);
            }
            match a.value.wire {
                Wire::Serde => quote!(_),
                Wire::Fd => quote!(#p::Fd<_>),
                Wire::Bytes => quote!(#p::Bytes<_>),
                Wire::CarriedBytes => quote!(#p::CarriedBytes<_>),
            }
        });
        quote!((#(#tys,)*))
    }

    /// `<Trait>Server`: holds the implementation and dispatches requests to it.
    pub(super) fn server(&self) -> TokenStream {
        let (p, vis, server, name) = (private(), &self.iface.vis, &self.server, &self.iface.name);
        let (info, request, response) = (&self.info, &self.request, &self.response);
        // The arms bind the user's parameter names, so nothing of ours may be in scope there
        // but `self` (a parameter named `call` must not shadow the call being answered).
        let arms = self
            .iface
            .methods
            .iter()
            .map(|m| self.dispatch_arm(m, quote!()));
        let handle_arms = self
            .iface
            .methods
            .iter()
            .map(|m| self.handle_arm(m, Runs::Inline));
        let (imp, name_lints) = (&self.imp, self.user_name_lints());
        let bounds = self.server_bounds_on_imp();
        let decodable = self.server_bounds();
        let ret_unit = result(quote!(()));
        let docs = doc(format!(
            "The server side of [`{name}`]: answers each request on a connection by calling \
             the implementation it holds."
        ));
        let server_struct = self.server_struct(server, docs, false);
        let constructors = self.server_constructors(false);
        quote! {
            #server_struct

            // The trait and its methods are the user's to deprecate (and to name): calling them
            // here is no use of the user's.
            #[allow(dead_code, deprecated #name_lints)]
            impl<#imp: #bounds> #server<#imp> {
                #constructors

                /// Answers the requests that arrive on `connection` until the peer hangs up;
                /// `Ok(())` when it closes cleanly. It answers them on this thread, one at a
                /// time, in the order they came: a slow call holds up the calls behind it.
                /// For several at once, serve it on a pool of threads:
                /// `Server::new().service(server).threads(n).serve(&connection)`.
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

            #[allow(deprecated #name_lints)]
            impl<#imp: #bounds> #p::Service for #server<#imp> #decodable {
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
}
