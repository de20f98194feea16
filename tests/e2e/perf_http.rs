//! End-to-end tests of the HTTP handler's connection reuse: kept-alive
//! agent connections and the daemon's pool of kept-alive upstream
//! connections, against a real nginx whose access log names the connection
//! each request came on (`$connection $connection_requests`). Reuse must
//! not change what is decided and audited: every request on a reused
//! connection is decided and audited on its own, and a denied request in
//! the middle of a kept-alive connection leaves the connection usable.

use std::{
    collections::BTreeSet,
    fs,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use super::harness::*;

const RULES: &str = r#"
@id("read")
permit(principal == Identity::"agent", action == Action::"http:get", resource == Resource::"api");
@id("read-plain")
permit(principal == Identity::"agent", action == Action::"http:get", resource == Resource::"plain");
"#;

const BODY: &str = r#"{"owner":"zed@example.com","ok":true}"#;

/// nginx serving HTTP/1.1 only, in plain text and over TLS, logging per
/// request: `CONNECTION CONNECTION_REQUESTS METHOD URI`.
struct Origin {
    child: Child,
    plain: u16,
    tls: u16,
    log: PathBuf,
}

impl Origin {
    /// `keepalive` is nginx's `keepalive_requests` and `keepalive_timeout`.
    fn start(dir: &Path, pki: &TestPki, keepalive: (u32, &str)) -> Self {
        let prefix = dir.join(unique("origin"));
        fs::create_dir_all(prefix.join("tmp")).expect("nginx prefix");
        let (plain, tls) = (free_port(), free_port());
        let log = prefix.join("access.log");
        let child = spawn_nginx(
            &prefix,
            &format!(
                "  log_format c '$connection $connection_requests $request_method $uri';\n  access_log {} c;\n  keepalive_requests {};\n  keepalive_timeout {};\n  server {{\n    listen 127.0.0.1:{plain};\n    listen 127.0.0.1:{tls} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    location / {{ default_type application/json; return 200 '{BODY}'; }}\n  }}\n",
                log.display(),
                keepalive.0,
                keepalive.1,
                pki.cert.display(),
                pki.key.display(),
            ),
        );
        let o = Self {
            child,
            plain,
            tls,
            log,
        };
        for port in [plain, tls] {
            wait_until(
                Duration::from_secs(10),
                || TcpStream::connect(("127.0.0.1", port)).is_ok(),
                "nginx listening",
            );
        }
        o
    }

    /// `(connection, requests on it so far, method, uri)` per request.
    fn requests(&self) -> Vec<(u64, u64, String, String)> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((
                    f.next()?.parse().ok()?,
                    f.next()?.parse().ok()?,
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                ))
            })
            .collect()
    }

    /// The requests whose URI starts with `prefix`, once there are at
    /// least `n` of them (nginx logs a request after answering it).
    fn requests_under(&self, prefix: &str, n: usize) -> Vec<(u64, u64, String, String)> {
        let under = || -> Vec<_> {
            self.requests()
                .into_iter()
                .filter(|r| r.3.starts_with(prefix))
                .collect()
        };
        wait_until(
            Duration::from_secs(10),
            || under().len() >= n,
            "nginx logged the requests",
        );
        under()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    _cg: TestCgroup,
    files: DaemonFiles,
    _daemon: Daemon,
    origin: Origin,
    place: Placement,
    ca: String,
}

/// A daemon with `api` (TLS interception, the origin verified against its
/// CA) and `plain` (cleartext) in front of one nginx origin, both masked.
fn setup(name: &str, keepalive: (u32, &str)) -> Setup {
    require_root();
    let cg = TestCgroup::new(name);
    let files = DaemonFiles::new(&cg.rel);
    let pki = TestPki::new(&files.dir.join("pki"));
    let origin = Origin::start(&files.dir, &pki, keepalive);
    files.identities(IDENTITIES);
    files.rules("rules.cedar", RULES);
    fs::write(
        files.policies.join("api.toml"),
        format!(
            "[resource.api]\nprotocol = \"http\"\nmatch = [\"127.0.0.1:{}\"]\ntls = \"intercept\"\nupstream_ca_file = {:?}\n\n\
             [resource.plain]\nprotocol = \"http\"\nmatch = [\"127.0.0.1:{}\"]\ntls = \"none\"\n\n\
             [[mask]]\nresource = \"api\"\ndetectors = [\"email\"]\n\n\
             [[mask]]\nresource = \"plain\"\ndetectors = [\"email\"]\n",
            origin.tls,
            pki.ca.display().to_string(),
            origin.plain,
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    let ca = daemon.status()["ca_cert"]
        .as_str()
        .expect("ca_cert in status")
        .to_string();
    Setup {
        _cg: cg,
        files,
        _daemon: daemon,
        origin,
        place,
        ca,
    }
}

impl Setup {
    fn base(&self, resource: &str) -> String {
        match resource {
            "api" => format!("https://127.0.0.1:{}", self.origin.tls),
            _ => format!("http://127.0.0.1:{}", self.origin.plain),
        }
    }

    /// One curl process (one agent connection, kept alive between its
    /// transfers): `(method, path)` each; returns `(status, new
    /// connections made for it)` per transfer and the bodies.
    fn curl_seq(&self, resource: &str, reqs: &[(&str, &str)]) -> (Vec<(u16, u32)>, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["--max-time", "30"]);
        for (i, (method, path)) in reqs.iter().enumerate() {
            if i > 0 {
                cmd.arg("--next");
            }
            cmd.args(["-sS", "--http1.1", "--cacert", &self.ca, "-X", method])
                .args(["-w", "\n@@ %{http_code} %{num_connects}\n"])
                .arg(format!("{}{path}", self.base(resource)));
        }
        self.place.apply(&mut cmd);
        let out = cmd.output().expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let codes = text
            .lines()
            .filter_map(|l| l.strip_prefix("@@ "))
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
            })
            .collect();
        (codes, text)
    }

    fn events(&self, kind: &str, resource: &str) -> Vec<Value> {
        super::audit_events(&self.files, &[])
            .into_iter()
            .filter(|e| e["type"] == kind && e["resource"] == resource)
            .collect()
    }
}

fn distinct_connections(reqs: &[(u64, u64, String, String)]) -> usize {
    reqs.iter().map(|r| r.0).collect::<BTreeSet<_>>().len()
}

#[test]
fn kept_alive_connections_are_pooled_and_every_request_is_still_decided_and_audited() {
    let s = setup("http-pool", (1000, "75s"));
    for resource in ["api", "plain"] {
        let p = format!("/{resource}");
        // One agent connection: a deny in the middle of allowed requests.
        let seq = [
            ("GET", format!("{p}/a1")),
            ("GET", format!("{p}/a2")),
            ("DELETE", format!("{p}/d1")),
            ("GET", format!("{p}/a3")),
            ("GET", format!("{p}/a4")),
        ];
        let seq: Vec<(&str, &str)> = seq.iter().map(|(m, u)| (*m, u.as_str())).collect();
        let (codes, text) = s.curl_seq(resource, &seq);
        assert_eq!(
            codes,
            vec![(200, 1), (200, 0), (403, 0), (200, 0), (200, 0)],
            "{resource}: the agent's connection must be kept alive, across the deny: {text}"
        );
        assert_eq!(text.matches("[MASKED]").count(), 4, "{text}");
        assert!(!text.contains("zed@example.com"), "{text}");
        // Three more agent connections, one request each.
        for i in 0..3 {
            let path = format!("{p}/n{i}");
            let (codes, text) = s.curl_seq(resource, &[("GET", &path)]);
            assert_eq!(codes, vec![(200, 1)], "{text}");
        }

        let seen = s.origin.requests_under(&p, 7);
        let uris: Vec<String> = seen.iter().map(|r| r.3.clone()).collect();
        let want: Vec<String> = ["a1", "a2", "a3", "a4", "n0", "n1", "n2"]
            .iter()
            .map(|u| format!("{p}/{u}"))
            .collect();
        assert_eq!(
            uris, want,
            "{resource}: the denied request never reaches the origin: {seen:?}"
        );
        assert!(seen.iter().all(|r| r.2 == "GET"), "{seen:?}");
        // The upstream saw fewer connections than requests: within one
        // agent connection, and across agent connections (the pool).
        assert!(
            distinct_connections(&seen) < seen.len(),
            "{resource}: no upstream connection was reused: {seen:?}"
        );
        assert!(
            distinct_connections(&seen[4..]) < 3,
            "{resource}: separate agent connections did not share a pooled upstream connection: {seen:?}"
        );
        assert!(seen.iter().any(|r| r.1 >= 2), "{seen:?}");

        // Every request decided and audited on its own.
        let cmds = s.events("command", resource);
        let decided: Vec<(String, String, String)> = cmds
            .iter()
            .map(|e| {
                (
                    e["action"].as_str().unwrap_or("").to_string(),
                    e["decision"].as_str().unwrap_or("").to_string(),
                    e["detail"]["command"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert_eq!(decided.len(), 8, "{decided:?}");
        let all: Vec<(&str, String)> = seq
            .iter()
            .map(|(m, u)| (*m, u.to_string()))
            .chain((0..3).map(|i| ("GET", format!("{p}/n{i}"))))
            .collect();
        for (method, path) in &all {
            let (action, decision) = if *method == "DELETE" {
                ("http:delete", "deny")
            } else {
                ("http:get", "allow")
            };
            let n = decided
                .iter()
                .filter(|(a, d, c)| {
                    a == action && d == decision && c.starts_with(method) && c.ends_with(path)
                })
                .count();
            assert_eq!(n, 1, "{method} {path}: {decided:?}");
        }
        // One completion per forwarded request, each naming its own record.
        // Written when each response body ends, off the request's path.
        wait_until(
            Duration::from_secs(10),
            || s.events("command_end", resource).len() >= 7,
            "a command_end record per forwarded request",
        );
        let ends = s.events("command_end", resource);
        assert_eq!(ends.len(), 7, "{ends:?}");
        let seqs: BTreeSet<u64> = ends
            .iter()
            .filter_map(|e| e["detail"]["command_seq"].as_u64())
            .collect();
        assert_eq!(seqs.len(), 7, "{ends:?}");
        assert!(
            ends.iter().all(|e| e["detail"]["status"] == 200),
            "{ends:?}"
        );
    }
}

#[test]
fn connections_the_origin_closes_are_not_reused() {
    // The origin closes a connection after two requests (`Connection:
    // close` on the second answer) and an idle one after a second.
    let s = setup("http-pool-close", (2, "1s"));
    for resource in ["api", "plain"] {
        let p = format!("/{resource}");
        let paths: Vec<String> = (0..6).map(|i| format!("{p}/c{i}")).collect();
        let seq: Vec<(&str, &str)> = paths.iter().map(|u| ("GET", u.as_str())).collect();
        let (codes, text) = s.curl_seq(resource, &seq);
        assert!(codes.iter().all(|c| c.0 == 200), "{text}");
        assert_eq!(codes.len(), 6, "{text}");
        let seen = s.origin.requests_under(&p, 6);
        assert_eq!(seen.len(), 6, "{seen:?}");
        assert!(seen.iter().all(|r| r.1 <= 2), "{seen:?}");
        assert!(distinct_connections(&seen) >= 3, "{seen:?}");
        // Pooled connections the origin timed out are not used either.
        std::thread::sleep(Duration::from_millis(2500));
        let path = format!("{p}/late");
        let (codes, text) = s.curl_seq(resource, &[("GET", &path)]);
        assert_eq!(codes, vec![(200, 1)], "{text}");
        let late = s.origin.requests_under(&path, 1);
        assert_eq!(late.len(), 1, "{late:?}");
        assert_eq!(late[0].1, 1, "a fresh upstream connection: {late:?}");
    }
}

/// One kept-alive agent connection repeats the same request: each is
/// decided and audited, and once a reload forbids it the very same
/// request on the same connection is denied (the connection's memo of
/// decisions never outlives the policy set it was made under).
#[test]
fn a_repeated_request_is_decided_again_after_a_reload_on_the_same_connection() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let s = setup("http-memo", (1000, "75s"));
    // Prints `STATUS LOCAL_PORT` per request; waits for a line on stdin
    // between the second and the third.
    let script = r#"
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
def get():
    c.request("GET", "/memo/same")
    r = c.getresponse()
    r.read()
    print(r.status, c.sock.getsockname()[1], flush=True)
get(); get()
print("WAIT", flush=True)
sys.stdin.readline()
get()
"#;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script, &s.origin.plain.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    s.place.apply(&mut cmd);
    let mut child = cmd.spawn().expect("python3");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        if out.read_line(&mut l).expect("client output") == 0 {
            break;
        }
        if l.trim() == "WAIT" {
            break;
        }
        lines.push(l.trim().to_string());
    }
    // The plain resource's permit goes.
    s.files.rules(
        "rules.cedar",
        r#"
@id("read")
permit(principal == Identity::"agent", action == Action::"http:get", resource == Resource::"api");
"#,
    );
    s._daemon.cli_ok(&["policy", "reload"]);
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").expect("signal the client");
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("client output");
    lines.extend(rest.lines().map(|l| l.trim().to_string()));
    assert!(child.wait().expect("python3").success(), "{lines:?}");
    let parsed: Vec<(u16, String)> = lines
        .iter()
        .filter_map(|l| {
            let (a, b) = l.split_once(' ')?;
            Some((a.parse().ok()?, b.to_string()))
        })
        .collect();
    assert_eq!(parsed.len(), 3, "{lines:?}");
    let statuses: Vec<u16> = parsed.iter().map(|p| p.0).collect();
    assert_eq!(statuses, vec![200, 200, 403], "{lines:?}");
    assert!(
        parsed.iter().all(|p| p.1 == parsed[0].1),
        "all three requests must travel on one agent connection: {lines:?}"
    );
    let decided: Vec<String> = s
        .events("command", "plain")
        .iter()
        .filter(|e| {
            e["detail"]["command"]
                .as_str()
                .is_some_and(|c| c.ends_with("/memo/same"))
        })
        .map(|e| e["decision"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        decided,
        vec!["allow", "allow", "deny"],
        "every request audited"
    );
    assert_eq!(
        s.origin
            .requests()
            .iter()
            .filter(|r| r.3 == "/memo/same")
            .count(),
        2,
        "the denied request never reaches the origin"
    );
}
