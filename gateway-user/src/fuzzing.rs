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
pub const TARGETS: &[Target] = &[Target {
    name: "policy_load",
    run: policy_load,
}];

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
