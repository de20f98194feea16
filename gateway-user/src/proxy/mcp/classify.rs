//! What an MCP request is, as policy sees it: the action (`mcp:call_tool`,
//! `mcp:read_resource`, `mcp:get_prompt`, `mcp:list`,
//! `mcp:server_request`) and its context (tool, typed arguments, argument
//! names and digest, uri, prompt name, list kind).
//!
//! Owns method → action mapping and argument typing only. It must not
//! decide, forward or audit.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::policy::{McpArgType, Resource};

/// A request that needs a decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decide {
    /// The action, e.g. `mcp:call_tool`.
    pub action: &'static str,
    /// The action's context attributes (merged into the base context).
    pub context: Map<String, Value>,
    /// The request as a human reads it (shown to approvers, audited).
    pub text: String,
    /// The tool, for `mcp:call_tool`.
    pub tool: Option<String>,
    /// `sha256:<hex>` of the canonical arguments, for `mcp:call_tool`.
    pub digest: Option<String>,
}

/// How a request is handled.
#[derive(Debug, Clone, PartialEq)]
pub enum Class {
    /// The session's plumbing (initialize, ping, discovery, logging level):
    /// forwarded without a decision.
    Pass,
    /// A command: decided.
    Decide(Box<Decide>),
    /// A method the proxy does not know: refused (it cannot be decided).
    Unknown,
    /// Parameters that cannot be read unambiguously: refused.
    Invalid(String),
}

/// Most characters of the arguments shown in the command text.
const TEXT_ARGS_MAX: usize = 1024;

/// The digest of arguments: SHA-256 of their canonical form, so equal
/// arguments have one digest however they were written.
pub fn digest(arguments: &Value) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical(arguments).as_bytes()))
    )
}

/// JSON with object keys sorted at every level and no spaces. Explicit:
/// serde_json keeps insertion order when a dependency enables
/// `preserve_order`, so `to_string` alone is not canonical.
pub fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical(&m[k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

fn empty_context() -> Map<String, Value> {
    let mut c = Map::new();
    for k in ["method", "tool", "arguments_digest", "uri", "name", "list"] {
        c.insert(k.into(), json!(""));
    }
    c.insert("arguments".into(), json!({}));
    c.insert("argument_names".into(), json!([]));
    c
}

fn string_param(params: &Map<String, Value>, key: &str) -> Result<String, Class> {
    match params.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Class::Invalid(format!("params.{key} must be a string"))),
        None => Err(Class::Invalid(format!("params.{key} is required"))),
    }
}

/// The context of a server-to-agent request (`mcp:server_request`).
pub fn server_request(method: &str) -> Decide {
    let mut context = empty_context();
    context.insert("method".into(), json!(method));
    Decide {
        action: "mcp:server_request",
        context,
        text: format!("server request {method}"),
        tool: None,
        digest: None,
    }
}

/// The context of a tool call: `tool`, the declared arguments typed,
/// every argument's name, the digest. A declared argument of the wrong
/// type is refused: a rule on it must not be sidestepped by sending `path`
/// as an array.
pub fn call_tool(
    tools: &BTreeMap<String, BTreeMap<String, McpArgType>>,
    name: &str,
    arguments: &Map<String, Value>,
) -> Result<Decide, String> {
    let declared = tools.get(name);
    let mut typed = Map::new();
    if let Some(declared) = declared {
        for (arg, ty) in declared {
            let Some(v) = arguments.get(arg) else {
                continue;
            };
            let ok = match ty {
                McpArgType::String => v.is_string(),
                McpArgType::Long => v.is_i64(),
                McpArgType::Bool => v.is_boolean(),
            };
            if !ok {
                return Err(format!(
                    "argument `{arg}` of tool `{name}` must be a {} (the policy decides on it as one)",
                    ty.cedar()
                ));
            }
            typed.insert(arg.clone(), v.clone());
        }
    }
    let args_value = Value::Object(arguments.clone());
    let digest = digest(&args_value);
    let mut context = empty_context();
    context.insert("method".into(), json!("tools/call"));
    context.insert("tool".into(), json!(name));
    context.insert("arguments".into(), Value::Object(typed));
    context.insert(
        "argument_names".into(),
        Value::Array(arguments.keys().map(|k| json!(k)).collect()),
    );
    context.insert("arguments_digest".into(), json!(digest));
    let mut shown = args_value.to_string();
    if shown.len() > TEXT_ARGS_MAX {
        let mut cut = TEXT_ARGS_MAX;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push('…');
    }
    Ok(Decide {
        action: "mcp:call_tool",
        context,
        text: format!("tools/call {name} {shown}"),
        tool: Some(name.to_string()),
        digest: Some(digest),
    })
}

/// Classifies one agent request.
pub fn request(resource: &Resource, method: &str, params: &Map<String, Value>) -> Class {
    let mut context = empty_context();
    context.insert("method".into(), json!(method));
    let decide = |action: &'static str, context: Map<String, Value>, text: String| {
        Class::Decide(Box::new(Decide {
            action,
            context,
            text,
            tool: None,
            digest: None,
        }))
    };
    match method {
        "initialize" | "ping" | "server/discover" | "logging/setLevel" => Class::Pass,
        "tools/call" => {
            let name = match string_param(params, "name") {
                Ok(n) => n,
                Err(c) => return c,
            };
            let arguments = match params.get("arguments") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(m)) => m.clone(),
                Some(_) => return Class::Invalid("params.arguments must be an object".into()),
            };
            match call_tool(&resource.mcp_tools, &name, &arguments) {
                Ok(d) => Class::Decide(Box::new(d)),
                Err(msg) => Class::Invalid(msg),
            }
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            let uri = match string_param(params, "uri") {
                Ok(u) => u,
                Err(c) => return c,
            };
            context.insert("uri".into(), json!(uri));
            decide("mcp:read_resource", context, format!("{method} {uri}"))
        }
        "prompts/get" => {
            let name = match string_param(params, "name") {
                Ok(n) => n,
                Err(c) => return c,
            };
            context.insert("name".into(), json!(name));
            decide("mcp:get_prompt", context, format!("prompts/get {name}"))
        }
        // Completions reveal a prompt's or a resource template's values:
        // decided as reading that prompt or resource.
        "completion/complete" => {
            let r = params.get("ref").and_then(Value::as_object);
            match (r.and_then(|r| r.get("type")).and_then(Value::as_str), r) {
                (Some("ref/prompt"), Some(r)) => match string_param(r, "name") {
                    Ok(name) => {
                        context.insert("name".into(), json!(name));
                        decide("mcp:get_prompt", context, format!("{method} prompt {name}"))
                    }
                    Err(c) => c,
                },
                (Some("ref/resource"), Some(r)) => match string_param(r, "uri") {
                    Ok(uri) => {
                        context.insert("uri".into(), json!(uri));
                        decide(
                            "mcp:read_resource",
                            context,
                            format!("{method} resource {uri}"),
                        )
                    }
                    Err(c) => c,
                },
                _ => Class::Invalid("params.ref must be a ref/prompt or a ref/resource".into()),
            }
        }
        "tools/list" | "resources/list" | "resources/templates/list" | "prompts/list" => {
            let list = match method {
                "tools/list" => "tools",
                "resources/list" => "resources",
                "resources/templates/list" => "resource_templates",
                _ => "prompts",
            };
            context.insert("list".into(), json!(list));
            decide("mcp:list", context, method.to_string())
        }
        _ => Class::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(tools: &[(&str, &[(&str, McpArgType)])]) -> Resource {
        let dir = std::path::Path::new("/nonexistent");
        let toml = "[resource.m]\nprotocol = \"mcp\"\nmatch = [\"127.0.0.1:1\"]\n";
        let set =
            crate::policy::PolicySet::from_texts(dir, vec![(dir.join("a.toml"), toml.to_string())])
                .expect("valid");
        let mut r = set.resources["m"].as_ref().clone();
        for (t, args) in tools {
            r.mcp_tools.insert(
                t.to_string(),
                args.iter().map(|(a, ty)| (a.to_string(), *ty)).collect(),
            );
        }
        r
    }

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn tool_calls_carry_typed_declared_arguments_names_and_digest() {
        let r = resource(&[("read_note", &[("path", McpArgType::String)])]);
        let c = request(
            &r,
            "tools/call",
            &params(json!({"name":"read_note","arguments":{"path":"public/a","extra":[1]}})),
        );
        let Class::Decide(d) = c else { panic!("{c:?}") };
        assert_eq!(d.action, "mcp:call_tool");
        assert_eq!(d.context["tool"], "read_note");
        assert_eq!(d.context["arguments"], json!({"path":"public/a"}));
        let mut names: Vec<&str> = d.context["argument_names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["extra", "path"]);
        // The digest does not depend on key order or spacing.
        let other = call_tool(
            &r.mcp_tools,
            "read_note",
            &params(serde_json::from_str(r#"{ "extra" : [1], "path":"public/a" }"#).unwrap()),
        )
        .unwrap();
        assert_eq!(d.digest, other.digest);
        assert!(d.digest.as_deref().unwrap().starts_with("sha256:"));
        // A declared argument of another type is refused, not left out.
        let c = request(
            &r,
            "tools/call",
            &params(json!({"name":"read_note","arguments":{"path":["secret/x"]}})),
        );
        assert!(matches!(c, Class::Invalid(_)), "{c:?}");
        // Undeclared tools: no typed arguments, names still there.
        let Class::Decide(d) = request(
            &r,
            "tools/call",
            &params(json!({"name":"other","arguments":{"x":1}})),
        ) else {
            panic!()
        };
        assert_eq!(d.context["arguments"], json!({}));
        assert_eq!(d.context["argument_names"], json!(["x"]));
    }

    #[test]
    fn methods_map_to_actions() {
        let r = resource(&[]);
        let action = |m: &str, p: Value| match request(&r, m, &params(p)) {
            Class::Decide(d) => d.action.to_string(),
            other => format!("{other:?}"),
        };
        assert_eq!(
            action("resources/read", json!({"uri":"a://b"})),
            "mcp:read_resource"
        );
        assert_eq!(action("prompts/get", json!({"name":"p"})), "mcp:get_prompt");
        assert_eq!(action("tools/list", json!({})), "mcp:list");
        assert_eq!(
            action(
                "completion/complete",
                json!({"ref":{"type":"ref/prompt","name":"p"}})
            ),
            "mcp:get_prompt"
        );
        assert_eq!(request(&r, "initialize", &Map::new()), Class::Pass);
        assert_eq!(request(&r, "server/discover", &Map::new()), Class::Pass);
        assert_eq!(request(&r, "tools/frobnicate", &Map::new()), Class::Unknown);
        assert!(matches!(
            request(&r, "tools/call", &params(json!({"name": 3}))),
            Class::Invalid(_)
        ));
        assert!(matches!(
            request(&r, "resources/read", &Map::new()),
            Class::Invalid(_)
        ));
    }
}
