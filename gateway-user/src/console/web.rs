//! Small HTTP helpers of the console: escaping, form and cookie parsing,
//! and responses with the security headers every page carries.

use std::collections::HashMap;

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{body::Frame, header, Response, StatusCode};

/// A response body: a whole page, or a stream of server-sent events.
pub type Body = BoxBody<Bytes, Infallible>;

fn full(b: Bytes) -> Body {
    Full::new(b).boxed()
}

fn built(r: Result<Response<Body>, hyper::http::Error>) -> Response<Body> {
    r.unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// A body fed by a channel (server-sent events); ends when the sender is
/// dropped.
pub struct EventStream(pub tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A `text/event-stream` response.
pub fn events(stream: EventStream) -> Response<Body> {
    built(
        base(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(BodyExt::boxed(stream)),
    )
}

/// HTML-escapes `s` (text and attribute values).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Decodes `application/x-www-form-urlencoded` text (`+` is a space).
/// Invalid escapes and non-UTF-8 results are refused.
pub fn url_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Parses a query string or form body. A repeated key is refused (so a
/// parameter cannot be smuggled past a check that read the first one).
pub fn parse_form(s: &str) -> Option<HashMap<String, String>> {
    let mut map = HashMap::new();
    for pair in s.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if map.insert(url_decode(k)?, url_decode(v)?).is_some() {
            return None;
        }
    }
    Some(map)
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .map(str::trim)
        .filter_map(|c| c.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// `s` cut to `n` characters.
pub fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(n).collect();
        c.push('…');
        c
    }
}

/// The Content-Security-Policy of every console response.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The policy of a page with the asciinema player: [`CSP`] plus
/// `'wasm-unsafe-eval'`, which lets the player compile the WebAssembly
/// terminal emulator its bundle carries (no `eval` of JavaScript, no inline
/// script; the cast is fetched from the console, `connect-src 'self'`).
pub const PLAYER_CSP: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The headers of every console response: no framing, no sniffing, no
/// caching, no referrer to other sites (URLs carry codes during sign-in;
/// `same-origin`, not `no-referrer`, because with the latter browsers send
/// `Origin: null` on the console's own forms), scripts and
/// styles from the console only.
fn base(status: StatusCode) -> hyper::http::response::Builder {
    Response::builder()
        .status(status)
        .header("content-security-policy", CSP)
        .header("x-frame-options", "DENY")
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "same-origin")
        .header(header::CACHE_CONTROL, "no-store")
        .header("strict-transport-security", "max-age=31536000")
}

/// A page.
pub fn html(status: StatusCode, page: String) -> Response<Body> {
    built(
        base(status)
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(full(Bytes::from(page))),
    )
}

/// A page that runs the asciinema player (see [`PLAYER_CSP`]).
pub fn html_with_player(status: StatusCode, page: String) -> Response<Body> {
    let mut r = html(status, page);
    r.headers_mut().insert(
        "content-security-policy",
        header::HeaderValue::from_static(PLAYER_CSP),
    );
    r
}

/// A vendored asset under a versioned URL: cached for a year and never
/// revalidated (a new version is a new URL). `public`: the bytes are a
/// published open-source bundle, nothing of the reviewer's.
pub fn immutable_asset(content_type: &'static str, bytes: &'static [u8]) -> Response<Body> {
    let mut r = asset(content_type, bytes);
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    r
}

/// A recording served to the player (asciicast v2 lines); never cached.
pub fn asciicast(text: String) -> Response<Body> {
    built(
        base(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/x-asciicast")
            .body(full(Bytes::from(text))),
    )
}

/// A static asset.
pub fn asset(content_type: &str, bytes: &'static [u8]) -> Response<Body> {
    built(
        base(StatusCode::OK)
            .header(header::CONTENT_TYPE, content_type)
            .body(full(Bytes::from_static(bytes))),
    )
}

/// A redirect (`303 See Other` after a POST, `302` otherwise), setting
/// `cookies`.
pub fn redirect(status: StatusCode, to: &str, cookies: &[String]) -> Response<Body> {
    let mut b = base(status).header(header::LOCATION, to);
    for c in cookies {
        b = b.header(header::SET_COOKIE, c.as_str());
    }
    built(b.body(full(Bytes::new())))
}

/// A page that sets `cookies` and then moves the browser to `to` by itself.
/// Used at the end of sign-in: the callback is reached by a cross-site
/// redirect, and a `SameSite=Strict` cookie set there is only sent on a
/// navigation the console's own page starts.
pub fn set_cookies_then(to: &str, cookies: &[String]) -> Response<Body> {
    let page = format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=\"0;url={0}\"><title>Signed in</title></head><body><p>Signed in. <a href=\"{0}\">Continue</a></p></body></html>",
        esc(to)
    );
    let mut b = base(StatusCode::OK).header(header::CONTENT_TYPE, "text/html; charset=utf-8");
    for c in cookies {
        b = b.header(header::SET_COOKIE, c.as_str());
    }
    built(b.body(full(Bytes::from(page))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_cookies_and_escaping() {
        let f = parse_form("a=1&b=x+y%2Fz&c=").unwrap();
        assert_eq!(f["b"], "x y/z");
        assert_eq!(f["c"], "");
        assert!(parse_form("a=1&a=2").is_none(), "repeated keys are refused");
        assert!(parse_form("a=%zz").is_none());
        assert!(parse_form("a=%ff").is_none(), "not UTF-8");
        assert_eq!(
            cookie("x=1; pc_session=abc; y=2", "pc_session"),
            Some("abc")
        );
        assert_eq!(cookie("xpc_session=abc", "pc_session"), None);
        assert_eq!(
            esc("<a href=\"x\">'&"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
        assert_eq!(url_encode("a b/ü"), "a%20b%2F%C3%BC");
        assert_eq!(url_decode(&url_encode("a b/ü&=")).unwrap(), "a b/ü&=");
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
