//! From the trait as written to the [`Interface`] model. Every shape the generator cannot serve
//! is rejected here, at its span, with a message that says what to write instead; the rest of
//! the crate can then assume a well-formed interface.

use proc_macro2::{Ident, Span, TokenStream};
use quote::{ToTokens, format_ident};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{
    Attribute, FnArg, GenericParam, Item, ItemTrait, LitInt, Meta, Pat, PatWild, ReturnType, Token,
    TraitBoundModifier, TraitItem, TraitItemFn, Type, TypeParamBound, WhereClause, WherePredicate,
};

use crate::model::{Arg, Flavour, Interface, Method, Value};
use crate::types::{self, Role};

/// The input could not become an [`Interface`]: `item` is what to emit in its place (the
/// trait minus our attributes, so that no second wave of errors follows), `error` says why.
pub struct Rejected {
    /// The item to emit alongside the error.
    pub item: TokenStream,
    /// Every error found, combined.
    pub error: syn::Error,
}

/// Parses `#[interface(<attr>)] <item>`.
pub fn interface(attr: TokenStream, item: TokenStream) -> Result<Interface, Rejected> {
    let mut item = match syn::parse2::<Item>(item.clone()) {
        Ok(Item::Trait(item)) => item,
        Ok(_) => {
            let message = "#[interface] goes on a trait: \
                           `#[interface] pub trait Name { fn method(&self, arg: T) -> R; }`";
            let error = syn::Error::new(Span::call_site(), message);
            return Err(Rejected { item, error });
        }
        Err(error) => return Err(Rejected { item, error }),
    };
    let mut errors = Errors::default();
    let args = Args::parse(attr, &mut errors);
    let wire_name = args.wire_name(&mut errors);
    let wire_name = wire_name.unwrap_or_else(|| item.ident.unraw().to_string());
    let methods = methods(&mut item, &mut errors);
    let flavour = flavour(&item, &mut errors);
    let other_client = args.other_client(flavour, &item.ident, &mut errors);
    let async_server = args.async_server(flavour, &item.ident, &mut errors);
    // (A trait that mixes `fn` and `async fn` is refused already; the rest of its errors are
    // those of an async trait.)
    let flavour = flavour.unwrap_or(Flavour::Async);
    let deprecated = item
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("deprecated"))
        .cloned()
        .collect();
    let hidden = item.attrs.iter().any(is_doc_hidden);
    match errors.0 {
        None => Ok(Interface {
            wire_name,
            name: item.ident.clone(),
            vis: item.vis.clone(),
            flavour,
            other_client,
            async_server,
            check_types: args.check_types.is_some(),
            krate: args.krate,
            deprecated,
            hidden,
            methods,
            item,
        }),
        Some(error) => {
            // Two methods of one name would add rustc's E0428 to our error, unless they are
            // alternatives under `#[cfg]`, which stays for rustc to apply.
            let mut names = std::collections::HashSet::new();
            item.items.retain(|i| match i {
                TraitItem::Fn(f) if !f.attrs.iter().any(|a| a.path().is_ident("cfg")) => {
                    names.insert(f.sig.ident.unraw())
                }
                _ => true,
            });
            Err(Rejected {
                item: item.into_token_stream(),
                error,
            })
        }
    }
}

/// Whether `attr` is `#[doc(hidden)]` (among other `doc(..)` items, as rustdoc reads it).
fn is_doc_hidden(attr: &Attribute) -> bool {
    let mut hidden = false;
    if attr.path().is_ident("doc") {
        // (`doc = ".."` is no list: an error here only says the attribute is not ours.)
        let _ = attr.parse_nested_meta(|meta| {
            hidden |= meta.path.is_ident("hidden");
            if meta.input.peek(Token![=]) {
                meta.value()?.parse::<syn::Expr>()?;
            }
            Ok(())
        });
    }
    hidden
}

/// The longest name `#[interface(name = "...")]` takes: it travels in error replies and
/// traces, so it stays a name, not a document.
const MAX_WIRE_NAME: usize = 128;

/// What `#[interface(...)]` says, as written: checked against the trait once it is parsed.
#[derive(Default)]
struct Args {
    /// `name = "..."`.
    name: Option<syn::LitStr>,
    /// `async_client` or `blocking_client`: which, and where it is written.
    other_client: Option<(Flavour, Ident)>,
    /// `check_types`: where it is written, if it is.
    check_types: Option<Ident>,
    /// `async_server`: where it is written, if it is.
    async_server: Option<Ident>,
    /// `crate = "..."`: the path to typed-ipc.
    krate: Option<syn::Path>,
}

/// What an unknown argument is told.
const USAGE: &str = "#[interface] takes these optional arguments: `name = \"org.example.Ipa\"` \
                     (the interface's name on the wire), `async_client` on a trait of \
                     `fn`s or `blocking_client` on a trait of `async fn`s (a client of the \
                     other flavour too), `async_server` on a trait of `fn`s (an async server \
                     running the blocking implementation on tokio's blocking pool), \
                     `check_types` (the interface check covers the definitions of the types \
                     too), and `crate = \"::my_facade::typed_ipc\"` (the path to typed-ipc, in \
                     a crate that reaches it through a facade or under another name): \
                     `#[interface(name = \"org.example.Ipa\", async_client)]`";

impl Args {
    /// The arguments, each known and given once (`errors` says what is not).
    fn parse(attr: TokenStream, errors: &mut Errors) -> Args {
        let mut args = Args::default();
        if attr.is_empty() {
            return args;
        }
        let parser = syn::meta::parser(|meta| {
            let client_flavour = if meta.path.is_ident("name") {
                return args.parse_name(meta);
            } else if meta.path.is_ident("crate") {
                return args.parse_crate(meta);
            } else if meta.path.is_ident("check_types") {
                return Args::flag(&mut args.check_types, meta);
            } else if meta.path.is_ident("async_server") {
                return Args::flag(&mut args.async_server, meta);
            } else if meta.path.is_ident("async_client") {
                Flavour::Async
            } else if meta.path.is_ident("blocking_client") {
                Flavour::Blocking
            } else {
                return Err(meta.error(USAGE));
            };
            let ident = meta.path.require_ident()?.clone();
            if !meta.input.is_empty() && !meta.input.peek(Token![,]) {
                let message = format!("`{ident}` takes no value: write `#[interface({ident})]`");
                return Err(meta.error(message));
            }
            match &args.other_client {
                Some((_, first)) if *first == ident => {
                    Err(meta.error(format!("`{ident}` is given twice")))
                }
                Some((_, first)) => Err(meta.error(format!(
                    "`{first}` and `{ident}` cannot both be given: the trait's own client is of \
                     its flavour already; keep the one that asks for the other flavour \
                     (`async_client` on a trait of `fn`s, `blocking_client` on a trait of \
                     `async fn`s)"
                ))),
                None => {
                    args.other_client = Some((client_flavour, ident));
                    Ok(())
                }
            }
        });
        if let Err(error) = syn::parse::Parser::parse2(parser, attr) {
            errors.push(error);
            // The arguments are wrong as written: nothing more is said about them.
            args = Args::default();
        }
        args
    }

    /// `crate = "path"`: the path the generated code names typed-ipc by, for a crate that
    /// reaches it through a facade or under another name (as serde's `crate` attribute).
    fn parse_crate(&mut self, meta: syn::meta::ParseNestedMeta<'_>) -> syn::Result<()> {
        if self.krate.is_some() {
            return Err(meta.error("`crate` is given twice"));
        }
        self.krate = Some(crate::krate::parse(&meta)?);
        Ok(())
    }

    /// A bare word (`check_types`, `async_server`) into `slot`: it takes no value, and is
    /// given once.
    fn flag(slot: &mut Option<Ident>, meta: syn::meta::ParseNestedMeta<'_>) -> syn::Result<()> {
        let ident = meta.path.require_ident()?.clone();
        if !meta.input.is_empty() && !meta.input.peek(Token![,]) {
            let message = format!("`{ident}` takes no value: write `#[interface({ident})]`");
            return Err(meta.error(message));
        }
        if slot.is_some() {
            return Err(meta.error(format!("`{ident}` is given twice")));
        }
        *slot = Some(ident);
        Ok(())
    }

    /// `async_server` on a trait of `fn`s: the span of the argument (where a missing `tokio`
    /// feature is reported), if it is given; on an async trait, an error.
    fn async_server(
        &self,
        flavour: Option<Flavour>,
        name: &Ident,
        errors: &mut Errors,
    ) -> Option<Span> {
        let ident = self.async_server.as_ref()?;
        match flavour? {
            Flavour::Blocking => Some(ident.span()),
            Flavour::Async => {
                let message = format!(
                    "`async_server` is for a trait of `fn`s: this trait's methods are \
                     `async fn`, so `{}Server` is async already",
                    name.unraw()
                );
                errors.push(syn::Error::new(ident.span(), message));
                None
            }
        }
    }

    /// `name = "..."`, after the `name`.
    fn parse_name(&mut self, meta: syn::meta::ParseNestedMeta<'_>) -> syn::Result<()> {
        let lit: syn::LitStr = meta.value()?.parse().map_err(|e| {
            syn::Error::new(
                e.span(),
                "the name is a string literal: `name = \"org.example.Ipa\"`",
            )
        })?;
        if self.name.is_some() {
            return Err(syn::Error::new(lit.span(), "the name is given twice"));
        }
        self.name = Some(lit);
        Ok(())
    }

    /// `#[interface(name = "...")]`: the name the interface has on the wire (its id is this
    /// name's hash) and in error messages, when the trait's own name is not distinct enough
    /// (`None` when not given, or if it is not a name, which `errors` then says).
    fn wire_name(&self, errors: &mut Errors) -> Option<String> {
        let lit = self.name.as_ref()?;
        let text = lit.value();
        let problem = if text.is_empty() {
            "the interface's name cannot be empty".to_string()
        } else if text.len() > MAX_WIRE_NAME {
            format!(
                "the interface's name is {} bytes long; at most {MAX_WIRE_NAME} are allowed",
                text.len()
            )
        } else if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            "the interface's name cannot hold spaces or control characters: write it like \
             `org.example.Ipa`"
                .to_string()
        } else {
            return Some(text);
        };
        errors.push(syn::Error::new(lit.span(), problem));
        None
    }

    /// `async_client` on a trait of `fn`s, `blocking_client` on a trait of `async fn`s: the
    /// span of the argument (where a missing `tokio` feature is reported), if it is given and
    /// asks for the flavour the trait is not.
    fn other_client(
        &self,
        flavour: Option<Flavour>,
        name: &Ident,
        errors: &mut Errors,
    ) -> Option<Span> {
        let (wanted, ident) = self.other_client.as_ref()?;
        // A trait that mixes `fn` and `async fn` (`None`) has its error already.
        let flavour = flavour?;
        if *wanted != flavour {
            return Some(ident.span());
        }
        let name = name.unraw();
        let message = match flavour {
            Flavour::Async => format!(
                "`async_client` is for a trait of `fn`s: this trait's methods are \
                 `async fn`, so `{name}Client` is async already; for a blocking client \
                 as well, write `#[interface(blocking_client)]`"
            ),
            Flavour::Blocking => format!(
                "`blocking_client` is for a trait of `async fn`s: this trait's methods are \
                 `fn`, so `{name}Client` is blocking already; for an async client as \
                 well, write `#[interface(async_client)]`"
            ),
        };
        errors.push(syn::Error::new(ident.span(), message));
        None
    }
}

/// The trait's methods, checked one by one and then against each other.
fn methods(item: &mut ItemTrait, errors: &mut Errors) -> Vec<Method> {
    if !item.generics.params.is_empty() {
        let message = match only_lifetimes(&item.generics) {
            true => LIFETIMES,
            false => {
                "generic interfaces are not supported: both ends must agree on one concrete \
                 interface; name the types"
            }
        };
        errors.push(syn::Error::new_spanned(&item.generics, message));
    } else if let Some(predicate) = not_on_self(&item.generics.where_clause) {
        errors.push(not_on_self_error(predicate, "an interface trait"));
    }
    let mut methods: Vec<Method> = Vec::new();
    // The position among the methods written, rejected ones included.
    let mut position = 0;
    for trait_item in &mut item.items {
        let TraitItem::Fn(f) = trait_item else {
            let message = "an interface holds only methods: move this item out of the trait";
            errors.push(syn::Error::new_spanned(trait_item, message));
            continue;
        };
        position += 1;
        if let Some(error) = clashes_with_client(&f.sig.ident, &item.ident) {
            errors.push(error);
        }
        let (method, cmd_attr) = match method(f, position - 1) {
            Ok(parsed) => parsed,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        if let Some(first) = methods.iter().find(|m| m.cmd == method.cmd) {
            let origin = if cmd_attr.is_some() {
                ""
            } else {
                " (its position in the trait)"
            };
            let message = format!(
                "command id {}{origin} of `{}` is already used by `{}`: give one of them \
                 another `#[cmd(N)]`",
                method.cmd, method.name, first.name
            );
            // At the `#[cmd]` that clashes, or at the name whose position does.
            errors.push(match &cmd_attr {
                Some(attr) => syn::Error::new_spanned(attr, message),
                None => syn::Error::new(method.name.span(), message),
            });
        }
        if let Some(first) = methods.iter().find(|m| m.variant == method.variant) {
            let message = format!(
                "`{}` and `{}` both become the request variant `{}`: rename one of them",
                method.name, first.name, method.variant
            );
            errors.push(syn::Error::new(method.name.span(), message));
        }
        methods.push(method);
    }
    // (Not when methods were written but rejected: that error is already there.)
    if !item.items.iter().any(|i| matches!(i, TraitItem::Fn(_))) {
        let message = "an interface needs at least one method";
        errors.push(syn::Error::new_spanned(&item.ident, message));
    }
    methods
}

/// All `async fn` (the async flavour) or all `fn` (the blocking one): a trait that mixes them
/// is refused at each `fn` that is not async (`None`).
fn flavour(item: &ItemTrait, errors: &mut Errors) -> Option<Flavour> {
    let sigs = || {
        item.items.iter().filter_map(|i| match i {
            TraitItem::Fn(f) => Some(&f.sig),
            _ => None,
        })
    };
    let Some(first_async) = sigs().find(|sig| sig.asyncness.is_some()) else {
        return Some(Flavour::Blocking);
    };
    let mut mixed = false;
    for sig in sigs().filter(|sig| sig.asyncness.is_none()) {
        mixed = true;
        let message = format!(
            "`{}` is not `async` but `{}` is: an interface is either all `async fn` (the async \
             flavour, on tokio) or all `fn` (the blocking flavour); declare every method \
             `async fn`, or none",
            sig.ident, first_async.ident
        );
        errors.push(syn::Error::new_spanned(sig.fn_token, message));
    }
    (!mixed).then_some(Flavour::Async)
}

/// One method, and its `#[cmd]` if it has one. Removes our attributes from `f`.
fn method(f: &mut TraitItemFn, index: u32) -> syn::Result<(Method, Option<Attribute>)> {
    let mut errors = Errors::default();
    let mut attrs = MethodAttrs::take(&mut f.attrs, &mut errors);
    let sig = &f.sig;
    let refuse = |errors: &mut Errors, tokens: &dyn ToTokens, message: &str| {
        errors.push(syn::Error::new_spanned(tokens, message));
    };
    if let Some(unsafety) = &sig.unsafety {
        let message = "`unsafe fn` is not supported: a safety contract cannot be checked \
                       across processes; declare a safe `fn`";
        refuse(&mut errors, unsafety, message);
    }
    if let Some(abi) = &sig.abi {
        refuse(
            &mut errors,
            abi,
            "`extern` methods are not supported: remove the ABI",
        );
    }
    let stray_predicate = match sig.generics.params.is_empty() {
        true => not_on_self(&sig.generics.where_clause),
        false => None,
    };
    if let Some(predicate) = stray_predicate {
        errors.push(not_on_self_error(predicate, "an interface method"));
    } else if !sig.generics.params.is_empty() {
        let message = if only_lifetimes(&sig.generics) {
            LIFETIMES
        } else {
            "generic methods are not supported: client and server are compiled apart and must \
             agree on one concrete type; use one (or an enum of the types you need)"
        };
        refuse(&mut errors, &sig.generics, message);
    } else if let Some(bound) = unserved_self_bound(&sig.generics.where_clause) {
        let message = "a method cannot ask more of `Self` than `Sized + Send + Sync + 'static`: \
                       the generated server calls it on any such implementation; put the bound \
                       on the trait (`trait Name: Bound`), which every implementation meets";
        refuse(&mut errors, bound, message);
    }
    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(receiver)) => {
            let message = match (&receiver.reference, &receiver.mutability) {
                _ if receiver.colon_token.is_some() => {
                    Some("write `&self`: other receiver types are not supported")
                }
                (None, _) => Some(
                    "`self` by value is not supported: take `&self` (the server keeps its \
                     implementation for the next call)",
                ),
                (Some(_), Some(_)) => Some(
                    "`&mut self` is not supported: take `&self`, and keep mutable state behind \
                     a `Mutex` or atomics (calls may run concurrently)",
                ),
                (Some((_, Some(_))), None) => Some("write `&self`, without a lifetime"),
                (Some((_, None)), None) => None,
            };
            if let Some(message) = message {
                refuse(&mut errors, receiver, message);
            }
        }
        _ => {
            let message = format!(
                "`{}` has no receiver: interface methods take `&self` first \
                 (a call goes to the server's implementation)",
                sig.ident
            );
            errors.push(syn::Error::new(sig.paren_token.span.join(), message));
            inputs = sig.inputs.iter(); // Still check the parameters there are.
        }
    }
    let mut args = Vec::new();
    for input in inputs {
        match input {
            FnArg::Receiver(r) => refuse(&mut errors, r, "`self` goes first"),
            FnArg::Typed(typed) if args.len() == MAX_PARAMS => {
                let message = format!(
                    "an interface method takes at most {MAX_PARAMS} parameters after `&self`: \
                     they travel as one tuple, and serde's tuples stop at {MAX_PARAMS}; group \
                     some of them into a serde struct of your own"
                );
                refuse(&mut errors, typed, &message);
                break;
            }
            FnArg::Typed(typed) => {
                for attr in &typed.attrs {
                    if let Some(error) = conditional(attr, "parameter") {
                        errors.push(error);
                    }
                }
                match arg(&typed.pat, &typed.ty) {
                    Ok(arg) => args.push(arg),
                    Err(error) => errors.push(error),
                }
            }
        }
    }
    let ret = match &sig.output {
        // The async flavour's trait as rustdoc shows it, or as written by hand.
        ReturnType::Type(_, ty) if types::future_output(ty).is_some() => {
            let output = types::future_output(ty).flatten().filter(|t| !is_unit(t));
            let (returns, output) = match output.map(|t| types::spell(t.to_token_stream())) {
                Some(output) => (format!(" -> {output}"), output),
                None => (String::new(), "()".into()),
            };
            let message = format!(
                "a method that returns a future is an `async fn` in an interface: declare it \
                 `async fn {}(&self, ..){returns}` (the async flavour; its generated trait \
                 returns `impl Future<Output = {output}> + Send`, which implementations write \
                 as `async fn` too)",
                sig.ident
            );
            refuse(&mut errors, ty, &message);
            None
        }
        ReturnType::Type(_, ty) if !is_unit(ty) => match value(ty, Role::Return) {
            Ok(value) => Some(value),
            Err(error) => {
                errors.push(error);
                None
            }
        },
        _ => None,
    };
    if attrs.oneway && ret.is_some() {
        let message = "a `#[oneway]` method gets no reply, so it cannot return a value: remove \
                       the return type, or remove `#[oneway]` to wait for the reply";
        refuse(&mut errors, &sig.output, message);
    }
    // The request and response variant: a method name that camel-cases to no identifier
    // (`self_` to the keyword `Self`, `__` to nothing, `_1` to a number) cannot name one.
    let variant = upper_camel(&sig.ident.unraw().to_string());
    if syn::parse_str::<Ident>(&variant).is_err() {
        let message = format!(
            "`{}` becomes the request variant `{variant}`, which is not a usable name: rename \
             this method",
            sig.ident.unraw()
        );
        errors.push(syn::Error::new(sig.ident.span(), message));
    }
    if let Err(error) = errors.finish() {
        // The trait is still emitted. A pattern parameter there would add rustc's E0642
        // ("patterns aren't allowed in methods without bodies") to our error, which already
        // says what to write: it is emitted as `_`.
        if f.default.is_none() {
            for input in &mut f.sig.inputs {
                if let FnArg::Typed(typed) = input {
                    if plain_name(&typed.pat).is_none() {
                        let span = typed.pat.span();
                        *typed.pat = Pat::Wild(PatWild {
                            attrs: Vec::new(),
                            underscore_token: Token![_](span),
                        });
                    }
                }
            }
        }
        return Err(error);
    }
    let method = Method {
        variant: format_ident!("{}", variant),
        cmd: attrs.cmd.as_ref().map_or(index, |(cmd, _)| *cmd),
        signature: signature(&sig.ident, &args, &sig.output),
        name: sig.ident.clone(),
        args,
        ret,
        oneway: attrs.oneway,
        needs_sized: self_bounds(&sig.generics.where_clause).any(is_sized),
        docs: std::mem::take(&mut attrs.docs),
        deprecated: std::mem::take(&mut attrs.deprecated),
    };
    Ok((method, attrs.cmd.map(|(_, attr)| attr)))
}

/// Whether every generic parameter of `generics` is a lifetime.
fn only_lifetimes(generics: &syn::Generics) -> bool {
    (generics.params.iter()).all(|param| matches!(param, GenericParam::Lifetime(_)))
}

/// The error for lifetime parameters, on the trait or a method.
const LIFETIMES: &str = "lifetime parameters are not supported: nothing borrowed crosses a \
                         process boundary (each end gets its own copy of every value); remove \
                         the lifetime, and take and return owned types (`String`, not `&'a str`)";

/// The most parameters a method takes after `&self`: the arguments travel as one tuple, and
/// serde implements its traits for tuples of up to 16 elements.
const MAX_PARAMS: usize = 16;

/// The first predicate of a `where` clause that bounds something other than `Self`. Bounds
/// on `Self` (`where Self: Send + Sync`, `where Self: Sized`) say what supertraits would, and
/// make nothing generic; anything else has no parameter to bound, in a trait that has none.
fn not_on_self(clause: &Option<WhereClause>) -> Option<&WherePredicate> {
    clause.iter().flat_map(|c| &c.predicates).find(|predicate| {
        !matches!(predicate, WherePredicate::Type(t)
            if t.lifetimes.is_none()
                && matches!(&t.bounded_ty, Type::Path(p)
                    if p.qself.is_none() && p.path.is_ident("Self")))
    })
}

/// The error for a `where` predicate of `what` (a trait or a method) that [`not_on_self`]
/// found, at the predicate.
fn not_on_self_error(predicate: &WherePredicate, what: &str) -> syn::Error {
    let message = format!(
        "the `where` clause of {what} can only bound `Self` (`where Self: Send + Sync`): \
         the interface has no type parameters to bound, and both ends must agree on one \
         concrete interface; remove `{}`",
        types::spell(predicate.to_token_stream())
    );
    syn::Error::new_spanned(predicate, message)
}

/// The first bound of a method's `where Self: ..` clause that the generated server does not
/// meet: it calls the method on any `T: Trait + Send + Sync + 'static`, so `Self: Clone` there
/// would not compile (on the trait, such a bound is a supertrait, which `T: Trait` implies).
fn unserved_self_bound(clause: &Option<WhereClause>) -> Option<&TypeParamBound> {
    let served = |bound: &TypeParamBound| match bound {
        TypeParamBound::Lifetime(l) => l.ident == "static",
        TypeParamBound::Trait(t) => {
            matches!(t.modifier, TraitBoundModifier::None)
                && t.lifetimes.is_none()
                && t.path.segments.last().is_some_and(|s| {
                    s.arguments.is_none() && ["Sized", "Send", "Sync"].iter().any(|n| s.ident == n)
                })
        }
        _ => false,
    };
    self_bounds(clause).find(|bound| !served(bound))
}

/// The bounds of a method's `where Self: ..` clause (one that [`not_on_self`] accepted).
fn self_bounds(clause: &Option<WhereClause>) -> impl Iterator<Item = &TypeParamBound> {
    clause
        .iter()
        .flat_map(|c| &c.predicates)
        .filter_map(|predicate| match predicate {
            WherePredicate::Type(t) => Some(&t.bounds),
            _ => None,
        })
        .flatten()
}

/// Whether `bound` is `Sized` (by any path: `core::marker::Sized` too), not `?Sized`.
fn is_sized(bound: &TypeParamBound) -> bool {
    matches!(bound, TypeParamBound::Trait(t)
        if matches!(t.modifier, TraitBoundModifier::None)
            && t.path.segments.last().is_some_and(|s| s.ident == "Sized"))
}

/// The attributes of a method that concern us.
struct MethodAttrs {
    /// `#[cmd(N)]`: the id, and the attribute, for errors.
    cmd: Option<(u32, Attribute)>,
    /// `#[oneway]`.
    oneway: bool,
    /// The doc comments (`#[doc = ".."]`).
    docs: Vec<Attribute>,
    /// `#[deprecated]`.
    deprecated: Vec<Attribute>,
}

impl MethodAttrs {
    /// Reads the attributes, removing `#[cmd]` and `#[oneway]`: they mean nothing to rustc.
    fn take(attrs: &mut Vec<Attribute>, errors: &mut Errors) -> Self {
        let mut ours = MethodAttrs {
            cmd: None,
            oneway: false,
            docs: Vec::new(),
            deprecated: Vec::new(),
        };
        for attr in std::mem::take(attrs) {
            if attr.path().is_ident("oneway") {
                if !matches!(attr.meta, Meta::Path(_)) {
                    errors.push(syn::Error::new_spanned(
                        &attr,
                        "`#[oneway]` takes no arguments",
                    ));
                } else if ours.oneway {
                    // As a second `#[cmd]` is: a repeated one is most often a slip in an edit.
                    let message = "a method has one `#[oneway]`: remove this one";
                    errors.push(syn::Error::new_spanned(&attr, message));
                }
                ours.oneway = true;
            } else if attr.path().is_ident("cmd") {
                let id = attr
                    .parse_args::<LitInt>()
                    .and_then(|n| n.base10_parse::<u32>());
                match (id, &ours.cmd) {
                    (_, Some(_)) => {
                        let message = "a method has one `#[cmd(N)]`";
                        errors.push(syn::Error::new_spanned(&attr, message));
                    }
                    (Ok(id), None) => ours.cmd = Some((id, attr)),
                    (Err(_), None) => {
                        let message = "expected `#[cmd(N)]`, with `N` the command id (a `u32`)";
                        errors.push(syn::Error::new_spanned(&attr, message));
                    }
                }
            } else if let Some(error) = conditional(&attr, "method") {
                errors.push(error);
                // A `#[cfg]` stays on the trait emitted with the error, so that rustc applies it
                // there as in the impl: dropped, the impl would miss a method (E0046) or have
                // its other alternative. (A `#[cfg_attr]` could add `#[oneway]`, which would
                // then be an unknown attribute.)
                if attr.path().is_ident("cfg") {
                    attrs.push(attr);
                }
            } else {
                if attr.path().is_ident("doc") {
                    ours.docs.push(attr.clone());
                } else if attr.path().is_ident("deprecated") {
                    ours.deprecated.push(attr.clone());
                }
                attrs.push(attr);
            }
        }
        ours
    }
}

/// The error for a `#[cfg]` or `#[cfg_attr]` on an interface method or parameter (`what`).
/// Both ends must agree on every method's command id and on the interface signature, which
/// an item compiled in on one end only would change; and a method removed by `#[cfg]` still
/// reaches the macro, which cannot tell whether it will be. A `#[cfg_attr]` that adds none
/// of those three (docs or lint levels, `#[cfg_attr(docsrs, doc(cfg(..)))]`, say) is fine.
fn conditional(attr: &Attribute, what: &str) -> Option<syn::Error> {
    if attr.path().is_ident("cfg_attr") && leaves_the_interface_alone(attr) {
        return None;
    }
    let message = if attr.path().is_ident("cfg") {
        format!(
            "`#[cfg]` on an interface {what} is not supported: both ends must agree on every \
             method's command id and on the interface's signature, which a {what} compiled in \
             on one end only would change; put the `#[cfg(..)]` on the whole trait, above \
             `#[interface]`, or move the methods that differ into an interface of their own"
        )
    } else if attr.path().is_ident("cfg_attr") {
        format!(
            "`#[cfg_attr]` adding `#[oneway]`, `#[cmd]` or `#[cfg]` on an interface {what} is \
             not supported: both ends must agree on the interface (its command ids, \
             `#[oneway]`s and signature), which a conditional attribute could change on one \
             end only; write the attribute unconditionally, or put a `#[cfg(..)]` on the \
             whole trait, above `#[interface]` (a `#[cfg_attr]` that adds only docs or lint \
             levels is fine)"
        )
    } else {
        return None;
    };
    Some(syn::Error::new_spanned(attr, message))
}

/// Whether `#[cfg_attr(predicate, attrs..)]` adds none of the attributes that make the
/// interface (`#[oneway]`, `#[cmd]`, or a `#[cfg]`, directly or through a nested
/// `#[cfg_attr]`): rustc applies it after the macro has read the method.
fn leaves_the_interface_alone(attr: &Attribute) -> bool {
    let parser = syn::punctuated::Punctuated::<Meta, Token![,]>::parse_terminated;
    let Ok(metas) = attr.parse_args_with(parser) else {
        return false;
    };
    let ours = ["oneway", "cmd", "cfg", "cfg_attr"];
    metas.len() > 1
        && metas
            .iter()
            .skip(1)
            .all(|meta| !ours.iter().any(|name| meta.path().is_ident(name)))
}

/// What the generated client has already, which a stub of the same name would clash with
/// (its own methods) or shadow (those of `Clone`, which it derives, and of `ToOwned`, which
/// comes with `Clone`: `client.clone()` or `client.to_owned()` would make a call instead of
/// a second handle); where it comes from, and a name to suggest instead.
const CLIENT_METHODS: [(&str, &str, &str); 7] = [
    ("new", " itself", "create"),
    ("with_timeout", " itself", "set_timeout"),
    ("connection", " itself", "connection_info"),
    ("clone", " (from `Clone`)", "duplicate"),
    ("clone_from", " (from `Clone`)", "copy_from"),
    ("to_owned", " (from `ToOwned`)", "make_owned"),
    ("clone_into", " (from `ToOwned`)", "copy_into"),
];

/// The error for a method named like one the generated client has already.
fn clashes_with_client(name: &Ident, trait_name: &Ident) -> Option<syn::Error> {
    let unraw = name.unraw().to_string();
    let (_, from, instead) = CLIENT_METHODS.iter().find(|(ours, ..)| *ours == unraw)?;
    let trait_name = trait_name.unraw();
    let message = format!(
        "`{unraw}` is a method of the generated `{trait_name}Client`{from}, so the client \
         cannot have a stub of that name: rename this method, e.g. `{instead}`"
    );
    Some(syn::Error::new(name.span(), message))
}

/// The name a parameter pattern binds, if it is a plain name (`name` or `mut name`).
fn plain_name(pat: &Pat) -> Option<&Ident> {
    match pat {
        Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => Some(&p.ident),
        _ => None,
    }
}

/// A parameter after `&self`: a plain name and a type that can travel.
fn arg(pat: &Pat, ty: &Type) -> syn::Result<Arg> {
    let Some(name) = plain_name(pat) else {
        let message = "write a plain parameter name (`name: Type`): the client stub and the \
                       request variant use it";
        return Err(syn::Error::new_spanned(pat, message));
    };
    Ok(Arg {
        name: name.clone(),
        value: value(ty, Role::Param)?,
    })
}

fn value(ty: &Type, role: Role) -> syn::Result<Value> {
    let wire = types::wire(ty);
    types::check(ty, role, wire)?;
    Ok(Value {
        ty: ty.clone(),
        wire,
        carried_error: types::carried_error(ty, wire).cloned(),
    })
}

fn is_unit(ty: &Type) -> bool {
    matches!(ty, Type::Tuple(t) if t.elems.is_empty())
}

/// `fn name(&self, a: A) -> R`, spelled as rustfmt would, and with names, not their
/// spellings: a raw `r#gen` is `gen`, as it is to rustc (see [`types::spell_names`]).
fn signature(name: &Ident, args: &[Arg], output: &ReturnType) -> String {
    let mut text = format!("fn {}(&self", name.unraw());
    for arg in args {
        let ty = types::spell_names(arg.value.ty.to_token_stream());
        text.push_str(&format!(", {}: {ty}", arg.name.unraw()));
    }
    text.push(')');
    if let ReturnType::Type(_, ty) = output {
        text.push_str(&format!(" -> {}", types::spell_names(ty.to_token_stream())));
    }
    text
}

/// `open_buffer` → `OpenBuffer`.
fn upper_camel(snake: &str) -> String {
    let mut out = String::new();
    for word in snake.split('_') {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            out.extend(first.to_uppercase());
            out.push_str(chars.as_str());
        }
    }
    out
}

/// Errors found so far, combined so that the user sees all of them at once.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn parse(item: TokenStream) -> Result<Interface, String> {
        interface(TokenStream::new(), item).map_err(|r| r.error.to_string())
    }

    #[test]
    fn ids_follow_declaration_order_unless_pinned() {
        let iface = parse(quote! {
            trait T {
                fn a(&self);
                #[cmd(7)]
                fn b(&self);
                fn c(&self);
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let ids: Vec<u32> = iface.methods.iter().map(|m| m.cmd).collect();
        assert_eq!(ids, [0, 7, 2]);
        // Our attributes are gone from the emitted trait.
        let emitted = iface.item.to_token_stream().to_string();
        assert!(!emitted.contains("cmd"), "{emitted}");
    }

    #[test]
    fn a_position_can_clash_with_a_pinned_id() {
        let error = parse(quote! {
            trait T {
                #[cmd(1)]
                fn a(&self);
                fn b(&self);
            }
        })
        .err()
        .unwrap();
        assert!(
            error.contains("command id 1 (its position in the trait) of `b`"),
            "{error}"
        );
    }

    #[test]
    fn more_rejections() {
        for (item, expected) in [
            (
                quote!(
                    trait T {
                        fn a(&self, _: u32);
                    }
                ),
                "plain parameter name",
            ),
            (
                quote!(
                    trait T {
                        fn a(&self) -> Self;
                    }
                ),
                "`Self` cannot travel",
            ),
            (
                quote!(
                    trait T<X> {
                        fn a(&self);
                    }
                ),
                "generic interfaces",
            ),
            (
                quote!(
                    trait T {
                        type X;
                        fn a(&self);
                    }
                ),
                "only methods",
            ),
            (
                quote!(
                    trait T {}
                ),
                "at least one method",
            ),
            (
                quote!(
                    trait T {
                        #[cmd(x)]
                        fn a(&self);
                    }
                ),
                "expected `#[cmd(N)]`",
            ),
            (
                quote!(
                    trait T {
                        fn a(self: Box<Self>);
                    }
                ),
                "write `&self`",
            ),
            (
                quote!(
                    trait T {
                        fn a_b(&self);
                        fn aB(&self);
                    }
                ),
                "both become",
            ),
            (
                quote!(
                    trait T {
                        fn a(&self) -> &'static str;
                    }
                ),
                "return `String` instead",
            ),
            // A `Cow` whose lifetime is elided borrows as a reference does.
            (
                quote!(
                    trait T {
                        fn a(&self, s: Cow<str>);
                    }
                ),
                "take `String` instead",
            ),
            (
                quote!(
                    trait T {
                        fn a(&self) -> std::borrow::Cow<[u8]>;
                    }
                ),
                "return `Vec<u8>` instead",
            ),
            // The async flavour's trait as rustdoc shows it: the method is an `async fn`.
            (
                quote!(
                    trait T {
                        fn a(&self) -> impl ::core::future::Future<Output = u32> + Send;
                    }
                ),
                "declare it `async fn a(&self, ..) -> u32`",
            ),
            (
                quote!(
                    trait T {
                        fn a(&self, s: &str);
                    }
                ),
                "take `String` instead",
            ),
            (
                quote!(
                    trait T {
                        fn name<'a>(&'a self) -> String;
                    }
                ),
                "lifetime parameters are not supported",
            ),
            (
                quote!(
                    trait T {
                        #[cfg(feature = "x")]
                        fn a(&self);
                    }
                ),
                "`#[cfg]` on an interface method is not supported",
            ),
            (
                quote!(
                    trait T {
                        #[cfg_attr(feature = "x", oneway)]
                        fn a(&self);
                    }
                ),
                "`#[cfg_attr]` adding `#[oneway]`, `#[cmd]` or `#[cfg]` on an interface method",
            ),
            (
                quote!(
                    trait T {
                        fn a(&self, #[cfg(feature = "x")] b: u32);
                    }
                ),
                "`#[cfg]` on an interface parameter is not supported",
            ),
            (
                quote!(
                    trait T {
                        fn new(&self);
                    }
                ),
                "`new` is a method of the generated `TClient` itself",
            ),
            (
                quote!(
                    trait T {
                        fn r#connection(&self);
                    }
                ),
                "`connection` is a method of the generated `TClient` itself",
            ),
            // The client is named after the trait's name, not its raw spelling.
            (
                quote!(
                    trait r#Raw {
                        fn new(&self);
                    }
                ),
                "`new` is a method of the generated `RawClient` itself",
            ),
            (
                quote!(
                    trait T {
                        fn with_timeout(&self, t: u64);
                    }
                ),
                "rename this method, e.g. `set_timeout`",
            ),
            (
                quote!(
                    trait T {
                        fn a(
                            &self,
                            a1: u8,
                            a2: u8,
                            a3: u8,
                            a4: u8,
                            a5: u8,
                            a6: u8,
                            a7: u8,
                            a8: u8,
                            a9: u8,
                            a10: u8,
                            a11: u8,
                            a12: u8,
                            a13: u8,
                            a14: u8,
                            a15: u8,
                            a16: u8,
                            a17: u8,
                        );
                    }
                ),
                "at most 16 parameters after `&self`",
            ),
            (
                quote!(
                    trait T where
                        String: Clone,
                    {
                        fn a(&self);
                    }
                ),
                "the `where` clause of an interface trait can only bound `Self`",
            ),
            (
                quote!(
                    trait T {
                        fn a(&self)
                        where
                            for<'a> Self: Sized;
                    }
                ),
                "the `where` clause of an interface method can only bound `Self`",
            ),
        ] {
            let error = parse(item.clone())
                .err()
                .unwrap_or_else(|| panic!("accepted {item}"));
            assert!(error.contains(expected), "{item}: {error}");
        }
    }

    /// A `#[cfg_attr]` that can only add documentation or lint levels (`doc(cfg(..))` for
    /// docs.rs, an `allow` under `test`) leaves the interface alone; one that could add an
    /// attribute of ours, or a `cfg`, anywhere in it, is refused.
    #[test]
    fn conditional_attributes_are_refused_only_where_they_could_change_the_interface() {
        let iface = parse(quote! {
            trait T {
                #[cfg_attr(docsrs, doc(cfg(feature = "x")))]
                #[cfg_attr(test, allow(unused), deprecated = "old")]
                fn a(&self, #[cfg_attr(test, allow(non_snake_case))] X: u32);
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(iface.methods.len(), 1);
        for attr in [
            quote!(#[cfg_attr(test, oneway)]),
            quote!(#[cfg_attr(test, cmd(3))]),
            quote!(#[cfg_attr(test, cfg(any()))]),
            quote!(#[cfg_attr(test, allow(unused), oneway)]),
            quote!(#[cfg_attr(test, cfg_attr(all(), oneway))]),
            quote!(#[cfg_attr(not a predicate)]),
        ] {
            let error = parse(quote! {
                trait T {
                    #attr
                    fn a(&self);
                }
            })
            .err()
            .unwrap_or_else(|| panic!("accepted {attr}"));
            assert!(error.contains("`#[cfg_attr]` adding"), "{attr}: {error}");
        }
    }

    #[test]
    fn a_rejected_pattern_parameter_is_emitted_as_a_wildcard() {
        let item = quote! {
            trait T {
                fn a(&self, (x, y): (u32, u32));
                fn b(&self, (x, y): (u32, u32)) -> u32 { x + y }
            }
        };
        let Err(rejected) = interface(TokenStream::new(), item) else {
            panic!("accepted");
        };
        let emitted: ItemTrait = syn::parse2(rejected.item).unwrap();
        let patterns: Vec<String> = emitted
            .items
            .iter()
            .map(|i| match i {
                TraitItem::Fn(f) => match &f.sig.inputs[1] {
                    FnArg::Typed(t) => t.pat.to_token_stream().to_string(),
                    FnArg::Receiver(_) => unreachable!(),
                },
                _ => unreachable!(),
            })
            .collect();
        // Without a body, rustc would refuse the pattern too; with one, it is the user's.
        assert_eq!(patterns, ["_", "(x , y)"]);
    }

    #[test]
    fn signatures_are_spelled_as_written() {
        let iface = parse(quote! {
            trait T {
                fn a(&self, x: Vec < u8 >, y: Result<u8,String>) -> ();
                #[oneway]
                fn b(&self);
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let a = &iface.methods[0];
        assert_eq!(
            a.signature,
            "fn a(&self, x: Vec<u8>, y: Result<u8, String>) -> ()"
        );
        assert!(a.ret.is_none());
        assert_eq!(
            iface.canonical_signature(),
            "#[cmd(0)] fn a(&self, x: Vec<u8>, y: Result<u8, String>) -> (); \
             #[cmd(1)] #[oneway] fn b(&self);"
        );
    }

    /// `r#gen` and `gen` are one name (a method named `gen` is spelled `r#gen` from edition
    /// 2024 on), so two ends that spell it differently (a plugin and its host, of two
    /// editions) declare the same interface.
    #[test]
    fn raw_identifiers_are_signed_as_their_names() {
        let raw = parse(quote! {
            trait T {
                fn r#gen(&self, r#seed: r#gen::Seed) -> u32;
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let plain = parse(quote! {
            trait T {
                fn gen(&self, seed: gen::Seed) -> u32;
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            raw.canonical_signature(),
            "#[cmd(0)] fn gen(&self, seed: gen::Seed) -> u32;"
        );
        assert_eq!(raw.canonical_signature(), plain.canonical_signature());
    }

    #[test]
    fn async_and_blocking_traits_have_one_signature() {
        let blocking = parse(quote! {
            trait T {
                fn a(&self, x: Vec<u8>) -> Result<u8, String>;
                #[oneway]
                fn b(&self, fd: OwnedFd);
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let asynchronous = parse(quote! {
            trait T {
                async fn a(&self, x: Vec<u8>) -> Result<u8, String>;
                #[oneway]
                async fn b(&self, fd: OwnedFd);
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(blocking.flavour, Flavour::Blocking);
        assert_eq!(asynchronous.flavour, Flavour::Async);
        assert_eq!(
            blocking.canonical_signature(),
            asynchronous.canonical_signature()
        );
    }

    #[test]
    fn mixing_async_and_blocking_methods_is_refused_at_each_blocking_one() {
        let item = quote! {
            trait T {
                fn a(&self);
                async fn b(&self);
                fn c(&self);
            }
        };
        let Err(rejected) = interface(TokenStream::new(), item) else {
            panic!("accepted");
        };
        let errors: Vec<String> = rejected.error.into_iter().map(|e| e.to_string()).collect();
        let error = errors.join("\n");
        assert!(error.contains("`a` is not `async` but `b` is"), "{error}");
        assert!(error.contains("`c` is not `async` but `b` is"), "{error}");
    }

    #[test]
    fn variant_names() {
        assert_eq!(upper_camel("reverse"), "Reverse");
        assert_eq!(upper_camel("open_buffer"), "OpenBuffer");
        assert_eq!(upper_camel("_private__x"), "PrivateX");
        assert_eq!(upper_camel("getURL"), "GetURL");
    }
}

#[cfg(test)]
mod variant_name_tests {
    use super::*;
    use quote::quote;

    /// A method whose name does not camel-case to a usable variant name (`self_` becomes the
    /// keyword `Self`, `__` becomes nothing, `_1` a number) is refused at its name, not left to
    /// a macro panic or a parse error inside the generated code.
    #[test]
    fn names_that_make_no_variant_are_refused() {
        for item in [
            quote!(
                trait T {
                    fn self_(&self);
                }
            ),
            quote!(
                trait T {
                    fn __(&self);
                }
            ),
            quote!(
                trait T {
                    fn _1(&self);
                }
            ),
        ] {
            let outcome = std::panic::catch_unwind(|| {
                interface(TokenStream::new(), item.clone())
                    .map(|_| ())
                    .map_err(|r| r.error.to_string())
            });
            match outcome {
                Ok(Err(error)) => assert!(error.contains("rename"), "{item}: {error}"),
                Ok(Ok(())) => panic!("accepted {item}"),
                Err(_) => panic!("panicked on {item}"),
            }
        }
    }
}
