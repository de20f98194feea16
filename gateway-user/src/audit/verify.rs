//! `portcullis audit verify`: checks every file of a log, in order, on raw
//! bytes, and names the first broken line.
//!
//! Owns the verification rules (see the parent module's doc). It must not
//! write anything.

use std::{
    fmt,
    fs::File,
    io::{self, BufRead as _, BufReader},
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signature, VerifyingKey};
use serde::Serialize;

use super::{
    chain::{self, LineProblem, GENESIS_HASH},
    time::parse_rfc3339_ms,
};

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyError {
    /// The file (or the directory, when it cannot be listed).
    pub file: PathBuf,
    /// 1-based line number in that file (0: not about a line).
    pub line: u64,
    /// The line's seq, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, " line {}", self.line)?;
        }
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Audit files checked.
    pub files: usize,
    /// Valid lines, checkpoints included.
    pub events: u64,
    /// Valid checkpoints.
    pub checkpoints: u64,
    /// Seq of the last valid line.
    pub last_seq: Option<u64>,
    /// Hash of the last valid line.
    pub head_hash: Option<String>,
    /// Seq covered by the last valid checkpoint: everything up to it is
    /// signed.
    pub last_checkpoint_seq: Option<u64>,
    /// Things that are not failures (a torn final line left by a crash).
    pub warnings: Vec<String>,
    /// The first problem, if any: verification stops there.
    pub error: Option<VerifyError>,
}

impl VerifyReport {
    /// Whether the log verified (warnings allowed).
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        match &self.error {
            Some(e) => write!(f, "audit log BROKEN at {e}")?,
            None => write!(f, "audit log OK")?,
        }
        write!(
            f,
            "\n{} files, {} events ({} checkpoints)",
            self.files, self.events, self.checkpoints
        )?;
        if self.error.is_some() {
            write!(f, " valid before the break")?;
        }
        if let Some(seq) = self.last_seq {
            write!(f, ", last seq {seq}")?;
        }
        match self.last_checkpoint_seq {
            Some(cp) => write!(f, ", signed up to seq {cp}")?,
            None if self.events > 0 => write!(f, ", no signed checkpoint yet")?,
            None => {}
        }
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct SeqOnly {
    seq: u64,
}

fn seq_of(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<SeqOnly>(line).ok().map(|s| s.seq)
}

struct Verifier<'a> {
    key: &'a VerifyingKey,
    report: VerifyReport,
    prev_hash: Vec<u8>,
    next_seq: u64,
}

/// Checks every file of the log in `dir`, in order: each line's JSON, `seq`
/// continuity (+1 from 1), `prev_hash` linkage (across files), each hash and
/// each checkpoint signature against `key`. Stops at the first problem. A
/// torn final line of the newest file (no newline, or not JSON) is a
/// warning.
pub fn verify(dir: &Path, key: &VerifyingKey) -> VerifyReport {
    let mut v = Verifier {
        key,
        report: VerifyReport::default(),
        prev_hash: GENESIS_HASH.to_vec(),
        next_seq: 1,
    };
    let files = match chain::list_files(dir) {
        Ok(files) => files,
        Err(e) => {
            v.report.error = Some(VerifyError {
                file: dir.to_path_buf(),
                line: 0,
                seq: None,
                message: format!("cannot list the audit directory: {e}"),
            });
            return v.report;
        }
    };
    if files.is_empty() {
        v.report
            .warnings
            .push(format!("no audit files in {}", dir.display()));
    }
    for (i, (_, path)) in files.iter().enumerate() {
        v.report.files += 1;
        let newest = i + 1 == files.len();
        if let Err(e) = v.file(path, newest) {
            v.report.error = Some(e);
            break;
        }
    }
    v.report
}

/// Checks a chain held elsewhere than in files (the fleet store): `lines`
/// are `(seq as stored beside the line, line)` in stored order, under the
/// same rules as [`verify`]; errors name `source` and the seq.
pub fn verify_lines(
    source: &Path,
    lines: impl IntoIterator<Item = (u64, String)>,
    key: &VerifyingKey,
) -> VerifyReport {
    let mut v = Verifier {
        key,
        report: VerifyReport::default(),
        prev_hash: GENESIS_HASH.to_vec(),
        next_seq: 1,
    };
    for (n, (stored_seq, line)) in lines.into_iter().enumerate() {
        let fail = |message: String| VerifyError {
            file: source.to_path_buf(),
            line: n as u64 + 1,
            seq: Some(stored_seq),
            message,
        };
        let fields = match chain::check_line(line.as_bytes()) {
            Ok(f) => f,
            Err(LineProblem::Unparsable(why)) => {
                v.report.error = Some(fail(format!("not a valid event: {why}")));
                break;
            }
            Err(LineProblem::Invalid(why)) => {
                v.report.error = Some(fail(why));
                break;
            }
        };
        if fields.seq != stored_seq {
            v.report.error = Some(fail(format!(
                "stored as seq {stored_seq} but the event says seq {}",
                fields.seq
            )));
            break;
        }
        if let Err(m) = v.link(fields) {
            v.report.error = Some(fail(m));
            break;
        }
    }
    v.report
}

impl Verifier<'_> {
    fn file(&mut self, path: &Path, newest: bool) -> Result<(), VerifyError> {
        let fail = |line: u64, seq: Option<u64>, message: String| VerifyError {
            file: path.to_path_buf(),
            line,
            seq,
            message,
        };
        let read_err = |line: u64, e: io::Error| fail(line, None, format!("cannot read: {e}"));
        let file = File::open(path).map_err(|e| read_err(0, e))?;
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let mut buf = Vec::with_capacity(1024);
        let mut line_no = 0u64;
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| read_err(line_no + 1, e))?;
            if n == 0 {
                return Ok(());
            }
            line_no += 1;
            if buf.last() != Some(&b'\n') {
                if newest {
                    self.report.warnings.push(format!(
                        "{} line {line_no}: torn final line ({n} bytes without a newline), \
                         left by a crash; the daemon truncates it when it starts",
                        path.display()
                    ));
                    return Ok(());
                }
                return Err(fail(
                    line_no,
                    seq_of(&buf),
                    "truncated: the line has no newline but this is not the newest file".into(),
                ));
            }
            buf.pop();
            let at_end = reader
                .fill_buf()
                .map_err(|e| read_err(line_no + 1, e))?
                .is_empty();
            let fields = match chain::check_line(&buf) {
                Ok(fields) => fields,
                Err(LineProblem::Unparsable(why)) if newest && at_end => {
                    self.report.warnings.push(format!(
                        "{} line {line_no}: torn final line (not a JSON event: {why}), \
                         left by a crash; the daemon truncates it when it starts",
                        path.display()
                    ));
                    return Ok(());
                }
                Err(LineProblem::Unparsable(why)) => {
                    return Err(fail(
                        line_no,
                        seq_of(&buf),
                        format!("not a valid event: {why}"),
                    ))
                }
                Err(LineProblem::Invalid(why)) => return Err(fail(line_no, seq_of(&buf), why)),
            };
            let seq = Some(fields.seq);
            self.link(fields).map_err(|m| fail(line_no, seq, m))?;
        }
    }

    /// Checks a line that is valid by itself against the chain so far
    /// (seq continuity, `prev_hash` linkage, time, checkpoint signature)
    /// and advances the chain.
    fn link(&mut self, fields: chain::LineFields) -> Result<(), String> {
        if fields.seq != self.next_seq {
            return Err(format!(
                "seq {} where {} was expected (an event was removed, added or moved)",
                fields.seq, self.next_seq
            ));
        }
        if fields.prev_hash.as_bytes() != self.prev_hash.as_slice() {
            return Err(format!(
                "prev_hash {} is not the hash of the previous event ({})",
                fields.prev_hash,
                String::from_utf8_lossy(&self.prev_hash)
            ));
        }
        if parse_rfc3339_ms(&fields.time).is_none() {
            return Err(format!(
                "time {:?} is not an RFC 3339 timestamp",
                fields.time
            ));
        }
        if fields.kind == "checkpoint" {
            self.checkpoint(&fields)?;
            self.report.checkpoints += 1;
            self.report.last_checkpoint_seq = fields.covers_seq;
        }
        self.report.events += 1;
        self.report.last_seq = Some(fields.seq);
        self.next_seq = fields.seq + 1;
        self.prev_hash = fields.hash.clone().into_bytes();
        self.report.head_hash = Some(fields.hash);
        Ok(())
    }

    fn checkpoint(&self, fields: &chain::LineFields) -> Result<(), String> {
        let (Some(covers), Some(head), Some(sig)) =
            (fields.covers_seq, &fields.head_hash, &fields.signature)
        else {
            return Err("checkpoint without covers_seq, head_hash and signature".into());
        };
        if covers + 1 != fields.seq {
            return Err(format!(
                "checkpoint covers seq {covers} but must cover the event before it ({})",
                fields.seq.saturating_sub(1)
            ));
        }
        if *head != fields.prev_hash {
            return Err("checkpoint head_hash is not the hash of the event it covers".into());
        }
        let mut sig_bytes = [0u8; 64];
        hex::decode_to_slice(sig, &mut sig_bytes)
            .map_err(|e| format!("checkpoint signature is not 128 hex characters: {e}"))?;
        let signature = Signature::from_bytes(&sig_bytes);
        self.key
            .verify_strict(
                &chain::checkpoint_message(covers, head.as_bytes()),
                &signature,
            )
            .map_err(|_| {
                "checkpoint signature does not verify with the audit public key".to_string()
            })
    }
}
