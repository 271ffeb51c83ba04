use typed_ipc::interface;

#[interface]
pub trait Geometry {
    fn area(&self, (width, height): (u32, u32)) -> u64;
}

fn main() {}
