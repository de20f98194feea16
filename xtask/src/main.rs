//! Developer tasks for Portcullis, run as `cargo xtask <task>`:
//! `setup`, `test`, `build`, `demo`, `bench tcp|pg|ssh|http|mcp|idle|policy|audit`, `fuzz`, `soak`,
//! `compat`.
#![warn(missing_docs)]

mod bench;
mod bench_client;
mod bench_fleet;
mod bench_http;
mod bench_idle;
mod bench_mcp;
mod bench_pg;
mod bench_ssh;
mod ci;
mod compat;
mod demo;
mod demo_mcp;
mod fuzz;
mod session;
mod setup;
mod soak;
mod util;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Portcullis developer tasks.
#[derive(Parser, Debug)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Portcullis developer tasks"
)]
struct Cli {
    /// The task to run.
    #[command(subcommand)]
    task: Task,
}

/// The tasks.
#[derive(Subcommand, Debug)]
enum Task {
    /// Install what this machine needs (Debian packages, nightly rust-src,
    /// bpf-linker, bpffs). Root only; fast when already done.
    Setup,
    /// Setup, then fmt check, build, clippy and the workspace tests.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Setup, then build the release daemon (target/release/portcullis).
    Build,
    /// Show a tagged process's connection being intercepted.
    Demo {
        /// Tear down and exit after the scenario instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
        /// Use this portcullis binary instead of building the release one.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Benchmarks: `tcp`, `pg`, `ssh`, `http` (direct vs. through Portcullis), `policy`, `audit`.
    Bench {
        /// What to benchmark.
        #[command(subcommand)]
        target: BenchTarget,
    },
    /// The benchmark's load generator (used by `bench`).
    #[command(hide = true)]
    BenchClient(bench_client::ClientArgs),
    /// Fuzz on nightly with cargo-fuzz (installed when missing): one
    /// target or all of them (`fuzz/fuzz_targets/`), `--time` seconds each.
    Fuzz {
        /// Target name (default: every target).
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Extra libFuzzer arguments (after `--`), e.g. a crash file.
        #[arg(last = true)]
        libfuzzer_args: Vec<String>,
    },
    /// Load: 1,000 concurrent sessions across 20 tagged cgroups for 60 s
    /// (allowed, denied and held commands); fds, RSS, p99. Root only.
    Soak(soak::SoakArgs),
    /// The soak's load generator (used by `soak`).
    #[command(hide = true)]
    SoakClient(soak::SoakClientArgs),
    /// Compatibility: real clients and SQLAlchemy's dialect suite, directly
    /// and through Portcullis in the same run; fails on any difference.
    /// Root only; about half an hour.
    Compat {
        /// Only the `compat_` e2e tests matching this filter.
        filter: Option<String>,
    },
}

/// Benchmark targets.
#[derive(Subcommand, Debug)]
enum BenchTarget {
    /// MCP tool calls: calls/s and added p50 per call through Portcullis
    /// vs. direct, and a streamed answer's first-event delay, with the
    /// reference server `server-everything` (root).
    Mcp {
        /// Sequential tool calls per path (bounded by `--seconds`).
        #[arg(long, default_value_t = 2000)]
        calls: u64,
        /// Time bound per path, in seconds.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Use this portcullis binary instead of building the release one.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Plain TCP: connection setup rate, bulk throughput, round-trip latency.
    Tcp {
        /// Sequential connections for the setup-rate run (bounded by 20 s).
        #[arg(long, default_value_t = 2000)]
        connections: u64,
        /// Bytes for the bulk run (bounded by 30 s).
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Use this portcullis binary instead of building the release one.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// HTTP with wrk: direct vs. through Portcullis vs. nginx as a reverse
    /// proxy, requests/s ratio and p99 (root).
    Http {
        /// Seconds per path.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// wrk connections.
        #[arg(long, default_value_t = 32)]
        connections: u64,
        /// wrk threads.
        #[arg(long, default_value_t = 2)]
        threads: u64,
        /// Use this portcullis binary instead of building the release one.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// The daemon's connection workers (default: the daemon's own, one
        /// per core).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// PostgreSQL: pgbench -S (simple, extended, prepared) and TPC-B-like at 1, 8, 32 clients: direct,
    /// through Portcullis, with masking, through pgbouncer (session mode).
    Pg {
        /// Seconds per pgbench run (48 runs).
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// pgbench scale factor.
        #[arg(long, default_value_t = 10)]
        scale: u32,
        /// Use this portcullis binary instead of building the release one.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Only these client counts (comma-separated; default 1,8,32).
        #[arg(long, value_delimiter = ',')]
        clients: Vec<u32>,
        /// Only these workloads (comma-separated: simple, extended,
        /// prepared, tpcb; default all).
        #[arg(long, value_delimiter = ',')]
        modes: Vec<String>,
        /// The daemon's connection workers (default: the daemon's own, one
        /// per core).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// SSH: download and upload throughput, exec round trips, connect+exec.
    ///
    /// OpenSSH `ssh` and paramiko against a local OpenSSH sshd, direct and
    /// through Portcullis (the daemon holding the key; policy, audit,
    /// recording and masking on).
    Ssh {
        /// Bytes each way for the transfers.
        #[arg(long, default_value_t = 200 << 20)]
        bytes: u64,
        /// Exec round trips on one connection.
        #[arg(long, default_value_t = 200)]
        execs: u64,
        /// The resource's `record` level (`metadata` records SSH output).
        #[arg(long, default_value = "metadata")]
        record: String,
        /// Use this portcullis binary instead of building the release one.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Idle memory: daemon RSS per idle PostgreSQL, SSH and HTTP session.
    ///
    /// Opens `--sessions` idle SSH and HTTP sessions and `--pg-sessions`
    /// PostgreSQL ones (each holds a server backend, so fewer by default)
    /// through Portcullis, one protocol at a time, and reports the daemon's
    /// RSS growth per session against the target (under 50 KiB). Root.
    Idle {
        /// Idle SSH and HTTP sessions (each protocol).
        #[arg(long, default_value_t = 10_000)]
        sessions: u64,
        /// Idle PostgreSQL sessions (each one a server backend process).
        #[arg(long, default_value_t = 1_000)]
        pg_sessions: u64,
        /// Measure only these protocols (comma-separated: postgres,ssh,http).
        #[arg(long, value_delimiter = ',', default_values_t = ["postgres".to_string(), "ssh".to_string(), "http".to_string()])]
        only: Vec<String>,
        /// Seconds the sessions stay idle, all open, before RSS is read
        /// (past the daemon's keepalive rounds; at most 900).
        #[arg(long, default_value_t = 0)]
        hold: u64,
        /// Use this portcullis binary instead of building the release one.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Policy decision and reload time: 500 rules vs. 1; lookups.
    ///
    /// Decision time (p50/p99) and reload time of a generated set of 100
    /// resources and 500 rules, next to a one-rule set, and destination
    /// lookups. Runs the `policy_bench` example (release); no root needed.
    Policy {
        /// Passed to the example, e.g. `--json`, `--decisions N`
        /// (`cargo xtask bench policy -- --help` lists them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Audit log: record() latency, events/s, verify time.
    ///
    /// Events per second and record() latency with group commit and with
    /// fsync=always, and verify time. Runs the `audit_bench` example
    /// (release) on a log under /tmp; no root needed.
    Audit {
        /// Passed to the example, e.g. `--json`, `--dir PATH`
        /// (`cargo xtask bench audit -- --help` lists them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fleet: approval propagation p50/p99 between two nodes, audit
    /// shipping events/s. Starts its own PostgreSQL store; needs root.
    Fleet {
        /// Seconds per pgbench run of the store-cost comparison (without
        /// and with `[fleet]`); 0 skips it.
        #[arg(long, default_value_t = 5)]
        pg_seconds: u32,
        /// Only the store-cost comparison (skip propagation and shipping).
        #[arg(long)]
        pg_only: bool,
        /// Use this portcullis binary instead of building the release one.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Passed to the example, e.g. `--json`, `--approvals N`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one task.
fn run(task: Task) -> Result<()> {
    if let Task::BenchClient(args) = &task {
        return bench_client::run(args);
    }
    if let Task::SoakClient(args) = &task {
        return soak::client(args);
    }
    util::ensure_cargo_bin_on_path()?;
    match task {
        Task::Setup => setup::run_setup(),
        Task::Test { cargo_args } => ci::test(&cargo_args),
        Task::Build => ci::build_release().map(|bin| println!("built {}", bin.display())),
        Task::Demo { once, binary } => demo::run(once, binary),
        Task::Bench {
            target:
                BenchTarget::Tcp {
                    connections,
                    bytes,
                    binary,
                },
        } => bench::tcp(connections, bytes, binary),
        Task::Bench {
            target:
                BenchTarget::Http {
                    seconds,
                    connections,
                    threads,
                    binary,
                    workers,
                },
        } => bench_http::http(seconds, connections, threads, binary, workers),
        Task::Bench {
            target:
                BenchTarget::Pg {
                    seconds,
                    scale,
                    binary,
                    clients,
                    modes,
                    workers,
                },
        } => bench_pg::run(seconds, scale, binary, &clients, &modes, workers),
        Task::Bench {
            target:
                BenchTarget::Ssh {
                    bytes,
                    execs,
                    record,
                    binary,
                },
        } => bench_ssh::ssh(bytes, execs, &record, binary),
        Task::Bench {
            target:
                BenchTarget::Idle {
                    sessions,
                    pg_sessions,
                    only,
                    hold,
                    binary,
                },
        } => bench_idle::idle(sessions, pg_sessions, &only, hold, binary),
        Task::Bench {
            target:
                BenchTarget::Mcp {
                    calls,
                    seconds,
                    binary,
                },
        } => bench_mcp::mcp(calls, seconds, binary),
        Task::Bench {
            target: BenchTarget::Policy { args },
        } => bench::example("policy_bench", &args),
        Task::Bench {
            target: BenchTarget::Audit { args },
        } => bench::example("audit_bench", &args),
        Task::Bench {
            target:
                BenchTarget::Fleet {
                    args,
                    pg_seconds,
                    pg_only,
                    binary,
                },
        } => bench_fleet::run(&args, pg_seconds, pg_only, binary),
        Task::Fuzz {
            target,
            time,
            libfuzzer_args,
        } => fuzz::run_fuzz(target, time, &libfuzzer_args),
        Task::Soak(args) => soak::run(&args),
        Task::Compat { filter } => compat::run(filter),
        Task::BenchClient(_) | Task::SoakClient(_) => Ok(()),
    }
}
