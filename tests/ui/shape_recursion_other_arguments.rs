use serde::{Deserialize, Serialize};

// A type that names itself with other type arguments than its own is another type: its shape
// would pass for this one's (`Chain<u32>` holding a `Chain<u8>` against one holding a
// `Chain<u16>`), so the derive refuses it at the type it names.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Chain<T> {
    pub head: T,
    pub rest: Option<Box<Chain<u8>>>,
}

// Its own arguments, lifetimes aside, are followed.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Tree<'a, T> {
    pub name: &'a str,
    pub value: T,
    pub kids: Vec<Tree<'a, T>>,
}

fn main() {}
