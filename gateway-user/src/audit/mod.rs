//! The tamper-evident audit log: append-only JSON Lines files in
//! `<state>/audit`, one hash chain across every file and restart, with
//! periodic Ed25519-signed checkpoints.
//!
//! Owns the audit directory, the signing key files (`<state>/audit.key`,
//! `<state>/audit.pub`), the writer (a lock the recording task takes
//! itself), the sync thread and the readers the CLI uses
//! ([`verify`], [`read_events`], [`follow`]). It must not decide anything:
//! callers say what happened ([`AuditEvent`]) and deny the command when
//! [`AuditLog::record`] fails.
//!
//! # Files
//!
//! `<dir>/audit-000001.jsonl`, `audit-000002.jsonl`, ... (six digits or more,
//! ordered by number). A file is rotated when it reaches
//! [`AuditConfig::rotate_bytes`]; the chain continues in the next one. Each
//! line is one JSON object, UTF-8, ending in `\n`, with no other whitespace
//! between tokens. Keys, in this order:
//!
//! - `seq`: 1 for the first event ever, then +1 per line, across files and
//!   restarts;
//! - `time`: when the writer wrote it, RFC 3339 UTC with milliseconds
//!   (`2026-11-26T10:00:00.123Z`);
//! - `type`: the event type, then the event's set fields ([`AuditEvent`]:
//!   `session`, `identity` (`{name, iss, sub, jti}`), `cgroup`, `cgroup_id`,
//!   `pid`, `resource`, `action`, `decision`, `reason`, `policy_version`,
//!   `policy_ids`, `approver`, `masking`, `bytes`, `detail`), or for
//!   checkpoints `covers_seq`, `head_hash`, `signature`;
//! - `prev_hash`: the `hash` of the previous line (64 `0`s for seq 1);
//! - `hash`: always the last key.
//!
//! # Hash
//!
//! Let `L` be the exact bytes of a line without its newline. `L` ends with
//! `,"hash":"<h>"}` where `<h>` is 64 lowercase hex digits. Let `B` be `L`
//! with that suffix replaced by `}` (so `B` ends with `"prev_hash":"<p>"}`).
//! Then `<h>` = lowercase hex of SHA-256(`<p>` as its 64 ASCII hex bytes ‖ `B`).
//! Verification works on the raw bytes and never re-serializes JSON.
//!
//! # Checkpoints
//!
//! A checkpoint is a line of type `checkpoint`, in the chain like any other,
//! written every [`AuditConfig::checkpoint_every_events`] events, at most
//! [`AuditConfig::checkpoint_every`] after the first event it will cover,
//! before each rotation and at close (each only when events were added since
//! the last checkpoint). It carries `covers_seq` (the seq of the line just
//! before it), `head_hash` (that line's hash, equal to the checkpoint's own
//! `prev_hash`) and `signature`: lowercase hex of the 64-byte Ed25519
//! signature (RFC 8032) of the bytes
//! `portcullis-audit-checkpoint\0{covers_seq in decimal}\0{head_hash}`.
//! Without the key, a rewritten chain (every hash recomputed) fails at its
//! first checkpoint.
//!
//! # Keys
//!
//! `audit.key` is the 32-byte Ed25519 secret seed and `audit.pub` the 32-byte
//! public key, each as 64 lowercase hex digits and a newline. The key is made
//! (mode 0600) on the first open of an empty log; [`AuditLog::open`] refuses a
//! log that has events but no key.
//!
//! # Durability and recovery
//!
//! [`AuditLog::record`] writes the line itself, on the caller's task, under
//! a short lock (one write(2) to the page cache), and returns after it went
//! to the file: it survives a daemon crash. With [`FsyncMode::Always`] it
//! also waits for an fdatasync that began after its write (host crash);
//! recorders waiting at the same time share one. With
//! [`FsyncMode::Interval`] the sync thread syncs at most once per interval
//! while there is unsynced data, off the data path. A
//! crash can leave a torn final line in the newest file: [`AuditLog::open`]
//! truncates it and records an `audit_recovered` event (`detail.file`,
//! `detail.bytes_dropped`); [`verify`] reports it as a warning only there.
//!
//! What the chain cannot show on its own: the loss of the newest file's last
//! lines (truncation at a line boundary). Compare against a checkpoint kept
//! elsewhere (a log shipper's copy) to detect it.

pub(crate) mod chain;
mod event;
mod key;
mod read;
mod time;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde::Serialize;

pub use ed25519_dalek::VerifyingKey;
pub use event::{AuditEvent, FlowFields, IdentityRef, RESERVED_KINDS};
pub use key::load_public_key;
pub(crate) use key::random_seed;
pub use read::{follow, read_events, read_events_where, TailFilter, FOLLOW_POLL};
pub use time::{format_rfc3339_ms, rfc3339_ms_string};
pub use verify::{verify, verify_lines, VerifyError, VerifyReport};

/// How far durable writes trail appended ones (group commit lag), for
/// metrics. Written by the writer and the group-commit thread with plain
/// atomics; read by anyone. Approximate by nature: the two sides are not
/// read in one step.
#[derive(Debug)]
pub struct Durability {
    base: Instant,
    written: AtomicU64,
    durable: AtomicU64,
    /// Microseconds since `base` (+1) of the oldest write not yet synced;
    /// 0 when everything written is synced.
    oldest_unsynced: AtomicU64,
}

/// A reading of [`Durability`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AuditLag {
    /// Highest seq written to the file.
    pub written_seq: u64,
    /// Highest seq known synced to disk.
    pub durable_seq: u64,
    /// Records written but not yet synced.
    pub records: u64,
    /// Age of the oldest write not yet synced.
    pub age: Duration,
}

impl Durability {
    fn new(seq: u64) -> Self {
        Self {
            base: Instant::now(),
            written: AtomicU64::new(seq),
            durable: AtomicU64::new(seq),
            oldest_unsynced: AtomicU64::new(0),
        }
    }

    fn us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_micros() as u64 + 1
    }

    /// Lines up to `seq` are in the file (not necessarily on disk).
    pub(crate) fn wrote(&self, seq: u64) {
        self.written.fetch_max(seq, Ordering::Relaxed);
        let now = self.us(Instant::now());
        let _ = self
            .oldest_unsynced
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// An fdatasync that started at `started`, when the file held lines up
    /// to `upto`, succeeded.
    pub(crate) fn synced(&self, upto: u64, started: Instant) {
        self.durable.fetch_max(upto, Ordering::Relaxed);
        if self.written.load(Ordering::Relaxed) <= upto {
            self.oldest_unsynced.store(0, Ordering::Relaxed);
        } else {
            // Whatever is still unsynced was written after the sync began.
            self.oldest_unsynced
                .store(self.us(started), Ordering::Relaxed);
        }
    }

    /// The highest seq in the file.
    pub(crate) fn written_seq(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// The current lag.
    pub fn lag(&self) -> AuditLag {
        let written_seq = self.written.load(Ordering::Relaxed);
        let durable_seq = self.durable.load(Ordering::Relaxed).min(written_seq);
        let oldest = self.oldest_unsynced.load(Ordering::Relaxed);
        let age = if oldest == 0 || written_seq == durable_seq {
            Duration::ZERO
        } else {
            Duration::from_micros(self.us(Instant::now()).saturating_sub(oldest))
        };
        AuditLag {
            written_seq,
            durable_seq,
            records: written_seq - durable_seq,
            age,
        }
    }
}

/// When the log is fdatasync'd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncMode {
    /// Group commit: `record` returns after write(2); unsynced data is synced
    /// at most once per interval by the sync thread, off the data path.
    Interval(Duration),
    /// `record` returns after an fdatasync that began after its line was
    /// written (one sync serves every recorder waiting at that moment).
    Always,
}

impl Default for FsyncMode {
    fn default() -> Self {
        Self::Interval(Duration::from_millis(5))
    }
}

/// Where the log lives and how it is written.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The audit directory (`<state>/audit`).
    pub dir: PathBuf,
    /// The Ed25519 secret key (`<state>/audit.key`), created 0600 on first
    /// open; 64 hex digits and a newline.
    pub key_path: PathBuf,
    /// The public key (`<state>/audit.pub`), 64 hex digits and a newline.
    pub pub_path: PathBuf,
    /// When to fdatasync.
    pub fsync: FsyncMode,
    /// Size at which a file is rotated (default 64 MiB).
    pub rotate_bytes: u64,
    /// Events between checkpoints (default 1000).
    pub checkpoint_every_events: u64,
    /// Longest time an event stays without a checkpoint after it (default
    /// 10 s).
    pub checkpoint_every: Duration,
    /// Unused since records are written by the recording task itself (no
    /// queue); kept so existing configurations still build.
    pub queue_capacity: usize,
    /// How long `record` waits for the log's lock (default 2 s); then it
    /// fails with [`AuditError::QueueFull`] and nothing was written.
    pub enqueue_timeout: Duration,
    /// How long an `fsync = "always"` `record` waits for the sync covering
    /// its line (default 10 s). On this timeout the line is in the file but
    /// may not be on disk.
    pub reply_timeout: Duration,
}

impl AuditConfig {
    /// The defaults for a state directory.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("audit"),
            key_path: state_dir.join("audit.key"),
            pub_path: state_dir.join("audit.pub"),
            fsync: FsyncMode::default(),
            rotate_bytes: 64 << 20,
            checkpoint_every_events: 1000,
            checkpoint_every: Duration::from_secs(10),
            queue_capacity: 8192,
            enqueue_timeout: Duration::from_secs(2),
            reply_timeout: Duration::from_secs(10),
        }
    }
}

/// An audit problem.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file or directory could not be read, created or written while
    /// opening or reading the log.
    #[error("audit {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The log has events but its signing key is gone.
    #[error(
        "audit log {dir} has events but the signing key {key} is missing: restore the key \
         (a new key would not continue this chain), or move the log away to start a new one"
    )]
    KeyMissing {
        /// The audit directory.
        dir: PathBuf,
        /// The expected key file.
        key: PathBuf,
    },
    /// A key file is malformed.
    #[error("audit key {path}: {reason}")]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The public key file does not belong to the secret key.
    #[error("audit public key {public} does not match the secret key {secret}")]
    KeyMismatch {
        /// The secret key file.
        secret: PathBuf,
        /// The public key file.
        public: PathBuf,
    },
    /// The log cannot be continued safely (its last complete event is not
    /// valid).
    #[error("audit file {path} cannot be continued: {reason}; run `portcullis audit verify`")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another writer holds the log.
    #[error("audit log {0} is already open by another writer")]
    Locked(PathBuf),
    /// The event could not be written (disk full, I/O error); nothing of it
    /// is left in the file.
    #[error("audit log cannot be written: {message}")]
    Write {
        /// The I/O error kind.
        kind: io::ErrorKind,
        /// The I/O error as text.
        message: String,
    },
    /// The log's lock stayed taken for the enqueue timeout (a write hung);
    /// nothing of the event was written.
    #[error("audit log stayed busy for {0:?}")]
    QueueFull(Duration),
    /// The sync covering an `fsync = "always"` event did not finish within
    /// the reply timeout.
    #[error("audit log sync did not finish within {0:?}")]
    Timeout(Duration),
    /// The log was closed.
    #[error("audit log is closed")]
    Closed,
    /// The event is not acceptable.
    #[error("invalid audit event: {0}")]
    InvalidEvent(String),
    /// The event could not be encoded.
    #[error("audit event could not be encoded: {0}")]
    Encode(serde_json::Error),
}

/// What [`AuditLog::open`] found and did.
#[derive(Debug, Clone, Serialize)]
pub struct OpenReport {
    /// The checkpoint public key (hex).
    pub public_key_hex: String,
    /// Whether a new key was made (the log was empty).
    pub created_key: bool,
    /// The file being appended to.
    pub file: PathBuf,
    /// The seq the next event gets.
    pub next_seq: u64,
    /// A torn final line that was truncated, if any.
    pub recovered: Option<Recovery>,
}

/// A torn final line dropped by [`AuditLog::open`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Recovery {
    /// The file it was in.
    pub file: PathBuf,
    /// How many bytes were dropped.
    pub bytes_dropped: u64,
    /// The seq of the `audit_recovered` event that records it.
    pub seq: u64,
}

/// A handle to the audit log. Clones share the log; it is closed (after a
/// final checkpoint and sync) on [`AuditLog::close`], or by the sync thread
/// when the last handle is dropped.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    core: Arc<writer::Core>,
    public_key_hex: String,
    healthy: Arc<AtomicBool>,
    durability: Arc<Durability>,
    enqueue_timeout: Duration,
    reply_timeout: Duration,
}

impl Drop for Inner {
    /// The last handle is gone: the sync thread closes the log.
    fn drop(&mut self) {
        self.core.request_stop();
    }
}

/// What [`AuditLog::try_record`] did.
#[derive(Debug)]
pub enum TryRecord {
    /// The event was written (its seq) or refused; no need to try again.
    Written(Result<u64, AuditError>),
    /// Writing it now would have meant waiting: the event, unwritten.
    Busy(Box<AuditEvent>),
}

impl AuditLog {
    /// Opens (creating) the log, recovers after a crash, starts the sync
    /// thread.
    pub fn open(cfg: AuditConfig) -> Result<(AuditLog, OpenReport), AuditError> {
        let healthy = Arc::new(AtomicBool::new(true));
        let durability = Arc::new(Durability::new(0));
        let (core, report) = writer::start(&cfg, healthy.clone(), durability.clone())?;
        let log = AuditLog {
            inner: Arc::new(Inner {
                core,
                public_key_hex: report.public_key_hex.clone(),
                healthy,
                durability,
                enqueue_timeout: cfg.enqueue_timeout,
                reply_timeout: cfg.reply_timeout,
            }),
        };
        Ok((log, report))
    }

    /// Appends an event and returns its seq. The caller's task writes the
    /// line itself (hash chain and one write(2) under a short lock) and
    /// this returns once the line is in the file (so it survives a daemon
    /// crash); with [`FsyncMode::Always`] also after an fdatasync that began
    /// after the write.
    ///
    /// Fails, and never hangs (lock and sync timeouts), when the log cannot
    /// be written: the caller then denies the command. After a write error
    /// every later event is tried again and fails as fast as the file
    /// system refuses it, until writing works again.
    pub async fn record(&self, event: AuditEvent) -> Result<u64, AuditError> {
        event.validate()?;
        let fields = event.encode_fields()?;
        let inner = &self.inner;
        inner
            .core
            .record(&fields, inner.enqueue_timeout, inner.reply_timeout)
            .await
    }

    /// [`AuditLog::record`] for callers that cannot await (a response
    /// body's last poll): writes the event now when that needs no waiting
    /// (the writer is free, or freed within a spin of some microseconds,
    /// and `fsync = "interval"`), and otherwise hands
    /// it back untouched, to be recorded with [`AuditLog::record`] on a task.
    /// Not for a record that must precede forwarding: that caller awaits
    /// `record` anyway.
    pub fn try_record(&self, event: AuditEvent) -> TryRecord {
        let fields = match event.validate().and_then(|()| event.encode_fields()) {
            Ok(f) => f,
            Err(e) => return TryRecord::Written(Err(e)),
        };
        match self.inner.core.try_record(&fields) {
            Some(written) => TryRecord::Written(written),
            None => TryRecord::Busy(Box::new(event)),
        }
    }

    /// Flushes, writes a final checkpoint (when events were added since the
    /// last one), syncs and stops the writer. Other handles fail with
    /// [`AuditError::Closed`] afterwards.
    pub async fn close(self) -> Result<(), AuditError> {
        self.inner.core.close().await
    }

    /// The checkpoint public key, hex (the content of `audit.pub`).
    pub fn public_key_hex(&self) -> String {
        self.inner.public_key_hex.clone()
    }

    /// How far durable (fdatasync'd) writes trail the file (metrics).
    pub fn lag(&self) -> AuditLag {
        self.inner.durability.lag()
    }

    /// The state shared with the sync thread (tests: counters, fail points).
    #[cfg(test)]
    pub(crate) fn sync_shared(&self) -> &writer::SyncShared {
        &self.inner.core.sync
    }

    /// Whether the last write succeeded (for status and metrics).
    pub fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }
}

/// Parses `--since`: RFC 3339 (`2026-11-26T10:00:00Z`, optional fraction
/// and `±HH:MM` offset), a bare date (`2026-11-26`, midnight UTC) or a
/// duration ago (`30s`, `10m`, `2h`, `1d`). Returns Unix milliseconds.
pub fn parse_since(s: &str) -> Result<u64, String> {
    time::parse_since_at(s, time::now_ms())
}
