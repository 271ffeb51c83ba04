//! The bulk reference: copying N bytes within the harness process.

use std::hint::black_box;
use std::io;

use crate::system::{Client, Kind, Launcher, MAX_PAYLOAD, System};

/// `memcpy` of the payload into a buffer allocated (and faulted in) once; no child.
pub struct Memcpy;

impl System for Memcpy {
    fn name(&self) -> &'static str {
        "memcpy"
    }

    fn kinds(&self) -> &'static [Kind] {
        &[Kind::Bulk]
    }

    fn start(&self, _: &mut Launcher) -> io::Result<Box<dyn Client>> {
        // Non-zero fill on both sides, so every page is really backed before timing.
        Ok(Box::new(MemcpyClient {
            src: vec![0xa5; MAX_PAYLOAD],
            dst: vec![0x5a; MAX_PAYLOAD],
        }))
    }

    fn serve(&self, _: &str) -> io::Result<()> {
        Err(io::Error::other("memcpy has no server"))
    }
}

struct MemcpyClient {
    src: Vec<u8>,
    dst: Vec<u8>,
}

impl Client for MemcpyClient {
    fn call(&mut self, _: Kind, len: usize) -> io::Result<()> {
        // black_box on both ends keeps the copy from being elided or hoisted.
        let src = black_box(&self.src[..len]);
        self.dst[..len].copy_from_slice(src);
        black_box(&mut self.dst);
        Ok(())
    }
}
