//! The PostgreSQL wire format: framing (startup packets and typed frames)
//! from a `BytesMut` with a bounded size, field readers over frame bodies,
//! and builders for the few messages the proxy writes itself.
//!
//! Owns bytes only: it must not decide, audit or hold any session state.

use bytes::{Buf, BufMut, BytesMut};
use thiserror::Error;

/// PostgreSQL's own limit on a message (`PQ_LARGE_MESSAGE_LIMIT` is 1 GiB).
pub const MAX_FRAME: usize = 1 << 30;
/// Startup packets are small; PostgreSQL caps them at 10000 bytes.
pub const MAX_STARTUP: usize = 10_000;
/// Protocol 3.0.
pub const PROTOCOL_3_0: u32 = 196_608;
/// The SSLRequest code.
pub const SSL_REQUEST: u32 = 80_877_103;
/// The GSSENCRequest code.
pub const GSSENC_REQUEST: u32 = 80_877_104;
/// The CancelRequest code.
pub const CANCEL_REQUEST: u32 = 80_877_102;

/// A malformed or oversized frame.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    /// The length field is below the minimum or above the limit.
    #[error("invalid message length {0}")]
    Length(i64),
    /// A field ran past the end of the message.
    #[error("truncated {0} message")]
    Truncated(&'static str),
    /// A string field is not valid UTF-8.
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
}

/// The first packet of a connection (untyped, length first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// SSLRequest.
    Ssl,
    /// GSSENCRequest.
    GssEnc,
    /// CancelRequest with the key the client was given.
    Cancel {
        /// Backend process id.
        pid: u32,
        /// Secret key.
        secret: Vec<u8>,
    },
    /// StartupMessage: protocol version and parameters in order.
    Params {
        /// Requested protocol version (major << 16 | minor).
        version: u32,
        /// Name/value pairs.
        params: Vec<(String, String)>,
    },
}

/// Decodes one startup packet from `buf` when it is complete.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<Startup>, CodecError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=MAX_STARTUP).contains(&len) {
        return Err(CodecError::Length(len as i64));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut pkt = buf.split_to(len);
    pkt.advance(4);
    let code = pkt.get_u32();
    let startup = match code {
        SSL_REQUEST => Startup::Ssl,
        GSSENC_REQUEST => Startup::GssEnc,
        CANCEL_REQUEST => {
            if pkt.len() < 8 || pkt.len() > 256 {
                return Err(CodecError::Truncated("CancelRequest"));
            }
            let pid = pkt.get_u32();
            Startup::Cancel {
                pid,
                secret: pkt.to_vec(),
            }
        }
        version => {
            let mut params = Vec::new();
            let mut r = Reader::new(&pkt, "StartupMessage");
            loop {
                let name = r.cstr()?;
                if name.is_empty() {
                    break;
                }
                let value = r.cstr()?;
                params.push((name.to_string(), value.to_string()));
            }
            Startup::Params { version, params }
        }
    };
    Ok(Some(startup))
}

/// Where a complete typed frame sits at the head of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// The message type byte.
    pub tag: u8,
    /// The whole frame's length (type byte + length field + body).
    pub total: usize,
}

/// Looks at the head of `buf`: `Ok(None)` until a whole frame is buffered.
/// Bounded by `max`: a longer frame is an error, never a larger buffer.
pub fn peek_frame(buf: &[u8], max: usize) -> Result<Option<FrameHead>, CodecError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > max {
        return Err(CodecError::Length(len as i64));
    }
    let total = len as usize + 1;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(FrameHead { tag: buf[0], total }))
}

/// Sequential reads over a message body; every read is bounds-checked.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf` (the body of a `what` message).
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn short(&self) -> CodecError {
        CodecError::Truncated(self.what)
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self) -> Result<&'a str, CodecError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.short())?;
        let (s, rest) = self.buf.split_at(end);
        self.buf = rest.get(1..).unwrap_or_default();
        std::str::from_utf8(s).map_err(|_| CodecError::Utf8(self.what))
    }

    /// A big-endian i16.
    pub fn i16(&mut self) -> Result<i16, CodecError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    /// A big-endian i32.
    pub fn i32(&mut self) -> Result<i32, CodecError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(self.i32()? as u32)
    }

    /// `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.buf.len() < n {
            return Err(self.short());
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    /// A length-prefixed value (`-1` is NULL).
    pub fn value(&mut self) -> Result<Option<&'a [u8]>, CodecError> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(None);
        }
        self.bytes(n as usize).map(Some)
    }

    /// The rest of the body.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Writes a typed message: `tag`, then the length, then what `body` puts.
pub fn put_msg(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a NUL-terminated string.
pub fn put_cstr(out: &mut BytesMut, s: &str) {
    // A NUL inside would end the field early and desynchronize the reader.
    out.extend(s.bytes().filter(|&b| b != 0));
    out.put_u8(0);
}

/// Severity and fields of an ErrorResponse or NoticeResponse.
pub fn put_error(out: &mut BytesMut, tag: u8, severity: &str, code: &str, message: &str) {
    put_msg(out, tag, |b| {
        b.put_u8(b'S');
        put_cstr(b, severity);
        b.put_u8(b'V');
        put_cstr(b, severity);
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

/// Parses the fields of an ErrorResponse/NoticeResponse body.
pub fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut r = Reader::new(body, "ErrorResponse");
    while let Ok(code) = r.bytes(1) {
        if code[0] == 0 {
            break;
        }
        match r.cstr() {
            Ok(v) => out.push((code[0], v.to_string())),
            Err(_) => break,
        }
    }
    out
}

/// A ReadyForQuery with transaction status `status`.
pub fn put_ready(out: &mut BytesMut, status: u8) {
    put_msg(out, b'Z', |b| b.put_u8(status));
}

/// A simple Query message.
pub fn put_query(out: &mut BytesMut, sql: &str) {
    put_msg(out, b'Q', |b| put_cstr(b, sql));
}

/// The number at the end of a CommandComplete tag (`SELECT 5`, `INSERT 0 1`).
pub fn tag_rows(tag: &str) -> Option<u64> {
    tag.rsplit(' ').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_params_and_requests_decode() {
        let mut b = BytesMut::new();
        b.put_u32(8);
        b.put_u32(SSL_REQUEST);
        let mut body = BytesMut::new();
        body.put_u32(PROTOCOL_3_0);
        put_cstr(&mut body, "user");
        put_cstr(&mut body, "alice");
        put_cstr(&mut body, "database");
        put_cstr(&mut body, "db");
        body.put_u8(0);
        b.put_u32(body.len() as u32 + 4);
        b.extend_from_slice(&body);
        assert_eq!(decode_startup(&mut b), Ok(Some(Startup::Ssl)));
        let s = decode_startup(&mut b).unwrap().unwrap();
        assert_eq!(
            s,
            Startup::Params {
                version: PROTOCOL_3_0,
                params: vec![
                    ("user".into(), "alice".into()),
                    ("database".into(), "db".into())
                ]
            }
        );
        assert!(b.is_empty());
    }

    #[test]
    fn partial_startup_waits_and_bad_lengths_fail() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 16, 0, 3][..]);
        assert_eq!(decode_startup(&mut b), Ok(None));
        let mut b = BytesMut::from(&[0u8, 0, 0, 3, 0, 0, 0, 0][..]);
        assert!(decode_startup(&mut b).is_err());
        let mut b = BytesMut::from(&[0x7f, 0, 0, 3, 0, 0, 0, 0][..]);
        assert!(decode_startup(&mut b).is_err());
        // Unterminated parameters are an error, not a panic.
        let mut b = BytesMut::new();
        b.put_u32(13);
        b.put_u32(PROTOCOL_3_0);
        b.extend_from_slice(b"user\0");
        assert_eq!(
            decode_startup(&mut b),
            Err(CodecError::Truncated("StartupMessage"))
        );
    }

    #[test]
    fn frames_are_bounded_and_complete() {
        let mut b = BytesMut::new();
        put_query(&mut b, "select 1");
        let head = peek_frame(&b, MAX_FRAME).unwrap().unwrap();
        assert_eq!(head.tag, b'Q');
        assert_eq!(head.total, b.len());
        assert_eq!(peek_frame(&b[..head.total - 1], MAX_FRAME), Ok(None));
        assert!(peek_frame(&b, 4).is_err());
        assert!(peek_frame(&[b'Q', 0, 0, 0, 3], MAX_FRAME).is_err());
        assert!(peek_frame(&[b'Q', 0xff, 0xff, 0xff, 0xff], MAX_FRAME).is_err());
    }

    #[test]
    fn errors_round_trip_and_tags_count() {
        let mut b = BytesMut::new();
        put_error(&mut b, b'E', "ERROR", "42501", "denied");
        let f = error_fields(&b[5..]);
        assert!(f.contains(&(b'C', "42501".into())));
        assert!(f.contains(&(b'M', "denied".into())));
        assert_eq!(tag_rows("INSERT 0 3"), Some(3));
        assert_eq!(tag_rows("SELECT 10"), Some(10));
        assert_eq!(tag_rows("BEGIN"), None);
    }

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(&[0, 0, 0, 9, 1], "DataRow");
        assert!(r.value().is_err());
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff], "DataRow");
        assert_eq!(r.value(), Ok(None));
        assert!(r.is_empty());
        let mut r = Reader::new(b"abc", "x");
        assert!(r.cstr().is_err());
    }
}
