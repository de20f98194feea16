//! The daemon's own configuration: the `[daemon]` table of the config file,
//! overridden by command-line flags. Policies are not configured here.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub use crate::identity::autotag::AutoTagRule;

/// Default locations (DESIGN.md, Admin).
pub mod defaults {
    /// Config file.
    pub const CONFIG: &str = "/etc/portcullis/portcullis.toml";
    /// Policies directory.
    pub const POLICIES: &str = "/etc/portcullis/policies";
    /// State directory.
    pub const STATE_DIR: &str = "/var/lib/portcullis";
    /// Admin socket.
    pub const ADMIN_SOCKET: &str = "/run/portcullis/admin.sock";
    /// Pin directory on bpffs.
    pub const PIN_DIR: &str = "/sys/fs/bpf/portcullis";
    /// Governed cgroup root, relative to the cgroup2 mount.
    pub const CGROUP_ROOT: &str = "/";
    /// Proxy listener port.
    pub const LISTEN_PORT: u16 = 15001;
    /// Most connection workers a daemon runs.
    pub const WORKERS_MAX: usize = 1024;

    /// Connection workers by default: one per core this process may run on.
    pub fn workers() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
    /// Metrics listener.
    pub const METRICS: &str = "127.0.0.1:15020";
    /// UDP destinations tagged cgroups may reach: the resolvers (see
    /// [`super::RESOLVERS`]), not port 53 on any host. Every other datagram
    /// from a tagged cgroup is refused in the kernel.
    pub const UDP_ALLOW: &[&str] = &[super::RESOLVERS];
    /// Resolver configurations the daemon reads for `"resolvers"`: its own
    /// (the host's), and systemd-resolved's upstream list, which Docker
    /// copies into containers when the host's points at the 127.0.0.53 stub.
    pub const RESOLV_CONF: &[&str] = &["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"];
    /// Loopback resolvers inside an agent's own network namespace: Docker's
    /// embedded DNS on user-defined networks. Loopback never leaves the
    /// namespace, so only a resolver running there can answer.
    pub const NAMESPACE_RESOLVERS: &[&str] = &["127.0.0.11:53"];
}

/// The `udp_allow` entry that stands for the resolvers: port 53 of every
/// `nameserver` in the daemon's (the host's) resolver configuration, read
/// again every 30 s, plus [`defaults::NAMESPACE_RESOLVERS`]. The agent's own
/// `/etc/resolv.conf` is never read: the agent can write it.
pub const RESOLVERS: &str = "resolvers";

/// The `[daemon]` table; every key mirrors a daemon flag.
#[derive(Debug, Default, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DaemonTable {
    /// Policies directory.
    pub policies: Option<PathBuf>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Admin socket path.
    pub admin_socket: Option<PathBuf>,
    /// Pin directory.
    pub pin_dir: Option<PathBuf>,
    /// Governed cgroup root.
    pub cgroup_root: Option<String>,
    /// Proxy listener port.
    pub listen_port: Option<u16>,
    /// Metrics address or "off".
    pub metrics: Option<String>,
    /// Audit durability: "interval" (group commit, default) or "always".
    pub fsync: Option<String>,
    /// URLs POSTed a JSON event when an access request is created or decided.
    pub webhooks: Option<Vec<String>>,
    /// UDP destinations tagged cgroups may send to (`ADDR:PORT`, `[V6]:PORT`
    /// or `*:PORT`); `[]` allows none. Default [`defaults::UDP_ALLOW`].
    pub udp_allow: Option<Vec<String>>,
    /// Memory budget (`"1GiB"`, `"512MiB"`, bytes, or `"off"`): new sessions
    /// are shed while resident memory plus headroom is over it.
    pub memory_budget: Option<String>,
    /// Largest PostgreSQL Query/Parse message (size with units).
    pub pg_max_statement: Option<String>,
    /// Largest other PostgreSQL message held whole (size with units).
    pub pg_max_message: Option<String>,
    /// Largest HTTP request header block (size with units).
    pub http_max_header: Option<String>,
    /// Largest decoded response body inspected for masking (size with units).
    pub http_max_decoded_body: Option<String>,
    /// How long an HTTP/1.1 connection may wait for a request head (idle
    /// keep-alive or a slow head), e.g. `"30s"`, `"2m"`.
    pub http_idle_timeout: Option<String>,
    /// Connection worker threads (default: one per available core).
    pub workers: Option<usize>,
    /// Auto-tag rules (`[[daemon.auto_tag]]`); file only, no flag.
    #[serde(default)]
    pub auto_tag: Vec<AutoTagRule>,
    /// The top-level `[fleet]` table; file only, no flag.
    #[serde(skip)]
    pub fleet: Option<crate::fleet::FleetConfig>,
    /// The review console (the top-level `[console]` table); file only.
    #[serde(skip)]
    pub console: Option<crate::console::ConsoleConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    daemon: DaemonTable,
    /// Top-level `[[auto_tag]]`, the same as `[[daemon.auto_tag]]`.
    #[serde(default)]
    auto_tag: Vec<AutoTagRule>,
    /// `[fleet]`: state shared by several nodes.
    #[serde(default)]
    fleet: Option<crate::fleet::FleetConfig>,
    /// `[console]`: the review console.
    #[serde(default)]
    console: Option<crate::console::ConsoleConfig>,
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading failed for a reason other than absence.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The TOML is invalid.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A value is invalid.
    #[error("{0}")]
    Invalid(String),
}

/// Reads the `[daemon]` table; a missing or empty file means defaults.
pub fn read_daemon_table(path: &Path) -> Result<DaemonTable, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DaemonTable::default()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.into(),
                source,
            })
        }
    };
    let file: ConfigFile = toml::from_str(&text).map_err(|e| {
        let (line, column) =
            crate::policy::diag_line_col(&text, e.span().map(|s| s.start).unwrap_or(0));
        ConfigError::Parse {
            path: path.into(),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })?;
    let mut table = file.daemon;
    table.auto_tag.extend(file.auto_tag);
    table.fleet = file.fleet;
    table.console = file.console;
    if let Some(console) = &table.console {
        console
            .check()
            .map_err(|m| ConfigError::Invalid(format!("{}: {m}", path.display())))?;
    }
    for rule in &table.auto_tag {
        rule.validate()
            .map_err(|m| ConfigError::Invalid(format!("{}: {m}", path.display())))?;
    }
    Ok(table)
}

/// Where the metrics endpoint listens, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metrics {
    /// No metrics endpoint.
    Off,
    /// Serve on this address.
    On(SocketAddr),
}

impl std::str::FromStr for Metrics {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        if s == "off" {
            return Ok(Self::Off);
        }
        s.parse().map(Self::On).map_err(|_| {
            ConfigError::Invalid(format!("metrics must be ADDR:PORT or \"off\", not {s:?}"))
        })
    }
}

/// The daemon's effective settings.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Policies directory.
    pub policies: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Admin socket.
    pub admin_socket: PathBuf,
    /// Pin directory.
    pub pin_dir: PathBuf,
    /// Governed cgroup root (absolute under the mount, or relative to it).
    pub cgroup_root: String,
    /// Proxy listener port.
    pub listen_port: u16,
    /// Metrics endpoint.
    pub metrics: Metrics,
    /// Audit durability against a host crash.
    pub fsync: crate::audit::FsyncMode,
    /// Webhook URLs for access requests.
    pub webhooks: Vec<String>,
    /// UDP destinations tagged cgroups may still reach (besides the
    /// resolvers when `udp_allow_resolvers`).
    pub udp_allow: Vec<UdpDest>,
    /// `udp_allow` includes `"resolvers"` (the default).
    pub udp_allow_resolvers: bool,
    /// Auto-tag rules, in file order (the first match wins).
    pub auto_tag: Vec<AutoTagRule>,
    /// Memory budget in bytes; `None` when `off`.
    pub memory_budget: Option<u64>,
    /// Caps on frames, header blocks and inspected bodies.
    pub limits: crate::limits::Limits,
    /// Connection worker threads, each running whole sessions
    /// ([`crate::workers`]).
    pub workers: usize,
    /// `[fleet]`, when this node shares JIT state and audit with others.
    pub fleet: Option<crate::fleet::FleetConfig>,
    /// The review console, when `[console]` is configured.
    pub console: Option<crate::console::ConsoleConfig>,
}

/// A UDP destination tagged cgroups may send to: one address and port, or a
/// port on any address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpDest {
    /// The address; `None` for any address.
    pub addr: Option<std::net::IpAddr>,
    /// The port (never 0).
    pub port: u16,
}

impl std::str::FromStr for UdpDest {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || {
            ConfigError::Invalid(format!(
                "udp_allow entry {s:?}: expected ADDR:PORT, [IPV6]:PORT or *:PORT with a port 1-65535"
            ))
        };
        let (addr, port) = match s.strip_prefix("*:") {
            Some(port) => (None, port),
            None => {
                let sa: std::net::SocketAddr = s.parse().map_err(|_| bad())?;
                return if sa.port() == 0 {
                    Err(bad())
                } else {
                    Ok(Self {
                        addr: Some(sa.ip()),
                        port: sa.port(),
                    })
                };
            }
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        Ok(Self { addr, port })
    }
}

impl std::fmt::Display for UdpDest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            None => write!(f, "*:{}", self.port),
            Some(ip) => write!(f, "{}", std::net::SocketAddr::new(ip, self.port)),
        }
    }
}

impl DaemonConfig {
    /// Flags (`flags`) win over the file (`file`), which wins over defaults.
    pub fn merge(flags: DaemonTable, file: DaemonTable) -> Result<Self, ConfigError> {
        let metrics = flags
            .metrics
            .or(file.metrics)
            .unwrap_or_else(|| defaults::METRICS.into())
            .parse()?;
        let listen_port = flags
            .listen_port
            .or(file.listen_port)
            .unwrap_or(defaults::LISTEN_PORT);
        let fsync = match flags.fsync.or(file.fsync).as_deref() {
            None | Some("interval") => crate::audit::FsyncMode::default(),
            Some("always") => crate::audit::FsyncMode::Always,
            Some(other) => {
                return Err(ConfigError::Invalid(format!(
                    "fsync must be \"interval\" or \"always\", not {other:?}"
                )))
            }
        };
        let list: Vec<String> = flags
            .udp_allow
            .or(file.udp_allow)
            .unwrap_or_else(|| defaults::UDP_ALLOW.iter().map(|d| d.to_string()).collect());
        let udp_allow_resolvers = list.iter().any(|d| d == RESOLVERS);
        let udp_allow = list
            .iter()
            // "none" lets the command line say "[]".
            .filter(|d| d.as_str() != "none" && d.as_str() != RESOLVERS)
            .map(|d| d.parse())
            .collect::<Result<Vec<UdpDest>, _>>()?;
        if listen_port == 0 {
            return Err(ConfigError::Invalid("listen_port must not be 0".into()));
        }
        let workers = match flags.workers.or(file.workers) {
            None => defaults::workers(),
            Some(n) if (1..=defaults::WORKERS_MAX).contains(&n) => n,
            Some(n) => {
                return Err(ConfigError::Invalid(format!(
                    "workers must be from 1 to {}, not {n}",
                    defaults::WORKERS_MAX
                )))
            }
        };
        let size =
            |key: &str, v: Option<String>, default: u64, min: u64| -> Result<u64, ConfigError> {
                let n = match v {
                    None => default,
                    Some(v) => crate::limits::parse_size(key, &v)
                        .map_err(|e| ConfigError::Invalid(e.to_string()))?,
                };
                if n < min {
                    return Err(ConfigError::Invalid(format!(
                        "{key} must be at least {min} bytes, not {n}"
                    )));
                }
                Ok(n)
            };
        let memory_budget = match flags.memory_budget.or(file.memory_budget) {
            None => Some(crate::limits::default_budget()),
            Some(v) if v.trim() == "off" => None,
            Some(v) => Some(size("memory_budget", Some(v), 0, 1)?),
        };
        // A statement or message cap below PostgreSQL's smallest useful
        // message would refuse everything; keep them at least 1 KiB, and at
        // most PostgreSQL's own 1 GiB message limit.
        let pg_max = |key: &str, v: Option<String>, default: u64| {
            size(key, v, default, 1024)
                .map(|n| n.min(crate::proxy::postgres::codec::MAX_FRAME as u64) as usize)
        };
        let limits = crate::limits::Limits {
            pg_max_statement: pg_max(
                "pg_max_statement",
                flags.pg_max_statement.or(file.pg_max_statement),
                crate::limits::DEFAULT_PG_MAX_STATEMENT,
            )?,
            pg_max_message: pg_max(
                "pg_max_message",
                flags.pg_max_message.or(file.pg_max_message),
                crate::limits::DEFAULT_PG_MAX_MESSAGE,
            )?,
            http_max_header: size(
                "http_max_header",
                flags.http_max_header.or(file.http_max_header),
                crate::limits::DEFAULT_HTTP_MAX_HEADER,
                crate::limits::MIN_HTTP_MAX_HEADER,
            )?
            .min(u32::MAX as u64) as usize,
            http_max_decoded_body: size(
                "http_max_decoded_body",
                flags.http_max_decoded_body.or(file.http_max_decoded_body),
                crate::limits::DEFAULT_HTTP_MAX_DECODED_BODY,
                1024,
            )?,
            http_idle_timeout: match flags.http_idle_timeout.or(file.http_idle_timeout) {
                None => crate::limits::DEFAULT_HTTP_IDLE_TIMEOUT,
                Some(v) => {
                    let d = crate::policy::parse_duration(&v)
                        .map_err(|e| ConfigError::Invalid(format!("http_idle_timeout: {e}")))?;
                    if d < crate::limits::MIN_HTTP_IDLE_TIMEOUT {
                        return Err(ConfigError::Invalid(format!(
                            "http_idle_timeout must be at least 1s, not {v:?}"
                        )));
                    }
                    d
                }
            },
        };
        Ok(Self {
            policies: flags
                .policies
                .or(file.policies)
                .unwrap_or_else(|| defaults::POLICIES.into()),
            state_dir: flags
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| defaults::STATE_DIR.into()),
            admin_socket: flags
                .admin_socket
                .or(file.admin_socket)
                .unwrap_or_else(|| defaults::ADMIN_SOCKET.into()),
            pin_dir: flags
                .pin_dir
                .or(file.pin_dir)
                .unwrap_or_else(|| defaults::PIN_DIR.into()),
            cgroup_root: flags
                .cgroup_root
                .or(file.cgroup_root)
                .unwrap_or_else(|| defaults::CGROUP_ROOT.into()),
            listen_port,
            metrics,
            fsync,
            webhooks: flags.webhooks.or(file.webhooks).unwrap_or_default(),
            udp_allow,
            udp_allow_resolvers,
            auto_tag: file.auto_tag,
            fleet: file.fleet,
            memory_budget,
            workers,
            limits,
            console: file.console,
        })
    }

    /// The UDP destinations to put in the kernel now: the explicit entries
    /// and, with `"resolvers"`, the resolvers read from the host's files.
    pub fn effective_udp_allow(&self) -> Vec<UdpDest> {
        let mut out = self.udp_allow.clone();
        if self.udp_allow_resolvers {
            let texts: Vec<Option<String>> = defaults::RESOLV_CONF
                .iter()
                .map(|p| std::fs::read_to_string(p).ok())
                .collect();
            for d in resolvers_from(&texts) {
                if !out.contains(&d) {
                    out.push(d);
                }
            }
        }
        out
    }
}

/// The resolvers named by resolver configuration files (`None`: the file is
/// absent): port 53 of each `nameserver` (zone ids dropped), plus
/// [`defaults::NAMESPACE_RESOLVERS`]. When the first file (the host's
/// `/etc/resolv.conf`) is absent or names no server, glibc asks the local
/// host, so 127.0.0.1 and ::1 are listed instead.
pub fn resolvers_from(files: &[Option<String>]) -> Vec<UdpDest> {
    let mut out: Vec<UdpDest> = Vec::new();
    let mut push = |d: UdpDest| {
        if !out.contains(&d) {
            out.push(d);
        }
    };
    for (i, text) in files.iter().enumerate() {
        let mut named = false;
        for line in text.as_deref().unwrap_or("").lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                continue;
            }
            let Some(addr) = words.next() else { continue };
            let addr = addr.split('%').next().unwrap_or(addr);
            if let Ok(ip) = addr.parse::<std::net::IpAddr>() {
                named = true;
                push(UdpDest {
                    addr: Some(ip),
                    port: 53,
                });
            }
        }
        if i == 0 && !named {
            for ip in [
                std::net::IpAddr::from([127, 0, 0, 1]),
                std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ] {
                push(UdpDest {
                    addr: Some(ip),
                    port: 53,
                });
            }
        }
    }
    for d in defaults::NAMESPACE_RESOLVERS {
        if let Ok(d) = d.parse() {
            push(d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_over_defaults() {
        let file = DaemonTable {
            state_dir: Some("/file/state".into()),
            listen_port: Some(1000),
            ..Default::default()
        };
        let flags = DaemonTable {
            listen_port: Some(2000),
            metrics: Some("off".into()),
            ..Default::default()
        };
        let c = DaemonConfig::merge(flags, file).unwrap();
        assert_eq!(c.listen_port, 2000);
        assert_eq!(c.state_dir, PathBuf::from("/file/state"));
        assert_eq!(c.policies, PathBuf::from(defaults::POLICIES));
        assert_eq!(c.metrics, Metrics::Off);
    }

    #[test]
    fn workers_default_to_the_cores_and_flags_win() {
        let c = DaemonConfig::merge(DaemonTable::default(), DaemonTable::default()).unwrap();
        assert_eq!(c.workers, defaults::workers());
        let file = DaemonTable {
            workers: Some(3),
            ..Default::default()
        };
        let c = DaemonConfig::merge(DaemonTable::default(), file.clone()).unwrap();
        assert_eq!(c.workers, 3);
        let flags = DaemonTable {
            workers: Some(1),
            ..Default::default()
        };
        assert_eq!(DaemonConfig::merge(flags, file).unwrap().workers, 1);
        for bad in [0, defaults::WORKERS_MAX + 1] {
            let flags = DaemonTable {
                workers: Some(bad),
                ..Default::default()
            };
            let err = DaemonConfig::merge(flags, DaemonTable::default()).unwrap_err();
            assert!(err.to_string().contains("workers must be from 1"), "{err}");
        }
        let p = std::env::temp_dir().join(format!("pc-workers-{}.toml", std::process::id()));
        std::fs::write(&p, "[daemon]\nworkers = 2\n").unwrap();
        assert_eq!(read_daemon_table(&p).unwrap().workers, Some(2));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn budget_and_caps_parse_with_units_and_off() {
        let c = DaemonConfig::merge(DaemonTable::default(), DaemonTable::default()).unwrap();
        assert_eq!(c.memory_budget, Some(crate::limits::default_budget()));
        assert_eq!(c.limits, crate::limits::Limits::default());
        let file = DaemonTable {
            memory_budget: Some("2GiB".into()),
            pg_max_statement: Some("64KiB".into()),
            http_max_header: Some("16KiB".into()),
            ..Default::default()
        };
        let flags = DaemonTable {
            memory_budget: Some("512MiB".into()),
            ..Default::default()
        };
        let c = DaemonConfig::merge(flags, file.clone()).unwrap();
        assert_eq!(c.memory_budget, Some(512 << 20));
        assert_eq!(c.limits.pg_max_statement, 64 << 10);
        assert_eq!(c.limits.http_max_header, 16 << 10);
        let idle = DaemonTable {
            http_idle_timeout: Some("2m".into()),
            ..Default::default()
        };
        let c = DaemonConfig::merge(idle, DaemonTable::default()).unwrap();
        assert_eq!(
            c.limits.http_idle_timeout,
            std::time::Duration::from_secs(120)
        );
        let off = DaemonTable {
            memory_budget: Some("off".into()),
            ..Default::default()
        };
        assert_eq!(DaemonConfig::merge(off, file).unwrap().memory_budget, None);
        for bad in [
            DaemonTable {
                memory_budget: Some("lots".into()),
                ..Default::default()
            },
            DaemonTable {
                pg_max_statement: Some("10".into()),
                ..Default::default()
            },
            DaemonTable {
                http_max_header: Some("1KiB".into()),
                ..Default::default()
            },
            DaemonTable {
                http_idle_timeout: Some("500ms".into()),
                ..Default::default()
            },
            DaemonTable {
                http_idle_timeout: Some("soon".into()),
                ..Default::default()
            },
        ] {
            assert!(DaemonConfig::merge(bad, DaemonTable::default()).is_err());
        }
        // The config `portcullis install` writes states exactly the defaults.
        let dir = std::env::temp_dir().join(format!("portcullis-caps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, crate::install::default_config()).unwrap();
        let t = read_daemon_table(&p).unwrap();
        let c = DaemonConfig::merge(DaemonTable::default(), t).unwrap();
        assert_eq!(c.limits, crate::limits::Limits::default());
        assert_eq!(c.memory_budget, Some(crate::limits::default_budget()));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_file_is_defaults_and_unknown_keys_are_errors() {
        let t = read_daemon_table(Path::new("/nonexistent/portcullis.toml")).unwrap();
        assert_eq!(t, DaemonTable::default());
        let dir = std::env::temp_dir().join(format!("portcullis-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, "[daemon]\nlisten_port = 1\nbogus = 2\n").unwrap();
        let err = read_daemon_table(&p).unwrap_err().to_string();
        assert!(err.contains(":3:1: "), "{err}");
        std::fs::write(&p, "").unwrap();
        assert_eq!(read_daemon_table(&p).unwrap(), DaemonTable::default());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn udp_allow_parses_defaults_exact_and_wildcard_and_rejects_junk() {
        let cfg = DaemonConfig::merge(DaemonTable::default(), DaemonTable::default()).unwrap();
        // The default is the resolvers, never port 53 on any host.
        assert!(cfg.udp_allow.is_empty());
        assert!(cfg.udp_allow_resolvers);
        let wild = DaemonTable {
            udp_allow: Some(vec!["*:53".into()]),
            ..Default::default()
        };
        let cfg = DaemonConfig::merge(wild, DaemonTable::default()).unwrap();
        assert_eq!(
            cfg.udp_allow,
            vec![UdpDest {
                addr: None,
                port: 53
            }]
        );
        assert!(!cfg.udp_allow_resolvers);
        let flags = DaemonTable {
            udp_allow: Some(vec!["127.0.0.53:53".into(), "[::1]:5353".into()]),
            ..Default::default()
        };
        let cfg = DaemonConfig::merge(flags, DaemonTable::default()).unwrap();
        assert_eq!(cfg.udp_allow[0].to_string(), "127.0.0.53:53");
        assert_eq!(cfg.udp_allow[1].to_string(), "[::1]:5353");
        let none = DaemonTable {
            udp_allow: Some(vec!["none".into()]),
            ..Default::default()
        };
        assert!(DaemonConfig::merge(none, DaemonTable::default())
            .unwrap()
            .udp_allow
            .is_empty());
        for junk in ["53", "*:0", "*:x", "1.2.3.4:0", "host:53", "*:70000"] {
            let t = DaemonTable {
                udp_allow: Some(vec![junk.into()]),
                ..Default::default()
            };
            assert!(
                DaemonConfig::merge(t, DaemonTable::default()).is_err(),
                "{junk}"
            );
        }
    }

    #[test]
    fn resolvers_come_from_the_host_files_and_the_namespace_loopback() {
        let host = "# comment\nsearch example\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver junk\noptions ndots:5\n";
        let resolved = "nameserver 10.0.0.3\nnameserver 10.0.0.2\n";
        let got: Vec<String> = resolvers_from(&[Some(host.into()), Some(resolved.into())])
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(
            got,
            [
                "10.0.0.2:53",
                "[fe80::1]:53",
                "10.0.0.3:53",
                "127.0.0.11:53"
            ]
        );
        // No nameserver in the host's file: glibc asks the local host.
        let got: Vec<String> = resolvers_from(&[None, None])
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(got, ["127.0.0.1:53", "[::1]:53", "127.0.0.11:53"]);
        // Never a wildcard.
        assert!(resolvers_from(&[Some(host.into())])
            .iter()
            .all(|d| d.addr.is_some()));
    }

    #[test]
    fn auto_tag_rules_from_both_tables() {
        let dir = std::env::temp_dir().join(format!("portcullis-cfg-at-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(
            &p,
            "[daemon]\nlisten_port = 1\n[[daemon.auto_tag]]\ncgroup = \"a/*\"\nidentity = \"x\"\n\n[[auto_tag]]\ncgroup = \"**/docker-*.scope\"\nidentity = \"y\"\ntoken_file = \"/run/t/{container}\"\n",
        )
        .unwrap();
        let t = read_daemon_table(&p).unwrap();
        assert_eq!(t.auto_tag.len(), 2);
        assert_eq!(t.auto_tag[1].identity, "y");
        let c = DaemonConfig::merge(DaemonTable::default(), t).unwrap();
        assert_eq!(c.auto_tag[0].cgroup, "a/*");
        std::fs::write(&p, "[[auto_tag]]\ncgroup = \"../x\"\nidentity = \"y\"\n").unwrap();
        assert!(read_daemon_table(&p).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn metrics_parse() {
        assert_eq!("off".parse::<Metrics>().unwrap(), Metrics::Off);
        assert!("127.0.0.1:1".parse::<Metrics>().is_ok());
        assert!("nope".parse::<Metrics>().is_err());
    }
}
