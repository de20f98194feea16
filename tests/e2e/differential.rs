//! The differential harness: tricky inputs go through Portcullis to a real
//! upstream, and what the upstream itself says it executed is compared with
//! what the audit log says was decided and allowed. The invariant is the
//! one the product promises: nothing runs upstream that the audit does not
//! show as allowed.
//!
//! PostgreSQL is the upstream here: the server's own statement split comes
//! from `pg_stat_statements` (one entry per top-level statement as the
//! server parsed it, also inside a multi-statement string), its effects
//! from statement-level triggers and an event trigger writing to an
//! `effects` table, and its raw input from `log_statement = 'all'` (shown
//! when the invariant breaks). Each executed statement must match an
//! allowed audit `command` event of the same action and fingerprint; each
//! effect must match an allowed action of its kind. The corpus is seeded
//! with the repros of the soundness issue (client encodings, the
//! `standard_conforming_strings` split, CTEs that modify, functions with
//! side effects) and the quoting forms that make SQL hard to split.
//! HTTP and SSH have their own differential tests beside their handlers'
//! soundness tests (`sound_http.rs`, `sound_ssh.rs`).

use std::process::Command;

use serde_json::{json, Value};

use crate::harness::*;

const CLIENT: &str = include_str!("pg_client.py");

/// A read-mostly rule set with the documented `has_where` rule: the corpus
/// tries to get anything else past it. Every allowed delete in the corpus
/// matches no row, so a table that loses rows shows a walk-around.
const RULES: &str = r#"
@id("read")
permit(principal, action in [Action::"postgres:select", Action::"postgres:transaction", Action::"postgres:set", Action::"postgres:show", Action::"postgres:insert"], resource);
@id("delete-with-where")
permit(principal, action == Action::"postgres:delete", resource);
@id("no-delete-without-where")
forbid(principal, action == Action::"postgres:delete", resource)
  unless { context.statement.has_where };
@id("no-update")
forbid(principal, action == Action::"postgres:update", resource);
"#;

struct Diff {
    _cg: TestCgroup,
    pg: PgServer,
    files: DaemonFiles,
    _daemon: Daemon,
    agent: Placement,
}

fn setup(name: &str) -> Diff {
    require_root();
    let cg = TestCgroup::new(name);
    let pg = PgServer::start_with(
        name,
        &[
            ("shared_preload_libraries", "pg_stat_statements"),
            ("pg_stat_statements.track", "top"),
            ("pg_stat_statements.track_utility", "on"),
            ("log_statement", "all"),
            ("log_line_prefix", "%a|%p| "),
        ],
    );
    pg.sql("create database diff");
    pg.sql("create extension pg_stat_statements");
    pg.sql_in(
        "diff",
        "create table orders(id int primary key, item text);
         insert into orders select g, 'item ' || g from generate_series(1, 10) g;
         create table effects(op text, tbl text);
         create function note_effect() returns trigger language plpgsql as $$
           begin insert into effects values (tg_op, tg_table_name); return null; end $$;
         create trigger orders_effects after insert or update or delete or truncate on orders
           for each statement execute function note_effect();
         create sequence s;
         create function sneaky() returns int language sql as
           $$ delete from orders where id = 1 returning id $$;
         create function note_ddl() returns event_trigger language plpgsql as $$
           begin insert into effects values (tg_tag, ''); end $$;
         create event trigger ddl_effects on ddl_command_start execute function note_ddl();",
    );
    // The test's own look-ups run as `checker` over the Unix socket, so
    // that they are told apart from what came through the daemon.
    pg.sql("create role checker superuser login");
    pg.sql("select pg_stat_statements_reset()");
    let files = DaemonFiles::new(&cg.rel);
    files.identities(IDENTITIES);
    files.rules("pg.cedar", RULES);
    std::fs::write(
        files.policies.join("pg.toml"),
        format!(
            "[resource.pg]\nprotocol = \"postgres\"\nmatch = [\"{}\"]\ncredentials = {{ user = \"postgres\", password_file = {:?} }}\ndatabase = \"diff\"\nupstream_tls = \"disable\"\nrecord = \"metadata\"\n",
            pg.addr(),
            pg.password_file.display().to_string()
        ),
    )
    .expect("write pg.toml");
    let daemon = Daemon::start(&files);
    let agent_cg = cg.child("agent");
    daemon.tag(&agent_cg, "agent");
    Diff {
        agent: Placement::cgroup(cg.dir(&agent_cg)),
        _cg: cg,
        pg,
        files,
        _daemon: daemon,
    }
}

impl Diff {
    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=agent dbname=diff sslmode=disable connect_timeout=10 application_name=diff-agent",
            self.pg.port
        )
    }

    /// psql as the agent with `env` set, one session sending each of
    /// `messages` as its own Query: (success, stdout + stderr).
    fn psql(&self, env: &[(&str, &str)], messages: &[&[u8]]) -> (bool, String) {
        use std::os::unix::ffi::OsStrExt;
        let mut cmd = Command::new("psql");
        cmd.args(["-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1"])
            .arg(self.conninfo());
        for m in messages {
            cmd.arg("-c").arg(std::ffi::OsStr::from_bytes(m));
        }
        cmd.env_remove("PGPASSWORD")
            .env_remove("PGCLIENTENCODING")
            .env_remove("PGOPTIONS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.agent.apply(&mut cmd);
        let out = cmd.output().expect("psql");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// psycopg 3 as the agent (extended protocol for statements with
    /// parameters or `prepare`): one result per step.
    fn psycopg(&self, steps: Value) -> Vec<Value> {
        let spec = json!({"conninfo": self.conninfo(), "steps": steps});
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg("-c").arg(CLIENT).arg(spec.to_string());
        self.agent.apply(&mut cmd);
        let out = cmd.output().expect("python3");
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "psycopg client output ({e}): {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// The test's own query, as `checker` over the server's Unix socket.
    fn check(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-w"])
            .arg(format!(
                "host={} port={} user=checker dbname={db}",
                self.pg.dir.display(),
                self.pg.port
            ))
            .args(["-c", sql])
            .output()
            .expect("psql");
        assert!(out.status.success(), "{sql}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Top-level statements the server executed in the agent's database
    /// for anyone but the checker, as the server split them (normalized).
    fn executed(&self) -> Vec<String> {
        let json = self.check(
            "postgres",
            "select coalesce(json_agg(s.query), '[]') from pg_stat_statements s
               join pg_database d on d.oid = s.dbid
              where d.datname = 'diff' and s.toplevel
                and s.userid <> 'checker'::regrole",
        );
        serde_json::from_str(&json).expect("pg_stat_statements json")
    }

    /// What the triggers saw: (operation or command tag, table).
    fn effects(&self) -> Vec<(String, String)> {
        let json = self.check(
            "diff",
            "select coalesce(json_agg(json_build_array(op, tbl)), '[]') from effects",
        );
        serde_json::from_str(&json).expect("effects json")
    }

    /// Asserts the invariant: every statement the server executed and every
    /// effect it had was allowed in the audit log.
    fn assert_nothing_ran_unallowed(&self) {
        use portcullis::proxy::postgres::classify::classify;
        let audit = audit_tail(&self.files);
        let allowed: Vec<(String, String)> = audit
            .iter()
            .filter(|e| e["type"] == "command" && e["decision"] == "allow")
            .map(|e| {
                (
                    e["action"].as_str().unwrap_or_default().to_string(),
                    e["detail"]["fingerprint"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        let server_log = std::fs::read_to_string(self.pg.log_file()).unwrap_or_default();
        let agent_log: String = server_log
            .lines()
            .filter(|l| l.starts_with("diff-agent|") || l.starts_with('\t'))
            .collect::<Vec<_>>()
            .join("\n");
        let mut violations = Vec::new();
        for stmt in self.executed() {
            let Ok(list) = classify(&stmt) else {
                violations.push(format!("the server ran what we cannot parse: {stmt}"));
                continue;
            };
            for c in list {
                // The daemon's own catalog look-ups (masking, function
                // volatility) read only the system catalogs.
                if c.class == "select"
                    && !c.tables.is_empty()
                    && c.tables.iter().all(|t| t.starts_with("pg_"))
                {
                    continue;
                }
                let action = format!("postgres:{}", c.class);
                if !allowed
                    .iter()
                    .any(|(a, f)| *a == action && *f == c.fingerprint)
                {
                    violations.push(format!(
                        "the server ran `{stmt}` ({action}) and the audit shows no allowed command like it"
                    ));
                }
            }
        }
        for (op, tbl) in self.effects() {
            let action = match op.as_str() {
                "INSERT" => "postgres:insert",
                "UPDATE" => "postgres:update",
                "DELETE" => "postgres:delete",
                "TRUNCATE" => "postgres:truncate",
                _ => "postgres:ddl",
            };
            if !allowed.iter().any(|(a, _)| a == action) {
                violations.push(format!(
                    "the server did {op} on {tbl:?} and the audit shows no allowed {action}"
                ));
            }
        }
        assert!(
            violations.is_empty(),
            "upstream and audit disagree:\n{}\n\nserver log (agent):\n{agent_log}\n\naudit:\n{}",
            violations.join("\n"),
            audit
                .iter()
                .filter(|e| e["type"] == "command")
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    fn orders(&self) -> String {
        self.check("diff", "select count(*) from orders where id <= 10")
    }
}

/// Client encodings whose multi-byte characters can end in 0x5C (a
/// backslash in ASCII): the server, decoding them, reads a different
/// statement split than a UTF-8 reader of the same bytes.
const DANGEROUS_ENCODINGS: &[&str] = &["GBK", "BIG5", "SJIS", "GB18030", "UHC"];

#[test]
fn differential_client_encodings_cannot_change_the_split() {
    let d = setup("diff-enc");
    // Valid UTF-8 (`中` is E4 B8 AD), and so what a UTF-8 reader decides
    // on: one SELECT. A GBK (BIG5, SJIS...) reader sees E4 B8 as one
    // character and AD 5C as another that swallows the backslash, so the
    // quote after it ends the literal and the DELETE runs.
    let attack = "SELECT E'中\\' ; DELETE FROM orders; --'".as_bytes();
    for enc in DANGEROUS_ENCODINGS {
        let (ok, out) = d.psql(&[("PGCLIENTENCODING", enc)], &[attack]);
        assert!(!ok, "{enc}: the attack string ran: {out}");
        let options = format!("-c client_encoding={enc}");
        let (ok, out) = d.psql(&[("PGOPTIONS", &options)], &[attack]);
        assert!(!ok, "{enc} via options: {out}");
    }
    // Switching later, inside the session.
    for sql in [
        "set client_encoding = 'GBK'",
        "set names 'SJIS'",
        "select set_config('client_encoding', 'BIG5', false)",
        "reset client_encoding; set client_encoding to gbk",
    ] {
        let (ok, out) = d.psql(&[], &[sql.as_bytes(), attack]);
        assert!(!ok, "{sql}: {out}");
    }
    // The control: UTF-8 (and no setting at all) works.
    let control = "select 'ü' || count(*) from orders";
    let (ok, out) = d.psql(&[("PGCLIENTENCODING", "UTF8")], &[control.as_bytes()]);
    assert!(ok, "{out}");
    assert!(out.contains("ü10"), "{out}");
    assert_eq!(d.orders(), "10");
    d.assert_nothing_ran_unallowed();
}

/// Quoting forms, comments and multi-statement strings: each is either
/// read exactly as the server reads it or refused. One entry is one
/// session; `\n--next\n` separates its Query messages.
const CORPUS: &[&str] = &[
    // Multi-statement strings.
    "select 1; delete from orders",
    "select 1;;; delete from orders",
    "delete from orders where id = -1",
    "begin; delete from orders; commit",
    "select 1 /* ; */ ; delete from orders",
    // Comments the splitter must read like the server: nested block
    // comments, line comments ending in \r.
    "select 1 /* /* */ ; delete from orders; */",
    "select 1 /* a /* b */ c */; select 2",
    "select 1 -- ; delete from orders\r; select 2",
    // Dollar quoting.
    "select $$ ; delete from orders; $$",
    "select $a$ $$ ; delete from orders; $$ $a$",
    "select $a$b$a$, 1",
    "select $_$ ' $_$ ; select ' ; delete from orders; --'",
    // Standard and escape strings, doubled quotes, unicode escapes.
    "select 'it''s ; delete from orders'",
    "select E'\\' ; delete from orders; --'",
    "select 'a\\', ' ; delete from orders; -- '",
    "select U&'\\0041 ; delete from orders'",
    "select U&'!0041' uescape '!'",
    "select 1 from \"orders\" where item = U&'item 1'",
    // standard_conforming_strings changed in the same batch, then used.
    "set standard_conforming_strings = off; select 'a\\' ; delete from orders; --'",
    "set standard_conforming_strings = off\n--next\nselect 'x\\'; delete from orders; --'",
    "set backslash_quote = on\n--next\nset standard_conforming_strings = off\n--next\nselect 'x\\''; delete from orders; --'",
    "begin\n--next\nset local standard_conforming_strings = off\n--next\nselect 'x\\'; delete from orders; --'\n--next\ncommit",
    // Modifications hidden in reads, and has_where from the outer node.
    "with d as (delete from orders returning 1) select * from d",
    "with d as (delete from orders returning 1) delete from orders where id = -1",
    "explain analyze delete from orders",
    "copy (delete from orders returning *) to stdout",
    "prepare p as delete from orders; execute p",
    // Functions with side effects in a select.
    "select sneaky()",
    "select nextval('s')",
    "select set_config('standard_conforming_strings', 'off', false)",
    "select pg_read_file('/etc/hostname')",
    "select pg_terminate_backend(pg_backend_pid())",
    "do $$ begin delete from orders; end $$",
    // Allowed work, so the invariant has something to match.
    "select count(*) from orders",
    "insert into orders values (100, 'new')",
    "select item from orders where id = 1; select 2",
];

#[test]
fn differential_quoting_and_batches_run_only_what_was_allowed() {
    let d = setup("diff-sql");
    let mut refused = 0;
    for session in CORPUS {
        let messages: Vec<&[u8]> = session.split("\n--next\n").map(str::as_bytes).collect();
        let (ok, _) = d.psql(&[], &messages);
        if !ok {
            refused += 1;
        }
    }
    // Extended protocol: parameters are data, never code; a Parse of more
    // than one statement is refused by the server; named prepared
    // statements are decided when prepared.
    let steps = json!([
        {"sql": "select %s::text", "params": ["'; delete from orders; --"]},
        {"sql": "select %s::text || item from orders where id = %s", "params": ["x\\", 1]},
        {"sql": "select 1; delete from orders", "params": []},
        {"sql": "delete from orders", "params": [], "prepare": true},
        {"sql": "select count(*) from orders where id > %s", "params": [0], "prepare": true},
        {"sql": "select count(*) from orders where id > %s", "params": [0], "prepare": true},
        {"sql": "with d as (delete from orders returning 1) select count(*) from d where 1 = %s", "params": [1]},
        {"sql": "select nextval(%s)", "params": ["s"]},
    ]);
    let results = d.psycopg(steps);
    assert_eq!(results.len(), 8, "{results:?}");
    assert!(results[0].get("error").is_none(), "{results:?}");
    assert_eq!(results[0]["rows"][0][0], "'; delete from orders; --");
    assert!(
        results[3].get("error").is_some(),
        "a delete ran: {results:?}"
    );
    assert!(results[5].get("error").is_none(), "{results:?}");
    assert!(results[6].get("error").is_some(), "{results:?}");
    assert!(results[7].get("error").is_some(), "{results:?}");
    // The corpus is mostly refusals; the controls went through.
    assert!(refused > 10 && refused < CORPUS.len(), "refused {refused}");
    assert_eq!(d.orders(), "10", "rows were deleted");
    d.assert_nothing_ran_unallowed();
}
