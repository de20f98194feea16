//! Statement classification with PostgreSQL's own parser (pg_query): each
//! statement of a query string becomes an action class (`select`, `delete`,
//! `copy_out`, ...) plus the Cedar `Statement` context (tables, functions,
//! fingerprint, has_where).
//!
//! Owns the mapping from parse trees to the action catalog in
//! `policy::actions::POSTGRES`; it must not decide anything.

use std::sync::Arc;

use pg_query::{protobuf::TransactionStmtKind, NodeEnum, ParserOptions};
use serde_json::{json, Value};

/// One statement's parse (with the server's default reading) as the walks
/// read it: the parser's result and each node's tree as JSON. Classification
/// makes it and the masking analysis ([`super::maskcheck`]) reads the same
/// one, so a statement is parsed once for both.
#[derive(Debug, Clone)]
pub struct Parsed(Arc<ParsedInner>);

#[derive(Debug)]
struct ParsedInner {
    result: Arc<pg_query::ParseResult>,
    /// The JSON tree of each statement node, in order.
    trees: Vec<Value>,
}

impl Parsed {
    /// Each statement node with its JSON tree.
    pub fn statements(&self) -> impl Iterator<Item = (&NodeEnum, &Value)> {
        self.0
            .result
            .protobuf
            .stmts
            .iter()
            .filter_map(|raw| raw.stmt.as_ref().and_then(|s| s.node.as_ref()))
            .zip(&self.0.trees)
    }
}

/// A parse is a function of its statement's text, which [`Classified`]
/// compares on its own: two classifications of the same text are equal.
impl PartialEq for Parsed {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Parsed {}

/// One classified statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// The action class (without the `postgres:` prefix).
    pub class: &'static str,
    /// The class from the parse alone, before a read that may run a
    /// routine with side effects became `function` (a COPY TO stays
    /// recognisable as one).
    pub parsed_class: &'static str,
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
    /// Whether the deciding statement has a WHERE clause: for a data
    /// modification, every UPDATE and DELETE anywhere in the statement
    /// (CTEs, EXPLAIN ANALYZE, PREPARE, COPY) has one, and so does every
    /// node of the deciding class (an INSERT or MERGE never has).
    pub has_where: bool,
    /// ROLLBACK / ABORT / ROLLBACK TO: only undoes, always allowed.
    pub rollback: bool,
    /// Every function, operator and cast target type the statement names,
    /// for the catalog's verdict on side effects
    /// ([`super::functions`]).
    pub refs: Refs,
    /// The functions (operators, types) not known to be free of side
    /// effects; filled in by [`super::functions`]. A read class (select,
    /// copy_out, explain, show) with any becomes `function`.
    pub volatile_functions: Vec<String>,
    /// It calls a routine, operator or type that is not known to be the
    /// server's own (user code may run DDL); set with the verdicts.
    pub user_routines: bool,
    /// LOCK, LISTEN/UNLISTEN/NOTIFY, VACUUM/ANALYZE, CHECKPOINT: class
    /// `other`, yet they change nothing the catalog checks read.
    pub catalog_neutral: bool,
    /// The name a SQL-level `PREPARE name AS ...` defines.
    pub sql_prepare: Option<String>,
    /// The name a SQL-level `EXECUTE name` runs.
    pub sql_execute: Option<String>,
    /// The statement's parse, for the masking analysis (`None` once
    /// dropped, e.g. from a session's memo of classifications: the
    /// analysis then parses the text itself).
    pub parsed: Option<Parsed>,
}

/// A possibly schema-qualified name as written (`None`: unqualified; any
/// schema on the search path may supply it).
pub type QualName = (Option<String>, String);

/// The routines a statement may run, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refs {
    /// Function calls (`f(..)`, aggregates, table functions).
    pub functions: Vec<QualName>,
    /// Operators (`a + b`, `OPERATOR(s.+)`, `x = ANY(..)`, `ORDER BY USING`).
    pub operators: Vec<QualName>,
    /// Types cast to (`'x'::t`: its input function, a domain's checks).
    pub types: Vec<QualName>,
    /// A name that cannot be qualified as `schema.name` (three parts).
    pub unresolvable: Vec<String>,
}

impl Refs {
    /// Whether the statement names no routine at all.
    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
            && self.operators.is_empty()
            && self.types.is_empty()
            && self.unresolvable.is_empty()
    }
}

/// Statement classes that only read: one that may run a routine with side
/// effects is decided as `postgres:function` instead.
pub const READ_CLASSES: &[&str] = &["select", "copy_out", "explain", "show"];

impl Classified {
    /// The Cedar `Statement` record.
    pub fn context(&self) -> Value {
        json!({
            "text": self.text,
            "fingerprint": self.fingerprint,
            "tables": self.tables,
            "functions": self.functions,
            "has_where": self.has_where,
            "volatile_functions": self.volatile_functions,
        })
    }

    /// Applies the catalog's verdict: `unsafe_names` are the routines this
    /// statement names that are not known to be free of side effects. A
    /// read class that runs any becomes `function`; other classes keep
    /// theirs and carry the list.
    pub fn set_volatile(&mut self, mut unsafe_names: Vec<String>, user_routines: bool) {
        self.user_routines = user_routines;
        unsafe_names.sort();
        unsafe_names.dedup();
        if !unsafe_names.is_empty() && READ_CLASSES.contains(&self.class) {
            self.class = "function";
        }
        self.volatile_functions = unsafe_names;
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
    /// It would change the session's client encoding, which is pinned to
    /// UTF8 so the server reads statements as they are decided here.
    #[error("{0}: the session's client_encoding is pinned to UTF8 by Portcullis (statements are decided as UTF-8)")]
    Encoding(&'static str),
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
        // Lists compare as sets (`one` sorts them): pg_query hands them
        // out in hash order, which differs between two parses.
        let same = |a: &Classified, b: &Classified| {
            a.class == b.class
                && a.text == b.text
                && a.tables == b.tables
                && a.functions == b.functions
                && a.refs == b.refs
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
    let parsed =
        Arc::new(pg_query::parse(sql, options).map_err(|e| ClassifyError::Parse(e.to_string()))?);
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
        // One statement: its parse is the whole string's. Of a batch: its
        // own part of the whole string's parse (not parsed again).
        let own = if single {
            parsed.clone()
        } else {
            Arc::new(pg_query::ParseResult::new(
                pg_query::protobuf::ParseResult {
                    version: parsed.protobuf.version,
                    stmts: vec![raw.clone()],
                },
                String::new(),
            ))
        };
        out.push(one(node, text, own, options)?);
    }
    Ok(out)
}

fn one(
    node: &NodeEnum,
    text: String,
    own: Arc<pg_query::ParseResult>,
    options: ParserOptions,
) -> Result<Classified, ClassifyError> {
    let mut class = class_of(node);
    let rollback = matches!(node, NodeEnum::TransactionStmt(t)
        if matches!(TransactionStmtKind::try_from(t.kind),
            Ok(TransactionStmtKind::TransStmtRollback | TransactionStmtKind::TransStmtRollbackTo)));
    // pg_query's own walker skips parts of the tree (PREPARE's query,
    // FROM functions, ARRAY[...], FILTER, ...): walk the whole tree.
    let mut tree = Tree::default();
    let mut trees = Vec::with_capacity(own.protobuf.stmts.len());
    for raw in &own.protobuf.stmts {
        if let Some(n) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) {
            let v = serde_json::to_value(n).map_err(|e| ClassifyError::Parse(e.to_string()))?;
            tree.walk(&v, 0);
            trees.push(v);
        }
    }
    if tree.encoding_change == Some(NOT_CONSTANT) && super::encoding::is_settings_probe(node) {
        // pg_dump's connect-time probe: its name is the constant.
        tree.encoding_change = None;
    }
    if let Some(why) = tree.encoding_change {
        return Err(ClassifyError::Encoding(why));
    }
    // A SELECT (or COPY of a query) whose CTE modifies data is that
    // modification: `WITH d AS (DELETE ...) SELECT` deletes.
    if matches!(class, "select" | "copy_out" | "explain") || strength(class) > 0 {
        for (dml, _) in &tree.dml {
            if strength(dml) > strength(class) && (class != "explain" || tree.analyze) {
                class = dml;
            }
        }
    }
    let has_where = if strength(class) > 0 {
        // Every UPDATE/DELETE anywhere has a WHERE, and at least one node
        // of the deciding class exists and all of those have one (an
        // INSERT or MERGE has none): `WITH d AS (DELETE FROM t) DELETE
        // FROM t WHERE false` has no WHERE that bounds what it deletes.
        let of_class: Vec<bool> = tree
            .dml
            .iter()
            .filter(|(k, _)| *k == class)
            .map(|(_, w)| *w)
            .collect();
        !of_class.is_empty()
            && of_class.iter().all(|w| *w)
            && tree
                .dml
                .iter()
                .filter(|(k, _)| matches!(*k, "update" | "delete" | "merge"))
                .all(|(_, w)| *w)
    } else {
        match node {
            NodeEnum::SelectStmt(s) => s.where_clause.is_some(),
            _ => false,
        }
    };
    // Statements of class `other` that create, drop or alter nothing a
    // catalog check reads (relations, views, routines, types).
    let catalog_neutral = matches!(
        node,
        NodeEnum::LockStmt(_)
            | NodeEnum::ListenStmt(_)
            | NodeEnum::UnlistenStmt(_)
            | NodeEnum::NotifyStmt(_)
            | NodeEnum::VacuumStmt(_)
            | NodeEnum::CheckPointStmt(_)
    );
    // SQL-level PREPARE and EXECUTE: the session remembers what each
    // prepared name runs (see the frontend's `sql_prepared`).
    let (sql_prepare, sql_execute) = match node {
        NodeEnum::PrepareStmt(p) => (Some(p.name.clone()), None),
        NodeEnum::ExecuteStmt(e) => (None, Some(e.name.clone())),
        _ => (None, None),
    };
    let fingerprint = pg_query::fingerprint(&text, options, 0)
        .map(|f| f.hex)
        .map_err(|e| ClassifyError::Parse(e.to_string()))?;
    let normalized = pg_query::normalize(&text).unwrap_or_else(|_| text.clone());
    let mut tables = own.tables();
    tables.sort();
    let mut functions = own.functions();
    functions.sort();
    Ok(Classified {
        class,
        parsed_class: class,
        fingerprint,
        normalized,
        tables,
        functions,
        has_where,
        rollback,
        refs: tree.refs(),
        volatile_functions: Vec::new(),
        user_routines: false,
        catalog_neutral,
        sql_prepare,
        sql_execute,
        text,
        // Only the server's default reading is what the analysis reads.
        parsed: (options == ParserOptions::DEFAULT).then(|| {
            Parsed(Arc::new(ParsedInner {
                result: own.clone(),
                trees,
            }))
        }),
    })
}

/// What a full walk of one statement's tree found.
#[derive(Default)]
struct Tree {
    /// Every data-modifying node: (class, has a WHERE).
    dml: Vec<(&'static str, bool)>,
    functions: Vec<QualName>,
    operators: Vec<QualName>,
    types: Vec<QualName>,
    unresolvable: Vec<String>,
    /// Why the statement would change the client encoding.
    encoding_change: Option<&'static str>,
    /// An EXPLAIN with ANALYZE (it runs what it explains).
    analyze: bool,
}

/// Why a `set_config` whose setting name is not a constant is refused.
const NOT_CONSTANT: &str = "set_config with a setting name that is not a constant";

/// Most nesting walked (the server's own parser limits depth far lower).
const MAX_DEPTH: usize = 10_000;

fn guc(name: &str) -> String {
    name.to_ascii_lowercase().replace('-', "_")
}

/// The strings of a name list (`[{"node": {"String": {"sval": ..}}}, ..]`).
fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| {
                    n.get("node")?
                        .get("String")?
                        .get("sval")?
                        .as_str()
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Tree {
    fn refs(&self) -> Refs {
        let sorted = |mut v: Vec<QualName>| {
            v.sort();
            v.dedup();
            v
        };
        let mut unresolvable = self.unresolvable.clone();
        unresolvable.sort();
        unresolvable.dedup();
        Refs {
            functions: sorted(self.functions.clone()),
            operators: sorted(self.operators.clone()),
            types: sorted(self.types.clone()),
            unresolvable,
        }
    }

    fn qualified(&mut self, parts: Vec<String>) -> Option<QualName> {
        match parts.as_slice() {
            [name] => Some((None, name.clone())),
            [schema, name] => Some((Some(schema.clone()), name.clone())),
            [] => None,
            _ => {
                self.unresolvable.push(parts.join("."));
                None
            }
        }
    }

    fn walk(&mut self, v: &Value, depth: usize) {
        if depth > MAX_DEPTH {
            self.unresolvable.push("<nested too deep>".into());
            return;
        }
        match v {
            Value::Array(a) => a.iter().for_each(|x| self.walk(x, depth + 1)),
            Value::Object(o) => {
                for (k, x) in o {
                    self.node(k, x);
                    self.walk(x, depth + 1);
                }
            }
            _ => {}
        }
    }

    /// Looks at one node (`kind` is its NodeEnum variant name).
    fn node(&mut self, kind: &str, x: &Value) {
        let where_of = |x: &Value| !x.get("where_clause").is_none_or(Value::is_null);
        if matches!(
            kind,
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt"
        ) && x
            .get("relation")
            .and_then(|r| r.get("relname"))
            .and_then(Value::as_str)
            == Some("pg_settings")
        {
            // pg_settings' update rule calls set_config (client_encoding
            // among the rest).
            self.encoding_change = Some("modifying pg_settings (its rule runs set_config)");
        }
        match kind {
            "InsertStmt" => self.dml.push(("insert", false)),
            "UpdateStmt" => self.dml.push(("update", where_of(x))),
            "DeleteStmt" => self.dml.push(("delete", where_of(x))),
            // MERGE's join condition is not a WHERE bounding it.
            "MergeStmt" => self.dml.push(("merge", false)),
            "ExplainStmt" => {
                let analyze = x.get("options").and_then(Value::as_array).is_some_and(|o| {
                    o.iter().any(|d| {
                        d.get("DefElem")
                            .and_then(|d| d.get("defname"))
                            .and_then(Value::as_str)
                            == Some("analyze")
                    })
                });
                self.analyze |= analyze;
            }
            "FuncCall" => {
                let parts = names(x.get("funcname").unwrap_or(&Value::Null));
                if parts.last().map(String::as_str) == Some("set_config") {
                    // set_config(name, ..): a constant name other than
                    // client_encoding is fine; anything else may be it.
                    let first = x
                        .get("args")
                        .and_then(|a| a.get(0))
                        .and_then(|a| a.get("node"))
                        .and_then(|a| a.get("AConst"))
                        .and_then(|c| c.get("val"))
                        .and_then(|v| v.get("Sval"))
                        .and_then(|v| v.get("sval"))
                        .and_then(Value::as_str);
                    match first {
                        Some(n) if guc(n.trim()) != "client_encoding" => {}
                        Some(_) => self.encoding_change = Some("set_config('client_encoding', ..)"),
                        None => self.encoding_change = Some(NOT_CONSTANT),
                    }
                }
                if let Some(q) = self.qualified(parts) {
                    self.functions.push(q);
                }
            }
            "AExpr" => {
                // BETWEEN is written with a keyword but runs comparisons.
                let kind = x.get("kind").and_then(Value::as_i64).unwrap_or(0);
                if (11..=14).contains(&kind) {
                    for op in [">=", "<=", ">", "<"] {
                        self.operators.push((None, op.to_string()));
                    }
                } else if let Some(q) = self.qualified(names(x.get("name").unwrap_or(&Value::Null)))
                {
                    self.operators.push(q);
                }
            }
            "SubLink" => {
                if let Some(q) = self.qualified(names(x.get("oper_name").unwrap_or(&Value::Null))) {
                    self.operators.push(q);
                }
            }
            "SortBy" => {
                if let Some(q) = self.qualified(names(x.get("use_op").unwrap_or(&Value::Null))) {
                    self.operators.push(q);
                }
            }
            "TypeCast" => {
                let parts = names(
                    x.get("type_name")
                        .and_then(|t| t.get("names"))
                        .unwrap_or(&Value::Null),
                );
                if let Some(q) = self.qualified(parts) {
                    self.types.push(q);
                }
            }
            // ALTER SYSTEM / ROLE / DATABASE hold theirs as `setstmt`.
            "VariableSetStmt" | "setstmt" => {
                let name = x.get("name").and_then(Value::as_str).unwrap_or_default();
                if guc(name) == "client_encoding" {
                    self.encoding_change = Some("SET/RESET client_encoding (or SET NAMES)");
                }
            }
            _ => {}
        }
    }
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
    fn a_batch_statement_classifies_as_its_text_alone() {
        // Each statement of a batch is read from the whole string's parse,
        // not parsed again: the same as its text parsed on its own.
        let batch = "select * from a join b using (id) where x = 1; \
            with d as (delete from o returning *) select upper(y) from d; \
            insert into t select nextval('s'), * from u where z = 'q'; \
            update pg_catalog.pg_class set relname = relname where false; \
            prepare p as select f(1) from w; set search_path = x";
        let list = classify(batch).unwrap();
        assert_eq!(list.len(), 6);
        for c in &list {
            let alone = classify(&c.text).unwrap().remove(0);
            assert_eq!(*c, alone, "{}", c.text);
            assert_eq!(
                (&c.fingerprint, &c.normalized, &c.refs, c.has_where),
                (
                    &alone.fingerprint,
                    &alone.normalized,
                    &alone.refs,
                    alone.has_where
                ),
                "{}",
                c.text
            );
        }
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
    fn has_where_needs_every_modifying_node_bounded() {
        let one = |sql: &str| {
            let c = classify(sql).unwrap();
            assert_eq!(c.len(), 1, "{sql}");
            (c[0].class, c[0].has_where)
        };
        // Issue 14: the outer WHERE does not bound the CTE's DELETE.
        assert_eq!(
            one("with d as (delete from orders returning 1) delete from orders where id = -1"),
            ("delete", false)
        );
        assert_eq!(one("delete from orders where id = 1"), ("delete", true));
        assert_eq!(
            one("with d as (delete from o where id = 1 returning 1) delete from o where id = 2"),
            ("delete", true)
        );
        // A DELETE inside an UPDATE: conservative, any unbounded one counts.
        assert_eq!(
            one("with d as (delete from o returning id) update o set a = 1 where id = 3"),
            ("delete", false)
        );
        assert_eq!(
            one("with u as (update o set a = 1 returning id) delete from o where id = 3"),
            ("delete", false)
        );
        assert_eq!(one("explain analyze delete from o"), ("delete", false));
        assert_eq!(
            one("prepare p as with d as (delete from o returning 1) select * from d"),
            ("delete", false)
        );
        assert_eq!(
            one("copy (with d as (delete from o returning 1) select * from d) to stdout"),
            ("delete", false)
        );
        assert_eq!(
            one("insert into o select * from o where id = 1"),
            ("insert", false)
        );
        assert_eq!(one("select * from o where id = 1"), ("select", true));
        assert_eq!(one("update o set a = 1 where id = 1"), ("update", true));
        assert_eq!(one("update o set a = 1"), ("update", false));
    }

    #[test]
    fn encoding_changes_are_refused() {
        for sql in [
            "set client_encoding = 'GBK'",
            "set client_encoding to default",
            "SET CLIENT_ENCODING TO 'SJIS'",
            "set local client_encoding = 'BIG5'",
            "set session client_encoding = 'BIG5'",
            "set names 'GBK'",
            "reset client_encoding",
            "select set_config('client_encoding', 'GBK', false)",
            "select pg_catalog.set_config('CLIENT_ENCODING', 'GBK', false)",
            "select set_config(x, 'GBK', false) from (select 'client_encoding' x) s",
            "select * from pg_catalog.set_config('client_encoding', 'GBK', false)",
            "select 1; set client_encoding = 'GBK'",
            "update pg_settings set setting = 'GBK' where name = 'client_encoding'",
            "alter system set client_encoding = 'GBK'",
            "alter role r set client_encoding = 'GBK'",
        ] {
            assert!(
                matches!(classify(sql), Err(ClassifyError::Encoding(_))),
                "{sql}: {:?}",
                classify(sql)
            );
        }
        // RESET ALL / DISCARD ALL return to the startup value (UTF8).
        assert_eq!(classes("reset all"), ["set"]);
        assert_eq!(classes("discard all"), ["other"]);
        assert_eq!(classes("set search_path = x"), ["set"]);
        assert_eq!(
            classes("select set_config('search_path', 'x', false)"),
            ["select"]
        );
        assert_eq!(classes("select * from pg_settings"), ["select"]);
    }

    #[test]
    fn routines_are_collected_from_the_whole_tree() {
        let r = |sql: &str| classify(sql).unwrap().remove(0).refs;
        let q = |s: Option<&str>, n: &str| (s.map(str::to_string), n.to_string());
        let refs = r("select upper(a), pg_catalog.now(), count(*) from t where b = 1 and c between 1 and 2 order by a using <");
        assert_eq!(
            refs.functions,
            [
                q(None, "count"),
                q(None, "upper"),
                q(Some("pg_catalog"), "now")
            ]
        );
        assert!(refs.operators.contains(&q(None, "=")));
        assert!(refs.operators.contains(&q(None, ">=")));
        // Places pg_query's own walker does not look.
        assert_eq!(
            r("select * from pg_read_file('/etc/hostname')").functions,
            [q(None, "pg_read_file")]
        );
        assert_eq!(r("select array[f()]").functions, [q(None, "f")]);
        assert_eq!(
            r("select count(*) filter (where g()) from t")
                .functions
                .len(),
            2
        );
        assert_eq!(r("prepare p as select h()").functions, [q(None, "h")]);
        assert_eq!(r("select * from (select k()) s").functions, [q(None, "k")]);
        assert_eq!(
            r("select 1 OPERATOR(public.===) 2").operators,
            [q(Some("public"), "===")]
        );
        assert_eq!(
            r("select 'x'::public.dom").types,
            [q(Some("public"), "dom")]
        );
        // A quoted name with a dot is one name, not schema.name.
        assert_eq!(
            r("select \"pg_catalog.upper\"('a')").functions,
            [q(None, "pg_catalog.upper")]
        );
        assert_eq!(r("select a.b.c()").unresolvable, ["a.b.c"]);
        assert!(r("select 1").is_empty());
    }

    #[test]
    fn a_read_with_a_volatile_routine_is_function() {
        let mut c = classify("select nextval('s')").unwrap().remove(0);
        c.set_volatile(vec!["nextval".into()], false);
        assert_eq!(c.class, "function");
        assert_eq!(c.context()["volatile_functions"], json!(["nextval"]));
        assert_eq!(c.parsed_class, "select");
        let mut c = classify("copy (select nextval('s')) to stdout")
            .unwrap()
            .remove(0);
        c.set_volatile(vec!["nextval".into()], false);
        assert_eq!((c.class, c.parsed_class), ("function", "copy_out"));
        let mut c = classify("insert into t values (nextval('s'))")
            .unwrap()
            .remove(0);
        c.set_volatile(vec!["nextval".into()], false);
        assert_eq!(c.class, "insert");
        assert_eq!(c.context()["volatile_functions"], json!(["nextval"]));
        let mut c = classify("select upper('a')").unwrap().remove(0);
        c.set_volatile(Vec::new(), false);
        assert_eq!(c.class, "select");
    }

    #[test]
    fn dual_parse_compares_lists_as_sets() {
        // Issue 19: several tables and functions with a backslash: the two
        // parses' hash orders differ, the readings do not.
        for _ in 0..20 {
            assert_eq!(
                classes(
                    "select f1(a), f2(b), f3(c), f4(d) from t1, t2, t3, t4, t5 where x = E'\\n'"
                ),
                ["select"]
            );
        }
    }

    #[test]
    fn rollback_is_marked_and_garbage_fails() {
        let c = classify("rollback; abort; rollback to savepoint s; commit").unwrap();
        let r: Vec<bool> = c.iter().map(|c| c.rollback).collect();
        assert_eq!(r, [true, true, true, false]);
        assert!(classify("selec * frm").is_err());
        assert!(classify("select 'unterminated").is_err());
    }

    #[test]
    fn the_masking_analysis_reads_the_classifications_parse() {
        use super::super::maskcheck::{analyze, analyze_parsed, Rules};
        let rules = Rules::from_names(["accounts.ssn", "email"]);
        for sql in [
            "select ssn from accounts where id = 1",
            "select upper(ssn) from accounts",
            "select * from accounts a join t on a.id = t.id where email like 'a%'",
            "with x as (select ssn from accounts) select * from x",
            "insert into t select ssn from accounts",
            "select 1; select ssn from accounts where ssn = '1'",
            "select a.row_to_json from accounts a",
        ] {
            for c in classify(sql).unwrap() {
                let parsed = c
                    .parsed
                    .as_ref()
                    .expect("a fresh classification has its parse");
                assert_eq!(
                    analyze_parsed(parsed, &rules),
                    analyze(&c.text, &rules),
                    "{sql}"
                );
            }
        }
        // The parse under the other reading of backslashes is not kept.
        let c = classify("select E'\\n', ssn from accounts").unwrap();
        assert!(c[0].parsed.is_some());
    }

    #[test]
    fn sql_level_prepare_and_execute_name_their_statement() {
        let p = classify("prepare q(int) as select * from t where id = $1")
            .unwrap()
            .remove(0);
        assert_eq!(p.class, "select");
        assert_eq!(p.sql_prepare.as_deref(), Some("q"));
        let e = classify("execute q(1)").unwrap().remove(0);
        assert_eq!((e.class, e.sql_execute.as_deref()), ("other", Some("q")));
        assert!(!e.catalog_neutral);
        assert!(classify("lock table t").unwrap()[0].catalog_neutral);
        assert!(!classify("do $$ begin end $$").unwrap()[0].catalog_neutral);
    }
}
