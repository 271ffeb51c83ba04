//! `SharedRegion` / `RegionView`: a memfd the creator writes again and again and the peer reads
//! in place, safe against a hostile creator and unwritable by the peer.
//!
//! Every test takes one lock, so that the fd-leak check can count this process's open fds
//! without another test's fds coming and going.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError};

use ipc_runtime::shared_region::{RegionView, SharedRegion};
use ipc_runtime::{Error, Socket, codec};
use nix::errno::Errno;
use nix::fcntl::{OFlag, SealFlag, open};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, mprotect, munmap};
use nix::sys::stat::Mode;

mod common;

static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn open_fds() -> usize {
    // Once the fds typed-ipc dropped on its own are closed (on its closer's threads).
    ipc_runtime::wait_for_closes();
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A memfd of `len` bytes with `seals` added, as a hostile creator could make one.
fn memfd_with(len: usize, seals: SealFlag) -> OwnedFd {
    common::memfd_with(&vec![1; len], true, seals)
}

/// Tries to map `fd` writable and shared, which a region's seals refuse: why it failed.
fn map_writable(fd: BorrowedFd<'_>) -> Errno {
    // SAFETY: a new mapping at a kernel-chosen address; it is refused anyway.
    let writable = unsafe {
        mmap(
            None,
            4096.try_into().unwrap(),
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd,
            0,
        )
    };
    writable.expect_err("a writable mapping of a sealed region")
}

fn refusal(result: Result<RegionView, Error>) -> String {
    match result {
        Ok(view) => panic!("accepted {view:?}"),
        Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::InvalidInput => e.to_string(),
        Err(e) => panic!("refused with the wrong error: {e:?}"),
    }
}

#[test]
fn the_creator_writes_again_and_the_peer_sees_it_in_place() {
    let _guard = lock();
    let (a, b) = Socket::pair().unwrap();
    let mut region = SharedRegion::new(1 << 20).unwrap();
    assert!(
        region.iter().all(|&x| x == 0),
        "a new region is zero-filled"
    );
    a.send(b"region", &[region.as_fd()]).unwrap();
    let mut frame = b.recv().unwrap();
    let view = RegionView::try_from(frame.fds.pop().unwrap()).unwrap();
    assert_eq!(view.len(), 1 << 20);
    // The same pages, reused: every round's writes show through the peer's mapping.
    for round in 1..=3u8 {
        region.fill(round);
        region[100..108].copy_from_slice(&u64::from(round).to_ne_bytes());
        assert_eq!(
            view.words()[0].load(Ordering::Relaxed),
            u64::from_ne_bytes([round; 8])
        );
        assert_eq!(
            view.words()[20].load(Ordering::Relaxed),
            u64::from_ne_bytes([round; 8])
        );
        assert_eq!(view.to_vec(100, 8).unwrap(), u64::from(round).to_ne_bytes());
        let all = view.to_vec(0, view.len()).unwrap();
        assert_eq!(all.len(), 1 << 20);
        assert!(all[..100].iter().chain(&all[108..]).all(|&x| x == round));
    }
}

#[test]
fn travels_through_the_codec() {
    let _guard = lock();
    let region = SharedRegion::new(8192).unwrap();
    let view = region.view().unwrap();
    let (mut bytes, mut fds) = (Vec::new(), Vec::new());
    let value = (7u32, &view);
    codec::encode(&value, &mut bytes, &mut fds).unwrap();
    assert_eq!(fds.len(), 1);
    let owned: Vec<OwnedFd> = fds
        .iter()
        .map(|fd| fd.try_clone_to_owned().unwrap())
        .collect();
    let (n, got): (u32, RegionView) = codec::decode(&bytes, owned).unwrap();
    assert_eq!((n, got.len()), (7, 8192));
}

#[test]
fn the_peer_cannot_write_the_region() {
    let _guard = lock();
    let region = SharedRegion::new(4096).unwrap();
    let view = region.view().unwrap();
    let fd = view.as_fd();
    assert_eq!(
        nix::unistd::write(fd, b"x").unwrap_err(),
        Errno::EPERM,
        "write(2)"
    );
    let file = File::from(fd.try_clone_to_owned().unwrap());
    assert!(file.write_at(b"x", 0).is_err(), "pwrite(2)");
    assert!(
        file.set_len(0).is_err() && file.set_len(1 << 20).is_err(),
        "resize"
    );
    assert_eq!(map_writable(fd), Errno::EPERM, "a writable mapping");
    // A read-only mapping cannot be made writable later.
    // SAFETY: a new read-only mapping at a kernel-chosen address, unmapped below.
    let ro = unsafe {
        mmap(
            None,
            4096.try_into().unwrap(),
            ProtFlags::PROT_READ,
            MapFlags::MAP_SHARED,
            fd,
            0,
        )
    }
    .unwrap();
    // SAFETY: `ro` is the mapping just made; mprotect is refused.
    let upgraded = unsafe { mprotect(ro, 4096, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE) };
    assert!(upgraded.is_err(), "mprotect to writable");
    // SAFETY: our own mapping, never borrowed.
    unsafe { munmap(ro, 4096).unwrap() };
    // Reopening the memfd read-write through /proc gets a new file, with the same seals.
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let reopened = open(
        path.as_str(),
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .unwrap();
    assert_eq!(
        nix::unistd::write(&reopened, b"x").unwrap_err(),
        Errno::EPERM
    );
    assert!(region.iter().all(|&x| x == 0), "nothing got through");
}

#[test]
fn fds_that_are_not_regions_are_refused() {
    let _guard = lock();
    let unsealed = refusal(RegionView::from_fd(memfd_with(4096, SealFlag::empty())));
    assert!(unsealed.contains("not a shared region"), "{unsealed}");
    assert!(unsealed.contains("F_SEAL_SHRINK"), "{unsealed}");
    // Size-sealed but writable by anyone (the peer could write what we read... and so could
    // we, which the creator did not agree to).
    let writable = refusal(RegionView::from_fd(memfd_with(
        4096,
        SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW,
    )));
    assert!(writable.contains("F_SEAL_FUTURE_WRITE"), "{writable}");
    // Write-sealed but resizable: a truncation would SIGBUS the reader.
    let resizable = refusal(RegionView::from_fd(memfd_with(
        4096,
        SealFlag::F_SEAL_FUTURE_WRITE,
    )));
    assert!(resizable.contains("F_SEAL_SHRINK"), "{resizable}");
    let (pipe, _w) = nix::unistd::pipe().unwrap();
    assert!(refusal(RegionView::from_fd(pipe)).contains("not a memfd"));
    // A fully write-sealed memfd is a region whose creator gave up writing: accepted.
    let frozen = memfd_with(
        4096,
        SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW,
    );
    assert_eq!(
        RegionView::from_fd(frozen).unwrap().to_vec(0, 3).unwrap(),
        [1, 1, 1]
    );
}

/// A region on hugetlbfs: see `shared_buffer.rs`'s `a_hugetlb_memfd_is_refused`.
#[test]
fn a_hugetlb_memfd_is_refused() {
    let _guard = lock();
    let before = open_fds();
    let fd = common::hugetlb_memfd_with(
        SealFlag::F_SEAL_FUTURE_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW,
    );
    let why = refusal(RegionView::from_fd(fd));
    assert!(why.contains("hugetlbfs"), "{why}");
    assert_eq!(open_fds(), before);
}

#[test]
fn a_refused_fd_fails_decoding() {
    let _guard = lock();
    let fd = memfd_with(4096, SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW);
    let (mut bytes, mut fds) = (Vec::new(), Vec::new());
    let value = codec::Fd(&fd);
    codec::encode(&value, &mut bytes, &mut fds).unwrap();
    drop(fds);
    match codec::decode::<RegionView>(&bytes, vec![fd]) {
        Err(Error::Malformed(why)) => assert!(why.contains("not a shared region"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn size_limit() {
    let _guard = lock();
    let region = SharedRegion::new(3 * 4096).unwrap();
    let fd = region.as_fd().try_clone_to_owned().unwrap();
    assert!(matches!(
        RegionView::from_fd_with_limit(fd, 2 * 4096),
        Err(Error::TooLarge {
            size: 12288,
            limit: 8192,
            which: ipc_runtime::Limit::Given,
            by_peer: false,
            ..
        })
    ));
}

#[test]
fn no_fd_leaks() {
    let _guard = lock();
    let before = open_fds();
    for _ in 0..50 {
        let mut region = SharedRegion::new(64 << 10).unwrap();
        let view = region.view().unwrap();
        region[0] = 9;
        assert_eq!(view.to_vec(0, 1).unwrap(), [9]);
        let _ = RegionView::from_fd(memfd_with(10, SealFlag::empty()));
    }
    assert_eq!(open_fds(), before);
}

#[test]
fn regions_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<SharedRegion>();
    check::<RegionView>();
}

#[test]
fn a_cloned_view_reads_the_same_region_and_cannot_write_it() {
    let _guard = lock();
    let mut region = SharedRegion::new(8192).unwrap();
    let view = region.view().unwrap();
    let clone = view.try_clone().unwrap();
    assert_eq!(clone.len(), 8192);
    assert_ne!(clone.as_fd().as_raw_fd(), view.as_fd().as_raw_fd());
    drop(view);
    // The same pages: the creator's later writes show through the clone.
    region[8000..8005].copy_from_slice(b"later");
    assert_eq!(clone.to_vec(8000, 5).unwrap(), b"later");
    // As sealed as the view it came from.
    let fd = clone.as_fd();
    assert_eq!(nix::unistd::write(fd, b"x").unwrap_err(), Errno::EPERM);
    assert_eq!(map_writable(fd), Errno::EPERM, "a writable mapping");
}

#[test]
fn a_cloned_view_is_sent_while_the_original_is_kept() {
    let _guard = lock();
    let (a, b) = Socket::pair().unwrap();
    let mut region = SharedRegion::new(4096).unwrap();
    region[..5].copy_from_slice(b"hello");
    let view = region.view().unwrap();
    let (mut bytes, mut fds) = (Vec::new(), Vec::new());
    let value = view.try_clone().unwrap();
    codec::encode(&value, &mut bytes, &mut fds).unwrap();
    a.send(&bytes, &fds).unwrap();
    drop(fds);
    drop(value);
    let got = b.recv().unwrap();
    let got: RegionView = codec::decode(&got.payload, got.fds).unwrap();
    assert_eq!(got.to_vec(0, 5).unwrap(), b"hello");
    assert_eq!(
        view.to_vec(0, 5).unwrap(),
        b"hello",
        "the sender kept its view"
    );
}

#[test]
fn cloned_views_close_their_fds() {
    let _guard = lock();
    let before = open_fds();
    let region = SharedRegion::new(4096).unwrap();
    let view = region.view().unwrap();
    let clones: Vec<RegionView> = (0..10).map(|_| view.try_clone().unwrap()).collect();
    assert_eq!(open_fds(), before + 2 + 10, "one fd each");
    drop(clones);
    drop((view, region));
    assert_eq!(open_fds(), before);
}
