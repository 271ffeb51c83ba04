//! A serde `Deserializer` around bincode's that bounds what the lengths in a hostile message
//! can make a decode do.
//!
//! bincode trusts a sequence's or map's length prefix. serde preallocates from it (up to
//! 1 MiB a sequence, so a recursive type such as `struct Nest(Vec<Nest>)` reserves 1 MiB at
//! every level of a short message), and a sequence of values that take no bytes (`Vec<()>`)
//! runs as many times as its prefix says, up to 2^64, reading nothing. So a decode goes
//! through [`Bounded`], which
//! - charges every sequence and map its length when it starts, against one element for each
//!   byte of the message plus [`NO_BYTE_ELEMENTS`]: an honest message never runs out, since
//!   an element that is not a zero-byte value takes a byte at least, while a hostile length
//!   is refused before anything runs or is allocated;
//! - caps the size hints that serde preallocates from so that they add up to one element for
//!   each byte of the message at most, so a decode reserves room for no more elements than the
//!   message can hold.
//!
//! Everything else is passed through unchanged. Tuples, structs and enum variants have their
//! length from the type, not the message, so they are not charged, and a call's parameters
//! and byte strings (tuples) pay nothing.

use std::cell::Cell;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// Elements a message's sequences and maps may hold beyond one for each byte of the message:
/// room for values that take no bytes (`()`, unit structs, empty tuples). 2^20 of them cost
/// about a millisecond to decode.
pub(crate) const NO_BYTE_ELEMENTS: usize = 1 << 20;

/// What one decode may still do: the elements its sequences and maps may still announce.
pub(super) struct Budget {
    elements: Cell<usize>,
}

impl Budget {
    /// The budget of a message of `len` bytes.
    #[inline(always)]
    pub(super) fn new(len: usize) -> Self {
        Budget {
            // No overflow: a slice holds at most `isize::MAX` bytes.
            elements: Cell::new(len + NO_BYTE_ELEMENTS),
        }
    }

    /// Charges a sequence or map that announces `len` elements. bincode reports the length
    /// from the prefix as the size hint, exactly.
    #[inline(always)]
    fn charge<E: de::Error>(&self, len: Option<usize>) -> Result<(), E> {
        let len = len.unwrap_or(0);
        match self.elements.get().checked_sub(len) {
            Some(left) => {
                self.elements.set(left);
                Ok(())
            }
            None => Err(too_many(len)),
        }
    }

    /// `hint`, for a sequence or map already charged, capped so that the message's hints add
    /// up to no more than its bytes: what is left beyond [`NO_BYTE_ELEMENTS`] is at most the
    /// bytes minus every length charged so far, this one's included.
    #[inline(always)]
    fn hint(&self, hint: Option<usize>) -> Option<usize> {
        Some(hint?.min(self.elements.get().saturating_sub(NO_BYTE_ELEMENTS)))
    }
}

#[cold]
#[inline(never)]
fn too_many<E: de::Error>(len: usize) -> E {
    E::custom(format_args!(
        "a sequence or map announces {len} elements, more than the message can hold \
         (one for each of its bytes, and {NO_BYTE_ELEMENTS} that take no bytes)"
    ))
}

/// A deserializer whose sequences and maps, at any depth, are charged to `budget`.
pub(super) struct Bounded<'b, D> {
    pub(super) inner: D,
    pub(super) budget: &'b Budget,
}

/// A visitor whose sequences and maps are charged; `LENGTH_ON_WIRE`: a sequence it visits had
/// its length from the message (`deserialize_seq`), not from the type.
struct Visit<'b, V, const LENGTH_ON_WIRE: bool> {
    inner: V,
    budget: &'b Budget,
}

/// Passes `deserialize_*` methods to the inner deserializer with the visitor wrapped.
macro_rules! deserialize {
    ($($method:ident($($arg:ident: $ty:ty),*) $on_wire:literal;)*) => {$(
        #[inline(always)]
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
            let visitor = Visit::<V, $on_wire> { inner: visitor, budget: self.budget };
            self.inner.$method($($arg,)* visitor)
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Bounded<'_, D> {
    type Error = D::Error;

    deserialize! {
        deserialize_any() false;
        deserialize_bool() false;
        deserialize_i8() false;
        deserialize_i16() false;
        deserialize_i32() false;
        deserialize_i64() false;
        deserialize_i128() false;
        deserialize_u8() false;
        deserialize_u16() false;
        deserialize_u32() false;
        deserialize_u64() false;
        deserialize_u128() false;
        deserialize_f32() false;
        deserialize_f64() false;
        deserialize_char() false;
        deserialize_str() false;
        deserialize_string() false;
        deserialize_bytes() false;
        deserialize_byte_buf() false;
        deserialize_option() false;
        deserialize_unit() false;
        deserialize_unit_struct(name: &'static str) false;
        deserialize_newtype_struct(name: &'static str) false;
        deserialize_seq() true;
        deserialize_tuple(len: usize) false;
        deserialize_tuple_struct(name: &'static str, len: usize) false;
        deserialize_map() true;
        deserialize_struct(name: &'static str, fields: &'static [&'static str]) false;
        deserialize_enum(name: &'static str, variants: &'static [&'static str]) false;
        deserialize_identifier() false;
        deserialize_ignored_any() false;
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

/// Passes `visit_*` methods that carry a plain value to the inner visitor.
macro_rules! visit {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
        #[inline(always)]
        fn $method<E: de::Error>(self, $($arg: $ty),*) -> Result<Self::Value, E> {
            self.inner.$method($($arg),*)
        }
    )*};
}

impl<'de, V: Visitor<'de>, const LENGTH_ON_WIRE: bool> Visitor<'de>
    for Visit<'_, V, LENGTH_ON_WIRE>
{
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    visit! {
        visit_bool(v: bool);
        visit_i8(v: i8);
        visit_i16(v: i16);
        visit_i32(v: i32);
        visit_i64(v: i64);
        visit_i128(v: i128);
        visit_u8(v: u8);
        visit_u16(v: u16);
        visit_u32(v: u32);
        visit_u64(v: u64);
        visit_u128(v: u128);
        visit_f32(v: f32);
        visit_f64(v: f64);
        visit_char(v: char);
        visit_str(v: &str);
        visit_borrowed_str(v: &'de str);
        visit_string(v: String);
        visit_bytes(v: &[u8]);
        visit_borrowed_bytes(v: &'de [u8]);
        visit_byte_buf(v: Vec<u8>);
        visit_none();
        visit_unit();
    }

    #[inline(always)]
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.inner.visit_some(Bounded {
            inner: d,
            budget: self.budget,
        })
    }

    #[inline(always)]
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.inner.visit_newtype_struct(Bounded {
            inner: d,
            budget: self.budget,
        })
    }

    #[inline(always)]
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        if LENGTH_ON_WIRE {
            self.budget.charge(seq.size_hint())?;
        }
        self.inner.visit_seq(Access {
            inner: seq,
            budget: self.budget,
        })
    }

    #[inline(always)]
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.budget.charge(map.size_hint())?;
        self.inner.visit_map(Access {
            inner: map,
            budget: self.budget,
        })
    }

    #[inline(always)]
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_enum(Access {
            inner: data,
            budget: self.budget,
        })
    }
}

/// A sequence, map, enum or variant whose elements are deserialized through [`Bounded`].
struct Access<'b, A> {
    inner: A,
    budget: &'b Budget,
}

/// A seed that deserializes through [`Bounded`].
struct Seed<'b, S> {
    inner: S,
    budget: &'b Budget,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<'_, S> {
    type Value = S::Value;

    #[inline(always)]
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(Bounded {
            inner: d,
            budget: self.budget,
        })
    }
}

impl<'b, A> Access<'b, A> {
    #[inline(always)]
    fn seed<S>(&self, seed: S) -> Seed<'b, S> {
        Seed {
            inner: seed,
            budget: self.budget,
        }
    }

    #[inline(always)]
    fn visitor<V, const LENGTH_ON_WIRE: bool>(&self, visitor: V) -> Visit<'b, V, LENGTH_ON_WIRE> {
        Visit {
            inner: visitor,
            budget: self.budget,
        }
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Access<'_, A> {
    type Error = A::Error;

    #[inline(always)]
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.inner.next_element_seed(self.seed(seed))
    }

    #[inline(always)]
    fn size_hint(&self) -> Option<usize> {
        self.budget.hint(self.inner.size_hint())
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Access<'_, A> {
    type Error = A::Error;

    #[inline(always)]
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.inner.next_key_seed(self.seed(seed))
    }

    #[inline(always)]
    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.next_value_seed(self.seed(seed))
    }

    #[inline(always)]
    fn size_hint(&self) -> Option<usize> {
        self.budget.hint(self.inner.size_hint())
    }
}

impl<'b, 'de, A: EnumAccess<'de>> EnumAccess<'de> for Access<'b, A> {
    type Error = A::Error;
    type Variant = Access<'b, A::Variant>;

    #[inline(always)]
    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self::Variant), A::Error> {
        let seed = self.seed(seed);
        let (value, variant) = self.inner.variant_seed(seed)?;
        Ok((
            value,
            Access {
                inner: variant,
                budget: self.budget,
            },
        ))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Access<'_, A> {
    type Error = A::Error;

    #[inline(always)]
    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    #[inline(always)]
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        let seed = self.seed(seed);
        self.inner.newtype_variant_seed(seed)
    }

    #[inline(always)]
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        let visitor = self.visitor::<V, false>(visitor);
        self.inner.tuple_variant(len, visitor)
    }

    #[inline(always)]
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let visitor = self.visitor::<V, false>(visitor);
        self.inner.struct_variant(fields, visitor)
    }
}
