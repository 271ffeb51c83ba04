// A name in a style rustc warns about is reported once, where the user wrote it (and where an
// `#[allow]` reaches), not again at each client, server and enum made from it.
#![deny(nonstandard_style)]

use typed_ipc::interface;

#[interface]
pub trait libfoo {
    fn GetURL(&self, URL: u32) -> u32;
}

fn main() {}
