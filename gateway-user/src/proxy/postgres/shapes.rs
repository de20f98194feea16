//! A session's memo of classifications by statement shape: a query string
//! that differs from one this session already classified only in its
//! constants (`... WHERE aid = 12345` after `... WHERE aid = 678`) gets the
//! same classification without being parsed, fingerprinted and normalized
//! again (pgbench `-M simple` and ORMs that inline literals send a new
//! text per statement).
//!
//! The key is the string as PostgreSQL's lexer reads it, with each
//! integer, decimal and string constant (`ICONST`, `FCONST`, `SCONST`)
//! replaced by its kind ([`key`]): two strings with one key are the same
//! bytes outside those constants, and the same tokens but for the
//! constants' values. Only strings without `$` (no parameter references,
//! no dollar quoting) and without a backslash (no second reading under
//! standard_conforming_strings) are looked up. The parser's reductions
//! depend on the tokens' kinds, not on their values, so two such strings
//! take the same grammar rules; where a rule makes an `A_Const` of a
//! constant in one, it does in the other. A classification is remembered
//! only when every constant of its string is one (its normalized text,
//! pg_query's text with each `A_Const` replaced by `$n`, holds no
//! constant token): a constant read for something else (a type's
//! precision as in `float(10)`, a position in `ORDER BY 1`) is kept in
//! the normalized text and the fingerprint, so strings that differ in it
//! are not one shape here. For the others, the parse trees differ only in
//! the `A_Const` values: the normalized text and the fingerprint (which
//! ignores those values) are the same for every string of the shape, and
//! the key is had from the lexer alone, without a parse. (A sign is a
//! token of its own: `b = -1`, a constant, and `b = -'1'`, the prefix
//! operator `-`, which a user may define, applied to a string, differ in
//! the constant's kind; pg_query's normalized text folds the sign into
//! the constant and read them alike.) Only classifications that cannot
//! depend on a constant's value are remembered: one plain SELECT, INSERT,
//! UPDATE or DELETE that calls no function (the classification reads a
//! constant only as `set_config`'s setting name). Nothing here depends on
//! session state (the search path, the catalog, the policy): the verdicts
//! that do are made after classification, per statement, as before.
//!
//! Owns the memo and the token key (which the session's memo of masking
//! analyses, [`super::analyses`], keys by too); it must not decide
//! anything or read the masking analysis's input (which reads constants,
//! e.g. `DISTINCT ON (1)`): a statement classified from here carries no
//! parse, and the masking analysis parses its text itself unless its own
//! memo holds the analysis.

use std::{collections::HashMap, fmt::Write as _};

use pg_query::protobuf::Token;

use super::classify::Classified;

/// Shapes remembered per session.
const SHAPES_MAX: usize = 32;
/// Longest query string looked up (a session's memo stays within a few
/// tens of KiB).
const SHAPE_TEXT_MAX: usize = 1024;

/// The memo (one per session): by key, the classification of the string
/// that made the entry, without its text and parse.
#[derive(Debug, Default)]
pub(super) struct Shapes {
    map: HashMap<String, Classified>,
}

/// The statement's text when a string is one statement: the string but for
/// the whitespace around it and a final `;` (the bytes cut off hold no
/// constant, and no comment that could hold the text again).
fn body(sql: &str) -> &str {
    let trimmed = sql.trim();
    trimmed
        .strip_suffix(';')
        .map(str::trim_end)
        .unwrap_or(trimmed)
}

/// The key of `sql` when it may be looked up (see the module doc).
pub(super) fn key(sql: &str) -> Option<String> {
    if sql.len() > SHAPE_TEXT_MAX || sql.contains(['$', '\\', '\0']) {
        return None;
    }
    // Not worth lexing what cannot be remembered (a cost, not a
    // safeguard: what is remembered is judged on the classification).
    let first = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or_default();
    if ![
        "select", "insert", "update", "delete", "with", "values", "table",
    ]
    .iter()
    .any(|w| first.eq_ignore_ascii_case(w))
    {
        return None;
    }
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let mut key = String::with_capacity(sql.len() + 8);
    let mut at = 0;
    for t in tokens.iter().filter(|t| is_constant(t.token)) {
        let (start, end) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
        key.push_str(sql.get(at..start)?);
        // A NUL, which the string holds nowhere, around the kind.
        let _ = write!(key, "\0{}\0", t.token);
        at = end;
    }
    key.push_str(sql.get(at..)?);
    Some(key)
}

/// Whether a token of this kind is an integer, decimal or string constant.
fn is_constant(token: i32) -> bool {
    [Token::Iconst, Token::Fconst, Token::Sconst]
        .iter()
        .any(|k| *k as i32 == token)
}

/// Whether `normalized` (pg_query's normalized text) holds a constant
/// that the normalization kept: one the grammar read for something else
/// than a value (see the module doc). A text the lexer rejects counts as
/// holding one.
fn keeps_a_constant(normalized: &str) -> bool {
    pg_query::scan_tokens(normalized)
        .map_or(true, |tokens| tokens.iter().any(|t| is_constant(t.token)))
}

/// `sql`'s tokens as PostgreSQL's lexer reads them (`pg_query::scan_tokens`
/// runs the scanner the parser calls, comments included): each token's
/// kind, then its text unless it is an integer, decimal or string constant
/// (`ICONST`, `FCONST`, `SCONST`), each token ended by a NUL (which no text
/// holds). Two texts with one token key are one token sequence but for the
/// values of those constants. `None` for a text the lexer rejects, or with
/// a backslash or a NUL.
pub(super) fn token_key(sql: &str) -> Option<String> {
    if sql.contains(['\\', '\0']) {
        return None;
    }
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let mut key = String::with_capacity(sql.len() + 4 * tokens.len());
    for t in &tokens {
        let _ = write!(key, "{}:", t.token);
        if !is_constant(t.token) {
            let (start, end) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
            key.push_str(sql.get(start..end)?);
        }
        key.push('\0');
    }
    Some(key)
}

/// Whether a classification holds for every string of its shape.
fn holds_for_shape(c: &Classified) -> bool {
    matches!(c.parsed_class, "select" | "insert" | "update" | "delete")
        && c.class == c.parsed_class
        && !c.rollback
        && c.sql_prepare.is_none()
        && c.sql_execute.is_none()
        && c.functions.is_empty()
        && c.refs.functions.is_empty()
        && c.refs.unresolvable.is_empty()
        && c.volatile_functions.is_empty()
        && !c.user_routines
}

impl Shapes {
    /// The classification of `sql`, whose key is `key`, if its shape is
    /// remembered.
    pub(super) fn get(&self, key: &str, sql: &str) -> Option<Vec<Classified>> {
        let mut c = self.map.get(key)?.clone();
        c.text = body(sql).to_string();
        Some(vec![c])
    }

    /// Remembers the classification `list` of `sql` (key `key`) when it
    /// holds for its whole shape.
    pub(super) fn insert(&mut self, key: String, sql: &str, list: &[Classified]) {
        let [c] = list else { return };
        if !holds_for_shape(c) {
            return;
        }
        // Only when the parser's text for the statement is the string's
        // body: then every string of the shape has its body as its text.
        if body(sql) != c.text {
            return;
        }
        // Only when every constant is a value: then every string of the
        // shape has this normalized text and fingerprint.
        if keeps_a_constant(&c.normalized) {
            return;
        }
        if self.map.len() >= SHAPES_MAX {
            self.map.clear();
        }
        let mut classified = c.clone();
        classified.parsed = None;
        classified.text = String::new();
        self.map.insert(key, classified);
    }
}

/// Test corpora of texts of one shape (shared with [`super::analyses`]).
#[cfg(test)]
mod family {
    use pg_query::protobuf::Token;

    /// Literals of every kind the lexer knows, and some that are two
    /// tokens (a sign and a constant).
    const LITERALS: &[&str] = &[
        "0",
        "1",
        "2",
        "3",
        "-1",
        "- 2",
        "12345",
        "2147483648",
        "1.5",
        "2e3",
        "0x1f",
        "'x'",
        "''",
        "'it''s'",
        "'ssn'",
        "-'a'",
        "e'q'",
        "$$d$$",
        "true",
        "null",
        "b'1'",
        "x'ff'",
        "(1)",
    ];

    /// `sql` with the constant token at `span` replaced by `lit`.
    fn replaced(sql: &str, span: (usize, usize), lit: &str) -> String {
        format!("{}{lit}{}", &sql[..span.0], &sql[span.1..])
    }

    fn constant_spans(sql: &str) -> Vec<(usize, usize)> {
        pg_query::scan_tokens(sql)
            .unwrap()
            .iter()
            .filter(|t| {
                [Token::Iconst, Token::Fconst, Token::Sconst]
                    .iter()
                    .any(|k| *k as i32 == t.token)
            })
            .map(|t| (t.start as usize, t.end as usize))
            .collect()
    }

    /// Every text of `sql`'s family: each constant replaced by each
    /// literal, one at a time and all at once.
    pub(in crate::proxy::postgres) fn constant_family(sql: &str) -> Vec<String> {
        let spans = constant_spans(sql);
        let mut out = vec![sql.to_string()];
        for lit in LITERALS {
            for span in &spans {
                out.push(replaced(sql, *span, lit));
            }
            let mut all = sql.to_string();
            for span in spans.iter().rev() {
                all = replaced(&all, *span, lit);
            }
            out.push(all);
        }
        out
    }
}
#[cfg(test)]
pub(super) use family::constant_family;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::postgres::classify::classify;

    /// Classifies each string through a fresh memo after the first of its
    /// group, and checks the memo's answer against the parser's.
    fn agree(groups: &[&[&str]]) -> usize {
        let mut hits = 0;
        for group in groups {
            let mut memo = Shapes::default();
            for sql in group.iter() {
                let fresh = classify(sql).unwrap();
                let Some(k) = key(sql) else { continue };
                match memo.get(&k, sql) {
                    Some(got) => {
                        hits += 1;
                        let mut want = fresh.clone();
                        want.iter_mut().for_each(|c| c.parsed = None);
                        assert_eq!(got, want, "{sql}");
                        // Field by field: `Parsed` compares equal always.
                        assert_eq!(got[0].text, want[0].text, "{sql}");
                        assert_eq!(got[0].fingerprint, want[0].fingerprint, "{sql}");
                        assert_eq!(got[0].normalized, want[0].normalized, "{sql}");
                        assert_eq!(got[0].context(), want[0].context(), "{sql}");
                    }
                    None => memo.insert(k, sql, &fresh),
                }
            }
        }
        hits
    }

    #[test]
    fn strings_of_one_shape_classify_alike() {
        let hits = agree(&[
            &[
                "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 'x';",
                "SELECT abalance FROM pgbench_accounts WHERE aid = -3.5e2;",
                "SELECT abalance FROM pgbench_accounts WHERE aid = NULL;",
                // Constants of one kind share a shape; other kinds (and a
                // sign before one) do not (see
                // `a_sign_before_another_kind_of_constant_is_another_shape`).
                "SELECT abalance FROM pgbench_accounts WHERE aid = 'y';",
                "SELECT abalance FROM pgbench_accounts WHERE aid = -4.5e1;",
                "SELECT abalance FROM pgbench_accounts WHERE aid = NULL;",
            ],
            &[
                "UPDATE pgbench_accounts SET abalance = abalance + -4187 WHERE aid = 53;",
                "UPDATE pgbench_accounts SET abalance = abalance + 12 WHERE aid = 99999;",
                "UPDATE pgbench_accounts SET abalance = abalance + -1 WHERE aid = 7;",
            ],
            &[
                "  insert into h (tid, bid, aid, delta, mtime) values (1, 2, 3, -4, CURRENT_TIMESTAMP)  ",
                "  insert into h (tid, bid, aid, delta, mtime) values (10, 20, 30, 40, CURRENT_TIMESTAMP)  ",
                "  insert into h (tid, bid, aid, delta, mtime) values (5, 6, 7, -8, CURRENT_TIMESTAMP)  ",
            ],
            &[
                "with d as (delete from o where id = 1 returning 1) delete from o where id = 2",
                "with d as (delete from o where id = 3 returning 1) delete from o where id = 4",
            ],
            &[
                "select a, b from t where x = 'it''s' and y in (1, 2, 3) order by a limit 10",
                "select a, b from t where x = 'other' and y in (4, 5, 6) order by a limit 20",
            ],
            &[
                "select 'x'::public.dom, b'101', x'ff' from t /* a comment */ where a > 1.5",
                "select 'y'::public.dom, b'111', x'00' from t /* a comment */ where a > 2",
                "select 'z'::public.dom, b'101', x'ff' from t /* a comment */ where a > 2.5",
            ],
        ]);
        assert_eq!(hits, 9);
    }

    #[test]
    fn families_of_constants_classify_alike() {
        let mut hits = 0;
        let extra = [
            "select set_config('search_path', 'x', false)",
            "select upper('a'), 1 from t where b = 2",
            "select a from t where b = 1 and c = 'x' for update",
            "delete from t where a = 1 returning a, 'x'",
        ];
        for sql in crate::proxy::postgres::analyses::tests::CORPUS
            .iter()
            .chain(&extra)
        {
            // Only texts the parser takes (the others are refused before
            // any memo is asked).
            let family: Vec<String> = super::constant_family(sql)
                .into_iter()
                .filter(|s| classify(s).is_ok())
                .collect();
            let forward: Vec<&str> = family.iter().map(String::as_str).collect();
            let backward: Vec<&str> = forward.iter().rev().copied().collect();
            hits += agree(&[&forward]) + agree(&[&backward]);
        }
        assert!(hits > 500, "{hits}");
    }

    #[test]
    fn a_sign_before_another_kind_of_constant_is_another_shape() {
        // pg_query's normalized text folds a leading `-` into the
        // constant: `-1` (a constant) and `-'1'` (the prefix operator `-`
        // applied to a string) read alike there.
        let hits = agree(&[
            &[
                "select a from t where b = -1",
                "select a from t where b = -'1'",
                "select a from t where b = - 2.5",
                "select a from t where b = -'x'",
            ],
            &[
                "select a from t where b = -'1'",
                "select a from t where b = -1",
            ],
        ]);
        // Only `-'x'` after `-'1'`.
        assert_eq!(hits, 1);
    }

    #[test]
    fn a_constant_read_as_more_than_a_value_makes_no_shape() {
        // Positions in ORDER BY / GROUP BY, a float's precision (`float(10)`
        // is real, `float(30)` double precision), a time's precision and
        // an array's bounds are kept in the normalized text and the
        // fingerprint: no string with one is remembered, so none answers
        // for another.
        let groups: &[&[&str]] = &[
            &["select a from t order by 1", "select a from t order by 2"],
            &["select a from t group by 1", "select a from t group by 2"],
            &[
                "select a::float(10) from t where b = 1",
                "select a::float(30) from t where b = 1",
            ],
            &[
                "select current_timestamp(3) from t",
                "select current_timestamp(6) from t",
            ],
            &["select a::int[3] from t", "select a::int[4] from t"],
            &[
                "select a from t where b = 1 order by 1",
                "select a from t where b = 2 order by 2",
            ],
        ];
        assert_eq!(agree(groups), 0);
        for group in groups {
            let mut memo = Shapes::default();
            for sql in group.iter() {
                let k = key(sql).unwrap();
                memo.insert(k, sql, &classify(sql).unwrap());
            }
            assert!(memo.map.is_empty(), "{group:?}");
        }
        // The normalized texts do differ: one key for both would have
        // answered the second with the first's.
        let normalized = |sql: &str| classify(sql).unwrap()[0].normalized.clone();
        assert_ne!(
            normalized("select a::float(10) from t"),
            normalized("select a::float(30) from t")
        );
        assert_ne!(
            classify("select a::float(10) from t").unwrap()[0].fingerprint,
            classify("select a::float(30) from t").unwrap()[0].fingerprint
        );
    }

    #[test]
    fn different_shapes_get_different_keys() {
        assert_ne!(key("select a from t"), key("select b from t"));
        // The bytes between tokens are part of the shape (the normalized
        // text keeps them).
        assert_ne!(
            key("select a from t where b = 1"),
            key("select a  from t where b = 1")
        );
        assert_ne!(
            key("select a from t where b = 1 /* x */"),
            key("select a from t where b = 1 /* y */")
        );
        assert_ne!(key("select a from t;"), key("select a from t;;"));
        assert_eq!(
            key("select a from t where b = 1"),
            key("select a from t where b = 22")
        );
        assert_ne!(
            key("select a from t where b = 1"),
            key("select a from t where b = 'z'")
        );
    }

    #[test]
    fn only_what_holds_for_the_whole_shape_is_remembered() {
        let mut memo = Shapes::default();
        for sql in [
            // A constant that matters: set_config's setting name.
            "select set_config('search_path', 'x', false)",
            "select upper('a') from t",
            // Not a plain read or write.
            "set search_path = 'x'",
            "prepare p as select * from t where a = 1",
            "explain select * from t where a = 1",
            "select 1 into newt",
            "copy t to stdout",
            "begin",
            // Two statements.
            "select 1; select 2",
            // A comment after the final `;` is not part of the statement.
            "select 1; -- c",
        ] {
            if let Some(k) = key(sql) {
                memo.insert(k, sql, &classify(sql).unwrap());
            }
        }
        assert!(
            memo.map.is_empty(),
            "{:?}",
            memo.map.keys().collect::<Vec<_>>()
        );
        // Parameter references, dollar quoting and backslashes are never
        // looked up.
        for sql in [
            "select a from t where b = $1",
            "select $x$a$x$ from t",
            "select E'\\n' from t",
            "select 'a\\' from t",
        ] {
            assert_eq!(key(sql), None, "{sql}");
        }
        // A set_config whose setting name is another constant is refused.
        assert!(classify("select set_config('client_encoding', 'GBK', false)").is_err());
    }

    #[test]
    fn the_memo_is_bounded() {
        let mut memo = Shapes::default();
        for i in 0..(SHAPES_MAX * 3) {
            let sql = format!("select c{i} from t where a = 1");
            let k = key(&sql).unwrap();
            memo.insert(k.clone(), &sql, &classify(&sql).unwrap());
            assert!(memo.map.len() <= SHAPES_MAX);
            assert!(memo.get(&k, &sql.replace("= 1", "= 2")).is_some());
        }
        let long = format!("select a from t where b = '{}'", "x".repeat(SHAPE_TEXT_MAX));
        assert_eq!(key(&long), None);
    }
}
