//! The upstream side of an HTTP resource: verified TLS (the resource's CA
//! file or the system roots), credentials the daemon holds (bearer token,
//! basic, client certificate) and the daemon's pool of kept-alive upstream
//! connections ([`Pool`]): one [`Upstream`] per resource, upstream address,
//! verified server name and client certificate, shared by the agent
//! connections to that resource, holding one multiplexed HTTP/2 connection
//! or up to [`H1_IDLE_MAX`] idle HTTP/1.1 ones and one TLS client
//! configuration (so TLS sessions are resumed). A pooled connection is never
//! shared across resources or upstream credentials; an HTTP/1.1 connection
//! goes back to the pool only once its response has been read to the end;
//! a request is retried on another connection only when hyper hands it
//! back unwritten (the pooled connection had died).
//!
//! Owns connecting and sending. It must not decide, mask or record.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock, Weak},
    time::{Duration, Instant},
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

/// Idle HTTP/1.1 upstream connections kept per pool entry.
pub const H1_IDLE_MAX: usize = 64;
/// Pool entries (resource, address, server name, client certificate)
/// kept at once; past it the oldest unused ones go.
pub const POOL_ENTRIES_MAX: usize = 256;
/// How long a pool entry serves new agent connections before it is made
/// again (its CA and client certificate files read again, as a daemon
/// restart would).
pub const POOL_ENTRY_TTL: Duration = Duration::from_secs(60);
/// An idle HTTP/1.1 connection unused this long is closed rather than
/// reused (servers close theirs after 5 to 75 seconds).
pub const H1_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at a request whose pooled connection died before it was
/// written (each on another connection).
const SEND_ATTEMPTS: usize = 3;
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

/// What a pooled connection is bound to: connections are shared only
/// between requests that agree on all of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    resource: String,
    addr: SocketAddr,
    /// The server name verified (TLS), `None` in cleartext.
    tls_name: Option<String>,
    /// Cleartext HTTP/2 with prior knowledge.
    h2c: bool,
    /// The files the TLS configuration is made of, by path and content
    /// (SHA-256): a resource whose CA or client certificate changes (a
    /// reload, or the file rewritten in place) gets new connections made
    /// with the new files, as a new agent connection always did.
    tls_files: Vec<(PathBuf, [u8; 32])>,
    /// The connection worker ([`crate::workers`]) whose sessions use it:
    /// a pooled connection's task runs on the worker that made it, so
    /// sharing it across workers would hand every request and response
    /// to another thread.
    worker: Option<usize>,
}

/// Path and content digest of each file a TLS configuration is made of.
fn tls_files(resource: &Resource) -> Result<Vec<(PathBuf, [u8; 32])>, UpstreamError> {
    use sha2::Digest as _;
    let c = &resource.credentials;
    [
        &resource.upstream_ca_file,
        &c.client_cert_file,
        &c.client_key_file,
    ]
    .into_iter()
    .flatten()
    .map(|path| Ok((path.clone(), sha2::Sha256::digest(read(path)?).into())))
    .collect()
}

/// The daemon's kept-alive upstream connections, by resource, upstream
/// address, verified server name and client certificate. Bounded: at most
/// [`POOL_ENTRIES_MAX`] entries of at most [`H1_IDLE_MAX`] idle HTTP/1.1
/// connections (or one HTTP/2 connection) each.
#[derive(Default)]
pub struct Pool {
    entries: Mutex<HashMap<PoolKey, Arc<Upstream>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.lock().map(|g| g.len()).unwrap_or(0);
        f.debug_struct("Pool").field("entries", &n).finish()
    }
}

impl Pool {
    /// The pooled upstream of `resource` at `addr`: with `tls_name`,
    /// connections verify the server as that name (the resource's CA file
    /// or the system roots, its client certificate); `h2c` makes cleartext
    /// connections speak HTTP/2 with prior knowledge. Called once per agent
    /// connection; with TLS it reads the resource's CA and certificate
    /// files, so a changed file is in force for the next agent connection.
    pub fn get(
        &self,
        resource: &Resource,
        addr: SocketAddr,
        tls_name: Option<&str>,
        h2c: bool,
    ) -> Result<Arc<Upstream>, UpstreamError> {
        let key = PoolKey {
            resource: resource.name.clone(),
            addr,
            tls_name: tls_name.map(str::to_string),
            h2c: tls_name.is_none() && h2c,
            tls_files: match tls_name {
                Some(_) => tls_files(resource)?,
                None => Vec::new(),
            },
            worker: crate::workers::current(),
        };
        let mut g = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = g.get(&key) {
            if u.created.elapsed() < POOL_ENTRY_TTL {
                return Ok(u.clone());
            }
        }
        let tls = tls_name.map(|name| (resource, name));
        let u = Upstream::new(addr, tls)?.h2c(key.h2c).shared();
        if g.len() >= POOL_ENTRIES_MAX {
            // Entries nobody holds and past their time go first, then the
            // oldest: a flow holding one keeps using it either way.
            g.retain(|_, u| Arc::strong_count(u) > 1 || u.created.elapsed() < POOL_ENTRY_TTL);
            while g.len() >= POOL_ENTRIES_MAX {
                let Some(oldest) = g
                    .iter()
                    .min_by_key(|(_, u)| u.created)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                g.remove(&oldest);
            }
        }
        g.insert(key, u.clone());
        Ok(u)
    }

    /// Entries in the pool now.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An idle HTTP/1.1 connection and since when.
struct Idle {
    send: http1::SendRequest<BoxBody>,
    since: Instant,
}

/// How the daemon reaches one upstream (a [`Pool`] entry).
pub struct Upstream {
    addr: SocketAddr,
    tls: Option<(Arc<ClientConfig>, Arc<ClientConfig>, ServerName<'static>)>,
    h2: Mutex<Option<http2::SendRequest<BoxBody>>>,
    /// Idle HTTP/1.1 connections, most recently used last; each is ready
    /// for a request (its last response was read to the end).
    h1: Mutex<Vec<Idle>>,
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
    /// When this entry was made.
    created: Instant,
    /// Connections opened so far (upgrades included).
    opened: std::sync::atomic::AtomicU64,
    /// Weak self, for handing an HTTP/1.1 connection back once its
    /// response has been read.
    me: Weak<Upstream>,
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
            created: Instant::now(),
            opened: std::sync::atomic::AtomicU64::new(0),
            me: Weak::new(),
        })
    }

    /// With `on`, cleartext connections speak HTTP/2 with prior knowledge
    /// (RFC 9113 §3.3) instead of HTTP/1.1; TLS connections are unchanged
    /// (ALPN decides).
    pub fn h2c(mut self, on: bool) -> Self {
        self.h2c = on;
        self
    }

    /// Shares this upstream; only a shared one hands its HTTP/1.1
    /// connections back for reuse.
    pub fn shared(self) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            ..self
        })
    }

    /// The upstream address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connections opened so far.
    pub fn opened(&self) -> u64 {
        self.opened.load(std::sync::atomic::Ordering::Relaxed)
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

    /// The most recently used idle connection still open and not idle for
    /// too long (the others are dropped, which closes them).
    fn idle_h1(&self) -> Option<http1::SendRequest<BoxBody>> {
        let mut g = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(idle) = g.pop() {
            if idle.send.is_ready() && idle.since.elapsed() < H1_IDLE_TIMEOUT {
                return Some(idle.send);
            }
        }
        None
    }

    fn keep_h1(&self, send: http1::SendRequest<BoxBody>) {
        let mut g = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() >= H1_IDLE_MAX {
            // The least recently used goes (closing it).
            g.remove(0);
        }
        g.push(Idle {
            send,
            since: Instant::now(),
        });
    }

    /// Hands an HTTP/1.1 connection back to the pool once it can take
    /// another request: when the response has been read to the end (and
    /// the request body written). A connection that closes instead (the
    /// server's `Connection: close`, an error, the agent hanging up
    /// mid-body) is dropped.
    fn recycle(&self, mut send: http1::SendRequest<BoxBody>) {
        let me = self.me.clone();
        tokio::spawn(async move {
            if send.ready().await.is_ok() {
                if let Some(u) = me.upgrade() {
                    u.keep_h1(send);
                }
            }
        });
    }

    /// Which version the next (non-upgrade) request would use, connecting
    /// if there is no idle connection.
    pub async fn version(&self) -> Result<Version, UpstreamError> {
        if self.idle_h2().is_some() {
            return Ok(Version::H2);
        }
        if !self.h1.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            return Ok(Version::H1);
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
        match Box::pin(self.connect(false)).await? {
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

    /// Sends `req` (already in the form [`Upstream::version`] said) on a
    /// pooled connection, or a new one when none is idle. A request the
    /// connection hands back unwritten (it died while pooled) is sent
    /// again on another; one that may have been written is never resent.
    pub async fn send(&self, req: Request<BoxBody>) -> Result<Response<Incoming>, UpstreamError> {
        let mut req = req;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt >= SEND_ATTEMPTS;
            let sent = match self.checkout().await? {
                Conn::H2(mut s) => {
                    // A connection that will not take a request has not
                    // been given this one.
                    if let Err(e) = s.ready().await {
                        self.drop_h2(&s);
                        if last {
                            return Err(e.into());
                        }
                        continue;
                    }
                    match s.try_send_request(req).await {
                        Ok(r) => return Ok(r),
                        Err(e) => {
                            self.drop_h2(&s);
                            e
                        }
                    }
                }
                Conn::H1(mut s) => {
                    if let Err(e) = s.ready().await {
                        if last {
                            return Err(e.into());
                        }
                        continue;
                    }
                    match s.try_send_request(req).await {
                        Ok(r) => {
                            self.recycle(s);
                            return Ok(r);
                        }
                        Err(e) => e,
                    }
                }
            };
            let mut e = sent;
            match e.take_message() {
                Some(back) if !last => {
                    debug!(addr = %self.addr, "pooled upstream connection closed before the request was written; sending it on another");
                    req = back;
                }
                _ => return Err(e.into_error().into()),
            }
        }
    }

    /// A connection for the next request: the multiplexed HTTP/2 one, the
    /// one [`Upstream::version`] made, an idle HTTP/1.1 one, or a new one.
    async fn checkout(&self) -> Result<Conn, UpstreamError> {
        if let Some(s) = self.idle_h2() {
            return Ok(Conn::H2(s));
        }
        let fresh = self
            .fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|s| !s.is_closed());
        if let Some(s) = fresh.or_else(|| self.idle_h1()) {
            return Ok(Conn::H1(s));
        }
        match Box::pin(self.connect(false)).await? {
            Conn::H2(s) => {
                *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
                Ok(Conn::H2(s))
            }
            h1 => Ok(h1),
        }
    }

    /// Forgets the HTTP/2 connection `s` if it is still the pooled one.
    fn drop_h2(&self, s: &http2::SendRequest<BoxBody>) {
        if s.is_closed() {
            let mut g = self.h2.lock().unwrap_or_else(|p| p.into_inner());
            if g.as_ref().is_some_and(|c| c.is_closed()) {
                *g = None;
            }
        }
    }

    /// Sends an upgrade request (WebSocket, Kubernetes exec) on a fresh
    /// HTTP/1.1 connection that may be taken over by the upgrade.
    pub async fn send_upgrade(
        &self,
        req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match Box::pin(self.connect(true)).await? {
            Conn::H1(mut s) => {
                s.ready().await?;
                Ok(s.send_request(req).await?)
            }
            // Only http/1.1 was offered; a server choosing h2 anyway is
            // served as h2 (the upgrade then fails upstream, visibly).
            Conn::H2(mut s) => Ok(s.send_request(req).await?),
        }
    }

    /// A new connection. Callers box its future: it holds a TLS and an
    /// HTTP handshake, many times the size of a pooled request's, and
    /// [`Upstream::send`]'s future is part of every request's.
    async fn connect(&self, h1_only: bool) -> Result<Conn, UpstreamError> {
        let addr = self.addr;
        self.opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    use http_body_util::{BodyExt as _, Empty};

    fn resource(name: &str) -> Resource {
        Resource {
            name: name.into(),
            protocol: crate::policy::Protocol::Http,
            kind: "generic".into(),
            matches: Vec::new(),
            upstream: None,
            record: Default::default(),
            approval_timeout: Duration::from_secs(60),
            credentials: Credentials::default(),
            tls: None,
            agent_token: Default::default(),
            upstream_ca_file: None,
            known_hosts: None,
            host_ca: None,
            postgres: Default::default(),
            host_key_file: None,
            host_certificate_file: None,
            mcp_tools: Default::default(),
        }
    }

    /// An HTTP/1.1 server on loopback answering every request `200 ok`;
    /// with `close_after_each`, it closes each connection after its first
    /// answer without saying so (a kept-alive connection dying while
    /// pooled). Counts connections.
    async fn origin(close_after_each: bool) -> (SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await
                                .is_err()
                            {
                                return;
                            }
                            if close_after_each {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    fn get() -> Request<BoxBody> {
        let mut r = Request::new(
            Empty::<Bytes>::new()
                .map_err(|e| -> BoxError { match e {} })
                .boxed_unsync(),
        );
        *r.uri_mut() = "/".parse().unwrap();
        r.headers_mut()
            .insert(hyper::header::HOST, HeaderValue::from_static("origin"));
        r
    }

    async fn send_and_read(u: &Upstream) -> Vec<u8> {
        assert_eq!(u.version().await.unwrap(), Version::H1);
        let resp = u.send(get()).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        // Let the connection's task see the end and hand it back.
        for _ in 0..100 {
            if !u.h1.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        body.to_vec()
    }

    /// A pooled connection's task runs on the worker that made it, so each
    /// connection worker has its own entries: a session never sends its
    /// requests through another thread's connection.
    #[tokio::test]
    async fn pool_entries_are_per_connection_worker() {
        let pool = Arc::new(Pool::default());
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let here = pool.get(&resource("a"), addr, None, false).unwrap();
        let workers = crate::workers::Workers::start(2, "test-pool").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let (pool, tx) = (pool.clone(), tx.clone());
            workers
                .submit(Box::new(move || {
                    let u = pool.get(&resource("a"), addr, None, false).unwrap();
                    let _ = tx.send((crate::workers::current(), u));
                }))
                .await;
        }
        let got: Vec<_> = (0..4)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        for (w, u) in &got {
            assert!(w.is_some() && !Arc::ptr_eq(u, &here));
            for (w2, u2) in &got {
                assert_eq!(w == w2, Arc::ptr_eq(u, u2), "{w:?} {w2:?}");
            }
        }
        assert_eq!(pool.len(), 3);
        tokio::task::spawn_blocking(move || workers.stop())
            .await
            .unwrap();
    }

    #[test]
    fn pool_entries_are_per_resource_address_and_name() {
        let pool = Pool::default();
        let a = resource("a");
        let b = resource("b");
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let a1 = pool.get(&a, addr, None, false).unwrap();
        assert!(Arc::ptr_eq(&a1, &pool.get(&a, addr, None, false).unwrap()));
        assert!(!Arc::ptr_eq(&a1, &pool.get(&b, addr, None, false).unwrap()));
        assert!(!Arc::ptr_eq(
            &a1,
            &pool.get(&a, other, None, false).unwrap()
        ));
        assert!(!Arc::ptr_eq(&a1, &pool.get(&a, addr, None, true).unwrap()));
        let t1 = pool.get(&a, addr, Some("one.example"), false).unwrap();
        assert!(t1.is_tls() && !Arc::ptr_eq(&a1, &t1));
        assert!(!Arc::ptr_eq(
            &t1,
            &pool.get(&a, addr, Some("two.example"), false).unwrap()
        ));
        // A CA file rewritten in place is another entry.
        let dir = crate::testutil::TempDir::new("http", "pool-ca");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, rcgen_ca_pem()).unwrap();
        let mut with_ca = resource("a");
        with_ca.upstream_ca_file = Some(ca.clone());
        let c1 = pool
            .get(&with_ca, addr, Some("one.example"), false)
            .unwrap();
        assert!(Arc::ptr_eq(
            &c1,
            &pool
                .get(&with_ca, addr, Some("one.example"), false)
                .unwrap()
        ));
        std::fs::write(&ca, rcgen_ca_pem()).unwrap();
        let c2 = pool
            .get(&with_ca, addr, Some("one.example"), false)
            .unwrap();
        assert!(!Arc::ptr_eq(&c1, &c2));
        // Another client certificate is another entry.
        let mut cert = resource("a");
        cert.credentials.client_cert_file = Some("/nonexistent/c.pem".into());
        cert.credentials.client_key_file = Some("/nonexistent/c.key".into());
        assert!(pool.get(&cert, addr, Some("one.example"), false).is_err());
        assert!(Arc::ptr_eq(
            &t1,
            &pool.get(&a, addr, Some("one.example"), false).unwrap()
        ));
        assert_eq!(pool.len(), 8);
    }

    /// A fresh self-signed CA certificate, PEM.
    fn rcgen_ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[tokio::test]
    async fn http1_connections_are_kept_alive_and_reused() {
        let (addr, conns) = origin(false).await;
        let pool = Pool::default();
        let u = pool.get(&resource("r"), addr, None, false).unwrap();
        for _ in 0..5 {
            assert_eq!(send_and_read(&u).await, b"ok");
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(u.opened(), 1);
    }

    #[tokio::test]
    async fn a_connection_that_died_while_pooled_is_not_used() {
        let (addr, conns) = origin(true).await;
        let pool = Pool::default();
        let u = pool.get(&resource("r"), addr, None, false).unwrap();
        for _ in 0..4 {
            assert_eq!(send_and_read(&u).await, b"ok");
            // The origin's close has long arrived when the next request
            // comes: the pooled connection is known dead, never written to.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

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
