//! rsync and Ansible behave through Portcullis as they do directly
//! (issue 19, the compatibility suite): the same runs, in the same test,
//! once straight to sshd (with the key the daemon holds) and once from
//! a tagged cgroup through the daemon; any difference in exit status,
//! itemized changes, transferred bytes or task results fails. Run by
//! `cargo xtask compat` (and `cargo xtask test`).

use std::{fs, path::Path, process::Command, time::Duration};

use super::ssh::{events, run_with_input, ssh_setup, text, Ssh};

/// Which way a client reaches sshd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Direct,
    Portcullis,
}

/// `ssh` options for `via`: the real host key and the daemon's key
/// directly; the daemon's host key (and no key at all) through it.
fn ssh_opts(s: &Ssh, via: Via) -> Vec<String> {
    match via {
        Via::Direct => {
            let mut o = s.sshd.ssh_opts(&s.sshd.known_hosts);
            o.extend([
                "-i".into(),
                s.sshd.upstream_key.display().to_string(),
                "-o".into(),
                "IdentitiesOnly=yes".into(),
            ]);
            o
        }
        Via::Portcullis => s.sshd.ssh_opts(&s.agent_kh),
    }
}

fn run(s: &Ssh, via: Via, mut cmd: Command) -> std::process::Output {
    if via == Via::Portcullis {
        s.agent("agent").apply(&mut cmd);
    }
    run_with_input(cmd, b"", Duration::from_secs(120))
}

/// A tree of text and binary files (deterministic).
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("sub/deeper")).expect("tree");
    fs::write(
        root.join("a.txt"),
        "hello\nmail alice@example.com\n".repeat(200),
    )
    .expect("a");
    let mut x: u32 = 0x1234_5678;
    let blob: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    fs::write(root.join("sub/blob.bin"), &blob).expect("blob");
    fs::write(root.join("sub/deeper/empty"), "").expect("empty");
}

/// rsync's outcome: exit status and its itemized changes, sorted.
fn rsync(s: &Ssh, via: Via, args: &[&str]) -> (Option<i32>, Vec<String>) {
    let e = format!("ssh {} -p {}", ssh_opts(s, via).join(" "), s.sshd.port);
    let mut cmd = Command::new("rsync");
    cmd.args(["-a", "--itemize-changes", "-e", &e]).args(args);
    let out = run(s, via, cmd);
    // The run's own directory names (`remote-Direct`) are not a difference.
    let mut lines: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.replace(&format!("{via:?}"), "VIA"))
        .collect();
    lines.sort();
    assert!(
        out.status.success(),
        "rsync {via:?} {args:?} exited {:?}: {}\n{}",
        out.status,
        text(&out.stderr),
        s.log()
    );
    (out.status.code(), lines)
}

fn same_tree(a: &Path, b: &Path) {
    for f in ["a.txt", "sub/blob.bin", "sub/deeper/empty"] {
        assert!(
            fs::read(a.join(f)).ok() == fs::read(b.join(f)).ok(),
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn compat_ssh_rsync_behaves_as_directly() {
    let s = ssh_setup("cmprsync", 1, "");
    let work = s.sshd.dir.join("rsync");
    let src = work.join("src");
    make_tree(&src);
    let mut results = Vec::new();
    for via in [Via::Direct, Via::Portcullis] {
        let remote = work.join(format!("remote-{via:?}"));
        let back = work.join(format!("back-{via:?}"));
        let target = format!("root@127.0.0.1:{}/", remote.display());
        let src_arg = format!("{}/", src.display());
        // Push, an unchanged push, a delta push, then a pull.
        let push = rsync(&s, via, &[&src_arg, &target]);
        let again = rsync(&s, via, &[&src_arg, &target]);
        let mut a = fs::read(src.join("a.txt")).expect("a");
        a.extend_from_slice(b"one more line\n");
        fs::write(remote.join("a.txt"), &a[..a.len() / 2]).expect("truncate remote");
        // rsync compares times in whole seconds here: a fixed time long
        // ago, so that whether the write fell in the source's second does
        // not change the itemized `t` between the two runs.
        fs::File::options()
            .write(true)
            .open(remote.join("a.txt"))
            .and_then(|f| {
                f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000))
            })
            .expect("set the remote's time");
        let delta = rsync(&s, via, &["--checksum", &src_arg, &target]);
        let pull = rsync(&s, via, &[&target, &back.display().to_string()]);
        same_tree(&src, &remote);
        same_tree(&src, &back);
        results.push((push, again, delta, pull));
    }
    println!("COMPAT rsync direct: {:?}", results[0]);
    assert_eq!(
        results[0],
        results[1],
        "rsync differs through Portcullis\n{}",
        s.log()
    );
    assert!(
        !events(&s, "command_end", "ssh:exec").is_empty(),
        "rsync did not go through the daemon"
    );
}

/// A playbook touching the modules an inventory run uses most: facts,
/// command and shell (with a failure that is ignored), copy, file, stat,
/// fetch and a loop; its last task prints what the earlier ones returned,
/// without timings.
const PLAYBOOK: &str = r#"
- hosts: all
  gather_facts: true
  tasks:
    - ping:
    - command: echo hello
      register: echo
    - shell: "printf 'a\nb\n'; exit 3"
      register: failing
      ignore_errors: true
    - copy:
        content: "written by ansible\n"
        dest: "{{ dir }}/copied.txt"
        mode: "0640"
      register: copied
    - file:
        path: "{{ dir }}/made"
        state: directory
    - stat:
        path: "{{ dir }}/copied.txt"
        checksum_algorithm: sha256
      register: st
    - fetch:
        src: "{{ dir }}/copied.txt"
        dest: "{{ dir }}/fetched/"
        flat: true
    - command: "echo {{ item }}"
      loop: [1, 2, 3]
      register: looped
    - debug:
        msg: "RESULT {{ [echo.stdout, failing.rc, failing.stdout_lines, copied.changed, st.stat.checksum, st.stat.mode, looped.results | map(attribute='stdout') | list, ansible_facts.system] | to_json }}"
"#;

/// Runs the playbook `via`: (exit status, the RESULT line, the recap).
fn ansible(s: &Ssh, via: Via, work: &Path) -> (Option<i32>, String, String) {
    let dir = work.join(format!("{via:?}"));
    let home = dir.join("home");
    fs::create_dir_all(&home).expect("home");
    let inventory = dir.join("inventory.ini");
    fs::write(
        &inventory,
        format!(
            "target ansible_host=127.0.0.1 ansible_port={} ansible_user=root ansible_python_interpreter=/usr/bin/python3 dir={}\n",
            s.sshd.port,
            dir.display()
        ),
    )
    .expect("inventory");
    let playbook = dir.join("play.yml");
    fs::write(&playbook, PLAYBOOK).expect("playbook");
    let mut cmd = Command::new("ansible-playbook");
    cmd.arg("-i")
        .arg(&inventory)
        .arg(&playbook)
        .env("HOME", &home)
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_HOST_KEY_CHECKING", "True")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
        .env("ANSIBLE_LOCAL_TEMP", dir.join("tmp"))
        // Ansible's own multiplexing (ControlMaster, as by default), with
        // a control path of this run only and a short persistence.
        .env("ANSIBLE_SSH_CONTROL_PATH_DIR", dir.join("cp"))
        .env(
            "ANSIBLE_SSH_ARGS",
            format!(
                "{} -o ControlMaster=auto -o ControlPersist=2s",
                ssh_opts(s, via).join(" ")
            ),
        );
    let out = run(s, via, cmd);
    let stdout = text(&out.stdout);
    let result = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"msg\": "))
        .unwrap_or_default()
        .to_string();
    let recap = stdout
        .lines()
        .skip_while(|l| !l.starts_with("PLAY RECAP"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        fs::read(dir.join("fetched/copied.txt")).ok() == Some(b"written by ansible\n".to_vec()),
        "ansible {via:?}: fetch failed\n{stdout}\n{}",
        text(&out.stderr)
    );
    (out.status.code(), result, recap)
}

#[test]
fn compat_ssh_ansible_behaves_as_directly() {
    if Command::new("ansible-playbook")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("ansible-playbook is not installed (cargo xtask setup installs it)");
    }
    let s = ssh_setup("cmpansible", 1, "");
    let work = s.sshd.dir.join("ansible");
    let direct = ansible(&s, Via::Direct, &work);
    let proxied = ansible(&s, Via::Portcullis, &work);
    println!("COMPAT ansible direct: {direct:?}");
    assert!(direct.1.contains("hello"), "{direct:?}");
    assert_eq!(direct, proxied, "ansible differs through Portcullis");
    assert!(
        !events(&s, "command_end", "ssh:exec").is_empty(),
        "ansible did not go through the daemon"
    );
    // Let the control masters (ControlPersist=2s) end before teardown.
    std::thread::sleep(Duration::from_secs(3));
}
