//! Proving a flow's identity: the tag names an identity, and the tag's token
//! file must hold an OIDC token from that identity's issuer whose subject
//! matches. Either missing or invalid: no access.
//!
//! Owns one [`Verifier`] per issuer (rebuilt when the policy set changes an
//! issuer) and the cached token files. It must not decide access beyond
//! "is this identity proven" (rules do that).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
};

use serde::Serialize;

use super::{
    oidc::{IssuerConfig, JwksSource, TokenError, TokenFile, TokenFileError, Verifier},
    Tag,
};
use crate::policy::{Issuer, PolicySet};

/// Why an identity is not proven.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum IdentityError {
    /// The tag's identity has no `[identity.NAME]` in the policy set.
    #[error("identity `{0}` is not defined in the policy set")]
    NotDefined(String),
    /// The identity's issuer has no verifier (its configuration is invalid).
    #[error("issuer `{0}` is unavailable")]
    IssuerUnavailable(String),
    /// The tag has no token file.
    #[error("the tag of {0} has no token file (tag it with --token-file)")]
    NoTokenFile(String),
    /// The token file cannot be used.
    #[error("token file: {0}")]
    TokenFile(String, &'static str),
    /// The token does not validate.
    #[error("token: {0}")]
    Token(#[from] TokenError),
}

impl IdentityError {
    /// Stable snake_case label for audit and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotDefined(_) => "identity_not_defined",
            Self::IssuerUnavailable(_) => "issuer_unavailable",
            Self::NoTokenFile(_) => "no_token_file",
            Self::TokenFile(_, code) => code,
            Self::Token(e) => e.code(),
        }
    }
}

impl From<TokenFileError> for IdentityError {
    fn from(e: TokenFileError) -> Self {
        Self::TokenFile(e.to_string(), e.code())
    }
}

/// A proven identity, as audit events name it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProvenIdentity {
    /// Identity name.
    pub name: String,
    /// Token issuer (`iss`).
    pub iss: String,
    /// Token subject (`sub`).
    pub sub: String,
    /// Token id (`jti`), when present.
    pub jti: Option<String>,
    /// Token expiry (seconds since the epoch).
    pub exp: u64,
}

impl ProvenIdentity {
    fn new(tag: &Tag, claims: super::oidc::Claims) -> Self {
        Self {
            name: tag.identity.clone(),
            iss: claims.iss,
            sub: claims.sub,
            jti: claims.jti,
            exp: claims.exp,
        }
    }
}

/// How long a successful proof of one exact token is reused before the
/// signature is checked again. Short: a key removed from the JWKS stops
/// being honoured within this much more time (live sessions are checked
/// again without this cache anyway).
pub const PROOF_REUSE: std::time::Duration = std::time::Duration::from_secs(1);
/// (issuer name, required subject, token).
type ProofKey = (String, String, String);

/// Most cached proofs.
const PROOF_CACHE_MAX: usize = 4096;

/// Verifiers per issuer and token files per path.
#[derive(Default)]
pub struct IdentityBinder {
    /// (issuer, subject, token) → proof and when it was made.
    proofs: Mutex<HashMap<ProofKey, (ProvenIdentity, std::time::Instant)>>,
    verifiers: RwLock<HashMap<String, (Issuer, Arc<Verifier>)>>,
    broken: RwLock<HashMap<String, String>>,
    token_files: Mutex<HashMap<PathBuf, Arc<TokenFile>>>,
}

impl IdentityBinder {
    /// Makes the verifiers match the issuers of `policy`: new or changed
    /// issuers get a fresh verifier (keys load on first use or refresh),
    /// unchanged ones keep their cached keys.
    pub fn sync(&self, policy: &PolicySet) -> Vec<Arc<Verifier>> {
        let mut fresh = Vec::new();
        let mut verifiers = self.verifiers.write().unwrap_or_else(|p| p.into_inner());
        let mut broken = self.broken.write().unwrap_or_else(|p| p.into_inner());
        verifiers.retain(|name, (cfg, _)| policy.issuers.get(name) == Some(cfg));
        // A changed issuer must prove everything again.
        self.proofs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        broken.clear();
        for (name, issuer) in &policy.issuers {
            if verifiers.contains_key(name) {
                continue;
            }
            let jwks = match (&issuer.jwks_file, &issuer.jwks_url) {
                (Some(f), _) => JwksSource::File(f.clone()),
                (None, Some(u)) => JwksSource::Url {
                    url: u.clone(),
                    ca_file: issuer.ca_file.clone(),
                },
                (None, None) => {
                    broken.insert(name.clone(), "no JWKS source".into());
                    continue;
                }
            };
            let mut cfg = IssuerConfig::new(
                name.clone(),
                issuer.url.clone(),
                issuer.audiences.clone(),
                jwks,
            );
            cfg.subject_claim = issuer.subject_claim.clone();
            match Verifier::new(cfg) {
                Ok(v) => {
                    let v = Arc::new(v);
                    fresh.push(v.clone());
                    verifiers.insert(name.clone(), (issuer.clone(), v));
                }
                Err(e) => {
                    broken.insert(name.clone(), e.to_string());
                }
            }
        }
        fresh
    }

    /// Every verifier (for periodic key refresh).
    pub fn all(&self) -> Vec<Arc<Verifier>> {
        self.verifiers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn token_file(&self, path: &std::path::Path) -> Arc<TokenFile> {
        self.token_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(path.to_path_buf())
            .or_insert_with(|| Arc::new(TokenFile::new(path)))
            .clone()
    }

    fn lookup(
        &self,
        policy: &PolicySet,
        tag: &Tag,
    ) -> Result<(Arc<Verifier>, String, String), IdentityError> {
        self.lookup_with_issuer(policy, tag)
            .map(|(v, t, s, _)| (v, t, s))
    }

    /// The verifier, the current token, the required subject and the issuer
    /// name for `tag`.
    fn lookup_with_issuer(
        &self,
        policy: &PolicySet,
        tag: &Tag,
    ) -> Result<(Arc<Verifier>, String, String, String), IdentityError> {
        let identity = policy
            .identities
            .get(&tag.identity)
            .ok_or_else(|| IdentityError::NotDefined(tag.identity.clone()))?;
        let verifier = self
            .verifiers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&identity.issuer)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| IdentityError::IssuerUnavailable(identity.issuer.clone()))?;
        let path = tag
            .token_file
            .as_ref()
            .ok_or_else(|| IdentityError::NoTokenFile(tag.cgroup.clone()))?;
        let token = self.token_file(path).current()?;
        Ok((
            verifier,
            token,
            identity.subject.clone(),
            identity.issuer.clone(),
        ))
    }

    /// Proves the identity of `tag` (may load issuer keys: use off the
    /// per-command path, e.g. at flow setup).
    pub async fn prove(
        &self,
        policy: &PolicySet,
        tag: &Tag,
    ) -> Result<ProvenIdentity, IdentityError> {
        let (verifier, token, subject, issuer) = self.lookup_with_issuer(policy, tag)?;
        let key = (issuer, subject, token);
        let now_secs = crate::proxy::session::now_ms() / 1000;
        if let Some((p, at)) = self
            .proofs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            if at.elapsed() < PROOF_REUSE && p.exp > now_secs && p.name == tag.identity {
                return Ok(p.clone());
            }
        }
        let claims = verifier.validate(&key.2, &key.1).await?;
        let proof = ProvenIdentity::new(tag, claims);
        let mut proofs = self.proofs.lock().unwrap_or_else(|p| p.into_inner());
        if proofs.len() >= PROOF_CACHE_MAX {
            proofs.retain(|_, (_, at)| at.elapsed() < PROOF_REUSE);
            if proofs.len() >= PROOF_CACHE_MAX {
                proofs.clear();
            }
        }
        proofs.insert(key, (proof.clone(), std::time::Instant::now()));
        Ok(proof)
    }

    /// Validates `token` (e.g. one an agent sent in-band) as an OIDC token
    /// of `identity`: its issuer's keys, audience and the identity's
    /// subject. May load keys (as [`IdentityBinder::prove`]).
    pub async fn validate_token(
        &self,
        policy: &PolicySet,
        identity: &str,
        token: &str,
    ) -> Result<(), IdentityError> {
        let id = policy
            .identities
            .get(identity)
            .ok_or_else(|| IdentityError::NotDefined(identity.to_string()))?;
        let verifier = self
            .verifiers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id.issuer)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| IdentityError::IssuerUnavailable(id.issuer.clone()))?;
        verifier.validate(token, &id.subject).await?;
        Ok(())
    }

    /// Like [`IdentityBinder::prove`] from cached keys only: no network I/O.
    pub fn prove_cached(
        &self,
        policy: &PolicySet,
        tag: &Tag,
    ) -> Result<ProvenIdentity, IdentityError> {
        let (verifier, token, subject) = self.lookup(policy, tag)?;
        let claims = verifier.validate_cached(&token, &subject)?;
        Ok(ProvenIdentity::new(tag, claims))
    }
}
