//! Tests of the audit log as a whole: writing, restarts, tampering, crash
//! recovery, concurrency, a full disk, readers.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::Duration,
};

use ed25519_dalek::{Signer as _, SigningKey};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::*;

struct TempDir(crate::testutil::TempDir);

impl TempDir {
    fn new(tag: &str) -> Self {
        Self(crate::testutil::TempDir::new("audit", tag))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

fn config(state: &Path, rotate_bytes: u64) -> AuditConfig {
    AuditConfig {
        rotate_bytes,
        checkpoint_every_events: 10,
        ..AuditConfig::new(state)
    }
}

/// [`config`] with a 1 ms group commit and 1 MiB files: records that do
/// not wait for a sync, in one file.
fn fast_sync_config(state: &Path) -> AuditConfig {
    AuditConfig {
        fsync: FsyncMode::Interval(Duration::from_millis(1)),
        ..config(state, 1 << 20)
    }
}

fn event(i: u64) -> AuditEvent {
    AuditEvent::new("command")
        .session(format!("s{}", i % 3))
        .identity(IdentityRef::named(["alice", "bob"][(i % 2) as usize]))
        .resource(format!("db-{i}"))
        .action("postgres:select")
        .decision("allow")
        .policy_id("p1")
        .detail("i", i)
}

async fn record_n(log: &AuditLog, from: u64, n: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in from..from + n {
        seqs.push(log.record(event(i)).await.unwrap());
    }
    seqs
}

/// Writes `n` events in one open/close with the given config.
async fn write_log(cfg: AuditConfig, n: u64) -> OpenReport {
    let (log, report) = AuditLog::open(cfg).unwrap();
    record_n(&log, 0, n).await;
    log.close().await.unwrap();
    report
}

fn pubkey(state: &Path) -> VerifyingKey {
    load_public_key(&state.join("audit.pub")).unwrap()
}

fn audit_files(state: &Path) -> Vec<PathBuf> {
    chain::list_files(&state.join("audit"))
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// A file's lines, each with its newline.
fn lines(path: &Path) -> Vec<Vec<u8>> {
    fs::read(path)
        .unwrap()
        .split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    fs::write(path, lines.concat()).unwrap();
}

fn json(line: &[u8]) -> Value {
    serde_json::from_slice(line.strip_suffix(b"\n").unwrap_or(line)).unwrap()
}

fn all_events(state: &Path) -> Vec<Value> {
    read_events(&state.join("audit"), &TailFilter::default()).unwrap()
}

fn seqs_of(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

fn assert_broken_at(report: &VerifyReport, file: &Path, line: u64) {
    let err = report
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("expected a failure at {} line {line}", file.display()));
    assert_eq!(
        (err.file.as_path(), err.line),
        (file, line),
        "wrong place: {err}"
    );
    assert!(!report.is_ok());
}

/// A log with at least three files: (temp dir, files).
async fn rotated_log(tag: &str) -> (TempDir, Vec<PathBuf>) {
    let tmp = TempDir::new(tag);
    write_log(config(tmp.path(), 1500), 40).await;
    let files = audit_files(tmp.path());
    assert!(files.len() >= 3, "only {} files", files.len());
    (tmp, files)
}

/// Recomputes every `prev_hash`, checkpoint `head_hash` and `hash` from the
/// module doc's definition alone, as someone without the key would after
/// editing an event. Signatures are left as they are.
fn rechain(files: &[PathBuf]) {
    let mut prev = "0".repeat(64);
    for path in files {
        let mut out = Vec::new();
        for line in lines(path) {
            let text = String::from_utf8(line).unwrap();
            let text = text.strip_suffix('\n').unwrap();
            let body = &text[..text.len() - 75];
            assert!(text[body.len()..].starts_with(",\"hash\":\""));
            let p = body.rfind("\"prev_hash\":\"").unwrap() + 13;
            let mut body = format!("{}{}{}", &body[..p], prev, &body[p + 64..]);
            if let Some(h) = body.find("\"head_hash\":\"") {
                let h = h + 13;
                body = format!("{}{}{}", &body[..h], prev, &body[h + 64..]);
            }
            let mut hasher = Sha256::new();
            hasher.update(prev.as_bytes());
            hasher.update(body.as_bytes());
            hasher.update(b"}");
            let hash = hex::encode(hasher.finalize());
            out.push(format!("{body},\"hash\":\"{hash}\"}}\n").into_bytes());
            prev = hash;
        }
        write_lines(path, &out);
    }
}

#[tokio::test]
async fn intact_log_across_rotations_and_restarts_verifies() {
    let tmp = TempDir::new("intact");
    let state = tmp.path();
    let first = write_log(config(state, 1500), 40).await;
    assert!(first.created_key);
    assert_eq!(first.next_seq, 1);
    let after_first = all_events(state).len() as u64;

    let (log, second) = AuditLog::open(config(state, 1500)).unwrap();
    assert!(!second.created_key);
    assert_eq!(second.next_seq, after_first + 1, "restart continues seq");
    assert!(second.recovered.is_none());
    let seqs = record_n(&log, 40, 40).await;
    assert_eq!(seqs[0], after_first + 1);
    log.close().await.unwrap();
    write_log(config(state, 1500), 5).await;

    let report = verify(&state.join("audit"), &pubkey(state));
    assert!(report.is_ok(), "{report}");
    assert!(report.warnings.is_empty(), "{report}");
    let files = audit_files(state);
    assert!(files.len() >= 5, "{} files", files.len());
    assert_eq!(report.files, files.len());

    let events = all_events(state);
    let n = events.len() as u64;
    assert_eq!(seqs_of(&events), (1..=n).collect::<Vec<_>>());
    assert_eq!(report.last_seq, Some(n));
    assert_eq!(report.events, n);
    let commands = events.iter().filter(|e| e["type"] == "command").count();
    assert_eq!(commands, 85);
    assert!(report.checkpoints >= 10);
    // Closing ended with a checkpoint covering everything.
    let last = events.last().unwrap();
    assert_eq!(last["type"], "checkpoint");
    assert_eq!(report.last_checkpoint_seq, Some(n - 1));
    assert_eq!(last["covers_seq"].as_u64(), Some(n - 1));

    // Every rotated file ends with a checkpoint and links to the next file.
    for pair in files.windows(2) {
        let old = lines(&pair[0]);
        let last_old = json(old.last().unwrap());
        assert_eq!(last_old["type"], "checkpoint", "{}", pair[0].display());
        let first_new = json(&lines(&pair[1])[0]);
        assert_eq!(first_new["prev_hash"], last_old["hash"]);
        assert_eq!(
            first_new["seq"].as_u64(),
            Some(last_old["seq"].as_u64().unwrap() + 1)
        );
    }
    // The first event starts the chain.
    let first_event = &events[0];
    assert_eq!(first_event["seq"], 1);
    assert_eq!(first_event["prev_hash"], "0".repeat(64));
    assert_eq!(first_event["identity"]["name"], "alice");
    assert_eq!(first_event["policy_ids"][0], "p1");
    assert!(first_event["time"].as_str().unwrap().ends_with('Z'));

    // An independent implementation of the documented hash agrees.
    let before: Vec<Vec<u8>> = files.iter().map(|f| fs::read(f).unwrap()).collect();
    rechain(&files);
    let after: Vec<Vec<u8>> = files.iter().map(|f| fs::read(f).unwrap()).collect();
    assert!(
        before == after,
        "the documented hash differs from the writer's"
    );
}

#[tokio::test]
async fn every_single_byte_change_is_caught_at_its_line() {
    let (tmp, files) = rotated_log("bytes").await;
    let key = pubkey(tmp.path());
    let target = &files[1];
    let original = lines(target);
    let line_no = 3;
    let line = &original[line_no - 1];
    for at in 0..line.len() {
        let mut changed = original.clone();
        changed[line_no - 1][at] ^= 0x01;
        write_lines(target, &changed);
        let report = verify(&tmp.path().join("audit"), &key);
        assert_broken_at(&report, target, line_no as u64);
    }
    write_lines(target, &original);
    assert!(verify(&tmp.path().join("audit"), &key).is_ok());

    // A flip inside a value names the seq, and says what is wrong.
    let seq = json(line)["seq"].as_u64().unwrap();
    let text = String::from_utf8(line.clone()).unwrap();
    let at = text.find("\"resource\":\"db-").unwrap() + 14;
    let mut changed = original.clone();
    changed[line_no - 1][at] = b'X';
    write_lines(target, &changed);
    let report = verify(&tmp.path().join("audit"), &key);
    assert_broken_at(&report, target, line_no as u64);
    let err = report.error.unwrap();
    assert_eq!(err.seq, Some(seq));
    assert!(err.message.contains("hash mismatch"), "{}", err.message);
    assert!(format!("{err}").contains(&format!("line {line_no} (seq {seq})")));
}

#[tokio::test]
async fn deleted_lines_are_caught() {
    let (tmp, files) = rotated_log("delete").await;
    let key = pubkey(tmp.path());
    let dir = tmp.path().join("audit");

    // A line in the middle of a file.
    let original = lines(&files[1]);
    let mut changed = original.clone();
    changed.remove(1);
    write_lines(&files[1], &changed);
    let report = verify(&dir, &key);
    assert_broken_at(&report, &files[1], 2);
    assert!(report.error.unwrap().message.contains("seq"));

    // The first line of a file.
    let mut changed = original.clone();
    changed.remove(0);
    write_lines(&files[1], &changed);
    assert_broken_at(&verify(&dir, &key), &files[1], 1);

    // The last line of a file (its rotation checkpoint): found in the next.
    let mut changed = original.clone();
    changed.pop();
    write_lines(&files[1], &changed);
    assert_broken_at(&verify(&dir, &key), &files[2], 1);

    // A whole file.
    write_lines(&files[1], &original);
    assert!(verify(&dir, &key).is_ok());
    fs::remove_file(&files[1]).unwrap();
    assert_broken_at(&verify(&dir, &key), &files[2], 1);
}

#[tokio::test]
async fn swapped_lines_are_caught() {
    let (tmp, files) = rotated_log("swap").await;
    let mut changed = lines(&files[0]);
    changed.swap(2, 3);
    write_lines(&files[0], &changed);
    let report = verify(&tmp.path().join("audit"), &pubkey(tmp.path()));
    assert_broken_at(&report, &files[0], 3);
}

#[tokio::test]
async fn truncating_an_older_file_is_caught() {
    let (tmp, files) = rotated_log("truncate").await;
    let key = pubkey(tmp.path());
    let dir = tmp.path().join("audit");
    let original = fs::read(&files[1]).unwrap();
    let keep = lines(&files[1])[..3].concat().len();

    // In the middle of a line: a torn line in a file that is not the newest.
    fs::write(&files[1], &original[..keep + 20]).unwrap();
    let report = verify(&dir, &key);
    assert_broken_at(&report, &files[1], 4);
    assert!(report.error.unwrap().message.contains("truncated"));

    // At a line boundary: the next file no longer links.
    fs::write(&files[1], &original[..keep]).unwrap();
    assert_broken_at(&verify(&dir, &key), &files[2], 1);
}

#[tokio::test]
async fn a_file_spliced_in_from_another_log_is_caught() {
    // Same events, same seqs, every line valid on its own: only the
    // prev_hash linkage (and the other key) tells them apart.
    let (tmp, files) = rotated_log("splice-a").await;
    let (_other, other_files) = rotated_log("splice-b").await;
    assert_eq!(files.len(), other_files.len());
    fs::copy(&other_files[1], &files[1]).unwrap();
    let report = verify(&tmp.path().join("audit"), &pubkey(tmp.path()));
    assert_broken_at(&report, &files[1], 1);
    assert!(report.error.unwrap().message.contains("prev_hash"));
}

#[tokio::test]
async fn rewritten_chain_fails_at_its_first_checkpoint() {
    let (tmp, files) = rotated_log("forge").await;
    let key = pubkey(tmp.path());
    let dir = tmp.path().join("audit");

    // Change a decision and recompute every hash, as someone without the
    // key would: hashes all link, the next checkpoint's signature does not.
    let mut changed = lines(&files[0]);
    let text = String::from_utf8(changed[1].clone()).unwrap();
    changed[1] = text
        .replace("\"decision\":\"allow\"", "\"decision\":\"deny\"")
        .into_bytes();
    write_lines(&files[0], &changed);
    rechain(&files);
    let report = verify(&dir, &key);
    let first_checkpoint = lines(&files[0])
        .iter()
        .position(|l| json(l)["type"] == "checkpoint")
        .unwrap()
        + 1;
    assert_broken_at(&report, &files[0], first_checkpoint as u64);
    assert!(
        report.error.as_ref().unwrap().message.contains("signature"),
        "{report}"
    );

    // A checkpoint signed with another key fails the same way.
    let (tmp, files) = rotated_log("forge2").await;
    let key = pubkey(tmp.path());
    let dir = tmp.path().join("audit");
    let other = SigningKey::from_bytes(&[7u8; 32]);
    let mut changed = lines(&files[0]);
    let at = changed
        .iter()
        .position(|l| json(l)["type"] == "checkpoint")
        .unwrap();
    let cp = json(&changed[at]);
    let msg = chain::checkpoint_message(
        cp["covers_seq"].as_u64().unwrap(),
        cp["head_hash"].as_str().unwrap().as_bytes(),
    );
    let forged = hex::encode(other.sign(&msg).to_bytes());
    let text = String::from_utf8(changed[at].clone()).unwrap();
    changed[at] = text
        .replace(cp["signature"].as_str().unwrap(), &forged)
        .into_bytes();
    write_lines(&files[0], &changed);
    rechain(&files);
    let report = verify(&dir, &key);
    assert_broken_at(&report, &files[0], at as u64 + 1);
    assert!(report.error.unwrap().message.contains("signature"));
    // ... and verifies with the other key's public half only up to where
    // the real key signed.
    assert!(!verify(&dir, &other.verifying_key()).is_ok());
}

#[tokio::test]
async fn torn_final_line_is_a_warning_and_open_repairs_it() {
    for torn in [&b"{\"seq\":999,\"time\":\"2026-"[..], &b"garbage\n"[..]] {
        let tmp = TempDir::new("torn");
        let state = tmp.path();
        write_log(config(state, 1500), 30).await;
        let dir = state.join("audit");
        let key = pubkey(state);
        let newest = audit_files(state).pop().unwrap();
        let before = all_events(state).len() as u64;
        let mut bytes = fs::read(&newest).unwrap();
        let clean_len = bytes.len();
        bytes.extend_from_slice(torn);
        fs::write(&newest, &bytes).unwrap();

        let report = verify(&dir, &key);
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.warnings.len(), 1, "{report}");
        assert!(report.warnings[0].contains("torn"), "{report}");
        assert_eq!(report.last_seq, Some(before));

        // The same bytes at the end of an older file are a failure.
        let files = audit_files(state);
        let older = &files[files.len() - 2];
        let older_bytes = fs::read(older).unwrap();
        fs::write(older, [older_bytes.clone(), torn.to_vec()].concat()).unwrap();
        assert!(!verify(&dir, &key).is_ok());
        fs::write(older, older_bytes).unwrap();

        let (log, opened) = AuditLog::open(config(state, 1500)).unwrap();
        let recovery = opened.recovered.clone().unwrap();
        assert_eq!(recovery.file, newest);
        assert_eq!(recovery.bytes_dropped, torn.len() as u64);
        assert_eq!(recovery.seq, before + 1);
        assert_eq!(opened.next_seq, before + 2);
        // (+1 more when the newest file was full: a rotation checkpoint.)
        let seq = log.record(event(1000)).await.unwrap();
        assert!(seq == before + 2 || seq == before + 3, "{seq}");
        log.close().await.unwrap();

        let report = verify(&dir, &key);
        assert!(report.is_ok(), "{report}");
        assert!(report.warnings.is_empty(), "{report}");
        let events = all_events(state);
        let recovered = &events[before as usize];
        assert_eq!(recovered["type"], "audit_recovered");
        assert_eq!(recovered["seq"].as_u64(), Some(before + 1));
        assert_eq!(
            recovered["detail"]["bytes_dropped"].as_u64(),
            Some(torn.len() as u64)
        );
        // The torn bytes are gone, the clean prefix is untouched.
        assert_eq!(fs::read(&newest).unwrap()[..clean_len], bytes[..clean_len]);
    }
}

#[tokio::test]
async fn empty_newest_file_continues_from_the_one_before() {
    let tmp = TempDir::new("empty-newest");
    let state = tmp.path();
    write_log(config(state, 1500), 30).await;
    let files = audit_files(state);
    let index =
        chain::parse_file_name(files.last().unwrap().file_name().unwrap().to_str().unwrap())
            .unwrap();
    let empty = state.join("audit").join(chain::file_name(index + 1));
    fs::write(&empty, b"").unwrap();
    let before = all_events(state).len() as u64;
    let (log, report) = AuditLog::open(config(state, 1500)).unwrap();
    assert_eq!(report.file, empty);
    assert_eq!(report.next_seq, before + 1);
    log.record(event(1)).await.unwrap();
    log.close().await.unwrap();
    let report = verify(&state.join("audit"), &pubkey(state));
    assert!(report.is_ok() && report.warnings.is_empty(), "{report}");
}

#[tokio::test]
async fn missing_key_refuses_a_log_with_events_but_not_an_empty_one() {
    let tmp = TempDir::new("key");
    let state = tmp.path();
    let (log, report) = AuditLog::open(config(state, 1500)).unwrap();
    assert!(report.created_key);
    assert_eq!(log.public_key_hex(), report.public_key_hex);
    assert_eq!(
        fs::read_to_string(state.join("audit.pub")).unwrap().trim(),
        report.public_key_hex
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = fs::metadata(state.join("audit.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    log.record(event(1)).await.unwrap();
    log.close().await.unwrap();

    fs::rename(state.join("audit.key"), state.join("key.bak")).unwrap();
    let err = AuditLog::open(config(state, 1500)).err().unwrap();
    assert!(matches!(err, AuditError::KeyMissing { .. }), "{err}");
    assert!(!state.join("audit.key").exists(), "no new key was minted");

    // A public key that belongs to another secret key is refused too.
    fs::rename(state.join("key.bak"), state.join("audit.key")).unwrap();
    fs::write(state.join("audit.pub"), format!("{}\n", "11".repeat(32))).unwrap();
    assert!(AuditLog::open(config(state, 1500)).is_err());

    // A missing public key is rewritten from the secret key.
    fs::remove_file(state.join("audit.pub")).unwrap();
    let (log, again) = AuditLog::open(config(state, 1500)).unwrap();
    assert!(!again.created_key);
    assert_eq!(again.public_key_hex, report.public_key_hex);
    log.close().await.unwrap();

    // Empty log dir, no key: a new key for a new chain (replacing a stale
    // public key).
    let fresh = TempDir::new("key-fresh");
    fs::create_dir_all(fresh.path().join("audit")).unwrap();
    fs::write(fresh.path().join("audit.pub"), "11".repeat(32)).unwrap();
    let (log, report) = AuditLog::open(config(fresh.path(), 1500)).unwrap();
    assert!(report.created_key);
    log.record(event(1)).await.unwrap();
    log.close().await.unwrap();
    assert_eq!(
        hex::encode(pubkey(fresh.path()).as_bytes()),
        report.public_key_hex
    );
    assert!(verify(&fresh.path().join("audit"), &pubkey(fresh.path())).is_ok());
}

#[tokio::test]
async fn both_fsync_modes_work() {
    for mode in [
        FsyncMode::Always,
        FsyncMode::Interval(Duration::from_millis(1)),
    ] {
        let tmp = TempDir::new("fsync");
        let cfg = AuditConfig {
            fsync: mode,
            ..config(tmp.path(), 2000)
        };
        let (log, _) = AuditLog::open(cfg).unwrap();
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(
                async move { record_n(&log, t * 100, 25).await },
            ));
        }
        for t in tasks {
            t.await.unwrap();
        }
        log.close().await.unwrap();
        let report = verify(&tmp.path().join("audit"), &pubkey(tmp.path()));
        assert!(report.is_ok(), "{mode:?}: {report}");
        let commands = all_events(tmp.path())
            .iter()
            .filter(|e| e["type"] == "command")
            .count();
        assert_eq!(commands, 100, "{mode:?}");
    }
}

#[tokio::test]
async fn try_record_writes_now_only_when_nothing_would_wait() {
    let tmp = TempDir::new("try-record");
    let cfg = fast_sync_config(tmp.path());
    let (log, _) = AuditLog::open(cfg).unwrap();
    let first = log.record(event(0)).await.unwrap();
    // The writer is free: the line is in the file when this returns.
    let TryRecord::Written(Ok(now)) = log.try_record(event(1)) else {
        panic!("a free writer did not take the event");
    };
    assert_eq!(now, first + 1);
    assert_eq!(
        all_events(tmp.path()).last().map(|e| e["seq"].clone()),
        Some(now.into())
    );
    // A recorder holds the lock: nothing is written, the event comes back.
    let held = log.inner.core.hold_writer();
    let back = match log.try_record(event(2)) {
        TryRecord::Busy(ev) => *ev,
        TryRecord::Written(w) => panic!("written under a held lock: {w:?}"),
    };
    assert_eq!(back, event(2));
    drop(held);
    assert_eq!(log.record(back).await.unwrap(), now + 1);
    // An event no caller may write is refused, not handed back.
    assert!(matches!(
        log.try_record(AuditEvent::new("checkpoint")),
        TryRecord::Written(Err(AuditError::InvalidEvent(_)))
    ));
    log.close().await.unwrap();
    assert!(matches!(
        log_after_close_try(&tmp).await,
        TryRecord::Written(Err(AuditError::Closed))
    ));
    let report = verify(&tmp.path().join("audit"), &pubkey(tmp.path()));
    assert!(report.is_ok(), "{report}");
    let commands: Vec<Value> = all_events(tmp.path())
        .into_iter()
        .filter(|e| e["type"] == "command")
        .map(|e| e["detail"]["i"].clone())
        .collect();
    assert_eq!(commands, [0, 1, 2].map(Value::from));

    // With fsync = "always" a record waits for its sync: never now.
    let tmp = TempDir::new("try-record-always");
    let cfg = AuditConfig {
        fsync: FsyncMode::Always,
        ..config(tmp.path(), 1 << 20)
    };
    let (log, _) = AuditLog::open(cfg).unwrap();
    assert!(matches!(log.try_record(event(3)), TryRecord::Busy(_)));
    log.close().await.unwrap();
}

/// A recorder that finds the writer held past its spin parks on its
/// runtime: the thread keeps running other tasks, the record fails with
/// `QueueFull` when the lock timeout ends and nothing of it is written.
#[tokio::test(flavor = "current_thread")]
async fn a_writer_held_too_long_fails_the_record_without_blocking_the_thread() {
    let tmp = TempDir::new("lock-timeout");
    let cfg = AuditConfig {
        enqueue_timeout: Duration::from_millis(300),
        ..fast_sync_config(tmp.path())
    };
    let (log, _) = AuditLog::open(cfg).unwrap();
    let first = log.record(event(0)).await.unwrap();
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ticker = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let held = log.inner.core.hold_writer();
    let started = std::time::Instant::now();
    let result = log.record(event(1)).await;
    let waited = started.elapsed();
    drop(held);
    ticker.abort();
    assert!(
        matches!(result, Err(AuditError::QueueFull(_))),
        "{result:?}"
    );
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    // The only thread of this runtime ran the ticker while the record
    // waited: it did not spin or block through the wait.
    assert!(ticks.load(Ordering::Relaxed) >= 10, "{ticks:?}");
    assert_eq!(log.record(event(2)).await.unwrap(), first + 1);

    // A parked recorder whose session ends (its future dropped) stops
    // counting as parked.
    let held = log.inner.core.hold_writer();
    let waiting = tokio::spawn({
        let log = log.clone();
        async move { log.record(event(3)).await }
    });
    let parked = std::time::Instant::now();
    while log.inner.core.parked_recorders() == 0 {
        assert!(parked.elapsed() < Duration::from_secs(10), "never parked");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    assert_eq!(log.inner.core.parked_recorders(), 0);
    drop(held);
    log.close().await.unwrap();
    let details: Vec<Value> = all_events(tmp.path())
        .into_iter()
        .filter(|e| e["type"] == "command")
        .map(|e| e["detail"]["i"].clone())
        .collect();
    assert_eq!(details, [0, 2].map(Value::from));
}

/// A parked recorder is woken when the writer is released, not when its
/// timeout ends; recorders on several threads meanwhile all get their
/// lines into one chain.
#[test]
fn a_parked_recorder_is_woken_when_the_writer_is_released() {
    let tmp = TempDir::new("lock-wake");
    let cfg = AuditConfig {
        enqueue_timeout: Duration::from_secs(20),
        ..fast_sync_config(tmp.path())
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (log, _) = runtime.block_on(async { AuditLog::open(cfg) }).unwrap();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let waited = std::thread::scope(|scope| {
        let holder = log.clone();
        scope.spawn(move || {
            let held = holder.inner.core.hold_writer();
            held_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            drop(held);
        });
        held_rx.recv().unwrap();
        let recorders: Vec<_> = (0..6u64)
            .map(|t| {
                let log = log.clone();
                runtime.spawn(async move {
                    let started = std::time::Instant::now();
                    let seqs = record_n(&log, t * 100, 20).await;
                    (started.elapsed(), seqs)
                })
            })
            .collect();
        // Long past any spin: every recorder is parked now.
        std::thread::sleep(Duration::from_millis(200));
        release_tx.send(()).unwrap();
        runtime.block_on(async {
            let mut longest = Duration::ZERO;
            for r in recorders {
                let (waited, seqs) = r.await.unwrap();
                assert_eq!(seqs.len(), 20);
                longest = longest.max(waited);
            }
            longest
        })
    });
    // Woken by the release (200 ms in), not by the 20 s timeout.
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    runtime.block_on(log.close()).unwrap();
    let report = verify(&tmp.path().join("audit"), &pubkey(tmp.path()));
    assert!(report.is_ok(), "{report}");
    let commands = all_events(tmp.path())
        .iter()
        .filter(|e| e["type"] == "command")
        .count();
    assert_eq!(commands, 120);
}

/// A holder that panicked mid-event leaves the lock poisoned and its line
/// unwritten in the buffer: the next recorder drops that line and the
/// chain goes on from the last written one.
#[tokio::test]
async fn a_panic_while_holding_the_writer_leaves_no_half_event() {
    let tmp = TempDir::new("lock-poison");
    let cfg = fast_sync_config(tmp.path());
    let (log, _) = AuditLog::open(cfg).unwrap();
    let first = log.record(event(0)).await.unwrap();
    let fields = event(1).encode_fields().unwrap();
    log.inner.core.panic_mid_event(&fields);
    assert_eq!(log.record(event(2)).await.unwrap(), first + 1);
    assert!(matches!(
        log.try_record(event(3)),
        TryRecord::Written(Ok(seq)) if seq == first + 2
    ));
    log.close().await.unwrap();
    let report = verify(&tmp.path().join("audit"), &pubkey(tmp.path()));
    assert!(report.is_ok(), "{report}");
    let details: Vec<Value> = all_events(tmp.path())
        .into_iter()
        .filter(|e| e["type"] == "command")
        .map(|e| e["detail"]["i"].clone())
        .collect();
    assert_eq!(details, [0, 2, 3].map(Value::from));
}

/// `try_record` on a handle whose log was closed.
async fn log_after_close_try(tmp: &TempDir) -> TryRecord {
    let cfg = fast_sync_config(tmp.path());
    let (log, _) = AuditLog::open(cfg).unwrap();
    let other = log.clone();
    log.close().await.unwrap();
    other.try_record(event(9))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_records_get_distinct_contiguous_seqs() {
    let tmp = TempDir::new("concurrent");
    let cfg = AuditConfig {
        checkpoint_every_events: 100,
        ..config(tmp.path(), 64 * 1024)
    };
    let (log, _) = AuditLog::open(cfg).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..250u64 {
                let ev = AuditEvent::new("command").detail("task", t).detail("i", i);
                got.push((log.record(ev).await.unwrap(), t, i));
            }
            got
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.extend(t.await.unwrap());
    }
    log.close().await.unwrap();

    let distinct: BTreeSet<u64> = got.iter().map(|g| g.0).collect();
    assert_eq!(distinct.len(), 2000);
    let events = all_events(tmp.path());
    let n = events.len() as u64;
    assert_eq!(seqs_of(&events), (1..=n).collect::<Vec<_>>());
    // Each returned seq is the line holding that very event.
    for (seq, t, i) in &got {
        let e = &events[*seq as usize - 1];
        assert_eq!(
            (e["detail"]["task"].as_u64(), e["detail"]["i"].as_u64()),
            (Some(*t), Some(*i))
        );
    }
    // Everything else is a checkpoint.
    assert_eq!(
        events.iter().filter(|e| e["type"] == "checkpoint").count() as u64,
        n - 2000
    );
    assert!(audit_files(tmp.path()).len() > 1);
    let report = verify(&tmp.path().join("audit"), &pubkey(tmp.path()));
    assert!(report.is_ok() && report.warnings.is_empty(), "{report}");
}

#[tokio::test]
async fn one_writer_at_a_time_and_closed_means_closed() {
    let tmp = TempDir::new("lock");
    let (log, _) = AuditLog::open(config(tmp.path(), 1500)).unwrap();
    assert!(matches!(
        AuditLog::open(config(tmp.path(), 1500)),
        Err(AuditError::Locked(_))
    ));
    assert!(matches!(
        log.record(AuditEvent::new("checkpoint")).await,
        Err(AuditError::InvalidEvent(_))
    ));
    let other = log.clone();
    log.close().await.unwrap();
    assert!(matches!(
        other.record(event(1)).await,
        Err(AuditError::Closed)
    ));
    let (log, _) = AuditLog::open(config(tmp.path(), 1500)).unwrap();
    log.close().await.unwrap();
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_log() {
    let tmp = TempDir::new("drop");
    let (log, _) = AuditLog::open(config(tmp.path(), 1500)).unwrap();
    record_n(&log, 0, 3).await;
    drop(log);
    // The writer finishes on its own thread; wait for its lock to go.
    let mut reopened = None;
    for _ in 0..500 {
        match AuditLog::open(config(tmp.path(), 1500)) {
            Ok(l) => {
                reopened = Some(l);
                break;
            }
            Err(AuditError::Locked(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("{e}"),
        }
    }
    let (log, report) = reopened.expect("the writer never released the log");
    assert_eq!(report.next_seq, 5, "3 events and a final checkpoint");
    log.close().await.unwrap();
    let events = all_events(tmp.path());
    assert_eq!(events[3]["type"], "checkpoint");
}

#[tokio::test]
async fn checkpoint_follows_an_idle_event_within_the_interval() {
    let tmp = TempDir::new("cp-time");
    let cfg = AuditConfig {
        checkpoint_every: Duration::from_millis(50),
        checkpoint_every_events: 1000,
        ..config(tmp.path(), 1 << 20)
    };
    let (log, _) = AuditLog::open(cfg).unwrap();
    log.record(event(1)).await.unwrap();
    let mut found = None;
    for _ in 0..500 {
        let events = all_events(tmp.path());
        if let Some(cp) = events.iter().find(|e| e["type"] == "checkpoint") {
            found = Some(cp.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cp = found.expect("no checkpoint was written");
    assert_eq!(cp["covers_seq"], 1);
    // Nothing new: no more checkpoints, and none at close.
    log.close().await.unwrap();
    assert_eq!(all_events(tmp.path()).len(), 2);
}

#[tokio::test]
async fn read_events_filters_in_order_across_files() {
    let tmp = TempDir::new("read");
    let state = tmp.path();
    write_log(config(state, 1500), 40).await;
    let dir = state.join("audit");
    let all = read_events(&dir, &TailFilter::default()).unwrap();
    assert!(audit_files(state).len() >= 3);

    let s1 = read_events(
        &dir,
        &TailFilter {
            session: Some("s1".into()),
            ..TailFilter::default()
        },
    )
    .unwrap();
    assert_eq!(s1.len(), (0..40).filter(|i| i % 3 == 1).count());
    assert!(s1.iter().all(|e| e["session"] == "s1"));
    let seqs = seqs_of(&s1);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));

    let bob = read_events(
        &dir,
        &TailFilter {
            identity: Some("bob".into()),
            last: Some(5),
            ..TailFilter::default()
        },
    )
    .unwrap();
    assert_eq!(bob.len(), 5);
    assert_eq!(bob.last().unwrap()["detail"]["i"], 39);

    let future = read_events(
        &dir,
        &TailFilter {
            since_ms: Some(time::now_ms() + 3_600_000),
            ..TailFilter::default()
        },
    )
    .unwrap();
    assert!(future.is_empty());
    let past = read_events(
        &dir,
        &TailFilter {
            since_ms: Some(parse_since("1d").unwrap()),
            ..TailFilter::default()
        },
    )
    .unwrap();
    assert_eq!(past.len(), all.len());
}

#[tokio::test]
async fn follow_delivers_every_event_across_rotations() {
    let tmp = TempDir::new("follow");
    let state = tmp.path().to_path_buf();
    let (log, _) = AuditLog::open(config(&state, 1500)).unwrap();
    record_n(&log, 0, 10).await;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let dir = state.join("audit");
    let follower = tokio::spawn(async move {
        follow(&dir, TailFilter::default(), 5, move |e| {
            let _ = tx.send(e);
        })
        .await
    });
    record_n(&log, 10, 40).await;
    log.close().await.unwrap();
    let total = all_events(&state).len() as u64;

    let mut seen = Vec::new();
    while seen.last() != Some(&total) {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("follow stalled")
            .unwrap();
        seen.push(e["seq"].as_u64().unwrap());
    }
    follower.abort();
    assert_eq!(seen, (5..=total).collect::<Vec<_>>());
    assert!(audit_files(&state).len() >= 3);
}

#[tokio::test]
async fn follow_starts_in_the_file_holding_from_seq_and_filters() {
    let tmp = TempDir::new("follow-mid");
    let state = tmp.path().to_path_buf();
    write_log(config(&state, 1500), 40).await;
    let events = all_events(&state);
    let from = events.len() as u64 - 10;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let dir = state.join("audit");
    let filter = TailFilter {
        identity: Some("alice".into()),
        ..TailFilter::default()
    };
    let follower = tokio::spawn(async move {
        follow(&dir, filter, from, move |e| {
            let _ = tx.send(e);
        })
        .await
    });
    let expected: Vec<u64> = events
        .iter()
        .filter(|e| e["seq"].as_u64().unwrap() >= from && e["identity"]["name"] == "alice")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(!expected.is_empty());
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("follow stalled")
            .unwrap();
        seen.push(e["seq"].as_u64().unwrap());
    }
    follower.abort();
    assert_eq!(seen, expected);
}

#[test]
fn parse_since_accepts_the_documented_forms() {
    let now = time::now_ms();
    let ten_min = parse_since("10m").unwrap();
    assert!(ten_min <= now.saturating_sub(600_000) + 60_000 && ten_min + 600_000 >= now);
    assert_eq!(parse_since("2026-11-26T10:00:00Z"), Ok(1_795_687_200_000));
    assert!(parse_since("2h").unwrap() < parse_since("30s").unwrap());
    assert!(parse_since("1d").unwrap() < parse_since("2h").unwrap());
    assert!(parse_since("next tuesday").is_err());
}

/// Unmounts the tmpfs on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn full_disk_fails_fast_leaves_a_valid_log_and_recovers() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping full_disk test: needs root to mount a tmpfs");
        return;
    }
    // Nothing is reserved before writing: write(2) itself runs out of space
    // (at once or part-way through a line) and must be cut back.
    for pad in [1000, 3000, 5000] {
        full_disk_scenario(pad).await;
    }
}

async fn full_disk_scenario(pad: usize) {
    let tmp = TempDir::new("full");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mnt)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("skipping full_disk test: cannot mount a tmpfs here");
        return;
    }
    let _mount = Mount(mnt.clone());
    let cfg = AuditConfig {
        checkpoint_every_events: 1_000_000,
        ..config(&mnt, 1 << 30)
    };
    let (log, _) = AuditLog::open(cfg).unwrap();
    let big = "x".repeat(pad);
    let guard = Duration::from_secs(10);
    let mut last_ok = 0;
    let mut failure = None;
    for i in 0..1000 {
        let ev = event(i).detail("pad", big.clone());
        match tokio::time::timeout(guard, log.record(ev))
            .await
            .expect("record hung")
        {
            Ok(seq) => last_ok = seq,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("64 KiB never filled up");
    assert!(matches!(failure, AuditError::Write { .. }), "{failure}");
    assert!(last_ok > 5, "{last_ok}");
    assert!(!log.healthy());
    // It keeps failing, without hanging.
    for i in 0..3 {
        let ev = event(i).detail("pad", big.clone());
        let r = tokio::time::timeout(guard, log.record(ev))
            .await
            .expect("record hung");
        assert!(matches!(r, Err(AuditError::Write { .. })), "{r:?}");
    }
    // Nothing partial was left behind.
    let dir = mnt.join("audit");
    let report = verify(&dir, &pubkey(&mnt));
    assert!(report.is_ok() && report.warnings.is_empty(), "{report}");
    assert_eq!(report.last_seq, Some(last_ok));

    // Room again: writing works again and the chain goes on.
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=1m"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(grown.success());
    let seq = tokio::time::timeout(guard, log.record(event(0)))
        .await
        .expect("record hung")
        .unwrap();
    assert_eq!(seq, last_ok + 1, "failed events took no seq");
    assert!(log.healthy());
    log.close().await.unwrap();
    let report = verify(&dir, &pubkey(&mnt));
    assert!(report.is_ok() && report.warnings.is_empty(), "{report}");
}

#[tokio::test]
async fn durability_lag_follows_group_commit_and_always() {
    // Group commit with a long interval: the first write is synced at
    // once, later ones wait for the next interval.
    let tmp = TempDir::new("lag-interval");
    let mut cfg = config(tmp.path(), 1 << 20);
    cfg.fsync = FsyncMode::Interval(Duration::from_secs(3600));
    let (log, _) = AuditLog::open(cfg).unwrap();
    let first = log.record(event(0)).await.unwrap();
    for _ in 0..200 {
        if log.lag().durable_seq >= first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(log.lag().durable_seq, first);
    let last = *record_n(&log, 1, 3).await.last().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let lag = log.lag();
    assert_eq!(lag.written_seq, last);
    assert_eq!(lag.records, last - first, "{lag:?}");
    assert!(lag.age >= Duration::from_millis(20), "{lag:?}");
    drop(log);

    // fsync = always: nothing is ever left unsynced after record returns.
    let tmp = TempDir::new("lag-always");
    let mut cfg = config(tmp.path(), 1 << 20);
    cfg.fsync = FsyncMode::Always;
    let (log, _) = AuditLog::open(cfg).unwrap();
    let last = *record_n(&log, 0, 5).await.last().unwrap();
    let lag = log.lag();
    assert_eq!(
        (lag.written_seq, lag.records, lag.age),
        (last, 0, Duration::ZERO)
    );
}

/// Many tasks on a multi-threaded runtime append at once, in both fsync
/// modes, across checkpoints and rotations: one contiguous chain, every
/// returned seq is the line holding that very event, and it verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_appending_at_once_make_one_valid_chain() {
    for mode in [
        FsyncMode::Interval(Duration::from_millis(2)),
        FsyncMode::Always,
    ] {
        let tmp = TempDir::new("many");
        let cfg = AuditConfig {
            fsync: mode,
            checkpoint_every_events: 7,
            ..config(tmp.path(), 16 * 1024)
        };
        let (log, _) = AuditLog::open(cfg).unwrap();
        let (tasks, per_task) = (32u64, 40u64);
        let mut handles = Vec::new();
        for t in 0..tasks {
            let log = log.clone();
            handles.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..per_task {
                    let ev = AuditEvent::new("command").detail("task", t).detail("i", i);
                    let seq = log.record(ev).await.unwrap();
                    if mode == FsyncMode::Always {
                        // A sync that began after this write succeeded
                        // before record returned.
                        assert!(log.lag().durable_seq >= seq, "{mode:?} seq {seq}");
                    }
                    got.push((seq, t, i));
                    if i % 8 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                got
            }));
        }
        let mut got = Vec::new();
        for h in handles {
            got.extend(h.await.unwrap());
        }
        log.close().await.unwrap();

        let total = tasks * per_task;
        let distinct: BTreeSet<u64> = got.iter().map(|g| g.0).collect();
        assert_eq!(distinct.len() as u64, total, "{mode:?}");
        let events = all_events(tmp.path());
        assert_eq!(
            seqs_of(&events),
            (1..=events.len() as u64).collect::<Vec<_>>(),
            "{mode:?}"
        );
        for (seq, t, i) in &got {
            let e = &events[*seq as usize - 1];
            assert_eq!(
                (e["detail"]["task"].as_u64(), e["detail"]["i"].as_u64()),
                (Some(*t), Some(*i)),
                "{mode:?}"
            );
        }
        assert!(audit_files(tmp.path()).len() > 2, "{mode:?}: no rotation");
        let report = verify(&tmp.path().join("audit"), &pubkey(tmp.path()));
        assert!(
            report.is_ok() && report.warnings.is_empty() && report.checkpoints > 10,
            "{mode:?}: {report}"
        );
    }
}

/// fsync = always: recorders that wait at the same time share one
/// fdatasync, which began after every one of their writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_waiters_share_one_sync_that_began_after_their_writes() {
    let tmp = TempDir::new("always-share");
    let cfg = AuditConfig {
        fsync: FsyncMode::Always,
        checkpoint_every_events: 1000,
        ..config(tmp.path(), 1 << 20)
    };
    let (log, _) = AuditLog::open(cfg).unwrap();
    let shared = log.sync_shared();
    shared.paused.store(true, Ordering::Relaxed);
    let before = shared.syncs.load(Ordering::Relaxed);
    let mut handles = Vec::new();
    for i in 0..8u64 {
        let log = log.clone();
        handles.push(tokio::spawn(async move { log.record(event(i)).await }));
    }
    // All eight are written and waiting; none is durable yet.
    let mut waited = 0;
    while log.lag().written_seq < 8 {
        assert!(waited < 1000, "the writes never happened");
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 1;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(handles.iter().all(|h| !h.is_finished()));
    assert_eq!(log.lag().durable_seq, 0);
    shared.paused.store(false, Ordering::Relaxed);
    let mut seqs = Vec::new();
    for h in handles {
        seqs.push(h.await.unwrap().unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    assert_eq!(shared.syncs.load(Ordering::Relaxed) - before, 1);
    assert_eq!(log.lag().durable_seq, 8);
    log.close().await.unwrap();
    let report = verify(&tmp.path().join("audit"), &pubkey(tmp.path()));
    assert!(report.is_ok(), "{report}");
}

/// fsync = always and the sync fails: every waiter sharing it gets a write
/// error (the caller denies the command), the log reports unhealthy, and
/// once syncing works again records succeed and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_fails_its_always_waiters() {
    let tmp = TempDir::new("always-fail");
    let cfg = AuditConfig {
        fsync: FsyncMode::Always,
        ..config(tmp.path(), 1 << 20)
    };
    let (log, _) = AuditLog::open(cfg).unwrap();
    log.record(event(0)).await.unwrap();
    let shared = log.sync_shared();
    shared.fail_syncs.store(true, Ordering::Relaxed);
    let mut handles = Vec::new();
    for i in 1..5u64 {
        let log = log.clone();
        handles.push(tokio::spawn(async move { log.record(event(i)).await }));
    }
    for h in handles {
        let r = h.await.unwrap();
        assert!(matches!(r, Err(AuditError::Write { .. })), "{r:?}");
    }
    assert!(!log.healthy());
    shared.fail_syncs.store(false, Ordering::Relaxed);
    let seq = log.record(event(9)).await.unwrap();
    assert_eq!(log.lag().durable_seq, seq);
    log.close().await.unwrap();
    let report = verify(&tmp.path().join("audit"), &pubkey(tmp.path()));
    assert!(report.is_ok(), "{report}");
}

/// Group commit: record never waits for the sync thread (even a stalled
/// one), and the thread syncs what was written once it runs.
#[tokio::test]
async fn interval_records_do_not_wait_for_the_sync_thread() {
    let tmp = TempDir::new("interval-nowait");
    let cfg = fast_sync_config(tmp.path());
    let (log, _) = AuditLog::open(cfg).unwrap();
    let shared = log.sync_shared();
    shared.paused.store(true, Ordering::Relaxed);
    let last = *record_n(&log, 0, 20).await.last().unwrap();
    // (A checkpoint may follow the last event.)
    assert!(log.lag().written_seq >= last);
    shared.paused.store(false, Ordering::Relaxed);
    let mut waited = 0;
    while log.lag().durable_seq < last {
        assert!(waited < 1000, "never synced");
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 1;
    }
    log.close().await.unwrap();
}
