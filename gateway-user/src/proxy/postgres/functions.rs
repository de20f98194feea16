//! Which functions, operators and cast types a statement names are free of
//! side effects, from what the server's catalog says about them: a read
//! (`select`, `copy_out`, `explain`, `show`) that may run anything else is
//! decided as `postgres:function`, so permitting `postgres:select` never
//! permits `pg_read_file`, `set_config`, `nextval`, `lo_import` or a user
//! function that writes.
//!
//! A name is read-only only if EVERY catalog row with that name (in the
//! named schema if it is qualified, in any schema if not, so neither
//! overloads nor search_path shadowing can pick another) is built in
//! (oid below 16384) and, for functions, declared immutable or stable; a
//! short deny-list removes built-ins that are stable yet still have an
//! effect or read tables the statement does not name, and a short
//! allow-list admits volatile built-ins without effects (`random()`).
//! A name the catalog does not know, or a lookup that fails, is not
//! read-only (fail closed).
//!
//! Verdicts are cached in the upstream's catalog pool ([`super::catalog`])
//! only while its catalog-change signal is live, and dropped by any change
//! to the catalog (proxied or not); lookups run on the pool's side
//! connections. Owns the verdicts; it must not decide anything.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tracing::warn;

use super::{
    catalog::Pool,
    classify::{Classified, QualName},
    upstream,
};
use crate::proxy::Flow;

/// How long a cached verdict is trusted at most (it is dropped sooner by
/// any catalog change: see [`super::catalog`]).
pub const TTL: Duration = Duration::from_secs(600);

/// OIDs below this are the server's own (`FirstNormalObjectId`).
const FIRST_USER_OID: u32 = 16384;

/// Volatile built-ins with no effect beyond their result (and, for the
/// sleeps, time: a read-only session can spend time without them too).
const ALLOW_VOLATILE: &[&str] = &[
    "random",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
];

/// Stable built-ins that still have an effect (assign a transaction id) or
/// run a query text / read tables the statement does not name.
const DENY_PREFIXES: &[&str] = &[
    "query_to_xml",
    "cursor_to_xml",
    "table_to_xml",
    "schema_to_xml",
    "database_to_xml",
];
const DENY: &[&str] = &["txid_current", "pg_current_xact_id", "ts_stat"];

/// Classes that may create or replace a routine themselves (CREATE
/// FUNCTION, a DO block, a procedure).
const CATALOG_CHANGING: &[&str] = &["ddl", "other", "call", "function", "dcl"];

/// A catalog name: kind (`f` function, `o` operator, `t` type), schema if
/// qualified, name.
pub(super) type Key = (char, Option<String>, String);

/// Whether a classified statement (verdicts applied) may change which
/// routines exist: a catalog-changing class, or any statement that runs a
/// routine not known to be free of side effects (it may run DDL). After
/// one, in the same batch, the catalog may no longer be what it was when
/// the batch was decided: later statements get no verdict from it.
pub fn may_change_catalog(c: &Classified) -> bool {
    if c.catalog_neutral {
        return false;
    }
    // The class as parsed: a read promoted to `function` only for calling
    // built-in volatile functions (pg_dump's `set_config`, `nextval`)
    // changes no relation or routine.
    CATALOG_CHANGING.contains(&c.parsed_class) || c.user_routines
}

/// What the catalog says of one routine, operator or type name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Verdict {
    /// Free of side effects (see [`verdict`]).
    pub safe: bool,
    /// Every match is the server's own: whatever it does, it creates no
    /// relation, view or routine (DDL runs only as statements or in user
    /// code), so calling it does not change what the catalog checks see.
    pub builtin: bool,
}

/// Whether every match of `key` is built in (no match: not known to be).
fn builtin(key: &Key, rows: &[Row]) -> bool {
    let (kind, schema, name) = key;
    let mut mine = rows
        .iter()
        .filter(|r| r.kind == *kind && r.name == *name)
        .filter(|r| schema.as_ref().is_none_or(|s| *s == r.schema))
        .peekable();
    mine.peek().is_some() && mine.all(|r| r.builtin || r.pure_extension)
}

/// One catalog row: kind, schema, name, built in, volatility, part of an
/// installed extension that computes from its arguments only.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    kind: char,
    schema: String,
    name: String,
    builtin: bool,
    volatility: char,
    /// A member of one of [`super::maskcheck::PURE_EXTENSIONS`] (an
    /// operator: its function too), or a type whose input runs no user
    /// code (an enum, an array of one or of a pure extension's type): it
    /// creates nothing, so using it does not change what the catalog
    /// checks see (citext's and hstore's `=`, hstore's `->`, which shadow
    /// the built-in names for every operand type; `$1::my_enum[]`). Not a
    /// verdict of freedom from side effects.
    pure_extension: bool,
}

/// The verdict for one name from the rows the catalog returned.
fn verdict(key: &Key, rows: &[Row]) -> bool {
    let (kind, schema, name) = key;
    let mine: Vec<&Row> = rows
        .iter()
        .filter(|r| r.kind == *kind && r.name == *name)
        .filter(|r| schema.as_ref().is_none_or(|s| *s == r.schema))
        .collect();
    if mine.is_empty() {
        return false;
    }
    if *kind == 'f'
        && (DENY.contains(&name.as_str()) || DENY_PREFIXES.iter().any(|p| name.starts_with(p)))
    {
        return false;
    }
    mine.iter().all(|r| {
        r.builtin
            && (*kind != 'f'
                || matches!(r.volatility, 'i' | 's')
                || ALLOW_VOLATILE.contains(&name.as_str()))
    })
}

fn display((kind, schema, name): &Key) -> String {
    let q = match schema {
        Some(s) => format!("{s}.{name}"),
        None => name.clone(),
    };
    match kind {
        'o' => format!("operator {q}"),
        't' => format!("type {q}"),
        _ => q,
    }
}

fn keys(c: &Classified) -> Vec<Key> {
    let k = |kind: char, v: &[QualName]| -> Vec<Key> {
        v.iter()
            .map(|(s, n)| (kind, s.clone(), n.clone()))
            .collect()
    };
    let mut out = k('f', &c.refs.functions);
    out.extend(k('o', &c.refs.operators));
    out.extend(k('t', &c.refs.types));
    out
}

/// Every name the statements of `list` use.
pub(super) fn all_keys(list: &[Classified]) -> Vec<Key> {
    let mut all: Vec<Key> = Vec::new();
    for c in list {
        for k in keys(c) {
            if !all.contains(&k) {
                all.push(k);
            }
        }
    }
    all
}

/// The verdicts for every name of `list` from the committed catalog (the
/// pool's side connections, cached where that is sound). A name the
/// catalog does not know gets none.
pub(super) async fn verdicts(
    pool: Option<&Arc<Pool>>,
    flow: &Flow,
    list: &[Classified],
) -> HashMap<Key, Verdict> {
    let all = all_keys(list);
    let mut known: HashMap<Key, Verdict> = HashMap::new();
    if let (Some(pool), false) = (pool, all.is_empty()) {
        let (generation, cached) = pool.verdicts(&all, TTL);
        known = cached;
        let want: Vec<Key> = all
            .iter()
            .filter(|k| !known.contains_key(*k))
            .cloned()
            .collect();
        if !want.is_empty() {
            match pool.query_uncached(&lookup_sql(&want)).await {
                Ok(rows) => {
                    let found = verdicts_from_rows(&want, rows);
                    known.extend(found.iter().cloned());
                    pool.store_verdicts(generation, found);
                }
                Err(e) => {
                    warn!(session = %flow.info.session, "function catalog unavailable (treating every routine as having side effects): {e}");
                }
            }
        }
    }
    known
}

/// The verdicts for `want` from the answer to [`lookup_sql`].
pub(super) fn verdicts_from_rows(
    want: &[Key],
    rows: Vec<Vec<Option<String>>>,
) -> Vec<(Key, Verdict)> {
    let rows = parse_rows(rows);
    want.iter()
        .map(|k| {
            let v = Verdict {
                safe: verdict(k, &rows),
                builtin: builtin(k, &rows),
            };
            (k.clone(), v)
        })
        .collect()
}

/// Applies `known` to each statement of `list`: its `volatile_functions`
/// and whether it runs user routines.
pub(super) fn apply(list: &mut [Classified], known: &HashMap<Key, Verdict>) {
    // Statements after one that may change the catalog get no verdict.
    let mut trusted = true;
    for c in list.iter_mut() {
        let mut bad: Vec<String> = c.refs.unresolvable.clone();
        let mut user = !c.refs.unresolvable.is_empty();
        for k in keys(c) {
            let v = known.get(&k).copied().filter(|_| trusted);
            if !v.is_some_and(|v| v.safe) {
                bad.push(display(&k));
            }
            user |= !v.is_some_and(|v| v.builtin);
        }
        c.set_volatile(bad, user);
        trusted &= !may_change_catalog(c);
    }
}

/// The catalog query for `want`. Names travel hex-encoded: no quoting that
/// a session setting (standard_conforming_strings) could read differently.
pub(super) fn lookup_sql(want: &[Key]) -> String {
    let arr = |kind: char| -> String {
        upstream::hex_array(
            want.iter()
                .filter(|(k, _, _)| *k == kind)
                .map(|(_, _, n)| n.as_str()),
            "name",
        )
    };
    // Whether object `obj` of catalog `class` is a member of a pure
    // extension (or built in).
    let pure = |class: &str, obj: &str| {
        format!(
            "({obj} < {FIRST_USER_OID} OR EXISTS (SELECT 1 FROM pg_catalog.pg_depend e \
               JOIN pg_catalog.pg_extension x ON x.oid = e.refobjid \
              WHERE e.classid = 'pg_catalog.{class}'::pg_catalog.regclass AND e.objid = {obj} \
                AND e.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass \
                AND e.deptype = 'e' AND x.extname::text = ANY({exts})))",
            exts = upstream::hex_array(super::maskcheck::PURE_EXTENSIONS.iter().copied(), "text"),
        )
    };
    format!(
        "SELECT 'f', n.nspname, p.proname, (p.oid < {FIRST_USER_OID})::text, p.provolatile::text, {pf}::text FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace WHERE p.proname = ANY({f}) \
         UNION ALL SELECT 'o', n.nspname, o.oprname, (o.oid < {FIRST_USER_OID} AND o.oprcode::pg_catalog.oid < {FIRST_USER_OID})::text, 'i', ({po} AND {pc})::text FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace WHERE o.oprname = ANY({o}) \
         UNION ALL SELECT 't', n.nspname, t.typname, (t.oid < {FIRST_USER_OID})::text, 'i', ({pt} OR t.typtype = 'e' OR (t.typinput = 'pg_catalog.array_in'::pg_catalog.regproc AND EXISTS (SELECT 1 FROM pg_catalog.pg_type el WHERE el.oid = t.typelem AND (el.typtype = 'e' OR {pel}))))::text FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace WHERE t.typname = ANY({t})",
        f = arr('f'),
        o = arr('o'),
        t = arr('t'),
        pf = pure("pg_proc", "p.oid"),
        po = pure("pg_operator", "o.oid"),
        pc = pure("pg_proc", "o.oprcode::pg_catalog.oid"),
        // A cast to an enum (input `enum_in`), an array of one (`array_in`)
        // or a pure extension's type runs no user code; a domain (its
        // CHECK may call a user function), a range or a base type of the
        // user's may.
        pt = pure("pg_type", "t.oid"),
        pel = pure("pg_type", "el.oid"),
    )
}

fn parse_rows(rows: Vec<Vec<Option<String>>>) -> Vec<Row> {
    rows.into_iter()
        .map(|cols| {
            let col = |i: usize| cols.get(i).cloned().flatten().unwrap_or_default();
            let ch = |s: String| s.chars().next().unwrap_or('?');
            Row {
                kind: ch(col(0)),
                schema: col(1),
                name: col(2),
                builtin: col(3) == "true",
                volatility: ch(col(4)),
                pure_extension: col(5) == "true",
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: char, schema: &str, name: &str, builtin: bool, vol: char) -> Row {
        Row {
            kind,
            schema: schema.into(),
            name: name.into(),
            builtin,
            volatility: vol,
            pure_extension: false,
        }
    }

    fn f(schema: Option<&str>, name: &str) -> Key {
        ('f', schema.map(str::to_string), name.to_string())
    }

    #[test]
    fn every_row_of_a_name_must_be_a_safe_builtin() {
        let rows = vec![
            row('f', "pg_catalog", "upper", true, 'i'),
            row('f', "pg_catalog", "now", true, 's'),
            row('f', "pg_catalog", "nextval", true, 'v'),
            row('f', "pg_catalog", "random", true, 'v'),
            row('f', "pg_catalog", "lower", true, 'i'),
            // A user overload (or a shadowing function in public).
            row('f', "public", "lower", false, 'i'),
            row('f', "pg_catalog", "txid_current", true, 's'),
            row('f', "pg_catalog", "query_to_xml", true, 'v'),
            row('f', "pg_catalog", "table_to_xmlschema", true, 's'),
            row('o', "pg_catalog", "+", true, 'i'),
            row('o', "public", "===", false, 'i'),
            row('t', "pg_catalog", "text", true, 'i'),
            row('t', "public", "mydomain", false, 'i'),
        ];
        assert!(verdict(&f(None, "upper"), &rows));
        assert!(verdict(&f(Some("pg_catalog"), "upper"), &rows));
        assert!(verdict(&f(None, "now"), &rows));
        assert!(verdict(&f(None, "random"), &rows));
        assert!(!verdict(&f(None, "nextval"), &rows));
        assert!(!verdict(&f(None, "lower"), &rows));
        // Qualified to the built-in schema: only that row counts.
        assert!(verdict(&f(Some("pg_catalog"), "lower"), &rows));
        assert!(!verdict(&f(Some("public"), "lower"), &rows));
        assert!(!verdict(&f(None, "txid_current"), &rows));
        assert!(!verdict(&f(None, "query_to_xml"), &rows));
        assert!(!verdict(&f(None, "table_to_xmlschema"), &rows));
        // Unknown to the catalog: not read-only.
        assert!(!verdict(&f(None, "no_such_fn"), &rows));
        assert!(!verdict(&f(Some("public"), "upper"), &rows));
        assert!(verdict(&('o', None, "+".into()), &rows));
        assert!(!verdict(&('o', None, "===".into()), &rows));
        assert!(verdict(&('t', None, "text".into()), &rows));
        assert!(!verdict(&('t', None, "mydomain".into()), &rows));
        // Built in though volatile: runs no user code, creates nothing.
        assert!(builtin(&f(None, "nextval"), &rows));
        // A user's `public.lower` may be what an unqualified call runs.
        assert!(!builtin(&f(None, "lower"), &rows));
        assert!(builtin(&f(Some("pg_catalog"), "lower"), &rows));
        assert!(!builtin(&f(None, "no_such_fn"), &rows));
    }

    #[test]
    fn pure_extension_members_change_no_catalog() {
        let op = |schema: &str, builtin: bool, pure: bool| Row {
            pure_extension: pure,
            ..row('o', schema, "=", builtin, 'i')
        };
        let eq = ('o', None, "=".to_string());
        // citext's and hstore's `=` beside the built-in ones: calling any
        // of them creates nothing.
        let rows = vec![
            op("pg_catalog", true, true),
            op("public", false, true),
            op("public", false, true),
        ];
        assert!(builtin(&eq, &rows));
        // Still not free of side effects as far as the class goes.
        assert!(!verdict(&eq, &rows));
        // A user's own `=` (no pure extension) may run anything.
        let mut hostile = rows.clone();
        hostile.push(op("public", false, false));
        assert!(!builtin(&eq, &hostile));
    }

    #[test]
    fn catalog_changing_statements() {
        let c = |sql: &str, volatile: &[&str]| {
            let mut c = super::super::classify::classify(sql).unwrap().remove(0);
            // Here every name given is a user routine.
            c.set_volatile(
                volatile.iter().map(|v| v.to_string()).collect(),
                !volatile.is_empty(),
            );
            may_change_catalog(&c)
        };
        // pg_dump's probe: a read promoted to `function` for a built-in
        // volatile function changes no relation or routine.
        let mut probe = super::super::classify::classify(
            "select set_config(name, 'view, foreign-table', false) from pg_settings where name = 'restrict_nonsystem_relation_kind'",
        )
        .unwrap()
        .remove(0);
        probe.set_volatile(vec!["set_config".into()], false);
        assert_eq!(probe.class, "function");
        assert!(!may_change_catalog(&probe));
        // pg_dump locks every table it dumps; locking changes no catalog.
        assert!(!c("lock table t in access share mode", &[]));
        assert!(!c("listen ch", &[]));
        assert!(c("do $$ begin end $$", &[]));
        assert!(!c("select count(*) from t", &[]));
        assert!(!c("insert into t values (1)", &[]));
        assert!(!c("set search_path = x", &[]));
        assert!(c(
            "create function f() returns int language sql as 'select 1'",
            &[]
        ));
        assert!(c("do $$ begin end $$", &[]));
        assert!(c("select f()", &["f"]));
        assert!(c("insert into t values (f())", &["f"]));
    }
}
