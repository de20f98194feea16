//! The session's client encoding is pinned to UTF-8: every statement is
//! parsed here as UTF-8, so the server must decode the agent's bytes the
//! same way. Under a client-only encoding (GBK, BIG5, SJIS, ...) a
//! multibyte character can swallow the backslash or quote that follows it,
//! and the server then reads statements this parser never saw.
//!
//! This module owns the startup-side checks: the agent's `client_encoding`
//! and any `options` entry that would set it. Statements that change it
//! (`SET client_encoding`, `SET NAMES`, `set_config('client_encoding', ..)`)
//! are refused by [`super::classify`]; a server `ParameterStatus` that
//! reports another encoding ends the session (backend half).

/// The encoding the upstream session is pinned to.
pub const PINNED: &str = "UTF8";

/// The server's normalisation of an encoding name (`clean_encoding_name`
/// in PostgreSQL's encnames.c): non-alphanumerics dropped, lower case.
fn clean(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Whether `name` is a spelling the server takes for UTF-8 (`UTF8`,
/// `utf-8`, `Unicode`, ...).
pub fn is_utf8(name: &str) -> bool {
    matches!(clean(name).as_str(), "utf8" | "unicode")
}

/// Whether the agent may declare `name` at startup: UTF-8, or `SQL_ASCII`
/// (what psql sends from a terminal in the C locale). The upstream is
/// pinned to UTF8 either way, and the frontend refuses any statement that
/// is not valid UTF-8, so a `SQL_ASCII` agent's bytes reach the server as
/// the UTF-8 this parser read; only the client-only multibyte encodings
/// (GBK, BIG5, SJIS, ...) and the server-side ones that would be converted
/// (LATIN1, ...) are refused.
pub fn agent_may_declare(name: &str) -> bool {
    is_utf8(name) || clean(name) == "sqlascii"
}

/// A GUC name as the server compares it: case-insensitive, and on the
/// command line (`options`) `-` is read as `_`.
fn guc_name(name: &str) -> String {
    name.trim()
        .chars()
        .map(|c| match c {
            '-' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// Whether a startup-packet key names the `client_encoding` setting
/// (the server looks startup keys up case-insensitively).
pub fn is_client_encoding_key(key: &str) -> bool {
    guc_name(key) == "client_encoding"
}

/// Splits an `options` value the way the server does (`pg_split_opts`):
/// on unescaped whitespace, a backslash taking the next character
/// literally.
pub fn split_options(options: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// Why the agent's startup packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupRefusal {
    /// A non-UTF-8 `client_encoding` startup parameter.
    #[error("client_encoding {0:?} is not allowed through Portcullis: only UTF8 is (statements are decided as UTF-8, and a client-side encoding such as GBK or SJIS can make the server read other statements than were decided)")]
    Encoding(String),
    /// An `options` entry that would set `client_encoding`.
    #[error("the startup options may not set client_encoding ({0:?}): the session is pinned to UTF8 so the server reads statements as Portcullis decided them")]
    Options(String),
}

/// Checks the agent's startup parameters: `client_encoding` (under any key
/// spelling) must be UTF-8 or absent, and `options` may not touch
/// `client_encoding` in any form the server accepts (`-c name=value`,
/// `-cname=value`, `--name=value`, `-` for `_`, any case, backslash
/// escapes). Any options token mentioning it is refused, whatever switch
/// carries it.
pub fn check_startup(params: &[(String, String)]) -> Result<(), StartupRefusal> {
    for (k, v) in params {
        if is_client_encoding_key(k) && !agent_may_declare(v) {
            return Err(StartupRefusal::Encoding(v.clone()));
        }
        if k == "options" {
            for token in split_options(v) {
                // Whatever switch carries it (`-c x`, `-cx`, `--x`), the
                // token names the setting: `-` read as `_`, any case.
                if guc_name(&token).contains("client_encoding") {
                    return Err(StartupRefusal::Options(v.clone()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(k: &str, v: &str) -> Vec<(String, String)> {
        vec![(k.to_string(), v.to_string())]
    }

    #[test]
    fn utf8_spellings() {
        for n in ["UTF8", "utf8", "UTF-8", "utf_8", "Unicode", " UTF 8 "] {
            assert!(is_utf8(n), "{n}");
        }
        for n in ["GBK", "SJIS", "BIG5", "LATIN1", "SQL_ASCII", "utf16", ""] {
            assert!(!is_utf8(n), "{n}");
        }
    }

    #[test]
    fn sql_ascii_may_be_declared_but_not_gbk() {
        assert!(check_startup(&p("client_encoding", "SQL_ASCII")).is_ok());
        assert!(check_startup(&p("client_encoding", "sql-ascii")).is_ok());
        for n in ["GBK", "SJIS", "BIG5", "LATIN1", "GB18030", "UHC"] {
            assert!(check_startup(&p("client_encoding", n)).is_err(), "{n}");
        }
    }

    #[test]
    fn startup_encoding_must_be_utf8() {
        assert!(check_startup(&p("client_encoding", "UTF8")).is_ok());
        assert!(check_startup(&p("client_encoding", "utf-8")).is_ok());
        assert!(check_startup(&[]).is_ok());
        assert_eq!(
            check_startup(&p("client_encoding", "GBK")),
            Err(StartupRefusal::Encoding("GBK".into()))
        );
        // The server finds startup keys case-insensitively.
        assert!(check_startup(&p("CLIENT_ENCODING", "sjis")).is_err());
    }

    #[test]
    fn options_cannot_set_the_encoding() {
        for o in [
            "-c client_encoding=GBK",
            "-cclient_encoding=GBK",
            "--client_encoding=GBK",
            "--client-encoding=GBK",
            "-c client-encoding=GBK",
            "-c CLIENT_ENCODING=GBK",
            "-c search_path=x -c client_encoding=UTF8",
            "-c client\\_encoding=GBK",
            "-c\\ client_encoding=GBK",
            "-c application_name=a\\ b --client_encoding=BIG5",
        ] {
            assert!(
                matches!(
                    check_startup(&p("options", o)),
                    Err(StartupRefusal::Options(_))
                ),
                "{o}"
            );
        }
        for o in [
            "-c search_path=app",
            "--statement_timeout=5s -c application_name=x\\ y",
            "",
        ] {
            assert!(check_startup(&p("options", o)).is_ok(), "{o}");
        }
    }

    #[test]
    fn options_split_like_the_server() {
        assert_eq!(
            split_options("-c a=b\\ c  --d=e\\\\"),
            ["-c", "a=b c", "--d=e\\"]
        );
        assert!(split_options("   ").is_empty());
    }
}
