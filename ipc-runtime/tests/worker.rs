//! Taking a worker's connection: only in the worker, only its parent's socket, without
//! touching the environment, and without closing an fd that is not ours.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::*;
use ipc_runtime::worker::{self, ENV, Exit, Worker};
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::sys::stat::fstat;

/// `command` with `fd` at fd 3 in the child (the one fd it inherits besides 0–2).
fn with_fd3(mut command: Command, fd: &OwnedFd) -> Command {
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and only calls dup2, which
    // is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // dup2 leaves fd 3 without close-on-exec, so it crosses the exec.
            if libc::dup2(raw, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// Runs `command` with `theirs` at its fd 3 and returns what it wrote there, read from `ours`
/// (the other end), once it has exited successfully.
fn run_with_fd3(command: Command, ours: OwnedFd, theirs: OwnedFd) -> Vec<u8> {
    let mut child = with_fd3(command, &theirs).spawn().unwrap();
    drop(theirs);
    let mut written = Vec::new();
    // Ends when the child, the only other holder of `theirs`, has exited.
    File::from(ours).read_to_end(&mut written).unwrap();
    assert!(child.wait().unwrap().success(), "the child failed");
    written
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap()
}

fn socket_pair(kind: SockType) -> (OwnedFd, OwnedFd) {
    socketpair(AddressFamily::Unix, kind, None, SockFlag::SOCK_CLOEXEC).unwrap()
}

fn stream_pair() -> (OwnedFd, OwnedFd) {
    socket_pair(SockType::Stream)
}

fn inode(fd: &OwnedFd) -> u64 {
    fstat(fd).unwrap().st_ino
}

#[test]
fn a_variable_naming_an_fd_that_is_not_the_parents_socket_takes_nothing_and_closes_nothing() {
    // A pipe or a stream socket at fd 3, named by a stale variable of the old form or by one
    // with the right inode: the child gets an error, and fd 3 is still open afterwards (it
    // writes to it, and the bytes arrive here).
    for (kind, make) in [("pipe", pipe as fn() -> _), ("stream socket", stream_pair)] {
        for with_inode in [false, true] {
            let (ours, theirs) = make();
            let value = if with_inode {
                format!("3:{}", inode(&theirs))
            } else {
                "3".to_string()
            };
            let mut command = child("child_with_fd3_not_a_worker");
            command.env(ENV, &value);
            let written = run_with_fd3(command, ours, theirs);
            assert_eq!(written, b"still open", "{kind} at fd 3, {ENV}={value}");
        }
    }
}

#[test]
fn a_worker_keeps_its_environment_and_what_it_starts_takes_nothing() {
    let (mut child, socket) = Worker::spawn_socket(child("child_starting_processes")).unwrap();
    let verdict = socket.recv();
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
    assert_eq!(verdict.unwrap().payload, b"ok");
}

/// The worker of `a_worker_keeps_its_environment_and_what_it_starts_takes_nothing`.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_starting_processes() {
    let before = std::env::var(ENV).unwrap();
    let socket = worker::socket().unwrap();
    assert_eq!(
        std::env::var(ENV).as_deref(),
        Ok(before.as_str()),
        "taking the connection changed the environment"
    );
    assert!(worker::socket().is_err(), "the connection was taken twice");

    // A process it starts inherits the variable; its fd 3 is another SOCK_SEQPACKET socket,
    // which it must neither take nor close.
    let (ours, theirs) = socket_pair(SockType::SeqPacket);
    assert_eq!(
        run_with_fd3(child("child_with_fd3_not_a_worker"), ours, theirs),
        b"still open"
    );
    // One with nothing put at fd 3: the worker's own socket did not cross the exec.
    let status = child("child_not_a_worker").status().unwrap();
    assert!(status.success(), "took the worker's connection");

    socket.send(b"ok", &[]).unwrap();
}

/// A process with a variable naming fd 3, which its parent gave it: it is not a worker, and
/// fd 3 stays open.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_with_fd3_not_a_worker() {
    assert!(std::env::var_os(ENV).is_some());
    assert!(
        worker::socket().is_err(),
        "took an fd that is not the parent's socket"
    );
    // SAFETY: F_GETFD only reads fd 3's flags.
    assert_ne!(
        unsafe { libc::fcntl(3, libc::F_GETFD) },
        -1,
        "fd 3 was closed"
    );
    // SAFETY: fd 3 is open (just checked); the parent put it there for this process, and
    // nothing else in it owns it.
    let mut fd3 = File::from(unsafe { OwnedFd::from_raw_fd(3) });
    fd3.write_all(b"still open").unwrap();
}

/// A process started by a worker with nothing at fd 3: it is not a worker.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_not_a_worker() {
    assert!(std::env::var_os(ENV).is_some());
    assert!(worker::connection().is_err());
}

/// The variable that tells `child_reporting_inherited_fds` which file to look for:
/// `<device>:<inode>`.
const LEAKY: &str = "TYPED_IPC_TEST_LEAKY";

#[test]
fn a_worker_inherits_no_fd_of_its_parent_but_its_connection() {
    // An fd of this process that is not close-on-exec, as a C library, another thread, or
    // this process's own parent may leave it: the worker must not get it all the same. It is
    // a copy of a close-on-exec memfd, so its number is above 3, where the worker's
    // connection goes.
    let file =
        nix::sys::memfd::memfd_create("leaky", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let leaky = nix::unistd::dup(&file).unwrap();
    let stat = fstat(&leaky).unwrap();
    let mut command = child("child_reporting_inherited_fds");
    command.env(LEAKY, format!("{}:{}", stat.st_dev, stat.st_ino));
    let (mut child, socket) = Worker::spawn_socket(command).unwrap();
    let report = socket.recv();
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
    drop(leaky);
    assert_eq!(
        String::from_utf8_lossy(&report.unwrap().payload),
        "no fd of the parent's",
        "the worker inherited an fd besides its connection"
    );
}

/// The worker of `a_worker_inherits_no_fd_of_its_parent_but_its_connection`: reports which of
/// its fds, if any, is the parent's file that [`LEAKY`] names.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_reporting_inherited_fds() {
    let socket = worker::socket().unwrap();
    let leaky = std::env::var(LEAKY).unwrap();
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .map(|entry| {
            entry
                .unwrap()
                .file_name()
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let found: Vec<i32> = fds
        .into_iter()
        .filter(|&fd| {
            // SAFETY: `libc::stat` is plain integers, for which all zeroes is a valid value.
            let mut stat: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat only reads what `fd` is, if it is open (the directory listing's
            // own fd no longer is: it fails with EBADF), into `stat`, valid for writes.
            let open = unsafe { libc::fstat(fd, &mut stat) } == 0;
            open && format!("{}:{}", stat.st_dev, stat.st_ino) == leaky
        })
        .collect();
    let report = if found.is_empty() {
        "no fd of the parent's".to_string()
    } else {
        format!("the parent's file at fds {found:?}")
    };
    socket.send(report.as_bytes(), &[]).unwrap();
}

#[test]
fn a_parent_without_stdin_and_stdout_hands_its_worker_the_socket() {
    let status = child("child_without_stdin_and_stdout").status().unwrap();
    assert!(status.success(), "its worker did not get its connection");
}

/// A process with fds 0 and 1 closed, so that its socket pairs land there, starting a worker
/// whose stdout is `/dev/null` (as [`child`] makes it): the worker still gets the socket.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_without_stdin_and_stdout() {
    for fd in [0, 1] {
        // SAFETY: nothing in this process owns fds 0 and 1 but its standard streams, which
        // this test does not use, and which take a closed fd as a stream gone.
        assert_eq!(unsafe { libc::close(fd) }, 0);
    }
    let (mut worker, socket) = Worker::spawn_socket(child("child_taking_its_socket")).unwrap();
    let verdict = socket.recv();
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    assert_eq!(verdict.unwrap().payload, b"ok");
}

/// A worker that takes its socket and says so.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_taking_its_socket() {
    worker::socket().unwrap().send(b"ok", &[]).unwrap();
}

/// How the worker `child(name)` ended, its socket held meanwhile.
#[cfg(feature = "tokio")]
fn worker_exit(name: &str) -> Exit {
    let (mut worker, _socket) = Worker::spawn_socket(child(name)).unwrap();
    worker.wait().unwrap()
}

/// A runtime for an async worker's side of a test.
#[cfg(feature = "tokio")]
fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[cfg(feature = "tokio")]
#[test]
fn an_async_worker_gets_its_connection_where_it_cannot_accept_writes() {
    assert_eq!(
        worker_exit("child_async_without_getrandom"),
        Exit::Code(0),
        "the worker did not get its connection"
    );
}

/// An async worker in a sandbox that refuses `getrandom` (as a seccomp filter may), so it
/// cannot accept writes into its memory: it gets its connection all the same, as a blocking
/// one does.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_async_without_getrandom() {
    let runtime = current_thread_runtime();
    // Load the syscall number; getrandom fails with ENOSYS; everything else is allowed.
    use common::{bpf_jeq, bpf_stmt as stmt};
    common::install_seccomp(&mut [
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        bpf_jeq(libc::SYS_getrandom as u32, 0, 1),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]);
    runtime.block_on(async {
        ipc_runtime::tokio::worker::connection().unwrap();
    });
}

#[test]
fn killing_a_worker_the_kernel_has_reaped_is_harmless() {
    let status = child("child_killing_its_reaped_worker").status().unwrap();
    assert!(status.success(), "killing a reaped worker failed or hung");
}

/// A process that ignores `SIGCHLD`, so the kernel reaps its children as they exit (a
/// process-wide setting, hence a process of its own): killing a worker that has exited, and
/// dropping it, succeed.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_killing_its_reaped_worker() {
    let mut worker = reaped_worker();
    worker.kill().unwrap();
    drop(worker);
}

/// Blocks until `worker` has exited (its pidfd is readable), without reaping it.
/// A worker that exits (with code 0) once told, by a message or by the socket closing: one
/// that exited at once could be gone, reaped by the kernel in a process that ignores
/// `SIGCHLD`, before `Worker::spawn_socket` opened its pidfd, leaving it none.
fn told_to_exit() -> (Worker, ipc_runtime::Socket) {
    let (worker, socket) = Worker::spawn_socket(child("child_exiting_when_told")).unwrap();
    assert!(worker.pidfd().is_some(), "this kernel has pidfds");
    (worker, socket)
}

/// In a process of its own (the setting is process-wide), ignores `SIGCHLD`, so the kernel
/// reaps children as they exit, and returns a worker that has exited and been reaped: its pid
/// is free for another process to take.
fn reaped_worker() -> Worker {
    // SAFETY: setting a disposition takes plain integers; ignoring SIGCHLD only changes how
    // this process's children are reaped, and the process runs nothing but one test.
    assert_ne!(
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) },
        libc::SIG_ERR
    );
    let (worker, socket) = told_to_exit();
    drop(socket);
    until_exited(&worker);
    worker
}

fn until_exited(worker: &Worker) {
    let pidfd = worker.pidfd().expect("this kernel has pidfds");
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    assert_eq!(poll(&mut fds, PollTimeout::NONE).unwrap(), 1);
}

#[test]
fn wait_and_try_wait_say_how_a_worker_ended() {
    // One told to exit with code 7, one killed: `try_wait` says nothing while it runs (it
    // blocks reading its socket until told), then both say how it ended, however often asked.
    for (code, exit) in [(Some(7u8), Exit::Code(7)), (None, Exit::Signal(9))] {
        let (mut worker, socket) = Worker::spawn_socket(child("child_exiting_when_told")).unwrap();
        assert_eq!(worker.try_wait().unwrap(), None, "{exit:?}: still running");
        match code {
            Some(code) => socket.send(&[code], &[]).unwrap(),
            None => worker.kill().unwrap(),
        }
        until_exited(&worker);
        assert_eq!(worker.try_wait().unwrap(), Some(exit));
        assert_eq!(worker.wait().unwrap(), exit);
        assert_eq!(worker.try_wait().unwrap(), Some(exit));

        // Waiting first: `wait` reaps it, and `try_wait` says the same afterwards.
        let (mut worker, socket) = Worker::spawn_socket(child("child_exiting_when_told")).unwrap();
        assert_eq!(worker.try_wait().unwrap(), None, "{exit:?}: still running");
        match code {
            Some(code) => socket.send(&[code], &[]).unwrap(),
            None => worker.kill().unwrap(),
        }
        assert_eq!(worker.wait().unwrap(), exit);
        assert_eq!(worker.wait().unwrap(), exit);
        assert_eq!(worker.try_wait().unwrap(), Some(exit));
    }
}

/// A watchdog kills a worker whose `Worker` another thread owns, waiting for its end: the
/// wait says it was killed, the connection ends with the kill, and killing it again once it
/// has been reaped is harmless.
#[test]
fn a_killer_kills_a_worker_that_another_thread_waits_for() {
    let (mut worker, connection) = Worker::spawn(child("child_serving_nothing")).unwrap();
    let killer = worker.killer().unwrap();
    let waiting = std::thread::spawn(move || worker.wait().unwrap());
    killer.kill().unwrap();
    assert_eq!(waiting.join().unwrap(), Exit::Signal(9));
    // Serving nothing, `run` returns once the connection has ended.
    connection.run().unwrap();
    killer.kill().unwrap();
}

/// A worker that serves nothing until its parent hangs up.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_serving_nothing() {
    worker::connection().unwrap().run().unwrap();
}

/// A worker that blocks reading its socket until told to exit, then exits with the code it
/// was sent.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_exiting_when_told() {
    // The socket closed (`Disconnected`): exit with 0.
    let code = worker::socket().unwrap().recv().map_or(0, |m| m.payload[0]);
    std::process::exit(i32::from(code));
}

#[test]
fn waiting_for_a_worker_the_kernel_has_reaped_says_so() {
    let status = child("child_waiting_for_its_reaped_worker")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "waiting for a reaped worker did not say so, or hung"
    );
}

/// A process that ignores `SIGCHLD`, so the kernel reaps its worker as it exits: `wait` and
/// `try_wait` fail at once, saying the worker was reaped elsewhere.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_waiting_for_its_reaped_worker() {
    let mut worker = reaped_worker();
    let waited = worker.wait();
    assert!(says_reaped(waited.as_ref().err()), "{waited:?}");
    let tried = worker.try_wait();
    assert!(says_reaped(tried.as_ref().err()), "{tried:?}");
    #[cfg(feature = "tokio")]
    {
        // The async wait too, which watches the pidfd and then tries.
        let runtime = current_thread_runtime();
        let waited = runtime.block_on(ipc_runtime::tokio::worker::wait(&mut worker));
        assert!(says_reaped(waited.as_ref().err()), "{waited:?}");
    }
}

/// Whether `error` is the one for a worker something else reaped.
fn says_reaped(error: Option<&ipc_runtime::Error>) -> bool {
    matches!(error, Some(ipc_runtime::Error::Io(error))
        if error.to_string().contains("reaped elsewhere"))
}

/// Outside a runtime the async `spawn` fails before it starts anything: a worker started only
/// to be killed again may already have acted (written a file, taken a lock).
#[cfg(feature = "tokio")]
#[test]
fn an_async_spawn_outside_a_runtime_starts_no_worker() {
    let (started, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    let raw = write.as_raw_fd();
    let mut command = Command::new("true");
    // SAFETY: the closure runs in the child between fork and exec and only calls write, which
    // is async-signal-safe, on a buffer of its own.
    unsafe {
        command.pre_exec(move || {
            libc::write(raw, [1u8].as_ptr().cast(), 1);
            Ok(())
        });
    }
    let Err(refused) = ipc_runtime::tokio::worker::spawn(command) else {
        panic!("spawned outside a runtime");
    };
    assert!(
        refused.to_string().contains("inside a tokio runtime"),
        "{refused}"
    );
    drop(write);
    let mut seen = Vec::new();
    File::from(started).read_to_end(&mut seen).unwrap();
    assert_eq!(seen, b"", "a child was started");
}

#[cfg(feature = "tokio")]
#[test]
fn an_async_worker_asking_outside_a_runtime_keeps_its_connection_for_later() {
    assert_eq!(
        worker_exit("child_async_asking_outside_a_runtime"),
        Exit::Code(0),
        "the worker lost its connection"
    );
}

/// An async worker that asks for its connection before it has a runtime: refused, and the
/// socket is still there when it asks again inside one.
#[cfg(feature = "tokio")]
#[test]
#[ignore = "run as a child process by other tests"]
fn child_async_asking_outside_a_runtime() {
    let Err(refused) = ipc_runtime::tokio::worker::connection() else {
        panic!("a connection outside a runtime");
    };
    assert!(
        refused.to_string().contains("inside a tokio runtime"),
        "{refused}"
    );
    let runtime = current_thread_runtime();
    let connection = runtime.block_on(async { ipc_runtime::tokio::worker::connection() });
    drop(connection.unwrap());
}

/// Only guards against a hang: a test that waits this long has failed anyway.
const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(60);

#[test]
fn wait_closes_a_piped_stdin_as_std_does() {
    // A worker that reads its stdin to the end before it exits: piped, and never written to
    // nor closed by this process, `wait` must close it (as `std::process::Child::wait` does),
    // else both wait for good.
    let reader = || {
        let mut command = child("child_reading_stdin_to_its_end");
        command.stdin(std::process::Stdio::piped());
        Worker::spawn_socket(command).unwrap()
    };
    let (mut worker, socket) = reader();
    let (exited, exit) = std::sync::mpsc::channel();
    std::thread::spawn(move || exited.send(worker.wait().unwrap()));
    let exit = exit
        .recv_timeout(HANG_GUARD)
        .expect("wait closes the worker's stdin");
    assert_eq!(exit, Exit::Code(0));
    assert_eq!(socket.recv().unwrap().payload, b"read to the end");
    // The async wait likewise.
    #[cfg(feature = "tokio")]
    {
        let (mut worker, socket) = reader();
        let waited = current_thread_runtime().block_on(async {
            let wait = ipc_runtime::tokio::worker::wait(&mut worker);
            tokio::time::timeout(HANG_GUARD, wait).await
        });
        let exit = waited.expect("the async wait closes the worker's stdin");
        assert_eq!(exit.unwrap(), Exit::Code(0));
        assert_eq!(socket.recv().unwrap().payload, b"read to the end");
    }
}

/// A worker that reads its stdin to the end, says so, and exits.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_reading_stdin_to_its_end() {
    let socket = worker::socket().unwrap();
    std::io::stdin().read_to_end(&mut Vec::new()).unwrap();
    socket.send(b"read to the end", &[]).unwrap();
}

/// More than a pipe holds (64 KiB).
const LOGGED: usize = 1 << 20;

#[test]
fn the_parent_takes_and_reads_a_worker_s_piped_stderr() {
    // A worker whose stderr its parent pipes, to log it, say: the parent takes the pipe and
    // reads it. It had no way to: the pipe stayed in the `Worker`, and a worker that wrote
    // more than a pipe holds waited for good.
    let mut command = child("child_logging_a_lot");
    command.stderr(std::process::Stdio::piped());
    let (mut worker, socket) = Worker::spawn_socket(command).unwrap();
    let mut stderr = worker.take_stderr().expect("the piped stderr");
    assert!(worker.take_stderr().is_none(), "taken once");
    assert!(worker.take_stdout().is_none(), "stdout is not piped");
    let reading = std::thread::spawn(move || {
        let mut logged = Vec::new();
        stderr.read_to_end(&mut logged).unwrap();
        logged.len()
    });
    let said = socket
        .recv_timeout(HANG_GUARD)
        .expect("the worker finished logging");
    assert_eq!(said.payload, b"logged");
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    assert!(reading.join().unwrap() >= LOGGED);
}

/// A worker that writes [`LOGGED`] bytes to stderr, then says so.
#[test]
#[ignore = "run as a child process by other tests"]
fn child_logging_a_lot() {
    let socket = worker::socket().unwrap();
    std::io::stderr().write_all(&vec![b'.'; LOGGED]).unwrap();
    socket.send(b"logged", &[]).unwrap();
}
