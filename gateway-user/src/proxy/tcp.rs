//! The `tcp` resource kind: the connection is the command. Once it is let
//! in, bytes are relayed both ways by [`tcp_relay`] (kernel to kernel,
//! backpressure, half-close, resets passed on).

use std::{io, sync::Arc};

use tokio::net::TcpStream;

use super::{
    gate::{self, Command, Waited},
    tcp_relay::{self, End, Side},
    Flow, SessionSummary,
};
use crate::{
    daemon::Shared,
    policy::{Decision, DecisionRequest},
};

/// Per-direction relay buffer of the byte relays that copy through
/// userspace (TLS passthrough). Bounded: a slow side stalls the other
/// (backpressure) instead of growing memory. Plain `tcp` flows splice
/// instead ([`tcp_relay`]).
pub const RELAY_BUFFER: usize = 64 * 1024;

/// Decides `tcp:connect`, then connects upstream and relays until both sides
/// are done or the session is cancelled. A denial, or an upstream that cannot
/// be reached, closes the agent's connection with a reset (TCP has no in-band
/// error).
pub async fn serve(
    shared: &Arc<Shared>,
    flow: Flow,
    client: TcpStream,
) -> io::Result<SessionSummary> {
    let cmd = Command::new(
        &flow,
        "tcp:connect",
        format!("connect {}", flow.info.original_dst),
    );
    // TCP has no in-band way to say "held": the connection stays open and
    // silent (the request id is in the log, the audit log, `portcullis
    // requests` and webhooks) until a human answers, the resource's timeout
    // passes, or the agent hangs up.
    let rules_before = shared.policy.load().version.clone();
    let waited = gate::check_and_wait(shared, &flow, &cmd, hung_up(&client)).await;
    match waited {
        Waited::Allowed(_) => {
            // Let in: from now on a reload that takes access away ends the
            // session. A reload that ran while this connect was decided
            // skipped it, so check again under the rules in force (the
            // registry write comes first, so a reload after it sees the
            // session admitted and a reload before it changed the version).
            shared
                .sessions
                .update(&flow.info.session, |i| i.admitted = true);
            if shared.policy.load().version != rules_before {
                shared.reevaluate_sessions();
            }
            if flow.cancel.is_cancelled() {
                super::refuse(client);
                return Ok(SessionSummary {
                    end_reason: "access gone after reload",
                    ..Default::default()
                });
            }
        }
        Waited::Denied(d) => {
            super::refuse(client);
            return Ok(SessionSummary {
                end_reason: if d.reason == gate::AUDIT_UNAVAILABLE {
                    "denied: audit log unavailable"
                } else if d.request.is_some() {
                    "approval refused"
                } else {
                    "denied"
                },
                ..Default::default()
            });
        }
        Waited::Abandoned => {
            return Ok(SessionSummary {
                end_reason: "abandoned while held",
                ..Default::default()
            });
        }
    }
    let _ = client.set_nodelay(true);
    let upstream = match flow.connect_upstream().await {
        Ok(u) => u,
        Err(e) => {
            super::refuse(client);
            return Err(io::Error::new(e.kind(), format!("upstream: {e}")));
        }
    };
    let relayed = tokio::select! {
        r = tcp_relay::relay(&client, &upstream) => r,
        _ = flow.cancel.cancelled() => {
            super::refuse(client);
            return Ok(SessionSummary { end_reason: "ended by the daemon", ..Default::default() });
        }
    };
    flow.recording
        .tcp_bytes(relayed.from_client, relayed.to_client);
    let summary = |end_reason| SessionSummary {
        bytes_from_client: relayed.from_client,
        bytes_to_client: relayed.to_client,
        end_reason,
    };
    match relayed.end {
        End::Closed => Ok(summary("closed")),
        // A reset is passed on as a reset, as TCP itself would have.
        End::Reset { side, error } => {
            let (gone, other, reason) = match side {
                Side::Agent => (client, upstream, "reset by the agent"),
                Side::Upstream => (upstream, client, "reset by the upstream"),
            };
            tcp_relay::reset(other);
            drop(gone);
            match error.kind() {
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Ok(summary(reason)),
                _ => Err(io::Error::new(error.kind(), format!("{reason}: {error}"))),
            }
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

/// Resolves when the agent hangs up. Data already waiting is fine (it is
/// relayed once the connect is released), so after the first byte this
/// never resolves.
async fn hung_up(client: &TcpStream) {
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Ok(n) if n > 0 => std::future::pending().await,
        _ => {}
    }
}
