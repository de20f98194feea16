//! Host keys on both legs: the daemon's own SSH host key (what agents see)
//! and the checks that the real server's host key is the expected one.
//!
//! Owns `<state>/ssh/host_ed25519` (generated once, mode 0600, with its
//! `.pub` beside it), loading a resource's own `host_key_file` /
//! `host_certificate_file`, and verifying upstream host keys against a
//! `known_hosts` file or a host CA. It must not open connections.

use std::{
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use russh::keys::{
    ssh_key::{
        certificate::CertType,
        known_hosts::{Entry, HostPatterns, Marker},
        private::Ed25519Keypair,
        LineEnding,
    },
    Certificate, HashAlg, PrivateKey, PublicKey, PublicKeyOrCertificate,
};

use super::SshError;

/// File name of the daemon's host key under `<state>/ssh/`.
pub const HOST_KEY_FILE: &str = "host_ed25519";

/// The daemon's host key: loads `<state>/ssh/host_ed25519`, generating it
/// (and `host_ed25519.pub`) the first time.
pub fn ensure_daemon_key(state_dir: &Path) -> Result<Arc<PrivateKey>, SshError> {
    let dir = state_dir.join("ssh");
    let path = dir.join(HOST_KEY_FILE);
    if path.exists() {
        return load_private(&path).map(Arc::new);
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| SshError::io(&dir, e))?;
    let seed = crate::audit::random_seed().map_err(|e| SshError::io(&path, e))?;
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| SshError::key(&path, e))?;
    // Written under a temporary name and renamed, so a crash never leaves a
    // torn key that the next start would refuse.
    let tmp = dir.join(format!(".{HOST_KEY_FILE}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| SshError::io(&tmp, e))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| SshError::io(&tmp, e))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| SshError::key(&path, e))?;
    let pub_path = dir.join(format!("{HOST_KEY_FILE}.pub"));
    fs::write(&pub_path, format!("{public} portcullis\n"))
        .map_err(|e| SshError::io(&pub_path, e))?;
    fs::rename(&tmp, &path).map_err(|e| SshError::io(&path, e))?;
    Ok(Arc::new(key))
}

/// Loads an unencrypted OpenSSH private key.
pub fn load_private(path: &Path) -> Result<PrivateKey, SshError> {
    russh::keys::load_secret_key(path, None).map_err(|e| SshError::key(path, e))
}

/// Loads an OpenSSH certificate (`*-cert.pub`).
pub fn load_certificate(path: &Path) -> Result<Certificate, SshError> {
    let text = fs::read_to_string(path).map_err(|e| SshError::io(path, e))?;
    Certificate::from_openssh(text.trim()).map_err(|e| SshError::key(path, e))
}

/// The SHA-256 fingerprint of a key as OpenSSH prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// What the upstream's host key must match.
#[derive(Debug, Clone)]
pub struct HostTrust {
    /// Entries of the resource's `known_hosts` file.
    known_hosts: Vec<Entry>,
    /// CA keys of the resource's `host_ca` file.
    host_cas: Vec<PublicKey>,
    /// The names the upstream is known by (`host`, `[host]:port`).
    names: Vec<String>,
    /// The bare host names certificate principals are checked against.
    principals: Vec<String>,
}

impl HostTrust {
    /// Reads the resource's trust files. `hosts` are the upstream's names
    /// (address and, when configured by name, the host name); `port` its
    /// port. Strict: with neither file there is nothing to trust.
    pub fn load(
        known_hosts: Option<&PathBuf>,
        host_ca: Option<&PathBuf>,
        hosts: &[String],
        port: u16,
    ) -> Result<Self, SshError> {
        if known_hosts.is_none() && host_ca.is_none() {
            return Err(SshError::Config(
                "the resource has neither `known_hosts` nor `host_ca`: the upstream host key cannot be verified".into(),
            ));
        }
        let mut entries = Vec::new();
        if let Some(p) = known_hosts {
            let text = fs::read_to_string(p).map_err(|e| SshError::io(p, e))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                match line.parse::<Entry>() {
                    Ok(e) => entries.push(e),
                    Err(e) => {
                        return Err(SshError::Config(format!(
                            "{}:{}: not a known_hosts entry: {e}",
                            p.display(),
                            n + 1
                        )))
                    }
                }
            }
        }
        let mut cas = Vec::new();
        if let Some(p) = host_ca {
            let text = fs::read_to_string(p).map_err(|e| SshError::io(p, e))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                // Either a bare public key line or a known_hosts
                // `@cert-authority` line.
                let key = match line.parse::<Entry>() {
                    Ok(e) if e.marker() == Some(&Marker::CertAuthority) => {
                        Ok(e.public_key().clone())
                    }
                    _ => PublicKey::from_openssh(line),
                };
                match key {
                    Ok(k) => cas.push(k),
                    Err(e) => {
                        return Err(SshError::Config(format!(
                            "{}:{}: not a CA public key: {e}",
                            p.display(),
                            n + 1
                        )))
                    }
                }
            }
            if cas.is_empty() {
                return Err(SshError::Config(format!(
                    "{}: no CA public key in the file",
                    p.display()
                )));
            }
        }
        let mut names = Vec::new();
        for h in hosts {
            names.push(if port == 22 {
                h.clone()
            } else {
                format!("[{h}]:{port}")
            });
        }
        Ok(Self {
            known_hosts: entries,
            host_cas: cas,
            names,
            principals: hosts.to_vec(),
        })
    }

    /// Whether certificates can be accepted at all (so the client should
    /// offer certificate host key algorithms).
    pub fn accepts_certificates(&self) -> bool {
        !self.host_cas.is_empty()
            || self
                .known_hosts
                .iter()
                .any(|e| e.marker() == Some(&Marker::CertAuthority))
    }

    /// Checks the key or certificate the upstream presented. `Err` says
    /// why it is not trusted.
    pub fn verify(&self, presented: &PublicKeyOrCertificate) -> Result<(), String> {
        let matching = |e: &&Entry| {
            self.names
                .iter()
                .any(|n| host_matches(e.host_patterns(), n))
        };
        match presented {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                self.check_revoked(key)?;
                let ok = self
                    .known_hosts
                    .iter()
                    .filter(|e| e.marker().is_none())
                    .filter(matching)
                    .any(|e| e.public_key().key_data() == key.key_data());
                if ok {
                    Ok(())
                } else {
                    Err(format!(
                        "host key {} of {} is not in known_hosts",
                        fingerprint(key),
                        self.names.join(", ")
                    ))
                }
            }
            PublicKeyOrCertificate::Certificate(cert) => {
                let signer = PublicKey::from(cert.signature_key().clone());
                self.check_revoked(&signer)?;
                self.check_revoked(&PublicKey::from(cert.public_key().clone()))?;
                let mut cas: Vec<_> = self
                    .host_cas
                    .iter()
                    .map(|k| k.fingerprint(HashAlg::Sha256))
                    .collect();
                cas.extend(
                    self.known_hosts
                        .iter()
                        .filter(|e| e.marker() == Some(&Marker::CertAuthority))
                        .filter(matching)
                        .map(|e| e.public_key().fingerprint(HashAlg::Sha256)),
                );
                if cert.cert_type() != CertType::Host {
                    return Err("the upstream presented a user certificate as host key".into());
                }
                cert.validate(cas.iter()).map_err(|_| {
                    format!(
                        "host certificate {:?} is not signed by a trusted host CA or not valid now",
                        cert.key_id()
                    )
                })?;
                if !cert
                    .valid_principals()
                    .iter()
                    .any(|p| self.principals.iter().any(|h| h == p))
                {
                    return Err(format!(
                        "host certificate {:?} names {:?}, not {}",
                        cert.key_id(),
                        cert.valid_principals(),
                        self.principals.join(", ")
                    ));
                }
                if !cert.critical_options().is_empty() {
                    return Err("host certificate has critical options".into());
                }
                Ok(())
            }
        }
    }

    fn check_revoked(&self, key: &PublicKey) -> Result<(), String> {
        let revoked = self
            .known_hosts
            .iter()
            .filter(|e| e.marker() == Some(&Marker::Revoked))
            .any(|e| e.public_key().key_data() == key.key_data());
        if revoked {
            Err(format!("key {} is marked @revoked", fingerprint(key)))
        } else {
            Ok(())
        }
    }
}

/// OpenSSH host pattern matching: comma-separated patterns with `*` and
/// `?`, `!` negation (a negated match wins), or a hashed name.
fn host_matches(patterns: &HostPatterns, name: &str) -> bool {
    match patterns {
        HostPatterns::Patterns(list) => {
            let mut hit = false;
            for p in list {
                if let Some(neg) = p.strip_prefix('!') {
                    if wildcard(neg.as_bytes(), name.as_bytes()) {
                        return false;
                    }
                } else if wildcard(p.as_bytes(), name.as_bytes()) {
                    hit = true;
                }
            }
            hit
        }
        HostPatterns::HashedName { salt, hash } => {
            use hmac::{KeyInit, Mac};
            match hmac::Hmac::<sha1::Sha1>::new_from_slice(salt) {
                Ok(mac) => mac.chain_update(name.as_bytes()).verify_slice(hash).is_ok(),
                Err(_) => false,
            }
        }
    }
}

/// `*` and `?` glob match, iterative (no recursion on untrusted input).
fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c.eq_ignore_ascii_case(&text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_and_negation() {
        assert!(wildcard(b"*.example.com", b"a.example.com"));
        assert!(wildcard(b"[127.0.0.1]:22?2", b"[127.0.0.1]:2222"));
        assert!(!wildcard(b"*.example.com", b"example.org"));
        assert!(wildcard(b"*", b""));
        let p = HostPatterns::Patterns(vec!["*.corp".into(), "!bad.corp".into()]);
        assert!(host_matches(&p, "good.corp"));
        assert!(!host_matches(&p, "bad.corp"));
    }

    #[test]
    fn daemon_key_is_generated_once_with_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::testutil::TempDir::new("ssh", "key");
        let a = ensure_daemon_key(dir.path()).unwrap();
        let b = ensure_daemon_key(dir.path()).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        let meta = fs::metadata(dir.path().join("ssh").join(HOST_KEY_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let pubtext = fs::read_to_string(dir.path().join("ssh/host_ed25519.pub")).unwrap();
        assert!(pubtext.starts_with("ssh-ed25519 "));
    }

    #[test]
    fn strict_without_trust_files_and_known_hosts_matching() {
        let dir = crate::testutil::TempDir::new("ssh", "trust");
        assert!(HostTrust::load(None, None, &["h".into()], 22).is_err());
        let key = ensure_daemon_key(dir.path()).unwrap();
        let other = PrivateKey::from(Ed25519Keypair::from_seed(&[7u8; 32]));
        let kh = dir.path().join("known_hosts");
        let line = key.public_key().to_openssh().unwrap();
        fs::write(&kh, format!("# comment\n[10.0.0.7]:2222,other {line}\n")).unwrap();
        let t = HostTrust::load(Some(&kh), None, &["10.0.0.7".into()], 2222).unwrap();
        let pk = |k: &PrivateKey| PublicKeyOrCertificate::PublicKey {
            key: k.public_key().clone(),
            hash_alg: None,
        };
        assert!(t.verify(&pk(&key)).is_ok());
        assert!(t.verify(&pk(&other)).is_err());
        let t = HostTrust::load(Some(&kh), None, &["10.0.0.7".into()], 22).unwrap();
        assert!(t.verify(&pk(&key)).is_err(), "port is part of the name");
        fs::write(&kh, "garbage line\n").unwrap();
        assert!(HostTrust::load(Some(&kh), None, &["h".into()], 22).is_err());
    }
}
