//! Escape attempts from a tagged cgroup. Each test tries one way around the
//! proxy with a real, unmodified program and checks it is redirected or
//! refused, never sent to the destination directly. Where it can, a test
//! also shows the same attempt succeeding from an untagged cgroup, so the
//! check is able to fail. SECURITY.md lists these tests by name.

use std::{
    fs,
    process::{Child, Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

use crate::harness::*;

/// Nobody: the unprivileged user agents run as in these tests.
const NOBODY: u32 = 65534;

/// A daemon over a fresh subtree whose echo server is a tcp resource.
/// `permit` false writes a rule set that permits nothing, so any byte from
/// the server means the connection escaped the proxy.
struct Gov {
    cg: TestCgroup,
    server: EchoServer,
    files: DaemonFiles,
    daemon: Daemon,
}

fn governed(name: &str, permit: bool, extra_args: &[&str]) -> Gov {
    require_root();
    let cg = TestCgroup::new(name);
    let server = EchoServer::start(name);
    let mut files = DaemonFiles::new(&cg.rel);
    if !permit {
        files.rules("allow.cedar", "// nothing is permitted\n");
    }
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    files.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
    let daemon = Daemon::start(&files);
    Gov {
        cg,
        server,
        files,
        daemon,
    }
}

fn accepted(s: &EchoServer) -> u32 {
    s.accepted.load(Ordering::Relaxed)
}

/// A background Python program, killed on drop.
struct Bg(Child);

impl Bg {
    fn start(place: &Placement, script: &str, args: Value) -> Self {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", script, &args.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        place.apply(&mut cmd);
        Self(cmd.spawn().expect("spawn python3"))
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const TFO: &str = r#"
import json, socket, sys
a = json.loads(sys.argv[1])
out = {"error": None, "greeting": None, "peer": None, "echo": None}
try:
    s = socket.socket(socket.AF_INET6 if a.get("v6") else socket.AF_INET, socket.SOCK_STREAM)
    # Blocking until connected: a timeout would make the socket non-blocking
    # and sendto(MSG_FASTOPEN) return EINPROGRESS.
    if a["mode"] == "sendto":
        s.sendto(b"ping\n", socket.MSG_FASTOPEN, (a["host"], a["port"]))
    else:
        s.setsockopt(socket.IPPROTO_TCP, 30, 1)  # TCP_FASTOPEN_CONNECT
        s.connect((a["host"], a["port"]))
        s.sendall(b"ping\n")
    s.settimeout(5)
    f = s.makefile("rb")
    out["greeting"] = f.readline().decode()
    out["echo"] = f.readline().decode()
    out["peer"] = list(s.getpeername())[:2]
except Exception as e:
    out["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"#;

fn tfo_cases(port: u16) -> Vec<Value> {
    let mut cases = Vec::new();
    for mode in ["sendto", "connect_opt"] {
        cases.push(json!({"mode": mode, "host": "127.0.0.1", "port": port}));
        cases.push(json!({"mode": mode, "host": "::ffff:127.0.0.1", "port": port, "v6": true}));
    }
    cases
}

#[test]
fn tcp_fast_open_is_redirected_like_any_connect() {
    let g = governed("tfo", true, &[]);
    let agent = g.cg.child("agent");
    g.daemon.tag(&agent, "agent");
    let place = Placement::cgroup(g.cg.dir(&agent));
    for case in tfo_cases(g.server.addr.port()) {
        let r = python_json(&place, None, TFO, case.clone());
        assert_eq!(r["error"], Value::Null, "{case}: {r}");
        assert_eq!(r["greeting"], g.server.greeting(), "{case}: {r}");
        assert_eq!(r["echo"], "ping\n", "{case}: the early data arrived: {r}");
        // getpeername shows the rewritten destination: the proxy's port.
        assert_eq!(r["peer"][1], g.daemon.port, "{case}: {r}");
    }
    wait_until(
        Duration::from_secs(5),
        || {
            crate::audit_events(&g.files, &[])
                .iter()
                .filter(|e| e["type"] == "command" && e["decision"] == "allow")
                .count()
                == 4
        },
        "four fast-open flows audited as allowed commands",
    );
}

#[test]
fn tcp_fast_open_to_a_denied_destination_never_reaches_it() {
    let g = governed("tfodeny", false, &[]);
    let agent = g.cg.child("agent");
    g.daemon.tag(&agent, "agent");
    let place = Placement::cgroup(g.cg.dir(&agent));
    for case in tfo_cases(g.server.addr.port()) {
        let r = python_json(&place, None, TFO, case.clone());
        assert!(
            r["greeting"].as_str().is_none_or(str::is_empty),
            "{case}: {r}"
        );
    }
    assert_eq!(
        accepted(&g.server),
        0,
        "no fast-open connect reached the server"
    );
    // Control: the same program untagged reaches it, so the check can fail.
    let other = g.cg.child("other");
    let r = python_json(
        &Placement::cgroup(g.cg.dir(&other)),
        None,
        TFO,
        tfo_cases(g.server.addr.port())[0].clone(),
    );
    assert_eq!(r["greeting"], g.server.greeting(), "{r}");
}

const DECOY: &str = r#"
import json, socket, sys, threading
a = json.loads(sys.argv[1])
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", a["port"]))
l.listen(16)
def serve(c):
    c.sendall(b"hello from decoy\n")
    while True:
        d = c.recv(4096)
        if not d:
            break
        c.sendall(d)
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

#[test]
fn tcp_fast_open_with_data_in_the_syn_is_redirected_inside_a_namespace() {
    // In a namespace the test owns, fast open is switched on without cookies
    // (client and server), so the data really rides in the SYN. A decoy
    // listens on the destination inside the namespace: a connect that
    // escaped redirection would meet it instead of the proxy.
    let g = governed("tfosyn", true, &[]);
    let agent = g.cg.child("agent");
    g.daemon.tag(&agent, "agent");
    let ns = TestNetns::new("tfo");
    run_ok(Command::new("ip").args([
        "netns",
        "exec",
        &ns.name,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.tcp_fastopen=0x607",
    ]));
    let port = g.server.addr.port();
    let _decoy = Bg::start(
        &Placement::default().with_netns(ns.path()),
        DECOY,
        json!({"port": port}),
    );
    let place = Placement::cgroup(g.cg.dir(&agent)).with_netns(ns.path());
    let holder = Holder::start(&place);
    g.daemon.wait_netns_served(holder.pid());
    // The decoy is reachable directly from an untagged process in the
    // namespace (the control).
    let other = g.cg.child("other");
    let mut seen_decoy = false;
    for _ in 0..50 {
        let r = python_json(
            &Placement::cgroup(g.cg.dir(&other)).with_netns(ns.path()),
            None,
            TFO,
            json!({"mode": "sendto", "host": "127.0.0.1", "port": port}),
        );
        if r["greeting"] == "hello from decoy\n" {
            seen_decoy = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen_decoy, "decoy up");
    for case in tfo_cases(port) {
        // Twice: the second connect carries the data in its SYN even where
        // a cookie would be needed.
        for _ in 0..2 {
            let r = python_json(&place, None, TFO, case.clone());
            assert_eq!(r["greeting"], g.server.greeting(), "{case}: {r}");
            assert_eq!(r["echo"], "ping\n", "{case}: {r}");
        }
    }
}

const UDP: &str = r#"
import json, socket, sys
a = json.loads(sys.argv[1])
res = {}
def attempt(name, fam, how, host, port):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(2)
    r = {"error": None, "reply": None}
    try:
        if how == "connect":
            s.connect((host, port))
            s.send(b"query")
        else:
            s.sendto(b"query", (host, port))
        r["reply"] = s.recv(100).decode()
    except Exception as e:
        r["error"] = type(e).__name__
        r["errno"] = getattr(e, "errno", None)
    res[name] = r
for t in a["targets"]:
    h = t.get("host", "127.0.0.1")
    attempt(t["name"] + "/sendto4", socket.AF_INET, "sendto", h, t["port"])
    attempt(t["name"] + "/connect4", socket.AF_INET, "connect", h, t["port"])
    attempt(t["name"] + "/sendto6-mapped", socket.AF_INET6, "sendto", "::ffff:" + h, t["port"])
    attempt(t["name"] + "/connect6-mapped", socket.AF_INET6, "connect", "::ffff:" + h, t["port"])
print(json.dumps(res))
"#;

fn udp_results(r: &Value, name: &str) -> Vec<(String, Value)> {
    r.as_object()
        .expect("object")
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}/")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn udp_from_a_tagged_cgroup_is_refused_except_to_allowed_destinations() {
    require_root();
    // Port of the governed TCP resource, with a UDP server on the same port.
    let probe = EchoServer::start("udp-governed");
    let governed_udp = UdpEcho::start(&probe.addr.to_string());
    let allowed_udp = UdpEcho::start("127.0.0.1:0");
    let cg = TestCgroup::new("udp");
    let mut files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec![probe.addr.to_string()])]);
    files.extra_args = vec!["--udp-allow".into(), allowed_udp.addr.to_string()];
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");

    let targets = json!({"targets": [
        {"name": "governed", "port": governed_udp.addr.port()},
        {"name": "allowed", "port": allowed_udp.addr.port()},
    ]});
    let r = python_json(
        &Placement::cgroup(cg.dir(&agent)),
        None,
        UDP,
        targets.clone(),
    );
    for (k, v) in udp_results(&r, "governed") {
        assert_eq!(v["error"], "PermissionError", "{k}: {r}");
        assert_eq!(v["errno"], libc::EPERM, "{k}: {r}");
    }
    assert_eq!(governed_udp.received(), 0, "no datagram reached it: {r}");
    for (k, v) in udp_results(&r, "allowed") {
        assert_eq!(v["reply"], "query", "{k}: {r}");
    }
    assert_eq!(allowed_udp.received(), 4);

    // Control: untagged, the same program reaches the governed port.
    let other = cg.child("other");
    let r = python_json(&Placement::cgroup(cg.dir(&other)), None, UDP, targets);
    for (k, v) in udp_results(&r, "governed") {
        assert_eq!(v["reply"], "query", "{k}: {r}");
    }
    assert_eq!(governed_udp.received(), 4);
}

const UDP_SERVER: &str = r#"
import json, socket, sys
a = json.loads(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((a.get("host", "127.0.0.1"), a["port"]))
while True:
    d, peer = s.recvfrom(2048)
    s.sendto(d, peer)
"#;

#[test]
fn default_udp_allow_lets_dns_through_and_nothing_else() {
    // Inside a namespace the test owns, a resolver answers on 127.0.0.11:53
    // (Docker's embedded DNS), another DNS server on 127.0.0.1:53 (no
    // resolver of this host) and another UDP service on 5353; the daemon
    // runs with the default allow list (the resolvers, not port 53 on any
    // address: issue 14).
    let g = governed("udpdns", true, &[]);
    let agent = g.cg.child("agent");
    g.daemon.tag(&agent, "agent");
    let ns = TestNetns::new("dns");
    let in_ns = Placement::default().with_netns(ns.path());
    let _dns = Bg::start(
        &in_ns,
        UDP_SERVER,
        json!({"host": "127.0.0.11", "port": 53}),
    );
    let _stray = Bg::start(&in_ns, UDP_SERVER, json!({"port": 53}));
    let _other = Bg::start(&in_ns, UDP_SERVER, json!({"port": 5353}));
    let targets = json!({"targets": [
        {"name": "dns", "host": "127.0.0.11", "port": 53},
        {"name": "stray", "port": 53},
        {"name": "other", "port": 5353},
    ]});
    // Control first (and wait for the servers): untagged reaches both.
    let plain = g.cg.child("plain");
    let mut r = Value::Null;
    for _ in 0..50 {
        r = python_json(
            &Placement::cgroup(g.cg.dir(&plain)).with_netns(ns.path()),
            None,
            UDP,
            targets.clone(),
        );
        if r["dns/sendto4"]["reply"] == "query"
            && r["stray/sendto4"]["reply"] == "query"
            && r["other/sendto4"]["reply"] == "query"
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(r["other/connect4"]["reply"], "query", "{r}");
    let r = python_json(
        &Placement::cgroup(g.cg.dir(&agent)).with_netns(ns.path()),
        None,
        UDP,
        targets,
    );
    for (k, v) in udp_results(&r, "dns") {
        assert_eq!(v["reply"], "query", "{k}: {r}");
    }
    for (k, v) in udp_results(&r, "other") {
        assert_eq!(v["errno"], libc::EPERM, "{k}: {r}");
    }
    // Port 53 on an address that is not a resolver: refused too, unless
    // this host's own resolv.conf names 127.0.0.1.
    let host_uses_localhost = g.daemon.status()["udp_allow"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v == "127.0.0.1:53"));
    if !host_uses_localhost {
        for (k, v) in udp_results(&r, "stray") {
            assert_eq!(v["errno"], libc::EPERM, "{k}: {r}");
        }
    }
}

const SOCKETS: &str = r#"
import json, socket, sys
kinds = {
    "raw_icmp": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    "raw_tcp": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP),
    "raw_icmpv6": (socket.AF_INET6, socket.SOCK_RAW, 58),
    "ping": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
    "sctp": (socket.AF_INET, socket.SOCK_STREAM, 132),
    "mptcp": (socket.AF_INET, socket.SOCK_STREAM, 262),
    "udplite": (socket.AF_INET, socket.SOCK_DGRAM, 136),
    "tcp": (socket.AF_INET, socket.SOCK_STREAM, 0),
    "udp6": (socket.AF_INET6, socket.SOCK_DGRAM, 0),
}
out = {}
for name, (f, t, p) in kinds.items():
    try:
        socket.socket(f, t, p).close()
        out[name] = "ok"
    except OSError as e:
        out[name] = e.errno
print(json.dumps(out))
"#;

#[test]
fn raw_icmp_sctp_and_mptcp_sockets_cannot_be_created_in_a_tagged_cgroup() {
    let g = governed("sockets", true, &[]);
    let agent = g.cg.child("agent");
    g.daemon.tag(&agent, "agent");
    let other = g.cg.child("other");
    // Both run as root: only the tag makes the difference.
    let untagged = python_json(
        &Placement::cgroup(g.cg.dir(&other)),
        None,
        SOCKETS,
        json!({}),
    );
    let tagged = python_json(
        &Placement::cgroup(g.cg.dir(&agent)),
        None,
        SOCKETS,
        json!({}),
    );
    for name in ["raw_icmp", "raw_tcp", "raw_icmpv6"] {
        assert_eq!(untagged[name], "ok", "control {name}: {untagged}");
    }
    for (name, got) in tagged.as_object().expect("object") {
        if name == "tcp" || name == "udp6" {
            assert_eq!(got, "ok", "{name}: {tagged}");
        } else if untagged[name] == "ok" {
            // Creatable at all on this kernel: the tag must forbid it.
            assert_eq!(got, libc::EPERM, "{name}: {tagged}");
        } else {
            // Not available here (module absent, ping group range): still
            // not creatable.
            assert_ne!(got, "ok", "{name}: {tagged}");
        }
    }
}

const LEAVE: &str = r#"
import ctypes, json, os, socket, sys
a = json.loads(sys.argv[1])
out = {"uid": os.getuid()}
def try_write(name, path):
    try:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        out[name] = "ok"
    except OSError as e:
        out[name] = e.errno
try_write("move_to_sibling", a["sibling_procs"])
try_write("move_to_root", a["root_procs"])
try_write("move_to_parent", a["parent_procs"])
try_write("kill_switch", a["kill_file"])
try:
    open(a["pinned_map"], "rb")
    out["open_pinned_map"] = "ok"
except OSError as e:
    out["open_pinned_map"] = e.errno
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect(a["admin_socket"])
    out["admin_socket"] = "ok"
except OSError as e:
    out["admin_socket"] = e.errno
# bpf(BPF_MAP_GET_FD_BY_ID, id 1): needs CAP_SYS_ADMIN / CAP_BPF.
libc = ctypes.CDLL(None, use_errno=True)
attr = ctypes.create_string_buffer(128)
ctypes.memmove(attr, (1).to_bytes(4, "little"), 4)
rc = libc.syscall(321, 14, attr, 128)
out["bpf_syscall"] = "ok" if rc >= 0 else ctypes.get_errno()
# A new user namespace grants capabilities only over itself: moving cgroups
# still needs write access to files root owns.
if libc.unshare(0x10000000) == 0:
    try_write("move_in_userns", a["sibling_procs"])
else:
    out["move_in_userns"] = "unshare:" + str(ctypes.get_errno())
out["cgroup_now"] = open("/proc/self/cgroup").read()
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("127.0.0.1", a["port"]))
    out["peer_port"] = s.getpeername()[1]
    out["greeting"] = s.makefile("rb").readline().decode()
except OSError as e:
    out["connect_error"] = str(e)
print(json.dumps(out))
"#;

#[test]
fn an_unprivileged_agent_cannot_leave_its_cgroup_or_untag_itself() {
    let g = governed("leave", true, &[]);
    let agent = g.cg.child("agent");
    let sibling = g.cg.child("sibling");
    g.daemon.tag(&agent, "agent");
    let procs = |rel: &str| g.cg.dir(rel).join("cgroup.procs").display().to_string();
    let pinned_map = g
        .files
        .pin_dir
        .join("maps-v1")
        .join("TAGGED_CGROUPS")
        .display()
        .to_string();
    assert!(fs::metadata(&pinned_map).is_ok(), "pinned map exists");
    let args = json!({
        "sibling_procs": procs(&sibling),
        "parent_procs": procs(&g.cg.rel),
        "root_procs": g.cg.mount.join("cgroup.procs").display().to_string(),
        "kill_file": g.cg.dir(&agent).join("cgroup.kill").display().to_string(),
        "pinned_map": pinned_map,
        "admin_socket": g.files.socket.display().to_string(),
        "port": g.server.addr.port(),
    });
    let r = python_json(
        &Placement::cgroup(g.cg.dir(&agent)),
        Some(NOBODY),
        LEAVE,
        args.clone(),
    );
    assert_eq!(r["uid"], NOBODY, "{r}");
    for k in [
        "move_to_sibling",
        "move_to_root",
        "move_to_parent",
        "kill_switch",
        "open_pinned_map",
        "admin_socket",
    ] {
        assert_eq!(r[k], libc::EACCES, "{k}: {r}");
    }
    assert_eq!(r["bpf_syscall"], libc::EPERM, "{r}");
    assert_ne!(r["move_in_userns"], "ok", "{r}");
    assert!(
        r["cgroup_now"]
            .as_str()
            .is_some_and(|c| c.trim_end().ends_with(&format!("/{agent}"))),
        "{r}"
    );
    // Still governed: the connect went to the proxy and was relayed.
    assert_eq!(r["peer_port"], g.daemon.port, "{r}");
    assert_eq!(r["greeting"], g.server.greeting(), "{r}");
    let flows_audited = crate::audit_events(&g.files, &[])
        .iter()
        .filter(|e| e["type"] == "session_start")
        .count();
    assert_eq!(flows_audited, 1);

    // Control: root in the same cgroup can move (so the check can fail).
    let r = python_json(&Placement::cgroup(g.cg.dir(&agent)), None, LEAVE, args);
    assert_eq!(r["move_to_sibling"], "ok", "{r}");
}

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
        r["local_port"] = s.getsockname()[1]
        g = s.makefile("rb").readline().decode()
        r["greeting"] = g
    except Exception as e:
        r["error"] = type(e).__name__
    s.close()
    res.append(r)
print(json.dumps(res))
"#;

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[test]
fn racing_untag_and_tag_against_connects_never_goes_direct_while_tagged() {
    let g = governed("race", true, &[]);
    let agent = g.cg.child("agent");
    g.daemon.tag(&agent, "agent");
    let place = Placement::cgroup(g.cg.dir(&agent));
    let port = g.server.addr.port();
    // Four agents connecting in a loop (bounded in time and count) while
    // the tag is removed and restored six times.
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let place = place.clone();
            std::thread::spawn(move || {
                python_json(
                    &place,
                    None,
                    LOOP,
                    json!({"port": port, "secs": 8, "max": 4000}),
                )
            })
        })
        .collect();
    // Tagged intervals: (start, end) in wall-clock seconds. A connect that
    // started inside one must not be direct. The intervals are shrunk to
    // the moments the CLI call was issued (tag: after it returned, untag:
    // before it was sent), so the check is conservative.
    let mut tagged: Vec<(f64, f64)> = Vec::new();
    let mut since = now_secs();
    let started = Instant::now();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        let untag_sent = now_secs();
        tagged.push((since, untag_sent));
        g.daemon.cli_ok(&["untag", &agent]);
        std::thread::sleep(Duration::from_millis(300));
        g.daemon.tag(&agent, "agent");
        since = now_secs();
    }
    let results: Vec<Value> = workers
        .into_iter()
        .flat_map(|w| {
            w.join()
                .expect("worker")
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert!(started.elapsed() < Duration::from_secs(60));
    let end = now_secs();
    tagged.push((since, end));
    let mut proxied_ok = 0;
    let mut direct = 0;
    for r in &results {
        let t = r["t"].as_f64().unwrap_or(0.0);
        let is_direct = r["peer_port"] == port;
        if is_direct {
            direct += 1;
            assert!(
                !tagged.iter().any(|(a, b)| t >= *a && t <= *b),
                "a connect started while tagged went direct: {r}\ntagged: {tagged:?}"
            );
        } else if r["greeting"] == g.server.greeting() {
            assert_eq!(r["peer_port"], g.daemon.port, "{r}");
            proxied_ok += 1;
        }
    }
    assert!(
        proxied_ok > 10,
        "traffic went through the proxy: {proxied_ok}"
    );
    assert!(direct > 0, "the untagged windows were exercised");
    // Nothing was relayed without a decision on record: every connection
    // the server saw is either direct (counted above) or has an allowed
    // command in the audit log. (Untag ends live sessions, so an allowed
    // flow may be cut before its greeting: allows can exceed successes.)
    std::thread::sleep(Duration::from_millis(500));
    let allows = crate::audit_events(&g.files, &[])
        .iter()
        .filter(|e| e["type"] == "command" && e["decision"] == "allow")
        .count();
    assert!(
        allows >= proxied_ok,
        "{allows} allows < {proxied_ok} relayed"
    );
    assert!(
        accepted(&g.server) as usize <= allows + direct,
        "server saw {} connections, {allows} allowed + {direct} direct",
        accepted(&g.server)
    );
}
