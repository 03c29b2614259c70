//! The user's whole path on the real local node (containerd + kubelet): the images imported into
//! containerd → `helm install` of deploy/helm/warren → two pods of a namespace talk in plaintext → label the
//! namespace → their running pods are enrolled, no restart, and their traffic is HBONE (a capture on the
//! node's interfaces finds no plaintext), visible in the agent's metrics and `inspect` → unlabel → plain again,
//! still talking → label again, then `helm uninstall` → the pods keep talking and the node is clean (no
//! pinned maps, no eBPF program loaded — so none attached to a cgroup or netns —, no agent or controller
//! process, nothing listening on the agent's ports). The agent runs unprivileged with exactly the
//! capabilities docs/install.md lists (the chart's default).
//!
//! The local cluster has no kube-proxy and no cluster DNS, so the chart is installed as on a kube-proxy-free
//! one-node cluster: `k8sServiceHost`/`k8sServicePort` name the API server, the controller runs in the
//! node's netns and agents dial it on 127.0.0.1.
use std::{
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Client, Config, ResourceExt,
    api::{Api, DeleteParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use warren_e2e::{
    eventually, eventually_async,
    k8s::{answered, busybox_pod, fetch_loop},
};
use warren_testbed::{in_ci, require_privileges};
use xtask::{cluster, manifests};

/// Where the DaemonSet's agent serves its admin endpoint (host network).
const ADMIN: &str = "127.0.0.1:15000";
/// What the client sends in every request: found on the wire unless the mesh encrypts it.
const PLAINTEXT: &[u8] = b"GET /hostname";

#[test]
fn helm_install_label_unlabel_uninstall_on_the_real_node() {
    require_privileges!();
    if !cluster::is_built() || manifests::helm().is_err() {
        let reason = "the local Kubernetes (with helm) is not built (cargo xtask setup --kubernetes)";
        assert!(!in_ci(), "CI=true, but {reason}");
        return eprintln!("SKIPPED: {reason}");
    }
    // Pins left by an agent that was not uninstalled would blur "the node is clean".
    let _ = std::fs::remove_dir_all("/sys/fs/bpf/warren");
    let kubeconfig = cluster::up(true).unwrap();
    let tag = format!("helm-{}", std::process::id());
    let result = tokio::runtime::Runtime::new().unwrap().block_on(walk(&kubeconfig, &tag));
    let _ = helm(&kubeconfig, &["uninstall", "warren", "-n", manifests::NAMESPACE]);
    let _ = xtask::images::remove(&tag);
    cluster::down().unwrap();
    let _ = std::fs::remove_dir_all("/sys/fs/bpf/warren");
    result.unwrap();
}

async fn walk(kubeconfig: &Path, tag: &str) -> Result<()> {
    let bin_dir = warren_testbed::bin_path("warren-agent")?.parent().context("bin dir")?.to_path_buf();
    for image in xtask::images::build(&bin_dir, tag)? {
        xtask::images::import(&image)?;
    }
    let values = format!(
        "image.tag={tag},k8sServiceHost=127.0.0.1,k8sServicePort={},agent.controllerAddress=127.0.0.1,\
         controller.hostNetwork=true",
        cluster::API_PORT
    );
    let installed = helm(kubeconfig, &["install", "warren", manifests::CHART, "-n", manifests::NAMESPACE, "--create-namespace", "--set", &values])?;
    ensure!(installed.status.success(), "helm install: {}", text(&installed.stderr));
    let ready = eventually(Duration::from_secs(120), || admin_get("/ready").ok().filter(|r| r.trim() == "ready"));
    if ready.is_none() {
        bail!("the DaemonSet's agent is not ready on {ADMIN}:\n{}", system_pods_report(kubeconfig).await);
    }

    let config = Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let ns = format!("walk-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let server = busybox_pod(&pods, "server", "exec httpd -f -p 8080 -h /etc").await?;
    let server_ip = server.status.as_ref().and_then(|s| s.pod_ip.clone()).context("server has no IP")?;
    let client_pod = busybox_pod(&pods, "client", &fetch_loop(&format!("{server_ip}:8080"))).await?;
    let uids = [client_pod.uid().context("uid")?, server.uid().context("uid")?];

    // Not meshed: the request crosses the bridge in plaintext (the capture's control).
    ensure!(contains(&capture(Duration::from_secs(2))?, PLAINTEXT), "no plaintext request seen unmeshed");

    let label = |value: Option<&str>| serde_json::json!({"metadata": {"labels": {"warren.dev/mesh": value}}});
    namespaces.patch(&ns, &PatchParams::default(), &Patch::Merge(&label(Some("enabled")))).await?;
    wait_enrolled(&uids, true)?;
    let hbone = eventually(Duration::from_secs(10), || {
        let view: serde_json::Value = serde_json::from_str(&admin_get("/connections").ok()?).ok()?;
        let all = ["open", "recently_closed"].iter().filter_map(|k| view[k].as_array().cloned()).flatten();
        all.filter(|c| c["pod"] == format!("{ns}/client") && c["protocol"] == "hbone").last()
    });
    let hbone = hbone.context("no HBONE connection from the client")?;
    assert_eq!(hbone["original_dst"], format!("{server_ip}:8080"));
    assert_eq!(hbone["peer_identity"], format!("spiffe://cluster.local/ns/{ns}/sa/default"));
    let wire = capture(Duration::from_secs(2))?;
    ensure!(wire.len() > 1000, "the capture saw no traffic ({} bytes)", wire.len());
    ensure!(!contains(&wire, PLAINTEXT), "plaintext on the node's interfaces while meshed");
    let outbound = warren_testbed::sum_metric(&admin_get("/metrics")?, "warren_tcp_connections_opened_total", &[("direction", "outbound")]);
    ensure!(outbound > 0.0, "no outbound connection in the agent's metrics");
    let inspect = host_cli(&["inspect", "connections", "--admin-addr", ADMIN, "-n", &ns, "--pod", "client"])?;
    ensure!(inspect.contains("hbone") && inspect.contains(&format!("{server_ip}:8080")), "inspect: {inspect}");
    // The same view from a workstation: through the API server to the agent of the pods' node.
    let node = client_pod.spec.as_ref().and_then(|s| s.node_name.clone()).context("client pod has no node")?;
    let kubeconfig_arg = kubeconfig.to_str().context("kubeconfig path")?;
    let remote = host_cli(&["inspect", "workloads", "--node", &node, "--kubeconfig", kubeconfig_arg, "-n", &ns, "-o", "json"])?;
    let remote: serde_json::Value = serde_json::from_str(&remote).context("inspect --node -o json")?;
    let enrolled = |pod: &str| remote.as_array().is_some_and(|p| p.iter().any(|w| w["pod"] == format!("{ns}/{pod}") && w["enrolled"] == true));
    ensure!(enrolled("client") && enrolled("server"), "inspect workloads --node {node}: {remote}");
    // Bad input: a node with no agent is one line naming the nodes that have one, and a failure.
    let unknown = Command::new(warren_testbed::bin_path("warren-agent")?)
        .args(["inspect", "workloads", "--node", "no-such-node", "--kubeconfig", kubeconfig_arg])
        .output()?;
    let message = text(&unknown.stderr);
    ensure!(!unknown.status.success() && message.trim().lines().count() == 1, "unknown node: {message}");
    ensure!(message.contains("\"no-such-node\"") && message.contains(&format!("agents run on: {node}")), "{message}");
    // The chart's ingress gateway pod (namespace warren-system, not in the mesh) is enrolled by its own label.
    let gateway_enrolled = eventually(Duration::from_secs(30), || {
        let workloads: serde_json::Value = serde_json::from_str(&admin_get("/workloads").ok()?).ok()?;
        let mut pods = workloads.as_array()?.iter();
        pods.any(|w| w["pod"].as_str().is_some_and(|p| p.starts_with("warren-system/istio-ingressgateway-")) && w["enrolled"] == true)
            .then_some(())
    });
    ensure!(gateway_enrolled.is_some(), "the ingress gateway pod is not enrolled: {}", admin_get("/workloads")?);

    // Unlabel: plain networking, still answered.
    namespaces.patch(&ns, &PatchParams::default(), &Patch::Merge(&label(None))).await?;
    wait_enrolled(&uids, false)?;
    let before = answered(&pods, "client").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(answered(&pods, "client").await? > before + 3, "the client stopped getting answers once unmeshed");

    // Meshed again, then uninstalled: the pods keep talking, the node keeps nothing of Warren.
    namespaces.patch(&ns, &PatchParams::default(), &Patch::Merge(&label(Some("enabled")))).await?;
    wait_enrolled(&uids, true)?;
    let uninstalled = helm(kubeconfig, &["uninstall", "warren", "-n", manifests::NAMESPACE, "--wait"])?;
    ensure!(uninstalled.status.success(), "helm uninstall: {}", text(&uninstalled.stderr));
    let system: Api<Pod> = Api::namespaced(client.clone(), manifests::NAMESPACE);
    let gone = eventually_async(Duration::from_secs(90), || async {
        system.list(&Default::default()).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    ensure!(gone.is_some(), "Warren's pods are still there after helm uninstall");
    let clean = eventually(Duration::from_secs(10), || (!Path::new("/sys/fs/bpf/warren").exists()).then_some(()));
    ensure!(clean.is_some(), "pinned maps left in /sys/fs/bpf/warren after uninstall");
    // No program of Warren's is loaded, so none is attached to a cgroup or a pod's netns either (an attached
    // program holds its program loaded).
    let left = eventually(Duration::from_secs(10), || warren_programs().is_empty().then_some(()));
    ensure!(left.is_some(), "Warren's eBPF programs are still loaded (attached) after uninstall: {:?}", warren_programs());
    ensure!(warren_processes().is_empty(), "Warren processes left: {:?}", warren_processes());
    for port in [15000, 15001, 15006, 15008, 15010, 15012] {
        ensure!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "something still listens on {port}");
    }
    let before = answered(&pods, "client").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(answered(&pods, "client").await? > before + 3, "the pods stopped talking after helm uninstall");
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    Ok(())
}

/// Each pod of the release namespace: its phase, container states, and the last lines of its log.
async fn system_pods_report(kubeconfig: &Path) -> String {
    let report = async {
        let config = Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &KubeConfigOptions::default()).await?;
        let pods: Api<Pod> = Api::namespaced(Client::try_from(config)?, manifests::NAMESPACE);
        let mut out = String::new();
        for pod in pods.list(&Default::default()).await?.items {
            let name = pod.name_any();
            let status = pod.status.as_ref();
            let states: Vec<String> = status
                .and_then(|s| s.container_statuses.clone())
                .unwrap_or_default()
                .iter()
                .map(|c| format!("{}: {}", c.name, serde_json::to_string(&c.state).unwrap_or_default()))
                .collect();
            let phase = status.and_then(|s| s.phase.clone()).unwrap_or_default();
            let params = kube::api::LogParams { tail_lines: Some(15), ..Default::default() };
            let log = pods.logs(&name, &params).await.unwrap_or_else(|e| format!("(no log: {e})"));
            out += &format!("pod {name} {phase} {states:?}\n{log}\n");
        }
        anyhow::Ok(out)
    };
    report.await.unwrap_or_else(|e| format!("(cannot list the pods: {e:#})"))
}

fn helm(kubeconfig: &Path, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(manifests::helm()?);
    cmd.current_dir(xtask::workspace_root()).arg("--kubeconfig").arg(kubeconfig).args(args);
    cmd.output().context("running helm")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `warren-agent ARGS` on the host, as an operator on the node runs it; its stdout.
fn host_cli(args: &[&str]) -> Result<String> {
    let out = Command::new(warren_testbed::bin_path("warren-agent")?).args(args).output()?;
    ensure!(out.status.success(), "warren-agent {}: {}", args.join(" "), text(&out.stderr));
    Ok(text(&out.stdout))
}

/// GET on the agent's admin endpoint, from the node.
fn admin_get(path: &str) -> Result<String> {
    warren_testbed::http_get(ADMIN, path)
}

fn wait_enrolled(uids: &[String], enrolled: bool) -> Result<()> {
    let done = eventually(Duration::from_secs(20), || {
        let view: serde_json::Value = serde_json::from_str(&admin_get("/workloads").ok()?).ok()?;
        let pods = view.as_array()?;
        uids.iter().all(|uid| pods.iter().any(|p| p["uid"] == uid.as_str() && p["enrolled"] == enrolled)).then_some(())
    });
    ensure!(done.is_some(), "pods not {} in time", if enrolled { "enrolled" } else { "un-enrolled" });
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Loaded eBPF programs with the names of Warren's (the kernel keeps 15 characters of a name).
fn warren_programs() -> Vec<String> {
    const OURS: [&str; 5] = ["connect4", "connect6", "track_sockets", "redirect_to_pee", "capture_inbound"];
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(String::from))
        .filter(|name| OURS.iter().any(|ours| name.starts_with(ours)))
        .collect()
}

/// Host processes of Warren's binaries (the DaemonSet's and the Deployment's containers).
fn warren_processes() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
    entries
        .flatten()
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let ours = cmdline.starts_with("/usr/local/bin/warren-agent run") || cmdline.starts_with("/usr/local/bin/warren-controller run");
            ours.then_some(cmdline)
        })
        .collect()
}

/// Every frame on every interface of the node's netns for `duration`, concatenated (an AF_PACKET socket, as
/// `tcpdump -i any`): pods' traffic leaves their netns through their veths; only the legs between an app and
/// the agent inside a pod's own netns are out of its sight.
fn capture(duration: Duration) -> Result<Vec<u8>> {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain syscalls on a descriptor this function owns and closes; buffers outlive each call.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol));
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&timeout as *const libc::timeval).cast(), size_of::<libc::timeval>() as u32);
        let mut frames = vec![];
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n > 0 {
                frames.extend_from_slice(&buf[..n as usize]);
            }
        }
        libc::close(fd);
        Ok(frames)
    }
}
