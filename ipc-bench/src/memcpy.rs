//! The bulk reference: copying N bytes within the harness process.

use std::hint::black_box;
use std::io;

use crate::system::{Client, Kind, Launcher, MAX_PAYLOAD, System};

/// `memcpy` of the payload between two buffers allocated (and faulted in) once, both starting
/// on a page; no child.
///
/// On pages, because where `malloc` puts two large blocks is luck, and on the AMD EPYC host
/// glibc's `memcpy` (`rep movsb` up to 1 MiB) runs 10–16x slower when the destination lies
/// 1–31 bytes ahead of the source, counted modulo 4 KiB. Two fresh 16 MiB blocks are mapped
/// alike (16 bytes past a page each), but once the harness has freed a large block, glibc
/// serves them from its heap, the second 16 bytes ahead of the first: the 2026-12-04 run's
/// cross-CPU pass timed 64 KiB at 21.2 µs against 1.32 µs in its same-CPU pass. The
/// reference is the copy at its best.
pub struct Memcpy;

/// Distances are counted modulo a page.
const PAGE: usize = 4096;

impl System for Memcpy {
    fn name(&self) -> &'static str {
        "memcpy"
    }

    fn kinds(&self) -> &'static [Kind] {
        &[Kind::Bulk]
    }

    fn start(&self, _: &mut Launcher) -> io::Result<Box<dyn Client>> {
        // Non-zero fill on both sides, so every page is really backed before timing.
        let mut buffer = vec![0xa5; 2 * MAX_PAYLOAD + PAGE];
        let src = buffer.as_ptr().align_offset(PAGE);
        buffer[src + MAX_PAYLOAD..].fill(0x5a);
        Ok(Box::new(MemcpyClient { buffer, src }))
    }

    fn serve(&self, _: &str) -> io::Result<()> {
        Err(io::Error::other("memcpy has no server"))
    }
}

struct MemcpyClient {
    /// The source, [`MAX_PAYLOAD`] bytes at `src`, then the destination, as many.
    buffer: Vec<u8>,
    src: usize,
}

impl Client for MemcpyClient {
    fn call(&mut self, _: Kind, len: usize) -> io::Result<()> {
        let (src, dst) = self.buffer[self.src..].split_at_mut(MAX_PAYLOAD);
        // black_box on both ends keeps the copy from being elided or hoisted.
        dst[..len].copy_from_slice(black_box(&src[..len]));
        black_box(dst);
        Ok(())
    }
}
