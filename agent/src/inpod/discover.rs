//! Finding a pod's cgroup and network namespace from its UID, as a node agent must: scan /proc for a
//! process whose cgroup path names the pod (kubelet puts `pod<uid>` — or `pod<uid with _>.slice` with the
//! systemd driver — in every container's cgroup path). The testbed lays pods out the same way.
use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Result, bail};

/// Where a pod lives on this host.
#[derive(Debug)]
pub struct PodLocation {
    /// The pod-level cgroup (v2) directory: the ancestor of its containers' cgroups named after the pod.
    pub cgroup: PathBuf,
    /// An open handle on the pod's netns (keeps it identifiable while we use it).
    pub netns: File,
    /// The process it was found through.
    pub pid: i32,
}

/// Finds the pod with `uid` under `proc_root` (normally /proc), given the cgroup2 mount point.
pub fn find_pod(uid: &str, proc_root: &Path, cgroup2_mount: &Path) -> Result<PodLocation> {
    let underscored = uid.replace('-', "_");
    let mut v1_only = false;
    for entry in std::fs::read_dir(proc_root)?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cgroups) = std::fs::read_to_string(entry.path().join("cgroup")) else { continue };
        if !cgroups.contains(uid) && !cgroups.contains(&underscored) {
            continue;
        }
        // The unified hierarchy's line is "0::/path".
        let Some(path) = cgroups.lines().find_map(|l| l.strip_prefix("0::")) else { continue };
        let Some(pod_dir) = pod_cgroup_dir(path, uid, &underscored) else {
            v1_only = true; // the pod is named only in v1 hierarchies
            continue;
        };
        let Ok(netns) = File::open(entry.path().join("ns/net")) else { continue };
        return Ok(PodLocation { cgroup: cgroup2_mount.join(pod_dir.trim_start_matches('/')), netns, pid });
    }
    if v1_only {
        bail!("pod {uid} has no cgroup v2 group of its own (a cgroup v1 kubelet): not supported");
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
}
