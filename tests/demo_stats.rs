//! The demo's parent reads the stats buffer its untrusted worker sends as a bare fd, which
//! typed-ipc does not check: a file claiming a terabyte, or a pipe, must fail with an error,
//! not allocate what the worker says or block.

#[path = "../examples/demo.rs"]
#[allow(dead_code)]
mod demo;

mod common;

use std::os::fd::OwnedFd;

use demo::read_stats;

/// A memfd of `len` bytes, all zero: sparse, so a terabyte costs nothing.
fn sized(len: u64) -> OwnedFd {
    let file = std::fs::File::from(common::memfd(b""));
    file.set_len(len).unwrap();
    file.into()
}

#[test]
fn stats_of_the_right_size_are_read() {
    let stats = read_stats(sized(demo::STATS_LEN as u64)).unwrap();
    assert!(format!("{stats:?}").contains("mean: 0.0"), "{stats:?}");
}

#[test]
fn a_stats_buffer_claiming_a_terabyte_is_refused_unread() {
    let refused = read_stats(sized(1 << 40)).unwrap_err().to_string();
    assert!(refused.contains("1099511627776 bytes"), "{refused}");
}

#[test]
fn a_pipe_for_a_stats_buffer_is_refused_without_blocking() {
    // The write end stays open: a read from the pipe would wait for good.
    let (read_end, _write_end) = nix::unistd::pipe().unwrap();
    let refused = read_stats(read_end).unwrap_err().to_string();
    assert!(refused.contains("must be a file"), "{refused}");
}
