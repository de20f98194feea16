//! The audit page's search: the filters beyond session and identity
//! (resource, decision, event type, time range, free text) read from the
//! query string and checked against each event.
//!
//! Owns parsing those fields and matching one event. It must not read the
//! log (the page does, through [`crate::audit::read_events_where`]).

use std::collections::HashMap;

use serde_json::Value;

/// The audit page's extra filters. Empty fields match everything.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AuditSearch {
    /// The event's `resource`, exactly.
    pub resource: Option<String>,
    /// The event's `decision` (`allow`, `deny`, ...), exactly.
    pub decision: Option<String>,
    /// The event's `type` (`command`, `access_request`, ...), exactly.
    pub kind: Option<String>,
    /// Events at or after (Unix ms).
    pub from_ms: Option<u64>,
    /// Events at or before (Unix ms).
    pub until_ms: Option<u64>,
    /// Words that must all appear in the event (any field, any case).
    pub words: Vec<String>,
}

impl AuditSearch {
    /// Reads `resource`, `decision`, `type`, `from`, `until` (RFC 3339, a
    /// date, or a duration ago such as `2h`) and `q` (free text). A time
    /// that does not parse is an error naming the field.
    pub fn from_query(q: &HashMap<String, String>) -> Result<Self, String> {
        let want = |k: &str| {
            q.get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let time = |k: &str| -> Result<Option<u64>, String> {
            want(k)
                .map(|v| crate::audit::parse_since(&v).map_err(|e| format!("{k}: {e}")))
                .transpose()
        };
        Ok(Self {
            resource: want("resource"),
            decision: want("decision"),
            kind: want("type"),
            from_ms: time("from")?,
            until_ms: time("until")?,
            words: want("q")
                .map(|t| t.split_whitespace().map(str::to_lowercase).collect())
                .unwrap_or_default(),
        })
    }

    /// Whether no filter is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Whether `event` passes every filter.
    pub fn matches(&self, event: &Value) -> bool {
        let field = |k: &str, want: &Option<String>| {
            want.as_ref()
                .is_none_or(|w| event[k].as_str() == Some(w.as_str()))
        };
        if !field("resource", &self.resource)
            || !field("decision", &self.decision)
            || !field("type", &self.kind)
        {
            return false;
        }
        if self.from_ms.is_some() || self.until_ms.is_some() {
            let Some(t) = event["time"]
                .as_str()
                .and_then(|t| crate::audit::parse_since(t).ok())
            else {
                return false;
            };
            if self.from_ms.is_some_and(|f| t < f) || self.until_ms.is_some_and(|u| t > u) {
                return false;
            }
        }
        if !self.words.is_empty() {
            let text = event.to_string().to_lowercase();
            return self.words.iter().all(|w| text.contains(w.as_str()));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn each_filter_narrows_the_events() {
        let ev = [
            json!({"seq": 1, "time": "2026-12-01T10:00:00.000Z", "type": "command", "resource": "orders-db",
                   "decision": "allow", "command": "SELECT * FROM Orders"}),
            json!({"seq": 2, "time": "2026-12-01T11:00:00.000Z", "type": "command", "resource": "orders-db",
                   "decision": "deny", "reason": "no deletes", "command": "delete from orders"}),
            json!({"seq": 3, "time": "2026-12-01T12:00:00.000Z", "type": "access_request", "resource": "box",
                   "decision": "allow", "approver": "alice@example.com"}),
            json!({"seq": 4, "type": "command", "resource": "box", "decision": "allow"}),
        ];
        let seqs = |s: &AuditSearch| -> Vec<u64> {
            ev.iter()
                .filter(|e| s.matches(e))
                .map(|e| e["seq"].as_u64().unwrap())
                .collect()
        };
        let all = AuditSearch::from_query(&q(&[("resource", ""), ("q", " ")])).unwrap();
        assert!(all.is_empty());
        assert_eq!(seqs(&all), vec![1, 2, 3, 4]);
        let s = AuditSearch::from_query(&q(&[("resource", "orders-db")])).unwrap();
        assert_eq!(seqs(&s), vec![1, 2]);
        let s = AuditSearch::from_query(&q(&[("decision", "deny")])).unwrap();
        assert_eq!(seqs(&s), vec![2]);
        let s = AuditSearch::from_query(&q(&[("type", "access_request")])).unwrap();
        assert_eq!(seqs(&s), vec![3]);
        // A time range: inclusive at both ends; an event without a time is
        // not in any range.
        let s = AuditSearch::from_query(&q(&[
            ("from", "2026-12-01T10:30:00Z"),
            ("until", "2026-12-01T12:00:00Z"),
        ]))
        .unwrap();
        assert_eq!(seqs(&s), vec![2, 3]);
        // Free text: every word, any case, any field.
        let s = AuditSearch::from_query(&q(&[("q", "ORDERS select")])).unwrap();
        assert_eq!(seqs(&s), vec![1]);
        let s = AuditSearch::from_query(&q(&[("q", "alice")])).unwrap();
        assert_eq!(seqs(&s), vec![3]);
        // Filters combine.
        let s = AuditSearch::from_query(&q(&[
            ("resource", "box"),
            ("decision", "allow"),
            ("type", "command"),
        ]))
        .unwrap();
        assert_eq!(seqs(&s), vec![4]);
        let err = AuditSearch::from_query(&q(&[("until", "yesterday-ish")])).unwrap_err();
        assert!(err.starts_with("until:"), "{err}");
    }
}
