//! Incremental UTF-8 decoding of terminal streams for asciicast events.
//!
//! Owns the carry of an incomplete multi-byte sequence between chunks. It
//! must not allocate beyond the chunk it decodes, and never fails: invalid
//! bytes become U+FFFD, one per maximal invalid subpart (the same rule as
//! [`String::from_utf8_lossy`]).

/// Decodes a byte stream that arrives in chunks, carrying an incomplete
/// UTF-8 sequence at the end of a chunk over to the next one.
#[derive(Debug, Default)]
pub(crate) struct Utf8Stream {
    /// A valid prefix of a multi-byte sequence (at most 3 bytes).
    carry: Vec<u8>,
}

impl Utf8Stream {
    /// Decodes `chunk`; the result is valid UTF-8 text for everything that
    /// is complete so far. An incomplete sequence at the end stays carried.
    pub(crate) fn decode(&mut self, chunk: &[u8]) -> String {
        let mut out = String::with_capacity(chunk.len() + self.carry.len());
        if self.carry.is_empty() {
            self.decode_into(chunk, &mut out);
        } else {
            let mut joined = std::mem::take(&mut self.carry);
            joined.extend_from_slice(chunk);
            self.decode_into(&joined, &mut out);
        }
        out
    }

    /// Ends the stream: a carried incomplete sequence becomes U+FFFD.
    /// Returns `None` when nothing was carried.
    pub(crate) fn finish(&mut self) -> Option<String> {
        if self.carry.is_empty() {
            None
        } else {
            self.carry.clear();
            Some(char::REPLACEMENT_CHARACTER.to_string())
        }
    }

    fn decode_into(&mut self, mut rest: &[u8], out: &mut String) {
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    return;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is valid UTF-8 by the error's contract.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = after.get(n..).unwrap_or_default();
                        }
                        None => {
                            // An incomplete sequence at the very end.
                            self.carry.extend_from_slice(after);
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_chunks(chunks: &[&[u8]]) -> String {
        let mut s = Utf8Stream::default();
        let mut out = String::new();
        for c in chunks {
            out.push_str(&s.decode(c));
        }
        if let Some(tail) = s.finish() {
            out.push_str(&tail);
        }
        out
    }

    #[test]
    fn split_sequences_join_across_chunks() {
        let text = "aé€😀z";
        let bytes = text.as_bytes();
        // Every way to cut the stream in two and in three gives the text back.
        for i in 0..=bytes.len() {
            assert_eq!(decode_chunks(&[&bytes[..i], &bytes[i..]]), text, "cut {i}");
            for j in i..=bytes.len() {
                assert_eq!(
                    decode_chunks(&[&bytes[..i], &bytes[i..j], &bytes[j..]]),
                    text,
                    "cuts {i} {j}"
                );
            }
        }
        // One byte at a time.
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(decode_chunks(&singles), text);
    }

    #[test]
    fn invalid_bytes_match_lossy_decoding() {
        let cases: &[&[u8]] = &[
            b"a\xffb",
            b"\xc3(",
            b"\xe2\x82",
            b"\xf0\x9f\x98",
            b"\xed\xa0\x80",
            b"\xc0\xaf",
            b"ok\xe2\x82\xacok\x80\x80",
        ];
        for case in cases {
            let want = String::from_utf8_lossy(case).into_owned();
            assert_eq!(decode_chunks(&[case]), want, "{case:?}");
            for i in 0..=case.len() {
                assert_eq!(
                    decode_chunks(&[&case[..i], &case[i..]]),
                    want,
                    "{case:?} cut {i}"
                );
            }
        }
    }

    #[test]
    fn incomplete_tail_is_carried_not_replaced() {
        let mut s = Utf8Stream::default();
        assert_eq!(s.decode(b"x\xe2\x82"), "x");
        assert_eq!(s.decode(b"\xac"), "€");
        assert_eq!(s.finish(), None);
        assert_eq!(s.decode(b"\xf0\x9f"), "");
        assert_eq!(s.finish().as_deref(), Some("\u{fffd}"));
    }
}
