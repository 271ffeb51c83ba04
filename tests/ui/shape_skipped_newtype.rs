use serde::{Deserialize, Serialize};

// serde writes and reads a newtype struct's one field even when it is skipped: `Handle(7)`
// travels as a `u32`, not as nothing, which the skip would have its shape say (that of a
// unit struct). The derive refuses it rather than describe what is not written.
#[derive(Default, Serialize, Deserialize, typed_ipc::Shape)]
pub struct Handle(#[serde(skip)] u32);

// With a second field, or named, or in a variant, the skip is followed.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Pair(u8, #[serde(skip)] u32);

#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Named {
    #[serde(skip)]
    pub cached: u32,
}

#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub enum Variant {
    A(#[serde(skip)] u32),
    B,
}

fn main() {}
