//! Facts about the host the daemon needs before it touches the kernel:
//! privileges, the cgroup v2 mount, BTF, bpffs and the kernel version.
//!
//! Owns the preflight checks and their error messages. It must not change
//! anything on the host except mounting bpffs where it is absent (and the
//! daemon's own open-file limit).

use std::{
    fs,
    path::{Path, PathBuf},
};

/// Why the host cannot run the daemon.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Not running as root.
    #[error("portcullis must run as root (it loads eBPF programs and attaches them to cgroups); effective uid is {0}")]
    NotRoot(u32),
    /// No cgroup2 filesystem is mounted.
    #[error("no cgroup v2 filesystem is mounted (looked for fstype cgroup2 in /proc/self/mounts); Portcullis needs the unified hierarchy")]
    NoCgroup2,
    /// The kernel exposes no BTF.
    #[error(
        "the kernel exposes no BTF at /sys/kernel/btf/vmlinux (needs CONFIG_DEBUG_INFO_BTF=y)"
    )]
    NoBtf,
    /// The kernel is too old.
    #[error("kernel {found} is too old: Portcullis needs Linux {}.{} or newer (netns cookies in sock_ops)", MIN_KERNEL.0, MIN_KERNEL.1)]
    OldKernel {
        /// The running kernel's release string.
        found: String,
    },
    /// Reading host facts failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Oldest kernel the programs work on: `bpf_get_netns_cookie` in sock_ops
/// programs arrived in 5.15.
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// Fails unless the effective user is root.
pub fn require_root() -> Result<(), HostError> {
    let uid = nix::unistd::geteuid().as_raw();
    if uid == 0 {
        Ok(())
    } else {
        Err(HostError::NotRoot(uid))
    }
}

/// Where the cgroup2 filesystem is mounted (`/sys/fs/cgroup` on pure v2
/// hosts, `/sys/fs/cgroup/unified` in hybrid mode).
pub fn cgroup2_mount() -> Result<PathBuf, HostError> {
    let mounts = fs::read_to_string("/proc/self/mounts").map_err(|source| HostError::Io {
        what: "reading /proc/self/mounts".into(),
        source,
    })?;
    find_mount(&mounts, "cgroup2").ok_or(HostError::NoCgroup2)
}

/// First mount point of filesystem type `fstype` in a mounts table.
fn find_mount(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next()?;
        let target = fields.next()?;
        (fields.next()? == fstype).then(|| PathBuf::from(unescape_mount(target)))
    })
}

/// /proc/self/mounts escapes spaces and friends as octal.
fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Fails unless the kernel exposes BTF.
pub fn require_btf() -> Result<(), HostError> {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Ok(())
    } else {
        Err(HostError::NoBtf)
    }
}

/// Fails unless the kernel is at least [`MIN_KERNEL`].
pub fn require_kernel() -> Result<(), HostError> {
    let release = nix::sys::utsname::uname()
        .map_err(|e| HostError::Io {
            what: "uname".into(),
            source: e.into(),
        })?
        .release()
        .to_string_lossy()
        .into_owned();
    match parse_release(&release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        _ => Err(HostError::OldKernel { found: release }),
    }
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Makes sure a BPF filesystem is mounted at `/sys/fs/bpf` when `pin_dir`
/// lives below it, mounting one when absent.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), HostError> {
    let mounts = fs::read_to_string("/proc/self/mounts").map_err(|source| HostError::Io {
        what: "reading /proc/self/mounts".into(),
        source,
    })?;
    let has_bpffs = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[2] == "bpf" && pin_dir.starts_with(unescape_mount(f[1]))
    });
    if has_bpffs {
        return Ok(());
    }
    let target = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(target) {
        // Not ours to mount; pinning will report a clear error if it is not bpffs.
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        target,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| HostError::Io {
        what: "mounting bpffs at /sys/fs/bpf".into(),
        source: e.into(),
    })
}

/// Whether the BPF LSM is active, and why not when it is not.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LsmStatus {
    /// `bpf` is in the kernel's active LSM list: BPF LSM programs run.
    pub active: bool,
    /// The active LSM list as the kernel reports it, or why it is unknown.
    pub detail: String,
}

/// Where securityfs lists the active LSMs.
const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// Reads the active LSM list (`/sys/kernel/security/lsm`), mounting
/// securityfs there when it is absent, and says whether `bpf` is in it.
/// Without BPF LSM the socket-family program cannot run: AF_PACKET and the
/// other non-inet families are then not denied to tagged cgroups.
pub fn bpf_lsm_status() -> LsmStatus {
    let read = || {
        fs::read_to_string(LSM_LIST)
            .ok()
            .filter(|t| !t.trim().is_empty())
    };
    let text = read().or_else(|| {
        let target = Path::new("/sys/kernel/security");
        nix::mount::mount(
            Some("securityfs"),
            target,
            Some("securityfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .ok()?;
        read()
    });
    match text {
        Some(list) => lsm_status_of(&list),
        None => LsmStatus {
            active: false,
            detail: format!("{LSM_LIST} is unreadable (securityfs could not be mounted)"),
        },
    }
}

/// [`bpf_lsm_status`] for a given LSM list (comma-separated).
pub fn lsm_status_of(list: &str) -> LsmStatus {
    let list = list.trim();
    let active = list.split(',').any(|m| m.trim() == "bpf");
    LsmStatus {
        active,
        detail: if active {
            format!("active LSMs: {list}")
        } else {
            format!(
                "bpf is not in the active LSMs ({list}); add it to the lsm= boot parameter (needs CONFIG_BPF_LSM=y)"
            )
        },
    }
}

/// Raises the daemon's soft open-file limit to its hard limit: every relayed
/// session holds two sockets, and the common default soft limit (1024)
/// would refuse new sessions at about 500. Returns the limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bpf_lsm_is_found_only_as_a_whole_name() {
        assert!(super::lsm_status_of("lockdown,capability,landlock,bpf\n").active);
        assert!(super::lsm_status_of("bpf").active);
        let off = super::lsm_status_of("lockdown,capability,apparmor,bpffoo");
        assert!(!off.active);
        assert!(off.detail.contains("lsm="), "{}", off.detail);
    }

    use super::*;

    #[test]
    fn finds_hybrid_cgroup2_mount() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
            tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            find_mount(mounts, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount("sysfs /sys sysfs rw 0 0\n", "cgroup2"), None);
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        assert_eq!(unescape_mount("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_release("5.10.0-28-amd64"), Some((5, 10)));
        assert!(parse_release("5.10.0").unwrap() < MIN_KERNEL);
        assert_eq!(parse_release("garbage"), None);
    }
}
