//! The upstream leg: a russh client that connects to the real server from
//! the daemon's cgroup, verifies its host key strictly ([`HostTrust`]) and
//! logs in with the resource's held key (and certificate).
//!
//! Owns the upstream connection's setup and its host-key check. It must not
//! relay channels (that is [`super::channel`]) or decide anything.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use russh::{
    client,
    keys::{Algorithm, EcdsaCurve, HashAlg, PrivateKeyWithHashAlg, PublicKeyOrCertificate},
};

use super::{hostkey, hostkey::HostTrust, SshError};
use crate::{policy::Destination, proxy::Flow};

/// How long connecting, the key exchange and login may take together.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(20);

/// A logged-in upstream connection.
pub type UpstreamHandle = client::Handle<UpstreamHandler>;

/// The client handler: checks the server's host key; everything else
/// arrives on channels.
pub struct UpstreamHandler {
    trust: HostTrust,
    /// Why the host key was rejected, for the error message.
    rejected: Arc<Mutex<Option<String>>>,
}

/// Errors the client handler reports to russh.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UpstreamHandlerError(String);

impl From<russh::Error> for UpstreamHandlerError {
    fn from(e: russh::Error) -> Self {
        Self(e.to_string())
    }
}

impl client::Handler for UpstreamHandler {
    type Error = UpstreamHandlerError;

    async fn check_server_key(
        &mut self,
        presented: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match self.trust.verify(presented) {
            Ok(()) => Ok(true),
            Err(why) => {
                if let Ok(mut r) = self.rejected.lock() {
                    *r = Some(why);
                }
                Ok(false)
            }
        }
    }
}

/// The ciphers offered to the upstream server, first choice first (in SSH
/// the client's order picks). Where the CPU has AES and carry-less
/// multiply instructions, AES-256-GCM costs the daemon and the server less
/// per byte than ChaCha20-Poly1305 (russh's and OpenSSH's first choice,
/// which stays first elsewhere): every byte of a transfer is decrypted and
/// encrypted once more on this leg than directly. Both are AEAD ciphers
/// OpenSSH offers by default; the agent's leg keeps the agent's choice.
fn upstream_ciphers() -> &'static [russh::cipher::Name] {
    const AES_FIRST: &[russh::cipher::Name] = &[
        russh::cipher::AES_256_GCM,
        russh::cipher::CHACHA20_POLY1305,
        russh::cipher::AES_256_CTR,
        russh::cipher::AES_192_CTR,
        russh::cipher::AES_128_CTR,
    ];
    if aes_in_hardware() {
        AES_FIRST
    } else {
        &russh::Preferred::DEFAULT.cipher
    }
}

/// Whether AES-GCM runs on dedicated instructions here.
fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The names the upstream is known by: its address and, when the resource
/// names it by host name, that name.
fn host_names(flow: &Flow, ip: IpAddr) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(Destination::Host { host, .. }) = &flow.resource.upstream {
        names.push(host.clone());
    }
    names.push(ip.to_string());
    names
}

/// Connects to the flow's upstream and logs in as `user`.
pub async fn connect(flow: &Flow, user: &str) -> Result<UpstreamHandle, SshError> {
    tokio::time::timeout(LOGIN_TIMEOUT, connect_inner(flow, user))
        .await
        .map_err(|_| SshError::Upstream("connect and login timed out".into()))?
}

async fn connect_inner(flow: &Flow, user: &str) -> Result<UpstreamHandle, SshError> {
    let res = &flow.resource;
    let key_path = res
        .credentials
        .private_key_file
        .as_ref()
        .ok_or_else(|| SshError::Config("no credentials.private_key_file".into()))?;
    let key = Arc::new(hostkey::load_private(key_path)?);
    let cert = match &res.credentials.certificate_file {
        Some(p) => Some(hostkey::load_certificate(p)?),
        None => None,
    };
    let addr = flow
        .upstream_addr()
        .await
        .map_err(|e| SshError::Upstream(e.to_string()))?;
    let trust = HostTrust::load(
        res.known_hosts.as_ref(),
        res.host_ca.as_ref(),
        &host_names(flow, addr.ip()),
        addr.port(),
    )?;
    let mut preferred = russh::Preferred {
        cipher: std::borrow::Cow::Borrowed(upstream_ciphers()),
        ..russh::Preferred::default()
    };
    if trust.accepts_certificates() {
        preferred.host_key_certificates = std::borrow::Cow::Owned(vec![
            Algorithm::Ed25519,
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP384,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP521,
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
        ]);
    }
    let config = Arc::new(client::Config {
        preferred,
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        window_size: super::SSH_UPSTREAM_WINDOW,
        ..Default::default()
    });
    let tcp = flow
        .connect_upstream()
        .await
        .map_err(|e| SshError::Upstream(format!("connect {addr}: {e}")))?;
    let rejected = Arc::new(Mutex::new(None));
    let handler = UpstreamHandler {
        trust,
        rejected: rejected.clone(),
    };
    let mut handle = match client::connect_stream(config, tcp, handler).await {
        Ok(h) => h,
        Err(e) => {
            let why = rejected.lock().ok().and_then(|mut r| r.take());
            return Err(SshError::Upstream(match why {
                Some(w) => format!("host key of {addr} not trusted: {w}"),
                None => format!("ssh handshake with {addr}: {e}"),
            }));
        }
    };
    let auth = match cert {
        Some(cert) => handle.authenticate_openssh_cert(user, key, cert).await,
        None => {
            let hash = handle
                .best_supported_rsa_hash()
                .await
                .ok()
                .flatten()
                .flatten();
            handle
                .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash))
                .await
        }
    }
    .map_err(|e| SshError::Upstream(format!("login to {addr}: {e}")))?;
    if !auth.success() {
        return Err(SshError::Upstream(format!(
            "{addr} refused the held key for user {user:?}"
        )));
    }
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_leg_prefers_aes_gcm_only_where_the_cpu_runs_it() {
        let offered = upstream_ciphers();
        if aes_in_hardware() {
            assert_eq!(offered[0], russh::cipher::AES_256_GCM);
        } else {
            assert_eq!(offered, &*russh::Preferred::DEFAULT.cipher);
        }
        // The same set as russh's defaults, in another order: nothing
        // weaker is offered, nothing the server may need is dropped.
        let mut ours: Vec<&str> = offered.iter().map(|n| n.as_ref()).collect();
        let mut defaults: Vec<&str> = russh::Preferred::DEFAULT
            .cipher
            .iter()
            .map(|n| n.as_ref())
            .collect();
        ours.sort_unstable();
        defaults.sort_unstable();
        assert_eq!(ours, defaults);
    }
}
