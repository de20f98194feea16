//! The `portcullis` binary: daemon and CLI.

use clap::Parser;
use tracing_subscriber::{fmt, EnvFilter};

/// jemalloc, not glibc's malloc. Each connection worker allocates and
/// frees on its own thread, which jemalloc serves from a per-thread cache
/// without a lock; it rounds a block to fewer, coarser size classes, yet
/// an idle session costs less in it (see docs/performance.md, "Ninth
/// round"). Measured: HTTP +13% requests/s, idle PostgreSQL sessions half
/// the memory; PostgreSQL throughput the same.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start (a C string; a thin pointer is
/// what jemalloc's `malloc_conf` symbol is). Freed pages go back to the
/// kernel within a second instead of ten: the memory budget
/// (`memory_budget`) sheds new sessions by resident memory, which should
/// not count pages the daemon no longer uses.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &u8 = &b"percpu_arena:percpu,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0];

fn main() -> std::process::ExitCode {
    let filter =
        EnvFilter::try_from_env("PORTCULLIS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("PORTCULLIS_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    let cli = portcullis::cli::Cli::parse();
    match portcullis::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
