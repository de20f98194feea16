//! Real SSH clients behave through the daemon as they do directly (issue
//! 19): binary streams pass a masked host intact (`scp -O`, rsync, a plain
//! `cat` of binary data) while text is still masked; `binary = "refuse"`
//! refuses or stops them with a clear message; exit statuses survive
//! OpenSSH ControlMaster multiplexing; paramiko logs in without a key.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::json;

use super::{
    harness::*,
    ssh::{events, run_with_input, ssh_setup, text, Ssh},
};

const MASK_EMAIL: &str = "\n[[mask]]\nresource = \"box\"\ndetectors = [\"email\"]\n";

/// Pseudo-random bytes (xorshift: no extra crate) with e-mail-like
/// patterns embedded, the kind the detector matched in the report.
fn binary_payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    for at in (100..len.saturating_sub(64)).step_by(4000) {
        v[at..at + 21].copy_from_slice(b" alice@example.com i@");
    }
    v
}

fn scp_get(s: &Ssh, place: &Placement, remote: &Path, local: &Path) -> std::process::Output {
    let mut cmd = Command::new("scp");
    cmd.args(s.sshd.ssh_opts(&s.agent_kh)).args([
        "-O",
        "-P",
        &s.sshd.port.to_string(),
        &format!("root@127.0.0.1:{}", remote.display()),
        &local.display().to_string(),
    ]);
    place.apply(&mut cmd);
    run_with_input(cmd, b"", Duration::from_secs(60))
}

fn rsync_get(s: &Ssh, place: &Placement, remote: &Path, local: &Path) -> std::process::Output {
    let e = format!(
        "ssh {} -p {}",
        s.sshd.ssh_opts(&s.agent_kh).join(" "),
        s.sshd.port
    );
    let mut cmd = Command::new("rsync");
    cmd.args([
        "-a",
        "-e",
        &e,
        &format!("root@127.0.0.1:{}", remote.display()),
        &local.display().to_string(),
    ]);
    place.apply(&mut cmd);
    run_with_input(cmd, b"", Duration::from_secs(60))
}

#[test]
fn binary_streams_pass_a_masked_host_intact_and_text_is_still_masked() {
    let s = ssh_setup("cmpbin", 1, MASK_EMAIL);
    let agent = s.agent("agent");
    let payload = binary_payload(300_000);
    let remote = s.sshd.dir.join("blob.bin");
    fs::write(&remote, &payload).unwrap();

    // scp -O (the legacy protocol: an exec of `scp -f`).
    let got = s.sshd.dir.join("blob.scp");
    let out = scp_get(&s, &agent, &remote, &got);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), s.log());
    assert!(
        fs::read(&got).unwrap() == payload,
        "scp copy differs from the original"
    );

    let ends = events(&s, "command_end", "ssh:exec");
    assert!(
        ends.iter()
            .any(|e| e["detail"]["unmasked_transfer"] == "`scp`"),
        "{ends:#?}"
    );

    // rsync pull (`rsync --server --sender`).
    if Command::new("rsync")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok()
    {
        let got = s.sshd.dir.join("blob.rsync");
        let out = rsync_get(&s, &agent, &remote, &got);
        assert!(out.status.success(), "{}\n{}", text(&out.stderr), s.log());
        assert!(fs::read(&got).unwrap() == payload, "rsync copy differs");
    } else {
        panic!("rsync is not installed (cargo xtask setup installs it)");
    }

    // A plain `cat` of binary data: not a known transfer program, found
    // binary by its bytes, relayed byte for byte.
    let out = s.ssh(&agent, &[], &[&format!("cat {}", remote.display())], b"");
    assert!(out.status.success(), "{}", s.log());
    assert!(out.stdout == payload, "cat of binary data was rewritten");
    let ends = events(&s, "command_end", "ssh:exec");
    assert!(
        ends.iter()
            .any(|e| e["detail"]["unmasked_binary"] == json!(["stdout"])),
        "{ends:#?}"
    );

    // An archive of text files full of addresses: binary from its first
    // header, byte-identical to the same `tar` run directly.
    let tree = s.sshd.dir.join("tree");
    fs::create_dir_all(&tree).unwrap();
    for i in 0..5 {
        fs::write(
            tree.join(format!("f{i}.txt")),
            "reach bob@example.com or carol@example.com\n".repeat(500),
        )
        .unwrap();
    }
    let tar = format!("tar cf - -C {} .", tree.display());
    let direct = run_ok(Command::new("sh").args(["-c", &tar])).stdout;
    let out = s.ssh(&agent, &[], &[&tar], b"");
    assert!(out.status.success(), "{}", s.log());
    assert!(out.stdout == direct, "tar stream differs from a direct run");

    // git clone (git-upload-pack) of a repository whose files are full
    // of addresses: the checkout matches the original.
    let repo = s.sshd.dir.join("repo");
    fs::create_dir_all(&repo).unwrap();
    let git = |dir: &Path, args: &[&str]| {
        run_ok(
            Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(["-c", "user.email=t@example.com", "-c", "user.name=t"])
                .args(args),
        )
    };
    git(&repo, &["init", "-q"]);
    fs::write(repo.join("people.txt"), "carol@example.com\n".repeat(2000)).unwrap();
    fs::write(repo.join("blob.bin"), &payload[..100_000]).unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-qm", "x"]);
    let clone = s.sshd.dir.join("clone");
    let mut cmd = Command::new("git");
    cmd.env(
        "GIT_SSH_COMMAND",
        format!(
            "ssh {} -p {}",
            s.sshd.ssh_opts(&s.agent_kh).join(" "),
            s.sshd.port
        ),
    )
    .args(["clone", "-q"])
    .arg(format!("root@127.0.0.1:{}", repo.display()))
    .arg(&clone);
    agent.apply(&mut cmd);
    let out = run_with_input(cmd, b"", Duration::from_secs(60));
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), s.log());
    assert!(fs::read(clone.join("blob.bin")).unwrap() == payload[..100_000]);
    assert_eq!(
        fs::read_to_string(clone.join("people.txt")).unwrap(),
        "carol@example.com\n".repeat(2000)
    );

    // Text is still masked.
    let notes = s.sshd.dir.join("notes.txt");
    fs::write(&notes, "write to alice@example.com today\n").unwrap();
    let out = s.ssh(&agent, &[], &[&format!("cat {}", notes.display())], b"");
    let t = text(&out.stdout);
    assert!(
        !t.contains("alice@example.com") && t.contains("write to"),
        "{t}\n{}",
        s.log()
    );
    // Text masked (and sent), then binary: the stream stays masked to its
    // end (no secret let out after a NUL).
    let mixed = s.sshd.dir.join("mixed.bin");
    let mut m = vec![0u8, 0xff, 0xfe];
    m.extend_from_slice(b" then carol@example.com\n");
    fs::write(&mixed, &m).unwrap();
    let out = s.ssh(
        &agent,
        &[],
        &[&format!(
            "cat {}; sleep 1; cat {}",
            notes.display(),
            mixed.display()
        )],
        b"",
    );
    let t = text(&out.stdout);
    assert!(
        t.contains("write to")
            && t.contains(" then ")
            && !t.contains("alice@example.com")
            && !t.contains("carol@example.com"),
        "{t}\n{}",
        s.log()
    );
}

#[test]
fn binary_refuse_refuses_transfers_and_stops_binary_output() {
    let s = ssh_setup("cmpref", 1, &format!("{MASK_EMAIL}binary = \"refuse\"\n"));
    let agent = s.agent("agent");
    let remote = s.sshd.dir.join("blob.bin");
    fs::write(&remote, binary_payload(50_000)).unwrap();
    let got = s.sshd.dir.join("blob.scp");
    let out = scp_get(&s, &agent, &remote, &got);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("binary protocol") && err.contains("binary = \"refuse\""),
        "{err}\n{}",
        s.log()
    );
    // Refused before it ran: the audit says why, with no exit status.
    let ends = events(&s, "command_end", "ssh:exec");
    assert!(
        ends.iter().any(|e| e["detail"]["error"]
            .as_str()
            .is_some_and(|x| x.contains("binary protocol"))
            && e["detail"]["exit_status"].is_null()),
        "{ends:#?}"
    );
    // A cat of binary data is stopped, the binary part not delivered.
    let out = s.ssh(&agent, &[], &[&format!("cat {}", remote.display())], b"");
    assert_eq!(out.status.code(), Some(126), "{}", s.log());
    assert!(
        text(&out.stderr).contains("is not text"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        out.stdout.len() < 1000,
        "{} bytes got out",
        out.stdout.len()
    );
    // Text still flows, masked.
    let out = s.ssh(&agent, &[], &["echo mail dave@example.com"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", s.log());
    let t = text(&out.stdout);
    assert!(
        t.starts_with("mail ") && !t.contains("dave@example.com"),
        "{t}"
    );
}

#[test]
fn exit_status_survives_controlmaster_multiplexing() {
    let s = ssh_setup("cmpmux", 1, "");
    let agent = s.agent("agent");
    let ctl = s.sshd.dir.join("cm.sock");
    // As ansible does: ControlMaster=auto with ControlPersist; the first
    // client becomes the master and stays in the background.
    let mux = [
        "-o".to_string(),
        "ControlMaster=auto".into(),
        "-o".into(),
        format!("ControlPath={}", ctl.display()),
        "-o".into(),
        "ControlPersist=30".into(),
    ];
    let ssh = |args: &[&str]| {
        let mut c = Command::new("ssh");
        c.args(s.sshd.ssh_opts(&s.agent_kh))
            .args(&mux)
            .args(["-p", &s.sshd.port.to_string(), "root@127.0.0.1"])
            .args(args);
        agent.apply(&mut c);
        c
    };
    // The backgrounded master keeps whatever stdio it was given: null, so
    // nothing waits on its pipes.
    let first = ssh(&["true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("ssh");
    assert!(first.success(), "{}", s.log());
    wait_until(Duration::from_secs(20), || ctl.exists(), "control socket");
    let cmd = "sh -c 'exec >&- 2>&-; sleep 0.3; exit 7'";
    let runs: Vec<_> = (0..10)
        .map(|i| {
            // Half of them with a fast command and output too.
            let c = ssh(&[if i % 2 == 0 { cmd } else { "echo hi; exit 7" }]);
            std::thread::spawn(move || run_with_input(c, b"", Duration::from_secs(60)))
        })
        .collect();
    let codes: Vec<Option<i32>> = runs
        .into_iter()
        .map(|t| t.join().expect("thread").status.code())
        .collect();
    let _ = ssh(&["-O", "exit"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        codes.iter().all(|c| *c == Some(7)),
        "exit codes {codes:?}\n{}",
        s.log()
    );
}

/// paramiko logs in with an empty password and with `auth_none`: the
/// daemon takes any client authentication (docs/ssh.md says so).
#[test]
fn paramiko_logs_in_without_a_key() {
    let s = ssh_setup("cmppmk", 1, "");
    let agent = s.agent("agent");
    let script = r#"
import json, sys, paramiko
a = json.loads(sys.argv[1])
out = {}
c = paramiko.SSHClient()
c.load_host_keys(a["known_hosts"])
c.set_missing_host_key_policy(paramiko.RejectPolicy())
c.connect("127.0.0.1", port=a["port"], username="agent", password="",
          look_for_keys=False, allow_agent=False, timeout=15)
_, o, _ = c.exec_command("echo via-empty-password")
out["password"] = o.read().decode()
c.close()
t = paramiko.Transport(("127.0.0.1", a["port"]))
t.start_client(timeout=15)
key = t.get_remote_server_key()
known = paramiko.HostKeys(a["known_hosts"])
host = "[127.0.0.1]:%d" % a["port"]
out["host_key_ok"] = known.check(host, key)
t.auth_none("agent")
ch = t.open_session()
ch.exec_command("echo via-auth-none")
out["none"] = ch.makefile().read().decode()
out["none_status"] = ch.recv_exit_status()
t.close()
print(json.dumps(out))
"#;
    let args = json!({"known_hosts": s.agent_kh, "port": s.sshd.port});
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", script, &args.to_string()]);
    agent.apply(&mut cmd);
    let out = run_with_input(cmd, b"", Duration::from_secs(60));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}\n{}",
            text(&out.stdout),
            text(&out.stderr),
            s.log()
        )
    });
    assert_eq!(v["password"], "via-empty-password\n", "{v}");
    assert_eq!(v["host_key_ok"], true, "{v}");
    assert_eq!(v["none"], "via-auth-none\n", "{v}");
    assert_eq!(v["none_status"], 0, "{v}");
}

/// The recording agrees with the audit: the replay footer has the exit
/// status, `meta.json` the byte counts of `session_end`; `portcullis
/// sessions` and `replay` find the daemon's state dir on their own; a
/// large binary transfer makes a small cast that says what it left out.
#[test]
fn recordings_agree_with_the_audit() {
    let s = ssh_setup("cmprec", 1, "");
    let agent = s.agent("agent");
    let out = s.ssh(&agent, &[], &["sh -c 'echo hi; exit 7'"], b"");
    assert_eq!(out.status.code(), Some(7), "{}", s.log());
    let payload = binary_payload(4_000_000);
    let remote = s.sshd.dir.join("big.bin");
    fs::write(&remote, &payload).unwrap();
    let got = s.sshd.dir.join("big.scp");
    let out = scp_get(&s, &agent, &remote, &got);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), s.log());
    assert!(fs::read(&got).unwrap() == payload);

    // No --state-dir: the daemon says where its recordings are.
    let ended = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v["sessions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["end_reason"].is_string())
            .cloned()
            .collect()
    };
    wait_until(
        Duration::from_secs(15),
        || ended(&s.daemon.json(&["sessions", "--json"])).len() >= 2,
        "both sessions listed by `portcullis sessions`",
    );
    let list = ended(&s.daemon.json(&["sessions", "--json"]));
    let find = |prefix: &str| -> String {
        list.iter()
            .find(|i| {
                i["channels"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["command"].as_str().is_some_and(|x| x.starts_with(prefix)))
            })
            .and_then(|i| i["id"].as_str())
            .unwrap_or_else(|| panic!("no session ran {prefix}: {list:#?}"))
            .to_string()
    };
    let exec_id = find("sh -c");
    let scp_id = find("scp -f");
    let audit = super::audit_events(&s.files, &[]);
    for id in [&exec_id, &scp_id] {
        let meta: serde_json::Value = serde_json::from_slice(
            &fs::read(s.files.state.join("sessions").join(id).join("meta.json")).unwrap(),
        )
        .unwrap();
        let end = audit
            .iter()
            .find(|e| e["type"] == "session_end" && e["session"] == id.as_str())
            .unwrap_or_else(|| panic!("no session_end for {id}: {audit:#?}"));
        assert_eq!(
            meta["counts"]["bytes_to_client"], end["bytes"]["to_client"],
            "{meta:#?}\n{end:#?}"
        );
        assert_eq!(
            meta["counts"]["bytes_from_client"], end["bytes"]["from_client"],
            "{meta:#?}\n{end:#?}"
        );
        assert!(meta["counts"]["bytes_to_client"].as_u64().unwrap_or(0) > 0);
    }
    let replay = s.daemon.cli_ok(&["replay", &exec_id, "--speed", "0"]);
    assert!(replay.contains("exit status 7"), "{replay}");
    assert!(!replay.contains("no exit status"), "{replay}");
    // The scp cast is small and says what it left out.
    let dir = s.files.state.join("sessions").join(&scp_id);
    let cast = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "cast"))
        .expect("a cast");
    let size = fs::metadata(&cast).unwrap().len();
    assert!(size < 1024 * 1024, "{} is {size} bytes", cast.display());
    let t = fs::read_to_string(&cast).unwrap();
    assert!(
        t.contains("more bytes left out"),
        "{}",
        &t[t.len().saturating_sub(500)..]
    );
    let replay = s.daemon.cli_ok(&["replay", &scp_id, "--speed", "0"]);
    assert!(
        replay.contains("exit status 0"),
        "{}",
        &replay[replay.len().saturating_sub(500)..]
    );
}
