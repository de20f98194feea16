//! Reading recordings back: listing, loading, replaying, and recovering
//! sessions a crash left unended.
//!
//! Owns the offline side of the sessions directory: what the CLI's
//! `sessions` and `replay` show, and the repair [`super::Recorder::start`]
//! runs before writing. It must not touch a live session's files (recovery
//! runs before the writer starts) and must never follow an id outside the
//! sessions directory ([`validate_id`]).

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::Value;

use super::{
    har, writer, ChannelInfo, PgStatementRecord, RecordError, SessionInfo, HAR_FILE, META_FILE,
    POSTGRES_FILE,
};
use crate::audit::rfc3339_ms_string;

/// Checks that `id` can name a session directory: 1 to 128 of ASCII
/// letters, digits, `-`, `_`, `.`, not starting with `.` (so never `..`, a
/// path separator, or a hidden name).
pub fn validate_id(id: &str) -> Result<(), RecordError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(RecordError::BadId(id.to_owned()))
    }
}

/// The directory of session `id` (validated; it may not exist).
pub fn session_dir(sessions_dir: &Path, id: &str) -> Result<PathBuf, RecordError> {
    validate_id(id)?;
    Ok(sessions_dir.join(id))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_meta(path: &Path) -> Result<SessionInfo, RecordError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|e| RecordError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Every recorded session with a readable `meta.json`, oldest first. A
/// missing sessions directory lists nothing. Live sessions have no
/// `ended_ms` ([`SessionInfo::is_active`]).
pub fn list_sessions(sessions_dir: &Path) -> Result<Vec<SessionInfo>, RecordError> {
    let entries = match fs::read_dir(sessions_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(sessions_dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(sessions_dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if validate_id(name).is_err() || !entry.path().is_dir() {
            continue;
        }
        match read_meta(&entry.path().join(META_FILE)) {
            Ok(info) => out.push(info),
            Err(err) => tracing::debug!(session = name, %err, "recording without usable meta.json"),
        }
    }
    out.sort_by(|a, b| {
        a.meta
            .started_ms
            .cmp(&b.meta.started_ms)
            .then_with(|| a.meta.id.cmp(&b.meta.id))
    });
    Ok(out)
}

/// An asciicast file of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CastFile {
    /// The file.
    pub path: PathBuf,
    /// What `meta.json` says about its channel (missing when a crash came
    /// before `meta.json` was updated).
    pub channel: Option<ChannelInfo>,
}

/// A recorded session's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionFiles {
    /// The session directory.
    pub dir: PathBuf,
    /// Its `meta.json`.
    pub info: SessionInfo,
    /// `postgres.jsonl`, if any statement was recorded.
    pub postgres: Option<PathBuf>,
    /// `session.har`, if any exchange was recorded.
    pub har: Option<PathBuf>,
    /// `mcp.jsonl`, if any MCP message was recorded.
    pub mcp: Option<PathBuf>,
    /// The SSH channels' asciicasts, in the order they opened.
    pub casts: Vec<CastFile>,
}

/// Finds session `id`'s files. Fails with [`RecordError::BadId`] for an id
/// that is not a plain name (no path traversal) and
/// [`RecordError::NotFound`] when there is no such recording.
pub fn load_session(sessions_dir: &Path, id: &str) -> Result<SessionFiles, RecordError> {
    let dir = session_dir(sessions_dir, id)?;
    let meta_path = dir.join(META_FILE);
    if !dir.is_dir() || !meta_path.is_file() {
        return Err(RecordError::NotFound(id.to_owned()));
    }
    let info = read_meta(&meta_path)?;
    let existing = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    let postgres = existing(POSTGRES_FILE);
    let har = existing(HAR_FILE);
    let mcp = existing(super::MCP_FILE);
    let mut casts: Vec<(usize, String, CastFile)> = Vec::new();
    for name in cast_names(&dir)? {
        let index = info.channels.iter().position(|c| c.file == name);
        casts.push((
            index.unwrap_or(usize::MAX),
            name.clone(),
            CastFile {
                path: dir.join(&name),
                channel: index.and_then(|i| info.channels.get(i).cloned()),
            },
        ));
    }
    casts.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    Ok(SessionFiles {
        dir,
        info,
        postgres,
        har,
        mcp,
        casts: casts.into_iter().map(|(_, _, c)| c).collect(),
    })
}

/// The `ssh-*.cast` file names in `dir`.
fn cast_names(dir: &Path) -> Result<Vec<String>, RecordError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(name) = entry.file_name().to_str() {
            if name.starts_with("ssh-") && name.ends_with(".cast") {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// The complete lines of a JSON Lines file: a final line without its
/// newline (torn by a crash) is left out.
pub(super) fn complete_lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    bytes[..end]
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| (i + 1, l))
}

/// The statements in a `postgres.jsonl` (a torn final line is skipped).
pub fn read_postgres(path: &Path) -> Result<Vec<PgStatementRecord>, RecordError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    complete_lines(&bytes)
        .map(|(n, line)| {
            serde_json::from_slice(line).map_err(|e| RecordError::Corrupt {
                path: path.to_owned(),
                reason: format!("line {n}: {e}"),
            })
        })
        .collect()
}

/// One asciicast event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CastEvent {
    /// Seconds since the channel started.
    pub time: f64,
    /// `o`, `i` or `r`.
    pub code: String,
    /// The text.
    pub data: String,
}

/// A parsed asciicast v2 file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cast {
    /// The header object.
    pub header: Value,
    /// The events, in file order.
    pub events: Vec<CastEvent>,
}

/// Reads an asciicast v2 file (a torn final line is skipped).
pub fn read_cast(path: &Path) -> Result<Cast, RecordError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let corrupt = |reason: String| RecordError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let mut lines = complete_lines(&bytes);
    let (_, head) = lines
        .next()
        .ok_or_else(|| corrupt("no header line".into()))?;
    let header: Value =
        serde_json::from_slice(head).map_err(|e| corrupt(format!("header: {e}")))?;
    if header.get("version") != Some(&Value::from(2)) {
        return Err(corrupt("not asciicast version 2".into()));
    }
    let mut events = Vec::new();
    for (n, line) in lines {
        let (time, code, data): (f64, String, String) =
            serde_json::from_slice(line).map_err(|e| corrupt(format!("line {n}: {e}")))?;
        events.push(CastEvent { time, code, data });
    }
    Ok(Cast { header, events })
}

/// Reads and parses `session.har`.
pub fn read_har(path: &Path) -> Result<Value, RecordError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|e| RecordError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// How [`replay_with`] plays SSH channels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplayOptions {
    /// Playback speed: 2 is twice as fast; 0, negative, infinite or NaN
    /// plays without waiting.
    pub speed: f64,
    /// Longest pause between two events, in recorded seconds (`None`: as
    /// recorded).
    pub idle_limit: Option<f64>,
}

/// [`replay_with`] at `speed` with pauses as recorded.
pub fn replay(
    sessions_dir: &Path,
    id: &str,
    speed: f64,
    out: &mut dyn Write,
) -> Result<(), RecordError> {
    replay_with(
        sessions_dir,
        id,
        ReplayOptions {
            speed,
            idle_limit: None,
        },
        out,
    )
}

/// Writes session `id` in readable form to `out`: a summary of
/// `meta.json`, then the PostgreSQL statements (decision, policies,
/// parameters, row counts and recorded rows), the HTTP exchanges
/// (`METHOD URL -> STATUS (N ms)` and headers), and each SSH channel played
/// with its timing divided by the speed (the output text as the client saw
/// it).
pub fn replay_with(
    sessions_dir: &Path,
    id: &str,
    opts: ReplayOptions,
    out: &mut dyn Write,
) -> Result<(), RecordError> {
    let files = load_session(sessions_dir, id)?;
    let w = |e: io::Error| RecordError::Io {
        path: PathBuf::from("<output>"),
        source: e,
    };
    write_summary(&files.info, out).map_err(w)?;
    if let Some(path) = &files.postgres {
        let statements = read_postgres(path)?;
        write_postgres(&files.info, &statements, out).map_err(w)?;
    }
    if let Some(path) = &files.mcp {
        let msgs = super::read_mcp(path)?;
        super::mcp::write_mcp(&files.info, &msgs, out).map_err(w)?;
    }
    if let Some(path) = &files.har {
        let har = read_har(path)?;
        write_http(&har, out).map_err(w)?;
    }
    for cast in &files.casts {
        let parsed = read_cast(&cast.path)?;
        play_cast(cast, &parsed, opts, out).map_err(w)?;
    }
    out.flush().map_err(w)
}

fn write_summary(info: &SessionInfo, out: &mut dyn Write) -> io::Result<()> {
    let m = &info.meta;
    writeln!(
        out,
        "session {}  {}  resource {}  identity {}  record {}",
        m.id, m.protocol, m.resource, m.identity, m.record
    )?;
    writeln!(
        out,
        "  client {} -> {}  cgroup {}  pid {}",
        m.client, m.original_dst, m.cgroup, m.pid
    )?;
    let ended = match (info.ended_ms, &info.end_reason) {
        (Some(ms), Some(r)) => format!("ended {} ({r})", rfc3339_ms_string(ms)),
        (Some(ms), None) => format!("ended {}", rfc3339_ms_string(ms)),
        (None, _) => "still active".to_owned(),
    };
    writeln!(
        out,
        "  started {}  {ended}",
        rfc3339_ms_string(m.started_ms)
    )?;
    let c = &info.counts;
    writeln!(
        out,
        "  bytes from client {}  to client {}  statements {}  http exchanges {}  ssh channels {}",
        c.bytes_from_client, c.bytes_to_client, c.statements, c.http_exchanges, c.ssh_channels
    )?;
    if c.mcp_messages > 0 {
        writeln!(out, "  mcp messages {}", c.mcp_messages)?;
    }
    let mut notes = Vec::new();
    if info.recovered {
        notes.push("recovered after a daemon crash (the last second may be missing)".to_owned());
    }
    if info.capped {
        notes.push(format!(
            "recording stopped at the size cap ({} bytes)",
            info.recorded_bytes
        ));
    }
    if info.dropped > 0 {
        notes.push(format!("{} records dropped (writer busy)", info.dropped));
    }
    if let Some(e) = &info.error {
        notes.push(format!("recording error: {e}"));
    }
    for n in notes {
        writeln!(out, "  note: {n}")?;
    }
    writeln!(out)
}

/// `'text'` with quotes doubled, or `NULL`.
fn sql_literal(v: &Option<String>) -> String {
    match v {
        Some(s) => format!("'{}'", s.replace('\'', "''")),
        None => "NULL".to_owned(),
    }
}

fn cell(v: &Option<String>) -> String {
    match v {
        Some(s) => s.replace('\n', "\\n"),
        None => "NULL".to_owned(),
    }
}

fn clock(ms: u64) -> String {
    // `HH:MM:SS.mmm` of the RFC 3339 form.
    rfc3339_ms_string(ms)
        .get(11..23)
        .unwrap_or_default()
        .to_owned()
}

fn write_postgres(
    info: &SessionInfo,
    statements: &[PgStatementRecord],
    out: &mut dyn Write,
) -> io::Result<()> {
    writeln!(out, "postgres statements ({}):", statements.len())?;
    for s in statements {
        let rel = s.time_ms.saturating_sub(info.meta.started_ms);
        let mut line = format!(
            "[{} +{}.{:03}s] {} {}",
            clock(s.time_ms),
            rel / 1000,
            rel % 1000,
            s.decision,
            s.action
        );
        if !s.policy_ids.is_empty() {
            line.push_str(&format!("  policies: {}", s.policy_ids.join(", ")));
        }
        if let Some(r) = &s.reason {
            line.push_str(&format!("  reason: {r}"));
        }
        writeln!(out, "{line}")?;
        for l in s.statement.lines() {
            writeln!(out, "    {l}")?;
        }
        if s.text_truncated {
            writeln!(out, "    (statement or parameters truncated)")?;
        }
        if !s.params.is_empty() {
            let params: Vec<String> = s
                .params
                .iter()
                .enumerate()
                .map(|(i, p)| format!("${} = {}", i + 1, sql_literal(p)))
                .collect();
            writeln!(out, "  params: {}", params.join(", "))?;
        }
        if let Some(rows) = s.rows {
            writeln!(out, "  rows: {rows}")?;
        }
        if let Some(cols) = &s.columns {
            if s.result_rows.is_some() {
                writeln!(out, "  | {} |", cols.join(" | "))?;
            }
        }
        if let Some(rows) = &s.result_rows {
            for r in rows {
                let cells: Vec<String> = r.iter().map(cell).collect();
                writeln!(out, "  | {} |", cells.join(" | "))?;
            }
            if s.truncated {
                writeln!(out, "  (result truncated)")?;
            }
        }
        if let Some(e) = &s.error {
            writeln!(out, "  error: {e}")?;
        }
    }
    writeln!(out)
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn write_headers(out: &mut dyn Write, mark: &str, headers: Option<&Value>) -> io::Result<()> {
    for h in headers.and_then(Value::as_array).into_iter().flatten() {
        writeln!(
            out,
            "  {mark} {}: {}",
            str_of(h, "name"),
            str_of(h, "value")
        )?;
    }
    Ok(())
}

fn write_body(out: &mut dyn Write, label: &str, body: Option<&Value>) -> io::Result<()> {
    let Some(body) = body else { return Ok(()) };
    let Some(text) = body.get("text").and_then(Value::as_str) else {
        return Ok(());
    };
    let encoding = str_of(body, "encoding");
    let cut = body.get("_truncated").and_then(Value::as_bool) == Some(true);
    writeln!(
        out,
        "  {label} ({}{}{}):",
        str_of(body, "mimeType"),
        if encoding.is_empty() {
            String::new()
        } else {
            format!(", {encoding}")
        },
        if cut { ", truncated" } else { "" }
    )?;
    for l in text.lines() {
        writeln!(out, "  | {l}")?;
    }
    Ok(())
}

fn write_http(har: &Value, out: &mut dyn Write) -> io::Result<()> {
    let entries = har
        .pointer("/log/entries")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    writeln!(out, "http exchanges ({}):", entries.len())?;
    for e in entries {
        let req = &e["request"];
        let resp = &e["response"];
        let time = e.get("time").and_then(Value::as_f64).unwrap_or(0.0);
        let started = str_of(e, "startedDateTime");
        let p = &e["_portcullis"];
        writeln!(
            out,
            "[{}] {} {} -> {} ({} ms)  {} {}",
            started.get(11..23).unwrap_or(started),
            str_of(req, "method"),
            str_of(req, "url"),
            resp.get("status").and_then(Value::as_u64).unwrap_or(0),
            time.round(),
            str_of(p, "decision"),
            str_of(p, "action"),
        )?;
        if let Some(r) = p.get("reason").and_then(Value::as_str) {
            writeln!(out, "  reason: {r}")?;
        }
        write_headers(out, ">", req.get("headers"))?;
        write_body(out, "request body", req.get("postData"))?;
        write_headers(out, "<", resp.get("headers"))?;
        write_body(out, "response body", resp.get("content"))?;
    }
    writeln!(out)
}

fn play_cast(
    file: &CastFile,
    cast: &Cast,
    opts: ReplayOptions,
    out: &mut dyn Write,
) -> io::Result<()> {
    let (w, h) = (
        cast.header
            .get("width")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        cast.header
            .get("height")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    );
    let name = file
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let what = match &file.channel {
        Some(c) => match &c.command {
            Some(cmd) => format!("ssh channel {} {} {cmd:?}", c.channel, c.kind),
            None => format!("ssh channel {} {}", c.channel, c.kind),
        },
        None => name.clone(),
    };
    writeln!(out, "=== {what} ({w}x{h}, {name}) ===")?;
    out.flush()?;
    let wait = opts.speed.is_finite() && opts.speed > 0.0;
    let start = Instant::now();
    let (mut prev, mut at) = (0.0f64, 0.0f64);
    for ev in &cast.events {
        let gap = (ev.time - prev).max(0.0);
        prev = ev.time;
        at += match opts.idle_limit {
            Some(limit) if limit >= 0.0 => gap.min(limit),
            _ => gap,
        };
        if ev.code != "o" {
            continue;
        }
        if wait {
            let due = Duration::try_from_secs_f64(at / opts.speed).unwrap_or(Duration::MAX);
            let now = start.elapsed();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        out.write_all(ev.data.as_bytes())?;
        out.flush()?;
    }
    let end = match &file.channel {
        Some(ChannelInfo {
            exit_code: Some(c), ..
        }) => format!("exit status {c}"),
        Some(ChannelInfo {
            exit_signal: Some(s),
            ..
        }) => format!("killed by signal {s}"),
        _ => "no exit status".to_owned(),
    };
    writeln!(out, "\r\n=== end of {what}: {end} ===")?;
    out.flush()
}

/// Cuts a torn final line (bytes after the last newline); returns the
/// number of complete lines and the file's size after.
fn truncate_torn(path: &Path) -> Result<(u64, u64), RecordError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if end < bytes.len() {
        tracing::warn!(file = %path.display(), bytes = bytes.len() - end, "recording: cutting a torn final line");
        let f = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        f.set_len(end as u64).map_err(io_err(path))?;
    }
    let lines = bytes[..end].iter().filter(|&&b| b == b'\n').count() as u64;
    Ok((lines, end as u64))
}

fn mtime_ms(path: &Path) -> Option<u64> {
    let m = fs::metadata(path).ok()?.modified().ok()?;
    let d = m.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(d.as_millis()).ok()
}

/// Ends every session in `sessions_dir` that has no `ended_ms` (the daemon
/// stopped without ending it): cuts torn lines, repairs `session.har`,
/// recounts, and marks it `recovered`. Returns the ids. Must run before a
/// writer uses the directory.
pub(super) fn recover(sessions_dir: &Path) -> Result<Vec<String>, RecordError> {
    let mut done = Vec::new();
    for info in list_sessions(sessions_dir)? {
        if info.ended_ms.is_some() {
            continue;
        }
        let id = info.meta.id.clone();
        match recover_one(sessions_dir, info) {
            Ok(()) => done.push(id),
            Err(err) => tracing::warn!(session = %id, %err, "recording not recovered"),
        }
    }
    Ok(done)
}

fn recover_one(sessions_dir: &Path, mut info: SessionInfo) -> Result<(), RecordError> {
    let dir = sessions_dir.join(&info.meta.id);
    let mut bytes = 0u64;
    let mut last = info.meta.started_ms;
    let mut touch = |path: &Path| {
        if let Some(ms) = mtime_ms(path) {
            last = last.max(ms);
        }
    };
    let pg = dir.join(POSTGRES_FILE);
    if pg.is_file() {
        touch(&pg);
        let (lines, size) = truncate_torn(&pg)?;
        info.counts.statements = lines;
        bytes += size;
    }
    let mcp = dir.join(super::MCP_FILE);
    if mcp.is_file() {
        touch(&mcp);
        let (lines, size) = truncate_torn(&mcp)?;
        info.counts.mcp_messages = lines;
        bytes += size;
    }
    let har_path = dir.join(HAR_FILE);
    if har_path.is_file() {
        touch(&har_path);
        let raw = fs::read(&har_path).map_err(io_err(&har_path))?;
        match serde_json::from_slice::<Value>(&raw) {
            Ok(v) => {
                info.counts.http_exchanges = v
                    .pointer("/log/entries")
                    .and_then(Value::as_array)
                    .map_or(0, |a| a.len() as u64);
                bytes += raw.len() as u64;
            }
            Err(_) => {
                let (fixed, n) = har::repair(&raw).ok_or_else(|| RecordError::Corrupt {
                    path: har_path.clone(),
                    reason: "not a HAR written by portcullis".into(),
                })?;
                tracing::warn!(file = %har_path.display(), entries = n, "recording: repaired a torn HAR");
                writer::write_atomic(&har_path, &fixed).map_err(io_err(&har_path))?;
                info.counts.http_exchanges = n;
                bytes += fixed.len() as u64;
            }
        }
    }
    for name in cast_names(&dir)? {
        let path = dir.join(&name);
        touch(&path);
        let (_, size) = truncate_torn(&path)?;
        bytes += size;
        if !info.channels.iter().any(|c| c.file == name) {
            let channel = name
                .trim_start_matches("ssh-")
                .trim_end_matches(".cast")
                .split('-')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            info.channels.push(ChannelInfo {
                channel,
                kind: "unknown".into(),
                file: name,
                started_ms: info.meta.started_ms,
                ..Default::default()
            });
        }
    }
    touch(&dir.join(META_FILE));
    for ch in &mut info.channels {
        ch.ended_ms.get_or_insert(last);
    }
    info.counts.ssh_channels = info.channels.len() as u64;
    info.recorded_bytes = bytes;
    info.ended_ms = Some(last);
    info.end_reason = Some("daemon stopped before the session ended".into());
    info.recovered = true;
    for tmp in ["meta.json.tmp", "session.har.tmp"] {
        let _ = fs::remove_file(dir.join(tmp));
    }
    let meta = dir.join(META_FILE);
    writer::write_atomic(&meta, &writer::meta_bytes(&info)).map_err(io_err(&meta))
}
