//! `cargo xtask bench mcp`: MCP tool calls per second and the latency each
//! call gains through Portcullis, against the reference server
//! `@modelcontextprotocol/server-everything` (Streamable HTTP, SSE answers),
//! direct and through Portcullis (the client in a tagged cgroup; identity
//! proof, Cedar decision on the tool and its typed argument, audit records
//! before and after each call, masking of each answer on), in one run, with
//! the same client (`xtask/mcp_bench_client.py`: raw JSON-RPC over one
//! keep-alive connection). Also the delay of a streamed answer's first
//! event. Ends with PASS/MISS against the target: under 1 ms added at p50.

use std::{
    fs,
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    ci,
    session::{run_in_cgroup, Session, SessionConfig},
    util::{
        catch_interrupts, describe, output_with_timeout, repo_root, require_root, step, ChildGuard,
    },
};

/// Names the bench's cgroup root, pin dir and work dir.
const NAME: &str = "portcullis-bench-mcp";
/// The port the bench daemon's proxy listens on (below the ephemeral
/// range, like the other benches' fixed ports).
const LISTEN_PORT: u16 = 15004;
/// Where `cargo xtask setup` installs the server (see `setup.rs`).
const SERVER_JS: &str = "/opt/portcullis-test/mcp-everything/node_modules/@modelcontextprotocol/server-everything/dist/index.js";
/// The target: what Portcullis may add to a call's p50.
const TARGET_ADDED_P50_MS: f64 = 1.0;
/// Streamed calls timed per path (each takes about 200 ms).
const STREAMS: u64 = 20;

/// One client run.
#[derive(Debug, Clone, Copy)]
struct Run {
    calls: u64,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    first_event_p50_ms: f64,
    /// Whether the answers' e-mail addresses came back masked.
    masked: bool,
}

impl Run {
    fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.calls as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Runs the benchmark: up to `calls` sequential tool calls per path,
/// bounded by `seconds`. `binary` replaces the release build.
pub fn mcp(calls: u64, seconds: u64, binary: Option<PathBuf>) -> Result<()> {
    require_root()?;
    if !Path::new(SERVER_JS).is_file() {
        bail!("{SERVER_JS} is missing: run `cargo xtask setup`");
    }
    let bin = ci::daemon_binary(binary)?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut server = Command::new("node");
    server
        .args([SERVER_JS, "streamableHttp"])
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _server = ChildGuard(server.spawn().context("cannot start node")?);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() >= deadline {
            bail!("the MCP server did not listen on 127.0.0.1:{port}");
        }
        thread::sleep(Duration::from_millis(100));
    }
    step(&format!("server-everything on 127.0.0.1:{port}"));

    let work = PathBuf::from("/tmp").join(NAME);
    let policies = work.join("policies");
    if policies.exists() {
        fs::remove_dir_all(&policies)
            .with_context(|| format!("cannot clear {}", policies.display()))?;
    }
    fs::create_dir_all(&policies)
        .with_context(|| format!("cannot create {}", policies.display()))?;
    let demo = repo_root().join("policies").join("demo");
    let policy = format!(
        "[resource.bench-mcp]\nprotocol = \"mcp\"\nmatch = [\"127.0.0.1:{port}\"]\ntls = \"none\"\ntools = {{ echo = {{ message = \"String\" }} }}\n\n\
         [[mask]]\nresource = \"bench-mcp\"\ndetectors = [\"email\"]\n\n\
         [issuer.demo]\nurl = \"https://issuer.portcullis.demo\"\njwks_file = {:?}\naudience = \"portcullis\"\n\n\
         [identity.bench-agent]\nissuer = \"demo\"\nsubject = \"system:serviceaccount:agents:demo\"\n",
        demo.join("jwks.json").display().to_string()
    );
    fs::write(policies.join("bench.toml"), policy).context("cannot write bench.toml")?;
    fs::write(
        policies.join("bench.cedar"),
        "@id(\"bench-echo\")\npermit(principal == Identity::\"bench-agent\", action == Action::\"mcp:call_tool\", resource == Resource::\"bench-mcp\")\n  when { context.tool == \"echo\" || context.tool == \"trigger-long-running-operation\" };\n\
         @id(\"bench-no-rm\")\nforbid(principal, action == Action::\"mcp:call_tool\", resource == Resource::\"bench-mcp\")\n  when { context.arguments has message && context.arguments.message like \"*rm -rf*\" };\n",
    )
    .context("cannot write bench.cedar")?;

    catch_interrupts();
    let mut session = Session::start(
        &bin,
        &SessionConfig {
            name: NAME,
            policies,
            listen_port: LISTEN_PORT,
            workers: None,
        },
    )?;
    session.tag_agent("bench-agent", Some(&demo.join("agent.token")))?;

    let url = format!("http://127.0.0.1:{port}/mcp");
    let direct = client(&session, &url, calls, seconds, false)?;
    print_run("direct", &direct);
    let through = client(&session, &url, calls, seconds, true);
    let through = match through {
        Ok(r) => r,
        Err(e) => {
            eprintln!("daemon log ends with:\n{}", session.log_tail(20));
            return Err(e);
        }
    };
    print_run("portcullis", &through);
    // Masking was on the measured path.
    if !through.masked || direct.masked {
        bail!("the answers were not masked through Portcullis (or were masked directly)");
    }

    let added_p50 = through.p50_ms - direct.p50_ms;
    println!();
    println!("MCP tool calls (echo, sequential, one connection; {STREAMS} streamed calls for the first event)");
    println!(
        "{:<12} {:>10} {:>10} {:>10} {:>16}",
        "path", "calls/s", "p50 ms", "p99 ms", "first event ms"
    );
    for (label, r) in [("direct", &direct), ("portcullis", &through)] {
        println!(
            "{label:<12} {:>10.0} {:>10.3} {:>10.3} {:>16.3}",
            r.rate(),
            r.p50_ms,
            r.p99_ms,
            r.first_event_p50_ms
        );
    }
    println!(
        "added: p50 {:+.3} ms per call, first event {:+.3} ms, rate {:.2}x direct",
        added_p50,
        through.first_event_p50_ms - direct.first_event_p50_ms,
        if direct.rate() > 0.0 {
            through.rate() / direct.rate()
        } else {
            0.0
        }
    );
    println!(
        "target: added p50 < {TARGET_ADDED_P50_MS} ms: {} ({added_p50:.3} ms)",
        if added_p50 < TARGET_ADDED_P50_MS {
            "PASS"
        } else {
            "MISS"
        }
    );
    Ok(())
}

fn print_run(label: &str, r: &Run) {
    println!(
        "    {label}: {} calls in {:.1} s ({:.0}/s), p50 {:.3} ms, p99 {:.3} ms, first event p50 {:.3} ms",
        r.calls,
        r.seconds,
        r.rate(),
        r.p50_ms,
        r.p99_ms,
        r.first_event_p50_ms
    );
}

/// Runs the client, in the tagged cgroup when `through`.
fn client(session: &Session, url: &str, calls: u64, seconds: u64, through: bool) -> Result<Run> {
    let script = repo_root().join("xtask/mcp_bench_client.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .arg(url)
        .arg(calls.to_string())
        .arg(STREAMS.to_string())
        .arg(seconds.to_string());
    step(&format!(
        "{} {}",
        if through {
            "through Portcullis:"
        } else {
            "direct:"
        },
        describe(&cmd)
    ));
    if through {
        run_in_cgroup(&mut cmd, session.agent_procs_file()?);
    }
    let out = output_with_timeout(&mut cmd, Duration::from_secs(seconds + 120))?;
    if !out.status.success() {
        bail!(
            "the bench client failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "bench client output: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok(Run {
        calls: v["calls"].as_u64().unwrap_or(0),
        seconds: f("seconds"),
        p50_ms: f("p50_ms"),
        p99_ms: f("p99_ms"),
        first_event_p50_ms: f("first_event_p50_ms"),
        masked: v["masked"] == true,
    })
}
