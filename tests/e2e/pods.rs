//! Agents' pods tagged on a node: a real cgroup hierarchy laid out as the
//! kubelet lays it out (systemd driver: `kubepods.slice/kubepods-<qos>.slice/
//! kubepods-<qos>-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`;
//! cgroupfs driver: `kubepods/<qos>/pod<uid>/<id>`), `[[auto_tag]]` rules
//! whose token path names each pod's projected service-account token with
//! `{pod_uid}`, as under `/var/lib/kubelet/pods/<uid>/volumes/…`.

use std::{fs, time::Duration};

use serde_json::{json, Value};

use crate::harness::*;

fn tags(d: &Daemon) -> Vec<Value> {
    d.json(&["tags", "--json"])["tags"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A pod uid (a UUID's shape); the cgroup root and kubelet directory are
/// the test's own, so fixed uids do not collide between runs.
fn pod_uid(first: &str) -> String {
    format!("{first}-0a1b-4c2d-9e3f-001122334455")
}

fn container_id(first: char) -> String {
    std::iter::repeat_n(first, 64).collect()
}

#[test]
fn auto_tag_gives_each_kubepods_pod_its_own_projected_token() {
    require_root();
    let cg = TestCgroup::new("pods");
    let server = EchoServer::start("pods");
    let files = DaemonFiles::new(&cg.rel);
    files.tcp_resources("echo.toml", &[("echo", vec![server.addr.to_string()])]);
    let kubelet = files.dir.join("kubelet/pods");
    // Each agent workload mounts its projected token in a volume named for
    // its identity; the rules find it through the pod's uid.
    let token_path = |uid: &str, identity: &str| {
        kubelet.join(format!(
            "{uid}/volumes/kubernetes.io~projected/portcullis-{identity}/token"
        ))
    };
    let rules: String = [("kubepods.slice/**", "pod-agent"), ("kubepods/**", "pod-agent"), ("kubepods/**", "agent")]
        .iter()
        .map(|(glob, identity)| {
            format!(
                "[[auto_tag]]\ncgroup = {glob:?}\nidentity = {identity:?}\ntoken_file = \"{}/{{pod_uid}}/volumes/kubernetes.io~projected/portcullis-{identity}/token\"\nif_token_exists = true\n\n",
                kubelet.display()
            )
        })
        .collect();
    fs::write(files.config_file(), format!("[daemon]\n\n{rules}")).unwrap();
    let (a, b, c, d) = (
        pod_uid("0a0a0a0a"),
        pod_uid("0b0b0b0b"),
        pod_uid("0c0c0c0c"),
        pod_uid("0d0d0d0d"),
    );
    let project = |uid: &str, identity: &str, subject: &str| {
        let p = token_path(uid, identity);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, files.issuer.token(subject, 3600)).unwrap();
    };
    // A (systemd driver) is a pod-agent, B (cgroupfs driver) an agent; C
    // mounts no token (not an agent pod); D mounts pod-agent's volume with
    // another service account's token.
    project(&a, "pod-agent", "sub-pod-agent");
    project(&b, "agent", "sub-agent");
    project(&d, "pod-agent", "sub-someone-else");
    let systemd = |uid: &str, id: char| {
        format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
            uid.replace('-', "_"),
            container_id(id)
        )
    };
    let ctr_a = cg.child(&systemd(&a, 'a'));
    let ctr_b = cg.child(&format!("kubepods/burstable/pod{b}/{}", container_id('b')));
    let daemon = Daemon::start(&files);
    // C and D appear after the daemon started.
    let ctr_c = cg.child(&systemd(&c, 'c'));
    let ctr_d = cg.child(&format!("kubepods/besteffort/pod{d}/{}", container_id('d')));
    // Inside pod A's container, a cgroup named after pod B: still pod A.
    let forged = cg.child(&format!(
        "{}/kubepods-besteffort-pod{}.slice",
        systemd(&a, 'a'),
        b.replace('-', "_")
    ));
    let tag_of = |rel: &str| -> Option<(String, String)> {
        tags(&daemon)
            .iter()
            .find(|t| t["cgroup"] == format!("/{rel}"))
            .map(|t| {
                (
                    t["identity"].as_str().unwrap_or_default().to_string(),
                    t["token_file"].as_str().unwrap_or_default().to_string(),
                )
            })
    };
    wait_until(
        Duration::from_secs(10),
        || tag_of(&ctr_d).is_some() && tag_of(&forged).is_some(),
        "pod D's container and the forged cgroup auto-tagged",
    );
    let tagged = |uid: &str, identity: &str| {
        Some((
            identity.to_string(),
            token_path(uid, identity).display().to_string(),
        ))
    };
    assert_eq!(tag_of(&ctr_a), tagged(&a, "pod-agent"));
    assert_eq!(tag_of(&ctr_b), tagged(&b, "agent"));
    assert_eq!(tag_of(&ctr_d), tagged(&d, "pod-agent"));
    assert_eq!(
        tag_of(&forged),
        tagged(&a, "pod-agent"),
        "a crafted name cannot pick pod B's token"
    );
    assert_eq!(tag_of(&ctr_c), None, "no token mounted: not an agent pod");
    // The kubepods roots and QoS levels are no pod: never tagged.
    for rel in [
        cg.child("kubepods.slice"),
        cg.child("kubepods.slice/kubepods-besteffort.slice"),
        cg.child("kubepods/burstable"),
    ] {
        assert_eq!(tag_of(&rel), None, "{rel}");
    }

    let to = json!({"host": "127.0.0.1", "port": server.addr.port()});
    let from = |rel: &str| client(&Placement::cgroup(cg.dir(rel)), to.clone());
    // A and B act on their own tokens, through the daemon.
    for ctr in [&ctr_a, &ctr_b] {
        let r = from(ctr);
        assert!(r.echo_ok(), "{ctr}: {r:?}");
        assert_eq!(r.peer_port(), Some(daemon.port as u64), "{ctr}");
    }
    // D cannot prove pod-agent with another account's token: refused.
    let r = from(&ctr_d);
    assert!(!r.echo_ok(), "{r:?}");
    // C is not governed...
    let r = from(&ctr_c);
    assert!(r.echo_ok(), "{r:?}");
    assert_ne!(r.peer_port(), Some(daemon.port as u64));
    // ...until its token is projected: then the next scan tags it.
    project(&c, "pod-agent", "sub-pod-agent");
    wait_until(
        Duration::from_secs(15),
        || tag_of(&ctr_c) == tagged(&c, "pod-agent"),
        "pod C tagged once its token is mounted",
    );
    let r = from(&ctr_c);
    assert!(r.echo_ok(), "{r:?}");
    assert_eq!(r.peer_port(), Some(daemon.port as u64));
}
