//! Test harness: each test owns its cgroup subtree, network namespaces,
//! ports, state dir, pin dir and daemon, and cleans them up on drop.

#![allow(dead_code)]

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "pc-{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn require_root() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "the end-to-end tests need root (cgroups, eBPF, network namespaces); run them through `cargo xtask test`"
    );
}

pub fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mounts").expect("read mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup2 mount")
}

/// A free TCP port on loopback for something a test starts later (a
/// daemon, a server), given to no other test of this process.
///
/// Taken below the kernel's ephemeral range, not with `bind(0)`: a port
/// from that range is free when looked at, but until the daemon binds it
/// (after loading its programs) any outgoing connection of a concurrent
/// test may be given it as its local port, and the daemon then fails with
/// EADDRINUSE. Ports below the range are never handed out that way; a
/// counter keeps this process's tests apart, and the process id spreads
/// concurrent test processes over the span.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, span) = below_ephemeral_ports();
    let start = std::process::id() % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(low + offset).expect("ports below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{}", low + span);
}

/// The ports [`free_port`] uses: `(first, count)`, the 8,192 ports below
/// the start of `ip_local_port_range` (32768 by default), never under
/// 10000.
fn below_ephemeral_ports() -> (u32, u32) {
    let end = first_ephemeral_port().clamp(10_000 + 1024, 65_536);
    let low = end.saturating_sub(8192).max(10_000);
    (low, end - low)
}

/// The first port of the kernel's ephemeral range (`ip_local_port_range`).
fn first_ephemeral_port() -> u32 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A cgroup subtree removed (with every process in it killed) on drop.
pub struct TestCgroup {
    pub mount: PathBuf,
    /// Path relative to the mount, without leading slash.
    pub rel: String,
}

impl TestCgroup {
    pub fn new(prefix: &str) -> Self {
        let mount = cgroup2_mount();
        let rel = unique(prefix);
        fs::create_dir_all(mount.join(&rel)).expect("create test cgroup");
        Self { mount, rel }
    }

    /// Creates a child (nested path allowed) and returns its relative path.
    pub fn child(&self, name: &str) -> String {
        let rel = format!("{}/{}", self.rel, name);
        fs::create_dir_all(self.mount.join(&rel)).expect("create child cgroup");
        rel
    }

    pub fn dir(&self, rel: &str) -> PathBuf {
        self.mount.join(rel)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let root = self.mount.join(&self.rel);
        let mut dirs = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        stack.push(e.path());
                    }
                }
            }
            dirs.push(d);
        }
        let _ = fs::write(root.join("cgroup.kill"), "1");
        for _ in 0..50 {
            let mut all = true;
            for d in dirs.iter().rev() {
                if d.exists() && fs::remove_dir(d).is_err() {
                    all = false;
                }
            }
            if all {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A named network namespace with loopback up, deleted on drop.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        run_ok(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Self { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Where a spawned process is placed.
#[derive(Clone, Default)]
pub struct Placement {
    /// Cgroup directory to join (absolute).
    pub cgroup: Option<PathBuf>,
    /// Network namespace file to enter.
    pub netns: Option<PathBuf>,
}

impl Placement {
    pub fn cgroup(dir: PathBuf) -> Self {
        Self {
            cgroup: Some(dir),
            netns: None,
        }
    }

    pub fn with_netns(mut self, ns: PathBuf) -> Self {
        self.netns = Some(ns);
        self
    }

    /// Makes `cmd`'s child join the cgroup, then the namespace, before exec.
    pub fn apply(&self, cmd: &mut Command) {
        let procs = self.cgroup.as_ref().map(|d| {
            fs::OpenOptions::new()
                .write(true)
                .open(d.join("cgroup.procs"))
                .expect("open cgroup.procs")
        });
        let ns = self
            .netns
            .as_ref()
            .map(|p| fs::File::open(p).expect("open netns"));
        // SAFETY: only async-signal-safe syscalls (write, setns) run between
        // fork and exec; the files were opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(f) = &procs {
                    let n = libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1);
                    if n != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(f) = &ns {
                    if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
}

/// A real TCP server: greets each connection with `hello from NAME`, then
/// echoes until the client half-closes, then closes.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub name: String,
    pub accepted: Arc<AtomicU32>,
    /// Polls of the listener that found its accept queue empty.
    idle_polls: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    pub fn start(name: &str) -> Self {
        Self::start_on("127.0.0.1:0", name)
    }

    pub fn start_on(bind: &str, name: &str) -> Self {
        let listener = TcpListener::bind(bind).expect("bind echo server");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU32::new(0));
        let idle_polls = Arc::new(AtomicU32::new(0));
        let (s, a, n) = (stop.clone(), accepted.clone(), name.to_string());
        let idle = idle_polls.clone();
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        let n = n.clone();
                        thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                            let _ = c.write_all(format!("hello from {n}\n").as_bytes());
                            let mut buf = [0u8; 65536];
                            loop {
                                match c.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(k) => {
                                        if c.write_all(&buf[..k]).is_err() {
                                            break;
                                        }
                                    }
                                }
                            }
                        });
                    }
                    Err(_) => {
                        idle.fetch_add(1, Ordering::Relaxed);
                        thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        });
        Self {
            addr,
            name: name.to_string(),
            accepted,
            idle_polls,
            stop,
        }
    }

    /// The accepted count once every connection the kernel completed
    /// before this call has been accepted: the listener is polled, so a
    /// handshake finished just before can still sit in its queue.
    pub fn accepted_after_drain(&self) -> u32 {
        let start = self.idle_polls.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.idle_polls.load(Ordering::Relaxed) < start + 2 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn greeting(&self) -> String {
        format!("hello from {}\n", self.name)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The Python client every test uses: a real, unmodified program. Prints one
/// JSON object: peer, greeting, echo, error.
const CLIENT: &str = r#"
import json, socket, sys, time
a = json.loads(sys.argv[1])
out = {"peer": None, "greeting": None, "echo": None, "error": None, "local": None}
try:
    s = socket.socket(socket.AF_INET6 if a.get("v6") else socket.AF_INET)
    s.settimeout(a.get("timeout", 5))
    if a.get("bind_port"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((a.get("bind_host", "127.0.0.1"), a["bind_port"]))
    s.connect((a["host"], a["port"]))
    out["peer"] = list(s.getpeername())[:2]
    out["local"] = list(s.getsockname())[:2]
    f = s.makefile("rb")
    out["greeting"] = f.readline().decode()
    if a.get("ready_file"):
        open(a["ready_file"], "w").write("ready")
    payload = a.get("send", "ping\n").encode() * a.get("repeat", 1)
    s.sendall(payload)
    if a.get("half_close"):
        s.shutdown(socket.SHUT_WR)
        got = f.read()
    else:
        got = f.read(len(payload))
    out["echo_len"] = len(got)
    out["echo_ok"] = got == payload
    out["echo"] = got[:64].decode(errors="replace")
    time.sleep(a.get("hold", 0))
    if a.get("wait_close"):
        # Block reading until the proxy side closes (EOF or reset) or the
        # time is up; report which.
        s.settimeout(a["wait_close"])
        t0 = time.time()
        try:
            d = s.recv(1)
            out["closed"] = "eof" if d == b"" else "data"
        except socket.timeout:
            out["closed"] = "timeout"
        except ConnectionResetError:
            out["closed"] = "reset"
        out["closed_after"] = time.time() - t0
except Exception as e:
    out["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"#;

/// What the client saw.
#[derive(Debug, Clone)]
pub struct ClientResult(pub Value);

impl ClientResult {
    pub fn error(&self) -> Option<&str> {
        self.0["error"].as_str()
    }
    pub fn greeting(&self) -> Option<&str> {
        self.0["greeting"].as_str()
    }
    pub fn peer_port(&self) -> Option<u64> {
        self.0["peer"].get(1).and_then(Value::as_u64)
    }
    pub fn echo_ok(&self) -> bool {
        self.0["echo_ok"].as_bool() == Some(true)
    }
}

pub fn client_cmd(place: &Placement, args: Value) -> Command {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", CLIENT, &args.to_string()]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    place.apply(&mut cmd);
    cmd
}

/// Runs the client to completion.
pub fn client(place: &Placement, args: Value) -> ClientResult {
    let out = client_cmd(place, args).output().expect("spawn python3");
    parse_client(&out.stdout, &out.stderr)
}

pub fn parse_client(stdout: &[u8], stderr: &[u8]) -> ClientResult {
    let text = String::from_utf8_lossy(stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "client printed no JSON ({e}): {text} / {}",
            String::from_utf8_lossy(stderr)
        )
    });
    ClientResult(v)
}

/// A client running in the background, holding its connection open.
pub struct HeldClient {
    pub child: Child,
    pub ready: PathBuf,
}

impl HeldClient {
    pub fn start(place: &Placement, args: Value, tmp: &Path) -> Self {
        let me = Self::spawn(place, args, tmp);
        me.wait_ready();
        me
    }

    /// Starts the client without waiting for its greeting.
    pub fn spawn(place: &Placement, mut args: Value, tmp: &Path) -> Self {
        let ready = tmp.join(unique("ready"));
        args["ready_file"] = Value::String(ready.display().to_string());
        let child = client_cmd(place, args).spawn().expect("spawn client");
        Self { child, ready }
    }

    /// Waits until the client has its greeting.
    pub fn wait_ready(&self) {
        wait_until(
            Duration::from_secs(10),
            || self.ready.exists(),
            "client connected",
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn finish(self) -> ClientResult {
        let out = self.child.wait_with_output().expect("wait client");
        parse_client(&out.stdout, &out.stderr)
    }
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// A test OIDC issuer: an ES256 key, its JWKS, and tokens it mints.
#[derive(Clone)]
pub struct TestIssuer {
    der: Vec<u8>,
    pub jwks: String,
    pub url: String,
}

impl TestIssuer {
    pub fn new() -> Self {
        use base64::Engine as _;
        let kp = rcgen::KeyPair::generate().expect("keypair");
        let raw = kp.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "test-key",
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        }]})
        .to_string();
        Self {
            der: kp.serialize_der(),
            jwks,
            url: "https://issuer.test".into(),
        }
    }

    /// A token for `identity` (subject `sub-IDENTITY`) valid for `ttl_secs`.
    pub fn token(&self, subject: &str, ttl_secs: i64) -> String {
        self.token_with_kid(subject, ttl_secs, "test-key")
    }

    /// Signs `claims` as they are (ES256, kid `test-key`).
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("test-key".into());
        jsonwebtoken::encode(
            &header,
            claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&self.der),
        )
        .expect("sign token")
    }

    /// Like [`TestIssuer::token`] with another key id in the header.
    pub fn token_with_kid(&self, subject: &str, ttl_secs: i64, kid: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_secs() as i64;
        let claims = serde_json::json!({
            "iss": self.url, "aud": "portcullis", "sub": subject,
            "iat": now, "nbf": now - 5, "exp": now + ttl_secs, "jti": unique("jti"),
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&self.der),
        )
        .expect("sign token")
    }
}

/// Files the daemon uses, kept across restarts of the same daemon.
pub struct DaemonFiles {
    pub issuer: TestIssuer,
    /// Extra daemon flags (kept across restarts).
    pub extra_args: Vec<String>,
    /// Extra environment variables for the daemon (kept across restarts).
    pub extra_env: Vec<(String, String)>,
    pub dir: PathBuf,
    pub policies: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub port: u16,
    pub cgroup_root: String,
}

impl DaemonFiles {
    pub fn new(cgroup_root: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("daemon"));
        let policies = dir.join("policies");
        fs::create_dir_all(&policies).expect("policies dir");
        Self {
            issuer: TestIssuer::new(),
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            state: dir.join("state"),
            socket: dir.join("admin.sock"),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(unique("pins")),
            policies,
            dir,
            port: free_port(),
            cgroup_root: cgroup_root.to_string(),
        }
    }

    /// Writes a policy file with one tcp resource per (name, destinations),
    /// the identities tests use, and (unless present) a rule letting every
    /// identity connect to every tcp resource.
    pub fn tcp_resources(&self, file: &str, resources: &[(&str, Vec<String>)]) {
        self.tcp_resources_with(file, resources, "");
    }

    /// Like [`DaemonFiles::tcp_resources`] with extra keys for every resource.
    pub fn tcp_resources_with(&self, file: &str, resources: &[(&str, Vec<String>)], extra: &str) {
        self.identities(IDENTITIES);
        if !self.policies.join("allow.cedar").exists() {
            self.rules(
                "allow.cedar",
                "@id(\"tests-allow-tcp\")\npermit(principal, action == Action::\"tcp:connect\", resource);\n",
            );
        }
        let mut text = String::new();
        for (name, dsts) in resources {
            let list: Vec<String> = dsts.iter().map(|d| format!("{d:?}")).collect();
            text.push_str(&format!(
                "[resource.{name}]\nprotocol = \"tcp\"\nmatch = [{}]\n{extra}\n",
                list.join(", ")
            ));
        }
        fs::write(self.policies.join(file), text).expect("write policy");
    }
}

/// Identity names the tests tag cgroups with.
pub const IDENTITIES: &[&str] = &[
    "a",
    "agent",
    "billing-agent",
    "team-agent",
    "pod-agent",
    "java-agent",
    "v6-agent",
    "container-agent",
    "one",
    "two",
    "by-pid",
    "x",
    "agent0",
    "agent1",
    "agent2",
    "agent3",
    "agent4",
    "agent5",
    "agent6",
    "agent7",
    "agent8",
    "agent9",
];

impl DaemonFiles {
    /// Writes `identities.toml` declaring `names` (one test issuer).
    pub fn identities(&self, names: &[&str]) {
        let jwks = self.dir.join("jwks.json");
        fs::write(&jwks, &self.issuer.jwks).expect("write jwks");
        let mut text = format!(
            "[issuer.test]\nurl = \"https://issuer.test\"\njwks_file = {:?}\naudience = \"portcullis\"\n\n",
            jwks.display().to_string()
        );
        for n in names {
            text.push_str(&format!(
                "[identity.{n}]\nissuer = \"test\"\nsubject = \"sub-{n}\"\n\n"
            ));
        }
        fs::write(self.policies.join("identities.toml"), text).expect("write identities");
    }

    /// The daemon's config file (absent unless a test writes it).
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("portcullis.toml")
    }

    /// Writes (or replaces) a Cedar rules file.
    pub fn rules(&self, file: &str, text: &str) {
        fs::write(self.policies.join(file), text).expect("write rules");
    }
}

impl Drop for DaemonFiles {
    fn drop(&mut self) {
        let _ = Command::new(BIN)
            .args([
                "--admin-socket",
                "/nonexistent/admin.sock",
                "detach",
                "--pin-dir",
            ])
            .arg(&self.pin_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A running daemon; SIGKILLed on drop (pins are cleaned by [`DaemonFiles`]).
pub struct Daemon {
    pub issuer: TestIssuer,
    pub dir: PathBuf,
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    pub socket: PathBuf,
    pub port: u16,
}

impl Daemon {
    pub fn start(files: &DaemonFiles) -> Self {
        let d = Self::spawn(files);
        d.wait_ready();
        d
    }

    pub fn spawn(files: &DaemonFiles) -> Self {
        let mut child = Command::new(BIN)
            .arg("daemon")
            .arg("--config")
            .arg(files.config_file())
            .arg("--policies")
            .arg(&files.policies)
            .arg("--state-dir")
            .arg(&files.state)
            .arg("--admin-socket")
            .arg(&files.socket)
            .arg("--pin-dir")
            .arg(&files.pin_dir)
            .arg("--cgroup-root")
            .arg(&files.cgroup_root)
            .arg("--listen-port")
            .arg(files.port.to_string())
            .args(
                (!files.extra_args.iter().any(|a| a == "--metrics"))
                    .then_some(["--metrics", "off"])
                    .into_iter()
                    .flatten(),
            )
            .args(&files.extra_args)
            .envs(files.extra_env.iter().map(|(k, v)| (k, v)))
            .env("PORTCULLIS_LOG", "info,portcullis=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn daemon");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let l = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("PORTCULLIS_TEST_ECHO_LOGS").is_some() {
                    eprintln!("[daemon] {line}");
                }
                if let Ok(mut g) = l.lock() {
                    g.push_str(&line);
                    g.push('\n');
                }
            }
        });
        Self {
            issuer: files.issuer.clone(),
            dir: files.dir.clone(),
            child,
            log,
            socket: files.socket.clone(),
            port: files.port,
        }
    }

    pub fn wait_ready(&self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if self.log_text().contains("portcullis daemon ready") {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("daemon not ready; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        self.log.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Runs a CLI command against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--admin-socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("spawn cli")
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "portcullis {args:?} failed: {}\n{}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let text = self.cli_ok(args);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{args:?}: invalid JSON ({e}): {text}"))
    }

    /// Tags `cgroup` as `identity` with a fresh valid token for it.
    pub fn tag(&self, cgroup: &str, identity: &str) {
        let token = self.token_file(identity, &format!("sub-{identity}"), 3600);
        self.cli_ok(&[
            "tag",
            cgroup,
            "--identity",
            identity,
            "--token-file",
            &token.display().to_string(),
        ]);
    }

    /// Writes (atomically, as Kubernetes rotates projected tokens) the token
    /// file of `identity` with the given subject and lifetime.
    pub fn token_file(&self, identity: &str, subject: &str, ttl_secs: i64) -> PathBuf {
        let dir = self.dir.join("tokens");
        fs::create_dir_all(&dir).expect("tokens dir");
        let path = dir.join(format!("{identity}.jwt"));
        let tmp = dir.join(format!(".{identity}.jwt.tmp"));
        fs::write(&tmp, self.issuer.token(subject, ttl_secs)).expect("write token");
        fs::rename(&tmp, &path).expect("rename token");
        path
    }

    pub fn flows(&self) -> Vec<Value> {
        self.json(&["flows", "--json"])["flows"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn status(&self) -> Value {
        self.json(&["status", "--json"])
    }

    pub fn refused(&self, label: &str) -> u64 {
        self.status()["counters"]["flows_refused"][label]
            .as_u64()
            .unwrap_or(0)
    }

    /// Access requests in the given status.
    pub fn requests(&self, status: &str) -> Vec<Value> {
        self.json(&["requests", "--json"])["requests"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["status"] == status)
            .collect()
    }

    /// Waits for `n` pending requests and returns them.
    pub fn wait_pending(&self, n: usize) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let found = self.requests("pending");
            if found.len() >= n {
                return found;
            }
            if start.elapsed() > Duration::from_secs(20) {
                panic!(
                    "timed out after 20s waiting for {n} pending access requests (have {found:?}); flows: {:?}\ndaemon log:\n{}",
                    self.flows(),
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the daemon serves the namespace of `pid`.
    pub fn wait_netns_served(&self, pid: u32) {
        let ino = fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .expect("netns of pid");
        wait_until(
            Duration::from_secs(10),
            || {
                self.status()["netns"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|n| n["inode"].as_u64() == Some(ino)))
            },
            "daemon serves the namespace",
        );
    }

    /// Freezes (true) or resumes (false) the daemon process.
    pub fn freeze(&self, stop: bool) {
        let sig = if stop {
            nix::sys::signal::SIGSTOP
        } else {
            nix::sys::signal::SIGCONT
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("signal daemon");
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A long-lived process placed in a cgroup (and namespace), killed on drop.
pub struct Holder(pub Child);

impl Holder {
    pub fn start(place: &Placement) -> Self {
        let mut cmd = Command::new("sleep");
        cmd.arg("120").stdout(Stdio::null());
        place.apply(&mut cmd);
        Self(cmd.spawn().expect("spawn holder"))
    }
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects directly (from the test process, untagged) and reports whether
/// the greeting arrived.
pub fn direct_greeting(addr: SocketAddr) -> Option<String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    Some(line)
}

/// A test PKI: a CA and a server certificate for `localhost` and
/// 127.0.0.1, as PEM files in `dir`.
pub struct TestPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A client certificate (CN `portcullis-test-client`) from the same CA.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    pub fn new(dir: &Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        fs::create_dir_all(dir).expect("pki dir");
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "portcullis test upstream CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server params");
        let cert = params.signed_by(&key, &issuer).expect("server cert");
        let client_key = KeyPair::generate().expect("client key");
        let mut client_params = CertificateParams::default();
        client_params
            .distinguished_name
            .push(DnType::CommonName, "portcullis-test-client");
        client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params
            .signed_by(&client_key, &issuer)
            .expect("client cert");
        let pki = Self {
            ca: dir.join("upstream-ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        fs::write(&pki.client_cert, client.pem()).expect("write client cert");
        fs::write(&pki.client_key, client_key.serialize_pem()).expect("write client key");
        fs::write(&pki.ca, ca_cert.pem()).expect("write ca");
        fs::write(&pki.cert, cert.pem()).expect("write cert");
        fs::write(&pki.key, key.serialize_pem()).expect("write key");
        pki
    }
}

/// The test HTTP(S) upstream (`tests/e2e/http_upstream.py`): a generic JSON
/// API and a Kubernetes-like API server; logs every request it gets.
pub struct HttpUpstream {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl HttpUpstream {
    pub fn start(dir: &Path, tls: Option<&TestPki>) -> Self {
        Self::start_with(dir, tls, false)
    }

    /// With `require_client_cert`, the server demands a client certificate
    /// from the PKI's CA (and logs its CN).
    pub fn start_with(dir: &Path, tls: Option<&TestPki>, require_client_cert: bool) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/http_upstream.py");
        let port = free_port();
        let log = dir.join(format!("upstream-{port}.jsonl"));
        fs::write(&log, "").expect("upstream log");
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(script)
            .args(["--port", &port.to_string(), "--log"])
            .arg(&log)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(p) = tls {
            cmd.arg("--cert").arg(&p.cert).arg("--key").arg(&p.key);
            if require_client_cert {
                cmd.arg("--client-ca").arg(&p.ca);
            }
        }
        let mut child = cmd.spawn().expect("start the test upstream");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("upstream ready line");
        assert_eq!(line.trim(), "ready", "test upstream did not start");
        Self { child, port, log }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Every request it received so far.
    pub fn requests(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What curl said.
#[derive(Debug)]
pub struct Curl {
    pub code: u16,
    pub http_version: String,
    pub body: String,
    pub headers: String,
    pub stderr: String,
    pub ok: bool,
}

/// Runs curl placed in `place` with `args` (bounded by `--max-time 30`).
pub fn curl(place: &Placement, args: &[&str]) -> Curl {
    let marker = "\n--portcullis-curl--";
    let hdr = std::env::temp_dir().join(unique("curl-headers"));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30", "-D"])
        .arg(&hdr)
        .args(["-w", &format!("{marker}%{{http_code}} %{{http_version}}")])
        .args(args);
    place.apply(&mut cmd);
    let out = cmd.output().expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let headers = fs::read_to_string(&hdr).unwrap_or_default();
    let _ = fs::remove_file(&hdr);
    let (body, tail) = stdout.rsplit_once(marker).unwrap_or((&stdout, "0 0"));
    let mut it = tail.split_whitespace();
    let code = it.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    Curl {
        code,
        http_version: it.next().unwrap_or("").to_string(),
        body: body.to_string(),
        headers,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        ok: out.status.success(),
    }
}

/// nginx (Debian's nginx-light) as an HTTPS upstream speaking HTTP/2 and
/// HTTP/1.1 by ALPN, with its own prefix, config and port; every location
/// returns `body` as JSON. Its access log records protocol and
/// Authorization per request.
pub struct NginxUpstream {
    child: Child,
    pub port: u16,
    pub access_log: PathBuf,
}

/// Starts nginx in the foreground with its prefix, pid, logs and temp
/// paths under `prefix` (whose `tmp/` must exist) and `http` as the body of
/// its `http` block (log formats, servers).
pub fn spawn_nginx(prefix: &Path, http: &str) -> Child {
    let p = prefix.display();
    let conf = format!(
        "daemon off;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\nevents {{ worker_connections 256; }}\nhttp {{\n  client_body_temp_path {p}/tmp/body;\n  proxy_temp_path {p}/tmp/proxy;\n  fastcgi_temp_path {p}/tmp/fastcgi;\n  uwsgi_temp_path {p}/tmp/uwsgi;\n  scgi_temp_path {p}/tmp/scgi;\n{http}}}\n"
    );
    let conf_path = prefix.join("nginx.conf");
    fs::write(&conf_path, conf).expect("nginx.conf");
    Command::new("nginx")
        .arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nginx")
}

impl NginxUpstream {
    pub fn start(dir: &Path, pki: &TestPki, body: &str) -> Self {
        let prefix = dir.join(unique("nginx"));
        fs::create_dir_all(prefix.join("tmp")).expect("nginx prefix");
        let port = free_port();
        let access_log = prefix.join("access.log");
        let child = spawn_nginx(
            &prefix,
            &format!(
                "  log_format t '$request_method $uri $server_protocol \"$http_authorization\"';\n  access_log {} t;\n  server {{\n    listen 127.0.0.1:{port} ssl http2;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    location / {{ default_type application/json; return 200 '{body}'; }}\n  }}\n",
                access_log.display(),
                pki.cert.display(),
                pki.key.display(),
            ),
        );
        let n = Self {
            child,
            port,
            access_log,
        };
        wait_until(
            Duration::from_secs(10),
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "nginx listening",
        );
        n
    }

    /// Access log lines: `METHOD URI PROTOCOL "AUTHORIZATION"`.
    pub fn requests(&self) -> Vec<String> {
        fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for NginxUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a Python `script` (which reads its JSON arguments from `sys.argv[1]`
/// and prints one JSON object) placed in `place`, optionally as `uid`.
pub fn python_json(place: &Placement, uid: Option<u32>, script: &str, args: Value) -> Value {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script, &args.to_string()]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    place.apply(&mut cmd);
    if let Some(uid) = uid {
        // Applied by std before the placement's pre_exec; the cgroup.procs
        // file was opened by root, and cgroup v2 checks the opener's rights.
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().expect("spawn python3");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "script printed no JSON ({e}): {text} / {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A UDP echo server on `bind` counting the datagrams it received.
pub struct UdpEcho {
    pub addr: SocketAddr,
    pub received: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
}

impl UdpEcho {
    pub fn start(bind: &str) -> Self {
        let sock = std::net::UdpSocket::bind(bind).expect("bind udp");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("udp timeout");
        let addr = sock.local_addr().expect("udp addr");
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU32::new(0));
        let (s, r) = (stop.clone(), received.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    r.fetch_add(1, Ordering::Relaxed);
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Self {
            addr,
            received,
            stop,
        }
    }

    pub fn received(&self) -> u32 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Every audit event of a daemon's state dir (`portcullis audit tail --json`).
pub fn audit_tail(files: &DaemonFiles) -> Vec<Value> {
    let out = Command::new(BIN)
        .args(["audit", "tail", "--json", "--state-dir"])
        .arg(&files.state)
        .output()
        .expect("audit tail");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A real PostgreSQL server (`initdb` into a temp dir, run as the
/// `postgres` OS user on its own loopback port, `scram-sha-256` for every
/// TCP login). The superuser's password is in `password_file`, readable by
/// root only (the daemon), so an agent cannot log in without the daemon.
/// Stopped and removed on drop.
pub struct PgServer {
    pub dir: PathBuf,
    pub port: u16,
    pub password_file: PathBuf,
    password: String,
    child: Option<Child>,
}

/// The Debian PostgreSQL binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl PgServer {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// Like [`PgServer::start`], with extra server settings (`-c k=v`);
    /// the server's own log (its stderr) goes to [`PgServer::log_file`].
    pub fn start_with(name: &str, settings: &[(&str, &str)]) -> Self {
        let user = nix::unistd::User::from_name("postgres")
            .expect("passwd lookup")
            .expect("a postgres OS user (apt-get install postgresql-15)");
        let dir = std::env::temp_dir().join(unique(&format!("pg-{name}")));
        let data = dir.join("data");
        fs::create_dir_all(&dir).expect("pg dir");
        let password = format!("pw-{}", unique("secret"));
        // initdb reads the password from a file the postgres user can read;
        // the daemon's copy is root-only.
        let init_pw = dir.join("initpw");
        fs::write(&init_pw, &password).expect("write init pw");
        nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).expect("chown pg dir");
        nix::unistd::chown(&init_pw, Some(user.uid), Some(user.gid)).expect("chown pw");
        let as_pg = |cmd: &mut Command| {
            cmd.uid(user.uid.as_raw())
                .gid(user.gid.as_raw())
                .current_dir(&dir);
        };
        let mut init = Command::new(format!("{PG_BIN}/initdb"));
        init.arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", init_pw.display()));
        as_pg(&mut init);
        run_ok(&mut init);
        let _ = fs::remove_file(&init_pw);
        let daemon_dir = dir.join("daemon");
        fs::create_dir_all(&daemon_dir).expect("daemon dir");
        let password_file = daemon_dir.join("pg.pw");
        fs::write(&password_file, format!("{password}\n")).expect("write pw");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&daemon_dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        fs::set_permissions(&password_file, fs::Permissions::from_mode(0o600)).expect("chmod");
        let port = free_port();
        let mut cmd = Command::new(format!("{PG_BIN}/postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=60",
                // What the server actually ran, for differential checks
                // (`PgServer::server_log`).
                "-c",
                "log_statement=all",
                // Who ran it: the daemon's own catalog look-ups name
                // themselves (`portcullis-catalog`, `portcullis-functions`).
                "-c",
                "log_line_prefix=%m [%p] app=%a ",
            ])
            .args(
                settings
                    .iter()
                    .flat_map(|(k, v)| ["-c".to_string(), format!("{k}={v}")]),
            )
            .arg("-k")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("server.log")).expect("server log"));
        as_pg(&mut cmd);
        let child = cmd.spawn().expect("spawn postgres");
        let mut s = Self {
            dir,
            port,
            password_file,
            password,
            child: Some(child),
        };
        let start = Instant::now();
        loop {
            let ok = s
                .psql_direct("select 1")
                .map(|o| o.trim() == "1")
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "postgres did not start"
            );
            if let Some(c) = s.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("postgres exited: {st}");
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
        s
    }

    /// Turns TLS on (a leaf for 127.0.0.1 from a fresh test CA) and returns
    /// the CA certificate file (in the daemon-only directory).
    pub fn enable_tls(&self) -> PathBuf {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "portcullis pg test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
        let issuer = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().expect("leaf key");
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        leaf.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf cert");
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .expect("postgres user");
        let data = self.dir.join("data");
        let (crt, key) = (data.join("server.crt"), data.join("server.key"));
        fs::write(&crt, leaf_cert.pem()).expect("write crt");
        fs::write(&key, leaf_key.serialize_pem()).expect("write key");
        use std::os::unix::fs::PermissionsExt;
        for f in [&crt, &key] {
            nix::unistd::chown(f, Some(user.uid), Some(user.gid)).expect("chown");
            fs::set_permissions(f, fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        self.sql("alter system set ssl = on");
        self.sql("select pg_reload_conf()");
        let ca_file = self.password_file.with_file_name("ca.pem");
        fs::write(&ca_file, ca_cert.pem()).expect("write ca");
        // Wait for the reload to take effect.
        let start = Instant::now();
        while self.sql("show ssl").trim() != "on" {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "ssl did not turn on"
            );
            thread::sleep(Duration::from_millis(50));
        }
        ca_file
    }

    /// The server's own log (`log_statement = all`): every statement it
    /// received, as it read them.
    pub fn server_log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The statements the server logged (`LOG:  statement: ...`), in
    /// order, but for the daemon's own catalog look-ups (their
    /// `application_name` starts with `portcullis-`).
    pub fn logged_statements(&self) -> Vec<String> {
        self.server_log()
            .lines()
            .filter(|l| !l.contains(" app=portcullis-"))
            .filter_map(|l| {
                l.split_once("LOG:  statement: ")
                    .map(|(_, s)| s.to_string())
            })
            .collect()
    }

    /// The server address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The server's own log (what it says it executed, with
    /// `log_statement = 'all'`).
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// Runs SQL as the superuser in database `db` (see [`PgServer::sql`]).
    pub fn sql_in(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-w"])
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname={db} sslmode=disable",
                self.port
            ))
            .args(["-c", sql])
            .env("PGPASSWORD", &self.password)
            .output()
            .expect("psql");
        assert!(out.status.success(), "{sql}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs SQL as the superuser over TCP from the (untagged) test process.
    pub fn psql_direct(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-w"])
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
                self.port
            ))
            .args(["-c", sql])
            .env("PGPASSWORD", &self.password)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Like [`PgServer::psql_direct`], panicking on failure.
    pub fn sql(&self, sql: &str) -> String {
        self.psql_direct(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT: PostgreSQL's fast shutdown.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A real OpenSSH server (`/usr/sbin/sshd -D`) on a free loopback port
/// with its own config and host key. Its `authorized_keys` holds only the
/// key Portcullis logs in with (`upstream_key`), for root. Stopped on drop.
pub struct SshServer {
    pub dir: PathBuf,
    pub port: u16,
    /// The private key the daemon holds (the resource's `private_key_file`).
    pub upstream_key: PathBuf,
    /// A known_hosts file with this server's host key (for the resource).
    pub known_hosts: PathBuf,
    /// sshd's own log.
    pub log: PathBuf,
    child: Child,
}

impl SshServer {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, false, false)
    }

    /// With `host_cert`, the host key is certified by a fresh host CA
    /// (`host_ca_pub`, principal `127.0.0.1`) and sshd presents the
    /// certificate. With `user_cert`, `authorized_keys` is empty and sshd
    /// trusts a user CA that certified the daemon's key for root instead
    /// (`upstream_cert`).
    pub fn start_with(name: &str, host_cert: bool, user_cert: bool) -> Self {
        let dir = std::env::temp_dir().join(unique(&format!("sshd-{name}")));
        fs::create_dir_all(&dir).expect("sshd dir");
        // sshd's privilege separation directory.
        fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let keygen = |file: &Path| {
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
                    .arg(file),
            );
        };
        let host_key = dir.join("host_ed25519");
        let upstream_key = dir.join("portcullis_id");
        keygen(&host_key);
        keygen(&upstream_key);
        let mut extra = String::new();
        if user_cert {
            let ca = dir.join("user_ca");
            keygen(&ca);
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-s"])
                    .arg(&ca)
                    .args(["-I", "portcullis-user", "-n", "root", "-V", "-5m:+1h"])
                    .arg(dir.join("portcullis_id.pub")),
            );
            fs::write(dir.join("authorized_keys"), "").expect("authorized_keys");
            extra.push_str(&format!(
                "TrustedUserCAKeys {}\n",
                dir.join("user_ca.pub").display()
            ));
        } else {
            fs::copy(dir.join("portcullis_id.pub"), dir.join("authorized_keys"))
                .expect("authorized_keys");
        }
        let port = free_port();
        let host_pub = fs::read_to_string(dir.join("host_ed25519.pub")).expect("host pub");
        let known_hosts = dir.join("known_hosts");
        fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_pub}")).expect("known_hosts");
        if host_cert {
            let ca = dir.join("host_ca");
            keygen(&ca);
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-s"])
                    .arg(&ca)
                    .args(["-I", "test-sshd", "-h", "-n", "127.0.0.1", "-V", "-5m:+1h"])
                    .arg(dir.join("host_ed25519.pub")),
            );
            extra.push_str(&format!(
                "HostCertificate {}\n",
                dir.join("host_ed25519-cert.pub").display()
            ));
        }
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\n\
                 AuthorizedKeysFile {}\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n\
                 StrictModes no\nSubsystem sftp internal-sftp\nAcceptEnv LANG LC_*\n\
                 AllowTcpForwarding yes\nX11Forwarding no\nPrintMotd no\nLogLevel VERBOSE\n{extra}",
                host_key.display(),
                dir.join("sshd.pid").display(),
                dir.join("authorized_keys").display(),
            ),
        )
        .expect("sshd_config");
        let log = dir.join("sshd.log");
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("sshd log"))
            .spawn()
            .expect("spawn sshd");
        let me = Self {
            dir,
            port,
            upstream_key,
            known_hosts,
            log,
            child,
        };
        wait_until(
            Duration::from_secs(10),
            || direct_greeting(me.addr()).is_some_and(|g| g.starts_with("SSH-2.0-OpenSSH")),
            "sshd listening",
        );
        me
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The daemon key's user certificate (servers started with `user_cert`).
    pub fn upstream_cert(&self) -> PathBuf {
        self.dir.join("portcullis_id-cert.pub")
    }

    /// The host CA's public key (servers started with a host certificate).
    pub fn host_ca_pub(&self) -> PathBuf {
        self.dir.join("host_ca.pub")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A known_hosts file that trusts `daemon_pub` (the daemon's host key)
    /// for this server's address: what an agent container is given.
    pub fn agent_known_hosts(&self, daemon_pub: &Path) -> PathBuf {
        let key = fs::read_to_string(daemon_pub).expect("daemon host key .pub");
        let path = self.dir.join(unique("agent_known_hosts"));
        fs::write(&path, format!("[127.0.0.1]:{} {key}", self.port)).expect("agent known_hosts");
        path
    }

    /// OpenSSH client options: strict host key checking against
    /// `known_hosts`, no user config, no prompts.
    pub fn ssh_opts(&self, known_hosts: &Path) -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", known_hosts.display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "ConnectTimeout=10".into(),
        ]
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Ports for daemons and servers come from below the ephemeral range, each
/// once per test process: a daemon's port can then not be taken by a
/// concurrent test's outgoing connection before it binds it (which failed
/// a CI run with EADDRINUSE when ports came from `bind(0)`).
#[test]
fn free_ports_are_distinct_and_never_ephemeral() {
    let first_ephemeral = first_ephemeral_port();
    let ports: Vec<u16> = (0..64).map(|_| free_port()).collect();
    let mut distinct = ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        ports.len(),
        "a port was given twice: {ports:?}"
    );
    if first_ephemeral >= 11_024 {
        assert!(
            ports.iter().all(|p| u32::from(*p) < first_ephemeral),
            "ports from the ephemeral range (from {first_ephemeral}): {ports:?}"
        );
    }
}
