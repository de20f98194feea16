//! Just-in-time access: access requests for held commands, the humans'
//! answers, time-bound grants, expiry and revocation.
//!
//! Owns requests, grants, the waiters parked on them and their persistence
//! in `<state>/jit.json`. It must not talk any agent protocol (handlers tell
//! the agent) nor decide policy (the rules decide what needs approval; this
//! module only records who approved what, and for how long).

mod webhook;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};

pub use webhook::Webhooks;

use crate::proxy::session::now_ms;

/// Most pending requests one identity may have; beyond it commands are denied.
pub const MAX_PENDING_PER_IDENTITY: usize = 32;
/// Longest grant.
pub const MAX_GRANT: Duration = Duration::from_secs(30 * 86_400);
/// How long decided requests stay listed.
const KEEP_DECIDED_MS: u64 = 24 * 3600 * 1000;
/// Most decided requests kept.
const KEEP_DECIDED_MAX: usize = 1000;

/// A JIT operation that cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum JitError {
    /// No such request.
    #[error("no access request {0}")]
    NoRequest(String),
    /// No such grant.
    #[error("no grant {0}")]
    NoGrant(String),
    /// The request was already decided.
    #[error("access request {id} is already {status}")]
    AlreadyDecided {
        /// Request id.
        id: String,
        /// Its status.
        status: &'static str,
    },
    /// The identity has too many pending requests.
    #[error("{identity} already has {MAX_PENDING_PER_IDENTITY} pending access requests")]
    TooManyPending {
        /// Identity.
        identity: String,
    },
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// The state file cannot be written or read.
    #[error("JIT state {path}: {reason}")]
    State {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Where a request stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// Waiting for a human.
    Pending,
    /// Released.
    Approved {
        /// Who.
        by: String,
        /// When (ms).
        at_ms: u64,
        /// Why.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// The grant created with it (`approve --for`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grant: Option<String>,
    },
    /// Refused by a human.
    Denied {
        /// Who.
        by: String,
        /// When (ms).
        at_ms: u64,
        /// Why.
        reason: String,
    },
    /// Nobody answered in time.
    TimedOut {
        /// When (ms).
        at_ms: u64,
    },
    /// The agent hung up while waiting.
    Abandoned {
        /// When (ms).
        at_ms: u64,
    },
    /// The waiting connection died with a previous daemon process, or the
    /// fleet's approval store was unreachable for too long while it waited.
    Failed {
        /// Why.
        reason: String,
    },
}

impl Status {
    /// An approval by `by`, now, with the grant it made (`approve --for`).
    pub fn approved(by: &str, reason: Option<String>, grant: Option<&Grant>) -> Self {
        Self::Approved {
            by: by.to_string(),
            at_ms: now_ms(),
            reason,
            grant: grant.map(|g| g.id.clone()),
        }
    }

    /// Short label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved { .. } => "approved",
            Self::Denied { .. } => "denied",
            Self::TimedOut { .. } => "timed_out",
            Self::Abandoned { .. } => "abandoned",
            Self::Failed { .. } => "failed",
        }
    }
}

/// An access request for one held command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccessRequest {
    /// Id (`r-…`).
    pub id: String,
    /// Identity asking.
    pub identity: String,
    /// Resource.
    pub resource: String,
    /// Action, e.g. `postgres:update`.
    pub action: String,
    /// The command as text (statement, command line, request line).
    pub command: String,
    /// Statement fingerprint, when the protocol has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The decision context.
    pub context: serde_json::Value,
    /// Session it came from.
    pub session: String,
    /// The `@approval` rules that apply.
    pub policies: Vec<String>,
    /// Created (ms).
    pub created_ms: u64,
    /// Times out (ms).
    pub expires_ms: u64,
    /// The node holding the command (fleet mode, `[fleet] node`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Where it stands.
    #[serde(flatten)]
    pub status: Status,
}

impl AccessRequest {
    /// The audit record of a reviewer's answer to this request (`decision`
    /// is `allow` or `deny`), with the grant an approval made, if any: the
    /// one shape the admin socket and the review console both write.
    pub fn decision_event(
        &self,
        by: &str,
        decision: &str,
        grant: Option<&Grant>,
    ) -> crate::audit::AuditEvent {
        let mut ev = crate::audit::AuditEvent::new("access_request")
            .session(self.session.clone())
            .identity(crate::audit::IdentityRef::named(&self.identity))
            .resource(self.resource.clone())
            .action(self.action.clone())
            .decision(decision)
            .approver(by.to_string())
            .detail("request", self.id.clone());
        if let Some(g) = grant {
            ev = ev
                .detail("grant", g.id.clone())
                .detail("grant_expires_ms", g.expires_ms);
        }
        ev
    }
}

/// A time-bound permission.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Grant {
    /// Id (`g-…`).
    pub id: String,
    /// Identity.
    pub identity: String,
    /// Resource.
    pub resource: String,
    /// Actions covered (`postgres:update`, or a whole protocol: `postgres`).
    pub actions: Vec<String>,
    /// Only this statement fingerprint, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Created (ms).
    pub created_ms: u64,
    /// Expires (ms).
    pub expires_ms: u64,
    /// Who created it.
    pub created_by: String,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The request it came from (`approve --for`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

impl Grant {
    /// Whether it covers this command now.
    pub fn covers(
        &self,
        identity: &str,
        resource: &str,
        action: &str,
        fingerprint: Option<&str>,
        now: u64,
    ) -> bool {
        let group = action.split(':').next().unwrap_or_default();
        self.identity == identity
            && self.resource == resource
            && now < self.expires_ms
            && self.actions.iter().any(|a| a == action || a == group)
            && self
                .fingerprint
                .as_deref()
                .is_none_or(|f| Some(f) == fingerprint)
    }
}

/// How a held command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Released by `by` (and covered by `grant` from now on, if any).
    Approved {
        /// Who.
        by: String,
        /// Grant created with the approval.
        grant: Option<String>,
    },
    /// Refused.
    Denied {
        /// Who.
        by: String,
        /// Why.
        reason: String,
    },
    /// Nobody answered in time.
    TimedOut,
    /// The request could not be carried to an answer (the fleet's approval
    /// store unreachable for too long).
    Failed {
        /// Why.
        reason: String,
    },
}

/// Something happened (for `requests --watch`, webhooks, audit).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JitEvent {
    /// A request was created.
    RequestCreated {
        /// The request.
        request: AccessRequest,
    },
    /// A request was decided (approved, denied, timed out, abandoned).
    RequestDecided {
        /// The request.
        request: AccessRequest,
    },
    /// A grant was created.
    GrantCreated {
        /// The grant.
        grant: Grant,
    },
    /// A grant ended (revoked or expired).
    GrantEnded {
        /// The grant.
        grant: Grant,
        /// `revoked by …` or `expired`.
        reason: String,
    },
}

/// A new request for a held command.
#[derive(Debug, Clone)]
pub struct NewRequest {
    /// Identity.
    pub identity: String,
    /// Resource.
    pub resource: String,
    /// Action.
    pub action: String,
    /// Command text.
    pub command: String,
    /// Fingerprint.
    pub fingerprint: Option<String>,
    /// Decision context.
    pub context: serde_json::Value,
    /// Session.
    pub session: String,
    /// The `@approval` rules.
    pub policies: Vec<String>,
}

#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    requests: Vec<AccessRequest>,
    grants: Vec<Grant>,
}

#[derive(Default)]
struct State {
    requests: BTreeMap<String, AccessRequest>,
    grants: BTreeMap<String, Grant>,
    waiters: HashMap<String, oneshot::Sender<Resolution>>,
    seq: u64,
}

/// The JIT service.
pub struct Jit {
    path: PathBuf,
    prefix: String,
    /// This node's name in a fleet: stamped on its requests.
    node: Option<String>,
    state: Mutex<State>,
    /// Serializes snapshot + write, so a newer state is never overwritten
    /// by an older snapshot.
    save_lock: Mutex<()>,
    events: broadcast::Sender<JitEvent>,
}

impl Jit {
    /// Loads `<state_dir>/jit.json`. Requests still pending there lost their
    /// waiting connection with the old process: they are marked failed.
    /// Expired grants are dropped. Returns the service and what was failed.
    pub fn load(state_dir: &Path) -> Result<(Self, Vec<AccessRequest>), JitError> {
        let path = state_dir.join("jit.json");
        let persisted: Persisted = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| JitError::State {
                path: path.clone(),
                reason: format!("corrupt: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => {
                return Err(JitError::State {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        let now = now_ms();
        let mut state = State::default();
        let mut failed = Vec::new();
        for mut r in persisted.requests {
            if r.status == Status::Pending {
                r.status = Status::Failed {
                    reason: "the daemon restarted; the waiting connection died with it".into(),
                };
                failed.push(r.clone());
            }
            state.requests.insert(r.id.clone(), r);
        }
        for g in persisted.grants {
            if g.expires_ms > now {
                state.grants.insert(g.id.clone(), g);
            }
        }
        let (events, _) = broadcast::channel(1024);
        let jit = Self {
            path,
            prefix: format!("{:x}", now % 0xfff_ffff),
            node: None,
            state: Mutex::new(state),
            save_lock: Mutex::new(()),
            events,
        };
        jit.save()?;
        Ok((jit, failed))
    }

    /// Names this node (fleet mode): its requests carry the name, and ids
    /// carry a digest of it so that two nodes never mint the same id.
    pub fn with_node(mut self, node: &str) -> Self {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(node.as_bytes());
        self.prefix = format!("{}{}", hex::encode(&digest[..3]), self.prefix);
        self.node = Some(node.to_string());
        self
    }

    /// This node's name, in fleet mode.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// Subscribes to events.
    pub fn subscribe(&self) -> broadcast::Receiver<JitEvent> {
        self.events.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self, state: &mut State, kind: char) -> String {
        state.seq += 1;
        format!("{kind}-{}-{}", self.prefix, state.seq)
    }

    fn save(&self) -> Result<(), JitError> {
        let _serial = self.save_lock.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = {
            let s = self.lock();
            serde_json::to_vec_pretty(&Persisted {
                requests: s.requests.values().cloned().collect(),
                grants: s.grants.values().cloned().collect(),
            })
        }
        .map_err(|e| JitError::State {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        crate::identity::tags::write_atomically(&self.path, &bytes).map_err(|e| JitError::State {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    fn emit(&self, ev: JitEvent) {
        let _ = self.events.send(ev);
    }

    /// The grant covering this command now, if any.
    pub fn grant_covering(
        &self,
        identity: &str,
        resource: &str,
        action: &str,
        fingerprint: Option<&str>,
    ) -> Option<Grant> {
        let now = now_ms();
        self.lock()
            .grants
            .values()
            .find(|g| g.covers(identity, resource, action, fingerprint, now))
            .cloned()
    }

    /// Parks a held command: creates its request and returns the request
    /// and a receiver that resolves when a human answers. The caller bounds
    /// the wait with the resource's timeout and then calls
    /// [`Jit::time_out`] (or [`Jit::abandon`] if the agent left).
    pub fn hold(
        &self,
        new: NewRequest,
        timeout: Duration,
    ) -> Result<(AccessRequest, oneshot::Receiver<Resolution>), JitError> {
        let (tx, rx) = oneshot::channel();
        let request = {
            let mut s = self.lock();
            let pending = s
                .requests
                .values()
                .filter(|r| r.identity == new.identity && r.status == Status::Pending)
                .count();
            if pending >= MAX_PENDING_PER_IDENTITY {
                return Err(JitError::TooManyPending {
                    identity: new.identity,
                });
            }
            let id = self.next_id(&mut s, 'r');
            let now = now_ms();
            let request = AccessRequest {
                id: id.clone(),
                identity: new.identity,
                resource: new.resource,
                action: new.action,
                command: new.command,
                fingerprint: new.fingerprint,
                context: new.context,
                session: new.session,
                policies: new.policies,
                created_ms: now,
                expires_ms: now + timeout.as_millis() as u64,
                node: self.node.clone(),
                status: Status::Pending,
            };
            s.requests.insert(id.clone(), request.clone());
            s.waiters.insert(id, tx);
            prune(&mut s);
            request
        };
        self.save()?;
        self.emit(JitEvent::RequestCreated {
            request: request.clone(),
        });
        Ok((request, rx))
    }

    fn decide(
        &self,
        id: &str,
        status: Status,
        resolution: Option<Resolution>,
    ) -> Result<AccessRequest, JitError> {
        let request = {
            let mut s = self.lock();
            let r = s
                .requests
                .get_mut(id)
                .ok_or_else(|| JitError::NoRequest(id.to_string()))?;
            if r.status != Status::Pending {
                return Err(JitError::AlreadyDecided {
                    id: id.to_string(),
                    status: r.status.label(),
                });
            }
            r.status = status;
            let r = r.clone();
            if let (Some(tx), Some(res)) = (s.waiters.remove(id), resolution) {
                let _ = tx.send(res);
            } else {
                s.waiters.remove(id);
            }
            r
        };
        self.save()?;
        self.emit(JitEvent::RequestDecided {
            request: request.clone(),
        });
        Ok(request)
    }

    /// Releases a held command; with `for_duration` also grants its
    /// identity + resource + action (+ fingerprint) for that long.
    pub fn approve(
        &self,
        id: &str,
        by: &str,
        for_duration: Option<Duration>,
        reason: Option<String>,
    ) -> Result<(AccessRequest, Option<Grant>), JitError> {
        let grant = match for_duration {
            None => None,
            Some(d) => {
                let r = self.get(id)?;
                if r.status != Status::Pending {
                    return Err(JitError::AlreadyDecided {
                        id: id.to_string(),
                        status: r.status.label(),
                    });
                }
                let g = self.approval_grant(&r, d, by, reason.clone())?;
                self.put_grant(g.clone())?;
                Some(g)
            }
        };
        let status = Status::approved(by, reason, grant.as_ref());
        let res = Resolution::Approved {
            by: by.to_string(),
            grant: grant.as_ref().map(|g| g.id.clone()),
        };
        let r = self.decide(id, status, Some(res))?;
        Ok((r, grant))
    }

    /// The grant `approve --for duration` makes for request `r`: its
    /// identity, resource, action and fingerprint, for `duration`. Built,
    /// not yet in force (the fleet store records it first).
    pub fn approval_grant(
        &self,
        r: &AccessRequest,
        duration: Duration,
        by: &str,
        reason: Option<String>,
    ) -> Result<Grant, JitError> {
        self.make_grant(
            &r.identity,
            &r.resource,
            vec![r.action.clone()],
            r.fingerprint.clone(),
            duration,
            by,
            reason,
            Some(r.id.clone()),
        )
    }

    /// Refuses a held command.
    pub fn deny(&self, id: &str, by: &str, reason: String) -> Result<AccessRequest, JitError> {
        let status = Status::Denied {
            by: by.to_string(),
            at_ms: now_ms(),
            reason: reason.clone(),
        };
        self.decide(
            id,
            status,
            Some(Resolution::Denied {
                by: by.to_string(),
                reason,
            }),
        )
    }

    /// Marks a request timed out (its waiter already gave up).
    pub fn time_out(&self, id: &str) -> Result<AccessRequest, JitError> {
        self.decide(
            id,
            Status::TimedOut { at_ms: now_ms() },
            Some(Resolution::TimedOut),
        )
    }

    /// Marks a request abandoned (the agent hung up).
    pub fn abandon(&self, id: &str) -> Result<AccessRequest, JitError> {
        self.decide(id, Status::Abandoned { at_ms: now_ms() }, None)
    }

    /// One request.
    pub fn get(&self, id: &str) -> Result<AccessRequest, JitError> {
        self.lock()
            .requests
            .get(id)
            .cloned()
            .ok_or_else(|| JitError::NoRequest(id.to_string()))
    }

    /// Requests, newest last.
    pub fn requests(&self) -> Vec<AccessRequest> {
        let mut v: Vec<AccessRequest> = self.lock().requests.values().cloned().collect();
        v.sort_by_key(|r| r.created_ms);
        v
    }

    /// Grants in force.
    pub fn grants(&self) -> Vec<Grant> {
        let mut v: Vec<Grant> = self.lock().grants.values().cloned().collect();
        v.sort_by_key(|g| g.created_ms);
        v
    }

    /// Builds a valid grant with a fresh id without putting it in force
    /// (the fleet store records it first).
    #[allow(clippy::too_many_arguments)]
    pub fn make_grant(
        &self,
        identity: &str,
        resource: &str,
        actions: Vec<String>,
        fingerprint: Option<String>,
        duration: Duration,
        by: &str,
        reason: Option<String>,
        request: Option<String>,
    ) -> Result<Grant, JitError> {
        if duration.is_zero() || duration > MAX_GRANT {
            return Err(JitError::Invalid(format!(
                "a grant lasts more than 0 and at most {} days",
                MAX_GRANT.as_secs() / 86_400
            )));
        }
        if actions.is_empty() {
            return Err(JitError::Invalid(
                "a grant needs at least one action".into(),
            ));
        }
        for a in &actions {
            let known = crate::policy::actions::context_of(a).is_some()
                || crate::policy::actions::GROUPS.contains(&a.as_str());
            if !known {
                return Err(JitError::Invalid(format!(
                    "unknown action {a:?} (e.g. tcp:connect, postgres:update, or a whole protocol: postgres)"
                )));
            }
        }
        let grant = {
            let mut s = self.lock();
            let now = now_ms();
            Grant {
                id: self.next_id(&mut s, 'g'),
                identity: identity.to_string(),
                resource: resource.to_string(),
                actions,
                fingerprint,
                created_ms: now,
                expires_ms: now + duration.as_millis() as u64,
                created_by: by.to_string(),
                reason,
                request,
            }
        };
        Ok(grant)
    }

    /// Creates a grant.
    #[allow(clippy::too_many_arguments)]
    pub fn create_grant(
        &self,
        identity: &str,
        resource: &str,
        actions: Vec<String>,
        fingerprint: Option<String>,
        duration: Duration,
        by: &str,
        reason: Option<String>,
        request: Option<String>,
    ) -> Result<Grant, JitError> {
        let grant = self.make_grant(
            identity,
            resource,
            actions,
            fingerprint,
            duration,
            by,
            reason,
            request,
        )?;
        self.put_grant(grant.clone())?;
        Ok(grant)
    }

    /// Puts a grant made here in force: saved, then announced.
    fn put_grant(&self, grant: Grant) -> Result<(), JitError> {
        self.lock().grants.insert(grant.id.clone(), grant.clone());
        self.save()?;
        self.emit(JitEvent::GrantCreated { grant });
        Ok(())
    }

    /// Adds a grant made elsewhere (another node of the fleet). Returns
    /// whether it was new here; a new one is saved and announced.
    pub fn add_grant(&self, grant: Grant) -> bool {
        if grant.expires_ms <= now_ms() {
            return false;
        }
        let new = {
            let mut s = self.lock();
            if s.grants.contains_key(&grant.id) {
                false
            } else {
                s.grants.insert(grant.id.clone(), grant.clone());
                true
            }
        };
        if new {
            let _ = self.save();
            self.emit(JitEvent::GrantCreated { grant });
        }
        new
    }

    /// Drops a grant ended elsewhere (revoked on another node). Returns it
    /// when it was still in force here.
    pub fn drop_grant(&self, id: &str, reason: String) -> Option<Grant> {
        let g = self.lock().grants.remove(id)?;
        let _ = self.save();
        self.emit(JitEvent::GrantEnded {
            grant: g.clone(),
            reason,
        });
        Some(g)
    }

    /// Applies an answer given elsewhere (another node, or the fleet store
    /// winning a race) to a request still pending here: its waiter, if
    /// this node holds one, is released or refused with it.
    pub fn settle(&self, id: &str, status: Status) -> Result<AccessRequest, JitError> {
        let resolution = match &status {
            Status::Approved { by, grant, .. } => Some(Resolution::Approved {
                by: by.clone(),
                grant: grant.clone(),
            }),
            Status::Denied { by, reason, .. } => Some(Resolution::Denied {
                by: by.clone(),
                reason: reason.clone(),
            }),
            Status::TimedOut { .. } => Some(Resolution::TimedOut),
            Status::Pending | Status::Abandoned { .. } | Status::Failed { .. } => None,
        };
        self.decide(id, status, resolution)
    }

    /// Fails a pending request (its waiter is refused with `reason`).
    pub fn fail(&self, id: &str, reason: String) -> Result<AccessRequest, JitError> {
        let resolution = Resolution::Failed {
            reason: reason.clone(),
        };
        self.decide(id, Status::Failed { reason }, Some(resolution))
    }

    /// Records a request another node holds, as the fleet store has it
    /// (for listings). Never touches a request this node is waiting on.
    pub fn mirror_request(&self, request: AccessRequest) -> bool {
        let changed = {
            let mut s = self.lock();
            if s.waiters.contains_key(&request.id) {
                return false;
            }
            let changed = s.requests.get(&request.id) != Some(&request);
            if changed {
                s.requests.insert(request.id.clone(), request);
                prune(&mut s);
            }
            changed
        };
        if changed {
            let _ = self.save();
        }
        changed
    }

    /// Revokes a grant.
    pub fn revoke(&self, id: &str, by: &str) -> Result<Grant, JitError> {
        let g = self
            .lock()
            .grants
            .remove(id)
            .ok_or_else(|| JitError::NoGrant(id.to_string()))?;
        self.save()?;
        self.emit(JitEvent::GrantEnded {
            grant: g.clone(),
            reason: format!("revoked by {by}"),
        });
        Ok(g)
    }

    /// Drops grants past their expiry; returns them.
    pub fn expire(&self) -> Vec<Grant> {
        let now = now_ms();
        let expired: Vec<Grant> = {
            let mut s = self.lock();
            let ids: Vec<String> = s
                .grants
                .values()
                .filter(|g| g.expires_ms <= now)
                .map(|g| g.id.clone())
                .collect();
            ids.iter().filter_map(|id| s.grants.remove(id)).collect()
        };
        if !expired.is_empty() {
            let _ = self.save();
            for g in &expired {
                self.emit(JitEvent::GrantEnded {
                    grant: g.clone(),
                    reason: "expired".into(),
                });
            }
        }
        expired
    }
}

/// Keeps the list of decided requests bounded.
fn prune(s: &mut State) {
    let now = now_ms();
    let mut decided: Vec<(u64, String)> = s
        .requests
        .values()
        .filter(|r| r.status != Status::Pending)
        .map(|r| (r.created_ms, r.id.clone()))
        .collect();
    decided.sort();
    let excess = decided.len().saturating_sub(KEEP_DECIDED_MAX);
    for (i, (created, id)) in decided.iter().enumerate() {
        if i < excess || now.saturating_sub(*created) > KEEP_DECIDED_MS {
            s.requests.remove(id);
        }
    }
}

#[cfg(test)]
mod tests;
