//! Masking: rewriting sensitive values in what upstreams send back, before
//! the agent sees them.
//!
//! Owns the compiled form of a resource's `[[mask]]` rules ([`Masker`]), the
//! value detectors, the masking styles, and the streaming maskers for byte
//! streams ([`StreamMasker`]) and JSON ([`JsonMasker`]). It must not know any
//! wire protocol: handlers find the values (cells, outputs, bodies) and hand
//! them here. Every masker fails closed: what it cannot inspect, it does not
//! pass through unmasked.

mod detect;
mod json;
mod stream;

use std::{collections::BTreeMap, sync::Arc};

use serde_json::Value;
use sha2::{Digest, Sha256};

pub use detect::{validate as validate_detector, Detector, DetectorError};
pub use json::JsonMasker;
pub use stream::StreamMasker;

use crate::policy::MaskRule;

/// What replaces a redacted value. Fixed, so its length says nothing.
pub const MASKED: &str = "[MASKED]";

/// Errors from masking.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// The body is not the JSON it claims to be: stop passing it.
    #[error("malformed JSON at byte {offset}: {what}")]
    MalformedJson {
        /// Offset in the stream.
        offset: u64,
        /// What was wrong.
        what: &'static str,
    },
    /// A single JSON string is larger than masking will buffer.
    #[error("a JSON string exceeds {limit} bytes; refusing to pass it uninspected")]
    StringTooLarge {
        /// The limit.
        limit: usize,
    },
    /// JSON nests deeper than masking tracks.
    #[error("JSON nests deeper than {limit} levels")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
}

/// How a masked value is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Style {
    /// Replaced by [`MASKED`].
    Redact,
    /// Every letter and digit but the last four replaced by `*`, separators
    /// kept (`****-****-****-1234`).
    Partial,
    /// A keyed SHA-256 of the value (`[sha256:…]`): equal values stay
    /// joinable, yet a low-entropy value (a card number) cannot be brute
    /// forced from the output without the daemon's key.
    Hash,
}

impl Style {
    /// Parses a policy `style` (validated at load).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "redact" => Some(Self::Redact),
            "partial" => Some(Self::Partial),
            "hash" => Some(Self::Hash),
            _ => None,
        }
    }
}

/// Masked-value counts by field (column, JSON path) or detector name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(BTreeMap<String, u64>);

impl Counts {
    /// Adds `n` under `key`.
    pub fn add(&mut self, key: &str, n: u64) {
        if n == 0 {
            return;
        }
        match self.0.get_mut(key) {
            Some(v) => *v += n,
            None => {
                self.0.insert(key.to_string(), n);
            }
        }
    }

    /// Whether nothing was masked.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Total masked values.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Counts) {
        for (k, v) in &other.0 {
            self.add(k, *v);
        }
    }

    /// The counts by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// As a JSON object (for the audit log's `masking` field).
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(*v)))
                .collect(),
        )
    }
}

/// One JSON key path pattern: keys, with `*` for any key or array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JsonPath {
    pub(crate) text: String,
    pub(crate) segments: Vec<Segment>,
    pub(crate) style: Style,
}

/// A segment of a [`JsonPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// Any key or index.
    Any,
    /// This key (or this array index, written as digits).
    Key(String),
}

impl JsonPath {
    pub(crate) fn parse(text: &str, style: Style) -> Self {
        let text = text.strip_prefix("$.").unwrap_or(text);
        Self {
            text: text.to_string(),
            segments: text
                .split('.')
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if s == "*" || s == "[*]" {
                        Segment::Any
                    } else {
                        Segment::Key(s.to_string())
                    }
                })
                .collect(),
            style,
        }
    }
}

/// A rule name (`table.column`, `column`) joined and lowercased on the
/// stack, for ASCII names: the same text `str::to_lowercase` makes of them.
struct AsciiKey {
    buf: [u8; AsciiKey::MAX],
    len: usize,
}

impl AsciiKey {
    /// Longest key made on the stack (a schema-qualified table and a
    /// column, each at most PostgreSQL's 63 bytes, fit).
    const MAX: usize = 256;

    /// `parts` joined by dots and lowercased; `None` when they are not all
    /// ASCII or do not fit.
    fn of(parts: &[&str]) -> Option<Self> {
        let mut key = Self {
            buf: [0; Self::MAX],
            len: 0,
        };
        for (i, part) in parts.iter().enumerate() {
            if !part.is_ascii() {
                return None;
            }
            let dot = usize::from(i > 0);
            let end = key.len + dot + part.len();
            let room = key.buf.get_mut(key.len..end)?;
            if dot == 1 {
                room[0] = b'.';
            }
            for (to, from) in room[dot..].iter_mut().zip(part.bytes()) {
                *to = from.to_ascii_lowercase();
            }
            key.len = end;
        }
        Some(key)
    }

    fn as_str(&self) -> &str {
        // Only lowercased ASCII bytes and dots were written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// A resource's masking rules, compiled. Cheap to share (`Arc`); built once
/// per policy load.
#[derive(Debug)]
pub struct Masker {
    resource: String,
    /// `col` and `table.col`, lowercased (PostgreSQL folds unquoted names).
    columns: BTreeMap<String, Style>,
    json_paths: Vec<JsonPath>,
    detectors: detect::DetectorSet,
    hash_key: [u8; 32],
    /// A rule says `binary = "refuse"`.
    binary_refuse: bool,
}

impl Masker {
    /// Compiles the rules of `resource` among `rules`; `None` when it has
    /// none. `hash_key` keys the `hash` style.
    pub fn compile(
        resource: &str,
        rules: &[MaskRule],
        hash_key: [u8; 32],
    ) -> Result<Option<Arc<Self>>, DetectorError> {
        let mine: Vec<&MaskRule> = rules.iter().filter(|r| r.resource == resource).collect();
        if mine.is_empty() {
            return Ok(None);
        }
        let mut columns = BTreeMap::new();
        let mut json_paths = Vec::new();
        let mut detectors = Vec::new();
        let binary_refuse = mine.iter().any(|r| r.binary == "refuse");
        for rule in mine {
            let style = Style::parse(&rule.style).unwrap_or(Style::Redact);
            for c in &rule.columns {
                columns.entry(c.to_lowercase()).or_insert(style);
            }
            for p in &rule.json_paths {
                json_paths.push(JsonPath::parse(p, style));
            }
            for d in &rule.detectors {
                if !detectors.iter().any(|(x, _): &(String, Style)| x == d) {
                    detectors.push((d.clone(), style));
                }
            }
        }
        Ok(Some(Arc::new(Self {
            resource: resource.to_string(),
            columns,
            json_paths,
            detectors: detect::DetectorSet::new(&detectors)?,
            hash_key,
            binary_refuse,
        })))
    }

    /// The resource these rules belong to.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The style for a result column, if a rule masks it. `table` is the
    /// column's table when known; `col` and `table.col` rules both match.
    pub fn column(&self, table: Option<&str>, column: &str) -> Option<Style> {
        if self.columns.is_empty() {
            return None;
        }
        // ASCII names (nearly all) are lowercased on the stack: this runs
        // for every column of every result set.
        match self.column_ascii(table, column) {
            Some(found) => found,
            None => self.column_lowercased(table, column),
        }
    }

    /// [`Masker::column`] for any names: each lowercased as
    /// `str::to_lowercase` does.
    fn column_lowercased(&self, table: Option<&str>, column: &str) -> Option<Style> {
        let col = column.to_lowercase();
        if let Some(t) = table {
            let t = t.to_lowercase();
            // `schema.table` names match rules written with the bare table.
            let bare = t.rsplit('.').next().unwrap_or(&t);
            for name in [&t[..], bare] {
                if let Some(s) = self.columns.get(&format!("{name}.{col}")) {
                    return Some(*s);
                }
            }
        }
        self.columns.get(&col).copied()
    }

    /// [`Masker::column`] for ASCII names that fit [`AsciiKey`], with the
    /// same result; `None` when the names do not qualify.
    fn column_ascii(&self, table: Option<&str>, column: &str) -> Option<Option<Style>> {
        if let Some(t) = table {
            // The name as given, then the bare table (after its last dot).
            let bare = t.rsplit('.').next().unwrap_or(t);
            for name in [t, bare] {
                let key = AsciiKey::of(&[name, column])?;
                if let Some(s) = self.columns.get(key.as_str()) {
                    return Some(Some(*s));
                }
            }
        }
        let key = AsciiKey::of(&[column])?;
        Some(self.columns.get(key.as_str()).copied())
    }

    /// The column rules as written (`col`, `table.col`, `schema.table.col`),
    /// lowercased: for the statement analysis that keeps masked columns
    /// out of expressions.
    pub fn column_rules(&self) -> impl Iterator<Item = &str> {
        self.columns.keys().map(String::as_str)
    }

    /// Whether any column rules exist.
    pub fn has_columns(&self) -> bool {
        !self.columns.is_empty()
    }

    /// Whether any value detectors are configured.
    pub fn has_detectors(&self) -> bool {
        !self.detectors.is_empty()
    }

    /// Whether output that is not text must be refused rather than relayed
    /// unmasked (a rule of the resource says `binary = "refuse"`).
    pub fn binary_refuse(&self) -> bool {
        self.binary_refuse
    }

    /// Whether any JSON path rules exist.
    pub fn has_json_paths(&self) -> bool {
        !self.json_paths.is_empty()
    }

    /// Rewrites a whole value with `style` into `out`.
    pub fn mask_whole(&self, style: Style, value: &[u8], out: &mut Vec<u8>) {
        apply_style(style, &self.hash_key, value, out);
    }

    /// Runs the detectors over one complete value and appends it to `out`
    /// with every hit rewritten (by its rule's style). Returns the number of
    /// hits; 0 means `out` got the value unchanged.
    pub fn mask_detected(&self, value: &[u8], out: &mut Vec<u8>, counts: &mut Counts) -> usize {
        let mut hits = Vec::new();
        self.detectors.find(value, true, &mut hits);
        self.rewrite(value, &hits, out, counts);
        hits.len()
    }

    /// Whether a complete value contains anything a detector would mask.
    pub fn detects(&self, value: &[u8]) -> bool {
        let mut hits = Vec::new();
        self.detectors.find(value, true, &mut hits);
        !hits.is_empty()
    }

    /// A streaming masker for a byte stream (terminal output, text bodies).
    pub fn stream(self: &Arc<Self>) -> StreamMasker {
        StreamMasker::new(self.clone())
    }

    /// A streaming JSON masker: the rules' `json_paths` plus `extra_paths`
    /// (redacted), and the detectors on every string and number.
    pub fn json(self: &Arc<Self>, extra_paths: &[&str]) -> JsonMasker {
        let mut paths = self.json_paths.clone();
        paths.extend(
            extra_paths
                .iter()
                .map(|p| JsonPath::parse(p, Style::Redact)),
        );
        JsonMasker::new(self.clone(), paths)
    }

    /// Appends `value` to `out` with `hits` (sorted, disjoint) rewritten.
    fn rewrite(&self, value: &[u8], hits: &[detect::Hit], out: &mut Vec<u8>, counts: &mut Counts) {
        let mut at = 0;
        for h in hits {
            out.extend_from_slice(&value[at..h.start]);
            let (name, style) = self.detectors.describe(h.detector);
            apply_style(style, &self.hash_key, &value[h.start..h.end], out);
            counts.add(name, 1);
            at = h.end;
        }
        out.extend_from_slice(&value[at..]);
    }

    pub(crate) fn detector_set(&self) -> &detect::DetectorSet {
        &self.detectors
    }

    pub(crate) fn hash_key(&self) -> &[u8; 32] {
        &self.hash_key
    }
}

/// Writes `value` rewritten by `style`.
pub(crate) fn apply_style(style: Style, key: &[u8; 32], value: &[u8], out: &mut Vec<u8>) {
    match style {
        Style::Redact => out.extend_from_slice(MASKED.as_bytes()),
        Style::Partial => {
            let alnum = value.iter().filter(|b| b.is_ascii_alphanumeric()).count();
            // Short values keep nothing: four of five characters would
            // reveal too much.
            let keep = if alnum >= 8 { 4 } else { 0 };
            let mut seen = 0;
            for &b in value {
                if b.is_ascii_alphanumeric() {
                    seen += 1;
                    out.push(if seen > alnum - keep { b } else { b'*' });
                } else if b.is_ascii() {
                    out.push(b);
                } else {
                    // Non-ASCII bytes (multi-byte characters) are masked
                    // whole, byte for byte, so UTF-8 stays valid.
                    if b & 0xC0 != 0x80 {
                        out.push(b'*');
                    }
                }
            }
        }
        Style::Hash => {
            let mut h = Sha256::new();
            h.update(key);
            h.update(value);
            let digest = h.finalize();
            out.extend_from_slice(b"[sha256:");
            out.extend_from_slice(hex::encode(&digest[..8]).as_bytes());
            out.push(b']');
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_pending;
