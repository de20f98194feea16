//! The MCP act of `cargo xtask demo`: the tagged agent's MCP client (the
//! official Python SDK) calls tools of the reference TypeScript server
//! `@modelcontextprotocol/server-everything` through Portcullis: the tools
//! list comes back filtered, an allowed call goes through, a call with a
//! forbidden argument is refused in-protocol, an e-mail in a result is
//! masked, and a held call is approved by the demo.
//!
//! Owns the demo's MCP server process (on [`MCP_PORT`], which
//! `policies/demo.toml`'s `tools-mcp` names) and the act's story. Both
//! peers come from `cargo xtask setup`; without them the act is skipped
//! with a note.

use std::{
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    session::{print_indented, run_in_cgroup, Session},
    util::{output_with_timeout, repo_root, step, ChildGuard},
};

/// The port `policies/demo.toml`'s `tools-mcp` matches.
pub const MCP_PORT: u16 = 55433;
/// Where `cargo xtask setup` installs the server (see `setup.rs`).
const SERVER_JS: &str = "/opt/portcullis-test/mcp-everything/node_modules/@modelcontextprotocol/server-everything/dist/index.js";
/// The venv with the official MCP Python SDK (see `setup.rs`).
const PYTHON: &str = "/opt/portcullis-test/mcp-venv/bin/python";
/// How long the demo waits before approving the held call itself.
const APPROVE_AFTER: Duration = Duration::from_secs(3);
/// How long one client run may take (a held call included).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the act as `identity` (the demo agent's tagged cgroup).
pub fn act(session: &Session, identity: &str) -> Result<()> {
    if !Path::new(SERVER_JS).is_file() || !Path::new(PYTHON).is_file() {
        println!("    (MCP act skipped: run `cargo xtask setup` for the MCP server and SDK)");
        return Ok(());
    }
    let mut server = Command::new("node");
    server
        .args([SERVER_JS, "streamableHttp"])
        .env("PORT", MCP_PORT.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _server = ChildGuard(server.spawn().context("cannot start node")?);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", MCP_PORT)).is_err() {
        if Instant::now() >= deadline {
            bail!("the MCP server did not listen on 127.0.0.1:{MCP_PORT}");
        }
        thread::sleep(Duration::from_millis(100));
    }
    step(&format!(
        "MCP: the agent's MCP client (official Python SDK) calls tools of the reference server `server-everything` on 127.0.0.1:{MCP_PORT} (resource tools-mcp)"
    ));
    let url = format!("http://127.0.0.1:{MCP_PORT}/mcp");
    let ops = [
        "list",
        r#"call:echo:{"message":"hello from the agent"}"#,
        r#"call:echo:{"message":"please rm -rf /srv"}"#,
        r#"call:echo:{"message":"contact alice@example.com"}"#,
    ];
    let lines = client(session, &url, &ops)?;
    for (op, r) in ops.iter().zip(lines.iter().skip(1)) {
        println!("    {}", describe_op(op));
        println!("      -> {}", describe_result(r));
    }
    // A held call: the agent waits while a human decides.
    let held_op = r#"call:get-sum:{"a":20,"b":22}"#;
    println!("    {}", describe_op(held_op));
    let mut cmd = client_command(session, &url, &[held_op])?;
    let child = ChildGuard(cmd.spawn().context("cannot start the MCP client")?);
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let id = loop {
        if let Some(id) = pending(session, identity)? {
            break id;
        }
        if Instant::now() >= deadline {
            bail!("the get-sum call was not held for approval");
        }
        thread::sleep(Duration::from_millis(200));
    };
    step("the tool call is held: `portcullis requests` shows the exact call");
    print_indented(&session.client_output(&["requests"])?);
    thread::sleep(APPROVE_AFTER);
    step(&format!(
        "portcullis approve {id} --as demo-reviewer --reason \"sums are fine\""
    ));
    print_indented(&session.client_output(&[
        "approve",
        &id,
        "--as",
        "demo-reviewer",
        "--reason",
        "sums are fine",
    ])?);
    let out = wait_output(child)?;
    let r = parse(&out)?;
    println!(
        "      -> {}",
        describe_result(r.get(1).unwrap_or(&Value::Null))
    );
    Ok(())
}

fn client_command(session: &Session, url: &str, ops: &[&str]) -> Result<Command> {
    let script = repo_root().join("tests/e2e/mcp_client.py");
    let mut cmd = Command::new(PYTHON);
    cmd.arg(script)
        .arg(url)
        .arg("auto")
        .args(ops)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_in_cgroup(&mut cmd, session.agent_procs_file()?);
    Ok(cmd)
}

fn client(session: &Session, url: &str, ops: &[&str]) -> Result<Vec<Value>> {
    let mut cmd = client_command(session, url, ops)?;
    let out = output_with_timeout(&mut cmd, CLIENT_TIMEOUT)?;
    let lines = parse(&out)?;
    if lines.len() != ops.len() + 1 {
        bail!(
            "the MCP client answered {} of {} operations: {}",
            lines.len().saturating_sub(1),
            ops.len(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(lines)
}

fn wait_output(mut child: ChildGuard) -> Result<std::process::Output> {
    match crate::util::wait_with_timeout(&mut child.0, CLIENT_TIMEOUT)? {
        Some(_) => {}
        None => bail!("the held MCP call did not finish within {CLIENT_TIMEOUT:?}"),
    }
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    use std::io::Read as _;
    if let Some(mut o) = child.0.stdout.take() {
        o.read_to_end(&mut stdout)?;
    }
    if let Some(mut e) = child.0.stderr.take() {
        e.read_to_end(&mut stderr)?;
    }
    Ok(std::process::Output {
        status: child.0.wait()?,
        stdout,
        stderr,
    })
}

/// The client's JSON lines; the first says it connected.
fn parse(out: &std::process::Output) -> Result<Vec<Value>> {
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if lines.first().is_none_or(|l| l["op"] != "connected") {
        bail!(
            "the MCP client did not connect: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(lines)
}

/// The demo agent's pending access request for the MCP resource.
fn pending(session: &Session, identity: &str) -> Result<Option<String>> {
    let text = session.client_output(&["requests", "--json"])?;
    let data: Value = serde_json::from_str(&text).context("`requests --json` printed no JSON")?;
    Ok(data["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| {
            r["status"] == "pending" && r["identity"] == identity && r["resource"] == "tools-mcp"
        })
        .and_then(|r| r["id"].as_str().map(str::to_string)))
}

fn describe_op(op: &str) -> String {
    match op.split_once(':') {
        Some(("call", rest)) => {
            let (tool, args) = rest.split_once(':').unwrap_or((rest, "{}"));
            format!("agent> tools/call {tool} {args}")
        }
        _ => "agent> tools/list".to_string(),
    }
}

fn describe_result(r: &Value) -> String {
    if let Some(tools) = r["tools"].as_array() {
        let names: Vec<&str> = tools.iter().filter_map(Value::as_str).collect();
        return format!(
            "{} tools listed (the server's others are hidden): {}",
            names.len(),
            names.join(", ")
        );
    }
    let text = r["content"][0]["text"].as_str().unwrap_or_default();
    if r["isError"] == true {
        format!("refused (tool error): {text}")
    } else if r["ok"] == false {
        format!("error: {}", r["error"].as_str().unwrap_or_default())
    } else {
        format!("{text:?}")
    }
}
