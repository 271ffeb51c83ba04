use serde::{Deserialize, Serialize};

// The serde attributes whose wire form `#[derive(Shape)]` cannot see are refused at the
// attribute, saying to implement `Shape` by hand.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Flattened {
    pub id: u32,
    #[serde(flatten)]
    pub rest: Inner,
}

#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Inner {
    pub a: u32,
}

#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct CustomWith {
    #[serde(with = "my_codec")]
    pub when: u64,
}

#[derive(Serialize, Deserialize, typed_ipc::Shape)]
#[serde(tag = "kind")]
pub enum Tagged {
    A { x: u32 },
    B { y: u32 },
}

#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub enum SkippedVariant {
    A,
    #[serde(skip)]
    B,
}

// A field bincode cannot leave out: no shape helps, and the message says to remove it.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Conditional {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

// A field that names a type without a `Shape` is reported at its type.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Unshaped {
    pub inner: NoShape,
}

#[derive(Serialize, Deserialize)]
pub struct NoShape;

mod my_codec {
    pub fn serialize<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        <u64 as serde::Deserialize>::deserialize(d)
    }
}

fn main() {}
