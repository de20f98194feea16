use std::time::Duration;

use super::*;

fn temp_dir() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "portcullis-jit-{}-{}-{}",
        std::process::id(),
        now_ms(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn new_request(identity: &str) -> NewRequest {
    NewRequest {
        identity: identity.into(),
        resource: "db".into(),
        action: "postgres:update".into(),
        command: "UPDATE t SET x = 1 WHERE id = 2".into(),
        fingerprint: Some("fp1".into()),
        context: serde_json::json!({}),
        session: "s-1".into(),
        policies: vec!["rule".into()],
    }
}

#[tokio::test]
async fn approve_releases_the_waiter_once_and_for_creates_a_grant() {
    let dir = temp_dir();
    let (jit, failed) = Jit::load(&dir).unwrap();
    assert!(failed.is_empty());
    let mut events = jit.subscribe();
    let (req, rx) = jit.hold(new_request("a"), Duration::from_secs(60)).unwrap();
    assert!(matches!(
        events.recv().await.unwrap(),
        JitEvent::RequestCreated { .. }
    ));
    let (decided, grant) = jit
        .approve(
            &req.id,
            "uid:0",
            Some(Duration::from_secs(60)),
            Some("ok".into()),
        )
        .unwrap();
    assert_eq!(decided.status.label(), "approved");
    let grant = grant.unwrap();
    assert_eq!(
        rx.await.unwrap(),
        Resolution::Approved {
            by: "uid:0".into(),
            grant: Some(grant.id.clone())
        }
    );
    // Once only.
    assert!(matches!(
        jit.approve(&req.id, "uid:0", None, None),
        Err(JitError::AlreadyDecided { .. })
    ));
    assert!(matches!(
        jit.deny(&req.id, "uid:0", "x".into()),
        Err(JitError::AlreadyDecided { .. })
    ));
    // The grant covers the same action and fingerprint only.
    assert!(jit
        .grant_covering("a", "db", "postgres:update", Some("fp1"))
        .is_some());
    assert!(jit
        .grant_covering("a", "db", "postgres:update", Some("fp2"))
        .is_none());
    assert!(jit
        .grant_covering("a", "db", "postgres:delete", Some("fp1"))
        .is_none());
    assert!(jit
        .grant_covering("b", "db", "postgres:update", Some("fp1"))
        .is_none());
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn deny_and_timeout_resolve_the_waiter() {
    let dir = temp_dir();
    let (jit, _) = Jit::load(&dir).unwrap();
    let (r1, rx1) = jit.hold(new_request("a"), Duration::from_secs(60)).unwrap();
    jit.deny(&r1.id, "uid:0", "not today".into()).unwrap();
    assert_eq!(
        rx1.await.unwrap(),
        Resolution::Denied {
            by: "uid:0".into(),
            reason: "not today".into()
        }
    );
    let (r2, rx2) = jit
        .hold(new_request("a"), Duration::from_millis(10))
        .unwrap();
    jit.time_out(&r2.id).unwrap();
    assert_eq!(rx2.await.unwrap(), Resolution::TimedOut);
    let (r3, _rx3) = jit.hold(new_request("a"), Duration::from_secs(60)).unwrap();
    assert_eq!(jit.abandon(&r3.id).unwrap().status.label(), "abandoned");
    assert!(matches!(jit.get("r-nope"), Err(JitError::NoRequest(_))));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn pending_requests_are_capped_per_identity() {
    let dir = temp_dir();
    let (jit, _) = Jit::load(&dir).unwrap();
    let mut keep = Vec::new();
    for _ in 0..MAX_PENDING_PER_IDENTITY {
        keep.push(jit.hold(new_request("a"), Duration::from_secs(60)).unwrap());
    }
    assert!(matches!(
        jit.hold(new_request("a"), Duration::from_secs(60)),
        Err(JitError::TooManyPending { .. })
    ));
    assert!(jit.hold(new_request("b"), Duration::from_secs(60)).is_ok());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn restart_keeps_grants_and_fails_pending_requests() {
    let dir = temp_dir();
    {
        let (jit, _) = Jit::load(&dir).unwrap();
        let _held = jit.hold(new_request("a"), Duration::from_secs(60)).unwrap();
        jit.create_grant(
            "a",
            "db",
            vec!["postgres".into()],
            None,
            Duration::from_secs(60),
            "uid:0",
            None,
            None,
        )
        .unwrap();
        jit.create_grant(
            "a",
            "db",
            vec!["postgres:select".into()],
            None,
            Duration::from_millis(1),
            "uid:0",
            None,
            None,
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(5));
    let (jit, failed) = Jit::load(&dir).unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(jit.requests()[0].status.label(), "failed");
    assert_eq!(
        jit.grants().len(),
        1,
        "expired grant dropped, live one kept"
    );
    // A protocol-wide grant covers every action of it.
    assert!(jit
        .grant_covering("a", "db", "postgres:delete", None)
        .is_some());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn grants_expire_and_revoke() {
    let dir = temp_dir();
    let (jit, _) = Jit::load(&dir).unwrap();
    let g = jit
        .create_grant(
            "a",
            "db",
            vec!["tcp:connect".into()],
            None,
            Duration::from_millis(20),
            "uid:0",
            None,
            None,
        )
        .unwrap();
    assert!(jit.grant_covering("a", "db", "tcp:connect", None).is_some());
    std::thread::sleep(Duration::from_millis(30));
    assert!(
        jit.grant_covering("a", "db", "tcp:connect", None).is_none(),
        "expired grants cover nothing"
    );
    assert_eq!(jit.expire().len(), 1);
    let g2 = jit
        .create_grant(
            "a",
            "db",
            vec!["tcp:connect".into()],
            None,
            Duration::from_secs(60),
            "uid:0",
            None,
            None,
        )
        .unwrap();
    assert_ne!(g.id, g2.id);
    jit.revoke(&g2.id, "uid:0").unwrap();
    assert!(jit.grant_covering("a", "db", "tcp:connect", None).is_none());
    assert!(matches!(
        jit.revoke(&g2.id, "uid:0"),
        Err(JitError::NoGrant(_))
    ));
    assert!(jit
        .create_grant(
            "a",
            "db",
            vec!["nope:x".into()],
            None,
            Duration::from_secs(1),
            "uid:0",
            None,
            None
        )
        .is_err());
    assert!(jit
        .create_grant(
            "a",
            "db",
            vec!["tcp:connect".into()],
            None,
            Duration::ZERO,
            "uid:0",
            None,
            None
        )
        .is_err());
    std::fs::remove_dir_all(dir).unwrap();
}
