//! `cargo xtask bench pg`: pgbench `-S` (in the simple, extended and
//! prepared query modes) and the default TPC-B-like script at 1, 8 and 32
//! clients, in one run, along four paths: direct, through Portcullis
//! (policy + audit), through Portcullis with masking, and through
//! pgbouncer in session mode. Prints TPS, the ratio to direct, p50/p99
//! transaction latency (from pgbench's per-transaction log), and the
//! relay's RSS and CPU time per statement (the daemon's, all threads, and
//! pgbouncer's, from /proc over the run: steadier than latency on a busy
//! machine, and pgbouncer's is what a bare relay costs on the same
//! machine); each table ends with PASS/MISS against the targets of
//! DESIGN.md (with policy, audit and masking on: at least 85% of direct at
//! every client count, ahead of pgbouncer, and under 50 µs added p50 per
//! statement at one client).
//!
//! Everything it starts (a PostgreSQL cluster under /tmp, pgbouncer, the
//! daemon) is its own, on free loopback ports, and is stopped at the end.

use std::{
    fs,
    net::TcpListener,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    ci,
    session::{run_in_cgroup, Session, SessionConfig},
    util::{catch_interrupts, interrupted, require_root, step, stop_child},
};

const NAME: &str = "portcullis-bench-pg";
const LISTEN_PORT: u16 = 15003;
const CLIENTS: [u32; 3] = [1, 8, 32];
/// (script, pgbench `-M` query mode, statements per transaction).
const WORKLOADS: [(&str, &str, u32); 4] = [
    ("select-only", "simple", 1),
    ("select-only", "extended", 1),
    ("select-only", "prepared", 1),
    // BEGIN, three UPDATEs, a SELECT, an INSERT, END.
    ("tpcb-like", "simple", 7),
];
/// Targets (DESIGN.md, "Performance targets").
const TARGET_RATIO: f64 = 0.85;
const TARGET_ADDED_P50_US: f64 = 50.0;

/// One measurement.
pub(crate) struct Run {
    script: &'static str,
    mode: &'static str,
    clients: u32,
    path: &'static str,
    /// Transactions per second.
    pub(crate) tps: f64,
    /// Median transaction latency.
    pub(crate) p50_ms: f64,
    p99_ms: f64,
    rss_kib: Option<u64>,
    /// The relay's CPU time (the daemon's, all its threads, or
    /// pgbouncer's; user and system) per transaction: less sensitive to a
    /// busy machine than latency.
    cpu_us_per_tx: Option<f64>,
}

/// Runs the benchmark; `seconds` per run. `only_clients` and `only_modes`
/// (`simple`, `extended`, `prepared`, `tpcb`), when not empty, keep only
/// those runs (a shorter comparison while profiling one path). `workers`
/// sets the daemon's connection workers.
pub fn run(
    seconds: u32,
    scale: u32,
    binary: Option<PathBuf>,
    only_clients: &[u32],
    only_modes: &[String],
    workers: Option<usize>,
) -> Result<()> {
    require_root()?;
    let wanted = |script: &str, mode: &str| {
        let name = if script == "tpcb-like" { "tpcb" } else { mode };
        only_modes.is_empty() || only_modes.iter().any(|m| m == name)
    };
    for m in only_modes {
        if !["simple", "extended", "prepared", "tpcb"].contains(&m.as_str()) {
            bail!("unknown --modes entry {m:?} (simple, extended, prepared, tpcb)");
        }
    }
    let bin = ci::daemon_binary(binary)?;
    let work = PathBuf::from("/tmp").join(NAME);
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;
    let (uid, gid) = postgres_ids()?;
    chown(&work, uid, gid)?;
    let password = format!("bench-{}", std::process::id());
    let pg_port = free_port()?;
    let pg = start_postgres(&work, pg_port, &password, uid, gid)?;
    let _pg = Guard(Some(pg));
    step(&format!("postgres on 127.0.0.1:{pg_port}"));
    let mut init = pgbench(pg_port, Some(&password));
    init.args(["-i", "-q", "-s", &scale.to_string(), "postgres"]);
    run_ok(&mut init, "pgbench -i")?;

    let bouncer_port = free_port()?;
    let bouncer = start_pgbouncer(&work, bouncer_port, pg_port, &password, uid, gid)?;
    let bouncer_at = Bouncer {
        port: bouncer_port,
        pid: Some(bouncer.id()),
    };
    let _bouncer = Guard(Some(bouncer));
    step(&format!(
        "pgbouncer (session mode) on 127.0.0.1:{bouncer_port}"
    ));

    let policies = bench_policies(work.as_path(), pg_port, &password)?;
    let demo = crate::util::repo_root().join("policies").join("demo");
    catch_interrupts();
    let mut session = Session::start(
        &bin,
        &SessionConfig {
            name: NAME,
            policies: policies.clone(),
            listen_port: LISTEN_PORT,
            workers,
        },
    )?;
    session.tag_agent("bench-agent", Some(&demo.join("agent.token")))?;
    step(&format!(
        "daemon connection workers: {}",
        session.workers()?
    ));

    let mut runs = Vec::new();
    let mask_file = policies.join("mask.toml");
    for (script, mode, _) in WORKLOADS {
        if !wanted(script, mode) {
            continue;
        }
        for clients in CLIENTS {
            if !only_clients.is_empty() && !only_clients.contains(&clients) {
                continue;
            }
            for path in ["direct", "portcullis", "portcullis+mask", "pgbouncer"] {
                if interrupted() {
                    bail!("interrupted");
                }
                let masked = path == "portcullis+mask";
                let want_mask = masked && !mask_file.exists();
                let drop_mask = !masked && mask_file.exists();
                if want_mask {
                    fs::write(
                        &mask_file,
                        "[[mask]]\nresource = \"bench-pg\"\ncolumns = [\"pgbench_accounts.filler\"]\ndetectors = [\"credit_card\", \"email\"]\n",
                    )?;
                }
                if drop_mask {
                    fs::remove_file(&mask_file)?;
                }
                if want_mask || drop_mask {
                    session.client_output(&["policy", "reload"])?;
                }
                let r = measure(
                    &session,
                    &work,
                    (script, mode),
                    clients,
                    path,
                    seconds,
                    pg_port,
                    bouncer_at,
                    &password,
                )?;
                println!(
                    "    {script:<12} {mode:<9} c={clients:<3} {path:<16} {:>9.0} tps  p50 {:>7.3} ms  p99 {:>7.3} ms",
                    r.tps, r.p50_ms, r.p99_ms
                );
                runs.push(r);
            }
        }
    }
    print_table(&runs);
    Ok(())
}

/// The bench's policy directory under `work`: the `bench-pg` resource
/// (PostgreSQL on 127.0.0.1:`pg_port`, its password held by the daemon) and
/// a rule letting the demo agent `bench-agent` run anything on it.
pub(crate) fn bench_policies(work: &Path, pg_port: u16, password: &str) -> Result<PathBuf> {
    let policies = work.join("policies");
    fs::create_dir_all(&policies)?;
    let secret_dir = work.join("secret");
    fs::create_dir_all(&secret_dir)?;
    fs::set_permissions(&secret_dir, fs::Permissions::from_mode(0o700))?;
    let pw_file = secret_dir.join("pg.pw");
    fs::write(&pw_file, password)?;
    let demo = crate::util::repo_root().join("policies").join("demo");
    let resource = format!(
        "[resource.bench-pg]\nprotocol = \"postgres\"\nmatch = [\"127.0.0.1:{pg_port}\"]\nupstream_tls = \"disable\"\nrecord = \"off\"\ncredentials = {{ user = \"postgres\", password_file = {:?} }}\n\n\
         [issuer.demo]\nurl = \"https://issuer.portcullis.demo\"\njwks_file = {:?}\naudience = \"portcullis\"\n\n\
         [identity.bench-agent]\nissuer = \"demo\"\nsubject = \"system:serviceaccount:agents:demo\"\n",
        pw_file.display().to_string(),
        demo.join("jwks.json").display().to_string()
    );
    fs::write(policies.join("bench.toml"), resource)?;
    fs::write(
        policies.join("bench.cedar"),
        "@id(\"bench\")\npermit(principal == Identity::\"bench-agent\", action in Action::\"postgres\", resource == Resource::\"bench-pg\");\n",
    )?;
    Ok(policies)
}

/// Where pgbouncer listens, and its process: its CPU time per statement is
/// what a bare relay costs on this machine, next to the daemon's.
#[derive(Clone, Copy)]
pub(crate) struct Bouncer {
    pub(crate) port: u16,
    pub(crate) pid: Option<u32>,
}

/// One pgbench run along `path` (`direct`, `pgbouncer`, or through the
/// session's daemon for `portcullis…`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn measure(
    session: &Session,
    work: &Path,
    (script, mode): (&'static str, &'static str),
    clients: u32,
    path: &'static str,
    seconds: u32,
    pg_port: u16,
    bouncer: Bouncer,
    password: &str,
) -> Result<Run> {
    let logs = work.join(format!(
        "log-{script}-{mode}-{clients}-{}",
        path.replace('+', "-")
    ));
    fs::create_dir_all(&logs)?;
    let (port, pw) = match path {
        "pgbouncer" => (bouncer.port, None),
        "direct" => (pg_port, Some(password)),
        _ => (pg_port, None),
    };
    let mut cmd = pgbench(port, pw);
    cmd.current_dir(&logs)
        .args([
            "-n",
            "-l",
            "-M",
            mode,
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(4).to_string(),
        ])
        .args(["-T", &seconds.to_string()]);
    if script == "select-only" {
        cmd.arg("-S");
    }
    cmd.arg(if path == "pgbouncer" {
        "bench"
    } else {
        "postgres"
    });
    if path.starts_with("portcullis") {
        run_in_cgroup(&mut cmd, session.agent_procs_file()?);
    }
    // The relay of this path, whose CPU time and memory are reported: the
    // daemon, or pgbouncer.
    let relay = match path {
        "pgbouncer" => bouncer.pid,
        p if p.starts_with("portcullis") => session.daemon_pid(),
        _ => None,
    };
    let cpu_before = relay.and_then(crate::util::cpu_ticks);
    let out = cmd.output().context("pgbench")?;
    let cpu_ticks_used = cpu_before
        .zip(relay.and_then(crate::util::cpu_ticks))
        .map(|(a, b)| b.saturating_sub(a));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "pgbench {script} -M {mode} c={clients} via {path} failed: {text}{}\ndaemon log ends with:\n{}",
            String::from_utf8_lossy(&out.stderr),
            session.log_tail(20)
        );
    }
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no tps in pgbench output: {text}"))?;
    let mut lat = Vec::new();
    for entry in fs::read_dir(&logs)? {
        let body = fs::read_to_string(entry?.path())?;
        for line in body.lines() {
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<u64>().ok())
            {
                lat.push(us);
            }
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat.get(i).copied().unwrap_or(0) as f64 / 1000.0
    };
    let rss_kib = relay.and_then(rss_kib);
    let transactions = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n > 0);
    // /proc reports CPU time in USER_HZ ticks, 100 per second on Linux.
    let cpu_us_per_tx = cpu_ticks_used
        .zip(transactions)
        .map(|(t, n)| t as f64 * 10_000.0 / n as f64);
    let _ = fs::remove_dir_all(&logs);
    Ok(Run {
        script,
        mode,
        clients,
        path,
        tps,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        rss_kib,
        cpu_us_per_tx,
    })
}

fn print_table(runs: &[Run]) {
    println!();
    println!("Ratios count, not absolute figures: every path of a table ran in this one invocation on the same (shared, noisy) machine.");
    for (script, mode, per_tx) in WORKLOADS {
        let mine: Vec<&Run> = runs
            .iter()
            .filter(|r| r.script == script && r.mode == mode)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let find = |clients: u32, path: &str| {
            mine.iter()
                .find(|r| r.clients == clients && r.path == path)
                .copied()
        };
        println!();
        println!("pgbench {script} -M {mode}");
        println!(
            "{:>7} {:<16} {:>10} {:>9} {:>10} {:>10} {:>10} {:>12}",
            "clients", "path", "tps", "vs direct", "p50 ms", "p99 ms", "rss MiB", "cpu us/stmt"
        );
        for r in &mine {
            let direct = find(r.clients, "direct").map(|d| d.tps).unwrap_or(f64::NAN);
            println!(
                "{:>7} {:<16} {:>10.0} {:>8.1}% {:>10.3} {:>10.3} {:>10} {:>12}",
                r.clients,
                r.path,
                r.tps,
                100.0 * r.tps / direct,
                r.p50_ms,
                r.p99_ms,
                r.rss_kib
                    .map(|k| format!("{:.1}", k as f64 / 1024.0))
                    .unwrap_or_else(|| "-".into()),
                r.cpu_us_per_tx
                    .map(|c| format!("{:.1}", c / f64::from(per_tx)))
                    .unwrap_or_else(|| "-".into())
            );
        }
        // The targets, for the path with policy, audit and masking on.
        let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
        for clients in CLIENTS {
            let (Some(d), Some(m), Some(b)) = (
                find(clients, "direct"),
                find(clients, "portcullis+mask"),
                find(clients, "pgbouncer"),
            ) else {
                continue;
            };
            let ratio = m.tps / d.tps;
            println!(
                "  c={clients:<3} policy+audit+masking {:>5.2} of direct (target >= {TARGET_RATIO}): {}   vs pgbouncer {:>5.2} of direct: {}",
                ratio,
                verdict(ratio >= TARGET_RATIO),
                b.tps / d.tps,
                verdict(m.tps > b.tps),
            );
        }
        if let (Some(d), Some(m), Some(b)) = (
            find(1, "direct"),
            find(1, "portcullis+mask"),
            find(1, "pgbouncer"),
        ) {
            // pgbench logs whole transactions: per statement is the added
            // transaction latency over the statements in one.
            let added = |r: &Run| (r.p50_ms - d.p50_ms) * 1000.0 / f64::from(per_tx);
            let plain = find(1, "portcullis").map(&added).unwrap_or(f64::NAN);
            println!(
                "  c=1   added p50 per statement: policy+audit+masking {:>6.1} us (target < {TARGET_ADDED_P50_US}): {}   policy+audit {:>6.1} us   pgbouncer {:>6.1} us",
                added(m),
                verdict(added(m) < TARGET_ADDED_P50_US),
                plain,
                added(b),
            );
        }
    }
}

pub(crate) fn pgbench(port: u16, password: Option<&str>) -> Command {
    // pgbench ships with the client package, on PATH; the server's bin dir
    // has it too.
    let program = pg_bin()
        .map(|b| b.join("pgbench"))
        .unwrap_or_else(|_| PathBuf::from("pgbench"));
    let mut cmd = Command::new(program);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null());
    if let Some(pw) = password {
        cmd.env("PGPASSWORD", pw);
    }
    cmd
}

/// The newest installed PostgreSQL's `bin` directory
/// (`/usr/lib/postgresql/<version>/bin`).
pub(crate) fn pg_bin() -> Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let newest = fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    match newest {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no PostgreSQL server under {}: run `cargo xtask setup` (postgresql)",
            root.display()
        ),
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The `postgres` OS user's uid and gid.
pub(crate) fn postgres_ids() -> Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .context("no postgres OS user: run `cargo xtask setup` (postgresql-15)")?;
    let f: Vec<&str> = line.split(':').collect();
    let uid = f
        .get(2)
        .and_then(|v| v.parse().ok())
        .context("passwd uid")?;
    let gid = f
        .get(3)
        .and_then(|v| v.parse().ok())
        .context("passwd gid")?;
    Ok((uid, gid))
}

/// chown(2) with a path in the error.
pub(crate) fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))
}

pub(crate) fn run_ok(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// initdb (scram-sha-256 over TCP, trust on the socket in `work`) and
/// starts PostgreSQL on 127.0.0.1:`port` as `uid`:`gid`; returns when it
/// accepts connections.
pub(crate) fn start_postgres(
    work: &Path,
    port: u16,
    password: &str,
    uid: u32,
    gid: u32,
) -> Result<Child> {
    let pg_bin = pg_bin()?;
    let data = work.join("data");
    let pwfile = work.join("initpw");
    fs::write(&pwfile, password)?;
    chown(&pwfile, uid, gid)?;
    let mut init = Command::new(pg_bin.join("initdb"));
    init.arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--no-sync",
        ])
        .arg(format!("--pwfile={}", pwfile.display()))
        .uid(uid)
        .gid(gid)
        .current_dir(work);
    run_ok(&mut init, "initdb")?;
    let _ = fs::remove_file(&pwfile);
    let mut cmd = Command::new(pg_bin.join("postgres"));
    cmd.arg("-D")
        .arg(&data)
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=200",
            "-c",
            "fsync=off",
        ])
        .arg("-k")
        .arg(work)
        .uid(uid)
        .gid(gid)
        .current_dir(work)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().context("spawn postgres")?;
    let start = Instant::now();
    loop {
        let ok = Command::new(pg_bin.join("pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(child);
        }
        if start.elapsed() > Duration::from_secs(30) {
            stop_child(&mut child, Duration::from_secs(5));
            bail!("postgres did not start");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn start_pgbouncer(
    work: &Path,
    port: u16,
    pg_port: u16,
    password: &str,
    uid: u32,
    gid: u32,
) -> Result<Child> {
    let dir = work.join("pgbouncer");
    fs::create_dir_all(&dir)?;
    let users = dir.join("userlist.txt");
    fs::write(&users, "\"postgres\" \"\"\n")?;
    let ini = dir.join("pgbouncer.ini");
    fs::write(
        &ini,
        format!(
            "[databases]\nbench = host=127.0.0.1 port={pg_port} dbname=postgres user=postgres password={password}\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
             pool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 40\nlogfile = {}\n",
            users.display(),
            dir.join("pgbouncer.log").display()
        ),
    )?;
    for f in [&dir, &users, &ini] {
        chown(f, uid, gid)?;
    }
    let child = Command::new("pgbouncer")
        .arg(&ini)
        .uid(uid)
        .gid(gid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn pgbouncer")?;
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(15) {
            bail!("pgbouncer did not start");
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(child)
}

/// Stops a child process on drop.
pub(crate) struct Guard(pub(crate) Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SIGINT: PostgreSQL's fast shutdown; pgbouncer exits on it too.
            // SAFETY: kill(2) has no memory-safety preconditions; the child
            // is not reaped yet, so its pid is still ours.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGINT);
            }
            stop_child(&mut c, Duration::from_secs(10));
        }
    }
}
