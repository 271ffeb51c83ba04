use serde::{Deserialize, Serialize};
use typed_ipc::interface;

#[derive(Serialize, Deserialize)]
pub struct Config {
    pub width: u32,
}

#[derive(Serialize, Deserialize)]
pub struct Caps {
    pub max_width: u32,
}

// Under `check_types`, every parameter and return type needs a `Shape`: a missing one is
// reported at the type, saying to derive it.
#[interface(check_types)]
pub trait Ipa {
    fn configure(&self, cfg: Config) -> Option<Caps>;
}

// `check_types` is a bare word, given once.
#[interface(check_types = true)]
pub trait Valued {
    fn ping(&self);
}

#[interface(check_types, check_types)]
pub trait Twice {
    fn ping(&self);
}

fn main() {}
