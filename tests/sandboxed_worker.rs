//! A worker under seccomp: it takes its connection, installs an allowlist of system calls
//! (what docs/guide/sandboxing.md lists) and then serves every kind of traffic a
//! worker sees in steady state: byte strings inline, through the shared region, written into
//! it by its parent and in fragments; `SealedBuffer`s and `RegionView`s; fds both ways;
//! oneways; calls back to the parent; fds it drops on its own (its closer thread); the
//! hang-up and its exit. Under a filter that kills the process at the first call outside
//! the list, the parent's checks passing and the worker exiting with 0 prove the list
//! complete for these features. Under one that refuses with `EPERM` what it leaves out, the
//! worker shows what fails, and how: a reply that cannot go out fails its call saying why,
//! and a worker that can send nothing at all ends the connection rather than leave its
//! caller waiting (`probe_errno` runs everything with any calls left out).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{checksum, child, fd_count_lock, fd_snapshot, filled, memfd, read_all};
use typed_ipc::shared_buffer::SealedBuffer;
use typed_ipc::shared_region::{RegionView, SharedRegion};
use typed_ipc::worker::{self, Exit, Worker};
use typed_ipc::{Error, SharedBytes, interface};

#[interface]
pub trait Sandboxed {
    /// `data`, reversed: a byte string each way.
    fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    /// The checksum of `data` (piped, on connections that lend their pages).
    fn sum_shared(&self, data: SharedBytes) -> u64;
    /// The checksum of a sealed buffer, read in place.
    fn sum_sealed(&self, data: SealedBuffer) -> u64;
    /// The checksum of `len` bytes of a region, copied out.
    fn sum_view(&self, view: RegionView, len: u64) -> Result<u64, String>;
    /// The length of the file behind `file`, read through it.
    fn file_len(&self, file: OwnedFd) -> u64;
    /// `fd` itself, sent back, with `tail` written at its end.
    fn pass_back(&self, fd: OwnedFd, tail: Vec<u8>) -> OwnedFd;
    /// A sealed copy of `data`, made by the worker (a memfd of its own).
    fn sealed_copy(&self, data: Vec<u8>) -> Result<SealedBuffer, String>;
    /// Notes `n`, and the length of the file behind `file` if any.
    #[oneway]
    fn note(&self, n: u64, file: Option<OwnedFd>);
    /// The sum of what was noted.
    fn notes(&self) -> u64;
    /// The parent's `double(n)`, called back during this call.
    fn ask_parent(&self, n: u64) -> Result<u64, String>;
}

/// What the parent serves the worker's calls back.
#[interface]
pub trait Parent {
    fn double(&self, n: u64) -> u64;
}

/// An interface the worker does not serve: a call's fds are dropped by the worker's runtime
/// (by its closer thread), not by any code of the worker's.
#[interface]
pub trait Unserved {
    fn take(&self, fd: OwnedFd) -> u64;
}

struct SandboxedImpl {
    parent: ParentClient,
    noted: AtomicU64,
    /// A received fd kept until the hang-up, so that the worker closes it then.
    kept: Mutex<Vec<OwnedFd>>,
}

fn file_len(fd: OwnedFd) -> u64 {
    let mut file = std::fs::File::from(fd);
    let mut all = Vec::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_end(&mut all).unwrap() as u64
}

impl Sandboxed for SandboxedImpl {
    fn echo(&self, mut data: Vec<u8>) -> Vec<u8> {
        data.reverse();
        data
    }
    fn sum_shared(&self, data: SharedBytes) -> u64 {
        checksum(&data)
    }
    fn sum_sealed(&self, data: SealedBuffer) -> u64 {
        checksum(&data)
    }
    fn sum_view(&self, view: RegionView, len: u64) -> Result<u64, String> {
        let bytes = view.to_vec(0, len as usize).map_err(|e| e.to_string())?;
        Ok(checksum(&bytes))
    }
    fn file_len(&self, file: OwnedFd) -> u64 {
        file_len(file)
    }
    fn pass_back(&self, fd: OwnedFd, tail: Vec<u8>) -> OwnedFd {
        let mut file = std::fs::File::from(fd);
        file.seek(SeekFrom::End(0)).unwrap();
        file.write_all(&tail).unwrap();
        file.into()
    }
    fn sealed_copy(&self, data: Vec<u8>) -> Result<SealedBuffer, String> {
        SealedBuffer::copy_from(&data).map_err(|e| e.to_string())
    }
    fn note(&self, n: u64, file: Option<OwnedFd>) {
        let len = match file {
            Some(fd) => {
                let kept = fd.try_clone().unwrap();
                self.kept.lock().unwrap().push(kept);
                file_len(fd)
            }
            None => 0,
        };
        self.noted.fetch_add(n + len, Ordering::Relaxed);
    }
    fn notes(&self) -> u64 {
        self.noted.load(Ordering::Relaxed)
    }
    fn ask_parent(&self, n: u64) -> Result<u64, String> {
        self.parent.double(n).map_err(|e| e.to_string())
    }
}

/// The variable that tells the worker which filter to install: `none` (only the marker
/// `prctl(PR_SET_NO_NEW_PRIVS)` that `strace` finds), `errno` or `kill`.
const FILTER: &str = "SANDBOXED_WORKER_FILTER";
/// The calls to take out of the filter's list, separated by commas.
const REFUSE: &str = "SANDBOXED_WORKER_REFUSE";
/// Set (to anything) to make the worker lend its pages too.
const LEND: &str = "SANDBOXED_WORKER_LEND";

#[test]
#[ignore = "run as a child process by other tests"]
fn child_sandboxed() {
    let connection = worker::connection().unwrap();
    if std::env::var_os(LEND).is_some() {
        connection.lend_pages_to_peer(true);
    }
    let filter = std::env::var(FILTER).unwrap();
    let refuse = std::env::var(REFUSE).unwrap_or_default();
    let refuse: Vec<&str> = refuse.split(',').collect();
    sandbox::install(&filter, &refuse).unwrap();
    let service = SandboxedImpl {
        parent: ParentClient::new(connection.clone()),
        noted: AtomicU64::new(0),
        kept: Mutex::new(Vec::new()),
    };
    SandboxedServer::new(service).serve(connection).unwrap();
}

struct ParentImpl;

impl Parent for ParentImpl {
    fn double(&self, n: u64) -> u64 {
        2 * n
    }
}

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// Runs every feature against a worker under `filter`; `lend` has both ends lend their pages
/// (so that `SharedBytes` go through pipes).
fn serve_everything_under(filter: &str, lend: bool) {
    let refuse = std::env::var(REFUSE).unwrap_or_default();
    let _fds = fd_count_lock();
    common::one_copy_always();
    let before = fd_snapshot();
    let mut command = child("child_sandboxed");
    command.env(FILTER, filter).env(REFUSE, refuse);
    if lend {
        command.env(LEND, "1");
    }
    let (mut worker, connection) = Worker::spawn(command).unwrap();
    connection.lend_pages_to_peer(lend);
    let serving = std::thread::spawn({
        let connection = connection.clone();
        move || connection.serve(ParentServer::new(ParentImpl))
    });
    let client = SandboxedClient::new(connection.clone());

    // Byte strings: inline, the shared region (both ways), written into the worker, and
    // past the region's largest, in fragments.
    for len in [64, 64 * KIB, 512 * KIB, MIB, 8 * MIB, 40 * MIB] {
        let data = filled(len, len as u64);
        let mut reversed = data.clone();
        reversed.reverse();
        assert!(
            client.echo(data).unwrap() == reversed,
            "echo of {len} bytes"
        );
    }
    for len in [4 * KIB, 512 * KIB] {
        let data = filled(len, 7);
        let sum = checksum(&data);
        assert_eq!(client.sum_shared(SharedBytes::from(data)).unwrap(), sum);
    }
    let data = filled(MIB, 3);
    let sealed = SealedBuffer::copy_from(&data).unwrap();
    assert_eq!(client.sum_sealed(sealed).unwrap(), checksum(&data));
    let mut region = SharedRegion::new(64 * KIB).unwrap();
    region[..data.len().min(64 * KIB)].copy_from_slice(&data[..64 * KIB]);
    let view = region.view().unwrap();
    let sum = checksum(&data[..64 * KIB]);
    assert_eq!(client.sum_view(view, 64 * KIB as u64).unwrap(), Ok(sum));
    drop(region);

    // Fds both ways.
    assert_eq!(client.file_len(memfd(b"twelve bytes")).unwrap(), 12);
    let back = client.pass_back(memfd(b"head"), b"+tail".to_vec()).unwrap();
    assert_eq!(read_all(back), b"head+tail");
    let sealed = client.sealed_copy(data.clone()).unwrap();
    assert_eq!(sealed.map(|s| checksum(&s)), Ok(checksum(&data)));

    // Oneways, with and without an fd, then a call that runs after them.
    client.note(1, None).unwrap();
    client.note(2, Some(memfd(b"abc"))).unwrap();
    assert_eq!(client.notes().unwrap(), 1 + 2 + 3);

    // A call back to the parent, during a call.
    assert_eq!(client.ask_parent(21).unwrap(), Ok(42));

    // Fds the worker's runtime drops on its own: a call of an interface it does not serve.
    let unserved = UnservedClient::new(connection.clone());
    let refused = unserved.take(memfd(b"dropped by the worker"));
    assert!(matches!(refused, Err(Error::NotServed(_))), "{refused:?}");
    // The worker still serves after all that.
    assert_eq!(client.echo(vec![1, 2, 3]).unwrap(), vec![3, 2, 1]);

    // The hang-up: the worker's `serve` returns and it exits.
    drop((client, unserved));
    connection.close();
    serving.join().unwrap().unwrap();
    drop(connection);
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    drop(worker);
    before.assert_nothing_new();
}

#[test]
fn a_worker_without_a_filter_serves_everything() {
    serve_everything_under("none", false);
}

#[test]
fn a_worker_without_a_filter_serves_everything_lending_pages() {
    serve_everything_under("none", true);
}

#[test]
fn a_worker_under_a_filter_that_kills_serves_everything() {
    serve_everything_under("kill", false);
}

#[test]
fn a_worker_under_a_filter_that_kills_serves_everything_lending_pages() {
    serve_everything_under("kill", true);
}

/// A worker that allows only what `Need::Always` lists, and refuses to start threads: its
/// runtime drops the fds nothing claimed on its serving thread instead of the closer's, and
/// nothing it does calls outside the list (which would kill it).
#[test]
fn a_single_threaded_worker_serves_everything_with_only_what_it_always_needs() {
    serve_everything_under("single-threaded", false);
}

#[test]
#[ignore = "a probe: SANDBOXED_WORKER_REFUSE=<calls> runs everything with those calls refused"]
fn probe_errno() {
    serve_everything_under("errno", false);
}

/// The guide's table (docs/guide/sandboxing.md, "The system calls a served worker makes") names
/// exactly the calls [`worker::sandbox::SYSCALLS`] exports (those of this architecture: the
/// table names both architectures'), so that the two cannot drift apart.
#[test]
fn the_guide_table_names_the_exported_calls() {
    let chapter = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/guide/sandboxing.md");
    let guide = std::fs::read_to_string(chapter).unwrap();
    let section = guide.split("## The system calls").nth(1).unwrap();
    // The rows after the table's header and its `| --- |` line, up to the first line that is
    // not a row; the first column's backticked words, not `FIONREAD` (an argument).
    let in_table: BTreeSet<&str> = section
        .lines()
        .skip_while(|line| !line.starts_with("| ---"))
        .skip(1)
        .take_while(|line| line.starts_with('|'))
        .flat_map(|row| row.split('|').nth(1).unwrap().split('`').skip(1).step_by(2))
        .filter(|word| {
            word.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .collect();
    let exported: BTreeSet<&str> = worker::sandbox::SYSCALLS
        .iter()
        .map(|call| call.name)
        .collect();
    // What the table names for the other architecture only.
    #[cfg(target_arch = "x86_64")]
    let other_arch = BTreeSet::from(["ppoll"]);
    #[cfg(target_arch = "aarch64")]
    let other_arch = BTreeSet::from(["poll", "epoll_wait"]);
    let only_in_table: BTreeSet<&str> = in_table.difference(&exported).copied().collect();
    assert_eq!(
        only_in_table, other_arch,
        "in the guide's table, not exported"
    );
    let only_exported: Vec<&str> = exported.difference(&in_table).copied().collect();
    assert!(
        only_exported.is_empty(),
        "exported, not in the guide's table: {only_exported:?}"
    );
    assert_eq!(
        worker::sandbox::SYSCALLS.len(),
        exported.len(),
        "a call exported twice"
    );
}

/// A hang guard only: every call here is answered, or fails, at once.
const GUARD: std::time::Duration = std::time::Duration::from_secs(60);

/// A worker under the `errno` filter with `refuse` taken out of its list, and a client of it.
fn sandboxed_without(refuse: &str, stderr: std::process::Stdio) -> (Worker, SandboxedClient) {
    let mut command = child("child_sandboxed");
    command
        .env(FILTER, "errno")
        .env(REFUSE, refuse)
        .stderr(stderr);
    let (worker, connection) = Worker::spawn(command).unwrap();
    (worker, SandboxedClient::new(connection).with_timeout(GUARD))
}

/// A filter that refuses `sendmsg`: the worker's replies that carry fds (or take several
/// datagrams) cannot go out. Each such call fails at once saying why, as a failure reply
/// (which goes out with `send`); the others are answered.
#[test]
fn a_reply_the_filter_refuses_fails_its_call_saying_why() {
    // Its fds would move the counts of the tests that count them.
    let _fds = fd_count_lock();
    let (mut worker, client) = sandboxed_without("sendmsg", std::process::Stdio::inherit());
    let refused = client.pass_back(memfd(b"head"), b"+tail".to_vec());
    assert!(
        matches!(&refused, Err(Error::Remote(why)) if why.contains("Operation not permitted")),
        "{refused:?}"
    );
    assert_eq!(client.echo(vec![1, 2, 3]).unwrap(), vec![3, 2, 1]);
    drop(client);
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
}

/// A filter that refuses `fstatfs`: the worker cannot check the parent's shared memory (that
/// it is not on hugetlbfs), so it maps none. A call that brings some (a byte string through the
/// parent's region, a `SealedBuffer`) fails saying why, as this end's failure, not as a message
/// that blames the types the two ends were built from; the others are answered.
#[test]
fn shared_memory_the_worker_cannot_map_fails_its_call_saying_why() {
    let _fds = fd_count_lock();
    let (mut worker, client) = sandboxed_without("fstatfs", std::process::Stdio::inherit());
    // Answered: and the parent learns from the reply that the worker reads its region.
    assert_eq!(client.echo(vec![1, 2, 3]).unwrap(), vec![3, 2, 1]);
    let through_region = client.echo(vec![7; 64 * KIB]).map(drop);
    let sealed = SealedBuffer::copy_from(&[1; 4096]).unwrap();
    let sealed = client.sum_sealed(sealed).map(drop);
    for refused in [through_region, sealed] {
        assert!(
            matches!(&refused, Err(Error::Remote(why))
                if why.contains("Operation not permitted") && !why.contains("types")),
            "{refused:?}"
        );
    }
    assert_eq!(client.echo(vec![1, 2, 3]).unwrap(), vec![3, 2, 1]);
    drop(client);
    assert_eq!(worker.wait().unwrap(), Exit::Code(0));
}

/// A filter that refuses `sendto` too: no reply can go out, nor a failure saying why. The
/// worker ends the connection rather than leave its caller waiting for good, and its `serve`
/// returns the error (which the child's `unwrap` turns into exit status 101).
#[test]
fn a_worker_that_can_answer_nothing_ends_the_connection() {
    // Its fds would move the counts of the tests that count them.
    let _fds = fd_count_lock();
    // Its panic, expected, is left off the test's output.
    let (mut worker, client) = sandboxed_without("sendmsg,sendto", std::process::Stdio::null());
    let unanswered = client.echo(vec![1, 2, 3]);
    assert!(
        matches!(unanswered, Err(Error::Disconnected)),
        "{unanswered:?}"
    );
    assert_eq!(worker.wait().unwrap(), Exit::Code(101));
}

/// The same refusals in a worker of the async flavour.
#[cfg(feature = "tokio")]
mod asynchronous {
    use std::os::fd::OwnedFd;

    use super::{
        Error, Exit, FILTER, GUARD, REFUSE, Worker, child, fd_count_lock, memfd, read_all, sandbox,
    };

    #[typed_ipc::interface(blocking_client)]
    pub trait Sandboxed {
        async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
        async fn pass_back(&self, fd: OwnedFd) -> OwnedFd;
    }

    struct SandboxedImpl;

    impl Sandboxed for SandboxedImpl {
        async fn echo(&self, mut data: Vec<u8>) -> Vec<u8> {
            data.reverse();
            data
        }
        async fn pass_back(&self, fd: OwnedFd) -> OwnedFd {
            fd
        }
    }

    #[test]
    #[ignore = "run as a child process by other tests"]
    fn child_async_sandboxed() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let connection = typed_ipc::tokio::worker::connection().unwrap();
            let refuse = std::env::var(REFUSE).unwrap_or_default();
            let refuse: Vec<&str> = refuse.split(',').collect();
            sandbox::install(&std::env::var(FILTER).unwrap(), &refuse).unwrap();
            SandboxedServer::new(SandboxedImpl)
                .serve(connection)
                .await
                .unwrap();
        });
    }

    fn sandboxed_without(
        refuse: &str,
        stderr: std::process::Stdio,
    ) -> (Worker, SandboxedBlockingClient) {
        let mut command = child("asynchronous::child_async_sandboxed");
        command
            .env(FILTER, "errno")
            .env(REFUSE, refuse)
            .stderr(stderr);
        let (worker, connection) = Worker::spawn(command).unwrap();
        let client = SandboxedBlockingClient::new(connection).with_timeout(GUARD);
        (worker, client)
    }

    #[test]
    fn an_async_worker_serves_under_a_filter_that_kills() {
        // Its fds would move the counts of the tests that count them.
        let _fds = fd_count_lock();
        let mut command = child("asynchronous::child_async_sandboxed");
        command.env(FILTER, "kill");
        let (mut worker, connection) = Worker::spawn(command).unwrap();
        let client = SandboxedBlockingClient::new(connection).with_timeout(GUARD);
        assert_eq!(client.echo(vec![1, 2, 3]).unwrap(), vec![3, 2, 1]);
        let big = vec![7u8; 64 << 10];
        assert_eq!(client.echo(big.clone()).unwrap(), big);
        let back = client.pass_back(memfd(b"kept")).unwrap();
        assert_eq!(read_all(back), b"kept");
        drop(client);
        assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    }

    #[test]
    fn a_reply_the_filter_refuses_fails_its_call_saying_why() {
        // Its fds would move the counts of the tests that count them.
        let _fds = fd_count_lock();
        let (mut worker, client) = sandboxed_without("sendmsg", std::process::Stdio::inherit());
        let refused = client.pass_back(memfd(b"head"));
        assert!(
            matches!(&refused, Err(Error::Remote(why)) if why.contains("Operation not permitted")),
            "{refused:?}"
        );
        assert_eq!(client.echo(vec![1, 2, 3]).unwrap(), vec![3, 2, 1]);
        drop(client);
        assert_eq!(worker.wait().unwrap(), Exit::Code(0));
    }

    #[test]
    fn a_worker_that_can_answer_nothing_ends_the_connection() {
        // Its fds would move the counts of the tests that count them.
        let _fds = fd_count_lock();
        let (mut worker, client) = sandboxed_without("sendmsg,sendto", std::process::Stdio::null());
        let unanswered = client.echo(vec![1, 2, 3]);
        assert!(
            matches!(unanswered, Err(Error::Disconnected)),
            "{unanswered:?}"
        );
        assert_eq!(worker.wait().unwrap(), Exit::Code(101));
    }
}

/// The filter: an allowlist of system calls, as a BPF program over the call's number.
mod sandbox {
    use std::io;

    use typed_ipc::worker::sandbox::{Need, SYSCALLS};

    /// What this test's own methods make on top of typed-ipc's list: reading the files they
    /// are given (`read_to_end` sizes them with `statx` first) and seeking in them.
    const OWN_CODE: &[(&str, libc::c_long)] = &[
        ("read", libc::SYS_read),
        ("lseek", libc::SYS_lseek),
        ("statx", libc::SYS_statx),
    ];

    /// typed-ipc's list and this test's own calls: every need (this worker runs threads,
    /// pipes, the async flavour) or, `single_threaded`, only `Need::Always`.
    fn allowed(single_threaded: bool) -> impl Iterator<Item = (&'static str, libc::c_long)> {
        let listed = SYSCALLS
            .iter()
            .filter(move |call| !single_threaded || call.need == Need::Always)
            .map(|call| (call.name, call.number));
        listed.chain(OWN_CODE.iter().copied())
    }

    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64

    /// Installs the filter `filter` names on every thread of this process: `none` (only
    /// `PR_SET_NO_NEW_PRIVS`, which `strace` shows as the point from which calls count),
    /// `kill` (a call outside [`allowed`] kills the process), `errno` (it fails with `EPERM`)
    /// or `single-threaded` (as `kill` with only `Need::Always` allowed, and `Need::Threads`
    /// refused with `EPERM`); `refuse` takes calls out of the list.
    pub fn install(filter: &str, refuse: &[&str]) -> io::Result<()> {
        // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let otherwise = match filter {
            "none" => return Ok(()),
            "kill" | "single-threaded" => libc::SECCOMP_RET_KILL_PROCESS,
            "errno" => libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            _ => panic!("no filter {filter:?}"),
        };
        let stmt = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt,
            jf,
            k,
        };
        let load = |offset: usize| stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset as u32);
        let ret = |k: u32| stmt(libc::BPF_RET | libc::BPF_K, k);
        // A call of another architecture's numbering kills, whatever the filter.
        let mut program = vec![
            load(std::mem::offset_of!(libc::seccomp_data, arch)),
            jeq(AUDIT_ARCH, 1, 0),
            ret(libc::SECCOMP_RET_KILL_PROCESS),
            load(std::mem::offset_of!(libc::seccomp_data, nr)),
        ];
        let single_threaded = filter == "single-threaded";
        for (_, nr) in allowed(single_threaded).filter(|(name, _)| !refuse.contains(name)) {
            program.push(jeq(nr as u32, 0, 1));
            program.push(ret(libc::SECCOMP_RET_ALLOW));
        }
        if single_threaded {
            // All of them: glibc blocks signals (`rt_sigprocmask`) before it tries `clone3`.
            for call in SYSCALLS.iter().filter(|call| call.need == Need::Threads) {
                program.push(jeq(call.number as u32, 0, 1));
                program.push(ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32));
            }
        }
        program.push(ret(otherwise));
        let fprog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_mut_ptr(),
        };
        // SAFETY: `fprog` points at `program`, alive for the call, which the kernel copies.
        // TSYNC puts the filter on the threads started before too.
        let installed = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_TSYNC,
                &fprog,
            )
        };
        if installed != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
