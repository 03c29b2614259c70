//! Finding a pod's network namespace from its UID, as a node agent must: scan /proc for a process whose
//! cgroup path names the pod (kubelet puts `pod<uid>` — or `pod<uid with _>.slice` with the systemd
//! driver — in every container's cgroup path). A cgroup v2 kubelet names it in the unified hierarchy
//! (`0::/kubepods/.../pod<uid>/...`); a cgroup v1 kubelet on a hybrid host only in the v1 hierarchies
//! (`4:memory:/kubepods/.../pod<uid>/...`), its pods sharing one v2 group. Either way the process leads to
//! the pod's netns, which is what enrollment is keyed by. The testbed lays pods out both ways.
use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Result, bail};

/// Where a pod lives on this host.
#[derive(Debug)]
pub struct PodLocation {
    /// The pod-level cgroup v2 directory (the ancestor of its containers' groups named after the pod), when
    /// the pod has one: not under a cgroup v1 kubelet.
    pub cgroup: Option<PathBuf>,
    /// An open handle on the pod's netns (keeps it identifiable while we use it).
    pub netns: File,
    /// The process it was found through.
    pub pid: i32,
}

/// Finds the pod with `uid` under `proc_root` (normally /proc), given the cgroup2 mount point.
pub fn find_pod(uid: &str, proc_root: &Path, cgroup2_mount: &Path) -> Result<PodLocation> {
    let underscored = uid.replace('-', "_");
    for entry in std::fs::read_dir(proc_root)?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cgroups) = std::fs::read_to_string(entry.path().join("cgroup")) else { continue };
        // Lines are "id:controllers:path"; the unified hierarchy's is "0::path".
        let named = |line: &&str| line.splitn(3, ':').nth(2).and_then(|path| pod_cgroup_dir(path, uid, &underscored));
        let Some(any) = cgroups.lines().find(|l| named(l).is_some()) else { continue };
        let v2 = cgroups.lines().filter(|l| l.starts_with("0::")).find_map(|l| named(&l));
        let Ok(netns) = File::open(entry.path().join("ns/net")) else { continue };
        let cgroup = v2.map(|dir| cgroup2_mount.join(dir.trim_start_matches('/')));
        tracing::debug!(uid, pid, line = any, "found the pod's process");
        return Ok(PodLocation { cgroup, netns, pid });
    }
    bail!("no process of pod {uid} found in {}", proc_root.display())
}

/// The prefix of a cgroup path up to the component naming the pod.
fn pod_cgroup_dir(path: &str, uid: &str, underscored: &str) -> Option<String> {
    let mut prefix = String::new();
    for component in path.split('/').filter(|c| !c.is_empty()) {
        prefix.push('/');
        prefix.push_str(component);
        if component.contains(uid) || component.contains(underscored) {
            return Some(prefix);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cgroup_is_the_component_naming_the_pod() {
        let uid = "0b1c-22";
        assert_eq!(
            pod_cgroup_dir("/kubepods/burstable/pod0b1c-22/3f9e1a", uid, "0b1c_22").as_deref(),
            Some("/kubepods/burstable/pod0b1c-22")
        );
        assert_eq!(
            pod_cgroup_dir("/kubepods.slice/kubepods-pod0b1c_22.slice/cri-containerd-1.scope", uid, "0b1c_22").as_deref(),
            Some("/kubepods.slice/kubepods-pod0b1c_22.slice")
        );
        assert_eq!(pod_cgroup_dir("/", uid, "0b1c_22"), None);
    }

    /// A fake /proc with one process whose /proc/<pid>/cgroup says `cgroups`.
    fn proc_with(cgroups: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("warren-discover-{}-{}", std::process::id(), cgroups.len()));
        std::fs::create_dir_all(root.join("42/ns")).unwrap();
        std::fs::write(root.join("42/cgroup"), cgroups).unwrap();
        std::fs::write(root.join("42/ns/net"), "").unwrap();
        root
    }

    #[test]
    fn a_cgroup_v1_kubelets_pod_is_found_without_a_v2_group() {
        let uid = "0b1c-22";
        let v1 = proc_with("4:memory:/kubepods/besteffort/pod0b1c-22/3f9e\n1:cpu:/kubepods/besteffort/pod0b1c-22/3f9e\n0::/system.slice/containerd.service\n");
        let found = find_pod(uid, &v1, Path::new("/sys/fs/cgroup")).unwrap();
        assert_eq!((found.pid, found.cgroup), (42, None));

        let v2 = proc_with("0::/kubepods/besteffort/pod0b1c-22/3f9e\n");
        let found = find_pod(uid, &v2, Path::new("/sys/fs/cgroup")).unwrap();
        assert_eq!(found.cgroup, Some(PathBuf::from("/sys/fs/cgroup/kubepods/besteffort/pod0b1c-22")));

        // Control: another pod's process is not taken for this one.
        let error = find_pod("ffff-00", &v1, Path::new("/sys/fs/cgroup")).unwrap_err();
        assert!(error.to_string().contains("no process of pod ffff-00"), "{error}");
        for dir in [v1, v2] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
