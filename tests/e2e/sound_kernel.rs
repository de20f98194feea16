//! Issue 14, kernel side: ways around the kernel programs that a hostile
//! agent (root in its container, no host capabilities) could take, each
//! tried for real and shown refused, with a control showing the same thing
//! still works where it should.
//!
//! - No exemption by PID: a tagged process that reuses a dead daemon's PID
//!   gets no way around the pinned programs.
//! - An orderly shutdown clears the kernel config (EPERM at once).
//! - A namespace whose `[::1]` proxy port someone else holds is not served.
//! - AF_PACKET and raw sockets are refused to tagged cgroups (BPF LSM).
//! - UDP port 53 only to the resolvers, not to any host.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::fs::MetadataExt,
    process::{Child, Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::harness::*;

fn accepted(s: &EchoServer) -> u32 {
    s.accepted.load(Ordering::Relaxed)
}

/// A daemon governing a fresh subtree, an echo server as a tcp resource,
/// and one tagged cgroup `agent`.
struct Gov {
    cg: TestCgroup,
    server: EchoServer,
    files: DaemonFiles,
    daemon: Daemon,
    agent: String,
}

fn governed(name: &str, extra_args: &[&str]) -> Gov {
    require_root();
    let cg = TestCgroup::new(name);
    let server = EchoServer::start(name);
    let mut files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    files.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    Gov {
        cg,
        server,
        files,
        daemon,
        agent,
    }
}

fn to(server: &EchoServer) -> Value {
    json!({"host": "127.0.0.1", "port": server.addr.port()})
}

/// Waits for stdin's first line, then connects to argv[1]:argv[2] (TCP)
/// and reports the greeting or the error as JSON.
const CONNECT_ON_GO: &str = r#"
import json, socket, sys
sys.stdin.readline()
out = {"error": None, "greeting": None}
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    out["peer"] = list(s.getpeername())[:2]
    out["greeting"] = s.makefile("rb").readline().decode()
except Exception as e:
    out["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out), flush=True)
"#;

/// Spawns `CONNECT_ON_GO` in `place` until the kernel hands it `pid`
/// (writing `pid - 1` to ns_last_pid before each fork), bounded.
fn spawn_with_pid(place: &Placement, pid: u32, port: u16) -> Option<Child> {
    for _ in 0..200 {
        fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("write ns_last_pid (needs root in the host pid namespace)");
        let mut cmd = Command::new("python3");
        cmd.args(["-c", CONNECT_ON_GO, "127.0.0.1", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        place.apply(&mut cmd);
        let mut child = cmd.spawn().expect("spawn python3");
        if child.id() == pid {
            return Some(child);
        }
        // Someone else forked in between: try again.
        let _ = child.kill();
        let _ = child.wait();
    }
    None
}

fn go(mut child: Child) -> Value {
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("write go");
    let out = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): {text} / {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn a_tagged_process_reusing_the_dead_daemons_pid_is_still_refused() {
    let mut g = governed("pidreuse", &[]);
    let place = Placement::cgroup(g.cg.dir(&g.agent));
    // Control: while the daemon runs, the tagged connect goes through it.
    let r = client(&place, to(&g.server));
    assert!(r.echo_ok(), "{r:?}");
    assert_eq!(r.peer_port(), Some(g.daemon.port as u64));

    let dead = g.daemon.child.id();
    g.daemon.kill9();
    let before = accepted(&g.server);
    let child = spawn_with_pid(&place, dead, g.server.addr.port())
        .unwrap_or_else(|| panic!("could not get pid {dead} for the tagged process"));
    let r = go(child);
    // With a PID exemption in the pinned config this connect went straight
    // to the server; now it is redirected to a port nobody holds.
    assert_eq!(r["greeting"], Value::Null, "{r}");
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("ConnectionRefused") || e.contains("PermissionError")),
        "pid {dead} (the dead daemon's) must be refused like any tagged process: {r}"
    );
    assert_eq!(accepted(&g.server), before, "nothing reached the server");

    // Control: untagged processes still go direct.
    assert_eq!(direct_greeting(g.server.addr), Some(g.server.greeting()));
    let other = g.cg.child("other");
    let r = client(&Placement::cgroup(g.cg.dir(&other)), to(&g.server));
    assert!(r.echo_ok(), "{r:?}");
    assert_eq!(r.peer_port(), Some(g.server.addr.port() as u64));
}

#[test]
fn an_orderly_shutdown_clears_the_kernel_config() {
    let mut g = governed("orderly", &[]);
    let place = Placement::cgroup(g.cg.dir(&g.agent));
    assert!(client(&place, to(&g.server)).echo_ok());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(g.daemon.child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = g.daemon.child.wait().expect("wait daemon");
    assert!(status.success(), "{status:?}\n{}", g.daemon.log_text());
    // Refused in the kernel at connect (EPERM), not sent to a port whose
    // listener is gone and that anyone could bind.
    let r = client(&place, to(&g.server));
    assert!(
        r.error().is_some_and(|e| e.contains("PermissionError")),
        "{r:?}"
    );
    assert_eq!(accepted(&g.server), 1);
    let other = g.cg.child("other");
    assert!(client(&Placement::cgroup(g.cg.dir(&other)), to(&g.server)).echo_ok());
    // A new daemon on the same pins resumes.
    g.daemon = Daemon::start(&g.files);
    let r = client(&place, to(&g.server));
    assert!(r.echo_ok(), "{r:?}");
}

/// Binds argv[1] (an address) on port argv[2] and listens; appends one line
/// to argv[3] per accepted connection. Prints "ready" once listening.
const SQUATTER: &str = r#"
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    with open(sys.argv[3], "a") as f:
        f.write("accepted %s\n" % (peer,))
    c.sendall(b"hello from the squatter\n")
    c.close()
"#;

/// Tries to bind each of argv[1..] (JSON list of [host, port]) and reports
/// "ok" or the errno for each.
const BINDS: &str = r#"
import json, socket, sys
out = {}
for host, port in json.loads(sys.argv[1]):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        out["%s/%d" % (host, port)] = "ok"
    except OSError as e:
        out["%s/%d" % (host, port)] = e.errno
    s.close()
print(json.dumps(out))
"#;

#[test]
fn a_namespace_whose_ipv6_proxy_port_is_squatted_is_not_served() {
    require_root();
    let cg = TestCgroup::new("squat");
    let server = EchoServer::start_on("[::1]:0", "v6-target");
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("v6.toml", &[("v6", vec![server.addr.to_string()])]);
    let daemon = Daemon::start(&files);
    let ns = TestNetns::new("squat");
    // The squatter binds [::1]:PORT in the namespace before it is tagged.
    let squat_cg = cg.child("squatter");
    let victim_cg = cg.child("victim");
    let log = files.dir.join("squatter.log");
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        SQUATTER,
        "::1",
        &files.port.to_string(),
        &log.display().to_string(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    Placement::cgroup(cg.dir(&squat_cg))
        .with_netns(ns.path())
        .apply(&mut cmd);
    let mut squatter = cmd.spawn().expect("spawn squatter");
    let mut line = String::new();
    BufReader::new(squatter.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("squatter ready");
    assert_eq!(line.trim(), "ready");
    let ns_ino = fs::metadata(ns.path()).expect("netns").ino();

    daemon.tag(&squat_cg, "a");
    daemon.tag(&victim_cg, "agent");
    let victim = Placement::cgroup(cg.dir(&victim_cg)).with_netns(ns.path());
    // The daemon sees the namespace and refuses to serve it, and says why.
    let mut refused = Value::Null;
    wait_until(
        Duration::from_secs(10),
        || {
            let st = daemon.status();
            refused = st["netns_refused"]
                .as_array()
                .and_then(|a| a.iter().find(|n| n["inode"].as_u64() == Some(ns_ino)))
                .cloned()
                .unwrap_or(Value::Null);
            !refused.is_null()
        },
        "status lists the namespace as refused",
    );
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&format!("[::1]:{}", files.port))),
        "{refused}"
    );
    let st = daemon.status();
    assert!(
        !st["netns"]
            .as_array()
            .expect("netns")
            .iter()
            .any(|n| n["inode"].as_u64() == Some(ns_ino)),
        "not served: {st}"
    );
    wait_until(
        Duration::from_secs(5),
        || {
            count_events(&files, "netns_refused") >= 1
                && daemon.log_text().contains("not serving network namespace")
        },
        "refusal audited and logged",
    );

    // Another tagged process's IPv6 (and IPv4) connects are refused in the
    // kernel; none reaches the squatter.
    for args in [
        json!({"v6": true, "host": "::1", "port": server.addr.port()}),
        json!({"host": "127.0.0.1", "port": 9}),
    ] {
        let r = client(&victim, args.clone());
        assert!(
            r.error().is_some_and(|e| e.contains("PermissionError")),
            "{args}: {r:?}"
        );
        assert_ne!(
            r.greeting(),
            Some("hello from the squatter\n"),
            "{args}: {r:?}"
        );
    }
    assert!(
        fs::read_to_string(&log).unwrap_or_default().is_empty(),
        "the squatter received a flow"
    );
    assert_eq!(accepted(&server), 0);

    // Once tagged, nobody there may bind the proxy port (the squatter could
    // not have taken it now), while other ports stay bindable.
    let binds = python_json(
        &victim,
        None,
        BINDS,
        json!([
            ["127.0.0.1", files.port],
            ["::1", files.port],
            ["0.0.0.0", files.port],
            ["127.0.0.1", 0]
        ]),
    );
    for k in ["127.0.0.1", "::1", "0.0.0.0"] {
        assert_eq!(binds[format!("{k}/{}", files.port)], libc::EPERM, "{binds}");
    }
    assert_eq!(binds["127.0.0.1/0"], "ok", "{binds}");

    // Control: once the squatter is gone the namespace is served and the
    // same IPv6 connect goes through the proxy to the resource.
    let _ = squatter.kill();
    let _ = squatter.wait();
    let holder = Holder::start(&victim);
    daemon.wait_netns_served(holder.pid());
    let r = client(
        &victim,
        json!({"v6": true, "host": "::1", "port": server.addr.port()}),
    );
    assert_eq!(r.error(), None, "{r:?}\n{}", daemon.log_text());
    assert_eq!(r.greeting(), Some(server.greeting().as_str()), "{r:?}");
    assert_eq!(r.peer_port(), Some(files.port as u64));
    assert!(fs::read_to_string(&log).unwrap_or_default().is_empty());
}

fn count_events(files: &DaemonFiles, kind: &str) -> usize {
    let out = Command::new(BIN)
        .args(["audit", "tail", "--json", "--state-dir"])
        .arg(&files.state)
        .output()
        .expect("audit tail");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["type"] == kind)
        .count()
}

/// Tries to create sockets of several families and types; "ok" or errno.
const FAMILIES: &str = r#"
import json, socket, sys
kinds = {
    "packet_raw": (socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)),
    "packet_dgram": (socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3)),
    "inet_packet": (socket.AF_INET, 10, socket.htons(3)),  # SOCK_PACKET
    "raw_inet": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
    "raw_inet6": (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW),
    "ping": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
    "xdp": (44, socket.SOCK_RAW, 0),
    "vsock": (40, socket.SOCK_STREAM, 0),
    "tipc": (30, socket.SOCK_RDM, 0),
    "can": (29, socket.SOCK_RAW, 1),
    "unix": (socket.AF_UNIX, socket.SOCK_STREAM, 0),
    "netlink": (socket.AF_NETLINK, socket.SOCK_RAW, 0),
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
fn packet_raw_and_other_wire_families_are_refused_to_tagged_cgroups() {
    let g = governed("families", &[]);
    let st = g.daemon.status();
    let enforced = st["socket_lsm"]["enforced"] == true;
    let detail = st["socket_lsm"]["detail"].as_str().unwrap_or_default();
    assert!(!detail.is_empty(), "{st}");
    let other = g.cg.child("other");
    // Both run as root: only the tag makes the difference.
    let untagged = python_json(
        &Placement::cgroup(g.cg.dir(&other)),
        None,
        FAMILIES,
        json!({}),
    );
    let tagged = python_json(
        &Placement::cgroup(g.cg.dir(&g.agent)),
        None,
        FAMILIES,
        json!({}),
    );
    for name in ["packet_raw", "packet_dgram", "raw_inet", "raw_inet6"] {
        assert_eq!(untagged[name], "ok", "control {name}: {untagged}");
    }
    for name in ["unix", "netlink", "tcp", "udp6"] {
        assert_eq!(tagged[name], "ok", "{name} stays allowed: {tagged}");
    }
    // Raw and ICMP inet sockets are refused by cgroup/sock_create whether or
    // not BPF LSM runs.
    for name in ["raw_inet", "raw_inet6"] {
        assert_eq!(tagged[name], libc::EPERM, "{name}: {tagged}");
    }
    // Ping sockets: EPERM, or EACCES where ping_group_range allows nobody.
    assert_ne!(tagged["ping"], "ok", "{tagged}");
    if !enforced {
        // The kernel will not run BPF LSM programs here (not in the lsm=
        // list, or refused by lockdown or a hardened kernel). The daemon must
        // say so everywhere an operator looks, and the families it cannot
        // deny must be the ones SECURITY.md lists.
        eprintln!(
            "NOTE: BPF LSM not enforced on this host ({detail}); AF_PACKET is then not denied"
        );
        assert!(
            g.daemon
                .log_text()
                .contains("socket-family enforcement is OFF"),
            "{}",
            g.daemon.log_text()
        );
        assert_eq!(st["ready"]["socket_lsm"], false, "{st}");
        return;
    }
    // Every other family or type is refused with EPERM, whether or not the
    // kernel has it (the LSM hook runs before the family is looked up).
    for (name, got) in tagged.as_object().expect("object") {
        if ["unix", "netlink", "tcp", "udp6", "ping"].contains(&name.as_str()) {
            continue;
        }
        assert_eq!(got, libc::EPERM, "{name}: {tagged}");
    }
    // A nested cgroup below the tagged one is governed the same way.
    let nested = g.cg.child("agent/pod/container");
    let deep = python_json(
        &Placement::cgroup(g.cg.dir(&nested)),
        None,
        FAMILIES,
        json!({}),
    );
    assert_eq!(deep["packet_raw"], libc::EPERM, "{deep}");
    assert_eq!(deep["tcp"], "ok", "{deep}");
    // While the daemon is down the pinned LSM program stays in force.
    let mut g = g;
    g.daemon.kill9();
    let down = python_json(
        &Placement::cgroup(g.cg.dir(&g.agent)),
        None,
        FAMILIES,
        json!({}),
    );
    assert_eq!(down["packet_raw"], libc::EPERM, "{down}");
    assert_eq!(down["raw_inet"], libc::EPERM, "{down}");
}

/// One UDP echo server per [host, port] in argv[1] (JSON), in one process.
const UDP_SERVERS: &str = r#"
import json, select, socket, sys
socks = []
for host, port in json.loads(sys.argv[1]):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    socks.append(s)
print("ready", flush=True)
while True:
    r, _, _ = select.select(socks, [], [])
    for s in r:
        d, peer = s.recvfrom(2048)
        s.sendto(d, peer)
"#;

/// Sends one datagram to each [host, port] of argv[1], by sendto and by
/// connect+send; reports the reply or the errno.
const UDP_PROBE: &str = r#"
import json, socket, sys
out = {}
for host, port in json.loads(sys.argv[1]):
    for how in ("sendto", "connect"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        key = "%s:%d/%s" % (host, port, how)
        try:
            if how == "connect":
                s.connect((host, port))
                s.send(b"query")
            else:
                s.sendto(b"query", (host, port))
            out[key] = s.recv(100).decode()
        except OSError as e:
            out[key] = e.errno if e.errno is not None else type(e).__name__
        s.close()
print(json.dumps(out))
"#;

struct UdpServers(Child);

impl UdpServers {
    fn start(ns: &TestNetns, binds: Value) -> Self {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", UDP_SERVERS, &binds.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        Placement::default().with_netns(ns.path()).apply(&mut cmd);
        let mut child = cmd.spawn().expect("spawn udp servers");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("udp servers ready");
        assert_eq!(line.trim(), "ready");
        Self(child)
    }
}

impl Drop for UdpServers {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The nameservers of the host's /etc/resolv.conf, as `ADDR:53`.
fn host_resolvers() -> Vec<String> {
    fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse::<std::net::IpAddr>().ok())
        .map(|ip| std::net::SocketAddr::new(ip, 53).to_string())
        .collect()
}

#[test]
fn udp_port_53_reaches_the_resolvers_and_no_other_host() {
    // Default udp_allow: the host's resolvers and the namespace's loopback
    // resolver (Docker's 127.0.0.11), never port 53 anywhere.
    let g = governed("dns53", &[]);
    let allow: Vec<String> = g.daemon.status()["udp_allow"]
        .as_array()
        .expect("udp_allow in status")
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    assert!(allow.contains(&"127.0.0.11:53".to_string()), "{allow:?}");
    for r in host_resolvers() {
        assert!(allow.contains(&r), "host resolver {r} missing: {allow:?}");
    }
    assert!(!allow.iter().any(|a| a.starts_with('*')), "{allow:?}");

    let ns = TestNetns::new("dns53");
    let targets = json!([["127.0.0.11", 53], ["127.0.0.99", 53], ["127.0.0.53", 53]]);
    let _servers = UdpServers::start(&ns, targets.clone());
    let agent = Placement::cgroup(g.cg.dir(&g.agent)).with_netns(ns.path());
    let other = g.cg.child("other");
    let plain = Placement::cgroup(g.cg.dir(&other)).with_netns(ns.path());

    // Control: untagged reaches all three.
    let r = python_json(&plain, None, UDP_PROBE, targets.clone());
    for (k, v) in r.as_object().expect("object") {
        assert_eq!(v, "query", "control {k}: {r}");
    }
    let r = python_json(&agent, None, UDP_PROBE, targets.clone());
    for how in ["sendto", "connect"] {
        assert_eq!(r[format!("127.0.0.11:53/{how}")], "query", "{r}");
        // Port 53 on an address that is no resolver: refused.
        assert_eq!(r[format!("127.0.0.99:53/{how}")], libc::EPERM, "{r}");
        if !allow.contains(&"127.0.0.53:53".to_string()) {
            assert_eq!(r[format!("127.0.0.53:53/{how}")], libc::EPERM, "{r}");
        }
    }

    // An explicit list replaces the default (independent of this host's
    // resolv.conf): only 127.0.0.53 now.
    let mut g = g;
    g.daemon.kill9();
    g.files.extra_args = vec!["--udp-allow".into(), "127.0.0.53:53".into()];
    g.daemon = Daemon::start(&g.files);
    assert_eq!(g.daemon.status()["udp_allow"], json!(["127.0.0.53:53"]));
    let r = python_json(&agent, None, UDP_PROBE, targets);
    for how in ["sendto", "connect"] {
        assert_eq!(r[format!("127.0.0.53:53/{how}")], "query", "{r}");
        assert_eq!(r[format!("127.0.0.11:53/{how}")], libc::EPERM, "{r}");
        assert_eq!(r[format!("127.0.0.99:53/{how}")], libc::EPERM, "{r}");
    }
}

#[test]
fn the_daemon_refuses_to_start_inside_a_tagged_cgroup() {
    // Without a PID exemption the daemon must never be governed: started in
    // a cgroup a persisted tag covers, it refuses to run (the pinned
    // programs stay in force meanwhile).
    let mut g = governed("selftag", &[]);
    g.daemon.kill9();
    // Start the next daemon from inside the tagged cgroup.
    let started = Instant::now();
    let mut cmd = Command::new(BIN);
    cmd.arg("daemon")
        .arg("--config")
        .arg(g.files.config_file())
        .arg("--policies")
        .arg(&g.files.policies)
        .arg("--state-dir")
        .arg(&g.files.state)
        .arg("--admin-socket")
        .arg(&g.files.socket)
        .arg("--pin-dir")
        .arg(&g.files.pin_dir)
        .arg("--cgroup-root")
        .arg(&g.files.cgroup_root)
        .arg("--listen-port")
        .arg(g.files.port.to_string())
        .args(["--metrics", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Placement::cgroup(g.cg.dir(&g.agent)).apply(&mut cmd);
    let out = cmd.output().expect("spawn daemon");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("must never govern itself"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // Still fail-closed: the tagged cgroup is refused, not let through.
    let r = client(&Placement::cgroup(g.cg.dir(&g.agent)), to(&g.server));
    assert!(r.error().is_some(), "{r:?}");
    assert_eq!(accepted(&g.server), 0);
}

#[test]
fn a_namespace_without_ipv6_loopback_is_served_for_ipv4_only() {
    require_root();
    let cg = TestCgroup::new("nov6");
    let server = EchoServer::start("nov6");
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let ns = TestNetns::new("nov6");
    // No ::1 in this namespace: the daemon cannot hold [::1]:PORT, and
    // nobody else can either.
    run_ok(Command::new("ip").args([
        "netns",
        "exec",
        &ns.name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.lo.disable_ipv6=1",
    ]));
    let place = Placement::cgroup(cg.dir(&agent)).with_netns(ns.path());
    let holder = Holder::start(&place);
    daemon.wait_netns_served(holder.pid());
    wait_until(
        Duration::from_secs(5),
        || daemon.log_text().contains("served for IPv4 only"),
        "IPv4-only serving logged",
    );
    // IPv4 is served.
    let r = client(&place, to(&server));
    assert!(r.echo_ok(), "{r:?}\n{}", daemon.log_text());
    // IPv6 comes back and someone else takes [::1]:PORT: native IPv6
    // connects are refused in the kernel, never sent to it.
    run_ok(Command::new("ip").args([
        "netns",
        "exec",
        &ns.name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.lo.disable_ipv6=0",
    ]));
    let log = files.dir.join("squatter.log");
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        SQUATTER,
        "::1",
        &files.port.to_string(),
        &log.display().to_string(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    Placement::default().with_netns(ns.path()).apply(&mut cmd);
    let mut squatter = cmd.spawn().expect("spawn squatter");
    let mut line = String::new();
    // ::1 may take a moment to come back.
    let _ = BufReader::new(squatter.stdout.take().expect("stdout")).read_line(&mut line);
    assert_eq!(line.trim(), "ready", "squatter could not bind [::1]");
    let r = client(&place, json!({"v6": true, "host": "::1", "port": 9}));
    assert!(
        r.error().is_some_and(|e| e.contains("PermissionError")),
        "{r:?}"
    );
    assert!(fs::read_to_string(&log).unwrap_or_default().is_empty());
    let _ = squatter.kill();
    let _ = squatter.wait();
    // IPv4 still served.
    assert!(client(&place, to(&server)).echo_ok());
}

/// Sends one hand-made Ethernet/IPv4/UDP frame out of interface `iface`
/// (argv[1] JSON: iface, src, dst, dmac, port) from an AF_PACKET socket;
/// first tries PACKET_QDISC_BYPASS.
const RAW_FRAME: &str = r#"
import json, socket, struct, sys
a = json.loads(sys.argv[1])
out = {}
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return (~s) & 0xffff
payload = b"raw frame"
udp = struct.pack("!HHHH", 4444, a["port"], 8 + len(payload), 0) + payload
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                 socket.inet_aton(a["src"]), socket.inet_aton(a["dst"]))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
frame = bytes.fromhex(a["dmac"].replace(":", "")) + b"\x02\0\0\0\0\x01" + b"\x08\x00" + ip + udp
try:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind((a["iface"], 0))
    try:
        s.setsockopt(263, 20, 1)  # SOL_PACKET, PACKET_QDISC_BYPASS
        out["bypass"] = "ok"
    except OSError as e:
        out["bypass"] = e.errno
    try:
        out["sent"] = s.send(frame)
    except OSError as e:
        out["sent"] = e.errno
except OSError as e:
    out["socket"] = e.errno
print(json.dumps(out))
"#;

/// Appends every datagram received on 127.0.0.1:argv[1] to argv[2].
const UDP_SINK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    d, _ = s.recvfrom(2048)
    with open(sys.argv[2], "a") as f:
        f.write(d.decode(errors="replace") + "\n")
"#;

#[test]
fn packet_frames_from_tagged_cgroups_never_leave_even_without_bpf_lsm() {
    let mut g = governed("rawframes", &[]);
    let ns = TestNetns::new("raw");
    // A wire inside the namespace: frames sent out of `vb` arrive on `va`
    // (10.77.0.1), from a source that is not local (so not martian).
    for args in [
        vec!["link", "add", "va", "type", "veth", "peer", "name", "vb"],
        vec!["addr", "add", "10.77.0.1/24", "dev", "va"],
        vec!["link", "set", "va", "up"],
        vec!["link", "set", "vb", "up"],
    ] {
        run_ok(Command::new("ip").arg("-n").arg(&ns.name).args(args));
    }
    let link = run_ok(Command::new("ip").args(["-n", &ns.name, "-j", "link", "show", "va"]));
    let link: Value = serde_json::from_slice(&link.stdout).expect("ip -j");
    let dmac = link[0]["address"].as_str().expect("mac").to_string();
    let place = Placement::cgroup(g.cg.dir(&g.agent)).with_netns(ns.path());
    let holder = Holder::start(&place);
    g.daemon.wait_netns_served(holder.pid());
    let ino = fs::metadata(ns.path()).expect("netns").ino();
    let st = g.daemon.status();
    let served = st["netns"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["inode"].as_u64() == Some(ino)).cloned())
        .expect("served");
    assert!(
        served["egress_guarded"].as_u64().is_some_and(|n| n >= 1),
        "{served}"
    );
    let port = 40000 + (std::process::id() % 20000) as u16;
    let sink_log = g.files.dir.join("sink.log");
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        UDP_SINK,
        &port.to_string(),
        &sink_log.display().to_string(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    Placement::default().with_netns(ns.path()).apply(&mut cmd);
    let mut sink = cmd.spawn().expect("spawn sink");
    let mut line = String::new();
    BufReader::new(sink.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("sink ready");
    assert_eq!(line.trim(), "ready");
    let received = || {
        fs::read_to_string(&sink_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == "raw frame")
            .count()
    };

    // Control: untagged, the hand-made frame is delivered.
    let other = g.cg.child("other");
    let plain = Placement::cgroup(g.cg.dir(&other)).with_netns(ns.path());
    let frame =
        json!({"iface": "vb", "src": "10.77.0.9", "dst": "10.77.0.1", "dmac": dmac, "port": port});
    let r = python_json(&plain, None, RAW_FRAME, frame.clone());
    assert_eq!(r["bypass"], "ok", "{r}");
    wait_until(
        Duration::from_secs(5),
        || received() == 1,
        "control frame delivered",
    );

    // Tagged: either the socket is refused (BPF LSM) or nothing it sends
    // leaves, and the qdisc bypass is refused.
    let check = |g: &Gov| {
        let r = python_json(
            &Placement::cgroup(g.cg.dir(&g.agent)).with_netns(ns.path()),
            None,
            RAW_FRAME,
            frame.clone(),
        );
        if r.get("socket").is_some() {
            assert_eq!(r["socket"], libc::EPERM, "{r}");
        } else {
            assert_eq!(r["bypass"], libc::EPERM, "{r}");
        }
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(received(), 1, "a tagged AF_PACKET frame got through: {r}");
    };
    check(&g);
    // The filters are pinned: still in force while the daemon is down.
    g.daemon.kill9();
    check(&g);
    let _ = sink.kill();
    let _ = sink.wait();
}

#[test]
fn interfaces_added_to_a_served_namespace_get_the_egress_filter() {
    let g = governed("newiface", &[]);
    let ns = TestNetns::new("newif");
    let place = Placement::cgroup(g.cg.dir(&g.agent)).with_netns(ns.path());
    let holder = Holder::start(&place);
    g.daemon.wait_netns_served(holder.pid());
    let ino = fs::metadata(ns.path()).expect("netns").ino();
    let guarded = || {
        g.daemon.status()["netns"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["inode"].as_u64() == Some(ino)).cloned())
            .and_then(|n| n["egress_guarded"].as_u64())
            .unwrap_or(0)
    };
    assert_eq!(guarded(), 1, "lo only");
    run_ok(Command::new("ip").args([
        "-n", &ns.name, "link", "add", "va", "type", "veth", "peer", "name", "vb",
    ]));
    wait_until(
        Duration::from_secs(15),
        || guarded() == 3,
        "the new veth pair is guarded",
    );
}
