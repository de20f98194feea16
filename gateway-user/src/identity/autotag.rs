//! Auto-tagging: `[[auto_tag]]` rules of the daemon config (a glob over
//! cgroup paths relative to the governed root → identity and token file),
//! and the plan that brings the tag store in line with the cgroups that
//! exist: tag new matching cgroups, untag auto-tagged cgroups that are gone.
//!
//! Owns rule validation, glob matching and planning. It does not watch the
//! tree or write tags itself (the daemon's auto-tag loop does, so that the
//! kernel, sessions and the audit log stay in step), and never removes a tag
//! an operator made by hand.

use std::{collections::HashSet, path::PathBuf};

use serde::Deserialize;

use super::{cgroup::is_same_or_below, container, tags::TagStore};

/// One `[[auto_tag]]` rule.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AutoTagRule {
    /// Glob over the cgroup path relative to the governed root: `*` and `?`
    /// within one path component, `**` for any number of components
    /// (`**/docker-*.scope`).
    pub cgroup: String,
    /// Identity the matching cgroups act as.
    pub identity: String,
    /// Token file; `{container}` is replaced by the container id found in
    /// the cgroup path, `{pod_uid}` by the Kubernetes pod's uid (with
    /// dashes, as in `/var/lib/kubelet/pods/<uid>/`) and `{name}` by the
    /// cgroup directory's name.
    #[serde(default)]
    pub token_file: Option<String>,
    /// Match only cgroups whose token file exists: a pod opts in by
    /// mounting the projected token the rule names (its own volume name
    /// per identity), and a rule for another workload does not claim it.
    #[serde(default)]
    pub if_token_exists: bool,
}

impl AutoTagRule {
    /// Checks the rule; the message names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let g = self.cgroup.trim_matches('/');
        if g.is_empty() {
            return Err("auto_tag: cgroup glob must not be empty (or only \"/\")".into());
        }
        if g.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(format!(
                "auto_tag: cgroup glob {:?} must be plain components (no '..', '.', '//')",
                self.cgroup
            ));
        }
        if self.identity.contains("{pod_uid}") || self.identity.contains("{container}") {
            return Err(format!(
                "auto_tag: identity {:?} cannot hold a placeholder: identities are declared in \
                 the policies (issuer, subject), so name the workload and put {{pod_uid}} in \
                 token_file",
                self.identity
            ));
        }
        if self.identity.is_empty()
            || self.identity.len() > 128
            || !self
                .identity
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "auto_tag: identity {:?} is invalid: use letters, digits, '-', '_', '.'",
                self.identity
            ));
        }
        if self.if_token_exists && self.token_file.is_none() {
            return Err("auto_tag: if_token_exists needs a token_file".into());
        }
        if let Some(t) = &self.token_file {
            if !t.starts_with('/') {
                return Err(format!(
                    "auto_tag: token_file {t:?} must be an absolute path"
                ));
            }
            if t.split('/').any(|c| c == "..") {
                return Err(format!("auto_tag: token_file {t:?} must not contain '..'"));
            }
        }
        Ok(())
    }

    /// Whether `rel` (a cgroup path relative to the governed root, without
    /// a leading `/`) matches the rule's glob.
    pub fn matches(&self, rel: &str) -> bool {
        let pat: Vec<&str> = self.cgroup.trim_matches('/').split('/').collect();
        let path: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
        glob_components(&pat, &path)
    }

    /// The token file for `cgroup` (mount-relative), placeholders filled.
    /// `None` inside means the rule has no token file; an error means a
    /// placeholder could not be filled (no container id in the path).
    pub fn token_for(&self, cgroup: &str) -> Result<Option<PathBuf>, String> {
        let Some(t) = &self.token_file else {
            return Ok(None);
        };
        let mut out = t.clone();
        if out.contains("{container}") {
            let Some(c) = container::of_path(cgroup) else {
                return Err(format!(
                    "{cgroup}: token_file {t:?} needs a container id, and none is in the path"
                ));
            };
            out = out.replace("{container}", &c.id);
        }
        if out.contains("{pod_uid}") {
            let Some(uid) = container::pod_of_path(cgroup) else {
                return Err(format!(
                    "{cgroup}: token_file {t:?} needs a Kubernetes pod uid, and the path is not \
                     in a kubelet pod cgroup"
                ));
            };
            out = out.replace("{pod_uid}", &uid);
        }
        if out.contains("{name}") {
            let name = cgroup.rsplit('/').next().unwrap_or_default();
            out = out.replace("{name}", name);
        }
        Ok(Some(PathBuf::from(out)))
    }
}

/// Component-wise glob: `**` matches zero or more components.
fn glob_components(pat: &[&str], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|i| glob_components(rest, &path[i..])),
        Some((p, rest)) => match path.split_first() {
            Some((c, prest)) => {
                glob_one(p.as_bytes(), c.as_bytes()) && glob_components(rest, prest)
            }
            None => false,
        },
    }
}

/// Glob within one component: `*` any run, `?` one byte. Iterative with
/// one backtrack point, so it is linear-ish and cannot blow the stack.
fn glob_one(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi.min(p.len())..].iter().all(|&c| c == b'*')
}

/// One tag to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddTag {
    /// Mount-relative cgroup.
    pub cgroup: String,
    /// Identity.
    pub identity: String,
    /// Token file, placeholders filled.
    pub token_file: Option<PathBuf>,
    /// The glob of the rule that matched.
    pub rule: String,
}

/// What the auto-tagger should change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// New tags.
    pub add: Vec<AddTag>,
    /// Auto-made tags whose cgroup is gone.
    pub remove: Vec<String>,
    /// Cgroups a rule matched but that cannot be tagged (with why).
    pub skipped: Vec<String>,
}

/// Plans the changes for the cgroups that exist now (`existing`,
/// mount-relative, all at or below `root`). The first matching rule wins;
/// a rule with `if_token_exists` matches only when its token file (read
/// through `exists`) is there.
/// Cgroups already tagged (by hand or before) are left alone, as are the
/// daemon's own cgroup and its ancestors (`own`): a proxy must never govern
/// itself.
pub fn plan(
    rules: &[AutoTagRule],
    root: &str,
    existing: &[String],
    tags: &TagStore,
    own: Option<&str>,
    exists: impl Fn(&std::path::Path) -> bool,
) -> Plan {
    let mut out = Plan::default();
    let present: HashSet<&str> = existing.iter().map(String::as_str).collect();
    let tagged: HashSet<&str> = tags.iter().map(|t| t.cgroup.as_str()).collect();
    for cg in existing {
        if !is_same_or_below(cg, root) || tagged.contains(cg.as_str()) {
            continue;
        }
        let rel = if root == "/" {
            cg.as_str()
        } else {
            cg.strip_prefix(root).unwrap_or(cg)
        };
        let rel = rel.trim_start_matches('/');
        if rel.is_empty() {
            continue;
        }
        let mut rule = None;
        for r in rules.iter().filter(|r| r.matches(rel)) {
            if r.if_token_exists {
                match r.token_for(cg) {
                    Ok(Some(t)) if exists(&t) => {}
                    _ => continue,
                }
            }
            rule = Some(r);
            break;
        }
        let Some(rule) = rule else {
            continue;
        };
        if own.is_some_and(|o| is_same_or_below(o, cg)) {
            out.skipped
                .push(format!("{cg}: the daemon itself runs there"));
            continue;
        }
        match rule.token_for(cg) {
            Ok(token_file) => out.add.push(AddTag {
                cgroup: cg.clone(),
                identity: rule.identity.clone(),
                token_file,
                rule: rule.cgroup.clone(),
            }),
            Err(e) => out.skipped.push(e),
        }
    }
    for t in tags.iter() {
        if t.auto.is_some() && !present.contains(t.cgroup.as_str()) {
            out.remove.push(t.cgroup.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(glob: &str, token: Option<&str>) -> AutoTagRule {
        AutoTagRule {
            cgroup: glob.into(),
            identity: "agent".into(),
            token_file: token.map(Into::into),
            if_token_exists: false,
        }
    }

    #[test]
    fn globs_match_component_wise() {
        let r = rule("**/docker-*.scope", None);
        assert!(r.matches("system.slice/docker-abc.scope"));
        assert!(r.matches("docker-abc.scope"));
        assert!(r.matches("a/b/c/docker-.scope"));
        assert!(!r.matches("system.slice/docker-abc.scope/child"));
        assert!(!r.matches("system.slice/docker-abc.service"));
        let r = rule("agents/*", None);
        assert!(r.matches("agents/x"));
        assert!(!r.matches("agents"));
        assert!(!r.matches("agents/x/y"));
        assert!(!r.matches("agentsx/y"));
        let r = rule("/a/**/b?/", None);
        assert!(r.matches("a/b1"));
        assert!(r.matches("a/x/y/b2"));
        assert!(!r.matches("a/x/b"));
        assert!(rule("**", None).matches("anything/at/all"));
        // Pathological stars stay fast.
        let r = rule(&"*a".repeat(30), None);
        assert!(!r.matches(&"a".repeat(29)));
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(rule("**/x", Some("/t/{container}")).validate().is_ok());
        assert!(rule("/", None).validate().is_err());
        assert!(rule("a/../b", None).validate().is_err());
        assert!(rule("a", Some("relative")).validate().is_err());
        let mut r = rule("a", None);
        r.identity = "bad name".into();
        assert!(r.validate().unwrap_err().contains("identity"));
    }

    #[test]
    fn token_placeholders() {
        let id = "ab".repeat(32);
        let r = rule("**", Some("/run/tokens/{container}.jwt"));
        assert_eq!(
            r.token_for(&format!("/gov/docker-{id}.scope")).unwrap(),
            Some(PathBuf::from(format!("/run/tokens/{id}.jwt")))
        );
        assert!(r.token_for("/gov/plain").is_err());
        let r = rule("**", Some("/t/{name}"));
        assert_eq!(r.token_for("/gov/x").unwrap(), Some(PathBuf::from("/t/x")));
    }

    #[test]
    fn pod_uid_placeholder_names_each_pods_projected_token() {
        let id = "ab".repeat(32);
        let (a, b) = (
            "0a1b2c3d-0a1b-4c2d-9e3f-001122334455",
            "11111111-2222-4333-8444-555566667777",
        );
        let r = rule(
            "**",
            Some(
                "/var/lib/kubelet/pods/{pod_uid}/volumes/kubernetes.io~projected/portcullis/token",
            ),
        );
        let token = |uid: &str| {
            Some(PathBuf::from(format!(
                "/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~projected/portcullis/token"
            )))
        };
        let systemd = |uid: &str| {
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{id}.scope",
                uid.replace('-', "_")
            )
        };
        assert_eq!(r.token_for(&systemd(a)).unwrap(), token(a));
        assert_eq!(r.token_for(&systemd(b)).unwrap(), token(b));
        assert_eq!(
            r.token_for(&format!("/kubepods/burstable/pod{a}/{id}"))
                .unwrap(),
            token(a)
        );
        // Not a pod, or a pod-like name the kubelet did not make: skipped
        // with the reason, never a path built from the cgroup's name.
        assert!(r
            .token_for(&format!("/system.slice/docker-{id}.scope"))
            .is_err());
        assert!(r
            .token_for("/kubepods/besteffort/pod../../../etc/x")
            .is_err());
        let inside = format!(
            "{}/kubepods-besteffort-pod{}.slice",
            systemd(a),
            b.replace('-', "_")
        );
        assert_eq!(r.token_for(&inside).unwrap(), token(a));
        // Placeholders stay out of identities (they are declared in the
        // policies) and token paths cannot climb.
        let mut bad = rule("**", None);
        bad.identity = "agent-{pod_uid}".into();
        assert!(bad.validate().unwrap_err().contains("token_file"));
        assert!(rule("**", Some("/t/{pod_uid}/../x")).validate().is_err());
        assert!(r.validate().is_ok());
    }

    #[test]
    fn a_pod_opts_in_by_the_token_it_mounts() {
        let a = "0a1b2c3d-0a1b-4c2d-9e3f-001122334455";
        let b = "11111111-2222-4333-8444-555566667777";
        let pod = |uid: &str| format!("/kubepods/besteffort/pod{uid}/{}", "ab".repeat(32));
        let opt_in = |identity: &str| {
            AutoTagRule {
            cgroup: "kubepods/**".into(),
            identity: identity.into(),
            token_file: Some(format!(
                "/var/lib/kubelet/pods/{{pod_uid}}/volumes/kubernetes.io~projected/portcullis-{identity}/token"
            )),
            if_token_exists: true,
        }
        };
        let rules = [opt_in("billing"), opt_in("support")];
        // Pod A mounts the support token, pod B none.
        let mounted = format!(
            "/var/lib/kubelet/pods/{a}/volumes/kubernetes.io~projected/portcullis-support/token"
        );
        let dir = std::env::temp_dir().join(format!(
            "portcullis-autotag-pods-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let tags = TagStore::open(dir.join("tags.json")).unwrap();
        let existing = [pod(a), pod(b)];
        let p = plan(&rules, "/", &existing, &tags, None, |t| {
            t == std::path::Path::new(&mounted)
        });
        assert_eq!(p.add.len(), 1, "{p:?}");
        assert_eq!(p.add[0].cgroup, pod(a));
        assert_eq!(p.add[0].identity, "support");
        assert_eq!(p.add[0].token_file, Some(PathBuf::from(&mounted)));
        assert!(p.skipped.is_empty(), "{p:?}");
        let mut no_file = opt_in("x");
        no_file.token_file = None;
        assert!(no_file.validate().is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn plan_adds_new_matches_and_removes_vanished_auto_tags_only() {
        let dir = std::env::temp_dir().join(format!(
            "portcullis-autotag-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut tags = TagStore::open(dir.join("tags.json")).unwrap();
        tags.insert("/gov/manual".into(), "m".into(), None).unwrap();
        tags.insert_auto("/gov/gone".into(), "agent".into(), None, "*".into())
            .unwrap();
        tags.insert_auto("/gov/kept".into(), "agent".into(), None, "*".into())
            .unwrap();
        let rules = [rule("*", None)];
        let existing: Vec<String> = [
            "/gov",
            "/gov/manual",
            "/gov/kept",
            "/gov/new",
            "/gov/daemon",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = plan(
            &rules,
            "/gov",
            &existing,
            &tags,
            Some("/gov/daemon"),
            |_| true,
        );
        assert_eq!(
            p.add.iter().map(|a| a.cgroup.as_str()).collect::<Vec<_>>(),
            ["/gov/new"]
        );
        assert_eq!(p.remove, ["/gov/gone"]);
        assert_eq!(p.skipped.len(), 1, "{:?}", p.skipped);
        // The manual tag's cgroup vanishing is not ours to undo.
        let p = plan(&rules, "/gov", &["/gov".to_string()], &tags, None, |_| true);
        assert_eq!(p.remove, ["/gov/gone", "/gov/kept"]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
