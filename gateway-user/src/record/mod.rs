//! Session recordings: what each proxied session did, in files that common
//! tools read, under `<state>/sessions/<id>/`.
//!
//! Owns the sessions directory, the recorder's writer thread and queue, the
//! file formats below, their recovery after a crash, and the readers the CLI
//! uses ([`list_sessions`], [`load_session`], [`replay`]). It must not decide
//! or mask anything: callers pass what the agent saw after masking, and the
//! audit log (not this module) is the record that must not lose data.
//! Recordings are best-effort: nothing here ever blocks or fails the data
//! path.
//!
//! # Writing
//!
//! [`Recorder::start`] starts one writer thread per daemon. Session handles
//! ([`SessionRecording`], [`AsciicastChannel`]) put records on a bounded
//! queue and return at once; when the queue is full (messages or bytes) the
//! record is dropped and counted in the session's `dropped`. Session and
//! channel starts and ends are never dropped. The writer appends at least
//! every [`RecorderConfig::flush_interval`] (so a crash loses about that
//! much), and every file stays readable: JSON Lines and asciicast files are
//! append-only (a crash can leave a torn last line, cut by recovery), while
//! `meta.json` is replaced atomically (temporary file and rename) and
//! `session.har` is created atomically and then extended by rewriting its
//! tail in a single write. [`Recorder::start`] recovers sessions that never
//! ended (cuts torn lines, repairs the HAR, marks them ended with
//! `recovered: true`).
//!
//! Each session is capped at [`RecorderConfig::session_max_bytes`]; past it
//! the session's recording stops and `meta.json` says `capped: true`.
//! Directories are made 0700 and files 0600: recordings hold what agents
//! read.
//!
//! # Files
//!
//! - `meta.json`: one JSON object ([`SessionInfo`]): the [`SessionMeta`]
//!   fields, then `format` (1), `ended_ms`, `end_reason`, `recovered`,
//!   `counts`, `recorded_bytes`, `dropped`, `capped`, `capped_ms`, `error`,
//!   `channels`. Written at start, when channels open or close, when the
//!   session is capped or drops records, and at the end.
//! - `postgres.jsonl`: one [`PgStatementRecord`] per line (`time_ms`,
//!   `statement`, `params`, `action`, `decision`, `reason`, `policy_ids`,
//!   `rows`, `columns`, `error`, and with `record = "full"` `result_rows`,
//!   with `truncated: true` when rows were cut to the per-statement caps).
//! - `ssh-<channel>.cast` (`ssh-<channel>-<n>.cast` when the channel number
//!   is reused): asciicast v2. The header line has `version` 2, `width`,
//!   `height`, `timestamp` (Unix seconds), `title`, `env` (`TERM` when
//!   known) and `command` for exec channels; each event line is
//!   `[seconds since the channel started, code, text]` with code `o`
//!   (output), `i` (input, `record = "full"` only) or `r` (resize,
//!   `"WxH"`). Times never decrease; text is valid UTF-8 (invalid bytes
//!   become U+FFFD; sequences split across chunks are joined).
//! - `mcp.jsonl` (MCP resources): one [`McpMessageRecord`] per JSON-RPC
//!   message relayed (`t_ms`, `from`, `id`, `method`, `tool`, `decision`,
//!   `rule`, `message` after masking); with `record = "metadata"` a call's
//!   `message` is its argument names and digest and answers' are `null`.
//! - `session.har`: HAR 1.2 (see [`HarEntry`]), always a complete document.
//!   Each entry has the required HAR fields (`headersSize` is -1, `bodySize`
//!   -1 when unknown) and `_portcullis` (`action`, `decision`, `reason`,
//!   `policy_ids`); a body cut to the cap has `_truncated: true`.
//!
//! What is kept depends on the session's `record`: `off` writes nothing at
//! all; `metadata` keeps statements, parameters, decisions, row counts, HTTP
//! headers and SSH output, but no result rows, HTTP bodies or SSH input;
//! `full` keeps those too (capped).

mod har;
mod mcp;
mod read;
mod utf8;
mod writer;

#[cfg(test)]
mod tests;

use std::{
    collections::VecDeque,
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Condvar, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use har::{HarEntry, REDACTED};
pub use mcp::{from as mcp_from, read_mcp, McpMessageRecord, MCP_FILE};
pub use read::{
    list_sessions, load_session, read_cast, read_har, read_postgres, replay, replay_with,
    session_dir, validate_id, Cast, CastEvent, CastFile, ReplayOptions, SessionFiles,
};

use utf8::Utf8Stream;

/// Version of the `meta.json` layout.
pub const META_FORMAT: u32 = 1;
/// File name of the session metadata.
pub const META_FILE: &str = "meta.json";
/// File name of the PostgreSQL statement log.
pub const POSTGRES_FILE: &str = "postgres.jsonl";
/// File name of the HTTP archive.
pub const HAR_FILE: &str = "session.har";

/// Limits and timing of a [`Recorder`].
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// The sessions directory (`<state>/sessions`), made 0700 if missing.
    pub sessions_dir: PathBuf,
    /// Longest time a record waits in memory before it is written (default
    /// 500 ms).
    pub flush_interval: Duration,
    /// Records that may wait for the writer (default 16384).
    pub queue_messages: usize,
    /// Bytes of records that may wait for the writer (default 32 MiB).
    pub queue_bytes: usize,
    /// Largest recording of one session, all files but `meta.json` (default
    /// 64 MiB).
    pub session_max_bytes: u64,
    /// Result rows kept per statement with `record = "full"` (default 1000).
    pub result_max_rows: usize,
    /// Bytes of result cells kept per statement (default 256 KiB).
    pub result_max_bytes: usize,
    /// Bytes kept of a statement's text and of each parameter (default 64
    /// KiB).
    pub text_max_bytes: usize,
    /// Bytes kept of each HTTP body with `record = "full"` (default 256 KiB).
    pub body_max_bytes: usize,
}

impl RecorderConfig {
    /// The defaults for a sessions directory.
    pub fn new(sessions_dir: PathBuf) -> Self {
        Self {
            sessions_dir,
            flush_interval: Duration::from_millis(500),
            queue_messages: 16384,
            queue_bytes: 32 << 20,
            session_max_bytes: 64 << 20,
            result_max_rows: 1000,
            result_max_bytes: 256 << 10,
            text_max_bytes: 64 << 10,
            body_max_bytes: 256 << 10,
        }
    }
}

/// A recording problem.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A file or directory could not be read, created or written.
    #[error("recording {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A session id that cannot name a directory safely.
    #[error(
        "session id {0:?} is invalid: use letters, digits, '-', '_', '.' \
         (1 to 128 characters, not starting with '.')"
    )]
    BadId(String),
    /// Session metadata that cannot be recorded.
    #[error("invalid session metadata: {0}")]
    BadMeta(String),
    /// No recording has this id.
    #[error("no recording of session {0:?}")]
    NotFound(String),
    /// A recording file is not in the expected format.
    #[error("recording {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The writer thread could not be started.
    #[error("recording writer could not start: {0}")]
    Spawn(io::Error),
}

/// What the daemon knows about a session when it starts. Written to
/// `meta.json` (with [`SessionInfo`]'s fields). Missing fields read as
/// their defaults, so fields can be added without breaking old recordings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionMeta {
    /// Session id (`1a21a1d542d-7`); names the directory (see
    /// [`validate_id`]).
    pub id: String,
    /// `tcp`, `postgres`, `ssh` or `http`.
    pub protocol: String,
    /// The resource the destination matched.
    pub resource: String,
    /// The identity the session acts as.
    pub identity: String,
    /// The client's cgroup (relative to the cgroup2 mount).
    pub cgroup: String,
    /// The connecting process id.
    pub pid: u32,
    /// The client's address (`10.0.0.2:41234`).
    pub client: String,
    /// Where the client was connecting (`10.0.0.9:5432`).
    pub original_dst: String,
    /// When the session started (milliseconds since the Unix epoch).
    pub started_ms: u64,
    /// `off`, `metadata` or `full`.
    pub record: String,
}

/// Totals of a session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counts {
    /// PostgreSQL statements recorded.
    pub statements: u64,
    /// HTTP exchanges recorded.
    pub http_exchanges: u64,
    /// SSH channels recorded.
    pub ssh_channels: u64,
    /// MCP messages recorded.
    pub mcp_messages: u64,
    /// Bytes the client sent ([`SessionRecording::tcp_bytes`]).
    pub bytes_from_client: u64,
    /// Bytes the client received ([`SessionRecording::tcp_bytes`]).
    pub bytes_to_client: u64,
}

/// One recorded SSH channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChannelInfo {
    /// The SSH channel number (the client's).
    pub channel: u32,
    /// `shell` or `exec` (or another SSH channel request).
    pub kind: String,
    /// The exec command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The asciicast file, relative to the session directory.
    pub file: String,
    /// When the channel opened (milliseconds since the Unix epoch).
    pub started_ms: u64,
    /// When its recording ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// The exit status, if the server sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that ended the command, if the server sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_signal: Option<String>,
}

/// The content of `meta.json`: the session as started, and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// How the session started.
    #[serde(flatten)]
    pub meta: SessionMeta,
    /// [`META_FORMAT`].
    #[serde(default)]
    pub format: u32,
    /// When the session ended; `None` while it is live (or the daemon died
    /// and has not restarted since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// Why it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    /// Whether it was ended by crash recovery rather than by the daemon.
    #[serde(default)]
    pub recovered: bool,
    /// Totals.
    #[serde(default)]
    pub counts: Counts,
    /// Bytes in the recording files (all but `meta.json`).
    #[serde(default)]
    pub recorded_bytes: u64,
    /// Records dropped because the writer's queue was full.
    #[serde(default)]
    pub dropped: u64,
    /// Whether recording stopped at the session size cap.
    #[serde(default)]
    pub capped: bool,
    /// When it stopped there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capped_ms: Option<u64>,
    /// A write error that stopped the recording.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// SSH channels, in the order they opened.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<ChannelInfo>,
}

impl SessionInfo {
    /// Whether the session is still live (has no end).
    pub fn is_active(&self) -> bool {
        self.ended_ms.is_none()
    }
}

/// One PostgreSQL statement (one line of `postgres.jsonl`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PgStatementRecord {
    /// When the statement arrived (milliseconds since the Unix epoch).
    pub time_ms: u64,
    /// The statement text.
    pub statement: String,
    /// Bound parameters as text (`None` is SQL NULL).
    pub params: Vec<Option<String>>,
    /// The policy action (`select`, `insert`, ...).
    pub action: String,
    /// The decision (`allow`, `deny`, ...).
    pub decision: String,
    /// Why, when the policy engine said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The policies that decided.
    pub policy_ids: Vec<String>,
    /// Rows returned or affected, from the command tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// Result column names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// The result rows as the agent saw them (masked), text format; kept with
    /// `record = "full"` only, cut to the per-statement caps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_rows: Option<Vec<Vec<Option<String>>>>,
    /// Set by the recorder when `result_rows` was cut.
    #[serde(skip_serializing_if = "is_false")]
    pub truncated: bool,
    /// Set by the recorder when the statement text or a parameter was cut.
    #[serde(skip_serializing_if = "is_false")]
    pub text_truncated: bool,
    /// The error the agent got, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How much of a session is recorded (`SessionMeta::record`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Metadata,
    Full,
}

impl Mode {
    fn parse(s: &str) -> Result<Self, RecordError> {
        match s {
            "off" => Ok(Self::Off),
            "metadata" => Ok(Self::Metadata),
            "full" => Ok(Self::Full),
            other => Err(RecordError::BadMeta(format!(
                "record {other:?} is not one of off, metadata, full"
            ))),
        }
    }
}

/// About how many bytes `v` takes as JSON, without serializing it.
fn estimate_json(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(a) => 2 + a.iter().map(|x| estimate_json(x) + 1).sum::<usize>(),
        Value::Object(o) => {
            2 + o
                .iter()
                .map(|(k, x)| k.len() + 4 + estimate_json(x))
                .sum::<usize>()
        }
    }
}

/// Milliseconds since the Unix epoch, now (0 before 1970).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What a session handle and the writer both see.
#[derive(Debug, Default)]
struct Counters {
    dropped: AtomicU64,
    /// Capped, failed, or the recorder stopped: send nothing more.
    stopped: AtomicBool,
    /// `end` was called (by any clone).
    ended: AtomicBool,
    from_client: AtomicU64,
    to_client: AtomicU64,
}

/// A message to the writer.
enum Msg {
    Open {
        key: u64,
        info: Box<SessionInfo>,
        counters: Arc<Counters>,
    },
    Pg {
        key: u64,
        rec: Box<PgStatementRecord>,
    },
    Mcp {
        key: u64,
        rec: Box<McpMessageRecord>,
    },
    Http {
        key: u64,
        entry: Box<HarEntry>,
        req_truncated: bool,
        resp_truncated: bool,
    },
    ChanOpen {
        key: u64,
        chan: u64,
        info: ChannelInfo,
        header: Box<serde_json::Value>,
    },
    Cast {
        key: u64,
        chan: u64,
        t: f64,
        code: &'static str,
        text: String,
    },
    ChanEnd {
        key: u64,
        chan: u64,
        exit_code: Option<i32>,
        exit_signal: Option<String>,
        ended_ms: u64,
    },
    End {
        key: u64,
        reason: String,
        ended_ms: u64,
    },
    Flush(mpsc::Sender<()>),
}

#[derive(Default)]
struct Queue {
    msgs: VecDeque<Msg>,
    data_msgs: usize,
    data_bytes: usize,
    /// The writer was notified and has not taken the queue since.
    woken: bool,
    closed: bool,
}

/// The queue between handles and the writer.
struct Shared {
    queue: Mutex<Queue>,
    cv: Condvar,
    cfg: RecorderConfig,
    next_key: AtomicU64,
    /// Tests: the writer leaves the queue alone while set.
    hold: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a droppable record of about `bytes` bytes; counts a drop in
    /// `counters` when the queue is full or closed.
    fn push_data(&self, counters: &Counters, msg: Msg, bytes: usize) {
        let mut q = self.lock();
        if q.closed
            || q.data_msgs >= self.cfg.queue_messages
            || q.data_bytes.saturating_add(bytes) > self.cfg.queue_bytes
        {
            drop(q);
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.data_msgs += 1;
        q.data_bytes += bytes;
        q.msgs.push_back(msg);
        // Wake the writer early when the queue is half full, once.
        let busy =
            q.data_msgs * 2 >= self.cfg.queue_messages || q.data_bytes * 2 >= self.cfg.queue_bytes;
        if busy && !q.woken {
            q.woken = true;
            drop(q);
            self.cv.notify_one();
        }
    }

    /// Queues a lifecycle message (never dropped unless the recorder is
    /// closed). Returns whether it was queued.
    fn push_control(&self, msg: Msg, wake: bool) -> bool {
        let mut q = self.lock();
        if q.closed {
            return false;
        }
        q.msgs.push_back(msg);
        if wake && !q.woken {
            q.woken = true;
            drop(q);
            self.cv.notify_one();
        }
        true
    }
}

/// The daemon's recorder: one writer thread and its bounded queue. Clones
/// share the writer; it stops (writing what is queued and ending open
/// sessions with reason `recorder stopped`) on [`Recorder::close`] or when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<RecorderInner>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("sessions_dir", &self.inner.shared.cfg.sessions_dir)
            .finish()
    }
}

struct RecorderInner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for RecorderInner {
    fn drop(&mut self) {
        self.stop();
    }
}

impl RecorderInner {
    fn stop(&self) {
        {
            let mut q = self.shared.lock();
            q.closed = true;
            q.woken = true;
        }
        self.shared.cv.notify_one();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Recorder {
    /// Starts a recorder with the default limits for `sessions_dir`.
    pub fn start(sessions_dir: PathBuf) -> Result<Self, RecordError> {
        Self::start_with(RecorderConfig::new(sessions_dir))
    }

    /// Creates the sessions directory if needed, recovers sessions a crash
    /// left unended, and starts the writer thread. Only one recorder may use
    /// a sessions directory at a time (the daemon's state lock ensures it).
    pub fn start_with(cfg: RecorderConfig) -> Result<Self, RecordError> {
        writer::make_dir_all(&cfg.sessions_dir)?;
        let recovered = read::recover(&cfg.sessions_dir)?;
        if !recovered.is_empty() {
            tracing::info!(
                sessions = recovered.len(),
                "recordings: ended sessions left open by a previous run"
            );
        }
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            cv: Condvar::new(),
            cfg,
            next_key: AtomicU64::new(1),
            hold: AtomicBool::new(false),
        });
        let thread = writer::spawn(shared.clone()).map_err(RecordError::Spawn)?;
        Ok(Self {
            inner: Arc::new(RecorderInner {
                shared,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// The sessions directory.
    pub fn sessions_dir(&self) -> &Path {
        &self.inner.shared.cfg.sessions_dir
    }

    /// Starts recording a session: its directory and `meta.json` are written
    /// by the writer shortly after (within the flush interval). With
    /// `record = "off"` the handle records nothing. Fails only on invalid
    /// metadata (an unsafe id, an unknown protocol or record mode).
    pub fn session(&self, meta: SessionMeta) -> Result<SessionRecording, RecordError> {
        validate_id(&meta.id)?;
        if !matches!(
            meta.protocol.as_str(),
            "tcp" | "postgres" | "ssh" | "http" | "mcp"
        ) {
            return Err(RecordError::BadMeta(format!(
                "protocol {:?} is not one of tcp, postgres, ssh, http, mcp",
                meta.protocol
            )));
        }
        let mode = Mode::parse(&meta.record)?;
        if mode == Mode::Off {
            return Ok(SessionRecording::off());
        }
        let shared = &self.inner.shared;
        let key = shared.next_key.fetch_add(1, Ordering::Relaxed);
        let counters = Arc::new(Counters::default());
        let id = meta.id.clone();
        let info = SessionInfo {
            meta,
            format: META_FORMAT,
            ..Default::default()
        };
        if !shared.push_control(
            Msg::Open {
                key,
                info: Box::new(info),
                counters: counters.clone(),
            },
            false,
        ) {
            return Ok(SessionRecording::off());
        }
        Ok(SessionRecording {
            inner: Some(Arc::new(SessionShared {
                key,
                id,
                mode,
                shared: shared.clone(),
                counters,
            })),
        })
    }

    /// Writes everything queued so far (files, HARs, `meta.json`), waiting
    /// up to 10 s for the writer. Not for the data path.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.inner.shared.push_control(Msg::Flush(tx), true) {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Stops the writer after it wrote everything queued; sessions still open
    /// end with reason `recorder stopped`. Later records are dropped. Waits
    /// for the writer thread.
    pub fn close(self) {
        self.inner.stop();
    }

    /// Tests: while `hold` is set the writer takes nothing from the queue.
    #[cfg(test)]
    fn hold(&self, hold: bool) {
        self.inner.shared.hold.store(hold, Ordering::SeqCst);
        self.inner.shared.cv.notify_one();
    }
}

/// A session's recording. Cheap to clone; every method returns at once and
/// never fails (records that cannot be queued are counted as dropped).
/// Dropping the last clone without [`SessionRecording::end`] ends the
/// recording with reason `abandoned`.
#[derive(Clone)]
pub struct SessionRecording {
    inner: Option<Arc<SessionShared>>,
}

struct SessionShared {
    key: u64,
    id: String,
    mode: Mode,
    shared: Arc<Shared>,
    counters: Arc<Counters>,
}

impl SessionShared {
    fn live(&self) -> bool {
        !self.counters.stopped.load(Ordering::Relaxed)
            && !self.counters.ended.load(Ordering::Relaxed)
    }

    fn end(&self, reason: &str) {
        if self.counters.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.push_control(
            Msg::End {
                key: self.key,
                reason: reason.to_owned(),
                ended_ms: now_ms(),
            },
            false,
        );
    }
}

impl Drop for SessionShared {
    fn drop(&mut self) {
        self.end("abandoned");
    }
}

impl std::fmt::Debug for SessionRecording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(s) => f
                .debug_struct("SessionRecording")
                .field("id", &s.id)
                .field("mode", &s.mode)
                .finish(),
            None => f.write_str("SessionRecording(off)"),
        }
    }
}

impl SessionRecording {
    /// A handle that records nothing (`record = "off"`, or no recorder).
    pub fn off() -> Self {
        Self { inner: None }
    }

    /// Whether this handle records anything (false when off, capped, ended
    /// or after a write error).
    pub fn is_recording(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.live())
    }

    /// Records a PostgreSQL statement. Result rows are kept only with
    /// `record = "full"`, cut to the per-statement row and byte caps
    /// (`truncated: true`); the statement text and parameters are cut to the
    /// text cap (`text_truncated: true`).
    pub fn postgres_statement(&self, mut rec: PgStatementRecord) {
        let Some(s) = self.inner.as_ref().filter(|s| s.live()) else {
            return;
        };
        let cfg = &s.shared.cfg;
        if s.mode != Mode::Full {
            rec.result_rows = None;
            rec.truncated = false;
        }
        let mut text_cut = cut_text(&mut rec.statement, cfg.text_max_bytes);
        for p in rec.params.iter_mut().flatten() {
            text_cut |= cut_text(p, cfg.text_max_bytes);
        }
        rec.text_truncated |= text_cut;
        let mut bytes = rec.statement.len() + 256;
        bytes += rec
            .params
            .iter()
            .map(|p| p.as_ref().map_or(4, |p| p.len() + 4))
            .sum::<usize>();
        if let Some(rows) = rec.result_rows.as_mut() {
            let (cut, row_bytes) = cap_rows(rows, cfg.result_max_rows, cfg.result_max_bytes);
            rec.truncated |= cut;
            bytes += row_bytes;
        }
        s.shared.push_data(
            &s.counters,
            Msg::Pg {
                key: s.key,
                rec: Box::new(rec),
            },
            bytes,
        );
    }

    /// Starts an SSH channel's asciicast (`ssh-<channel>.cast`). `width` and
    /// `height` of 0 (no pty) are recorded as 80x24.
    pub fn ssh_channel(
        &self,
        channel: u32,
        kind: &str,
        command: Option<&str>,
        width: u16,
        height: u16,
    ) -> AsciicastChannel {
        self.ssh_channel_with(SshChannel {
            channel,
            kind,
            command,
            width,
            height,
            term: None,
        })
    }

    /// [`SessionRecording::ssh_channel`] with the pty's terminal type.
    pub fn ssh_channel_with(&self, ch: SshChannel<'_>) -> AsciicastChannel {
        let Some(s) = self.inner.as_ref().filter(|s| s.live()) else {
            return AsciicastChannel { inner: None };
        };
        let chan = s.shared.next_key.fetch_add(1, Ordering::Relaxed);
        let started_ms = now_ms();
        let width = if ch.width == 0 { 80 } else { ch.width };
        let height = if ch.height == 0 { 24 } else { ch.height };
        let mut header = serde_json::Map::new();
        header.insert("version".into(), 2.into());
        header.insert("width".into(), width.into());
        header.insert("height".into(), height.into());
        header.insert("timestamp".into(), (started_ms / 1000).into());
        if let Some(cmd) = ch.command {
            header.insert("command".into(), cmd.into());
        }
        let title = match ch.command {
            Some(cmd) => format!("{} {} {}: {}", s.id, ch.kind, ch.channel, cmd),
            None => format!("{} {} {}", s.id, ch.kind, ch.channel),
        };
        header.insert("title".into(), title.into());
        let mut env = serde_json::Map::new();
        if let Some(term) = ch.term {
            env.insert("TERM".into(), term.into());
        }
        header.insert("env".into(), env.into());
        let info = ChannelInfo {
            channel: ch.channel,
            kind: ch.kind.to_owned(),
            command: ch.command.map(str::to_owned),
            file: String::new(),
            started_ms,
            ..Default::default()
        };
        let queued = s.shared.push_control(
            Msg::ChanOpen {
                key: s.key,
                chan,
                info,
                header: Box::new(header.into()),
            },
            false,
        );
        if !queued {
            return AsciicastChannel { inner: None };
        }
        AsciicastChannel {
            inner: Some(Arc::new(ChanInner {
                session: s.clone(),
                chan,
                start: Instant::now(),
                output: Mutex::default(),
                input: Mutex::default(),
                ended: AtomicBool::new(false),
            })),
        }
    }

    /// Records an HTTP exchange in `session.har`. Bodies are kept only with
    /// `record = "full"`, cut to the body cap.
    pub fn http_exchange(&self, mut entry: HarEntry) {
        let Some(s) = self.inner.as_ref().filter(|s| s.live()) else {
            return;
        };
        let cfg = &s.shared.cfg;
        if s.mode != Mode::Full {
            entry.request_body = None;
            entry.response_body = None;
        }
        let req_truncated = har::cap_body(&mut entry.request_body, cfg.body_max_bytes);
        let resp_truncated = har::cap_body(&mut entry.response_body, cfg.body_max_bytes);
        let headers: usize = entry
            .request_headers
            .iter()
            .chain(&entry.response_headers)
            .map(|(n, v)| n.len() + v.len() + 32)
            .sum();
        let bytes = 512
            + entry.url.len()
            + headers
            + entry.request_body.as_ref().map_or(0, |b| b.len() * 4 / 3)
            + entry.response_body.as_ref().map_or(0, |b| b.len() * 4 / 3);
        s.shared.push_data(
            &s.counters,
            Msg::Http {
                key: s.key,
                entry: Box::new(entry),
                req_truncated,
                resp_truncated,
            },
            bytes,
        );
    }

    /// Records one MCP message as relayed. With `record = "full"` the
    /// record is kept as given; with `metadata`, `message` is replaced by
    /// what `metadata` returns (argument names and digest for a call,
    /// `null` for an answer), so no argument value or result body is kept.
    pub fn mcp_message(&self, mut rec: McpMessageRecord, metadata: impl FnOnce() -> Value) {
        let Some(s) = self.inner.as_ref().filter(|s| s.live()) else {
            return;
        };
        if s.mode != Mode::Full {
            rec.message = metadata();
        }
        // A rough size for the queue's byte cap; the writer counts exactly.
        let bytes = 256 + estimate_json(&rec.message);
        s.shared.push_data(
            &s.counters,
            Msg::Mcp {
                key: s.key,
                rec: Box::new(rec),
            },
            bytes,
        );
    }

    /// Adds to the session's byte counts (written to `meta.json`).
    pub fn tcp_bytes(&self, from_client: u64, to_client: u64) {
        if let Some(s) = &self.inner {
            s.counters
                .from_client
                .fetch_add(from_client, Ordering::Relaxed);
            s.counters.to_client.fetch_add(to_client, Ordering::Relaxed);
        }
    }

    /// Records dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |s| s.counters.dropped.load(Ordering::Relaxed))
    }

    /// Ends the recording: the writer writes what is queued and the final
    /// `meta.json` (`ended_ms`, `end_reason`, counts, `dropped`). Later
    /// records from other clones are ignored.
    pub fn end(self, reason: &str) {
        if let Some(s) = &self.inner {
            s.end(reason);
        }
    }
}

/// An SSH channel to record ([`SessionRecording::ssh_channel_with`]).
#[derive(Debug, Clone, Copy)]
pub struct SshChannel<'a> {
    /// The SSH channel number.
    pub channel: u32,
    /// `shell`, `exec`, ...
    pub kind: &'a str,
    /// The exec command.
    pub command: Option<&'a str>,
    /// Terminal columns (0: no pty).
    pub width: u16,
    /// Terminal rows (0: no pty).
    pub height: u16,
    /// The pty's terminal type (`xterm-256color`).
    pub term: Option<&'a str>,
}

/// One SSH channel's asciicast. Cheap to clone (clones share the UTF-8
/// state, so output and input may be fed from different tasks). Dropping the
/// last clone without [`AsciicastChannel::exit`] ends the channel's recording
/// without an exit status.
#[derive(Clone)]
pub struct AsciicastChannel {
    inner: Option<Arc<ChanInner>>,
}

impl std::fmt::Debug for AsciicastChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(c) => f
                .debug_struct("AsciicastChannel")
                .field("session", &c.session.id)
                .field("key", &c.chan)
                .finish(),
            None => f.write_str("AsciicastChannel(off)"),
        }
    }
}

struct ChanInner {
    session: Arc<SessionShared>,
    chan: u64,
    start: Instant,
    output: Mutex<CastStream>,
    input: Mutex<CastStream>,
    ended: AtomicBool,
}

/// Binary data recorded per stream of a channel once the stream turned
/// binary (a NUL byte or invalid UTF-8): past it, the bytes are counted,
/// not recorded, and the recording says how many were left out. A
/// 100 MB `scp` would otherwise make a cast of its size, nothing a
/// terminal can play.
pub const CAST_BINARY_MAX: u64 = 64 * 1024;

/// One recorded stream of a channel: its UTF-8 decoder and binary cap.
#[derive(Debug, Default)]
struct CastStream {
    utf8: Utf8Stream,
    /// Binary bytes seen since the stream turned binary.
    binary: Option<u64>,
    /// Bytes not recorded.
    omitted: u64,
}

impl CastStream {
    /// The text to record for `data` (empty: nothing).
    fn decode(&mut self, data: &[u8]) -> String {
        if let Some(seen) = self.binary {
            if seen >= CAST_BINARY_MAX {
                self.omitted += data.len() as u64;
                return String::new();
            }
        }
        let text = self.utf8.decode(data);
        if self.binary.is_none()
            && (data.contains(&0) || text.contains(char::REPLACEMENT_CHARACTER))
        {
            self.binary = Some(0);
        }
        if let Some(seen) = &mut self.binary {
            *seen += data.len() as u64;
        }
        text
    }

    /// The note recording the bytes left out, if any.
    fn omitted_note(&self) -> Option<String> {
        (self.omitted > 0).then(|| {
            format!(
                "\r\n[portcullis: binary data; only its first {} KiB recorded, {} more bytes left out]\r\n",
                CAST_BINARY_MAX / 1024,
                self.omitted
            )
        })
    }
}

impl ChanInner {
    fn event(&self, code: &'static str, text: String) {
        if text.is_empty() || !self.session.live() {
            return;
        }
        // Microseconds, so the number prints short.
        let t = (self.start.elapsed().as_secs_f64() * 1e6).round() / 1e6;
        let bytes = text.len() + 48;
        self.session.shared.push_data(
            &self.session.counters,
            Msg::Cast {
                key: self.session.key,
                chan: self.chan,
                t,
                code,
                text,
            },
            bytes,
        );
    }

    fn stream(&self, stream: &Mutex<CastStream>, code: &'static str, data: &[u8]) {
        if self.ended.load(Ordering::Relaxed) {
            return;
        }
        let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
        let text = s.decode(data);
        // Under the stream's lock, so events of one stream keep their order.
        self.event(code, text);
    }

    fn finish(&self, exit_code: Option<i32>, exit_signal: Option<String>) {
        if self.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        for (stream, code) in [(&self.output, "o"), (&self.input, "i")] {
            let mut st = stream.lock().unwrap_or_else(|e| e.into_inner());
            if code == "o" || self.session.mode == Mode::Full {
                if let Some(tail) = st.utf8.finish() {
                    self.event(code, tail);
                }
                // Said on the output stream, which every player shows.
                if let Some(note) = st.omitted_note() {
                    let note = if code == "i" {
                        note.replace("binary data", "binary input")
                    } else {
                        note
                    };
                    self.event("o", note);
                }
            }
        }
        self.session.shared.push_control(
            Msg::ChanEnd {
                key: self.session.key,
                chan: self.chan,
                exit_code,
                exit_signal,
                ended_ms: now_ms(),
            },
            false,
        );
    }
}

impl Drop for ChanInner {
    fn drop(&mut self) {
        self.finish(None, None);
    }
}

impl AsciicastChannel {
    /// Records output to the client (`o` events).
    pub fn output(&self, data: &[u8]) {
        if let Some(c) = &self.inner {
            c.stream(&c.output, "o", data);
        }
    }

    /// Records input from the client (`i` events), with `record = "full"`
    /// only.
    pub fn input(&self, data: &[u8]) {
        if let Some(c) = &self.inner {
            if c.session.mode == Mode::Full {
                c.stream(&c.input, "i", data);
            }
        }
    }

    /// Records a terminal resize (`r` event, `"WxH"`).
    pub fn resize(&self, width: u16, height: u16) {
        if let Some(c) = &self.inner {
            if !c.ended.load(Ordering::Relaxed) {
                c.event("r", format!("{width}x{height}"));
            }
        }
    }

    /// Ends the channel's recording with the command's exit status.
    pub fn exit(&self, code: i32) {
        if let Some(c) = &self.inner {
            c.finish(Some(code), None);
        }
    }

    /// Ends the channel's recording with the signal that killed the command.
    pub fn exit_signal(&self, signal: &str) {
        if let Some(c) = &self.inner {
            c.finish(None, Some(signal.to_owned()));
        }
    }

    /// Ends the channel's recording without an exit status.
    pub fn close(&self) {
        if let Some(c) = &self.inner {
            c.finish(None, None);
        }
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary; returns whether
/// it was cut.
fn cut_text(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    true
}

/// Keeps the leading rows that fit `max_rows` and `max_bytes` (cell bytes
/// plus 4 a cell); returns whether rows were cut and the bytes kept.
fn cap_rows(
    rows: &mut Vec<Vec<Option<String>>>,
    max_rows: usize,
    max_bytes: usize,
) -> (bool, usize) {
    let mut bytes = 0usize;
    let mut keep = 0usize;
    for row in rows.iter() {
        if keep >= max_rows {
            break;
        }
        let row_bytes: usize = row
            .iter()
            .map(|c| c.as_ref().map_or(4, |c| c.len() + 4))
            .sum();
        if bytes + row_bytes > max_bytes {
            break;
        }
        bytes += row_bytes;
        keep += 1;
    }
    let cut = keep < rows.len();
    rows.truncate(keep);
    (cut, bytes)
}
