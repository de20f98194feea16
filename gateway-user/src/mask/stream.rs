//! Masking a byte stream (terminal output, text bodies) that arrives in
//! arbitrary chunks.
//!
//! A secret can straddle two chunks, so the tail of what has arrived is held
//! back (the last [`MAX_MATCH`] bytes, or in [`StreamMasker::eager`] mode
//! only what could still be the start of a match) until enough follows it
//! or the caller flushes (the stream went idle or ended). Emission never splits a terminal escape
//! sequence or a UTF-8 character. A private key block that opens is masked
//! from its first line on, without waiting for its end marker.

use std::sync::Arc;

use super::{
    apply_style,
    detect::{Hit, MAX_MATCH},
    Counts, Masker,
};

/// How much of an unterminated private key block is swallowed before the
/// stream is passed again (no real key is this long; a stream that never
/// ends the block must not stay silent forever).
const MAX_KEY_BLOCK: usize = 64 * 1024;
/// How far back an escape sequence start is looked for.
const MAX_ESCAPE: usize = 64;

/// A streaming detector masker. See the module docs.
#[derive(Debug)]
pub struct StreamMasker {
    masker: Arc<Masker>,
    /// Arrived but not yet emitted.
    held: Vec<u8>,
    hits: Vec<Hit>,
    /// Inside a private key block: bytes swallowed so far, and the tail
    /// kept to find the end marker across chunks.
    in_key: Option<(usize, Vec<u8>)>,
    counts: Counts,
    /// Hold back only what could still grow into a match (see
    /// [`StreamMasker::eager`]); otherwise the last [`MAX_MATCH`] bytes.
    eager: bool,
}

impl StreamMasker {
    pub(super) fn new(masker: Arc<Masker>) -> Self {
        Self {
            masker,
            held: Vec::new(),
            hits: Vec::new(),
            in_key: None,
            counts: Counts::default(),
            eager: false,
        }
    }

    /// Holds back only the tail that could still grow into a detector
    /// match (at most [`MAX_MATCH`] bytes), so a complete line or event is
    /// emitted at once (HTTP event streams). Without it the last
    /// [`MAX_MATCH`] bytes are held, which the SSH masker relies on to look
    /// ahead before it commits a stream to text.
    pub fn eager(mut self) -> Self {
        self.eager = true;
        self
    }

    /// Takes a chunk; appends to `out` whatever is now safe to emit.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if let Some((swallowed, tail)) = &mut self.in_key {
            let keep_from = tail.len();
            tail.extend_from_slice(chunk);
            let end = self
                .masker
                .detector_set()
                .private_key_end()
                .find(tail)
                .map(|m| m.end());
            match end {
                Some(end) => {
                    let rest = tail.split_off(end);
                    self.in_key = None;
                    self.held.extend_from_slice(&rest);
                }
                None => {
                    *swallowed += chunk.len();
                    if *swallowed > MAX_KEY_BLOCK {
                        let rest = std::mem::take(tail);
                        self.in_key = None;
                        self.held
                            .extend_from_slice(&rest[keep_from.min(rest.len())..]);
                    } else {
                        // The end marker is under 64 bytes: keep that much.
                        let cut = tail.len().saturating_sub(MAX_ESCAPE);
                        tail.drain(..cut);
                        return;
                    }
                }
            }
        } else {
            self.held.extend_from_slice(chunk);
        }
        self.emit(false, out);
    }

    /// Emits everything held (masked): call when the stream goes idle, so
    /// an interactive prompt is not held back.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        self.emit(true, out);
    }

    /// Ends the stream: emits everything held.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.emit(true, out);
    }

    /// Masked values so far, by detector.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Bytes held back right now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether anything emitted so far (or swallowed, inside a private key
    /// block) differs from what arrived.
    pub fn changed(&self) -> bool {
        !self.counts.is_empty() || self.in_key.is_some()
    }

    /// Gives up masking this stream: the bytes held back, exactly as they
    /// arrived, so that what was emitted plus them is the stream unchanged.
    /// `None` (and nothing taken) once something was [`changed`](Self::changed).
    pub fn take_raw(&mut self) -> Option<Vec<u8>> {
        if self.changed() {
            return None;
        }
        Some(std::mem::take(&mut self.held))
    }

    fn emit(&mut self, all: bool, out: &mut Vec<u8>) {
        loop {
            if self.held.is_empty() || self.in_key.is_some() {
                return;
            }
            let set = self.masker.detector_set();
            self.hits.clear();
            set.find(&self.held, false, &mut self.hits);
            // An opened key block with no end yet: mask from its start and
            // swallow until the end marker shows up.
            if let Some(pk) = set.has_private_key() {
                if let Some(begin) = open_key_block(&self.masker, &self.held, &self.hits) {
                    let mut hits = std::mem::take(&mut self.hits);
                    hits.retain(|h| h.end <= begin);
                    self.masker
                        .rewrite(&self.held[..begin], &hits, out, &mut self.counts);
                    self.hits = hits;
                    let (name, style) = set.describe(pk);
                    apply_style(style, self.masker.hash_key(), b"private key", out);
                    self.counts.add(name, 1);
                    let tail = self.held.split_off(begin);
                    self.held.clear();
                    self.in_key = Some((0, Vec::new()));
                    // The tail may hold the end marker already.
                    self.push(&tail, out);
                    return;
                }
            }
            let len = self.held.len();
            // Hold back only what could still grow into a match (at most
            // MAX_MATCH bytes): a complete line or event goes out at once.
            let mut boundary = if all {
                len
            } else if self.eager {
                set.pending_from(&self.held, len.saturating_sub(MAX_MATCH))
            } else {
                len.saturating_sub(MAX_MATCH)
            };
            for h in &self.hits {
                if h.start < boundary && h.end > boundary {
                    // A hit reaching the end of what has arrived may still
                    // grow: hold it whole.
                    boundary = if h.end < len || all { h.end } else { h.start };
                }
            }
            if !all {
                boundary = safe_cut(&self.held, boundary);
            }
            if boundary == 0 {
                return;
            }
            self.hits.retain(|h| h.end <= boundary);
            self.masker
                .rewrite(&self.held[..boundary], &self.hits, out, &mut self.counts);
            self.held.drain(..boundary);
            if !all || self.held.is_empty() {
                return;
            }
        }
    }
}

/// The start of a private key block whose end marker has not arrived.
fn open_key_block(masker: &Masker, held: &[u8], hits: &[Hit]) -> Option<usize> {
    let set = masker.detector_set();
    let pk = set.has_private_key()?;
    for m in set.regex(pk)?.find_iter(held) {
        let covered = hits
            .iter()
            .any(|h| h.detector == pk && h.start <= m.start() && m.start() < h.end);
        if !covered {
            return Some(m.start());
        }
    }
    None
}

/// Moves a cut point back so it splits neither a UTF-8 character nor a
/// terminal escape sequence.
fn safe_cut(buf: &[u8], mut cut: usize) -> usize {
    // UTF-8: never cut before a continuation byte.
    let mut back = 0;
    while cut > 0 && cut < buf.len() && buf[cut] & 0xC0 == 0x80 && back < 3 {
        cut -= 1;
        back += 1;
    }
    // Escape sequences: find the last ESC shortly before the cut and check
    // that its sequence ends before the cut.
    let from = cut.saturating_sub(MAX_ESCAPE);
    if let Some(rel) = buf[from..cut].iter().rposition(|&b| b == 0x1b) {
        let esc = from + rel;
        if !escape_complete(&buf[esc..cut]) {
            cut = esc;
        }
    }
    cut
}

/// Whether `seq` (starting with ESC) holds a whole escape sequence.
fn escape_complete(seq: &[u8]) -> bool {
    match seq.get(1) {
        None => false,
        // CSI: parameters then a final byte in 0x40..=0x7E.
        Some(b'[') => seq
            .get(2..)
            .is_some_and(|rest| rest.iter().any(|b| (0x40..=0x7E).contains(b))),
        // OSC, DCS and friends: ended by BEL or ESC \.
        Some(b']' | b'P' | b'_' | b'^') => {
            let rest = seq.get(2..).unwrap_or_default();
            rest.contains(&0x07) || rest.windows(2).any(|w| w == b"\x1b\\")
        }
        Some(_) => true,
    }
}

/// [`safe_cut`] for the module's tests.
#[cfg(test)]
pub(super) fn tests_safe_cut(buf: &[u8], cut: usize) -> usize {
    safe_cut(buf, cut)
}
