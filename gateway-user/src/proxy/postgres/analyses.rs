//! A session's memo of masking analyses: the parse-tree analysis of one
//! statement ([`maskcheck::analyze`]) is a pure function of its text and
//! the resource's column rules, so a statement sent again (every
//! extended-protocol execution re-sends its Parse, whose classification
//! comes from the session's memo without a parse) is not parsed again for
//! it. The catalog checks that follow the analysis are made each time
//! ([`maskcheck::check_statement`]): they depend on the catalog.
//!
//! Statements that differ only in their constants (pgbench `-M simple`,
//! ORMs that inline literals) share an analysis by *shape* where that is
//! sound. The shape key is the statement's tokens as PostgreSQL's own
//! lexer reads them ([`shapes::token_key`]): each token's kind, and its
//! text except for integer, decimal and string constants (`ICONST`,
//! `FCONST`, `SCONST`), of which only the kind is kept. Two texts with one key are the same token sequence but
//! for the constants' values, so the parser makes the same reductions for
//! both and their trees differ only in what the grammar builds from those
//! values: the constants themselves (`A_Const`), a negated number's value,
//! type modifiers and options. The analysis reads none of these but a
//! position in ORDER BY, GROUP BY or DISTINCT ON; so an analysis is
//! remembered by shape only when it read no constant at all, and only for
//! one SELECT, INSERT, UPDATE or DELETE (where no constant becomes a name,
//! as a string does in some utility statements), and only an allowed one
//! (a refusal's reason is made again for each text). Texts with a
//! backslash (read two ways under `standard_conforming_strings`) or a NUL
//! are not looked up. A statement the parser would reject for a constant's
//! value (`float(0)`) is rejected by the server as well: callers pass the
//! text of a statement that was classified, so parsed, already.
//! (pg_query's normalized text is not this key: it folds a leading `-`
//! into the constant, so `-1` and `-'a'`, an `A_Const` and an operator
//! call, share one.)
//!
//! Owns the memo; it must not decide anything. It is emptied whenever the
//! rules it was made under differ from the ones asked with (a policy
//! reload that changes the column rules).

use std::collections::HashMap;

use super::{
    classify::Parsed,
    maskcheck::{self, Lookups, Rules},
    shapes,
};

/// Analyses remembered per session.
const ANALYSES_MAX: usize = 16;
/// Longest statement text remembered.
const ANALYSIS_TEXT_MAX: usize = 1024;
/// Shapes remembered per session.
const SHAPES_MAX: usize = 16;

/// The memo (one per session).
#[derive(Debug, Default)]
pub(super) struct Analyses {
    /// The rules every entry was made under.
    rules: Rules,
    map: HashMap<String, Result<Lookups, String>>,
    /// Allowed analyses that hold for their whole shape, by shape key.
    shapes: HashMap<String, Lookups>,
}

/// The shape key of `sql` (see the module doc), when it may be looked up.
pub(super) fn shape_key(sql: &str) -> Option<String> {
    if sql.len() > ANALYSIS_TEXT_MAX {
        return None;
    }
    shapes::token_key(sql)
}

impl Analyses {
    /// The analysis of `sql` (one statement; `parsed` its parse when at
    /// hand) under `rules`.
    pub(super) fn analyze(
        &mut self,
        sql: &str,
        parsed: Option<&Parsed>,
        rules: &Rules,
    ) -> Result<Lookups, String> {
        if self.rules != *rules {
            self.map.clear();
            self.shapes.clear();
            self.rules = rules.clone();
        }
        if let Some(r) = self.map.get(sql) {
            return r.clone();
        }
        let key = shape_key(sql);
        if let Some(l) = key.as_ref().and_then(|k| self.shapes.get(k)) {
            return Ok(l.clone());
        }
        let (r, holds) = maskcheck::analyze_for_shape(sql, parsed, rules);
        if let (Some(key), Ok(lookups), true) = (key, &r, holds) {
            if self.shapes.len() >= SHAPES_MAX {
                self.shapes.clear();
            }
            self.shapes.insert(key, lookups.clone());
        }
        if sql.len() <= ANALYSIS_TEXT_MAX {
            if self.map.len() >= ANALYSES_MAX {
                self.map.clear();
            }
            self.map.insert(sql.to_string(), r.clone());
        }
        r
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn a_remembered_analysis_is_the_analysis() {
        let rules = Rules::from_names(["accounts.ssn"]);
        let mut memo = Analyses::default();
        for sql in [
            "select ssn from accounts where id = 1",
            "select upper(ssn) from accounts",
            "select * from t order by 1",
            "with x as (select ssn from accounts) select * from x",
        ] {
            let want = maskcheck::analyze(sql, &rules);
            assert_eq!(memo.analyze(sql, None, &rules), want, "{sql}");
            // From the memo this time.
            assert_eq!(memo.analyze(sql, None, &rules), want, "{sql}");
        }
        assert_eq!(memo.len(), 4);
        assert!(memo
            .analyze("select upper(ssn) from accounts", None, &rules)
            .is_err());
    }

    /// Statements with constants in every place the analysis looks
    /// (positions, predicates, targets, CTEs, subqueries, set operations,
    /// RETURNING), allowed and refused ones (from the maskcheck tests).
    pub(in crate::proxy::postgres) const CORPUS: &[&str] = &[
        "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
        "SELECT filler, aid FROM pgbench_accounts WHERE aid = 3 ORDER BY 2",
        "UPDATE pgbench_accounts SET abalance = abalance + -4187 WHERE aid = 53;",
        "UPDATE pgbench_accounts SET abalance = abalance + 12 WHERE aid = 53 RETURNING filler",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, -4, CURRENT_TIMESTAMP);",
        "select id, name from customers where id = 1",
        "select ssn from customers order by id limit 5",
        "select ssn from customers order by 1 limit 5 offset 2",
        "select id, ssn from customers order by 1",
        "select id, ssn from customers order by 2",
        "select * from customers order by 3",
        "select ssn, count(*) from customers group by 1",
        "select id, count(*) from customers group by 1 having count(*) > 2",
        "select ssn, count(*) from customers group by rollup (1)",
        "select id, ssn from customers group by grouping sets ((1), (2), ())",
        "select id, ssn from customers group by (1, 2)",
        "select distinct on (1) id, ssn from customers",
        "select distinct on (2) id, ssn from customers",
        "select distinct on (1.5) id, ssn from customers",
        "select id, ssn from customers order by (1)",
        "select id, ssn from customers order by -1",
        "select id, ssn from customers order by 1 using <",
        "update customers set name = 'x' where id = 1 returning ssn, card_number",
        "delete from customers where id = 9 returning *",
        "insert into customers (id, ssn) values (3, '1') returning ssn",
        "insert into customers (id, ssn) values (3, 1) returning 1",
        "select id from customers where ssn like '1%'",
        "select id from customers where card_number = 'x' or id = 2",
        "select ssn || '' from customers",
        "select ssn from customers union select 'x'",
        "select id from customers union select 1 order by 1",
        "select ssn from customers limit (select count(*) from customers where ssn > '5')",
        "with c as (select ssn from customers where id = 1) select * from c",
        "select id from customers c where exists (select ssn from customers d where d.id = 4)",
        "select id from customers where id in (select 1 from orders where note = 'a')",
        "select -1, -'a', - 2.5, 'x'::text, 1::int, '1'::int from customers",
        "select id from customers where id = -'1'",
        "select id from customers where id = - 1",
        "select substring(name from 2 for 3), extract('year' from now()) from customers",
        "select id from customers where id = any('{1,2}') and name > 'b'",
        "select c.row_to_json, 1 from customers c where id ### 1 > 0",
        "select 1 from orders o join customers c on c.id = o.id and o.id = 2",
        "select id from customers window w as (order by 1) limit 1",
        "select row_number() over (order by 1) from customers",
        "select 'a' as k, ssn from customers order by 1",
        "select ssn as k, 2 from customers order by k",
        "select x.* from (values (1, 'a'), (2, 'b')) x where x.column1 = 3",
        "select id from customers for update limit 1",
        "select id from customers fetch first 3 rows only",
        "select id from customers where id = 1 /* 'c' 2 */ and name = 'n' -- 3",
        "select $$x$$, id from customers where id = 7",
        "select e'a''b', n'c', b'101', x'ff', u&'d' from customers where id = 2",
    ];

    /// Asks a fresh memo for each text of `texts` in order and checks every
    /// answer against the analysis of the text alone; the number of
    /// answers that came from a shape.
    fn agree(texts: &[String], rules: &Rules) -> usize {
        let mut memo = Analyses::default();
        let mut hits = 0;
        for sql in texts {
            // Callers pass only statements that parse (classified ones).
            if pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).is_err() {
                continue;
            }
            let from_shape = !memo.map.contains_key(sql.as_str())
                && shape_key(sql).is_some_and(|k| memo.shapes.contains_key(&k));
            let want = maskcheck::analyze(sql, rules);
            let got = memo.analyze(sql, None, rules);
            assert_eq!(got, want, "{sql}");
            // The classification's parse gives the same answer.
            let parsed = crate::proxy::postgres::classify::classify(sql)
                .ok()
                .and_then(|mut l| l.pop().and_then(|c| c.parsed));
            if let Some(p) = parsed {
                let mut fresh = Analyses::default();
                assert_eq!(fresh.analyze(sql, Some(&p), rules), want, "{sql}");
            }
            hits += usize::from(from_shape);
        }
        hits
    }

    #[test]
    fn texts_of_one_shape_analyze_alike() {
        let rules = Rules::from_names([
            "ssn",
            "customers.card_number",
            "customers.email",
            "pgbench_accounts.filler",
        ]);
        let mut hits = 0;
        let mut texts = 0;
        for sql in CORPUS {
            let family = shapes::constant_family(sql);
            texts += family.len();
            hits += agree(&family, &rules);
            // Each text first in turn: the reverse order primes the memo
            // with other texts.
            let reversed: Vec<String> = family.iter().rev().cloned().collect();
            hits += agree(&reversed, &rules);
        }
        // The memo answered for many of them (the rest: other keys, or a
        // position read, or refused).
        assert!(texts > 1500, "{texts}");
        assert!(hits > 500, "{hits} of {texts}");
    }

    #[test]
    fn shapes_keep_token_kinds_and_signs_apart() {
        // One normalized text (pg_query folds the sign into the
        // constant), two trees: a constant, and an operator call.
        assert_ne!(
            shape_key("select -1 from t"),
            shape_key("select -'a' from t")
        );
        assert_ne!(shape_key("select 1 from t"), shape_key("select '1' from t"));
        assert_ne!(shape_key("select 1 from t"), shape_key("select 1.0 from t"));
        assert_ne!(shape_key("select a from t"), shape_key("select b from t"));
        assert_ne!(
            shape_key("select \"a\" from t"),
            shape_key("select a from t")
        );
        assert_eq!(
            shape_key("select a from t where b = 1"),
            shape_key("select a from t where b = 22")
        );
        assert_eq!(
            shape_key("select a from t where b = 'x'"),
            shape_key("select a from t where b = 'it''s'")
        );
        assert_eq!(shape_key("select 'a\\' from t"), None);
    }

    #[test]
    fn an_analysis_that_read_a_position_is_not_shared() {
        let rules = Rules::from_names(["customers.ssn"]);
        let mut memo = Analyses::default();
        // Position 1 is `id`: allowed, but only because of the position.
        let first = "select distinct on (1) id, ssn from customers";
        assert!(memo.analyze(first, None, &rules).is_ok());
        assert!(memo.shapes.is_empty());
        // Position 2 is `ssn`: DISTINCT ON a masked column is refused.
        for sql in [
            "select distinct on (2) id, ssn from customers",
            "select id, ssn from customers group by rollup (2)",
        ] {
            assert!(shape_key(sql).is_some(), "{sql}");
            assert!(memo.analyze(sql, None, &rules).is_err(), "{sql}");
        }
        // One without a position is shared across its constants.
        let plain = "select id, ssn from customers where id = 1";
        assert!(memo.analyze(plain, None, &rules).is_ok());
        assert_eq!(memo.shapes.len(), 1);
        assert!(memo
            .analyze("select id, ssn from customers where id = 2", None, &rules)
            .is_ok());
        assert_eq!(memo.len(), 4);
        // A refusal is not shared: its reason is made again.
        let refused = "select id from customers where ssn = '1'";
        assert!(memo.analyze(refused, None, &rules).is_err());
        assert_eq!(memo.shapes.len(), 1);
    }

    #[test]
    fn other_rules_empty_the_memo() {
        let sql = "select email from users where id = 1";
        let mut memo = Analyses::default();
        let none = Rules::from_names(["accounts.ssn"]);
        let allowed = memo.analyze(sql, None, &none);
        assert!(allowed.is_ok());
        // A reload masks `users.email`: the same text is analyzed again
        // and now refused (a masked column in WHERE).
        let email = Rules::from_names(["users.email"]);
        let fresh = memo.analyze(sql, None, &email);
        assert_eq!(fresh, maskcheck::analyze(sql, &email));
        assert!(memo
            .analyze("select id from users where email = 'a'", None, &email)
            .is_err());
        assert_eq!(memo.len(), 2);
        // And back.
        assert_eq!(memo.analyze(sql, None, &none), allowed);
        assert_eq!(memo.len(), 1);
    }

    #[test]
    fn the_memo_is_bounded() {
        let rules = Rules::from_names(["ssn"]);
        let mut memo = Analyses::default();
        for i in 0..(ANALYSES_MAX * 3) {
            let sql = format!("select a from t where b = {i}");
            assert_eq!(
                memo.analyze(&sql, None, &rules),
                maskcheck::analyze(&sql, &rules)
            );
            assert!(memo.len() <= ANALYSES_MAX);
        }
        let long = format!("select '{}' from t", "x".repeat(ANALYSIS_TEXT_MAX));
        assert!(memo.analyze(&long, None, &rules).is_ok());
        assert!(memo.map.keys().all(|k| k.len() <= ANALYSIS_TEXT_MAX));
    }
}
