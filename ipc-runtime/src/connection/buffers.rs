//! Each thread's reusable memory for the messages it sends (both flavours encode into it) and
//! the replies it reads itself, so a call allocates nothing.

use std::cell::Cell;
use std::os::fd::BorrowedFd;

use crate::frame::Frame;

/// The largest buffer kept for reuse (per sending thread, and per connection for receiving).
/// Fresh pages cost more than copying into them (1 to 2.5 µs a page on these VMs), so bulk
/// transfers up to this size reuse memory that is already mapped.
pub(super) const RETAIN_MAX: usize = 32 << 20;

thread_local! {
    /// The frame this thread's calls receive their replies into when they read them
    /// themselves: kept by the thread, so a lone caller takes no lock to get or give back a
    /// buffer.
    static FRAME: Cell<Frame> = const { Cell::new(Frame { payload: Vec::new(), fds: Vec::new() }) };
    /// This thread's encoding buffers, reused so a call allocates nothing.
    static BUFFERS: Cell<(Vec<u8>, Vec<BorrowedFd<'static>>)> =
        const { Cell::new((Vec::new(), Vec::new())) };
}

/// This thread's receive frame, for a caller about to read its own reply.
#[inline]
pub(super) fn take_thread_frame() -> Frame {
    FRAME.take()
}

/// Keeps `frame`, emptied, as this thread's receive frame, unless it is too big to hoard.
#[inline]
pub(super) fn keep_thread_frame(mut frame: Frame) {
    frame.clear();
    if frame.payload.capacity() <= RETAIN_MAX {
        // `with` + `replace` rather than `LocalKey::set`, which goes through its
        // initialisation path every time.
        drop(FRAME.with(|f| f.replace(frame)));
    }
}

/// Runs `f` with this thread's (emptied) byte and fd buffers.
#[inline]
pub(crate) fn with_buffers<'a, R>(
    f: impl FnOnce(&mut Vec<u8>, &mut Vec<BorrowedFd<'a>>) -> R,
) -> R {
    // Taken rather than borrowed: `f` runs user `Serialize` code, which may itself call.
    let (mut buf, fds) = BUFFERS.with(Cell::take);
    let mut fds: Vec<BorrowedFd<'a>> = fds;
    buf.clear();
    let result = f(&mut buf, &mut fds);
    fds.clear();
    // An empty vector changes lifetime without a new allocation (collected in place); a
    // plain `filter` could not change the element type.
    #[allow(clippy::unnecessary_filter_map)]
    let fds: Vec<BorrowedFd<'static>> = fds.into_iter().filter_map(|_| None).collect();
    if buf.capacity() > RETAIN_MAX {
        buf = Vec::new(); // don't keep a huge message's buffer per thread
    }
    drop(BUFFERS.with(|b| b.replace((buf, fds))));
    result
}
