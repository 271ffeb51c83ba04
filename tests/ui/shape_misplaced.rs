use serde::{Deserialize, Serialize};

// `#[shape(same_as)]` says what a field's `with` writes: on the type or on a variant it would
// say nothing, and is refused rather than ignored.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
#[shape(same_as = "[u8; 16]")]
pub struct OnTheType {
    pub id: u128,
}

#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub enum OnAVariant {
    #[shape(same_as = "u64")]
    A(u32),
    B,
}

// The type's one `#[shape]`: the path to typed-ipc, once.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
#[shape(crate = "::typed_ipc", crate = "::typed_ipc")]
pub struct CrateTwice {
    pub id: u32,
}

#[derive(Serialize, Deserialize, typed_ipc::Shape)]
#[shape(crate = "not a path")]
pub struct CrateNotAPath {
    pub id: u32,
}

fn main() {}
