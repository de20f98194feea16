//! Cedar rules: parsing each `*.cedar` file, naming every rule, validating
//! the set against the schema generated from the action catalog and the
//! TOML configuration, and turning Cedar's answer into a [`Decision`].

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    str::FromStr,
    sync::OnceLock,
};

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Effect, Entities, EntityId,
    EntityTypeName, EntityUid, PolicyId, Request, ResourceConstraint, Schema, ValidationError,
    ValidationMode, Validator,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{actions, Diagnostic};

/// A decision on one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "lowercase")]
pub enum Decision {
    /// Go ahead.
    Allow {
        /// The rules that allowed it.
        policies: Vec<String>,
    },
    /// Refused.
    Deny {
        /// Why, for the agent and the audit log.
        reason: String,
        /// The rules that forbade it (empty: nothing permitted it).
        policies: Vec<String>,
    },
    /// Allowed only once a human approves it or a grant covers it.
    Hold {
        /// The `@approval` rules that would allow it.
        policies: Vec<String>,
    },
}

impl Decision {
    /// `allow`, `deny` or `hold`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Allow { .. } => "allow",
            Self::Deny { .. } => "deny",
            Self::Hold { .. } => "hold",
        }
    }

    /// The rules behind the decision.
    pub fn policies(&self) -> &[String] {
        match self {
            Self::Allow { policies } | Self::Deny { policies, .. } | Self::Hold { policies } => {
                policies
            }
        }
    }
}

/// What a protocol handler asks.
#[derive(Debug, Clone)]
pub struct DecisionRequest<'a> {
    /// Identity name (the principal).
    pub identity: &'a str,
    /// Resource name.
    pub resource: &'a str,
    /// Action, e.g. `tcp:connect`, `postgres:select`.
    pub action: &'a str,
    /// The action's context as JSON (see the generated schema).
    pub context: serde_json::Value,
    /// Whether a human approved this very command or a grant covers it:
    /// turns what would be a hold into an allow.
    pub approved: bool,
}

/// What is known about one rule.
#[derive(Debug, Clone, Serialize)]
pub struct RuleInfo {
    /// Its id: the `@id` annotation, else `FILE:LINE`.
    pub id: String,
    /// The file it is in.
    pub file: PathBuf,
    /// 1-based line where it starts.
    pub line: usize,
    /// `permit` or `forbid`.
    pub effect: &'static str,
    /// Whether it carries `@approval`.
    pub approval: bool,
    /// Its `@reason` annotation (shown to agents on denial).
    pub reason: Option<String>,
}

/// A validated set of Cedar rules with the entities they decide over.
pub struct Rules {
    /// The whole set, as validated.
    full: cedar_policy::PolicySet,
    /// Per (resource, action) pair, the rules whose scope can match it (see
    /// [`Rules::can_apply`]), built on the pair's first decision: Cedar
    /// evaluates each rule of the set it is given, and a rule whose scope
    /// does not match contributes nothing (its scope is evaluated first and
    /// short-circuits, so not even an error), so deciding over the slice
    /// gives exactly the whole set's answer at a cost independent of how
    /// many other resources and actions have rules. Each slice is split
    /// once more by the principal its rules name ([`Slice`]). Indexed
    /// `resource * actions + action`.
    slices: Vec<OnceLock<Slice>>,
    schema: Schema,
    entities: Entities,
    authorizer: Authorizer,
    /// Action name -> (position, uid, the uids it is `in`: itself and its
    /// ancestors in the schema's action hierarchy).
    actions: HashMap<String, (usize, EntityUid, Vec<EntityUid>)>,
    /// Identity name -> its uid, made once (parsing one costs µs).
    principals: HashMap<String, EntityUid>,
    /// Resource name -> (position, uid).
    resources: HashMap<String, (usize, EntityUid)>,
    /// Rules by id.
    pub rules: BTreeMap<String, RuleInfo>,
    /// Request shapes that passed Cedar's request validation against
    /// [`Self::schema`] (see [`request_shape`]).
    validated: ValidatedShapes,
}

/// The request shapes (action, principal and resource types, and the
/// context's type shape) Cedar's request validation has accepted under one
/// schema. Validation is a third of a decision's cost, and it accepts or
/// refuses by those types alone: the contexts [`context_from_json`] builds
/// hold strings, longs, booleans, sets and records, never entity
/// references nor extension values, whose validity could depend on the
/// value. So a request of a shape seen valid is built without validating it
/// again; a shape never seen, or refused before, is validated every time.
#[derive(Default)]
struct ValidatedShapes(std::sync::RwLock<std::collections::HashSet<String>>);

/// Most shapes remembered per loaded set: handlers build a few per action;
/// past the bound every new shape is simply validated each time.
const VALIDATED_SHAPES_MAX: usize = 4096;

impl ValidatedShapes {
    fn contains(&self, shape: &str) -> bool {
        self.0.read().is_ok_and(|set| set.contains(shape))
    }

    fn insert(&self, shape: String) {
        if let Ok(mut set) = self.0.write() {
            if set.len() < VALIDATED_SHAPES_MAX {
                set.insert(shape);
            }
        }
    }
}

/// The key of [`ValidatedShapes`]: the action, then the context's type
/// shape ([`push_type_shape`]). The principal and resource types need no
/// place in it: every principal is an `Identity`, every resource a
/// `Resource` ([`EntitySpec::kind`]).
fn request_shape(action: &str, context: &serde_json::Value) -> String {
    let mut out = String::with_capacity(96);
    push_len_prefixed(&mut out, action);
    push_type_shape(&mut out, context);
    out
}

/// `s` as `<len>#<s>`: unambiguous whatever `s` holds.
fn push_len_prefixed(out: &mut String, s: &str) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = s.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in &digits[at..] {
        out.push(char::from(*d));
    }
    out.push('#');
    out.push_str(s);
}

/// Appends the type shape of `v` as Cedar's request validation sees it:
/// `s`, `l`, `b` for a string, number, boolean (`n` for null, which
/// [`context_from_json`] refuses anyway); a set as `[`, the sorted distinct
/// shapes of its elements, `]`; a record as `{`, each attribute's name
/// (length-prefixed) and shape, `}`. Every shape is one token or
/// bracketed, so the text reads back one way only.
fn push_type_shape(out: &mut String, v: &serde_json::Value) {
    fn scalar(v: &serde_json::Value) -> Option<char> {
        match v {
            serde_json::Value::String(_) => Some('s'),
            serde_json::Value::Number(_) => Some('l'),
            serde_json::Value::Bool(_) => Some('b'),
            serde_json::Value::Null => Some('n'),
            _ => None,
        }
    }
    match v {
        serde_json::Value::Array(items) => {
            out.push('[');
            // Sets of scalars (the common case) in one pass, no allocation:
            // which of the four kinds occur, in a fixed order.
            const KINDS: [char; 4] = ['b', 'l', 'n', 's'];
            let mut seen = [false; 4];
            let all_scalar = items.iter().all(|item| match scalar(item) {
                Some(k) => {
                    if let Some(i) = KINDS.iter().position(|x| *x == k) {
                        seen[i] = true;
                    }
                    true
                }
                None => false,
            });
            if all_scalar {
                out.extend(KINDS.iter().zip(seen).filter(|(_, s)| *s).map(|(k, _)| *k));
            } else {
                let mut shapes: Vec<String> = Vec::new();
                for item in items {
                    let mut one = String::new();
                    push_type_shape(&mut one, item);
                    if !shapes.contains(&one) {
                        shapes.push(one);
                    }
                }
                shapes.sort_unstable();
                for one in &shapes {
                    out.push_str(one);
                }
            }
            out.push(']');
        }
        serde_json::Value::Object(map) => {
            out.push('{');
            for (k, v) in map {
                push_len_prefixed(out, k);
                push_type_shape(out, v);
            }
            out.push('}');
        }
        other => out.extend(scalar(other)),
    }
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("rules", &self.rules.len())
            .finish()
    }
}

/// An entity the rules can name.
pub struct EntitySpec<'a> {
    /// `Identity` or `Resource`.
    pub kind: &'static str,
    /// Its name.
    pub name: &'a str,
    /// Its attributes (must match the schema).
    pub attrs: serde_json::Value,
}

/// The schema generated from the action catalog, parsed once per process:
/// it depends only on the catalog compiled in, and parsing it costs far more
/// than validating a typical rule set (it dominated reloads and fuzzing).
/// With MCP arguments declared the schema depends on the set; the last
/// one is kept, so reloads of an unchanged set still parse it once.
/// Returned with the SHA-256 of its text (the key of [`ValidatedFiles`]).
fn generated_schema(
    mcp_arguments: &BTreeMap<String, super::McpArgType>,
) -> Result<(Schema, [u8; 32]), String> {
    type Parsed = Result<(Schema, [u8; 32]), String>;
    static SCHEMA: std::sync::OnceLock<Parsed> = std::sync::OnceLock::new();
    static LAST: std::sync::Mutex<Option<(String, Schema, [u8; 32])>> = std::sync::Mutex::new(None);
    let parse = |text: &str| -> Parsed {
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        Schema::from_cedarschema_str(text)
            .map(|(s, _)| (s, digest))
            .map_err(|e| e.to_string())
    };
    if mcp_arguments.is_empty() {
        return SCHEMA
            .get_or_init(|| parse(&actions::cedar_schema()))
            .clone();
    }
    let text = actions::cedar_schema_with(mcp_arguments);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((t, s, d)) = last.as_ref() {
        if *t == text {
            return Ok((s.clone(), *d));
        }
    }
    let (schema, digest) = parse(&text)?;
    *last = Some((text, schema.clone(), digest));
    Ok((schema, digest))
}

/// Rule files already known to pass strict validation, by the SHA-256 of
/// (schema text, file text). Sound because validation is a pure function
/// of the two: Cedar validates each rule on its own against the schema
/// (no rule's result depends on another rule, on entities or on ids), and
/// the same text parses to the same rules. A reload after an edit thus
/// validates only the files that changed. Only passes are kept (a failing
/// file is validated again, so its errors are reported every time);
/// bounded by [`VALIDATED_MAX`] (cleared when full).
struct ValidatedFiles;

/// Most entries of the validation cache (32 bytes each).
const VALIDATED_MAX: usize = 4096;

impl ValidatedFiles {
    fn set() -> std::sync::MutexGuard<'static, std::collections::HashSet<[u8; 32]>> {
        static SET: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<[u8; 32]>>> =
            std::sync::OnceLock::new();
        SET.get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn key(schema: &[u8; 32], text: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(schema);
        h.update(text.as_bytes());
        h.finalize().into()
    }

    fn contains(key: &[u8; 32]) -> bool {
        Self::set().contains(key)
    }

    fn insert(keys: impl IntoIterator<Item = [u8; 32]>) {
        let mut set = Self::set();
        for k in keys {
            if set.len() >= VALIDATED_MAX {
                set.clear();
            }
            set.insert(k);
        }
    }
}

/// Rules below which validating on one thread is cheaper than starting more.
const PARALLEL_VALIDATION_MIN: usize = 64;

/// Strict validation of `policies` against `schema`, split over the
/// available cores (each rule is validated on its own, so the split does not
/// change the result); errors in the order of `policies`.
fn validate(schema: &Schema, policies: Vec<cedar_policy::Policy>) -> Vec<ValidationError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(policies.len().div_ceil(PARALLEL_VALIDATION_MIN))
        .max(1);
    let run = |chunk: &[cedar_policy::Policy]| -> Vec<ValidationError> {
        let mut set = cedar_policy::PolicySet::new();
        for p in chunk {
            // Ids are unique among `policies` (checked when they were added
            // to the whole set).
            let _ = set.add(p.clone());
        }
        Validator::new(schema.clone())
            .validate(&set, ValidationMode::Strict)
            .validation_errors()
            .cloned()
            .collect()
    };
    if threads == 1 {
        return run(&policies);
    }
    let per = policies.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut chunks = policies.chunks(per);
        let first = chunks.next().unwrap_or_default();
        let handles: Vec<_> = chunks.map(|c| scope.spawn(move || run(c))).collect();
        let mut errors = run(first);
        for h in handles {
            match h.join() {
                Ok(e) => errors.extend(e),
                // A panic in the validator is re-raised as it would have been
                // on one thread.
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        errors
    })
}

impl Rules {
    /// Parses and validates `files` (path, text). Every problem goes to
    /// `diags`; `None` when there was any.
    pub fn load(
        files: &[(PathBuf, String)],
        entities: &[EntitySpec<'_>],
        mcp_arguments: &BTreeMap<String, super::McpArgType>,
        diags: &mut Vec<Diagnostic>,
    ) -> Option<Self> {
        let before = diags.len();
        let (schema, schema_digest) = match generated_schema(mcp_arguments) {
            Ok(s) => s,
            Err(e) => {
                diags.push(Diagnostic::dir(Path::new("<generated schema>"), e));
                return None;
            }
        };
        let mut set = cedar_policy::PolicySet::new();
        let mut rules = BTreeMap::new();
        let mut texts: HashMap<String, (PathBuf, &str)> = HashMap::new();
        // Rules of files not yet known to validate, and those files' keys.
        let mut unvalidated = Vec::new();
        let mut new_keys = Vec::new();
        for (file, text) in files {
            let key = ValidatedFiles::key(&schema_digest, text);
            let known = ValidatedFiles::contains(&key);
            if !known {
                new_keys.push(key);
            }
            let parsed = match cedar_policy::PolicySet::from_str(text) {
                Ok(p) => p,
                Err(errs) => {
                    for e in errs.iter() {
                        diags.push(miette_diag(file, text, e, e.to_string()));
                    }
                    continue;
                }
            };
            if parsed.templates().next().is_some() {
                diags.push(Diagnostic::file(
                    file,
                    "policy templates are not supported; write static rules".into(),
                ));
                continue;
            }
            let starts = statement_starts(text);
            for (i, start) in starts.iter().enumerate() {
                let Some(p) = parsed.policy(&PolicyId::new(format!("policy{i}"))) else {
                    continue;
                };
                let (line, _) = super::diag::line_col(text, *start);
                let id = match p.annotation("id") {
                    Some(id) => id.to_string(),
                    None => format!("{}:{line}", display_name(file)),
                };
                if let Some(prev) = rules.get(&id) {
                    let prev: &RuleInfo = prev;
                    diags.push(Diagnostic::at(
                        file,
                        text,
                        *start,
                        format!(
                            "rule id {id:?} is already used at {}:{}",
                            prev.file.display(),
                            prev.line
                        ),
                    ));
                    continue;
                }
                let info = RuleInfo {
                    id: id.clone(),
                    file: file.clone(),
                    line,
                    effect: match p.effect() {
                        Effect::Permit => "permit",
                        Effect::Forbid => "forbid",
                    },
                    approval: p.annotation("approval").is_some(),
                    reason: p.annotation("reason").map(str::to_string),
                };
                if info.approval && info.effect == "forbid" {
                    diags.push(Diagnostic::at(
                        file,
                        text,
                        *start,
                        "@approval only makes sense on a permit".into(),
                    ));
                }
                let p = p.new_id(PolicyId::new(&id));
                if !known {
                    unvalidated.push(p.clone());
                }
                if let Err(e) = set.add(p) {
                    diags.push(Diagnostic::at(file, text, *start, e.to_string()));
                    continue;
                }
                texts.insert(id.clone(), (file.clone(), text.as_str()));
                rules.insert(id, info);
            }
        }
        if diags.len() > before {
            return None;
        }
        let errors = validate(&schema, unvalidated);
        if errors.is_empty() {
            ValidatedFiles::insert(new_keys);
        }
        let mut found = Vec::new();
        for e in &errors {
            let id = e.policy_id().to_string();
            match texts.get(&id) {
                Some((file, text)) => found.push(miette_diag(file, text, e, e.to_string())),
                None => found.push(Diagnostic::dir(Path::new(&id), e.to_string())),
            }
        }
        diags.extend(collapse_per_action(found));
        let specs = entities;
        let entity_json: Vec<serde_json::Value> = entities
            .iter()
            .map(|e| {
                serde_json::json!({
                    "uid": { "type": e.kind, "id": e.name },
                    "attrs": e.attrs,
                    "parents": [],
                })
            })
            .collect();
        let entities =
            match Entities::from_json_value(serde_json::Value::Array(entity_json), Some(&schema)) {
                Ok(e) => e,
                Err(e) => {
                    diags.push(Diagnostic::dir(Path::new("<entities>"), e.to_string()));
                    return None;
                }
            };
        if diags.len() > before {
            return None;
        }
        let mut action_uids = HashMap::new();
        for (pos, (name, _)) in actions::all().into_iter().enumerate() {
            let uid = match EntityUid::from_str(&format!("Action::{name:?}")) {
                Ok(uid) => uid,
                Err(e) => {
                    diags.push(Diagnostic::dir(Path::new("<actions>"), e.to_string()));
                    return None;
                }
            };
            // The schema's action entities are in `entities`: `action in
            // X` holds for X the action itself or one of these.
            let mut within = vec![uid.clone()];
            if let Some(ancestors) = entities.ancestors(&uid) {
                within.extend(ancestors.cloned());
            }
            action_uids.insert(name, (pos, uid, within));
        }
        let uid_of = |kind: &str, name: &str| -> Option<EntityUid> {
            let kind = EntityTypeName::from_str(kind).ok()?;
            Some(EntityUid::from_type_name_and_id(kind, EntityId::new(name)))
        };
        let mut principals = HashMap::new();
        let mut resources = HashMap::new();
        for e in specs {
            let Some(uid) = uid_of(e.kind, e.name) else {
                diags.push(Diagnostic::dir(
                    Path::new("<entities>"),
                    format!("invalid entity type {}", e.kind),
                ));
                return None;
            };
            if e.kind == "Resource" {
                let pos = resources.len();
                resources.insert(e.name.to_string(), (pos, uid));
            } else {
                principals.insert(e.name.to_string(), uid);
            }
        }
        let slices = (0..resources.len() * action_uids.len())
            .map(|_| OnceLock::new())
            .collect();
        Some(Self {
            full: set,
            slices,
            schema,
            entities,
            authorizer: Authorizer::new(),
            actions: action_uids,
            principals,
            resources,
            rules,
            validated: ValidatedShapes::default(),
        })
    }

    /// Whether `policy`'s scope can match a request on `resource` with an
    /// action that is `in` each of `action_within` (itself and its
    /// ancestors) and no other entity. Exact for `==` and `in` on actions
    /// and `==` on resources; anything else (resource `in`/`is`, any
    /// principal constraint) counts as "can match", which is always sound.
    fn can_apply(
        policy: &cedar_policy::Policy,
        resource: &EntityUid,
        action: &EntityUid,
        action_within: &[EntityUid],
    ) -> bool {
        let resource_ok = match policy.resource_constraint() {
            ResourceConstraint::Eq(uid) => &uid == resource,
            _ => true,
        };
        let action_ok = match policy.action_constraint() {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(uid) => &uid == action,
            ActionConstraint::In(uids) => uids.iter().any(|u| action_within.contains(u)),
        };
        resource_ok && action_ok
    }

    /// The rules that can apply to (resource, action), built once.
    fn slice(
        &self,
        (rpos, resource): &(usize, EntityUid),
        (apos, action, within): &(usize, EntityUid, Vec<EntityUid>),
    ) -> Option<&Slice> {
        let cell = self.slices.get(rpos * self.actions.len() + apos)?;
        Some(cell.get_or_init(|| {
            Slice::new(
                self.full
                    .policies()
                    .filter(|p| Self::can_apply(p, resource, action, within)),
            )
        }))
    }

    /// Decides one command. Pure computation, no I/O.
    pub fn decide(&self, req: &DecisionRequest<'_>) -> Decision {
        self.decide_over(req, false)
    }

    /// Decides over the whole set instead of the (resource, action) slice:
    /// the reference the index is tested against.
    #[cfg(test)]
    pub fn decide_unindexed(&self, req: &DecisionRequest<'_>) -> Decision {
        self.decide_over(req, true)
    }

    fn decide_over(&self, req: &DecisionRequest<'_>, whole: bool) -> Decision {
        let deny = |reason: String| Decision::Deny {
            reason,
            policies: Vec::new(),
        };
        let Some(action) = self.actions.get(req.action) else {
            return deny(format!("unknown action {:?}", req.action));
        };
        let principal = match self.principals.get(req.identity) {
            Some(uid) => uid.clone(),
            None => match EntityTypeName::from_str("Identity") {
                Ok(t) => EntityUid::from_type_name_and_id(t, EntityId::new(req.identity)),
                Err(_) => return deny("invalid identity name".into()),
            },
        };
        let Some(resource) = self.resources.get(req.resource) else {
            return deny(format!(
                "resource `{}` is not defined in the policy set",
                req.resource
            ));
        };
        // Built directly from the values (not through Cedar's schema-directed
        // JSON parser, which costs tens of µs); Request::new still checks it
        // against the action's context type in the schema.
        let context = match context_from_json(&req.context) {
            Ok(c) => c,
            Err(e) => return deny(format!("invalid request context for {}: {e}", req.action)),
        };
        let slice = if whole {
            &self.full
        } else {
            match self.slice(resource, action) {
                Some(s) => s.for_principal(&principal),
                None => return deny("policy index out of range".into()),
            }
        };
        let shape = request_shape(req.action, &req.context);
        let known_valid = self.validated.contains(&shape);
        let request = match Request::new(
            principal,
            action.1.clone(),
            resource.1.clone(),
            context,
            (!known_valid).then_some(&self.schema),
        ) {
            Ok(r) => r,
            Err(e) => return deny(format!("invalid request: {e}")),
        };
        if !known_valid {
            self.validated.insert(shape);
        }
        let response = self
            .authorizer
            .is_authorized(&request, slice, &self.entities);
        // Sorted: Cedar reports them from a hash set, and decisions, audit
        // records and reasons should not change order from run to run.
        let mut determining: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| id.to_string())
            .collect();
        determining.sort_unstable();
        // Cedar skips a rule whose evaluation errors. A skipped forbid must
        // not turn into an allow: fail closed.
        let mut errored_forbids: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| match e {
                cedar_policy::AuthorizationError::PolicyEvaluationError(pe) => {
                    pe.policy_id().to_string()
                }
            })
            .filter(|id| self.rules.get(id).is_some_and(|r| r.effect == "forbid"))
            .collect();
        errored_forbids.sort_unstable();
        if !errored_forbids.is_empty() {
            return Decision::Deny {
                reason: format!(
                    "evaluation error in forbid rule {}",
                    errored_forbids.join(", ")
                ),
                policies: errored_forbids,
            };
        }
        match response.decision() {
            CedarDecision::Deny if determining.is_empty() => Decision::Deny {
                reason: format!(
                    "no rule permits {} on {} for {}",
                    req.action, req.resource, req.identity
                ),
                policies: Vec::new(),
            },
            CedarDecision::Deny => {
                let reasons: Vec<String> = determining
                    .iter()
                    .filter_map(|id| self.rules.get(id).and_then(|r| r.reason.clone()))
                    .collect();
                let reason = if reasons.is_empty() {
                    format!("forbidden by rule {}", determining.join(", "))
                } else {
                    format!("{} (rule {})", reasons.join("; "), determining.join(", "))
                };
                Decision::Deny {
                    reason,
                    policies: determining,
                }
            }
            CedarDecision::Allow => {
                let unconditional = determining
                    .iter()
                    .any(|id| self.rules.get(id).is_some_and(|r| !r.approval));
                if unconditional || req.approved {
                    Decision::Allow {
                        policies: determining,
                    }
                } else {
                    Decision::Hold {
                        policies: determining,
                    }
                }
            }
        }
    }
}

/// The rules of one (resource, action) pair, split once more by principal:
/// a rule whose scope says `principal == Identity::"x"` cannot match any
/// other principal (its scope is false, evaluated first, no error), so a
/// decision for `x` needs only the rules that can match any principal plus
/// those naming `x`. Exact, like the (resource, action) index; each rule is
/// stored at most once per identity named in the pair's rules.
struct Slice {
    /// Rules that can match any principal: the whole answer for a principal
    /// no rule of the pair names with `==`.
    any: cedar_policy::PolicySet,
    /// Per principal named with `==`: `any` plus the rules naming it.
    named: HashMap<EntityUid, cedar_policy::PolicySet>,
}

impl Slice {
    fn new<'a>(policies: impl Iterator<Item = &'a cedar_policy::Policy>) -> Self {
        use cedar_policy::PrincipalConstraint;
        let mut any = cedar_policy::PolicySet::new();
        let mut only: HashMap<EntityUid, Vec<&cedar_policy::Policy>> = HashMap::new();
        for p in policies {
            match p.principal_constraint() {
                PrincipalConstraint::Eq(uid) => only.entry(uid).or_default().push(p),
                // Ids are unique in the whole set, so adding cannot clash.
                _ => {
                    let _ = any.add(p.clone());
                }
            }
        }
        let named = only
            .into_iter()
            .map(|(uid, own)| {
                let mut set = any.clone();
                for p in own {
                    let _ = set.add(p.clone());
                }
                (uid, set)
            })
            .collect();
        Self { any, named }
    }

    /// The rules that can apply to `principal`.
    fn for_principal(&self, principal: &EntityUid) -> &cedar_policy::PolicySet {
        self.named.get(principal).unwrap_or(&self.any)
    }
}

impl Rules {
    /// Whether rule `id` is written for reviewers: its scope names the
    /// `Reviewer` type or only `console:` actions. Rules written for agents
    /// (`permit(principal, action, resource)` and the like) never make
    /// anyone a reviewer, so adding `[console]` grants nothing by itself.
    fn names_reviewers(&self, id: &str) -> bool {
        use cedar_policy::{ActionConstraint, PrincipalConstraint};
        let Some(p) = self.full.policy(&cedar_policy::PolicyId::new(id)) else {
            return false;
        };
        let reviewer_type = |t: &cedar_policy::EntityTypeName| t.basename() == "Reviewer";
        let by_principal = match p.principal_constraint() {
            PrincipalConstraint::Is(t) | PrincipalConstraint::IsIn(t, _) => reviewer_type(&t),
            PrincipalConstraint::Eq(e) | PrincipalConstraint::In(e) => reviewer_type(e.type_name()),
            PrincipalConstraint::Any => false,
        };
        // `console:...` or the `console` action group.
        let console_action = |a: &cedar_policy::EntityUid| {
            let id = a.id().unescaped();
            id == "console" || id.starts_with("console:")
        };
        let by_action = match p.action_constraint() {
            ActionConstraint::Eq(a) => console_action(&a),
            ActionConstraint::In(v) => !v.is_empty() && v.iter().all(console_action),
            ActionConstraint::Any => false,
        };
        by_principal || by_action
    }

    /// Decides what a console reviewer may do. Allowed only by a permit
    /// without `@approval` (a reviewer's action is never itself held), and
    /// never when a forbid could not be evaluated. `Err` carries the reason.
    pub fn decide_reviewer(&self, req: &ReviewRequest<'_>) -> Result<Vec<String>, String> {
        let uid = |kind: &str, id: &str| {
            EntityUid::from_str(&format!("{kind}::{id:?}")).map_err(|e| e.to_string())
        };
        let principal = uid("Reviewer", req.subject)?;
        let action = uid("Action", req.action)?;
        let resource = match req.resource {
            ReviewTarget::Resource(name) => uid("Resource", name)?,
            ReviewTarget::Console => uid("Console", "portcullis")?,
        };
        let reviewer_entity = |id: EntityUid, subject: &str, issuer: &str| {
            cedar_policy::Entity::new(
                id,
                HashMap::from([
                    (
                        "name".to_string(),
                        cedar_policy::RestrictedExpression::new_string(subject.to_string()),
                    ),
                    (
                        "subject".to_string(),
                        cedar_policy::RestrictedExpression::new_string(subject.to_string()),
                    ),
                    (
                        "issuer".to_string(),
                        cedar_policy::RestrictedExpression::new_string(issuer.to_string()),
                    ),
                ]),
                Default::default(),
            )
            .map_err(|e| e.to_string())
        };
        let mut extra = vec![reviewer_entity(principal.clone(), req.subject, req.issuer)?];
        if matches!(req.resource, ReviewTarget::Console) {
            // Resources are entities of the set already; the console is not.
            let console = |v: &str| cedar_policy::RestrictedExpression::new_string(v.to_string());
            extra.push(
                cedar_policy::Entity::new(
                    resource.clone(),
                    HashMap::from([
                        ("name".to_string(), console("portcullis")),
                        ("protocol".to_string(), console("console")),
                        ("kind".to_string(), console("console")),
                    ]),
                    Default::default(),
                )
                .map_err(|e| e.to_string())?,
            );
        }
        let now = (crate::proxy::session::now_ms() / 1000) as i64;
        let time = cedar_policy::RestrictedExpression::new_record([
            (
                "unix".to_string(),
                cedar_policy::RestrictedExpression::new_long(now),
            ),
            (
                "hour".to_string(),
                cedar_policy::RestrictedExpression::new_long(now.rem_euclid(86_400) / 3600),
            ),
            (
                "weekday".to_string(),
                cedar_policy::RestrictedExpression::new_long(((now / 86_400) + 3).rem_euclid(7)),
            ),
        ])
        .map_err(|e| e.to_string())?;
        let s = |v: &str| cedar_policy::RestrictedExpression::new_string(v.to_string());
        let client = cedar_policy::RestrictedExpression::new_record([
            (
                "pid".to_string(),
                cedar_policy::RestrictedExpression::new_long(0),
            ),
            ("cgroup".to_string(), s("")),
            ("address".to_string(), s(req.client)),
        ])
        .map_err(|e| e.to_string())?;
        let mut pairs = vec![
            ("time".to_string(), time),
            ("client".to_string(), client),
            ("destination".to_string(), s(req.destination)),
        ];
        if let Some(r) = &req.requester {
            let requester = uid("Reviewer", r.subject)?;
            if requester != principal {
                extra.push(reviewer_entity(requester.clone(), r.subject, r.issuer)?);
            }
            pairs.push((
                "requester".to_string(),
                cedar_policy::RestrictedExpression::new_entity_uid(requester),
            ));
            pairs.push(("identity".to_string(), s(r.identity)));
            pairs.push(("action".to_string(), s(r.action)));
            pairs.push(("command".to_string(), s(r.command)));
        }
        let context = Context::from_pairs(pairs).map_err(|e| e.to_string())?;
        let request = Request::new(principal, action, resource, context, Some(&self.schema))
            .map_err(|e| format!("invalid request: {e}"))?;
        let entities = self
            .entities
            .clone()
            .add_entities(extra, Some(&self.schema))
            .map_err(|e| e.to_string())?;
        let response = self
            .authorizer
            .is_authorized(&request, &self.full, &entities);
        let determining: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| id.to_string())
            .collect();
        let errored_forbid = response.diagnostics().errors().any(|e| match e {
            cedar_policy::AuthorizationError::PolicyEvaluationError(pe) => self
                .rules
                .get(&pe.policy_id().to_string())
                .is_some_and(|r| r.effect == "forbid"),
        });
        if errored_forbid {
            return Err("a forbid rule could not be evaluated".into());
        }
        match response.decision() {
            CedarDecision::Allow
                if determining.iter().any(|id| {
                    self.rules.get(id).is_some_and(|r| !r.approval) && self.names_reviewers(id)
                }) =>
            {
                Ok(determining)
            }
            CedarDecision::Allow
                if determining
                    .iter()
                    .any(|id| self.rules.get(id).is_some_and(|r| !r.approval)) =>
            {
                Err(format!(
                    "rule {} permits it without naming reviewers: a console permit must have \
                     `principal is Reviewer` (or a Reviewer) or console actions in its scope",
                    determining.join(", ")
                ))
            }
            CedarDecision::Allow => Err("only @approval rules permit it".into()),
            CedarDecision::Deny if determining.is_empty() => Err(format!(
                "no rule permits {} for Reviewer::{:?}",
                req.action, req.subject
            )),
            CedarDecision::Deny => {
                let reasons: Vec<String> = determining
                    .iter()
                    .filter_map(|id| self.rules.get(id).and_then(|r| r.reason.clone()))
                    .collect();
                Err(if reasons.is_empty() {
                    format!("forbidden by rule {}", determining.join(", "))
                } else {
                    format!("{} (rule {})", reasons.join("; "), determining.join(", "))
                })
            }
        }
    }
}

/// What the console asks about a reviewer (see [`Rules::decide_reviewer`]).
#[derive(Debug, Clone)]
pub struct ReviewRequest<'a> {
    /// The reviewer's OIDC subject: `Reviewer::"<subject>"`.
    pub subject: &'a str,
    /// The reviewer's issuer URL (`principal.issuer`).
    pub issuer: &'a str,
    /// A `console:*` action.
    pub action: &'a str,
    /// What it is done to.
    pub resource: ReviewTarget<'a>,
    /// For approve, deny, end_session and revoke: who asked.
    pub requester: Option<Requester<'a>>,
    /// The browser's address (`context.client.address`).
    pub client: &'a str,
    /// The console's address (`context.destination`).
    pub destination: &'a str,
}

/// The resource of a reviewer's action.
#[derive(Debug, Clone, Copy)]
pub enum ReviewTarget<'a> {
    /// A resource of the policy set.
    Resource(&'a str),
    /// The console itself (`Console::"portcullis"`: the audit log).
    Console,
}

/// The agent behind an access request, session or grant.
#[derive(Debug, Clone)]
pub struct Requester<'a> {
    /// Its identity's subject (`context.requester` is `Reviewer::"<it>"`).
    pub subject: &'a str,
    /// Its identity's issuer URL.
    pub issuer: &'a str,
    /// Its identity name.
    pub identity: &'a str,
    /// The action it asked for (empty when none).
    pub action: &'a str,
    /// The command text (empty when none).
    pub command: &'a str,
}

/// Cedar validates a rule once per action it may apply to, so one mistake in
/// a rule with an unconstrained action yields dozens of near-identical
/// errors. Keep the first per location and say how many actions it hit.
fn collapse_per_action(found: Vec<Diagnostic>) -> Vec<Diagnostic> {
    let mut out: Vec<(Diagnostic, usize)> = Vec::new();
    for d in found {
        match out
            .iter_mut()
            .find(|(o, _)| o.file == d.file && o.line == d.line && o.column == d.column)
        {
            Some((_, n)) => *n += 1,
            None => out.push((d, 0)),
        }
    }
    out.into_iter()
        .map(|(mut d, more)| {
            if more > 0 {
                d.message.push_str(&format!(
                    " (and {more} more actions; scope the rule, e.g. `action in Action::\"postgres\"`)"
                ));
            }
            d
        })
        .collect()
}

/// A Cedar context from a JSON object of strings, integers, booleans,
/// arrays (sets) and objects (records).
fn context_from_json(v: &serde_json::Value) -> Result<Context, String> {
    let serde_json::Value::Object(map) = v else {
        return Err("the context must be a JSON object".into());
    };
    let mut pairs = Vec::with_capacity(map.len());
    for (k, v) in map {
        pairs.push((k.clone(), restricted(v)?));
    }
    Context::from_pairs(pairs).map_err(|e| e.to_string())
}

fn restricted(v: &serde_json::Value) -> Result<cedar_policy::RestrictedExpression, String> {
    use cedar_policy::RestrictedExpression as R;
    Ok(match v {
        serde_json::Value::String(s) => R::new_string(s.clone()),
        serde_json::Value::Bool(b) => R::new_bool(*b),
        serde_json::Value::Number(n) => R::new_long(
            n.as_i64()
                .ok_or_else(|| format!("{n} is not a 64-bit integer"))?,
        ),
        serde_json::Value::Array(a) => {
            R::new_set(a.iter().map(restricted).collect::<Result<Vec<_>, _>>()?)
        }
        serde_json::Value::Object(m) => R::new_record(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), restricted(v)?)))
                .collect::<Result<Vec<_>, String>>()?,
        )
        .map_err(|e| e.to_string())?,
        serde_json::Value::Null => return Err("null is not a Cedar value".into()),
    })
}

fn display_name(file: &Path) -> String {
    file.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.display().to_string())
}

/// A diagnostic at the first labelled span of a miette error.
fn miette_diag(file: &Path, text: &str, e: &dyn miette::Diagnostic, message: String) -> Diagnostic {
    let offset = e
        .labels()
        .and_then(|mut l| l.next())
        .map(|l| l.offset())
        .unwrap_or(0);
    let mut message = message;
    if let Some(help) = e.help() {
        message.push_str(&format!(" ({help})"));
    }
    Diagnostic::at(file, text, offset, message)
}

/// Byte offsets where each top-level statement of a Cedar file starts (its
/// first annotation or effect keyword). Cedar names statements `policy0`,
/// `policy1`, ... in this order.
pub fn statement_starts(text: &str) -> Vec<usize> {
    let b = text.as_bytes();
    let mut starts = Vec::new();
    let mut i = 0;
    let mut in_statement = false;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' => {
                if !in_statement {
                    starts.push(i);
                    in_statement = true;
                }
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b';' => in_statement = false,
            c if c.is_ascii_whitespace() => {}
            _ => {
                if !in_statement {
                    starts.push(i);
                    in_statement = true;
                }
            }
        }
        i += 1;
    }
    starts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_starts_skip_comments_and_strings() {
        let text = "// a; comment\npermit(principal, action, resource);\n\n@id(\"x;y\")\nforbid(principal, action, resource)\n  when { context.destination == \";\" };\n";
        let starts = statement_starts(text);
        assert_eq!(starts.len(), 2);
        assert!(text[starts[0]..].starts_with("permit"));
        assert!(text[starts[1]..].starts_with("@id"));
    }
}
