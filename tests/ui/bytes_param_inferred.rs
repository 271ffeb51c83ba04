use typed_ipc::interface;

#[interface]
pub trait Frames {
    fn send(&self, frame: Vec<u8>) -> u64;
}

fn send(frames: &FramesClient) {
    // The stub takes anything that converts into bytes to send (`impl Into<CallBytes>`), so
    // an argument that took its type from a `Vec<u8>` parameter must name it now
    // (`collect::<Vec<u8>>()`): the breakage the guide and `#[interface]`'s docs tell of.
    let _ = frames.send((0..4u8).collect());
}

fn main() {}
