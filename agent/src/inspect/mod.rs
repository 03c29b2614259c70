//! `warren-agent inspect …`: the agent's state, read back for people (tables) and tools (`-o json|yaml`).
pub mod analyze;
pub mod live;
pub mod maps;
pub mod remote;
pub mod status;

use std::{net::SocketAddr, path::Path};

use anyhow::{Result, bail};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// What every live view takes: where the agent answers, how to print, and which pods to show.
#[derive(Clone, Debug, clap::Args)]
pub struct ViewArgs {
    /// The agent's admin endpoint (with --node: its port, on that node's loopback).
    #[arg(long, default_value = crate::config::DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
    #[command(flatten)]
    pub scope: Scope,
    /// Another node's agent, through the API server (a port-forward to its warren-agent pod), from anywhere
    /// kubectl works.
    #[arg(long)]
    pub node: Option<String>,
    /// The cluster for --node (default: $KUBECONFIG, ~/.kube/config, or in-cluster, as kubectl).
    #[arg(long, requires = "node")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The namespace the agents run in, for --node.
    #[arg(long, default_value = "warren-system", requires = "node")]
    pub agent_namespace: String,
}

impl ViewArgs {
    /// The agent these views read: this node's admin endpoint, or `--node`'s through the API server.
    pub fn agent(&self) -> live::Agent {
        match &self.node {
            None => live::Agent::Local(self.admin_addr),
            Some(node) => live::Agent::Remote(remote::RemoteNode {
                node: node.clone(),
                kubeconfig: self.kubeconfig.clone(),
                namespace: self.agent_namespace.clone(),
                port: self.admin_addr.port(),
            }),
        }
    }
}

/// Where a node's agent keeps its state on the host: what `inspect maps` and `status` read.
#[derive(Clone, Debug, clap::Args)]
pub struct NodeState {
    /// bpffs directory the agent pinned its maps and links in.
    #[arg(long, default_value = warren_maps::DEFAULT_PIN_DIR)]
    pub pin_dir: std::path::PathBuf,
    /// The agent's runtime directory (holds agent.pid).
    #[arg(long, default_value = crate::config::DEFAULT_RUN_DIR)]
    pub run_dir: std::path::PathBuf,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
}

/// Which pods a view shows: `--namespace NS`, `--pod NAME` (in NS, or in any namespace).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Scope {
    /// Only this Kubernetes namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only this pod (its name; with --namespace, in that namespace).
    #[arg(long)]
    pub pod: Option<String>,
}

impl Scope {
    /// Whether a pod known as `namespace/name` is in scope.
    pub fn admits_pod(&self, key: &str) -> bool {
        let (namespace, name) = key.split_once('/').unwrap_or(("", key));
        self.namespace.as_deref().is_none_or(|n| n == namespace) && self.pod.as_deref().is_none_or(|p| p == name)
    }

    /// Whether a workload identity (`spiffe://td/ns/NS/sa/SA`) is in scope: by namespace only (a
    /// certificate belongs to a service account, not a pod).
    pub fn admits_identity(&self, identity: &str) -> bool {
        let namespace = identity.split("/ns/").nth(1).and_then(|rest| rest.split('/').next());
        self.namespace.as_deref().is_none_or(|n| Some(n) == namespace)
    }
}

/// The view as JSON or YAML; `None` for a table, which each view draws itself.
pub fn structured(view: &impl Serialize, output: Output) -> Option<Result<String>> {
    match output {
        Output::Table => None,
        Output::Json => Some(serde_json::to_string_pretty(view).map(|s| s + "\n").map_err(Into::into)),
        Output::Yaml => Some(serde_yaml::to_string(view).map_err(Into::into)),
    }
}

/// Fails unless the agent that owns `run_dir` is alive.
pub fn require_running_agent(run_dir: &Path) -> Result<i32> {
    let pid_file = run_dir.join("agent.pid");
    let Ok(text) = std::fs::read_to_string(&pid_file) else {
        bail!("warren-agent is not running on this node (no {})", pid_file.display());
    };
    let pid: i32 = text.trim().parse().unwrap_or(0);
    if !crate::sys::process_alive(pid) {
        bail!("warren-agent is not running on this node ({} names pid {pid}, which has exited)", pid_file.display());
    }
    Ok(pid)
}

/// Renders rows as aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}
