//! What callers record: [`AuditEvent`] and its encoding into the middle of a
//! log line (everything between `time` and `prev_hash`).
//!
//! Owns the event's fields and their order on disk. It must not assign
//! `seq`, `time` or hashes: that is the writer's job.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::AuditError;

/// Event types the log writes itself; [`super::AuditLog::record`] refuses
/// them so that no caller can forge one.
pub const RESERVED_KINDS: &[&str] = &["checkpoint", "audit_recovered"];

/// Who an event is about: the identity a flow speaks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRef {
    /// Identity name (from the tag).
    pub name: String,
    /// Token issuer, when a token was validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Token subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Token id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

impl IdentityRef {
    /// An identity known by name only.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

/// The fields an event takes from its session (`session`, `identity`,
/// `cgroup`, `cgroup_id`, `pid`, `resource`), encoded once per session
/// exactly as [`AuditEvent`] writes them, so that the records of every
/// command of a session do not copy and escape them again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowFields(Arc<[u8]>);

impl FlowFields {
    /// The session fields of `template` as they appear in its line. Fails
    /// when `template` sets anything but its type and those fields.
    pub fn of(template: &AuditEvent) -> Result<Self, AuditError> {
        let session_only = AuditEvent {
            kind: template.kind.clone(),
            session: template.session.clone(),
            identity: template.identity.clone(),
            cgroup: template.cgroup.clone(),
            cgroup_id: template.cgroup_id,
            pid: template.pid,
            resource: template.resource.clone(),
            ..AuditEvent::default()
        };
        if &session_only != template {
            return Err(AuditError::InvalidEvent(
                "session fields taken from an event that sets other fields".into(),
            ));
        }
        let fields = template.encode_fields()?;
        let start = type_member_len(&template.kind)?;
        // `"type":K` alone, or followed by `,` and the session's fields.
        Ok(Self(fields.get(start + 1..).unwrap_or_default().into()))
    }

    /// Whether no session field was set (the events carry nothing).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Length of `"type":K` for the event type `kind` (counted, not written).
fn type_member_len(kind: &str) -> Result<usize, AuditError> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(TYPE_KEY.len());
    serde_json::to_writer(&mut n, kind).map_err(AuditError::Encode)?;
    Ok(n.0)
}

const TYPE_KEY: &[u8] = b"\"type\":";

/// Room for an event's fields without the session's: a command record's
/// are some 400 bytes.
const ENCODED_CAPACITY: usize = 512;

/// One audit event. Unset (`None`, empty) fields are left out of the line.
/// On disk the fields appear in this order after `seq`, `time` and `type`;
/// `detail` stays a nested object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Event type (`session_start`, `session_end`, `command`, `flow_refused`,
    /// `tag`, `policy_reload`, `grant`, ...). Written as `type`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Session id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The identity acting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityRef>,
    /// Cgroup path (relative to the cgroup2 mount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Cgroup id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// Process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Resource name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The action (`postgres:delete`, `ssh:exec`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// `allow`, `deny` or `hold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// Why (the rule, the refusal, the error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Version of the policy set that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    /// Ids of the policies that decided.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_ids: Vec<String>,
    /// Who approved (just-in-time access).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<String>,
    /// Masking counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masking: Option<Value>,
    /// Byte counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Value>,
    /// Anything else, kept as a nested `detail` object.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub detail: Map<String, Value>,
    /// The session's fields encoded already ([`FlowFields`]): written where
    /// `session` through `resource` go, which must then be unset.
    #[serde(skip)]
    pub flow: Option<FlowFields>,
}

macro_rules! string_setters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        $(
            $(#[$doc])*
            #[must_use]
            pub fn $name(mut self, value: impl Into<String>) -> Self {
                self.$name = Some(value.into());
                self
            }
        )*
    };
}

impl AuditEvent {
    /// An event of type `kind` with nothing else set.
    pub fn new(kind: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            ..Self::default()
        }
    }

    string_setters! {
        /// Sets the session id.
        session,
        /// Sets the cgroup path.
        cgroup,
        /// Sets the resource name.
        resource,
        /// Sets the action.
        action,
        /// Sets the decision (`allow`, `deny`, `hold`).
        decision,
        /// Sets the reason.
        reason,
        /// Sets the policy set version.
        policy_version,
        /// Sets the approver.
        approver,
    }

    /// Sets the identity.
    #[must_use]
    pub fn identity(mut self, identity: IdentityRef) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Sets the session's fields from their encoded form (instead of
    /// [`AuditEvent::session`], [`AuditEvent::identity`], ...).
    #[must_use]
    pub fn flow_fields(mut self, fields: FlowFields) -> Self {
        self.flow = Some(fields);
        self
    }

    /// Sets the cgroup id.
    #[must_use]
    pub fn cgroup_id(mut self, id: u64) -> Self {
        self.cgroup_id = Some(id);
        self
    }

    /// Sets the process id.
    #[must_use]
    pub fn pid(mut self, pid: u32) -> Self {
        self.pid = Some(pid);
        self
    }

    /// Adds a policy id.
    #[must_use]
    pub fn policy_id(mut self, id: impl Into<String>) -> Self {
        self.policy_ids.push(id.into());
        self
    }

    /// Sets the masking counts.
    #[must_use]
    pub fn masking(mut self, masking: Value) -> Self {
        self.masking = Some(masking);
        self
    }

    /// Sets the byte counts.
    #[must_use]
    pub fn bytes(mut self, bytes: Value) -> Self {
        self.bytes = Some(bytes);
        self
    }

    /// Adds one `detail` entry.
    #[must_use]
    pub fn detail(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.detail.insert(key.into(), value.into());
        self
    }

    /// Checks that a caller may record this event.
    pub(crate) fn validate(&self) -> Result<(), AuditError> {
        if self.kind.is_empty() {
            return Err(AuditError::InvalidEvent("the event type is empty".into()));
        }
        if RESERVED_KINDS.contains(&self.kind.as_str()) {
            return Err(AuditError::InvalidEvent(format!(
                "event type {:?} is written by the audit log itself",
                self.kind
            )));
        }
        Ok(())
    }

    /// The event's fields as they go into the line: `"type":...,...`, with no
    /// surrounding braces and no leading or trailing comma.
    pub(crate) fn encode_fields(&self) -> Result<Vec<u8>, AuditError> {
        let flow = match &self.flow {
            Some(f) if !f.as_bytes().is_empty() => Some(f.as_bytes()),
            _ => None,
        };
        // One buffer, sized for a usual command record and the session's
        // fields, so that neither growing it nor splicing them in copies
        // the line again.
        let mut bytes = Vec::with_capacity(ENCODED_CAPACITY + flow.map_or(0, <[u8]>::len));
        serde_json::to_writer(&mut bytes, self).map_err(AuditError::Encode)?;
        // A struct always serializes as `{...}` with at least `type`.
        if bytes.len() < 2 || bytes.first() != Some(&b'{') || bytes.last() != Some(&b'}') {
            return Err(AuditError::InvalidEvent(
                "the event did not encode as a JSON object".into(),
            ));
        }
        let Some(flow) = flow else {
            bytes.pop();
            bytes.remove(0);
            return Ok(bytes);
        };
        if self.session.is_some()
            || self.identity.is_some()
            || self.cgroup.is_some()
            || self.cgroup_id.is_some()
            || self.pid.is_some()
            || self.resource.is_some()
        {
            return Err(AuditError::InvalidEvent(
                "the session's fields are set twice".into(),
            ));
        }
        // `{"type":K` `,flow` `,rest` `}`: the session's fields go right
        // after the type, where the derived encoding puts them.
        let type_end = 1 + type_member_len(&self.kind)?;
        if bytes.get(1..1 + TYPE_KEY.len()) != Some(TYPE_KEY) || type_end >= bytes.len() {
            return Err(AuditError::InvalidEvent(
                "the event did not encode with its type first".into(),
            ));
        }
        // In place, with two block moves (a byte-wise splice was 1% of the
        // daemon's samples): `{"type":K,rest}` becomes
        // `"type":K,flow,rest`.
        let encoded = bytes.len();
        let gap = 1 + flow.len();
        bytes.resize(encoded + gap, 0);
        bytes.copy_within(type_end..encoded - 1, type_end + gap);
        bytes[type_end] = b',';
        bytes[type_end + 1..type_end + gap].copy_from_slice(flow);
        bytes.copy_within(1..encoded - 1 + gap, 0);
        bytes.truncate(encoded - 2 + gap);
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_only_set_fields_in_order() {
        let event = AuditEvent::new("command")
            .session("s1")
            .identity(IdentityRef {
                name: "billing".into(),
                sub: Some("svc".into()),
                ..IdentityRef::default()
            })
            .pid(7)
            .decision("deny")
            .detail("sql", "DELETE FROM t");
        let fields = String::from_utf8(event.encode_fields().unwrap()).unwrap();
        assert_eq!(
            fields,
            r#""type":"command","session":"s1","identity":{"name":"billing","sub":"svc"},"pid":7,"decision":"deny","detail":{"sql":"DELETE FROM t"}"#
        );
        assert_eq!(
            String::from_utf8(AuditEvent::new("tag").encode_fields().unwrap()).unwrap(),
            r#""type":"tag""#
        );
    }

    #[test]
    fn newlines_in_values_stay_escaped() {
        let event = AuditEvent::new("command").reason("a\nb\r\u{2028}");
        let fields = event.encode_fields().unwrap();
        assert!(!fields.contains(&b'\n') && !fields.contains(&b'\r'));
    }

    /// A session's fields in both forms, with characters JSON escapes.
    fn session_event(kind: &str) -> AuditEvent {
        AuditEvent::new(kind)
            .session("s-\"1\"")
            .identity(IdentityRef {
                name: "billing\\agent".into(),
                iss: Some("https://issuer.example/\u{e9}".into()),
                sub: Some("svc\n1".into()),
                jti: None,
            })
            .cgroup("/agents/a \u{2028} b")
            .cgroup_id(42)
            .pid(7)
            .resource("db")
    }

    #[test]
    fn encoded_session_fields_write_the_same_line() {
        let flow = FlowFields::of(&session_event("x")).unwrap();
        let finish = |ev: AuditEvent| {
            ev.action("postgres:select")
                .decision("allow")
                .policy_version("v1")
                .policy_id("p")
                .detail("command", "SELECT \"a\" FROM t")
                .detail("rows", 3)
        };
        for kind in ["command", "command_end", "k\"q"] {
            let copied = finish(session_event(kind));
            let encoded = finish(AuditEvent::new(kind).flow_fields(flow.clone()));
            assert_eq!(
                String::from_utf8(encoded.encode_fields().unwrap()).unwrap(),
                String::from_utf8(copied.encode_fields().unwrap()).unwrap(),
            );
            // Nothing after the session's fields.
            assert_eq!(
                AuditEvent::new(kind)
                    .flow_fields(flow.clone())
                    .encode_fields()
                    .unwrap(),
                session_event(kind).encode_fields().unwrap(),
            );
        }
        // A session with none of the fields set adds nothing.
        let empty = FlowFields::of(&AuditEvent::new("x")).unwrap();
        assert_eq!(
            AuditEvent::new("command")
                .flow_fields(empty)
                .action("a")
                .encode_fields()
                .unwrap(),
            AuditEvent::new("command")
                .action("a")
                .encode_fields()
                .unwrap(),
        );
    }

    #[test]
    fn session_fields_are_taken_once_and_only_from_a_session_event() {
        let flow = FlowFields::of(&session_event("x")).unwrap();
        let twice = AuditEvent::new("command").flow_fields(flow).pid(8);
        assert!(matches!(
            twice.encode_fields(),
            Err(AuditError::InvalidEvent(_))
        ));
        let more = session_event("x").action("a");
        assert!(matches!(
            FlowFields::of(&more),
            Err(AuditError::InvalidEvent(_))
        ));
    }

    #[test]
    fn reserved_and_empty_kinds_are_refused() {
        assert!(AuditEvent::new("checkpoint").validate().is_err());
        assert!(AuditEvent::new("audit_recovered").validate().is_err());
        assert!(AuditEvent::new("").validate().is_err());
        assert!(AuditEvent::new("command").validate().is_ok());
    }
}
