//! Tool-definition fingerprints per MCP resource (rug-pull detection):
//! the first definition of a tool seen in a `tools/list` is trusted; a later
//! different one is pending until an operator accepts it
//! (`portcullis mcp accept RESOURCE TOOL`), and until then the tool is left
//! out of lists and calls to it are refused.
//!
//! Owns the store `<state>/mcp/tools.json` (written atomically). It must
//! not decide or speak MCP.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// What is known about one tool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownTool {
    /// The accepted definition's fingerprint (`sha256:<hex>`).
    pub fingerprint: String,
    /// When that definition was first seen (ms since the epoch).
    pub first_seen_ms: u64,
    /// The accepted definition's description (for `mcp tools`).
    #[serde(default)]
    pub description: String,
    /// A changed definition waiting for `mcp accept`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingTool>,
}

/// A changed definition not accepted yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTool {
    /// Its fingerprint.
    pub fingerprint: String,
    /// When it was first seen.
    pub first_seen_ms: u64,
    /// Its description.
    #[serde(default)]
    pub description: String,
}

/// What a definition seen in a list is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The accepted definition (or a first sighting, now trusted).
    Trusted {
        /// Whether this was the first sighting.
        new: bool,
    },
    /// Differs from the accepted one.
    Changed {
        /// The accepted fingerprint.
        accepted: String,
        /// The one just seen.
        seen: String,
        /// Whether this change was already known (audited once).
        known: bool,
    },
}

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The file is not a store.
    #[error("{path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Nothing to accept.
    #[error("{0}")]
    NotFound(String),
}

type Tools = BTreeMap<String, BTreeMap<String, KnownTool>>;

/// The fingerprint of a tool definition: the canonical JSON (sorted keys)
/// of the whole definition the server sent (name, description, schemas,
/// annotations, ...), so any change an agent could be steered by shows.
pub fn fingerprint(def: &Value) -> String {
    let canonical = super::classify::canonical(def);
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    )
}

/// The store of one state directory.
pub struct Store {
    path: PathBuf,
    tools: Mutex<Option<Tools>>,
}

impl Store {
    /// The store under `state_dir` (read on first use).
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("mcp").join("tools.json"),
            tools: Mutex::new(None),
        }
    }

    fn load(&self) -> Result<Tools, StoreError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Tools::new()),
            Err(source) => Err(StoreError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn save(&self, tools: &Tools) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(tools).unwrap_or_default();
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Tools) -> (T, bool)) -> Result<T, StoreError> {
        let mut g = self.tools.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(self.load()?);
        }
        let Some(tools) = g.as_mut() else {
            return Err(StoreError::NotFound("store not loaded".into()));
        };
        let (out, dirty) = f(tools);
        if dirty {
            self.save(tools)?;
        }
        Ok(out)
    }

    /// Records a definition seen in `resource`'s tool list.
    pub fn observe(
        &self,
        resource: &str,
        tool: &str,
        def: &Value,
        now_ms: u64,
    ) -> Result<Seen, StoreError> {
        let fp = fingerprint(def);
        let description = def
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        self.with(|tools| {
            let known = tools.entry(resource.to_string()).or_default();
            match known.get_mut(tool) {
                None => {
                    known.insert(
                        tool.to_string(),
                        KnownTool {
                            fingerprint: fp,
                            first_seen_ms: now_ms,
                            description,
                            pending: None,
                        },
                    );
                    (Seen::Trusted { new: true }, true)
                }
                Some(k) if k.fingerprint == fp => (Seen::Trusted { new: false }, false),
                Some(k) => {
                    let already = k.pending.as_ref().is_some_and(|p| p.fingerprint == fp);
                    let accepted = k.fingerprint.clone();
                    if !already {
                        k.pending = Some(PendingTool {
                            fingerprint: fp.clone(),
                            first_seen_ms: now_ms,
                            description,
                        });
                    }
                    (
                        Seen::Changed {
                            accepted,
                            seen: fp,
                            known: already,
                        },
                        !already,
                    )
                }
            }
        })
    }

    /// The pending change of a tool, if it has one (calls are refused).
    pub fn pending(&self, resource: &str, tool: &str) -> Result<Option<PendingTool>, StoreError> {
        self.with(|tools| {
            (
                tools
                    .get(resource)
                    .and_then(|k| k.get(tool))
                    .and_then(|k| k.pending.clone()),
                false,
            )
        })
    }

    /// Accepts a tool's pending definition; returns it.
    pub fn accept(&self, resource: &str, tool: &str) -> Result<PendingTool, StoreError> {
        let r = self.with(|tools| {
            let Some(k) = tools.get_mut(resource).and_then(|k| k.get_mut(tool)) else {
                return (
                    Err(StoreError::NotFound(format!(
                        "no tool `{tool}` known for resource `{resource}`"
                    ))),
                    false,
                );
            };
            let Some(p) = k.pending.take() else {
                return (
                    Err(StoreError::NotFound(format!(
                        "tool `{tool}` of `{resource}` has no changed definition to accept"
                    ))),
                    false,
                );
            };
            k.fingerprint = p.fingerprint.clone();
            k.first_seen_ms = p.first_seen_ms;
            k.description = p.description.clone();
            (Ok(p), true)
        })?;
        r
    }

    /// The tools known for `resource`.
    pub fn list(&self, resource: &str) -> Result<BTreeMap<String, KnownTool>, StoreError> {
        self.with(|tools| (tools.get(resource).cloned().unwrap_or_default(), false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_changed_definition_is_pending_until_accepted_and_persists() {
        let dir = std::env::temp_dir().join(format!("pc-mcp-tools-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Store::new(&dir);
        let v1 = json!({"name":"t","description":"one","inputSchema":{"type":"object"}});
        let v2 = json!({"name":"t","description":"two","inputSchema":{"type":"object"}});
        assert_eq!(
            s.observe("r", "t", &v1, 1).unwrap(),
            Seen::Trusted { new: true }
        );
        assert_eq!(
            s.observe("r", "t", &v1, 2).unwrap(),
            Seen::Trusted { new: false }
        );
        assert!(matches!(
            s.observe("r", "t", &v2, 3).unwrap(),
            Seen::Changed { known: false, .. }
        ));
        assert!(matches!(
            s.observe("r", "t", &v2, 4).unwrap(),
            Seen::Changed { known: true, .. }
        ));
        assert!(s.pending("r", "t").unwrap().is_some());
        // A fresh store (a restarted daemon) reads the same state.
        let s2 = Store::new(&dir);
        assert_eq!(s2.pending("r", "t").unwrap().unwrap().first_seen_ms, 3);
        let p = s2.accept("r", "t").unwrap();
        assert_eq!(p.fingerprint, fingerprint(&v2));
        assert!(s2.pending("r", "t").unwrap().is_none());
        assert_eq!(
            s2.observe("r", "t", &v2, 5).unwrap(),
            Seen::Trusted { new: false }
        );
        assert!(s2.accept("r", "t").is_err());
        assert!(s2.accept("r", "nope").is_err());
        assert_eq!(s2.list("r").unwrap()["t"].description, "two");
        // Key order does not change a fingerprint.
        let reordered: Value = serde_json::from_str(
            r#"{"inputSchema":{"type":"object"},"description":"two","name":"t"}"#,
        )
        .unwrap();
        assert_eq!(fingerprint(&reordered), fingerprint(&v2));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
