use std::sync::Arc;

use super::*;

fn rule(columns: &[&str], paths: &[&str], detectors: &[&str], style: &str) -> MaskRule {
    MaskRule {
        resource: "db".into(),
        columns: columns.iter().map(|s| s.to_string()).collect(),
        json_paths: paths.iter().map(|s| s.to_string()).collect(),
        detectors: detectors.iter().map(|s| s.to_string()).collect(),
        style: style.into(),
        binary: "pass".into(),
    }
}

fn masker(rules: &[MaskRule]) -> Arc<Masker> {
    Masker::compile("db", rules, [7; 32])
        .expect("compiles")
        .expect("has rules")
}

fn detected(m: &Masker, value: &str) -> (String, Counts) {
    let mut out = Vec::new();
    let mut counts = Counts::default();
    m.mask_detected(value.as_bytes(), &mut out, &mut counts);
    (String::from_utf8(out).expect("utf-8"), counts)
}

const ALL: &[&str] = &[
    "credit_card",
    "email",
    "iban",
    "aws_access_key",
    "jwt",
    "private_key",
    "us_ssn",
    "phone",
];

#[test]
fn no_rules_no_masker() {
    assert!(
        Masker::compile("other", &[rule(&["a"], &[], &[], "redact")], [0; 32])
            .expect("compiles")
            .is_none()
    );
}

#[test]
fn cards_are_luhn_checked_and_other_numbers_left_alone() {
    let m = masker(&[rule(&[], &[], &["credit_card"], "redact")]);
    let (out, counts) = detected(&m, "paid with 4111 1111 1111 1111 on order 1234567890123");
    assert_eq!(out, "paid with [MASKED] on order 1234567890123");
    assert_eq!(counts.to_json(), serde_json::json!({"credit_card": 1}));
    // Luhn fails: not a card.
    let (out, counts) = detected(&m, "4111111111111112");
    assert_eq!(out, "4111111111111112");
    assert!(counts.is_empty());
    // A card followed by another digit group is still found.
    let (out, _) = detected(&m, "4111-1111-1111-1111 2024");
    assert_eq!(out, "[MASKED] 2024");
    // Two cards in a row: the second starts inside the first candidate.
    let (out, counts) = detected(&m, "4111 1111 1111 1111 5500 0000 0000 0004");
    assert_eq!(out, "[MASKED] [MASKED]");
    assert_eq!(counts.total(), 2);
    // A failed candidate does not hide a card that starts inside it.
    let (out, _) = detected(&m, "1234 4111 1111 1111 1111");
    assert_eq!(out, "1234 [MASKED]");
}

#[test]
fn partial_keeps_the_last_four_and_separators() {
    let m = masker(&[rule(&[], &[], &["credit_card"], "partial")]);
    let (out, _) = detected(&m, "card 5500-0000-0000-0004.");
    assert_eq!(out, "card ****-****-****-0004.");
}

#[test]
fn hash_is_keyed_and_stable() {
    let m = masker(&[rule(&[], &[], &["email"], "hash")]);
    let (a, _) = detected(&m, "alice@example.com");
    let (b, _) = detected(&m, "alice@example.com");
    assert_eq!(a, b);
    assert!(
        a.starts_with("[sha256:") && a.len() == "[sha256:]".len() + 16,
        "{a}"
    );
    let other = Masker::compile("db", &[rule(&[], &[], &["email"], "hash")], [8; 32])
        .expect("compiles")
        .expect("rules");
    let (c, _) = detected(&other, "alice@example.com");
    assert_ne!(a, c, "a different key gives a different hash");
}

#[test]
fn every_builtin_detector_finds_its_kind() {
    let m = masker(&[rule(&[], &[], ALL, "redact")]);
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
    let cases = [
        ("mail bob.smith+x@mail.example.co.uk now", "email"),
        ("IBAN GB82 WEST 1234 5698 7654 32 ok", "iban"),
        ("key AKIAIOSFODNN7EXAMPLE here", "aws_access_key"),
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "aws_access_key",
        ),
        ("ssn 123-45-6789", "us_ssn"),
        ("call +1 415-555-0100", "phone"),
    ];
    for (text, kind) in cases {
        let (out, counts) = detected(&m, text);
        assert!(out.contains(MASKED), "{kind}: {out}");
        assert_eq!(counts.iter().next().map(|(k, _)| k), Some(kind), "{text}");
    }
    let (out, counts) = detected(&m, &format!("Authorization: Bearer {jwt}"));
    assert_eq!(out, "Authorization: Bearer [MASKED]");
    assert_eq!(counts.to_json(), serde_json::json!({"jwt": 1}));
    // The secret key's name stays readable.
    let (out, _) = detected(
        &m,
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    );
    assert_eq!(out, "aws_secret_access_key = [MASKED]");
    // Never-issued SSNs and bad IBANs are not personal data.
    for clean in ["000-12-3456", "GB82 WEST 1234 5698 7654 33", "nothing here"] {
        let (out, counts) = detected(&m, clean);
        assert_eq!(out, clean);
        assert!(counts.is_empty(), "{clean}: {counts:?}");
    }
}

#[test]
fn private_key_blocks_are_masked_whole_even_without_end() {
    let m = masker(&[rule(&[], &[], &["private_key"], "redact")]);
    let key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
    let (out, _) = detected(&m, &format!("before\n{key}after"));
    assert_eq!(out, "before\n[MASKED]\nafter");
    let (out, _) = detected(&m, "x -----BEGIN RSA PRIVATE KEY-----\nMIIEow");
    assert_eq!(out, "x [MASKED]");
}

#[test]
fn custom_regex_detectors_compile_and_match() {
    let m = masker(&[rule(&[], &[], &["regex:tok_[a-z0-9]{8}"], "redact")]);
    let (out, counts) = detected(&m, "use tok_abcd1234 now");
    assert_eq!(out, "use [MASKED] now");
    assert_eq!(
        counts.to_json(),
        serde_json::json!({"regex:tok_[a-z0-9]{8}": 1})
    );
    assert!(detect::validate("regex:(").is_err());
    assert!(detect::validate("regex:a*").is_err(), "matches empty");
    assert!(detect::validate("nonsense").is_err());
    assert!(detect::validate("email").is_ok());
}

#[test]
fn columns_match_bare_and_table_qualified() {
    let m = masker(&[
        rule(&["email"], &[], &[], "redact"),
        rule(&["customers.card"], &[], &[], "partial"),
    ]);
    assert_eq!(m.column(None, "EMAIL"), Some(Style::Redact));
    assert_eq!(m.column(Some("orders"), "email"), Some(Style::Redact));
    assert_eq!(m.column(Some("customers"), "card"), Some(Style::Partial));
    assert_eq!(
        m.column(Some("public.customers"), "card"),
        Some(Style::Partial)
    );
    assert_eq!(m.column(Some("orders"), "card"), None);
    assert_eq!(m.column(None, "card"), None);
    let mut out = Vec::new();
    m.mask_whole(Style::Partial, b"4111111111111111", &mut out);
    assert_eq!(out, b"************1111");
    out.clear();
    m.mask_whole(Style::Partial, b"short", &mut out);
    assert_eq!(out, b"*****", "short values keep nothing");
}

#[test]
fn ascii_column_names_are_looked_up_as_lowercased_ones() {
    let m = masker(&[
        rule(&["email"], &[], &[], "redact"),
        rule(&["customers.card"], &[], &[], "partial"),
        rule(&["billing.customers.ssn"], &[], &[], "hash"),
        rule(&["straße.ÄB"], &[], &[], "redact"),
    ]);
    let long = "t".repeat(300);
    let tables = [
        None,
        Some("customers"),
        Some("CUSTOMERS"),
        Some("public.Customers"),
        Some("Billing.Customers"),
        Some("billing.customers"),
        Some("other"),
        Some("a.b.customers"),
        Some("STRASSE"),
        Some("Straße"),
        Some(""),
        Some("."),
        Some(long.as_str()),
    ];
    let columns = [
        "email", "EMAIL", "Card", "ssn", "SSN", "äb", "ÄB", "", "x.card", &long,
    ];
    for t in tables {
        for c in columns {
            assert_eq!(
                m.column(t, c),
                m.column_lowercased(t, c),
                "table {t:?}, column {c:?}"
            );
        }
    }
    assert_eq!(
        m.column(Some("Public.CUSTOMERS"), "CARD"),
        Some(Style::Partial)
    );
    assert_eq!(
        m.column(Some("BILLING.customers"), "Ssn"),
        Some(Style::Hash)
    );
    assert_eq!(m.column(Some("straße"), "äb"), Some(Style::Redact));
    assert_eq!(m.column(Some(long.as_str()), "email"), Some(Style::Redact));
}

fn stream_all(m: &Arc<Masker>, chunks: &[&[u8]]) -> (Vec<u8>, Counts) {
    let mut s = m.stream();
    let mut out = Vec::new();
    for c in chunks {
        s.push(c, &mut out);
    }
    s.finish(&mut out);
    (out, s.counts().clone())
}

#[test]
fn stream_catches_secrets_split_across_chunks_at_every_cut() {
    let m = masker(&[rule(&[], &[], ALL, "redact")]);
    let text = b"$ cat creds\nAKIAIOSFODNN7EXAMPLE and 4111111111111111 \x1b[31mred\x1b[0m done\n";
    let (whole, _) = stream_all(&m, &[text]);
    let expected = b"$ cat creds\n[MASKED] and [MASKED] \x1b[31mred\x1b[0m done\n".to_vec();
    assert_eq!(
        String::from_utf8_lossy(&whole),
        String::from_utf8_lossy(&expected)
    );
    for cut in 1..text.len() {
        let (out, counts) = stream_all(&m, &[&text[..cut], &text[cut..]]);
        assert_eq!(out, expected, "cut at {cut}");
        assert_eq!(counts.total(), 2, "cut at {cut}");
    }
    // Byte by byte.
    let chunks: Vec<&[u8]> = text.chunks(1).collect();
    let (out, _) = stream_all(&m, &chunks);
    assert_eq!(out, expected);
}

#[test]
fn stream_holds_back_at_most_the_lookback_and_flush_releases_it() {
    let m = masker(&[rule(&[], &[], &["email"], "redact")]);
    let mut s = m.stream();
    let mut out = Vec::new();
    let big = vec![b'x'; 3 * detect::MAX_MATCH];
    s.push(&big, &mut out);
    assert!(s.held() <= detect::MAX_MATCH);
    assert_eq!(out.len() + s.held(), big.len());
    s.push(b" prompt$ ", &mut out);
    s.flush(&mut out);
    assert_eq!(s.held(), 0);
    assert!(out.ends_with(b" prompt$ "));
}

#[test]
fn stream_never_splits_escape_sequences_or_utf8() {
    let mut buf = vec![b'a'; 100];
    buf.extend_from_slice(b"\x1b[38;5;1");
    assert_eq!(stream::tests_safe_cut(&buf, buf.len()), 100);
    let s = "héllo".as_bytes();
    assert_eq!(stream::tests_safe_cut(s, 2), 1);
}

#[test]
fn stream_swallows_a_private_key_block_across_chunks() {
    let m = masker(&[rule(&[], &[], &["private_key"], "redact")]);
    let mut body = b"top\n-----BEGIN RSA PRIVATE KEY-----\n".to_vec();
    for _ in 0..200 {
        body.extend_from_slice(b"MIIEowIBAAKCAQEAxyzxyzxyzxyzxyzxyzxyzxyzxyzxyzxyzxyzxyzxyz\n");
    }
    body.extend_from_slice(b"-----END RSA PRIVATE KEY-----\nbottom\n");
    for size in [1usize, 7, 64, 1000, 100_000] {
        let chunks: Vec<&[u8]> = body.chunks(size).collect();
        let (out, counts) = stream_all(&m, &chunks);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "top\n[MASKED]\nbottom\n",
            "chunk size {size}"
        );
        assert_eq!(counts.total(), 1);
    }
}

fn json_all(
    m: &Arc<Masker>,
    extra: &[&str],
    chunks: &[&[u8]],
) -> Result<(String, Counts), MaskError> {
    let mut j = m.json(extra);
    let mut out = Vec::new();
    for c in chunks {
        j.push(c, &mut out)?;
    }
    j.finish(&mut out)?;
    Ok((String::from_utf8(out).expect("utf-8"), j.counts().clone()))
}

#[test]
fn json_masks_paths_and_detectors_and_keeps_the_rest_byte_for_byte() {
    let m = masker(&[
        rule(&[], &["spec.password", "items.*.token"], &[], "redact"),
        rule(&[], &[], &["credit_card", "email"], "redact"),
    ]);
    let doc = br#"{"spec": {"password": "hunter2", "user": "bob", "n": 1.5e3},
 "items": [{"token": 12345, "x": null}, {"token": {"deep": ["a", true]}}],
 "note": "mail a@b.io", "card": 4111111111111111, "esc": "\u0061lice@x.org"}"#;
    let expected = r#"{"spec": {"password": "[MASKED]", "user": "bob", "n": 1.5e3},
 "items": [{"token": "[MASKED]", "x": null}, {"token": {"deep": ["[MASKED]", "[MASKED]"]}}],
 "note": "mail [MASKED]", "card": "[MASKED]", "esc": "[MASKED]"}"#;
    let (out, counts) = json_all(&m, &[], &[doc]).expect("valid");
    assert_eq!(out, expected);
    assert_eq!(
        counts.to_json(),
        serde_json::json!({"spec.password": 1, "items.*.token": 3, "email": 2, "credit_card": 1})
    );
    for cut in 1..doc.len() {
        let (out, _) = json_all(&m, &[], &[&doc[..cut], &doc[cut..]]).expect("valid");
        assert_eq!(out, expected, "cut at {cut}");
    }
    let parsed: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
    assert_eq!(parsed["spec"]["user"], "bob");
}

#[test]
fn json_masks_a_watch_stream_event_by_event() {
    let m = masker(&[rule(&[], &["nothing"], &[], "redact")]);
    let events = b"{\"type\":\"ADDED\",\"object\":{\"kind\":\"Secret\",\"data\":{\"k\":\"c2VjcmV0\"}}}\n{\"type\":\"MODIFIED\",\"object\":{\"data\":{\"k\":\"bmV3\"}}}\n";
    let mut j = m.json(&["object.data.*"]);
    let mut out = Vec::new();
    let first_end = events.iter().position(|&b| b == b'\n').expect("newline") + 1;
    j.push(&events[..first_end], &mut out).expect("valid");
    assert_eq!(j.documents(), 1);
    assert!(j.at_document_boundary());
    assert!(String::from_utf8_lossy(&out).contains("\"k\":\"[MASKED]\""));
    assert!(!String::from_utf8_lossy(&out).contains("c2VjcmV0"));
    j.push(&events[first_end..], &mut out).expect("valid");
    j.finish(&mut out).expect("complete");
    assert_eq!(j.documents(), 2);
    assert!(!String::from_utf8_lossy(&out).contains("bmV3"));
}

#[test]
fn json_refuses_what_is_not_json_and_stays_refused() {
    let m = masker(&[rule(&[], &["a"], &[], "redact")]);
    for bad in [
        &b"{\"a\": }"[..],
        b"{\"a\" 1}",
        b"[1, 2}",
        b"{\"a\": tru}",
        b"{\"a\": \"x\ny\"}",
        b"}",
        b"{\"a\": \"\\q\"}",
        b"{\"a\": \"\\u12\"}",
        b"{\"b\": \"\\u00zz\"}",
    ] {
        assert!(
            json_all(&m, &[], &[bad]).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    assert!(json_all(&m, &[], &[b"{\"a\": [1"]).is_err(), "truncated");
    let mut j = m.json(&[]);
    let mut out = Vec::new();
    assert!(j.push(b"{\"a\" ", &mut out).is_ok());
    assert!(j.push(b"!", &mut out).is_err());
    assert!(j.push(b"}", &mut out).is_err(), "poisoned after an error");
    let deep = vec![b'['; json::MAX_DEPTH + 1];
    assert!(matches!(
        json_all(&m, &[], &[&deep]),
        Err(MaskError::TooDeep { .. })
    ));
}

#[test]
fn json_bounds_strings() {
    let m = masker(&[rule(&[], &[], &["email"], "redact")]);
    let mut j = m.json(&[]);
    let mut out = Vec::new();
    j.push(b"\"", &mut out).expect("open");
    let block = vec![b'a'; 1 << 20];
    let mut failed = false;
    for _ in 0..8 {
        if j.push(&block, &mut out).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "a string over the limit is refused");
}
