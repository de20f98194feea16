//! Fleet benchmark (`cargo xtask bench fleet`, which starts the PostgreSQL
//! store): approval propagation between two nodes (a command held on node A,
//! approved through node B, released on A: LISTEN/NOTIFY wake-up plus the
//! sync), p50/p99 against the 1 s target; and audit shipping throughput (a
//! chain written by the real writer, shipped by the real shipper) against
//! the 10,000 events/s per node target.
//!
//! Both nodes run in this process with their own JIT state dirs and their
//! own store connections, as two daemons would. Counts and time are
//! bounded.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use portcullis::{
    audit::{AuditConfig, AuditEvent, AuditLog},
    fleet::{ship::Shipper, Fleet, FleetConfig},
    jit::{Jit, NewRequest},
};

/// Fleet benchmark: approval propagation and audit shipping.
#[derive(Parser, Debug)]
#[command(name = "fleet_bench")]
struct Args {
    /// The store (`postgres://user@host:port/db`).
    #[arg(long)]
    store: String,
    /// File holding the store password.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Approvals to time.
    #[arg(long, default_value_t = 200)]
    approvals: u32,
    /// Audit events to ship.
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    /// Time bound of each part, seconds.
    #[arg(long, default_value_t = 60)]
    time_limit: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleet_bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet_bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn temp_dir(tag: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "portcullis-fleet-bench-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn config(args: &Args, node: &str) -> FleetConfig {
    FleetConfig {
        store: args.store.clone(),
        password_file: args.password_file.clone(),
        sslmode: None,
        ca_file: None,
        node: Some(node.to_string()),
        fail_held_after: None,
        ship_priority: None,
    }
}

/// A node: its JIT state and fleet membership, kept in step by a sync task.
fn node(args: &Args, name: &str, dir: &std::path::Path) -> Result<(Arc<Jit>, Arc<Fleet>)> {
    let (jit, _) = Jit::load(dir).context("jit state")?;
    let fleet = Arc::new(Fleet::new(&config(args, name)).context("fleet config")?);
    let jit = Arc::new(jit.with_node(&fleet.node));
    tokio::spawn(fleet.clone().listen_loop());
    let (f, j) = (fleet.clone(), jit.clone());
    tokio::spawn(async move {
        loop {
            f.wait_for_change().await;
            let _ = f.sync(&j).await;
        }
    });
    Ok((jit, fleet))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run(args: &Args) -> Result<()> {
    let tag = format!("{}", std::process::id());
    let (dir_a, dir_b) = (temp_dir("a")?, temp_dir("b")?);
    let (jit_a, fleet_a) = node(args, &format!("bench-a-{tag}"), &dir_a)?;
    let (jit_b, fleet_b) = node(args, &format!("bench-b-{tag}"), &dir_b)?;
    fleet_a.ensure_schema().await.context("the store")?;

    // Approval propagation.
    let mut took = Vec::new();
    let limit = Instant::now() + Duration::from_secs(args.time_limit);
    for i in 0..args.approvals {
        if Instant::now() > limit {
            break;
        }
        let new = NewRequest {
            identity: "bench".into(),
            resource: "db".into(),
            action: "postgres:update".into(),
            command: format!("UPDATE t SET x = {i}"),
            fingerprint: None,
            context: serde_json::json!({}),
            session: format!("s-{i}"),
            policies: vec!["bench".into()],
        };
        let (request, rx) = jit_a.hold(new, Duration::from_secs(30))?;
        fleet_a.publish(&request).await?;
        let start = Instant::now();
        fleet_b
            .approve(&jit_b, &request.id, "bench", None, None)
            .await?;
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(_)) => took.push(start.elapsed()),
            _ => bail!(
                "request {} was not released on node A within 5 s",
                request.id
            ),
        }
    }
    took.sort();
    let (p50, p99) = (pct(&took, 0.5), pct(&took, 0.99));

    // Shipping throughput.
    let state = temp_dir("ship")?;
    let (log, _) = AuditLog::open(AuditConfig::new(&state)).context("audit log")?;
    for i in 0..args.events {
        log.record(AuditEvent::new("command").detail("i", i))
            .await?;
    }
    log.close().await?;
    let ship_fleet = Fleet::new(&config(args, &format!("bench-ship-{tag}")))?;
    let status = ship_fleet.shipping.clone();
    let shipper = Shipper {
        node: ship_fleet.node.clone(),
        audit_dir: state.join("audit"),
        pubkey_file: state.join("audit.pub"),
        store: ship_fleet.new_store("portcullis-bench-ship"),
        status: status.clone(),
    };
    let start = Instant::now();
    // As the daemon runs it: its own thread, at the default niceness.
    let thread = shipper.spawn_thread(ship_fleet.ship_priority)?;
    let deadline = start + Duration::from_secs(args.time_limit);
    let mut target = args.events;
    loop {
        let local = status.local_seq.load(Ordering::Relaxed);
        if local > target {
            // Checkpoints are events too.
            target = local;
        }
        if status.shipped_seq.load(Ordering::Relaxed) >= target && target > 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("shipping did not finish within {} s", args.time_limit);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ship_secs = start.elapsed().as_secs_f64();
    drop(thread);
    let rate = target as f64 / ship_secs;
    for d in [&dir_a, &dir_b, &state] {
        let _ = std::fs::remove_dir_all(d);
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "approvals": took.len(),
                "propagation_p50_ms": p50.as_secs_f64() * 1e3,
                "propagation_p99_ms": p99.as_secs_f64() * 1e3,
                "shipped_events": target,
                "shipping_events_per_s": rate,
            })
        );
    } else {
        println!(
            "approval propagation ({} approvals, node B -> node A):",
            took.len()
        );
        println!(
            "  p50 {:.1} ms, p99 {:.1} ms (target p99 < 1000 ms)",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
        println!(
            "audit shipping: {target} events in {ship_secs:.2} s = {rate:.0} events/s (target >= 10000)"
        );
    }
    Ok(())
}
