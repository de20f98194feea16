//! JSON-RPC 2.0 as MCP uses it: what one message is (request,
//! notification, response), read strictly, and the answers the proxy itself
//! gives (errors, a refused tool call).
//!
//! Owns message shapes only; it must not decide or forward anything.

use serde_json::{json, Map, Value};

/// Parse error: the body is not JSON (or over the cap).
pub const PARSE_ERROR: i64 = -32700;
/// Invalid request: JSON, but not a JSON-RPC message.
pub const INVALID_REQUEST: i64 = -32600;
/// A method the proxy does not know, so cannot decide.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// Parameters the proxy cannot read the way the server would.
pub const INVALID_PARAMS: i64 = -32602;
/// Refused by policy (a server-defined code).
pub const DENIED: i64 = -32001;

/// What one JSON-RPC message is.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A request: answered by a response with the same id.
    Request {
        /// The id (a string or an integer).
        id: Value,
        /// The method.
        method: String,
    },
    /// A notification: no id, no answer.
    Notification {
        /// The method.
        method: String,
    },
    /// A response (result or error) to a request of the peer.
    Response {
        /// The id it answers.
        id: Value,
    },
}

/// Why a message is not a JSON-RPC 2.0 message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ShapeError {
    /// The id, when one could be read (the error answers it).
    pub id: Value,
    /// What is wrong.
    pub message: String,
}

fn valid_id(id: &Value) -> bool {
    match id {
        Value::String(_) => true,
        // Integers only: a fractional id is read differently by different
        // JSON libraries (1.0 vs 1).
        Value::Number(n) => n.is_i64() || n.is_u64(),
        _ => false,
    }
}

/// Reads one message strictly: `jsonrpc` is exactly "2.0"; a request has a
/// string method and a string or integer id; `params`, when present, is an
/// object (MCP uses no positional params); a response has an id and exactly
/// one of `result` and `error`.
pub fn kind(v: &Value) -> Result<Kind, ShapeError> {
    let err = |id: Value, message: &str| ShapeError {
        id,
        message: message.to_string(),
    };
    let Value::Object(m) = v else {
        return Err(err(Value::Null, "a JSON-RPC message must be an object"));
    };
    let id = m.get("id").cloned();
    let shown_id = id.clone().filter(valid_id).unwrap_or(Value::Null);
    if m.get("jsonrpc") != Some(&json!("2.0")) {
        return Err(err(shown_id, "\"jsonrpc\" must be \"2.0\""));
    }
    if let Some(method) = m.get("method") {
        let Value::String(method) = method else {
            return Err(err(shown_id, "\"method\" must be a string"));
        };
        if m.contains_key("result") || m.contains_key("error") {
            return Err(err(shown_id, "a request cannot carry a result or an error"));
        }
        if let Some(p) = m.get("params") {
            if !p.is_object() {
                return Err(err(shown_id, "\"params\" must be an object"));
            }
        }
        return match id {
            None => Ok(Kind::Notification {
                method: method.clone(),
            }),
            Some(id) if valid_id(&id) => Ok(Kind::Request {
                id,
                method: method.clone(),
            }),
            Some(_) => Err(err(Value::Null, "\"id\" must be a string or an integer")),
        };
    }
    match id {
        Some(id) if valid_id(&id) => {
            if m.contains_key("result") == m.contains_key("error") {
                return Err(err(id, "a response has exactly one of result and error"));
            }
            Ok(Kind::Response { id })
        }
        _ => Err(err(
            shown_id,
            "not a request, notification or response (no method, no valid id)",
        )),
    }
}

/// The params object of a request (empty when absent).
pub fn params(v: &Value) -> Map<String, Value> {
    v.get("params")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// An error response.
pub fn error(id: &Value, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut e = json!({ "code": code, "message": message });
    if let (Some(d), Some(o)) = (data, e.as_object_mut()) {
        o.insert("data".into(), d);
    }
    json!({ "jsonrpc": "2.0", "id": id, "error": e })
}

/// A `CallToolResult` with `isError: true`: how a refused tool call is
/// told to the agent (the model reads the text and can adapt).
/// `modern`: the 2026-07-28 revision, whose results carry `resultType`.
pub fn tool_error(id: &Value, text: &str, modern: bool) -> Value {
    let mut result = json!({
        "content": [{ "type": "text", "text": text }],
        "isError": true,
    });
    if modern {
        if let Some(o) = result.as_object_mut() {
            o.insert("resultType".into(), json!("complete"));
        }
    }
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_read_strictly() {
        let r = kind(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}})).unwrap();
        assert_eq!(
            r,
            Kind::Request {
                id: json!(1),
                method: "tools/call".into()
            }
        );
        assert!(matches!(
            kind(&json!({"jsonrpc":"2.0","method":"notifications/initialized"})),
            Ok(Kind::Notification { .. })
        ));
        assert!(matches!(
            kind(&json!({"jsonrpc":"2.0","id":"a","result":{}})),
            Ok(Kind::Response { .. })
        ));
        // Wrong version, fractional or null id, positional params, both
        // result and error, a method that is not a string.
        for bad in [
            json!({"jsonrpc":"1.0","id":1,"method":"x"}),
            json!({"id":1,"method":"x"}),
            json!({"jsonrpc":"2.0","id":1.5,"method":"x"}),
            json!({"jsonrpc":"2.0","id":null,"method":"x"}),
            json!({"jsonrpc":"2.0","id":1,"method":"x","params":[1]}),
            json!({"jsonrpc":"2.0","id":1,"result":{},"error":{}}),
            json!({"jsonrpc":"2.0","id":1,"method":7}),
            json!({"jsonrpc":"2.0"}),
            json!([1]),
        ] {
            assert!(kind(&bad).is_err(), "{bad} accepted");
        }
        let e = kind(&json!({"jsonrpc":"1.0","id":7,"method":"x"})).unwrap_err();
        assert_eq!(e.id, json!(7));
    }

    #[test]
    fn refusals_have_the_shapes_clients_expect() {
        let t = tool_error(&json!(3), "no", true);
        assert_eq!(t["result"]["isError"], true);
        assert_eq!(t["result"]["resultType"], "complete");
        assert_eq!(t["result"]["content"][0]["text"], "no");
        let t = tool_error(&json!(3), "no", false);
        assert!(t["result"].get("resultType").is_none());
        let e = error(&json!("x"), DENIED, "denied", Some(json!({"rule":"r"})));
        assert_eq!(e["error"]["code"], DENIED);
        assert_eq!(e["error"]["data"]["rule"], "r");
        assert_eq!(e["id"], "x");
    }
}
