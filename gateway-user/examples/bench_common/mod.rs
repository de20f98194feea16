//! Helpers shared by the benchmark examples (`policy_bench`, `audit_bench`):
//! latency summaries and a description of the machine they ran on.
//!
//! Not an example itself (cargo only builds `examples/*.rs` and
//! `examples/*/main.rs`); each benchmark includes it with `mod bench_common;`.

use std::{fs, time::Duration};

use serde::Serialize;

/// Percentiles of a set of latency samples, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest sample.
    pub max_us: f64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

impl Summary {
    /// Summarizes samples given in nanoseconds (sorts them in place).
    pub fn of_nanos(samples: &mut [u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let us = |ns: u64| ns as f64 / 1000.0;
        let total: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Self {
            count: samples.len(),
            p50_us: us(percentile(samples, 0.50)),
            p99_us: us(percentile(samples, 0.99)),
            max_us: us(samples[samples.len() - 1]),
            mean_us: total as f64 / samples.len() as f64 / 1000.0,
        }
    }
}

/// Nearest-rank percentile `p` (0..=1) of sorted, non-empty samples.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    let n = sorted.len();
    let rank = (p * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// A duration in nanoseconds, saturating.
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What the benchmark ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub cpus: usize,
    /// CPU model from /proc/cpuinfo, when known.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// Whether this binary was built with optimizations.
    pub release_build: bool,
    /// 1, 5 and 15 minute load averages when the benchmark started (other
    /// work on the machine skews the tail latencies).
    pub load_average: String,
}

impl Machine {
    /// Describes this machine.
    pub fn detect() -> Self {
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let load_average = fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into());
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
            release_build: !cfg!(debug_assertions),
            load_average,
        }
    }

    /// One line for the table header.
    pub fn line(&self) -> String {
        format!(
            "{} CPUs ({}), Linux {}, {} build, load average {}",
            self.cpus,
            self.cpu_model,
            self.kernel,
            if self.release_build {
                "release"
            } else {
                "DEBUG (numbers are meaningless; use --release)"
            },
            self.load_average
        )
    }
}
