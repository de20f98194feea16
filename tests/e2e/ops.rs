//! Operator experience: containers found by id in the cgroup tree,
//! auto-tagging of cgroups as they appear, and the metrics/health endpoint.

use std::{fs, time::Duration};

use serde_json::json;

use crate::harness::*;

/// A 64-hex id: `prefix` (hex) followed by digits from a unique name, so
/// parallel test runs never share ids.
fn container_id(prefix: &str) -> String {
    let seed = unique("id");
    let mut hex: String = prefix.to_string();
    for b in seed.bytes() {
        hex.push_str(&format!("{b:02x}"));
    }
    hex.extend(std::iter::repeat_n('0', 64));
    hex.truncate(64);
    hex
}

fn tags(d: &Daemon) -> Vec<serde_json::Value> {
    d.json(&["tags", "--json"])["tags"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn tag_by_container_id_prefix_and_ambiguity() {
    require_root();
    let cg = TestCgroup::new("ops-ctr");
    let server = EchoServer::start("ops-ctr");
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    let daemon = Daemon::start(&files);

    // Two containers whose ids share their first 14 hex digits, laid out as
    // Docker's systemd driver and CRI-O under a kubepods slice do.
    let shared = format!("{:014x}", std::process::id() as u64 * 7919);
    let a = container_id(&format!("{shared}a"));
    let b = container_id(&format!("{shared}b"));
    let a_cg = cg.child(&format!("system.slice/docker-{a}.scope"));
    let b_cg = cg.child(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_0a1b_4c2d_9e3f_4a5b6c7d8e9f.slice/crio-{b}.scope"
    ));

    let out = daemon.cli(&[
        "tag",
        "--container",
        &shared,
        "--identity",
        "container-agent",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ambiguous") && err.contains(&a) && err.contains(&b),
        "{err}"
    );
    let out = daemon.cli(&["tag", "--container", "00000000deadbeef", "--identity", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no container"));
    let out = daemon.cli(&["tag", "--container", "abc", "--identity", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("12 to 64 hex"));

    let token = daemon.token_file("container-agent", "sub-container-agent", 3600);
    let prefix = &a[..shared.len() + 1];
    let said = daemon.cli_ok(&[
        "tag",
        "--container",
        prefix,
        "--identity",
        "container-agent",
        "--token-file",
        &token.display().to_string(),
    ]);
    assert!(said.contains(&format!("docker-{a}.scope")), "{said}");
    let t = tags(&daemon);
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0]["cgroup"], format!("/{a_cg}"));
    assert!(t[0]["auto"].is_null(), "a hand-made tag: {t:?}");

    // A client in the container is intercepted and attributed.
    let r = client(
        &Placement::cgroup(cg.dir(&a_cg)),
        json!({"host": "127.0.0.1", "port": server.addr.port()}),
    );
    assert_eq!(r.error(), None, "{r:?}");
    assert!(r.echo_ok(), "{r:?}");
    assert_eq!(
        r.peer_port(),
        Some(daemon.port as u64),
        "went through the proxy"
    );
    // The other container (untagged) goes direct.
    let r = client(
        &Placement::cgroup(cg.dir(&b_cg)),
        json!({"host": "127.0.0.1", "port": server.addr.port()}),
    );
    assert_eq!(r.peer_port(), Some(server.addr.port() as u64), "{r:?}");

    // Kubernetes with the cgroupfs driver: a bare id under pod<uid>.
    let k = container_id("cc");
    let k_cg = cg.child(&format!(
        "kubepods/burstable/pod7c1d2e3f-0a1b-4c2d-9e3f-4a5b6c7d8e9f/{k}"
    ));
    let said = daemon.cli_ok(&["tag", "--container", &k[..16], "--identity", "one"]);
    assert!(said.contains(&k_cg), "{said}");
    daemon.cli_ok(&["untag", "--container", &k]);

    // The pod resolves by its uid (underscored as systemd writes it).
    daemon.cli_ok(&[
        "tag",
        "--container",
        "0a1b2c3d_0a1b_4c2d",
        "--identity",
        "pod-agent",
    ]);
    assert_eq!(tags(&daemon).len(), 2);
    daemon.cli_ok(&["untag", "--container", &a]);
    assert_eq!(tags(&daemon).len(), 1, "only the pod tag is left");
    let out = daemon.cli(&["untag", "--container", &b[..20]]);
    assert!(
        !out.status.success(),
        "the container itself was never tagged"
    );
    daemon.cli_ok(&["untag", "--container", "0a1b2c3d-0a1b-4c2d-9e3f"]);
    assert!(tags(&daemon).is_empty());
}

#[test]
fn auto_tag_rules_tag_existing_and_new_cgroups_and_untag_removed_ones() {
    require_root();
    let cg = TestCgroup::new("ops-auto");
    let server = EchoServer::start("ops-auto");
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    let tokens = files.dir.join("tokens");
    fs::create_dir_all(&tokens).unwrap();
    fs::write(
        files.config_file(),
        format!(
            "[daemon]\n\n[[auto_tag]]\ncgroup = \"**/docker-*.scope\"\nidentity = \"container-agent\"\ntoken_file = \"{}/{{container}}.jwt\"\n\n[[daemon.auto_tag]]\ncgroup = \"manual/*\"\nidentity = \"x\"\n",
            tokens.display()
        ),
    )
    .unwrap();
    let before = container_id("b0");
    let before_cg = cg.child(&format!("system.slice/docker-{before}.scope"));
    let daemon = Daemon::start(&files);

    // Tagged at start, before the daemon said it was ready.
    let t = tags(&daemon);
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0]["cgroup"], format!("/{before_cg}"));
    assert_eq!(t[0]["identity"], "container-agent");
    assert_eq!(t[0]["auto"], "**/docker-*.scope");
    assert_eq!(
        t[0]["token_file"],
        tokens.join(format!("{before}.jwt")).display().to_string()
    );

    // A container started after the daemon: tagged as it appears.
    let after = container_id("af");
    fs::write(
        tokens.join(format!("{after}.jwt")),
        files.issuer.token("sub-container-agent", 3600),
    )
    .unwrap();
    let after_cg = cg.child(&format!("system.slice/docker-{after}.scope"));
    wait_until(
        Duration::from_secs(3),
        || {
            tags(&daemon)
                .iter()
                .any(|t| t["cgroup"] == format!("/{after_cg}"))
        },
        "new container cgroup auto-tagged (inotify)",
    );
    let mut args = json!({"host": "127.0.0.1", "port": server.addr.port()});
    args["hold"] = json!(1);
    let held = HeldClient::start(&Placement::cgroup(cg.dir(&after_cg)), args, &files.dir);
    let flows = daemon.flows();
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(flows[0]["identity"], "container-agent");
    assert_eq!(flows[0]["cgroup"], format!("/{after_cg}"));
    let r = held.finish();
    assert!(r.echo_ok(), "{r:?}");
    assert_eq!(r.peer_port(), Some(daemon.port as u64));

    // The `[[daemon.auto_tag]]` form works too.
    let manual = cg.child("manual/m1");
    wait_until(
        Duration::from_secs(3),
        || {
            tags(&daemon)
                .iter()
                .any(|t| t["cgroup"] == format!("/{manual}") && t["identity"] == "x")
        },
        "manual/* auto-tagged",
    );
    // A removed auto-tagged cgroup loses its tag.
    wait_until(
        Duration::from_secs(5),
        || fs::remove_dir(cg.dir(&after_cg)).is_ok(),
        "container cgroup removed",
    );
    wait_until(
        Duration::from_secs(3),
        || {
            !tags(&daemon)
                .iter()
                .any(|t| t["cgroup"] == format!("/{after_cg}"))
        },
        "removed cgroup untagged",
    );
    // The audit records follow the tag store change.
    let audit_text = || {
        fs::read_dir(files.state.join("audit"))
            .unwrap()
            .flatten()
            .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<String>()
    };
    wait_until(
        Duration::from_secs(3),
        || {
            let t = audit_text();
            t.lines().any(|l| {
                l.contains("\"type\":\"untag\"")
                    && l.contains(&after_cg)
                    && l.contains("auto_tag:**/docker-*.scope")
            })
        },
        "auto-untag audited",
    );
}

/// `GET path` on the metrics listener: (status code, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_health_and_readiness_of_a_running_daemon() {
    require_root();
    let cg = TestCgroup::new("ops-metrics");
    let server = EchoServer::start("ops-metrics");
    let mut files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    let addr = format!("127.0.0.1:{}", free_port());
    files.extra_args = vec!["--metrics".into(), addr.clone()];
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    for _ in 0..3 {
        let r = client(
            &place,
            json!({"host": "127.0.0.1", "port": server.addr.port()}),
        );
        assert!(r.echo_ok(), "{r:?}");
    }
    // Dialing the proxy port directly: no kernel flow entry, refused.
    let r = client(
        &Placement::cgroup(cg.dir(&cg.child("other"))),
        json!({"host": "127.0.0.1", "port": daemon.port}),
    );
    assert!(!r.echo_ok(), "{r:?}");

    let (code, text) = http_get(&addr, "/metrics");
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        sample(&text, "portcullis_flows_accepted_total"),
        Some(3.0),
        "{text}"
    );
    wait_until(
        Duration::from_secs(5),
        || {
            let (_, t) = http_get(&addr, "/metrics");
            sample(
                &t,
                "portcullis_flows_refused_total{reason=\"no_flow_entry\"}",
            ) == Some(1.0)
        },
        "refusal counted",
    );
    assert_eq!(
        sample(
            &text,
            "portcullis_decisions_total{resource=\"echo\",action=\"tcp:connect\",outcome=\"allow\"}"
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, "portcullis_tags"), Some(1.0));
    assert_eq!(
        sample(&text, "portcullis_access_requests_pending"),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "portcullis_bpf_map_max_entries{map=\"FLOWS\"}"),
        Some(65536.0),
        "{text}"
    );
    assert!(sample(&text, "portcullis_bpf_map_entries{map=\"TAGGED_CGROUPS\"}").is_some());
    assert!(
        sample(&text, "portcullis_audit_last_seq").is_some_and(|s| s > 3.0),
        "{text}"
    );
    assert!(sample(&text, "portcullis_audit_unsynced_records").is_some());
    assert_eq!(sample(&text, "portcullis_ready"), Some(1.0));

    // A real HTTP client (headers, keep-alive asked for) gets it too.
    let curl = std::process::Command::new("curl")
        .args(["-sf", "--max-time", "10", "-H", "Accept: text/plain"])
        .arg(format!("http://{addr}/metrics"))
        .output()
        .expect("curl");
    assert!(curl.status.success(), "{curl:?}");
    assert!(String::from_utf8_lossy(&curl.stdout).contains("portcullis_ready 1"));
    let head = std::process::Command::new("curl")
        .args(["-sfI", "--max-time", "10"])
        .arg(format!("http://{addr}/readyz"))
        .output()
        .expect("curl");
    assert!(
        String::from_utf8_lossy(&head.stdout).starts_with("HTTP/1.1 200"),
        "{head:?}"
    );
    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".to_string()));
    let (code, body) = http_get(&addr, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_get(&addr, "/nope").0, 404);

    // Break-glass detach: still alive, no longer ready.
    daemon.cli_ok(&["detach"]);
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    let (code, body) = http_get(&addr, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("programs_attached FAIL"), "{body}");
}

#[test]
fn install_into_a_prefix_verifies_and_uninstalls() {
    use std::process::Command;
    let root = std::env::temp_dir().join(unique("install"));
    let out = Command::new(BIN)
        .args(["install", "--prefix"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let bin = root.join("usr/local/bin/portcullis");
    assert_eq!(fs::read(&bin).unwrap(), fs::read(BIN).unwrap());
    // The installed binary validates the installed policies.
    let check = Command::new(&bin)
        .args(["policy", "check"])
        .arg(root.join("etc/portcullis/policies"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");

    // systemd accepts the unit without a single warning (ExecStart pointed
    // at the installed copy, which exists).
    let unit = fs::read_to_string(root.join("etc/systemd/system/portcullis.service")).unwrap();
    let verify_dir = root.join("verify");
    fs::create_dir_all(&verify_dir).unwrap();
    let unit_path = verify_dir.join("portcullis.service");
    fs::write(
        &unit_path,
        unit.replace("/usr/local/bin/portcullis", &bin.display().to_string()),
    )
    .unwrap();
    match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
    {
        Ok(v) => {
            let err = String::from_utf8_lossy(&v.stderr);
            assert!(v.status.success() && err.trim().is_empty(), "{err}");
        }
        Err(e) => eprintln!("systemd-analyze not available ({e}); unit not verified"),
    }
    fs::remove_dir_all(&verify_dir).unwrap();

    let out = Command::new(BIN)
        .args(["uninstall", "--prefix"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!bin.exists());
    assert!(
        !root.join("etc/portcullis").exists(),
        "unchanged files all removed"
    );
    assert!(root.join("var/lib/portcullis").is_dir(), "state dir stays");
    let out = Command::new(BIN)
        .args(["uninstall", "--purge", "--prefix"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!root.join("var/lib/portcullis").exists());
    let _ = fs::remove_dir_all(&root);
}

/// The daemon speaks systemd's notify protocol (what `Type=notify` and
/// `WatchdogSec=` in the installed unit rely on), checked with a real
/// NOTIFY_SOCKET the test listens on.
#[test]
fn sd_notify_ready_watchdog_and_stopping() {
    require_root();
    let cg = TestCgroup::new("ops-notify");
    let mut files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec!["127.0.0.1:9".to_string()])]);
    let sock_path = files.dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    files.extra_env = vec![
        ("NOTIFY_SOCKET".into(), sock_path.display().to_string()),
        ("WATCHDOG_USEC".into(), "400000".into()),
    ];
    let mut daemon = Daemon::spawn(&files);
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("READY=1") {
        let n = sock.recv(&mut buf).expect("a notification before 30 s");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    // READY=1 means ready: the admin socket answers at once and the
    // programs are attached.
    assert_eq!(daemon.status()["attached"], true);
    assert!(seen.contains("STATUS=governing"), "{seen}");
    // Watchdog pings every WATCHDOG_USEC / 2.
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "WATCHDOG=1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut stopping = false;
    for _ in 0..50 {
        let Ok(n) = sock.recv(&mut buf) else { break };
        if String::from_utf8_lossy(&buf[..n]).trim() == "STOPPING=1" {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    let status = daemon.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
