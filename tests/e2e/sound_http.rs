//! Soundness of the `http` handler (issue 14, items 7 and 8): the path and
//! the authority are decided in the form the upstream routes, and forwarded
//! in exactly that form. Every test drives real curl (or a raw socket for
//! what curl will not send) through the daemon to the real test upstream
//! (`http_upstream.py`, which logs each request's method, path and Host),
//! and checks differentially that every request the upstream received is
//! one the audit log shows as allowed, with the same path and Host.

use std::{collections::HashSet, fs, process::Command};

use serde_json::Value;

use super::harness::*;

struct Sound {
    _cg: TestCgroup,
    files: DaemonFiles,
    _daemon: Daemon,
    upstream: HttpUpstream,
    place: Placement,
}

impl Sound {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.upstream.port)
    }

    fn curl(&self, args: &[&str]) -> Curl {
        curl(&self.place, args)
    }

    fn commands(&self) -> Vec<Value> {
        super::audit_events(&self.files, &[])
            .into_iter()
            .filter(|e| e["type"] == "command")
            .collect()
    }

    /// The differential check: every request the upstream received is an
    /// allowed command of the audit log, with the same method, Host and
    /// path (query included). Returns the upstream's requests.
    fn upstream_saw_only_allowed(&self) -> Vec<Value> {
        let allowed: HashSet<String> = self
            .commands()
            .iter()
            .filter(|e| e["decision"] == "allow")
            .filter_map(|e| e["detail"]["command"].as_str().map(str::to_string))
            .collect();
        let got = self.upstream.requests();
        for r in &got {
            let seen = format!(
                "{} {}{}",
                r["method"].as_str().unwrap_or("?"),
                r["host"].as_str().unwrap_or("<no Host>"),
                r["path"].as_str().unwrap_or("?")
            );
            assert!(
                allowed.contains(&seen),
                "the upstream executed {seen:?}, which the audit log does not show as allowed: {allowed:#?}"
            );
        }
        got
    }

    /// Runs a Python snippet in the agent's cgroup (raw sockets for what
    /// curl will not send); `PORT` is replaced by the upstream's port.
    fn python(&self, script: &str) -> String {
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.args([
            "-c",
            &script.replace("PORT", &self.upstream.port.to_string()),
        ]);
        self.place.apply(&mut cmd);
        let out = cmd.output().expect("python3");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A daemon with one plain-HTTP resource `api` (`kind`: "" or
/// "kubernetes") in front of a fresh test upstream, governed by `rules`.
fn sound_setup(name: &str, kind: &str, rules: &str) -> Sound {
    require_root();
    let cg = TestCgroup::new(name);
    let files = DaemonFiles::new(&cg.rel);
    let upstream = HttpUpstream::start(&files.dir, None);
    files.identities(IDENTITIES);
    files.rules("rules.cedar", rules);
    let kind = if kind.is_empty() {
        String::new()
    } else {
        format!("kind = \"{kind}\"\n")
    };
    fs::write(
        files.policies.join("api.toml"),
        format!(
            "[resource.api]\nprotocol = \"http\"\nmatch = [\"{}\"]\ntls = \"none\"\nrecord = \"full\"\n{kind}",
            upstream.addr(),
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    Sound {
        _cg: cg,
        files,
        _daemon: daemon,
        upstream,
        place,
    }
}

const K8S_RULES: &str = r#"
@id("k8s-all")
permit(principal == Identity::"agent", action in Action::"k8s", resource == Resource::"api");
@id("no-secret-db")
forbid(principal, action in Action::"k8s", resource) when { context.resource == "secrets" && context.name == "db" };
@id("no-watch")
forbid(principal, action == Action::"k8s:watch", resource);
"#;

#[test]
fn k8s_encoded_and_dotted_paths_are_decided_as_the_api_server_routes_them() {
    let s = sound_setup("snd-k8s", "kubernetes", K8S_RULES);
    // Spellings of `secrets/db` the API server (Go's decoded URL.Path)
    // routes as secrets/db: decided as secrets, so the forbid holds.
    for p in [
        "/api/v1/namespaces/default/secret%73/db",
        "/api/v1/namespaces/default/%73%65crets/d%62",
        "/api/v1/namespaces/default/pods/../secrets/db",
        "/api/v1/namespaces/default/pods/%2e%2e/secrets/db",
        "/api/v1/namespaces/default/pods/.%2E/secrets/db",
        "/api/v1/namespaces/default/./secrets/db",
    ] {
        let r = s.curl(&["--path-as-is", &s.url(p)]);
        assert_eq!(r.code, 403, "{p}: {r:?}");
        assert!(r.body.contains("no-secret-db"), "{p}: {r:?}");
    }
    // A list narrowed to one name is authorized as that name (as the API
    // server's RBAC sees it).
    let r =
        s.curl(&[&s.url("/api/v1/namespaces/default/secrets?fieldSelector=metadata.name%3Ddb")]);
    assert_eq!(r.code, 403, "{r:?}");
    assert!(r.body.contains("no-secret-db"), "{r:?}");
    // Forms two servers could read differently: refused, with why.
    for (p, why) in [
        ("/api/v1/namespaces/default/secrets%2Fdb", "encoded slash"),
        ("/api/v1/namespaces/default%2Fsecrets/db", "encoded slash"),
        ("/api/v1/namespaces/default/secrets%5Cdb", "backslash"),
        ("/api/v1/namespaces/default/secrets/db%00", "control byte"),
        (
            "/api/../../../api/v1/namespaces/default/secrets/db",
            "above the root",
        ),
        (
            "/api/v1/namespaces//default/secrets/db",
            "empty path segment",
        ),
        (
            "/api/v1/namespaces/default/secrets/db;x=1",
            "path parameters",
        ),
        (
            "/api/v1/namespaces/default/secrets/db%zz",
            "percent-encoding",
        ),
        (
            "/api/v1/namespaces/default/secrets/db%252F",
            "double percent-encoding",
        ),
    ] {
        let r = s.curl(&["--path-as-is", &s.url(p)]);
        assert_eq!(r.code, 400, "{p}: {r:?}");
        assert!(r.body.contains(why), "{p}: {r:?}");
    }
    // Nothing about secrets/db reached the upstream.
    assert!(
        s.upstream
            .requests()
            .iter()
            .all(|r| !r["path"].as_str().unwrap_or("").contains("secret")),
        "{:#?}",
        s.upstream.requests()
    );
    // Controls: another secret through an encoded path is allowed, the
    // upstream gets the normalised path, and the Secret is masked.
    let r = s.curl(&[&s.url("/api/v1/namespaces/default/secret%73/other")]);
    assert_eq!(r.code, 200, "{r:?}");
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["kind"], "Secret", "{v}");
    assert_eq!(v["data"]["password"], "[MASKED]", "{v}");
    let r = s.curl(&[
        "--path-as-is",
        &s.url("/api/v1/namespaces/default/pod%73/x/../web"),
    ]);
    assert_eq!(r.code, 200, "{r:?}");
    let got = s.upstream_saw_only_allowed();
    let paths: Vec<&str> = got.iter().filter_map(|r| r["path"].as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/default/secrets/other",
            "/api/v1/namespaces/default/pods/web"
        ]
    );
    // Every refusal is audited as a deny with its reason.
    let cmds = s.commands();
    let refused: Vec<&Value> = cmds
        .iter()
        .filter(|e| e["decision"] == "deny" && e["detail"]["refused"] == 400)
        .collect();
    assert_eq!(refused.len(), 9, "{cmds:#?}");
    assert!(refused
        .iter()
        .all(|e| e["reason"].as_str().is_some_and(|r| !r.is_empty())));
    let denied_secret = cmds
        .iter()
        .filter(|e| {
            e["action"] == "k8s:get"
                && e["decision"] == "deny"
                && e["detail"]["command"]
                    .as_str()
                    .is_some_and(|c| c.ends_with("/api/v1/namespaces/default/secrets/db"))
        })
        .count();
    assert_eq!(denied_secret, 6, "{cmds:#?}");
}

#[test]
fn k8s_watch_in_every_spelling_is_a_watch() {
    let s = sound_setup("snd-watch", "kubernetes", K8S_RULES);
    let pods = "/api/v1/namespaces/default/pods";
    for q in [
        "watch=true",
        "watch=1",
        "watch=t",
        "watch=T",
        "watch=True",
        "watch=TRUE",
        "watch",
        "watch=",
        "watch=yes",
        "wat%63h=true",
        "watch=%74rue",
        "limit=5&watch=1",
    ] {
        let r = s.curl(&[&s.url(&format!("{pods}?{q}"))]);
        assert_eq!(r.code, 403, "{q}: {r:?}");
        assert!(r.body.contains("k8s:watch"), "{q}: {r:?}");
    }
    for p in [
        "/api/v1/watch/namespaces/default/pods",
        "/api/v1/w%61tch/namespaces/default/pods",
    ] {
        let r = s.curl(&[&s.url(p)]);
        assert_eq!(r.code, 403, "{p}: {r:?}");
    }
    // Ambiguous queries are refused rather than guessed.
    for q in ["watch=false&watch=true", "watch=0;watch=1", "watch=%zz"] {
        let r = s.curl(&[&s.url(&format!("{pods}?{q}"))]);
        assert_eq!(r.code, 400, "{q}: {r:?}");
    }
    // Controls: false spellings are lists, and reach the upstream.
    for q in ["watch=false", "watch=0", "watch=FALSE"] {
        let r = s.curl(&[&s.url(&format!("{pods}?{q}"))]);
        assert_eq!(r.code, 200, "{q}: {r:?}");
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["kind"], "PodList", "{q}: {v}");
    }
    let got = s.upstream_saw_only_allowed();
    assert_eq!(got.len(), 3, "{got:#?}");
    let cmds = s.commands();
    assert!(
        cmds.iter()
            .filter(|e| e["action"] == "k8s:list" && e["decision"] == "allow")
            .count()
            == 3,
        "{cmds:#?}"
    );
}

const HOST_RULES: &str = r#"
@id("get")
permit(principal == Identity::"agent", action == Action::"http:get", resource == Resource::"api");
@id("no-admin-host")
forbid(principal, action in Action::"http", resource) when { context.host == "admin.example" };
@id("no-admin-path")
forbid(principal, action in Action::"http", resource) when { context.path like "/admin*" };
"#;

#[test]
fn absolute_form_and_host_must_agree_and_the_decided_host_is_forwarded() {
    let s = sound_setup("snd-host", "", HOST_RULES);
    let base = s.url("/");
    // The repro: decided as public.example, but the upstream would have
    // routed admin.example.
    let r = s.curl(&[
        "--request-target",
        "http://public.example/hello",
        "-H",
        "Host: admin.example",
        &base,
    ]);
    assert_eq!(r.code, 400, "{r:?}");
    assert!(r.body.contains("Host header"), "{r:?}");
    // curl's own Host (127.0.0.1:port) against another absolute target.
    let r = s.curl(&["--request-target", "http://public.example/hello", &base]);
    assert_eq!(r.code, 400, "{r:?}");
    // admin.example under any spelling is admin.example.
    for h in [
        "admin.example",
        "ADMIN.example",
        "admin.example.",
        "admin.example:80",
    ] {
        let r = s.curl(&["-H", &format!("Host: {h}"), &s.url("/hello")]);
        assert_eq!(r.code, 403, "{h}: {r:?}");
    }
    // Malformed, duplicated or missing Host (raw socket: curl will not).
    let out = s.python(
        r#"
import socket
out = []
for req in [b"GET /hello HTTP/1.1\r\nHost: public.example\r\nHost: admin.example\r\n\r\n",
            b"GET /hello HTTP/1.1\r\n\r\n",
            b"GET /hello HTTP/1.1\r\nHost: user@admin.example\r\n\r\n",
            b"GET /hello HTTP/1.1\r\nHost: admin.example:80:80\r\n\r\n"]:
    s = socket.create_connection(("127.0.0.1", PORT), timeout=10)
    s.sendall(req)
    data = b""
    while b"\r\n\r\n" not in data:
        d = s.recv(4096)
        if not d: break
        data += d
    out.append(data.split(b"\r\n")[0].decode("latin1"))
    s.close()
print("|".join(out))
"#,
    );
    let lines: Vec<&str> = out.trim().split('|').collect();
    assert_eq!(lines.len(), 4, "{out}");
    for l in &lines {
        assert!(l.starts_with("HTTP/1.1 400"), "{lines:?}");
    }
    // Controls: absolute-form that agrees with Host, and a plain Host,
    // reach the upstream with that Host and an origin-form path.
    let r = s.curl(&[
        "--request-target",
        "http://public.example/hello",
        "-H",
        "Host: public.example",
        &base,
    ]);
    assert_eq!(r.code, 200, "{r:?}");
    let r = s.curl(&["-H", "Host: Public.Example.", &s.url("/hello")]);
    assert_eq!(r.code, 200, "{r:?}");
    // HTTP/2 (prior knowledge): curl sends the Host as :authority.
    let r = s.curl(&[
        "--http2-prior-knowledge",
        "-H",
        "Host: public.example",
        &s.url("/hello"),
    ]);
    assert_eq!(r.code, 200, "{r:?}");
    assert_eq!(r.http_version, "2", "{r:?}");
    let r = s.curl(&[
        "--http2-prior-knowledge",
        "-H",
        "Host: admin.example",
        &s.url("/hello"),
    ]);
    assert_eq!(r.code, 403, "{r:?}");
    let got = s.upstream_saw_only_allowed();
    let hosts: Vec<&str> = got.iter().filter_map(|r| r["host"].as_str()).collect();
    assert_eq!(hosts, ["public.example"; 3], "{got:#?}");
    assert!(got.iter().all(|r| r["path"] == "/hello"), "{got:#?}");
}

/// A raw HTTP/2 client (no h2 library needed): `:authority` and `host`
/// that disagree on one stream; prints the response's DATA.
const H2_MISMATCH: &str = r#"
import socket, struct
def lit(name, value):
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v
def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload
block = (lit(":method", "GET") + lit(":scheme", "http") + lit(":path", "/hello")
         + lit(":authority", "public.example") + lit("host", "admin.example"))
s = socket.create_connection(("127.0.0.1", PORT), timeout=10)
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(1, 5, 1, block))
buf, data, done = b"", b"", False
while not done:
    d = s.recv(65536)
    if not d: break
    buf += d
    while len(buf) >= 9:
        n = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + n: break
        kind, flags, payload = buf[3], buf[4], buf[9:9 + n]
        buf = buf[9 + n:]
        if kind == 4 and not flags & 1:
            s.sendall(frame(4, 1, 0, b""))
        if kind == 0:
            data += payload
            done = done or bool(flags & 1)
        if kind == 1 and flags & 1:
            done = True
        if kind in (3, 7):
            done = True
print(data.decode("latin1"))
"#;

#[test]
fn http2_authority_and_host_must_agree() {
    let s = sound_setup("snd-h2", "", HOST_RULES);
    let out = s.python(H2_MISMATCH);
    assert!(
        out.contains("public.example") && out.contains("admin.example"),
        "the refusal names both: {out}"
    );
    assert!(out.contains("\"status\":400"), "{out}");
    // The same client with agreeing values is served.
    let out = s.python(&H2_MISMATCH.replace("\"admin.example\"", "\"public.example\""));
    assert!(out.contains("\"hello\""), "{out}");
    let got = s.upstream_saw_only_allowed();
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0]["host"], "public.example");
}

#[test]
fn generic_paths_are_decided_and_forwarded_normalised() {
    let s = sound_setup("snd-path", "", HOST_RULES);
    for p in [
        "/%61dmin/x",
        "/hello/../admin/x",
        "/hello/%2E%2E/admin",
        "/./admin",
    ] {
        let r = s.curl(&["--path-as-is", "-H", "Host: public.example", &s.url(p)]);
        assert_eq!(r.code, 403, "{p}: {r:?}");
        assert!(r.body.contains("no-admin-path"), "{p}: {r:?}");
    }
    for p in [
        "/hello%2F..%2Fadmin",
        "/hello%5C..%5Cadmin",
        "/hello/..\\admin",
        "//admin",
        "/admin;/x",
        "/x/../../admin",
    ] {
        let r = s.curl(&["--path-as-is", "-H", "Host: public.example", &s.url(p)]);
        assert_eq!(r.code, 400, "{p}: {r:?}");
    }
    // Controls: decoded unreserved characters and resolved dot segments
    // reach the upstream as decided; the query is kept.
    for p in ["/h%65llo", "/items/../hello", "/items/a%7e%3a?q=%41&x=1"] {
        let r = s.curl(&["--path-as-is", "-H", "Host: public.example", &s.url(p)]);
        assert_eq!(r.code, 200, "{p}: {r:?}");
    }
    let got = s.upstream_saw_only_allowed();
    let paths: Vec<&str> = got.iter().filter_map(|r| r["path"].as_str()).collect();
    assert_eq!(
        paths,
        ["/hello", "/hello", "/items/a~%3A?q=%41&x=1"],
        "{got:#?}"
    );
}
