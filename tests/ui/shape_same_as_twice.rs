use serde::{Deserialize, Serialize};

// A field has one wire form: a second `same_as` is refused, not taken over the first.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct TwoForms {
    #[shape(same_as = "u64")]
    #[shape(same_as = "[u8; 8]")]
    pub when: u64,
}

fn main() {}
