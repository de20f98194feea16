//! The `portcullis` binary: daemon and CLI.

use clap::Parser;
use tracing_subscriber::{fmt, EnvFilter};

/// jemalloc, not glibc's malloc: each connection worker allocates and
/// frees on its own thread, which jemalloc serves from a per-thread cache
/// without a lock. Measured (docs/performance.md, "Ninth round"): HTTP
/// +8-13% requests/s, an idle PostgreSQL session a third of the memory,
/// the soak's RSS two thirds; PostgreSQL throughput the same.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (a C string: jemalloc's
/// `malloc_conf` symbol is a `const char *`, so a thin pointer).
/// - `percpu_arena:percpu`: one arena per CPU, as there is one connection
///   worker per CPU (jemalloc's default of four per CPU kept the soak's
///   RSS climbing);
/// - `background_thread:true`, `dirty_decay_ms:1000`, `muzzy_decay_ms:0`:
///   freed pages go back to the kernel within a second, from a thread of
///   jemalloc's, even while the daemon is idle. The memory budget
///   (`memory_budget`) sheds new sessions by resident memory, which should
///   not count pages the daemon no longer uses;
/// - `tcache_nslots_large:256`: a worker's cache keeps up to 256 freed
///   blocks of each size from 16 to 32 KiB (jemalloc's default is 20). An
///   SSH transfer has up to 256 packets of 32 KiB in flight (the upstream
///   window), and russh gives each a fresh zeroed buffer. Past the cache
///   such a buffer came from the arena, which zeroes a reused block with
///   `MADV_DONTNEED`, so each of its pages faulted back in: 12% of the
///   daemon's samples in a download. With the larger cache the daemon uses
///   about 12% less CPU per byte (docs/performance.md, "Tenth round"). The cache is per worker, not per
///   session: idle sessions cost the same.
///
/// `tests/e2e/perf_alloc.rs` checks that jemalloc reads these.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &u8 = &b"percpu_arena:percpu,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,tcache_nslots_large:256\0"[0];

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
