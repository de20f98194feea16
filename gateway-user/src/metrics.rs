//! Counters and the Prometheus text endpoint. Owns only counting and
//! exposition; it must never block the data path (plain atomics).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::{daemon::Shared, proxy::Refusal};

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
    /// Command decisions by (resource, action, outcome). A mutex, not
    /// atomics: the key set is only known at run time, and the lock is held
    /// for one map increment.
    decisions: Mutex<BTreeMap<(String, String, &'static str), u64>>,
}

/// A copy of the counters.
#[derive(Serialize)]
pub struct Snapshot {
    /// Flows handed to a protocol handler.
    pub flows_accepted: u64,
    /// Refusals by reason label.
    pub flows_refused: std::collections::BTreeMap<&'static str, u64>,
}

impl Metrics {
    /// Counts an accepted flow.
    pub fn accepted(&self) {
        self.flows_accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a command decision (`allow`, `deny` or `hold`).
    pub fn decision(&self, resource: &str, action: &str, outcome: &'static str) {
        let mut d = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        *d.entry((resource.to_string(), action.to_string(), outcome))
            .or_default() += 1;
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
        }
    }

    /// Current values.
    pub fn snapshot(&self) -> Snapshot {
        let all = [
            Refusal::NoFlowEntry,
            Refusal::UnknownCgroup,
            Refusal::Untagged,
            Refusal::NoResource,
            Refusal::ShuttingDown,
            Refusal::IdentityUnproven,
            Refusal::AuditUnavailable,
        ];
        Snapshot {
            flows_accepted: self.flows_accepted.load(Ordering::Relaxed),
            flows_refused: all
                .iter()
                .map(|r| (r.label(), self.counter(*r).load(Ordering::Relaxed)))
                .collect(),
        }
    }

    fn render(&self, shared: &Shared) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        out.push_str(
            "# HELP portcullis_flows_accepted_total Flows handed to a protocol handler.\n",
        );
        out.push_str("# TYPE portcullis_flows_accepted_total counter\n");
        out.push_str(&format!(
            "portcullis_flows_accepted_total {}\n",
            s.flows_accepted
        ));
        out.push_str("# HELP portcullis_flows_refused_total Flows refused, by reason.\n");
        out.push_str("# TYPE portcullis_flows_refused_total counter\n");
        for (label, v) in s.flows_refused {
            out.push_str(&format!(
                "portcullis_flows_refused_total{{reason=\"{label}\"}} {v}\n"
            ));
        }
        out.push_str(
            "# HELP portcullis_decisions_total Command decisions, by resource, action and outcome.\n",
        );
        out.push_str("# TYPE portcullis_decisions_total counter\n");
        let decisions = self
            .decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for ((resource, action, outcome), v) in decisions {
            out.push_str(&format!(
                "portcullis_decisions_total{{resource=\"{}\",action=\"{}\",outcome=\"{outcome}\"}} {v}\n",
                label_value(&resource),
                label_value(&action)
            ));
        }
        out.push_str("# HELP portcullis_sessions_active Live sessions.\n");
        out.push_str("# TYPE portcullis_sessions_active gauge\n");
        out.push_str(&format!(
            "portcullis_sessions_active {}\n",
            shared.sessions.len()
        ));
        out
    }
}

/// Serves `GET /metrics` (any path, really) in the Prometheus text format.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
                    .await;
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                return;
            }
            let body = shared.metrics.render(&shared);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}

/// Escapes a Prometheus label value (backslash, quote, newline).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
