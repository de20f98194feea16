//! The agent→server half of a PostgreSQL session: decodes each frontend
//! message, decides statements through the gate (simple query, Parse,
//! FunctionCall), tracks prepared statements and portals, and forwards to
//! the server what was allowed (a denial goes upstream as the marker).
//!
//! Owns the frontend side of one session; it must not write server
//! answers to the agent (the backend half does) other than notices and a
//! fatal protocol error.

use std::{
    collections::HashMap,
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tracing::warn;

use crate::proxy::decisions::Decisions;

use super::{
    analyses, catalog,
    classify::{self, Classified},
    codec::{self, put_cstr, put_error, put_msg, Frontend, MAX_FRAME},
    copyout, functions, maskcheck, rows,
    session::{
        self, lock, AgentR, Approved, ClientW, Expect, Pipe, Portal, Prepared, Run, SessionCtx,
        PARAM_MAX,
    },
    shapes,
    upstream::{self, Io},
};
use crate::{
    daemon::Shared,
    mask::Masker,
    policy::Decision,
    proxy::{
        gate::{self, Allowed, Command, Gate, Waited},
        Flow,
    },
    record::PgStatementRecord,
};

/// The agent→server half.
pub(super) struct Front<'a> {
    shared: &'a Arc<Shared>,
    flow: &'a Flow,
    ctx: &'a SessionCtx,
    up: WriteHalf<Box<dyn Io>>,
    up_out: BytesMut,
    pipe: Pipe,
    cw: ClientW,
    marker: &'a str,
    statements: HashMap<String, Arc<Prepared>>,
    /// SQL-level prepared statements (`PREPARE name AS ...`) and whether
    /// running one may change the catalog. A name prepared twice keeps the
    /// worse verdict (the second PREPARE may have failed at the server).
    sql_prepared: HashMap<String, bool>,
    portals: HashMap<String, Portal>,
    skip_until_sync: bool,
    /// Statement texts this session sent recently and their
    /// classification (a pure function of the text): a statement sent
    /// again (every extended-protocol execution re-sends its Parse) is not
    /// parsed again. Bounded: see [`PARSED_MAX`].
    parsed: HashMap<String, Vec<Classified>>,
    /// Classifications by statement shape (texts that differ only in
    /// their constants): see [`shapes`].
    shapes: shapes::Shapes,
    /// Masking analyses of statement texts: see [`analyses`].
    analyses: analyses::Analyses,
    /// The masker's column rules in the analysis' form, made once per
    /// masker (a policy reload makes a new one), not per statement.
    mask_rules: Option<(Arc<Masker>, Arc<maskcheck::Rules>)>,
    /// An allowed `COPY ... FROM STDIN` was sent: CopyData may follow.
    copy_in: bool,
    /// Body bytes of a CopyData frame still to pass (streamed, never
    /// buffered whole).
    stream_left: usize,
    /// Whether those bytes go upstream (else they are dropped).
    stream_forward: bool,
    /// Cedar's allows of this session, remembered while the policy set
    /// is the same (see [`crate::proxy::decisions`]).
    decisions: Decisions,
    /// Extended-protocol messages went upstream since the last Sync or
    /// Query: the server is inside an extended sequence.
    unsynced: bool,
    /// The messages before the one being handled ended at a Sync or Query:
    /// a lookup may be injected on the session's connection
    /// ([`Front::own_lookup`]).
    at_sync_point: bool,
}

/// How long an agent whose message was too large may take to finish
/// sending it (read and dropped) before the connection is closed: so it
/// reads the error instead of a reset.
const OVERSIZED_DRAIN: std::time::Duration = std::time::Duration::from_secs(15);

/// Statement texts remembered per session with their classification.
const PARSED_MAX: usize = 16;
/// Longest text remembered (a session's cache stays within a few KiB).
const PARSED_TEXT_MAX: usize = 1024;

/// Why a frontend message was refused.
enum Refusal {
    /// Denied (by policy, by the parser, by a human): the agent's message.
    Denied(String),
}

impl<'a> Front<'a> {
    /// The frontend half of a session.
    pub(super) fn new(
        shared: &'a Arc<Shared>,
        flow: &'a Flow,
        ctx: &'a SessionCtx,
        up: WriteHalf<Box<dyn Io>>,
        pipe: Pipe,
        cw: ClientW,
        marker: &'a str,
    ) -> Self {
        Self {
            shared,
            flow,
            ctx,
            up,
            up_out: BytesMut::with_capacity(8192),
            pipe,
            cw,
            marker,
            statements: HashMap::new(),
            sql_prepared: HashMap::new(),
            portals: HashMap::new(),
            skip_until_sync: false,
            parsed: HashMap::new(),
            shapes: shapes::Shapes::default(),
            analyses: analyses::Analyses::default(),
            mask_rules: None,
            copy_in: false,
            stream_left: 0,
            stream_forward: false,
            decisions: Decisions::default(),
            unsynced: false,
            at_sync_point: true,
        }
    }

    pub(super) async fn run(
        &mut self,
        rd: AgentR,
        counter: &AtomicU64,
    ) -> io::Result<&'static str> {
        let r = self.relay(rd, counter).await;
        // However the agent left, the server gets a Terminate and an end of
        // stream, so the server half ends promptly.
        let mut x = BytesMut::new();
        put_msg(&mut x, b'X', |_| {});
        let _ = self.up.write_all(&x).await;
        let _ = self.up.shutdown().await;
        r
    }

    async fn relay(&mut self, mut rd: AgentR, counter: &AtomicU64) -> io::Result<&'static str> {
        let limits = self.shared.cfg.limits;
        let mut buf = BytesMut::with_capacity(8192);
        loop {
            loop {
                if self.stream_left > 0 {
                    // The rest of a CopyData body: passed on as it comes.
                    if buf.is_empty() {
                        break;
                    }
                    let n = buf.len().min(self.stream_left);
                    let piece = buf.split_to(n);
                    self.stream_left -= n;
                    if self.stream_forward {
                        self.up_out.extend_from_slice(&piece);
                        if self.up_out.len() >= session::FLUSH_AT {
                            self.flush().await?;
                        }
                    }
                    continue;
                }
                let Some((tag, len)) = codec::peek_header(&buf) else {
                    break;
                };
                if tag == b'd' && (4..=MAX_FRAME).contains(&len) {
                    // CopyData streams: its header now, its body as it
                    // arrives, whatever its size. Only after an allowed
                    // COPY FROM STDIN, and not while the server discards
                    // an errored pipeline.
                    let forward = self.copy_in && !self.skip_until_sync;
                    let head = buf.split_to(5);
                    if forward {
                        self.up_out.extend_from_slice(&head);
                    }
                    self.stream_left = len - 4;
                    self.stream_forward = forward;
                    continue;
                }
                let cap = match tag {
                    b'Q' | b'P' => limits.pg_max_statement,
                    _ => limits.pg_max_message,
                };
                if len >= 4 && len > cap && len <= MAX_FRAME {
                    let buffered = buf.len();
                    drop(buf);
                    self.flush().await?;
                    self.oversized(tag, len, cap, &mut rd, (len + 1).saturating_sub(buffered))
                        .await;
                    return Ok("message from the agent over its cap");
                }
                let head = match codec::peek_frame(&buf, cap) {
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
            // Room to read into without growing past what one message
            // under its cap needs (split-off frames give their space back).
            buf.reserve(8192);
            let n = rd.read_buf(&mut buf).await?;
            if n == 0 {
                return Ok("closed");
            }
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// A message longer than its cap: refused without reading it into
    /// memory. The agent gets FATAL 54000 (program_limit_exceeded) saying
    /// which cap, the refusal is audited and logged, and what it still
    /// sends of that message is read and dropped (bounded in time) so it
    /// reads the error rather than a reset; then the connection closes.
    async fn oversized(&mut self, tag: u8, len: usize, cap: usize, rd: &mut AgentR, left: usize) {
        let (what, key) = match tag {
            b'Q' => ("Query", "pg_max_statement"),
            b'P' => ("Parse", "pg_max_statement"),
            b'B' => ("Bind", "pg_max_message"),
            b'F' => ("FunctionCall", "pg_max_message"),
            _ => ("frontend", "pg_max_message"),
        };
        let reason = format!(
            "Portcullis: a {what} message of {} bytes exceeds {key} ({} bytes); the connection is closed",
            len + 1,
            cap
        );
        self.refusal(
            "postgres:other",
            &format!("<{what} message of {} bytes>", len + 1),
            &reason,
        )
        .await;
        self.fatal("54000", &reason).await;
        let mut left = left;
        let mut scratch = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(OVERSIZED_DRAIN, async {
            while left > 0 {
                match rd.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
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
        let _ = session::send(&self.cw, &b).await;
    }

    async fn notice(&mut self, message: &str) {
        let mut b = BytesMut::new();
        put_error(&mut b, b'N', "NOTICE", "00000", message);
        let _ = session::send(&self.cw, &b).await;
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
        self.at_sync_point = !self.unsynced;
        match tag {
            b'P' | b'B' | b'D' | b'E' | b'C' => self.unsynced = true,
            b'S' | b'Q' | b'F' => self.unsynced = false,
            _ => {}
        }
        match codec::decode_frontend(tag, body).map_err(|e| e.to_string())? {
            Frontend::Query(sql) => {
                self.copy_in = false;
                // A simple query drops the unnamed prepared statement on
                // the server, whatever it holds: no catalog lookup may
                // parse it again (a stale one can fail and abort the
                // agent's transaction).
                self.statements.remove("");
                let masker = self.masker();
                match self.decide(sql, &masker).await {
                    Ok(list) => {
                        self.copy_in = list.iter().any(|(c, _)| c.class == "copy_in");
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
                self.copy_in = false;
                if name.is_empty() {
                    // The server drops the unnamed statement before parsing
                    // the new one (even one that fails): a lookup while this
                    // Parse is decided must not parse the old one again.
                    self.statements.remove("");
                }
                let masker = self.masker();
                match self.decide(sql, &masker).await {
                    Ok(list) => {
                        let (class, approved) = match list.as_slice() {
                            [] => ("empty", None),
                            // Several statements: every one was allowed; the
                            // server refuses them in a prepared statement.
                            [(c, a), ..] => (c.class, a.clone()),
                        };
                        let catalog = list.iter().any(|(c, _)| self.changes_catalog(c));
                        self.statements.insert(
                            name.to_string(),
                            Arc::new(Prepared {
                                class,
                                text: sql.to_string(),
                                approved,
                                param_types,
                                changes_catalog: catalog,
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
                self.copy_in = self
                    .portals
                    .get(portal)
                    .is_some_and(|p| p.stmt.class == "copy_in" && p.stmt.approved.is_some());
                if self
                    .portals
                    .get(portal)
                    .is_some_and(|p| p.stmt.changes_catalog && p.stmt.approved.is_some())
                {
                    // Each execution of a prepared catalog change counts.
                    let catalog = self
                        .portals
                        .get(portal)
                        .is_some_and(|p| p.stmt.class != "set");
                    self.ctx.changes.begin(catalog);
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
            Frontend::Flush => self.up_out.extend_from_slice(&frame),
            // CopyData streams through `relay` and never gets here.
            Frontend::CopyData => {}
            Frontend::CopyDone | Frontend::CopyFail => {
                // Outside an allowed COPY FROM the server would ignore
                // them; they are not passed on either.
                if self.copy_in {
                    self.up_out.extend_from_slice(&frame);
                }
                self.copy_in = false;
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
        let cmd = Command::new(self.flow, ["postgres:", c.class].concat(), c.text.clone())
            .context("database", self.ctx.database.clone())
            .context("user", self.ctx.user.clone())
            .context("statement", c.context())
            .fingerprint(c.fingerprint.clone())
            .detail("normalized", c.normalized.clone());
        if c.volatile_functions.is_empty() {
            cmd
        } else {
            // Why a read was decided as `function` (or what a write runs).
            cmd.detail("volatile_functions", c.volatile_functions.clone())
        }
    }

    /// Decides every statement of `sql`: all allowed, or the whole string
    /// refused. Holds are announced with a NoticeResponse and waited for.
    async fn decide(
        &mut self,
        sql: &str,
        masker: &Option<Arc<Masker>>,
    ) -> Result<Vec<(Classified, Option<Arc<Approved>>)>, Refusal> {
        let mut list = match self.classify(sql) {
            Ok(l) => l,
            Err(e) => {
                let reason = e.to_string();
                self.refusal("postgres:other", sql, &reason).await;
                return Err(Refusal::Denied(reason));
            }
        };
        // A read that may run a routine with side effects is its own
        // class (`function`), from the server's catalog.
        let mut known = functions::verdicts(self.ctx.changes.pool(), self.flow, &list).await;
        let masked = masker.as_ref().is_some_and(|m| m.has_columns());
        if masked && self.ctx.changes.catalog_open() {
            // On a resource with column rules (where the session's own
            // connection is asked anyway), after a catalog change of this
            // session's open transaction the side connections cannot see
            // what it created (an enum type, a function): what they did
            // not call built in is asked again on the session's own
            // connection, as this transaction sees it (where it can be
            // asked now; else their verdicts stand).
            let want: Vec<functions::Key> = functions::all_keys(&list)
                .into_iter()
                .filter(|k| !known.get(k).is_some_and(|v| v.builtin))
                .collect();
            if !want.is_empty() {
                if let Some(Ok(answer)) = self.own_lookup(&functions::lookup_sql(&want)).await {
                    let rows = answer.into_iter().next().unwrap_or_default();
                    known.extend(functions::verdicts_from_rows(&want, rows));
                }
            }
        }
        functions::apply(&mut list, &known);
        // Column masking holds only for plain output columns: any other
        // use of a masked column is refused (maskcheck).
        if let Some(m) = masker.as_ref().filter(|m| m.has_columns()) {
            let m = m.clone();
            if let Err((class, text, reason)) = self.mask_checks(&list, &m).await {
                self.refusal(&format!("postgres:{class}"), &text, &reason)
                    .await;
                return Err(Refusal::Denied(reason));
            }
        }
        // First a dry run without side effects, so a batch with one
        // forbidden statement is refused before anything is held or
        // recorded as allowed.
        for c in &list {
            if let Some(m) = masker
                .as_ref()
                .filter(|m| c.parsed_class == "copy_out" && m.has_columns())
            {
                // Only a table with a masked column among those copied.
                let checked = copyout::check(self.ctx.changes.pool(), &c.text, m).await;
                if let Err(reason) = checked {
                    self.refusal("postgres:copy_out", &c.text, &reason).await;
                    return Err(Refusal::Denied(reason));
                }
            }
            // A single statement needs no dry run: the gate's own decision
            // below is the only one.
            if c.rollback || list.len() == 1 {
                continue;
            }
            let cmd = self.command(c);
            if let Decision::Deny { .. } = self.cedar(&cmd) {
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
            let decision = self.cedar(&cmd);
            let waited = match gate::check_decided(self.shared, self.flow, &cmd, decision).await {
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
                    if let Some(name) = &c.sql_prepare {
                        let changes = changes_catalog(&c);
                        if self.sql_prepared.len() < MAX_SQL_PREPARED
                            || self.sql_prepared.contains_key(name)
                        {
                            *self.sql_prepared.entry(name.clone()).or_insert(false) |= changes;
                        }
                    }
                    if self.changes_catalog(&c) {
                        // It may change the catalog or how names resolve:
                        // no cached catalog answer is used or kept until
                        // its transaction ends.
                        self.ctx.changes.begin(c.class != "set");
                    }
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

    /// Cedar's decision of `cmd` (without approval) under the loaded
    /// policy set, from the session's memo of allows when it has it.
    fn cedar(&mut self, cmd: &Command) -> Decision {
        let policy = self.shared.policy.load_full();
        self.decisions.decide(
            &policy,
            &self.flow.info.identity,
            &self.flow.info.resource,
            &cmd.action,
            &cmd.context,
        )
    }

    /// [`classify::classify`], remembered per session for short texts.
    fn classify(&mut self, sql: &str) -> Result<Vec<Classified>, classify::ClassifyError> {
        if let Some(list) = self.parsed.get(sql) {
            return Ok(list.clone());
        }
        let key = shapes::key(sql);
        if let Some(list) = key.as_deref().and_then(|k| self.shapes.get(k, sql)) {
            return Ok(list);
        }
        let list = classify::classify(sql)?;
        if let Some(k) = key {
            self.shapes.insert(k, sql, &list);
        }
        if sql.len() <= PARSED_TEXT_MAX {
            if self.parsed.len() >= PARSED_MAX {
                self.parsed.clear();
            }
            // Without the parse trees: they are many times the text's size.
            let kept = list
                .iter()
                .cloned()
                .map(|mut c| {
                    c.parsed = None;
                    c
                })
                .collect();
            self.parsed.insert(sql.to_string(), kept);
        }
        Ok(list)
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

impl<'a> Front<'a> {
    /// The masking analysis of every statement of a batch: `Err` with the
    /// refused statement's class, text and reason. The side connections
    /// see only committed catalog: after a change this session made in its
    /// open transaction, the session's own connection answers (asked before
    /// the batch, while the server is idle in that transaction); after a
    /// change earlier in the same batch nothing can, and the statement is
    /// refused.
    async fn mask_checks(
        &mut self,
        list: &[Classified],
        m: &Arc<Masker>,
    ) -> Result<(), (&'static str, String, String)> {
        let changes: Vec<bool> = list
            .iter()
            .map(|c| self.changes_catalog(c) && c.class != "set")
            .collect();
        let own = self.ctx.changes.catalog_open();
        let mut changed_in_batch = false;
        let rules = match &self.mask_rules {
            Some((of, rules)) if Arc::ptr_eq(of, m) => rules.clone(),
            _ => {
                let rules = Arc::new(maskcheck::Rules::from_masker(m));
                self.mask_rules = Some((m.clone(), rules.clone()));
                rules
            }
        };
        for (c, change) in list.iter().zip(changes) {
            let first = Some(self.analyses.analyze(&c.text, c.parsed.as_ref(), &rules));
            let parsed = c.parsed.as_ref();
            let checked = if changed_in_batch {
                maskcheck::check_statement(&mut maskcheck::Stale, &c.text, parsed, m, &rules, first)
                    .await
            } else if own {
                let relations = maskcheck::analyze(&c.text, &rules)
                    .map(|l| l.relations)
                    .unwrap_or_default();
                let mut source = OwnSource {
                    front: self,
                    tables: (!relations.is_empty()).then(|| {
                        rows::tables_sql(&format!(
                            "ARRAY(SELECT c.oid FROM pg_catalog.pg_class c WHERE pg_catalog.lower(c.relname) = ANY({}))",
                            upstream::hex_array(relations.iter().map(String::as_str), "text")
                        ))
                    }),
                };
                maskcheck::check_statement(&mut source, &c.text, parsed, m, &rules, first).await
            } else {
                let mut source = maskcheck::PoolSource(self.ctx.changes.pool());
                maskcheck::check_statement(&mut source, &c.text, parsed, m, &rules, first).await
            };
            changed_in_batch |= change;
            if let Err(reason) = checked {
                return Err((c.class, c.text.clone(), reason));
            }
        }
        Ok(())
    }

    /// Runs `sql` (SELECTs) on the session's own connection, inside its
    /// open transaction, leaving no trace (see
    /// [`catalog::own_lookup_messages`]). Only where the server's state is
    /// known: the messages before the one being decided ended at a Sync or
    /// Query, their answers have all arrived (waited for, bounded), and the
    /// server said it is idle in a transaction. `None`: it cannot be asked
    /// now.
    async fn own_lookup(&mut self, sql: &str) -> Option<catalog::OwnAnswer> {
        if !self.at_sync_point {
            return None;
        }
        self.flush().await.ok()?;
        // A simple query destroys the unnamed prepared statement: the
        // agent's is parsed again after the lookup (it was decided when
        // the agent sent it; Parse runs nothing).
        let unnamed = self.statements.get("").cloned();
        let deadline = Instant::now() + catalog::LOOKUP_TIMEOUT;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let mut reply = Some(reply);
        loop {
            {
                let mut p = lock(&self.pipe);
                if p.is_empty() {
                    if self.ctx.changes.status() != b'T' {
                        return None;
                    }
                    let lookup = catalog::OwnLookup::new(reply.take()?, unnamed.is_some());
                    p.push_back(Expect::Own(Box::new(lookup)));
                    break;
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let mut messages = catalog::own_lookup_messages(sql);
        if let Some(p) = unnamed {
            put_msg(&mut messages, b'P', |b| {
                put_cstr(b, "");
                put_cstr(b, &p.text);
                b.put_i16(p.param_types.len() as i16);
                for t in &p.param_types {
                    b.put_u32(*t);
                }
            });
            put_msg(&mut messages, b'S', |_| {});
        }
        if let Err(e) = self.up.write_all(&messages).await {
            return Some(Err(e.to_string()));
        }
        match tokio::time::timeout(catalog::LOOKUP_TIMEOUT, answer).await {
            Ok(Ok(a)) => Some(a),
            _ => Some(Err("the server did not answer in time".into())),
        }
    }
}

/// The catalog as the session's own open transaction sees it; the first
/// lookup also names the statement's tables for result masking.
struct OwnSource<'f, 'a> {
    front: &'f mut Front<'a>,
    tables: Option<String>,
}

impl maskcheck::CatalogSource for OwnSource<'_, '_> {
    async fn rows(&mut self, sql: &str) -> Result<Arc<catalog::Rows>, String> {
        let tables = self.tables.take();
        let query = match &tables {
            Some(t) => format!("{sql}; {t}"),
            None => sql.to_string(),
        };
        let Some(answer) = self.front.own_lookup(&query).await else {
            // Not askable now (inside a pipeline): the same question asked
            // since the session's latest change, if nothing changed since.
            // The tables its first asking named are still kept.
            return self
                .front
                .ctx
                .changes
                .own_answer(sql)
                .ok_or_else(|| maskcheck::STALE.to_string());
        };
        let answer = answer.map_err(|e| {
                format!("column masking cannot be checked: the catalog could not be read on this session's connection ({e})")
            })?;
        let mut results = answer.into_iter();
        let rows = Arc::new(results.next().unwrap_or_default());
        if tables.is_some() {
            if let Some(t) = results.next() {
                self.front
                    .ctx
                    .changes
                    .keep_own_tables(rows::tables_from_rows(&t));
            }
        }
        self.front.ctx.changes.keep_own_answer(sql, rows.clone());
        Ok(rows)
    }
}

/// Whether a decided statement may change the catalog or how names
/// resolve (search_path, roles, DDL, GRANT, a routine with side effects):
/// anything but plain reads and writes and transaction control.
/// SQL-level prepared names remembered per session; an `EXECUTE` of any
/// other counts as a catalog change.
const MAX_SQL_PREPARED: usize = 4096;

impl Front<'_> {
    /// [`changes_catalog`], with a SQL-level `EXECUTE` judged by what its
    /// `PREPARE` runs (unknown: a change).
    fn changes_catalog(&self, c: &Classified) -> bool {
        match &c.sql_execute {
            Some(name) => self.sql_prepared.get(name).copied().unwrap_or(true),
            None => changes_catalog(c),
        }
    }
}

fn changes_catalog(c: &Classified) -> bool {
    if c.catalog_neutral {
        return false;
    }
    // The class as parsed: a read that calls a routine is judged by
    // `may_change_catalog` (user code, not a built-in, may run DDL).
    !matches!(
        c.parsed_class,
        "select"
            | "insert"
            | "update"
            | "delete"
            | "merge"
            | "copy_in"
            | "copy_out"
            | "explain"
            | "show"
            | "transaction"
    ) || functions::may_change_catalog(c)
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
