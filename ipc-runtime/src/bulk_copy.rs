//! Copies of large byte strings at `memcpy` speed whatever the two addresses are, including
//! out of memory that another process may be writing at the same time (a peer's
//! [`RegionView`](crate::shared_region::RegionView)).
//!
//! A Rust copy (`ptr::copy_nonoverlapping`) from such memory would be a data race, so the copy
//! is inline assembly, equivalent to reading each source byte with a relaxed atomic load
//! (which may race) and writing it to the destination. The worst a concurrent writer can do is
//! change which values are copied.
//!
//! Why not one `rep movsb`, as here before: on the AMD EPYC host these VMs sometimes run on,
//! `rep movsb` slows down sharply when the destination lies a short distance ahead of the
//! source, counted modulo 4 KiB: 15–25x at 1–15 bytes, 1.5–2x at 16–31 (on 2026-12-04, with
//! cpuinfo saying Zen 3, 10–16x at every distance from 1 to 31). The region's bytes
//! start on a page and glibc's `malloc` puts a large block 16 bytes past one, so every large
//! string received hit the milder case (16 MiB in 2.1–2.3x `memcpy`'s time), and a caller's
//! bytes can meet the worse one. A loop of 32-byte loads and aligned 32-byte stores (what
//! `memcpy` does for large copies) runs at `memcpy`'s speed at every distance. Figures, and the
//! tool that makes them (`ipc-bench --bin copies`): `docs/benchmarks-bulk.md`, "Copies at every
//! alignment".

/// Copies `src` into `dst` (of the same length) with the same loop: for writing a large byte
/// string into a shared region of ours. glibc 2.36's `memcpy` (Debian 12) runs `rep movsb`
/// for copies of 2,112 bytes up to 1 MiB here, and does not avoid short distances on AMD
/// (`ld.so --list-diagnostics`), so it meets the same slowdown: 64 KiB copied to 8 bytes
/// ahead of its source took 34 µs against 1.3 µs.
pub(crate) fn copy_into(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_into needs slices of one length");
    // SAFETY: `src` is readable and `dst` writable for `src.len()` bytes; a `&mut` never
    // overlaps a `&`.
    unsafe { copy(src.as_ptr(), dst.as_mut_ptr(), src.len()) };
}

/// Copies `len` bytes from `src` to `dst`, memory nobody else writes meanwhile: the loop on
/// x86-64, `memcpy` elsewhere (where the loop would be a byte-by-byte atomic copy).
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes that nothing else
/// accesses meanwhile; they must not overlap.
pub(crate) unsafe fn copy(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract is stronger than `copy_racy`'s.
    unsafe {
        copy_racy(src, dst, len)
    };
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, len)
    };
}

/// Below this many bytes the copy is one `rep movsb`: the loop's set-up (feature check, head,
/// tail) costs more than it saves on short copies, and the region's strings are 1 KiB and up.
/// From here on the AVX2 loop, which first copies 32 bytes to align the destination, moves
/// 128 bytes a turn, and ends with the last 128 bytes (some copied twice).
pub(crate) const VECTOR_MIN: usize = 256;

// The loop's first turn needs 128 bytes past the head's 1–32, and the tail 128 before the end.
const _: () = assert!(VECTOR_MIN >= 160);

/// Copies `len` bytes from `src`, which another process may write meanwhile, to `dst`.
///
/// # Safety
/// `src` must be valid for reads of `len` bytes for the duration of the call (mapped and
/// backed; another process may write them), and `dst` valid for writes of `len` bytes that
/// nothing else accesses meanwhile; the two must not overlap.
pub(crate) unsafe fn copy_racy(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if len >= VECTOR_MIN && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked above); the rest is the caller's contract.
            unsafe { copy_avx2(src, dst, len) };
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { rep_movsb(src, dst, len) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for i in 0..len {
        // SAFETY: per the caller's contract; `AtomicU8` has the size and alignment of `u8`,
        // and atomic loads may race with the other process's writes.
        unsafe {
            let byte = (*src.add(i).cast::<std::sync::atomic::AtomicU8>())
                .load(std::sync::atomic::Ordering::Relaxed);
            dst.add(i).write(byte);
        }
    }
}

/// # Safety
/// As [`copy_racy`].
#[cfg(target_arch = "x86_64")]
unsafe fn rep_movsb(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: per the caller's contract, `rep movsb` reads `len` readable bytes at `src` and
    // writes `len` writable bytes at `dst` (the direction flag is clear on entry to asm, as the
    // ABI requires); it touches no other memory, no stack, and no flags. x86 byte loads cannot
    // tear, so a racing writer can only change which values are read.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") len => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        );
    }
}

/// # Safety
/// As [`copy_racy`], and the CPU must have AVX2 and `len >= VECTOR_MIN`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_avx2(src: *const u8, dst: *mut u8, len: usize) {
    debug_assert!(len >= VECTOR_MIN);
    // SAFETY: the caller guarantees AVX2, `len >= 256`, `len` readable bytes at `src` and
    // `len` writable ones at `dst`, not overlapping. The head copies bytes 0..32; the pointers
    // then advance by 1–32 bytes to the next 32-byte boundary of `dst` (never past `len`,
    // since `len >= 256`), each turn of the loop copies 128 bytes while at least 128 remain,
    // and the tail copies the 128 bytes ending at `len`, which start at or after the first
    // byte since the loop ran at least once: every access lies within `src..src + len` and
    // `dst..dst + len`. A byte the head or the tail copies may be copied twice; a racing writer
    // can only change which values end up in `dst`. `vzeroupper` clears the upper halves of
    // every ymm register, so the whole vector file is declared clobbered (`clobber_abi`).
    unsafe {
        std::arch::asm!(
            "vmovdqu ymm0, [rsi]",
            "vmovdqu [rdi], ymm0",
            "mov rax, rdi",
            "neg rax",
            "and rax, 31",
            "jnz 2f",
            "mov rax, 32",
            "2:",
            "add rsi, rax",
            "add rdi, rax",
            "sub rcx, rax",
            "3:",
            "vmovdqu ymm0, [rsi]",
            "vmovdqu ymm1, [rsi + 32]",
            "vmovdqu ymm2, [rsi + 64]",
            "vmovdqu ymm3, [rsi + 96]",
            "vmovdqa [rdi], ymm0",
            "vmovdqa [rdi + 32], ymm1",
            "vmovdqa [rdi + 64], ymm2",
            "vmovdqa [rdi + 96], ymm3",
            "add rsi, 128",
            "add rdi, 128",
            "sub rcx, 128",
            "cmp rcx, 128",
            "jae 3b",
            // The 0–127 bytes left: the last 128 bytes of the copy, overlapping what the loop
            // copied (a `rep movsb` tail would keep the source's distance, and its slowdown).
            "test rcx, rcx",
            "jz 4f",
            "vmovdqu ymm0, [rsi + rcx - 128]",
            "vmovdqu ymm1, [rsi + rcx - 96]",
            "vmovdqu ymm2, [rsi + rcx - 64]",
            "vmovdqu ymm3, [rsi + rcx - 32]",
            "vmovdqu [rdi + rcx - 128], ymm0",
            "vmovdqu [rdi + rcx - 96], ymm1",
            "vmovdqu [rdi + rcx - 64], ymm2",
            "vmovdqu [rdi + rcx - 32], ymm3",
            "4:",
            "vzeroupper",
            inout("rcx") len => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            out("rax") _,
            clobber_abi("C"),
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length around the switch to the loop and around its 128-byte turns, at every
    /// source and destination offset within a 64-byte line: each byte arrives, and none is
    /// written outside the destination.
    #[test]
    fn copies_every_length_at_every_offset() {
        let src: Vec<u8> = (0..1024 + 64).map(|i| (i * 7 + 3) as u8).collect();
        let lens = (0..40)
            .chain(VECTOR_MIN - 3..VECTOR_MIN + 140)
            .chain([1000, 1024]);
        for len in lens {
            for src_off in 0..64 {
                for dst_off in [0, 1, 8, 16, 31, 32, 33, 48, 63] {
                    let mut dst = vec![0xEE_u8; len + 128];
                    // SAFETY: `src_off + len <= src.len()` and `dst_off + len < dst.len()`; two
                    // distinct Vecs never overlap.
                    unsafe {
                        copy_racy(
                            src.as_ptr().add(src_off),
                            dst.as_mut_ptr().add(dst_off),
                            len,
                        )
                    };
                    let at = format!("len {len}, src +{src_off}, dst +{dst_off}");
                    assert_eq!(
                        &dst[dst_off..dst_off + len],
                        &src[src_off..src_off + len],
                        "{at}"
                    );
                    assert!(dst[..dst_off].iter().all(|&b| b == 0xEE), "{at}: before");
                    assert!(
                        dst[dst_off + len..].iter().all(|&b| b == 0xEE),
                        "{at}: after"
                    );
                }
            }
        }
    }

    /// Pages of memory with an inaccessible page on each side, so a copy that reads or
    /// writes one byte outside its bounds faults.
    struct Guarded {
        base: *mut u8,
        len: usize,
    }

    /// The page size: 4 KiB here, 16 or 64 KiB on some arm64 kernels.
    fn page() -> usize {
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE);
        page.ok().flatten().map_or(4096, |n| n as usize)
    }

    impl Guarded {
        fn new(pages: usize) -> Guarded {
            let len = (pages + 2) * page();
            // SAFETY: a fresh anonymous mapping; nothing else refers to it.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED);
            let base = base.cast::<u8>();
            // SAFETY: the pages between the two guards lie inside the mapping.
            let r = unsafe {
                libc::mprotect(
                    base.add(page()).cast(),
                    pages * page(),
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            assert_eq!(r, 0);
            Guarded { base, len }
        }

        /// The first accessible byte, and the first byte of the guard after them.
        fn bounds(&self) -> (*mut u8, *mut u8) {
            // SAFETY: both lie inside the mapping.
            unsafe { (self.base.add(page()), self.base.add(self.len - page())) }
        }
    }

    impl Drop for Guarded {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`, no longer used.
            unsafe { libc::munmap(self.base.cast(), self.len) };
        }
    }

    /// Source and destination flush against a guard page, before and after, at every offset
    /// of the destination within 64 bytes: no access strays outside either (it would fault).
    #[test]
    fn never_touches_a_byte_outside_either_buffer() {
        let (src, dst) = (Guarded::new(2), Guarded::new(2));
        let ((src_start, src_end), (dst_start, dst_end)) = (src.bounds(), dst.bounds());
        let lens = (VECTOR_MIN - 1..VECTOR_MIN + 260).chain([1000, 4000, 2 * page() - 64]);
        for len in lens {
            for shift in 0..64 {
                // SAFETY: each pair lies within the accessible pages (`len + 64 <= 2 pages`),
                // which are distinct mappings.
                unsafe {
                    copy_racy(src_start, dst_start.add(shift), len);
                    copy_racy(src_end.sub(len), dst_end.sub(len + shift), len);
                    copy_racy(src_start.add(shift), dst_end.sub(len), len);
                    copy_racy(src_end.sub(len + shift), dst_start, len);
                }
            }
        }
    }

    #[test]
    fn copy_into_copies_a_slice() {
        let src: Vec<u8> = (0..70_000).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0; 70_000 + 5];
        copy_into(&mut dst[5..], &src);
        assert_eq!(&dst[5..], &src[..]);
        assert_eq!(dst[..5], [0; 5]);
    }
}
