//! The writer: the current audit file and the chain head behind one short
//! lock, taken by the recording task itself, which assigns `seq`, `time`,
//! `prev_hash` and `hash` and writes its line with one write(2); crash
//! recovery at open; the background thread that fdatasyncs (group commit
//! for `fsync = "interval"`, shared syncs for `fsync = "always"`) and writes
//! time-based checkpoints.
//!
//! Owns the chain head (next seq, previous hash) and the files' lengths.
//! Nothing on the data path waits for another thread except an
//! `fsync = "always"` recorder waiting for the sync that covers its line.

use std::{
    fs::{self, File},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use ed25519_dalek::{Signer as _, SigningKey};
use tokio::sync::oneshot;
use tracing::{error, warn};

use super::{
    chain::{self, LineProblem, GENESIS_HASH},
    key,
    time::{format_rfc3339_ms, now_ms},
    AuditConfig, AuditError, AuditEvent, FsyncMode, OpenReport, Recovery,
};

/// Backward read size when looking for the last lines of a file.
const TAIL_CHUNK: u64 = 64 * 1024;
/// The lock file in the audit directory that keeps a second writer out.
const LOCK_FILE: &str = ".writer.lock";

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

/// The log's file and chain head, behind [`Core`]'s lock.
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
    sync: Arc<SyncShared>,
    _lock: DirLock,
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
) -> Result<(Arc<Core>, OpenReport), AuditError> {
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
    let sync = Arc::new(SyncShared::new(found.file.clone()));
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
        uncovered_since: None,
        must_truncate: false,
        checkpoint_in_buf: false,
        key: signing,
        rotate_bytes: cfg.rotate_bytes.max(1),
        checkpoint_every_events: cfg.checkpoint_every_events.max(1),
        checkpoint_every: cfg.checkpoint_every,
        buf: Vec::with_capacity(64 * 1024),
        healthy,
        durability,
        sync: sync.clone(),
        _lock: lock,
    };
    writer.set_uncovered_since((head.uncovered > 0).then(Instant::now));

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
    let healthy = writer.healthy.clone();
    let durability = writer.durability.clone();
    let core = Arc::new(Core {
        writer: WriterLock::new(writer),
        sync,
        fsync: cfg.fsync,
        healthy,
        durability,
    });
    let theirs = core.clone();
    thread::Builder::new()
        .name("audit-sync".into())
        .spawn(move || theirs.run_sync())
        .map_err(io_err(&cfg.dir))?;
    Ok((core, report))
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

impl Writer {
    /// Records the uncovered-since time and tells the sync thread when the
    /// time-based checkpoint falls due.
    fn set_uncovered_since(&mut self, at: Option<Instant>) {
        self.uncovered_since = at;
        let due = at.map_or(0, |t| self.sync.micros(t + self.checkpoint_every));
        self.sync.checkpoint_at.store(due, Ordering::Relaxed);
    }

    /// Appends one event (rotating first when the file is full, adding a
    /// checkpoint when enough events are uncovered) with one write(2).
    /// On failure nothing of it is in the file and it took no seq.
    fn write_event(&mut self, fields: &[u8]) -> Result<u64, Failure> {
        if self.needs_rotation() {
            if let Err(f) = self.rotate() {
                self.healthy.store(false, Ordering::Relaxed);
                return Err(f);
            }
        }
        let seq = self.append_event(fields);
        if self.pending.uncovered >= self.checkpoint_every_events {
            self.append_checkpoint();
        }
        self.flush()?;
        self.healthy.store(true, Ordering::Relaxed);
        Ok(seq)
    }

    /// Writes the time-based checkpoint when it is due. Returns whether
    /// something was written (and needs syncing).
    fn tick(&mut self) -> bool {
        let due = self
            .uncovered_since
            .is_some_and(|t| Instant::now() >= t + self.checkpoint_every);
        if !due {
            return false;
        }
        if self.committed.uncovered == 0 {
            self.set_uncovered_since(None);
            return false;
        }
        self.append_checkpoint();
        match self.flush() {
            Ok(()) => true,
            Err(f) => {
                error!("audit: writing a checkpoint: {}", f.message);
                self.healthy.store(false, Ordering::Relaxed);
                // Try again at the next deadline rather than spinning.
                self.set_uncovered_since(Some(Instant::now()));
                false
            }
        }
    }

    /// Forgets lines appended to `buf` but not written: what a holder that
    /// panicked mid-event leaves. The head falls back to the last write.
    fn discard_unwritten(&mut self) {
        self.buf.clear();
        self.checkpoint_in_buf = false;
        self.pending = self.committed;
    }

    fn needs_rotation(&self) -> bool {
        self.file_len > 0 && self.file_len >= self.rotate_bytes
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

    /// Writes `buf` with one write(2) (no preallocation: a full disk fails
    /// the write itself, which is then cut back). On failure nothing of it
    /// stays in the file and the pending head falls back to the committed
    /// one.
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
        let result = (&*self.file).write_all(&self.buf);
        self.buf.clear();
        match result {
            Ok(()) => {
                self.file_len += len;
                self.committed = self.pending;
                self.durability
                    .wrote(self.committed.next_seq.saturating_sub(1));
                if self.committed.uncovered == 0 {
                    if self.uncovered_since.is_some() {
                        self.set_uncovered_since(None);
                    }
                } else if self.uncovered_since.is_none() || checkpointed {
                    self.set_uncovered_since(Some(Instant::now()));
                }
                Ok(())
            }
            Err(e) => {
                self.healthy.store(false, Ordering::Relaxed);
                let failure = Failure::new("writing", &self.path, &e);
                self.pending = self.committed;
                if self.committed.uncovered > 0 && self.uncovered_since.is_none() {
                    self.set_uncovered_since(Some(Instant::now()));
                }
                if let Err(cut) = self.file.set_len(self.file_len) {
                    error!(file = %self.path.display(), "audit: cannot cut back a failed write: {cut}");
                    self.must_truncate = true;
                }
                Err(failure)
            }
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
        // Before any line goes to the new file: a sync that counts a line
        // of the new file then always syncs the new file.
        self.sync.lock().file = file.clone();
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
        self.flush()
            .and_then(|()| self.sync())
            .map_err(|f| f.to_error())
    }
}

/// The writer behind a short lock. Its holder formats, hashes and writes
/// one line (about 3 µs), so a recorder on another thread spins for it
/// first rather than queueing: with tokio's fair mutex, every contended
/// record cost a wake-up of the other worker's thread (each about 15 µs on
/// an idle vCPU) and every recorder behind it waited for that wake-up
/// too. A lock held longer than the spin (a rotation, a hung write) parks
/// its waiters on the runtime until it is released or their timeout ends,
/// so a stuck file system never blocks a worker thread for more than
/// [`SPIN_FOR`] per record.
struct WriterLock {
    inner: Mutex<Option<Writer>>,
    /// Recorders parked in [`WriterLock::lock`]'s slow path.
    parked: AtomicUsize,
    released: tokio::sync::Notify,
}

/// How long a recorder spins for the writer before parking: many times the
/// usual hold, far below a worker thread's wake-up.
const SPIN_FOR: Duration = Duration::from_micros(20);

/// The writer, held. Dropping it wakes the recorders parked for it.
struct WriterGuard<'a> {
    lock: &'a WriterLock,
    guard: Option<MutexGuard<'a, Option<Writer>>>,
}

impl std::ops::Deref for WriterGuard<'_> {
    type Target = Option<Writer>;
    fn deref(&self) -> &Option<Writer> {
        match self.guard.as_deref() {
            Some(w) => w,
            None => unreachable!("a writer guard is held until it is dropped"),
        }
    }
}

impl std::ops::DerefMut for WriterGuard<'_> {
    fn deref_mut(&mut self) -> &mut Option<Writer> {
        match self.guard.as_deref_mut() {
            Some(w) => w,
            None => unreachable!("a writer guard is held until it is dropped"),
        }
    }
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // Pairs with the fence in `Parked::new`: either a parked
        // recorder's last look saw the lock free, or this sees it parked.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.lock.parked.load(Ordering::Relaxed) > 0 {
            self.lock.released.notify_waiters();
        }
    }
}

impl WriterLock {
    fn new(writer: Writer) -> Self {
        Self {
            inner: Mutex::new(Some(writer)),
            parked: AtomicUsize::new(0),
            released: tokio::sync::Notify::new(),
        }
    }

    fn guard<'a>(&'a self, guard: MutexGuard<'a, Option<Writer>>) -> WriterGuard<'a> {
        WriterGuard {
            lock: self,
            guard: Some(guard),
        }
    }

    /// The writer if it is free now. A lock poisoned by a panic while it
    /// was held is taken after dropping what that holder had not written
    /// yet (see [`Writer::discard_unwritten`]).
    fn try_lock(&self) -> Option<WriterGuard<'_>> {
        match self.inner.try_lock() {
            Ok(g) => Some(self.guard(g)),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(self.recovered(p.into_inner())),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Blocks the thread until the writer is free (the sync thread, tests).
    fn lock_blocking(&self) -> WriterGuard<'_> {
        match self.inner.lock() {
            Ok(g) => self.guard(g),
            Err(p) => self.recovered(p.into_inner()),
        }
    }

    fn recovered<'a>(&'a self, mut guard: MutexGuard<'a, Option<Writer>>) -> WriterGuard<'a> {
        self.inner.clear_poison();
        if let Some(w) = guard.as_mut() {
            w.discard_unwritten();
        }
        self.guard(guard)
    }

    /// The writer if it is freed within [`SPIN_FOR`].
    fn spin_for_it(&self) -> Option<WriterGuard<'_>> {
        if let Some(g) = self.try_lock() {
            return Some(g);
        }
        let started = Instant::now();
        while started.elapsed() < SPIN_FOR {
            std::hint::spin_loop();
            if let Some(g) = self.try_lock() {
                return Some(g);
            }
        }
        None
    }

    /// The writer, spinning for it briefly, then parked until it is
    /// released; `None` when it stayed taken for `timeout`. A recorder woken
    /// from parking spins again: recorders that never parked take the lock
    /// in turn while it sleeps, and one that only looked once at each
    /// release could lose every time while they keep it busy.
    async fn lock(&self, timeout: Duration) -> Option<WriterGuard<'_>> {
        let started = tokio::time::Instant::now();
        // A free lock is taken without awaiting: count it against the
        // task's budget, so a task recording in a loop still lets the
        // others on its thread (a parked recorder among them) run.
        tokio::task::consume_budget().await;
        if let Some(g) = self.spin_for_it() {
            return Some(g);
        }
        let deadline = started.checked_add(timeout);
        let _parked = Parked::new(&self.parked);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the last look: a release after it wakes us.
            released.as_mut().enable();
            if let Some(g) = self.try_lock() {
                break Some(g);
            }
            match deadline {
                Some(at) => {
                    if tokio::time::timeout_at(at, released).await.is_err() {
                        break self.try_lock();
                    }
                }
                None => released.await,
            }
            if let Some(g) = self.spin_for_it() {
                break Some(g);
            }
        }
    }
}

/// A recorder counted as parked until it stops waiting, also when its
/// future is dropped mid-wait (its session ended).
struct Parked<'a>(&'a AtomicUsize);

impl<'a> Parked<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        // Pairs with the fence in `WriterGuard::drop`: either a release
        // sees this recorder parked, or its next look sees the lock free.
        std::sync::atomic::fence(Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where an `fsync = "always"` recorder hears about the sync covering its
/// line.
type SyncWaiter = oneshot::Sender<Result<(), Failure>>;

/// What the recording tasks share with the sync thread.
pub(crate) struct SyncShared {
    state: Mutex<SyncState>,
    cv: Condvar,
    /// Lines were written since the sync thread last looked. Set without
    /// the mutex on the data path; the mutex is taken (to wake the thread)
    /// only when it goes from false to true.
    dirty: AtomicBool,
    /// When the time-based checkpoint is due: microseconds since `base`,
    /// +1; 0 when nothing is uncovered.
    checkpoint_at: AtomicU64,
    base: Instant,
    /// Successful fdatasyncs done by the sync thread (tests).
    #[cfg(test)]
    pub(crate) syncs: AtomicU64,
    /// Tests: the sync thread takes no waiters while set.
    #[cfg(test)]
    pub(crate) paused: AtomicBool,
    /// Tests: the sync thread's fdatasync fails (as EIO) while set.
    #[cfg(test)]
    pub(crate) fail_syncs: AtomicBool,
}

struct SyncState {
    /// The file lines are appended to now.
    file: Arc<File>,
    /// `fsync = "always"` recorders waiting, with the seq of their line.
    waiters: Vec<(u64, SyncWaiter)>,
    /// Stop: the log was closed, or every handle is gone.
    stop: bool,
    /// The outcome of the final sync once the log was shut down.
    final_sync: Option<Result<(), Failure>>,
}

impl SyncShared {
    fn new(file: Arc<File>) -> Self {
        Self {
            state: Mutex::new(SyncState {
                file,
                waiters: Vec::new(),
                stop: false,
                final_sync: None,
            }),
            cv: Condvar::new(),
            dirty: AtomicBool::new(false),
            checkpoint_at: AtomicU64::new(0),
            base: Instant::now(),
            #[cfg(test)]
            syncs: AtomicU64::new(0),
            #[cfg(test)]
            paused: AtomicBool::new(false),
            #[cfg(test)]
            fail_syncs: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_micros() as u64 + 1
    }

    fn checkpoint_due(&self) -> Option<Instant> {
        match self.checkpoint_at.load(Ordering::Relaxed) {
            0 => None,
            us => Some(self.base + Duration::from_micros(us - 1)),
        }
    }

    /// Tells the sync thread that lines were written.
    fn mark_dirty(&self) {
        if !self.dirty.swap(true, Ordering::AcqRel) {
            // Taking the mutex orders this with the thread's check: it
            // either sees the flag or is already waiting for this notify.
            drop(self.lock());
            self.cv.notify_one();
        }
    }
}

/// The log behind its lock, and the sync thread's side. Shared by every
/// [`super::AuditLog`] handle and the sync thread.
pub(crate) struct Core {
    /// `None` once closed. The holder does one write(2) (a rotation: a few
    /// more calls, once per file).
    writer: WriterLock,
    pub(crate) sync: Arc<SyncShared>,
    fsync: FsyncMode,
    healthy: Arc<AtomicBool>,
    durability: Arc<super::Durability>,
}

impl Core {
    /// Appends an event (its encoded fields) on the caller's task and
    /// returns its seq once the line is in the file; with
    /// `fsync = "always"` once a sync that began after the write succeeded.
    pub(crate) async fn record(
        &self,
        fields: &[u8],
        lock_timeout: Duration,
        reply_timeout: Duration,
    ) -> Result<u64, AuditError> {
        let seq = {
            let mut guard = self
                .writer
                .lock(lock_timeout)
                .await
                .ok_or(AuditError::QueueFull(lock_timeout))?;
            let writer = guard.as_mut().ok_or(AuditError::Closed)?;
            writer.write_event(fields).map_err(|f| f.to_error())?
        };
        match self.fsync {
            FsyncMode::Interval(_) => {
                self.sync.mark_dirty();
                Ok(seq)
            }
            FsyncMode::Always => {
                let (tx, rx) = oneshot::channel();
                {
                    let mut state = self.sync.lock();
                    if state.stop {
                        // Closed after the write: the final sync covered it.
                        return match &state.final_sync {
                            Some(Ok(())) => Ok(seq),
                            Some(Err(f)) => Err(f.to_error()),
                            None => Err(AuditError::Closed),
                        };
                    }
                    state.waiters.push((seq, tx));
                }
                self.sync.cv.notify_one();
                match tokio::time::timeout(reply_timeout, rx).await {
                    Ok(Ok(Ok(()))) => Ok(seq),
                    Ok(Ok(Err(f))) => Err(f.to_error()),
                    Ok(Err(_)) => Err(AuditError::Closed),
                    Err(_) => Err(AuditError::Timeout(reply_timeout)),
                }
            }
        }
    }

    /// [`Core::record`] without awaiting, for callers that cannot await:
    /// the line is appended now if the writer's lock is free or freed
    /// within the short spin `record` also does first, under
    /// `fsync = "interval"` (where `record` does not wait for a sync
    /// either). `None` when it would have to wait longer (lock still taken,
    /// or `fsync = "always"`): nothing was written, the caller records it
    /// the waiting way.
    pub(crate) fn try_record(&self, fields: &[u8]) -> Option<Result<u64, AuditError>> {
        if !matches!(self.fsync, FsyncMode::Interval(_)) {
            return None;
        }
        let mut guard = self.writer.spin_for_it()?;
        let Some(writer) = guard.as_mut() else {
            return Some(Err(AuditError::Closed));
        };
        let written = writer.write_event(fields).map_err(|f| f.to_error());
        drop(guard);
        if written.is_ok() {
            self.sync.mark_dirty();
        }
        Some(written)
    }

    /// Tests: recorders parked for the writer now.
    #[cfg(test)]
    pub(crate) fn parked_recorders(&self) -> usize {
        self.writer.parked.load(Ordering::Relaxed)
    }

    /// Tests: a holder that panics between appending an event to the
    /// buffer and writing it, which poisons the lock.
    #[cfg(test)]
    pub(crate) fn panic_mid_event(&self, fields: &[u8]) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut held = self.writer.lock_blocking();
            if let Some(w) = held.as_mut() {
                w.append_event(fields);
            }
            panic!("a holder's panic mid-event (test)");
        }));
        assert!(outcome.is_err());
    }

    /// Tests: holds the writer's lock, as a recorder in the middle of its
    /// write does.
    #[cfg(test)]
    pub(crate) fn hold_writer(&self) -> impl Drop + '_ {
        self.writer.lock_blocking()
    }

    /// Final checkpoint and sync, then the file and the directory lock are
    /// released and the sync thread stops.
    pub(crate) async fn close(&self) -> Result<(), AuditError> {
        let writer = self
            .writer
            .lock(Duration::MAX)
            .await
            .and_then(|mut g| g.take());
        let Some(mut writer) = writer else {
            return Err(AuditError::Closed);
        };
        let result = writer.shutdown();
        // Release the file and the directory lock before answering, so the
        // log can be opened again at once.
        drop(writer);
        self.stop(result.as_ref().err().map(|e| Failure {
            kind: io::ErrorKind::Other,
            message: e.to_string(),
        }));
        result
    }

    /// Asks the sync thread to close the log and stop (the last handle is
    /// gone). Does not wait.
    pub(crate) fn request_stop(&self) {
        self.sync.lock().stop = true;
        self.sync.cv.notify_one();
    }

    /// Stops the sync thread after the log was shut down; waiters get the
    /// outcome of the final sync.
    fn stop(&self, failure: Option<Failure>) {
        let waiters = {
            let mut state = self.sync.lock();
            state.stop = true;
            if state.final_sync.is_none() {
                state.final_sync = Some(failure.clone().map_or(Ok(()), Err));
            }
            std::mem::take(&mut state.waiters)
        };
        self.sync.cv.notify_one();
        for (_, w) in waiters {
            let _ = w.send(failure.clone().map_or(Ok(()), Err));
        }
    }

    /// The sync thread: fdatasync when lines were written (at most once per
    /// interval with group commit, at once for `fsync = "always"` waiters,
    /// who share one sync), and the time-based checkpoint.
    fn run_sync(self: Arc<Self>) {
        let every = match self.fsync {
            FsyncMode::Interval(every) => every,
            FsyncMode::Always => Duration::ZERO,
        };
        let sync = &*self.sync;
        // The earliest time of the next sync.
        let mut next_sync = Instant::now();
        loop {
            {
                let mut state = sync.lock();
                loop {
                    if state.stop {
                        break;
                    }
                    let now = Instant::now();
                    let pending = sync.dirty.load(Ordering::Acquire) || !state.waiters.is_empty();
                    let sync_at = pending.then_some(next_sync);
                    let wake = match (sync_at, sync.checkpoint_due()) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    match wake {
                        Some(at) if at <= now => break,
                        Some(at) => {
                            state = sync
                                .cv
                                .wait_timeout(state, at - now)
                                .map(|(g, _)| g)
                                .unwrap_or_else(|p| p.into_inner().0);
                        }
                        None => state = sync.cv.wait(state).unwrap_or_else(|p| p.into_inner()),
                    }
                }
                if state.stop {
                    drop(state);
                    // Every handle is gone (or close already shut down).
                    let writer = self.writer.lock_blocking().take();
                    let failure = writer.map(|mut w| {
                        let r = w.shutdown();
                        if let Err(e) = &r {
                            error!("audit: closing the log: {e}");
                        }
                        r.err().map(|e| Failure {
                            kind: io::ErrorKind::Other,
                            message: e.to_string(),
                        })
                    });
                    self.stop(failure.flatten());
                    return;
                }
            }
            if sync.checkpoint_due().is_some_and(|at| at <= Instant::now()) {
                let wrote = match self.writer.lock_blocking().as_mut() {
                    Some(w) => w.tick(),
                    None => false,
                };
                if wrote {
                    sync.dirty.store(true, Ordering::Release);
                }
            }
            if Instant::now() < next_sync {
                continue;
            }
            #[cfg(test)]
            if sync.paused.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(1));
                continue;
            }
            // The file and the seq it holds up to, taken together (see
            // rotate), and the waiters whose lines are at or below it.
            let (file, upto, waiters) = {
                let mut state = sync.lock();
                if !sync.dirty.swap(false, Ordering::AcqRel) && state.waiters.is_empty() {
                    continue;
                }
                (
                    state.file.clone(),
                    self.durability.written_seq(),
                    std::mem::take(&mut state.waiters),
                )
            };
            let started = Instant::now();
            let synced = file.sync_data();
            #[cfg(test)]
            let synced = match synced {
                Ok(()) if sync.fail_syncs.load(Ordering::Relaxed) => {
                    Err(io::Error::from_raw_os_error(libc::EIO))
                }
                other => other,
            };
            let result = match synced {
                Ok(()) => {
                    self.durability.synced(upto, started);
                    #[cfg(test)]
                    sync.syncs.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => {
                    error!("audit: fdatasync failed: {e}");
                    self.healthy.store(false, Ordering::Relaxed);
                    // Group commit tries again at the next interval;
                    // `always` waiters got the error, later ones sync anew.
                    if !every.is_zero() {
                        sync.dirty.store(true, Ordering::Release);
                    }
                    Err(Failure {
                        kind: e.kind(),
                        message: format!("syncing the audit log: {e}"),
                    })
                }
            };
            for (_, w) in waiters {
                let _ = w.send(result.clone());
            }
            next_sync = Instant::now() + every;
        }
    }
}
