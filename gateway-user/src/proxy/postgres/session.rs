//! The PostgreSQL session after login: the agent→server half decides every
//! statement (simple query, Parse, FunctionCall) and keeps track of
//! prepared statements and portals; the server→agent half relays responses,
//! masks rows, turns a denial marker's error into the denial, and writes
//! each statement's completion record.
//!
//! Denials keep the connection exactly as consistent as a server error
//! would: the denied message is replaced upstream by a statement that is
//! sure to fail (`SELECT <marker column>`), so the server itself puts the
//! transaction into the failed state, skips the rest of an extended
//! pipeline up to Sync and sends the right ReadyForQuery status; the
//! marker's ErrorResponse is rewritten into SQLSTATE 42501 naming the rule.
//!
//! Owns the per-session protocol state; it must not touch other sessions.

use std::{
    collections::{HashMap, VecDeque},
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json, Map, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
    sync::Mutex as AsyncMutex,
};
use tracing::warn;

use super::{
    classify::{self, Classified},
    codec::{self, put_cstr, put_error, put_msg, Frontend, Reader, MAX_FRAME},
    rows::{self, RowPlan},
    upstream::{self, Io, Upstream},
};
use crate::{
    daemon::Shared,
    mask::{Counts, Masker},
    policy::{Decision, DecisionRequest},
    proxy::{
        gate::{self, Allowed, Command, Gate, Waited},
        Flow, SessionSummary,
    },
    record::PgStatementRecord,
};

/// Flush to the agent once this much is buffered (bounded memory, and rows
/// reach a slow agent while a large result is still streaming).
const FLUSH_AT: usize = 64 * 1024;
/// Longest bound parameter kept for audit and recording.
const PARAM_MAX: usize = 4096;
/// Result rows kept per statement for a `record = "full"` recording (the
/// recorder caps rows and bytes further).
const RECORD_ROWS: usize = 100;
/// How long the server's last answers may take once the agent is done.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Who the session is upstream (Cedar context `user`, `database`).
pub(super) struct SessionCtx {
    /// The held user.
    pub user: String,
    /// The database logged into.
    pub database: String,
    /// The upstream startup parameters (for the catalog side connection).
    pub params: Vec<(String, String)>,
}

/// A decided statement: its command and the gate's allow.
#[derive(Debug)]
struct Approved {
    cmd: Command,
    allowed: Allowed,
}

/// A statement prepared through Parse.
#[derive(Debug)]
struct Prepared {
    class: &'static str,
    text: String,
    approved: Option<Arc<Approved>>,
    /// Parameter type OIDs from Parse (0: unspecified).
    param_types: Vec<u32>,
}

/// A bound portal.
#[derive(Debug)]
struct Portal {
    stmt: Arc<Prepared>,
    params: Vec<Option<String>>,
}

/// One statement execution whose results are on their way.
#[derive(Debug)]
struct Run {
    approved: Option<Arc<Approved>>,
    class: &'static str,
    text: String,
    params: Vec<Option<String>>,
    masker: Option<Arc<Masker>>,
    started: Instant,
}

/// What the server will answer, in order (pushed before the message goes
/// upstream, popped as the answers come back).
#[derive(Debug)]
enum Expect {
    /// A Describe: its RowDescription/NoData; `swallow` when the proxy
    /// injected it to learn the columns before an Execute.
    Describe { swallow: bool },
    /// A statement's results up to CommandComplete (or an error).
    Run(Box<Run>),
    /// A denied message replaced by the marker: its error is the denial.
    Denial(String),
    /// Sync / simple Query end: ReadyForQuery.
    Sync,
}

type Pipe = Arc<Mutex<VecDeque<Expect>>>;
type ClientW = Arc<AsyncMutex<OwnedWriteHalf>>;

fn lock(p: &Pipe) -> std::sync::MutexGuard<'_, VecDeque<Expect>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the session until either side closes, a protocol error, or the
/// daemon ends it.
pub(super) async fn run(
    shared: &Arc<Shared>,
    flow: &Flow,
    client: TcpStream,
    up: Upstream,
    ctx: SessionCtx,
) -> io::Result<SessionSummary> {
    let mut raw = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut raw);
    let marker = format!("pcx_denied_{}", hex::encode(raw));
    let (crd, cwr) = client.into_split();
    let cw: ClientW = Arc::new(AsyncMutex::new(cwr));
    let (urd, uwr) = tokio::io::split(up.io);
    let pipe: Pipe = Arc::new(Mutex::new(VecDeque::new()));
    let from_client = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);
    let mut front = Front {
        shared,
        flow,
        ctx: &ctx,
        up: uwr,
        up_out: BytesMut::with_capacity(8192),
        pipe: pipe.clone(),
        cw: cw.clone(),
        marker: &marker,
        statements: HashMap::new(),
        portals: HashMap::new(),
        skip_until_sync: false,
    };
    let mut back = Back {
        shared,
        flow,
        ctx: &ctx,
        pipe,
        cw: cw.clone(),
        marker: &marker,
        plan: None,
        layout_known: false,
        columns: None,
        tables: HashMap::new(),
        side: None,
        scratch: Vec::new(),
        rows_seen: 0,
        by_column: Counts::default(),
        by_detector: Counts::default(),
        copy_mask: None,
        done: Vec::new(),
        record_rows: flow.resource.record == crate::policy::RecordMode::Full,
        result_rows: Vec::new(),
    };
    let mut front_run = Box::pin(front.run(crd, &from_client));
    let mut back_run = Box::pin(back.run(urd, up.buf, &to_client));
    let mut ended_by_daemon = false;
    let reason = tokio::select! {
        r = &mut front_run => {
            // The agent is done (its Terminate or end of stream went
            // upstream): let the server's last answers and the completion
            // records land, bounded.
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, &mut back_run).await;
            r
        }
        r = &mut back_run => r,
        _ = flow.cancel.cancelled() => {
            ended_by_daemon = true;
            Ok("ended by the daemon")
        }
    };
    // Dropping both halves releases the agent's writer, whichever was
    // suspended holding it.
    drop(front_run);
    drop(back_run);
    let mut w = cw.lock().await;
    if ended_by_daemon {
        let mut b = BytesMut::new();
        put_error(
            &mut b,
            b'E',
            "FATAL",
            "57P01",
            "terminating connection: the session was ended by Portcullis",
        );
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, w.write_all(&b)).await;
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, w.shutdown()).await;
    drop(w);
    let summary = |end_reason| SessionSummary {
        bytes_from_client: from_client.load(Ordering::Relaxed),
        bytes_to_client: to_client.load(Ordering::Relaxed),
        end_reason,
    };
    match reason {
        Ok(r) => Ok(summary(r)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ) =>
        {
            Ok(summary("connection lost"))
        }
        Err(e) => Err(e),
    }
}

/// The agent→server half.
struct Front<'a> {
    shared: &'a Arc<Shared>,
    flow: &'a Flow,
    ctx: &'a SessionCtx,
    up: WriteHalf<Box<dyn Io>>,
    up_out: BytesMut,
    pipe: Pipe,
    cw: ClientW,
    marker: &'a str,
    statements: HashMap<String, Arc<Prepared>>,
    portals: HashMap<String, Portal>,
    skip_until_sync: bool,
}

/// Why a frontend message was refused.
enum Refusal {
    /// Denied (by policy, by the parser, by a human): the agent's message.
    Denied(String),
}

impl Front<'_> {
    async fn run(&mut self, rd: OwnedReadHalf, counter: &AtomicU64) -> io::Result<&'static str> {
        let r = self.relay(rd, counter).await;
        // However the agent left, the server gets a Terminate and an end of
        // stream, so the server half ends promptly.
        let mut x = BytesMut::new();
        put_msg(&mut x, b'X', |_| {});
        let _ = self.up.write_all(&x).await;
        let _ = self.up.shutdown().await;
        r
    }

    async fn relay(
        &mut self,
        mut rd: OwnedReadHalf,
        counter: &AtomicU64,
    ) -> io::Result<&'static str> {
        let mut buf = BytesMut::with_capacity(8192);
        loop {
            loop {
                let head = match codec::peek_frame(&buf, MAX_FRAME) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => {
                        self.fatal("08P01", &format!("invalid frontend message: {e}"))
                            .await;
                        return Ok("malformed frame from the agent");
                    }
                };
                let frame = buf.split_to(head.total).freeze();
                match self.message(head.tag, frame).await {
                    Ok(true) => {}
                    Ok(false) => {
                        self.flush().await?;
                        return Ok("closed by the agent");
                    }
                    Err(e) => {
                        self.fatal("08P01", &e).await;
                        return Ok("protocol violation by the agent");
                    }
                }
            }
            self.flush().await?;
            let n = rd.read_buf(&mut buf).await?;
            if n == 0 {
                return Ok("closed");
            }
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.up_out.is_empty() {
            self.up.write_all(&self.up_out).await?;
            self.up_out.clear();
        }
        Ok(())
    }

    async fn fatal(&mut self, code: &str, message: &str) {
        warn!(session = %self.flow.info.session, "{message}");
        let mut b = BytesMut::new();
        put_error(&mut b, b'E', "FATAL", code, message);
        let _ = self.cw.lock().await.write_all(&b).await;
    }

    async fn notice(&mut self, message: &str) {
        let mut b = BytesMut::new();
        put_error(&mut b, b'N', "NOTICE", "00000", message);
        let _ = self.cw.lock().await.write_all(&b).await;
    }

    fn push(&self, e: Expect) {
        lock(&self.pipe).push_back(e);
    }

    /// Handles one frontend message. `Ok(false)`: the agent said Terminate.
    async fn message(&mut self, tag: u8, frame: Bytes) -> Result<bool, String> {
        let body = frame.get(5..).unwrap_or_default();
        if self.skip_until_sync && tag != b'S' && tag != b'X' {
            // The server would discard these after the error; so do we.
            return Ok(true);
        }
        match codec::decode_frontend(tag, body).map_err(|e| e.to_string())? {
            Frontend::Query(sql) => {
                let masker = self.masker();
                match self.decide(sql, &masker).await {
                    Ok(list) => {
                        for (c, approved) in list {
                            self.push(Expect::Run(Box::new(Run {
                                approved,
                                class: c.class,
                                text: c.text,
                                params: Vec::new(),
                                masker: masker.clone(),
                                started: Instant::now(),
                            })));
                        }
                        self.push(Expect::Sync);
                        self.up_out.extend_from_slice(&frame);
                    }
                    Err(Refusal::Denied(reason)) => {
                        self.push(Expect::Denial(reason));
                        self.push(Expect::Sync);
                        codec::put_query(&mut self.up_out, &format!("SELECT {}", self.marker));
                    }
                }
            }
            Frontend::Parse {
                name,
                sql,
                param_types,
            } => {
                let masker = self.masker();
                match self.decide(sql, &masker).await {
                    Ok(list) => {
                        let (class, approved) = match list.as_slice() {
                            [] => ("empty", None),
                            // Several statements: every one was allowed; the
                            // server refuses them in a prepared statement.
                            [(c, a), ..] => (c.class, a.clone()),
                        };
                        self.statements.insert(
                            name.to_string(),
                            Arc::new(Prepared {
                                class,
                                text: sql.to_string(),
                                approved,
                                param_types,
                            }),
                        );
                        self.up_out.extend_from_slice(&frame);
                    }
                    Err(Refusal::Denied(reason)) => {
                        self.statements.remove(name);
                        self.push(Expect::Denial(reason));
                        put_msg(&mut self.up_out, b'P', |b| {
                            put_cstr(b, name);
                            put_cstr(b, &format!("SELECT {}", self.marker));
                            b.put_i16(0);
                        });
                        self.skip_until_sync = true;
                    }
                }
            }
            Frontend::Bind {
                portal,
                statement,
                formats,
                params,
            } => {
                match self.statements.get(statement) {
                    Some(p) => {
                        let text = params
                            .iter()
                            .enumerate()
                            .map(|(i, v)| {
                                let binary = match formats.len() {
                                    0 => false,
                                    1 => formats.first() == Some(&1),
                                    _ => formats.get(i) == Some(&1),
                                };
                                let oid = p.param_types.get(i).copied().unwrap_or(0);
                                v.map(|v| param_text(v, binary, oid))
                            })
                            .collect();
                        let portal_state = Portal {
                            stmt: p.clone(),
                            params: text,
                        };
                        self.portals.insert(portal.to_string(), portal_state);
                    }
                    None => {
                        self.portals.remove(portal);
                    }
                }
                self.up_out.extend_from_slice(&frame);
            }
            Frontend::Describe { .. } => {
                self.push(Expect::Describe { swallow: false });
                self.up_out.extend_from_slice(&frame);
            }
            Frontend::Execute { portal, .. } => {
                let masker = self.masker();
                if masker.is_some() {
                    // Learn the portal's columns and formats before its rows.
                    self.push(Expect::Describe { swallow: true });
                    put_msg(&mut self.up_out, b'D', |b| {
                        b.put_u8(b'P');
                        put_cstr(b, portal);
                    });
                }
                let run = match self.portals.get(portal) {
                    Some(p) => Run {
                        approved: p.stmt.approved.clone(),
                        class: p.stmt.class,
                        text: p.stmt.text.clone(),
                        params: p.params.clone(),
                        masker,
                        started: Instant::now(),
                    },
                    None => Run {
                        approved: None,
                        class: "other",
                        text: String::new(),
                        params: Vec::new(),
                        masker,
                        started: Instant::now(),
                    },
                };
                self.push(Expect::Run(Box::new(run)));
                self.up_out.extend_from_slice(&frame);
            }
            Frontend::Close { kind, name } => {
                if kind == b'S' {
                    self.statements.remove(name);
                } else {
                    self.portals.remove(name);
                }
                self.up_out.extend_from_slice(&frame);
            }
            Frontend::Sync => {
                self.skip_until_sync = false;
                self.push(Expect::Sync);
                self.up_out.extend_from_slice(&frame);
            }
            Frontend::Flush | Frontend::CopyData | Frontend::CopyDone | Frontend::CopyFail => {
                self.up_out.extend_from_slice(&frame)
            }
            Frontend::FunctionCall => {
                let reason =
                    "function calls over the FunctionCall message are not allowed".to_string();
                self.refusal("postgres:call", "<FunctionCall message>", &reason)
                    .await;
                self.push(Expect::Denial(reason));
                self.push(Expect::Sync);
                codec::put_query(&mut self.up_out, &format!("SELECT {}", self.marker));
            }
            Frontend::Terminate => {
                self.up_out.extend_from_slice(&frame);
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn masker(&self) -> Option<Arc<Masker>> {
        self.shared.policy.load().masker(&self.flow.info.resource)
    }

    fn command(&self, c: &Classified) -> Command {
        Command::new(self.flow, format!("postgres:{}", c.class), c.text.clone())
            .context("database", self.ctx.database.clone())
            .context("user", self.ctx.user.clone())
            .context("statement", c.context())
            .fingerprint(c.fingerprint.clone())
            .detail("normalized", c.normalized.clone())
    }

    /// Decides every statement of `sql`: all allowed, or the whole string
    /// refused. Holds are announced with a NoticeResponse and waited for.
    async fn decide(
        &mut self,
        sql: &str,
        masker: &Option<Arc<Masker>>,
    ) -> Result<Vec<(Classified, Option<Arc<Approved>>)>, Refusal> {
        let list = match classify::classify(sql) {
            Ok(l) => l,
            Err(e) => {
                let reason = e.to_string();
                self.refusal("postgres:other", sql, &reason).await;
                return Err(Refusal::Denied(reason));
            }
        };
        // First a dry run without side effects, so a batch with one
        // forbidden statement is refused before anything is held or
        // recorded as allowed.
        for c in &list {
            if c.class == "copy_out" && masker.as_ref().is_some_and(|m| m.has_columns()) {
                let reason = "COPY TO is refused on a resource with column masking rules (its columns cannot be inspected)".to_string();
                self.refusal("postgres:copy_out", &c.text, &reason).await;
                return Err(Refusal::Denied(reason));
            }
            // A single statement needs no dry run: the gate's own decision
            // below is the only one.
            if c.rollback || list.len() == 1 {
                continue;
            }
            let cmd = self.command(c);
            let decision = self.shared.policy.load().decide(&DecisionRequest {
                identity: &self.flow.info.identity,
                resource: &self.flow.info.resource,
                action: &cmd.action,
                context: Value::Object(cmd.context.clone()),
                approved: false,
            });
            if let Decision::Deny { .. } = decision {
                // The gate records it and words the reason.
                return Err(match gate::check(self.shared, self.flow, &cmd).await {
                    Gate::Denied(d) => {
                        self.record_denial(&cmd, &d.reason, &d.policies);
                        Refusal::Denied(d.reason)
                    }
                    _ => Refusal::Denied("the policy changed while deciding; retry".into()),
                });
            }
        }
        let mut out = Vec::with_capacity(list.len());
        let n = list.len();
        for c in list {
            let cmd = self.command(&c).detail("batch_size", n as u64);
            if c.rollback {
                // ROLLBACK only undoes: always allowed, still audited.
                let ev = self
                    .flow
                    .audit_event("command")
                    .action(cmd.action.clone())
                    .decision("allow")
                    .reason("rollback is always allowed")
                    .detail("command", cmd.text.clone());
                let seq = match self.shared.audit(ev).await {
                    Ok(s) => s,
                    Err(_) => return Err(Refusal::Denied(gate::AUDIT_UNAVAILABLE.into())),
                };
                let allowed = Allowed {
                    audit_seq: seq,
                    policies: Vec::new(),
                    approved_by: None,
                    grant: None,
                    at: Instant::now(),
                };
                out.push((c, Some(Arc::new(Approved { cmd, allowed }))));
                continue;
            }
            let waited = match gate::check(self.shared, self.flow, &cmd).await {
                Gate::Allowed(a) => Waited::Allowed(a),
                Gate::Denied(d) => Waited::Denied(d),
                Gate::Held(h) => {
                    let id = h.request().id.clone();
                    // Let what came before reach the server while we wait.
                    let _ = self.flush().await;
                    self.notice(&format!(
                        "Portcullis: this statement needs approval; access request {id} is waiting (approve with `portcullis approve {id}`)"
                    ))
                    .await;
                    h.wait(self.shared, self.flow, &cmd, std::future::pending())
                        .await
                }
            };
            match waited {
                Waited::Allowed(allowed) => {
                    out.push((c, Some(Arc::new(Approved { cmd, allowed }))))
                }
                Waited::Denied(d) => {
                    self.record_denial(&cmd, &d.reason, &d.policies);
                    return Err(Refusal::Denied(d.reason));
                }
                Waited::Abandoned => {
                    return Err(Refusal::Denied(
                        "the session was ended while the statement was held".into(),
                    ))
                }
            }
        }
        Ok(out)
    }

    fn record_denial(&self, cmd: &Command, reason: &str, policies: &[String]) {
        self.flow.recording.postgres_statement(PgStatementRecord {
            time_ms: crate::proxy::session::now_ms(),
            statement: cmd.text.clone(),
            action: cmd.action.trim_start_matches("postgres:").to_string(),
            decision: "deny".into(),
            reason: Some(reason.to_string()),
            policy_ids: policies.to_vec(),
            ..Default::default()
        });
    }

    /// Audits a refusal the handler makes itself (unparseable statement,
    /// FunctionCall, uninspectable COPY).
    async fn refusal(&self, action: &str, text: &str, reason: &str) {
        warn!(session = %self.flow.info.session, action, reason, "statement refused");
        self.shared
            .metrics
            .decision(&self.flow.info.resource, action, "deny");
        let ev = self
            .flow
            .audit_event("command")
            .action(action.to_string())
            .decision("deny")
            .reason(reason.to_string())
            .detail("command", text.to_string());
        let _ = self.shared.audit(ev).await;
        self.flow.recording.postgres_statement(PgStatementRecord {
            time_ms: crate::proxy::session::now_ms(),
            statement: text.to_string(),
            action: action.trim_start_matches("postgres:").to_string(),
            decision: "deny".into(),
            reason: Some(reason.to_string()),
            ..Default::default()
        });
    }
}

/// A bound parameter as audit text, cut: binary integers, floats and
/// booleans as their text, binary text types as text, anything else as
/// `\x` hex.
fn param_text(v: &[u8], binary: bool, type_oid: u32) -> String {
    let v = v.get(..PARAM_MAX).unwrap_or(v);
    if !binary {
        return String::from_utf8_lossy(v).into_owned();
    }
    let text = match (type_oid, v.len()) {
        (21, 2) => <[u8; 2]>::try_from(v)
            .ok()
            .map(|b| i16::from_be_bytes(b).to_string()),
        (23, 4) => <[u8; 4]>::try_from(v)
            .ok()
            .map(|b| i32::from_be_bytes(b).to_string()),
        (20, 8) => <[u8; 8]>::try_from(v)
            .ok()
            .map(|b| i64::from_be_bytes(b).to_string()),
        (700, 4) => <[u8; 4]>::try_from(v)
            .ok()
            .map(|b| f32::from_be_bytes(b).to_string()),
        (701, 8) => <[u8; 8]>::try_from(v)
            .ok()
            .map(|b| f64::from_be_bytes(b).to_string()),
        (16, 1) => Some(if v.first() == Some(&1) { "t" } else { "f" }.to_string()),
        (25 | 1043 | 1042 | 19, _) => std::str::from_utf8(v).ok().map(str::to_string),
        _ => None,
    };
    text.unwrap_or_else(|| format!("\\x{}", hex::encode(v)))
}

/// A finished statement waiting for its completion record.
struct Done {
    run: Box<Run>,
    rows: Option<u64>,
    error: Option<String>,
    columns: Option<Vec<String>>,
    by_column: Counts,
    by_detector: Counts,
    result_rows: Option<Vec<Vec<Option<String>>>>,
}

/// The server→agent half.
struct Back<'a> {
    shared: &'a Arc<Shared>,
    flow: &'a Flow,
    ctx: &'a SessionCtx,
    pipe: Pipe,
    cw: ClientW,
    marker: &'a str,
    plan: Option<RowPlan>,
    layout_known: bool,
    columns: Option<Vec<String>>,
    tables: HashMap<u32, Option<String>>,
    side: Option<Upstream>,
    scratch: Vec<u8>,
    rows_seen: u64,
    by_column: Counts,
    by_detector: Counts,
    copy_mask: Option<Arc<Masker>>,
    done: Vec<Done>,
    /// `record = "full"`: keep (masked) result rows for the recording.
    record_rows: bool,
    result_rows: Vec<Vec<Option<String>>>,
}

impl Back<'_> {
    async fn run(
        &mut self,
        mut rd: ReadHalf<Box<dyn Io>>,
        mut buf: BytesMut,
        counter: &AtomicU64,
    ) -> io::Result<&'static str> {
        let mut out = BytesMut::with_capacity(FLUSH_AT + 1024);
        loop {
            loop {
                let head = match codec::peek_frame(&buf, MAX_FRAME) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => {
                        self.write(&mut out, counter).await?;
                        self.fatal(&format!("the server sent an invalid message: {e}"))
                            .await;
                        return Ok("malformed frame from the server");
                    }
                };
                let frame = buf.split_to(head.total);
                if let Err(why) = self.message(head.tag, &frame, &mut out).await {
                    self.write(&mut out, counter).await?;
                    self.fatal(&why).await;
                    return Ok("result could not be masked");
                }
                if out.len() >= FLUSH_AT {
                    self.write(&mut out, counter).await?;
                }
            }
            self.write(&mut out, counter).await?;
            self.finish_done().await;
            if rd.read_buf(&mut buf).await? == 0 {
                return Ok("closed by the server");
            }
        }
    }

    async fn write(&mut self, out: &mut BytesMut, counter: &AtomicU64) -> io::Result<()> {
        if !out.is_empty() {
            self.cw.lock().await.write_all(out).await?;
            counter.fetch_add(out.len() as u64, Ordering::Relaxed);
            out.clear();
        }
        Ok(())
    }

    async fn fatal(&mut self, message: &str) {
        warn!(session = %self.flow.info.session, "{message}");
        let mut b = BytesMut::new();
        put_error(&mut b, b'E', "FATAL", "XX000", message);
        let _ = self.cw.lock().await.write_all(&b).await;
    }

    /// Handles one backend message; `Err` ends the session (fail closed).
    async fn message(&mut self, tag: u8, frame: &[u8], out: &mut BytesMut) -> Result<(), String> {
        let body = frame.get(5..).unwrap_or_default();
        match tag {
            b'D' => {
                self.rows_seen += 1;
                if let Some(plan) = &self.plan {
                    let at = out.len();
                    plan.mask_row(
                        body,
                        out,
                        &mut self.scratch,
                        &mut self.by_column,
                        &mut self.by_detector,
                    )
                    .map_err(|e| format!("cannot mask a result row: {e}"))?;
                    if self.record_rows && self.result_rows.len() < RECORD_ROWS {
                        // What the agent saw: the masked row.
                        let masked = out.get(at + 5..).unwrap_or_default().to_vec();
                        self.keep_row(&masked);
                    }
                } else if !self.layout_known && self.front_masker().is_some() {
                    return Err("result rows without a row description on a masked resource".into());
                } else {
                    if self.record_rows && self.result_rows.len() < RECORD_ROWS {
                        self.keep_row(body);
                    }
                    out.extend_from_slice(frame);
                }
            }
            b'T' | b'n' => {
                let swallow = {
                    let mut p = lock(&self.pipe);
                    match p.front() {
                        Some(Expect::Describe { swallow }) => {
                            let s = *swallow;
                            p.pop_front();
                            s
                        }
                        _ => false,
                    }
                };
                self.plan = None;
                self.layout_known = true;
                self.columns = None;
                if tag == b'T' {
                    let cols = rows::parse_row_description(body).map_err(|e| e.to_string())?;
                    self.columns = Some(cols.iter().map(|c| c.name.clone()).collect());
                    if let Some(m) = self.next_run_masker() {
                        if m.has_columns() {
                            self.resolve_tables(&cols).await;
                        }
                        self.plan = RowPlan::new(m, &cols, &self.tables);
                    }
                }
                if !swallow {
                    out.extend_from_slice(frame);
                }
            }
            b'C' | b'I' | b's' => {
                let rows = if tag == b'C' {
                    Reader::new(body, "CommandComplete")
                        .cstr()
                        .ok()
                        .and_then(codec::tag_rows)
                } else if tag == b's' {
                    Some(self.rows_seen)
                } else {
                    None
                };
                let run = {
                    let mut p = lock(&self.pipe);
                    match p.front() {
                        Some(Expect::Run(_)) => match p.pop_front() {
                            Some(Expect::Run(r)) => Some(r),
                            _ => None,
                        },
                        _ => None,
                    }
                };
                if let Some(run) = run {
                    self.complete(run, rows, None);
                }
                self.reset_result();
                out.extend_from_slice(frame);
            }
            b'E' => {
                let fields = codec::error_fields(body);
                let message = fields
                    .iter()
                    .find(|(k, _)| *k == b'M')
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                let mut denial = None;
                let mut failed = Vec::new();
                {
                    let mut p = lock(&self.pipe);
                    while let Some(e) = p.front() {
                        if matches!(e, Expect::Sync) {
                            break;
                        }
                        match p.pop_front() {
                            Some(Expect::Run(r)) => failed.push(r),
                            Some(Expect::Denial(reason)) if denial.is_none() => {
                                denial = Some(reason)
                            }
                            _ => {}
                        }
                    }
                }
                for r in failed {
                    self.complete(r, None, Some(message.clone()));
                }
                self.reset_result();
                match denial.filter(|_| message.contains(self.marker)) {
                    Some(reason) => put_error(
                        out,
                        b'E',
                        "ERROR",
                        "42501",
                        &format!("permission denied by Portcullis: {reason}"),
                    ),
                    None => out.extend_from_slice(frame),
                }
            }
            b'Z' => {
                let mut left = Vec::new();
                {
                    let mut p = lock(&self.pipe);
                    while let Some(e) = p.pop_front() {
                        match e {
                            Expect::Sync => break,
                            Expect::Run(r) => left.push(r),
                            _ => {}
                        }
                    }
                }
                for r in left {
                    self.complete(r, None, Some("not executed".into()));
                }
                self.reset_result();
                out.extend_from_slice(frame);
            }
            b'H' => {
                let binary = body.first() == Some(&1);
                match self.front_masker() {
                    Some(m) if m.has_detectors() || m.has_columns() => {
                        if binary {
                            return Err(
                                "binary COPY TO output cannot be inspected on a masked resource"
                                    .into(),
                            );
                        }
                        self.copy_mask = Some(m);
                    }
                    _ => {}
                }
                out.extend_from_slice(frame);
            }
            b'd' => {
                self.rows_seen += 1;
                match &self.copy_mask {
                    Some(m) => {
                        rows::mask_copy_row(m, body, out, &mut self.scratch, &mut self.by_detector);
                    }
                    None => out.extend_from_slice(frame),
                }
            }
            b'c' => {
                self.copy_mask = None;
                out.extend_from_slice(frame);
            }
            _ => out.extend_from_slice(frame),
        }
        Ok(())
    }

    /// Keeps one result row (as the agent got it) for the recording;
    /// binary values as `\x` hex.
    fn keep_row(&mut self, body: &[u8]) {
        let mut r = Reader::new(body, "DataRow");
        let Ok(n) = r.i16() else { return };
        let mut row = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n.max(0) {
            match r.value() {
                Ok(v) => row.push(v.map(|v| match std::str::from_utf8(v) {
                    Ok(t) => t.to_string(),
                    Err(_) => format!("\\x{}", hex::encode(v)),
                })),
                Err(_) => return,
            }
        }
        self.result_rows.push(row);
    }

    fn reset_result(&mut self) {
        self.plan = None;
        self.layout_known = false;
        self.rows_seen = 0;
        self.copy_mask = None;
    }

    fn front_masker(&self) -> Option<Arc<Masker>> {
        match lock(&self.pipe).front() {
            Some(Expect::Run(r)) => r.masker.clone(),
            _ => None,
        }
    }

    /// The masker of the first statement run still expected (a Describe's
    /// columns are for the Execute after it).
    fn next_run_masker(&self) -> Option<Arc<Masker>> {
        lock(&self.pipe).iter().find_map(|e| match e {
            Expect::Run(r) => Some(r.masker.clone()),
            _ => None,
        })?
    }

    fn complete(&mut self, run: Box<Run>, rows: Option<u64>, error: Option<String>) {
        self.done.push(Done {
            run,
            rows,
            error,
            columns: self.columns.clone(),
            by_column: std::mem::take(&mut self.by_column),
            by_detector: std::mem::take(&mut self.by_detector),
            result_rows: (self.record_rows && self.columns.is_some())
                .then(|| std::mem::take(&mut self.result_rows)),
        });
        self.result_rows.clear();
    }

    /// Writes completion records (after the answer reached the agent).
    async fn finish_done(&mut self) {
        for d in std::mem::take(&mut self.done) {
            let status = if d.error.is_some() { "error" } else { "ok" };
            let params: Vec<Value> = d
                .run
                .params
                .iter()
                .map(|p| p.clone().map_or(Value::Null, Value::String))
                .collect();
            if let Some(a) = &d.run.approved {
                let mut detail = Map::new();
                detail.insert("status".into(), status.into());
                if let Some(r) = d.rows {
                    detail.insert("rows".into(), r.into());
                }
                if let Some(e) = &d.error {
                    detail.insert("error".into(), e.clone().into());
                }
                if !params.is_empty() {
                    detail.insert("params".into(), Value::Array(params));
                }
                if !d.by_column.is_empty() || !d.by_detector.is_empty() {
                    detail.insert(
                        "masked".into(),
                        json!({ "columns": d.by_column.to_json(), "detectors": d.by_detector.to_json() }),
                    );
                }
                gate::finished(self.shared, self.flow, &a.cmd, &a.allowed, detail).await;
            }
            self.flow.recording.postgres_statement(PgStatementRecord {
                time_ms: crate::proxy::session::now_ms()
                    .saturating_sub(d.run.started.elapsed().as_millis() as u64),
                statement: d.run.text,
                params: d.run.params,
                action: d.run.class.to_string(),
                decision: "allow".into(),
                policy_ids: d
                    .run
                    .approved
                    .as_ref()
                    .map(|a| a.allowed.policies.clone())
                    .unwrap_or_default(),
                rows: d.rows,
                columns: d.columns,
                result_rows: d.result_rows,
                error: d.error,
                ..Default::default()
            });
        }
    }

    /// Names the tables behind `cols` (cached per session) by asking the
    /// server's catalog on a side connection. A lookup that fails leaves
    /// the OIDs unnamed, which masks their columns (fail closed).
    async fn resolve_tables(&mut self, cols: &[rows::Column]) {
        let mut want: Vec<u32> = cols
            .iter()
            .map(|c| c.table_oid)
            .filter(|o| *o != 0 && !self.tables.contains_key(o))
            .collect();
        want.sort_unstable();
        want.dedup();
        if want.is_empty() {
            return;
        }
        let found = self.catalog(&want).await;
        if let Err(e) = &found {
            warn!(session = %self.flow.info.session, "table names for masking unavailable: {e}");
            self.side = None;
        }
        let found = found.unwrap_or_default();
        for oid in want {
            let name = found
                .iter()
                .find(|(o, _)| *o == oid)
                .map(|(_, n)| n.clone());
            self.tables.insert(oid, name);
        }
    }

    async fn catalog(
        &mut self,
        oids: &[u32],
    ) -> Result<Vec<(u32, String)>, upstream::UpstreamError> {
        if self.side.is_none() {
            let mut params = self.ctx.params.clone();
            params.retain(|(k, _)| k != "application_name");
            params.push(("application_name".into(), "portcullis-catalog".into()));
            self.side = Some(upstream::login(self.flow, &params).await?);
        }
        let Some(side) = self.side.as_mut() else {
            return Ok(Vec::new());
        };
        let list: Vec<String> = oids.iter().map(u32::to_string).collect();
        let mut q = BytesMut::new();
        codec::put_query(
            &mut q,
            &format!(
                "SELECT c.oid::text, n.nspname || '.' || c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY('{{{}}}'::oid[])",
                list.join(",")
            ),
        );
        side.io.write_all(&q).await?;
        let mut out = Vec::new();
        let mut error = None;
        loop {
            let head = loop {
                if let Some(h) = codec::peek_frame(&side.buf, MAX_FRAME)? {
                    break h;
                }
                if side.io.read_buf(&mut side.buf).await? == 0 {
                    return Err(upstream::UpstreamError::Protocol(
                        "catalog connection closed".into(),
                    ));
                }
            };
            let frame = side.buf.split_to(head.total);
            let body = frame.get(5..).unwrap_or_default();
            match head.tag {
                b'D' => {
                    let mut r = Reader::new(body, "DataRow");
                    let _n = r.i16()?;
                    let oid = r
                        .value()?
                        .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u32>().ok());
                    let name = r.value()?.map(|v| String::from_utf8_lossy(v).into_owned());
                    if let (Some(o), Some(n)) = (oid, name) {
                        out.push((o, n));
                    }
                }
                b'E' => error = Some(codec::error_fields(body)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(f) => Err(upstream::UpstreamError::Server {
                code: f
                    .iter()
                    .find(|(k, _)| *k == b'C')
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
                message: f
                    .iter()
                    .find(|(k, _)| *k == b'M')
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
            }),
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_parameters_render_as_text() {
        assert_eq!(param_text(b"42", false, 0), "42");
        assert_eq!(param_text(&[0, 5], true, 21), "5");
        assert_eq!(param_text(&[0xff, 0xff, 0xff, 0xfe], true, 23), "-2");
        assert_eq!(param_text(&[0, 0, 0, 0, 0, 0, 1, 0], true, 20), "256");
        assert_eq!(param_text(&[1], true, 16), "t");
        assert_eq!(param_text(b"eve", true, 25), "eve");
        assert_eq!(param_text(&[1, 2], true, 0), "\\x0102");
        assert_eq!(param_text(&[1, 2, 3], true, 23), "\\x010203");
        assert_eq!(
            param_text(&vec![b'a'; PARAM_MAX + 10], false, 0).len(),
            PARAM_MAX
        );
    }
}
