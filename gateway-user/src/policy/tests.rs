use std::{fs, path::PathBuf};

use super::*;

fn dir_with(files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "portcullis-policy-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        fs::write(dir.join(name), text).unwrap();
    }
    dir
}

const BASE: &str = r#"
[issuer.corp]
url = "https://oidc.example.test"
jwks_file = "/nonexistent/jwks.json"
audience = "portcullis"

[identity.billing]
issuer = "corp"
subject = "billing-sub"

[identity.ops]
issuer = "corp"
subject = "ops-sub"

[resource.echo]
protocol = "tcp"
match = ["127.0.0.1:7001", "[::1]:7001"]

[resource.orders]
protocol = "postgres"
match = ["10.0.0.5:5432"]
credentials = { user = "agent_ro", password_file = "/etc/pw" }
approval_timeout = "90s"
record = "full"

[[mask]]
resource = "orders"
columns = ["ssn"]
detectors = ["credit_card"]
style = "partial"
"#;

fn tcp_ctx() -> serde_json::Value {
    serde_json::json!({
        "client": {"pid": 1, "cgroup": "/a", "address": "127.0.0.1:1"},
        "time": {"unix": 0, "hour": 0, "weekday": 0},
        "destination": "127.0.0.1:7001",
    })
}

fn pg_ctx(has_where: bool) -> serde_json::Value {
    serde_json::json!({
        "client": {"pid": 1, "cgroup": "/a", "address": "127.0.0.1:1"},
        "time": {"unix": 0, "hour": 0, "weekday": 0},
        "destination": "10.0.0.5:5432",
        "database": "orders", "user": "agent_ro",
        "statement": {"text": "x", "fingerprint": "f", "tables": ["orders"], "functions": [], "has_where": has_where, "volatile_functions": []},
    })
}

fn decide(
    set: &PolicySet,
    identity: &str,
    resource: &str,
    action: &str,
    ctx: serde_json::Value,
    approved: bool,
) -> Decision {
    set.decide(&DecisionRequest {
        identity,
        resource,
        action,
        context: ctx,
        approved,
    })
}

#[test]
fn loads_config_and_matches_literals() {
    let dir = dir_with(&[("a.toml", BASE)]);
    let set = PolicySet::load(&dir).unwrap();
    assert_eq!(set.version.len(), 16);
    assert_eq!(
        set.match_static(&"127.0.0.1:7001".parse().unwrap())
            .unwrap()
            .name,
        "echo"
    );
    assert!(set.match_static(&"[::1]:7001".parse().unwrap()).is_some());
    assert!(set
        .match_static(&"127.0.0.1:7002".parse().unwrap())
        .is_none());
    let orders = &set.resources["orders"];
    assert_eq!(orders.approval_timeout, std::time::Duration::from_secs(90));
    assert_eq!(orders.record, RecordMode::Full);
    assert_eq!(set.masks[0].style, "partial");
    // The version changes with the content.
    fs::write(
        dir.join("b.cedar"),
        "permit(principal, action, resource);\n",
    )
    .unwrap();
    assert_ne!(PolicySet::load(&dir).unwrap().version, set.version);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn default_deny_forbid_wins_and_approval_holds() {
    let rules = r#"
permit(principal == Identity::"billing", action == Action::"tcp:connect", resource == Resource::"echo");

@id("pg-read")
permit(principal == Identity::"billing", action == Action::"postgres:select", resource == Resource::"orders");

@id("pg-write")
@approval("required")
permit(principal == Identity::"billing",
       action in [Action::"postgres:insert", Action::"postgres:update", Action::"postgres:delete"],
       resource == Resource::"orders");

@id("no-unbounded-delete")
@reason("DELETE needs a WHERE clause")
forbid(principal, action == Action::"postgres:delete", resource)
  unless { context.statement.has_where };
"#;
    let dir = dir_with(&[("a.toml", BASE), ("orders.cedar", rules)]);
    let set = PolicySet::load(&dir).unwrap();

    let d = decide(&set, "billing", "echo", "tcp:connect", tcp_ctx(), false);
    assert_eq!(
        d,
        Decision::Allow {
            policies: vec!["orders.cedar:2".into()]
        }
    );
    // Default deny: nothing permits ops.
    let d = decide(&set, "ops", "echo", "tcp:connect", tcp_ctx(), false);
    assert!(
        matches!(&d, Decision::Deny { policies, reason } if policies.is_empty() && reason.contains("no rule permits")),
        "{d:?}"
    );
    assert_eq!(
        decide(
            &set,
            "billing",
            "orders",
            "postgres:select",
            pg_ctx(false),
            false
        )
        .label(),
        "allow"
    );
    // Only an @approval permit applies: hold, unless approved.
    let d = decide(
        &set,
        "billing",
        "orders",
        "postgres:update",
        pg_ctx(true),
        false,
    );
    assert_eq!(
        d,
        Decision::Hold {
            policies: vec!["pg-write".into()]
        }
    );
    assert_eq!(
        decide(
            &set,
            "billing",
            "orders",
            "postgres:update",
            pg_ctx(true),
            true
        )
        .label(),
        "allow"
    );
    // forbid wins, even over an approval, and its @reason is shown.
    let d = decide(
        &set,
        "billing",
        "orders",
        "postgres:delete",
        pg_ctx(false),
        true,
    );
    match d {
        Decision::Deny { reason, policies } => {
            assert_eq!(policies, vec!["no-unbounded-delete".to_string()]);
            assert!(reason.contains("DELETE needs a WHERE clause"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        decide(
            &set,
            "billing",
            "orders",
            "postgres:delete",
            pg_ctx(true),
            false
        )
        .label(),
        "hold"
    );
    // Unknown identities and resources are denied before Cedar runs.
    assert!(
        matches!(decide(&set, "ghost", "echo", "tcp:connect", tcp_ctx(), false), Decision::Deny { reason, .. } if reason.contains("not defined"))
    );
    assert!(matches!(
        decide(&set, "billing", "nope", "tcp:connect", tcp_ctx(), false),
        Decision::Deny { .. }
    ));
    // A context that does not fit the action's schema is denied, not guessed.
    assert!(
        matches!(decide(&set, "billing", "orders", "postgres:select", tcp_ctx(), false), Decision::Deny { reason, .. } if reason.contains("context"))
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_permit_without_approval_beats_an_approval_permit() {
    let rules = r#"
@approval
permit(principal, action == Action::"tcp:connect", resource);
permit(principal == Identity::"ops", action == Action::"tcp:connect", resource);
"#;
    let dir = dir_with(&[("a.toml", BASE), ("r.cedar", rules)]);
    let set = PolicySet::load(&dir).unwrap();
    assert_eq!(
        decide(&set, "ops", "echo", "tcp:connect", tcp_ctx(), false).label(),
        "allow"
    );
    assert_eq!(
        decide(&set, "billing", "echo", "tcp:connect", tcp_ctx(), false).label(),
        "hold"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn cedar_errors_report_file_line_and_column() {
    // Syntax error on line 3.
    let dir = dir_with(&[
        ("a.toml", BASE),
        (
            "bad.cedar",
            "permit(principal, action, resource);\n\npermit(principal, action resource);\n",
        ),
    ]);
    let err = PolicySet::load(&dir).unwrap_err();
    let d = &err.diagnostics[0];
    assert!(d.file.ends_with("bad.cedar"), "{err}");
    assert_eq!(d.line, Some(3), "{err}");
    assert!(d.column.is_some());
    fs::remove_dir_all(&dir).unwrap();

    // Validation: an action that does not exist, and a context attribute
    // the action does not carry.
    let dir = dir_with(&[
        ("a.toml", BASE),
        ("v.cedar", "permit(principal, action == Action::\"postgres:frobnicate\", resource);\npermit(principal, action == Action::\"tcp:connect\", resource)\n  when { context.statement.has_where };\n"),
    ]);
    let err = PolicySet::load(&dir).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("v.cedar:1:"), "{text}");
    assert!(
        text.contains("v.cedar:2:") || text.contains("v.cedar:3:"),
        "{text}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unknown_keys_and_bad_references_report_line_and_column() {
    let dir = dir_with(&[(
        "bad.toml",
        "[resource.echo]\nprotocol = \"tcp\"\nmatch = [\"127.0.0.1:7001\"]\nupstrem = \"x:1\"\n",
    )]);
    let text = PolicySet::load(&dir).unwrap_err().to_string();
    assert!(text.contains("bad.toml:4:1: "), "{text}");
    assert!(text.contains("upstrem"), "{text}");
    fs::remove_dir_all(dir).unwrap();

    let dir = dir_with(&[(
        "refs.toml",
        "[identity.a]\nissuer = \"nobody\"\nsubject = \"s\"\n\n[[mask]]\nresource = \"ghost\"\ncolumns = [\"x\"]\n",
    )]);
    let err = PolicySet::load(&dir).unwrap_err();
    assert_eq!(err.diagnostics.len(), 2, "{err}");
    assert_eq!(err.diagnostics[0].line, Some(2));
    assert!(err.diagnostics[0].message.contains("issuer `nobody`"));
    assert_eq!(err.diagnostics[1].line, Some(6));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn resource_keys_are_checked_per_protocol() {
    let dir = dir_with(&[(
        "x.toml",
        "[resource.a]\nprotocol = \"gopher\"\nmatch = [\"nope\"]\n\n[resource.b]\nprotocol = \"tcp\"\nmatch = [\"1.2.3.4:5\"]\ncredentials = { user = \"u\" }\ntls = \"intercept\"\n\n[resource.c]\nprotocol = \"http\"\nmatch = [\"1.2.3.4:443\"]\ncredentials = { basic_user = \"u\" }\napproval_timeout = \"soon\"\n",
    )]);
    let err = PolicySet::load(&dir).unwrap_err();
    let text = err.to_string();
    for needle in [
        "x.toml:2:12: unknown protocol",
        "x.toml:3:10: destination",
        "do not apply to tcp",
        "`tls` applies to http resources only",
        "basic_user and basic_password_file go together",
        "invalid duration",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn ssh_resources_need_a_held_key_and_host_key_trust() {
    let dir = dir_with(&[(
        "s.toml",
        "[resource.s]\nprotocol = \"ssh\"\nmatch = [\"10.0.0.7:22\"]\n\n\
         [resource.t]\nprotocol = \"tcp\"\nmatch = [\"10.0.0.8:22\"]\nhost_key_file = \"k\"\n",
    )]);
    let text = PolicySet::load(&dir).unwrap_err().to_string();
    for needle in [
        "s.toml:1:11: ssh resource `s` needs `known_hosts` or `host_ca`",
        "ssh resource `s` needs `credentials.private_key_file`",
        "s.toml:5:11: `known_hosts`, `host_ca`, `host_key_file` and `host_certificate_file` apply to ssh resources only",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    fs::remove_dir_all(dir).unwrap();
    let dir = dir_with(&[(
        "s.toml",
        "[resource.s]\nprotocol = \"ssh\"\nmatch = [\"10.0.0.7:22\"]\n\
         credentials = { user = \"deploy\", private_key_file = \"id\" }\nhost_ca = \"ca.pub\"\n\
         host_key_file = \"hk\"\nhost_certificate_file = \"hk-cert.pub\"\n",
    )]);
    let set = PolicySet::load(&dir).unwrap();
    let r = &set.resources["s"];
    assert_eq!(r.host_key_file.as_deref(), Some(dir.join("hk").as_path()));
    assert_eq!(
        r.host_certificate_file.as_deref(),
        Some(dir.join("hk-cert.pub").as_path())
    );
    assert_eq!(
        r.credentials.private_key_file.as_deref(),
        Some(dir.join("id").as_path())
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn two_resources_may_not_claim_one_address() {
    let dir = dir_with(&[
        (
            "a.toml",
            "[resource.a]\nprotocol = \"tcp\"\nmatch = [\"10.0.0.1:1\"]\n",
        ),
        (
            "b.toml",
            "[resource.b]\nprotocol = \"tcp\"\nmatch = [\"10.0.0.1:1\"]\n",
        ),
    ]);
    let err = PolicySet::load(&dir).unwrap_err();
    assert!(err.to_string().contains("matched by both"), "{err}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn hidden_entries_are_skipped() {
    let dir = dir_with(&[("..data", "garbage ["), (".swp.toml", "garbage [")]);
    assert!(PolicySet::load(&dir).unwrap().resources.is_empty());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn destinations_and_durations_parse() {
    assert_eq!(
        "[::ffff:10.0.0.1]:5".parse::<Destination>().unwrap(),
        Destination::Addr("10.0.0.1:5".parse().unwrap())
    );
    assert_eq!(
        "Orders.Internal:5432".parse::<Destination>().unwrap(),
        Destination::Host {
            host: "orders.internal".into(),
            port: 5432
        }
    );
    for bad in ["x", "host:", "host:0", "host:70000", "a..b:1", "1.2.3:4:5"] {
        assert!(bad.parse::<Destination>().is_err(), "{bad}");
    }
    use std::time::Duration;
    assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
    for bad in ["", "5", "m5", "5x", "1h 2m", "-3s"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

#[tokio::test]
async fn hostnames_resolve_into_the_lookup_table() {
    let dir = dir_with(&[(
        "h.toml",
        "[resource.h]\nprotocol = \"tcp\"\nmatch = [\"localhost:7009\"]\n",
    )]);
    let set = PolicySet::load(&dir).unwrap();
    let resolver = Resolver::default();
    assert!(resolver
        .lookup(&set, &"127.0.0.1:7009".parse().unwrap())
        .is_none());
    let failures = resolver.refresh(&set).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        resolver
            .lookup(&set, &"127.0.0.1:7009".parse().unwrap())
            .unwrap()
            .name,
        "h"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_shipped_example_policies_are_valid() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"));
    match PolicySet::load(&dir) {
        Ok(set) => {
            for p in ["tcp", "postgres", "ssh", "http", "mcp"] {
                assert!(
                    set.resources.values().any(|r| r.protocol.as_str() == p),
                    "policies/ has no {p} example"
                );
            }
            assert!(set.resources.values().any(|r| r.kind == "kubernetes"));
        }
        Err(e) => panic!("policies/ is invalid:\n{e}"),
    }
}

#[test]
fn rules_scoped_to_one_resource_do_not_touch_others_but_unscoped_ones_do() {
    let rules = r#"
permit(principal, action in Action::"tcp", resource);
@id("forbid-echo") forbid(principal == Identity::"ops", action, resource == Resource::"echo");
@id("forbid-ghost") forbid(principal, action, resource == Resource::"no-such-resource");
@id("forbid-all-for-billing-at-hour-25") forbid(principal == Identity::"billing", action in Action::"tcp", resource)
  when { context.time.hour == 25 };
"#;
    let extra = "[resource.other]\nprotocol = \"tcp\"\nmatch = [\"127.0.0.1:7002\"]\n";
    let dir = dir_with(&[("a.toml", BASE), ("b.toml", extra), ("r.cedar", rules)]);
    let set = PolicySet::load(&dir).unwrap();
    let d = decide(&set, "ops", "echo", "tcp:connect", tcp_ctx(), false);
    assert_eq!(d.policies(), ["forbid-echo".to_string()], "{d:?}");
    assert_eq!(
        decide(&set, "ops", "other", "tcp:connect", tcp_ctx(), false).label(),
        "allow"
    );
    let mut late = tcp_ctx();
    late["time"]["hour"] = serde_json::json!(25);
    for r in ["echo", "other"] {
        let d = decide(&set, "billing", r, "tcp:connect", late.clone(), false);
        assert_eq!(
            d.policies(),
            ["forbid-all-for-billing-at-hour-25".to_string()],
            "{r}: {d:?}"
        );
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn mask_rules_compile_per_resource_and_bad_detectors_are_located() {
    let dir = dir_with(&[("a.toml", BASE)]);
    let set = PolicySet::load(&dir).unwrap();
    let m = set.masker("orders").expect("orders has masking");
    assert_eq!(m.column(None, "ssn"), Some(crate::mask::Style::Partial));
    assert!(m.has_detectors());
    assert!(set.masker("echo").is_none());
    fs::remove_dir_all(dir).unwrap();

    let bad = format!(
        "{BASE}\n[[mask]]\nresource = \"orders\"\ndetectors = [\"email\", \"regex:(unclosed\"]\n"
    );
    let dir = dir_with(&[("a.toml", &bad)]);
    let err = PolicySet::load(&dir).unwrap_err();
    assert_eq!(err.diagnostics.len(), 1, "{err}");
    let line = bad.lines().position(|l| l.contains("unclosed")).unwrap() + 1;
    assert_eq!(err.diagnostics[0].line, Some(line));
    assert!(
        err.diagnostics[0].message.contains("regex:(unclosed"),
        "{err}"
    );
    fs::remove_dir_all(dir).unwrap();

    // `binary`: pass (default) or refuse; anything else is an error.
    assert!(!set.masker("orders").unwrap().binary_refuse());
    let refuse = format!(
        "{BASE}\n[[mask]]\nresource = \"orders\"\ndetectors = [\"email\"]\nbinary = \"refuse\"\n"
    );
    let dir = dir_with(&[("a.toml", &refuse)]);
    let set = PolicySet::load(&dir).unwrap();
    assert!(set.masker("orders").unwrap().binary_refuse());
    fs::remove_dir_all(dir).unwrap();
    let bad = refuse.replace("\"refuse\"", "\"maybe\"");
    let dir = dir_with(&[("a.toml", &bad)]);
    let err = PolicySet::load(&dir).unwrap_err();
    assert_eq!(err.diagnostics.len(), 1, "{err}");
    assert!(
        err.diagnostics[0]
            .message
            .contains("not one of pass, refuse"),
        "{err}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn passthrough_http_resources_refuse_credentials_and_kubernetes() {
    let bad = r#"[resource.api]
protocol = "http"
match = ["10.0.0.9:443"]
tls = "passthrough"
credentials = { bearer_token_file = "/etc/tok" }

[resource.kube]
protocol = "http"
kind = "kubernetes"
match = ["10.0.0.10:443"]
tls = "passthrough"
"#;
    let dir = dir_with(&[("base.toml", BASE), ("bad.toml", bad)]);
    let text = PolicySet::load(&dir).unwrap_err().to_string();
    assert!(
        text.contains("bad.toml:4:7: tls \"passthrough\" cannot inject credentials"),
        "{text}"
    );
    assert!(
        text.contains("bad.toml:11:7: kind \"kubernetes\" needs the requests"),
        "{text}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn agent_token_is_validated() {
    let good = "[resource.api]\nprotocol = \"http\"\nmatch = [\"10.0.0.9:443\"]\ntls = \"intercept\"\nagent_token = \"oidc\"\n";
    let dir = dir_with(&[("base.toml", BASE), ("good.toml", good)]);
    let set = PolicySet::load(&dir).unwrap();
    assert_eq!(set.resources["api"].agent_token, AgentToken::Oidc);
    fs::remove_dir_all(dir).unwrap();
    let bad = "[resource.api]\nprotocol = \"http\"\nmatch = [\"10.0.0.9:443\"]\nagent_token = \"maybe\"\n\n[resource.db]\nprotocol = \"tcp\"\nmatch = [\"10.0.0.10:5432\"]\nagent_token = \"oidc\"\n";
    let dir = dir_with(&[("base.toml", BASE), ("bad.toml", bad)]);
    let text = PolicySet::load(&dir).unwrap_err().to_string();
    assert!(
        text.contains("bad.toml:4:15: agent_token \"maybe\" is not one of remove, oidc"),
        "{text}"
    );
    assert!(
        text.contains(
            "bad.toml:9:15: agent_token \"oidc\": `agent_token` applies to http resources only"
        ),
        "{text}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn postgres_resource_settings_parse_and_are_validated() {
    let good = dir_with(&[(
        "pg.toml",
        "[resource.db]\nprotocol = \"postgres\"\nmatch = [\"127.0.0.1:5432\"]\nssl = \"off\"\nupstream_tls = \"verify-full\"\nupstream_ca_file = \"ca.pem\"\ndatabase = \"orders\"\n",
    )]);
    let set = PolicySet::load(&good).unwrap();
    let db = set.resources.get("db").unwrap();
    assert_eq!(db.postgres.upstream_tls, UpstreamTls::VerifyFull);
    assert_eq!(db.postgres.database.as_deref(), Some("orders"));
    assert!(!db.postgres.agent_ssl);
    fs::remove_dir_all(good).unwrap();

    // `ssl = "on"`: the daemon offers TLS to agents; default is off.
    let on = dir_with(&[(
        "pg.toml",
        "[resource.db]\nprotocol = \"postgres\"\nmatch = [\"127.0.0.1:5432\"]\nssl = \"on\"\n\n[resource.plain]\nprotocol = \"postgres\"\nmatch = [\"127.0.0.1:5433\"]\n",
    )]);
    let set = PolicySet::load(&on).unwrap();
    assert!(set.resources.get("db").unwrap().postgres.agent_ssl);
    assert!(!set.resources.get("plain").unwrap().postgres.agent_ssl);
    fs::remove_dir_all(on).unwrap();

    let bad = dir_with(&[(
        "pg.toml",
        "[resource.db]\nprotocol = \"postgres\"\nmatch = [\"127.0.0.1:5432\"]\nupstream_tls = \"maybe\"\nssl = \"yes\"\ndatabase = \"\"\n\n[resource.t]\nprotocol = \"tcp\"\nmatch = [\"127.0.0.1:1\"]\ndatabase = \"x\"\n",
    )]);
    let text = PolicySet::load(&bad).unwrap_err().to_string();
    for needle in [
        "pg.toml:4:16: upstream_tls \"maybe\" is not one of disable, prefer, require, verify-full",
        "pg.toml:5:7: ssl \"yes\" is not one of off, on",
        "pg.toml:6:12: `database` must be a non-empty name",
        "pg.toml:11:12: `database` applies to postgres resources only",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    fs::remove_dir_all(bad).unwrap();
}

#[test]
fn postgres_agent_auth_is_validated() {
    let good = dir_with(&[(
        "pg.toml",
        "[resource.db]\nprotocol = \"postgres\"\nmatch = [\"127.0.0.1:5432\"]\nagent_auth = \"token\"\n",
    )]);
    assert!(
        PolicySet::load(&good).unwrap().resources["db"]
            .postgres
            .agent_token
    );
    fs::remove_dir_all(good).unwrap();
    let bad = dir_with(&[(
        "pg.toml",
        "[resource.db]\nprotocol = \"postgres\"\nmatch = [\"127.0.0.1:5432\"]\nagent_auth = \"maybe\"\n\n[resource.t]\nprotocol = \"tcp\"\nmatch = [\"127.0.0.1:1\"]\nagent_auth = \"token\"\n",
    )]);
    let text = PolicySet::load(&bad).unwrap_err().to_string();
    for needle in [
        "pg.toml:4:14: agent_auth \"maybe\" is not one of none, token",
        "pg.toml:9:14: `agent_auth` applies to postgres resources only",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    fs::remove_dir_all(bad).unwrap();
}

#[test]
fn reviewers_are_decided_by_cedar_with_four_eyes() {
    let dir = dir_with(&[
        ("base.toml", BASE),
        (
            "console.cedar",
            r#"
@id("owners-review-orders")
permit(principal,
       action in [Action::"console:view", Action::"console:approve", Action::"console:deny"],
       resource == Resource::"orders")
  when { [Reviewer::"alice", Reviewer::"billing-sub"].contains(principal) };
@id("four-eyes")
forbid(principal, action == Action::"console:approve", resource)
  when { context.requester == principal };
@id("not-from-elsewhere")
forbid(principal, action, resource) when { context.client.address like "10.*" && context.destination != "" };
@id("auditors")
permit(principal, action == Action::"console:audit", resource)
  when { principal.subject like "audit-*" };
"#,
        ),
    ]);
    let set = PolicySet::load(&dir).expect("valid set");
    let req =
        |subject: &'static str, action: &'static str, requester: &'static str| ReviewRequest {
            subject,
            issuer: "https://oidc.example.test",
            action,
            resource: ReviewTarget::Resource("orders"),
            requester: Some(Requester {
                subject: requester,
                issuer: "https://oidc.example.test",
                identity: "billing",
                action: "postgres:update",
                command: "update t set x = 1",
            }),
            client: "127.0.0.1:5000",
            destination: "127.0.0.1:15030",
        };
    assert!(set
        .decide_reviewer(&req("alice", "console:approve", "billing-sub"))
        .is_ok());
    let own = set
        .decide_reviewer(&req("billing-sub", "console:approve", "billing-sub"))
        .unwrap_err();
    assert!(own.contains("four-eyes"), "{own}");
    // The same reviewer may still deny their own agent's request.
    assert!(set
        .decide_reviewer(&req("billing-sub", "console:deny", "billing-sub"))
        .is_ok());
    // A rule written for every action reads the reviewer's address too.
    let mut far = req("alice", "console:approve", "billing-sub");
    far.client = "10.1.2.3:4444";
    let far = set.decide_reviewer(&far).unwrap_err();
    assert!(far.contains("not-from-elsewhere"), "{far}");
    let stranger = set
        .decide_reviewer(&req("mallory", "console:approve", "billing-sub"))
        .unwrap_err();
    assert!(stranger.contains("no rule permits"), "{stranger}");
    let audit = |subject| ReviewRequest {
        subject,
        issuer: "https://oidc.example.test",
        action: "console:audit",
        resource: ReviewTarget::Console,
        requester: None,
        client: "127.0.0.1:5000",
        destination: "127.0.0.1:15030",
    };
    assert!(set.decide_reviewer(&audit("audit-bob")).is_ok());
    assert!(set.decide_reviewer(&audit("alice")).is_err());
    let _ = fs::remove_dir_all(&dir);

    // A rule written for agents, with nothing in its scope, makes no one a
    // reviewer: turning the console on grants nothing by itself.
    let open = dir_with(&[
        ("base.toml", BASE),
        (
            "open.cedar",
            "@id(\"open\")\npermit(principal, action, resource);\n",
        ),
    ]);
    let set = PolicySet::load(&open).expect("valid set");
    let refused = set
        .decide_reviewer(&req("mallory", "console:approve", "billing-sub"))
        .unwrap_err();
    assert!(refused.contains("without naming reviewers"), "{refused}");
    assert!(set.decide_reviewer(&audit("mallory")).is_err());
    let _ = fs::remove_dir_all(&open);

    // Naming the `console` action group is naming reviewers' actions.
    let group = dir_with(&[
        ("base.toml", BASE),
        (
            "group.cedar",
            "@id(\"group\")\npermit(principal, action in Action::\"console\", resource) when { principal.subject like \"rev-*\" };\n",
        ),
    ]);
    let set = PolicySet::load(&group).expect("valid set");
    assert!(set.decide_reviewer(&audit("rev-bob")).is_ok());
    assert!(set.decide_reviewer(&audit("mallory")).is_err());
    let _ = fs::remove_dir_all(&group);
}

#[test]
fn mcp_tools_declare_typed_arguments_rules_can_test() {
    let mcp = "[resource.notes]\nprotocol = \"mcp\"\nmatch = [\"10.0.0.12:8080\"]\ntls = \"none\"\ntools = { read_note = { path = \"String\" }, delete_note = { id = \"Long\" } }\n";
    let rules = r#"permit(principal == Identity::"billing", action == Action::"mcp:call_tool", resource == Resource::"notes")
  when { context.tool == "read_note" && context.arguments has path && context.arguments.path like "public/*" };
@approval("required")
permit(principal == Identity::"billing", action == Action::"mcp:call_tool", resource == Resource::"notes")
  when { context.tool == "delete_note" && context.arguments has id && context.arguments.id > 3 };
"#;
    let dir = dir_with(&[("base.toml", BASE), ("mcp.toml", mcp), ("r.cedar", rules)]);
    let set = PolicySet::load(&dir).unwrap();
    assert_eq!(
        set.resources["notes"].mcp_tools["read_note"]["path"],
        McpArgType::String
    );
    let ctx = |tool: &str, args: serde_json::Value| {
        let mut c = serde_json::json!({
            "client": {"pid": 1, "cgroup": "/", "address": "127.0.0.1:1"},
            "time": {"unix": 0, "hour": 0, "weekday": 0},
            "destination": "10.0.0.12:8080",
            "method": "tools/call", "tool": tool, "arguments": args,
            "argument_names": [], "arguments_digest": "", "uri": "", "name": "", "list": "",
        });
        c["argument_names"] = serde_json::json!(c["arguments"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>());
        c
    };
    let decide = |tool: &str, args: serde_json::Value| {
        set.decide(&DecisionRequest {
            identity: "billing",
            resource: "notes",
            action: "mcp:call_tool",
            context: ctx(tool, args),
            approved: false,
        })
    };
    use serde_json::json;
    assert!(matches!(
        decide("read_note", json!({"path": "public/a"})),
        Decision::Allow { .. }
    ));
    assert!(matches!(
        decide("read_note", json!({"path": "private/a"})),
        Decision::Deny { .. }
    ));
    assert!(matches!(
        decide("read_note", json!({})),
        Decision::Deny { .. }
    ));
    assert!(matches!(
        decide("delete_note", json!({"id": 7})),
        Decision::Hold { .. }
    ));
    assert!(matches!(
        decide("delete_note", json!({"id": 2})),
        Decision::Deny { .. }
    ));
    fs::remove_dir_all(dir).unwrap();

    // Reading an optional argument without `has` fails validation, at the
    // rule; a type clash between resources, an unknown type, `tools` on an
    // http resource and tls passthrough on mcp are errors at file:line:col.
    let unguarded = r#"permit(principal, action == Action::"mcp:call_tool", resource)
  when { context.arguments.path like "public/*" };
"#;
    let dir = dir_with(&[
        ("base.toml", BASE),
        ("mcp.toml", mcp),
        ("r.cedar", unguarded),
    ]);
    let text = PolicySet::load(&dir).unwrap_err().to_string();
    assert!(
        text.contains("r.cedar:2:10:") && text.contains("context.arguments has path"),
        "{text}"
    );
    fs::remove_dir_all(dir).unwrap();
    let bad = "[resource.other]\nprotocol = \"mcp\"\nmatch = [\"10.0.0.13:8080\"]\ntools = { t = { path = \"Long\", n = \"Float\" } }\n\n[resource.web]\nprotocol = \"http\"\nmatch = [\"10.0.0.14:80\"]\ntools = { t = { a = \"String\" } }\n\n[resource.pt]\nprotocol = \"mcp\"\nmatch = [\"10.0.0.15:443\"]\ntls = \"passthrough\"\n";
    let dir = dir_with(&[("base.toml", BASE), ("mcp.toml", mcp), ("bad.toml", bad)]);
    let text = PolicySet::load(&dir).unwrap_err().to_string();
    for needle in [
        "bad.toml:4:36: argument type \"Float\" is not one of String, Long, Bool",
        "mcp.toml:5:32: argument `path` is declared Long elsewhere",
        "bad.toml:9:9: `tools` applies to mcp resources only",
        "bad.toml:14:7: an mcp resource is decided per JSON-RPC request",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    fs::remove_dir_all(dir).unwrap();
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A context of the action's kind (every attribute its schema type has),
/// with values drawn from small pools so that rule conditions both hold
/// and fail; a pid of 2 or more overflows the generated rules that
/// multiply it (an evaluation error).
fn generated_context(g: &mut Gen, action: &str) -> serde_json::Value {
    use super::actions::ContextKind;
    let mut ctx = serde_json::json!({
        "client": {
            "pid": *g.pick(&[0, 1, 0, 1, 0, 1, 0, 1, 2, 4242]),
            "cgroup": *g.pick(&["/agents/a", "/other", "/agents/b/c"]),
            "address": "127.0.0.1:40000",
        },
        "time": {"unix": *g.pick(&[0i64, 1_800_000_000]), "hour": g.below(24), "weekday": g.below(7)},
        "destination": *g.pick(&["10.0.0.5:5432", "192.168.1.1:22", "127.0.0.1:7001"]),
    });
    let m = ctx.as_object_mut().unwrap();
    let set = |g: &mut Gen, pool: &[&str]| -> serde_json::Value {
        pool.iter().filter(|_| g.below(2) == 0).copied().collect()
    };
    match super::actions::context_of(action) {
        Some(ContextKind::Tcp) | None => {}
        Some(ContextKind::Postgres) => {
            m.insert("database".into(), (*g.pick(&["app", "orders"])).into());
            m.insert("user".into(), (*g.pick(&["agent_ro", "admin"])).into());
            m.insert(
                "statement".into(),
                serde_json::json!({
                    "text": "select 1", "fingerprint": "f",
                    "tables": set(g, &["orders", "cards", "secrets"]),
                    "functions": set(g, &["now", "pg_sleep"]),
                    "has_where": g.below(2) == 0,
                    "volatile_functions": set(g, &["nextval"]),
                }),
            );
        }
        Some(ContextKind::Ssh) => {
            for (k, pool) in [
                ("command", &["git pull", "make build", "rm -rf /"][..]),
                ("subsystem", &["", "sftp"]),
                ("host", &["build", "db"]),
                ("program", &["make", "git", "rm"]),
            ] {
                m.insert(k.into(), (*g.pick(pool)).into());
            }
            m.insert("port".into(), (*g.pick(&[22, 443])).into());
            m.insert("argv".into(), set(g, &["make", "build", "deploy"]));
            m.insert("args".into(), set(g, &["build", "deploy", "clean"]));
        }
        Some(ContextKind::Http) => {
            for (k, pool) in [
                ("method", &["GET", "POST"][..]),
                ("host", &["api.internal", "evil.test"]),
                ("path", &["/v1/orders", "/admin/users", "/"]),
                ("query", &["", "debug=1"]),
            ] {
                m.insert(k.into(), (*g.pick(pool)).into());
            }
        }
        Some(ContextKind::Kubernetes) => {
            for (k, pool) in [
                ("verb", &["get", "delete"][..]),
                ("api_group", &["", "apps"]),
                ("resource", &["pods", "secrets"]),
                ("subresource", &["", "exec"]),
                ("namespace", &["agents", "sandbox", "kube-system"]),
                ("name", &["a", "b"]),
                ("path", &["/api/v1/pods"]),
            ] {
                m.insert(k.into(), (*g.pick(pool)).into());
            }
        }
        Some(ContextKind::Mcp) => {
            for (k, pool) in [
                ("method", &["tools/call", "tools/list"][..]),
                ("tool", &["read_note", "delete_note", ""]),
                ("arguments_digest", &["", "sha256:00"]),
                ("uri", &["", "file:///notes"]),
                ("name", &[""]),
                ("list", &["", "tools"]),
            ] {
                m.insert(k.into(), (*g.pick(pool)).into());
            }
            m.insert("arguments".into(), serde_json::json!({}));
            m.insert("argument_names".into(), set(g, &["path", "id"]));
        }
    }
    // Now and then a context that does not fit the schema.
    if g.below(50) == 0 {
        m.remove("time");
    }
    ctx
}

/// `count` rules over `identities` and `resources` (`(name, protocol)`):
/// permits, forbids and `@approval` permits; principal, action and resource
/// scopes of every form (`==`, `in`, `in [..]`, `is`, none); `when` and
/// `unless` conditions, some of which overflow (evaluation errors).
fn generated_rules(
    g: &mut Gen,
    count: usize,
    identities: &[String],
    resources: &[(String, String)],
) -> String {
    let mut out = String::new();
    for r in 0..count {
        let id = g.pick(identities);
        let principal = match g.below(6) {
            0 | 1 => "principal".to_string(),
            2 => format!("principal in Identity::\"{id}\""),
            3 => "principal is Identity".to_string(),
            _ => format!("principal == Identity::\"{id}\""),
        };
        let (res, proto) = g.pick(resources);
        let resource = match g.below(10) {
            0 | 1 => "resource".to_string(),
            2 => format!("resource in Resource::\"{res}\""),
            3 => "resource is Resource".to_string(),
            _ => format!("resource == Resource::\"{res}\""),
        };
        let group = if proto == "http" && g.below(2) == 0 {
            "k8s"
        } else {
            proto.as_str()
        };
        let members: Vec<String> = super::actions::all()
            .into_iter()
            .map(|(a, _)| a)
            .filter(|a| a.starts_with(&format!("{group}:")))
            .collect();
        let a1 = g.pick(&members).clone();
        let a2 = g.pick(&members).clone();
        // Only the postgres group's own conditions may read its context.
        let (action, postgres_only) = match g.below(8) {
            0 => ("action".to_string(), false),
            1 => (format!("action == Action::\"{a1}\""), group == "postgres"),
            2 => (
                format!("action in [Action::\"{a1}\", Action::\"{a2}\"]"),
                group == "postgres",
            ),
            3 => (
                format!("action in [Action::\"{group}\", Action::\"tcp:connect\"]"),
                false,
            ),
            _ => (
                format!("action in Action::\"{group}\""),
                group == "postgres",
            ),
        };
        let mut conditions = vec![
            format!("context.time.hour < {}", g.below(24)),
            "context.client.cgroup like \"/agents/*\"".to_string(),
            "context.destination like \"10.*\"".to_string(),
            format!("principal.name == \"{}\"", g.pick(identities)),
            format!("resource.protocol == \"{proto}\""),
            "context.client.pid * 4611686018427387904 > 1".to_string(),
        ];
        if postgres_only {
            conditions.extend([
                "context.statement.has_where".to_string(),
                "context.statement.tables.contains(\"cards\")".to_string(),
                "context.database == \"app\"".to_string(),
            ]);
        }
        let mut clauses = String::new();
        for _ in 0..g.below(3) {
            let c = g.pick(&conditions);
            let kw = if g.below(3) == 0 { "unless" } else { "when" };
            clauses.push_str(&format!(" {kw} {{ {c} }}"));
        }
        let (annot, effect) = match g.below(10) {
            0..=3 => ("", "permit"),
            5 => ("", "forbid"),
            _ => ("@approval(\"required\")\n", "permit"),
        };
        // Most plain permits and forbids name their resource (as real ones
        // do), or they would decide nearly everything alone.
        let narrow = match (effect, annot) {
            ("forbid", _) => g.below(4) != 0,
            ("permit", "") => true,
            _ => g.below(3) == 0,
        };
        let resource = if narrow {
            format!("resource == Resource::\"{res}\"")
        } else {
            resource
        };
        // A broad forbid always has a condition: one unconditional forbid
        // over every action would decide the whole set alone, and the
        // comparison would never see an allow.
        if effect == "forbid" && !narrow && clauses.is_empty() {
            clauses.push_str(&format!(" when {{ context.time.hour < {} }}", g.below(24)));
        }
        out.push_str(&format!(
            "@id(\"g{r:03}\")\n{annot}{effect}({principal}, {action}, {resource}){clauses};\n"
        ));
    }
    out
}

/// Asserts that the indexed decision equals the whole set's, decision and
/// determining rules alike, over `n` generated requests; returns how many
/// of each outcome were seen.
fn assert_index_matches_whole_set(
    set: &PolicySet,
    g: &mut Gen,
    n: usize,
) -> BTreeMap<String, usize> {
    let identities: Vec<&String> = set.identities.keys().collect();
    let resources: Vec<&String> = set.resources.keys().collect();
    let actions: Vec<String> = super::actions::all().into_iter().map(|(a, _)| a).collect();
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let identity = if g.below(40) == 0 {
            "nobody"
        } else {
            g.pick(&identities).as_str()
        };
        let resource = g.pick(&resources).as_str();
        let action = g.pick(&actions).as_str();
        let req = DecisionRequest {
            identity,
            resource,
            action,
            context: generated_context(g, action),
            approved: g.below(4) == 0,
        };
        let indexed = set.rules.decide(&req);
        let whole = set.rules.decide_unindexed(&req);
        assert_eq!(indexed, whole, "request {i}: {req:?}");
        // The same request again hits the slice built the first time.
        assert_eq!(set.rules.decide(&req), whole, "request {i} again");
        let key = match &whole {
            Decision::Deny { policies, .. } if policies.is_empty() => "deny (no rule)".into(),
            d => d.label().to_string(),
        };
        *seen.entry(key).or_insert(0) += 1;
    }
    seen
}

#[test]
fn the_index_decides_exactly_like_the_whole_set() {
    let mut g = Gen(0x5eed_1234_abcd_0001);

    // The shipped examples.
    let examples = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"));
    let set = PolicySet::load(&examples).unwrap();
    let seen = assert_index_matches_whole_set(&set, &mut g, 1500);
    assert!(
        seen.contains_key("allow") && seen.contains_key("deny"),
        "{seen:?}"
    );

    // A generated 500-rule set over 40 resources and 8 identities.
    let mut toml = String::from(
        "[issuer.corp]\nurl = \"https://oidc.example.test\"\n\
         jwks_file = \"/nonexistent/jwks.json\"\naudience = \"portcullis\"\n",
    );
    let identities: Vec<String> = (0..8).map(|i| format!("id{i}")).collect();
    for id in &identities {
        toml.push_str(&format!(
            "\n[identity.{id}]\nissuer = \"corp\"\nsubject = \"{id}\"\n"
        ));
    }
    let mut resources = Vec::new();
    for i in 0..40 {
        let name = format!("res{i:02}");
        let proto = *g.pick(&["tcp", "postgres", "http"]);
        toml.push_str(&format!(
            "\n[resource.{name}]\nprotocol = \"{proto}\"\nmatch = [\"10.1.{i}.1:{}\"]\n",
            1000 + i
        ));
        match proto {
            "postgres" => toml
                .push_str("credentials = { user = \"agent_ro\", password_file = \"/etc/pw\" }\n"),
            "http" => toml.push_str("tls = \"intercept\"\n"),
            _ => {}
        }
        resources.push((name, proto.to_string()));
    }
    let rules = generated_rules(&mut g, 500, &identities, &resources);
    let dir = dir_with(&[("a.toml", &toml), ("r.cedar", &rules)]);
    let set = match PolicySet::load(&dir) {
        Ok(s) => s,
        Err(e) => panic!("the generated set is invalid:\n{e}\n{rules}"),
    };
    assert_eq!(set.rules().len(), 500);
    let seen = assert_index_matches_whole_set(&set, &mut g, 2500);
    for outcome in ["allow", "deny", "hold", "deny (no rule)"] {
        assert!(seen.contains_key(outcome), "no {outcome}: {seen:?}");
    }
    fs::remove_dir_all(dir).unwrap();
}

/// Reloads validate only rule files not already known to pass against the
/// same schema: a file that passed once must still fail when the schema it
/// is checked against changes (an MCP argument declared with another type), an
/// invalid file is reported on every load, and an edited file is validated
/// again.
#[test]
fn validation_cache_never_hides_an_error() {
    let mcp = "[resource.notes]\nprotocol = \"mcp\"\nmatch = [\"10.0.0.12:8080\"]\ntls = \"none\"\ntools = { read_note = { path = \"String\" } }\n";
    let as_long = mcp.replace("\"String\"", "\"Long\"");
    // Unique text: no other test can have put it in the cache.
    let rules = format!(
        "// cache test {}\npermit(principal == Identity::\"billing\", action == Action::\"mcp:call_tool\", resource == Resource::\"notes\")\n  when {{ context.arguments has path && context.arguments.path like \"public/*\" }};\n",
        std::process::id()
    );
    let dir = dir_with(&[("base.toml", BASE), ("mcp.toml", mcp), ("r.cedar", &rules)]);
    PolicySet::load(&dir).expect("valid with the argument declared");
    PolicySet::load(&dir).expect("valid again (cached)");
    // Same rule text, another schema (`path` a Long): validated again,
    // and refused.
    fs::write(dir.join("mcp.toml"), &as_long).unwrap();
    for _ in 0..2 {
        let text = PolicySet::load(&dir).unwrap_err().to_string();
        assert!(text.contains("r.cedar:3:"), "{text}");
    }
    fs::write(dir.join("mcp.toml"), mcp).unwrap();
    PolicySet::load(&dir).expect("valid again under the first schema");
    // An edited file is validated again: a type error appears at once.
    let broken = rules.replace("like \"public/*\"", "> 3");
    fs::write(dir.join("r.cedar"), &broken).unwrap();
    for _ in 0..2 {
        let text = PolicySet::load(&dir).unwrap_err().to_string();
        assert!(text.contains("r.cedar:3:"), "{text}");
    }
    // A known-good file next to a new bad one: the bad one is still found.
    fs::write(dir.join("r.cedar"), &rules).unwrap();
    fs::write(
        dir.join("s.cedar"),
        "permit(principal, action == Action::\"tcp:connect\", resource) when { context.nope == 1 };\n",
    )
    .unwrap();
    let text = PolicySet::load(&dir).unwrap_err().to_string();
    assert!(text.contains("s.cedar:1:"), "{text}");
    fs::remove_dir_all(dir).unwrap();
}

/// Validation split over threads reports the same errors as one pass: every
/// bad rule of a large set is found, each at its own line.
#[test]
fn parallel_validation_finds_every_bad_rule() {
    let mut rules = String::new();
    for i in 0..300 {
        if i % 50 == 7 {
            rules.push_str(&format!(
                "permit(principal, action == Action::\"tcp:connect\", resource) when {{ context.bad{i} == 1 }};\n"
            ));
        } else {
            rules.push_str(&format!(
                "permit(principal == Identity::\"billing\", action == Action::\"tcp:connect\", resource == Resource::\"echo\") when {{ context.client.pid == {i} }};\n"
            ));
        }
    }
    let dir = dir_with(&[("base.toml", BASE), ("r.cedar", &rules)]);
    let err = PolicySet::load(&dir).unwrap_err();
    let mut lines: Vec<usize> = err.diagnostics.iter().filter_map(|d| d.line).collect();
    lines.sort_unstable();
    assert_eq!(lines, [8, 58, 108, 158, 208, 258], "{err}");
    fs::remove_dir_all(dir).unwrap();
}

/// Cedar's request validation is skipped only for a request shape it has
/// accepted before under the loaded set: a context of another shape (a
/// wrong type, a missing or an extra attribute, a set of mixed elements)
/// is still validated, and refused, after a valid one was remembered.
#[test]
fn a_context_of_a_shape_never_validated_is_still_refused() {
    use serde_json::json;
    let dir = dir_with(&[
        ("a.toml", BASE),
        ("p.cedar", "permit(principal, action, resource);\n"),
    ]);
    let set = PolicySet::load(&dir).unwrap();
    let select =
        |ctx: serde_json::Value| decide(&set, "billing", "orders", "postgres:select", ctx, false);
    for _ in 0..2 {
        assert!(matches!(select(pg_ctx(true)), Decision::Allow { .. }));
    }
    let mut wrong_type = pg_ctx(true);
    wrong_type["statement"]["has_where"] = json!("yes");
    let mut missing = pg_ctx(true);
    missing.as_object_mut().unwrap().remove("database");
    let mut extra = pg_ctx(true);
    extra["statement"]["surplus"] = json!(1);
    let mut mixed = pg_ctx(true);
    mixed["statement"]["tables"] = json!(["orders", 1]);
    let mut renamed = pg_ctx(true);
    let user = renamed.as_object_mut().unwrap().remove("user").unwrap();
    renamed["usr"] = user;
    for (why, ctx) in [
        ("a wrong type", wrong_type),
        ("a missing attribute", missing),
        ("an extra attribute", extra),
        ("a set of mixed elements", mixed),
        ("a renamed attribute", renamed),
    ] {
        for _ in 0..2 {
            match select(ctx.clone()) {
                Decision::Deny { reason, .. } => {
                    assert!(reason.contains("invalid request"), "{why}: {reason}")
                }
                other => panic!("{why}: {other:?}"),
            }
        }
    }
    // The same shape under another action is validated against that
    // action's context type.
    match decide(&set, "billing", "echo", "tcp:connect", pg_ctx(true), false) {
        Decision::Deny { reason, .. } => assert!(reason.contains("invalid request"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        decide(&set, "billing", "echo", "tcp:connect", tcp_ctx(), false),
        Decision::Allow { .. }
    ));
}
