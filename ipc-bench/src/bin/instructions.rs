//! `instructions`: user-space instructions one typed-ipc call costs each side, counted by
//! callgrind (needs `valgrind`).
//!
//! ```text
//! cargo run -p ipc-bench --release --bin instructions -- [--len BYTES]
//! cargo run -p ipc-bench --release --bin instructions --features echo-fd   # one fd each way
//! cargo run -p ipc-bench --release --bin instructions --features echo-async   # async flavour
//! ```
//!
//! Runs this binary twice under `valgrind --tool=callgrind --trace-children=yes`: a client
//! that starts a worker (this binary again, through `typed_ipc::worker`) and makes 2,000, then
//! 4,000, `echo(Vec<u8>)` calls of `--len` bytes (default 64), each with a fresh `Vec` as the
//! benchmark's client does. Per call and per side it prints the difference of the two runs'
//! totals divided by 2,000, so start-up and shutdown cancel out. Both processes are pinned to
//! the first CPU this process may run on. Instruction counts are exact and repeatable, unlike times on these VMs; they are
//! how `docs/hot-path.md` tracks the hot path. They measure the fixed cost of a call: callgrind
//! counts a `rep movsb` once per byte, so copies through the lane (1 KiB and up) look far
//! dearer than they run.
//!
//! The async flavour's counts (`--features echo-async`) are less exact: how often tokio's
//! reactor polls and parks depends on how the two processes interleave, and glibc's
//! `posix_memalign` (every tokio task is allocated aligned) takes paths that depend on the
//! heap's state, so a run's server count can differ from the next by a few hundred.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

#[cfg(feature = "echo-async")]
use ipc_bench::{AsyncBenchClient, AsyncBenchImpl, AsyncBenchServer};
#[cfg(not(feature = "echo-async"))]
use ipc_bench::{BenchClient, BenchImpl, BenchServer};
#[cfg(not(feature = "echo-async"))]
use typed_ipc::worker::{self, Worker};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The two runs; their difference is what the extra calls cost.
const RUNS: [u64; 2] = [2_000, 4_000];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--server") => server(),
        Some("--client") => client(&args[1..]),
        _ => parent(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("instructions: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Pins this process to the first CPU it may run on.
fn pin() -> Res<()> {
    Ok(ipc_bench::pin(ipc_bench::nth_allowed_cpu(0)?)?)
}

#[cfg(not(feature = "echo-async"))]
fn server() -> Res<()> {
    pin()?;
    BenchServer::new(BenchImpl::new(|| 0)).serve(worker::connection()?)?;
    Ok(())
}

/// The async flavour's server, on a current-thread runtime as in the benchmark.
#[cfg(feature = "echo-async")]
fn server() -> Res<()> {
    pin()?;
    ipc_bench::current_thread_runtime()?.block_on(async {
        let connection = typed_ipc::tokio::worker::connection()?;
        AsyncBenchServer::new(AsyncBenchImpl::new(|| 0))
            .serve(connection)
            .await?;
        Ok(())
    })
}

/// `--client LEN CALLS`: the measured process.
fn client(args: &[String]) -> Res<()> {
    let [len, calls] = args else {
        return Err("usage: --client LEN CALLS".into());
    };
    let (len, calls): (usize, u64) = (len.parse()?, calls.parse()?);
    pin()?;
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("--server");
    make_calls(command, len, calls)
}

/// Starts the worker and makes `calls` calls of `len` bytes.
#[cfg(not(feature = "echo-async"))]
fn make_calls(command: Command, len: usize, calls: u64) -> Res<()> {
    let (mut child, connection) = Worker::spawn(command)?;
    let client = BenchClient::new(connection);
    let payload = vec![0xa5; len];
    #[cfg(not(feature = "echo-fd"))]
    for _ in 0..calls {
        let back = client.echo(&payload)?;
        if back.len() != len {
            return Err(format!("echo returned {} bytes, sent {len}", back.len()).into());
        }
    }
    #[cfg(feature = "echo-fd")]
    {
        let mut fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null")?.into();
        for _ in 0..calls {
            let back = client.echo_fd(&payload, fd)?;
            if back.data.len() != len {
                return Err(
                    format!("echo_fd returned {} bytes, sent {len}", back.data.len()).into(),
                );
            }
            fd = back.fd; // the fd goes round and round: one open fd, as in the benchmark
        }
    }
    drop(client);
    child.wait()?;
    Ok(())
}

/// Starts the worker and makes `calls` async calls of `len` bytes, each through `block_on`
/// on a current-thread runtime, as the benchmark's `typed-ipc/async` client does.
#[cfg(feature = "echo-async")]
fn make_calls(command: Command, len: usize, calls: u64) -> Res<()> {
    let runtime = ipc_bench::current_thread_runtime()?;
    let (mut child, connection) = {
        let _context = runtime.enter(); // the connection registers with this runtime
        typed_ipc::tokio::worker::spawn(command)?
    };
    let client = AsyncBenchClient::new(connection);
    let payload = vec![0xa5; len];
    for _ in 0..calls {
        let back = runtime.block_on(client.echo(&payload))?;
        if back.len() != len {
            return Err(format!("echo returned {} bytes, sent {len}", back.len()).into());
        }
    }
    drop(client);
    child.wait()?; // blocking: the async `wait` would need the runtime's timers
    Ok(())
}

fn parent(args: &[String]) -> Res<()> {
    let mut len: usize = 64;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--len" => len = it.next().ok_or("--len needs a value")?.parse()?,
            _ => {
                return Err(
                    format!("unknown argument {arg}; usage: instructions [--len BYTES]").into(),
                );
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("ipc-bench-instructions-{}", std::process::id()));
    let mut totals = Vec::new();
    for calls in RUNS {
        let out = dir.join(calls.to_string());
        std::fs::create_dir_all(&out)?;
        // Valgrind's stderr only matters if the run fails: it warns about every `pidfd_open`,
        // which it does not know (the worker falls back without it).
        let run = Command::new("valgrind")
            .args(["--tool=callgrind", "--trace-children=yes", "-q"])
            .arg(format!(
                "--callgrind-out-file={}/callgrind.out.%p",
                out.display()
            ))
            .arg(std::env::current_exe()?)
            .args(["--client", &len.to_string(), &calls.to_string()])
            .output()
            .map_err(|e| format!("running valgrind (is it installed?): {e}"))?;
        if !run.status.success() {
            eprint!("{}", String::from_utf8_lossy(&run.stderr));
            return Err(format!("valgrind exited with {}", run.status).into());
        }
        totals.push(read_totals(&out)?);
    }
    std::fs::remove_dir_all(&dir)?;
    let per_call =
        |side: usize| (totals[1][side] - totals[0][side]) as f64 / (RUNS[1] - RUNS[0]) as f64;
    let call = if cfg!(feature = "echo-async") {
        "async echo(Vec<u8>)" // takes precedence over `echo-fd`, as in `make_calls`
    } else if cfg!(feature = "echo-fd") {
        "echo_fd(Vec<u8>, OwnedFd)"
    } else {
        "echo(Vec<u8>)"
    };
    println!("| `{call}` {len} B | client | server |");
    println!("| --- | ---: | ---: |");
    println!(
        "| instructions per call | {:.0} | {:.0} |",
        per_call(0),
        per_call(1)
    );
    Ok(())
}

/// The total instructions of the client and of the server, from the callgrind files in
/// `dir` (each names the command it profiled).
fn read_totals(dir: &Path) -> Res<[u64; 2]> {
    let mut totals = [None, None];
    for entry in std::fs::read_dir(dir)? {
        let path: PathBuf = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        let side = match text.lines().find_map(|l| l.strip_prefix("cmd:")) {
            Some(cmd) if cmd.contains("--server") => 1,
            Some(cmd) if cmd.contains("--client") => 0,
            _ => continue,
        };
        let total = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("totals:")
                    .or_else(|| l.strip_prefix("summary:"))
            })
            .ok_or_else(|| format!("no totals in {}", path.display()))?
            .trim()
            .parse::<u64>()?;
        totals[side] = Some(total);
    }
    match totals {
        [Some(client), Some(server)] => Ok([client, server]),
        _ => Err(format!(
            "expected a client and a server profile in {}",
            dir.display()
        )
        .into()),
    }
}
