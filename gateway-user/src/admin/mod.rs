//! The admin API: a Unix socket (mode 0600) speaking [`proto`], used by the
//! CLI. Owns request handling for tags, status, flows and break-glass
//! detach. It must not hold locks across awaits or do slow I/O while holding
//! a lock the data path takes.

pub mod proto;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream as StdUnixStream,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{info, warn};

use crate::{
    audit::{AuditEvent, IdentityRef},
    daemon::Shared,
};
pub use proto::{Request, Response};

/// Binds the admin socket with owner-only permissions. A stale socket from a
/// dead daemon is replaced; a live one is an error.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    crate::daemon::private_parent(path)?;
    if path.exists() {
        if StdUnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another daemon is listening on {} (use a different --admin-socket)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    // Created 0600 from the start: no window where others could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    listener.with_context(|| format!("binding admin socket {}", path.display()))
}

/// Serves admin connections until the daemon stops.
pub async fn serve(shared: Arc<Shared>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(shared.clone(), stream));
            }
            Err(e) => {
                warn!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(shared: Arc<Shared>, stream: UnixStream) {
    let caller = stream.peer_cred().ok().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    let mut reader = TokioBufReader::new(read).take(proto::MAX_REQUEST_BYTES as u64);
    let mut line = String::new();
    let response =
        match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await {
            Err(_) => Response::err("request timed out"),
            Ok(Err(e)) => Response::err(format!("reading request: {e}")),
            Ok(Ok(_)) if !line.ends_with('\n') => {
                Response::err("request too long or not newline-terminated")
            }
            Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                Ok(req) => handle(&shared, req, caller).await,
                Err(e) => Response::err(format!("invalid request: {e}")),
            },
        };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

use tokio::io::AsyncReadExt as _;

#[derive(Serialize)]
struct TagView {
    cgroup: String,
    cgroup_id: Option<u64>,
    exists: bool,
    identity: String,
    token_file: Option<std::path::PathBuf>,
    created: u64,
    /// The auto-tag glob that made it, if an `[[auto_tag]]` rule did.
    auto: Option<String>,
}

#[derive(Serialize)]
struct NetnsView {
    inode: u64,
    cookie: u64,
    pid: u32,
    host: bool,
    /// Interfaces whose egress filter drops tagged AF_PACKET frames.
    egress_guarded: usize,
}

async fn handle(shared: &Arc<Shared>, req: Request, caller: Option<u32>) -> Response {
    match req {
        Request::Status => Response::ok(status(shared)),
        Request::Tags => Response::ok(serde_json::json!({ "tags": tag_views(shared) })),
        Request::Flows => Response::ok(serde_json::json!({ "flows": shared.sessions.list() })),
        Request::Tag {
            cgroup,
            pid,
            container,
            identity,
            token_file,
        } => {
            let rel = match target(shared, cgroup.as_deref(), pid, container.as_deref()) {
                Ok(r) => r,
                Err(e) => return Response::err(e),
            };
            if let Ok(own) = shared.cgroups.cgroup_of_pid(std::process::id()) {
                if crate::identity::cgroup::is_same_or_below(&own, &rel) {
                    return Response::err(format!(
                        "refusing to tag {rel}: the daemon itself runs in {own}, and a proxy must never govern itself"
                    ));
                }
            }
            let mut warnings = Vec::new();
            if let Some(tf) = &token_file {
                if let Err(e) = std::fs::metadata(tf) {
                    warnings.push(format!(
                        "token file {} is not readable yet ({e}); it is read again when it changes",
                        tf.display()
                    ));
                }
            }
            let tag = {
                let mut tags = shared.tags.write().unwrap_or_else(|p| p.into_inner());
                match tags.insert(rel.clone(), identity, token_file) {
                    Ok(t) => t,
                    Err(e) => return Response::err(e.to_string()),
                }
            };
            if let Err(e) = shared.sync_tags() {
                return Response::err(format!("tag saved but not applied to the kernel: {e:#}"));
            }
            let ended = shared.end_untagged_sessions();
            shared.reconcile_now.notify_one();
            info!(cgroup = %tag.cgroup, identity = %tag.identity, caller_uid = ?caller, "cgroup tagged");
            let ev = AuditEvent::new("tag")
                .cgroup(tag.cgroup.clone())
                .identity(IdentityRef::named(&tag.identity))
                .approver(caller_name(caller))
                .detail(
                    "token_file",
                    tag.token_file
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                );
            if let Err(e) = shared.audit(ev).await {
                warn!("audit record of a tag failed: {e}");
            }
            Response::ok(
                serde_json::json!({ "tag": tag, "warnings": warnings, "ended_sessions": ended }),
            )
        }
        Request::Untag {
            cgroup,
            pid,
            container,
        } => {
            let rel = match (cgroup.as_deref(), pid, container.as_deref()) {
                // An untag must work for a cgroup that no longer exists.
                (Some(c), None, None) => match shared.cgroups.normalize(c) {
                    Ok(r) => r,
                    Err(e) => return Response::err(e.to_string()),
                },
                _ => match target(shared, cgroup.as_deref(), pid, container.as_deref()) {
                    Ok(r) => r,
                    Err(e) => return Response::err(e),
                },
            };
            let removed = {
                let mut tags = shared.tags.write().unwrap_or_else(|p| p.into_inner());
                match tags.remove(&rel) {
                    Ok(r) => r,
                    Err(e) => return Response::err(e.to_string()),
                }
            };
            let Some(removed) = removed else {
                return Response::err(format!("{rel} is not tagged"));
            };
            if let Err(e) = shared.sync_tags() {
                return Response::err(format!("tag removed but the kernel still has it: {e:#}"));
            }
            let ended = shared.end_untagged_sessions();
            info!(cgroup = %removed.cgroup, identity = %removed.identity, caller_uid = ?caller, "cgroup untagged");
            let ev = AuditEvent::new("untag")
                .cgroup(removed.cgroup.clone())
                .identity(IdentityRef::named(&removed.identity))
                .approver(caller_name(caller));
            if let Err(e) = shared.audit(ev).await {
                warn!("audit record of an untag failed: {e}");
            }
            Response::ok(serde_json::json!({ "untagged": removed, "ended_sessions": ended }))
        }
        Request::Kill { id } => {
            let ended = shared.sessions.cancel_where(|f| f.session == id);
            if ended.is_empty() {
                return Response::err(format!("no live session {id}"));
            }
            let ev = AuditEvent::new("session_killed")
                .session(id.clone())
                .approver(caller_name(caller));
            if let Err(e) = shared.audit(ev).await {
                warn!("audit record of a kill failed: {e}");
            }
            Response::ok(serde_json::json!({ "killed": id }))
        }
        Request::Requests => match &shared.fleet {
            // Every node's requests, as the store has them.
            Some(f) => match f.requests().await {
                Ok(all) => Response::ok(serde_json::json!({ "requests": all, "node": f.node })),
                Err(e) => Response::ok(serde_json::json!({
                    "requests": shared.jit.requests(),
                    "node": f.node,
                    "store_error": e.to_string(),
                })),
            },
            None => Response::ok(serde_json::json!({ "requests": shared.jit.requests() })),
        },
        Request::Grants => Response::ok(serde_json::json!({ "grants": shared.jit.grants() })),
        Request::Approve {
            id,
            for_duration,
            reason,
            as_name,
        } => {
            let by = reviewer(caller, as_name.as_deref());
            let dur = match for_duration
                .as_deref()
                .map(crate::policy::parse_duration)
                .transpose()
            {
                Ok(d) => d,
                Err(e) => return Response::err(format!("--for: {e}")),
            };
            let answered = match &shared.fleet {
                Some(f) => f
                    .approve(&shared.jit, &id, &by, dur, reason.clone())
                    .await
                    .map_err(|e| e.to_string()),
                None => shared
                    .jit
                    .approve(&id, &by, dur, reason.clone())
                    .map_err(|e| e.to_string()),
            };
            match answered {
                Ok((request, grant)) => {
                    let mut ev = request.decision_event(&by, "allow", grant.as_ref());
                    if let Some(r) = &reason {
                        ev = ev.reason(r.clone());
                    }
                    if let Err(e) = shared.audit(ev).await {
                        warn!("audit record of an approval failed: {e}");
                    }
                    shared
                        .webhooks
                        .notify(crate::jit::JitEvent::RequestDecided {
                            request: request.clone(),
                        });
                    if let Some(g) = &grant {
                        shared
                            .webhooks
                            .notify(crate::jit::JitEvent::GrantCreated { grant: g.clone() });
                    }
                    Response::ok(serde_json::json!({ "request": request, "grant": grant }))
                }
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::Deny {
            id,
            reason,
            as_name,
        } => {
            let by = reviewer(caller, as_name.as_deref());
            let reason = reason.unwrap_or_else(|| "denied by a reviewer".into());
            let answered = match &shared.fleet {
                Some(f) => f
                    .deny(&shared.jit, &id, &by, reason.clone())
                    .await
                    .map_err(|e| e.to_string()),
                None => shared
                    .jit
                    .deny(&id, &by, reason.clone())
                    .map_err(|e| e.to_string()),
            };
            match answered {
                Ok(request) => {
                    let ev = request.decision_event(&by, "deny", None).reason(reason);
                    if let Err(e) = shared.audit(ev).await {
                        warn!("audit record of a denial failed: {e}");
                    }
                    shared
                        .webhooks
                        .notify(crate::jit::JitEvent::RequestDecided {
                            request: request.clone(),
                        });
                    Response::ok(serde_json::json!({ "request": request }))
                }
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::Grant {
            identity,
            resource,
            allow,
            for_duration,
            reason,
            as_name,
        } => {
            let by = reviewer(caller, as_name.as_deref());
            let policy = shared.policy.load();
            if !policy.identities.contains_key(&identity) {
                return Response::err(format!(
                    "identity `{identity}` is not defined in the policy set"
                ));
            }
            if !policy.resources.contains_key(&resource) {
                return Response::err(format!(
                    "resource `{resource}` is not defined in the policy set"
                ));
            }
            let dur = match crate::policy::parse_duration(&for_duration) {
                Ok(d) => d,
                Err(e) => return Response::err(format!("--for: {e}")),
            };
            let made = match &shared.fleet {
                Some(f) => f
                    .grant(
                        &shared.jit,
                        &identity,
                        &resource,
                        allow,
                        dur,
                        &by,
                        reason.clone(),
                    )
                    .await
                    .map_err(|e| e.to_string()),
                None => shared
                    .jit
                    .create_grant(
                        &identity,
                        &resource,
                        allow,
                        None,
                        dur,
                        &by,
                        reason.clone(),
                        None,
                    )
                    .map_err(|e| e.to_string()),
            };
            match made {
                Ok(g) => {
                    let mut ev = AuditEvent::new("grant")
                        .identity(IdentityRef::named(&g.identity))
                        .resource(g.resource.clone())
                        .approver(by)
                        .detail("grant", g.id.clone())
                        .detail("actions", g.actions.join(","))
                        .detail("expires_ms", g.expires_ms);
                    if let Some(r) = reason {
                        ev = ev.reason(r);
                    }
                    if let Err(e) = shared.audit(ev).await {
                        warn!("audit record of a grant failed: {e}");
                    }
                    shared
                        .webhooks
                        .notify(crate::jit::JitEvent::GrantCreated { grant: g.clone() });
                    Response::ok(serde_json::json!({ "grant": g }))
                }
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::Revoke { id, as_name } => {
            let by = reviewer(caller, as_name.as_deref());
            let revoked = match &shared.fleet {
                Some(f) => f
                    .revoke(&shared.jit, &id, &by)
                    .await
                    .map_err(|e| e.to_string()),
                None => shared.jit.revoke(&id, &by).map_err(|e| e.to_string()),
            };
            match revoked {
                Ok(g) => {
                    let ended = shared.end_sessions_of_grant(&g.id);
                    let mut ev = AuditEvent::new("grant_revoked")
                        .identity(IdentityRef::named(&g.identity))
                        .resource(g.resource.clone())
                        .approver(by.clone())
                        .detail("grant", g.id.clone());
                    for s in &ended {
                        ev = ev.detail(format!("ended:{s}"), "grant revoked");
                    }
                    if let Err(e) = shared.audit(ev).await {
                        warn!("audit record of a revocation failed: {e}");
                    }
                    shared.webhooks.notify(crate::jit::JitEvent::GrantEnded {
                        grant: g.clone(),
                        reason: format!("revoked by {by}"),
                    });
                    Response::ok(serde_json::json!({ "grant": g, "ended_sessions": ended }))
                }
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::PolicyReload => {
            match crate::daemon::reload_policy(shared, &format!("admin (uid {caller:?})")).await {
                Ok(version) => Response::ok(serde_json::json!({ "version": version })),
                Err(e) => Response::err(format!(
                    "policy set refused; keeping version {}:\n{e}",
                    shared.policy.load().version
                )),
            }
        }
        Request::PolicyShow => {
            let policy = shared.policy.load();
            Response::ok(policy.summary())
        }
        Request::McpTools { resource } => {
            match crate::proxy::mcp::tool_store(&shared.cfg.state_dir).list(&resource) {
                Ok(tools) => {
                    Response::ok(serde_json::json!({ "resource": resource, "tools": tools }))
                }
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::McpAccept {
            resource,
            tool,
            as_name,
        } => {
            let by = reviewer(caller, as_name.as_deref());
            match crate::proxy::mcp::tool_store(&shared.cfg.state_dir).accept(&resource, &tool) {
                Ok(p) => {
                    let ev = AuditEvent::new("mcp_tool_accepted")
                        .resource(resource.clone())
                        .approver(by)
                        .detail("tool", tool.clone())
                        .detail("fingerprint", p.fingerprint.clone());
                    if let Err(e) = shared.audit(ev).await {
                        warn!("audit record of an mcp tool acceptance failed: {e}");
                    }
                    Response::ok(
                        serde_json::json!({ "resource": resource, "tool": tool, "accepted": p }),
                    )
                }
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::Detach => {
            let result = {
                let mut r = shared.redirect.lock().unwrap_or_else(|p| p.into_inner());
                r.detach().map(|()| r.pin_dir().to_path_buf())
            };
            match result {
                Ok(pin_dir) => {
                    warn!(caller_uid = ?caller, pin_dir = %pin_dir.display(), "break-glass: programs detached and pins removed; nothing new is intercepted");
                    let ev = AuditEvent::new("detach")
                        .approver(caller_name(caller))
                        .detail("pin_dir", pin_dir.display().to_string());
                    if let Err(e) = shared.audit(ev).await {
                        warn!("audit record of a detach failed: {e}");
                    }
                    Response::ok(serde_json::json!({ "detached": true, "pin_dir": pin_dir }))
                }
                Err(e) => Response::err(format!("detach failed: {e}")),
            }
        }
    }
}

/// How a reviewer is recorded: the caller's uid, plus `--as NAME`.
fn reviewer(uid: Option<u32>, as_name: Option<&str>) -> String {
    match as_name {
        Some(n) => format!("{} as {n}", caller_name(uid)),
        None => caller_name(uid),
    }
}

/// How audit events name an admin caller.
fn caller_name(uid: Option<u32>) -> String {
    match uid {
        Some(uid) => format!("uid:{uid}"),
        None => "uid:unknown".into(),
    }
}

fn target(
    shared: &Shared,
    cgroup: Option<&str>,
    pid: Option<u32>,
    container: Option<&str>,
) -> Result<String, String> {
    match (cgroup, pid, container) {
        (Some(c), None, None) => shared.cgroups.resolve(c).map_err(|e| e.to_string()),
        (None, None, Some(id)) => crate::identity::container::resolve(&shared.cgroups, id)
            .map(|f| f.cgroup)
            .map_err(|e| e.to_string()),
        (None, Some(pid), None) => {
            let rel = shared
                .cgroups
                .cgroup_of_pid(pid)
                .map_err(|e| e.to_string())?;
            shared.cgroups.resolve(&rel).map_err(|e| e.to_string())
        }
        _ => Err("name exactly one of a cgroup path, --pid or --container".into()),
    }
}

fn tag_views(shared: &Shared) -> Vec<TagView> {
    let tags = shared.tags.read().unwrap_or_else(|p| p.into_inner());
    tags.iter()
        .map(|t| {
            let id = shared.cgroups.id_of(&t.cgroup).ok();
            TagView {
                cgroup: t.cgroup.clone(),
                cgroup_id: id,
                exists: id.is_some(),
                identity: t.identity.clone(),
                token_file: t.token_file.clone(),
                created: t.created,
                auto: t.auto.clone(),
            }
        })
        .collect()
}

fn status(shared: &Shared) -> serde_json::Value {
    let policy = shared.policy.load();
    let netns: Vec<NetnsView> = {
        let served = shared.netns.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<NetnsView> = served
            .iter()
            .map(|(id, s)| NetnsView {
                inode: id.1,
                cookie: s.cookie,
                pid: s.pid,
                host: s.host,
                egress_guarded: s.egress_guarded,
            })
            .collect();
        v.sort_by_key(|n| (!n.host, n.inode));
        v
    };
    let attached = !shared
        .redirect
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_detached();
    let tag_count = shared
        .tags
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .count();
    let gauges = crate::metrics::gauges(shared);
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_secs": shared.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
        "attached": attached,
        "policy_version": policy.version,
        "policies": shared.cfg.policies,
        "resources": policy.resources.keys().collect::<Vec<_>>(),
        "state_dir": shared.cfg.state_dir,
        "admin_socket": shared.cfg.admin_socket,
        "pin_dir": shared.cfg.pin_dir,
        "cgroup_mount": shared.cgroups.mount(),
        "cgroup_root": shared.cgroups.root(),
        "listen_port": shared.cfg.listen_port,
        "ca_cert": shared.ca.cert_path(),
        "tags": tag_count,
        "flows": shared.sessions.len(),
        // Sessions are spread over these threads (`flows` names each one's).
        "workers": shared.workers.len(),
        "netns": netns,
        "netns_refused": netns_refused(shared),
        // Whether AF_PACKET and the other non-inet families are denied to
        // tagged cgroups (needs BPF LSM; SECURITY.md says what is not
        // enforced without it).
        "socket_lsm": {
            "enforced": shared.lsm.active,
            "detail": shared.lsm.detail,
        },
        "udp_allow": shared
            .udp_allow
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        "counters": shared.metrics.snapshot(),
        "ready": gauges.ready,
        // With `[fleet]`: the node, its store and how far audit shipping is.
        "fleet": gauges.fleet,
        "audit_lag": shared.audit_log.lag(),
        "memory": {
            "rss_bytes": shared.memory.rss(),
            "budget_bytes": shared.cfg.memory_budget,
            "shedding": shared.memory.over(shared.cfg.memory_budget).is_some(),
            "limits": {
                "pg_max_statement": shared.cfg.limits.pg_max_statement,
                "pg_max_message": shared.cfg.limits.pg_max_message,
                "http_max_header": shared.cfg.limits.http_max_header,
                "http_max_decoded_body": shared.cfg.limits.http_max_decoded_body,
            },
        },
    })
}

/// Namespaces with tagged processes the daemon does not serve, and why
/// (their tagged connects are refused in the kernel).
fn netns_refused(shared: &Shared) -> Vec<serde_json::Value> {
    let failures = shared
        .netns_failures
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<serde_json::Value> = failures
        .iter()
        .map(|(id, f)| serde_json::json!({"inode": id.1, "pid": f.pid, "reason": f.reason}))
        .collect();
    v.sort_by_key(|x| x["inode"].as_u64());
    v
}

/// Sends one request to the daemon and returns its response.
pub fn call(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    let mut stream = StdUnixStream::connect(socket)
        .with_context(|| format!("cannot reach the daemon at {} (is it running? set --admin-socket or PORTCULLIS_ADMIN_SOCKET)", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = BufReader::new(stream);
    let mut resp = String::new();
    reader.read_line(&mut resp)?;
    serde_json::from_str(&resp)
        .with_context(|| format!("invalid response from the daemon: {resp:?}"))
}
