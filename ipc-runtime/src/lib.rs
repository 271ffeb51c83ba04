//! Runtime of typed-ipc: transport, codec, connections and worker processes. Use it through
//! the `typed-ipc` crate, which re-exports all of it and adds the `#[interface]` macro.

#![warn(missing_docs)]

mod accept_retry;
mod admission;
mod bulk_copy;
mod closer;
pub mod codec;
mod connection;
mod error;
mod frame;
mod listener;
mod memfd;
mod one_copy;
pub mod peer_memory;
mod pipe;
mod server;
pub mod service;
pub mod shape;
pub mod shared_buffer;
mod shared_bytes;
pub mod shared_region;
mod socket;
mod spare;
mod stall;
mod sys;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod wire;
pub mod worker;

pub use closer::wait_for_closes;
pub use codec::{bytes, fd, fds};
pub use connection::{Authorizer, Connection};
pub use error::{Error, Limit, Result};
pub use frame::{Frame, Limits};
pub use listener::Listener;
pub use server::{Server, Serving};
pub use service::current_peer;
pub use shape::Shape;
pub use shared_bytes::{CallBytes, SharedBytes};
pub use socket::{PeerCredentials, Socket};
