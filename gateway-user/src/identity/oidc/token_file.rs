//! Token files: where an identity's OIDC token is read from (a tag's
//! `--token-file`). A Kubernetes projected service-account token, or any
//! file that an external agent rewrites, rotates in place: by an atomic
//! rename, or by swapping a `..data` symlink. [`TokenFile`] notices either
//! from the file's identity (device, inode, size, mtime, ctime) and re-reads
//! it only then, so rotation needs no restart.
//!
//! Owns reading and caching one token file; it does not validate the token
//! (that is [`super::Verifier`]'s job) and does not know which tag uses it.

use std::{
    fs,
    io::{self, Read},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

/// What identifies one version of a file: if any of these changed, the content
/// may have. Follows symlinks, so a swapped `..data` link counts as a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    /// The stamp of the file `meta` describes.
    pub(crate) fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// Reads at most `limit` bytes of the regular file at `path`; returns its
/// content and the stamp of the very file that was read (taken from the open
/// handle, so a rename between stat and read cannot pair old stamp and new
/// content). `Ok(None)` if the file is larger than `limit`.
pub(crate) fn read_capped(path: &Path, limit: u64) -> io::Result<Option<(Vec<u8>, FileStamp)>> {
    let file = fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let stamp = FileStamp::of(&meta);
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len().min(limit)).unwrap_or(0));
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Ok(None);
    }
    Ok(Some((bytes, stamp)))
}

/// Why a token could not be read from its file.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be opened, inspected or read.
    #[error("token file {path}: {source}")]
    Io {
        /// The token file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file is larger than the cap (a token is a few KiB at most).
    #[error("token file {path} is larger than {limit} bytes")]
    TooLarge {
        /// The token file.
        path: PathBuf,
        /// The cap in bytes.
        limit: u64,
    },
    /// The file holds only whitespace.
    #[error("token file {path} is empty")]
    Empty {
        /// The token file.
        path: PathBuf,
    },
    /// The file is not UTF-8 text.
    #[error("token file {path} is not UTF-8 text")]
    NotText {
        /// The token file.
        path: PathBuf,
    },
}

impl TokenFileError {
    /// A stable snake_case label for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                "token_file_missing"
            }
            Self::Io { .. } => "token_file_unreadable",
            Self::TooLarge { .. } => "token_file_too_large",
            Self::Empty { .. } => "token_file_empty",
            Self::NotText { .. } => "token_file_not_text",
        }
    }
}

#[derive(Default)]
struct Cached {
    stamp: Option<FileStamp>,
    token: Option<String>,
    generation: u64,
}

/// One identity's token file, re-read only when it changed on disk.
///
/// Every [`TokenFile::current`] costs one `stat(2)` of the path; the file is
/// opened and read only when its stamp differs from the last read. Cheap to
/// share in an `Arc` (`Send + Sync`; the cache sits behind a mutex, which is
/// held while a changed file is read).
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    max_len: u64,
    cached: Mutex<Cached>,
}

impl std::fmt::Debug for Cached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token itself.
        f.debug_struct("Cached")
            .field("stamp", &self.stamp)
            .field("has_token", &self.token.is_some())
            .field("generation", &self.generation)
            .finish()
    }
}

impl TokenFile {
    /// The default cap on a token file's size: 64 KiB (Kubernetes tokens are
    /// around 1 KiB).
    pub const DEFAULT_MAX_LEN: u64 = 64 * 1024;

    /// A token file at `path` with the default size cap. Reads nothing yet.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self::with_max_len(path, Self::DEFAULT_MAX_LEN)
    }

    /// A token file at `path` whose content may be at most `max_len` bytes.
    pub fn with_max_len(path: impl Into<PathBuf>, max_len: u64) -> Self {
        Self {
            path: path.into(),
            max_len,
            cached: Mutex::new(Cached::default()),
        }
    }

    /// The path this reads (symlinks are followed at every read).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The token now in the file, whitespace trimmed. Re-reads the file when
    /// its device, inode, size, mtime or ctime changed since the last read,
    /// and returns the cached token otherwise. Blocking, but only a `stat(2)`
    /// in the common case.
    ///
    /// An error is not cached: a file that disappears yields an error at once
    /// (the identity has no token), and the next call tries again.
    pub fn current(&self) -> Result<String, TokenFileError> {
        let io_err = |source| TokenFileError::Io {
            path: self.path.clone(),
            source,
        };
        let meta = fs::metadata(&self.path).map_err(io_err)?;
        let stamp = FileStamp::of(&meta);
        let mut cached = self.lock();
        if cached.stamp == Some(stamp) {
            if let Some(token) = &cached.token {
                return Ok(token.clone());
            }
        }
        let (bytes, stamp) = read_capped(&self.path, self.max_len)
            .map_err(io_err)?
            .ok_or_else(|| TokenFileError::TooLarge {
                path: self.path.clone(),
                limit: self.max_len,
            })?;
        let text = String::from_utf8(bytes).map_err(|_| TokenFileError::NotText {
            path: self.path.clone(),
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenFileError::Empty {
                path: self.path.clone(),
            });
        }
        if cached.token.as_deref() != Some(token) {
            cached.generation += 1;
            cached.token = Some(token.to_string());
        }
        cached.stamp = Some(stamp);
        Ok(token.to_string())
    }

    /// How many distinct tokens have been read so far: 0 before the first
    /// successful [`TokenFile::current`], then incremented each time a read
    /// finds a token different from the previous one (a rewrite with the
    /// same content does not count). Compare with [`TokenFile::changed_since`].
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Whether a different token has been read since [`TokenFile::generation`]
    /// returned `generation`. Only reflects reads already made: call
    /// [`TokenFile::current`] first to look at the file.
    pub fn changed_since(&self, generation: u64) -> bool {
        self.lock().generation != generation
    }

    fn lock(&self) -> MutexGuard<'_, Cached> {
        // The cache stays consistent even if a holder panicked.
        self.cached.lock().unwrap_or_else(|e| e.into_inner())
    }
}
