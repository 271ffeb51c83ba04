use typed_ipc::interface;

// Both ends must agree on the command ids and the signature: a method that exists on one end
// only cannot be expressed.
#[interface]
pub trait Renderer {
    #[cfg(feature = "tokio")]
    fn render(&self, frame: u32) -> u32;
    #[cfg(not(feature = "tokio"))]
    fn render(&self, frame: u32, quality: u8) -> u32;
    #[cfg(any())]
    fn debug_only(&self);
    #[cfg_attr(debug_assertions, cmd(9))]
    fn stats(&self) -> u64;
    // Docs and lint levels leave the interface alone: accepted.
    #[cfg_attr(debug_assertions, doc = "Counted in debug builds.", allow(clippy::pedantic))]
    fn frames(&self) -> u64;
}

// The impl, written the same way, adds no error of its own: the `#[cfg]`s stay on the trait.
struct Frames;

impl Renderer for Frames {
    #[cfg(feature = "tokio")]
    fn render(&self, frame: u32) -> u32 {
        frame
    }
    #[cfg(not(feature = "tokio"))]
    fn render(&self, frame: u32, _quality: u8) -> u32 {
        frame
    }
    #[cfg(any())]
    fn debug_only(&self) {}
    fn stats(&self) -> u64 {
        0
    }
    fn frames(&self) -> u64 {
        0
    }
}

fn main() {}
