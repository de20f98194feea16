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
    let mut decision = decide_connect(shared, &flow, false);
    let mut approver: Option<String> = None;
    if let Decision::Hold { policies } = &decision {
        match lift_hold(shared, &flow, &mut client, policies).await {
            Lifted::Approved { by, grant } => {
                decision = decide_connect(shared, &flow, true);
                shared.sessions.update(&flow.info.session, |i| {
                    i.grant = grant.clone();
                    i.approved_by = Some(by.clone());
                });
                approver = Some(by);
            }
            Lifted::Refused(reason) => {
                decision = Decision::Deny {
                    reason,
                    policies: decision.policies().to_vec(),
                };
            }
            Lifted::Abandoned => {
                return Ok(SessionSummary {
                    end_reason: "abandoned while held",
                    ..Default::default()
                });
            }
            Lifted::AuditFailed => {
                super::refuse(client);
                return Ok(SessionSummary {
                    end_reason: "denied: audit log unavailable",
                    ..Default::default()
                });
            }
        }
    }
    let policy_version = shared.policy.load().version.clone();
    let (label, reason) = match &decision {
        Decision::Allow { .. } => ("allow", None),
        Decision::Deny { reason, .. } => ("deny", Some(reason.clone())),
        // Still a hold after approval means the rules changed meanwhile.
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
    if let Some(a) = &approver {
        event = event.approver(a.clone());
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
            flow.recording.tcp_bytes(from_client, to_client);
            Ok(SessionSummary { bytes_from_client: from_client, bytes_to_client: to_client, end_reason: "closed" })
        }
        _ = flow.cancel.cancelled() => {
            super::refuse(client);
            Ok(SessionSummary { end_reason: "ended by the daemon", ..Default::default() })
        }
    }
}

/// Whether this flow may connect under the policy set in force
/// (`approved`: a human or a grant lifted the hold).
pub fn decide_connect(shared: &Shared, flow: &Flow, approved: bool) -> Decision {
    decide_connect_info(shared, &flow.info, approved)
}

/// [`decide_connect`] from a session's info (used again after a reload).
pub fn decide_connect_info(shared: &Shared, info: &super::FlowInfo, approved: bool) -> Decision {
    let policy = shared.policy.load();
    policy.decide(&DecisionRequest {
        identity: &info.identity,
        resource: &info.resource,
        action: "tcp:connect",
        context: serde_json::Value::Object(super::base_context(info)),
        approved,
    })
}

/// How a hold ended.
enum Lifted {
    /// A human (or a grant) released it.
    Approved { by: String, grant: Option<String> },
    /// Denied, timed out, or too many pending requests: the reason.
    Refused(String),
    /// The agent hung up while waiting.
    Abandoned,
    /// The hold could not be audited.
    AuditFailed,
}

/// A held connect: a grant that covers it lifts the hold at once; otherwise
/// an access request is made and the connection waits (TCP has no way to
/// tell the agent; the request id is in the log, the audit log, `portcullis
/// requests` and webhooks) for a human, the resource's timeout, or the agent
/// hanging up.
async fn lift_hold(
    shared: &Arc<Shared>,
    flow: &Flow,
    client: &mut TcpStream,
    policies: &[String],
) -> Lifted {
    let info = &flow.info;
    if let Some(g) = shared
        .jit
        .grant_covering(&info.identity, &info.resource, "tcp:connect", None)
    {
        return Lifted::Approved {
            by: format!("grant {} by {}", g.id, g.created_by),
            grant: Some(g.id),
        };
    }
    let timeout = flow.resource.approval_timeout;
    let new = crate::jit::NewRequest {
        identity: info.identity.clone(),
        resource: info.resource.clone(),
        action: "tcp:connect".into(),
        command: format!("connect {}", info.original_dst),
        fingerprint: None,
        context: serde_json::Value::Object(super::base_context(info)),
        session: info.session.clone(),
        policies: policies.to_vec(),
    };
    // Persisting the request fsyncs: keep it off the runtime's workers.
    let s = shared.clone();
    let held = tokio::task::spawn_blocking(move || s.jit.hold(new, timeout)).await;
    let (request, mut rx) = match held {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Lifted::Refused(e.to_string()),
        Err(e) => return Lifted::Refused(format!("access request failed: {e}")),
    };
    let mut held = flow
        .audit_event("command")
        .action("tcp:connect")
        .decision("hold")
        .detail("request", request.id.clone())
        .detail("expires_ms", request.expires_ms);
    for p in policies {
        held = held.policy_id(p.clone());
    }
    if shared.audit(held).await.is_err() {
        let _ = shared.jit.abandon(&request.id);
        return Lifted::AuditFailed;
    }
    shared
        .webhooks
        .notify(crate::jit::JitEvent::RequestCreated {
            request: request.clone(),
        });
    warn!(
        session = %info.session,
        request = %request.id,
        identity = %info.identity,
        resource = %info.resource,
        "tcp:connect held: access request {}; approve with `portcullis approve {}`",
        request.id,
        request.id
    );
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut watch_client = true;
    let mut byte = [0u8; 1];
    let resolution = loop {
        tokio::select! {
            r = &mut rx => break r.ok(),
            _ = &mut deadline => {
                match shared.jit.time_out(&request.id) {
                    Ok(r) => {
                        shared.webhooks.notify(crate::jit::JitEvent::RequestDecided { request: r });
                        break Some(crate::jit::Resolution::TimedOut);
                    }
                    // Decided at the same moment: take that answer.
                    Err(_) => break rx.await.ok(),
                }
            }
            _ = flow.cancel.cancelled() => {
                if let Ok(r) = shared.jit.abandon(&request.id) {
                    shared.webhooks.notify(crate::jit::JitEvent::RequestDecided { request: r });
                }
                return Lifted::Abandoned;
            }
            peeked = client.peek(&mut byte), if watch_client => {
                // Data waiting is fine (it is relayed once released); EOF or
                // an error means the agent hung up.
                let gone = !matches!(peeked, Ok(n) if n > 0);
                if !gone {
                    watch_client = false;
                }
                if gone {
                    if let Ok(r) = shared.jit.abandon(&request.id) {
                        let ev = flow.audit_event("access_request").detail("request", r.id.clone()).reason("abandoned: the agent hung up");
                        let _ = shared.audit(ev).await;
                        shared.webhooks.notify(crate::jit::JitEvent::RequestDecided { request: r });
                    }
                    return Lifted::Abandoned;
                }
            }
        }
    };
    match resolution {
        Some(crate::jit::Resolution::Approved { by, grant }) => Lifted::Approved { by, grant },
        Some(crate::jit::Resolution::Denied { by, reason }) => {
            Lifted::Refused(format!("denied by {by}: {reason}"))
        }
        Some(crate::jit::Resolution::TimedOut) | None => {
            Lifted::Refused("approval timed out".into())
        }
    }
}
