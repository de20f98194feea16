//! What callers record: [`AuditEvent`] and its encoding into the middle of a
//! log line (everything between `time` and `prev_hash`).
//!
//! Owns the event's fields and their order on disk. It must not assign
//! `seq`, `time` or hashes: that is the writer's job.

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
        let mut bytes = serde_json::to_vec(self).map_err(AuditError::Encode)?;
        // A struct always serializes as `{...}` with at least `type`.
        if bytes.len() < 2 || bytes.first() != Some(&b'{') || bytes.last() != Some(&b'}') {
            return Err(AuditError::InvalidEvent(
                "the event did not encode as a JSON object".into(),
            ));
        }
        bytes.pop();
        bytes.remove(0);
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

    #[test]
    fn reserved_and_empty_kinds_are_refused() {
        assert!(AuditEvent::new("checkpoint").validate().is_err());
        assert!(AuditEvent::new("audit_recovered").validate().is_err());
        assert!(AuditEvent::new("").validate().is_err());
        assert!(AuditEvent::new("command").validate().is_ok());
    }
}
