//! `cargo xtask bench fleet`: starts a PostgreSQL store (initdb under /tmp,
//! its own port) and runs the `fleet_bench` example (release) against it:
//! approval propagation between two nodes and audit shipping throughput.
//! Then it proves that allowed commands pay nothing for the store: pgbench
//! select-only through two daemons started side by side, one without and
//! one with `[fleet]`, runs interleaved with direct ones, and compares
//! their ratios to direct. The `[fleet]` daemon's store there is a second
//! PostgreSQL, not the one pgbench measures, run at the lowest CPU
//! priority (`SCHED_IDLE`): it stands in for the store on another host, whose inserts of
//! shipped audit events would otherwise take the two cores the benchmark
//! shares (and the measured server's WAL). Everything the daemon itself
//! does for `[fleet]` (shipping on its own thread at the configured
//! niceness, sync, LISTEN) runs in the daemon and is measured. Both daemons
//! start with an empty state directory (a node's first chain), and the
//! load starts once shipping has caught up; after the load the bench
//! prints how far shipping lagged and how long it took to catch up, so
//! that shipping deferred by its low priority shows rather than hides.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    bench_pg::{self, chown, postgres_ids, start_postgres, Guard},
    ci,
    session::{Session, SessionConfig},
    util::{catch_interrupts, interrupted, require_root, step},
};

/// Client counts of the store-cost comparison.
const CLIENTS: [u32; 2] = [1, 8];
/// Rounds of (direct, without, with) per client count; the median counts.
const ROUNDS: usize = 5;
/// `[fleet]` may cost at most this share of the plain daemon's throughput
/// before "unchanged" is a MISS (the noise of a shared machine is larger
/// than anything a store touched per command would leave).
const UNCHANGED: f64 = 0.95;

/// Work directory under /tmp.
const NAME: &str = "portcullis-bench-fleet";

/// Runs the fleet benchmark; `args` go to the example; `pg_seconds` per
/// pgbench run of the store-cost comparison (0 skips it); `binary` is the
/// daemon (default: the release build).
pub fn run(args: &[String], pg_seconds: u32, pg_only: bool, binary: Option<PathBuf>) -> Result<()> {
    require_root()?;
    let work = PathBuf::from("/tmp").join(NAME);
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;
    let (uid, gid) = postgres_ids()?;
    chown(&work, uid, gid)?;
    let password = format!("bench-{}", std::process::id());
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let pg = start_postgres(&work, port, &password, uid, gid)?;
    let _pg = Guard(Some(pg));
    let secret = work.join("secret");
    fs::create_dir_all(&secret)?;
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o700))?;
    let pw_file = secret.join("store.pw");
    fs::write(&pw_file, &password)?;
    let mut all = vec![
        "--store".to_string(),
        format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        "--password-file".to_string(),
        pw_file.display().to_string(),
    ];
    all.extend(args.iter().cloned());
    let mut result = if pg_only {
        Ok(())
    } else {
        crate::bench::example("fleet_bench", &all)
    };
    if result.is_ok() && pg_seconds > 0 {
        result = (|| {
            let store_work = work.join("store");
            fs::create_dir_all(&store_work)?;
            chown(&store_work, uid, gid)?;
            let store_port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let store = start_postgres(&store_work, store_port, &password, uid, gid)?;
            let pid = store.id();
            let _store = Guard(Some(store));
            // The store stands in for one on another host: SCHED_IDLE,
            // so that it only takes CPU the measured processes leave over.
            // Backends forked later inherit the policy from the postmaster;
            // its helper processes are already running.
            for p in std::iter::once(pid).chain(crate::util::children(pid)) {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: sched_setscheduler(2) on a process this one started.
                if unsafe { libc::sched_setscheduler(p as libc::pid_t, libc::SCHED_IDLE, &param) }
                    != 0
                {
                    let e = std::io::Error::last_os_error();
                    // A short-lived child may be gone already.
                    if e.raw_os_error() != Some(libc::ESRCH) {
                        bail!("cannot lower the store's priority: {e}");
                    }
                }
            }
            store_cost(
                &work, port, store_port, &password, &pw_file, pg_seconds, binary,
            )
        })();
    }
    drop(_pg);
    let _ = fs::remove_dir_all(&work);
    result
}

/// pgbench select-only, direct and through two daemons (without and with
/// `[fleet]`), interleaved; prints the ratios and the verdict.
fn store_cost(
    work: &Path,
    pg_port: u16,
    store_port: u16,
    password: &str,
    store_pw: &Path,
    seconds: u32,
    binary: Option<PathBuf>,
) -> Result<()> {
    let bin = ci::daemon_binary(binary)?;
    let mut init = bench_pg::pgbench(pg_port, Some(password));
    init.args(["-i", "-q", "-s", "10", "postgres"]);
    bench_pg::run_ok(&mut init, "pgbench -i")?;
    let policies = bench_pg::bench_policies(work, pg_port, password)?;
    let token = crate::util::repo_root().join("policies/demo/agent.token");
    // The same config but for `[fleet]`: nothing else differs.
    let plain = work.join("plain.toml");
    fs::write(&plain, "[daemon]\n")?;
    let fleet = work.join("fleet.toml");
    fs::write(
        &fleet,
        format!(
            "[daemon]\n\n[fleet]\nstore = \"postgres://postgres@127.0.0.1:{store_port}/postgres\"\npassword_file = {:?}\nnode = \"bench-node\"\n",
            store_pw.display().to_string()
        ),
    )?;
    catch_interrupts();
    let start = |name: &'static str, config: &Path| -> Result<Session> {
        let mut s = Session::start_with_config(
            &bin,
            &SessionConfig {
                name,
                policies: policies.clone(),
                listen_port: bench_pg::free_port()?,
                workers: None,
            },
            Some(config),
        )?;
        s.tag_agent("bench-agent", Some(&token))?;
        Ok(s)
    };
    // A node's first chain: an earlier run's audit would be a backlog
    // shipped while this one measures.
    for name in ["portcullis-bench-fleet-off", "portcullis-bench-fleet-on"] {
        let state = Path::new("/tmp").join(name).join("state");
        if state.exists() {
            fs::remove_dir_all(&state)
                .with_context(|| format!("cannot clear {}", state.display()))?;
        }
    }
    let off = start("portcullis-bench-fleet-off", &plain)?;
    let on = start("portcullis-bench-fleet-on", &fleet)?;
    if !on.log_tail(200).contains("fleet store ready") {
        bail!(
            "the [fleet] daemon did not reach its store; its log ends with:\n{}",
            on.log_tail(20)
        );
    }
    let (lag, _) = wait_shipped(&on, Duration::from_secs(60))?;
    if lag > 0 {
        bail!("the [fleet] daemon's audit shipping did not catch up before the load ({lag} events behind)");
    }
    step("pgbench select-only: direct, without [fleet], with [fleet] (interleaved)");
    let mut rows = Vec::new();
    for clients in CLIENTS {
        let mut tps: [Vec<f64>; 3] = Default::default();
        for round in 0..ROUNDS {
            // Alternate which daemon goes first, so that drift over the
            // run does not favour one.
            let order: [(usize, &Session, &'static str); 3] = if round % 2 == 0 {
                [
                    (0, &off, "direct"),
                    (1, &off, "portcullis"),
                    (2, &on, "portcullis"),
                ]
            } else {
                [
                    (0, &on, "direct"),
                    (2, &on, "portcullis"),
                    (1, &off, "portcullis"),
                ]
            };
            for (slot, session, path) in order {
                if interrupted() {
                    bail!("interrupted");
                }
                let r = bench_pg::measure(
                    session,
                    work,
                    ("select-only", "simple"),
                    clients,
                    path,
                    seconds,
                    pg_port,
                    bench_pg::Bouncer { port: 0, pid: None },
                    password,
                )?;
                let label = ["direct", "without [fleet]", "with [fleet]"][slot];
                println!(
                    "    c={clients:<3} round {round} {label:<16} {:>9.0} tps  p50 {:>7.3} ms",
                    r.tps, r.p50_ms
                );
                tps[slot].push(r.tps);
            }
        }
        // Each round's two daemons ran back to back: their ratio is free of
        // the drift between rounds, so the verdict takes the median of the
        // rounds' ratios (the table's columns are medians of their own).
        let paired: Vec<f64> = tps[2].iter().zip(&tps[1]).map(|(f, p)| f / p).collect();
        rows.push((clients, tps.map(|v| median(&v)), median(&paired)));
    }
    let lag_after_load = ship_status(&on)?.0;
    let catch_up = Instant::now();
    let (lag_left, shipped) = wait_shipped(&on, Duration::from_secs(120))?;
    let caught_up_in = catch_up.elapsed();
    let reached = on.log_tail(10_000);
    drop(on);
    drop(off);
    println!();
    println!("pgbench select-only -M simple, median of {ROUNDS} interleaved runs of {seconds}s (ratios count: same machine, same invocation);");
    println!("fleet/plain is the median of the rounds' own fleet/plain ratios");
    println!(
        "{:>7} {:>10} {:>10} {:>9} {:>10} {:>9} {:>11}",
        "clients", "direct", "no fleet", "vs direct", "fleet", "vs direct", "fleet/plain"
    );
    let mut pass = true;
    for (clients, [direct, plain, fleet], same) in &rows {
        pass &= *same >= UNCHANGED;
        println!(
            "{clients:>7} {direct:>10.0} {plain:>10.0} {:>8.1}% {fleet:>10.0} {:>8.1}% {:>10.3}",
            100.0 * plain / direct,
            100.0 * fleet / direct,
            same
        );
    }
    println!(
        "audit shipping: {lag_after_load} events behind when the load ended; {} ({shipped} events shipped in all)",
        if lag_left == 0 {
            format!("caught up {:.1} s later", caught_up_in.as_secs_f64())
        } else {
            format!("still {lag_left} behind after {:.0} s", caught_up_in.as_secs_f64())
        }
    );
    if lag_left > 0 {
        pass = false;
    }
    if reached.contains("fleet store lost") {
        println!("note: the [fleet] daemon lost its store during the run (see its log)");
        pass = false;
    }
    println!(
        "target: PostgreSQL ratio unchanged with [fleet] (fleet/plain >= {UNCHANGED} at every client count): {}",
        if pass { "PASS" } else { "MISS" }
    );
    Ok(())
}

/// The `[fleet]` daemon's shipping lag and shipped seq (`status --json`).
fn ship_status(s: &Session) -> Result<(u64, u64)> {
    let text = s.client_output(&["status", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&text).context("status --json")?;
    let fleet = &v["fleet"];
    match (fleet["ship_lag"].as_u64(), fleet["shipped_seq"].as_u64()) {
        (Some(lag), Some(shipped)) => Ok((lag, shipped)),
        _ => bail!("status --json has no fleet shipping figures: {fleet}"),
    }
}

/// Waits (up to `limit`) until shipping has caught up with a chain that
/// has something in it; returns the last (lag, shipped seq).
fn wait_shipped(s: &Session, limit: Duration) -> Result<(u64, u64)> {
    let end = Instant::now() + limit;
    loop {
        let (lag, shipped) = ship_status(s)?;
        if (lag == 0 && shipped > 0) || Instant::now() > end {
            return Ok((lag, shipped));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
