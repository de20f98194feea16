//! `cargo xtask demo`: a tagged agent's `psql` session to a PostgreSQL
//! database goes through Portcullis: a `select` comes back with card
//! numbers and e-mails masked, a `delete` is denied by a rule while the
//! session goes on, an `update` is held until a human (the demo, after a
//! pause) approves it; then the audit log is verified and the recorded
//! session replayed. The same `psql` outside the tagged cgroup cannot even
//! log in: only the daemon holds the password.
//!
//! Owns the demo's PostgreSQL server (under `/tmp/portcullis-demo`, on
//! [`PG_PORT`], which `policies/demo.toml` names) and the story it prints;
//! the daemon's life is [`Session`]'s. The daemon also serves the review
//! console on [`CONSOLE_PORT`] with a one-time sign-in for
//! [`CONSOLE_REVIEWER`] (`[console] demo_sign_in`), whose link the demo
//! prints while the daemon keeps running.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    bench_pg::{chown, pg_bin, postgres_ids, start_postgres, Guard},
    ci,
    session::{print_indented, run_in_cgroup, Session, SessionConfig},
    util::{
        catch_interrupts, describe, interrupted, output_with_timeout, repo_root, require_root,
        step, ChildGuard,
    },
};

/// Names the demo's cgroup root, pin dir and work dir (`/tmp/<NAME>`).
const NAME: &str = "portcullis-demo";
/// The port the demo daemon's proxy listens on.
const LISTEN_PORT: u16 = 15001;
/// The identity the agent cgroup is tagged with.
const IDENTITY: &str = "demo-agent";
/// The demo agent's token, relative to the policies directory.
const DEMO_TOKEN: &str = "demo/agent.token";
/// The demo database's port; `policies/demo.toml`'s `shop-db` matches it.
const PG_PORT: u16 = 55432;
/// The password file `shop-db`'s credentials name (root-only).
const PASSWORD_FILE: &str = "/tmp/portcullis-demo/secret/pg.pw";
/// The database the agent asks for.
const DATABASE: &str = "shop";
/// The user name the agent gives (the daemon logs in as its own user).
const AGENT_USER: &str = "agent";
/// How long the demo waits before approving a held statement itself.
const APPROVE_AFTER: Duration = Duration::from_secs(4);
/// How long one statement (a held one included) may take.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long offline commands (`audit verify`, `replay`) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the demo waits for the agent's recording to be complete.
const RECORDING_TIMEOUT: Duration = Duration::from_secs(10);
/// The review console's port (loopback only).
const CONSOLE_PORT: u16 = 15030;
/// The reviewer the one-time link signs in as; `policies/demo.cedar`
/// permits it the console's actions.
const CONSOLE_REVIEWER: &str = "demo-reviewer";
/// What psql echoes after each statement, so the demo knows it finished.
const DONE: &str = "--portcullis-demo-done--";

/// The demo's tables, created directly as the server's superuser.
const SCHEMA: &str = "
create table customers(id int primary key, name text, email text, card text);
insert into customers values
  (1, 'Alice Liddell', 'alice@example.com', '4111 1111 1111 1111'),
  (2, 'Bob Marley', 'bob@example.org', '5500 0000 0000 0004');
create table orders(id int primary key, customer int references customers, total numeric, status text);
insert into orders values (100, 1, 42.50, 'paid'), (101, 2, 19.99, 'paid');
";

/// What the agent types, in order.
const STATEMENTS: [&str; 5] = [
    "select id, name, email, card from customers order by id;",
    "delete from customers where id = 2;",
    "select count(*) as customers from customers;",
    "update orders set status = 'refunded' where id = 100;",
    "select id, customer, total, status from orders order by id;",
];

/// Runs the demo; with `once`, tears down right after it instead of
/// waiting for Ctrl-C. `binary` replaces the release build.
pub fn run(once: bool, binary: Option<PathBuf>) -> Result<()> {
    require_root()?;
    let started = Instant::now();
    let policies = repo_root().join("policies");
    let demo_policy = policies.join("demo.toml");
    if !demo_policy.is_file() {
        bail!(
            "the demo policy {} is missing: it must define the postgres resource `shop-db` matching 127.0.0.1:{PG_PORT}",
            demo_policy.display()
        );
    }
    check_port_free(PG_PORT)?;
    let bin = ci::daemon_binary(binary)?;
    let psql = pg_bin()?.join("psql");
    catch_interrupts();

    // Declared before the session so it is dropped (and the work dir
    // removed) after the daemon and PostgreSQL stopped; armed only once the
    // session proved the work dir is ours (no other demo daemon answers).
    let mut work = RemoveOnDrop(None);
    let daemon_config = write_console_config()?;
    let mut session = Session::start_with_config(
        &bin,
        &SessionConfig {
            name: NAME,
            policies,
            listen_port: LISTEN_PORT,
            workers: None,
        },
        Some(&daemon_config),
    )?;
    let work_dir = PathBuf::from("/tmp").join(NAME);
    work.0 = Some(work_dir.clone());
    let pg = start_demo_postgres(&work_dir, &psql)?;
    let result = run_demo(&mut session, &psql, once, started);
    step("stopping PostgreSQL");
    drop(pg);
    drop(session);
    drop(work);
    if result.is_ok() {
        step(&format!("done in {:.1} s", started.elapsed().as_secs_f64()));
    }
    result
}

/// Writes the daemon's config file: the review console on loopback with a
/// one-time sign-in for [`CONSOLE_REVIEWER`] (no OIDC provider in the demo;
/// `issuer` names the demo's issuer only because the table requires one).
fn write_console_config() -> Result<PathBuf> {
    let dir = PathBuf::from("/tmp").join(NAME);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("portcullis.toml");
    fs::write(
        &path,
        format!(
            "# Written by `cargo xtask demo`.\n[console]\nlisten = \"127.0.0.1:{CONSOLE_PORT}\"\n\
             issuer = \"demo\"\nclient_id = \"portcullis-console\"\n\
             redirect_url = \"https://127.0.0.1:{CONSOLE_PORT}/auth/callback\"\n\
             demo_sign_in = \"{CONSOLE_REVIEWER}\"   # demos only: a one-time link, loopback only\n"
        ),
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Prints the review console's address and the one-time sign-in link the
/// daemon wrote in its state dir (root-only), and what to do there.
fn print_console(session: &Session) -> Result<()> {
    let file = session.state_dir().join("console-sign-in");
    let link = fs::read_to_string(&file).with_context(|| {
        format!(
            "the daemon wrote no one-time sign-in link in {}",
            file.display()
        )
    })?;
    let ca = session.state_dir().join("ca").join("ca.crt");
    step(&format!(
        "review console: https://127.0.0.1:{CONSOLE_PORT}/ (TLS from the daemon's CA {})",
        ca.display()
    ));
    println!(
        "    one-time sign-in as {CONSOLE_REVIEWER} (works once, for 15 minutes after the daemon started):"
    );
    println!("      {}", link.trim());
    println!(
        "    there: Requests shows the update the demo approved (who, when, the rule that asked); \
         Sessions has the agent's psql session with its replay (statements, decisions, masked rows); \
         Audit searches the log and shows the chain's verification. Hold a new update from the psql \
         line below and approve or deny it in the page."
    );
    println!(
        "    (from a shell: curl --cacert {} -c /tmp/jar '{}' then curl --cacert {} -b /tmp/jar https://127.0.0.1:{CONSOLE_PORT}/requests)",
        ca.display(),
        link.trim(),
        ca.display()
    );
    Ok(())
}

/// Fails clearly when PostgreSQL could not listen on 127.0.0.1:`port`.
/// The probe binds as PostgreSQL does, so the two agree: TIME_WAIT left by
/// an earlier run's connections does not count as in use.
fn check_port_free(port: u16) -> Result<()> {
    let err = match bind_like_postgres(port) {
        Ok(listener) => {
            drop(listener);
            return Ok(());
        }
        Err(e) => e,
    };
    let why = if err.kind() == std::io::ErrorKind::AddrInUse
        && std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(1),
        )
        .is_err()
    {
        // Nothing accepts there, yet the kernel refuses the bind: a socket
        // bound without SO_REUSEADDR holds it (a client's, or its
        // TIME_WAIT for up to 60 s). PostgreSQL could not bind it either.
        format!(
            "nothing listens there, but a socket bound without SO_REUSEADDR holds the port \
             (it may be in TIME_WAIT for up to 60 s: `ss -tan 'sport = :{port}'`); \
             PostgreSQL could not bind it either, retry in a minute"
        )
    } else {
        format!("stop what listens there (`ss -ltnp 'sport = :{port}'`)")
    };
    Err(anyhow::Error::new(err).context(format!(
        "127.0.0.1:{port} is in use: the demo's PostgreSQL needs it (policies/demo.toml's \
         `shop-db` matches it); {why}"
    )))
}

/// Binds and listens on 127.0.0.1:`port` the way PostgreSQL's
/// `ListenServerPort` does: `SO_REUSEADDR` first (said explicitly rather
/// than relying on std's `TcpListener::bind` happening to set it).
fn bind_like_postgres(port: u16) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// Removes a directory tree on drop, when armed.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            println!("    removing {}", dir.display());
            if let Err(e) = fs::remove_dir_all(&dir) {
                eprintln!("warning: cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// Starts the demo's PostgreSQL (cluster in `<work>/pg`, password in the
/// root-only [`PASSWORD_FILE`]) and creates the `shop` database.
fn start_demo_postgres(work: &Path, psql: &Path) -> Result<Guard> {
    let (uid, gid) = postgres_ids()?;
    let pg_dir = work.join("pg");
    let secret = Path::new(PASSWORD_FILE);
    let secret_dir = secret.parent().context("the password file has no parent")?;
    for dir in [&pg_dir, &secret_dir.to_path_buf()] {
        if dir.exists() {
            // Left by a killed earlier run (its server is gone: the port is free).
            fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    chown(&pg_dir, uid, gid)?;
    fs::set_permissions(secret_dir, fs::Permissions::from_mode(0o700))?;
    let password = random_password()?;
    fs::write(secret, format!("{password}\n"))
        .with_context(|| format!("cannot write {}", secret.display()))?;
    fs::set_permissions(secret, fs::Permissions::from_mode(0o600))?;
    step(&format!(
        "starting PostgreSQL ({}) on 127.0.0.1:{PG_PORT}; its password is only in {PASSWORD_FILE} (root-only, read by the daemon)",
        psql.parent().unwrap_or(psql).display()
    ));
    let pg = Guard(Some(start_postgres(&pg_dir, PG_PORT, &password, uid, gid)?));
    // Over the server's socket (trust): the demo's own setup, not the agent.
    let admin = |db: &str, sql: &str| -> Result<()> {
        let mut cmd = Command::new(psql);
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&pg_dir)
            .args([
                "-p",
                &PG_PORT.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ]);
        let out = output_with_timeout(&mut cmd, COMMAND_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "`{}` failed: {}",
                describe(&cmd),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    admin("postgres", &format!("create database {DATABASE}"))?;
    admin(DATABASE, SCHEMA)?;
    println!(
        "    database {DATABASE}: tables customers (with e-mails and card numbers) and orders"
    );
    Ok(pg)
}

/// 24 random bytes from the kernel, hex.
fn random_password() -> Result<String> {
    let mut raw = [0u8; 24];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("cannot read /dev/urandom")?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// The part of the demo that runs with the daemon and PostgreSQL up.
fn run_demo(session: &mut Session, psql: &Path, once: bool, started: Instant) -> Result<()> {
    let token = repo_root().join("policies").join(DEMO_TOKEN);
    if token.is_file() {
        session.tag_agent(IDENTITY, Some(&token))?;
    } else {
        println!("    (no {}: tagging without a token)", token.display());
        session.tag_agent(IDENTITY, None)?;
    }

    agent_session(session, psql)?;
    untagged_login(psql)?;
    crate::demo_mcp::act(session, IDENTITY)?;

    step(&format!(
        "portcullis audit verify --state-dir {}",
        session.state_dir().display()
    ));
    let state = session.state_dir().display().to_string();
    print_indented(&offline(
        session,
        &["audit", "verify", "--state-dir", &state],
    )?);

    let id = last_pg_session(session)?;
    step(&format!(
        "portcullis replay {id} --speed 0 --state-dir {state}  (the recorded session)"
    ));
    print_indented(&offline(
        session,
        &["replay", &id, "--speed", "0", "--state-dir", &state],
    )?);
    println!(
        "    (scenario took {:.1} s so far)",
        started.elapsed().as_secs_f64()
    );

    if !once {
        print_console(session)?;
        wait_for_interrupt(session, psql)?;
    }
    Ok(())
}

/// A psql line read on a thread: from stdout or stderr.
enum Line {
    Out(String),
    Err(String),
}

/// The agent: one psql session in the tagged cgroup, fed statement by
/// statement, with no password anywhere.
fn agent_session(session: &Session, psql: &Path) -> Result<()> {
    let mut cmd = agent_psql(psql);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    step(&format!(
        "tagged agent: {} in cgroup {} (no password; 127.0.0.1:{PG_PORT} is intercepted)",
        describe(&cmd),
        session.agent_cgroup().display()
    ));
    run_in_cgroup(&mut cmd, session.agent_procs_file()?);
    let mut child = ChildGuard(cmd.spawn().context("cannot start psql")?);
    let mut stdin = child.0.stdin.take().context("no stdin pipe")?;
    let (tx, rx) = mpsc::channel();
    let out = child.0.stdout.take().context("no stdout pipe")?;
    let err = child.0.stderr.take().context("no stderr pipe")?;
    let tx2 = tx.clone();
    thread::spawn(move || forward_lines(out, |l| tx.send(Line::Out(l)).is_ok()));
    thread::spawn(move || forward_lines(err, |l| tx2.send(Line::Err(l)).is_ok()));

    for sql in STATEMENTS {
        if interrupted() {
            bail!("interrupted");
        }
        println!();
        println!("    {DATABASE}=> {sql}");
        let held = sql.starts_with("update");
        let mut approver = Approver::new(held);
        statement(session, &mut stdin, &rx, sql, &mut approver)?;
        if held && !approver.saw_request {
            bail!(
                "the update was not held for approval; the daemon log ends with:\n{}",
                session.log_tail(20)
            );
        }
    }
    drop(stdin);
    match crate::util::wait_with_timeout(&mut child.0, COMMAND_TIMEOUT)? {
        Some(status) if status.success() => {}
        Some(status) => bail!("the agent's psql failed ({status})"),
        None => bail!("the agent's psql did not exit within {COMMAND_TIMEOUT:?}"),
    }
    println!();
    println!("    (psql exited; the connection was one session all along)");
    Ok(())
}

/// psql as the agent runs it: no password, no psqlrc, SQLSTATEs shown.
fn agent_psql(psql: &Path) -> Command {
    let mut cmd = Command::new(psql);
    cmd.args(["-X", "-w", "-v", "VERBOSITY=verbose", "-h", "127.0.0.1"])
        .args(["-p", &PG_PORT.to_string(), "-U", AGENT_USER, DATABASE])
        .env_remove("PGPASSWORD")
        // No ~/.pgpass either (a missing file is silently skipped): the
        // agent knows no password.
        .env("PGPASSFILE", "/nonexistent/portcullis-demo-pgpass");
    cmd
}

/// Sends each line of `pipe` to `send` until it refuses or the pipe ends.
fn forward_lines(pipe: impl Read, send: impl Fn(String) -> bool) {
    for line in BufReader::new(pipe).lines() {
        let Ok(l) = line else { return };
        if !send(l) {
            return;
        }
    }
}

/// Runs one statement: prints psql's output as it comes (errors and
/// notices marked), lets `approver` act while it waits.
fn statement(
    session: &Session,
    stdin: &mut ChildStdin,
    rx: &Receiver<Line>,
    sql: &str,
    approver: &mut Approver,
) -> Result<()> {
    writeln!(stdin, "{sql}\n\\echo {DONE}").context("psql's stdin closed")?;
    stdin.flush()?;
    let deadline = Instant::now() + STATEMENT_TIMEOUT;
    loop {
        if interrupted() {
            bail!("interrupted");
        }
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(Line::Out(l)) if l == DONE => return Ok(()),
            Ok(Line::Out(l)) => println!("      {l}"),
            Ok(Line::Err(l)) => println!("      {l}"),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => bail!(
                "psql ended during `{sql}`; the daemon log ends with:\n{}",
                session.log_tail(20)
            ),
        }
        if Instant::now() >= deadline {
            bail!("`{sql}` did not finish within {STATEMENT_TIMEOUT:?}");
        }
        approver.poll(session)?;
    }
}

/// Plays the human reviewer for a held statement: shows the pending
/// request and the live flow, waits [`APPROVE_AFTER`], then approves it
/// unless someone else decided it meanwhile.
struct Approver {
    /// Whether this statement is expected to be held.
    active: bool,
    /// Whether a pending request was seen.
    saw_request: bool,
    /// The pending request and when it was first seen.
    pending: Option<(String, Instant)>,
    /// Whether the demo is done with it (approved, or someone else did).
    done: bool,
}

impl Approver {
    fn new(active: bool) -> Self {
        Self {
            active,
            saw_request: false,
            pending: None,
            done: false,
        }
    }

    fn poll(&mut self, session: &Session) -> Result<()> {
        if !self.active || self.done {
            return Ok(());
        }
        match self.pending.clone() {
            None => {
                let Some(request) = pending_request(session)? else {
                    return Ok(());
                };
                self.saw_request = true;
                let id = request["id"].as_str().unwrap_or_default().to_owned();
                step("the statement is held: `portcullis requests` shows what waits for a human");
                print_indented(&session.client_output(&["requests"])?);
                step("`portcullis flows`: the agent's connection, with its identity and cgroup");
                print_indented(&session.client_output(&["flows"])?);
                println!(
                    "    (approving in {} s unless someone else decides first: portcullis --admin-socket {} approve|deny {id})",
                    APPROVE_AFTER.as_secs(),
                    session.admin_socket().display()
                );
                self.pending = Some((id, Instant::now()));
            }
            Some((id, since)) if since.elapsed() >= APPROVE_AFTER => {
                self.done = true;
                let still_pending = pending_request(session)?
                    .is_some_and(|r| r["id"].as_str() == Some(id.as_str()));
                if !still_pending {
                    println!("    (request {id} was already decided by someone else)");
                    return Ok(());
                }
                step(&format!(
                    "portcullis approve {id} --as demo-reviewer --reason \"refund confirmed\""
                ));
                print_indented(&session.client_output(&[
                    "approve",
                    &id,
                    "--as",
                    "demo-reviewer",
                    "--reason",
                    "refund confirmed",
                ])?);
                println!("    (the agent's psql continues:)");
            }
            Some(_) => {}
        }
        Ok(())
    }
}

/// The demo agent's first pending access request, from
/// `portcullis requests --json`.
fn pending_request(session: &Session) -> Result<Option<serde_json::Value>> {
    let text = session.client_output(&["requests", "--json"])?;
    let data: serde_json::Value =
        serde_json::from_str(&text).context("`requests --json` printed no JSON")?;
    Ok(data["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["status"] == "pending" && r["identity"] == IDENTITY)
        .cloned())
}

/// The same psql outside the tagged cgroup: connects directly and cannot
/// log in, having no password.
fn untagged_login(psql: &Path) -> Result<()> {
    let mut cmd = agent_psql(psql);
    cmd.args(["-c", "select count(*) from customers"]);
    step(&format!(
        "untagged process: the same {} outside the tagged cgroup goes direct",
        describe(&cmd)
    ));
    let out = output_with_timeout(&mut cmd, COMMAND_TIMEOUT)?;
    print_indented(&String::from_utf8_lossy(&out.stdout));
    print_indented(&String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        bail!("the untagged psql logged in without a password: the demo database is misconfigured");
    }
    println!("    (it has no password: only the daemon holds the credential)");
    Ok(())
}

/// Runs an offline `portcullis` command (no admin socket) and returns its
/// stdout; fails with its stderr.
fn offline(session: &Session, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(session.binary());
    cmd.args(args);
    let out = output_with_timeout(&mut cmd, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The id of the newest recorded postgres session of the demo agent, once
/// its recording is complete (the files lag the session's end by up to the
/// recorder's flush interval).
fn last_pg_session(session: &Session) -> Result<String> {
    let state = session.state_dir().display().to_string();
    let deadline = Instant::now() + RECORDING_TIMEOUT;
    loop {
        let text = offline(session, &["sessions", "--json", "--state-dir", &state])?;
        let data: serde_json::Value =
            serde_json::from_str(&text).context("`sessions --json` printed no JSON")?;
        let newest = data["sessions"]
            .as_array()
            .into_iter()
            .flatten()
            .rfind(|s| s["protocol"] == "postgres" && s["identity"] == IDENTITY)
            .cloned();
        match newest {
            Some(s) if !s["ended_ms"].is_null() => {
                return s["id"]
                    .as_str()
                    .map(str::to_owned)
                    .context("a session without an id");
            }
            Some(s) if Instant::now() >= deadline => {
                println!("    (the recording of {} is not complete yet)", s["id"]);
                return s["id"]
                    .as_str()
                    .map(str::to_owned)
                    .context("a session without an id");
            }
            None if Instant::now() >= deadline => {
                bail!("no recorded postgres session of the demo agent")
            }
            _ => thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Keeps the daemon and PostgreSQL running until Ctrl-C (or until the
/// daemon exits by itself).
fn wait_for_interrupt(session: &mut Session, psql: &Path) -> Result<()> {
    let cgroup = session.agent_cgroup().display().to_string();
    let socket = session.admin_socket().display().to_string();
    let bin = session.binary().display().to_string();
    step(&format!(
        "the daemon (pid {}) and PostgreSQL keep running; press Ctrl-C to stop them and tear down",
        session.daemon_pid().unwrap_or_default()
    ));
    println!("    try it from another shell (as root):");
    println!(
        "      sh -c 'echo 0 > {cgroup}/cgroup.procs; exec {} -X -h 127.0.0.1 -p {PG_PORT} -U {AGENT_USER} {DATABASE}'",
        psql.display()
    );
    println!("      {bin} --admin-socket {socket} requests --watch");
    println!("      {bin} --admin-socket {socket} approve ID");
    println!(
        "      {bin} audit tail --state-dir {}",
        session.state_dir().display()
    );
    println!("      tail -f {}", session.log_path().display());
    loop {
        if interrupted() {
            println!();
            step("interrupted");
            return Ok(());
        }
        if let Some(status) = session.daemon_exited() {
            bail!(
                "the daemon exited ({status}); its log ends with:\n{}",
                session.log_tail(30)
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_refused_with_a_clear_message() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let err = check_port_free(port).expect_err("in use").to_string();
        assert!(
            err.contains(&format!("127.0.0.1:{port} is in use")),
            "{err}"
        );
        drop(listener);
        assert!(check_port_free(port).is_ok());
    }

    /// A listener on 127.0.0.1, port chosen by the kernel, with or without
    /// `SO_REUSEADDR` (std's `TcpListener::bind` always sets it).
    fn listener(reuse: bool) -> TcpListener {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.set_reuse_address(reuse).expect("SO_REUSEADDR");
        s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        s.listen(8).expect("listen");
        s.into()
    }

    /// Whether a TIME_WAIT socket has local port `port` (/proc/net/tcp).
    fn time_wait_on(port: u16) -> bool {
        let table = fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
        let local = format!(":{port:04X}");
        table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1).is_some_and(|a| a.ends_with(&local)) && f.get(3) == Some(&"06")
        })
    }

    /// Leaves a server-side TIME_WAIT on `l`'s port (the server closes
    /// first, as PostgreSQL does on shutdown), then closes `l`.
    fn leave_time_wait(l: TcpListener) -> u16 {
        let port = l.local_addr().expect("addr").port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (server, _) = l.accept().expect("accept");
        drop(server);
        thread::sleep(Duration::from_millis(100));
        drop(client);
        drop(l);
        thread::sleep(Duration::from_millis(100));
        assert!(time_wait_on(port), "no TIME_WAIT on {port}");
        port
    }

    /// Issue 19 item 12: a second demo within a minute found the port "in
    /// use" though only TIME_WAIT of the first run's PostgreSQL remained.
    #[test]
    fn time_wait_of_a_postgres_like_listener_is_not_in_use() {
        let port = leave_time_wait(listener(true));
        check_port_free(port).expect("TIME_WAIT of an SO_REUSEADDR socket is free");
        // And PostgreSQL's own bind agrees: it can listen there now.
        drop(bind_like_postgres(port).expect("postgres-like bind"));
    }

    /// TIME_WAIT of a socket bound without SO_REUSEADDR blocks PostgreSQL's
    /// bind too: the probe says so, and why.
    #[test]
    fn time_wait_without_reuseaddr_is_in_use_and_explained() {
        let port = leave_time_wait(listener(false));
        assert!(bind_like_postgres(port).is_err(), "the kernel refuses it");
        let err = format!("{:#}", check_port_free(port).expect_err("in use"));
        assert!(
            err.contains(&format!("127.0.0.1:{port} is in use")),
            "{err}"
        );
        assert!(err.contains("nothing listens there"), "{err}");
        assert!(err.contains("TIME_WAIT"), "{err}");
    }

    #[test]
    fn the_demo_policy_names_the_demo_port_and_password_file() {
        let toml = fs::read_to_string(repo_root().join("policies").join("demo.toml"))
            .expect("policies/demo.toml");
        assert!(toml.contains(&format!("\"127.0.0.1:{PG_PORT}\"")), "{toml}");
        assert!(toml.contains(&format!("password_file = \"{PASSWORD_FILE}\"")));
        assert!(PASSWORD_FILE.starts_with(&format!("/tmp/{NAME}/")));
    }

    #[test]
    fn passwords_are_random_hex() {
        let a = random_password().expect("password");
        let b = random_password().expect("password");
        assert_eq!(a.len(), 48);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
