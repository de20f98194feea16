//! `cargo xtask bench fleet`: starts a PostgreSQL store (initdb under /tmp,
//! its own port) and runs the `fleet_bench` example (release) against it:
//! approval propagation between two nodes and audit shipping throughput.

use std::{fs, os::unix::fs::PermissionsExt as _, path::PathBuf};

use anyhow::{Context, Result};

use crate::{
    bench_pg::{chown, postgres_ids, start_postgres, Guard},
    util::require_root,
};

/// Work directory under /tmp.
const NAME: &str = "portcullis-bench-fleet";

/// Runs the fleet benchmark; `args` go to the example.
pub fn run(args: &[String]) -> Result<()> {
    require_root()?;
    let work = PathBuf::from("/tmp").join(NAME);
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;
    let (uid, gid) = postgres_ids()?;
    chown(&work, uid, gid)?;
    let password = format!("bench-{}", std::process::id());
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let pg = start_postgres(&work, port, &password, uid, gid)?;
    let _pg = Guard(Some(pg));
    let secret = work.join("secret");
    fs::create_dir_all(&secret)?;
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o700))?;
    let pw_file = secret.join("store.pw");
    fs::write(&pw_file, &password)?;
    let mut all = vec![
        "--store".to_string(),
        format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        "--password-file".to_string(),
        pw_file.display().to_string(),
    ];
    all.extend(args.iter().cloned());
    let result = crate::bench::example("fleet_bench", &all);
    drop(_pg);
    let _ = fs::remove_dir_all(&work);
    result
}
