//! `copies`: how fast a byte string comes out of a shared region, by where the destination
//! lies, against `memcpy` (glibc's, through `copy_from_slice`) of the same bytes.
//!
//! ```text
//! cargo run -p ipc-bench --release --bin copies
//! ```
//!
//! One process, pinned to the first CPU it may run on (CPU 0 unless `taskset` says
//! otherwise). The source is a `SharedRegion`'s first byte (page-aligned, as
//! the connection's out-of-line strings are); the destination lies 0 to 2,056 bytes past a
//! page, so that many bytes ahead of the source counted modulo 4 KiB (16 is where glibc's
//! `malloc` puts large blocks), plus a fresh `Vec` as a receiver gets one
//! (`RegionView::to_vec` against `<[u8]>::to_vec`). A third column is one `rep movsb`, what
//! `RegionView` ran before 2026-12-02. Each cell is the median of many samples (copies under
//! 64 KiB timed in batches), the ways taking turns in a rotating order. `RegionView` reads
//! through the region's second, read-only mapping, as a receiver does. Prints markdown. On
//! the AMD EPYC host, `rep movsb` (which glibc's `memcpy` runs from 2,112 bytes to 1 MiB)
//! slows down sharply when the destination lies a few bytes ahead of the source: see
//! `docs/benchmarks-bulk.md`, "Copies at every alignment". A second table times the kernel's
//! copy (`process_vm_writev` within this process, as a parent writing into its worker) by the
//! same distance. A third table times reading a region in place: the sum of its 64-bit
//! words through a slice of the creator's mapping (the compiler vectorises it), through
//! `RegionView::words` (relaxed atomic loads, which it does not) and through the windows of
//! `RegionView::reader` (copied 4 KiB at a time, then summed as a slice); `--reads` prints
//! only that table.

use std::hint::black_box;
use std::time::Instant;

use std::io::BufRead;

use typed_ipc::shared_region::{RegionView, SharedRegion};

const SIZES: [usize; 4] = [4 << 10, 64 << 10, 1 << 20, 16 << 20];
const OFFSETS: [usize; 7] = [0, 4, 8, 16, 32, 72, 2056];

fn main() {
    let cpu = ipc_bench::nth_allowed_cpu(0).expect("a CPU to run on");
    ipc_bench::pin(cpu).expect("pin to the first CPU this process may run on");
    if std::env::args().any(|arg| arg == "--reads") {
        return reads_in_place();
    }

    println!("| size | destination | `memcpy` | `RegionView` | ratio | one `rep movsb` | ratio |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: |");
    for len in SIZES {
        let (region, view) = counting_region(len);
        let page = 4096;
        let mut buffer = vec![0u8; len + 2 * page];
        let base = buffer.as_ptr().align_offset(page);
        let (samples, batch) = sampling(len);
        for offset in OFFSETS {
            let dst = base + offset..base + offset + len;
            let times = race(
                samples,
                batch,
                &mut buffer[dst],
                [
                    &mut |dst| dst.copy_from_slice(&region[..len]),
                    &mut |dst| view.copy_to(0, dst).expect("copy"),
                    &mut |dst| rep_movsb(dst, &region[..len]),
                ],
            );
            row(len, &format!("page + {offset}"), &times);
        }
        let times = race(
            samples,
            batch,
            &mut (),
            [
                &mut |()| drop(black_box(region[..len].to_vec())),
                &mut |()| drop(black_box(view.to_vec(0, len).expect("copy"))),
            ],
        );
        row(len, "a fresh `Vec`", &times);
    }
    kernel_copies();
    reads_in_place();
}

/// A region of `len` bytes (and more, to the page) whose byte `i` is `i as u8`, and a view
/// of it as a receiver has one: its second, read-only mapping.
fn counting_region(len: usize) -> (SharedRegion, RegionView) {
    let mut region = SharedRegion::new(len).expect("region");
    for (i, b) in region.iter_mut().enumerate() {
        *b = i as u8;
    }
    let view = region.view().expect("view");
    (region, view)
}

/// How many samples of how many operations on `len` bytes each: batches of at least 64 KiB
/// (one operation from 64 KiB up), about 1 GiB in all.
fn sampling(len: usize) -> (usize, usize) {
    let batch = ((64 << 10) / len).max(1);
    ((1 << 30) / len / batch, batch)
}

/// The sum of a region's words, read three ways, by size.
fn reads_in_place() {
    println!("\n| size | slice | `words()` | ratio | `reader()` | ratio |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for len in SIZES {
        let (region, view) = counting_region(len);
        let want = ipc_bench::checksum(&region[..len]);
        let (samples, batch) = sampling(len);
        let times = race(
            samples,
            batch,
            &mut (),
            [
                &mut |()| assert_eq!(ipc_bench::checksum(black_box(&region[..len])), want),
                &mut |()| assert_eq!(ipc_bench::checksum_words(view.words(), len), want),
                &mut |()| assert_eq!(sum_windows(&view, len), want),
            ],
        );
        row(len, "", &times);
    }
}

/// [`ipc_bench::checksum`] of a region's first `len` bytes, summed a window at a time (the
/// windows are whole words: 4 KiB each from offset 0, as `RegionReader::WINDOW` says).
fn sum_windows(view: &RegionView, len: usize) -> u64 {
    let mut reader = view.reader(0, len).expect("inside the region");
    let mut sum = 0u64;
    loop {
        let window = reader.fill_buf().expect("a region reader does not fail");
        if window.is_empty() {
            return sum;
        }
        sum = sum.wrapping_add(ipc_bench::checksum(window));
        let n = window.len();
        reader.consume(n);
    }
}

/// The kernel's copy by distance: `process_vm_writev` of 1 MiB within this process (what a
/// parent's write into its worker costs), from a page-aligned buffer to one `d` bytes past a
/// page, so `d` bytes ahead counted modulo 4 KiB.
fn kernel_copies() {
    const LEN: usize = 1 << 20;
    let page = 4096;
    let src = vec![7u8; LEN + page];
    let mut dst = vec![0u8; LEN + 2 * page];
    let base = dst.as_ptr().align_offset(page);
    let src = &src[src.as_ptr().align_offset(page)..][..LEN];
    println!("\n| `process_vm_writev` of 1 MiB, destination | time |");
    println!("| --- | ---: |");
    for distance in [0usize, 1, 2, 4, 8, 12, 15, 16, 24, 31, 32, 64, 2048, 4095] {
        let at = &mut dst[base + distance..][..LEN];
        let [t] = race(200, 1, at, [&mut |at| write_into_self(at, src)]);
        println!("| {distance} bytes ahead | {t:.1} µs |");
    }
}

/// Copies `src` into `dst` through the kernel, as a write into another process does.
fn write_into_self(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len());
    let local = libc::iovec {
        iov_base: src.as_ptr() as *mut libc::c_void,
        iov_len: src.len(),
    };
    let remote = libc::iovec {
        iov_base: dst.as_mut_ptr().cast(),
        iov_len: dst.len(),
    };
    // SAFETY: `local` describes `src`, which the kernel only reads; `remote` describes `dst`,
    // this process's own memory, writable and borrowed mutably for the call.
    let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    assert_eq!(
        n,
        src.len() as isize,
        "process_vm_writev: {}",
        std::io::Error::last_os_error()
    );
}

type Way<'a, T> = &'a mut dyn FnMut(&mut T);

/// The median time of each way on `on`, in µs a copy, over `n` samples each (at least 21) of
/// `batch` copies, the ways taking turns in a rotating order.
fn race<T: ?Sized, const N: usize>(
    n: usize,
    batch: usize,
    on: &mut T,
    mut ways: [Way<'_, T>; N],
) -> [f64; N] {
    let n = n.clamp(21, 20_000);
    let mut times: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(n));
    for _ in 0..3 {
        ways.iter_mut().for_each(|way| way(on));
    }
    for turn in 0..n {
        for i in (0..N).map(|i| (i + turn) % N) {
            let t = Instant::now();
            for _ in 0..batch {
                ways[i](on);
            }
            times[i].push(t.elapsed().as_secs_f64() * 1e6 / batch as f64);
        }
    }
    times.map(median)
}

/// `dst.copy_from_slice(src)` as one `rep movsb`.
fn rep_movsb(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len());
    // SAFETY: `rep movsb` copies `src.len()` bytes from `src` (readable) to `dst` (writable, of
    // that length, not overlapping a shared borrow); the direction flag is clear on entry to
    // asm, as the ABI requires; it touches no other memory, no stack and no flags.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") src.len() => _,
            inout("rdi") dst.as_mut_ptr() => _,
            inout("rsi") src.as_ptr() => _,
            options(nostack, preserves_flags),
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A table row: `memcpy`'s time, then each other way's time and its ratio to `memcpy`.
fn row(len: usize, at: &str, times: &[f64]) {
    let size = match len {
        l if l >= 1 << 20 => format!("{} MiB", l >> 20),
        l => format!("{} KiB", l >> 10),
    };
    let at = if at.is_empty() {
        String::new()
    } else {
        format!(" {at} |")
    };
    let mut line = format!("| {size} |{at} {:.2} µs |", times[0]);
    for t in &times[1..] {
        line += &format!(" {t:.2} µs | {:.2}x |", t / times[0]);
    }
    if times.len() == 2 {
        line += " — | |";
    }
    println!("{line}");
}
