//! Column masking on PostgreSQL cannot be walked around (issue 14, item 3):
//! aliases, expressions, aggregates, subqueries, CTEs, views, whole-row
//! references, user functions, statistics and predicates on masked
//! columns, each tried with real psql (and psycopg for the extended
//! protocol) through the real daemon against a real PostgreSQL 15. Every
//! bypass is first shown to leak when run directly against the server, so
//! the refusal is what keeps the value out.

use std::{process::Command, thread, time::Duration};

use serde_json::{json, Value};

use crate::harness::*;

const RULES: &str = r#"
@id("pg-all")
permit(principal, action in [Action::"postgres:select", Action::"postgres:insert", Action::"postgres:update", Action::"postgres:ddl", Action::"postgres:transaction", Action::"postgres:set", Action::"postgres:show"], resource);
"#;

const MASK: &str = "[[mask]]\nresource = \"pg\"\ncolumns = [\"customers.ssn\", \"customers.card\", \"customers.email\", \"customers.name\"]\ndetectors = [\"credit_card\", \"email\"]\nstyle = \"redact\"\n";

const SSN: &str = "123-45-6789";
const CARD: &str = "4111 1111 1111 1111";

struct S {
    _cg: TestCgroup,
    pg: PgServer,
    files: DaemonFiles,
    daemon: Daemon,
    agent: Placement,
}

fn setup(name: &str, mask: &str) -> S {
    require_root();
    let cg = TestCgroup::new(name);
    let pg = PgServer::start(name);
    pg.sql(
        "create table customers(id int primary key, name text not null, email text, card text, ssn text);
         insert into customers values
           (1, 'alice', 'alice@example.com', '4111 1111 1111 1111', '123-45-6789'),
           (2, 'bob', 'bob@example.org', '5500 0000 0000 0004', '987-65-4321');
         create table leak(v text);
         create view customers_v as select id, ssn from customers;
         create view customers_vv as select * from customers_v;
         create view ids_v as select id from customers;
         create function peek() returns text language sql as $$ select string_agg(ssn, ',') from customers $$;
         create operator ### (leftarg = int, rightarg = int, function = int4pl);
         analyze customers;",
    );
    let files = DaemonFiles::new(&cg.rel);
    files.identities(IDENTITIES);
    files.rules("pg.cedar", RULES);
    std::fs::write(
        files.policies.join("pg.toml"),
        format!(
            "[resource.pg]\nprotocol = \"postgres\"\nmatch = [\"{}\"]\ncredentials = {{ user = \"postgres\", password_file = {:?} }}\nupstream_tls = \"prefer\"\n\n{mask}",
            pg.addr(),
            pg.password_file.display().to_string()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&files);
    let agent_cg = cg.child("agent");
    daemon.tag(&agent_cg, "agent");
    S {
        agent: Placement::cgroup(cg.dir(&agent_cg)),
        _cg: cg,
        pg,
        files,
        daemon,
    }
}

impl S {
    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=agent dbname=postgres sslmode=disable connect_timeout=10",
            self.pg.port
        )
    }

    /// psql as the agent through the daemon: (success, stdout, stderr).
    fn psql(&self, sql: &str) -> (bool, String, String) {
        let mut cmd = Command::new("psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-w",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            "VERBOSITY=verbose",
        ])
        .arg(self.conninfo())
        .args(["-c", sql])
        .env_remove("PGPASSWORD");
        self.agent.apply(&mut cmd);
        let out = cmd.output().expect("psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// How often the server itself read `customers` (sequential and index
    /// scans), from its own statistics.
    fn customer_reads(&self) -> u64 {
        // Backends flush their counters when they exit; give the last
        // session's backend time to do so.
        thread::sleep(Duration::from_millis(1500));
        self.pg
            .sql("select coalesce(seq_scan, 0) + coalesce(idx_scan, 0) from pg_stat_user_tables where relname = 'customers'")
            .trim()
            .parse()
            .expect("scan count")
    }
}

#[test]
fn masked_columns_cannot_be_read_through_aliases_expressions_views_or_predicates() {
    let s = setup("soundmask", MASK);

    // Controls: the legitimate forms work, and come back masked.
    for (sql, expect) in [
        (
            "select ssn from customers order by id",
            "[MASKED]\n[MASKED]",
        ),
        (
            "select ssn as x from customers order by id",
            "[MASKED]\n[MASKED]",
        ),
        (
            "select c.card as y from customers c order by c.id",
            "[MASKED]\n[MASKED]",
        ),
        (
            "select * from customers order by id",
            "1|[MASKED]|[MASKED]|[MASKED]|[MASKED]\n2|[MASKED]|[MASKED]|[MASKED]|[MASKED]",
        ),
        ("select id, name from customers where id = 1", "1|[MASKED]"),
        (
            "table customers limit 1",
            "1|[MASKED]|[MASKED]|[MASKED]|[MASKED]",
        ),
    ] {
        let (ok, out, err) = s.psql(sql);
        assert!(ok, "{sql}: {err}\n{}", s.daemon.log_text());
        assert_eq!(out.trim(), expect, "{sql}");
    }
    // psql's own catalog queries keep working.
    for meta in ["\\d customers", "\\dv", "\\df"] {
        let (ok, out, err) = s.psql(meta);
        assert!(ok, "{meta}: {err}\n{}", s.daemon.log_text());
        assert!(!out.contains(SSN), "{out}");
    }
    let (ok, out, err) = s.psql("update customers set id = id where id = 1 returning ssn, name");
    assert!(ok, "{err}");
    assert!(
        out.contains("[MASKED]|[MASKED]") && !out.contains(SSN),
        "{out}"
    );

    // Each bypass: (statement, what it reveals when run directly).
    let bypasses: &[(&str, Option<&str>)] = &[
        ("select upper(name) from customers", Some("ALICE")),
        ("select name || '' from customers", Some("alice")),
        ("select (select string_agg(name, ',' order by id) from customers)", Some("alice,bob")),
        ("select reverse(card) from customers", Some("1111 1111 1111 1114")),
        (
            "select encode(convert_to(card, 'UTF8'), 'base64') from customers",
            Some("NDExMSAxMTExIDExMTEgMTExMQ=="),
        ),
        ("select replace(email, '@', ' at ') from customers", Some("alice at example.com")),
        ("select * from customers_v", Some(SSN)),
        ("select id from customers_vv", None),
        ("with c as (select ssn from customers) select * from c", Some(SSN)),
        ("with c as (select * from customers) select ssn from c", Some(SSN)),
        ("select ssn from customers union all select 'x'", Some(SSN)),
        ("select ssn::text from customers", Some(SSN)),
        ("select row_to_json(c) from customers c", Some(SSN)),
        ("select c.row_to_json from customers c", Some(SSN)),
        ("select to_jsonb(customers) from customers", Some(SSN)),
        ("select peek()", Some(SSN)),
        ("select id ### 1 from customers", None),
        (
            "select histogram_bounds::text from pg_stats where tablename = 'customers' and attname = 'ssn'",
            Some(SSN),
        ),
        ("select id from customers where ssn like '1%'", None),
        ("select id from customers order by ssn", None),
        ("select ssn as k from customers order by k", None),
        ("insert into leak select ssn from customers", None),
        ("create table leak2 as select * from customers", None),
    ];
    // The bypasses are real: run directly, each reveals the value.
    for (sql, leak) in bypasses {
        if let Some(leak) = leak {
            let direct = s.pg.sql(sql);
            assert!(direct.contains(leak), "{sql} directly: {direct}");
        }
    }
    s.pg.sql("truncate leak; drop table if exists leak2");

    let before = s.customer_reads();
    for (sql, leak) in bypasses {
        let (ok, out, err) = s.psql(sql);
        assert!(!ok, "{sql} was not refused: {out}");
        assert!(
            err.contains("42501") && err.contains("Portcullis"),
            "{sql}: {err}"
        );
        for secret in [Some(SSN), Some(CARD), *leak].into_iter().flatten() {
            assert!(
                !out.contains(secret) && !err.contains(secret),
                "{sql} revealed {secret}: {out}{err}"
            );
        }
    }
    // The server never ran them: no read of customers, nothing copied.
    assert_eq!(
        s.customer_reads(),
        before,
        "a refused statement reached the server"
    );
    assert_eq!(s.pg.sql("select count(*) from leak").trim(), "0");
    assert_eq!(
        s.pg.sql("select count(*) from pg_class where relname = 'leak2'")
            .trim(),
        "0"
    );
    // Each refusal is audited as a deny naming why.
    let events = audit_tail(&s.files);
    for (sql, _) in bypasses {
        assert!(
            events.iter().any(|e| e["decision"] == "deny"
                && e["detail"]["command"].as_str() == Some(*sql)
                && e["reason"].as_str().is_some_and(|r| !r.is_empty())),
            "no deny audited for {sql}"
        );
    }
    let why = events
        .iter()
        .find(|e| e["detail"]["command"] == "select id from customers where ssn like '1%'")
        .and_then(|e| e["reason"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(why.contains("\"ssn\"") && why.contains("WHERE"), "{why}");

    // An error's DETAIL can quote the row: it is dropped.
    let direct =
        s.pg.psql_direct("update customers set name = null where id = 1")
            .unwrap_err();
    assert!(
        direct.contains(SSN),
        "the server's own error quotes the row: {direct}"
    );
    let (ok, out, err) = s.psql("update customers set name = null where id = 1");
    assert!(!ok && err.contains("23502"), "{out}{err}");
    assert!(!err.contains(SSN) && !err.contains(CARD), "{err}");

    // The extended protocol (psycopg, server-side parameters) is held to
    // the same rules.
    let mut spec = json!({"steps": [
        {"sql": "select upper(ssn) from customers where id = %s", "params": [1]},
        {"sql": "select ssn as x, name from customers where id = %s", "params": [1]},
        {"sql": "select id from customers where ssn = %s", "params": [SSN]},
    ]});
    spec["conninfo"] = json!(s.conninfo());
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg("-c")
        .arg(include_str!("pg_client.py"))
        .arg(spec.to_string());
    s.agent.apply(&mut cmd);
    let out = cmd.output().expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    let r: Vec<Value> = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "client output ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(r[0]["error"], "42501", "{r:?}");
    assert_eq!(r[1]["rows"], json!([["[MASKED]", "[MASKED]"]]), "{r:?}");
    assert_eq!(r[2]["error"], "42501", "{r:?}");
    assert!(!text.contains(SSN), "{text}");
}

#[test]
fn a_view_named_in_a_column_rule_is_readable_and_masked() {
    let s = setup(
        "maskview",
        "[[mask]]\nresource = \"pg\"\ncolumns = [\"customers.ssn\", \"customers_v.ssn\"]\nstyle = \"redact\"\n",
    );
    let (ok, out, err) = s.psql("select * from customers_v order by id");
    assert!(ok, "{err}\n{}", s.daemon.log_text());
    assert_eq!(out.trim(), "1|[MASKED]\n2|[MASKED]");
    let (ok, out, err) = s.psql("select ssn as x from customers_v order by id");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "[MASKED]\n[MASKED]");
    // A view over it that no rule names is refused; so is an expression
    // on the view's masked column.
    for sql in [
        "select * from customers_vv",
        "select upper(ssn) from customers_v",
    ] {
        let (ok, out, err) = s.psql(sql);
        assert!(!ok && err.contains("42501"), "{sql}: {out}{err}");
        assert!(
            !out.contains(SSN) && !err.contains(SSN),
            "{sql}: {out}{err}"
        );
    }
}

#[test]
fn a_partition_of_a_masked_table_is_masked_like_it() {
    let s = setup(
        "maskpart",
        "[[mask]]\nresource = \"pg\"\ncolumns = [\"accounts.ssn\"]\nstyle = \"redact\"\n",
    );
    s.pg.sql(
        "create table accounts(id int, ssn text) partition by range (id);
         create table accounts_p1 partition of accounts for values from (0) to (100);
         insert into accounts values (1, '123-45-6789');",
    );
    assert!(s.pg.sql("select upper(ssn) from accounts_p1").contains(SSN));
    for sql in [
        "select ssn from accounts",
        "select ssn as x from accounts_p1",
    ] {
        let (ok, out, err) = s.psql(sql);
        assert!(ok, "{sql}: {err}\n{}", s.daemon.log_text());
        assert_eq!(out.trim(), "[MASKED]", "{sql}");
    }
    for sql in [
        "select upper(ssn) from accounts_p1",
        "select id from accounts_p1 where ssn like '1%'",
        "select row_to_json(a) from accounts_p1 a",
    ] {
        let (ok, out, err) = s.psql(sql);
        assert!(!ok && err.contains("42501"), "{sql}: {out}{err}");
        assert!(
            !out.contains(SSN) && !err.contains(SSN),
            "{sql}: {out}{err}"
        );
    }
}
