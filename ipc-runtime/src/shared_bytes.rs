//! [`SharedBytes`]: bulk bytes the sender keeps, sent with one copy; and [`CallBytes`], what a
//! stub sends for a `Vec<u8>` parameter: a `Vec` it may pipe the same way, or borrowed bytes.

use std::fmt;
use std::ops::{Bound, Deref, RangeBounds};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec::{self, Bytes};

/// Immutable bytes behind an `Arc`, which you may keep: a byte string on the wire, like a
/// `Vec<u8>` parameter, and sent with one copy instead of two when it is large and the
/// connection lends its pages to the peer.
///
/// A byte string of 1 KiB or more is copied into the connection's shared region and out of
/// it by the receiver. On a connection that lends its pages
/// ([`Connection::lend_pages_to_peer`](crate::Connection::lend_pages_to_peer) on both ends,
/// off by default and only between peers that trust each other), a call's `SharedBytes`
/// argument of 128 KiB to 1 MiB skips the first copy: the connection `vmsplice`s the
/// sender's own pages into a pipe, and the
/// receiver copies them out of it into the `Vec` it gets (at 1 MiB 2.9x the time of a
/// `memcpy` on average, against 3.8x through the region; at 512 KiB 2.4x against 2.9x; see
/// `docs/benchmarks-bulk.md`). Because the receiver reads the sender's pages, they must not
/// change until it has: the connection keeps a clone of the `Arc` until the peer says it has
/// read the bytes, and the bytes behind an `Arc<[u8]>` or `Arc<Vec<u8>>` cannot change while
/// a clone lives. A call's reply says the peer has read them, so once a call returns your
/// `Arc` is yours alone again (`Arc::get_mut` works); after a call that timed out or was
/// cancelled, not until the peer's next message says so.
///
/// On such a connection a `Vec<u8>` a call's stub is given by value takes the same path by
/// itself (the stub owns the `Vec` and wraps it, without copying, when it is large enough;
/// bytes it is lent, [`CallBytes::Borrowed`], never take it), so `SharedBytes` are for
/// bytes you keep and send again, or send part of, without giving up a `Vec` per call; and
/// for byte strings inside your own types (a `#[serde(with = "typed_ipc::bytes")]` field is
/// only borrowed while encoding, so it takes the region).
///
/// The receiver gets owned bytes: a `SharedBytes` parameter arrives as one made from the
/// `Vec<u8>` received, and a peer may declare the parameter `Vec<u8>` instead: the wire form
/// is the same. One string per message goes through the pipe; others, strings outside 128 KiB
/// to 1 MiB, oneway messages and replies (nothing would bound how long their bytes stay
/// pinned), and strings the pipe cannot take at the moment (one is still unread, this
/// process keeps 16 pipes already, or this user's pipes are at their memory limit) go the
/// way a `Vec<u8>` would.
///
/// ```
/// # extern crate ipc_runtime as typed_ipc;
/// use std::sync::Arc;
/// use typed_ipc::SharedBytes;
///
/// let frame: Arc<Vec<u8>> = Arc::new(vec![7; 1 << 20]);
/// let first_half = SharedBytes::from(Arc::clone(&frame)).slice(..512 << 10);
/// assert_eq!(first_half.len(), 512 << 10);
/// assert_eq!(first_half[0], 7);
/// ```
#[derive(Clone)]
pub struct SharedBytes {
    owner: Owner,
    start: usize,
    end: usize,
}

#[derive(Clone)]
enum Owner {
    Vec(Arc<Vec<u8>>),
    Slice(Arc<[u8]>),
}

impl Owner {
    /// Every byte owned, of which a `SharedBytes` is a range.
    fn all(&self) -> &[u8] {
        match self {
            Owner::Vec(v) => v,
            Owner::Slice(s) => s,
        }
    }
}

impl SharedBytes {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.owner.all()[self.start..self.end]
    }

    /// The bytes in `range` (relative to these), sharing the same owner.
    ///
    /// # Panics
    /// If the range is out of bounds or decreasing, as slicing a `[u8]` would.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> SharedBytes {
        let len = self.end - self.start;
        // Checked: a bound of `usize::MAX` would wrap past it (to 0 in a release build, where
        // `..=usize::MAX` would slice nothing and `(Excluded(usize::MAX), ..)` everything).
        let start = match range.start_bound() {
            Bound::Included(&i) => Some(i),
            Bound::Excluded(&i) => i.checked_add(1),
            Bound::Unbounded => Some(0),
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => i.checked_add(1),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => Some(len),
        };
        let (start, end) = match (start, end) {
            (Some(start), Some(end)) if start <= end && end <= len => (start, end),
            _ => out_of_bounds(range.start_bound(), range.end_bound(), len),
        };
        SharedBytes {
            owner: self.owner.clone(),
            start: self.start + start,
            end: self.start + end,
        }
    }

    /// The bytes as a `Vec`: without copying when these are all of a `Vec` nobody else
    /// shares.
    pub fn into_vec(self) -> Vec<u8> {
        match self.owner {
            Owner::Vec(v) if self.start == 0 && self.end == v.len() => {
                Arc::try_unwrap(v).unwrap_or_else(|v| v.to_vec())
            }
            owner => owner.all()[self.start..self.end].to_vec(),
        }
    }
}

/// The panic of [`SharedBytes::slice`] for a range outside the bytes.
#[cold]
#[track_caller]
fn out_of_bounds(start: Bound<&usize>, end: Bound<&usize>, len: usize) -> ! {
    panic!("range ({start:?}, {end:?}) out of bounds of {len} shared bytes")
}

impl From<Vec<u8>> for SharedBytes {
    fn from(v: Vec<u8>) -> Self {
        SharedBytes::from(Arc::new(v))
    }
}

impl From<Arc<Vec<u8>>> for SharedBytes {
    fn from(v: Arc<Vec<u8>>) -> Self {
        SharedBytes {
            end: v.len(),
            start: 0,
            owner: Owner::Vec(v),
        }
    }
}

impl From<Arc<[u8]>> for SharedBytes {
    fn from(s: Arc<[u8]>) -> Self {
        SharedBytes {
            end: s.len(),
            start: 0,
            owner: Owner::Slice(s),
        }
    }
}

impl Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq for SharedBytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for SharedBytes {}

impl fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBytes")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl Serialize for SharedBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        codec::serialize_shared(self, s)
    }
}

impl<'de> Deserialize<'de> for SharedBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Bytes::<Vec<u8>>::deserialize(d).map(|Bytes(v)| SharedBytes::from(v))
    }
}

/// What a generated client stub sends for a `Vec<u8>` parameter: its stubs take
/// `impl Into<CallBytes<'bytes>>`, so a caller passes either
///
/// - a `Vec<u8>`, moved in: the stub keeps its allocation afterwards for the next byte string
///   this thread receives (most often the reply), and on a connection that lends its pages a
///   `Vec` of 128 KiB to 1 MiB is piped uncopied, as [`SharedBytes`];
/// - borrowed bytes (`&[u8]`, `&Vec<u8>`, `&[u8; N]`, or a `&mut` one of these), sent from
///   where they lie: no `Vec` to build for the call, and no copy into one. The stub only reads
///   them while it encodes the message, so they are never piped (a pipe would keep reading
///   them after the call); or
/// - [`SharedBytes`], which the caller may go on sharing: sent as they are anywhere else,
///   piped uncopied on a connection that lends its pages.
///
/// Either way the server's method gets its own `Vec<u8>`: the wire form is the same. Sending
/// from a buffer you keep saves a copy of the bytes per call, which on a fast host is a
/// visible share of a 4 KiB call (`docs/hot-path.md`).
///
/// ```
/// # extern crate ipc_runtime as typed_ipc;
/// use typed_ipc::CallBytes;
///
/// let frame = vec![7u8; 4096];
/// // What a stub does with each: `client.echo(&frame[..64])`, `client.echo(frame)`.
/// assert!(matches!(CallBytes::from(&frame[..64]), CallBytes::Borrowed(b) if b.len() == 64));
/// assert!(matches!(CallBytes::from(frame), CallBytes::Plain(ref v) if v.len() == 4096));
/// ```
#[non_exhaustive]
pub enum CallBytes<'a> {
    /// A `Vec` the stub owns, sent as any byte string.
    Plain(Vec<u8>),
    /// Sent as [`SharedBytes`] (a `Vec` the connection would pipe).
    Shared(SharedBytes),
    /// The caller's bytes, sent from where they lie.
    Borrowed(&'a [u8]),
}

impl From<Vec<u8>> for CallBytes<'_> {
    #[inline]
    fn from(v: Vec<u8>) -> Self {
        if crate::connection::pipes(v.len()) {
            CallBytes::Shared(SharedBytes::from(v))
        } else {
            CallBytes::Plain(v)
        }
    }
}

impl<'a> From<&'a [u8]> for CallBytes<'a> {
    #[inline]
    fn from(bytes: &'a [u8]) -> Self {
        CallBytes::Borrowed(bytes)
    }
}

impl<'a> From<&'a Vec<u8>> for CallBytes<'a> {
    #[inline]
    fn from(bytes: &'a Vec<u8>) -> Self {
        CallBytes::Borrowed(bytes)
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for CallBytes<'a> {
    #[inline]
    fn from(bytes: &'a [u8; N]) -> Self {
        CallBytes::Borrowed(bytes)
    }
}

/// A buffer the caller writes into between calls: read only while the message is encoded.
impl<'a> From<&'a mut [u8]> for CallBytes<'a> {
    #[inline]
    fn from(bytes: &'a mut [u8]) -> Self {
        CallBytes::Borrowed(bytes)
    }
}

/// A buffer the caller writes into between calls: read only while the message is encoded.
impl<'a> From<&'a mut Vec<u8>> for CallBytes<'a> {
    #[inline]
    fn from(bytes: &'a mut Vec<u8>) -> Self {
        CallBytes::Borrowed(bytes)
    }
}

/// A buffer the caller writes into between calls: read only while the message is encoded.
impl<'a, const N: usize> From<&'a mut [u8; N]> for CallBytes<'a> {
    #[inline]
    fn from(bytes: &'a mut [u8; N]) -> Self {
        CallBytes::Borrowed(bytes)
    }
}

/// Bytes the caller keeps sharing (the same frame to several workers, say): sent as
/// [`SharedBytes`] are, piped uncopied on a connection that lends its pages.
impl From<SharedBytes> for CallBytes<'_> {
    #[inline]
    fn from(bytes: SharedBytes) -> Self {
        CallBytes::Shared(bytes)
    }
}

impl Drop for CallBytes<'_> {
    /// Sent (or given up): the allocation of a plain `Vec` is kept for the next byte string
    /// this thread receives, most often the reply.
    #[inline]
    fn drop(&mut self) {
        if let CallBytes::Plain(v) = self {
            crate::spare::keep(std::mem::take(v));
        }
    }
}

impl fmt::Debug for CallBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (how, len) = match self {
            CallBytes::Plain(v) => ("Plain", v.len()),
            CallBytes::Shared(bytes) => ("Shared", bytes.len()),
            CallBytes::Borrowed(bytes) => ("Borrowed", bytes.len()),
        };
        f.debug_struct("CallBytes")
            .field("how", &how)
            .field("len", &len)
            .finish()
    }
}

impl Serialize for CallBytes<'_> {
    #[inline]
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            CallBytes::Plain(v) => Bytes(v).serialize(s),
            CallBytes::Shared(bytes) => bytes.serialize(s),
            CallBytes::Borrowed(bytes) => Bytes(bytes).serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_share_the_owner_and_check_their_bounds() {
        let owner = Arc::new((0..=255u8).collect::<Vec<u8>>());
        let all = SharedBytes::from(Arc::clone(&owner));
        let mid = all.slice(10..20);
        assert_eq!(&*mid, &owner[10..20]);
        assert_eq!(&*mid.slice(2..=3), &owner[12..14]);
        assert_eq!(mid.slice(..).len(), 10);
        assert_eq!(
            Arc::strong_count(&owner),
            3,
            "no copies: three handles on one owner"
        );
        assert!(std::panic::catch_unwind(|| mid.slice(5..11)).is_err());
        let (start, end) = (6, 5);
        assert!(std::panic::catch_unwind(|| mid.slice(start..end)).is_err());
    }

    #[test]
    fn bounds_at_usize_max_are_out_of_bounds() {
        let bytes = SharedBytes::from(vec![1u8, 2, 3]);
        let ranges = [
            (Bound::Excluded(usize::MAX), Bound::Unbounded),
            (Bound::Included(0), Bound::Included(usize::MAX)),
            (Bound::Excluded(usize::MAX), Bound::Included(usize::MAX)),
        ];
        for range in ranges {
            let Err(panic) = std::panic::catch_unwind(|| bytes.slice(range)) else {
                panic!("{range:?} sliced 3 bytes");
            };
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or(panic.downcast_ref::<&str>().copied())
                .unwrap_or_default();
            assert!(message.contains("out of bounds"), "{range:?}: {message}");
        }
    }

    #[test]
    fn into_vec_takes_a_sole_whole_vec_without_copying() {
        let v = vec![1u8, 2, 3];
        let ptr = v.as_ptr();
        let back = SharedBytes::from(v).into_vec();
        assert_eq!(back.as_ptr(), ptr);
        let shared = Arc::new(vec![4u8, 5, 6]);
        let bytes = SharedBytes::from(Arc::clone(&shared));
        assert_eq!(bytes.clone().into_vec(), vec![4, 5, 6]);
        assert_eq!(bytes.slice(1..).into_vec(), vec![5, 6]);
        let slice: Arc<[u8]> = Arc::from(&b"xyz"[..]);
        assert_eq!(SharedBytes::from(slice).slice(1..2).into_vec(), b"y");
    }

    #[test]
    fn call_bytes_share_only_what_would_pipe() {
        assert!(matches!(CallBytes::from(vec![0; 100]), CallBytes::Plain(_)));
        assert!(matches!(
            CallBytes::from(vec![0; 300 << 10]),
            CallBytes::Shared(_)
        ));
        assert!(matches!(
            CallBytes::from(vec![0; (1 << 20) + 1]),
            CallBytes::Plain(_)
        ));
    }

    #[test]
    fn shared_call_bytes_stay_shared_at_every_size() {
        for len in [0, 100, 300 << 10, (1 << 20) + 1] {
            let bytes = SharedBytes::from(vec![2u8; len]);
            assert!(matches!(CallBytes::from(bytes), CallBytes::Shared(ref b) if b.len() == len));
        }
    }

    #[test]
    fn borrowed_call_bytes_stay_borrowed_at_every_size() {
        let mut large = vec![1u8; 300 << 10];
        let len = large.len();
        assert!(matches!(CallBytes::from(&mut large), CallBytes::Borrowed(b) if b.len() == len));
        assert!(
            matches!(CallBytes::from(&mut large[..10]), CallBytes::Borrowed(b) if b.len() == 10)
        );
        assert!(
            matches!(CallBytes::from(&large[..]), CallBytes::Borrowed(b) if b.len() == large.len())
        );
        assert!(
            matches!(CallBytes::from(&large), CallBytes::Borrowed(b) if b.len() == large.len())
        );
        assert!(matches!(
            CallBytes::from(b"abc"),
            CallBytes::Borrowed(b"abc")
        ));
        let wire = |bytes: CallBytes<'_>| {
            let (mut buf, mut fds) = (Vec::new(), Vec::new());
            codec::encode(&bytes, &mut buf, &mut fds).unwrap();
            buf
        };
        assert_eq!(
            wire(CallBytes::from(b"abc")),
            wire(CallBytes::from(b"abc".to_vec()))
        );
        assert_eq!(
            format!("{:?}", CallBytes::from(&large[..10])),
            r#"CallBytes { how: "Borrowed", len: 10 }"#
        );
    }

    #[test]
    fn on_the_wire_they_are_a_byte_string() {
        let bytes = SharedBytes::from(vec![9u8; 5000]).slice(100..200);
        let (mut buf, mut fds) = (Vec::new(), Vec::new());
        codec::encode(&bytes, &mut buf, &mut fds).unwrap();
        let (mut buf2, mut fds2) = (Vec::new(), Vec::new());
        codec::encode(&Bytes(&[9u8; 100][..]), &mut buf2, &mut fds2).unwrap();
        assert_eq!(buf, buf2);
        let back: SharedBytes = codec::decode(&buf, Vec::new()).unwrap();
        assert_eq!(back, bytes);
    }
}
