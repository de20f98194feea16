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

#[test]
fn loads_tcp_resources_and_matches_literals() {
    let dir = dir_with(&[(
        "a.toml",
        "[resource.echo]\nprotocol = \"tcp\"\nmatch = [\"127.0.0.1:7001\", \"[::1]:7001\"]\n",
    )]);
    let set = PolicySet::load(&dir).unwrap();
    assert_eq!(set.version.len(), 16);
    let r = set
        .match_static(&"127.0.0.1:7001".parse().unwrap())
        .unwrap();
    assert_eq!(r.name, "echo");
    assert!(set.match_static(&"[::1]:7001".parse().unwrap()).is_some());
    assert!(set
        .match_static(&"127.0.0.1:7002".parse().unwrap())
        .is_none());
    // The version changes with the content.
    fs::write(
        dir.join("a.toml"),
        "[resource.echo]\nprotocol = \"tcp\"\nmatch = [\"127.0.0.1:7002\"]\n",
    )
    .unwrap();
    assert_ne!(PolicySet::load(&dir).unwrap().version, set.version);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unknown_keys_report_line_and_column() {
    let dir = dir_with(&[(
        "bad.toml",
        "[resource.echo]\nprotocol = \"tcp\"\nmatch = [\"127.0.0.1:7001\"]\nupstrem = \"x:1\"\n",
    )]);
    let err = PolicySet::load(&dir).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("bad.toml:4:1: "), "{text}");
    assert!(text.contains("upstrem"), "{text}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_destinations_and_protocols_are_reported_where_they_are() {
    let dir = dir_with(&[(
        "x.toml",
        "[resource.a]\nprotocol = \"gopher\"\nmatch = [\"nope\"]\n",
    )]);
    let err = PolicySet::load(&dir).unwrap_err();
    assert_eq!(err.diagnostics.len(), 2, "{err}");
    assert_eq!(err.diagnostics[0].line, Some(2));
    assert!(err.diagnostics[0].message.contains("unknown protocol"));
    assert_eq!(err.diagnostics[1].line, Some(3));
    assert_eq!(err.diagnostics[1].column, Some(10));
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
fn destinations_parse() {
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
