//! A crate that forbids the style lints, whose names then all meet them: the generated code
//! must not `allow` them, which rustc refuses under `forbid` (E0453, and a warning for a
//! forbidden group). `#[allow]`s are for the names that need them (tests/macro_lints.rs).

#![forbid(nonstandard_style, non_snake_case, non_camel_case_types)]
#![forbid(clippy::used_underscore_binding)]
#![deny(warnings)]

/// Every kind of generated item: client, server, enums, and the other flavour's too.
#[cfg_attr(feature = "tokio", typed_ipc::interface(async_client, async_server))]
#[cfg_attr(not(feature = "tokio"), typed_ipc::interface)]
pub trait Strict {
    /// A call.
    fn add_one(&self, value: u32) -> u32;
    /// A oneway.
    #[oneway]
    fn nudge(&self, value: u32);
}

/// The async flavour, with a blocking client.
#[cfg(feature = "tokio")]
#[typed_ipc::interface(blocking_client)]
pub trait AsyncStrict {
    /// A call.
    async fn add_one(&self, value: u32) -> u32;
}

struct Impl;

impl Strict for Impl {
    fn add_one(&self, value: u32) -> u32 {
        value + 1
    }
    fn nudge(&self, _: u32) {}
}

#[test]
fn an_interface_compiles_and_works_where_the_style_lints_are_forbidden() {
    let (a, b) = typed_ipc::Connection::pair().unwrap();
    let serving = std::thread::spawn(move || StrictServer::new(Impl).serve(b));
    let client = StrictClient::new(a);
    client.nudge(1).unwrap();
    assert_eq!(client.add_one(41).unwrap(), 42);
    drop(client);
    serving.join().unwrap().unwrap();
}

/// A name in camel case as rustc reads it, underscore and all: an underscore between two
/// characters without case (digits) is no word break.
#[typed_ipc::interface]
pub trait V1_2 {
    /// A call.
    fn get(&self) -> u32;
}
