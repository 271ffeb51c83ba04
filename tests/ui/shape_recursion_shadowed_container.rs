use serde::{Deserialize, Serialize};

// A list of one's own, named as the standard library's is. It names itself, so its shape
// binds the `RECURSION`s given to it as its own: `Node`'s would stand for the list, and
// `Node` would pass for a type whose list holds lists, not `Node`s. The derive follows a type
// that names itself only inside the standard containers, and refuses the look-alike.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct LinkedList<T> {
    pub next: Option<Box<LinkedList<T>>>,
    pub item: Option<Box<T>>,
}

#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Node {
    pub kids: LinkedList<Node>,
    pub tag: u16,
}

// The standard library's own, by any path, are followed.
#[derive(Serialize, Deserialize, typed_ipc::Shape)]
pub struct Tree {
    pub kids: std::collections::LinkedList<Tree>,
    pub parent: Option<std::boxed::Box<Self>>,
    pub names: std::collections::BTreeMap<String, Vec<Tree>>,
}

fn main() {}
