//! Streams hold back only what could still grow into a match (issue 19:
//! Server-Sent Events were held until the response ended).

use std::sync::Arc;

use super::*;

fn masker(detectors: &[&str]) -> Arc<Masker> {
    let rule = MaskRule {
        resource: "api".into(),
        columns: Vec::new(),
        json_paths: Vec::new(),
        detectors: detectors.iter().map(|s| s.to_string()).collect(),
        style: "redact".into(),
        binary: "pass".into(),
    };
    Masker::compile("api", &[rule], [7; 32])
        .expect("compiles")
        .expect("has rules")
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
fn a_complete_event_is_emitted_at_once() {
    let m = masker(ALL);
    let mut s = m.stream().eager();
    let mut out = Vec::new();
    s.push(
        b"event: message\ndata: {\"n\": 1, \"who\": \"alice@example.com\"}\n\n",
        &mut out,
    );
    assert_eq!(s.held(), 0, "{}", String::from_utf8_lossy(&out));
    assert_eq!(
        out,
        b"event: message\ndata: {\"n\": 1, \"who\": \"[MASKED]\"}\n\n".to_vec()
    );
    // A plain line too.
    out.clear();
    s.push(b"data: tick 2\n\n", &mut out);
    assert_eq!(s.held(), 0);
    assert_eq!(out, b"data: tick 2\n\n".to_vec());
}

#[test]
fn only_the_tail_that_could_start_a_match_is_held() {
    let m = masker(&["email"]);
    let mut s = m.stream().eager();
    let mut out = Vec::new();
    s.push(b"data: write to bob@exa", &mut out);
    // "bob@exa" may still become an address; the rest is out.
    assert_eq!(out, b"data: write to ".to_vec());
    assert_eq!(s.held(), "bob@exa".len());
    s.push(b"mple.com now\n\n", &mut out);
    assert_eq!(s.held(), 0);
    assert_eq!(out, b"data: write to [MASKED] now\n\n".to_vec());
    // Split at every byte: the same masked output.
    let text = b"data: a 4111 1111 1111 1111 b carol@example.org c\n\n";
    let m = masker(ALL);
    for cut in 1..text.len() {
        let mut s = m.stream().eager();
        let mut out = Vec::new();
        s.push(&text[..cut], &mut out);
        s.push(&text[cut..], &mut out);
        assert_eq!(s.held(), 0, "cut {cut}");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "data: a [MASKED] b [MASKED] c\n\n",
            "cut {cut}"
        );
    }
}

#[test]
fn the_hold_is_bounded() {
    // A run that stays a possible match (custom pattern over any byte
    // but a newline) is held at most MAX_MATCH bytes.
    let m = masker(&["regex:secret=[^\\n]+;"]);
    let mut s = m.stream().eager();
    let mut out = Vec::new();
    let mut big = b"secret=".to_vec();
    big.extend(std::iter::repeat_n(b'x', 3 * detect::MAX_MATCH));
    s.push(&big, &mut out);
    assert!(s.held() <= detect::MAX_MATCH, "{}", s.held());
    assert_eq!(out.len() + s.held(), big.len());
    s.finish(&mut out);
    assert_eq!(out.len(), big.len());
}

#[test]
fn pending_from_answers_per_detector() {
    let m = masker(&["us_ssn"]);
    let set = m.detector_set();
    assert_eq!(set.pending_from(b"id 123-4", 0), 3);
    assert_eq!(set.pending_from(b"id 123-4x", 0), 9);
    assert_eq!(set.pending_from(b"done\n", 0), 5);
    // Nothing configured: nothing to hold.
    let empty = detect::DetectorSet::new(&[]).unwrap();
    assert_eq!(empty.pending_from(b"abc", 0), 3);
}
