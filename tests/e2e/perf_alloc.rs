//! The daemon's allocator (issue 15): jemalloc, with the options the
//! binary sets in `_rjem_malloc_conf` (see `gateway-user/src/main.rs`).
//! jemalloc reads that symbol by name and silently ignores it when the
//! name is wrong (a `tikv-jemallocator` built without its prefix, say), so
//! this asks jemalloc itself which options it runs with.

use std::process::Command;

use crate::harness::BIN;

/// Each option the binary sets, as jemalloc's statistics print it.
const EXPECTED: &[(&str, &str)] = &[
    ("opt.percpu_arena", "\"percpu\""),
    ("opt.background_thread", "true"),
    ("opt.dirty_decay_ms", "1000"),
    ("opt.muzzy_decay_ms", "0"),
    ("opt.tcache_nslots_large", "256"),
];

/// `stats_print` in the environment's options makes jemalloc print its
/// statistics, options included, to stderr at exit. jemalloc reads the
/// environment after the binary's options, and this sets nothing else.
#[test]
fn the_daemon_runs_on_jemalloc_with_the_options_it_sets() {
    let out = Command::new(BIN)
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .expect("run portcullis --version");
    assert!(out.status.success(), "portcullis --version failed: {out:?}");
    let stats = String::from_utf8_lossy(&out.stderr);
    assert!(
        stats.contains("jemalloc statistics"),
        "no jemalloc statistics at exit: is jemalloc the global allocator?\n{stats}"
    );
    for (option, value) in EXPECTED {
        let line = stats
            .lines()
            .map(str::trim)
            .find(|l| l.split(':').next() == Some(option))
            .unwrap_or_else(|| panic!("jemalloc printed no {option}:\n{stats}"));
        // `opt.dirty_decay_ms: 1000 (arenas.dirty_decay_ms: 1000)`: the
        // option's own value comes first.
        let got = line
            .split_once(':')
            .and_then(|(_, v)| v.split_whitespace().next());
        assert_eq!(got, Some(*value), "{option}: {line}");
    }
}
