//! `sendmsg`/`recvmsg` with at most one fd, without allocating.
//!
//! nix's `sendmsg` allocates its control buffer and its `ScmRights` parser allocates a
//! `Vec<RawFd>` on every call; the floor must not pay for that, so the control message
//! lives in a stack buffer here and is written and parsed with libc's CMSG macros.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::{self, size_of};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

/// Control-message buffer, aligned for `cmsghdr`. 64 bytes hold one `SCM_RIGHTS`
/// header with up to 12 fds, so a peer sending a few too many is seen, not truncated.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// `CMSG_SPACE` for one fd.
fn space_for_one_fd() -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument only.
    unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) as usize }
}

/// Sends one datagram made of `iov`, with `fd` attached as `SCM_RIGHTS` if given.
/// Returns the bytes sent (all of them: SEQPACKET sends are atomic).
pub fn send(
    sock: BorrowedFd<'_>,
    iov: &[IoSlice<'_>],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    let mut cmsg = CmsgBuf([0; 64]);
    // SAFETY: msghdr is plain old data; all zeroes means no address and no control.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    // std documents IoSlice as ABI-compatible with iovec; sendmsg does not write it.
    msg.msg_iov = iov.as_ptr().cast_mut().cast();
    msg.msg_iovlen = iov.len() as _;
    if let Some(fd) = fd {
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = space_for_one_fd() as _;
        // SAFETY: msg_control points at msg_controllen zeroed, aligned bytes, so
        // CMSG_FIRSTHDR returns a header inside the buffer with room for one fd.
        unsafe {
            let hdr = libc::CMSG_FIRSTHDR(&msg);
            (*hdr).cmsg_level = libc::SOL_SOCKET;
            (*hdr).cmsg_type = libc::SCM_RIGHTS;
            (*hdr).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
            ptr::write_unaligned(libc::CMSG_DATA(hdr).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: msg points at live iovecs and control bytes for the whole call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one datagram into `iov`. Returns its length (0 at end of stream) and the
/// fd that came with it, if any. Truncated data or fds, or more than one fd, are
/// errors: a protocol that ignored them would desync.
pub fn recv(
    sock: BorrowedFd<'_>,
    iov: &mut [IoSliceMut<'_>],
) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut cmsg = CmsgBuf([0; 64]);
    // SAFETY: as in `send`.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = iov.len() as _;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.0.len() as _;
    let n = loop {
        // SAFETY: msg points at live, writable iovecs and control bytes.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let fds = take_fds(&msg);
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("control data truncated (fds lost)"));
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::other("datagram larger than the receive buffer"));
    }
    match fds {
        (first, 0) => Ok((n, first)),
        (_, extra) => Err(io::Error::other(format!(
            "{} fds, expected at most one",
            extra + 1
        ))),
    }
}

/// Takes ownership of every fd in `msg`'s control data: returns the first one and
/// how many more there were (those are closed at once).
fn take_fds(msg: &libc::msghdr) -> (Option<OwnedFd>, usize) {
    let mut first = None;
    let mut extra = 0;
    // SAFETY: recvmsg filled msg_control up to msg_controllen; the CMSG macros only
    // walk headers within that range, and each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / 4 fds that the kernel just installed for us, which
    // nothing else owns.
    unsafe {
        let mut hdr = libc::CMSG_FIRSTHDR(msg);
        while !hdr.is_null() {
            if (*hdr).cmsg_level == libc::SOL_SOCKET && (*hdr).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*hdr).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(hdr).cast::<RawFd>();
                for i in 0..bytes / size_of::<RawFd>() {
                    let fd = OwnedFd::from_raw_fd(ptr::read_unaligned(data.add(i)));
                    if first.is_none() {
                        first = Some(fd);
                    } else {
                        extra += 1;
                    }
                }
            }
            hdr = libc::CMSG_NXTHDR(msg, hdr);
        }
    }
    (first, extra)
}
