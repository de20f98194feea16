//! End-to-end tests of the `http` protocol handler: real curl, kubectl and
//! Python clients in a tagged cgroup, through the daemon, to a real HTTPS
//! upstream (`http_upstream.py`) with its own test CA.

use std::{fs, path::PathBuf, time::Duration};

use serde_json::{json, Value};

use super::harness::*;

/// The token the daemon injects upstream; agents must never see it.
const UPSTREAM_TOKEN: &str = "upstream-secret-token-4f9a";

struct Http {
    cg: TestCgroup,
    files: DaemonFiles,
    daemon: Daemon,
    upstream: HttpUpstream,
    pki: TestPki,
    place: Placement,
    /// The daemon's CA (what agents trust).
    ca: PathBuf,
}

impl Http {
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.upstream.port)
    }

    fn curl(&self, args: &[&str]) -> Curl {
        let ca = self.ca.display().to_string();
        let mut all = vec!["--cacert", ca.as_str()];
        all.extend_from_slice(args);
        curl(&self.place, &all)
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        super::audit_events(&self.files, &[])
            .into_iter()
            .filter(|e| e["type"] == kind)
            .collect()
    }
}

/// A daemon with one http resource `api` in front of a fresh upstream.
/// `resource_extra` adds TOML keys; `rules` is the Cedar rule set.
fn http_setup(name: &str, tls: &str, resource_extra: &str, rules: &str) -> Http {
    require_root();
    let cg = TestCgroup::new(name);
    let files = DaemonFiles::new(&cg.rel);
    let pki = TestPki::new(&files.dir.join("pki"));
    let upstream = HttpUpstream::start(&files.dir, if tls == "none" { None } else { Some(&pki) });
    let token = files.dir.join("upstream.token");
    fs::write(&token, format!("{UPSTREAM_TOKEN}\n")).unwrap();
    files.identities(IDENTITIES);
    files.rules("rules.cedar", rules);
    let ca_line = if tls == "none" {
        String::new()
    } else {
        format!("upstream_ca_file = {:?}\n", pki.ca.display().to_string())
    };
    fs::write(
        files.policies.join("api.toml"),
        format!(
            "[resource.api]\nprotocol = \"http\"\nmatch = [\"{}\"]\ntls = \"{tls}\"\n{ca_line}record = \"full\"\ncredentials = {{ bearer_token_file = {:?} }}\n{resource_extra}\n",
            upstream.addr(),
            token.display().to_string()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    let ca = PathBuf::from(
        daemon.status()["ca_cert"]
            .as_str()
            .expect("ca_cert in status"),
    );
    Http {
        cg,
        files,
        daemon,
        upstream,
        pki,
        place,
        ca,
    }
}

const GENERIC_RULES: &str = r#"
@id("read")
permit(principal == Identity::"agent", action == Action::"http:get", resource == Resource::"api");
@id("writes-need-approval")
@approval("required")
permit(principal == Identity::"agent", action == Action::"http:post", resource == Resource::"api");
"#;

#[test]
fn http_get_allowed_delete_denied_post_held_then_approved_and_token_injected() {
    let h = http_setup("http-basic", "intercept", "", GENERIC_RULES);
    // The CA is exported 0644 with its key 0600 beside it.
    let key = h.ca.with_file_name("ca.key");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&key).unwrap().permissions()) & 0o777,
        0o600
    );
    let ca_cli = h.daemon.cli_ok(&["ca"]);
    assert_eq!(ca_cli, fs::read_to_string(&h.ca).unwrap());

    // GET: allowed, with the agent's own Authorization replaced upstream.
    let r = h.curl(&[
        "-H",
        "Authorization: Bearer agent-own-token",
        &h.url("/hello"),
    ]);
    assert_eq!(r.code, 200, "{r:?}");
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["hello"], "world");
    assert_eq!(r.http_version, "1.1");

    // DELETE: no rule permits it → 403 JSON naming the reason; never forwarded.
    let r = h.curl(&["-X", "DELETE", &h.url("/items/7")]);
    assert_eq!(r.code, 403, "{r:?}");
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["error"], "forbidden");
    assert!(
        v["message"].as_str().unwrap().contains("http:delete"),
        "{v}"
    );

    // POST: held until approved, then forwarded.
    let place = h.place.clone();
    let ca = h.ca.display().to_string();
    let url = h.url("/items");
    let post = std::thread::spawn(move || {
        curl(
            &place,
            &[
                "--cacert",
                &ca,
                "-H",
                "Content-Type: application/json",
                "-d",
                "{\"n\":1}",
                &url,
            ],
        )
    });
    let pending = h.daemon.wait_pending(1);
    assert_eq!(pending[0]["action"], "http:post");
    assert!(
        h.upstream.requests().iter().all(|r| r["method"] != "POST"),
        "nothing forwarded while held"
    );
    h.daemon
        .cli_ok(&["approve", pending[0]["id"].as_str().unwrap()]);
    let r = post.join().unwrap();
    assert_eq!(r.code, 201, "{r:?}");
    assert!(
        r.headers
            .to_ascii_lowercase()
            .contains("x-portcullis-request"),
        "{r:?}"
    );
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["created"]["n"], 1);

    // Upstream saw the daemon's token on every forwarded request, never the
    // agent's, and never the denied DELETE.
    let reqs = h.upstream.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    for r in &reqs {
        assert_eq!(
            r["authorization"],
            format!("Bearer {UPSTREAM_TOKEN}"),
            "{r}"
        );
    }
    assert!(reqs.iter().all(|r| r["method"] != "DELETE"));

    // Audit: decisions and completions with status and bytes.
    let cmds = h.events("command");
    let decided: Vec<(String, String)> = cmds
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or("").to_string(),
                e["decision"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for want in [
        ("http:get", "allow"),
        ("http:delete", "deny"),
        ("http:post", "hold"),
        ("http:post", "allow"),
    ] {
        assert!(
            decided.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} not in {decided:?}"
        );
    }
    wait_until(
        Duration::from_secs(5),
        || h.events("command_end").len() >= 2,
        "command_end records",
    );
    let ends = h.events("command_end");
    let get_end = ends.iter().find(|e| e["action"] == "http:get").unwrap();
    assert_eq!(get_end["detail"]["status"], 200);
    assert!(get_end["detail"]["bytes_to_client"].as_u64().unwrap() > 0);

    // The session's HAR has every exchange as the agent saw it, and no token.
    h.daemon.cli_ok(&["flows"]);
    let har = wait_for_har(&h.files, 4);
    let entries = har["log"]["entries"].as_array().unwrap();
    let text = har.to_string();
    assert!(!text.contains(UPSTREAM_TOKEN), "token leaked into the HAR");
    assert!(!text.contains("agent-own-token"), "agent token in the HAR");
    let statuses: Vec<u64> = entries
        .iter()
        .map(|e| e["response"]["status"].as_u64().unwrap())
        .collect();
    for s in [200, 403, 201] {
        assert!(statuses.contains(&s), "{statuses:?}");
    }
}

/// Reads every `session.har` under the state dir and returns one document
/// with all their entries, once at least `n` entries exist.
fn wait_for_har(files: &DaemonFiles, n: usize) -> Value {
    let mut all = Vec::new();
    wait_until(
        Duration::from_secs(10),
        || {
            all.clear();
            for dir in fs::read_dir(files.state.join("sessions"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = dir.path().join("session.har");
                if let Ok(text) = fs::read_to_string(&p) {
                    if let Ok(v) = serde_json::from_str::<Value>(&text) {
                        all.extend(v["log"]["entries"].as_array().cloned().unwrap_or_default());
                    }
                }
            }
            all.len() >= n
        },
        "HAR entries",
    );
    json!({"log": {"entries": all}})
}

#[test]
fn http2_via_curl_and_keep_alive() {
    let h = http_setup("http-h2", "intercept", "", GENERIC_RULES);
    let r = h.curl(&["--http2", &h.url("/hello"), &h.url("/hello")]);
    assert_eq!(r.code, 200, "{r:?}");
    assert_eq!(r.http_version, "2", "{r:?}");
    assert_eq!(r.body.matches("\"hello\"").count(), 2, "{r:?}");
    // Two requests on one agent connection: one session.
    let starts = h.events("session_start");
    assert_eq!(starts.len(), 1, "{starts:#?}");
    // HTTP/1.1 keep-alive likewise.
    let r = h.curl(&["--http1.1", &h.url("/hello"), &h.url("/hello")]);
    assert_eq!(r.code, 200, "{r:?}");
    assert_eq!(h.events("session_start").len(), 2);
    assert_eq!(h.upstream.requests().len(), 4);
}

#[test]
fn passthrough_is_decided_on_sni_alone() {
    let rules = r#"
@id("only-localhost")
permit(principal == Identity::"agent", action == Action::"http:connect", resource == Resource::"api")
when { context.host == "localhost" };
"#;
    let h = http_setup("http-pass", "passthrough", "", rules);
    let port = h.upstream.port;
    let upstream_ca = h.pki.ca.display().to_string();
    let resolve = format!("localhost:{port}:127.0.0.1");
    // End-to-end TLS: the agent verifies the upstream's own certificate.
    let r = curl(
        &h.place,
        &[
            "--cacert",
            &upstream_ca,
            "--resolve",
            &resolve,
            &format!("https://localhost:{port}/hello"),
        ],
    );
    assert_eq!(r.code, 200, "{r:?}");
    // Nothing injected: the daemon never saw inside.
    let reqs = h.upstream.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0]["authorization"], Value::Null);
    // Another SNI is denied before a byte reaches the upstream.
    let resolve = format!("other.test:{port}:127.0.0.1");
    let r = curl(
        &h.place,
        &[
            "--cacert",
            &upstream_ca,
            "--resolve",
            &resolve,
            &format!("https://other.test:{port}/hello"),
        ],
    );
    assert!(!r.ok && r.code == 0, "{r:?}");
    assert_eq!(h.upstream.requests().len(), 1);
    let cmds = h.events("command");
    assert!(
        cmds.iter().any(|e| e["action"] == "http:connect"
            && e["decision"] == "deny"
            && e["detail"]["sni"] == "other.test"),
        "{cmds:#?}"
    );
    assert!(cmds.iter().any(|e| e["action"] == "http:connect"
        && e["decision"] == "allow"
        && e["detail"]["sni"] == "localhost"));
}

#[test]
fn malformed_requests_get_400_and_the_daemon_keeps_serving() {
    let h = http_setup("http-bad", "none", "", GENERIC_RULES);
    let port = h.upstream.port;
    let script = format!(
        r#"
import socket, sys
out = []
for payload in [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n", b"\x16\x03\x01\x00\x05hello"]:
    s = socket.create_connection(("127.0.0.1", {port}), timeout=10)
    s.sendall(payload)
    data = b""
    try:
        while True:
            d = s.recv(4096)
            if not d: break
            data += d
    except Exception as e:
        pass
    out.append(data.split(b"\r\n")[0].decode("latin1"))
    s.close()
print("|".join(out))
"#
    );
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.args(["-c", &script]);
    h.place.apply(&mut cmd);
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.trim().split('|').collect();
    assert_eq!(lines.len(), 3, "{text} {out:?}");
    for l in &lines {
        assert!(l.starts_with("HTTP/1.1 400"), "{lines:?}");
    }
    // Still serving, plain HTTP to a plain upstream.
    let r = curl(&h.place, &[&format!("http://127.0.0.1:{port}/hello")]);
    assert_eq!(r.code, 200, "{r:?}");
    assert_eq!(h.upstream.requests().len(), 1);
    assert_eq!(h.daemon.status()["attached"], true);
    let _ = &h.cg;
}
