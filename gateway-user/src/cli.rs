//! The `portcullis` command line: the daemon and the client subcommands that
//! talk to it over the admin socket. Owns argument parsing and output
//! formatting; it must not implement daemon behaviour itself (except the
//! break-glass `detach` when no daemon is running).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::{
    admin::{self, Request},
    config::{self, defaults, DaemonConfig, DaemonTable},
};

/// Portcullis: govern what AI agents do to production systems.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
pub struct Cli {
    /// Admin socket of the daemon to talk to.
    #[arg(long, global = true, env = "PORTCULLIS_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
// Parsed once per process: the daemon's many flags make its variant the
// largest, and boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the daemon.
    Daemon(DaemonArgs),
    /// Show the daemon's status.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the local CA certificate (PEM) agents trust for TLS interception.
    Ca,
    /// Tag a cgroup (and its descendants) with an identity.
    Tag {
        /// The cgroup: absolute path under the cgroup2 mount, or relative to it.
        #[arg(required_unless_present_any = ["pid", "container"], conflicts_with_all = ["pid", "container"])]
        cgroup: Option<String>,
        /// Tag the cgroup this process is in.
        #[arg(long, conflicts_with = "container")]
        pid: Option<u32>,
        /// Tag a container's cgroup: a Docker, containerd, CRI-O or Podman
        /// container id (full, or a unique prefix of at least 12 hex digits)
        /// or a Kubernetes pod uid, searched in the governed subtree.
        #[arg(long)]
        container: Option<String>,
        /// Identity name the cgroup's flows act as.
        #[arg(long)]
        identity: String,
        /// File holding the identity's OIDC token (re-read when it changes).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Remove a cgroup's tag.
    Untag {
        /// The cgroup.
        #[arg(required_unless_present_any = ["pid", "container"], conflicts_with_all = ["pid", "container"])]
        cgroup: Option<String>,
        /// Untag the cgroup this process is in.
        #[arg(long, conflicts_with = "container")]
        pid: Option<u32>,
        /// Untag a container's cgroup (id, unique prefix, or pod uid).
        #[arg(long)]
        container: Option<String>,
    },
    /// List tags.
    Tags {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List live flows.
    Flows {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List recorded sessions (newest last).
    Sessions {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only sessions still running.
        #[arg(long)]
        active: bool,
        /// State directory (default: the running daemon's, else
        /// /var/lib/portcullis).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// End a live session.
    Kill {
        /// Session id.
        id: String,
    },
    /// Replay a recorded session (SSH with its timing; others as text).
    Replay {
        /// Session id.
        id: String,
        /// Speed factor (2 = twice as fast; 0 = no waiting).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// State directory (default: the running daemon's, else
        /// /var/lib/portcullis).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// List access requests (held commands waiting for a human).
    Requests {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Keep watching: print requests as they are created and decided.
        #[arg(long)]
        watch: bool,
    },
    /// Release a held command; with --for, also grant its kind for a while.
    Approve {
        /// Request id.
        id: String,
        /// Also grant identity + resource + action for this long (e.g. 15m).
        #[arg(long = "for")]
        for_duration: Option<String>,
        /// Why (recorded).
        #[arg(long)]
        reason: Option<String>,
        /// Reviewer name recorded beside your uid.
        #[arg(long = "as")]
        as_name: Option<String>,
    },
    /// Refuse a held command; the agent gets the reason.
    Deny {
        /// Request id.
        id: String,
        /// Why (told to the agent, recorded).
        #[arg(long)]
        reason: Option<String>,
        /// Reviewer name recorded beside your uid.
        #[arg(long = "as")]
        as_name: Option<String>,
    },
    /// Grant an identity actions on a resource for a while.
    Grant {
        /// Identity name.
        identity: String,
        /// Resource name.
        resource: String,
        /// Actions, comma-separated (tcp:connect, postgres:update, or a whole protocol: postgres).
        #[arg(long, value_delimiter = ',', required = true)]
        allow: Vec<String>,
        /// How long (e.g. 30m, 2h).
        #[arg(long = "for")]
        for_duration: String,
        /// Why (recorded).
        #[arg(long)]
        reason: Option<String>,
        /// Reviewer name recorded beside your uid.
        #[arg(long = "as")]
        as_name: Option<String>,
    },
    /// List grants in force.
    Grants {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a grant; sessions relying on it end.
    Revoke {
        /// Grant id.
        id: String,
        /// Reviewer name recorded beside your uid.
        #[arg(long = "as")]
        as_name: Option<String>,
    },
    /// The audit log: verify, tail, public key. Reads the files directly;
    /// no daemon needed.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Policy set: check offline, reload, show.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// MCP resources: known tool definitions, accepting a changed one.
    #[command(subcommand)]
    Mcp(McpCommand),
    /// Install the binary, config, example policies and systemd unit.
    ///
    /// Binary to /usr/local/bin, /etc/portcullis (config and the example
    /// policies; existing files are never overwritten), the systemd unit,
    /// the state dir. Run it again to upgrade the binary and unit.
    Install {
        /// Root to install under (a temp dir to try it out).
        #[arg(long, default_value = "/")]
        prefix: PathBuf,
        /// The binary to install (default: this one).
        #[arg(long)]
        bin: Option<PathBuf>,
    },
    /// Stop the daemon, detach, and remove what install laid out.
    ///
    /// Detaching opens the gate (agents connect directly afterwards).
    /// Changed config and policy files and the state dir (audit log,
    /// recordings, keys) stay unless --purge.
    Uninstall {
        /// Root installed under.
        #[arg(long, default_value = "/")]
        prefix: PathBuf,
        /// Also remove changed config and policies and the state dir.
        #[arg(long)]
        purge: bool,
    },
    /// Break-glass: detach the programs and remove the pins. With a daemon
    /// running it asks the daemon; with none it removes the pins itself.
    Detach {
        /// Pin directory to clean when no daemon answers.
        #[arg(long, default_value = defaults::PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// `portcullis mcp ...`
#[derive(Debug, Subcommand)]
pub enum McpCommand {
    /// The tool definitions seen for an mcp resource: fingerprints, when
    /// first seen, and changed definitions waiting for `mcp accept`.
    Tools {
        /// Resource name.
        resource: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Accept a tool's changed definition (after reviewing it): calls to the
    /// tool are served again and it is listed again.
    Accept {
        /// Resource name.
        resource: String,
        /// Tool name.
        tool: String,
        /// Reviewer name recorded beside your uid.
        #[arg(long = "as")]
        as_name: Option<String>,
    },
}

/// `portcullis audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain and checkpoint signatures; name the first broken
    /// event and exit non-zero.
    Verify {
        /// The audit directory (default `<state>/audit`).
        dir: Option<PathBuf>,
        /// State directory.
        #[arg(long, default_value = defaults::STATE_DIR)]
        state_dir: PathBuf,
        /// Checkpoint public key. Default: `DIR/../audit.pub` (a state dir
        /// keeps `audit.pub` beside `audit/`), then `<state>/audit.pub`.
        #[arg(long)]
        pubkey: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Verify every node's chain as shipped to the fleet store (the
        /// `[fleet]` of --config) instead of a local directory.
        #[arg(long, conflicts_with_all = ["dir", "pubkey"])]
        fleet: bool,
        /// Daemon config file whose `[fleet]` names the store (--fleet).
        #[arg(long, default_value = defaults::CONFIG)]
        config: PathBuf,
    },
    /// Print events, oldest first.
    Tail {
        /// State directory.
        #[arg(long, default_value = defaults::STATE_DIR)]
        state_dir: PathBuf,
        /// JSON Lines.
        #[arg(long)]
        json: bool,
        /// Keep printing new events.
        #[arg(long)]
        follow: bool,
        /// Only this session.
        #[arg(long)]
        session: Option<String>,
        /// Only this identity (name or token subject).
        #[arg(long)]
        identity: Option<String>,
        /// Only events since TIME (RFC 3339, or 30s / 10m / 2h / 1d ago).
        #[arg(long)]
        since: Option<String>,
        /// Only the last N events (before following).
        #[arg(long, short = 'n')]
        last: Option<usize>,
    },
    /// Print the checkpoint public key (hex Ed25519).
    Pubkey {
        /// State directory.
        #[arg(long, default_value = defaults::STATE_DIR)]
        state_dir: PathBuf,
    },
}

/// `portcullis policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy directory offline (no daemon needed). Exit 0 when
    /// valid, 1 otherwise, with every error as `file:line:col: message`.
    Check {
        /// The directory.
        #[arg(default_value = defaults::POLICIES)]
        dir: PathBuf,
    },
    /// Ask the daemon to load its policy directory again.
    Reload,
    /// Show the policy set in force: version, files, identities, resources, rules.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Daemon flags; each mirrors a key of the config file's `[daemon]` table.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Config file (a missing or empty file means defaults).
    #[arg(long, default_value = defaults::CONFIG)]
    pub config: PathBuf,
    /// Policies directory.
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// State directory (tags, audit, recordings).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Pin directory on bpffs.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Cgroup subtree this daemon governs (relative to the cgroup2 mount).
    #[arg(long)]
    pub cgroup_root: Option<String>,
    /// Port of the proxy listener (in every served network namespace).
    #[arg(long)]
    pub listen_port: Option<u16>,
    /// Metrics address, or "off".
    #[arg(long)]
    pub metrics: Option<String>,
    /// Audit durability: "interval" (group commit every few ms, default) or
    /// "always" (each command waits for its fsync).
    #[arg(long)]
    pub fsync: Option<String>,
    /// Webhook URL told about access requests (repeatable).
    #[arg(long = "webhook")]
    pub webhooks: Vec<String>,
    /// UDP destination tagged cgroups may reach (repeatable): ADDR:PORT,
    /// [IPV6]:PORT, *:PORT, "resolvers" (port 53 of the host's nameservers
    /// and 127.0.0.11) or "none" for no UDP at all. Default "resolvers".
    #[arg(long = "udp-allow")]
    pub udp_allow: Vec<String>,
    /// Memory budget ("1GiB", "512MiB", bytes, or "off"): while resident
    /// memory plus a session's headroom is over it, new sessions are shed
    /// with an in-protocol error. Default 1 GiB (half the RAM if less).
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// Connection worker threads, each running whole sessions (default:
    /// one per available core). Fewer workers batch more sessions per
    /// wake-up (less CPU per command when the daemon is not busy); more
    /// spread a busy daemon over more cores.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Largest PostgreSQL Query/Parse message (default 1MiB).
    #[arg(long)]
    pub pg_max_statement: Option<String>,
    /// Largest other PostgreSQL message held whole: Bind, a masked DataRow
    /// (default 16MiB). COPY data and unmasked rows stream through.
    #[arg(long)]
    pub pg_max_message: Option<String>,
    /// Largest HTTP request header block (default 64KiB, at least 8KiB).
    #[arg(long)]
    pub http_max_header: Option<String>,
    /// Largest decoded response body inspected for masking (default 256MiB).
    #[arg(long)]
    pub http_max_decoded_body: Option<String>,
    /// How long an HTTP/1.1 connection may wait for a request head: idle
    /// between keep-alive requests, or a slow head (default 30s).
    #[arg(long)]
    pub http_idle_timeout: Option<String>,
}

impl Cli {
    fn socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| defaults::ADMIN_SOCKET.into())
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.socket();
    match cli.command {
        Command::Daemon(args) => {
            let file = config::read_daemon_table(&args.config)?;
            let flags = DaemonTable {
                policies: args.policies,
                state_dir: args.state_dir,
                admin_socket: cli.admin_socket,
                pin_dir: args.pin_dir,
                cgroup_root: args.cgroup_root,
                listen_port: args.listen_port,
                metrics: args.metrics,
                fsync: args.fsync,
                webhooks: (!args.webhooks.is_empty()).then_some(args.webhooks),
                udp_allow: (!args.udp_allow.is_empty()).then_some(args.udp_allow),
                memory_budget: args.memory_budget,
                workers: args.workers,
                pg_max_statement: args.pg_max_statement,
                pg_max_message: args.pg_max_message,
                http_max_header: args.http_max_header,
                http_max_decoded_body: args.http_max_decoded_body,
                http_idle_timeout: args.http_idle_timeout,
                auto_tag: Vec::new(),
                fleet: None,
                console: None,
            };
            let cfg = DaemonConfig::merge(flags, file)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("portcullis")
                .build()?;
            rt.block_on(crate::daemon::run(cfg))
        }
        Command::Status { json } => {
            let data = request(&socket, &Request::Status)?;
            if json {
                return print_json(&data);
            }
            let g = |k: &str| data.get(k).cloned().unwrap_or_default();
            println!(
                "portcullis {} (pid {}, up {}s)",
                s(&g("version")),
                g("pid"),
                g("uptime_secs")
            );
            println!("  attached:       {}", g("attached"));
            let ready = g("ready");
            let checks: Vec<String> = ready
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| v.as_bool() != Some(true))
                .map(|(k, _)| k.clone())
                .collect();
            println!(
                "  ready:          {}",
                if checks.is_empty() {
                    "yes".to_string()
                } else {
                    format!("no ({} failing)", checks.join(", "))
                }
            );
            println!(
                "  policy version: {} ({})",
                s(&g("policy_version")),
                s(&g("policies"))
            );
            println!(
                "  cgroup root:    {} (mount {})",
                s(&g("cgroup_root")),
                s(&g("cgroup_mount"))
            );
            println!("  listen port:    {}", g("listen_port"));
            println!("  pin dir:        {}", s(&g("pin_dir")));
            println!("  local CA:       {}", s(&g("ca_cert")));
            println!(
                "  tags: {}  flows: {}  namespaces served: {}",
                g("tags"),
                g("flows"),
                g("netns").as_array().map_or(0, |a| a.len())
            );
            let mem = g("memory");
            let rss = mem["rss_bytes"].as_u64().unwrap_or(0);
            println!(
                "  memory:         {} resident, budget {}{}",
                crate::limits::human(rss),
                mem["budget_bytes"]
                    .as_u64()
                    .map_or("off".to_string(), crate::limits::human),
                if mem["shedding"].as_bool() == Some(true) {
                    " (OVER: new sessions are shed)"
                } else {
                    ""
                }
            );
            Ok(())
        }
        Command::Tag {
            cgroup,
            pid,
            container,
            identity,
            token_file,
        } => {
            let token_file = token_file
                .map(|p| {
                    std::path::absolute(&p).with_context(|| format!("token file {}", p.display()))
                })
                .transpose()?;
            let data = request(
                &socket,
                &Request::Tag {
                    cgroup,
                    pid,
                    container,
                    identity,
                    token_file,
                },
            )?;
            for w in data["warnings"].as_array().into_iter().flatten() {
                eprintln!("warning: {}", s(w));
            }
            println!(
                "tagged {} as {}",
                s(&data["tag"]["cgroup"]),
                s(&data["tag"]["identity"])
            );
            Ok(())
        }
        Command::Untag {
            cgroup,
            pid,
            container,
        } => {
            let data = request(
                &socket,
                &Request::Untag {
                    cgroup,
                    pid,
                    container,
                },
            )?;
            println!("untagged {}", s(&data["untagged"]["cgroup"]));
            Ok(())
        }
        Command::Tags { json } => {
            let data = request(&socket, &Request::Tags)?;
            if json {
                return print_json(&data);
            }
            println!(
                "{:<40} {:<24} {:<10} TOKEN FILE",
                "CGROUP", "IDENTITY", "EXISTS"
            );
            for t in data["tags"].as_array().into_iter().flatten() {
                let auto = t["auto"]
                    .as_str()
                    .map(|g| format!("  (auto: {g})"))
                    .unwrap_or_default();
                println!(
                    "{:<40} {:<24} {:<10} {}{auto}",
                    s(&t["cgroup"]),
                    s(&t["identity"]),
                    t["exists"],
                    s(&t["token_file"])
                );
            }
            Ok(())
        }
        Command::Ca => {
            let data = request(&socket, &Request::Status)?;
            let path = data["ca_cert"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("the daemon did not name its CA certificate"))?;
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading the CA certificate {path}"))?;
            print!("{pem}");
            Ok(())
        }
        Command::Flows { json } => {
            let data = request(&socket, &Request::Flows)?;
            if json {
                return print_json(&data);
            }
            println!(
                "{:<18} {:<22} {:<22} {:<8} {:<18} {:<16} CGROUP",
                "SESSION", "CLIENT", "ORIGINAL DST", "PID", "IDENTITY", "RESOURCE"
            );
            for f in data["flows"].as_array().into_iter().flatten() {
                println!(
                    "{:<18} {:<22} {:<22} {:<8} {:<18} {:<16} {} ({})",
                    s(&f["session"]),
                    s(&f["client"]),
                    s(&f["original_dst"]),
                    f["pid"],
                    s(&f["identity"]),
                    s(&f["resource"]),
                    s(&f["cgroup"]),
                    f["cgroup_id"]
                );
            }
            Ok(())
        }
        Command::Audit(cmd) => audit_command(cmd),
        Command::Sessions {
            json,
            active,
            state_dir,
        } => {
            let state_dir = daemon_state_dir(&socket, state_dir);
            let mut list: Vec<serde_json::Value> =
                crate::record::list_sessions(&state_dir.join("sessions"))?
                    .into_iter()
                    .filter_map(|i| serde_json::to_value(i).ok())
                    .collect();
            if active {
                // The daemon knows what is live (a recording's files may lag
                // by up to its flush interval); without one, trust the files.
                let live = admin::call(&socket, &Request::Flows)
                    .ok()
                    .and_then(|r| r.data);
                match live {
                    Some(d) => {
                        list = d["flows"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|f| {
                                serde_json::json!({
                                    "id": f["session"], "protocol": f["protocol"], "resource": f["resource"],
                                    "identity": f["identity"], "cgroup": f["cgroup"], "pid": f["pid"],
                                    "client": f["client"], "original_dst": f["original_dst"],
                                    "started_ms": f["started_ms"],
                                })
                            })
                            .collect();
                    }
                    None => list.retain(|i| i["ended_ms"].is_null()),
                }
            }
            if json {
                return print_json(&serde_json::json!({ "sessions": list }));
            }
            println!(
                "{:<18} {:<9} {:<18} {:<16} {:<8} {:<10} END",
                "SESSION", "PROTOCOL", "IDENTITY", "RESOURCE", "PID", "RECORD"
            );
            for i in &list {
                println!(
                    "{:<18} {:<9} {:<18} {:<16} {:<8} {:<10} {}",
                    s(&i["id"]),
                    s(&i["protocol"]),
                    s(&i["identity"]),
                    s(&i["resource"]),
                    i["pid"],
                    s(&i["record"]),
                    i["end_reason"].as_str().unwrap_or("(active)")
                );
            }
            Ok(())
        }
        Command::Kill { id } => {
            crate::record::validate_id(&id).map_err(|e| anyhow::anyhow!("{e}"))?;
            request(&socket, &Request::Kill { id: id.clone() })?;
            println!("killed {id}");
            Ok(())
        }
        Command::Replay {
            id,
            speed,
            state_dir,
        } => {
            let state_dir = daemon_state_dir(&socket, state_dir);
            let mut out = std::io::stdout().lock();
            crate::record::replay(&state_dir.join("sessions"), &id, speed, &mut out)?;
            Ok(())
        }
        Command::Requests { json, watch } => {
            let mut seen: std::collections::HashMap<String, String> =
                std::collections::HashMap::new();
            loop {
                let data = request(&socket, &Request::Requests)?;
                let reqs = data["requests"].as_array().cloned().unwrap_or_default();
                if !watch {
                    if json {
                        return print_json(&data);
                    }
                    println!(
                        "{:<18} {:<10} {:<18} {:<16} {:<16} COMMAND",
                        "ID", "STATUS", "IDENTITY", "RESOURCE", "ACTION"
                    );
                    for r in &reqs {
                        print_request(r);
                    }
                    return Ok(());
                }
                for r in &reqs {
                    let id = s(&r["id"]);
                    let status = s(&r["status"]);
                    if seen.get(&id) != Some(&status) {
                        if json {
                            println!("{r}");
                        } else {
                            print_request(r);
                        }
                        seen.insert(id, status);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        Command::Approve {
            id,
            for_duration,
            reason,
            as_name,
        } => {
            let data = request(
                &socket,
                &Request::Approve {
                    id,
                    for_duration,
                    reason,
                    as_name,
                },
            )?;
            println!("approved {}", s(&data["request"]["id"]));
            if data["grant"].is_object() {
                println!(
                    "grant {} until {} (ms since epoch)",
                    s(&data["grant"]["id"]),
                    data["grant"]["expires_ms"]
                );
            }
            Ok(())
        }
        Command::Deny {
            id,
            reason,
            as_name,
        } => {
            let data = request(
                &socket,
                &Request::Deny {
                    id,
                    reason,
                    as_name,
                },
            )?;
            println!("denied {}", s(&data["request"]["id"]));
            Ok(())
        }
        Command::Grant {
            identity,
            resource,
            allow,
            for_duration,
            reason,
            as_name,
        } => {
            let data = request(
                &socket,
                &Request::Grant {
                    identity,
                    resource,
                    allow,
                    for_duration,
                    reason,
                    as_name,
                },
            )?;
            println!("grant {}", s(&data["grant"]["id"]));
            Ok(())
        }
        Command::Grants { json } => {
            let data = request(&socket, &Request::Grants)?;
            if json {
                return print_json(&data);
            }
            println!(
                "{:<18} {:<18} {:<16} {:<24} {:<16} BY",
                "ID", "IDENTITY", "RESOURCE", "ACTIONS", "EXPIRES IN"
            );
            let now = crate::proxy::session::now_ms();
            for g in data["grants"].as_array().into_iter().flatten() {
                let left = g["expires_ms"].as_u64().unwrap_or(0).saturating_sub(now) / 1000;
                let actions: Vec<String> = g["actions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                println!(
                    "{:<18} {:<18} {:<16} {:<24} {:<16} {}",
                    s(&g["id"]),
                    s(&g["identity"]),
                    s(&g["resource"]),
                    actions.join(","),
                    format!("{left}s"),
                    s(&g["created_by"])
                );
            }
            Ok(())
        }
        Command::Revoke { id, as_name } => {
            let data = request(&socket, &Request::Revoke { id, as_name })?;
            println!(
                "revoked {}; ended sessions: {}",
                s(&data["grant"]["id"]),
                data["ended_sessions"]
            );
            Ok(())
        }
        Command::Mcp(McpCommand::Tools { resource, json }) => {
            let data = request(&socket, &Request::McpTools { resource })?;
            if json {
                return print_json(&data);
            }
            println!(
                "{:<24} {:<10} {:<20} FINGERPRINT",
                "TOOL", "STATE", "FIRST SEEN"
            );
            for (name, t) in data["tools"].as_object().into_iter().flatten() {
                let seen = |ms: &serde_json::Value| {
                    crate::audit::rfc3339_ms_string(ms.as_u64().unwrap_or(0))
                };
                println!(
                    "{:<24} {:<10} {:<20} {}",
                    name,
                    "accepted",
                    seen(&t["first_seen_ms"]),
                    s(&t["fingerprint"])
                );
                if let Some(p) = t.get("pending").filter(|p| !p.is_null()) {
                    println!(
                        "{:<24} {:<10} {:<20} {}",
                        "",
                        "CHANGED",
                        seen(&p["first_seen_ms"]),
                        s(&p["fingerprint"])
                    );
                }
            }
            Ok(())
        }
        Command::Mcp(McpCommand::Accept {
            resource,
            tool,
            as_name,
        }) => {
            let data = request(
                &socket,
                &Request::McpAccept {
                    resource,
                    tool,
                    as_name,
                },
            )?;
            println!(
                "accepted {} of {}: {}",
                s(&data["tool"]),
                s(&data["resource"]),
                s(&data["accepted"]["fingerprint"])
            );
            Ok(())
        }
        Command::Policy(PolicyCommand::Check { dir }) => {
            match crate::policy::PolicySet::load(&dir) {
                Ok(set) => {
                    println!(
                        "{}: valid (version {}; {} issuers, {} identities, {} resources, {} rules)",
                        dir.display(),
                        set.version,
                        set.issuers.len(),
                        set.identities.len(),
                        set.resources.len(),
                        set.rules().len()
                    );
                    Ok(())
                }
                Err(e) => {
                    eprintln!("{e}");
                    bail!("{}: {} error(s)", dir.display(), e.diagnostics.len())
                }
            }
        }
        Command::Policy(PolicyCommand::Reload) => {
            let data = request(&socket, &Request::PolicyReload)?;
            println!("policy set reloaded: version {}", s(&data["version"]));
            Ok(())
        }
        Command::Policy(PolicyCommand::Show { json }) => {
            let data = request(&socket, &Request::PolicyShow)?;
            if json {
                return print_json(&data);
            }
            println!("version {} ({})", s(&data["version"]), s(&data["dir"]));
            println!("identities:");
            for i in data["identities"].as_array().into_iter().flatten() {
                println!(
                    "  {:<24} issuer {} subject {}",
                    s(&i["name"]),
                    s(&i["issuer"]),
                    s(&i["subject"])
                );
            }
            println!("resources:");
            for r in data["resources"].as_array().into_iter().flatten() {
                println!(
                    "  {:<24} {:<9} {}",
                    s(&r["name"]),
                    s(&r["protocol"]),
                    r["matches"]
                );
            }
            println!("rules:");
            for r in data["rules"].as_array().into_iter().flatten() {
                println!(
                    "  {:<32} {:<7}{}",
                    s(&r["id"]),
                    s(&r["effect"]),
                    if r["approval"] == true {
                        " @approval"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        Command::Install { prefix, bin } => install_command(&prefix, bin),
        Command::Uninstall { prefix, purge } => uninstall_command(&socket, &prefix, purge),
        Command::Detach { pin_dir } => {
            if socket.exists() {
                if let Ok(resp) = admin::call(&socket, &Request::Detach) {
                    if !resp.ok {
                        bail!("{}", resp.error.unwrap_or_default());
                    }
                    println!("daemon detached its programs and removed its pins; nothing new is intercepted");
                    return Ok(());
                }
            }
            crate::sys::require_root()?;
            crate::redirect::remove_pins(&pin_dir)
                .with_context(|| format!("removing pins under {}", pin_dir.display()))?;
            println!(
                "no daemon answered on {}; removed pins under {} (programs detached)",
                socket.display(),
                pin_dir.display()
            );
            Ok(())
        }
    }
}

fn systemd_booted() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) -> bool {
    std::process::Command::new("systemctl")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

fn print_report(r: &crate::install::Report) {
    for (label, list) in [
        ("created", &r.created),
        ("replaced", &r.replaced),
        ("kept", &r.kept),
        ("removed", &r.removed),
    ] {
        for p in list {
            println!("{label:>9} {}", p.display());
        }
    }
}

fn install_command(prefix: &std::path::Path, bin: Option<PathBuf>) -> anyhow::Result<()> {
    use crate::install::{install, Layout};
    let layout = Layout::new(prefix);
    let bin = match bin {
        Some(b) => b,
        None => std::env::current_exe().context("finding this binary")?,
    };
    let report = install(&layout, &bin)?;
    print_report(&report);
    println!(
        "note: the example policies trust the demo issuer (policies/demo); remove it and its identities before production use"
    );
    if layout.is_root() {
        if systemd_booted() {
            systemctl(&["daemon-reload"]);
            println!("next: systemctl enable --now portcullis   (status: portcullis status)");
        } else {
            println!("systemd is not running: start the daemon with `portcullis daemon &` (it reads /etc/portcullis/portcullis.toml)");
        }
    }
    Ok(())
}

fn uninstall_command(
    socket: &std::path::Path,
    prefix: &std::path::Path,
    purge: bool,
) -> anyhow::Result<()> {
    use crate::install::{uninstall, Layout};
    let layout = Layout::new(prefix);
    if layout.is_root() {
        crate::sys::require_root()?;
        // Read the pin dir before the config goes.
        let table =
            config::read_daemon_table(std::path::Path::new(defaults::CONFIG)).unwrap_or_default();
        let pin_dir = table.pin_dir.unwrap_or_else(|| defaults::PIN_DIR.into());
        if systemd_booted() {
            systemctl(&["disable", "--now", "portcullis"]);
        }
        stop_daemon(socket);
        // A stopped daemon leaves its pins (fail-closed): uninstalling must
        // open the gate, or tagged agents stay cut off for good.
        crate::redirect::remove_pins(&pin_dir)
            .with_context(|| format!("removing pins under {}", pin_dir.display()))?;
        println!("detached: removed pins under {}", pin_dir.display());
    }
    let report = uninstall(&layout, purge)?;
    print_report(&report);
    if !report.kept.is_empty() {
        println!("kept files changed since install (remove them by hand, or use --purge)");
    }
    if !purge {
        println!(
            "the state dir ({}) stays: audit log, recordings, keys; --purge removes it",
            layout.at(defaults::STATE_DIR).display()
        );
    }
    if layout.is_root() && systemd_booted() {
        systemctl(&["daemon-reload"]);
    }
    Ok(())
}

/// Stops a daemon that answers on `socket` (one started without systemd):
/// SIGTERM, then wait up to 15 s for it to go.
fn stop_daemon(socket: &std::path::Path) {
    let Ok(resp) = admin::call(socket, &Request::Status) else {
        return;
    };
    let Some(pid) = resp
        .data
        .as_ref()
        .and_then(|d| d["pid"].as_u64())
        .and_then(|p| i32::try_from(p).ok())
    else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
        return;
    }
    println!("stopping the daemon (pid {pid})");
    for _ in 0..150 {
        if nix::sys::signal::kill(pid, None).is_err() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!("warning: daemon pid {pid} did not stop within 15 s");
}

/// Where `audit verify` looks for the checkpoint key, in order: `--pubkey`
/// alone when given; else beside the audit directory (`DIR/../audit.pub`:
/// a state dir keeps `audit.pub` next to `audit/`, so `verify
/// <state>/audit` needs no `--pubkey`), then `<state>/audit.pub`.
fn verify_key_candidates(
    dir: Option<&Path>,
    state_dir: &Path,
    pubkey: Option<&Path>,
) -> Vec<PathBuf> {
    if let Some(p) = pubkey {
        return vec![p.to_path_buf()];
    }
    let mut out = Vec::with_capacity(2);
    if let Some(dir) = dir {
        // Resolve `.`, `..`, `audit/` and symlinks before taking the parent.
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        if let Some(parent) = dir.parent() {
            out.push(parent.join("audit.pub"));
        }
    }
    let default = state_dir.join("audit.pub");
    if !out.contains(&default) {
        out.push(default);
    }
    out
}

/// `portcullis audit verify --fleet`: every node's shipped chain, the first
/// broken event per node; non-zero when any node's chain is broken.
fn verify_fleet(config: &Path, json: bool) -> anyhow::Result<()> {
    let table = config::read_daemon_table(config)?;
    let Some(fleet_cfg) = table.fleet else {
        bail!("{} has no [fleet] table naming the store", config.display());
    };
    let store = fleet_cfg.store("portcullis-verify")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nodes = rt.block_on(async { crate::fleet::ship::verify_fleet(&store).await })?;
    let broken: Vec<&str> = nodes
        .iter()
        .filter(|n| !n.report.is_ok())
        .map(|n| n.node.as_str())
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "nodes": nodes }))?
        );
    } else {
        for n in &nodes {
            println!("node {}: {}", n.node, n.report);
            if n.unshipped > 0 {
                println!("  ({} events not shipped yet)", n.unshipped);
            }
        }
        if nodes.is_empty() {
            println!("no node has shipped audit events yet");
        }
    }
    if broken.is_empty() {
        Ok(())
    } else {
        bail!("audit chain broken on node(s): {}", broken.join(", "))
    }
}

fn audit_command(cmd: AuditCommand) -> anyhow::Result<()> {
    use crate::audit;
    match cmd {
        AuditCommand::Verify {
            fleet: true,
            config,
            json,
            ..
        } => verify_fleet(&config, json),
        AuditCommand::Verify {
            dir,
            state_dir,
            pubkey,
            json,
            ..
        } => {
            let candidates = verify_key_candidates(dir.as_deref(), &state_dir, pubkey.as_deref());
            let dir = dir.unwrap_or_else(|| state_dir.join("audit"));
            let pubkey = match (pubkey, candidates.iter().find(|p| p.is_file())) {
                // Given: use it, and let a missing file say so below.
                (Some(given), _) => given,
                (None, Some(found)) => {
                    // On stderr: `--json` keeps stdout to the report.
                    eprintln!("checkpoint public key: {}", found.display());
                    found.clone()
                }
                (None, None) => bail!(
                    "no checkpoint public key for {}: looked for {}; give --pubkey PATH \
                     (the audit.pub of the state dir that wrote this log, or its off-host copy)",
                    dir.display(),
                    candidates
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
            };
            let key = audit::load_public_key(&pubkey)
                .with_context(|| format!("checkpoint public key {}", pubkey.display()))?;
            let report = audit::verify(&dir, &key);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            if report.is_ok() {
                Ok(())
            } else {
                bail!("audit log {} does not verify", dir.display())
            }
        }
        AuditCommand::Pubkey { state_dir } => {
            let path = state_dir.join("audit.pub");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            println!("{}", text.trim());
            Ok(())
        }
        AuditCommand::Tail {
            state_dir,
            json,
            follow,
            session,
            identity,
            since,
            last,
        } => {
            let dir = state_dir.join("audit");
            let since_ms = since
                .as_deref()
                .map(audit::parse_since)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            let filter = audit::TailFilter {
                session,
                identity,
                since_ms,
                last,
            };
            let events = audit::read_events(&dir, &filter)?;
            let mut next = 1;
            for e in &events {
                print_event(e, json);
                next = e["seq"].as_u64().map_or(next, |s| s + 1);
            }
            if follow {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let filter = audit::TailFilter {
                    last: None,
                    ..filter
                };
                rt.block_on(audit::follow(&dir, filter, next, |e| print_event(&e, json)))?;
            }
            Ok(())
        }
    }
}

fn print_request(r: &serde_json::Value) {
    println!(
        "{:<18} {:<10} {:<18} {:<16} {:<16} {}",
        s(&r["id"]),
        s(&r["status"]),
        s(&r["identity"]),
        s(&r["resource"]),
        s(&r["action"]),
        match r["node"].as_str() {
            Some(node) => format!("[{node}] {}", s(&r["command"])),
            None => s(&r["command"]),
        }
    );
}

fn print_event(e: &serde_json::Value, json: bool) {
    if json {
        println!("{e}");
        return;
    }
    let opt = |k: &str| e.get(k).map(s).filter(|v| v != "-");
    let mut line = format!("{:>6} {} {:<16}", e["seq"], s(&e["time"]), s(&e["type"]));
    if let Some(id) = e.get("identity").and_then(|i| i.get("name")) {
        line.push_str(&format!(" identity={}", s(id)));
    }
    for k in [
        "session", "resource", "action", "decision", "reason", "cgroup",
    ] {
        if let Some(v) = opt(k) {
            line.push_str(&format!(" {k}={v}"));
        }
    }
    println!("{line}");
}

fn request(socket: &std::path::Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    let resp = admin::call(socket, req)?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_else(|| "request refused".into()));
    }
    Ok(resp.data.unwrap_or_default())
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn s(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The state directory a recording subcommand reads: the one given, else
/// the running daemon's (asked over the admin socket, like every other
/// client subcommand), else the default. Recordings are files, so they can
/// be read with the daemon stopped.
fn daemon_state_dir(socket: &std::path::Path, given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| {
            admin::call(socket, &Request::Status)
                .ok()
                .and_then(|r| r.data)
                .and_then(|d| d["state_dir"].as_str().map(PathBuf::from))
        })
        .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_looks_for_the_key_beside_the_audit_dir_first() {
        let tmp = crate::testutil::TempDir::new("cli", "verify-key");
        let state = tmp.path().join("state");
        std::fs::create_dir_all(state.join("audit")).expect("mkdir");
        let state = std::fs::canonicalize(&state).expect("canonicalize");
        let other = Path::new("/nonexistent/portcullis");
        // DIR given: its parent's audit.pub, then the state dir's.
        assert_eq!(
            verify_key_candidates(Some(&state.join("audit")), other, None),
            vec![state.join("audit.pub"), other.join("audit.pub")]
        );
        // Trailing slash and `..` resolve to the same directory.
        let odd = state.join("audit").join("..").join("audit").join("");
        assert_eq!(
            verify_key_candidates(Some(&odd), other, None).first(),
            Some(&state.join("audit.pub"))
        );
        // No DIR: only the state dir's key; no duplicate when they agree.
        assert_eq!(
            verify_key_candidates(None, &state, None),
            vec![state.join("audit.pub")]
        );
        assert_eq!(
            verify_key_candidates(Some(&state.join("audit")), &state, None),
            vec![state.join("audit.pub")]
        );
        // --pubkey wins alone.
        let given = tmp.path().join("safe.pub");
        assert_eq!(
            verify_key_candidates(Some(&state.join("audit")), other, Some(&given)),
            vec![given]
        );
    }
}
