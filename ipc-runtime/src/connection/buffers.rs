//! Each thread's reusable memory for the messages it sends (both flavours encode into it) and
//! the replies it reads itself, so a call allocates nothing.

use std::cell::RefCell;
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
    static FRAME: RefCell<Frame> =
        const { RefCell::new(Frame { payload: Vec::new(), fds: Vec::new() }) };
    /// This thread's encoding buffers, reused so a call allocates nothing.
    static BUFFERS: RefCell<(Vec<u8>, Vec<BorrowedFd<'static>>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's receive frame, for a caller reading its own reply, and
/// empties it afterwards (closing any fds left in it).
#[inline]
pub(super) fn with_thread_frame<R>(f: impl FnOnce(&mut Frame) -> R) -> R {
    // `f` decodes the reply, which runs user `Deserialize` code that may itself call: that
    // inner call gets a fresh frame.
    borrowed_or_fresh(&FRAME, |frame| {
        let result = f(frame);
        frame.clear();
        if frame.payload.capacity() > RETAIN_MAX {
            *frame = Frame::default(); // don't keep a huge reply's buffer per thread
        }
        result
    })
}

/// Runs `f` with this thread's (emptied) byte and fd buffers.
#[inline]
pub(crate) fn with_buffers<'a, R>(
    f: impl FnOnce(&mut Vec<u8>, &mut Vec<BorrowedFd<'a>>) -> R,
) -> R {
    // `f` runs user `Serialize` code, which may itself call: that inner message gets fresh
    // buffers.
    borrowed_or_fresh(&BUFFERS, |(buf, fds)| {
        buf.clear();
        let mut scoped = emptied(std::mem::take(fds));
        let result = f(buf, &mut scoped);
        *fds = emptied(scoped);
        if buf.capacity() > RETAIN_MAX {
            *buf = Vec::new(); // don't keep a huge message's buffer per thread
        }
        result
    })
}

/// `fds` emptied, in the same allocation, with another lifetime: an empty vector changes
/// lifetime without a new allocation (collected in place); a plain `filter` could not change
/// the element type.
#[inline]
#[allow(clippy::unnecessary_filter_map)]
fn emptied<'b>(mut fds: Vec<BorrowedFd<'_>>) -> Vec<BorrowedFd<'b>> {
    fds.clear();
    fds.into_iter().filter_map(|_| None).collect()
}

/// Runs `f` with `cell`'s value of this thread, borrowed in place rather than moved out and
/// back; with a fresh value if it is borrowed already (a call made by user code while the
/// thread's own is in use). The fresh value is only built on that path.
#[inline]
fn borrowed_or_fresh<T: Default + 'static, R>(
    cell: &'static std::thread::LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    cell.with(|cell| {
        let (mut borrowed, mut fresh) = (cell.try_borrow_mut().ok(), None);
        let value = match &mut borrowed {
            Some(value) => &mut **value,
            None => fresh.insert(T::default()),
        };
        f(value)
    })
}
