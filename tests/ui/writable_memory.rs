use typed_ipc::interface;
use typed_ipc::shared_buffer::SharedBuffer;
use typed_ipc::shared_region::SharedRegion;

// The writable halves of shared memory stay with their maker; their read-only forms travel.
#[interface]
pub trait Frames {
    fn show(&self, frame: SharedBuffer);
    fn region(&self) -> SharedRegion;
}

fn main() {}
