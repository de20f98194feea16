//! Statement classification with PostgreSQL's own parser (pg_query): each
//! statement of a query string becomes an action class (`select`, `delete`,
//! `copy_out`, ...) plus the Cedar `Statement` context (tables, functions,
//! fingerprint, has_where).
//!
//! Owns the mapping from parse trees to the action catalog in
//! `policy::actions::POSTGRES`; it must not decide anything.

use pg_query::{protobuf::TransactionStmtKind, NodeEnum, NodeRef, ParserOptions};
use serde_json::{json, Value};

/// One classified statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// The action class (without the `postgres:` prefix).
    pub class: &'static str,
    /// The statement's own text.
    pub text: String,
    /// pg_query fingerprint (hex): same shape, same key.
    pub fingerprint: String,
    /// Constants replaced by `$n` (audit text without the values).
    pub normalized: String,
    /// Tables referenced.
    pub tables: Vec<String>,
    /// Functions called.
    pub functions: Vec<String>,
    /// Whether the deciding statement has a WHERE clause.
    pub has_where: bool,
    /// ROLLBACK / ABORT / ROLLBACK TO: only undoes, always allowed.
    pub rollback: bool,
}

impl Classified {
    /// The Cedar `Statement` record.
    pub fn context(&self) -> Value {
        json!({
            "text": self.text,
            "fingerprint": self.fingerprint,
            "tables": self.tables,
            "functions": self.functions,
            "has_where": self.has_where,
        })
    }
}

/// Why a query string was not classified (it is then denied).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClassifyError {
    /// PostgreSQL's parser rejected it.
    #[error("cannot parse the statement: {0}")]
    Parse(String),
    /// It means different statements depending on the session's
    /// `standard_conforming_strings` (a backslash in a string literal):
    /// the server might run what was not decided.
    #[error("the statement reads differently with standard_conforming_strings off (backslashes in string literals); use E'' strings or dollar quoting")]
    Ambiguous,
}

fn strength(class: &str) -> u8 {
    match class {
        "insert" => 1,
        "update" => 2,
        "merge" => 3,
        "delete" => 4,
        _ => 0,
    }
}

fn dml_class(node: &NodeRef<'_>) -> Option<&'static str> {
    Some(match node {
        NodeRef::InsertStmt(_) => "insert",
        NodeRef::UpdateStmt(_) => "update",
        NodeRef::DeleteStmt(_) => "delete",
        NodeRef::MergeStmt(_) => "merge",
        _ => return None,
    })
}

/// The class of a top-level statement node (EXPLAIN ANALYZE, PREPARE and
/// DECLARE take the class of what they run).
fn class_of(node: &NodeEnum) -> &'static str {
    use NodeEnum as N;
    match node {
        N::SelectStmt(s) if s.into_clause.is_some() => "ddl",
        N::SelectStmt(_) | N::FetchStmt(_) => "select",
        N::InsertStmt(_) => "insert",
        N::UpdateStmt(_) => "update",
        N::DeleteStmt(_) => "delete",
        N::MergeStmt(_) => "merge",
        N::CopyStmt(c) if c.is_from => "copy_in",
        N::CopyStmt(_) => "copy_out",
        N::TruncateStmt(_) => "truncate",
        N::GrantStmt(_)
        | N::GrantRoleStmt(_)
        | N::AlterDefaultPrivilegesStmt(_)
        | N::CreateRoleStmt(_)
        | N::AlterRoleStmt(_)
        | N::AlterRoleSetStmt(_)
        | N::DropRoleStmt(_)
        | N::ReassignOwnedStmt(_)
        | N::DropOwnedStmt(_)
        | N::CreatePolicyStmt(_)
        | N::AlterPolicyStmt(_) => "dcl",
        N::TransactionStmt(_) => "transaction",
        N::VariableSetStmt(_) => "set",
        N::VariableShowStmt(_) => "show",
        N::CallStmt(_) => "call",
        N::ExplainStmt(e) => {
            let analyze = e.options.iter().any(|o| match &o.node {
                Some(N::DefElem(d)) => d.defname == "analyze",
                _ => false,
            });
            match e.query.as_ref().and_then(|q| q.node.as_ref()) {
                Some(inner) if analyze => class_of(inner),
                _ => "explain",
            }
        }
        N::PrepareStmt(p) => match p.query.as_ref().and_then(|q| q.node.as_ref()) {
            Some(inner) => class_of(inner),
            None => "other",
        },
        N::DeclareCursorStmt(d) => match d.query.as_ref().and_then(|q| q.node.as_ref()) {
            Some(inner) => class_of(inner),
            None => "other",
        },
        N::CreateStmt(_)
        | N::CreateTableAsStmt(_)
        | N::AlterTableStmt(_)
        | N::DropStmt(_)
        | N::IndexStmt(_)
        | N::ViewStmt(_)
        | N::RenameStmt(_)
        | N::CreateFunctionStmt(_)
        | N::AlterFunctionStmt(_)
        | N::CreateSchemaStmt(_)
        | N::CreateSeqStmt(_)
        | N::AlterSeqStmt(_)
        | N::CreateTrigStmt(_)
        | N::RuleStmt(_)
        | N::CommentStmt(_)
        | N::CreateExtensionStmt(_)
        | N::AlterExtensionStmt(_)
        | N::CreateDomainStmt(_)
        | N::AlterDomainStmt(_)
        | N::DefineStmt(_)
        | N::CompositeTypeStmt(_)
        | N::CreateEnumStmt(_)
        | N::AlterEnumStmt(_)
        | N::AlterObjectSchemaStmt(_)
        | N::AlterOwnerStmt(_)
        | N::CreatedbStmt(_)
        | N::DropdbStmt(_)
        | N::AlterDatabaseStmt(_)
        | N::AlterDatabaseSetStmt(_)
        | N::RefreshMatViewStmt(_)
        | N::CreateEventTrigStmt(_)
        | N::CreateStatsStmt(_) => "ddl",
        // DO, ALTER SYSTEM, LOCK, VACUUM, LISTEN, EXECUTE, ...: "other",
        // which example policies leave unpermitted.
        _ => "other",
    }
}

/// Splits and classifies a query string. An empty string gives an empty
/// list (PostgreSQL answers it with EmptyQueryResponse).
pub fn classify(sql: &str) -> Result<Vec<Classified>, ClassifyError> {
    let list = classify_with(sql, ParserOptions::DEFAULT)?;
    // The session may have standard_conforming_strings off (a SET the
    // policy allows, or a role default), and then `\'` inside a literal
    // does not end it: the same text splits into other statements. Where
    // that can matter (a backslash anywhere), both readings must agree.
    if sql.contains('\\') {
        let same = |a: &Classified, b: &Classified| {
            a.class == b.class
                && a.text == b.text
                && a.tables == b.tables
                && a.functions == b.functions
        };
        match classify_with(sql, ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS) {
            Ok(alt)
                if alt.len() == list.len() && alt.iter().zip(&list).all(|(a, b)| same(a, b)) => {}
            _ => return Err(ClassifyError::Ambiguous),
        }
    }
    Ok(list)
}

fn classify_with(sql: &str, options: ParserOptions) -> Result<Vec<Classified>, ClassifyError> {
    let parsed = pg_query::parse(sql, options).map_err(|e| ClassifyError::Parse(e.to_string()))?;
    let single = parsed.protobuf.stmts.len() == 1;
    let mut out = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        let start = usize::try_from(raw.stmt_location).unwrap_or(0);
        // stmt_len 0 means "to the end of the string".
        let end = match usize::try_from(raw.stmt_len) {
            Ok(0) | Err(_) => sql.len(),
            Ok(n) => start.saturating_add(n).min(sql.len()),
        };
        let text = sql
            .get(start..end)
            .map(str::trim)
            .unwrap_or(sql)
            .to_string();
        let Some(node) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
            continue;
        };
        // One statement: its parse is the whole string's (no second parse).
        out.push(one(node, text, single.then_some(&parsed), options)?);
    }
    Ok(out)
}

fn one(
    node: &NodeEnum,
    text: String,
    whole: Option<&pg_query::ParseResult>,
    options: ParserOptions,
) -> Result<Classified, ClassifyError> {
    let mut class = class_of(node);
    let rollback = matches!(node, NodeEnum::TransactionStmt(t)
        if matches!(TransactionStmtKind::try_from(t.kind),
            Ok(TransactionStmtKind::TransStmtRollback | TransactionStmtKind::TransStmtRollbackTo)));
    // The statement alone, for its tables and nested statements.
    let parsed_own;
    let own = match whole {
        Some(w) => w,
        None => {
            parsed_own =
                pg_query::parse(&text, options).map_err(|e| ClassifyError::Parse(e.to_string()))?;
            &parsed_own
        }
    };
    let nodes = own.protobuf.nodes();
    // A SELECT (or COPY of a query) whose CTE modifies data is that
    // modification: `WITH d AS (DELETE ...) SELECT` deletes.
    if matches!(class, "select" | "copy_out") || strength(class) > 0 {
        for (n, _, _, _) in &nodes {
            if let Some(dml) = dml_class(n) {
                if strength(dml) > strength(class) {
                    class = dml;
                }
            }
        }
    }
    let mut has_where = false;
    let mut where_from: Option<&'static str> = None;
    for (n, _, _, _) in &nodes {
        if dml_class(n) == Some(class) {
            where_from = Some(class);
            has_where = match n {
                NodeRef::UpdateStmt(u) => u.where_clause.is_some(),
                NodeRef::DeleteStmt(d) => d.where_clause.is_some(),
                _ => false,
            };
            break;
        }
    }
    if where_from.is_none() {
        if let Some((NodeRef::SelectStmt(s), _, _, _)) = nodes.first() {
            has_where = s.where_clause.is_some();
        }
    }
    let fingerprint = pg_query::fingerprint(&text, options, 0)
        .map(|f| f.hex)
        .map_err(|e| ClassifyError::Parse(e.to_string()))?;
    let normalized = pg_query::normalize(&text).unwrap_or_else(|_| text.clone());
    Ok(Classified {
        class,
        fingerprint,
        normalized,
        tables: own.tables(),
        functions: own.functions(),
        has_where,
        rollback,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes(sql: &str) -> Vec<&'static str> {
        classify(sql).unwrap().iter().map(|c| c.class).collect()
    }

    #[test]
    fn statement_kinds() {
        assert_eq!(classes("select * from t"), ["select"]);
        assert_eq!(classes("insert into t values (1)"), ["insert"]);
        assert_eq!(classes("update t set a = 1"), ["update"]);
        assert_eq!(classes("delete from t where id = 1"), ["delete"]);
        assert_eq!(classes("copy t to stdout"), ["copy_out"]);
        assert_eq!(classes("copy t from stdin"), ["copy_in"]);
        assert_eq!(classes("truncate t"), ["truncate"]);
        assert_eq!(classes("grant select on t to bob"), ["dcl"]);
        assert_eq!(classes("begin"), ["transaction"]);
        assert_eq!(classes("set search_path = x"), ["set"]);
        assert_eq!(classes("show all"), ["show"]);
        assert_eq!(classes("explain select 1"), ["explain"]);
        assert_eq!(classes("create table x (a int)"), ["ddl"]);
        assert_eq!(classes("select 1 into newt"), ["ddl"]);
        assert_eq!(classes("call p()"), ["call"]);
        assert_eq!(classes("do $$ begin delete from t; end $$"), ["other"]);
        assert_eq!(classes("alter system set fsync = off"), ["other"]);
        assert!(classes("").is_empty());
    }

    #[test]
    fn hidden_modifications_are_seen() {
        assert_eq!(
            classes("with d as (delete from t returning *) select * from d"),
            ["delete"]
        );
        assert_eq!(classes("explain analyze delete from t"), ["delete"]);
        assert_eq!(classes("explain delete from t"), ["explain"]);
        assert_eq!(classes("prepare p as delete from t"), ["delete"]);
        assert_eq!(
            classes("copy (delete from t returning *) to stdout"),
            ["delete"]
        );
        assert_eq!(
            classes("select $x$ delete from t $x$, 'delete from t'"),
            ["select"]
        );
    }

    #[test]
    fn batches_split_with_their_own_text_and_context() {
        let c = classify("select * from a where x = 1; delete from b").unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].text, "select * from a where x = 1");
        assert_eq!(c[0].tables, ["a"]);
        assert!(c[0].has_where);
        assert_eq!(c[1].class, "delete");
        assert_eq!(c[1].tables, ["b"]);
        assert!(!c[1].has_where);
        assert_eq!(c[0].normalized, "select * from a where x = $1");
        let again = classify("select * from a where x = 2").unwrap();
        assert_eq!(again[0].fingerprint, c[0].fingerprint);
    }

    #[test]
    fn backslash_literals_that_split_differently_are_refused() {
        // With standard_conforming_strings off the server reads
        // 'a\', ' as one literal and then runs the DELETE.
        assert_eq!(
            classify("select 'a\\', ' ; delete from t; -- '"),
            Err(ClassifyError::Ambiguous)
        );
        // A backslash that means the same either way is fine.
        assert_eq!(classes("select 'C:\\dir', 1"), ["select"]);
        assert_eq!(classes("select E'it\\'s'"), ["select"]);
    }

    #[test]
    fn rollback_is_marked_and_garbage_fails() {
        let c = classify("rollback; abort; rollback to savepoint s; commit").unwrap();
        let r: Vec<bool> = c.iter().map(|c| c.rollback).collect();
        assert_eq!(r, [true, true, true, false]);
        assert!(classify("selec * frm").is_err());
        assert!(classify("select 'unterminated").is_err());
    }
}
