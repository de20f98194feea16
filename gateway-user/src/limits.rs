//! Caps on what an agent can make the daemon hold in memory, and the
//! daemon's memory budget.
//!
//! Every frame, header block and inspected body an agent sends (or makes an
//! upstream send) has a cap ([`Limits`]); what is bigger is refused in the
//! protocol or streamed through in bounded pieces, never buffered whole. On
//! top of the caps, [`MemoryGauge`] samples the daemon's resident memory so
//! new sessions can be shed with an in-protocol error before the daemon
//! grows past `[daemon] memory_budget`; sessions already running carry on.
//!
//! Owns the numbers and the sampling only; each protocol handler applies
//! its caps and words its own refusal.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Default cap on a PostgreSQL statement message (Query, Parse).
pub const DEFAULT_PG_MAX_STATEMENT: u64 = 1 << 20;
/// Default cap on any other PostgreSQL message the proxy must hold whole
/// (Bind and the rest from the agent; a DataRow it masks from the server).
pub const DEFAULT_PG_MAX_MESSAGE: u64 = 16 << 20;
/// Default cap on an HTTP request's header block (HTTP/1 head, HTTP/2
/// header list).
pub const DEFAULT_HTTP_MAX_HEADER: u64 = 64 << 10;
/// Default cap on the decoded size of a response body that is decompressed
/// to be inspected (masking).
pub const DEFAULT_HTTP_MAX_DECODED_BODY: u64 = 256 << 20;
/// Default time an HTTP/1.1 connection may wait for a request head: idle
/// between keep-alive requests, or sending a slow head (nginx closes idle
/// keep-alive connections after 75 s, Apache after 5 s).
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Shortest `http_idle_timeout` (a client must have time to send a head).
pub const MIN_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default memory budget when the machine has plenty: 1 GiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 1 << 30;
/// What one new session may take before the caps stop it: a new session is
/// shed when resident memory plus this is over the budget.
pub const SESSION_HEADROOM: u64 = 32 << 20;
/// Smallest HTTP header cap (hyper needs room for one read buffer).
pub const MIN_HTTP_MAX_HEADER: u64 = 8192;
/// How often the gauge samples resident memory.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The caps in force (`[daemon]` keys `pg_max_statement`,
/// `pg_max_message`, `http_max_header`, `http_max_decoded_body`, and the
/// time bound `http_idle_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest Query or Parse message from the agent.
    pub pg_max_statement: usize,
    /// Largest other message held whole (Bind, FunctionCall, a masked
    /// DataRow). CopyData and unmasked DataRows stream through instead.
    pub pg_max_message: usize,
    /// Largest HTTP request header block.
    pub http_max_header: usize,
    /// Largest decoded (decompressed) response body that is inspected.
    pub http_max_decoded_body: u64,
    /// How long an HTTP/1.1 connection may wait for a request head (idle
    /// keep-alive, or a slow head) before the daemon closes it.
    pub http_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            pg_max_statement: DEFAULT_PG_MAX_STATEMENT as usize,
            pg_max_message: DEFAULT_PG_MAX_MESSAGE as usize,
            http_max_header: DEFAULT_HTTP_MAX_HEADER as usize,
            http_max_decoded_body: DEFAULT_HTTP_MAX_DECODED_BODY,
            http_idle_timeout: DEFAULT_HTTP_IDLE_TIMEOUT,
        }
    }
}

/// A size that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what}: {value:?} is not a size (bytes, or a number with B, KiB, MiB, GiB, KB, MB, GB)")]
pub struct SizeError {
    /// The key.
    pub what: String,
    /// The value given.
    pub value: String,
}

/// Parses `"512MiB"`, `"2GiB"`, `"64KiB"`, `"1000000"` (bytes), `"10MB"`
/// (decimal units). Case-insensitive units; no fractions.
pub fn parse_size(what: &str, s: &str) -> Result<u64, SizeError> {
    let err = || SizeError {
        what: what.to_string(),
        value: s.to_string(),
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// Formats bytes for messages: `345.2 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// The default budget: 1 GiB, or half the machine's memory when that is
/// less (a small VM), never below 128 MiB.
pub fn default_budget() -> u64 {
    let half = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| mem_total(&t))
        .map(|total| total / 2);
    match half {
        Some(h) => DEFAULT_MEMORY_BUDGET.min(h).max(128 << 20),
        None => DEFAULT_MEMORY_BUDGET,
    }
}

/// `MemTotal` of `/proc/meminfo` text, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

/// Resident bytes from `/proc/self/statm` text (second field, in pages).
fn statm_rss(statm: &str, page: u64) -> Option<u64> {
    statm
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?
        .checked_mul(page)
}

/// The daemon's resident memory, sampled in the background so the accept
/// path only loads an atomic.
#[derive(Debug, Default)]
pub struct MemoryGauge {
    rss: AtomicU64,
}

/// The daemon is over its budget: what it measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    /// Resident bytes at the last sample.
    pub rss: u64,
    /// The budget.
    pub budget: u64,
}

impl OverBudget {
    /// The refusal message agents see.
    pub fn message(&self) -> String {
        format!(
            "portcullis is over its memory budget ({} resident + {} headroom for a new session > memory_budget {}); try again later",
            human(self.rss),
            human(SESSION_HEADROOM),
            human(self.budget)
        )
    }
}

impl MemoryGauge {
    /// Reads `/proc/self/statm` now and stores the result.
    pub fn sample(&self) -> u64 {
        // SAFETY: sysconf takes a constant and touches no memory of ours.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as u64,
            _ => 4096,
        };
        let rss = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|t| statm_rss(&t, page))
            .unwrap_or(0);
        self.rss.store(rss, Ordering::Relaxed);
        rss
    }

    /// Resident bytes at the last sample (0 before the first).
    pub fn rss(&self) -> u64 {
        self.rss.load(Ordering::Relaxed)
    }

    /// `Some` when a new session must be shed under `budget` (`None`: off).
    pub fn over(&self, budget: Option<u64>) -> Option<OverBudget> {
        let budget = budget?;
        let rss = self.rss();
        (rss.saturating_add(SESSION_HEADROOM) > budget).then_some(OverBudget { rss, budget })
    }

    /// Samples every [`SAMPLE_EVERY`] until `stop` is cancelled.
    pub async fn run(&self, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.sample(); }
                _ = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_junk_is_refused() {
        assert_eq!(parse_size("x", "512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("x", "2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("x", "2 gib"), Ok(2 << 30));
        assert_eq!(parse_size("x", "64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("x", "1000"), Ok(1000));
        assert_eq!(parse_size("x", "10MB"), Ok(10_000_000));
        assert_eq!(parse_size("x", "7b"), Ok(7));
        for junk in [
            "",
            "MiB",
            "1.5GiB",
            "-1",
            "12 parsecs",
            "99999999999999999999",
        ] {
            assert!(parse_size("x", junk).is_err(), "{junk}");
        }
        assert!(parse_size("x", "99999999999TiB").is_err());
    }

    #[test]
    fn proc_files_parse() {
        assert_eq!(statm_rss("1000 250 30 1 0 90 0\n", 4096), Some(250 * 4096));
        assert_eq!(statm_rss("garbage", 4096), None);
        let mi = "MemTotal:       16303456 kB\nMemFree:  1 kB\n";
        assert_eq!(mem_total(mi), Some(16303456 * 1024));
        assert_eq!(mem_total("nothing"), None);
        assert!(default_budget() >= 128 << 20 && default_budget() <= DEFAULT_MEMORY_BUDGET);
    }

    #[test]
    fn the_gauge_sheds_only_over_the_budget() {
        let g = MemoryGauge::default();
        let rss = g.sample();
        assert!(rss > 0, "this process has resident memory");
        assert_eq!(g.over(None), None, "off never sheds");
        assert_eq!(g.over(Some(u64::MAX)), None);
        let over = g.over(Some(rss)).expect("rss + headroom > rss");
        assert_eq!(over.budget, rss);
        assert!(over.message().contains("over its memory budget"));
        assert_eq!(human(345 << 20), "345.0 MiB");
        assert_eq!(human(10), "10 B");
    }
}
