//! The server→agent half of a PostgreSQL session: relays answers in
//! order, masks DataRows and COPY TO rows as they stream, turns the denial
//! marker's error into SQLSTATE 42501, and writes each statement's
//! completion record and recording line.
//!
//! Owns the backend side of one session; it must not decide statements.

use std::{
    collections::HashMap,
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bytes::BytesMut;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, ReadHalf};
use tracing::warn;

use super::{
    catalog::OwnStep,
    codec::{self, put_error, Reader, MAX_FRAME},
    maskcheck,
    rows::{self, RowPlan},
    session::{self, lock, ClientW, Expect, Pipe, Run, SessionCtx, FLUSH_AT, RECORD_ROWS},
    upstream::{self, Io},
};
use crate::{
    daemon::Shared,
    mask::{Counts, Masker},
    proxy::{gate, Flow},
    record::PgStatementRecord,
};

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
pub(super) struct Back<'a> {
    shared: &'a Arc<Shared>,
    flow: &'a Flow,
    ctx: &'a SessionCtx,
    pipe: Pipe,
    cw: ClientW,
    marker: &'a str,
    plan: Option<RowPlan>,
    layout_known: bool,
    columns: Option<Vec<String>>,
    tables: HashMap<u32, Option<rows::Table>>,
    scratch: Vec<u8>,
    rows_seen: u64,
    by_column: Counts,
    by_detector: Counts,
    copy_mask: Option<Arc<Masker>>,
    done: Vec<Done>,
    /// `record = "full"`: keep (masked) result rows for the recording.
    record_rows: bool,
    result_rows: Vec<Vec<Option<String>>>,
    /// The session's DateStyle and IntervalStyle, as the server reported
    /// them: a masked date or interval is written the way it would be.
    output: rows::OutputStyle,
}

impl<'a> Back<'a> {
    /// Takes the server's output settings from its ParameterStatus values
    /// (at login, and whenever one changes).
    pub(super) fn parameter(&mut self, key: &str, value: &str) {
        if key.eq_ignore_ascii_case("DateStyle") {
            self.output.date_style = value.to_string();
        } else if key.eq_ignore_ascii_case("IntervalStyle") {
            self.output.interval_style = value.to_string();
        }
    }

    /// The backend half of a session.
    pub(super) fn new(
        shared: &'a Arc<Shared>,
        flow: &'a Flow,
        ctx: &'a SessionCtx,
        pipe: Pipe,
        cw: ClientW,
        marker: &'a str,
    ) -> Self {
        Self {
            shared,
            flow,
            ctx,
            pipe,
            cw,
            marker,
            plan: None,
            layout_known: false,
            columns: None,
            tables: HashMap::new(),
            scratch: Vec::new(),
            rows_seen: 0,
            by_column: Counts::default(),
            by_detector: Counts::default(),
            copy_mask: None,
            done: Vec::new(),
            record_rows: flow.resource.record == crate::policy::RecordMode::Full,
            result_rows: Vec::new(),
            output: rows::OutputStyle::default(),
        }
    }

    pub(super) async fn run(
        &mut self,
        mut rd: ReadHalf<Box<dyn Io>>,
        mut buf: BytesMut,
        counter: &AtomicU64,
    ) -> io::Result<&'static str> {
        let mut out = BytesMut::with_capacity(FLUSH_AT + 1024);
        let cap = self.shared.cfg.limits.pg_max_message;
        // Body bytes of a long row still to pass through unchanged.
        let mut stream_left = 0usize;
        loop {
            loop {
                if stream_left > 0 {
                    if buf.is_empty() {
                        break;
                    }
                    let n = buf.len().min(stream_left);
                    out.extend_from_slice(&buf.split_to(n));
                    stream_left -= n;
                    if out.len() >= FLUSH_AT {
                        self.write(&mut out, counter).await?;
                    }
                    continue;
                }
                if let Some((tag, len)) = codec::peek_header(&buf) {
                    if len > cap && len <= MAX_FRAME {
                        if self.can_stream(tag) {
                            // Nothing inspects this row: it streams in
                            // bounded pieces instead of being held whole.
                            self.rows_seen += 1;
                            out.extend_from_slice(&buf.split_to(5));
                            stream_left = len - 4;
                            continue;
                        }
                        self.write(&mut out, counter).await?;
                        let why = format!(
                            "Portcullis: the server sent a {} message of {} bytes; it must be inspected whole (masking) and exceeds pg_max_message ({cap} bytes); the connection is closed",
                            if matches!(tag, b'D' | b'd') { "result row" } else { "protocol" },
                            len + 1
                        );
                        warn!(session = %self.flow.info.session, "{why}");
                        let mut b = BytesMut::new();
                        put_error(&mut b, b'E', "FATAL", "54000", &why);
                        let _ = session::send(&self.cw, &b).await;
                        return Ok("server message over its cap");
                    }
                }
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
            buf.reserve(8192);
            if rd.read_buf(&mut buf).await? == 0 {
                return Ok("closed by the server");
            }
        }
    }

    /// Whether a message tagged `tag` may pass without being held whole:
    /// a DataRow no masking plan reads, a COPY TO row no masker reads.
    fn can_stream(&self, tag: u8) -> bool {
        match tag {
            b'D' => self.plan.is_none() && (self.layout_known || self.front_masker().is_none()),
            b'd' => self.copy_mask.is_none(),
            _ => false,
        }
    }

    async fn write(&mut self, out: &mut BytesMut, counter: &AtomicU64) -> io::Result<()> {
        if !out.is_empty() {
            session::send(&self.cw, out).await?;
            counter.fetch_add(out.len() as u64, Ordering::Relaxed);
            out.clear();
        }
        Ok(())
    }

    async fn fatal(&mut self, message: &str) {
        warn!(session = %self.flow.info.session, "{message}");
        let mut b = BytesMut::new();
        put_error(&mut b, b'E', "FATAL", "XX000", message);
        let _ = session::send(&self.cw, &b).await;
    }

    /// Handles one backend message; `Err` ends the session (fail closed).
    async fn message(&mut self, tag: u8, frame: &[u8], out: &mut BytesMut) -> Result<(), String> {
        let body = frame.get(5..).unwrap_or_default();
        if let Some(step) = self.own_lookup(tag, body) {
            return match step {
                OwnStep::Pass => {
                    out.extend_from_slice(frame);
                    Ok(())
                }
                OwnStep::Broken(why) => Err(format!("Portcullis ends the session: {why}")),
                OwnStep::Swallow | OwnStep::Done => Ok(()),
            };
        }
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
                        let tables = self.ctx.changes.with_own_tables(&self.tables);
                        self.plan = RowPlan::new(m, &cols, &tables, &self.output);
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
                    // A DETAIL can quote a row (`Failing row contains
                    // (...)`): not on a resource with column rules.
                    None if self.column_rules() => maskcheck::put_without_detail(out, b'E', body),
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
                    self.ctx
                        .changes
                        .ready(body.first().copied().unwrap_or(b'E'));
                }
                for r in left {
                    self.complete(r, None, Some("not executed".into()));
                }
                self.reset_result();
                if body.first() == Some(&b'I') {
                    // Out of any transaction: what this session changed in
                    // the catalog is committed or gone (before the agent
                    // hears so).
                    self.ctx.changes.transaction_ended();
                }
                out.extend_from_slice(frame);
            }
            b'H' => {
                let binary = body.first() == Some(&1);
                match self.front_masker() {
                    // Column rules alone: the statement check let only
                    // COPYs without masked columns through.
                    Some(m) if m.has_detectors() => {
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
            b'S' => {
                // The session is pinned to UTF-8 (statements are decided as
                // UTF-8); a server that now decodes otherwise (a function
                // that ran set_config, a SET this parser missed) would read
                // the next statements differently: end the session.
                let mut r = Reader::new(body, "ParameterStatus");
                let key = r.cstr().map_err(|e| e.to_string())?;
                let value = r.cstr().map_err(|e| e.to_string())?;
                if super::encoding::is_client_encoding_key(key) && !super::encoding::is_utf8(value)
                {
                    let why = format!(
                        "the server switched client_encoding to {value:?}; the session is pinned to UTF8 and is ended"
                    );
                    let ev = self
                        .flow
                        .audit_event("postgres_encoding")
                        .decision("deny")
                        .reason(why.clone());
                    let _ = self.shared.audit(ev).await;
                    return Err(why);
                }
                self.parameter(key, value);
                out.extend_from_slice(frame);
            }
            // A notice's DETAIL can quote a row too.
            b'N' if self.column_rules() => maskcheck::put_without_detail(out, b'N', body),
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

    /// Whether the resource has column masking rules (now).
    fn column_rules(&self) -> bool {
        self.shared
            .policy
            .load()
            .masker(&self.flow.info.resource)
            .is_some_and(|m| m.has_columns())
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
        // A statement's columns are its own: one that returns no rows (an
        // UPDATE after a SELECT) must not be recorded under the last one's.
        let columns = self.columns.take();
        self.done.push(Done {
            run,
            rows,
            error,
            result_rows: (self.record_rows && columns.is_some())
                .then(|| std::mem::take(&mut self.result_rows)),
            columns,
            by_column: std::mem::take(&mut self.by_column),
            by_detector: std::mem::take(&mut self.by_detector),
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

    /// Feeds a server message to the lookup the proxy injected, if one is
    /// being answered (`None`: the message is the agent's).
    fn own_lookup(&mut self, tag: u8, body: &[u8]) -> Option<OwnStep> {
        let mut p = lock(&self.pipe);
        let Some(Expect::Own(lookup)) = p.front_mut() else {
            return None;
        };
        let step = lookup.feed(tag, body);
        if matches!(step, OwnStep::Done | OwnStep::Broken(_)) {
            p.pop_front();
            if tag == b'Z' {
                self.ctx
                    .changes
                    .ready(body.first().copied().unwrap_or(b'E'));
            }
        }
        Some(step)
    }

    /// Names the tables behind `cols` and their columns by attribute
    /// number (cached per session) by asking the server's catalog on a
    /// side connection. A lookup that fails leaves the OIDs unnamed, which
    /// masks their columns (fail closed).
    async fn resolve_tables(&mut self, cols: &[rows::Column]) {
        // A table the side connections did not know, or without one of
        // these columns, is asked again (it may have been created or
        // altered since); one the session's own open transaction named is
        // not (the side connections cannot see it).
        let mut want: Vec<u32> = cols
            .iter()
            .filter(|c| {
                c.table_oid != 0
                    && !self.ctx.changes.own_table(c.table_oid)
                    && !matches!(self.tables.get(&c.table_oid), Some(Some(t))
                        if c.attnum <= 0 || t.columns.contains_key(&c.attnum))
            })
            .map(|c| c.table_oid)
            .collect();
        want.sort_unstable();
        want.dedup();
        if want.is_empty() {
            return;
        }
        let found = self.catalog(&want).await;
        if let Err(e) = &found {
            warn!(session = %self.flow.info.session, "table names for masking unavailable: {e}");
        }
        let mut found = found.unwrap_or_default();
        for oid in want {
            // Only what the catalog named is kept: an unknown OID is
            // masked now and asked again next time.
            match found.remove(&oid) {
                Some(t) => self.tables.insert(oid, Some(t)),
                None => self.tables.remove(&oid),
            };
        }
    }

    async fn catalog(
        &mut self,
        oids: &[u32],
    ) -> Result<HashMap<u32, rows::Table>, upstream::UpstreamError> {
        let Some(pool) = self.ctx.changes.pool() else {
            return Ok(HashMap::new());
        };
        let list: Vec<String> = oids.iter().map(u32::to_string).collect();
        let rows = pool
            .query(&rows::tables_sql(&format!(
                "'{{{}}}'::pg_catalog.oid[]",
                list.join(",")
            )))
            .await?;
        Ok(rows::tables_from_rows(&rows))
    }
}
