//! The test typed-ipc grew out of, ported: `test/ipc/unixsocket.cpp` from the June 2019
//! libcamera RFC "ipc: unix: Add a IPC mechanism based on Unix sockets", over a real child
//! process.
//!
//! In the seed a master process starts a slave with one end of a socket pair and then:
//!
//! - `CMD_REVERSE`: sends "FooBar" and expects "raBooF" back;
//! - `CMD_LEN_CALC`: sends two files as fds and expects the sum of their sizes back;
//! - `CMD_LEN_CMP`: sends, one-way, the sum it computed itself together with the same files;
//!   the slave checks that the sizes add up and fails (exits non-zero) if they don't;
//! - `CMD_CLOSE`: sends, one-way, "close"; the slave leaves its loop and exits, and the
//!   master requires exit status 0.
//!
//! Here the commands are the methods of [`UnixSocketTest`], the slave is this test binary
//! re-executed by [`Worker::spawn`] to run only the `#[ignore]`d [`unixsocket_slave`], and
//! the exit status carries the slave's verdict as in the seed.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nix::sys::memfd::{MFdFlags, memfd_create};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Connection, Error, interface};

#[interface]
pub trait UnixSocketTest {
    /// `CMD_REVERSE`: `text`, reversed.
    fn reverse(&self, text: String) -> String;
    /// `CMD_LEN_CALC`: the sum of the sizes of the files behind `files`.
    fn total_size(&self, files: Vec<OwnedFd>) -> u64;
    /// `CMD_LEN_CMP`: checks that the sizes of `files` add up to `expected`. No reply: the
    /// verdict is the slave's exit status.
    #[oneway]
    fn compare(&self, expected: u64, files: Vec<OwnedFd>);
    /// `CMD_CLOSE`: the slave hangs up and exits.
    #[oneway]
    fn close(&self);
}

/// The slave's exit status when a `compare` did not match (the seed's slave returns
/// `-ERANGE`).
const EXIT_MISMATCH: i32 = 1;
/// The slave's exit status when the master hung up without sending `close`.
const EXIT_NO_CLOSE: i32 = 2;

/// What the slave remembers, read by its main once serving is over.
#[derive(Default)]
struct Verdict {
    mismatches: AtomicU32,
    closed: AtomicBool,
}

struct Slave {
    /// Our own connection, so that `close` can hang up; taken then, which also breaks the
    /// cycle connection → served interface → connection.
    connection: Mutex<Option<Connection>>,
    verdict: Arc<Verdict>,
}

fn size_of(files: Vec<OwnedFd>) -> u64 {
    files
        .into_iter()
        .map(|fd| File::from(fd).metadata().expect("fstat").len())
        .sum()
}

impl UnixSocketTest for Slave {
    fn reverse(&self, text: String) -> String {
        text.chars().rev().collect()
    }

    fn total_size(&self, files: Vec<OwnedFd>) -> u64 {
        size_of(files)
    }

    fn compare(&self, expected: u64, files: Vec<OwnedFd>) {
        let size = size_of(files);
        if size != expected {
            eprintln!("slave: compare: the files add up to {size}, not {expected}");
            self.verdict.mismatches.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn close(&self) {
        self.verdict.closed.store(true, Ordering::Relaxed);
        // `serve` in the slave's main returns `Ok(())` once the connection ends.
        if let Some(connection) = self.connection.lock().unwrap().take() {
            connection.close();
        }
    }
}

/// The slave: serves [`UnixSocketTest`] to the master until `close`, then exits 0 if every
/// `compare` matched. Only runs as the child process of the tests below.
#[test]
#[ignore = "the slave process of the other tests, which start it"]
fn unixsocket_slave() {
    let connection = worker::connection().expect("the slave runs only under Worker::spawn");
    let verdict = Arc::new(Verdict::default());
    let slave = Slave {
        connection: Mutex::new(Some(connection.clone())),
        verdict: Arc::clone(&verdict),
    };
    UnixSocketTestServer::new(slave)
        .serve(connection)
        .expect("slave: serve");
    let status = if verdict.mismatches.load(Ordering::Relaxed) > 0 {
        EXIT_MISMATCH
    } else if !verdict.closed.load(Ordering::Relaxed) {
        EXIT_NO_CLOSE
    } else {
        0
    };
    std::process::exit(status);
}

/// Starts the slave: this test binary, running only [`unixsocket_slave`].
fn start_slave() -> (Worker, UnixSocketTestClient) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args([
        "--exact",
        "unixsocket_slave",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ]);
    command.stdout(Stdio::null()); // the child's test summary is noise here
    let (slave, connection) = Worker::spawn(command).unwrap();
    assert_ne!(slave.id(), std::process::id());
    (slave, UnixSocketTestClient::new(connection))
}

/// A memfd of `len` bytes.
fn memfd(len: usize) -> OwnedFd {
    let fd = memfd_create("seed-unixsocket", MFdFlags::MFD_CLOEXEC).unwrap();
    let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
    File::from(fd.try_clone().unwrap())
        .write_all_at(&bytes, 0)
        .unwrap();
    fd
}

/// Like the seed's `testCmp`: two files the master sizes itself, here this test binary (the
/// seed used its master and slave binaries) and a memfd.
fn files_to_compare() -> (u64, Vec<OwnedFd>) {
    let exe = File::open(std::env::current_exe().unwrap()).unwrap();
    let memfd = File::from(memfd(777));
    let size = exe.metadata().unwrap().len() + memfd.metadata().unwrap().len();
    (size, vec![exe.into(), memfd.into()])
}

/// testClose: sends `close`, checks that the slave hangs up by itself (the next call sees it,
/// with our end still open), and returns how the slave exited.
fn close(mut slave: Worker, ipc: UnixSocketTestClient) -> Exit {
    ipc.close().unwrap();
    match ipc.reverse("too late".into()) {
        Err(Error::Disconnected) => {}
        other => panic!("expected Error::Disconnected after close, got {other:?}"),
    }
    slave.wait().unwrap()
}

fn open_fds() -> usize {
    typed_ipc::wait_for_closes(); // typed-ipc closes what it drops on its own
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The tests count this process's fds, so they run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

#[test]
fn unixsocket() {
    let _serial = serial();
    let fds_before = open_fds();
    {
        let (slave, ipc) = start_slave();

        // testReverse
        assert_eq!(ipc.reverse("FooBar".into()).unwrap(), "raBooF");

        // testCalc: two files of known, distinct sizes.
        assert_eq!(
            ipc.total_size(vec![memfd(4096 + 123), memfd(10)]).unwrap(),
            4229
        );
        assert_eq!(ipc.total_size(Vec::new()).unwrap(), 0);

        // testCmp: one-way; the slave's verdict comes with its exit status.
        let (size, files) = files_to_compare();
        ipc.compare(size, files).unwrap();

        // testClose, and the slave's verdict: every compare matched.
        assert_eq!(close(slave, ipc), Exit::Code(0));
    }
    assert_eq!(open_fds(), fds_before, "the master leaked fds");
}

/// The check in `compare` can fail: a wrong size makes the slave exit non-zero.
#[test]
fn unixsocket_wrong_compare_fails_the_slave() {
    let _serial = serial();
    let fds_before = open_fds();
    {
        let (slave, ipc) = start_slave();
        let (size, files) = files_to_compare();
        ipc.compare(size + 1, files).unwrap();
        // A right one afterwards does not undo the wrong one.
        let (size, files) = files_to_compare();
        ipc.compare(size, files).unwrap();
        assert_eq!(close(slave, ipc), Exit::Code(EXIT_MISMATCH));
    }
    assert_eq!(open_fds(), fds_before, "the master leaked fds");
}

/// A master that hangs up without `close` fails the slave too, as in the seed.
#[test]
fn unixsocket_hang_up_without_close_fails_the_slave() {
    let _serial = serial();
    let (mut slave, ipc) = start_slave();
    assert_eq!(ipc.reverse("ab".into()).unwrap(), "ba");
    drop(ipc);
    assert_eq!(slave.wait().unwrap(), Exit::Code(EXIT_NO_CLOSE));
}
