//! A cgroup leaf per VM: `memory.max`, `pids.max`, `cpu.max`.
//!
//! Both cgroup versions: v2 (one unified hierarchy; the leaves go under a
//! subtree delegated to emberd) and v1 (a hierarchy per controller, as
//! many hosts and containers still mount them; the leaves go under the
//! same parent in each). [`Hierarchy::detect`] picks v2 when its memory and
//! pids controllers are available, else v1 when both are mounted.
//!
//! | limit | v2 file | v1 file |
//! |---|---|---|
//! | memory | `memory.max` (and `memory.swap.max` 0) | `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes` when swap is accounted) |
//! | processes and threads | `pids.max` | `pids.max` |
//! | CPU | `cpu.max` (`QUOTA PERIOD`) | `cpu.cfs_quota_us`, `cpu.cfs_period_us` |
//! | kills at the memory limit | `memory.events` `oom_kill` | `memory.oom_control` `oom_kill` |

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Errors making or reading cgroups. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The host has neither a usable v2 nor v1 hierarchy.
    #[error("no usable cgroup hierarchy: {0}")]
    Unavailable(String),
    /// A file or directory operation failed.
    #[error("cgroup {path}: {what}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { path, what, source }
}

/// The cgroup hierarchy (or hierarchies) of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2, mounted at this path.
    V2(PathBuf),
    /// cgroup v1: the memory, pids and (if mounted) cpu hierarchies.
    V1 {
        /// The memory controller's mount.
        memory: PathBuf,
        /// The pids controller's mount.
        pids: PathBuf,
        /// The cpu controller's mount.
        cpu: Option<PathBuf>,
    },
}

impl Hierarchy {
    /// The hierarchy under `root` (normally [`CGROUP_ROOT`]): v2 if its
    /// memory and pids controllers are there (at `root`, or at
    /// `root/unified` on a hybrid host), else v1 if both are mounted.
    pub fn detect(root: &Path) -> Result<Hierarchy, CgroupError> {
        let mut why = Vec::new();
        for v2 in [root.to_path_buf(), root.join("unified")] {
            match std::fs::read_to_string(v2.join("cgroup.controllers")) {
                Ok(text) => {
                    let has = |c: &str| text.split_whitespace().any(|w| w == c);
                    if has("memory") && has("pids") {
                        return Ok(Hierarchy::V2(v2));
                    }
                    why.push(format!(
                        "{} lacks the memory or pids controller (it has: {})",
                        v2.join("cgroup.controllers").display(),
                        text.trim()
                    ));
                }
                Err(_) => continue,
            }
        }
        let memory = root.join("memory");
        let pids = root.join("pids");
        let cpu = [root.join("cpu"), root.join("cpu,cpuacct")]
            .into_iter()
            .find(|p| p.join("cpu.cfs_quota_us").exists());
        // (A hierarchy's root cgroup has no pids.max of its own.)
        if memory.join("memory.limit_in_bytes").exists() && pids.join("cgroup.procs").exists() {
            return Ok(Hierarchy::V1 { memory, pids, cpu });
        }
        why.push(format!(
            "no cgroup v1 memory and pids hierarchies at {} and {}",
            memory.display(),
            pids.display()
        ));
        Err(CgroupError::Unavailable(why.join("; ")))
    }

    /// The leaf directories of `name` (a path relative to each hierarchy's
    /// root, e.g. `ember/vms/<id>`), one per hierarchy.
    pub fn dirs(&self, name: &Path) -> Vec<PathBuf> {
        match self {
            Hierarchy::V2(root) => vec![root.join(name)],
            Hierarchy::V1 { memory, pids, cpu } => {
                let mut dirs = vec![memory.join(name), pids.join(name)];
                dirs.extend(cpu.iter().map(|c| c.join(name)));
                dirs
            }
        }
    }

    /// Makes `parent` (relative, like the leaves' names) ready to hold
    /// leaves: created in every hierarchy, and on v2 with the memory, pids
    /// and cpu controllers enabled for its children (each ancestor below
    /// the root must enable them for it too, which a delegation gives).
    /// Leaves left by an earlier run (empty ones) are removed.
    pub fn prepare_parent(&self, parent: &Path) -> Result<(), CgroupError> {
        for dir in self.dirs(parent) {
            std::fs::create_dir_all(&dir).map_err(io(&dir, "create"))?;
            remove_empty_leaves(&dir, Instant::now());
        }
        if let Hierarchy::V2(root) = self {
            // The parent's parent (emberd's delegated cgroup, emptied of
            // processes) gives the controllers to the parent, the parent
            // to the leaves.
            let dir = root.join(parent);
            for at in [dir.parent().unwrap_or(root), dir.as_path()] {
                let available = std::fs::read_to_string(at.join("cgroup.controllers"))
                    .map_err(io(at, "read cgroup.controllers"))?;
                let wanted: Vec<String> = ["memory", "pids", "cpu"]
                    .iter()
                    .filter(|c| available.split_whitespace().any(|w| w == **c))
                    .map(|c| format!("+{c}"))
                    .collect();
                let control = at.join("cgroup.subtree_control");
                std::fs::write(&control, wanted.join(" ")).map_err(io(
                    &control,
                    "enable controllers (is the subtree delegated, with no process in it?)",
                ))?;
            }
        }
        Ok(())
    }
}

/// A leaf to make: where, and its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafSpec {
    /// The hierarchy.
    pub hierarchy: Hierarchy,
    /// The leaf's path relative to the hierarchy root.
    pub name: PathBuf,
    /// Memory limit, bytes.
    pub memory_max: Option<u64>,
    /// Process (thread) limit.
    pub pids_max: Option<u64>,
    /// CPU bandwidth: quota and period, µs.
    pub cpu_max: Option<(u64, u64)>,
}

/// A leaf made and joined.
#[derive(Debug)]
pub struct Leaf {
    /// What it was made from.
    pub spec: LeafSpec,
    dirs: Vec<PathBuf>,
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(io(&path, "write"))
}

impl Leaf {
    /// Creates the leaf (in each hierarchy) and writes its limits. Undone
    /// on failure.
    pub fn create(spec: &LeafSpec) -> Result<Leaf, CgroupError> {
        let mut dirs = spec.hierarchy.dirs(&spec.name);
        // v1 without a CPU limit: no cpu leaf (memory and pids only).
        if matches!(spec.hierarchy, Hierarchy::V1 { .. }) && spec.cpu_max.is_none() {
            dirs.truncate(2);
        }
        let leaf = Leaf {
            spec: spec.clone(),
            dirs,
        };
        let result = leaf.fill();
        if result.is_err() {
            leaf.remove();
        }
        result.map(|()| leaf)
    }

    fn fill(&self) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            // A leaf of the same name left by an earlier run: empty once
            // its processes are gone.
            if dir.exists() {
                let _ = std::fs::remove_dir(dir);
            }
            std::fs::create_dir(dir).map_err(io(dir, "create the leaf"))?;
        }
        match &self.spec.hierarchy {
            Hierarchy::V2(_) => {
                let dir = &self.dirs[0];
                if let Some(bytes) = self.spec.memory_max {
                    write(dir, "memory.max", &bytes.to_string())?;
                    if dir.join("memory.swap.max").exists() {
                        write(dir, "memory.swap.max", "0")?;
                    }
                }
                if let Some(n) = self.spec.pids_max {
                    write(dir, "pids.max", &n.to_string())?;
                }
                if let Some((quota, period)) = self.spec.cpu_max {
                    write(dir, "cpu.max", &format!("{quota} {period}"))?;
                }
            }
            Hierarchy::V1 { cpu, .. } => {
                let (memory, pids) = (&self.dirs[0], &self.dirs[1]);
                if let Some(bytes) = self.spec.memory_max {
                    write(memory, "memory.limit_in_bytes", &bytes.to_string())?;
                    // With swap accounted, the same cap on memory + swap.
                    if memory.join("memory.memsw.limit_in_bytes").exists() {
                        write(memory, "memory.memsw.limit_in_bytes", &bytes.to_string())?;
                    }
                }
                if let Some(n) = self.spec.pids_max {
                    write(pids, "pids.max", &n.to_string())?;
                }
                let cpu_dir = cpu.as_ref().and_then(|_| self.dirs.get(2));
                if let (Some((quota, period)), Some(dir)) = (self.spec.cpu_max, cpu_dir) {
                    write(dir, "cpu.cfs_period_us", &period.to_string())?;
                    write(dir, "cpu.cfs_quota_us", &quota.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` (of the caller's PID namespace) into the leaf.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            write(dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// How many times the kernel killed a process of the leaf at its
    /// memory limit.
    pub fn oom_kills(&self) -> u64 {
        let file = match self.spec.hierarchy {
            Hierarchy::V2(_) => "memory.events",
            Hierarchy::V1 { .. } => "memory.oom_control",
        };
        std::fs::read_to_string(self.dirs[0].join(file))
            .ok()
            .and_then(|text| {
                text.lines().find_map(|line| {
                    let (key, value) = line.split_once(' ')?;
                    (key == "oom_kill").then(|| value.trim().parse().ok())?
                })
            })
            .unwrap_or(0)
    }

    /// Whether the kernel killed a process of the leaf at its memory limit.
    pub fn oom_killed(&self) -> bool {
        self.oom_kills() > 0
    }

    /// Removes the leaf. A cgroup empties a moment after its last process
    /// is reaped: a few tries.
    pub fn remove(&self) {
        for dir in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }
    }
}

/// Removes the leaves under `dir` (a failure, EBUSY, means processes
/// remain: retried until `deadline`, then kept).
fn remove_empty_leaves(dir: &Path, deadline: Instant) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
    {
        while std::fs::remove_dir(entry.path()).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Removes the parent `parent` of `hierarchy`'s leaves and the leaves it
/// holds, in every hierarchy, waiting up to `patience` for leaves whose
/// processes are still ending. Returns whether all of it went.
pub fn remove_parent(hierarchy: &Hierarchy, parent: &Path, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    let mut all = true;
    for dir in hierarchy.dirs(parent) {
        remove_empty_leaves(&dir, deadline);
        all &= std::fs::remove_dir(&dir).is_ok() || !dir.exists();
    }
    all
}

/// Removes the leaf `name` of `hierarchy` (for whoever made a jail with
/// it, once its keeper has exited; a few tries while it empties).
pub fn remove_leaf(hierarchy: &Hierarchy, name: &Path) {
    Leaf {
        spec: LeafSpec {
            hierarchy: hierarchy.clone(),
            name: name.to_path_buf(),
            memory_max: None,
            pids_max: None,
            cpu_max: None,
        },
        dirs: hierarchy.dirs(name),
    }
    .remove();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ember-cgroup-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn v2_with_memory_and_pids_is_chosen_over_v1() {
        let root = fake_root("v2");
        std::fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        assert_eq!(
            Hierarchy::detect(&root).unwrap(),
            Hierarchy::V2(root.clone())
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_hybrid_host_without_v2_memory_falls_back_to_v1() {
        let root = fake_root("hybrid");
        std::fs::create_dir_all(root.join("unified")).unwrap();
        std::fs::write(root.join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        for (dir, file) in [
            ("memory", "memory.limit_in_bytes"),
            ("pids", "cgroup.procs"),
            ("cpu", "cpu.cfs_quota_us"),
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            std::fs::write(root.join(dir).join(file), "").unwrap();
        }
        let found = Hierarchy::detect(&root).unwrap();
        assert_eq!(
            found,
            Hierarchy::V1 {
                memory: root.join("memory"),
                pids: root.join("pids"),
                cpu: Some(root.join("cpu")),
            }
        );
        assert_eq!(found.dirs(Path::new("ember/a")).len(), 3);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn no_hierarchy_says_what_is_missing() {
        let root = fake_root("none");
        std::fs::write(root.join("cgroup.controllers"), "cpu io\n").unwrap();
        let err = Hierarchy::detect(&root).unwrap_err().to_string();
        assert!(err.contains("lacks the memory or pids controller"), "{err}");
        assert!(err.contains("no cgroup v1 memory and pids"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn oom_kills_are_read_from_either_version() {
        let root = fake_root("oom");
        let leaf = Leaf {
            spec: LeafSpec {
                hierarchy: Hierarchy::V1 {
                    memory: root.clone(),
                    pids: root.clone(),
                    cpu: None,
                },
                name: PathBuf::from("x"),
                memory_max: None,
                pids_max: None,
                cpu_max: None,
            },
            dirs: vec![root.clone()],
        };
        std::fs::write(
            root.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(leaf.oom_kills(), 2);
        let v2 = Leaf {
            spec: LeafSpec {
                hierarchy: Hierarchy::V2(root.clone()),
                ..leaf.spec.clone()
            },
            dirs: vec![root.clone()],
        };
        std::fs::write(
            root.join("memory.events"),
            "low 0\nhigh 0\nmax 5\noom 1\noom_kill 0\n",
        )
        .unwrap();
        assert!(!v2.oom_killed());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// On v2 (which our hosts do not offer with the memory controller, so
    /// this file-level check is what CI has of it): the parent gets the
    /// controllers its own parent offers, for its children; a leaf is one
    /// directory holding every limit (and no swap where swap is
    /// accounted); a process moves in through that one `cgroup.procs`.
    #[test]
    fn v2_parents_enable_controllers_and_leaves_hold_every_limit() {
        let root = fake_root("v2-leaf");
        let hierarchy = Hierarchy::V2(root.clone());
        let parent = Path::new("ember/abc");
        std::fs::create_dir_all(root.join(parent)).unwrap();
        std::fs::write(
            root.join("ember/cgroup.controllers"),
            "cpu io memory pids
",
        )
        .unwrap();
        std::fs::write(
            root.join("ember/abc/cgroup.controllers"),
            "memory pids
",
        )
        .unwrap();
        // A leaf an earlier run left, empty: removed.
        std::fs::create_dir_all(root.join("ember/abc/stale")).unwrap();
        hierarchy.prepare_parent(parent).unwrap();
        let enabled = |dir: &str| {
            std::fs::read_to_string(root.join(dir).join("cgroup.subtree_control")).unwrap()
        };
        assert_eq!(enabled("ember"), "+memory +pids +cpu");
        assert_eq!(enabled("ember/abc"), "+memory +pids");
        assert!(!root.join("ember/abc/stale").exists());

        let spec = LeafSpec {
            hierarchy: hierarchy.clone(),
            name: parent.join("vm1"),
            memory_max: Some(96 << 20),
            pids_max: Some(32),
            cpu_max: Some((50_000, 100_000)),
        };
        // No memory.swap.max in this leaf (swap not accounted): none written.
        let leaf = Leaf::create(&spec).unwrap();
        let dir = root.join("ember/abc/vm1");
        let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap();
        assert_eq!(read("memory.max"), (96u64 << 20).to_string());
        assert_eq!(read("pids.max"), "32");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert!(!dir.join("memory.swap.max").exists());
        leaf.add_process(4242).unwrap();
        assert_eq!(read("cgroup.procs"), "4242");
        assert_eq!(leaf.dirs, vec![dir.clone()]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// The v2 parent refuses, naming the fix, when it cannot enable the
    /// controllers (a subtree not delegated).
    #[test]
    fn v2_without_controllers_to_enable_says_so() {
        let root = fake_root("v2-nodelegation");
        let hierarchy = Hierarchy::V2(root.clone());
        std::fs::create_dir_all(root.join("ember/abc")).unwrap();
        // No cgroup.controllers in the parent's parent: not delegated here.
        let err = hierarchy
            .prepare_parent(Path::new("ember/abc"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cgroup.controllers"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
