//! `#[derive(Shape)]`: a struct's or enum's wire shape, from its fields and variants as serde
//! writes them with bincode. serde attributes that leave the form alone (`rename`, `alias`,
//! `default`, `bound`, ...) are ignored, those that drop a field (`skip`) are followed, and
//! those whose form the derive cannot see (`with`, `flatten`, `tag`, `untagged`, ...) are
//! compile errors that say to implement `Shape` by hand.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::visit_mut::VisitMut;
use syn::{Attribute, Data, DeriveInput, Fields, Ident, Type};

use crate::krate::{self, Krate};

/// Where the derive's output finds the trait and its combinators.
fn shape_module() -> TokenStream {
    let k = krate::path();
    quote!(#k::shape)
}

/// The `impl Shape` for `input`, or why not.
pub fn derive(input: TokenStream) -> syn::Result<TokenStream> {
    let mut input: DeriveInput = syn::parse2(input)?;
    let _krate = Krate::set(container_crate(&input.attrs)?.as_ref());
    let (m, k) = (shape_module(), krate::path());
    let container = Container::parse(&input.attrs)?;
    let name = input.ident.clone();
    let mut recursive = false;
    let mut bounded = Bounded {
        params: input
            .generics
            .type_params()
            .map(|p| p.ident.clone())
            .collect(),
        used: Vec::new(),
        projections: Vec::new(),
        containers: Vec::new(),
    };
    let own_arguments: Vec<String> = input
        .generics
        .params
        .iter()
        .filter_map(|p| match p {
            syn::GenericParam::Type(t) => Some(t.ident.to_string()),
            syn::GenericParam::Const(c) => Some(c.ident.to_string()),
            syn::GenericParam::Lifetime(_) => None,
        })
        .collect();
    let shape = match &input.data {
        Data::Struct(data) => {
            refuse_skipped_newtype(&data.fields)?;
            let mut travelling = data.fields.clone();
            if container.transparent.is_some() {
                // serde's `transparent` writes the one field, and leaves the `PhantomData`s
                // out (by their name, as it does) whether skipped or not.
                let not_phantom = |field: &syn::Field| !is_phantom(&field.ty);
                match &mut travelling {
                    Fields::Named(fields) => retain(&mut fields.named, not_phantom),
                    Fields::Unnamed(fields) => retain(&mut fields.unnamed, not_phantom),
                    Fields::Unit => {}
                }
            }
            let fields = fields(
                &travelling,
                &name,
                &own_arguments,
                &mut recursive,
                &mut bounded,
            )?;
            match container.transparent {
                Some(span) => match <[TokenStream; 1]>::try_from(fields) {
                    Ok([field]) => field,
                    Err(_) => {
                        return Err(syn::Error::new(
                            span,
                            "`transparent` needs exactly one field that is not skipped",
                        ));
                    }
                },
                None => quote!(#m::product(&[#(#fields),*])),
            }
        }
        Data::Enum(data) => {
            if let Some(span) = container.transparent {
                return Err(syn::Error::new(span, "`transparent` is for structs"));
            }
            let mut variants = Vec::new();
            for variant in &data.variants {
                refuse_shape_attribute(&variant.attrs)?;
                refuse_variant_attributes(&variant.attrs)?;
                let fields = fields(
                    &variant.fields,
                    &name,
                    &own_arguments,
                    &mut recursive,
                    &mut bounded,
                )?;
                variants.push(quote!(#m::product(&[#(#fields),*])));
            }
            quote!(#m::sum(&[#(#variants),*]))
        }
        Data::Union(union) => {
            return Err(syn::Error::new(
                union.union_token.span(),
                "serde does not derive unions: implement `typed_ipc::Shape` by hand from what \
                 your `Serialize` writes",
            ));
        }
    };
    // Says which type its `RECURSION`s stand for: this one, not an enclosing one.
    let shape = match recursive {
        true => quote!(#m::recursive(#shape)),
        false => shape,
    };
    // What the shaped fields need of the parameters, as serde's derive bounds them: a
    // parameter only in a `PhantomData` or a skipped field needs nothing, a field of an
    // associated type bounds that type, not its parameter.
    for param in input.generics.type_params_mut() {
        if bounded.used.contains(&param.ident) {
            param.bounds.push(syn::parse_quote!(#k::Shape));
        }
    }
    let projections = &bounded.projections;
    if !projections.is_empty() {
        input.generics.make_where_clause().predicates.extend(
            projections
                .iter()
                .map(|ty| -> syn::WherePredicate { syn::parse_quote!(#ty: #k::Shape) }),
        );
    }
    // Each generic type the derived type is named inside must be a standard container, as
    // the derive took it for by its name: a look-alike that names itself would bind the
    // `RECURSION` given to it as its own.
    if !bounded.containers.is_empty() {
        input
            .generics
            .make_where_clause()
            .predicates
            .extend(
                bounded
                    .containers
                    .iter()
                    .map(|(ty, span)| -> syn::WherePredicate {
                        let m = krate::path_at(*span);
                        syn::parse_quote_spanned!(*span=> #ty: #m::shape::StandardContainer)
                    }),
            );
    }
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics #k::Shape for #name #ty_generics #where_clause {
            const SHAPE: ::core::primitive::u64 = #shape;
        }
    })
}

/// A newtype struct's one field skipped: serde writes and reads it all the same (it follows
/// `skip` in a struct of named fields, several fields, or a variant), so no shape of a
/// skipped field would be true.
fn refuse_skipped_newtype(fields: &Fields) -> syn::Result<()> {
    let Fields::Unnamed(unnamed) = fields else {
        return Ok(());
    };
    match unnamed.unnamed.first() {
        Some(field) if unnamed.unnamed.len() == 1 => match field_form(&field.attrs)? {
            FieldForm::Skipped => Err(syn::Error::new_spanned(
                field,
                "serde writes a newtype struct's one field even when it is skipped, so this \
                 `skip` does nothing on the wire: remove it, or make the type a unit struct",
            )),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// Keeps the fields `keep` says to.
fn retain(
    fields: &mut syn::punctuated::Punctuated<syn::Field, syn::Token![,]>,
    keep: impl Fn(&syn::Field) -> bool,
) {
    *fields = std::mem::take(fields).into_iter().filter(keep).collect();
}

/// Whether `ty` is a `PhantomData`, by its name: how serde's `transparent` tells.
fn is_phantom(mut ty: &Type) -> bool {
    while let Type::Group(group) = ty {
        ty = &group.elem;
    }
    matches!(ty, Type::Path(path)
        if path.path.segments.last().is_some_and(|s| s.ident == "PhantomData"))
}

/// What to write instead of a serde attribute the derive cannot see through.
fn by_hand(what: &str) -> String {
    format!(
        "#[derive(typed_ipc::Shape)] cannot see the wire form `{what}` gives: implement \
         `typed_ipc::Shape` by hand from what is written, in order, e.g. \
         `impl typed_ipc::Shape for T {{ const SHAPE: u64 = \
         typed_ipc::shape::product(&[u64::SHAPE, String::SHAPE]); }}`"
    )
}

/// What to write instead of a field's `with` the derive does not know.
fn unvouched(what: &str) -> String {
    format!(
        "#[derive(typed_ipc::Shape)] cannot see the wire form `{what}` gives: say which type's \
         form it writes with `#[shape(same_as = \"T\")]` on the field (e.g. \
         `#[shape(same_as = \"[u8; 16]\")]`), or implement `typed_ipc::Shape` by hand"
    )
}

/// The container's serde attributes that matter here.
#[derive(Default)]
struct Container {
    /// `#[serde(transparent)]`: the shape of the one field.
    transparent: Option<Span>,
}

impl Container {
    fn parse(attrs: &[Attribute]) -> syn::Result<Container> {
        let mut container = Container::default();
        serde_items(attrs, |item, span| match item.as_str() {
            "transparent" => {
                container.transparent = Some(span);
                Ok(())
            }
            "tag" | "content" | "untagged" | "into" | "from" | "try_from" | "remote"
            | "variant_identifier" | "field_identifier" => {
                Err(syn::Error::new(span, by_hand(&format!("#[serde({item})]"))))
            }
            _ => Ok(()),
        })?;
        Ok(container)
    }
}

/// `#[shape(crate = "...")]` on the type: the path its impl names typed-ipc by, if not
/// `::typed_ipc` (see [`krate`]). Any other `#[shape]` there is refused, as on a variant.
fn container_crate(attrs: &[Attribute]) -> syn::Result<Option<syn::Path>> {
    let mut given = None;
    for attr in attrs.iter().filter(|a| a.path().is_ident("shape")) {
        attr.parse_nested_meta(|meta| {
            if !meta.path.is_ident("crate") {
                return Err(syn::Error::new_spanned(attr, ON_A_FIELD));
            }
            if given.is_some() {
                return Err(meta.error("`crate` is given twice"));
            }
            given = Some(krate::parse(&meta)?);
            Ok(())
        })?;
    }
    Ok(given)
}

/// What a `#[shape]` that does not belong where it is written is told.
const ON_A_FIELD: &str = "`#[shape(same_as = \"T\")]` goes on a field, to say which type's wire \
                          form its `#[serde(with)]` writes; on a type, `#[shape(crate = \
                          \"...\")]` names typed-ipc where it is reached through a facade; for \
                          a whole type or variant's form, implement `typed_ipc::Shape` by hand";

/// `#[shape(...)]` on a variant: the compiler accepts it as the derive's helper attribute, so
/// unrefused it would pass, saying nothing.
fn refuse_shape_attribute(attrs: &[Attribute]) -> syn::Result<()> {
    match attrs.iter().find(|a| a.path().is_ident("shape")) {
        Some(attr) => Err(syn::Error::new_spanned(attr, ON_A_FIELD)),
        None => Ok(()),
    }
}

/// A variant attribute that changes the variant's form or index is refused.
fn refuse_variant_attributes(attrs: &[Attribute]) -> syn::Result<()> {
    serde_items(attrs, |item, span| match item.as_str() {
        "skip" | "skip_serializing" | "skip_deserializing" | "other" | "untagged" | "with"
        | "serialize_with" | "deserialize_with" => {
            Err(syn::Error::new(span, by_hand(&format!("#[serde({item})]"))))
        }
        _ => Ok(()),
    })
}

/// How a field travels, from its serde attributes (and `#[shape(same_as)]`).
enum FieldForm {
    /// As its type: `<T as Shape>::SHAPE`.
    Type,
    /// Not at all (`skip`).
    Skipped,
    /// Through one of typed-ipc's own `with` modules: this shape.
    Known(TokenStream),
    /// As `#[shape(same_as = "T")]` says: `<T as Shape>::SHAPE`.
    SameAs(Type),
}

/// `#[shape(same_as = "T")]` on a field: the type whose wire form the field has, which the
/// user vouches for (a field of another crate's type, written through `serde(with)`).
fn same_as(attrs: &[Attribute]) -> syn::Result<Option<Type>> {
    let mut same = None;
    for attr in attrs.iter().filter(|a| a.path().is_ident("shape")) {
        attr.parse_nested_meta(|meta| {
            if !meta.path.is_ident("same_as") {
                return Err(meta.error(
                    "unknown `shape` attribute: the one there is `#[shape(same_as = \"T\")]`, \
                     the type whose wire form this field has",
                ));
            }
            if same.is_some() {
                return Err(meta.error(
                    "a second `same_as` on this field: a field has one wire form, say it once",
                ));
            }
            let lit: syn::LitStr = meta.value()?.parse()?;
            same = Some(lit.parse::<Type>().map_err(|e| {
                syn::Error::new(lit.span(), format!("`same_as` names a type: {e}"))
            })?);
            Ok(())
        })?;
    }
    Ok(same)
}

/// The `with = "..."` modules of typed-ipc, and how each writes its field: named through
/// `typed_ipc`, or through the type's `#[shape(crate = "...")]` path.
fn known_with(path: &str) -> Option<FieldForm> {
    let m = shape_module();
    let unspaced = |tokens: TokenStream| tokens.to_string().replace(' ', "");
    let given = unspaced(krate::path());
    let given = given.trim_start_matches("::");
    let path = path.trim_start_matches("::");
    let module = path
        .strip_prefix("typed_ipc::")
        .or_else(|| path.strip_prefix(given)?.strip_prefix("::"))?;
    match module {
        "fd" => Some(FieldForm::Known(quote!(#m::FD))),
        // The fds' carriers (`OwnedFd`, `Option<OwnedFd>`, `Vec<OwnedFd>`, `Result<_, E>`)
        // are written as their types are, each fd as an index.
        "fds" => Some(FieldForm::Type),
        "bytes" => Some(FieldForm::Known(quote!(#m::BYTE_STRING))),
        _ => None,
    }
}

fn field_form(attrs: &[Attribute]) -> syn::Result<FieldForm> {
    let same = same_as(attrs)?;
    // With `same_as`, the user has said what a `with` writes.
    let vouched = same.is_some();
    let mut form = match same {
        Some(ty) => FieldForm::SameAs(ty),
        None => FieldForm::Type,
    };
    let (mut skipped, mut not_written, mut not_read) = (false, None, None);
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            let item = item_name(&meta);
            let span = meta.path.span();
            match item.as_str() {
                "skip" => {
                    skipped = true;
                    skip_value(&meta)
                }
                "skip_serializing" => {
                    not_written = Some(span);
                    skip_value(&meta)
                }
                "skip_deserializing" => {
                    not_read = Some(span);
                    skip_value(&meta)
                }
                "with" | "serialize_with" | "deserialize_with" if vouched => skip_value(&meta),
                "with" => {
                    let lit: syn::LitStr = meta.value()?.parse()?;
                    match known_with(&lit.value()) {
                        Some(with) => {
                            form = with;
                            Ok(())
                        }
                        None => Err(syn::Error::new(
                            lit.span(),
                            unvouched(&format!("#[serde(with = \"{}\")]", lit.value())),
                        )),
                    }
                }
                "serialize_with" | "deserialize_with" => Err(syn::Error::new(
                    span,
                    unvouched(&format!("#[serde({item})]")),
                )),
                // No shape could help: bincode writes no field names, so the reader cannot
                // tell a field left out from the next one.
                "skip_serializing_if" => Err(syn::Error::new(
                    span,
                    "`#[serde(skip_serializing_if)]` breaks bincode, which writes no field \
                     names: a field left out makes the reader take the next field's bytes for \
                     it. Remove it (or skip the field both ways, `#[serde(skip)]`)",
                )),
                "flatten" | "getter" => {
                    Err(syn::Error::new(span, by_hand(&format!("#[serde({item})]"))))
                }
                _ => skip_value(&meta),
            }
        })?;
    }
    // Skipped one way only, a field is written and not read back, or read and never written:
    // bincode's form then differs by direction, which no one shape describes.
    match (skipped, not_written, not_read) {
        (true, ..) | (false, Some(_), Some(_)) => Ok(FieldForm::Skipped),
        (false, Some(span), None) | (false, None, Some(span)) => Err(syn::Error::new(
            span,
            "a field skipped one way only is written and not read, or read and not written: \
             bincode, which writes no field names, then reads the next field's bytes as this \
             one's, or this one's as the next's; skip it both ways (`#[serde(skip)]`)",
        )),
        (false, None, None) => Ok(form),
    }
}

/// The name of a `#[serde(...)]` item (`skip`, `with`, ...), empty for a path of several.
fn item_name(meta: &syn::meta::ParseNestedMeta<'_>) -> String {
    meta.path
        .get_ident()
        .map(Ident::to_string)
        .unwrap_or_default()
}

/// Calls `each` with every item of the `#[serde(...)]` attributes in `attrs` (its name and
/// span), skipping values.
fn serde_items(
    attrs: &[Attribute],
    mut each: impl FnMut(String, Span) -> syn::Result<()>,
) -> syn::Result<()> {
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            let item = item_name(&meta);
            each(item, meta.path.span())?;
            skip_value(&meta)
        })?;
    }
    Ok(())
}

/// Consumes the value of a serde item, `= value` or `(...)`, which the shape does not need.
fn skip_value(meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(syn::Token![=]) {
        meta.value()?.parse::<syn::Expr>()?;
    } else if meta.input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in meta.input);
        content.parse::<TokenStream>()?;
    }
    Ok(())
}

/// The shapes of `fields` that travel, in order. `name` is the type being derived: where a
/// field's type names it (or `Self`), its shape is `typed_ipc::shape::RECURSION`, so that
/// a directly recursive type is not defined by itself, and `recursive` is set. It must name
/// it with `own_arguments` (its type and const parameters): `Chain<u8>` inside `Chain<T>` is
/// another type, which `RECURSION` would pass for this one.
fn fields(
    fields: &Fields,
    name: &Ident,
    own_arguments: &[String],
    recursive: &mut bool,
    bounded: &mut Bounded,
) -> syn::Result<Vec<TokenStream>> {
    let mut shapes = Vec::new();
    for field in fields {
        let form = field_form(&field.attrs)?;
        // Not on the wire: whatever its type names, nothing of it is followed.
        if let FieldForm::Skipped = form {
            continue;
        }
        let mut ty = field.ty.clone();
        let mut names_itself = false;
        let mut reference = SelfReference {
            name,
            own_arguments,
            found: &mut names_itself,
            other_arguments: None,
            inside: 0,
            inside_other_type: None,
            names: 0,
            containers: Vec::new(),
        };
        reference.visit_type_mut(&mut ty);
        let containers = std::mem::take(&mut reference.containers);
        if let Some(span) = reference.inside_other_type {
            return Err(syn::Error::new(
                span,
                format!(
                    "#[derive(typed_ipc::Shape)] follows a type that names itself only directly \
                     or inside the standard containers (`Box`, `Vec`, `Option`, a map, a tuple, \
                     ...): inside another generic type, which may name itself too, the two \
                     recursions would not be told apart. Implement `typed_ipc::Shape` for \
                     `{name}` by hand"
                ),
            ));
        }
        if let Some(span) = reference.other_arguments {
            return Err(syn::Error::new(
                span,
                format!(
                    "#[derive(typed_ipc::Shape)] follows a type that names itself only with its \
                     own type arguments (`{name}<{}>` or `Self`): implement `typed_ipc::Shape` \
                     by hand",
                    own_arguments.join(", ")
                ),
            ));
        }
        match form {
            FieldForm::Skipped => {}
            FieldForm::Known(shape) => {
                *recursive |= names_itself;
                shapes.push(shape)
            }
            FieldForm::Type => {
                *recursive |= names_itself;
                bounded.containers.extend(containers);
                syn::visit::Visit::visit_type(bounded, &ty);
                let k = krate::path_at(field.ty.span());
                shapes.push(quote_spanned! {field.ty.span()=>
                    <#ty as #k::Shape>::SHAPE
                })
            }
            FieldForm::SameAs(same) => {
                syn::visit::Visit::visit_type(bounded, &same);
                let k = krate::path_at(same.span());
                shapes.push(quote_spanned! {same.span()=>
                    <#same as #k::Shape>::SHAPE
                })
            }
        }
    }
    Ok(shapes)
}

/// Replaces the type being derived, and `Self`, with `typed_ipc::shape::Recursion`, and says
/// whether it did in `found`.
struct SelfReference<'a> {
    name: &'a Ident,
    own_arguments: &'a [String],
    found: &'a mut bool,
    /// Where the type names itself with other arguments than its parameters.
    other_arguments: Option<Span>,
    /// How many generic types outside [`CONTAINERS`] the visit is inside.
    inside: usize,
    /// Where the type names itself inside one of those: a type that names itself too binds
    /// the `RECURSION` it is given as its own, so the derive refuses it.
    inside_other_type: Option<Span>,
    /// How many times the type names itself, so far.
    names: usize,
    /// The generic types taken for [`CONTAINERS`] that the type is named inside, as
    /// rewritten, each with its span: the impl asks them to be the standard library's.
    containers: Vec<(Type, Span)>,
}

/// The generic types whose shapes hold no `shape::recursive` of their own, so that a
/// `RECURSION` given to them still stands for the type being derived.
const CONTAINERS: &[&str] = &[
    "Box",
    "Vec",
    "Option",
    "Result",
    "Rc",
    "Arc",
    "Cow",
    "VecDeque",
    "LinkedList",
    "BinaryHeap",
    "BTreeSet",
    "HashSet",
    "BTreeMap",
    "HashMap",
    "PhantomData",
    "RefCell",
    "Cell",
    "Mutex",
    "RwLock",
    "Reverse",
    "Wrapping",
    "Saturating",
    "Range",
    "RangeInclusive",
    "RangeFrom",
    "RangeTo",
    "Bound",
];

impl SelfReference<'_> {
    /// Whether `arguments` (lifetimes aside, which do not change a shape) are the type's
    /// own parameters, in order, as the type's name (not `Self`) takes them.
    fn are_own(&self, arguments: &syn::PathArguments) -> bool {
        let given: Vec<String> = match arguments {
            // With parameters, the bare name is the type at their defaults: another type.
            syn::PathArguments::None => return self.own_arguments.is_empty(),
            syn::PathArguments::AngleBracketed(angled) => angled
                .args
                .iter()
                .filter(|a| !matches!(a, syn::GenericArgument::Lifetime(_)))
                .map(|a| quote!(#a).to_string())
                .collect(),
            syn::PathArguments::Parenthesized(_) => return false,
        };
        given == self.own_arguments
    }
}

impl VisitMut for SelfReference<'_> {
    fn visit_type_mut(&mut self, ty: &mut Type) {
        if let Type::Path(path) = ty {
            let segments = &path.path.segments;
            let is_self = path.qself.is_none()
                && path.path.leading_colon.is_none()
                && segments.len() == 1
                && (segments[0].ident == *self.name || segments[0].ident == "Self");
            if is_self {
                let own = segments[0].ident == "Self" || self.are_own(&segments[0].arguments);
                if !own {
                    self.other_arguments = Some(segments[0].span());
                }
                if self.inside > 0 {
                    self.inside_other_type.get_or_insert(segments[0].span());
                }
                let m = shape_module();
                *ty = syn::parse_quote!(#m::Recursion);
                *self.found = true;
                self.names += 1;
                return;
            }
            let generic = segments
                .last()
                .filter(|last| !matches!(last.arguments, syn::PathArguments::None));
            let container = generic.is_some_and(|last| CONTAINERS.iter().any(|c| last.ident == c));
            let other = generic.is_some() && !container;
            let (names_before, span) = (self.names, ty.span());
            self.inside += usize::from(other);
            syn::visit_mut::visit_type_mut(self, ty);
            self.inside -= usize::from(other);
            if container && self.names > names_before {
                self.containers.push((ty.clone(), span));
            }
            return;
        }
        syn::visit_mut::visit_type_mut(self, ty);
    }
}

/// The type parameters and associated types (`T::Wire`, `<T as Codec>::Wire`) the shaped
/// fields' types name, outside `PhantomData`s (whose shape is the same whatever they hold):
/// what the impl must bound by `Shape`.
struct Bounded {
    params: Vec<Ident>,
    used: Vec<Ident>,
    projections: Vec<Type>,
    /// The generic types, taken for standard containers, that the type is named inside.
    containers: Vec<(Type, Span)>,
}

impl<'ast> syn::visit::Visit<'ast> for Bounded {
    fn visit_type_path(&mut self, path: &'ast syn::TypePath) {
        let segments = &path.path.segments;
        let first = segments.first().map(|s| &s.ident);
        let from_param = first.is_some_and(|first| self.params.contains(first));
        if path.qself.is_some() || (from_param && segments.len() > 1) {
            let ty = Type::Path(path.clone());
            if !self.projections.contains(&ty) {
                self.projections.push(ty);
            }
            return;
        }
        if let (true, Some(first)) = (from_param && path.path.leading_colon.is_none(), first) {
            if !self.used.contains(first) {
                self.used.push(first.clone());
            }
            return;
        }
        if segments.last().is_some_and(|s| s.ident == "PhantomData") {
            return;
        }
        syn::visit::visit_type_path(self, path);
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    /// With `#[shape(crate = "...")]`, the impl names typed-ipc only by the path given, a
    /// recursive and generic type's included; without it, by `::typed_ipc`.
    #[test]
    fn the_crate_attribute_names_typed_ipc_everywhere() {
        let derive = |attr| {
            let input = quote! {
                #attr
                struct Tree<T> {
                    value: T,
                    children: Vec<Tree<T>>,
                    #[serde(with = "::facade::ipc::bytes")]
                    data: Vec<u8>,
                }
            };
            super::derive(input).map(|tokens| tokens.to_string())
        };
        let given = derive(quote!(#[shape(crate = "::facade::ipc")])).unwrap();
        assert!(!given.contains("typed_ipc"), "{given}");
        assert!(given.contains("BYTE_STRING"), "{given}");
        // Not given, the facade's `with` path is not typed-ipc's.
        let error = derive(quote!()).unwrap_err().to_string();
        assert!(error.contains("cannot see the wire form"), "{error}");
        let wrong = derive(quote!(#[shape(same_as = "u8")]))
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("goes on a field"), "{wrong}");
    }
}
