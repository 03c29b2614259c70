//! A real local Kubernetes (v1.20, from Debian sources; see docs/local-cluster.md): etcd, kube-apiserver,
//! controller-manager and scheduler, and with `node` containerd + kubelet. Built once into
//! ~/.cache/warren/k8s; this module drives the scripts in xtask/scripts.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{run, setup::scripts_dir};

/// Where kube-apiserver listens (127.0.0.1), as xtask/scripts/k8s-control-plane.sh starts it.
pub const API_PORT: u16 = 16443;

pub const COMPONENTS: [&str; 4] = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"];

pub fn prefix() -> PathBuf {
    std::env::var_os("K8S_PREFIX").map(PathBuf::from).unwrap_or_else(|| warren_ebpf_build::cache_dir().join("k8s"))
}

fn run_dir() -> PathBuf {
    prefix().join("run")
}

pub fn kubeconfig() -> PathBuf {
    run_dir().join("admin.kubeconfig")
}

pub fn is_built() -> bool {
    COMPONENTS.iter().all(|c| prefix().join("bin").join(c).is_file()) && prefix().join("bin/etcd").exists()
}

fn script(name: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(scripts_dir().join(name)).env("K8S_PREFIX", prefix());
    cmd
}

/// Builds the Kubernetes binaries unless cached (about 8 minutes on 2 cores, once).
pub fn build() -> Result<()> {
    if is_built() {
        return Ok(());
    }
    eprintln!("xtask: building Kubernetes v1.20 from Debian sources into {} (once)", prefix().display());
    run(&mut script("k8s-build.sh")).context("building the local Kubernetes")
}

/// Starts the control plane (and the node); returns the kubeconfig path.
pub fn up(node: bool) -> Result<PathBuf> {
    build()?;
    let out = script("k8s-control-plane.sh")
        .arg("start")
        .env("WITH_CM", "1")
        .env("WITH_SCHED", "1")
        .output()
        .context("starting the control plane")?;
    if !out.status.success() {
        anyhow::bail!("control plane did not start: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    if node {
        run(script("k8s-node.sh").arg("start")).context("starting the node (containerd + kubelet)")?;
    }
    Ok(kubeconfig())
}

/// Stops everything `up` started and removes what containerd and kubelet left on the host.
pub fn down() -> Result<()> {
    run(script("k8s-node.sh").arg("stop")).context("stopping the node")?;
    run(script("k8s-control-plane.sh").arg("stop")).context("stopping the control plane")?;
    run(&mut script("k8s-cleanup-host.sh")).context("cleaning up the host")
}

/// One line per component: running (pid) or stopped.
pub fn status() -> Vec<(String, Option<i32>)> {
    let pid_files = [
        ("etcd", run_dir().join("etcd.pid")),
        ("kube-apiserver", run_dir().join("kube-apiserver.pid")),
        ("kube-controller-manager", run_dir().join("kube-controller-manager.pid")),
        ("kube-scheduler", run_dir().join("kube-scheduler.pid")),
        ("containerd", prefix().join("node/containerd.pid")),
        ("kubelet", prefix().join("node/kubelet.pid")),
    ];
    pid_files
        .into_iter()
        .map(|(name, file)| {
            let pid = std::fs::read_to_string(file).ok().and_then(|t| t.trim().parse::<i32>().ok());
            let alive = pid.filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
            (name.to_string(), alive)
        })
        .collect()
}
