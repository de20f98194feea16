//! `cargo xtask bench http`: HTTP requests per second and latency with wrk,
//! in one run, three ways to the same nginx origin: direct, through
//! Portcullis (wrk in a tagged cgroup; identity proof, Cedar decision, an
//! audit record before and after every request, masking on) and through
//! nginx as a reverse proxy (the yardstick for "a proxy in the path").
//! Twice: in plain text, and over TLS (the origin serves HTTPS with a
//! bench CA; Portcullis intercepts with `tls = "intercept"` and verifies
//! the origin against that CA; nginx terminates TLS and proxies to the
//! origin over verified TLS). Each table ends with PASS/MISS against the
//! target: Portcullis ahead of nginx in the same run. Next to each proxy's
//! figures: its CPU time per request (the daemon's, all threads; the
//! nginx proxy's master and workers), from /proc over the run.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    ci,
    session::{run_in_cgroup, Session, SessionConfig},
    util::{
        catch_interrupts, describe, interrupted, output_with_timeout, require_root, step,
        stop_child,
    },
};

/// Names the bench's cgroup root, pin dir and work dir.
const NAME: &str = "portcullis-bench-http";
/// The origin's response body (the email is what the masking rule finds).
const BODY: &str = r#"{"ok":true,"owner":"bench@example.com","items":[1,2,3]}"#;

/// One wrk result.
#[derive(Debug, Clone, Copy)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
    /// The proxy's CPU time per request, in µs (`None` for direct).
    cpu_us_per_req: Option<f64>,
}

/// Runs the benchmark: `seconds` per path, `connections` wrk connections on
/// `threads` threads. `binary` replaces the release build; `workers` sets
/// the daemon's connection workers.
pub fn http(
    seconds: u64,
    connections: u64,
    threads: u64,
    binary: Option<PathBuf>,
    workers: Option<usize>,
) -> Result<()> {
    require_root()?;
    let bin = ci::daemon_binary(binary)?;
    let work = PathBuf::from("/tmp").join(NAME);
    let pki = Pki::create(&work.join("pki"))?;
    let (origin_port, origin_tls_port) = (free_port()?, free_port()?);
    let (proxy_port, proxy_tls_port) = (free_port()?, free_port()?);
    let origin = Nginx::start(
        &work.join("origin"),
        &origin_conf(origin_port, origin_tls_port, &pki),
        origin_port,
    )?;
    let proxy = Nginx::start(
        &work.join("proxy"),
        &proxy_conf(
            (proxy_port, origin_port),
            (proxy_tls_port, origin_tls_port),
            &pki,
        ),
        proxy_port,
    )?;
    step(&format!(
        "nginx origin on 127.0.0.1:{origin_port} (https :{origin_tls_port}), nginx reverse proxy on 127.0.0.1:{proxy_port} (https :{proxy_tls_port})"
    ));

    let policies = work.join("policies");
    if policies.exists() {
        fs::remove_dir_all(&policies)
            .with_context(|| format!("cannot clear {}", policies.display()))?;
    }
    fs::create_dir_all(&policies)
        .with_context(|| format!("cannot create {}", policies.display()))?;
    let demo = crate::util::repo_root().join("policies").join("demo");
    let policy = format!(
        "[resource.bench-origin]\nprotocol = \"http\"\nmatch = [\"127.0.0.1:{origin_port}\"]\ntls = \"none\"\n\n\
         [resource.bench-origin-tls]\nprotocol = \"http\"\nmatch = [\"127.0.0.1:{origin_tls_port}\"]\ntls = \"intercept\"\nupstream_ca_file = {:?}\n\n\
         [[mask]]\nresource = \"bench-origin\"\ndetectors = [\"email\"]\n\n\
         [[mask]]\nresource = \"bench-origin-tls\"\ndetectors = [\"email\"]\n\n\
         [issuer.demo]\nurl = \"https://issuer.portcullis.demo\"\njwks_file = {:?}\naudience = \"portcullis\"\n\n\
         [identity.bench-agent]\nissuer = \"demo\"\nsubject = \"system:serviceaccount:agents:demo\"\n",
        pki.ca.display().to_string(),
        demo.join("jwks.json").display().to_string()
    );
    fs::write(policies.join("bench.toml"), policy).context("cannot write bench.toml")?;
    fs::write(
        policies.join("bench.cedar"),
        "@id(\"bench\")\npermit(principal == Identity::\"bench-agent\", action == Action::\"http:get\", resource == Resource::\"bench-origin\");\n\
         @id(\"bench-tls\")\npermit(principal == Identity::\"bench-agent\", action == Action::\"http:get\", resource == Resource::\"bench-origin-tls\");\n",
    )
    .context("cannot write bench.cedar")?;

    catch_interrupts();
    let mut session = Session::start(
        &bin,
        &SessionConfig {
            name: NAME,
            policies,
            // Free now: other daemons may run on this machine.
            listen_port: free_port()?,
            workers,
        },
    )?;
    session.tag_agent("bench-agent", Some(&demo.join("agent.token")))?;
    step(&format!(
        "daemon connection workers: {}",
        session.workers()?
    ));

    // Masking must be on the measured path: check one response first, in
    // plain text and through interception.
    for url in [
        format!("http://127.0.0.1:{origin_port}/"),
        format!("https://127.0.0.1:{origin_tls_port}/"),
    ] {
        let check = curl_body(&session, &url)?;
        if check.contains("bench@example.com") || !check.contains("[MASKED]") {
            bail!("through Portcullis the body of {url} was not masked: {check}");
        }
    }

    let cases = [
        (
            "plain HTTP",
            format!("http://127.0.0.1:{origin_port}/"),
            format!("http://127.0.0.1:{proxy_port}/"),
        ),
        (
            "TLS (Portcullis intercepting, nginx terminating)",
            format!("https://127.0.0.1:{origin_tls_port}/"),
            format!("https://127.0.0.1:{proxy_tls_port}/"),
        ),
    ];
    let mut tables = Vec::new();
    for (title, origin_url, proxy_url) in &cases {
        step(title);
        let mut results = Vec::new();
        for (label, url, through) in [
            ("direct", origin_url, false),
            ("nginx reverse proxy", proxy_url, false),
            ("portcullis", origin_url, true),
        ] {
            let relay = match label {
                "portcullis" => session.daemon_pid().into_iter().collect(),
                "nginx reverse proxy" => proxy.processes(),
                _ => Vec::new(),
            };
            let r = wrk(
                &session,
                url,
                seconds,
                connections,
                threads,
                through,
                &relay,
            );
            if let Ok(w) = &r {
                println!(
                    "    {label}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, {} requests, {} errors{}",
                    w.rps,
                    w.p50_ms,
                    w.p99_ms,
                    w.requests,
                    w.errors,
                    w.cpu_us_per_req
                        .map(|c| format!(", {c:.1} us of the proxy's CPU per request"))
                        .unwrap_or_default()
                );
            }
            results.push((label, r));
            if interrupted() {
                bail!("interrupted");
            }
        }
        tables.push((*title, results));
    }
    drop(proxy);
    drop(origin);
    let mut failed = Vec::new();
    for (title, results) in &tables {
        print_table(title, results, seconds, connections, threads);
        failed.extend(
            results
                .iter()
                .filter_map(|(l, r)| r.as_ref().err().map(|e| format!("{title}, {l}: {e:#}"))),
        );
    }
    if !failed.is_empty() {
        eprintln!("daemon log ends with:\n{}", session.log_tail(20));
        bail!("some measurements failed:\n  {}", failed.join("\n  "));
    }
    Ok(())
}

/// The bench's own CA and a server certificate for 127.0.0.1 and
/// localhost (made with the openssl command line).
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn create(dir: &Path) -> Result<Self> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let pki = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        let (ca_key, csr, ext) = (dir.join("ca.key"), dir.join("server.csr"), dir.join("ext"));
        fs::write(
            &ext,
            "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .context("cannot write the extensions file")?;
        let p = |p: &Path| p.display().to_string();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let mut ca = Command::new("openssl");
        ca.args([
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=portcullis bench CA",
        ])
        .args(ec)
        .args(["-keyout", &p(&ca_key), "-out", &p(&pki.ca)]);
        let mut req = Command::new("openssl");
        req.args(["req", "-nodes", "-subj", "/CN=127.0.0.1"])
            .args(ec)
            .args(["-keyout", &p(&pki.key), "-out", &p(&csr)]);
        let mut sign = Command::new("openssl");
        sign.args(["x509", "-req", "-days", "2", "-in", &p(&csr)])
            .args(["-CA", &p(&pki.ca), "-CAkey", &p(&ca_key), "-CAcreateserial"])
            .args(["-extfile", &p(&ext), "-out", &p(&pki.cert)]);
        for cmd in [&mut ca, &mut req, &mut sign] {
            let out = output_with_timeout(cmd, Duration::from_secs(30))?;
            if !out.status.success() {
                bail!(
                    "{} failed: {}",
                    describe(cmd),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(pki)
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn print_table(
    title: &str,
    results: &[(&str, Result<Wrk>)],
    seconds: u64,
    connections: u64,
    threads: u64,
) {
    let rps = |label: &str| {
        results
            .iter()
            .find(|(l, _)| *l == label)
            .and_then(|(_, r)| r.as_ref().ok().map(|w| w.rps))
    };
    let direct = rps("direct");
    println!();
    println!(
        "HTTP benchmark, {title}: wrk -t{threads} -c{connections} -d{seconds}s, GET of a {}-byte JSON body",
        BODY.len()
    );
    println!(
        "{:<22} {:>12} {:>12} {:>12} {:>16} {:>12}",
        "path", "req/s", "p50 (ms)", "p99 (ms)", "req/s vs direct", "cpu us/req"
    );
    for (label, r) in results {
        match r {
            Ok(w) => {
                let ratio = direct
                    .filter(|d| *d > 0.0)
                    .map_or("-".to_string(), |d| format!("{:.2}", w.rps / d));
                let cpu = w
                    .cpu_us_per_req
                    .map_or("-".to_string(), |c| format!("{c:.1}"));
                println!(
                    "{label:<22} {:>12.0} {:>12.3} {:>12.3} {ratio:>16} {cpu:>12}",
                    w.rps, w.p50_ms, w.p99_ms
                );
            }
            Err(_) => println!("{label:<22} {:>12}", "failed"),
        }
    }
    println!("{}", verdict(rps("portcullis"), rps("nginx reverse proxy")));
}

/// The table's last line: the target is Portcullis ahead of nginx.
fn verdict(portcullis: Option<f64>, nginx: Option<f64>) -> String {
    match (portcullis, nginx) {
        (Some(p), Some(n)) if n > 0.0 => format!(
            "target: ahead of nginx as a reverse proxy: {} ({:.2}x nginx)",
            if p > n { "PASS" } else { "MISS" },
            p / n
        ),
        _ => "target: ahead of nginx as a reverse proxy: MISS (no measurement)".into(),
    }
}

/// One GET through Portcullis (curl in the tagged cgroup); its body. The
/// daemon's certificate is not checked (wrk does not check it either).
fn curl_body(session: &Session, url: &str) -> Result<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--insecure", "--max-time", "10", url]);
    run_in_cgroup(&mut cmd, session.agent_procs_file()?);
    let out = output_with_timeout(&mut cmd, Duration::from_secs(20))?;
    if !out.status.success() {
        bail!(
            "curl through Portcullis failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One wrk run; `relay` are the proxy's processes whose CPU time is
/// counted (none for direct).
fn wrk(
    session: &Session,
    url: &str,
    seconds: u64,
    connections: u64,
    threads: u64,
    through: bool,
    relay: &[u32],
) -> Result<Wrk> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        &format!("-t{threads}"),
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--latency",
        url,
    ]);
    step(&format!(
        "{}{}",
        describe(&cmd),
        if through {
            " (in the tagged cgroup)"
        } else {
            ""
        }
    ));
    if through {
        run_in_cgroup(&mut cmd, session.agent_procs_file()?);
    }
    let cpu_before = cpu_ticks(relay);
    let out = output_with_timeout(&mut cmd, Duration::from_secs(seconds + 30))?;
    let cpu_used = cpu_before
        .zip(cpu_ticks(relay))
        .map(|(a, b)| b.saturating_sub(a));
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut w = parse_wrk(&text).with_context(|| format!("cannot read wrk's output:\n{text}"))?;
    // /proc counts CPU time in USER_HZ ticks, 100 per second on Linux.
    w.cpu_us_per_req = cpu_used
        .filter(|_| w.requests > 0)
        .map(|t| t as f64 * 10_000.0 / w.requests as f64);
    Ok(w)
}

/// The CPU time so far of all of `pids`, in USER_HZ ticks; `None` when
/// there are none or one cannot be read.
fn cpu_ticks(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter()
        .map(|p| crate::util::cpu_ticks(*p))
        .sum::<Option<u64>>()
}

/// Reads requests/s, the 50% and 99% latencies, and the totals.
fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut w = Wrk {
        rps: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        requests: 0,
        errors: 0,
        cpu_us_per_req: None,
    };
    for line in text.lines() {
        let t = line.trim();
        let mut f = t.split_whitespace();
        match f.next() {
            Some("Requests/sec:") => w.rps = f.next()?.parse().ok()?,
            Some("50%") => w.p50_ms = duration_ms(f.next()?)?,
            Some("99%") => w.p99_ms = duration_ms(f.next()?)?,
            Some(n) if t.contains("requests in") => w.requests = n.parse().ok()?,
            Some("Non-2xx") => w.errors += t.rsplit(' ').next()?.parse::<u64>().ok()?,
            Some("Socket") => {
                for part in t.split(',') {
                    if let Some(n) = part.split_whitespace().last() {
                        w.errors += n.parse::<u64>().unwrap_or(0);
                    }
                }
            }
            _ => {}
        }
    }
    (w.rps > 0.0).then_some(w)
}

/// wrk's `1.23ms`, `850.00us`, `1.02s` as milliseconds.
fn duration_ms(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    Some(num.parse::<f64>().ok()? * scale)
}

fn origin_conf(port: u16, tls_port: u16, pki: &Pki) -> String {
    format!(
        "worker_processes 1;\nhttp {{\n  server {{\n    listen 127.0.0.1:{port};\n    listen 127.0.0.1:{tls_port} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    location / {{ default_type application/json; return 200 '{BODY}'; }}\n  }}\n}}\n",
        pki.cert.display(),
        pki.key.display(),
    )
}

/// nginx as a reverse proxy with kept-alive upstream connections, in
/// plain text and terminating TLS (verifying the origin, reusing TLS
/// sessions), `(listen, origin)` ports each.
fn proxy_conf(plain: (u16, u16), tls: (u16, u16), pki: &Pki) -> String {
    let ((port, origin), (tls_port, origin_tls)) = (plain, tls);
    format!(
        "worker_processes 2;\nhttp {{\n  upstream origin {{ server 127.0.0.1:{origin}; keepalive 64; }}\n  upstream origin_tls {{ server 127.0.0.1:{origin_tls}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n  server {{\n    listen 127.0.0.1:{tls_port} ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    location / {{ proxy_pass https://origin_tls; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_ssl_verify on; proxy_ssl_trusted_certificate {ca}; proxy_ssl_name localhost; proxy_ssl_server_name on; proxy_ssl_session_reuse on; }}\n  }}\n}}\n",
        cert = pki.cert.display(),
        key = pki.key.display(),
        ca = pki.ca.display(),
    )
}

/// An nginx with its own prefix, config and port; stopped on drop.
struct Nginx(Child);

impl Nginx {
    /// `body` is the config after the common head (pid, logs, temp paths).
    fn start(prefix: &Path, body: &str, port: u16) -> Result<Self> {
        let _ = fs::remove_dir_all(prefix);
        fs::create_dir_all(prefix.join("tmp"))
            .with_context(|| format!("cannot create {}", prefix.display()))?;
        let p = prefix.display();
        let (workers, rest) = body.split_once('\n').unwrap_or((body, ""));
        let http_head = format!(
            "http {{\n  access_log off;\n  client_body_temp_path {p}/tmp/body;\n  proxy_temp_path {p}/tmp/proxy;\n  fastcgi_temp_path {p}/tmp/fastcgi;\n  uwsgi_temp_path {p}/tmp/uwsgi;\n  scgi_temp_path {p}/tmp/scgi;\n"
        );
        let conf = format!(
            "daemon off;\n{workers}\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\nevents {{ worker_connections 4096; }}\n{}",
            rest.replacen("http {\n", &http_head, 1)
        );
        let conf_path = prefix.join("nginx.conf");
        fs::write(&conf_path, conf).context("cannot write nginx.conf")?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(prefix.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start nginx (cargo xtask setup installs nginx-light)")?;
        let mut nginx = Self(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("nginx did not listen on {port}; see {}/error.log", p);
            }
            if let Ok(Some(status)) = nginx.0.try_wait() {
                bail!("nginx exited ({status}); see {}/error.log", p);
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(nginx)
    }
}

impl Nginx {
    /// The master's pid and its workers'.
    fn processes(&self) -> Vec<u32> {
        let master = self.0.id();
        std::iter::once(master)
            .chain(crate::util::children(master))
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        stop_child(&mut self.0, Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let text = "Running 10s test @ http://127.0.0.1:1/\n  2 threads and 32 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.00ms  200.00us   5.00ms   90.00%\n  Latency Distribution\n     50%  850.00us\n     75%    1.10ms\n     90%    1.40ms\n     99%    2.50ms\n  123456 requests in 10.00s, 20.00MB read\n  Socket errors: connect 0, read 1, write 0, timeout 2\nRequests/sec:  12345.60\nTransfer/sec:      2.00MB\n";
        let w = parse_wrk(text).unwrap();
        assert_eq!(w.rps, 12345.6);
        assert!((w.p50_ms - 0.85).abs() < 1e-9);
        assert!((w.p99_ms - 2.5).abs() < 1e-9);
        assert_eq!(w.requests, 123456);
        assert_eq!(w.errors, 3);
        assert!(parse_wrk("garbage").is_none());
        assert_eq!(duration_ms("1.02s"), Some(1020.0));
    }

    #[test]
    fn tables_end_with_the_verdict() {
        assert!(verdict(Some(2.0), Some(1.0)).contains("PASS"));
        assert!(verdict(Some(1.0), Some(2.0)).contains("MISS"));
        assert!(verdict(None, Some(2.0)).contains("MISS"));
    }
}
