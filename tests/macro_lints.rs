//! The generated code under a user crate's strict lints (clippy's too: CI runs clippy over the
//! tests). A name the user chose in a style rustc warns about (a trait named after a C library,
//! a method named after the protocol message it mirrors) is allowed where the user declared it,
//! on the trait or the method: the client, server and enums generated from it must not warn
//! about it again where the user cannot reach, or `deny(warnings)` breaks the build. Nor may
//! the generated code warn about the user's parameters, such as one named `_reserved`, which
//! only the generated code uses. Nor may it bound a type twice, which `clippy::nursery` says
//! at the type, in the trait: a type that is both a parameter and a return type is bounded
//! once, by both traits.

#![deny(warnings, nonstandard_style, clippy::pedantic, clippy::nursery)]

/// Named after a C library, in its style.
#[allow(non_camel_case_types)]
#[typed_ipc::interface]
pub trait libfoo {
    /// A method of a trait whose name is not camel case.
    fn version(&self) -> u32;
}

/// In style itself (rustc trims the underscores around a name), not once a word follows:
/// `Tail_Client` is out of style, with no `#[allow]` of the user's to reach it.
#[typed_ipc::interface]
pub trait Tail_ {
    /// A call.
    fn get(&self) -> u32;
}

/// A level, taken and returned.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, typed_ipc::Shape)]
pub struct Level(pub u8);

/// Named after the messages of a protocol.
#[typed_ipc::interface(check_types)]
pub trait Protocol {
    /// Mirrors the protocol's `GetURL` message, and its `URL` field.
    #[allow(non_snake_case)]
    fn GetURL(&self, #[allow(non_snake_case)] URL: u32) -> u32;
    /// A oneway named in the same style.
    #[allow(non_snake_case)]
    #[oneway]
    fn SetURL(&self, #[allow(non_snake_case)] URL: u32);
    /// A parameter kept for later, which the implementation ignores.
    fn reserved(&self, _reserved: u32) -> u32;
    /// A type taken and returned.
    fn tune(&self, level: Level) -> Level;
    /// And taken, and returned as the error of a carried `Result`.
    ///
    /// # Errors
    ///
    /// The level it was given.
    fn open(&self, level: Level) -> Result<Option<std::os::fd::OwnedFd>, Level>;
}

/// The blocking trait with the other flavour's client and server too.
#[cfg(feature = "tokio")]
#[allow(non_camel_case_types)]
#[typed_ipc::interface(async_client, async_server)]
pub trait libbar {
    /// Mirrors a `GetURL` message.
    #[allow(non_snake_case)]
    fn GetURL(&self, #[allow(non_snake_case)] URL: u32) -> u32;
    /// A parameter kept for later.
    #[oneway]
    fn reserved(&self, _reserved: u32);
}

/// The async flavour, with a blocking client too.
#[cfg(feature = "tokio")]
#[allow(non_camel_case_types)]
#[typed_ipc::interface(blocking_client)]
pub trait libbaz {
    /// Mirrors a `GetURL` message.
    #[allow(non_snake_case)]
    async fn GetURL(&self, #[allow(non_snake_case)] URL: u32) -> u32;
    /// A parameter kept for later, with a default body that ignores it.
    async fn reserved(&self, _reserved: u32) -> u32 {
        0
    }
}

struct Impl;

impl libfoo for Impl {
    fn version(&self) -> u32 {
        7
    }
}

impl Protocol for Impl {
    #[allow(non_snake_case)]
    fn GetURL(&self, URL: u32) -> u32 {
        URL + 1
    }
    #[allow(non_snake_case)]
    fn SetURL(&self, _URL: u32) {}
    fn reserved(&self, _reserved: u32) -> u32 {
        0
    }
    fn tune(&self, level: Level) -> Level {
        Level(level.0 + 1)
    }
    fn open(&self, level: Level) -> Result<Option<std::os::fd::OwnedFd>, Level> {
        Err(level)
    }
}

#[test]
fn names_the_user_allowed_work_under_strict_lints() {
    let (a, b) = typed_ipc::Connection::pair().unwrap();
    let services = typed_ipc::Server::new()
        .service(libfooServer::new(Impl))
        .service(ProtocolServer::new(Impl));
    let served = std::thread::spawn(move || services.serve(&b));
    assert_eq!(libfooClient::new(a.clone()).version().unwrap(), 7);
    let protocol = ProtocolClient::new(a);
    protocol.SetURL(1).unwrap();
    assert_eq!(protocol.GetURL(41).unwrap(), 42);
    assert_eq!(protocol.reserved(1).unwrap(), 0);
    assert_eq!(protocol.tune(Level(1)).unwrap(), Level(2));
    assert_eq!(protocol.open(Level(3)).unwrap().unwrap_err(), Level(3));
    drop(protocol);
    served.join().unwrap().unwrap();
}
