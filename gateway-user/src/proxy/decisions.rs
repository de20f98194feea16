//! A flow's memo of Cedar allows, so that a command decided once (every
//! extended-protocol execution re-sends its Parse; applications send the
//! same statement shapes and the same requests over and over) is not
//! evaluated by Cedar again while nothing its decision depends on has
//! changed. One per PostgreSQL session and per kept-alive HTTP connection,
//! never shared between flows (the flow fixes identity and resource, which
//! are in the key anyway).
//!
//! What a decision depends on, and how the memo keys it:
//! - the policy set: the memo holds the `Arc` of the set it decided under
//!   and is emptied when the loaded set is another one (a reload, even to
//!   the same text);
//! - identity, resource and action: in the key;
//! - the context (`client`, `destination`, `database`, `user`,
//!   `statement`, `time`): in the key, serialized, except the attributes
//!   that change from one statement to the next and that no rule of the
//!   loaded set mentions ([`VOLATILE`]; see
//!   [`crate::policy::PolicySet::rules_mention`]): with `context.time` in a
//!   rule, nothing is remembered across two different seconds.
//!
//! Only a plain allow (no approval involved) is remembered. A deny or a
//! hold is decided again every time, so a hold is never turned into an
//! allow by the memo, and JIT grants (which only ever lift a hold) and
//! their revocation are seen at once.
//!
//! Owns nothing but the memo; the gate still writes every command's audit
//! record before it is forwarded, and runs grants and holds itself.

use std::{collections::HashMap, sync::Arc};

use serde_json::{Map, Value};

use super::context::{Context, BASE_NAMES};
use crate::policy::{Decision, DecisionRequest, PolicySet};

/// Entries per session; the memo starts over when full.
const MAX_ENTRIES: usize = 64;
/// Longest key remembered (a session's memo stays within a few tens of KiB).
const MAX_KEY: usize = 2048;

/// Context attributes that change between otherwise identical commands,
/// left out of the key when no rule mentions them: (path to the record
/// holding it, attribute).
const VOLATILE: &[(&[&str], &str)] = &[(&[], "time"), (&["statement"], "text")];

/// One session's memo of allows.
#[derive(Default)]
pub(crate) struct Decisions {
    /// The policy set the entries were decided under.
    policy: Option<Arc<PolicySet>>,
    /// Key → the permitting rules.
    allows: HashMap<Vec<u8>, Vec<String>>,
    /// Lookups answered from the memo (for tests and curiosity).
    hits: u64,
}

impl Decisions {
    /// Cedar's decision of `identity` doing `action` on `resource` with
    /// `context`, under `policy` (the currently loaded set), from the memo
    /// when this exact question was answered with an allow under the same
    /// set.
    pub(crate) fn decide(
        &mut self,
        policy: &Arc<PolicySet>,
        identity: &str,
        resource: &str,
        action: &str,
        context: &Context,
    ) -> Decision {
        if !self.policy.as_ref().is_some_and(|p| Arc::ptr_eq(p, policy)) {
            self.allows.clear();
            self.policy = Some(policy.clone());
        }
        let key = key(policy, identity, resource, action, context);
        if let Some(policies) = key.as_ref().and_then(|k| self.allows.get(k)) {
            self.hits += 1;
            return Decision::Allow {
                policies: policies.clone(),
            };
        }
        let decision = policy.decide(&DecisionRequest {
            identity,
            resource,
            action,
            context: context.to_value(),
            approved: false,
        });
        if let (Decision::Allow { policies }, Some(k)) = (&decision, key) {
            if self.allows.len() >= MAX_ENTRIES {
                self.allows.clear();
            }
            self.allows.insert(k, policies.clone());
        }
        decision
    }

    /// How many decisions came from the memo.
    #[cfg(test)]
    pub(super) fn hits(&self) -> u64 {
        self.hits
    }
}

/// The memo key: identity, resource, action and the context without the
/// volatile attributes the rules do not read, serialized as compact JSON
/// straight from the command's context (no copy of it; the flow's
/// attributes as they were serialized once for the flow). `None`: longer
/// than [`MAX_KEY`] (serializing stops there).
fn key(
    policy: &PolicySet,
    identity: &str,
    resource: &str,
    action: &str,
    context: &Context,
) -> Option<Vec<u8>> {
    let mut skip: [Option<(&[&str], &str)>; VOLATILE.len()] = [None; VOLATILE.len()];
    for (slot, (path, attr)) in skip.iter_mut().zip(VOLATILE) {
        if !policy.rules_mention(attr) {
            *slot = Some((path, attr));
        }
    }
    let mut k = Bounded(Vec::with_capacity(256));
    for part in [identity, resource, action] {
        k.0.extend_from_slice(part.as_bytes());
        k.0.push(0);
    }
    write_context(&mut k, context, &skip).ok()?;
    k.0.push(0);
    (k.0.len() <= MAX_KEY).then_some(k.0)
}

/// `context` as compact JSON, as `serde_json` writes [`Context::to_map`],
/// without the attributes `skip` names.
fn write_context(
    out: &mut Bounded,
    context: &Context,
    skip: &[Option<(&[&str], &str)>],
) -> Result<(), serde_json::Error> {
    use std::io::Write as _;
    let own = context.own();
    out.write_all(b"{").map_err(serde_json::Error::io)?;
    let mut first = true;
    for name in BASE_NAMES {
        if skipped(skip, &[], name) {
            continue;
        }
        member_name(out, &mut first, name)?;
        // An action attribute of the same name takes the base one's place.
        if let Some(v) = own.get(name) {
            write_value(out, name, v, &[], skip)?;
        } else if let Some((v, json)) = context.flow_attribute(name) {
            if descends(skip, &[], name) {
                write_value(out, name, v, &[], skip)?;
            } else {
                out.write_all(json).map_err(serde_json::Error::io)?;
            }
        } else if descends(skip, &[], name) {
            write_value(out, name, &context.time().value(), &[], skip)?;
        } else {
            context
                .time()
                .write_json(out)
                .map_err(serde_json::Error::io)?;
        }
    }
    for (name, value) in own {
        if BASE_NAMES.contains(&name.as_str()) || skipped(skip, &[], name) {
            continue;
        }
        member_name(out, &mut first, name)?;
        write_value(out, name, value, &[], skip)?;
    }
    out.write_all(b"}").map_err(serde_json::Error::io)
}

/// `,"name":` (no comma before the first member of a record).
fn member_name(out: &mut Bounded, first: &mut bool, name: &str) -> Result<(), serde_json::Error> {
    use std::io::Write as _;
    if !std::mem::take(first) {
        out.write_all(b",").map_err(serde_json::Error::io)?;
    }
    serde_json::to_writer(&mut *out, name)?;
    out.write_all(b":").map_err(serde_json::Error::io)
}

/// Whether `skip` leaves out attribute `name` of the record at `at`.
fn skipped(skip: &[Option<(&[&str], &str)>], at: &[&str], name: &str) -> bool {
    skip.iter()
        .flatten()
        .any(|(path, attr)| *path == at && *attr == name)
}

/// Whether `skip` leaves out something inside attribute `name` of the
/// record at `at`.
fn descends(skip: &[Option<(&[&str], &str)>], at: &[&str], name: &str) -> bool {
    skip.iter().flatten().any(|(path, _)| {
        path.len() == at.len() + 1 && path.starts_with(at) && path[at.len()] == name
    })
}

/// The value of attribute `name` of the record at `at`, reduced when it
/// is a record holding a skipped attribute.
fn write_value(
    out: &mut Bounded,
    name: &str,
    value: &Value,
    at: &[&str],
    skip: &[Option<(&[&str], &str)>],
) -> Result<(), serde_json::Error> {
    match value {
        Value::Object(record) if descends(skip, at, name) => {
            let mut path: Vec<&str> = at.to_vec();
            path.push(name);
            write_reduced(out, record, &path, skip)
        }
        other => serde_json::to_writer(&mut *out, other),
    }
}

/// A key being written; refuses to grow past [`MAX_KEY`].
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_KEY {
            return Err(std::io::Error::other("memo key too long"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `map` (the record at path `at` of the context) as compact JSON, as
/// `serde_json` writes it, without the attributes `skip` names.
fn write_reduced(
    out: &mut Bounded,
    map: &Map<String, Value>,
    at: &[&str],
    skip: &[Option<(&[&str], &str)>],
) -> Result<(), serde_json::Error> {
    use std::io::Write as _;
    out.write_all(b"{").map_err(serde_json::Error::io)?;
    let mut first = true;
    for (name, value) in map {
        if skipped(skip, at, name) {
            continue;
        }
        member_name(out, &mut first, name)?;
        write_value(out, name, value, at, skip)?;
    }
    out.write_all(b"}").map_err(serde_json::Error::io)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use serde_json::json;

    use super::*;
    use crate::proxy::context::{ContextTime, FlowContext};

    const TOML: &str = r#"
[resource.db]
protocol = "postgres"
match = ["127.0.0.1:5432"]
credentials = { user = "postgres", password_file = "/nonexistent" }

[issuer.demo]
url = "https://issuer.example"
jwks_file = "/nonexistent"
audience = "portcullis"

[identity.alice]
issuer = "demo"
subject = "alice"

[identity.bob]
issuer = "demo"
subject = "bob"
"#;

    fn set(cedar: &str) -> Arc<PolicySet> {
        let texts = vec![
            (PathBuf::from("p.toml"), TOML.to_string()),
            (PathBuf::from("p.cedar"), cedar.to_string()),
        ];
        Arc::new(
            PolicySet::from_texts(Path::new("/nonexistent"), texts)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    fn context(text: &str, hour: i64) -> Context {
        let mut c = without_statement(hour);
        c.insert(
            "statement".into(),
            json!({
                "text": text,
                "fingerprint": "f",
                "tables": ["t"],
                "functions": [],
                "has_where": true,
                "volatile_functions": [],
            }),
        );
        c
    }

    fn without_statement(hour: i64) -> Context {
        let flow = FlowContext::from_values(
            json!({"pid": 1, "cgroup": "/a", "address": "127.0.0.1:1"}),
            json!("127.0.0.1:5432"),
        );
        let mut c = Context::new(Arc::new(flow), ContextTime::at(hour * 3600));
        c.insert("database".into(), json!("postgres"));
        c.insert("user".into(), json!("postgres"));
        c
    }

    const ALLOW_ALICE: &str = r#"permit(principal == Identity::"alice", action in Action::"postgres", resource == Resource::"db");"#;

    #[test]
    fn an_allow_is_remembered_and_the_volatile_text_left_out() {
        let p = set(ALLOW_ALICE);
        let mut d = Decisions::default();
        for i in 0..5 {
            let ctx = context(&format!("select * from t where id = {i}"), 3 + i);
            let got = d.decide(&p, "alice", "db", "postgres:select", &ctx);
            assert!(matches!(got, Decision::Allow { .. }), "{got:?}");
        }
        // The first is decided; the others differ only in text and time
        // and are answered from the memo (no rule mentions either).
        assert_eq!(d.hits(), 4);
    }

    #[test]
    fn each_identity_and_action_is_decided_on_its_own() {
        let p = set(ALLOW_ALICE);
        let mut d = Decisions::default();
        let ctx = context("select 1", 3);
        assert!(matches!(
            d.decide(&p, "alice", "db", "postgres:select", &ctx),
            Decision::Allow { .. }
        ));
        // Bob is not permitted: the memo of alice's allow does not answer.
        assert!(matches!(
            d.decide(&p, "bob", "db", "postgres:select", &ctx),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            d.decide(&p, "bob", "db", "postgres:select", &ctx),
            Decision::Deny { .. }
        ));
        assert_eq!(d.hits(), 0);
    }

    #[test]
    fn a_reload_empties_the_memo() {
        let before = set(ALLOW_ALICE);
        let mut d = Decisions::default();
        let ctx = context("delete from t where id = 1", 3);
        assert!(matches!(
            d.decide(&before, "alice", "db", "postgres:delete", &ctx),
            Decision::Allow { .. }
        ));
        // The reloaded set forbids deletes: the remembered allow is gone.
        let after = set(&format!(
            "{ALLOW_ALICE}\nforbid(principal, action == Action::\"postgres:delete\", resource);"
        ));
        assert!(matches!(
            d.decide(&after, "alice", "db", "postgres:delete", &ctx),
            Decision::Deny { .. }
        ));
        // Even a reload to the same text is another set.
        let same = set(ALLOW_ALICE);
        assert!(matches!(
            d.decide(&same, "alice", "db", "postgres:delete", &ctx),
            Decision::Allow { .. }
        ));
        assert_eq!(d.hits(), 0);
    }

    #[test]
    fn holds_are_never_remembered() {
        let p = set(&format!("@approval(\"required\")\n{}", ALLOW_ALICE));
        let mut d = Decisions::default();
        let ctx = context("update t set a = 1 where id = 1", 3);
        for _ in 0..3 {
            assert!(matches!(
                d.decide(&p, "alice", "db", "postgres:update", &ctx),
                Decision::Hold { .. }
            ));
        }
        assert_eq!(d.hits(), 0);
    }

    #[test]
    fn rules_that_read_time_or_text_keep_them_in_the_key() {
        // Allowed only between 09:00 and 17:00.
        let p = set(
            r#"permit(principal == Identity::"alice", action in Action::"postgres", resource == Resource::"db")
  when { context.time.hour >= 9 && context.time.hour < 17 };"#,
        );
        let mut d = Decisions::default();
        assert!(matches!(
            d.decide(
                &p,
                "alice",
                "db",
                "postgres:select",
                &context("select 1", 10)
            ),
            Decision::Allow { .. }
        ));
        // Same statement at 20:00: decided again, and denied.
        assert!(matches!(
            d.decide(
                &p,
                "alice",
                "db",
                "postgres:select",
                &context("select 1", 20)
            ),
            Decision::Deny { .. }
        ));
        let p = set(
            r#"permit(principal == Identity::"alice", action in Action::"postgres", resource == Resource::"db")
  unless { context.statement.text like "*secret*" };"#,
        );
        let mut d = Decisions::default();
        assert!(matches!(
            d.decide(
                &p,
                "alice",
                "db",
                "postgres:select",
                &context("select 1", 10)
            ),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            d.decide(
                &p,
                "alice",
                "db",
                "postgres:select",
                &context("select secret", 10)
            ),
            Decision::Deny { .. }
        ));
        assert_eq!(d.hits(), 0);
    }

    #[test]
    fn an_escape_in_the_rules_keeps_everything_in_the_key() {
        // `\u{74}ime` is `time`, unwritten.
        let p = set(
            r#"permit(principal == Identity::"alice", action in Action::"postgres", resource == Resource::"db")
  when { context["\u{74}ime"].hour >= 9 && context["\u{74}ime"].hour < 17 };"#,
        );
        assert!(p.rules_mention("time"));
        let mut d = Decisions::default();
        assert!(matches!(
            d.decide(
                &p,
                "alice",
                "db",
                "postgres:select",
                &context("select 1", 10)
            ),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            d.decide(
                &p,
                "alice",
                "db",
                "postgres:select",
                &context("select 1", 20)
            ),
            Decision::Deny { .. }
        ));
    }

    /// The key is written without copying the context; it must say exactly
    /// what the reduced copy serialized by `serde_json` says, for rules
    /// that read the volatile attributes and rules that do not.
    #[test]
    fn the_key_is_the_reduced_context_as_serde_json_writes_it() {
        let by_copy = |policy: &PolicySet, ctx: &Context| {
            let mut copy = ctx.to_map();
            if !policy.rules_mention("time") {
                copy.shift_remove("time");
            }
            if !policy.rules_mention("text") {
                if let Some(Value::Object(st)) = copy.get_mut("statement") {
                    st.shift_remove("text");
                }
            }
            let mut k = b"alice\0db\0postgres:select\0".to_vec();
            k.extend(serde_json::to_vec(&copy).unwrap());
            k.push(0);
            k
        };
        let mut odd = context("select '\"}\\\u{1}é'", 3);
        odd.insert(
            "a \"key\"".into(),
            json!({"text": "kept: not the statement"}),
        );
        odd.insert("statement2".into(), json!({"text": "kept too"}));
        // Action attributes named as the flow's or the time's take their
        // place in the record, and in the key.
        let mut shadowing = context("select 2", 4);
        shadowing.insert("destination".into(), json!({"text": "not volatile"}));
        shadowing.insert("time".into(), json!({"hour": 99}));
        for rules in [
            ALLOW_ALICE.to_string(),
            format!("{ALLOW_ALICE}\npermit(principal, action in Action::\"postgres\", resource) when {{ context.time.hour > 30 }};"),
            format!("{ALLOW_ALICE}\npermit(principal, action in Action::\"postgres\", resource) when {{ context.statement.text == \"x\" }};"),
        ] {
            let policy = set(&rules);
            for ctx in [
                context("select 1", 2),
                odd.clone(),
                without_statement(1),
                shadowing.clone(),
            ] {
                assert_eq!(
                    key(&policy, "alice", "db", "postgres:select", &ctx),
                    Some(by_copy(&policy, &ctx)),
                    "{rules}"
                );
            }
        }
        // Past the bound there is no key (and no half-written one).
        let long = context(&"x".repeat(MAX_KEY), 0);
        let reads_text = set(&format!(
            "{ALLOW_ALICE}\npermit(principal, action in Action::\"postgres\", resource) when {{ context.statement.text == \"x\" }};"
        ));
        assert_eq!(
            key(&reads_text, "alice", "db", "postgres:select", &long),
            None
        );
    }
}
