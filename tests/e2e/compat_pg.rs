//! Real PostgreSQL clients behave through Portcullis as they do directly
//! (issue 19, item 9): masked columns keep their types (psycopg 3 text and
//! binary, asyncpg), `COPY TO` works for every table without masked
//! columns (asyncpg, psql `\copy`, pg_dump), PostgreSQL 17's direct TLS and
//! a cancel over TLS (libpq 18 through psycopg's wheel, asyncpg
//! `direct_tls`), and the driver scenarios of `compat_pg.py` run directly
//! and through the daemon in the same test with equal results.
//!
//! The long suites (pgbench in three modes, SQLAlchemy's own PostgreSQL
//! dialect tests from its sdist, with and without a masking policy) are
//! `#[ignore]`d here and run by `cargo xtask compat`.

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    process::{Command, Output},
    time::Instant,
};

use serde_json::{json, Value};

use crate::harness::*;

/// The Python with the PyPI drivers `cargo xtask setup` installs.
const PY: &str = "/opt/portcullis-py/bin/python";
/// SQLAlchemy's sdist (its test suite), downloaded by `cargo xtask setup`.
const SQLALCHEMY_SDIST: &str = "/opt/portcullis-py/src/sqlalchemy-2.1.9.tar.gz";
const DRIVERS: &str = include_str!("compat_pg.py");

const RULES: &str = "@id(\"pg-all\")\npermit(principal, action, resource);\n";

struct Pg {
    _cg: TestCgroup,
    pg: PgServer,
    files: DaemonFiles,
    daemon: Daemon,
    agent: Placement,
    password: String,
}

/// Which way a client reaches the server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    Direct,
    Portcullis,
}

fn setup(name: &str, resource_extra: &str, mask: &str, settings: &[(&str, &str)]) -> Pg {
    require_root();
    let cg = TestCgroup::new(name);
    let pg = PgServer::start_with(name, settings);
    let files = DaemonFiles::new(&cg.rel);
    files.identities(IDENTITIES);
    files.rules("pg.cedar", RULES);
    write_resource(&files, &pg, resource_extra, mask);
    let daemon = Daemon::start(&files);
    let agent_cg = cg.child("agent");
    daemon.tag(&agent_cg, "agent");
    let password = fs::read_to_string(&pg.password_file)
        .expect("password")
        .trim()
        .to_string();
    Pg {
        agent: Placement::cgroup(cg.dir(&agent_cg)),
        _cg: cg,
        pg,
        files,
        daemon,
        password,
    }
}

fn write_resource(files: &DaemonFiles, pg: &PgServer, extra: &str, mask: &str) {
    fs::write(
        files.policies.join("pg.toml"),
        format!(
            "[resource.pg]\nprotocol = \"postgres\"\nmatch = [\"{}\"]\ncredentials = {{ user = \"postgres\", password_file = {:?} }}\nupstream_tls = \"prefer\"\n{extra}\n\n{mask}",
            pg.addr(),
            pg.password_file.display().to_string()
        ),
    )
    .expect("write resource");
}

impl Pg {
    /// A libpq conninfo for `db`: the superuser with its password directly,
    /// the agent with none through Portcullis.
    fn conninfo(&self, via: Via, db: &str, extra: &str) -> String {
        let who = match via {
            Via::Direct => format!("user=postgres password={}", self.password),
            Via::Portcullis => "user=agent".to_string(),
        };
        format!(
            "host=127.0.0.1 port={} {who} dbname={db} connect_timeout=10 {extra}",
            self.pg.port
        )
    }

    /// Runs `cmd` as `via` says (in the agent's cgroup through Portcullis).
    fn run(&self, via: Via, cmd: &mut Command) -> Output {
        cmd.env_remove("PGPASSWORD");
        if via == Via::Portcullis {
            self.agent.apply(cmd);
        }
        cmd.output().expect("spawn client")
    }

    /// Runs a Python script with the PyPI drivers; its last stdout line is
    /// JSON.
    fn python(&self, via: Via, script: &str, args: Value) -> Value {
        let out = self.run(
            via,
            Command::new(PY).args(["-c", script, &args.to_string()]),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or_default();
        serde_json::from_str(last).unwrap_or_else(|e| {
            panic!(
                "{via:?}: no JSON from the client ({e}): {text} / {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// The driver scenarios of `compat_pg.py` (all when `names` is empty).
    fn drivers(&self, via: Via, names: &[&str]) -> Value {
        self.python(
            via,
            DRIVERS,
            json!({"dsn": self.conninfo(via, "postgres", "sslmode=disable"), "scenarios": names}),
        )
    }
}

/// Every scenario's result, direct and through Portcullis, must be equal.
fn assert_same(direct: &Value, proxied: &Value) {
    let (Some(d), Some(p)) = (direct.as_object(), proxied.as_object()) else {
        panic!("results are not objects: {direct} / {proxied}");
    };
    let mut differ = Vec::new();
    for (k, v) in d {
        assert!(
            !v.to_string().contains("\"error\""),
            "{k} fails directly: {v}"
        );
        if p.get(k) != Some(v) {
            differ.push(format!(
                "{k}:\n  direct: {v}\n  through Portcullis: {:?}",
                p.get(k)
            ));
        }
    }
    assert!(differ.is_empty(), "differences:\n{}", differ.join("\n"));
}

#[test]
fn compat_pg_drivers_behave_as_directly() {
    let s = setup("cpgdrv", "", "", &[("max_prepared_transactions", "5")]);
    let direct = s.drivers(Via::Direct, &[]);
    let proxied = s.drivers(Via::Portcullis, &[]);
    assert_same(&direct, &proxied);
    // The cancel really went through the daemon (and was audited).
    assert!(
        s.daemon.log_text().contains("cancel request forwarded"),
        "{}",
        s.daemon.log_text()
    );
}

const TYPED: &str = r#"
import asyncio, json, sys
import asyncpg, psycopg
a = json.loads(sys.argv[1])
q = "select * from accounts order by id"
out = {}
for binary in (False, True):
    try:
        with psycopg.connect(a["dsn"]) as c:
            r = c.cursor(binary=binary).execute(q).fetchall()
            out["psycopg_binary" if binary else "psycopg_text"] = [[repr(v) for v in row] for row in r]
    except Exception as e:
        out["psycopg_binary" if binary else "psycopg_text"] = {"error": repr(e)}
async def apg():
    c = await asyncpg.connect(host="127.0.0.1", port=a["port"], user=a["user"], password=a.get("password"), database="postgres", ssl=False)
    try:
        return [[repr(v) for v in row.values()] for row in await c.fetch(q)]
    finally:
        await c.close()
try:
    out["asyncpg"] = asyncio.run(apg())
except Exception as e:
    out["asyncpg"] = {"error": repr(e)}
print(json.dumps(out))
"#;

#[test]
fn compat_pg_masked_columns_keep_their_types() {
    let s = setup(
        "cpgtyped",
        "",
        "[[mask]]\nresource = \"pg\"\ncolumns = [\"accounts.n\", \"accounts.amount\", \"accounts.born\", \"accounts.token\", \"accounts.ok\", \"accounts.note\", \"accounts.doc\", \"accounts.tags\", \"accounts.seen\", \"accounts.big\"]\nstyle = \"redact\"\n",
        &[],
    );
    s.pg.sql(
        "create table accounts(id int primary key, n int, big bigint, amount numeric(10,2), born date, token uuid, ok bool, note text, doc jsonb, tags text[], seen timestamptz);
         insert into accounts values (1, 42, 9000000000, 12.50, '1990-05-17', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', true, 'secret', '{\"k\": 1}', '{a,b}', '2024-01-02 03:04:05+00'),
                                     (2, null, -1, 0.01, '2000-01-01', '00000000-0000-0000-0000-000000000001', false, 'x', '[1]', '{}', now());",
    );
    let args = json!({
        "dsn": s.conninfo(Via::Portcullis, "postgres", "sslmode=disable"),
        "port": s.pg.port,
        "user": "agent",
    });
    let got = s.python(Via::Portcullis, TYPED, args);
    let masked_row = |id: &str, zone: &str| {
        json!([
            id,
            "0",
            "0",
            "Decimal('0')",
            "datetime.date(1970, 1, 1)",
            "UUID('00000000-0000-0000-0000-000000000000')",
            "False",
            "'[MASKED]'",
            "'[MASKED]'",
            "[]",
            format!("datetime.datetime(1970, 1, 1, 0, 0, tzinfo={zone})")
        ])
    };
    for client in ["psycopg_text", "psycopg_binary", "asyncpg"] {
        let rows = &got[client];
        assert!(rows.is_array(), "{client} failed: {rows}");
        let zone = if client == "asyncpg" {
            "datetime.timezone.utc"
        } else {
            "zoneinfo.ZoneInfo(key='Etc/UTC')"
        };
        let mut want = masked_row("1", zone);
        if client == "asyncpg" {
            // asyncpg hands jsonb over as its text: a JSON string.
            want[8] = json!("'\"[MASKED]\"'");
        }
        // id is not masked; `n` is NULL in row 2 and stays NULL.
        assert_eq!(rows[0], want, "{client}: {rows}");
        assert_eq!(rows[1][0], json!("2"), "{client}: {rows}");
        assert_eq!(rows[1][1], json!("None"), "{client}: {rows}");
        assert_eq!(rows[1][2], json!("0"), "{client}: {rows}");
    }
    // The same fetch directly shows the real values (the masking above is
    // Portcullis's, not the data).
    let direct = s.python(
        Via::Direct,
        TYPED,
        json!({
            "dsn": s.conninfo(Via::Direct, "postgres", "sslmode=disable"),
            "port": s.pg.port,
            "user": "postgres",
            "password": s.password,
        }),
    );
    assert_eq!(direct["psycopg_binary"][0][1], json!("42"), "{direct}");
}

const COPY_OUT: &str = r#"
import asyncio, io, json, sys
import asyncpg
a = json.loads(sys.argv[1])
async def main():
    c = await asyncpg.connect(host="127.0.0.1", port=a["port"], user="agent", database="postgres", ssl=False)
    out = {}
    for name, kw in (("orders", {}), ("customers", {}), ("customers_id", {"columns": ["id"]})):
        buf = io.BytesIO()
        try:
            await c.copy_from_table(name.split("_")[0], output=buf, **kw)
            out[name] = buf.getvalue().decode()
        except Exception as e:
            out[name] = {"error": str(e)}
    await c.close()
    return out
print(json.dumps(asyncio.run(main())))
"#;

#[test]
fn compat_pg_copy_to_is_refused_only_for_masked_tables() {
    let s = setup(
        "cpgcopy",
        "",
        "[[mask]]\nresource = \"pg\"\ncolumns = [\"customers.ssn\"]\nstyle = \"redact\"\n",
        &[],
    );
    s.pg.sql(
        "create table customers(id int primary key, ssn text);
         insert into customers values (1, '123-45-6789');
         create table orders(id int primary key, total numeric);
         insert into orders values (1, 9.99), (2, 20);",
    );
    let got = s.python(Via::Portcullis, COPY_OUT, json!({"port": s.pg.port}));
    assert_eq!(got["orders"], json!("1\t9.99\n2\t20\n"), "{got}");
    assert_eq!(got["customers_id"], json!("1\n"), "{got}");
    let refused = got["customers"]["error"].as_str().unwrap_or_default();
    assert!(refused.contains("masked column ssn"), "{got}");
    assert!(!got.to_string().contains("123-45-6789"), "{got}");

    // psql's \copy ... to
    let psql = |sql: &str| {
        s.run(
            Via::Portcullis,
            Command::new("psql")
                .args(["-X", "-w", "-v", "ON_ERROR_STOP=1"])
                .arg(s.conninfo(Via::Portcullis, "postgres", "sslmode=disable"))
                .args(["-c", sql]),
        )
    };
    let out = psql("\\copy orders to stdout with csv");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1,9.99\n2,20\n");
    let out = psql("\\copy customers to stdout");
    assert!(!out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("123-45-6789"));

    // pg_dump of the database without its masked table works; with it,
    // it is refused (and never prints the value).
    let dump = |exclude: bool| {
        let mut cmd = Command::new("pg_dump");
        cmd.arg(s.conninfo(Via::Portcullis, "postgres", "sslmode=disable"));
        if exclude {
            cmd.args(["--exclude-table", "customers"]);
        }
        s.run(Via::Portcullis, &mut cmd)
    };
    let out = dump(true);
    assert!(
        out.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("COPY public.orders (id, total) FROM stdin;\n1\t9.99\n2\t20\n"),
        "{text}"
    );
    let out = dump(false);
    assert!(!out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("123-45-6789"));
}

const TLS: &str = r#"
import asyncio, json, socket, ssl, sys, threading, time
import asyncpg, psycopg
a = json.loads(sys.argv[1])
out = {}
for neg in ("direct", "postgres"):
    try:
        with psycopg.connect(a["dsn"] + " sslmode=require sslnegotiation=" + neg) as c:
            out[neg] = [c.execute("select 41 + 1").fetchone()[0], c.pgconn.ssl_in_use]
    except Exception as e:
        out[neg] = {"error": str(e)}
async def apg():
    # asyncpg offers ALPN `postgresql` on the contexts it makes (PostgreSQL
    # 17 requires it for direct TLS, and so does Portcullis).
    c = await asyncpg.connect(host="127.0.0.1", port=a["port"], user="agent", database="postgres", ssl="require", direct_tls=True)
    try:
        return await c.fetchval("select 7")
    finally:
        await c.close()
try:
    out["asyncpg_direct"] = asyncio.run(apg())
except Exception as e:
    out["asyncpg_direct"] = {"error": str(e)}
# Direct TLS without ALPN: refused with PostgreSQL's words, inside TLS.
try:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", a["port"]), timeout=10) as raw:
        with ctx.wrap_socket(raw) as t:
            data = b""
            while True:
                chunk = t.recv(4096)
                if not chunk:
                    break
                data += chunk
            out["no_alpn"] = data.decode("utf-8", "replace")
except Exception as e:
    out["no_alpn"] = {"error": str(e)}
# Cancel over TLS: libpq 18's blocking cancel checks the TLS close.
try:
    with psycopg.connect(a["dsn"] + " sslmode=require", autocommit=True) as c:
        res = {}
        def later():
            time.sleep(0.5)
            try:
                c.cancel_safe(timeout=10)
                res["cancel"] = "ok"
            except Exception as e:
                res["cancel"] = {"error": str(e)}
        th = threading.Thread(target=later)
        th.start()
        try:
            c.execute("select pg_sleep(20)")
            res["query"] = "finished"
        except psycopg.Error as e:
            res["query"] = type(e).__name__
        th.join()
        out["cancel"] = res
except Exception as e:
    out["cancel"] = {"error": str(e)}
out["libpq"] = psycopg.pq.version()
print(json.dumps(out))
"#;

#[test]
fn compat_pg_direct_tls_and_cancel_over_tls() {
    let s = setup("cpgtls", "ssl = \"on\"", "", &[]);
    let got = s.python(
        Via::Portcullis,
        TLS,
        json!({"dsn": s.conninfo(Via::Portcullis, "postgres", ""), "port": s.pg.port}),
    );
    assert!(got["libpq"].as_u64().unwrap_or(0) >= 170000, "{got}");
    assert_eq!(got["direct"], json!([42, true]), "{got}");
    assert_eq!(got["postgres"], json!([42, true]), "{got}");
    assert_eq!(got["asyncpg_direct"], json!(7), "{got}");
    assert!(
        got["no_alpn"]
            .as_str()
            .is_some_and(|t| t.contains("without ALPN")),
        "{got}"
    );
    assert_eq!(
        got["cancel"],
        json!({"cancel": "ok", "query": "QueryCanceled"}),
        "{got}"
    );

    // With ssl = "off" direct TLS fails at once (no hang), as against a
    // server without TLS.
    write_resource(&s.files, &s.pg, "ssl = \"off\"", "");
    s.daemon.cli_ok(&["policy", "reload"]);
    let started = Instant::now();
    let got = s.python(
        Via::Portcullis,
        "import json, sys, psycopg\na = json.loads(sys.argv[1])\ntry:\n    psycopg.connect(a['dsn'] + ' sslmode=require sslnegotiation=direct').close()\n    print(json.dumps('connected'))\nexcept Exception as e:\n    print(json.dumps({'error': str(e)}))\n",
        json!({"dsn": s.conninfo(Via::Portcullis, "postgres", "")}),
    );
    assert!(got["error"].is_string(), "{got}");
    assert!(
        started.elapsed().as_secs() < 30,
        "direct TLS on ssl off hung"
    );
}

/// pgbench's summary: (exit ok, failed transactions line says 0, processed).
fn pgbench(s: &Pg, via: Via, args: &[&str]) -> (bool, String) {
    let out = s.run(
        via,
        Command::new("pgbench")
            .args(args)
            .arg(s.conninfo(via, "postgres", "sslmode=disable")),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success()
        && (args.contains(&"-i")
            || (text.contains("number of failed transactions: 0 ")
                && !text.contains("number of transactions actually processed: 0/")));
    (ok, text)
}

/// SQLAlchemy's PostgreSQL dialect tests and its dialect-independent SQL
/// tests, 19,304 in all (`PORTCULLIS_COMPAT_SQLA`: other test paths of its
/// sdist, space-separated): (passed, failed test ids).
fn sqlalchemy(s: &Pg, via: Via, src: &Path) -> (usize, BTreeSet<String>) {
    let uri = match via {
        Via::Direct => format!(
            "postgresql+psycopg://postgres:{}@127.0.0.1:{}/test",
            s.password, s.pg.port
        ),
        // The agent has no password (the daemon logs in for it and asks
        // it for none); a placeholder one only lets SQLAlchemy's
        // multiple-host tests build their URLs from this one.
        Via::Portcullis => format!(
            "postgresql+psycopg://agent:unused@127.0.0.1:{}/test",
            s.pg.port
        ),
    };
    let report = src.join(format!("report-{via:?}.txt"));
    let out = s.run(
        via,
        Command::new(PY)
            .current_dir(src)
            .args(["-m", "pytest", "-p", "no:cacheprovider"])
            .args(
                std::env::var("PORTCULLIS_COMPAT_SQLA")
                    .unwrap_or_else(|_| "test/dialect/postgresql test/sql".into())
                    .split_whitespace(),
            )
            .args(["-o", "addopts=", "-q", "-rfE", "-W", "ignore"])
            // `PORTCULLIS_COMPAT_SQLA_TB=short` for the tracebacks.
            .arg(format!(
                "--tb={}",
                std::env::var("PORTCULLIS_COMPAT_SQLA_TB").unwrap_or_else(|_| "no".into())
            ))
            .arg(format!("--dburi={uri}"))
            .arg(format!("--junitxml={}", report.display())),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if std::env::var("PORTCULLIS_COMPAT_SQLA_TB").is_ok() {
        println!("{text}");
    }
    let failed: BTreeSet<String> = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("FAILED ")
                .or_else(|| l.strip_prefix("ERROR "))
        })
        // A test id, not a captured log line (`ERROR    sqlalchemy.pool`).
        .filter(|l| l.contains("::"))
        .map(|l| l.split(" - ").next().unwrap_or(l).to_string())
        .collect();
    let summary = text.lines().last().unwrap_or_default().to_string();
    // Every failure with pytest's reason (a refusal's words among them),
    // for the report.
    for l in text
        .lines()
        .filter(|l| (l.starts_with("FAILED ") || l.starts_with("ERROR ")) && l.contains("::"))
    {
        println!("sqlalchemy {via:?}: {l}");
    }
    // `== 9 failed, 10167 passed, 14 skipped in 926.17s ==`
    let words: Vec<&str> = summary.split_whitespace().collect();
    let passed = words
        .windows(2)
        .find(|w| w[1].starts_with("passed"))
        .and_then(|w| w[0].parse().ok())
        .unwrap_or(0);
    println!("sqlalchemy {via:?}: {summary}");
    (passed, failed)
}

/// The long compatibility run (`cargo xtask compat`): pgbench in its three
/// query modes and SQLAlchemy's dialect and SQL suites, directly and
/// through Portcullis. Any difference fails.
#[test]
#[ignore = "long: run by `cargo xtask compat`"]
fn compat_pg_suites_behave_as_directly() {
    let s = setup("cpgsuite", "", "", &[("max_prepared_transactions", "10")]);
    // pgbench: initialize once, then each mode both ways.
    let (ok, text) = pgbench(&s, Via::Direct, &["-i", "-s", "1", "-q"]);
    assert!(ok, "{text}");
    for mode in ["simple", "extended", "prepared"] {
        for via in [Via::Direct, Via::Portcullis] {
            let (ok, text) = pgbench(&s, via, &["-M", mode, "-T", "3", "-c", "2", "-j", "1"]);
            println!(
                "pgbench -M {mode} {via:?}: {}",
                text.lines()
                    .filter(|l| l.contains("processed") || l.contains("failed"))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            assert!(ok, "pgbench -M {mode} {via:?}: {text}");
        }
    }
    // SQLAlchemy's suite, from its sdist.
    s.pg.sql("create database test");
    s.pg.sql_in(
        "test",
        "create schema test_schema; create schema test_schema_2; create extension hstore; create extension citext; create extension btree_gist;",
    );
    let src = std::env::temp_dir().join(unique("sqla"));
    fs::create_dir_all(&src).expect("sqla dir");
    run_ok(
        Command::new("tar")
            .args(["xzf", SQLALCHEMY_SDIST, "--strip-components=1", "-C"])
            .arg(&src),
    );
    let started = Instant::now();
    let (dp, df) = sqlalchemy(&s, Via::Direct, &src);
    println!("sqlalchemy direct took {:?}", started.elapsed());
    let (pp, pf) = sqlalchemy(&s, Via::Portcullis, &src);
    let _ = fs::remove_dir_all(&src);
    println!(
        "COMPAT sqlalchemy direct: {dp} passed, {} failed; through Portcullis: {pp} passed, {} failed",
        df.len(),
        pf.len(),
    );
    assert!(dp > 0, "the suite did not run");
    let (dp, pf) = set_aside_on_purpose(dp, &df, &pf, REFUSED_ON_PURPOSE);
    assert_same_tests((dp, &df), (pp, &pf), "through Portcullis");
}

/// Sets aside the tests that fail through Portcullis on purpose (named in
/// `on_purpose`, and failing only there): each is printed with its reason,
/// taken out of the failures through Portcullis and out of the direct
/// passes, so every other test must still behave as directly. Returns the
/// direct passes and the failures through Portcullis left to compare.
fn set_aside_on_purpose(
    direct_passed: usize,
    direct_failed: &BTreeSet<String>,
    failed: &BTreeSet<String>,
    on_purpose: &[(&str, &str, &str)],
) -> (usize, BTreeSet<String>) {
    let reason = |t: &str| {
        on_purpose
            .iter()
            .find(|(file, name, _)| t.contains(file) && t.ends_with(name))
            .map(|(_, _, why)| *why)
    };
    let expected: BTreeSet<String> = failed
        .difference(direct_failed)
        .filter(|t| reason(t).is_some())
        .cloned()
        .collect();
    for t in &expected {
        println!(
            "sqlalchemy differs on purpose: {t} ({})",
            reason(t).unwrap_or_default()
        );
    }
    // A test that fails on purpose is not counted as passing directly
    // (`test_ensure_version_is_qualified` also errs at teardown: one id).
    (
        direct_passed.saturating_sub(expected.len()),
        failed.difference(&expected).cloned().collect(),
    )
}

/// Same passes and the same failing tests.
fn assert_same_tests(
    direct: (usize, &BTreeSet<String>),
    other: (usize, &BTreeSet<String>),
    how: &str,
) {
    let only =
        |a: &BTreeSet<String>, b: &BTreeSet<String>| a.difference(b).cloned().collect::<Vec<_>>();
    assert_eq!(
        (only(other.1, direct.1), only(direct.1, other.1), other.0),
        (vec![], vec![], direct.0),
        "{how} differs from direct (failing only there, failing only directly, passed)"
    );
}

/// SQLAlchemy's suite through a resource with a column masking rule that
/// names none of its tables must behave as directly, but for the tests
/// that create server-side code (refused on purpose on a masked resource:
/// docs/compatibility.md names them).
#[test]
#[ignore = "long: run by `cargo xtask compat`"]
fn compat_pg_sqlalchemy_with_masking_policy_behaves_as_directly() {
    let s = setup(
        "cpgsqlamask",
        "",
        "[[mask]]\nresource = \"pg\"\ncolumns = [\"portcullis_secrets.ssn\"]\nstyle = \"redact\"\n",
        &[],
    );
    s.pg.sql("create database test");
    s.pg.sql_in(
        "test",
        "create schema test_schema; create schema test_schema_2; create extension hstore; create extension citext; create extension btree_gist;",
    );
    let src = std::env::temp_dir().join(unique("sqlam"));
    fs::create_dir_all(&src).expect("sqla dir");
    run_ok(
        Command::new("tar")
            .args(["xzf", SQLALCHEMY_SDIST, "--strip-components=1", "-C"])
            .arg(&src),
    );
    let (dp, df) = sqlalchemy(&s, Via::Direct, &src);
    let (mp, mf) = sqlalchemy(&s, Via::Portcullis, &src);
    let _ = fs::remove_dir_all(&src);
    // `PORTCULLIS_COMPAT_SQLA_LOG=FILE`: the server's statement log, kept.
    if let Ok(keep) = std::env::var("PORTCULLIS_COMPAT_SQLA_LOG") {
        let _ = fs::write(keep, s.pg.server_log());
    }
    // The daemon's refusals, each with its reason and statement.
    for e in audit_tail(&s.files)
        .iter()
        .filter(|e| e["decision"] == "deny")
    {
        println!(
            "sqlalchemy refused: {} <= {}",
            e["reason"].as_str().unwrap_or_default(),
            e["detail"]["command"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect::<String>()
        );
    }
    println!(
        "COMPAT sqlalchemy direct: {dp} passed, {} failed; with a masking policy: {mp} passed, {} failed",
        df.len(),
        mf.len()
    );
    assert!(dp > 0, "the suite did not run");
    // The differences left on purpose (docs/compatibility.md, "Differences
    // left"): each such test must fail through Portcullis for that reason
    // only; every other test must behave as directly.
    let on_purpose: Vec<_> = REFUSED_ON_PURPOSE
        .iter()
        .chain(MASKED_ON_PURPOSE)
        .copied()
        .collect();
    let (dp, mf) = set_aside_on_purpose(dp, &df, &mf, &on_purpose);
    assert_same_tests((dp, &df), (mp, &mf), "with a masking policy");
}

/// SQLAlchemy's tests that fail through a masked resource on purpose:
/// (file, `::test`, why).
const MASKED_ON_PURPOSE: &[(&str, &str, &str)] = &[
    (
        "test_dialect.py",
        "::test_ensure_version_is_qualified",
        "CREATE FUNCTION public.version(): user code is refused on a masked resource",
    ),
    (
        "test_dialect.py",
        "::test_notice_logging",
        "CREATE FUNCTION note(): user code is refused on a masked resource",
    ),
    (
        "test_reflection.py",
        "::test_reflect_check_constraint",
        "CREATE FUNCTION is_positive(): user code is refused on a masked resource",
    ),
];

/// SQLAlchemy's tests that fail through Portcullis on purpose on every
/// resource, masked or not: (file, `::test`, why).
const REFUSED_ON_PURPOSE: &[(&str, &str, &str)] = &[(
    "test_dialect.py",
    "::test_client_encoding",
    "client_encoding LATIN1: only UTF8 is accepted through Portcullis",
)];

/// Runs SQL steps in order on one psycopg connection (a transaction
/// unless a step says `commit`/`rollback`); each step's rows as text, or
/// its error's SQLSTATE and message. Extended protocol (`execute` with
/// parameters), as SQLAlchemy and most drivers send statements.
const STEPS: &str = r#"
import json, sys
import psycopg
a = json.loads(sys.argv[1])
out = []
with psycopg.connect(a["dsn"]) as c:
    for sql in a["steps"]:
        if sql == "commit":
            c.commit(); out.append("committed"); continue
        if sql == "rollback":
            c.rollback(); out.append("rolled back"); continue
        try:
            cur = c.execute(sql, ())
            rows = cur.fetchall() if cur.description else cur.statusmessage
            out.append(rows if isinstance(rows, str) else [[str(v) for v in r] for r in rows])
        except psycopg.Error as e:
            out.append({"error": e.sqlstate, "message": str(e).splitlines()[0][:160]})
            c.rollback()
print(json.dumps(out))
"#;

impl Pg {
    fn steps(&self, via: Via, steps: &[&str]) -> Value {
        self.python(
            via,
            STEPS,
            json!({"dsn": self.conninfo(via, "postgres", "sslmode=disable"), "steps": steps}),
        )
    }
}

/// A masked session reads the tables it created in its open transaction
/// as directly (issue 19: they came back all `[MASKED]`, and the catalog
/// checks refused every statement after the DDL); a new table named in a
/// rule is masked per its rule; what a rolled-back transaction created is
/// never used afterwards; the masking checks still hold inside such a
/// transaction (a partition of a masked table).
#[test]
fn compat_pg_masked_session_reads_tables_of_its_own_transaction() {
    let s = setup(
        "cpgowntx",
        "",
        "[[mask]]\nresource = \"pg\"\ncolumns = [\"secrets.ssn\", \"newsec.secret\", \"keep.secret\"]\nstyle = \"redact\"\n",
        &[],
    );
    s.pg.sql(
        "create table secrets(id int, ssn text) partition by list (id);
         create table secrets_p1 partition of secrets for values in (1);
         insert into secrets values (1, '123-45-6789');
         create table keep(id int); insert into keep values (1);",
    );
    let same = [
        "create table t_new (id int, name text, n int)",
        "insert into t_new values (1, 'a', 5)",
        "select * from t_new",
        "select name, n + 1 from t_new where id = 1 order by n",
        "alter table t_new add column extra text default 'e'",
        "select * from t_new",
        "commit",
        "select * from t_new",
        "alter table keep add column note text",
        "update keep set note = 'visible'",
        "select * from keep",
        "rollback",
        "select * from keep",
        "drop table t_new",
        "commit",
    ];
    let direct = s.steps(Via::Direct, &same);
    let proxied = s.steps(Via::Portcullis, &same);
    assert_eq!(direct, proxied, "a session's own tables read differently");
    assert_eq!(direct[2], json!([["1", "a", "5"]]), "{direct}");
    // Masked per rule, and the checks still see the session's catalog.
    let got = s.steps(
        Via::Portcullis,
        &[
            "create table newsec (id int, secret text)",
            "insert into newsec values (1, 's3cret')",
            "select * from newsec",
            "select upper(secret) from newsec",
            "create table junk (x int)",
            "select * from secrets_p1",
            "select upper(ssn) from secrets_p1",
            "rollback",
            // After the rollback: the column added here gets the attribute
            // number the rolled-back `note` had.
            "alter table keep add column secret text",
            "update keep set secret = 'hidden'",
            "commit",
            "select * from keep",
        ],
    );
    println!("{got}");
    assert_eq!(got[2], json!([["1", "[MASKED]"]]), "{got}");
    assert_eq!(got[3]["error"], json!("42501"), "{got}");
    // The failed statement rolled the transaction back: `junk` is created
    // in a new one, and the partition of a masked table is masked.
    assert_eq!(got[5], json!([["1", "[MASKED]"]]), "{got}");
    assert_eq!(got[6]["error"], json!("42501"), "{got}");
    assert_eq!(got[11], json!([["1", "[MASKED]"]]), "{got}");
}

/// On a resource with column rules, `CREATE EXTENSION` of an installed
/// extension (SQLAlchemy's test provisioning) and the functions of
/// extensions that compute from their arguments only (hstore, citext)
/// work as directly; installing a new extension and the whole-row hstore
/// of a masked table are still refused.
#[test]
fn compat_pg_masked_resource_allows_installed_extensions() {
    let s = setup(
        "cpgext",
        "",
        "[[mask]]\nresource = \"pg\"\ncolumns = [\"secrets.ssn\"]\nstyle = \"redact\"\n",
        &[],
    );
    s.pg.sql(
        "create extension hstore; create extension citext;
         create table secrets(id int, ssn text); insert into secrets values (1, 'x');",
    );
    let same = [
        "create extension if not exists citext",
        "create extension if not exists hstore",
        "commit",
        "select akeys('a=>1,b=>2'::hstore), 'AbC'::citext = 'abc'",
        "select hstore(array['k'], array['v']) -> 'k'",
        "select id from secrets",
    ];
    let direct = s.steps(Via::Direct, &same);
    let proxied = s.steps(Via::Portcullis, &same);
    assert_eq!(direct, proxied, "installed extensions differ");
    let got = s.steps(
        Via::Portcullis,
        &[
            "create extension if not exists pg_trgm",
            "select hstore(s) from secrets s",
            "select akeys(hstore(s)) from secrets s",
        ],
    );
    for (i, step) in got.as_array().expect("steps").iter().enumerate() {
        assert_eq!(step["error"], json!("42501"), "step {i}: {got}");
    }
    assert!(
        got[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not installed")),
        "{got}"
    );
}

/// Like [`STEPS`], each step `[sql, params, prepare]`: `prepare` true
/// sends a named prepared statement (psycopg `prepare=True`), false the
/// unnamed one; `rollback` is psycopg's simple-query ROLLBACK;
/// `[sql, [params, ...], false, "many"]` is an `executemany` (one pipeline
/// up to its Sync), `["pipeline", [sql, ...]]` statements in one pipeline.
const PREPARED_STEPS: &str = r#"
import json, sys
import psycopg
a = json.loads(sys.argv[1])
out = []
with psycopg.connect(a["dsn"]) as c:
    for step in a["steps"]:
        sql, params = step[0], step[1]
        if sql == "rollback":
            c.rollback(); out.append("rolled back"); continue
        try:
            if sql == "pipeline":
                with c.pipeline():
                    curs = [c.execute(q) for q in params]
                out.append([cur.statusmessage for cur in curs]); continue
            if len(step) > 3:
                cur = c.cursor()
                cur.executemany(sql, params)
                out.append(cur.rowcount); continue
            cur = c.execute(sql, params, prepare=step[2])
            rows = cur.fetchall() if cur.description else cur.statusmessage
            out.append(rows if isinstance(rows, str) else [[str(v) for v in r] for r in rows])
        except psycopg.Error as e:
            out.append({"error": e.sqlstate, "message": str(e).splitlines()[0][:160]})
            c.rollback()
print(json.dumps(out))
"#;

/// What SQLAlchemy's suite found with a masking rule naming none of its
/// tables (docs/compatibility.md): a catalog lookup on the session's own
/// connection parsed the agent's unnamed statement again although a
/// simple query had dropped it, and a stale one (a table of a rolled-back
/// transaction) failed and aborted the agent's transaction; and an
/// operator of an installed extension (citext's and hstore's `=`) counted
/// as user code that may change the catalog, which dropped what the own
/// connection had named, so a table of the open transaction came back all
/// `[MASKED]`. A user-defined `=` is still refused.
#[test]
fn compat_pg_masked_session_survives_stale_unnamed_statements_and_extension_operators() {
    let s = setup(
        "cpgstale",
        "",
        "[[mask]]\nresource = \"pg\"\ncolumns = [\"portcullis_secrets.ssn\"]\nstyle = \"redact\"\n",
        &[],
    );
    s.pg.sql("create extension hstore; create extension citext;");
    let steps = json!([
        ["create table t_gone (id int)", [], false],
        ["insert into t_gone values (%s)", [1], false],
        // ROLLBACK and BEGIN are simple queries: the server drops the
        // unnamed `insert into t_gone`, whose table no longer exists.
        ["rollback", [], false],
        ["create table t_here (id int, name varchar(20))", [], true],
        ["insert into t_here values (%s, %s)", [1, "a"], true],
        ["select id, name from t_here where name = %s", ["a"], true],
        ["select id, name from t_here where name = %s", ["a"], false],
        [
            "select t_here.id, t_here.name from t_here where t_here.name = %s order by t_here.id",
            ["a"],
            false
        ],
        ["rollback", [], false],
    ]);
    // On their own (a new connection, no stale statement): a table of the
    // open transaction read with citext's and hstore's `=` in scope.
    let operators = json!([
        ["create table t_op (id int, name varchar(20))", [], false],
        ["insert into t_op values (%s, %s)", [2, "b"], false],
        ["select id, name from t_op where name = %s", ["b"], false],
        // A collation runs no code of the agent's (SQLAlchemy's collation
        // reflection tests create one).
        [
            "create collation portcullis_c (locale = 'C.utf8')",
            [],
            false
        ],
        // A cast to an enum array runs no user code (SQLAlchemy's
        // `ArrayEnum` tests): the table stays named for masking.
        ["create type portcullis_mood as enum ('a', 'b')", [], false],
        [
            "create table t_enum (id int, m portcullis_mood[])",
            [],
            false
        ],
        [
            "insert into t_enum values (%s, %s::portcullis_mood[])",
            [1, "{a,b}"],
            false
        ],
        [
            "select id, m from t_enum where m in (%s::portcullis_mood[]) order by id",
            ["{a,b}"],
            false
        ],
        // An executemany is one pipeline: its later statements cannot ask
        // the own connection, and reuse its answer to the first (SQLAlchemy's
        // `ArrayJSON` tests; 70000 is an int4 after two int2: psycopg parses
        // the statement again inside the pipeline).
        [
            "insert into t_op values (%s, %s)",
            [[3, "c"], [4, "d"], [70000, "e"]],
            false,
            "many"
        ],
        ["select count(*) from t_op", [], false],
        ["rollback", [], false],
    ]);
    let run = |via: Via, steps: &Value| {
        s.python(
            via,
            PREPARED_STEPS,
            json!({"dsn": s.conninfo(via, "postgres", "sslmode=disable"), "steps": steps}),
        )
    };
    let direct = run(Via::Direct, &steps);
    let proxied = run(Via::Portcullis, &steps);
    assert_eq!(direct, proxied, "differs through Portcullis");
    assert_eq!(direct[4], json!("INSERT 0 1"), "{direct}");
    assert_eq!(direct[5], json!([["1", "a"]]), "{direct}");
    let direct = run(Via::Direct, &operators);
    let proxied = run(Via::Portcullis, &operators);
    assert_eq!(direct, proxied, "differs through Portcullis");
    assert_eq!(direct[2], json!([["2", "b"]]), "{direct}");
    assert_eq!(direct[3], json!("CREATE COLLATION"), "{direct}");
    assert_eq!(direct[7], json!([["1", "{a,b}"]]), "{direct}");
    assert_eq!(direct[9], json!([["4"]]), "{direct}");
    // Hostile: a catalog change earlier in the same pipeline ends what
    // the own connection answered; the statement after it in that
    // pipeline is still refused (the catalog it reads cannot be asked).
    let got = s.python(
        Via::Portcullis,
        PREPARED_STEPS,
        json!({"dsn": s.conninfo(Via::Portcullis, "postgres", "sslmode=disable"),
               "steps": [["create table t_p1 (id int)", [], false],
                         ["insert into t_p1 values (1)", [], false],
                         ["pipeline", ["alter table t_p1 add column x int", "select id, x from t_p1"]]]}),
    );
    assert_eq!(got[1], json!("INSERT 0 1"), "{got}");
    assert_eq!(got[2]["error"], json!("42501"), "{got}");
    // Hostile: a user's own `=` for text, not of any extension, runs user
    // code where no statement analysis sees it: still refused.
    s.pg.sql(
        "create table t_user (id int, name text); insert into t_user values (1, 'a');
         create function public.my_texteq(text, text) returns bool language sql immutable as 'select $1 = $2';
         create operator public.= (leftarg = text, rightarg = text, function = public.my_texteq);",
    );
    let got = s.python(
        Via::Portcullis,
        PREPARED_STEPS,
        json!({"dsn": s.conninfo(Via::Portcullis, "postgres", "sslmode=disable"),
               "steps": [["select id from t_user where name = %s", ["a"], false],
                         // Other DefineStmt kinds name code the server runs.
                         ["create aggregate my_sum (int) (sfunc = int4pl, stype = int)", [], false]]}),
    );
    assert_eq!(got[1]["error"], json!("42501"), "{got}");
    assert_eq!(got[0]["error"], json!("42501"), "{got}");
    assert!(
        got[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("operator")),
        "{got}"
    );
}
