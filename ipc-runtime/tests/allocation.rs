//! A hostile size announcement must not make the receiver allocate it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use ipc_runtime::wire::{Header, Kind};
use ipc_runtime::{Error, Limits, Socket};

/// Counts the largest single allocation made by this test binary, and the bytes each thread
/// asked for in all.
struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static ASKED: Cell<usize> = const { Cell::new(0) };
}

fn asked_by_this_thread() -> usize {
    ASKED.with(Cell::get)
}

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        ASKED.with(|asked| asked.set(asked.get() + layout.size()));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        ASKED.with(|asked| asked.set(asked.get() + new));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn announcing_gigabytes_allocates_only_what_arrives() {
    let (a, mut b) = Socket::pair().unwrap();
    b.set_limits(Limits {
        max_message_len: u32::MAX as usize,
        ..Limits::default()
    });
    let header = Header {
        kind: Kind::First,
        fds: 0,
        total_len: u32::MAX,
        total_fds: 0,
    };
    send_raw(&a, &header.encode(), &[]);
    send_raw(
        &a,
        &Header {
            kind: Kind::More,
            ..header
        }
        .encode(),
        &[1; 1000],
    );
    drop(a); // the peer dies having sent 1,000 of the 4 GiB it announced
    LARGEST.store(0, Ordering::Relaxed);
    assert!(matches!(b.recv(), Err(Error::Disconnected)));
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < 8 << 20, "a receive allocated {largest} bytes");
}

/// A recursive parameter type, as a user's interface may have.
#[derive(Serialize, Deserialize)]
struct Nest(Vec<Nest>);

/// A short hostile message whose every level announces a long sequence makes the decode
/// reserve no more than the message can hold. serde preallocates up to 1 MiB a sequence from
/// the length it announces, so 100 levels used to reserve 100 MiB from 800 bytes.
#[test]
fn announcing_long_sequences_at_every_level_reserves_what_the_message_can_hold() {
    let per_level = (1u64 << 20) / std::mem::size_of::<Nest>() as u64; // serde's 1 MiB cap
    let bytes = per_level.to_le_bytes().repeat(100); // ...then the message ends
    let before = asked_by_this_thread();
    let result = ipc_runtime::codec::decode::<Nest>(&bytes, Vec::new());
    let asked = asked_by_this_thread() - before;
    assert!(matches!(result, Err(Error::Malformed(_))));
    assert!(
        asked < 64 << 10,
        "decoding 800 bytes asked for {asked} bytes"
    );
}

fn send_raw(s: &Socket, header: &[u8], body: &[u8]) {
    use std::os::fd::{AsFd, AsRawFd};
    let iov = [std::io::IoSlice::new(header), std::io::IoSlice::new(body)];
    nix::sys::socket::sendmsg::<()>(
        s.as_fd().as_raw_fd(),
        &iov,
        &[],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
}
