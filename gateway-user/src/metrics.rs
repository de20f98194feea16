//! Counters, histograms and the metrics/health endpoint (`GET /metrics`,
//! `GET /healthz`, `GET /readyz`). Owns only counting and exposition; it must
//! never block the data path: counting is plain atomics under a read lock,
//! and only the first sighting of a label set takes a write lock and
//! allocates.
//!
//! Exposition is the Prometheus project's own `prometheus-client` crate: its
//! metric types where they fit (the flow counters and the eBPF map gauges,
//! whose label values are `&'static str`, so a lookup builds no label set on
//! the heap) and its OpenMetrics text encoder for everything, including the
//! three dynamic-label families below, which keep their own two-level map so
//! the data path looks a series up by `&str` without allocating and so the
//! number of series stays capped.
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
//! Label values are escaped by the encoder; the number of distinct label
//! sets per family is capped ([`MAX_SERIES`]) so a buggy caller cannot grow
//! memory without bound: further sets are counted under `_other`.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        MetricType,
    },
    registry::{Metric, Registry},
};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{audit::AuditLag, daemon::Shared, proxy::Refusal};

/// Most label sets one family keeps; later ones are folded into `_other`.
pub const MAX_SERIES: usize = 4096;

/// The `Content-Type` of `GET /metrics`: what the encoder writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

/// A label set of one `&'static str` label: built on the stack, so a
/// [`Family`] lookup with it allocates nothing.
type StaticLabel = [(&'static str, &'static str); 1];

/// A two-label series map: first label → second label → value. Unlike
/// [`Family`], a lookup takes `&str` (no owned label set per call) and the
/// number of series is capped.
#[derive(Debug)]
struct LabelMap<T> {
    map: RwLock<HashMap<String, HashMap<String, T>>>,
    series: AtomicUsize,
}

impl<T: Default> Default for LabelMap<T> {
    fn default() -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
            series: AtomicUsize::new(0),
        }
    }
}

impl<T: Default> LabelMap<T> {
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

    /// Visits every series in label order (stable output); stops at the
    /// first error `f` returns.
    fn each(
        &self,
        mut f: impl FnMut(&str, &str, &T) -> Result<(), std::fmt::Error>,
    ) -> Result<(), std::fmt::Error> {
        let g = self.map.read().unwrap_or_else(|p| p.into_inner());
        let mut outer: Vec<&String> = g.keys().collect();
        outer.sort();
        for a in outer {
            let Some(m) = g.get(a) else { continue };
            let mut inner: Vec<(&String, &T)> = m.iter().collect();
            inner.sort_by(|x, y| x.0.cmp(y.0));
            for (b, v) in inner {
                f(a, b, v)?;
            }
        }
        Ok(())
    }
}

/// A fixed-bucket latency histogram: lock-free to observe (the crate's
/// `Histogram` takes a lock per observation), encoded by the crate.
#[derive(Debug, Default)]
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

    /// `(upper bound, non-cumulative count)` pairs, `+Inf` last, as the
    /// encoder wants them.
    fn buckets(&self) -> Vec<(f64, u64)> {
        LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.buckets)
            .map(|(le, c)| (le, c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// The dynamic-label families (see [`LabelMap`]).
#[derive(Debug, Default)]
struct Families {
    /// resource → action → counts by [`OUTCOMES`].
    decisions: LabelMap<[AtomicU64; 4]>,
    /// protocol → action → latency.
    latency: LabelMap<Histogram>,
    /// resource → field → masked values.
    masked: LabelMap<AtomicU64>,
}

/// Encodes [`Families`] at scrape time through the crate's encoder.
#[derive(Debug)]
struct FamiliesCollector(Arc<Families>);

impl Collector for FamiliesCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = &self.0;
        let mut e = encoder.encode_descriptor(
            "portcullis_decisions",
            "Command decisions, by resource, action and outcome.",
            None,
            MetricType::Counter,
        )?;
        f.decisions.each(|resource, action, counts| {
            for (outcome, c) in OUTCOMES.iter().zip(counts) {
                let v = c.load(Ordering::Relaxed);
                if v > 0 {
                    let labels = [
                        ("resource", resource),
                        ("action", action),
                        ("outcome", outcome),
                    ];
                    e.encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                }
            }
            Ok(())
        })?;

        let mut e = encoder.encode_descriptor(
            "portcullis_command_duration_seconds",
            "Allowed commands from arrival to completion, by protocol and action.",
            None,
            MetricType::Histogram,
        )?;
        f.latency.each(|protocol, action, h| {
            let labels = [("protocol", protocol), ("action", action)];
            e.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
                h.count.load(Ordering::Relaxed),
                &h.buckets(),
                None,
            )
        })?;

        let mut e = encoder.encode_descriptor(
            "portcullis_masked_values",
            "Values masked in responses, by resource and field (column, key path or detector).",
            None,
            MetricType::Counter,
        )?;
        f.masked.each(|resource, field, c| {
            let labels = [("resource", resource), ("field", field)];
            e.encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&c.load(Ordering::Relaxed), None)
        })
    }
}

/// Daemon counters.
#[derive(Debug)]
pub struct Metrics {
    flows_accepted: Counter,
    /// By [`Refusal::label`]; every reason is created up front so each is
    /// exported from the start (0 is a value worth alerting on).
    flows_refused: Family<StaticLabel, Counter>,
    families: Arc<Families>,
    /// By map name; a map appears once its fill is known.
    map_entries: Family<StaticLabel, Gauge<u64, AtomicU64>>,
    map_max_entries: Family<StaticLabel, Gauge<u64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let flows_refused = Family::default();
        for r in REFUSALS {
            drop(flows_refused.get_or_create(&[("reason", r.label())]));
        }
        Self {
            flows_accepted: Counter::default(),
            flows_refused,
            families: Arc::default(),
            map_entries: Family::default(),
            map_max_entries: Family::default(),
        }
    }
}

/// A copy of the flow counters (for `status --json`).
#[derive(Serialize)]
pub struct Snapshot {
    /// Flows handed to a protocol handler.
    pub flows_accepted: u64,
    /// Refusals by reason label.
    pub flows_refused: std::collections::BTreeMap<&'static str, u64>,
}

/// Every refusal reason.
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
    /// Fleet store and audit shipping, with `[fleet]`.
    pub fleet: Option<FleetGauges>,
}

/// Fleet gauges (`[fleet]`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetGauges {
    /// This node's name.
    pub node: String,
    /// Whether the store answered last time.
    pub store_up: bool,
    /// Audit events written locally but not yet in the store.
    pub ship_lag: u64,
    /// Highest seq the store acknowledged.
    pub shipped_seq: u64,
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
        self.flows_accepted.inc();
    }

    /// Counts a command decision (`allow`, `deny` or `hold`; anything else
    /// is counted as `other`).
    pub fn decision(&self, resource: &str, action: &str, outcome: &'static str) {
        let i = OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(OUTCOMES.len() - 1);
        self.families.decisions.with(resource, action, |c| {
            if let Some(c) = c.get(i) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    /// Records how long an allowed command took, from its arrival from the
    /// agent to its completion. `protocol` is `postgres`, `ssh`, `http`,
    /// `tcp`; `action` the catalog action (`postgres:select`).
    pub fn command_latency(&self, protocol: &str, action: &str, d: Duration) {
        self.families
            .latency
            .with(protocol, action, |h| h.observe(d));
    }

    /// Counts `n` values masked in `field` of `resource`.
    pub fn masked(&self, resource: &str, field: &str, n: u64) {
        if n == 0 {
            return;
        }
        self.families.masked.with(resource, field, |c| {
            c.fetch_add(n, Ordering::Relaxed);
        });
    }

    /// Sets the fill of the eBPF map `name` (one of [`MAP_NAMES`]).
    pub fn set_map_fill(&self, name: &str, entries: u64, max: u64) {
        if let Some(name) = MAP_NAMES.iter().find(|n| **n == name) {
            let labels = [("map", *name)];
            self.map_entries.get_or_create(&labels).set(entries);
            self.map_max_entries.get_or_create(&labels).set(max);
        }
    }

    /// Counts a refused flow.
    pub fn refused(&self, r: Refusal) {
        self.flows_refused
            .get_or_create(&[("reason", r.label())])
            .inc();
    }

    /// Current flow counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            flows_accepted: self.flows_accepted.get(),
            flows_refused: REFUSALS
                .iter()
                .map(|r| {
                    let v = self
                        .flows_refused
                        .get(&[("reason", r.label())])
                        .map_or(0, |c| c.get());
                    (r.label(), v)
                })
                .collect(),
        }
    }

    /// The OpenMetrics text exposition ([`CONTENT_TYPE`]), written by the
    /// `prometheus-client` encoder. The registry is built per scrape: it
    /// holds clones of the long-lived metrics (each an `Arc`) and gauges
    /// read from `g`, so scrape-time values need no extra state.
    pub fn render(&self, g: &Gauges) -> String {
        let mut r = Registry::default();
        reg(
            &mut r,
            "portcullis_flows_accepted",
            "Flows handed to a protocol handler.",
            self.flows_accepted.clone(),
        );
        reg(
            &mut r,
            "portcullis_flows_refused",
            "Flows refused, by reason.",
            self.flows_refused.clone(),
        );
        r.register_collector(Box::new(FamiliesCollector(self.families.clone())));
        let gauges: [(&str, &str, u64); 5] = [
            (
                "portcullis_sessions_active",
                "Live sessions.",
                g.sessions as u64,
            ),
            (
                "portcullis_access_requests_pending",
                "Access requests waiting for a human.",
                g.pending_requests as u64,
            ),
            (
                "portcullis_grants_active",
                "Grants in force.",
                g.grants as u64,
            ),
            ("portcullis_tags", "Tagged cgroups.", g.tags as u64),
            (
                "portcullis_netns_served",
                "Network namespaces with a proxy listener.",
                g.netns_served as u64,
            ),
        ];
        for (name, help, v) in gauges {
            reg(&mut r, name, help, ConstGauge::new(v));
        }
        reg(
            &mut r,
            "portcullis_bpf_map_entries",
            "Entries in an eBPF map (sampled periodically).",
            self.map_entries.clone(),
        );
        reg(
            &mut r,
            "portcullis_bpf_map_max_entries",
            "Capacity of an eBPF map.",
            self.map_max_entries.clone(),
        );
        if let Some(lag) = g.audit_lag {
            reg(
                &mut r,
                "portcullis_audit_unsynced_records",
                "Audit records written to the file but not yet fdatasync'd.",
                ConstGauge::new(lag.records),
            );
            reg(
                &mut r,
                "portcullis_audit_unsynced_age_seconds",
                "Age of the oldest audit record not yet fdatasync'd (0 when all are).",
                ConstGauge::new(lag.age.as_secs_f64()),
            );
            reg(
                &mut r,
                "portcullis_audit_last_seq",
                "Highest audit seq written to the file.",
                ConstGauge::new(lag.written_seq),
            );
        }
        if let Some(f) = &g.fleet {
            let labels = vec![("node".to_string(), f.node.clone())];
            let family = |v: u64| {
                let fam = Family::<Vec<(String, String)>, Gauge<u64, AtomicU64>>::default();
                fam.get_or_create(&labels).set(v);
                fam
            };
            reg(
                &mut r,
                "portcullis_fleet_audit_ship_lag_events",
                "Audit events written on this node but not yet shipped to the fleet store.",
                family(f.ship_lag),
            );
            reg(
                &mut r,
                "portcullis_fleet_audit_shipped_seq",
                "Highest audit seq of this node the fleet store holds.",
                family(f.shipped_seq),
            );
            reg(
                &mut r,
                "portcullis_fleet_store_up",
                "1 when the fleet store answered the last request.",
                family(u64::from(f.store_up)),
            );
        }
        let gauges: [(&str, &str, u64); 6] = [
            (
                "portcullis_audit_writable",
                "1 when the last audit write succeeded.",
                u64::from(g.ready.audit_writable),
            ),
            (
                "portcullis_programs_attached",
                "1 while the eBPF programs are attached.",
                u64::from(g.ready.programs_attached),
            ),
            (
                "portcullis_ready",
                "1 when /readyz answers 200.",
                u64::from(g.ready.ok()),
            ),
            (
                "portcullis_uptime_seconds",
                "Seconds since the daemon started.",
                g.uptime_secs,
            ),
            (
                "portcullis_resident_memory_bytes",
                "The daemon's resident memory, sampled every 100 ms.",
                g.resident_bytes,
            ),
            (
                "portcullis_memory_budget_bytes",
                "memory_budget: new sessions are shed above it (0: off).",
                g.memory_budget_bytes,
            ),
        ];
        for (name, help, v) in gauges {
            reg(&mut r, name, help, ConstGauge::new(v));
        }
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail; the encoder's own errors come
        // only from the writer.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// Registers `metric`; `help` is given as a sentence and the crate appends
/// the full stop itself.
fn reg(r: &mut Registry, name: &str, help: &str, metric: impl Metric) {
    r.register(name, help.strip_suffix('.').unwrap_or(help), metric);
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
        fleet: shared.fleet.as_ref().map(|f| FleetGauges {
            node: f.node.clone(),
            store_up: f.store_up(),
            ship_lag: f.shipping.lag(),
            shipped_seq: f
                .shipping
                .shipped_seq
                .load(std::sync::atomic::Ordering::Relaxed),
        }),
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
        "/metrics" => ("200 OK", CONTENT_TYPE, render()),
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

    /// Every sample line is `name{labels} value`, after its family's TYPE
    /// (OpenMetrics: a counter family `x` has samples `x_total`; the
    /// exposition ends with `# EOF`).
    #[test]
    fn text_format_is_well_formed() {
        let (m, g) = sample();
        let text = m.render(&g);
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        let mut typed = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut p = rest.split(' ');
                let name = p.next().unwrap();
                let kind = p.next().unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    typed.insert(name.to_string(), kind).is_none(),
                    "TYPE twice: {line}"
                );
                assert!(!name.ends_with("_total"), "{line}");
                continue;
            }
            if line.starts_with("# HELP ") || line == "# EOF" {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().unwrap();
            let (family, kind) = ["_total", "_bucket", "_sum", "_count", ""]
                .iter()
                .find_map(|s| {
                    let f = name.strip_suffix(s)?;
                    let kind = *typed.get(f)?;
                    let fits = match kind {
                        "counter" => *s == "_total",
                        "histogram" => ["_bucket", "_sum", "_count"].contains(s),
                        _ => s.is_empty(),
                    };
                    fits.then_some((f, kind))
                })
                .unwrap_or_else(|| panic!("no TYPE before {line}"));
            assert!(!family.is_empty() && !kind.is_empty());
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
        // Every family keeps its name and type (dashboards rely on them).
        for (family, kind) in [
            ("portcullis_flows_accepted", "counter"),
            ("portcullis_flows_refused", "counter"),
            ("portcullis_decisions", "counter"),
            ("portcullis_command_duration_seconds", "histogram"),
            ("portcullis_masked_values", "counter"),
            ("portcullis_sessions_active", "gauge"),
            ("portcullis_access_requests_pending", "gauge"),
            ("portcullis_grants_active", "gauge"),
            ("portcullis_tags", "gauge"),
            ("portcullis_netns_served", "gauge"),
            ("portcullis_bpf_map_entries", "gauge"),
            ("portcullis_bpf_map_max_entries", "gauge"),
            ("portcullis_audit_unsynced_records", "gauge"),
            ("portcullis_audit_unsynced_age_seconds", "gauge"),
            ("portcullis_audit_last_seq", "gauge"),
            ("portcullis_audit_writable", "gauge"),
            ("portcullis_programs_attached", "gauge"),
            ("portcullis_ready", "gauge"),
            ("portcullis_uptime_seconds", "gauge"),
            ("portcullis_resident_memory_bytes", "gauge"),
            ("portcullis_memory_budget_bytes", "gauge"),
        ] {
            assert_eq!(typed.get(family), Some(&kind), "{family} in\n{text}");
        }
        assert_eq!(typed.len(), 21, "{typed:?}");
        // Every refusal reason is exported from the start, 0 included.
        for r in REFUSALS {
            let want = format!(
                "portcullis_flows_refused_total{{reason=\"{}\"}} ",
                r.label()
            );
            assert!(text.contains(&want), "missing {want:?}");
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
            "portcullis_flows_refused_total{reason=\"memory_budget\"} 0\n",
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
        // The encoder writes `le` first; label order carries no meaning.
        let bucket = |le: &str| -> u64 {
            let le = format!("{{le=\"{le}\",protocol=\"postgres\",action=\"postgres:select\"}} ");
            let line = text
                .lines()
                .find(|l| {
                    l.strip_prefix("portcullis_command_duration_seconds_bucket")
                        .is_some_and(|rest| rest.starts_with(&le))
                })
                .unwrap_or_else(|| panic!("no bucket {le} in\n{text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert_eq!(bucket("0.0001"), 1);
        assert_eq!(bucket("0.001"), 1);
        assert_eq!(bucket("0.005"), 2);
        // OpenMetrics writes bounds as canonical floats (`10.0`).
        assert_eq!(bucket("10.0"), 2);
        assert_eq!(bucket("1.0"), 2);
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
        assert_eq!(
            ask(b"GET /metrics HTTP/1.1\r\n\r\n").1,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
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
