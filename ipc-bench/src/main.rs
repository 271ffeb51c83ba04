//! `ipc-bench`: cross-process round trips of typed-ipc's peers against a bare-socket
//! floor, with the server in a real child process.
//!
//! ```text
//! cargo run -p ipc-bench --release -- [--quick] [--out DIR] [--only a,b] [--pass same|cross]
//! ```
//!
//! The table always goes to stdout; `--out DIR` also writes `DIR/benchmarks.md` and
//! `DIR/benchmarks.svg`. The harness re-executes itself as
//! `ipc-bench --serve <system> <cpu> <arg>` to start each server.

mod floor;
mod floor_async;
mod harness;
mod memcpy;
mod peers;
mod report;
mod sys;
mod system;
mod typed;
mod typed_async;

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use crate::harness::{Measurement, Plan, REPETITIONS};
use crate::peers::ipc_channel::{IpcChannel, Mode};
use crate::report::{Cpu, Machine, Pass, Row};
use crate::system::{Client, Kind, Launcher, System};
use crate::typed::{Flavor, TypedIpc};
use crate::typed_async::TypedIpcAsync;

/// Every system, in report order. Adding one is one line here plus its module.
static SYSTEMS: &[&dyn System] = &[
    &floor::Floor {
        with_fd: false,
        serde: false,
    },
    &floor::Floor {
        with_fd: true,
        serde: false,
    },
    &floor::Floor {
        with_fd: false,
        serde: true,
    },
    &floor_async::FloorAsync,
    &floor::FloorMemfd,
    &memcpy::Memcpy,
    &peers::tarpc::Tarpc,
    &IpcChannel { mode: Mode::Typed },
    &IpcChannel {
        mode: Mode::ReplyPerCall,
    },
    &IpcChannel { mode: Mode::Bytes },
    &IpcChannel {
        mode: Mode::SharedMemory,
    },
    &TypedIpc {
        flavor: Flavor::Plain,
    },
    &TypedIpc {
        flavor: Flavor::Region,
    },
    &TypedIpc {
        flavor: Flavor::Lent,
    },
    &TypedIpc { flavor: Flavor::Fd },
    &TypedIpcAsync,
    &TypedIpc {
        flavor: Flavor::Oneway,
    },
    &TypedIpc {
        flavor: Flavor::Spin,
    },
    &TypedIpc {
        flavor: Flavor::Memfd,
    },
    &TypedIpc {
        flavor: Flavor::Shared,
    },
    &TypedIpc {
        flavor: Flavor::SharedRegion,
    },
];

/// The passes on the CPUs this process may run on (`allowed`, read before any pinning): both
/// processes on the first allowed CPU (primary: no cross-CPU wake-ups), then the client on
/// the first and the server on the second. With one CPU allowed there is no cross-CPU pass.
fn passes(allowed: &[usize]) -> Vec<Pass> {
    let mut cpus = allowed.to_vec();
    cpus.sort_unstable();
    cpus.dedup();
    let pass = |label, client_cpu, server_cpu| Pass {
        label,
        client_cpu,
        server_cpu,
    };
    match cpus[..] {
        [] => Vec::new(),
        [cpu] => vec![pass("same CPU", cpu, cpu)],
        [first, second, ..] => vec![
            pass("same CPU", first, first),
            pass("cross CPU", first, second),
        ],
    }
}

/// Command-line options of a harness run.
struct Args {
    quick: bool,
    out: Option<PathBuf>,
    only: Option<Vec<String>>,
    pass: Option<String>,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let result = match argv.first().map(String::as_str) {
        Some("--serve") => serve(&argv[1..]),
        _ => parse(&argv).and_then(run),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ipc-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(argv: &[String]) -> io::Result<Args> {
    let mut args = Args {
        quick: false,
        out: None,
        only: None,
        pass: None,
    };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| io::Error::other(format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--out" => args.out = Some(value()?.into()),
            "--only" => args.only = Some(value()?.split(',').map(str::to_owned).collect()),
            "--pass" => args.pass = Some(value()?),
            _ => {
                return Err(io::Error::other(format!(
                    "unknown argument {arg}\nusage: ipc-bench [--quick] [--out DIR] [--only a,b] [--pass same|cross]"
                )));
            }
        }
    }
    Ok(args)
}

/// Child side: `--serve <system> <cpu> <arg>`.
fn serve(argv: &[String]) -> io::Result<bool> {
    let [name, cpu, arg] = argv else {
        return Err(io::Error::other("usage: --serve <system> <cpu> <arg>"));
    };
    let system = SYSTEMS
        .iter()
        .find(|s| s.name() == name)
        .ok_or_else(|| io::Error::other(format!("no system {name}")))?;
    ipc_bench::pin(cpu.parse().map_err(io::Error::other)?)?;
    system
        .serve(arg)
        .map_err(|e| io::Error::other(format!("{name} server: {e}")))?;
    Ok(true)
}

/// Harness side: every pass, every selected system, then the report.
fn run(args: Args) -> io::Result<bool> {
    // Before pinning narrows the CPUs this process may use.
    let machine = Machine::probe(args.quick)?;
    if let Some(note) = machine.no_cross_pass() {
        eprintln!("ipc-bench: no cross-CPU pass: {note}");
    }
    let plan = if args.quick { Plan::QUICK } else { Plan::FULL };
    let passes: Vec<Pass> = passes(&machine.allowed)
        .into_iter()
        .filter(|p| {
            args.pass
                .as_ref()
                .is_none_or(|want| p.label.starts_with(want.as_str()))
        })
        .collect();
    let selected = |s: &&&dyn System| {
        args.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|n| n == s.name()))
    };
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut ok = true;
    for (index, pass) in passes.iter().enumerate() {
        ipc_bench::pin(pass.client_cpu)?;
        let same_cpu = pass.client_cpu == pass.server_cpu;
        let systems: Vec<&dyn System> = SYSTEMS
            .iter()
            .filter(selected)
            .filter(|s| !(same_cpu && s.cross_cpu_only()))
            .copied()
            .collect();
        ok &= run_pass(&systems, index, pass, &plan, &mut rows);
    }
    let elapsed = started.elapsed();
    let markdown = report::markdown(&machine, &passes, &rows, elapsed);
    println!("{markdown}");
    if let Some(dir) = args.out {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("benchmarks.md"), &markdown)?;
        std::fs::write(dir.join("benchmarks.svg"), report::svg(&passes, &rows))?;
        eprintln!("ipc-bench: wrote {}/benchmarks.{{md,svg}}", dir.display());
    }
    eprintln!("ipc-bench: {:.1} s", elapsed.as_secs_f64());
    Ok(ok)
}

/// A system being measured in a pass: its server, its client, and its measurement of the
/// current cell.
struct Live<'a> {
    system: &'a dyn System,
    launcher: Launcher,
    client: Box<dyn Client>,
    measurement: Option<Measurement>,
    /// CPU time (client thread, server) spent in this cell's repetitions, and their calls.
    cpu: Option<(u64, u64)>,
    calls: usize,
}

impl Live<'_> {
    fn fail(&mut self, pass: &Pass, e: io::Error) {
        eprintln!("ipc-bench: {} ({}): {e}", self.system.name(), pass.label);
        self.measurement = None;
    }
}

/// Measures every workload and size of every system in one pass. All servers run at once, and
/// each cell's repetitions go round the systems in turn (floor, then each other system, three
/// times), so the ratios compare figures taken seconds apart. Returns whether all went well.
fn run_pass(
    systems: &[&dyn System],
    pass_index: usize,
    pass: &Pass,
    plan: &Plan,
    rows: &mut Vec<Row>,
) -> bool {
    let mut ok = true;
    let mut live: Vec<Live> = Vec::new();
    for &system in systems {
        let mut launcher = Launcher::new(system.name(), pass.server_cpu);
        match system.start(&mut launcher) {
            Ok(client) => live.push(Live {
                system,
                launcher,
                client,
                measurement: None,
                cpu: None,
                calls: 0,
            }),
            Err(e) => {
                eprintln!("ipc-bench: {} ({}): {e}", system.name(), pass.label);
                let _ = launcher.reap();
                ok = false;
            }
        }
    }
    let mut broken = vec![false; live.len()];
    for kind in [Kind::Small, Kind::Bulk] {
        for &size in kind.sizes() {
            let runs = |l: &Live| l.system.kinds().contains(&kind);
            for (l, broken) in live.iter_mut().zip(&mut broken) {
                if *broken || !runs(l) {
                    continue;
                }
                let client = &mut l.client;
                match Measurement::warm_up(plan, || client.call(kind, size)) {
                    Ok(m) => (l.measurement, l.cpu, l.calls) = (Some(m), Some((0, 0)), 0),
                    Err(e) => {
                        l.fail(pass, e);
                        *broken = true;
                    }
                }
            }
            for _ in 0..REPETITIONS {
                for (l, broken) in live.iter_mut().zip(&mut broken) {
                    let Some(m) = l.measurement.as_mut() else {
                        continue;
                    };
                    let before = l.client.cpu_ns();
                    let client = &mut l.client;
                    match m.repetition(|| client.call(kind, size)) {
                        Ok(calls) => l.calls += calls,
                        Err(e) => {
                            l.fail(pass, e);
                            *broken = true;
                            continue;
                        }
                    }
                    l.cpu = match (l.cpu, before, l.client.cpu_ns()) {
                        (Some((c, s)), Some((c0, s0)), Some((c1, s1))) => {
                            Some((c + c1.saturating_sub(c0), s + s1.saturating_sub(s0)))
                        }
                        _ => None,
                    };
                }
            }
            for l in live.iter_mut() {
                let Some(m) = l.measurement.take() else {
                    continue;
                };
                let stats = m.stats();
                eprintln!(
                    "{:<10} {:<28} {:>7} {:>10}",
                    pass.label,
                    l.system.name(),
                    report::fmt_size(size),
                    report::fmt_ns(stats.median)
                );
                let calls = l.calls.max(1) as f64;
                rows.push(Row {
                    pass: pass_index,
                    system: l.system.name(),
                    kind,
                    size,
                    stats,
                    cpu: l.cpu.map(|(c, s)| Cpu {
                        client: c as f64 / calls,
                        server: s as f64 / calls,
                    }),
                });
            }
        }
    }
    ok &= !broken.contains(&true);
    for mut l in live {
        drop(l.client); // Closing the connection is what tells the server to exit.
        if let Err(e) = l.launcher.reap() {
            eprintln!("ipc-bench: {} ({}): {e}", l.system.name(), pass.label);
            ok = false;
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (label, client CPU, server CPU) of each pass.
    fn cpus(allowed: &[usize]) -> Vec<(&'static str, usize, usize)> {
        passes(allowed)
            .iter()
            .map(|p| (p.label, p.client_cpu, p.server_cpu))
            .collect()
    }

    #[test]
    fn passes_use_the_first_two_allowed_cpus() {
        let both = [("same CPU", 0, 0), ("cross CPU", 0, 1)];
        assert_eq!(cpus(&[0, 1]), both);
        assert_eq!(cpus(&[0, 1, 2, 3]), both);
        assert_eq!(
            cpus(&[1, 0]),
            both,
            "in CPU order, whatever the set's order"
        );
        assert_eq!(cpus(&[2, 3, 5]), [("same CPU", 2, 2), ("cross CPU", 2, 3)]);
        assert_eq!(cpus(&[1, 7]), [("same CPU", 1, 1), ("cross CPU", 1, 7)]);
    }

    #[test]
    fn one_allowed_cpu_has_no_cross_pass() {
        assert_eq!(cpus(&[1]), [("same CPU", 1, 1)]);
        assert_eq!(cpus(&[3, 3]), [("same CPU", 3, 3)]);
        assert_eq!(cpus(&[]), []);
    }
}
