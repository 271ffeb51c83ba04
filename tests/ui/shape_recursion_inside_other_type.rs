use serde::{Deserialize, Serialize};

// A type that names itself inside another generic type: `Tree` names itself too, and would
// take the `RECURSION` it is given for its own, so that `Outer` (whose `v` is an `Outer`, a
// `Tree` and a `u8`) and a `Tree3` in its place (whose `v` is a `Tree3`) would pass as one.
// Refused where it names itself.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Tree<T> {
    pub v: Box<T>,
    pub kids: Vec<Tree<T>>,
}

#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Outer {
    pub t: Tree<Outer>,
    pub x: u8,
}

// Inside the standard containers it is followed.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Node {
    pub kids: Vec<Option<Box<Node>>>,
    pub by_name: std::collections::BTreeMap<String, (Node, u8)>,
    pub parent: Result<Box<Self>, String>,
}

fn main() {}
