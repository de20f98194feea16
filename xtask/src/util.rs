//! Helpers shared by the xtask subcommands: running commands with bounded
//! waits, finding the workspace's paths, reading the mount table, signals,
//! processes' children and CPU time.

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    io::Read,
    os::unix::ffi::OsStringExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// The workspace root (the parent of the xtask crate).
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// Cargo's target directory for this workspace: `CARGO_TARGET_DIR` or
/// `CARGO_BUILD_TARGET_DIR` when set (relative to the workspace root), else
/// `<root>/target`.
pub fn target_dir() -> PathBuf {
    let root = repo_root();
    for var in ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"] {
        if let Some(value) = env::var_os(var).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(value);
            return if path.is_absolute() {
                path
            } else {
                root.join(path)
            };
        }
    }
    root.join("target")
}

/// `$CARGO_HOME`, or `~/.cargo` when it is not set, as an absolute path.
pub fn cargo_home() -> Result<PathBuf> {
    let home = match env::var_os("CARGO_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .context("neither CARGO_HOME nor HOME is set")?;
            PathBuf::from(home).join(".cargo")
        }
    };
    std::path::absolute(&home).with_context(|| format!("cannot make {} absolute", home.display()))
}

/// Puts `$CARGO_HOME/bin` on this process's `PATH` (and so on every child's)
/// when it is missing: `bpf-linker` is installed there and the eBPF build
/// looks it up on `PATH`.
pub fn ensure_cargo_bin_on_path() -> Result<()> {
    let bin = cargo_home()?.join("bin");
    let current = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&current).any(|p| p == bin) {
        return Ok(());
    }
    let joined = env::join_paths(std::iter::once(bin).chain(env::split_paths(&current)))
        .context("cannot build PATH with $CARGO_HOME/bin")?;
    // Called from `main` before any thread is started.
    env::set_var("PATH", joined);
    Ok(())
}

/// A `cargo` command (the cargo that runs xtask, else `cargo` from `PATH`)
/// working in the workspace root.
pub fn cargo() -> Command {
    let program = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(program);
    cmd.current_dir(repo_root());
    cmd
}

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut text = short_program(cmd.get_program());
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// The file name of a program path (`/a/b/cargo` → `cargo`).
fn short_program(program: &OsStr) -> String {
    Path::new(program)
        .file_name()
        .unwrap_or(program)
        .to_string_lossy()
        .into_owned()
}

/// Runs `cmd` with inherited stdio and fails unless it exits with status 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails (with its stderr) unless it exits
/// with status 0.
pub fn stdout_of(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with its output captured, killing it when it is still running
/// after `timeout`. The exit status is returned as is (not checked).
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    let stdout = child.stdout.take().map(spawn_reader);
    let stderr = child.stderr.take().map(spawn_reader);
    let status = match wait_with_timeout(&mut child, timeout)? {
        Some(status) => status,
        None => bail!("`{}` did not finish within {timeout:?}", describe(cmd)),
    };
    let collect = |reader: Option<thread::JoinHandle<Vec<u8>>>| {
        reader
            .map(|handle| handle.join().unwrap_or_default())
            .unwrap_or_default()
    };
    Ok(Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

/// Reads a pipe to its end on a thread.
fn spawn_reader(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just ends the capture: the exit status tells the story.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Waits up to `timeout` for `child`; on timeout kills and reaps it and
/// returns `None`.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("cannot wait for a child")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Stops `child`: SIGTERM, then SIGKILL when it is still running after
/// `grace`. Always reaps it.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    // The child is not reaped yet, so its pid cannot have been reused.
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            _ => return,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A child process that is killed and reaped when the guard is dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with a clear message unless running as root.
pub fn require_root() -> Result<()> {
    if !is_root() {
        bail!(
            "this task must run as root: it installs packages, mounts bpffs, creates cgroups \
             and loads eBPF programs (try `sudo -E cargo xtask ...`)"
        );
    }
    Ok(())
}

/// One line of `/proc/self/mounts`.
pub struct Mount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Its filesystem type (`cgroup2`, `bpf`, ...).
    pub fs_type: String,
}

/// The current mount table, from `/proc/self/mounts`.
pub fn mounts() -> Result<Vec<Mount>> {
    let text = fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let mount_point = fields.next()?;
            let fs_type = fields.next()?;
            Some(Mount {
                mount_point: PathBuf::from(OsString::from_vec(unescape_mount_field(mount_point))),
                fs_type: fs_type.to_owned(),
            })
        })
        .collect())
}

/// Undoes the octal escapes (`\040` for a space) of `/proc/self/mounts`.
fn unescape_mount_field(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Where the cgroup v2 hierarchy is mounted (fstype `cgroup2`); hybrid hosts
/// have it at `/sys/fs/cgroup/unified`, pure v2 hosts at `/sys/fs/cgroup`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    mounts()?
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .context("no cgroup v2 filesystem is mounted (no fstype cgroup2 in /proc/self/mounts)")
}

/// Set by the SIGINT/SIGTERM handler.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The signal handler: only records the signal.
extern "C" fn note_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM only set a flag (see [`interrupted`]), so
/// the task can tear down what it started instead of dying.
pub fn catch_interrupts() {
    let handler = note_interrupt as extern "C" fn(libc::c_int);
    // SAFETY: the handler only stores to an atomic, which is
    // async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// Whether SIGINT or SIGTERM arrived since [`catch_interrupts`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The last `n` lines of a text file (lossy UTF-8), or a note when it
/// cannot be read.
pub fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Prints a step header.
pub fn step(text: &str) {
    println!("==> {text}");
}

/// The pids whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|st| {
                    let rest = &st[st.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// A process's user + system CPU time so far, in USER_HZ ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime = fields.get(11)?.parse::<u64>().ok()?;
    let stime = fields.get(12)?.parse::<u64>().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_mount_field(r"/a\040b"), b"/a b".to_vec());
        assert_eq!(unescape_mount_field(r"/plain"), b"/plain".to_vec());
        assert_eq!(unescape_mount_field(r"/end\04"), br"/end\04".to_vec());
    }
}
