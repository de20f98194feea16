//! The TOML side of the policy format. Strict: unknown keys are errors.

use std::{collections::BTreeMap, fmt, path::Path, str::FromStr};

use serde::Deserialize;
use toml::Spanned;

use super::{matcher::Destination, Diagnostic, Resource};

/// Protocols a resource can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
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
}

impl Protocol {
    /// Protocols this build has a handler for.
    pub const SUPPORTED: &'static [Protocol] = &[Protocol::Tcp];

    /// The name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Postgres => "postgres",
            Self::Ssh => "ssh",
            Self::Http => "http",
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
            other => Err(format!(
                "unknown protocol {other:?}: expected one of tcp, postgres, ssh, http"
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    #[serde(default)]
    resource: BTreeMap<Spanned<String>, Spanned<ResourceToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceToml {
    protocol: Spanned<String>,
    #[serde(rename = "match")]
    matches: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    upstream: Option<Spanned<String>>,
    /// Free text for operators; not used by the daemon.
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
}

/// Parses one TOML policy file, pushing every problem into `diags` and
/// returning the resources that were valid.
pub(super) fn parse_file(file: &Path, text: &str, diags: &mut Vec<Diagnostic>) -> Vec<Resource> {
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
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (name, res) in parsed.resource {
        let before = diags.len();
        let at =
            |span: std::ops::Range<usize>, msg: String| Diagnostic::at(file, text, span.start, msg);
        if !valid_name(name.get_ref()) {
            diags.push(at(
                name.span(),
                format!(
                    "resource name {:?} is invalid: use letters, digits, '-', '_', '.'",
                    name.get_ref()
                ),
            ));
        }
        let res_span = res.span();
        let res = res.into_inner();
        let protocol = match res.protocol.get_ref().parse::<Protocol>() {
            Ok(p) if Protocol::SUPPORTED.contains(&p) => Some(p),
            Ok(p) => {
                diags.push(at(
                    res.protocol.span(),
                    format!("protocol \"{p}\" is not supported by this build yet (supported: tcp)"),
                ));
                None
            }
            Err(msg) => {
                diags.push(at(res.protocol.span(), msg));
                None
            }
        };
        let mut matches = Vec::new();
        if res.matches.get_ref().is_empty() {
            diags.push(at(
                res.matches.span(),
                "`match` needs at least one destination".into(),
            ));
        }
        for m in res.matches.get_ref() {
            match m.get_ref().parse::<Destination>() {
                Ok(d) => matches.push(d),
                Err(msg) => diags.push(at(m.span(), msg)),
            }
        }
        let upstream = match &res.upstream {
            None => None,
            Some(u) => match u.get_ref().parse::<Destination>() {
                Ok(d) => Some(d),
                Err(msg) => {
                    diags.push(at(u.span(), msg));
                    None
                }
            },
        };
        let _ = res_span;
        if diags.len() == before {
            if let Some(protocol) = protocol {
                out.push(Resource {
                    name: name.into_inner(),
                    protocol,
                    matches,
                    upstream,
                });
            }
        }
    }
    out
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
