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
    // "mtls": intercept, and the upstream demands the daemon's client cert.
    let mtls = tls == "mtls";
    let tls = if mtls { "intercept" } else { tls };
    let upstream = HttpUpstream::start_with(
        &files.dir,
        if tls == "none" { None } else { Some(&pki) },
        mtls,
    );
    let token = files.dir.join("upstream.token");
    fs::write(&token, format!("{UPSTREAM_TOKEN}\n")).unwrap();
    files.identities(IDENTITIES);
    files.rules("rules.cedar", rules);
    // Passthrough cannot inject anything (the policy refuses credentials).
    let creds = if tls == "passthrough" {
        String::new()
    } else if mtls {
        format!(
            "credentials = {{ client_cert_file = {:?}, client_key_file = {:?} }}\n",
            pki.client_cert.display().to_string(),
            pki.client_key.display().to_string()
        )
    } else {
        format!(
            "credentials = {{ bearer_token_file = {:?} }}\n",
            token.display().to_string()
        )
    };
    let ca_line = if tls == "none" {
        String::new()
    } else {
        format!("upstream_ca_file = {:?}\n", pki.ca.display().to_string())
    };
    fs::write(
        files.policies.join("api.toml"),
        format!(
            "[resource.api]\nprotocol = \"http\"\nmatch = [\"{}\"]\ntls = \"{tls}\"\n{ca_line}record = \"full\"\n{creds}{resource_extra}\n",
            upstream.addr(),
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
        "--http1.1",
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

    // Python httpx, trusting the daemon CA, is another real client.
    let script = format!(
        "import httpx, json\nr = httpx.get({:?}, verify={:?}, headers={{'Authorization': 'Bearer agent-own-token'}})\nprint(json.dumps({{'status': r.status_code, 'body': r.json()}}))",
        h.url("/hello"),
        h.ca.display().to_string()
    );
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.args(["-c", &script]);
    h.place.apply(&mut cmd);
    let out = cmd.output().unwrap();
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("httpx: {e}: {out:?}"));
    assert_eq!(v["status"], 200);
    assert_eq!(v["body"]["hello"], "world");

    // Upstream saw the daemon's token on every forwarded request, never the
    // agent's, and never the denied DELETE.
    let reqs = h.upstream.requests();
    assert_eq!(reqs.len(), 3, "{reqs:#?}");
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
    // Each entry has the request's headers: as forwarded for an allowed
    // request, as the agent sent them for one Portcullis answered itself.
    for e in entries {
        let names: Vec<String> = e["request"]["headers"]
            .as_array()
            .map(|h| {
                h.iter()
                    .filter_map(|h| h["name"].as_str())
                    .map(str::to_ascii_lowercase)
                    .collect()
            })
            .unwrap_or_default();
        assert!(names.iter().any(|n| n == "user-agent"), "{names:?} in {e}");
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
    // An upgrade (WebSocket, as Kubernetes exec uses) is relayed both ways.
    let script = r#"
import socket, sys
s = socket.create_connection(("127.0.0.1", PORT), timeout=10)
s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    d = s.recv(1)
    if not d: break
    head += d
s.sendall(b"ping over the upgrade")
got = b""
while len(got) < 21:
    d = s.recv(100)
    if not d: break
    got += d
print(head.split(b"\r\n")[0].decode(), "|", got.decode())
"#
    .replace("PORT", &port.to_string());
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.args(["-c", &script]);
    h.place.apply(&mut cmd);
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        "HTTP/1.1 101 Switching Protocols | PING OVER THE UPGRADE",
        "{out:?}"
    );

    // Still serving, plain HTTP to a plain upstream.
    let r = curl(&h.place, &[&format!("http://127.0.0.1:{port}/hello")]);
    assert_eq!(r.code, 200, "{r:?}");
    assert_eq!(h.upstream.requests().len(), 2);
    assert_eq!(h.daemon.status()["attached"], true);
    let _ = &h.cg;
}

const MASK_RULES: &str = r#"
@id("read")
permit(principal == Identity::"agent", action == Action::"http:get", resource == Resource::"api");
"#;

fn masked_setup(name: &str) -> Http {
    http_setup(
        name,
        "intercept",
        "\n[[mask]]\nresource = \"api\"\ndetectors = [\"email\"]\njson_paths = [\"users.*.name\"]\n",
        MASK_RULES,
    )
}

#[test]
fn json_chunked_gzip_and_text_bodies_are_masked_as_they_stream() {
    let h = masked_setup("http-mask");
    // Content-Length JSON: detector hit, body rewritten, still valid JSON.
    let r = h.curl(&["--http1.1", &h.url("/hello")]);
    assert_eq!(r.code, 200, "{r:?}");
    assert!(!r.body.contains("alice@example.com"), "{r:?}");
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["hello"], "world");
    assert_eq!(v["owner"], "[MASKED]");
    // The upstream's Content-Length no longer fits: it must be gone.
    assert!(
        !r.headers.to_ascii_lowercase().contains("content-length"),
        "{}",
        r.headers
    );

    // Chunked upstream body split mid-value, over HTTP/1.1 and HTTP/2.
    for proto in ["--http1.1", "--http2"] {
        let r = h.curl(&[proto, &h.url("/chunked")]);
        assert_eq!(r.code, 200, "{r:?}");
        let v: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        assert_eq!(v["users"][0]["email"], "[MASKED]");
        assert_eq!(v["users"][1]["email"], "[MASKED]");
        assert_eq!(v["users"][0]["name"], "[MASKED]", "json_paths rule");
        assert_eq!(v["total"], 2);
    }

    // gzip: Accept-Encoding narrowed upstream; a server that compresses
    // anyway is decoded, masked and sent as identity.
    for extra in [&[][..], &["--compressed"][..]] {
        let mut args: Vec<&str> = extra.to_vec();
        let url = h.url("/gzip");
        args.push(&url);
        let r = h.curl(&args);
        assert_eq!(r.code, 200, "{r:?}");
        let v: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        assert_eq!(v["email"], "[MASKED]");
        assert_eq!(v["ok"], true);
        assert!(!r.headers.to_ascii_lowercase().contains("content-encoding"));
    }
    let reqs = h.upstream.requests();
    assert!(
        reqs.iter().all(|r| r["accept_encoding"] == "identity"),
        "{reqs:#?}"
    );

    // Text by detector.
    let r = h.curl(&[&h.url("/text")]);
    assert_eq!(r.code, 200, "{r:?}");
    assert_eq!(r.body, "contact [MASKED] for access\n");

    // Malformed JSON fails closed: the body ends in an error, and nothing
    // after the fault reaches the agent.
    let r = h.curl(&["--http1.1", &h.url("/malformed")]);
    assert!(!r.ok, "{r:?}");
    assert!(!r.body.contains("leak@example.com"), "{r:?}");
    assert!(!r.body.contains("garbage"), "{r:?}");

    // Masking counts and the failure reach the audit log.
    wait_until(
        Duration::from_secs(5),
        || {
            h.events("command_end")
                .iter()
                .any(|e| e["detail"]["outcome"] == "mask_error")
        },
        "mask_error recorded",
    );
    let ends = h.events("command_end");
    assert!(
        ends.iter().any(|e| e["detail"]["masked"].is_object()),
        "{ends:#?}"
    );

    // The HAR holds the bodies as the agent saw them: masked.
    let har = wait_for_har(&h.files, 6).to_string();
    assert!(har.contains("[MASKED]"));
    for secret in [
        "alice@example.com",
        "bob@example.com",
        "carol@example.com",
        "dave@example.com",
    ] {
        assert!(!har.contains(secret), "{secret} in the HAR");
    }
}

const K8S_RULES: &str = r#"
@id("k8s-read")
permit(principal == Identity::"agent", action in [Action::"k8s:get", Action::"k8s:list", Action::"k8s:watch"], resource == Resource::"api");
"#;

/// A kubeconfig for the test API server trusting the daemon CA, with the
/// agent's own (unprivileged) token.
fn kubeconfig(h: &Http) -> PathBuf {
    let path = h.files.dir.join("kubeconfig");
    fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: {}\nusers:\n- name: agent\n  user:\n    token: agent-own-token\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: agent\n    namespace: default\ncurrent-context: test\n",
            h.upstream.port,
            h.ca.display()
        ),
    )
    .unwrap();
    path
}

fn kubectl(h: &Http, args: &[&str]) -> std::process::Output {
    let kc = kubeconfig(h);
    let mut cmd = std::process::Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(&kc)
        .arg("--cache-dir")
        .arg(h.files.dir.join("kube-cache"))
        .args(["--request-timeout", "20s"])
        .args(args)
        .env("HOME", &h.files.dir);
    h.place.apply(&mut cmd);
    cmd.output().unwrap()
}

#[test]
fn kubectl_get_allowed_delete_denied_with_status_and_secrets_masked() {
    let h = http_setup("http-k8s", "intercept", "kind = \"kubernetes\"", K8S_RULES);
    let out = kubectl(&h, &["get", "pods", "-o", "name"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "pod/web-1\npod/web-2\n"
    );

    let out = kubectl(&h, &["delete", "pod", "web-1"]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Forbidden") && err.contains("k8s:delete"),
        "{err}"
    );
    assert!(h
        .upstream
        .requests()
        .iter()
        .all(|r| r["method"] != "DELETE"));

    let out = kubectl(&h, &["get", "secret", "db", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "Secret");
    assert_eq!(v["metadata"]["name"], "db");
    assert_eq!(v["data"]["password"], "[MASKED]");
    assert_eq!(v["data"]["username"], "[MASKED]");
    assert_eq!(v["stringData"]["note"], "[MASKED]");
    let out = kubectl(&h, &["get", "secrets", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("web-1"), "{text}");
    assert!(!text.contains("aHVudGVyMi1kYi1wYXNzd29yZA"), "{text}");

    // Pods are not secrets: their values pass.
    let out = kubectl(&h, &["get", "pod", "web-1", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["spec"]["containers"][0]["env"][0]["value"],
        "ops@example.com"
    );

    // The daemon's token went upstream, never the agent's.
    let reqs = h.upstream.requests();
    assert!(!reqs.is_empty());
    for r in &reqs {
        assert_eq!(
            r["authorization"],
            format!("Bearer {UPSTREAM_TOKEN}"),
            "{r}"
        );
    }
    let cmds = h.events("command");
    let del = cmds
        .iter()
        .find(|e| e["action"] == "k8s:delete")
        .expect("delete audited");
    assert_eq!(del["decision"], "deny");
    assert!(cmds.iter().any(|e| e["action"] == "k8s:get"
        && e["decision"] == "allow"
        && e["detail"]["command"]
            .as_str()
            .unwrap_or("")
            .contains("/secrets/db")));
}

/// The Python kubernetes client (Debian's python3-kubernetes) as a second
/// real Kubernetes client: `http_k8s_client.py` prints what it saw as JSON.
#[test]
fn python_kubernetes_client_list_allowed_delete_denied_with_status_and_secret_masked() {
    let h = http_setup(
        "http-k8s-py",
        "intercept",
        "kind = \"kubernetes\"",
        K8S_RULES,
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/e2e/http_k8s_client.py"
    );
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.arg(script)
        .arg(format!("https://127.0.0.1:{}", h.upstream.port))
        .arg(&h.ca)
        .env("HOME", &h.files.dir);
    h.place.apply(&mut cmd);
    let out = cmd.output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("kubernetes client: {e}: {out:?}"));

    // list_namespaced_pod: allowed, the pods deserialized, values unmasked.
    assert_eq!(v["pods"], json!(["web-1", "web-2"]), "{v}");
    assert_eq!(v["pod_env"], "ops@example.com");

    // delete_namespaced_pod: ApiException 403 with a Kubernetes Status.
    let del = &v["delete"];
    assert_eq!(del["raised"], true, "{v}");
    assert_eq!(del["status"], 403, "{v}");
    let status: Value = serde_json::from_str(del["body"].as_str().unwrap_or(""))
        .unwrap_or_else(|e| panic!("Status body: {e}: {del}"));
    assert_eq!(status["kind"], "Status", "{status}");
    assert_eq!(status["apiVersion"], "v1");
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "Forbidden");
    assert_eq!(status["code"], 403);
    assert_eq!(status["details"]["name"], "web-1");
    assert_eq!(status["details"]["kind"], "pods");
    assert!(
        status["message"]
            .as_str()
            .unwrap_or("")
            .contains("k8s:delete"),
        "{status}"
    );
    assert!(h
        .upstream
        .requests()
        .iter()
        .all(|r| r["method"] != "DELETE"));

    // read_namespaced_secret: masked, deserialized and raw alike.
    let s = &v["secret"];
    assert_eq!(s["kind"], "Secret", "{v}");
    assert_eq!(s["metadata"]["name"], "db");
    assert_eq!(s["data"]["password"], "[MASKED]");
    assert_eq!(s["data"]["username"], "[MASKED]");
    assert_eq!(s["stringData"]["note"], "[MASKED]");
    let raw = v["secret_raw"].as_str().unwrap_or("");
    assert!(raw.contains("\"Secret\""), "{raw}");
    let whole = v.to_string();
    for original in [
        "aHVudGVyMi1kYi1wYXNzd29yZA", // base64("hunter2-db-password")
        "hunter2-db-password",
        "YWRtaW4=", // base64("admin")
        "plaintext-note-value",
    ] {
        assert!(
            !whole.contains(original),
            "{original} reached the client: {whole}"
        );
    }

    // The daemon's token went upstream, never the agent's.
    let reqs = h.upstream.requests();
    assert_eq!(reqs.len(), 3, "{reqs:#?}");
    for r in &reqs {
        assert_eq!(
            r["authorization"],
            format!("Bearer {UPSTREAM_TOKEN}"),
            "{r}"
        );
    }
    let cmds = h.events("command");
    assert!(cmds
        .iter()
        .any(|e| e["action"] == "k8s:delete" && e["decision"] == "deny"));
    assert!(cmds
        .iter()
        .any(|e| e["action"] == "k8s:list" && e["decision"] == "allow"));
    assert_eq!(
        cmds.iter()
            .filter(|e| e["action"] == "k8s:get" && e["decision"] == "allow")
            .count(),
        2
    );
}

#[test]
fn a_watch_stream_is_masked_event_by_event() {
    let h = http_setup(
        "http-watch",
        "intercept",
        "kind = \"kubernetes\"",
        K8S_RULES,
    );
    // Each event arrives split in two chunks, 50 ms apart; every line the
    // agent gets must be one complete, masked event.
    let r = h.curl(&[
        "-N",
        &h.url("/api/v1/namespaces/default/secrets?watch=true"),
    ]);
    assert_eq!(r.code, 200, "{r:?}");
    let lines: Vec<&str> = r.body.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 3, "{r:?}");
    for (i, l) in lines.iter().enumerate() {
        let ev: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("event {i}: {e}: {l}"));
        assert_eq!(ev["type"], "ADDED");
        assert_eq!(ev["object"]["metadata"]["name"], format!("w{}", i + 1));
        assert_eq!(ev["object"]["data"]["password"], "[MASKED]");
    }
    // Streaming, not buffered: the upstream pauses 1 s after the first
    // event, and a streaming client (httpx) must have that event before.
    let script = format!(
        "import httpx, json, time\nt0 = time.monotonic()\nout = []\nwith httpx.stream('GET', {:?}, verify={:?}, timeout=20) as r:\n    for line in r.iter_lines():\n        if line.strip():\n            out.append([time.monotonic() - t0, json.loads(line)['object']['data']['password']])\nprint(json.dumps(out))",
        h.url("/api/v1/namespaces/default/secrets?watch=1"),
        h.ca.display().to_string()
    );
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.args(["-c", &script]);
    h.place.apply(&mut cmd);
    let out = cmd.output().unwrap();
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("httpx: {e}: {out:?}"));
    let events = v.as_array().unwrap();
    assert_eq!(events.len(), 3, "{v}");
    let (first, last) = (
        events[0][0].as_f64().unwrap(),
        events[2][0].as_f64().unwrap(),
    );
    assert!(
        last - first >= 0.9,
        "the pause must fall between events: {v}"
    );
    assert!(events.iter().all(|e| e[1] == "[MASKED]"), "{v}");
    let cmds = h.events("command");
    assert!(cmds
        .iter()
        .any(|e| e["action"] == "k8s:watch" && e["decision"] == "allow"));
}

#[test]
fn client_certificate_credentials_reach_an_upstream_that_demands_them() {
    let h = http_setup("http-mtls", "mtls", "", GENERIC_RULES);
    let r = h.curl(&[&h.url("/hello")]);
    assert_eq!(r.code, 200, "{r:?}");
    let reqs = h.upstream.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0]["client_cert"], "portcullis-test-client");
    assert_eq!(reqs[0]["authorization"], Value::Null);
    // An upstream that cannot be verified is a 502, never a blind forward.
    fs::write(&h.pki.ca, fs::read(&h.ca).unwrap()).unwrap();
    let r = h.curl(&[&h.url("/hello")]);
    assert_eq!(r.code, 502, "{r:?}");
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        v["message"].as_str().unwrap().contains("tls handshake"),
        "{v}"
    );
    assert_eq!(h.upstream.requests().len(), 1);
}

#[test]
fn an_http2_upstream_is_multiplexed_and_masked() {
    require_root();
    let cg = TestCgroup::new("http-h2up");
    let files = DaemonFiles::new(&cg.rel);
    let pki = TestPki::new(&files.dir.join("pki"));
    let nginx = NginxUpstream::start(&files.dir, &pki, r#"{"owner":"zed@example.com","ok":true}"#);
    let token = files.dir.join("upstream.token");
    fs::write(&token, UPSTREAM_TOKEN).unwrap();
    files.identities(IDENTITIES);
    files.rules("rules.cedar", MASK_RULES);
    fs::write(
        files.policies.join("api.toml"),
        format!(
            "[resource.api]\nprotocol = \"http\"\nmatch = [\"127.0.0.1:{}\"]\ntls = \"intercept\"\nupstream_ca_file = {:?}\ncredentials = {{ bearer_token_file = {:?} }}\n\n[[mask]]\nresource = \"api\"\ndetectors = [\"email\"]\n",
            nginx.port,
            pki.ca.display().to_string(),
            token.display().to_string()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    let ca = daemon.status()["ca_cert"].as_str().unwrap().to_string();
    let urls: Vec<String> = (0..6)
        .map(|i| format!("https://127.0.0.1:{}/r{i}", nginx.port))
        .collect();
    let mut args = vec![
        "--cacert",
        ca.as_str(),
        "--http2",
        "--parallel",
        "--parallel-immediate",
    ];
    args.extend(urls.iter().map(String::as_str));
    let r = curl(&place, &args);
    assert_eq!(r.code, 200, "{r:?}");
    assert_eq!(r.body.matches("[MASKED]").count(), 6, "{r:?}");
    assert!(!r.body.contains("zed@example.com"), "{r:?}");
    let lines = nginx.requests();
    assert_eq!(lines.len(), 6, "{lines:?}");
    for l in &lines {
        assert!(l.contains("HTTP/2.0"), "{l}");
        assert!(l.contains(&format!("\"Bearer {UPSTREAM_TOKEN}\"")), "{l}");
    }
}

#[test]
fn agent_token_oidc_requires_the_agents_own_valid_token() {
    let h = http_setup(
        "http-oidc",
        "intercept",
        "agent_token = \"oidc\"",
        GENERIC_RULES,
    );
    let own = fs::read_to_string(h.daemon.token_file("agent", "sub-agent", 3600)).unwrap();
    let other = h.files.issuer.token("sub-someone-else", 3600);
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    // Missing, foreign and forged tokens: 401, nothing forwarded.
    for args in [
        vec![],
        vec!["-H".to_string(), bearer(&other)],
        vec!["-H".to_string(), bearer("not.a.jwt")],
    ] {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        let url = h.url("/hello");
        a.push(&url);
        let r = h.curl(&a);
        assert_eq!(r.code, 401, "{r:?}");
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert!(v["message"].as_str().unwrap().contains("http:get"), "{v}");
    }
    assert!(h.upstream.requests().is_empty());
    // The agent's own token: allowed, and replaced by the daemon's upstream.
    let r = h.curl(&["-H", &bearer(own.trim()), &h.url("/hello")]);
    assert_eq!(r.code, 200, "{r:?}");
    let reqs = h.upstream.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0]["authorization"], format!("Bearer {UPSTREAM_TOKEN}"));
    let denied = h
        .events("command")
        .into_iter()
        .filter(|e| e["decision"] == "deny")
        .count();
    assert_eq!(denied, 3);
}
