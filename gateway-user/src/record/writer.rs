//! The recorder's writer thread: takes the queue at least once a flush
//! interval, appends to the session files, keeps `session.har` a complete
//! document and `meta.json` current.
//!
//! Owns every open recording file and the per-session size accounting. It
//! must not block handles (it holds the queue lock only to take the queue)
//! and must not touch sessions other than through their messages.

use std::{
    collections::HashMap,
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{atomic::Ordering, mpsc, Arc},
    thread::JoinHandle,
    time::Duration,
};

use tracing::warn;

use super::{
    har, now_ms, ChannelInfo, Counters, HarEntry, Msg, PgStatementRecord, RecordError,
    RecorderConfig, SessionInfo, Shared, HAR_FILE, META_FILE, POSTGRES_FILE,
};
use super::{McpMessageRecord, MCP_FILE};

/// Creates `dir` and its missing parents, 0700.
pub(super) fn make_dir_all(dir: &Path) -> Result<(), RecordError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| RecordError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Opens a new file (0600) for appending; fails if it exists.
fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Replaces `path` with `bytes` atomically: `<path>.tmp`, then rename.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    fs::rename(&tmp, path)
}

/// `meta.json`'s bytes for `info`.
pub(super) fn meta_bytes(info: &SessionInfo) -> Vec<u8> {
    // Serializing plain data into memory cannot fail; fall back to an empty
    // object rather than panic.
    let mut v = serde_json::to_vec_pretty(info).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    v
}

/// Starts the writer thread.
pub(super) fn spawn(shared: Arc<Shared>) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("recorder".into())
        .spawn(move || run(&shared))
}

fn run(shared: &Shared) {
    let mut w = Writer {
        cfg: &shared.cfg,
        sessions: HashMap::new(),
    };
    loop {
        let (batch, closed) = take(shared);
        let mut replies = Vec::new();
        for msg in batch {
            w.handle(msg, &mut replies);
        }
        w.flush_all();
        if closed {
            w.end_all("recorder stopped");
        }
        for r in replies {
            let _ = r.send(());
        }
        if closed {
            return;
        }
    }
}

/// Waits up to a flush interval (less when woken), then takes the queue.
fn take(shared: &Shared) -> (std::collections::VecDeque<Msg>, bool) {
    let mut q = shared.lock();
    if !q.closed && !q.woken {
        q = match shared.cv.wait_timeout(q, shared.cfg.flush_interval) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        };
    }
    while shared.hold.load(Ordering::SeqCst) && !q.closed {
        q = match shared.cv.wait_timeout(q, Duration::from_millis(10)) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        };
    }
    q.woken = false;
    q.data_msgs = 0;
    q.data_bytes = 0;
    (std::mem::take(&mut q.msgs), q.closed)
}

struct Writer<'a> {
    cfg: &'a RecorderConfig,
    sessions: HashMap<u64, Sess>,
}

/// An append-only file and what waits to be appended.
struct Appender {
    file: File,
    buf: Vec<u8>,
}

impl Appender {
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let r = self.file.write_all(&self.buf);
            self.buf.clear();
            r?;
        }
        Ok(())
    }
}

struct CastW {
    app: Appender,
    last_t: f64,
    /// Index in `info.channels`.
    index: usize,
}

struct HarW {
    file: File,
    /// Where the tail starts (the next entry goes there).
    tail_at: u64,
    entries: u64,
    pending: Vec<u8>,
}

impl HarW {
    /// Writes the pending entries. The buffer keeps its capacity while the
    /// session sends requests (it is refilled by the next batch) and is
    /// given back at the first flush that finds nothing pending, so an
    /// idle session holds no buffer past one flush interval.
    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            self.pending = Vec::new();
            return Ok(());
        }
        let added = self.pending.len() as u64;
        self.pending.extend_from_slice(har::TAIL);
        // One write: entries and the new tail over the old tail.
        let written = self.file.write_all_at(&self.pending, self.tail_at);
        self.pending.clear();
        written?;
        self.tail_at += added;
        Ok(())
    }
}

struct Sess {
    dir: PathBuf,
    info: SessionInfo,
    counters: Arc<Counters>,
    pg: Option<Appender>,
    mcp: Option<Appender>,
    har: Option<HarW>,
    casts: HashMap<u64, CastW>,
    stopped: bool,
    meta_dirty: bool,
    meta_dropped: u64,
}

impl Sess {
    /// Accounts `n` more bytes; false (and the session stops, capped) when
    /// they would pass the cap.
    fn admit(&mut self, n: usize, max: u64) -> bool {
        if self.stopped {
            return false;
        }
        let n = n as u64;
        if self.info.recorded_bytes.saturating_add(n) > max {
            self.stopped = true;
            self.info.capped = true;
            self.info.capped_ms = Some(now_ms());
            self.counters.stopped.store(true, Ordering::Relaxed);
            self.meta_dirty = true;
            return false;
        }
        self.info.recorded_bytes += n;
        true
    }

    /// Stops the session's recording after an I/O error.
    fn fail(&mut self, what: &str, err: &io::Error) {
        warn!(session = %self.info.meta.id, %what, %err, "recording stopped");
        if self.info.error.is_none() {
            self.info.error = Some(format!("{what}: {err}"));
        }
        self.stopped = true;
        self.counters.stopped.store(true, Ordering::Relaxed);
        self.meta_dirty = true;
    }

    fn flush_files(&mut self) {
        let mut errors = Vec::new();
        if let Some(pg) = self.pg.as_mut() {
            if let Err(e) = pg.flush() {
                errors.push((POSTGRES_FILE.to_owned(), e));
            }
        }
        if let Some(m) = self.mcp.as_mut() {
            if let Err(e) = m.flush() {
                errors.push((MCP_FILE.to_owned(), e));
            }
        }
        if let Some(h) = self.har.as_mut() {
            if let Err(e) = h.flush() {
                errors.push((HAR_FILE.to_owned(), e));
            }
        }
        for c in self.casts.values_mut() {
            if let Err(e) = c.app.flush() {
                let file = self
                    .info
                    .channels
                    .get(c.index)
                    .map(|ch| ch.file.clone())
                    .unwrap_or_default();
                errors.push((file, e));
            }
        }
        for (file, e) in errors {
            self.fail(&file, &e);
        }
    }

    fn write_meta(&mut self) {
        self.info.dropped = self.counters.dropped.load(Ordering::Relaxed);
        self.info.counts.bytes_from_client = self.counters.from_client.load(Ordering::Relaxed);
        self.info.counts.bytes_to_client = self.counters.to_client.load(Ordering::Relaxed);
        self.meta_dropped = self.info.dropped;
        self.meta_dirty = false;
        let path = self.dir.join(META_FILE);
        if let Err(err) = write_atomic(&path, &meta_bytes(&self.info)) {
            warn!(session = %self.info.meta.id, %err, "recording: meta.json not written");
        }
    }

    fn pg(&mut self, rec: &PgStatementRecord, max: u64) {
        if self.stopped {
            return;
        }
        let mut line = match serde_json::to_vec(rec) {
            Ok(l) => l,
            Err(e) => {
                warn!(session = %self.info.meta.id, err = %e, "recording: statement not encoded");
                return;
            }
        };
        line.push(b'\n');
        if !self.admit(line.len(), max) {
            return;
        }
        if self.pg.is_none() {
            match create_new(&self.dir.join(POSTGRES_FILE)) {
                Ok(file) => {
                    self.pg = Some(Appender {
                        file,
                        buf: Vec::new(),
                    })
                }
                Err(e) => return self.fail(POSTGRES_FILE, &e),
            }
        }
        if let Some(pg) = self.pg.as_mut() {
            pg.buf.extend_from_slice(&line);
            self.info.counts.statements += 1;
        }
    }

    fn mcp(&mut self, rec: &McpMessageRecord, max: u64) {
        if self.stopped {
            return;
        }
        let mut line = match serde_json::to_vec(rec) {
            Ok(l) => l,
            Err(e) => {
                warn!(session = %self.info.meta.id, err = %e, "recording: mcp message not encoded");
                return;
            }
        };
        line.push(b'\n');
        if !self.admit(line.len(), max) {
            return;
        }
        if self.mcp.is_none() {
            match create_new(&self.dir.join(MCP_FILE)) {
                Ok(file) => {
                    self.mcp = Some(Appender {
                        file,
                        buf: Vec::new(),
                    })
                }
                Err(e) => return self.fail(MCP_FILE, &e),
            }
        }
        if let Some(m) = self.mcp.as_mut() {
            m.buf.extend_from_slice(&line);
            self.info.counts.mcp_messages += 1;
        }
    }

    fn http(&mut self, entry: &HarEntry, req_cut: bool, resp_cut: bool, max: u64) {
        if self.stopped {
            return;
        }
        if self.har.is_none() {
            let head = har::head(&self.info.meta.id);
            if !self.admit(head.len() + har::TAIL.len(), max) {
                return;
            }
            let path = self.dir.join(HAR_FILE);
            let mut doc = head.clone();
            doc.extend_from_slice(har::TAIL);
            let opened =
                write_atomic(&path, &doc).and_then(|()| OpenOptions::new().write(true).open(&path));
            match opened {
                Ok(file) => {
                    self.har = Some(HarW {
                        file,
                        tail_at: head.len() as u64,
                        entries: 0,
                        pending: Vec::new(),
                    })
                }
                Err(e) => return self.fail(HAR_FILE, &e),
            }
        }
        // Serialized where it is written, and taken back if the session's
        // cap does not admit it.
        let Some(h) = self.har.as_mut() else {
            return;
        };
        let start = h.pending.len();
        h.pending
            .extend_from_slice(if h.entries == 0 { b"\n" } else { b",\n" });
        let json_at = h.pending.len();
        har::write_entry(&mut h.pending, entry, req_cut, resp_cut);
        let json_len = h.pending.len() - json_at;
        if !self.admit(json_len + 2, max) {
            if let Some(h) = self.har.as_mut() {
                h.pending.truncate(start);
            }
            return;
        }
        if let Some(h) = self.har.as_mut() {
            h.entries += 1;
            self.info.counts.http_exchanges += 1;
        }
    }

    fn chan_open(
        &mut self,
        chan: u64,
        mut info: ChannelInfo,
        header: &serde_json::Value,
        max: u64,
    ) {
        if self.stopped {
            return;
        }
        let mut line = header.to_string().into_bytes();
        line.push(b'\n');
        if !self.admit(line.len(), max) {
            return;
        }
        let mut n = 1u32;
        let (file, name) = loop {
            let name = if n == 1 {
                format!("ssh-{}.cast", info.channel)
            } else {
                format!("ssh-{}-{n}.cast", info.channel)
            };
            match create_new(&self.dir.join(&name)) {
                Ok(f) => break (f, name),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 10_000 => n += 1,
                Err(e) => return self.fail(&name, &e),
            }
        };
        info.file = name;
        self.info.channels.push(info);
        self.info.counts.ssh_channels += 1;
        self.meta_dirty = true;
        self.casts.insert(
            chan,
            CastW {
                app: Appender { file, buf: line },
                last_t: 0.0,
                index: self.info.channels.len() - 1,
            },
        );
    }

    fn cast(&mut self, chan: u64, t: f64, code: &str, text: &str, max: u64) {
        if self.stopped {
            return;
        }
        let Some(last_t) = self.casts.get(&chan).map(|c| c.last_t) else {
            return;
        };
        // Events of different streams may arrive slightly out of order.
        let t = if t.is_finite() { t.max(last_t) } else { last_t };
        let mut line = match serde_json::to_vec(&(t, code, text)) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push(b'\n');
        if !self.admit(line.len(), max) {
            return;
        }
        if let Some(c) = self.casts.get_mut(&chan) {
            c.app.buf.extend_from_slice(&line);
            c.last_t = t;
        }
    }

    fn chan_end(
        &mut self,
        chan: u64,
        exit_code: Option<i32>,
        exit_signal: Option<String>,
        ended_ms: u64,
    ) {
        let Some(mut c) = self.casts.remove(&chan) else {
            return;
        };
        if let Err(e) = c.app.flush() {
            let file = self
                .info
                .channels
                .get(c.index)
                .map(|ch| ch.file.clone())
                .unwrap_or_default();
            self.fail(&file, &e);
        }
        if let Some(ch) = self.info.channels.get_mut(c.index) {
            ch.ended_ms = Some(ended_ms);
            ch.exit_code = exit_code;
            ch.exit_signal = exit_signal;
        }
        self.meta_dirty = true;
    }

    fn end(&mut self, reason: String, ended_ms: u64) {
        self.flush_files();
        for c in self.casts.values() {
            if let Some(ch) = self.info.channels.get_mut(c.index) {
                ch.ended_ms.get_or_insert(ended_ms);
            }
        }
        self.casts.clear();
        self.pg = None;
        self.mcp = None;
        self.har = None;
        self.info.ended_ms = Some(ended_ms);
        self.info.end_reason = Some(reason);
        self.write_meta();
    }
}

impl Writer<'_> {
    fn handle(&mut self, msg: Msg, replies: &mut Vec<mpsc::Sender<()>>) {
        let max = self.cfg.session_max_bytes;
        match msg {
            Msg::Open {
                key,
                info,
                counters,
            } => self.open(key, *info, counters),
            Msg::Pg { key, rec } => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.pg(&rec, max);
                }
            }
            Msg::Mcp { key, rec } => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.mcp(&rec, max);
                }
            }
            Msg::Http {
                key,
                entry,
                req_truncated,
                resp_truncated,
            } => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.http(&entry, req_truncated, resp_truncated, max);
                }
            }
            Msg::ChanOpen {
                key,
                chan,
                info,
                header,
            } => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.chan_open(chan, info, &header, max);
                }
            }
            Msg::Cast {
                key,
                chan,
                t,
                code,
                text,
            } => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.cast(chan, t, code, &text, max);
                }
            }
            Msg::ChanEnd {
                key,
                chan,
                exit_code,
                exit_signal,
                ended_ms,
            } => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.chan_end(chan, exit_code, exit_signal, ended_ms);
                }
            }
            Msg::End {
                key,
                reason,
                ended_ms,
            } => {
                if let Some(mut s) = self.sessions.remove(&key) {
                    s.end(reason, ended_ms);
                }
            }
            Msg::Flush(tx) => replies.push(tx),
        }
    }

    fn open(&mut self, key: u64, info: SessionInfo, counters: Arc<Counters>) {
        let dir = self.cfg.sessions_dir.join(&info.meta.id);
        if let Err(err) = DirBuilder::new().mode(0o700).create(&dir) {
            warn!(session = %info.meta.id, dir = %dir.display(), %err, "recording not started");
            counters.stopped.store(true, Ordering::Relaxed);
            return;
        }
        self.sessions.insert(
            key,
            Sess {
                dir,
                info,
                counters,
                pg: None,
                mcp: None,
                har: None,
                casts: HashMap::new(),
                stopped: false,
                meta_dirty: true,
                meta_dropped: 0,
            },
        );
    }

    fn flush_all(&mut self) {
        for s in self.sessions.values_mut() {
            s.flush_files();
            if s.counters.dropped.load(Ordering::Relaxed) != s.meta_dropped {
                s.meta_dirty = true;
            }
            if s.meta_dirty {
                s.write_meta();
            }
        }
    }

    fn end_all(&mut self, reason: &str) {
        let now = now_ms();
        for (_, mut s) in self.sessions.drain() {
            s.end(reason.to_owned(), now);
        }
    }
}

#[cfg(test)]
mod har_buffer_tests {
    use super::*;

    /// The entries and the new tail land over the old tail, the buffer is
    /// kept while entries keep coming, and given back by the first flush
    /// that finds none.
    #[test]
    fn a_har_buffer_is_kept_while_busy_and_given_back_when_idle() {
        let tmp = crate::testutil::TempDir::new("record", "har-buffer");
        let path = tmp.path().join("x.har");
        let mut doc = har::head("s");
        let tail_at = doc.len() as u64;
        doc.extend_from_slice(har::TAIL);
        fs::write(&path, &doc).unwrap();
        let mut h = HarW {
            file: OpenOptions::new().write(true).open(&path).unwrap(),
            tail_at,
            entries: 0,
            pending: Vec::new(),
        };
        h.pending.extend_from_slice(b"\n{\"a\":1}");
        h.flush().unwrap();
        let kept = h.pending.capacity();
        assert!(h.pending.is_empty() && kept > 0, "kept {kept}");
        h.pending.extend_from_slice(b",\n{\"b\":2}");
        h.flush().unwrap();
        let mut want = har::head("s");
        want.extend_from_slice(b"\n{\"a\":1},\n{\"b\":2}");
        want.extend_from_slice(har::TAIL);
        assert_eq!(fs::read(&path).unwrap(), want);
        let v: serde_json::Value = serde_json::from_slice(&want).unwrap();
        assert_eq!(v["log"]["entries"][1]["b"], 2);
        // Idle: nothing pending at this flush.
        h.flush().unwrap();
        assert_eq!(h.pending.capacity(), 0);
        assert_eq!(fs::read(&path).unwrap(), want);
    }
}
