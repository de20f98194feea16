//! The `mcp` resource kind: an MCP server reached over HTTP, decided per
//! JSON-RPC request on top of the HTTP handler (which terminates TLS, checks
//! the authority and path, and hands every request of an mcp resource to
//! [`handle`]).
//!
//! Speaks every transport current clients pick: the stateless revision
//! (2026-07-28: `server/discover`, one POST per request), Streamable HTTP
//! with sessions (`initialize`, `Mcp-Session-Id`, POSTs answered as
//! `application/json` or `text/event-stream`, the GET stream, DELETE) and
//! the older HTTP+SSE (`GET /sse` + `POST /messages`, answers on the
//! stream). The same rules apply whichever is used, because every JSON-RPC
//! request is classified from its body ([`classify`]) and decided by the
//! gate before anything is forwarded; what is forwarded is the JSON that
//! was decided on (re-serialized), so the server cannot read other bytes
//! than the ones decided.
//!
//! Owns the MCP request lifecycle: JSON-RPC parsing ([`jsonrpc`]), the
//! decision per request, in-protocol refusals, list filtering, server
//! requests (`mcp:server_request`) and tool fingerprints ([`tools`]). It
//! must not touch the HTTP handler's internals, other protocols or the
//! audit log format.

pub mod classify;
pub mod jsonrpc;
pub mod recording;
pub mod sse;
pub mod tools;

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::{
    body::{Frame, Incoming},
    header::{self, HeaderMap, HeaderValue},
    Method, Request, Response, StatusCode,
};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, OnceCell};
use tracing::{info, warn};

use self::{
    classify::{Class, Decide},
    jsonrpc::Kind,
    recording::{from, Verdict},
};
use super::{
    context::{Context as DecisionContext, ContextTime},
    gate::{self, Command, Denied, Gate, Waited},
    http::{
        reply,
        upstream::{self, BoxBody, BoxError, Upstream, Version},
    },
    session::now_ms,
    Flow,
};
use crate::{
    daemon::Shared,
    policy::{Decision, DecisionRequest, Destination},
    record::HarEntry,
};

/// Largest JSON-RPC body an agent may POST.
pub const MAX_REQUEST_BODY: usize = 4 * 1024 * 1024;
/// Largest JSON answer (or one SSE event) read from the server.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024 * 1024;
/// How long an agent may take to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The stateless revision's protocol version.
pub const MODERN_VERSION: &str = "2026-07-28";

/// Per agent connection: the upstream it is forwarded over.
#[derive(Default)]
pub struct ConnState {
    upstream: OnceCell<Upstream>,
}

/// What [`handle`] needs from the HTTP handler's connection.
pub struct Link<'a> {
    /// Daemon services.
    pub shared: &'a Arc<Shared>,
    /// The flow.
    pub flow: &'a Flow,
    /// The SNI the agent sent (TLS interception).
    pub sni: Option<&'a str>,
    /// Whether the agent spoke TLS.
    pub secure: bool,
    /// The connection's MCP state.
    pub state: &'a Arc<ConnState>,
}

/// A flow handle that outlives one request (streams relayed by a task).
fn flow_handle(f: &Flow) -> Flow {
    Flow {
        info: f.info.clone(),
        resource: f.resource.clone(),
        cancel: f.cancel.clone(),
        recording: f.recording.clone(),
        audit_fields: f.audit_fields.clone(),
        context: f.context.clone(),
    }
}

/// Everything a relay of server messages needs, owned.
struct Ctx {
    shared: Arc<Shared>,
    flow: Flow,
    state: Arc<ConnState>,
    sni: Option<String>,
    secure: bool,
    authority: String,
    /// Where replies to server requests are POSTed (Streamable HTTP: the
    /// endpoint; HTTP+SSE: the messages endpoint once announced).
    reply_path: Mutex<Option<String>>,
    /// Headers replies carry (session id, protocol version).
    reply_headers: HeaderMap,
    modern: bool,
    /// Calls forwarded on this request and not answered yet, by JSON-RPC
    /// id: their `command_end` waits for the answer (and its masking).
    pending: Mutex<HashMap<String, Allowed>>,
}

/// The live HTTP+SSE streams, by resource, identity and session id: a POST
/// to `/messages?session_id=X` answers on X's stream, so refusals of its
/// requests are injected there. Process-wide because the stream and the
/// POSTs come on different agent connections.
type LegacyStreams = Mutex<HashMap<String, mpsc::Sender<Value>>>;

fn legacy_streams() -> &'static LegacyStreams {
    static S: OnceLock<LegacyStreams> = OnceLock::new();
    S.get_or_init(Default::default)
}

fn legacy_key(flow: &Flow, session: &str) -> String {
    format!("{}\0{}\0{session}", flow.info.resource, flow.info.identity)
}

/// The fingerprint store of the daemon's state directory.
pub fn tool_store(state_dir: &std::path::Path) -> &'static tools::Store {
    static S: OnceLock<tools::Store> = OnceLock::new();
    S.get_or_init(|| tools::Store::new(state_dir))
}

/// The body of an SSE relay: events pushed by its task.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn json_answer(status: StatusCode, v: &Value, extra: Option<&HeaderMap>) -> Response<BoxBody> {
    let mut resp = Response::new(reply::full(v.to_string()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(extra) = extra {
        for (k, v) in extra {
            h.insert(k.clone(), v.clone());
        }
    }
    resp
}

/// Headers of one hop, never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
}

impl Ctx {
    async fn upstream(&self) -> Result<&Upstream, upstream::UpstreamError> {
        self.state
            .upstream
            .get_or_try_init(|| async {
                let addr = self.flow.upstream_addr().await.map_err(|source| {
                    upstream::UpstreamError::Connect {
                        addr: self.flow.info.original_dst,
                        source,
                    }
                })?;
                let res = &self.flow.resource;
                if !(self.secure || res.upstream_ca_file.is_some()) {
                    return Upstream::new(addr, None);
                }
                let name = match &res.upstream {
                    Some(Destination::Host { host, .. }) => host.clone(),
                    _ => self.sni.clone().unwrap_or_else(|| {
                        super::http::target::Authority::parse(&self.authority, "authority")
                            .map(|a| a.bare_host().to_string())
                            .unwrap_or_else(|_| self.authority.clone())
                    }),
                };
                Upstream::new(addr, Some((res, &name)))
            })
            .await
    }

    /// Sends a request upstream with the daemon's credentials in place of
    /// the agent's, asking for an uncompressed body (it is inspected).
    async fn send(
        &self,
        method: Method,
        pq: &str,
        mut headers: HeaderMap,
        body: BoxBody,
    ) -> Result<Response<Incoming>, String> {
        strip_hop_by_hop(&mut headers);
        headers.remove(header::AUTHORIZATION);
        headers.remove(header::CONTENT_LENGTH);
        match upstream::authorization(&self.flow.resource.credentials) {
            Ok(Some(v)) => {
                headers.insert(header::AUTHORIZATION, v);
            }
            Ok(None) => {}
            Err(e) => return Err(format!("credentials: {e}")),
        }
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let up = self
            .upstream()
            .await
            .map_err(|e| format!("upstream: {e}"))?;
        let version = up.version().await.map_err(|e| format!("upstream: {e}"))?;
        let uri_text = match version {
            Version::H1 => pq.to_string(),
            Version::H2 => format!(
                "{}://{}{pq}",
                if up.is_tls() { "https" } else { "http" },
                self.authority
            ),
        };
        let uri: hyper::Uri = uri_text.parse().map_err(|e| format!("request URI: {e}"))?;
        match version {
            Version::H1 => {
                let v = HeaderValue::from_str(&self.authority)
                    .map_err(|e| format!("host header: {e}"))?;
                headers.insert(header::HOST, v);
            }
            Version::H2 => {
                headers.remove(header::HOST);
            }
        }
        let mut out = Request::new(body);
        *out.method_mut() = method;
        *out.uri_mut() = uri;
        *out.version_mut() = match version {
            Version::H1 => hyper::Version::HTTP_11,
            Version::H2 => hyper::Version::HTTP_2,
        };
        *out.headers_mut() = headers;
        up.send(out).await.map_err(|e| format!("upstream: {e}"))
    }

    /// Audits a request refused before any decision (bad input).
    async fn refused(&self, what: &str, why: &str) {
        warn!(session = %self.flow.info.session, "mcp request refused: {why}");
        let ev = self
            .flow
            .audit_event("command")
            .action("mcp:invalid".to_string())
            .decision("deny")
            .reason(why.to_string())
            .detail("command", what.to_string());
        if let Err(e) = self.shared.audit(ev).await {
            warn!(session = %self.flow.info.session, "audit of a refused mcp request failed: {e}");
        }
    }

    /// A decision without audit: what a list may show.
    fn visible(&self, action: &str, context: Map<String, Value>) -> Decision {
        // The flow's attributes as built once for it, not formatted again
        // for every item of a list.
        let mut ctx = DecisionContext::new(self.flow.context.clone(), ContextTime::now());
        ctx.extend(context);
        self.shared.policy.load().decide(&DecisionRequest {
            identity: &self.flow.info.identity,
            resource: &self.flow.info.resource,
            action,
            context: ctx.to_value(),
            approved: false,
        })
    }

    fn command(&self, d: &Decide, method: &str) -> Command {
        let mut cmd = Command::new(&self.flow, d.action, d.text.clone());
        cmd.context.extend(d.context.clone());
        cmd = cmd.detail("method", method);
        if let Some(t) = &d.tool {
            cmd = cmd.detail("tool", t.clone());
        }
        if let Some(dg) = &d.digest {
            cmd = cmd.detail("arguments_digest", dg.clone());
            // A hold's approval (and a grant made from it) covers exactly
            // this tool with these arguments.
            if let Some(t) = &d.tool {
                cmd = cmd.fingerprint(format!("{t} {dg}"));
            }
        }
        cmd
    }

    /// Decides a server-to-agent request; `None` when it may go on.
    async fn server_request(&self, method: &str) -> Option<Denied> {
        let d = classify::server_request(method);
        let cmd = self.command(&d, method);
        match gate::check_and_wait(&self.shared, &self.flow, &cmd, std::future::pending()).await {
            Waited::Allowed(_) => None,
            Waited::Denied(d) => Some(d),
            Waited::Abandoned => Some(Denied {
                reason: "the session ended while the request was held".into(),
                policies: Vec::new(),
                request: None,
            }),
        }
    }

    /// Tells the server its request to the agent was refused.
    async fn reply_upstream(&self, msg: Value) {
        let Some(path) = self
            .reply_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        let mut h = self.reply_headers.clone();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        if let Err(e) = self
            .send(Method::POST, &path, h, reply::full(msg.to_string()))
            .await
        {
            warn!(session = %self.flow.info.session, "mcp: telling the server of a refused request failed: {e}");
        }
    }

    /// Filters one message from the server; `None` drops it.
    async fn filter_from_server(&self, msg: Value) -> Option<Value> {
        match jsonrpc::kind(&msg) {
            Ok(Kind::Request { id, method }) => {
                if let Some(d) = self.server_request(&method).await {
                    recording::record(
                        &self.flow,
                        from::SERVER,
                        &msg,
                        None,
                        Some(deny(&d.policies)),
                    );
                    info!(session = %self.flow.info.session, method, "mcp server request refused: {}", d.reason);
                    let err = jsonrpc::error(
                        &id,
                        jsonrpc::DENIED,
                        &format!(
                            "portcullis denied mcp:server_request {method}: {}",
                            d.reason
                        ),
                        None,
                    );
                    self.reply_upstream(err).await;
                    return None;
                }
                recording::record(
                    &self.flow,
                    from::SERVER,
                    &msg,
                    None,
                    Some(Verdict {
                        decision: "allow",
                        rules: &[],
                    }),
                );
                Some(msg)
            }
            Ok(Kind::Response { id }) => {
                let call = self
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id_key(&id));
                let tool = call.as_ref().and_then(|c| c.tool.clone());
                let (out, counts) = self.filter_response(&id, msg).await;
                let answer_error = out
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                if let Some(call) = call {
                    // Before the answer is relayed, like every record.
                    call.finish(self, answer_error, counts).await;
                }
                recording::record(&self.flow, from::SERVER, &out, tool.as_deref(), None);
                Some(out)
            }
            Ok(Kind::Notification { .. }) => {
                recording::record(&self.flow, from::SERVER, &msg, None, None);
                Some(msg)
            }
            Err(e) => {
                warn!(session = %self.flow.info.session, "mcp: server sent a malformed message ({e}); dropped");
                None
            }
        }
    }

    /// Filters and masks an answer of the server; returns what the agent
    /// gets and the masking counts, if anything was masked.
    async fn filter_response(&self, id: &Value, mut msg: Value) -> (Value, Option<Value>) {
        let mut counts = None;
        if let Some(result) = msg.get_mut("result").and_then(Value::as_object_mut) {
            if let Some(err) = self.filter_result(id, result).await {
                return (err, None);
            }
        }
        if let Some(result) = msg.get_mut("result") {
            let masked = self.mask(result);
            if let Ok(Some(c)) = &masked {
                // What masking did to this answer, beside the
                // call's own records.
                let ev = self
                    .flow
                    .audit_event("mcp_result_masked")
                    .detail("id", id.clone())
                    .detail("masked", c.clone());
                if let Err(e) = self.shared.audit(ev).await {
                    warn!(session = %self.flow.info.session, "audit of masking failed: {e}");
                }
                counts = Some(c.clone());
            }
            if let Err(e) = masked {
                // Fail closed: an answer that cannot be masked is
                // not relayed.
                warn!(session = %self.flow.info.session, "mcp result not masked ({e}); refused");
                return (
                    jsonrpc::error(
                        id,
                        -32603,
                        &format!("portcullis could not mask the answer: {e}"),
                        None,
                    ),
                    None,
                );
            }
        }
        (msg, counts)
    }

    /// Ends the calls whose answer never came (the stream or the answer
    /// ended without it).
    async fn finish_unanswered(&self) {
        let left: Vec<Allowed> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, a)| a)
            .collect();
        for a in left {
            a.finish(self, Some("the server sent no answer".into()), None)
                .await;
        }
    }

    /// Masks a result with the resource's rules: detectors on every string
    /// (text content, `structuredContent`, embedded resources, resource
    /// reads) and `json_paths` from the result's root. Taken per message,
    /// so a reload applies to the next one.
    /// Returns the counts when anything was masked.
    fn mask(&self, result: &mut Value) -> Result<Option<Value>, String> {
        let Some(masker) = self.shared.policy.load().masker(&self.flow.info.resource) else {
            return Ok(None);
        };
        let mut jm = masker.json(&[]);
        let text = result.to_string();
        let mut out = Vec::with_capacity(text.len());
        jm.push(text.as_bytes(), &mut out)
            .and_then(|()| jm.finish(&mut out))
            .map_err(|e| e.to_string())?;
        if jm.counts().is_empty() {
            return Ok(None);
        }
        *result = serde_json::from_slice(&out).map_err(|e| e.to_string())?;
        let counts = jm.counts().to_json();
        info!(session = %self.flow.info.session, masked = %counts, "mcp result masked");
        Ok(Some(counts))
    }

    /// Lists keep what the identity may use; server requests carried in a
    /// result (the stateless revision's `input_required`) are decided.
    /// Returns an error response replacing the message, when refused.
    async fn filter_result(&self, id: &Value, result: &mut Map<String, Value>) -> Option<Value> {
        if let Some(Value::Array(list)) = result.get_mut("tools") {
            let defs = std::mem::take(list);
            *list = self.filter_tools(defs).await;
        }
        for (key, action, field) in [
            ("resources", "mcp:read_resource", "uri"),
            ("resourceTemplates", "mcp:read_resource", "uriTemplate"),
            ("prompts", "mcp:get_prompt", "name"),
        ] {
            if let Some(Value::Array(list)) = result.get_mut(key) {
                list.retain(|item| {
                    let v = item.get(field).and_then(Value::as_str).unwrap_or_default();
                    let mut c = Map::new();
                    c.insert(
                        if field == "name" { "name" } else { "uri" }.into(),
                        json!(v),
                    );
                    c.insert("method".into(), json!(""));
                    let d = self.visible(action, with_defaults(c));
                    match d {
                        Decision::Deny { policies, .. } => {
                            // A template is a family of URIs: hidden only
                            // when a rule forbids it outright.
                            key == "resourceTemplates" && policies.is_empty()
                        }
                        _ => true,
                    }
                });
            }
        }
        if result.get("resultType") == Some(&json!("input_required")) {
            let methods: Vec<String> = result
                .get("inputRequests")
                .and_then(Value::as_object)
                .map(|m| {
                    m.values()
                        .map(|r| {
                            r.get("method")
                                .and_then(Value::as_str)
                                .unwrap_or("unknown")
                                .to_string()
                        })
                        .collect()
                })
                .unwrap_or_default();
            for method in methods {
                if let Some(d) = self.server_request(&method).await {
                    return Some(jsonrpc::error(
                        id,
                        jsonrpc::DENIED,
                        &format!(
                            "portcullis denied mcp:server_request {method}: {}",
                            d.reason
                        ),
                        None,
                    ));
                }
            }
        }
        None
    }

    /// Records each definition's fingerprint; leaves out changed ones
    /// (until accepted) and tools the identity cannot call.
    async fn filter_tools(&self, defs: Vec<Value>) -> Vec<Value> {
        let store = tool_store(&self.shared.cfg.state_dir);
        let resource = &self.flow.info.resource;
        let mut out = Vec::with_capacity(defs.len());
        for def in defs {
            let Some(name) = def.get("name").and_then(Value::as_str).map(str::to_string) else {
                continue;
            };
            match store.observe(resource, &name, &def, now_ms()) {
                Ok(tools::Seen::Trusted { .. }) => {}
                Ok(tools::Seen::Changed {
                    accepted,
                    seen,
                    known,
                }) => {
                    if !known {
                        warn!(session = %self.flow.info.session, tool = %name, "mcp tool definition changed; held until `portcullis mcp accept {resource} {name}`");
                        let ev = self
                            .flow
                            .audit_event("mcp_tool_changed")
                            .detail("tool", name.clone())
                            .detail("accepted_fingerprint", accepted)
                            .detail("seen_fingerprint", seen)
                            .detail("definition", def.clone());
                        if let Err(e) = self.shared.audit(ev).await {
                            warn!("audit of a changed mcp tool failed: {e}");
                        }
                    }
                    continue;
                }
                Err(e) => {
                    warn!(session = %self.flow.info.session, "mcp tool store: {e}; tool {name} left out");
                    continue;
                }
            }
            let declared = self
                .flow
                .resource
                .mcp_tools
                .get(&name)
                .is_some_and(|a| !a.is_empty());
            let c = match classify::call_tool(&self.flow.resource.mcp_tools, &name, &Map::new()) {
                Ok(d) => d.context,
                Err(_) => continue,
            };
            match self.visible("mcp:call_tool", c) {
                // Rules on a declared tool's arguments decide each call:
                // listed unless a rule forbids it with no arguments at all.
                Decision::Deny { policies, .. } if !(declared && policies.is_empty()) => {}
                _ => out.push(def),
            }
        }
        out
    }
}

fn with_defaults(mut c: Map<String, Value>) -> Map<String, Value> {
    for k in ["method", "tool", "arguments_digest", "uri", "name", "list"] {
        c.entry(k.to_string()).or_insert(json!(""));
    }
    c.entry("arguments".to_string()).or_insert(json!({}));
    c.entry("argument_names".to_string()).or_insert(json!([]));
    c
}

/// Reads a request body up to `max` bytes.
async fn read_capped(body: Incoming, max: usize) -> Result<Bytes, String> {
    let mut body = body;
    let mut buf = BytesMut::new();
    let read = async {
        while let Some(f) = body.frame().await {
            let f = f.map_err(|e| format!("reading the body: {e}"))?;
            if let Ok(d) = f.into_data() {
                if buf.len() + d.len() > max {
                    return Err(format!("the body is over {max} bytes"));
                }
                buf.extend_from_slice(&d);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(Ok(())) => Ok(buf.freeze()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the body took too long to arrive".into()),
    }
}

/// One request's outcome inside a POST.
struct Allowed {
    cmd: Command,
    allowed: gate::Allowed,
    /// The upstream's HTTP status, once sent.
    status: u16,
    /// The tool, for a call.
    tool: Option<String>,
}

/// A refusal, as recorded.
fn deny(rules: &[String]) -> Verdict<'_> {
    Verdict {
        decision: "deny",
        rules,
    }
}

/// The key of a JSON-RPC id in [`Ctx::pending`].
fn id_key(id: &Value) -> String {
    id.to_string()
}

impl Allowed {
    /// How the recording names the decision.
    fn verdict(&self) -> Verdict<'_> {
        Verdict {
            decision: if self.allowed.approved_by.is_some() {
                "approved"
            } else {
                "allow"
            },
            rules: &self.allowed.policies,
        }
    }

    /// Writes the call's `command_end`: the status, the answer's error and
    /// what masking did to the answer.
    async fn finish(self, ctx: &Ctx, answer_error: Option<String>, masked: Option<Value>) {
        let mut d = Map::new();
        d.insert("status".into(), self.status.into());
        if let Some(e) = answer_error {
            d.insert("error".into(), e.into());
        }
        if let Some(m) = masked {
            d.insert("masked".into(), m);
        }
        gate::finished(&ctx.shared, &ctx.flow, &self.cmd, &self.allowed, d).await;
    }
}

/// Serves one HTTP request of an mcp resource. `authority` and `pq` are
/// the ones the HTTP handler decided on (checked Host, normalised path).
pub async fn handle(
    link: Link<'_>,
    req: Request<Incoming>,
    authority: &str,
    pq: &str,
    har: HarEntry,
) -> Response<BoxBody> {
    let mut har = har;
    let ctx = Arc::new(Ctx {
        shared: link.shared.clone(),
        flow: flow_handle(link.flow),
        state: link.state.clone(),
        sni: link.sni.map(str::to_string),
        secure: link.secure,
        authority: authority.to_string(),
        reply_path: Mutex::new(Some(pq.to_string())),
        reply_headers: session_headers(req.headers()),
        modern: req
            .headers()
            .get("mcp-protocol-version")
            .is_some_and(|v| v.as_bytes() == MODERN_VERSION.as_bytes()),
        pending: Mutex::default(),
    });
    let method = req.method().clone();
    let resp = match method {
        Method::POST => post(&ctx, req, pq).await,
        Method::GET => get(&ctx, req, pq).await,
        // Ending a session (and CORS preflight) carries no command.
        Method::DELETE | Method::OPTIONS => {
            let (parts, body) = req.into_parts();
            match ctx
                .send(
                    parts.method,
                    pq,
                    parts.headers,
                    http_body_util::Empty::<Bytes>::new()
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                )
                .await
            {
                Ok(r) => {
                    drop(body);
                    pass_through(r)
                }
                Err(e) => bad_gateway(&e),
            }
        }
        other => {
            ctx.refused(&format!("{other} {pq}"), "method not used by MCP")
                .await;
            let mut r = json_answer(
                StatusCode::METHOD_NOT_ALLOWED,
                &jsonrpc::error(
                    &Value::Null,
                    jsonrpc::INVALID_REQUEST,
                    &format!("portcullis: {other} is not an MCP request"),
                    None,
                ),
                None,
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
            r
        }
    };
    har.action = "mcp".into();
    har.status = resp.status().as_u16();
    har.status_text = resp.status().canonical_reason().unwrap_or("").into();
    har.response_http_version = har.http_version.clone();
    har.decision = if resp.status().is_success() {
        "allow".into()
    } else {
        "deny".into()
    };
    ctx.flow.recording.http_exchange(har);
    resp
}

/// The headers a reply to the server carries: the session it belongs to.
fn session_headers(h: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for k in ["mcp-session-id", "mcp-protocol-version"] {
        if let Some(v) = h.get(k) {
            out.insert(k, v.clone());
        }
    }
    out
}

fn bad_gateway(msg: &str) -> Response<BoxBody> {
    json_answer(
        StatusCode::BAD_GATEWAY,
        &jsonrpc::error(
            &Value::Null,
            -32603,
            &format!("portcullis could not reach the MCP server: {msg}"),
            None,
        ),
        None,
    )
}

fn pass_through(r: Response<Incoming>) -> Response<BoxBody> {
    let (mut parts, body) = r.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(
        parts,
        body.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
    )
}

fn is_event_stream(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        })
}

fn is_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
}

/// The HTTP+SSE session a POST belongs to (`?session_id=`), when its stream
/// is live.
fn legacy_session(ctx: &Ctx, pq: &str) -> Option<(String, mpsc::Sender<Value>)> {
    let query = pq.split_once('?')?.1;
    let sid = super::http::target::query_pairs(query)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == "session_id" || k == "sessionId")?
        .1;
    let key = legacy_key(&ctx.flow, &sid);
    let tx = legacy_streams()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned()?;
    Some((key, tx))
}

/// A GET is only ever an MCP event stream (the session's stream, or the
/// HTTP+SSE stream): anything else the server serves over HTTP is not this
/// resource's to reach undecided.
async fn get(ctx: &Arc<Ctx>, req: Request<Incoming>, pq: &str) -> Response<BoxBody> {
    let wants_stream = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| String::from_utf8_lossy(v.as_bytes()).contains("text/event-stream"));
    if !wants_stream {
        let why =
            "a GET to an mcp resource must ask for an event stream (Accept: text/event-stream)";
        ctx.refused(&format!("GET {pq}"), why).await;
        return json_answer(
            StatusCode::NOT_ACCEPTABLE,
            &jsonrpc::error(&Value::Null, jsonrpc::INVALID_REQUEST, why, None),
            None,
        );
    }
    let (parts, _body) = req.into_parts();
    let r = match ctx
        .send(
            Method::GET,
            pq,
            parts.headers,
            http_body_util::Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .await
    {
        Ok(r) => r,
        Err(e) => return bad_gateway(&e),
    };
    if is_event_stream(r.headers()) {
        relay(ctx.clone(), r, Vec::new())
    } else if r.status().is_success() {
        // Not an event stream: not relayed (it was not decided).
        bad_gateway("the server did not answer the GET with an event stream")
    } else {
        // An error status (405: no GET stream offered) tells the client.
        pass_through(r)
    }
}

/// Tells [`post`] that a call is held: its progress token and the access
/// request id.
type HoldNotice = tokio::sync::oneshot::Sender<(Value, String)>;

/// A POST. When the agent accepts an event stream and a call in it is held,
/// the answer turns into a stream at once: a progress notification naming
/// the access request (if the call carries a progress token), then the
/// call's answer when the hold ends.
async fn post(ctx: &Arc<Ctx>, req: Request<Incoming>, pq: &str) -> Response<BoxBody> {
    let accepts_sse = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| String::from_utf8_lossy(v.as_bytes()).contains("text/event-stream"));
    if !accepts_sse {
        return post_inner(ctx, req, pq, None).await;
    }
    let (ntx, nrx) = tokio::sync::oneshot::channel();
    let (c, p) = (ctx.clone(), pq.to_string());
    let mut task = tokio::spawn(async move { post_inner(&c, req, &p, Some(ntx)).await });
    let (token, request) = tokio::select! {
        r = &mut task => return r.unwrap_or_else(|e| bad_gateway(&format!("internal error: {e}"))),
        Ok(n) = nrx => n,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let progress = json!({
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {
            "progressToken": token,
            "progress": 0,
            "message": format!("held for approval: portcullis access request {request}"),
        },
    });
    let first = sse::Event {
        event: "message".into(),
        data: progress.to_string(),
        has_data: true,
        ..Default::default()
    };
    let _ = tx.try_send(Bytes::from(first.encode()));
    tokio::spawn(async move {
        let resp = task
            .await
            .unwrap_or_else(|e| bad_gateway(&format!("internal error: {e}")));
        let sse_answer = is_event_stream(resp.headers());
        let mut body = resp.into_body();
        if sse_answer {
            // Already filtered event by event: copied as it comes.
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(d) = f.into_data() {
                    if tx.send(d).await.is_err() {
                        return;
                    }
                }
            }
            return;
        }
        let Ok(all) = body.collect().await.map(|c| c.to_bytes()) else {
            return;
        };
        let ev = sse::Event {
            event: "message".into(),
            data: String::from_utf8_lossy(&all).into_owned(),
            has_data: true,
            ..Default::default()
        };
        let _ = tx.send(Bytes::from(ev.encode())).await;
    });
    let mut resp = Response::new(ChannelBody { rx }.boxed_unsync());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&request) {
        h.insert(reply::REQUEST_HEADER, v);
    }
    resp
}

async fn post_inner(
    ctx: &Arc<Ctx>,
    req: Request<Incoming>,
    pq: &str,
    notice: Option<HoldNotice>,
) -> Response<BoxBody> {
    let mut notice = notice;
    let (parts, body) = req.into_parts();
    let what = format!("POST {pq}");
    let declared_len = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bytes = match declared_len {
        Some(n) if n > MAX_REQUEST_BODY as u64 => {
            Err(format!("the body is over {MAX_REQUEST_BODY} bytes"))
        }
        _ => read_capped(body, MAX_REQUEST_BODY).await,
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(why) => {
            ctx.refused(&what, &why).await;
            return json_answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                &jsonrpc::error(
                    &Value::Null,
                    jsonrpc::PARSE_ERROR,
                    &format!("portcullis refused the request: {why}"),
                    None,
                ),
                None,
            );
        }
    };
    let parsed: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            let why = format!("not JSON: {e}");
            ctx.refused(&what, &why).await;
            return json_answer(
                StatusCode::BAD_REQUEST,
                &jsonrpc::error(
                    &Value::Null,
                    jsonrpc::PARSE_ERROR,
                    &format!("portcullis refused the request: {why}"),
                    None,
                ),
                None,
            );
        }
    };
    let (batch, elems) = match parsed {
        Value::Array(a) if !a.is_empty() => (true, a),
        Value::Object(_) => (false, vec![parsed]),
        _ => {
            let why = "a JSON-RPC message must be an object or a non-empty array";
            ctx.refused(&what, why).await;
            return json_answer(
                StatusCode::BAD_REQUEST,
                &jsonrpc::error(&Value::Null, jsonrpc::INVALID_REQUEST, why, None),
                None,
            );
        }
    };
    // The 2026-07-28 revision repeats the method (and tool or resource) in
    // headers servers may route on: they must say what the body says.
    if let Err(why) = check_routing_headers(&parts.headers, batch, &elems) {
        ctx.refused(&what, &why).await;
        let id = elems
            .first()
            .and_then(|e| e.get("id"))
            .cloned()
            .unwrap_or(Value::Null);
        return json_answer(
            StatusCode::BAD_REQUEST,
            &jsonrpc::error(&id, jsonrpc::INVALID_REQUEST, &why, None),
            None,
        );
    }
    let modern = ctx.modern
        || elems.iter().any(|e| {
            e.pointer("/params/_meta/io.modelcontextprotocol~1protocolVersion")
                .is_some()
        });
    let legacy = legacy_session(ctx, pq);
    if legacy.is_some() || batch {
        // HTTP+SSE answers on its own stream; a batch has no one token.
        notice = None;
    }
    let mut forward = Vec::new();
    let mut locals = Vec::new();
    let mut allowed = Vec::new();
    for e in elems {
        let (id, method) = match jsonrpc::kind(&e) {
            Err(err) => {
                recording::record(&ctx.flow, from::AGENT, &e, None, Some(deny(&[])));
                ctx.refused(&what, &format!("invalid JSON-RPC message: {err}"))
                    .await;
                locals.push(jsonrpc::error(
                    &err.id,
                    jsonrpc::INVALID_REQUEST,
                    &format!("portcullis refused the message: {err}"),
                    None,
                ));
                continue;
            }
            Ok(Kind::Notification { .. } | Kind::Response { .. }) => {
                recording::record(&ctx.flow, from::AGENT, &e, None, None);
                forward.push(e);
                continue;
            }
            Ok(Kind::Request { id, method }) => (id, method),
        };
        let params = jsonrpc::params(&e);
        let class = classify::request(&ctx.flow.resource, &method, &params);
        if matches!(class, Class::Pass) {
            recording::record(&ctx.flow, from::AGENT, &e, None, None);
        } else if matches!(class, Class::Unknown | Class::Invalid(_)) {
            recording::record(&ctx.flow, from::AGENT, &e, None, Some(deny(&[])));
        }
        match class {
            Class::Pass => forward.push(e),
            Class::Unknown => {
                let why = format!("method {method:?} is not one portcullis can decide");
                ctx.refused(&method, &why).await;
                locals.push(jsonrpc::error(
                    &id,
                    jsonrpc::METHOD_NOT_FOUND,
                    &format!("portcullis refused the request: {why}"),
                    None,
                ));
            }
            Class::Invalid(why) => {
                ctx.refused(&method, &why).await;
                locals.push(jsonrpc::error(
                    &id,
                    jsonrpc::INVALID_PARAMS,
                    &format!("portcullis refused the request: {why}"),
                    None,
                ));
            }
            Class::Decide(d) => match decide(
                ctx,
                &d,
                &method,
                e.pointer("/params/_meta/progressToken")
                    .cloned()
                    .and_then(|t| notice.take().map(|n| (t, n))),
            )
            .await
            {
                Ok(a) => {
                    recording::record(&ctx.flow, from::AGENT, &e, None, Some(a.verdict()));
                    allowed.push((id, a));
                    forward.push(e);
                }
                Err(denied) => {
                    recording::record(
                        &ctx.flow,
                        from::AGENT,
                        &e,
                        None,
                        Some(deny(&denied.policies)),
                    );
                    locals.push(refusal(&id, &d, &denied, modern))
                }
            },
        }
    }
    for l in &locals {
        recording::record(&ctx.flow, from::PORTCULLIS, l, None, None);
    }
    if let Some((_, tx)) = &legacy {
        // HTTP+SSE: answers travel on the session's stream.
        for l in locals.drain(..) {
            let _ = tx.send(l).await;
        }
    }
    if forward.is_empty() {
        if legacy.is_some() {
            let mut r = Response::new(reply::full("Accepted"));
            *r.status_mut() = StatusCode::ACCEPTED;
            return r;
        }
        let body = if batch {
            Value::Array(locals)
        } else {
            locals.pop().unwrap_or(Value::Null)
        };
        return json_answer(StatusCode::OK, &body, None);
    }
    let out = if batch {
        Value::Array(forward)
    } else {
        forward.pop().unwrap_or(Value::Null)
    };
    let mut headers = parts.headers;
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let sent = ctx
        .send(Method::POST, pq, headers, reply::full(out.to_string()))
        .await;
    let status = sent.as_ref().map(|r| r.status().as_u16()).unwrap_or(502);
    // A call answered on this response ends when its answer is filtered
    // (with the answer's masking counts); others end now.
    let answered_here = legacy.is_none()
        && sent
            .as_ref()
            .is_ok_and(|r| is_event_stream(r.headers()) || is_json(r.headers()));
    for (id, mut a) in allowed {
        a.status = status;
        if answered_here && !id.is_null() {
            ctx.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id_key(&id), a);
        } else {
            a.finish(ctx, sent.as_ref().err().cloned(), None).await;
        }
    }
    let r = match sent {
        Ok(r) => r,
        Err(e) => return bad_gateway(&e),
    };
    if is_event_stream(r.headers()) {
        return relay(ctx.clone(), r, locals);
    }
    if is_json(r.headers()) {
        let resp = json_reply(ctx, r, locals, batch).await;
        ctx.finish_unanswered().await;
        return resp;
    }
    if !locals.is_empty() && r.status() == StatusCode::ACCEPTED {
        // Only notifications went on: the refusals are the answer.
        let body = if batch {
            Value::Array(locals)
        } else {
            locals.pop().unwrap_or(Value::Null)
        };
        return json_answer(StatusCode::OK, &body, None);
    }
    pass_through(r)
}

fn check_routing_headers(h: &HeaderMap, batch: bool, elems: &[Value]) -> Result<(), String> {
    let header = |k: &str| {
        h.get(k)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let (m, n) = (header("mcp-method"), header("mcp-name"));
    if m.is_none() && n.is_none() {
        return Ok(());
    }
    if batch {
        return Err("Mcp-Method / Mcp-Name headers cannot describe a batch".into());
    }
    let e = &elems[0];
    let method = e.get("method").and_then(Value::as_str);
    if let Some(m) = &m {
        if method != Some(m.as_str()) {
            return Err(format!(
                "the Mcp-Method header ({m}) does not match the body's method ({})",
                method.unwrap_or("none")
            ));
        }
    }
    if let Some(n) = &n {
        let p = e.get("params");
        let named = p
            .and_then(|p| p.get("name").or_else(|| p.get("uri")))
            .and_then(Value::as_str);
        if named != Some(n.as_str()) {
            return Err(format!(
                "the Mcp-Name header ({n}) does not match the body ({})",
                named.unwrap_or("none")
            ));
        }
    }
    Ok(())
}

/// Decides one request through the gate, waiting for a human on a hold.
async fn decide(
    ctx: &Arc<Ctx>,
    d: &Decide,
    method: &str,
    notice: Option<(Value, HoldNotice)>,
) -> Result<Allowed, Denied> {
    // A tool whose definition changed is held until an operator accepts it.
    if let Some(tool) = &d.tool {
        let store = tool_store(&ctx.shared.cfg.state_dir);
        let pending = store.pending(&ctx.flow.info.resource, tool);
        let why = match pending {
            Ok(None) => None,
            Ok(Some(p)) => Some(format!(
                "the definition of tool `{tool}` changed ({}); it is held until an operator runs `portcullis mcp accept {} {tool}`",
                p.fingerprint, ctx.flow.info.resource
            )),
            Err(e) => Some(format!("the tool store cannot be read: {e}")),
        };
        if let Some(why) = why {
            let cmd = ctx.command(d, method);
            ctx.refused(&cmd.text, &why).await;
            return Err(Denied {
                reason: why,
                policies: Vec::new(),
                request: None,
            });
        }
    }
    let cmd = ctx.command(d, method);
    let gate = gate::check(&ctx.shared, &ctx.flow, &cmd).await;
    let allowed = match gate {
        Gate::Allowed(a) => a,
        Gate::Denied(d) => return Err(d),
        Gate::Held(h) => {
            let id = h.request().id.clone();
            info!(session = %ctx.flow.info.session, request = %id, action = %cmd.action, "mcp request held for approval");
            if let Some((token, n)) = notice {
                let _ = n.send((token, id.clone()));
            }
            match h
                .wait(&ctx.shared, &ctx.flow, &cmd, std::future::pending())
                .await
            {
                Waited::Allowed(a) => a,
                Waited::Denied(d) => return Err(d),
                Waited::Abandoned => {
                    return Err(Denied {
                        reason: "the session ended while the request was held".into(),
                        policies: Vec::new(),
                        request: Some(id),
                    })
                }
            }
        }
    };
    Ok(Allowed {
        cmd,
        allowed,
        status: 0,
        tool: d.tool.clone(),
    })
}

/// The in-protocol refusal of a request: a tool error for a tool call (the
/// model reads it), a JSON-RPC error otherwise.
fn refusal(id: &Value, d: &Decide, denied: &Denied, modern: bool) -> Value {
    let mut text = format!("portcullis denied {}", d.action);
    if let Some(t) = &d.tool {
        text.push_str(&format!(" of tool `{t}`"));
    }
    text.push_str(&format!(": {}", denied.reason));
    if !denied.policies.is_empty() && !denied.reason.contains(&denied.policies.join(", ")) {
        text.push_str(&format!(" (rule {})", denied.policies.join(", ")));
    }
    if let Some(r) = &denied.request {
        if !denied.reason.contains(r.as_str()) {
            text.push_str(&format!(" (access request {r})"));
        }
    }
    if d.action == "mcp:call_tool" {
        jsonrpc::tool_error(id, &text, modern)
    } else {
        let mut data = json!({ "action": d.action, "policies": denied.policies });
        if let (Some(r), Some(o)) = (&denied.request, data.as_object_mut()) {
            o.insert("request".into(), json!(r));
        }
        jsonrpc::error(id, jsonrpc::DENIED, &text, Some(data))
    }
}

/// A JSON answer from the server: each message filtered, the refusals
/// merged in.
async fn json_reply(
    ctx: &Arc<Ctx>,
    r: Response<Incoming>,
    locals: Vec<Value>,
    batch: bool,
) -> Response<BoxBody> {
    let (mut parts, body) = r.into_parts();
    let bytes = match read_capped(body, MAX_RESPONSE_BODY).await {
        Ok(b) => b,
        Err(e) => return bad_gateway(&format!("the answer: {e}")),
    };
    let v: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return bad_gateway(&format!("the answer is not JSON: {e}")),
    };
    let msgs = match v {
        Value::Array(a) => a,
        other => vec![other],
    };
    let mut out = Vec::with_capacity(msgs.len() + locals.len());
    for m in msgs {
        if let Some(m) = ctx.filter_from_server(m).await {
            out.push(m);
        }
    }
    out.extend(locals);
    let body = if batch || out.len() > 1 {
        Value::Array(out)
    } else {
        out.pop().unwrap_or(Value::Null)
    };
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut resp = Response::from_parts(parts, reply::full(body.to_string()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Relays an event stream event by event: each JSON-RPC message is
/// filtered on its own and sent on at once; `prefix` (refusals) goes first.
fn relay(ctx: Arc<Ctx>, r: Response<Incoming>, prefix: Vec<Value>) -> Response<BoxBody> {
    let (mut parts, body) = r.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::CONTENT_LENGTH);
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut body = body;
        for v in prefix {
            let ev = sse::Event {
                event: "message".into(),
                data: v.to_string(),
                has_data: true,
                ..Default::default()
            };
            if tx.send(Bytes::from(ev.encode())).await.is_err() {
                return;
            }
        }
        let mut parser = sse::Parser::new(MAX_RESPONSE_BODY);
        let mut registered: Option<String> = None;
        let (inj_tx, mut inj_rx) = mpsc::channel::<Value>(64);
        let cancel = ctx.flow.cancel.clone();
        loop {
            let chunk = tokio::select! {
                f = body.frame() => f,
                Some(v) = inj_rx.recv() => {
                    let ev = sse::Event { event: "message".into(), data: v.to_string(), has_data: true, ..Default::default() };
                    if tx.send(Bytes::from(ev.encode())).await.is_err() { break; }
                    continue;
                }
                _ = cancel.cancelled() => break,
                _ = tx.closed() => break,
            };
            let data = match chunk {
                None => break,
                Some(Err(e)) => {
                    warn!(session = %ctx.flow.info.session, "mcp event stream from the server ended: {e}");
                    break;
                }
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
            };
            let events = match parser.feed(&data) {
                Ok(e) => e,
                Err(e) => {
                    warn!(session = %ctx.flow.info.session, "mcp event stream: {e}; closed");
                    break;
                }
            };
            for mut ev in events {
                if ev.event == "endpoint" {
                    // HTTP+SSE: where this session's POSTs go.
                    let path = ev.data.trim().to_string();
                    *ctx.reply_path.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.clone());
                    let sid = path.split_once('?').and_then(|(_, q)| {
                        super::http::target::query_pairs(q)
                            .ok()?
                            .into_iter()
                            .find(|(k, _)| k == "session_id" || k == "sessionId")
                            .map(|(_, v)| v)
                    });
                    if let Some(sid) = sid {
                        let key = legacy_key(&ctx.flow, &sid);
                        legacy_streams()
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(key.clone(), inj_tx.clone());
                        registered = Some(key);
                    }
                } else if ev.has_data
                    && (ev.event.is_empty() || ev.event == "message")
                    && !ev.data.trim().is_empty()
                {
                    match serde_json::from_str::<Value>(&ev.data) {
                        Ok(Value::Array(a)) => {
                            let mut kept = Vec::new();
                            for m in a {
                                if let Some(m) = ctx.filter_from_server(m).await {
                                    kept.push(m);
                                }
                            }
                            if kept.is_empty() {
                                continue;
                            }
                            ev.data = Value::Array(kept).to_string();
                        }
                        Ok(m) => match ctx.filter_from_server(m).await {
                            Some(m) => ev.data = m.to_string(),
                            None => continue,
                        },
                        Err(e) => {
                            warn!(session = %ctx.flow.info.session, "mcp event is not JSON ({e}); dropped");
                            continue;
                        }
                    }
                }
                if tx.send(Bytes::from(ev.encode())).await.is_err() {
                    break;
                }
            }
        }
        ctx.finish_unanswered().await;
        if let Some(key) = registered {
            legacy_streams()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
    });
    Response::from_parts(parts, ChannelBody { rx }.boxed_unsync())
}
