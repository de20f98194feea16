//! `mcp.jsonl`: the JSON-RPC exchange of an MCP session, one message per
//! line as it was relayed (after masking), with the decision taken on it.
//!
//! Owns the line format ([`McpMessageRecord`]), its reader and its replay
//! view. It must not decide or mask: the MCP handler passes what it relayed
//! and, for `record = "metadata"`, the summary that replaces a message.

use std::{
    fs,
    io::{self, Write},
    path::Path,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{read::complete_lines, RecordError, SessionInfo};

/// File name of the MCP message log.
pub const MCP_FILE: &str = "mcp.jsonl";

/// Who sent a recorded message.
pub mod from {
    /// The agent (its requests, notifications and answers to the server).
    pub const AGENT: &str = "agent";
    /// The MCP server (answers, notifications, its requests to the agent).
    pub const SERVER: &str = "server";
    /// Portcullis itself, answering the agent in the server's place (a
    /// refused request's error).
    pub const PORTCULLIS: &str = "portcullis";
}

/// One JSON-RPC message (one line of `mcp.jsonl`). Every field is always
/// written (`null` when it does not apply), so readers need no defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McpMessageRecord {
    /// Milliseconds since the session started.
    pub t_ms: u64,
    /// `agent`, `server` or `portcullis` (see [`from`]).
    pub from: String,
    /// The JSON-RPC id (`null` for notifications).
    pub id: Value,
    /// The JSON-RPC method of a request or notification.
    pub method: Option<String>,
    /// The tool of a `tools/call` (and of its answer).
    pub tool: Option<String>,
    /// `allow`, `approved` (released by a human), `deny`, or `null` for
    /// messages that carry no decision (answers, plumbing, notifications).
    pub decision: Option<String>,
    /// The rules behind the decision, comma-separated.
    pub rule: Option<String>,
    /// The message as relayed, after masking. With `record = "metadata"`,
    /// a call's message is `{"argument_names", "arguments_digest"}` and an
    /// answer's is `null`.
    pub message: Value,
}

/// The messages in an `mcp.jsonl` (a torn final line is skipped).
pub fn read_mcp(path: &Path) -> Result<Vec<McpMessageRecord>, RecordError> {
    let bytes = fs::read(path).map_err(|source| RecordError::Io {
        path: path.to_owned(),
        source,
    })?;
    complete_lines(&bytes)
        .map(|(n, line)| {
            serde_json::from_slice(line).map_err(|e| RecordError::Corrupt {
                path: path.to_owned(),
                reason: format!("line {n}: {e}"),
            })
        })
        .collect()
}

/// The readable form of the exchange, for `portcullis replay`: one line per
/// message (`[+S.mmm s] FROM  METHOD/answer  tool  decision (rules)`), then
/// the message as JSON, indented.
pub(super) fn write_mcp(
    _info: &SessionInfo,
    msgs: &[McpMessageRecord],
    out: &mut dyn Write,
) -> io::Result<()> {
    writeln!(out, "mcp messages ({}):", msgs.len())?;
    for m in msgs {
        let what = match &m.method {
            Some(method) => method.clone(),
            None if m.message.get("error").is_some() => "error".to_owned(),
            None => "answer".to_owned(),
        };
        let mut line = format!(
            "[+{}.{:03}s] {:<10} {what}",
            m.t_ms / 1000,
            m.t_ms % 1000,
            m.from
        );
        if !m.id.is_null() {
            line.push_str(&format!(" #{}", m.id));
        }
        if let Some(t) = &m.tool {
            line.push_str(&format!("  tool {t}"));
        }
        if let Some(d) = &m.decision {
            line.push_str(&format!("  {d}"));
        }
        if let Some(r) = &m.rule {
            line.push_str(&format!(" (rule {r})"));
        }
        writeln!(out, "{line}")?;
        if !m.message.is_null() {
            writeln!(out, "    {}", m.message)?;
        }
    }
    writeln!(out)
}
