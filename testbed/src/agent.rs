//! warren-agent running on a testbed node.
use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Node, Process, bin_path, in_netns, process::tail};

pub const ADMIN_ADDR: &str = "127.0.0.1:15000";
/// The Prometheus scrape endpoint of an agent on a node (every address of the node's netns).
pub const METRICS_PORT: u16 = 15020;

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// aya-log level of the eBPF programs (debug shows one line per redirected connect).
    pub ebpf_log_level: &'static str,
    /// bpffs pin directory; default: one of this testbed's own.
    pub pin_dir: Option<PathBuf>,
    /// Runtime directory (agent.pid); default: in the testbed's state directory.
    pub run_dir: Option<PathBuf>,
    /// sockops/sk_msg acceleration of the app ↔ agent legs (the agent's default: on).
    pub socket_acceleration: bool,
    /// How long the agent drains open connections on SIGTERM.
    pub drain_timeout_seconds: u64,
    /// Take workloads from this Kubernetes API (instead of the node's workloads file).
    pub kubeconfig: Option<PathBuf>,
    /// The Kubernetes node name the agent serves (default: the testbed node's name).
    pub node_name: Option<String>,
    /// Workload identities from the testbed's CA: HBONE (mTLS) between enrolled pods.
    pub mtls: bool,
    /// Workload certificate lifetime (default: the agent's, 24 h).
    pub certificate_lifetime_seconds: Option<u64>,
    /// The agent config's `identity` section verbatim (e.g. a controller CA), instead of `mtls`.
    pub identity: Option<serde_json::Value>,
    /// Take everything from warren-controller's push at this `host:port` (needs `mtls` or `identity`).
    pub controller: Option<String>,
    /// The agent config's `telemetry` section verbatim (access log, cluster, tracing).
    pub telemetry: Option<serde_json::Value>,
    /// `WARREN_LOG`: tests read the agent's debug lines; benchmarks run it as deployed (`info`), so that
    /// a line per connection is not part of what they measure.
    pub log: &'static str,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            ebpf_log_level: "debug",
            pin_dir: None,
            run_dir: None,
            socket_acceleration: true,
            drain_timeout_seconds: 2,
            kubeconfig: None,
            node_name: None,
            mtls: false,
            certificate_lifetime_seconds: None,
            identity: None,
            controller: None,
            log: "info,warren_agent=debug",
            telemetry: None,
        }
    }
}

/// A running warren-agent. Stopped (SIGTERM) on drop; the testbed removes its pinned maps.
pub struct Agent {
    pub process: Process,
    pub config_path: PathBuf,
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
    admin_addr: String,
    /// The Prometheus scrape endpoint (`/stats/prometheus`).
    pub metrics_addr: String,
    /// Where the admin endpoint listens: a node's netns, or "" for the host's.
    node_netns: String,
    bed: std::sync::Arc<crate::Inner>,
    /// Remove `pin_dir` on drop (an agent on the host; a node's pins go with the testbed).
    owns_pin_dir: bool,
}

/// Where an agent runs and what it serves, whatever its options.
struct Placement {
    node_name: String,
    pin_dir: PathBuf,
    run_dir: PathBuf,
    cgroup_attach: PathBuf,
    admin_addr: String,
    metrics_addr: String,
    workloads_file: Option<PathBuf>,
}

/// The agent's config file for `options` at `placement`.
fn agent_config(options: &AgentOptions, placement: &Placement, node: Option<&Node>) -> Result<serde_json::Value> {
    let mut config = serde_json::json!({
        "nodeName": options.node_name.clone().unwrap_or_else(|| placement.node_name.clone()),
        "pinDir": placement.pin_dir,
        "runDir": placement.run_dir,
        "cgroupAttach": placement.cgroup_attach,
        "adminAddr": placement.admin_addr,
        "metricsAddr": placement.metrics_addr,
        "ebpfLogLevel": options.ebpf_log_level,
        "socketAcceleration": options.socket_acceleration,
        "drainTimeoutSeconds": options.drain_timeout_seconds,
        "workloadsFile": placement.workloads_file,
    });
    if options.mtls {
        let node = node.context("testbed CA certificates (mtls) need a testbed node")?;
        let (cert, key) = node.ca_files()?;
        config["identity"] = serde_json::json!({ "trustDomain": "cluster.local", "caCertFile": cert, "caKeyFile": key });
        if let Some(seconds) = options.certificate_lifetime_seconds {
            config["identity"]["certificateLifetimeSeconds"] = seconds.into();
        }
    }
    if let Some(identity) = &options.identity {
        config["identity"] = identity.clone();
    }
    if let Some(kubeconfig) = &options.kubeconfig {
        config["workloadsFile"] = serde_json::Value::Null;
        config["kubernetes"] = serde_json::json!({ "kubeconfig": kubeconfig });
    }
    if let Some(telemetry) = &options.telemetry {
        config["telemetry"] = telemetry.clone();
    }
    if let Some(address) = &options.controller {
        config["workloadsFile"] = serde_json::Value::Null;
        config["controller"] = serde_json::json!({ "address": address });
    }
    Ok(config)
}

fn agent_command(config_path: &std::path::Path, log: &str) -> Result<Command> {
    let mut cmd = Command::new(bin_path("warren-agent")?);
    cmd.args(["run", "--config"]).arg(config_path).env("WARREN_LOG", log);
    Ok(cmd)
}

impl Agent {
    pub(crate) fn start(node: &Node, options: AgentOptions) -> Result<Agent> {
        let dir = node.state_dir();
        std::fs::create_dir_all(&dir)?;
        let placement = Placement {
            node_name: node.name.clone(),
            pin_dir: options.pin_dir.clone().unwrap_or_else(|| node.pin_dir()),
            run_dir: options.run_dir.clone().unwrap_or_else(|| dir.join("run")),
            cgroup_attach: node.cgroup.clone(),
            admin_addr: ADMIN_ADDR.to_string(),
            metrics_addr: format!("0.0.0.0:{METRICS_PORT}"),
            workloads_file: Some(node.workloads_file()),
        };
        let config_path = dir.join("agent.yaml");
        std::fs::write(&config_path, serde_yaml::to_string(&agent_config(&options, &placement, Some(node))?)?)?;
        // In its own cgroup below the node's, as a DaemonSet pod is below the node's root: the programs
        // attached at the node's cgroup see the agent's sockets (socket acceleration needs both ends).
        let process = node.spawn_in_cgroup(agent_command(&config_path, options.log)?, "warren-agent")?;
        Agent::started(process, config_path, placement, node.netns.clone(), node.bed.clone(), false)
    }

    /// An agent on this host itself, as a DaemonSet's (host network, host PID) on a real node: in the
    /// host's netns, its programs attached at the cgroup v2 root, its admin endpoint on a free loopback
    /// port; workloads from `options.kubeconfig` (required), pods found among the host's processes (a real
    /// kubelet's). Its pinned maps and links are removed when it is dropped, which detaches the programs.
    pub fn start_on_host(bed: &crate::Testbed, node_name: &str, options: AgentOptions) -> Result<Agent> {
        anyhow::ensure!(options.kubeconfig.is_some(), "an agent on the host takes its pods from a Kubernetes API");
        let dir = bed.state_dir().join("host-agent");
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let placement = Placement {
            node_name: node_name.to_string(),
            pin_dir: options.pin_dir.clone().unwrap_or_else(|| crate::pin_dir(&bed.inner.id, "host")),
            run_dir: options.run_dir.clone().unwrap_or_else(|| dir.join("run")),
            cgroup_attach: crate::cgroup2_root()?,
            admin_addr: format!("127.0.0.1:{port}"),
            metrics_addr: format!("127.0.0.1:{metrics_port}"),
            workloads_file: None,
        };
        let config_path = dir.join("agent.yaml");
        std::fs::write(&config_path, serde_yaml::to_string(&agent_config(&options, &placement, None)?)?)?;
        let process = Process::spawn(&bed.inner, agent_command(&config_path, options.log)?, "", &[])?;
        Agent::started(process, config_path, placement, String::new(), bed.inner.clone(), true)
    }

    /// The agent `process` just started, once it is ready.
    fn started(
        process: Process,
        config_path: PathBuf,
        placement: Placement,
        node_netns: String,
        bed: std::sync::Arc<crate::Inner>,
        owns_pin_dir: bool,
    ) -> Result<Agent> {
        let Placement { pin_dir, run_dir, admin_addr, metrics_addr, .. } = placement;
        let metrics_addr = metrics_addr.replace("0.0.0.0", "127.0.0.1");
        let agent = Agent { process, config_path, pin_dir, run_dir, admin_addr, metrics_addr, node_netns, bed, owns_pin_dir };
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(agent)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.get("/ready").is_ok_and(|body| body.trim() == "ready") {
                return Ok(());
            }
            if let Some(status) = self.process.exited() {
                bail!("warren-agent exited ({status}) before it was ready:\n{}", tail(&self.log(), 30));
            }
            if Instant::now() > deadline {
                bail!("warren-agent not ready after {timeout:?}:\n{}", tail(&self.log(), 30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's log (stderr) so far.
    pub fn log(&self) -> String {
        self.process.stderr()
    }

    /// GET on the admin endpoint (from inside the node's netns); the body of a 200 response.
    pub fn get(&self, path: &str) -> Result<String> {
        self.get_from(&self.admin_addr, path)
    }

    /// GET on the Prometheus scrape endpoint (`/stats/prometheus`, `/metrics`), from inside the node's netns.
    pub fn scrape(&self, path: &str) -> Result<String> {
        self.get_from(&self.metrics_addr, path)
    }

    /// The agent's stdout so far: its access log, a JSON object per line.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.process.stdout().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    fn get_from(&self, addr: &str, path: &str) -> Result<String> {
        if self.node_netns.is_empty() {
            // On a thread of its own, as in a netns: the caller may be driving an async runtime itself.
            return std::thread::scope(|s| s.spawn(|| http_get(addr, path)).join())
                .unwrap_or_else(|_| bail!("GET {path}: the request thread panicked"));
        }
        let (path, addr) = (path.to_string(), addr.to_string());
        in_netns(&self.node_netns, move || http_get(&addr, &path))?
    }

    /// Sum of the samples of a Prometheus metric whose labels include every `labels` pair.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let text = self.get("/metrics")?;
        Ok(sum_metric(&text, name, labels))
    }

    /// The admin endpoint's /connections, parsed.
    pub fn connections(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.get("/connections")?)?)
    }

    /// Runs `warren-agent inspect ARGS… --pin-dir … --run-dir …` against this agent.
    pub fn inspect(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(bin_path("warren-agent")?);
        cmd.arg("inspect").args(args).arg("--pin-dir").arg(&self.pin_dir).arg("--run-dir").arg(&self.run_dir);
        Ok(cmd.output()?)
    }

    /// The node's network namespace (in /run/netns), where the agent's admin endpoint listens: `ip netns
    /// exec <it> warren-agent inspect …` reaches the agent from a shell.
    pub fn netns(&self) -> &str {
        &self.node_netns
    }

    /// Runs `warren-agent ARGS…` in the node's netns (where the admin endpoint listens), as an operator on
    /// the node would; its output, whatever its exit status.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(bin_path("warren-agent")?);
        cmd.args(args);
        crate::Process::spawn(&self.bed, cmd, &self.node_netns, &[])?.wait_with_output()
    }

    /// Runs `warren-agent inspect ARGS…` in the node's netns and returns its stdout; fails with its stderr.
    pub fn inspect_live(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(&[&["inspect"], args].concat())?;
        if !out.status.success() {
            bail!("warren-agent inspect {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the agent with SIGTERM and returns its exit status.
    pub fn stop(&self) -> Option<std::process::ExitStatus> {
        self.process.terminate()
    }

    /// Kills the agent without letting it drain (a crash).
    pub fn kill(&self) {
        self.process.signal(libc::SIGKILL);
        let _ = self.process.wait_exit(Duration::from_secs(5));
    }

    /// The pushed tables the agent holds (/config), parsed.
    /// `/endpoints`: per cluster its endpoints' health and load, the pool's limits and overflows.
    pub fn endpoints(&self) -> Result<warren_api::admin::EndpointsView> {
        Ok(serde_json::from_str(&self.get("/endpoints")?)?)
    }

    pub fn config(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.get("/config")?)?)
    }

    /// Waits until the agent holds pushed tables that satisfy `done`; returns them.
    pub fn wait_config(&self, timeout: Duration, done: impl Fn(&serde_json::Value) -> bool) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let config = self.config()?;
            if done(&config) {
                return Ok(config);
            }
            if Instant::now() > deadline {
                bail!("agent config not as expected after {timeout:?}: {config:#}\n{}", tail(&self.log(), 20));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The pods the agent reports (/workloads), parsed.
    pub fn workloads(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.get("/workloads")?)?)
    }

    /// Waits until the agent reports `pod` as enrolled (`true`) or not (`false`).
    pub fn wait_enrolled(&self, pod: &crate::Pod, enrolled: bool, timeout: Duration) -> Result<()> {
        self.wait_uid_enrolled(&pod.uid, enrolled, timeout).with_context(|| format!("pod {}", pod.name))
    }

    /// [`Agent::wait_enrolled`] for a pod known by its UID only (e.g. one a real kubelet runs).
    pub fn wait_uid_enrolled(&self, uid: &str, enrolled: bool, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let workloads = self.workloads()?;
            let state = workloads.as_array().and_then(|pods| {
                pods.iter().find(|p| p["uid"] == uid).map(|p| p["enrolled"] == serde_json::Value::Bool(true))
            });
            if state == Some(enrolled) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{uid} not {} after {timeout:?}: {workloads:#}", if enrolled { "enrolled" } else { "un-enrolled" });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.process.terminate();
        if self.owns_pin_dir {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}

/// GET for the tests' admin queries (hyper's client); the body of a 2xx answer. Blocks: call it off any
/// async runtime's threads.
/// GET `path` from `addr` (an agent's admin endpoint) with hyper's client; the body.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    // Called from async code (a scenario on tokio), it blocks a thread of its own (which inherits this
    // thread's netns).
    if tokio::runtime::Handle::try_current().is_ok() {
        return std::thread::scope(|scope| scope.spawn(|| get_blocking(addr, path)).join())
            .map_err(|_| anyhow::anyhow!("GET {path} from {addr}: the request thread panicked"))?;
    }
    get_blocking(addr, path)
}

fn get_blocking(addr: &str, path: &str) -> Result<String> {
    // A runtime of its own: callers are plain threads (some inside a node's netns, where the socket must
    // be made).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let uri: hyper::Uri = format!("http://{addr}{path}").parse()?;
        let response = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
            .await
            .with_context(|| format!("GET {path} from {addr}: no answer in 5 s"))?
            .with_context(|| format!("GET {path} from {addr}"))?;
        if !response.status().is_success() {
            bail!("GET {path}: {}", response.status());
        }
        let body = tokio::time::timeout(Duration::from_secs(5), http_body_util::BodyExt::collect(response.into_body()))
            .await
            .with_context(|| format!("GET {path} from {addr}: the body did not finish"))??;
        Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
    })
}

/// The sum of the samples of `name` in a Prometheus exposition whose labels include `labels`.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = metric == name && labels.iter().all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_matching_series_only() {
        let text = "# TYPE x counter\nx_total{direction=\"outbound\"} 3\nx_total{direction=\"inbound\"} 4\ny_total 9\n";
        assert_eq!(super::sum_metric(text, "x_total", &[("direction", "outbound")]), 3.0);
        assert_eq!(super::sum_metric(text, "x_total", &[]), 7.0);
        assert_eq!(super::sum_metric(text, "z_total", &[]), 0.0);
    }
}
