//! `cargo xtask soak`: 1,000 concurrent agent sessions across 20 tagged
//! cgroups for 60 s over the tcp path, with a mix of allowed, denied and held
//! commands (a background loop approves or denies the holds). Reports
//! unexpected errors, the daemon's open fds and RSS before, during and after
//! the load, and the p50/p99 of connect + first echo. Root only; not part of
//! `cargo xtask test`.
//!
//! The load itself runs in `soak-client` processes (hidden subcommand), one
//! per cgroup, so each is intercepted as a separate agent.

use std::{
    collections::BTreeMap,
    env, fs,
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::{
    ci,
    session::{run_in_cgroup, Session, SessionConfig},
    util::{catch_interrupts, interrupted, require_root, step},
};

/// Names the soak's cgroup root, pin dir and work dir.
const NAME: &str = "portcullis-soak";
/// Bytes per echo.
const ECHO: usize = 64;
/// Socket timeouts for allowed and denied commands.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// A held command waits at most this long for the approval loop.
const HOLD_TIMEOUT: Duration = Duration::from_secs(40);

/// Options of `cargo xtask soak`.
#[derive(Args, Debug)]
pub struct SoakArgs {
    /// Concurrent agent sessions in total.
    #[arg(long, default_value_t = 1000)]
    pub sessions: u32,
    /// Tagged cgroups (one soak-client process each).
    #[arg(long, default_value_t = 20)]
    pub cgroups: u32,
    /// Seconds of load. The daemon's RSS climbs for its first 100 s or so
    /// (glibc's arenas filling with the churn of short sessions) and is
    /// flat after; the leak check compares the second half of the run, so
    /// a run must be long enough for that half to be past the climb.
    #[arg(long, default_value_t = 180)]
    pub secs: u64,
    /// Use this portcullis binary instead of building the release one.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
}

/// Options of the hidden `soak-client`.
#[derive(Args, Debug)]
pub struct SoakClientArgs {
    /// Upstream of the resource every agent may use.
    #[arg(long)]
    pub allowed: SocketAddr,
    /// Upstream of the resource no rule permits.
    #[arg(long)]
    pub denied: SocketAddr,
    /// Upstream of the resource whose rule needs approval.
    #[arg(long)]
    pub held: SocketAddr,
    /// Concurrent sessions in this process.
    #[arg(long)]
    pub sessions: u32,
    /// Seconds of load.
    #[arg(long)]
    pub secs: u64,
    /// Seed of this process's choices.
    #[arg(long)]
    pub seed: u64,
}

/// An echo server counting its connections (the upstream of one resource).
struct Upstream {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
}

fn upstream() -> Result<Upstream> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding an upstream")?;
    let addr = l.local_addr()?;
    let accepted = Arc::new(AtomicU64::new(0));
    let a = accepted.clone();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            a.fetch_add(1, Ordering::Relaxed);
            thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
                let mut buf = [0u8; 4096];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(Upstream { addr, accepted })
}

/// The daemon's open fds and resident memory (KiB).
fn daemon_usage(pid: u32) -> (usize, u64) {
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let rss = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    (fds, rss)
}

/// Runs the soak.
pub fn run(args: &SoakArgs) -> Result<()> {
    require_root()?;
    if args.cgroups == 0 || args.sessions < args.cgroups {
        bail!("need at least one session per cgroup");
    }
    let bin = ci::daemon_binary(args.binary.clone())?;
    let (allowed, denied, held) = (upstream()?, upstream()?, upstream()?);
    let policies = PathBuf::from("/tmp").join(NAME).join("policies");
    // A fresh state dir per run: an earlier run's audit log and access
    // requests would otherwise be loaded and skew the memory figures.
    for dir in [&policies, &PathBuf::from("/tmp").join(NAME).join("state")] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
    }
    fs::create_dir_all(&policies)?;
    let demo = crate::util::repo_root().join("policies").join("demo");
    fs::write(
        policies.join("soak.toml"),
        format!(
            "[resource.soak-allowed]\nprotocol = \"tcp\"\nmatch = [\"{}\"]\n\n\
             [resource.soak-denied]\nprotocol = \"tcp\"\nmatch = [\"{}\"]\n\n\
             [resource.soak-held]\nprotocol = \"tcp\"\nmatch = [\"{}\"]\napproval_timeout = \"60s\"\n\n\
             [issuer.demo]\nurl = \"https://issuer.portcullis.demo\"\njwks_file = {:?}\naudience = \"portcullis\"\n\n\
             [identity.soak-agent]\nissuer = \"demo\"\nsubject = \"system:serviceaccount:agents:demo\"\n",
            allowed.addr,
            denied.addr,
            held.addr,
            demo.join("jwks.json").display().to_string()
        ),
    )?;
    fs::write(
        policies.join("soak.cedar"),
        "@id(\"soak-allow\")\npermit(principal == Identity::\"soak-agent\", action == Action::\"tcp:connect\", resource == Resource::\"soak-allowed\");\n\n\
         @id(\"soak-held\")\n@approval(\"required\")\npermit(principal == Identity::\"soak-agent\", action == Action::\"tcp:connect\", resource == Resource::\"soak-held\");\n",
    )?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    catch_interrupts();
    let session = Session::start(
        &bin,
        &SessionConfig {
            name: NAME,
            policies,
            listen_port: port,
            workers: None,
        },
    )?;
    let pid = session.daemon_pid().context("no daemon pid")?;
    let root = session
        .agent_cgroup()
        .parent()
        .context("agent cgroup has no parent")?
        .to_path_buf();
    let mount = crate::util::cgroup2_mount()?;
    let token = demo.join("agent.token").display().to_string();
    let mut cgroups = Vec::new();
    for i in 0..args.cgroups {
        let dir = root.join(format!("agent-{i:02}"));
        fs::create_dir_all(&dir)?;
        let rel = dir
            .strip_prefix(&mount)
            .context("cgroup outside the mount")?
            .display()
            .to_string();
        session.client_output(&[
            "tag",
            &rel,
            "--identity",
            "soak-agent",
            "--token-file",
            &token,
        ])?;
        cgroups.push(dir);
    }
    step(&format!("tagged {} cgroups", cgroups.len()));
    let idle = daemon_usage(pid);

    // The reviewer: approves or denies every pending request, alternately.
    let stop = Arc::new(AtomicBool::new(false));
    let decided = Arc::new(Mutex::new((0u64, 0u64, 0u64)));
    let reviewer = {
        let stop = stop.clone();
        let decided = decided.clone();
        let socket = session.admin_socket().to_path_buf();
        let bin = session.binary().to_path_buf();
        thread::spawn(move || {
            let mut flip = false;
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(250));
                let out = Command::new(&bin)
                    .arg("--admin-socket")
                    .arg(&socket)
                    .args(["requests", "--json"])
                    .output();
                let Ok(out) = out else { continue };
                let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                for r in v["requests"].as_array().cloned().unwrap_or_default() {
                    if r["status"] != "pending" {
                        continue;
                    }
                    let Some(id) = r["id"].as_str() else { continue };
                    flip = !flip;
                    let mut cmd = Command::new(&bin);
                    cmd.arg("--admin-socket").arg(&socket);
                    if flip {
                        cmd.args(["approve", id, "--as", "soak"]);
                    } else {
                        cmd.args(["deny", id, "--reason", "soak", "--as", "soak"]);
                    }
                    let ok = cmd.output().is_ok_and(|o| o.status.success());
                    if let Ok(mut d) = decided.lock() {
                        match (ok, flip) {
                            (true, true) => d.0 += 1,
                            (true, false) => d.1 += 1,
                            (false, _) => d.2 += 1,
                        }
                    }
                }
            }
        })
    };

    let exe = env::current_exe().context("cannot find the xtask binary")?;
    let per = args.sessions / args.cgroups;
    let mut clients: Vec<Child> = Vec::new();
    for (i, dir) in cgroups.iter().enumerate() {
        let mut cmd = Command::new(&exe);
        cmd.args(["soak-client", "--allowed", &allowed.addr.to_string()])
            .args(["--denied", &denied.addr.to_string()])
            .args(["--held", &held.addr.to_string()])
            .args(["--sessions", &per.to_string()])
            .args(["--secs", &args.secs.to_string()])
            .args(["--seed", &(i as u64 + 1).to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        run_in_cgroup(&mut cmd, procs);
        clients.push(cmd.spawn().context("starting soak-client")?);
    }
    step(&format!(
        "{} sessions in {} cgroups for {} s",
        per * args.cgroups,
        args.cgroups,
        args.secs
    ));
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut next = Duration::from_secs(10);
    while start.elapsed() < Duration::from_secs(args.secs) && !interrupted() {
        thread::sleep(Duration::from_millis(200));
        if start.elapsed() >= next {
            let (fds, rss) = daemon_usage(pid);
            let flows = session
                .client_output(&["status", "--json"])
                .ok()
                .and_then(|s| serde_json::from_str::<Value>(&s).ok())
                .and_then(|v| v["flows"].as_u64().or(v["sessions"].as_u64()));
            println!(
                "  t={:>3}s daemon fds {fds:>5}  rss {:>7} KiB  flows {}",
                next.as_secs(),
                rss,
                flows.map(|f| f.to_string()).unwrap_or_else(|| "?".into())
            );
            samples.push((next.as_secs(), fds, rss));
            next += Duration::from_secs(10);
        }
    }
    let loaded_end = daemon_usage(pid);
    let mut results = Vec::new();
    for c in clients {
        let out = c.wait_with_output().context("waiting for soak-client")?;
        let text = String::from_utf8_lossy(&out.stdout);
        results.push(
            serde_json::from_str::<Value>(text.trim())
                .with_context(|| format!("soak-client printed {text:?}"))?,
        );
    }
    // Let the holds that were still waiting get decided, then stop.
    thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let _ = reviewer.join();
    thread::sleep(Duration::from_secs(3));
    let drained = daemon_usage(pid);

    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    let mut unexpected: BTreeMap<String, u64> = BTreeMap::new();
    let mut lat: Vec<u64> = Vec::new();
    for r in &results {
        for k in [
            "allowed_ok",
            "denied_ok",
            "held_approved",
            "held_denied",
            "echoes",
        ] {
            *totals.entry(k.into()).or_default() += r[k].as_u64().unwrap_or(0);
        }
        if let Some(m) = r["unexpected"].as_object() {
            for (k, v) in m {
                *unexpected.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
            }
        }
        lat.extend(
            r["latencies_us"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64),
        );
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat.get(i).copied().unwrap_or(0) as f64 / 1000.0
    };
    let (approved, denied_by_reviewer, review_errors) =
        decided.lock().map(|d| *d).unwrap_or_default();
    let verify = Command::new(session.binary())
        .args(["audit", "verify", "--state-dir"])
        .arg(PathBuf::from("/tmp").join(NAME).join("state"))
        .output()?;
    let first = samples.first().map(|s| (s.1, s.2)).unwrap_or(idle);
    let report = json!({
        "sessions": per * args.cgroups,
        "cgroups": args.cgroups,
        "secs": args.secs,
        "commands": totals,
        "unexpected": unexpected,
        "reviewer": {"approved": approved, "denied": denied_by_reviewer, "errors": review_errors},
        "upstream_connections": {
            "allowed": allowed.accepted.load(Ordering::Relaxed),
            "denied": denied.accepted.load(Ordering::Relaxed),
            "held": held.accepted.load(Ordering::Relaxed),
        },
        "connect_echo_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0), "n": lat.len()},
        "daemon": {
            "idle": {"fds": idle.0, "rss_kib": idle.1},
            "at_10s": {"fds": first.0, "rss_kib": first.1},
            "samples": samples.iter().map(|(t, fds, rss)| json!({"t": t, "fds": fds, "rss_kib": rss})).collect::<Vec<_>>(),
            "end_of_load": {"fds": loaded_end.0, "rss_kib": loaded_end.1},
            "drained": {"fds": drained.0, "rss_kib": drained.1},
        },
        "audit_verify": verify.status.success(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    let mut failures = Vec::new();
    let n_unexpected: u64 = unexpected.values().sum();
    if n_unexpected > 0 {
        failures.push(format!("{n_unexpected} unexpected errors"));
    }
    if denied.accepted.load(Ordering::Relaxed) != 0 {
        failures.push("a denied command reached its upstream".into());
    }
    if drained.0 > idle.0 + 16 {
        failures.push(format!("fd leak: {} idle, {} drained", idle.0, drained.0));
    }
    // Memory: the allocator warms up over the first minute or two, so the
    // leak check compares the second half of the run with its end.
    let mid = samples
        .get(samples.len().saturating_sub(1) / 2)
        .map(|s| s.2)
        .unwrap_or(first.1);
    if loaded_end.1 > mid + mid * 15 / 100 {
        failures.push(format!(
            "RSS grew more than 15 % in the second half of the load: {mid} KiB -> {} KiB",
            loaded_end.1
        ));
    }
    if !verify.status.success() {
        failures.push("audit verify failed".into());
    }
    if failures.is_empty() {
        println!("soak: PASS");
        Ok(())
    } else {
        eprintln!("daemon log ends with:\n{}", session.log_tail(20));
        bail!("soak: FAIL: {}", failures.join("; "))
    }
}

/// One process's share of the load (runs inside one tagged cgroup).
pub fn client(args: &SoakClientArgs) -> Result<()> {
    for a in [args.allowed, args.denied, args.held] {
        if !a.ip().is_loopback() {
            bail!("the soak only talks to loopback addresses, not {a}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(args.secs);
    let counts: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let lats: Arc<Mutex<Vec<u64>>> = Arc::default();
    let workers: Vec<_> = (0..args.sessions)
        .map(|i| {
            let (counts, lats) = (counts.clone(), lats.clone());
            let (allowed, denied, held) = (args.allowed, args.denied, args.held);
            let mut rng = Rng(args.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(i)) | 1);
            thread::spawn(move || {
                // Stagger the start over the first two seconds.
                thread::sleep(Duration::from_millis(rng.below(2000)));
                while Instant::now() < deadline {
                    let pick = rng.below(100);
                    let outcome = if pick < 87 {
                        allowed_session(allowed, &mut rng, deadline, &lats)
                    } else if pick < 97 {
                        denied_command(denied)
                    } else {
                        held_command(held)
                    };
                    if let Ok(mut c) = counts.lock() {
                        *c.entry(outcome).or_default() += 1;
                    }
                    thread::sleep(Duration::from_millis(100 + rng.below(400)));
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let counts = counts.lock().map(|c| c.clone()).unwrap_or_default();
    let mut out =
        json!({"allowed_ok": 0, "denied_ok": 0, "held_approved": 0, "held_denied": 0, "echoes": 0});
    let mut unexpected = serde_json::Map::new();
    for (k, v) in counts {
        if let Some(name) = k.strip_prefix("ok:") {
            let (name, echoes) = name.split_once(':').unwrap_or((name, "0"));
            out[name] = json!(out[name].as_u64().unwrap_or(0) + v);
            let e: u64 = echoes.parse().unwrap_or(0);
            out["echoes"] = json!(out["echoes"].as_u64().unwrap_or(0) + e * v);
        } else {
            unexpected.insert(k, json!(v));
        }
    }
    out["unexpected"] = Value::Object(unexpected);
    out["latencies_us"] = json!(lats.lock().map(|l| l.clone()).unwrap_or_default());
    println!("{out}");
    Ok(())
}

/// One allowed session: connect, a first echo (timed), then echoes every
/// 250 ms for 2-4 s (bounded by the deadline), then close.
fn allowed_session(
    addr: SocketAddr,
    rng: &mut Rng,
    deadline: Instant,
    lats: &Mutex<Vec<u64>>,
) -> String {
    let t0 = Instant::now();
    let mut s = match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return format!("allowed connect: {:?}", e.kind()),
    };
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    let _ = s.set_nodelay(true);
    if let Err(e) = echo(&mut s) {
        return format!("allowed first echo: {e}");
    }
    if let Ok(mut l) = lats.lock() {
        l.push(t0.elapsed().as_micros() as u64);
    }
    let until = (Instant::now() + Duration::from_millis(2000 + rng.below(2000))).min(deadline);
    let mut n = 1;
    while Instant::now() < until {
        thread::sleep(Duration::from_millis(250));
        if let Err(e) = echo(&mut s) {
            return format!("allowed session echo: {e}");
        }
        n += 1;
    }
    format!("ok:allowed_ok:{n}")
}

fn echo(s: &mut TcpStream) -> std::result::Result<(), String> {
    let msg = [b'x'; ECHO];
    s.write_all(&msg).map_err(|e| format!("{:?}", e.kind()))?;
    let mut got = [0u8; ECHO];
    s.read_exact(&mut got)
        .map_err(|e| format!("{:?}", e.kind()))?;
    if got != msg {
        return Err("bad echo".into());
    }
    Ok(())
}

/// A command no rule permits: the proxy must close without relaying.
fn denied_command(addr: SocketAddr) -> String {
    let mut s = match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
        Ok(s) => s,
        // The proxy refused so fast that its reset arrived before
        // connect_timeout read SO_ERROR: refused, as it should be.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return "ok:denied_ok:0".into(),
        Err(e) => return format!("denied connect: {:?}", e.kind()),
    };
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.write_all(&[b'd'; ECHO]);
    let mut buf = [0u8; ECHO];
    match s.read(&mut buf) {
        Ok(0) => "ok:denied_ok:0".into(),
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
            "ok:denied_ok:0".into()
        }
        Ok(_) => "denied command was relayed".into(),
        Err(e) => format!("denied read: {:?}", e.kind()),
    }
}

/// A command that needs approval: relayed once approved, closed when denied.
fn held_command(addr: SocketAddr) -> String {
    let mut s = match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return format!("held connect: {:?}", e.kind()),
    };
    let _ = s.set_read_timeout(Some(HOLD_TIMEOUT));
    let _ = s.write_all(&[b'h'; ECHO]);
    let mut got = [0u8; ECHO];
    match s.read_exact(&mut got) {
        Ok(()) => "ok:held_approved:1".into(),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            ) =>
        {
            "ok:held_denied:0".into()
        }
        Err(e) => format!("held read: {:?}", e.kind()),
    }
}

/// xorshift64*: deterministic choices per session without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}
