//! The generated code names everything by absolute path: an interface declared in a module
//! that shadows the prelude, `std`, `core`, `typed_ipc` and the runtime's names still
//! compiles and works. Parameters named like the generated code's locals are fine too.

#![allow(non_camel_case_types, dead_code)]

use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize, typed_ipc::Shape)]
pub struct Payload(pub u32);

mod shadowed {
    // Short names the generated code might reach for, all taken.
    pub struct Result;
    pub struct Option;
    pub struct Some;
    pub struct None;
    pub struct Ok;
    pub struct Err;
    pub struct Box;
    pub struct Vec;
    pub trait Clone {}
    pub trait Send {}
    pub trait Sync {}
    pub struct u32;
    pub struct bool;
    pub struct Fd;
    pub struct Bytes;
    pub struct Connection;
    pub struct Error;
    pub struct Duration;
    pub struct Call;
    pub struct Service;
    pub struct InterfaceInfo;
    pub struct MethodInfo;
    pub fn fnv1a() {}
    pub struct AsyncConnection;
    pub struct AsyncCall;
    pub struct AsyncService;
    pub struct BoxFuture;
    pub fn boxed() {}
    pub fn run_blocking() {}
    pub struct PoolSlots;
    pub struct Arc;
    pub trait Sized {}
    pub trait Future {}
    pub mod std {}
    pub mod core {}
    pub mod typed_ipc {}
    pub mod serde {}
    pub struct Shape;
    pub mod shape {}
    pub struct Recursion;
    // What the generated `Debug` impls might reach for.
    pub mod fmt {}
    pub mod any {}
    pub trait Debug {}
    pub struct Formatter;
    pub fn type_name() {}
    /// A type named like the server's type parameter.
    pub use super::Payload as T;

    #[::typed_ipc::interface]
    pub trait Hygienic {
        fn greet(&self, name: ::std::string::String) -> ::std::string::String;
        fn check(
            &self,
            n: ::core::primitive::u32,
        ) -> ::core::result::Result<::core::primitive::u32, ::std::string::String>;
        fn has_fd(
            &self,
            fd: ::core::option::Option<::std::os::fd::OwnedFd>,
        ) -> ::core::primitive::bool;
        fn echo(
            &self,
            data: ::std::vec::Vec<::core::primitive::u8>,
        ) -> ::std::vec::Vec<::core::primitive::u8>;
        /// Parameters named like the generated code's own variables.
        #[allow(clippy::too_many_arguments)]
        fn locals(
            &self,
            call: ::core::primitive::u32,
            value: ::core::primitive::u32,
            request: ::core::primitive::u32,
            response: ::core::primitive::u32,
            connection: ::core::primitive::u32,
            timeout: ::core::primitive::u32,
            imp: ::core::primitive::u32,
        ) -> ::core::primitive::u32;
        fn payload(&self, t: T) -> T;
        #[oneway]
        fn nudge(&self, call: ::core::primitive::u32);
        fn nothing(&self);
    }

    pub struct Impl;

    impl Hygienic for Impl {
        fn greet(&self, name: ::std::string::String) -> ::std::string::String {
            ::std::format!("hello {name}")
        }
        fn check(
            &self,
            n: ::core::primitive::u32,
        ) -> ::core::result::Result<::core::primitive::u32, ::std::string::String> {
            match n {
                0 => ::core::result::Result::Err("zero".into()),
                n => ::core::result::Result::Ok(n),
            }
        }
        fn has_fd(
            &self,
            fd: ::core::option::Option<::std::os::fd::OwnedFd>,
        ) -> ::core::primitive::bool {
            fd.is_some()
        }
        fn echo(
            &self,
            data: ::std::vec::Vec<::core::primitive::u8>,
        ) -> ::std::vec::Vec<::core::primitive::u8> {
            data
        }
        #[allow(clippy::too_many_arguments)]
        fn locals(
            &self,
            call: ::core::primitive::u32,
            value: ::core::primitive::u32,
            request: ::core::primitive::u32,
            response: ::core::primitive::u32,
            connection: ::core::primitive::u32,
            timeout: ::core::primitive::u32,
            imp: ::core::primitive::u32,
        ) -> ::core::primitive::u32 {
            call + value + request + response + connection + timeout + imp
        }
        fn payload(&self, t: T) -> T {
            super::Payload(t.0 + 1)
        }
        fn nudge(&self, _call: ::core::primitive::u32) {}
        fn nothing(&self) {}
    }

    /// A derived shape, generic and directly recursive, among the shadowed names.
    #[derive(::serde::Serialize, ::serde::Deserialize, ::typed_ipc::Shape)]
    pub struct Tree<X> {
        pub value: X,
        pub kids: ::std::vec::Vec<Tree<X>>,
        #[serde(skip)]
        pub cache: ::core::option::Option<::core::primitive::u32>,
    }

    #[derive(::serde::Serialize, ::serde::Deserialize, ::typed_ipc::Shape)]
    pub enum Choice {
        Nothing,
        One(::core::primitive::u32),
        Named {
            fd: ::core::option::Option<::core::primitive::u8>,
        },
    }

    /// `check_types`: the shapes are named by absolute paths too.
    #[::typed_ipc::interface(check_types)]
    pub trait Checked {
        fn tree(&self, t: Tree<T>, choice: Choice) -> ::core::primitive::u32;
        fn echo(
            &self,
            data: ::std::vec::Vec<::core::primitive::u8>,
        ) -> ::std::vec::Vec<::core::primitive::u8>;
        fn swap(
            &self,
            fd: ::core::option::Option<::std::os::fd::OwnedFd>,
        ) -> ::core::option::Option<::std::os::fd::OwnedFd>;
        #[oneway]
        fn nudge(&self, call: ::core::primitive::u32);
    }

    impl Checked for Impl {
        fn tree(&self, t: Tree<T>, choice: Choice) -> ::core::primitive::u32 {
            let picked = match choice {
                Choice::Nothing => 0,
                Choice::One(n) => n,
                Choice::Named { .. } => 100,
            };
            t.value.0 + t.kids.len() as ::core::primitive::u32 + picked
        }
        fn echo(
            &self,
            data: ::std::vec::Vec<::core::primitive::u8>,
        ) -> ::std::vec::Vec<::core::primitive::u8> {
            data
        }
        fn swap(
            &self,
            fd: ::core::option::Option<::std::os::fd::OwnedFd>,
        ) -> ::core::option::Option<::std::os::fd::OwnedFd> {
            fd
        }
        fn nudge(&self, _call: ::core::primitive::u32) {}
    }

    /// A blocking trait with an async client and an async server too.
    #[cfg(feature = "tokio")]
    #[::typed_ipc::interface(async_client, async_server)]
    pub trait BlockingTwin {
        fn check(
            &self,
            n: ::core::primitive::u32,
        ) -> ::core::result::Result<::core::primitive::u32, ::std::string::String>;
        fn swap(
            &self,
            fd: ::core::option::Option<::std::os::fd::OwnedFd>,
        ) -> ::core::option::Option<::std::os::fd::OwnedFd>;
        fn echo(
            &self,
            data: ::std::vec::Vec<::core::primitive::u8>,
        ) -> ::std::vec::Vec<::core::primitive::u8>;
        fn locals(
            &self,
            call: ::core::primitive::u32,
            value: ::core::primitive::u32,
            connection: ::core::primitive::u32,
            timeout: ::core::primitive::u32,
            imp: ::core::primitive::u32,
        ) -> ::core::primitive::u32;
        fn payload(&self, t: T) -> T;
        #[oneway]
        fn nudge(&self, call: ::core::primitive::u32);
    }

    /// An async trait with a blocking client too.
    #[cfg(feature = "tokio")]
    #[::typed_ipc::interface(blocking_client)]
    pub trait AsyncTwin {
        async fn check(
            &self,
            n: ::core::primitive::u32,
        ) -> ::core::result::Result<::core::primitive::u32, ::std::string::String>;
        async fn swap(
            &self,
            fd: ::core::option::Option<::std::os::fd::OwnedFd>,
        ) -> ::core::option::Option<::std::os::fd::OwnedFd>;
        async fn echo(
            &self,
            data: ::std::vec::Vec<::core::primitive::u8>,
        ) -> ::std::vec::Vec<::core::primitive::u8>;
        async fn locals(
            &self,
            call: ::core::primitive::u32,
            value: ::core::primitive::u32,
            connection: ::core::primitive::u32,
            timeout: ::core::primitive::u32,
        ) -> ::core::primitive::u32;
        async fn payload(&self, t: T) -> T;
        #[oneway]
        async fn nudge(&self, call: ::core::primitive::u32);
    }

    #[cfg(feature = "tokio")]
    impl BlockingTwin for Impl {
        fn check(
            &self,
            n: ::core::primitive::u32,
        ) -> ::core::result::Result<::core::primitive::u32, ::std::string::String> {
            Hygienic::check(self, n)
        }
        fn swap(
            &self,
            fd: ::core::option::Option<::std::os::fd::OwnedFd>,
        ) -> ::core::option::Option<::std::os::fd::OwnedFd> {
            fd
        }
        fn echo(
            &self,
            data: ::std::vec::Vec<::core::primitive::u8>,
        ) -> ::std::vec::Vec<::core::primitive::u8> {
            data
        }
        fn locals(
            &self,
            call: ::core::primitive::u32,
            value: ::core::primitive::u32,
            connection: ::core::primitive::u32,
            timeout: ::core::primitive::u32,
            imp: ::core::primitive::u32,
        ) -> ::core::primitive::u32 {
            call + value + connection + timeout + imp
        }
        fn payload(&self, t: T) -> T {
            super::Payload(t.0 + 1)
        }
        fn nudge(&self, _call: ::core::primitive::u32) {}
    }

    #[cfg(feature = "tokio")]
    impl AsyncTwin for Impl {
        async fn check(
            &self,
            n: ::core::primitive::u32,
        ) -> ::core::result::Result<::core::primitive::u32, ::std::string::String> {
            Hygienic::check(self, n)
        }
        async fn swap(
            &self,
            fd: ::core::option::Option<::std::os::fd::OwnedFd>,
        ) -> ::core::option::Option<::std::os::fd::OwnedFd> {
            fd
        }
        async fn echo(
            &self,
            data: ::std::vec::Vec<::core::primitive::u8>,
        ) -> ::std::vec::Vec<::core::primitive::u8> {
            data
        }
        async fn locals(
            &self,
            call: ::core::primitive::u32,
            value: ::core::primitive::u32,
            connection: ::core::primitive::u32,
            timeout: ::core::primitive::u32,
        ) -> ::core::primitive::u32 {
            call + value + connection + timeout
        }
        async fn payload(&self, t: T) -> T {
            super::Payload(t.0 + 1)
        }
        async fn nudge(&self, _call: ::core::primitive::u32) {}
    }
}

use shadowed::{HygienicClient, HygienicServer};

#[test]
fn an_interface_among_shadowed_names_works() {
    let (a, b) = typed_ipc::Connection::pair().unwrap();
    let server = std::thread::spawn(move || HygienicServer::new(shadowed::Impl).serve(b));
    let client = HygienicClient::new(a);
    let shown = format!("{client:?}");
    assert!(
        shown.starts_with("HygienicClient { interface: \"Hygienic\", "),
        "{shown}"
    );
    let shown = format!("{:?}", HygienicServer::new(shadowed::Impl));
    assert!(
        shown.starts_with("HygienicServer { interface: \"Hygienic\", "),
        "{shown}"
    );
    assert_eq!(client.greet("you".into()).unwrap(), "hello you");
    assert_eq!(client.check(3).unwrap(), Ok(3));
    assert_eq!(client.check(0).unwrap(), Err("zero".to_string()));
    assert!(!client.has_fd(None).unwrap());
    assert_eq!(client.echo(vec![1, 2, 3]).unwrap(), [1, 2, 3]);
    assert_eq!(client.locals(1, 2, 3, 4, 5, 6, 7).unwrap(), 28);
    assert_eq!(client.payload(Payload(41)).unwrap(), Payload(42));
    client.nudge(1).unwrap();
    client.nothing().unwrap();
    drop(client);
    server.join().unwrap().unwrap();
}

/// Every method of `BlockingTwin`, through its async client on `connection`.
#[cfg(feature = "tokio")]
async fn blocking_twin_works(connection: typed_ipc::tokio::AsyncConnection) {
    let client = shadowed::BlockingTwinAsyncClient::new(connection);
    let shown = format!("{client:?}");
    assert!(shown.starts_with("BlockingTwinAsyncClient { interface: \"BlockingTwin\", "));
    assert_eq!(client.check(3).await.unwrap(), Ok(3));
    assert_eq!(client.check(0).await.unwrap(), Err("zero".to_string()));
    assert!(client.swap(None).await.unwrap().is_none());
    assert_eq!(client.echo(vec![1, 2, 3]).await.unwrap(), [1, 2, 3]);
    assert_eq!(client.locals(1, 2, 3, 4, 5).await.unwrap(), 15);
    assert_eq!(client.payload(Payload(41)).await.unwrap(), Payload(42));
    client.nudge(1).await.unwrap();
}

/// The client of the other flavour among the same shadowed names: an async client of a
/// blocking server, a blocking client of an async one, and an async client of a blocking
/// trait's async server.
#[cfg(feature = "tokio")]
#[test]
fn a_client_of_the_other_flavour_among_shadowed_names_works() {
    use shadowed::{AsyncTwinBlockingClient, AsyncTwinServer};
    use shadowed::{BlockingTwinAsyncServer, BlockingTwinServer};
    use typed_ipc::tokio::AsyncConnection;
    use typed_ipc::{Connection, Socket};

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // (An `AsyncConnection` is made inside a runtime.)
    let _runtime = runtime.enter();

    let (a, b) = Socket::pair().unwrap();
    let served = std::thread::spawn(move || {
        BlockingTwinServer::new(shadowed::Impl).serve(Connection::new(b))
    });
    runtime.block_on(blocking_twin_works(AsyncConnection::new(a).unwrap()));
    served.join().unwrap().unwrap();

    // The blocking trait's async server, among the same names.
    let (a, b) = Socket::pair().unwrap();
    let shown = format!("{:?}", BlockingTwinAsyncServer::new(shadowed::Impl));
    assert!(shown.starts_with("BlockingTwinAsyncServer { interface: \"BlockingTwin\", "));
    let shown = format!("{:?}", AsyncTwinServer::new(shadowed::Impl));
    assert!(shown.starts_with("AsyncTwinServer { interface: \"AsyncTwin\", "));
    let serving = runtime.spawn(
        BlockingTwinAsyncServer::new(shadowed::Impl).serve(AsyncConnection::new(b).unwrap()),
    );
    runtime.block_on(blocking_twin_works(AsyncConnection::new(a).unwrap()));
    runtime.block_on(serving).unwrap().unwrap();

    let (a, b) = Socket::pair().unwrap();
    let serving =
        runtime.spawn(AsyncTwinServer::new(shadowed::Impl).serve(AsyncConnection::new(b).unwrap()));
    let client = AsyncTwinBlockingClient::new(Connection::new(a));
    let shown = format!("{client:?}");
    assert!(shown.starts_with("AsyncTwinBlockingClient { interface: \"AsyncTwin\", "));
    assert_eq!(client.check(3).unwrap(), Ok(3));
    assert_eq!(client.check(0).unwrap(), Err("zero".to_string()));
    assert!(client.swap(None).unwrap().is_none());
    assert_eq!(client.echo(vec![1, 2, 3]).unwrap(), [1, 2, 3]);
    assert_eq!(client.locals(1, 2, 3, 4).unwrap(), 10);
    assert_eq!(client.payload(Payload(41)).unwrap(), Payload(42));
    client.nudge(1).unwrap();
    drop(client);
    runtime.block_on(serving).unwrap().unwrap();
}

/// `check_types` and `#[derive(Shape)]` among the shadowed names.
#[test]
fn a_type_checked_interface_among_shadowed_names_works() {
    use shadowed::{CheckedClient, CheckedServer, Choice, Tree};
    let (a, b) = typed_ipc::Connection::pair().unwrap();
    let server = std::thread::spawn(move || CheckedServer::new(shadowed::Impl).serve(b));
    let client = CheckedClient::new(a);
    let shown = format!("{client:?} {:?}", CheckedServer::new(shadowed::Impl));
    assert!(
        shown.starts_with("CheckedClient { interface: \"Checked\", "),
        "{shown}"
    );
    assert!(
        shown.contains(" CheckedServer { interface: \"Checked\", "),
        "{shown}"
    );
    let leaf = || Tree {
        value: Payload(0),
        kids: vec![],
        cache: None,
    };
    let tree = Tree {
        value: Payload(40),
        kids: vec![leaf(), leaf()],
        cache: Some(7),
    };
    assert_eq!(client.tree(tree, Choice::One(1)).unwrap(), 43);
    assert_eq!(client.echo(vec![1, 2, 3]).unwrap(), [1, 2, 3]);
    assert!(client.swap(None).unwrap().is_none());
    client.nudge(1).unwrap();
    drop(client);
    server.join().unwrap().unwrap();
}

/// A trait named like the server's type parameter.
mod named_t {
    #[::typed_ipc::interface]
    pub trait T {
        fn add(&self, a: u32, b: u32) -> u32;
    }

    pub struct Impl;

    impl T for Impl {
        fn add(&self, a: u32, b: u32) -> u32 {
            a + b
        }
    }
}

#[test]
fn a_trait_named_t_works() {
    let (a, b) = typed_ipc::Connection::pair().unwrap();
    let server = std::thread::spawn(move || named_t::TServer::new(named_t::Impl).serve(b));
    let client = named_t::TClient::new(a);
    assert_eq!(client.add(2, 3).unwrap(), 5);
    drop(client);
    server.join().unwrap().unwrap();
}

/// A module without the prelude: the generated code names every trait it calls through, as it
/// cannot count on `From` or `Clone` being in scope.
#[no_implicit_prelude]
mod without_prelude {
    use ::std::os::fd::OwnedFd;
    use ::std::vec::Vec;

    #[::typed_ipc::interface]
    pub trait Bare {
        fn echo(&self, data: Vec<u8>) -> Vec<u8>;
        fn swap(&self, fd: ::std::option::Option<OwnedFd>) -> ::std::option::Option<OwnedFd>;
    }

    /// Its async server too, which clones the implementation's handle for the pool.
    #[cfg(feature = "tokio")]
    #[::typed_ipc::interface(async_client, async_server)]
    pub trait BareTwin {
        fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    }

    /// The async flavour, with a blocking client too.
    #[cfg(feature = "tokio")]
    #[::typed_ipc::interface(blocking_client)]
    pub trait AsyncBare {
        async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    }

    pub struct Impl;

    impl Bare for Impl {
        fn echo(&self, data: Vec<u8>) -> Vec<u8> {
            data
        }
        fn swap(&self, fd: ::std::option::Option<OwnedFd>) -> ::std::option::Option<OwnedFd> {
            fd
        }
    }

    #[cfg(feature = "tokio")]
    impl BareTwin for Impl {
        fn echo(&self, data: Vec<u8>) -> Vec<u8> {
            data
        }
    }

    #[cfg(feature = "tokio")]
    impl AsyncBare for Impl {
        async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
            data
        }
    }
}

#[test]
fn an_interface_without_the_prelude_works() {
    use without_prelude::{BareClient, BareServer, Impl};
    let (a, b) = typed_ipc::Connection::pair().unwrap();
    let server = std::thread::spawn(move || BareServer::new(Impl).serve(b));
    let client = BareClient::new(a);
    assert_eq!(client.echo(vec![1, 2, 3]).unwrap(), [1, 2, 3]);
    assert!(client.swap(None).unwrap().is_none());
    drop(client);
    server.join().unwrap().unwrap();
}

/// The async items of the module without the prelude: a blocking trait's async client and
/// server, and an async trait's server and blocking client.
#[cfg(feature = "tokio")]
#[test]
fn async_interfaces_without_the_prelude_work() {
    use typed_ipc::tokio::AsyncConnection;
    use typed_ipc::{Connection, Socket};
    use without_prelude::{AsyncBareBlockingClient, AsyncBareServer, Impl};
    use without_prelude::{BareTwinAsyncClient, BareTwinAsyncServer};

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _runtime = runtime.enter();

    let (a, b) = Socket::pair().unwrap();
    let serving =
        runtime.spawn(BareTwinAsyncServer::new(Impl).serve(AsyncConnection::new(b).unwrap()));
    let client = BareTwinAsyncClient::new(AsyncConnection::new(a).unwrap());
    assert_eq!(
        runtime.block_on(client.echo(vec![1, 2, 3])).unwrap(),
        [1, 2, 3]
    );
    drop(client);
    runtime.block_on(serving).unwrap().unwrap();

    let (a, b) = Socket::pair().unwrap();
    let serving = runtime.spawn(AsyncBareServer::new(Impl).serve(AsyncConnection::new(b).unwrap()));
    let client = AsyncBareBlockingClient::new(Connection::new(a));
    assert_eq!(client.echo(vec![1, 2, 3]).unwrap(), [1, 2, 3]);
    drop(client);
    runtime.block_on(serving).unwrap().unwrap();
}
