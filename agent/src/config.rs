//! The agent's configuration: which node it runs on, where its state lives, and (until the controller
//! pushes workloads) which pods on this node exist and whether they are enrolled.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Prometheus' scrape endpoint, Istio's 15020 (on every address: Prometheus scrapes it from elsewhere).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_RUN_DIR: &str = "/run/warren";
/// Outbound capture port inside each enrolled pod (as ztunnel's 15001).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Inbound capture port inside each enrolled pod (15006).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// HBONE (mTLS HTTP/2 CONNECT) port, 15008 as in Istio.
pub const DEFAULT_HBONE_PORT: u16 = 15008;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// The Kubernetes node this agent serves.
    pub node_name: String,
    /// bpffs directory for the pinned maps and links.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Runtime state: the pid file `inspect` checks for a live agent.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// cgroup (v2) the programs attach to; every enrolled pod's cgroup — and the agent's own, for socket
    /// acceleration — must be below it. Default: the cgroup2 root, as Cilium does.
    #[serde(default)]
    pub cgroup_attach: Option<PathBuf>,
    /// Admin HTTP endpoint (/metrics, /connections, /workloads, /ready), in the agent's network namespace.
    #[serde(default = "default_admin_addr")]
    pub admin_addr: SocketAddr,
    /// `/metrics` and `/stats/prometheus` in Prometheus' text format (the admin endpoint has them too).
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: SocketAddr,
    /// Access logs and the metrics' cluster name.
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
    #[serde(default = "default_outbound_port")]
    pub outbound_port: u16,
    #[serde(default = "default_inbound_port")]
    pub inbound_port: u16,
    #[serde(default = "default_hbone_port")]
    pub hbone_port: u16,
    /// sockops + sk_msg short-circuit of the app ↔ agent local legs (docs/architecture.md, "Socket
    /// acceleration"). On by default.
    #[serde(default = "yes")]
    pub socket_acceleration: bool,
    /// On SIGTERM, how long open connections may take to finish.
    #[serde(default = "default_drain_seconds")]
    pub drain_timeout_seconds: u64,
    /// Level of the eBPF programs' own log lines (aya-log): off, error, warn, info, debug, trace.
    #[serde(default)]
    pub ebpf_log_level: EbpfLogLevel,
    /// The local workloads file (namespaces and pods of this node), watched for changes.
    pub workloads_file: Option<PathBuf>,
    /// Take workloads from the Kubernetes API (pods on `nodeName`, namespaces' labels).
    pub kubernetes: Option<KubernetesSource>,
    /// Take workloads, services, routes and policies from warren-controller's push (needs `identity`:
    /// the stream is mTLS).
    #[serde(default)]
    pub controller: Option<crate::sources::controller::ControllerSource>,
    /// Workload identities and mTLS (HBONE between enrolled pods). Without it: plain L4.
    pub identity: Option<crate::identity::IdentityConfig>,
    /// Warren's retry budget for destinations whose DestinationRule sets no `retryBudget`.
    #[serde(default)]
    pub retry_budget: DefaultRetryBudget,
}

/// Warren's default retry budget (not Istio's: Istio has none unless a DestinationRule sets one): over a
/// sliding `windowSeconds`, retries may add at most `percent` % to the requests, plus a floor of
/// `minRetriesPerSecond` so that light traffic can always retry. `enabled: false`: retries are limited
/// only by each rule's `attempts` (and `maxRetries`), as in Istio.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DefaultRetryBudget {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_budget_percent")]
    pub percent: f64,
    #[serde(default = "default_min_retries_per_second")]
    pub min_retries_per_second: u32,
    #[serde(default = "default_budget_window")]
    pub window_seconds: u64,
}

impl Default for DefaultRetryBudget {
    fn default() -> Self {
        DefaultRetryBudget {
            enabled: true,
            percent: default_budget_percent(),
            min_retries_per_second: default_min_retries_per_second(),
            window_seconds: default_budget_window(),
        }
    }
}

impl DefaultRetryBudget {
    pub fn budget(&self) -> crate::resilience::budget::BudgetConfig {
        use crate::resilience::budget::BudgetConfig;
        if !self.enabled {
            return BudgetConfig::Unlimited;
        }
        let window = std::time::Duration::from_secs(self.window_seconds.max(1));
        let floor = self.min_retries_per_second.saturating_mul(self.window_seconds.max(1) as u32);
        BudgetConfig::Windowed { window, percent: self.percent, floor }
    }
}

fn yes() -> bool {
    true
}
fn default_budget_percent() -> f64 {
    20.0
}
fn default_min_retries_per_second() -> u32 {
    10
}
fn default_budget_window() -> u64 {
    10
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesSource {
    /// Default: in-cluster service account, else $KUBECONFIG.
    pub kubeconfig: Option<PathBuf>,
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
fn default_metrics_addr() -> SocketAddr {
    DEFAULT_METRICS_ADDR.parse().expect("valid default")
}
fn default_outbound_port() -> u16 {
    DEFAULT_OUTBOUND_PORT
}
fn default_inbound_port() -> u16 {
    DEFAULT_INBOUND_PORT
}
fn default_hbone_port() -> u16 {
    DEFAULT_HBONE_PORT
}
fn default_drain_seconds() -> u64 {
    10
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
        let ports = [("outboundPort", self.outbound_port), ("inboundPort", self.inbound_port), ("hbonePort", self.hbone_port)];
        for (i, (field, port)) in ports.iter().enumerate() {
            if *port == 0 {
                bail!("{field}: 0 is not a port");
            }
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                bail!("{field}: {port} is already {other}");
            }
        }
        if let Some(file) = &self.workloads_file {
            if !file.is_file() {
                bail!("workloadsFile: {} does not exist", file.display());
            }
        }
        let sources = [("workloadsFile", self.workloads_file.is_some()), ("kubernetes", self.kubernetes.is_some()), ("controller", self.controller.is_some())];
        let chosen: Vec<&str> = sources.iter().filter(|(_, set)| *set).map(|(name, _)| *name).collect();
        if chosen.len() > 1 {
            bail!("{}: set together with {}; choose one workload source", chosen[1], chosen[0]);
        }
        if let Some(controller) = &self.controller {
            if self.identity.is_none() {
                bail!("controller: needs identity (the push stream is mTLS)");
            }
            if !controller.address.contains(':') {
                bail!("controller.address: {:?} is not host:port", controller.address);
            }
        }
        if let Some(KubernetesSource { kubeconfig: Some(path) }) = &self.kubernetes {
            if !path.is_file() {
                bail!("kubernetes.kubeconfig: {} does not exist", path.display());
            }
        }
        Ok(())
    }

    /// The ports and switches the eBPF programs read.
    pub fn ebpf_settings(&self) -> warren_maps::Settings {
        warren_maps::Settings {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            hbone_port: self.hbone_port,
            socket_acceleration: u16::from(self.socket_acceleration),
        }
    }

    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join("agent.pid")
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[test]
    fn defaults_fill_in_and_unknown_fields_are_refused() {
        let c: AgentConfig = serde_yaml::from_str("nodeName: n1\n").unwrap();
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/warren"));
        assert_eq!(c.outbound_port, 15001);
        assert!(c.socket_acceleration);
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:15000");
        let err = serde_yaml::from_str::<AgentConfig>("nodeName: n1\npinDri: /x\n").unwrap_err();
        assert!(err.to_string().contains("pinDri"), "{err}");
    }

    /// The config shipped in deploy/daemonset.yaml must be one the agent accepts.
    #[test]
    fn the_daemonsets_config_parses() {
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
        let text = std::fs::read_to_string(manifest).unwrap();
        let configmap = serde_yaml::Deserializer::from_str(&text)
            .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
            .find(|doc| doc["kind"] == "ConfigMap")
            .expect("a ConfigMap in deploy/daemonset.yaml");
        let config: AgentConfig = serde_yaml::from_str(configmap["data"]["agent.yaml"].as_str().unwrap()).unwrap();
        config.validate().unwrap();
        assert!(config.socket_acceleration);
        assert_eq!(config.controller.as_ref().unwrap().address, "warren-controller.warren-system.svc:15010");
        let identity = config.identity.expect("identity section");
        assert_eq!(identity.controller.unwrap().address, "warren-controller.warren-system.svc:15012");
    }

    #[test]
    fn validation_names_field_and_value() {
        let c: AgentConfig = serde_yaml::from_str("nodeName: n1\nworkloadsFile: /nonexistent/pods.yaml\n").unwrap();
        assert_eq!(c.validate().unwrap_err().to_string(), "workloadsFile: /nonexistent/pods.yaml does not exist");
        let c: AgentConfig = serde_yaml::from_str("nodeName: n1\ninboundPort: 15001\n").unwrap();
        assert_eq!(c.validate().unwrap_err().to_string(), "inboundPort: 15001 is already outboundPort");
        assert_eq!(
            "verbose".parse::<EbpfLogLevel>().unwrap_err(),
            "unknown eBPF log level \"verbose\" (expected off, error, warn, info, debug or trace)"
        );
        assert_eq!("debug".parse::<EbpfLogLevel>().unwrap(), EbpfLogLevel::Debug);
    }
}
