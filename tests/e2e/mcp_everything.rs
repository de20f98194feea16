//! MCP with a second real peer nobody here wrote: the reference TypeScript
//! server `@modelcontextprotocol/server-everything` from npm in its
//! Streamable HTTP mode (sessions with initialize, SSE answers), installed
//! by `cargo xtask setup` under [`EVERYTHING_DIR`], with the official Python
//! SDK's client (`tests/e2e/mcp_client.py`) in the tagged cgroup. Also the
//! JSON Lines recording of the exchange and its replay, and the masking
//! counts of each call's `command_end`.

use std::{
    fs,
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use super::{
    harness::*,
    mcp::{client_command, parse_lines, run_client, text_of},
};

/// Where `cargo xtask setup` installs the npm package.
pub const EVERYTHING_DIR: &str = "/opt/portcullis-test/mcp-everything";

/// The tools the server offers (its own `tools/list`, before any filter):
/// the tests name these.
const ECHO: &str = "echo";
const SUM: &str = "get-sum";

const RULES: &str = r#"
@id("lists")
permit(principal == Identity::"agent", action == Action::"mcp:list", resource == Resource::"everything");
@id("echo")
permit(principal == Identity::"agent", action == Action::"mcp:call_tool", resource == Resource::"everything")
  when { context.tool == "echo" };
@id("no-rm")
@reason("destructive commands are not echoed")
forbid(principal, action == Action::"mcp:call_tool", resource == Resource::"everything")
  when { context.arguments has message && context.arguments.message like "*rm -rf*" };
@id("sums-need-approval")
@approval("required")
permit(principal == Identity::"agent", action == Action::"mcp:call_tool", resource == Resource::"everything")
  when { context.tool == "get-sum" };
"#;

/// `mcp-server-everything streamableHttp` on a free loopback port.
struct Everything {
    child: Child,
    port: u16,
}

impl Everything {
    fn start() -> Self {
        let script = Path::new(EVERYTHING_DIR)
            .join("node_modules/@modelcontextprotocol/server-everything/dist/index.js");
        assert!(
            script.is_file(),
            "{} is missing: run cargo xtask setup",
            script.display()
        );
        let port = free_port();
        let child = Command::new("node")
            .arg(script)
            .arg("streamableHttp")
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mcp-server-everything");
        wait_until(
            Duration::from_secs(30),
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "mcp-server-everything listening",
        );
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }
}

impl Drop for Everything {
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

/// A daemon with the mcp resource `everything` (arguments of `echo`
/// declared, emails masked, `record`), the rules above, the agent tagged.
fn env(name: &str, port: u16, record: &str) -> Env {
    require_root();
    let cg = TestCgroup::new(name);
    let files = DaemonFiles::new(&cg.rel);
    files.identities(IDENTITIES);
    files.rules("rules.cedar", RULES);
    fs::write(
        files.policies.join("everything.toml"),
        format!(
            "[resource.everything]\nprotocol = \"mcp\"\nmatch = [\"127.0.0.1:{port}\"]\ntls = \"none\"\nrecord = \"{record}\"\napproval_timeout = \"30s\"\ntools = {{ echo = {{ message = \"String\" }} }}\n\n[[mask]]\nresource = \"everything\"\ndetectors = [\"email\"]\n"
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

/// The session (agent connection) whose audited `tools/call` of `tool`
/// has `needle` in its command text.
fn session_of_call(files: &DaemonFiles, tool: &str, needle: &str) -> String {
    audit_tail(files)
        .iter()
        .find(|e| {
            e["action"] == "mcp:call_tool"
                && e["type"] == "command"
                && e["detail"]["tool"] == tool
                && e["detail"]["command"]
                    .as_str()
                    .is_some_and(|c| c.contains(needle))
        })
        .and_then(|e| e["session"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no audited call of {tool} with {needle}"))
}

/// `portcullis replay` of `session` once its recording holds `needle`
/// (the writer flushes every 500 ms).
fn replay_containing(env: &Env, session: &str, needle: &str) -> String {
    let mut out = String::new();
    wait_until(
        Duration::from_secs(20),
        || {
            let o = env.daemon.cli(&["replay", session, "--speed", "0"]);
            out = String::from_utf8_lossy(&o.stdout).into_owned();
            out.contains(needle)
        },
        "the recording to hold the call",
    );
    out
}

/// Allowed, denied by an argument rule, held and approved, masked, and the
/// tools list filtered, with the TypeScript reference server.
#[test]
fn mcp_everything_server_behind_portcullis() {
    let server = Everything::start();
    let url = server.url();
    let env = env("mcp-everything", server.port, "full");
    let r = run_client(
        &env.place,
        &url,
        "auto",
        &[
            "list",
            r#"call:echo:{"message":"hello"}"#,
            r#"call:echo:{"message":"please rm -rf /"}"#,
            r#"call:echo:{"message":"mail carol@example.com"}"#,
            "call:get-env:{}",
        ],
    );
    // Only what a rule permits or holds is listed: echo and get-sum, out
    // of the server's dozen tools.
    let tools: Vec<&str> = r[0]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{:?}", r[0]))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(tools, [ECHO, SUM], "{:?}", r[0]);
    assert_eq!(r[1]["isError"], false, "{:?}", r[1]);
    assert_eq!(text_of(&r[1]), "Echo: hello");
    assert_eq!(r[2]["isError"], true, "{:?}", r[2]);
    let t = text_of(&r[2]);
    assert!(
        t.contains("no-rm") && t.contains("destructive commands are not echoed"),
        "{t}"
    );
    let masked = text_of(&r[3]);
    assert!(masked.starts_with("Echo: mail "), "{masked}");
    assert!(!masked.contains("carol@example.com"), "{masked}");
    assert_eq!(r[4]["isError"], true, "{:?}", r[4]);
    assert!(
        text_of(&r[4]).contains("no rule permits mcp:call_tool"),
        "{:?}",
        r[4]
    );
    // A held call waits; approved, the server's answer comes back.
    let held = client_command(&env.place, &url, "auto", &[r#"call:get-sum:{"a":2,"b":3}"#])
        .spawn()
        .expect("client");
    let pending = env.daemon.wait_pending(1);
    assert!(
        pending[0]["command"]
            .as_str()
            .unwrap_or_default()
            .contains("get-sum"),
        "{pending:?}"
    );
    let id = pending[0]["id"].as_str().unwrap().to_string();
    env.daemon.cli_ok(&["approve", &id]);
    let out = held.wait_with_output().unwrap();
    let r = parse_lines(&out.stdout, &out.stderr);
    assert_eq!(text_of(&r[1]), "The sum of 2 and 3 is 5.", "{r:?}");
    // The masked call's completion record counts what was masked, per
    // detector, before the answer was relayed.
    let audit = audit_tail(&env.files);
    let masked_call = audit
        .iter()
        .find(|e| {
            e["action"] == "mcp:call_tool"
                && e["type"] == "command"
                && e["command"]
                    .as_str()
                    .or(e["detail"]["command"].as_str())
                    .is_some_and(|c| c.contains("mail carol"))
        })
        .unwrap_or_else(|| panic!("no audited masked call"));
    let seq = masked_call["seq"].clone();
    let end = audit
        .iter()
        .find(|e| e["type"] == "command_end" && e["detail"]["command_seq"] == seq)
        .unwrap_or_else(|| panic!("no command_end for call {seq}"));
    assert_eq!(end["detail"]["masked"]["email"], 1, "{end}");
    assert_eq!(end["detail"]["status"], 200, "{end}");
    // An unmasked call's end has no counts.
    let plain = audit
        .iter()
        .filter(|e| e["type"] == "command_end" && e["action"] == "mcp:call_tool")
        .filter(|e| e["detail"]["masked"].is_null())
        .count();
    assert!(plain >= 2, "{audit:?}");
}

/// `record = "full"`: `mcp.jsonl` holds the exchange as relayed and
/// `portcullis replay` shows the call, the decision and the masked result
/// (never the unmasked one).
#[test]
fn mcp_recording_full_replays_calls_and_masked_results() {
    let server = Everything::start();
    let env = env("mcp-record-full", server.port, "full");
    let r = run_client(
        &env.place,
        &server.url(),
        "auto",
        &[
            r#"call:echo:{"message":"mail dave@example.com"}"#,
            r#"call:echo:{"message":"please rm -rf /"}"#,
        ],
    );
    assert!(!text_of(&r[0]).contains("dave@example.com"), "{r:?}");
    let denied = session_of_call(&env.files, ECHO, "rm -rf");
    let replay = replay_containing(&env, &denied, "deny (rule no-rm)");
    assert!(replay.contains("please rm -rf /"), "{replay}");
    let session = session_of_call(&env.files, ECHO, "dave");
    let replay = replay_containing(&env, &session, "Echo: mail ");
    assert!(replay.contains("mcp messages"), "{replay}");
    assert!(replay.contains("tools/call"), "{replay}");
    assert!(replay.contains("tool echo"), "{replay}");
    assert!(
        replay.contains("mail dave@example.com"),
        "the call: {replay}"
    );
    // The answer as the agent saw it: masked.
    assert!(!replay.contains("Echo: mail dave@example.com"), "{replay}");
    let file = env
        .files
        .state
        .join("sessions")
        .join(&session)
        .join("mcp.jsonl");
    let lines: Vec<Value> = fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let call = lines
        .iter()
        .find(|l| l["from"] == "agent" && l["tool"] == "echo" && l["decision"] == "allow")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(call["method"], "tools/call");
    assert_eq!(call["rule"], "echo");
    assert!(call["t_ms"].is_u64());
    let answer = lines
        .iter()
        .find(|l| l["from"] == "server" && l["id"] == call["id"] && l["tool"] == "echo")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(answer["tool"], "echo");
    let text = answer["message"]["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(
        text.starts_with("Echo: mail ") && !text.contains("dave@"),
        "{answer}"
    );
}

/// `record = "metadata"`: argument names and digests, no argument values
/// and no result bodies.
#[test]
fn mcp_recording_metadata_holds_no_argument_values() {
    let server = Everything::start();
    let env = env("mcp-record-meta", server.port, "metadata");
    let secret = "zebra-7781-quartz";
    let r = run_client(
        &env.place,
        &server.url(),
        "auto",
        &[&format!(r#"call:echo:{{"message":"{secret}"}}"#)],
    );
    assert_eq!(text_of(&r[0]), format!("Echo: {secret}"));
    let session = session_of_call(&env.files, ECHO, secret);
    let replay = replay_containing(&env, &session, "arguments_digest");
    assert!(replay.contains("tool echo"), "{replay}");
    assert!(replay.contains("argument_names"), "{replay}");
    let dir = env.files.state.join("sessions").join(&session);
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = String::from_utf8_lossy(&fs::read(&path).unwrap()).into_owned();
        assert!(
            !text.contains(secret),
            "{} holds the argument",
            path.display()
        );
    }
    assert!(!replay.contains(secret), "{replay}");
    let digest = audit_tail(&env.files)
        .iter()
        .find(|e| e["action"] == "mcp:call_tool" && e["type"] == "command")
        .and_then(|e| e["detail"]["arguments_digest"].as_str().map(str::to_string))
        .unwrap();
    assert!(replay.contains(&digest), "{replay}");
}

/// `tls = "intercept"`: the agent speaks HTTPS to the server's own address
/// and trusts the daemon CA (which mints the leaf); the daemon verifies the
/// server against its CA and injects the held token. Rules, masking and
/// lists apply inside the TLS as in plain text.
#[test]
fn mcp_tls_intercept_with_the_sdk_server() {
    require_root();
    let cg = TestCgroup::new("mcp-intercept");
    let files = DaemonFiles::new(&cg.rel);
    let pki = TestPki::new(&files.dir.join("pki"));
    let port = free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/mcp_server.py");
    let mut server = Command::new(super::mcp::MCP_PYTHON)
        .arg(script)
        .arg(port.to_string())
        .args(["streamable-http", "--tls"])
        .arg(&pki.cert)
        .arg(&pki.key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the MCP server");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(&mut server);
    wait_until(
        Duration::from_secs(30),
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "the MCP server listening",
    );
    files.identities(IDENTITIES);
    files.rules(
        "rules.cedar",
        r#"
permit(principal == Identity::"agent", action == Action::"mcp:list", resource == Resource::"notes");
@id("whoami")
permit(principal == Identity::"agent", action == Action::"mcp:call_tool", resource == Resource::"notes")
  when { context.tool == "whoami" || context.tool == "echo" };
@id("no-private")
@reason("private notes are off limits")
forbid(principal, action == Action::"mcp:call_tool", resource == Resource::"notes")
  when { context.arguments has path && context.arguments.path like "private/*" };
permit(principal == Identity::"agent", action == Action::"mcp:call_tool", resource == Resource::"notes")
  when { context.tool == "read_note" };
"#,
    );
    let token = files.dir.join("notes.token");
    fs::write(&token, "tls-held-token").unwrap();
    fs::write(
        files.policies.join("notes.toml"),
        format!(
            "[resource.notes]\nprotocol = \"mcp\"\nmatch = [\"127.0.0.1:{port}\"]\ntls = \"intercept\"\nupstream_ca_file = {:?}\ncredentials = {{ bearer_token_file = {:?} }}\ntools = {{ read_note = {{ path = \"String\" }} }}\n\n[[mask]]\nresource = \"notes\"\ndetectors = [\"email\"]\n",
            pki.ca.display().to_string(),
            token.display().to_string()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let place = Placement::cgroup(cg.dir(&agent));
    let ca = daemon.status()["ca_cert"]
        .as_str()
        .expect("ca_cert in status")
        .to_string();
    let url = format!("https://127.0.0.1:{port}/mcp");
    for mode in ["auto", "legacy"] {
        let mut cmd = client_command(
            &place,
            &url,
            mode,
            &[
                "list",
                "call:whoami:{}",
                r#"call:read_note:{"path":"private/keys"}"#,
                r#"call:echo:{"text":"mail erin@example.com"}"#,
            ],
        );
        cmd.env("SSL_CERT_FILE", &ca);
        let out = cmd.output().expect("client");
        let r = parse_lines(&out.stdout, &out.stderr);
        assert_eq!(r.len(), 5, "{mode}: {r:?}");
        let tools = r[1]["tools"].to_string();
        assert!(
            tools.contains("whoami")
                && tools.contains("read_note")
                && !tools.contains("delete_note"),
            "{mode}: {tools}"
        );
        assert_eq!(text_of(&r[2]), "Bearer tls-held-token", "{mode}: {r:?}");
        assert_eq!(r[3]["isError"], true, "{mode}: {r:?}");
        assert!(text_of(&r[3]).contains("no-private"), "{mode}: {r:?}");
        let echoed = text_of(&r[4]);
        assert!(
            echoed.starts_with("mail ") && !echoed.contains("erin@"),
            "{mode}: {echoed}"
        );
    }
    // Without the daemon CA the agent's TLS fails: the leaf is the
    // daemon's, not the server's.
    let mut cmd = client_command(&place, &url, "auto", &["list"]);
    cmd.env("SSL_CERT_FILE", &pki.ca);
    let out = cmd.output().expect("client");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("\"connected\""),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
