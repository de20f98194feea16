//! Masking JSON as it streams: one document or a sequence of them (watch
//! streams, NDJSON), in chunks cut anywhere.
//!
//! A small tokenizer tracks the key path of every value. A scalar at a
//! masked path (or anywhere under a masked object or array) is rewritten;
//! every other string and number goes through the detectors. Structure and
//! unmasked values pass through byte for byte. Only the string or number
//! being read is buffered (bounded), never the document. Anything that is
//! not JSON is an error: the caller must stop passing the body.

use std::sync::Arc;

use super::{apply_style, Counts, JsonPath, MaskError, Masker, Segment, Style};

/// The longest single string or number buffered for inspection.
pub const MAX_STRING: usize = 4 << 20;
/// The deepest nesting tracked.
pub const MAX_DEPTH: usize = 512;
/// Longest number or literal token.
const MAX_LITERAL: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A value (top level, after `:`, after `[` or `,` in an array).
    Value,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value inside a container: `,` or the closing bracket.
    CommaOrEnd,
    /// After `[`: a value or `]`.
    ValueOrEnd,
}

#[derive(Debug)]
enum Frame {
    Object { key: String },
    Array { index: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between tokens.
    Between,
    /// Inside a string. `escape`: 0 outside an escape, 1 right after a
    /// backslash, 2..=5 inside `\uXXXX` (hex digits still due + 1).
    Str { escape: u8, key: bool },
    /// Inside a number or `true`/`false`/`null`.
    Literal,
}

/// A streaming JSON masker. See the module docs.
#[derive(Debug)]
pub struct JsonMasker {
    masker: Arc<Masker>,
    paths: Vec<JsonPath>,
    stack: Vec<Frame>,
    expect: Expect,
    lex: Lex,
    /// The string or literal being read (raw bytes, escapes included).
    token: Vec<u8>,
    /// The style for the value being read, when its path is masked.
    token_mask: Option<(Style, usize)>,
    /// Depth at which a masked container started: everything below it is
    /// masked with that style.
    masked_below: Option<(usize, Style, usize)>,
    scratch: Vec<u8>,
    /// Reused buffer for a rewritten value.
    masked: Vec<u8>,
    offset: u64,
    counts: Counts,
    documents: u64,
    failed: bool,
}

impl JsonMasker {
    pub(super) fn new(masker: Arc<Masker>, paths: Vec<JsonPath>) -> Self {
        Self {
            masker,
            paths,
            stack: Vec::new(),
            expect: Expect::Value,
            lex: Lex::Between,
            token: Vec::new(),
            token_mask: None,
            masked_below: None,
            scratch: Vec::new(),
            masked: Vec::new(),
            offset: 0,
            counts: Counts::default(),
            documents: 0,
            failed: false,
        }
    }

    /// Masked values so far, by path or detector.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Complete top-level documents seen.
    pub fn documents(&self) -> u64 {
        self.documents
    }

    /// Whether the stream stands between documents (nothing half-read).
    pub fn at_document_boundary(&self) -> bool {
        self.stack.is_empty() && self.lex == Lex::Between
    }

    /// Takes a chunk; appends its masked form to `out`. After an error the
    /// masker refuses everything.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), MaskError> {
        if self.failed {
            return Err(self.err("input after an error"));
        }
        let r = self.run(chunk, out);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    /// Ends the stream: a half-read document is an error.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        if self.failed {
            return Err(self.err("input after an error"));
        }
        if self.lex == Lex::Literal {
            self.end_literal(out)?;
        }
        if !self.at_document_boundary() {
            self.failed = true;
            return Err(self.err("truncated document"));
        }
        Ok(())
    }

    fn err(&self, what: &'static str) -> MaskError {
        MaskError::MalformedJson {
            offset: self.offset,
            what,
        }
    }

    fn run(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), MaskError> {
        let mut i = 0;
        while i < chunk.len() {
            match self.lex {
                Lex::Str { mut escape, key } => {
                    // Copy up to the closing quote in one go.
                    let rest = &chunk[i..];
                    let mut end = None;
                    for (j, &b) in rest.iter().enumerate() {
                        if escape == 1 {
                            escape = match b {
                                b'u' => 5,
                                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => 0,
                                _ => {
                                    self.offset += j as u64;
                                    return Err(self.err("bad escape in a string"));
                                }
                            };
                        } else if escape > 1 {
                            if !b.is_ascii_hexdigit() {
                                self.offset += j as u64;
                                return Err(self.err("bad \\u escape in a string"));
                            }
                            escape = if escape == 2 { 0 } else { escape - 1 };
                        } else if b == b'\\' {
                            escape = 1;
                        } else if b == b'"' {
                            end = Some(j);
                            break;
                        } else if b < 0x20 {
                            self.offset += j as u64;
                            return Err(self.err("control character in a string"));
                        }
                    }
                    let take = end.unwrap_or(rest.len());
                    // A masked string's content is not needed: only its
                    // end is.
                    let masked_whole = self.token_mask.is_some_and(|(s, _)| s == Style::Redact);
                    if !masked_whole {
                        if self.token.len() + take > MAX_STRING {
                            return Err(MaskError::StringTooLarge { limit: MAX_STRING });
                        }
                        self.token.extend_from_slice(&rest[..take]);
                    }
                    self.offset += take as u64;
                    i += take;
                    match end {
                        Some(_) => {
                            i += 1;
                            self.offset += 1;
                            self.lex = Lex::Between;
                            if key {
                                self.end_key(out)?;
                            } else {
                                self.end_string(out)?;
                            }
                        }
                        None => self.lex = Lex::Str { escape, key },
                    }
                }
                Lex::Literal => {
                    let b = chunk[i];
                    if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.') {
                        if self.token.len() >= MAX_LITERAL {
                            return Err(self.err("number or literal too long"));
                        }
                        self.token.push(b);
                        i += 1;
                        self.offset += 1;
                    } else {
                        self.end_literal(out)?;
                    }
                }
                Lex::Between => {
                    let b = chunk[i];
                    self.structural(b, out)?;
                    i += 1;
                    self.offset += 1;
                }
            }
        }
        Ok(())
    }

    fn structural(&mut self, b: u8, out: &mut Vec<u8>) -> Result<(), MaskError> {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            out.push(b);
            return Ok(());
        }
        match (self.expect, b) {
            (Expect::KeyOrEnd | Expect::Key, b'"') => {
                out.push(b);
                self.token.clear();
                self.lex = Lex::Str {
                    escape: 0,
                    key: true,
                };
            }
            (Expect::KeyOrEnd, b'}') | (Expect::CommaOrEnd, b'}') => {
                if !matches!(self.stack.last(), Some(Frame::Object { .. })) {
                    return Err(self.err("unbalanced }"));
                }
                out.push(b);
                self.close();
            }
            (Expect::ValueOrEnd, b']') | (Expect::CommaOrEnd, b']') => {
                if !matches!(self.stack.last(), Some(Frame::Array { .. })) {
                    return Err(self.err("unbalanced ]"));
                }
                out.push(b);
                self.close();
            }
            (Expect::Colon, b':') => {
                out.push(b);
                self.expect = Expect::Value;
            }
            (Expect::CommaOrEnd, b',') => {
                out.push(b);
                match self.stack.last_mut() {
                    Some(Frame::Object { .. }) => self.expect = Expect::Key,
                    Some(Frame::Array { index }) => {
                        *index += 1;
                        self.expect = Expect::Value;
                    }
                    None => return Err(self.err("comma outside a container")),
                }
            }
            (Expect::Value | Expect::ValueOrEnd, _) => self.begin_value(b, out)?,
            _ => return Err(self.err("unexpected character")),
        }
        Ok(())
    }

    /// The style for a value starting at the current path, if masked.
    fn mask_here(&self) -> Option<(Style, usize)> {
        if let Some((_, style, path)) = self.masked_below {
            return Some((style, path));
        }
        // Top-level values have an empty path: only a container element
        // can be masked by path.
        if self.stack.is_empty() {
            return None;
        }
        'paths: for (pi, p) in self.paths.iter().enumerate() {
            if p.segments.len() != self.stack.len() {
                continue;
            }
            for (seg, frame) in p.segments.iter().zip(&self.stack) {
                let ok = match (seg, frame) {
                    (Segment::Any, _) => true,
                    (Segment::Key(k), Frame::Object { key }) => k == key,
                    (Segment::Key(k), Frame::Array { index }) => {
                        k.parse::<usize>().is_ok_and(|n| n == *index)
                    }
                };
                if !ok {
                    continue 'paths;
                }
            }
            return Some((p.style, pi));
        }
        None
    }

    fn begin_value(&mut self, b: u8, out: &mut Vec<u8>) -> Result<(), MaskError> {
        let mask = self.mask_here();
        match b {
            b'{' | b'[' => {
                if self.stack.len() >= MAX_DEPTH {
                    return Err(MaskError::TooDeep { limit: MAX_DEPTH });
                }
                out.push(b);
                if let (None, Some((style, path))) = (self.masked_below, mask) {
                    self.masked_below = Some((self.stack.len(), style, path));
                }
                if b == b'{' {
                    self.stack.push(Frame::Object { key: String::new() });
                    self.expect = Expect::KeyOrEnd;
                } else {
                    self.stack.push(Frame::Array { index: 0 });
                    self.expect = Expect::ValueOrEnd;
                }
            }
            b'"' => {
                self.token.clear();
                self.token_mask = mask;
                self.lex = Lex::Str {
                    escape: 0,
                    key: false,
                };
            }
            b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                self.token.clear();
                self.token.push(b);
                self.token_mask = mask;
                self.lex = Lex::Literal;
            }
            _ => return Err(self.err("unexpected character where a value belongs")),
        }
        Ok(())
    }

    fn close(&mut self) {
        self.stack.pop();
        if self
            .masked_below
            .is_some_and(|(depth, _, _)| depth >= self.stack.len())
        {
            self.masked_below = None;
        }
        self.value_done();
    }

    fn value_done(&mut self) {
        if self.stack.is_empty() {
            self.documents += 1;
            self.expect = Expect::Value;
        } else {
            self.expect = Expect::CommaOrEnd;
        }
    }

    fn end_key(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        out.extend_from_slice(&self.token);
        out.push(b'"');
        self.scratch.clear();
        if !unescape(&self.token, &mut self.scratch) {
            return Err(self.err("bad escape in a key"));
        }
        let key = String::from_utf8_lossy(&self.scratch).into_owned();
        if let Some(Frame::Object { key: k }) = self.stack.last_mut() {
            *k = key;
        }
        self.expect = Expect::Colon;
        Ok(())
    }

    fn path_name(&self, path: usize) -> String {
        self.paths
            .get(path)
            .map(|p| p.text.clone())
            .unwrap_or_else(|| "json".into())
    }

    fn end_string(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        let mask = self.token_mask.take();
        self.scratch.clear();
        if !unescape(&self.token, &mut self.scratch) {
            return Err(self.err("bad escape in a string"));
        }
        match mask {
            Some((style, path)) => {
                self.masked.clear();
                apply_style(
                    style,
                    self.masker.hash_key(),
                    &self.scratch,
                    &mut self.masked,
                );
                write_json_string(&self.masked, out);
                let name = self.path_name(path);
                self.counts.add(&name, 1);
            }
            None => {
                self.masked.clear();
                let hits =
                    self.masker
                        .mask_detected(&self.scratch, &mut self.masked, &mut self.counts);
                if hits > 0 {
                    write_json_string(&self.masked, out);
                } else {
                    out.push(b'"');
                    out.extend_from_slice(&self.token);
                    out.push(b'"');
                }
            }
        }
        self.token.clear();
        self.value_done();
        Ok(())
    }

    fn end_literal(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        self.lex = Lex::Between;
        let tok = &self.token;
        let valid = matches!(&tok[..], b"true" | b"false" | b"null") || is_number(tok);
        if !valid {
            return Err(self.err("invalid literal"));
        }
        let mask = self.token_mask.take();
        match mask {
            // A null hides nothing; keep it so clients' types hold.
            Some(_) if tok == b"null" => out.extend_from_slice(tok),
            Some((style, path)) => {
                self.masked.clear();
                apply_style(style, self.masker.hash_key(), tok, &mut self.masked);
                write_json_string(&self.masked, out);
                let name = self.path_name(path);
                self.counts.add(&name, 1);
            }
            None => {
                self.masked.clear();
                let hits = if is_number(tok) {
                    self.masker
                        .mask_detected(tok, &mut self.masked, &mut self.counts)
                } else {
                    0
                };
                if hits > 0 {
                    // A card number sent as a JSON number becomes a string.
                    write_json_string(&self.masked, out);
                } else {
                    out.extend_from_slice(tok);
                }
            }
        }
        self.token.clear();
        self.value_done();
        Ok(())
    }
}

fn is_number(t: &[u8]) -> bool {
    let t = t.strip_prefix(b"-").unwrap_or(t);
    let Some(first) = t.first() else {
        return false;
    };
    first.is_ascii_digit()
        && t.iter()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
}

/// Decodes the inside of a JSON string into bytes (UTF-8). Lone surrogates
/// become U+FFFD. Returns false on a malformed escape.
fn unescape(raw: &[u8], out: &mut Vec<u8>) -> bool {
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' {
            let next = raw[i..]
                .iter()
                .position(|&c| c == b'\\')
                .map_or(raw.len(), |p| i + p);
            out.extend_from_slice(&raw[i..next]);
            i = next;
            continue;
        }
        let Some(&e) = raw.get(i + 1) else {
            return false;
        };
        i += 2;
        let c = match e {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let Some(hi) = hex4(raw.get(i..i + 4)) else {
                    return false;
                };
                i += 4;
                let ch = if (0xD800..0xDC00).contains(&hi) {
                    let lo = (raw.get(i) == Some(&b'\\') && raw.get(i + 1) == Some(&b'u'))
                        .then(|| hex4(raw.get(i + 2..i + 6)))
                        .flatten()
                        .filter(|lo| (0xDC00..0xE000).contains(lo));
                    match lo {
                        Some(lo) => {
                            i += 6;
                            char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                        }
                        None => None,
                    }
                } else {
                    char::from_u32(hi)
                };
                let mut buf = [0u8; 4];
                out.extend_from_slice(
                    ch.unwrap_or(char::REPLACEMENT_CHARACTER)
                        .encode_utf8(&mut buf)
                        .as_bytes(),
                );
                continue;
            }
            _ => return false,
        };
        out.push(c);
    }
    true
}

fn hex4(b: Option<&[u8]>) -> Option<u32> {
    let s = std::str::from_utf8(b?).ok()?;
    u32::from_str_radix(s, 16).ok()
}

/// Writes bytes (UTF-8, invalid sequences replaced) as a JSON string.
pub(crate) fn write_json_string(bytes: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    for ch in String::from_utf8_lossy(bytes).chars() {
        match ch {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}
