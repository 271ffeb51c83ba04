//! Other IPC/RPC systems measured against the floor.

pub mod ipc_channel;
pub mod tarpc;
