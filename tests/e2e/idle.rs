//! Idle sessions stay healthy (issue 15, idle memory): an agent's SSH
//! client that asks for compression is never given it (the agent's leg is
//! local; russh's delayed `zlib@openssh.com` sent the first packet after
//! login uncompressed, so an idle client that had started decompressing
//! dropped the connection at the daemon's first keepalive or disconnect).

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;

use super::{ssh::ssh_setup, ssh::text};

/// OpenSSH `ssh -C` through the daemon negotiates no compression in
/// either direction, and the command runs.
#[test]
fn ssh_compression_is_not_negotiated_with_the_agent() {
    let s = ssh_setup("idlecmp", 1, "");
    let agent = s.agent("agent");
    let out = s.ssh(&agent, &["-C", "-v"], &["echo", "compressed-ask"], b"");
    let err = text(&out.stderr);
    assert!(out.status.success(), "ssh -C failed: {err}\n{}", s.log());
    assert_eq!(text(&out.stdout), "compressed-ask\n");
    let kex: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("kex: server->client") || l.contains("kex: client->server"))
        .collect();
    assert_eq!(kex.len(), 2, "{err}");
    for l in kex {
        assert!(l.ends_with("compression: none"), "{l}");
    }
}

/// asyncssh (zlib@openssh.com first) logs in and idles; when the daemon
/// ends the session, the client reads the daemon's disconnect (the first
/// packet the daemon sends after login) and its reason; with compression
/// negotiated it failed with `Decompression failed` instead.
#[test]
fn an_idle_asyncssh_client_that_asks_for_compression_reads_the_daemon() {
    let s = ssh_setup("idlezlb", 1, "");
    let agent = s.agent("agent");
    let script = r#"
import asyncio, json, logging, sys, asyncssh
a = json.loads(sys.argv[1])
seen = []
class Seen(logging.Handler):
    def emit(self, record):
        seen.append(record.getMessage())
log = logging.getLogger("asyncssh")
log.setLevel(logging.DEBUG)
log.addHandler(Seen())
asyncssh.set_debug_level(1)
class Client(asyncssh.SSHClient):
    reason = "no reason"
    def connection_lost(self, exc):
        Client.reason = str(exc) if exc else "closed cleanly"
async def main():
    c, _ = await asyncssh.create_connection(Client, "127.0.0.1", port=a["port"],
        username="agent", password="", known_hosts=a["known_hosts"], client_keys=None,
        agent_path=None, keepalive_interval=0,
        compression_algs=["zlib@openssh.com", "zlib", "none"])
    print("ready", flush=True)
    try:
        await asyncio.wait_for(c.wait_closed(), 30)
    except asyncio.TimeoutError:
        Client.reason = "still open after 30s"
    got = [m[m.index("Received disconnect:"):] for m in seen if "Received disconnect:" in m]
    print("reason:", got[0] if got else Client.reason, flush=True)
asyncio.run(main())
"#;
    let args = json!({"known_hosts": s.agent_kh, "port": s.sshd.port});
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-W", "ignore", "-c", script, &args.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    agent.apply(&mut cmd);
    let mut child = cmd.spawn().expect("python3");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    if first != "ready" {
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        panic!(
            "asyncssh did not log in: {first}{}\n{}",
            text(&out.stderr),
            s.log()
        );
    }
    let id = super::ssh::live_ssh_session(&s);
    s.daemon.cli_ok(&["kill", &id]);
    let reason = lines.next().and_then(Result::ok).unwrap_or_default();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        reason,
        "reason: Received disconnect: session ended by portcullis (11)",
        "{}",
        s.log()
    );
}
