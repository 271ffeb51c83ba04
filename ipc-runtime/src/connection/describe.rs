//! A message's values as one short line of Rust-like text, for `TYPED_IPC_DEBUG`: any
//! `Serialize` value, written by a serde serializer of its own (bincode's bytes cannot be
//! read back without the types, so the sender describes what it sends).
//!
//! The serializer says it is human-readable, so typed-ipc's own types write what they are
//! rather than how they travel: a byte string as `b"…"` (not its wire tag), an fd as `fd(7)`
//! (its number in the sending process, not its index in the message). Long values are cut
//! short: byte strings and strings after [`SHOWN_BYTES`], sequences and maps after
//! [`SHOWN_ITEMS`] (saying how many more), the whole line after [`MAX_LINE`].

use std::fmt::{self, Display, Write};

use serde::Serialize;
use serde::ser::{self, Serializer};

/// Bytes of a byte string, or characters of a string, shown.
const SHOWN_BYTES: usize = 32;
/// Elements of a sequence or entries of a map shown.
const SHOWN_ITEMS: usize = 16;
/// The longest description; past it, `…`.
const MAX_LINE: usize = 1_000;

/// `value` as one line, e.g. `("hello", fd(7), b"\x01\x02" (2 bytes))`.
pub(crate) fn describe<T: Serialize + ?Sized>(value: &T) -> String {
    let mut text = Text::default();
    match value.serialize(&mut text) {
        Ok(()) => {}
        Err(e) => {
            let _ = write!(text.out, "<{e}>");
        }
    }
    if text.out.len() > MAX_LINE {
        let mut end = MAX_LINE;
        while !text.out.is_char_boundary(end) {
            end -= 1;
        }
        text.out.truncate(end);
        text.out.push('…');
    }
    text.out
}

#[derive(Default)]
struct Text {
    out: String,
}

impl Text {
    fn put(&mut self, s: impl Display) {
        // Past the limit nothing more is written; serde still walks the rest of the value.
        if self.out.len() <= MAX_LINE {
            let _ = write!(self.out, "{s}");
        }
    }

    fn open<'t>(
        &'t mut self,
        name: &str,
        open: &str,
        close: &'static str,
        len: Option<usize>,
    ) -> Items<'t> {
        self.put(format_args!("{name}{open}"));
        Items {
            text: self,
            count: 0,
            len,
            close,
        }
    }
}

/// The elements of a compound value being written.
struct Items<'t> {
    text: &'t mut Text,
    count: usize,
    len: Option<usize>,
    close: &'static str,
}

impl Items<'_> {
    /// Writes the separator and `label` before the next element, and says whether the
    /// element is shown.
    fn next(&mut self, label: Option<&str>) -> bool {
        self.count += 1;
        if self.count > SHOWN_ITEMS {
            return false;
        }
        if self.count > 1 {
            self.text.put(", ");
        }
        if let Some(label) = label {
            self.text.put(format_args!("{label}: "));
        }
        true
    }

    fn element<T: Serialize + ?Sized>(&mut self, label: Option<&str>, v: &T) -> Result<(), Error> {
        if self.next(label) {
            v.serialize(&mut *self.text)?;
        }
        Ok(())
    }

    fn end(self) -> Result<(), Error> {
        if self.count > SHOWN_ITEMS {
            // A `Serialize` may write more elements than it announced.
            let more = self.len.unwrap_or(0).max(self.count) - SHOWN_ITEMS;
            self.text.put(format_args!(", … {more} more"));
        }
        self.text.put(self.close);
        Ok(())
    }
}

/// Why a value could not be described (its `Serialize` failed).
#[derive(Debug)]
pub(crate) struct Error(String);

impl Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<T: Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

/// Serializer methods that write a value as `Display` shows it, or (`?`) as `Debug` does.
macro_rules! plain {
    ($($method:ident: $ty:ty $(as $debug:tt)?),* $(,)?) => {
        $(fn $method(self, v: $ty) -> Result<(), Error> {
            self.put(plain!(@show v $($debug)?));
            Ok(())
        })*
    };
    (@show $v:ident) => { format_args!("{}", $v) };
    (@show $v:ident ?) => { format_args!("{:?}", $v) };
}

impl<'t> Serializer for &'t mut Text {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Items<'t>;
    type SerializeTuple = Items<'t>;
    type SerializeTupleStruct = Items<'t>;
    type SerializeTupleVariant = Items<'t>;
    type SerializeMap = Items<'t>;
    type SerializeStruct = Items<'t>;
    type SerializeStructVariant = Items<'t>;

    plain!(serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_i128: i128, serialize_u8: u8, serialize_u16: u16,
        serialize_u32: u32, serialize_u64: u64, serialize_u128: u128);

    plain!(serialize_f32: f32 as ?, serialize_f64: f64 as ?, serialize_char: char as ?);
    fn serialize_str(self, v: &str) -> Result<(), Error> {
        match v.char_indices().nth(SHOWN_BYTES) {
            None => self.put(format_args!("{v:?}")),
            Some((cut, _)) => {
                let chars = v.chars().count();
                self.put(format_args!("{:?}… ({chars} chars)", &v[..cut]));
            }
        }
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Error> {
        let shown = &v[..v.len().min(SHOWN_BYTES)];
        self.put(format_args!("b\"{}\"", shown.escape_ascii()));
        if shown.len() < v.len() {
            self.put(format_args!("… ({} bytes)", v.len()));
        }
        Ok(())
    }
    fn serialize_none(self) -> Result<(), Error> {
        self.put("None");
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<(), Error> {
        self.serialize_newtype_struct("Some", v)
    }
    fn serialize_unit(self) -> Result<(), Error> {
        self.put("()");
        Ok(())
    }
    fn serialize_unit_struct(self, name: &'static str) -> Result<(), Error> {
        self.put(name);
        Ok(())
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), Error> {
        self.put(variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        v: &T,
    ) -> Result<(), Error> {
        let mut items = self.open(name, "(", ")", Some(1));
        items.element(None, v)?;
        items.end()
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<(), Error> {
        self.serialize_newtype_struct(variant, v)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Items<'t>, Error> {
        Ok(self.open("", "[", "]", len))
    }
    fn serialize_tuple(self, len: usize) -> Result<Items<'t>, Error> {
        Ok(self.open("", "(", ")", Some(len)))
    }
    fn serialize_tuple_struct(self, name: &'static str, len: usize) -> Result<Items<'t>, Error> {
        Ok(self.open(name, "(", ")", Some(len)))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Items<'t>, Error> {
        Ok(self.open(variant, "(", ")", Some(len)))
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Items<'t>, Error> {
        Ok(self.open("", "{", "}", len))
    }
    fn serialize_struct(self, name: &'static str, len: usize) -> Result<Items<'t>, Error> {
        Ok(self.open(name, " { ", " }", Some(len)))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Items<'t>, Error> {
        Ok(self.open(variant, " { ", " }", Some(len)))
    }
}

/// The compound serializers whose elements are values, with a label or without.
macro_rules! items {
    ($($trait:ident::$method:ident($($key:ident)?)),* $(,)?) => {$(
        impl ser::$trait for Items<'_> {
            type Ok = ();
            type Error = Error;
            fn $method<T: Serialize + ?Sized>(
                &mut self,
                $($key: &'static str,)?
                v: &T,
            ) -> Result<(), Error> {
                self.element(None $(.or(Some($key)))?, v)
            }
            fn end(self) -> Result<(), Error> {
                Items::end(self)
            }
        }
    )*};
}

items!(
    SerializeSeq::serialize_element(),
    SerializeTuple::serialize_element(),
    SerializeTupleStruct::serialize_field(),
    SerializeTupleVariant::serialize_field(),
    SerializeStruct::serialize_field(key),
    SerializeStructVariant::serialize_field(key),
);

impl ser::SerializeMap for Items<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        if self.next(None) {
            key.serialize(&mut *self.text)?;
            self.text.put(": ");
        }
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        // The count was taken by the key.
        if self.count <= SHOWN_ITEMS {
            v.serialize(&mut *self.text)?;
        }
        Ok(())
    }
    fn end(self) -> Result<(), Error> {
        Items::end(self)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::fd::{AsRawFd, OwnedFd};

    use serde::Serialize;

    use super::describe;
    use crate::codec::{Bytes, Fd};

    #[derive(Serialize)]
    struct Config {
        width: u32,
        name: String,
        mode: Mode,
    }

    #[derive(Serialize)]
    enum Mode {
        Fast,
        Scaled(f32),
        Crop { x: u16, y: u16 },
    }

    #[test]
    fn values_read_as_rust() {
        let config = Config {
            width: 640,
            name: "cam\"0".into(),
            mode: Mode::Crop { x: 1, y: 2 },
        };
        assert_eq!(
            describe(&(7u8, &config, Some(-1i64), None::<u8>, ())),
            r#"(7, Config { width: 640, name: "cam\"0", mode: Crop { x: 1, y: 2 } }, Some(-1), None, ())"#
        );
        assert_eq!(
            describe(&[Mode::Fast, Mode::Scaled(0.5)]),
            "(Fast, Scaled(0.5))"
        );
        assert_eq!(describe(&vec!['a']), "['a']");
        let map: BTreeMap<u8, bool> = [(1, true), (2, false)].into();
        assert_eq!(describe(&map), "{1: true, 2: false}");
    }

    /// Byte strings and fds are shown as what they are, not as they travel.
    #[test]
    fn byte_strings_and_fds_read_as_what_they_are() {
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let raw = fd.as_raw_fd();
        let fds = vec![fd];
        assert_eq!(
            describe(&(Bytes(&b"ab\x01"[..]), Fd(&fds))),
            format!(r#"(b"ab\x01", [fd({raw})])"#)
        );
    }

    /// A `Serialize` that writes more elements than it announced is described, not a panic.
    #[test]
    fn a_sequence_longer_than_announced_is_described() {
        struct Liar;
        impl Serialize for Liar {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeSeq;
                let mut seq = s.serialize_seq(Some(1))?;
                for i in 0..20u8 {
                    seq.serialize_element(&i)?;
                }
                seq.end()
            }
        }
        assert!(
            describe(&Liar).ends_with(", … 4 more]"),
            "{}",
            describe(&Liar)
        );
    }

    #[test]
    fn long_values_are_cut_short() {
        let bytes = [b'x'; 100];
        assert_eq!(
            describe(&Bytes(&bytes[..])),
            format!("b\"{}\"… (100 bytes)", "x".repeat(32))
        );
        assert_eq!(
            describe(&"é".repeat(40)),
            format!("\"{}\"… (40 chars)", "é".repeat(32))
        );
        let numbers: Vec<u32> = (0..20).collect();
        assert_eq!(
            describe(&numbers),
            "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, … 4 more]"
        );
        let long = describe(&vec![vec!["y".repeat(30); 16]; 16]);
        assert!(
            long.ends_with('…') && long.chars().count() <= 1_001,
            "{long}"
        );
    }
}
