//! Budget and oracles: memory, patience and iteration limits; the panic record; peak RSS.

use std::sync::{Mutex, MutexGuard, Once};
use std::time::Duration;

/// Peak resident memory allowed of a serving process, however large the lengths it is sent.
pub(crate) const MEMORY_LIMIT_KIB: u64 = 256 << 10;
/// How long a reply may take before the test calls it a hang (generous: a debug build on a
/// loaded 2-CPU machine).
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);
/// Iterations of the in-process server run when `FUZZ_ITERS` is not set; the other runs
/// take a fraction of it.
const DEFAULT_ITERS: u64 = 2000;

pub(crate) fn iterations() -> u64 {
    std::env::var("FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ITERS)
}

pub(crate) fn base_seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f00d)
}

/// The tests of this file count fds and memory of the whole process: one at a time.
pub(crate) fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every panic in this process, by any thread, caught or not.
pub(crate) static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub(crate) fn record_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current().name().unwrap_or("?").to_string();
            PANICS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("[{thread}] {info}"));
            previous(info);
        }));
    });
}

pub(crate) fn panics_so_far() -> usize {
    PANICS.lock().unwrap_or_else(|e| e.into_inner()).len()
}

pub(crate) fn last_panic() -> String {
    let panics = PANICS.lock().unwrap_or_else(|e| e.into_inner());
    panics.last().cloned().unwrap_or_default()
}

/// `VmHWM` (peak resident set) of process `pid` ("self" for this one), in KiB.
pub(crate) fn peak_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
