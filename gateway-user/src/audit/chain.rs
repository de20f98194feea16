//! The chain's byte-level rules, shared by the writer, recovery, the verifier
//! and the readers: file names, the hash of a line, splitting the `hash`
//! field off a raw line, the checkpoint signature message.
//!
//! Owns nothing stateful and does no I/O except listing the directory.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

/// `prev_hash` of the very first event: 64 ASCII zeros.
pub const GENESIS_HASH: [u8; 64] = [b'0'; 64];

/// What every line ends with after its hash: `,"hash":"` + 64 hex + `"}`.
const HASH_PREFIX: &[u8] = b",\"hash\":\"";
/// Length of the `,"hash":"<64 hex>"}` suffix.
pub const HASH_SUFFIX_LEN: usize = HASH_PREFIX.len() + 64 + 2;

/// Domain-separation prefix of the checkpoint signature message.
pub const CHECKPOINT_CONTEXT: &[u8] = b"portcullis-audit-checkpoint\0";

/// The file name of audit file number `index` (`audit-000001.jsonl`).
pub fn file_name(index: u64) -> String {
    format!("audit-{index:06}.jsonl")
}

/// The index in an audit file name, or `None` for any other name.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The audit files in `dir`, ordered by index.
pub fn list_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(index) = name.to_str().and_then(parse_file_name) {
            if entry.file_type()?.is_file() {
                files.push((index, entry.path()));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The hash of a line: hex SHA-256 of `prev_hash` (64 hex ASCII bytes)
/// followed by `body` (the line without its hash field, ending in `}`).
pub fn line_hash(prev_hash: &[u8], body_without_brace: &[u8], closing: &[u8]) -> [u8; 64] {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash);
    hasher.update(body_without_brace);
    hasher.update(closing);
    let digest = hasher.finalize();
    let mut out = [0u8; 64];
    // 32 bytes always fit 64 hex characters.
    let _ = hex::encode_to_slice(digest, &mut out);
    out
}

/// A raw line (without its newline) split at its hash field.
pub struct SplitLine<'a> {
    /// Everything before `,"hash":"`; the hashed body is this plus `}`.
    pub head: &'a [u8],
    /// The 64 hex characters of the hash as written.
    pub hash: &'a [u8],
}

/// Splits `line` at its final `,"hash":"<64 lowercase hex>"}`, or `None` when
/// the line does not end that way.
pub fn split_hash(line: &[u8]) -> Option<SplitLine<'_>> {
    let cut = line.len().checked_sub(HASH_SUFFIX_LEN)?;
    let (head, suffix) = line.split_at(cut);
    let rest = suffix.strip_prefix(HASH_PREFIX)?;
    let (hash, close) = rest.split_at(64);
    if close != b"\"}" || !is_lower_hex(hash) {
        return None;
    }
    Some(SplitLine { head, hash })
}

/// Whether `s` is non-empty lowercase hexadecimal.
pub fn is_lower_hex(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The bytes a checkpoint's signature covers:
/// `portcullis-audit-checkpoint\0{covers_seq}\0{head_hash}`.
pub fn checkpoint_message(covers_seq: u64, head_hash: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(CHECKPOINT_CONTEXT.len() + 21 + head_hash.len());
    msg.extend_from_slice(CHECKPOINT_CONTEXT);
    msg.extend_from_slice(covers_seq.to_string().as_bytes());
    msg.push(0);
    msg.extend_from_slice(head_hash);
    msg
}

/// The parts of a line that the chain rules look at.
#[derive(serde::Deserialize)]
pub struct LineFields {
    /// Sequence number.
    pub seq: u64,
    /// Event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Timestamp text.
    pub time: String,
    /// Hash of the previous event.
    pub prev_hash: String,
    /// This event's hash.
    pub hash: String,
    /// Checkpoints: the seq they cover.
    #[serde(default)]
    pub covers_seq: Option<u64>,
    /// Checkpoints: the hash of the event they cover.
    #[serde(default)]
    pub head_hash: Option<String>,
    /// Checkpoints: hex Ed25519 signature.
    #[serde(default)]
    pub signature: Option<String>,
}

/// Why a line is not a valid link of the chain by itself.
#[derive(Debug)]
pub enum LineProblem {
    /// Not a JSON object with the fields every event has.
    Unparsable(String),
    /// The JSON is fine but the line breaks a byte-level rule.
    Invalid(String),
}

/// Parses one line (without newline) and checks its own hash against its own
/// `prev_hash` (not the linkage to the previous line, which the caller knows).
pub fn check_line(line: &[u8]) -> Result<LineFields, LineProblem> {
    let fields: LineFields =
        serde_json::from_slice(line).map_err(|e| LineProblem::Unparsable(e.to_string()))?;
    let split = split_hash(line).ok_or_else(|| {
        LineProblem::Invalid(
            "the line does not end with its hash field (,\"hash\":\"<64 hex>\"})".into(),
        )
    })?;
    if split.hash != fields.hash.as_bytes() {
        return Err(LineProblem::Invalid(
            "the hash field is not the line's last key".into(),
        ));
    }
    if fields.prev_hash.len() != 64 || !is_lower_hex(fields.prev_hash.as_bytes()) {
        return Err(LineProblem::Invalid(
            "prev_hash is not 64 lowercase hex characters".into(),
        ));
    }
    let computed = line_hash(fields.prev_hash.as_bytes(), split.head, b"}");
    if computed[..] != *split.hash {
        return Err(LineProblem::Invalid(format!(
            "hash mismatch: the line says {} but its content hashes to {}",
            fields.hash,
            String::from_utf8_lossy(&computed)
        )));
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        assert_eq!(file_name(1), "audit-000001.jsonl");
        assert_eq!(file_name(1_234_567), "audit-1234567.jsonl");
        assert_eq!(parse_file_name("audit-000042.jsonl"), Some(42));
        assert_eq!(parse_file_name("audit-1234567.jsonl"), Some(1_234_567));
        assert_eq!(parse_file_name("audit-42.jsonl"), None);
        assert_eq!(parse_file_name("audit-00004x.jsonl"), None);
        assert_eq!(parse_file_name("audit-000001.jsonl.tmp"), None);
    }

    #[test]
    fn split_hash_needs_the_exact_suffix() {
        let h = "ab".repeat(32);
        let line = format!("{{\"seq\":1,\"hash\":\"{h}\"}}");
        let split = split_hash(line.as_bytes()).unwrap();
        assert_eq!(split.head, b"{\"seq\":1");
        assert_eq!(split.hash, h.as_bytes());
        assert!(split_hash(format!("{{\"seq\":1,\"hash\":\"{h}\" }}").as_bytes()).is_none());
        assert!(split_hash(line.to_uppercase().as_bytes()).is_none());
        assert!(split_hash(b"{}").is_none());
    }
}
