//! Value detectors: patterns for secrets and personal data, each confirmed
//! by a check where one exists (Luhn for card numbers, mod-97 for IBANs,
//! the SSA's reserved ranges for SSNs), so masking does not shred every
//! long number.

use std::sync::Mutex;

use regex::bytes::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use regex_automata::{
    hybrid::dfa::{Cache, DFA},
    nfa::thompson,
    util::syntax,
    Anchored, Input, MatchKind,
};

use super::Style;

/// The longest match a built-in detector (other than a private key block)
/// can produce; streaming maskers hold back this much.
pub const MAX_MATCH: usize = 8 * 1024;

/// Most DFA steps one [`DetectorSet::pending_from`] call may take before it
/// answers conservatively (a pathological custom pattern must not make a
/// stream quadratic).
const PENDING_BUDGET: usize = 1 << 20;
/// Lazy-DFA caches kept for reuse.
const PENDING_CACHES: usize = 16;

/// Compiled-size bound for custom patterns, so a policy cannot make the
/// daemon build a gigantic automaton.
const CUSTOM_SIZE_LIMIT: usize = 1 << 20;

/// A detector that cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("detector {name:?}: {reason}")]
pub struct DetectorError {
    /// The detector as written.
    pub name: String,
    /// Why it is refused.
    pub reason: String,
}

/// What a detector looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detector {
    /// Payment card numbers (13–19 digits, Luhn-checked).
    CreditCard,
    /// Email addresses.
    Email,
    /// International bank account numbers (mod-97-checked).
    Iban,
    /// AWS access key ids and secret access keys.
    AwsAccessKey,
    /// JSON Web Tokens.
    Jwt,
    /// PEM/OpenSSH/PGP private key blocks.
    PrivateKey,
    /// US social security numbers.
    UsSsn,
    /// Phone numbers (North American shape, optional country code).
    Phone,
    /// A policy-supplied regular expression (`regex:<pattern>`).
    Custom,
}

impl Detector {
    /// The pattern a candidate must match.
    fn pattern(self) -> &'static str {
        match self {
            Self::CreditCard => r"(?-u)\b\d(?:[ -]?\d){12,18}\b",
            Self::Email => {
                r"(?-u)[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}\b"
            }
            Self::Iban => r"(?-u)\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b",
            Self::AwsAccessKey => {
                r#"(?-u)\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA|ASCA)[A-Z0-9]{16}\b|(?i:aws_secret_access_key|secret_access_key|aws_secret_key)["']?\s{0,8}[:=]\s{0,8}["']?[A-Za-z0-9/+=]{40}"#
            }
            Self::Jwt => {
                r"(?-u)\beyJ[A-Za-z0-9_-]{8,1024}\.eyJ[A-Za-z0-9_-]{8,4096}\.[A-Za-z0-9_-]{0,1024}"
            }
            Self::PrivateKey => r"(?-u)-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----",
            Self::UsSsn => r"(?-u)\b\d{3}-\d{2}-\d{4}\b",
            Self::Phone => {
                r"(?-u)(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)|\b\d{3})[ .-]?\d{3}[ .-]?\d{4}\b"
            }
            Self::Custom => "",
        }
    }

    /// Parses a built-in detector name.
    pub fn builtin(name: &str) -> Option<Self> {
        Some(match name {
            "credit_card" => Self::CreditCard,
            "email" => Self::Email,
            "iban" => Self::Iban,
            "aws_access_key" => Self::AwsAccessKey,
            "jwt" => Self::Jwt,
            "private_key" => Self::PrivateKey,
            "us_ssn" => Self::UsSsn,
            "phone" => Self::Phone,
            _ => return None,
        })
    }
}

/// Checks a detector name as written in a policy (`regex:` patterns must
/// compile within the size bound).
pub fn validate(name: &str) -> Result<(), DetectorError> {
    compile_one(name).map(|_| ())
}

fn compile_one(name: &str) -> Result<(Detector, Regex), DetectorError> {
    let err = |reason: String| DetectorError {
        name: name.to_string(),
        reason,
    };
    if let Some(pattern) = name.strip_prefix("regex:") {
        if pattern.is_empty() {
            return Err(err("empty pattern".into()));
        }
        let re = RegexBuilder::new(pattern)
            .size_limit(CUSTOM_SIZE_LIMIT)
            .build()
            // The parser's message spans lines (pattern, caret, reason):
            // diagnostics are one line each.
            .map_err(|e| {
                err(e
                    .to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "))
            })?;
        if re.is_match(b"") {
            return Err(err("the pattern matches the empty string".into()));
        }
        return Ok((Detector::Custom, re));
    }
    let d = Detector::builtin(name).ok_or_else(|| {
        err(format!(
            "unknown detector: known are {}, or regex:<pattern>",
            super::super::policy::DETECTORS.join(", ")
        ))
    })?;
    let re = Regex::new(d.pattern()).map_err(|e| err(e.to_string()))?;
    Ok((d, re))
}

/// One detector hit in a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// Byte offset of the first masked byte.
    pub start: usize,
    /// Byte offset after the last masked byte.
    pub end: usize,
    /// Index of the detector in its set.
    pub detector: usize,
}

#[derive(Debug)]
struct Entry {
    name: String,
    style: Style,
    kind: Detector,
    regex: Regex,
}

/// A resource's detectors, with a one-pass prefilter.
#[derive(Debug)]
pub struct DetectorSet {
    entries: Vec<Entry>,
    /// Every pattern at once: most values match none, and this answers
    /// that in a single pass.
    any: Option<RegexSet>,
    private_key_end: Regex,
    /// Every pattern as one anchored lazy DFA that reports all matches:
    /// asks whether a tail could still grow into a match.
    pending: Option<Pending>,
}

/// See [`DetectorSet::pending_from`].
struct Pending {
    dfa: DFA,
    caches: Mutex<Vec<Cache>>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pending")
    }
}

impl Pending {
    fn build(patterns: &[&str]) -> Option<Self> {
        let dfa = DFA::builder()
            .configure(
                DFA::config()
                    .match_kind(MatchKind::All)
                    // ASCII-only inputs get Unicode `\b` right; others quit
                    // (answered conservatively).
                    .unicode_word_boundary(true)
                    .cache_capacity(1 << 20),
            )
            .syntax(syntax::Config::new().utf8(false))
            .thompson(
                thompson::Config::new()
                    .utf8(false)
                    .nfa_size_limit(Some(CUSTOM_SIZE_LIMIT * 8)),
            )
            .build_many(patterns)
            .ok()?;
        Some(Self {
            dfa,
            caches: Mutex::new(Vec::new()),
        })
    }

    /// Whether a match may start at `start` and run past the end of `buf`;
    /// `None` when the budget ran out or the DFA cannot tell.
    fn alive(
        &self,
        cache: &mut Cache,
        buf: &[u8],
        start: usize,
        budget: &mut usize,
    ) -> Option<bool> {
        let input = Input::new(buf).range(start..).anchored(Anchored::Yes);
        let mut sid = self.dfa.start_state_forward(cache, &input).ok()?;
        if sid.is_dead() {
            return Some(false);
        }
        for &b in buf.get(start..).unwrap_or_default() {
            *budget = budget.checked_sub(1)?;
            sid = self.dfa.next_state(cache, sid, b).ok()?;
            if sid.is_dead() {
                return Some(false);
            }
            if sid.is_quit() {
                return None;
            }
        }
        Some(true)
    }
}

impl DetectorSet {
    /// Compiles `(name, style)` pairs.
    pub fn new(detectors: &[(String, Style)]) -> Result<Self, DetectorError> {
        let mut entries = Vec::with_capacity(detectors.len());
        for (name, style) in detectors {
            let (kind, regex) = compile_one(name)?;
            entries.push(Entry {
                name: name.clone(),
                style: *style,
                kind,
                regex,
            });
        }
        let any = if entries.is_empty() {
            None
        } else {
            Some(
                RegexSetBuilder::new(entries.iter().map(|e| e.regex.as_str()))
                    .size_limit(CUSTOM_SIZE_LIMIT * 8)
                    .build()
                    .map_err(|e| DetectorError {
                        name: "(all detectors)".into(),
                        reason: e.to_string(),
                    })?,
            )
        };
        let private_key_end = Regex::new(
            r"(?-u)-----END [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----",
        )
        .map_err(|e| DetectorError {
            name: "private_key".into(),
            reason: e.to_string(),
        })?;
        let pending = if entries.is_empty() {
            None
        } else {
            let pats: Vec<&str> = entries.iter().map(|e| e.regex.as_str()).collect();
            Pending::build(&pats)
        };
        Ok(Self {
            entries,
            any,
            private_key_end,
            pending,
        })
    }

    /// For a stream: the earliest offset in `buf[from..]` where a match
    /// could start and still grow with more input (what a streaming masker
    /// must hold back); `buf.len()` when no match can be in progress, so a
    /// complete line or event is never held. Answers `from` (hold the whole
    /// window) when it cannot tell within its budget.
    pub fn pending_from(&self, buf: &[u8], from: usize) -> usize {
        let from = from.min(buf.len());
        let Some(p) = &self.pending else {
            return if self.entries.is_empty() {
                buf.len()
            } else {
                from
            };
        };
        let mut cache = p
            .caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(|| p.dfa.create_cache());
        let mut budget = PENDING_BUDGET;
        let mut at = buf.len();
        for start in from..buf.len() {
            match p.alive(&mut cache, buf, start, &mut budget) {
                Some(false) => continue,
                Some(true) | None => {
                    at = start;
                    break;
                }
            }
        }
        let mut caches = p.caches.lock().unwrap_or_else(|e| e.into_inner());
        if caches.len() < PENDING_CACHES {
            caches.push(cache);
        }
        at
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name and style of detector `i`.
    pub fn describe(&self, i: usize) -> (&str, Style) {
        self.entries
            .get(i)
            .map(|e| (e.name.as_str(), e.style))
            .unwrap_or(("unknown", Style::Redact))
    }

    /// Whether a private-key detector is configured.
    pub fn has_private_key(&self) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.kind == Detector::PrivateKey)
    }

    /// The pattern of detector `i`.
    pub fn regex(&self, i: usize) -> Option<&Regex> {
        self.entries.get(i).map(|e| &e.regex)
    }

    /// The end marker of a private key block.
    pub fn private_key_end(&self) -> &Regex {
        &self.private_key_end
    }

    /// Appends the hits in `value` to `hits`: sorted, disjoint (an overlap
    /// keeps the earlier, then the longer). `complete`: the value ends
    /// here, so a private key block without its end marker runs to the end
    /// (when not complete, the streaming masker handles that case).
    pub fn find(&self, value: &[u8], complete: bool, hits: &mut Vec<Hit>) {
        let first = hits.len();
        let Some(any) = &self.any else { return };
        // Most values hold nothing: answer that without allocating.
        if !any.is_match(value) {
            return;
        }
        let matched = any.matches(value);
        if !matched.matched_any() {
            return;
        }
        for i in matched.iter() {
            let Some(e) = self.entries.get(i) else {
                continue;
            };
            // Not find_iter: a candidate that fails its check, or is cut
            // short by it, must not hide a secret that starts inside it
            // (two card numbers in a row), so the search resumes right
            // after what was actually found.
            let mut pos = 0;
            while pos <= value.len() {
                let Some(m) = e.regex.find_at(value, pos) else {
                    break;
                };
                let (start, end) = (m.start(), m.end());
                let found = match e.kind {
                    Detector::CreditCard => longest_valid(value, start, end, 13, luhn),
                    Detector::Iban => longest_valid(value, start, end, 15, iban_ok),
                    Detector::UsSsn => ssn_ok(&value[start..end]).then_some(end),
                    // A secret key matched with its name: mask the key
                    // itself, keep the name readable.
                    Detector::AwsAccessKey if end - start > 20 => {
                        hits.push(Hit {
                            start: end - 40,
                            end,
                            detector: i,
                        });
                        pos = end;
                        continue;
                    }
                    Detector::PrivateKey => match self.private_key_end.find_at(value, end) {
                        Some(e) => Some(e.end()),
                        None if complete => Some(value.len()),
                        None => None,
                    },
                    _ => Some(end),
                };
                match found {
                    Some(end) => {
                        hits.push(Hit {
                            start,
                            end,
                            detector: i,
                        });
                        pos = end.max(start + 1);
                    }
                    None => pos = start + 1,
                }
            }
        }
        let mine = &mut hits[first..];
        mine.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
        // Keep disjoint hits: drop any that starts inside the previous kept
        // one, but extend the kept one when the overlap runs further (fail
        // closed: every byte some detector flagged stays masked).
        let mut kept = first;
        for i in first..hits.len() {
            if i == first {
                continue;
            }
            let h = hits[i];
            if h.start < hits[kept].end {
                if h.end > hits[kept].end {
                    hits[kept].end = h.end;
                }
            } else {
                kept += 1;
                hits[kept] = h;
            }
        }
        hits.truncate(kept + 1);
    }
}

/// Within a candidate match, the longest prefix (by digits/letters, at
/// least `min`) that ends at a group boundary and passes `check`. Returns
/// its end offset.
fn longest_valid(
    value: &[u8],
    start: usize,
    end: usize,
    min: usize,
    check: fn(&[u8]) -> bool,
) -> Option<usize> {
    let span = &value[start..end];
    let mut chars: Vec<u8> = Vec::with_capacity(span.len());
    let mut ends: Vec<usize> = Vec::with_capacity(span.len());
    for (i, &b) in span.iter().enumerate() {
        if b.is_ascii_alphanumeric() {
            chars.push(b);
            ends.push(start + i + 1);
        }
    }
    for n in (min..=chars.len()).rev() {
        let stop = ends[n - 1];
        // A shorter candidate must end where its next character is a
        // separator, never in the middle of a digit run.
        let next_ok = stop == end || !value[stop].is_ascii_alphanumeric();
        if next_ok && check(&chars[..n]) {
            return Some(stop);
        }
    }
    None
}

/// The Luhn checksum over ASCII digits.
pub fn luhn(digits: &[u8]) -> bool {
    if !(13..=19).contains(&digits.len()) || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// The IBAN mod-97 check over letters and digits (no spaces).
pub fn iban_ok(chars: &[u8]) -> bool {
    if !(15..=34).contains(&chars.len()) {
        return false;
    }
    let mut rem = 0u32;
    let rotated = chars[4..].iter().chain(chars[..4].iter());
    for &c in rotated {
        match c {
            b'0'..=b'9' => rem = (rem * 10 + u32::from(c - b'0')) % 97,
            b'A'..=b'Z' => {
                let v = u32::from(c - b'A') + 10;
                rem = (rem * 100 + v) % 97;
            }
            _ => return false,
        }
    }
    rem == 1
}

/// Rejects numbers in the SSA's never-issued ranges.
fn ssn_ok(s: &[u8]) -> bool {
    let (Some(area), Some(group), Some(serial)) = (s.get(0..3), s.get(4..6), s.get(7..11)) else {
        return false;
    };
    area != b"000" && area != b"666" && area[0] != b'9' && group != b"00" && serial != b"0000"
}
