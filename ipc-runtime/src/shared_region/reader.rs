//! [`RegionReader`]: a stretch of a peer's region read through `std::io`, so that ordinary
//! slice code (a parser, a hash, an image decoder taking `impl BufRead`) can run on it.
//!
//! A region cannot be lent as `&[u8]`: its creator may write it at any moment. The reader
//! copies it, a window at a time, into a small buffer of its own, and hands out that buffer.
//! The window is small enough to stay in the CPU's first-level cache, so each byte still
//! travels from memory once, as it does when read in place; what the copy adds is a store
//! and a load in cache. It is for code that wants slices, not for speed: measured with
//! `cargo run -p ipc-bench --release --bin copies -- --reads` (2026-12-06, Xeon host),
//! summing the windows took about what summing [`RegionView::words`] took, 1.7–1.8x a
//! slice's time from 64 KiB to 1 MiB, and at 16 MiB 0.97–1.15x `words()`'s time from one
//! run to the next.

use std::io::{self, BufRead, Read, Seek, SeekFrom};

use super::RegionView;
use crate::bulk_copy::copy_racy;

/// Reads bytes `start..end` of a [`RegionView`] as a file is read ([`Read`], [`BufRead`],
/// [`Seek`]), copying them out of the region a window of at most [`RegionReader::WINDOW`]
/// bytes at a time. Made by [`RegionView::reader`].
///
/// What it hands out is its own copy: a slice from [`BufRead::fill_buf`] holds still while
/// you read it, whatever the creator writes meanwhile, so it can be checked and then
/// trusted (the next window may show newer bytes). Reads of [`RegionReader::WINDOW`] bytes
/// or more with nothing buffered go straight into the caller's buffer.
pub struct RegionReader<'a> {
    view: &'a RegionView,
    /// The stretch read, as offsets into the region.
    start: usize,
    end: usize,
    /// The region offset of the first byte not yet copied into `window`: at most `end`.
    next: usize,
    /// How far past the end a seek put the position (`next` is then `end`): positions run
    /// to `u64::MAX`, past what a region offset can say.
    past: u64,
    window: Box<[u8]>,
    /// `window[taken..filled]` holds the bytes copied but not yet consumed.
    taken: usize,
    filled: usize,
}

impl<'a> RegionReader<'a> {
    /// The most bytes one [`BufRead::fill_buf`] returns: 4 KiB, a size the first-level cache
    /// holds beside what the caller works on. Each window starts where the previous one
    /// ended, and all but the last of a stretch are this long, so a stretch that starts on a
    /// multiple of 8 comes in windows of whole 64-bit words.
    pub const WINDOW: usize = 4096;

    pub(super) fn new(view: &'a RegionView, start: usize, end: usize) -> RegionReader<'a> {
        RegionReader {
            view,
            start,
            end,
            next: start,
            past: 0,
            window: vec![0; RegionReader::WINDOW].into_boxed_slice(),
            taken: 0,
            filled: 0,
        }
    }

    /// How many bytes of the stretch are left to read.
    pub fn remaining(&self) -> usize {
        self.end - self.next + (self.filled - self.taken)
    }

    /// The position in the stretch: where the next byte read comes from.
    fn position(&self) -> u64 {
        (self.next - self.start - (self.filled - self.taken)) as u64 + self.past
    }
}

/// Copies `dst.len()` bytes at region offset `at` of `view`. The caller keeps
/// `at..at + dst.len()` within its reader's stretch, and so within the region.
fn copy_out(view: &RegionView, at: usize, dst: &mut [u8]) {
    debug_assert!(
        at.checked_add(dst.len())
            .is_some_and(|end| end <= view.len())
    );
    // SAFETY: `at..at + dst.len()` lies within the reader's stretch, which
    // `RegionView::reader` checked lies inside the mapping; the view, borrowed for as long as
    // the reader lives, keeps it mapped and backed (its size is sealed). `dst` is the
    // reader's window or the caller's buffer, writable and not the region.
    unsafe { copy_racy(view.map.ptr().add(at), dst.as_mut_ptr(), dst.len()) };
}

impl Read for RegionReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.taken == self.filled && buf.len() >= RegionReader::WINDOW {
            let n = buf.len().min(self.end - self.next);
            if n == 0 {
                return Ok(0);
            }
            copy_out(self.view, self.next, &mut buf[..n]);
            self.next += n;
            return Ok(n);
        }
        let window = self.fill_buf()?;
        let n = window.len().min(buf.len());
        buf[..n].copy_from_slice(&window[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for RegionReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.taken == self.filled && self.next < self.end {
            let n = (self.end - self.next).min(RegionReader::WINDOW);
            copy_out(self.view, self.next, &mut self.window[..n]);
            self.next += n;
            (self.taken, self.filled) = (0, n);
        }
        Ok(&self.window[self.taken..self.filled])
    }

    fn consume(&mut self, amt: usize) {
        self.taken = self.taken.saturating_add(amt).min(self.filled);
    }
}

/// Positions count from the start of the stretch, not of the region. As for a file, a
/// position past the end is allowed (reads there return 0 bytes) and one before the start
/// is an `InvalidInput` error that leaves the position where it was.
impl Seek for RegionReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let len = (self.end - self.start) as u64;
        let to = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.position().checked_add_signed(d),
            SeekFrom::End(d) => len.checked_add_signed(d),
        };
        let to = to.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a region reader cannot seek before the start of its stretch, nor past u64::MAX",
            )
        })?;
        // Past the end, nothing is copied: `next` stays at `end`, and `past` says how far.
        (self.next, self.past) = match to.checked_sub(len) {
            Some(past) if past > 0 => (self.end, past),
            // `to` is at most `len` here, so `start + to` is at most `end`.
            _ => (self.start + to as usize, 0),
        };
        (self.taken, self.filled) = (0, 0);
        Ok(to)
    }

    fn stream_position(&mut self) -> io::Result<u64> {
        Ok(self.position())
    }
}

impl std::fmt::Debug for RegionReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionReader")
            .field("start", &self.start)
            .field("end", &self.end)
            .field("remaining", &self.remaining())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, ErrorKind, Read, Seek, SeekFrom};

    use super::RegionReader;
    use crate::Error;
    use crate::shared_region::SharedRegion;

    const WINDOW: usize = RegionReader::WINDOW;

    /// A region of three pages whose byte `i` is `i * 7 + i / 256` (no two pages alike).
    fn patterned() -> SharedRegion {
        let mut region = SharedRegion::new(3 * 4096).unwrap();
        for (i, b) in region.iter_mut().enumerate() {
            *b = (i * 7 + i / 256) as u8;
        }
        region
    }

    #[test]
    fn hands_out_the_stretch_in_windows_that_follow_each_other() {
        let region = patterned();
        let view = region.view().unwrap();
        let mut reader = view.reader(5, 10_000).unwrap();
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let window = reader.fill_buf().unwrap();
            if window.is_empty() {
                break;
            }
            got.extend_from_slice(window);
            sizes.push(window.len());
            let n = window.len();
            reader.consume(n);
            assert_eq!(reader.remaining(), 10_000 - got.len());
        }
        assert_eq!(got, region[5..10_005]);
        assert_eq!(sizes, [WINDOW, WINDOW, 10_000 - 2 * WINDOW]);
        assert_eq!(
            reader.read(&mut [0; 8]).unwrap(),
            0,
            "the end reads nothing"
        );
    }

    /// Reads of every size, mixed: what a small read left in the window comes first, then a
    /// large read goes straight to the caller's buffer; every byte arrives once, in order.
    #[test]
    fn reads_of_any_size_see_every_byte_once() {
        let region = patterned();
        let view = region.view().unwrap();
        for sizes in [
            &[1, 7, WINDOW, 3 * WINDOW][..],
            &[10, 2 * WINDOW, 1][..],
            &[WINDOW - 1, WINDOW + 1, 5000][..],
            &[3 * WINDOW][..],
        ] {
            let mut reader = view.reader(3, 3 * 4096 - 3).unwrap();
            let mut got = Vec::new();
            for &size in sizes.iter().cycle() {
                let mut buf = vec![0; size];
                let n = reader.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, region[3..], "{sizes:?}");
        }
        let mut all = Vec::new();
        view.reader(0, 3 * 4096)
            .unwrap()
            .read_to_end(&mut all)
            .unwrap();
        assert_eq!(all, region[..]);
    }

    /// A window is the reader's copy: it holds still while the creator writes the region, and
    /// the next window shows what was written.
    #[test]
    fn a_window_holds_still_while_the_creator_writes() {
        let mut region = SharedRegion::new(2 * WINDOW).unwrap();
        region.fill(1);
        let view = region.view().unwrap();
        let mut reader = view.reader(0, 2 * WINDOW).unwrap();
        let window = reader.fill_buf().unwrap();
        region.fill(2);
        assert!(window.iter().all(|&b| b == 1));
        reader.consume(WINDOW);
        assert!(reader.fill_buf().unwrap().iter().all(|&b| b == 2));
    }

    /// Positions count from the start of the stretch, as a file's do from its start.
    #[test]
    fn seeks_as_a_file_does() {
        let region = patterned();
        let view = region.view().unwrap();
        let (start, len) = (100, 9_000);
        let stretch = &region[start..start + len];
        let mut reader = view.reader(start, len).unwrap();
        let mut byte = [0];

        reader.read_exact(&mut byte).unwrap();
        assert_eq!(reader.stream_position().unwrap(), 1, "a window is buffered");
        assert_eq!(reader.seek(SeekFrom::Current(1)).unwrap(), 2);
        reader.read_exact(&mut byte).unwrap();
        assert_eq!(byte[0], stretch[2]);

        assert_eq!(reader.seek(SeekFrom::Start(5_000)).unwrap(), 5_000);
        reader.read_exact(&mut byte).unwrap();
        assert_eq!(byte[0], stretch[5_000]);
        assert_eq!(reader.seek(SeekFrom::Current(-4_001)).unwrap(), 1_000);
        reader.read_exact(&mut byte).unwrap();
        assert_eq!(byte[0], stretch[1_000]);

        assert_eq!(reader.seek(SeekFrom::End(-10)).unwrap(), len as u64 - 10);
        let mut tail = Vec::new();
        reader.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, stretch[len - 10..]);

        // Past the end: allowed, and nothing to read there.
        assert_eq!(reader.seek(SeekFrom::End(5)).unwrap(), len as u64 + 5);
        assert_eq!(reader.stream_position().unwrap(), len as u64 + 5);
        assert_eq!(reader.read(&mut [0; 2 * WINDOW]).unwrap(), 0);
        assert_eq!(reader.fill_buf().unwrap(), b"");
        assert_eq!(reader.remaining(), 0);

        // Before the start: refused, and the position stays.
        reader.seek(SeekFrom::Start(7)).unwrap();
        let err = reader.seek(SeekFrom::Current(-8)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert_eq!(reader.stream_position().unwrap(), 7);
        reader.read_exact(&mut byte).unwrap();
        assert_eq!(byte[0], stretch[7]);
    }

    /// A position past the end, however far, is the position a seek returned, whatever the
    /// stretch's offset in the region; and a consume however large stays in the window.
    #[test]
    fn far_positions_and_large_consumes_keep_to_the_contract() {
        let region = patterned();
        let view = region.view().unwrap();
        let mut reader = view.reader(100, 1_000).unwrap();
        for far in [usize::MAX as u64 - 99, u64::MAX - 50, u64::MAX] {
            assert_eq!(reader.seek(SeekFrom::Start(far)).unwrap(), far);
            assert_eq!(reader.stream_position().unwrap(), far);
            assert_eq!(reader.seek(SeekFrom::Current(-1)).unwrap(), far - 1);
            assert_eq!(reader.seek(SeekFrom::Current(1)).unwrap(), far);
            assert_eq!(reader.read(&mut [0; 8]).unwrap(), 0);
            assert_eq!(reader.remaining(), 0);
        }
        assert_eq!(reader.seek(SeekFrom::Current(-1)).unwrap(), u64::MAX - 1);
        assert!(reader.seek(SeekFrom::Current(2)).is_err());
        assert!(reader.seek(SeekFrom::End(i64::MIN)).is_err());
        assert_eq!(
            reader.seek(SeekFrom::End(i64::MAX)).unwrap(),
            1_000 + i64::MAX as u64
        );
        assert_eq!(reader.stream_position().unwrap(), 1_000 + i64::MAX as u64);

        reader.rewind().unwrap();
        assert_eq!(reader.fill_buf().unwrap().len(), 1_000);
        reader.consume(1);
        reader.consume(usize::MAX);
        assert_eq!(reader.fill_buf().unwrap(), b"");
        assert_eq!(reader.stream_position().unwrap(), 1_000);
    }

    #[test]
    fn a_stretch_outside_the_region_is_refused() {
        let view = SharedRegion::new(4096).unwrap().view().unwrap();
        assert!(matches!(view.reader(4090, 7), Err(Error::Malformed(_))));
        assert!(matches!(
            view.reader(usize::MAX, 2),
            Err(Error::Malformed(_))
        ));
        let mut empty = view.reader(4096, 0).unwrap();
        assert_eq!(empty.fill_buf().unwrap(), b"");
        assert_eq!(empty.read(&mut [0; 3]).unwrap(), 0);
    }
}
