//! The console's pages, rendered on the server. Every value that came from
//! an agent, a recording or the log is escaped; the only script is
//! [`JS`] (the recording player), served from the console itself.

use std::{collections::HashMap, sync::Arc};

use hyper::StatusCode;
use serde_json::Value;

use super::{may, web::esc, web::url_encode, Reviewer};
use crate::{
    daemon::Shared,
    policy::{PolicySet, ReviewTarget},
};

/// The stylesheet.
pub const CSS: &str = r#"body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f2d3d;color:#fff;padding:.5em 1em;display:flex;gap:1.5em;align-items:center}
header a{color:#fff;text-decoration:none}header .who{margin-left:auto}
main{padding:1em}table{border-collapse:collapse;width:100%;background:#fff}
td,th{border:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
pre{background:#111;color:#eee;padding:.6em;overflow:auto;max-height:30em;white-space:pre-wrap}
.card{background:#fff;border:1px solid #ccc;border-left:4px solid #d08a00;padding:.6em 1em;margin:.6em 0}
.ok{color:#060}.bad{color:#a00;font-weight:bold}form.inline{display:inline}
button{padding:.2em .8em}.deny{background:#fdd}.approve{background:#dfd}
"#;

/// Live updates and the recording player. A page marked `data-live`
/// listens to `/events` and reloads when requests change, unless the
/// reviewer is typing (then it says that the page is stale).
/// The recording player replays an asciicast's output events into its
/// `<pre>`, with the recorded timing (idle pauses capped at 2 s).
pub const JS: &str = r#"if(document.body.dataset.live){
 var es=new EventSource('/events');
 // A decision being sent must not be overtaken by a reload.
 document.addEventListener('submit',function(){es.close();});
 es.addEventListener('jit',function(){
  var busy=Array.prototype.some.call(document.querySelectorAll('input:not([type=hidden])'),function(i){return i.value!==''||i===document.activeElement;});
  if(busy){document.getElementById('stale').hidden=false;}else{location.reload();}
 });
}
document.querySelectorAll('button[data-cast]').forEach(function(b){
 b.addEventListener('click',function(){
  var id=b.getAttribute('data-cast');
  var ev=JSON.parse(document.getElementById('cast-data-'+id).textContent);
  var out=document.getElementById('cast-out-'+id);
  out.textContent='';var i=0,last=0;
  function step(){
   if(i>=ev.length)return;
   var e=ev[i++];if(e[1]==='o'){out.textContent+=e[2];}
   var next=i<ev.length?Math.min(ev[i][0]-e[0],2):0;
   setTimeout(step,Math.max(0,next*1000));
  }
  step();
 });
});
"#;

fn ms_time(ms: u64) -> String {
    crate::audit::rfc3339_ms_string(ms)
}

fn ago(ms: u64) -> String {
    let s = crate::proxy::session::now_ms().saturating_sub(ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn layout(title: &str, reviewer: Option<&Reviewer>, body: &str) -> String {
    layout_with(title, reviewer, body, false)
}

fn layout_with(title: &str, reviewer: Option<&Reviewer>, body: &str, live: bool) -> String {
    let nav = match reviewer {
        Some(r) => format!(
            "<a href=\"/requests\">Requests</a><a href=\"/sessions\">Sessions</a><a href=\"/grants\">Grants</a><a href=\"/audit\">Audit</a>\
             <span class=\"who\">{}</span><form class=\"inline\" method=\"post\" action=\"/auth/logout\">{}<button>Sign out</button></form>",
            esc(&r.subject),
            csrf(r)
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>{t} · Portcullis</title>\
         <link rel=stylesheet href=\"/static/console.css\"></head><body{live}><header><strong>Portcullis</strong>{nav}</header>\
         <main><h1>{t}</h1>{body}</main><script src=\"/static/console.js\"></script></body></html>",
        t = esc(title),
        live = if live { " data-live=1" } else { "" },
    )
}

fn csrf(r: &Reviewer) -> String {
    format!("<input type=hidden name=csrf value=\"{}\">", esc(&r.csrf))
}

/// An error page.
pub fn error(status: StatusCode, msg: &str) -> String {
    layout(
        &format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        ),
        None,
        &format!(
            "<p class=bad>{}</p><p><a href=\"/requests\">Back</a></p>",
            esc(msg)
        ),
    )
}

/// After sign-out.
pub fn signed_out() -> String {
    layout(
        "Signed out",
        None,
        "<p>You are signed out. <a href=\"/requests\">Sign in again</a></p>",
    )
}

/// Pending access requests (those the reviewer may see), with approve /
/// approve for a duration / deny, and the recently decided.
pub fn requests(
    shared: &Arc<Shared>,
    policy: &PolicySet,
    r: &Reviewer,
    q: &HashMap<String, String>,
) -> String {
    let all = shared.jit.requests();
    let visible =
        |res: &str| may(policy, r, "console:view", ReviewTarget::Resource(res), None).is_ok();
    let mut body = String::from(
        "<p id=stale class=bad hidden>Requests changed: <a href=\"/requests\">reload</a></p>",
    );
    if let Some(done) = q.get("done") {
        body.push_str(&format!("<p class=ok>Decided {}.</p>", esc(done)));
    }
    let pending: Vec<_> = all
        .iter()
        .filter(|x| x.status == crate::jit::Status::Pending && visible(&x.resource))
        .collect();
    body.push_str(&format!("<h2>Pending ({})</h2>", pending.len()));
    if pending.is_empty() {
        body.push_str("<p>Nothing waits for a decision.</p>");
    }
    for x in pending.iter().rev() {
        let rules: Vec<String> = x
            .policies
            .iter()
            .map(|id| match policy.rules().get(id) {
                Some(info) => format!(
                    "{} ({}:{})",
                    esc(id),
                    esc(&info.file.display().to_string()),
                    info.line
                ),
                None => esc(id),
            })
            .collect();
        let tables = x.context["statement"]["tables"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(Value::as_str)
                    .map(esc)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        body.push_str(&format!(
            "<div class=card id=\"req-{id}\"><p><strong>{id}</strong>: <b>{identity}</b> asks <b>{action}</b> on <b>{resource}</b>, waiting {waited} (times out in {left}s)</p>\
             <pre class=command>{command}</pre>\
             <p>Rule asking for approval: {rules}{tables}. Session <a href=\"/sessions/{session_q}\">{session}</a>.</p>\
             <form class=inline method=post action=\"/requests/{id_q}/approve\">{csrf}\
               <select name=for><option value=\"\">once</option><option>15m</option><option>1h</option><option>8h</option></select>\
               <input name=reason placeholder=\"reason (optional)\"> <button class=approve>Approve</button></form> \
             <form class=inline method=post action=\"/requests/{id_q}/deny\">{csrf}\
               <input name=reason placeholder=\"reason\" required> <button class=deny>Deny</button></form></div>",
            id = esc(&x.id),
            id_q = url_encode(&x.id),
            identity = esc(&x.identity),
            action = esc(&x.action),
            resource = esc(&x.resource),
            waited = ago(x.created_ms),
            left = x.expires_ms.saturating_sub(crate::proxy::session::now_ms()) / 1000,
            command = esc(&x.command),
            rules = if rules.is_empty() { "-".into() } else { rules.join(", ") },
            tables = if tables.is_empty() { String::new() } else { format!("; touches tables {tables}") },
            session = esc(&x.session),
            session_q = url_encode(&x.session),
            csrf = csrf(r),
        ));
    }
    body.push_str("<h2>Decided</h2><table><tr><th>Request</th><th>Identity</th><th>Resource</th><th>Action</th><th>Command</th><th>Outcome</th><th>By</th><th>When</th><th>Reason</th></tr>");
    for x in all
        .iter()
        .rev()
        .filter(|x| x.status != crate::jit::Status::Pending && visible(&x.resource))
        .take(100)
    {
        use crate::jit::Status::*;
        let (by, at, reason) = match &x.status {
            Approved {
                by,
                at_ms,
                reason,
                grant,
            } => (
                by.clone(),
                Some(*at_ms),
                format!(
                    "{}{}",
                    reason.clone().unwrap_or_default(),
                    grant
                        .as_ref()
                        .map(|g| format!(" (grant {g})"))
                        .unwrap_or_default()
                ),
            ),
            Denied { by, at_ms, reason } => (by.clone(), Some(*at_ms), reason.clone()),
            TimedOut { at_ms } | Abandoned { at_ms } => {
                (String::new(), Some(*at_ms), String::new())
            }
            Failed { reason } => (String::new(), None, reason.clone()),
            Pending => continue,
        };
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&x.id),
            esc(&x.identity),
            esc(&x.resource),
            esc(&x.action),
            esc(&super::web::clip(&x.command, 200)),
            x.status.label(),
            esc(&by),
            at.map(ms_time).unwrap_or_default(),
            esc(&reason)
        ));
    }
    body.push_str("</table>");
    layout_with("Requests", Some(r), &body, true)
}

/// Live flows (with "end session") and recorded sessions.
pub fn sessions(
    shared: &Arc<Shared>,
    policy: &PolicySet,
    r: &Reviewer,
    q: &HashMap<String, String>,
) -> String {
    let visible =
        |res: &str| may(policy, r, "console:view", ReviewTarget::Resource(res), None).is_ok();
    let mut body = String::from("<h2>Live</h2><table><tr><th>Session</th><th>Identity</th><th>Resource</th><th>Protocol</th><th>Cgroup</th><th>Pid</th><th>Client → destination</th><th>Started</th><th></th></tr>");
    for f in shared
        .sessions
        .list()
        .iter()
        .filter(|f| visible(&f.resource))
    {
        body.push_str(&format!(
            "<tr><td><a href=\"/sessions/{sq}\">{s}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} → {}</td><td>{} ago</td>\
             <td><form class=inline method=post action=\"/sessions/{sq}/end\">{csrf}<button class=deny>End session</button></form></td></tr>",
            esc(&f.identity),
            esc(&f.resource),
            esc(f.protocol.as_str()),
            esc(&f.cgroup),
            f.pid,
            f.client,
            f.original_dst,
            ago(f.started_ms),
            s = esc(&f.session),
            sq = url_encode(&f.session),
            csrf = csrf(r),
        ));
    }
    body.push_str("</table>");
    let want = |k: &str| q.get(k).map(String::as_str).filter(|v| !v.is_empty());
    body.push_str(&format!(
        "<h2>Recorded</h2><form method=get action=\"/sessions\">Identity <input name=identity value=\"{}\"> Resource <input name=resource value=\"{}\"> <button>Search</button></form>",
        esc(want("identity").unwrap_or("")),
        esc(want("resource").unwrap_or(""))
    ));
    body.push_str("<table><tr><th>Session</th><th>Identity</th><th>Resource</th><th>Protocol</th><th>Started</th><th>Ended</th><th>Statements / exchanges / channels</th></tr>");
    let mut list = crate::record::list_sessions(shared.recorder.sessions_dir()).unwrap_or_default();
    list.sort_by_key(|s| std::cmp::Reverse(s.meta.started_ms));
    for s in list
        .iter()
        .filter(|s| visible(&s.meta.resource))
        .filter(|s| want("identity").is_none_or(|i| s.meta.identity == i))
        .filter(|s| want("resource").is_none_or(|x| s.meta.resource == x))
        .take(200)
    {
        body.push_str(&format!(
            "<tr><td><a href=\"/sessions/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {} / {}</td></tr>",
            url_encode(&s.meta.id),
            esc(&s.meta.id),
            esc(&s.meta.identity),
            esc(&s.meta.resource),
            esc(&s.meta.protocol),
            ms_time(s.meta.started_ms),
            s.ended_ms
                .map(|e| format!("{} ({})", ms_time(e), esc(s.end_reason.as_deref().unwrap_or(""))))
                .unwrap_or_else(|| "live".into()),
            s.counts.statements,
            s.counts.http_exchanges,
            s.counts.ssh_channels,
        ));
    }
    body.push_str("</table>");
    layout("Sessions", Some(r), &body)
}

/// Strips terminal escape sequences for display (the player shows text).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() || d == '~' {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if c == '\r' {
        } else {
            out.push(c);
        }
    }
    out
}

/// JSON for a `<script type=application/json>`: no `<` can close it.
fn script_json(v: &Value) -> String {
    v.to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// One recorded session: PostgreSQL statements with decisions and masked
/// results, HTTP exchanges, SSH channels (text and a player).
pub fn replay(
    shared: &Arc<Shared>,
    policy: &PolicySet,
    r: &Reviewer,
    id: &str,
) -> Result<String, (StatusCode, String)> {
    let files = crate::record::load_session(shared.recorder.sessions_dir(), id)
        .map_err(|e| (StatusCode::NOT_FOUND, e.to_string()))?;
    let m = &files.info.meta;
    may(
        policy,
        r,
        "console:view",
        ReviewTarget::Resource(&m.resource),
        None,
    )
    .map_err(|why| (StatusCode::FORBIDDEN, why))?;
    let mut body = format!(
        "<p><b>{}</b> on <b>{}</b> ({}), pid {} in <code>{}</code>, {} → {}, started {}{}</p>",
        esc(&m.identity),
        esc(&m.resource),
        esc(&m.protocol),
        m.pid,
        esc(&m.cgroup),
        esc(&m.client),
        esc(&m.original_dst),
        ms_time(m.started_ms),
        files
            .info
            .ended_ms
            .map(|e| format!(
                ", ended {} ({})",
                ms_time(e),
                esc(files.info.end_reason.as_deref().unwrap_or(""))
            ))
            .unwrap_or_else(|| ", live".into()),
    );
    if let Some(p) = &files.postgres {
        let stmts = crate::record::read_postgres(p)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        body.push_str("<h2>PostgreSQL statements</h2><table><tr><th>Time</th><th>Statement</th><th>Action</th><th>Decision</th><th>Rows</th><th>Result (as the agent saw it)</th></tr>");
        for s in &stmts {
            let mut result = String::new();
            if let (Some(cols), Some(rows)) = (&s.columns, &s.result_rows) {
                result.push_str("<table><tr>");
                for c in cols {
                    result.push_str(&format!("<th>{}</th>", esc(c)));
                }
                result.push_str("</tr>");
                for row in rows {
                    result.push_str("<tr>");
                    for v in row {
                        result.push_str(&format!(
                            "<td>{}</td>",
                            v.as_deref()
                                .map(esc)
                                .unwrap_or_else(|| "<i>NULL</i>".into())
                        ));
                    }
                    result.push_str("</tr>");
                }
                result.push_str("</table>");
            }
            let params = if s.params.is_empty() {
                String::new()
            } else {
                format!(
                    "<br>params: {}",
                    esc(&s
                        .params
                        .iter()
                        .map(|p| p.clone().unwrap_or_else(|| "NULL".into()))
                        .collect::<Vec<_>>()
                        .join(", "))
                )
            };
            body.push_str(&format!(
                "<tr><td>{}</td><td><code>{}</code>{}</td><td>{}</td><td class=\"{}\">{}{}</td><td>{}</td><td>{}</td></tr>",
                ms_time(s.time_ms),
                esc(&s.statement),
                params,
                esc(&s.action),
                if s.decision == "allow" { "ok" } else { "bad" },
                esc(&s.decision),
                s.reason.as_deref().map(|x| format!(": {}", esc(x))).unwrap_or_default(),
                s.rows.map(|n| n.to_string()).unwrap_or_default(),
                result
            ));
        }
        body.push_str("</table>");
    }
    if let Some(h) = &files.har {
        let har = crate::record::read_har(h)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        body.push_str("<h2>HTTP exchanges</h2><table><tr><th>Started</th><th>Request</th><th>Status</th><th>Time (ms)</th></tr>");
        for e in har["log"]["entries"].as_array().into_iter().flatten() {
            body.push_str(&format!(
                "<tr><td>{}</td><td><code>{} {}</code></td><td>{}</td><td>{}</td></tr>",
                esc(e["startedDateTime"].as_str().unwrap_or("")),
                esc(e["request"]["method"].as_str().unwrap_or("")),
                esc(e["request"]["url"].as_str().unwrap_or("")),
                e["response"]["status"],
                e["time"],
            ));
        }
        body.push_str("</table>");
    }
    for (i, c) in files.casts.iter().enumerate() {
        let cast = crate::record::read_cast(&c.path)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let text: String = cast
            .events
            .iter()
            .filter(|e| e.code == "o")
            .map(|e| e.data.as_str())
            .collect();
        let events: Vec<Value> = cast
            .events
            .iter()
            .map(|e| serde_json::json!([e.time, e.code, strip_ansi(&e.data)]))
            .collect();
        let what = c
            .channel
            .as_ref()
            .map(|ch| format!("{} {}", ch.kind, ch.command.clone().unwrap_or_default()))
            .unwrap_or_default();
        body.push_str(&format!(
            "<h2>SSH channel {i}: {}</h2><button data-cast=\"{i}\">Play</button>\
             <pre id=\"cast-out-{i}\" class=cast>{}</pre><script type=\"application/json\" id=\"cast-data-{i}\">{}</script>",
            esc(&what),
            esc(&strip_ansi(&text)),
            script_json(&Value::Array(events)),
        ));
    }
    Ok(layout(&format!("Session {id}"), Some(r), &body))
}

/// Grants in force, with revoke.
pub fn grants(shared: &Arc<Shared>, policy: &PolicySet, r: &Reviewer) -> String {
    let mut body = String::from("<table><tr><th>Grant</th><th>Identity</th><th>Resource</th><th>Actions</th><th>Expires</th><th>By</th><th>Reason</th><th></th></tr>");
    for g in shared.jit.grants().iter().filter(|g| {
        may(
            policy,
            r,
            "console:view",
            ReviewTarget::Resource(&g.resource),
            None,
        )
        .is_ok()
    }) {
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td><form class=inline method=post action=\"/grants/{}/revoke\">{}<button class=deny>Revoke</button></form></td></tr>",
            esc(&g.id),
            esc(&g.identity),
            esc(&g.resource),
            esc(&g.actions.join(", ")),
            ms_time(g.expires_ms),
            esc(&g.created_by),
            esc(g.reason.as_deref().unwrap_or("")),
            url_encode(&g.id),
            csrf(r)
        ));
    }
    body.push_str("</table>");
    layout("Grants", Some(r), &body)
}

/// The audit log: the chain's verification and the last events.
pub async fn audit(shared: &Arc<Shared>, r: &Reviewer, q: &HashMap<String, String>) -> String {
    let state = shared.cfg.state_dir.clone();
    let want = |k: &str| q.get(k).cloned().filter(|v| !v.is_empty());
    let filter = crate::audit::TailFilter {
        session: want("session"),
        identity: want("identity"),
        since_ms: None,
        last: Some(200),
    };
    let (report, events) = tokio::task::spawn_blocking(move || {
        let dir = state.join("audit");
        let report = crate::audit::load_public_key(&state.join("audit.pub"))
            .map(|key| crate::audit::verify(&dir, &key))
            .map_err(|e| e.to_string());
        let events = crate::audit::read_events(&dir, &filter).map_err(|e| e.to_string());
        (report, events)
    })
    .await
    .unwrap_or_else(|e| (Err(e.to_string()), Err("reader failed".into())));
    let mut body = match &report {
        Ok(rep) if rep.is_ok() => format!(
            "<p class=ok id=chain>Chain verified: {} events in {} files, last seq {}, signed up to seq {}.{}</p>",
            rep.events,
            rep.files,
            rep.last_seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            rep.last_checkpoint_seq.map(|s| s.to_string()).unwrap_or_else(|| "- (no checkpoint yet)".into()),
            rep.warnings.iter().map(|w| format!(" Warning: {}", esc(w))).collect::<String>(),
        ),
        Ok(rep) => format!(
            "<p class=bad id=chain>Chain BROKEN at {}</p>",
            esc(&rep.error.as_ref().map(|e| e.to_string()).unwrap_or_default())
        ),
        Err(e) => format!("<p class=bad id=chain>Cannot verify: {}</p>", esc(e)),
    };
    body.push_str(&format!(
        "<form method=get action=\"/audit\">Session <input name=session value=\"{}\"> Identity <input name=identity value=\"{}\"> <button>Filter</button></form>",
        esc(&want("session").unwrap_or_default()),
        esc(&want("identity").unwrap_or_default())
    ));
    body.push_str("<table><tr><th>Seq</th><th>Time</th><th>Type</th><th>Identity</th><th>Resource</th><th>Action</th><th>Decision</th><th>Approver</th><th>Reason</th></tr>");
    for e in events.unwrap_or_default().iter().rev() {
        let s = |k: &str| esc(e[k].as_str().unwrap_or(""));
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e["seq"],
            s("time"),
            s("type"),
            esc(e["identity"]["name"].as_str().unwrap_or("")),
            s("resource"),
            s("action"),
            s("decision"),
            s("approver"),
            s("reason"),
        ));
    }
    body.push_str("</table>");
    layout("Audit", Some(r), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recordings_cannot_break_out_of_the_page() {
        let v = serde_json::json!(["</script><script>alert(1)</script>"]);
        let s = script_json(&v);
        assert!(!s.contains('<') && !s.contains('>'), "{s}");
        assert_eq!(strip_ansi("\u{1b}[1;31mred\u{1b}[0m\r\n"), "red\n");
    }
}
