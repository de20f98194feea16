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
//! catches up when the store returns.

pub mod ship;
pub mod store;
pub mod tls;

use std::{
    path::PathBuf,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
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
    migrated: AtomicBool,
    /// Audit shipping progress (for metrics and status).
    pub shipping: Arc<ship::ShipStatus>,
}

impl Fleet {
    /// Reads the settings; does not connect yet (see [`Fleet::start`]).
    pub fn new(cfg: &FleetConfig) -> Result<Self, FleetError> {
        let (config, tls) = cfg.pg_config()?;
        let node = cfg.node_name()?;
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
            migrated: AtomicBool::new(false),
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
                Some(jit.make_grant(
                    &r.identity,
                    &r.resource,
                    vec![r.action.clone()],
                    r.fingerprint.clone(),
                    d,
                    by,
                    reason.clone(),
                    Some(id.to_string()),
                )?)
            }
        };
        let status = Status::Approved {
            by: by.to_string(),
            at_ms: now_ms(),
            reason,
            grant: grant.as_ref().map(|g| g.id.clone()),
        };
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
    fn unreachable_names_the_reason_agents_see() {
        let e = FleetError::Unreachable("connection refused".into());
        assert!(e.to_string().starts_with("approval store unreachable"));
    }
}
