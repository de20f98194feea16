//! The command gate: the one path every protocol handler takes to decide a
//! command (a connect, a SQL statement, an exec, an HTTP request).
//!
//! Owns the decision, the just-in-time hold (grant lookup, access request,
//! waiting for a human, the resource's timeout), the decision metrics and
//! the command's audit record, which is written before the handler may
//! forward anything. It must not speak any protocol: telling the agent that
//! a command is held or denied, and in what words, is the handler's job.

use std::{future::Future, sync::Arc, time::Instant};

use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::{
    context::{Context, ContextTime},
    decisions::Decisions,
    Flow,
};
use crate::{
    audit::TryRecord,
    daemon::Shared,
    jit::{AccessRequest, JitEvent, NewRequest, Resolution},
    policy::{Decision, DecisionRequest},
};

/// Reason given when the audit log cannot take the command's record.
pub const AUDIT_UNAVAILABLE: &str = "the audit log cannot be written";

/// One command as the gate sees it.
#[derive(Debug, Clone)]
pub struct Command {
    /// The action, e.g. `postgres:select`, `ssh:exec`, `k8s:delete`.
    pub action: String,
    /// The decision context: the flow's attributes, the time and the
    /// action's own attributes (see the generated Cedar schema).
    pub context: Context,
    /// The command as a human reads it (statement, command line, request
    /// line): shown in access requests and written to the audit log.
    pub text: String,
    /// A stable key for the command's shape (a statement fingerprint), so a
    /// grant can cover exactly this command.
    pub fingerprint: Option<String>,
    /// Extra audit detail (bind parameters, normalized text, ...).
    pub detail: Map<String, Value>,
}

impl Command {
    /// A command of `action` with the flow's base context and `text`.
    pub fn new(flow: &Flow, action: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            action: action.into(),
            context: Context::new(flow.context.clone(), ContextTime::now()),
            text: text.into(),
            fingerprint: None,
            detail: Map::new(),
        }
    }

    /// Adds a context attribute.
    #[must_use]
    pub fn context(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.context.insert(key.to_string(), value.into());
        self
    }

    /// Adds an audit detail.
    #[must_use]
    pub fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.detail.insert(key.to_string(), value.into());
        self
    }

    /// Sets the fingerprint.
    #[must_use]
    pub fn fingerprint(mut self, fingerprint: impl Into<String>) -> Self {
        self.fingerprint = Some(fingerprint.into());
        self
    }
}

/// The command may go ahead: its record is in the audit log.
#[derive(Debug, Clone)]
pub struct Allowed {
    /// Sequence number of the command's audit record.
    pub audit_seq: u64,
    /// The rules that allowed it.
    pub policies: Vec<String>,
    /// Who released it, when it was held.
    pub approved_by: Option<String>,
    /// The grant that covers it, if one did.
    pub grant: Option<String>,
    /// When the gate let it through (for the command's duration).
    pub at: Instant,
}

/// The command must not be forwarded. Its record is in the audit log
/// unless `reason` is [`AUDIT_UNAVAILABLE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// Why, in words fit for the agent (names the rule or the request).
    pub reason: String,
    /// The rules behind it.
    pub policies: Vec<String>,
    /// The access request, when a hold ended in a denial or timeout.
    pub request: Option<String>,
}

/// What the gate says about a command.
#[derive(Debug)]
pub enum Gate {
    /// Forward it.
    Allowed(Allowed),
    /// Refuse it.
    Denied(Denied),
    /// A human must decide: tell the agent (with [`Held::request`]'s id),
    /// then [`Held::wait`].
    Held(Box<Held>),
}

/// A held command waiting for a human.
#[derive(Debug)]
pub struct Held {
    request: AccessRequest,
    rx: oneshot::Receiver<Resolution>,
    policies: Vec<String>,
}

/// How a wait ended.
#[derive(Debug)]
pub enum Waited {
    /// Released: forward it.
    Allowed(Allowed),
    /// Denied, timed out, or the rules changed meanwhile.
    Denied(Denied),
    /// The agent left or the session was ended while waiting.
    Abandoned,
}

/// Decides `cmd` for `flow`. An allow or deny is audited before this
/// returns; a hold lifted by a live grant is an allow; any other hold
/// creates an access request (audited, webhooks notified) and returns
/// [`Gate::Held`].
pub async fn check(shared: &Arc<Shared>, flow: &Flow, cmd: &Command) -> Gate {
    let decision = decide(shared, flow, cmd, false);
    check_decided(shared, flow, cmd, decision).await
}

/// [`check`] with Cedar's decision taken from `memo` (the flow's memo of
/// allows, see [`super::decisions`]) when the same command was allowed on
/// this flow under the same policy set. Everything after the decision
/// (grant lookup, hold, the audit record before forwarding) runs for every
/// command as in [`check`].
pub(crate) async fn check_memo(
    shared: &Arc<Shared>,
    flow: &Flow,
    cmd: &Command,
    memo: &std::sync::Mutex<Decisions>,
) -> Gate {
    let policy = shared.policy.load_full();
    let decision = memo.lock().unwrap_or_else(|p| p.into_inner()).decide(
        &policy,
        &flow.info.identity,
        &flow.info.resource,
        &cmd.action,
        &cmd.context,
    );
    drop(policy);
    check_decided(shared, flow, cmd, decision).await
}

/// [`check`] with Cedar's decision (without approval) already made by the
/// handler for the loaded policy set, e.g. from its memo of allows
/// (`proxy::postgres::decisions`): audits it, and looks up grants and
/// creates the access request for a hold, exactly as [`check`].
pub async fn check_decided(
    shared: &Arc<Shared>,
    flow: &Flow,
    cmd: &Command,
    decision: Decision,
) -> Gate {
    match decision {
        Decision::Hold { policies } => {
            let info = &flow.info;
            if let Some(g) = shared.jit.grant_covering(
                &info.identity,
                &info.resource,
                &cmd.action,
                cmd.fingerprint.as_deref(),
            ) {
                let by = format!("grant {} by {}", g.id, g.created_by);
                shared.sessions.update(&info.session, |i| {
                    i.grant = Some(g.id.clone());
                });
                return Box::pin(released(shared, flow, cmd, by, Some(g.id))).await;
            }
            // Boxed, as `released` above: a hold is rare, and its future
            // would otherwise size every allowed command's (see
            // `http::request_future`).
            match Box::pin(hold(shared, flow, cmd, policies)).await {
                Ok(held) => Gate::Held(Box::new(held)),
                Err(denied) => Gate::Denied(denied),
            }
        }
        other => match record(shared, flow, cmd, &other, None, None).await {
            Ok(allowed) => Gate::Allowed(allowed),
            Err(denied) => Gate::Denied(denied),
        },
    }
}

/// [`check`] for handlers that wait for a hold without telling the agent
/// anything first.
pub async fn check_and_wait(
    shared: &Arc<Shared>,
    flow: &Flow,
    cmd: &Command,
    client_gone: impl Future<Output = ()>,
) -> Waited {
    match check(shared, flow, cmd).await {
        Gate::Allowed(a) => Waited::Allowed(a),
        Gate::Denied(d) => Waited::Denied(d),
        Gate::Held(h) => h.wait(shared, flow, cmd, client_gone).await,
    }
}

impl Held {
    /// The access request (its id is what the agent should be told).
    pub fn request(&self) -> &AccessRequest {
        &self.request
    }

    /// Waits for a human, the resource's approval timeout, the session
    /// being ended, or `client_gone` (the handler's way of noticing that the
    /// agent hung up). A release decides again with the approval, so a rule
    /// changed meanwhile still wins.
    pub async fn wait(
        self,
        shared: &Arc<Shared>,
        flow: &Flow,
        cmd: &Command,
        client_gone: impl Future<Output = ()>,
    ) -> Waited {
        let Held {
            request,
            mut rx,
            policies,
        } = self;
        let deadline = tokio::time::sleep_until(tokio::time::Instant::from_std(
            std::time::Instant::now()
                + std::time::Duration::from_millis(
                    request
                        .expires_ms
                        .saturating_sub(super::session::now_ms())
                        .max(1),
                ),
        ));
        tokio::pin!(deadline);
        tokio::pin!(client_gone);
        let resolution = tokio::select! {
            r = &mut rx => r.ok(),
            _ = &mut deadline => match time_out(shared, &request.id).await {
                Ok(r) => {
                    shared.webhooks.notify(JitEvent::RequestDecided { request: r });
                    Some(Resolution::TimedOut)
                }
                // Decided at the same moment: take that answer.
                Err(_) => rx.await.ok(),
            },
            _ = flow.cancel.cancelled() => {
                abandon(shared, flow, &request.id, "abandoned: the session was ended").await;
                return Waited::Abandoned;
            }
            _ = &mut client_gone => {
                abandon(shared, flow, &request.id, "abandoned: the agent hung up").await;
                return Waited::Abandoned;
            }
        };
        let refused = |reason: String| Denied {
            reason,
            policies: policies.clone(),
            request: Some(request.id.clone()),
        };
        let denied = match resolution {
            Some(Resolution::Approved { by, grant }) => {
                if let Some(g) = &grant {
                    shared.sessions.update(&flow.info.session, |i| {
                        i.grant = Some(g.clone());
                    });
                }
                shared.sessions.update(&flow.info.session, |i| {
                    i.approved_by = Some(by.clone());
                });
                return match released(shared, flow, cmd, by, grant).await {
                    Gate::Allowed(a) => Waited::Allowed(a),
                    Gate::Denied(d) => Waited::Denied(Denied {
                        request: Some(request.id.clone()),
                        ..d
                    }),
                    Gate::Held(_) => unreachable_hold(),
                };
            }
            Some(Resolution::Denied { by, reason }) => refused(format!(
                "access request {} denied by {by}: {reason}",
                request.id
            )),
            Some(Resolution::Failed { reason }) => {
                refused(format!("access request {} failed: {reason}", request.id))
            }
            Some(Resolution::TimedOut) | None => refused(format!(
                "access request {} timed out waiting for approval",
                request.id
            )),
        };
        let decision = Decision::Deny {
            reason: denied.reason.clone(),
            policies: denied.policies.clone(),
        };
        match record(shared, flow, cmd, &decision, None, Some(&request.id)).await {
            Ok(_) | Err(_) => Waited::Denied(denied),
        }
    }
}

/// [`released`] never returns a hold; this keeps the match total without a
/// panic path reachable from input.
fn unreachable_hold() -> Waited {
    Waited::Denied(Denied {
        reason: "approval required".into(),
        policies: Vec::new(),
        request: None,
    })
}

/// Writes the command's completion record (rows, status, duration, bytes:
/// whatever the handler adds to `detail`) and observes the command's
/// latency (from the gate's release to now) in the metrics. Best effort: the command already
/// ran, so a failure here is logged, not turned into a denial.
pub async fn finished(
    shared: &Arc<Shared>,
    flow: &Flow,
    cmd: &Command,
    allowed: &Allowed,
    detail: Map<String, Value>,
) {
    let ev = end_event(shared, flow, cmd, allowed, detail);
    if let Err(e) = shared.audit(ev).await {
        warn!(session = %flow.info.session, "audit of command_end failed: {e}");
    }
}

/// [`finished`] for a caller that cannot await (a response body's last
/// poll). The record is written before this returns when the log lets it
/// be written without waiting (see [`crate::audit::AuditLog::try_record`]),
/// which is the common case; otherwise on a task of its own, as before,
/// so it is not lost when the connection ends right after.
pub fn finished_detached(
    shared: &Arc<Shared>,
    flow: &Flow,
    cmd: &Command,
    allowed: &Allowed,
    detail: Map<String, Value>,
) {
    let ev = end_event(shared, flow, cmd, allowed, detail);
    let ev = match shared.try_audit(ev) {
        TryRecord::Written(Ok(_)) => return,
        TryRecord::Written(Err(e)) => {
            warn!(session = %flow.info.session, "audit of command_end failed: {e}");
            return;
        }
        TryRecord::Busy(ev) => *ev,
    };
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        warn!(session = %flow.info.session, "audit of command_end failed: no runtime to write it on");
        return;
    };
    let shared = shared.clone();
    let session = flow.info.session.clone();
    rt.spawn(async move {
        if let Err(e) = shared.audit(ev).await {
            warn!(session = %session, "audit of command_end failed: {e}");
        }
    });
}

/// The completion record of `cmd`, its latency observed in the metrics.
fn end_event(
    shared: &Shared,
    flow: &Flow,
    cmd: &Command,
    allowed: &Allowed,
    mut detail: Map<String, Value>,
) -> crate::audit::AuditEvent {
    let took = allowed.at.elapsed();
    shared
        .metrics
        .command_latency(flow.info.protocol.as_str(), &cmd.action, took);
    detail.insert("command_seq".into(), allowed.audit_seq.into());
    detail.insert("duration_us".into(), (took.as_micros() as u64).into());
    let mut ev = flow.audit_event("command_end").action(cmd.action.clone());
    // The handler's map, in its order, as the event's whole detail.
    ev.detail = detail;
    ev
}

fn decide(shared: &Shared, flow: &Flow, cmd: &Command, approved: bool) -> Decision {
    decide_with(&shared.policy.load(), flow, cmd, approved)
}

fn decide_with(
    policy: &crate::policy::PolicySet,
    flow: &Flow,
    cmd: &Command,
    approved: bool,
) -> Decision {
    policy.decide(&DecisionRequest {
        identity: &flow.info.identity,
        resource: &flow.info.resource,
        action: &cmd.action,
        context: cmd.context.to_value(),
        approved,
    })
}

/// Decides again with the approval in hand and records the outcome.
async fn released(
    shared: &Arc<Shared>,
    flow: &Flow,
    cmd: &Command,
    by: String,
    grant: Option<String>,
) -> Gate {
    let decision = match decide(shared, flow, cmd, true) {
        // Still a hold with approval in hand means the rules changed.
        Decision::Hold { policies } => Decision::Deny {
            reason: "approval required".into(),
            policies,
        },
        d => d,
    };
    match record(shared, flow, cmd, &decision, Some((by, grant)), None).await {
        Ok(a) => Gate::Allowed(a),
        Err(d) => Gate::Denied(d),
    }
}

/// Writes the command record for an allow or a deny and turns it into the
/// gate's answer. An allow whose record cannot be written is a deny.
async fn record(
    shared: &Arc<Shared>,
    flow: &Flow,
    cmd: &Command,
    decision: &Decision,
    approval: Option<(String, Option<String>)>,
    request: Option<&str>,
) -> Result<Allowed, Denied> {
    let (label, reason) = match decision {
        Decision::Allow { .. } => ("allow", None),
        Decision::Deny { reason, .. } => ("deny", Some(reason.clone())),
        Decision::Hold { .. } => ("deny", Some("approval required".to_string())),
    };
    shared
        .metrics
        .decision(&flow.info.resource, &cmd.action, label);
    let policy_version = shared.policy.load().version.clone();
    let mut ev = flow
        .audit_event("command")
        .action(cmd.action.clone())
        .decision(label)
        .policy_version(policy_version.clone())
        .detail("command", cmd.text.clone());
    if let Some(f) = &cmd.fingerprint {
        ev = ev.detail("fingerprint", f.clone());
    }
    for (k, v) in &cmd.detail {
        ev = ev.detail(k.clone(), v.clone());
    }
    for id in decision.policies() {
        ev = ev.policy_id(id.clone());
    }
    if let Some(r) = &reason {
        ev = ev.reason(r.clone());
    }
    if let Some(r) = request {
        ev = ev.detail("request", r.to_string());
    }
    let (approved_by, grant) = match approval {
        Some((by, grant)) => (Some(by), grant),
        None => (None, None),
    };
    if let Some(a) = &approved_by {
        ev = ev.approver(a.clone());
    }
    if let Some(g) = &grant {
        ev = ev.detail("grant", g.clone());
    }
    let seq = match shared.audit(ev).await {
        Ok(seq) => seq,
        Err(e) => {
            warn!(session = %flow.info.session, action = %cmd.action, "audit log unavailable; denying: {e}");
            return Err(Denied {
                reason: AUDIT_UNAVAILABLE.into(),
                policies: decision.policies().to_vec(),
                request: None,
            });
        }
    };
    match decision {
        Decision::Allow { policies } => {
            // Debug, not info: an allowed command is in the audit log
            // already, and a log line per statement, request or connect
            // is a write(2) on every command's path.
            debug!(
                session = %flow.info.session,
                action = %cmd.action,
                decision = "allow",
                policies = ?policies,
                policy_version = %policy_version,
                "command allowed"
            );
            Ok(Allowed {
                audit_seq: seq,
                policies: policies.clone(),
                approved_by,
                grant,
                at: Instant::now(),
            })
        }
        _ => {
            let reason = reason.unwrap_or_default();
            warn!(
                session = %flow.info.session,
                action = %cmd.action,
                decision = "deny",
                reason = %reason,
                policies = ?decision.policies(),
                policy_version = %policy_version,
                "command denied"
            );
            Err(Denied {
                reason,
                policies: decision.policies().to_vec(),
                request: request.map(str::to_string),
            })
        }
    }
}

/// Creates the access request for a held command and audits the hold.
async fn hold(
    shared: &Arc<Shared>,
    flow: &Flow,
    cmd: &Command,
    policies: Vec<String>,
) -> Result<Held, Denied> {
    let info = &flow.info;
    shared.metrics.decision(&info.resource, &cmd.action, "hold");
    let new = NewRequest {
        identity: info.identity.clone(),
        resource: info.resource.clone(),
        action: cmd.action.clone(),
        command: cmd.text.clone(),
        fingerprint: cmd.fingerprint.clone(),
        context: cmd.context.to_value(),
        session: info.session.clone(),
        policies: policies.clone(),
    };
    let timeout = flow.resource.approval_timeout;
    // Persisting the request fsyncs: keep it off the runtime's workers.
    let s = shared.clone();
    let held = tokio::task::spawn_blocking(move || s.jit.hold(new, timeout)).await;
    let (request, rx) = match held {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(deny_unheld(shared, flow, cmd, &policies, e.to_string()).await),
        Err(e) => {
            let reason = format!("access request failed: {e}");
            return Err(deny_unheld(shared, flow, cmd, &policies, reason).await);
        }
    };
    if let Some(fleet) = &shared.fleet {
        // Fail closed: a request no other node can see could never be
        // approved, so the command is refused at once with the reason.
        if let Err(e) = fleet.publish(&request).await {
            let _ = shared.jit.fail(&request.id, e.to_string());
            let d = deny_unheld(shared, flow, cmd, &policies, e.to_string()).await;
            return Err(Denied {
                reason: if d.reason == AUDIT_UNAVAILABLE {
                    d.reason
                } else {
                    STORE_UNAVAILABLE.into()
                },
                ..d
            });
        }
    }
    let mut ev = flow
        .audit_event("command")
        .action(cmd.action.clone())
        .decision("hold")
        .detail("command", cmd.text.clone())
        .detail("request", request.id.clone())
        .detail("expires_ms", request.expires_ms);
    if let Some(f) = &cmd.fingerprint {
        ev = ev.detail("fingerprint", f.clone());
    }
    for (k, v) in &cmd.detail {
        ev = ev.detail(k.clone(), v.clone());
    }
    for p in &policies {
        ev = ev.policy_id(p.clone());
    }
    if shared.audit(ev).await.is_err() {
        let _ = shared.jit.abandon(&request.id);
        return Err(Denied {
            reason: AUDIT_UNAVAILABLE.into(),
            policies,
            request: None,
        });
    }
    shared.webhooks.notify(JitEvent::RequestCreated {
        request: request.clone(),
    });
    warn!(
        session = %info.session,
        request = %request.id,
        identity = %info.identity,
        resource = %info.resource,
        action = %cmd.action,
        "{} held: access request {}; approve with `portcullis approve {}`",
        cmd.action,
        request.id,
        request.id
    );
    Ok(Held {
        request,
        rx,
        policies,
    })
}

/// A hold that could not become an access request (too many pending, the
/// state dir unwritable) is a deny.
async fn deny_unheld(
    shared: &Arc<Shared>,
    flow: &Flow,
    cmd: &Command,
    policies: &[String],
    reason: String,
) -> Denied {
    let decision = Decision::Deny {
        reason,
        policies: policies.to_vec(),
    };
    match record(shared, flow, cmd, &decision, None, None).await {
        Ok(_) => Denied {
            reason: "approval required".into(),
            policies: policies.to_vec(),
            request: None,
        },
        Err(d) => d,
    }
}

/// What an agent is told when its command needs approval and the fleet's
/// approval store cannot be reached.
pub const STORE_UNAVAILABLE: &str = crate::fleet::UNREACHABLE;

/// Times a request out. In a fleet the store hears it first, and an answer
/// given on another node that won the race is applied instead (it is then
/// on its way to the waiter, and this is an error).
async fn time_out(shared: &Arc<Shared>, id: &str) -> Result<AccessRequest, crate::jit::JitError> {
    if let Some(f) = &shared.fleet {
        if !f.time_out(&shared.jit, id).await {
            return Err(crate::jit::JitError::NoRequest(id.to_string()));
        }
    }
    shared.jit.time_out(id)
}

async fn abandon(shared: &Arc<Shared>, flow: &Flow, id: &str, why: &str) {
    if let Ok(r) = shared.jit.abandon(id) {
        let ev = flow
            .audit_event("access_request")
            .detail("request", r.id.clone())
            .reason(why.to_string());
        let _ = shared.audit(ev).await;
        shared
            .webhooks
            .notify(JitEvent::RequestDecided { request: r });
    }
}
