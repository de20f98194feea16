//! `cargo xtask bench ssh`: bulk transfer (download and upload) and exec
//! round trips with OpenSSH `ssh` and paramiko against a local OpenSSH
//! `sshd`, each measured directly and through Portcullis (the client in the
//! tagged cgroup, the daemon holding the key, policy, audit, recording and
//! masking on), in one run, with ratios.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    ci,
    session::{run_in_cgroup, Session, SessionConfig},
    util::{catch_interrupts, output_with_timeout, require_root, step, stop_child},
};

/// Names the bench's cgroup root, pin dir and work dir.
const NAME: &str = "portcullis-bench-ssh";
/// The port the bench daemon's proxy listens on.
const LISTEN_PORT: u16 = 15003;
/// Bound of one transfer.
const TRANSFER_LIMIT: Duration = Duration::from_secs(120);

/// A bench sshd, stopped on drop.
pub(crate) struct Sshd {
    pub(crate) dir: PathBuf,
    pub(crate) port: u16,
    child: Child,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(2));
    }
}

fn keygen(path: &Path) -> Result<()> {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(path.with_extension("pub"));
    let out = output_with_timeout(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path),
        Duration::from_secs(10),
    )?;
    if !out.status.success() {
        bail!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub(crate) fn start_sshd(dir: &Path) -> Result<Sshd> {
    fs::create_dir_all(dir)?;
    fs::create_dir_all("/run/sshd").context("cannot create /run/sshd")?;
    keygen(&dir.join("host_ed25519"))?;
    keygen(&dir.join("client_ed25519"))?;
    fs::copy(dir.join("client_ed25519.pub"), dir.join("authorized_keys"))?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = dir.join("sshd_config");
    fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
             UsePAM no\nStrictModes no\nPrintMotd no\nSubsystem sftp internal-sftp\n",
            dir.join("host_ed25519").display(),
            dir.join("sshd.pid").display(),
            dir.join("authorized_keys").display()
        ),
    )?;
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("sshd.log"))?)
        .spawn()
        .context("cannot start /usr/sbin/sshd")?;
    let sshd = Sshd {
        dir: dir.to_path_buf(),
        port,
        child,
    };
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("sshd did not listen on {port}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let host = fs::read_to_string(dir.join("host_ed25519.pub"))?;
    fs::write(
        dir.join("known_hosts"),
        format!("[127.0.0.1]:{port} {host}"),
    )?;
    Ok(sshd)
}

/// How a client reaches the server: direct (own key, real host key) or
/// through Portcullis (no key, the daemon's host key, tagged cgroup).
struct Route {
    label: &'static str,
    ssh_args: Vec<String>,
    known_hosts: PathBuf,
    key: Option<PathBuf>,
    through: bool,
}

fn ssh_command(sshd: &Sshd, p: &Route, remote: &str) -> String {
    let mut parts = vec!["ssh".to_string()];
    parts.extend(p.ssh_args.iter().cloned());
    parts.push(format!("-p {} root@127.0.0.1", sshd.port));
    parts.push(format!("'{remote}'"));
    parts.join(" ")
}

/// Runs `sh -c script` (in the agent cgroup when `through`); returns its
/// stdout and the wall time.
fn timed_sh(session: &Session, p: &Route, script: &str) -> Result<(String, f64)> {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    if p.through {
        run_in_cgroup(&mut cmd, session.agent_procs_file()?);
    }
    let start = Instant::now();
    let out = output_with_timeout(&mut cmd, TRANSFER_LIMIT)?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "`{script}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        secs,
    ))
}

/// paramiko: `n` sequential `true` execs on one connection.
const PARAMIKO: &str = r#"
import json, sys, time, paramiko
a = json.loads(sys.argv[1])
c = paramiko.SSHClient()
c.load_host_keys(a["known_hosts"])
c.set_missing_host_key_policy(paramiko.RejectPolicy())
kw = {"key_filename": a["key"]} if a.get("key") else {"password": "unused"}
c.connect("127.0.0.1", port=a["port"], username="root", look_for_keys=False, allow_agent=False, timeout=15, **kw)
t = []
for _ in range(a["n"]):
    t0 = time.perf_counter()
    _, o, _ = c.exec_command("true")
    o.channel.recv_exit_status()
    t.append((time.perf_counter() - t0) * 1e6)
c.close()
t.sort()
print(json.dumps({"p50_us": t[len(t)//2], "p99_us": t[min(len(t)-1, int(len(t)*0.99))], "n": len(t)}))
"#;

fn exec_rtt(session: &Session, sshd: &Sshd, p: &Route, n: u64) -> Result<Value> {
    let args = serde_json::json!({
        "known_hosts": p.known_hosts, "port": sshd.port, "n": n, "key": p.key,
    });
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", PARAMIKO, &args.to_string()]);
    if p.through {
        run_in_cgroup(&mut cmd, session.agent_procs_file()?);
    }
    let out = output_with_timeout(&mut cmd, TRANSFER_LIMIT)?;
    if !out.status.success() {
        bail!(
            "paramiko failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("paramiko printed no JSON")
}

/// Runs the SSH benchmark: `bytes` each way, `execs` exec round trips,
/// the resource recording at level `record` (`off`, `metadata`, `full`).
pub fn ssh(bytes: u64, execs: u64, record: &str, binary: Option<PathBuf>) -> Result<()> {
    require_root()?;
    if !matches!(record, "off" | "metadata" | "full") {
        bail!("--record must be off, metadata or full");
    }
    let bin = ci::daemon_binary(binary)?;
    let work = PathBuf::from("/tmp").join(NAME);
    let sshd = start_sshd(&work.join("sshd"))?;
    step(&format!("bench sshd listening on 127.0.0.1:{}", sshd.port));

    let policies = work.join("policies");
    if policies.exists() {
        fs::remove_dir_all(&policies)?;
    }
    fs::create_dir_all(&policies)?;
    let demo = crate::util::repo_root().join("policies").join("demo");
    fs::write(
        policies.join("bench.toml"),
        format!(
            "[resource.bench-ssh]\nprotocol = \"ssh\"\nmatch = [\"127.0.0.1:{}\"]\n\
             credentials = {{ user = \"root\", private_key_file = {:?} }}\nknown_hosts = {:?}\nrecord = \"{record}\"\n\n\
             [[mask]]\nresource = \"bench-ssh\"\ndetectors = [\"aws_access_key\", \"private_key\"]\n\n\
             [issuer.demo]\nurl = \"https://issuer.portcullis.demo\"\njwks_file = {:?}\naudience = \"portcullis\"\n\n\
             [identity.bench-agent]\nissuer = \"demo\"\nsubject = \"system:serviceaccount:agents:demo\"\n",
            sshd.port,
            sshd.dir.join("client_ed25519").display().to_string(),
            sshd.dir.join("known_hosts").display().to_string(),
            demo.join("jwks.json").display().to_string()
        ),
    )?;
    fs::write(
        policies.join("bench.cedar"),
        "@id(\"bench\")\npermit(principal == Identity::\"bench-agent\", action == Action::\"ssh:exec\", resource == Resource::\"bench-ssh\");\n",
    )?;
    catch_interrupts();
    let mut session = Session::start(
        &bin,
        &SessionConfig {
            name: NAME,
            policies,
            listen_port: LISTEN_PORT,
            workers: None,
        },
    )?;
    session.tag_agent("bench-agent", Some(&demo.join("agent.token")))?;
    let daemon_pub = work.join("state").join("ssh").join("host_ed25519.pub");
    let through_kh = sshd.dir.join("through_known_hosts");
    fs::write(
        &through_kh,
        format!(
            "[127.0.0.1]:{} {}",
            sshd.port,
            fs::read_to_string(&daemon_pub)
                .with_context(|| format!("cannot read {}", daemon_pub.display()))?
        ),
    )?;
    let base = |kh: &Path| {
        vec![
            "-F /dev/null".to_string(),
            format!("-o UserKnownHostsFile={}", kh.display()),
            "-o StrictHostKeyChecking=yes -o BatchMode=yes".to_string(),
        ]
    };
    let key = sshd.dir.join("client_ed25519");
    let mut direct_args = base(&sshd.dir.join("known_hosts"));
    direct_args.push(format!("-o IdentitiesOnly=yes -i {}", key.display()));
    let paths = [
        Route {
            label: "direct",
            ssh_args: direct_args,
            known_hosts: sshd.dir.join("known_hosts"),
            key: Some(key.clone()),
            through: false,
        },
        Route {
            label: "portcullis",
            ssh_args: base(&through_kh),
            known_hosts: through_kh.clone(),
            key: None,
            through: true,
        },
    ];
    let mut rows: Vec<(String, Vec<Option<f64>>)> = Vec::new();
    let mut add_row =
        |label: &str, values: Vec<Option<f64>>| rows.push((label.to_string(), values));
    let mut failures = Vec::new();
    let mb = bytes as f64 / (1024.0 * 1024.0);
    let download = |p: &Route, s: &Sshd, n: u64| {
        format!(
            "{} | wc -c",
            ssh_command(s, p, &format!("head -c {n} /dev/zero"))
        )
    };
    let upload = |p: &Route, s: &Sshd, n: u64| {
        format!("head -c {n} /dev/zero | {}", ssh_command(s, p, "wc -c"))
    };
    type Script<'a> = &'a dyn Fn(&Route, &Sshd, u64) -> String;
    let transfers: [(&str, Script); 2] =
        [("download (MiB/s)", &download), ("upload (MiB/s)", &upload)];
    for (what, script) in transfers {
        let mut vals = Vec::new();
        for p in &paths {
            let script = script(p, &sshd, bytes);
            step(&format!("{what}, {}: {script}", p.label));
            match timed_sh(&session, p, &script) {
                Ok((out, secs)) if out == bytes.to_string() => {
                    println!("    {bytes} bytes in {secs:.2} s");
                    vals.push(Some(mb / secs));
                }
                Ok((out, _)) => {
                    failures.push(format!("{what} {}: got {out} bytes", p.label));
                    vals.push(None);
                }
                Err(e) => {
                    failures.push(format!("{what} {}: {e:#}", p.label));
                    vals.push(None);
                }
            }
        }
        add_row(what, vals);
    }
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for p in &paths {
        step(&format!(
            "exec round trip, {}: {execs} x `true` on one connection (paramiko)",
            p.label
        ));
        match exec_rtt(&session, &sshd, p, execs) {
            Ok(v) => {
                println!("    {v}");
                p50.push(v["p50_us"].as_f64().map(|u| u / 1000.0));
                p99.push(v["p99_us"].as_f64().map(|u| u / 1000.0));
            }
            Err(e) => {
                failures.push(format!("exec {}: {e:#}", p.label));
                p50.push(None);
                p99.push(None);
            }
        }
    }
    add_row("exec round trip p50 (ms)", p50);
    add_row("exec round trip p99 (ms)", p99);
    let mut connect = Vec::new();
    for p in &paths {
        let script = ssh_command(&sshd, p, "true");
        step(&format!("connect + exec, {}: {script}", p.label));
        let mut times = Vec::new();
        for _ in 0..10 {
            match timed_sh(&session, p, &script) {
                Ok((_, s)) => times.push(s * 1000.0),
                Err(e) => {
                    failures.push(format!("connect {}: {e:#}", p.label));
                    break;
                }
            }
        }
        times.sort_by(f64::total_cmp);
        connect.push(times.get(times.len() / 2).copied());
    }
    add_row("ssh connect+exec p50 (ms)", connect);

    println!();
    println!(
        "{:<30} {:>14} {:>14} {:>18}",
        "SSH benchmark", "direct", "portcullis", "portcullis/direct"
    );
    for (label, v) in &rows {
        let cell = |x: Option<f64>| x.map_or_else(|| "failed".to_string(), |x| format!("{x:.1}"));
        let (d, t) = (v.first().copied().flatten(), v.get(1).copied().flatten());
        let ratio = match (d, t) {
            (Some(d), Some(t)) if d > 0.0 => format!("{:.2}", t / d),
            _ => "-".into(),
        };
        println!("{label:<30} {:>14} {:>14} {ratio:>18}", cell(d), cell(t));
    }
    println!(
        "  transfers: {mb:.0} MiB each way; exec: {execs} round trips; connect+exec: median of 10; record = {record}, masking on"
    );
    for line in verdicts(&rows) {
        println!("{line}");
    }
    if !failures.is_empty() {
        eprintln!("daemon log ends with:\n{}", session.log_tail(20));
        bail!("some measurements failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// Transfers through / direct, at least (DESIGN.md, "Performance targets").
const TARGET_TRANSFER_RATIO: f64 = 0.9;

/// PASS/MISS of the transfer rows against the target; a failed
/// measurement is a MISS.
fn verdicts(rows: &[(String, Vec<Option<f64>>)]) -> Vec<String> {
    rows.iter()
        .filter(|(label, _)| label.starts_with("download") || label.starts_with("upload"))
        .map(|(label, v)| {
            let what = label.split(' ').next().unwrap_or(label);
            let ratio = match (v.first().copied().flatten(), v.get(1).copied().flatten()) {
                (Some(d), Some(t)) if d > 0.0 => Some(t / d),
                _ => None,
            };
            format!(
                "{}: {what} {} of direct (target at least {TARGET_TRANSFER_RATIO:.2})",
                if ratio.is_some_and(|r| r >= TARGET_TRANSFER_RATIO) {
                    "PASS"
                } else {
                    "MISS"
                },
                ratio.map_or_else(|| "failed".to_string(), |r| format!("{r:.2}"))
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::verdicts;

    #[test]
    fn transfer_verdicts_compare_with_the_target() {
        let rows = vec![
            (
                "download (MiB/s)".to_string(),
                vec![Some(100.0), Some(95.0)],
            ),
            ("upload (MiB/s)".to_string(), vec![Some(100.0), None]),
            (
                "exec round trip p50 (ms)".to_string(),
                vec![Some(1.0), Some(2.0)],
            ),
        ];
        let lines = verdicts(&rows);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("PASS: download 0.95"), "{lines:?}");
        assert!(lines[1].starts_with("MISS: upload failed"), "{lines:?}");
    }
}
