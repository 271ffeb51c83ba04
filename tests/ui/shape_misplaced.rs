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

fn main() {}
