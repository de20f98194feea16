//! Entry points for the fuzz targets (`fuzz/`, run with `cargo xtask fuzz`)
//! and the bounded replay that runs them on stable in the normal test suite:
//! every file of `fuzz/corpus/<target>/` plus a few thousand deterministic
//! mutations of them.
//!
//! Owns nothing but the glue from raw bytes to the parsers under test; it
//! must not grow logic of its own (a target calls the same functions the
//! daemon does). Adding a target: a function here, one line in [`TARGETS`],
//! `fuzz/fuzz_targets/<name>.rs` (three lines) with its `[[bin]]` in
//! `fuzz/Cargo.toml`, and seed files in `fuzz/corpus/<name>/`.

use std::path::Path;

use crate::policy::PolicySet;

/// A fuzz target: a name (its corpus directory and cargo-fuzz binary) and
/// the function that must never panic, hang or grow without bound on any
/// input.
#[derive(Clone, Copy)]
pub struct Target {
    /// Name of the cargo-fuzz binary and of its corpus directory.
    pub name: &'static str,
    /// Feeds one input to the code under test.
    pub run: fn(&[u8]),
}

/// Every fuzz target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "policy_load",
        run: policy_load,
    },
    Target {
        name: "pg_frontend",
        run: pg_frontend,
    },
    Target {
        name: "pg_split",
        run: pg_split,
    },
    Target {
        name: "http_classify",
        run: http_classify,
    },
    Target {
        name: "ssh_words",
        run: ssh_words,
    },
    Target {
        name: "mask_detectors",
        run: mask_detectors,
    },
    Target {
        name: "mask_json",
        run: mask_json,
    },
];

/// The line that separates the TOML half of a `policy_load` input from its
/// Cedar half.
pub const CEDAR_SEPARATOR: &str = "\n%%cedar%%\n";

/// The policy loader: the input is a TOML policy file, optionally followed
/// by [`CEDAR_SEPARATOR`] and a Cedar rules file, validated together as one
/// policy set. Diagnostics and the summary are rendered too, since both
/// reach operators.
pub fn policy_load(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (toml, cedar) = text
        .split_once(CEDAR_SEPARATOR)
        .unwrap_or((text.as_ref(), ""));
    let dir = Path::new("/fuzz/policies");
    let texts = vec![
        (dir.join("fuzz.toml"), toml.to_string()),
        (dir.join("rules.cedar"), cedar.to_string()),
    ];
    match PolicySet::from_texts(dir, texts) {
        Ok(set) => {
            let _ = serde_json::to_string(&set.summary());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// The agent-side PostgreSQL decoder, fed exactly as the proxy reads: a
/// startup packet first (SSLRequest, CancelRequest, StartupMessage), then
/// typed frames, each decoded into a frontend message. Every frame it
/// accepts is read again by pgwire's decoder, which must find the same
/// fields: a difference panics (a finding: the daemon would decide on one
/// reading of a message another implementation reads otherwise).
pub fn pg_frontend(data: &[u8]) {
    use crate::proxy::postgres::{codec, pgmsg};
    let mut buf = bytes::BytesMut::from(data);
    // SSL/GSS requests may precede the startup message.
    for _ in 0..4 {
        match codec::decode_startup(&mut buf) {
            Ok(Some(codec::Startup::Params { .. })) => break,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return,
        }
    }
    // A small frame cap keeps inputs meaningful; the session's is 1 GiB.
    while let Ok(Some(head)) = codec::peek_frame(&buf, 1 << 20) {
        let frame = buf.split_to(head.total);
        let body = frame.get(5..).unwrap_or_default();
        let Ok(msg) = codec::decode_frontend(head.tag, body) else {
            return;
        };
        assert!(
            pgmsg::frontend_agrees(head.tag, body, &msg),
            "pgwire reads {:?} differently from {msg:?}",
            head.tag as char
        );
    }
}

/// The statement split a decision is made on, checked against itself the
/// way the differential e2e tests check it against the real server: every
/// statement of an accepted query string, read again on its own (as the
/// server reads it when it runs it), is one statement of the same class
/// with the same tables and functions. A string whose pieces read
/// differently alone would let a rule be decided on one reading and run on
/// another, so a difference panics (a finding, not a crash of the daemon:
/// the daemon never calls this).
pub fn pg_split(data: &[u8]) {
    use crate::proxy::postgres::classify::classify;
    // Queries reach the classifier only as UTF-8 (the frontend refuses
    // anything else), so other bytes are not inputs here.
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(list) = classify(sql) else {
        return;
    };
    for c in &list {
        let again = match classify(&c.text) {
            Ok(again) => again,
            Err(e) => panic!(
                "{sql:?}: statement {:?} no longer parses alone: {e}",
                c.text
            ),
        };
        let [one] = again.as_slice() else {
            panic!(
                "{sql:?}: statement {:?} reads as {} alone",
                c.text,
                again.len()
            );
        };
        let key = |c: &crate::proxy::postgres::classify::Classified| {
            let (mut t, mut f) = (c.tables.clone(), c.functions.clone());
            t.sort();
            f.sort();
            (c.class, t, f)
        };
        assert_eq!(
            key(one),
            key(c),
            "{sql:?}: statement {:?} reads differently alone",
            c.text
        );
    }
}

/// HTTP and Kubernetes request classification: the input's first line is
/// `METHOD PATH[?QUERY]`, as a request line would carry them.
pub fn http_classify(data: &[u8]) {
    use crate::proxy::http::classify;
    let text = String::from_utf8_lossy(data);
    let line = text.lines().next().unwrap_or_default();
    let (method, target) = line.split_once(' ').unwrap_or((line, "/"));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    // What is decided is what is forwarded: the normalised path is a
    // fixed point, and classifying it again decides the same.
    if let Ok(c) = classify::http(method, "fuzz.example", path, query) {
        let again = classify::http(method, "fuzz.example", &c.path, query);
        assert_eq!(again.as_ref().map(|a| &a.path), Ok(&c.path), "{path:?}");
        assert_eq!(again.map(|a| a.context), Ok(c.context), "{path:?}");
    }
    if let Ok(c) = classify::kubernetes(method, path, query) {
        let _ = serde_json::to_string(&c.context);
        let again = classify::kubernetes(method, &c.path, query);
        assert_eq!(again.map(|a| a.context), Ok(c.context), "{path:?}");
    }
}

/// SSH exec strings: the split never panics, and a plain command's words,
/// quoted again, split back to the same words (the reading is stable).
pub fn ssh_words(data: &[u8]) {
    use crate::proxy::ssh::words;
    let text = String::from_utf8_lossy(data);
    let Ok(argv) = words::split(&text) else {
        return;
    };
    let quoted: Option<Vec<String>> = argv
        .iter()
        .map(|w| {
            if !w.contains('\'') {
                Some(format!("'{w}'"))
            } else if !w.contains(['"', '$', '`', '\\', '!']) {
                Some(format!("\"{w}\""))
            } else {
                None
            }
        })
        .collect();
    if let Some(q) = quoted {
        let line = q.join(" ");
        // A quoted first word is not an assignment or a reserved word to
        // the shell, but the reader refuses those by their text: only
        // compare when the original was read as plain.
        if let Ok(back) = words::split(&line) {
            assert_eq!(back, argv, "{text:?} -> {line:?}");
        }
    }
}

/// A masker with every built-in detector, built once.
fn fuzz_masker() -> std::sync::Arc<crate::mask::Masker> {
    use std::sync::{Arc, OnceLock};
    static MASKER: OnceLock<Option<Arc<crate::mask::Masker>>> = OnceLock::new();
    let m = MASKER.get_or_init(|| {
        let rule = crate::policy::MaskRule {
            resource: "fuzz".into(),
            columns: vec!["secret".into()],
            json_paths: vec!["data.*".into(), "items.*.token".into()],
            detectors: crate::policy::DETECTORS
                .iter()
                .map(|d| d.to_string())
                .collect(),
            // Redact, so that "nothing detectable is left" is a property
            // the output must have (partial keeps four characters, which
            // may legitimately form a new match with what follows).
            style: "redact".into(),
            binary: "pass".into(),
        };
        crate::mask::Masker::compile("fuzz", &[rule], [1; 32])
            .ok()
            .flatten()
    });
    match m {
        Some(m) => m.clone(),
        None => panic!("the fuzz masker's rules must compile"),
    }
}

/// The value detectors, whole and streamed in chunks cut where the input's
/// first byte says: the streamed output must equal the whole-value output
/// for inputs without a private key block (which the stream masks from its
/// first line on), and no secret may survive either way.
pub fn mask_detectors(data: &[u8]) {
    let m = fuzz_masker();
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let mut counts = crate::mask::Counts::default();
    let mut whole = Vec::new();
    m.mask_detected(rest, &mut whole, &mut counts);
    let mut stream = m.stream();
    let mut streamed = Vec::new();
    let step = usize::from(cut).max(1);
    for chunk in rest.chunks(step) {
        stream.push(chunk, &mut streamed);
    }
    stream.finish(&mut streamed);
    // Masking is idempotent: what comes out has nothing left to find.
    assert!(
        !m.detects(&whole),
        "masked output still holds a secret: {:?}",
        String::from_utf8_lossy(&whole)
    );
    if !rest.windows(11).any(|w| w == b"-----BEGIN ") {
        assert_eq!(
            whole, streamed,
            "streamed masking differs from whole-value masking"
        );
    }
}

/// The streaming JSON masker, fed in chunks cut where the input's first
/// byte says. Chunking must not change the output or the verdict.
pub fn mask_json(data: &[u8]) {
    let m = fuzz_masker();
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let run = |step: usize| {
        let mut j = m.json(&["object.data.*"]);
        let mut out = Vec::new();
        for chunk in rest.chunks(step.max(1)) {
            if j.push(chunk, &mut out).is_err() {
                return None;
            }
        }
        j.finish(&mut out).ok().map(|_| out)
    };
    let whole = run(rest.len());
    let chunked = run(usize::from(cut));
    assert_eq!(whole, chunked, "chunking changed the JSON masker's result");
    // Input serde_json takes as a sequence of documents must be accepted,
    // and come out as JSON that serde_json takes too. (The masker is not
    // stricter than JSON's grammar: it passes lone surrogate escapes, which
    // serde_json refuses, so only this direction is checked.)
    let valid = |bytes: &[u8]| {
        std::str::from_utf8(bytes).is_ok_and(|t| {
            !t.trim().is_empty()
                && serde_json::Deserializer::from_str(t)
                    .into_iter::<serde_json::Value>()
                    .all(|d| d.is_ok())
        })
    };
    if valid(rest) {
        match &whole {
            Some(out) => assert!(
                valid(out),
                "masked output is not JSON: {:?}",
                String::from_utf8_lossy(out)
            ),
            None => panic!("valid JSON refused: {:?}", String::from_utf8_lossy(rest)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        path::PathBuf,
        time::{Duration, Instant},
    };

    use super::*;

    /// Inputs tried per target beyond the corpus, and the time cap per target.
    const MUTATIONS: usize = 3000;
    const TIME_CAP: Duration = Duration::from_secs(20);

    /// Bytes worth inserting: TOML and Cedar syntax the parsers branch on.
    const DICTIONARY: &[&str] = &[
        "\"",
        "'",
        "[",
        "]",
        "[[",
        "]]",
        "{",
        "}",
        "=",
        ",",
        "\n",
        ".",
        "#",
        "\\u",
        "\\",
        "::",
        "(",
        ")",
        ";",
        "@id(",
        "permit(",
        "forbid(",
        "when {",
        "unless {",
        "principal",
        "action",
        "resource",
        "context",
        "==",
        " in ",
        " has ",
        "like",
        "*",
        "0",
        "-1",
        "65536",
        "1e999",
        "true",
        "\u{0}",
        "\u{feff}",
        "é",
        "[resource.x]\n",
        "protocol = ",
        "match = ",
        "[identity.y]\n",
        "[issuer.z]\n",
        "upstream = ",
        "10.0.0.0/8",
        "[::1]:5432",
        "*.example.com:443",
        "approval_timeout = \"",
        "1h",
        "0s",
    ];

    /// A small deterministic PRNG (xorshift64*): no dependency, same
    /// sequence on every run so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
    }

    fn mutate(rng: &mut Rng, corpus: &[Vec<u8>], input: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(out.len() + 1);
            match rng.below(6) {
                0 if !out.is_empty() => {
                    let i = rng.below(out.len());
                    if let Some(b) = out.get_mut(i) {
                        *b ^= 1 << rng.below(8);
                    }
                }
                1 => {
                    let word = DICTIONARY[rng.below(DICTIONARY.len())];
                    out.splice(at..at, word.bytes());
                }
                2 if !out.is_empty() => {
                    let end = (at + 1 + rng.below(32)).min(out.len());
                    out.drain(at.min(end)..end);
                }
                3 if !out.is_empty() => {
                    let end = (at + 1 + rng.below(64)).min(out.len());
                    let piece: Vec<u8> = out[at.min(end)..end].to_vec();
                    out.splice(at..at, piece);
                }
                4 => {
                    let other = &corpus[rng.below(corpus.len())];
                    let from = rng.below(other.len() + 1);
                    out.truncate(at);
                    out.extend_from_slice(&other[from..]);
                }
                _ => out.insert(at, (rng.next() & 0xff) as u8),
            }
        }
        out.truncate(64 * 1024);
        out
    }

    fn corpus_dir(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(name)
    }

    fn run_guarded(target: &Target, input: &[u8], what: &str) {
        let outcome = std::panic::catch_unwind(|| (target.run)(input));
        if outcome.is_err() {
            let saved = std::env::temp_dir().join(format!("portcullis-fuzz-{}-crash", target.name));
            let _ = fs::write(&saved, input);
            panic!(
                "fuzz target {} panicked on {what}; input saved to {} (replay: cargo xtask fuzz {} -- {})",
                target.name,
                saved.display(),
                target.name,
                saved.display()
            );
        }
    }

    #[test]
    fn every_target_survives_its_corpus_and_thousands_of_mutations() {
        for target in TARGETS {
            let dir = corpus_dir(target.name);
            let mut corpus = Vec::new();
            for entry in fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
                .flatten()
            {
                let bytes = fs::read(entry.path()).expect("read corpus file");
                run_guarded(target, &bytes, &entry.path().display().to_string());
                corpus.push(bytes);
            }
            assert!(
                corpus.len() >= 3,
                "{}: a seed corpus of a few files",
                target.name
            );
            let seed = std::env::var("PORTCULLIS_FUZZ_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0x5eed_0f90_11c0_de01_u64);
            let mut rng = Rng(seed | 1);
            let start = Instant::now();
            let mut tried = 0;
            while tried < MUTATIONS && start.elapsed() < TIME_CAP {
                let base = &corpus[rng.below(corpus.len())];
                let input = mutate(&mut rng, &corpus, base);
                run_guarded(target, &input, &format!("mutation {tried} (seed {seed})"));
                tried += 1;
            }
            eprintln!(
                "fuzz replay {}: {} corpus files, {tried} mutations in {:?}",
                target.name,
                corpus.len(),
                start.elapsed()
            );
            assert!(tried >= 100, "{}: only {tried} inputs in time", target.name);
        }
    }

    #[test]
    fn a_valid_seed_loads_and_the_entry_point_sees_both_halves() {
        let dir = Path::new("/fuzz/policies");
        let toml = "[resource.db]\nprotocol = \"tcp\"\nmatch = [\"10.0.0.5:5432\"]\n";
        let cedar = "permit(principal, action == Action::\"tcp:connect\", resource);\n";
        let set = PolicySet::from_texts(
            dir,
            vec![
                (dir.join("fuzz.toml"), toml.into()),
                (dir.join("rules.cedar"), cedar.into()),
            ],
        )
        .expect("valid seed");
        assert_eq!(set.rules().len(), 1);
        let broken = PolicySet::from_texts(
            dir,
            vec![(dir.join("rules.cedar"), "permit(principal,".into())],
        );
        assert!(broken.is_err());
    }
}
