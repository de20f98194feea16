//! End-to-end tests of the review console: the real daemon serving HTTPS,
//! `curl` as the browser (cookie jar, no redirects followed, the daemon's CA
//! trusted), a real PostgreSQL with a tagged psycopg client whose statement
//! is held, and an OpenID provider on loopback.
//!
//! The provider is a small authorization-code issuer written here
//! ([`Provider`]): discovery, `/authorize` (signs the configured user in at
//! once), `/token` (client secret, single-use codes, PKCE S256 checked) and
//! ID tokens signed with the test issuer's key. No real IdP can run offline
//! in the test environment; this one speaks the protocol over a real socket,
//! so the daemon's whole relying-party side is exercised.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    thread,
};

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::Digest as _;

use crate::harness::*;

const CLIENT_ID: &str = "portcullis-console";
const SECRET: &str = "s3cret-console";
const PG_CLIENT: &str = include_str!("pg_client.py");

/// What the provider puts in its next ID tokens.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Good,
    Expired,
    Forged,
    WrongNonce,
    WrongAudience,
}

struct Grant {
    challenge: String,
    redirect_uri: String,
    nonce: String,
    sub: String,
}

struct ProviderState {
    login_as: String,
    mode: Mode,
    codes: HashMap<String, Grant>,
}

struct Provider {
    url: String,
    state: Arc<Mutex<ProviderState>>,
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_form(s: &str) -> HashMap<String, String> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

impl Provider {
    fn start(issuer: TestIssuer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind provider");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(ProviderState {
            login_as: "nobody".into(),
            mode: Mode::Good,
            codes: HashMap::new(),
        }));
        let (st, u) = (state.clone(), url.clone());
        // Serves until the test process ends (the listener is loopback-only
        // and each test has its own).
        thread::spawn(move || {
            let forger = TestIssuer::new();
            for conn in listener.incoming().flatten() {
                let _ = serve(conn, &u, &st, &issuer, &forger);
            }
        });
        Self { url, state }
    }

    fn login_as(&self, sub: &str, mode: Mode) {
        let mut s = self.state.lock().unwrap();
        s.login_as = sub.into();
        s.mode = mode;
    }
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &str) {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    let _ = conn.write_all(out.as_bytes());
}

fn serve(
    mut conn: TcpStream,
    url: &str,
    st: &Mutex<ProviderState>,
    issuer: &TestIssuer,
    forger: &TestIssuer,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or("/").to_string(),
    );
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len.min(65536)];
    reader.read_exact(&mut body)?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    match (method, path) {
        ("GET", "/.well-known/openid-configuration") => {
            let doc = json!({
                "issuer": url,
                "authorization_endpoint": format!("{url}/authorize"),
                "token_endpoint": format!("{url}/token"),
                "jwks_uri": format!("{url}/jwks"),
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
            });
            respond(
                &mut conn,
                "200 OK",
                &[("content-type", "application/json".into())],
                &doc.to_string(),
            );
        }
        ("GET", "/authorize") => {
            let q = parse_form(query);
            let ok = q.get("client_id").map(String::as_str) == Some(CLIENT_ID)
                && q.get("response_type").map(String::as_str) == Some("code")
                && q.get("code_challenge_method").map(String::as_str) == Some("S256")
                && q.get("scope")
                    .is_some_and(|s| s.split(' ').any(|x| x == "openid"))
                && q.contains_key("state")
                && q.contains_key("nonce");
            if !ok {
                respond(
                    &mut conn,
                    "400 Bad Request",
                    &[],
                    &format!("bad authorize request {q:?}"),
                );
                return Ok(());
            }
            let code = unique("code");
            let mut s = st.lock().unwrap();
            let sub = s.login_as.clone();
            s.codes.insert(
                code.clone(),
                Grant {
                    challenge: q["code_challenge"].clone(),
                    redirect_uri: q["redirect_uri"].clone(),
                    nonce: q["nonce"].clone(),
                    sub,
                },
            );
            let to = format!("{}?code={code}&state={}", q["redirect_uri"], q["state"]);
            respond(&mut conn, "302 Found", &[("location", to)], "");
        }
        ("POST", "/token") => {
            let f = parse_form(&String::from_utf8_lossy(&body));
            let basic = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{SECRET}"))
            );
            if headers.get("authorization") != Some(&basic) {
                respond(
                    &mut conn,
                    "401 Unauthorized",
                    &[],
                    "{\"error\":\"invalid_client\"}",
                );
                return Ok(());
            }
            let mut s = st.lock().unwrap();
            let grant = f.get("code").and_then(|c| s.codes.remove(c));
            let Some(g) = grant else {
                respond(
                    &mut conn,
                    "400 Bad Request",
                    &[],
                    "{\"error\":\"invalid_grant\"}",
                );
                return Ok(());
            };
            let verifier = f.get("code_verifier").cloned().unwrap_or_default();
            if b64url(&sha2::Sha256::digest(verifier.as_bytes())) != g.challenge
                || f.get("redirect_uri") != Some(&g.redirect_uri)
                || f.get("grant_type").map(String::as_str) != Some("authorization_code")
            {
                respond(
                    &mut conn,
                    "400 Bad Request",
                    &[],
                    "{\"error\":\"invalid_grant\"}",
                );
                return Ok(());
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            let mut claims = json!({
                "iss": url, "aud": CLIENT_ID, "sub": g.sub, "nonce": g.nonce,
                "iat": now, "exp": now + 300,
            });
            let signer = match s.mode {
                Mode::Good => issuer,
                Mode::Expired => {
                    claims["iat"] = json!(now - 7200);
                    claims["exp"] = json!(now - 3600);
                    issuer
                }
                Mode::Forged => forger,
                Mode::WrongNonce => {
                    claims["nonce"] = json!("another-sign-in");
                    issuer
                }
                Mode::WrongAudience => {
                    claims["aud"] = json!("portcullis");
                    issuer
                }
            };
            let answer = json!({"access_token": "at", "token_type": "Bearer", "id_token": signer.sign(&claims)});
            respond(
                &mut conn,
                "200 OK",
                &[("content-type", "application/json".into())],
                &answer.to_string(),
            );
        }
        _ => respond(&mut conn, "404 Not Found", &[], ""),
    }
    Ok(())
}

/// A response seen by curl.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: String,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    fn set_cookies(&self) -> Vec<String> {
        self.headers
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case("set-cookie"))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }
}

/// A browser: curl with its own cookie jar.
struct Browser {
    jar: PathBuf,
    ca: PathBuf,
    dir: PathBuf,
}

impl Browser {
    fn new(dir: &Path, ca: &Path) -> Self {
        let jar = dir.join(unique("jar"));
        Self {
            jar,
            ca: ca.to_path_buf(),
            dir: dir.to_path_buf(),
        }
    }

    fn request(&self, method: &str, url: &str, form: Option<&str>) -> Resp {
        let hdr = self.dir.join(unique("hdr"));
        let body = self.dir.join(unique("body"));
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-X", method, "--max-time", "20", "--cacert"])
            .arg(&self.ca)
            .arg("-b")
            .arg(&self.jar)
            .arg("-c")
            .arg(&self.jar)
            .arg("-D")
            .arg(&hdr)
            .arg("-o")
            .arg(&body)
            .args(["-w", "%{http_code}"]);
        if let Some(f) = form {
            cmd.args(["--data-raw", f]);
        }
        cmd.arg(url);
        let out = cmd.output().expect("curl");
        let status = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        let r = Resp {
            status,
            headers: std::fs::read_to_string(&hdr).unwrap_or_default(),
            body: std::fs::read_to_string(&body).unwrap_or_default(),
        };
        let _ = std::fs::remove_file(hdr);
        let _ = std::fs::remove_file(body);
        r
    }

    fn get(&self, url: &str) -> Resp {
        self.request("GET", url, None)
    }

    fn post(&self, url: &str, form: &str) -> Resp {
        self.request("POST", url, Some(form))
    }

    /// The whole sign-in: console → provider → callback. Returns the
    /// callback's answer.
    fn sign_in(&self, console: &str) -> Resp {
        let first = self.get(&format!("{console}/requests"));
        assert_eq!(
            first.status, 302,
            "unauthenticated page must redirect: {first:?}"
        );
        let to_idp = first.header("location").expect("location");
        assert!(to_idp.contains("code_challenge_method=S256"), "{to_idp}");
        let back = self.get(&to_idp);
        assert_eq!(back.status, 302, "provider: {back:?}");
        let callback = back.header("location").expect("callback");
        assert!(callback.starts_with(console), "{callback}");
        self.get(&callback)
    }

    /// The CSRF token in a page.
    fn csrf(&self, page: &str) -> String {
        let at = page.find("name=csrf value=\"").expect("csrf field") + "name=csrf value=\"".len();
        page[at..].split('"').next().unwrap().to_string()
    }
}

struct Console {
    _cg: TestCgroup,
    files: DaemonFiles,
    daemon: Daemon,
    provider: Provider,
    url: String,
    ca: PathBuf,
    pg: Option<PgServer>,
    echo: Option<EchoServer>,
    agent: Placement,
    /// With [`setup_with_ssh`]: resource `box`, shells allowed and recorded.
    sshd: Option<SshServer>,
}

const RULES: &str = r#"
@id("pg-read")
permit(principal, action in [Action::"postgres:select", Action::"postgres:transaction", Action::"postgres:set", Action::"postgres:show"], resource);
@id("pg-update-approved")
@approval("required")
permit(principal, action == Action::"postgres:update", resource);
@id("reviewers")
permit(principal, action in Action::"console", resource)
  when { principal.subject like "reviewer-*" || principal == Reviewer::"sub-agent" };
@id("four-eyes")
@reason("nobody approves their own agent's request")
forbid(principal, action == Action::"console:approve", resource)
  when { context.requester == principal };
"#;

fn setup(name: &str, with_pg: bool) -> Console {
    setup_with(name, with_pg, false, "")
}

/// [`setup`] with PostgreSQL and an OpenSSH server as resource `box`
/// (shells allowed, recorded in full).
fn setup_with_ssh(name: &str) -> Console {
    setup_with(name, true, true, "")
}

/// `config` is appended to the daemon's config file (after `[console]`).
fn setup_with(name: &str, with_pg: bool, with_ssh: bool, config: &str) -> Console {
    require_root();
    let cg = TestCgroup::new(name);
    let mut files = DaemonFiles::new(&cg.rel);
    let provider = Provider::start(files.issuer.clone());
    // Agents' tokens and reviewers' ID tokens come from the same issuer (so
    // `context.requester == principal` can hold), with other audiences.
    files.issuer.url = provider.url.clone();
    let jwks = files.dir.join("jwks.json");
    std::fs::write(&jwks, &files.issuer.jwks).unwrap();
    std::fs::write(
        files.policies.join("identities.toml"),
        format!(
            "[issuer.corp]\nurl = {:?}\njwks_file = {:?}\naudience = \"portcullis\"\n\n[identity.agent]\nissuer = \"corp\"\nsubject = \"sub-agent\"\n",
            provider.url,
            jwks.display().to_string()
        ),
    )
    .unwrap();
    files.rules("console.cedar", RULES);
    let pg = with_pg.then(|| {
        let pg = PgServer::start(name);
        pg.sql("create table orders(id int primary key, state text); insert into orders values (1, 'new'), (2, 'new');");
        std::fs::write(
            files.policies.join("pg.toml"),
            format!(
                "[resource.pg]\nprotocol = \"postgres\"\nmatch = [\"{}\"]\ncredentials = {{ user = \"postgres\", password_file = {:?} }}\nrecord = \"full\"\napproval_timeout = \"60s\"\n",
                pg.addr(),
                pg.password_file.display().to_string()
            ),
        )
        .unwrap();
        pg
    });
    let echo = (!with_pg).then(|| {
        let echo = EchoServer::start(name);
        std::fs::write(
            files.policies.join("echo.toml"),
            format!(
                "[resource.echo]\nprotocol = \"tcp\"\nmatch = [\"{}\"]\napproval_timeout = \"60s\"\n",
                echo.addr
            ),
        )
        .unwrap();
        files.rules(
            "echo.cedar",
            "@id(\"echo-needs-approval\")\n@approval(\"required\")\npermit(principal, action == Action::\"tcp:connect\", resource == Resource::\"echo\");\n",
        );
        echo
    });
    let sshd = with_ssh.then(|| {
        let sshd = SshServer::start(name);
        std::fs::write(
            files.policies.join("box.toml"),
            format!(
                "[resource.box]\nprotocol = \"ssh\"\nmatch = [\"127.0.0.1:{}\"]\n\
                 credentials = {{ user = \"root\", private_key_file = {:?} }}\n\
                 record = \"full\"\nknown_hosts = {:?}\n",
                sshd.port,
                sshd.upstream_key.display().to_string(),
                sshd.known_hosts.display().to_string(),
            ),
        )
        .unwrap();
        files.rules(
            "box.cedar",
            "@id(\"shell\")\npermit(principal, action == Action::\"ssh:shell\", resource == Resource::\"box\");\n",
        );
        sshd
    });
    let port = free_port();
    let secret = files.dir.join("console.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let url = format!("https://127.0.0.1:{port}");
    std::fs::write(
        files.config_file(),
        format!(
            "[console]\nlisten = \"127.0.0.1:{port}\"\nissuer = \"corp\"\nclient_id = {CLIENT_ID:?}\nclient_secret_file = {:?}\nredirect_url = \"{url}/auth/callback\"\n{config}",
            secret.display().to_string()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&files);
    let agent_cg = cg.child("agent");
    daemon.tag(&agent_cg, "agent");
    let ca = files.state.join("ca").join("ca.crt");
    Console {
        agent: Placement::cgroup(cg.dir(&agent_cg)),
        _cg: cg,
        files,
        daemon,
        provider,
        url,
        ca,
        pg,
        echo,
        sshd,
    }
}

impl Console {
    fn browser(&self, sub: &str) -> Browser {
        self.provider.login_as(sub, Mode::Good);
        let b = Browser::new(&self.files.dir, &self.ca);
        let r = b.sign_in(&self.url);
        assert_eq!(
            r.status,
            200,
            "sign-in of {sub}: {r:?}\n{}",
            self.daemon.log_text()
        );
        let cookies = r.set_cookies();
        let session = cookies
            .iter()
            .find(|c| c.starts_with("__Host-portcullis="))
            .expect("session cookie");
        for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(session.contains(attr), "{attr} missing in {session}");
        }
        b
    }

    /// A recorded shell through the daemon on `box`: types `input`, returns
    /// the session's id once its recording has ended.
    fn ssh_shell(&self, input: &[u8]) -> String {
        let sshd = self.sshd.as_ref().expect("setup_with_ssh");
        let kh = sshd.agent_known_hosts(&self.files.state.join("ssh").join("host_ed25519.pub"));
        let mut cmd = Command::new("ssh");
        cmd.args(sshd.ssh_opts(&kh))
            .args(["-tt", "-p", &sshd.port.to_string(), "root@127.0.0.1"]);
        self.agent.apply(&mut cmd);
        let out = crate::ssh::run_with_input(cmd, input, std::time::Duration::from_secs(60));
        assert!(
            out.status.success(),
            "ssh: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon.log_text()
        );
        let state = self.files.state.display().to_string();
        let mut id = String::new();
        wait_until(
            std::time::Duration::from_secs(10),
            || {
                let list = self
                    .daemon
                    .json(&["sessions", "--json", "--state-dir", &state]);
                match list["sessions"].as_array().and_then(|l| {
                    l.iter().find(|i| {
                        i["protocol"] == "ssh"
                            && i["end_reason"].is_string()
                            && i["channels"].as_array().is_some_and(|c| !c.is_empty())
                    })
                }) {
                    Some(i) => {
                        id = i["id"].as_str().unwrap_or_default().to_string();
                        true
                    }
                    None => false,
                }
            },
            "the ssh session recorded and ended",
        );
        id
    }

    fn spawn_pg_client(&self, spec: Value) -> std::process::Child {
        let pg = self.pg.as_ref().unwrap();
        let mut spec = spec;
        spec["conninfo"] = json!(format!(
            "host=127.0.0.1 port={} user=agent dbname=postgres sslmode=disable connect_timeout=10",
            pg.port
        ));
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg("-c")
            .arg(PG_CLIENT)
            .arg(spec.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        self.agent.apply(&mut cmd);
        cmd.spawn().expect("python3")
    }

    fn client_output(&self, child: std::process::Child) -> Vec<Value> {
        let out = child.wait_with_output().expect("python3");
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "client output ({e}): {text}\nstderr: {}\ndaemon log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.daemon.log_text()
            )
        })
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        audit_tail(&self.files)
            .into_iter()
            .filter(|e| e["type"] == kind)
            .collect()
    }
}

#[test]
fn console_signs_in_with_oidc_and_approves_a_held_statement_under_cedar_and_four_eyes() {
    let s = setup("console", true);
    // Without a session every page is the login redirect, and a POST is
    // refused outright.
    let anon = Browser::new(&s.files.dir, &s.ca);
    for page in [
        "/",
        "/requests",
        "/sessions",
        "/grants",
        "/audit",
        "/sessions/x",
    ] {
        let r = anon.get(&format!("{}{page}", s.url));
        assert_eq!(r.status, 302, "{page}: {r:?}");
        let to = r.header("location").unwrap();
        assert!(
            to.starts_with(&format!("{}/authorize?", s.provider.url)),
            "{to}"
        );
        for p in [
            "code_challenge=",
            "state=",
            "nonce=",
            "client_id=portcullis-console",
        ] {
            assert!(to.contains(p), "{p} missing in {to}");
        }
        assert!(
            !r.body.contains("<table"),
            "no page content without a session"
        );
    }
    let r = anon.post(&format!("{}/requests/r-1/approve", s.url), "csrf=x");
    assert_eq!(r.status, 403, "{r:?}");

    // A held UPDATE from the tagged agent.
    let child = s.spawn_pg_client(json!({"steps": [
        {"sql": "update orders set state = 'paid' where id = 1"},
        {"sql": "select state from orders where id = 1"},
    ]}));
    let pending = s.daemon.wait_pending(1);
    let id = pending[0]["id"].as_str().unwrap().to_string();
    let approve = format!("{}/requests/{id}/approve", s.url);

    // A reviewer Cedar does not permit sees no request and cannot approve.
    let mallory = s.browser("mallory");
    let page = mallory.get(&format!("{}/requests", s.url));
    assert_eq!(page.status, 200);
    assert!(!page.body.contains(&id), "mallory may not view pg requests");
    let csrf = mallory.csrf(&page.body);
    let r = mallory.post(&approve, &format!("csrf={csrf}"));
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.body.contains("no rule permits console:approve"),
        "{}",
        r.body
    );
    assert_eq!(mallory.get(&format!("{}/audit", s.url)).status, 403);

    // The agent's own subject as reviewer: four-eyes refuses.
    let own = s.browser("sub-agent");
    let page = own.get(&format!("{}/requests", s.url));
    assert!(page.body.contains(&id), "{}", page.body);
    let r = own.post(&approve, &format!("csrf={}", own.csrf(&page.body)));
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.body.contains("nobody approves their own agent"),
        "{}",
        r.body
    );

    // A permitted reviewer: without or with a wrong CSRF token, refused.
    let alice = s.browser("reviewer-alice");
    let page = alice.get(&format!("{}/requests", s.url));
    assert!(
        page.body.contains(&id)
            && page
                .body
                .contains("<span class=k>update</span> orders <span class=k>set</span> state"),
        "{}",
        page.body
    );
    assert_eq!(alice.post(&approve, "for=").status, 403);
    assert_eq!(alice.post(&approve, "csrf=wrong").status, 403);
    // Another reviewer's token is not this session's.
    let foreign = own.csrf(&own.get(&format!("{}/requests", s.url)).body);
    assert_ne!(foreign, alice.csrf(&page.body));
    assert_eq!(alice.post(&approve, &format!("csrf={foreign}")).status, 403);
    // Nothing ran so far.
    assert_eq!(
        s.pg.as_ref()
            .unwrap()
            .sql("select state from orders where id = 1")
            .trim(),
        "new"
    );
    assert_eq!(s.daemon.requests("pending").len(), 1);

    let csrf = alice.csrf(&page.body);
    let r = alice.post(&approve, &format!("csrf={csrf}&reason=looks+fine"));
    assert_eq!(r.status, 303, "{r:?}\n{}", s.daemon.log_text());
    let out = s.client_output(child);
    assert_eq!(out[1]["rows"], json!([["paid"]]), "{out:?}");
    // Deciding twice is refused.
    let again = alice.post(&approve, &format!("csrf={csrf}"));
    assert_eq!(again.status, 409, "{again:?}");
    // A request that does not exist.
    assert_eq!(
        alice
            .post(
                &format!("{}/requests/r-nope-1/deny", s.url),
                &format!("csrf={csrf}")
            )
            .status,
        404
    );

    // Deny with a reason: the agent reads it in its error.
    let child = s.spawn_pg_client(json!({"steps": [
        {"sql": "update orders set state = 'void' where id = 2"},
    ]}));
    let pending = s.daemon.wait_pending(1);
    let id2 = pending[0]["id"].as_str().unwrap().to_string();
    let r = alice.post(
        &format!("{}/requests/{id2}/deny", s.url),
        &format!("csrf={csrf}&reason=not+during+the+freeze"),
    );
    assert_eq!(r.status, 303, "{r:?}");
    let out = s.client_output(child);
    assert_eq!(out[0]["error"], "42501", "{out:?}");
    assert!(
        out[0]["message"]
            .as_str()
            .unwrap()
            .contains("not during the freeze"),
        "{out:?}"
    );

    // The audit log names the reviewers' subjects.
    let decided: Vec<Value> = s
        .events("access_request")
        .into_iter()
        .filter(|e| e["detail"]["via"] == "console")
        .collect();
    assert_eq!(decided.len(), 2, "{decided:?}");
    assert_eq!(decided[0]["approver"], "reviewer-alice");
    assert_eq!(decided[0]["decision"], "allow");
    assert_eq!(decided[0]["detail"]["request"], id.as_str());
    assert_eq!(decided[1]["decision"], "deny");
    let refusals = s.events("console_refused");
    assert!(
        refusals.iter().any(|e| e["approver"] == "mallory"),
        "{refusals:?}"
    );
    assert!(
        refusals.iter().any(|e| e["approver"] == "sub-agent"),
        "{refusals:?}"
    );
    assert!(
        refusals.iter().any(|e| e["reason"] == "CSRF token missing"),
        "{refusals:?}"
    );

    // Sessions, replay and audit pages.
    let session = pending[0]["session"].as_str().unwrap();
    // The recorder writes off the data path: wait for the session's end.
    let replay_url = format!("{}/sessions/{session}", s.url);
    wait_until(
        std::time::Duration::from_secs(20),
        || alice.get(&replay_url).body.contains(", ended "),
        "the session's recording to be complete",
    );
    let sessions = alice.get(&format!("{}/sessions", s.url));
    assert_eq!(sessions.status, 200);
    assert!(sessions.body.contains(session), "{}", sessions.body);
    let replay = alice.get(&replay_url);
    assert_eq!(replay.status, 200, "{replay:?}");
    assert!(
        replay
            .body
            .contains("<span class=k>update</span> orders <span class=k>set</span> state = <span class=s>&#39;void&#39;</span> <span class=k>where</span> id = <span class=n>2</span>"),
        "{}",
        replay.body
    );
    assert!(
        replay.body.contains("not during the freeze"),
        "{}",
        replay.body
    );
    assert_eq!(
        mallory.get(&format!("{}/sessions/{session}", s.url)).status,
        403
    );
    let audit = alice.get(&format!("{}/audit", s.url));
    assert_eq!(audit.status, 200);
    assert!(audit.body.contains("Chain verified"), "{}", audit.body);
    assert!(audit.body.contains("reviewer-alice"), "{}", audit.body);
}

#[test]
fn console_refuses_forged_expired_and_misbound_sign_ins() {
    let s = setup("consolebad", false);
    for (mode, why) in [
        (Mode::Forged, "bad signature"),
        (Mode::Expired, "expired"),
        (Mode::WrongNonce, "nonce"),
        (Mode::WrongAudience, "audience"),
    ] {
        s.provider.login_as("reviewer-eve", mode);
        let b = Browser::new(&s.files.dir, &s.ca);
        let r = b.sign_in(&s.url);
        assert_eq!(r.status, 403, "{mode:?}: {r:?}");
        assert!(r.body.contains(why), "{mode:?}: {}", r.body);
        assert!(
            !r.set_cookies()
                .iter()
                .any(|c| c.starts_with("__Host-portcullis=")),
            "{mode:?}: no session"
        );
        // Still signed out.
        assert_eq!(b.get(&format!("{}/requests", s.url)).status, 302);
    }
    // A callback whose state this browser did not start.
    s.provider.login_as("reviewer-eve", Mode::Good);
    let victim = Browser::new(&s.files.dir, &s.ca);
    let first = victim.get(&format!("{}/requests", s.url));
    let back = victim.get(&first.header("location").unwrap());
    let callback = back.header("location").unwrap();
    let attacker = Browser::new(&s.files.dir, &s.ca);
    let r = attacker.get(&callback);
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("state"), "{}", r.body);
    // The code was not spent by the refusal; the right browser completes
    // once, and a replay of the same callback is refused.
    let ok = victim.get(&callback);
    assert_eq!(ok.status, 200, "{ok:?}\n{}", s.daemon.log_text());
    assert_eq!(victim.get(&callback).status, 403);
    let refused = s.events("console_sign_in");
    assert!(
        refused.iter().filter(|e| e["decision"] == "deny").count() >= 6,
        "{refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|e| e["decision"] == "allow" && e["approver"] == "reviewer-eve"),
        "{refused:?}"
    );
}

#[test]
fn console_approves_for_a_duration_ends_a_session_and_revokes_the_grant() {
    let s = setup("consoleops", false);
    let echo = s.echo.as_ref().unwrap();
    let to = json!({"host": "127.0.0.1", "port": echo.addr.port()});
    let alice = s.browser("reviewer-alice");
    // The Requests page listens to server-sent events; a new request is one.
    let page = alice.get(&format!("{}/requests", s.url));
    assert!(page.body.contains("data-live=1"), "{}", page.body);
    let sse_out = s.files.dir.join("sse.txt");
    let mut sse = Command::new("curl")
        .args(["-sN", "--max-time", "60", "--cacert"])
        .arg(&s.ca)
        .arg("-b")
        .arg(&alice.jar)
        .arg("-o")
        .arg(&sse_out)
        .arg(format!("{}/events", s.url))
        .spawn()
        .expect("curl");
    let sse_text = || std::fs::read_to_string(&sse_out).unwrap_or_default();
    wait_until(
        std::time::Duration::from_secs(20),
        || sse_text().contains(": connected"),
        "the event stream to open",
    );
    let held = HeldClient::spawn(&s.agent, to.clone(), &s.files.dir);
    let id = s.daemon.wait_pending(1)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until(
        std::time::Duration::from_secs(20),
        || sse_text().contains("event: jit"),
        "an event for the new request",
    );
    let _ = sse.kill();
    let _ = sse.wait();
    let page = alice.get(&format!("{}/requests", s.url));
    let csrf = alice.csrf(&page.body);
    let r = alice.post(
        &format!("{}/requests/{id}/approve", s.url),
        &format!("csrf={csrf}&for=1h&reason=maintenance"),
    );
    assert_eq!(r.status, 303, "{r:?}");
    assert!(held.finish().echo_ok());
    let grants = s.daemon.json(&["grants", "--json"])["grants"].clone();
    assert_eq!(grants.as_array().unwrap().len(), 1, "{grants}");
    assert_eq!(grants[0]["created_by"], "reviewer-alice");
    let grant = grants[0]["id"].as_str().unwrap().to_string();
    let page = alice.get(&format!("{}/grants", s.url));
    assert!(page.body.contains(&grant), "{}", page.body);

    // A live session under the grant, ended from the console.
    let mut args = to.clone();
    args["wait_close"] = json!(30);
    let live = HeldClient::start(&s.agent, args, &s.files.dir);
    let flow = s
        .daemon
        .flows()
        .into_iter()
        .find(|f| f["resource"] == "echo")
        .expect("live flow");
    let session = flow["session"].as_str().unwrap().to_string();
    let page = alice.get(&format!("{}/sessions", s.url));
    assert!(
        page.body.contains(&format!("/sessions/{session}/end")),
        "{}",
        page.body
    );
    let mallory = s.browser("mallory");
    let mcsrf = mallory.csrf(&mallory.get(&format!("{}/sessions", s.url)).body);
    let end = format!("{}/sessions/{session}/end", s.url);
    assert_eq!(mallory.post(&end, &format!("csrf={mcsrf}")).status, 403);
    assert_eq!(alice.post(&end, "").status, 403, "no CSRF token");
    assert_eq!(alice.post(&end, &format!("csrf={csrf}")).status, 303);
    let r = live.finish();
    assert!(
        matches!(r.0["closed"].as_str(), Some("reset" | "eof")),
        "{r:?}"
    );
    let killed = s.events("session_killed");
    assert!(
        killed
            .iter()
            .any(|e| e["session"] == session.as_str() && e["approver"] == "reviewer-alice"),
        "{killed:?}"
    );

    // Revoke: refused to mallory, done by alice, audited with her subject.
    let revoke = format!("{}/grants/{grant}/revoke", s.url);
    assert_eq!(mallory.post(&revoke, &format!("csrf={mcsrf}")).status, 403);
    assert_eq!(alice.post(&revoke, &format!("csrf={csrf}")).status, 303);
    assert!(s.daemon.json(&["grants", "--json"])["grants"]
        .as_array()
        .unwrap()
        .is_empty());
    let revoked = s.events("grant_revoked");
    assert!(
        revoked
            .iter()
            .any(|e| e["approver"] == "reviewer-alice" && e["detail"]["grant"] == grant.as_str()),
        "{revoked:?}"
    );
    assert_eq!(
        alice.post(&revoke, &format!("csrf={csrf}")).status,
        404,
        "already revoked"
    );
    // Signing out ends the session: the next page is the login redirect.
    assert_eq!(
        alice
            .post(&format!("{}/auth/logout", s.url), &format!("csrf={csrf}"))
            .status,
        200
    );
    assert_eq!(alice.get(&format!("{}/requests", s.url)).status, 302);
}

const BROWSER: &str = include_str!("console_browser.py");

#[test]
fn console_in_headless_chromium_signs_in_approves_and_replays_ssh_in_the_player() {
    let s = setup_with_ssh("consolechrome");
    s.provider.login_as("reviewer-alice", Mode::Good);
    // A recorded shell first: the browser replays it in the asciinema player.
    let ssh_session = s.ssh_shell(b"echo console-replay-$((6*7))\nexit 0\n");
    {
        // What the player is given, seen by a client that checks the
        // certificate: the cast from the console, the vendored bundle
        // cached for good, and a replay page whose policy lets the bundle
        // compile its WebAssembly and nothing more.
        let b = s.browser("reviewer-alice");
        let page = b.get(&format!("{}/sessions/{ssh_session}", s.url));
        assert_eq!(page.status, 200, "{page:?}");
        let csp = page.header("content-security-policy").unwrap();
        assert!(
            csp.contains("script-src 'self' 'wasm-unsafe-eval';"),
            "{csp}"
        );
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("'unsafe-eval'"),
            "{csp}"
        );
        assert!(page.body.contains("/static/asciinema-player-3.18.0.min.js"));
        // Without JavaScript the recorded text is on the page.
        assert!(page.body.contains("console-replay-42"));
        let cast = b.get(&format!("{}/sessions/{ssh_session}/cast/0", s.url));
        assert_eq!(cast.status, 200, "{cast:?}");
        assert_eq!(
            cast.header("content-type").as_deref(),
            Some("application/x-asciicast")
        );
        let head: Value = serde_json::from_str(cast.body.lines().next().unwrap()).unwrap();
        assert_eq!(head["version"], 2);
        assert!(cast.body.contains("console-replay-42"));
        assert!(
            cast.body
                .lines()
                .skip(1)
                .all(|l| serde_json::from_str::<Value>(l).unwrap()[1] != "i"),
            "keystrokes are not served"
        );
        assert_eq!(
            b.get(&format!("{}/sessions/{ssh_session}/cast/9", s.url))
                .status,
            404
        );
        let js = b.get(&format!("{}/static/asciinema-player-3.18.0.min.js", s.url));
        assert_eq!(js.status, 200);
        assert!(js
            .header("content-type")
            .unwrap()
            .starts_with("text/javascript"));
        assert_eq!(
            js.header("cache-control").as_deref(),
            Some("public, max-age=31536000, immutable")
        );
        let css = b.get(&format!("{}/static/asciinema-player-3.18.0.css", s.url));
        assert!(css.header("content-type").unwrap().starts_with("text/css"));
        let lic = b.get(&format!(
            "{}/static/asciinema-player-3.18.0.LICENSE.txt",
            s.url
        ));
        assert!(lic.body.contains("Apache License"));
        // Other pages keep the strict policy.
        let csp = b
            .get(&format!("{}/requests", s.url))
            .header("content-security-policy")
            .unwrap();
        assert!(csp.contains("script-src 'self';"), "{csp}");
    }
    let child = s.spawn_pg_client(json!({"steps": [
        {"sql": "update orders set state = 'shipped' where id = 2"},
        {"sql": "select state from orders where id = 2"},
    ]}));
    let id = s.daemon.wait_pending(1)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let profile = s.files.dir.join("chromium-profile");
    // Screenshots are kept as artifacts of the test run.
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    println!("console screenshots: {}", shots.display());
    let spec = json!({
        "url": s.url, "request": id,
        "replay": ssh_session, "marker": "console-replay-42",
        "profile": profile.display().to_string(),
        "shots": shots.display().to_string(),
    });
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(BROWSER)
        .arg(spec.to_string())
        .output()
        .expect("python3 with selenium (cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "browser driver ({e}): {text}\nstderr: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            s.daemon.log_text()
        )
    });
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["signed_in_as"], "reviewer-alice", "{r}");
    assert!(
        r["command_shown"]
            .as_str()
            .unwrap()
            .contains("update orders set state = 'shipped'"),
        "{r}"
    );
    assert!(r["after"].as_str().unwrap().contains(&id), "{r}");
    // The vendored player loaded under the page's CSP and played the
    // recording: its terminal shows the command's output.
    assert_eq!(r["player_version"], true, "{r}");
    assert!(
        r["player_text"]
            .as_str()
            .unwrap()
            .contains("console-replay-42"),
        "{r}"
    );
    assert!(
        r["audit_chain"]
            .as_str()
            .unwrap()
            .starts_with("Chain verified"),
        "{r}"
    );
    let rows = s.client_output(child);
    assert_eq!(rows[1]["rows"], json!([["shipped"]]), "{rows:?}");
    let decided: Vec<Value> = s
        .events("access_request")
        .into_iter()
        .filter(|e| e["detail"]["via"] == "console")
        .collect();
    assert_eq!(decided.len(), 1, "{decided:?}");
    assert_eq!(decided[0]["approver"], "reviewer-alice");
    for page in [
        "requests",
        "requests-decided",
        "sessions",
        "grants",
        "audit",
        "replay-ssh",
    ] {
        assert!(
            shots.join(format!("{page}.png")).is_file(),
            "{page} screenshot"
        );
    }
}

/// Two daemons sharing a fleet store (a real PostgreSQL): node A holds an
/// agent's connection; node B's console lists it with A's name and approves
/// it; the agent on A continues and both nodes' logs say who approved.
#[test]
fn console_on_one_fleet_node_lists_and_approves_a_hold_on_another() {
    require_root();
    let store = PgServer::start("consolefleet");
    store.sql("create database fleet");
    let fleet = |node: &str| {
        format!(
            "[fleet]\nstore = \"postgres://postgres@127.0.0.1:{}/fleet\"\npassword_file = {:?}\nnode = {node:?}\n",
            store.port,
            store.password_file.display().to_string()
        )
    };
    let b = setup_with("consolefleetb", false, false, &fleet("node-b"));
    let echo = b.echo.as_ref().unwrap();
    // Node A: no console, the same echo resource behind approval.
    let cg_a = TestCgroup::new("consolefleeta");
    let files_a = DaemonFiles::new(&cg_a.rel);
    files_a.rules(
        "allow.cedar",
        "@id(\"echo-needs-approval\")\n@approval(\"required\")\npermit(principal, action == Action::\"tcp:connect\", resource == Resource::\"echo\");\n",
    );
    files_a.tcp_resources_with(
        "echo.toml",
        &[("echo", vec![echo.addr.to_string()])],
        "approval_timeout = \"60s\"\n",
    );
    std::fs::write(files_a.config_file(), fleet("node-a")).unwrap();
    let daemon_a = Daemon::start(&files_a);
    let agent_cg = cg_a.child("agent");
    daemon_a.tag(&agent_cg, "agent");
    let place = Placement::cgroup(cg_a.dir(&agent_cg));
    let held = HeldClient::spawn(
        &place,
        json!({"host": "127.0.0.1", "port": echo.addr.port(), "timeout": 30}),
        &files_a.dir,
    );
    let pending = b.daemon.wait_pending(1);
    assert_eq!(pending[0]["node"], "node-a", "{pending:?}");
    let id = pending[0]["id"].as_str().unwrap().to_string();

    let alice = b.browser("reviewer-alice");
    let page = alice.get(&format!("{}/requests", b.url));
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.body.contains("id=fleet"),
        "the page says it is the fleet's queue"
    );
    let card_at = page
        .body
        .find(&format!("id=\"req-{id}\""))
        .unwrap_or_else(|| panic!("{id} listed on node B:\n{}", page.body));
    let card = &page.body[card_at..];
    let card = &card[..card.find("</div>").unwrap()];
    assert!(card.contains("at node <b class=node>node-a</b>"), "{card}");
    let csrf = alice.csrf(&page.body);
    let r = alice.post(
        &format!("{}/requests/{id}/approve", b.url),
        &format!("csrf={csrf}&reason=checked+from+node-b"),
    );
    assert_eq!(
        r.status,
        303,
        "{r:?}\n{}\n{}",
        b.daemon.log_text(),
        daemon_a.log_text()
    );
    held.wait_ready();
    let out = held.finish();
    assert!(out.echo_ok(), "{out:?}\n{}", daemon_a.log_text());
    // Node B's log: the console's decision, with the reviewer.
    let decided: Vec<Value> = b
        .events("access_request")
        .into_iter()
        .filter(|e| e["detail"]["via"] == "console")
        .collect();
    assert_eq!(decided.len(), 1, "{decided:?}");
    assert_eq!(decided[0]["approver"], "reviewer-alice");
    // Node A's log: the released command names the same approver.
    let cmds: Vec<Value> = audit_tail(&files_a)
        .into_iter()
        .filter(|e| e["session"] == pending[0]["session"] && e["decision"] == "allow")
        .collect();
    assert!(
        cmds.iter()
            .any(|e| e["approver"].as_str() == Some("reviewer-alice")),
        "{cmds:#?}"
    );
    // The decided list on B shows where it was held.
    let page = alice.get(&format!("{}/requests", b.url));
    assert!(page.body.contains("<td>node-a</td>"), "{}", page.body);
}

#[test]
fn console_one_time_demo_sign_in_opens_one_session_once_and_is_audited() {
    let s = setup_with(
        "consoleonce",
        false,
        false,
        "demo_sign_in = \"reviewer-demo\"\n",
    );
    // The link is in the state dir, for root only.
    let file = s.files.state.join("console-sign-in");
    let mode = std::fs::metadata(&file).expect("link file").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let link = std::fs::read_to_string(&file).unwrap().trim().to_string();
    let prefix = format!("{}/login/once?token=", s.url);
    assert!(link.starts_with(&prefix), "{link}");
    let token = &link[prefix.len()..];
    assert_eq!(token.len(), 64, "{token}");

    // A wrong token: refused, and it does not spend the real one.
    let guesser = Browser::new(&s.files.dir, &s.ca);
    let wrong = guesser.get(&format!("{prefix}{}", "0".repeat(64)));
    assert_eq!(wrong.status, 403, "{wrong:?}");
    assert!(wrong.body.contains("wrong"), "{}", wrong.body);
    assert!(!wrong
        .set_cookies()
        .iter()
        .any(|c| c.starts_with("__Host-portcullis=")));

    // The link signs in: an ordinary session cookie, then pages.
    let b = Browser::new(&s.files.dir, &s.ca);
    let r = b.get(&link);
    assert_eq!(r.status, 200, "{r:?}\n{}", s.daemon.log_text());
    let cookies = r.set_cookies();
    let session = cookies
        .iter()
        .find(|c| c.starts_with("__Host-portcullis="))
        .expect("session cookie");
    for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(session.contains(attr), "{attr} missing in {session}");
    }
    let page = b.get(&format!("{}/requests", s.url));
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("reviewer-demo"), "{}", page.body);
    assert!(!b.csrf(&page.body).is_empty());
    // Cedar still decides what the reviewer sees (RULES permit reviewer-*).
    assert_eq!(b.get(&format!("{}/audit", s.url)).status, 200);

    // The second use is refused, with no session.
    let again = Browser::new(&s.files.dir, &s.ca);
    let second = again.get(&link);
    assert_eq!(second.status, 403, "{second:?}");
    assert!(second.body.contains("already used"), "{}", second.body);
    assert!(!second
        .set_cookies()
        .iter()
        .any(|c| c.starts_with("__Host-portcullis=")));
    assert_eq!(again.get(&format!("{}/requests", s.url)).status, 302);

    let events: Vec<Value> = s
        .events("console_sign_in")
        .into_iter()
        .filter(|e| e["detail"]["method"] == "one-time")
        .collect();
    assert!(
        events.iter().any(|e| e["decision"] == "allow"
            && e["approver"] == "reviewer-demo"
            && e["detail"]["issuer"] == "urn:portcullis:one-time-sign-in"),
        "{events:?}"
    );
    let denied: Vec<&Value> = events.iter().filter(|e| e["decision"] == "deny").collect();
    assert!(
        denied
            .iter()
            .any(|e| e["reason"].as_str().unwrap_or("").contains("wrong")),
        "{events:?}"
    );
    assert!(
        denied
            .iter()
            .any(|e| e["reason"].as_str().unwrap_or("").contains("already used")),
        "{events:?}"
    );
}
