//! The `postgres` protocol handler: terminates the agent's PostgreSQL
//! connection (SSLRequest answered `N`, or with `ssl = "on"` answered `S`
//! and TLS terminated with a leaf from the daemon CA for the agent's SNI or
//! the dialed IP; GSSENCRequest refused, protocol 3.0,
//! a newer 3.x minor negotiated down), logs into the upstream with the held
//! credential, decides every statement through [`crate::proxy::gate`] with
//! PostgreSQL's own parser, masks result rows as they stream and routes
//! CancelRequests to the real backend.
//!
//! Owns the PostgreSQL wire protocol on both legs and the daemon-wide map
//! of cancel keys. It must not decide anything itself (the gate and Cedar
//! do) nor write audit records other than its own refusals.

mod analyses;
mod backend;
pub mod catalog;
pub mod classify;
pub mod codec;
mod copyout;
pub mod encoding;
mod frontend;
mod functions;
pub mod maskcheck;
pub mod pgmsg;
pub mod rows;
mod session;
mod shapes;
pub mod upstream;

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, LazyLock, Mutex},
    time::Duration,
};

use bytes::{BufMut, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::either::Either;
use tracing::{info, warn};

use self::{
    codec::{put_error, put_msg, Startup},
    session::Agent,
};
use super::{http::tls, Flow, SessionSummary};
use crate::daemon::Shared;

/// How long an agent may take to send its startup packet.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a cancel key the agent was given really points.
#[derive(Debug, Clone)]
struct CancelTarget {
    identity: String,
    upstream: SocketAddr,
    pid: u32,
    secret: Vec<u8>,
}

/// A cancel key as the agent saw it: (process id, secret).
type KeyId = (u32, Vec<u8>);

/// Agent-visible key → the real backend. Daemon-wide, because a
/// CancelRequest arrives on a new connection.
static CANCEL_KEYS: LazyLock<Mutex<HashMap<KeyId, CancelTarget>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Removes a session's cancel key when the session ends.
struct CancelKey(KeyId);

impl Drop for CancelKey {
    fn drop(&mut self) {
        CANCEL_KEYS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

fn register_cancel(target: CancelTarget) -> Option<CancelKey> {
    let mut raw = [0u8; 8];
    aws_lc_rs::rand::fill(&mut raw).ok()?;
    let pid = u32::from_be_bytes([raw[0] & 0x7f, raw[1], raw[2], raw[3]]).max(1);
    let key = (pid, raw[4..8].to_vec());
    CANCEL_KEYS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key.clone(), target);
    Some(CancelKey(key))
}

/// Serves one agent connection to a postgres resource.
pub async fn serve(shared: &Arc<Shared>, flow: Flow, tcp: TcpStream) -> io::Result<SessionSummary> {
    let _ = tcp.set_nodelay(true);
    let summary = |reason: &'static str| SessionSummary {
        end_reason: reason,
        ..Default::default()
    };
    let mut client: Agent = match direct_tls(shared, &flow, tcp).await {
        Ok(c) => c,
        Err(reason) => return Ok(summary(reason)),
    };
    let mut buf = BytesMut::with_capacity(1024);
    // Startup: SSL/GSS requests may come first, then the real startup.
    let (version, params) = loop {
        let next = tokio::time::timeout(STARTUP_TIMEOUT, async {
            loop {
                match codec::decode_startup(&mut buf) {
                    Ok(Some(s)) => return Ok(s),
                    Ok(None) => {}
                    Err(e) => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
                    }
                }
                if client.read_buf(&mut buf).await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed during startup",
                    ));
                }
            }
        })
        .await;
        let startup = match next {
            Ok(Ok(s)) => s,
            Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                warn!(session = %flow.info.session, "malformed startup packet: {e}");
                fatal(
                    &mut client,
                    "08P01",
                    &format!("invalid startup packet: {e}"),
                )
                .await;
                return Ok(summary("malformed startup packet"));
            }
            Ok(Err(_)) => return Ok(summary("closed during startup")),
            Err(_) => return Ok(summary("startup timed out")),
        };
        match startup {
            Startup::Ssl | Startup::GssEnc if !buf.is_empty() => {
                // Bytes after an SSLRequest before our answer: a
                // buffer-stuffing attempt (CVE-2021-23214 class); with TLS
                // they would be read as if they came through it.
                fatal(&mut client, "08P01", "unexpected data after SSLRequest").await;
                return Ok(summary("data after SSLRequest"));
            }
            Startup::Ssl if matches!(client, Either::Right(_)) => {
                // A server refuses a second negotiation too.
                fatal(&mut client, "08P01", "SSLRequest inside TLS").await;
                return Ok(summary("SSLRequest inside TLS"));
            }
            Startup::Ssl if flow.resource.postgres.agent_ssl => {
                client.write_all(b"S").await?;
                let Either::Left(tcp) = client else {
                    return Ok(summary("SSLRequest inside TLS"));
                };
                let dst = flow.info.original_dst.ip();
                match tls::intercept(&shared.ca, tcp, dst, tls::ALPN_POSTGRES).await {
                    Ok((stream, sni)) => {
                        info!(session = %flow.info.session, sni = ?sni, "agent TLS established");
                        client = Either::Right(Box::new(stream));
                    }
                    Err(e) => {
                        // No PostgreSQL error can reach the agent now: the
                        // TLS state is broken. The log says why.
                        warn!(session = %flow.info.session, "agent TLS handshake failed: {e}");
                        return Ok(summary("agent TLS handshake failed"));
                    }
                }
            }
            // `ssl = "off"` (and GSSAPI encryption, never offered): the
            // agent continues in plain text, or fails if it insists
            // (sslmode=require).
            Startup::Ssl | Startup::GssEnc => client.write_all(b"N").await?,
            Startup::Cancel { pid, secret } => {
                cancel(shared, &flow, pid, secret).await;
                // Over TLS the connection ends with close_notify, as
                // PostgreSQL's does: libpq 18 (`PQcancelBlocking`) reports
                // an error for a TLS connection cut without it.
                close(&mut client).await;
                return Ok(summary("cancel request"));
            }
            Startup::Params { version, params } => break (version, params),
        }
    };
    if version >> 16 != 3 {
        fatal(
            &mut client,
            "0A000",
            &format!(
                "unsupported frontend protocol {}.{}",
                version >> 16,
                version & 0xffff
            ),
        )
        .await;
        return Ok(summary("unsupported protocol version"));
    }
    if params
        .iter()
        .any(|(k, v)| k == "replication" && v != "false" && v != "0" && v != "off")
    {
        fatal(
            &mut client,
            "42501",
            "permission denied by Portcullis: replication connections are not allowed",
        )
        .await;
        return Ok(summary("replication refused"));
    }
    if let Err(why) = encoding::check_startup(&params) {
        warn!(session = %flow.info.session, "startup refused: {why}");
        let ev = flow
            .audit_event("postgres_startup")
            .decision("deny")
            .reason(why.to_string());
        let _ = shared.audit(ev).await;
        fatal(&mut client, "22023", &format!("Portcullis: {why}")).await;
        return Ok(summary("client encoding refused"));
    }
    if flow.resource.postgres.agent_token {
        if let Err(why) = check_agent_token(shared, &flow, &mut client, &mut buf).await {
            warn!(session = %flow.info.session, "agent authentication refused: {why}");
            let ev = flow
                .audit_event("agent_auth")
                .decision("deny")
                .reason(why.clone());
            let _ = shared.audit(ev).await;
            fatal(
                &mut client,
                "28P01",
                &format!("password authentication failed for Portcullis: {why}"),
            )
            .await;
            return Ok(summary("agent token refused"));
        }
    }
    let upstream_params = upstream::startup_params(&flow.resource, &params);
    let up = match upstream::login(&flow, &upstream_params).await {
        Ok(u) => u,
        Err(e) => {
            warn!(session = %flow.info.session, "upstream login failed: {e}");
            let code = match &e {
                upstream::UpstreamError::Server { code, .. } => code.clone(),
                _ => "08006".to_string(),
            };
            fatal(
                &mut client,
                &code,
                &format!("Portcullis could not log into the server: {e}"),
            )
            .await;
            return Ok(summary("upstream login failed"));
        }
    };
    if let Some((_, v)) = up
        .params
        .iter()
        .find(|(k, v)| encoding::is_client_encoding_key(k) && !encoding::is_utf8(v))
    {
        // The startup packet pinned UTF8; a server that reports otherwise
        // would not read statements as they are decided.
        let why = format!("the server reports client_encoding {v:?}, not UTF8");
        warn!(session = %flow.info.session, "{why}");
        let ev = flow
            .audit_event("postgres_encoding")
            .decision("deny")
            .reason(why.clone());
        let _ = shared.audit(ev).await;
        fatal(&mut client, "08P01", &format!("Portcullis: {why}")).await;
        return Ok(summary("server client_encoding not UTF8"));
    }
    let mut hello = BytesMut::new();
    let unknown: Vec<&str> = params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("_pq_."))
        .collect();
    if version & 0xffff != 0 || !unknown.is_empty() {
        codec::put_negotiate_protocol_version(&mut hello, &unknown);
    }
    put_msg(&mut hello, b'R', |b| b.put_i32(0));
    for (k, v) in &up.params {
        put_msg(&mut hello, b'S', |b| {
            codec::put_cstr(b, k);
            codec::put_cstr(b, v);
        });
    }
    let upstream_addr = flow.upstream_addr().await?;
    let cancel_key = up.key.as_ref().and_then(|(pid, secret)| {
        register_cancel(CancelTarget {
            identity: flow.info.identity.clone(),
            upstream: upstream_addr,
            pid: *pid,
            secret: secret.clone(),
        })
    });
    if let Some(k) = &cancel_key {
        put_msg(&mut hello, b'K', |b| {
            b.put_u32(k.0 .0);
            b.extend_from_slice(&k.0 .1);
        });
    }
    codec::put_ready(&mut hello, up.status);
    client.write_all(&hello).await?;
    client.flush().await?;
    info!(
        session = %flow.info.session,
        user = %upstream_params.first().map(|p| p.1.as_str()).unwrap_or_default(),
        "postgres session logged in upstream"
    );
    let get = |k: &str| {
        upstream_params
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let (user, database) = (get("user"), get("database"));
    let pool = match catalog::Pool::get(&flow, &user, &database).await {
        Ok(p) => Some(p),
        Err(e) => {
            warn!(session = %flow.info.session, "no catalog pool (routines count as having side effects, masked statements are refused): {e}");
            None
        }
    };
    let ctx = session::SessionCtx {
        user,
        database,
        changes: catalog::SessionChanges::new(pool),
    };
    let out = session::run(shared, &flow, client, up, ctx).await;
    drop(cancel_key);
    out
}

/// The first byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// PostgreSQL 17's direct TLS (`sslnegotiation=direct`): the agent starts
/// TLS at once, without an SSLRequest. Peeks at the first byte; a
/// ClientHello on a resource with `ssl = "on"` is answered with the
/// daemon's leaf and must negotiate ALPN `postgresql` (as PostgreSQL
/// requires, so a TLS connection meant for another protocol is never read
/// as PostgreSQL). Anything else comes back as the plain connection, for
/// the SSLRequest/startup exchange. `Err` is why the connection ends.
async fn direct_tls(
    shared: &Arc<Shared>,
    flow: &Flow,
    tcp: TcpStream,
) -> Result<Agent, &'static str> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(STARTUP_TIMEOUT, tcp.peek(&mut first)).await {
        Err(_) => return Err("startup timed out"),
        Ok(Ok(0)) | Ok(Err(_)) => return Err("closed during startup"),
        Ok(Ok(_)) if first[0] != TLS_HANDSHAKE => return Ok(Either::Left(tcp)),
        Ok(Ok(_)) => {}
    }
    if !flow.resource.postgres.agent_ssl {
        // Nothing the agent can read: it sent a ClientHello, and a
        // PostgreSQL error is not a TLS record.
        warn!(session = %flow.info.session, "direct TLS refused: the resource has ssl = \"off\"");
        return Err("direct TLS refused (ssl off)");
    }
    let dst = flow.info.original_dst.ip();
    let (stream, sni) = match tls::intercept(&shared.ca, tcp, dst, tls::ALPN_POSTGRES).await {
        Ok(s) => s,
        Err(e) => {
            warn!(session = %flow.info.session, "agent direct TLS handshake failed: {e}");
            return Err("agent TLS handshake failed");
        }
    };
    let mut client: Agent = Either::Right(Box::new(stream));
    let alpn = match &client {
        Either::Right(s) => s.get_ref().1.alpn_protocol() == Some(b"postgresql".as_slice()),
        Either::Left(_) => false,
    };
    if !alpn {
        warn!(session = %flow.info.session, "direct TLS without ALPN postgresql refused");
        fatal(
            &mut client,
            "08P01",
            "received direct SSL connection request without ALPN protocol negotiation extension",
        )
        .await;
        return Err("direct TLS without ALPN");
    }
    info!(session = %flow.info.session, sni = ?sni, "agent direct TLS established");
    Ok(client)
}

/// Ends the agent's connection in order: TLS close_notify, then FIN.
async fn close<W: AsyncWrite + Unpin>(client: &mut W) {
    let _ = tokio::time::timeout(STARTUP_TIMEOUT, client.shutdown()).await;
}

/// Sends a FATAL ErrorResponse and lets the connection close.
/// `agent_auth = "token"`: asks the agent for a cleartext password (over
/// TLS when `ssl = "on"`) and requires it to be a valid OIDC token of the
/// identity the flow's tag proves. The token only proves the agent; the
/// server still sees the daemon's credential.
async fn check_agent_token(
    shared: &Arc<Shared>,
    flow: &Flow,
    client: &mut Agent,
    buf: &mut BytesMut,
) -> Result<(), String> {
    let mut ask = BytesMut::new();
    // AuthenticationCleartextPassword.
    put_msg(&mut ask, b'R', |b| b.put_i32(3));
    client
        .write_all(&ask)
        .await
        .map_err(|e| format!("cannot ask for the token: {e}"))?;
    let _ = client.flush().await;
    let body = tokio::time::timeout(STARTUP_TIMEOUT, async {
        loop {
            // A token is a few KiB; anything near the cap is not one.
            match codec::peek_frame(buf, 64 * 1024) {
                Ok(Some(head)) => {
                    let frame = buf.split_to(head.total);
                    if head.tag != b'p' {
                        return Err("expected a password message".to_string());
                    }
                    return Ok(frame.get(5..).unwrap_or_default().to_vec());
                }
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            match client.read_buf(buf).await {
                Ok(0) => return Err("closed during authentication".to_string()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no password message in time".to_string())??;
    let token = body
        .strip_suffix(&[0])
        .and_then(|t| std::str::from_utf8(t).ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or("the password must be the agent's OIDC token")?;
    let policy = shared.policy.load();
    shared
        .identities
        .validate_token(&policy, &flow.info.identity, token)
        .await
        .map_err(|e| {
            format!(
                "the password is not a valid OIDC token for {}: {e}",
                flow.info.identity
            )
        })
}

async fn fatal<W: AsyncWrite + Unpin>(client: &mut W, code: &str, message: &str) {
    let mut b = BytesMut::new();
    put_error(&mut b, b'E', "FATAL", code, message);
    let _ = client.write_all(&b).await;
    let _ = client.flush().await;
    let _ = client.shutdown().await;
}

/// Refuses a new connection while the daemon is over its memory budget:
/// answers an SSLRequest as a session would (`S` and TLS with `ssl =
/// "on"`, else `N`) so libpq reads the error, then sends FATAL 53200 after
/// the startup packet. The caller bounds the time this takes.
pub async fn shed(shared: &Arc<Shared>, flow: &Flow, tcp: TcpStream, message: &str) {
    let Ok(mut client) = direct_tls(shared, flow, tcp).await else {
        return;
    };
    let mut buf = BytesMut::with_capacity(512);
    // At most an SSLRequest, a GSSENCRequest and the startup packet.
    for _ in 0..3 {
        let startup = loop {
            match codec::decode_startup(&mut buf) {
                Ok(Some(s)) => break Some(s),
                Ok(None) => {}
                Err(_) => break None,
            }
            match client.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        match startup {
            Some(Startup::Ssl)
                if flow.resource.postgres.agent_ssl
                    && buf.is_empty()
                    && matches!(client, Either::Left(_)) =>
            {
                if client.write_all(b"S").await.is_err() {
                    return;
                }
                let Either::Left(tcp) = client else {
                    return;
                };
                let dst = flow.info.original_dst.ip();
                match tls::intercept(&shared.ca, tcp, dst, tls::ALPN_POSTGRES).await {
                    Ok((stream, _)) => client = Either::Right(Box::new(stream)),
                    Err(_) => return,
                }
            }
            Some(Startup::Ssl | Startup::GssEnc) if buf.is_empty() => {
                if client.write_all(b"N").await.is_err() {
                    return;
                }
            }
            // A CancelRequest gets no answer, as from PostgreSQL.
            Some(Startup::Cancel { .. }) => {
                close(&mut client).await;
                return;
            }
            _ => break,
        }
    }
    fatal(&mut client, "53200", message).await;
}

/// Forwards a CancelRequest to the real backend when the key is one this
/// daemon handed out to the same identity. PostgreSQL never answers a
/// cancel, and neither does this.
async fn cancel(shared: &Arc<Shared>, flow: &Flow, pid: u32, secret: Vec<u8>) {
    let target = CANCEL_KEYS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(pid, secret))
        .cloned();
    let ev = flow.audit_event("postgres_cancel");
    let Some(t) = target.filter(|t| t.identity == flow.info.identity) else {
        warn!(session = %flow.info.session, "cancel request with an unknown key ignored");
        let _ = shared
            .audit(ev.decision("deny").reason("unknown cancel key"))
            .await;
        return;
    };
    let _ = shared
        .audit(ev.decision("allow").detail("backend_pid", t.pid))
        .await;
    let mut pkt = BytesMut::new();
    pkt.put_i32(12 + t.secret.len() as i32);
    pkt.put_u32(codec::CANCEL_REQUEST);
    pkt.put_u32(t.pid);
    pkt.extend_from_slice(&t.secret);
    match tokio::time::timeout(
        super::UPSTREAM_CONNECT_TIMEOUT,
        TcpStream::connect(t.upstream),
    )
    .await
    {
        Ok(Ok(mut s)) => {
            let _ = s.write_all(&pkt).await;
            let _ = s.shutdown().await;
            info!(session = %flow.info.session, backend_pid = t.pid, "cancel request forwarded");
        }
        _ => warn!(session = %flow.info.session, "cancel request: upstream unreachable"),
    }
}
