//! Rendering helpers of the console's pages that read recorded or agent
//! text: SQL highlighting (a small lexer, no JavaScript), pretty JSON, and
//! an MCP session's `mcp.jsonl` as a table.
//!
//! Owns turning that text into HTML; every piece of it is escaped before
//! any markup is added. It must not decide anything: the highlighter is for
//! the eye only (the PostgreSQL handler's own parser decides statements).

use std::path::Path;

use serde_json::Value;

use super::web::esc;

/// The recording of an MCP session, in its session directory.
pub const MCP_FILE: &str = "mcp.jsonl";

/// Largest `mcp.jsonl` the replay page reads (a bigger one is cut, and the
/// page says so).
const MCP_MAX_BYTES: usize = 8 * 1024 * 1024;
/// Most lines shown.
const MCP_MAX_LINES: usize = 2000;

/// Words shown as keywords. Not PostgreSQL's full list: enough that a
/// reviewer sees a statement's shape at a glance.
const KEYWORDS: &[&str] = &[
    "ABORT",
    "ALL",
    "ALTER",
    "ANALYZE",
    "AND",
    "ANY",
    "AS",
    "ASC",
    "BEGIN",
    "BETWEEN",
    "BY",
    "CALL",
    "CASCADE",
    "CASE",
    "CAST",
    "CHECK",
    "COLUMN",
    "COMMIT",
    "CONFLICT",
    "CONSTRAINT",
    "COPY",
    "CREATE",
    "CROSS",
    "CURRENT_DATE",
    "CURRENT_TIMESTAMP",
    "CURRENT_USER",
    "DATABASE",
    "DEALLOCATE",
    "DECLARE",
    "DEFAULT",
    "DELETE",
    "DESC",
    "DISTINCT",
    "DO",
    "DROP",
    "ELSE",
    "END",
    "EXCEPT",
    "EXECUTE",
    "EXISTS",
    "EXPLAIN",
    "FALSE",
    "FETCH",
    "FOR",
    "FOREIGN",
    "FROM",
    "FULL",
    "FUNCTION",
    "GRANT",
    "GROUP",
    "HAVING",
    "ILIKE",
    "IN",
    "INDEX",
    "INNER",
    "INSERT",
    "INTERSECT",
    "INTO",
    "IS",
    "JOIN",
    "KEY",
    "LEFT",
    "LIKE",
    "LIMIT",
    "LISTEN",
    "LOCK",
    "NATURAL",
    "NOT",
    "NOTHING",
    "NOTIFY",
    "NULL",
    "OFFSET",
    "ON",
    "ONLY",
    "OR",
    "ORDER",
    "OUTER",
    "OVER",
    "PARTITION",
    "PREPARE",
    "PRIMARY",
    "REFERENCES",
    "RELEASE",
    "RETURNING",
    "REVOKE",
    "RIGHT",
    "ROLE",
    "ROLLBACK",
    "SAVEPOINT",
    "SCHEMA",
    "SELECT",
    "SEQUENCE",
    "SESSION",
    "SET",
    "SHOW",
    "TABLE",
    "TEMP",
    "TEMPORARY",
    "THEN",
    "TO",
    "TRANSACTION",
    "TRIGGER",
    "TRUE",
    "TRUNCATE",
    "UNION",
    "UNIQUE",
    "UPDATE",
    "USER",
    "USING",
    "VACUUM",
    "VALUES",
    "VIEW",
    "WHEN",
    "WHERE",
    "WINDOW",
    "WITH",
];

fn is_keyword(word: &str) -> bool {
    let up = word.to_ascii_uppercase();
    KEYWORDS.binary_search(&up.as_str()).is_ok()
}

fn span(out: &mut String, class: &str, text: &str) {
    out.push_str("<span class=");
    out.push_str(class);
    out.push('>');
    out.push_str(&esc(text));
    out.push_str("</span>");
}

/// The end (byte index) of a quoted run starting at `start` (the opening
/// quote `q`); a doubled quote stays inside; `backslash`: `\` escapes the
/// next character (E'' strings). Unterminated: the end of the text.
fn quoted_end(s: &str, start: usize, q: u8, backslash: bool) -> usize {
    let b = s.as_bytes();
    let mut i = start + 1;
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// The dollar-quote tag starting at `i` (`$$` or `$tag$`), if one does.
fn dollar_tag(s: &str, i: usize) -> Option<&str> {
    let rest = &s[i + 1..];
    let end = rest.find('$')?;
    let tag = &rest[..end];
    let ok = tag
        .chars()
        .enumerate()
        .all(|(n, c)| c == '_' || c.is_alphabetic() || (n > 0 && c.is_ascii_digit()));
    ok.then(|| &s[i..i + end + 2])
}

/// `sql` as HTML: keywords, strings, numbers, comments and parameters in
/// `<span class=k|s|n|c|p>`; the rest escaped as is. Stripping the tags and
/// unescaping gives `sql` back, byte for byte.
pub fn sql(sql: &str) -> String {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() * 2);
    let mut i = 0;
    // Start of a run of plain text not yet written.
    let mut plain = 0;
    macro_rules! flush {
        () => {
            if plain < i {
                out.push_str(&esc(&sql[plain..i]));
            }
        };
    }
    while i < b.len() {
        let c = b[i];
        let (class, end) = if c == b'-' && b.get(i + 1) == Some(&b'-') {
            ("c", sql[i..].find('\n').map_or(b.len(), |n| i + n))
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            // Block comments nest in PostgreSQL.
            let mut depth = 0usize;
            let mut j = i;
            let mut end = b.len();
            while j + 1 < b.len() {
                if b[j] == b'/' && b[j + 1] == b'*' {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b[j + 1] == b'/' {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        end = j;
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            ("c", end)
        } else if c == b'\'' {
            ("s", quoted_end(sql, i, b'\'', false))
        } else if (c == b'E' || c == b'e')
            && b.get(i + 1) == Some(&b'\'')
            && (i == 0 || !is_word_byte(b[i - 1]))
        {
            ("s", quoted_end(sql, i + 1, b'\'', true))
        } else if c == b'"' {
            // A quoted identifier: plain text, never a keyword.
            ("", quoted_end(sql, i, b'"', false))
        } else if c == b'$' && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            ("p", j)
        } else if c == b'$' && (i == 0 || !is_word_byte(b[i - 1])) && dollar_tag(sql, i).is_some() {
            let tag = dollar_tag(sql, i).unwrap_or("$$");
            let body = i + tag.len();
            (
                "s",
                sql[body..]
                    .find(tag)
                    .map_or(b.len(), |n| body + n + tag.len()),
            )
        } else if c.is_ascii_digit() && (i == 0 || !is_word_byte(b[i - 1])) {
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'.' || b[j] == b'_') {
                j += 1;
            }
            ("n", j)
        } else if is_word_byte(c) {
            let mut j = i;
            while j < b.len() && (is_word_byte(b[j]) || b[j] == b'$') {
                j += 1;
            }
            (if is_keyword(&sql[i..j]) { "k" } else { "" }, j)
        } else {
            i += utf8_len(c);
            continue;
        };
        if class.is_empty() {
            i = end;
            continue;
        }
        flush!();
        span(&mut out, class, &sql[i..end]);
        i = end;
        plain = end;
    }
    flush!();
    out
}

fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// `v` pretty-printed and escaped (for a `<pre>`).
pub fn json(v: &Value) -> String {
    esc(&serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()))
}

/// An MCP session's `mcp.jsonl` as an HTML table: time, direction,
/// method/tool, id, decision (and rule), the message pretty-printed. A
/// line torn by a crash (no final newline) is left out; a line that is not
/// JSON is shown as such, never dropped silently.
pub fn mcp_log(path: &Path, started_ms: u64) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    let cut = bytes.len() > MCP_MAX_BYTES;
    let bytes = &bytes[..bytes.len().min(MCP_MAX_BYTES)];
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut out = String::from(
        "<table class=mcp><tr><th>Time</th><th>Direction</th><th>Method / tool</th><th>Id</th><th>Decision</th><th>Message</th></tr>",
    );
    let mut shown = 0;
    for (n, line) in bytes[..end].split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        if shown == MCP_MAX_LINES {
            out.push_str(&format!(
                "<tr><td colspan=6 class=bad>Only the first {MCP_MAX_LINES} messages are shown.</td></tr>"
            ));
            break;
        }
        shown += 1;
        let v: Value = match serde_json::from_slice(line) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                out.push_str(&format!(
                    "<tr><td colspan=6 class=bad>line {}: not a JSON object</td></tr>",
                    n + 1
                ));
                continue;
            }
        };
        let s = |k: &str| v[k].as_str().unwrap_or("");
        let time = match v["t_ms"].as_u64() {
            // An absolute time (ms since the epoch), or ms since the start.
            Some(t) if t > 1_000_000_000_000 => crate::audit::rfc3339_ms_string(t),
            Some(t) => format!(
                "+{:.3}s <span class=small>({})</span>",
                t as f64 / 1000.0,
                crate::audit::rfc3339_ms_string(started_ms + t)
            ),
            None => String::new(),
        };
        let dir = match s("from") {
            "agent" => "agent → server".to_string(),
            "server" => "server → agent".to_string(),
            other => esc(other),
        };
        let what = match (s("method"), s("tool")) {
            ("", "") => String::new(),
            (m, "") => format!("<code>{}</code>", esc(m)),
            (m, t) => format!("<code>{}</code> <b>{}</b>", esc(m), esc(t)),
        };
        let id = match &v["id"] {
            Value::Null => String::new(),
            Value::String(x) => esc(x),
            other => esc(&other.to_string()),
        };
        let decision = match s("decision") {
            "" => String::new(),
            d => format!(
                "<span class={}>{}</span>{}",
                if d == "allow" { "ok" } else { "bad" },
                esc(d),
                match s("rule") {
                    "" => String::new(),
                    r => format!(" <span class=small>({})</span>", esc(r)),
                }
            ),
        };
        out.push_str(&format!(
            "<tr><td>{time}</td><td>{dir}</td><td>{what}</td><td>{id}</td><td>{decision}</td><td><pre class=json>{}</pre></td></tr>",
            json(&v["message"])
        ));
    }
    out.push_str("</table>");
    if cut {
        out.push_str(&format!(
            "<p class=bad>The recording is larger than {} MiB; only its start is shown.</p>",
            MCP_MAX_BYTES >> 20
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhtml(s: &str) -> String {
        let mut out = String::new();
        let mut in_tag = false;
        for c in s.chars() {
            match c {
                '<' => in_tag = true,
                '>' if in_tag => in_tag = false,
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        out.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&amp;", "&")
    }

    #[test]
    fn keywords_are_keywords_only_outside_strings_identifiers_and_comments() {
        assert!(
            KEYWORDS.windows(2).all(|w| w[0] < w[1]),
            "sorted for binary search"
        );
        let q = "update orders set state = 'select <b>' where id = 2 -- delete\n";
        let h = sql(q);
        assert_eq!(
            h,
            "<span class=k>update</span> orders <span class=k>set</span> state = \
             <span class=s>&#39;select &lt;b&gt;&#39;</span> <span class=k>where</span> id = \
             <span class=n>2</span> <span class=c>-- delete</span>\n"
        );
        let h = sql("select \"from\", $1, E'it\\'s', $f$ drop $f$ /* a /* nested */ b */ x1");
        assert!(h.contains(" &quot;from&quot;,"), "{h}");
        assert!(!h.contains("<span class=k>from"), "{h}");
        assert!(h.contains("<span class=p>$1</span>"), "{h}");
        assert!(
            h.contains("<span class=s>E&#39;it\\&#39;s&#39;</span>"),
            "{h}"
        );
        assert!(h.contains("<span class=s>$f$ drop $f$</span>"), "{h}");
        assert!(
            h.contains("<span class=c>/* a /* nested */ b */</span>"),
            "{h}"
        );
        assert!(h.ends_with(" x1"), "{h}");
    }

    #[test]
    fn highlighting_is_lossless_and_escapes_everything() {
        for q in [
            "select 1",
            "SELECT * FROM t WHERE a < 3 AND b > 'x</span><script>'",
            "insert into t values ('unterminated",
            "/* unterminated comment",
            "select $$ unterminated",
            "select 'ü', \"Ö\" from ünïcode_tåble where x = 1e10 and y = 0x1F",
            "select a$1, $1x, e'', 3.14::numeric, -- c",
            "",
            "'",
            "$",
            "$a",
            "--",
            "/*/",
        ] {
            let h = sql(q);
            assert_eq!(unhtml(&h), q, "{h}");
            assert!(!h.contains("<script"), "{h}");
            let without_spans = h
                .replace("</span>", "")
                .replace("<span class=k>", "")
                .replace("<span class=s>", "")
                .replace("<span class=n>", "")
                .replace("<span class=c>", "")
                .replace("<span class=p>", "");
            assert!(
                !without_spans.contains('<') && !without_spans.contains('>'),
                "{h}"
            );
        }
    }

    #[test]
    fn an_mcp_recording_renders_every_message_escaped() {
        let dir =
            std::env::temp_dir().join(format!("portcullis-mcp-render-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(MCP_FILE);
        let lines = [
            serde_json::json!({"t_ms": 12, "from": "agent", "id": 1, "method": "tools/call",
                "tool": "delete_rows", "decision": "deny", "rule": "no-deletes",
                "message": {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": "delete_rows", "arguments": {"table": "</pre><script>x</script>"}}}}),
            serde_json::json!({"t_ms": 20, "from": "server", "id": 1,
                "message": {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}}),
            serde_json::json!({"t_ms": 30, "from": "agent", "id": "a", "method": "tools/call",
                "tool": "read", "decision": "allow",
                "message": {"argument_names": ["path"], "arguments_digest": "sha256:ab"}}),
        ];
        let mut text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        text.push_str("not json\n");
        text.push_str("{\"t_ms\": 40, \"from\": \"agent\""); // torn by a crash
        std::fs::write(&p, text).unwrap();
        let h = mcp_log(&p, 1_700_000_000_000).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(h.matches("<tr>").count(), 1 + 4, "{h}");
        assert!(h.contains("+0.012s"), "{h}");
        assert!(
            h.contains("agent → server") && h.contains("server → agent"),
            "{h}"
        );
        assert!(
            h.contains("<code>tools/call</code> <b>delete_rows</b>"),
            "{h}"
        );
        assert!(
            h.contains("<span class=bad>deny</span> <span class=small>(no-deletes)</span>"),
            "{h}"
        );
        assert!(h.contains("<span class=ok>allow</span>"), "{h}");
        // Pretty-printed (one key per line) and escaped.
        assert!(
            h.contains("\n  &quot;jsonrpc&quot;: &quot;2.0&quot;,\n"),
            "{h}"
        );
        assert!(h.contains("&lt;/pre&gt;&lt;script&gt;"), "{h}");
        assert!(!h.contains("<script>"), "{h}");
        assert!(h.contains("arguments_digest"), "metadata mode: {h}");
        assert!(h.contains("line 4: not a JSON object"), "{h}");
        assert!(
            !h.contains("\"t_ms\": 40") && !h.contains("+0.040s"),
            "torn line left out: {h}"
        );
    }
}
