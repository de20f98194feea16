use super::*;

fn rules() -> Rules {
    Rules::from_names(["ssn", "customers.card_number", "customers.email"])
}

fn refused(sql: &str) -> String {
    match analyze(sql, &rules()) {
        Err(why) => why,
        Ok(l) => panic!("not refused: {sql} ({l:?})"),
    }
}

fn allowed(sql: &str) -> Lookups {
    match analyze(sql, &rules()) {
        Ok(l) => l,
        Err(why) => panic!("refused: {sql}: {why}"),
    }
}

#[test]
fn plain_output_columns_are_allowed_and_left_to_result_masking() {
    allowed("select ssn from customers");
    allowed("select ssn as x from customers");
    allowed("select c.ssn as x, c.card_number y from customers c");
    allowed("select * from customers");
    allowed("select c.* from customers c");
    allowed("table customers");
    allowed("select id, name from customers where id = 1");
    allowed("select distinct ssn from customers");
    allowed("select ssn from customers order by id limit 5");
    allowed("update customers set name = 'x' where id = 1 returning ssn, card_number");
    allowed("delete from customers where id = 9 returning *");
    allowed("insert into customers (id, ssn) values (3, '1') returning ssn");
    allowed("select count(*) from customers");
    allowed("alter table customers add column note text");
    allowed("alter table customers attach partition other for values in (1)");
    allowed(
        "select id from customers c where exists (select * from customers d where d.id = c.id)",
    );
    // card_number is only masked on customers.
    allowed("select upper(card_number) from orders where card_number like '4%'");
}

#[test]
fn whole_rows_of_unmasked_tables_pass_with_qualified_rules_only() {
    let r = Rules::from_names(["customers.ssn"]);
    assert!(analyze("select o from orders o", &r).is_ok());
    assert!(analyze("select row_to_json(o) from orders o", &r).is_ok());
    assert!(analyze("select c from customers c", &r).is_err());
    // With an unqualified rule any table may hold the column, except the
    // system catalogs named with their schema.
    assert!(analyze("select o from orders o", &rules()).is_err());
    assert!(analyze("select * from (select * from pg_class) c", &rules()).is_err());
    assert!(analyze(
        "select c.* from (select * from pg_catalog.pg_class) c, (select row_to_json(t) from information_schema.tables t) i",
        &rules()
    )
    .is_ok());
}

#[test]
fn every_bypass_from_the_issue_is_refused() {
    for sql in [
        "select upper(ssn) from customers",
        "select ssn || '' from customers",
        "select (select string_agg(ssn, ',') from customers)",
        "select reverse(card_number) from customers",
        "select encode(convert_to(card_number, 'UTF8'), 'base64') from customers",
        "select replace(email, '@', ' at ') from customers",
        "select ssn::text from customers",
        "select case when true then ssn end from customers",
        "with c as (select ssn from customers) select * from c",
        "with c as (select * from customers) select ssn from c",
        "select ssn from customers union select 'x'",
        "select * from (select ssn from customers) s",
        "select * from (select * from customers) s",
        "insert into leak select ssn from customers",
        "create table leak as select ssn from customers",
        "select ssn into leak from customers",
        "copy (select ssn from customers) to stdout",
        "create view v as select * from customers",
        "select id from customers where ssn like '1%'",
        "select id from customers c join orders o on o.card_number = c.card_number",
        "select id from customers order by ssn",
        "select count(*) from customers group by ssn",
        "select ssn, count(*) from customers group by 1",
        "select ssn, count(*) from customers group by rollup (1)",
        "select ssn, count(*) from customers group by grouping sets ((1), ())",
        "select * from customers order by 3",
        "select ssn as k from customers order by k",
        "select id from customers having max(ssn) > '5'",
        "select row_number() over (order by ssn) from customers",
        "select id from customers join people using (ssn)",
        "select id from customers natural join people",
        "select c from customers c",
        "select row_to_json(c) from customers c",
        "select to_jsonb(customers) from customers",
        "select (c).ssn from customers c",
        "select row(c.*) from customers c",
        "select json_agg(c.*) from customers c",
        "select public.customers from public.customers",
        "select j from (customers c join orders o on o.id = c.id) j",
        "update orders set note = c.ssn from customers c where c.id = orders.id",
        "select ssn from customers limit (select count(*) from customers where ssn > '5')",
        "do $$ begin insert into leak select ssn from customers; end $$",
        "create function f() returns text language sql as 'select ssn from customers'",
        "select query_to_xml('select ssn from customers', true, false, '')",
        "select most_common_vals from pg_stats where attname = 'ssn'",
        "alter table customers rename column card_number to cc",
        "alter table customers rename to c2",
        "alter table people rename column ssn to x",
        "explain analyze select id from customers where ssn = '1'",
        "alter table customers inherit parent",
        "alter table parent attach partition customers for values in (1)",
    ] {
        let why = refused(sql);
        assert!(!why.starts_with("cannot"), "{sql}: {why}");
        println!("{sql}\n  -> {why}");
    }
}

#[test]
fn refusals_name_the_column_and_the_reason() {
    let why = refused("select id from customers where ssn like '1%'");
    assert!(why.contains("\"ssn\"") && why.contains("WHERE"), "{why}");
    let why = refused("select upper(ssn) from customers");
    assert!(
        why.contains("\"ssn\"") && why.contains("expression"),
        "{why}"
    );
    let why = refused("select row_to_json(c) from customers c");
    assert!(why.contains("whole row"), "{why}");
}

#[test]
fn catalog_lookups_are_collected() {
    let l = allowed("select my_func(id), c.row_to_json from customers c where id ### 1 > 0");
    assert!(l.relations.contains("customers"));
    assert!(l.functions.contains("my_func"));
    assert!(l.row_functions.contains("row_to_json"));
    assert!(l.operators.contains("###"));
    let sql = catalog_sql(&l);
    // Names travel hex-encoded, never as SQL text.
    assert!(sql.contains(&hex::encode("customers")) && sql.contains(&hex::encode("my_func")));
    assert!(!sql.contains("customers") && !sql.contains("my_func"));
    let quoted: BTreeSet<String> = ["a'b\\c".to_string()].into();
    assert!(text_array(&quoted).contains(&hex::encode("a'b\\c")));
    let l = allowed("select id from customers order by id using @@@");
    assert!(l.operators.contains("@@@"), "{l:?}");
    let l = allowed("select id from customers where id %%% any (select id from orders)");
    assert!(l.operators.contains("%%%"), "{l:?}");
}

#[test]
fn catalog_answers_are_judged() {
    let m = crate::mask::Masker::compile(
        "db",
        &[crate::policy::MaskRule {
            resource: "db".into(),
            columns: vec!["ssn".into(), "customers_v.name".into()],
            json_paths: vec![],
            detectors: vec![],
            style: "redact".into(),
            binary: "pass".into(),
        }],
        [1; 32],
    )
    .unwrap()
    .unwrap();
    let row = |v: &[Option<&str>]| v.iter().map(|x| x.map(str::to_string)).collect::<Vec<_>>();
    let mut l = Lookups::default();
    l.functions.insert("leak".into());
    l.row_functions.insert("row_to_json".into());
    // A view over a masked column is refused; one named in a rule is not.
    assert!(judge(
        &l,
        &m,
        &Rules::from_masker(&m),
        &[row(&[
            Some("v"),
            Some("v1"),
            Some("public.customers"),
            Some("ssn")
        ])]
    )
    .is_some());
    assert!(judge(
        &l,
        &m,
        &Rules::from_masker(&m),
        &[row(&[
            Some("v"),
            Some("v1"),
            Some("public.customers"),
            Some("id")
        ])]
    )
    .is_none());
    assert!(judge(
        &l,
        &m,
        &Rules::from_masker(&m),
        &[row(&[
            Some("v"),
            Some("customers_v"),
            Some("public.customers"),
            Some("ssn")
        ])]
    )
    .is_none());
    // User functions, whole-row functions and user operators are refused.
    assert!(judge(
        &l,
        &m,
        &Rules::from_masker(&m),
        &[row(&[Some("f"), Some("leak"), Some("true"), Some("false")])]
    )
    .is_some());
    assert!(judge(
        &l,
        &m,
        &Rules::from_masker(&m),
        &[row(&[
            Some("f"),
            Some("leak"),
            Some("false"),
            Some("false")
        ])]
    )
    .is_none());
    assert!(judge(
        &l,
        &m,
        &Rules::from_masker(&m),
        &[row(&[
            Some("f"),
            Some("row_to_json"),
            Some("false"),
            Some("true")
        ])]
    )
    .is_some());
    assert!(judge(
        &l,
        &m,
        &Rules::from_masker(&m),
        &[row(&[Some("o"), Some("+++"), None, None])]
    )
    .is_some());
}

#[test]
fn create_extension_is_left_to_the_catalog_which_allows_only_installed_ones() {
    let l = allowed("create extension if not exists citext");
    assert!(l.extensions.contains("citext"), "{l:?}");
    let l = allowed("create extension \"uuid-ossp\" with schema public cascade");
    assert!(l.extensions.contains("uuid-ossp"), "{l:?}");
    assert!(catalog_sql(&l).contains(&hex::encode("uuid-ossp")));
    // Code-running statements stay refused.
    refused("alter extension hstore update");
    refused("create function f() returns int language sql as 'select 1'");
    let m = crate::mask::Masker::compile(
        "db",
        &[crate::policy::MaskRule {
            resource: "db".into(),
            columns: vec!["secrets.ssn".into()],
            json_paths: vec![],
            detectors: vec![],
            style: "redact".into(),
            binary: "pass".into(),
        }],
        [1; 32],
    )
    .unwrap()
    .unwrap();
    let row = |v: &[Option<&str>]| v.iter().map(|x| x.map(str::to_string)).collect::<Vec<_>>();
    let l = allowed("create extension if not exists citext");
    // Not installed: refused; installed: a no-op, allowed.
    let why = judge(&l, &m, &Rules::from_masker(&m), &[]).expect("refused");
    assert!(why.contains("not installed"), "{why}");
    assert!(judge(
        &l,
        &m,
        &Rules::from_masker(&m),
        &[row(&[Some("x"), Some("citext"), None, None])]
    )
    .is_none());
    assert!(judge(
        &l,
        &m,
        &Rules::from_masker(&m),
        &[row(&[Some("x"), Some("hstore"), None, None])]
    )
    .is_some());
    // The catalog query marks a pure extension's functions as not user
    // code; the list holds no extension that runs SQL or reads tables.
    let l = allowed("select akeys(h) from t");
    assert!(catalog_sql(&l).contains(&hex::encode("hstore")));
    for risky in ["dblink", "tablefunc", "xml2", "postgres_fdw", "pageinspect"] {
        assert!(!PURE_EXTENSIONS.contains(&risky), "{risky}");
    }
}

#[test]
fn error_details_are_dropped() {
    let mut body = BytesMut::new();
    for (k, v) in [
        (b'S', "ERROR"),
        (b'C', "23502"),
        (b'M', "null value"),
        (b'D', "Failing row contains (1, 123-45-6789)"),
    ] {
        body.extend_from_slice(&[k]);
        body.extend_from_slice(v.as_bytes());
        body.extend_from_slice(&[0]);
    }
    body.extend_from_slice(&[0]);
    let mut out = BytesMut::new();
    put_without_detail(&mut out, b'E', &body);
    let fields = codec::error_fields(&out[5..]);
    assert_eq!(fields.len(), 3);
    assert!(!fields.iter().any(|(k, _)| *k == b'D'));
    assert_eq!(
        out.len() - 1,
        i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize
    );
}

#[test]
fn a_table_cannot_leave_a_hierarchy_whose_rules_mask_it() {
    // Masked through a ruled ancestor; out of the hierarchy it would not be.
    refused("alter table customers detach partition customers_2026");
    refused("alter table customers detach partition customers_2026 concurrently");
    refused("alter table customers detach partition customers_2026 finalize");
    refused("alter table customers_eu no inherit customers");
    // Whatever the names: the ruled ancestor may be further up.
    refused("alter table regions detach partition regions_eu");
    refused("alter table archive no inherit regions");
    // Other changes to a hierarchy are the catalog's (and INHERIT's) to judge.
    allowed("alter table customers add column note text");
}

#[test]
fn create_collation_is_allowed_but_other_define_statements_are_not() {
    allowed("create collation \"S\".\"C1\" (locale = 'C.utf8')");
    allowed("create collation if not exists c2 (provider = icu, locale = 'und')");
    allowed("create collation c3 from \"C\"");
    // The other DefineStmt kinds name functions the server would run.
    refused("create aggregate a (int) (sfunc = int4pl, stype = int)");
    refused("create operator === (leftarg = text, rightarg = text, function = texteq)");
    refused("create type t (input = my_in, output = my_out)");
    refused("create text search parser p (start = f, gettoken = f, end = f, lextypes = f)");
}
