//! `cargo xtask bench tcp`: connection setup rate, bulk throughput and
//! round-trip latency, each measured directly and through Portcullis (the
//! client in a tagged cgroup), in one run, with ratios.
//!
//! `cargo xtask bench policy` and `cargo xtask bench audit` run the
//! library-level benchmarks in `gateway-user/examples/` (`policy_bench.rs`,
//! `audit_bench.rs`) in release; each prints its own table (or JSON).

use std::{
    env, fs,
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    bench_client::{MAX_FRAME, MODE_ECHO, MODE_IDENTIFY, MODE_SINK},
    ci,
    session::{run_in_cgroup, Session, SessionConfig},
    util::{catch_interrupts, describe, interrupted, output_with_timeout, require_root, step},
};

/// Names the bench's cgroup root, pin dir and work dir.
const NAME: &str = "portcullis-bench";
/// The port the bench daemon's proxy listens on.
const LISTEN_PORT: u16 = 15002;
/// Time bound of the connection-rate run.
const CONNECT_LIMIT_SECS: f64 = 20.0;
/// Time bound of the bulk run.
const BULK_LIMIT_SECS: f64 = 30.0;
/// Ping-pongs of the latency run.
const LATENCY_COUNT: u64 = 2000;
/// Time bound of the latency run.
const LATENCY_LIMIT_SECS: f64 = 20.0;
/// Extra time a client process gets beyond its own bound before it is killed.
const CLIENT_GRACE_SECS: u64 = 30;

/// Runs the TCP benchmark: `connections` sequential connections, `bytes`
/// bulk bytes. `binary` replaces the release build.
pub fn tcp(connections: u64, bytes: u64, binary: Option<PathBuf>) -> Result<()> {
    require_root()?;
    let bin = ci::daemon_binary(binary)?;
    let upstream = start_server()?;
    step(&format!("bench server listening on {upstream}"));

    let policies = PathBuf::from("/tmp").join(NAME).join("policies");
    if policies.exists() {
        fs::remove_dir_all(&policies)
            .with_context(|| format!("cannot clear {}", policies.display()))?;
    }
    fs::create_dir_all(&policies)
        .with_context(|| format!("cannot create {}", policies.display()))?;
    // The bench agent proves its identity with the demo issuer's token, and
    // one rule permits it: the measured path is the full one (identity
    // proof, Cedar decision, audit record before forwarding).
    let demo = crate::util::repo_root().join("policies").join("demo");
    let policy = format!(
        "[resource.bench-upstream]\nprotocol = \"tcp\"\nmatch = [\"{upstream}\"]\n\n\
         [issuer.demo]\nurl = \"https://issuer.portcullis.demo\"\njwks_file = {:?}\naudience = \"portcullis\"\n\n\
         [identity.bench-agent]\nissuer = \"demo\"\nsubject = \"system:serviceaccount:agents:demo\"\n",
        demo.join("jwks.json").display().to_string()
    );
    fs::write(policies.join("bench.toml"), policy).context("cannot write bench.toml")?;
    fs::write(
        policies.join("bench.cedar"),
        "@id(\"bench\")\npermit(principal == Identity::\"bench-agent\", action == Action::\"tcp:connect\", resource == Resource::\"bench-upstream\");\n",
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
    measure_all(&session, upstream, connections, bytes)
}

/// Runs the gateway-user benchmark example `name` in release with `args`.
/// Its stdout is passed through untouched (so `--json` output stays pure
/// JSON); the command line goes to stderr. No setup step: these benchmarks
/// need no root and no packages beyond the build's (`cargo xtask setup`).
pub fn example(name: &str, args: &[String]) -> Result<()> {
    let mut cmd = crate::util::cargo();
    cmd.args([
        "run",
        "--release",
        "-p",
        "gateway-user",
        "--example",
        name,
        "--",
    ])
    .args(args);
    eprintln!("==> {}", describe(&cmd));
    crate::util::run(&mut cmd).with_context(|| format!("benchmark `{name}` failed"))
}

/// The three measurements, direct and through, then the table.
fn measure_all(
    session: &Session,
    upstream: SocketAddr,
    connections: u64,
    bytes: u64,
) -> Result<()> {
    let runs = [
        ("connect", connections, 0, CONNECT_LIMIT_SECS),
        ("bulk", 0, bytes, BULK_LIMIT_SECS),
        ("latency", LATENCY_COUNT, 0, LATENCY_LIMIT_SECS),
    ];
    let mut results = Vec::new();
    for (mode, count, bytes, limit) in runs {
        let direct = measure(session, upstream, mode, count, bytes, limit, false);
        let through = measure(session, upstream, mode, count, bytes, limit, true);
        results.push((mode, direct, through));
        if interrupted() {
            bail!("interrupted");
        }
    }

    let failures: Vec<String> = results
        .iter()
        .flat_map(|(mode, direct, through)| {
            [("direct", direct), ("portcullis", through)]
                .into_iter()
                .filter_map(move |(path, r)| {
                    r.as_ref().err().map(|e| format!("{mode} {path}: {e:#}"))
                })
        })
        .collect();
    print_table(&results);
    if !failures.is_empty() {
        eprintln!("daemon log ends with:\n{}", session.log_tail(20));
        bail!("some measurements failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// Runs one `bench-client` (inside the tagged cgroup when `through`) and
/// returns its JSON result.
fn measure(
    session: &Session,
    upstream: SocketAddr,
    mode: &str,
    count: u64,
    bytes: u64,
    limit: f64,
    through: bool,
) -> Result<Value> {
    let exe = env::current_exe().context("cannot find the xtask binary")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "bench-client",
        "--addr",
        &upstream.to_string(),
        "--mode",
        mode,
    ])
    .args(["--count", &count.max(1).to_string()])
    .args(["--bytes", &bytes.max(1).to_string()])
    .args(["--time-limit", &limit.to_string()]);
    let path = if through {
        "through portcullis"
    } else {
        "direct"
    };
    step(&format!("{mode}, {path}: {}", describe(&cmd)));
    if through {
        run_in_cgroup(&mut cmd, session.agent_procs_file()?);
    }
    // Bounded by the client's own limits plus a grace period.
    let timeout = Duration::from_secs(limit.ceil() as u64 + CLIENT_GRACE_SECS);
    let out = output_with_timeout(&mut cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "bench-client failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let value: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("bench-client printed {text:?}, not JSON"))?;
    println!("    {value}");
    let intercepted = value.get("intercepted").and_then(Value::as_bool);
    if intercepted != Some(through) {
        bail!(
            "the connection was {}intercepted, expected {}",
            if intercepted == Some(true) {
                ""
            } else {
                "not "
            },
            if through {
                "interception"
            } else {
                "a direct connection"
            }
        );
    }
    Ok(value)
}

/// A number from a result, when the measurement succeeded.
fn field(result: &Result<Value>, key: &str) -> Option<f64> {
    result.as_ref().ok()?.get(key)?.as_f64()
}

/// Prints direct vs. through, with through/direct ratios.
fn print_table(results: &[(&str, Result<Value>, Result<Value>)]) {
    let rows: [(&str, &str, &str, f64); 4] = [
        ("connect", "per_second", "connection setup (conn/s)", 1.0),
        (
            "bulk",
            "bytes_per_second",
            "bulk throughput (MiB/s)",
            1.0 / (1024.0 * 1024.0),
        ),
        ("latency", "p50_us", "round trip p50 (us)", 1.0),
        ("latency", "p99_us", "round trip p99 (us)", 1.0),
    ];
    let cell = |v: Option<f64>| v.map_or_else(|| "failed".to_owned(), |v| format!("{v:.1}"));
    println!();
    println!(
        "{:<30} {:>14} {:>14} {:>16}",
        "TCP benchmark", "direct", "portcullis", "portcullis/direct"
    );
    for (mode, key, label, scale) in rows {
        let Some((_, direct, through)) = results.iter().find(|(m, _, _)| *m == mode) else {
            continue;
        };
        let d = field(direct, key).map(|v| v * scale);
        let t = field(through, key).map(|v| v * scale);
        let ratio = match (d, t) {
            (Some(d), Some(t)) if d > 0.0 => format!("{:.2}", t / d),
            _ => "-".to_owned(),
        };
        println!("{label:<30} {:>14} {:>14} {ratio:>16}", cell(d), cell(t));
    }
    for (mode, direct, through) in results {
        let amount = |r: &Result<Value>| match *mode {
            "connect" => field(r, "connections").map(|v| format!("{v} connections")),
            "bulk" => field(r, "bytes").map(|v| format!("{:.0} MiB", v / (1024.0 * 1024.0))),
            _ => field(r, "round_trips").map(|v| format!("{v} round trips")),
        };
        let secs = |r: &Result<Value>| {
            field(r, "seconds").map_or(String::new(), |s| format!(" in {s:.2} s"))
        };
        println!(
            "  {mode}: direct {}{}, portcullis {}{}",
            amount(direct).unwrap_or_else(|| "failed".into()),
            secs(direct),
            amount(through).unwrap_or_else(|| "failed".into()),
            secs(through)
        );
    }
    for line in verdicts(results) {
        println!("{line}");
    }
}

/// Connection setup rate through / direct, at least.
const TARGET_CONNECT_RATIO: f64 = 0.5;
/// Bulk throughput through / direct, at least.
const TARGET_BULK_RATIO: f64 = 0.9;
/// Round trip p50 added by the proxy, less than (microseconds).
const TARGET_ADDED_RTT_US: f64 = 15.0;

/// The PASS/MISS lines against the targets (DESIGN.md, "Performance
/// targets"); a failed measurement is a MISS.
fn verdicts(results: &[(&str, Result<Value>, Result<Value>)]) -> Vec<String> {
    let pair = |mode: &str, key: &str| {
        let (_, d, t) = results.iter().find(|(m, _, _)| *m == mode)?;
        Some((field(d, key)?, field(t, key)?))
    };
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let mut lines = Vec::new();
    for (mode, key, what, target) in [
        (
            "connect",
            "per_second",
            "connection setup",
            TARGET_CONNECT_RATIO,
        ),
        (
            "bulk",
            "bytes_per_second",
            "bulk throughput",
            TARGET_BULK_RATIO,
        ),
    ] {
        let ratio = pair(mode, key)
            .filter(|(d, _)| *d > 0.0)
            .map(|(d, t)| t / d);
        lines.push(format!(
            "{}: {what} {} of direct (target at least {target:.2})",
            verdict(ratio.is_some_and(|r| r >= target)),
            ratio.map_or_else(|| "failed".to_string(), |r| format!("{r:.2}"))
        ));
    }
    let added = pair("latency", "p50_us").map(|(d, t)| t - d);
    lines.push(format!(
        "{}: added round trip (p50) {} us (target under {TARGET_ADDED_RTT_US:.0} us)",
        verdict(added.is_some_and(|a| a < TARGET_ADDED_RTT_US)),
        added.map_or_else(|| "failed".to_string(), |a| format!("{a:.1}"))
    ));
    lines
}

/// Starts the bench server on an ephemeral loopback port.
fn start_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot listen on a loopback port")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                // Errors just end the connection; the client reports them.
                let _ = serve(stream);
            });
        }
    });
    Ok(addr)
}

/// Serves one bench connection (see the protocol in `bench_client.rs`).
fn serve(mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    stream.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    stream.read_exact(&mut mode)?;
    match mode[0] {
        MODE_ECHO => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                stream.write_all(&buf[..n])?;
            }
        }
        MODE_SINK => {
            let mut buf = vec![0u8; MAX_FRAME];
            let mut total = 0u64;
            loop {
                let mut header = [0u8; 4];
                stream.read_exact(&mut header)?;
                let len = u32::from_be_bytes(header) as usize;
                if len == 0 {
                    break;
                }
                if len > MAX_FRAME {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "frame too large",
                    ));
                }
                stream.read_exact(&mut buf[..len])?;
                total += len as u64;
            }
            stream.write_all(&total.to_be_bytes())
        }
        MODE_IDENTIFY => {
            let peer = stream.peer_addr()?;
            stream.write_all(peer.to_string().as_bytes())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_client::{bulk, connect_rate, identify, latency};

    #[test]
    fn verdicts_compare_with_the_targets() {
        let ok = |v: Value| -> Result<Value> { Ok(v) };
        let results = [
            (
                "connect",
                ok(serde_json::json!({"per_second": 1000.0})),
                ok(serde_json::json!({"per_second": 600.0})),
            ),
            (
                "bulk",
                ok(serde_json::json!({"bytes_per_second": 100.0})),
                ok(serde_json::json!({"bytes_per_second": 80.0})),
            ),
            (
                "latency",
                ok(serde_json::json!({"p50_us": 20.0})),
                Err(anyhow::anyhow!("failed")),
            ),
        ];
        let lines = verdicts(&results);
        assert!(
            lines[0].starts_with("PASS: connection setup 0.60"),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with("MISS: bulk throughput 0.80"),
            "{lines:?}"
        );
        assert!(
            lines[2].starts_with("MISS: added round trip (p50) failed"),
            "{lines:?}"
        );
    }

    #[test]
    fn server_and_client_agree() {
        let addr = start_server().expect("server");
        let limit = Duration::from_secs(10);
        assert!(!identify(addr).expect("identify"), "a direct connection");

        let connect = connect_rate(addr, 20, limit).expect("connect");
        assert_eq!(connect["connections"], 20);

        let bulk = bulk(addr, 3 * MAX_FRAME as u64 + 5, limit).expect("bulk");
        assert_eq!(bulk["bytes"], 3 * MAX_FRAME as u64 + 5);

        let latency = latency(addr, 50, limit).expect("latency");
        assert_eq!(latency["round_trips"], 50);
        assert!(latency["p99_us"].as_f64() >= latency["p50_us"].as_f64());
    }
}
