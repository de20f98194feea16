//! The userspace half of interception: accepting redirected connections,
//! finding out whose they are and where they were going, and handing each
//! flow to the protocol handler of its resource.
//!
//! Owns flow setup and refusal, the live-session table and upstream
//! connection helpers shared by handlers. It must not parse any protocol:
//! that is each handler's job (`tcp`, `postgres`, `ssh`, `http`, each
//! plugged into [`dispatch`] the same way).

pub mod context;
mod decisions;
pub mod gate;
pub mod http;
pub mod mcp;
pub mod postgres;
pub mod session;
pub mod ssh;
pub mod tcp;
pub mod tcp_relay;

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use gateway_common::{ipv4_mapped, FlowKey, OrigDst, FAMILY_INET6};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    audit::{AuditEvent, FlowFields, IdentityRef},
    daemon::Shared,
    identity::ProvenIdentity,
    policy::{Destination, Protocol, Resource},
};
pub use context::base_context;
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
    /// The token that proved it.
    pub token: Option<ProvenIdentity>,
    /// The grant the session relies on, if a hold was lifted by one.
    pub grant: Option<String>,
    /// Who approved its held command, if someone did.
    pub approved_by: Option<String>,
    /// The connect was let in (a `tcp` session past its decision). Until
    /// then a policy reload ends the session only when the new rules deny
    /// it: one still being decided, or waiting for a human, is decided
    /// under the rules in force when that happens.
    pub admitted: bool,
    /// Resource the destination matched.
    pub resource: String,
    /// Its protocol.
    pub protocol: Protocol,
    /// When the flow started (milliseconds since the Unix epoch).
    pub started_ms: u64,
    /// The connection worker ([`crate::workers`]) the session runs on;
    /// `None` only when no worker was running to take it.
    pub worker: Option<usize>,
}

impl FlowInfo {
    /// An audit event of `kind` about this flow.
    pub fn audit_event(&self, kind: &str) -> AuditEvent {
        AuditEvent::new(kind)
            .session(self.session.clone())
            .identity(match &self.token {
                Some(t) => identity_ref(t),
                None => IdentityRef::named(&self.identity),
            })
            .cgroup(self.cgroup.clone())
            .cgroup_id(self.cgroup_id)
            .pid(self.pid)
            .resource(self.resource.clone())
    }
}

/// A flow ready for its protocol handler.
pub struct Flow {
    /// What is known about it.
    pub info: FlowInfo,
    /// The resource it reaches.
    pub resource: Arc<Resource>,
    /// Cancelled when the session must end (kill, revocation, shutdown).
    pub cancel: CancellationToken,
    /// The session's recording (a no-op when the resource records nothing).
    pub recording: crate::record::SessionRecording,
    /// `info`'s audited fields, encoded once ([`FlowFields::of`] of
    /// [`FlowInfo::audit_event`]): what every audit event of the flow
    /// carries, without copying and escaping it for each command.
    pub audit_fields: FlowFields,
    /// The decision context's attributes `info` fixes (`client`,
    /// `destination`), built once for every command of the flow.
    pub context: Arc<context::FlowContext>,
}

impl Flow {
    /// A flow of `info`, its audited fields encoded.
    pub fn new(
        info: FlowInfo,
        resource: Arc<Resource>,
        cancel: CancellationToken,
        recording: crate::record::SessionRecording,
    ) -> Self {
        // The fields of a fresh event are always encodable; should that
        // ever fail, events carry them the copying way instead.
        let audit_fields = FlowFields::of(&info.audit_event("session")).unwrap_or_default();
        let context = Arc::new(context::FlowContext::of(&info));
        Self {
            info,
            resource,
            cancel,
            recording,
            audit_fields,
            context,
        }
    }

    /// An audit event of `kind` about this flow (session, identity, cgroup,
    /// pid, resource filled in).
    pub fn audit_event(&self, kind: &str) -> AuditEvent {
        if self.audit_fields.is_empty() {
            return self.info.audit_event(kind);
        }
        AuditEvent::new(kind).flow_fields(self.audit_fields.clone())
    }

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
    /// The tag's identity is not proven by a valid token.
    IdentityUnproven,
    /// The audit log cannot be written.
    AuditUnavailable,
    /// The daemon is over its memory budget (`[daemon] memory_budget`).
    MemoryBudget,
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
            Self::IdentityUnproven => "the identity is not proven by a valid token",
            Self::AuditUnavailable => "the audit log cannot be written",
            Self::MemoryBudget => "portcullis is over its memory budget",
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
            Self::IdentityUnproven => "identity_unproven",
            Self::AuditUnavailable => "audit_unavailable",
            Self::MemoryBudget => "memory_budget",
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
    // This future is the session's task, allocated whole for the session's
    // life, so it holds only what the run needs: a pointer to the
    // handler's future and what the end record is made from. Everything
    // before the run (attribution, refusals, shedding, the start record)
    // and after it (the end record) is a boxed step whose state is freed
    // when it is done. A few allocations per session, against some 3 KiB
    // held by every idle one (rustc keeps the storage of every local a
    // suspended `async fn` ever had, moved out or not).
    let Some(OpenSession { run, end }) =
        Box::pin(open_session(&shared, client, peer, netns_cookie)).await
    else {
        return;
    };
    let outcome = run.await;
    Box::pin(end.write(&shared, outcome)).await;
}

/// A session let in, ready to run.
struct OpenSession<'a> {
    /// The protocol handler's run ([`dispatch`]).
    run: SessionRun<'a>,
    /// What its end record needs.
    end: SessionEnd,
}

/// A protocol handler's run of one session, boxed: a session's task then
/// holds its own protocol's state, not room for the largest of them (an
/// idle SSH or HTTP session would otherwise carry PostgreSQL's).
type SessionRun<'a> = Pin<Box<dyn Future<Output = io::Result<SessionSummary>> + Send + 'a>>;

/// What a session's end is recorded from, kept while its handler runs
/// (the flow itself has moved into the handler).
struct SessionEnd {
    /// The `session_end` audit event's template.
    event: EndEvent,
    /// The session id, for the log.
    session: String,
    /// The recording, ended with the session's outcome.
    recording: crate::record::SessionRecording,
    /// Keeps the session in the live table until its end is recorded.
    _guard: SessionGuard,
}

/// The `session_end` event of a flow: its encoded audit fields (small and
/// shared), or the whole event when those could not be encoded.
enum EndEvent {
    Fields(FlowFields),
    Event(Box<AuditEvent>),
}

impl EndEvent {
    fn of(flow: &Flow) -> Self {
        if flow.audit_fields.is_empty() {
            Self::Event(Box::new(flow.audit_event(SESSION_END)))
        } else {
            Self::Fields(flow.audit_fields.clone())
        }
    }

    fn event(self) -> AuditEvent {
        match self {
            Self::Fields(fields) => AuditEvent::new(SESSION_END).flow_fields(fields),
            Self::Event(event) => *event,
        }
    }
}

/// The audit event type that closes a session.
const SESSION_END: &str = "session_end";

impl SessionEnd {
    /// Logs, records and audits the end of the session with its handler's
    /// `outcome`.
    async fn write(self, shared: &Shared, outcome: io::Result<SessionSummary>) {
        let Self {
            event,
            session,
            recording,
            _guard,
        } = self;
        let end = event.event();
        let end = match &outcome {
            Ok(summary) => {
                recording.end(summary.end_reason);
                info!(
                    session = %session,
                    bytes_from_client = summary.bytes_from_client,
                    bytes_to_client = summary.bytes_to_client,
                    reason = summary.end_reason,
                    "session_end"
                );
                end.reason(summary.end_reason).bytes(serde_json::json!({
                    "from_client": summary.bytes_from_client,
                    "to_client": summary.bytes_to_client,
                }))
            }
            Err(e) => {
                recording.end(&e.to_string());
                warn!(session = %session, error = %e, "session_end with an error");
                end.reason(e.to_string())
            }
        };
        if let Err(e) = shared.audit(end).await {
            warn!(session = %session, "audit record of session end failed: {e}");
        }
    }
}

/// Attributes a connection and lets it in: refuses it (audited) when it
/// cannot be attributed or the audit log is unavailable, sheds it when
/// the daemon is over its memory budget, and otherwise records its start
/// and registers it. `None` when the connection was refused or shed.
async fn open_session(
    shared: &Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    netns_cookie: u64,
) -> Option<OpenSession<'_>> {
    let flow = match attribute(shared, peer, netns_cookie).await {
        Ok(flow) => flow,
        Err(refused) => {
            shared.metrics.refused(refused.refusal);
            warn!(
                client = %peer,
                netns_cookie,
                reason = refused.refusal.as_str(),
                detail = %refused.detail,
                "flow refused"
            );
            let event = refused
                .event
                .reason(refused.refusal.as_str())
                .detail("client", peer.to_string())
                .detail("netns_cookie", netns_cookie)
                .detail("detail", refused.detail);
            // The flow is refused whether or not this record lands.
            if let Err(e) = shared.audit(event).await {
                warn!("audit record of a refused flow failed: {e}");
            }
            refuse(client);
            return None;
        }
    };
    if let Some(over) = shared.memory.over(shared.cfg.memory_budget) {
        shed(shared, flow, client, over).await;
        return None;
    }
    let start = flow
        .audit_event("session_start")
        .detail("client", flow.info.client.to_string())
        .detail("original_dst", flow.info.original_dst.to_string())
        .detail("netns_cookie", flow.info.netns_cookie)
        .detail("protocol", flow.info.protocol.as_str());
    if let Err(e) = shared.audit(start).await {
        // Nothing may happen that the audit log does not know about.
        warn!(session = %flow.info.session, "audit log unavailable, refusing the flow: {e}");
        shared.metrics.refused(Refusal::AuditUnavailable);
        refuse(client);
        return None;
    }
    let mut flow = flow;
    let meta = crate::record::SessionMeta {
        id: flow.info.session.clone(),
        protocol: flow.info.protocol.as_str().into(),
        resource: flow.info.resource.clone(),
        identity: flow.info.identity.clone(),
        cgroup: flow.info.cgroup.clone(),
        pid: flow.info.pid,
        client: flow.info.client.to_string(),
        original_dst: flow.info.original_dst.to_string(),
        started_ms: flow.info.started_ms,
        record: record_mode(flow.resource.record).into(),
    };
    // Recordings are best-effort; the audit log is the record that counts.
    match shared.recorder.session(meta) {
        Ok(r) => flow.recording = r,
        Err(e) => warn!(session = %flow.info.session, "recording unavailable: {e}"),
    }
    let guard = shared
        .sessions
        .register(flow.info.clone(), flow.cancel.clone());
    shared.metrics.accepted();
    info!(
        session = %flow.info.session,
        client = %flow.info.client,
        original_dst = %flow.info.original_dst,
        cgroup = %flow.info.cgroup,
        pid = flow.info.pid,
        identity = %flow.info.identity,
        resource = %flow.info.resource,
        "session_start"
    );
    let end = SessionEnd {
        event: EndEvent::of(&flow),
        session: flow.info.session.clone(),
        recording: flow.recording.clone(),
        _guard: guard,
    };
    Some(OpenSession {
        run: dispatch(shared, flow, client),
        end,
    })
}

/// Sheds a new session while the daemon is over its memory budget: the
/// agent gets its protocol's own error (PostgreSQL FATAL 53200, HTTP 503,
/// an SSH banner and a refused login; a plain TCP flow is reset), and the
/// refusal is logged, audited and counted. Sessions already running are
/// not touched.
async fn shed(
    shared: &Arc<Shared>,
    flow: Flow,
    client: TcpStream,
    over: crate::limits::OverBudget,
) {
    shared.metrics.refused(Refusal::MemoryBudget);
    let message = over.message();
    warn!(
        client = %flow.info.client,
        identity = %flow.info.identity,
        resource = %flow.info.resource,
        rss = over.rss,
        budget = over.budget,
        "new session shed: {message}"
    );
    let event = flow
        .audit_event("flow_refused")
        .decision("deny")
        .reason(Refusal::MemoryBudget.as_str())
        .detail("client", flow.info.client.to_string())
        .detail("original_dst", flow.info.original_dst.to_string())
        .detail("protocol", flow.info.protocol.as_str())
        .detail("rss_bytes", over.rss)
        .detail("memory_budget_bytes", over.budget);
    if let Err(e) = shared.audit(event).await {
        warn!("audit record of a shed flow failed: {e}");
    }
    // However the agent behaves, the refusal takes a bounded time.
    let answer = async {
        match flow.resource.protocol {
            Protocol::Postgres => postgres::shed(shared, &flow, client, &message).await,
            Protocol::Http | Protocol::Mcp => http::shed(shared, &flow, client, &message).await,
            Protocol::Ssh => ssh::shed(shared, &flow, client, &message).await,
            Protocol::Tcp => refuse(client),
        }
    };
    let _ = tokio::time::timeout(SHED_TIMEOUT, answer).await;
}

/// How long a shed connection is given to receive its refusal.
const SHED_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Starts the protocol handler for the flow's resource. New protocols plug
/// in here and nowhere else. Not an `async fn`: one would hold a copy of
/// the flow for the session's life next to the handler's own.
fn dispatch(shared: &Arc<Shared>, flow: Flow, client: TcpStream) -> SessionRun<'_> {
    match flow.resource.protocol {
        Protocol::Tcp => Box::pin(tcp::serve(shared, flow, client)),
        // MCP rides on the HTTP handler, which hands it each request.
        Protocol::Http | Protocol::Mcp => Box::pin(http::serve(shared, flow, client)),
        Protocol::Postgres => Box::pin(postgres::serve(shared, flow, client)),
        Protocol::Ssh => Box::pin(ssh::serve(shared, flow, client)),
    }
}

/// A refused flow: why, what else was known, and its audit event so far.
struct Refused {
    refusal: Refusal,
    detail: String,
    event: AuditEvent,
}

async fn attribute(shared: &Shared, peer: SocketAddr, netns_cookie: u64) -> Result<Flow, Refused> {
    let mut event = AuditEvent::new("flow_refused").decision("deny");
    let refused = |refusal, detail: String, event: &AuditEvent| Refused {
        refusal,
        detail,
        event: event.clone(),
    };
    if shared.shutdown.is_cancelled() {
        return Err(refused(Refusal::ShuttingDown, String::new(), &event));
    }
    let key = flow_key(netns_cookie, peer);
    let Some(orig) = shared.take_flow(&key) else {
        return Err(refused(Refusal::NoFlowEntry, String::new(), &event));
    };
    let original_dst = orig_dst_addr(&orig);
    event = event
        .pid(orig.pid)
        .cgroup_id(orig.cgroup_id)
        .detail("original_dst", original_dst.to_string());
    let Some(cgroup) = shared.cgroup_path(orig.cgroup_id) else {
        let detail = format!(
            "cgroup id {} (pid {}) to {original_dst}",
            orig.cgroup_id, orig.pid
        );
        return Err(refused(Refusal::UnknownCgroup, detail, &event));
    };
    event = event.cgroup(cgroup.clone());
    let tag = {
        let tags = shared.tags.read().unwrap_or_else(|p| p.into_inner());
        tags.nearest(&cgroup).cloned()
    };
    let Some(tag) = tag else {
        let detail = format!("cgroup {cgroup} (pid {}) to {original_dst}", orig.pid);
        return Err(refused(Refusal::Untagged, detail, &event));
    };
    event = event.identity(IdentityRef::named(&tag.identity));
    let policy = shared.policy.load_full();
    let proven = match shared.identities.prove(&policy, &tag).await {
        Ok(p) => p,
        Err(e) => {
            let detail = format!("{} in {cgroup} (pid {}): {e}", tag.identity, orig.pid);
            let event = event.detail("identity_error", e.code());
            return Err(refused(Refusal::IdentityUnproven, detail, &event));
        }
    };
    event = event.identity(identity_ref(&proven));
    let Some(resource) = shared.resolver.lookup(&policy, &original_dst) else {
        let detail = format!(
            "{} in {cgroup} (pid {}) to {original_dst}",
            tag.identity, orig.pid
        );
        return Err(refused(Refusal::NoResource, detail, &event));
    };
    let info = FlowInfo {
        session: shared.sessions.new_id(),
        client: peer,
        original_dst,
        netns_cookie,
        cgroup_id: orig.cgroup_id,
        cgroup,
        tagged_cgroup: tag.cgroup.clone(),
        pid: orig.pid,
        identity: tag.identity.clone(),
        token: Some(proven),
        grant: None,
        approved_by: None,
        admitted: false,
        resource: resource.name.clone(),
        protocol: resource.protocol,
        started_ms: session::now_ms(),
        worker: crate::workers::current(),
    };
    Ok(Flow::new(
        info,
        resource,
        shared.shutdown.child_token(),
        crate::record::SessionRecording::off(),
    ))
}

fn record_mode(m: crate::policy::RecordMode) -> &'static str {
    match m {
        crate::policy::RecordMode::Off => "off",
        crate::policy::RecordMode::Metadata => "metadata",
        crate::policy::RecordMode::Full => "full",
    }
}

/// How audit events name a proven identity.
pub fn identity_ref(p: &ProvenIdentity) -> IdentityRef {
    IdentityRef {
        name: p.name.clone(),
        iss: Some(p.iss.clone()),
        sub: Some(p.sub.clone()),
        jti: p.jti.clone(),
    }
}

/// Closes a connection with a reset, so the client sees a refusal at once
/// rather than a clean end of stream.
pub fn refuse(client: TcpStream) {
    if let Ok(std) = client.into_std() {
        let sock = socket2::Socket::from(std);
        let _ = sock.set_linger(Some(Duration::ZERO));
    }
}

#[cfg(test)]
mod task_size_tests {
    use std::{future::Future, sync::Arc};

    use tokio::net::TcpStream;

    use super::*;

    // The size of the future a function returns, without making one.

    fn handler<F, Fut>(_: F) -> usize
    where
        F: FnOnce(&'static Arc<Shared>, Flow, TcpStream) -> Fut,
        Fut: Future,
    {
        std::mem::size_of::<Fut>()
    }

    fn task<F, Fut>(_: F) -> usize
    where
        F: FnOnce(Arc<Shared>, TcpStream, SocketAddr, u64) -> Fut,
        Fut: Future,
    {
        std::mem::size_of::<Fut>()
    }

    fn attribution<F, Fut>(_: F) -> usize
    where
        F: FnOnce(&'static Shared, SocketAddr, u64) -> Fut,
        Fut: Future,
    {
        std::mem::size_of::<Fut>()
    }

    fn shedding<F, Fut>(_: F) -> usize
    where
        F: FnOnce(&'static Arc<Shared>, Flow, TcpStream, crate::limits::OverBudget) -> Fut,
        Fut: Future,
    {
        std::mem::size_of::<Fut>()
    }

    /// A session's task (the future of [`handle_connection`]) is allocated
    /// whole for the session's life: it holds no room for the handlers of
    /// other protocols, nor the state of steps that are over (attribution)
    /// or rare (shedding). Each of those is boxed, so the task is smaller
    /// than any of them; inlining one again makes it at least that big.
    #[test]
    fn a_sessions_task_holds_only_what_an_idle_session_needs() {
        let task = task(handle_connection);
        let boxed = [
            ("tcp handler", handler(tcp::serve)),
            ("http handler", handler(http::serve)),
            ("postgres handler", handler(postgres::serve)),
            ("ssh handler", handler(ssh::serve)),
            ("attribution", attribution(attribute)),
            ("shedding", shedding(shed)),
        ];
        for (what, size) in boxed {
            assert!(
                task < size,
                "a session's task is {task} bytes, not less than the {what} ({size} bytes): is it still boxed?"
            );
        }
        // What it holds: the handler's boxed run, the end record's
        // template, the session id, the recording and the live-table
        // guard, and the arguments. A local that lives across an await
        // (a flow, an audit event) costs 400-600 bytes more.
        assert!(
            task <= TASK_MAX,
            "a session's task is {task} bytes (at most {TASK_MAX}): what does it keep across an await?"
        );
    }

    /// The most a session's task may be.
    const TASK_MAX: usize = 384;

    /// An idle SSH session's handler holds the flow once (in its
    /// connection's state, behind a pointer), not a dead copy of it too.
    #[test]
    fn the_ssh_handler_keeps_no_copy_of_the_flow() {
        let ssh = handler(ssh::serve);
        let flow = std::mem::size_of::<Flow>();
        assert!(
            ssh < 2 * flow,
            "the ssh handler's future is {ssh} bytes, a flow {flow}: does it keep the flow?"
        );
    }
}
