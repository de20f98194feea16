//! Container and pod names in the cgroup tree: which cgroup directory is the
//! container `3f2a…` (Docker, containerd, CRI-O, Podman) or the Kubernetes
//! pod `7c1d…-…`, for `portcullis tag --container ID` and for the
//! `{container}` placeholder of auto-tag token files.
//!
//! Owns only name parsing and the search of the governed subtree. It must not
//! tag anything (the admin API and the auto-tagger do) and never looks
//! outside the governed root.

use super::cgroup::CgroupTree;

/// Minimum number of hex digits a `--container` prefix must have, so a
/// short typo cannot pick an arbitrary container.
pub const MIN_PREFIX_HEX: usize = 12;

/// Which runtime named a cgroup directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// `docker-<id>.scope` (systemd driver) or `/docker/<id>` (cgroupfs).
    Docker,
    /// `cri-containerd-<id>.scope`.
    Containerd,
    /// `crio-<id>.scope`.
    Crio,
    /// `libpod-<id>.scope` (Podman).
    Podman,
    /// A bare 64-hex directory under a Kubernetes pod (cgroupfs driver).
    Kubernetes,
    /// A bare 64-hex directory elsewhere (some runtime's cgroupfs layout).
    Unknown,
    /// A Kubernetes pod: `kubepods-…-pod<uid>.slice` or `/kubepods/…/pod<uid>`.
    Pod,
}

/// What one cgroup directory name says about the container in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// The runtime naming scheme that matched.
    pub runtime: Runtime,
    /// The container id (64 lowercase hex) or pod uid (with dashes).
    pub id: String,
}

/// Parses one cgroup directory name (`parent` is the name of the directory
/// above it, used for the cgroupfs layouts where the name is a bare id).
pub fn parse_name(parent: &str, name: &str) -> Option<Named> {
    let scoped = |prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".scope"))
            .filter(|id| is_container_id(id))
    };
    let found = |runtime, id: &str| {
        Some(Named {
            runtime,
            id: id.to_ascii_lowercase(),
        })
    };
    // crio-conmon-<id>.scope is the runtime's monitor process, not the
    // container: the id check below rejects it ("conmon-" is not hex).
    if let Some(id) = scoped("docker-") {
        return found(Runtime::Docker, id);
    }
    if let Some(id) = scoped("cri-containerd-") {
        return found(Runtime::Containerd, id);
    }
    if let Some(id) = scoped("crio-") {
        return found(Runtime::Crio, id);
    }
    if let Some(id) = scoped("libpod-") {
        return found(Runtime::Podman, id);
    }
    if is_container_id(name) {
        let runtime = if parent == "docker" {
            Runtime::Docker
        } else if pod_uid(parent).is_some() {
            Runtime::Kubernetes
        } else {
            Runtime::Unknown
        };
        return found(runtime, name);
    }
    pod_uid(name).map(|uid| Named {
        runtime: Runtime::Pod,
        id: uid,
    })
}

/// The pod uid in `kubepods-burstable-pod<uid_with_underscores>.slice`
/// (systemd driver) or `pod<uid>` (cgroupfs driver), with dashes.
fn pod_uid(name: &str) -> Option<String> {
    let raw = if let Some(slice) = name.strip_suffix(".slice") {
        if !slice.starts_with("kubepods") {
            return None;
        }
        slice.rsplit_once("-pod").map(|(_, uid)| uid)?
    } else {
        name.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-").to_ascii_lowercase();
    is_uuid(&uid).then_some(uid)
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The container (or pod) a cgroup path belongs to: the deepest component
/// that parses as one. `/kubepods.slice/…-pod<uid>.slice/cri-containerd-<id>.scope/x`
/// gives the containerd container.
pub fn of_path(path: &str) -> Option<Named> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut best = None;
    let mut parent = "";
    for p in parts {
        if let Some(n) = parse_name(parent, p) {
            // A container beats its pod; a deeper container beats a shallower one.
            if n.runtime != Runtime::Pod || best.is_none() {
                best = Some(n);
            }
        }
        parent = p;
    }
    best
}

/// The uid of the Kubernetes pod a cgroup path belongs to (with dashes),
/// for the `{pod_uid}` placeholder of auto-tag token files.
///
/// Only the kubelet's own pod directory counts: the first component that
/// looks like a pod, and only where the kubelet puts pods (directly under
/// `kubepods`/`kubepods.slice` or their `besteffort`/`burstable` QoS
/// directory). A container that can make cgroups below its own cannot
/// borrow another pod's uid by naming one `pod<uid>`: a deeper pod-like
/// name is never read. The uid is a checked UUID (hex digits and dashes),
/// so it cannot carry `/` or `..` into a path.
pub fn pod_of_path(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let (i, uid) = parts
        .iter()
        .enumerate()
        .find_map(|(i, p)| pod_uid(p).map(|uid| (i, uid)))?;
    let parent = i.checked_sub(1).map(|j| parts[j]);
    let grand = i.checked_sub(2).map(|j| parts[j]);
    let placed = matches!(
        (grand, parent),
        (_, Some("kubepods" | "kubepods.slice"))
            | (Some("kubepods"), Some("besteffort" | "burstable"))
            | (
                Some("kubepods.slice"),
                Some("kubepods-besteffort.slice" | "kubepods-burstable.slice")
            )
    );
    placed.then_some(uid)
}

/// Why `--container` did not name exactly one cgroup.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContainerError {
    /// Not an id or an id prefix.
    #[error("container id {0:?} must be {MIN_PREFIX_HEX} to 64 hex digits (or a pod uid)")]
    BadId(String),
    /// Nothing in the governed subtree matched.
    #[error("no container or pod {id} below the governed cgroup root {root}")]
    NotFound {
        /// What was asked for.
        id: String,
        /// The governed root searched.
        root: String,
    },
    /// More than one container matched the prefix.
    #[error("container id prefix {id} is ambiguous: {}", .matches.join(", "))]
    Ambiguous {
        /// What was asked for.
        id: String,
        /// `id (runtime) at path` for each match.
        matches: Vec<String>,
    },
}

/// A container found in the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its cgroup, mount-relative.
    pub cgroup: String,
    /// Runtime and id.
    pub named: Named,
}

/// Normalizes user input: lowercase, pod uids with dashes; checks length.
pub fn normalize_query(input: &str) -> Result<String, ContainerError> {
    let q = input.trim().to_ascii_lowercase().replace('_', "-");
    let hex = q.bytes().filter(|b| b.is_ascii_hexdigit()).count();
    let only_hex_and_dash = q.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if !only_hex_and_dash || hex < MIN_PREFIX_HEX || q.len() > 64 {
        return Err(ContainerError::BadId(input.to_string()));
    }
    Ok(q)
}

/// Picks the one container whose id starts with `query` among `(path, name)`
/// candidates. The same id at several depths (a runtime's nested cgroups)
/// counts once, at its shallowest path.
pub fn pick(
    query: &str,
    root: &str,
    candidates: impl IntoIterator<Item = (String, Named)>,
) -> Result<Found, ContainerError> {
    let q = normalize_query(query)?;
    let mut by_id: std::collections::BTreeMap<String, Found> = Default::default();
    for (cgroup, named) in candidates {
        if !named.id.starts_with(&q) {
            continue;
        }
        let keep = by_id
            .get(&named.id)
            .is_none_or(|f| cgroup.len() < f.cgroup.len());
        if keep {
            by_id.insert(named.id.clone(), Found { cgroup, named });
        }
    }
    let mut found: Vec<Found> = by_id.into_values().collect();
    match found.len() {
        0 => Err(ContainerError::NotFound {
            id: q,
            root: root.to_string(),
        }),
        1 => Ok(found.remove(0)),
        _ => Err(ContainerError::Ambiguous {
            id: q,
            matches: found
                .iter()
                .map(|f| format!("{} ({:?}) at {}", f.named.id, f.named.runtime, f.cgroup))
                .collect(),
        }),
    }
}

/// Searches the governed subtree for the container or pod `query` names.
pub fn resolve(tree: &CgroupTree, query: &str) -> Result<Found, ContainerError> {
    normalize_query(query)?;
    let candidates = tree.walk(tree.root()).into_iter().filter_map(|(path, _)| {
        let (parent, name) = path.rsplit_once('/')?;
        let parent = parent.rsplit('/').next().unwrap_or("");
        let named = parse_name(parent, name)?;
        Some((path, named))
    });
    pick(query, tree.root(), candidates)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1d5e7b4a6c8d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e";
    const ID2: &str = "3f2a9c1d5e7bffffffffffffffffffffffffffffffffffffffffffffffffffff";
    const UID: &str = "7c1d2e3f-0a1b-4c2d-9e3f-4a5b6c7d8e9f";

    #[test]
    fn parses_every_runtime_naming() {
        let n = |parent: &str, name: &str| parse_name(parent, name).map(|n| (n.runtime, n.id));
        assert_eq!(
            n("system.slice", &format!("docker-{ID}.scope")),
            Some((Runtime::Docker, ID.into()))
        );
        assert_eq!(n("docker", ID), Some((Runtime::Docker, ID.into())));
        assert_eq!(
            n("x", &format!("cri-containerd-{ID}.scope")),
            Some((Runtime::Containerd, ID.into()))
        );
        assert_eq!(
            n("x", &format!("crio-{ID}.scope")),
            Some((Runtime::Crio, ID.into()))
        );
        assert_eq!(
            n("x", &format!("libpod-{ID}.scope")),
            Some((Runtime::Podman, ID.into()))
        );
        assert_eq!(n("x", &format!("crio-conmon-{ID}.scope")), None);
        assert_eq!(
            n(&format!("pod{UID}"), ID),
            Some((Runtime::Kubernetes, ID.into()))
        );
        assert_eq!(n("elsewhere", ID), Some((Runtime::Unknown, ID.into())));
        let slice = format!(
            "kubepods-burstable-pod{}.slice",
            UID.replace('-', "_").to_uppercase()
        );
        assert_eq!(n("x", &slice), Some((Runtime::Pod, UID.into())));
        assert_eq!(
            n("burstable", &format!("pod{UID}")),
            Some((Runtime::Pod, UID.into()))
        );
        // Near misses.
        assert_eq!(n("x", &format!("docker-{}.scope", &ID[1..])), None);
        assert_eq!(n("x", &format!("docker-{ID}.service")), None);
        assert_eq!(n("x", "kubepods-burstable.slice"), None);
        assert_eq!(n("x", "system.slice"), None);
        assert_eq!(n("x", "pod"), None);
        assert_eq!(n("x", &format!("{}g", &ID[1..])), None);
    }

    #[test]
    fn deepest_container_of_a_path_wins_over_its_pod() {
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope/sub",
            UID.replace('-', "_")
        );
        let n = of_path(&p).unwrap();
        assert_eq!((n.runtime, n.id.as_str()), (Runtime::Containerd, ID));
        let p = format!("/kubepods/burstable/pod{UID}");
        assert_eq!(of_path(&p).unwrap().runtime, Runtime::Pod);
        let p = format!("/kubepods/burstable/pod{UID}/{ID}");
        assert_eq!(of_path(&p).unwrap().runtime, Runtime::Kubernetes);
        assert_eq!(of_path("/agents/billing"), None);
    }

    fn cands() -> Vec<(String, Named)> {
        let mk = |p: &str| {
            let (parent, name) = p.rsplit_once('/').unwrap();
            let parent = parent.rsplit('/').next().unwrap();
            (p.to_string(), parse_name(parent, name).unwrap())
        };
        vec![
            mk(&format!("/system.slice/docker-{ID}.scope")),
            mk(&format!(
                "/system.slice/docker-{ID}.scope/docker-{ID}.scope"
            )),
            mk(&format!("/x/crio-{ID2}.scope")),
            mk(&format!("/kubepods/burstable/pod{UID}")),
        ]
    }

    #[test]
    fn unique_prefix_resolves_and_ambiguous_lists_matches() {
        let f = pick(&ID[..20], "/", cands()).unwrap();
        assert_eq!(f.cgroup, format!("/system.slice/docker-{ID}.scope"));
        let f = pick(&ID.to_uppercase(), "/", cands()).unwrap();
        assert_eq!(f.named.id, ID);
        match pick(&ID[..12], "/", cands()) {
            Err(ContainerError::Ambiguous { matches, .. }) => {
                assert_eq!(matches.len(), 2, "{matches:?}");
                assert!(matches.iter().any(|m| m.contains(ID2)), "{matches:?}");
            }
            other => panic!("{other:?}"),
        }
        let pod = pick(&UID.replace('-', "_")[..13], "/", cands()).unwrap();
        assert_eq!(pod.cgroup, format!("/kubepods/burstable/pod{UID}"));
        assert!(matches!(
            pick("abcdefabcdef00", "/", cands()),
            Err(ContainerError::NotFound { .. })
        ));
        assert!(matches!(
            pick(&ID[..11], "/", cands()),
            Err(ContainerError::BadId(_))
        ));
        assert!(matches!(
            pick("../../etc/passwd", "/", cands()),
            Err(ContainerError::BadId(_))
        ));
    }
    #[test]
    fn pod_uid_of_both_kubelet_layouts() {
        let uid = "0a1b2c3d-0a1b-4c2d-9e3f-001122334455";
        let systemd_uid = uid.replace('-', "_");
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(pod_of_path(&systemd).as_deref(), Some(uid));
        let guaranteed =
            format!("/kubepods.slice/kubepods-pod{systemd_uid}.slice/cri-containerd-{ID}.scope");
        assert_eq!(pod_of_path(&guaranteed).as_deref(), Some(uid));
        let cgroupfs = format!("/kubepods/besteffort/pod{uid}/{ID}");
        assert_eq!(pod_of_path(&cgroupfs).as_deref(), Some(uid));
        assert_eq!(
            pod_of_path(&format!("kubepods/pod{uid}/{ID}")).as_deref(),
            Some(uid)
        );
        // Below a governed root that is itself nested.
        let nested = format!("/test-root/kubepods/burstable/pod{uid}/{ID}/sub");
        assert_eq!(pod_of_path(&nested).as_deref(), Some(uid));
        // Upper-case hex is the same pod.
        let upper = format!("/kubepods/besteffort/pod{}/{ID}", uid.to_uppercase());
        assert_eq!(pod_of_path(&upper).as_deref(), Some(uid));
        assert_eq!(
            pod_of_path(&format!("/system.slice/docker-{ID}.scope")),
            None
        );
    }

    #[test]
    fn pod_uid_cannot_be_forged_by_a_crafted_cgroup_name() {
        let uid = "0a1b2c3d-0a1b-4c2d-9e3f-001122334455";
        let other = "ffffffff-0a1b-4c2d-9e3f-001122334455";
        // Not a UUID: path pieces, traversal, wrong group sizes, no hex.
        for name in [
            "pod../../etc",
            "pod0a1b2c3d-0a1b-4c2d-9e3f-00112233445/..",
            "pod0a1b2c3d-0a1b-4c2d-9e3f-0011223344556",
            "podzzzzzzzz-0a1b-4c2d-9e3f-001122334455",
            "pod0a1b2c3d-0a1b-4c2d-9e3f-0011..334455",
            "pod0a1b2c3d-0a1b-4c2d-9e3f",
            "kubepods-besteffort-pod.._.._etc.slice",
            "kubepods-besteffort-pod0a1b2c3d_0a1b_4c2d_9e3f_00112233445%2F.slice",
            "pod",
        ] {
            assert_eq!(
                pod_of_path(&format!("/kubepods/besteffort/{name}/x")),
                None,
                "{name}"
            );
            assert_eq!(
                pod_of_path(&format!("/kubepods.slice/kubepods-besteffort.slice/{name}")),
                None,
                "{name}"
            );
        }
        // A container naming a cgroup of its own after another pod keeps
        // its own pod's uid.
        let inside = format!("/kubepods/besteffort/pod{uid}/{ID}/pod{other}");
        assert_eq!(pod_of_path(&inside).as_deref(), Some(uid));
        let inside = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_"),
            other.replace('-', "_")
        );
        assert_eq!(pod_of_path(&inside).as_deref(), Some(uid));
        // A pod-like name outside the kubelet's places is not a pod.
        assert_eq!(pod_of_path(&format!("/user.slice/pod{other}/x")), None);
        assert_eq!(
            pod_of_path(&format!("/kubepods/guaranteed/pod{other}")),
            None
        );
        // ...and a fake one above the real one makes the path pod-less
        // rather than letting the deeper one count.
        assert_eq!(
            pod_of_path(&format!(
                "/agents/pod{other}/kubepods/besteffort/pod{uid}/x"
            )),
            None
        );
    }
}
