use typed_ipc::interface;

// A `where` clause of a trait that has no parameters bounds no parameter: on the trait, or on a
// method, it can only ask things of `Self`. Said at the predicate, not at the attribute.
#[interface]
pub trait Bounded
where
    Self: Send,
    String: Clone,
{
    fn count(&self) -> u32
    where
        u32: Copy;
}

fn main() {}
