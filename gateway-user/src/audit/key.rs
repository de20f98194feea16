//! The checkpoint signing key: created once (mode 0600) beside the public key
//! file, loaded on every open, never replaced behind an existing chain.
//!
//! Files are one line of lowercase hex each: `audit.key` holds the 32-byte
//! Ed25519 secret seed, `audit.pub` the 32-byte public key (RFC 8032
//! encoding), both followed by a newline.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use ed25519_dalek::{SigningKey, VerifyingKey};

use super::AuditError;

/// Reads 32 bytes of key material from the kernel (getrandom(2)).
pub(crate) fn random_seed() -> io::Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    let mut filled = 0;
    while filled < seed.len() {
        let rest = &mut seed[filled..];
        // SAFETY: the pointer and length describe `rest`, a live mutable slice.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(seed)
}

fn decode_hex32(path: &Path, text: &str, what: &str) -> Result<[u8; 32], AuditError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).map_err(|e| AuditError::BadKey {
        path: path.to_path_buf(),
        reason: format!("expected {what} as 64 hex characters: {e}"),
    })?;
    Ok(out)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Loads a public key file (64 hex characters, surrounding whitespace
/// ignored), as written to `audit.pub`.
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, AuditError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let bytes = decode_hex32(path, &text, "an Ed25519 public key")?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| AuditError::BadKey {
        path: path.to_path_buf(),
        reason: format!("not an Ed25519 public key: {e}"),
    })
}

/// Loads the secret key file.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, AuditError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let seed = decode_hex32(path, &text, "an Ed25519 secret seed")?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Creates a new secret key file (mode 0600, never overwriting) and returns
/// the key.
pub fn create_signing_key(path: &Path) -> Result<SigningKey, AuditError> {
    let seed = random_seed().map_err(io_err(path))?;
    let key = SigningKey::from_bytes(&seed);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    let mut text = hex::encode(seed);
    text.push('\n');
    file.write_all(text.as_bytes()).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    sync_parent(path);
    Ok(key)
}

/// Writes the public key file (mode 0644) through a rename.
pub fn write_public_key(path: &Path, key: &VerifyingKey) -> Result<(), AuditError> {
    let mut text = hex::encode(key.as_bytes());
    text.push('\n');
    let tmp = path.with_extension("pub.tmp");
    let write = || -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(io_err(path))?;
    sync_parent(path);
    Ok(())
}

/// Best-effort fsync of `path`'s directory, so a created or renamed entry
/// survives a host crash.
pub fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent() {
        let dir = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}
