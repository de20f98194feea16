//! Issue 14, PostgreSQL items 1, 5 and 6, against a real PostgreSQL 15
//! with `log_statement = all`: what the server logged it ran is compared
//! with what the audit log says was allowed.
//!
//! 1. The session's client encoding is pinned to UTF8: a GBK agent cannot
//!    make the server read a statement the parser never saw.
//! 5. `has_where` is true only when every modifying node has a WHERE.
//! 6. A read that calls a routine with side effects is `postgres:function`.

use std::process::Command;

use serde_json::Value;

use crate::harness::*;

struct Pg {
    _cg: TestCgroup,
    pg: PgServer,
    files: DaemonFiles,
    daemon: Daemon,
    agent: Placement,
    /// Server log statements of the setup (not the agent's).
    skip: usize,
}

fn setup(name: &str, rules: &str, schema: &str) -> Pg {
    setup_with(name, rules, schema, "")
}

/// `extra`: more of the resource file (`[[mask]]` tables).
fn setup_with(name: &str, rules: &str, schema: &str, extra: &str) -> Pg {
    require_root();
    let cg = TestCgroup::new(name);
    let pg = PgServer::start(name);
    pg.sql(schema);
    let skip = pg.logged_statements().len();
    let files = DaemonFiles::new(&cg.rel);
    files.identities(IDENTITIES);
    files.rules("pg.cedar", rules);
    std::fs::write(
        files.policies.join("pg.toml"),
        format!(
            "[resource.pg]\nprotocol = \"postgres\"\nmatch = [\"{}\"]\ncredentials = {{ user = \"postgres\", password_file = {:?} }}\nupstream_tls = \"disable\"\n\n{extra}",
            pg.addr(),
            pg.password_file.display().to_string()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&files);
    let agent_cg = cg.child("agent");
    daemon.tag(&agent_cg, "agent");
    Pg {
        agent: Placement::cgroup(cg.dir(&agent_cg)),
        _cg: cg,
        skip,
        pg,
        files,
        daemon,
    }
}

impl Pg {
    /// psql as the agent with extra environment: (success, stdout, stderr).
    fn psql(&self, env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
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
        .arg(format!(
            "host=127.0.0.1 port={} user=agent dbname=postgres sslmode=disable connect_timeout=10",
            self.pg.port
        ))
        .args(args)
        .env_remove("PGPASSWORD")
        .env_remove("PGCLIENTENCODING")
        .env_remove("PGOPTIONS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.agent.apply(&mut cmd);
        let out = cmd.output().expect("psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        audit_tail(&self.files)
            .into_iter()
            .filter(|e| e["type"] == kind)
            .collect()
    }

    /// Statements the server logged since setup.
    fn agent_statements(&self) -> Vec<String> {
        self.pg
            .logged_statements()
            .into_iter()
            .skip(self.skip)
            .collect()
    }

    /// Statements the server logged since setup that contain `needle`
    /// (any case).
    fn server_ran(&self, needle: &str) -> Vec<String> {
        let n = needle.to_lowercase();
        self.agent_statements()
            .into_iter()
            .filter(|s| s.to_lowercase().contains(&n))
            .collect()
    }

    fn count(&self, table: &str) -> String {
        self.pg
            .sql(&format!("select count(*) from {table}"))
            .trim()
            .to_string()
    }
}

const ORDERS: &str = "create table orders(id int primary key, total int);
     insert into orders select g, g * 10 from generate_series(1, 10) g;";

/// The statement from the issue: one SELECT read as UTF-8; under GBK the
/// bytes `AD 5C` (the end of 中 and the backslash) are one character, the
/// literal ends early and the DELETE runs.
const GBK_ATTACK: &str = "SELECT E'中\\' ; DELETE FROM orders; --'";

#[test]
fn pg_sound_client_encoding_is_pinned_and_the_gbk_attack_is_refused() {
    let s = setup(
        "pgenc",
        r#"
@id("pg-read")
permit(principal, action in [Action::"postgres:select", Action::"postgres:transaction", Action::"postgres:set", Action::"postgres:show"], resource);
@id("no-delete")
forbid(principal, action == Action::"postgres:delete", resource);
@id("f-enc")
permit(principal, action == Action::"postgres:function", resource)
  when { context.statement.volatile_functions == ["f_enc"] };
"#,
        &format!(
            "{ORDERS}
             create function f_enc() returns text language sql
               as $$ select pg_catalog.set_config('client_encoding', 'GBK', false) $$;"
        ),
    );
    // The attack: refused at startup, nothing reaches the server.
    let (ok, out, err) = s.psql(&[("PGCLIENTENCODING", "GBK")], &["-c", GBK_ATTACK]);
    assert!(!ok, "GBK session must be refused: {out}");
    assert!(
        err.contains("FATAL") && err.contains("client_encoding") && err.contains("GBK"),
        "{err}\n{}",
        s.daemon.log_text()
    );
    assert_eq!(s.count("orders"), "10");
    assert!(s.server_ran("delete").is_empty(), "{}", s.pg.server_log());
    let refusals = s.events("postgres_startup");
    assert!(
        refusals
            .iter()
            .any(|e| e["decision"] == "deny" && e["reason"].as_str().unwrap_or("").contains("GBK")),
        "{refusals:#?}"
    );
    // Every way to ask for it in the startup packet's options.
    for opts in [
        "-c client_encoding=GBK",
        "--client-encoding=SJIS",
        "-c CLIENT_ENCODING=BIG5",
        "-c search_path=public -c client\\_encoding=GBK",
    ] {
        let (ok, _, err) = s.psql(&[("PGOPTIONS", opts)], &["-c", GBK_ATTACK]);
        assert!(!ok, "{opts}");
        assert!(err.contains("client_encoding"), "{opts}: {err}");
    }
    assert_eq!(s.count("orders"), "10");
    assert!(s.server_ran("delete").is_empty(), "{}", s.pg.server_log());

    // Control: a UTF-8 session reads the same text as one SELECT, as the
    // server does, and it runs.
    for enc in ["UTF8", "utf-8", "unicode"] {
        let (ok, out, err) = s.psql(&[("PGCLIENTENCODING", enc)], &["-c", GBK_ATTACK]);
        assert!(ok, "{enc}: {err}\n{}", s.daemon.log_text());
        assert_eq!(out.trim(), "中' ; DELETE FROM orders; --", "{enc}");
    }
    assert_eq!(s.count("orders"), "10");
    // The server logged it as the one SELECT the audit allowed.
    let ran = s.server_ran("delete from orders");
    assert!(
        !ran.is_empty() && ran.iter().all(|r| r.starts_with("SELECT E'")),
        "{ran:?}"
    );
    // No client_encoding at all: pinned to UTF8 upstream.
    let (ok, out, err) = s.psql(&[], &["-c", "show client_encoding"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "UTF8");

    // In a statement: SET, SET NAMES, RESET, set_config, pg_settings.
    for sql in [
        "set client_encoding = 'GBK'",
        "SET NAMES 'SJIS'",
        "set session client_encoding to 'BIG5'",
        "reset client_encoding",
        "select set_config('client_encoding', 'GBK', false)",
        "update pg_settings set setting = 'GBK' where name = 'client_encoding'",
    ] {
        let (ok, _, err) = s.psql(&[], &["-c", sql, "-c", "show client_encoding"]);
        assert!(!ok, "{sql}");
        assert!(
            err.contains("42501") && err.contains("client_encoding"),
            "{sql}: {err}"
        );
    }
    for bad in ["GBK", "SJIS", "BIG5", "reset client_encoding"] {
        assert!(s.server_ran(bad).is_empty(), "{bad}: {}", s.pg.server_log());
    }
    // A routine the parser cannot see into changes it anyway: the server's
    // ParameterStatus ends the session before anything else runs.
    let (ok, _, err) = s.psql(
        &[],
        &["-c", "select f_enc()", "-c", "select 'after the switch'"],
    );
    assert!(!ok);
    assert!(
        err.contains("client_encoding") && err.contains("GBK"),
        "{err}\n{}",
        s.daemon.log_text()
    );
    assert!(
        s.server_ran("after the switch").is_empty(),
        "{}",
        s.pg.server_log()
    );
    let ended = s.events("postgres_encoding");
    assert!(ended.iter().any(|e| e["decision"] == "deny"), "{ended:#?}");
    // RESET ALL goes back to the startup value, UTF8.
    let (ok, out, err) = s.psql(&[], &["-c", "reset all", "-c", "show client_encoding"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim().lines().last(), Some("UTF8"), "{out}");
}

#[test]
fn pg_sound_has_where_covers_every_modifying_node() {
    let s = setup(
        "pgwhere",
        r#"
@id("pg-read")
permit(principal, action in [Action::"postgres:select", Action::"postgres:delete"], resource);
@id("no-unbounded-delete")
@reason("DELETE needs a WHERE clause")
forbid(principal, action == Action::"postgres:delete", resource)
  unless { context.statement.has_where };
"#,
        ORDERS,
    );
    let attack = "with d as (delete from orders returning 1) delete from orders where id = -1";
    let (ok, _, err) = s.psql(&[], &["-c", attack]);
    assert!(!ok);
    assert!(
        err.contains("42501") && err.contains("DELETE needs a WHERE clause"),
        "{err}"
    );
    assert_eq!(s.count("orders"), "10");
    assert!(
        s.server_ran("delete from orders").is_empty(),
        "{}",
        s.pg.server_log()
    );
    let denied = s.events("command");
    assert!(
        denied
            .iter()
            .any(|e| e["action"] == "postgres:delete" && e["decision"] == "deny"),
        "{denied:#?}"
    );
    // Control: bounded deletes (also through a CTE) run.
    let (ok, out, err) = s.psql(
        &[],
        &[
            "-c",
            "delete from orders where id = 1",
            "-c",
            "with d as (delete from orders where id = 2 returning 1) delete from orders where id = 3",
            "-c",
            "select count(*) from orders",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.trim().ends_with("7"), "{out}");
    assert_eq!(s.server_ran("delete from orders").len(), 2);
}

#[test]
fn pg_sound_reads_that_run_routines_with_side_effects_are_not_select() {
    let s = setup_with(
        "pgfunc",
        r#"
@id("pg-read")
permit(principal, action == Action::"postgres:select", resource);
@id("f-ok-only")
permit(principal, action == Action::"postgres:function", resource)
  when { context.statement.volatile_functions == ["f_ok"] };
"#,
        "create sequence s;
         create table t(a int); insert into t values (1), (2);
         create table audit_t(x int);
         create function f_ins() returns int language sql as 'insert into audit_t values (1) returning 1';
         create function f_ok() returns int language sql as 'select 42';
         create function public.lower(int) returns int language sql as 'insert into audit_t values (2) returning 1';
         create table people(name text, secret text); insert into people values ('ann', 'plaintext-secret');",
        "",
    );
    for sql in [
        "select pg_read_file('/etc/hostname')",
        "select * from pg_ls_dir('.')",
        "select set_config('search_path', 'public', false)",
        "select nextval('s')",
        "select f_ins()",
        "select lower(1)",
        "select lo_import('/etc/hostname')",
        "select pg_advisory_lock(1)",
        "select query_to_xml('select 1', true, true, '')",
        "select f_ok(), f_ins()",
        "select count(*) from t where a = (select f_ins())",
        "explain select f_ins()",
        "copy (select nextval('s')) to stdout",
    ] {
        let (ok, _, err) = s.psql(&[], &["-c", sql]);
        assert!(!ok, "{sql} must be refused");
        assert!(
            err.contains("42501"),
            "{sql}: {err}\n{}",
            s.daemon.log_text()
        );
    }
    // set_config of the encoding is refused by the encoding rule.
    let (ok, _, err) = s.psql(
        &[],
        &["-c", "select set_config('client_encoding','GBK',false)"],
    );
    assert!(!ok && err.contains("client_encoding"), "{err}");
    // None of them ran.
    for f in [
        "pg_read_file",
        "pg_ls_dir",
        "set_config",
        "nextval",
        "f_ins",
        "lower(",
        "lo_import",
        "pg_advisory_lock",
        "query_to_xml",
    ] {
        assert!(s.server_ran(f).is_empty(), "{f}: {}", s.pg.server_log());
    }
    assert_eq!(s.count("audit_t"), "0");
    assert_eq!(s.pg.sql("select is_called from s").trim(), "f");
    let commands = s.events("command");
    let denied_fn = commands
        .iter()
        .find(|e| e["detail"]["command"] == "select nextval('s')")
        .unwrap_or_else(|| panic!("{commands:#?}"));
    assert_eq!(denied_fn["action"], "postgres:function", "{denied_fn}");
    assert_eq!(denied_fn["decision"], "deny", "{denied_fn}");
    assert_eq!(
        denied_fn["detail"]["volatile_functions"],
        serde_json::json!(["nextval"]),
        "{denied_fn}"
    );

    // Built-in immutable/stable functions and operators stay select.
    let (ok, out, err) = s.psql(
        &[],
        &[
            "-c",
            "select upper('a'), now() is not null, count(*) from t where a between 1 and 2",
        ],
    );
    assert!(ok, "{err}\n{}", s.daemon.log_text());
    assert_eq!(out.trim(), "A|t|2");
    let (ok, out, err) = s.psql(&[], &["-c", "select upper('b'); select count(*) from t"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "B\n2");
    // A rule can permit a named function through its context.
    let (ok, out, err) = s.psql(&[], &["-c", "select f_ok()"]);
    assert!(ok, "{err}\n{}", s.daemon.log_text());
    assert_eq!(out.trim(), "42");
    let commands = s.events("command");
    assert!(
        commands
            .iter()
            .any(|e| e["action"] == "postgres:select" && e["decision"] == "allow"),
        "{commands:#?}"
    );
    assert!(
        commands
            .iter()
            .any(|e| e["action"] == "postgres:function" && e["decision"] == "allow"),
        "{commands:#?}"
    );
    // Nothing ran upstream that the audit does not show allowed: every
    // agent statement in the server log is one of the three allowed.
    let agent_ran: Vec<String> = s
        .agent_statements()
        .into_iter()
        .filter(|l| !l.contains("pcx_denied_") && !l.contains("pg_catalog.pg_proc"))
        .filter(|l| l.contains("upper(") || l.contains("f_ok") || l.contains("f_ins"))
        .collect();
    assert_eq!(agent_ran.len(), 3, "{agent_ran:?}");
}

#[test]
fn pg_sound_a_copy_to_that_runs_a_routine_is_still_refused_on_a_masked_resource() {
    let s = setup_with(
        "pgfunccopy",
        r#"
@id("pg-read")
permit(principal, action in [Action::"postgres:select", Action::"postgres:copy_out"], resource);
@id("f-ok-only")
permit(principal, action == Action::"postgres:function", resource)
  when { context.statement.volatile_functions == ["f_ok"] };
"#,
        "create function f_ok() returns int language sql as 'select 42';
         create table people(name text, secret text); insert into people values ('ann', 'plaintext-secret');",
        "[[mask]]\nresource = \"pg\"\ncolumns = [\"secret\"]\nstyle = \"redact\"\n",
    );
    // A COPY TO that became `function` is still a COPY on a resource with
    // column rules: refused (its columns cannot be inspected, and a user
    // routine could read them out of sight).
    let (ok, out, err) = s.psql(
        &[],
        &["-c", "copy (select f_ok(), secret from people) to stdout"],
    );
    assert!(!ok, "{out}");
    assert!(err.contains("42501"), "{err}");
    assert!(!out.contains("plaintext-secret") && !err.contains("plaintext-secret"));
    assert!(
        s.server_ran("from people").is_empty(),
        "{}",
        s.pg.server_log()
    );
    // The plain read of the same table is served, masked.
    let (ok, out, err) = s.psql(&[], &["-c", "select name, secret from people"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("ann") && !out.contains("plaintext-secret"),
        "{out}"
    );
}
