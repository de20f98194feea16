//! Counters, histograms and the metrics/health endpoint (Prometheus text on
//! `GET /metrics`, `GET /healthz`, `GET /readyz`). Owns only counting and
//! exposition; it must never block the data path: counting is plain
//! atomics under a read lock, and only the first sighting of a label set
//! takes a write lock and allocates.
//!
//! What handlers call (all cheap, callable from any task):
//! - [`Metrics::decision`]`(resource, action, outcome)`: the command gate
//!   counts every decision (`allow`, `deny`, `hold`); handlers need not.
//! - [`Metrics::command_latency`]`(protocol, action, duration)`: time from a
//!   command's arrival from the agent to its completion (last response byte
//!   relayed), for allowed commands. Call it once per completed command,
//!   e.g. right where the handler calls `gate::finished`; a held command's
//!   wait for a human is included (that is what the agent saw).
//! - [`Metrics::masked`]`(resource, field, n)`: `n` values masked in `field`
//!   (a column name, JSON key path, or detector name such as
//!   `credit_card`) of `resource`. Count per response, not per byte.
//!
//! Label values are escaped; the number of distinct label sets per family is
//! capped ([`MAX_SERIES`]) so a buggy caller cannot grow memory without
//! bound: further sets are counted under `_other`.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{audit::AuditLag, daemon::Shared, proxy::Refusal};

/// Most label sets one family keeps; later ones are folded into `_other`.
pub const MAX_SERIES: usize = 4096;

/// Upper bounds of the command latency buckets, in seconds (`+Inf` added).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const LATENCY_BUCKETS_NS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Decision outcomes, in exposition order.
const OUTCOMES: [&str; 4] = ["allow", "deny", "hold", "other"];

/// The eBPF maps whose fill is exported, in exposition order.
pub const MAP_NAMES: [&str; 3] = [
    gateway_common::MAP_FLOWS,
    gateway_common::MAP_PENDING_CONNECTS,
    gateway_common::MAP_TAGGED_CGROUPS,
];

/// A two-label family: first label → second label → value.
struct Family<T> {
    map: RwLock<HashMap<String, HashMap<String, T>>>,
    series: AtomicUsize,
}

impl<T: Default> Default for Family<T> {
    fn default() -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
            series: AtomicUsize::new(0),
        }
    }
}

impl<T: Default> Family<T> {
    /// Runs `f` on the value for (`a`, `b`), creating it on first sight.
    fn with(&self, a: &str, b: &str, f: impl FnOnce(&T)) {
        {
            let g = self.map.read().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = g.get(a).and_then(|m| m.get(b)) {
                f(v);
                return;
            }
        }
        let mut g = self.map.write().unwrap_or_else(|p| p.into_inner());
        let exists = g.get(a).is_some_and(|m| m.contains_key(b));
        let (a, b) = if exists || self.series.load(Ordering::Relaxed) < MAX_SERIES {
            (a, b)
        } else {
            ("_other", "_other")
        };
        let inner = g.entry(a.to_string()).or_default();
        if !inner.contains_key(b) {
            self.series.fetch_add(1, Ordering::Relaxed);
        }
        f(inner.entry(b.to_string()).or_default());
    }

    /// Visits every series in label order (stable output).
    fn each(&self, mut f: impl FnMut(&str, &str, &T)) {
        let g = self.map.read().unwrap_or_else(|p| p.into_inner());
        let mut outer: Vec<&String> = g.keys().collect();
        outer.sort();
        for a in outer {
            let Some(m) = g.get(a) else { continue };
            let mut inner: Vec<(&String, &T)> = m.iter().collect();
            inner.sort_by(|x, y| x.0.cmp(y.0));
            for (b, v) in inner {
                f(a, b, v);
            }
        }
    }
}

/// A fixed-bucket latency histogram.
#[derive(Default)]
struct Histogram {
    /// Per-bucket (not cumulative) counts; the last is `+Inf`.
    buckets: [AtomicU64; 17],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(LATENCY_BUCKETS_NS.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Fill of one eBPF map, refreshed periodically by the daemon.
#[derive(Default)]
struct MapFill {
    entries: AtomicU64,
    max: AtomicU64,
    known: AtomicBool,
}

/// Daemon counters.
#[derive(Default)]
pub struct Metrics {
    flows_accepted: AtomicU64,
    refused_no_flow_entry: AtomicU64,
    refused_unknown_cgroup: AtomicU64,
    refused_untagged: AtomicU64,
    refused_no_resource: AtomicU64,
    refused_shutting_down: AtomicU64,
    refused_identity_unproven: AtomicU64,
    refused_audit_unavailable: AtomicU64,
    refused_memory_budget: AtomicU64,
    /// resource → action → counts by [`OUTCOMES`].
    decisions: Family<[AtomicU64; 4]>,
    /// protocol → action → latency.
    latency: Family<Histogram>,
    /// resource → field → masked values.
    masked: Family<AtomicU64>,
    maps: [MapFill; 3],
}

/// A copy of the flow counters (for `status --json`).
#[derive(Serialize)]
pub struct Snapshot {
    /// Flows handed to a protocol handler.
    pub flows_accepted: u64,
    /// Refusals by reason label.
    pub flows_refused: std::collections::BTreeMap<&'static str, u64>,
}

/// Every refusal reason, in exposition order.
const REFUSALS: [Refusal; 8] = [
    Refusal::NoFlowEntry,
    Refusal::UnknownCgroup,
    Refusal::Untagged,
    Refusal::NoResource,
    Refusal::ShuttingDown,
    Refusal::IdentityUnproven,
    Refusal::AuditUnavailable,
    Refusal::MemoryBudget,
];

/// Values read from the rest of the daemon at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Live sessions.
    pub sessions: usize,
    /// Access requests waiting for a human.
    pub pending_requests: usize,
    /// Grants in force.
    pub grants: usize,
    /// Tags.
    pub tags: usize,
    /// Network namespaces with a proxy listener.
    pub netns_served: usize,
    /// Audit durability lag.
    pub audit_lag: Option<AuditLag>,
    /// Readiness checks.
    pub ready: Readiness,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Resident memory at the last sample (bytes).
    pub resident_bytes: u64,
    /// `memory_budget` in bytes (0: off).
    pub memory_budget_bytes: u64,
}

/// What `/readyz` checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// The eBPF programs are attached (not detached by break-glass).
    pub programs_attached: bool,
    /// The last audit write succeeded.
    pub audit_writable: bool,
    /// A policy set is in force.
    pub policy_loaded: bool,
    /// BPF LSM is active, so tagged cgroups cannot create AF_PACKET and
    /// other non-inet sockets. Reported, not required: without it the
    /// daemon still governs TCP and UDP (SECURITY.md says what is lost).
    pub socket_lsm: bool,
}

impl Readiness {
    /// Whether every check passes.
    pub fn ok(&self) -> bool {
        self.programs_attached && self.audit_writable && self.policy_loaded
    }

    /// One line per check, `name ok|FAIL`.
    pub fn body(&self) -> String {
        let line = |name: &str, ok: bool| format!("{name} {}\n", if ok { "ok" } else { "FAIL" });
        let mut s = String::new();
        s.push_str(&line("programs_attached", self.programs_attached));
        s.push_str(&line("audit_writable", self.audit_writable));
        s.push_str(&line("policy_loaded", self.policy_loaded));
        s.push_str(if self.socket_lsm {
            "socket_lsm ok\n"
        } else {
            "socket_lsm OFF (BPF LSM not active: AF_PACKET and other non-inet sockets are not denied to tagged cgroups)\n"
        });
        s
    }
}

impl Metrics {
    /// Counts an accepted flow.
    pub fn accepted(&self) {
        self.flows_accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a command decision (`allow`, `deny` or `hold`; anything else
    /// is counted as `other`).
    pub fn decision(&self, resource: &str, action: &str, outcome: &'static str) {
        let i = OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(OUTCOMES.len() - 1);
        self.decisions.with(resource, action, |c| {
            if let Some(c) = c.get(i) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    /// Records how long an allowed command took, from its arrival from the
    /// agent to its completion. `protocol` is `postgres`, `ssh`, `http`,
    /// `tcp`; `action` the catalog action (`postgres:select`).
    pub fn command_latency(&self, protocol: &str, action: &str, d: Duration) {
        self.latency.with(protocol, action, |h| h.observe(d));
    }

    /// Counts `n` values masked in `field` of `resource`.
    pub fn masked(&self, resource: &str, field: &str, n: u64) {
        if n == 0 {
            return;
        }
        self.masked.with(resource, field, |c| {
            c.fetch_add(n, Ordering::Relaxed);
        });
    }

    /// Sets the fill of the eBPF map `name` (one of [`MAP_NAMES`]).
    pub fn set_map_fill(&self, name: &str, entries: u64, max: u64) {
        if let Some(i) = MAP_NAMES.iter().position(|n| *n == name) {
            if let Some(m) = self.maps.get(i) {
                m.entries.store(entries, Ordering::Relaxed);
                m.max.store(max, Ordering::Relaxed);
                m.known.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Counts a refused flow.
    pub fn refused(&self, r: Refusal) {
        self.counter(r).fetch_add(1, Ordering::Relaxed);
    }

    fn counter(&self, r: Refusal) -> &AtomicU64 {
        match r {
            Refusal::NoFlowEntry => &self.refused_no_flow_entry,
            Refusal::UnknownCgroup => &self.refused_unknown_cgroup,
            Refusal::Untagged => &self.refused_untagged,
            Refusal::NoResource => &self.refused_no_resource,
            Refusal::ShuttingDown => &self.refused_shutting_down,
            Refusal::IdentityUnproven => &self.refused_identity_unproven,
            Refusal::AuditUnavailable => &self.refused_audit_unavailable,
            Refusal::MemoryBudget => &self.refused_memory_budget,
        }
    }

    /// Current flow counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            flows_accepted: self.flows_accepted.load(Ordering::Relaxed),
            flows_refused: REFUSALS
                .iter()
                .map(|r| (r.label(), self.counter(*r).load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let o = &mut out;
        let s = self.snapshot();
        head(
            o,
            "portcullis_flows_accepted_total",
            "counter",
            "Flows handed to a protocol handler.",
        );
        let _ = writeln!(o, "portcullis_flows_accepted_total {}", s.flows_accepted);
        head(
            o,
            "portcullis_flows_refused_total",
            "counter",
            "Flows refused, by reason.",
        );
        for (label, v) in &s.flows_refused {
            let _ = writeln!(
                o,
                "portcullis_flows_refused_total{{reason=\"{label}\"}} {v}"
            );
        }

        head(
            o,
            "portcullis_decisions_total",
            "counter",
            "Command decisions, by resource, action and outcome.",
        );
        self.decisions.each(|resource, action, counts| {
            for (outcome, c) in OUTCOMES.iter().zip(counts) {
                let v = c.load(Ordering::Relaxed);
                if v > 0 {
                    let _ = writeln!(
                        o,
                        "portcullis_decisions_total{{resource=\"{}\",action=\"{}\",outcome=\"{outcome}\"}} {v}",
                        label_value(resource),
                        label_value(action)
                    );
                }
            }
        });

        head(
            o,
            "portcullis_command_duration_seconds",
            "histogram",
            "Allowed commands from arrival to completion, by protocol and action.",
        );
        self.latency.each(|protocol, action, h| {
            let labels = format!(
                "protocol=\"{}\",action=\"{}\"",
                label_value(protocol),
                label_value(action)
            );
            let mut cumulative = 0;
            for (i, b) in h.buckets.iter().enumerate() {
                cumulative += b.load(Ordering::Relaxed);
                let le = LATENCY_BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
                let _ = writeln!(
                    o,
                    "portcullis_command_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                o,
                "portcullis_command_duration_seconds_sum{{{labels}}} {}",
                h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
            );
            let _ = writeln!(
                o,
                "portcullis_command_duration_seconds_count{{{labels}}} {}",
                h.count.load(Ordering::Relaxed)
            );
        });

        head(
            o,
            "portcullis_masked_values_total",
            "counter",
            "Values masked in responses, by resource and field (column, key path or detector).",
        );
        self.masked.each(|resource, field, c| {
            let _ = writeln!(
                o,
                "portcullis_masked_values_total{{resource=\"{}\",field=\"{}\"}} {}",
                label_value(resource),
                label_value(field),
                c.load(Ordering::Relaxed)
            );
        });

        gauge(
            o,
            "portcullis_sessions_active",
            "Live sessions.",
            g.sessions as u64,
        );
        gauge(
            o,
            "portcullis_access_requests_pending",
            "Access requests waiting for a human.",
            g.pending_requests as u64,
        );
        gauge(
            o,
            "portcullis_grants_active",
            "Grants in force.",
            g.grants as u64,
        );
        gauge(o, "portcullis_tags", "Tagged cgroups.", g.tags as u64);
        gauge(
            o,
            "portcullis_netns_served",
            "Network namespaces with a proxy listener.",
            g.netns_served as u64,
        );

        head(
            o,
            "portcullis_bpf_map_entries",
            "gauge",
            "Entries in an eBPF map (sampled periodically).",
        );
        for (name, m) in MAP_NAMES.iter().zip(&self.maps) {
            if m.known.load(Ordering::Relaxed) {
                let _ = writeln!(
                    o,
                    "portcullis_bpf_map_entries{{map=\"{name}\"}} {}",
                    m.entries.load(Ordering::Relaxed)
                );
            }
        }
        head(
            o,
            "portcullis_bpf_map_max_entries",
            "gauge",
            "Capacity of an eBPF map.",
        );
        for (name, m) in MAP_NAMES.iter().zip(&self.maps) {
            if m.known.load(Ordering::Relaxed) {
                let _ = writeln!(
                    o,
                    "portcullis_bpf_map_max_entries{{map=\"{name}\"}} {}",
                    m.max.load(Ordering::Relaxed)
                );
            }
        }

        if let Some(lag) = g.audit_lag {
            gauge(
                o,
                "portcullis_audit_unsynced_records",
                "Audit records written to the file but not yet fdatasync'd.",
                lag.records,
            );
            head(
                o,
                "portcullis_audit_unsynced_age_seconds",
                "gauge",
                "Age of the oldest audit record not yet fdatasync'd (0 when all are).",
            );
            let _ = writeln!(
                o,
                "portcullis_audit_unsynced_age_seconds {}",
                lag.age.as_secs_f64()
            );
            gauge(
                o,
                "portcullis_audit_last_seq",
                "Highest audit seq written to the file.",
                lag.written_seq,
            );
        }
        gauge(
            o,
            "portcullis_audit_writable",
            "1 when the last audit write succeeded.",
            u64::from(g.ready.audit_writable),
        );
        gauge(
            o,
            "portcullis_programs_attached",
            "1 while the eBPF programs are attached.",
            u64::from(g.ready.programs_attached),
        );
        gauge(
            o,
            "portcullis_ready",
            "1 when /readyz answers 200.",
            u64::from(g.ready.ok()),
        );
        gauge(
            o,
            "portcullis_uptime_seconds",
            "Seconds since the daemon started.",
            g.uptime_secs,
        );
        gauge(
            o,
            "portcullis_resident_memory_bytes",
            "The daemon's resident memory, sampled every 100 ms.",
            g.resident_bytes,
        );
        gauge(
            o,
            "portcullis_memory_budget_bytes",
            "memory_budget: new sessions are shed above it (0: off).",
            g.memory_budget_bytes,
        );
        out
    }
}

fn head(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn gauge(o: &mut String, name: &str, help: &str, v: u64) {
    head(o, name, "gauge", help);
    let _ = writeln!(o, "{name} {v}");
}

/// Escapes a Prometheus label value (backslash, quote, newline).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Reads the daemon's state for one scrape.
pub fn gauges(shared: &Shared) -> Gauges {
    let attached = !shared
        .redirect
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_detached();
    let pending = shared
        .jit
        .requests()
        .iter()
        .filter(|r| r.status == crate::jit::Status::Pending)
        .count();
    Gauges {
        sessions: shared.sessions.len(),
        pending_requests: pending,
        grants: shared.jit.grants().len(),
        tags: shared
            .tags
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .count(),
        netns_served: shared.netns.lock().unwrap_or_else(|p| p.into_inner()).len(),
        audit_lag: Some(shared.audit_log.lag()),
        ready: Readiness {
            programs_attached: attached,
            audit_writable: shared.audit_log.healthy(),
            policy_loaded: !shared.policy.load().version.is_empty(),
            socket_lsm: shared.lsm.active,
        },
        uptime_secs: shared.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
        resident_bytes: shared.memory.rss(),
        memory_budget_bytes: shared.cfg.memory_budget.unwrap_or(0),
    }
}

/// Largest request head read; anything longer is refused.
const MAX_REQUEST_HEAD: usize = 8192;

/// One parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestLine<'a> {
    /// `GET`, `HEAD`, ...
    pub method: &'a str,
    /// The path without query string.
    pub path: &'a str,
}

/// Parses `METHOD SP TARGET SP HTTP/1.x` from the start of a request head.
pub fn parse_request_line(head: &[u8]) -> Option<RequestLine<'_>> {
    let end = head.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(head.get(..end)?).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    if !target.starts_with('/') {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some(RequestLine { method, path })
}

/// What the endpoint answers: status line, content type and body.
pub fn respond(
    line: Option<RequestLine<'_>>,
    render: impl FnOnce() -> String,
    ready: impl FnOnce() -> Readiness,
) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let Some(line) = line else {
        return ("400 Bad Request", TEXT, "bad request\n".into());
    };
    if line.method != "GET" && line.method != "HEAD" {
        return ("405 Method Not Allowed", TEXT, "only GET and HEAD\n".into());
    }
    match line.path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        "/healthz" => ("200 OK", TEXT, "ok\n".into()),
        "/readyz" => {
            let r = ready();
            let status = if r.ok() {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, TEXT, r.body())
        }
        _ => (
            "404 Not Found",
            TEXT,
            "not found: try /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` (HTTP/1.x, one request per
/// connection).
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(answer(shared.clone(), stream));
    }
}

async fn answer(shared: Arc<Shared>, mut stream: TcpStream) {
    let mut buf = vec![0u8; MAX_REQUEST_HEAD];
    let mut len = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    // Read the whole head: closing with unread request bytes would make the
    // kernel answer with a reset, and the client could lose the response.
    while !buf
        .get(..len)
        .is_some_and(|b| b.windows(4).any(|w| w == b"\r\n\r\n"))
    {
        let Some(rest) = buf.get_mut(len..) else {
            break;
        };
        if rest.is_empty() {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(rest)).await {
            Ok(Ok(n)) if n > 0 => len += n,
            _ => return,
        }
    }
    let head = buf.get(..len).unwrap_or_default();
    let is_head = head.starts_with(b"HEAD ");
    let (status, ctype, body) = {
        let line = parse_request_line(head);
        let s = shared.clone();
        // Rendering reads locks the data path also takes briefly; keep it
        // off the async workers.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let owned_line = line.map(|l| (l.method.to_string(), l.path.to_string()));
        tokio::task::spawn_blocking(move || {
            let line = owned_line
                .as_ref()
                .map(|(m, p)| RequestLine { method: m, path: p });
            let r = respond(line, || s.metrics.render(&gauges(&s)), || gauges(&s).ready);
            let _ = tx.send(r);
        });
        match rx.await {
            Ok(r) => r,
            Err(_) => return,
        }
    };
    let head_out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head_out.as_bytes()).await;
    if !is_head {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Metrics, Gauges) {
        let m = Metrics::default();
        m.accepted();
        m.accepted();
        m.refused(Refusal::Untagged);
        m.decision("orders-db", "postgres:select", "allow");
        m.decision("orders-db", "postgres:select", "allow");
        m.decision("orders-db", "postgres:delete", "deny");
        m.decision("we\"ird\\res\nx", "tcp:connect", "hold");
        m.command_latency("postgres", "postgres:select", Duration::from_micros(80));
        m.command_latency("postgres", "postgres:select", Duration::from_millis(3));
        m.command_latency("postgres", "postgres:select", Duration::from_secs(60));
        m.masked("orders-db", "customers.card_number", 3);
        m.masked("orders-db", "customers.card_number", 2);
        m.masked("orders-db", "email", 0);
        m.set_map_fill("FLOWS", 5, 65536);
        let g = Gauges {
            sessions: 1,
            pending_requests: 2,
            audit_lag: Some(AuditLag {
                written_seq: 10,
                durable_seq: 8,
                records: 2,
                age: Duration::from_millis(4),
            }),
            ready: Readiness {
                programs_attached: true,
                audit_writable: true,
                policy_loaded: true,
                socket_lsm: true,
            },
            ..Default::default()
        };
        (m, g)
    }

    /// Every sample line is `name{labels} value`, after its family's TYPE.
    #[test]
    fn text_format_is_well_formed() {
        let (m, g) = sample();
        let text = m.render(&g);
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut p = rest.split(' ');
                let name = p.next().unwrap();
                let kind = p.next().unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(typed.insert(name.to_string()), "TYPE twice: {line}");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(typed.contains(family), "no TYPE before {line}");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                    assert!(!labels.contains('\n'));
                }
            }
        }
        for want in [
            "portcullis_flows_accepted_total 2\n",
            "portcullis_flows_refused_total{reason=\"untagged\"} 1\n",
            "portcullis_decisions_total{resource=\"orders-db\",action=\"postgres:select\",outcome=\"allow\"} 2\n",
            "portcullis_decisions_total{resource=\"orders-db\",action=\"postgres:delete\",outcome=\"deny\"} 1\n",
            "portcullis_decisions_total{resource=\"we\\\"ird\\\\res\\nx\",action=\"tcp:connect\",outcome=\"hold\"} 1\n",
            "portcullis_masked_values_total{resource=\"orders-db\",field=\"customers.card_number\"} 5\n",
            "portcullis_access_requests_pending 2\n",
            "portcullis_audit_unsynced_records 2\n",
            "portcullis_audit_unsynced_age_seconds 0.004\n",
            "portcullis_bpf_map_entries{map=\"FLOWS\"} 5\n",
            "portcullis_bpf_map_max_entries{map=\"FLOWS\"} 65536\n",
            "portcullis_ready 1\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("field=\"email\""), "n = 0 adds nothing");
        assert!(!text.contains("PENDING_CONNECTS"), "unknown fill not shown");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_count() {
        let (m, g) = sample();
        let text = m.render(&g);
        let bucket = |le: &str| -> u64 {
            let key = format!(
                "portcullis_command_duration_seconds_bucket{{protocol=\"postgres\",action=\"postgres:select\",le=\"{le}\"}} "
            );
            let line = text.lines().find(|l| l.starts_with(&key)).unwrap();
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert_eq!(bucket("0.0001"), 1);
        assert_eq!(bucket("0.001"), 1);
        assert_eq!(bucket("0.005"), 2);
        assert_eq!(bucket("10"), 2);
        assert_eq!(bucket("+Inf"), 3);
        assert!(text.contains(
            "portcullis_command_duration_seconds_count{protocol=\"postgres\",action=\"postgres:select\"} 3\n"
        ));
        let sum_line = text
            .lines()
            .find(|l| l.starts_with("portcullis_command_duration_seconds_sum"))
            .unwrap();
        let sum: f64 = sum_line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((sum - 60.00308).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn series_are_capped() {
        let m = Metrics::default();
        for i in 0..MAX_SERIES + 10 {
            m.masked("r", &format!("f{i}"), 1);
        }
        let text = m.render(&Gauges::default());
        assert!(text
            .contains("portcullis_masked_values_total{resource=\"_other\",field=\"_other\"} 10\n"));
    }

    #[test]
    fn requests_are_routed_by_path() {
        let ready = Readiness {
            programs_attached: true,
            audit_writable: false,
            policy_loaded: true,
            socket_lsm: false,
        };
        let ask = |raw: &[u8]| respond(parse_request_line(raw), || "METRICS".into(), || ready);
        assert_eq!(
            ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").2,
            "METRICS"
        );
        assert_eq!(ask(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").0, "200 OK");
        assert_eq!(ask(b"GET /healthz HTTP/1.1\r\n\r\n").0, "200 OK");
        let (status, _, body) = ask(b"GET /readyz HTTP/1.1\r\n\r\n");
        assert_eq!(status, "503 Service Unavailable");
        assert!(body.contains("audit_writable FAIL"), "{body}");
        assert!(
            body.contains("socket_lsm OFF (BPF LSM not active"),
            "{body}"
        );
        assert_eq!(ask(b"GET /metricsx HTTP/1.1\r\n\r\n").0, "404 Not Found");
        assert_eq!(
            ask(b"POST /metrics HTTP/1.1\r\n\r\n").0,
            "405 Method Not Allowed"
        );
        assert_eq!(ask(b"GET /metrics\r\n\r\n").0, "400 Bad Request");
        assert_eq!(ask(b"garbage").0, "400 Bad Request");
        assert_eq!(
            ask(b"GET http://x/metrics HTTP/1.1\r\n\r\n").0,
            "400 Bad Request"
        );
        assert_eq!(ask(b"\xff\xfe /x HTTP/1.1\r\n").0, "400 Bad Request");
    }
}
