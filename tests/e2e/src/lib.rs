//! Warren's end-to-end tests live in `tests/`: each file is a group of scenarios on the testbed
//! (real eBPF, real sockets in network namespaces) or on the local Kubernetes cluster. [`bookinfo`] is the
//! lab of Istio's bookinfo that the traffic-management scenarios (and `cargo xtask demo`) share; [`k8s`]
//! makes pods on the local cluster.

pub mod k8s;
pub use warren_testbed::bookinfo;

use std::time::{Duration, Instant};

/// The one wait for "the system gets there" (shared with xtask's harnesses).
pub use warren_testbed::eventually;

/// [`eventually`] for checks that await (API calls), polling every 50 ms.
pub async fn eventually_async<T, F>(timeout: Duration, mut check: impl FnMut() -> F) -> Option<T>
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Pod object for the controller's directory: the testbed pod's uid and IP, `node`, its name as the
/// service account, and `labels` (YAML flow entries, e.g. `app: web, version: v1`). Its namespace
/// enrolls it unless the labels opt out.
pub fn pod_yaml(pod: &warren_testbed::Pod, node: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, uid: {}, labels: {{{labels}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {}, containers: [{{name: app, image: testapp}}]}}\n\
         status: {{phase: Running, podIP: {}}}\n---\n",
        pod.name, pod.namespace, pod.uid, pod.name, pod.ip
    )
}

/// An enrolled namespace (`warren.dev/mesh: enabled`).
pub fn namespace_yaml(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{warren.dev/mesh: enabled}}}}\n---\n")
}

/// A controller reading `dir` (polled every 50 ms) and an agent per node (mTLS, pushed tables; the eBPF
/// programs log at info, not a line per connect): the mesh most scenarios and the L7 bench run on.
pub fn directory_mesh(
    bed: &warren_testbed::Testbed,
    dir: &std::path::Path,
    nodes: &[&warren_testbed::Node],
) -> anyhow::Result<(warren_testbed::Controller, Vec<warren_testbed::Agent>)> {
    directory_mesh_with(bed, dir, nodes, warren_testbed::AgentOptions { ebpf_log_level: "info", ..Default::default() })
}

/// [`directory_mesh`] with agents started with `options` (their controller and mTLS set here).
pub fn directory_mesh_with(
    bed: &warren_testbed::Testbed,
    dir: &std::path::Path,
    nodes: &[&warren_testbed::Node],
    options: warren_testbed::AgentOptions,
) -> anyhow::Result<(warren_testbed::Controller, Vec<warren_testbed::Agent>)> {
    let controller = bed.start_controller(warren_testbed::ControllerOptions {
        config_dir: Some(dir.to_path_buf()),
        kubeconfig: None,
        push_port: 0,
        config_poll_ms: Some(50),
    })?;
    let options = warren_testbed::AgentOptions { mtls: true, controller: Some(controller.address()), ..options };
    let mut agents = Vec::new();
    for node in nodes {
        node.reach_host_port(controller.push_port)?;
        agents.push(node.start_agent_with(options.clone())?);
    }
    Ok((controller, agents))
}

/// Writes `yaml` as `name` in the controller's directory `dir` (whole, by a rename) and waits until each
/// of `agents` holds a newer table version than before.
pub fn apply_config(dir: &std::path::Path, agents: &[warren_testbed::Agent], name: &str, yaml: &str) -> anyhow::Result<()> {
    let version = |a: &warren_testbed::Agent| -> anyhow::Result<u64> { Ok(a.config()?["version"].as_u64().unwrap_or(0)) };
    let versions: Vec<u64> = agents.iter().map(version).collect::<anyhow::Result<_>>()?;
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, yaml)?;
    std::fs::rename(&tmp, dir.join(name))?;
    for (agent, before) in agents.iter().zip(versions) {
        agent.wait_config(Duration::from_secs(10), |c| c["version"].as_u64().is_some_and(|v| v > before))?;
    }
    Ok(())
}

/// The tail of two agents' and the controller's logs: a failing two-node scenario's context.
pub fn mesh_logs(agents: &[warren_testbed::Agent], controller: &warren_testbed::Controller) -> String {
    let mut out = String::new();
    for (i, agent) in agents.iter().enumerate() {
        out += &format!("agent {} (node-{}):\n{}\n\n", i + 1, i + 1, log_tail(&agent.log(), 30));
    }
    out + &format!("controller:\n{}", log_tail(&controller.log(), 30))
}

/// The last `lines` lines of a log, for a failing scenario's context.
pub fn log_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `promtool check metrics` (Debian's `prometheus` package) on `text`: its lint findings (exit 0 or
/// 3), or an error when it could not parse the exposition (or is missing).
pub fn promtool(text: &str) -> anyhow::Result<Vec<String>> {
    use std::{io::Write, process::Stdio};
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("promtool (Debian's prometheus package; `cargo xtask setup` installs it): {e}"))?;
    child.stdin.take().ok_or_else(|| anyhow::anyhow!("promtool's stdin"))?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let found = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    match out.status.code() {
        Some(0) | Some(3) => Ok(found.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()),
        _ => anyhow::bail!("promtool failed ({}): {found}", out.status),
    }
}

/// Busy processes competing for every CPU while this lives (killed on drop): the load of a busy node,
/// which delays softirqs and wake-ups and so widens the kernel's races.
pub struct CpuHogs(Vec<std::process::Child>);

impl CpuHogs {
    pub fn start(count: usize) -> anyhow::Result<Self> {
        let mut hogs = CpuHogs(Vec::with_capacity(count));
        for _ in 0..count {
            hogs.0.push(std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn()?);
        }
        Ok(hogs)
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        for hog in &mut self.0 {
            let _ = hog.kill();
            let _ = hog.wait();
        }
    }
}
