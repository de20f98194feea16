//! `cargo xtask test` and `cargo xtask build`.

use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{
    setup,
    util::{self, describe, step},
};

/// The eBPF crate, which is never built for the host.
const KERNEL_CRATE: &str = "gateway-ebpf";

/// Runs one cargo step with inherited output; returns whether it passed.
fn run_step(name: &str, cmd: &mut Command) -> bool {
    step(&format!("{name}: {}", describe(cmd)));
    match cmd.status() {
        Ok(status) if status.success() => true,
        Ok(status) => {
            eprintln!("xtask: step `{name}` FAILED ({status})");
            false
        }
        Err(e) => {
            eprintln!("xtask: step `{name}` FAILED: cannot start it: {e}");
            false
        }
    }
}

/// Runs `cargo test`, echoing its output, and adds up its `test result:`
/// lines. Returns (success, passed, failed).
fn run_tests(cmd: &mut Command) -> (bool, u64, u64) {
    use std::io::{BufRead, BufReader};
    step(&format!("test: {}", describe(cmd)));
    cmd.stdout(std::process::Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xtask: step `test` FAILED: cannot start it: {e}");
            return (false, 0, 0);
        }
    };
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split(';') {
                    let mut words = part.split_whitespace().rev();
                    let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                        continue;
                    };
                    let n: u64 = n.parse().unwrap_or(0);
                    match kind {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        _ => {}
                    }
                }
            }
        }
    }
    match child.wait() {
        Ok(status) if status.success() => (true, passed, failed),
        Ok(status) => {
            eprintln!("xtask: step `test` FAILED ({status})");
            (false, passed, failed)
        }
        Err(e) => {
            eprintln!("xtask: step `test` FAILED: {e}");
            (false, passed, failed)
        }
    }
}

/// Fails listing `failed` when it is not empty.
fn check(failed: &[&str]) -> Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    bail!("failed step(s): {}", failed.join(", "))
}

/// Setup, then format check, build, clippy and the workspace tests. Lint
/// failures do not stop the tests from running, but fail the task.
/// `cargo_args` go to `cargo test` (after `--workspace`, which is dropped
/// when they select packages themselves).
pub fn test(cargo_args: &[String]) -> Result<()> {
    step("setup");
    setup::run_setup().context("step `setup` failed")?;
    let mut failed = Vec::new();

    if !run_step("fmt", util::cargo().args(["fmt", "--all", "--", "--check"])) {
        failed.push("fmt");
    }
    // The kernel crate only builds for the BPF target (gateway-user's
    // build.rs does that); on the host it has no `main` to link.
    if !run_step(
        "build",
        util::cargo().args([
            "build",
            "--workspace",
            "--all-targets",
            "--exclude",
            KERNEL_CRATE,
        ]),
    ) {
        failed.push("build");
        return check(&failed);
    }
    if !run_step(
        "clippy",
        util::cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    ) {
        failed.push("clippy");
    }

    // The Kubernetes manifests, against the API schemas (offline).
    let manifests = [
        "namespace",
        "serviceaccount",
        "configmap",
        "secret",
        "daemonset",
    ];
    if !run_step(
        "manifests",
        std::process::Command::new("kubernetes-validate")
            .arg("--strict")
            .args(manifests.map(|m| format!("deploy/kubernetes/{m}.yaml"))),
    ) {
        failed.push("manifests");
    }

    let mut test = util::cargo();
    test.arg("test");
    let selects_packages = cargo_args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a.starts_with("-p") || a.starts_with("--package"));
    if !selects_packages {
        test.arg("--workspace");
    }
    test.args(cargo_args);
    if env::var_os("RUST_TEST_THREADS").is_none() {
        test.env("RUST_TEST_THREADS", "2");
    }
    let (ok, passed, failed_tests) = run_tests(&mut test);
    if !ok {
        failed.push("test");
    }
    // One closing line for the whole suite, after every runner's own.
    println!("{passed} passed, {failed_tests} failed");
    check(&failed)
}

/// Setup, then `cargo build --release -p gateway-user`; returns the path of
/// the `portcullis` binary. With `binary`, setup only, and that binary.
pub fn daemon_binary(binary: Option<PathBuf>) -> Result<PathBuf> {
    match binary {
        Some(path) => {
            step("setup");
            setup::run_setup().context("step `setup` failed")?;
            if !path.is_file() {
                bail!("{} is not a file", path.display());
            }
            Ok(std::path::absolute(&path)?)
        }
        None => build_release(),
    }
}

/// Setup, then `cargo build --release -p gateway-user`; returns the path of
/// the `portcullis` binary.
pub fn build_release() -> Result<PathBuf> {
    step("setup");
    setup::run_setup().context("step `setup` failed")?;
    let mut build = util::cargo();
    build.args(["build", "--release", "-p", "gateway-user"]);
    step(&describe(&build));
    util::run(&mut build).context("step `build` failed")?;
    let binary = util::target_dir().join("release").join("portcullis");
    if !binary.is_file() {
        bail!("the build succeeded but {} is missing", binary.display());
    }
    Ok(binary)
}
