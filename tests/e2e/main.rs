//! Privileged end-to-end tests: real cgroups, real eBPF programs, real
//! network namespaces, the real `portcullis` binary, real TCP servers and an
//! unmodified Python client placed in tagged cgroups.
//!
//! Run as root (`cargo xtask test` does). Every test owns its cgroup subtree,
//! namespaces, ports, state dir and pin dir, and only uses loopback.

mod compat_http;
mod compat_ops;
mod compat_pg;
mod compat_ssh;
mod compat_ssh_suites;
mod console;
mod differential;
mod faults;
mod fleet;
mod harness;
mod http;
mod idle;
mod mcp;
mod mcp_everything;
mod ops;
mod perf_alloc;
mod perf_http;
mod perf_pg;
mod perf_tcp;
mod pods;
mod postgres;
mod security;
mod sound_http;
mod sound_kernel;
mod sound_limits;
mod sound_mask;
mod sound_pg;
mod sound_ssh;
mod ssh;

use std::{fs, time::Duration};

use harness::*;
use serde_json::json;

/// One daemon governing one fresh cgroup subtree with an echo server
/// registered as a tcp resource.
struct Setup {
    cg: TestCgroup,
    server: EchoServer,
    files: DaemonFiles,
    daemon: Daemon,
}

fn setup(name: &str) -> Setup {
    require_root();
    let cg = TestCgroup::new(name);
    let server = EchoServer::start(name);
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    let daemon = Daemon::start(&files);
    Setup {
        cg,
        server,
        files,
        daemon,
    }
}

fn to(server: &EchoServer) -> serde_json::Value {
    json!({"host": "127.0.0.1", "port": server.addr.port()})
}

#[test]
fn tagged_client_is_redirected_relayed_and_attributed() {
    let s = setup("tagged");
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "billing-agent");
    let place = Placement::cgroup(s.cg.dir(&agent));

    let mut args = to(&s.server);
    args["hold"] = json!(3);
    let held = HeldClient::start(&place, args, &s.files.dir);
    let flows = s.daemon.flows();
    assert_eq!(flows.len(), 1, "{flows:#?}");
    let f = &flows[0];
    assert_eq!(f["original_dst"], s.server.addr.to_string());
    assert_eq!(f["cgroup"], format!("/{agent}"));
    let cgroup_id = std::os::unix::fs::MetadataExt::ino(&fs::metadata(s.cg.dir(&agent)).unwrap());
    assert_eq!(f["cgroup_id"].as_u64(), Some(cgroup_id));
    assert_eq!(f["pid"].as_u64(), Some(held.pid() as u64));
    assert_eq!(f["identity"], "billing-agent");
    assert_eq!(f["resource"], "echo");
    assert_eq!(f["protocol"], "tcp");
    let r = held.finish();
    assert_eq!(r.error(), None, "{r:?}");
    assert_eq!(r.greeting(), Some(s.server.greeting().as_str()));
    assert!(r.echo_ok(), "{r:?}");
    // The agent's socket really went to the proxy listener, not the server.
    assert_eq!(r.peer_port(), Some(s.daemon.port as u64));
    assert_eq!(
        s.server.accepted.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // session_end is logged once both directions have closed, which may
    // be just after the client has seen its own end.
    harness::wait_until(
        std::time::Duration::from_secs(10),
        || s.daemon.log_text().contains("session_end"),
        "the daemon's session_end line",
    );
    let log = s.daemon.log_text();
    assert!(
        log.contains("session_start") && log.contains("session_end"),
        "{log}"
    );
}

/// Every session runs on one of the daemon's connection workers, and
/// sessions accepted one after another go to the workers in turn.
#[test]
fn sessions_are_spread_over_the_connection_workers() {
    let s = setup("workers");
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "billing-agent");
    let place = Placement::cgroup(s.cg.dir(&agent));
    let workers = s.daemon.status()["workers"]
        .as_u64()
        .expect("status names the workers") as usize;
    assert!(workers >= 1);
    let mut args = to(&s.server);
    args["hold"] = json!(3);
    let held: Vec<HeldClient> = (0..2 * workers)
        .map(|_| HeldClient::start(&place, args.clone(), &s.files.dir))
        .collect();
    let flows = s.daemon.flows();
    assert_eq!(flows.len(), 2 * workers, "{flows:#?}");
    let mut per_worker = vec![0; workers];
    for f in &flows {
        let w = f["worker"].as_u64().expect("the session's worker") as usize;
        per_worker[w] += 1;
    }
    assert_eq!(per_worker, vec![2; workers], "{flows:#?}");
    for h in held {
        let r = h.finish();
        assert_eq!(r.error(), None, "{r:?}");
        assert!(r.echo_ok(), "{r:?}");
    }
}

/// `--workers N` sets how many connection workers run: with one, its
/// thread is the daemon's only `conn-*` thread and every session runs on it.
#[test]
fn the_workers_flag_sets_how_many_workers_run() {
    require_root();
    let cg = TestCgroup::new("workers-one");
    let server = EchoServer::start("workers-one");
    let mut files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    files.extra_args = vec!["--workers".into(), "1".into()];
    let daemon = Daemon::start(&files);
    assert_eq!(daemon.status()["workers"].as_u64(), Some(1));
    let conn_threads = fs::read_dir(format!("/proc/{}/task", daemon.child.id()))
        .expect("the daemon's threads")
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("conn-"))
        .count();
    assert_eq!(conn_threads, 1);
    let agent = cg.child("agent");
    daemon.tag(&agent, "billing-agent");
    let place = Placement::cgroup(cg.dir(&agent));
    let mut args = to(&server);
    args["hold"] = json!(3);
    let held: Vec<HeldClient> = (0..3)
        .map(|_| HeldClient::start(&place, args.clone(), &files.dir))
        .collect();
    let flows = daemon.flows();
    assert_eq!(flows.len(), 3, "{flows:#?}");
    assert!(flows.iter().all(|f| f["worker"] == 0), "{flows:#?}");
    for h in held {
        let r = h.finish();
        assert_eq!(r.error(), None, "{r:?}");
        assert!(r.echo_ok(), "{r:?}");
    }
}

#[test]
fn untagged_cgroup_goes_direct() {
    let s = setup("untagged");
    let tagged = s.cg.child("tagged");
    let other = s.cg.child("other");
    s.daemon.tag(&tagged, "a");
    let r = client(&Placement::cgroup(s.cg.dir(&other)), to(&s.server));
    assert_eq!(r.error(), None, "{r:?}");
    assert_eq!(
        r.peer_port(),
        Some(s.server.addr.port() as u64),
        "went direct"
    );
    assert!(r.echo_ok());
    assert!(s.daemon.flows().is_empty());
    assert_eq!(s.daemon.status()["counters"]["flows_accepted"], 0);
}

#[test]
fn child_cgroups_inherit_the_nearest_tag() {
    let s = setup("inherit");
    let parent = s.cg.child("team");
    let grandchild = s.cg.child("team/pod/container");
    s.daemon.tag(&parent, "team-agent");
    let mut args = to(&s.server);
    args["hold"] = json!(2);
    let held = HeldClient::start(
        &Placement::cgroup(s.cg.dir(&grandchild)),
        args,
        &s.files.dir,
    );
    let flows = s.daemon.flows();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0]["identity"], "team-agent");
    assert_eq!(flows[0]["cgroup"], format!("/{grandchild}"));
    assert_eq!(flows[0]["tagged_cgroup"], format!("/{parent}"));
    let r = held.finish();
    assert!(r.echo_ok(), "{r:?}");

    // A nearer tag wins over the ancestor's.
    let inner = s.cg.child("team/pod");
    s.daemon.tag(&inner, "pod-agent");
    let mut args = to(&s.server);
    args["hold"] = json!(2);
    let held = HeldClient::start(
        &Placement::cgroup(s.cg.dir(&grandchild)),
        args,
        &s.files.dir,
    );
    assert_eq!(s.daemon.flows()[0]["identity"], "pod-agent");
    assert!(held.finish().echo_ok());
}

#[test]
fn dual_stack_socket_dialing_ipv4_mapped_is_intercepted() {
    let s = setup("mapped");
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "java-agent");
    let mut args =
        json!({"v6": true, "host": "::ffff:127.0.0.1", "port": s.server.addr.port(), "hold": 2});
    let held = HeldClient::start(
        &Placement::cgroup(s.cg.dir(&agent)),
        args.take(),
        &s.files.dir,
    );
    let flows = s.daemon.flows();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0]["original_dst"], s.server.addr.to_string());
    let r = held.finish();
    assert_eq!(r.error(), None, "{r:?}");
    assert!(r.echo_ok());
    assert_eq!(r.peer_port(), Some(s.daemon.port as u64));
}

#[test]
fn ipv6_destination_is_intercepted() {
    require_root();
    let cg = TestCgroup::new("v6");
    let server = EchoServer::start_on("[::1]:0", "v6");
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("v6.toml", &[("v6", vec![server.addr.to_string()])]);
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "v6-agent");
    let r = client(
        &Placement::cgroup(cg.dir(&agent)),
        json!({"v6": true, "host": "::1", "port": server.addr.port()}),
    );
    assert_eq!(r.error(), None, "{r:?}\n{}", daemon.log_text());
    assert!(r.echo_ok());
    assert_eq!(r.peer_port(), Some(files.port as u64));
}

#[test]
fn client_in_its_own_network_namespace_is_intercepted() {
    let s = setup("netns");
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "container-agent");
    let ns = TestNetns::new("ns");
    let place = Placement::cgroup(s.cg.dir(&agent)).with_netns(ns.path());
    let holder = Holder::start(&place);
    s.daemon.wait_netns_served(holder.pid());

    let mut args = to(&s.server);
    args["hold"] = json!(2);
    let held = HeldClient::start(&place, args, &s.files.dir);
    let flows = s.daemon.flows();
    assert_eq!(flows.len(), 1);
    let host_cookie = s.daemon.status()["netns"][0]["cookie"].clone();
    assert_ne!(
        flows[0]["netns_cookie"], host_cookie,
        "flow attributed to the container's namespace"
    );
    let r = held.finish();
    assert_eq!(r.error(), None, "{r:?}");
    assert_eq!(r.greeting(), Some(s.server.greeting().as_str()));
    assert!(r.echo_ok());
}

#[test]
fn a_fresh_namespace_fails_closed_until_served() {
    let s = setup("freshns");
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "a");
    let ns = TestNetns::new("fresh");
    let place = Placement::cgroup(s.cg.dir(&agent)).with_netns(ns.path());
    // No process lived in this namespace before, and the daemon is frozen so
    // it cannot start serving it meanwhile: the connect must be refused in
    // the kernel, never sent anywhere.
    s.daemon.freeze(true);
    let first = client(&place, to(&s.server));
    s.daemon.freeze(false);
    assert!(
        first
            .error()
            .is_some_and(|e| e.contains("PermissionError") || e.contains("Refused")),
        "{first:?}"
    );
    assert_eq!(
        s.server.accepted.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // The kernel told the daemon; once a process stays there it is served.
    let holder = Holder::start(&place);
    s.daemon.wait_netns_served(holder.pid());
    let r = client(&place, to(&s.server));
    assert!(r.echo_ok(), "{r:?}");
}

#[test]
fn same_client_address_in_two_namespaces_does_not_mix_flows() {
    require_root();
    let cg = TestCgroup::new("twons");
    let a = EchoServer::start("server-a");
    let b = EchoServer::start("server-b");
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources(
        "ab.toml",
        &[
            ("a", vec![a.addr.to_string()]),
            ("b", vec![b.addr.to_string()]),
        ],
    );
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let (ns1, ns2) = (TestNetns::new("one"), TestNetns::new("two"));
    let p1 = Placement::cgroup(cg.dir(&agent)).with_netns(ns1.path());
    let p2 = Placement::cgroup(cg.dir(&agent)).with_netns(ns2.path());
    let (h1, h2) = (Holder::start(&p1), Holder::start(&p2));
    daemon.wait_netns_served(h1.pid());
    daemon.wait_netns_served(h2.pid());

    // Both clients use the very same local address and port, and both
    // connect while the daemon is frozen, so both kernel flow entries exist
    // at once: a key without the namespace would hand one client the other's
    // destination.
    let port = free_port();
    daemon.freeze(true);
    let c1 = HeldClient::spawn(
        &p1,
        json!({"host": "127.0.0.1", "port": a.addr.port(), "bind_port": port, "hold": 2}),
        &files.dir,
    );
    let c2 = HeldClient::spawn(
        &p2,
        json!({"host": "127.0.0.1", "port": b.addr.port(), "bind_port": port, "hold": 2}),
        &files.dir,
    );
    std::thread::sleep(Duration::from_millis(500));
    daemon.freeze(false);
    c1.wait_ready();
    c2.wait_ready();
    let flows = daemon.flows();
    assert_eq!(flows.len(), 2, "{flows:#?}");
    assert_eq!(
        flows[0]["client"], flows[1]["client"],
        "same client address"
    );
    assert_ne!(flows[0]["netns_cookie"], flows[1]["netns_cookie"]);
    let r1 = c1.finish();
    let r2 = c2.finish();
    assert_eq!(r1.greeting(), Some(a.greeting().as_str()), "{r1:?}");
    assert_eq!(r2.greeting(), Some(b.greeting().as_str()), "{r2:?}");
}

#[test]
fn killed_daemon_fails_closed_and_restart_resumes() {
    let mut s = setup("failclosed");
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "a");
    let ns = TestNetns::new("fc");
    let place = Placement::cgroup(s.cg.dir(&agent));
    let ns_place = Placement::cgroup(s.cg.dir(&agent)).with_netns(ns.path());
    let holder = Holder::start(&ns_place);
    s.daemon.wait_netns_served(holder.pid());
    assert!(client(&place, to(&s.server)).echo_ok());

    s.daemon.kill9();
    let before = s.server.accepted.load(std::sync::atomic::Ordering::Relaxed);
    for p in [&place, &ns_place] {
        let r = client(p, to(&s.server));
        assert!(
            r.error().is_some_and(|e| e.contains("ConnectionRefused")),
            "tagged client must be refused while the daemon is down: {r:?}"
        );
    }
    assert_eq!(
        s.server.accepted.load(std::sync::atomic::Ordering::Relaxed),
        before
    );
    // Untagged traffic is unaffected.
    assert_eq!(direct_greeting(s.server.addr), Some(s.server.greeting()));
    let other = s.cg.child("other");
    let r = client(&Placement::cgroup(s.cg.dir(&other)), to(&s.server));
    assert!(r.echo_ok(), "{r:?}");

    // Restart on the same pins and state: tags persisted, interception resumes.
    s.daemon = Daemon::start(&s.files);
    let tags = s.daemon.json(&["tags", "--json"]);
    assert_eq!(tags["tags"][0]["identity"], "a", "{tags}");
    let r = client(&place, to(&s.server));
    assert!(r.echo_ok(), "{r:?}\n{}", s.daemon.log_text());
    assert_eq!(r.peer_port(), Some(s.daemon.port as u64));
    s.daemon.wait_netns_served(holder.pid());
    let r = client(&ns_place, to(&s.server));
    assert!(r.echo_ok(), "{r:?}");
}

#[test]
fn direct_dial_of_the_proxy_port_is_refused() {
    let s = setup("direct");
    let before = s.daemon.refused("no_flow_entry");
    let r = client(
        &Placement::default(),
        json!({"host": "127.0.0.1", "port": s.daemon.port}),
    );
    assert!(r.greeting().is_none_or(|g| g.is_empty()), "{r:?}");
    assert!(r.error().is_some() || r.0["echo_len"] == 0, "{r:?}");
    wait_until(
        Duration::from_secs(5),
        || s.daemon.refused("no_flow_entry") > before,
        "refusal counted",
    );
    assert!(s.daemon.log_text().contains("no flow entry"));
}

#[test]
fn destination_without_a_resource_is_refused() {
    let s = setup("nores");
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "a");
    let stray = EchoServer::start("stray");
    let r = client(&Placement::cgroup(s.cg.dir(&agent)), to(&stray));
    assert!(r.greeting().is_none_or(|g| g.is_empty()), "{r:?}");
    assert_eq!(stray.accepted.load(std::sync::atomic::Ordering::Relaxed), 0);
    wait_until(
        Duration::from_secs(5),
        || s.daemon.refused("no_resource") == 1,
        "no_resource refusal counted",
    );
}

#[test]
fn dead_upstream_resets_the_agent_without_hanging() {
    require_root();
    let cg = TestCgroup::new("deadup");
    let files = DaemonFiles::new(&cg.rel);
    let dead = free_port();
    files.tcp_resources("dead.toml", &[("dead", vec![format!("127.0.0.1:{dead}")])]);
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "a");
    let start = std::time::Instant::now();
    let r = client(
        &Placement::cgroup(cg.dir(&agent)),
        json!({"host": "127.0.0.1", "port": dead, "timeout": 8}),
    );
    assert!(r.error().is_some() || r.greeting() == Some(""), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(6), "no hang");
    wait_until(
        Duration::from_secs(5),
        || daemon.log_text().contains("upstream"),
        "upstream error logged",
    );
}

#[test]
fn relay_preserves_bulk_data_and_half_close() {
    let s = setup("bulk");
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "a");
    // 4 MiB through the proxy, then half-close: the server sees EOF, echoes
    // everything, closes; the client must get every byte and then EOF.
    let mut args = to(&s.server);
    args["send"] = json!("0123456789abcdef".repeat(64));
    args["repeat"] = json!(4096);
    args["half_close"] = json!(true);
    args["timeout"] = json!(20);
    let r = client(&Placement::cgroup(s.cg.dir(&agent)), args);
    assert_eq!(r.error(), None, "{r:?}");
    assert_eq!(r.0["echo_len"], 4 * 1024 * 1024);
    assert!(r.echo_ok());
}

#[test]
fn two_daemons_side_by_side_each_govern_their_own_subtree() {
    require_root();
    let server = EchoServer::start("shared");
    let (cg1, cg2) = (TestCgroup::new("side1"), TestCgroup::new("side2"));
    let (f1, f2) = (DaemonFiles::new(&cg1.rel), DaemonFiles::new(&cg2.rel));
    f1.tcp_resources("e.toml", &[("echo", vec![server.addr.to_string()])]);
    f2.tcp_resources("e.toml", &[("echo", vec![server.addr.to_string()])]);
    let (d1, d2) = (Daemon::start(&f1), Daemon::start(&f2));
    let (a1, a2) = (cg1.child("agent"), cg2.child("agent"));
    d1.tag(&a1, "one");
    d2.tag(&a2, "two");
    // Tagging outside a daemon's root is refused.
    let out = d1.cli(&["tag", &a2, "--identity", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside the governed cgroup root"));

    let r1 = client(&Placement::cgroup(cg1.dir(&a1)), to(&server));
    let r2 = client(&Placement::cgroup(cg2.dir(&a2)), to(&server));
    assert_eq!(r1.peer_port(), Some(f1.port as u64), "{r1:?}");
    assert_eq!(r2.peer_port(), Some(f2.port as u64), "{r2:?}");
    assert!(r1.echo_ok() && r2.echo_ok());
    assert_eq!(d1.status()["counters"]["flows_accepted"], 1);
    assert_eq!(d2.status()["counters"]["flows_accepted"], 1);
}

#[test]
fn detach_is_break_glass_with_and_without_a_daemon() {
    let mut s = setup("detach");
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "a");
    let place = Placement::cgroup(s.cg.dir(&agent));
    assert_eq!(
        client(&place, to(&s.server)).peer_port(),
        Some(s.daemon.port as u64)
    );

    s.daemon.cli_ok(&["detach"]);
    assert!(!s.files.pin_dir.exists(), "pins removed");
    let r = client(&place, to(&s.server));
    assert_eq!(
        r.peer_port(),
        Some(s.server.addr.port() as u64),
        "no longer intercepted: {r:?}"
    );
    assert_eq!(s.daemon.status()["attached"], false);

    // Without a daemon: restart (re-pins), kill, detach removes the pins itself.
    s.daemon.kill9();
    s.daemon = Daemon::start(&s.files);
    assert!(s.files.pin_dir.join("links").exists());
    s.daemon.kill9();
    assert!(
        client(&place, to(&s.server)).error().is_some(),
        "fails closed while down"
    );
    let out = std::process::Command::new(BIN)
        .arg("--admin-socket")
        .arg(&s.files.socket)
        .args(["detach", "--pin-dir"])
        .arg(&s.files.pin_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!s.files.pin_dir.exists());
    assert!(
        client(&place, to(&s.server)).echo_ok(),
        "goes direct after break-glass"
    );
}

#[test]
fn untag_ends_live_sessions_and_stops_interception() {
    let s = setup("untag");
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "a");
    let place = Placement::cgroup(s.cg.dir(&agent));
    let mut args = to(&s.server);
    args["wait_close"] = json!(20);
    let held = HeldClient::start(&place, args, &s.files.dir);
    assert_eq!(s.daemon.flows().len(), 1);
    s.daemon.cli_ok(&["untag", &agent]);
    wait_until(
        Duration::from_secs(5),
        || s.daemon.flows().is_empty(),
        "session ended",
    );
    let r = held.finish();
    assert!(
        matches!(r.0["closed"].as_str(), Some("reset" | "eof")),
        "{r:?}"
    );
    let r = client(&place, to(&s.server));
    assert_eq!(r.peer_port(), Some(s.server.addr.port() as u64), "{r:?}");
}

#[test]
fn cli_reports_clear_errors() {
    let s = setup("errors");
    let out = s
        .daemon
        .cli(&["tag", &format!("{}/missing", s.cg.rel), "--identity", "a"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{out:?}"
    );
    let out = s.daemon.cli(&["tag", &s.cg.rel, "--identity", "bad name"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid"),
        "{out:?}"
    );
    // --pid resolves the process's cgroup.
    let agent = s.cg.child("agent");
    let holder = Holder::start(&Placement::cgroup(s.cg.dir(&agent)));
    s.daemon.cli_ok(&[
        "tag",
        "--pid",
        &holder.pid().to_string(),
        "--identity",
        "by-pid",
    ]);
    let tags = s.daemon.json(&["tags", "--json"]);
    assert_eq!(tags["tags"][0]["cgroup"], format!("/{agent}"));
    // No daemon at that socket.
    let out = std::process::Command::new(BIN)
        .args(["--admin-socket", "/nonexistent/sock", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the daemon"));
}

#[test]
fn broken_policy_stops_startup_with_file_line_col() {
    require_root();
    let cg = TestCgroup::new("badpol");
    let files = DaemonFiles::new(&cg.rel);
    fs::write(
        files.policies.join("bad.toml"),
        "[resource.x]\nprotocol = \"tcp\"\nmatch = [\"127.0.0.1:1\"]\nbogus = 1\n",
    )
    .unwrap();
    let mut d = Daemon::spawn(&files);
    let status = d.child.wait().unwrap();
    assert!(!status.success());
    std::thread::sleep(Duration::from_millis(100));
    let log = d.log_text();
    assert!(log.contains("bad.toml:4:1:"), "{log}");
    assert!(!files.pin_dir.exists(), "nothing attached for a broken set");
}

/// A rule that lets only `billing-agent` connect, and an echo server.
fn policy_setup(name: &str) -> Setup {
    require_root();
    let cg = TestCgroup::new(name);
    let server = EchoServer::start(name);
    let files = DaemonFiles::new(&cg.rel);
    files.rules(
        "allow.cedar",
        "@id(\"billing-echo\")\npermit(principal == Identity::\"billing-agent\", action == Action::\"tcp:connect\", resource == Resource::\"echo\");\n",
    );
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    let daemon = Daemon::start(&files);
    Setup {
        cg,
        server,
        files,
        daemon,
    }
}

#[test]
fn a_reload_that_still_asks_for_approval_leaves_a_held_connect_waiting() {
    // Found by the full suite: the file watcher's reload right after an
    // admin reload re-evaluated a connect that was waiting for a human as
    // "not allowed" and ended it, abandoning its request. Waiting is not
    // access: a reload that still asks for approval leaves it waiting (the
    // release decides again), one that forbids it ends it.
    let s = policy_setup("reheld");
    let other = s.cg.child("other");
    s.daemon.tag(&other, "agent");
    s.files.rules(
        "hold.cedar",
        "@id(\"agent-needs-approval\")\n@approval(\"required\")\npermit(principal == Identity::\"agent\", action == Action::\"tcp:connect\", resource);\n",
    );
    s.daemon.cli_ok(&["policy", "reload"]);
    let place = Placement::cgroup(s.cg.dir(&other));
    let held = HeldClient::spawn(&place, to(&s.server), &s.files.dir);
    let pending = s.daemon.wait_pending(1);
    let id = pending[0]["id"].as_str().unwrap().to_string();
    s.daemon.cli_ok(&["policy", "reload"]);
    std::thread::sleep(Duration::from_millis(300));
    let still: Vec<String> = s
        .daemon
        .requests("pending")
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        still,
        std::slice::from_ref(&id),
        "the reload ended the waiting connect"
    );
    s.daemon.cli_ok(&["approve", &id]);
    let r = held.finish();
    assert!(r.echo_ok(), "{r:?}");

    // A reload that forbids it ends the wait and nothing is relayed.
    let before = s.server.accepted.load(std::sync::atomic::Ordering::Relaxed);
    let held = HeldClient::spawn(&place, to(&s.server), &s.files.dir);
    let pending = s.daemon.wait_pending(1);
    let id = pending[0]["id"].as_str().unwrap().to_string();
    s.files.rules(
        "forbid.cedar",
        "@id(\"freeze\")\nforbid(principal == Identity::\"agent\", action == Action::\"tcp:connect\", resource);\n",
    );
    s.daemon.cli_ok(&["policy", "reload"]);
    let r = held.finish();
    assert!(r.greeting().is_none_or(|g| g.is_empty()), "{r:?}");
    assert_eq!(
        s.server.accepted.load(std::sync::atomic::Ordering::Relaxed),
        before
    );
    let denied = s.daemon.cli(&["approve", &id]);
    assert!(!denied.status.success(), "{denied:?}");
}

#[test]
fn rules_decide_tcp_connect_default_deny_and_hold() {
    let s = policy_setup("rules");
    let (billing, other) = (s.cg.child("billing"), s.cg.child("other"));
    s.daemon.tag(&billing, "billing-agent");
    s.daemon.tag(&other, "agent");
    assert!(client(&Placement::cgroup(s.cg.dir(&billing)), to(&s.server)).echo_ok());
    // No rule permits `agent`: default deny, reset, nothing reaches upstream.
    let before = s.server.accepted.load(std::sync::atomic::Ordering::Relaxed);
    let r = client(&Placement::cgroup(s.cg.dir(&other)), to(&s.server));
    assert!(r.greeting().is_none_or(|g| g.is_empty()), "{r:?}");
    assert_eq!(
        s.server.accepted.load(std::sync::atomic::Ordering::Relaxed),
        before
    );
    wait_until(
        Duration::from_secs(5),
        || {
            s.daemon
                .log_text()
                .contains("no rule permits tcp:connect on echo for agent")
        },
        "deny logged",
    );

    // Only an @approval rule applies: a hold, which waits for a human (see
    // the JIT tests); denying it refuses the connect.
    s.files.rules(
        "hold.cedar",
        "@id(\"agent-needs-approval\")\n@approval(\"required\")\npermit(principal == Identity::\"agent\", action == Action::\"tcp:connect\", resource);\n",
    );
    s.daemon.cli_ok(&["policy", "reload"]);
    let held = HeldClient::spawn(
        &Placement::cgroup(s.cg.dir(&other)),
        to(&s.server),
        &s.files.dir,
    );
    let pending = s.daemon.wait_pending(1);
    assert_eq!(pending[0]["policies"][0], "agent-needs-approval");
    s.daemon
        .cli_ok(&["deny", pending[0]["id"].as_str().unwrap()]);
    let r = held.finish();
    assert!(r.greeting().is_none_or(|g| g.is_empty()), "{r:?}");
    // A forbid wins over the permit.
    s.files.rules(
        "forbid.cedar",
        "@id(\"freeze-billing\")\nforbid(principal == Identity::\"billing-agent\", action in Action::\"tcp\", resource);\n",
    );
    s.daemon.cli_ok(&["policy", "reload"]);
    let r = client(&Placement::cgroup(s.cg.dir(&billing)), to(&s.server));
    assert!(r.greeting().is_none_or(|g| g.is_empty()), "{r:?}");
    wait_until(
        Duration::from_secs(5),
        || {
            s.daemon
                .log_text()
                .contains("forbidden by rule freeze-billing")
        },
        "forbid logged",
    );
}

#[test]
fn reload_that_removes_a_permission_closes_live_flows_and_adding_one_opens_the_next() {
    let s = policy_setup("reload");
    let (billing, ops) = (s.cg.child("billing"), s.cg.child("ops"));
    s.daemon.tag(&billing, "billing-agent");
    s.daemon.tag(&ops, "agent");
    let v1 = s.daemon.status()["policy_version"].clone();

    let mut args = to(&s.server);
    args["wait_close"] = json!(20);
    let held = HeldClient::start(&Placement::cgroup(s.cg.dir(&billing)), args, &s.files.dir);
    assert_eq!(s.daemon.flows().len(), 1);
    // Remove billing's permission and give it to `agent` instead, through the
    // file watcher (no explicit reload).
    s.files.rules(
        "allow.cedar",
        "@id(\"agent-echo\")\npermit(principal == Identity::\"agent\", action == Action::\"tcp:connect\", resource == Resource::\"echo\");\n",
    );
    wait_until(
        Duration::from_secs(10),
        || s.daemon.status()["policy_version"] != v1,
        "file change reloaded",
    );
    wait_until(
        Duration::from_secs(5),
        || s.daemon.flows().is_empty(),
        "live flow closed on reload",
    );
    let r = held.finish();
    assert!(
        matches!(r.0["closed"].as_str(), Some("reset" | "eof")),
        "the live client was cut off by the daemon: {r:?}"
    );
    assert!(s.daemon.log_text().contains("ended_sessions"));
    assert!(
        client(&Placement::cgroup(s.cg.dir(&ops)), to(&s.server)).echo_ok(),
        "the next flow of the newly permitted identity goes through"
    );
    let r = client(&Placement::cgroup(s.cg.dir(&billing)), to(&s.server));
    assert!(!r.echo_ok(), "{r:?}");
}

#[test]
fn broken_policy_on_reload_keeps_the_old_set_and_reports_line_and_column() {
    let s = policy_setup("brokenreload");
    let billing = s.cg.child("billing");
    s.daemon.tag(&billing, "billing-agent");
    let v1 = s.daemon.status()["policy_version"].clone();

    // Broken TOML.
    fs::write(
        s.files.policies.join("zz.toml"),
        "[resource.zz]\nprotocol = \"tcp\"\nmatch = [\"127.0.0.1:1\"]\noops = true\n",
    )
    .unwrap();
    let out = s.daemon.cli(&["policy", "reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("zz.toml:4:1:"), "{err}");
    assert_eq!(s.daemon.status()["policy_version"], v1);
    assert!(
        client(&Placement::cgroup(s.cg.dir(&billing)), to(&s.server)).echo_ok(),
        "old set still in force"
    );
    fs::remove_file(s.files.policies.join("zz.toml")).unwrap();

    // Broken Cedar.
    s.files.rules(
        "zz.cedar",
        "permit(principal, action, resource);\nforbid(principal action, resource);\n",
    );
    let out = s.daemon.cli(&["policy", "reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("zz.cedar:2:"), "{err}");
    assert_eq!(s.daemon.status()["policy_version"], v1);
    assert!(client(&Placement::cgroup(s.cg.dir(&billing)), to(&s.server)).echo_ok());

    // `policy check` offline says the same and exits 1; a fixed set exits 0.
    let out = std::process::Command::new(BIN)
        .args(["policy", "check"])
        .arg(&s.files.policies)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("zz.cedar:2:"));
    fs::remove_file(s.files.policies.join("zz.cedar")).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["policy", "check"])
        .arg(&s.files.policies)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // SIGHUP reloads too (the set is back to v1's content: same version).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.daemon.child.id() as i32),
        nix::sys::signal::SIGHUP,
    )
    .unwrap();
    wait_until(
        Duration::from_secs(5),
        || {
            s.daemon.log_text().contains("trigger=\"SIGHUP\"")
                || s.daemon.log_text().contains("trigger=SIGHUP")
        },
        "SIGHUP reload",
    );
    assert_eq!(s.daemon.status()["policy_version"], v1);
}

#[test]
fn configmap_style_symlink_swap_is_picked_up() {
    require_root();
    let cg = TestCgroup::new("configmap");
    let server = EchoServer::start("configmap");
    // The daemon's policies dir is laid out like a mounted ConfigMap:
    // visible names are symlinks into ..data, which points at a timestamped
    // directory; an update writes a new directory and swaps ..data.
    let files = DaemonFiles::new(&cg.rel);
    files.rules("allow.cedar", "permit(principal == Identity::\"billing-agent\", action == Action::\"tcp:connect\", resource);\n");
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    let v1dir = files.policies.join("..2026_11_26_v1");
    fs::create_dir_all(&v1dir).unwrap();
    for f in ["allow.cedar", "echo.toml", "identities.toml"] {
        fs::rename(files.policies.join(f), v1dir.join(f)).unwrap();
        std::os::unix::fs::symlink(format!("..data/{f}"), files.policies.join(f)).unwrap();
    }
    std::os::unix::fs::symlink("..2026_11_26_v1", files.policies.join("..data")).unwrap();
    let daemon = Daemon::start(&files);
    let (billing, ops) = (cg.child("billing"), cg.child("ops"));
    daemon.tag(&billing, "billing-agent");
    daemon.tag(&ops, "agent");
    assert!(
        client(&Placement::cgroup(cg.dir(&ops)), to(&server))
            .error()
            .is_some()
            || !client(&Placement::cgroup(cg.dir(&ops)), to(&server)).echo_ok()
    );
    let v1 = daemon.status()["policy_version"].clone();

    let v2dir = files.policies.join("..2026_11_26_v2");
    fs::create_dir_all(&v2dir).unwrap();
    for f in ["echo.toml", "identities.toml"] {
        fs::copy(v1dir.join(f), v2dir.join(f)).unwrap();
    }
    fs::write(
        v2dir.join("allow.cedar"),
        "permit(principal == Identity::\"agent\", action == Action::\"tcp:connect\", resource);\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_11_26_v2", files.policies.join("..data_tmp")).unwrap();
    fs::rename(
        files.policies.join("..data_tmp"),
        files.policies.join("..data"),
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        || daemon.status()["policy_version"] != v1,
        "ConfigMap swap reloaded",
    );
    assert!(client(&Placement::cgroup(cg.dir(&ops)), to(&server)).echo_ok());
    let shown = daemon.json(&["policy", "show", "--json"]);
    assert_eq!(shown["version"], daemon.status()["policy_version"]);
    assert!(shown["resources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "echo"));
}

fn audit_events(files: &DaemonFiles, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(BIN)
        .args(["audit", "tail", "--json", "--state-dir"])
        .arg(&files.state)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn count_events(files: &DaemonFiles, kind: &str) -> usize {
    audit_events(files, &[])
        .iter()
        .filter(|e| e["type"] == kind)
        .count()
}

fn audit_verify(files: &DaemonFiles) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["audit", "verify", "--state-dir"])
        .arg(&files.state)
        .output()
        .unwrap()
}

fn refusals_with(files: &DaemonFiles, code: &str) -> usize {
    audit_events(files, &[])
        .iter()
        .filter(|e| e["type"] == "flow_refused" && e["detail"]["identity_error"] == code)
        .count()
}

#[test]
fn identity_needs_a_valid_token_and_rotation_is_picked_up() {
    let s = setup("token");
    let agent = s.cg.child("agent");
    let place = Placement::cgroup(s.cg.dir(&agent));

    // Tagged without a token file: not proven.
    s.daemon.cli_ok(&["tag", &agent, "--identity", "agent"]);
    assert!(!client(&place, to(&s.server)).echo_ok());
    wait_until(
        Duration::from_secs(5),
        || refusals_with(&s.files, "no_token_file") == 1,
        "no_token_file refusal audited",
    );

    // A token for another identity's subject, then an expired one.
    let token = s.daemon.token_file("agent", "sub-billing-agent", 3600);
    s.daemon.cli_ok(&[
        "tag",
        &agent,
        "--identity",
        "agent",
        "--token-file",
        &token.display().to_string(),
    ]);
    assert!(!client(&place, to(&s.server)).echo_ok());
    wait_until(
        Duration::from_secs(5),
        || refusals_with(&s.files, "subject_mismatch") == 1,
        "subject_mismatch audited",
    );
    s.daemon.token_file("agent", "sub-agent", -600);
    assert!(!client(&place, to(&s.server)).echo_ok());
    wait_until(
        Duration::from_secs(5),
        || refusals_with(&s.files, "expired") == 1,
        "expired audited",
    );
    // Forged: a valid-looking token signed by another key with the same kid.
    let forged = TestIssuer::new().token("sub-agent", 3600);
    fs::write(&token, forged).unwrap();
    assert!(!client(&place, to(&s.server)).echo_ok());
    wait_until(
        Duration::from_secs(5),
        || refusals_with(&s.files, "bad_signature") == 1,
        "bad_signature audited",
    );
    assert_eq!(
        s.server.accepted.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "nothing unproven reached upstream"
    );

    // Rotation to a valid token is picked up without restart or re-tag.
    s.daemon.token_file("agent", "sub-agent", 3600);
    let r = client(&place, to(&s.server));
    assert!(r.echo_ok(), "{r:?}\n{}", s.daemon.log_text());
    let starts: Vec<_> = audit_events(&s.files, &[])
        .into_iter()
        .filter(|e| e["type"] == "session_start")
        .collect();
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0]["identity"]["sub"], "sub-agent");
    assert_eq!(starts[0]["identity"]["iss"], "https://issuer.test");
    assert!(starts[0]["identity"]["jti"].is_string());

    // A live session ends once its token stops validating.
    let mut args = to(&s.server);
    args["wait_close"] = json!(20);
    let held = HeldClient::start(&place, args, &s.files.dir);
    s.daemon.token_file("agent", "sub-someone-else", 3600);
    let r = held.finish();
    assert!(
        matches!(r.0["closed"].as_str(), Some("reset" | "eof")),
        "{r:?}"
    );
    wait_until(
        Duration::from_secs(5),
        || {
            audit_events(&s.files, &[])
                .iter()
                .any(|e| e["type"] == "session_revoked")
        },
        "session_revoked audited",
    );
}

#[test]
fn audit_log_records_every_flow_and_verifies_and_tampering_is_named() {
    let s = setup("audit");
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "agent");
    let place = Placement::cgroup(s.cg.dir(&agent));
    for _ in 0..5 {
        assert!(client(&place, to(&s.server)).echo_ok());
    }
    let stray = EchoServer::start("stray");
    let _ = client(&place, to(&stray));
    wait_until(
        Duration::from_secs(5),
        || count_events(&s.files, "session_end") == 5,
        "five sessions ended",
    );
    let events = audit_events(&s.files, &[]);
    let session = events
        .iter()
        .find(|e| e["type"] == "session_start")
        .unwrap()["session"]
        .as_str()
        .unwrap()
        .to_string();
    let of_session = audit_events(&s.files, &["--session", &session]);
    let kinds: Vec<&str> = of_session
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        vec!["session_start", "command", "session_end"],
        "{of_session:#?}"
    );
    let cmd = &of_session[1];
    assert_eq!(cmd["action"], "tcp:connect");
    assert_eq!(cmd["decision"], "allow");
    assert_eq!(cmd["policy_ids"][0], "tests-allow-tcp");
    assert_eq!(cmd["policy_version"], s.daemon.status()["policy_version"]);
    assert_eq!(cmd["cgroup"], format!("/{agent}"));
    assert!(cmd["pid"].as_u64().is_some());
    assert!(events.iter().any(|e| e["type"] == "flow_refused"
        && e["reason"] == "no resource matches the original destination"));
    assert!(events.iter().any(|e| e["type"] == "tag"));
    // seq is contiguous and the chain verifies.
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"].as_u64(), Some(i as u64 + 1));
    }
    let out = audit_verify(&s.files);
    assert!(out.status.success(), "{out:?}");

    // Change one byte of an event in the middle: verify names the place.
    let file = s.files.state.join("audit/audit-000001.jsonl");
    let text = fs::read_to_string(&file).unwrap();
    let line_no = text
        .lines()
        .position(|l| l.contains("\"type\":\"command\""))
        .unwrap();
    let tampered: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == line_no {
                l.replacen("\"allow\"", "\"allaw\"", 1)
            } else {
                l.to_string()
            }
        })
        .collect();
    fs::write(&file, tampered.join("\n") + "\n").unwrap();
    let out = audit_verify(&s.files);
    assert!(!out.status.success());
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        msg.contains("audit-000001.jsonl") && msg.contains(&format!("line {}", line_no + 1)),
        "{msg}"
    );
}

#[test]
fn sigkill_under_load_leaves_a_verifiable_log_and_restart_continues_the_chain() {
    let mut s = setup("crash");
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "agent");
    let place = Placement::cgroup(s.cg.dir(&agent));
    // Load: four clients, each making up to 40 short connections (bounded
    // in count and by the client timeout), while the daemon is killed.
    let loader = |place: Placement, port: u16| {
        std::thread::spawn(move || {
            for _ in 0..40 {
                let _ = client(
                    &place,
                    json!({"host": "127.0.0.1", "port": port, "timeout": 2}),
                );
            }
        })
    };
    let workers: Vec<_> = (0..4)
        .map(|_| loader(place.clone(), s.server.addr.port()))
        .collect();
    wait_until(
        Duration::from_secs(20),
        || s.server.accepted.load(std::sync::atomic::Ordering::Relaxed) >= 10,
        "traffic flowing",
    );
    s.daemon.kill9();
    for w in workers {
        let _ = w.join();
    }
    let out = audit_verify(&s.files);
    assert!(
        out.status.success(),
        "log verifies up to its last complete event: {out:?}"
    );
    let before = audit_events(&s.files, &[]);
    let last_seq = before.last().unwrap()["seq"].as_u64().unwrap();

    s.daemon = Daemon::start(&s.files);
    assert!(client(&place, to(&s.server)).echo_ok());
    wait_until(
        Duration::from_secs(5),
        || count_events(&s.files, "daemon_start") == 2,
        "restart audited",
    );
    let after = audit_events(&s.files, &[]);
    let restart = after
        .iter()
        .filter(|e| e["type"] == "daemon_start")
        .nth(1)
        .unwrap();
    assert!(restart["seq"].as_u64().unwrap() > last_seq);
    for (i, e) in after.iter().enumerate() {
        assert_eq!(
            e["seq"].as_u64(),
            Some(i as u64 + 1),
            "one contiguous sequence across the crash"
        );
    }
    let out = audit_verify(&s.files);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_full_audit_disk_denies_commands_and_never_forwards_unaudited() {
    require_root();
    let cg = TestCgroup::new("fulldisk");
    let server = EchoServer::start("fulldisk");
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    fs::create_dir_all(&files.state).unwrap();
    run_ok(
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
            .arg(&files.state),
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(files.state.clone());
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    assert!(client(&place, to(&server)).echo_ok());

    // Fill the disk.
    let filler = files.state.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=1000"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    // The log's last page may still hold a few events; keep going (bounded)
    // until commands are denied, and require that they stay denied.
    let mut consecutive_denials = 0;
    for _ in 0..60 {
        if client(&place, to(&server)).echo_ok() {
            consecutive_denials = 0;
        } else {
            consecutive_denials += 1;
            if consecutive_denials == 3 {
                break;
            }
        }
    }
    assert_eq!(consecutive_denials, 3, "a full audit disk denies commands");
    assert!(
        daemon.log_text().contains("audit log unavailable"),
        "{}",
        daemon.log_text()
    );

    // Room again: commands flow again, and the log still verifies.
    fs::remove_file(&filler).unwrap();
    wait_until(
        Duration::from_secs(10),
        || client(&place, to(&server)).echo_ok(),
        "works again once there is room",
    );
    let out = audit_verify(&files);
    assert!(out.status.success(), "{out:?}");
    // Never forwarded unaudited: every connection the server saw has its
    // allow record in the log.
    wait_until(
        Duration::from_secs(5),
        || {
            let allows = audit_events(&files, &[])
                .iter()
                .filter(|e| e["type"] == "command" && e["decision"] == "allow")
                .count();
            allows as u32 == server.accepted.load(std::sync::atomic::Ordering::Relaxed)
        },
        "one allow record per forwarded connection",
    );
}

/// Every identity may connect to `echo`, but only with approval.
fn jit_setup(name: &str, timeout: &str, extra_args: &[String]) -> Setup {
    require_root();
    let cg = TestCgroup::new(name);
    let server = EchoServer::start(name);
    let mut files = DaemonFiles::new(&cg.rel);
    files.extra_args = extra_args.to_vec();
    files.rules(
        "allow.cedar",
        "@id(\"echo-needs-approval\")\n@approval(\"required\")\npermit(principal, action == Action::\"tcp:connect\", resource == Resource::\"echo\");\n",
    );
    files.tcp_resources_with(
        "echo.toml",
        &[("echo", vec![server.addr.to_string()])],
        &format!("approval_timeout = \"{timeout}\"\n"),
    );
    let daemon = Daemon::start(&files);
    Setup {
        cg,
        server,
        files,
        daemon,
    }
}

fn accepted(s: &EchoServer) -> u32 {
    s.accepted.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn held_connect_waits_for_approval_and_runs_once() {
    let s = jit_setup("approve", "60s", &[]);
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "agent");
    let place = Placement::cgroup(s.cg.dir(&agent));
    let held = HeldClient::spawn(&place, to(&s.server), &s.files.dir);
    let pending = s.daemon.wait_pending(1);
    let r = &pending[0];
    assert_eq!(r["identity"], "agent");
    assert_eq!(r["resource"], "echo");
    assert_eq!(r["action"], "tcp:connect");
    assert_eq!(r["policies"][0], "echo-needs-approval");
    assert_eq!(
        accepted(&s.server),
        0,
        "nothing reaches upstream while held"
    );
    let id = r["id"].as_str().unwrap().to_string();
    s.daemon
        .cli_ok(&["approve", &id, "--as", "alice", "--reason", "looks fine"]);
    held.wait_ready();
    let out = held.finish();
    assert!(out.echo_ok(), "{out:?}");
    assert_eq!(accepted(&s.server), 1, "released once");
    assert!(
        !s.daemon.cli(&["approve", &id]).status.success(),
        "a request is decided once"
    );
    // The whole story is in the audit log.
    let events = audit_events(&s.files, &[]);
    let session = r["session"].as_str().unwrap();
    let cmds: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["session"] == session && e["type"] == "command")
        .collect();
    assert_eq!(cmds.len(), 2, "{cmds:#?}");
    assert_eq!(cmds[0]["decision"], "hold");
    assert_eq!(cmds[0]["detail"]["request"], id.as_str());
    assert_eq!(cmds[1]["decision"], "allow");
    assert!(
        cmds[1]["approver"].as_str().unwrap().ends_with("as alice"),
        "{:?}",
        cmds[1]
    );
    assert!(events.iter().any(|e| e["type"] == "access_request"
        && e["decision"] == "allow"
        && e["reason"] == "looks fine"));
}

#[test]
fn deny_and_timeout_refuse_with_the_reason() {
    let s = jit_setup("denytimeout", "1s", &[]);
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "agent");
    let place = Placement::cgroup(s.cg.dir(&agent));
    // Deny.
    let held = HeldClient::spawn(
        &place,
        json!({"host": "127.0.0.1", "port": s.server.addr.port(), "timeout": 30}),
        &s.files.dir,
    );
    // The 1 s timeout would race a human here; deny at once.
    let id = s.daemon.wait_pending(1)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = s
        .daemon
        .cli(&["deny", &id, "--reason", "not during the freeze"]);
    if out.status.success() {
        let r = held.finish();
        assert!(!r.echo_ok(), "{r:?}");
        let ev = audit_events(&s.files, &[]);
        assert!(ev.iter().any(|e| e["type"] == "command"
            && e["decision"] == "deny"
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("not during the freeze"))));
    } else {
        // Lost the race to the 1 s timeout: that is the other half of the test.
        let _ = held.finish();
    }
    // Timeout: nobody answers; the client is refused within about a second,
    // and the request says timed out.
    let start = std::time::Instant::now();
    let r = client(
        &place,
        json!({"host": "127.0.0.1", "port": s.server.addr.port(), "timeout": 30}),
    );
    assert!(!r.echo_ok());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "nothing waits forever"
    );
    wait_until(
        Duration::from_secs(5),
        || !s.daemon.requests("timed_out").is_empty(),
        "request timed out",
    );
    // The denial names the request that timed out.
    let timed_out = s.daemon.requests("timed_out");
    let timed_out_id = timed_out[0]["id"].as_str().unwrap().to_string();
    let expected = format!("access request {timed_out_id} timed out waiting for approval");
    assert!(
        audit_events(&s.files, &[])
            .iter()
            .any(|e| e["type"] == "command"
                && e["decision"] == "deny"
                && e["reason"] == expected.as_str()),
        "no deny record with reason {expected:?}"
    );
    assert_eq!(accepted(&s.server), 0);
    // An agent that hangs up while held: the request is abandoned.
    let s2 = jit_setup("abandon", "60s", &[]);
    let a2 = s2.cg.child("agent");
    s2.daemon.tag(&a2, "agent");
    let mut child = client_cmd(&Placement::cgroup(s2.cg.dir(&a2)), to(&s2.server))
        .spawn()
        .unwrap();
    s2.daemon.wait_pending(1);
    child.kill().unwrap();
    let _ = child.wait();
    wait_until(
        Duration::from_secs(5),
        || !s2.daemon.requests("abandoned").is_empty(),
        "request abandoned",
    );
}

#[test]
fn approve_for_grants_the_next_connects_until_expiry_and_revoke_ends_sessions() {
    let s = jit_setup("grant", "60s", &[]);
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "agent");
    let place = Placement::cgroup(s.cg.dir(&agent));
    let held = HeldClient::spawn(&place, to(&s.server), &s.files.dir);
    let id = s.daemon.wait_pending(1)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.daemon.cli_ok(&["approve", &id, "--for", "6s"]);
    assert!(held.finish().echo_ok());
    // Within the grant: no hold.
    let mut args = to(&s.server);
    args["wait_close"] = json!(20);
    let live = HeldClient::start(&place, args, &s.files.dir);
    assert!(s.daemon.requests("pending").is_empty());
    let grants = s.daemon.json(&["grants", "--json"]);
    assert_eq!(grants["grants"].as_array().unwrap().len(), 1);
    // At expiry the session relying on the grant ends, and the next connect
    // is held again.
    let r = live.finish();
    assert!(
        matches!(r.0["closed"].as_str(), Some("reset" | "eof")),
        "{r:?}"
    );
    let again = HeldClient::spawn(&place, to(&s.server), &s.files.dir);
    s.daemon.wait_pending(1);
    let id = s.daemon.requests("pending")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.daemon.cli_ok(&["deny", &id]);
    assert!(!again.finish().echo_ok());
    assert!(audit_events(&s.files, &[])
        .iter()
        .any(|e| e["type"] == "grant_expired"));

    // An operator grant, then revoke: the live session ends.
    let out = s.daemon.cli_ok(&[
        "grant",
        "agent",
        "echo",
        "--allow",
        "tcp:connect",
        "--for",
        "1h",
        "--reason",
        "incident 42",
    ]);
    let gid = out.trim().strip_prefix("grant ").unwrap().to_string();
    let mut args = to(&s.server);
    args["wait_close"] = json!(20);
    let live = HeldClient::start(&place, args, &s.files.dir);
    s.daemon.cli_ok(&["revoke", &gid]);
    let r = live.finish();
    assert!(
        matches!(r.0["closed"].as_str(), Some("reset" | "eof")),
        "{r:?}"
    );
    assert!(audit_events(&s.files, &[])
        .iter()
        .any(|e| e["type"] == "grant_revoked"));
    // Bad grants are refused.
    assert!(!s
        .daemon
        .cli(&[
            "grant",
            "nobody",
            "echo",
            "--allow",
            "tcp:connect",
            "--for",
            "1h"
        ])
        .status
        .success());
    assert!(!s
        .daemon
        .cli(&["grant", "agent", "echo", "--allow", "tcp:frob", "--for", "1h"])
        .status
        .success());
}

#[test]
fn restart_keeps_grants_and_fails_pending_requests() {
    let mut s = jit_setup("jitrestart", "60s", &[]);
    let (a, b) = (s.cg.child("a"), s.cg.child("b"));
    s.daemon.tag(&a, "agent");
    s.daemon.tag(&b, "x");
    s.daemon
        .cli_ok(&["grant", "agent", "echo", "--allow", "tcp", "--for", "1h"]);
    let mut pending = client_cmd(&Placement::cgroup(s.cg.dir(&b)), to(&s.server))
        .spawn()
        .unwrap();
    let id = s.daemon.wait_pending(1)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.daemon.kill9();
    let _ = pending.wait();
    s.daemon = Daemon::start(&s.files);
    let grants = s.daemon.json(&["grants", "--json"]);
    assert_eq!(grants["grants"].as_array().unwrap().len(), 1);
    let reqs = s.daemon.json(&["requests", "--json"]);
    let r = reqs["requests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(r["status"], "failed");
    assert!(
        client(&Placement::cgroup(s.cg.dir(&a)), to(&s.server)).echo_ok(),
        "the grant still lifts holds"
    );
}

#[test]
fn a_hundred_concurrent_holds_from_ten_agents_resolve_correctly() {
    let s = jit_setup("hundred", "120s", &[]);
    let mut clients = Vec::new();
    for i in 0..10 {
        let cg = s.cg.child(&format!("agent{i}"));
        s.daemon.tag(&cg, &format!("agent{i}"));
        for _ in 0..10 {
            clients.push(
                client_cmd(
                    &Placement::cgroup(s.cg.dir(&cg)),
                    json!({"host": "127.0.0.1", "port": s.server.addr.port(), "timeout": 60}),
                )
                .spawn()
                .unwrap(),
            );
        }
    }
    let pending = s.daemon.wait_pending(100);
    assert_eq!(pending.len(), 100);
    // Approve requests from even client ports, deny odd ones.
    let mut expect_ok = std::collections::HashSet::new();
    for r in &pending {
        let addr = r["context"]["client"]["address"].as_str().unwrap();
        let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
        let id = r["id"].as_str().unwrap();
        if port.is_multiple_of(2) {
            expect_ok.insert(port);
            s.daemon.cli_ok(&["approve", id]);
        } else {
            s.daemon.cli_ok(&["deny", id, "--reason", "odd"]);
        }
    }
    let mut ok = 0;
    for c in clients {
        let out = c.wait_with_output().unwrap();
        let r = parse_client(&out.stdout, &out.stderr);
        let port = r.0["local"][1].as_u64().unwrap() as u16;
        assert_eq!(
            r.echo_ok(),
            expect_ok.contains(&port),
            "client port {port}: {r:?}"
        );
        ok += usize::from(r.echo_ok());
    }
    assert_eq!(ok, expect_ok.len());
    assert_eq!(accepted(&s.server) as usize, expect_ok.len());
}

/// A tiny real HTTP server recording POSTed bodies; `hang` never answers.
fn webhook_receiver(
    hang: bool,
) -> (
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().take(200) {
            let Ok(mut c) = conn else { continue };
            let g = g.clone();
            std::thread::spawn(move || {
                if hang {
                    std::thread::sleep(Duration::from_secs(30));
                    return;
                }
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = c.read(&mut chunk) else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(split) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= split + 4 + len {
                            if let Ok(v) = serde_json::from_slice(&buf[split + 4..split + 4 + len])
                            {
                                g.lock().unwrap().push(v);
                            }
                            let _ = c.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, got)
}

#[test]
fn webhooks_hear_created_and_decided_and_a_dead_one_does_not_slow_commands() {
    let (port, got) = webhook_receiver(false);
    let (hang_port, _) = webhook_receiver(true);
    let s = jit_setup(
        "webhook",
        "60s",
        &[
            "--webhook".into(),
            format!("http://127.0.0.1:{hang_port}/stuck"),
            "--webhook".into(),
            format!("http://127.0.0.1:{port}/hook"),
        ],
    );
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "agent");
    let place = Placement::cgroup(s.cg.dir(&agent));
    let held = HeldClient::spawn(&place, to(&s.server), &s.files.dir);
    let id = s.daemon.wait_pending(1)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The hanging receiver stalls the notifier, not the command.
    let start = std::time::Instant::now();
    s.daemon.cli_ok(&["approve", &id]);
    held.wait_ready();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "approval released the command promptly"
    );
    assert!(held.finish().echo_ok());
    wait_until(
        Duration::from_secs(40),
        || {
            let g = got.lock().unwrap();
            g.iter()
                .any(|e| e["event"] == "request_created" && e["request"]["id"] == id.as_str())
                && g.iter().any(|e| {
                    e["event"] == "request_decided" && e["request"]["status"] == "approved"
                })
        },
        "webhook received created and decided",
    );
}

#[test]
fn sessions_are_listed_killed_and_replayed() {
    let s = setup("sessions");
    let agent = s.cg.child("agent");
    s.daemon.tag(&agent, "agent");
    let place = Placement::cgroup(s.cg.dir(&agent));
    assert!(client(&place, to(&s.server)).echo_ok());
    let mut args = to(&s.server);
    args["wait_close"] = json!(20);
    let live = HeldClient::start(&place, args, &s.files.dir);
    let state = s.files.state.display().to_string();
    let active = s
        .daemon
        .json(&["sessions", "--active", "--json", "--state-dir", &state]);
    let active = active["sessions"].as_array().unwrap().clone();
    assert_eq!(active.len(), 1, "{active:#?}");
    let id = active[0]["id"].as_str().unwrap().to_string();
    assert_eq!(active[0]["identity"], "agent");
    assert_eq!(active[0]["protocol"], "tcp");

    s.daemon.cli_ok(&["kill", &id]);
    let r = live.finish();
    assert!(
        matches!(r.0["closed"].as_str(), Some("reset" | "eof")),
        "{r:?}"
    );
    assert!(
        !s.daemon.cli(&["kill", &id]).status.success(),
        "no longer live"
    );
    assert!(
        !s.daemon.cli(&["kill", "../etc"]).status.success(),
        "ids are validated"
    );
    wait_until(
        Duration::from_secs(5),
        || {
            audit_events(&s.files, &[])
                .iter()
                .any(|e| e["type"] == "session_killed" && e["session"] == id.as_str())
        },
        "kill audited",
    );

    // Recordings reach the disk within their flush interval.
    let mut all = Vec::new();
    wait_until(
        Duration::from_secs(5),
        || {
            all = s
                .daemon
                .json(&["sessions", "--json", "--state-dir", &state])["sessions"]
                .as_array()
                .unwrap()
                .clone();
            all.len() == 2 && all.iter().all(|i| i["end_reason"].is_string())
        },
        "both sessions recorded as ended",
    );
    let first = all.iter().find(|i| i["id"] != id.as_str()).unwrap();
    assert_eq!(first["end_reason"], "closed");
    let replay = s.daemon.cli_ok(&[
        "replay",
        first["id"].as_str().unwrap(),
        "--speed",
        "0",
        "--state-dir",
        &state,
    ]);
    assert!(
        replay.contains("tcp") && replay.contains(&s.server.addr.to_string()),
        "{replay}"
    );
}

#[test]
fn malformed_admin_requests_get_errors_and_the_daemon_carries_on() {
    use std::io::{BufRead, Write};
    let s = setup("badadmin");
    let ask = |payload: &[u8]| -> String {
        let mut c = std::os::unix::net::UnixStream::connect(&s.daemon.socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = c.write_all(payload);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut line = String::new();
        let _ = std::io::BufReader::new(c).read_line(&mut line);
        line
    };
    for payload in [
        b"garbage\n".to_vec(),
        b"{\"op\":\"no_such_op\"}\n".to_vec(),
        b"{\"op\":\"tag\"}\n".to_vec(),
        b"{\"op\":\"status\"".to_vec(),
        vec![b'x'; 200 * 1024],
        vec![0xff, 0xfe, b'\n'],
    ] {
        let resp = ask(&payload);
        let v: serde_json::Value =
            serde_json::from_str(&resp).unwrap_or_else(|e| panic!("{e}: {resp:?}"));
        assert_eq!(v["ok"], false, "{v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(s.daemon.status()["attached"], true, "daemon still serving");
}
