//! `SharedBuffer` / `SealedBuffer`: sealed memfds that travel as fds and are read in place.
//!
//! Every test takes one lock, so that the fd-leak checks can count this process's open fds
//! without another test's fds coming and going.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use ipc_runtime::shared_buffer::{SealedBuffer, SharedBuffer};
use ipc_runtime::worker::{Exit, Worker};
use ipc_runtime::{Error, Socket, codec};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::mman::{MapFlags, ProtFlags, mmap};

mod common;

use common::memfd_with;

static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn open_fds() -> usize {
    // Once the fds typed-ipc dropped on its own are closed (on its closer's threads).
    ipc_runtime::wait_for_closes();
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn filled(content: &[u8]) -> SealedBuffer {
    let mut buf = SharedBuffer::new(content.len()).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "a new buffer is zero-filled");
    buf.copy_from_slice(content);
    buf.seal().unwrap()
}

fn refusal(result: Result<SealedBuffer, Error>) -> String {
    match result {
        Ok(buf) => panic!("accepted {buf:?}"),
        Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::InvalidInput => e.to_string(),
        Err(e) => panic!("refused with the wrong error: {e:?}"),
    }
}

#[test]
fn round_trip_through_a_socket_pair() {
    let _guard = lock();
    let (a, b) = Socket::pair().unwrap();
    for len in [0, 1, 4095, 4096, 1 << 20] {
        let content = pattern(len);
        let sent = filled(&content);
        assert_eq!(sent.len(), len);
        assert_eq!(&sent[..], &content[..]);
        a.send(b"buffer", &[sent.as_fd()]).unwrap();
        drop(sent); // The receiver's copy of the fd keeps the pages alive.
        let mut frame = b.recv().unwrap();
        assert_eq!(frame.payload, b"buffer");
        let got = SealedBuffer::try_from(frame.fds.pop().unwrap()).unwrap();
        assert_eq!(got.len(), len);
        assert!(got.as_bytes() == content, "content differs at {len} bytes");
    }
}

#[test]
fn round_trip_through_the_codec() {
    let _guard = lock();
    let (a, b) = Socket::pair().unwrap();
    let content = pattern(100_000);
    let value = (
        7u32,
        SealedBuffer::copy_from(&content).unwrap(),
        "tail".to_string(),
    );
    let (mut bytes, mut fds) = (Vec::new(), Vec::new());
    codec::encode(&value, &mut bytes, &mut fds).unwrap();
    assert_eq!(fds.len(), 1, "the buffer travels as one fd");
    assert!(
        bytes.len() < 64,
        "and not as its bytes ({} bytes)",
        bytes.len()
    );
    a.send(&bytes, &fds).unwrap();
    drop(fds);
    drop(value);
    let frame = b.recv().unwrap();
    let (n, got, tail): (u32, SealedBuffer, String) =
        codec::decode(&frame.payload, frame.fds).unwrap();
    assert_eq!((n, tail.as_str()), (7, "tail"));
    assert!(got.as_bytes() == content);
}

#[test]
fn copy_from_matches_and_is_sealed() {
    let _guard = lock();
    for len in [0, 3, 70_000] {
        let content = pattern(len);
        let buf = SealedBuffer::copy_from(&content).unwrap();
        assert!(buf.as_bytes() == content);
        let seals = SealFlag::from_bits_retain(fcntl(&buf, FcntlArg::F_GET_SEALS).unwrap());
        assert!(seals.contains(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SEAL
        ));
    }
}

#[test]
fn seals_are_applied() {
    let _guard = lock();
    let buf = filled(b"sealed");
    let seals = SealFlag::from_bits_retain(fcntl(&buf, FcntlArg::F_GET_SEALS).unwrap());
    for seal in [
        SealFlag::F_SEAL_WRITE,
        SealFlag::F_SEAL_SHRINK,
        SealFlag::F_SEAL_GROW,
        SealFlag::F_SEAL_SEAL,
    ] {
        assert!(seals.contains(seal), "{seal:?} missing from {seals:?}");
    }
}

#[test]
fn the_sealed_fd_cannot_be_changed() {
    let _guard = lock();
    let buf = filled(b"immutable");
    let file = File::from(buf.as_fd().try_clone_to_owned().unwrap());
    let err = file.write_at(b"X", 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "write: {err}");
    let err = file.set_len(1).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "shrink: {err}");
    let err = file.set_len(1 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "grow: {err}");
    // SAFETY: the mapping is refused, so no memory is mapped.
    let mapped = unsafe {
        mmap(
            None,
            std::num::NonZeroUsize::new(9).unwrap(),
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            &file,
            0,
        )
    };
    assert_eq!(mapped.unwrap_err(), Errno::EPERM, "writable shared mapping");
    // No seal can be removed or added.
    assert_eq!(
        fcntl(&file, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_FUTURE_WRITE)).unwrap_err(),
        Errno::EPERM
    );
    assert_eq!(&buf[..], b"immutable");
}

#[test]
fn an_unsealed_memfd_is_refused() {
    let _guard = lock();
    let why = refusal(SealedBuffer::try_from(memfd_with(
        b"mutable",
        true,
        SealFlag::empty(),
    )));
    assert!(why.contains("F_SEAL_WRITE"), "{why}");
    assert!(why.contains("not a sealed buffer"), "{why}");
}

#[test]
fn a_partly_sealed_memfd_is_refused() {
    let _guard = lock();
    // Fixed size but still writable: the classic "seal the size only" mistake.
    let why = refusal(SealedBuffer::from_fd(memfd_with(
        b"mutable",
        true,
        SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
    )));
    assert!(why.contains("F_SEAL_WRITE"), "{why}");
    // Write-sealed but resizable: truncation would SIGBUS the reader.
    let why = refusal(SealedBuffer::from_fd(memfd_with(
        b"mutable",
        true,
        SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW,
    )));
    assert!(why.contains("F_SEAL_SHRINK"), "{why}");
    // A memfd created without MFD_ALLOW_SEALING carries only F_SEAL_SEAL.
    let why = refusal(SealedBuffer::from_fd(memfd_with(
        b"x",
        false,
        SealFlag::empty(),
    )));
    assert!(why.contains("F_SEAL_WRITE"), "{why}");
}

#[test]
fn fds_that_are_not_memfds_are_refused() {
    let _guard = lock();
    let (r, _w) = nix::unistd::pipe().unwrap();
    let why = refusal(SealedBuffer::from_fd(r));
    assert!(why.contains("not a memfd"), "{why}");
    let devnull: OwnedFd = File::open("/dev/null").unwrap().into();
    refusal(SealedBuffer::from_fd(devnull));
}

/// A memfd on hugetlbfs allocates a huge page when a page its sender never wrote is read,
/// and where none can be had (a hugetlb cgroup limit) that read is a `SIGBUS`: refused.
#[test]
fn a_hugetlb_memfd_is_refused() {
    let _guard = lock();
    let before = open_fds();
    let fd = common::hugetlb_memfd_with(
        SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW,
    );
    let why = refusal(SealedBuffer::from_fd(fd));
    assert!(why.contains("hugetlbfs"), "{why}");
    assert_eq!(open_fds(), before);
}

#[test]
fn an_unsealed_memfd_fails_decoding() {
    let _guard = lock();
    let (a, b) = Socket::pair().unwrap();
    let hostile = memfd_with(b"mutable", true, SealFlag::empty());
    let (mut bytes, mut fds) = (Vec::new(), Vec::new());
    let wrapped = ipc_runtime::codec::Fd(&hostile);
    codec::encode(&wrapped, &mut bytes, &mut fds).unwrap();
    a.send(&bytes, &fds).unwrap();
    let frame = b.recv().unwrap();
    match codec::decode::<SealedBuffer>(&frame.payload, frame.fds) {
        Err(Error::Malformed(why)) => assert!(why.contains("not a sealed buffer"), "{why}"),
        other => panic!("decoded as {other:?}"),
    }
}

#[test]
fn size_limit() {
    let _guard = lock();
    let buf = SealedBuffer::copy_from(&[1; 5000]).unwrap();
    match SealedBuffer::from_fd_with_limit(buf.into(), 4096) {
        Err(Error::TooLarge {
            size: 5000,
            limit: 4096,
            which: ipc_runtime::Limit::Given,
            by_peer: false,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let buf = SealedBuffer::copy_from(&[1; 4096]).unwrap();
    assert_eq!(
        SealedBuffer::from_fd_with_limit(buf.into(), 4096)
            .unwrap()
            .len(),
        4096
    );
}

#[test]
fn no_fd_leaks() {
    let _guard = lock();
    let (a, b) = Socket::pair().unwrap();
    let before = open_fds();
    for i in 0..200 {
        let len = (i % 5) * 3000 + 1;
        let sent = filled(&pattern(len));
        a.send(b"", &[sent.as_fd()]).unwrap();
        let got = SealedBuffer::try_from(b.recv().unwrap().fds.pop().unwrap()).unwrap();
        assert_eq!(got.len(), len);
        // Refusals close what they were given too.
        let _ = SealedBuffer::from_fd(memfd_with(b"x", true, SealFlag::empty())).unwrap_err();
        let _ = SealedBuffer::from_fd_with_limit(OwnedFd::from(got), 0).unwrap_err();
        let _ = SealedBuffer::copy_from(b"dropped at once").unwrap();
    }
    assert_eq!(open_fds(), before, "fds leaked");
}

#[test]
fn buffers_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<SharedBuffer>();
    check::<SealedBuffer>();
    let _guard = lock();
    let buf = filled(&pattern(10_000));
    let sum = std::thread::scope(|s| {
        s.spawn(|| buf.iter().map(|&b| u64::from(b)).sum::<u64>())
            .join()
            .unwrap()
    });
    assert_eq!(sum, pattern(10_000).iter().map(|&b| u64::from(b)).sum());
}

#[test]
fn fds_that_cannot_be_read_are_refused() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let _guard = lock();
    let buf = filled(b"sealed");
    let path = format!("/proc/self/fd/{}", buf.as_fd().as_raw_fd());
    // A sealed memfd reopened as O_PATH: no fcntl but F_GETFD/F_GETFL works on it.
    let o_path: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(&path)
        .unwrap()
        .into();
    refusal(SealedBuffer::from_fd(o_path));
    // Reopened write-only: sealed and a memfd, yet it cannot be mapped for reading.
    let write_only: OwnedFd = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .into();
    refusal(SealedBuffer::from_fd(write_only));
}

/// The inode behind `fd`: a clone must read the very file the original does.
fn inode(fd: impl AsFd) -> u64 {
    nix::sys::stat::fstat(fd.as_fd()).unwrap().st_ino
}

#[test]
fn a_clone_reads_the_same_sealed_memory() {
    let _guard = lock();
    for len in [0, 1, 4096, 70_000] {
        let content = pattern(len);
        let original = filled(&content);
        let clone = original.try_clone().unwrap();
        assert_eq!(clone.len(), len);
        assert!(
            clone.as_bytes() == content,
            "content differs at {len} bytes"
        );
        assert_eq!(inode(&clone), inode(&original), "the same file");
        let fd = |b: &SealedBuffer| std::os::fd::AsRawFd::as_raw_fd(&b.as_fd());
        assert_ne!(fd(&clone), fd(&original), "a file of its own");
        let seals = SealFlag::from_bits_retain(fcntl(&clone, FcntlArg::F_GET_SEALS).unwrap());
        assert!(seals.contains(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK));
        // Each owns its mapping: dropping the original leaves the clone readable.
        drop(original);
        assert!(clone.as_bytes() == content);
    }
}

#[test]
fn a_clone_is_sent_while_the_original_is_kept() {
    let _guard = lock();
    let (a, b) = Socket::pair().unwrap();
    let content = pattern(100_000);
    let frame = filled(&content);
    // Sent twice, as to a worker and to the one that replaced it: by value each time.
    for _ in 0..2 {
        let (mut bytes, mut fds) = (Vec::new(), Vec::new());
        let value = (7u32, frame.try_clone().unwrap());
        codec::encode(&value, &mut bytes, &mut fds).unwrap();
        a.send(&bytes, &fds).unwrap();
        drop(fds);
        drop(value);
        let got = b.recv().unwrap();
        let (n, got): (u32, SealedBuffer) = codec::decode(&got.payload, got.fds).unwrap();
        assert_eq!(n, 7);
        assert!(got.as_bytes() == content, "the receiver reads the frame");
    }
    assert!(frame.as_bytes() == content, "the sender kept it");
}

#[test]
fn clones_close_their_fds() {
    let _guard = lock();
    let before = open_fds();
    let original = filled(&pattern(10_000));
    let empty = SealedBuffer::copy_from(b"").unwrap();
    let clones: Vec<SealedBuffer> = (0..10)
        .flat_map(|_| [original.try_clone().unwrap(), empty.try_clone().unwrap()])
        .collect();
    assert_eq!(open_fds(), before + 2 + 20, "one fd each");
    drop(clones);
    assert_eq!(open_fds(), before + 2);
    drop((original, empty));
    assert_eq!(open_fds(), before);
}

/// Kernels before 6.7 refuse any shared mapping of a memfd sealed against writing, a
/// read-only one too (`EPERM`; fixed by Linux commits e8e17ee90eaf, 28464bbb2ddc and
/// 158978945f31), while they map it private. A child that gets those answers (from a seccomp
/// filter that refuses every read-only shared `mmap`, as such a kernel refuses these) still
/// reads a buffer this process sends it, and makes, seals, copies and clones buffers of its
/// own, which this process reads back.
#[test]
fn buffers_work_where_the_kernel_refuses_shared_mappings_of_sealed_memfds() {
    let _guard = lock();
    let child = common::child("child_on_a_kernel_refusing_shared_mappings_of_sealed_memfds");
    let (mut child, socket) = Worker::spawn_socket(child).unwrap();
    let content = pattern(100_000);
    let (mut bytes, mut fds) = (Vec::new(), Vec::new());
    let sent = filled(&content);
    codec::encode(&sent, &mut bytes, &mut fds).unwrap();
    socket.send(&bytes, &fds).unwrap();
    let frame = match socket.recv() {
        Ok(frame) => frame,
        Err(e) => panic!("{e}: the child failed ({:?}, on stderr)", child.wait()),
    };
    let (read, made, copied, cloned): (bool, SealedBuffer, SealedBuffer, SealedBuffer) =
        codec::decode(&frame.payload, frame.fds).unwrap();
    assert!(read, "the child read another content than was sent");
    assert!(made.as_bytes() == content, "the buffer the child sealed");
    assert!(copied.as_bytes() == content, "the buffer the child copied");
    assert!(cloned.as_bytes() == content, "the buffer the child cloned");
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
}

/// The child of `buffers_work_where_the_kernel_refuses_shared_mappings_of_sealed_memfds`.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_on_a_kernel_refusing_shared_mappings_of_sealed_memfds() {
    let socket = ipc_runtime::worker::socket().unwrap();
    refuse_read_only_shared_mappings();
    let frame = socket.recv().unwrap();
    let got: SealedBuffer = codec::decode(&frame.payload, frame.fds).unwrap();
    let read = got.as_bytes() == pattern(100_000);
    let mut made = SharedBuffer::new(got.len()).unwrap();
    made.copy_from_slice(&got);
    let made = made.seal().unwrap();
    let copied = SealedBuffer::copy_from(&made).unwrap();
    let cloned = got.try_clone().unwrap();
    let (mut bytes, mut fds) = (Vec::new(), Vec::new());
    let reply = (read, made, copied, cloned);
    codec::encode(&reply, &mut bytes, &mut fds).unwrap();
    socket.send(&bytes, &fds).unwrap();
}

/// Makes every later `mmap(PROT_READ, MAP_SHARED)` of this thread (and of threads it starts)
/// fail with `EPERM`.
fn refuse_read_only_shared_mappings() {
    use common::{bpf_jeq as jeq, bpf_stmt as stmt};
    // The low 32 bits of an argument (little-endian, as both architectures tested are).
    let arg = |i: usize| {
        let offset = std::mem::offset_of!(libc::seccomp_data, args) + 8 * i;
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset as u32)
    };
    let allow = stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW);
    common::install_seccomp(&mut [
        stmt(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            std::mem::offset_of!(libc::seccomp_data, nr) as u32,
        ),
        jeq(libc::SYS_mmap as u32, 0, 5),
        arg(2), // prot
        jeq(libc::PROT_READ as u32, 0, 3),
        arg(3),                                                  // flags
        stmt(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0x0f), // MAP_TYPE
        jeq(libc::MAP_SHARED as u32, 1, 0),
        allow,
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
    ]);
}

/// A sealed buffer or region view this side fails to map for a failure of its own (here
/// `fstatfs` refused, as a seccomp filter may) fails decoding as `Error::Io`, not as
/// `Malformed`: nothing was wrong with the fd the peer sent.
#[test]
fn shared_memory_this_side_cannot_map_fails_decoding_as_io() {
    let _guard = lock();
    let status = common::child("child_refusing_fstatfs_decodes_shared_memory")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{status:?}: the child's assertion failed (on stderr)"
    );
}

/// The child of `shared_memory_this_side_cannot_map_fails_decoding_as_io`.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_refusing_fstatfs_decodes_shared_memory() {
    use common::{bpf_jeq as jeq, bpf_stmt as stmt};
    use ipc_runtime::shared_region::{RegionView, SharedRegion};
    let buffer = filled(&pattern(4096));
    let region = SharedRegion::new(4096).unwrap();
    common::install_seccomp(&mut [
        stmt(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            std::mem::offset_of!(libc::seccomp_data, nr) as u32,
        ),
        jeq(libc::SYS_fstatfs as u32, 0, 1),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]);
    let (mut bytes, mut fds) = (Vec::new(), Vec::new());
    codec::encode(&buffer, &mut bytes, &mut fds).unwrap();
    let owned = vec![fds[0].try_clone_to_owned().unwrap()];
    let sealed = codec::decode::<SealedBuffer>(&bytes, owned);
    assert!(matches!(&sealed, Err(Error::Io(_))), "{sealed:?}");
    let owned = vec![region.as_fd().try_clone_to_owned().unwrap()];
    let view = codec::decode::<RegionView>(&bytes, owned);
    assert!(matches!(&view, Err(Error::Io(_))), "{view:?}");
}
