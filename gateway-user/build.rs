//! Builds the kernel programs (`gateway-ebpf`) for the BPF target with the
//! nightly toolchain and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! Needs `bpf-linker` and nightly `rust-src`: `cargo xtask setup` installs both.

//!
//! Also embeds the example policies (`../policies`, recursively) for
//! `portcullis install`: `$OUT_DIR/example_policies.rs` is a list of
//! (relative path, bytes).

fn main() -> anyhow::Result<()> {
    let crate_dir = crate_dir()?;
    embed_example_policies(&crate_dir.join("../policies"))?;
    let root_dir = crate_dir.join("../gateway-ebpf");
    let common_dir = crate_dir.join("../gateway-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "gateway-ebpf",
            root_dir: &root_dir.to_string_lossy(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// This crate's directory, as cargo gives it to the running script. Not
/// `env!`: that is fixed when the script is compiled, and cargo reuses a
/// compiled script for a second checkout that shares the target directory,
/// which then built and embedded the first checkout's kernel programs and
/// policies.
fn crate_dir() -> anyhow::Result<std::path::PathBuf> {
    Ok(std::path::PathBuf::from(std::env::var(
        "CARGO_MANIFEST_DIR",
    )?))
}

fn embed_example_policies(dir: &std::path::Path) -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else if e.file_type()?.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut out = String::from("&[\n");
    for f in files {
        let rel = f.strip_prefix(dir)?.to_string_lossy().into_owned();
        let abs = std::fs::canonicalize(&f)?;
        out.push_str(&format!(
            "    ({rel:?}, include_bytes!({:?}) as &[u8]),\n",
            abs.display().to_string()
        ));
    }
    out.push_str("]\n");
    let out_dir = std::env::var("OUT_DIR")?;
    std::fs::write(
        std::path::Path::new(&out_dir).join("example_policies.rs"),
        out,
    )?;
    Ok(())
}
