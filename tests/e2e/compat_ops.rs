//! Small operator frictions (issue 19, item 12): `portcullis audit verify
//! DIR` finds the checkpoint key beside a state dir's own audit directory.

use std::{fs, process::Command, time::Duration};

use serde_json::json;

use crate::harness::*;

fn verify(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .args(args)
        .output()
        .expect("audit verify");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn audit_verify_finds_the_key_beside_the_state_dirs_audit_directory() {
    require_root();
    let cg = TestCgroup::new("compat-verify");
    let server = EchoServer::start("compat-verify");
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    let daemon = Daemon::start(&files);
    let agent = cg.child("agent");
    daemon.tag(&agent, "agent");
    let r = client(
        &Placement::cgroup(cg.dir(&agent)),
        json!({"host": "127.0.0.1", "port": server.addr.port()}),
    );
    assert!(r.echo_ok(), "{r:?}");
    assert!(
        audit_tail(&files).len() > 1,
        "the daemon wrote audit events"
    );
    let audit_dir = files.state.join("audit");
    let key = files.state.join("audit.pub");
    assert!(key.is_file(), "the daemon keeps {}", key.display());
    let audit = audit_dir.to_str().expect("utf-8 path");
    // A --state-dir that holds no key: only the key beside DIR can be found.
    let nowhere = files.dir.join("no-state");
    let nowhere = nowhere.to_str().expect("utf-8 path");

    // The state dir's own audit directory, no --pubkey: verifies with the
    // key beside it, and says which key it used. Wait for the first signed
    // checkpoint (at most 10 s after an event), so the key is really used.
    let (mut ok, mut out, mut err) = (false, String::new(), String::new());
    wait_until(
        Duration::from_secs(30),
        || {
            (ok, out, err) = verify(&[audit, "--state-dir", nowhere]);
            !ok || !out.contains("no signed checkpoint")
        },
        "a signed checkpoint",
    );
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("audit log OK"), "{out}");
    let canonical_key = fs::canonicalize(&key).expect("canonical key");
    assert!(
        err.contains(&format!(
            "checkpoint public key: {}",
            canonical_key.display()
        )),
        "{err}"
    );

    // A copy of the log without a key beside it: refused, naming every
    // place looked at and how to give the key.
    let copy = files.dir.join("copy").join("audit");
    fs::create_dir_all(&copy).expect("mkdir copy");
    for entry in fs::read_dir(&audit_dir).expect("read audit dir") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            fs::copy(entry.path(), copy.join(entry.file_name())).expect("copy");
        }
    }
    let copy_s = copy.to_str().expect("utf-8 path");
    let (ok, out, err) = verify(&[copy_s, "--state-dir", nowhere]);
    assert!(!ok, "no key anywhere must not verify:\n{out}\n{err}");
    let beside = fs::canonicalize(files.dir.join("copy"))
        .expect("canonical")
        .join("audit.pub");
    for want in [
        "no checkpoint public key".to_string(),
        format!("looked for {}", beside.display()),
        format!("{nowhere}/audit.pub"),
        "--pubkey".to_string(),
    ] {
        assert!(err.contains(&want), "missing {want:?} in {err}");
    }

    // The same copy with --pubkey verifies (the key is what makes it so).
    let key_s = key.to_str().expect("utf-8 path");
    let (ok, out, err) = verify(&[copy_s, "--state-dir", nowhere, "--pubkey", key_s]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");

    // A key beside the copy that is not the daemon's does not verify it:
    // the key found beside DIR is used, not trusted blindly.
    // A valid Ed25519 public key (the curve's base point) that did not sign
    // these checkpoints.
    let other_daemon_key = "5866666666666666666666666666666666666666666666666666666666666666";
    fs::write(files.dir.join("copy").join("audit.pub"), other_daemon_key).expect("write");
    let (ok, out, err) = verify(&[copy_s, "--state-dir", nowhere]);
    assert!(!ok, "a foreign key must not verify the log:\n{out}\n{err}");
    assert!(
        !err.contains("not an Ed25519 public key"),
        "the key loads; the signatures fail: {err}"
    );
    assert!(err.contains("does not verify"), "{out}\n{err}");
    drop(daemon);
}
