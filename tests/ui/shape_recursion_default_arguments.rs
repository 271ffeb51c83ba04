use serde::{Deserialize, Serialize};

// Named without arguments, a type with defaulted parameters is the type at its defaults, not
// this one: `Chain<u32>` holds `Chain<u8>`s, and its shape would pass for that of a type that
// holds its own kind (`struct Other<T> { head: T, rest: Option<Box<Other<T>>> }` at `u32`),
// so the derive refuses it as it refuses other arguments.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Chain<T = u8> {
    pub head: T,
    pub rest: Option<Box<Chain>>,
}

fn main() {}
