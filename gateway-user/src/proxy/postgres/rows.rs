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

/// Types whose binary form is their text (jsonb: a version byte, then text).
fn binary_text_offset(type_oid: u32) -> Option<usize> {
    match type_oid {
        // text, varchar, bpchar, name, unknown, xml, json, char, citext-like domains
        // arrive with their base type's OID.
        25 | 1043 | 1042 | 19 | 705 | 142 | 114 | 18 => Some(0),
        3802 => Some(1),
        _ => None,
    }
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

#[derive(Debug, Clone)]
struct Plan {
    /// Column-rule style, if the column is masked by name.
    style: Option<Style>,
    /// Where the text starts in the value; None: not text in this format.
    text_at: Option<usize>,
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
    pub fn new(
        masker: Arc<Masker>,
        cols: &[Column],
        tables: &HashMap<u32, Option<Table>>,
    ) -> Option<Self> {
        let detectors = masker.has_detectors();
        let mut any = detectors;
        let plans = cols
            .iter()
            .map(|c| {
                let style = if c.table_oid == 0 {
                    masker.column(None, &c.name)
                } else {
                    let known = tables.get(&c.table_oid).and_then(|t| t.as_ref());
                    match known.and_then(|t| Some((t, t.columns.get(&c.attnum)?))) {
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
                    text_at: if c.format == 0 {
                        Some(0)
                    } else {
                        binary_text_offset(c.type_oid)
                    },
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
            match (plan.style, plan.text_at) {
                (Some(style), Some(off)) => {
                    let (head, text) = value.split_at(off.min(value.len()));
                    scratch.extend_from_slice(head);
                    self.masker.mask_whole(style, text, scratch);
                    by_column.add(&plan.name, 1);
                }
                (Some(_), None) => {
                    // A masked column in a binary form we cannot rewrite.
                    by_column.add(&plan.name, 1);
                    out.put_i32(-1);
                    continue;
                }
                (None, Some(off)) if self.detectors => {
                    let (head, text) = value.split_at(off.min(value.len()));
                    scratch.extend_from_slice(head);
                    let hits = self.masker.mask_detected(text, scratch, by_detector);
                    if hits > 0 {
                        by_column.add(&plan.name, hits as u64);
                    }
                }
                _ => scratch.extend_from_slice(value),
            }
            out.put_i32(scratch.len() as i32);
            out.extend_from_slice(scratch);
        }
        let len = (out.len() - at) as i32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
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
        let plan = RowPlan::new(m, &cols, &tables).unwrap();
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
    fn masked_binary_non_text_becomes_null_and_unknown_tables_fail_closed() {
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
        let plan = RowPlan::new(m, &cols, &tables).unwrap();
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
        assert_eq!(v[0], None);
        assert_ne!(v[1].as_deref(), Some(&b"12.50"[..]));
        // Table 9 is known not to be "orders".
        assert_eq!(v[2].as_deref(), Some(&b"9.99"[..]));
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
            at("ctid", 100, -1, 25, 0),
            // a partition of customers
            at("ssn", 102, 3, 25, 0),
        ];
        let plan = RowPlan::new(m, &cols, &tables).unwrap();
        let body = row(&[
            Some(b"123-45-6789"),
            Some(b"Alice"),
            Some(b"1"),
            Some(b"2"),
            Some(b"(0,1)"),
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
        assert_eq!(v[5].as_deref(), Some(crate::mask::MASKED.as_bytes()));
    }

    #[test]
    fn no_rules_for_these_columns_means_no_plan_and_bad_rows_fail() {
        let m = masker(&["ssn"], &[]);
        assert!(RowPlan::new(m.clone(), &[col("name", 0, 25, 0)], &HashMap::new()).is_none());
        let plan = RowPlan::new(m, &[col("ssn", 0, 25, 0)], &HashMap::new()).unwrap();
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
