//! Audit shipping: copies this node's local chain (the files the audit
//! writer appends to) into the fleet store, and verifies every node's
//! shipped chain (`portcullis audit verify --fleet`).
//!
//! Owns a read cursor over the chain files and the shipping loop. It must
//! not write the local log nor touch the audit writer: it reads complete
//! lines from the files, as `audit verify` does, on its own thread (at a
//! low CPU priority, `[fleet] ship_priority`) with its own runtime and store
//! connection, so commands never wait for it nor share a worker with it:
//! the local chain is the record, and shipping a copy of it is work that
//! yields to the data path when CPU is short and catches up after. Delivery
//! is at least once, deduplicated by (node, seq); after a restart or an
//! outage it resumes from the highest seq the store has for this node.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use serde::Serialize;
use tracing::{debug, info, warn};

use super::{FleetError, Store};
use crate::audit::{chain, VerifyReport, VerifyingKey};

/// Most lines per round trip to the store.
pub const BATCH: usize = 2000;
/// Pause between rounds when the log has nothing new.
const IDLE: Duration = Duration::from_millis(200);
/// Pause after a failed round.
const RETRY: Duration = Duration::from_secs(1);
/// How long shipping may stay behind at a lowered priority before it goes
/// at the data path's own until it has caught up: lowering the priority
/// defers shipping, it must not stop it on a node that stays busy.
pub const ESCALATE_AFTER: Duration = Duration::from_secs(10);

/// A change of the shipper's priority after a round.
#[derive(Debug, PartialEq, Eq)]
enum Escalation {
    /// Behind for [`ESCALATE_AFTER`]: ship at the normal priority.
    Raise,
    /// Caught up after a raise: back to the configured priority.
    Restore,
}

/// How long shipping has been behind (rounds that sent a full batch).
#[derive(Debug, Default)]
struct Backlog {
    since: Option<std::time::Instant>,
    raised: bool,
}

impl Backlog {
    /// After a round that sent a full batch (`more`) or caught up.
    fn after_round(&mut self, more: bool, now: std::time::Instant) -> Option<Escalation> {
        if !more {
            self.since = None;
            return std::mem::take(&mut self.raised).then_some(Escalation::Restore);
        }
        let since = *self.since.get_or_insert(now);
        if !self.raised && now.duration_since(since) >= ESCALATE_AFTER {
            self.raised = true;
            return Some(Escalation::Raise);
        }
        None
    }
}

/// The shipper thread's CPU priority (`[fleet] ship_priority`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// `SCHED_IDLE`: runs only on CPU nothing else of the daemon wants, and
    /// any data-path thread that wakes takes the core back at once.
    #[default]
    Idle,
    /// Niceness 19: a small share of the daemon's CPU even when it is busy,
    /// so shipping never stops under sustained load.
    Low,
    /// As the data path.
    Normal,
}

impl Priority {
    /// Applies it to the calling thread.
    fn apply(self) -> std::io::Result<()> {
        let (policy, nice) = match self {
            Priority::Normal => (libc::SCHED_OTHER, 0),
            Priority::Low => (libc::SCHED_OTHER, 19),
            Priority::Idle => (libc::SCHED_IDLE, 0),
        };
        // Leaving SCHED_IDLE or lowering the niceness again needs
        // CAP_SYS_NICE or an RLIMIT_NICE that allows it; a daemon with
        // CAP_SYS_RESOURCE (the DaemonSet's) may raise its own limit.
        if self == Priority::Normal {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit(2)/setrlimit(2) with a valid struct; a
            // limit that cannot be raised leaves the error to the call below.
            unsafe {
                if libc::getrlimit(libc::RLIMIT_NICE, &mut limit) == 0 && limit.rlim_cur < 20 {
                    limit.rlim_cur = 20;
                    limit.rlim_max = limit.rlim_max.max(20);
                    let _ = libc::setrlimit(libc::RLIMIT_NICE, &limit);
                }
            }
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` outlives the call.
        if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: gettid(2) and setpriority(2) on this thread only.
        let tid = unsafe { libc::gettid() };
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// How far shipping is (read by metrics and status).
#[derive(Debug, Default)]
pub struct ShipStatus {
    /// The newest seq read from the local files.
    pub local_seq: AtomicU64,
    /// The newest seq the store has acknowledged.
    pub shipped_seq: AtomicU64,
    /// Whether the last round reached the store.
    pub store_up: AtomicBool,
}

impl ShipStatus {
    /// Events written locally but not yet in the store.
    pub fn lag(&self) -> u64 {
        self.local_seq
            .load(Ordering::Relaxed)
            .saturating_sub(self.shipped_seq.load(Ordering::Relaxed))
    }
}

/// Where reading stopped: file index and byte offset of the next line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    file: u64,
    offset: u64,
}

/// One line to ship: seq and the raw line (without newline).
pub type Line = (u64, String);

/// Reads up to `max` complete lines with seq > `after` from the chain files
/// in `dir`, from `cursor` on. Returns them and the cursor past the last
/// line returned (a line still being written is left for the next call).
pub fn read_lines(
    dir: &Path,
    cursor: Cursor,
    after: u64,
    max: usize,
) -> std::io::Result<(Vec<Line>, Cursor)> {
    let files = chain::list_files(dir)?;
    let mut out = Vec::new();
    let mut cur = cursor;
    let count = files.len();
    for (i, (index, path)) in files.into_iter().enumerate() {
        if index < cur.file {
            continue;
        }
        if index > cur.file {
            cur = Cursor {
                file: index,
                offset: 0,
            };
        }
        let mut f = File::open(&path)?;
        f.seek(SeekFrom::Start(cur.offset))?;
        let mut reader = BufReader::with_capacity(256 * 1024, f);
        let mut buf = Vec::with_capacity(1024);
        loop {
            if out.len() >= max {
                return Ok((out, cur));
            }
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf)?;
            if n == 0 || buf.last() != Some(&b'\n') {
                break;
            }
            cur.offset += n as u64;
            buf.pop();
            if chain::split_hash(&buf).is_none() {
                // Not a chain line: shipped as is under no seq would lose
                // it; skip it here and let `verify --fleet` find the gap.
                continue;
            }
            let Some(seq) = seq_of(&buf) else { continue };
            if seq <= after {
                continue;
            }
            out.push((seq, String::from_utf8_lossy(&buf).into_owned()));
        }
        // A partial last line of an older file never completes: move on.
        if i + 1 == count {
            break;
        }
    }
    Ok((out, cur))
}

/// The line's `seq`. The writer puts it first (`{"seq":N,`), read here
/// without parsing the rest; any other shape goes through the JSON parser.
/// What the line says is checked again by `verify --fleet` in any case.
fn seq_of(line: &[u8]) -> Option<u64> {
    if let Some(rest) = line.strip_prefix(b"{\"seq\":") {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if (1..=19).contains(&digits) && rest.get(digits) == Some(&b',') {
            let text = std::str::from_utf8(&rest[..digits]).ok()?;
            if !(digits > 1 && text.starts_with('0')) {
                return text.parse().ok();
            }
        }
    }
    #[derive(serde::Deserialize)]
    struct SeqOnly {
        seq: u64,
    }
    serde_json::from_slice::<SeqOnly>(line).ok().map(|s| s.seq)
}

/// The shipping loop of one node.
pub struct Shipper {
    /// This node.
    pub node: String,
    /// The audit directory (`<state>/audit`).
    pub audit_dir: PathBuf,
    /// `<state>/audit.pub`.
    pub pubkey_file: PathBuf,
    /// Its own store connection.
    pub store: Store,
    /// Progress.
    pub status: std::sync::Arc<ShipStatus>,
}

/// The shipper's thread; dropping this stops it.
pub struct ShipThread {
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Shipper {
    /// Runs the shipper on a thread of its own at `priority` (a per-thread
    /// setting on Linux), with a single-threaded runtime: its store
    /// connection, file reads and copies never take a data-path worker.
    pub fn spawn_thread(self, priority: Priority) -> std::io::Result<ShipThread> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("portcullis-ship".into())
            .spawn(move || {
                if let Err(e) = priority.apply() {
                    warn!(
                        "audit shipping runs at the daemon's priority: setting {priority:?}: {e}"
                    );
                }
                runtime.block_on(async move {
                    tokio::select! {
                        () = self.run(priority) => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(ShipThread { _stop: stop })
    }

    /// Ships forever (until the future is dropped), on a thread set to
    /// `priority`: below normal, a backlog older than [`ESCALATE_AFTER`]
    /// ships at the normal priority until it is gone.
    async fn run(self, priority: Priority) {
        let mut backlog = Backlog::default();
        let mut resume: Option<(Cursor, u64)> = None;
        let pubkey = std::fs::read_to_string(&self.pubkey_file)
            .ok()
            .map(|s| s.trim().to_string());
        let mut was_up = true;
        loop {
            let up = self.round(&mut resume, pubkey.clone()).await;
            match up {
                Ok(more) => {
                    if !was_up {
                        info!(node = %self.node, shipped = self.status.shipped_seq.load(Ordering::Relaxed), "audit shipping resumed");
                    }
                    was_up = true;
                    self.status.store_up.store(true, Ordering::Relaxed);
                    let change = backlog.after_round(more, std::time::Instant::now());
                    match change.filter(|_| priority != Priority::Normal) {
                        Some(Escalation::Restore) => {
                            info!(node = %self.node, "audit shipping caught up; back to priority {priority:?}");
                            if let Err(e) = priority.apply() {
                                warn!("audit shipping stays at the normal priority: {e}");
                            }
                        }
                        Some(Escalation::Raise) => {
                            info!(
                                node = %self.node,
                                lag = self.status.lag(),
                                "audit shipping has been behind for {} s: shipping at the normal priority until it catches up",
                                ESCALATE_AFTER.as_secs()
                            );
                            if let Err(e) = Priority::Normal.apply() {
                                warn!("audit shipping cannot leave its lowered priority: {e}");
                            }
                        }
                        None => {}
                    }
                    if !more {
                        tokio::time::sleep(IDLE).await;
                    }
                }
                Err(e) => {
                    if was_up {
                        warn!(node = %self.node, "audit shipping paused: {e}; it resumes where it stopped");
                    }
                    was_up = false;
                    self.status.store_up.store(false, Ordering::Relaxed);
                    // Ask the store where it stands again after an outage.
                    resume = None;
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// One round; returns whether a full batch went (more may be waiting).
    async fn round(
        &self,
        resume: &mut Option<(Cursor, u64)>,
        pubkey: Option<String>,
    ) -> Result<bool, FleetError> {
        let (cursor, after) = match *resume {
            Some(r) => r,
            None => {
                let shipped = self.store.shipped_seq(&self.node).await?;
                self.status.shipped_seq.store(shipped, Ordering::Relaxed);
                debug!(node = %self.node, shipped, "audit shipping starts after seq {shipped}");
                (Cursor::default(), shipped)
            }
        };
        // A plain read: this thread is the shipper's alone.
        let (lines, next) = read_lines(&self.audit_dir, cursor, after, BATCH)
            .map_err(|e| FleetError::Store(format!("reading the audit files: {e}")))?;
        let last = lines.last().map(|l| l.0).unwrap_or(after);
        let local = self.status.local_seq.load(Ordering::Relaxed).max(last);
        self.status.local_seq.store(local, Ordering::Relaxed);
        let full = lines.len() >= BATCH;
        if lines.is_empty() && resume.is_some() {
            *resume = Some((next, after));
            return Ok(false);
        }
        self.store.ship(&self.node, pubkey, lines, local).await?;
        self.status.shipped_seq.store(last, Ordering::Relaxed);
        *resume = Some((next, last));
        Ok(full)
    }
}

/// One node's result of `audit verify --fleet`.
#[derive(Debug, Serialize)]
pub struct NodeVerify {
    /// The node.
    pub node: String,
    /// Its chain as shipped.
    pub report: VerifyReport,
    /// Events written on the node but not shipped yet (as the node last
    /// said).
    pub unshipped: u64,
}

/// Verifies every node's shipped chain; the first broken event per node is
/// in its report.
pub async fn verify_fleet(store: &Store) -> Result<Vec<NodeVerify>, FleetError> {
    store.migrate().await?;
    let mut out = Vec::new();
    for n in store.audit_nodes().await? {
        let source = PathBuf::from(format!("fleet:{}", n.node));
        let key = match n.pubkey.as_deref().map(parse_key) {
            Some(Ok(k)) => k,
            other => {
                let why = match other {
                    Some(Err(e)) => e,
                    _ => "no checkpoint public key was shipped".into(),
                };
                out.push(NodeVerify {
                    node: n.node.clone(),
                    report: VerifyReport {
                        error: Some(crate::audit::VerifyError {
                            file: source,
                            line: 0,
                            seq: None,
                            message: why,
                        }),
                        ..VerifyReport::default()
                    },
                    unshipped: n.local_seq.saturating_sub(n.shipped_seq),
                });
                continue;
            }
        };
        let mut lines = Vec::new();
        let mut from = 0u64;
        loop {
            let page = store.audit_lines(&n.node, from, 16).await?;
            let Some(last) = page.last().map(|l| l.0) else {
                break;
            };
            from = last + 1;
            lines.extend(page);
        }
        let report = crate::audit::verify_lines(&source, lines, &key);
        out.push(NodeVerify {
            node: n.node,
            report,
            unshipped: n.local_seq.saturating_sub(n.shipped_seq),
        });
    }
    Ok(out)
}

fn parse_key(hex_text: &str) -> Result<VerifyingKey, String> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_text.trim(), &mut bytes)
        .map_err(|e| format!("the shipped public key is not 64 hex digits: {e}"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("the shipped public key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64) -> String {
        let h = format!("{:064x}", seq);
        format!("{{\"seq\":{seq},\"type\":\"x\",\"hash\":\"{h}\"}}\n")
    }

    /// The scheduling policy and niceness of the calling thread.
    fn sched_of_this_thread() -> (u64, i64) {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        // Fields 19 (nice) and 41 (policy), counted from 1 with the pid.
        (rest[38].parse().unwrap(), rest[16].parse().unwrap())
    }

    #[test]
    fn a_backlog_older_than_the_bound_raises_the_priority_until_caught_up() {
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut b = Backlog::default();
        assert_eq!(b.after_round(true, at(0)), None);
        assert_eq!(b.after_round(true, at(9)), None);
        assert_eq!(b.after_round(true, at(10)), Some(Escalation::Raise));
        assert_eq!(b.after_round(true, at(30)), None, "raised once");
        assert_eq!(b.after_round(false, at(31)), Some(Escalation::Restore));
        assert_eq!(b.after_round(false, at(32)), None);
        // Caught up in between: the clock starts again.
        assert_eq!(b.after_round(true, at(40)), None);
        assert_eq!(b.after_round(false, at(45)), None);
        assert_eq!(b.after_round(true, at(46)), None);
        assert_eq!(b.after_round(true, at(55)), None);
        assert_eq!(b.after_round(true, at(56)), Some(Escalation::Raise));
    }

    #[test]
    fn priorities_apply_to_the_thread_alone() {
        let before = sched_of_this_thread();
        std::thread::spawn(|| {
            Priority::Low.apply().unwrap();
            assert_eq!(sched_of_this_thread(), (libc::SCHED_OTHER as u64, 19));
            Priority::Idle.apply().unwrap();
            assert_eq!(sched_of_this_thread().0, libc::SCHED_IDLE as u64);
            // Leaving SCHED_IDLE needs privilege (root, or CAP_SYS_RESOURCE
            // to raise RLIMIT_NICE); the daemon has it, so do the tests.
            if unsafe { libc::geteuid() } == 0 {
                Priority::Normal.apply().unwrap();
                assert_eq!(sched_of_this_thread(), (libc::SCHED_OTHER as u64, 0));
            }
        })
        .join()
        .unwrap();
        // The test's own thread is untouched.
        assert_eq!(sched_of_this_thread(), before);
    }

    #[test]
    fn seq_is_read_as_the_json_parser_reads_it() {
        fn by_serde(line: &[u8]) -> Option<u64> {
            serde_json::from_slice::<serde_json::Value>(line)
                .ok()?
                .get("seq")?
                .as_u64()
        }
        for line in [
            &b"{\"seq\":42,\"type\":\"x\"}"[..],
            b"{\"seq\":0,\"type\":\"x\"}",
            b"{\"seq\":18446744073709551615,\"t\":1}",
            b"{\"type\":\"x\",\"seq\":7}",
            b"{ \"seq\": 8, \"t\": 1}",
            b"{\"seq\":1e3,\"t\":1}",
        ] {
            assert_eq!(
                seq_of(line),
                by_serde(line),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        // Not a u64, or not the JSON the parser accepts: no seq.
        for line in [
            &b"{\"seq\":18446744073709551616,\"t\":1}"[..],
            b"{\"seq\":007,\"t\":1}",
            b"{\"seq\":-1,\"t\":1}",
            b"{\"seq\":,\"t\":1}",
        ] {
            assert_eq!(seq_of(line), None, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn reads_complete_lines_across_files_and_resumes() {
        let tmp = crate::testutil::TempDir::new("fleet", "ship");
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join(chain::file_name(1)), line(1) + &line(2)).unwrap();
        // The newest file ends in a line still being written.
        let mut second = line(3);
        second.push_str("{\"seq\":4,\"ty");
        std::fs::write(dir.join(chain::file_name(2)), &second).unwrap();
        let (got, cur) = read_lines(&dir, Cursor::default(), 0, 10).unwrap();
        assert_eq!(got.iter().map(|l| l.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(got[0].1, line(1).trim_end());
        // Batches are bounded and resume where they stopped.
        let (a, c1) = read_lines(&dir, Cursor::default(), 0, 2).unwrap();
        assert_eq!(a.len(), 2);
        let (b, _) = read_lines(&dir, c1, 2, 10).unwrap();
        assert_eq!(b.iter().map(|l| l.0).collect::<Vec<_>>(), vec![3]);
        // Already shipped seqs are skipped when starting from scratch.
        let (c, _) = read_lines(&dir, Cursor::default(), 2, 10).unwrap();
        assert_eq!(c.iter().map(|l| l.0).collect::<Vec<_>>(), vec![3]);
        // The torn line completes: it is read next, once.
        let mut done = second.clone();
        done.truncate(line(3).len());
        done.push_str(&line(4));
        std::fs::write(dir.join(chain::file_name(2)), &done).unwrap();
        let (d, _) = read_lines(&dir, cur, 3, 10).unwrap();
        assert_eq!(d.iter().map(|l| l.0).collect::<Vec<_>>(), vec![4]);
    }

    /// The real writer's chain, read by the shipper's reader (rotated files
    /// and checkpoints included) and checked as the store would hold it:
    /// intact it verifies; one changed byte is named at its seq.
    #[tokio::test]
    async fn a_shipped_chain_verifies_and_a_changed_line_is_named() {
        use crate::audit::{AuditConfig, AuditEvent, AuditLog};
        let tmp = crate::testutil::TempDir::new("fleet", "verify");
        let state = tmp.path().to_path_buf();
        let cfg = AuditConfig {
            rotate_bytes: 2048,
            checkpoint_every_events: 7,
            ..AuditConfig::new(&state)
        };
        let (log, _) = AuditLog::open(cfg).unwrap();
        for i in 0..40u64 {
            log.record(AuditEvent::new("command").detail("i", i))
                .await
                .unwrap();
        }
        log.close().await.unwrap();
        let key = crate::audit::load_public_key(&state.join("audit.pub")).unwrap();
        let (lines, _) = read_lines(&state.join("audit"), Cursor::default(), 0, 10_000).unwrap();
        assert!(chain::list_files(&state.join("audit")).unwrap().len() > 1);
        let rows: Vec<(u64, String)> = lines.clone();
        assert!(rows.len() >= 40);
        let source = Path::new("fleet:n");
        let ok = crate::audit::verify_lines(source, rows.clone(), &key);
        assert!(ok.is_ok(), "{ok}");
        assert!(ok.checkpoints > 0);
        let mut tampered = rows.clone();
        tampered[9].1 = tampered[9].1.replacen("\"i\":", "\"i\" :", 1);
        let bad = crate::audit::verify_lines(source, tampered, &key);
        let err = bad.error.expect("tampering is found");
        assert_eq!(err.seq, Some(rows[9].0));
        assert!(err.message.contains("hash mismatch"), "{err}");
        // A row removed (a gap) is found at the row after it.
        let mut gap = rows.clone();
        gap.remove(5);
        let bad = crate::audit::verify_lines(source, gap, &key);
        assert_eq!(bad.error.map(|e| e.seq), Some(Some(rows[6].0)));
    }
}
