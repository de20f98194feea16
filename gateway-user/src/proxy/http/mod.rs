//! The `http` resource kind: HTTP/1.1 and HTTP/2 (by ALPN) from agents,
//! in plain text, through TLS interception (`tls = "intercept"`) or as TLS
//! passthrough decided on SNI alone (`tls = "passthrough"`); Kubernetes API
//! servers (`kind = "kubernetes"`) decided per verb.
//!
//! Every request is classified ([`classify`]), decided by the gate, then
//! forwarded with the daemon's credentials ([`upstream`]); the response is
//! masked as it streams ([`body`]), recorded as HAR and its completion
//! audited. Owns the request lifecycle; it must not touch other protocols,
//! the policy engine's internals or the audit log format.
//!
//! Agents trust interception by trusting the daemon CA: `<state>/ca/ca.crt`
//! (`portcullis ca` prints it, `portcullis status --json` names its path as
//! `ca_cert`). Mount it into the container and point the client at it
//! (`SSL_CERT_FILE`, `curl --cacert`, kubeconfig
//! `certificate-authority`, `REQUESTS_CA_BUNDLE`), or add it to the
//! image's trust store (`update-ca-certificates`).

pub mod body;
pub mod ca;
pub mod classify;
mod masking;
mod passthrough;
pub mod reply;
pub mod target;
pub mod tls;
pub mod upstream;

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Instant,
};

use http_body_util::BodyExt;
use hyper::{
    body::Incoming,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    service::service_fn,
    Method, Request, Response, StatusCode, Version as HttpVersion,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Map};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::OnceCell,
};
use tracing::{debug, info, warn};

use self::{
    body::{End, Outgoing, Tap, Tapped},
    classify::{Classified, K8sRequest},
    masking::{pipeline, MaskPlan},
    upstream::{BoxBody, Upstream, UpstreamError, Version},
};
use super::{
    gate::{self, Command, Denied, Gate, Waited},
    session::now_ms,
    Flow, SessionSummary,
};
use crate::{
    daemon::Shared,
    policy::{actions, AgentToken, Destination, RecordMode, TlsMode},
    record::HarEntry,
};

/// Most body bytes kept per direction for the HAR recording.
pub const HAR_BODY_CAP: usize = 64 * 1024;

/// Counts bytes through the agent's socket.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) from_client: AtomicU64,
    pub(super) to_client: AtomicU64,
}

/// The agent's stream, counted.
pub(super) struct Counted<T> {
    pub(super) inner: T,
    pub(super) c: Arc<Counters>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.c.from_client.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.c.to_client.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one agent connection to an http resource until it closes or the
/// session is ended.
pub async fn serve(
    shared: &Arc<Shared>,
    flow: Flow,
    client: TcpStream,
) -> io::Result<SessionSummary> {
    let _ = client.set_nodelay(true);
    let counters = Arc::new(Counters::default());
    let client = Counted {
        inner: client,
        c: counters.clone(),
    };
    let mode = flow.resource.tls.unwrap_or(TlsMode::None);
    let end_reason = match mode {
        // Boxed: the handshake's state (and passthrough's, which a plain
        // HTTP session never runs) is not kept in every session's future.
        TlsMode::Passthrough => Box::pin(passthrough::serve(shared, flow, client)).await?,
        TlsMode::Intercept => {
            let dst = flow.info.original_dst.ip();
            let (tls, sni) = Box::pin(tls::intercept(&shared.ca, client, dst, tls::ALPN_HTTP))
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("agent TLS handshake: {e}")))?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Box::pin(serve_http(shared, flow, tls, sni, true, h2)).await
        }
        TlsMode::None => serve_http(shared, flow, client, None, false, false).await,
    };
    Ok(SessionSummary {
        bytes_from_client: counters.from_client.load(Ordering::Relaxed),
        bytes_to_client: counters.to_client.load(Ordering::Relaxed),
        end_reason,
    })
}

/// Refuses a new connection while the daemon is over its memory budget:
/// every request on it is answered 503 with a JSON body (a Kubernetes
/// `Status` on a Kubernetes resource) and `Connection: close`. Through TLS
/// interception the handshake happens first; TLS passthrough cannot speak
/// HTTP to the agent, so it is reset. The caller bounds the time.
pub async fn shed(shared: &Arc<Shared>, flow: &Flow, client: TcpStream, message: &str) {
    let kube = flow.resource.kind == "kubernetes";
    let body = reply::body_json(StatusCode::SERVICE_UNAVAILABLE, message, None, kube, None);
    match flow.resource.tls.unwrap_or(TlsMode::None) {
        TlsMode::Passthrough => super::refuse(client),
        TlsMode::Intercept => {
            let dst = flow.info.original_dst.ip();
            if let Ok((tls, _)) = tls::intercept(&shared.ca, client, dst, tls::ALPN_HTTP).await {
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                serve_refusal(tls, h2, body, &shared.cfg.limits).await;
            }
        }
        TlsMode::None => serve_refusal(client, false, body, &shared.cfg.limits).await,
    }
}

/// Serves one connection whose every request gets `503 body`.
async fn serve_refusal<IO>(
    io: IO,
    h2: bool,
    body: serde_json::Value,
    limits: &crate::limits::Limits,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |_req: Request<Incoming>| {
        let mut resp = reply::json_response(StatusCode::SERVICE_UNAVAILABLE, &body, None);
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        async move { Ok::<_, std::convert::Infallible>(resp) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    limit_builder(&mut builder, limits);
    if h2 {
        builder = builder.http2_only();
    }
    let _ = builder.serve_connection(TokioIo::new(io), svc).await;
}

/// Caps what hyper buffers of a request head: the HTTP/1 read buffer (a
/// longer head is answered 431) and the HTTP/2 header list (refused by the
/// h2 layer). Bodies stream and are never buffered whole. An HTTP/1
/// connection waiting for a request head longer than `http_idle_timeout`
/// is closed: hyper's header read timer starts when the connection starts
/// waiting for a head, so it is both the keep-alive idle timeout and the
/// bound on a slow head.
fn limit_builder(
    builder: &mut hyper_util::server::conn::auto::Builder<TokioExecutor>,
    limits: &crate::limits::Limits,
) {
    let max_header = limits
        .http_max_header
        .max(crate::limits::MIN_HTTP_MAX_HEADER as usize);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.http_idle_timeout)
        .max_buf_size(max_header);
    // HTTP/2: hyper's defaults, stated so an upgrade cannot raise them: at
    // most 200 concurrent streams sharing a 1 MiB connection window.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header).unwrap_or(u32::MAX))
        .max_concurrent_streams(200)
        .initial_connection_window_size(1 << 20)
        .initial_stream_window_size(1 << 20);
}

/// One agent connection speaking HTTP.
struct Conn {
    shared: Arc<Shared>,
    flow: Flow,
    sni: Option<String>,
    /// The authority of a request that names none: the SNI, else the
    /// original destination. Made once per connection.
    fallback_authority: String,
    secure: bool,
    /// This connection's pooled upstream (shared with the resource's other
    /// agent connections): fixed at the first request.
    upstream: OnceCell<Arc<Upstream>>,
    /// Relays of upgraded connections: the session lasts until they end.
    upgrades: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// State of an mcp resource's connection (see [`super::mcp`]).
    mcp: Arc<super::mcp::ConnState>,
    /// This connection's last decisions (a client repeating a request is
    /// not evaluated again under the same rules; see [`super::decisions`]).
    memo: std::sync::Mutex<super::decisions::Decisions>,
}

async fn serve_http<IO>(
    shared: &Arc<Shared>,
    flow: Flow,
    io: IO,
    sni: Option<String>,
    secure: bool,
    h2: bool,
) -> &'static str
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cancel = flow.cancel.clone();
    let session = flow.info.session.clone();
    let fallback_authority = sni
        .clone()
        .unwrap_or_else(|| flow.info.original_dst.to_string());
    let conn = Arc::new(Conn {
        shared: shared.clone(),
        flow,
        sni,
        fallback_authority,
        secure,
        upstream: OnceCell::new(),
        upgrades: Mutex::new(Vec::new()),
        mcp: Arc::default(),
        memo: Default::default(),
    });
    let svc_conn = conn.clone();
    let svc = service_fn(move |req| request_future(svc_conn.clone(), req));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    limit_builder(&mut builder, &shared.cfg.limits);
    if h2 {
        builder = builder.http2_only();
    }
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    let reason = tokio::select! {
        r = served => match r {
            Ok(()) => "closed",
            Err(e) => {
                debug!(session = %session, "http connection ended: {e}");
                "closed with an error"
            }
        },
        _ = cancel.cancelled() => return "ended by the daemon",
    };
    // An upgraded connection (WebSocket, exec) outlives hyper's part.
    let relays: Vec<_> =
        std::mem::take(&mut *conn.upgrades.lock().unwrap_or_else(|p| p.into_inner()));
    for relay in relays {
        tokio::select! {
            _ = relay => {}
            _ = cancel.cancelled() => return "ended by the daemon",
        }
    }
    reason
}

/// What hyper awaits for one request.
type RequestFuture = Pin<
    Box<
        dyn std::future::Future<Output = Result<Response<BoxBody>, std::convert::Infallible>>
            + Send,
    >,
>;

/// One request's handling, boxed. hyper keeps a slot for the service's
/// future in every connection, allocated up front and sized for it; the
/// handling (decision, forwarding, masking) is a large state machine, so an
/// idle keep-alive connection would hold a slot that size (some 9 KiB)
/// for nothing. Boxed, the slot is a pointer and the state exists only
/// while a request is in flight. It is allocated and copied per request,
/// so the rare steps inside it are boxed where they are awaited.
fn request_future(conn: Arc<Conn>, req: Request<Incoming>) -> RequestFuture {
    Box::pin(async move { Ok(conn.handle(req).await) })
}

/// Headers that belong to one hop and are never forwarded (as names made
/// once: removing by a `&str` parses and lowercases it again, twice per
/// request for each of them).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // `TE: trailers` is end to end in meaning: gRPC servers require it
    // (it says the client reads trailers) and HTTP/2 allows exactly it.
    let te_trailers = h
        .get_all(header::TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // Only names that the loop over HOP_BY_HOP below does not remove
    // anyway (`Connection: keep-alive`) and that the message holds (not
    // `close`): a name compared or looked up is not allocated.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| {
            !HOP_BY_HOP.iter().any(|hop| {
                hop != header::CONNECTION
                    && hop != header::UPGRADE
                    && hop.as_str().eq_ignore_ascii_case(n)
            })
        })
        .filter(|n| h.contains_key(*n))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        if keep_upgrade && n == header::UPGRADE {
            continue;
        }
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        if keep_upgrade && (n == header::CONNECTION || n == header::UPGRADE) {
            continue;
        }
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn headers_vec(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn version_str(v: HttpVersion) -> &'static str {
    match v {
        HttpVersion::HTTP_09 => "HTTP/0.9",
        HttpVersion::HTTP_10 => "HTTP/1.0",
        HttpVersion::HTTP_2 => "HTTP/2",
        HttpVersion::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// The host part of an authority (`[::1]:443` → `::1`, `a.b:80` → `a.b`).
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// Per-request state carried to the response's end.
struct Exchange {
    cmd: Command,
    allowed: gate::Allowed,
    har: HarEntry,
    req_tap: Arc<Mutex<Tap>>,
    t_first_byte: Instant,
}

impl Conn {
    fn kube(&self) -> bool {
        self.flow.resource.kind == "kubernetes"
    }

    fn capture(&self) -> Option<usize> {
        (self.flow.resource.record == RecordMode::Full && self.flow.recording.is_recording())
            .then_some(HAR_BODY_CAP)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<BoxBody> {
        let started_ms = now_ms();
        let method = req.method().clone();
        let raw_path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let scheme = if self.secure { "https" } else { "http" };
        // The request's recording, made when its fate is known: an allowed
        // request's headers are taken as forwarded (`forward`), so they
        // are copied here only for a request answered by Portcullis.
        let har_for = |url: String, with_headers: bool| HarEntry {
            started_ms,
            method: method.as_str().to_string(),
            url,
            http_version: version_str(req.version()).into(),
            request_headers: if with_headers {
                headers_vec(req.headers())
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        // What the agent sent, for the recording of a refused request.
        let raw_har = || {
            let raw_authority = req
                .uri()
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| {
                    req.headers()
                        .get(header::HOST)
                        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
                })
                .unwrap_or_else(|| self.fallback_authority.clone());
            har_for(
                format!(
                    "{scheme}://{raw_authority}{raw_path}{}{query}",
                    if query.is_empty() { "" } else { "?" }
                ),
                true,
            )
        };
        let kube = self.kube();
        // The authority decided on and forwarded: the request-target's (or
        // `:authority`) and Host must agree (target::decide_authority).
        let decided = target::decide_authority(
            req.uri().authority().map(|a| a.as_str()),
            req.headers()
                .get_all(header::HOST)
                .iter()
                .map(HeaderValue::as_bytes),
            req.version() == HttpVersion::HTTP_11,
            self.secure,
            &self.fallback_authority,
        );
        let decided = match decided {
            Ok(a) => a,
            Err(e) => {
                return Box::pin(self.refused(
                    raw_har(),
                    &method,
                    StatusCode::BAD_REQUEST,
                    &e.to_string(),
                ))
                .await
            }
        };
        let authority = decided.to_string();
        let host = decided.bare_host().to_string();
        let classified = if method == Method::CONNECT {
            Err(classify::ClassifyError::Method("CONNECT".into()))
        } else if kube {
            classify::kubernetes(method.as_str(), &raw_path, &query)
        } else {
            classify::http(method.as_str(), &host, &raw_path, &query)
        };
        let mut classified: Classified = match classified {
            Ok(c) => c,
            Err(e) => {
                let status = match e {
                    classify::ClassifyError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
                    classify::ClassifyError::Target(_) => StatusCode::BAD_REQUEST,
                };
                return Box::pin(self.refused(raw_har(), &method, status, &e.to_string())).await;
            }
        };
        // From here on the request is the normalised one: decided on,
        // recorded and forwarded in the same form.
        let path = classified.path.clone();
        let pq = if query.is_empty() {
            path.clone()
        } else {
            format!("{path}?{query}")
        };
        let url = format!("{scheme}://{authority}{pq}");
        if self.flow.resource.agent_token == AgentToken::Oidc {
            if let Err(why) = Box::pin(self.check_agent_token(req.headers())).await {
                return Box::pin(self.unauthorized(
                    har_for(url, true),
                    &classified.action,
                    &why,
                    classified.k8s.as_ref(),
                ))
                .await;
            }
        }
        if self.flow.resource.protocol == crate::policy::Protocol::Mcp {
            // MCP: decided per JSON-RPC request in the body, not per URL.
            let link = super::mcp::Link {
                shared: &self.shared,
                flow: &self.flow,
                sni: self.sni.as_deref(),
                secure: self.secure,
                state: &self.mcp,
            };
            let har = har_for(url, true);
            return Box::pin(super::mcp::handle(link, req, &authority, &pq, har)).await;
        }
        let mut cmd = Command::new(
            &self.flow,
            classified.action.clone(),
            format!("{method} {authority}{pq}"),
        );
        cmd.context.extend(std::mem::take(&mut classified.context));
        let mut request_id = None;
        let allowed = match gate::check_memo(&self.shared, &self.flow, &cmd, &self.memo).await {
            Gate::Allowed(a) => a,
            Gate::Denied(d) => {
                return self.denied(har_for(url, true), &cmd, d, classified.k8s.as_ref())
            }
            Gate::Held(h) => {
                let id = h.request().id.clone();
                info!(session = %self.flow.info.session, request = %id, action = %cmd.action, "http request held for approval");
                request_id = Some(id.clone());
                match Box::pin(h.wait(&self.shared, &self.flow, &cmd, std::future::pending())).await
                {
                    Waited::Allowed(a) => a,
                    Waited::Denied(d) => {
                        return self.denied(har_for(url, true), &cmd, d, classified.k8s.as_ref())
                    }
                    Waited::Abandoned => {
                        let d = Denied {
                            reason: "the session ended while the request was held".into(),
                            policies: Vec::new(),
                            request: Some(id),
                        };
                        return self.denied(har_for(url, true), &cmd, d, classified.k8s.as_ref());
                    }
                }
            }
        };
        let mut har = har_for(url, false);
        har.action = cmd.action.clone();
        har.decision = "allow".into();
        har.policy_ids = allowed.policies.clone();
        let mut resp = self
            .forward(req, har, cmd, allowed, classified.k8s, &authority, &pq)
            .await;
        if let Some(v) = request_id.and_then(|r| HeaderValue::from_str(&r).ok()) {
            resp.headers_mut().insert(reply::REQUEST_HEADER, v);
        }
        resp
    }

    /// With `agent_token = "oidc"`: the agent's bearer token must be a
    /// valid OIDC token of the flow's identity.
    async fn check_agent_token(&self, h: &HeaderMap) -> Result<(), String> {
        let value = h
            .get(header::AUTHORIZATION)
            .ok_or("no Authorization header: this resource needs the agent's OIDC token")?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or("the Authorization header is not a bearer token")?;
        let policy = self.shared.policy.load();
        self.shared
            .identities
            .validate_token(&policy, &self.flow.info.identity, token)
            .await
            .map_err(|e| {
                format!(
                    "the agent's token is not valid for {}: {e}",
                    self.flow.info.identity
                )
            })
    }

    /// Answers a request that cannot be read unambiguously (400) or whose
    /// method is not served (405); audited as a deny with the reason.
    async fn refused(
        &self,
        har: HarEntry,
        method: &Method,
        status: StatusCode,
        why: &str,
    ) -> Response<BoxBody> {
        let prefix = if self.kube() { "k8s" } else { "http" };
        let m = method.as_str().to_ascii_lowercase();
        let action = if !self.kube() && actions::HTTP.contains(&m.as_str()) {
            format!("{prefix}:{m}")
        } else {
            format!("{prefix}:unclassified")
        };
        warn!(session = %self.flow.info.session, action, "refused request: {why}");
        let ev = self
            .flow
            .audit_event("command")
            .action(action.clone())
            .decision("deny")
            .reason(why.to_string())
            .detail("command", format!("{method} {}", har.url))
            .detail("refused", status.as_u16());
        if let Err(e) = self.shared.audit(ev).await {
            warn!(session = %self.flow.info.session, "audit of a refused request failed: {e}");
        }
        self.answer(
            har,
            &action,
            status,
            &format!("portcullis refused the request: {why}"),
            None,
            None,
            "deny",
        )
    }

    /// Answers 401 for a missing or invalid agent token; audited as a deny.
    async fn unauthorized(
        &self,
        har: HarEntry,
        action: &str,
        why: &str,
        k8s: Option<&K8sRequest>,
    ) -> Response<BoxBody> {
        warn!(session = %self.flow.info.session, action, "refused request: {why}");
        let ev = self
            .flow
            .audit_event("command")
            .action(action.to_string())
            .decision("deny")
            .reason(why.to_string())
            .detail("command", har.url.clone());
        if let Err(e) = self.shared.audit(ev).await {
            warn!(session = %self.flow.info.session, "audit of a refused request failed: {e}");
        }
        let mut resp = self.answer(
            har,
            action,
            StatusCode::UNAUTHORIZED,
            &format!("portcullis refused {action}: {why}"),
            k8s,
            None,
            "deny",
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        resp
    }

    /// Answers a denied request with 403 and records it.
    fn denied(
        &self,
        har: HarEntry,
        cmd: &Command,
        d: Denied,
        k8s: Option<&K8sRequest>,
    ) -> Response<BoxBody> {
        let mut msg = format!("portcullis denied {}: {}", cmd.action, d.reason);
        if let Some(r) = &d.request {
            if !d.reason.contains(r.as_str()) {
                msg.push_str(&format!(" (access request {r})"));
            }
        }
        let mut har = har;
        har.reason = Some(d.reason.clone());
        har.policy_ids = d.policies.clone();
        self.answer(
            har,
            &cmd.action,
            StatusCode::FORBIDDEN,
            &msg,
            k8s,
            d.request.as_deref(),
            "deny",
        )
    }

    /// A proxy-generated JSON answer, recorded as an exchange.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        mut har: HarEntry,
        action: &str,
        status: StatusCode,
        msg: &str,
        k8s: Option<&K8sRequest>,
        request: Option<&str>,
        decision: &str,
    ) -> Response<BoxBody> {
        let body = reply::body_json(status, msg, k8s, self.kube(), request);
        let resp = reply::json_response(status, &body, request);
        har.action = action.to_string();
        har.decision = decision.to_string();
        har.status = status.as_u16();
        har.status_text = status.canonical_reason().unwrap_or("").into();
        har.response_http_version = har.http_version.clone();
        har.response_headers = headers_vec(resp.headers());
        let text = body.to_string();
        har.response_body_size = Some(text.len() as u64);
        if self.capture().is_some() {
            har.response_body = Some(text.into_bytes());
        }
        self.flow.recording.http_exchange(har);
        resp
    }

    async fn upstream(&self, host: &str, h2c: bool) -> Result<&Arc<Upstream>, UpstreamError> {
        // The first request of a connection resolves and looks up the
        // pool; boxed so that its future does not size every request's.
        self.upstream
            .get_or_try_init(|| {
                Box::pin(async {
                    let addr = self.flow.upstream_addr().await.map_err(|source| {
                        UpstreamError::Connect {
                            addr: self.flow.info.original_dst,
                            source,
                        }
                    })?;
                    let res = &self.flow.resource;
                    let pool = &self.shared.http_pool;
                    let tls = self.secure || res.upstream_ca_file.is_some();
                    if !tls {
                        // Cleartext: the upstream protocol follows the agent's
                        // (HTTP/2 prior knowledge in, h2c out: gRPC, h2c-only
                        // servers).
                        return pool.get(res, addr, None, h2c);
                    }
                    // Verify the name the agent meant, unless the resource
                    // names its upstream host.
                    let name = match &res.upstream {
                        Some(Destination::Host { host, .. }) => host.clone(),
                        _ => self.sni.clone().unwrap_or_else(|| host.to_string()),
                    };
                    pool.get(res, addr, Some(&name), false)
                })
            })
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        har: HarEntry,
        cmd: Command,
        allowed: gate::Allowed,
        k8s: Option<K8sRequest>,
        authority: &str,
        pq: &str,
    ) -> Response<BoxBody> {
        let upgrade =
            req.version() == HttpVersion::HTTP_11 && req.headers().contains_key(header::UPGRADE);
        let agent_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let masking = self.mask_plan(k8s.as_ref());
        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers, upgrade);
        headers.remove(header::AUTHORIZATION);
        let action = cmd.action.clone();
        // `headers`: the request's headers as they stand when it fails,
        // recorded unless the forwarded ones already are.
        let fail = |this: &Self, mut har: HarEntry, headers: Option<&HeaderMap>, msg: String| {
            warn!(session = %this.flow.info.session, "{msg}");
            if let Some(h) = headers {
                har.request_headers = headers_vec(h);
            }
            this.answer(
                har,
                &action,
                StatusCode::BAD_GATEWAY,
                &msg,
                k8s.as_ref(),
                None,
                "allow",
            )
        };
        let masking = match masking {
            Ok(m) => m,
            Err(e) => return fail(self, har, Some(&headers), format!("masking: {e}")),
        };
        match upstream::authorization(&self.flow.resource.credentials) {
            Ok(Some(v)) => {
                headers.insert(header::AUTHORIZATION, v);
            }
            Ok(None) => {}
            Err(e) => return fail(self, har, Some(&headers), format!("credentials: {e}")),
        }
        if masking.is_some() {
            // Only bodies that can be inspected: no compression we cannot
            // decode, and for Kubernetes JSON rather than protobuf.
            headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
            if self.kube() {
                let proto = headers
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("protobuf"));
                if proto {
                    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
                }
            }
        }
        let host = host_of(authority).to_string();
        let agent_h2 = parts.version == HttpVersion::HTTP_2;
        let up = match self.upstream(&host, agent_h2).await {
            Ok(u) => u,
            Err(e) => return fail(self, har, Some(&headers), format!("upstream: {e}")),
        };
        let version = if upgrade {
            Version::H1
        } else {
            match up.version().await {
                Ok(v) => v,
                Err(e) => return fail(self, har, Some(&headers), format!("upstream: {e}")),
            }
        };
        let uri_text = match version {
            Version::H1 => pq.to_string(),
            Version::H2 => format!(
                "{}://{authority}{pq}",
                if up.is_tls() { "https" } else { "http" }
            ),
        };
        let uri: hyper::Uri = match uri_text.parse() {
            Ok(u) => u,
            Err(e) => return fail(self, har, Some(&headers), format!("request URI: {e}")),
        };
        match version {
            Version::H1 => {
                // Exactly the authority decided on (replaces the agent's).
                match HeaderValue::from_str(authority) {
                    Ok(v) => {
                        headers.insert(header::HOST, v);
                    }
                    Err(e) => return fail(self, har, Some(&headers), format!("host header: {e}")),
                }
            }
            Version::H2 => {
                headers.remove(header::HOST);
            }
        }
        let req_tap = Arc::new(Mutex::new(Tap::new(self.capture())));
        let lingering = body::Lingering::new(body);
        let req_ended = lingering.ended_flag();
        let req_body: BoxBody = Tapped::new(lingering, req_tap.clone()).boxed_unsync();
        let mut out = Request::new(req_body);
        let is_head = parts.method == Method::HEAD;
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.version_mut() = match version {
            Version::H1 => HttpVersion::HTTP_11,
            Version::H2 => HttpVersion::HTTP_2,
        };
        let mut har = har;
        har.request_headers = headers_vec(&headers);
        *out.headers_mut() = headers;
        let t_send = Instant::now();
        let sent = if upgrade {
            up.send_upgrade(out).await
        } else {
            up.send(out).await
        };
        har.server_ip = Some(up.addr().ip());
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                let mut d = Map::new();
                d.insert("status".into(), 502.into());
                d.insert("error".into(), e.to_string().into());
                Box::pin(gate::finished(&self.shared, &self.flow, &cmd, &allowed, d)).await;
                return fail(self, har, None, format!("upstream: {e}"));
            }
        };
        har.wait_ms = t_send.elapsed().as_secs_f64() * 1000.0;
        let (mut rparts, rbody) = resp.into_parts();
        har.status = rparts.status.as_u16();
        har.status_text = rparts.status.canonical_reason().unwrap_or("").into();
        har.response_http_version = version_str(rparts.version).into();
        let ex = Exchange {
            cmd,
            allowed,
            har,
            req_tap,
            t_first_byte: Instant::now(),
        };
        if rparts.status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(agent_up) = agent_upgrade {
                return self.switch(agent_up, rparts, rbody, ex);
            }
        }
        strip_hop_by_hop(&mut rparts.headers, false);
        let has_body = !(is_head
            || rparts.status == StatusCode::NO_CONTENT
            || rparts.status == StatusCode::NOT_MODIFIED
            || rparts.status.is_informational());
        let pipeline = match (&masking, has_body) {
            (Some(plan), true) => match pipeline(plan, &rparts.headers) {
                Ok(p) => p.map(|p| p.max_decoded(self.shared.cfg.limits.http_max_decoded_body)),
                Err(msg) => {
                    let Exchange {
                        cmd, allowed, har, ..
                    } = ex;
                    let mut d = Map::new();
                    d.insert("status".into(), 502.into());
                    d.insert("error".into(), msg.clone().into());
                    Box::pin(gate::finished(&self.shared, &self.flow, &cmd, &allowed, d)).await;
                    return fail(self, har, None, format!("response not forwarded: {msg}"));
                }
            },
            _ => None,
        };
        if let Some(p) = &pipeline {
            rparts.headers.remove(header::CONTENT_LENGTH);
            if p.decoder.is_some() {
                rparts.headers.remove(header::CONTENT_ENCODING);
            }
        }
        let mut ex = ex;
        ex.har.response_headers = headers_vec(&rparts.headers);
        // An error answer while the agent is still uploading goes out in one
        // piece when small (see `body::Prefetched`).
        let early_error = has_body
            && rparts.status.as_u16() >= 300
            && !req_ended.load(std::sync::atomic::Ordering::Relaxed);
        let rbody = if early_error {
            Box::pin(body::Prefetched::read_ahead(
                rbody,
                body::EARLY_ANSWER_AHEAD,
                body::EARLY_ANSWER_WAIT,
            ))
            .await
        } else {
            body::Prefetched::new(rbody)
        };
        let conn = self.clone();
        let body = Outgoing::new(rbody, pipeline, self.capture(), move |end| {
            conn.finish(ex, end)
        });
        Response::from_parts(rparts, body.boxed_unsync())
    }

    /// Masking for this request: the resource's rules, plus Kubernetes
    /// Secret data by default. Taken per request, so a policy reload
    /// applies to the next one.
    fn mask_plan(&self, k8s: Option<&K8sRequest>) -> Result<Option<MaskPlan>, String> {
        let own = self.shared.policy.load().masker(&self.flow.info.resource);
        masking::plan(own, k8s)
    }

    /// Relays an upgraded connection (WebSocket, Kubernetes exec/attach/
    /// port-forward) once both sides switched protocols.
    fn switch(
        self: &Arc<Self>,
        agent_up: hyper::upgrade::OnUpgrade,
        rparts: hyper::http::response::Parts,
        rbody: Incoming,
        ex: Exchange,
    ) -> Response<BoxBody> {
        let upstream_resp = Response::from_parts(rparts.clone(), rbody);
        let conn = self.clone();
        let Exchange {
            cmd,
            allowed,
            mut har,
            ..
        } = ex;
        har.response_headers = headers_vec(&rparts.headers);
        self.flow.recording.http_exchange(har);
        let relay = tokio::spawn(async move {
            let mut upstream_resp = upstream_resp;
            let (a, u) = tokio::join!(agent_up, hyper::upgrade::on(&mut upstream_resp));
            let (from_agent, to_agent, outcome) = match (a, u) {
                (Ok(a), Ok(u)) => {
                    let mut a = TokioIo::new(a);
                    let mut u = TokioIo::new(u);
                    tokio::select! {
                        r = tokio::io::copy_bidirectional(&mut a, &mut u) => match r {
                            Ok((x, y)) => (x, y, "complete"),
                            Err(_) => (0, 0, "upstream_error"),
                        },
                        _ = conn.flow.cancel.cancelled() => (0, 0, "ended by the daemon"),
                    }
                }
                _ => (0, 0, "upgrade_failed"),
            };
            let mut d = Map::new();
            d.insert("status".into(), 101.into());
            d.insert("upgraded".into(), true.into());
            d.insert("bytes_from_client".into(), from_agent.into());
            d.insert("bytes_to_client".into(), to_agent.into());
            d.insert("outcome".into(), outcome.into());
            gate::finished(&conn.shared, &conn.flow, &cmd, &allowed, d).await;
        });
        self.upgrades
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(relay);
        let mut resp = Response::new(reply::empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *resp.headers_mut() = rparts.headers;
        resp
    }

    /// Records the exchange and writes the command's completion record.
    /// The HAR entry is queued at once (the session may end right after the
    /// last byte); the audit record is written in the body's last poll when
    /// the log takes it without waiting, and on a task of its own otherwise
    /// (`gate::finished_detached`).
    fn finish(self: Arc<Self>, ex: Exchange, end: End) {
        let Exchange {
            cmd,
            allowed,
            mut har,
            req_tap,
            t_first_byte,
        } = ex;
        {
            har.receive_ms = t_first_byte.elapsed().as_secs_f64() * 1000.0;
            let (req_bytes, req_body) = {
                let mut t = req_tap.lock().unwrap_or_else(|p| p.into_inner());
                (t.bytes, t.captured.take())
            };
            har.request_body_size = Some(req_bytes);
            har.request_body = req_body;
            har.response_body_size = Some(end.bytes);
            har.response_body = end.captured;
            if end.outcome != body::Outcome::Complete {
                har.reason = Some(format!(
                    "response {}{}",
                    end.outcome.as_str(),
                    end.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ));
            }
            let mut d = Map::with_capacity(6);
            d.insert("status".into(), har.status.into());
            d.insert("bytes_from_client".into(), req_bytes.into());
            d.insert("bytes_to_client".into(), end.bytes.into());
            d.insert("outcome".into(), end.outcome.as_str().into());
            if let Some(e) = &end.error {
                d.insert("error".into(), e.clone().into());
            }
            if let Some(c) = end.counts.filter(|c| c != &json!({})) {
                d.insert("masked".into(), c);
            }
            self.flow.recording.http_exchange(har);
            gate::finished_detached(&self.shared, &self.flow, &cmd, &allowed, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper awaits each request's handling as a boxed future
    /// ([`request_future`]): it is allocated and moved whole for every
    /// request. The rare steps (a refusal, a hold, MCP, the agent's token,
    /// a new upstream connection with its TLS handshake, an error's audit
    /// record) are boxed where they are awaited, so that the common path
    /// fits jemalloc's small size classes (up to 14 KiB). It was 16,888
    /// bytes, and 8,768 with them boxed; with the upstream handshake
    /// inlined again it is 16,088, and this fails.
    #[test]
    fn a_requests_future_is_a_small_allocation() {
        fn size<F, Fut>(_: F) -> usize
        where
            F: FnOnce(Arc<Conn>, Request<Incoming>) -> Fut,
            Fut: std::future::Future,
        {
            std::mem::size_of::<Fut>()
        }
        let handle = size(Conn::handle);
        assert!(
            handle <= 14 * 1024,
            "a request's future is {handle} bytes, over jemalloc's small size classes"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret-Hop , close"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        let mut u = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
        strip_hop_by_hop(&mut u, true);
        assert!(u.contains_key("upgrade") && u.contains_key("connection"));
        assert!(!u.contains_key("x-secret-hop"));
        // gRPC's `TE: trailers` passes; any other TE does not.
        let mut g = HeaderMap::new();
        g.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut g, false);
        assert_eq!(g.get("te").unwrap(), "trailers");
        let mut g = HeaderMap::new();
        g.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut g, false);
        assert!(!g.contains_key("te"));
    }

    /// The stripping as it was written first (every `Connection` token
    /// made a header name and removed): what is left must not differ.
    fn strip_reference(h: &mut HeaderMap, keep_upgrade: bool) {
        let te_trailers = h
            .get_all(header::TE)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            if !(keep_upgrade && n == header::UPGRADE) {
                h.remove(n);
            }
        }
        for n in &HOP_BY_HOP {
            if !(keep_upgrade && (n == header::CONNECTION || n == header::UPGRADE)) {
                h.remove(n);
            }
        }
        if te_trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }

    #[test]
    fn hop_by_hop_stripping_leaves_what_naming_every_token_left() {
        let connections = [
            "keep-alive",
            "Keep-Alive, close",
            "upgrade",
            "Upgrade, Connection",
            "TE, x-hop",
            "x-hop ,, X-HOP2, proxy-connection",
            "close, bad name, \u{7f}",
            "",
        ];
        for connection in connections {
            for keep_upgrade in [false, true] {
                let mut h = HeaderMap::new();
                if let Ok(v) = HeaderValue::from_str(connection) {
                    h.insert(header::CONNECTION, v);
                }
                for (name, value) in [
                    ("x-hop", "1"),
                    ("x-hop2", "2"),
                    ("close", "3"),
                    ("keep-alive", "timeout=5"),
                    ("upgrade", "websocket"),
                    ("te", "trailers"),
                    ("proxy-connection", "keep-alive"),
                    ("accept", "*/*"),
                ] {
                    h.append(name, HeaderValue::from_static(value));
                }
                let mut want = h.clone();
                strip_reference(&mut want, keep_upgrade);
                strip_hop_by_hop(&mut h, keep_upgrade);
                assert_eq!(
                    h, want,
                    "Connection: {connection:?}, keep_upgrade {keep_upgrade}"
                );
            }
        }
    }

    #[test]
    fn hosts_are_taken_from_authorities() {
        assert_eq!(host_of("api.example.com:8443"), "api.example.com");
        assert_eq!(host_of("api.example.com"), "api.example.com");
        assert_eq!(host_of("[::1]:443"), "::1");
        assert_eq!(host_of("127.0.0.1:80"), "127.0.0.1");
    }
}
