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

/// Whether `node` is exactly pg_dump's settings probe (pg_dump 12.20,
/// 13.16, 14.13, 15.8, 16.4, 17 and later send it at connect time):
///
/// `SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings
/// WHERE name = 'restrict_nonsystem_relation_kind'`
///
/// Its setting name is a column, but the only rows are those whose name
/// equals the constant, so it sets that setting and no other; the
/// statement's shape is matched whole (one target, one relation, one
/// equality on `name`, nothing else), and the constant must not name
/// `client_encoding`. A user-defined `=` or a relation shadowing
/// `pg_settings` would need DDL, and the statement's operators are still
/// judged by the catalog (`postgres:function`); a server that reports
/// another encoding anyway ends the session.
pub fn is_settings_probe(node: &pg_query::NodeEnum) -> bool {
    use pg_query::{protobuf::AExprKind, NodeEnum as N};
    let N::SelectStmt(s) = node else { return false };
    let only_name = |n: Option<&pg_query::protobuf::Node>| {
        matches!(n.and_then(|n| n.node.as_ref()), Some(N::ColumnRef(c))
            if c.fields.len() == 1
                && matches!(c.fields[0].node.as_ref(), Some(N::String(f)) if f.sval == "name"))
    };
    let constant = |n: Option<&pg_query::protobuf::Node>| {
        matches!(n.and_then(|n| n.node.as_ref()), Some(N::AConst(_)))
    };
    let simple = s.with_clause.is_none()
        && s.into_clause.is_none()
        && s.distinct_clause.is_empty()
        && s.group_clause.is_empty()
        && s.having_clause.is_none()
        && s.window_clause.is_empty()
        && s.values_lists.is_empty()
        && s.sort_clause.is_empty()
        && s.limit_offset.is_none()
        && s.limit_count.is_none()
        && s.locking_clause.is_empty()
        && s.larg.is_none()
        && s.rarg.is_none()
        && s.target_list.len() == 1
        && s.from_clause.len() == 1;
    if !simple {
        return false;
    }
    let from_settings = matches!(s.from_clause[0].node.as_ref(), Some(N::RangeVar(r))
        if r.relname == "pg_settings"
            && (r.schemaname.is_empty() || r.schemaname == "pg_catalog")
            && r.alias.is_none());
    let target = match s.target_list[0].node.as_ref() {
        Some(N::ResTarget(t)) => t.val.as_deref().and_then(|v| v.node.as_ref()),
        _ => None,
    };
    let call = matches!(target, Some(N::FuncCall(f))
        if f.args.len() == 3
            && only_name(f.args.first())
            && constant(f.args.get(1))
            && constant(f.args.get(2))
            && f.agg_filter.is_none()
            && f.over.is_none()
            && f.agg_order.is_empty()
            && !f.agg_star
            && !f.func_variadic
            && matches!(f.funcname.iter().map(|n| match n.node.as_ref() {
                Some(N::String(s)) => s.sval.as_str(),
                _ => "",
            }).collect::<Vec<_>>().as_slice(), ["set_config"] | ["pg_catalog", "set_config"]));
    let filter = match s.where_clause.as_deref().and_then(|w| w.node.as_ref()) {
        Some(N::AExpr(e))
            if e.kind == AExprKind::AexprOp as i32
                && e.name.len() == 1
                && matches!(e.name[0].node.as_ref(), Some(N::String(o)) if o.sval == "=") =>
        {
            let (l, r) = (e.lexpr.as_deref(), e.rexpr.as_deref());
            let value = if only_name(l) {
                r
            } else if only_name(r) {
                l
            } else {
                None
            };
            match value.and_then(|v| v.node.as_ref()) {
                Some(N::AConst(c)) => match &c.val {
                    Some(pg_query::protobuf::a_const::Val::Sval(v)) => {
                        !is_client_encoding_key(&v.sval)
                    }
                    _ => false,
                },
                _ => false,
            }
        }
        _ => false,
    };
    from_settings && call && filter
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

    #[test]
    fn only_pg_dumps_exact_settings_probe_passes() {
        let probe = |sql: &str| {
            let p = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).unwrap();
            let n = p.protobuf.stmts[0]
                .stmt
                .as_ref()
                .unwrap()
                .node
                .as_ref()
                .unwrap()
                .clone();
            is_settings_probe(&n)
        };
        assert!(probe("SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'"));
        assert!(!probe(
            "SELECT set_config(name, 'GBK', false) FROM pg_settings WHERE name = 'client_encoding'"
        ));
        assert!(!probe(
            "SELECT set_config(name, 'GBK', false) FROM pg_settings WHERE name like 'client%'"
        ));
        assert!(!probe(
            "SELECT set_config(name, 'GBK', false) FROM pg_settings"
        ));
        assert!(!probe(
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'a' OR true"
        ));
        assert!(!probe(
            "SELECT set_config(name, 'x', false) FROM other WHERE name = 'a'"
        ));
        assert!(!probe("SELECT set_config(name, 'x', false), set_config('client_encoding', 'GBK', false) FROM pg_settings WHERE name = 'a'"));
        assert!(!probe(
            "SELECT (SELECT set_config(name, 'x', false) FROM t) FROM pg_settings WHERE name = 'a'"
        ));
    }
}
