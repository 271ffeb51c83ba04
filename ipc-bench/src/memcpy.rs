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
        Ok(Box::new(MemcpyClient::new()))
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

impl MemcpyClient {
    fn new() -> MemcpyClient {
        // Non-zero fill on both sides, so every page is really backed before timing.
        let mut buffer = vec![0xa5; 2 * MAX_PAYLOAD + PAGE];
        let src = buffer.as_ptr().align_offset(PAGE);
        buffer[src + MAX_PAYLOAD..].fill(0x5a);
        MemcpyClient { buffer, src }
    }

    /// The source and the destination.
    fn halves(&mut self) -> (&mut [u8], &mut [u8]) {
        self.buffer[self.src..][..2 * MAX_PAYLOAD].split_at_mut(MAX_PAYLOAD)
    }
}

impl Client for MemcpyClient {
    fn call(&mut self, _: Kind, len: usize) -> io::Result<()> {
        let (src, dst) = self.halves();
        // black_box on both ends keeps the copy from being elided or hoisted.
        dst[..len].copy_from_slice(black_box(&src[..len]));
        black_box(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_copies_between_buffers_on_pages_after_a_large_block_was_freed() {
        // As the harness does before a later pass. glibc then serves blocks up to this size
        // from its heap: two `Vec`s of 16 MiB allocated next lay 3,424 and 3,440 bytes past a
        // page in a scratch run, where fresh ones lay 16 and 16.
        drop(std::hint::black_box(vec![1u8; MAX_PAYLOAD + (4 << 20)]));
        let mut client = MemcpyClient::new();
        client.call(Kind::Bulk, 4096).unwrap();
        let (src, dst) = client.halves();
        assert_eq!((src.len(), dst.len()), (MAX_PAYLOAD, MAX_PAYLOAD));
        assert_eq!(src.as_ptr() as usize % PAGE, 0);
        assert_eq!(dst.as_ptr() as usize % PAGE, 0);
        assert_eq!(&dst[..4096], &src[..4096], "copied");
        assert_eq!(dst[4096], 0x5a, "no further");
    }
}
