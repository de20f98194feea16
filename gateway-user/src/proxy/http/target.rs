//! The request target as the upstream will read it: the path normalised
//! (RFC 3986 §6.2.2: unreserved characters decoded, percent-encodings in
//! upper case, dot segments resolved), the authority taken from the
//! request-target and the Host header (`:authority` and `host` on HTTP/2)
//! only when they agree, and a Go-style reading of the query (what the
//! Kubernetes API server parses).
//!
//! Portcullis decides on the normalised path and authority and forwards
//! exactly those, so what the upstream routes is what was decided. Anything
//! two servers could read differently (an encoded `/` or `\`, a `..` above
//! the root, `//`, `;` path parameters, double encoding, control bytes,
//! conflicting Host headers) is refused with 400 and the reason.
//!
//! Owns parsing only: it must not decide, forward or audit.

use std::net::{IpAddr, Ipv6Addr};

/// Why a request target cannot be read unambiguously (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// A path that is not origin-form (`/...`).
    #[error("request path {0:?} is not an absolute path")]
    NotAbsolute(String),
    /// `%` not followed by two hex digits.
    #[error("invalid percent-encoding in the {0}")]
    Percent(&'static str),
    /// `%2F` in a path segment: servers differ on whether it splits it.
    #[error(
        "encoded slash (%2F) in a path segment: upstreams differ on whether it separates segments"
    )]
    EncodedSlash,
    /// A backslash, raw or `%5C`: some servers read it as `/`.
    #[error("backslash in the path: some upstreams read it as a path separator")]
    Backslash,
    /// `%25` followed by hex digits: decoded twice, it is something else.
    #[error("double percent-encoding (%25XX) in the path: upstreams that decode twice read another path")]
    DoubleEncoded,
    /// NUL or another control byte, raw or encoded.
    #[error("control byte 0x{0:02X} in the {1}")]
    Control(u8, &'static str),
    /// A byte that may not appear raw in a path.
    #[error("byte 0x{0:02X} may not appear unencoded in a path")]
    RawByte(u8),
    /// `;` path parameters (Java servlet containers strip them).
    #[error(
        "`;` path parameters in the path: upstreams differ on whether they are part of the segment"
    )]
    PathParameter,
    /// `//`: some servers merge it, some do not.
    #[error("empty path segment (`//`): upstreams differ on whether it is merged")]
    EmptySegment,
    /// `..` above the root.
    #[error("`..` segment above the root of the path")]
    AboveRoot,
    /// A decoded segment that is not UTF-8 (Kubernetes names are).
    #[error("the path does not decode to UTF-8")]
    NotUtf8,
    /// `;` in a query (Go skips such pairs, other servers split on it).
    #[error("`;` in the query: servers differ on whether it separates parameters")]
    QuerySemicolon,
    /// A query parameter the classifier reads given more than once.
    #[error("query parameter {0:?} given more than once")]
    DuplicateParameter(String),
    /// A field selector with escapes.
    #[error("escaped fieldSelector values are not supported")]
    FieldSelector,
    /// More than one Host header.
    #[error("more than one Host header")]
    MultipleHost,
    /// HTTP/1.1 without Host (RFC 9112 §3.2: must be refused).
    #[error("HTTP/1.1 request without a Host header")]
    MissingHost,
    /// A Host or authority that is not `host[:port]`.
    #[error("malformed {0}: {1:?}")]
    Authority(&'static str, String),
    /// The absolute-form target (or `:authority`) and Host disagree.
    #[error("the request target names {target:?} but the Host header says {host:?}")]
    Mismatch {
        /// The authority of the request-target or `:authority`.
        target: String,
        /// The Host header.
        host: String,
    },
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters a path segment may hold raw (RFC 3986 `pchar`, without `;`).
fn raw_pchar(b: u8) -> bool {
    unreserved(b)
        || matches!(
            b,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
        )
}

/// One segment normalised: unreserved characters decoded, every other
/// encoding kept with upper-case hex; ambiguous forms refused.
fn segment(seg: &str, out: &mut String) -> Result<(), TargetError> {
    let b = seg.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(TargetError::Percent("path"));
            };
            let v = h * 16 + l;
            match v {
                b'/' => return Err(TargetError::EncodedSlash),
                b'\\' => return Err(TargetError::Backslash),
                0..=0x1f | 0x7f => return Err(TargetError::Control(v, "path")),
                b'%' if b.get(i + 3).copied().and_then(hex).is_some()
                    && b.get(i + 4).copied().and_then(hex).is_some() =>
                {
                    return Err(TargetError::DoubleEncoded)
                }
                _ if unreserved(v) => out.push(char::from(v)),
                _ => {
                    out.push('%');
                    out.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                    out.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
                }
            }
            i += 3;
            continue;
        }
        match c {
            b'\\' => return Err(TargetError::Backslash),
            b';' => return Err(TargetError::PathParameter),
            0..=0x1f | 0x7f => return Err(TargetError::Control(c, "path")),
            _ if raw_pchar(c) => out.push(char::from(c)),
            _ => return Err(TargetError::RawByte(c)),
        }
        i += 1;
    }
    Ok(())
}

/// The path the upstream will route: unreserved characters decoded,
/// other encodings in upper case, `.` and `..` (also `%2E` forms)
/// resolved. Refuses what upstreams could read differently.
pub fn normalize_path(raw: &str) -> Result<String, TargetError> {
    let Some(body) = raw.strip_prefix('/') else {
        return Err(TargetError::NotAbsolute(raw.to_string()));
    };
    let mut segs: Vec<String> = Vec::new();
    let mut trailing = false;
    let mut it = body.split('/').peekable();
    while let Some(seg) = it.next() {
        let last = it.peek().is_none();
        let mut s = String::with_capacity(seg.len());
        segment(seg, &mut s)?;
        trailing = false;
        match s.as_str() {
            "" if !last => return Err(TargetError::EmptySegment),
            "." => trailing = last,
            ".." => {
                if segs.pop().is_none() {
                    return Err(TargetError::AboveRoot);
                }
                trailing = last;
            }
            _ => segs.push(s),
        }
    }
    let mut out = String::with_capacity(raw.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Percent-decodes `s` completely (`plus`: `+` is a space, as in a query).
fn decode(s: &str, plus: bool, what: &'static str) -> Result<String, TargetError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(TargetError::Percent(what));
                };
                out.push(h * 16 + l);
                i += 3;
            }
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| TargetError::NotUtf8)
}

/// The segments of a path fully percent-decoded, as Go's `url.URL.Path`
/// (what the Kubernetes API server routes on). Empty segments dropped.
pub fn decoded_segments(path: &str) -> Result<Vec<String>, TargetError> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let d = decode(s, false, "path")?;
            if d.contains('/') {
                return Err(TargetError::EncodedSlash);
            }
            if let Some(c) = d.bytes().find(|c| c.is_ascii_control()) {
                return Err(TargetError::Control(c, "path"));
            }
            Ok(d)
        })
        .collect()
}

/// A query read the way Go's `url.ParseQuery` reads it (`&` separates,
/// keys and values percent-decoded, `+` is a space). Pairs Go would skip
/// (a `;`, a bad escape) are refused instead, so both readings agree.
pub fn query_pairs(query: &str) -> Result<Vec<(String, String)>, TargetError> {
    let mut out = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        if kv.contains(';') {
            return Err(TargetError::QuerySemicolon);
        }
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let k = decode(k, true, "query")?;
        let v = decode(v, true, "query")?;
        if let Some(c) = k.bytes().chain(v.bytes()).find(|c| c.is_ascii_control()) {
            return Err(TargetError::Control(c, "query"));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// A host and optional port, normalised: host in lower case without a
/// trailing dot, IPv6 in brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// The host (`[::1]` for IPv6).
    pub host: String,
    /// The port, when given.
    pub port: Option<u16>,
}

impl std::fmt::Display for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

impl Authority {
    /// The host without IPv6 brackets (what rules see as `context.host`).
    pub fn bare_host(&self) -> &str {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
    }

    /// Parses `host[:port]`; `what` names the source in errors.
    pub fn parse(s: &str, what: &'static str) -> Result<Self, TargetError> {
        let bad = || TargetError::Authority(what, s.to_string());
        if s.is_empty() || s.contains('@') {
            return Err(bad());
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (ip, after) = rest.split_once(']').ok_or_else(bad)?;
            let ip: Ipv6Addr = ip.parse().map_err(|_| bad())?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(bad)?),
            };
            (format!("[{ip}]"), port)
        } else {
            let (h, p) = match s.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            };
            let h = h.strip_suffix('.').unwrap_or(h);
            let ok = !h.is_empty()
                && h.split('.').all(|l| {
                    !l.is_empty()
                        && l.bytes()
                            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                });
            if !ok {
                return Err(bad());
            }
            // An all-numeric dotted name must be a real IPv4 address
            // (`127.1` is read as 127.0.0.1 by some resolvers).
            if h.bytes().all(|c| c.is_ascii_digit() || c == b'.') && h.parse::<IpAddr>().is_err() {
                return Err(bad());
            }
            (h.to_ascii_lowercase(), p)
        };
        let port = match port {
            None => None,
            Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit()) => {
                Some(p.parse::<u16>().map_err(|_| bad())?)
            }
            Some(_) => return Err(bad()),
        };
        Ok(Self { host, port })
    }

    fn same(&self, other: &Self, default_port: u16) -> bool {
        self.host == other.host
            && self.port.unwrap_or(default_port) == other.port.unwrap_or(default_port)
    }
}

/// The authority a request is decided on and forwarded with.
///
/// `target`: the authority of an absolute-form request-target or HTTP/2
/// `:authority`; `hosts`: every Host header; `http11`: HTTP/1.1 (Host
/// required); `fallback`: the TLS SNI or the dialed address, used only
/// when the request names no authority at all (HTTP/1.0, HTTP/2 without
/// `:authority` and `host`).
pub fn decide_authority<'a>(
    target: Option<&str>,
    hosts: impl IntoIterator<Item = &'a [u8]>,
    http11: bool,
    secure: bool,
    fallback: &str,
) -> Result<Authority, TargetError> {
    let mut hosts = hosts.into_iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(TargetError::MultipleHost);
    }
    let host = match host {
        Some(h) => {
            let s = std::str::from_utf8(h).map_err(|_| {
                TargetError::Authority("Host header", String::from_utf8_lossy(h).into())
            })?;
            Some(Authority::parse(s, "Host header")?)
        }
        None => None,
    };
    let default_port = if secure { 443 } else { 80 };
    match (target, host) {
        (Some(t), host) => {
            let t = Authority::parse(t, "request target authority")?;
            if let Some(h) = host {
                if !t.same(&h, default_port) {
                    return Err(TargetError::Mismatch {
                        target: t.to_string(),
                        host: h.to_string(),
                    });
                }
            }
            Ok(t)
        }
        (None, Some(h)) => Ok(h),
        (None, None) if http11 => Err(TargetError::MissingHost),
        (None, None) => Authority::parse(fallback, "server name"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_like_rfc3986() {
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            (
                "/api/v1/namespaces/default/secret%73/db",
                "/api/v1/namespaces/default/secrets/db",
            ),
            ("/%7euser/%41%2d", "/~user/A-"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/%2e%2E/b", "/b"),
            ("/a/.%2e/b", "/b"),
            ("/a/%2e/b", "/a/b"),
            ("/x/%3a%c3%a9", "/x/%3A%C3%A9"),
            ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
            ("/a/..", "/"),
            ("/a%20b", "/a%20b"),
            ("/%25", "/%25"),
            ("/%25zz", "/%25zz"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for (raw, want) in [
            ("a", TargetError::NotAbsolute("a".into())),
            ("*", TargetError::NotAbsolute("*".into())),
            ("/a%2fb", TargetError::EncodedSlash),
            ("/a%2Fb", TargetError::EncodedSlash),
            ("/a%5cb", TargetError::Backslash),
            ("/a\\b", TargetError::Backslash),
            ("/..", TargetError::AboveRoot),
            ("/a/../..", TargetError::AboveRoot),
            ("/%2e%2e/x", TargetError::AboveRoot),
            ("/a//b", TargetError::EmptySegment),
            ("//a", TargetError::EmptySegment),
            ("/a;x=1/b", TargetError::PathParameter),
            ("/a%00", TargetError::Control(0, "path")),
            ("/a%0a", TargetError::Control(0x0a, "path")),
            ("/a%7F", TargetError::Control(0x7f, "path")),
            ("/a\u{1}", TargetError::Control(1, "path")),
            ("/a%zz", TargetError::Percent("path")),
            ("/a%2", TargetError::Percent("path")),
            ("/a%", TargetError::Percent("path")),
            ("/a%252F", TargetError::DoubleEncoded),
            ("/a%252e", TargetError::DoubleEncoded),
            ("/a b", TargetError::RawByte(b' ')),
            ("/a|b", TargetError::RawByte(b'|')),
            ("/a\u{e9}", TargetError::RawByte(0xc3)),
        ] {
            assert_eq!(normalize_path(raw), Err(want), "{raw}");
        }
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for raw in [
            "/a/%2e/b/../c%3a/%7e",
            "/api/v1/namespaces/default/secret%73/db",
        ] {
            let once = normalize_path(raw).unwrap();
            assert_eq!(normalize_path(&once).unwrap(), once);
        }
    }

    #[test]
    fn segments_and_queries_decode_like_go() {
        assert_eq!(
            decoded_segments("/apis/rbac/v1/clusterroles/system%3Aadmin").unwrap(),
            ["apis", "rbac", "v1", "clusterroles", "system:admin"]
        );
        assert_eq!(decoded_segments("/a%2Fb"), Err(TargetError::EncodedSlash));
        assert_eq!(decoded_segments("/a%FF"), Err(TargetError::NotUtf8));
        assert_eq!(
            query_pairs("wat%63h=%74rue&a+b=c+d&flag&&x=").unwrap(),
            [
                ("watch".to_string(), "true".to_string()),
                ("a b".into(), "c d".into()),
                ("flag".into(), "".into()),
                ("x".into(), "".into())
            ]
        );
        assert_eq!(query_pairs("watch=1;x=2"), Err(TargetError::QuerySemicolon));
        assert_eq!(query_pairs("watch=%zz"), Err(TargetError::Percent("query")));
        assert_eq!(query_pairs("a=%00"), Err(TargetError::Control(0, "query")));
    }

    fn auth(target: Option<&str>, hosts: &[&str], http11: bool) -> Result<String, TargetError> {
        decide_authority(
            target,
            hosts.iter().map(|h| h.as_bytes()),
            http11,
            false,
            "127.0.0.1:8080",
        )
        .map(|a| a.to_string())
    }

    #[test]
    fn authority_is_the_target_and_host_when_they_agree() {
        assert_eq!(
            auth(None, &["API.Example.com"], true).unwrap(),
            "api.example.com"
        );
        assert_eq!(
            auth(None, &["api.example.com.:8443"], true).unwrap(),
            "api.example.com:8443"
        );
        assert_eq!(
            auth(Some("a.example"), &["A.example:80"], true).unwrap(),
            "a.example"
        );
        assert_eq!(
            auth(Some("a.example:8080"), &[], true).unwrap(),
            "a.example:8080"
        );
        assert_eq!(auth(None, &["[::1]:443"], true).unwrap(), "[::1]:443");
        assert_eq!(auth(None, &[], false).unwrap(), "127.0.0.1:8080");
        assert_eq!(
            auth(Some("public.example"), &["admin.example"], true),
            Err(TargetError::Mismatch {
                target: "public.example".into(),
                host: "admin.example".into()
            })
        );
        assert!(matches!(
            auth(Some("a.example:8080"), &["a.example"], true),
            Err(TargetError::Mismatch { .. })
        ));
        assert_eq!(
            auth(None, &["a", "b"], true),
            Err(TargetError::MultipleHost)
        );
        assert_eq!(
            auth(None, &["a", "a"], true),
            Err(TargetError::MultipleHost)
        );
        assert_eq!(auth(None, &[], true), Err(TargetError::MissingHost));
        for bad in [
            "", "a b", "user@a", "a:", "a:x", "a:99999", "a..b", "[::1", "[zz]", "a/b", "127.1",
            "a:80:80", ".", "a\u{0}",
        ] {
            assert!(
                matches!(auth(None, &[bad], true), Err(TargetError::Authority(..))),
                "{bad:?}"
            );
        }
        let a = Authority::parse("[::1]:443", "x").unwrap();
        assert_eq!(a.bare_host(), "::1");
    }
}
