//! What the MCP handler writes to the session's `mcp.jsonl`: each JSON-RPC
//! message as relayed, with the decision taken on it, and the metadata view
//! that replaces it with `record = "metadata"`.
//!
//! Owns the mapping from a relayed message to a
//! [`crate::record::McpMessageRecord`]. It must not decide, mask or audit:
//! callers pass the message after masking and the decision they took.

use serde_json::{json, Value};

use super::classify;
use crate::{
    proxy::{session::now_ms, Flow},
    record::McpMessageRecord,
};

pub use crate::record::mcp_from as from;

/// The decision on a message, as recorded.
pub struct Verdict<'a> {
    /// `allow`, `approved`, `deny`.
    pub decision: &'a str,
    /// The rules behind it.
    pub rules: &'a [String],
}

/// Records `msg` (as relayed) on the flow's recording; a no-op when the
/// session records nothing.
pub fn record(
    flow: &Flow,
    from: &str,
    msg: &Value,
    tool: Option<&str>,
    verdict: Option<Verdict<'_>>,
) {
    if !flow.recording.is_recording() {
        return;
    }
    let method = msg
        .get("method")
        .and_then(Value::as_str)
        .map(str::to_string);
    let tool = tool.map(str::to_string).or_else(|| {
        (method.as_deref() == Some("tools/call"))
            .then(|| msg.pointer("/params/name").and_then(Value::as_str))
            .flatten()
            .map(str::to_string)
    });
    let rec = McpMessageRecord {
        t_ms: now_ms().saturating_sub(flow.info.started_ms),
        from: from.to_string(),
        id: msg.get("id").cloned().unwrap_or(Value::Null),
        method,
        tool,
        decision: verdict.as_ref().map(|v| v.decision.to_string()),
        rule: verdict
            .as_ref()
            .filter(|v| !v.rules.is_empty())
            .map(|v| v.rules.join(", ")),
        message: msg.clone(),
    };
    flow.recording.mcp_message(rec, || metadata_view(msg));
}

/// What `record = "metadata"` keeps of a message: a request with arguments
/// (a tool call, a prompt) becomes its argument names and digest; an answer
/// keeps only its error code; other requests and notifications (a method
/// and a URI or name, no values) are kept. A batch maps each element.
pub fn metadata_view(msg: &Value) -> Value {
    if let Value::Array(a) = msg {
        return Value::Array(a.iter().map(metadata_view).collect());
    }
    if let Some(args) = msg.pointer("/params/arguments") {
        let names: Vec<&String> = args
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        return json!({
            "argument_names": names,
            "arguments_digest": classify::digest(args),
        });
    }
    if msg.get("result").is_some() {
        return Value::Null;
    }
    if let Some(code) = msg.pointer("/error/code") {
        return json!({ "error": { "code": code } });
    }
    msg.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_keeps_no_argument_values_nor_results() {
        let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"message": "secret value", "n": 2}}});
        let v = metadata_view(&call);
        assert!(!v.to_string().contains("secret value"), "{v}");
        assert_eq!(v["argument_names"], json!(["message", "n"]));
        assert_eq!(
            v["arguments_digest"],
            json!(classify::digest(&call["params"]["arguments"]))
        );
        let answer = json!({"jsonrpc": "2.0", "id": 3, "result": {"content": [{"type": "text", "text": "secret value"}]}});
        assert_eq!(metadata_view(&answer), Value::Null);
        let err = json!({"jsonrpc": "2.0", "id": 3, "error": {"code": -32001, "message": "x secret value"}});
        assert_eq!(metadata_view(&err), json!({"error": {"code": -32001}}));
        let list = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/list"});
        assert_eq!(metadata_view(&list), list);
    }
}
