//! The upstream leg: TCP connect, TLS per the resource's `upstream_tls`,
//! the startup message (held user, mapped database, the agent's
//! `application_name` and other settings) and password login with the held
//! credential (SCRAM-SHA-256, MD5 or cleartext), up to the server's first
//! ReadyForQuery.
//!
//! The server's login messages are read, and the answers built, as pgwire
//! message types through [`super::pgmsg`]. The startup packet and the
//! SCRAM-SHA-256 and MD5 computations stay here: pgwire encodes startup
//! parameters sorted (see `pgmsg`), and its client SCRAM (behind its
//! client-api feature) does not check that the server's nonce extends ours,
//! takes any iteration count (0 panics, 4 billion pins a core) and cannot be
//! checked against the RFC 7677 vector.
//!
//! Owns the upstream's login only; it must not talk to the agent.

use std::{num::NonZeroU32, path::Path, sync::Arc};

use aws_lc_rs::{digest, hmac, pbkdf2, rand};
use base64::{engine::general_purpose::STANDARD as B64, Engine};
use bytes::{BufMut, BytesMut};
use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use pgwire::messages::{startup::Authentication, PgWireBackendMessage as BackendMessage};

use super::{
    codec::{self, put_cstr, Reader, MAX_FRAME, PROTOCOL_3_0, SSL_REQUEST},
    pgmsg,
};
use crate::{
    policy::{Resource, UpstreamTls},
    proxy::Flow,
};

/// A byte stream to the server (plain TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// Largest SCRAM iteration count accepted from a server (PostgreSQL's
/// default is 4096): a hostile upstream must not pin a core.
const MAX_SCRAM_ITERATIONS: u32 = 1_000_000;

/// Why the upstream login failed.
#[derive(Debug, Error)]
pub enum UpstreamError {
    /// Network error.
    #[error("upstream connection: {0}")]
    Io(#[from] std::io::Error),
    /// TLS was required but refused, or the handshake failed.
    #[error("upstream TLS: {0}")]
    Tls(String),
    /// The held credential could not be read or is missing.
    #[error("held credential: {0}")]
    Credential(String),
    /// The server refused the login or sent an error.
    #[error("upstream refused: {message}")]
    Server {
        /// SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server spoke something we do not understand.
    #[error("upstream protocol: {0}")]
    Protocol(String),
}

impl From<codec::CodecError> for UpstreamError {
    fn from(e: codec::CodecError) -> Self {
        Self::Protocol(e.to_string())
    }
}

/// A logged-in upstream connection.
pub struct Upstream {
    /// The stream.
    pub io: Box<dyn Io>,
    /// Bytes read past the login (already the start of the session).
    pub buf: BytesMut,
    /// The server's ParameterStatus values, in order.
    pub params: Vec<(String, String)>,
    /// The server's BackendKeyData (pid, secret).
    pub key: Option<(u32, Vec<u8>)>,
    /// The transaction status of the first ReadyForQuery.
    pub status: u8,
}

/// Startup parameters for the upstream: the held user, the mapped
/// database, and the agent's other settings (application_name, DateStyle,
/// options...), with `client_encoding` always `UTF8` (see
/// [`super::encoding`]). Replication and protocol extensions are not
/// passed.
pub fn startup_params(resource: &Resource, agent: &[(String, String)]) -> Vec<(String, String)> {
    let get = |k: &str| agent.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let user = resource
        .credentials
        .user
        .clone()
        .or_else(|| get("user"))
        .unwrap_or_default();
    let database = resource
        .postgres
        .database
        .clone()
        .or_else(|| get("database"))
        .unwrap_or_else(|| user.clone());
    let mut out = vec![
        ("user".to_string(), user),
        ("database".to_string(), database),
    ];
    for (k, v) in agent {
        if matches!(k.as_str(), "user" | "database" | "replication")
            || k.starts_with("_pq_.")
            || super::encoding::is_client_encoding_key(k)
        {
            continue;
        }
        out.push((k.clone(), v.clone()));
    }
    // Whatever the agent asked for (it was checked to be UTF-8, or
    // absent): the server must decode statements as they were parsed here,
    // and a startup value outranks role and database defaults.
    out.push((
        "client_encoding".to_string(),
        super::encoding::PINNED.to_string(),
    ));
    out
}

/// Connects and logs in.
pub async fn login(flow: &Flow, params: &[(String, String)]) -> Result<Upstream, UpstreamError> {
    let tcp = flow.connect_upstream().await?;
    let mode = flow.resource.postgres.upstream_tls;
    let mut io: Box<dyn Io> = match mode {
        UpstreamTls::Disable => Box::new(tcp),
        _ => negotiate_tls(flow, tcp, mode).await?,
    };
    let mut out = BytesMut::new();
    let at = out.len();
    out.put_i32(0);
    out.put_u32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(&mut out, k);
        put_cstr(&mut out, v);
    }
    out.put_u8(0);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    io.write_all(&out).await?;
    let user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let mut buf = BytesMut::with_capacity(8192);
    let mut scram: Option<Scram> = None;
    let mut result = Upstream {
        io: Box::new(tokio::io::empty()),
        buf: BytesMut::new(),
        params: Vec::new(),
        key: None,
        status: b'I',
    };
    loop {
        let (tag, body) = read_frame(&mut io, &mut buf).await?;
        let mut reply = BytesMut::new();
        match pgmsg::login_message(tag, &body)? {
            BackendMessage::Authentication(auth) => match auth {
                Authentication::Ok => {}
                Authentication::CleartextPassword => {
                    pgmsg::put_password(&mut reply, &password(&flow.resource)?);
                }
                Authentication::MD5Password(salt) => {
                    let pw = password(&flow.resource)?;
                    pgmsg::put_password(&mut reply, &md5_password(&user, &pw, &salt));
                }
                Authentication::SASL(mechs) => {
                    if !mechs.iter().any(|m| m == "SCRAM-SHA-256") {
                        return Err(UpstreamError::Protocol(format!(
                            "no supported SASL mechanism in {mechs:?}"
                        )));
                    }
                    let s = Scram::new(password(&flow.resource)?)?;
                    pgmsg::put_sasl_initial(&mut reply, "SCRAM-SHA-256", &s.client_first());
                    scram = Some(s);
                }
                Authentication::SASLContinue(data) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        UpstreamError::Protocol("SASLContinue out of order".into())
                    })?;
                    pgmsg::put_sasl_response(&mut reply, &s.client_final(&data)?);
                }
                Authentication::SASLFinal(data) => {
                    let s = scram
                        .as_ref()
                        .ok_or_else(|| UpstreamError::Protocol("SASLFinal out of order".into()))?;
                    s.verify_server(&data)?;
                }
                other => {
                    return Err(UpstreamError::Protocol(format!(
                        "authentication method {other:?} is not supported"
                    )))
                }
            },
            BackendMessage::ParameterStatus(p) => result.params.push((p.name, p.value)),
            BackendMessage::BackendKeyData(k) => {
                result.key = Some((k.pid as u32, k.secret_key.to_bytes().to_vec()));
            }
            BackendMessage::ReadyForQuery(r) => {
                result.status = pgmsg::ready_status(&r);
                result.io = io;
                result.buf = buf;
                return Ok(result);
            }
            BackendMessage::ErrorResponse(e) => {
                return Err(UpstreamError::Server {
                    code: pgmsg::field(&e.fields, b'C').unwrap_or("08006").to_string(),
                    message: pgmsg::field(&e.fields, b'M')
                        .unwrap_or_default()
                        .to_string(),
                });
            }
            // NoticeResponse, NegotiateProtocolVersion: nothing to do.
            _ => {}
        }
        if !reply.is_empty() {
            io.write_all(&reply).await?;
        }
    }
}

/// Reads one whole frame (tag, body) during login.
async fn read_frame(
    io: &mut Box<dyn Io>,
    buf: &mut BytesMut,
) -> Result<(u8, Vec<u8>), UpstreamError> {
    loop {
        if let Some(h) = codec::peek_frame(buf, MAX_FRAME)? {
            let frame = buf.split_to(h.total);
            return Ok((h.tag, frame.get(5..).unwrap_or_default().to_vec()));
        }
        if io.read_buf(buf).await? == 0 {
            return Err(UpstreamError::Protocol(
                "the server closed the connection during login".into(),
            ));
        }
    }
}

async fn negotiate_tls(
    flow: &Flow,
    mut tcp: tokio::net::TcpStream,
    mode: UpstreamTls,
) -> Result<Box<dyn Io>, UpstreamError> {
    let mut req = BytesMut::new();
    req.put_i32(8);
    req.put_u32(SSL_REQUEST);
    tcp.write_all(&req).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {}
        b'N' if mode == UpstreamTls::Prefer => return Ok(Box::new(tcp)),
        b'N' => return Err(UpstreamError::Tls("the server does not offer TLS".into())),
        other => {
            return Err(UpstreamError::Tls(format!(
                "unexpected answer {other:#x} to SSLRequest"
            )))
        }
    }
    let config = tls_config(&flow.resource, mode)?;
    let name = match &flow.resource.upstream {
        Some(crate::policy::Destination::Host { host, .. }) => {
            ServerName::try_from(host.clone()).map_err(|e| UpstreamError::Tls(e.to_string()))?
        }
        _ => ServerName::IpAddress(flow.upstream_addr().await?.ip().into()),
    };
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| UpstreamError::Tls(e.to_string()))?;
    Ok(Box::new(tls))
}

fn tls_config(
    resource: &Resource,
    mode: UpstreamTls,
) -> Result<rustls::ClientConfig, UpstreamError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Tls(e.to_string()))?;
    if mode != UpstreamTls::VerifyFull {
        // libpq's `prefer`/`require`: encrypted, server not authenticated.
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    match &resource.upstream_ca_file {
        Some(path) => add_pem(&mut roots, path)?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    if roots.is_empty() {
        return Err(UpstreamError::Tls(
            "no CA certificate to verify the server".into(),
        ));
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

fn add_pem(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), UpstreamError> {
    let err = |e: String| UpstreamError::Tls(format!("CA file {}: {e}", path.display()));
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))? {
        roots
            .add(cert.map_err(|e| err(e.to_string()))?)
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

/// Accepts any server certificate (signatures still checked): `require`.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn password(resource: &Resource) -> Result<String, UpstreamError> {
    let path = resource
        .credentials
        .password_file
        .as_ref()
        .ok_or_else(|| UpstreamError::Credential("the resource has no password_file".into()))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| UpstreamError::Credential(format!("{}: {e}", path.display())))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// `md5` + hex(md5(hex(md5(password + user)) + salt)), as libpq sends it.
pub fn md5_password(user: &str, password: &str, salt: &[u8]) -> String {
    use md5::{Digest, Md5};
    let inner = hex::encode(Md5::digest(format!("{password}{user}").as_bytes()));
    let mut h = Md5::new();
    h.update(inner.as_bytes());
    h.update(salt);
    format!("md5{}", hex::encode(h.finalize()))
}

/// A SCRAM-SHA-256 client exchange (RFC 5802/7677, no channel binding).
pub struct Scram {
    password: String,
    nonce: String,
    first_bare: String,
    auth_message: String,
    salted: Vec<u8>,
}

impl Scram {
    /// A fresh exchange with a random client nonce.
    pub fn new(password: String) -> Result<Self, UpstreamError> {
        let mut raw = [0u8; 18];
        rand::fill(&mut raw).map_err(|_| UpstreamError::Protocol("no randomness".into()))?;
        Ok(Self::with_nonce(password, B64.encode(raw)))
    }

    fn with_nonce(password: String, nonce: String) -> Self {
        // PostgreSQL takes the user from the startup message.
        let first_bare = format!("n=,r={nonce}");
        Self {
            password,
            nonce,
            first_bare,
            auth_message: String::new(),
            salted: Vec::new(),
        }
    }

    /// client-first-message.
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.first_bare)
    }

    /// client-final-message for the server-first-message.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<String, UpstreamError> {
        let bad = |w: &str| UpstreamError::Protocol(format!("SCRAM server-first-message: {w}"));
        let sf = std::str::from_utf8(server_first).map_err(|_| bad("not UTF-8"))?;
        let (mut nonce, mut salt, mut iters) = (None, None, None);
        for part in sf.split(',') {
            match part.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(B64.decode(v).map_err(|_| bad("bad salt"))?),
                Some(("i", v)) => iters = v.parse::<u32>().ok(),
                _ => {}
            }
        }
        let nonce = nonce.ok_or_else(|| bad("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err(bad("nonce does not extend ours"));
        }
        let salt = salt.ok_or_else(|| bad("no salt"))?;
        let iters = iters
            .filter(|&i| i <= MAX_SCRAM_ITERATIONS)
            .and_then(NonZeroU32::new)
            .ok_or_else(|| bad("bad iteration count"))?;
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iters,
            &salt,
            self.password.as_bytes(),
            &mut salted,
        );
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{sf},{without_proof}", self.first_bare);
        let client_key = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &salted), b"Client Key");
        let stored = digest::digest(&digest::SHA256, client_key.as_ref());
        let sig = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored.as_ref()),
            self.auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(sig.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        self.salted = salted.to_vec();
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server's signature (the server proves it knew the verifier).
    pub fn verify_server(&self, server_final: &[u8]) -> Result<(), UpstreamError> {
        let sf = std::str::from_utf8(server_final).unwrap_or_default();
        let v = sf
            .strip_prefix("v=")
            .and_then(|v| {
                B64.decode(v.trim_end_matches(|c: char| c.is_whitespace()))
                    .ok()
            })
            .ok_or_else(|| {
                UpstreamError::Protocol("SCRAM server-final-message malformed".into())
            })?;
        let server_key = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &self.salted),
            b"Server Key",
        );
        hmac::verify(
            &hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
            self.auth_message.as_bytes(),
            &v,
        )
        .map_err(|_| UpstreamError::Protocol("SCRAM server signature does not verify".into()))
    }
}

/// Runs one simple query on a side connection (the daemon's own catalog
/// look-ups) and returns its rows as text; a server error is an `Err`.
pub async fn simple_query(
    side: &mut Upstream,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, UpstreamError> {
    let mut q = BytesMut::new();
    codec::put_query(&mut q, sql);
    side.io.write_all(&q).await?;
    let mut out = Vec::new();
    let mut error = None;
    loop {
        let head = loop {
            if let Some(h) = codec::peek_frame(&side.buf, MAX_FRAME)? {
                break h;
            }
            if side.io.read_buf(&mut side.buf).await? == 0 {
                return Err(UpstreamError::Protocol("side connection closed".into()));
            }
        };
        let frame = side.buf.split_to(head.total);
        let body = frame.get(5..).unwrap_or_default();
        match head.tag {
            b'D' => {
                let mut r = Reader::new(body, "DataRow");
                let n = r.i16()?;
                let mut row = Vec::with_capacity(n.max(0) as usize);
                for _ in 0..n.max(0) {
                    row.push(r.value()?.map(|v| String::from_utf8_lossy(v).into_owned()));
                }
                out.push(row);
            }
            b'E' => error = Some(codec::error_fields(body)),
            b'Z' => break,
            _ => {}
        }
    }
    match error {
        Some(f) => {
            let get = |k: u8| {
                f.iter()
                    .find(|(c, _)| *c == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            Err(UpstreamError::Server {
                code: get(b'C'),
                message: get(b'M'),
            })
        }
        None => Ok(out),
    }
}

/// A `pg_catalog.<cast>[]` expression holding `items`, which travel
/// hex-encoded: no quoting a session setting (`standard_conforming_strings`)
/// could read differently, and an agent's identifiers never appear as SQL
/// text in the server's statement log.
pub fn hex_array<'a>(items: impl Iterator<Item = &'a str>, cast: &str) -> String {
    let hex: Vec<String> = items.map(|s| hex::encode(s.as_bytes())).collect();
    format!(
        "ARRAY(SELECT pg_catalog.convert_from(pg_catalog.decode(x, 'hex'), 'UTF8') FROM pg_catalog.unnest('{{{}}}'::pg_catalog.text[]) x)::pg_catalog.{cast}[]",
        hex.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_matches_libpq() {
        // md5(hex(md5("secret" + "alice")) + salt), computed independently.
        assert_eq!(
            md5_password("alice", "secret", &[1, 2, 3, 4]),
            "md598a0412b9c31436fc53776e863350083"
        );
        assert_ne!(
            md5_password("alice", "secret", &[1, 2, 3, 5]),
            md5_password("alice", "secret", &[1, 2, 3, 4])
        );
    }

    #[test]
    fn scram_rfc7677_vector() {
        // RFC 7677 section 3 (user "user", password "pencil").
        let mut s = Scram::with_nonce("pencil".into(), "rOprNGfwEbeRWgbNEkqO".into());
        s.first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let fin = s
            .client_final(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .unwrap();
        assert_eq!(
            fin,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.verify_server(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(s.verify_server(b"v=AAAA").is_err());
    }

    #[test]
    fn scram_rejects_a_foreign_nonce_and_huge_iterations() {
        let mut s = Scram::with_nonce("pw".into(), "abc".into());
        assert!(s.client_final(b"r=xyz123,s=QUJD,i=4096").is_err());
        assert!(s.client_final(b"r=abc123,s=QUJD,i=4000000000").is_err());
    }
}
