//! Typed RPC between processes on one Linux machine.
//!
//! Isolate risky code (a codec, a parser, a camera image-processing plugin) in a worker
//! process and talk to it through a Rust trait. typed-ipc does the framing, serialization,
//! file-descriptor passing and dispatch: `#[interface]` turns the trait into a client stub
//! and a server, and file descriptors are typed values (`OwnedFd`) like any other argument.
//!
//! ```
//! use std::os::fd::OwnedFd;
//! use typed_ipc::{Connection, interface};
//!
//! #[interface]
//! pub trait Ipa {
//!     /// Reverses `text`.
//!     fn reverse(&self, text: String) -> String;
//!     /// The total size of the files behind `files`.
//!     fn total_len(&self, files: Vec<OwnedFd>) -> u64;
//! }
//!
//! struct MyIpa;
//!
//! impl Ipa for MyIpa {
//!     fn reverse(&self, text: String) -> String {
//!         text.chars().rev().collect()
//!     }
//!     fn total_len(&self, files: Vec<OwnedFd>) -> u64 {
//!         files.into_iter().map(|fd| std::fs::File::from(fd).metadata().unwrap().len()).sum()
//!     }
//! }
//!
//! # fn main() -> Result<(), typed_ipc::Error> {
//! let (a, b) = Connection::pair()?;
//! std::thread::spawn(move || IpaServer::new(MyIpa).serve(b));
//! let ipa = IpaClient::new(a);
//! assert_eq!(ipa.reverse("FooBar".into())?, "raBooF");
//!
//! let file = tempfile_with(b"12345");
//! assert_eq!(ipa.total_len(vec![file.into()])?, 5);
//! # Ok(())
//! # }
//! # fn tempfile_with(bytes: &[u8]) -> std::fs::File {
//! #     use std::io::Write;
//! #     let path = std::env::temp_dir().join(format!("typed-ipc-doc-{}", std::process::id()));
//! #     let mut f = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
//! #     std::fs::remove_file(&path).unwrap();
//! #     f.write_all(bytes).unwrap();
//! #     f
//! # }
//! ```
//!
//! In real use the server runs in another process: [`worker::Worker::spawn`] starts a child
//! with one end of a connection and [`worker::connection`] picks it up in the child; or a
//! [`Listener`] accepts clients on a socket path.
//!
//! # Layers
//!
//! - **Transport** ([`Socket`], [`Listener`], [`Frame`], [`wire`]): `SOCK_SEQPACKET` messages
//!   of any size, bytes and fds together, whole or not at all, with [`Limits`] against a
//!   hostile peer.
//! - **Codec** ([`codec`]): serde + bincode for bytes; fds travel in the message's fd table.
//! - **Connection** ([`Connection`]): calls with cookies, replies routed to their callers,
//!   oneway messages, timeouts, both ends serving and calling, peer death. Its docs describe
//!   the threading model.
//! - **Generated code** ([`interface`]).
//!
//! # Threading model
//!
//! A [`Connection`] has no thread of its own. Whichever thread waits on it — a caller waiting
//! for its reply, or a thread in [`Connection::serve`]/[`Server::serve`] waiting for
//! requests — takes turns reading the socket and routes each message: a reply to the caller
//! whose cookie it carries, a request to a serving thread. So:
//!
//! - A lone call costs one send (`send`, or `sendmsg` when it carries fds) and one `recvmsg`;
//!   no thread hand-off, no allocation.
//! - Clients are `Clone + Send + Sync`; any number of threads may call through one connection
//!   at once, and replies reach the right caller in whatever order they come back.
//! - Requests run on serving threads only: [`Server::threads`] chooses strictly in order (1,
//!   the default) or a bounded pool. Oneway messages from one peer always run one at a time,
//!   in the order sent, and a call runs only once the oneways that arrived before it have run
//!   (a oneway and then a call from one thread are handled in that order). So a oneway's
//!   handler must not wait for a call its peer sends after it: that call waits for it.
//! - Either end may serve and call at once. A callback that arrives while a thread waits for
//!   its own reply runs on a serving thread of that end — never on the waiting thread, so
//!   there is no nested event loop. An end that expects calls must therefore be serving, and
//!   with as many threads as calls may nest: if A calls B, B's handler calls A, and A's
//!   handler calls B again, B's one serving thread is still busy with the first call, so B
//!   needs [`Server::threads`]`(2)` (or the innermost call waits until its timeout). Count
//!   every chain in flight at once: four callers nesting that deep need eight threads.
//! - When the peer dies, every waiting caller gets [`Error::Disconnected`] at once. A peer
//!   that shuts down gracefully ([`Serving::shutdown`], [`Connection::shut_down`]) says which
//!   calls it did not run: those get [`Error::ShutDown`], and may be sent elsewhere.
//!
//! The socket is [`AsFd`](std::os::fd::AsFd) and [`Socket::try_recv`] never blocks, so an
//! event loop can drive the transport itself; the `tokio` feature adds an async flavour.
//!
//! # Servers and listeners
//!
//! [`Server`] serves several interfaces on one connection, or on every client of a
//! [`Listener`] ([`Server::listen`], with graceful [`Serving::shutdown`]); its authorizer, and
//! [`current_peer`] inside an implementation, see each caller's pid, uid and gid.
//!
//! Set `TYPED_IPC_DEBUG=1` to have every message printed to stderr: each one sent with its
//! values (`-> Call #2 Ipa::configure(SensorConfig { width: 4096, height: 3072 })`), each one
//! received with its size; each line names its connection (`typed-ipc[586 c1 peer 591]`:
//! this process, the connection's number in it, the peer's pid).

#![warn(missing_docs)]

pub use ipc_macros::{Shape, interface};
pub use ipc_runtime::*;

// No doc comment here: rustdoc would put it before the module's own, and the summary in
// the crate's list of modules would say the same thing twice.
#[cfg(feature = "tokio")]
pub use ipc_runtime::tokio;

/// What the code `#[interface]` generates names: not a public API.
#[doc(hidden)]
pub mod __private {
    pub use ipc_runtime::CallBytes;
    // For tests that count fds: waits until the fds typed-ipc dropped are closed.
    pub use ipc_runtime::codec::{Bytes, BytesCarrier, CarriedBytes, Fd, SendFd};
    pub use ipc_runtime::service::{Call, InterfaceInfo, MethodInfo, Service, fnv1a};
    pub use ipc_runtime::shape::{self, Shape};
    pub use ipc_runtime::{Connection, Error};
    pub use serde::Serialize;
    pub use serde::de::DeserializeOwned;
    pub use std::sync::Arc;
    pub use std::time::Duration;

    // The async flavour. Generated code for a trait of `async fn`s is wrapped in
    // `async_interface!`, which without the `tokio` feature is a single clear error instead of
    // a wave of unresolved names.
    pub use crate::__typed_ipc_async_interface as async_interface;
    // The same for the async client of a blocking trait, `#[interface(async_client)]`.
    pub use crate::__typed_ipc_async_client as async_client;
    // And for its async server, `#[interface(async_server)]`.
    pub use crate::__typed_ipc_async_server as async_server;
    #[cfg(feature = "tokio")]
    pub use ipc_runtime::service::{PoolSlots, run_blocking};
    #[cfg(feature = "tokio")]
    pub use ipc_runtime::tokio::{AsyncCall, AsyncConnection, AsyncService, BoxFuture, boxed};

    #[cfg(feature = "tokio")]
    #[doc(hidden)]
    #[macro_export]
    macro_rules! __typed_ipc_async_interface {
        ($($item:tt)*) => { $($item)* };
    }

    #[cfg(feature = "tokio")]
    #[doc(hidden)]
    #[macro_export]
    macro_rules! __typed_ipc_async_client {
        ($($item:tt)*) => { $($item)* };
    }

    #[cfg(not(feature = "tokio"))]
    #[doc(hidden)]
    #[macro_export]
    macro_rules! __typed_ipc_async_client {
        ($($item:tt)*) => {
            ::core::compile_error! {
                ::core::concat!(
                    "`async_client` generates an async client, which needs typed-ipc's ",
                    "`tokio` feature: `typed-ipc = { version = \"0.1\", features = ",
                    "[\"tokio\"] }`; or drop `async_client` for the blocking client only",
                )
            }
        };
    }

    #[cfg(feature = "tokio")]
    #[doc(hidden)]
    #[macro_export]
    macro_rules! __typed_ipc_async_server {
        ($($item:tt)*) => { $($item)* };
    }

    #[cfg(not(feature = "tokio"))]
    #[doc(hidden)]
    #[macro_export]
    macro_rules! __typed_ipc_async_server {
        ($($item:tt)*) => {
            ::core::compile_error! {
                ::core::concat!(
                    "`async_server` generates an async server, which needs typed-ipc's ",
                    "`tokio` feature: `typed-ipc = { version = \"0.1\", features = ",
                    "[\"tokio\"] }`; or drop `async_server` for the blocking server only",
                )
            }
        };
    }

    #[cfg(not(feature = "tokio"))]
    #[doc(hidden)]
    #[macro_export]
    macro_rules! __typed_ipc_async_interface {
        ($($item:tt)*) => {
            ::core::compile_error! {
                "a trait of `async fn`s is an async interface, which needs typed-ipc's `tokio` feature: `typed-ipc = { version = \"0.1\", features = [\"tokio\"] }`"
            }
        };
    }
}
