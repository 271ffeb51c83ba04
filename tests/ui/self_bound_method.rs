use typed_ipc::interface;

// The server calls every method on any `Send + Sync + 'static` implementation: a method that
// asks more of `Self` could not be called there.
#[interface]
pub trait Cache {
    fn snapshot(&self) -> u32
    where
        Self: Clone;
    fn sized(&self) -> u32
    where
        Self: Sized + Send + Sync + 'static;
}

fn main() {}
