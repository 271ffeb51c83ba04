//! Whether one copy through the kernel (a string written into the peer:
//! [`crate::peer_memory`]) costs less, right now, than the shared region's two.
//!
//! It depends on the hardware, not on the build. The VMs typed-ipc is measured on run on an
//! Intel Xeon host one session and an AMD EPYC host the next: writing 1 MiB into a worker
//! took ~50 µs on the first, while `process_vm_readv` of 1 MiB within one process took 100 µs
//! (0.38 µs a page) on the second, with `memcpy` at 23–30 µs on both. The kernel pins every
//! page it copies, and that is the work that differs (a bare syscall, too: ~0.1 against
//! 0.18–0.25 µs). Written strings took 1.75x a `memcpy` at 1 MiB on the Xeon and 4.4x on the
//! EPYC, against 3.2x and 2.9x through the region. So the choice is measured: a *probe*
//! copies 256 KiB within this process, between two buffers that start on pages, both ways:
//! with `process_vm_readv` and with `memcpy` (the fastest of three each), and one copy is used
//! while the kernel's takes at most [`THRESHOLD`] times the `memcpy`. The probe runs when a
//! string first could take one copy, and again when one could and the last probe is
//! [`REPROBE`] old: 0.4–0.8 ms on the EPYC host (faulting in its two buffers, and the kernel's
//! copy 16 bytes ahead, [`too_close`]), at most every ten seconds, and no memory kept.
//!
//! [`set_one_copy`] or `TYPED_IPC_ONE_COPY=always|never|measured` in the environment overrides
//! the measurement for the whole process (tests that must see one path use it).

use parking_lot::Mutex;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::connection::trace;

/// How a process chooses between one copy through the kernel and the region's two copies,
/// for the strings [`crate::peer_memory`] would write into a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OneCopy {
    /// Measure which is cheaper now, and measure again every ten seconds of such traffic (the
    /// default).
    Measured,
    /// One copy whenever the connection allows it.
    Always,
    /// Always the region.
    Never,
}

/// Sets how this process chooses between one copy and two ([`OneCopy`]), overriding
/// `TYPED_IPC_ONE_COPY` from the environment.
pub fn set_one_copy(policy: OneCopy) {
    POLICY.store(policy as u8 + 1, Ordering::Relaxed);
}

/// One copy wins while the kernel's copy of the probe takes at most this many times the
/// `memcpy`'s. The region's two copies cost 2.8–3.3x a `memcpy` at 1 MiB in the parent and
/// worker's round trip on these machines. A written string's time tracks the probe's ratio
/// on the Intel Xeon host (2.0x `memcpy` at 1 MiB, the probe reading 2.1–2.2x, on
/// 2026-12-06) and runs up to ~1.3x above it on the AMD EPYC host (4.4x at 1 MiB where the
/// probe read 3.3–5.8x). At 2.5 a host of the EPYC's kind still takes the region (so does
/// every EPYC host seen), while the Xeon's 2.1–2.2x, which the earlier 2.0 sent to the
/// region at 2.9x `memcpy` instead of one copy at 2.0x, takes one copy.
const THRESHOLD: f64 = 2.5;
/// How old a probe may be before a string that could take one copy runs a new one.
const REPROBE: Duration = Duration::from_secs(10);
/// Bytes the probe copies: the smallest string that takes one copy.
const PROBE: usize = crate::peer_memory::MIN;
/// The distance that matters to `rep movsb` is counted modulo a page.
const PAGE: usize = 4096;

/// `0`: not read from the environment yet; else a [`OneCopy`] + 1.
static POLICY: AtomicU8 = AtomicU8::new(0);
/// The last probe's verdict, for threads that find another one probing.
static PAYS: AtomicBool = AtomicBool::new(false);
/// The last probe found the kernel's copy slow 16 bytes ahead too ([`too_close`]).
static WIDE_CLIFF: AtomicBool = AtomicBool::new(true);
/// When the last probe ran.
static PROBED: Mutex<Option<Instant>> = Mutex::new(None);

/// Whether a string that could take one copy should, now.
pub(crate) fn pays() -> bool {
    match policy() {
        OneCopy::Always => true,
        OneCopy::Never => false,
        OneCopy::Measured => measured(),
    }
}

/// Whether a string at `src` that [`pays`] to write should take the region instead, because
/// it would land at `dst` in the peer a short distance ahead of where it lies, counted modulo
/// 4 KiB. There the kernel's copy (`rep movsb`) runs 4–6x slower on the AMD EPYC host, and how
/// short is short differs from one day's host to the next. `process_vm_writev` of 1 MiB
/// within one process took:
/// - until 2026-12-03: 78–100 µs at distances 0 and 16–4,088, 388–555 µs at 1–15;
/// - on 2026-12-04 (the host's cpuinfo: family 25, model 1, Zen 3): 89–100 µs at 0 and
///   32–4,095, 420–436 µs at 1–31.
///
/// (`ipc-bench --bin copies` times it.) So the probe also times its kernel copy 16 bytes
/// ahead: slow there ([`cliff_is_wide`]), strings 1–31 bytes ahead step aside, else 1–15. A
/// page-aligned source (an `mmap`, a
/// [`SharedBuffer`](crate::shared_buffer::SharedBuffer)) lands 16 bytes ahead in an inbox
/// `malloc` placed, so on a host without the wide cliff it is still written. Only a measured
/// choice steps aside (for 15 or 31 in 4,096 placements, if they fall at random); `Always`
/// writes anyway.
pub(crate) fn too_close(src: usize, dst: u64) -> bool {
    policy() == OneCopy::Measured
        && short_distance(src as u64, dst, WIDE_CLIFF.load(Ordering::Relaxed))
}

/// `dst` lies 1–15 bytes ahead of `src` (with `wide`, 1–31), counted modulo 4 KiB.
fn short_distance(src: u64, dst: u64, wide: bool) -> bool {
    let end = if wide { 32 } else { 16 };
    (1..end).contains(&(dst.wrapping_sub(src) % PAGE as u64))
}

fn policy() -> OneCopy {
    match POLICY.load(Ordering::Relaxed) {
        0 => {
            let policy = std::env::var("TYPED_IPC_ONE_COPY")
                .ok()
                .and_then(|v| parse(&v))
                .unwrap_or(OneCopy::Measured);
            let stored = policy as u8 + 1;
            match POLICY.compare_exchange(0, stored, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => policy,
                // `set_one_copy` came first, and wins.
                Err(_) => self::policy(),
            }
        }
        1 => OneCopy::Measured,
        2 => OneCopy::Always,
        _ => OneCopy::Never,
    }
}

/// `TYPED_IPC_ONE_COPY`'s value, if it is one of the three.
fn parse(value: &str) -> Option<OneCopy> {
    match value {
        "measured" => Some(OneCopy::Measured),
        "always" => Some(OneCopy::Always),
        "never" => Some(OneCopy::Never),
        _ => None,
    }
}

/// The measured verdict, probing again if the last probe is too old. A thread that finds
/// another probing takes the last verdict rather than wait.
fn measured() -> bool {
    let Some(mut probed) = PROBED.try_lock() else {
        return PAYS.load(Ordering::Relaxed);
    };
    if probed.is_some_and(|at| at.elapsed() < REPROBE) {
        return PAYS.load(Ordering::Relaxed);
    }
    let pays = probe().is_some_and(|probe| {
        let pays = verdict(probe.kernel, probe.memcpy);
        let wide = cliff_is_wide(probe.kernel, probe.kernel_16_ahead);
        WIDE_CLIFF.store(wide, Ordering::Relaxed);
        if trace::enabled() {
            // The verdict first: what a user wants to know is which path large strings take.
            trace::line(&format!(
                "typed-ipc[{}] one-copy probe: large byte strings take {} (of {PROBE} bytes, the \
                 kernel's copy took {:?}, {:?} to 16 bytes past a page; memcpy {:?})",
                std::process::id(),
                if pays {
                    "one copy, written into the peer"
                } else {
                    "two copies, through the shared region"
                },
                probe.kernel,
                probe.kernel_16_ahead,
                probe.memcpy,
            ));
        }
        pays
    });
    PAYS.store(pays, Ordering::Relaxed);
    *probed = Some(Instant::now());
    drop(probed);
    pays
}

/// One copy pays if the kernel's copy takes at most [`THRESHOLD`] times the `memcpy`.
fn verdict(kernel: Duration, memcpy: Duration) -> bool {
    kernel.as_secs_f64() <= THRESHOLD * memcpy.as_secs_f64()
}

/// The kernel's copy falls off its cliff 16 bytes ahead too if it takes more than twice as
/// long there as 0 bytes ahead: 4.2x on the 2026-12-04 host (110 µs against 26 µs for the
/// probe's 256 KiB); 1.4x on the earlier one (119.5 µs against 82.7 µs for 1 MiB, in
/// `docs/benchmarks-bulk.md`), against 4.7x at 1–15 bytes ahead there.
fn cliff_is_wide(kernel: Duration, kernel_16_ahead: Duration) -> bool {
    kernel_16_ahead.as_secs_f64() > 2.0 * kernel.as_secs_f64()
}

/// What a probe timed, each the fastest of three copies of [`PROBE`] bytes.
struct Probe {
    /// Through the kernel, between two buffers that start on pages.
    kernel: Duration,
    /// Through the kernel, to 16 bytes past a page.
    kernel_16_ahead: Duration,
    /// By `memcpy`, between the two buffers on pages.
    memcpy: Duration,
}

/// Copies [`PROBE`] bytes within this process through the kernel (`process_vm_readv`: the
/// same page pinning as a write into a peer) and by `memcpy`; `None` if the kernel refuses
/// (then no peer copy would work either).
fn probe() -> Option<Probe> {
    fn fastest(mut copy: impl FnMut() -> bool) -> Option<Duration> {
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let start = Instant::now();
            if !copy() {
                return None;
            }
            best = best.min(start.elapsed());
        }
        Some(best)
    }
    let mut buffer = vec![0u8; 2 * PROBE + 3 * PAGE];
    let (source, target) = on_pages(&mut buffer);
    source.fill(1);
    let source = &*source;
    let mut kernel_copy = |ahead: usize| {
        let target = &mut target[ahead..ahead + PROBE];
        let local = libc::iovec {
            iov_base: target.as_mut_ptr().cast(),
            iov_len: PROBE,
        };
        let remote = libc::iovec {
            iov_base: source.as_ptr() as *mut libc::c_void,
            iov_len: PROBE,
        };
        // SAFETY: getpid has no preconditions. `local` is `target`'s bytes, writable for
        // PROBE bytes; `remote` is `source`'s, in this process, only read.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        n == PROBE as isize
    };
    let kernel = fastest(|| kernel_copy(0))?;
    let kernel_16_ahead = fastest(|| kernel_copy(16))?;
    let memcpy = fastest(|| {
        target[..PROBE].copy_from_slice(black_box(source));
        black_box(&target);
        true
    })?;
    Some(Probe {
        kernel,
        kernel_16_ahead,
        memcpy,
    })
}

/// [`PROBE`] bytes for the probe's source, and the rest of `buffer` after them for its target
/// (at least `PROBE` + 16 bytes for a `buffer` of `2 * PROBE + PAGE + 16`; the probe gives
/// `2 * PROBE + 3 * PAGE`), both starting on a page.
/// Where `malloc` puts two blocks is luck: once a large block has been freed, glibc serves
/// 256 KiB from its heap, the second block 16 bytes ahead of the first counted modulo 4 KiB,
/// and there `memcpy` (`rep movsb`) took 88 µs against 7 µs on the EPYC host. The probe then
/// read 1.25x and chose one copy, slower than the region there (the 2026-12-04 benchmark run).
/// The region's copies avoid such distances ([`crate::bulk_copy`]) and [`too_close`] keeps one
/// copy away from them, so the probe compares the two copies where neither falls off that
/// cliff.
fn on_pages(buffer: &mut [u8]) -> (&mut [u8], &mut [u8]) {
    let start = buffer.as_ptr().align_offset(PAGE);
    buffer[start..].split_at_mut(PROBE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_is_one_copy_up_to_the_threshold() {
        let us = Duration::from_micros;
        let ns = Duration::from_nanos;
        assert!(verdict(us(10), us(7)), "1.4x");
        assert!(
            verdict(ns(16_873), ns(7_740)),
            "the Xeon host's probe of 2026-12-06: 2.2x, where one copy took 2.0x `memcpy` \
             at 1 MiB and the region 2.9x"
        );
        assert!(verdict(us(25), us(10)), "2.5x");
        assert!(!verdict(us(26), us(10)), "2.6x");
        assert!(!verdict(us(24), us(7)), "the EPYC host: 3.4x");
    }

    #[test]
    fn a_short_distance_is_1_to_15_bytes_ahead_modulo_4_kib_or_with_a_wide_cliff_1_to_31() {
        let page = 7 << 12;
        for wide in [false, true] {
            assert!(!short_distance(page, page, wide));
            assert!(short_distance(page, page + 1, wide));
            assert!(short_distance(page, page + 15, wide));
            assert!(!short_distance(page, page + 32, wide));
            assert!(short_distance(page + 4090, page + 4096 + 4, wide)); // across a page: 10
            assert!(!short_distance(page + 8, page, wide)); // behind
            assert!(!short_distance(page + 1, page, wide)); // 1 behind: 4,095 ahead
            assert!(!short_distance(page, page + 4096, wide)); // a whole page ahead
            assert!(short_distance(u64::MAX - 3, 4, wide)); // wrapping: 8 ahead
        }
        assert!(!short_distance(page, page + 16, false));
        assert!(short_distance(page, page + 16, true));
        assert!(short_distance(page, page + 31, true));
        assert!(short_distance(page + 100, page + 4096 + 124, true)); // a page and 24 ahead
        assert!(!short_distance(page + 100, page + 4096 + 124, false));
    }

    #[test]
    fn the_cliff_is_wide_where_16_bytes_ahead_takes_over_twice_as_long() {
        let us = Duration::from_micros;
        assert!(cliff_is_wide(us(26), us(110)), "the 2026-12-04 host: 4.2x");
        assert!(!cliff_is_wide(us(83), us(120)), "the host before: 1.4x");
        assert!(!cliff_is_wide(us(26), us(52)), "2.0x");
    }

    #[test]
    fn the_environment_names_the_three_policies_and_nothing_else() {
        assert_eq!(parse("always"), Some(OneCopy::Always));
        assert_eq!(parse("never"), Some(OneCopy::Never));
        assert_eq!(parse("measured"), Some(OneCopy::Measured));
        assert_eq!(parse("1"), None);
    }

    #[test]
    fn the_probes_buffers_start_on_pages_wherever_the_allocation_lies() {
        let mut buffer = vec![0u8; 2 * PROBE + 5 * PAGE];
        let page = buffer.as_ptr().align_offset(PAGE);
        for skew in [0, 1, 16, 4095] {
            let (source, target) = on_pages(&mut buffer[page + skew..][..2 * PROBE + 3 * PAGE]);
            assert_eq!(source.len(), PROBE);
            assert!(target.len() >= PROBE + 16, "skew {skew}");
            assert_eq!(source.as_ptr() as usize % PAGE, 0, "skew {skew}");
            assert_eq!(target.as_ptr() as usize % PAGE, 0, "skew {skew}");
        }
    }

    #[test]
    fn a_probe_measures_every_copy() {
        let probe = probe().expect("a process may read its own memory");
        for copy in [probe.kernel, probe.kernel_16_ahead, probe.memcpy] {
            assert!(copy > Duration::ZERO && copy < Duration::MAX);
        }
    }
}
