//! `cargo xtask setup`: installs what a fresh Debian 12 machine needs to build,
//! test, demo and benchmark Portcullis. Idempotent, and a few seconds when
//! everything is already in place.

use std::{
    fs,
    io::Read,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::util::{self, cargo_home, describe, mounts, require_root, run, stdout_of};

/// Debian 12 packages, by what needs them.
const APT_PACKAGES: &[&str] = &[
    // C toolchain for build scripts and *-sys crates (aws-lc-rs, pg_query).
    "build-essential",
    "pkg-config",
    // Base tools the tests, the demo and .ci/run call.
    "iproute2",
    "procps",
    "python3",
    "curl",
    "socat",
    // Inspecting loaded eBPF programs, maps and links.
    "bpftool",
    // bindgen's libclang, for building pg_query.
    "libclang-dev",
    // Real peers the end-to-end tests start their own instances of.
    "postgresql",
    "postgresql-client",
    "openssh-server",
    "openssh-client",
    // rsync over ssh through a masked host (compat_ssh e2e).
    "rsync",
    // Ansible over ssh, direct vs through Portcullis (compat_ssh_suites).
    "ansible-core",
    "nginx-light",
    "pgbouncer",
    // Python clients driven by the tests and the demo.
    "python3-psycopg",
    "python3-paramiko",
    // HTTP client of the http e2e tests (streaming watch reads).
    "python3-httpx",
    // Second real Kubernetes client of the http e2e tests (beside kubectl).
    "python3-kubernetes",
    // Real gRPC peers (client and server) of the HTTP compatibility tests.
    "python3-grpcio",
    // A real browser driving the review console (console e2e): headless
    // Chromium through WebDriver.
    "chromium",
    "chromium-driver",
    "python3-selenium",
    // The venvs holding the official MCP Python SDK (see `mcp_sdk`) and the
    // PyPI PostgreSQL drivers (see `python_drivers`).
    "python3-venv",
    // Thousands of idle SSH sessions from one asyncio client (bench idle).
    "python3-asyncssh",
    // Recording the demo and HTTP load generation.
    "asciinema",
    "wrk",
    // The HTTP bench's certificates (`cargo xtask bench http`, TLS case).
    "openssl",
];

/// Commands the tests need, with the Debian package that provides them when
/// no other package already does (e.g. Google's `kubectl` package).
const APT_COMMANDS: &[(&str, &str)] = &[
    // kubectl for the Kubernetes API tests of the http handler.
    ("kubectl", "kubernetes-client"),
    // npm (and node) for the reference TypeScript MCP server; a machine may
    // have node from elsewhere (NodeSource's nodejs ships npm).
    ("npm", "npm"),
];

/// Where the PyPI drivers of the PostgreSQL compatibility tests live (a
/// venv of Debian's python3, apart from the system's packages).
pub const PY_VENV: &str = "/opt/portcullis-py";
/// PyPI packages of the compatibility tests, pinned: psycopg's wheel
/// carries libpq 18 (direct TLS, `cancel_safe`), which Debian 12's libpq 15
/// lacks; asyncpg (binary protocol, `direct_tls`); SQLAlchemy and pytest
/// for SQLAlchemy's own dialect suite.
const PY_PACKAGES: &[&str] = &[
    "psycopg[binary,pool]==3.3.9",
    "asyncpg==0.32.0",
    "SQLAlchemy==2.1.9",
    "pytest==9.2.0",
];
/// SQLAlchemy's sdist (its test suite is not in the wheel).
const SQLALCHEMY_SDIST: &str = "sqlalchemy-2.1.9.tar.gz";

/// The bpf-linker release that works with the nightly toolchain's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Its cargo feature selecting LLVM 22.
const BPF_LINKER_FEATURE: &str = "llvm-22";
/// Where `/usr/sbin/policy-rc.d` lives; see [`ServiceStartBlock`].
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// The venv with the official MCP Python SDK, a real MCP server and client
/// for the mcp e2e tests (`tests/e2e/mcp.rs` names the same path). Not a
/// Debian package, and pip refuses Debian's system Python: a venv of it.
const MCP_VENV: &str = "/opt/portcullis-test/mcp-venv";
/// The SDK release the tests were written against (2.x speaks the
/// stateless 2026-07-28 revision, sessions with initialize, and HTTP+SSE).
const MCP_SDK: &str = "mcp==2.3.0";
/// Where the reference TypeScript MCP server is installed from npm: a second
/// real peer nobody here wrote (`tests/e2e/mcp_everything.rs`, the demo and
/// the bench name the same path). Its own `node_modules`, apart from any
/// global npm prefix.
pub const MCP_EVERYTHING_DIR: &str = "/opt/portcullis-test/mcp-everything";
/// The npm package and the release the tests were written against (its
/// `streamableHttp` mode: sessions with initialize, SSE answers).
const MCP_EVERYTHING: (&str, &str) = ("@modelcontextprotocol/server-everything", "2026.8.31");

/// Prints one status line for a setup item.
fn report(status: &str, item: &str) {
    println!("{status:<10} {item}");
}

/// Runs every setup step. Must run as root.
pub fn run_setup() -> Result<()> {
    require_root()?;
    apt_packages()?;
    mcp_sdk()?;
    mcp_everything()?;
    python_drivers()?;
    nightly_rust_src()?;
    bpf_linker()?;
    bpffs()?;
    cgroup2();
    python_tools()?;
    Ok(())
}

/// Python tools from PyPI: `kubernetes-validate` checks the Kubernetes
/// manifests (deploy/kubernetes) against the API schemas, offline.
fn python_tools() -> Result<()> {
    let present = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        report("ok", "kubernetes-validate");
        return Ok(());
    }
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "kubernetes-validate==1.37.0",
        ])
        .status()
        .context("cannot run python3 -m pip")?;
    if !status.success() {
        anyhow::bail!("pip install kubernetes-validate failed");
    }
    report("installed", "kubernetes-validate");
    Ok(())
}

/// Creates [`MCP_VENV`] and installs [`MCP_SDK`] into it, unless the
/// venv's python already imports that version.
fn mcp_sdk() -> Result<()> {
    let python = Path::new(MCP_VENV).join("bin/python");
    let version = MCP_SDK.split("==").nth(1).unwrap_or_default();
    let have = Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('mcp'))",
        ])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == version);
    if have {
        report("ok", &format!("pip: {MCP_SDK} in {MCP_VENV}"));
        return Ok(());
    }
    report("installing", &format!("pip: {MCP_SDK} in {MCP_VENV}"));
    if !python.exists() {
        fs::create_dir_all(MCP_VENV).with_context(|| format!("creating {MCP_VENV}"))?;
        run(Command::new("/usr/bin/python3").args(["-m", "venv", MCP_VENV]))?;
    }
    run(Command::new(Path::new(MCP_VENV).join("bin/pip")).args([
        "install",
        "-q",
        "--disable-pip-version-check",
        MCP_SDK,
    ]))?;
    Ok(())
}

/// Installs [`MCP_EVERYTHING`] into [`MCP_EVERYTHING_DIR`] with npm, unless
/// that version is already there.
fn mcp_everything() -> Result<()> {
    let (package, version) = MCP_EVERYTHING;
    let item = format!("npm: {package}@{version} in {MCP_EVERYTHING_DIR}");
    let manifest = Path::new(MCP_EVERYTHING_DIR)
        .join("node_modules")
        .join(package)
        .join("package.json");
    let have = fs::read_to_string(&manifest)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["version"] == version);
    if have {
        report("ok", &item);
        return Ok(());
    }
    report("installing", &item);
    fs::create_dir_all(MCP_EVERYTHING_DIR)
        .with_context(|| format!("creating {MCP_EVERYTHING_DIR}"))?;
    run(Command::new("npm").args([
        "install",
        "--no-audit",
        "--no-fund",
        "--save-exact",
        "--prefix",
        MCP_EVERYTHING_DIR,
        &format!("{package}@{version}"),
    ]))?;
    Ok(())
}

/// Whether `dpkg` reports `package` as installed.
fn dpkg_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("cannot run dpkg-query (is this a Debian system?)")?;
    Ok(out.status.success()
        && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed")
}

/// Installs the missing Debian packages: one `apt-get update`, one
/// `apt-get install` for all of them.
fn apt_packages() -> Result<()> {
    let mut missing = Vec::new();
    for &package in APT_PACKAGES {
        if dpkg_installed(package)? {
            report("ok", &format!("apt: {package}"));
        } else {
            report("installing", &format!("apt: {package}"));
            missing.push(package);
        }
    }
    for &(command, package) in APT_COMMANDS {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {command}")])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if found {
            report("ok", &format!("command: {command}"));
        } else {
            report("installing", &format!("apt: {package} (for {command})"));
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    // The tests start their own postgres, sshd and nginx: keep Debian from
    // starting its default services (and from failing where no init runs).
    let _block = ServiceStartBlock::install()?;
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    for package in missing {
        if !dpkg_installed(package)? {
            bail!("apt-get finished but {package} is still not installed");
        }
    }
    Ok(())
}

/// While alive, a `policy-rc.d` that forbids starting services during package
/// installation, when the system has none already.
struct ServiceStartBlock {
    /// Whether we created the file (and so must remove it).
    created: bool,
}

impl ServiceStartBlock {
    /// Writes `/usr/sbin/policy-rc.d` (exit 101: "action forbidden") when it
    /// does not exist.
    fn install() -> Result<Self> {
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            return Ok(Self { created: false });
        }
        fs::write(path, "#!/bin/sh\n# Written by `cargo xtask setup` for the duration of apt-get install.\nexit 101\n")
            .with_context(|| format!("cannot write {POLICY_RC_D}"))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {POLICY_RC_D} executable"))?;
        Ok(Self { created: true })
    }
}

impl Drop for ServiceStartBlock {
    fn drop(&mut self) {
        if self.created {
            if let Err(e) = fs::remove_file(POLICY_RC_D) {
                eprintln!("warning: cannot remove {POLICY_RC_D}: {e}");
            }
        }
    }
}

/// The PyPI drivers in [`PY_VENV`] and SQLAlchemy's sdist in its `src/`.
fn python_drivers() -> Result<()> {
    let venv = Path::new(PY_VENV);
    let python = venv.join("bin/python");
    if !python.exists() {
        report("creating", &format!("venv: {PY_VENV}"));
        run(Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(venv))?;
    }
    let frozen = stdout_of(Command::new(&python).args(["-m", "pip", "freeze"]))?;
    let have = |spec: &str| {
        let (name, version) = spec.split_once("==").unwrap_or((spec, ""));
        let name = name.split('[').next().unwrap_or(name).to_lowercase();
        frozen
            .lines()
            .any(|l| l.to_lowercase() == format!("{name}=={version}"))
    };
    let missing: Vec<&str> = PY_PACKAGES.iter().copied().filter(|p| !have(p)).collect();
    if missing.is_empty() {
        report("ok", "pypi: psycopg, asyncpg, SQLAlchemy, pytest");
    } else {
        report("installing", &format!("pypi: {}", missing.join(" ")));
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q"])
            .args(&missing))?;
    }
    let src = venv.join("src");
    if src.join(SQLALCHEMY_SDIST).exists() {
        report("ok", &format!("pypi sdist: {SQLALCHEMY_SDIST}"));
    } else {
        report("fetching", &format!("pypi sdist: {SQLALCHEMY_SDIST}"));
        // Only SQLAlchemy from source (its build dependencies as wheels).
        run(Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                "sqlalchemy",
                "-d",
            ])
            .arg(&src)
            .arg("SQLAlchemy==2.1.9"))?;
    }
    Ok(())
}

/// A `rustup run nightly <tool>` command.
fn nightly(tool: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", tool]);
    cmd
}

/// `rustc -vV` of the nightly toolchain; fails clearly when it is missing.
fn nightly_version() -> Result<String> {
    stdout_of(nightly("rustc").arg("-vV"))
        .context("the `nightly` toolchain is needed to build the eBPF programs (`rustup toolchain install nightly`)")
}

/// Adds `rust-src` to the nightly toolchain (for `-Z build-std=core`).
fn nightly_rust_src() -> Result<()> {
    nightly_version()?;
    let installed = stdout_of(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        report("ok", "rustup: nightly rust-src");
        return Ok(());
    }
    report("installing", "rustup: nightly rust-src");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// What the stamp records: the recipe and the nightly it was built against.
fn bpf_linker_stamp_text(nightly_vv: &str) -> String {
    format!(
        "bpf-linker {BPF_LINKER_VERSION} --no-default-features --features {BPF_LINKER_FEATURE}\n{nightly_vv}"
    )
}

/// Finds `name` on `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Builds bpf-linker against the nightly toolchain's own libLLVM when it is
/// missing, broken or built for another nightly (see EBPF.md).
fn bpf_linker() -> Result<()> {
    let home = cargo_home()?;
    let stamp_path = home.join("portcullis-bpf-linker.stamp");
    let installed = home.join("bin").join("bpf-linker");
    let expected = bpf_linker_stamp_text(&nightly_version()?);

    let binary = if installed.is_file() {
        Some(installed.clone())
    } else {
        which("bpf-linker")
    };
    let stamp_ok = fs::read_to_string(&stamp_path).is_ok_and(|s| s == expected);
    let runs = binary.as_ref().is_some_and(|b| {
        Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let item = format!("bpf-linker {BPF_LINKER_VERSION} ({BPF_LINKER_FEATURE}, nightly's libLLVM)");
    if stamp_ok && runs {
        report("ok", &item);
        warn_if_shadowed(&installed);
        return Ok(());
    }
    let why = match (&binary, runs, stamp_ok) {
        (None, _, _) => "not installed",
        (Some(_), false, _) => "does not run",
        _ => "built for another nightly or by hand",
    };
    report("installing", &format!("{item}: {why}; about 80 s"));

    let prefix = llvm_prefix(&home)?;
    let mut install = util::cargo();
    install
        // Away from the workspace so its .cargo/config.toml does not apply.
        .current_dir(&home)
        .env("LLVM_PREFIX", &prefix)
        .args(["install", "--locked", "--force", "--root"])
        .arg(&home)
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features", BPF_LINKER_FEATURE]);
    println!("           {}", describe(&install));
    run(&mut install)?;

    let version = stdout_of(Command::new(&installed).arg("--version"))
        .with_context(|| format!("the freshly built {} does not run", installed.display()))?;
    fs::write(&stamp_path, &expected)
        .with_context(|| format!("cannot write {}", stamp_path.display()))?;
    report(
        "ok",
        &format!("{} ({})", version.trim(), installed.display()),
    );
    warn_if_shadowed(&installed);
    Ok(())
}

/// Warns when another `bpf-linker` comes first on `PATH`.
fn warn_if_shadowed(installed: &Path) {
    if let Some(found) = which("bpf-linker") {
        if found != installed {
            eprintln!(
                "warning: {} comes before {} on PATH and will be used by the eBPF build",
                found.display(),
                installed.display()
            );
        }
    }
}

/// Makes `$CARGO_HOME/portcullis-llvm-prefix/lib` hold `libLLVM.so` and
/// `<real file name>`, both symlinks to the nightly toolchain's real
/// `libLLVM.so.*` (not the `libLLVM-*.so` linker script next to it).
/// It must persist: the built binary's rpath points into it.
fn llvm_prefix(home: &Path) -> Result<PathBuf> {
    let sysroot = stdout_of(nightly("rustc").args(["--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let mut candidates = Vec::new();
    for entry in
        fs::read_dir(&lib_dir).with_context(|| format!("cannot list {}", lib_dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so.") && is_elf(&entry.path()) {
            candidates.push(entry.path());
        }
    }
    candidates.sort();
    let library = match candidates.as_slice() {
        [] => bail!(
            "no libLLVM.so.* shared library in {} (is the nightly toolchain complete?)",
            lib_dir.display()
        ),
        [one] => one.clone(),
        [.., last] => {
            eprintln!(
                "warning: several libLLVM.so.* in {}; using {}",
                lib_dir.display(),
                last.display()
            );
            last.clone()
        }
    };
    let file_name = library
        .file_name()
        .context("libLLVM path has no file name")?
        .to_owned();

    let prefix = home.join("portcullis-llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    // Drop links left from an earlier nightly.
    for entry in fs::read_dir(&prefix_lib)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("libLLVM") {
            fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(&file_name)] {
        symlink(&library, &link)
            .with_context(|| format!("cannot link {} to {}", link.display(), library.display()))?;
    }
    Ok(prefix)
}

/// Whether `path` is an ELF file (not a linker script).
fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// Mounts bpffs at `/sys/fs/bpf` when it is not mounted there.
fn bpffs() -> Result<()> {
    let target = Path::new("/sys/fs/bpf");
    let mounted = mounts()?
        .iter()
        .any(|m| m.fs_type == "bpf" && m.mount_point == target);
    if mounted {
        report("ok", "bpffs at /sys/fs/bpf");
        return Ok(());
    }
    report("installing", "bpffs at /sys/fs/bpf (mount -t bpf)");
    fs::create_dir_all(target).with_context(|| format!("cannot create {}", target.display()))?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// Reports where cgroup v2 is mounted (not changed by setup).
fn cgroup2() {
    match util::cgroup2_mount() {
        Ok(path) => report("ok", &format!("cgroup2 at {}", path.display())),
        Err(e) => report("missing", &format!("cgroup2: {e:#}")),
    }
}
