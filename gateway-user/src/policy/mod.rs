//! The policy set: the resources agents may reach, loaded from `*.toml` files
//! in the policies directory and validated as one set.
//!
//! Owns parsing, validation (errors as `file:line:col: message`), the set's
//! version (a content hash) and matching a flow's original destination to a
//! resource. It must not do I/O on the data path: matching reads an
//! in-memory table; hostnames in `match` are resolved off the data path by
//! [`Resolver`].

mod diag;
mod matcher;
mod schema;

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use sha2::{Digest, Sha256};

pub use diag::{line_col as diag_line_col, Diagnostic, PolicyError};
pub use matcher::{Destination, Resolver};
pub use schema::Protocol;

/// A resource as the proxy uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// The resource's name (the TOML table key).
    pub name: String,
    /// Which protocol handler terminates its flows.
    pub protocol: Protocol,
    /// Original destinations that select this resource.
    pub matches: Vec<Destination>,
    /// Where the daemon connects; `None` means the flow's original destination.
    pub upstream: Option<Destination>,
}

/// A validated policy set.
#[derive(Debug)]
pub struct PolicySet {
    /// Content hash of every file in the set (hex SHA-256, first 16 chars).
    pub version: String,
    /// The directory it was loaded from.
    pub dir: PathBuf,
    /// The files that make it up, in load order.
    pub files: Vec<PathBuf>,
    /// Resources by name.
    pub resources: BTreeMap<String, Arc<Resource>>,
    static_index: std::collections::HashMap<SocketAddr, Arc<Resource>>,
}

impl PolicySet {
    /// Loads and validates every policy file in `dir`.
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let files = policy_files(dir)?;
        let mut hasher = Sha256::new();
        let mut diags = Vec::new();
        let mut resources: BTreeMap<String, Arc<Resource>> = BTreeMap::new();
        let mut defined_in: BTreeMap<String, PathBuf> = BTreeMap::new();
        for file in &files {
            let text = match fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) => {
                    diags.push(Diagnostic::file(file, format!("cannot read: {e}")));
                    continue;
                }
            };
            hasher.update(
                file.file_name()
                    .map(|n| n.as_encoded_bytes())
                    .unwrap_or(b""),
            );
            hasher.update([0]);
            hasher.update(text.as_bytes());
            hasher.update([0]);
            if file.extension().is_some_and(|e| e == "cedar") {
                diags.push(Diagnostic::at(
                    file,
                    &text,
                    0,
                    "Cedar rules are not supported by this build yet; remove the file or upgrade Portcullis".into(),
                ));
                continue;
            }
            for r in schema::parse_file(file, &text, &mut diags) {
                if let Some(first) = defined_in.get(&r.name) {
                    diags.push(Diagnostic::file(
                        file,
                        format!(
                            "resource `{}` is already defined in {}",
                            r.name,
                            first.display()
                        ),
                    ));
                    continue;
                }
                defined_in.insert(r.name.clone(), file.clone());
                resources.insert(r.name.clone(), Arc::new(r));
            }
        }
        let static_index = match matcher::static_index(&resources) {
            Ok(i) => i,
            Err(msg) => {
                diags.push(Diagnostic::dir(dir, msg));
                Default::default()
            }
        };
        if !diags.is_empty() {
            return Err(PolicyError { diagnostics: diags });
        }
        let version = hex::encode(hasher.finalize())[..16].to_string();
        Ok(Self {
            version,
            dir: dir.to_path_buf(),
            files,
            resources,
            static_index,
        })
    }

    /// The resource whose `match` names this literal address, if any.
    /// Hostname matches are looked up through [`Resolver::lookup`].
    pub fn match_static(&self, dst: &SocketAddr) -> Option<&Arc<Resource>> {
        self.static_index.get(dst)
    }
}

/// The `*.toml` and `*.cedar` files of a policy directory, sorted by name.
/// Hidden entries are skipped, which also skips Kubernetes ConfigMap
/// `..data` directories while following the visible symlinks into them.
fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let entries = fs::read_dir(dir).map_err(|e| PolicyError {
        diagnostics: vec![Diagnostic::dir(dir, format!("cannot read directory: {e}"))],
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            !name.starts_with('.')
                && p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("toml" | "cedar")
                )
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests;
