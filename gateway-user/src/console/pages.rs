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
.small{font-size:.85em;color:#555}pre .k,code .k{color:#7cb7ff;font-weight:bold}pre .s,code .s{color:#b5e07a}pre .n,code .n{color:#f0a35e}pre .c,code .c{color:#8a8a8a;font-style:italic}pre .p,code .p{color:#e58fd8}
td code .k{color:#0645ad}td code .s{color:#2a7d12}td code .n{color:#a14f00}td code .c{color:#777}td code .p{color:#8b2a85}pre.json{background:#f4f4f4;color:#222;max-height:20em;margin:0}table.mcp td{font-size:.9em}
.ok{color:#060}.bad{color:#a00;font-weight:bold}form.inline{display:inline}
button{padding:.2em .8em}.deny{background:#fdd}.approve{background:#dfd}
"#;

/// Live updates and the recording player. A page marked `data-live`
/// listens to `/events` and reloads when requests change, unless the
/// reviewer is typing (then it says that the page is stale). On a replay
/// page, each SSH channel's `div.player` gets the vendored asciinema player
/// (see [`super::assets`]); without JavaScript the text below it remains.
pub const JS: &str = r#"if(document.body.dataset.live){
 var es=new EventSource('/events');
 // A decision being sent must not be overtaken by a reload.
 document.addEventListener('submit',function(){es.close();});
 es.addEventListener('jit',function(){
  var busy=Array.prototype.some.call(document.querySelectorAll('input:not([type=hidden])'),function(i){return i.value!==''||i===document.activeElement;});
  if(busy){document.getElementById('stale').hidden=false;}else{location.reload();}
 });
}
// The asciinema player (loaded before this script on replay pages only)
// plays each channel's cast, fetched from the console.
if(window.AsciinemaPlayer){
 document.querySelectorAll('div.player[data-cast]').forEach(function(d){
  d.hidden=false;
  AsciinemaPlayer.create(d.getAttribute('data-cast'),d,{autoPlay:true,preload:true,idleTimeLimit:2,fit:'width'});
 });
}
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
    layout_full(title, reviewer, body, live, false)
}

/// The page frame; `player`: the asciinema player's stylesheet and script
/// come with it (served with [`super::web::PLAYER_CSP`]).
fn layout_full(
    title: &str,
    reviewer: Option<&Reviewer>,
    body: &str,
    live: bool,
    player: bool,
) -> String {
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
         <link rel=stylesheet href=\"/static/console.css\">{player_css}</head><body{live}><header><strong>Portcullis</strong>{nav}</header>\
         <main><h1>{t}</h1>{body}</main>{player_js}<script src=\"/static/console.js\"></script></body></html>",
        t = esc(title),
        live = if live { " data-live=1" } else { "" },
        player_css = if player {
            format!("<link rel=stylesheet href=\"{}\">", super::assets::player_css_path())
        } else {
            String::new()
        },
        player_js = if player {
            format!("<script src=\"{}\"></script>", super::assets::player_js_path())
        } else {
            String::new()
        },
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
    if let Some(f) = &shared.fleet {
        body.push_str(&format!(
            "<p class=small id=fleet>Fleet queue: requests held on every node (this is node <b>{}</b>; store {}).</p>",
            esc(&f.node),
            if f.store_up() { "reachable" } else { "<span class=bad>unreachable</span>" }
        ));
    }
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
            "<div class=card id=\"req-{id}\"><p><strong>{id}</strong>: <b>{identity}</b> asks <b>{action}</b> on <b>{resource}</b>{node}, waiting {waited} (times out in {left}s)</p>\
             <pre class=command>{command}</pre>{mcp}\
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
            node = x
                .node
                .as_deref()
                .map(|n| format!(" at node <b class=node>{}</b>", esc(n)))
                .unwrap_or_default(),
            waited = ago(x.created_ms),
            left = x.expires_ms.saturating_sub(crate::proxy::session::now_ms()) / 1000,
            command = command_html(&x.action, &x.command),
            mcp = mcp_call(&x.action, &x.context),
            rules = if rules.is_empty() { "-".into() } else { rules.join(", ") },
            tables = if tables.is_empty() { String::new() } else { format!("; touches tables {tables}") },
            session = esc(&x.session),
            session_q = url_encode(&x.session),
            csrf = csrf(r),
        ));
    }
    body.push_str("<h2>Decided</h2><table><tr><th>Request</th><th>Identity</th><th>Resource</th><th>Node</th><th>Action</th><th>Command</th><th>Outcome</th><th>By</th><th>When</th><th>Reason</th></tr>");
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
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&x.id),
            esc(&x.identity),
            esc(&x.resource),
            esc(x.node.as_deref().unwrap_or("")),
            esc(&x.action),
            command_html(&x.action, &super::web::clip(&x.command, 200)),
            x.status.label(),
            esc(&by),
            at.map(ms_time).unwrap_or_default(),
            esc(&reason)
        ));
    }
    body.push_str("</table>");
    layout_with("Requests", Some(r), &body, true)
}

/// A held command as HTML: a statement highlighted, anything else escaped.
fn command_html(action: &str, command: &str) -> String {
    if action.starts_with("postgres:") {
        super::render::sql(command)
    } else {
        esc(command)
    }
}

/// An MCP request's tool and the arguments it was called with (as the
/// decision saw them: the tool's declared arguments, typed), and the digest
/// an approval is bound to.
fn mcp_call(action: &str, ctx: &Value) -> String {
    if !action.starts_with("mcp:") {
        return String::new();
    }
    let mut out = String::from("<p class=mcp>");
    if let Some(m) = ctx["method"].as_str().filter(|m| !m.is_empty()) {
        out.push_str(&format!("MCP <code>{}</code>", esc(m)));
    }
    if let Some(t) = ctx["tool"].as_str().filter(|t| !t.is_empty()) {
        out.push_str(&format!(", tool <b class=tool>{}</b>", esc(t)));
    }
    if let Some(d) = ctx["arguments_digest"].as_str().filter(|d| !d.is_empty()) {
        out.push_str(&format!(
            " <span class=small>(arguments digest <code>{}</code>: an approval covers exactly these arguments)</span>",
            esc(d)
        ));
    }
    out.push_str("</p>");
    if ctx["arguments"].as_object().is_some_and(|a| !a.is_empty()) {
        out.push_str(&format!(
            "<p>Arguments:</p><pre class=json id=mcp-arguments>{}</pre>",
            super::render::json(&ctx["arguments"])
        ));
    }
    out
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

/// One recorded session: PostgreSQL statements with decisions and masked
/// results, HTTP exchanges, SSH channels (the asciinema player, and the
/// output as text for a browser without JavaScript). The flag says whether
/// the page runs the player (it needs [`super::web::PLAYER_CSP`]).
pub fn replay(
    shared: &Arc<Shared>,
    policy: &PolicySet,
    r: &Reviewer,
    id: &str,
) -> Result<(String, bool), (StatusCode, String)> {
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
                super::render::sql(&s.statement),
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
        let what = c
            .channel
            .as_ref()
            .map(|ch| format!("{} {}", ch.kind, ch.command.clone().unwrap_or_default()))
            .unwrap_or_default();
        body.push_str(&format!(
            "<h2>SSH channel {i}: {}</h2>\
             <div class=player id=\"player-{i}\" data-cast=\"/sessions/{}/cast/{i}\" hidden></div>\
             <h3>Output as text</h3><pre id=\"cast-out-{i}\" class=cast>{}</pre>",
            esc(&what),
            url_encode(id),
            esc(&strip_ansi(&text)),
        ));
    }
    let mcp = files.dir.join(super::render::MCP_FILE);
    if mcp.is_file() {
        let table = super::render::mcp_log(&mcp, m.started_ms).map_err(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {e}", mcp.display()),
            )
        })?;
        body.push_str("<h2>MCP messages</h2>");
        body.push_str(&table);
    }
    let player = !files.casts.is_empty();
    if player {
        body.push_str(&format!(
            "<p class=small>Player: asciinema-player {} (<a href=\"{}\">Apache-2.0</a>).</p>",
            super::assets::PLAYER_VERSION,
            super::assets::player_license_path()
        ));
    }
    Ok((
        layout_full(&format!("Session {id}"), Some(r), &body, false, player),
        player,
    ))
}

/// Channel `n`'s asciicast of session `id`, for the player: the header and
/// the output and resize events, re-serialized from what was parsed (a
/// line torn by a crash is left out). Keystrokes (`i` events) are not sent:
/// the page shows what the terminal showed, not what was typed unechoed
/// (a password at a prompt).
pub fn cast(
    shared: &Arc<Shared>,
    policy: &PolicySet,
    r: &Reviewer,
    id: &str,
    n: &str,
) -> Result<String, (StatusCode, String)> {
    let files = crate::record::load_session(shared.recorder.sessions_dir(), id)
        .map_err(|e| (StatusCode::NOT_FOUND, e.to_string()))?;
    may(
        policy,
        r,
        "console:view",
        ReviewTarget::Resource(&files.info.meta.resource),
        None,
    )
    .map_err(|why| (StatusCode::FORBIDDEN, why))?;
    let c = n
        .parse::<usize>()
        .ok()
        .and_then(|i| files.casts.get(i))
        .ok_or_else(|| (StatusCode::NOT_FOUND, format!("no channel {n} in {id}")))?;
    let parsed = crate::record::read_cast(&c.path)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(cast_text(&parsed))
}

fn cast_text(c: &crate::record::Cast) -> String {
    let mut out = c.header.to_string();
    out.push('\n');
    for e in c.events.iter().filter(|e| e.code != "i") {
        out.push_str(&serde_json::json!([e.time, e.code, e.data]).to_string());
        out.push('\n');
    }
    out
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

/// The audit log: the chain's verification and the last 200 events that
/// pass the filters (session, identity, resource, decision, type, time
/// range, free text).
pub async fn audit(shared: &Arc<Shared>, r: &Reviewer, q: &HashMap<String, String>) -> String {
    let state = shared.cfg.state_dir.clone();
    let want = |k: &str| q.get(k).cloned().filter(|v| !v.is_empty());
    let filter = crate::audit::TailFilter {
        session: want("session"),
        identity: want("identity"),
        since_ms: None,
        last: Some(200),
    };
    let (search, search_error) = match super::search::AuditSearch::from_query(q) {
        Ok(s) => (s, None),
        Err(e) => (super::search::AuditSearch::default(), Some(e)),
    };
    let searching = !search.is_empty();
    let (report, events) = tokio::task::spawn_blocking(move || {
        let dir = state.join("audit");
        let report = crate::audit::load_public_key(&state.join("audit.pub"))
            .map(|key| crate::audit::verify(&dir, &key))
            .map_err(|e| e.to_string());
        let events = crate::audit::read_events_where(&dir, &filter, &|e| search.matches(e))
            .map_err(|e| e.to_string());
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
    let field = |label: &str, name: &str, hint: &str| {
        format!(
            "<label>{label} <input name={name} placeholder=\"{hint}\" value=\"{}\"></label> ",
            esc(&want(name).unwrap_or_default())
        )
    };
    body.push_str("<form method=get action=\"/audit\" id=audit-search>");
    body.push_str(&field("Session", "session", ""));
    body.push_str(&field("Identity", "identity", ""));
    body.push_str(&field("Resource", "resource", ""));
    body.push_str(&field("Decision", "decision", "allow, deny"));
    body.push_str(&field("Type", "type", "command, access_request"));
    body.push_str(&field("From", "from", "2h or 2026-12-01T10:00:00Z"));
    body.push_str(&field("Until", "until", ""));
    body.push_str(&field("Text", "q", "words"));
    body.push_str("<button>Filter</button></form>");
    if let Some(e) = &search_error {
        body.push_str(&format!("<p class=bad id=search-error>{}</p>", esc(e)));
    }
    if searching || filter_set(q) {
        body.push_str("<p class=small>The last 200 matching events.</p>");
    }
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

fn filter_set(q: &HashMap<String, String>) -> bool {
    ["session", "identity"]
        .iter()
        .any(|k| q.get(*k).is_some_and(|v| !v.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_player_gets_output_and_resizes_but_not_keystrokes() {
        let c = crate::record::Cast {
            header: serde_json::json!({"version": 2, "width": 80, "height": 24}),
            events: vec![
                crate::record::CastEvent {
                    time: 0.1,
                    code: "o".into(),
                    data: "Password: ".into(),
                },
                crate::record::CastEvent {
                    time: 0.5,
                    code: "i".into(),
                    data: "hunter2\r".into(),
                },
                crate::record::CastEvent {
                    time: 0.6,
                    code: "r".into(),
                    data: "100x30".into(),
                },
            ],
        };
        let t = cast_text(&c);
        let lines: Vec<Value> = t
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert_eq!(lines[0]["version"], 2);
        assert_eq!(lines[1], serde_json::json!([0.1, "o", "Password: "]));
        assert_eq!(lines[2], serde_json::json!([0.6, "r", "100x30"]));
        assert!(!t.contains("hunter2"));
    }

    #[test]
    fn recordings_cannot_break_out_of_the_page() {
        assert_eq!(strip_ansi("\u{1b}[1;31mred\u{1b}[0m\r\n"), "red\n");
    }
}
