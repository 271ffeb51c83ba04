//! A hostile size announcement must not make the receiver allocate it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use ipc_runtime::wire::{Header, Kind};
use ipc_runtime::{Error, Limits, Socket};

/// Counts the largest single allocation made by this test binary.
struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
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
