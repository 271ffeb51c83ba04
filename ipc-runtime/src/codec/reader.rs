//! The decoder's reader: bincode's slice reader, bounded in how deep a value may nest, by a
//! stack budget and by the end of the decoding thread's own stack, so that a hostile message
//! is an error and never a stack overflow.

use std::cell::Cell;

/// Stack a decode may use below [`decode_from`](super::decode_from)'s frame before it is
/// refused. A value nests as deep as its bytes say (a recursive type, `enum Tree { Leaf,
/// Node(Box<Tree>) }`, is 4 bytes a level), and serde decodes a level in a frame of its own, so
/// without a bound a short hostile message overflows the stack and aborts the process. 256 KiB
/// leaves the rest of a 2 MiB thread stack (std's and tokio's default) to the caller, and is
/// thousands of levels in a release build (several hundred in a debug build).
const STACK_BUDGET: usize = 256 << 10;

/// The address of a local of the caller's frame: how far down the stack it runs. (A local's
/// address, not `black_box`: that forced a store on every read, +14 instructions a decode.)
#[inline(always)]
fn stack_address() -> usize {
    let here = 0u8;
    &here as *const u8 as usize
}

/// bincode's slice reader, which also refuses a read made deeper than [`STACK_BUDGET`] below
/// `base`: every level of a value that nests as its bytes say reads its tag or length through
/// [`Read::read_exact`](std::io::Read::read_exact), so checking there bounds the depth.
pub(super) struct Reader<'r, 'de> {
    rest: &'r mut &'de [u8],
    base: usize,
}

impl<'r, 'de> Reader<'r, 'de> {
    /// Reads `rest`, bounding depth from the caller's frame.
    #[inline(always)]
    pub(super) fn new(rest: &'r mut &'de [u8]) -> Self {
        Reader {
            rest,
            base: stack_address(),
        }
    }

    #[inline(always)]
    fn take(&mut self, len: usize) -> std::io::Result<&'de [u8]> {
        if len > self.rest.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let (taken, left) = self.rest.split_at(len);
        *self.rest = left;
        Ok(taken)
    }
}

impl std::io::Read for Reader<'_, '_> {
    #[inline(always)]
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.read_exact(out).map(|()| out.len())
    }

    #[inline(always)]
    fn read_exact(&mut self, out: &mut [u8]) -> std::io::Result<()> {
        // The stack grows down; within `decode_from`'s own frame a local may lie a little
        // above `base`, which the signed difference takes for no depth at all.
        let depth = self.base.wrapping_sub(stack_address()) as isize;
        if depth > STACK_CHECKED_FROM as isize && past_the_stack(depth) {
            return Err(too_deep());
        }
        out.copy_from_slice(self.take(out.len())?);
        Ok(())
    }
}

/// How deep below `decode_from`'s frame a read starts to check the stack it runs on
/// ([`past_the_stack`]): values shallower than this (nearly all) make no check but one
/// comparison, and a thread with less free than this and [`STACK_MARGIN`] is out of stack
/// anyway.
const STACK_CHECKED_FROM: usize = 8 << 10;

/// Stack left free below the deepest read: for the level that read decodes, and the error's
/// path back.
const STACK_MARGIN: usize = 16 << 10;

/// Whether a read `depth` bytes below `decode_from`'s frame goes too deep: past
/// [`STACK_BUDGET`], or nearer the end of this thread's stack than [`STACK_MARGIN`] (a thread
/// started with less stack than the budget: a call's answer is decoded on the calling thread,
/// whatever its stack).
#[cold]
#[inline(never)]
fn past_the_stack(depth: isize) -> bool {
    depth > STACK_BUDGET as isize || stack_address() < stack_floor()
}

thread_local! {
    /// This thread's [`stack_floor`]: `usize::MAX` until looked up.
    static STACK_FLOOR: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The lowest address this thread's decodes may use: the end of its stack and
/// [`STACK_MARGIN`], looked up once per thread (by the first value that nests past
/// [`STACK_CHECKED_FROM`]); 0 where it is not known. The main thread's is not looked up: its
/// stack grows to `RLIMIT_STACK` (8 MiB by default), and glibc finds its end by reading
/// `/proc/self/maps`, a call a sandboxed worker's filter may kill it for.
fn stack_floor() -> usize {
    STACK_FLOOR.with(|floor| {
        if floor.get() == usize::MAX {
            floor.set(look_up_stack_floor());
        }
        floor.get()
    })
}

#[cold]
fn look_up_stack_floor() -> usize {
    // SAFETY: getpid and gettid take no arguments and cannot fail.
    if unsafe { libc::getpid() == libc::gettid() } {
        return 0;
    }
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: on success pthread_getattr_np initialises `attr` with this thread's attributes
    // (glibc asks `sched_getaffinity` for them too).
    if unsafe { libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) } != 0 {
        return 0;
    }
    let (mut low, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: `attr` was initialised above; pthread_attr_getstack only writes the two
    // outputs, and pthread_attr_destroy frees what pthread_getattr_np allocated, once.
    let got = unsafe {
        let got = libc::pthread_attr_getstack(attr.as_ptr(), &mut low, &mut size);
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        got
    };
    match got {
        0 => (low as usize).saturating_add(STACK_MARGIN),
        _ => 0,
    }
}

#[cold]
#[inline(never)]
fn too_deep() -> std::io::Error {
    std::io::Error::other(format!(
        "the value nests deeper than a decode may ({} KiB of stack, less on a thread with \
         less free)",
        STACK_BUDGET >> 10
    ))
}

impl<'de> bincode::BincodeRead<'de> for Reader<'_, 'de> {
    #[inline(always)]
    fn forward_read_str<V: serde::de::Visitor<'de>>(
        &mut self,
        len: usize,
        visitor: V,
    ) -> bincode::Result<V::Value> {
        match std::str::from_utf8(self.take(len)?) {
            Ok(s) => visitor.visit_borrowed_str(s),
            Err(e) => Err(Box::new(bincode::ErrorKind::InvalidUtf8Encoding(e))),
        }
    }

    #[inline(always)]
    fn get_byte_buffer(&mut self, len: usize) -> bincode::Result<Vec<u8>> {
        Ok(self.take(len)?.to_vec())
    }

    #[inline(always)]
    fn forward_read_bytes<V: serde::de::Visitor<'de>>(
        &mut self,
        len: usize,
        visitor: V,
    ) -> bincode::Result<V::Value> {
        visitor.visit_borrowed_bytes(self.take(len)?)
    }
}
