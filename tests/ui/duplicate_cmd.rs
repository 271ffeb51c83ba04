use typed_ipc::interface;

#[interface]
pub trait Pinned {
    #[cmd(7)]
    fn first(&self) -> u32;
    fn second(&self) -> u32;
    #[cmd(7)]
    fn third(&self) -> u32;
}

fn main() {}
