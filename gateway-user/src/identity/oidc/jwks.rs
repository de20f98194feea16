//! JSON Web Key Sets: turning a JWKS document into verification keys, and
//! fetching one over HTTPS.
//!
//! Owns which keys are usable and for which algorithm: the algorithm comes
//! from the key (kty, crv, and alg when present), never from a token. Does
//! not cache, schedule or decide freshness (the verifier in `mod.rs` does).

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{body::Bytes, header, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey};
use rustls_pki_types::{pem::PemObject as _, CertificateDer, ServerName};
use serde_json::Value;

/// The largest JWKS document accepted, from a file or over HTTPS.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// At most this many keys of one JWKS are kept (issuers publish a handful).
pub const MAX_KEYS: usize = 64;

/// The smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Which token algorithms a key verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyAlgs {
    /// Exactly this one (EC and OKP keys, and RSA keys that name their `alg`).
    One(Algorithm),
    /// An RSA key without `alg`: any of RS256/384/512 and PS256/384/512.
    AnyRsa,
}

impl KeyAlgs {
    pub(crate) fn accepts(self, alg: Algorithm) -> bool {
        match self {
            Self::One(a) => a == alg,
            Self::AnyRsa => is_rsa(alg),
        }
    }
}

fn is_rsa(alg: Algorithm) -> bool {
    matches!(
        alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
    )
}

/// One verification key of a JWKS.
#[derive(Clone)]
pub(crate) struct VerifyKey {
    /// The key's `kid`, if it has one.
    pub(crate) kid: Option<String>,
    /// What kind of key this is, for messages: "RSA", "EC P-256", ...
    pub(crate) kind: &'static str,
    /// The algorithms it verifies.
    pub(crate) algs: KeyAlgs,
    /// The key material.
    pub(crate) key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .field("algs", &self.algs)
            .finish()
    }
}

/// The usable keys of one JWKS document.
#[derive(Debug, Default)]
pub(crate) struct KeySet {
    keys: Vec<Arc<VerifyKey>>,
    by_kid: HashMap<String, Vec<Arc<VerifyKey>>>,
}

/// What a JWKS document held besides usable keys.
#[derive(Debug, Default)]
pub(crate) struct Skipped {
    /// One line per key that was left out, with the reason.
    pub(crate) reasons: Vec<String>,
}

impl KeySet {
    /// Parses a JWKS document (`{"keys": [...]}`). Keys that cannot be used
    /// (HMAC `oct` keys, encryption keys, unknown types or curves, weak RSA,
    /// malformed members) are left out and reported in [`Skipped`]; a
    /// document with no usable key at all is an error.
    pub(crate) fn parse(bytes: &[u8]) -> Result<(Self, Skipped), String> {
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
        }
        let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let Some(list) = doc.get("keys").and_then(Value::as_array) else {
            return Err("no \"keys\" array".into());
        };
        let mut set = KeySet::default();
        let mut skipped = Skipped::default();
        for (i, jwk) in list.iter().enumerate() {
            let label = match jwk.get("kid").and_then(Value::as_str) {
                Some(kid) => format!("key {i} (kid {})", super::clip(kid)),
                None => format!("key {i}"),
            };
            if set.keys.len() >= MAX_KEYS {
                skipped
                    .reasons
                    .push(format!("{label}: more than {MAX_KEYS} keys"));
                continue;
            }
            match parse_jwk(jwk) {
                Ok(key) => set.push(key),
                Err(reason) => skipped.reasons.push(format!("{label}: {reason}")),
            }
        }
        if set.keys.is_empty() {
            let why = if skipped.reasons.is_empty() {
                "the key list is empty".to_string()
            } else {
                skipped.reasons.join("; ")
            };
            return Err(format!("no usable signing key: {why}"));
        }
        Ok((set, skipped))
    }

    fn push(&mut self, key: VerifyKey) {
        let key = Arc::new(key);
        if let Some(kid) = &key.kid {
            self.by_kid
                .entry(kid.clone())
                .or_default()
                .push(Arc::clone(&key));
        }
        self.keys.push(key);
    }

    /// How many usable keys there are.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key ids, in document order (keys without one are left out).
    pub(crate) fn kids(&self) -> Vec<String> {
        self.keys.iter().filter_map(|k| k.kid.clone()).collect()
    }

    /// The keys with this `kid` (empty if none).
    pub(crate) fn with_kid(&self, kid: &str) -> &[Arc<VerifyKey>] {
        self.by_kid.get(kid).map(Vec::as_slice).unwrap_or(&[])
    }

    /// All keys.
    pub(crate) fn all(&self) -> &[Arc<VerifyKey>] {
        &self.keys
    }
}

fn str_member<'a>(jwk: &'a Value, name: &str) -> Result<Option<&'a str>, String> {
    match jwk.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("\"{name}\" is not a string")),
    }
}

fn b64_member(jwk: &Value, name: &str) -> Result<Vec<u8>, String> {
    let text = str_member(jwk, name)?.ok_or_else(|| format!("no \"{name}\""))?;
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| format!("\"{name}\" is not base64url"))
}

fn parse_jwk(jwk: &Value) -> Result<VerifyKey, String> {
    if !jwk.is_object() {
        return Err("not a JSON object".into());
    }
    let kid = str_member(jwk, "kid")?.map(str::to_string);
    let kty = str_member(jwk, "kty")?.ok_or("no \"kty\"")?;
    if let Some(usage) = str_member(jwk, "use")? {
        if usage != "sig" {
            return Err(format!("\"use\" is {}, not sig", super::clip(usage)));
        }
    }
    if let Some(ops) = jwk.get("key_ops") {
        let verifies = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        if !verifies {
            return Err("\"key_ops\" does not include verify".into());
        }
    }
    let named_alg = match str_member(jwk, "alg")? {
        None => None,
        Some(name) => Some(
            name.parse::<Algorithm>()
                .map_err(|_| format!("unsupported \"alg\" {}", super::clip(name)))?,
        ),
    };
    let (kind, algs, key) = match kty {
        "RSA" => {
            let n = b64_member(jwk, "n")?;
            let e = b64_member(jwk, "e")?;
            let n_bits = bit_len(&n);
            if n_bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA modulus of {n_bits} bits (at least {MIN_RSA_BITS} needed)"
                ));
            }
            if bit_len(&e) == 0 {
                return Err("RSA exponent is zero".into());
            }
            let algs = match named_alg {
                None => KeyAlgs::AnyRsa,
                Some(a) if is_rsa(a) => KeyAlgs::One(a),
                Some(a) => return Err(format!("RSA key with \"alg\" {a:?}")),
            };
            ("RSA", algs, DecodingKey::from_rsa_raw_components(&n, &e))
        }
        "EC" => {
            let crv = str_member(jwk, "crv")?.ok_or("no \"crv\"")?;
            let (kind, alg, len) = match crv {
                "P-256" => ("EC P-256", Algorithm::ES256, 32),
                "P-384" => ("EC P-384", Algorithm::ES384, 48),
                other => return Err(format!("unsupported curve {}", super::clip(other))),
            };
            if named_alg.is_some_and(|a| a != alg) {
                return Err(format!("{kind} key with \"alg\" {named_alg:?}"));
            }
            let x = b64_member(jwk, "x")?;
            let y = b64_member(jwk, "y")?;
            if x.len() != len || y.len() != len {
                return Err(format!("{kind} coordinates are not {len} bytes"));
            }
            // An uncompressed SEC1 point, what the EC verifier takes.
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (kind, KeyAlgs::One(alg), DecodingKey::from_ec_der(&point))
        }
        "OKP" => {
            let crv = str_member(jwk, "crv")?.ok_or("no \"crv\"")?;
            if crv != "Ed25519" {
                return Err(format!("unsupported curve {}", super::clip(crv)));
            }
            if named_alg.is_some_and(|a| a != Algorithm::EdDSA) {
                return Err(format!("Ed25519 key with \"alg\" {named_alg:?}"));
            }
            let x = b64_member(jwk, "x")?;
            if x.len() != 32 {
                return Err("Ed25519 public key is not 32 bytes".into());
            }
            (
                "OKP Ed25519",
                KeyAlgs::One(Algorithm::EdDSA),
                DecodingKey::from_ed_der(&x),
            )
        }
        "oct" => return Err("symmetric (HMAC) keys are never trusted".into()),
        other => return Err(format!("unsupported \"kty\" {}", super::clip(other))),
    };
    Ok(VerifyKey {
        kid,
        kind,
        algs,
        key,
    })
}

/// The number of significant bits of a big-endian unsigned integer.
fn bit_len(be: &[u8]) -> usize {
    match be.iter().position(|&b| b != 0) {
        None => 0,
        Some(i) => (be.len() - i - 1) * 8 + (8 - be[i].leading_zeros() as usize),
    }
}

/// A JWKS URL, ready to be fetched over HTTPS.
pub(crate) struct HttpsSource {
    url: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
    server_name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for HttpsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsSource")
            .field("url", &self.url)
            .finish()
    }
}

impl HttpsSource {
    /// Checks `url` (https only, a host, no user info) and prepares a TLS
    /// client that trusts the certificates in `ca_file` if given, else the
    /// system's roots.
    pub(crate) fn new(url: &str, ca_file: Option<&Path>) -> Result<Self, SourceError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| SourceError::Url(format!("{url:?} is not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(SourceError::Url(format!(
                "{url:?}: JWKS are fetched over https only"
            )));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| SourceError::Url(format!("{url:?} has no host")))?;
        if authority.as_str().contains('@') {
            return Err(SourceError::Url(format!(
                "{url:?}: user info is not allowed"
            )));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(SourceError::Url(format!("{url:?} has no host")));
        }
        let port = authority.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| SourceError::Url(format!("{url:?}: bad host name: {e}")))?;
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".to_string());

        let roots = match ca_file {
            Some(path) => roots_from_file(path)?,
            None => system_roots()?,
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SourceError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            url: url.to_string(),
            host,
            port,
            authority: authority.as_str().to_string(),
            path,
            server_name,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// The URL, as configured.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// GETs the document: one connection, HTTP/1.1, status 200 only (no
    /// redirects), at most [`MAX_JWKS_BYTES`], all within `timeout`.
    pub(crate) async fn fetch(&self, timeout: Duration) -> Result<Vec<u8>, String> {
        match tokio::time::timeout(timeout, self.fetch_inner()).await {
            Ok(result) => result,
            Err(_) => Err(format!("no complete answer within {timeout:?}")),
        }
    }

    async fn fetch_inner(&self) -> Result<Vec<u8>, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let request = Request::get(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::ACCEPT, "application/json, application/jwk-set+json")
            .header(header::USER_AGENT, "portcullis")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let exchange = async move {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
            if response.status() != StatusCode::OK {
                return Err(format!("HTTP status {}", response.status()));
            }
            let declared = response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
                return Err(format!("body larger than {MAX_JWKS_BYTES} bytes"));
            }
            let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        format!("body larger than {MAX_JWKS_BYTES} bytes")
                    } else {
                        format!("reading body: {e}")
                    }
                })?;
            Ok(body.to_bytes().to_vec())
        };
        // Drive the connection in this task (no spawn: dropping this future,
        // as the timeout does, closes everything). The connection may finish
        // before the body is read out of its buffer, so keep polling the
        // exchange until it is done.
        tokio::pin!(exchange);
        tokio::pin!(conn);
        let mut conn_done = false;
        loop {
            tokio::select! {
                result = &mut exchange => return result,
                _ = &mut conn, if !conn_done => conn_done = true,
            }
        }
    }
}

/// Why a JWKS source could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SourceError {
    #[error("{0}")]
    Url(String),
    #[error("CA file {path}: {reason}")]
    CaFile {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("system root certificates: {0}")]
    Roots(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

fn roots_from_file(path: &Path) -> Result<rustls::RootCertStore, SourceError> {
    let ca_err = |reason: String| SourceError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| ca_err(e.to_string()))?;
        roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ca_err("no certificate in it".into()));
    }
    Ok(roots)
}

fn system_roots() -> Result<rustls::RootCertStore, SourceError> {
    // Honours SSL_CERT_FILE / SSL_CERT_DIR, else the distribution's bundle
    // (/etc/ssl/certs/ca-certificates.crt on Debian).
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(SourceError::Roots(if errors.is_empty() {
            "none found".into()
        } else {
            errors.join("; ")
        }));
    }
    Ok(roots)
}
