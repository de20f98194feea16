//! Reading the log for people: `portcullis audit tail [-f]` with filters.
//!
//! Owns filtering and following across rotation. It must not check the
//! chain (that is [`super::verify`]) and never writes: lines it cannot parse
//! are skipped, a torn final line is left for later.

use std::{
    collections::VecDeque,
    convert::Infallible,
    fs::File,
    io::{self, BufRead as _, BufReader, SeekFrom},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::{chain, time::parse_rfc3339_ms, AuditError};

/// How often [`follow`] looks for new lines.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Which events to show. Empty filter: all of them, checkpoints included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TailFilter {
    /// Only this session's events.
    pub session: Option<String>,
    /// Only events whose identity has this name (or this token subject).
    pub identity: Option<String>,
    /// Only events at or after this time (Unix milliseconds, see
    /// [`super::parse_since`]).
    pub since_ms: Option<u64>,
    /// [`read_events`] only: keep the last N matching events.
    pub last: Option<usize>,
}

impl TailFilter {
    /// Whether `event` passes.
    pub fn matches(&self, event: &Value) -> bool {
        if let Some(session) = &self.session {
            if event.get("session").and_then(Value::as_str) != Some(session.as_str()) {
                return false;
            }
        }
        if let Some(identity) = &self.identity {
            let id = event.get("identity");
            let field = |k: &str| id.and_then(|i| i.get(k)).and_then(Value::as_str);
            if field("name") != Some(identity.as_str()) && field("sub") != Some(identity.as_str()) {
                return false;
            }
        }
        if let Some(since) = self.since_ms {
            let at = event
                .get("time")
                .and_then(Value::as_str)
                .and_then(parse_rfc3339_ms);
            if at.is_none_or(|t| t < since) {
                return false;
            }
        }
        true
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The events of the log in `dir` that pass `filter`, in order across files.
/// Lines that are not JSON and a torn final line are skipped.
pub fn read_events(dir: &Path, filter: &TailFilter) -> Result<Vec<Value>, AuditError> {
    read_events_where(dir, filter, &|_| true)
}

/// [`read_events`] with a further condition, checked before `last` keeps
/// the last N (the review console's audit search).
pub fn read_events_where(
    dir: &Path,
    filter: &TailFilter,
    keep: &dyn Fn(&Value) -> bool,
) -> Result<Vec<Value>, AuditError> {
    let mut out = VecDeque::new();
    let files = chain::list_files(dir).map_err(io_err(dir))?;
    let mut buf = Vec::with_capacity(1024);
    for (_, path) in files {
        let file = match File::open(&path) {
            Ok(f) => f,
            // Removed since the listing (a log shipper's cleanup).
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf).map_err(io_err(&path))? == 0 {
                break;
            }
            if buf.pop() != Some(b'\n') {
                break;
            }
            let Ok(event) = serde_json::from_slice::<Value>(&buf) else {
                continue;
            };
            if filter.matches(&event) && keep(&event) {
                out.push_back(event);
                if filter.last.is_some_and(|n| out.len() > n) {
                    out.pop_front();
                }
            }
        }
    }
    Ok(out.into())
}

/// The seq of a file's first line.
fn first_seq(path: &Path) -> Option<u64> {
    let mut line = Vec::new();
    BufReader::new(File::open(path).ok()?)
        .read_until(b'\n', &mut line)
        .ok()?;
    serde_json::from_slice::<Value>(&line)
        .ok()?
        .get("seq")?
        .as_u64()
}

/// Follows the log in `dir`: calls `out` for every event with seq ≥
/// `from_seq` that passes `filter`, in order, across rotations, polling
/// every [`FOLLOW_POLL`]. Runs until the future is dropped (cancelled);
/// returns only on an error (the directory cannot be read).
pub async fn follow(
    dir: &Path,
    filter: TailFilter,
    from_seq: u64,
    mut out: impl FnMut(Value),
) -> Result<Infallible, AuditError> {
    let mut current: Option<(u64, PathBuf)> = None;
    // Offset just past the last complete line taken from the current file.
    let mut pos = 0u64;
    let mut last_seq = from_seq.saturating_sub(1);
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let files = chain::list_files(dir).map_err(io_err(dir))?;
        let (index, path) = match &current {
            Some(c) => c.clone(),
            None => {
                // Start in the newest file whose first event is ≤ from_seq.
                let start = files
                    .iter()
                    .rev()
                    .find(|(_, p)| first_seq(p).is_some_and(|s| s <= from_seq))
                    .or(files.first())
                    .cloned();
                match start {
                    Some(c) => {
                        current = Some(c.clone());
                        pos = 0;
                        c
                    }
                    None => {
                        tokio::time::sleep(FOLLOW_POLL).await;
                        continue;
                    }
                }
            }
        };
        let next = files.iter().find(|(i, _)| *i > index).cloned();
        // Read to the end; when a newer file exists the current one is
        // complete, but read it once more after seeing that, so nothing the
        // writer added just before rotating is missed.
        let read = read_new(
            &path,
            &mut pos,
            &mut buf,
            &mut chunk,
            &filter,
            &mut last_seq,
            &mut out,
        )
        .await;
        match read {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&path)(e)),
            _ if next.is_some() => {
                current = next;
                pos = 0;
            }
            Ok(true) => {}
            _ => tokio::time::sleep(FOLLOW_POLL).await,
        }
    }
}

/// Reads `path` from `*pos` to its end, handing complete lines to `out`.
/// Returns whether anything new was read.
async fn read_new(
    path: &Path,
    pos: &mut u64,
    buf: &mut Vec<u8>,
    chunk: &mut [u8],
    filter: &TailFilter,
    last_seq: &mut u64,
    out: &mut impl FnMut(Value),
) -> io::Result<bool> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(SeekFrom::Start(*pos)).await?;
    buf.clear();
    let mut progressed = false;
    loop {
        let n = file.read(chunk).await?;
        if n == 0 {
            return Ok(progressed);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut taken = 0;
        while let Some(nl) = buf[taken..].iter().position(|&b| b == b'\n') {
            let line = &buf[taken..taken + nl];
            match serde_json::from_slice::<Value>(line) {
                Ok(event) => {
                    let seq = event.get("seq").and_then(Value::as_u64).unwrap_or(0);
                    if seq > *last_seq {
                        *last_seq = seq;
                        if filter.matches(&event) {
                            out(event);
                        }
                    }
                }
                // An unparsable last line may still be cut back by a
                // restarting daemon: only step over it once more follows.
                Err(_) if taken + nl + 1 == buf.len() => break,
                Err(_) => {}
            }
            taken += nl + 1;
        }
        if taken > 0 {
            progressed = true;
            *pos += taken as u64;
            buf.drain(..taken);
        }
    }
}
