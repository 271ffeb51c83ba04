use serde::{Deserialize, Serialize};

// A field skipped one way only is written and not read, or read and not written: with bincode
// the type's form differs by direction, which no shape describes. Refused at the attribute.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct NotWritten {
    pub a: u32,
    #[serde(skip_serializing)]
    pub b: u32,
}

#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct NotRead {
    pub a: u32,
    #[serde(skip_deserializing)]
    pub b: u32,
}

// Skipped both ways, in one attribute or two, is skipped.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Skipped {
    pub a: u32,
    #[serde(skip_serializing, skip_deserializing)]
    pub b: u32,
    #[serde(skip_serializing)]
    #[serde(skip_deserializing)]
    pub c: u32,
    #[serde(skip)]
    pub d: u32,
}

fn main() {}
