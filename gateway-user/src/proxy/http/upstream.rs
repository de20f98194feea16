//! The upstream side of an HTTP resource: verified TLS (the resource's CA
//! file or the system roots), credentials the daemon holds (bearer token,
//! basic, client certificate) and a small per-flow connection pool (one
//! multiplexed HTTP/2 connection, or up to [`H1_IDLE_MAX`] idle HTTP/1.1
//! ones).
//!
//! Owns connecting and sending. It must not decide, mask or record.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    header::HeaderValue,
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tracing::debug;

use crate::policy::{Credentials, Resource};

/// A body of any source, as hyper sends it.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;
/// Errors inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle HTTP/1.1 upstream connections kept per flow.
pub const H1_IDLE_MAX: usize = 8;
/// TLS handshake bound.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Upstream failures (answered to the agent with 502).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// A file the resource names cannot be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A certificate or key file holds nothing usable.
    #[error("{0}: no usable certificate or key")]
    Pem(PathBuf),
    /// rustls configuration.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// A credential that is not a valid header value.
    #[error("credential in {0} is not a valid header value")]
    Header(PathBuf),
    /// TCP connect.
    #[error("connect {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// TLS handshake (includes certificate verification failures).
    #[error("tls handshake with {name}: {source}")]
    Handshake {
        /// The server name verified.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
    /// HTTP on the upstream connection.
    #[error("upstream http: {0}")]
    Http(#[from] hyper::Error),
    /// The upstream name is not a valid DNS name or address.
    #[error("invalid upstream server name {0:?}")]
    Name(String),
}

fn read(path: &Path) -> Result<Vec<u8>, UpstreamError> {
    std::fs::read(path).map_err(|source| UpstreamError::File {
        path: path.to_path_buf(),
        source,
    })
}

fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            debug!(added, "system CA roots loaded");
            Arc::new(store)
        })
        .clone()
}

/// The TLS client configuration for a resource: its CA file (else the
/// system roots), its client certificate if it has one, and `alpn`.
pub fn tls_config(resource: &Resource, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, UpstreamError> {
    let roots = match &resource.upstream_ca_file {
        Some(path) => {
            let pem = read(path)?;
            let mut store = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|_| UpstreamError::Pem(path.clone()))?;
                store.add(cert)?;
            }
            if store.is_empty() {
                return Err(UpstreamError::Pem(path.clone()));
            }
            Arc::new(store)
        }
        None => system_roots(),
    };
    let builder = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let c = &resource.credentials;
    let mut config = match (&c.client_cert_file, &c.client_key_file) {
        (Some(cert), Some(key)) => {
            let cert_pem = read(cert)?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<_, _>>()
                .map_err(|_| UpstreamError::Pem(cert.clone()))?;
            if chain.is_empty() {
                return Err(UpstreamError::Pem(cert.clone()));
            }
            let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
                .map_err(|_| UpstreamError::Pem(key.clone()))?;
            builder.with_client_auth_cert(chain, key_der)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The `Authorization` value the daemon sends for a resource (bearer token
/// or basic), read from its files now (so rotated files apply to the next
/// connection).
pub fn authorization(c: &Credentials) -> Result<Option<HeaderValue>, UpstreamError> {
    use base64::Engine as _;
    let value = if let Some(path) = &c.bearer_token_file {
        let token = read(path)?;
        let token = String::from_utf8_lossy(&token).trim().to_string();
        format!("Bearer {token}")
    } else if let (Some(user), Some(path)) = (&c.basic_user, &c.basic_password_file) {
        let pw = read(path)?;
        let pw = String::from_utf8_lossy(&pw);
        let pw = pw.trim_end_matches(['\r', '\n']);
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
        format!("Basic {b64}")
    } else {
        return Ok(None);
    };
    let path = c
        .bearer_token_file
        .clone()
        .or_else(|| c.basic_password_file.clone())
        .unwrap_or_default();
    let mut v = HeaderValue::from_str(&value).map_err(|_| UpstreamError::Header(path))?;
    v.set_sensitive(true);
    Ok(Some(v))
}

/// How the daemon reaches one flow's upstream.
pub struct Upstream {
    addr: SocketAddr,
    tls: Option<(Arc<ClientConfig>, Arc<ClientConfig>, ServerName<'static>)>,
    h2: Mutex<Option<http2::SendRequest<BoxBody>>>,
    h1: Mutex<Vec<http1::SendRequest<BoxBody>>>,
    /// An HTTP/1.1 connection made by [`Upstream::version`] and not used
    /// yet (it may not report ready until its task first runs).
    fresh: Mutex<Option<http1::SendRequest<BoxBody>>>,
    /// Serializes new connections so concurrent first requests share one
    /// HTTP/2 connection.
    connecting: tokio::sync::Mutex<()>,
    /// Cleartext HTTP/2 with prior knowledge (the agent spoke h2c).
    h2c: bool,
    /// Whether the cleartext upstream answered an HTTP/2 preface (probed
    /// once, on a connection that carries no request).
    h2c_ok: tokio::sync::OnceCell<bool>,
}

/// Which protocol a request goes upstream with (the URI form differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.1: origin-form URI and a Host header.
    H1,
    /// HTTP/2: absolute URI.
    H2,
}

impl Upstream {
    /// An upstream at `addr`. With `tls`, connections verify the server as
    /// `server_name` and offer h2 and http/1.1.
    pub fn new(addr: SocketAddr, tls: Option<(&Resource, &str)>) -> Result<Self, UpstreamError> {
        let tls = match tls {
            None => None,
            Some((resource, name)) => {
                let sn = ServerName::try_from(name.to_string())
                    .map_err(|_| UpstreamError::Name(name.to_string()))?;
                Some((
                    tls_config(resource, &[b"h2", b"http/1.1"])?,
                    tls_config(resource, &[b"http/1.1"])?,
                    sn,
                ))
            }
        };
        Ok(Self {
            addr,
            tls,
            h2: Mutex::new(None),
            h1: Mutex::new(Vec::new()),
            fresh: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            h2c: false,
            h2c_ok: tokio::sync::OnceCell::new(),
        })
    }

    /// With `on`, cleartext connections speak HTTP/2 with prior knowledge
    /// (RFC 9113 §3.3) instead of HTTP/1.1; TLS connections are unchanged
    /// (ALPN decides).
    pub fn h2c(mut self, on: bool) -> Self {
        self.h2c = on;
        self
    }

    /// The upstream address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    fn idle_h2(&self) -> Option<http2::SendRequest<BoxBody>> {
        let mut g = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        match &*g {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                *g = None;
                None
            }
            None => None,
        }
    }

    fn idle_h1(&self) -> Option<http1::SendRequest<BoxBody>> {
        let mut g = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|s| !s.is_closed());
        let i = g.iter().position(|s| s.is_ready())?;
        Some(g.swap_remove(i))
    }

    fn keep_h1(&self, s: http1::SendRequest<BoxBody>) {
        let mut g = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() < H1_IDLE_MAX {
            g.push(s);
        }
    }

    /// Which version the next (non-upgrade) request would use, connecting
    /// if there is no idle connection.
    pub async fn version(&self) -> Result<Version, UpstreamError> {
        if self.idle_h2().is_some() {
            return Ok(Version::H2);
        }
        {
            let g = self.h1.lock().unwrap_or_else(|p| p.into_inner());
            if g.iter().any(|s| s.is_ready()) {
                return Ok(Version::H1);
            }
        }
        if self
            .fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|s| !s.is_closed())
        {
            return Ok(Version::H1);
        }
        let _g = self.connecting.lock().await;
        if self.idle_h2().is_some() {
            return Ok(Version::H2);
        }
        match self.connect(false).await? {
            Conn::H2(s) => {
                *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                Ok(Version::H2)
            }
            Conn::H1(s) => {
                *self.fresh.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                Ok(Version::H1)
            }
        }
    }

    /// Sends `req` (already in the form [`Upstream::version`] said).
    pub async fn send(&self, req: Request<BoxBody>) -> Result<Response<Incoming>, UpstreamError> {
        if let Some(mut s) = self.idle_h2() {
            s.ready().await?;
            return Ok(s.send_request(req).await?);
        }
        let fresh = self
            .fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|s| !s.is_closed());
        let mut s = match fresh.or_else(|| self.idle_h1()) {
            Some(s) => s,
            None => match self.connect(false).await? {
                Conn::H1(s) => s,
                Conn::H2(mut s) => {
                    *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
                    s.ready().await?;
                    return Ok(s.send_request(req).await?);
                }
            },
        };
        s.ready().await?;
        let resp = s.send_request(req);
        // Back in the pool at once: it reports ready again when the
        // response body has been read.
        self.keep_h1(s);
        Ok(resp.await?)
    }

    /// Sends an upgrade request (WebSocket, Kubernetes exec) on a fresh
    /// HTTP/1.1 connection that may be taken over by the upgrade.
    pub async fn send_upgrade(
        &self,
        req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match self.connect(true).await? {
            Conn::H1(mut s) => {
                s.ready().await?;
                Ok(s.send_request(req).await?)
            }
            // Only http/1.1 was offered; a server choosing h2 anyway is
            // served as h2 (the upgrade then fails upstream, visibly).
            Conn::H2(mut s) => Ok(s.send_request(req).await?),
        }
    }

    async fn connect(&self, h1_only: bool) -> Result<Conn, UpstreamError> {
        let addr = self.addr;
        // An HTTP/1.1-only server (no h2c) is still served over HTTP/1.1.
        let h2c = self.tls.is_none()
            && self.h2c
            && !h1_only
            && *self.h2c_ok.get_or_init(|| speaks_h2c(addr)).await;
        let tcp = tokio::time::timeout(
            super::super::UPSTREAM_CONNECT_TIMEOUT,
            TcpStream::connect(addr),
        )
        .await
        .map_err(|_| UpstreamError::Connect {
            addr,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
        })?
        .map_err(|source| UpstreamError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None if h2c => Ok(Conn::H2(h2(TokioIo::new(tcp)).await?)),
            None => Ok(Conn::H1(h1(TokioIo::new(tcp)).await?)),
            Some((both, h1cfg, name)) => {
                let cfg = if h1_only { h1cfg } else { both };
                let connector = tokio_rustls::TlsConnector::from(cfg.clone());
                let hs = |source| UpstreamError::Handshake {
                    name: name_str(name),
                    source,
                };
                let tls =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| {
                            hs(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "timed out",
                            ))
                        })?
                        .map_err(hs)?;
                let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                if is_h2 {
                    Ok(Conn::H2(h2(TokioIo::new(tls)).await?))
                } else {
                    Ok(Conn::H1(h1(TokioIo::new(tls)).await?))
                }
            }
        }
    }
}

/// How long a cleartext upstream may take to answer an HTTP/2 preface.
const H2C_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the server at `addr` speaks HTTP/2 with prior knowledge: it
/// answers the client preface with a SETTINGS frame (an HTTP/1.1 server
/// answers 400/505 or closes). The probe connection carries no request.
async fn speaks_h2c(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let probe = async {
        let mut tcp = TcpStream::connect(addr).await.ok()?;
        tcp.write_all(PREFACE).await.ok()?;
        let mut head = [0u8; 9];
        tcp.read_exact(&mut head).await.ok()?;
        // Frame type 4 (SETTINGS) on stream 0.
        Some(head[3] == 4 && head[5..9] == [0, 0, 0, 0])
    };
    let ok = matches!(
        tokio::time::timeout(H2C_PROBE_TIMEOUT, probe).await,
        Ok(Some(true))
    );
    debug!(%addr, h2c = ok, "cleartext upstream probed for HTTP/2");
    ok
}

fn name_str(n: &ServerName<'_>) -> String {
    match n {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => "?".into(),
    }
}

enum Conn {
    H1(http1::SendRequest<BoxBody>),
    H2(http2::SendRequest<BoxBody>),
}

async fn h2<T>(io: TokioIo<T>) -> Result<http2::SendRequest<BoxBody>, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (s, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(io)
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!("upstream h2 connection ended: {e}");
        }
    });
    Ok(s)
}

async fn h1<T>(io: TokioIo<T>) -> Result<http1::SendRequest<BoxBody>, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (s, conn) = http1::Builder::new().handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!("upstream h1 connection ended: {e}");
        }
    });
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn h2c_is_probed_by_the_servers_answer_to_a_preface() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        async fn server(answer: &'static [u8]) -> SocketAddr {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 24];
                let _ = s.read_exact(&mut buf).await;
                let _ = s.write_all(answer).await;
            });
            addr
        }
        let h2 = server(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00").await;
        assert!(speaks_h2c(h2).await);
        let h1 = server(b"HTTP/1.1 505 HTTP Version Not Supported\r\n\r\n").await;
        assert!(!speaks_h2c(h1).await);
        let closed = server(b"").await;
        assert!(!speaks_h2c(closed).await);
    }

    #[test]
    fn credentials_become_authorization_headers() {
        let dir = crate::testutil::TempDir::new("http", "creds");
        let tok = dir.path().join("tok");
        std::fs::write(&tok, "s3cret-token\n").unwrap();
        let c = Credentials {
            bearer_token_file: Some(tok),
            ..Default::default()
        };
        let v = authorization(&c).unwrap().unwrap();
        assert_eq!(v.to_str().unwrap(), "Bearer s3cret-token");
        assert!(v.is_sensitive());
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "hunter2\n").unwrap();
        let c = Credentials {
            basic_user: Some("bob".into()),
            basic_password_file: Some(pw),
            ..Default::default()
        };
        let v = authorization(&c).unwrap().unwrap();
        assert_eq!(v.to_str().unwrap(), "Basic Ym9iOmh1bnRlcjI=");
        assert!(authorization(&Credentials::default()).unwrap().is_none());
        let c = Credentials {
            bearer_token_file: Some(dir.path().join("missing")),
            ..Default::default()
        };
        assert!(matches!(authorization(&c), Err(UpstreamError::File { .. })));
    }
}
