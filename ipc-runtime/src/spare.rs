//! One spare byte-string allocation per thread.
//!
//! A call that sends a `Vec<u8>` and receives one (an echo, a transform) would otherwise free
//! the sent one's memory and allocate the received one's on each side, every call: with glibc
//! ~130 instructions for a 64-byte string and ~280 for 4 KiB (those sizes miss its per-thread
//! cache), which is a tenth to a fifth of what typed-ipc itself spends on a call. So the
//! `Vec<u8>` a generated stub sent as an argument, or a generated server sent as a result, is
//! kept here once it is sent, and the next byte string this thread receives is copied into it.
//!
//! Only snug fits are handed out (at most twice the length, or 64 bytes), so a caller keeping
//! many small received strings never holds much more memory than their lengths; and only
//! allocations up to [`MAX`] are kept, so a thread hoards at most that much.

use std::cell::Cell;

/// The largest allocation kept. Larger strings travel out of line, where the receiver's `Vec`
/// comes from the lane or the inbox, and a spare that size would mostly sit idle.
const MAX: usize = 64 << 10;

/// The slack a small string may be handed: below 32 bytes glibc's smallest chunk has it anyway.
const SLACK: usize = 64;

thread_local! {
    static SPARE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// An empty `Vec` with room for `len` bytes: this thread's spare when it fits snugly, otherwise
/// a new allocation (the spare stays for a later string).
#[inline]
pub(crate) fn with_capacity(len: usize) -> Vec<u8> {
    if len == 0 || len > MAX {
        return Vec::with_capacity(len);
    }
    // `try_with`: a string may be decoded while the thread's locals are being destroyed.
    let spare = SPARE.try_with(Cell::take).unwrap_or_default();
    let capacity = spare.capacity();
    if len <= capacity && capacity <= (len * 2).max(SLACK) {
        let mut v = spare;
        v.clear();
        return v;
    }
    if capacity > 0 {
        keep(spare);
    }
    Vec::with_capacity(len)
}

/// `bytes` in a `Vec` of their own, in this thread's spare when it fits (see [`with_capacity`]).
/// From a few hundred bytes on they are copied by [`bulk_copy`](crate::bulk_copy): where a
/// string lies in a received frame depends on the message's layout, and glibc's `memcpy` is
/// 15–25x slower (from 2,112 bytes up) when the destination lies a few bytes ahead of the
/// source on some CPUs.
#[inline]
pub(crate) fn copy_of(bytes: &[u8]) -> Vec<u8> {
    if bytes.len() >= crate::bulk_copy::VECTOR_MIN {
        return copy_of_large(bytes);
    }
    let mut v = with_capacity(bytes.len());
    v.extend_from_slice(bytes);
    v
}

#[inline(never)]
fn copy_of_large(bytes: &[u8]) -> Vec<u8> {
    let mut v = with_capacity(bytes.len());
    // SAFETY: `v` has room for `bytes.len()` bytes, which `copy` initialises before `set_len`
    // claims them; `bytes` is readable and cannot overlap a fresh or spare Vec.
    unsafe {
        crate::bulk_copy::copy(bytes.as_ptr(), v.as_mut_ptr(), bytes.len());
        v.set_len(bytes.len());
    }
    v
}

/// Keeps `v`'s allocation as this thread's spare (freeing the previous one), unless it is
/// empty or larger than [`MAX`].
#[inline]
pub(crate) fn keep(v: Vec<u8>) {
    if v.capacity() == 0 || v.capacity() > MAX {
        return;
    }
    // If the thread's locals are gone, `v` is simply freed.
    let old = SPARE.try_with(|spare| spare.replace(v));
    drop(old);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each test runs on a thread of its own, so the spare starts empty.
    fn spare_capacity() -> usize {
        SPARE.with(|s| {
            let v = s.take();
            let capacity = v.capacity();
            s.set(v);
            capacity
        })
    }

    #[test]
    fn a_kept_allocation_is_handed_out_again_for_a_snug_fit() {
        let sent = vec![7u8; 100];
        let ptr = sent.as_ptr();
        keep(sent);
        let received = copy_of(&[1u8; 80]);
        assert_eq!(received.as_ptr(), ptr, "the same allocation");
        assert_eq!(received, vec![1u8; 80], "holding the new bytes only");
        assert_eq!(spare_capacity(), 0, "handed out, not shared");
    }

    #[test]
    fn a_loose_fit_allocates_and_leaves_the_spare() {
        keep(Vec::with_capacity(4096));
        let small = copy_of(b"hello");
        assert!(small.capacity() < 4096, "no 4 KiB for 5 bytes");
        assert_eq!(
            spare_capacity(),
            4096,
            "the spare waits for a string it fits"
        );
        let big = with_capacity(5000);
        assert!(big.capacity() >= 5000);
        assert_eq!(spare_capacity(), 4096, "too small for 5,000 bytes");
        let fits = with_capacity(2048);
        assert_eq!(fits.capacity(), 4096);
        assert_eq!(spare_capacity(), 0);
    }

    #[test]
    fn empty_and_large_allocations_are_not_kept() {
        keep(Vec::new());
        assert_eq!(spare_capacity(), 0);
        keep(Vec::with_capacity(MAX + 1));
        assert_eq!(spare_capacity(), 0);
        keep(Vec::with_capacity(MAX));
        assert_eq!(spare_capacity(), MAX);
        assert_eq!(
            with_capacity(0).capacity(),
            0,
            "an empty string allocates nothing"
        );
        assert_eq!(spare_capacity(), MAX);
    }
}
