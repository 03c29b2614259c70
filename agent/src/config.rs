//! The agent's configuration: which node it runs on, where its state lives, and (until the controller
//! pushes workloads) which pods on this node exist and whether they are enrolled.
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_RUN_DIR: &str = "/run/warren";
/// Outbound capture port inside each enrolled pod (as ztunnel's 15001).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// The Kubernetes node this agent serves.
    pub node_name: String,
    /// bpffs directory for the pinned maps.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Runtime state: the pid file `inspect` checks for a live agent.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// cgroup (v2) the programs attach to; every enrolled pod's cgroup must be below it. Default: the
    /// cgroup2 root, as Cilium does.
    #[serde(default)]
    pub cgroup_attach: Option<PathBuf>,
    /// Admin HTTP endpoint (/metrics, /stats, /ready), in the agent's own network namespace.
    #[serde(default = "default_admin_addr")]
    pub admin_addr: SocketAddr,
    #[serde(default = "default_outbound_port")]
    pub outbound_port: u16,
    /// Level of the eBPF programs' own log lines (aya-log): off, error, warn, info, debug, trace.
    #[serde(default)]
    pub ebpf_log_level: EbpfLogLevel,
    #[serde(default)]
    pub pods: Vec<PodConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodConfig {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Path of the pod's network namespace (e.g. /run/netns/NAME or /proc/PID/ns/net).
    pub netns: PathBuf,
    /// The pod's cgroup (v2) directory.
    pub cgroup: PathBuf,
    #[serde(default)]
    pub ip: Option<IpAddr>,
    #[serde(default = "yes")]
    pub enrolled: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EbpfLogLevel {
    Off,
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl EbpfLogLevel {
    /// The value of aya-log-ebpf's AYA_LOG_LEVEL global (0 disables every record).
    pub fn as_aya_level(self) -> u8 {
        match self {
            EbpfLogLevel::Off => 0,
            EbpfLogLevel::Error => 1,
            EbpfLogLevel::Warn => 2,
            EbpfLogLevel::Info => 3,
            EbpfLogLevel::Debug => 4,
            EbpfLogLevel::Trace => 5,
        }
    }
}

impl std::str::FromStr for EbpfLogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_yaml::from_str(s).map_err(|_| {
            format!("unknown eBPF log level {s:?} (expected off, error, warn, info, debug or trace)")
        })
    }
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(warren_maps::DEFAULT_PIN_DIR)
}
fn default_run_dir() -> PathBuf {
    PathBuf::from(DEFAULT_RUN_DIR)
}
fn default_admin_addr() -> SocketAddr {
    DEFAULT_ADMIN_ADDR.parse().expect("valid default")
}
fn default_outbound_port() -> u16 {
    DEFAULT_OUTBOUND_PORT
}
fn default_namespace() -> String {
    "default".into()
}
fn yes() -> bool {
    true
}

impl AgentConfig {
    /// Reads and validates a YAML config file; errors name the field and the offending value.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let config: AgentConfig =
            serde_yaml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        config.validate().with_context(|| format!("invalid config {}", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.node_name.trim().is_empty() {
            bail!("nodeName: must not be empty");
        }
        if self.outbound_port == 0 {
            bail!("outboundPort: 0 is not a port");
        }
        let mut seen = HashSet::new();
        for (i, pod) in self.pods.iter().enumerate() {
            if pod.name.is_empty() {
                bail!("pods[{i}].name: must not be empty");
            }
            if !seen.insert((pod.namespace.as_str(), pod.name.as_str())) {
                bail!("pods[{i}].name: {}/{} is listed twice", pod.namespace, pod.name);
            }
            if !pod.netns.exists() {
                bail!("pods[{i}].netns: {} does not exist", pod.netns.display());
            }
            if !pod.cgroup.is_dir() {
                bail!("pods[{i}].cgroup: {} is not a directory", pod.cgroup.display());
            }
        }
        Ok(())
    }

    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join("agent.pid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in_and_unknown_fields_are_refused() {
        let c: AgentConfig = serde_yaml::from_str("nodeName: n1\n").unwrap();
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/warren"));
        assert_eq!(c.outbound_port, 15001);
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:15000");
        let err = serde_yaml::from_str::<AgentConfig>("nodeName: n1\npinDri: /x\n").unwrap_err();
        assert!(err.to_string().contains("pinDri"), "{err}");
    }

    #[test]
    fn validation_names_field_and_value() {
        let c: AgentConfig = serde_yaml::from_str(
            "nodeName: n1\npods:\n- name: a\n  netns: /nonexistent/ns\n  cgroup: /tmp\n",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert_eq!(err, "pods[0].netns: /nonexistent/ns does not exist");
        assert_eq!(
            "verbose".parse::<EbpfLogLevel>().unwrap_err(),
            "unknown eBPF log level \"verbose\" (expected off, error, warn, info, debug or trace)"
        );
        assert_eq!("debug".parse::<EbpfLogLevel>().unwrap(), EbpfLogLevel::Debug);
    }
}
