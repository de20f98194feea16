//! The PostgreSQL catalog cache (issue 15) keeps masking sound: answers
//! the daemon cached from the server's catalog are dropped when the catalog
//! changes, whether the change came through Portcullis (synchronously) or
//! from a client the daemon never saw (the event trigger's notification).
//! Each test first warms the cache with the same statement, so a cache
//! that outlived the change would let the masked value out.

use std::{process::Command, thread, time::Duration};

use crate::harness::*;

const RULES: &str = r#"
@id("pg-all")
permit(principal, action in [Action::"postgres:select", Action::"postgres:insert", Action::"postgres:ddl", Action::"postgres:transaction", Action::"postgres:set", Action::"postgres:show"], resource);
"#;

const MASK: &str =
    "[[mask]]\nresource = \"pg\"\ncolumns = [\"customers.ssn\"]\nstyle = \"redact\"\n";

const SSN: &str = "123-45-6789";

struct S {
    _cg: TestCgroup,
    pg: PgServer,
    _files: DaemonFiles,
    daemon: Daemon,
    agent: Placement,
}

fn setup(name: &str) -> S {
    require_root();
    let cg = TestCgroup::new(name);
    let pg = PgServer::start(name);
    pg.sql(&format!(
        "create table customers(id int primary key, name text, ssn text);
         insert into customers values (1, 'alice', '{SSN}');
         create table report(id int, ssn text);
         insert into report values (1, 'not secret');
         create table child(id int not null, name text, ssn text);"
    ));
    let files = DaemonFiles::new(&cg.rel);
    files.identities(IDENTITIES);
    files.rules("pg.cedar", RULES);
    std::fs::write(
        files.policies.join("pg.toml"),
        format!(
            "[resource.pg]\nprotocol = \"postgres\"\nmatch = [\"{}\"]\ncredentials = {{ user = \"postgres\", password_file = {:?} }}\nupstream_tls = \"prefer\"\n\n{MASK}",
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
        _files: files,
        daemon,
    }
}

impl S {
    /// psql as the agent through the daemon: (success, stdout, stderr).
    fn psql(&self, sql: &str) -> (bool, String, String) {
        self.psql_each(&[sql])
    }

    /// psql as the agent, one session sending each of `messages` as its own
    /// Query.
    fn psql_each(&self, messages: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new("psql");
        cmd.args(["-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1"])
            .arg(format!(
            "host=127.0.0.1 port={} user=agent dbname=postgres sslmode=disable connect_timeout=10",
            self.pg.port
        ));
        for m in messages {
            cmd.args(["-c", m]);
        }
        cmd.env_remove("PGPASSWORD");
        self.agent.apply(&mut cmd);
        let out = cmd.output().expect("psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `sql` through the daemon until the catalog-change signal is
    /// live (so what follows is answered from the cache), then twice more.
    fn warm(&self, sql: &str) -> String {
        let (ok, out, err) = self.psql(sql);
        assert!(ok, "{sql}: {err}");
        wait_until(
            Duration::from_secs(30),
            || {
                self.daemon
                    .log_text()
                    .contains("catalog-change signal live")
            },
            "the catalog-change signal to be live",
        );
        for _ in 0..2 {
            let (ok, again, err) = self.psql(sql);
            assert!(ok, "{sql}: {err}");
            assert_eq!(again, out);
        }
        out
    }
}

#[test]
fn a_view_over_a_masked_table_created_outside_after_the_cache_warmed_is_refused() {
    let s = setup("perfpgview");
    assert_eq!(s.warm("select * from report").trim(), "1|not secret");
    // The daemon installed its triggers (its held role is a superuser).
    let triggers = s.pg.sql(
        "select count(*) from pg_event_trigger where evtname in ('portcullis_ddl', 'portcullis_drop')",
    );
    assert_eq!(triggers.trim(), "2", "event triggers installed");

    // Directly on the server (never through Portcullis): the same name
    // becomes a view that reads the masked column.
    s.pg.sql("drop table report; create view report as select id, ssn from customers;");
    // Shown leaking when read directly.
    assert!(s.pg.sql("select * from report").contains(SSN));
    // The notification's delivery is the documented window (loopback:
    // well under a millisecond); psql's own start-up takes longer, and this
    // pause removes any doubt.
    thread::sleep(Duration::from_millis(300));

    let (ok, out, err) = s.psql("select * from report");
    assert!(
        !ok && !out.contains(SSN),
        "a view created outside after the cache warmed must be refused: {out} {err}"
    );
    assert!(err.contains("view report reads masked column"), "{err}");
}

#[test]
fn ddl_through_the_proxy_invalidates_the_catalog_cache() {
    let s = setup("perfpgddl");
    s.pg.sql("insert into child values (1, 'x', '111-22-3333')");
    // Not a child of customers yet: its ssn is no masked column.
    assert_eq!(s.warm("select upper(ssn) from child").trim(), "111-22-3333");
    // Through Portcullis: child becomes a child of customers, so its ssn
    // is customers.ssn and may not go through an expression.
    let (ok, _, err) = s.psql("alter table child inherit customers");
    assert!(ok, "{err}");
    let (ok, out, err) = s.psql("select upper(ssn) from child");
    assert!(
        !ok && !out.contains("111-22-3333"),
        "the cached catalog answer from before the DDL must not be used: {out} {err}"
    );
    assert!(err.contains("masked"), "{err}");
    // Inside one transaction, where the daemon's catalog connection
    // cannot see the change yet: in one batch, and message by message.
    s.pg.sql("alter table child no inherit customers");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(s.warm("select upper(ssn) from child").trim(), "111-22-3333");
    let (ok, out, err) =
        s.psql("begin; alter table child inherit customers; select upper(ssn) from child; commit");
    assert!(
        !ok && !out.contains("111-22-3333"),
        "same batch: {out} {err}"
    );
    assert!(err.contains("masking cannot be checked"), "{err}");
    let (ok, out, err) = s.psql_each(&[
        "begin",
        "alter table child inherit customers",
        "select upper(ssn) from child",
    ]);
    assert!(
        !ok && !out.contains("111-22-3333"),
        "same transaction: {out} {err}"
    );
    // Message by message the daemon reads the session's own catalog (on
    // its connection, inside the transaction), which sees the uncommitted
    // INHERIT: child.ssn is customers.ssn now.
    assert!(err.contains("column \"ssn\" is masked"), "{err}");
}
