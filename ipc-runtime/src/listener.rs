//! [`Listener`]: accepts connections on a filesystem path or a Linux abstract name.

use std::fs;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{self as ns, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

use crate::error::Result;
use crate::socket::{Socket, abstract_name};

/// A listening `SOCK_SEQPACKET` socket.
///
/// Binding to a path that holds a *stale* socket file (one nobody listens on any more, left by
/// a process that died) replaces it; a path where a live listener answers fails with
/// `AddrInUse`, and a path holding anything but a socket is never touched. The listener
/// removes its socket file when dropped, unless another listener has replaced it since, or
/// the drop is in a child forked after the bind (the parent still listens on it).
///
/// Telling stale from live means trying to connect, so a live listener that a second
/// `bind` probed sees one connection that hangs up at once. The probe, the removal and the
/// bind are separate steps: two processes replacing the same stale file at the same moment
/// can both succeed, the first left listening on a file the second removed. Start one
/// instance at a time (or hold a lock file of your own) where that matters.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    /// The file we created, by path and (device, inode), so drop removes only our own.
    path: Option<(PathBuf, (u64, u64))>,
    /// The process that bound it: a copy in a forked child (a pre-forking server's worker)
    /// leaves the file to the parent, which still listens on it.
    bound_by: u32,
}

impl Listener {
    /// Listens on a filesystem path.
    ///
    /// The socket file gets the mode the process's umask leaves (`srwxr-xr-x` under the
    /// usual 022), and the kernel lets only a process that may write the file connect: others
    /// get `PermissionDenied` (`EACCES`) from their `connect`, before this end, its
    /// [`Server::admit`](crate::Server::admit) or its authorizer
    /// ([`Server::authorize`](crate::Server::authorize)) hears of them. A service for other
    /// users widens the mode after binding
    /// (`fs::set_permissions(path, Permissions::from_mode(0o666))`) and decides by uid in
    /// `admit` (once per client, as it connects) or `authorize` (per call).
    ///
    /// An OS error is an [`Error::Io`](crate::Error::Io) of its kind whose message names
    /// `path` (`binding /run/app.sock: Address already in use (os error 98)`, a live
    /// listener there or a file that is not a socket); so are
    /// [`Listener::bind_abstract`]'s, naming `@name`.
    pub fn bind(path: impl AsRef<Path>) -> Result<Listener> {
        let path = path.as_ref();
        Listener::bind_path(path).map_err(|e| e.doing(|| format!("binding {}", path.display())))
    }

    /// [`Listener::bind`], with errors that name no path.
    fn bind_path(path: &Path) -> Result<Listener> {
        // What drop removes: absolute, so that it still names the file once the process has
        // changed directory. Bound as given, which may be shorter than the kernel's limit
        // when the absolute path is not.
        let absolute = std::path::absolute(path)?;
        let addr = UnixAddr::new(path)?;
        let fd = new_socket()?;
        match ns::bind(fd.as_raw_fd(), &addr) {
            Err(nix::Error::EADDRINUSE) if is_stale(path) => {
                fs::remove_file(path)?;
                ns::bind(fd.as_raw_fd(), &addr)?;
            }
            r => r?,
        }
        let file = fs::metadata(path)?;
        // Made before `listen`, so that a failure there removes the file again.
        let listener = Listener {
            fd,
            path: Some((absolute, (file.dev(), file.ino()))),
            bound_by: std::process::id(),
        };
        ns::listen(&listener.fd, Backlog::MAXCONN)?;
        Ok(listener)
    }

    /// Listens on a Linux abstract socket name (no file; it disappears with the listener).
    ///
    /// An abstract name has no permissions: any process in this network namespace can
    /// connect, so [`Server::admit`](crate::Server::admit) or an authorizer
    /// ([`Server::authorize`](crate::Server::authorize)) is what keeps other users out.
    pub fn bind_abstract(name: impl AsRef<[u8]>) -> Result<Listener> {
        let name = name.as_ref();
        let bind = || -> Result<Listener> {
            let fd = new_socket()?;
            ns::bind(fd.as_raw_fd(), &UnixAddr::new_abstract(name)?)?;
            ns::listen(&fd, Backlog::MAXCONN)?;
            let bound_by = std::process::id();
            Ok(Listener {
                fd,
                path: None,
                bound_by,
            })
        };
        bind().map_err(|e| e.doing(|| format!("binding {}", abstract_name(name))))
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> Result<Socket> {
        Socket::new(self.accept_fd()?)
    }

    /// Waits for the next connection and returns its descriptor, retrying past a signal and
    /// a client that gave up while queued (`EINTR`, `ECONNABORTED`).
    pub(crate) fn accept_fd(&self) -> nix::Result<OwnedFd> {
        loop {
            match ns::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(raw) => return Ok(unsafe { OwnedFd::from_raw_fd(raw) }),
                Err(nix::Error::EINTR | nix::Error::ECONNABORTED) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops listening: a thread blocked in [`Listener::accept`] wakes with an `EINVAL` error,
    /// and new clients are refused.
    pub fn shutdown(&self) -> Result<()> {
        Ok(ns::shutdown(self.fd.as_raw_fd(), ns::Shutdown::Both)?)
    }

    /// The path this listener is bound to, if it is bound to one: made absolute when it was
    /// bound, so that it names the same file whatever the current directory is now.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_ref().map(|(p, _)| p.as_path())
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, id)) = &self.path
            && self.bound_by == std::process::id()
            && fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == *id)
        {
            let _ = fs::remove_file(path);
        }
    }
}

fn new_socket() -> Result<OwnedFd> {
    Ok(ns::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// A socket file nobody listens on: connecting to it is refused. The probe does not block: a
/// live listener whose queue is full would keep a blocking connect waiting (`EAGAIN` here).
fn is_stale(path: &Path) -> bool {
    let is_socket = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    let refused = || -> Result<bool> {
        let probe = ns::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        Ok(ns::connect(probe.as_raw_fd(), &UnixAddr::new(path)?) == Err(nix::Error::ECONNREFUSED))
    };
    is_socket && refused().unwrap_or(false)
}
