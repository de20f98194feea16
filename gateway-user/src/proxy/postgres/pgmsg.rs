//! pgwire's message types at the proxy's frame boundary: the upstream
//! login's messages are decoded and built as `pgwire::messages` values, and
//! the agent-side decoder is checked against pgwire's in tests and in the
//! `pg_frontend` fuzz target.
//!
//! Owns the translation between one complete frame and a pgwire message; it
//! must not frame, decide, audit or hold session state.
//!
//! # Why a wrapper, and why the agent leg keeps [`super::codec`]
//!
//! pgwire 0.42's decoders are written for a peer that speaks the protocol
//! correctly. Given malformed bytes they
//! - run `Buf::get_*`/`split_to` past the end of the buffer, which panics
//!   (a truncated Bind, Close, ReadyForQuery, ErrorResponse, an
//!   Authentication shorter than 8 bytes, a BackendKeyData without its key);
//! - read from the buffer they are given, not from the frame its length
//!   field announced: a Query without its NUL runs into the next frame, and
//!   bytes left after the fields are read as the next frame (frame smuggling
//!   through a proxy that inspects what the server does not run);
//! - turn invalid UTF-8 into U+FFFD (`from_utf8_lossy`), so the text checked
//!   would not be the text the server runs;
//! - encode a startup packet's parameters from a `BTreeMap`, sorted, so two
//!   spellings of one setting (`search_path`, `SEARCH_PATH`) would reach the
//!   server in another order than the agent sent them, and the last one wins
//!   there.
//!
//! So every decode here takes one frame already cut by
//! [`super::codec::peek_frame`] (bounded, never more than one frame), first
//! walks the layout pgwire is about to read with [`super::codec::Reader`]
//! (every length, count and terminator inside the frame), then lets pgwire
//! decode a copy holding that frame alone and requires that it consumed all
//! of it. Strings the proxy acts on are checked to be UTF-8 before pgwire
//! sees them, so its lossy conversion is the identity.
//!
//! The agent-side leg (startup packet and every frontend frame) stays on
//! [`super::codec`]: the layout walk is the decoder there, it borrows the
//! frame instead of copying each statement into a `String`, and it refuses
//! what pgwire has no type for (FunctionCall, replication's CopyBoth,
//! GSSENCRequest's follow-up) with the proxy's own errors. pgwire's decoder
//! is the reference it is compared with ([`frontend_agrees`]). The
//! server→agent relay passes frames through by their length field and
//! decodes only what it inspects (see `backend.rs`); the startup packet to
//! the server is ours too (the ordering point above).

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::{
    extendedquery::{Bind, Close, Describe, Execute, Parse},
    response::{ErrorResponse, NoticeResponse, ReadyForQuery},
    simplequery::Query,
    startup::{
        Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, Password,
        SASLInitialResponse, SASLResponse,
    },
    DecodeContext, Message, PgWireBackendMessage, ProtocolVersion,
};

use super::codec::{CodecError, Frontend, Reader};

/// The authentication request codes the upstream login answers.
pub const AUTH_CODES: [i32; 6] = [0, 3, 5, 10, 11, 12];

/// Decodes one login-phase message from the server (`tag` and the frame's
/// body): Authentication (the codes in [`AUTH_CODES`]), ParameterStatus,
/// BackendKeyData (protocol 3.0's four-byte key, or a longer 3.2 key),
/// ReadyForQuery, ErrorResponse, NoticeResponse and
/// NegotiateProtocolVersion. Anything else, or a frame whose layout is not
/// exactly what its type holds, is an error (never a panic).
pub fn login_message(tag: u8, body: &[u8]) -> Result<PgWireBackendMessage, CodecError> {
    let ctx = |v| DecodeContext::new(v);
    Ok(match tag {
        b'R' => {
            let mut r = Reader::new(body, "Authentication");
            let code = r.i32()?;
            match code {
                0 | 3 => {}
                5 => {
                    r.bytes(4)?;
                }
                10 => loop {
                    if r.cstr()?.is_empty() {
                        break;
                    }
                },
                11 | 12 => {
                    r.rest();
                }
                other => return Err(CodecError::Unsupported("authentication method", other)),
            }
            exact(&r, "Authentication")?;
            PgWireBackendMessage::Authentication(decode::<Authentication>(
                tag,
                body,
                &ctx(ProtocolVersion::PROTOCOL3_0),
            )?)
        }
        b'S' => {
            let mut r = Reader::new(body, "ParameterStatus");
            r.cstr()?;
            r.cstr()?;
            exact(&r, "ParameterStatus")?;
            PgWireBackendMessage::ParameterStatus(decode::<ParameterStatus>(
                tag,
                body,
                &ctx(ProtocolVersion::PROTOCOL3_0),
            )?)
        }
        b'K' => {
            // 3.0 keys are four bytes; 3.2 allows up to 256.
            let key_len = body.len().saturating_sub(4);
            if !(4..=256).contains(&key_len) {
                return Err(CodecError::Truncated("BackendKeyData"));
            }
            let v = if key_len == 4 {
                ProtocolVersion::PROTOCOL3_0
            } else {
                ProtocolVersion::PROTOCOL3_2
            };
            PgWireBackendMessage::BackendKeyData(decode::<BackendKeyData>(tag, body, &ctx(v))?)
        }
        b'Z' => {
            if !matches!(body, [b'I' | b'T' | b'E']) {
                return Err(CodecError::Truncated("ReadyForQuery"));
            }
            PgWireBackendMessage::ReadyForQuery(decode::<ReadyForQuery>(
                tag,
                body,
                &ctx(ProtocolVersion::PROTOCOL3_0),
            )?)
        }
        b'E' | b'N' => {
            // Login errors may come before client_encoding applies: any
            // bytes, but every field NUL-terminated and the list ended.
            let what = if tag == b'E' {
                "ErrorResponse"
            } else {
                "NoticeResponse"
            };
            let mut r = Reader::new(body, what);
            while r.bytes(1)?[0] != 0 {
                r.raw_cstr()?;
            }
            exact(&r, what)?;
            let c = ctx(ProtocolVersion::PROTOCOL3_0);
            if tag == b'E' {
                PgWireBackendMessage::ErrorResponse(decode::<ErrorResponse>(tag, body, &c)?)
            } else {
                PgWireBackendMessage::NoticeResponse(decode::<NoticeResponse>(tag, body, &c)?)
            }
        }
        b'v' => {
            let mut r = Reader::new(body, "NegotiateProtocolVersion");
            r.i32()?;
            let n = r.i32()?;
            if n < 0 {
                return Err(CodecError::Truncated("NegotiateProtocolVersion"));
            }
            for _ in 0..n {
                r.cstr()?;
            }
            exact(&r, "NegotiateProtocolVersion")?;
            PgWireBackendMessage::NegotiateProtocolVersion(decode::<NegotiateProtocolVersion>(
                tag,
                body,
                &ctx(ProtocolVersion::PROTOCOL3_0),
            )?)
        }
        other => return Err(CodecError::UnexpectedBackend(other as char)),
    })
}

/// A ReadyForQuery's status byte.
pub fn ready_status(ready: &ReadyForQuery) -> u8 {
    ready.status as u8
}

/// The field `code` of an ErrorResponse or NoticeResponse.
pub fn field(fields: &[(u8, String)], code: u8) -> Option<&str> {
    fields
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, v)| v.as_str())
}

/// A PasswordMessage carrying `password` (cleartext or MD5 answer).
pub fn put_password(out: &mut BytesMut, password: &str) {
    encode(out, &Password::new(without_nul(password)));
}

/// A SASLInitialResponse for `mechanism` with the client-first-message.
pub fn put_sasl_initial(out: &mut BytesMut, mechanism: &str, first: &str) {
    encode(
        out,
        &SASLInitialResponse::new(
            without_nul(mechanism),
            Some(Bytes::copy_from_slice(first.as_bytes())),
        ),
    );
}

/// A SASLResponse carrying `data` (the client-final-message).
pub fn put_sasl_response(out: &mut BytesMut, data: &str) {
    encode(
        out,
        &SASLResponse::new(Bytes::copy_from_slice(data.as_bytes())),
    );
}

/// Whether pgwire's decoder reads the frontend frame (`tag`, `body`) the
/// way [`super::codec::decode_frontend`] read it into `ours`: the same
/// names, SQL text, parameter types, formats and values. Messages without
/// fields the proxy acts on agree by type. Only for frames our decoder
/// accepted (pgwire cannot be handed anything else: see the module doc).
pub fn frontend_agrees(tag: u8, body: &[u8], ours: &Frontend<'_>) -> bool {
    let name = |n: &Option<String>| n.clone().unwrap_or_default();
    match ours {
        Frontend::Query(sql) => agree(tag, body, |q: Query| q.query == *sql),
        Frontend::Parse {
            name: n,
            sql,
            param_types,
        } => agree(tag, body, |p: Parse| {
            name(&p.name) == *n && p.query == *sql && p.type_oids == *param_types
        }),
        Frontend::Bind {
            portal,
            statement,
            formats,
            params,
        } => agree(tag, body, |b: Bind| {
            name(&b.portal_name) == *portal
                && name(&b.statement_name) == *statement
                && b.parameter_format_codes == *formats
                && b.parameters.len() == params.len()
                && b.parameters
                    .iter()
                    .zip(params)
                    .all(|(a, b)| a.as_deref() == *b)
        }),
        Frontend::Describe { kind, name: n } => agree(tag, body, |d: Describe| {
            d.target_type == *kind && name(&d.name) == *n
        }),
        Frontend::Close { kind, name: n } => agree(tag, body, |c: Close| {
            c.target_type == *kind && name(&c.name) == *n
        }),
        Frontend::Execute { portal, max_rows } => agree(tag, body, |e: Execute| {
            name(&e.name) == *portal && e.max_rows == *max_rows
        }),
        _ => true,
    }
}

/// pgwire's reading of the frame as `M` satisfies `same`. A frame over
/// `M`'s size limit (PostgreSQL's: 10000 bytes for Describe, Close and
/// Execute) agrees: pgwire refuses it by length, as the server does.
fn agree<M: Message>(tag: u8, body: &[u8], same: impl FnOnce(M) -> bool) -> bool {
    if body.len() + 4 > M::max_message_length() {
        return true;
    }
    let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
    decode::<M>(tag, body, &ctx).is_ok_and(same)
}

/// Decodes `M` from a copy of the one frame (`tag`, `body`) and requires
/// that pgwire read all of it and nothing past it. Callers have walked the
/// layout first: pgwire's readers panic on a short frame.
fn decode<M: Message>(tag: u8, body: &[u8], ctx: &DecodeContext) -> Result<M, CodecError> {
    let what = "pgwire";
    let len = i32::try_from(body.len() + 4).map_err(|_| CodecError::Length(body.len() as i64))?;
    let mut frame = BytesMut::with_capacity(body.len() + 5);
    frame.put_u8(tag);
    frame.put_i32(len);
    frame.extend_from_slice(body);
    match M::decode(&mut frame, ctx) {
        Ok(Some(m)) if frame.is_empty() => Ok(m),
        Ok(Some(_)) => Err(CodecError::Trailing(what)),
        Ok(None) | Err(_) => Err(CodecError::Truncated(what)),
    }
}

fn exact(r: &Reader<'_>, what: &'static str) -> Result<(), CodecError> {
    if r.is_empty() {
        Ok(())
    } else {
        Err(CodecError::Trailing(what))
    }
}

/// Appends `m` as a frame.
pub fn encode<M: Message>(out: &mut BytesMut, m: &M) {
    // Only messages the proxy builds from short strings of its own; their
    // encoders cannot fail below the size limit.
    if let Err(e) = m.encode(out) {
        tracing::warn!("could not encode a PostgreSQL message: {e}");
    }
}

/// pgwire writes strings as they are; a NUL inside would end the field early
/// on the server's side.
fn without_nul(s: &str) -> String {
    s.replace('\0', "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::postgres::codec::{decode_frontend, put_cstr, put_msg};

    fn frame(tag: u8, body: impl FnOnce(&mut BytesMut)) -> BytesMut {
        let mut b = BytesMut::new();
        put_msg(&mut b, tag, body);
        b.split_off(5)
    }

    #[test]
    fn login_messages_decode_through_pgwire() {
        let b = frame(b'R', |b| {
            b.put_i32(10);
            put_cstr(b, "SCRAM-SHA-256-PLUS");
            put_cstr(b, "SCRAM-SHA-256");
            b.put_u8(0);
        });
        match login_message(b'R', &b) {
            Ok(PgWireBackendMessage::Authentication(Authentication::SASL(m))) => {
                assert_eq!(m, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
            }
            other => panic!("{other:?}"),
        }
        let b = frame(b'R', |b| {
            b.put_i32(5);
            b.extend_from_slice(&[1, 2, 3, 4]);
        });
        assert!(matches!(
            login_message(b'R', &b),
            Ok(PgWireBackendMessage::Authentication(Authentication::MD5Password(s))) if s == [1, 2, 3, 4]
        ));
        let b = frame(b'K', |b| {
            b.put_u32(42);
            b.put_u32(7);
        });
        assert!(matches!(
            login_message(b'K', &b),
            Ok(PgWireBackendMessage::BackendKeyData(k)) if k.pid == 42
        ));
        let b = frame(b'E', |b| {
            b.put_u8(b'C');
            b.extend_from_slice(b"28P01\0");
            b.put_u8(b'M');
            // Not UTF-8: a server error before client_encoding applies.
            b.extend_from_slice(b"mot de passe \xe9chou\xe9\0");
            b.put_u8(0);
        });
        match login_message(b'E', &b) {
            Ok(PgWireBackendMessage::ErrorResponse(e)) => {
                assert_eq!(field(&e.fields, b'C'), Some("28P01"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            login_message(b'Z', b"T"),
            Ok(PgWireBackendMessage::ReadyForQuery(r)) if ready_status(&r) == b'T'
        ));
    }

    #[test]
    fn malformed_login_messages_are_errors_not_panics() {
        // Each of these makes pgwire's own decoder run past the buffer.
        for (tag, body) in [
            (b'R', &b""[..]),
            (b'R', b"\0\0\0"),
            (b'R', b"\0\0\0\x05\x01"),
            (b'R', b"\0\0\0\x0aSCRAM"),
            (b'R', b"\0\0\0\x07"),
            (b'R', b"\0\0\0\0extra"),
            (b'K', b"\0\0\0\x01"),
            (b'K', b"\0\0\0\x01\0\0\0"),
            (b'Z', b""),
            (b'Z', b"IT"),
            (b'Z', b"X"),
            (b'E', b"Cabc"),
            (b'E', b"Cabc\0"),
            (b'S', b"name\0value"),
            (b'S', b"a\0b\0c\0"),
            (b'v', b"\0\x03\0\0\0\0\0\x02x\0"),
            (b'v', b"\0\x03\0\0\xff\xff\xff\xff"),
            (b'D', b"\0\0"),
        ] {
            assert!(login_message(tag, body).is_err(), "{tag} {body:?}");
        }
    }

    #[test]
    fn login_replies_are_what_the_server_reads() {
        let mut out = BytesMut::new();
        put_password(&mut out, "s\0ecret");
        assert_eq!(&out[..], b"p\0\0\0\x0bsecret\0");
        let mut out = BytesMut::new();
        put_sasl_initial(&mut out, "SCRAM-SHA-256", "n,,n=,r=abc");
        assert_eq!(&out[..], b"p\0\0\0\x21SCRAM-SHA-256\0\0\0\0\x0bn,,n=,r=abc");
        let mut out = BytesMut::new();
        put_sasl_response(&mut out, "c=biws");
        assert_eq!(&out[..], b"p\0\0\0\x0ac=biws");
    }

    #[test]
    fn ready_for_query_keeps_its_status() {
        for status in [b'I', b'T', b'E'] {
            let mut out = BytesMut::new();
            crate::proxy::postgres::codec::put_ready(&mut out, status);
            assert_eq!(&out[..], [b'Z', 0, 0, 0, 5, status]);
        }
    }

    #[test]
    fn pgwire_reads_accepted_frontend_frames_the_same_way() {
        let frames = [
            frame(b'Q', |b| put_cstr(b, "select 'é'")),
            frame(b'P', |b| {
                put_cstr(b, "s1");
                put_cstr(b, "select $1");
                b.put_i16(1);
                b.put_u32(23);
            }),
            frame(b'B', |b| {
                put_cstr(b, "");
                put_cstr(b, "s1");
                b.put_i16(1);
                b.put_i16(1);
                b.put_i16(2);
                b.put_i32(4);
                b.put_u32(7);
                b.put_i32(-1);
                b.put_i16(0);
            }),
            frame(b'D', |b| {
                b.put_u8(b'S');
                put_cstr(b, "s1");
            }),
            frame(b'C', |b| {
                b.put_u8(b'P');
                put_cstr(b, "");
            }),
            frame(b'E', |b| {
                put_cstr(b, "p");
                b.put_i32(10);
            }),
        ];
        let tags = [b'Q', b'P', b'B', b'D', b'C', b'E'];
        for (tag, body) in tags.into_iter().zip(&frames) {
            let ours = decode_frontend(tag, body).unwrap();
            assert!(frontend_agrees(tag, body, &ours), "{ours:?}");
        }
        // Counts are unsigned 16-bit on the server: 0x8000 parameter types
        // must follow, so this Parse is truncated (pgwire would run past it),
        // not a Parse without parameters.
        assert!(decode_frontend(b'P', b"s\0select $1\0\x80\x00").is_err());
        // A different reading is caught: the same Execute read with another
        // portal name does not agree.
        let ours = Frontend::Execute {
            portal: "q",
            max_rows: 10,
        };
        assert!(!frontend_agrees(b'E', &frames[5], &ours));
    }
}
