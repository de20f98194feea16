//! The admin protocol: one JSON request per line, one JSON response per line.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What the CLI asks the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Daemon status.
    Status,
    /// Tag a cgroup (by path or by a member process).
    Tag {
        /// Path of the cgroup (absolute under the mount, or relative to it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cgroup: Option<String>,
        /// A process whose cgroup is tagged.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// A container id (or unique prefix) or pod uid, searched in the
        /// governed subtree.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container: Option<String>,
        /// Identity name.
        identity: String,
        /// Token file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_file: Option<PathBuf>,
    },
    /// Remove a tag.
    Untag {
        /// Path of the cgroup.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cgroup: Option<String>,
        /// A process whose cgroup's tag is removed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// A container id (or unique prefix) or pod uid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container: Option<String>,
    },
    /// List tags.
    Tags,
    /// List live flows.
    Flows,
    /// Break-glass: detach programs and remove pins.
    Detach,
    /// Load the policy directory again.
    PolicyReload,
    /// Describe the policy set in force.
    PolicyShow,
    /// List access requests.
    Requests,
    /// Release a held command (and grant its kind for a while).
    Approve {
        /// Request id.
        id: String,
        /// Also grant for this long (e.g. "15m").
        #[serde(default, skip_serializing_if = "Option::is_none")]
        for_duration: Option<String>,
        /// Why.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Reviewer name recorded beside the caller's uid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        as_name: Option<String>,
    },
    /// Refuse a held command.
    Deny {
        /// Request id.
        id: String,
        /// Why.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Reviewer name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        as_name: Option<String>,
    },
    /// Grant an identity actions on a resource for a while.
    Grant {
        /// Identity.
        identity: String,
        /// Resource.
        resource: String,
        /// Actions (`tcp:connect`, `postgres:update`, or a protocol: `postgres`).
        allow: Vec<String>,
        /// Duration (e.g. "2h").
        for_duration: String,
        /// Why.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Reviewer name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        as_name: Option<String>,
    },
    /// List grants in force.
    Grants,
    /// End a live session.
    Kill {
        /// Session id.
        id: String,
    },
    /// Revoke a grant (ends the sessions relying on it).
    Revoke {
        /// Grant id.
        id: String,
        /// Reviewer name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        as_name: Option<String>,
    },
    /// The tool definitions known for an mcp resource.
    McpTools {
        /// Resource name.
        resource: String,
    },
    /// Accept a changed tool definition of an mcp resource.
    McpAccept {
        /// Resource name.
        resource: String,
        /// Tool name.
        tool: String,
        /// Reviewer name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        as_name: Option<String>,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Response {
    /// A success carrying `data`.
    pub fn ok(data: impl Serialize) -> Self {
        match serde_json::to_value(data) {
            Ok(v) => Self {
                ok: true,
                error: None,
                data: Some(v),
            },
            Err(e) => Self::err(format!("encoding response: {e}")),
        }
    }

    /// A failure with a reason.
    pub fn err(reason: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(reason.into()),
            data: None,
        }
    }
}

/// Longest request line the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
