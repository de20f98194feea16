//! The policy set: `*.toml` configuration (issuers, identities, resources,
//! masking) and `*.cedar` rules, loaded and validated together as one set.
//!
//! Owns parsing, validation (errors as `file:line:col: message`), the set's
//! version (a content hash), matching a flow's original destination to a
//! resource, and the decision API every protocol handler calls. It must not
//! do I/O on the data path: [`PolicySet::decide`] and matching read memory
//! only; hostnames in `match` are resolved off the data path by [`Resolver`],
//! and reloading is [`watch`]'s job.

pub mod actions;
mod cedar;
mod diag;
mod matcher;
mod schema;
pub mod watch;

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;
use sha2::{Digest, Sha256};

pub use cedar::{Decision, DecisionRequest, Requester, ReviewRequest, ReviewTarget, RuleInfo};
pub use diag::{line_col as diag_line_col, Diagnostic, PolicyError};
pub use matcher::{Destination, Resolver};
pub use schema::{
    parse_duration, AgentToken, Credentials, Identity, Issuer, MaskRule, McpArgType, PgOptions,
    Protocol, RecordMode, Resource, TlsMode, UpstreamTls, DETECTORS,
};

/// A validated policy set.
#[derive(Debug)]
pub struct PolicySet {
    /// Content hash of every file in the set (hex SHA-256, first 16 chars).
    pub version: String,
    /// The directory it was loaded from.
    pub dir: PathBuf,
    /// The files that make it up, in load order.
    pub files: Vec<PathBuf>,
    /// OIDC issuers by name.
    pub issuers: BTreeMap<String, Issuer>,
    /// Identities by name.
    pub identities: BTreeMap<String, Identity>,
    /// Resources by name.
    pub resources: BTreeMap<String, Arc<Resource>>,
    /// Masking rules.
    pub masks: Vec<MaskRule>,
    /// The masking rules compiled per resource.
    maskers: BTreeMap<String, Arc<crate::mask::Masker>>,
    rules: cedar::Rules,
    static_index: HashMap<SocketAddr, Arc<Resource>>,
    /// The words (identifiers, and the words of string literals) of every
    /// Cedar file; `None` when some text has an escape (`\u{..}` can spell
    /// any name without writing it). See [`PolicySet::rules_mention`].
    cedar_words: Option<std::collections::HashSet<String>>,
}

/// The words of the Cedar texts (see [`PolicySet::rules_mention`]).
fn cedar_words(files: &[(PathBuf, String)]) -> Option<std::collections::HashSet<String>> {
    let mut words = std::collections::HashSet::new();
    for (_, text) in files {
        if text.contains('\\') {
            return None;
        }
        words.extend(
            text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|w| !w.is_empty())
                .map(str::to_string),
        );
    }
    Some(words)
}

/// A summary for `portcullis policy show`.
#[derive(Debug, Serialize)]
pub struct PolicySummary<'a> {
    /// Version.
    pub version: &'a str,
    /// Directory.
    pub dir: &'a Path,
    /// Files.
    pub files: &'a [PathBuf],
    /// Issuers.
    pub issuers: Vec<&'a Issuer>,
    /// Identities.
    pub identities: Vec<&'a Identity>,
    /// Resources.
    pub resources: Vec<&'a Resource>,
    /// Rules.
    pub rules: Vec<&'a RuleInfo>,
    /// Masking rules.
    pub masks: &'a [MaskRule],
}

impl PolicySet {
    /// Loads and validates every policy file in `dir`. A set with any error
    /// is refused whole, with every problem found.
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let files = policy_files(dir)?;
        let mut diags = Vec::new();
        let mut texts = Vec::with_capacity(files.len());
        for file in &files {
            match fs::read_to_string(file) {
                Ok(t) => texts.push((file.clone(), t)),
                Err(e) => diags.push(Diagnostic::file(file, format!("cannot read: {e}"))),
            }
        }
        Self::build(dir, files, texts, diags)
    }

    /// Validates policy texts as if they were the files of `dir`, without
    /// touching the file system: the loader's whole core (TOML, cross
    /// checks, Cedar against the generated schema). Files ending `.cedar`
    /// are rules, the others TOML. Used by the fuzz targets.
    pub fn from_texts(dir: &Path, texts: Vec<(PathBuf, String)>) -> Result<Self, PolicyError> {
        let files = texts.iter().map(|(p, _)| p.clone()).collect();
        Self::build(dir, files, texts, Vec::new())
    }

    fn build(
        dir: &Path,
        files: Vec<PathBuf>,
        texts: Vec<(PathBuf, String)>,
        mut diags: Vec<Diagnostic>,
    ) -> Result<Self, PolicyError> {
        let mut hasher = Sha256::new();
        let mut config = schema::Config::default();
        let mut spans = schema::Spans::default();
        let mut cedar_files = Vec::new();
        for (file, text) in texts {
            let file = &file;
            hasher.update(
                file.file_name()
                    .map(|n| n.as_encoded_bytes())
                    .unwrap_or(b""),
            );
            hasher.update([0]);
            hasher.update(text.as_bytes());
            hasher.update([0]);
            if file.extension().is_some_and(|e| e == "cedar") {
                cedar_files.push((file.clone(), text));
            } else {
                schema::parse_file(file, &text, &mut config, &mut spans, &mut diags);
            }
        }
        schema::cross_check(&config, &spans, &mut diags);
        let cedar_words = cedar_words(&cedar_files);
        let mcp_arguments = schema::mcp_arguments(&spans, &mut diags);
        let resources: BTreeMap<String, Arc<Resource>> = config
            .resources
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect();
        let static_index = match matcher::static_index(&resources) {
            Ok(i) => i,
            Err(msg) => {
                diags.push(Diagnostic::dir(dir, msg));
                HashMap::new()
            }
        };
        let entities: Vec<cedar::EntitySpec<'_>> = config
            .identities
            .values()
            .map(|i| cedar::EntitySpec {
                kind: "Identity",
                name: &i.name,
                attrs: serde_json::json!({
                    "name": i.name,
                    "issuer": config.issuers.get(&i.issuer).map(|x| x.url.as_str()).unwrap_or(""),
                    "subject": i.subject,
                }),
            })
            .chain(resources.values().map(|r| cedar::EntitySpec {
                kind: "Resource",
                name: &r.name,
                attrs: serde_json::json!({
                    "name": r.name,
                    "protocol": r.protocol.as_str(),
                    "kind": r.kind,
                }),
            }))
            .collect();
        let rules = if diags.is_empty() {
            cedar::Rules::load(&cedar_files, &entities, &mcp_arguments, &mut diags)
        } else {
            None
        };
        let mut maskers = BTreeMap::new();
        let compile_masks = diags.is_empty();
        for name in resources.keys().filter(|_| compile_masks) {
            match crate::mask::Masker::compile(name, &config.masks, mask_hash_key()) {
                Ok(Some(m)) => {
                    maskers.insert(name.clone(), m);
                }
                Ok(None) => {}
                Err(e) => diags.push(Diagnostic::dir(dir, format!("[[mask]] for {name}: {e}"))),
            }
        }
        match rules {
            Some(rules) if diags.is_empty() => Ok(Self {
                version: hex::encode(hasher.finalize())[..16].to_string(),
                dir: dir.to_path_buf(),
                files,
                issuers: config.issuers,
                identities: config.identities,
                resources,
                masks: config.masks,
                maskers,
                rules,
                static_index,
                cedar_words,
            }),
            _ => Err(PolicyError { diagnostics: diags }),
        }
    }

    /// The compiled masking rules of `resource`, if it has any. Handlers
    /// take it per command, so a reload applies to the next one.
    pub fn masker(&self, resource: &str) -> Option<Arc<crate::mask::Masker>> {
        self.maskers.get(resource).cloned()
    }

    /// Decides one command. Pure computation, no I/O: a few microseconds.
    pub fn decide(&self, req: &DecisionRequest<'_>) -> Decision {
        if !self.identities.contains_key(req.identity) {
            return Decision::Deny {
                reason: format!(
                    "identity `{}` is not defined in the policy set",
                    req.identity
                ),
                policies: Vec::new(),
            };
        }
        if !self.resources.contains_key(req.resource) {
            return Decision::Deny {
                reason: format!(
                    "resource `{}` is not defined in the policy set",
                    req.resource
                ),
                policies: Vec::new(),
            };
        }
        self.rules.decide(req)
    }

    /// Whether a console reviewer may do `req.action` (Cedar, over the
    /// whole rule set): `Ok` with the permitting rules, or `Err` with why not.
    pub fn decide_reviewer(&self, req: &ReviewRequest<'_>) -> Result<Vec<String>, String> {
        if let ReviewTarget::Resource(r) = req.resource {
            if !self.resources.contains_key(r) {
                return Err(format!("resource `{r}` is not defined in the policy set"));
            }
        }
        self.rules.decide_reviewer(req)
    }

    /// The resource whose `match` names this literal address, if any.
    /// Hostname matches are looked up through [`Resolver::lookup`].
    pub fn match_static(&self, dst: &SocketAddr) -> Option<&Arc<Resource>> {
        self.static_index.get(dst)
    }

    /// Whether some rule may read a context attribute (or anything else)
    /// called `word`: false only when no Cedar file has `word` as a word
    /// anywhere (identifier, string literal, comment) and none has an
    /// escape. Cedar reads an attribute only by writing its name (`.name`,
    /// `["name"]`, `has name`), so a decision cannot depend on an attribute
    /// whose name no rule mentions: a cache of decisions may leave it out
    /// of its key.
    pub fn rules_mention(&self, word: &str) -> bool {
        self.cedar_words.as_ref().is_none_or(|w| w.contains(word))
    }

    /// The rules by id.
    pub fn rules(&self) -> &BTreeMap<String, RuleInfo> {
        &self.rules.rules
    }

    /// What `policy show` prints.
    pub fn summary(&self) -> PolicySummary<'_> {
        PolicySummary {
            version: &self.version,
            dir: &self.dir,
            files: &self.files,
            issuers: self.issuers.values().collect(),
            identities: self.identities.values().collect(),
            resources: self.resources.values().map(|r| r.as_ref()).collect(),
            rules: self.rules.rules.values().collect(),
            masks: &self.masks,
        }
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

/// The key of the `hash` masking style: random per daemon process, so
/// hashed values join within a run but cannot be brute-forced offline.
fn mask_hash_key() -> [u8; 32] {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| {
        crate::audit::random_seed().unwrap_or_else(|_| {
            // getrandom(2) does not fail after boot; if it ever did, a
            // time-derived key still keeps hashes unguessable offline.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            let mut h = Sha256::new();
            h.update(t.to_le_bytes());
            h.update(std::process::id().to_le_bytes());
            h.finalize().into()
        })
    })
}
