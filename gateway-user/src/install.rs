//! `portcullis install` and `portcullis uninstall`: lay out the files a host
//! needs (binary, config, example policies, systemd unit, state dir) under a
//! prefix (`/`, or a temp root in tests), and take them away again.
//!
//! Owns only files on disk and a manifest of what it wrote
//! (`/etc/portcullis/.install-manifest.json`: path → SHA-256). It never
//! overwrites an existing config or policy file, and `uninstall` removes a
//! config or policy file only when it is still exactly what install wrote
//! (or with `--purge`). With prefix `/` it also asks systemd to reload
//! units; stopping the daemon and detaching (opening the gate) on uninstall
//! are the CLI's job (`cli.rs`), since they talk to a running daemon.

use std::{
    collections::BTreeMap,
    fs, io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::defaults;

/// The example policies, embedded at build time from `policies/`
/// (relative path, contents).
pub const EXAMPLE_POLICIES: &[(&str, &[u8])] =
    include!(concat!(env!("OUT_DIR"), "/example_policies.rs"));

/// Where the binary goes (inside the prefix).
pub const BIN_PATH: &str = "/usr/local/bin/portcullis";
/// Where the unit goes (inside the prefix).
pub const UNIT_PATH: &str = "/etc/systemd/system/portcullis.service";
const MANIFEST: &str = "/etc/portcullis/.install-manifest.json";

/// An install or uninstall that could not finish.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The manifest is not valid JSON.
    #[error("install manifest {path} is corrupt: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// The parse error.
        message: String,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What install or uninstall did, path by path (paths include the prefix).
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Files written that did not exist.
    pub created: Vec<PathBuf>,
    /// Files replaced (binary, unit).
    pub replaced: Vec<PathBuf>,
    /// Files left alone: existing config or policies on install; changed
    /// ones on uninstall.
    pub kept: Vec<PathBuf>,
    /// Files and directories removed.
    pub removed: Vec<PathBuf>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    /// Path inside the prefix → SHA-256 hex of what install wrote.
    files: BTreeMap<String, String>,
}

/// Paths inside a prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    prefix: PathBuf,
}

impl Layout {
    /// The layout under `prefix` (`/` for the real thing).
    pub fn new(prefix: impl Into<PathBuf>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// `path` (absolute, as on the target system) under the prefix.
    pub fn at(&self, path: &str) -> PathBuf {
        self.prefix.join(path.trim_start_matches('/'))
    }

    /// Whether this is the live system (prefix `/`).
    pub fn is_root(&self) -> bool {
        self.prefix == Path::new("/")
    }
}

/// The config file install writes: the `[daemon]` table with every key at
/// its default, commented where the default is implicit.
pub fn default_config() -> String {
    format!(
        r#"# Portcullis daemon configuration. Flags of `portcullis daemon` win over
# these keys; a missing key means the default shown. Policies (issuers,
# identities, resources, rules) live in the policies directory, not here.

[daemon]
policies = "{policies}"
state_dir = "{state}"
admin_socket = "{socket}"
pin_dir = "{pins}"
# The cgroup subtree this daemon governs, relative to the cgroup2 mount
# ("/" = the whole host).
cgroup_root = "{root}"
listen_port = {port}
# Prometheus /metrics, /healthz, /readyz; "off" to disable.
metrics = "{metrics}"
# Audit durability: "interval" (group commit every few ms) or "always".
fsync = "interval"
# Webhooks told about access requests (POSTed JSON, retried):
# webhooks = ["https://chat.example.com/hooks/portcullis"]

# Memory: while resident memory + 32 MiB headroom is over memory_budget,
# NEW sessions are refused in their protocol (PostgreSQL FATAL 53200, HTTP
# 503, SSH banner); running sessions carry on. Default: 1 GiB, or half the
# machine's RAM if that is less; "off" disables.
# memory_budget = "1GiB"
# Caps on what one agent can make the daemon hold (sizes: B, KiB, MiB, GiB).
pg_max_statement = "1MiB"       # Query / Parse message; larger: FATAL 54000
pg_max_message = "16MiB"        # Bind and other held messages, masked rows
http_max_header = "64KiB"       # request header block; larger: 431
http_max_decoded_body = "256MiB" # decompressed body inspected for masking
# How long an HTTP/1.1 connection may wait for a request head (idle
# keep-alive, or a slow head) before it is closed.
http_idle_timeout = "30s"

# Auto-tagging: cgroups matching a glob (relative to cgroup_root; `*` and
# `?` within a path component, `**` across components) are tagged as they
# appear and untagged when they go. `{{container}}` in token_file is the
# container id found in the cgroup path, `{{name}}` the cgroup's own name.
#
# [[auto_tag]]
# cgroup = "**/docker-*.scope"
# identity = "billing-agent"
# token_file = "/run/portcullis/tokens/{{container}}.jwt"
"#,
        policies = defaults::POLICIES,
        state = defaults::STATE_DIR,
        socket = defaults::ADMIN_SOCKET,
        pins = defaults::PIN_DIR,
        root = defaults::CGROUP_ROOT,
        port = defaults::LISTEN_PORT,
        metrics = defaults::METRICS,
    )
}

/// The systemd unit for the binary at `bin` (path on the target system).
///
/// Sandboxing keeps what the daemon needs and nothing else:
/// - capabilities: `CAP_BPF` + `CAP_PERFMON` (load programs and maps),
///   `CAP_NET_ADMIN` (attach cgroup sock programs), `CAP_SYS_ADMIN` (setns
///   into agents' network namespaces; bpf on kernels before 5.8; mounting
///   bpffs), `CAP_SYS_PTRACE` (open other processes' `/proc/PID/ns/net`),
///   `CAP_DAC_OVERRIDE` + `CAP_DAC_READ_SEARCH` (token files owned by other
///   users, cgroup files), `CAP_SYS_RESOURCE` (memlock on older kernels),
///   `CAP_KILL` is not needed;
/// - writable: state dir, runtime dir (admin socket), bpffs, cgroupfs;
///   everything else read-only (`ProtectSystem=strict`);
/// - not set on purpose: `RestrictNamespaces` (setns into network
///   namespaces is the data path), `ProtectControlGroups` (tags live in
///   cgroupfs), `PrivateNetwork`, `SystemCallFilter` (`bpf`, `setns` and
///   friends would need listing per kernel).
///
/// bpffs is mounted by an `ExecStartPre=+` outside the sandbox: a bpffs
/// mounted inside the service's mount namespace would be private to it and
/// its pins would vanish with it, opening the gate.
pub fn unit_text(bin: &Path) -> String {
    let bin = bin.display();
    format!(
        r#"# Written by `portcullis install`; it is replaced on the next install.
# Put local changes in a drop-in: systemctl edit portcullis
[Unit]
Description=Portcullis: governs what AI agents do to production systems
After=network-online.target
Wants=network-online.target
# Up before the container runtimes, so agents never start ungoverned.
Before=docker.service containerd.service crio.service kubelet.service

[Service]
Type=notify
NotifyAccess=main
ExecStartPre=+/bin/sh -c 'mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf'
ExecStart={bin} daemon --config /etc/portcullis/portcullis.toml
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2s
WatchdogSec=30s
TimeoutStartSec=60s
TimeoutStopSec=30s
Environment=PORTCULLIS_LOG=info
StateDirectory=portcullis
StateDirectoryMode=0700
RuntimeDirectory=portcullis
RuntimeDirectoryMode=0700
LimitNOFILE=1048576
LimitMEMLOCK=infinity

CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_SYS_ADMIN CAP_SYS_PTRACE CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_SYS_RESOURCE
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=/var/lib/portcullis /run/portcullis /sys/fs/bpf /sys/fs/cgroup
ProtectHome=yes
PrivateTmp=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
UMask=0077

[Install]
WantedBy=multi-user.target
"#
    )
}

fn sha256_file(path: &Path) -> Option<String> {
    fs::read(path).ok().map(|b| hex::encode(Sha256::digest(b)))
}

fn mkdirs(dir: &Path, mode: u32) -> Result<(), InstallError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io_err("creating", dir))
}

/// Writes `bytes` to `path` via a temp file and a rename (an upgrade never
/// leaves a half-written binary or unit).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::io::Write as _;
    if let Some(parent) = path.parent() {
        mkdirs(parent, 0o755)?;
    }
    let tmp = path.with_extension(format!("portcullis-tmp.{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    f.write_all(bytes).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))
}

fn load_manifest(layout: &Layout) -> Result<Manifest, InstallError> {
    let path = layout.at(MANIFEST);
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| InstallError::Manifest {
            path,
            message: e.to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Manifest::default()),
        Err(e) => Err(io_err("reading", &path)(e)),
    }
}

fn save_manifest(layout: &Layout, m: &Manifest) -> Result<(), InstallError> {
    let bytes = serde_json::to_vec_pretty(m).map_err(|e| InstallError::Manifest {
        path: layout.at(MANIFEST),
        message: e.to_string(),
    })?;
    write_file(&layout.at(MANIFEST), &bytes, 0o600)
}

/// Lays out binary, config, example policies, unit and state dir under
/// `layout`. `bin` is the binary to install (the running one by default).
/// Existing config and policy files are never overwritten; the binary and
/// the unit are replaced (that is how an upgrade works).
pub fn install(layout: &Layout, bin: &Path) -> Result<Report, InstallError> {
    let mut report = Report::default();
    let mut manifest = load_manifest(layout)?;
    let mut put = |rel: &str, bytes: &[u8], mode: u32, replace: bool, report: &mut Report| {
        let path = layout.at(rel);
        let exists = path.exists();
        if exists && !replace {
            report.kept.push(path);
            return Ok(());
        }
        write_file(&path, bytes, mode)?;
        manifest
            .files
            .insert(rel.to_string(), hex::encode(Sha256::digest(bytes)));
        if exists {
            report.replaced.push(path);
        } else {
            report.created.push(path);
        }
        Ok::<(), InstallError>(())
    };

    // The binary: skip the copy when installing the installed binary.
    let dest = layout.at(BIN_PATH);
    let same = fs::canonicalize(bin)
        .ok()
        .is_some_and(|a| fs::canonicalize(&dest).ok().is_some_and(|b| a == b));
    if !same {
        let bytes = fs::read(bin).map_err(io_err("reading binary", bin))?;
        put(BIN_PATH, &bytes, 0o755, true, &mut report)?;
    }
    put(
        UNIT_PATH,
        unit_text(Path::new(BIN_PATH)).as_bytes(),
        0o644,
        true,
        &mut report,
    )?;
    mkdirs(&layout.at("/etc/portcullis"), 0o755)?;
    put(
        defaults::CONFIG,
        default_config().as_bytes(),
        0o640,
        false,
        &mut report,
    )?;
    for (rel, bytes) in EXAMPLE_POLICIES {
        let target = format!("{}/{rel}", defaults::POLICIES);
        put(&target, bytes, 0o640, false, &mut report)?;
    }
    mkdirs(&layout.at(defaults::STATE_DIR), 0o700)?;
    save_manifest(layout, &manifest)?;
    Ok(report)
}

/// Removes what [`install`] laid out. Config and policy files are removed
/// only when unchanged since install wrote them (changed ones are kept and
/// reported), unless `purge`, which also removes the whole config directory
/// and the state dir (audit log, recordings, tags, keys).
pub fn uninstall(layout: &Layout, purge: bool) -> Result<Report, InstallError> {
    let mut report = Report::default();
    let manifest = load_manifest(layout)?;
    let remove = |path: PathBuf, report: &mut Report| match fs::remove_file(&path) {
        Ok(()) => {
            report.removed.push(path);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", &path)(e)),
    };
    for p in [BIN_PATH, UNIT_PATH] {
        remove(layout.at(p), &mut report)?;
    }
    for (rel, hash) in &manifest.files {
        if rel == BIN_PATH || rel == UNIT_PATH {
            continue;
        }
        let path = layout.at(rel);
        match sha256_file(&path) {
            None => {}
            Some(h) if purge || &h == hash => remove(path, &mut report)?,
            Some(_) => report.kept.push(path),
        }
    }
    let etc = layout.at("/etc/portcullis");
    if purge {
        for dir in [etc.clone(), layout.at(defaults::STATE_DIR)] {
            match fs::remove_dir_all(&dir) {
                Ok(()) => report.removed.push(dir),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &dir)(e)),
            }
        }
    } else {
        remove(layout.at(MANIFEST), &mut report)?;
        // Directories install made, deepest first, if nothing is left in them.
        let mut dirs: Vec<PathBuf> = manifest
            .files
            .keys()
            .filter_map(|rel| layout.at(rel).parent().map(Path::to_path_buf))
            .filter(|d| d.starts_with(&etc))
            .collect();
        dirs.push(etc);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        dirs.dedup();
        for d in dirs {
            if fs::remove_dir(&d).is_ok() {
                report.removed.push(d);
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(tag: &str) -> crate::testutil::TempDir {
        crate::testutil::TempDir::new("install", tag)
    }

    fn fake_bin(dir: &Path) -> PathBuf {
        let p = dir.join("portcullis-src");
        fs::write(&p, b"#!/bin/sh\necho fake\n").unwrap();
        p
    }

    #[test]
    fn examples_are_embedded() {
        let names: Vec<&str> = EXAMPLE_POLICIES.iter().map(|(n, _)| *n).collect();
        assert!(names.contains(&"identities.toml"), "{names:?}");
        assert!(names.contains(&"demo/jwks.json"), "{names:?}");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        for (rel, bytes) in EXAMPLE_POLICIES {
            assert_eq!(fs::read(dir.join(rel)).unwrap(), *bytes, "{rel}");
        }
    }

    #[test]
    fn install_lays_out_valid_files_and_never_overwrites_config() {
        let tmp = prefix("layout");
        let root = tmp.path().join("root");
        let layout = Layout::new(&root);
        let bin = fake_bin(tmp.path());
        let r = install(&layout, &bin).unwrap();
        assert!(r.kept.is_empty(), "{r:?}");
        let installed = root.join("usr/local/bin/portcullis");
        assert_eq!(fs::read(&installed).unwrap(), fs::read(&bin).unwrap());
        assert_eq!(
            fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let unit = fs::read_to_string(root.join("etc/systemd/system/portcullis.service")).unwrap();
        assert!(unit.contains("Type=notify"));
        assert!(unit.contains("ExecStart=/usr/local/bin/portcullis daemon"));
        // The config parses and means the defaults.
        let cfg_path = root.join("etc/portcullis/portcullis.toml");
        let table = crate::config::read_daemon_table(&cfg_path).unwrap();
        let cfg = crate::config::DaemonConfig::merge(Default::default(), table).unwrap();
        assert_eq!(cfg.listen_port, defaults::LISTEN_PORT);
        assert_eq!(cfg.policies, PathBuf::from(defaults::POLICIES));
        assert!(cfg.auto_tag.is_empty());
        // The copied policies are a valid set.
        let set = crate::policy::PolicySet::load(&root.join("etc/portcullis/policies"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!set.resources.is_empty());
        assert_eq!(
            fs::metadata(root.join("var/lib/portcullis"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );

        // An operator edits a policy; a second install (an upgrade) keeps it
        // and replaces the binary and unit.
        let edited = root.join("etc/portcullis/policies/orders.toml");
        let mut text = fs::read_to_string(&edited).unwrap();
        text.push_str("\n# local change\n");
        fs::write(&edited, &text).unwrap();
        fs::write(&bin, b"#!/bin/sh\necho v2\n").unwrap();
        let r = install(&layout, &bin).unwrap();
        assert!(r.kept.contains(&edited), "{r:?}");
        assert!(r.replaced.contains(&installed), "{r:?}");
        assert_eq!(fs::read_to_string(&edited).unwrap(), text);
        assert_eq!(fs::read(&installed).unwrap(), b"#!/bin/sh\necho v2\n");
    }

    #[test]
    fn uninstall_keeps_changed_files_unless_purged() {
        let tmp = prefix("uninstall");
        let root = tmp.path().join("root");
        let layout = Layout::new(&root);
        install(&layout, &fake_bin(tmp.path())).unwrap();
        let edited = root.join("etc/portcullis/policies/orders.toml");
        fs::write(&edited, "# mine\n").unwrap();
        let mine = root.join("etc/portcullis/policies/local.toml");
        fs::write(&mine, "# added by the operator\n").unwrap();
        fs::write(root.join("var/lib/portcullis/tags.json"), "{}").unwrap();

        let r = uninstall(&layout, false).unwrap();
        assert_eq!(r.kept, vec![edited.clone()], "{r:?}");
        assert!(!root.join("usr/local/bin/portcullis").exists());
        assert!(!root.join("etc/systemd/system/portcullis.service").exists());
        assert!(!root.join("etc/portcullis/portcullis.toml").exists());
        assert!(!root.join("etc/portcullis/policies/demo").exists());
        assert!(edited.exists() && mine.exists());
        assert!(
            root.join("var/lib/portcullis/tags.json").exists(),
            "state dir stays"
        );

        // Install again, then purge: everything goes.
        install(&layout, &fake_bin(tmp.path())).unwrap();
        uninstall(&layout, true).unwrap();
        assert!(!root.join("etc/portcullis").exists());
        assert!(!root.join("var/lib/portcullis").exists());
        assert!(!root.join("usr/local/bin/portcullis").exists());
    }
}
