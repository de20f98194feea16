//! MCP resources (issue 16) with real peers: the official MCP Python SDK's
//! server (`tests/e2e/mcp_server.py`: Streamable HTTP answering as SSE or as
//! JSON, and the older HTTP+SSE transport) and its client
//! (`tests/e2e/mcp_client.py`) placed in the tagged cgroup, in each protocol
//! generation it speaks: the stateless 2026-07-28 revision, sessions with
//! initialize, HTTP+SSE. `cargo xtask setup` installs the SDK in
//! [`MCP_PYTHON`]'s venv.

use std::{
    fs,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use super::harness::*;

/// The venv `cargo xtask setup` creates with the `mcp` package.
pub const MCP_PYTHON: &str = "/opt/portcullis-test/mcp-venv/bin/python";

const TOKEN: &str = "s3cret-upstream-token";

const RULES: &str = r#"
@id("lists")
permit(principal == Identity::"agent", action == Action::"mcp:list", resource == Resource::"notes");
@id("notes-public")
permit(principal == Identity::"agent", action == Action::"mcp:call_tool", resource == Resource::"notes")
  when { context.tool == "read_note" && context.arguments has path && context.arguments.path like "public/*" };
@id("no-private")
@reason("private notes are off limits")
forbid(principal, action == Action::"mcp:call_tool", resource == Resource::"notes")
  when { context.arguments has path && context.arguments.path like "private/*" };
@id("harmless")
permit(principal == Identity::"agent", action == Action::"mcp:call_tool", resource == Resource::"notes")
  when { context.tool == "whoami" || context.tool == "slow_count" || context.tool == "ask" };
@id("delete-needs-approval")
@approval("required")
permit(principal == Identity::"agent", action == Action::"mcp:call_tool", resource == Resource::"notes")
  when { context.tool == "delete_note" };
@id("public-resources")
permit(principal == Identity::"agent", action == Action::"mcp:read_resource", resource == Resource::"notes")
  when { context.uri like "notes://public/*" };
"#;

/// `tests/e2e/mcp_server.py` on a free loopback port.
struct McpServer {
    child: Child,
    port: u16,
}

impl McpServer {
    fn start(transport: &str, extra: &[&str]) -> Self {
        Self::start_on(free_port(), transport, extra)
    }

    fn start_on(port: u16, transport: &str, extra: &[&str]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/mcp_server.py");
        let child = Command::new(MCP_PYTHON)
            .arg(script)
            .arg(port.to_string())
            .arg(transport)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the MCP server (is the SDK installed? cargo xtask setup)");
        wait_until(
            Duration::from_secs(30),
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "the MCP server listening",
        );
        Self { child, port }
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Env {
    _cg: TestCgroup,
    files: DaemonFiles,
    daemon: Daemon,
    place: Placement,
}

/// A daemon with the mcp resource `notes` for each port (one resource with
/// every port in `match`), the rules above, the agent tagged.
fn env(name: &str, ports: &[u16]) -> Env {
    require_root();
    let cg = TestCgroup::new(name);
    let files = DaemonFiles::new(&cg.rel);
    files.identities(IDENTITIES);
    files.rules("rules.cedar", RULES);
    let token = files.dir.join("notes.token");
    fs::write(&token, TOKEN).unwrap();
    let matches: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    fs::write(
        files.policies.join("notes.toml"),
        format!(
            "[resource.notes]\nprotocol = \"mcp\"\nmatch = [{}]\ntls = \"none\"\napproval_timeout = \"20s\"\ncredentials = {{ bearer_token_file = \"{}\" }}\ntools = {{ read_note = {{ path = \"String\" }}, delete_note = {{ id = \"Long\" }} }}\n",
            matches.join(", "),
            token.display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    Env {
        _cg: cg,
        files,
        daemon,
        place,
    }
}

pub(super) fn client_command(place: &Placement, url: &str, mode: &str, ops: &[&str]) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/mcp_client.py");
    let mut cmd = Command::new(MCP_PYTHON);
    cmd.arg(script).arg(url).arg(mode).args(ops);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    place.apply(&mut cmd);
    cmd
}

pub(super) fn parse_lines(out: &[u8], err: &[u8]) -> Vec<Value> {
    let lines: Vec<Value> = String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        lines.first().is_some_and(|l| l["op"] == "connected"),
        "the client did not connect:\n{}\n{}",
        String::from_utf8_lossy(out),
        String::from_utf8_lossy(err)
    );
    lines
}

/// Runs the SDK client in the agent's cgroup; one JSON value per op.
pub(super) fn run_client(place: &Placement, url: &str, mode: &str, ops: &[&str]) -> Vec<Value> {
    let mut cmd = client_command(place, url, mode, ops);
    let out = cmd.output().expect("run the MCP client");
    let lines = parse_lines(&out.stdout, &out.stderr);
    assert_eq!(
        lines.len(),
        ops.len() + 1,
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    lines[1..].to_vec()
}

pub(super) fn text_of(r: &Value) -> String {
    r["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The rules on a tool and its arguments, on lists, on resources, and the
/// held credential, for one transport; `what` names it in failures.
fn check_rules(env: &Env, url: &str, mode: &str, what: &str) {
    let r = run_client(
        &env.place,
        url,
        mode,
        &[
            "list",
            r#"call:read_note:{"path":"public/readme"}"#,
            r#"call:read_note:{"path":"private/keys"}"#,
            r#"call:read_note:{"path":["private/keys"]}"#,
            r#"call:echo:{"text":"hi"}"#,
            "call:whoami:{}",
            "resources",
            "read:notes://public/readme",
            "read:notes://private/keys",
        ],
    );
    // tools/list: echo (no rule permits it) is left out; read_note (rules on
    // its declared argument) and delete_note (held) are listed.
    let tools: Vec<&str> = r[0]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: {:?}", r[0]))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        tools,
        ["read_note", "delete_note", "slow_count", "whoami", "ask"],
        "{what}"
    );
    assert_eq!(r[1]["isError"], false, "{what}: {:?}", r[1]);
    assert_eq!(text_of(&r[1]), "hello from the public notes", "{what}");
    // A denied argument: a tool error naming the rule; the server never ran it.
    assert_eq!(r[2]["isError"], true, "{what}: {:?}", r[2]);
    let t = text_of(&r[2]);
    assert!(
        t.contains("no-private") && t.contains("private notes are off limits"),
        "{what}: {t}"
    );
    assert!(!t.contains("card"), "{what}: {t}");
    // The declared String argument sent as an array is refused, not
    // decided without it.
    assert_eq!(r[3]["ok"], false, "{what}: {:?}", r[3]);
    assert!(
        r[3]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("must be a String"),
        "{what}: {:?}",
        r[3]
    );
    assert_eq!(r[4]["isError"], true, "{what}: {:?}", r[4]);
    assert!(
        text_of(&r[4]).contains("no rule permits mcp:call_tool"),
        "{what}"
    );
    // The server got the daemon's token; the agent sent none.
    assert_eq!(text_of(&r[5]), format!("Bearer {TOKEN}"), "{what}");
    let resources: Vec<&str> = r[6]["resources"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: {:?}", r[6]))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(resources, ["notes://public/readme"], "{what}");
    assert_eq!(r[7]["ok"], true, "{what}: {:?}", r[7]);
    assert_eq!(
        r[7]["contents"][0]["text"], "hello from the public notes",
        "{what}"
    );
    assert_eq!(r[8]["ok"], false, "{what}: {:?}", r[8]);
    assert!(
        r[8]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("portcullis denied mcp:read_resource"),
        "{what}: {:?}",
        r[8]
    );
}

/// The same rules whichever transport or revision the client picks: a rule
/// cannot be escaped by switching to another one.
#[test]
fn mcp_rules_hold_in_every_transport_and_revision() {
    let sse_answers = McpServer::start("streamable-http", &[]);
    let json_answers = McpServer::start("streamable-http", &["--json"]);
    let legacy = McpServer::start("sse", &[]);
    let env = env(
        "mcp-transports",
        &[sse_answers.port, json_answers.port, legacy.port],
    );
    for (server, mode, what) in [
        (&sse_answers, "auto", "stateless revision, SSE answers"),
        (&json_answers, "auto", "stateless revision, JSON answers"),
        (&sse_answers, "legacy", "sessions, SSE answers"),
        (&json_answers, "legacy", "sessions, JSON answers"),
    ] {
        let url = format!("http://127.0.0.1:{}/mcp", server.port);
        check_rules(&env, &url, mode, what);
    }
    let url = format!("http://127.0.0.1:{}/sse", legacy.port);
    check_rules(&env, &url, "sse", "HTTP+SSE");
    // Every call is audited with its method, tool and argument digest
    // before it is forwarded.
    let audit = audit_tail(&env.files);
    let calls: Vec<&Value> = audit
        .iter()
        .filter(|e| e["action"] == "mcp:call_tool")
        .collect();
    assert!(calls.len() >= 5 * 5, "{calls:?}");
    let denied = calls
        .iter()
        .find(|e| e["decision"] == "deny" && e["detail"]["tool"] == "read_note")
        .expect("a denied read_note");
    assert_eq!(denied["detail"]["method"], "tools/call");
    assert!(denied["detail"]["arguments_digest"]
        .as_str()
        .unwrap_or_default()
        .starts_with("sha256:"));
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "mcp:list" && e["decision"] == "allow"),
        "no mcp:list record"
    );
}

/// A held call waits for a human; the approval covers that identity, tool
/// and argument digest only; a denial answers in-protocol.
#[test]
fn mcp_held_calls_are_bound_to_their_arguments() {
    let server = McpServer::start("streamable-http", &[]);
    let env = env("mcp-holds", &[server.port]);
    let url = format!("http://127.0.0.1:{}/mcp", server.port);
    let spawn = |ops: &[&str]| {
        client_command(&env.place, &url, "auto", ops)
            .spawn()
            .expect("client")
    };
    // Approved for 10 minutes: a grant for this digest.
    let held = spawn(&[r#"call:delete_note:{"id":7}"#]);
    let pending = env.daemon.wait_pending(1);
    assert!(
        pending[0]["command"]
            .as_str()
            .unwrap_or_default()
            .contains("delete_note"),
        "{pending:?}"
    );
    let id = pending[0]["id"].as_str().unwrap().to_string();
    env.daemon.cli_ok(&["approve", &id, "--for", "10m"]);
    let out = held.wait_with_output().unwrap();
    let r = parse_lines(&out.stdout, &out.stderr);
    assert_eq!(text_of(&r[1]), "deleted 7", "{r:?}");
    // The same call again: covered by the grant, no hold.
    let r = run_client(&env.place, &url, "auto", &[r#"call:delete_note:{"id":7}"#]);
    assert_eq!(text_of(&r[0]), "deleted 7", "{r:?}");
    // Other arguments: held again (the agent, having sent a progress
    // token, is told so with the request id); denied, the agent reads why.
    let held = spawn(&[r#"callp:delete_note:{"id":8}"#]);
    let pending = env.daemon.wait_pending(1);
    let id = pending[0]["id"].as_str().unwrap().to_string();
    env.daemon
        .cli_ok(&["deny", &id, "--reason", "not that one"]);
    let out = held.wait_with_output().unwrap();
    let r = parse_lines(&out.stdout, &out.stderr);
    assert!(
        r.iter().any(
            |l| l["op"] == "progress" && l["message"].as_str().is_some_and(|m| m.contains(&id))
        ),
        "{r:?}"
    );
    let last = r.last().unwrap();
    assert_eq!(last["isError"], true, "{r:?}");
    let t = text_of(last);
    assert!(t.contains("not that one") && t.contains(&id), "{t}");
}

/// A changed tool definition (a rug pull) is audited and the tool held
/// until `portcullis mcp accept`; `portcullis mcp tools` shows both.
#[test]
fn mcp_changed_tool_definitions_are_held_until_accepted() {
    let port = free_port();
    let v1 = McpServer::start_on(port, "streamable-http", &[]);
    let env = env("mcp-rugpull", &[port]);
    let url = format!("http://127.0.0.1:{port}/mcp");
    let r = run_client(&env.place, &url, "auto", &["list"]);
    assert!(r[0]["tools"].to_string().contains("read_note"), "{r:?}");
    let known = env.daemon.json(&["mcp", "tools", "notes", "--json"]);
    let fp1 = known["tools"]["read_note"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    drop(v1);
    let _v2 = McpServer::start_on(port, "streamable-http", &["--tools-version", "2"]);
    let read = r#"call:read_note:{"path":"public/readme"}"#;
    let r = run_client(&env.place, &url, "auto", &["list", read]);
    assert!(!r[0]["tools"].to_string().contains("read_note"), "{r:?}");
    assert!(r[0]["tools"].to_string().contains("whoami"), "{r:?}");
    assert_eq!(r[1]["isError"], true, "{r:?}");
    assert!(
        text_of(&r[1]).contains("portcullis mcp accept notes read_note"),
        "{r:?}"
    );
    let known = env.daemon.json(&["mcp", "tools", "notes", "--json"]);
    let pending = &known["tools"]["read_note"]["pending"];
    assert!(
        pending["fingerprint"].as_str().is_some_and(|f| f != fp1),
        "{known}"
    );
    let audit = audit_tail(&env.files);
    let changed = audit
        .iter()
        .find(|e| e["type"] == "mcp_tool_changed")
        .unwrap_or_else(|| panic!("no mcp_tool_changed event"));
    assert_eq!(changed["detail"]["tool"], "read_note");
    let human = env.daemon.cli_ok(&["mcp", "tools", "notes"]);
    assert!(human.contains("CHANGED"), "{human}");
    env.daemon.cli_ok(&["mcp", "accept", "notes", "read_note"]);
    let r = run_client(&env.place, &url, "auto", &["list", read]);
    assert!(r[0]["tools"].to_string().contains("read_note"), "{r:?}");
    assert_eq!(text_of(&r[1]), "hello from the public notes", "{r:?}");
}

/// curl in the agent's cgroup, POSTing `body` (or `@file`); returns the
/// status and the body.
fn post(place: &Placement, url: &str, body: &str) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "30",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-H",
        "content-type: application/json",
        "-H",
        "accept: application/json, text/event-stream",
        "-H",
        "mcp-protocol-version: 2026-07-28",
        "--data-binary",
        body,
        url,
    ]);
    place.apply(&mut cmd);
    let out = run_ok(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Malformed JSON, an oversize body, a message of the wrong shape, an
/// unknown method, a batch: JSON-RPC errors, audited, the daemon unaffected.
#[test]
fn mcp_bad_input_gets_json_rpc_errors() {
    let server = McpServer::start("streamable-http", &["--json"]);
    let env = env("mcp-badinput", &[server.port]);
    let url = format!("http://127.0.0.1:{}/mcp", server.port);
    let (code, body) = post(&env.place, &url, "{not json");
    assert_eq!(code, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], -32700, "{v}");
    let big: PathBuf = env.files.dir.join("big.json");
    let filler = "x".repeat(5 * 1024 * 1024);
    fs::write(
        &big,
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"{filler}"}}}}}}"#),
    )
    .unwrap();
    let (code, body) = post(&env.place, &url, &format!("@{}", big.display()));
    assert_eq!(code, 413, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], -32700, "{v}");
    let _ = fs::remove_file(&big);
    let (_, body) = post(
        &env.place,
        &url,
        r#"{"jsonrpc":"1.0","id":5,"method":"tools/list"}"#,
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["id"].clone(), v["error"]["code"].clone()),
        (5.into(), (-32600).into()),
        "{v}"
    );
    let (_, body) = post(
        &env.place,
        &url,
        r#"{"jsonrpc":"2.0","id":6,"method":"tools/frobnicate"}"#,
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], -32601, "{v}");
    // A batch is decided element by element.
    let (_, body) = post(
        &env.place,
        &url,
        r#"[{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"a"}}},{"jsonrpc":"2.0","id":8,"method":"resources/read","params":{"uri":"notes://private/keys"}}]"#,
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    let arr = v.as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(arr.len(), 2, "{v}");
    assert_eq!(arr[0]["id"], 7);
    assert_eq!(arr[0]["result"]["isError"], true);
    assert_eq!(arr[1]["id"], 8);
    assert_eq!(arr[1]["error"]["code"], -32001);
    // The routing headers of the 2026-07-28 revision must say what the
    // body says.
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "30",
        "-H",
        "content-type: application/json",
        "-H",
        "mcp-method: tools/list",
        "--data-binary",
        r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"whoami"}}"#,
        &url,
    ]);
    env.place.apply(&mut cmd);
    let v: Value = serde_json::from_slice(&run_ok(&mut cmd).stdout).unwrap();
    assert_eq!(v["error"]["code"], -32600, "{v}");
    // A GET that is not an event stream reaches nothing.
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "30",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ]);
    env.place.apply(&mut cmd);
    assert_eq!(String::from_utf8_lossy(&run_ok(&mut cmd).stdout), "406");
    let refused = audit_tail(&env.files)
        .into_iter()
        .filter(|e| e["action"] == "mcp:invalid")
        .count();
    assert!(refused >= 6, "{refused}");
    // The daemon still serves.
    let r = run_client(&env.place, &url, "auto", &["call:whoami:{}"]);
    assert_eq!(text_of(&r[0]), format!("Bearer {TOKEN}"));
}

/// A request from the server to the agent (an elicitation, on a session's
/// stream or the HTTP+SSE stream) is denied unless a rule permits it: the
/// server gets a JSON-RPC error; once a rule permits it, it reaches the
/// agent's SDK and its answer reaches the server.
#[test]
fn mcp_server_requests_are_denied_unless_a_rule_permits_them() {
    let sessions = McpServer::start("streamable-http", &[]);
    let legacy = McpServer::start("sse", &[]);
    let env = env("mcp-server-requests", &[sessions.port, legacy.port]);
    let targets = [
        (format!("http://127.0.0.1:{}/mcp", sessions.port), "legacy"),
        (format!("http://127.0.0.1:{}/sse", legacy.port), "sse"),
    ];
    for (url, mode) in &targets {
        let r = run_client(&env.place, url, mode, &["call:ask:{}"]);
        let line = r[0].to_string();
        assert!(
            line.contains("portcullis denied mcp:server_request elicitation/create"),
            "{mode}: {line}"
        );
        assert!(!line.contains("answer: yes"), "{mode}: {line}");
    }
    fs::write(
        env.files.policies.join("elicit.cedar"),
        r#"@id("elicit")
permit(principal == Identity::"agent", action == Action::"mcp:server_request", resource == Resource::"notes")
  when { context.method == "elicitation/create" };
"#,
    )
    .unwrap();
    env.daemon.cli_ok(&["policy", "reload"]);
    for (url, mode) in &targets {
        let r = run_client(&env.place, url, mode, &["call:ask:{}"]);
        assert_eq!(text_of(&r[0]), "answer: yes", "{mode}: {r:?}");
    }
    let audit = audit_tail(&env.files);
    for decision in ["deny", "allow"] {
        assert!(
            audit.iter().any(|e| e["action"] == "mcp:server_request"
                && e["decision"] == decision
                && e["detail"]["method"] == "elicitation/create"),
            "no {decision} of mcp:server_request"
        );
    }
}

/// Results are masked with the resource's detectors: tool text content,
/// `structuredContent` and resource reads, in JSON and SSE answers.
#[test]
fn mcp_results_are_masked() {
    let sse_answers = McpServer::start("streamable-http", &[]);
    let json_answers = McpServer::start("streamable-http", &["--json"]);
    let env = env("mcp-masking", &[sse_answers.port, json_answers.port]);
    fs::write(
        env.files.policies.join("mask.toml"),
        "[[mask]]\nresource = \"notes\"\ndetectors = [\"credit_card\", \"email\"]\n",
    )
    .unwrap();
    fs::write(
        env.files.policies.join("echo.cedar"),
        r#"permit(principal == Identity::"agent", action == Action::"mcp:call_tool", resource == Resource::"notes") when { context.tool == "echo" };
permit(principal == Identity::"agent", action == Action::"mcp:read_resource", resource == Resource::"notes") when { context.uri == "notes://private/keys" };
"#,
    )
    .unwrap();
    env.daemon.cli_ok(&["policy", "reload"]);
    for (server, mode) in [(&sse_answers, "auto"), (&json_answers, "legacy")] {
        let url = format!("http://127.0.0.1:{}/mcp", server.port);
        let r = run_client(
            &env.place,
            &url,
            mode,
            &[
                r#"call:echo:{"text":"pay 4111 1111 1111 1111, mail alice@example.com"}"#,
                "read:notes://private/keys",
            ],
        );
        // What came back (the op names echo the arguments sent).
        let answers: Vec<Value> = r
            .iter()
            .map(|v| {
                let mut v = v.clone();
                v.as_object_mut().map(|o| o.remove("op"));
                v
            })
            .collect();
        let all = format!("{answers:?}");
        assert!(!all.contains("4111 1111 1111 1111"), "{mode}: {all}");
        assert!(!all.contains("alice@example.com"), "{mode}: {all}");
        assert!(text_of(&r[0]).starts_with("pay "), "{mode}: {all}");
        assert!(
            r[0]["structuredContent"]["result"]
                .as_str()
                .is_some_and(|t| t.starts_with("pay ") && !t.contains("alice@")),
            "{mode}: {all}"
        );
        assert!(
            r[1]["contents"][0]["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("card ")),
            "{mode}: {all}"
        );
    }
    let audit = audit_tail(&env.files);
    assert!(
        audit.iter().any(|e| e["type"] == "mcp_result_masked"
            && e["detail"]["masked"]["email"].as_u64() >= Some(1)),
        "no mcp_result_masked record with an email count"
    );
}
