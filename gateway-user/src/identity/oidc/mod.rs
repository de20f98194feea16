//! OIDC tokens: proving that a flow's identity is who its tag says.
//!
//! An identity's token (a JWT, typically a Kubernetes projected
//! service-account token) is read from its [`TokenFile`] and checked by the
//! [`Verifier`] of the issuer it claims: the signature against the issuer's
//! JWKS (from a file or fetched over HTTPS, cached, refreshed on an unknown
//! `kid` at a bounded rate, and kept while the issuer is unreachable for at
//! most [`IssuerConfig::jwks_max_stale`]), then `iss`, `aud`, `exp`, `nbf`
//! and the subject. The algorithm is always the key's: a token header can
//! only select among what its key allows, so `alg: none` and HS/RS
//! confusion are refused.
//!
//! Owns token parsing and validation, JWKS loading and caching, and token
//! files. It does not decide what an identity may do (policy does), does not
//! schedule periodic refreshes or close sessions when a token stops
//! validating (the daemon does, with [`Verifier::refresh`] and the errors
//! returned here), and reads no configuration file.

mod jwks;
mod token_file;

#[cfg(test)]
mod tests;

use std::{
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwapOption;
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use jsonwebtoken::{errors::ErrorKind, Algorithm, Validation};
use serde_json::{Map, Value};
use tracing::{debug, info, warn};

use jwks::{HttpsSource, KeySet, VerifyKey};
pub use jwks::{MAX_JWKS_BYTES, MAX_KEYS, MIN_RSA_BITS};
use token_file::{read_capped, FileStamp};
pub use token_file::{TokenFile, TokenFileError};

/// Default clock skew allowed on `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Default time the last good keys stay usable while the JWKS cannot be
/// loaded.
pub const DEFAULT_JWKS_MAX_STALE: Duration = Duration::from_secs(24 * 3600);
/// Default minimum time between two refreshes caused by an unknown `kid`.
pub const DEFAULT_REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Default limit on one JWKS download (connect, TLS, request, body).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS file is looked at (one `stat`) at most this often by
/// [`Verifier::validate`], besides when a token names an unknown `kid`.
pub const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The largest clock skew a configuration may allow.
pub const MAX_LEEWAY: Duration = Duration::from_secs(3600);
/// The longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;

/// Where an issuer's JSON Web Key Set comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwksSource {
    /// A local file, re-read when it changes (device, inode, size, mtime or
    /// ctime), so an atomic rename or symlink swap is picked up.
    File(PathBuf),
    /// The issuer's `jwks_uri`, fetched over HTTPS only.
    Url {
        /// The `https://` URL.
        url: String,
        /// PEM file of the CA certificates to trust for this URL instead of
        /// the system's roots.
        ca_file: Option<PathBuf>,
    },
}

/// One trusted token issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerConfig {
    /// The issuer's name in the configuration (the TOML key, e.g. `corp`).
    pub name: String,
    /// The expected `iss` claim, compared exactly.
    pub issuer: String,
    /// The token's `aud` must contain at least one of these.
    pub audiences: Vec<String>,
    /// Where the signing keys come from.
    pub jwks: JwksSource,
    /// The claim that must equal the identity's subject: a top-level claim
    /// name (default `sub`), or a JSON pointer starting with `/` for a nested
    /// one (`/kubernetes.io/serviceaccount/name`).
    pub subject_claim: String,
    /// Clock skew allowed on `exp` and `nbf` (whole seconds count).
    pub leeway: Duration,
    /// How long after they were last loaded (or, for a file, last seen
    /// unchanged) the keys stay usable while the JWKS cannot be loaded; then
    /// every token is refused with [`TokenError::JwksUnavailable`].
    pub jwks_max_stale: Duration,
    /// Minimum time between two refreshes of a URL source caused by tokens
    /// with an unknown `kid` (and between automatic retries while no usable
    /// keys are loaded).
    pub refresh_min_interval: Duration,
    /// Limit on one JWKS download.
    pub fetch_timeout: Duration,
}

impl IssuerConfig {
    /// An issuer with the default subject claim (`sub`), leeway, staleness,
    /// refresh interval and fetch timeout.
    pub fn new(
        name: impl Into<String>,
        issuer: impl Into<String>,
        audiences: Vec<String>,
        jwks: JwksSource,
    ) -> Self {
        Self {
            name: name.into(),
            issuer: issuer.into(),
            audiences,
            jwks,
            subject_claim: "sub".to_string(),
            leeway: DEFAULT_LEEWAY,
            jwks_max_stale: DEFAULT_JWKS_MAX_STALE,
            refresh_min_interval: DEFAULT_REFRESH_MIN_INTERVAL,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        }
    }
}

/// The claims of a token that validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims {
    /// `iss`.
    pub iss: String,
    /// `sub`.
    pub sub: String,
    /// `aud` (a single string becomes one element).
    pub aud: Vec<String>,
    /// `exp`, seconds since the Unix epoch.
    pub exp: u64,
    /// `nbf`, if present.
    pub nbf: Option<u64>,
    /// `iat`, if present.
    pub iat: Option<u64>,
    /// `jti`, if present.
    pub jti: Option<String>,
    /// The value of the issuer's subject claim (equal to the expected
    /// subject).
    pub subject: String,
    /// The whole claims object.
    pub raw: Value,
}

/// Why a token was refused. Strings taken from the token are shortened and
/// quoted, so they are safe to log.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum TokenError {
    /// Not a compact JWS with a JSON header and payload, too long, or a
    /// claim that could not be decoded.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The header says `alg: none`: an unsigned token.
    #[error("token is unsigned (alg none)")]
    AlgorithmNone,
    /// The header's algorithm is not one any issuer key can have (HMAC
    /// algorithms, unknown names).
    #[error("token algorithm {0} is not allowed")]
    AlgorithmNotAllowed(String),
    /// The header's algorithm does not fit the key it names (e.g. HS256 with
    /// an RSA key: the HS/RS confusion attack).
    #[error("token algorithm {alg} does not match the {key}")]
    AlgorithmKeyMismatch {
        /// The header's algorithm.
        alg: String,
        /// The key it named.
        key: String,
    },
    /// The header has `crit` extensions, none of which are understood.
    #[error("token header has critical extensions {0}")]
    CriticalHeader(String),
    /// The token names no `kid` and the issuer has several keys for its
    /// algorithm.
    #[error("token has no kid and the issuer has several keys")]
    MissingKid,
    /// No key of the issuer has the token's `kid` (even after a refresh,
    /// when one was allowed).
    #[error("no key with kid {0}")]
    UnknownKid(String),
    /// The signature does not verify with the issuer's key.
    #[error("bad signature")]
    BadSignature,
    /// `exp` (plus leeway) has passed.
    #[error("token expired at {exp}")]
    Expired {
        /// The token's `exp`.
        exp: u64,
    },
    /// `nbf` (minus leeway) is still in the future.
    #[error("token not valid before {nbf}")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: u64,
    },
    /// `iss` is not the issuer's.
    #[error("token issuer {0} is not the expected one")]
    WrongIssuer(String),
    /// `aud` contains none of the issuer's audiences.
    #[error("token audience {0} contains none of the expected audiences")]
    WrongAudience(String),
    /// A required claim (`iss`, `aud`, `exp`, `sub`, the subject claim) is
    /// absent. Holds the claim's name (the configured subject claim as
    /// configured).
    #[error("token has no {0} claim")]
    MissingClaim(String),
    /// A claim has the wrong type (e.g. `exp` as a string).
    #[error("token claim {0} has the wrong type")]
    InvalidClaim(String),
    /// The subject claim names another identity.
    #[error("token subject {found} is not {expected}")]
    SubjectMismatch {
        /// The identity's subject, as given.
        expected: String,
        /// The token's, shortened and quoted.
        found: String,
    },
    /// No usable keys: never loaded, or the last good ones are older than
    /// `jwks_max_stale`.
    #[error("issuer keys unavailable: {0}")]
    JwksUnavailable(String),
}

impl TokenError {
    /// A stable snake_case label for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::AlgorithmNone => "alg_none",
            Self::AlgorithmNotAllowed(_) => "alg_not_allowed",
            Self::AlgorithmKeyMismatch { .. } => "alg_key_mismatch",
            Self::CriticalHeader(_) => "critical_header",
            Self::MissingKid => "missing_kid",
            Self::UnknownKid(_) => "unknown_kid",
            Self::BadSignature => "bad_signature",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::WrongIssuer(_) => "wrong_issuer",
            Self::WrongAudience(_) => "wrong_audience",
            Self::MissingClaim(_) => "missing_claim",
            Self::InvalidClaim(_) => "invalid_claim",
            Self::SubjectMismatch { .. } => "subject_mismatch",
            Self::JwksUnavailable(_) => "jwks_unavailable",
        }
    }
}

/// A problem with an issuer's configuration or its key set.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The configuration cannot work (bad URL, unreadable CA file, ...).
    #[error("issuer {name}: {reason}")]
    Config {
        /// The issuer's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The JWKS file could not be read.
    #[error("issuer {name}: JWKS file {path}: {reason}")]
    JwksFile {
        /// The issuer's name.
        name: String,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The JWKS URL could not be fetched.
    #[error("issuer {name}: fetching JWKS from {url}: {reason}")]
    JwksFetch {
        /// The issuer's name.
        name: String,
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The document is not a JWKS with at least one usable key.
    #[error("issuer {name}: JWKS from {origin}: {reason}")]
    JwksInvalid {
        /// The issuer's name.
        name: String,
        /// The file or URL.
        origin: String,
        /// What is wrong.
        reason: String,
    },
}

impl OidcError {
    /// A stable snake_case label for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Config { .. } => "oidc_config",
            Self::JwksFile { .. } => "jwks_file",
            Self::JwksFetch { .. } => "jwks_fetch",
            Self::JwksInvalid { .. } => "jwks_invalid",
        }
    }
}

/// The state of an issuer's key cache, for status listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwksStatus {
    /// How many usable keys are cached.
    pub keys: usize,
    /// Their `kid`s.
    pub key_ids: Vec<String>,
    /// Time since the keys were last loaded or confirmed; `None` if never.
    pub age: Option<Duration>,
    /// Whether tokens can be validated now (keys loaded and not too stale).
    pub usable: bool,
    /// The last load's error, if the last load failed.
    pub last_error: Option<String>,
    /// How many times a key set was loaded successfully.
    pub loads: u64,
}

enum Source {
    File(PathBuf),
    Https(HttpsSource),
}

/// A loaded key set and when it was last known to be current.
struct Loaded {
    keys: Arc<KeySet>,
    confirmed: Instant,
    stamp: Option<FileStamp>,
}

#[derive(Default)]
struct RefreshState {
    last_error: Option<String>,
    last_kid_refresh: Option<Instant>,
    last_auto_attempt: Option<Instant>,
    last_file_check: Option<Instant>,
    loads: u64,
}

/// Validates one issuer's tokens. Holds the issuer's JWKS cache; `Send +
/// Sync`, cheap to share in an `Arc`. The data path uses
/// [`Verifier::validate_cached`] (no I/O, no lock but a brief one for
/// status); [`Verifier::validate`] may load keys first.
pub struct Verifier {
    cfg: IssuerConfig,
    source: Source,
    keys: ArcSwapOption<Loaded>,
    /// Serialises loads, so concurrent validations trigger one fetch.
    refresh_lock: tokio::sync::Mutex<()>,
    state: Mutex<RefreshState>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("name", &self.cfg.name)
            .field("issuer", &self.cfg.issuer)
            .field("jwks", &self.cfg.jwks)
            .finish()
    }
}

struct TokenHeader {
    alg: Algorithm,
    kid: Option<String>,
}

impl Verifier {
    /// Checks the configuration and prepares the JWKS source (for a URL: the
    /// TLS client and its roots, read now). Loads no keys: the first
    /// [`Verifier::validate`] or [`Verifier::refresh`] does.
    pub fn new(cfg: IssuerConfig) -> Result<Self, OidcError> {
        let bad = |reason: &str| OidcError::Config {
            name: cfg.name.clone(),
            reason: reason.to_string(),
        };
        if cfg.name.is_empty() {
            return Err(bad("the issuer name is empty"));
        }
        if cfg.issuer.is_empty() {
            return Err(bad("issuer (the expected iss) is empty"));
        }
        if cfg.audiences.is_empty() || cfg.audiences.iter().any(String::is_empty) {
            return Err(bad(
                "audiences must be a non-empty list of non-empty strings",
            ));
        }
        if cfg.subject_claim.is_empty() || cfg.subject_claim == "/" {
            return Err(bad("subject_claim is empty"));
        }
        if cfg.leeway > MAX_LEEWAY {
            return Err(bad("leeway is more than an hour: fix the clocks instead"));
        }
        if cfg.jwks_max_stale.is_zero() {
            return Err(bad("jwks_max_stale must be positive"));
        }
        if cfg.fetch_timeout.is_zero() {
            return Err(bad("fetch_timeout must be positive"));
        }
        let source = match &cfg.jwks {
            JwksSource::File(path) if path.as_os_str().is_empty() => {
                return Err(bad("the JWKS file path is empty"))
            }
            JwksSource::File(path) => Source::File(path.clone()),
            JwksSource::Url { url, ca_file } => Source::Https(
                HttpsSource::new(url, ca_file.as_deref()).map_err(|e| bad(&e.to_string()))?,
            ),
        };
        Ok(Self {
            cfg,
            source,
            keys: ArcSwapOption::empty(),
            refresh_lock: tokio::sync::Mutex::new(()),
            state: Mutex::new(RefreshState::default()),
        })
    }

    /// The configuration this verifier was made from.
    pub fn config(&self) -> &IssuerConfig {
        &self.cfg
    }

    /// Validates `token` and checks that its subject claim is
    /// `expected_subject`.
    ///
    /// Checks, in order: the token's form and header (`alg: none`, `crit`,
    /// algorithm names); that keys are usable; the key by `kid` and that the
    /// header's algorithm is one the key allows (the algorithm comes from the
    /// JWK's kty/crv/alg, never from the header alone); the signature; then
    /// that `iss`, `aud`, `exp`, `sub` and the subject claim are present,
    /// `iss` is the issuer, `aud` holds one of the audiences, `exp` and `nbf`
    /// hold with the leeway, and the subject matches.
    ///
    /// May load keys first: a JWKS file is checked for changes at most every
    /// [`FILE_CHECK_INTERVAL`]; a URL is fetched when no usable keys are
    /// cached (at most every `refresh_min_interval`); and a token with an
    /// unknown `kid` causes one reload (for a URL at most every
    /// `refresh_min_interval`).
    pub async fn validate(
        &self,
        token: &str,
        expected_subject: &str,
    ) -> Result<Claims, TokenError> {
        self.validate_inner(token, Some(expected_subject)).await
    }

    /// Like [`Verifier::validate`] for a token whose subject is not known
    /// beforehand (a console reviewer's ID token): every other check holds.
    pub async fn validate_any_subject(&self, token: &str) -> Result<Claims, TokenError> {
        self.validate_inner(token, None).await
    }

    async fn validate_inner(
        &self,
        token: &str,
        expected_subject: Option<&str>,
    ) -> Result<Claims, TokenError> {
        let header = parse_header(token)?;
        self.auto_refresh().await;
        match self.check(token, &header, expected_subject) {
            Err(TokenError::UnknownKid(e)) => {
                if let Some(kid) = &header.kid {
                    if self.refresh_for_kid(kid).await {
                        return self.check(token, &header, expected_subject);
                    }
                }
                Err(TokenError::UnknownKid(e))
            }
            other => other,
        }
    }

    /// Like [`Verifier::validate`], but only with the keys already cached:
    /// no I/O and no waiting, for the data path. A token whose `kid` is not
    /// cached yields [`TokenError::UnknownKid`]: a caller that can wait then
    /// uses [`Verifier::validate`].
    pub fn validate_cached(
        &self,
        token: &str,
        expected_subject: &str,
    ) -> Result<Claims, TokenError> {
        let header = parse_header(token)?;
        self.check(token, &header, Some(expected_subject))
    }

    /// Loads the JWKS now (reads the file or fetches the URL, regardless of
    /// rate limits: this is what a periodic refresh calls). On failure the
    /// cached keys are kept (until `jwks_max_stale` after they were loaded)
    /// and the error is returned.
    pub async fn refresh(&self) -> Result<(), OidcError> {
        let _serial = self.refresh_lock.lock().await;
        self.load(true).await
    }

    /// The cache's state now.
    pub fn status(&self) -> JwksStatus {
        let loaded = self.keys.load_full();
        let state = self.state();
        let age = loaded.as_ref().map(|l| l.confirmed.elapsed());
        JwksStatus {
            keys: loaded.as_ref().map_or(0, |l| l.keys.len()),
            key_ids: loaded.as_ref().map_or_else(Vec::new, |l| l.keys.kids()),
            usable: age.is_some_and(|a| a < self.cfg.jwks_max_stale),
            age,
            last_error: state.last_error.clone(),
            loads: state.loads,
        }
    }

    fn state(&self) -> MutexGuard<'_, RefreshState> {
        // Plain bookkeeping: still consistent if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn origin(&self) -> String {
        match &self.source {
            Source::File(path) => path.display().to_string(),
            Source::Https(https) => https.url().to_string(),
        }
    }

    /// The cached keys if they are usable now.
    fn usable_keys(&self) -> Result<Arc<KeySet>, TokenError> {
        let Some(loaded) = self.keys.load_full() else {
            let why = self
                .state()
                .last_error
                .clone()
                .unwrap_or_else(|| "not loaded yet".to_string());
            return Err(TokenError::JwksUnavailable(why));
        };
        let age = loaded.confirmed.elapsed();
        if age >= self.cfg.jwks_max_stale {
            let last = self
                .state()
                .last_error
                .clone()
                .unwrap_or_else(|| "no refresh since".to_string());
            return Err(TokenError::JwksUnavailable(format!(
                "keys last loaded {}s ago (longer than jwks_max_stale, {}s): {last}",
                age.as_secs(),
                self.cfg.jwks_max_stale.as_secs()
            )));
        }
        Ok(Arc::clone(&loaded.keys))
    }

    /// Loads keys when a validation should: a file that may have changed, or
    /// a URL source with no usable keys.
    async fn auto_refresh(&self) {
        match &self.source {
            Source::File(_) => {
                let recent = |v: &Self| !due(v.state().last_file_check, FILE_CHECK_INTERVAL);
                if self.keys.load().is_some() && recent(self) {
                    return;
                }
                // Taking the lock also waits for a load in flight, so that
                // concurrent first validations all see its keys.
                let _serial = self.refresh_lock.lock().await;
                if recent(self) {
                    return; // another task just looked
                }
                self.state().last_file_check = Some(Instant::now());
                let _ = self.load(false).await;
            }
            Source::Https(_) => {
                if self.usable_keys().is_ok() {
                    return;
                }
                let _serial = self.refresh_lock.lock().await;
                let retry_due = due(
                    self.state().last_auto_attempt,
                    self.cfg.refresh_min_interval,
                );
                if self.usable_keys().is_ok() || !retry_due {
                    return;
                }
                self.state().last_auto_attempt = Some(Instant::now());
                let _ = self.load(true).await;
            }
        }
    }

    /// Reloads because a token named `kid`; returns whether a reload
    /// happened (or another task's already brought the kid in), i.e. whether
    /// validating again can give another answer.
    async fn refresh_for_kid(&self, kid: &str) -> bool {
        let _serial = self.refresh_lock.lock().await;
        if let Some(loaded) = self.keys.load_full() {
            if !loaded.keys.with_kid(kid).is_empty() {
                return true;
            }
        }
        match &self.source {
            // A stat; the file is read only if it changed.
            Source::File(_) => self.load(false).await.is_ok(),
            Source::Https(_) => {
                let now = Instant::now();
                {
                    let mut state = self.state();
                    let limited = state.last_kid_refresh.is_some_and(|t| {
                        now.saturating_duration_since(t) < self.cfg.refresh_min_interval
                    });
                    if limited {
                        debug!(
                            issuer = %self.cfg.name,
                            "unknown kid {}: refresh rate-limited",
                            clip(kid)
                        );
                        return false;
                    }
                    state.last_kid_refresh = Some(now);
                }
                self.load(true).await.is_ok()
            }
        }
    }

    /// Loads the key set; the caller holds `refresh_lock`. For a file
    /// without `force`, only a changed file is read (an unchanged one just
    /// counts as confirmed).
    async fn load(&self, force: bool) -> Result<(), OidcError> {
        let result = match &self.source {
            Source::File(path) => self.load_file(path, force).await,
            Source::Https(https) => self.load_url(https).await,
        };
        if let Err(e) = &result {
            warn!(issuer = %self.cfg.name, "{e}");
            self.state().last_error = Some(e.to_string());
        }
        result
    }

    async fn load_file(&self, path: &std::path::Path, force: bool) -> Result<(), OidcError> {
        let file_err = |reason: String| OidcError::JwksFile {
            name: self.cfg.name.clone(),
            path: path.to_path_buf(),
            reason,
        };
        let current = self.keys.load_full();
        if !force {
            if let Some(current) = &current {
                let meta = tokio::fs::metadata(path)
                    .await
                    .map_err(|e| file_err(e.to_string()))?;
                let stamp = FileStamp::of(&meta);
                if current.stamp == Some(stamp) {
                    self.keys.store(Some(Arc::new(Loaded {
                        keys: Arc::clone(&current.keys),
                        confirmed: Instant::now(),
                        stamp: Some(stamp),
                    })));
                    self.state().last_error = None;
                    return Ok(());
                }
            }
        }
        let owned = path.to_path_buf();
        let read = tokio::task::spawn_blocking(move || read_capped(&owned, MAX_JWKS_BYTES as u64))
            .await
            .map_err(|e| file_err(format!("reader task failed: {e}")))?
            .map_err(|e| file_err(e.to_string()))?;
        let (bytes, stamp) =
            read.ok_or_else(|| file_err(format!("larger than {MAX_JWKS_BYTES} bytes")))?;
        self.install(&bytes, Some(stamp))
    }

    async fn load_url(&self, https: &HttpsSource) -> Result<(), OidcError> {
        let bytes = https
            .fetch(self.cfg.fetch_timeout)
            .await
            .map_err(|reason| OidcError::JwksFetch {
                name: self.cfg.name.clone(),
                url: https.url().to_string(),
                reason,
            })?;
        self.install(&bytes, None)
    }

    /// Parses a JWKS document and makes it the cached key set.
    fn install(&self, bytes: &[u8], stamp: Option<FileStamp>) -> Result<(), OidcError> {
        let (keys, skipped) = KeySet::parse(bytes).map_err(|reason| OidcError::JwksInvalid {
            name: self.cfg.name.clone(),
            origin: self.origin(),
            reason,
        })?;
        for reason in &skipped.reasons {
            debug!(issuer = %self.cfg.name, "JWKS key left out: {reason}");
        }
        let kids = keys.kids();
        let previous = self.keys.load_full().map(|l| l.keys.kids());
        if previous.as_ref() != Some(&kids) {
            info!(
                issuer = %self.cfg.name,
                "JWKS loaded from {}: {} key(s) {:?}",
                self.origin(),
                keys.len(),
                kids
            );
        }
        self.keys.store(Some(Arc::new(Loaded {
            keys: Arc::new(keys),
            confirmed: Instant::now(),
            stamp,
        })));
        let mut state = self.state();
        state.last_error = None;
        state.loads += 1;
        Ok(())
    }

    /// Validates against the cached keys.
    fn check(
        &self,
        token: &str,
        header: &TokenHeader,
        expected_subject: Option<&str>,
    ) -> Result<Claims, TokenError> {
        let keys = self.usable_keys()?;
        let alg = header.alg;
        let alg_name = || format!("{alg:?}");
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            // Symmetric keys are never trusted. Naming a real key with an
            // HMAC algorithm is the HS/RS confusion attack: say so.
            if let Some(key) = header.kid.as_deref().and_then(|k| keys.with_kid(k).first()) {
                return Err(TokenError::AlgorithmKeyMismatch {
                    alg: alg_name(),
                    key: describe(key),
                });
            }
            return Err(TokenError::AlgorithmNotAllowed(alg_name()));
        }
        let candidates: Vec<&Arc<VerifyKey>> = match header.kid.as_deref() {
            Some(kid) => {
                let named = keys.with_kid(kid);
                let Some(first) = named.first() else {
                    return Err(TokenError::UnknownKid(clip(kid)));
                };
                let fitting: Vec<_> = named.iter().filter(|k| k.algs.accepts(alg)).collect();
                if fitting.is_empty() {
                    return Err(TokenError::AlgorithmKeyMismatch {
                        alg: alg_name(),
                        key: describe(first),
                    });
                }
                fitting
            }
            None => {
                let fitting: Vec<_> = keys.all().iter().filter(|k| k.algs.accepts(alg)).collect();
                match fitting.len() {
                    0 => {
                        return Err(TokenError::AlgorithmKeyMismatch {
                            alg: alg_name(),
                            key: "keys of this issuer".to_string(),
                        })
                    }
                    1 => fitting,
                    _ => return Err(TokenError::MissingKid),
                }
            }
        };
        let validation = self.validation(alg);
        let mut outcome = Err(TokenError::BadSignature);
        for key in candidates {
            match jsonwebtoken::decode::<Value>(token, &key.key, &validation) {
                Ok(data) => {
                    outcome = Ok(data.claims);
                    break;
                }
                Err(e) => match map_jwt_error(e.kind()) {
                    Mapped::Signature => continue,
                    Mapped::Token(err) => return Err(err),
                    // The signature verified; the claims did not. Re-check
                    // them here for a precise, deterministic reason.
                    Mapped::Claims(err) => {
                        let payload = decode_payload(token)?;
                        self.check_claims(payload, expected_subject)?;
                        return Err(err);
                    }
                },
            }
        }
        self.check_claims(outcome?, expected_subject)
    }

    /// jsonwebtoken's own claim checks, configured as strictly as ours (a
    /// second line of defence; [`Verifier::check_claims`] gives the reason).
    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.cfg.leeway.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        v.validate_aud = true;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&self.cfg.audiences);
        v
    }

    /// Checks the claims of a token whose signature verified.
    fn check_claims(
        &self,
        payload: Value,
        expected_subject: Option<&str>,
    ) -> Result<Claims, TokenError> {
        let Value::Object(map) = &payload else {
            return Err(TokenError::Malformed("claims are not a JSON object".into()));
        };
        let iss = required(map, "iss", string_claim)?;
        let aud = required(map, "aud", audience_claim)?;
        let exp = required(map, "exp", time_claim)?;
        let sub = required(map, "sub", string_claim)?;
        let nbf = optional(map, "nbf", time_claim)?;
        let iat = optional(map, "iat", time_claim)?;
        let jti = optional(map, "jti", string_claim)?;
        let subject = self.subject(&payload, &sub)?;

        if iss != self.cfg.issuer {
            return Err(TokenError::WrongIssuer(clip(&iss)));
        }
        if !aud.iter().any(|a| self.cfg.audiences.contains(a)) {
            return Err(TokenError::WrongAudience(clip(&aud.join(","))));
        }
        let now = unix_now();
        let leeway = self.cfg.leeway.as_secs();
        if now > exp.saturating_add(leeway) {
            return Err(TokenError::Expired { exp });
        }
        if let Some(nbf) = nbf {
            if nbf > now.saturating_add(leeway) {
                return Err(TokenError::NotYetValid { nbf });
            }
        }
        if let Some(expected) = expected_subject {
            if subject != expected {
                return Err(TokenError::SubjectMismatch {
                    expected: expected.to_string(),
                    found: clip(&subject),
                });
            }
        }
        Ok(Claims {
            iss,
            sub,
            aud,
            exp,
            nbf,
            iat,
            jti,
            subject,
            raw: payload,
        })
    }

    /// The value of the subject claim.
    fn subject(&self, payload: &Value, sub: &str) -> Result<String, TokenError> {
        let claim = &self.cfg.subject_claim;
        if claim == "sub" {
            return Ok(sub.to_string());
        }
        let value = if claim.starts_with('/') {
            payload.pointer(claim)
        } else {
            payload.get(claim)
        };
        match value {
            None | Some(Value::Null) => Err(TokenError::MissingClaim(claim.clone())),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(TokenError::InvalidClaim(claim.clone())),
        }
    }
}

enum Mapped {
    /// The signature did not verify with this key.
    Signature,
    /// The token itself is unusable.
    Token(TokenError),
    /// The signature verified but a claim check failed.
    Claims(TokenError),
}

fn map_jwt_error(kind: &ErrorKind) -> Mapped {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Provider(_) => Mapped::Signature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => {
            Mapped::Token(TokenError::AlgorithmNotAllowed(format!("{kind:?}")))
        }
        ErrorKind::ExpiredSignature => Mapped::Claims(TokenError::Expired { exp: 0 }),
        ErrorKind::ImmatureSignature => Mapped::Claims(TokenError::NotYetValid { nbf: 0 }),
        ErrorKind::InvalidIssuer => Mapped::Claims(TokenError::WrongIssuer(String::new())),
        ErrorKind::InvalidAudience => Mapped::Claims(TokenError::WrongAudience(String::new())),
        ErrorKind::InvalidSubject => Mapped::Claims(TokenError::SubjectMismatch {
            expected: String::new(),
            found: String::new(),
        }),
        ErrorKind::MissingRequiredClaim(c) => Mapped::Claims(TokenError::MissingClaim(clip(c))),
        ErrorKind::InvalidClaimFormat(c) => Mapped::Claims(TokenError::InvalidClaim(clip(c))),
        other => Mapped::Token(TokenError::Malformed(format!("{other:?}"))),
    }
}

/// Splits a compact JWS and checks its header, before any key is looked at.
fn parse_header(token: &str) -> Result<TokenHeader, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed(format!(
            "longer than {MAX_TOKEN_BYTES} bytes"
        )));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(TokenError::Malformed(format!(
            "{} dot-separated parts, a signed JWT has 3",
            parts.len()
        )));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(parts[0])
        .map_err(|_| TokenError::Malformed("header is not base64url".into()))?;
    let header: Map<String, Value> = serde_json::from_slice(&bytes)
        .map_err(|_| TokenError::Malformed("header is not a JSON object".into()))?;
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg,
        Some(_) => return Err(TokenError::Malformed("header alg is not a string".into())),
        None => return Err(TokenError::Malformed("header has no alg".into())),
    };
    if alg.eq_ignore_ascii_case("none") {
        return Err(TokenError::AlgorithmNone);
    }
    if let Some(crit) = header.get("crit") {
        return Err(TokenError::CriticalHeader(clip(&crit.to_string())));
    }
    let alg = alg
        .parse::<Algorithm>()
        .map_err(|_| TokenError::AlgorithmNotAllowed(clip(alg)))?;
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(TokenError::Malformed("header kid is not a string".into())),
    };
    Ok(TokenHeader { alg, kid })
}

/// The payload of a token whose signature has been verified.
fn decode_payload(token: &str) -> Result<Value, TokenError> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| TokenError::Malformed("no payload".into()))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed("payload is not base64url".into()))?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed("payload is not JSON".into()))
}

type ClaimParser<T> = fn(&Value) -> Option<T>;

fn required<T>(
    map: &Map<String, Value>,
    name: &str,
    parse: ClaimParser<T>,
) -> Result<T, TokenError> {
    optional(map, name, parse)?.ok_or_else(|| TokenError::MissingClaim(name.to_string()))
}

fn optional<T>(
    map: &Map<String, Value>,
    name: &str,
    parse: ClaimParser<T>,
) -> Result<Option<T>, TokenError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse(v)
            .map(Some)
            .ok_or_else(|| TokenError::InvalidClaim(name.to_string())),
    }
}

fn string_claim(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

/// `aud`: a string or an array of strings (RFC 7519 §4.1.3).
fn audience_claim(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) => items.iter().map(string_claim).collect(),
        _ => None,
    }
}

/// A NumericDate: non-negative seconds, fractions dropped.
fn time_claim(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let f = v.as_f64()?;
    (f.is_finite() && f >= 0.0 && f < u64::MAX as f64).then_some(f as u64)
}

/// Whether `every` has passed since `last` (or it never happened).
fn due(last: Option<Instant>, every: Duration) -> bool {
    last.is_none_or(|t| t.elapsed() >= every)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn describe(key: &VerifyKey) -> String {
    match &key.kid {
        Some(kid) => format!("{} key {}", key.kind, clip(kid)),
        None => format!("{} key without kid", key.kind),
    }
}

/// A string from a token or a JWKS, shortened and quoted for messages.
pub(crate) fn clip(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
    }
}
