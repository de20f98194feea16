//! The TOML side of the policy format: issuers, identities, resources and
//! masking rules. Strict: unknown keys are errors, and cross-references
//! (an identity's issuer, a mask's resource) must resolve.

use std::{collections::BTreeMap, fmt, path::Path, path::PathBuf, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{matcher::Destination, Diagnostic};

/// Protocols a resource can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP: the connection itself is the command (`tcp:connect`).
    Tcp,
    /// PostgreSQL wire protocol.
    Postgres,
    /// SSH.
    Ssh,
    /// HTTP(S), including the Kubernetes API.
    Http,
    /// MCP (Model Context Protocol) over HTTP: the HTTP handler, decided per
    /// JSON-RPC request.
    Mcp,
}

impl Protocol {
    /// The name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Postgres => "postgres",
            Self::Ssh => "ssh",
            Self::Http => "http",
            Self::Mcp => "mcp",
        }
    }
}

impl Protocol {
    /// Whether the HTTP handler serves it (`http`, and `mcp` on top of it):
    /// TLS modes, held HTTP credentials and `agent_token` apply.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Mcp)
    }
}

/// The Cedar type of an MCP tool argument declared under `tools`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum McpArgType {
    /// A JSON string.
    String,
    /// A JSON integer (64-bit).
    Long,
    /// A JSON boolean.
    Bool,
}

impl McpArgType {
    /// The Cedar type name.
    pub fn cedar(self) -> &'static str {
        match self {
            Self::String => "String",
            Self::Long => "Long",
            Self::Bool => "Bool",
        }
    }
}

impl FromStr for McpArgType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "String" => Ok(Self::String),
            "Long" => Ok(Self::Long),
            "Bool" => Ok(Self::Bool),
            other => Err(format!(
                "argument type {other:?} is not one of String, Long, Bool"
            )),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "postgres" => Ok(Self::Postgres),
            "ssh" => Ok(Self::Ssh),
            "http" => Ok(Self::Http),
            "mcp" => Ok(Self::Mcp),
            other => Err(format!(
                "unknown protocol {other:?}: expected one of tcp, postgres, ssh, http, mcp"
            )),
        }
    }
}

/// How much of a session is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RecordMode {
    /// Nothing beyond the audit log.
    Off,
    /// Commands and decisions, no result data.
    #[default]
    Metadata,
    /// Everything, with masked results.
    Full,
}

/// TLS handling of an HTTP resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Terminate with a leaf from the daemon's CA.
    Intercept,
    /// Decide on SNI alone; decrypt nothing.
    Passthrough,
    /// Plain HTTP.
    None,
}

/// What an http resource does with the agent's own `Authorization` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AgentToken {
    /// Drop it (the daemon's credentials replace it).
    #[default]
    Remove,
    /// Require it to be a valid OIDC token of the flow's identity (same
    /// issuer and subject as the tag proves), then drop it.
    Oidc,
}

/// TLS from the daemon to a PostgreSQL upstream (libpq's `sslmode` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, unauthenticated (libpq's default).
    #[default]
    Prefer,
    /// TLS or fail; the server's certificate is not checked.
    Require,
    /// TLS, the certificate checked against `upstream_ca_file` (or the
    /// system roots) and the upstream's host name or IP.
    VerifyFull,
}

/// PostgreSQL settings of a resource (`[resource.X]` keys `ssl`,
/// `upstream_tls`, `database`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PgOptions {
    /// Agent side: `ssl = "off"` (default) answers SSLRequest with `N`;
    /// `ssl = "on"` answers `S` and terminates TLS with a leaf from the
    /// daemon CA (for the SNI, or the dialed IP). `on` offers TLS, it does
    /// not require it: a plain StartupMessage is still served.
    pub agent_ssl: bool,
    /// Daemon to server.
    pub upstream_tls: UpstreamTls,
    /// The database the daemon logs into; default: the one the agent asked for.
    pub database: Option<String>,
    /// Agent side: `agent_auth = "token"` asks the agent for a password and
    /// requires its OIDC token there (`"none"`, the default: never asks).
    pub agent_token: bool,
}

/// Held credentials (paths only: secrets stay in files the daemon reads).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Upstream user (postgres, ssh).
    pub user: Option<String>,
    /// Password file (postgres).
    pub password_file: Option<PathBuf>,
    /// Private key (ssh).
    pub private_key_file: Option<PathBuf>,
    /// OpenSSH certificate (ssh).
    pub certificate_file: Option<PathBuf>,
    /// Bearer token file (http).
    pub bearer_token_file: Option<PathBuf>,
    /// Basic auth user (http).
    pub basic_user: Option<String>,
    /// Basic auth password file (http).
    pub basic_password_file: Option<PathBuf>,
    /// Client certificate (http).
    pub client_cert_file: Option<PathBuf>,
    /// Client key (http).
    pub client_key_file: Option<PathBuf>,
}

/// A resource as the proxy uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resource {
    /// The resource's name (the TOML table key).
    pub name: String,
    /// Which protocol handler terminates its flows.
    pub protocol: Protocol,
    /// `kubernetes` for a Kubernetes API server, else `generic`.
    pub kind: String,
    /// Original destinations that select this resource.
    #[serde(serialize_with = "display_list")]
    pub matches: Vec<Destination>,
    /// Where the daemon connects; `None` means the flow's original destination.
    #[serde(serialize_with = "display_opt")]
    pub upstream: Option<Destination>,
    /// Recording level.
    pub record: RecordMode,
    /// How long a held command waits for a human.
    #[serde(serialize_with = "secs")]
    pub approval_timeout: Duration,
    /// Held credentials.
    pub credentials: Credentials,
    /// TLS mode (http).
    pub tls: Option<TlsMode>,
    /// The agent's own Authorization header (http): removed, or validated
    /// as its OIDC token first.
    pub agent_token: AgentToken,
    /// CA for verifying the upstream (http, postgres).
    pub upstream_ca_file: Option<PathBuf>,
    /// Known hosts (ssh).
    pub known_hosts: Option<PathBuf>,
    /// Host CA (ssh).
    pub host_ca: Option<PathBuf>,
    /// PostgreSQL settings (defaults for other protocols).
    pub postgres: PgOptions,
    /// The host key agents see for this resource (ssh; default: the
    /// daemon's `<state>/ssh/host_ed25519`).
    pub host_key_file: Option<PathBuf>,
    /// An OpenSSH host certificate for that key, signed by a CA agents
    /// trust with `@cert-authority` (ssh).
    pub host_certificate_file: Option<PathBuf>,
    /// mcp: typed arguments per declared tool (`tools = { t = { a = "String" } }`);
    /// each becomes an optional attribute of `context.arguments`.
    pub mcp_tools: BTreeMap<String, BTreeMap<String, McpArgType>>,
}

fn display_list<S: serde::Serializer>(v: &[Destination], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|d| d.to_string()))
}
fn display_opt<S: serde::Serializer>(v: &Option<Destination>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(d) => s.serialize_some(&d.to_string()),
        None => s.serialize_none(),
    }
}
fn secs<S: serde::Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(v.as_secs())
}

/// An OIDC issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Issuer {
    /// TOML key.
    pub name: String,
    /// Expected `iss` claim.
    pub url: String,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    /// JWKS from a file.
    pub jwks_file: Option<PathBuf>,
    /// JWKS from an HTTPS URL.
    pub jwks_url: Option<String>,
    /// CA bundle for `jwks_url` (default: system roots).
    pub ca_file: Option<PathBuf>,
    /// The claim that must equal an identity's subject (default `sub`).
    pub subject_claim: String,
}

/// A named principal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// TOML key: the name tags and rules use.
    pub name: String,
    /// Issuer name.
    pub issuer: String,
    /// Required subject claim value.
    pub subject: String,
}

/// Masking rules for one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MaskRule {
    /// Resource name.
    pub resource: String,
    /// Column names (`col` or `table.col`).
    pub columns: Vec<String>,
    /// JSON key paths (http).
    pub json_paths: Vec<String>,
    /// Value detectors.
    pub detectors: Vec<String>,
    /// `redact`, `partial` or `hash`.
    pub style: String,
    /// ssh: what happens to output that is not text (`pass`: relayed
    /// intact, unmasked; `refuse`: the command is refused or stopped).
    pub binary: String,
}

/// Value detectors masking knows.
pub const DETECTORS: &[&str] = &[
    "credit_card",
    "email",
    "iban",
    "aws_access_key",
    "jwt",
    "private_key",
    "us_ssn",
    "phone",
];

/// Everything the TOML files of a set define.
#[derive(Debug, Default)]
pub struct Config {
    /// Issuers by name.
    pub issuers: BTreeMap<String, Issuer>,
    /// Identities by name.
    pub identities: BTreeMap<String, Identity>,
    /// Resources by name.
    pub resources: BTreeMap<String, Resource>,
    /// Masking rules.
    pub masks: Vec<MaskRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    #[serde(default)]
    issuer: BTreeMap<Spanned<String>, Spanned<IssuerToml>>,
    #[serde(default)]
    identity: BTreeMap<Spanned<String>, Spanned<IdentityToml>>,
    #[serde(default)]
    resource: BTreeMap<Spanned<String>, Spanned<ResourceToml>>,
    #[serde(default)]
    mask: Vec<Spanned<MaskToml>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuerToml {
    url: Spanned<String>,
    audience: Spanned<OneOrMany>,
    jwks_file: Option<PathBuf>,
    jwks_url: Option<Spanned<String>>,
    ca_file: Option<PathBuf>,
    subject_claim: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityToml {
    issuer: Spanned<String>,
    subject: Spanned<String>,
    #[allow(dead_code)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceToml {
    protocol: Spanned<String>,
    #[serde(rename = "match")]
    matches: Spanned<Vec<Spanned<String>>>,
    upstream: Option<Spanned<String>>,
    #[allow(dead_code)]
    description: Option<String>,
    kind: Option<Spanned<String>>,
    record: Option<Spanned<String>>,
    approval_timeout: Option<Spanned<String>>,
    credentials: Option<Spanned<Credentials>>,
    tls: Option<Spanned<String>>,
    agent_token: Option<Spanned<String>>,
    upstream_ca_file: Option<PathBuf>,
    known_hosts: Option<PathBuf>,
    host_ca: Option<PathBuf>,
    /// postgres: agent-side TLS (`off`).
    ssl: Option<Spanned<String>>,
    /// postgres: `disable | prefer | require | verify-full`.
    upstream_tls: Option<Spanned<String>>,
    /// postgres: the upstream database.
    database: Option<Spanned<String>>,
    /// postgres: `none | token` (the agent's password must be its token).
    agent_auth: Option<Spanned<String>>,
    host_key_file: Option<PathBuf>,
    host_certificate_file: Option<PathBuf>,
    /// mcp: typed tool arguments.
    tools: Option<Spanned<ToolsToml>>,
}

/// `tools = { TOOL = { ARG = "TYPE" } }`, with spans for errors.
type ToolsToml = BTreeMap<String, BTreeMap<Spanned<String>, Spanned<String>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaskToml {
    resource: Spanned<String>,
    #[serde(default)]
    columns: Vec<String>,
    #[serde(default)]
    json_paths: Vec<String>,
    #[serde(default)]
    detectors: Vec<Spanned<String>>,
    style: Option<Spanned<String>>,
    binary: Option<Spanned<String>>,
}

/// Where each named thing was defined, for cross-reference errors.
#[derive(Default)]
pub(super) struct Spans {
    issuer_refs: Vec<(PathBuf, String, usize, String)>,
    mask_refs: Vec<(PathBuf, String, usize, String)>,
    /// MCP argument declarations: file, text, offset, name, type.
    mcp_args: Vec<(PathBuf, String, usize, String, McpArgType)>,
}

/// Parses one TOML file into `config`, pushing every problem into `diags`.
pub(super) fn parse_file(
    file: &Path,
    text: &str,
    config: &mut Config,
    spans: &mut Spans,
    diags: &mut Vec<Diagnostic>,
) {
    let parsed: FileToml = match toml::from_str(text) {
        Ok(p) => p,
        Err(e) => {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            diags.push(Diagnostic::at(
                file,
                text,
                offset,
                e.message().trim().to_string(),
            ));
            return;
        }
    };
    let at = |offset: usize, msg: String| Diagnostic::at(file, text, offset, msg);
    // Relative paths in a policy file are relative to its directory, so a
    // policy directory (or a ConfigMap) can carry its own JWKS and CA files.
    let base = file.parent().unwrap_or(Path::new("."));
    let rel = |p: Option<PathBuf>| p.map(|p| if p.is_relative() { base.join(p) } else { p });

    for (name, iss) in parsed.issuer {
        let start = name.span().start;
        let iss = iss.into_inner();
        let name = name.into_inner();
        if !valid_name(&name) {
            diags.push(at(start, format!("issuer name {name:?} is invalid")));
        }
        let audiences = match iss.audience.get_ref() {
            OneOrMany::One(a) => vec![a.clone()],
            OneOrMany::Many(v) => v.clone(),
        };
        if audiences.is_empty() || audiences.iter().any(String::is_empty) {
            diags.push(at(
                iss.audience.span().start,
                "`audience` must name at least one non-empty audience".into(),
            ));
        }
        if iss.url.get_ref().is_empty() {
            diags.push(at(
                iss.url.span().start,
                "`url` (the expected iss claim) must not be empty".into(),
            ));
        }
        match (&iss.jwks_file, &iss.jwks_url) {
            (Some(_), Some(u)) => diags.push(at(
                u.span().start,
                "give either `jwks_file` or `jwks_url`, not both".into(),
            )),
            (None, None) => diags.push(at(
                start,
                format!("issuer `{name}` needs `jwks_file` or `jwks_url`"),
            )),
            (None, Some(u)) if !u.get_ref().starts_with("https://") => diags.push(at(
                u.span().start,
                "`jwks_url` must be an https:// URL".into(),
            )),
            _ => {}
        }
        if config.issuers.contains_key(&name) {
            diags.push(at(start, format!("issuer `{name}` is defined twice")));
            continue;
        }
        config.issuers.insert(
            name.clone(),
            Issuer {
                name,
                url: iss.url.into_inner(),
                audiences,
                jwks_file: rel(iss.jwks_file),
                jwks_url: iss.jwks_url.map(Spanned::into_inner),
                ca_file: rel(iss.ca_file),
                subject_claim: iss.subject_claim.unwrap_or_else(|| "sub".into()),
            },
        );
    }

    for (name, id) in parsed.identity {
        let start = name.span().start;
        let id = id.into_inner();
        let name = name.into_inner();
        if !valid_name(&name) {
            diags.push(at(
                start,
                format!("identity name {name:?} is invalid: use letters, digits, '-', '_', '.'"),
            ));
        }
        if id.subject.get_ref().is_empty() {
            diags.push(at(
                id.subject.span().start,
                "`subject` must not be empty".into(),
            ));
        }
        spans.issuer_refs.push((
            file.to_path_buf(),
            text.to_string(),
            id.issuer.span().start,
            id.issuer.get_ref().clone(),
        ));
        if config.identities.contains_key(&name) {
            diags.push(at(start, format!("identity `{name}` is defined twice")));
            continue;
        }
        config.identities.insert(
            name.clone(),
            Identity {
                name,
                issuer: id.issuer.into_inner(),
                subject: id.subject.into_inner(),
            },
        );
    }

    for (name, res) in parsed.resource {
        let before = diags.len();
        let start = name.span().start;
        let name = name.into_inner();
        let res = res.into_inner();
        if !valid_name(&name) {
            diags.push(at(
                start,
                format!("resource name {name:?} is invalid: use letters, digits, '-', '_', '.'"),
            ));
        }
        let protocol = match res.protocol.get_ref().parse::<Protocol>() {
            Ok(p) => Some(p),
            Err(msg) => {
                diags.push(at(res.protocol.span().start, msg));
                None
            }
        };
        let mut matches = Vec::new();
        if res.matches.get_ref().is_empty() {
            diags.push(at(
                res.matches.span().start,
                "`match` needs at least one destination".into(),
            ));
        }
        for m in res.matches.get_ref() {
            match m.get_ref().parse::<Destination>() {
                Ok(d) => matches.push(d),
                Err(msg) => diags.push(at(m.span().start, msg)),
            }
        }
        let upstream =
            res.upstream
                .as_ref()
                .and_then(|u| match u.get_ref().parse::<Destination>() {
                    Ok(d) => Some(d),
                    Err(msg) => {
                        diags.push(at(u.span().start, msg));
                        None
                    }
                });
        let record = match res
            .record
            .as_ref()
            .map(|r| (r.span().start, r.get_ref().as_str()))
        {
            None => RecordMode::default(),
            Some((_, "off")) => RecordMode::Off,
            Some((_, "metadata")) => RecordMode::Metadata,
            Some((_, "full")) => RecordMode::Full,
            Some((o, other)) => {
                diags.push(at(
                    o,
                    format!("record {other:?} is not one of off, metadata, full"),
                ));
                RecordMode::default()
            }
        };
        let approval_timeout = match &res.approval_timeout {
            None => Duration::from_secs(300),
            Some(t) => match parse_duration(t.get_ref()) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    diags.push(at(
                        t.span().start,
                        "approval_timeout must be positive".into(),
                    ));
                    Duration::from_secs(300)
                }
                Err(msg) => {
                    diags.push(at(t.span().start, msg));
                    Duration::from_secs(300)
                }
            },
        };
        let kind = match res
            .kind
            .as_ref()
            .map(|k| (k.span().start, k.get_ref().as_str()))
        {
            None => "generic".to_string(),
            Some((_, "kubernetes")) if protocol == Some(Protocol::Http) => "kubernetes".into(),
            Some((o, k)) => {
                diags.push(at(
                    o,
                    format!("kind {k:?} is only valid as \"kubernetes\" on an http resource"),
                ));
                "generic".into()
            }
        };
        let tls = match res
            .tls
            .as_ref()
            .map(|t| (t.span().start, t.get_ref().as_str()))
        {
            None => None,
            Some((o, t)) if !protocol.is_some_and(Protocol::is_http) => {
                diags.push(at(
                    o,
                    format!(
                        "tls {t:?}: `tls` applies to http resources only (mcp resources are http)"
                    ),
                ));
                None
            }
            Some((_, "intercept")) => Some(TlsMode::Intercept),
            Some((_, "passthrough")) => Some(TlsMode::Passthrough),
            Some((_, "none")) => Some(TlsMode::None),
            Some((o, t)) => {
                diags.push(at(
                    o,
                    format!("tls {t:?} is not one of intercept, passthrough, none"),
                ));
                None
            }
        };
        let credentials = match &res.credentials {
            None => Credentials::default(),
            Some(c) => {
                if let Some(p) = protocol {
                    if let Err(msg) = check_credentials(p, c.get_ref()) {
                        diags.push(at(c.span().start, msg));
                    }
                }
                let c = c.get_ref().clone();
                Credentials {
                    password_file: rel(c.password_file),
                    private_key_file: rel(c.private_key_file),
                    certificate_file: rel(c.certificate_file),
                    bearer_token_file: rel(c.bearer_token_file),
                    basic_password_file: rel(c.basic_password_file),
                    client_cert_file: rel(c.client_cert_file),
                    client_key_file: rel(c.client_key_file),
                    ..c
                }
            }
        };
        let agent_token = match res
            .agent_token
            .as_ref()
            .map(|t| (t.span().start, t.get_ref().as_str()))
        {
            None => AgentToken::Remove,
            Some((o, t)) if !protocol.is_some_and(Protocol::is_http) => {
                diags.push(at(
                    o,
                    format!("agent_token {t:?}: `agent_token` applies to http resources only (mcp resources are http)"),
                ));
                AgentToken::Remove
            }
            Some((o, _)) if tls == Some(TlsMode::Passthrough) => {
                diags.push(at(
                    o,
                    "agent_token needs the requests: not with tls \"passthrough\"".into(),
                ));
                AgentToken::Remove
            }
            Some((_, "remove")) => AgentToken::Remove,
            Some((_, "oidc")) => AgentToken::Oidc,
            Some((o, t)) => {
                diags.push(at(
                    o,
                    format!("agent_token {t:?} is not one of remove, oidc"),
                ));
                AgentToken::Remove
            }
        };
        // Passthrough sees only the SNI: nothing can be injected into, or
        // classified inside, the encrypted stream.
        if let (Some(TlsMode::Passthrough), Some(t)) = (tls, &res.tls) {
            if res.credentials.is_some() {
                diags.push(at(
                    t.span().start,
                    "tls \"passthrough\" cannot inject credentials: use \"intercept\"".into(),
                ));
            }
            if protocol == Some(Protocol::Mcp) {
                diags.push(at(
                    t.span().start,
                    "an mcp resource is decided per JSON-RPC request: use tls \"intercept\" or \"none\""
                        .into(),
                ));
            }
            if kind == "kubernetes" {
                diags.push(at(
                    t.span().start,
                    "kind \"kubernetes\" needs the requests: use tls \"intercept\" or \"none\""
                        .into(),
                ));
            }
        }
        let mut mcp_tools = BTreeMap::new();
        if let Some(tools) = &res.tools {
            if protocol.is_some() && protocol != Some(Protocol::Mcp) {
                diags.push(at(
                    tools.span().start,
                    "`tools` applies to mcp resources only".into(),
                ));
            }
            for (tool, args) in tools.get_ref() {
                let mut typed = BTreeMap::new();
                for (arg, ty) in args {
                    if !valid_argument_name(arg.get_ref()) {
                        diags.push(at(
                            arg.span().start,
                            format!("argument name {:?} is invalid: use letters, digits and '_', not starting with a digit", arg.get_ref()),
                        ));
                        continue;
                    }
                    match ty.get_ref().parse::<McpArgType>() {
                        Ok(t) => {
                            spans.mcp_args.push((
                                file.to_path_buf(),
                                text.to_string(),
                                ty.span().start,
                                arg.get_ref().clone(),
                                t,
                            ));
                            typed.insert(arg.get_ref().clone(), t);
                        }
                        Err(msg) => diags.push(at(ty.span().start, msg)),
                    }
                }
                mcp_tools.insert(tool.clone(), typed);
            }
        }
        if protocol != Some(Protocol::Ssh)
            && (res.known_hosts.is_some()
                || res.host_ca.is_some()
                || res.host_key_file.is_some()
                || res.host_certificate_file.is_some())
        {
            diags.push(at(
                start,
                "`known_hosts`, `host_ca`, `host_key_file` and `host_certificate_file` apply to ssh resources only".into(),
            ));
        }
        let mut postgres = PgOptions::default();
        let pg_only = [
            ("ssl", res.ssl.as_ref()),
            ("upstream_tls", res.upstream_tls.as_ref()),
            ("database", res.database.as_ref()),
            ("agent_auth", res.agent_auth.as_ref()),
        ];
        for (key, v) in pg_only {
            if let Some(v) = v {
                if protocol.is_some() && protocol != Some(Protocol::Postgres) {
                    diags.push(at(
                        v.span().start,
                        format!("`{key}` applies to postgres resources only"),
                    ));
                }
            }
        }
        if let Some(v) = &res.ssl {
            match v.get_ref().as_str() {
                "off" => postgres.agent_ssl = false,
                "on" => postgres.agent_ssl = true,
                other => diags.push(at(
                    v.span().start,
                    format!("ssl {other:?} is not one of off, on"),
                )),
            }
        }
        if let Some(v) = &res.upstream_tls {
            postgres.upstream_tls = match v.get_ref().as_str() {
                "disable" => UpstreamTls::Disable,
                "prefer" => UpstreamTls::Prefer,
                "require" => UpstreamTls::Require,
                "verify-full" => UpstreamTls::VerifyFull,
                other => {
                    diags.push(at(
                        v.span().start,
                        format!(
                            "upstream_tls {other:?} is not one of disable, prefer, require, verify-full"
                        ),
                    ));
                    UpstreamTls::default()
                }
            };
        }
        if let Some(v) = &res.agent_auth {
            match v.get_ref().as_str() {
                "none" => postgres.agent_token = false,
                "token" => postgres.agent_token = true,
                other => diags.push(at(
                    v.span().start,
                    format!("agent_auth {other:?} is not one of none, token"),
                )),
            }
        }
        if let Some(v) = &res.database {
            if v.get_ref().is_empty() || v.get_ref().contains('\0') {
                diags.push(at(
                    v.span().start,
                    "`database` must be a non-empty name".into(),
                ));
            }
            postgres.database = Some(v.get_ref().clone());
        }
        if protocol == Some(Protocol::Ssh) {
            // Strict by default: the daemon never logs in to a host whose
            // key it cannot check, and it logs in only with a held key.
            if res.known_hosts.is_none() && res.host_ca.is_none() {
                diags.push(at(
                    start,
                    format!("ssh resource `{name}` needs `known_hosts` or `host_ca` to verify the upstream host key"),
                ));
            }
            if credentials.private_key_file.is_none() {
                diags.push(at(
                    res.credentials.as_ref().map_or(start, |c| c.span().start),
                    format!("ssh resource `{name}` needs `credentials.private_key_file` (the key the daemon logs in with)"),
                ));
            }
        }
        if config.resources.contains_key(&name) {
            diags.push(at(start, format!("resource `{name}` is defined twice")));
            continue;
        }
        if diags.len() == before {
            if let Some(protocol) = protocol {
                config.resources.insert(
                    name.clone(),
                    Resource {
                        name,
                        protocol,
                        kind,
                        matches,
                        upstream,
                        record,
                        approval_timeout,
                        credentials,
                        tls,
                        agent_token,
                        upstream_ca_file: rel(res.upstream_ca_file),
                        known_hosts: rel(res.known_hosts),
                        host_ca: rel(res.host_ca),
                        postgres,
                        host_key_file: rel(res.host_key_file),
                        host_certificate_file: rel(res.host_certificate_file),
                        mcp_tools,
                    },
                );
            }
        }
    }

    for m in parsed.mask {
        let start = m.span().start;
        let m = m.into_inner();
        for d in &m.detectors {
            if let Err(e) = crate::mask::validate_detector(d.get_ref()) {
                diags.push(at(d.span().start, e.to_string()));
            }
        }
        let style = match m
            .style
            .as_ref()
            .map(|s| (s.span().start, s.get_ref().as_str()))
        {
            None => "redact".to_string(),
            Some((_, s @ ("redact" | "partial" | "hash"))) => s.to_string(),
            Some((o, s)) => {
                diags.push(at(
                    o,
                    format!("style {s:?} is not one of redact, partial, hash"),
                ));
                "redact".into()
            }
        };
        let binary = match m.binary.as_ref() {
            None => "pass".to_string(),
            Some(b) if matches!(b.get_ref().as_str(), "pass" | "refuse") => b.get_ref().clone(),
            Some(b) => {
                diags.push(at(
                    b.span().start,
                    format!("binary {:?} is not one of pass, refuse", b.get_ref()),
                ));
                "pass".into()
            }
        };
        if m.columns.is_empty() && m.detectors.is_empty() && m.json_paths.is_empty() {
            diags.push(at(
                start,
                "a [[mask]] needs columns, json_paths or detectors".into(),
            ));
        }
        spans.mask_refs.push((
            file.to_path_buf(),
            text.to_string(),
            m.resource.span().start,
            m.resource.get_ref().clone(),
        ));
        config.masks.push(MaskRule {
            resource: m.resource.into_inner(),
            columns: m.columns,
            json_paths: m.json_paths,
            detectors: m.detectors.into_iter().map(Spanned::into_inner).collect(),
            style,
            binary,
        });
    }
}

/// The MCP arguments declared across every mcp resource, with their one
/// type: `context.arguments` is one Cedar record type, so an argument name
/// declared with two types is an error (at the second declaration).
pub(super) fn mcp_arguments(
    spans: &Spans,
    diags: &mut Vec<Diagnostic>,
) -> BTreeMap<String, McpArgType> {
    let mut out: BTreeMap<String, McpArgType> = BTreeMap::new();
    for (file, text, offset, name, ty) in &spans.mcp_args {
        match out.get(name) {
            Some(prev) if prev != ty => diags.push(Diagnostic::at(
                file,
                text,
                *offset,
                format!(
                    "argument `{name}` is declared {} elsewhere: context.arguments.{name} has one type across all mcp resources",
                    prev.cedar()
                ),
            )),
            Some(_) => {}
            None => {
                out.insert(name.clone(), *ty);
            }
        }
    }
    out
}

/// Checks references between files once all are parsed.
pub(super) fn cross_check(config: &Config, spans: &Spans, diags: &mut Vec<Diagnostic>) {
    for (file, text, offset, issuer) in &spans.issuer_refs {
        if !config.issuers.contains_key(issuer) {
            diags.push(Diagnostic::at(
                file,
                text,
                *offset,
                format!("issuer `{issuer}` is not defined"),
            ));
        }
    }
    for (file, text, offset, resource) in &spans.mask_refs {
        if !config.resources.contains_key(resource) {
            diags.push(Diagnostic::at(
                file,
                text,
                *offset,
                format!("resource `{resource}` is not defined"),
            ));
        }
    }
}

fn check_credentials(protocol: Protocol, c: &Credentials) -> Result<(), String> {
    let has = |o: bool, k: &str, v: &mut Vec<String>| {
        if o {
            v.push(k.to_string())
        }
    };
    let mut present = Vec::new();
    has(c.user.is_some(), "user", &mut present);
    has(c.password_file.is_some(), "password_file", &mut present);
    has(
        c.private_key_file.is_some(),
        "private_key_file",
        &mut present,
    );
    has(
        c.certificate_file.is_some(),
        "certificate_file",
        &mut present,
    );
    has(
        c.bearer_token_file.is_some(),
        "bearer_token_file",
        &mut present,
    );
    has(c.basic_user.is_some(), "basic_user", &mut present);
    has(
        c.basic_password_file.is_some(),
        "basic_password_file",
        &mut present,
    );
    has(
        c.client_cert_file.is_some(),
        "client_cert_file",
        &mut present,
    );
    has(c.client_key_file.is_some(), "client_key_file", &mut present);
    let allowed: &[&str] = match protocol {
        Protocol::Tcp => &[],
        Protocol::Postgres => &["user", "password_file"],
        Protocol::Ssh => &["user", "private_key_file", "certificate_file"],
        Protocol::Http | Protocol::Mcp => &[
            "bearer_token_file",
            "basic_user",
            "basic_password_file",
            "client_cert_file",
            "client_key_file",
        ],
    };
    let wrong: Vec<&String> = present
        .iter()
        .filter(|k| !allowed.contains(&k.as_str()))
        .collect();
    if !wrong.is_empty() {
        let keys: Vec<&str> = wrong.iter().map(|s| s.as_str()).collect();
        return Err(format!(
            "credentials {} do not apply to {protocol} resources (allowed: {})",
            keys.join(", "),
            if allowed.is_empty() {
                "none".to_string()
            } else {
                allowed.join(", ")
            }
        ));
    }
    if c.basic_user.is_some() != c.basic_password_file.is_some() {
        return Err("basic_user and basic_password_file go together".into());
    }
    if c.client_cert_file.is_some() != c.client_key_file.is_some() {
        return Err("client_cert_file and client_key_file go together".into());
    }
    if protocol == Protocol::Ssh && c.certificate_file.is_some() && c.private_key_file.is_none() {
        return Err("certificate_file needs private_key_file".into());
    }
    Ok(())
}

/// Parses durations like `30s`, `5m`, `1h30m`, `2d`, `250ms`.
///
/// ```
/// use std::time::Duration;
/// use portcullis::policy::parse_duration;
/// assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
/// assert!(parse_duration("soon").is_err());
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration {s:?}: use e.g. 30s, 5m, 1h30m, 2d");
    let s = s.trim();
    if s.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(err)?),
            "d" => Duration::from_secs(n.checked_mul(86400).ok_or_else(err)?),
            _ => return Err(err()),
        };
        total = total.checked_add(d).ok_or_else(err)?;
    }
    Ok(total)
}

/// A Cedar identifier, so `context.arguments.NAME` can be written.
fn valid_argument_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !matches!(
            name,
            "true" | "false" | "if" | "then" | "else" | "in" | "like" | "has" | "is" | "__cedar"
        )
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
