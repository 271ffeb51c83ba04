//! `hot-path`: what one typed-ipc call costs each side in syscalls and heap allocations.
//!
//! ```text
//! cargo run -p ipc-bench --release --bin hot-path -- [--calls N] [--strace]
//! cargo run -p ipc-bench --release --bin hot-path -- --spin
//! ```
//!
//! Starts a worker (this binary again, through `typed_ipc::worker`), both pinned to the
//! first CPU this process may run on (CPU 0 unless `taskset` says otherwise),
//! and makes N calls (default 10,000) of each kind after a warm-up. Every process counts its
//! heap allocations with a counting global allocator; the server reports its count through the
//! interface. With `--strace` the whole run goes under `strace -ff -ttt` and the syscalls each
//! process made inside each measured window are counted too. Prints markdown.
//!
//! `--nix` compares, in one thread over a socketpair, a 64 B datagram with one fd sent and
//! received through nix 0.31 (`sendmsg` allocates its control buffer per call, `recvmsg`'s
//! `ScmRights` a `Vec` of fds) and through stack control buffers (what typed-ipc does).
//!
//! `--send` compares, in one thread over a socketpair, a 64 B datagram without fds (16 B
//! header + payload) sent with `sendmsg` and two iovecs (the floor's way) and with `send` of
//! one buffer (typed-ipc's way since the tenth session), each received with `recvmsg` of two
//! iovecs (header, payload); then `send` with a `recvmsg` of one iovec; and, for reference,
//! received with `recv` (which cannot take fds). Rounds of each way are
//! interleaved; prints the median and the 10th percentile of the rounds.
//!
//! After those, the async flavour's 64 B `echo`: a second worker serves `AsyncBench` on a
//! current-thread tokio runtime, and the client drives each call with `block_on`.
//!
//! `--spin` measures instead what `Socket::set_spin` buys and costs across CPUs (client on the
//! first CPU this process may run on, server on the second, spin set on both sides): latency
//! and CPU time per 64 B call, for calls back to back and for calls 1 ms apart.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[path = "../sys.rs"]
mod sys;

use ipc_bench::{
    AsyncBenchClient, AsyncBenchImpl, AsyncBenchServer, BenchClient, BenchImpl, BenchServer, cpu_ns,
};
use nix::sys::resource::UsageWho;
use typed_ipc::worker::{self, Worker};

/// Counts every allocation (`alloc`, `alloc_zeroed`, `realloc`) of this process.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.load(Ordering::Relaxed)
}

const WARM_UP: u64 = 1000;

/// The measured calls, in order.
const CASES: &[&str] = &[
    "ping(u64) -> u64",
    "echo(Vec<u8>) 0 B",
    "echo(Vec<u8>) 64 B",
    "echo_fd(Vec<u8>, OwnedFd) 64 B",
    "#[oneway] sink(Vec<u8>) 64 B",
];

/// The async case, measured after [`CASES`] against a worker of its own.
const ASYNC_CASE: &str = "async echo(Vec<u8>) 64 B";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--child") => child(),
        _ => parent(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hot-path: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Pins this process to the first CPU it may run on.
fn pin() -> Res<()> {
    Ok(ipc_bench::pin(ipc_bench::nth_allowed_cpu(0)?)?)
}

fn child() -> Res<()> {
    let cpu = match env_num("HOT_PATH_CPU") {
        Some(cpu) => cpu as usize,
        None => ipc_bench::nth_allowed_cpu(0)?,
    };
    ipc_bench::pin(cpu)?;
    if std::env::var_os("HOT_PATH_ASYNC").is_some() {
        return ipc_bench::current_thread_runtime()?.block_on(async {
            let connection = typed_ipc::tokio::worker::connection()?;
            AsyncBenchServer::new(AsyncBenchImpl::new(allocs))
                .serve(connection)
                .await?;
            Ok(())
        });
    }
    let connection = worker::connection()?;
    if let Some(us) = env_num("HOT_PATH_SPIN_US") {
        connection.socket().set_spin(Duration::from_micros(us));
    }
    BenchServer::new(BenchImpl::new(allocs)).serve(connection)?;
    Ok(())
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

fn parent(args: &[String]) -> Res<()> {
    let mut calls: u64 = 10_000;
    let mut strace = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--calls" => calls = it.next().ok_or("--calls needs a value")?.parse()?,
            "--strace" => strace = true,
            "--spin" => return spin_cost(),
            "--nix" => return nix_cmsg(),
            "--send" => return send_or_sendmsg(),
            _ => {
                return Err(format!(
                    "unknown argument {arg}; usage: hot-path [--calls N] [--strace]"
                )
                .into());
            }
        }
    }
    if strace {
        return under_strace(calls);
    }
    pin()?;
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("--child");
    let (mut worker, connection) = Worker::spawn(command)?;
    let client = BenchClient::new(connection);
    let payload = vec![0xa5u8; 64];
    let mut fd: Option<OwnedFd> = Some(File::open("/dev/null")?.into());
    println!(
        "| call ({calls} calls after {WARM_UP} warm-up) | client allocs/call | server allocs/call \
         | client context switches/call | server context switches/call |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (index, &name) in CASES.iter().enumerate() {
        let mut one = || -> Res<()> {
            match index {
                0 => {
                    client.ping(7)?;
                }
                1 => {
                    client.echo(Vec::new())?;
                }
                2 => {
                    client.echo(payload.clone())?;
                }
                3 => {
                    let reply = client.echo_fd(payload.clone(), fd.take().ok_or("no fd")?)?;
                    fd = Some(reply.fd);
                }
                _ => client.sink(payload.clone())?,
            }
            Ok(())
        };
        for _ in 0..WARM_UP {
            one()?;
        }
        let server_before = client.allocs()?;
        // Context switches are read outside the strace window: reading /proc is syscalls too.
        let (client_cs, server_cs) = (thread_switches(), process_switches(worker.id()));
        mark("begin", name);
        let before = allocs();
        for _ in 0..calls {
            one()?;
        }
        // A plain call (no allocation either side): after it, every oneway has been run, so
        // the server's work for this window is inside it.
        client.ping(0)?;
        let after = allocs();
        mark("end", name);
        let (client_cs, server_cs) = (
            thread_switches() - client_cs,
            process_switches(worker.id()) - server_cs,
        );
        let server_after = client.allocs()?; // After the oneways: they have all run by now.
        // One `allocs()` call sits inside the server's window: its reply and the next
        // request's receive. It allocates nothing (it is a `ping` with another number).
        print_row(
            name,
            calls,
            [after - before, server_after - server_before],
            [client_cs, server_cs],
        );
    }
    drop(client);
    worker.wait()?;
    async_echo(calls)
}

/// The async flavour's 64 B `echo`, against a worker serving [`ipc_bench::AsyncBench`] on a
/// current-thread runtime, each call driven with `block_on` as the benchmark drives it: one
/// more row of the same table.
fn async_echo(calls: u64) -> Res<()> {
    let runtime = ipc_bench::current_thread_runtime()?;
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("--child").env("HOT_PATH_ASYNC", "1");
    let (mut worker, connection) = {
        let _context = runtime.enter(); // the connection's tasks run on this runtime
        typed_ipc::tokio::worker::spawn(command)?
    };
    let client = AsyncBenchClient::new(connection);
    let payload = vec![0xa5u8; 64];
    let one = || runtime.block_on(client.echo(payload.clone()));
    for _ in 0..WARM_UP {
        one()?;
    }
    let server_before = runtime.block_on(client.allocs())?;
    let (client_cs, server_cs) = (thread_switches(), process_switches(worker.id()));
    mark("begin", ASYNC_CASE);
    let before = allocs();
    for _ in 0..calls {
        one()?;
    }
    let after = allocs();
    mark("end", ASYNC_CASE);
    let (client_cs, server_cs) = (
        thread_switches() - client_cs,
        process_switches(worker.id()) - server_cs,
    );
    // As above, the server's window holds one `allocs()` call besides the echoes: three
    // allocations (its task, its future, its received bytes), 0.0003 a call over 10,000.
    let server_after = runtime.block_on(client.allocs())?;
    print_row(
        ASYNC_CASE,
        calls,
        [after - before, server_after - server_before],
        [client_cs, server_cs],
    );
    drop(client);
    runtime.block_on(typed_ipc::tokio::worker::wait(&mut worker))?;
    Ok(())
}

/// One row of the table: allocations and context switches (client, server) per call.
fn print_row(name: &str, calls: u64, allocs: [u64; 2], switches: [i64; 2]) {
    let per_call = |n: f64| n / calls as f64;
    println!(
        "| `{name}` | {:.2} | {:.2} | {:.2} | {:.2} |",
        per_call(allocs[0] as f64),
        per_call(allocs[1] as f64),
        per_call(switches[0] as f64),
        per_call(switches[1] as f64)
    );
}

/// Writes a marker line to stderr with one `write(2)`, so the strace log can be cut at it.
/// Voluntary + involuntary context switches of the calling thread so far.
fn thread_switches() -> i64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_THREAD)
        .map(|u| u.voluntary_context_switches() + u.involuntary_context_switches())
        .unwrap_or(0)
}

/// Voluntary + involuntary context switches of every thread of process `pid` so far.
fn process_switches(pid: u32) -> i64 {
    let mut total = 0;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += n.trim().parse::<i64>().unwrap_or(0);
            }
        }
    }
    total
}

fn mark(what: &str, name: &str) {
    let line = format!("hot-path: {what} {name}\n");
    // SAFETY: writes a live buffer to fd 2.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

/// Re-runs this binary under `strace -ff -ttt` and counts, for every case, the syscalls each
/// process made between the client's begin and end markers.
fn under_strace(calls: u64) -> Res<()> {
    let dir = std::env::temp_dir().join(format!("hot-path-strace-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let prefix = dir.join("trace");
    let status = Command::new("strace")
        .arg("-ff")
        .arg("-ttt")
        .args(["-s", "256"])
        .arg("-o")
        .arg(&prefix)
        .arg(std::env::current_exe()?)
        .args(["--calls", &calls.to_string()])
        .status()
        .map_err(|e| format!("running strace (apt-get install strace): {e}"))?;
    if !status.success() {
        return Err(format!("traced run failed: {status}").into());
    }
    // One file per process: the client's holds the markers.
    let mut client = None;
    let mut others = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let text = std::fs::read_to_string(entry?.path())?;
        if text.contains("hot-path: begin") {
            client = Some(text);
        } else {
            others.push(text);
        }
    }
    let client = client.ok_or("no markers in the trace")?;
    println!("\n| call | side | syscalls/call | which (per call) |");
    println!("| --- | --- | ---: | --- |");
    for &name in CASES.iter().chain([&ASYNC_CASE]) {
        let window = window(&client, name).ok_or(format!("no markers for {name}"))?;
        // The server is the process that ran the most syscalls in the window besides the
        // client (the async case has a worker of its own).
        let server = others
            .iter()
            .max_by_key(|t| count(t, window).values().sum::<u64>())
            .ok_or("no server trace")?;
        for (side, text) in [("client", &client), ("server", server)] {
            let counts = count(text, window);
            let total: u64 = counts.values().sum();
            let which: Vec<String> = counts
                .iter()
                .map(|(k, v)| format!("{k} {:.2}", *v as f64 / calls as f64))
                .collect();
            println!(
                "| `{name}` | {side} | {:.2} | {} |",
                total as f64 / calls as f64,
                which.join(", ")
            );
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Timestamps of the begin and end markers of `name` in the client's trace.
fn window(client: &str, name: &str) -> Option<(f64, f64)> {
    let at = |what: &str| {
        let needle = format!("hot-path: {what} {name}");
        client
            .lines()
            .find(|l| l.contains(&needle))
            .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
    };
    Some((at("begin")?, at("end")?))
}

/// Syscalls by name strictly inside `(from, to)`, markers excluded; a call strace split into
/// "unfinished" and "resumed" halves counts once.
fn count(trace: &str, (from, to): (f64, f64)) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in trace.lines() {
        let mut parts = line.splitn(2, ' ');
        let (Some(t), Some(rest)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(t) = t.parse::<f64>() else { continue };
        if t <= from || t >= to || rest.starts_with("<...") || rest.starts_with("+++") {
            continue;
        }
        if rest.starts_with("---") {
            continue; // signals
        }
        if let Some(name) = rest.split('(').next() {
            *counts.entry(name.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// Spin bounds `--spin` compares, in microseconds (0 = off).
const SPINS: &[u64] = &[0, 5, 20, 50, 200];

/// `--spin`: latency and CPU per 64 B call across CPUs, for each spin bound.
fn spin_cost() -> Res<()> {
    // The worker's CPU: the second this process may run on (read before `pin` narrows it).
    let Ok(server_cpu) = ipc_bench::nth_allowed_cpu(1) else {
        return Err("--spin needs two CPUs".into());
    };
    println!("| spin | calls | median | p99 | client CPU/call | server CPU/call |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: |");
    for &us in SPINS {
        pin()?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("--child")
            .env("HOT_PATH_CPU", server_cpu.to_string())
            .env("HOT_PATH_SPIN_US", us.to_string());
        let (mut worker, connection) = Worker::spawn(command)?;
        connection.socket().set_spin(Duration::from_micros(us));
        let client = BenchClient::new(connection);
        let payload = vec![0xa5u8; 64];
        for (label, count, gap) in [
            ("back to back", 20_000, Duration::ZERO),
            ("1 ms apart", 500, Duration::from_millis(1)),
        ] {
            for _ in 0..200 {
                client.echo(payload.clone())?;
            }
            let mut times = Vec::with_capacity(count);
            let (c0, s0) = (cpu_ns(UsageWho::RUSAGE_THREAD), client.cpu_ns()?);
            for _ in 0..count {
                if !gap.is_zero() {
                    std::thread::sleep(gap);
                }
                let t = Instant::now();
                client.echo(payload.clone())?;
                times.push(t.elapsed());
            }
            let (c1, s1) = (cpu_ns(UsageWho::RUSAGE_THREAD), client.cpu_ns()?);
            times.sort();
            let at = |q: f64| times[((q * count as f64) as usize).min(count - 1)];
            let per = |a: u64, b: u64| Duration::from_nanos((b - a) / count as u64);
            println!(
                "| {} | {label} | {:.1?} | {:.1?} | {:.1?} | {:.1?} |",
                if us == 0 {
                    "off".to_string()
                } else {
                    format!("{us} µs")
                },
                at(0.5),
                at(0.99),
                per(c0, c1),
                per(s0, s1)
            );
        }
        drop(client);
        worker.wait()?;
    }
    Ok(())
}

/// `--nix`: one datagram (16 B header + 64 B, one fd) sent and received in one thread, through
/// nix and through stack control buffers; time and allocations per round.
fn nix_cmsg() -> Res<()> {
    use nix::sys::socket::{
        AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
        sendmsg, socketpair,
    };
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, RawFd};

    pin()?;
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let devnull = File::open("/dev/null")?;
    let header = [0u8; 16];
    let payload = [0xa5u8; 64];
    let rounds = 200_000u32;
    println!("| way ({rounds} rounds: send + receive + close) | time/round | allocs/round |");
    println!("| --- | ---: | ---: |");
    // Reused across rounds, as a careful nix user would.
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    for way in ["nix 0.31", "stack buffers (typed-ipc)"] {
        let mut one = || -> Res<()> {
            let mut h = [0u8; 16];
            let mut p = [0u8; 64];
            if way.starts_with("nix") {
                let raw = [devnull.as_raw_fd()];
                let iov = [IoSlice::new(&header), IoSlice::new(&payload)];
                sendmsg::<()>(
                    a.as_raw_fd(),
                    &iov,
                    &[ControlMessage::ScmRights(&raw)],
                    MsgFlags::empty(),
                    None,
                )?;
                let mut iov = [IoSliceMut::new(&mut h), IoSliceMut::new(&mut p)];
                let msg = recvmsg::<()>(
                    b.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )?;
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        for fd in fds {
                            // SAFETY: the kernel just installed this fd for us.
                            drop(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
            } else {
                let iov = [IoSlice::new(&header), IoSlice::new(&payload)];
                sys::send(a.as_fd(), &iov, Some(devnull.as_fd()))?;
                let mut iov = [IoSliceMut::new(&mut h), IoSliceMut::new(&mut p)];
                let (_, fd) = sys::recv(b.as_fd(), &mut iov)?;
                drop(fd.ok_or("no fd")?);
            }
            Ok(())
        };
        for _ in 0..10_000 {
            one()?;
        }
        let (t, before) = (Instant::now(), allocs());
        for _ in 0..rounds {
            one()?;
        }
        let (elapsed, after) = (t.elapsed(), allocs());
        println!(
            "| {way} | {:.0} ns | {:.2} |",
            elapsed.as_nanos() as f64 / f64::from(rounds),
            (after - before) as f64 / f64::from(rounds)
        );
    }
    Ok(())
}

/// `--send`: what the kernel charges for `sendmsg` over `send`, and `recvmsg` over `recv`,
/// for one 64 B datagram without fds (16 B header + payload), in one thread.
fn send_or_sendmsg() -> Res<()> {
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

    /// `send(2)` of `buf`, as typed-ipc sends a message without fds.
    fn send_plain(sock: BorrowedFd<'_>, buf: &[u8]) -> Res<()> {
        // SAFETY: `buf` is live and only read for the length of the call.
        let n = unsafe { libc::send(sock.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    pin()?;
    let (a, b) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )?;
    let framed = [0xa5u8; 16 + 64];
    let (header, payload) = framed.split_at(16);
    let ways = [
        "`sendmsg` (two iovecs) + `recvmsg` (two iovecs: the floor)",
        "`send` (one buffer) + `recvmsg` (two iovecs: header, payload)",
        "`send` + `recvmsg` (one iovec)",
        "`send` + `recv` (no fds can be received)",
    ];
    let (rounds, per_round) = (31, 20_000u32);
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    let mut buf = [0u8; 256];
    for round in 0..rounds {
        for k in 0..ways.len() {
            let way = (k + round) % ways.len(); // each way first in turn
            let t = Instant::now();
            for _ in 0..per_round {
                if way == 0 {
                    sys::send(
                        a.as_fd(),
                        &[IoSlice::new(header), IoSlice::new(payload)],
                        None,
                    )?;
                } else {
                    send_plain(a.as_fd(), &framed)?;
                }
                if way < 2 {
                    let (head, rest) = buf.split_at_mut(16);
                    sys::recv(
                        b.as_fd(),
                        &mut [IoSliceMut::new(head), IoSliceMut::new(rest)],
                    )?;
                } else if way == 2 {
                    sys::recv(b.as_fd(), &mut [IoSliceMut::new(&mut buf)])?;
                } else {
                    // SAFETY: `buf` is live and writable for the length of the call.
                    let n =
                        unsafe { libc::recv(b.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                    if n < 0 {
                        return Err(std::io::Error::last_os_error().into());
                    }
                }
            }
            times[way].push(t.elapsed().as_nanos() as f64 / f64::from(per_round));
        }
    }
    println!("| way ({rounds} rounds of {per_round}: send + receive) | median | p10 |");
    println!("| --- | ---: | ---: |");
    for (way, mut t) in ways.iter().zip(times) {
        t.sort_by(f64::total_cmp);
        println!(
            "| {way} | {:.0} ns | {:.0} ns |",
            t[t.len() / 2],
            t[t.len() / 10]
        );
    }
    Ok(())
}
