//! Sound column masking for PostgreSQL: the statement analysis that keeps
//! masked columns out of everything but a plain output column, and the
//! catalog checks (views, user functions) that back it.
//!
//! Result masking (`rows.rs`) can only rewrite a value the server reports
//! as a column of a table (RowDescription's table OID and attribute
//! number). A masked column that goes through anything else (an
//! expression, a function, an aggregate, a cast, a subquery, a CTE, a set
//! operation, a whole-row reference, a view) comes back as a computed
//! value, which the server does not tie to the column. So on a resource
//! with column rules a statement may name a masked column only as a bare
//! top-level output column of the outermost SELECT or RETURNING; every
//! other reference, predicates included (`WHERE ssn LIKE '1%'` reads a
//! value bit by bit), is refused before it reaches the server.
//!
//! The analysis is conservative where names cannot be resolved without the
//! server: a table-qualified rule (`customers.ssn`) counts for a column
//! named `ssn` anywhere in a statement that names a table `customers`;
//! with an unqualified rule (`ssn`) every table may hold the column.
//!
//! Owns the analysis and its catalog queries; it must not decide policy or
//! write to the agent.

use std::{collections::BTreeSet, sync::Arc};

use bytes::BytesMut;
use pg_query::{
    protobuf::{a_const, node::Node as N, SetOperation},
    NodeEnum,
};
use serde_json::Value;

use super::{
    catalog::{Pool, Rows},
    classify::Parsed,
    codec,
    upstream::UpstreamError,
};
use crate::mask::Masker;

/// OIDs below this are the server's own (built-in) objects.
pub const FIRST_NORMAL_OID: u32 = 16384;

/// Built-in functions that run SQL given as text or dump whole tables,
/// out of sight of the parse tree: refused on a resource with column rules.
const DENIED_FUNCTIONS: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "schema_to_xml",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_logical_slot_get_changes",
    "pg_logical_slot_peek_changes",
    "pg_logical_slot_get_binary_changes",
    "pg_logical_slot_peek_binary_changes",
];

/// Catalog relations that hold sampled column values (most common values,
/// histogram bounds): refused on a resource with column rules.
const DENIED_RELATIONS: &[&str] = &[
    "pg_stats",
    "pg_statistic",
    "pg_stats_ext",
    "pg_stats_ext_exprs",
    "pg_statistic_ext_data",
];

/// Statements that create or run server-side code (or reach the data from
/// another side: extensions, foreign servers, publications), which would
/// read masked columns where no parse tree shows it.
const DENIED_STATEMENTS: &[(&str, &str)] = &[
    ("DoStmt", "DO"),
    ("CreateFunctionStmt", "CREATE FUNCTION/PROCEDURE"),
    ("CreateTrigStmt", "CREATE TRIGGER"),
    ("CreateEventTrigStmt", "CREATE EVENT TRIGGER"),
    ("RuleStmt", "CREATE RULE"),
    ("CreatePlangStmt", "CREATE LANGUAGE"),
    ("CreateCastStmt", "CREATE CAST"),
    ("DefineStmt", "CREATE AGGREGATE/OPERATOR/TYPE"),
    ("CreateTransformStmt", "CREATE TRANSFORM"),
    ("CreateConversionStmt", "CREATE CONVERSION"),
    ("AlterExtensionStmt", "ALTER EXTENSION"),
    ("AlterExtensionContentsStmt", "ALTER EXTENSION"),
    ("CreateFdwStmt", "CREATE FOREIGN DATA WRAPPER"),
    ("CreateForeignServerStmt", "CREATE SERVER"),
    ("CreateForeignTableStmt", "CREATE FOREIGN TABLE"),
    ("CreateUserMappingStmt", "CREATE USER MAPPING"),
    ("ImportForeignSchemaStmt", "IMPORT FOREIGN SCHEMA"),
    ("CreatePublicationStmt", "CREATE PUBLICATION"),
    ("AlterPublicationStmt", "ALTER PUBLICATION"),
    ("CreateSubscriptionStmt", "CREATE SUBSCRIPTION"),
];

/// Extensions whose functions and operators compute from their arguments
/// only (no SQL text, no table, file or page reads): once installed in the
/// database (by its owner, like the built-ins), calling them cannot read a
/// masked column out of sight. dblink, tablefunc (`crosstab` runs SQL
/// text), xml2, postgres_fdw, pageinspect and the like are not here.
pub const PURE_EXTENSIONS: &[&str] = &[
    "btree_gin",
    "btree_gist",
    "citext",
    "cube",
    "earthdistance",
    "fuzzystrmatch",
    "hstore",
    "intarray",
    "isn",
    "ltree",
    "pg_trgm",
    "pgcrypto",
    "seg",
    "unaccent",
    "uuid-ossp",
];

/// A resource's column rules, in the form the analysis needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// `col` rules: the column of any table.
    unqualified: BTreeSet<String>,
    /// `table.col` / `schema.table.col` rules as (bare table, column).
    qualified: BTreeSet<(String, String)>,
}

impl Rules {
    /// The rules of `masker` (lowercased, as the masker keeps them).
    pub fn from_masker(masker: &Masker) -> Self {
        Self::from_names(masker.column_rules())
    }

    /// Rules from their written names.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut r = Self::default();
        for n in names {
            let n = n.to_lowercase();
            let mut parts = n.rsplit('.');
            let col = parts.next().unwrap_or_default().to_string();
            match parts.next() {
                Some(table) => {
                    r.qualified.insert((table.to_string(), col));
                }
                None => {
                    r.unqualified.insert(col);
                }
            }
        }
        r
    }

    /// Whether no column rules exist (nothing to check).
    pub fn is_empty(&self) -> bool {
        self.unqualified.is_empty() && self.qualified.is_empty()
    }

    /// Whether a view or table named `relname` is itself named in a rule.
    pub fn names_relation(&self, relname: &str) -> bool {
        let r = relname.to_lowercase();
        self.qualified.iter().any(|(t, _)| *t == r)
    }
}

/// What the server's catalog must still answer before a statement that
/// passed [`analyze`] may run (see [`catalog_check`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lookups {
    /// Relations read (lowercased names): views over masked tables?
    pub relations: BTreeSet<String>,
    /// Functions called: user-defined ones are refused.
    pub functions: BTreeSet<String>,
    /// `alias.name` on a masked table where `name` is not a known masked
    /// column: `name` may be a function applied to the whole row
    /// (`c.row_to_json` is `row_to_json(c)`).
    pub row_functions: BTreeSet<String>,
    /// Operators used: user-defined ones run user functions.
    pub operators: BTreeSet<String>,
    /// Extensions `CREATE EXTENSION` names (as written): only one already
    /// installed is allowed, which makes the statement a no-op (or an
    /// "already exists" error) that adds no code.
    pub extensions: BTreeSet<String>,
}

impl Lookups {
    /// Whether nothing needs the catalog.
    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
            && self.functions.is_empty()
            && self.row_functions.is_empty()
            && self.operators.is_empty()
            && self.extensions.is_empty()
    }
}

/// Analyzes one statement (`sql` holds exactly one) against `rules`:
/// `Err` with the reason when it would let a masked column out unmasked,
/// else what the catalog must still check.
pub fn analyze(sql: &str, rules: &Rules) -> Result<Lookups, String> {
    analyze_text(sql, rules).0
}

/// [`analyze`], and whether its answer holds for every statement of
/// `sql`'s shape (see [`Analyzed`]).
fn analyze_text(sql: &str, rules: &Rules) -> Analyzed {
    let parsed = match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
        Ok(p) => p,
        Err(e) => return (Err(format!("cannot parse the statement: {e}")), false),
    };
    let mut stmts = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
            continue;
        };
        match serde_json::to_value(node) {
            Ok(tree) => stmts.push((node, tree)),
            Err(e) => return (Err(format!("cannot inspect the statement: {e}")), false),
        }
    }
    analyze_trees(stmts.iter().map(|(n, t)| (*n, t)), rules)
}

/// [`analyze`] of a statement already parsed (by classification: see
/// [`super::classify::Parsed`]).
pub fn analyze_parsed(parsed: &Parsed, rules: &Rules) -> Result<Lookups, String> {
    analyze_trees(parsed.statements(), rules).0
}

/// An analysis, and whether it holds for the statement's whole shape: the
/// statement is one SELECT, INSERT, UPDATE or DELETE, and the analysis read
/// no constant's value (the only one it ever reads is a position in ORDER
/// BY, GROUP BY or DISTINCT ON; every other thing it reads is a keyword,
/// an identifier, an operator or the tree's structure). The session's memo
/// of analyses by shape ([`super::analyses`]) keeps only those.
pub(super) type Analyzed = (Result<Lookups, String>, bool);

/// [`analyze`] of `parsed` when given (`sql`'s own parse), else of `sql`,
/// with whether the answer holds for the whole shape (see [`Analyzed`]).
pub(super) fn analyze_for_shape(sql: &str, parsed: Option<&Parsed>, rules: &Rules) -> Analyzed {
    match parsed {
        Some(p) => analyze_trees(p.statements(), rules),
        None => analyze_text(sql, rules),
    }
}

fn analyze_trees<'t>(
    stmts: impl Iterator<Item = (&'t NodeEnum, &'t Value)>,
    rules: &Rules,
) -> Analyzed {
    let mut walk = Walk {
        rules,
        referenced: BTreeSet::new(),
        rowish: BTreeSet::new(),
        aliases: BTreeSet::new(),
        lookups: Lookups::default(),
        read_constant: false,
    };
    let (mut count, mut plain) = (0usize, true);
    let run = || -> Result<(), String> {
        for (node, tree) in stmts {
            count += 1;
            plain &= matches!(
                node,
                NodeEnum::SelectStmt(_)
                    | NodeEnum::InsertStmt(_)
                    | NodeEnum::UpdateStmt(_)
                    | NodeEnum::DeleteStmt(_)
            );
            walk.collect(tree)?;
            if !walk.rowish.is_empty() {
                let aliases = std::mem::take(&mut walk.aliases);
                walk.rowish.extend(aliases);
            }
            walk.statement(node, tree)?;
        }
        Ok(())
    };
    let result = run();
    let holds = count == 1 && plain && !walk.read_constant;
    (result.map(|()| walk.lookups), holds)
}

/// Where in the statement a reference sits (for the refusal's words).
#[derive(Debug, Clone, Copy)]
struct Ctx {
    clause: &'static str,
    /// Directly in the target list of an EXISTS subquery, whose values
    /// are never returned.
    exists_targets: bool,
}

impl Ctx {
    const TOP: Self = Self {
        clause: "an expression",
        exists_targets: false,
    };

    fn field(self, key: &str) -> Self {
        let clause = match key {
            "where_clause" => "a WHERE clause",
            "having_clause" => "a HAVING clause",
            "sort_clause" => "ORDER BY",
            "group_clause" => "GROUP BY",
            "distinct_clause" => "DISTINCT ON",
            "quals" | "join_condition" => "a join condition",
            "window_clause" | "over" => "a window definition",
            "limit_count" | "limit_offset" => "LIMIT/OFFSET",
            "with_clause" | "ctes" => "a WITH query (CTE)",
            "larg" | "rarg" => "a set operation (UNION/INTERSECT/EXCEPT)",
            "values_lists" => "VALUES",
            "subselect" | "subquery" => "a subquery",
            // Inside a predicate it stays a predicate.
            "args" | "lexpr" | "rexpr" | "arg" if self.clause == Ctx::TOP.clause => {
                "an expression or function call"
            }
            "select_stmt" => "INSERT ... SELECT",
            "query" => "a statement that stores or copies a query's result",
            _ => self.clause,
        };
        Self {
            clause,
            exists_targets: false,
        }
    }
}

struct Walk<'a> {
    rules: &'a Rules,
    /// Relation names the statement names (lowercased).
    referenced: BTreeSet<String>,
    /// Names (relation names and aliases) of relations that may hold a
    /// masked column: a bare reference to one is its whole row.
    rowish: BTreeSet<String>,
    /// Aliases of subqueries, joins and functions in FROM: whole rows that
    /// may carry a masked table's columns.
    aliases: BTreeSet<String>,
    lookups: Lookups,
    /// The analysis read a constant's value (a position in ORDER BY,
    /// GROUP BY or DISTINCT ON): it does not hold for the whole shape.
    read_constant: bool,
}

fn lower(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_lowercase)
}

/// The name of a `String` node (`{"node": {"String": {"sval": ..}}}` or
/// `{"String": ..}`).
fn string_node(v: &Value) -> Option<String> {
    let v = v.get("node").unwrap_or(v);
    lower(v.get("String")?.get("sval"))
}

/// The last name of a list of `String` nodes (a qualified function or
/// operator name).
fn last_name(list: Option<&Value>) -> Option<String> {
    list?.as_array()?.iter().rev().find_map(string_node)
}

/// The variant and payload of a node (`{"node": {"X": {...}}}` or `{"X":
/// {...}}`).
fn variant(v: &Value) -> Option<(&str, &Value)> {
    let v = v.get("node").unwrap_or(v);
    let o = v.as_object()?;
    if o.len() != 1 {
        return None;
    }
    let (k, x) = o.iter().next()?;
    k.starts_with(|c: char| c.is_ascii_uppercase())
        .then_some((k.as_str(), x))
}

/// One field of a ColumnRef.
enum Field {
    Name(String),
    Star,
}

fn colref_fields(payload: &Value) -> Vec<Field> {
    payload
        .get("fields")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|f| match variant(f) {
                    Some(("AStar", _)) => Field::Star,
                    _ => Field::Name(string_node(f).unwrap_or_default()),
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Walk<'_> {
    /// Whether a column named `name` may be a masked column here.
    fn masked(&self, name: &str) -> bool {
        self.rules.unqualified.contains(name)
            || self
                .rules
                .qualified
                .iter()
                .any(|(t, c)| c == name && self.referenced.contains(t))
    }

    /// Whether a relation named `relname` may hold a masked column.
    fn maskable(&self, relname: &str) -> bool {
        !self.rules.unqualified.is_empty() || self.rules.qualified.iter().any(|(t, _)| t == relname)
    }

    /// First pass: relations, functions, operators, refused statements.
    fn collect(&mut self, v: &Value) -> Result<(), String> {
        match v {
            Value::Array(a) => a.iter().try_for_each(|x| self.collect(x)),
            Value::Object(o) => {
                // A RangeVar, wrapped in a node or not.
                if o.contains_key("relname") && o.contains_key("relpersistence") {
                    if let Some(rel) = lower(o.get("relname")) {
                        if DENIED_RELATIONS.contains(&rel.as_str()) {
                            return Err(format!(
                                "{rel} holds sampled values of table columns and is not readable on a resource with column masking rules"
                            ));
                        }
                        // The system catalogs, named with their schema
                        // (which nothing can shadow), hold no table data.
                        let system = matches!(
                            lower(o.get("schemaname")).as_deref(),
                            Some("pg_catalog" | "information_schema")
                        ) && !self.rules.names_relation(&rel);
                        if self.maskable(&rel) && !system {
                            self.rowish.insert(rel.clone());
                            if let Some(a) = lower(o.get("alias").and_then(|a| a.get("aliasname")))
                            {
                                self.rowish.insert(a);
                            }
                        }
                        self.referenced.insert(rel.clone());
                        self.lookups.relations.insert(rel);
                    }
                } else {
                    for key in ["alias", "join_using_alias"] {
                        if let Some(a) = lower(o.get(key).and_then(|a| a.get("aliasname"))) {
                            self.aliases.insert(a);
                        }
                    }
                }
                // A FuncCall, wrapped in a node or not (CALL's is not).
                if o.contains_key("funcname") && o.contains_key("agg_star") {
                    if let Some(f) = last_name(o.get("funcname")) {
                        if DENIED_FUNCTIONS.contains(&f.as_str()) {
                            return Err(format!(
                                "function {f} runs SQL text or reads whole tables out of sight and is not allowed on a resource with column masking rules"
                            ));
                        }
                        self.lookups.functions.insert(f);
                    }
                }
                for (k, x) in o {
                    if k == "CreateExtensionStmt" {
                        // Allowed only for an installed extension (the
                        // catalog check): then it installs nothing.
                        let name = x.get("extname").and_then(Value::as_str).unwrap_or_default();
                        self.lookups.extensions.insert(name.to_string());
                    }
                    // CREATE COLLATION is a DefineStmt too, but a collation
                    // is a locale of the server's own providers (libc, ICU):
                    // it runs no code of the agent's.
                    let collation = k == "DefineStmt"
                        && x.get("kind").and_then(Value::as_i64)
                            == Some(pg_query::protobuf::ObjectType::ObjectCollation as i64);
                    if let Some((_, what)) = DENIED_STATEMENTS
                        .iter()
                        .find(|(n, _)| n == k)
                        .filter(|_| !collation)
                    {
                        return Err(format!(
                            "{what} is not allowed on a resource with column masking rules: server-side code could read masked columns where Portcullis cannot see it"
                        ));
                    }
                    // Operators: in expressions, `ORDER BY ... USING op`
                    // and `x op ANY (subquery)`.
                    let ops = match k.as_str() {
                        "AExpr" => x.get("name"),
                        "use_op" | "oper_name" => Some(x),
                        _ => None,
                    };
                    if let Some(op) = last_name(ops) {
                        self.lookups.operators.insert(op);
                    }
                    self.collect(x)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Second pass over one top-level statement: the outermost SELECT's
    /// target list and DML's RETURNING may name masked columns bare.
    fn statement(&mut self, node: &NodeEnum, tree: &Value) -> Result<(), String> {
        let top_key = match node {
            NodeEnum::SelectStmt(s)
                if s.op == SetOperation::SetopNone as i32 && s.into_clause.is_none() =>
            {
                self.positional(s)?;
                Some("target_list")
            }
            NodeEnum::InsertStmt(_)
            | NodeEnum::UpdateStmt(_)
            | NodeEnum::DeleteStmt(_)
            | NodeEnum::MergeStmt(_) => Some("returning_clause"),
            _ => None,
        };
        let Some((kind, payload)) = variant(tree) else {
            return self.walk(tree, Ctx::TOP);
        };
        let (Some(top_key), Some(fields)) = (top_key, payload.as_object()) else {
            return self.node(kind, payload, Ctx::TOP);
        };
        for (k, x) in fields {
            if k != top_key {
                self.walk(x, Ctx::TOP.field(k))?;
                continue;
            }
            let list = if k == "returning_clause" {
                // ReturningClause { options, exprs }
                self.walk(x.get("options").unwrap_or(&Value::Null), Ctx::TOP)?;
                x.get("exprs")
            } else {
                Some(x)
            };
            for item in list.and_then(Value::as_array).into_iter().flatten() {
                self.target(item, true, Ctx::TOP)?;
            }
        }
        Ok(())
    }

    /// One ResTarget of a target list; `top`: the outermost one.
    fn target(&mut self, item: &Value, top: bool, ctx: Ctx) -> Result<(), String> {
        let Some(("ResTarget", t)) = variant(item) else {
            return self.walk(item, ctx);
        };
        if let Some(o) = t.as_object() {
            for (k, x) in o {
                if k == "val" {
                    match variant(x) {
                        Some(("ColumnRef", c)) => self.colref(c, top, ctx)?,
                        _ => self.walk(x, ctx.field("args"))?,
                    }
                } else {
                    self.walk(x, ctx)?;
                }
            }
        }
        Ok(())
    }

    /// ORDER BY / GROUP BY / DISTINCT ON by position (`ORDER BY 1`) or by
    /// output name (`ssn AS x ... ORDER BY x`) on a masked output column
    /// sorts or groups by its value: refused like a predicate.
    fn positional(&mut self, s: &pg_query::protobuf::SelectStmt) -> Result<(), String> {
        // Per output column: its alias, and whether it is (or may be,
        // for `*`) a masked column.
        let targets: Vec<(Option<String>, bool, bool)> = s
            .target_list
            .iter()
            .map(|n| match &n.node {
                Some(N::ResTarget(t)) => {
                    let (masked, star) = match t.val.as_ref().and_then(|v| v.node.as_ref()) {
                        Some(N::ColumnRef(c)) => {
                            match c.fields.last().and_then(|f| f.node.as_ref()) {
                                Some(N::AStar(_)) => (false, true),
                                Some(N::String(name)) => {
                                    (self.masked(&name.sval.to_lowercase()), false)
                                }
                                _ => (false, false),
                            }
                        }
                        _ => (false, false),
                    };
                    let alias = (!t.name.is_empty()).then(|| t.name.to_lowercase());
                    (alias, masked, star)
                }
                _ => (None, false, false),
            })
            .collect();
        let sort = s.sort_clause.iter().filter_map(|n| match &n.node {
            Some(N::SortBy(b)) => b.node.as_deref(),
            _ => None,
        });
        // GROUP BY ROLLUP/CUBE/GROUPING SETS hold positions and names too.
        fn flatten<'n>(
            n: &'n pg_query::protobuf::Node,
            out: &mut Vec<&'n pg_query::protobuf::Node>,
        ) {
            match &n.node {
                Some(N::GroupingSet(g)) => g.content.iter().for_each(|c| flatten(c, out)),
                Some(N::RowExpr(r)) => r.args.iter().for_each(|c| flatten(c, out)),
                _ => out.push(n),
            }
        }
        let mut items = Vec::new();
        for n in sort
            .chain(s.group_clause.iter())
            .chain(s.distinct_clause.iter())
        {
            flatten(n, &mut items);
        }
        for item in items {
            match &item.node {
                Some(N::AConst(c)) => {
                    self.read_constant = true;
                    if let Some(a_const::Val::Ival(i)) = &c.val {
                        let n = usize::try_from(i.ival).unwrap_or(0);
                        let upto = targets.iter().take(n);
                        if upto.clone().any(|t| t.2)
                            || targets.get(n.wrapping_sub(1)).is_some_and(|t| t.1)
                        {
                            return Err(format!(
                                "ORDER BY/GROUP BY/DISTINCT ON position {n} may be a masked column (or lies within `*`): sorting or grouping by a masked column reveals its value; name an unmasked column instead"
                            ));
                        }
                    }
                }
                Some(N::ColumnRef(c)) if c.fields.len() == 1 => {
                    if let Some(N::String(name)) = c.fields.first().and_then(|f| f.node.as_ref()) {
                        let name = name.sval.to_lowercase();
                        if targets
                            .iter()
                            .any(|t| t.0.as_deref() == Some(name.as_str()) && (t.1 || t.2))
                        {
                            return Err(format!(
                                "ORDER BY/GROUP BY/DISTINCT ON {name} names an output column that is a masked column: sorting or grouping by it reveals its value"
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn walk(&mut self, v: &Value, ctx: Ctx) -> Result<(), String> {
        match v {
            Value::Array(a) => a.iter().try_for_each(|x| self.walk(x, ctx)),
            Value::Object(o) => {
                for (k, x) in o {
                    if k.starts_with(|c: char| c.is_ascii_uppercase()) {
                        self.node(k, x, ctx)?;
                    } else {
                        self.walk(x, ctx.field(k))?;
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A node of kind `kind` with its fields `payload`.
    fn node(&mut self, kind: &str, payload: &Value, ctx: Ctx) -> Result<(), String> {
        match kind {
            "ColumnRef" => self.colref(payload, false, ctx),
            "SubLink" => {
                let exists = payload.get("sub_link_type").and_then(Value::as_i64) == Some(1);
                if let Some(o) = payload.as_object() {
                    for (k, x) in o {
                        match (k.as_str(), exists, variant(x)) {
                            ("subselect", true, Some(("SelectStmt", s))) => {
                                let inner = Ctx {
                                    clause: "a subquery",
                                    exists_targets: true,
                                };
                                self.node("SelectStmt", s, inner)?;
                            }
                            _ => self.walk(x, ctx.field(k))?,
                        }
                    }
                }
                Ok(())
            }
            "SelectStmt" if ctx.exists_targets => {
                // EXISTS (SELECT ssn FROM ...): the target list is never
                // returned; a bare column or `*` there reveals nothing.
                if let Some(o) = payload.as_object() {
                    let inner = Ctx {
                        exists_targets: false,
                        ..ctx
                    };
                    for (k, x) in o {
                        if k == "target_list" {
                            for item in x.as_array().into_iter().flatten() {
                                match variant(item) {
                                    Some(("ResTarget", t))
                                        if matches!(
                                            t.get("val").and_then(variant),
                                            Some(("ColumnRef", _))
                                        ) => {}
                                    _ => self.walk(item, inner)?,
                                }
                            }
                        } else {
                            self.walk(x, inner.field(k))?;
                        }
                    }
                }
                Ok(())
            }
            "JoinExpr" => {
                for name in payload
                    .get("using_clause")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(string_node)
                {
                    if self.masked(&name) {
                        return Err(format!(
                            "column \"{name}\" is masked: JOIN ... USING ({name}) compares its values, which reveals them"
                        ));
                    }
                }
                if payload.get("is_natural").and_then(Value::as_bool) == Some(true)
                    && !self.rowish.is_empty()
                {
                    return Err("NATURAL JOIN on a table with masked columns may compare masked columns, which reveals their values; join with ON on unmasked columns".into());
                }
                self.walk(payload, ctx)
            }
            "AlterTableStmt" => {
                // Making a ruled table a child (INHERIT) or a partition
                // (ATTACH PARTITION) of another shows its rows under the
                // other table's name, which its rules do not cover.
                let ruled = |rel: Option<String>| {
                    rel.is_some_and(|r| self.rules.qualified.iter().any(|(t, _)| *t == r))
                };
                let rel = lower(payload.get("relation").and_then(|r| r.get("relname")));
                for cmd in payload
                    .get("cmds")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|c| match variant(c) {
                        Some(("AlterTableCmd", c)) => Some(c),
                        _ => None,
                    })
                {
                    let attached = cmd
                        .get("def")
                        .and_then(variant)
                        .and_then(|(k, d)| (k == "PartitionCmd").then_some(d))
                        .and_then(|d| lower(d.get("name").and_then(|n| n.get("relname"))));
                    let subtype = cmd.get("subtype").and_then(Value::as_i64);
                    if (subtype == Some(50) && ruled(rel.clone()))
                        || (subtype == Some(60) && ruled(attached))
                    {
                        return Err("a table named in a column masking rule cannot be made a child (INHERIT) or a partition of another table: its rows would be read under a name the rule does not cover".into());
                    }
                    // The reverse: a child or partition is masked through
                    // its ancestors' rules (however far up), so taking it
                    // out of its hierarchy (NO INHERIT, DETACH PARTITION
                    // [FINALIZE]) would unmask it. Which ancestors are
                    // ruled is the catalog's to say; refuse rather than
                    // look it up.
                    if matches!(subtype, Some(51 | 61 | 62)) {
                        return Err("on a resource with column masking rules a table cannot be taken out of its inheritance or partition hierarchy (NO INHERIT, DETACH PARTITION): it may be masked through an ancestor's rules, which would no longer cover it".into());
                    }
                }
                self.walk(payload, ctx)
            }
            "RenameStmt" | "AlterObjectSchemaStmt" => {
                let rel = lower(payload.get("relation").and_then(|r| r.get("relname")));
                if rel
                    .as_deref()
                    .is_some_and(|r| self.rules.qualified.iter().any(|(t, _)| t == r))
                {
                    return Err("renaming a table named in a column masking rule (or moving it to another schema) would take its columns out of the rule".into());
                }
                let column = payload.get("rename_type").and_then(Value::as_i64) == Some(7);
                if let Some(sub) = lower(payload.get("subname")) {
                    if column && self.rules.unqualified.contains(&sub) {
                        return Err(format!(
                            "renaming masked column \"{sub}\" would take it out of its masking rule"
                        ));
                    }
                }
                self.walk(payload, ctx)
            }
            _ => self.walk(payload, ctx),
        }
    }

    /// A column reference; `top`: a bare output column of the outermost
    /// SELECT or RETURNING, which result masking covers.
    fn colref(&mut self, payload: &Value, top: bool, ctx: Ctx) -> Result<(), String> {
        if ctx.exists_targets {
            return Ok(());
        }
        let fields = colref_fields(payload);
        let qualifier = match fields.len().checked_sub(2).and_then(|i| fields.get(i)) {
            Some(Field::Name(q)) => Some(q.as_str()),
            _ => None,
        };
        match fields.last() {
            Some(Field::Star) => {
                if top {
                    return Ok(());
                }
                let risky = match qualifier {
                    Some(q) => self.rowish.contains(q),
                    None => !self.rowish.is_empty(),
                };
                if risky {
                    return Err(format!(
                        "`*` of a table with masked columns is used in {}: only a top-level `SELECT *` (or `t.*`) is masked; name the unmasked columns instead",
                        ctx.clause
                    ));
                }
                Ok(())
            }
            Some(Field::Name(n)) => {
                if self.masked(n) {
                    if top {
                        return Ok(());
                    }
                    return Err(format!(
                        "column \"{n}\" is masked: it may only be read as a plain output column (SELECT {n} ... or RETURNING {n}), which Portcullis masks; here it is used in {}, which would reveal its value (expressions, functions, casts, aggregates, subqueries, CTEs, set operations and predicates on masked columns are refused)",
                        ctx.clause
                    ));
                }
                if (fields.len() == 1 || qualifier.is_some()) && self.rowish.contains(n) {
                    return Err(format!(
                        "\"{n}\" refers to a whole row of a table with masked columns: a row value is not masked; select its columns by name instead"
                    ));
                }
                if qualifier.is_some_and(|q| self.rowish.contains(q)) {
                    self.lookups.row_functions.insert(n.clone());
                }
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// A `text[]` expression holding `items`. The names travel hex-encoded
/// (as in `functions`): no quoting a session setting could read
/// differently, and the agent's identifiers never appear as SQL text in
/// the server's statement log.
fn text_array(items: &BTreeSet<String>) -> String {
    super::upstream::hex_array(items.iter().map(String::as_str), "text")
}

/// The catalog query for `l`: rows of (kind, a, b, c) as text.
///
/// `v` rows: every column a view read (directly or through the views it
/// reads) depends on, from its rewrite rule's dependencies, which
/// PostgreSQL records per column (a whole-table reference, such as
/// `count(*)`, counts as every column). `vf`: user functions a view
/// calls. `f`: functions by name (user-defined? first argument a row?).
/// `a`: the ancestors (inheritance parents, partitioned tables) of the
/// relations read: a partition's rows are its parent's. `o`: user-defined
/// operators by name, except those of an installed
/// extension (citext's `=`, hstore's `->`), which the database owner put
/// there like the built-ins.
fn catalog_sql(l: &Lookups) -> String {
    let mut funcs = l.functions.clone();
    funcs.extend(l.row_functions.iter().cloned());
    format!(
        "WITH RECURSIVE r(top, rel) AS ( \
           SELECT c.oid, c.oid FROM pg_catalog.pg_class c \
            WHERE c.relkind IN ('v', 'm') AND pg_catalog.lower(c.relname) = ANY({rels}) \
           UNION \
           SELECT r.top, d.refobjid FROM r \
             JOIN pg_catalog.pg_rewrite w ON w.ev_class = r.rel \
             JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
              AND d.objid = w.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
              AND d.refobjid <> r.rel), \
         anc(rel, parent) AS ( \
           SELECT i.inhrelid, i.inhparent FROM pg_catalog.pg_inherits i \
           UNION \
           SELECT anc.rel, i.inhparent FROM anc JOIN pg_catalog.pg_inherits i ON i.inhrelid = anc.parent) \
         SELECT 'v', t.relname::text, n.nspname || '.' || bn.relname, a.attname::text FROM r \
           JOIN pg_catalog.pg_class t ON t.oid = r.top \
           JOIN pg_catalog.pg_rewrite w ON w.ev_class = r.rel \
           JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
            AND d.objid = w.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
            AND d.refobjid <> r.rel \
           JOIN pg_catalog.pg_class b ON b.oid = d.refobjid \
           JOIN pg_catalog.pg_attribute a ON a.attrelid = b.oid AND a.attnum > 0 AND NOT a.attisdropped \
            AND (d.refobjsubid = 0 OR a.attnum = d.refobjsubid) \
           JOIN LATERAL (SELECT b.oid AS named UNION ALL SELECT anc.parent FROM anc WHERE anc.rel = b.oid) nm ON true \
           JOIN pg_catalog.pg_class bn ON bn.oid = nm.named \
           JOIN pg_catalog.pg_namespace n ON n.oid = bn.relnamespace \
         UNION ALL \
         SELECT 'vf', t.relname::text, p.proname::text, NULL FROM r \
           JOIN pg_catalog.pg_class t ON t.oid = r.top \
           JOIN pg_catalog.pg_rewrite w ON w.ev_class = r.rel \
           JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
            AND d.objid = w.oid AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass \
           JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid WHERE p.oid >= {first} \
         UNION ALL \
         SELECT 'f', p.proname::text, \
                (p.oid >= {first} AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend e \
                   JOIN pg_catalog.pg_extension x ON x.oid = e.refobjid \
                  WHERE e.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND e.objid = p.oid \
                    AND e.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass \
                    AND e.deptype = 'e' AND x.extname::text = ANY({pure})))::text, \
                (p.prokind = 'f' AND (p.provariadic <> 0 OR ty.typtype IN ('p', 'c')))::text \
           FROM pg_catalog.pg_proc p LEFT JOIN pg_catalog.pg_type ty ON ty.oid = p.proargtypes[0] \
          WHERE pg_catalog.lower(p.proname) = ANY({funcs}) \
         UNION ALL \
         SELECT 'x', x.extname::text, NULL, NULL FROM pg_catalog.pg_extension x \
          WHERE x.extname::text = ANY({exts}) \
         UNION ALL \
         SELECT 'a', pg_catalog.lower(c.relname), pg_catalog.lower(p.relname), NULL FROM anc \
           JOIN pg_catalog.pg_class c ON c.oid = anc.rel \
           JOIN pg_catalog.pg_class p ON p.oid = anc.parent \
          WHERE pg_catalog.lower(c.relname) = ANY({rels}) \
         UNION ALL \
         SELECT 'o', o.oprname::text, NULL, NULL FROM pg_catalog.pg_operator o \
          WHERE o.oid >= {first} AND o.oprname = ANY({ops}) \
            AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend e \
              WHERE e.classid = 'pg_catalog.pg_operator'::pg_catalog.regclass \
                AND e.objid = o.oid AND e.deptype = 'e')",
        rels = text_array(&l.relations),
        funcs = text_array(&funcs),
        ops = text_array(&l.operators),
        exts = text_array(&l.extensions),
        pure = super::upstream::hex_array(PURE_EXTENSIONS.iter().copied(), "text"),
        first = FIRST_NORMAL_OID,
    )
}

/// Catalog queries formatted lately, on this thread.
const CATALOG_QUERIES_MAX: usize = 8;

thread_local! {
    static CATALOG_QUERIES: std::cell::RefCell<Vec<(Lookups, Arc<str>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// [`catalog_sql`] of `l`, remembered on this thread for the last few
/// lookups (a pure function of `l`: a statement of a shape seen before
/// asks the same thing, and formatting the query's ~3 KiB per statement
/// was a measurable part of a masked statement's cost).
fn catalog_query(l: &Lookups) -> Arc<str> {
    CATALOG_QUERIES.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((_, sql)) = c.iter().find(|(k, _)| k == l) {
            return sql.clone();
        }
        let sql: Arc<str> = catalog_sql(l).into();
        if c.len() >= CATALOG_QUERIES_MAX {
            c.remove(0);
        }
        c.push((l.clone(), sql.clone()));
        sql
    })
}

/// Judges the catalog's answer to [`catalog_sql`]: the first reason to
/// refuse, if any.
fn judge(
    l: &Lookups,
    masker: &Masker,
    rules: &Rules,
    rows: &[Vec<Option<String>>],
) -> Option<String> {
    let col = |r: &Vec<Option<String>>, i: usize| r.get(i).cloned().flatten().unwrap_or_default();
    for ext in &l.extensions {
        if !rows.iter().any(|r| col(r, 0) == "x" && col(r, 1) == *ext) {
            return Some(format!(
                "CREATE EXTENSION {ext}: the extension is not installed in this database, and on a resource with column masking rules only an installed one may be named (installing one adds server-side code that could read masked columns where Portcullis cannot see it)"
            ));
        }
    }
    for r in rows {
        match col(r, 0).as_str() {
            "v" => {
                let (view, base, attname) = (col(r, 1), col(r, 2), col(r, 3));
                if !rules.names_relation(&view) && masker.column(Some(&base), &attname).is_some() {
                    return Some(format!(
                        "view {view} reads masked column {attname} of {base}: a view's columns are computed, so its values would not be masked; read {base} directly, or name the view in a column rule"
                    ));
                }
            }
            "vf" => {
                let (view, func) = (col(r, 1), col(r, 2));
                if !rules.names_relation(&view) {
                    return Some(format!(
                        "view {view} calls user-defined function {func}, which could read masked columns out of sight"
                    ));
                }
            }
            "f" => {
                let (name, user, row) = (col(r, 1), col(r, 2) == "true", col(r, 3) == "true");
                let lname = name.to_lowercase();
                if user && l.functions.contains(&lname) {
                    return Some(format!(
                        "function {name} is not built in: on a resource with column masking rules only built-in functions (and those of the installed extensions that compute from their arguments only, such as hstore and citext) may be called (a user-defined function can read masked columns out of sight)"
                    ));
                }
                if (row || user) && l.row_functions.contains(&lname) {
                    return Some(format!(
                        "`.{name}` on a table with masked columns may call function {name} on the whole row, which is not masked; select its columns by name instead"
                    ));
                }
            }
            "o" => {
                return Some(format!(
                    "operator {} is user-defined: on a resource with column masking rules it could run code that reads masked columns out of sight",
                    col(r, 1)
                ));
            }
            _ => {}
        }
    }
    None
}

/// `rules` extended to the relations the catalog names as children or
/// partitions of a table in a rule (`a` rows): `customers_p1.ssn` when
/// `customers.ssn` is masked and `customers_p1` is one of its partitions.
fn inherited(rules: &Rules, rows: &[Vec<Option<String>>]) -> Rules {
    let mut out = rules.clone();
    for r in rows {
        let cell = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        if cell(0) != "a" {
            continue;
        }
        let (rel, parent) = (cell(1), cell(2));
        for (t, c) in &rules.qualified {
            if *t == parent {
                out.qualified.insert((rel.clone(), c.clone()));
            }
        }
    }
    out
}

/// Where [`check_statement`] reads the server's catalog.
pub(super) trait CatalogSource {
    /// The rows of `sql`; `Err` is the whole reason to refuse.
    async fn rows(&mut self, sql: &str) -> Result<Arc<Rows>, String>;
}

/// The daemon's catalog side connections (cached while that is sound: see
/// [`super::catalog`]). They see committed catalog only.
pub(super) struct PoolSource<'a>(pub Option<&'a Arc<Pool>>);

impl CatalogSource for PoolSource<'_> {
    async fn rows(&mut self, sql: &str) -> Result<Arc<Rows>, String> {
        let Some(pool) = self.0 else {
            return Err("column masking cannot be checked: no catalog connection".into());
        };
        pool.query(sql).await.map_err(|e: UpstreamError| {
            format!(
                "column masking cannot be checked: the server's catalog could not be read ({e})"
            )
        })
    }
}

/// The reason a statement that needs the catalog is refused when only
/// the session's own open transaction could answer and it cannot be
/// asked now.
pub const STALE: &str = "column masking cannot be checked: this session changed the catalog in a transaction (or batch) that has not ended, and Portcullis could not read the catalog as this transaction sees it (it asks the session's own connection only between statements, when the server is idle in the transaction, not inside a pipeline or a batch after the change); send this statement on its own, or after the change is committed";

/// No catalog can answer (see [`STALE`]).
pub(super) struct Stale;

impl CatalogSource for Stale {
    async fn rows(&mut self, _sql: &str) -> Result<Arc<Rows>, String> {
        Err(STALE.into())
    }
}

/// Checks one statement (`sql`, exactly one) on a resource with column
/// rules: the parse-tree analysis, then the catalog checks read from
/// `source`. `Err` is the reason to refuse; a catalog that cannot be read
/// refuses (fail closed). The side connections' answers are cached only
/// while a change made anywhere (through Portcullis or directly on the
/// server) ends them ([`super::catalog`]); the verdict itself is judged
/// anew each time.
///
/// After the session changed the catalog in a transaction that has not
/// ended, no side connection can see that change: `source` is then the
/// session's own connection, or [`Stale`].
///
/// `first`, when given, is the analysis of `sql` under the rules of
/// `masker` already made (from a session's memo of analyses,
/// [`super::analyses`]): it is used instead of analyzing again.
pub(super) async fn check_statement(
    source: &mut impl CatalogSource,
    sql: &str,
    parsed: Option<&Parsed>,
    masker: &Masker,
    masker_rules: &Rules,
    first: Option<Result<Lookups, String>>,
) -> Result<(), String> {
    let rules = std::borrow::Cow::Borrowed(masker_rules);
    if rules.is_empty() {
        return Ok(());
    }
    // The classification's parse when it came with one (`sql`'s own,
    // default reading), else `sql` parsed here.
    let analyze = |rules: &Rules| match parsed {
        Some(p) => analyze_parsed(p, rules),
        None => analyze(sql, rules),
    };
    let lookups = first.unwrap_or_else(|| analyze(&rules))?;
    if lookups.is_empty() {
        return Ok(());
    }
    // A partition or child of a ruled table is that table: analyze again
    // with the rules extended to it (and ask the catalog about anything the
    // new analysis needs). Ancestors do not depend on the rules, so this
    // settles on the second round.
    let (mut rules, mut lookups) = (rules, lookups);
    for _ in 0..3 {
        let rows = source.rows(&catalog_query(&lookups)).await?;
        if let Some(reason) = judge(&lookups, masker, masker_rules, &rows) {
            return Err(reason);
        }
        let wider = inherited(&rules, &rows);
        if wider == *rules {
            return Ok(());
        }
        let again = analyze(&wider)?;
        if again == lookups {
            return Ok(());
        }
        (rules, lookups) = (std::borrow::Cow::Owned(wider), again);
    }
    Err("column masking cannot be checked: the table inheritance did not settle".into())
}

/// Rewrites a server ErrorResponse/NoticeResponse body without its DETAIL
/// field into a whole frame: on a resource with column rules a DETAIL can
/// quote a row (`Failing row contains (...)`, `Key (ssn)=(...)`).
pub fn put_without_detail(out: &mut BytesMut, tag: u8, body: &[u8]) {
    let fields = codec::error_fields(body);
    codec::put_msg(out, tag, |b| {
        for (k, v) in &fields {
            if *k != b'D' {
                bytes::BufMut::put_u8(b, *k);
                codec::put_cstr(b, v);
            }
        }
        bytes::BufMut::put_u8(b, 0);
    });
}

#[cfg(test)]
mod tests;
