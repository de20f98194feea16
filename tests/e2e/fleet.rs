//! A fleet on one machine: one real PostgreSQL as the store and two
//! daemons standing in for nodes (each with its own cgroup root, pin dir,
//! state dir, admin socket and port). A hold on one node is answered on the
//! other; grants and revocations are fleet-wide; each node's audit chain is
//! shipped and `audit verify --fleet` finds a tampered row; with the store
//! down new holds fail closed while known grants keep working, and shipping
//! catches up when it returns.

use std::{
    fs,
    process::{Command, Output},
    time::Duration,
};

use serde_json::{json, Value};

use crate::harness::*;

/// One node: its cgroup subtree, files and daemon.
struct Node {
    cg: TestCgroup,
    files: DaemonFiles,
    daemon: Daemon,
}

/// The store and two nodes governing access to one echo server, which every
/// identity may reach only with approval.
struct Fleet {
    pg: PgServer,
    server: EchoServer,
    a: Node,
    b: Node,
}

fn store_url(pg: &PgServer) -> String {
    format!("postgres://postgres@127.0.0.1:{}/fleet", pg.port)
}

/// A node; with `ca`, it reaches the store over TLS (`verify-full`).
fn node(name: &str, pg: &PgServer, server: &EchoServer, ca: Option<&std::path::Path>) -> Node {
    node_with(name, pg, server, ca, "")
}

/// [`node`] with more `[fleet]` keys.
fn node_with(
    name: &str,
    pg: &PgServer,
    server: &EchoServer,
    ca: Option<&std::path::Path>,
    fleet_keys: &str,
) -> Node {
    let cg = TestCgroup::new(&format!("fleet-{name}"));
    let files = DaemonFiles::new(&cg.rel);
    files.rules(
        "allow.cedar",
        "@id(\"echo-needs-approval\")\n@approval(\"required\")\npermit(principal, action == Action::\"tcp:connect\", resource == Resource::\"echo\");\n",
    );
    files.tcp_resources_with(
        "echo.toml",
        &[("echo", vec![server.addr.to_string()])],
        "approval_timeout = \"60s\"\n",
    );
    fs::write(
        files.config_file(),
        format!(
            "[fleet]\nstore = {:?}\npassword_file = {:?}\nnode = {name:?}\n{fleet_keys}{}",
            store_url(pg),
            pg.password_file.display().to_string(),
            ca.map(|c| format!(
                "sslmode = \"verify-full\"\nca_file = {:?}\n",
                c.display().to_string()
            ))
            .unwrap_or_default()
        ),
    )
    .expect("write config");
    let daemon = Daemon::start(&files);
    Node { cg, files, daemon }
}

fn fleet(name: &str) -> Fleet {
    require_root();
    let pg = PgServer::start(name);
    pg.sql("create database fleet");
    let server = EchoServer::start(name);
    // Node B reaches the store over TLS, node A in the clear.
    let ca = pg.enable_tls();
    let a = node("node-a", &pg, &server, None);
    let b = node("node-b", &pg, &server, Some(&ca));
    Fleet { pg, server, a, b }
}

fn to(server: &EchoServer) -> Value {
    json!({"host": "127.0.0.1", "port": server.addr.port(), "timeout": 30})
}

fn accepted(s: &EchoServer) -> u32 {
    s.accepted.load(std::sync::atomic::Ordering::Relaxed)
}

fn agent_place(n: &Node, identity: &str) -> Placement {
    let cg = n.cg.child(identity);
    n.daemon.tag(&cg, identity);
    Placement::cgroup(n.cg.dir(&cg))
}

fn verify_fleet(n: &Node) -> Output {
    Command::new(BIN)
        .args(["audit", "verify", "--fleet", "--json", "--config"])
        .arg(n.files.config_file())
        .output()
        .expect("spawn verify")
}

fn verified_nodes(out: &Output) -> Vec<Value> {
    serde_json::from_slice::<Value>(&out.stdout)
        .map(|v| v["nodes"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
}

fn grant_ids(n: &Node) -> Vec<String> {
    n.daemon.json(&["grants", "--json"])["grants"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|g| g["id"].as_str().map(str::to_string))
        .collect()
}

/// Grants `identity` the echo resource for 10 minutes on node `n`.
fn grant(n: &Node, identity: &str, allow: &str) -> String {
    let out = n
        .daemon
        .cli_ok(&["grant", identity, "echo", "--allow", allow, "--for", "10m"]);
    out.trim()
        .strip_prefix("grant ")
        .unwrap_or_else(|| panic!("{out}"))
        .to_string()
}

fn audit_events(files: &DaemonFiles) -> Vec<Value> {
    let out = Command::new(BIN)
        .args(["audit", "tail", "--json", "--state-dir"])
        .arg(&files.state)
        .output()
        .expect("audit tail");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until every node's shipped chain verifies and nothing is left to
/// ship; returns the report.
fn wait_shipped(n: &Node, nodes: usize) -> Vec<Value> {
    let mut last = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        let out = verify_fleet(n);
        last = verified_nodes(&out);
        if out.status.success()
            && last.len() == nodes
            && last
                .iter()
                .all(|v| v["unshipped"] == 0 && v["report"]["events"].as_u64() > Some(1))
        {
            return last;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = verify_fleet(n);
    panic!(
        "audit not shipped: {last:#?}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn fleet_approval_on_one_node_releases_a_hold_on_another_grants_are_shared_and_audit_verifies() {
    let f = fleet("fleet-approve");
    let place = agent_place(&f.a, "agent");

    // B's store connections are TLS, A's are not.
    let ssl_of = |n: &str| {
        f.pg.sql(&format!(
            "select string_agg(distinct s.ssl::text, ',') from pg_stat_ssl s \
             join pg_stat_activity a using (pid) where a.application_name like '%:{n}'"
        ))
        .trim()
        .to_string()
    };
    assert_eq!(ssl_of("node-b"), "true");
    assert_eq!(ssl_of("node-a"), "false");

    // Held on A, seen and approved on B.
    let held = HeldClient::spawn(&place, to(&f.server), &f.a.files.dir);
    let pending = f.b.daemon.wait_pending(1);
    assert_eq!(pending[0]["node"], "node-a", "{pending:?}");
    assert_eq!(pending[0]["identity"], "agent");
    let id = pending[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        accepted(&f.server),
        0,
        "nothing reaches upstream while held"
    );
    f.b.daemon.cli_ok(&["approve", &id, "--as", "bob"]);
    held.wait_ready();
    let out = held.finish();
    assert!(out.echo_ok(), "{out:?}");
    assert_eq!(accepted(&f.server), 1, "released once");
    // The first answer wins: a second one, on the other node, is refused.
    let again = f.a.daemon.cli(&["deny", &id, "--reason", "late"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already approved"),
        "{again:?}"
    );
    let cmds: Vec<Value> = audit_events(&f.a.files)
        .into_iter()
        .filter(|e| e["type"] == "command" && e["session"] == pending[0]["session"])
        .collect();
    assert!(
        cmds.iter().any(|e| e["decision"] == "allow"
            && e["approver"].as_str().is_some_and(|a| a.contains("bob"))),
        "{cmds:#?}"
    );

    // A grant made on B applies on A: no hold.
    let gid = grant(&f.b, "agent", "tcp:connect");
    wait_until(
        Duration::from_secs(5),
        || grant_ids(&f.a).contains(&gid),
        "the grant reaches node A",
    );
    let r = client(&place, to(&f.server));
    assert!(r.echo_ok(), "{r:?}");
    assert_eq!(accepted(&f.server), 2);
    assert!(f.a.daemon.requests("pending").is_empty());

    // Revoked on A: gone on B too, and a live session on B relying on it
    // is ended there.
    let place_b = agent_place(&f.b, "agent");
    let mut args = to(&f.server);
    args["hold"] = json!(30);
    let live = HeldClient::start(&place_b, args, &f.b.files.dir);
    f.a.daemon.cli_ok(&["revoke", &gid]);
    wait_until(
        Duration::from_secs(5),
        || !grant_ids(&f.b).contains(&gid),
        "the revocation reaches node B",
    );
    wait_until(
        Duration::from_secs(5),
        || f.b.daemon.flows().is_empty(),
        "node B ends the session that relied on the grant",
    );
    drop(live);
    assert!(audit_events(&f.b.files)
        .iter()
        .any(|e| e["type"] == "grant_revoked" && e["detail"]["grant"] == gid.as_str()));

    // Both chains are shipped and verify from the store.
    let nodes = wait_shipped(&f.a, 2);
    assert_eq!(nodes[0]["node"], "node-a");
    assert_eq!(nodes[1]["node"], "node-b");

    // A daemon killed (with a command held, while shipping) and restarted
    // fails its stale request everywhere and resumes shipping without
    // duplicates.
    let held = HeldClient::spawn(&place, to(&f.server), &f.a.files.dir);
    let stale = f.b.daemon.wait_pending(1)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut a = f.a;
    a.daemon.kill9();
    drop(held);
    a.daemon = Daemon::start(&a.files);
    wait_until(
        Duration::from_secs(10),
        || {
            f.b.daemon
                .requests("failed")
                .iter()
                .any(|r| r["id"] == stale.as_str())
        },
        "the restarted node's stale request is failed on every node",
    );
    // The store's row for the node still says what the killed daemon
    // shipped: wait for what the restarted one wrote, not for that row.
    let local_last = audit_events(&a.files)
        .last()
        .and_then(|e| e["seq"].as_u64())
        .unwrap();
    let store_max = || {
        f.pg.sql_in(
            "fleet",
            "select coalesce(max(seq), 0) from portcullis_audit where node = 'node-a'",
        )
        .trim()
        .parse::<u64>()
        .unwrap_or(0)
    };
    wait_until(
        Duration::from_secs(20),
        || store_max() >= local_last,
        "the restarted node ships what it wrote",
    );
    wait_shipped(&a, 2);
    let rows = f.pg.sql_in(
        "fleet",
        "select count(*), count(distinct seq), max(seq) from portcullis_audit where node = 'node-a'",
    );
    let parts: Vec<u64> = rows.trim().split('|').map(|x| x.parse().unwrap()).collect();
    assert_eq!(parts[0], parts[1], "no duplicate (node, seq)");
    assert!(
        parts[2] >= local_last.saturating_sub(2),
        "{parts:?} vs {local_last}"
    );

    // A tampered row is found, on its node, at its seq.
    f.pg.sql_in(
        "fleet",
        "update portcullis_audit_batches b set lines = (\
           select string_agg(case when b.first_seq + n - 1 = 2 \
                    then replace(l, '\"type\":', '\"type\" :') else l end, E'\\n' order by n) \
           from unnest(string_to_array(b.lines, E'\\n')) with ordinality as t(l, n)) \
         where node = 'node-b' and 2 between first_seq and last_seq",
    );
    let out = verify_fleet(&a);
    assert!(!out.status.success(), "{out:?}");
    let nodes = verified_nodes(&out);
    let b = nodes.iter().find(|n| n["node"] == "node-b").unwrap();
    assert_eq!(b["report"]["error"]["seq"], 2, "{b:#}");
    assert!(
        b["report"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("hash mismatch"),
        "{b:#}"
    );
    let a_report = nodes.iter().find(|n| n["node"] == "node-a").unwrap();
    assert!(a_report["report"]["error"].is_null(), "{a_report:#}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("node-b"));
}

/// Starts the store again after `pg_ctl stop -m immediate`, on its port.
fn restart_store(pg: &PgServer) -> Restarted<'_> {
    let port = pg.port.to_string();
    let sock = pg.dir.display().to_string();
    let log = pg.dir.join(unique("restart")).display().to_string();
    pg_ctl(
        pg,
        &[
            "start",
            "-w",
            "-l",
            &log,
            "-o",
            &format!("-p {port} -c listen_addresses=127.0.0.1 -k {sock}"),
        ],
    );
    Restarted(pg)
}

fn pg_ctl(pg: &PgServer, args: &[&str]) {
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("postgres user");
    let status = Command::new(format!("{PG_BIN}/pg_ctl"))
        .arg("-D")
        .arg(pg.dir.join("data"))
        .args(args)
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .current_dir(&pg.dir)
        .output()
        .expect("pg_ctl");
    assert!(status.status.success(), "pg_ctl {args:?}: {status:?}");
}

use std::os::unix::process::CommandExt as _;

/// Restarts the store after `pg_ctl stop -m immediate`; stops it on drop
/// (the harness only stops the server it started itself).
struct Restarted<'a>(&'a PgServer);

impl Drop for Restarted<'_> {
    fn drop(&mut self) {
        let _ = Command::new(format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(self.0.dir.join("data"))
            .args(["stop", "-m", "immediate"])
            .uid(
                nix::unistd::User::from_name("postgres")
                    .ok()
                    .flatten()
                    .map_or(0, |u| u.uid.as_raw()),
            )
            .output();
    }
}

#[test]
fn fleet_store_down_fails_new_holds_closed_keeps_known_grants_and_catches_up() {
    let f = fleet("fleet-down");
    let agent = agent_place(&f.a, "agent");
    let other = agent_place(&f.a, "x");
    let gid = grant(&f.b, "agent", "tcp");
    wait_until(
        Duration::from_secs(5),
        || grant_ids(&f.a).contains(&gid),
        "the grant reaches node A",
    );
    wait_shipped(&f.a, 2);

    pg_ctl(&f.pg, &["stop", "-m", "immediate", "-w"]);
    assert!(f.pg.psql_direct("select 1").is_err(), "the store is down");

    // A new hold fails closed at once, with the reason.
    let r = client(&other, to(&f.server));
    assert!(!r.echo_ok(), "{r:?}");
    assert_eq!(accepted(&f.server), 0);
    wait_until(
        Duration::from_secs(10),
        || {
            audit_events(&f.a.files).iter().any(|e| {
                e["type"] == "command"
                    && e["decision"] == "deny"
                    && e["identity"]["name"] == "x"
                    && e["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("approval store unreachable"))
            })
        },
        "the refusal is audited with its reason",
    );
    // A grant already known keeps working.
    let r = client(&agent, to(&f.server));
    assert!(r.echo_ok(), "{r:?}");
    assert_eq!(accepted(&f.server), 1);
    // Answers cannot be given meanwhile, with a clear error.
    let out =
        f.b.daemon
            .cli(&["grant", "x", "echo", "--allow", "tcp", "--for", "1m"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("approval store unreachable"),
        "{out:?}"
    );
    // Audit written meanwhile is shipped when the store returns.
    let out = verify_fleet(&f.a);
    assert!(!out.status.success(), "verify --fleet needs the store");

    let _restarted = restart_store(&f.pg);
    // Everything written while the store was down is shipped, once.
    let last = audit_events(&f.a.files)
        .last()
        .and_then(|e| e["seq"].as_u64())
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        || {
            f.pg.sql_in(
                "fleet",
                "select count(distinct seq) = count(*) from portcullis_audit where node = 'node-a'",
            )
            .trim()
                == "t"
                && f.pg
                    .sql_in(
                        "fleet",
                        "select count(*) from portcullis_audit where node = 'node-a'",
                    )
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
                    >= last
        },
        "node A's audit written during the outage reaches the store",
    );
    wait_shipped(&f.a, 2);
    // And holds work again across nodes.
    let held = HeldClient::spawn(&other, to(&f.server), &f.a.files.dir);
    let pending = f.b.daemon.wait_pending(1);
    let id = pending[0]["id"].as_str().unwrap().to_string();
    // Two reviewers answer at once on two nodes: exactly one answer counts,
    // and the agent gets that one.
    let spawn = |n: &Node, args: &[&str]| {
        Command::new(BIN)
            .arg("--admin-socket")
            .arg(&n.files.socket)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn cli")
    };
    let approve = spawn(&f.b, &["approve", &id]);
    let deny = spawn(&f.a, &["deny", &id, "--reason", "no"]);
    let approve = approve.wait_with_output().expect("approve");
    let deny = deny.wait_with_output().expect("deny");
    assert!(
        approve.status.success() != deny.status.success(),
        "exactly one answer wins: {approve:?} {deny:?}"
    );
    let loser = if approve.status.success() {
        &deny
    } else {
        &approve
    };
    assert!(
        String::from_utf8_lossy(&loser.stderr).contains("the first answer wins"),
        "{loser:?}"
    );
    let out = held.finish();
    assert_eq!(out.echo_ok(), approve.status.success(), "{out:?}");
}

/// A command already held when the store goes down: on a node whose
/// `fail_held_after` passes first it is refused in its own protocol with
/// "approval store unreachable" (audited, and written back to the store
/// when it returns); on a node still within it, the hold survives the
/// outage and an answer given after the store returns releases it.
#[test]
fn fleet_store_lost_mid_hold_refuses_held_commands_unless_it_returns_in_time() {
    require_root();
    let pg = PgServer::start("fleet-midhold");
    pg.sql("create database fleet");
    let upstream = PgServer::start("fleet-midhold-up");
    upstream.sql("create table t(id int primary key, v text); insert into t values (1, 'before');");
    let server = EchoServer::start("fleet-midhold");
    // A: the default bound (3 s); B: a minute, longer than the outage.
    let a = node("node-a", &pg, &server, None);
    let b = node_with("node-b", &pg, &server, None, "fail_held_after = \"60s\"\n");
    // A also governs a PostgreSQL whose UPDATEs need approval, so that its
    // agent hears the refusal in the PostgreSQL protocol.
    fs::write(
        a.files.policies.join("pg.toml"),
        format!(
            "[resource.up]\nprotocol = \"postgres\"\nmatch = [\"{}\"]\ncredentials = {{ user = \"postgres\", password_file = {:?} }}\nupstream_tls = \"disable\"\napproval_timeout = \"120s\"\n",
            upstream.addr(),
            upstream.password_file.display().to_string()
        ),
    )
    .unwrap();
    a.files.rules(
        "pg.cedar",
        "@id(\"pg-read\")\npermit(principal, action in [Action::\"postgres:select\", Action::\"postgres:set\", Action::\"postgres:show\"], resource == Resource::\"up\");\n\
         @id(\"pg-update-approved\")\n@approval(\"required\")\npermit(principal, action == Action::\"postgres:update\", resource == Resource::\"up\");\n",
    );
    a.daemon.cli_ok(&["policy", "reload"]);
    let on_a = agent_place(&a, "agent");
    let on_b = agent_place(&b, "agent");

    let mut psql = Command::new("psql");
    psql.args(["-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1"])
        .arg(format!(
            "host=127.0.0.1 port={} user=agent dbname=postgres sslmode=disable connect_timeout=10",
            upstream.port
        ))
        .args(["-c", "update t set v = 'after' where id = 1"])
        .env_remove("PGPASSWORD")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    on_a.apply(&mut psql);
    let psql = psql.spawn().expect("psql");
    let held_b = HeldClient::spawn(&on_b, to(&server), &b.files.dir);
    let pending = b.daemon.wait_pending(2);
    let id_on = |node: &str| {
        pending
            .iter()
            .find(|r| r["node"] == node)
            .and_then(|r| r["id"].as_str())
            .unwrap_or_else(|| panic!("no request of {node}: {pending:#?}"))
            .to_string()
    };
    let (id_a, id_b) = (id_on("node-a"), id_on("node-b"));

    pg_ctl(&pg, &["stop", "-m", "immediate", "-w"]);
    assert!(pg.psql_direct("select 1").is_err(), "the store is down");

    // A refuses its held UPDATE in the PostgreSQL protocol, with the
    // reason, long before the request's own 120 s timeout.
    let out = psql.wait_with_output().expect("psql");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains("approval store unreachable"), "{err}");
    assert!(
        err.contains(&id_a),
        "the agent is told which request: {err}"
    );
    assert!(!err.contains("timed out"), "{err}");
    assert_eq!(
        upstream.sql("select v from t where id = 1").trim(),
        "before"
    );
    wait_until(
        Duration::from_secs(10),
        || {
            audit_events(&a.files).iter().any(|e| {
                e["type"] == "command"
                    && e["decision"] == "deny"
                    && e["detail"]["request"] == id_a.as_str()
                    && e["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("approval store unreachable"))
            })
        },
        "the refusal of the held command is audited with its reason",
    );
    assert!(
        !held_b.ready.exists(),
        "B's hold is neither released nor refused while the store is down"
    );

    // The store returns within B's bound: B's hold goes on, and an answer
    // given now (on A) releases it.
    let _restarted = restart_store(&pg);
    wait_until(
        Duration::from_secs(20),
        || {
            a.daemon
                .cli(&["approve", &id_b, "--as", "carol"])
                .status
                .success()
        },
        "approving B's request once the store is back",
    );
    held_b.wait_ready();
    let r = held_b.finish();
    assert!(r.echo_ok(), "{r:?}");
    assert_eq!(accepted(&server), 1);
    // A's refusal reaches the store: every node lists it as failed.
    wait_until(
        Duration::from_secs(10),
        || {
            b.daemon.requests("failed").iter().any(|r| {
                r["id"] == id_a.as_str()
                    && r["reason"]
                        .as_str()
                        .is_some_and(|x| x.contains("approval store unreachable"))
            })
        },
        "A's refusal is written back to the store",
    );
}

/// A batch the store already holds part of (an answer lost in an outage,
/// or two shippers under one node name) goes in without an error and
/// without a duplicate: under the node's lock the lines the store has are
/// dropped, so the first copy of a seq stays, and the rest goes in as one
/// row per run of consecutive seqs.
#[test]
fn fleet_a_shipped_batch_partly_in_the_store_keeps_the_first_copy() {
    let (pg, store) = scratch_store("fleet-dedup", "node-d");
    let line = |seq: u64, v: &str| (seq, format!("{{\"seq\":{seq},\"v\":\"{v}\"}}"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        store.migrate().await.expect("migrate");
        store
            .ship(
                "node-d",
                None,
                (1..=3).map(|s| line(s, "first")).collect(),
                3,
            )
            .await
            .expect("first batch");
        store
            .ship(
                "node-d",
                None,
                (2..=5).map(|s| line(s, "again")).collect(),
                5,
            )
            .await
            .expect("a batch overlapping the store is not an error");
        let rows = store.audit_lines("node-d", 0, 100).await.expect("rows");
        let seen: Vec<(u64, bool)> = rows
            .iter()
            .map(|(s, l)| (*s, l.contains("first")))
            .collect();
        assert_eq!(
            seen,
            vec![(1, true), (2, true), (3, true), (4, false), (5, false)],
            "{rows:?}"
        );
    });
    assert_eq!(
        pg.sql_in(
            "fleet",
            "select shipped_seq from portcullis_nodes where node = 'node-d'"
        )
        .trim(),
        "5"
    );
    assert_eq!(
        pg.sql_in(
            "fleet",
            "select string_agg(first_seq || '-' || last_seq, ',' order by first_seq) \
             from portcullis_audit_batches where node = 'node-d'"
        )
        .trim(),
        "1-3,4-5",
        "one row per shipped run"
    );
}

/// A store written by the first schema (one row per line) is migrated in
/// place: its lines keep their seqs, shipping resumes after them, the rows
/// of runs are compressed with lz4, and `portcullis_audit` still answers
/// SQL with one row per line (node, seq, hash, line) and takes the inserts
/// of daemons not yet upgraded.
#[test]
fn fleet_a_store_of_the_first_schema_upgrades_to_compressed_runs() {
    let (pg, store) = scratch_store("fleet-upgrade", "node-u");
    let hash = |seq: u64| format!("{seq:064x}");
    let line = |seq: u64| format!("{{\"seq\":{seq},\"hash\":\"{}\"}}", hash(seq));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(store.migrate_to(1)).expect("first schema");
    for seq in 1..=3 {
        pg.sql_in(
            "fleet",
            &format!(
                "insert into portcullis_audit (node, seq, hash, line) values ('node-u', {seq}, '{}', '{}')",
                hash(seq),
                line(seq)
            ),
        );
    }
    rt.block_on(async {
        store.migrate().await.expect("upgrade");
        assert_eq!(store.shipped_seq("node-u").await.expect("shipped"), 3);
        store
            .ship("node-u", None, (4..=6).map(|s| (s, line(s))).collect(), 6)
            .await
            .expect("ship after the upgrade");
        let rows = store.audit_lines("node-u", 2, 100).await.expect("rows");
        assert_eq!(
            rows,
            (2..=6).map(|s| (s, line(s))).collect::<Vec<_>>(),
            "every line at its seq, from the one asked"
        );
    });
    // A daemon of the first schema, not yet upgraded, still ships through
    // the view; a seq the store has keeps its first copy.
    for seq in [5, 7] {
        pg.sql_in(
            "fleet",
            &format!(
                "insert into portcullis_audit (node, seq, hash, line) values ('node-u', {seq}, '{}', '{}')",
                hash(seq),
                line(seq).replace("\"seq\"", "\"seq\" ")
            ),
        );
    }
    assert_eq!(
        pg.sql_in(
            "fleet",
            "select string_agg(seq || ':' || (hash = lpad(to_hex(seq), 64, '0'))::text \
                               || ':' || (line like '{\"seq\" :%')::text, ',' order by seq) \
             from portcullis_audit where node = 'node-u'"
        )
        .trim(),
        "1:true:false,2:true:false,3:true:false,4:true:false,5:true:false,6:true:false,7:true:true"
    );
    assert_eq!(
        pg.sql_in(
            "fleet",
            "select attcompression from pg_attribute \
             where attrelid = 'portcullis_audit_batches'::regclass and attname = 'lines'"
        )
        .trim(),
        "l",
        "runs are stored with lz4"
    );
}

/// A fresh PostgreSQL with an empty `fleet` database, and a store client of
/// it for `node` (tests that drive the store without a daemon).
fn scratch_store(name: &str, node: &str) -> (PgServer, portcullis::fleet::Store) {
    require_root();
    let pg = PgServer::start(name);
    pg.sql("create database fleet");
    let cfg = portcullis::fleet::FleetConfig {
        store: store_url(&pg),
        password_file: Some(pg.password_file.clone()),
        sslmode: None,
        ca_file: None,
        node: Some(node.into()),
        fail_held_after: None,
        ship_priority: None,
    };
    let store = cfg.store(&format!("e2e-{name}")).expect("store settings");
    (pg, store)
}
