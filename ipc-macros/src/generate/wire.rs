//! A value's wrapping for the codec, by how it travels ([`Wire`]): what the generated code
//! encodes a value as, and the type and pattern it decodes one with.

use proc_macro2::{Ident, TokenStream};
use quote::quote;

use super::private;
use crate::model::{Value, Wire};
use crate::types::is_fd;

/// A value the async flavour owns, wrapped for the codec and taken by value: `value`,
/// `Fd(&value)` (the fds stay with `value`, which outlives the send) or `Bytes(value)`.
pub(super) fn encode_owned(value: TokenStream, wire: Wire) -> TokenStream {
    let p = private();
    match wire {
        Wire::Serde => value,
        Wire::Fd => quote!(#p::Fd(&#value)),
        Wire::Bytes => quote!(#p::Bytes(#value)),
        Wire::CarriedBytes => quote!(#p::CarriedBytes(&#value)),
    }
}

/// A reference to a value, wrapped for the codec: `value`, `Fd(value)` or `Bytes(value)`.
pub(super) fn encode(value: TokenStream, wire: Wire) -> TokenStream {
    let p = private();
    match wire {
        Wire::Serde => value,
        Wire::Fd => quote!(&#p::Fd(#value)),
        Wire::Bytes => quote!(&#p::Bytes(#value)),
        Wire::CarriedBytes => quote!(&#p::CarriedBytes(#value)),
    }
}

/// A client argument in the tuple that is sent: moved in, or borrowed into its wrapper (the
/// parameter lives until the message is sent, and an fd is closed after). A `Vec<u8>`
/// parameter's stub takes anything that converts into `CallBytes` (a `Vec`, which the
/// connection may pipe and keeps the bytes of until the peer has read them, or borrowed bytes);
/// the bytes of an `Option<Vec<u8>>` or `Result<Vec<u8>, E>` are moved into one. An `OwnedFd`
/// parameter's stub takes any `impl AsFd`, sent borrowed (`SendFd`).
pub(super) fn encode_arg(name: &Ident, value: &Value, oneway: bool) -> TokenStream {
    let p = private();
    match value.wire {
        Wire::Serde => quote!(#name),
        Wire::Fd if is_fd(&value.ty) => quote!(#p::SendFd(::std::os::fd::AsFd::as_fd(&#name))),
        Wire::Fd => quote!(#p::Fd(&#name)),
        Wire::Bytes => quote!(::core::convert::Into::<#p::CallBytes<'_>>::into(#name)),
        Wire::CarriedBytes if oneway => quote!(#p::CarriedBytes(&#name)),
        Wire::CarriedBytes => quote!(#p::BytesCarrier::into_call(#name)),
    }
}

/// The type a client stub takes for a parameter of type `ty`: the type itself, but for a
/// `Vec<u8>` anything that converts into `CallBytes<#lifetime>`, so that a caller may send
/// borrowed bytes without building a `Vec` for the call, and for an `OwnedFd` any `AsFd`, so
/// that a caller may send an fd it keeps (`&file`, `fd.as_fd()`) without duplicating it.
pub(super) fn stub_param_type(value: &Value, lifetime: &TokenStream) -> TokenStream {
    let (p, ty) = (private(), &value.ty);
    match value.wire {
        Wire::Bytes => quote!(impl ::core::convert::Into<#p::CallBytes<#lifetime>>),
        Wire::Fd if is_fd(ty) => quote!(impl ::std::os::fd::AsFd),
        Wire::Serde | Wire::Fd | Wire::CarriedBytes => quote!(#ty),
    }
}

/// The type a value is decoded as: `T`, `Fd<T>` or `Bytes<T>`.
pub(super) fn decode_type(value: &Value) -> TokenStream {
    let (p, ty) = (private(), &value.ty);
    match value.wire {
        Wire::Serde => quote!(#ty),
        Wire::Fd => quote!(#p::Fd<#ty>),
        Wire::Bytes => quote!(#p::Bytes<#ty>),
        Wire::CarriedBytes => quote!(#p::CarriedBytes<#ty>),
    }
}

/// The pattern that unwraps a decoded value into `name`.
pub(super) fn decode_pattern(name: &Ident, value: &Value) -> TokenStream {
    let p = private();
    match value.wire {
        Wire::Serde => quote!(#name),
        Wire::Fd => quote!(#p::Fd(#name)),
        Wire::Bytes => quote!(#p::Bytes(#name)),
        Wire::CarriedBytes => quote!(#p::CarriedBytes(#name)),
    }
}
