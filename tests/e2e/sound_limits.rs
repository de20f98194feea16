//! Issue 14, item 4: what an agent can make the daemon hold in memory.
//! Every frame, header block and inspected body has a cap; what is bigger
//! is refused in the protocol or streamed in bounded pieces; and
//! `[daemon] memory_budget` sheds new sessions (PostgreSQL FATAL 53200,
//! HTTP 503) while the daemon is over it. Each test measures the real
//! daemon's resident memory (`/proc/<pid>/status` VmRSS) while a real
//! client pushes hundreds of MiB through it, against real PostgreSQL and a
//! real HTTP upstream.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use serde_json::{json, Value};

use crate::harness::*;

const BIG_CLIENT: &str = include_str!("pg_big_client.py");

/// A generous bound on how much the daemon may grow while one agent sends
/// a 300 MB message: the old code grew by the whole message.
const RSS_GROWTH_MAX: u64 = 64 << 20;

const PG_RULES: &str = r#"
@id("limits-read")
permit(principal, action in [Action::"postgres:select", Action::"postgres:show", Action::"postgres:set", Action::"postgres:transaction"], resource);
@id("limits-copy-in")
permit(principal, action == Action::"postgres:copy_in", resource);
"#;

const HTTP_RULES: &str = r#"
@id("limits-http-read")
permit(principal == Identity::"agent", action == Action::"http:get", resource == Resource::"api");
@id("limits-ssh-exec")
permit(principal, action == Action::"ssh:exec", resource);
"#;

/// Resident bytes of process `pid`.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// Samples a process's RSS every 20 ms until dropped; keeps the peak.
struct PeakRss {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PeakRss {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = thread::spawn(move || {
            // Bounded: at most ten minutes of samples.
            for _ in 0..30_000 {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(kb) = t
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    {
                        p.fetch_max(kb * 1024, Ordering::Relaxed);
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

struct PgLimits {
    _cg: TestCgroup,
    pg: PgServer,
    files: DaemonFiles,
    daemon: Daemon,
    agent: Placement,
}

fn pg_setup(name: &str) -> PgLimits {
    require_root();
    let cg = TestCgroup::new(name);
    let pg = PgServer::start(name);
    pg.sql(
        "create table customers(id int primary key, name text);
         insert into customers values (1, 'alice'), (2, 'bob');
         create table big(t text);",
    );
    let files = DaemonFiles::new(&cg.rel);
    files.identities(IDENTITIES);
    files.rules("pg.cedar", PG_RULES);
    write_pg_resource(&files, &pg);
    let daemon = Daemon::start(&files);
    let agent_cg = cg.child("agent");
    daemon.tag(&agent_cg, "agent");
    PgLimits {
        agent: Placement::cgroup(cg.dir(&agent_cg)),
        _cg: cg,
        pg,
        files,
        daemon,
    }
}

fn write_pg_resource(files: &DaemonFiles, pg: &PgServer) {
    write_pg_resource_with(files, pg, "");
}

fn write_pg_resource_with(files: &DaemonFiles, pg: &PgServer, extra: &str) {
    std::fs::write(
        files.policies.join("pg.toml"),
        format!(
            "[resource.pg]\nprotocol = \"postgres\"\nmatch = [\"{}\"]\ncredentials = {{ user = \"postgres\", password_file = {:?} }}\n{extra}\n",
            pg.addr(),
            pg.password_file.display().to_string()
        ),
    )
    .unwrap();
}

impl PgLimits {
    /// psql as the agent: (success, stdout, stderr).
    fn psql(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new("psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-w",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            "VERBOSITY=verbose",
        ])
        .arg(format!(
            "host=127.0.0.1 port={} user=agent dbname=postgres sslmode=disable connect_timeout=10",
            self.pg.port
        ))
        .args(args)
        .env_remove("PGPASSWORD");
        self.agent.apply(&mut cmd);
        let out = cmd.output().expect("psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts the raw client with `spec`; returns it once it is halfway.
    fn big_client(&self, mut spec: Value) -> (Child, BufReader<std::process::ChildStdout>) {
        spec["host"] = json!("127.0.0.1");
        spec["port"] = json!(self.pg.port);
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg("-c")
            .arg(BIG_CLIENT)
            .arg(spec.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        self.agent.apply(&mut cmd);
        let mut child = cmd.spawn().expect("python3");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("client line");
        let v: Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("client said {line:?}: {e}"));
        assert_eq!(v["half"], true, "the client did not get halfway: {v}");
        (child, out)
    }

    fn finish_client(mut child: Child, mut out: BufReader<std::process::ChildStdout>) -> Value {
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"go\n");
        }
        let mut line = String::new();
        out.read_line(&mut line).expect("client result");
        let _ = child.wait();
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("client said {line:?}: {e}"))
    }
}

fn audit_has(files: &DaemonFiles, needle: &str) -> bool {
    audit_tail(files)
        .iter()
        .any(|e| e.to_string().contains(needle))
}

/// (a) A Query header claiming 1 GiB, then 300 MB of body: the agent gets
/// FATAL 54000 naming the cap, the daemon does not buffer the body (its
/// RSS stays within a bound the old code broke by ~300 MB), a session
/// opened meanwhile works, and the refusal is audited. Controls: a 512 KiB
/// statement through psql runs; a 2 MiB one gets 54000 in psql's output.
#[test]
fn pg_query_claiming_1gib_is_refused_with_bounded_memory_and_others_carry_on() {
    let p = pg_setup("lim-pgq");
    let pid = p.daemon.child.id();
    // Let the daemon settle (first sessions allocate pools).
    let (ok, out, err) = p.psql(&["-c", "select count(*) from customers"]);
    assert!(ok && out.trim() == "2", "{out} {err}");
    let base = rss(pid);
    let peak = PeakRss::start(pid);
    let (child, out) = p.big_client(json!({
        "mode": "oversized_query",
        "claim": 1u64 << 30,
        "send": 300u64 << 20,
    }));
    // Another session at the same time: served as usual.
    let (ok, o, e) = p.psql(&["-c", "select name from customers order by id"]);
    assert!(ok, "a concurrent session works: {o} {e}");
    assert_eq!(o.trim(), "alice\nbob");
    let r = PgLimits::finish_client(child, out);
    let peak = peak.peak();
    assert_eq!(r["logged_in"], true, "{r}");
    let err = &r["errors"][0];
    assert_eq!(err["C"], "54000", "program_limit_exceeded: {r}");
    assert_eq!(err["S"], "FATAL", "{r}");
    let msg = err["M"].as_str().unwrap_or("");
    assert!(
        msg.contains("exceeds pg_max_statement") && msg.contains("Query"),
        "{msg}"
    );
    assert!(r["closed"] == true, "the connection is closed: {r}");
    assert!(
        peak.saturating_sub(base) < RSS_GROWTH_MAX,
        "daemon RSS grew from {base} to {peak} bytes while a 300 MB Query was sent"
    );
    assert!(
        audit_has(&p.files, "exceeds pg_max_statement"),
        "refusal audited"
    );
    assert!(
        p.daemon.log_text().contains("exceeds pg_max_statement"),
        "and logged"
    );
    // The daemon carries on.
    let (ok, o, _) = p.psql(&["-c", "select 1"]);
    assert!(ok && o.trim() == "1");

    // psql: under the cap runs, over it is refused in the protocol.
    let dir = p.files.dir.clone();
    let small = dir.join("small.sql");
    std::fs::write(
        &small,
        format!("select length('{}');\n", "a".repeat(512 << 10)),
    )
    .unwrap();
    let (ok, o, e) = p.psql(&["-f", small.to_str().unwrap()]);
    assert!(ok, "a 512 KiB statement is under the 1 MiB default: {e}");
    assert_eq!(o.trim(), (512 << 10).to_string());
    let large = dir.join("large.sql");
    std::fs::write(
        &large,
        format!("select length('{}');\n", "a".repeat(2 << 20)),
    )
    .unwrap();
    let (ok, _, e) = p.psql(&["-f", large.to_str().unwrap()]);
    assert!(!ok, "a 2 MiB statement is refused");
    assert!(
        e.contains("54000") && e.contains("pg_max_statement"),
        "psql prints the in-protocol error: {e}"
    );
}

/// "N connections kill it": four agents at once, each claiming a 1 GiB
/// Query and sending 100 MB, all paused halfway together. Each gets 54000;
/// the daemon's RSS stays bounded throughout and a fifth session works.
#[test]
fn pg_many_oversized_queries_at_once_stay_bounded() {
    let p = pg_setup("lim-many");
    let pid = p.daemon.child.id();
    let (ok, _, err) = p.psql(&["-c", "select 1"]);
    assert!(ok, "{err}");
    let base = rss(pid);
    let peak = PeakRss::start(pid);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            p.big_client(json!({
                "mode": "oversized_query",
                "claim": 1u64 << 30,
                "send": 100u64 << 20,
            }))
        })
        .collect();
    let (ok, o, e) = p.psql(&["-c", "select count(*) from customers"]);
    assert!(ok && o.trim() == "2", "a fifth session works: {o} {e}");
    for (child, out) in clients {
        let r = PgLimits::finish_client(child, out);
        assert_eq!(r["errors"][0]["C"], "54000", "{r}");
    }
    let peak = peak.peak();
    assert!(
        peak.saturating_sub(base) < RSS_GROWTH_MAX,
        "daemon RSS grew from {base} to {peak} bytes with four 1 GiB claims in flight"
    );
}

/// CopyData is not held whole: one 128 MiB CopyData message after an
/// allowed COPY FROM STDIN streams to the server in bounded pieces (every
/// row lands) while the daemon's RSS stays bounded.
#[test]
fn pg_huge_copy_data_streams_through_with_bounded_memory() {
    let p = pg_setup("lim-copy");
    let pid = p.daemon.child.id();
    let (ok, _, err) = p.psql(&["-c", "select 1"]);
    assert!(ok, "{err}");
    let base = rss(pid);
    let peak = PeakRss::start(pid);
    let rows = 128 * 1024;
    let (child, out) = p.big_client(json!({
        "mode": "copy_big", "table": "big", "rows": rows, "width": 1024,
    }));
    let (ok, o, e) = p.psql(&["-c", "select count(*) from customers"]);
    assert!(ok && o.trim() == "2", "a concurrent session works: {o} {e}");
    let r = PgLimits::finish_client(child, out);
    let peak = peak.peak();
    assert_eq!(r["errors"], json!([]), "{r}");
    assert_eq!(r["tags"][0], format!("COPY {rows}"), "{r}");
    assert_eq!(
        p.pg.sql("select count(*) from big").trim(),
        rows.to_string()
    );
    assert!(
        peak.saturating_sub(base) < RSS_GROWTH_MAX,
        "daemon RSS grew from {base} to {peak} bytes while a 128 MiB CopyData streamed"
    );
    // Control: psql's own \copy (libpq: CopyData per line, CopyDone).
    let file = p.files.dir.join("rows.txt");
    std::fs::write(&file, "psql-row\n".repeat(1000)).unwrap();
    let (ok, o, e) = p.psql(&["-c", &format!("\\copy big from '{}'", file.display())]);
    assert!(ok, "{o} {e}");
    assert_eq!(
        p.pg.sql("select count(*) from big where t = 'psql-row'")
            .trim(),
        "1000"
    );
}

struct HttpLimits {
    _cg: TestCgroup,
    files: DaemonFiles,
    daemon: Daemon,
    upstream: HttpUpstream,
    place: Placement,
    /// With a config: a real sshd behind resource `box`.
    sshd: Option<SshServer>,
}

/// A daemon with a plain-HTTP resource `api` (JSON masked by the email
/// detector) and, when `pg` is given, the `pg` resource too.
fn http_setup(
    name: &str,
    extra_args: &[&str],
    config: Option<&str>,
) -> (HttpLimits, Option<PgServer>) {
    require_root();
    let cg = TestCgroup::new(name);
    let mut files = DaemonFiles::new(&cg.rel);
    files.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
    if let Some(c) = config {
        std::fs::write(files.config_file(), c).unwrap();
    }
    let upstream = HttpUpstream::start(&files.dir, None);
    files.identities(IDENTITIES);
    files.rules("rules.cedar", &format!("{HTTP_RULES}\n{PG_RULES}"));
    std::fs::write(
        files.policies.join("api.toml"),
        format!(
            "[resource.api]\nprotocol = \"http\"\nmatch = [\"{}\"]\ntls = \"none\"\n\n[[mask]]\nresource = \"api\"\ndetectors = [\"email\"]\n",
            upstream.addr()
        ),
    )
    .unwrap();
    // Agent-side TLS on: a shed session answers the SSLRequest with TLS
    // and sends its FATAL through it.
    let pg = config.map(|_| {
        let pg = PgServer::start(name);
        write_pg_resource_with(&files, &pg, "ssl = \"on\"");
        pg
    });
    let sshd = config.map(|_| {
        let sshd = SshServer::start(name);
        std::fs::write(
            files.policies.join("box.toml"),
            format!(
                "[resource.box]\nprotocol = \"ssh\"\nmatch = [\"127.0.0.1:{}\"]\ncredentials = {{ user = \"root\", private_key_file = {:?} }}\nknown_hosts = {:?}\n",
                sshd.port,
                sshd.upstream_key.display().to_string(),
                sshd.known_hosts.display().to_string(),
            ),
        )
        .unwrap();
        sshd
    });
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    (
        HttpLimits {
            _cg: cg,
            files,
            daemon,
            upstream,
            place,
            sshd,
        },
        pg,
    )
}

/// (c) An HTTP request whose header block is over `http_max_header` gets
/// 431 and never reaches the upstream; a gzip'd JSON response that decodes
/// to 512 MiB on a masked resource is cut off at `http_max_decoded_body`
/// (fail closed: the agent gets a broken transfer, never more than the
/// cap), decoded slice by slice in bounded memory. Controls: a normal
/// request is answered and masked; a small gzip'd body is decoded whole.
#[test]
fn http_header_block_cap_and_a_gzip_bomb_fail_closed_in_bounded_memory() {
    let (h, _) = http_setup("lim-http", &["--http-max-decoded-body", "64MiB"], None);
    let url = |p: &str| format!("http://{}{p}", h.upstream.addr());
    let ok = curl(&h.place, &[&url("/hello")]);
    assert_eq!(ok.code, 200, "{ok:?}");
    assert!(
        !ok.body.contains("alice@example.com"),
        "masked: {}",
        ok.body
    );

    let big = format!("X-Big: {}", "a".repeat(100 << 10));
    let r = curl(&h.place, &["-H", &big, &url("/items/too-big-header")]);
    assert_eq!(r.code, 431, "{r:?}");
    assert!(
        !h.upstream
            .requests()
            .iter()
            .any(|q| q.to_string().contains("too-big-header")),
        "an oversized head never reaches the upstream"
    );
    // Just under the default 64 KiB cap: served.
    let fits = format!("X-Big: {}", "a".repeat(32 << 10));
    let r = curl(&h.place, &["-H", &fits, &url("/items/fits")]);
    assert_eq!(r.code, 200, "{r:?}");

    let small = curl(&h.place, &[&url("/gzip")]);
    assert_eq!(small.code, 200, "{small:?}");
    assert!(small.body.contains("\"ok\""), "decoded: {}", small.body);
    assert!(
        !small.body.contains("carol@example.com"),
        "masked: {}",
        small.body
    );

    let pid = h.daemon.child.id();
    let base = rss(pid);
    let peak = PeakRss::start(pid);
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "120",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
    ])
    .arg(url("/gzip-bomb?mb=512"));
    h.place.apply(&mut cmd);
    let out = cmd.output().expect("curl");
    let peak = peak.peak();
    let w = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut it = w.split_whitespace();
    let code = it.next().unwrap_or("");
    let size: u64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX);
    assert!(
        !out.status.success(),
        "the bomb is cut off, not completed: {w} {out:?}"
    );
    assert_eq!(code, "200", "headers were on their way: {w}");
    assert!(
        size <= 64 << 20,
        "no more than the cap reached the agent: {size}"
    );
    assert!(
        peak.saturating_sub(base) < RSS_GROWTH_MAX,
        "daemon RSS grew from {base} to {peak} bytes while a 512 MiB gzip bomb went by"
    );
    wait_until(
        Duration::from_secs(10),
        || {
            audit_tail(&h.files).iter().any(|e| {
                let t = e.to_string();
                t.contains("mask_error") && t.contains("http_max_decoded_body")
            })
        },
        "the cut audited as a mask error naming http_max_decoded_body",
    );
    // The daemon carries on.
    let again = curl(&h.place, &[&url("/hello")]);
    assert_eq!(again.code, 200, "{again:?}");
}

/// (b) `[daemon] memory_budget` below the daemon's own RSS: a new
/// PostgreSQL session gets FATAL 53200 in psql's output and HTTP gets 503
/// JSON; both are audited and counted. The same daemon restarted with the
/// default budget serves both normally.
#[test]
fn memory_budget_sheds_new_sessions_in_protocol_and_the_default_serves() {
    let (h, pg) = http_setup(
        "lim-budget",
        &[],
        Some("[daemon]\nmemory_budget = \"1MiB\"\n"),
    );
    let pg = pg.expect("pg");
    assert!(
        h.daemon.log_text().contains("memory_budget=1.0 MiB"),
        "the budget in force is logged"
    );
    let psql = |place: &Placement| {
        let mut cmd = Command::new("psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-w",
            "-v",
            "VERBOSITY=verbose",
            "-c",
            "select 42",
        ])
        .arg(format!(
            "host=127.0.0.1 port={} user=agent dbname=postgres sslmode=require connect_timeout=10",
            pg.port
        ))
        .env_remove("PGPASSWORD");
        place.apply(&mut cmd);
        let out = cmd.output().expect("psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = psql(&h.place);
    assert!(!ok, "shed");
    assert!(
        err.contains("FATAL:  portcullis is over its memory budget"),
        "psql shows the FATAL: {err}"
    );
    // The SQLSTATE (psql does not print it for a failed connection).
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg("-c")
        .arg(BIG_CLIENT)
        .arg(json!({"host": "127.0.0.1", "port": pg.port, "mode": "login"}).to_string());
    h.place.apply(&mut cmd);
    let out = cmd.output().expect("python3");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{out:?}: {e}"));
    assert_eq!(r["logged_in"], false, "{r}");
    assert_eq!(r["errors"][0]["C"], "53200", "out_of_memory: {r}");
    assert_eq!(r["errors"][0]["S"], "FATAL", "{r}");
    let url = format!("http://{}/hello", h.upstream.addr());
    let r = curl(&h.place, &[&url]);
    assert_eq!(r.code, 503, "{r:?}");
    let v: Value = serde_json::from_str(&r.body).expect("JSON body");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("over its memory budget"),
        "{v}"
    );
    assert!(
        h.upstream.requests().is_empty(),
        "nothing reached the upstream"
    );
    assert!(
        h.daemon.refused("memory_budget") >= 3,
        "{}",
        h.daemon.status()
    );
    let shed: Vec<Value> = audit_tail(&h.files)
        .into_iter()
        .filter(|e| e["type"] == "flow_refused" && e.to_string().contains("memory budget"))
        .collect();
    assert!(shed.len() >= 3, "audited: {shed:?}");
    assert!(h.daemon.log_text().contains("new session shed"), "logged");
    let status = h.daemon.status();
    assert_eq!(status["memory"]["shedding"], true, "{status}");
    assert_eq!(status["memory"]["budget_bytes"], 1 << 20, "{status}");
    assert!(
        h.daemon
            .cli_ok(&["status"])
            .contains("OVER: new sessions are shed"),
        "status says so"
    );

    // The same daemon files with the default budget: served.
    let sshd = h.sshd.as_ref().expect("sshd");
    let agent_kh = sshd.agent_known_hosts(&h.files.state.join("ssh").join("host_ed25519.pub"));
    let ssh = |place: &Placement| {
        let mut cmd = Command::new("ssh");
        cmd.args(sshd.ssh_opts(&agent_kh))
            .args([
                "-p",
                &sshd.port.to_string(),
                "root@127.0.0.1",
                "echo",
                "ssh-ran",
            ])
            .stdin(Stdio::null());
        place.apply(&mut cmd);
        cmd.output().expect("ssh")
    };
    let out = ssh(&h.place);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ssh is shed: {out:?}");
    assert!(
        err.contains("over its memory budget"),
        "ssh shows the banner: {err}"
    );
    assert!(
        h.daemon.refused("memory_budget") >= 4,
        "{}",
        h.daemon.status()
    );

    let HttpLimits {
        _cg,
        files,
        mut daemon,
        upstream,
        place,
        sshd: _,
    } = h;
    daemon.kill9();
    drop(daemon);
    std::fs::remove_file(files.config_file()).unwrap();
    let daemon = Daemon::start(&files);
    let (ok, out, err) = psql(&place);
    assert!(ok, "default budget serves: {err}");
    assert_eq!(out.trim(), "42");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg("-c")
        .arg(BIG_CLIENT)
        .arg(json!({"host": "127.0.0.1", "port": pg.port, "mode": "login"}).to_string());
    place.apply(&mut cmd);
    let out = cmd.output().expect("python3");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{out:?}: {e}"));
    assert_eq!(r["logged_in"], true, "{r}");
    let r = curl(&place, &[&format!("http://{}/hello", upstream.addr())]);
    assert_eq!(r.code, 200, "{r:?}");
    let out = ssh(&place);
    assert!(out.status.success(), "default budget serves ssh: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ssh-ran");
    assert_eq!(daemon.refused("memory_budget"), 0);
}

/// Server direction: a 100 MB result row on an unmasked resource streams to
/// the agent in bounded pieces (the daemon's RSS stays bounded); on a
/// masked resource a row over `pg_max_message` cannot be masked in bounded
/// memory, so the session fails closed with 54000 and the row never
/// reaches the agent. Control: small masked rows are served.
#[test]
fn pg_big_rows_stream_unmasked_and_fail_closed_when_masked() {
    let p = pg_setup("lim-rows");
    let pid = p.daemon.child.id();
    let (ok, _, err) = p.psql(&["-c", "select 1"]);
    assert!(ok, "{err}");
    let base = rss(pid);
    let peak = PeakRss::start(pid);
    let (ok, out, err) = p.psql(&[
        "-c",
        "select length(repeat('x', 100000000)), repeat('x', 100000000)",
    ]);
    let peak = peak.peak();
    assert!(ok, "{err}");
    assert!(out.starts_with("100000000|xxxx"), "the whole row arrived");
    assert_eq!(out.trim_end().len(), "100000000|".len() + 100_000_000);
    assert!(
        peak.saturating_sub(base) < RSS_GROWTH_MAX,
        "daemon RSS grew from {base} to {peak} bytes while a 100 MB row went by"
    );

    // Masked: the row must be held whole to be masked, and it is too big.
    let toml = p.files.policies.join("pg.toml");
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push_str("\n[[mask]]\nresource = \"pg\"\ndetectors = [\"email\"]\nstyle = \"redact\"\n");
    std::fs::write(&toml, text).unwrap();
    p.daemon.cli_ok(&["policy", "reload"]);
    let (ok, out, err) = p.psql(&[
        "-c",
        "select 'bob@example.com' as e, repeat('x', 1000) as pad",
    ]);
    assert!(ok, "{err}");
    assert!(!out.contains("bob@example.com"), "masked: {out}");
    let (ok, out, err) = p.psql(&[
        "-c",
        "select 'bob@example.com' as e, repeat('x', 20000000) as pad",
    ]);
    assert!(!ok, "fails closed: {out}");
    assert!(
        !out.contains("bob@example.com") && !out.contains("xxxx"),
        "nothing unmasked reached the agent"
    );
    assert!(
        err.contains("54000") && err.contains("pg_max_message"),
        "psql prints why: {err}"
    );
    let (ok, _, err) = p.psql(&["-c", "select 1"]);
    assert!(ok, "the daemon carries on: {err}");
}
