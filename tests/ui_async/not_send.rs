use std::rc::Rc;

use typed_ipc::interface;

#[interface]
pub trait Counter {
    async fn next(&self) -> u32;
}

struct Imp;

// The server runs handlers on any runtime thread, so their futures must be `Send`: an `Rc`
// held across an `.await` is refused where the method is implemented.
impl Counter for Imp {
    async fn next(&self) -> u32 {
        let shared = Rc::new(1);
        std::future::ready(()).await;
        *shared
    }
}

fn main() {}
