//! The plain TCP relay (kernel-to-kernel `splice`): large transfers arrive
//! intact both ways at once, a half-close passes in both directions with
//! data still flowing the other way, a reset on either side reaches the
//! other as a reset, and the session's byte counts are the bytes relayed.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use serde_json::{json, Value};

use super::harness::*;

/// Bytes each way in the integrity test.
const BIG: u64 = 48 << 20;

/// What the upstream saw on its last connection.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// sha256 (hex) of every byte received before EOF.
    digest: Option<String>,
    /// sha256 (hex) of every byte sent (mode `b`).
    sent: Option<String>,
    received: u64,
    /// Bytes received after the upstream had half-closed its own side.
    late: Vec<u8>,
    /// How reading ended: "eof", "reset" or another error.
    ended: Option<String>,
}

/// A real upstream whose behaviour the client picks with its first byte:
/// `b`: stream `BIG` pseudo-random bytes down while hashing what comes up
/// (and what went down),
/// then half-close; `h`: half-close at once, then read what still comes;
/// `a`: read to EOF, then answer with the count and close; `r`: reset;
/// `w`: wait for the client to reset, and note how reading ended.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

impl Upstream {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        thread::spawn(move || {
            for c in listener.incoming().flatten() {
                let s = s.clone();
                thread::spawn(move || serve(c, &s));
            }
        });
        Self { addr, seen }
    }

    fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }
}

fn ended(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::ConnectionReset {
        "reset".into()
    } else {
        format!("{e}")
    }
}

/// A xorshift stream (cheap, and no run of equal bytes a relay could
/// get away with mixing up).
fn pattern(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let b = state.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn serve(mut c: TcpStream, seen: &Mutex<Seen>) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
    let mut mode = [0u8; 1];
    if c.read_exact(&mut mode).is_err() {
        return;
    }
    match mode[0] {
        b'b' => {
            let mut w = c.try_clone().expect("clone");
            let writer = thread::spawn(move || {
                use sha2::Digest;
                let mut h = sha2::Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                let mut state = 0x5eed_d0d0_u64;
                let mut left = BIG;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    pattern(&mut buf[..n], &mut state);
                    if w.write_all(&buf[..n]).is_err() {
                        return None;
                    }
                    h.update(&buf[..n]);
                    left -= n as u64;
                }
                let _ = w.shutdown(Shutdown::Write);
                Some(hex::encode(h.finalize()))
            });
            let (digest, received, end) = hash_to_eof(&mut c);
            let sent = writer.join().ok().flatten();
            let mut s = seen.lock().unwrap();
            s.digest = Some(digest);
            s.sent = sent;
            s.received = received;
            s.ended = Some(end);
        }
        b'h' => {
            let _ = c.write_all(b"bye for now\n");
            let _ = c.shutdown(Shutdown::Write);
            let mut late = Vec::new();
            let end = match c.read_to_end(&mut late) {
                Ok(_) => "eof".to_string(),
                Err(e) => ended(&e),
            };
            let mut s = seen.lock().unwrap();
            s.late = late;
            s.ended = Some(end);
        }
        b'a' => {
            let (_, received, end) = hash_to_eof(&mut c);
            // Written after the agent's EOF reached us: must still arrive.
            let _ = c.write_all(format!("got {received} after your eof\n").as_bytes());
            let mut s = seen.lock().unwrap();
            s.received = received;
            s.ended = Some(end);
        }
        b'r' => {
            let sock = socket2::Socket::from(c);
            let _ = sock.set_linger(Some(Duration::ZERO));
        }
        b'w' => {
            let mut buf = [0u8; 4096];
            let end = loop {
                match c.read(&mut buf) {
                    Ok(0) => break "eof".to_string(),
                    Ok(_) => {}
                    Err(e) => break ended(&e),
                }
            };
            seen.lock().unwrap().ended = Some(end);
        }
        _ => {}
    }
}

fn hash_to_eof(c: &mut TcpStream) -> (String, u64, String) {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let end = loop {
        match c.read(&mut buf) {
            Ok(0) => break "eof".to_string(),
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) => break ended(&e),
        }
    };
    (hex::encode(h.finalize()), total, end)
}

/// The agent side, in Python in the tagged cgroup.
const AGENT: &str = r#"
import hashlib, json, os, socket, struct, sys, threading
a = json.loads(sys.argv[1])
out = {"error": None}
try:
    s = socket.create_connection(("127.0.0.1", a["port"]), timeout=60)
    s.sendall(a["mode"].encode())
    if a["mode"] == "b":
        sent = hashlib.sha256()
        def send():
            left = a["bytes"]
            while left > 0:
                chunk = os.urandom(min(left, 1 << 16))
                s.sendall(chunk)
                sent.update(chunk)
                left -= len(chunk)
            s.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=send)
        t.start()
        got, n = hashlib.sha256(), 0
        while True:
            d = s.recv(1 << 16)
            if not d:
                break
            got.update(d)
            n += len(d)
        t.join()
        out.update(sent=sent.hexdigest(), received=n, got=got.hexdigest())
    elif a["mode"] == "h":
        f = s.makefile("rb")
        out["first"] = f.read().decode()
        s.sendall(b"still talking after your eof\n")
        s.shutdown(socket.SHUT_WR)
    elif a["mode"] == "a":
        s.sendall(b"x" * 100000)
        s.shutdown(socket.SHUT_WR)
        out["answer"] = s.makefile("rb").read().decode()
    elif a["mode"] == "r":
        try:
            d = s.recv(1)
            out["closed"] = "eof" if d == b"" else "data"
        except ConnectionResetError:
            out["closed"] = "reset"
    elif a["mode"] == "w":
        s.sendall(b"about to reset\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        import time; time.sleep(0.5)
        s.close()
except Exception as e:
    out["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"#;

fn agent(place: &Placement, port: u16, mode: &str, bytes: u64) -> Value {
    let mut cmd = std::process::Command::new("python3");
    cmd.args([
        "-c",
        AGENT,
        &json!({"port": port, "mode": mode, "bytes": bytes}).to_string(),
    ]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    place.apply(&mut cmd);
    let out = cmd.output().expect("spawn python3");
    parse_client(&out.stdout, &out.stderr).0
}

struct Setup {
    cg: TestCgroup,
    up: Upstream,
    files: DaemonFiles,
    daemon: Daemon,
    place: Placement,
}

fn setup(name: &str) -> Setup {
    require_root();
    let cg = TestCgroup::new(name);
    let up = Upstream::start();
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("relay.toml", &[("relay", vec![up.addr.to_string()])]);
    let daemon = Daemon::start(&files);
    let agent_cg = cg.child("agent");
    daemon.tag(&agent_cg, "a");
    let place = Placement::cgroup(cg.dir(&agent_cg));
    Setup {
        cg,
        up,
        files,
        daemon,
        place,
    }
}

/// The `session_end` records in the audit log.
fn session_ends(files: &DaemonFiles) -> Vec<Value> {
    super::audit_events(files, &[])
        .into_iter()
        .filter(|e| e["type"] == "session_end")
        .collect()
}

#[test]
fn splice_relay_keeps_large_transfers_intact_both_ways_at_once() {
    let s = setup("relaybig");
    let r = agent(&s.place, s.up.addr.port(), "b", BIG);
    assert_eq!(r["error"], Value::Null, "{r}");
    let seen = s.up.seen();
    // Up: what the agent hashed is what the upstream hashed.
    assert_eq!(seen.received, BIG, "{seen:?}");
    assert_eq!(seen.digest.as_deref(), r["sent"].as_str(), "{seen:?} {r}");
    assert_eq!(seen.ended.as_deref(), Some("eof"));
    // Down: every byte of the upstream's stream, in order.
    assert_eq!(r["received"], BIG, "{r}");
    assert!(seen.sent.is_some(), "{seen:?}");
    assert_eq!(r["got"].as_str(), seen.sent.as_deref(), "{r} {seen:?}");
    // The session's counts are the bytes relayed each way.
    let mut ends = Vec::new();
    wait_until(
        Duration::from_secs(10),
        || {
            ends = session_ends(&s.files);
            !ends.is_empty()
        },
        "session_end audited",
    );
    assert_eq!(ends[0]["reason"], "closed", "{:?}", ends[0]);
    assert_eq!(ends[0]["bytes"]["from_client"], BIG + 1, "{:?}", ends[0]);
    assert_eq!(ends[0]["bytes"]["to_client"], BIG, "{:?}", ends[0]);
    let _ = (&s.cg, &s.daemon);
}

#[test]
fn half_close_passes_both_ways_with_data_still_flowing() {
    let s = setup("relayhalf");
    // The agent half-closes first; the upstream answers after that EOF.
    let r = agent(&s.place, s.up.addr.port(), "a", 0);
    assert_eq!(r["error"], Value::Null, "{r}");
    assert_eq!(r["answer"], "got 100000 after your eof\n", "{r}");
    assert_eq!(s.up.seen().ended.as_deref(), Some("eof"));
    // The upstream half-closes first; the agent still sends after it.
    let r = agent(&s.place, s.up.addr.port(), "h", 0);
    assert_eq!(r["error"], Value::Null, "{r}");
    assert_eq!(r["first"], "bye for now\n", "{r}");
    wait_until(
        Duration::from_secs(10),
        || s.up.seen().ended.is_some() && !s.up.seen().late.is_empty(),
        "the late bytes reach the upstream",
    );
    let seen = s.up.seen();
    assert_eq!(seen.late, b"still talking after your eof\n", "{seen:?}");
    assert_eq!(seen.ended.as_deref(), Some("eof"), "{seen:?}");
    let _ = (&s.cg, &s.daemon);
}

#[test]
fn a_reset_on_either_side_reaches_the_other_as_a_reset() {
    let s = setup("relayrst");
    let r = agent(&s.place, s.up.addr.port(), "r", 0);
    assert_eq!(r["error"], Value::Null, "{r}");
    assert_eq!(
        r["closed"], "reset",
        "the upstream's reset reaches the agent: {r}"
    );
    wait_until(
        Duration::from_secs(10),
        || {
            session_ends(&s.files)
                .iter()
                .any(|e| e["reason"] == "reset by the upstream")
        },
        "session_end says the upstream reset",
    );
    let r = agent(&s.place, s.up.addr.port(), "w", 0);
    assert_eq!(r["error"], Value::Null, "{r}");
    wait_until(
        Duration::from_secs(10),
        || s.up.seen().ended.is_some(),
        "the upstream sees the agent's reset",
    );
    assert_eq!(
        s.up.seen().ended.as_deref(),
        Some("reset"),
        "{:?}",
        s.up.seen()
    );
    wait_until(
        Duration::from_secs(10),
        || {
            session_ends(&s.files)
                .iter()
                .any(|e| e["reason"] == "reset by the agent")
        },
        "session_end says the agent reset",
    );
    let _ = (&s.cg, &s.daemon);
}
