//! `cargo xtask fuzz [target] [--time SECS]`: runs the cargo-fuzz targets in
//! `fuzz/` on nightly (libFuzzer + AddressSanitizer), installing cargo-fuzz
//! first when it is missing. Without a target, every target in
//! `fuzz/fuzz_targets/` runs in turn for `--time` seconds each.
//!
//! The seed corpus in `fuzz/corpus/<target>/` is read, never written: new
//! inputs go to `fuzz/target/corpus-work/<target>/` and crashes to
//! `fuzz/artifacts/<target>/`. The short replay on stable is a unit test of
//! `portcullis::fuzzing`, part of the normal test run.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::util::{cargo, describe, repo_root, run, step};

/// The targets, from the files in `fuzz/fuzz_targets/`.
fn targets() -> Result<Vec<String>> {
    let dir = repo_root().join("fuzz").join("fuzz_targets");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "rs").then(|| p.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Installs cargo-fuzz unless `cargo fuzz --version` already works.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    let mut install = cargo();
    install.args(["install", "cargo-fuzz", "--locked"]);
    step(&describe(&install));
    run(&mut install).context("installing cargo-fuzz")
}

/// Runs `target` (or every target) for `secs` seconds each; `extra` goes to
/// libFuzzer (e.g. a crash file to replay).
pub fn run_fuzz(target: Option<String>, secs: u64, extra: &[String]) -> Result<()> {
    let all = targets()?;
    let chosen = match target {
        Some(t) if all.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t:?}; targets: {}", all.join(", ")),
        None => all,
    };
    ensure_cargo_fuzz()?;
    let fuzz_dir = repo_root().join("fuzz");
    for t in chosen {
        let work: PathBuf = fuzz_dir.join("target").join("corpus-work").join(&t);
        fs::create_dir_all(&work)?;
        let seeds = fuzz_dir.join("corpus").join(&t);
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&fuzz_dir)
            .args(["+nightly", "fuzz", "run", &t])
            .arg(&work)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .args(["-max_len=65536", "-rss_limit_mb=4096", "-timeout=10"])
            .args(extra);
        step(&describe(&cmd));
        run(&mut cmd)
            .with_context(|| format!("fuzz target {t} failed (see fuzz/artifacts/{t}/)"))?;
    }
    Ok(())
}
