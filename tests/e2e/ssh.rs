//! The `ssh` handler end to end: real OpenSSH `sshd` started by the test
//! (own config, host key, `authorized_keys` holding only the daemon's key),
//! real OpenSSH `ssh`/`scp`/`sftp` and paramiko placed in tagged cgroups,
//! trusting the daemon's host key the way an agent container would.

use std::{
    fs,
    io::Write,
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::harness::*;

pub(super) struct Ssh {
    pub(super) cg: TestCgroup,
    pub(super) sshd: SshServer,
    pub(super) files: DaemonFiles,
    pub(super) daemon: Daemon,
    /// known_hosts trusting the daemon's host key for the sshd address.
    pub(super) agent_kh: PathBuf,
}

/// Exec is allowed unless the command mentions `forbidden`; `*held*` needs
/// approval; shells for everyone; sftp only for `agent`; forwards only to
/// `fwd_port`.
fn rules(fwd_port: u16) -> String {
    format!(
        r#"@id("exec") permit(principal, action == Action::"ssh:exec", resource)
  unless {{ context.command like "*forbidden*" || context.command like "*held*" }};
@id("held-exec") @approval("required") permit(principal, action == Action::"ssh:exec", resource)
  when {{ context.command like "*held*" }};
@id("shell") permit(principal, action == Action::"ssh:shell", resource);
@id("sftp-agent") permit(principal == Identity::"agent", action == Action::"ssh:sftp", resource);
@id("fwd") permit(principal, action == Action::"ssh:forward", resource)
  when {{ context.host == "127.0.0.1" && context.port == {fwd_port} }};
"#
    )
}

pub(super) fn ssh_setup(name: &str, fwd_port: u16, extra: &str) -> Ssh {
    require_root();
    let sshd = SshServer::start(name);
    let trust = format!(
        "known_hosts = {:?}\n{extra}",
        sshd.known_hosts.display().to_string()
    );
    setup_on(sshd, name, fwd_port, &trust)
}

/// A daemon with resource `box` for `sshd`; `trust` holds the resource's
/// trust keys (and any other extra keys).
fn setup_on(sshd: SshServer, name: &str, fwd_port: u16, trust: &str) -> Ssh {
    require_root();
    // A server trusting a user CA gets the certificate too.
    let cert = if sshd.upstream_cert().exists() {
        format!(
            ", certificate_file = {:?}",
            sshd.upstream_cert().display().to_string()
        )
    } else {
        String::new()
    };
    let cg = TestCgroup::new(name);
    let files = DaemonFiles::new(&cg.rel);
    files.identities(IDENTITIES);
    files.rules("ssh.cedar", &rules(fwd_port));
    fs::write(
        files.policies.join("box.toml"),
        format!(
            "[resource.box]\nprotocol = \"ssh\"\nmatch = [\"127.0.0.1:{}\"]\n\
             credentials = {{ user = \"root\", private_key_file = {:?}{cert} }}\n\
             record = \"full\"\napproval_timeout = \"30s\"\n{trust}",
            sshd.port,
            sshd.upstream_key.display().to_string(),
        ),
    )
    .expect("write resource");
    let daemon = Daemon::start(&files);
    let agent_kh = sshd.agent_known_hosts(&files.state.join("ssh").join("host_ed25519.pub"));
    Ssh {
        cg,
        sshd,
        files,
        daemon,
        agent_kh,
    }
}

/// `ssh-keygen` an unencrypted ed25519 key at `path`.
fn keygen(path: &std::path::Path) {
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path),
    );
}

impl Ssh {
    pub(super) fn agent(&self, identity: &str) -> Placement {
        let cg = self.cg.child(identity);
        self.daemon.tag(&cg, identity);
        Placement::cgroup(self.cg.dir(&cg))
    }

    /// `ssh` with the agent's trust settings and `args` after the target.
    pub(super) fn ssh(
        &self,
        place: &Placement,
        pre: &[&str],
        args: &[&str],
        stdin: &[u8],
    ) -> Output {
        let mut cmd = Command::new("ssh");
        cmd.args(self.sshd.ssh_opts(&self.agent_kh))
            .args(pre)
            .args(["-p", &self.sshd.port.to_string(), "root@127.0.0.1"])
            .args(args);
        place.apply(&mut cmd);
        run_with_input(cmd, stdin, Duration::from_secs(60))
    }

    pub(super) fn log(&self) -> String {
        format!(
            "--- daemon log:\n{}\n--- sshd log:\n{}",
            self.daemon.log_text(),
            self.sshd.log_text()
        )
    }
}

/// Runs `cmd` with `stdin`, killing it after `limit`. Output is read as
/// it comes (a full pipe must not stall the child).
pub(super) fn run_with_input(mut cmd: Command, stdin: &[u8], limit: Duration) -> Output {
    use std::io::Read;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = reader(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err_t = reader(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    // Fed from a thread: a child that stops reading must not block the
    // time limit.
    let feed = child.stdin.take().map(|mut i| {
        let data = stdin.to_vec();
        std::thread::spawn(move || {
            let _ = i.write_all(&data);
        })
    });
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(f) = feed {
        let _ = f.join();
    }
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{cmd:?} did not finish in {limit:?}: {}{}",
            text(&stdout),
            text(&stderr)
        ),
    }
}

pub(super) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// paramiko: several execs on one connection; prints their results.
const PARAMIKO: &str = r#"
import json, sys, paramiko
a = json.loads(sys.argv[1])
c = paramiko.SSHClient()
c.load_host_keys(a["known_hosts"])
c.set_missing_host_key_policy(paramiko.RejectPolicy())
c.connect("127.0.0.1", port=a["port"], username="agent-user", password="not-a-credential",
          look_for_keys=False, allow_agent=False, timeout=15)
out = []
for cmd in a["commands"]:
    stdin, stdout, stderr = c.exec_command(cmd, timeout=30)
    o = stdout.read().decode(errors="replace")
    e = stderr.read().decode(errors="replace")
    out.append({"cmd": cmd, "stdout": o, "stderr": e, "status": stdout.channel.recv_exit_status()})
c.close()
print(json.dumps(out))
"#;

fn paramiko(s: &Ssh, place: &Placement, commands: &[&str]) -> Vec<Value> {
    let args = json!({"known_hosts": s.agent_kh, "port": s.sshd.port, "commands": commands});
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", PARAMIKO, &args.to_string()]);
    place.apply(&mut cmd);
    let out = run_with_input(cmd, b"", Duration::from_secs(90));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "paramiko printed no JSON ({e}): {}{}\n{}",
            text(&out.stdout),
            text(&out.stderr),
            s.log()
        )
    });
    v.as_array().cloned().unwrap_or_default()
}

pub(super) fn events(s: &Ssh, kind: &str, action: &str) -> Vec<Value> {
    super::audit_events(&s.files, &[])
        .into_iter()
        .filter(|e| e["type"] == kind && e["action"] == action)
        .collect()
}

#[test]
fn ssh_exec_allowed_denied_and_the_connection_stays_usable() {
    let s = ssh_setup("sshexec", 1, "");
    let agent = s.agent("agent");
    let r = paramiko(
        &s,
        &agent,
        &[
            "echo hello; echo oops >&2; exit 3",
            "echo forbidden-thing",
            "echo again",
        ],
    );
    assert_eq!(r.len(), 3, "{r:?}");
    assert_eq!(r[0]["stdout"], "hello\n", "{r:?}\n{}", s.log());
    assert_eq!(r[0]["stderr"], "oops\n");
    assert_eq!(r[0]["status"], 3);
    assert_eq!(r[1]["status"], 126, "{r:?}");
    assert_eq!(r[1]["stdout"], "");
    let reason = r[1]["stderr"].as_str().unwrap();
    assert!(reason.contains("ssh:exec denied"), "{reason}");
    assert_eq!(r[2]["stdout"], "again\n", "same connection still usable");
    assert_eq!(r[2]["status"], 0);

    // Audit: each command decided, the allowed ones with exit codes.
    let cmds = events(&s, "command", "ssh:exec");
    let decided: Vec<(String, String)> = cmds
        .iter()
        .map(|e| {
            (
                e["detail"]["command"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["decision"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert!(
        decided.contains(&("echo forbidden-thing".into(), "deny".into())),
        "{decided:?}"
    );
    assert!(
        decided.contains(&("echo again".into(), "allow".into())),
        "{decided:?}"
    );
    // A string with shell syntax is decided (and allowed) as a shell.
    let shells = events(&s, "command", "ssh:shell");
    assert!(
        shells.iter().any(
            |e| e["detail"]["command"] == "echo hello; echo oops >&2; exit 3"
                && e["decision"] == "allow"
        ),
        "{shells:#?}"
    );
    let status_of = |action: &str| -> Vec<u64> {
        events(&s, "command_end", action)
            .iter()
            .filter_map(|e| e["detail"]["exit_status"].as_u64())
            .collect()
    };
    assert!(
        status_of("ssh:exec").contains(&0),
        "{:?}",
        status_of("ssh:exec")
    );
    assert!(
        status_of("ssh:shell").contains(&3),
        "{:?}",
        status_of("ssh:shell")
    );

    // OpenSSH with strict checking against the daemon's key.
    let out = s.ssh(&agent, &[], &["echo via-openssh; exit 7"], b"");
    assert_eq!(
        text(&out.stdout),
        "via-openssh\n",
        "{}\n{}",
        text(&out.stderr),
        s.log()
    );
    assert_eq!(out.status.code(), Some(7));
    // The real server's key is not what an intercepted agent sees.
    let mut cmd = Command::new("ssh");
    cmd.args(s.sshd.ssh_opts(&s.sshd.known_hosts)).args([
        "-p",
        &s.sshd.port.to_string(),
        "root@127.0.0.1",
        "true",
    ]);
    agent.apply(&mut cmd);
    let out = run_with_input(cmd, b"", Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || text(&out.stderr).contains("Host key verification failed"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_agent_without_a_key_gets_in_only_through_the_daemon() {
    let s = ssh_setup("sshnokey", 1, "");
    // Untagged: straight to sshd, which knows only the daemon's key.
    let mut cmd = Command::new("ssh");
    cmd.args(s.sshd.ssh_opts(&s.sshd.known_hosts))
        .args(["-o", "IdentitiesOnly=yes", "-i", "/dev/null"])
        .args([
            "-p",
            &s.sshd.port.to_string(),
            "root@127.0.0.1",
            "echo direct",
        ]);
    let out = run_with_input(cmd, b"", Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    // Tagged: the daemon logs in with the key it holds.
    let agent = s.agent("agent");
    let out = s.ssh(
        &agent,
        &["-o", "IdentitiesOnly=yes", "-i", "/dev/null"],
        &["echo through-portcullis"],
        b"",
    );
    assert_eq!(
        text(&out.stdout),
        "through-portcullis\n",
        "{}\n{}",
        text(&out.stderr),
        s.log()
    );
    assert!(
        s.sshd.log_text().contains("Accepted publickey for root"),
        "{}",
        s.log()
    );
}

#[test]
fn held_exec_says_so_on_stderr_and_runs_once_approved() {
    let s = ssh_setup("sshheld", 1, "");
    let agent = s.agent("agent");
    let mut cmd = Command::new("ssh");
    cmd.args(s.sshd.ssh_opts(&s.agent_kh))
        .args([
            "-p",
            &s.sshd.port.to_string(),
            "root@127.0.0.1",
            // A plain command: one with shell syntax is an ssh:shell.
            "echo released-held",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    agent.apply(&mut cmd);
    let child = cmd.spawn().unwrap();
    let pending = s.daemon.wait_pending(1);
    assert_eq!(pending[0]["action"], "ssh:exec", "{pending:?}");
    let id = pending[0]["id"].as_str().unwrap().to_string();
    s.daemon.cli_ok(&["approve", &id]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        text(&out.stdout),
        "released-held\n",
        "{}\n{}",
        text(&out.stderr),
        s.log()
    );
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("access request {id}")) && err.contains("held"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn pty_shell_session_is_recorded_and_playable() {
    let s = ssh_setup("sshpty", 1, "");
    let agent = s.agent("agent");
    let out = s.ssh(
        &agent,
        &["-tt"],
        &[],
        b"echo shell-marker-$((6*7))\nexit 0\n",
    );
    assert!(
        text(&out.stdout).contains("shell-marker-42"),
        "{}\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        s.log()
    );
    let state = s.files.state.display().to_string();
    let mut sessions = Vec::new();
    wait_until(
        Duration::from_secs(10),
        || {
            sessions = s
                .daemon
                .json(&["sessions", "--json", "--state-dir", &state])["sessions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            sessions.iter().any(|i| {
                i["protocol"] == "ssh"
                    && i["end_reason"].is_string()
                    && i["channels"].as_array().is_some_and(|c| !c.is_empty())
            })
        },
        "the ssh session recorded and ended",
    );
    let sess = sessions.iter().find(|i| i["protocol"] == "ssh").unwrap();
    let id = sess["id"].as_str().unwrap();
    let ch = &sess["channels"][0];
    assert_eq!(ch["kind"], "shell", "{sess:#}");
    let cast = s
        .files
        .state
        .join("sessions")
        .join(id)
        .join(ch["file"].as_str().unwrap());
    let body = fs::read_to_string(&cast).unwrap();
    let header: Value = serde_json::from_str(body.lines().next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert!(header["env"]["TERM"].is_string(), "{header}");
    assert!(body.contains("shell-marker-42"), "{body}");
    let replay = s
        .daemon
        .cli_ok(&["replay", id, "--speed", "0", "--state-dir", &state]);
    assert!(replay.contains("shell-marker-42"), "{replay}");
    // asciinema itself plays it (`cat` wants a terminal: script(1) gives it one).
    let out = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!("asciinema cat {}", cast.display()))
        .arg("/dev/null")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("shell-marker-42"));
}

fn sftp(s: &Ssh, place: &Placement, batch: &str) -> Output {
    let batch_file = s.sshd.dir.join(unique("batch"));
    fs::write(&batch_file, batch).unwrap();
    let mut cmd = Command::new("sftp");
    cmd.args(s.sshd.ssh_opts(&s.agent_kh))
        .arg("-b")
        .arg(&batch_file)
        .args(["-P", &s.sshd.port.to_string(), "root@127.0.0.1"]);
    place.apply(&mut cmd);
    run_with_input(cmd, b"", Duration::from_secs(60))
}

#[test]
fn sftp_put_and_get_allowed_and_denied_by_policy() {
    let s = ssh_setup("sshsftp", 1, "");
    let local = s.sshd.dir.join("local.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(&local, &data).unwrap();
    let remote = s.sshd.dir.join("remote.bin");
    let back = s.sshd.dir.join("back.bin");
    let agent = s.agent("agent");
    let out = sftp(
        &s,
        &agent,
        &format!(
            "put {} {}\nget {} {}\n",
            local.display(),
            remote.display(),
            remote.display(),
            back.display()
        ),
    );
    assert!(
        out.status.success(),
        "{}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        s.log()
    );
    assert_eq!(fs::read(&remote).unwrap(), data);
    assert_eq!(fs::read(&back).unwrap(), data);
    assert_eq!(events(&s, "command", "ssh:sftp")[0]["decision"], "allow");
    // The file operations are in the command's completion record.
    let ops = events(&s, "command_end", "ssh:sftp")[0]["detail"]["sftp"]["ops"].clone();
    let ops: Vec<&str> = ops
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        ops.iter()
            .any(|o| o.starts_with(&format!("open {} write", remote.display()))),
        "{ops:?}"
    );
    assert!(
        ops.contains(&format!("open {} read", remote.display()).as_str()),
        "{ops:?}"
    );

    // Another identity has no sftp rule.
    let other = s.agent("x");
    let remote2 = s.sshd.dir.join("remote2.bin");
    let out = sftp(
        &s,
        &other,
        &format!("put {} {}\n", local.display(), remote2.display()),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("ssh:sftp denied"),
        "{}",
        text(&out.stderr)
    );
    assert!(!remote2.exists());
}

#[test]
fn scp_is_an_exec_both_ways() {
    let s = ssh_setup("sshscp", 1, "");
    let agent = s.agent("agent");
    let local = s.sshd.dir.join("up.txt");
    fs::write(&local, "scp payload\n".repeat(1000)).unwrap();
    let remote = s.sshd.dir.join("scp-remote.txt");
    let back = s.sshd.dir.join("scp-back.txt");
    let scp = |from: String, to: String| {
        let mut cmd = Command::new("scp");
        // -O: the classic protocol, an exec of `scp -t/-f` on the server.
        cmd.args(s.sshd.ssh_opts(&s.agent_kh)).args([
            "-O",
            "-P",
            &s.sshd.port.to_string(),
            &from,
            &to,
        ]);
        agent.apply(&mut cmd);
        run_with_input(cmd, b"", Duration::from_secs(60))
    };
    let out = scp(
        local.display().to_string(),
        format!("root@127.0.0.1:{}", remote.display()),
    );
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), s.log());
    let out = scp(
        format!("root@127.0.0.1:{}", remote.display()),
        back.display().to_string(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        fs::read_to_string(&back).unwrap(),
        "scp payload\n".repeat(1000)
    );
    let cmds: Vec<String> = events(&s, "command", "ssh:exec")
        .iter()
        .map(|e| {
            e["detail"]["command"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(cmds.iter().any(|c| c.starts_with("scp -t")), "{cmds:?}");
    assert!(cmds.iter().any(|c| c.starts_with("scp -f")), "{cmds:?}");
}

#[test]
fn port_forward_allowed_and_denied() {
    let allowed = EchoServer::start("fwd-ok");
    let denied = EchoServer::start("fwd-no");
    let s = ssh_setup("sshfwd", allowed.addr.port(), "");
    let agent = s.agent("agent");
    let out = s.ssh(&agent, &["-W", &allowed.addr.to_string()], &[], b"ping\n");
    assert_eq!(
        text(&out.stdout),
        format!("{}\nping\n", allowed.greeting().trim_end()),
        "{}\n{}",
        text(&out.stderr),
        s.log()
    );
    let out = s.ssh(&agent, &["-W", &denied.addr.to_string()], &[], b"ping\n");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("administratively prohibited"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        denied.accepted.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let fwd = events(&s, "command", "ssh:forward");
    assert!(fwd.iter().any(|e| e["decision"] == "allow"), "{fwd:#?}");
    assert!(fwd.iter().any(|e| e["decision"] == "deny"), "{fwd:#?}");
}

#[test]
fn garbage_on_the_wire_is_closed_without_a_panic() {
    let s = ssh_setup("sshgarbage", 1, "");
    let agent = s.agent("agent");
    for send in [
        "garbage\r\n".to_string(),
        format!("SSH-2.0-evil\r\n{}", "\u{ff}\u{00}junk".repeat(400)),
    ] {
        let r = client(
            &agent,
            json!({"host": "127.0.0.1", "port": s.sshd.port, "send": send, "half_close": true, "timeout": 20}),
        );
        assert!(
            r.greeting()
                .is_some_and(|g| g.starts_with("SSH-2.0-Portcullis")),
            "{r:?}"
        );
        assert!(r.0["echo_len"] == 0 || r.error().is_some(), "{r:?}");
    }
    // The daemon carries on.
    let out = s.ssh(&agent, &[], &["echo still-fine"], b"");
    assert_eq!(text(&out.stdout), "still-fine\n", "{}", s.log());
    assert!(!s.daemon.log_text().contains("panicked"), "{}", s.log());
}

#[test]
fn secrets_in_output_are_masked_across_chunk_boundaries() {
    let s = ssh_setup(
        "sshmask",
        1,
        "\n[[mask]]\nresource = \"box\"\ndetectors = [\"aws_access_key\"]\nstyle = \"redact\"\n",
    );
    let key = "AKIAIOSFODNN7EXAMPLE";
    // Keys straddling the usual read and packet sizes, so some arrive split
    // across chunks.
    let mut body = "lorem ipsum dolor sit amet\n".repeat(8000).into_bytes();
    let offsets = [4096usize, 8192, 16384, 32768, 65536, 131072, 180_000];
    for off in offsets {
        let at = off - 9;
        body[at..at + key.len() + 2].copy_from_slice(format!(" {key} ").as_bytes());
    }
    let file = s.sshd.dir.join("creds.txt");
    fs::write(&file, &body).unwrap();
    let expected = String::from_utf8(body.clone())
        .unwrap()
        .replace(key, "[MASKED]");
    let agent = s.agent("agent");
    let out = s.ssh(
        &agent,
        &[],
        &[&format!(
            "cat {}; cat {} >&2",
            file.display(),
            file.display()
        )],
        b"",
    );
    assert!(out.status.success(), "{}", s.log());
    let got = text(&out.stdout);
    assert!(!got.contains("AKIA"), "a key leaked on stdout");
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "stdout differs from the masked file");
    let err = text(&out.stderr);
    assert!(
        !err.contains("AKIA") && err.contains("[MASKED]"),
        "stderr not masked"
    );
    // The command's completion record counts what was masked (a string
    // with `;` and `>&2` is decided as a shell).
    let ends = events(&s, "command_end", "ssh:shell");
    let masked = &ends.last().unwrap()["detail"]["masked"];
    assert_eq!(
        masked["aws_access_key"].as_u64(),
        Some(2 * offsets.len() as u64),
        "{ends:#?}"
    );
    // The recording holds the masked output only.
    let state = s.files.state.display().to_string();
    wait_until(
        Duration::from_secs(10),
        || {
            s.daemon
                .json(&["sessions", "--json", "--state-dir", &state])["sessions"]
                .as_array()
                .is_some_and(|a| a.iter().any(|i| i["end_reason"].is_string()))
        },
        "session recorded",
    );
    let sessions = s.files.state.join("sessions");
    for d in fs::read_dir(&sessions).unwrap() {
        for f in fs::read_dir(d.unwrap().path()).unwrap() {
            let f = f.unwrap().path();
            let t = fs::read_to_string(&f).unwrap_or_default();
            assert!(!t.contains(key), "{} holds the key", f.display());
        }
    }
}

#[test]
fn host_certificates_on_both_legs() {
    require_root();
    // Upstream: sshd presents a host certificate; the resource trusts its
    // CA only (no known_hosts).
    let sshd = SshServer::start_with("sshca", true, false);
    // Agent side: the resource's own host key, certified by a CA agents
    // trust with @cert-authority.
    let dir = sshd.dir.clone();
    let (key, ca) = (dir.join("agent_side"), dir.join("agent_ca"));
    keygen(&key);
    keygen(&ca);
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-s"])
            .arg(&ca)
            .args(["-I", "portcullis", "-h", "-n", "127.0.0.1", "-V", "-5m:+1h"])
            .arg(dir.join("agent_side.pub")),
    );
    let trust = format!(
        "host_ca = {:?}\nhost_key_file = {:?}\nhost_certificate_file = {:?}\n",
        sshd.host_ca_pub().display().to_string(),
        key.display().to_string(),
        dir.join("agent_side-cert.pub").display().to_string(),
    );
    let s = setup_on(sshd, "sshca", 1, &trust);
    let kh = dir.join("ca_known_hosts");
    fs::write(
        &kh,
        format!(
            "@cert-authority [127.0.0.1]:{} {}",
            s.sshd.port,
            fs::read_to_string(dir.join("agent_ca.pub")).unwrap()
        ),
    )
    .unwrap();
    let agent = s.agent("agent");
    let mut cmd = Command::new("ssh");
    cmd.args(s.sshd.ssh_opts(&kh)).args([
        "-p",
        &s.sshd.port.to_string(),
        "root@127.0.0.1",
        "echo via-certificates",
    ]);
    agent.apply(&mut cmd);
    let out = run_with_input(cmd, b"", Duration::from_secs(60));
    assert_eq!(
        text(&out.stdout),
        "via-certificates\n",
        "{}\n{}",
        text(&out.stderr),
        s.log()
    );
    // The daemon's plain key is not what this resource shows.
    let out = s.ssh(&agent, &[], &["true"], b"");
    assert!(!out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn an_upstream_whose_host_key_is_not_known_is_refused() {
    let s = ssh_setup("sshhostkey", 1, "");
    let agent = s.agent("agent");
    let other = s.sshd.dir.join("impostor");
    keygen(&other);
    fs::write(
        &s.sshd.known_hosts,
        format!(
            "[127.0.0.1]:{} {}",
            s.sshd.port,
            fs::read_to_string(s.sshd.dir.join("impostor.pub")).unwrap()
        ),
    )
    .unwrap();
    let out = s.ssh(&agent, &[], &["echo should-not-run"], b"");
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("not trusted"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !s.sshd.log_text().contains("Accepted publickey"),
        "{}",
        s.log()
    );
}

/// paramiko: a pty shell resized midway, a signal sent to an exec, and an
/// exec killed by a signal.
const PARAMIKO_TTY: &str = r#"
import json, sys, time, paramiko
from paramiko.message import Message
from paramiko.common import cMSG_CHANNEL_REQUEST
a = json.loads(sys.argv[1])
c = paramiko.SSHClient()
c.load_host_keys(a["known_hosts"])
c.set_missing_host_key_policy(paramiko.RejectPolicy())
c.connect("127.0.0.1", port=a["port"], username="u", password="p", look_for_keys=False, allow_agent=False, timeout=15)
t = c.get_transport()
def read_until(ch, want, limit=20):
    buf = b""
    end = time.time() + limit
    while time.time() < end and want.encode() not in buf:
        if ch.recv_ready():
            buf += ch.recv(65536)
        elif ch.exit_status_ready() or ch.closed:
            break
        else:
            time.sleep(0.02)
    return buf.decode(errors="replace")
out = {}
ch = t.open_session()
ch.get_pty(term="xterm", width=80, height=24)
ch.invoke_shell()
ch.send("stty size\n")
out["before"] = read_until(ch, "24 80")
ch.resize_pty(width=100, height=40)
time.sleep(0.3)
ch.send("stty size; exit\n")
out["after"] = read_until(ch, "40 100")
ch.close()
ch2 = t.open_session()
ch2.exec_command("echo started; sleep 2; echo slept")
out["sig_before"] = read_until(ch2, "started")
m = Message()
m.add_byte(cMSG_CHANNEL_REQUEST)
m.add_int(ch2.remote_chanid)
m.add_string("signal")
m.add_boolean(False)
m.add_string("TERM")
t._send_user_message(m)
out["sig_after"] = read_until(ch2, "slept")
ch3 = t.open_session()
ch3.exec_command("echo dying; kill -TERM $$")
out["killed"] = read_until(ch3, "never-printed", 15)
out["killed_status"] = ch3.recv_exit_status()
c.close()
print(json.dumps(out))
"#;

#[test]
fn window_changes_signals_and_exit_signals_are_relayed() {
    let s = ssh_setup("sshsig", 1, "");
    let agent = s.agent("agent");
    let args = json!({"known_hosts": s.agent_kh, "port": s.sshd.port});
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", PARAMIKO_TTY, &args.to_string()]);
    agent.apply(&mut cmd);
    let out = run_with_input(cmd, b"", Duration::from_secs(90));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}\n{}",
            text(&out.stdout),
            text(&out.stderr),
            s.log()
        )
    });
    assert!(v["before"].as_str().unwrap().contains("24 80"), "{v}");
    assert!(
        v["after"].as_str().unwrap().contains("40 100"),
        "window change relayed: {v}"
    );
    assert!(v["sig_before"].as_str().unwrap().contains("started"), "{v}");
    // The signal request reached sshd (which delivers signals only to
    // non-root sessions: root logins run without privilege separation).
    assert!(
        s.sshd.log_text().contains("session_signal_req"),
        "signal relayed upstream: {}",
        s.log()
    );
    // A command killed by a signal: exit-signal, no exit status.
    assert!(v["killed"].as_str().unwrap().contains("dying"), "{v}");
    assert_eq!(v["killed_status"], -1, "{v}");
    // `echo dying; kill -TERM $$` has shell syntax: an ssh:shell.
    let ends = events(&s, "command_end", "ssh:shell");
    assert!(
        ends.iter().any(|e| e["detail"]["exit_signal"] == "TERM"),
        "exit-signal relayed and audited: {ends:#?}"
    );
    // The resize is in the shell's recording.
    let state = s.files.state.display().to_string();
    let sessions_dir = s.files.state.join("sessions");
    let mut cast_text = String::new();
    wait_until(
        Duration::from_secs(10),
        || {
            let sessions = s
                .daemon
                .json(&["sessions", "--json", "--state-dir", &state])["sessions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            cast_text = sessions
                .iter()
                .flat_map(|i| {
                    let id = i["id"].as_str().unwrap_or_default().to_string();
                    i["channels"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|c| c["kind"] == "shell")
                        .map({
                            let dir = sessions_dir.join(&id);
                            move |c| dir.join(c["file"].as_str().unwrap_or_default())
                        })
                })
                .map(|p| fs::read_to_string(p).unwrap_or_default())
                .collect();
            cast_text.contains("\"r\", \"100x40\"") || cast_text.contains("\"r\",\"100x40\"")
        },
        "resize event recorded",
    );
}

#[test]
fn the_daemon_logs_in_with_a_held_user_certificate() {
    require_root();
    // sshd's authorized_keys is empty: only the certificate gets in.
    let sshd = SshServer::start_with("sshusercert", false, true);
    let trust = format!(
        "known_hosts = {:?}\n",
        sshd.known_hosts.display().to_string()
    );
    let s = setup_on(sshd, "sshusercert", 1, &trust);
    let agent = s.agent("agent");
    let out = s.ssh(&agent, &[], &["echo certified"], b"");
    assert_eq!(
        text(&out.stdout),
        "certified\n",
        "{}\n{}",
        text(&out.stderr),
        s.log()
    );
    assert!(
        s.sshd.log_text().contains("portcullis-user"),
        "sshd accepted the certificate: {}",
        s.log()
    );
}

#[test]
fn bulk_both_ways_at_once_and_a_killed_session() {
    let s = ssh_setup("sshbulk", 1, "");
    let agent = s.agent("agent");
    // 24 MiB through `cat`: input and output flow at the same time.
    let data: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let out = s.ssh(&agent, &[], &["cat"], &data);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), s.log());
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "cat returned other bytes");

    // `portcullis kill` ends a live ssh session at once.
    let mut cmd = Command::new("ssh");
    cmd.args(s.sshd.ssh_opts(&s.agent_kh))
        .args(["-p", &s.sshd.port.to_string(), "root@127.0.0.1", "sleep 60"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    agent.apply(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let id = live_ssh_session(&s);
    // Let the exec start (the kill must end a running command too).
    wait_until(
        Duration::from_secs(10),
        || s.sshd.log_text().matches("Accepted publickey").count() >= 2,
        "the upstream login of the second session",
    );
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    s.daemon.cli_ok(&["kill", &id]);
    let mut status = None;
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(st)) = child.try_wait() {
            status = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let status = status.expect("ssh ended after the kill");
    assert!(!status.success());
}

/// More sequential execs on one connection than channels may be open at
/// once ([`portcullis::proxy::ssh::server::MAX_CHANNELS`], 64), by a client
/// that closes a channel only in answer to the server's close (paramiko):
/// each channel ends when its command has, so none is refused. Before, the
/// channel's task waited for the agent's own close, and the 65th exec got
/// `resource shortage`.
#[test]
fn ssh_more_sequential_execs_than_open_channels_allowed_on_one_connection() {
    let s = ssh_setup("sshmany", 1, "");
    let agent = s.agent("agent");
    let commands: Vec<String> = (0..80).map(|i| format!("echo {i}")).collect();
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    let r = paramiko(&s, &agent, &refs);
    assert_eq!(r.len(), 80, "{r:?}");
    for (i, one) in r.iter().enumerate() {
        assert_eq!(one["stdout"], format!("{i}\n"), "{one:?}\n{}", s.log());
        assert_eq!(one["status"], 0, "{one:?}");
    }
}

/// The id of the daemon's first live ssh session, once there is one.
pub(super) fn live_ssh_session(s: &Ssh) -> String {
    let state = s.files.state.display().to_string();
    let mut id = String::new();
    wait_until(
        Duration::from_secs(10),
        || {
            let active = s
                .daemon
                .json(&["sessions", "--active", "--json", "--state-dir", &state]);
            match active["sessions"].as_array().and_then(|a| a.first()) {
                Some(v) if v["protocol"] == "ssh" => {
                    id = v["id"].as_str().unwrap_or_default().to_string();
                    true
                }
                _ => false,
            }
        },
        "the ssh session is live",
    );
    id
}
