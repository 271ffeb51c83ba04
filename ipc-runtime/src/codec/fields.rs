//! Messages field by field, as the generated code sends them: a tuple whose elements are each
//! a [`Value`] (any serde type), a [`Bytes`] byte string or an [`Fd`] carrier, or one such
//! field alone. The bytes are exactly those of the same tuple encoded with serde (bincode
//! writes a tuple as its elements one after the other); only the way there differs.
//!
//! A byte string is written and read here directly, without serde or bincode: a tag, a length
//! and the bytes (or where the out-of-line store put them). Going through serde's generic
//! machinery cost a 64-byte `echo` about 0.05x of the bare-socket round trip, far more than
//! its instruction count suggests. Every other field goes through bincode, one field at a
//! time, as before.

use std::io;

use bincode::Options;
use bincode::de::read::BincodeRead;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Bytes, Fd, FdCarrier, Placed, fetch, options, out_of_line};
use crate::error::{Error, Result};

/// A serde value as one field of a message: `Value(value)` or `Value(&value)` to send,
/// `Value<T>` to receive.
#[derive(Debug)]
pub struct Value<T>(pub T);

/// A message body to send: one field ([`Value`], [`Bytes`], [`Fd`]) or a tuple of them.
pub trait Encode {
    /// Appends the encoding to `out`; fds go to the table of the encode running on this
    /// thread.
    fn encode(&self, out: &mut Vec<u8>) -> Result<()>;
}

/// A message body to receive: one field ([`Value`], [`Bytes`], [`Fd`]) or a tuple of them.
pub trait Decode: Sized {
    /// Reads the value from the front of `input`; fds come from the table of the decode
    /// running on this thread.
    fn decode(input: &mut Input<'_>) -> Result<Self>;
}

/// What is left of a message's bytes while it is decoded field by field.
#[derive(Debug)]
pub struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Input { rest: bytes }
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// The next `len` bytes; checked against what is there before anything is allocated.
    fn take(&mut self, len: u64) -> Result<&'a [u8]> {
        let have = self.rest.len();
        match usize::try_from(len) {
            Ok(len) if len <= have => {
                let (head, rest) = self.rest.split_at(len);
                self.rest = rest;
                Ok(head)
            }
            _ => Err(Error::Malformed(format!(
                "a field announces {len} bytes, {have} are left in the message"
            ))),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let bytes = self.take(N as u64)?;
        Ok(bytes.try_into().expect("took N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

impl io::Read for Input<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.rest.read(buf)
    }
}

/// Lets bincode read one field and leave `rest` after it.
impl<'a> BincodeRead<'a> for &mut Input<'a> {
    fn forward_read_str<V: serde::de::Visitor<'a>>(
        &mut self,
        length: usize,
        visitor: V,
    ) -> bincode::Result<V::Value> {
        let bytes = self.take(length as u64).map_err(bincode_error)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => visitor.visit_borrowed_str(s),
            Err(e) => Err(Box::new(bincode::ErrorKind::InvalidUtf8Encoding(e))),
        }
    }

    fn get_byte_buffer(&mut self, length: usize) -> bincode::Result<Vec<u8>> {
        self.take(length as u64)
            .map(<[u8]>::to_vec)
            .map_err(bincode_error)
    }

    fn forward_read_bytes<V: serde::de::Visitor<'a>>(
        &mut self,
        length: usize,
        visitor: V,
    ) -> bincode::Result<V::Value> {
        let bytes = self.take(length as u64).map_err(bincode_error)?;
        visitor.visit_borrowed_bytes(bytes)
    }
}

fn bincode_error(e: Error) -> bincode::Error {
    Box::new(bincode::ErrorKind::Custom(e.to_string()))
}

impl<T: Serialize> Encode for Value<T> {
    fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        options()
            .serialize_into(out, &self.0)
            .map_err(|e| Error::Encode(e.to_string()))
    }
}

impl<T: DeserializeOwned> Decode for Value<T> {
    fn decode(input: &mut Input<'_>) -> Result<Self> {
        // Limited to what is left: sizes announced inside are checked before allocating.
        let options = options().with_limit(input.remaining() as u64);
        let mut de = bincode::Deserializer::with_bincode_read(input, options);
        T::deserialize(&mut de)
            .map(Value)
            .map_err(|e| Error::Malformed(e.to_string()))
    }
}

impl<B: AsRef<[u8]>> Encode for Bytes<B> {
    fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        let bytes = self.0.as_ref();
        match out_of_line(bytes).map_err(|e| Error::Encode(e.into()))? {
            // Tag 1 and `Placed`'s fields, as bincode writes them.
            Some(placed) => {
                out.push(1);
                out.extend_from_slice(&placed.seq.to_le_bytes());
                out.extend_from_slice(&placed.fd.to_le_bytes());
                out.extend_from_slice(&placed.offset.to_le_bytes());
                out.extend_from_slice(&placed.len.to_le_bytes());
            }
            // Tag 0, then the bytes as bincode writes a byte string.
            None => {
                out.reserve(9 + bytes.len());
                out.push(0);
                out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
                out.extend_from_slice(bytes);
            }
        }
        Ok(())
    }
}

impl Decode for Bytes<Vec<u8>> {
    fn decode(input: &mut Input<'_>) -> Result<Self> {
        match input.array::<1>()?[0] {
            0 => {
                let len = input.u64()?;
                Ok(Bytes(input.take(len)?.to_vec()))
            }
            1 => {
                let placed = Placed {
                    seq: input.u32()?,
                    fd: input.u32()?,
                    offset: input.u64()?,
                    len: input.u64()?,
                };
                fetch(&placed).map(Bytes).map_err(Error::Malformed)
            }
            tag => Err(Error::Malformed(format!("unknown byte string tag {tag}"))),
        }
    }
}

impl<T: FdCarrier> Encode for Fd<&T> {
    fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        Value(self).encode(out)
    }
}

impl<T: FdCarrier> Decode for Fd<T> {
    fn decode(input: &mut Input<'_>) -> Result<Self> {
        Value::<Fd<T>>::decode(input).map(|Value(fd)| fd)
    }
}

impl<T: Encode + ?Sized> Encode for &T {
    fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        (**self).encode(out)
    }
}

macro_rules! tuple {
    ($($name:ident)*) => {
        impl<$($name: Encode),*> Encode for ($($name,)*) {
            #[allow(non_snake_case, unused_variables)]
            fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
                let ($($name,)*) = self;
                $($name.encode(out)?;)*
                Ok(())
            }
        }

        impl<$($name: Decode),*> Decode for ($($name,)*) {
            #[allow(unused_variables)]
            fn decode(input: &mut Input<'_>) -> Result<Self> {
                Ok(($($name::decode(input)?,)*))
            }
        }
    };
}

tuple!();
tuple!(A);
tuple!(A B);
tuple!(A B C);
tuple!(A B C D);
tuple!(A B C D E);
tuple!(A B C D E F);
tuple!(A B C D E F G);
tuple!(A B C D E F G H);
tuple!(A B C D E F G H I);
tuple!(A B C D E F G H I J);
tuple!(A B C D E F G H I J K);
tuple!(A B C D E F G H I J K L);
tuple!(A B C D E F G H I J K L M);
tuple!(A B C D E F G H I J K L M N);
tuple!(A B C D E F G H I J K L M N O);
tuple!(A B C D E F G H I J K L M N O P);
