//! A session's memo of masking analyses: the parse-tree analysis of one
//! statement ([`maskcheck::analyze`]) is a pure function of its text and
//! the resource's column rules, so a statement sent again (every
//! extended-protocol execution re-sends its Parse, whose classification
//! comes from the session's memo without a parse) is not parsed again for
//! it. The catalog checks that follow the analysis are made each time
//! ([`maskcheck::check_statement`]): they depend on the catalog.
//!
//! Owns the memo; it must not decide anything. It is emptied whenever the
//! rules it was made under differ from the ones asked with (a policy
//! reload that changes the column rules).

use std::collections::HashMap;

use super::{
    classify::Parsed,
    maskcheck::{self, Lookups, Rules},
};

/// Analyses remembered per session.
const ANALYSES_MAX: usize = 16;
/// Longest statement text remembered.
const ANALYSIS_TEXT_MAX: usize = 1024;

/// The memo (one per session).
#[derive(Debug, Default)]
pub(super) struct Analyses {
    /// The rules every entry was made under.
    rules: Rules,
    map: HashMap<String, Result<Lookups, String>>,
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
            self.rules = rules.clone();
        }
        if let Some(r) = self.map.get(sql) {
            return r.clone();
        }
        let r = match parsed {
            Some(p) => maskcheck::analyze_parsed(p, rules),
            None => maskcheck::analyze(sql, rules),
        };
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
mod tests {
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
