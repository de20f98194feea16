//! The daemon's local certificate authority for TLS interception.
//!
//! Owns `<state>/ca/ca.crt` (public, exported so agent containers can trust
//! it) and `<state>/ca/ca.key` (mode 0600, never leaves the host), generated
//! once, and a bounded cache of leaf certificates minted for the names
//! agents dial. It must not decide anything about a flow: the TLS accept
//! path asks it for a leaf and nothing else.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Leaves cached at most (a full cache is emptied: minting is ~150 µs).
const LEAF_CACHE_MAX: usize = 4096;
/// How long a minted leaf is valid.
const LEAF_VALIDITY: Duration = Duration::from_secs(7 * 86_400);
/// A cached leaf is replaced once it is this old (well before it expires).
const LEAF_REUSE: Duration = Duration::from_secs(86_400);
/// How long the CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// The CA's subject common name. Leaves name it as their issuer, so it is
/// fixed: the issuer is rebuilt from it and the stored key on every start.
const CA_NAME: &str = "Portcullis local interception CA";
const CA_ORG: &str = "Portcullis";

/// Errors of the local CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing the CA files.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Generating or parsing keys and certificates.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// rustls refused the minted key.
    #[error("tls key: {0}")]
    Tls(#[from] rustls::Error),
    /// The stored CA certificate is not PEM.
    #[error("{0}: not a PEM certificate")]
    BadPem(PathBuf),
}

/// The local CA and its leaf cache.
pub struct LocalCa {
    cert_path: PathBuf,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, (Instant, Arc<CertifiedKey>)>>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    dn.push(DnType::OrganizationName, CA_ORG);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl LocalCa {
    /// Loads the CA from `dir` (`ca.crt`, `ca.key`), creating it on first
    /// use. The key file is written with mode 0600 before any byte of it.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        let (cert_pem, key) = if cert_path.exists() && key_path.exists() {
            let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
            let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
            (cert_pem, KeyPair::from_pem(&key_pem)?)
        } else {
            let key = KeyPair::generate()?;
            let mut params = ca_params();
            let now = time_now();
            params.not_before = now - Duration::from_secs(3600);
            params.not_after = now + CA_VALIDITY;
            let cert = params.self_signed(&key)?;
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            // Written last: its presence means the pair is complete.
            let tmp = dir.join("ca.crt.tmp");
            fs::write(&tmp, cert.pem()).map_err(io_err(&tmp))?;
            fs::rename(&tmp, &cert_path).map_err(io_err(&cert_path))?;
            (cert.pem(), key)
        };
        let cert_der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| CaError::BadPem(cert_path.clone()))?;
        Ok(Self {
            cert_path,
            cert_der,
            issuer: Issuer::new(ca_params(), key),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// Where the CA certificate (PEM) is: what agents must trust.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A leaf for `name` (a DNS name, or an IP address when the agent sent
    /// no SNI), from the cache or freshly minted.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let key = name.to_ascii_lowercase();
        {
            let cache = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, leaf)) = cache.get(&key) {
                if at.elapsed() < LEAF_REUSE {
                    return Ok(leaf.clone());
                }
            }
        }
        let leaf = Arc::new(self.mint(&key)?);
        let mut cache = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= LEAF_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, (Instant::now(), leaf.clone()));
        Ok(leaf)
    }

    fn mint(&self, name: &str) -> Result<CertifiedKey, CaError> {
        // rcgen makes an IP SAN of anything that parses as an address.
        let name = match name.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => name.to_string(),
        };
        let mut params = CertificateParams::new(vec![name.clone()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time_now();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + LEAF_VALIDITY;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            signer,
        ))
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_is_created_once_and_leaves_verify_against_it() {
        let dir = crate::testutil::TempDir::new("http", "ca");
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let pem1 = fs::read(ca.cert_path()).unwrap();
        // A restart keeps the same CA, and its leaves chain to it.
        let ca2 = LocalCa::load_or_create(dir.path()).unwrap();
        assert_eq!(pem1, fs::read(ca2.cert_path()).unwrap());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        for name in ["api.example.com", "127.0.0.1", "::1"] {
            let leaf = ca2.leaf(name).unwrap();
            let sn = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
            verifier
                .verify_server_cert(
                    &leaf.cert[0],
                    &leaf.cert[1..],
                    &sn,
                    &[],
                    rustls_pki_types::UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            // Cached: the same leaf comes back.
            assert!(Arc::ptr_eq(&leaf, &ca2.leaf(name).unwrap()));
        }
        let other = rustls_pki_types::ServerName::try_from("evil.example.com").unwrap();
        let leaf = ca2.leaf("api.example.com").unwrap();
        assert!(verifier
            .verify_server_cert(
                &leaf.cert[0],
                &[],
                &other,
                &[],
                rustls_pki_types::UnixTime::now()
            )
            .is_err());
    }
}
