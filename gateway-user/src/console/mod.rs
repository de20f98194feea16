//! The review console: a web page on the daemon where reviewers answer
//! access requests, watch and end sessions, replay recordings, revoke
//! grants and read the audit log with its verification status.
//!
//! Owns the console's HTTPS listener, sign-in (OIDC authorization code +
//! PKCE against an issuer of the policies, see [`oidc`]), reviewer sessions
//! (cookie `Secure; HttpOnly; SameSite=Strict`, a CSRF token checked on
//! every POST) and rendering. Who may do what is Cedar
//! ([`crate::policy::PolicySet::decide_reviewer`]); every decision taken here
//! is audited with the reviewer's OIDC subject as the approver. It must not
//! decide agents' commands nor touch the data path: it answers requests
//! through [`crate::jit`] and ends sessions through the session table, as
//! the admin socket does.

mod assets;
mod client;
mod oidc;
mod once;
mod pages;
mod render;
mod search;
mod web;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use http_body_util::{BodyExt, Limited};
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    audit::{AuditEvent, IdentityRef},
    daemon::Shared,
    policy::{PolicySet, Requester, ReviewRequest, ReviewTarget},
    proxy::http::ca::LocalCa,
};
use web::Body;

/// The `[console]` table of the daemon's config file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Where the HTTPS listener binds (`127.0.0.1:15030`).
    pub listen: SocketAddr,
    /// The `[issuer.NAME]` of the policies reviewers sign in with.
    pub issuer: String,
    /// The console's OAuth client id (the ID tokens' audience).
    pub client_id: String,
    /// File holding the client secret (confidential client); without it
    /// the console is a public client (PKCE only).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// The redirect URL registered at the provider; its path is the
    /// callback (`https://host:15030/auth/callback`).
    pub redirect_url: String,
    /// Certificate chain (PEM); default: a leaf from the daemon's CA for the
    /// redirect URL's host.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// How long a sign-in lasts (default 8h).
    #[serde(default)]
    pub session_ttl: Option<String>,
    /// For demos only: the reviewer subject a one-time link signs in as
    /// (no OIDC provider involved). Off by default; refused unless
    /// `listen` is a loopback address.
    #[serde(default)]
    pub demo_sign_in: Option<String>,
}

impl ConsoleConfig {
    /// Checks what does not need the policies or the network: a one-time
    /// demo sign-in only on a loopback listener, for a named reviewer.
    pub fn check(&self) -> Result<(), String> {
        if let Some(who) = &self.demo_sign_in {
            if who.trim().is_empty() || who.chars().any(char::is_control) {
                return Err("[console] demo_sign_in must name a reviewer subject".into());
            }
            if !self.listen.ip().is_loopback() {
                return Err(format!(
                    "[console] demo_sign_in is for demos on one machine: it needs a loopback \
                     `listen` address, not {}",
                    self.listen
                ));
            }
        }
        Ok(())
    }
}

/// The session cookie. `__Host-`: browsers accept it only with `Secure`,
/// `Path=/` and no `Domain`.
const SESSION_COOKIE: &str = "__Host-portcullis";
/// The cookie binding a sign-in in progress to the browser that started it.
const LOGIN_COOKIE: &str = "__Host-portcullis-login";
/// Sign-ins in progress kept at most (oldest dropped first).
const MAX_LOGINS: usize = 1024;
/// How long a sign-in may take at the provider.
const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Reviewer sessions kept at most.
const MAX_SESSIONS: usize = 4096;
/// Largest POST body.
const MAX_FORM: usize = 16 * 1024;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;

struct Login {
    nonce: String,
    verifier: String,
    created: Instant,
}

/// A signed-in reviewer.
#[derive(Clone)]
pub(crate) struct Reviewer {
    /// OIDC subject: `Reviewer::"<subject>"`, and the approver in the log.
    pub subject: String,
    /// The issuer's URL.
    pub issuer: String,
    /// This session's CSRF token.
    pub csrf: String,
    /// The browser's address on this request (`context.client.address`).
    pub client: String,
    /// The console's listen address (`context.destination`).
    pub destination: String,
    expires: Instant,
}

#[derive(Default)]
struct Auth {
    logins: HashMap<String, Login>,
    sessions: HashMap<String, Reviewer>,
}

struct State {
    cfg: ConsoleConfig,
    secret: Option<String>,
    callback_path: String,
    origin: String,
    session_ttl: Duration,
    auth: Mutex<Auth>,
    provider: Mutex<Option<Arc<oidc::Provider>>>,
    /// `[console] demo_sign_in`'s reviewer and the daemon's one-time token.
    one_time: Option<(String, Mutex<once::OneTime>)>,
}

#[derive(Debug)]
struct CaLeaf {
    ca: Arc<LocalCa>,
    name: String,
}

impl ResolvesServerCert for CaLeaf {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // Asked per handshake: the CA caches leaves and mints a new one
        // before the old expires.
        match self.ca.leaf(&self.name) {
            Ok(k) => Some(k),
            Err(e) => {
                warn!("console certificate for {}: {e}", self.name);
                None
            }
        }
    }
}

/// A bound console, ready to serve.
pub struct Console {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
}

impl Console {
    /// Checks the configuration, prepares TLS and binds the listener.
    pub async fn bind(cfg: &ConsoleConfig, ca: Arc<LocalCa>) -> anyhow::Result<Self> {
        cfg.check().map_err(anyhow::Error::msg)?;
        let one_time = match &cfg.demo_sign_in {
            Some(who) => Some((
                who.clone(),
                Mutex::new(
                    once::OneTime::generate(once::ONE_TIME_TTL)
                        .context("[console] demo_sign_in: reading the kernel's RNG")?,
                ),
            )),
            None => None,
        };
        if cfg.client_id.is_empty() {
            anyhow::bail!("[console] client_id is empty");
        }
        let redirect = client::target(&cfg.redirect_url)
            .map_err(|e| anyhow::anyhow!("[console] redirect_url: {e}"))?;
        if !redirect.https {
            anyhow::bail!("[console] redirect_url must be https (the console serves HTTPS only)");
        }
        let callback_path = redirect
            .path
            .split('?')
            .next()
            .unwrap_or("/auth/callback")
            .to_string();
        let secret = match &cfg.client_secret_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("[console] client_secret_file {}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let session_ttl = match &cfg.session_ttl {
            Some(s) => crate::policy::parse_duration(s)
                .map_err(|e| anyhow::anyhow!("[console] session_ttl: {e}"))?,
            None => Duration::from_secs(8 * 3600),
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth();
        let mut tls = match (&cfg.cert_file, &cfg.key_file) {
            (Some(cert), Some(key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .with_context(|| format!("[console] cert_file {}", cert.display()))?
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("[console] cert_file {}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .with_context(|| format!("[console] key_file {}", key.display()))?;
                builder.with_single_cert(chain, key)?
            }
            (None, None) => {
                ca.leaf(&redirect.host)
                    .with_context(|| format!("[console] a leaf for {}", redirect.host))?;
                builder.with_cert_resolver(Arc::new(CaLeaf {
                    ca,
                    name: redirect.host.clone(),
                }))
            }
            _ => anyhow::bail!("[console] cert_file and key_file go together"),
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("[console] binding {}", cfg.listen))?;
        let origin = format!("https://{}", redirect.authority);
        Ok(Self {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            state: Arc::new(State {
                cfg: cfg.clone(),
                secret,
                callback_path,
                origin,
                session_ttl,
                auth: Mutex::new(Auth::default()),
                provider: Mutex::new(None),
                one_time,
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// With `demo_sign_in`: writes the one-time link to
    /// `<state_dir>/console-sign-in` (mode 0600) and returns its path.
    pub fn publish_one_time_sign_in(
        &self,
        state_dir: &std::path::Path,
    ) -> anyhow::Result<Option<PathBuf>> {
        let Some((who, slot)) = &self.state.one_time else {
            return Ok(None);
        };
        let link = format!(
            "{}/login/once?token={}",
            self.state.origin,
            slot.lock().unwrap_or_else(|p| p.into_inner()).token()
        );
        let path = once::write_link(state_dir, &link).with_context(|| {
            format!(
                "writing the one-time sign-in link in {}",
                state_dir.display()
            )
        })?;
        warn!(
            reviewer = %who,
            file = %path.display(),
            "review console: demo_sign_in is on; a one-time sign-in link (single use, 15 minutes) is in the file"
        );
        Ok(Some(path))
    }

    /// Serves until the daemon stops.
    pub async fn run(self, shared: Arc<Shared>) {
        info!(listen = %self.state.cfg.listen, issuer = %self.state.cfg.issuer, "review console listening");
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!("console accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue; // dropped: too many at once
            };
            let acceptor = self.acceptor.clone();
            let state = self.state.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => s,
                    _ => return,
                };
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    let shared = shared.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(handle(&state, &shared, peer, req).await)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(tls), service);
                // A connection lives at most this long (no slow-loris hold).
                let _ = tokio::time::timeout(Duration::from_secs(300), conn).await;
            });
        }
    }
}

impl State {
    fn provider(&self, policy: &PolicySet) -> Result<Arc<oidc::Provider>, oidc::SignInError> {
        let issuer = policy.issuers.get(&self.cfg.issuer).ok_or_else(|| {
            oidc::SignInError::Config(format!(
                "issuer `{}` is not defined in the policy set",
                self.cfg.issuer
            ))
        })?;
        let mut slot = self.provider.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = &*slot {
            if &p.issuer == issuer {
                return Ok(p.clone());
            }
        }
        let p = Arc::new(oidc::Provider::new(issuer, &self.cfg.client_id)?);
        *slot = Some(p.clone());
        Ok(p)
    }

    fn reviewer(&self, req: &Request<Incoming>) -> Option<(String, Reviewer)> {
        let id = cookie_of(req, SESSION_COOKIE)?;
        let mut auth = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        let r = auth.sessions.get(&id)?.clone();
        if r.expires <= Instant::now() {
            auth.sessions.remove(&id);
            return None;
        }
        Some((id, r))
    }
}

fn cookie_of(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| web::cookie(h, name).map(str::to_string))
}

fn session_cookie(value: &str, max_age: u64) -> String {
    format!(
        "{SESSION_COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    )
}

async fn handle(
    st: &State,
    shared: &Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == st.callback_path {
        return callback(st, shared, req).await;
    }
    if path == "/login/once" && st.one_time.is_some() {
        return one_time_sign_in(st, shared, peer, &req).await;
    }
    let Some((sid, mut reviewer)) = st.reviewer(&req) else {
        return match *req.method() {
            Method::GET | Method::HEAD => start_login(st, shared).await,
            _ => error_page(
                StatusCode::FORBIDDEN,
                "Sign in first: this request carries no console session.",
            ),
        };
    };
    reviewer.client = peer.to_string();
    if req.method() == Method::POST {
        return post(st, shared, req, &path, &sid, &reviewer).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error_page(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed.");
    }
    let query = req.uri().query().unwrap_or("");
    let Some(q) = web::parse_form(query) else {
        return error_page(StatusCode::BAD_REQUEST, "Malformed query string.");
    };
    let policy = shared.policy.load();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segs.as_slice() {
        [""] => web::redirect(StatusCode::SEE_OTHER, "/requests", &[]),
        ["static", _] if assets::lookup(&path).is_some() => match assets::lookup(&path) {
            Some((ct, bytes)) => web::immutable_asset(ct, bytes),
            None => error_page(StatusCode::NOT_FOUND, "No such asset."),
        },
        ["static", "console.css"] => web::asset("text/css; charset=utf-8", pages::CSS.as_bytes()),
        ["static", "console.js"] => {
            web::asset("text/javascript; charset=utf-8", pages::JS.as_bytes())
        }
        ["requests"] => web::html(
            StatusCode::OK,
            pages::requests(shared, &policy, &reviewer, &q),
        ),
        ["sessions"] => web::html(
            StatusCode::OK,
            pages::sessions(shared, &policy, &reviewer, &q),
        ),
        ["sessions", id] => match pages::replay(shared, &policy, &reviewer, id) {
            Ok((page, true)) => web::html_with_player(StatusCode::OK, page),
            Ok((page, false)) => web::html(StatusCode::OK, page),
            Err((status, msg)) => error_page(status, &msg),
        },
        ["sessions", id, "cast", n] => match pages::cast(shared, &policy, &reviewer, id, n) {
            Ok(text) => web::asciicast(text),
            Err((status, msg)) => error_page(status, &msg),
        },
        ["grants"] => web::html(StatusCode::OK, pages::grants(shared, &policy, &reviewer)),
        ["events"] => live_events(shared),
        ["audit"] => {
            if let Err(why) = may(
                &policy,
                &reviewer,
                "console:audit",
                ReviewTarget::Console,
                None,
            ) {
                return refused(shared, &reviewer, "console:audit", "audit", &why).await;
            }
            let page = pages::audit(shared, &reviewer, &q).await;
            web::html(StatusCode::OK, page)
        }
        _ => error_page(StatusCode::NOT_FOUND, "No such page."),
    }
}

/// Server-sent events: a `jit` event whenever a request or grant changes
/// (no content: the page reloads and shows what this reviewer may see), and
/// a comment every 15 s so proxies keep the stream open.
fn live_events(shared: &Arc<Shared>) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut jit = shared.jit.subscribe();
    let held = shared.clone();
    let fleet = shared.fleet.is_some();
    let stop = shared.shutdown.clone();
    tokio::spawn(async move {
        if tx
            .send(bytes::Bytes::from_static(b": connected\n\n"))
            .await
            .is_err()
        {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(15));
        // Requests of other fleet nodes are mirrored by the fleet sync
        // without an event: a poll of the queue's digest notices them.
        let mut fleet_poll = tokio::time::interval(crate::fleet::POLL_EVERY);
        let mut seen = fleet.then(|| queue_digest(&held.jit));
        loop {
            let msg: &'static [u8] = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                _ = tick.tick() => b": keepalive\n\n",
                _ = fleet_poll.tick(), if fleet => {
                    let now = queue_digest(&held.jit);
                    if seen == Some(now) {
                        continue;
                    }
                    seen = Some(now);
                    b"event: jit\ndata: changed\n\n"
                }
                ev = jit.recv() => match ev {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => b"event: jit\ndata: changed\n\n",
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx.send(bytes::Bytes::from_static(msg)).await.is_err() {
                return;
            }
        }
    });
    web::events(web::EventStream(rx))
}

/// What the Requests page depends on: each request's id and state.
fn queue_digest(jit: &crate::jit::Jit) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for r in jit.requests() {
        r.id.hash(&mut h);
        r.status.label().hash(&mut h);
    }
    h.finish()
}

/// Sends the browser to the provider, remembering the sign-in's state,
/// nonce and PKCE verifier (bound to this browser by a cookie).
async fn start_login(st: &State, shared: &Arc<Shared>) -> Response<Body> {
    let policy = shared.policy.load();
    let provider = match st.provider(&policy) {
        Ok(p) => p,
        Err(e) => return error_page(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let state = oidc::random_token(32);
    let nonce = oidc::random_token(32);
    let verifier = oidc::random_token(32);
    let url = match provider
        .authorize_url(
            &st.cfg.client_id,
            &st.cfg.redirect_url,
            &state,
            &nonce,
            &verifier,
        )
        .await
    {
        Ok(u) => u,
        Err(e) => return error_page(StatusCode::BAD_GATEWAY, &e.to_string()),
    };
    {
        let mut auth = st.auth.lock().unwrap_or_else(|p| p.into_inner());
        auth.logins.retain(|_, l| l.created.elapsed() < LOGIN_TTL);
        while auth.logins.len() >= MAX_LOGINS {
            let oldest = auth
                .logins
                .iter()
                .min_by_key(|(_, l)| l.created)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => auth.logins.remove(&k),
                None => break,
            };
        }
        auth.logins.insert(
            state.clone(),
            Login {
                nonce,
                verifier,
                created: Instant::now(),
            },
        );
    }
    // Lax, not Strict: the provider's redirect back is a cross-site
    // top-level navigation, and this cookie must come with it.
    let cookie = format!(
        "{LOGIN_COOKIE}={state}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={}",
        LOGIN_TTL.as_secs()
    );
    web::redirect(StatusCode::FOUND, &url, &[cookie])
}

/// A new console session for a signed-in reviewer: its id (the cookie's
/// value) and the reviewer. `None` when [`MAX_SESSIONS`] live sessions
/// exist already.
fn open_session(st: &State, subject: String, issuer: String) -> Option<(String, Reviewer)> {
    let sid = oidc::random_token(32);
    let reviewer = Reviewer {
        subject,
        issuer,
        csrf: oidc::random_token(32),
        client: String::new(),
        destination: st.cfg.listen.to_string(),
        expires: Instant::now() + st.session_ttl,
    };
    let mut auth = st.auth.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    auth.sessions.retain(|_, r| r.expires > now);
    if auth.sessions.len() >= MAX_SESSIONS {
        return None;
    }
    auth.sessions.insert(sid.clone(), reviewer.clone());
    Some((sid, reviewer))
}

/// The page for a sign-in that found the console full.
fn too_many_sessions() -> Response<Body> {
    error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Too many console sessions.",
    )
}

async fn callback(st: &State, shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let q = web::parse_form(req.uri().query().unwrap_or("")).unwrap_or_default();
    let fail = |why: String| async move {
        warn!("console sign-in refused: {why}");
        let ev = AuditEvent::new("console_sign_in")
            .decision("deny")
            .reason(why.clone());
        if let Err(e) = shared.audit(ev).await {
            warn!("audit record of a refused sign-in failed: {e}");
        }
        error_page(StatusCode::FORBIDDEN, &format!("Sign-in refused: {why}"))
    };
    if let Some(err) = q.get("error") {
        return fail(format!("the provider said {}", web::clip(err, 80))).await;
    }
    let (Some(state), Some(code)) = (q.get("state"), q.get("code")) else {
        return fail("no code or state in the callback".into()).await;
    };
    let bound = cookie_of(&req, LOGIN_COOKIE);
    if bound.as_deref().is_none_or(|b| !web::same_secret(b, state)) {
        return fail("state does not match this browser's sign-in".into()).await;
    }
    let login = st
        .auth
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .logins
        .remove(state.as_str());
    let Some(login) = login.filter(|l| l.created.elapsed() < LOGIN_TTL) else {
        return fail("unknown, used or expired state".into()).await;
    };
    let policy = shared.policy.load();
    let provider = match st.provider(&policy) {
        Ok(p) => p,
        Err(e) => return fail(e.to_string()).await,
    };
    let claims = match provider
        .redeem(
            &st.cfg.client_id,
            st.secret.as_deref(),
            &st.cfg.redirect_url,
            code,
            &login.verifier,
            &login.nonce,
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()).await,
    };
    let Some((sid, reviewer)) = open_session(st, claims.sub.clone(), claims.iss.clone()) else {
        return too_many_sessions();
    };
    info!(subject = %reviewer.subject, "console sign-in");
    let ev = AuditEvent::new("console_sign_in")
        .decision("allow")
        .approver(reviewer.subject.clone())
        .detail("issuer", reviewer.issuer.clone());
    if let Err(e) = shared.audit(ev).await {
        warn!("audit record of a sign-in failed: {e}");
    }
    let clear_login = format!("{LOGIN_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0");
    web::set_cookies_then(
        "/requests",
        &[session_cookie(&sid, st.session_ttl.as_secs()), clear_login],
    )
}

/// `GET /login/once?token=…`: the demo's one-time sign-in. A right,
/// unused, timely token opens an ordinary session (same cookie, same CSRF)
/// for the configured reviewer; anything else is a 403 page. Both audited.
async fn one_time_sign_in(
    st: &State,
    shared: &Arc<Shared>,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Body> {
    let Some((who, slot)) = &st.one_time else {
        return error_page(StatusCode::NOT_FOUND, "No such page.");
    };
    // Only GET spends the token: a link preview's HEAD must not.
    if req.method() != Method::GET {
        return error_page(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed.");
    }
    let q = web::parse_form(req.uri().query().unwrap_or("")).unwrap_or_default();
    let presented = q.get("token").map(String::as_str).unwrap_or("");
    let outcome = slot
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .redeem(presented, Instant::now());
    if let Err(e) = outcome {
        warn!(client = %peer, "console one-time sign-in refused: {e}");
        let ev = AuditEvent::new("console_sign_in")
            .decision("deny")
            .reason(e.to_string())
            .detail("method", "one-time".to_string())
            .detail("client", peer.to_string());
        if let Err(e) = shared.audit(ev).await {
            warn!("audit record of a refused sign-in failed: {e}");
        }
        return error_page(StatusCode::FORBIDDEN, &format!("Sign-in refused: {e}."));
    }
    let Some((sid, reviewer)) = open_session(st, who.clone(), once::ONE_TIME_ISSUER.to_string())
    else {
        return too_many_sessions();
    };
    info!(subject = %reviewer.subject, "console one-time sign-in");
    let ev = AuditEvent::new("console_sign_in")
        .decision("allow")
        .approver(reviewer.subject.clone())
        .detail("method", "one-time".to_string())
        .detail("issuer", reviewer.issuer.clone())
        .detail("client", peer.to_string());
    if let Err(e) = shared.audit(ev).await {
        warn!("audit record of a sign-in failed: {e}");
    }
    web::set_cookies_then(
        "/requests",
        &[session_cookie(&sid, st.session_ttl.as_secs())],
    )
}

/// Whether `reviewer` may do `action`; `Err` says why not.
fn may(
    policy: &PolicySet,
    reviewer: &Reviewer,
    action: &str,
    resource: ReviewTarget<'_>,
    requester: Option<Requester<'_>>,
) -> Result<(), String> {
    policy
        .decide_reviewer(&ReviewRequest {
            subject: &reviewer.subject,
            issuer: &reviewer.issuer,
            action,
            resource,
            requester,
            client: &reviewer.client,
            destination: &reviewer.destination,
        })
        .map(|_| ())
}

/// `context.requester` for an identity: its subject when it comes from the
/// console's own issuer (so `context.requester == principal` means "the
/// reviewer's own agent"), else `<issuer url>#<subject>`, which no reviewer
/// of this console can be.
pub(crate) fn requester_of(
    policy: &PolicySet,
    console_issuer: &str,
    identity: &str,
) -> (String, String) {
    match policy.identities.get(identity) {
        Some(i) => {
            let url = policy
                .issuers
                .get(&i.issuer)
                .map(|x| x.url.clone())
                .unwrap_or_default();
            if i.issuer == console_issuer {
                (i.subject.clone(), url)
            } else {
                (format!("{url}#{}", i.subject), url)
            }
        }
        None => (format!("identity:{identity}"), String::new()),
    }
}

/// A refusal: audited with the reviewer, then a 403 page.
async fn refused(
    shared: &Arc<Shared>,
    reviewer: &Reviewer,
    action: &str,
    target: &str,
    why: &str,
) -> Response<Body> {
    refused_with(shared, reviewer, action, target, why, StatusCode::FORBIDDEN).await
}

async fn refused_with(
    shared: &Arc<Shared>,
    reviewer: &Reviewer,
    action: &str,
    target: &str,
    why: &str,
    status: StatusCode,
) -> Response<Body> {
    let ev = AuditEvent::new("console_refused")
        .action(action.to_string())
        .decision("deny")
        .approver(reviewer.subject.clone())
        .reason(why.to_string())
        .detail("target", target.to_string());
    if let Err(e) = shared.audit(ev).await {
        warn!("audit record of a console refusal failed: {e}");
    }
    error_page(status, &format!("Refused: {why}"))
}

fn error_page(status: StatusCode, msg: &str) -> Response<Body> {
    web::html(status, pages::error(status, msg))
}

async fn post(
    st: &State,
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    path: &str,
    sid: &str,
    reviewer: &Reviewer,
) -> Response<Body> {
    // A browser names the page a form came from; a foreign one is refused
    // even before the CSRF token is looked at.
    if let Some(origin) = req.headers().get(hyper::header::ORIGIN) {
        if origin.to_str().ok() != Some(st.origin.as_str()) {
            return refused(shared, reviewer, "post", path, "cross-origin form").await;
        }
    }
    let body = match Limited::new(req.into_body(), MAX_FORM).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error_page(StatusCode::PAYLOAD_TOO_LARGE, "Form too large."),
    };
    let form = match std::str::from_utf8(&body).ok().and_then(web::parse_form) {
        Some(f) => f,
        None => return error_page(StatusCode::BAD_REQUEST, "Malformed form."),
    };
    match form.get("csrf") {
        Some(t) if web::same_secret(t, &reviewer.csrf) => {}
        Some(_) => {
            return refused(shared, reviewer, "post", path, "CSRF token does not match").await
        }
        None => return refused(shared, reviewer, "post", path, "CSRF token missing").await,
    }
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let field = |k: &str| form.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
    match segs.as_slice() {
        ["auth", "logout"] => {
            st.auth
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .sessions
                .remove(sid);
            let ev = AuditEvent::new("console_sign_out").approver(reviewer.subject.clone());
            if let Err(e) = shared.audit(ev).await {
                warn!("audit record of a sign-out failed: {e}");
            }
            let mut resp = web::html(StatusCode::OK, pages::signed_out());
            if let Ok(v) = hyper::header::HeaderValue::from_str(&session_cookie("", 0)) {
                resp.headers_mut().append(hyper::header::SET_COOKIE, v);
            }
            resp
        }
        ["requests", id, verb @ ("approve" | "deny")] => {
            decide(
                st,
                shared,
                reviewer,
                id,
                verb,
                field("for"),
                field("reason"),
            )
            .await
        }
        ["sessions", id, "end"] => end_session(st, shared, reviewer, id).await,
        ["grants", id, "revoke"] => revoke(st, shared, reviewer, id).await,
        _ => error_page(StatusCode::NOT_FOUND, "No such action."),
    }
}

/// Approves (once or for a duration) or denies an access request.
async fn decide(
    st: &State,
    shared: &Arc<Shared>,
    reviewer: &Reviewer,
    id: &str,
    verb: &str,
    for_duration: Option<&str>,
    reason: Option<&str>,
) -> Response<Body> {
    let action = format!("console:{verb}");
    let request = match shared.jit.get(id) {
        Ok(r) => r,
        Err(e) => {
            return refused_with(
                shared,
                reviewer,
                &action,
                id,
                &e.to_string(),
                StatusCode::NOT_FOUND,
            )
            .await
        }
    };
    let policy = shared.policy.load();
    let (req_subject, req_issuer) = requester_of(&policy, &st.cfg.issuer, &request.identity);
    let requester = Requester {
        subject: &req_subject,
        issuer: &req_issuer,
        identity: &request.identity,
        action: &request.action,
        command: &request.command,
    };
    if let Err(why) = may(
        &policy,
        reviewer,
        &action,
        ReviewTarget::Resource(&request.resource),
        Some(requester),
    ) {
        return refused(shared, reviewer, &action, id, &why).await;
    }
    let by = reviewer.subject.clone();
    let result = if verb == "approve" {
        let dur = match for_duration.map(crate::policy::parse_duration).transpose() {
            Ok(d) => d,
            Err(e) => return error_page(StatusCode::BAD_REQUEST, &format!("Duration: {e}")),
        };
        let reason = reason.map(str::to_string);
        // On a fleet node the store decides who answered first, as for the
        // admin socket's `approve`.
        match &shared.fleet {
            Some(f) => f
                .approve(&shared.jit, id, &by, dur, reason)
                .await
                .map(|(r, g)| (r, g, "allow"))
                .map_err(fleet_status),
            None => shared
                .jit
                .approve(id, &by, dur, reason)
                .map(|(r, g)| (r, g, "allow"))
                .map_err(jit_status),
        }
    } else {
        let why = reason
            .map(str::to_string)
            .unwrap_or_else(|| format!("denied by {by} in the review console"));
        match &shared.fleet {
            Some(f) => f
                .deny(&shared.jit, id, &by, why)
                .await
                .map(|r| (r, None, "deny"))
                .map_err(fleet_status),
            None => shared
                .jit
                .deny(id, &by, why)
                .map(|r| (r, None, "deny"))
                .map_err(jit_status),
        }
    };
    let (request, grant, decision) = match result {
        Ok(x) => x,
        Err((msg, status)) => {
            return refused_with(shared, reviewer, &action, id, &msg, status).await;
        }
    };
    // The same record the admin socket writes for `portcullis approve|deny`,
    // with the reviewer's subject as the approver.
    let mut ev = request
        .decision_event(&by, decision, grant.as_ref())
        .detail("via", "console")
        .detail("reviewer_issuer", reviewer.issuer.clone());
    if let crate::jit::Status::Denied { reason, .. } = &request.status {
        ev = ev.reason(reason.clone());
    } else if let Some(r) = reason {
        ev = ev.reason(r.to_string());
    }
    if let Err(e) = shared.audit(ev).await {
        warn!("audit record of a console decision failed: {e}");
    }
    shared
        .webhooks
        .notify(crate::jit::JitEvent::RequestDecided {
            request: request.clone(),
        });
    if let Some(g) = &grant {
        shared
            .webhooks
            .notify(crate::jit::JitEvent::GrantCreated { grant: g.clone() });
    }
    info!(request = %request.id, reviewer = %by, decision, "console decision");
    web::redirect(
        StatusCode::SEE_OTHER,
        &format!("/requests?done={}", web::url_encode(&request.id)),
        &[],
    )
}

async fn end_session(
    st: &State,
    shared: &Arc<Shared>,
    reviewer: &Reviewer,
    id: &str,
) -> Response<Body> {
    let Some(flow) = shared.sessions.list().into_iter().find(|f| f.session == id) else {
        return refused_with(
            shared,
            reviewer,
            "console:end_session",
            id,
            &format!("no live session {id}"),
            StatusCode::NOT_FOUND,
        )
        .await;
    };
    let policy = shared.policy.load();
    let (s, i) = requester_of(&policy, &st.cfg.issuer, &flow.identity);
    let requester = Requester {
        subject: &s,
        issuer: &i,
        identity: &flow.identity,
        action: "",
        command: "",
    };
    if let Err(why) = may(
        &policy,
        reviewer,
        "console:end_session",
        ReviewTarget::Resource(&flow.resource),
        Some(requester),
    ) {
        return refused(shared, reviewer, "console:end_session", id, &why).await;
    }
    let ended = shared.sessions.cancel_where(|f| f.session == id);
    let ev = AuditEvent::new("session_killed")
        .session(id.to_string())
        .identity(IdentityRef::named(&flow.identity))
        .resource(flow.resource.clone())
        .approver(reviewer.subject.clone())
        .detail("via", "console");
    if let Err(e) = shared.audit(ev).await {
        warn!("audit record of a console kill failed: {e}");
    }
    info!(session = %id, reviewer = %reviewer.subject, ended = ended.len(), "console ended a session");
    web::redirect(StatusCode::SEE_OTHER, "/sessions", &[])
}

async fn revoke(st: &State, shared: &Arc<Shared>, reviewer: &Reviewer, id: &str) -> Response<Body> {
    let Some(grant) = shared.jit.grants().into_iter().find(|g| g.id == id) else {
        return refused_with(
            shared,
            reviewer,
            "console:revoke",
            id,
            &format!("no grant {id}"),
            StatusCode::NOT_FOUND,
        )
        .await;
    };
    let policy = shared.policy.load();
    let (s, i) = requester_of(&policy, &st.cfg.issuer, &grant.identity);
    let actions = grant.actions.join(",");
    let requester = Requester {
        subject: &s,
        issuer: &i,
        identity: &grant.identity,
        action: &actions,
        command: "",
    };
    if let Err(why) = may(
        &policy,
        reviewer,
        "console:revoke",
        ReviewTarget::Resource(&grant.resource),
        Some(requester),
    ) {
        return refused(shared, reviewer, "console:revoke", id, &why).await;
    }
    let by = reviewer.subject.clone();
    let revoked = match &shared.fleet {
        Some(f) => f
            .revoke(&shared.jit, id, &by)
            .await
            .map_err(|e| e.to_string()),
        None => shared.jit.revoke(id, &by).map_err(|e| e.to_string()),
    };
    let g = match revoked {
        Ok(g) => g,
        Err(e) => {
            return refused_with(
                shared,
                reviewer,
                "console:revoke",
                id,
                &e.to_string(),
                StatusCode::NOT_FOUND,
            )
            .await
        }
    };
    let ended = shared.end_sessions_of_grant(&g.id);
    let mut ev = AuditEvent::new("grant_revoked")
        .identity(IdentityRef::named(&g.identity))
        .resource(g.resource.clone())
        .approver(by.clone())
        .detail("grant", g.id.clone())
        .detail("via", "console");
    for s in &ended {
        ev = ev.detail(format!("ended:{s}"), "grant revoked");
    }
    if let Err(e) = shared.audit(ev).await {
        warn!("audit record of a console revocation failed: {e}");
    }
    shared.webhooks.notify(crate::jit::JitEvent::GrantEnded {
        grant: g,
        reason: format!("revoked by {by}"),
    });
    web::redirect(StatusCode::SEE_OTHER, "/grants", &[])
}

/// A JIT refusal as the console's answer: text and status.
fn jit_status(e: crate::jit::JitError) -> (String, StatusCode) {
    let status = match e {
        crate::jit::JitError::AlreadyDecided { .. } => StatusCode::CONFLICT,
        crate::jit::JitError::NoRequest(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    };
    (e.to_string(), status)
}

/// A fleet refusal as the console's answer (the store unreachable: 503).
fn fleet_status(e: crate::fleet::FleetError) -> (String, StatusCode) {
    match e {
        crate::fleet::FleetError::Jit(j) => jit_status(j),
        crate::fleet::FleetError::Refused(m) => (m, StatusCode::CONFLICT),
        e @ crate::fleet::FleetError::Unreachable(_) => {
            (e.to_string(), StatusCode::SERVICE_UNAVAILABLE)
        }
        e => (e.to_string(), StatusCode::BAD_REQUEST),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn console_table_is_read_strictly_from_the_config_file() {
        let dir =
            std::env::temp_dir().join(format!("portcullis-console-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("portcullis.toml");
        std::fs::write(
            &p,
            "[daemon]\nlisten_port = 1\n[console]\nlisten = \"127.0.0.1:15030\"\nissuer = \"corp\"\nclient_id = \"c\"\nredirect_url = \"https://h:15030/auth/callback\"\n",
        )
        .unwrap();
        let t = crate::config::read_daemon_table(&p).unwrap();
        let c = t.console.expect("console table");
        assert_eq!(c.issuer, "corp");
        assert_eq!(c.listen.port(), 15030);
        std::fs::write(
            &p,
            "[console]\nlisten = \"127.0.0.1:15030\"\nissuer = \"corp\"\nclient_id = \"c\"\nredirect_url = \"https://h/cb\"\nbogus = 1\n",
        )
        .unwrap();
        let err = crate::config::read_daemon_table(&p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        // Absent: no console.
        std::fs::write(&p, "[daemon]\nlisten_port = 1\n").unwrap();
        assert!(crate::config::read_daemon_table(&p)
            .unwrap()
            .console
            .is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
