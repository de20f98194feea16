//! The `tcp` resource kind: the connection is the command. Relays bytes both
//! ways with bounded buffers, backpressure and half-close.

use std::{io, sync::Arc};

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{Flow, SessionSummary};
use crate::{
    daemon::Shared,
    policy::{Decision, DecisionRequest},
};

/// Per-direction relay buffer. Bounded: a slow side stalls the other
/// (backpressure) instead of growing memory.
pub const RELAY_BUFFER: usize = 64 * 1024;

/// Decides `tcp:connect`, then connects upstream and relays until both sides
/// are done or the session is cancelled. A denial, or an upstream that cannot
/// be reached, closes the agent's connection with a reset (TCP has no in-band
/// error).
pub async fn serve(
    shared: &Arc<Shared>,
    flow: Flow,
    mut client: TcpStream,
) -> io::Result<SessionSummary> {
    let decision = decide_connect(shared, &flow);
    let policy_version = shared.policy.load().version.clone();
    // Holds wait for just-in-time approval once that lands; until then a
    // hold is a denial that says why.
    let (label, reason) = match &decision {
        Decision::Allow { .. } => ("allow", None),
        Decision::Deny { reason, .. } => ("deny", Some(reason.clone())),
        Decision::Hold { .. } => ("deny", Some("approval required".to_string())),
    };
    let mut event = flow
        .audit_event("command")
        .action("tcp:connect")
        .decision(label)
        .policy_version(policy_version.clone());
    for id in decision.policies() {
        event = event.policy_id(id.clone());
    }
    if let Some(r) = &reason {
        event = event.reason(r.clone());
    }
    // The command goes nowhere before its audit record is written.
    if let Err(e) = shared.audit(event).await {
        warn!(session = %flow.info.session, "audit log unavailable; denying tcp:connect: {e}");
        super::refuse(client);
        return Ok(SessionSummary {
            end_reason: "denied: audit log unavailable",
            ..Default::default()
        });
    }
    match &decision {
        Decision::Allow { policies } => info!(
            session = %flow.info.session,
            action = "tcp:connect",
            decision = "allow",
            policies = ?policies,
            policy_version = %policy_version,
            "command allowed"
        ),
        _ => {
            warn!(
                session = %flow.info.session,
                action = "tcp:connect",
                decision = label,
                reason = reason.as_deref().unwrap_or_default(),
                policies = ?decision.policies(),
                policy_version = %policy_version,
                "command {}",
                if matches!(decision, Decision::Hold { .. }) { "needs approval: approval required" } else { "denied" }
            );
            super::refuse(client);
            return Ok(SessionSummary {
                end_reason: if matches!(decision, Decision::Hold { .. }) {
                    "approval required"
                } else {
                    "denied"
                },
                ..Default::default()
            });
        }
    }
    let _ = client.set_nodelay(true);
    let mut upstream = match flow.connect_upstream().await {
        Ok(u) => u,
        Err(e) => {
            super::refuse(client);
            return Err(io::Error::new(e.kind(), format!("upstream: {e}")));
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, RELAY_BUFFER, RELAY_BUFFER) => {
            let (from_client, to_client) = r?;
            Ok(SessionSummary { bytes_from_client: from_client, bytes_to_client: to_client, end_reason: "closed" })
        }
        _ = flow.cancel.cancelled() => {
            super::refuse(client);
            Ok(SessionSummary { end_reason: "ended by the daemon", ..Default::default() })
        }
    }
}

/// Whether this flow may connect under the policy set in force.
pub fn decide_connect(shared: &Shared, flow: &Flow) -> Decision {
    decide_connect_info(shared, &flow.info)
}

/// [`decide_connect`] from a session's info (used again after a reload).
pub fn decide_connect_info(shared: &Shared, info: &super::FlowInfo) -> Decision {
    let policy = shared.policy.load();
    policy.decide(&DecisionRequest {
        identity: &info.identity,
        resource: &info.resource,
        action: "tcp:connect",
        context: serde_json::Value::Object(super::base_context(info)),
        approved: false,
    })
}
