//! The syscalls of the hot path: `sendmsg` and `recvmsg` with `SCM_RIGHTS`, and `send` for a
//! message without fds.
//!
//! nix's `sendmsg` allocates its control-message buffer on the heap on every call that carries
//! fds; these wrappers use a buffer on the stack instead, so a call costs exactly one syscall
//! and no allocation. Everything else in the crate goes through nix.

use std::io::{self, IoSlice};
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::wire::FDS_PER_DATAGRAM;

/// Room for one `SCM_RIGHTS` message with the most fds the kernel accepts, aligned for
/// `cmsghdr`. `CMSG_SPACE(253 * 4)` is 1032 on 64-bit Linux.
#[repr(C, align(8))]
#[allow(dead_code)] // only ever used as uninitialised room for the kernel
struct ControlBuffer([u8; 1040]);

const _: () = {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((FDS_PER_DATAGRAM * size_of::<RawFd>()) as u32) };
    assert!(space as usize <= size_of::<ControlBuffer>());
};

/// What one `recvmsg` delivered.
pub struct Received {
    /// Bytes written into the header and payload buffers together.
    pub len: usize,
    /// The datagram did not fit the buffers (`MSG_TRUNC`); the rest of it is lost.
    pub truncated: bool,
    /// The kernel dropped some fds (`MSG_CTRUNC`), e.g. at `RLIMIT_NOFILE`.
    pub fds_dropped: bool,
}

/// Sends one datagram made of `header` then `payload`, with `fds` attached. Never blocks
/// (`MSG_DONTWAIT`) and never raises `SIGPIPE` (`MSG_NOSIGNAL`).
#[inline(always)]
pub fn send(
    sock: BorrowedFd<'_>,
    header: &[u8],
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let iov = [IoSlice::new(header), IoSlice::new(payload)];
    // Not zeroed as a whole: a call without fds never looks at it, and one with fds zeroes
    // only the bytes it sends (a 1 KiB memset per call showed up in instruction counts).
    let mut control = MaybeUninit::<ControlBuffer>::uninit();
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec; // IoSlice is ABI-compatible with iovec
    msg.msg_iovlen = if payload.is_empty() { 1 } else { 2 };
    if !fds.is_empty() {
        // Checked here, not left to the callers (who all send at most this many), since more
        // would be written past the control buffer on the stack.
        assert!(
            fds.len() <= FDS_PER_DATAGRAM,
            "too many fds for one datagram"
        );
        let data_len = (fds.len() * size_of::<RawFd>()) as u32;
        // SAFETY: CMSG_SPACE only computes a size; it fits the buffer (checked above).
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: msg_control points at an aligned buffer of at least msg_controllen bytes,
        // zeroed here, so the first header and its data (CMSG_LEN(data_len) ≤
        // msg_controllen) lie inside initialised memory.
        unsafe {
            std::ptr::write_bytes(msg.msg_control.cast::<u8>(), 0, msg.msg_controllen);
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: msg describes live buffers (iov, control) for the duration of the call.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Sends one datagram held whole in `framed` (header, then payload), with `fds` attached.
/// Without fds it is a plain `send(2)`: on these VMs that costs ~0.25 µs less than a
/// `sendmsg(2)` of the same bytes (`docs/hot-path.md`), since the kernel copies in and checks
/// no message header and no iovec. Flags as for [`send`].
#[inline(always)]
pub fn send_framed(
    sock: BorrowedFd<'_>,
    framed: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if !fds.is_empty() {
        return send(sock, framed, &[], fds);
    }
    // SAFETY: `framed` is a live buffer of `framed.len()` bytes, only read by the call.
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            framed.as_ptr().cast(),
            framed.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Receives one datagram: its first bytes into `header`, the rest into `payload`. Received fds
/// are pushed onto `fds` as `OwnedFd`s (close-on-exec) before anything else can fail.
#[inline(always)]
pub fn recv(
    sock: BorrowedFd<'_>,
    header: &mut [u8],
    payload: &mut [MaybeUninit<u8>],
    fds: &mut Vec<OwnedFd>,
    dont_wait: bool,
) -> io::Result<Received> {
    let mut iov = [
        libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        },
    ];
    // Left uninitialised: the kernel writes the control messages, and only the
    // msg_controllen bytes it reports are read back.
    let mut control = MaybeUninit::<ControlBuffer>::uninit();
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = 2;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<ControlBuffer>();
    let flags = libc::MSG_CMSG_CLOEXEC | if dont_wait { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: msg describes live, writable buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed cmsgs
    // (and set msg_controllen to that); CMSG_FIRSTHDR/NXTHDR stay within them, and every fd
    // in an SCM_RIGHTS payload is a new descriptor installed in this process that nothing
    // else owns.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        len: n as usize,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        fds_dropped: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}
