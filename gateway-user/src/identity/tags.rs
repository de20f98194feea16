//! Tags: which cgroup speaks for which identity. Persisted in the state dir so
//! they survive restarts; children inherit the tag of their nearest tagged
//! ancestor.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::cgroup::is_same_or_below;

/// A tag problem.
#[derive(Debug, thiserror::Error)]
pub enum TagError {
    /// The state file could not be read or written.
    #[error("tag store {path}: {source}")]
    Io {
        /// The state file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The state file is not valid.
    #[error("tag store {path} is corrupt: {source}")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// An identity name that policies could never refer to.
    #[error(
        "identity name {0:?} is invalid: use letters, digits, '-', '_', '.' (1 to 128 characters)"
    )]
    BadIdentity(String),
}

/// One tag: a cgroup (and its descendants) bound to an identity.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tag {
    /// The tagged cgroup, relative to the cgroup2 mount (`/a/b`).
    pub cgroup: String,
    /// The identity name its flows act as.
    pub identity: String,
    /// Where the identity's OIDC token is read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// When the tag was made (seconds since the Unix epoch).
    pub created: u64,
    /// The `[[auto_tag]]` glob that made this tag; `None` for a tag an
    /// operator made. Only auto-made tags are removed when their cgroup goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<String>,
}

/// The persisted set of tags.
#[derive(Debug)]
pub struct TagStore {
    path: PathBuf,
    tags: BTreeMap<String, Tag>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TagFile {
    tags: Vec<Tag>,
}

impl TagStore {
    /// Opens (or starts) the store at `path`.
    pub fn open(path: PathBuf) -> Result<Self, TagError> {
        let tags = match fs::read(&path) {
            Ok(bytes) => {
                let file: TagFile =
                    serde_json::from_slice(&bytes).map_err(|source| TagError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                file.tags
                    .into_iter()
                    .map(|t| (t.cgroup.clone(), t))
                    .collect()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(TagError::Io { path, source }),
        };
        Ok(Self { path, tags })
    }

    /// Adds or replaces the tag of `cgroup` and persists the store.
    pub fn insert(
        &mut self,
        cgroup: String,
        identity: String,
        token_file: Option<PathBuf>,
    ) -> Result<Tag, TagError> {
        self.insert_with(cgroup, identity, token_file, None)
    }

    /// Like [`TagStore::insert`] for a tag made by the auto-tag rule `rule`.
    pub fn insert_auto(
        &mut self,
        cgroup: String,
        identity: String,
        token_file: Option<PathBuf>,
        rule: String,
    ) -> Result<Tag, TagError> {
        self.insert_with(cgroup, identity, token_file, Some(rule))
    }

    fn insert_with(
        &mut self,
        cgroup: String,
        identity: String,
        token_file: Option<PathBuf>,
        auto: Option<String>,
    ) -> Result<Tag, TagError> {
        validate_identity(&identity)?;
        let tag = Tag {
            cgroup: cgroup.clone(),
            identity,
            token_file,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            auto,
        };
        let previous = self.tags.insert(cgroup.clone(), tag.clone());
        if let Err(e) = self.save() {
            match previous {
                Some(p) => self.tags.insert(cgroup, p),
                None => self.tags.remove(&cgroup),
            };
            return Err(e);
        }
        Ok(tag)
    }

    /// Removes the tag of `cgroup`; returns it if there was one.
    pub fn remove(&mut self, cgroup: &str) -> Result<Option<Tag>, TagError> {
        let removed = self.tags.remove(cgroup);
        if let Some(tag) = &removed {
            if let Err(e) = self.save() {
                self.tags.insert(cgroup.to_string(), tag.clone());
                return Err(e);
            }
        }
        Ok(removed)
    }

    /// All tags, ordered by cgroup path.
    pub fn iter(&self) -> impl Iterator<Item = &Tag> {
        self.tags.values()
    }

    /// The tag that governs `cgroup`: its own, or its nearest tagged ancestor's.
    pub fn nearest(&self, cgroup: &str) -> Option<&Tag> {
        self.tags
            .values()
            .filter(|t| is_same_or_below(cgroup, &t.cgroup))
            .max_by_key(|t| t.cgroup.len())
    }

    fn save(&self) -> Result<(), TagError> {
        let file = TagFile {
            tags: self.tags.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|source| TagError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        write_atomically(&self.path, &bytes).map_err(|source| TagError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash
/// leaves either the old or the new content.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

fn validate_identity(name: &str) -> Result<(), TagError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(TagError::BadIdentity(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> (PathBuf, TagStore) {
        let dir = std::env::temp_dir().join(format!(
            "portcullis-tags-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tags.json");
        (dir, TagStore::open(path).unwrap())
    }

    #[test]
    fn nearest_ancestor_wins_and_persists() {
        let (dir, mut store) = temp_store();
        store.insert("/a".into(), "outer".into(), None).unwrap();
        store
            .insert("/a/b".into(), "inner".into(), Some("/t".into()))
            .unwrap();
        assert_eq!(store.nearest("/a/b/c").unwrap().identity, "inner");
        assert_eq!(store.nearest("/a/bc").unwrap().identity, "outer");
        assert!(store.nearest("/z").is_none());

        let reopened = TagStore::open(dir.join("tags.json")).unwrap();
        assert_eq!(reopened.iter().count(), 2);
        assert_eq!(
            reopened.nearest("/a/b").unwrap().token_file,
            Some(PathBuf::from("/t"))
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_bad_identity_names() {
        let (dir, mut store) = temp_store();
        assert!(store.insert("/a".into(), "".into(), None).is_err());
        assert!(store.insert("/a".into(), "has space".into(), None).is_err());
        assert_eq!(store.iter().count(), 0);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_store_is_an_error_not_a_reset() {
        let (dir, _) = temp_store();
        let path = dir.join("tags.json");
        fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            TagStore::open(path),
            Err(TagError::Corrupt { .. })
        ));
        fs::remove_dir_all(dir).unwrap();
    }
}
