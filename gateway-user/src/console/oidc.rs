//! Sign-in: the OpenID Connect authorization code flow with PKCE (S256),
//! `state` and `nonce`, as a confidential client of an issuer of the
//! policies. The ID token is checked by the same [`Verifier`] the agents'
//! tokens go through (signature by the issuer's configured JWKS, allowed
//! algorithms only, `iss`, `exp`, `nbf`), with the console's client id as
//! the audience, then its `nonce` and `azp`.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use sha2::{Digest, Sha256};

use super::{client, web::url_encode};
use crate::{
    identity::oidc::{IssuerConfig, JwksSource, Verifier},
    policy::Issuer,
};

/// How long a fetched discovery document is used.
const DISCOVERY_TTL: Duration = Duration::from_secs(300);

/// Why a sign-in failed.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// The provider could not be reached or answered nonsense.
    #[error("identity provider: {0}")]
    Provider(String),
    /// The ID token did not validate.
    #[error("ID token refused: {0}")]
    Token(String),
    /// The console is misconfigured (issuer missing from the policies...).
    #[error("console configuration: {0}")]
    Config(String),
}

/// The endpoints of the discovery document.
#[derive(Debug, Clone)]
struct Endpoints {
    authorization: String,
    token: String,
}

/// One issuer as the console's provider.
pub struct Provider {
    /// The issuer as the policies define it.
    pub issuer: Issuer,
    verifier: Verifier,
    tls: Arc<rustls::ClientConfig>,
    endpoints: Mutex<Option<(Endpoints, Instant)>>,
}

/// A random URL-safe string of `n` random bytes.
pub fn random_token(n: usize) -> String {
    let mut buf = vec![0u8; n];
    // aws-lc's DRBG, seeded by the kernel; it does not fail once initialised.
    if aws_lc_rs::rand::fill(&mut buf).is_err() {
        let seed = crate::audit::random_seed().unwrap_or_default();
        let mut h = Sha256::new();
        h.update(seed);
        h.update(Instant::now().elapsed().as_nanos().to_le_bytes());
        buf.iter_mut()
            .zip(h.finalize().iter().cycle())
            .for_each(|(b, s)| *b = *s);
    }
    URL_SAFE_NO_PAD.encode(buf)
}

/// The PKCE S256 challenge of `verifier`.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

impl Provider {
    /// A provider for `issuer`, whose ID tokens must name `client_id` as
    /// their audience.
    pub fn new(issuer: &Issuer, client_id: &str) -> Result<Self, SignInError> {
        client::target(&issuer.url).map_err(SignInError::Config)?;
        let jwks = match (&issuer.jwks_file, &issuer.jwks_url) {
            (Some(f), _) => JwksSource::File(f.clone()),
            (None, Some(u)) => JwksSource::Url {
                url: u.clone(),
                ca_file: issuer.ca_file.clone(),
            },
            (None, None) => {
                return Err(SignInError::Config(format!(
                    "issuer {} has no JWKS source",
                    issuer.name
                )))
            }
        };
        let cfg = IssuerConfig::new(
            format!("{} (console)", issuer.name),
            issuer.url.clone(),
            vec![client_id.to_string()],
            jwks,
        );
        let verifier = Verifier::new(cfg).map_err(|e| SignInError::Config(e.to_string()))?;
        let tls = client::tls_config(issuer.ca_file.as_deref()).map_err(SignInError::Config)?;
        Ok(Self {
            issuer: issuer.clone(),
            verifier,
            tls,
            endpoints: Mutex::new(None),
        })
    }

    async fn endpoints(&self) -> Result<Endpoints, SignInError> {
        if let Some((e, at)) = &*self.endpoints.lock().unwrap_or_else(|p| p.into_inner()) {
            if at.elapsed() < DISCOVERY_TTL {
                return Ok(e.clone());
            }
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.url.trim_end_matches('/')
        );
        let (status, body) = client::call(&self.tls, "GET", &url, &[], None)
            .await
            .map_err(SignInError::Provider)?;
        if status != 200 {
            return Err(SignInError::Provider(format!(
                "{url}: HTTP status {status}"
            )));
        }
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| SignInError::Provider(format!("{url}: not JSON: {e}")))?;
        // OIDC Discovery 4.3: the document must name the issuer it is for.
        if doc["issuer"].as_str() != Some(self.issuer.url.as_str()) {
            return Err(SignInError::Provider(format!(
                "{url}: the document's issuer is not {}",
                self.issuer.url
            )));
        }
        let endpoint = |k: &str| -> Result<String, SignInError> {
            let v = doc[k]
                .as_str()
                .ok_or_else(|| SignInError::Provider(format!("{url}: no {k}")))?;
            client::target(v).map_err(SignInError::Provider)?;
            Ok(v.to_string())
        };
        let e = Endpoints {
            authorization: endpoint("authorization_endpoint")?,
            token: endpoint("token_endpoint")?,
        };
        *self.endpoints.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((e.clone(), Instant::now()));
        Ok(e)
    }

    /// The URL the browser is sent to for sign-in.
    pub async fn authorize_url(
        &self,
        client_id: &str,
        redirect_url: &str,
        state: &str,
        nonce: &str,
        code_verifier: &str,
    ) -> Result<String, SignInError> {
        let e = self.endpoints().await?;
        let sep = if e.authorization.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok(format!(
            "{}{sep}response_type=code&scope=openid&client_id={}&redirect_uri={}&state={}&nonce={}&code_challenge={}&code_challenge_method=S256",
            e.authorization,
            url_encode(client_id),
            url_encode(redirect_url),
            url_encode(state),
            url_encode(nonce),
            url_encode(&pkce_challenge(code_verifier)),
        ))
    }

    /// Redeems `code` and validates the ID token; returns its claims.
    pub async fn redeem(
        &self,
        client_id: &str,
        client_secret: Option<&str>,
        redirect_url: &str,
        code: &str,
        code_verifier: &str,
        nonce: &str,
    ) -> Result<crate::identity::oidc::Claims, SignInError> {
        let e = self.endpoints().await?;
        let body = format!(
            "grant_type=authorization_code&code={}&redirect_uri={}&code_verifier={}&client_id={}",
            url_encode(code),
            url_encode(redirect_url),
            url_encode(code_verifier),
            url_encode(client_id),
        );
        let mut headers = vec![(
            "content-type",
            "application/x-www-form-urlencoded".to_string(),
        )];
        if let Some(secret) = client_secret {
            // RFC 6749 2.3.1: both parts form-encoded before base64.
            let basic = base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                url_encode(client_id),
                url_encode(secret)
            ));
            headers.push(("authorization", format!("Basic {basic}")));
        }
        let (status, answer) = client::call(
            &self.tls,
            "POST",
            &e.token,
            &headers,
            Some(body.into_bytes()),
        )
        .await
        .map_err(SignInError::Provider)?;
        let doc: serde_json::Value = serde_json::from_slice(&answer).map_err(|_| {
            SignInError::Provider(format!("token endpoint: HTTP {status}, not JSON"))
        })?;
        if status != 200 {
            return Err(SignInError::Provider(format!(
                "token endpoint: HTTP {status}: {}",
                super::web::clip(doc["error"].as_str().unwrap_or("no error code"), 80)
            )));
        }
        let id_token = doc["id_token"]
            .as_str()
            .ok_or_else(|| SignInError::Provider("token endpoint sent no id_token".into()))?;
        let claims = self
            .verifier
            .validate_any_subject(id_token)
            .await
            .map_err(|e| SignInError::Token(e.to_string()))?;
        if claims.raw["nonce"].as_str() != Some(nonce) {
            return Err(SignInError::Token(
                "nonce does not match the sign-in".into(),
            ));
        }
        // OIDC Core 3.1.3.7: with several audiences, azp must be us; when
        // present it must be us anyway.
        match claims.raw.get("azp").and_then(|v| v.as_str()) {
            Some(azp) if azp != client_id => {
                return Err(SignInError::Token("azp is another client".into()))
            }
            None if claims.aud.len() > 1 => {
                return Err(SignInError::Token("several audiences and no azp".into()))
            }
            _ => {}
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_rfc7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let a = random_token(32);
        assert_eq!(a.len(), 43);
        assert_ne!(a, random_token(32));
    }
}
