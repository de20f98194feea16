//! A Portcullis daemon started for the demo or the benchmark, with its own
//! cgroups, pins, admin socket and state, and a guard that tears all of it
//! down however the task ends (success, error, panic, Ctrl-C).

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::{net::UnixStream, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::util::{
    cgroup2_mount, describe, interrupted, output_with_timeout, step, stop_child, tail,
};

/// How long the daemon gets to answer `status` after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a client command (`status`, `tag`, `flows`, `detach`) may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What differs between the demo's and the benchmark's daemon.
pub struct SessionConfig {
    /// Names the cgroup root (under the cgroup2 mount), the pin directory
    /// (under /sys/fs/bpf) and the work directory (under /tmp).
    pub name: &'static str,
    /// The policy directory given to the daemon.
    pub policies: PathBuf,
    /// The port the daemon's proxy listens on.
    pub listen_port: u16,
    /// The daemon's connection workers (`--workers`); `None`: its default.
    pub workers: Option<usize>,
}

/// A running daemon and everything made for it; dropping it tears down.
pub struct Session {
    /// The `portcullis` binary.
    bin: PathBuf,
    /// The daemon's admin socket.
    admin_socket: PathBuf,
    /// Where the daemon pins its links and maps.
    pin_dir: PathBuf,
    /// The cgroup2 mount.
    cgroup_mount: PathBuf,
    /// `<mount>/<name>`: where the daemon attaches its programs.
    cgroup_root: PathBuf,
    /// `<mount>/<name>/agent`: the cgroup that gets tagged.
    agent_cgroup: PathBuf,
    /// The daemon's stdout and stderr.
    log_path: PathBuf,
    /// The daemon's state directory (audit log, recordings).
    state_dir: PathBuf,
    /// Whether the agent cgroup was tagged (teardown untags it).
    tagged: bool,
    /// The daemon process, while running.
    daemon: Option<Child>,
    /// The daemon's `--config` file, when the caller gives one.
    daemon_config: Option<PathBuf>,
}

impl Session {
    /// Creates the cgroups, starts the daemon and waits until it answers
    /// `status --json`.
    pub fn start(bin: &Path, config: &SessionConfig) -> Result<Self> {
        Self::start_with_config(bin, config, None)
    }

    /// [`Session::start`] with the daemon reading `daemon_config`
    /// (`--config`; e.g. a `[console]` table).
    pub fn start_with_config(
        bin: &Path,
        config: &SessionConfig,
        daemon_config: Option<&Path>,
    ) -> Result<Self> {
        let cgroup_mount = cgroup2_mount()?;
        let work_dir = PathBuf::from("/tmp").join(config.name);
        let state_dir = work_dir.join("state");
        fs::create_dir_all(&state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        let admin_socket = work_dir.join("admin.sock");
        // Before the guard exists: its teardown must not hit another daemon.
        remove_stale_socket(&admin_socket)?;
        // No daemon of this name runs: an earlier run's audit log and
        // recordings go (a few hundred MB per HTTP or PostgreSQL run, which
        // filled the disk over a day of runs).
        for dir in ["audit", "sessions"] {
            let old = state_dir.join(dir);
            match fs::remove_dir_all(&old) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", old.display()))
                }
            }
        }
        let cgroup_root = cgroup_mount.join(config.name);
        let mut session = Self {
            bin: bin.to_path_buf(),
            admin_socket,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(config.name),
            agent_cgroup: cgroup_root.join("agent"),
            cgroup_root,
            cgroup_mount,
            log_path: work_dir.join("daemon.log"),
            state_dir: state_dir.clone(),
            tagged: false,
            daemon: None,
            daemon_config: daemon_config.map(Path::to_path_buf),
        };
        session.clear_leftovers();
        fs::create_dir_all(&session.agent_cgroup)
            .with_context(|| format!("cannot create cgroup {}", session.agent_cgroup.display()))?;
        step(&format!(
            "created cgroup {}",
            session.agent_cgroup.display()
        ));
        session.spawn_daemon(config, &state_dir)?;
        session.wait_ready()?;
        Ok(session)
    }

    /// Removes pins a killed earlier run may have left.
    fn clear_leftovers(&self) {
        if self.pin_dir.exists() {
            step(&format!(
                "removing pins left by an earlier run in {}",
                self.pin_dir.display()
            ));
            self.detach();
        }
    }

    /// Starts the daemon in its own process group (Ctrl-C reaches only
    /// xtask, which then tears down in order), logging to `daemon.log`.
    fn spawn_daemon(&mut self, config: &SessionConfig, state_dir: &Path) -> Result<()> {
        let log = File::create(&self.log_path)
            .with_context(|| format!("cannot create {}", self.log_path.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("daemon")
            .arg("--policies")
            .arg(&config.policies)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--cgroup-root")
            .arg(config.name)
            .arg("--listen-port")
            .arg(config.listen_port.to_string())
            .args(["--metrics", "off"]);
        if let Some(n) = config.workers {
            cmd.arg("--workers").arg(n.to_string());
        }
        if let Some(file) = &self.daemon_config {
            cmd.arg("--config").arg(file);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs here.
        unsafe {
            cmd.pre_exec(|| {
                // Stop the daemon if xtask dies without tearing down.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        step(&format!(
            "starting the daemon (log: {}): {}",
            self.log_path.display(),
            describe(&cmd)
        ));
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.daemon = Some(child);
        Ok(())
    }

    /// Polls `status --json` until it succeeds, the daemon exits, or
    /// [`READY_TIMEOUT`] passes.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error = String::from("no answer yet");
        while Instant::now() < deadline {
            if interrupted() {
                bail!("interrupted");
            }
            if let Some(status) = self.daemon_exited() {
                bail!(
                    "the daemon exited ({status}) before it was ready; its log ends with:\n{}",
                    self.log_tail(30)
                );
            }
            match output_with_timeout(self.client().args(["status", "--json"]), CLIENT_TIMEOUT) {
                Ok(out) if out.status.success() => {
                    step("the daemon is ready");
                    return Ok(());
                }
                Ok(out) => last_error = String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                Err(e) => last_error = format!("{e:#}"),
            }
            thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "the daemon did not answer `status` within {READY_TIMEOUT:?} (last error: {last_error}); \
             its log ends with:\n{}",
            self.log_tail(30)
        )
    }

    /// A client command: `portcullis --admin-socket <socket>`.
    pub fn client(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--admin-socket").arg(&self.admin_socket);
        cmd
    }

    /// Runs a client command, failing with its stderr unless it succeeds;
    /// returns its stdout.
    pub fn client_output(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.client();
        cmd.args(args);
        let out = output_with_timeout(&mut cmd, CLIENT_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                describe(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The daemon's connection workers, as `portcullis status` gives them.
    pub fn workers(&self) -> Result<u64> {
        let status: serde_json::Value =
            serde_json::from_str(&self.client_output(&["status", "--json"])?)
                .context("portcullis status --json is not JSON")?;
        status["workers"]
            .as_u64()
            .context("portcullis status --json names no workers")
    }

    /// Tags `<name>/agent` with `identity`, proven by the token in
    /// `token_file` when given.
    pub fn tag_agent(&mut self, identity: &str, token_file: Option<&Path>) -> Result<()> {
        let relative = self.agent_cgroup_relative()?;
        let mut args = vec![
            "tag".to_owned(),
            relative,
            "--identity".to_owned(),
            identity.to_owned(),
        ];
        if let Some(token) = token_file {
            args.push("--token-file".to_owned());
            args.push(token.display().to_string());
        }
        step(&format!(
            "portcullis --admin-socket {} {}",
            self.admin_socket.display(),
            args.join(" ")
        ));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.client_output(&args)?;
        self.tagged = true;
        print_indented(&out);
        Ok(())
    }

    /// The agent cgroup relative to the cgroup2 mount, as `tag` takes it.
    fn agent_cgroup_relative(&self) -> Result<String> {
        Ok(self
            .agent_cgroup
            .strip_prefix(&self.cgroup_mount)
            .context("the agent cgroup is not under the cgroup2 mount")?
            .to_string_lossy()
            .into_owned())
    }

    /// The daemon's state directory (`--state-dir` for offline commands).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The `portcullis` binary.
    pub fn binary(&self) -> &Path {
        &self.bin
    }

    /// The agent cgroup's directory.
    pub fn agent_cgroup(&self) -> &Path {
        &self.agent_cgroup
    }

    /// The admin socket's path.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// The daemon log's path.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The daemon's pid, while it runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// Opens the agent cgroup's `cgroup.procs` for [`run_in_cgroup`].
    pub fn agent_procs_file(&self) -> Result<File> {
        let path = self.agent_cgroup.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))
    }

    /// The daemon's exit status when it has exited.
    pub fn daemon_exited(&mut self) -> Option<ExitStatus> {
        self.daemon
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// The last `n` lines of the daemon's log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path, n)
    }

    /// `portcullis detach --pin-dir <pins>`, then removes the pin directory
    /// should anything be left in it.
    fn detach(&self) {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("detach").arg("--pin-dir").arg(&self.pin_dir);
        match output_with_timeout(&mut cmd, CLIENT_TIMEOUT) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: `{}` failed ({}): {}",
                describe(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: {e:#}"),
        }
        if self.pin_dir.exists() {
            // Unlinking the pins detaches the programs.
            if let Err(e) = fs::remove_dir_all(&self.pin_dir) {
                eprintln!("warning: cannot remove {}: {e}", self.pin_dir.display());
            }
        }
    }

    /// Stops the daemon, detaches, removes the cgroups.
    fn teardown(&mut self) {
        step("teardown");
        if self.tagged && self.daemon.is_some() {
            self.tagged = false;
            if let Ok(relative) = self.agent_cgroup_relative() {
                println!("    untagging {relative}");
                if let Err(e) = self.client_output(&["untag", &relative]) {
                    eprintln!("warning: {e:#}");
                }
            }
        }
        if let Some(mut daemon) = self.daemon.take() {
            println!("    stopping the daemon (pid {})", daemon.id());
            stop_child(&mut daemon, Duration::from_secs(5));
        }
        println!("    detaching (pins in {})", self.pin_dir.display());
        self.detach();
        println!("    removing cgroup {}", self.cgroup_root.display());
        remove_cgroup(&self.cgroup_root, &self.cgroup_mount);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Removes an admin socket nobody answers on; fails when a daemon does.
fn remove_stale_socket(socket: &Path) -> Result<()> {
    if !socket.exists() {
        return Ok(());
    }
    if UnixStream::connect(socket).is_ok() {
        bail!(
            "a daemon already answers on {}: stop it first",
            socket.display()
        );
    }
    fs::remove_file(socket).with_context(|| format!("cannot remove stale {}", socket.display()))
}

/// Makes `cmd`'s child move itself into the cgroup whose `cgroup.procs` is
/// `procs` before it execs (writing "0" moves the writer).
pub fn run_in_cgroup(cmd: &mut Command, procs: File) {
    // SAFETY: the closure only calls write(2) on a descriptor opened before
    // fork: no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || (&procs).write_all(b"0"));
    }
}

/// Removes a cgroup and its descendants, moving any process still inside
/// to the root cgroup first. Best effort, bounded.
fn remove_cgroup(dir: &Path, mount: &Path) {
    if !dir.exists() {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path(), mount);
            }
        }
    }
    let mut last_error = None;
    for _ in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => last_error = Some(e),
        }
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = fs::write(mount.join("cgroup.procs"), pid);
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    if let Some(e) = last_error {
        eprintln!("warning: cannot remove cgroup {}: {e}", dir.display());
    }
}

/// Prints `text` indented by four spaces.
pub fn print_indented(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}
