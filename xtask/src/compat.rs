//! `cargo xtask compat`: the long compatibility run. Real clients and a
//! third-party test suite, each run directly and through Portcullis in the
//! same invocation, failing on any difference: the `compat_*` end-to-end
//! tests (quick ones also run in `cargo xtask test`) plus the `#[ignore]`d
//! long suites (pgbench in three modes, SQLAlchemy's PostgreSQL dialect
//! and SQL tests from its sdist, with and without a masking policy). Root
//! only.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{
    setup,
    util::{describe, require_root, step},
};

/// Runs setup, then every `compat_` end-to-end test including the ignored
/// long ones, printing their output (the suites print their counts).
pub fn run(filter: Option<String>) -> Result<()> {
    require_root()?;
    setup::run_setup()?;
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["test", "-p", "gateway-user", "--test", "e2e", "--"])
        .arg(filter.unwrap_or_else(|| "compat_".to_string()))
        .args(["--include-ignored", "--nocapture", "--test-threads=1"]);
    step(&format!("compat: {}", describe(&cmd)));
    if !cmd.status()?.success() {
        bail!("the compatibility run found differences (see above)");
    }
    Ok(())
}
