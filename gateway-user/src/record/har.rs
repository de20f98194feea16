//! HTTP exchanges as HAR 1.2 (<http://www.softwareishard.com/blog/har-12-spec/>).
//!
//! Owns the mapping from [`HarEntry`] to HAR JSON, the on-disk layout of
//! `session.har` (so that appending keeps it a valid document) and its
//! repair after a crash. It must not read or write files itself (the writer
//! and the readers do) and must not decide what is recorded (the caller
//! masks; the session handle drops bodies unless `record = "full"`).
//!
//! # Layout
//!
//! ```text
//! {"log":{"version":"1.2","creator":{...},"comment":"...","entries":[
//! {entry 1},
//! {entry 2}
//! ]}}
//! ```
//!
//! The head is the first line; each entry is one line (`,` ending every
//! entry line but the last); [`TAIL`] closes the document. Appending writes
//! the new entries and a new tail over the old tail, in one write.

use std::{borrow::Cow, net::IpAddr};

use serde::{Serialize, Serializer};
use serde_json::{json, Map, Value};

use crate::audit::rfc3339_ms_string;

/// What closes the document after the last entry.
pub(crate) const TAIL: &[u8] = b"\n]}}\n";

/// Header names whose values are never recorded (credentials the gateway
/// may hold or the agent may send).
const REDACTED_HEADERS: &[&str] = &["authorization", "proxy-authorization"];

/// The value recorded instead of a redacted header value.
pub const REDACTED: &str = "[redacted]";

/// One HTTP exchange as the agent saw it (after masking by the caller).
///
/// Bodies are kept only when the session records `full`, cut to the
/// recorder's body cap. `Authorization` and `Proxy-Authorization` values are
/// always recorded as [`REDACTED`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HarEntry {
    /// When the request started (milliseconds since the Unix epoch).
    pub started_ms: u64,
    /// Request method (`GET`).
    pub method: String,
    /// Absolute request URL (`https://api.example.com/v1/x?y=1`).
    pub url: String,
    /// Request protocol (`HTTP/1.1`, `HTTP/2`).
    pub http_version: String,
    /// Request headers in order, as sent upstream.
    pub request_headers: Vec<(String, String)>,
    /// Request body length in bytes, if known.
    pub request_body_size: Option<u64>,
    /// Request body (kept with `record = "full"` only).
    pub request_body: Option<Vec<u8>>,
    /// Request body media type; defaults to the `Content-Type` header.
    pub request_mime_type: Option<String>,
    /// Response status the agent got (`0` when no response was sent).
    pub status: u16,
    /// Response reason phrase (`OK`).
    pub status_text: String,
    /// Response protocol (`HTTP/1.1`).
    pub response_http_version: String,
    /// Response headers in order, as given to the agent.
    pub response_headers: Vec<(String, String)>,
    /// Response body length in bytes (as transferred), if known.
    pub response_body_size: Option<u64>,
    /// Response body as the agent saw it (kept with `record = "full"` only).
    pub response_body: Option<Vec<u8>>,
    /// Response media type; defaults to the `Content-Type` header.
    pub response_mime_type: Option<String>,
    /// Time to send the request upstream (ms).
    pub send_ms: f64,
    /// Time waiting for the first response byte (ms).
    pub wait_ms: f64,
    /// Time reading the response (ms).
    pub receive_ms: f64,
    /// The upstream server's IP address, if connected (written as text
    /// by the recorder, off the request's path).
    pub server_ip: Option<IpAddr>,
    /// The policy action (`http:GET`).
    pub action: String,
    /// The decision (`allow`, `deny`, ...).
    pub decision: String,
    /// Why, when the policy engine said.
    pub reason: Option<String>,
    /// The policies that decided.
    pub policy_ids: Vec<String>,
}

/// Cuts `body` to `max` bytes; returns whether it was cut.
pub(crate) fn cap_body(body: &mut Option<Vec<u8>>, max: usize) -> bool {
    match body {
        Some(b) if b.len() > max => {
            b.truncate(max);
            true
        }
        _ => false,
    }
}

/// The document head, up to and including `"entries":[`.
pub(crate) fn head(session: &str) -> Vec<u8> {
    let log = json!({
        "version": "1.2",
        "creator": {"name": "portcullis", "version": env!("CARGO_PKG_VERSION")},
        "comment": format!("portcullis session {session}"),
    });
    // `{"log":{...,"entries":[`: the object without its closing brace.
    let mut text = log.to_string();
    text.pop();
    let mut out = Vec::with_capacity(text.len() + 32);
    out.extend_from_slice(b"{\"log\":");
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b",\"entries\":[");
    out
}

/// Appends the HAR entry object for `e` to `out` as one line of JSON (no
/// newline). `*_truncated` say whether the bodies were cut by the recorder.
///
/// Serialized straight from borrowed views of `e`, field by field in the
/// order [`entry_json`] builds them (the recorder writes one entry per HTTP
/// exchange; building a `serde_json::Value` first, serializing it and
/// dropping it was most of the recorder thread's work). The two give the
/// same bytes (test `the_entry_line_is_the_entry_object_as_json`).
pub(crate) fn write_entry(
    out: &mut Vec<u8>,
    e: &HarEntry,
    req_truncated: bool,
    resp_truncated: bool,
) {
    let send = nonneg(e.send_ms);
    let wait = nonneg(e.wait_ms);
    let receive = nonneg(e.receive_ms);
    // A body that is not UTF-8 is recorded in base64, and says so.
    let (text, encoding) = match e.response_body.as_deref() {
        None => (None, None),
        Some(body) => match std::str::from_utf8(body) {
            Ok(text) => (Some(Cow::Borrowed(text)), None),
            Err(_) => {
                use base64::Engine as _;
                let encoded = base64::engine::general_purpose::STANDARD.encode(body);
                (Some(Cow::Owned(encoded)), Some("base64"))
            }
        },
    };
    let line = EntryOut {
        started_date_time: rfc3339_ms_string(e.started_ms),
        time: send + wait + receive,
        request: RequestOut {
            method: &e.method,
            url: &e.url,
            http_version: &e.http_version,
            cookies: RequestCookies(&e.request_headers),
            headers: Headers(&e.request_headers),
            query_string: QueryString(&e.url),
            post_data: e.request_body.as_deref().map(|body| PostDataOut {
                mime_type: mime_type(&e.request_mime_type, &e.request_headers),
                text: String::from_utf8_lossy(body),
                truncated: req_truncated.then_some(true),
            }),
            headers_size: -1,
            body_size: Size(e.request_body_size),
        },
        response: ResponseOut {
            status: e.status,
            status_text: &e.status_text,
            http_version: &e.response_http_version,
            cookies: response_cookies(&e.response_headers),
            headers: Headers(&e.response_headers),
            content: ContentOut {
                size: e
                    .response_body_size
                    .or(e.response_body.as_ref().map(|b| b.len() as u64))
                    .unwrap_or(0),
                mime_type: mime_type(&e.response_mime_type, &e.response_headers),
                text,
                encoding,
                truncated: (e.response_body.is_some() && resp_truncated).then_some(true),
            },
            redirect_url: header(&e.response_headers, "location").unwrap_or(""),
            headers_size: -1,
            body_size: Size(e.response_body_size),
        },
        cache: Empty {},
        timings: Timings {
            send,
            wait,
            receive,
        },
        server_ip_address: e.server_ip,
        portcullis: PortcullisOut {
            action: &e.action,
            decision: &e.decision,
            reason: e.reason.as_deref(),
            policy_ids: &e.policy_ids,
        },
    };
    // Serializing borrowed plain data into memory cannot fail; an empty
    // object keeps the document valid if it ever did.
    let start = out.len();
    if serde_json::to_writer(&mut *out, &line).is_err() {
        out.truncate(start);
        out.extend_from_slice(b"{}");
    }
}

/// [`write_entry`] into a new line.
#[cfg(test)]
fn entry_line(e: &HarEntry, req_truncated: bool, resp_truncated: bool) -> Vec<u8> {
    let mut out = Vec::new();
    write_entry(&mut out, e, req_truncated, resp_truncated);
    out
}

/// A body's media type: the one given, else the `Content-Type` header's.
fn mime_type<'a>(given: &'a Option<String>, headers: &'a [(String, String)]) -> &'a str {
    match given {
        Some(m) => m,
        None => header(headers, "content-type").unwrap_or_default(),
    }
}

/// A HAR entry, borrowed from a [`HarEntry`] (field order is the JSON's).
#[derive(Serialize)]
struct EntryOut<'a> {
    #[serde(rename = "startedDateTime")]
    started_date_time: String,
    time: f64,
    request: RequestOut<'a>,
    response: ResponseOut<'a>,
    cache: Empty,
    timings: Timings,
    #[serde(rename = "serverIPAddress", skip_serializing_if = "Option::is_none")]
    server_ip_address: Option<IpAddr>,
    #[serde(rename = "_portcullis")]
    portcullis: PortcullisOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RequestOut<'a> {
    method: &'a str,
    url: &'a str,
    http_version: &'a str,
    cookies: RequestCookies<'a>,
    headers: Headers<'a>,
    query_string: QueryString<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    post_data: Option<PostDataOut<'a>>,
    headers_size: i64,
    body_size: Size,
}

#[derive(Serialize)]
struct PostDataOut<'a> {
    #[serde(rename = "mimeType")]
    mime_type: &'a str,
    text: Cow<'a, str>,
    #[serde(rename = "_truncated", skip_serializing_if = "Option::is_none")]
    truncated: Option<bool>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    status: u16,
    status_text: &'a str,
    http_version: &'a str,
    /// Rare (only `Set-Cookie` headers), with attributes in the header's
    /// order: built as JSON values.
    cookies: Vec<Value>,
    headers: Headers<'a>,
    content: ContentOut<'a>,
    #[serde(rename = "redirectURL")]
    redirect_url: &'a str,
    headers_size: i64,
    body_size: Size,
}

#[derive(Serialize)]
struct ContentOut<'a> {
    size: u64,
    #[serde(rename = "mimeType")]
    mime_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'static str>,
    #[serde(rename = "_truncated", skip_serializing_if = "Option::is_none")]
    truncated: Option<bool>,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct Timings {
    send: f64,
    wait: f64,
    receive: f64,
}

#[derive(Serialize)]
struct PortcullisOut<'a> {
    action: &'a str,
    decision: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    policy_ids: &'a [String],
}

/// A size, or `-1` when unknown (HAR's convention).
struct Size(Option<u64>);

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(n) => s.serialize_u64(n),
            None => s.serialize_i64(-1),
        }
    }
}

/// A name and a value, HAR's shape for headers, cookies and parameters.
#[derive(Serialize)]
struct NameValue<'a> {
    name: &'a str,
    value: &'a str,
}

/// Headers, credentials redacted.
struct Headers<'a>(&'a [(String, String)]);

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(name, value)| NameValue {
            name,
            value: if is_redacted(name) { REDACTED } else { value },
        }))
    }
}

/// `Cookie` headers' pairs.
struct RequestCookies<'a>(&'a [(String, String)]);

impl Serialize for RequestCookies<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(cookie_pairs(self.0).map(|(name, value)| NameValue { name, value }))
    }
}

/// The URL's query parameters, as written.
struct QueryString<'a>(&'a str);

impl Serialize for QueryString<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(query_pairs(self.0).map(|(name, value)| NameValue { name, value }))
    }
}

/// The HAR entry object for `e`, as a JSON value: the reference
/// [`entry_line`] is tested against.
#[cfg(test)]
pub(crate) fn entry_json(e: &HarEntry, req_truncated: bool, resp_truncated: bool) -> Value {
    let req_headers = headers_json(&e.request_headers);
    let resp_headers = headers_json(&e.response_headers);
    let send = nonneg(e.send_ms);
    let wait = nonneg(e.wait_ms);
    let receive = nonneg(e.receive_ms);

    let mut request = Map::new();
    request.insert("method".into(), json!(e.method));
    request.insert("url".into(), json!(e.url));
    request.insert("httpVersion".into(), json!(e.http_version));
    request.insert(
        "cookies".into(),
        Value::Array(request_cookies(&e.request_headers)),
    );
    request.insert("headers".into(), req_headers);
    request.insert("queryString".into(), Value::Array(query_string(&e.url)));
    if let Some(body) = &e.request_body {
        let mime = e
            .request_mime_type
            .clone()
            .or_else(|| header(&e.request_headers, "content-type").map(str::to_owned))
            .unwrap_or_default();
        let mut post = Map::new();
        post.insert("mimeType".into(), json!(mime));
        post.insert(
            "text".into(),
            json!(String::from_utf8_lossy(body).into_owned()),
        );
        if req_truncated {
            post.insert("_truncated".into(), json!(true));
        }
        request.insert("postData".into(), Value::Object(post));
    }
    request.insert("headersSize".into(), json!(-1));
    request.insert("bodySize".into(), size_or_unknown(e.request_body_size));

    let mime = e
        .response_mime_type
        .clone()
        .or_else(|| header(&e.response_headers, "content-type").map(str::to_owned))
        .unwrap_or_default();
    let mut content = Map::new();
    let content_size = e
        .response_body_size
        .or(e.response_body.as_ref().map(|b| b.len() as u64))
        .unwrap_or(0);
    content.insert("size".into(), json!(content_size));
    content.insert("mimeType".into(), json!(mime));
    if let Some(body) = &e.response_body {
        match std::str::from_utf8(body) {
            Ok(text) => {
                content.insert("text".into(), json!(text));
            }
            Err(_) => {
                use base64::Engine as _;
                content.insert(
                    "text".into(),
                    json!(base64::engine::general_purpose::STANDARD.encode(body)),
                );
                content.insert("encoding".into(), json!("base64"));
            }
        }
        if resp_truncated {
            content.insert("_truncated".into(), json!(true));
        }
    }

    let mut portcullis = Map::new();
    portcullis.insert("action".into(), json!(e.action));
    portcullis.insert("decision".into(), json!(e.decision));
    if let Some(reason) = &e.reason {
        portcullis.insert("reason".into(), json!(reason));
    }
    portcullis.insert("policy_ids".into(), json!(e.policy_ids));

    let mut entry = Map::new();
    entry.insert(
        "startedDateTime".into(),
        json!(rfc3339_ms_string(e.started_ms)),
    );
    entry.insert("time".into(), json!(send + wait + receive));
    entry.insert("request".into(), Value::Object(request));
    entry.insert(
        "response".into(),
        json!({
            "status": e.status,
            "statusText": e.status_text,
            "httpVersion": e.response_http_version,
            "cookies": response_cookies(&e.response_headers),
            "headers": resp_headers,
            "content": Value::Object(content),
            "redirectURL": header(&e.response_headers, "location").unwrap_or(""),
            "headersSize": -1,
            "bodySize": size_or_unknown(e.response_body_size),
        }),
    );
    entry.insert("cache".into(), json!({}));
    entry.insert(
        "timings".into(),
        json!({"send": send, "wait": wait, "receive": receive}),
    );
    if let Some(ip) = &e.server_ip {
        entry.insert("serverIPAddress".into(), json!(ip.to_string()));
    }
    entry.insert("_portcullis".into(), Value::Object(portcullis));
    Value::Object(entry)
}

/// Rebuilds a torn `session.har` from its complete entry lines. Returns the
/// repaired document and its number of entries, or `None` when even the head
/// is unusable.
pub(crate) fn repair(bytes: &[u8]) -> Option<(Vec<u8>, u64)> {
    let mut lines = bytes.split(|&b| b == b'\n');
    let head = lines.next()?;
    if !head.starts_with(b"{\"log\":") || !head.ends_with(b"\"entries\":[") {
        return None;
    }
    let mut out = head.to_vec();
    let mut n = 0u64;
    for line in lines {
        let line = line.strip_suffix(b",").unwrap_or(line);
        match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(_)) => {
                out.extend_from_slice(if n == 0 { b"\n" } else { b",\n" });
                out.extend_from_slice(line);
                n += 1;
            }
            _ => break,
        }
    }
    out.extend_from_slice(TAIL);
    Some((out, n))
}

fn nonneg(ms: f64) -> f64 {
    if ms.is_finite() && ms > 0.0 {
        // Microsecond precision is plenty and keeps the numbers short.
        (ms * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

#[cfg(test)]
fn size_or_unknown(size: Option<u64>) -> Value {
    match size {
        Some(n) => json!(n),
        None => json!(-1),
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Whether a header's value is never recorded.
fn is_redacted(name: &str) -> bool {
    REDACTED_HEADERS
        .iter()
        .any(|r| name.eq_ignore_ascii_case(r))
}

#[cfg(test)]
fn headers_json(headers: &[(String, String)]) -> Value {
    Value::Array(
        headers
            .iter()
            .map(|(name, value)| {
                json!({"name": name, "value": if is_redacted(name) { REDACTED } else { value }})
            })
            .collect(),
    )
}

/// The (name, value) pairs of `Cookie: a=1; b=2` headers.
fn cookie_pairs(headers: &[(String, String)]) -> impl Iterator<Item = (&str, &str)> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
        .flat_map(|(_, v)| v.split(';'))
        .filter_map(|pair| {
            let pair = pair.trim();
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (!name.is_empty()).then(|| (name.trim(), value.trim()))
        })
}

/// `Cookie` headers as HAR cookie objects.
#[cfg(test)]
fn request_cookies(headers: &[(String, String)]) -> Vec<Value> {
    cookie_pairs(headers)
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect()
}

/// `Set-Cookie` headers as HAR cookie objects.
fn response_cookies(headers: &[(String, String)]) -> Vec<Value> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
        .filter_map(|(_, v)| {
            let mut parts = v.split(';');
            let first = parts.next()?.trim();
            let (name, value) = first.split_once('=').unwrap_or((first, ""));
            if name.is_empty() {
                return None;
            }
            let mut cookie = Map::new();
            cookie.insert("name".into(), json!(name.trim()));
            cookie.insert("value".into(), json!(value.trim()));
            for attr in parts {
                let attr = attr.trim();
                let (k, v) = attr.split_once('=').unwrap_or((attr, ""));
                match k.to_ascii_lowercase().as_str() {
                    "path" => {
                        cookie.insert("path".into(), json!(v));
                    }
                    "domain" => {
                        cookie.insert("domain".into(), json!(v));
                    }
                    "expires" => {
                        cookie.insert("expires".into(), json!(v));
                    }
                    "httponly" => {
                        cookie.insert("httpOnly".into(), json!(true));
                    }
                    "secure" => {
                        cookie.insert("secure".into(), json!(true));
                    }
                    _ => {}
                }
            }
            Some(Value::Object(cookie))
        })
        .collect()
}

/// The URL's query parameters, as written (not percent-decoded).
fn query_pairs(url: &str) -> impl Iterator<Item = (&str, &str)> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let query = query.split('#').next().unwrap_or("");
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// The URL's query parameters as HAR objects.
#[cfg(test)]
fn query_string(url: &str) -> Vec<Value> {
    query_pairs(url)
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_and_tail_make_an_empty_log() {
        let mut doc = head("s-1");
        doc.extend_from_slice(TAIL);
        let v: Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(v["log"]["version"], "1.2");
        assert_eq!(v["log"]["creator"]["name"], "portcullis");
        assert_eq!(v["log"]["entries"], json!([]));
        assert!(!head("s-1").contains(&b'\n'));
    }

    #[test]
    fn entry_fields_cookies_query_and_redaction() {
        let e = HarEntry {
            started_ms: 1_795_687_200_123,
            method: "POST".into(),
            url: "https://api.example.com/v1/x?a=1&b=&c#frag".into(),
            http_version: "HTTP/1.1".into(),
            request_headers: vec![
                ("Authorization".into(), "Bearer secret".into()),
                ("Cookie".into(), "sid=abc; theme=dark".into()),
                ("Content-Type".into(), "application/json".into()),
            ],
            request_body: Some(b"{\"q\":1}".to_vec()),
            request_body_size: Some(7),
            status: 302,
            status_text: "Found".into(),
            response_http_version: "HTTP/1.1".into(),
            response_headers: vec![
                ("Location".into(), "/next".into()),
                ("Set-Cookie".into(), "sid=new; Path=/; HttpOnly".into()),
            ],
            response_body: Some(vec![0xff, 0x00]),
            send_ms: 1.0,
            wait_ms: 2.5,
            receive_ms: -3.0,
            ..Default::default()
        };
        let v: Value = serde_json::from_slice(&entry_line(&e, false, true)).unwrap();
        assert_eq!(v, entry_json(&e, false, true));
        assert_eq!(v["startedDateTime"], "2026-11-26T10:00:00.123Z");
        assert_eq!(v["time"], json!(3.5));
        assert_eq!(v["timings"]["receive"], json!(0.0));
        assert_eq!(v["request"]["headers"][0]["value"], REDACTED);
        assert!(!v.to_string().contains("secret"));
        assert_eq!(
            v["request"]["cookies"],
            json!([{"name": "sid", "value": "abc"}, {"name": "theme", "value": "dark"}])
        );
        assert_eq!(
            v["request"]["queryString"],
            json!([{"name": "a", "value": "1"}, {"name": "b", "value": ""}, {"name": "c", "value": ""}])
        );
        assert_eq!(v["request"]["postData"]["mimeType"], "application/json");
        assert_eq!(v["response"]["redirectURL"], "/next");
        assert_eq!(v["response"]["cookies"][0]["httpOnly"], true);
        assert_eq!(v["response"]["cookies"][0]["path"], "/");
        assert_eq!(v["response"]["content"]["encoding"], "base64");
        assert_eq!(v["response"]["content"]["text"], "/wA=");
        assert_eq!(v["response"]["content"]["_truncated"], true);
        assert_eq!(v["response"]["content"]["size"], 2);
        assert_eq!(v["response"]["bodySize"], -1);
    }

    #[test]
    fn the_entry_line_is_the_entry_object_as_json() {
        let full = HarEntry {
            started_ms: 1_795_687_200_123,
            method: "POST".into(),
            url: "https://api.example.com/v1/x?a=1&b=&c&&d=\"q\"#frag?e=1".into(),
            http_version: "HTTP/2".into(),
            request_headers: vec![
                ("authorization".into(), "Bearer secret".into()),
                ("Proxy-Authorization".into(), "Basic x".into()),
                ("Cookie".into(), "sid=abc; theme=dark; ; =x; flag".into()),
                ("cookie".into(), "second=2".into()),
                ("Content-Type".into(), "application/json".into()),
                ("X-Unicode".into(), "caf\u{e9} \u{1f600} \"quoted\" \\ \t".into()),
            ],
            request_body: Some(b"{\"q\":1}\xff".to_vec()),
            request_body_size: Some(8),
            request_mime_type: None,
            status: 200,
            status_text: "OK".into(),
            response_http_version: "HTTP/2".into(),
            response_headers: vec![
                ("Content-Type".into(), "text/plain".into()),
                (
                    "Set-Cookie".into(),
                    "a=1; Path=/p; Domain=x.test; Expires=Wed, 01 Jan 2031 00:00:00 GMT; Secure; HttpOnly; path=/q".into(),
                ),
                ("set-cookie".into(), "=nameless".into()),
            ],
            response_body_size: None,
            response_body: Some("text \u{e9}\n".as_bytes().to_vec()),
            response_mime_type: Some("text/x-custom".into()),
            send_ms: 0.1234567,
            wait_ms: 12.0,
            receive_ms: f64::NAN,
            server_ip: Some(IpAddr::from([10, 0, 0, 7])),
            action: "http:POST".into(),
            decision: "allow".into(),
            reason: Some("rule \"r1\"".into()),
            policy_ids: vec!["r1".into(), "r2".into()],
        };
        let bare = HarEntry {
            method: "GET".into(),
            url: "http://h/".into(),
            ..Default::default()
        };
        let binary = HarEntry {
            response_body: Some(vec![0xff, 0x00, 0x10]),
            response_body_size: Some(3),
            request_body: Some(Vec::new()),
            wait_ms: f64::INFINITY,
            send_ms: -1.0,
            ..full.clone()
        };
        for e in [&full, &bare, &binary] {
            for (req, resp) in [(false, false), (true, false), (false, true), (true, true)] {
                let want = entry_json(e, req, resp).to_string();
                let got = String::from_utf8(entry_line(e, req, resp)).unwrap();
                assert_eq!(got, want, "{e:?} {req} {resp}");
            }
        }
    }

    #[test]
    fn repair_keeps_complete_entries() {
        let mut doc = head("s");
        doc.extend_from_slice(b"\n{\"a\":1},\n{\"b\":2},\n{\"c\":");
        let (fixed, n) = repair(&doc).unwrap();
        assert_eq!(n, 2);
        let v: Value = serde_json::from_slice(&fixed).unwrap();
        assert_eq!(v["log"]["entries"], json!([{"a": 1}, {"b": 2}]));
        // A head alone (torn right after it) is an empty log.
        let (fixed, n) = repair(&head("s")).unwrap();
        assert_eq!(n, 0);
        serde_json::from_slice::<Value>(&fixed).unwrap();
        assert!(repair(b"{\"lo").is_none());
    }
}
