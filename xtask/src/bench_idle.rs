//! `cargo xtask bench idle`: what an idle session costs the daemon. Opens
//! thousands of idle PostgreSQL, SSH and HTTP sessions through Portcullis
//! (the client in the tagged cgroup), one protocol at a time, and reports
//! the daemon's resident memory per session against the target (under
//! 50 KiB each), with PASS/MISS.
//!
//! An idle session is one that did what a client does before it waits:
//! PostgreSQL: startup, the daemon's upstream login, ReadyForQuery;
//! SSH: key exchange and login (no channel yet, so no upstream connection:
//! the daemon logs in upstream at the first channel); HTTP: one keep-alive
//! request answered. Memory per session is the growth of the daemon's RSS
//! from a warm point (the first sessions of the kind open) to all of them
//! open, divided by the live sessions (the daemon's own count) added in
//! between: one-time costs (code
//! paged in, thread caches) are not charged to sessions. Each protocol gets
//! a fresh daemon.
//!
//! Everything it starts (a PostgreSQL cluster, sshd, nginx, the daemon,
//! one asyncio client per protocol) is its own, on free loopback ports,
//! bounded in count and time, and stopped at the end.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    bench_pg::{chown, pg_bin, postgres_ids, Guard},
    bench_ssh, ci,
    session::{run_in_cgroup, Session, SessionConfig},
    util::{catch_interrupts, interrupted, require_root, step, stop_child},
};

/// Names the bench's cgroup root, pin dir and work dir.
const NAME: &str = "portcullis-bench-idle";
/// The target: resident memory per idle session.
const TARGET_KIB: f64 = 50.0;
/// Sessions opened before the warm point of each protocol.
const WARM: u64 = 200;
/// Sessions opened at once by the client.
const CONCURRENCY: u64 = 256;
/// Time bound of opening one protocol's sessions (generous: an SSH login
/// is a key exchange on each side, and the client is one Python thread).
const OPEN_LIMIT: Duration = Duration::from_secs(900);
/// How long the sessions stay open before RSS is read (the daemon settles).
const SETTLE: Duration = Duration::from_secs(2);
/// The protocols measured, in order.
const KINDS: [&str; 3] = ["postgres", "ssh", "http"];
/// Descriptors kept free of sessions in each process (the daemon's own
/// files, the HTTP upstream pool, the client's interpreter).
const FD_MARGIN: u64 = 2_000;
/// Longest `--hold`.
const MAX_HOLD: Duration = Duration::from_secs(900);
/// The HTTP origin's body.
const BODY: &str = r#"{"ok":true}"#;

/// The bench client: opens idle sessions of one kind with asyncio (one
/// thread, no polling while idle), in two steps (a warm batch, then the
/// rest), reporting each step on stdout and waiting for a line on stdin
/// between them; exits when stdin says so (or closes), closing everything.
const CLIENT: &str = r#"
import asyncio, json, resource, sys, time
a = json.loads(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
kind, host, port = a["kind"], "127.0.0.1", a["port"]
held, errors = [], []

async def pg():
    r, w = await asyncio.open_connection(host, port)
    body = (196608).to_bytes(4, "big") + b"user\0postgres\0database\0postgres\0\0"
    w.write((len(body) + 4).to_bytes(4, "big") + body)
    while True:
        t = await r.readexactly(1)
        n = int.from_bytes(await r.readexactly(4), "big")
        payload = await r.readexactly(n - 4)
        if t == b"E":
            raise RuntimeError(payload.decode(errors="replace"))
        if t == b"Z":
            break
    held.append(w)

async def http():
    r, w = await asyncio.open_connection(host, port)
    w.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = (await r.readuntil(b"\r\n\r\n")).decode()
    if not head.startswith("HTTP/1.1 200"):
        raise RuntimeError(head.splitlines()[0])
    length = 0
    for line in head.split("\r\n"):
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    await r.readexactly(length)
    held.append(w)

async def ssh():
    import asyncssh
    c = await asyncssh.connect(host, port=port, username="root", password="unused",
        known_hosts=None, client_keys=None, agent_path=None, keepalive_interval=0)
    held.append(c)

async def one(sem):
    async with sem:
        try:
            await asyncio.wait_for({"postgres": pg, "http": http, "ssh": ssh}[kind](), 60)
        except Exception as e:
            errors.append(type(e).__name__ + ": " + str(e))

async def open_until(total, deadline):
    sem = asyncio.Semaphore(a["concurrency"])
    while len(held) < total and len(errors) < 20 and time.monotonic() < deadline:
        n = min(total - len(held), 1000)
        await asyncio.gather(*(one(sem) for _ in range(n)))

def report(step):
    print(json.dumps({"step": step, "open": len(held), "errors": len(errors), "first_error": errors[0] if errors else None}), flush=True)

async def main():
    deadline = time.monotonic() + a["limit"]
    loop = asyncio.get_running_loop()
    await open_until(a["warm"], deadline)
    report("warm")
    await loop.run_in_executor(None, sys.stdin.readline)
    await open_until(a["count"], deadline)
    report("open")
    await loop.run_in_executor(None, sys.stdin.readline)
    for h in held:
        h.close()
    report("closed")

asyncio.run(main())
"#;

/// One protocol's result.
struct Row {
    kind: &'static str,
    warm: u64,
    open: u64,
    rss_warm_kib: u64,
    rss_open_kib: u64,
    /// Every session the client opened was live (the daemon's count) at
    /// both readings: the figure is clean.
    clean: bool,
    note: Option<String>,
}

impl Row {
    fn per_session_kib(&self) -> Option<f64> {
        let n = self.open.checked_sub(self.warm).filter(|n| *n > 0)?;
        Some(self.rss_open_kib.saturating_sub(self.rss_warm_kib) as f64 / n as f64)
    }
}

/// Runs the benchmark: `sessions` idle SSH and HTTP sessions,
/// `pg_sessions` PostgreSQL ones (each holds a server backend).
pub fn idle(
    sessions: u64,
    pg_sessions: u64,
    only: &[String],
    hold: u64,
    binary: Option<PathBuf>,
) -> Result<()> {
    require_root()?;
    if let Some(k) = only.iter().find(|k| !KINDS.contains(&k.as_str())) {
        bail!("--only: unknown protocol {k:?} (postgres, ssh, http)");
    }
    let hold = Duration::from_secs(hold.min(MAX_HOLD.as_secs()));
    let bin = ci::daemon_binary(binary)?;
    // The limit is raised before anything is started so that all of them
    // inherit it. Per session, a PostgreSQL session holds two descriptors
    // in the daemon (agent and server); an idle SSH session one (no
    // channel, so no upstream connection yet) and an idle HTTP session one
    // (upstream connections are pooled, a few hundred at most); the client
    // holds one per session, nginx one per pooled upstream connection.
    let nofile = raise_nofile((sessions.max(pg_sessions * 2) + 10_000).max(65_536))?;
    // Where the hard limit cannot be raised (no CAP_SYS_RESOURCE), the
    // daemon's descriptors per session bound what can be measured (less a
    // margin for the daemon's own files and the upstream pool).
    let room = nofile.saturating_sub(FD_MARGIN);
    let (sessions, pg_sessions) = (sessions.min(room), pg_sessions.min(room / 2));
    step(&format!(
        "open-file limit {nofile}: {sessions} SSH and HTTP sessions, {pg_sessions} PostgreSQL"
    ));
    let work = PathBuf::from("/tmp").join(NAME);
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;

    let (uid, gid) = postgres_ids()?;
    let pg_dir = work.join("pg");
    fs::create_dir_all(&pg_dir)?;
    chown(&pg_dir, uid, gid)?;
    let password = format!("bench-{}", std::process::id());
    let pg_port = free_port()?;
    let pg = start_postgres(&pg_dir, pg_port, &password, uid, gid, pg_sessions + 20)?;
    let _pg = Guard(Some(pg));
    step(&format!(
        "postgres on 127.0.0.1:{pg_port} (max_connections {})",
        pg_sessions + 20
    ));
    let sshd = bench_ssh::start_sshd(&work.join("sshd"))?;
    step(&format!("sshd on 127.0.0.1:{}", sshd.port));
    let http_port = free_port()?;
    let _nginx = start_nginx(&work.join("nginx"), http_port, nofile)?;
    step(&format!("nginx on 127.0.0.1:{http_port}"));

    let policies = work.join("policies");
    fs::create_dir_all(&policies)?;
    let secret = work.join("secret");
    fs::create_dir_all(&secret)?;
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o700))?;
    fs::write(secret.join("pg.pw"), &password)?;
    let demo = crate::util::repo_root().join("policies").join("demo");
    fs::write(
        policies.join("bench.toml"),
        format!(
            "[resource.idle-pg]\nprotocol = \"postgres\"\nmatch = [\"127.0.0.1:{pg_port}\"]\nupstream_tls = \"disable\"\nrecord = \"off\"\n\
             credentials = {{ user = \"postgres\", password_file = {:?} }}\n\n\
             [resource.idle-ssh]\nprotocol = \"ssh\"\nmatch = [\"127.0.0.1:{}\"]\nrecord = \"off\"\n\
             credentials = {{ user = \"root\", private_key_file = {:?} }}\nknown_hosts = {:?}\n\n\
             [resource.idle-http]\nprotocol = \"http\"\nmatch = [\"127.0.0.1:{http_port}\"]\ntls = \"none\"\nrecord = \"off\"\n\n\
             [issuer.demo]\nurl = \"https://issuer.portcullis.demo\"\njwks_file = {:?}\naudience = \"portcullis\"\n\n\
             [identity.bench-agent]\nissuer = \"demo\"\nsubject = \"system:serviceaccount:agents:demo\"\n",
            secret.join("pg.pw").display().to_string(),
            sshd.port,
            sshd.dir.join("client_ed25519").display().to_string(),
            sshd.dir.join("known_hosts").display().to_string(),
            demo.join("jwks.json").display().to_string()
        ),
    )?;
    fs::write(
        policies.join("bench.cedar"),
        "@id(\"bench-pg\")\npermit(principal == Identity::\"bench-agent\", action in Action::\"postgres\", resource == Resource::\"idle-pg\");\n\
         @id(\"bench-http\")\npermit(principal == Identity::\"bench-agent\", action == Action::\"http:get\", resource == Resource::\"idle-http\");\n",
    )?;
    // The bench measures what sessions cost, not shedding: no memory
    // budget. Idle HTTP/1.1 connections are closed after
    // `http_idle_timeout` (30 s by default, like a web server's keep-alive
    // timeout); opening 10,000 takes minutes, so the first ones would be
    // gone before the last open: the bench raises it to outlast the run.
    let daemon_config = work.join("daemon.toml");
    fs::write(
        &daemon_config,
        format!(
            "[daemon]\nmemory_budget = \"off\"\nhttp_idle_timeout = \"{}s\"\n",
            (OPEN_LIMIT + MAX_HOLD).as_secs() + 300
        ),
    )?;
    catch_interrupts();
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (kind, port, count) in [
        ("postgres", pg_port, pg_sessions),
        ("ssh", sshd.port, sessions),
        ("http", http_port, sessions),
    ] {
        if !only.iter().any(|k| k == kind) {
            continue;
        }
        if interrupted() {
            bail!("interrupted");
        }
        // A fresh daemon per protocol: memory the allocator kept from the
        // previous protocol's sessions would hide this one's growth.
        let mut session = Session::start_with_config(
            &bin,
            &SessionConfig {
                name: NAME,
                policies: policies.clone(),
                listen_port: free_port()?,
                workers: None,
            },
            Some(&daemon_config),
        )?;
        session.tag_agent("bench-agent", Some(&demo.join("agent.token")))?;
        let pid = session.daemon_pid().context("the daemon is not running")?;
        step(&format!(
            "{kind}: opening {count} idle sessions through Portcullis"
        ));
        match measure(&session, pid, kind, port, count, hold) {
            Ok(row) => {
                println!(
                    "    {kind}: {} open, RSS {} KiB at {} (warm) -> {} KiB",
                    row.open, row.rss_warm_kib, row.warm, row.rss_open_kib
                );
                if let Some(n) = &row.note {
                    println!("    {kind}: {n}");
                }
                rows.push(row);
            }
            Err(e) => {
                eprintln!("daemon log ends with:\n{}", session.log_tail(20));
                failures.push(format!("{kind}: {e:#}"));
            }
        }
        wait_sessions_gone(&session, Duration::from_secs(60));
    }
    print_table(&rows, sessions, pg_sessions);
    if !failures.is_empty() {
        bail!("some measurements failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// Opens `count` idle sessions of `kind`, reads the daemon's RSS at the
/// warm point and with all open, then closes them.
fn measure(
    session: &Session,
    pid: u32,
    kind: &'static str,
    port: u16,
    count: u64,
    hold: Duration,
) -> Result<Row> {
    let warm = WARM.min(count / 10).max(1);
    let args = serde_json::json!({
        "kind": kind, "port": port, "count": count, "warm": warm,
        "concurrency": CONCURRENCY, "limit": OPEN_LIMIT.as_secs(),
    });
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", CLIENT, &args.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_in_cgroup(&mut cmd, session.agent_procs_file()?);
    let mut client = Client::spawn(cmd)?;
    let limit = OPEN_LIMIT + Duration::from_secs(30);
    let w = client.step("warm", limit)?;
    thread::sleep(SETTLE);
    let rss_warm_kib = rss_kib(pid).context("cannot read the daemon's RSS")?;
    let live_warm = live_count(session);
    client.go()?;
    let o = client.step("open", limit)?;
    if !hold.is_zero() {
        step(&format!("{kind}: all open; holding them idle for {hold:?}"));
    }
    thread::sleep(SETTLE + hold);
    let rss_open_kib = rss_kib(pid).context("cannot read the daemon's RSS")?;
    let live_open = live_count(session);
    client.go()?;
    let _ = client.step("closed", Duration::from_secs(60));
    let open = o["open"].as_u64().unwrap_or(0);
    let mut note = None;
    if let Some(e) = o["first_error"].as_str() {
        note = Some(format!("{} errors, the first: {e}", o["errors"]));
    }
    if open == 0 {
        bail!(
            "no session opened: {}",
            note.unwrap_or_else(|| "no error reported".into())
        );
    }
    // Sessions the daemon ended meanwhile (an HTTP connection idle past
    // the server's header timeout, an SSH client that missed keepalives)
    // hold nothing: the daemon's own count is what the memory is for.
    let clean = live_warm == w["open"].as_u64() && live_open == Some(open);
    let (warm, open) = match (live_warm, live_open) {
        (Some(lw), Some(lo)) => {
            if lo < open {
                note = Some(format!(
                    "{}the daemon lists {lo} live sessions for the client's {open}; ended meanwhile: {}",
                    note.map(|n| format!("{n}; ")).unwrap_or_default(),
                    end_reasons(session)
                ));
            }
            (lw, lo)
        }
        _ => (w["open"].as_u64().unwrap_or(0), open),
    };
    Ok(Row {
        kind,
        warm,
        open,
        rss_warm_kib,
        rss_open_kib,
        clean,
        note,
    })
}

/// The `session_end` reasons in the daemon's audit log, counted.
fn end_reasons(session: &Session) -> String {
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    let dir = session.state_dir().join("audit");
    let files = fs::read_dir(&dir).into_iter().flatten().flatten();
    for f in files.filter(|f| f.file_name().to_string_lossy().ends_with(".jsonl")) {
        let Ok(text) = fs::read_to_string(f.path()) else {
            continue;
        };
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            if v["type"] == "session_end" {
                let reason = v["reason"].as_str().unwrap_or("?").to_string();
                *counts.entry(reason).or_default() += 1;
            }
        }
    }
    if counts.is_empty() {
        return "none in the audit log".into();
    }
    counts
        .iter()
        .map(|(r, n)| format!("{n} {r:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The daemon's live-session count.
fn live_count(session: &Session) -> Option<u64> {
    session
        .client_output(&["status", "--json"])
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .as_ref()
        .and_then(live_sessions)
}

/// The live-session count in `status --json`.
fn live_sessions(status: &Value) -> Option<u64> {
    status.get("flows")?.as_u64()
}

/// Waits (bounded) until the daemon lists no live session.
fn wait_sessions_gone(session: &Session, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let live = session
            .client_output(&["status", "--json"])
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .as_ref()
            .and_then(live_sessions);
        if live.is_none_or(|n| n == 0) {
            return;
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// The client process: its stdin, and its stdout lines as JSON.
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Client {
    fn spawn(mut cmd: Command) -> Result<Self> {
        let mut child = cmd.spawn().context("cannot start python3")?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().context("no stdout")?;
        thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let (etx, stderr) = mpsc::channel();
        let err = child.stderr.take().context("no stderr")?;
        thread::spawn(move || {
            let mut text = String::new();
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                text.push_str(&l);
                text.push('\n');
            }
            let _ = etx.send(text);
        });
        Ok(Self {
            child,
            stdin,
            lines,
            stderr,
        })
    }

    /// Waits for the report of `name`.
    fn step(&mut self, name: &str, limit: Duration) -> Result<Value> {
        match self.lines.recv_timeout(limit) {
            Ok(line) => {
                let v: Value = serde_json::from_str(&line)
                    .with_context(|| format!("the client printed {line:?}"))?;
                if v["step"] != name {
                    bail!("the client reported {v}, expected step {name}");
                }
                Ok(v)
            }
            Err(_) => {
                stop_child(&mut self.child, Duration::from_secs(2));
                let err = self
                    .stderr
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_default();
                bail!("the client did not report `{name}` in {limit:?}: {err}")
            }
        }
    }

    /// Lets the client take its next step.
    fn go(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("client stdin closed")?;
        stdin.write_all(b"go\n").context("the client is gone")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        drop(self.stdin.take());
        stop_child(&mut self.child, Duration::from_secs(10));
    }
}

fn print_table(rows: &[Row], sessions: u64, pg_sessions: u64) {
    println!();
    println!(
        "{:<12} {:>10} {:>14} {:>14} {:>14} {:>8}",
        "idle memory", "sessions", "RSS warm KiB", "RSS open KiB", "KiB/session", "target"
    );
    for r in rows {
        let per = r
            .per_session_kib()
            .map_or_else(|| "-".to_string(), |k| format!("{k:.1}"));
        println!(
            "{:<12} {:>10} {:>14} {:>14} {:>14} {:>8}",
            r.kind,
            r.open,
            r.rss_warm_kib,
            r.rss_open_kib,
            per,
            format!("<{TARGET_KIB:.0}")
        );
    }
    println!(
        "  asked for {sessions} SSH and HTTP sessions, {pg_sessions} PostgreSQL sessions (each holds a server backend); \
         per session = RSS growth from the warm point to all open / live sessions (the daemon's count) added in between"
    );
    for r in rows {
        // A figure with sessions ended meanwhile is not a measurement:
        // their memory may still be in RSS, or already gone.
        let verdict = match r.per_session_kib() {
            Some(k) if k < TARGET_KIB && r.clean => "PASS",
            _ => "MISS",
        };
        println!(
            "{verdict}: {} idle session under {TARGET_KIB:.0} KiB ({} KiB at {} sessions{})",
            r.kind,
            r.per_session_kib()
                .map_or_else(|| "-".to_string(), |k| format!("{k:.1}")),
            r.open,
            if r.clean {
                ", all live"
            } else {
                "; NOT all live: the daemon ended some"
            }
        );
    }
}

/// Raises this process's open-file limit (soft and hard) to at least
/// `want`, within the kernel's `nr_open`, or the soft limit to the hard
/// one where the hard limit cannot be raised; children inherit it.
fn raise_nofile(want: u64) -> Result<u64> {
    let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        let target = want.min(nr_open).max(lim.rlim_cur);
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max.max(target),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            lim = raised;
        } else {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                bail!("setrlimit: {}", std::io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
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

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// initdb (scram-sha-256 over TCP) and PostgreSQL on 127.0.0.1:`port`
/// with `max_connections`; returns when it accepts connections.
fn start_postgres(
    work: &Path,
    port: u16,
    password: &str,
    uid: u32,
    gid: u32,
    max_connections: u64,
) -> Result<Child> {
    let pg_bin = pg_bin()?;
    let data = work.join("data");
    let pwfile = work.join("initpw");
    fs::write(&pwfile, password)?;
    chown(&pwfile, uid, gid)?;
    let out = Command::new(pg_bin.join("initdb"))
        .arg("-D")
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
        .current_dir(work)
        .output()
        .context("initdb")?;
    if !out.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = fs::remove_file(&pwfile);
    let mut child = Command::new(pg_bin.join("postgres"))
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
        .args(["-c", &format!("max_connections={max_connections}")])
        // Idle backends: keep each one small.
        .args(["-c", "shared_buffers=32MB", "-c", "fsync=off"])
        .arg("-k")
        .arg(work)
        .uid(uid)
        .gid(gid)
        .current_dir(work)
        .stdout(Stdio::null())
        .stderr(fs::File::create(work.join("postgres.log"))?)
        .spawn()
        .context("spawn postgres")?;
    let start = Instant::now();
    loop {
        let ok = Command::new(pg_bin.join("pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(child);
        }
        if start.elapsed() > Duration::from_secs(30) || child.try_wait()?.is_some() {
            stop_child(&mut child, Duration::from_secs(5));
            bail!(
                "postgres did not start; see {}",
                work.join("postgres.log").display()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// nginx answering `BODY` on 127.0.0.1:`port`, keeping idle keep-alive
/// connections for the whole run.
fn start_nginx(prefix: &Path, port: u16, nofile: u64) -> Result<Guard> {
    let _ = fs::remove_dir_all(prefix);
    fs::create_dir_all(prefix.join("tmp"))?;
    let p = prefix.display();
    let conf = format!(
        "daemon off;\nworker_processes 1;\nworker_rlimit_nofile {nofile};\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\n\
         events {{ worker_connections {nofile}; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {p}/tmp/body;\n  proxy_temp_path {p}/tmp/proxy;\n  fastcgi_temp_path {p}/tmp/fastcgi;\n  uwsgi_temp_path {p}/tmp/uwsgi;\n  scgi_temp_path {p}/tmp/scgi;\n\
         keepalive_timeout 600s;\n  keepalive_requests 1000000;\n\
         server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    location / {{ default_type application/json; return 200 '{BODY}'; }}\n  }}\n}}\n"
    );
    let conf_path = prefix.join("nginx.conf");
    fs::write(&conf_path, conf)?;
    let child = Command::new("nginx")
        .arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start nginx (cargo xtask setup installs nginx-light)")?;
    let mut guard = Guard(Some(child));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nginx did not listen on {port}; see {p}/error.log");
        }
        if let Some(c) = guard.0.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("nginx exited ({status}); see {p}/error.log");
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(guard)
}
