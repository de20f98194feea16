//! Faults: the daemon killed under load, upstreams that die or never answer,
//! a storm of policy reloads, and flow entries lost from the kernel maps.
//! Each shows Portcullis failing closed and bounded (no hang, nothing
//! forwarded that was not decided). SECURITY.md lists these tests by name.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

use crate::harness::*;

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Short connections in a loop, bounded in time and count: one JSON record
/// per connect (start time, peer port, greeting or error).
const LOOP: &str = r#"
import json, socket, sys, time
a = json.loads(sys.argv[1])
res = []
deadline = time.time() + a["secs"]
while time.time() < deadline and len(res) < a["max"]:
    r = {"t": time.time()}
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect(("127.0.0.1", a["port"]))
        r["peer_port"] = s.getpeername()[1]
        r["greeting"] = s.makefile("rb").readline().decode()
    except Exception as e:
        r["error"] = type(e).__name__
    s.close()
    res.append(r)
    time.sleep(a.get("pause", 0))
print(json.dumps(res))
"#;

fn loop_in(place: &Placement, port: u16, secs: u64, pause: f64) -> thread::JoinHandle<Vec<Value>> {
    let place = place.clone();
    thread::spawn(move || {
        python_json(
            &place,
            None,
            LOOP,
            json!({"port": port, "secs": secs, "max": 5000, "pause": pause}),
        )
        .as_array()
        .cloned()
        .unwrap_or_default()
    })
}

struct Setup {
    cg: TestCgroup,
    server: EchoServer,
    files: DaemonFiles,
    daemon: Daemon,
    place: Placement,
}

fn setup(name: &str) -> Setup {
    require_root();
    let cg = TestCgroup::new(name);
    let server = EchoServer::start(name);
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    Setup {
        cg,
        server,
        files,
        daemon,
        place,
    }
}

#[test]
fn sigkill_under_load_refuses_every_new_connect_until_restart() {
    let mut s = setup("killload");
    let port = s.server.addr.port();
    let workers: Vec<_> = (0..4).map(|_| loop_in(&s.place, port, 6, 0.0)).collect();
    wait_until(
        Duration::from_secs(20),
        || s.server.accepted.load(Ordering::Relaxed) >= 20,
        "traffic flowing",
    );
    s.daemon.kill9();
    let killed_at = now_secs();
    // Connections the daemon opened before it died may still be queued at
    // the listener. Any connect that went direct while the queue drained
    // would show as an echo after `killed_at`, which the loop below refuses.
    let accepted_at_kill = s.server.accepted_after_drain();
    let results: Vec<Value> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    let after: Vec<&Value> = results
        .iter()
        .filter(|r| r["t"].as_f64().unwrap_or(0.0) > killed_at)
        .collect();
    assert!(
        after.len() >= 20,
        "load went on after the kill: {}",
        after.len()
    );
    for r in &after {
        assert_eq!(
            r["error"], "ConnectionRefusedError",
            "every connect after the kill is refused at once: {r}"
        );
    }
    assert_eq!(
        s.server.accepted.load(Ordering::Relaxed),
        accepted_at_kill,
        "nothing reached the upstream while the daemon was down"
    );
    let verify = Command::new(BIN)
        .args(["audit", "verify", "--state-dir"])
        .arg(&s.files.state)
        .output()
        .expect("verify");
    assert!(verify.status.success(), "{verify:?}");

    s.daemon = Daemon::start(&s.files);
    let r = client(&s.place, json!({"host": "127.0.0.1", "port": port}));
    assert!(r.echo_ok(), "restart resumes serving: {r:?}");
}

/// An upstream that greets, reads the first bytes, then resets the
/// connection (SO_LINGER 0).
fn dying_upstream() -> (std::net::SocketAddr, Arc<AtomicU32>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let n = Arc::new(AtomicU32::new(0));
    let n2 = n.clone();
    thread::spawn(move || {
        for c in l.incoming().take(4) {
            let Ok(mut c) = c else { continue };
            n2.fetch_add(1, Ordering::Relaxed);
            let _ = c.write_all(b"hello from dying\n");
            let mut buf = [0u8; 16];
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = c.read(&mut buf);
            let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
            drop(c);
        }
    });
    (addr, n)
}

#[test]
fn upstream_dying_mid_session_ends_the_agents_connection_and_the_session() {
    require_root();
    let cg = TestCgroup::new("dying");
    let (addr, seen) = dying_upstream();
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("dying.toml", &[("dying", vec![addr.to_string()])]);
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let start = Instant::now();
    let r = client(
        &Placement::cgroup(cg.dir(&agent)),
        json!({"host": "127.0.0.1", "port": addr.port(), "timeout": 15, "wait_close": 15}),
    );
    assert_eq!(r.greeting(), Some("hello from dying\n"), "{r:?}");
    assert_eq!(seen.load(Ordering::Relaxed), 1);
    // The reset reaches the agent as a reset or EOF (or a read error while
    // echoing), promptly, never as a hang.
    let ended = r
        .error()
        .is_some_and(|e| e.contains("Reset") || e.contains("Broken"))
        || matches!(r.0["closed"].as_str(), Some("reset" | "eof"))
        || r.0["echo_len"] == 0;
    assert!(ended, "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(10), "no hang");
    wait_until(
        Duration::from_secs(5),
        || {
            let out = Command::new(BIN)
                .args(["audit", "tail", "--json", "--state-dir"])
                .arg(&files.state)
                .output()
                .expect("tail");
            String::from_utf8_lossy(&out.stdout).contains("\"type\":\"session_end\"")
        },
        "session_end audited",
    );
}

#[test]
fn black_holed_upstream_times_out_bounded_and_the_daemon_stays_responsive() {
    require_root();
    // A listener with a backlog of 0 that never accepts, its queue filled:
    // further SYNs are dropped, so a connect to it hangs until timed out.
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .expect("bind");
    sock.listen(0).expect("listen");
    let addr = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("addr");
    let fillers: Vec<TcpStream> = (0..3)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok())
        .collect();
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "the listener is black-holed"
    );
    let cg = TestCgroup::new("blackhole");
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("hole.toml", &[("hole", vec![addr.to_string()])]);
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    let start = Instant::now();
    let clients: Vec<_> = (0..5)
        .map(|_| {
            HeldClient::spawn(
                &place,
                json!({"host": "127.0.0.1", "port": addr.port(), "timeout": 30}),
                &files.dir,
            )
        })
        .collect();
    // Meanwhile the daemon answers at once.
    thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let st = daemon.status();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "status answered promptly"
    );
    assert!(st["policy_version"].is_string() || st["policy_version"].is_number());
    for c in clients {
        let r = c.finish();
        assert!(
            r.greeting().is_none_or(str::is_empty),
            "nothing came from a black hole: {r:?}"
        );
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "bounded by the upstream connect timeout (10 s), took {took:?}"
    );
    assert!(
        daemon.log_text().contains("timed out"),
        "{}",
        daemon.log_text()
    );
    drop(fillers);
}

/// Keeps one connection busy for `secs`: a ping every 100 ms, each echo
/// checked; reports how many round trips worked and the first failure.
const CHATTY: &str = r#"
import json, socket, sys, time
a = json.loads(sys.argv[1])
out = {"ok": 0, "error": None}
try:
    s = socket.create_connection(("127.0.0.1", a["port"]), timeout=5)
    f = s.makefile("rb")
    f.readline()
    end = time.time() + a["secs"]
    while time.time() < end:
        s.sendall(b"ping\n")
        if f.readline() != b"ping\n":
            out["error"] = "bad echo"
            break
        out["ok"] += 1
        time.sleep(0.1)
except Exception as e:
    out["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"#;

#[test]
fn policy_reload_storm_under_load_drops_no_allowed_session() {
    let s = setup("storm");
    let port = s.server.addr.port();
    let chatty: Vec<_> = (0..4)
        .map(|_| {
            let place = s.place.clone();
            thread::spawn(move || {
                python_json(&place, None, CHATTY, json!({"port": port, "secs": 8}))
            })
        })
        .collect();
    let loops: Vec<_> = (0..2).map(|_| loop_in(&s.place, port, 8, 0.02)).collect();
    // Forty reloads in a row, each a real change of the rule set (the
    // permission itself stays), by command and by file change.
    let version_before = s.daemon.status()["policy_version"].clone();
    let start = Instant::now();
    for i in 0..40 {
        s.files.rules(
            "extra.cedar",
            &format!(
                "@id(\"storm-{i}\")\npermit(principal, action == Action::\"tcp:connect\", resource);\n"
            ),
        );
        if i % 2 == 0 {
            s.daemon.cli_ok(&["policy", "reload"]);
        }
        thread::sleep(Duration::from_millis(100));
        if start.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    assert_ne!(
        s.daemon.status()["policy_version"],
        version_before,
        "the reloads took effect"
    );
    for c in chatty {
        let r = c.join().expect("chatty");
        assert_eq!(
            r["error"],
            Value::Null,
            "a live allowed session was dropped: {r}"
        );
        assert!(r["ok"].as_u64().unwrap_or(0) > 20, "{r}");
    }
    for l in loops {
        for r in l.join().expect("loop") {
            assert_eq!(
                r["greeting"],
                s.server.greeting(),
                "a new connect failed: {r}"
            );
        }
    }
    let log = s.daemon.log_text();
    assert!(!log.contains("panicked"), "{log}");
    let _ = &s.cg;
}

/// Every key of a pinned map, by `bpftool`.
fn map_keys(path: &std::path::Path) -> Vec<Vec<String>> {
    let out = run_ok(
        Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(path),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            e["key"].as_array().map(|k| {
                k.iter()
                    .filter_map(|b| b.as_str().map(|s| s.trim_start_matches("0x").to_string()))
                    .collect()
            })
        })
        .collect()
}

#[test]
fn a_flow_entry_lost_from_the_lru_map_is_refused_never_sent_direct() {
    // FLOWS and PENDING_CONNECTS are LRU maps: under pressure the kernel
    // evicts entries. The redirect itself happens in connect4 whatever the
    // map does, so an evicted entry can only mean "no flow entry" at the
    // proxy. Simulate the eviction deterministically: freeze the daemon,
    // let a tagged client connect (the kernel completes the handshake into
    // the listener's queue and records the flow), delete the entry, thaw.
    let s = setup("evict");
    let flows = s.files.pin_dir.join("maps-v1").join("FLOWS");
    let before = s.daemon.refused("no_flow_entry");
    s.daemon.freeze(true);
    let held = HeldClient::spawn(
        &s.place,
        json!({"host": "127.0.0.1", "port": s.server.addr.port(), "timeout": 10}),
        &s.files.dir,
    );
    let mut keys = Vec::new();
    let t = Instant::now();
    while keys.is_empty() && t.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(50));
        keys = map_keys(&flows);
    }
    assert_eq!(keys.len(), 1, "the kernel recorded the flow");
    for k in &keys {
        let mut cmd = Command::new("bpftool");
        cmd.args(["map", "delete", "pinned"])
            .arg(&flows)
            .args(["key", "hex"])
            .args(k);
        run_ok(&mut cmd);
    }
    assert!(map_keys(&flows).is_empty());
    s.daemon.freeze(false);
    let r = held.finish();
    assert!(r.greeting().is_none_or(str::is_empty), "{r:?}");
    assert_eq!(
        s.server.accepted.load(Ordering::Relaxed),
        0,
        "never sent anywhere"
    );
    wait_until(
        Duration::from_secs(5),
        || s.daemon.refused("no_flow_entry") > before,
        "refused for want of a flow entry",
    );

    // A full FLOWS map (every slot taken by strangers) still redirects and
    // relays: LRU inserts evict, they do not fail.
    let mut batch = String::new();
    for i in 0u32..70_000 {
        let b = i.to_le_bytes();
        let key: Vec<String> = (0..32)
            .map(|j| format!("{:02x}", if j < 4 { b[j] } else { 0xee }))
            .collect();
        batch.push_str(&format!(
            "map update pinned {} key hex {} value hex {}\n",
            flows.display(),
            key.join(" "),
            vec!["00"; 32].join(" ")
        ));
    }
    let batch_file = s.files.dir.join("fill.batch");
    std::fs::write(&batch_file, batch).expect("batch");
    run_ok(
        Command::new("bpftool")
            .args(["batch", "file"])
            .arg(&batch_file),
    );
    assert!(map_keys(&flows).len() >= 60_000, "the map is full");
    let r = client(
        &s.place,
        json!({"host": "127.0.0.1", "port": s.server.addr.port()}),
    );
    assert!(r.echo_ok(), "{r:?}");
    assert_eq!(r.peer_port(), Some(s.daemon.port as u64));
}

/// An HTTPS JWKS endpoint on 127.0.0.1 with its own CA; stops on drop.
struct JwksHttps {
    addr: std::net::SocketAddr,
    ca_pem: String,
    hits: Arc<AtomicU32>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl JwksHttps {
    fn start(jwks: String) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
            SanType,
        };
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name
            .push(DnType::CommonName, "portcullis e2e CA");
        let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
        let issuer = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().expect("leaf key");
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).expect("leaf");
        leaf.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf cert");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("tls versions")
                .with_no_client_auth()
                .with_single_cert(
                    vec![leaf_cert.der().clone()],
                    rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
                )
                .expect("tls config"),
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind jwks");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (h, s) = (hits.clone(), stop.clone());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((tcp, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = tcp.set_nonblocking(false);
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                    continue;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                h.fetch_add(1, Ordering::Relaxed);
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                    jwks.len(),
                    jwks
                );
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        Self {
            addr,
            ca_pem: ca_cert.pem(),
            hits,
            stop,
        }
    }

    /// Stops serving; returns once new connections are refused.
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        wait_until(
            Duration::from_secs(5),
            || TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err(),
            "JWKS endpoint down",
        );
    }
}

impl Drop for JwksHttps {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn jwks_endpoint_down_keeps_cached_keys_and_refuses_unknown_keys() {
    require_root();
    let cg = TestCgroup::new("jwksdown");
    let server = EchoServer::start("jwksdown");
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    let jwks = JwksHttps::start(files.issuer.jwks.clone());
    let ca = files.dir.join("jwks-ca.pem");
    std::fs::write(&ca, &jwks.ca_pem).expect("write ca");
    // The issuer's keys come from the HTTPS endpoint (not a file).
    let mut text = format!(
        "[issuer.test]\nurl = \"https://issuer.test\"\njwks_url = \"https://{}/jwks.json\"\nca_file = {:?}\naudience = \"portcullis\"\n\n",
        jwks.addr,
        ca.display().to_string()
    );
    for n in ["a", "one", "two"] {
        text.push_str(&format!(
            "[identity.{n}]\nissuer = \"test\"\nsubject = \"sub-{n}\"\n\n"
        ));
    }
    std::fs::write(files.policies.join("identities.toml"), text).expect("identities");
    let daemon = Daemon::start(&files);
    let a = cg.child("a");
    daemon.tag(&a, "a");
    let to = json!({"host": "127.0.0.1", "port": server.addr.port()});
    let r = client(&Placement::cgroup(cg.dir(&a)), to.clone());
    assert!(r.echo_ok(), "{r:?}\n{}", daemon.log_text());
    assert!(
        jwks.hits.load(Ordering::Relaxed) >= 1,
        "keys fetched over https"
    );

    jwks.stop();
    // Cached keys keep proving identities, for a live tag and a new one.
    let r = client(&Placement::cgroup(cg.dir(&a)), to.clone());
    assert!(r.echo_ok(), "cached keys still work: {r:?}");
    let one = cg.child("one");
    daemon.tag(&one, "one");
    let r = client(&Placement::cgroup(cg.dir(&one)), to.clone());
    assert!(
        r.echo_ok(),
        "a key in the cache proves a new tag too: {r:?}"
    );
    let seen = server.accepted.load(Ordering::Relaxed);

    // A token signed by a key the daemon never saw (the issuer rotated
    // while its endpoint is down) cannot be proven: refused.
    let two = cg.child("two");
    let token = daemon.dir.join("tokens").join("two.jwt");
    std::fs::write(
        &token,
        TestIssuer::new().token_with_kid("sub-two", 3600, "rotated-key"),
    )
    .expect("token");
    daemon.cli_ok(&[
        "tag",
        &two,
        "--identity",
        "two",
        "--token-file",
        &token.display().to_string(),
    ]);
    let start = Instant::now();
    let r = client(&Placement::cgroup(cg.dir(&two)), to);
    assert!(!r.echo_ok(), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(15), "no hang");
    assert_eq!(
        server.accepted.load(Ordering::Relaxed),
        seen,
        "nothing relayed"
    );
    wait_until(
        Duration::from_secs(10),
        || {
            let out = Command::new(BIN)
                .args(["audit", "tail", "--json", "--state-dir"])
                .arg(&files.state)
                .output()
                .expect("tail");
            String::from_utf8_lossy(&out.stdout).lines().any(|l| {
                let e: Value = serde_json::from_str(l).unwrap_or(Value::Null);
                e["type"] == "flow_refused" && e["detail"]["identity_error"].is_string()
            })
        },
        "the unproven flow is audited as refused",
    );
}
