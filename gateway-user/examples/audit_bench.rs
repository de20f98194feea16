//! Audit log benchmark (`cargo xtask bench audit`): events per second and the
//! latency `AuditLog::record` adds to every command, with group commit
//! (`FsyncMode::Interval`, 1, 8 and 64 concurrent recorders) and with an
//! fdatasync per batch (`FsyncMode::Always`, 1 and 8 recorders), then the
//! time `verify` takes over each resulting log. Prints a table, or with
//! `--json` one JSON object.
//!
//! Every run writes a fresh log in its own directory under `--dir` (default
//! `/tmp`; the file system it is on is printed, since fsync costs depend on
//! it) and removes it afterwards unless `--keep`; the file system is synced
//! before each run. Counts and time are both bounded. The number that matters for the data path is the `record()`
//! latency: a handler records each command before forwarding it.

mod bench_common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use bench_common::{nanos, Machine, Summary};
use clap::Parser;
use portcullis::{
    audit::{load_public_key, verify, AuditConfig, AuditEvent, AuditLog, FsyncMode, IdentityRef},
    workers::Workers,
};
use serde::Serialize;
use serde_json::json;

/// Target for `record()` p50 with group commit (1 recorder), microseconds:
/// a fifth of the 50 µs a PostgreSQL statement may add in all
/// (DESIGN.md, "Performance targets").
const RECORD_P50_TARGET_US: f64 = 10.0;
/// Target for `record()` p99 with group commit (1 and 8 recorders),
/// microseconds: the tail stays within the whole per-statement budget.
const RECORD_P99_TARGET_US: f64 = 50.0;

/// Events recorded (sequentially, untimed) before each timed run.
const WARMUP_EVENTS: u64 = 200;

/// Audit log benchmark: record() throughput and latency, verify time.
#[derive(Parser, Debug)]
#[command(name = "audit_bench")]
struct Args {
    /// Events per group-commit (interval) run.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Events per fsync=always run.
    #[arg(long, default_value_t = 2_000)]
    always_events: u64,
    /// Time bound of each run, seconds.
    #[arg(long, default_value_t = 20.0)]
    time_limit: f64,
    /// Group-commit interval, milliseconds (the daemon's default is 5).
    #[arg(long, default_value_t = 5)]
    interval_ms: u64,
    /// Where the logs are written (a directory per run is made inside).
    #[arg(long, default_value = "/tmp")]
    dir: PathBuf,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Keep the logs (their directory is printed) instead of removing them.
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("audit_bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One run's configuration.
struct Spec {
    mode: String,
    fsync: FsyncMode,
    recorders: usize,
    events: u64,
}

/// One run's results.
#[derive(Debug, Serialize)]
struct RunResult {
    mode: String,
    recorders: usize,
    /// Events recorded in the timed part.
    events: u64,
    /// Wall time of the timed part.
    seconds: f64,
    events_per_second: f64,
    /// `record()` latency.
    record: Summary,
    /// Failed `record()` calls (any makes the benchmark fail).
    errors: u64,
    first_error: Option<String>,
    /// `close()` (final checkpoint and sync).
    close_ms: f64,
    /// `verify()` of the whole log (warm-up, timed events, checkpoints).
    verify_ms: f64,
    verify_ok: bool,
    verify_error: Option<String>,
    verified_lines: u64,
    checkpoints: u64,
    verified_lines_per_second: f64,
    log_bytes: u64,
    bytes_per_event: f64,
}

/// A command event as a protocol handler records it before forwarding.
fn command_event(i: u64) -> AuditEvent {
    AuditEvent::new("command")
        .session(format!("7f3c9a2e-{:012x}", i / 50))
        .identity(IdentityRef {
            name: "billing-agent".into(),
            iss: Some("https://kubernetes.default.svc.cluster.local".into()),
            sub: Some("system:serviceaccount:agents:billing".into()),
            jti: Some("4c1f0e9b-2d7a-4e55-9b0c-6a1d2f3e4b5c".into()),
        })
        .cgroup("agents/billing")
        .cgroup_id(4242)
        .pid(31337)
        .resource("orders-db")
        .action("postgres:select")
        .decision("allow")
        .policy_version("3f2a9c0d1e4b5a6f")
        .policy_id("orders-read")
        .detail(
            "statement",
            format!("SELECT id, total FROM orders WHERE customer_id = {i} LIMIT 50"),
        )
}

/// What each recorder task returns: latencies (ns), errors, first error.
type TaskOutcome = (Vec<u64>, u64, Option<String>);

/// One recorder: records events until `total` are claimed or `deadline`.
async fn recorder(
    log: AuditLog,
    claimed: Arc<AtomicU64>,
    total: u64,
    deadline: Instant,
) -> TaskOutcome {
    let mut samples = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    loop {
        let i = claimed.fetch_add(1, Ordering::Relaxed);
        if i >= total || Instant::now() >= deadline {
            break;
        }
        let event = command_event(i);
        let t = Instant::now();
        let result = log.record(event).await;
        samples.push(nanos(t.elapsed()));
        if let Err(e) = result {
            errors += 1;
            first_error.get_or_insert_with(|| e.to_string());
        }
    }
    (samples, errors, first_error)
}

/// Total size of the files in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Runs one configuration in a fresh state directory `state`.
async fn run_one(
    workers: &Workers,
    state: &Path,
    spec: &Spec,
    limit: Duration,
) -> Result<RunResult> {
    let cfg = AuditConfig {
        fsync: spec.fsync,
        ..AuditConfig::new(state)
    };
    let (log, _report) = AuditLog::open(cfg.clone())
        .with_context(|| format!("cannot open {}", cfg.dir.display()))?;
    for i in 0..WARMUP_EVENTS {
        log.record(command_event(i))
            .await
            .context("a warm-up event could not be recorded")?;
    }

    let claimed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + limit;
    // Recorders go to the workers in turn and run on their threads, as the
    // daemon's sessions do.
    let mut tasks = Vec::new();
    for _ in 0..spec.recorders.max(1) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = recorder(log.clone(), claimed.clone(), spec.events, deadline);
        workers
            .submit(Box::new(move || {
                tokio::spawn(async move {
                    let _ = tx.send(job.await);
                });
            }))
            .await;
        tasks.push(rx);
    }
    let mut samples = Vec::with_capacity(usize::try_from(spec.events).unwrap_or(0));
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let (s, e, first) = task.await.context("a recorder task panicked")?;
        samples.extend(s);
        errors += e;
        if first_error.is_none() {
            first_error = first;
        }
    }
    let seconds = start.elapsed().as_secs_f64();

    let t = Instant::now();
    log.close().await.context("close failed")?;
    let close_ms = t.elapsed().as_secs_f64() * 1e3;

    let key = load_public_key(&cfg.pub_path)
        .with_context(|| format!("cannot read {}", cfg.pub_path.display()))?;
    let t = Instant::now();
    let report = verify(&cfg.dir, &key);
    let verify_secs = t.elapsed().as_secs_f64();

    let log_bytes = dir_bytes(&cfg.dir);
    let record = Summary::of_nanos(&mut samples);
    let events = record.count as u64;
    let total_lines = WARMUP_EVENTS + events;
    Ok(RunResult {
        mode: spec.mode.clone(),
        recorders: spec.recorders,
        events,
        seconds,
        events_per_second: events as f64 / seconds.max(1e-9),
        record,
        errors,
        first_error,
        close_ms,
        verify_ms: verify_secs * 1e3,
        verify_ok: report.is_ok(),
        verify_error: report.error.as_ref().map(|e| e.to_string()),
        verified_lines: report.events,
        checkpoints: report.checkpoints,
        verified_lines_per_second: report.events as f64 / verify_secs.max(1e-9),
        log_bytes,
        bytes_per_event: log_bytes as f64 / total_lines.max(1) as f64,
    })
}

/// Flushes the file system holding `dir` (syncfs(2)), so that writeback
/// left by an earlier run (and its removal) does not land in the next run's
/// fsyncs. Best effort: without it the numbers are only noisier.
fn quiesce(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = nix::unistd::syncfs(&f);
    }
}

/// The file system a path is on, from `/proc/self/mounts`.
#[derive(Debug, Serialize)]
struct FsInfo {
    fstype: String,
    device: String,
    mountpoint: String,
}

/// Undoes the octal escapes of `/proc/self/mounts` (`\040` for a space).
fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount holding `path` (the longest mount point that is a prefix).
fn filesystem_of(path: &Path) -> Option<FsInfo> {
    let path = fs::canonicalize(path).ok()?;
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let device = unescape_mount_field(f.next()?);
            let mountpoint = unescape_mount_field(f.next()?);
            let fstype = f.next()?.to_string();
            path.starts_with(&mountpoint).then_some(FsInfo {
                fstype,
                device,
                mountpoint,
            })
        })
        // Later mounts over the same point win, hence max_by_key keeping
        // the last of equal lengths.
        .max_by_key(|m| m.mountpoint.len())
}

fn run(args: &Args) -> Result<()> {
    let machine = Machine::detect();
    let limit = Duration::from_secs_f64(args.time_limit.max(0.1));
    let interval = Duration::from_millis(args.interval_ms.max(1));
    let base = args
        .dir
        .join(format!("portcullis-audit-bench-{}", std::process::id()));
    if base.exists() {
        fs::remove_dir_all(&base).with_context(|| format!("cannot clear {}", base.display()))?;
    }
    fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let filesystem = filesystem_of(&base);

    let interval_mode = format!("interval {}ms", interval.as_millis());
    let mut specs = Vec::new();
    for recorders in [1, 8, 64] {
        specs.push(Spec {
            mode: interval_mode.clone(),
            fsync: FsyncMode::Interval(interval),
            recorders,
            events: args.events.max(1),
        });
    }
    for recorders in [1, 8] {
        specs.push(Spec {
            mode: "always".into(),
            fsync: FsyncMode::Always,
            recorders,
            events: args.always_events.max(1),
        });
    }

    // The daemon's shape: the control side on a multi-threaded runtime, the
    // sessions (here the recorders) on one single-threaded worker per CPU.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let workers = Workers::start(machine.cpus, "rec").context("cannot start the workers")?;
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    for (n, spec) in specs.iter().enumerate() {
        let state = base.join(format!(
            "{n}-{}-{}",
            spec.mode.replace(' ', "-"),
            spec.recorders
        ));
        eprintln!(
            "audit_bench: fsync {}, {} recorder(s), {} events (at most {:.0} s) in {}",
            spec.mode,
            spec.recorders,
            spec.events,
            limit.as_secs_f64(),
            state.display()
        );
        quiesce(&base);
        match runtime.block_on(run_one(&workers, &state, spec, limit)) {
            Ok(r) => {
                if let Some(e) = &r.first_error {
                    failures.push(format!(
                        "fsync {} x{}: {} record() calls failed, first: {e}",
                        r.mode, r.recorders, r.errors
                    ));
                }
                if let Some(e) = &r.verify_error {
                    failures.push(format!(
                        "fsync {} x{}: verify failed: {e}",
                        r.mode, r.recorders
                    ));
                }
                runs.push(r);
            }
            Err(e) => failures.push(format!("fsync {} x{}: {e:#}", spec.mode, spec.recorders)),
        }
        if !args.keep {
            // Best effort: the next run uses its own directory anyway.
            let _ = fs::remove_dir_all(&state);
        }
    }
    workers.stop();
    drop(runtime);
    if args.keep {
        eprintln!("audit_bench: kept the logs in {}", base.display());
    } else {
        let _ = fs::remove_dir_all(&base);
    }

    let fs_line = match &filesystem {
        Some(f) => format!("{} ({} on {})", f.fstype, f.device, f.mountpoint),
        None => "unknown file system".into(),
    };
    let tmpfs = filesystem
        .as_ref()
        .is_some_and(|f| matches!(f.fstype.as_str(), "tmpfs" | "ramfs"));
    let headline = |mode: &str, recorders: usize| {
        runs.iter()
            .find(|r| r.mode == mode && r.recorders == recorders)
            .map(|r| (r.record.p50_us, r.record.p99_us))
    };
    let group_commit = headline(&interval_mode, 1);
    let group_commit_8 = headline(&interval_mode, 8);
    let always = headline("always", 1);
    // (label, measured, target, pass) for the data-path targets.
    let mut targets = Vec::new();
    if let Some((p50, p99)) = group_commit {
        targets.push((
            format!("record() p50, {interval_mode}, 1 recorder"),
            p50,
            RECORD_P50_TARGET_US,
        ));
        targets.push((
            format!("record() p99, {interval_mode}, 1 recorder"),
            p99,
            RECORD_P99_TARGET_US,
        ));
    }
    if let Some((_, p99)) = group_commit_8 {
        targets.push((
            format!("record() p99, {interval_mode}, 8 recorders"),
            p99,
            RECORD_P99_TARGET_US,
        ));
    }

    if args.json {
        let out = json!({
            "benchmark": "audit",
            "machine": machine,
            "dir": base,
            "filesystem": filesystem,
            "fsync_is_noop": tmpfs,
            "runtime_workers": machine.cpus,
            "warmup_events": WARMUP_EVENTS,
            "runs": runs,
            "added_latency_per_command_us": {
                "group_commit_1_recorder": group_commit.map(|(p50, p99)| json!({"p50": p50, "p99": p99})),
                "always_1_recorder": always.map(|(p50, p99)| json!({"p50": p50, "p99": p99})),
            },
            "targets": targets.iter().map(|(what, us, target)| json!({
                "what": what, "us": us, "target_us": target, "pass": us < target,
            })).collect::<Vec<_>>(),
            "failures": failures,
        });
        println!("{out}");
    } else {
        print_table(&machine, &base, &fs_line, tmpfs, &runs);
        if let Some((p50, p99)) = group_commit {
            println!(
                "added latency per command (record() before forwarding, {interval_mode} group commit, 1 recorder): p50 {p50:.1} us, p99 {p99:.1} us"
            );
        }
        if let Some((p50, p99)) = always {
            println!(
                "  with fsync=always (survives a host crash), 1 recorder:                        p50 {p50:.1} us, p99 {p99:.1} us"
            );
        }
        println!();
        println!(
            "Targets (data path, group commit; fsync=always is bound by the disk and has none):"
        );
        for (what, us, target) in &targets {
            println!(
                "  {what:<40} {us:>8.1} us  < {target:>5.1} us  {}",
                if us < target { "PASS" } else { "MISS" }
            );
        }
    }
    if !failures.is_empty() {
        bail!("some runs failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// The human table.
fn print_table(machine: &Machine, base: &Path, fs_line: &str, tmpfs: bool, runs: &[RunResult]) {
    println!();
    println!("Audit log benchmark: {}", machine.line());
    println!(
        "logs in {} on {fs_line}; recorders on {} single-threaded workers, as the daemon's sessions; {} untimed warm-up events per run; checkpoint every {} events",
        base.display(),
        machine.cpus,
        WARMUP_EVENTS,
        AuditConfig::new(base).checkpoint_every_events
    );
    if tmpfs {
        println!(
            "WARNING: tmpfs: fdatasync is a no-op here; pass --dir on a disk-backed file system"
        );
    }
    println!();
    println!(
        "{:<13} {:>5} {:>7} {:>7} {:>9}   {:>8} {:>8} {:>8}   {:>8} {:>9} {:>10} {:>6}",
        "fsync",
        "recs",
        "events",
        "secs",
        "events/s",
        "p50 us",
        "p99 us",
        "max us",
        "close ms",
        "verify ms",
        "verify l/s",
        "B/ev"
    );
    for r in runs {
        println!(
            "{:<13} {:>5} {:>7} {:>7.2} {:>9.0}   {:>8.1} {:>8.1} {:>8.0}   {:>8.1} {:>9.1} {:>10.0} {:>6.0}{}",
            r.mode,
            r.recorders,
            r.events,
            r.seconds,
            r.events_per_second,
            r.record.p50_us,
            r.record.p99_us,
            r.record.max_us,
            r.close_ms,
            r.verify_ms,
            r.verified_lines_per_second,
            r.bytes_per_event,
            if r.verify_ok { "" } else { "  VERIFY FAILED" }
        );
    }
    println!("(p50/p99/max: latency of one record() call as the caller sees it; verify: lines incl. warm-up and checkpoints)");
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_records_every_event_and_verifies() {
        let base = std::env::temp_dir().join(format!(
            "portcullis-audit-bench-test-{}",
            std::process::id()
        ));
        let spec = Spec {
            mode: "interval 5ms".into(),
            fsync: FsyncMode::Interval(Duration::from_millis(5)),
            recorders: 4,
            events: 50,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        // The time bound is only a safety net here; nothing is timed.
        let workers = Workers::start(2, "rec").expect("workers");
        let result = runtime.block_on(run_one(&workers, &base, &spec, Duration::from_secs(600)));
        workers.stop();
        let _ = fs::remove_dir_all(&base);
        let r = result.expect("the run works");
        assert_eq!(r.errors, 0, "{:?}", r.first_error);
        assert_eq!(r.events, 50);
        assert_eq!(r.record.count, 50);
        assert!(r.verify_ok, "{:?}", r.verify_error);
        assert_eq!(r.verified_lines, WARMUP_EVENTS + 50 + r.checkpoints);
        assert!(r.checkpoints >= 1);
    }

    #[test]
    fn mount_fields_unescape_and_root_has_a_filesystem() {
        assert_eq!(unescape_mount_field("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_field("/x\\04"), "/x\\04");
        assert!(filesystem_of(Path::new("/")).is_some());
    }
}
