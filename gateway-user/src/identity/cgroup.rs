//! The governed part of the cgroup v2 tree: path resolution, ids, processes.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

/// A cgroup problem an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The cgroup directory does not exist.
    #[error("cgroup {0} does not exist")]
    Missing(String),
    /// The cgroup lies outside the subtree this daemon governs.
    #[error("cgroup {path} is outside the governed cgroup root {root}")]
    OutsideRoot {
        /// The cgroup asked for.
        path: String,
        /// The daemon's governed root.
        root: String,
    },
    /// The path is not a plain path (`..`, empty components).
    #[error("cgroup path {0:?} is not a plain path below the cgroup2 mount")]
    BadPath(String),
    /// The process does not exist or has no cgroup v2 membership.
    #[error("process {0} not found or not in a cgroup v2 hierarchy")]
    NoSuchPid(u32),
    /// Reading the cgroup tree failed.
    #[error("{path}: {source}")]
    Io {
        /// Path being read.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// The cgroup2 mount and the subtree of it one daemon governs.
///
/// Cgroup paths are kept relative to the cgroup2 mount, written with a
/// leading `/` (the form `/proc/PID/cgroup` uses), e.g. `/agents/billing`.
#[derive(Clone, Debug)]
pub struct CgroupTree {
    mount: PathBuf,
    root: String,
}

impl CgroupTree {
    /// A tree rooted at `root` (absolute below `mount`, or relative to it).
    pub fn new(mount: PathBuf, root: &str) -> Result<Self, CgroupError> {
        let mut tree = Self {
            mount,
            root: "/".into(),
        };
        tree.root = tree.normalize(root)?;
        if !tree.dir(&tree.root).is_dir() {
            return Err(CgroupError::Missing(tree.root.clone()));
        }
        Ok(tree)
    }

    /// The cgroup2 mount point.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The governed root, relative to the mount.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The directory of the governed root.
    pub fn root_dir(&self) -> PathBuf {
        self.dir(&self.root)
    }

    /// The directory of a cgroup given in mount-relative form.
    pub fn dir(&self, rel: &str) -> PathBuf {
        self.mount.join(rel.trim_start_matches('/'))
    }

    /// Turns user input (an absolute path under the mount, or a path relative
    /// to the mount) into mount-relative form, without checking existence.
    pub fn normalize(&self, input: &str) -> Result<String, CgroupError> {
        let p = Path::new(input);
        let rel = p.strip_prefix(&self.mount).unwrap_or(p);
        let mut out = String::new();
        for c in rel.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(s) => {
                    out.push('/');
                    out.push_str(
                        s.to_str()
                            .ok_or_else(|| CgroupError::BadPath(input.to_string()))?,
                    );
                }
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(CgroupError::BadPath(input.to_string()))
                }
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        Ok(out)
    }

    /// Whether `rel` is the governed root or below it.
    pub fn is_governed(&self, rel: &str) -> bool {
        is_same_or_below(rel, &self.root)
    }

    /// Resolves user input to an existing governed cgroup.
    pub fn resolve(&self, input: &str) -> Result<String, CgroupError> {
        let rel = self.normalize(input)?;
        if !self.is_governed(&rel) {
            return Err(CgroupError::OutsideRoot {
                path: rel,
                root: self.root.clone(),
            });
        }
        if !self.dir(&rel).is_dir() {
            return Err(CgroupError::Missing(rel));
        }
        Ok(rel)
    }

    /// The cgroup id (directory inode) of a cgroup.
    pub fn id_of(&self, rel: &str) -> Result<u64, CgroupError> {
        fs::metadata(self.dir(rel))
            .map(|m| m.ino())
            .map_err(|source| CgroupError::Io {
                path: rel.to_string(),
                source,
            })
    }

    /// The cgroup v2 path of a process.
    pub fn cgroup_of_pid(&self, pid: u32) -> Result<String, CgroupError> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(|_| CgroupError::NoSuchPid(pid))?;
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|p| self.normalize(p.trim()))
            .transpose()?
            .ok_or(CgroupError::NoSuchPid(pid))
    }

    /// Every cgroup at or below `rel`, with its id. Bounded by the tree.
    pub fn walk(&self, rel: &str) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![rel.to_string()];
        while let Some(cur) = stack.pop() {
            let Ok(meta) = fs::metadata(self.dir(&cur)) else {
                continue;
            };
            out.push((cur.clone(), meta.ino()));
            let Ok(entries) = fs::read_dir(self.dir(&cur)) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    if let Some(name) = e.file_name().to_str() {
                        stack.push(join(&cur, name));
                    }
                }
            }
        }
        out
    }

    /// Map of cgroup id → path for the whole governed subtree.
    pub fn index(&self) -> HashMap<u64, String> {
        self.walk(&self.root)
            .into_iter()
            .map(|(p, id)| (id, p))
            .collect()
    }

    /// Process ids in `rel` and every cgroup below it.
    pub fn procs_below(&self, rel: &str) -> Vec<u32> {
        let mut pids = Vec::new();
        for (cg, _) in self.walk(rel) {
            if let Ok(text) = fs::read_to_string(self.dir(&cg).join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
        pids
    }
}

/// Joins a mount-relative cgroup path and a child name.
fn join(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// Whether cgroup `path` is `ancestor` or lies below it (component-wise).
pub fn is_same_or_below(path: &str, ancestor: &str) -> bool {
    if ancestor == "/" {
        return true;
    }
    path == ancestor
        || path
            .strip_prefix(ancestor)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> CgroupTree {
        CgroupTree {
            mount: PathBuf::from("/sys/fs/cgroup/unified"),
            root: "/gov".into(),
        }
    }

    #[test]
    fn normalizes_absolute_and_relative_paths() {
        let t = tree();
        assert_eq!(
            t.normalize("/sys/fs/cgroup/unified/gov/a").unwrap(),
            "/gov/a"
        );
        assert_eq!(t.normalize("gov/a/").unwrap(), "/gov/a");
        assert_eq!(t.normalize("/gov/./a").unwrap(), "/gov/a");
        assert_eq!(t.normalize("/").unwrap(), "/");
        assert!(matches!(
            t.normalize("gov/../x"),
            Err(CgroupError::BadPath(_))
        ));
    }

    #[test]
    fn governed_is_component_wise() {
        let t = tree();
        assert!(t.is_governed("/gov"));
        assert!(t.is_governed("/gov/a/b"));
        assert!(!t.is_governed("/government"));
        assert!(!t.is_governed("/"));
        assert!(is_same_or_below("/anything", "/"));
    }
}
