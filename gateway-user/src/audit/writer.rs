//! The writer: one OS thread owning the current audit file, assigning `seq`,
//! `time`, `prev_hash` and `hash`, batching whatever is queued into one
//! write(2); crash recovery at open; the group-commit sync thread.
//!
//! Owns the chain head (next seq, previous hash) and the files' lengths. It
//! must not block async tasks: they talk to it over a channel and wait on
//! oneshot answers.

use std::{
    fs::{self, File},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Condvar, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use ed25519_dalek::{Signer as _, SigningKey};
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tracing::{error, warn};

use super::{
    chain::{self, LineProblem, GENESIS_HASH},
    key,
    time::{format_rfc3339_ms, now_ms},
    AuditConfig, AuditError, AuditEvent, FsyncMode, OpenReport, Recovery,
};

/// Most events written with one write(2).
const MAX_BATCH: usize = 1024;
/// Backward read size when looking for the last lines of a file.
const TAIL_CHUNK: u64 = 64 * 1024;
/// The lock file in the audit directory that keeps a second writer out.
const LOCK_FILE: &str = ".writer.lock";

/// A request to the writer thread.
pub(crate) enum Msg {
    /// Append one event (its encoded fields, see `AuditEvent::encode_fields`).
    Record {
        fields: Vec<u8>,
        resp: oneshot::Sender<Result<u64, AuditError>>,
        /// Held until the event is answered: bounds the queue.
        permit: OwnedSemaphorePermit,
    },
    /// Final checkpoint, sync, stop.
    Close {
        resp: oneshot::Sender<Result<(), AuditError>>,
    },
}

/// Where the writer answers one event.
type Waiter = oneshot::Sender<Result<u64, AuditError>>;
/// One queued event: encoded fields, its waiter, its queue slot.
type Queued = (Vec<u8>, Waiter, OwnedSemaphorePermit);

/// A write failure, cloneable so every waiter of a batch gets it.
#[derive(Clone, Debug)]
struct Failure {
    kind: io::ErrorKind,
    message: String,
}

impl Failure {
    fn new(what: &str, path: &Path, e: &io::Error) -> Self {
        Self {
            kind: e.kind(),
            message: format!("{what} {}: {e}", path.display()),
        }
    }

    fn to_error(&self) -> AuditError {
        AuditError::Write {
            kind: self.kind,
            message: self.message.clone(),
        }
    }
}

/// The chain head.
#[derive(Clone, Copy)]
struct Head {
    next_seq: u64,
    prev_hash: [u8; 64],
    /// Events (not checkpoints) since the last checkpoint.
    uncovered: u64,
}

/// The writer thread's state.
struct Writer {
    dir: PathBuf,
    path: PathBuf,
    file: Arc<File>,
    index: u64,
    /// Length of the current file up to the last successful write.
    file_len: u64,
    /// The head as written to the file.
    committed: Head,
    /// The head including lines still in `buf`.
    pending: Head,
    /// When the first event not covered by a checkpoint was written.
    uncovered_since: Option<Instant>,
    /// A failed write could not be cut back yet: cut before writing again.
    must_truncate: bool,
    /// `buf` holds a checkpoint.
    checkpoint_in_buf: bool,
    key: SigningKey,
    rotate_bytes: u64,
    checkpoint_every_events: u64,
    checkpoint_every: Duration,
    buf: Vec<u8>,
    healthy: Arc<AtomicBool>,
    durability: Arc<super::Durability>,
    syncer: Option<Syncer>,
    _lock: DirLock,
}

/// What `start` hands back besides the report.
pub(crate) struct Started {
    pub tx: mpsc::Sender<Msg>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens the log (key, lock, recovery) and starts the writer thread.
pub(crate) fn start(
    cfg: &AuditConfig,
    healthy: Arc<AtomicBool>,
    durability: Arc<super::Durability>,
) -> Result<(Started, OpenReport), AuditError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(&cfg.dir)
        .map_err(io_err(&cfg.dir))?;
    let lock = lock_dir(&cfg.dir)?;
    let files = chain::list_files(&cfg.dir).map_err(io_err(&cfg.dir))?;

    let (signing, created_key) = match fs::metadata(&cfg.key_path) {
        Ok(_) => (key::load_signing_key(&cfg.key_path)?, false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            for (_, path) in &files {
                let len = fs::metadata(path).map_err(io_err(path))?.len();
                if len > 0 {
                    return Err(AuditError::KeyMissing {
                        dir: cfg.dir.clone(),
                        key: cfg.key_path.clone(),
                    });
                }
            }
            (key::create_signing_key(&cfg.key_path)?, true)
        }
        Err(e) => return Err(io_err(&cfg.key_path)(e)),
    };
    let verifying = signing.verifying_key();
    match key::load_public_key(&cfg.pub_path) {
        Ok(existing) if existing == verifying => {}
        // A new key for a new chain replaces whatever public key was left.
        _ if created_key => key::write_public_key(&cfg.pub_path, &verifying)?,
        Ok(_) => {
            return Err(AuditError::KeyMismatch {
                secret: cfg.key_path.clone(),
                public: cfg.pub_path.clone(),
            })
        }
        Err(AuditError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            key::write_public_key(&cfg.pub_path, &verifying)?;
        }
        Err(e) => return Err(e),
    }

    let found = recover(&cfg.dir, &files)?;
    let syncer = match cfg.fsync {
        FsyncMode::Interval(every) => Some(Syncer::start(
            found.file.clone(),
            every,
            durability.clone(),
        )?),
        FsyncMode::Always => None,
    };
    let head = Head {
        next_seq: found.next_seq,
        prev_hash: found.prev_hash,
        // Whatever came after the last checkpoint before a restart gets
        // covered by the next one: count it as uncovered.
        uncovered: found.uncovered,
    };
    let mut writer = Writer {
        dir: cfg.dir.clone(),
        path: found.path,
        file: found.file,
        index: found.index,
        file_len: found.file_len,
        committed: head,
        pending: head,
        uncovered_since: (head.uncovered > 0).then(Instant::now),
        must_truncate: false,
        checkpoint_in_buf: false,
        key: signing,
        rotate_bytes: cfg.rotate_bytes.max(1),
        checkpoint_every_events: cfg.checkpoint_every_events.max(1),
        checkpoint_every: cfg.checkpoint_every,
        buf: Vec::with_capacity(64 * 1024),
        healthy,
        durability,
        syncer,
        _lock: lock,
    };

    let mut recovered = None;
    if let Some((path, bytes_dropped)) = found.torn {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let event = AuditEvent::new("audit_recovered")
            .reason("torn final line left by a crash was truncated")
            .detail("file", name)
            .detail("bytes_dropped", bytes_dropped);
        let fields = event.encode_fields()?;
        let seq = writer.append_event(&fields);
        writer.flush().map_err(|f| f.to_error())?;
        writer.sync().map_err(|f| f.to_error())?;
        recovered = Some(Recovery {
            file: path,
            bytes_dropped,
            seq,
        });
    }

    // What recovery found is on disk already.
    let on_disk = writer.committed.next_seq.saturating_sub(1);
    writer.durability.wrote(on_disk);
    writer.durability.synced(on_disk, Instant::now());

    let report = OpenReport {
        public_key_hex: hex::encode(verifying.as_bytes()),
        created_key,
        file: writer.path.clone(),
        next_seq: writer.committed.next_seq,
        recovered,
    };
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || writer.run(rx))
        .map_err(io_err(&cfg.dir))?;
    Ok((Started { tx }, report))
}

/// The exclusive flock on the audit directory's lock file. Dropping it
/// unlocks explicitly: a child forked meanwhile may still share the open
/// file, and would otherwise keep the lock until it execs.
struct DirLock(File);

impl Drop for DirLock {
    fn drop(&mut self) {
        // SAFETY: flock on a descriptor we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn lock_dir(dir: &Path) -> Result<DirLock, AuditError> {
    let path = dir.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Err(AuditError::Locked(dir.to_path_buf()));
        }
        return Err(io_err(&path)(err));
    }
    Ok(DirLock(file))
}

/// Where appending resumes after open.
struct Found {
    index: u64,
    path: PathBuf,
    file: Arc<File>,
    file_len: u64,
    next_seq: u64,
    prev_hash: [u8; 64],
    uncovered: u64,
    torn: Option<(PathBuf, u64)>,
}

fn open_append(path: &Path, create: bool) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(create)
        .mode(0o640)
        .open(path)
}

/// Position of the last `\n` in `file[..before]`.
fn rfind_newline(file: &mut File, before: u64) -> io::Result<Option<u64>> {
    let mut end = before;
    let mut chunk = vec![0u8; TAIL_CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(TAIL_CHUNK);
        let part = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        if let Some(i) = part.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + i as u64));
        }
        end = start;
    }
    Ok(None)
}

/// The last complete line of `file[..end]` (`end` just past a `\n`):
/// (its start, its bytes without the newline).
fn line_before(file: &mut File, end: u64) -> io::Result<(u64, Vec<u8>)> {
    let nl = end - 1;
    let start = rfind_newline(file, nl)?.map_or(0, |p| p + 1);
    let mut line = vec![0u8; (nl - start) as usize];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut line)?;
    Ok((start, line))
}

/// The chain head at the end of a file's complete lines: (seq, hash,
/// uncovered) of its last valid line, the offset just past it, and the
/// bytes after it that are torn (a final line without newline, or one
/// unparsable final line). `None` when the file holds no complete line.
struct Tail {
    head: Option<(u64, [u8; 64], bool)>,
    end: u64,
    torn: u64,
}

fn scan_tail(path: &Path, file: &mut File, allow_torn: bool) -> Result<Tail, AuditError> {
    let len = file.metadata().map_err(io_err(path))?.len();
    let mut end = rfind_newline(file, len)
        .map_err(io_err(path))?
        .map_or(0, |p| p + 1);
    let mut dropped_unparsable = false;
    loop {
        if end == 0 {
            break;
        }
        let (start, line) = line_before(file, end).map_err(io_err(path))?;
        match chain::check_line(&line) {
            Ok(fields) => {
                let mut hash = [0u8; 64];
                hash.copy_from_slice(fields.hash.as_bytes());
                let is_checkpoint = fields.kind == "checkpoint";
                if end < len && !allow_torn {
                    break;
                }
                return Ok(Tail {
                    head: Some((fields.seq, hash, is_checkpoint)),
                    end,
                    torn: len - end,
                });
            }
            Err(LineProblem::Unparsable(why)) if allow_torn && !dropped_unparsable => {
                warn!(file = %path.display(), %why, "audit: final line is not valid JSON, treating it as torn");
                dropped_unparsable = true;
                end = start;
            }
            Err(LineProblem::Unparsable(why) | LineProblem::Invalid(why)) => {
                return Err(AuditError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("its last complete line is not a valid event: {why}"),
                });
            }
        }
    }
    if end < len && !allow_torn {
        return Err(AuditError::Corrupt {
            path: path.to_path_buf(),
            reason: "it ends with a torn line but is not the newest file".into(),
        });
    }
    Ok(Tail {
        head: None,
        end,
        torn: len - end,
    })
}

/// Finds the chain head, truncating a torn final line of the newest file.
fn recover(dir: &Path, files: &[(u64, PathBuf)]) -> Result<Found, AuditError> {
    let Some((index, path)) = files.last().cloned() else {
        let path = dir.join(chain::file_name(1));
        let file = open_append(&path, true).map_err(io_err(&path))?;
        key::sync_parent(&path);
        return Ok(Found {
            index: 1,
            path,
            file: Arc::new(file),
            file_len: 0,
            next_seq: 1,
            prev_hash: GENESIS_HASH,
            uncovered: 0,
            torn: None,
        });
    };
    let mut file = open_append(&path, false).map_err(io_err(&path))?;
    let tail = scan_tail(&path, &mut file, true)?;
    let mut torn = None;
    if tail.torn > 0 {
        warn!(file = %path.display(), bytes = tail.torn, "audit: truncating a torn final line");
        file.set_len(tail.end).map_err(io_err(&path))?;
        file.sync_data().map_err(io_err(&path))?;
        torn = Some((path.clone(), tail.torn));
    }
    let head = match tail.head {
        Some(head) => Some(head),
        // The newest file holds no complete event: the chain ends in the
        // file before it, which must end cleanly.
        None => match files.len().checked_sub(2).map(|i| &files[i]) {
            Some((_, prev_path)) => {
                let mut prev = File::open(prev_path).map_err(io_err(prev_path))?;
                let t = scan_tail(prev_path, &mut prev, false)?;
                match t.head {
                    Some(head) => Some(head),
                    None => {
                        return Err(AuditError::Corrupt {
                            path: prev_path.clone(),
                            reason: "it holds no event but is not the newest file".into(),
                        })
                    }
                }
            }
            None => None,
        },
    };
    let (next_seq, prev_hash, uncovered) = match head {
        Some((seq, hash, is_checkpoint)) => (seq + 1, hash, u64::from(!is_checkpoint)),
        None => (1, GENESIS_HASH, 0),
    };
    Ok(Found {
        index,
        path,
        file: Arc::new(file),
        file_len: tail.end,
        next_seq,
        prev_hash,
        uncovered,
        torn,
    })
}

/// Tests turn reservation off to exercise cutting back a partial write.
#[cfg(test)]
pub(crate) static NO_RESERVE: AtomicBool = AtomicBool::new(false);

/// Best-effort reservation of `len` bytes past `offset` without changing the
/// file size, so that a full disk fails the batch before any byte of it is
/// written. File systems without fallocate are fine: the write itself fails
/// and is cut back.
fn reserve(file: &File, offset: u64, len: u64) -> io::Result<()> {
    #[cfg(test)]
    if NO_RESERVE.load(Ordering::Relaxed) {
        return Ok(());
    }
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, off, n) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Ok(()),
        _ => Err(err),
    }
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let first = match self.deadline() {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(msg) => Some(msg),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        if let Err(e) = self.shutdown() {
                            error!("audit: closing the log: {e}");
                        }
                        return;
                    }
                },
                None => match rx.recv() {
                    Ok(msg) => Some(msg),
                    Err(_) => {
                        if let Err(e) = self.shutdown() {
                            error!("audit: closing the log: {e}");
                        }
                        return;
                    }
                },
            };
            let mut close = None;
            let mut next = first;
            while let Some(msg) = next {
                match msg {
                    Msg::Record {
                        fields,
                        resp,
                        permit,
                    } => batch.push((fields, resp, permit)),
                    Msg::Close { resp } => {
                        close = Some(resp);
                        break;
                    }
                }
                if batch.len() >= MAX_BATCH {
                    break;
                }
                next = rx.try_recv().ok();
            }
            if !batch.is_empty() {
                self.write_batch(&mut batch);
            }
            if let Some(resp) = close {
                let result = self.shutdown();
                // Release the file and the directory lock before answering,
                // so the log can be opened again at once.
                drop(self);
                let _ = resp.send(result);
                return;
            }
            self.tick();
        }
    }

    /// When the next time-based checkpoint is due.
    fn deadline(&self) -> Option<Instant> {
        self.uncovered_since.map(|t| t + self.checkpoint_every)
    }

    fn tick(&mut self) {
        let due = self.deadline().is_some_and(|at| Instant::now() >= at);
        if due && self.committed.uncovered > 0 {
            self.append_checkpoint();
            if let Err(f) = self.flush().and_then(|()| self.after_write()) {
                error!("audit: writing a checkpoint: {}", f.message);
                self.healthy.store(false, Ordering::Relaxed);
                // Try again at the next deadline rather than spinning.
                self.uncovered_since = Some(Instant::now());
            }
        }
    }

    /// Writes a batch of events and answers every waiter.
    fn write_batch(&mut self, batch: &mut Vec<Queued>) {
        let mut in_buf: Vec<(u64, Waiter)> = Vec::with_capacity(batch.len());
        let mut written = Vec::with_capacity(batch.len());
        let mut failed: Option<Failure> = None;
        for (fields, resp, _permit) in batch.drain(..) {
            if let Some(f) = &failed {
                let _ = resp.send(Err(f.to_error()));
                continue;
            }
            if self.needs_rotation() {
                let rotated = self.flush().and_then(|()| {
                    written.append(&mut in_buf);
                    self.rotate()
                });
                if let Err(f) = rotated {
                    self.healthy.store(false, Ordering::Relaxed);
                    for (_, r) in in_buf.drain(..) {
                        let _ = r.send(Err(f.to_error()));
                    }
                    let _ = resp.send(Err(f.to_error()));
                    failed = Some(f);
                    continue;
                }
            }
            let seq = self.append_event(&fields);
            in_buf.push((seq, resp));
        }
        if failed.is_none() {
            if self.pending.uncovered >= self.checkpoint_every_events {
                self.append_checkpoint();
            }
            match self.flush() {
                Ok(()) => written.append(&mut in_buf),
                Err(f) => {
                    for (_, r) in in_buf.drain(..) {
                        let _ = r.send(Err(f.to_error()));
                    }
                    failed = Some(f);
                }
            }
        }
        let durable = if written.is_empty() {
            Ok(())
        } else {
            self.after_write()
        };
        // Before answering, so a caller that saw its answer sees the state.
        self.healthy
            .store(failed.is_none() && durable.is_ok(), Ordering::Relaxed);
        for (seq, resp) in written {
            let _ = resp.send(match &durable {
                Ok(()) => Ok(seq),
                Err(f) => Err(f.to_error()),
            });
        }
    }

    fn needs_rotation(&self) -> bool {
        let len = self.file_len + self.buf.len() as u64;
        len > 0 && len >= self.rotate_bytes
    }

    /// Appends one line to `buf` and advances the pending head. `fields` is
    /// `"type":...` without braces.
    fn append_line(&mut self, fields: &[u8]) -> u64 {
        let seq = self.pending.next_seq;
        let start = self.buf.len();
        self.buf.extend_from_slice(b"{\"seq\":");
        // Writing to a Vec cannot fail.
        let _ = write!(self.buf, "{seq}");
        self.buf.extend_from_slice(b",\"time\":\"");
        self.buf.extend_from_slice(&format_rfc3339_ms(now_ms()));
        self.buf.extend_from_slice(b"\",");
        self.buf.extend_from_slice(fields);
        self.buf.extend_from_slice(b",\"prev_hash\":\"");
        self.buf.extend_from_slice(&self.pending.prev_hash);
        self.buf.extend_from_slice(b"\"}");
        let hash = chain::line_hash(&self.pending.prev_hash, &self.buf[start..], b"");
        self.buf.pop();
        self.buf.extend_from_slice(b",\"hash\":\"");
        self.buf.extend_from_slice(&hash);
        self.buf.extend_from_slice(b"\"}\n");
        self.pending.next_seq += 1;
        self.pending.prev_hash = hash;
        seq
    }

    fn append_event(&mut self, fields: &[u8]) -> u64 {
        let seq = self.append_line(fields);
        self.pending.uncovered += 1;
        seq
    }

    /// Appends a checkpoint covering the last pending line, if there is one.
    fn append_checkpoint(&mut self) {
        let covers = self.pending.next_seq - 1;
        if covers == 0 {
            return;
        }
        let head = self.pending.prev_hash;
        let signature = self.key.sign(&chain::checkpoint_message(covers, &head));
        let mut fields = Vec::with_capacity(256);
        fields.extend_from_slice(b"\"type\":\"checkpoint\",\"covers_seq\":");
        let _ = write!(fields, "{covers}");
        fields.extend_from_slice(b",\"head_hash\":\"");
        fields.extend_from_slice(&head);
        fields.extend_from_slice(b"\",\"signature\":\"");
        fields.extend_from_slice(hex::encode(signature.to_bytes()).as_bytes());
        fields.push(b'"');
        self.append_line(&fields);
        self.pending.uncovered = 0;
        self.checkpoint_in_buf = true;
    }

    /// Writes `buf` with one write(2). On failure nothing of it stays in the
    /// file and the pending head falls back to the committed one.
    fn flush(&mut self) -> Result<(), Failure> {
        if self.must_truncate {
            self.file.set_len(self.file_len).map_err(|e| {
                self.healthy.store(false, Ordering::Relaxed);
                Failure::new("cutting back", &self.path, &e)
            })?;
            self.must_truncate = false;
        }
        let checkpointed = std::mem::take(&mut self.checkpoint_in_buf);
        if self.buf.is_empty() {
            return Ok(());
        }
        let len = self.buf.len() as u64;
        let result = reserve(&self.file, self.file_len, len)
            .and_then(|()| (&*self.file).write_all(&self.buf));
        self.buf.clear();
        match result {
            Ok(()) => {
                self.file_len += len;
                self.committed = self.pending;
                self.durability
                    .wrote(self.committed.next_seq.saturating_sub(1));
                if self.committed.uncovered == 0 {
                    self.uncovered_since = None;
                } else if self.uncovered_since.is_none() || checkpointed {
                    self.uncovered_since = Some(Instant::now());
                }
                Ok(())
            }
            Err(e) => {
                self.healthy.store(false, Ordering::Relaxed);
                let failure = Failure::new("writing", &self.path, &e);
                self.pending = self.committed;
                if self.committed.uncovered > 0 && self.uncovered_since.is_none() {
                    self.uncovered_since = Some(Instant::now());
                }
                if let Err(cut) = self.file.set_len(self.file_len) {
                    error!(file = %self.path.display(), "audit: cannot cut back a failed write: {cut}");
                    self.must_truncate = true;
                }
                Err(failure)
            }
        }
    }

    /// Makes written lines as durable as the mode asks.
    fn after_write(&mut self) -> Result<(), Failure> {
        match &self.syncer {
            Some(syncer) => {
                syncer.mark_dirty();
                Ok(())
            }
            None => self.sync(),
        }
    }

    fn sync(&self) -> Result<(), Failure> {
        let started = Instant::now();
        let upto = self.durability.written_seq();
        self.file.sync_data().map_err(|e| {
            self.healthy.store(false, Ordering::Relaxed);
            Failure::new("syncing", &self.path, &e)
        })?;
        self.durability.synced(upto, started);
        Ok(())
    }

    /// Ends the current file with a checkpoint and starts the next one.
    fn rotate(&mut self) -> Result<(), Failure> {
        if self.pending.uncovered > 0 {
            self.append_checkpoint();
            self.flush()?;
        }
        self.sync()?;
        let index = self.index + 1;
        let path = self.dir.join(chain::file_name(index));
        let file = match open_append(&path, true) {
            Ok(f) => f,
            // Left by an earlier attempt that failed after creating it: use
            // it only if it is empty (never overwrite events).
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let f =
                    open_append(&path, false).map_err(|e| Failure::new("opening", &path, &e))?;
                let len = f
                    .metadata()
                    .map_err(|e| Failure::new("reading", &path, &e))?
                    .len();
                if len > 0 {
                    return Err(Failure {
                        kind: io::ErrorKind::AlreadyExists,
                        message: format!("{} already exists and is not empty", path.display()),
                    });
                }
                f
            }
            Err(e) => return Err(Failure::new("creating", &path, &e)),
        };
        key::sync_parent(&path);
        let file = Arc::new(file);
        if let Some(syncer) = &self.syncer {
            syncer.set_file(file.clone());
        }
        self.file = file;
        self.path = path;
        self.index = index;
        self.file_len = 0;
        Ok(())
    }

    /// Final checkpoint and sync.
    fn shutdown(&mut self) -> Result<(), AuditError> {
        if self.committed.uncovered > 0 {
            self.append_checkpoint();
        }
        let result = self.flush().and_then(|()| self.sync());
        drop(self.syncer.take());
        result.map_err(|f| f.to_error())
    }
}

/// Group commit: syncs the current file at most once per interval while
/// there is unsynced data, so the writer never waits for the disk.
struct Syncer {
    shared: Arc<(Mutex<SyncState>, Condvar)>,
    thread: Option<thread::JoinHandle<()>>,
}

struct SyncState {
    file: Arc<File>,
    dirty: bool,
    stop: bool,
}

fn lock_state(m: &Mutex<SyncState>) -> MutexGuard<'_, SyncState> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Syncer {
    fn start(
        file: Arc<File>,
        every: Duration,
        durability: Arc<super::Durability>,
    ) -> Result<Self, AuditError> {
        let shared = Arc::new((
            Mutex::new(SyncState {
                file,
                dirty: false,
                stop: false,
            }),
            Condvar::new(),
        ));
        let theirs = shared.clone();
        let lag = durability;
        let thread = thread::Builder::new()
            .name("audit-sync".into())
            .spawn(move || Self::run(&theirs, every, &lag))
            .map_err(|source| AuditError::Io {
                path: PathBuf::from("audit-sync thread"),
                source,
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    fn run(shared: &(Mutex<SyncState>, Condvar), every: Duration, lag: &super::Durability) {
        let (state, cv) = shared;
        loop {
            let file = {
                let mut g = lock_state(state);
                while !g.dirty && !g.stop {
                    g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                if !g.dirty {
                    return;
                }
                g.dirty = false;
                g.file.clone()
            };
            // Read after taking the file: every line counted here was
            // written to this file (rotation syncs the old one itself).
            let started = Instant::now();
            let upto = lag.written_seq();
            match file.sync_data() {
                Ok(()) => lag.synced(upto, started),
                Err(e) => {
                    error!("audit: group-commit fdatasync failed: {e}");
                    lock_state(state).dirty = true;
                }
            }
            let until = Instant::now() + every;
            let mut g = lock_state(state);
            while !g.stop {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                g = cv
                    .wait_timeout(g, until - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            if g.stop {
                return;
            }
        }
    }

    fn mark_dirty(&self) {
        let (state, cv) = &*self.shared;
        lock_state(state).dirty = true;
        cv.notify_one();
    }

    fn set_file(&self, file: Arc<File>) {
        lock_state(&self.shared.0).file = file;
    }
}

impl Drop for Syncer {
    /// Stops the thread (the writer syncs the file itself at close).
    fn drop(&mut self) {
        let (state, cv) = &*self.shared;
        lock_state(state).stop = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
