//! `COPY table TO` on a resource with column masking rules: refused only
//! when the table (or an ancestor it inherits its rows from) has a column a
//! rule masks among the columns copied. COPY output is not described
//! column by column, so a masked column in it could not be masked; every
//! other table copies as it does directly (`pg_dump`, psql's `\copy ... to`,
//! asyncpg's `copy_from_table`).
//!
//! Owns that one check. `COPY (query) TO` is left to the statement analysis
//! (`maskcheck`), which refuses a masked column anywhere inside the query.
//! It must not decide anything else.

use pg_query::NodeEnum;

use super::{catalog::Pool, upstream::UpstreamError};
use crate::mask::Masker;

/// A `COPY table TO`: (schema if named, table, columns copied; empty: all).
type Copied = (Option<String>, String, Vec<String>);

/// The `COPY table TO` statements of `sql`.
fn copied_tables(sql: &str) -> Result<Vec<Copied>, String> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT)
        .map_err(|e| format!("cannot parse the statement: {e}"))?;
    let mut out = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let Some(NodeEnum::CopyStmt(c)) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
            continue;
        };
        if c.is_from {
            continue;
        }
        let Some(rel) = &c.relation else { continue };
        let columns = c
            .attlist
            .iter()
            .filter_map(|n| match &n.node {
                Some(NodeEnum::String(s)) => Some(s.sval.clone()),
                _ => None,
            })
            .collect();
        let schema = (!rel.schemaname.is_empty()).then(|| rel.schemaname.clone());
        out.push((schema, rel.relname.clone(), columns));
    }
    Ok(out)
}

/// Quotes `s` as a SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Every relation that name could resolve to (any schema unless one is
/// given: the analysis does not follow `search_path`), with its columns and
/// the tables it inherits from: (`schema.table` of the relation or of an
/// ancestor, column name). The ancestors' rows carry the relation's column
/// names (a partition's columns are its parent's).
fn catalog_sql(schema: Option<&str>, table: &str) -> String {
    let in_schema = schema
        .map(|s| format!(" AND n.nspname = {}", literal(s)))
        .unwrap_or_default();
    format!(
        "WITH RECURSIVE rel AS ( \
           SELECT c.oid FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
            WHERE c.relname = {t}{in_schema}), \
         anc(rel, parent, depth) AS ( \
           SELECT i.inhrelid, i.inhparent, 1 FROM pg_catalog.pg_inherits i \
            WHERE i.inhrelid IN (SELECT oid FROM rel) \
           UNION \
           SELECT anc.rel, i.inhparent, anc.depth + 1 FROM anc \
             JOIN pg_catalog.pg_inherits i ON i.inhrelid = anc.parent WHERE anc.depth < 64), \
         named(rel, named) AS ( \
           SELECT oid, oid FROM rel UNION SELECT rel, parent FROM anc) \
         SELECT n.nspname || '.' || p.relname, a.attname::text FROM named \
           JOIN pg_catalog.pg_class p ON p.oid = named.named \
           JOIN pg_catalog.pg_namespace n ON n.oid = p.relnamespace \
           JOIN pg_catalog.pg_attribute a ON a.attrelid = named.rel \
            AND a.attnum > 0 AND NOT a.attisdropped",
        t = literal(table),
    )
}

/// Checks the `COPY table TO` statements of `sql` (one statement) on a
/// resource with column rules: `Err` names the masked column that would be
/// copied. A catalog that cannot be read refuses (fail closed).
pub(super) async fn check(
    pool: Option<&std::sync::Arc<Pool>>,
    sql: &str,
    masker: &Masker,
) -> Result<(), String> {
    let tables = copied_tables(sql)?;
    if tables.is_empty() {
        return Ok(());
    }
    let unreadable = |e: UpstreamError| {
        format!("COPY TO is refused: the server's catalog could not be read to find masked columns ({e})")
    };
    let Some(pool) = pool else {
        return Err("COPY TO is refused: no catalog connection".into());
    };
    for (schema, table, columns) in tables {
        let rows = pool
            .query(&catalog_sql(schema.as_deref(), &table))
            .await
            .map_err(unreadable)?;
        for r in rows.iter() {
            let (Some(Some(owner)), Some(Some(column))) = (r.first(), r.get(1)) else {
                continue;
            };
            if !columns.is_empty() && !columns.iter().any(|c| c == column) {
                continue;
            }
            if masker.column(Some(owner), column).is_some() {
                return Err(format!(
                    "COPY {table} TO would copy masked column {column} (of {owner}), which cannot be masked in COPY output; copy the other columns (`COPY {table} (col, ...) TO`) or select it with a query"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_to_statements_name_their_table_and_columns() {
        assert_eq!(
            copied_tables("copy public.customers (id, name) to stdout").unwrap(),
            vec![(
                Some("public".to_string()),
                "customers".to_string(),
                vec!["id".to_string(), "name".to_string()]
            )]
        );
        assert_eq!(
            copied_tables("COPY \"Orders\" TO STDOUT (FORMAT csv)").unwrap(),
            vec![(None, "Orders".to_string(), vec![])]
        );
        // COPY FROM and COPY (query) are not this check's.
        assert!(copied_tables("copy customers from stdin")
            .unwrap()
            .is_empty());
        assert!(copied_tables("copy (select id from customers) to stdout")
            .unwrap()
            .is_empty());
        assert!(catalog_sql(Some("o'k"), "t").contains("'o''k'"));
    }
}
