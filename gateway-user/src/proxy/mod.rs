//! The userspace half of interception: accepting redirected connections,
//! finding out whose they are and where they were going, and handing each
//! flow to the protocol handler of its resource.
//!
//! Owns flow setup and refusal, the live-session table and upstream
//! connection helpers shared by handlers. It must not parse any protocol:
//! that is each handler's job (`tcp` today; `postgres`, `ssh`, `http` plug into
//! [`dispatch`] the same way).

pub mod session;
pub mod tcp;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use gateway_common::{ipv4_mapped, FlowKey, OrigDst, FAMILY_INET6};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    daemon::Shared,
    policy::{Destination, Protocol, Resource},
};
pub use session::{SessionGuard, Sessions};

/// How long a handler waits for an upstream TCP connect.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything known about a flow once it is accepted and attributed.
#[derive(Debug, Clone, Serialize)]
pub struct FlowInfo {
    /// Session id (also the recording id).
    pub session: String,
    /// The client's address inside its network namespace.
    pub client: SocketAddr,
    /// Where the client was connecting.
    pub original_dst: SocketAddr,
    /// The client's network namespace cookie.
    pub netns_cookie: u64,
    /// The connecting task's cgroup id.
    pub cgroup_id: u64,
    /// The connecting task's cgroup path (relative to the cgroup2 mount).
    pub cgroup: String,
    /// The tagged cgroup the identity comes from (the cgroup or an ancestor).
    pub tagged_cgroup: String,
    /// The connecting process id.
    pub pid: u32,
    /// Identity name from the tag.
    pub identity: String,
    /// Resource the destination matched.
    pub resource: String,
    /// Its protocol.
    pub protocol: Protocol,
    /// When the flow started (milliseconds since the Unix epoch).
    pub started_ms: u64,
}

/// A flow ready for its protocol handler.
pub struct Flow {
    /// What is known about it.
    pub info: FlowInfo,
    /// The resource it reaches.
    pub resource: Arc<Resource>,
    /// Cancelled when the session must end (kill, revocation, shutdown).
    pub cancel: CancellationToken,
}

impl Flow {
    /// Where the daemon connects: the resource's upstream, or the original
    /// destination.
    pub async fn upstream_addr(&self) -> io::Result<SocketAddr> {
        match &self.resource.upstream {
            None => Ok(self.info.original_dst),
            Some(Destination::Addr(a)) => Ok(*a),
            Some(Destination::Host { host, port }) => {
                tokio::net::lookup_host((host.as_str(), *port))
                    .await?
                    .next()
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))
                    })
            }
        }
    }

    /// Opens the upstream TCP connection (from the daemon's own cgroup, so
    /// it is never redirected), bounded by [`UPSTREAM_CONNECT_TIMEOUT`].
    pub async fn connect_upstream(&self) -> io::Result<TcpStream> {
        let addr = self.upstream_addr().await?;
        let stream = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {addr} timed out"),
                )
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Why a connection to the proxy was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No flow entry: somebody dialed the proxy port directly.
    NoFlowEntry,
    /// The cgroup that opened it is gone or unknown.
    UnknownCgroup,
    /// The cgroup is not (or no longer) tagged.
    Untagged,
    /// No resource matches the original destination.
    NoResource,
    /// The daemon is shutting down.
    ShuttingDown,
}

impl Refusal {
    /// Stable reason text for logs, audit and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoFlowEntry => {
                "no flow entry: not a redirected connection (direct dial of the proxy port?)"
            }
            Self::UnknownCgroup => "the connecting cgroup is unknown or gone",
            Self::Untagged => "the connecting cgroup is not tagged",
            Self::NoResource => "no resource matches the original destination",
            Self::ShuttingDown => "the daemon is shutting down",
        }
    }

    /// Short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoFlowEntry => "no_flow_entry",
            Self::UnknownCgroup => "unknown_cgroup",
            Self::Untagged => "untagged",
            Self::NoResource => "no_resource",
            Self::ShuttingDown => "shutting_down",
        }
    }
}

/// The original destination the kernel recorded, as a socket address.
pub fn orig_dst_addr(orig: &OrigDst) -> SocketAddr {
    let ip = std::net::Ipv6Addr::from(orig.addr);
    let ip = match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    };
    let _ = FAMILY_INET6;
    SocketAddr::new(ip, orig.port)
}

/// The flow-map key for a client as the proxy sees it.
pub fn flow_key(netns_cookie: u64, client: SocketAddr) -> FlowKey {
    let addr = match client.ip() {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => ipv4_mapped(v4.octets()),
            None => v6.octets(),
        },
    };
    FlowKey {
        netns_cookie,
        addr,
        port: client.port(),
        _pad: [0; 6],
    }
}

/// Handles one accepted connection from a listener in namespace
/// `netns_cookie`: attribute it, refuse it or run its protocol handler.
pub async fn handle_connection(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    netns_cookie: u64,
) {
    let flow = match attribute(&shared, peer, netns_cookie) {
        Ok(flow) => flow,
        Err((refusal, detail)) => {
            shared.metrics.refused(refusal);
            warn!(
                target: "portcullis::audit",
                event = "flow_refused",
                client = %peer,
                netns_cookie,
                reason = refusal.as_str(),
                detail = %detail,
                "flow refused"
            );
            refuse(client);
            return;
        }
    };
    let _guard = shared
        .sessions
        .register(flow.info.clone(), flow.cancel.clone());
    shared.metrics.accepted();
    info!(
        target: "portcullis::audit",
        event = "session_start",
        session = %flow.info.session,
        client = %flow.info.client,
        original_dst = %flow.info.original_dst,
        cgroup = %flow.info.cgroup,
        cgroup_id = flow.info.cgroup_id,
        pid = flow.info.pid,
        identity = %flow.info.identity,
        resource = %flow.info.resource,
        protocol = %flow.info.protocol,
        policy_version = %shared.policy.load().version,
        "session started"
    );
    let session = flow.info.session.clone();
    let outcome = dispatch(&shared, flow, client).await;
    match outcome {
        Ok(summary) => info!(
            target: "portcullis::audit",
            event = "session_end",
            session = %session,
            bytes_from_client = summary.bytes_from_client,
            bytes_to_client = summary.bytes_to_client,
            reason = summary.end_reason,
            "session ended"
        ),
        Err(e) => warn!(
            target: "portcullis::audit",
            event = "session_end",
            session = %session,
            error = %e,
            "session ended with an error"
        ),
    }
}

/// What a handler reports when a session ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionSummary {
    /// Bytes read from the agent.
    pub bytes_from_client: u64,
    /// Bytes written to the agent.
    pub bytes_to_client: u64,
    /// Why it ended.
    pub end_reason: &'static str,
}

/// Runs the protocol handler for the flow's resource. New protocols plug in
/// here and nowhere else.
async fn dispatch(
    shared: &Arc<Shared>,
    flow: Flow,
    client: TcpStream,
) -> io::Result<SessionSummary> {
    match flow.resource.protocol {
        Protocol::Tcp => tcp::serve(shared, flow, client).await,
        other => {
            // Resources of protocols this build has no handler for validate
            // (so policies can be written ahead of an upgrade), but their
            // flows are refused, never relayed blindly.
            refuse(client);
            warn!(
                target: "portcullis::audit",
                event = "flow_refused",
                session = %flow.info.session,
                reason = "no handler for this protocol in this build",
                protocol = %other,
                "flow refused"
            );
            Ok(SessionSummary {
                end_reason: "refused: no handler for this protocol in this build",
                ..Default::default()
            })
        }
    }
}

/// The context every action carries: who is connecting, from where, when,
/// to what. Handlers add their action-specific attributes.
pub fn base_context(info: &FlowInfo) -> serde_json::Map<String, serde_json::Value> {
    let now = (session::now_ms() / 1000) as i64;
    let hour = now.rem_euclid(86_400) / 3600;
    // 1970-01-01 was a Thursday; 0 = Monday.
    let weekday = ((now / 86_400) + 3).rem_euclid(7);
    let mut m = serde_json::Map::new();
    m.insert(
        "client".into(),
        serde_json::json!({
            "pid": info.pid,
            "cgroup": info.cgroup,
            "address": info.client.to_string(),
        }),
    );
    m.insert(
        "time".into(),
        serde_json::json!({ "unix": now, "hour": hour, "weekday": weekday }),
    );
    m.insert(
        "destination".into(),
        serde_json::Value::String(info.original_dst.to_string()),
    );
    m
}

fn attribute(
    shared: &Shared,
    peer: SocketAddr,
    netns_cookie: u64,
) -> Result<Flow, (Refusal, String)> {
    if shared.shutdown.is_cancelled() {
        return Err((Refusal::ShuttingDown, String::new()));
    }
    let key = flow_key(netns_cookie, peer);
    let orig = shared
        .take_flow(&key)
        .ok_or_else(|| (Refusal::NoFlowEntry, String::new()))?;
    let original_dst = orig_dst_addr(&orig);
    let cgroup = shared.cgroup_path(orig.cgroup_id).ok_or_else(|| {
        (
            Refusal::UnknownCgroup,
            format!(
                "cgroup id {} (pid {}) to {original_dst}",
                orig.cgroup_id, orig.pid
            ),
        )
    })?;
    let (identity, tagged_cgroup) = {
        let tags = shared.tags.read().unwrap_or_else(|p| p.into_inner());
        let tag = tags.nearest(&cgroup).ok_or_else(|| {
            (
                Refusal::Untagged,
                format!("cgroup {cgroup} (pid {}) to {original_dst}", orig.pid),
            )
        })?;
        (tag.identity.clone(), tag.cgroup.clone())
    };
    let policy = shared.policy.load();
    let resource = shared
        .resolver
        .lookup(&policy, &original_dst)
        .ok_or_else(|| {
            (
                Refusal::NoResource,
                format!(
                    "{identity} in {cgroup} (pid {}) to {original_dst}",
                    orig.pid
                ),
            )
        })?;
    let info = FlowInfo {
        session: shared.sessions.new_id(),
        client: peer,
        original_dst,
        netns_cookie,
        cgroup_id: orig.cgroup_id,
        cgroup,
        tagged_cgroup,
        pid: orig.pid,
        identity,
        resource: resource.name.clone(),
        protocol: resource.protocol,
        started_ms: session::now_ms(),
    };
    Ok(Flow {
        info,
        resource,
        cancel: shared.shutdown.child_token(),
    })
}

/// Closes a connection with a reset, so the client sees a refusal at once
/// rather than a clean end of stream.
pub fn refuse(client: TcpStream) {
    if let Ok(std) = client.into_std() {
        let sock = socket2::Socket::from(std);
        let _ = sock.set_linger(Some(Duration::ZERO));
    }
}
