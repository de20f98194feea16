//! `cargo xtask demo`: a tagged agent's connection to an "orders service" is
//! intercepted by Portcullis, while an untagged process connects directly.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    ci,
    session::{print_indented, run_in_cgroup, Session, SessionConfig},
    util::{
        catch_interrupts, interrupted, repo_root, require_root, step, wait_with_timeout, ChildGuard,
    },
};

/// The demo upstream's address; `policies/demo.toml` must match it.
const UPSTREAM_HOST: &str = "127.0.0.1";
/// The demo upstream's port.
const UPSTREAM_PORT: u16 = 7001;
/// Names the demo's cgroup root, pin dir and work dir.
const NAME: &str = "portcullis-demo";
/// The port the demo daemon's proxy listens on.
const LISTEN_PORT: u16 = 15001;
/// The identity the agent cgroup is tagged with.
const IDENTITY: &str = "demo-agent";
/// The demo agent's token, relative to the policies directory.
const DEMO_TOKEN: &str = "demo/agent.token";
/// The greeting the orders service sends first.
const GREETING: &str = "hello from the orders service\n";
/// How long one agent run may take.
const AGENT_TIMEOUT: Duration = Duration::from_secs(20);

/// The demo agent: connects, prints what it gets, sends a line, prints the
/// echo, says READY and keeps the connection open until a line on stdin.
const AGENT_SCRIPT: &str = r#"
import os, socket, sys
label, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

def cgroup():
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return "?"

print(f"{label}: pid {os.getpid()}, cgroup {cgroup()}, connecting to {host}:{port}", flush=True)
s = socket.create_connection((host, port), timeout=10)
local, peer = s.getsockname(), s.getpeername()
print(f"{label}: connected (local {local[0]}:{local[1]}, socket peer {peer[0]}:{peer[1]})", flush=True)
f = s.makefile("rwb")
greeting = f.readline().decode("utf-8", "replace").rstrip("\n")
if not greeting:
    sys.exit(f"{label}: the connection closed without a greeting")
print(f"{label}: received {greeting!r}", flush=True)
f.write(b"GET /orders/42\n")
f.flush()
echo = f.readline().decode("utf-8", "replace").rstrip("\n")
print(f"{label}: echoed back {echo!r}", flush=True)
print("READY", flush=True)
sys.stdin.readline()
f.close()
s.close()
print(f"{label}: closed the connection", flush=True)
"#;

/// Runs the demo; with `once`, tears down right after it instead of
/// waiting for Ctrl-C. `binary` replaces the release build.
pub fn run(once: bool, binary: Option<PathBuf>) -> Result<()> {
    require_root()?;
    let policies = repo_root().join("policies");
    let demo_policy = policies.join("demo.toml");
    if !demo_policy.is_file() {
        bail!(
            "the demo policy {} is missing: it must define a tcp resource matching {UPSTREAM_HOST}:{UPSTREAM_PORT}",
            demo_policy.display()
        );
    }
    let bin = ci::daemon_binary(binary)?;
    start_orders_service()?;
    catch_interrupts();

    let session = Session::start(
        &bin,
        &SessionConfig {
            name: NAME,
            policies,
            listen_port: LISTEN_PORT,
        },
    )?;
    run_demo(session, once)
}

/// The part of the demo that runs with the daemon up; `session` is torn down
/// when this returns, however it returns.
fn run_demo(mut session: Session, once: bool) -> Result<()> {
    // The demo identity's OIDC token, when the policy set ships one.
    let token = repo_root().join("policies").join(DEMO_TOKEN);
    if token.is_file() {
        session.tag_agent(IDENTITY, Some(&token))?;
    } else {
        println!("    (no {}: tagging without a token)", token.display());
        session.tag_agent(IDENTITY, None)?;
    }
    step("tags");
    print_indented(&session.client_output(&["tags"])?);

    run_agent(&session, true)?;
    run_agent(&session, false)?;

    step(&format!(
        "daemon log (last lines of {})",
        session.log_path().display()
    ));
    print_indented(&session.log_tail(25));

    if !once {
        wait_for_interrupt(&mut session)?;
    }
    Ok(())
}

/// Starts the orders service: a thread per connection that greets, then
/// echoes lines.
fn start_orders_service() -> Result<()> {
    let addr = format!("{UPSTREAM_HOST}:{UPSTREAM_PORT}");
    let listener = TcpListener::bind(&addr).with_context(|| {
        format!("cannot listen on {addr} for the demo orders service (is the port in use?)")
    })?;
    step(&format!("orders service listening on {addr}"));
    spawn_orders_service(listener);
    Ok(())
}

/// Serves the orders service on `listener` from a thread.
fn spawn_orders_service(listener: TcpListener) {
    thread::spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    thread::spawn(move || {
                        if let Err(e) = serve_orders(stream) {
                            println!("    orders service: connection error: {e}");
                        }
                    });
                }
                Err(e) => println!("    orders service: accept failed: {e}"),
            }
        }
    });
}

/// Serves one orders-service connection.
fn serve_orders(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    println!(
        "    orders service: connection from {}",
        stream.peer_addr()?
    );
    stream.write_all(GREETING.as_bytes())?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    loop {
        line.clear();
        // Lines are bounded: a line longer than 64 KiB is echoed in parts.
        if (&mut reader).take(64 * 1024).read_line(&mut line)? == 0 {
            return Ok(());
        }
        stream.write_all(line.as_bytes())?;
    }
}

/// The Debian python (it has the Debian python3-* modules), else `python3`.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Runs the demo agent, inside the tagged cgroup or not, and prints
/// `portcullis flows` while its connection is open.
fn run_agent(session: &Session, tagged: bool) -> Result<()> {
    let label = if tagged {
        "tagged agent"
    } else {
        "untagged process"
    };
    if tagged {
        step(&format!(
            "{label}: python in cgroup {} connects to {UPSTREAM_HOST}:{UPSTREAM_PORT} (intercepted)",
            session.agent_cgroup().display()
        ));
    } else {
        step(&format!(
            "{label}: python outside the tagged cgroup connects to {UPSTREAM_HOST}:{UPSTREAM_PORT} (direct)"
        ));
    }
    let mut cmd = Command::new(python());
    cmd.arg("-c")
        .arg(AGENT_SCRIPT)
        .arg(label)
        .arg(UPSTREAM_HOST)
        .arg(UPSTREAM_PORT.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if tagged {
        run_in_cgroup(&mut cmd, session.agent_procs_file()?);
    }
    let mut child = ChildGuard(cmd.spawn().context("cannot start python3")?);
    let stdout = child.0.stdout.take().context("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + AGENT_TIMEOUT;
    let mut ready = false;
    let mut ended = false;
    while !ready && !ended {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(line)) if line == "READY" => ready = true,
            Ok(Ok(line)) => println!("    {line}"),
            Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => ended = true,
            Err(RecvTimeoutError::Timeout) => {
                bail!("the {label} did not finish within {AGENT_TIMEOUT:?}")
            }
        }
    }
    if ready {
        step(&format!(
            "portcullis --admin-socket {} flows (while the {label}'s connection is open; {})",
            session.admin_socket().display(),
            if tagged {
                "it should be listed with its original destination, cgroup, pid and identity"
            } else {
                "it should not be listed"
            }
        ));
        match session.client_output(&["flows"]) {
            Ok(flows) => print_indented(&flows),
            Err(e) => println!("    (flows failed: {e:#})"),
        }
        if let Some(mut stdin) = child.0.stdin.take() {
            // The agent closes its connection on this line (or on EOF).
            let _ = stdin.write_all(b"\n");
        }
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Ok(line)) => println!("    {line}"),
                Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    bail!("the {label} did not finish within {AGENT_TIMEOUT:?}")
                }
            }
        }
    }
    let remaining = deadline.saturating_duration_since(Instant::now());
    match wait_with_timeout(&mut child.0, remaining)? {
        Some(status) if status.success() && ready => Ok(()),
        Some(status) => bail!("the {label} failed ({status})"),
        None => bail!("the {label} did not finish within {AGENT_TIMEOUT:?}"),
    }
}

/// Keeps the daemon running until Ctrl-C (or until it exits by itself).
fn wait_for_interrupt(session: &mut Session) -> Result<()> {
    let cgroup = session.agent_cgroup().display().to_string();
    let socket = session.admin_socket().display().to_string();
    step(&format!(
        "the daemon (pid {}) keeps running; press Ctrl-C to stop it and tear down",
        session.daemon_pid().unwrap_or_default()
    ));
    println!("    try it from another shell:");
    println!("      sh -c 'echo 0 > {cgroup}/cgroup.procs; exec socat - TCP:{UPSTREAM_HOST}:{UPSTREAM_PORT}'");
    println!(
        "      {} --admin-socket {socket} flows",
        session.binary().display()
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
    fn orders_service_greets_then_echoes() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        spawn_orders_service(listener);
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("greeting");
        assert_eq!(line, GREETING);
        (&stream).write_all(b"ping\n").expect("write");
        line.clear();
        reader.read_line(&mut line).expect("echo");
        assert_eq!(line, "ping\n");
    }
}
