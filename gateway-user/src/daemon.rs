//! The daemon: startup, the state every part shares, and the background
//! loops that keep the kernel in step with tags and network namespaces.
//!
//! Owns wiring and lifecycles. Each concern's logic lives in its module
//! (redirect, identity, policy, proxy, admin); this file only connects them.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use gateway_common::{FlowKey, KernelEvent, OrigDst, EVENT_UNSERVED_NETNS};
use tokio::{io::unix::AsyncFd, net::TcpListener, sync::Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    audit::{AuditConfig, AuditError, AuditEvent, AuditLog},
    config::DaemonConfig,
    identity::{CgroupTree, IdentityBinder, TagStore},
    metrics::Metrics,
    policy::{PolicySet, Resolver},
    proxy::{self, Sessions},
    redirect::{
        netns::{self, NetnsId},
        AttachSettings, Redirector,
    },
    sys,
};

/// How often tags and namespaces are reconciled without a kernel event.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// Scans a namespace may go unseen before its listener closes.
const NETNS_GRACE_SCANS: u32 = 6;
/// How often hostname matches are resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// A namespace with a proxy listener.
#[derive(Debug)]
pub struct ServedNetns {
    /// Its cookie.
    pub cookie: u64,
    /// A process seen in it.
    pub pid: u32,
    /// Stops its accept loops.
    pub cancel: CancellationToken,
    /// Consecutive scans it was not seen in.
    pub misses: u32,
    /// The daemon's own namespace (never closed).
    pub host: bool,
    /// Interfaces whose egress filter drops tagged AF_PACKET frames (0 when
    /// attaching failed: see the log).
    pub egress_guarded: usize,
}

/// State shared by every task of the daemon.
pub struct Shared {
    /// Effective configuration.
    pub cfg: DaemonConfig,
    /// The governed cgroup tree.
    pub cgroups: CgroupTree,
    /// Tags.
    pub tags: RwLock<TagStore>,
    /// Kernel programs and maps.
    pub redirect: Mutex<Redirector>,
    /// The policy set in force.
    pub policy: ArcSwap<PolicySet>,
    /// Hostname matches.
    pub resolver: Resolver,
    /// The tamper-evident audit log.
    pub audit_log: AuditLog,
    /// OIDC verifiers and token files.
    pub identities: IdentityBinder,
    /// Access requests and grants.
    pub jit: crate::jit::Jit,
    /// The fleet this node shares requests, grants and audit with
    /// (`[fleet]`); `None`: single node.
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    /// Session recordings.
    pub recorder: crate::record::Recorder,
    /// The daemon's SSH host key (`<state>/ssh/host_ed25519`): what agents
    /// see when their SSH is intercepted.
    pub ssh_host_key: Arc<russh::keys::PrivateKey>,
    /// Webhooks for access requests.
    pub webhooks: crate::jit::Webhooks,
    /// Live sessions.
    pub sessions: Sessions,
    /// The local CA that mints leaves for TLS interception.
    pub ca: Arc<crate::proxy::http::ca::LocalCa>,
    /// Kept-alive upstream connections of http resources.
    pub http_pool: crate::proxy::http::upstream::Pool,
    /// The threads sessions run on (one per core).
    pub workers: crate::workers::Workers,
    /// Namespaces with listeners.
    pub netns: Mutex<HashMap<NetnsId, ServedNetns>>,
    /// Counters.
    pub metrics: Metrics,
    /// Resident memory, sampled for `memory_budget`.
    pub memory: crate::limits::MemoryGauge,
    /// Wakes the reconcile loop early (new tag, kernel event).
    pub reconcile_now: Notify,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
    /// When the daemon started.
    pub started: SystemTime,
    /// Whether the BPF LSM (and so the socket-family program) is in force.
    pub lsm: crate::sys::LsmStatus,
    /// The UDP destinations in the kernel's allow list now.
    pub udp_allow: Mutex<Vec<crate::config::UdpDest>>,
    cgroup_index: Mutex<(HashMap<u64, String>, Option<Instant>)>,
    /// Namespaces the daemon refused to serve: when it last tried, the pid
    /// it tried through, and why.
    pub netns_failures: Mutex<HashMap<NetnsId, NetnsFailure>>,
}

/// A namespace the daemon could not (or would not) serve.
#[derive(Debug, Clone)]
pub struct NetnsFailure {
    /// When serving it was last tried.
    pub at: Instant,
    /// A process seen in it.
    pub pid: u32,
    /// Why it is not served.
    pub reason: String,
}

impl Shared {
    /// Appends an audit event (with the policy version in force unless set).
    /// Returns once it is in the log file; fails when the log cannot be
    /// written, and the caller must then deny whatever it was about to do.
    pub async fn audit(&self, mut event: AuditEvent) -> Result<u64, AuditError> {
        if event.policy_version.is_none() {
            event.policy_version = Some(self.policy.load().version.clone());
        }
        self.audit_log.record(event).await
    }

    /// [`Shared::audit`] without waiting ([`AuditLog::try_record`]): the
    /// event back when writing it now would have meant waiting.
    pub fn try_audit(&self, mut event: AuditEvent) -> crate::audit::TryRecord {
        if event.policy_version.is_none() {
            event.policy_version = Some(self.policy.load().version.clone());
        }
        self.audit_log.try_record(event)
    }

    /// Ends live sessions whose identity is no longer proven (token expired,
    /// rotated to one that does not validate, issuer keys gone). Uses cached
    /// keys only. Returns (session, reason) pairs.
    pub fn end_unproven_sessions(&self) -> Vec<(String, String)> {
        let policy = self.policy.load();
        let tags = self.tags.read().unwrap_or_else(|p| p.into_inner());
        let mut ended = Vec::new();
        self.sessions.cancel_where(|f| {
            let verdict = match tags.nearest(&f.cgroup) {
                None => Err("tag removed".to_string()),
                Some(t) => self
                    .identities
                    .prove_cached(&policy, t)
                    .map_err(|e| e.to_string()),
            };
            match verdict {
                Ok(_) => false,
                Err(reason) => {
                    ended.push((f.session.clone(), reason));
                    true
                }
            }
        });
        ended
    }

    /// Takes the kernel's flow entry for a client.
    pub fn take_flow(&self, key: &FlowKey) -> Option<OrigDst> {
        self.redirect
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_flow(key)
    }

    /// The path of a governed cgroup by id, rescanning the tree (at most
    /// every 100 ms) when the id is new.
    pub fn cgroup_path(&self, id: u64) -> Option<String> {
        let mut guard = self.cgroup_index.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = guard.0.get(&id) {
            return Some(p.clone());
        }
        let stale = guard
            .1
            .is_none_or(|t| t.elapsed() > Duration::from_millis(100));
        if stale {
            guard.0 = self.cgroups.index();
            guard.1 = Some(Instant::now());
        }
        guard.0.get(&id).cloned()
    }

    /// Pushes the current tags' cgroup ids into the kernel.
    pub fn sync_tags(&self) -> anyhow::Result<()> {
        let ids: Vec<(u64, u32)> = {
            let tags = self.tags.read().unwrap_or_else(|p| p.into_inner());
            tags.iter()
                .filter_map(|t| {
                    self.cgroups
                        .id_of(&t.cgroup)
                        .ok()
                        .map(|id| (id, t.created as u32))
                })
                .collect()
        };
        self.redirect
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sync_tagged(&ids)?;
        Ok(())
    }

    /// Ends live sessions the policy set in force no longer allows: their
    /// resource or identity is gone, or (tcp) `tcp:connect` is no longer
    /// allowed. Returns the ended session ids.
    pub fn reevaluate_sessions(&self) -> Vec<String> {
        let policy = self.policy.load();
        self.sessions.cancel_where(|f| {
            let gone = match policy.resources.get(&f.resource) {
                None => true,
                Some(r) => r.protocol != f.protocol || !policy.identities.contains_key(&f.identity),
            };
            // A session a grant let in stays approved while the grant lasts.
            // A one-time approval lasts as long as the session.
            let approved = match f.grant.as_deref() {
                Some(g) => self.jit.grants().iter().any(|x| x.id == g),
                None => f.approved_by.is_some(),
            };
            // A connect not let in yet (being decided, or waiting for a
            // human) is decided under the rules in force when that happens:
            // only a deny ends it now.
            gone || (f.protocol == crate::policy::Protocol::Tcp
                && match crate::proxy::tcp::decide_connect_info(self, f, approved) {
                    crate::policy::Decision::Allow { .. } => false,
                    crate::policy::Decision::Hold { .. } => f.admitted,
                    crate::policy::Decision::Deny { .. } => true,
                })
        })
    }

    /// Ends the live sessions that rely on a grant (revoked or expired).
    pub fn end_sessions_of_grant(&self, grant: &str) -> Vec<String> {
        self.sessions
            .cancel_where(|f| f.grant.as_deref() == Some(grant))
    }

    /// Ends live sessions whose cgroup is no longer covered by the tag and
    /// identity they started with. Returns the ended session ids.
    pub fn end_untagged_sessions(&self) -> Vec<String> {
        let tags = self.tags.read().unwrap_or_else(|p| p.into_inner());
        self.sessions.cancel_where(|f| {
            tags.nearest(&f.cgroup)
                .is_none_or(|t| t.identity != f.identity || t.cgroup != f.tagged_cgroup)
        })
    }
}

/// Starts the daemon and runs it until SIGINT or SIGTERM.
pub async fn run(cfg: DaemonConfig) -> anyhow::Result<()> {
    sys::require_root()?;
    sys::require_kernel()?;
    sys::require_btf()?;
    let mount = sys::cgroup2_mount()?;
    let cgroups = CgroupTree::new(mount, &cfg.cgroup_root)
        .with_context(|| format!("governed cgroup root {:?}", cfg.cgroup_root))?;

    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.state_dir)
        .with_context(|| format!("creating state dir {}", cfg.state_dir.display()))?;
    let tags = TagStore::open(cfg.state_dir.join("tags.json"))?;
    // No process is exempt from the kernel programs by PID: the daemon's own
    // connects are left alone only because it runs outside every tagged
    // cgroup. A tag covering it would redirect its upstream connects to
    // itself (and a PID exemption would outlive it): refuse to start.
    if let Ok(own) = cgroups.cgroup_of_pid(std::process::id()) {
        if let Some(t) = tags.nearest(&own) {
            bail!(
                "the daemon runs in {own}, which the tag on {} (identity {}) governs: a proxy must never govern itself; run it outside every tagged cgroup or remove that tag",
                t.cgroup,
                t.identity
            );
        }
    }

    let policy = PolicySet::load(&cfg.policies)
        .map_err(|e| anyhow::anyhow!("policy set {} is invalid:\n{e}", cfg.policies.display()))?;
    info!(version = %policy.version, dir = %cfg.policies.display(), resources = policy.resources.len(), "policy set loaded");

    // Fail before touching the kernel if another daemon owns the socket.
    let admin_listener = crate::admin::bind(&cfg.admin_socket)?;

    let (mut jit, mut failed_requests) = crate::jit::Jit::load(&cfg.state_dir)?;
    let fleet = match &cfg.fleet {
        None => None,
        Some(f) => {
            let fleet = crate::fleet::Fleet::new(f).map_err(|e| anyhow::anyhow!(e))?;
            jit = jit.with_node(&fleet.node);
            // Other nodes' requests listed here were only copies: the store
            // says where they stand at the first sync.
            failed_requests.retain(|r| r.node.as_deref().is_none_or(|n| n == fleet.node));
            // The store being down does not stop the node: decisions are
            // local; holds fail closed until it returns.
            match fleet.ensure_schema().await {
                Ok(()) => info!(node = %fleet.node, "fleet store ready"),
                Err(e) => warn!(node = %fleet.node, "fleet store not reachable yet: {e}"),
            }
            Some(Arc::new(fleet))
        }
    };
    let recorder = crate::record::Recorder::start(cfg.state_dir.join("sessions"))
        .context("starting the session recorder")?;
    let ca = crate::proxy::http::ca::LocalCa::load_or_create(&cfg.state_dir.join("ca"))
        .context("the local CA for TLS interception")?;
    info!(cert = %ca.cert_path().display(), "local CA ready");
    let ssh_host_key = crate::proxy::ssh::hostkey::ensure_daemon_key(&cfg.state_dir)
        .context("the SSH host key")?;
    info!(
        fingerprint = %crate::proxy::ssh::hostkey::fingerprint(ssh_host_key.public_key()),
        public_key = %cfg.state_dir.join("ssh").join(format!("{}.pub", crate::proxy::ssh::hostkey::HOST_KEY_FILE)).display(),
        "ssh host key"
    );
    let webhooks = crate::jit::Webhooks::start(&cfg.webhooks).map_err(|e| anyhow::anyhow!(e))?;

    let mut audit_cfg = AuditConfig::new(&cfg.state_dir);
    audit_cfg.fsync = cfg.fsync;
    let (audit_log, report) = AuditLog::open(audit_cfg).context("opening the audit log")?;
    if let Some(r) = &report.recovered {
        warn!(file = %r.file.display(), bytes_dropped = r.bytes_dropped, "audit log: truncated a torn last line left by a crash");
    }
    info!(file = %report.file.display(), next_seq = report.next_seq, public_key = %report.public_key_hex, "audit log open");

    match sys::raise_nofile_limit() {
        Ok(n) => info!(limit = n, "open-file limit"),
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
    sys::ensure_bpffs(&cfg.pin_dir)?;
    let mut lsm = sys::bpf_lsm_status();
    let udp_allow = cfg.effective_udp_allow();
    info!(udp_allow = %list(&udp_allow), "UDP destinations tagged cgroups may reach");
    let mut redirector = Redirector::attach(&AttachSettings {
        pin_dir: cfg.pin_dir.clone(),
        cgroup_dir: cgroups.root_dir(),
        listen_port: cfg.listen_port,
        udp_allow: udp_allow.clone(),
        lsm: lsm.active,
    })
    .context("attaching eBPF programs")?;
    if let Err(why) = redirector.lsm_enforced() {
        if lsm.active {
            lsm = sys::LsmStatus {
                active: false,
                detail: format!("{why} ({})", lsm.detail),
            };
        }
    }
    if lsm.active {
        info!(detail = %lsm.detail, "BPF LSM program attached: tagged cgroups cannot create AF_PACKET, AF_XDP, AF_VSOCK or other non-inet sockets");
    } else {
        warn!(detail = %lsm.detail, "socket-family enforcement is OFF: AF_PACKET, AF_XDP, AF_VSOCK and other non-inet sockets are NOT denied to tagged cgroups (raw and other inet sockets still are); see SECURITY.md");
    }
    let events = redirector.take_events();
    let logger = redirector.take_logger();

    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        cgroups,
        tags: RwLock::new(tags),
        redirect: Mutex::new(redirector),
        policy: ArcSwap::from_pointee(policy),
        resolver: Resolver::default(),
        audit_log,
        identities: IdentityBinder::default(),
        jit,
        fleet,
        recorder,
        ssh_host_key,
        webhooks,
        sessions: Sessions::new(),
        ca: Arc::new(ca),
        http_pool: Default::default(),
        workers: crate::workers::Workers::start(cfg.workers, "conn")
            .context("starting the connection workers")?,
        netns: Mutex::new(HashMap::new()),
        metrics: Metrics::default(),
        memory: crate::limits::MemoryGauge::default(),
        reconcile_now: Notify::new(),
        shutdown: CancellationToken::new(),
        started: SystemTime::now(),
        lsm,
        udp_allow: Mutex::new(udp_allow),
        cgroup_index: Mutex::new((HashMap::new(), None)),
        netns_failures: Mutex::new(HashMap::new()),
    });
    shared.sync_tags()?;
    for v in shared.identities.sync(&shared.policy.load()) {
        if let Err(e) = v.refresh().await {
            warn!("issuer keys unavailable for now: {e}");
        }
    }
    shared
        .audit(
            AuditEvent::new("daemon_start")
                .detail("pid", std::process::id())
                .detail("version", env!("CARGO_PKG_VERSION"))
                .detail("cgroup_root", shared.cgroups.root())
                .detail("listen_port", cfg.listen_port),
        )
        .await
        .context("writing the first audit event")?;
    for r in failed_requests {
        let ev = AuditEvent::new("access_request")
            .session(r.session.clone())
            .identity(crate::audit::IdentityRef::named(&r.identity))
            .resource(r.resource.clone())
            .action(r.action.clone())
            .decision("deny")
            .reason("failed: the daemon restarted; the waiting connection died with it")
            .detail("request", r.id.clone());
        shared.audit(ev).await?;
    }
    let failures = shared.resolver.refresh(&shared.policy.load()).await;
    for f in failures {
        warn!("resource hostname does not resolve: {f}");
    }

    // The daemon's own namespace is always served.
    serve_netns(
        &shared,
        Path::new("/proc/self/ns/net"),
        std::process::id(),
        true,
    )
    .with_context(|| format!("listening on 127.0.0.1:{}", cfg.listen_port))?;

    let mut tasks = tokio::task::JoinSet::new();
    // Sampled before the first session, then every 100 ms off the data path.
    shared.memory.sample();
    {
        let s = shared.clone();
        tasks.spawn(async move { s.memory.run(s.shutdown.clone()).await });
    }
    tasks.spawn(reconcile_loop(shared.clone()));
    tasks.spawn(resolve_loop(shared.clone()));
    tasks.spawn(watch_policies(shared.clone()));
    tasks.spawn(identity_loop(shared.clone()));
    tasks.spawn(grant_expiry_loop(shared.clone()));
    if let Some(fleet) = shared.fleet.clone() {
        tasks.spawn(fleet.clone().listen_loop());
        tasks.spawn(fleet_sync_loop(shared.clone(), fleet.clone()));
        let shipper = crate::fleet::ship::Shipper {
            node: fleet.node.clone(),
            audit_dir: cfg.state_dir.join("audit"),
            pubkey_file: cfg.state_dir.join("audit.pub"),
            store: fleet.new_store(&format!("portcullis-ship:{}", fleet.node)),
            status: fleet.shipping.clone(),
        };
        let thread = shipper
            .spawn_thread(fleet.ship_priority)
            .context("starting the audit shipper")?;
        // The thread stops when its handle drops, with the other tasks.
        tasks.spawn(async move {
            let _thread = thread;
            std::future::pending::<()>().await
        });
    }
    if !cfg.auto_tag.is_empty() {
        // Existing cgroups are tagged before the daemon says it is ready.
        auto_tag_scan(&shared).await;
        tasks.spawn(auto_tag_loop(shared.clone()));
    }
    if let Some(events) = events {
        tasks.spawn(kernel_events(shared.clone(), events));
    }
    if let Some(logger) = logger {
        tasks.spawn(ebpf_logs(shared.clone(), logger));
    }
    tasks.spawn(crate::admin::serve(shared.clone(), admin_listener));
    if let Some(console) = &cfg.console {
        let console = crate::console::Console::bind(console, shared.ca.clone())
            .await
            .context("starting the review console")?;
        console.publish_one_time_sign_in(&cfg.state_dir)?;
        tasks.spawn(console.run(shared.clone()));
    }
    if let crate::config::Metrics::On(addr) = cfg.metrics {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                tasks.spawn(crate::metrics::serve(shared.clone(), l));
            }
            Err(e) => error!("metrics endpoint {addr} unavailable: {e} (use --metrics ADDR|off)"),
        }
    }
    tasks.spawn(map_fill_loop(shared.clone()));
    info!(
        pid = std::process::id(),
        listen_port = cfg.listen_port,
        cgroup_root = %shared.cgroups.root(),
        admin_socket = %cfg.admin_socket.display(),
        memory_budget = %cfg.memory_budget.map_or("off".to_string(), crate::limits::human),
        workers = cfg.workers,
        rss = %crate::limits::human(shared.memory.rss()),
        "portcullis daemon ready"
    );
    // systemd (Type=notify): ready once programs are attached and every
    // listener is up. Without NOTIFY_SOCKET these are no-ops.
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!(
            "governing {} on port {}",
            shared.cgroups.root(),
            cfg.listen_port
        )),
    ]);
    if let Some(timeout) = sd_notify::watchdog_enabled().filter(|t| !t.is_zero()) {
        tasks.spawn(watchdog_loop(timeout / 2));
    }

    wait_for_signal(&shared).await?;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    info!("shutting down; pinned programs stay attached, so tagged agents are refused until a daemon runs again");
    // Clear the kernel config and served namespaces first: from here on a
    // tagged connect fails with EPERM instead of going to a port whose
    // listener is about to close.
    shared
        .redirect
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .shut_down();
    shared.shutdown.cancel();
    tasks.abort_all();
    let _ = shared
        .audit(AuditEvent::new("daemon_stop").reason("signal"))
        .await;
    let _ = fs::remove_file(&cfg.admin_socket);
    // The sessions still running are dropped, as this runtime drops its
    // own tasks when `run` returns.
    let s = shared.clone();
    let _ = tokio::task::spawn_blocking(move || s.workers.stop()).await;
    Ok(())
}

async fn wait_for_signal(shared: &Shared) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => { let _ = reload_policy(shared, "SIGHUP").await; }
        }
    }
}

/// Loads the policy directory again. A broken set keeps the old one and is
/// reported (log, audit, and to the caller); a good one replaces it and
/// live sessions whose access is gone are ended.
pub async fn reload_policy(
    shared: &Shared,
    trigger: &str,
) -> Result<String, crate::policy::PolicyError> {
    let started = Instant::now();
    match PolicySet::load(&shared.cfg.policies) {
        Ok(set) => {
            let version = set.version.clone();
            for f in shared.resolver.refresh(&set).await {
                warn!("resource hostname does not resolve: {f}");
            }
            let fresh = shared.identities.sync(&set);
            let previous = shared.policy.swap(Arc::new(set));
            for v in fresh {
                if let Err(e) = v.refresh().await {
                    warn!("issuer keys unavailable for now: {e}");
                }
            }
            let ended = shared.reevaluate_sessions();
            let mut ev = AuditEvent::new("policy_reload")
                .policy_version(version.clone())
                .detail("previous", previous.version.clone())
                .detail("trigger", trigger);
            for s in &ended {
                ev = ev.detail(format!("ended:{s}"), "access gone after reload");
            }
            if let Err(e) = shared.audit(ev).await {
                warn!("audit record of a policy reload failed: {e}");
            }
            info!(
                event = "policy_reload",
                version = %version,
                previous = %previous.version,
                trigger,
                ended_sessions = ?ended,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "policy set reloaded"
            );
            Ok(version)
        }
        Err(e) => {
            let ev = AuditEvent::new("policy_reload_failed")
                .reason(e.to_string())
                .detail("trigger", trigger);
            if let Err(err) = shared.audit(ev).await {
                warn!("audit record of a refused reload failed: {err}");
            }
            error!(
                event = "policy_reload_failed",
                trigger,
                errors = %e,
                "policy set refused; keeping version {}",
                shared.policy.load().version
            );
            Err(e)
        }
    }
}

async fn watch_policies(shared: Arc<Shared>) {
    let (watcher, mut rx) = match crate::policy::watch::watch(&shared.cfg.policies) {
        Ok(w) => w,
        Err(e) => {
            error!(
                "cannot watch {}: {e}; reload with SIGHUP or `portcullis policy reload`",
                shared.cfg.policies.display()
            );
            return;
        }
    };
    let _keep = watcher;
    while rx.recv().await.is_some() {
        let _ = reload_policy(&shared, "file change").await;
    }
}

/// Opens listeners in a namespace, marks it served in the kernel and starts
/// accepting on them.
fn serve_netns(shared: &Arc<Shared>, ns_file: &Path, pid: u32, host: bool) -> anyhow::Result<()> {
    let id = netns::netns_of_path(ns_file)?;
    let listeners = netns::listen_in(ns_file, shared.cfg.listen_port)?;
    let cancel = shared.shutdown.child_token();
    let cookie = listeners.cookie;
    let ipv6 = listeners.v6.is_some();
    if !ipv6 {
        warn!(
            netns_inode = id.1,
            cookie,
            pid,
            "namespace has no IPv6 loopback: served for IPv4 only, its IPv6 connects are refused"
        );
    }
    let mut sockets = vec![listeners.v4];
    sockets.extend(listeners.v6);
    for s in sockets {
        let l = TcpListener::from_std(s)?;
        tokio::spawn(accept_loop(shared.clone(), l, cookie, cancel.clone()));
    }
    shared
        .redirect
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .serve_netns(cookie, ipv6)?;
    let egress_guarded = match shared
        .redirect
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .guard_egress(ns_file, cookie, true)
    {
        Ok(n) => n,
        Err(e) => {
            warn!(
                netns_inode = id.1,
                cookie, "AF_PACKET egress filter not attached: {e}"
            );
            0
        }
    };
    info!(
        netns_inode = id.1,
        cookie, pid, host, ipv6, "serving network namespace"
    );
    shared
        .netns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            id,
            ServedNetns {
                cookie,
                pid,
                cancel,
                misses: 0,
                host,
                egress_guarded,
            },
        );
    Ok(())
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    cookie: u64,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((stream, peer)) => hand_to_worker(&shared, stream, peer, cookie).await,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Runs the session of an accepted connection on the next worker: the
/// socket leaves this runtime's reactor and joins the worker's.
async fn hand_to_worker(
    shared: &Arc<Shared>,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    cookie: u64,
) {
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            warn!(%peer, "accepted connection dropped: {e}");
            return;
        }
    };
    let s = shared.clone();
    shared
        .workers
        .submit(Box::new(move || {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => {
                    tokio::spawn(proxy::handle_connection(s, stream, peer, cookie));
                }
                Err(e) => warn!(%peer, "accepted connection dropped: {e}"),
            }
        }))
        .await;
}

/// Keeps kernel tags and namespace listeners in step with the tag store and
/// the processes in tagged cgroups.
async fn reconcile_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_egress_scan = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.reconcile_now.notified() => {}
        }
        if last_egress_scan.elapsed() >= EGRESS_RESCAN_EVERY {
            last_egress_scan = Instant::now();
            let s = shared.clone();
            let _ = tokio::task::spawn_blocking(move || rescan_egress(&s)).await;
        }
        if let Err(e) = shared.sync_tags() {
            warn!("syncing tags into the kernel: {e:#}");
        }
        let s = shared.clone();
        let refused = tokio::task::spawn_blocking(move || reconcile_netns(&s))
            .await
            .unwrap_or_default();
        for (id, f) in refused {
            let ev = AuditEvent::new("netns_refused")
                .reason(f.reason.clone())
                .detail("netns_inode", id.1)
                .detail("pid", f.pid);
            if let Err(e) = shared.audit(ev).await {
                warn!("audit record of a refused namespace failed: {e}");
            }
        }
    }
}

/// How often served namespaces are checked for interfaces without the
/// AF_PACKET egress filter (new veths, mostly in the host namespace).
const EGRESS_RESCAN_EVERY: Duration = Duration::from_secs(5);

/// Attaches the egress filter to interfaces that appeared in served
/// namespaces since they were first served.
fn rescan_egress(shared: &Arc<Shared>) {
    let targets: Vec<(NetnsId, u64, String)> = shared
        .netns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(id, s)| {
            let file = if s.host {
                "/proc/self/ns/net".to_string()
            } else {
                format!("/proc/{}/ns/net", s.pid)
            };
            (*id, s.cookie, file)
        })
        .collect();
    for (id, cookie, file) in targets {
        // The pid may have gone or moved: only act on the same namespace.
        if netns::netns_of_path(Path::new(&file)).ok() != Some(id) {
            continue;
        }
        let r = shared
            .redirect
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .guard_egress(Path::new(&file), cookie, false);
        match r {
            Ok(n) => {
                if let Some(s) = shared
                    .netns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&id)
                {
                    s.egress_guarded = n;
                }
            }
            Err(e) => warn!(netns_inode = id.1, "AF_PACKET egress filter rescan: {e}"),
        }
    }
}

/// Seconds before serving a refused namespace is tried again.
const NETNS_RETRY: Duration = Duration::from_secs(5);

/// Returns the namespaces newly refused (or refused for a new reason), to be
/// audited.
fn reconcile_netns(shared: &Arc<Shared>) -> Vec<(NetnsId, NetnsFailure)> {
    let tagged: Vec<String> = {
        let tags = shared.tags.read().unwrap_or_else(|p| p.into_inner());
        tags.iter().map(|t| t.cgroup.clone()).collect()
    };
    let mut seen: HashMap<NetnsId, u32> = HashMap::new();
    for cg in tagged {
        for pid in shared.cgroups.procs_below(&cg) {
            if let Ok(id) = netns::netns_of_pid(pid) {
                seen.entry(id).or_insert(pid);
            }
        }
    }
    let to_open: Vec<(NetnsId, u32)> = {
        let mut served = shared.netns.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = Vec::new();
        for (id, s) in served.iter_mut() {
            if s.host || seen.contains_key(id) {
                s.misses = 0;
            } else {
                s.misses += 1;
                if s.misses >= NETNS_GRACE_SCANS {
                    closed.push(*id);
                }
            }
        }
        for id in closed {
            if let Some(s) = served.remove(&id) {
                s.cancel.cancel();
                shared
                    .redirect
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .unserve_netns(s.cookie);
                info!(
                    netns_inode = id.1,
                    cookie = s.cookie,
                    "network namespace gone; listener closed"
                );
            }
        }
        seen.iter()
            .filter(|(id, _)| !served.contains_key(id))
            .map(|(id, pid)| (*id, *pid))
            .collect()
    };
    let seen_ids: std::collections::HashSet<NetnsId> = seen.into_keys().collect();
    let mut refused = Vec::new();
    for (id, pid) in to_open {
        let previous = {
            let failures = shared
                .netns_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match failures.get(&id) {
                Some(f) if f.at.elapsed() < NETNS_RETRY => continue,
                other => other.map(|f| f.reason.clone()),
            }
        };
        let ns_file = format!("/proc/{pid}/ns/net");
        match serve_netns(shared, Path::new(&ns_file), pid, false) {
            Ok(()) => {
                shared
                    .netns_failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
            Err(e) => {
                let reason = format!("{e:#}");
                warn!(
                    netns_inode = id.1,
                    pid,
                    "not serving network namespace (its tagged connects stay refused): {reason}"
                );
                let f = NetnsFailure {
                    at: Instant::now(),
                    pid,
                    reason,
                };
                if previous.as_deref() != Some(f.reason.as_str()) {
                    refused.push((id, f.clone()));
                }
                shared
                    .netns_failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, f);
            }
        }
    }
    // Forget refusals of namespaces no tagged process is in any more.
    shared
        .netns_failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|id, f| seen_ids.contains(id) || f.at.elapsed() < NETNS_RETRY);
    refused
}

/// How often live sessions' identities are checked again (token expiry,
/// rotation) and how often issuer keys are refreshed.
const IDENTITY_CHECK_EVERY: Duration = Duration::from_secs(2);
const JWKS_REFRESH_EVERY: Duration = Duration::from_secs(600);

async fn identity_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(IDENTITY_CHECK_EVERY);
    let mut last_refresh = Instant::now();
    loop {
        tick.tick().await;
        if last_refresh.elapsed() >= JWKS_REFRESH_EVERY {
            last_refresh = Instant::now();
            for v in shared.identities.all() {
                if let Err(e) = v.refresh().await {
                    warn!("refreshing issuer keys: {e}");
                }
            }
        }
        let s = shared.clone();
        let ended = tokio::task::spawn_blocking(move || s.end_unproven_sessions())
            .await
            .unwrap_or_default();
        for (session, reason) in ended {
            warn!(session = %session, reason = %reason, "session ended: identity no longer proven");
            let ev = AuditEvent::new("session_revoked")
                .session(session)
                .reason(format!("identity no longer proven: {reason}"));
            if let Err(e) = shared.audit(ev).await {
                warn!("audit record of a revoked session failed: {e}");
            }
        }
    }
}

/// How often the auto-tagger rescans without a cgroup event (inotify can
/// miss a directory made in the instant before its parent's watch exists).
const AUTO_TAG_RESCAN_EVERY: Duration = Duration::from_secs(5);

/// Applies `[[auto_tag]]` rules as cgroups appear and go: inotify on the
/// governed tree (recursively) wakes a rescan of the whole tree, so events
/// only say "look now" and nothing depends on their order.
async fn auto_tag_loop(shared: Arc<Shared>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if matches!(
                ev.kind,
                notify::EventKind::Create(_) | notify::EventKind::Remove(_)
            ) {
                let _ = tx.send(());
            }
        }
    })
    .and_then(|mut w| {
        notify::Watcher::watch(
            &mut w,
            &shared.cgroups.root_dir(),
            notify::RecursiveMode::Recursive,
        )
        .map(|()| w)
    });
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(
                "cannot watch the cgroup tree for auto-tagging ({e}); rescanning every {}s instead",
                AUTO_TAG_RESCAN_EVERY.as_secs()
            );
            None
        }
    };
    let mut tick = tokio::time::interval(AUTO_TAG_RESCAN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = rx.recv() => {
                // A container start makes a burst of directories: one scan.
                tokio::time::sleep(Duration::from_millis(30)).await;
                while rx.try_recv().is_ok() {}
            }
        }
        auto_tag_scan(&shared).await;
    }
}

/// One auto-tag pass: plan against the tree as it is, apply, tell the
/// kernel, end sessions whose cgroup went, audit each change.
async fn auto_tag_scan(shared: &Arc<Shared>) {
    let s = shared.clone();
    let applied = tokio::task::spawn_blocking(move || {
        let existing: Vec<String> = s
            .cgroups
            .walk(s.cgroups.root())
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        let own = s.cgroups.cgroup_of_pid(std::process::id()).ok();
        let mut tags = s.tags.write().unwrap_or_else(|p| p.into_inner());
        let plan = crate::identity::autotag::plan(
            &s.cfg.auto_tag,
            s.cgroups.root(),
            &existing,
            &tags,
            own.as_deref(),
            |p| p.exists(),
        );
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for a in plan.add {
            match tags.insert_auto(a.cgroup.clone(), a.identity, a.token_file, a.rule) {
                Ok(t) => added.push(t),
                Err(e) => warn!(cgroup = %a.cgroup, "auto-tag failed: {e}"),
            }
        }
        for cg in plan.remove {
            match tags.remove(&cg) {
                Ok(Some(t)) => removed.push(t),
                Ok(None) => {}
                Err(e) => warn!(cgroup = %cg, "auto-untag failed: {e}"),
            }
        }
        (added, removed, plan.skipped)
    })
    .await;
    let Ok((added, removed, skipped)) = applied else {
        return;
    };
    for why in skipped {
        debug!("auto-tag skipped {why}");
    }
    if added.is_empty() && removed.is_empty() {
        return;
    }
    if let Err(e) = shared.sync_tags() {
        warn!("syncing auto-tags into the kernel: {e:#}");
    }
    let ended = shared.end_untagged_sessions();
    shared.reconcile_now.notify_one();
    for (t, kind) in added
        .iter()
        .map(|t| (t, "tag"))
        .chain(removed.iter().map(|t| (t, "untag")))
    {
        info!(cgroup = %t.cgroup, identity = %t.identity, rule = ?t.auto, "auto-{kind}");
        let ev = AuditEvent::new(kind)
            .cgroup(t.cgroup.clone())
            .identity(crate::audit::IdentityRef::named(&t.identity))
            .approver(format!("auto_tag:{}", t.auto.as_deref().unwrap_or("")))
            .detail(
                "token_file",
                t.token_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            );
        if let Err(e) = shared.audit(ev).await {
            warn!("audit record of an auto-{kind} failed: {e}");
        }
    }
    if !ended.is_empty() {
        info!(sessions = ?ended, "sessions ended: their auto-tagged cgroup is gone");
    }
}

/// How often eBPF map fill is sampled for metrics (a walk costs one
/// syscall per entry).
const MAP_FILL_EVERY: Duration = Duration::from_secs(10);

async fn map_fill_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(MAP_FILL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let pin_dir = shared.cfg.pin_dir.clone();
        let fills = tokio::task::spawn_blocking(move || crate::redirect::map_fill(&pin_dir))
            .await
            .unwrap_or_default();
        for f in fills {
            shared
                .metrics
                .set_map_fill(f.name, f.entries, f.max_entries);
            if f.entries.saturating_mul(10) >= f.max_entries.saturating_mul(9) {
                warn!(
                    map = f.name,
                    entries = f.entries,
                    max = f.max_entries,
                    "eBPF map is over 90% full"
                );
            }
        }
    }
}

/// Pings systemd's watchdog while the runtime still schedules tasks: a
/// wedged runtime stops the pings and systemd restarts the service.
async fn watchdog_loop(every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        // Only a hung runtime is a reason to restart: an unwritable audit
        // log is not (commands are denied meanwhile, and /readyz says so).
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
    }
}

async fn grant_expiry_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        for g in shared.jit.expire() {
            let ended = shared.end_sessions_of_grant(&g.id);
            info!(grant = %g.id, ended_sessions = ?ended, "grant expired");
            let mut ev = AuditEvent::new("grant_expired")
                .identity(crate::audit::IdentityRef::named(&g.identity))
                .resource(g.resource.clone())
                .detail("grant", g.id.clone());
            for s in ended {
                ev = ev.detail(format!("ended:{s}"), "grant expired");
            }
            if let Err(e) = shared.audit(ev).await {
                warn!("audit record of an expired grant failed: {e}");
            }
            shared.webhooks.notify(crate::jit::JitEvent::GrantEnded {
                grant: g,
                reason: "expired".into(),
            });
        }
    }
}

/// Keeps this node in step with the fleet store: answers given on other
/// nodes release or refuse commands held here; grants revoked elsewhere end
/// the sessions relying on them here (audited like a local revocation).
async fn fleet_sync_loop(shared: Arc<Shared>, fleet: Arc<crate::fleet::Fleet>) {
    loop {
        fleet.wait_for_change().await;
        let out = match fleet.sync(&shared.jit).await {
            Ok(out) => out,
            Err(e) => {
                debug!("fleet sync: {e}");
                for r in fleet.fail_held(&shared.jit) {
                    warn!(request = %r.id, "held command refused: {}", crate::fleet::UNREACHABLE);
                    shared
                        .webhooks
                        .notify(crate::jit::JitEvent::RequestDecided { request: r });
                }
                continue;
            }
        };
        for r in &out.settled {
            debug!(request = %r.id, status = r.status.label(), "access request answered on another node");
        }
        for g in &out.new_grants {
            info!(grant = %g.id, identity = %g.identity, resource = %g.resource, by = %g.created_by, "grant made on another node now in force");
        }
        for (g, by) in out.revoked {
            let ended = shared.end_sessions_of_grant(&g.id);
            info!(grant = %g.id, by = %by, ended_sessions = ?ended, "grant revoked on another node");
            let mut ev = AuditEvent::new("grant_revoked")
                .identity(crate::audit::IdentityRef::named(&g.identity))
                .resource(g.resource.clone())
                .approver(by.clone())
                .detail("grant", g.id.clone())
                .detail("fleet", true);
            for s in &ended {
                ev = ev.detail(format!("ended:{s}"), "grant revoked");
            }
            if let Err(e) = shared.audit(ev).await {
                warn!("audit record of a revocation failed: {e}");
            }
        }
    }
}

async fn resolve_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(RESOLVE_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let policy = shared.policy.load_full();
        for f in shared.resolver.refresh(&policy).await {
            warn!("resource hostname does not resolve: {f}");
        }
        refresh_udp_allow(&shared);
    }
}

/// Reads the resolvers again (DHCP and VPNs change them) and updates the
/// kernel's UDP allow list when they changed.
fn refresh_udp_allow(shared: &Shared) {
    if !shared.cfg.udp_allow_resolvers {
        return;
    }
    let now = shared.cfg.effective_udp_allow();
    let mut current = shared.udp_allow.lock().unwrap_or_else(|p| p.into_inner());
    if *current == now {
        return;
    }
    match shared
        .redirect
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .sync_udp_allow(&now)
    {
        Ok(()) => {
            info!(udp_allow = %list(&now), "resolvers changed; UDP allow list updated");
            *current = now;
        }
        Err(e) => warn!("updating the UDP allow list: {e}"),
    }
}

/// `a, b, c` for logs.
fn list(dests: &[crate::config::UdpDest]) -> String {
    dests
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

async fn kernel_events(shared: Arc<Shared>, events: aya::maps::RingBuf<aya::maps::MapData>) {
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged,
    // for as long as the AsyncFd owns the ring buffer.
    let mut fd =
        match unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => {
                warn!("kernel events unavailable: {e}");
                return;
            }
        };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        let mut wake = false;
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<KernelEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a KernelEvent (repr(C), any bit
            // pattern valid) and the length was checked above.
            let ev: KernelEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            if ev.kind == EVENT_UNSERVED_NETNS {
                debug!(
                    pid = ev.pid,
                    cookie = ev.netns_cookie,
                    "connect from an unserved namespace"
                );
                wake = true;
            }
        }
        guard.clear_ready();
        if wake {
            shared.reconcile_now.notify_one();
        }
    }
}

async fn ebpf_logs(shared: Arc<Shared>, logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let _ = shared;
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd
    // owns the logger.
    let Ok(mut fd) =
        (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) })
    else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Makes sure a path's parent directory exists with owner-only access.
pub fn private_parent(path: &Path) -> anyhow::Result<()> {
    let Some(parent) = path.parent() else {
        bail!("{} has no parent directory", path.display());
    };
    if !parent.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        fs::set_permissions(parent, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}
