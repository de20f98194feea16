//! The fleet: what several nodes share through one PostgreSQL database
//! (`[fleet]` in the daemon config): access requests and their answers,
//! grants and revocations, and a copy of every node's audit chain.
//!
//! Owns the `[fleet]` settings, the store client ([`store`]), keeping this
//! node's [`Jit`] in step with the store (LISTEN/NOTIFY wake-ups, polling as
//! the fallback) and the audit shipper ([`ship`]). The store decides races
//! (the first answer wins). It must not decide policy, talk to agents, or
//! write the local audit log: the daemon audits what this module reports,
//! and the shipper only reads the chain files, as `audit verify` does.
//!
//! Failure: when the store is unreachable, new holds fail closed
//! ("approval store unreachable"), answers and grants cannot be given,
//! grants already known keep working until they expire, and the shipper
//! catches up when the store returns. A command already held here whose
//! answer cannot be learned is refused with the same reason once the store
//! has not answered for `fail_held_after` ([`FAIL_HELD_AFTER`] by default);
//! if the store answers again before that, the hold goes on.

pub mod ship;
pub mod store;
pub mod tls;

use std::{
    path::PathBuf,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use serde::Deserialize;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::{
    jit::{AccessRequest, Grant, Jit, JitError, Status},
    proxy::session::now_ms,
};
pub use store::Store;

/// How often a node reads the store when no notification wakes it: the
/// bound on how stale a node is when LISTEN is lost.
pub const POLL_EVERY: Duration = Duration::from_millis(1000);

/// The reason an agent is given when its command needs an answer that the
/// fleet's approval store cannot give.
pub const UNREACHABLE: &str = "approval store unreachable";

/// How long the store may go without answering before the commands held on
/// this node are refused (`[fleet] fail_held_after`). Three polls: one lost
/// connection or a store restart that is quick does not end the holds.
pub const FAIL_HELD_AFTER: Duration = Duration::from_secs(3);

/// The longest `fail_held_after` accepted: past that an agent waits on a
/// store that may never answer.
pub const FAIL_HELD_AFTER_MAX: Duration = Duration::from_secs(600);

/// The `[fleet]` table of the daemon config.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// `postgres://user@host:port/db` (or a libpq key=value string).
    pub store: String,
    /// File holding the store password (read at start).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `disable` (default) or `verify-full` (TLS, the store's certificate
    /// checked against `ca_file` or the system's roots, and its name).
    #[serde(default)]
    pub sslmode: Option<String>,
    /// CA bundle for the store's certificate (with TLS).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// This node's name. Default: `$PORTCULLIS_NODE`, else the hostname.
    #[serde(default)]
    pub node: Option<String>,
    /// How long the store may not answer before the commands held on this
    /// node are refused (`"3s"`; default [`FAIL_HELD_AFTER`]).
    #[serde(default)]
    pub fail_held_after: Option<String>,
    /// The audit shipper's CPU priority (default `idle`: it runs when the
    /// data path leaves CPU over, and catches up at full speed once it
    /// does; the lag is in the metrics).
    #[serde(default)]
    pub ship_priority: Option<ship::Priority>,
}

/// A fleet operation that cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The store cannot be reached (connect, timeout, connection lost).
    #[error("approval store unreachable: {0}")]
    Unreachable(String),
    /// The store refused a statement.
    #[error("fleet store: {0}")]
    Store(String),
    /// The `[fleet]` settings are unusable.
    #[error("[fleet]: {0}")]
    Config(String),
    /// The operation is refused (already answered, no such grant).
    #[error("{0}")]
    Refused(String),
    /// This node's JIT state refused it.
    #[error(transparent)]
    Jit(#[from] JitError),
}

impl FleetConfig {
    /// This node's name.
    pub fn node_name(&self) -> Result<String, FleetError> {
        let name = match &self.node {
            Some(n) => n.clone(),
            None => match std::env::var("PORTCULLIS_NODE") {
                Ok(n) if !n.trim().is_empty() => n,
                _ => std::fs::read_to_string("/proc/sys/kernel/hostname").map_err(|e| {
                    FleetError::Config(format!("no node name and no hostname: {e}"))
                })?,
            },
        };
        let name = name.trim().to_string();
        let ok = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !ok {
            return Err(FleetError::Config(format!(
                "node name {name:?} must be 1-253 characters of letters, digits, '-', '.', '_'"
            )));
        }
        Ok(name)
    }

    /// `fail_held_after`, checked: more than 0, at most
    /// [`FAIL_HELD_AFTER_MAX`].
    pub fn fail_held_after(&self) -> Result<Duration, FleetError> {
        let Some(text) = &self.fail_held_after else {
            return Ok(FAIL_HELD_AFTER);
        };
        let d = crate::policy::parse_duration(text)
            .map_err(|e| FleetError::Config(format!("fail_held_after: {e}")))?;
        if d.is_zero() || d > FAIL_HELD_AFTER_MAX {
            return Err(FleetError::Config(format!(
                "fail_held_after {text:?} must be more than 0 and at most {}s",
                FAIL_HELD_AFTER_MAX.as_secs()
            )));
        }
        Ok(d)
    }

    /// A client of the store with these settings.
    pub fn store(&self, application: &str) -> Result<Store, FleetError> {
        let (cfg, tls) = self.pg_config()?;
        Ok(Store::new(cfg, tls, application))
    }

    /// The client settings (password read from its file) and TLS.
    pub fn pg_config(&self) -> Result<(tokio_postgres::Config, tls::MakeRustls), FleetError> {
        let mut cfg = tokio_postgres::Config::from_str(&self.store)
            .map_err(|e| FleetError::Config(format!("store: {e}")))?;
        let tls = match self.sslmode.as_deref() {
            None | Some("disable") => {
                if self.ca_file.is_some() {
                    return Err(FleetError::Config(
                        "ca_file is set but sslmode is \"disable\": use sslmode = \"verify-full\""
                            .into(),
                    ));
                }
                cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                tls::MakeRustls::disabled()?
            }
            Some("verify-full") => {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
                tls::MakeRustls::new(self.ca_file.as_deref())?
            }
            Some(other) => {
                return Err(FleetError::Config(format!(
                    "sslmode {other:?} is not supported: use \"verify-full\" (TLS, the store \
                     authenticated) or \"disable\" (private network only); the store holds \
                     approvals, so an unauthenticated server is not accepted"
                )))
            }
        };
        if let Some(f) = &self.password_file {
            let pw = std::fs::read_to_string(f)
                .map_err(|e| FleetError::Config(format!("password_file {}: {e}", f.display())))?;
            cfg.password(pw.trim_end_matches(['\n', '\r']));
        }
        Ok((cfg, tls))
    }
}

/// What a sync with the store changed on this node.
#[derive(Debug, Default)]
pub struct SyncOutcome {
    /// Requests answered elsewhere (their waiters here were released).
    pub settled: Vec<AccessRequest>,
    /// Grants made elsewhere, now in force here.
    pub new_grants: Vec<Grant>,
    /// Grants revoked elsewhere (and who revoked them): the caller ends the
    /// sessions relying on them.
    pub revoked: Vec<(Grant, String)>,
}

/// This node's membership of a fleet.
pub struct Fleet {
    /// This node's name.
    pub node: String,
    config: tokio_postgres::Config,
    tls: tls::MakeRustls,
    store: Store,
    wake: Notify,
    up: AtomicBool,
    /// When the store last answered (anything but "unreachable").
    last_answer: Mutex<Instant>,
    fail_held_after: Duration,
    migrated: AtomicBool,
    /// The audit shipper's CPU priority.
    pub ship_priority: ship::Priority,
    /// Audit shipping progress (for metrics and status).
    pub shipping: Arc<ship::ShipStatus>,
}

impl Fleet {
    /// Reads the settings; does not connect yet (see [`Fleet::start`]).
    pub fn new(cfg: &FleetConfig) -> Result<Self, FleetError> {
        let (config, tls) = cfg.pg_config()?;
        let node = cfg.node_name()?;
        let fail_held_after = cfg.fail_held_after()?;
        Ok(Self {
            store: Store::new(
                config.clone(),
                tls.clone(),
                &format!("portcullis-fleet:{node}"),
            ),
            config,
            tls,
            node,
            wake: Notify::new(),
            up: AtomicBool::new(false),
            last_answer: Mutex::new(Instant::now()),
            fail_held_after,
            migrated: AtomicBool::new(false),
            ship_priority: cfg.ship_priority.unwrap_or_default(),
            shipping: Arc::new(ship::ShipStatus::default()),
        })
    }

    /// A separate client of the same store (the shipper's, the CLI's).
    pub fn new_store(&self, application: &str) -> Store {
        Store::new(self.config.clone(), self.tls.clone(), application)
    }

    /// Whether the store answered the last time it was asked.
    pub fn store_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn mark<T>(&self, r: Result<T, FleetError>) -> Result<T, FleetError> {
        let up = !matches!(r, Err(FleetError::Unreachable(_)));
        if up {
            *self.last_answer.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
        let was = self.up.swap(up, Ordering::Relaxed);
        match (&r, was, up) {
            (Err(e), true, false) => {
                warn!(node = %self.node, "fleet store lost: {e}; new holds fail closed until it returns")
            }
            (_, false, true) => info!(node = %self.node, "fleet store reachable"),
            _ => {}
        }
        r
    }

    /// Creates or upgrades the store's tables (once per process; safe when
    /// several daemons start at once).
    pub async fn ensure_schema(&self) -> Result<(), FleetError> {
        if self.migrated.load(Ordering::Relaxed) {
            return Ok(());
        }
        let r = self.mark(self.store.migrate().await);
        if r.is_ok() {
            self.migrated.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Records a request this node just created. Fails closed: the caller
    /// must refuse the command when this fails.
    pub async fn publish(&self, request: &AccessRequest) -> Result<(), FleetError> {
        self.ensure_schema().await?;
        self.mark(self.store.insert_request(request).await)
    }

    /// Ends `id` with `status` in the store, then here. The first answer
    /// wins; a later one is refused with the first one named.
    async fn answer(
        &self,
        jit: &Jit,
        id: &str,
        status: Status,
        grant: Option<Grant>,
    ) -> Result<AccessRequest, FleetError> {
        self.ensure_schema().await?;
        let (ended, request) = self.mark(
            self.store
                .end_request(id, status.clone(), grant.clone())
                .await,
        )?;
        match (ended, request) {
            (store::Ended::Recorded, Some(request)) => {
                if let Some(g) = grant {
                    jit.add_grant(g);
                }
                self.apply(jit, request.clone());
                Ok(request)
            }
            (store::Ended::Already(first), _) => {
                let label = first.status.label();
                let by = match &first.status {
                    Status::Approved { by, .. } | Status::Denied { by, .. } => {
                        format!(" by {by}")
                    }
                    _ => String::new(),
                };
                self.apply(jit, *first);
                Err(FleetError::Refused(format!(
                    "access request {id} is already {label}{by} (the first answer wins)"
                )))
            }
            _ => Err(FleetError::Refused(format!("no access request {id}"))),
        }
    }

    /// Makes this node's copy of `request` what the store says.
    fn apply(&self, jit: &Jit, request: AccessRequest) -> Option<AccessRequest> {
        let mine = request.node.as_deref() == Some(self.node.as_str());
        match jit.get(&request.id) {
            Ok(local) if local.status == Status::Pending && request.status != Status::Pending => {
                jit.settle(&request.id, request.status).ok()
            }
            Ok(_) if mine => None,
            _ if mine => None,
            _ => {
                jit.mirror_request(request);
                None
            }
        }
    }

    /// A request as this node or the store knows it.
    async fn find(&self, jit: &Jit, id: &str) -> Result<AccessRequest, FleetError> {
        if let Ok(r) = jit.get(id) {
            return Ok(r);
        }
        let snap = self.mark(self.store.snapshot(Vec::new(), now_ms()).await)?;
        snap.requests
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| FleetError::Refused(format!("no access request {id}")))
    }

    /// `portcullis approve` on any node.
    pub async fn approve(
        &self,
        jit: &Jit,
        id: &str,
        by: &str,
        for_duration: Option<Duration>,
        reason: Option<String>,
    ) -> Result<(AccessRequest, Option<Grant>), FleetError> {
        let grant = match for_duration {
            None => None,
            Some(d) => {
                let r = self.find(jit, id).await?;
                Some(jit.approval_grant(&r, d, by, reason.clone())?)
            }
        };
        let status = Status::approved(by, reason, grant.as_ref());
        let r = self.answer(jit, id, status, grant.clone()).await?;
        Ok((r, grant))
    }

    /// `portcullis deny` on any node.
    pub async fn deny(
        &self,
        jit: &Jit,
        id: &str,
        by: &str,
        reason: String,
    ) -> Result<AccessRequest, FleetError> {
        let status = Status::Denied {
            by: by.to_string(),
            at_ms: now_ms(),
            reason,
        };
        self.answer(jit, id, status, None).await
    }

    /// A held command's timeout fired. Returns `true` when it timed out (in
    /// the store, or only here when the store is unreachable), `false` when
    /// an answer given elsewhere won the race and was applied here (the
    /// waiter has it).
    pub async fn time_out(&self, jit: &Jit, id: &str) -> bool {
        let status = Status::TimedOut { at_ms: now_ms() };
        let ended = match self.ensure_schema().await {
            Ok(()) => self.mark(self.store.end_request(id, status, None).await),
            Err(e) => Err(e),
        };
        match ended {
            Ok((store::Ended::Already(first), _)) => {
                self.apply(jit, *first);
                jit.get(id).is_ok_and(|r| r.status == Status::Pending)
            }
            Ok(_) => true,
            Err(e) => {
                // The sync writes the local outcome back when it returns.
                debug!(request = id, "time-out not recorded in the store yet: {e}");
                true
            }
        }
    }

    /// `portcullis grant` on any node.
    #[allow(clippy::too_many_arguments)]
    pub async fn grant(
        &self,
        jit: &Jit,
        identity: &str,
        resource: &str,
        actions: Vec<String>,
        duration: Duration,
        by: &str,
        reason: Option<String>,
    ) -> Result<Grant, FleetError> {
        let g = jit.make_grant(
            identity, resource, actions, None, duration, by, reason, None,
        )?;
        self.ensure_schema().await?;
        self.mark(self.store.insert_grant(&g).await)?;
        jit.add_grant(g.clone());
        Ok(g)
    }

    /// `portcullis revoke` on any node: the store records it, every node
    /// drops the grant (and ends its sessions) at its next sync.
    pub async fn revoke(&self, jit: &Jit, id: &str, by: &str) -> Result<Grant, FleetError> {
        self.ensure_schema().await?;
        let g = self.mark(self.store.revoke(id, by, now_ms()).await)?;
        jit.drop_grant(id, format!("revoked by {by}"));
        Ok(g)
    }

    /// Every node's requests, as the store has them.
    pub async fn requests(&self) -> Result<Vec<AccessRequest>, FleetError> {
        self.ensure_schema().await?;
        Ok(self
            .mark(self.store.snapshot(Vec::new(), now_ms()).await)?
            .requests)
    }

    /// Brings this node in step with the store: answers given elsewhere
    /// release or refuse the commands held here; grants made or revoked
    /// elsewhere are put in or out of force; this node's requests ended
    /// while the store was away are written back.
    pub async fn sync(&self, jit: &Jit) -> Result<SyncOutcome, FleetError> {
        self.ensure_schema().await?;
        let local_grants: Vec<String> = jit.grants().into_iter().map(|g| g.id).collect();
        let snap = self.mark(self.store.snapshot(local_grants, now_ms()).await)?;
        let mut out = SyncOutcome::default();
        for r in snap.requests {
            let mine = r.node.as_deref() == Some(self.node.as_str());
            let local = jit.get(&r.id).ok();
            match local {
                Some(l) if mine && l.status != Status::Pending && r.status == Status::Pending => {
                    // Ended here (timeout, hang-up, restart) while the store
                    // was away, or in a race: tell the store.
                    let _ = self.store.end_request(&r.id, l.status, None).await;
                }
                None if mine && r.status == Status::Pending => {
                    // This node no longer knows it (state dir replaced): no
                    // connection waits for it.
                    let status = Status::Failed {
                        reason: format!("node {} no longer holds this request", self.node),
                    };
                    let _ = self.store.end_request(&r.id, status, None).await;
                }
                _ => {
                    if let Some(settled) = self.apply(jit, r) {
                        out.settled.push(settled);
                    }
                }
            }
        }
        for g in snap.grants {
            if jit.add_grant(g.clone()) {
                out.new_grants.push(g);
            }
        }
        for (id, by) in snap.revoked {
            if let Some(g) = jit.drop_grant(&id, format!("revoked by {by}")) {
                out.revoked.push((g, by));
            }
        }
        Ok(out)
    }

    /// Refuses the commands held on this node once the store has not
    /// answered for `fail_held_after`: their answer (given on any node)
    /// cannot be learned, so waiting on would only delay the refusal until
    /// the request's own timeout. Returns the requests it failed; their
    /// waiters refuse the commands in their protocols and audit it. The
    /// store hears of it when it returns (see [`Fleet::sync`]).
    pub fn fail_held(&self, jit: &Jit) -> Vec<AccessRequest> {
        if self.store_up() {
            return Vec::new();
        }
        let silent = self
            .last_answer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if silent < self.fail_held_after {
            return Vec::new();
        }
        let reason = format!(
            "{UNREACHABLE} (no answer from it for {}s)",
            silent.as_secs()
        );
        jit.requests()
            .into_iter()
            .filter(|r| {
                r.status == Status::Pending && r.node.as_deref() == Some(self.node.as_str())
            })
            .filter_map(|r| jit.fail(&r.id, reason.clone()).ok())
            .collect()
    }

    /// Waits for a notification from the store or [`POLL_EVERY`].
    pub async fn wait_for_change(&self) {
        let _ = tokio::time::timeout(POLL_EVERY, self.wake.notified()).await;
    }

    /// Keeps a LISTEN connection open and turns notifications into
    /// wake-ups; reconnects after a loss (polling covers the gap).
    pub async fn listen_loop(self: Arc<Self>) {
        let listener = self.new_store(&format!("portcullis-listen:{}", self.node));
        loop {
            match listener.connect_raw().await {
                Ok((client, mut conn)) => {
                    let me = self.clone();
                    let poller = tokio::spawn(async move {
                        let mut messages =
                            futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                        while let Some(m) = messages.next().await {
                            match m {
                                Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                                    me.wake.notify_one()
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    debug!("fleet LISTEN connection: {e}");
                                    break;
                                }
                            }
                        }
                    });
                    let listen = format!("LISTEN {}", store::CHANNEL);
                    match tokio::time::timeout(store::OP_TIMEOUT, client.batch_execute(&listen))
                        .await
                    {
                        Ok(Ok(())) => {
                            debug!(node = %self.node, "listening for fleet changes");
                            // Catch up with what happened while not listening.
                            self.wake.notify_one();
                            let _ = poller.await;
                        }
                        _ => poller.abort(),
                    }
                    drop(client);
                }
                Err(e) => debug!("fleet LISTEN connect: {e}"),
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> FleetConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn settings_are_strict_and_name_the_node() {
        let c = cfg("store = \"postgres://u@127.0.0.1:5432/fleet\"\nnode = \"node-a\"\n");
        assert_eq!(c.node_name().unwrap(), "node-a");
        assert!(c.pg_config().is_ok());
        assert!(toml::from_str::<FleetConfig>("store = \"x\"\nbogus = 1\n").is_err());
        let bad = cfg("store = \"postgres://u@h/db\"\nnode = \"a b\"\n");
        assert!(bad.node_name().is_err());
        let weak = cfg("store = \"postgres://u@h/db\"\nsslmode = \"require\"\n");
        assert!(matches!(weak.pg_config(), Err(FleetError::Config(_))));
        let no_ca = cfg("store = \"postgres://u@h/db\"\nsslmode = \"verify-full\"\nca_file = \"/nonexistent.pem\"\n");
        assert!(matches!(no_ca.pg_config(), Err(FleetError::Config(_))));
    }

    #[test]
    fn ship_priority_is_one_of_three() {
        let c = cfg("store = \"postgres://u@h/db\"\n");
        assert_eq!(c.ship_priority.unwrap_or_default(), ship::Priority::Idle);
        for (text, want) in [
            ("idle", ship::Priority::Idle),
            ("low", ship::Priority::Low),
            ("normal", ship::Priority::Normal),
        ] {
            let c = cfg(&format!(
                "store = \"postgres://u@h/db\"\nship_priority = {text:?}\n"
            ));
            assert_eq!(c.ship_priority, Some(want));
        }
        assert!(
            toml::from_str::<FleetConfig>("store = \"x\"\nship_priority = \"high\"\n").is_err()
        );
    }

    #[test]
    fn fail_held_after_is_bounded() {
        let c = cfg("store = \"postgres://u@h/db\"\n");
        assert_eq!(c.fail_held_after().unwrap(), FAIL_HELD_AFTER);
        let c = cfg("store = \"postgres://u@h/db\"\nfail_held_after = \"10s\"\n");
        assert_eq!(c.fail_held_after().unwrap(), Duration::from_secs(10));
        for bad in ["0s", "2h", "soon"] {
            let c = cfg(&format!(
                "store = \"postgres://u@h/db\"\nfail_held_after = {bad:?}\n"
            ));
            assert!(
                matches!(c.fail_held_after(), Err(FleetError::Config(_))),
                "{bad}"
            );
        }
    }

    /// Only this node's pending requests are failed, only once the store has
    /// been silent for `fail_held_after`, and their waiters get the reason.
    #[tokio::test]
    async fn held_requests_fail_closed_only_after_the_store_stays_silent() {
        let dir = std::env::temp_dir().join(format!(
            "portcullis-fleet-held-{}-{}",
            std::process::id(),
            now_ms()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (jit, _) = Jit::load(&dir).unwrap();
        let jit = jit.with_node("node-a");
        let fleet = Fleet::new(&cfg(
            "store = \"postgres://u@127.0.0.1:1/db\"\nnode = \"node-a\"\nfail_held_after = \"200ms\"\n",
        ))
        .unwrap();
        let new = crate::jit::NewRequest {
            identity: "agent".into(),
            resource: "db".into(),
            action: "postgres:update".into(),
            command: "UPDATE t SET x = 1".into(),
            fingerprint: None,
            context: serde_json::json!({}),
            session: "s-1".into(),
            policies: vec![],
        };
        let (mine, rx) = jit.hold(new, Duration::from_secs(60)).unwrap();
        let mut theirs = mine.clone();
        theirs.id = "r-other-1".into();
        theirs.node = Some("node-b".into());
        jit.mirror_request(theirs);

        // The store answered: nothing fails.
        let _ = fleet.mark(Ok(()));
        assert!(fleet.fail_held(&jit).is_empty());
        // Unreachable, but not for long yet: the hold goes on.
        let _ = fleet.mark::<()>(Err(FleetError::Unreachable("refused".into())));
        assert!(fleet.fail_held(&jit).is_empty());
        assert_eq!(jit.get(&mine.id).unwrap().status, Status::Pending);
        // It answers again, then goes silent for longer than the bound.
        let _ = fleet.mark(Ok(()));
        let _ = fleet.mark::<()>(Err(FleetError::Unreachable("refused".into())));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let failed = fleet.fail_held(&jit);
        assert_eq!(
            failed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            [mine.id.as_str()]
        );
        match rx.await.unwrap() {
            crate::jit::Resolution::Failed { reason } => {
                assert!(reason.starts_with(UNREACHABLE), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(jit.get("r-other-1").unwrap().status, Status::Pending);
        // Once only.
        assert!(fleet.fail_held(&jit).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The daemon config shipped in deploy/kubernetes/configmap.yaml is one
    /// the daemon accepts (the manifests' schema check cannot see inside).
    #[test]
    fn the_configmaps_daemon_config_parses() {
        let yaml = include_str!("../../../deploy/kubernetes/configmap.yaml");
        let body: String = yaml
            .lines()
            .skip_while(|l| l.trim() != "portcullis.toml: |")
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        let path = std::env::temp_dir().join(format!(
            "portcullis-configmap-{}-{}.toml",
            std::process::id(),
            now_ms()
        ));
        std::fs::write(&path, body).unwrap();
        let table = crate::config::read_daemon_table(&path);
        std::fs::remove_file(&path).unwrap();
        let table = table.unwrap();
        let fleet = table.fleet.expect("[fleet] in the ConfigMap");
        assert_eq!(fleet.sslmode.as_deref(), Some("verify-full"));
        assert!(fleet.fail_held_after().is_ok());
        assert!(!table.auto_tag.is_empty());
        assert!(table.auto_tag.iter().all(|r| r.if_token_exists
            && r.token_file
                .as_deref()
                .is_some_and(|t| t.contains("{pod_uid}"))));
    }

    #[test]
    fn unreachable_names_the_reason_agents_see() {
        let e = FleetError::Unreachable("connection refused".into());
        assert!(e.to_string().starts_with("approval store unreachable"));
    }
}
