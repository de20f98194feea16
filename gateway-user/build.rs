//! Builds the kernel programs (`gateway-ebpf`) for the BPF target with the
//! nightly toolchain and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! Needs `bpf-linker` and nightly `rust-src`: `cargo xtask setup` installs both.

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway-ebpf");
    let common_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway-common");
    println!("cargo:rerun-if-changed={common_dir}");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "gateway-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
