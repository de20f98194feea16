//! Real HTTP clients behave through Portcullis as they do directly (issue
//! 19, HTTP): Server-Sent Events are not held on masked resources, a `br`
//! body sent unasked is decoded and masked, and an upstream that answers an
//! upload before reading it (nginx `return 200`) is relayed cleanly.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use super::harness::*;

const RULES: &str = r#"
@id("read")
permit(principal == Identity::"agent", action == Action::"http:get", resource == Resource::"api");
@id("write")
permit(principal == Identity::"agent", action == Action::"http:post", resource == Resource::"api");
"#;

/// `tests/e2e/compat_upstream.py`, plain HTTP.
struct PyUpstream {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl PyUpstream {
    fn start(dir: &Path) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/compat_upstream.py");
        let port = free_port();
        let log = dir.join(format!("compat-upstream-{port}.jsonl"));
        fs::write(&log, "").unwrap();
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .args(["--port", &port.to_string(), "--log"])
            .arg(&log)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the compat upstream");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        Self { child, port, log }
    }

    fn requests(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for PyUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Masked {
    _cg: TestCgroup,
    files: DaemonFiles,
    _daemon: Daemon,
    up: PyUpstream,
    place: Placement,
}

/// A plain-HTTP resource `api` with the e-mail detector, in front of the
/// python upstream.
fn masked(name: &str) -> Masked {
    require_root();
    let cg = TestCgroup::new(name);
    let files = DaemonFiles::new(&cg.rel);
    let up = PyUpstream::start(&files.dir);
    files.identities(IDENTITIES);
    files.rules("rules.cedar", RULES);
    fs::write(
        files.policies.join("api.toml"),
        format!(
            "[resource.api]\nprotocol = \"http\"\nmatch = [\"127.0.0.1:{}\"]\ntls = \"none\"\n\n[[mask]]\nresource = \"api\"\ndetectors = [\"email\"]\n",
            up.port
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    Masked {
        _cg: cg,
        files,
        _daemon: daemon,
        up,
        place,
    }
}

/// Runs `curl -N url` (placed or direct) and returns each `data:` line with
/// the time it arrived since the start, and the total time.
fn stream_events(place: Option<&Placement>, url: &str) -> (Vec<(Duration, String)>, Duration) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-N", "--max-time", "30", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(p) = place {
        p.apply(&mut cmd);
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("curl");
    let mut events = Vec::new();
    let reader = BufReader::new(child.stdout.take().unwrap());
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if line.starts_with("data:") {
            events.push((t0.elapsed(), line));
        }
    }
    let total = t0.elapsed();
    let status = child.wait().unwrap();
    assert!(status.success(), "curl failed: {status}");
    (events, total)
}

#[test]
fn server_sent_events_arrive_as_sent_and_masked() {
    let m = masked("compat-sse");
    let url = format!("http://127.0.0.1:{}/sse", m.up.port);
    // Control: directly, the first event is there at once.
    let (direct, direct_total) = stream_events(None, &url);
    assert_eq!(direct.len(), 25);
    assert!(direct[0].0 < Duration::from_secs(1), "{direct:?}");
    assert!(direct_total >= Duration::from_secs(4), "{direct_total:?}");

    let (events, total) = stream_events(Some(&m.place), &url);
    assert_eq!(events.len(), 25, "{events:?}");
    assert!(
        total >= Duration::from_secs(4),
        "the stream takes ~5 s: {total:?}"
    );
    // The first event arrives while the stream is young, and events keep
    // arriving as sent (not in one burst at the end).
    assert!(
        events[0].0 < Duration::from_secs(2),
        "first event at {:?}",
        events[0].0
    );
    assert!(
        events[12].0 + Duration::from_millis(1500) < total,
        "event 12 at {:?}, end at {total:?}",
        events[12].0
    );
    let all: String = events
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!all.contains("@example.com"), "{all}");
    assert_eq!(all.matches("\"who\": \"[MASKED]\"").count(), 13, "{all}");
    assert_eq!(all.matches("\"who\": \"nobody\"").count(), 12, "{all}");
    // Every event is whole JSON after `data: `.
    for (_, l) in &events {
        let v: Value = serde_json::from_str(l.trim_start_matches("data: ")).expect("json event");
        assert!(v["n"].is_u64());
    }
    assert_eq!(m.up.requests().len(), 2);

    // The same stream gzip-encoded (not offered, sent anyway): decoded and
    // masked event by event, still not held.
    let url = format!("http://127.0.0.1:{}/sse-gzip", m.up.port);
    let (events, total) = stream_events(Some(&m.place), &url);
    assert_eq!(events.len(), 25, "{events:?}");
    assert!(
        events[0].0 < Duration::from_secs(2),
        "first gzip event at {:?}",
        events[0].0
    );
    assert!(
        events[12].0 + Duration::from_millis(1500) < total,
        "gzip event 12 at {:?}, end at {total:?}",
        events[12].0
    );
    let all: String = events
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!all.contains("@example.com"), "{all}");
    assert_eq!(all.matches("\"who\": \"[MASKED]\"").count(), 13, "{all}");
}

#[test]
fn a_br_body_sent_unasked_is_decoded_and_masked() {
    let m = masked("compat-br");
    let url = format!("http://127.0.0.1:{}/br", m.up.port);
    let r = curl(&m.place, &[&url]);
    assert_eq!(r.code, 200, "{r:?}");
    let v: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    assert_eq!(v["email"], "[MASKED]");
    assert_eq!(v["ok"], true);
    assert!(
        !r.headers.to_ascii_lowercase().contains("content-encoding"),
        "{}",
        r.headers
    );
    // Offered upstream: only what can be inspected.
    let reqs = m.up.requests();
    assert!(
        reqs.iter().all(|r| r["accept_encoding"] == "identity"),
        "{reqs:?}"
    );
    // Audited as masked.
    wait_until(
        Duration::from_secs(5),
        || {
            super::audit_events(&m.files, &[])
                .iter()
                .any(|e| e["type"] == "command_end" && e["detail"]["masked"]["email"] == 1)
        },
        "masking audited",
    );
}

#[test]
fn an_early_answer_to_an_upload_is_relayed_cleanly_h1_and_h2() {
    require_root();
    let cg = TestCgroup::new("compat-early");
    let files = DaemonFiles::new(&cg.rel);
    let pki = TestPki::new(&files.dir.join("pki"));
    let nginx = NginxUpstream::start(&files.dir, &pki, r#"{"early":true}"#);
    files.identities(IDENTITIES);
    files.rules("rules.cedar", RULES);
    fs::write(
        files.policies.join("api.toml"),
        format!(
            "[resource.api]\nprotocol = \"http\"\nmatch = [\"127.0.0.1:{}\"]\ntls = \"intercept\"\nupstream_ca_file = {:?}\n",
            nginx.port,
            pki.ca.display().to_string(),
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    let ca = daemon.status()["ca_cert"].as_str().unwrap().to_string();
    let url = format!("https://127.0.0.1:{}/upload", nginx.port);
    // 512 KiB: nginx answers `return 200` without reading the body; 16 MiB:
    // it answers 413 (client_max_body_size) before reading it. Both are
    // answers sent before the upload ended.
    for (size, code) in [(512usize << 10, 200u16), (16 << 20, 413)] {
        let upload = files.dir.join(format!("upload-{size}.bin"));
        fs::write(&upload, vec![b'u'; size]).unwrap();
        let data = format!("@{}", upload.display());
        // Control: directly, curl gets the answer and finishes cleanly.
        let direct = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert"])
            .arg(&pki.ca)
            .args(["--http1.1", "--data-binary", &data, &url])
            .output()
            .unwrap();
        assert!(direct.status.success(), "{size}: {direct:?}");
        let direct_body = String::from_utf8_lossy(&direct.stdout).into_owned();
        if code == 200 {
            assert_eq!(direct_body, r#"{"early":true}"#);
        }
        for proto in ["--http1.1", "--http2"] {
            let r = curl(
                &place,
                &["--cacert", &ca, proto, "--data-binary", &data, &url],
            );
            assert!(r.ok, "{size} {proto}: {r:?}\n{}", daemon.log_text());
            assert_eq!(r.code, code, "{size} {proto}: {r:?}");
            assert_eq!(r.body, direct_body, "{size} {proto}: {r:?}");
        }
    }
}

fn grpc_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/compat_grpc.py")
}

/// The grpcio test server (`compat_grpc.py server`), TLS with `pki`.
struct GrpcServer {
    child: Child,
    port: u16,
}

impl GrpcServer {
    fn start(pki: Option<&TestPki>) -> Self {
        let port = free_port();
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(grpc_script())
            .args(["server", &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(p) = pki {
            cmd.arg(&p.cert).arg(&p.key);
        }
        let mut child = cmd.spawn().expect("start the grpc server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "grpc server did not start");
        Self { child, port }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the grpcio client (placed, or directly) and returns its results.
fn grpc_client(place: Option<&Placement>, target: &str, ca: Option<&Path>) -> Value {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(grpc_script()).args(["client", target]);
    if let Some(ca) = ca {
        cmd.arg(ca);
    }
    cmd.env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("grpc_proxy");
    if let Some(p) = place {
        p.apply(&mut cmd);
    }
    let out = cmd.output().expect("grpc client");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "grpc client printed no JSON ({e}): {text} / {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn assert_grpc_works(r: &Value, what: &str) {
    assert!(r.get("error").is_none(), "{what}: {r:#}");
    assert_eq!(r["unary"], "echo:hi", "{what}: {r:#}");
    assert_eq!(r["unary_trailer"], "unary-ok", "{what}: {r:#}");
    assert_eq!(
        r["stream"],
        serde_json::json!(["item0", "item1", "item2", "item3", "item4"]),
        "{what}: {r:#}"
    );
    assert_eq!(r["stream_trailer"], "stream-done", "{what}: {r:#}");
    // Streamed as sent: the first item well before the last.
    let times: Vec<f64> = r["stream_times"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    assert!(times[4] - times[0] > 0.5, "{what}: not streamed: {times:?}");
    assert_eq!(
        r["fail"],
        serde_json::json!(["StatusCode.NOT_FOUND", "no such thing: widget"]),
        "{what}: {r:#}"
    );
    assert_eq!(
        r["deadline"], "StatusCode.DEADLINE_EXCEEDED",
        "{what}: {r:#}"
    );
    assert!(r["deadline_after"].as_f64().unwrap() < 2.5, "{what}: {r:#}");
    assert_eq!(r["sum"], "6", "{what}: {r:#}");
    assert_eq!(
        r["bidi"],
        serde_json::json!(["re:x", "re:y"]),
        "{what}: {r:#}"
    );
}

#[test]
fn grpc_works_through_cleartext_h2c_and_tls_interception() {
    require_root();
    let cg = TestCgroup::new("compat-grpc");
    let files = DaemonFiles::new(&cg.rel);
    let pki = TestPki::new(&files.dir.join("pki"));
    let plain = GrpcServer::start(None);
    let tls = GrpcServer::start(Some(&pki));
    files.identities(IDENTITIES);
    files.rules(
        "rules.cedar",
        &(RULES.replace("Resource::\"api\"", "Resource::\"grpc\"")
            + &RULES
                .replace("Resource::\"api\"", "Resource::\"grpcs\"")
                .replace("@id(\"", "@id(\"s-")),
    );
    fs::write(
        files.policies.join("grpc.toml"),
        format!(
            "[resource.grpc]\nprotocol = \"http\"\nmatch = [\"127.0.0.1:{}\"]\ntls = \"none\"\n\n[resource.grpcs]\nprotocol = \"http\"\nmatch = [\"127.0.0.1:{}\"]\ntls = \"intercept\"\nupstream_ca_file = {:?}\n\n[[mask]]\nresource = \"grpc\"\ndetectors = [\"email\"]\n",
            plain.port,
            tls.port,
            pki.ca.display().to_string(),
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    let ca = PathBuf::from(daemon.status()["ca_cert"].as_str().unwrap());

    // Controls: directly.
    let plain_target = format!("127.0.0.1:{}", plain.port);
    let tls_target = format!("127.0.0.1:{}", tls.port);
    assert_grpc_works(&grpc_client(None, &plain_target, None), "direct h2c");
    assert_grpc_works(&grpc_client(None, &tls_target, Some(&pki.ca)), "direct tls");
    // Through Portcullis: h2c relayed as h2c; TLS intercepted (the client
    // trusts the daemon CA).
    assert_grpc_works(&grpc_client(Some(&place), &plain_target, None), "via h2c");
    assert_grpc_works(
        &grpc_client(Some(&place), &tls_target, Some(&ca)),
        "via tls",
    );
    // Decided and audited per call.
    let cmds: Vec<Value> = super::audit_events(&files, &[])
        .into_iter()
        .filter(|e| e["type"] == "command" && e["decision"] == "allow")
        .collect();
    assert!(
        cmds.iter().any(|e| e["detail"]["command"]
            .as_str()
            .unwrap_or("")
            .contains("/test.Svc/Echo")),
        "{cmds:#?}"
    );
}
