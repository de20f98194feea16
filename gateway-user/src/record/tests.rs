//! Tests of recordings as a whole: the files real tools read (asciinema,
//! HAR), crash safety, bounds, the readers and replay.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use super::*;

struct TempDir(crate::testutil::TempDir);

impl TempDir {
    fn new(tag: &str) -> Self {
        Self(crate::testutil::TempDir::new("record", tag))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

fn cfg(dir: &Path) -> RecorderConfig {
    RecorderConfig {
        flush_interval: Duration::from_millis(50),
        ..RecorderConfig::new(dir.join("sessions"))
    }
}

fn meta(id: &str, protocol: &str, record: &str) -> SessionMeta {
    SessionMeta {
        id: id.into(),
        protocol: protocol.into(),
        resource: format!("{protocol}-res"),
        identity: "alice".into(),
        cgroup: "/agents/a".into(),
        pid: 4242,
        client: "10.0.0.2:41234".into(),
        original_dst: "10.0.0.9:5432".into(),
        started_ms: now_ms(),
        record: record.into(),
    }
}

fn read_info(sessions: &Path, id: &str) -> SessionInfo {
    let bytes = fs::read(sessions.join(id).join(META_FILE)).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn statement(i: usize) -> PgStatementRecord {
    PgStatementRecord {
        time_ms: now_ms(),
        statement: format!("SELECT * FROM orders WHERE id = $1 -- {i}"),
        params: vec![Some(i.to_string()), None],
        action: "select".into(),
        decision: "allow".into(),
        reason: Some("policy orders-read".into()),
        policy_ids: vec!["orders-read".into()],
        rows: Some(2),
        columns: Some(vec!["id".into(), "email".into()]),
        result_rows: Some(vec![
            vec![Some("1".into()), Some("a***@example.com".into())],
            vec![Some("2".into()), None],
        ]),
        ..Default::default()
    }
}

fn exchange(i: usize) -> HarEntry {
    HarEntry {
        started_ms: now_ms(),
        method: if i.is_multiple_of(2) { "GET" } else { "POST" }.into(),
        url: format!("https://api.example.com/v1/items/{i}?page={i}&q=x"),
        http_version: "HTTP/1.1".into(),
        request_headers: vec![
            ("Host".into(), "api.example.com".into()),
            ("Authorization".into(), "Bearer sk-secret-token".into()),
            ("Content-Type".into(), "application/json".into()),
        ],
        request_body_size: Some(11),
        request_body: Some(b"{\"item\":42}".to_vec()),
        status: 200,
        status_text: "OK".into(),
        response_http_version: "HTTP/1.1".into(),
        response_headers: vec![("Content-Type".into(), "text/plain".into())],
        response_body_size: Some(5),
        response_body: Some(b"hello".to_vec()),
        send_ms: 0.5,
        wait_ms: 10.25,
        receive_ms: 1.0,
        action: "http:GET".into(),
        decision: "allow".into(),
        policy_ids: vec!["api-read".into()],
        ..Default::default()
    }
}

#[test]
fn handles_can_move_between_tasks() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Recorder>();
    send_sync::<SessionRecording>();
    send_sync::<AsciicastChannel>();
}

// ---------------------------------------------------------------- asciicast

/// Runs Debian's `asciinema cat FILE` and returns what it printed. It opens
/// `/dev/tty`, so it runs in a new session with a pty as its controlling
/// terminal; its stdout is a pipe.
fn asciinema_cat(path: &Path) -> Vec<u8> {
    let bin = Path::new("/usr/bin/asciinema");
    assert!(
        bin.exists(),
        "asciinema is not installed (Debian's asciinema 2.2 at /usr/bin/asciinema): \
         run `cargo xtask setup`, which installs it (CI installs it too)"
    );
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into the given ints; null name,
    // termios and winsize are allowed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
    let home = TempDir::new("asciinema-home");
    let mut cmd = Command::new(bin);
    cmd.arg("cat")
        .arg(path)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LC_ALL", "C.UTF-8")
        .env("HOME", home.path())
        .env("ASCIINEMA_CONFIG_HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run asciinema");
    // SAFETY: both fds came from openpty above and are closed once.
    unsafe {
        libc::close(slave);
        libc::close(master);
    }
    assert!(
        out.status.success(),
        "asciinema cat {} failed ({}): {}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn asciicast_plays_in_asciinema_with_split_utf8_invalid_bytes_and_resize() {
    let tmp = TempDir::new("cast");
    let rec = Recorder::start_with(cfg(tmp.path())).unwrap();
    let sessions = rec.sessions_dir().to_owned();
    let s = rec.session(meta("1a21a1d542d-7", "ssh", "full")).unwrap();
    let ch = s.ssh_channel_with(SshChannel {
        channel: 3,
        kind: "shell",
        command: None,
        width: 120,
        height: 40,
        term: Some("xterm-256color"),
    });
    let chunks: &[&[u8]] = &[
        b"$ ls\r\n\x1b[1;34mdir\x1b[0m  caf",
        b"\xc3", // 'é' split across two chunks
        b"\xa9.txt\r\n",
        b"bad \xff byte \xe2\x82", // an invalid byte, then a split '€'
        b"\xac\r\n\x1b]0;title\x07\x1b[2J\x1b[H",
        b"\xf0\x9f\x98",
        b"\x80 done\r\n",
    ];
    ch.input(b"ls\r");
    for (i, c) in chunks.iter().enumerate() {
        ch.output(c);
        if i == 2 {
            ch.resize(100, 30);
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    ch.exit(0);
    let exec = s.ssh_channel(4, "exec", Some("uname -a"), 0, 0);
    exec.output(b"Linux\n");
    exec.exit_signal("KILL");
    drop(exec);
    s.end("client closed");
    rec.flush();

    let expected = "$ ls\r\n\x1b[1;34mdir\x1b[0m  café.txt\r\nbad \u{fffd} byte €\r\n\
                    \x1b]0;title\x07\x1b[2J\x1b[H\u{1f600} done\r\n";
    let path = sessions.join("1a21a1d542d-7").join("ssh-3.cast");
    let printed = asciinema_cat(&path);
    assert_eq!(String::from_utf8(printed).unwrap(), expected);

    // Header fields.
    let text = fs::read_to_string(&path).unwrap();
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert_eq!(header["width"], 120);
    assert_eq!(header["height"], 40);
    assert!(header["timestamp"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(header["env"]["TERM"], "xterm-256color");
    assert!(header["title"].as_str().unwrap().contains("1a21a1d542d-7"));
    assert!(header.get("command").is_none());

    // Events: monotonic times, the three codes, every line valid JSON.
    let mut last = 0.0;
    let mut codes = Vec::new();
    for line in lines {
        let (t, code, _data): (f64, String, String) = serde_json::from_str(line).unwrap();
        assert!(t >= last, "time went back: {t} < {last}");
        last = t;
        codes.push(code);
    }
    assert!(last > 0.0);
    assert_eq!(codes.first().map(String::as_str), Some("i"));
    assert!(codes.contains(&"r".to_owned()));
    // Two chunks held only the start of a character: no event of their own.
    assert_eq!(codes.iter().filter(|c| *c == "o").count(), chunks.len() - 2);
    let cast = read_cast(&path).unwrap();
    assert!(cast
        .events
        .iter()
        .any(|e| e.code == "r" && e.data == "100x30"));

    // The exec channel: command in the header, 80x24 without a pty.
    let exec_path = sessions.join("1a21a1d542d-7").join("ssh-4.cast");
    assert_eq!(asciinema_cat(&exec_path), b"Linux\n");
    let cast = read_cast(&exec_path).unwrap();
    assert_eq!(cast.header["command"], "uname -a");
    assert_eq!(cast.header["width"], 80);
    assert_eq!(cast.header["height"], 24);

    let info = read_info(&sessions, "1a21a1d542d-7");
    assert_eq!(info.end_reason.as_deref(), Some("client closed"));
    assert_eq!(info.counts.ssh_channels, 2);
    assert_eq!(info.channels[0].file, "ssh-3.cast");
    assert_eq!(info.channels[0].exit_code, Some(0));
    assert_eq!(info.channels[1].exit_signal.as_deref(), Some("KILL"));
    assert!(info.channels.iter().all(|c| c.ended_ms.is_some()));
}

#[test]
fn asciicast_metadata_mode_has_no_input_and_reused_channels_get_new_files() {
    let tmp = TempDir::new("cast-meta");
    let rec = Recorder::start_with(cfg(tmp.path())).unwrap();
    let sessions = rec.sessions_dir().to_owned();
    let s = rec.session(meta("s-1", "ssh", "metadata")).unwrap();
    for round in 0..2 {
        let ch = s.ssh_channel(0, "exec", Some("id"), 0, 0);
        ch.input(b"secret typed text");
        ch.output(format!("out {round}\n").as_bytes());
        // A carried incomplete sequence at the end becomes U+FFFD.
        ch.output(b"\xe2\x82");
        ch.exit(round);
    }
    s.end("done");
    rec.flush();
    let dir = sessions.join("s-1");
    for (file, round) in [("ssh-0.cast", 0), ("ssh-0-2.cast", 1)] {
        let cast = read_cast(&dir.join(file)).unwrap();
        assert!(cast.events.iter().all(|e| e.code == "o"), "{file}");
        let out: String = cast.events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(out, format!("out {round}\n\u{fffd}"));
        assert_eq!(asciinema_cat(&dir.join(file)), out.as_bytes());
    }
    let text = fs::read_to_string(dir.join("ssh-0.cast")).unwrap();
    assert!(!text.contains("secret typed text"));
    let info = read_info(&sessions, "s-1");
    assert_eq!(info.channels.len(), 2);
    assert_eq!(info.channels[1].file, "ssh-0-2.cast");
    assert_eq!(info.channels[1].exit_code, Some(1));
}

// ---------------------------------------------------------------- HAR

/// Checks that `har` is a HAR 1.2 document with every required field, and
/// `entries` entries. Returns the entries.
fn check_har(har: &Value, entries: usize) -> Vec<Value> {
    fn has(v: &Value, path: &str, key: &str, pred: fn(&Value) -> bool) {
        let field = v
            .get(key)
            .unwrap_or_else(|| panic!("{path}.{key} is missing in {v}"));
        assert!(pred(field), "{path}.{key} has the wrong type: {field}");
    }
    let string = |v: &Value| v.is_string();
    let number = |v: &Value| v.is_number();
    let array = |v: &Value| v.is_array();
    let object = |v: &Value| v.is_object();
    let nv_list = |v: &Value| {
        v.as_array().is_some_and(|a| {
            a.iter()
                .all(|p| p["name"].is_string() && p["value"].is_string())
        })
    };

    let log = har.get("log").expect("log");
    has(log, "log", "version", |v| v == "1.2");
    has(log, "log", "creator", object);
    has(&log["creator"], "log.creator", "name", string);
    has(&log["creator"], "log.creator", "version", string);
    has(log, "log", "entries", array);
    let list = log["entries"].as_array().unwrap().clone();
    assert_eq!(list.len(), entries, "entries");
    for (i, e) in list.iter().enumerate() {
        let p = format!("entries[{i}]");
        has(e, &p, "startedDateTime", |v| {
            v.as_str()
                .is_some_and(|s| s.ends_with('Z') && crate::audit::parse_since(s).is_ok())
        });
        has(e, &p, "time", number);
        has(e, &p, "request", object);
        has(e, &p, "response", object);
        has(e, &p, "cache", object);
        has(e, &p, "timings", object);
        let req = &e["request"];
        let rp = format!("{p}.request");
        has(req, &rp, "method", string);
        has(req, &rp, "url", string);
        has(req, &rp, "httpVersion", string);
        has(req, &rp, "cookies", array);
        has(req, &rp, "headers", nv_list);
        has(req, &rp, "queryString", nv_list);
        has(req, &rp, "headersSize", number);
        has(req, &rp, "bodySize", number);
        if let Some(post) = req.get("postData") {
            has(post, &format!("{rp}.postData"), "mimeType", string);
        }
        let resp = &e["response"];
        let sp = format!("{p}.response");
        has(resp, &sp, "status", number);
        has(resp, &sp, "statusText", string);
        has(resp, &sp, "httpVersion", string);
        has(resp, &sp, "cookies", array);
        has(resp, &sp, "headers", nv_list);
        has(resp, &sp, "content", object);
        has(&resp["content"], &format!("{sp}.content"), "size", number);
        has(
            &resp["content"],
            &format!("{sp}.content"),
            "mimeType",
            string,
        );
        has(resp, &sp, "redirectURL", string);
        has(resp, &sp, "headersSize", number);
        has(resp, &sp, "bodySize", number);
        let tp = format!("{p}.timings");
        let mut sum = 0.0;
        for k in ["send", "wait", "receive"] {
            has(&e["timings"], &tp, k, number);
            sum += e["timings"][k].as_f64().unwrap();
        }
        let time = e["time"].as_f64().unwrap();
        assert!((time - sum).abs() < 1e-6, "{p}.time {time} != {sum}");
    }
    list
}

fn parse_file(path: &Path) -> Value {
    let bytes = fs::read(path).unwrap();
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

#[test]
fn har_is_valid_after_every_flush_and_after_a_drop_without_end() {
    let tmp = TempDir::new("har");
    let rec = Recorder::start_with(cfg(tmp.path())).unwrap();
    let sessions = rec.sessions_dir().to_owned();
    let har_path = sessions.join("h-1").join(HAR_FILE);

    let s = rec.session(meta("h-1", "http", "full")).unwrap();
    for i in 0..6 {
        s.http_exchange(exchange(i));
        if i % 2 == 1 {
            rec.flush();
            check_har(&parse_file(&har_path), i + 1);
        }
    }
    // Several entries in one flush.
    for i in 6..10 {
        s.http_exchange(exchange(i));
    }
    rec.flush();
    let entries = check_har(&parse_file(&har_path), 10);
    let e = &entries[1];
    assert_eq!(e["request"]["method"], "POST");
    assert_eq!(e["request"]["queryString"][0]["value"], "1");
    assert_eq!(e["request"]["postData"]["text"], "{\"item\":42}");
    assert_eq!(e["response"]["content"]["text"], "hello");
    assert_eq!(e["_portcullis"]["decision"], "allow");
    let raw = fs::read_to_string(&har_path).unwrap();
    assert!(!raw.contains("sk-secret-token"), "Authorization leaked");

    // A session handle dropped without end(): the file is still complete and
    // the session is ended as abandoned.
    drop(s);
    rec.flush();
    check_har(&parse_file(&har_path), 10);
    let info = read_info(&sessions, "h-1");
    assert_eq!(info.end_reason.as_deref(), Some("abandoned"));
    assert_eq!(info.counts.http_exchanges, 10);

    // Metadata mode keeps no bodies; bodies are capped in full mode.
    let small = RecorderConfig {
        body_max_bytes: 3,
        ..cfg(tmp.path())
    };
    drop(rec);
    let rec = Recorder::start_with(small).unwrap();
    let m = rec.session(meta("h-2", "http", "metadata")).unwrap();
    let f = rec.session(meta("h-3", "http", "full")).unwrap();
    m.http_exchange(exchange(0));
    f.http_exchange(exchange(0));
    m.end("done");
    f.end("done");
    rec.flush();
    let e = &check_har(&parse_file(&sessions.join("h-2").join(HAR_FILE)), 1)[0];
    assert!(e["request"].get("postData").is_none());
    assert!(e["response"]["content"].get("text").is_none());
    assert_eq!(e["response"]["content"]["size"], 5);
    let e = &check_har(&parse_file(&sessions.join("h-3").join(HAR_FILE)), 1)[0];
    assert_eq!(e["response"]["content"]["text"], "hel");
    assert_eq!(e["response"]["content"]["_truncated"], true);
    assert_eq!(e["request"]["postData"]["_truncated"], true);
}

/// The child half of [`a_crash_loses_at_most_a_flush_interval_and_is_recovered`]:
/// records, waits past the flush interval, and kills itself with SIGKILL.
/// Does nothing unless run by that test.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("PORTCULLIS_RECORD_CRASH_DIR") else {
        return;
    };
    let cfg = RecorderConfig {
        flush_interval: Duration::from_millis(100),
        ..RecorderConfig::new(PathBuf::from(dir))
    };
    let rec = Recorder::start_with(cfg).unwrap();
    let h = rec.session(meta("c-http", "http", "full")).unwrap();
    let p = rec.session(meta("c-pg", "postgres", "full")).unwrap();
    let s = rec.session(meta("c-ssh", "ssh", "full")).unwrap();
    let ch = s.ssh_channel(0, "shell", None, 80, 24);
    for i in 0..7 {
        h.http_exchange(exchange(i));
        p.postgres_statement(statement(i));
        ch.output(format!("line {i}\r\n").as_bytes());
    }
    // Well past the flush interval, then die without ending anything.
    std::thread::sleep(Duration::from_millis(1200));
    // SAFETY: kill(2) on our own pid.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    unreachable!("SIGKILL did not kill the test process");
}

#[test]
fn a_crash_loses_at_most_a_flush_interval_and_is_recovered() {
    use std::os::unix::process::ExitStatusExt as _;
    let tmp = TempDir::new("crash");
    let sessions = tmp.path().join("sessions");
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "record::tests::crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PORTCULLIS_RECORD_CRASH_DIR", &sessions)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");

    // What the crash left: every file readable, everything recorded more than
    // a flush interval before the crash is there, sessions look active.
    check_har(&parse_file(&sessions.join("c-http").join(HAR_FILE)), 7);
    let pg = read_postgres(&sessions.join("c-pg").join(POSTGRES_FILE)).unwrap();
    assert_eq!(pg.len(), 7);
    let cast_path = sessions.join("c-ssh").join("ssh-0.cast");
    let cast = read_cast(&cast_path).unwrap();
    assert_eq!(cast.events.len(), 7);
    let listed = list_sessions(&sessions).unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(SessionInfo::is_active));

    // Make it worse: torn final lines, as a crash in mid-write leaves them.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(sessions.join("c-pg").join(POSTGRES_FILE))
        .unwrap();
    f.write_all(b"{\"time_ms\":1,\"statem").unwrap();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&cast_path)
        .unwrap();
    f.write_all(b"[0.5, \"o\", \"torn").unwrap();
    let har_path = sessions.join("c-http").join(HAR_FILE);
    let mut har = fs::read(&har_path).unwrap();
    har.truncate(har.len() - har::TAIL.len());
    har.extend_from_slice(b",\n{\"startedDateTime\":\"2026-");
    fs::write(&har_path, har).unwrap();
    // The readers skip torn final lines.
    assert_eq!(
        read_postgres(&sessions.join("c-pg").join(POSTGRES_FILE))
            .unwrap()
            .len(),
        7
    );
    assert_eq!(read_cast(&cast_path).unwrap().events.len(), 7);

    // The next start recovers: files repaired, sessions ended.
    let rec = Recorder::start_with(cfg(tmp.path())).unwrap();
    check_har(&parse_file(&har_path), 7);
    let pg_bytes = fs::read(sessions.join("c-pg").join(POSTGRES_FILE)).unwrap();
    assert_eq!(pg_bytes.last(), Some(&b'\n'));
    assert_eq!(
        asciinema_cat(&cast_path),
        (0..7)
            .map(|i| format!("line {i}\r\n"))
            .collect::<String>()
            .as_bytes()
    );
    for info in list_sessions(&sessions).unwrap() {
        assert!(!info.is_active(), "{}", info.meta.id);
        assert!(info.recovered);
        assert!(info.ended_ms.unwrap() >= info.meta.started_ms);
    }
    let info = read_info(&sessions, "c-http");
    assert_eq!(info.counts.http_exchanges, 7);
    let info = read_info(&sessions, "c-pg");
    assert_eq!(info.counts.statements, 7);
    assert_eq!(info.recorded_bytes, pg_bytes.len() as u64);
    let info = read_info(&sessions, "c-ssh");
    assert_eq!(info.channels.len(), 1);
    assert!(info.channels[0].ended_ms.is_some());
    drop(rec);
}

// ---------------------------------------------------------------- postgres

#[test]
fn postgres_lines_parse_and_results_are_capped_in_full_mode_only() {
    let tmp = TempDir::new("pg");
    let c = RecorderConfig {
        result_max_rows: 3,
        result_max_bytes: 100,
        text_max_bytes: 40,
        ..cfg(tmp.path())
    };
    let rec = Recorder::start_with(c).unwrap();
    let sessions = rec.sessions_dir().to_owned();
    let full = rec.session(meta("pg-full", "postgres", "full")).unwrap();
    let md = rec.session(meta("pg-md", "postgres", "metadata")).unwrap();

    // Under the caps: kept whole.
    full.postgres_statement(statement(1));
    // Too many rows: cut to 3.
    let mut many = statement(2);
    many.result_rows = Some((0..10).map(|i| vec![Some(i.to_string())]).collect());
    many.rows = Some(10);
    full.postgres_statement(many);
    // Too many bytes: 3 rows of 40 bytes pass 100, so 2 are kept.
    let mut wide = statement(3);
    wide.result_rows = Some((0..3).map(|_| vec![Some("x".repeat(36))]).collect());
    full.postgres_statement(wide);
    // A long statement and parameter are cut at a character boundary.
    let mut long = statement(4);
    long.statement = format!("SELECT '{}'", "é".repeat(40));
    long.params = vec![Some("p".repeat(100))];
    long.result_rows = None;
    full.postgres_statement(long);
    // A denied statement with an error.
    full.postgres_statement(PgStatementRecord {
        time_ms: now_ms(),
        statement: "DROP TABLE orders".into(),
        action: "drop".into(),
        decision: "deny".into(),
        error: Some("denied by policy".into()),
        ..Default::default()
    });
    md.postgres_statement(statement(5));
    full.end("done");
    md.end("done");
    rec.flush();

    let path = sessions.join("pg-full").join(POSTGRES_FILE);
    for line in fs::read_to_string(&path).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(v["statement"].is_string() && v["decision"].is_string());
    }
    let recs = read_postgres(&path).unwrap();
    assert_eq!(recs.len(), 5);
    assert_eq!(recs[0].result_rows.as_ref().unwrap().len(), 2);
    assert!(!recs[0].truncated);
    assert_eq!(recs[0].params, vec![Some("1".into()), None]);
    assert_eq!(recs[1].result_rows.as_ref().unwrap().len(), 3);
    assert!(recs[1].truncated);
    assert_eq!(recs[1].rows, Some(10));
    assert_eq!(recs[2].result_rows.as_ref().unwrap().len(), 2);
    assert!(recs[2].truncated);
    assert!(recs[3].text_truncated);
    assert!(recs[3].statement.len() <= 40);
    assert_eq!(recs[3].params[0].as_ref().unwrap().len(), 40);
    assert_eq!(recs[4].decision, "deny");
    assert_eq!(recs[4].error.as_deref(), Some("denied by policy"));
    let raw = fs::read_to_string(&path).unwrap();
    assert_eq!(raw.matches("\"truncated\":true").count(), 2);

    let recs = read_postgres(&sessions.join("pg-md").join(POSTGRES_FILE)).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].result_rows, None);
    assert_eq!(recs[0].rows, Some(2));
    assert_eq!(recs[0].params.len(), 2);
    assert_eq!(read_info(&sessions, "pg-full").counts.statements, 5);
}

// ---------------------------------------------------------------- bounds

#[test]
fn session_cap_stops_recording_and_marks_meta() {
    let tmp = TempDir::new("cap");
    let c = RecorderConfig {
        session_max_bytes: 2000,
        ..cfg(tmp.path())
    };
    let rec = Recorder::start_with(c).unwrap();
    let sessions = rec.sessions_dir().to_owned();
    let s = rec.session(meta("cap-1", "postgres", "full")).unwrap();
    let other = rec.session(meta("cap-2", "postgres", "full")).unwrap();
    for i in 0..50 {
        s.postgres_statement(statement(i));
    }
    other.postgres_statement(statement(0));
    rec.flush();
    assert!(!s.is_recording(), "still recording past the cap");
    assert!(other.is_recording());
    // Later records are not written.
    let before = fs::metadata(sessions.join("cap-1").join(POSTGRES_FILE))
        .unwrap()
        .len();
    s.postgres_statement(statement(99));
    s.end("done");
    rec.flush();
    let path = sessions.join("cap-1").join(POSTGRES_FILE);
    let size = fs::metadata(&path).unwrap().len();
    assert_eq!(size, before);
    assert!(size <= 2000, "{size}");
    let info = read_info(&sessions, "cap-1");
    assert!(info.capped);
    assert!(info.capped_ms.is_some());
    assert_eq!(info.recorded_bytes, size);
    let n = read_postgres(&path).unwrap().len() as u64;
    assert!(n > 0 && n < 50, "{n}");
    assert_eq!(info.counts.statements, n);
    assert_eq!(info.end_reason.as_deref(), Some("done"));
    assert!(!read_info(&sessions, "cap-2").capped);
}

#[test]
fn full_queue_drops_records_without_blocking_and_counts_them() {
    let tmp = TempDir::new("queue");
    let c = RecorderConfig {
        queue_messages: 2,
        ..cfg(tmp.path())
    };
    let rec = Recorder::start_with(c).unwrap();
    let sessions = rec.sessions_dir().to_owned();
    let s = rec.session(meta("q-1", "postgres", "full")).unwrap();
    rec.flush();
    rec.hold(true);
    let started = Instant::now();
    for i in 0..10 {
        s.postgres_statement(statement(i));
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "recording blocked on a full queue: {:?}",
        started.elapsed()
    );
    assert_eq!(s.dropped(), 8);
    rec.hold(false);
    rec.flush();
    // The drop count reaches meta.json while the session is live.
    assert_eq!(read_info(&sessions, "q-1").dropped, 8);
    s.end("done");
    rec.flush();
    let info = read_info(&sessions, "q-1");
    assert_eq!(info.dropped, 8);
    assert_eq!(info.counts.statements, 2);
    assert_eq!(
        read_postgres(&sessions.join("q-1").join(POSTGRES_FILE))
            .unwrap()
            .len(),
        2
    );

    // The byte bound: one large output does not fit a small byte budget.
    drop(rec);
    let c = RecorderConfig {
        queue_bytes: 4096,
        ..cfg(tmp.path())
    };
    let rec = Recorder::start_with(c).unwrap();
    let s = rec.session(meta("q-2", "ssh", "full")).unwrap();
    let ch = s.ssh_channel(0, "shell", None, 80, 24);
    rec.flush();
    rec.hold(true);
    ch.output(&[b'a'; 10_000]);
    ch.output(b"small");
    assert_eq!(s.dropped(), 1);
    rec.hold(false);
    drop(ch);
    s.end("done");
    rec.flush();
    let cast = read_cast(&sessions.join("q-2").join("ssh-0.cast")).unwrap();
    let out: String = cast.events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(out, "small");
    assert_eq!(read_info(&sessions, "q-2").dropped, 1);
}

#[test]
fn record_off_writes_nothing_and_close_ends_open_sessions() {
    let tmp = TempDir::new("off");
    let rec = Recorder::start_with(cfg(tmp.path())).unwrap();
    let sessions = rec.sessions_dir().to_owned();
    let off = rec.session(meta("off-1", "postgres", "off")).unwrap();
    assert!(!off.is_recording());
    off.postgres_statement(statement(0));
    off.end("done");
    let open = rec.session(meta("open-1", "tcp", "metadata")).unwrap();
    open.tcp_bytes(100, 2000);
    open.tcp_bytes(1, 1);
    rec.flush();
    assert!(!sessions.join("off-1").exists());
    assert!(read_info(&sessions, "open-1").is_active());
    rec.close();
    let info = read_info(&sessions, "open-1");
    assert_eq!(info.end_reason.as_deref(), Some("recorder stopped"));
    assert_eq!(info.counts.bytes_from_client, 101);
    assert_eq!(info.counts.bytes_to_client, 2001);
    // After close, records are dropped, never blocked on.
    open.postgres_statement(statement(1));
    assert_eq!(open.dropped(), 1);
    // Invalid metadata is refused.
    let rec = Recorder::start_with(cfg(tmp.path())).unwrap();
    for bad in ["../x", "a/b", "..", ".hidden", "", "x y"] {
        assert!(matches!(
            rec.session(meta(bad, "tcp", "full")),
            Err(RecordError::BadId(_))
        ));
    }
    assert!(matches!(
        rec.session(meta("ok", "ftp", "full")),
        Err(RecordError::BadMeta(_))
    ));
    assert!(matches!(
        rec.session(meta("ok", "tcp", "everything")),
        Err(RecordError::BadMeta(_))
    ));
}

// ---------------------------------------------------------------- readers

#[test]
fn list_load_and_replay_sessions() {
    let tmp = TempDir::new("read");
    let rec = Recorder::start_with(cfg(tmp.path())).unwrap();
    let sessions = rec.sessions_dir().to_owned();

    let mut m = meta("r-ssh", "ssh", "full");
    m.started_ms -= 2;
    let ssh = rec.session(m).unwrap();
    let ch = ssh.ssh_channel(0, "exec", Some("echo hi"), 0, 0);
    ch.output(b"first ");
    std::thread::sleep(Duration::from_millis(400));
    ch.output(b"second\r\n");
    ch.exit(0);
    ssh.end("client closed");

    let mut m = meta("r-pg", "postgres", "full");
    m.started_ms -= 1;
    let pg = rec.session(m).unwrap();
    pg.postgres_statement(statement(7));
    pg.postgres_statement(PgStatementRecord {
        time_ms: now_ms(),
        statement: "DELETE FROM orders".into(),
        action: "delete".into(),
        decision: "deny".into(),
        reason: Some("forbid deletes".into()),
        ..Default::default()
    });
    pg.end("client closed");

    let http = rec.session(meta("r-http", "http", "metadata")).unwrap();
    http.http_exchange(exchange(0));

    let tcp = rec.session(meta("r-tcp", "tcp", "metadata")).unwrap();
    tcp.tcp_bytes(12, 34);
    tcp.end("client closed");
    rec.flush();

    // list: oldest first, the live one active.
    let listed = list_sessions(&sessions).unwrap();
    let ids: Vec<&str> = listed.iter().map(|i| i.meta.id.as_str()).collect();
    assert_eq!(ids[..2], ["r-ssh", "r-pg"]);
    assert_eq!(listed.len(), 4);
    let active: Vec<&str> = listed
        .iter()
        .filter(|i| i.is_active())
        .map(|i| i.meta.id.as_str())
        .collect();
    assert_eq!(active, ["r-http"]);
    assert!(list_sessions(&tmp.path().join("missing"))
        .unwrap()
        .is_empty());

    // load
    let files = load_session(&sessions, "r-ssh").unwrap();
    assert_eq!(files.casts.len(), 1);
    assert_eq!(
        files.casts[0].channel.as_ref().unwrap().command.as_deref(),
        Some("echo hi")
    );
    assert!(files.postgres.is_none() && files.har.is_none());
    assert!(load_session(&sessions, "r-pg").unwrap().postgres.is_some());
    assert!(load_session(&sessions, "r-http").unwrap().har.is_some());

    // replay: SSH output with its timing divided by the speed.
    let mut out = Vec::new();
    let t = Instant::now();
    replay(&sessions, "r-ssh", 1000.0, &mut out).unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("first second\r\n"), "{text}");
    assert!(text.contains("exit status 0"), "{text}");
    let mut out = Vec::new();
    let t = Instant::now();
    replay(&sessions, "r-ssh", 1.0, &mut out).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(380),
        "{:?}",
        t.elapsed()
    );
    let mut out = Vec::new();
    let t = Instant::now();
    replay_with(
        &sessions,
        "r-ssh",
        ReplayOptions {
            speed: 1.0,
            idle_limit: Some(0.01),
        },
        &mut out,
    )
    .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );

    let mut out = Vec::new();
    replay(&sessions, "r-pg", 0.0, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("allow select"), "{text}");
    assert!(
        text.contains("SELECT * FROM orders WHERE id = $1 -- 7"),
        "{text}"
    );
    assert!(text.contains("params: $1 = '7', $2 = NULL"), "{text}");
    assert!(text.contains("rows: 2"), "{text}");
    assert!(text.contains("| 1 | a***@example.com |"), "{text}");
    assert!(text.contains("deny delete"), "{text}");
    assert!(text.contains("reason: forbid deletes"), "{text}");

    let mut out = Vec::new();
    replay(&sessions, "r-http", 0.0, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("GET https://api.example.com/v1/items/0?page=0&q=x -> 200 (12 ms)"),
        "{text}"
    );
    assert!(text.contains("> Host: api.example.com"), "{text}");
    assert!(text.contains("> Authorization: [redacted]"), "{text}");
    assert!(text.contains("< Content-Type: text/plain"), "{text}");
    assert!(text.contains("still active"), "{text}");

    let mut out = Vec::new();
    replay(&sessions, "r-tcp", 0.0, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("bytes from client 12  to client 34"),
        "{text}"
    );

    // Ids that are not plain names never reach the file system.
    for bad in ["../x", "a/b", "..", ".", "/etc", "x\0y"] {
        assert!(
            matches!(load_session(&sessions, bad), Err(RecordError::BadId(_))),
            "{bad:?}"
        );
        assert!(matches!(
            replay(&sessions, bad, 0.0, &mut Vec::new()),
            Err(RecordError::BadId(_))
        ));
    }
    assert!(matches!(
        load_session(&sessions, "nope"),
        Err(RecordError::NotFound(_))
    ));
    http.end("done");
}

/// Binary output is recorded up to [`CAST_BINARY_MAX`] bytes from where the
/// stream turned binary; the rest is counted and the recording says so.
/// Text before it is recorded whole.
#[test]
fn binary_output_is_capped_and_the_cast_says_so() {
    let tmp = TempDir::new("cast-binary");
    let rec = Recorder::start_with(cfg(tmp.path())).unwrap();
    let sessions = rec.sessions_dir().to_owned();
    let s = rec.session(meta("s-bin", "ssh", "full")).unwrap();
    let ch = s.ssh_channel(0, "exec", Some("scp -f x"), 0, 0);
    ch.output(b"C0644 3000000 x\n");
    let chunk = vec![0u8; 32 * 1024];
    let mut sent = 0u64;
    while sent < 3_000_000 {
        ch.output(&chunk);
        ch.input(&chunk);
        sent += chunk.len() as u64;
    }
    ch.exit(0);
    s.end("done");
    rec.flush();
    let path = sessions.join("s-bin").join("ssh-0.cast");
    let size = fs::metadata(&path).unwrap().len();
    assert!(size < 1024 * 1024, "cast is {size} bytes");
    let cast = read_cast(&path).unwrap();
    let out: String = cast
        .events
        .iter()
        .filter(|e| e.code == "o")
        .map(|e| e.data.as_str())
        .collect();
    assert!(out.starts_with("C0644 3000000 x\n"), "{}", &out[..40]);
    let left_out = sent - CAST_BINARY_MAX;
    assert!(
        out.contains(&format!(
            "[portcullis: binary data; only its first 64 KiB recorded, {left_out} more bytes left out]"
        )),
        "{}",
        &out[out.len().saturating_sub(300)..]
    );
    assert!(out.contains("binary input; only its first 64 KiB recorded"));
    let info = read_info(&sessions, "s-bin");
    assert_eq!(info.channels[0].exit_code, Some(0));
}

#[test]
fn mcp_messages_are_json_lines_replayed_and_metadata_keeps_no_values() {
    let tmp = TempDir::new("mcp");
    let rec = Recorder::start_with(cfg(tmp.path())).unwrap();
    let sessions = rec.sessions_dir().to_owned();
    let call = serde_json::json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": "zebra secret"}}});
    let answer = serde_json::json!({"jsonrpc": "2.0", "id": 3,
        "result": {"content": [{"type": "text", "text": "Echo: [MASKED]"}]}});
    for (id, mode) in [("mcp-full", "full"), ("mcp-md", "metadata")] {
        let s = rec.session(meta(id, "mcp", mode)).unwrap();
        s.mcp_message(
            McpMessageRecord {
                t_ms: 12,
                from: mcp_from::AGENT.into(),
                id: 3.into(),
                method: Some("tools/call".into()),
                tool: Some("echo".into()),
                decision: Some("allow".into()),
                rule: Some("echo".into()),
                message: call.clone(),
            },
            || serde_json::json!({"argument_names": ["message"], "arguments_digest": "sha256:ab"}),
        );
        s.mcp_message(
            McpMessageRecord {
                t_ms: 15,
                from: mcp_from::SERVER.into(),
                id: 3.into(),
                method: None,
                tool: Some("echo".into()),
                decision: None,
                rule: None,
                message: answer.clone(),
            },
            || Value::Null,
        );
        s.end("done");
    }
    rec.flush();
    let full = read_mcp(&sessions.join("mcp-full").join(MCP_FILE)).unwrap();
    assert_eq!(full.len(), 2);
    assert_eq!(full[0].message, call);
    assert_eq!(full[1].message, answer);
    // Every field is written, null or not.
    let raw = fs::read_to_string(sessions.join("mcp-full").join(MCP_FILE)).unwrap();
    let first: Value = serde_json::from_str(raw.lines().next().unwrap()).unwrap();
    for k in [
        "t_ms", "from", "id", "method", "tool", "decision", "rule", "message",
    ] {
        assert!(first.get(k).is_some(), "{k} missing: {first}");
    }
    assert_eq!(read_info(&sessions, "mcp-full").counts.mcp_messages, 2);
    let mut out = Vec::new();
    replay(&sessions, "mcp-full", 0.0, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("mcp messages (2)"), "{text}");
    assert!(
        text.contains("agent      tools/call #3  tool echo  allow (rule echo)"),
        "{text}"
    );
    assert!(text.contains("Echo: [MASKED]"), "{text}");
    let md = fs::read_to_string(sessions.join("mcp-md").join(MCP_FILE)).unwrap();
    assert!(!md.contains("zebra"), "{md}");
    assert!(!md.contains("MASKED"), "{md}");
    assert!(md.contains("sha256:ab"), "{md}");
}
