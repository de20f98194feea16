//! The PostgreSQL wire format: framing (startup packets and typed frames)
//! from a `BytesMut` with a bounded size, field readers over frame bodies,
//! and builders for the few messages the proxy writes itself.
//!
//! The agent-side decoder is the proxy's own rather than pgwire's (which
//! the upstream login uses, see [`super::pgmsg`] for why and how): it is
//! the layout check pgwire lacks, it borrows instead of copying each
//! statement, and every frame it accepts is read again by pgwire in the
//! `pg_frontend` fuzz target.
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
    /// A message type the protocol does not have (or this proxy refuses
    /// to relay, such as replication sub-protocol messages).
    #[error("unsupported frontend message type {0:?}")]
    UnknownMessage(char),
    /// Bytes left over after the message's fields.
    #[error("trailing bytes in {0} message")]
    Trailing(&'static str),
    /// A request code this proxy does not answer (an authentication
    /// method other than password, MD5 or SCRAM-SHA-256).
    #[error("{0} {1} is not supported")]
    Unsupported(&'static str, i32),
    /// A backend message type that has no place where it arrived.
    #[error("unexpected backend message type {0:?}")]
    UnexpectedBackend(char),
}

/// One frontend (agent → server) message after startup, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend<'a> {
    /// Simple query.
    Query(&'a str),
    /// Extended protocol: prepare `sql` as `name`.
    Parse {
        /// Statement name ("" is the unnamed statement).
        name: &'a str,
        /// The SQL text.
        sql: &'a str,
        /// Parameter type OIDs (0: unspecified).
        param_types: Vec<u32>,
    },
    /// Bind parameters to a statement, creating a portal.
    Bind {
        /// Portal name.
        portal: &'a str,
        /// Statement name.
        statement: &'a str,
        /// Parameter format codes (0 text, 1 binary; none or one for all).
        formats: Vec<i16>,
        /// Parameter values (`None`: NULL).
        params: Vec<Option<&'a [u8]>>,
    },
    /// Describe a statement (`S`) or portal (`P`).
    Describe {
        /// `S` or `P`.
        kind: u8,
        /// Its name.
        name: &'a str,
    },
    /// Run a portal.
    Execute {
        /// Portal name.
        portal: &'a str,
        /// Row limit (0: all).
        max_rows: i32,
    },
    /// Close a statement (`S`) or portal (`P`).
    Close {
        /// `S` or `P`.
        kind: u8,
        /// Its name.
        name: &'a str,
    },
    /// End of an extended-protocol pipeline.
    Sync,
    /// Flush.
    Flush,
    /// COPY FROM STDIN data.
    CopyData,
    /// COPY FROM STDIN end.
    CopyDone,
    /// COPY FROM STDIN abort.
    CopyFail,
    /// The fast-path FunctionCall message.
    FunctionCall,
    /// Terminate.
    Terminate,
}

/// Decodes a frontend message body (`tag` is the type byte). Every field
/// is bounds-checked; nothing here can panic on any input.
pub fn decode_frontend(tag: u8, body: &[u8]) -> Result<Frontend<'_>, CodecError> {
    let done = |r: &Reader<'_>, what| {
        if r.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Trailing(what))
        }
    };
    Ok(match tag {
        b'Q' => {
            let mut r = Reader::new(body, "Query");
            let sql = r.cstr()?;
            done(&r, "Query")?;
            Frontend::Query(sql)
        }
        b'P' => {
            let mut r = Reader::new(body, "Parse");
            let name = r.cstr()?;
            let sql = r.cstr()?;
            // Counts are unsigned 16-bit, as the server reads them
            // (`pq_getmsgint(msg, 2)`): a count of 40000 is 40000 there.
            let n = usize::from(r.u16()?);
            let mut param_types = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                param_types.push(r.u32()?);
            }
            done(&r, "Parse")?;
            Frontend::Parse {
                name,
                sql,
                param_types,
            }
        }
        b'B' => {
            let mut r = Reader::new(body, "Bind");
            let portal = r.cstr()?;
            let statement = r.cstr()?;
            let n = usize::from(r.u16()?);
            let mut formats = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                formats.push(r.i16()?);
            }
            let n = usize::from(r.u16()?);
            let mut params = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                params.push(r.value()?);
            }
            let n = usize::from(r.u16()?);
            for _ in 0..n {
                r.i16()?;
            }
            done(&r, "Bind")?;
            Frontend::Bind {
                portal,
                statement,
                formats,
                params,
            }
        }
        b'D' | b'C' => {
            let what = if tag == b'D' { "Describe" } else { "Close" };
            let mut r = Reader::new(body, what);
            let kind = r.bytes(1)?.first().copied().unwrap_or(0);
            if kind != b'S' && kind != b'P' {
                return Err(CodecError::Truncated(what));
            }
            let name = r.cstr()?;
            done(&r, what)?;
            if tag == b'D' {
                Frontend::Describe { kind, name }
            } else {
                Frontend::Close { kind, name }
            }
        }
        b'E' => {
            let mut r = Reader::new(body, "Execute");
            let portal = r.cstr()?;
            let max_rows = r.i32()?;
            done(&r, "Execute")?;
            Frontend::Execute { portal, max_rows }
        }
        b'S' => Frontend::Sync,
        b'H' => Frontend::Flush,
        b'd' => Frontend::CopyData,
        b'c' => Frontend::CopyDone,
        b'f' => Frontend::CopyFail,
        b'F' => Frontend::FunctionCall,
        b'X' => Frontend::Terminate,
        other => return Err(CodecError::UnknownMessage(other as char)),
    })
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

/// The type byte and length field (which counts itself, not the type
/// byte) of the frame at the head of `buf`, once its 5 bytes are there.
/// Not validated: see [`peek_frame`].
pub fn peek_header(buf: &[u8]) -> Option<(u8, usize)> {
    let h = buf.get(..5)?;
    let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    Some((h[0], usize::try_from(len).unwrap_or(0)))
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

    /// A big-endian u16.
    pub fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(self.i16()? as u16)
    }

    /// A NUL-terminated string in any encoding (its bytes, without the NUL).
    pub fn raw_cstr(&mut self) -> Result<&'a [u8], CodecError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.short())?;
        let (s, rest) = self.buf.split_at(end);
        self.buf = rest.get(1..).unwrap_or_default();
        Ok(s)
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

/// A ReadyForQuery with transaction status `status` (`I`, `T` or `E`;
/// anything else is written as `I`, which is what pgwire's type holds).
pub fn put_ready(out: &mut BytesMut, status: u8) {
    use pgwire::messages::response::{ReadyForQuery, TransactionStatus};
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    super::pgmsg::encode(out, &ReadyForQuery::new(status));
}

/// A simple Query message.
pub fn put_query(out: &mut BytesMut, sql: &str) {
    put_msg(out, b'Q', |b| put_cstr(b, sql));
}

/// The number at the end of a CommandComplete tag (`SELECT 5`, `INSERT 0 1`).
pub fn tag_rows(tag: &str) -> Option<u64> {
    tag.rsplit(' ').next()?.parse().ok()
}

/// NegotiateProtocolVersion (`v`): the newest version the proxy speaks
/// for the requested major, 3.0, as the full version number
/// (major << 16 | minor) the way PostgreSQL sends it (libpq 18 reads it as
/// such and refuses anything below 3.0 as a downgrade), then the
/// `_pq_.` options it did not recognise.
pub fn put_negotiate_protocol_version(out: &mut BytesMut, unrecognised: &[&str]) {
    use pgwire::messages::startup::NegotiateProtocolVersion;
    // The option names come from the agent's startup packet, read as
    // NUL-terminated strings: none holds a NUL.
    let options = unrecognised.iter().map(|k| k.to_string()).collect();
    super::pgmsg::encode(
        out,
        &NegotiateProtocolVersion::new(PROTOCOL_3_0 as i32, options),
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn negotiate_protocol_version_carries_the_full_version() {
        let mut out = BytesMut::new();
        super::put_negotiate_protocol_version(&mut out, &["_pq_.x"]);
        // 'v', length, 0x00030000 (3.0, not a bare minor 0), one option.
        assert_eq!(
            &out[..],
            b"v\x00\x00\x00\x13\x00\x03\x00\x00\x00\x00\x00\x01_pq_.x\x00"
        );
    }

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
    fn headers_are_peeked_before_the_body_arrives() {
        assert_eq!(peek_header(b"Q\0\0"), None);
        // A 1 GiB claim is known from its first five bytes.
        assert_eq!(peek_header(&[b'Q', 0x40, 0, 0, 0]), Some((b'Q', 1 << 30)));
        assert_eq!(peek_header(&[b'd', 0, 0, 0, 4, 9]), Some((b'd', 4)));
        // A negative length reads as 0 (invalid: peek_frame refuses it).
        assert_eq!(
            peek_header(&[b'Q', 0xff, 0xff, 0xff, 0xff]),
            Some((b'Q', 0))
        );
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
    fn frontend_messages_decode_and_garbage_is_an_error() {
        let mut b = BytesMut::new();
        put_msg(&mut b, b'B', |b| {
            put_cstr(b, "p1");
            put_cstr(b, "s1");
            b.put_i16(1);
            b.put_i16(1);
            b.put_i16(2);
            b.put_i32(2);
            b.extend_from_slice(&[0, 7]);
            b.put_i32(-1);
            b.put_i16(0);
        });
        assert_eq!(
            decode_frontend(b'B', &b[5..]),
            Ok(Frontend::Bind {
                portal: "p1",
                statement: "s1",
                formats: vec![1],
                params: vec![Some(&[0u8, 7][..]), None],
            })
        );
        assert_eq!(
            decode_frontend(b'E', b"\0\0\0\0\0"),
            Ok(Frontend::Execute {
                portal: "",
                max_rows: 0
            })
        );
        assert!(decode_frontend(b'E', b"\0\0\0").is_err());
        assert!(decode_frontend(b'D', b"Xname\0").is_err());
        assert!(decode_frontend(b'Q', b"select 1\0extra").is_err());
        assert!(decode_frontend(b'B', &b[5..b.len() - 3]).is_err());
        assert_eq!(
            decode_frontend(b'z', b""),
            Err(CodecError::UnknownMessage('z'))
        );
        assert_eq!(
            decode_frontend(b'P', b"s\0select $1\0\0\x01\0\0\0\x17"),
            Ok(Frontend::Parse {
                name: "s",
                sql: "select $1",
                param_types: vec![23]
            })
        );
    }

    /// A deterministic mini-fuzz (the cargo-fuzz target under `fuzz/` is
    /// the real one): mutated valid sessions never panic the decoder.
    #[test]
    fn mutated_input_never_panics() {
        let mut seed = BytesMut::new();
        let mut body = BytesMut::new();
        body.put_u32(PROTOCOL_3_0);
        put_cstr(&mut body, "user");
        put_cstr(&mut body, "a");
        body.put_u8(0);
        seed.put_u32(body.len() as u32 + 4);
        seed.extend_from_slice(&body);
        put_query(&mut seed, "select 1");
        put_msg(&mut seed, b'P', |b| {
            put_cstr(b, "s");
            put_cstr(b, "select $1");
            b.put_i16(1);
            b.put_u32(23);
        });
        put_msg(&mut seed, b'B', |b| {
            put_cstr(b, "");
            put_cstr(b, "s");
            b.put_i16(0);
            b.put_i16(1);
            b.put_i32(1);
            b.put_u8(b'7');
            b.put_i16(0);
        });
        put_msg(&mut seed, b'E', |b| {
            put_cstr(b, "");
            b.put_i32(0);
        });
        put_msg(&mut seed, b'S', |_| {});
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut input = seed.to_vec();
            for _ in 0..(next() % 6) {
                let i = (next() as usize) % input.len();
                match next() % 3 {
                    0 => input[i] = next() as u8,
                    1 => input.truncate(i),
                    _ => input.insert(i, next() as u8),
                }
                if input.is_empty() {
                    break;
                }
            }
            let mut buf = BytesMut::from(&input[..]);
            if !matches!(decode_startup(&mut buf), Ok(Some(_))) {
                continue;
            }
            while let Ok(Some(h)) = peek_frame(&buf, MAX_FRAME) {
                let frame = buf.split_to(h.total);
                let _ = decode_frontend(h.tag, frame.get(5..).unwrap_or_default());
            }
        }
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
