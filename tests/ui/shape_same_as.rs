use serde::{Deserialize, Serialize};

// `#[shape(...)]` knows one key, and `same_as` names a type.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct UnknownKey {
    #[shape(like = "u64")]
    pub when: u64,
}

#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct NotAType {
    #[shape(same_as = "not a type")]
    pub when: u64,
}

// (Without `same_as`, a `with` of another crate's is refused: shape_serde_attributes.rs.)

fn main() {}
