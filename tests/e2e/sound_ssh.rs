//! Soundness of the `ssh` handler (issue 14, item 9): an exec string goes
//! to the remote user's shell unchanged, so one with shell syntax is
//! decided as `ssh:shell`, never as the `ssh:exec` of its first word.
//!
//! Real OpenSSH `ssh` in a tagged cgroup, through the daemon, to a real
//! `sshd` whose `authorized_keys` forces a wrapper that logs
//! `$SSH_ORIGINAL_COMMAND` (what sshd was asked to run) before running it:
//! every logged command must be one the audit log shows as allowed.

use std::{
    collections::HashSet,
    fs,
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use base64::Engine as _;
use serde_json::Value;

use super::harness::*;

struct SoundSsh {
    _cg: TestCgroup,
    sshd: SshServer,
    files: DaemonFiles,
    daemon: Daemon,
    agent_kh: PathBuf,
    /// One base64 line per command sshd ran (the forced wrapper's log).
    ran_log: PathBuf,
    /// A directory on the "remote" host with a Makefile (`test`, `build`).
    work: PathBuf,
}

impl SoundSsh {
    fn ssh(&self, identity: &str, command: &str) -> Output {
        let cg = self._cg.child(identity);
        self.daemon.tag(&cg, identity);
        let place = Placement::cgroup(self._cg.dir(&cg));
        let mut cmd = Command::new("timeout");
        cmd.args(["60", "ssh"])
            .args(self.sshd.ssh_opts(&self.agent_kh))
            .args(["-p", &self.sshd.port.to_string(), "root@127.0.0.1"])
            .arg(command)
            .stdin(Stdio::null());
        place.apply(&mut cmd);
        cmd.output().expect("run ssh")
    }

    /// The commands sshd ran, as the wrapper logged them.
    fn ran(&self) -> Vec<String> {
        fs::read_to_string(&self.ran_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let b = base64::engine::general_purpose::STANDARD
                    .decode(l.trim())
                    .expect("wrapper log line is base64");
                String::from_utf8_lossy(&b).into_owned()
            })
            .collect()
    }

    fn commands(&self) -> Vec<Value> {
        super::audit_events(&self.files, &[])
            .into_iter()
            .filter(|e| e["type"] == "command")
            .collect()
    }

    /// The differential check: everything sshd ran is an allowed command
    /// of the audit log, character for character.
    fn sshd_ran_only_allowed(&self) -> Vec<String> {
        let allowed: HashSet<String> = self
            .commands()
            .iter()
            .filter(|e| e["decision"] == "allow")
            .filter_map(|e| e["detail"]["command"].as_str().map(str::to_string))
            .collect();
        let ran = self.ran();
        for c in &ran {
            assert!(
                allowed.contains(c),
                "sshd ran {c:?}, which the audit log does not show as allowed: {allowed:#?}"
            );
        }
        ran
    }

    fn log(&self) -> String {
        format!(
            "--- daemon log:\n{}\n--- sshd log:\n{}",
            self.daemon.log_text(),
            self.sshd.log_text()
        )
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sound_ssh_setup(name: &str, rules: &str) -> SoundSsh {
    require_root();
    let sshd = SshServer::start(name);
    // Force every login of the daemon's key through a wrapper that logs
    // what sshd was asked to run, then runs it as sshd would have.
    let ran_log = sshd.dir.join("ran.log");
    fs::write(&ran_log, "").unwrap();
    let wrapper = sshd.dir.join("wrapper.sh");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprintf '%s' \"$SSH_ORIGINAL_COMMAND\" | base64 -w0 >> {log}\necho >> {log}\nexec /bin/sh -c \"$SSH_ORIGINAL_COMMAND\"\n",
            log = ran_log.display()
        ),
    )
    .unwrap();
    run_ok(Command::new("chmod").arg("755").arg(&wrapper));
    let key = fs::read_to_string(sshd.dir.join("authorized_keys")).unwrap();
    fs::write(
        sshd.dir.join("authorized_keys"),
        format!("command=\"{}\" {key}", wrapper.display()),
    )
    .unwrap();
    let work = sshd.dir.join("work");
    fs::create_dir_all(&work).unwrap();
    fs::write(
        work.join("Makefile"),
        "test:\n\t@echo made-test\nbuild:\n\t@echo made-build\nclean:\n\t@echo made-clean\n",
    )
    .unwrap();
    let cg = TestCgroup::new(name);
    let files = DaemonFiles::new(&cg.rel);
    files.identities(IDENTITIES);
    files.rules(
        "ssh.cedar",
        &rules.replace("WORK", &work.display().to_string()),
    );
    fs::write(
        files.policies.join("box.toml"),
        format!(
            "[resource.box]\nprotocol = \"ssh\"\nmatch = [\"127.0.0.1:{}\"]\n\
             credentials = {{ user = \"root\", private_key_file = {:?} }}\n\
             known_hosts = {:?}\nrecord = \"full\"\n",
            sshd.port,
            sshd.upstream_key.display().to_string(),
            sshd.known_hosts.display().to_string(),
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&files);
    let agent_kh = sshd.agent_known_hosts(&files.state.join("ssh").join("host_ed25519.pub"));
    SoundSsh {
        _cg: cg,
        sshd,
        files,
        daemon,
        agent_kh,
        ran_log,
        work,
    }
}

/// `agent`: the rule shipped before issue 14 (`like "make *"`), which a
/// shell string walked around. `agent1`: the sound form, program and an
/// allowed set of arguments.
const RULES: &str = r#"
@id("make-like")
permit(principal == Identity::"agent", action == Action::"ssh:exec", resource == Resource::"box")
  when { context.command like "make *" };
@id("make-argv")
permit(principal == Identity::"agent1", action == Action::"ssh:exec", resource == Resource::"box")
  when { context.program == "make" && ["-C", "WORK", "test", "build"].containsAll(context.args) };
"#;

#[test]
fn exec_strings_with_shell_syntax_are_shells_and_plain_commands_run() {
    let s = sound_ssh_setup("snd-ssh", RULES);
    let work = s.work.display().to_string();
    let pwned = s.sshd.dir.join("pwned");
    let p = pwned.display().to_string();
    let attacks = [
        format!("make -C {work} test; touch {p}"),
        format!("make -C {work} test && touch {p}"),
        format!("make -C {work} test || touch {p}"),
        format!("make -C {work} test | touch {p}"),
        format!("make -C {work} test & touch {p}"),
        format!("make -C {work} $(touch {p})"),
        format!("make -C {work} `touch {p}`"),
        format!("make -C {work} \"$(touch {p})\""),
        format!("make -C {work} test\ntouch {p}"),
        format!("make -C {work} test > {p}"),
        format!("make -C {work} test #; touch {p}"),
    ];
    for identity in ["agent", "agent1"] {
        for a in &attacks {
            let out = s.ssh(identity, a);
            assert_eq!(
                out.status.code(),
                Some(126),
                "{identity} {a:?}: {}\n{}",
                text(&out.stderr),
                s.log()
            );
            let err = text(&out.stderr);
            assert!(
                err.contains("ssh:shell denied") && err.contains("decided as ssh:shell because"),
                "{a:?}: {err}"
            );
            assert!(!pwned.exists(), "{a:?} ran upstream");
        }
    }
    assert!(s.ran().is_empty(), "sshd ran {:?}", s.ran());
    // Audited as shells, with why.
    let cmds = s.commands();
    let shells: Vec<&Value> = cmds
        .iter()
        .filter(|e| e["action"] == "ssh:shell" && e["decision"] == "deny")
        .collect();
    assert_eq!(shells.len(), 2 * attacks.len(), "{cmds:#?}");
    assert!(shells
        .iter()
        .all(|e| e["detail"]["shell_syntax"].as_str().is_some()));

    // Controls: the plain form runs, for both rules, quotes and all.
    for (identity, c) in [
        ("agent", format!("make -C {work} test")),
        ("agent1", format!("make -C {work} test")),
        ("agent1", format!("make -C '{work}' \"build\"")),
    ] {
        let out = s.ssh(identity, &c);
        assert!(
            out.status.success(),
            "{c}: {}\n{}",
            text(&out.stderr),
            s.log()
        );
        assert!(text(&out.stdout).contains("\nmade-"), "{c}: {out:?}");
    }
    // The argv rule allows only its arguments; the `like` rule, being
    // about the text, allows any make target.
    let out = s.ssh("agent1", &format!("make -C {work} clean"));
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    assert!(text(&out.stderr).contains("ssh:exec denied"), "{out:?}");
    let out = s.ssh("agent1", &format!("make -f /dev/null -C {work} test"));
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    let ran = s.sshd_ran_only_allowed();
    assert_eq!(
        ran,
        [
            format!("make -C {work} test"),
            format!("make -C {work} test"),
            format!("make -C '{work}' \"build\""),
        ],
        "{}",
        s.log()
    );
    assert!(!pwned.exists());
}
