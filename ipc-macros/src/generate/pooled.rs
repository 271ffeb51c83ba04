//! `#[interface(async_server)]`: the async server of a blocking trait, for a tokio program
//! that serves an interface declared with `fn`s (a trait shared with blocking workers). It
//! decodes and replies on the connection's tasks, as the async server does, and runs each
//! method on tokio's blocking pool, where a blocking implementation belongs.

use proc_macro2::TokenStream;
use quote::quote;

use super::blocking::Runs;
use super::{Generator, doc, private};

impl Generator<'_> {
    /// `<Trait>AsyncServer` of a blocking trait.
    pub(super) fn pooled_server(&self) -> TokenStream {
        let (p, vis) = (private(), &self.iface.vis);
        let (server, name, imp) = (&self.async_server, &self.iface.name, &self.imp);
        let name_lints = self.user_name_lints();
        let arms = self
            .iface
            .methods
            .iter()
            .map(|m| self.handle_arm(m, Runs::Pooled));
        let bounds = self.server_bounds_on_imp();
        let docs = doc(format!(
            "The async server of [`{name}`], for a tokio program: answers each request on an \
             async connection by running the blocking implementation it holds on tokio's \
             blocking pool, concurrently with the others (oneways one at a time, in order). A \
             cancelled call's method runs on to its end, as on a blocking server."
        ));
        let server_struct = self.server_struct(server, docs, true);
        let constructors = self.server_constructors(true);
        let serve = self.async_serve();
        let service = self.async_service(
            server,
            quote! {
                match call.command() {
                    #(#arms)*
                    _ => ::core::result::Result::Err(call.unknown_command()),
                }
            },
        );
        quote! {
            #server_struct

            // As in the blocking server: calling the user's deprecated items is no use of theirs.
            #[allow(dead_code, deprecated #name_lints)]
            impl<#imp: #bounds> #server<#imp> {
                #constructors

                /// This server with at most `n` of its methods running at once on tokio's
                /// blocking pool, across every connection it and its clones serve (by
                /// default, as many as the pool has threads). Later calls wait for a slot,
                /// and a call cancelled while it waits is dropped unrun. A method that waits
                /// for other calls of this server to run holds its slot meanwhile: one that
                /// blocks on the server's shutdown (`block_on(serving.shutdown())`), which
                /// waits for the calls queued for a slot, waits for good once all `n` are
                /// taken: have it spawn the shutdown into a task and return.
                #vis fn max_running(self, n: usize) -> Self {
                    Self {
                        slots: #p::PoolSlots::new(n),
                        ..self
                    }
                }

                #serve
            }

            #service
        }
    }
}
