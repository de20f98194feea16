//! Result masking for PostgreSQL: a column plan built from a RowDescription
//! (names, table names resolved from OIDs, formats, types) and the rewrite
//! of DataRow and COPY TO frames as they stream, one frame at a time.
//!
//! Owns the masking of result frames only; deciding and forwarding belong
//! to the session. Fails closed: a masked column whose value cannot be
//! rewritten in its format becomes NULL.

use std::{collections::HashMap, sync::Arc};

use bytes::{BufMut, BytesMut};

use super::codec::{CodecError, Reader};
use crate::mask::{Counts, Masker, Style};

/// One result column as RowDescription describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Table OID (0 when not a plain table column).
    pub table_oid: u32,
    /// The column's attribute number in that table (0 when none).
    pub attnum: i16,
    /// Type OID.
    pub type_oid: u32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// Parses a RowDescription body.
pub fn parse_row_description(body: &[u8]) -> Result<Vec<Column>, CodecError> {
    let mut r = Reader::new(body, "RowDescription");
    let n = r.i16()?;
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n.max(0) {
        let name = r.cstr()?.to_string();
        let table_oid = r.u32()?;
        let attnum = r.i16()?;
        let type_oid = r.u32()?;
        let _typlen = r.i16()?;
        let _typmod = r.i32()?;
        let format = r.i16()?;
        cols.push(Column {
            name,
            table_oid,
            attnum,
            type_oid,
            format,
        });
    }
    Ok(cols)
}

/// The server's output settings that change how a value is written in
/// text format (both are reported in ParameterStatus).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputStyle {
    /// `DateStyle` (`ISO, MDY`, `SQL, DMY`, `German`, `Postgres`).
    pub date_style: String,
    /// `IntervalStyle` (`postgres`, `postgres_verbose`, `sql_standard`,
    /// `iso_8601`).
    pub interval_style: String,
}

impl Default for OutputStyle {
    fn default() -> Self {
        Self {
            date_style: "ISO, MDY".into(),
            interval_style: "postgres".into(),
        }
    }
}

/// What a column's values are, for masking, from its type OID and format.
/// A masked value keeps its column's type: text-like types get the rule's
/// style, other known types a fixed value of the type (0, false, the nil
/// UUID, 1970-01-01, an empty array), and a type without such a form
/// (unknown to the daemon, or written differently per server setting)
/// NULL. A typed client (psycopg, asyncpg, JDBC) must never get bytes it
/// cannot parse as the column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Text from this offset: the style and the detectors rewrite it.
    Text(usize),
    /// JSON text from this offset (jsonb's binary form starts with a
    /// version byte): a masked value is the masked text as a JSON string.
    Json(usize),
    /// bytea: a masked value is the bytes of [`crate::mask::MASKED`].
    Bytea { binary: bool },
    /// An array: a masked value is the empty array. `text_elements`: its
    /// elements are text, so detectors may rewrite them in place.
    Array { binary: bool, text_elements: bool },
    /// Another known type: a masked value is this valid value of it.
    /// `text`: the value is in text format (detectors can read it).
    Fixed { value: &'static [u8], text: bool },
    /// A type without a masked form: a masked value is NULL. `text`: the
    /// value is in text format (detectors can read it).
    Opaque { text: bool },
}

const DATE_1970: [u8; 4] = (-10_957i32).to_be_bytes();
const TIMESTAMP_1970: [u8; 8] = (-946_684_800_000_000i64).to_be_bytes();

impl Kind {
    fn of(type_oid: u32, format: i16, style: &OutputStyle) -> Self {
        let binary = format != 0;
        let fixed = |text: &'static [u8], bin: &'static [u8]| Kind::Fixed {
            value: if binary { bin } else { text },
            text: !binary,
        };
        let date_style = style
            .date_style
            .split(',')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match type_oid {
            // text, varchar, bpchar, name, unknown, xml: the binary form
            // is the text.
            25 | 1043 | 1042 | 19 | 705 | 142 => Kind::Text(0),
            114 => Kind::Json(0),
            3802 => Kind::Json(usize::from(binary)),
            17 => Kind::Bytea { binary },
            16 => fixed(b"f", &[0]),
            21 => fixed(b"0", &[0; 2]),
            23 | 26 => fixed(b"0", &[0; 4]),
            20 => fixed(b"0", &[0; 8]),
            700 => fixed(b"0", &[0; 4]),
            701 => fixed(b"0", &[0; 8]),
            // numeric 0: no digits, weight 0, positive, scale 0.
            1700 => fixed(b"0", &[0; 8]),
            2950 => fixed(b"00000000-0000-0000-0000-000000000000", &[0; 16]),
            1083 => fixed(b"00:00:00", &[0; 8]),
            1266 => fixed(b"00:00:00+00", &[0; 12]),
            1082 | 1114 if binary => fixed(
                b"",
                if type_oid == 1082 {
                    &DATE_1970
                } else {
                    &TIMESTAMP_1970
                },
            ),
            1184 if binary => fixed(b"", &TIMESTAMP_1970),
            1082 | 1114 => match epoch_text(&date_style, type_oid == 1114) {
                Some(text) => fixed(text, b""),
                None => Kind::Opaque { text: !binary },
            },
            // Outside ISO a timestamptz carries a zone abbreviation of the
            // session's time zone.
            1184 if date_style == "iso" => fixed(b"1970-01-01 00:00:00+00", b""),
            1186 if binary => fixed(b"", &[0; 16]),
            1186 => match style.interval_style.to_ascii_lowercase().as_str() {
                "postgres" => fixed(b"00:00:00", b""),
                "postgres_verbose" => fixed(b"@ 0", b""),
                "sql_standard" => fixed(b"0", b""),
                "iso_8601" => fixed(b"PT0S", b""),
                _ => Kind::Opaque { text: !binary },
            },
            // text[], varchar[], bpchar[], name[]
            1009 | 1015 | 1014 | 1003 => Kind::Array {
                binary,
                text_elements: true,
            },
            1000 | 1001 | 1005 | 1007 | 1016 | 1028 | 1021 | 1022 | 1231 | 2951 | 1182 | 1183
            | 1115 | 1185 | 1187 | 1270 | 199 | 3807 | 143 | 1041 | 651 => Kind::Array {
                binary,
                text_elements: false,
            },
            // money (written per lc_monetary), "char", and every type the
            // daemon does not know (extension types, enums, composites).
            _ => Kind::Opaque { text: !binary },
        }
    }
}

/// 1970-01-01 as a `date` (or, with `time`, a `timestamp` at midnight)
/// in text format under the DateStyle `date_style` (lowercased first
/// word); `None` for a style the daemon does not know.
fn epoch_text(date_style: &str, time: bool) -> Option<&'static [u8]> {
    let (date, timestamp): (&[u8], &[u8]) = match date_style {
        "iso" => (b"1970-01-01", b"1970-01-01 00:00:00"),
        "sql" => (b"01/01/1970", b"01/01/1970 00:00:00"),
        "german" => (b"01.01.1970", b"01.01.1970 00:00:00"),
        "postgres" => (b"01-01-1970", b"Thu Jan 01 00:00:00 1970"),
        _ => return None,
    };
    Some(if time { timestamp } else { date })
}

/// Copies the binary header of `value` (its first `off` bytes: jsonb's
/// version byte) to `out` and returns the text after it, which is what
/// the style and the detectors rewrite.
fn text_part<'v>(off: usize, value: &'v [u8], out: &mut Vec<u8>) -> &'v [u8] {
    let (head, text) = value.split_at(off.min(value.len()));
    out.extend_from_slice(head);
    text
}

/// The name of a system column by its (negative) attribute number. They
/// hold where a row version lives, never row data (pg_dump reads
/// `tableoid` of every catalog it lists); a rule that names one still
/// masks it.
fn system_column(attnum: i16) -> Option<&'static str> {
    Some(match attnum {
        -1 => "ctid",
        -2 => "xmin",
        -3 => "cmin",
        -4 => "xmax",
        -5 => "cmax",
        -6 => "tableoid",
        _ => return None,
    })
}

/// A table (or view) as the catalog names it: `schema.table`, and its
/// columns by attribute number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// `schema.table`.
    pub name: String,
    /// Column names by attribute number.
    pub columns: HashMap<i16, String>,
    /// `schema.table` of its inheritance parents and partitioned tables,
    /// nearest first: a partition's rows are its parent's, and so are the
    /// parent's rules.
    pub ancestors: Vec<String>,
}

/// The catalog query that names the tables whose OIDs are in `oids` (an
/// SQL expression of type `oid[]`): rows of (`c`, oid, `schema.table`,
/// attnum, attname) per column and (`a`, oid, `schema.parent`, depth) per
/// ancestor, for [`tables_from_rows`].
pub fn tables_sql(oids: &str) -> String {
    format!(
        "WITH RECURSIVE anc(rel, parent, depth) AS ( \
           SELECT i.inhrelid, i.inhparent, 1 FROM pg_catalog.pg_inherits i \
            WHERE i.inhrelid = ANY({oids}) \
           UNION \
           SELECT anc.rel, i.inhparent, anc.depth + 1 FROM anc \
             JOIN pg_catalog.pg_inherits i ON i.inhrelid = anc.parent WHERE anc.depth < 64) \
         SELECT 'c', c.oid::text, n.nspname || '.' || c.relname, a.attnum::text, a.attname::text \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE c.oid = ANY({oids}) \
         UNION ALL \
         SELECT 'a', anc.rel::text, n.nspname || '.' || p.relname, anc.depth::text, NULL FROM anc \
         JOIN pg_catalog.pg_class p ON p.oid = anc.parent \
         JOIN pg_catalog.pg_namespace n ON n.oid = p.relnamespace"
    )
}

/// The tables named by the answer to [`tables_sql`].
pub fn tables_from_rows(rows: &[Vec<Option<String>>]) -> HashMap<u32, Table> {
    let mut out: HashMap<u32, Table> = HashMap::new();
    let mut ancestors: Vec<(u32, u32, String)> = Vec::new();
    for r in rows {
        let cell = |i: usize| r.get(i).cloned().flatten();
        let (Some(kind), Some(oid), Some(name)) = (
            cell(0),
            cell(1).and_then(|o| o.parse::<u32>().ok()),
            cell(2),
        ) else {
            continue;
        };
        if kind == "a" {
            let depth = cell(3).and_then(|d| d.parse().ok()).unwrap_or(u32::MAX);
            ancestors.push((oid, depth, name));
            continue;
        }
        let t = out.entry(oid).or_insert_with(|| Table {
            name,
            columns: HashMap::new(),
            ancestors: Vec::new(),
        });
        if let (Some(num), Some(att)) = (cell(3).and_then(|n| n.parse::<i16>().ok()), cell(4)) {
            t.columns.insert(num, att);
        }
    }
    ancestors.sort();
    for (oid, _, name) in ancestors {
        if let Some(t) = out.get_mut(&oid) {
            if !t.ancestors.contains(&name) {
                t.ancestors.push(name);
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
struct Plan {
    /// Column-rule style, if the column is masked by name.
    style: Option<Style>,
    /// How a value of the column's type is masked.
    kind: Kind,
    name: String,
}

/// How to mask the rows of one result set.
#[derive(Debug, Clone)]
pub struct RowPlan {
    masker: Arc<Masker>,
    cols: Vec<Plan>,
    detectors: bool,
}

impl RowPlan {
    /// The plan for `cols`; `tables` maps table OIDs to their catalog
    /// entry (`None`: the catalog did not name it). `None` when nothing in
    /// these columns can need masking.
    ///
    /// A column rule matches a column of a table by the table and the
    /// column's own name in the catalog (RowDescription's table OID and
    /// attribute number), never by the output name: `ssn AS x` is still
    /// `customers.ssn`. A computed column (table OID 0) matches only an
    /// unqualified rule by its output name; the statement analysis
    /// (`maskcheck`) keeps masked columns out of computed ones.
    ///
    /// `style` is the session's output settings, which decide how a fixed
    /// masked value is written in text format.
    pub fn new<'a>(
        masker: Arc<Masker>,
        cols: &[Column],
        tables: &'a HashMap<u32, Option<Table>>,
        style: &OutputStyle,
    ) -> Option<Self> {
        let style_of_output = style;
        let detectors = masker.has_detectors();
        let mut any = detectors;
        let plans = cols
            .iter()
            .map(|c| {
                let style = if c.table_oid == 0 {
                    masker.column(None, &c.name)
                } else {
                    let known = tables.get(&c.table_oid).and_then(|t| t.as_ref());
                    let attname = |t: &'a Table| {
                        t.columns
                            .get(&c.attnum)
                            .map(String::as_str)
                            .or_else(|| system_column(c.attnum))
                    };
                    match known.and_then(|t| Some((t, attname(t)?))) {
                        Some((t, attname)) => masker.column(Some(&t.name), attname).or_else(|| {
                            t.ancestors
                                .iter()
                                .find_map(|a| masker.column(Some(a), attname))
                        }),
                        // The table or column could not be named: a rule
                        // might apply, so the column is masked (fail closed).
                        None if masker.has_columns() => {
                            Some(masker.column(None, &c.name).unwrap_or(Style::Redact))
                        }
                        None => None,
                    }
                };
                any |= style.is_some();
                Plan {
                    style,
                    kind: Kind::of(c.type_oid, c.format, style_of_output),
                    name: c.name.clone(),
                }
            })
            .collect();
        any.then_some(Self {
            masker,
            cols: plans,
            detectors,
        })
    }

    /// Column names, for the recording.
    pub fn names(&self) -> Vec<String> {
        self.cols.iter().map(|c| c.name.clone()).collect()
    }

    /// Appends the masked DataRow (`body` without the tag and length) as a
    /// whole frame to `out`. `scratch` is reused across rows so a row costs
    /// no allocation once it has grown.
    pub fn mask_row(
        &self,
        body: &[u8],
        out: &mut BytesMut,
        scratch: &mut Vec<u8>,
        by_column: &mut Counts,
        by_detector: &mut Counts,
    ) -> Result<(), CodecError> {
        let mut r = Reader::new(body, "DataRow");
        let n = r.i16()?;
        if n < 0 || n as usize != self.cols.len() {
            return Err(CodecError::Truncated(
                "DataRow (column count differs from RowDescription)",
            ));
        }
        out.put_u8(b'D');
        let at = out.len();
        out.put_i32(0);
        out.put_i16(n);
        for plan in &self.cols {
            let Some(value) = r.value()? else {
                out.put_i32(-1);
                continue;
            };
            scratch.clear();
            let written = match plan.style {
                Some(style) => {
                    by_column.add(&plan.name, 1);
                    self.masked(plan.kind, style, value, scratch)
                }
                None if self.detectors => {
                    match self.detected(plan.kind, value, scratch, by_detector) {
                        Some(0) => true,
                        Some(hits) => {
                            by_column.add(&plan.name, hits as u64);
                            true
                        }
                        None => {
                            by_column.add(&plan.name, 1);
                            false
                        }
                    }
                }
                None => {
                    scratch.extend_from_slice(value);
                    true
                }
            };
            if !written {
                out.put_i32(-1);
                continue;
            }
            out.put_i32(scratch.len() as i32);
            out.extend_from_slice(scratch);
        }
        let len = (out.len() - at) as i32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    /// Writes the masked form of a column-rule value to `out`; false: the
    /// value becomes NULL.
    fn masked(&self, kind: Kind, style: Style, value: &[u8], out: &mut Vec<u8>) -> bool {
        match kind {
            Kind::Text(off) => {
                let text = text_part(off, value, out);
                self.masker.mask_whole(style, text, out);
            }
            Kind::Json(off) => {
                let text = text_part(off, value, out);
                let mut masked = Vec::new();
                self.masker.mask_whole(style, text, &mut masked);
                put_json_string(&masked, out);
            }
            Kind::Bytea { binary: true } => out.extend_from_slice(crate::mask::MASKED.as_bytes()),
            Kind::Bytea { binary: false } => {
                out.extend_from_slice(b"\\x");
                out.extend_from_slice(hex::encode(crate::mask::MASKED).as_bytes());
            }
            Kind::Array { binary: false, .. } => out.extend_from_slice(b"{}"),
            Kind::Array { binary: true, .. } => {
                // No dimensions, no NULLs, the element type the server
                // wrote (a value shorter than the header has none).
                let Some(elem) = value.get(8..12) else {
                    return false;
                };
                out.extend_from_slice(&[0; 8]);
                out.extend_from_slice(elem);
            }
            Kind::Fixed { value, .. } => out.extend_from_slice(value),
            Kind::Opaque { .. } => return false,
        }
        true
    }

    /// Runs the detectors over a value of a column no rule names and writes
    /// it to `out`; returns the hits, or `None` when the value must become
    /// NULL. A hit in a value that is not free text becomes the type's
    /// masked form, never text the type cannot hold.
    fn detected(
        &self,
        kind: Kind,
        value: &[u8],
        out: &mut Vec<u8>,
        counts: &mut Counts,
    ) -> Option<usize> {
        let (off, text_form) = match kind {
            Kind::Text(off) => (off, true),
            Kind::Array {
                binary: false,
                text_elements: true,
            } => (0, true),
            Kind::Json(off) => (off, false),
            Kind::Fixed { text: true, .. }
            | Kind::Array { binary: false, .. }
            | Kind::Opaque { text: true } => (0, false),
            _ => {
                out.extend_from_slice(value);
                return Some(0);
            }
        };
        let start = out.len();
        let text = text_part(off, value, out);
        let body = out.len();
        let hits = self.masker.mask_detected(text, out, counts);
        if hits == 0 || text_form {
            return Some(hits);
        }
        // A hit inside a JSON string leaves valid JSON; one over a number
        // does not.
        let json_ok = matches!(kind, Kind::Json(_))
            && serde_json::from_slice::<serde::de::IgnoredAny>(&out[body..]).is_ok();
        if json_ok {
            return Some(hits);
        }
        out.truncate(start);
        self.masked(kind, Style::Redact, value, out).then_some(hits)
    }
}

/// Appends `text` (lossily UTF-8) as a JSON string.
fn put_json_string(text: &[u8], out: &mut Vec<u8>) {
    let s = String::from_utf8_lossy(text);
    match serde_json::to_vec(&*s) {
        Ok(v) => out.extend_from_slice(&v),
        Err(_) => out.extend_from_slice(b"\"[MASKED]\""),
    }
}

/// Masks one COPY TO text/CSV row (a CopyData body) with the detectors and
/// appends the CopyData frame to `out`; returns the hits.
pub fn mask_copy_row(
    masker: &Masker,
    body: &[u8],
    out: &mut BytesMut,
    scratch: &mut Vec<u8>,
    counts: &mut Counts,
) -> usize {
    scratch.clear();
    let hits = masker.mask_detected(body, scratch, counts);
    out.put_u8(b'd');
    out.put_i32(scratch.len() as i32 + 4);
    out.extend_from_slice(scratch);
    hits
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::policy::MaskRule;

    fn masker(columns: &[&str], detectors: &[&str]) -> Arc<Masker> {
        let rule = MaskRule {
            resource: "db".into(),
            columns: columns.iter().map(|s| s.to_string()).collect(),
            json_paths: vec![],
            detectors: detectors.iter().map(|s| s.to_string()).collect(),
            style: "redact".into(),
            binary: "pass".into(),
        };
        Masker::compile("db", &[rule], [7; 32]).unwrap().unwrap()
    }

    fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.extend_from_slice(v);
                }
            }
        }
        b.to_vec()
    }

    fn values(frame: &[u8]) -> Vec<Option<Vec<u8>>> {
        let mut r = Reader::new(&frame[5..], "DataRow");
        let n = r.i16().unwrap();
        (0..n)
            .map(|_| r.value().unwrap().map(|v| v.to_vec()))
            .collect()
    }

    fn col(name: &str, table_oid: u32, type_oid: u32, format: i16) -> Column {
        at(name, table_oid, 0, type_oid, format)
    }

    fn at(name: &str, table_oid: u32, attnum: i16, type_oid: u32, format: i16) -> Column {
        Column {
            name: name.into(),
            table_oid,
            attnum,
            type_oid,
            format,
        }
    }

    #[test]
    fn columns_by_table_and_detectors_in_text_and_binary() {
        let m = masker(&["customers.ssn"], &["credit_card", "email"]);
        let mut tables = HashMap::new();
        tables.insert(100, Some(table("public.customers", &["ssn", "note", "n"])));
        let cols = [
            at("ssn", 100, 1, 25, 0),
            at("note", 100, 2, 25, 1),
            at("n", 100, 3, 23, 1),
            col("card", 0, 25, 0),
        ];
        let plan = RowPlan::new(m, &cols, &tables, &OutputStyle::default()).unwrap();
        let body = row(&[
            Some(b"123-45-6789"),
            Some(b"mail bob@example.com"),
            Some(&[0, 0, 0, 5]),
            Some(b"4111 1111 1111 1111"),
        ]);
        let (mut out, mut scratch, mut bc, mut bd) = (
            BytesMut::new(),
            Vec::new(),
            Counts::default(),
            Counts::default(),
        );
        plan.mask_row(&body, &mut out, &mut scratch, &mut bc, &mut bd)
            .unwrap();
        let v = values(&out);
        assert_ne!(v[0].as_deref(), Some(&b"123-45-6789"[..]));
        assert!(!String::from_utf8_lossy(v[1].as_ref().unwrap()).contains("bob@example.com"));
        assert_eq!(v[2].as_deref(), Some(&[0u8, 0, 0, 5][..]));
        assert!(!String::from_utf8_lossy(v[3].as_ref().unwrap()).contains("4111 1111 1111 1111"));
        assert!(!bc.is_empty() && !bd.is_empty());
    }

    #[test]
    fn masked_binary_numeric_becomes_zero_and_unknown_tables_fail_closed() {
        let m = masker(&["orders.total"], &[]);
        let mut tables = HashMap::new();
        tables.insert(7, Some(table("public.orders", &["id", "total"])));
        tables.insert(8, None);
        tables.insert(9, Some(table("public.other", &["id", "total"])));
        let cols = [
            at("total", 7, 2, 1700, 1),
            at("total", 8, 2, 25, 0),
            at("total", 9, 2, 25, 0),
        ];
        let plan = RowPlan::new(m, &cols, &tables, &OutputStyle::default()).unwrap();
        let body = row(&[Some(&[1, 2, 3]), Some(b"12.50"), Some(b"9.99")]);
        let (mut out, mut scratch, mut bc, mut bd) = (
            BytesMut::new(),
            Vec::new(),
            Counts::default(),
            Counts::default(),
        );
        plan.mask_row(&body, &mut out, &mut scratch, &mut bc, &mut bd)
            .unwrap();
        let v = values(&out);
        // numeric 0 in binary: no digits, weight 0, positive, scale 0.
        assert_eq!(v[0].as_deref(), Some(&[0u8; 8][..]));
        assert_ne!(v[1].as_deref(), Some(&b"12.50"[..]));
        // Table 9 is known not to be "orders".
        assert_eq!(v[2].as_deref(), Some(&b"9.99"[..]));
    }

    #[test]
    fn a_masked_value_keeps_its_type_in_both_formats() {
        let m = masker(&["t.v"], &["email"]);
        let tables: HashMap<u32, Option<Table>> = HashMap::new();
        let mask = |type_oid: u32, format: i16, value: &[u8], style: &OutputStyle| {
            let mut tables = tables.clone();
            tables.insert(1, Some(table("public.t", &["v"])));
            let plan = RowPlan::new(
                m.clone(),
                &[at("v", 1, 1, type_oid, format)],
                &tables,
                style,
            )
            .unwrap();
            let (mut out, mut scratch, mut bc, mut bd) = (
                BytesMut::new(),
                Vec::new(),
                Counts::default(),
                Counts::default(),
            );
            plan.mask_row(
                &row(&[Some(value)]),
                &mut out,
                &mut scratch,
                &mut bc,
                &mut bd,
            )
            .unwrap();
            assert_eq!(bc.total(), 1);
            values(&out).remove(0)
        };
        let iso = OutputStyle::default();
        let t = |oid, v: &[u8]| mask(oid, 0, v, &iso);
        let b = |oid, v: &[u8]| mask(oid, 1, v, &iso);
        assert_eq!(t(23, b"42").as_deref(), Some(&b"0"[..]));
        assert_eq!(b(23, &[0, 0, 0, 42]).as_deref(), Some(&[0u8; 4][..]));
        assert_eq!(b(20, &[1; 8]).as_deref(), Some(&[0u8; 8][..]));
        assert_eq!(t(1700, b"12.50").as_deref(), Some(&b"0"[..]));
        assert_eq!(t(16, b"t").as_deref(), Some(&b"f"[..]));
        assert_eq!(b(16, &[1]).as_deref(), Some(&[0u8][..]));
        assert_eq!(
            t(2950, b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").as_deref(),
            Some(&b"00000000-0000-0000-0000-000000000000"[..])
        );
        assert_eq!(t(1082, b"2024-02-29").as_deref(), Some(&b"1970-01-01"[..]));
        // 1970-01-01 is 10957 days before PostgreSQL's epoch.
        assert_eq!(
            b(1082, &[0; 4]).as_deref(),
            Some(&(-10957i32).to_be_bytes()[..])
        );
        assert_eq!(
            mask(
                1082,
                0,
                b"29.02.2024",
                &OutputStyle {
                    date_style: "German, DMY".into(),
                    ..iso.clone()
                }
            )
            .as_deref(),
            Some(&b"01.01.1970"[..])
        );
        // A timestamptz outside ISO names a zone: no masked form.
        assert_eq!(
            mask(
                1184,
                0,
                b"x",
                &OutputStyle {
                    date_style: "SQL, DMY".into(),
                    ..iso.clone()
                }
            ),
            None
        );
        assert_eq!(
            mask(
                1186,
                0,
                b"1 day",
                &OutputStyle {
                    interval_style: "iso_8601".into(),
                    ..iso.clone()
                }
            )
            .as_deref(),
            Some(&b"PT0S"[..])
        );
        assert_eq!(t(114, b"{\"a\": 1}").as_deref(), Some(&b"\"[MASKED]\""[..]));
        assert_eq!(
            b(3802, b"\x01{\"a\": 1}").as_deref(),
            Some(&b"\x01\"[MASKED]\""[..])
        );
        assert_eq!(
            t(17, b"\\x00ff").as_deref(),
            Some(&b"\\x5b4d41534b45445d"[..])
        );
        assert_eq!(t(1007, b"{1,2}").as_deref(), Some(&b"{}"[..]));
        let mut arr = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 23];
        arr.extend_from_slice(&[
            0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 7, 0, 0, 0, 4, 0, 0, 0, 8,
        ]);
        assert_eq!(
            b(1007, &arr).as_deref(),
            Some(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 23][..])
        );
        // money and types the daemon does not know: NULL.
        assert_eq!(t(790, b"$1.00"), None);
        assert_eq!(b(16_500, b"x"), None);
        assert_eq!(
            t(25, b"secret").as_deref(),
            Some(crate::mask::MASKED.as_bytes())
        );
    }

    #[test]
    fn a_detector_hit_never_leaves_text_a_type_cannot_hold() {
        let m = masker(&[], &["credit_card", "email"]);
        let cols = [
            col("n", 0, 20, 0),
            col("j", 0, 114, 0),
            col("k", 0, 114, 0),
            col("c", 0, 16_500, 0),
            col("s", 0, 25, 0),
        ];
        let plan = RowPlan::new(m, &cols, &HashMap::new(), &OutputStyle::default()).unwrap();
        let body = row(&[
            Some(b"4111111111111111"),
            Some(b"{\"card\": 4111111111111111}"),
            Some(b"{\"mail\": \"bob@example.com\"}"),
            Some(b"bob@example.com"),
            Some(b"bob@example.com"),
        ]);
        let (mut out, mut scratch, mut bc, mut bd) = (
            BytesMut::new(),
            Vec::new(),
            Counts::default(),
            Counts::default(),
        );
        plan.mask_row(&body, &mut out, &mut scratch, &mut bc, &mut bd)
            .unwrap();
        let v = values(&out);
        assert_eq!(v[0].as_deref(), Some(&b"0"[..]));
        assert_eq!(v[1].as_deref(), Some(&b"\"[MASKED]\""[..]));
        let k = String::from_utf8(v[2].clone().unwrap()).unwrap();
        assert!(
            !k.contains("bob@") && serde_json::from_str::<Value>(&k).is_ok(),
            "{k}"
        );
        assert_eq!(v[3], None);
        assert_eq!(v[4].as_deref(), Some(crate::mask::MASKED.as_bytes()));
    }

    fn table(name: &str, cols: &[&str]) -> Table {
        Table {
            name: name.into(),
            columns: cols
                .iter()
                .enumerate()
                .map(|(i, c)| (i as i16 + 1, c.to_string()))
                .collect(),
            ancestors: Vec::new(),
        }
    }

    #[test]
    fn columns_match_by_table_and_attribute_not_by_output_name() {
        let m = masker(&["customers.ssn"], &[]);
        let mut tables = HashMap::new();
        tables.insert(100, Some(table("public.customers", &["id", "name", "ssn"])));
        let mut part = table("public.customers_p1", &["id", "name", "ssn"]);
        part.ancestors.push("public.customers".into());
        tables.insert(102, Some(part));
        let cols = [
            // select ssn as x, name as ssn, id from customers
            at("x", 100, 3, 25, 0),
            at("ssn", 100, 2, 25, 0),
            at("id", 100, 1, 25, 0),
            // a table the catalog did not know, and an attribute it did
            // not list: masked (fail closed)
            at("id", 101, 1, 25, 0),
            at("gone", 100, 9, 25, 0),
            // a system column: not row data, and no rule names it
            at("tableoid", 100, -6, 25, 0),
            // a partition of customers
            at("ssn", 102, 3, 25, 0),
        ];
        let plan = RowPlan::new(m, &cols, &tables, &OutputStyle::default()).unwrap();
        let body = row(&[
            Some(b"123-45-6789"),
            Some(b"Alice"),
            Some(b"1"),
            Some(b"2"),
            Some(b"x"),
            Some(b"16384"),
            Some(b"123-45-6789"),
        ]);
        let (mut out, mut scratch, mut bc, mut bd) = (
            BytesMut::new(),
            Vec::new(),
            Counts::default(),
            Counts::default(),
        );
        plan.mask_row(&body, &mut out, &mut scratch, &mut bc, &mut bd)
            .unwrap();
        let v = values(&out);
        assert_eq!(v[0].as_deref(), Some(crate::mask::MASKED.as_bytes()));
        assert_eq!(v[1].as_deref(), Some(&b"Alice"[..]));
        assert_eq!(v[2].as_deref(), Some(&b"1"[..]));
        assert_eq!(v[3].as_deref(), Some(crate::mask::MASKED.as_bytes()));
        assert_eq!(v[4].as_deref(), Some(crate::mask::MASKED.as_bytes()));
        assert_eq!(v[5].as_deref(), Some(&b"16384"[..]));
        assert_eq!(v[6].as_deref(), Some(crate::mask::MASKED.as_bytes()));
    }

    #[test]
    fn no_rules_for_these_columns_means_no_plan_and_bad_rows_fail() {
        let m = masker(&["ssn"], &[]);
        assert!(RowPlan::new(
            m.clone(),
            &[col("name", 0, 25, 0)],
            &HashMap::new(),
            &OutputStyle::default()
        )
        .is_none());
        let plan = RowPlan::new(
            m,
            &[col("ssn", 0, 25, 0)],
            &HashMap::new(),
            &OutputStyle::default(),
        )
        .unwrap();
        let (mut out, mut scratch, mut bc, mut bd) = (
            BytesMut::new(),
            Vec::new(),
            Counts::default(),
            Counts::default(),
        );
        assert!(plan
            .mask_row(
                &row(&[Some(b"a"), Some(b"b")]),
                &mut out,
                &mut scratch,
                &mut bc,
                &mut bd
            )
            .is_err());
        assert!(plan
            .mask_row(
                &[0, 1, 0, 0, 0, 9],
                &mut out,
                &mut scratch,
                &mut bc,
                &mut bd
            )
            .is_err());
    }

    #[test]
    fn row_description_parses() {
        let mut b = BytesMut::new();
        b.put_i16(1);
        b.extend_from_slice(b"email\0");
        b.put_u32(42);
        b.put_i16(2);
        b.put_u32(25);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(1);
        assert_eq!(
            parse_row_description(&b).unwrap(),
            vec![at("email", 42, 2, 25, 1)]
        );
        assert!(parse_row_description(&b[..10]).is_err());
    }
}
