//! The local Kubernetes: `cluster up --node` starts a real control plane and node, kube-rs works against
//! it (CRD established, custom resources created, validated and watched, a pod runs), and `cluster down`
//! leaves no process, mount, netns, cgroup or link behind. And warren-agent enrolls pods from the API.
//!
//! Tests here share the one local cluster, so they run one after another (CLUSTER lock).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Client, Config, CustomResource, CustomResourceExt, ResourceExt,
    api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, conditions, wait::await_condition, watcher},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use anyhow::Context as _;
use warren_e2e::k8s::{answered, busybox_pod, create_pod, fetch_loop};
use warren_testbed::{Agent, AgentOptions, ECHO_PORT, Testbed, in_ci, require_privileges};

static CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Skips (or under CI fails) when the local cluster is not built.
fn cluster_built() -> bool {
    if xtask::cluster::is_built() {
        return true;
    }
    let reason = "the local Kubernetes is not built (cargo xtask setup --kubernetes)";
    assert!(!in_ci(), "CI=true, but {reason}");
    eprintln!("SKIPPED: {reason}");
    false
}

/// A throwaway CRD for the lifecycle test (Warren's own CRDs are tested with the controller).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(group = "e2e.warren.dev", version = "v1", kind = "Canary", namespaced)]
pub struct CanarySpec {
    service: String,
    weight: u32,
}

/// What the host has that a cluster could leave behind.
#[derive(Debug, PartialEq)]
struct HostSnapshot {
    processes: BTreeSet<String>,
    mounts: BTreeSet<String>,
    netns: BTreeSet<String>,
    cgroups: BTreeSet<String>,
    links: BTreeSet<String>,
}

impl HostSnapshot {
    fn take(cluster_prefix: &Path) -> HostSnapshot {
        let prefix = cluster_prefix.display().to_string();
        let processes = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                let ours = cmdline.contains(&prefix) || cmdline.contains("containerd-shim") || cmdline.contains("/pause");
                ours.then(|| format!("{} {}", e.file_name().to_string_lossy(), cmdline.trim()))
            })
            .collect();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mounts: BTreeSet<String> = mountinfo.lines().filter_map(|l| l.split_whitespace().nth(4)).map(String::from).collect();
        let netns = std::fs::read_dir("/run/netns")
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let mut cgroups = BTreeSet::new();
        let mut stack = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    cgroups.insert(entry.path().display().to_string());
                    stack.push(entry.path());
                }
            }
        }
        let links = std::fs::read_dir("/sys/class/net")
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        HostSnapshot { processes, mounts, netns, cgroups, links }
    }

    /// What `self` has that `before` did not.
    fn added_since(&self, before: &HostSnapshot) -> BTreeMap<&'static str, Vec<String>> {
        let diff = |a: &BTreeSet<String>, b: &BTreeSet<String>| a.difference(b).cloned().collect::<Vec<_>>();
        [
            ("processes", diff(&self.processes, &before.processes)),
            ("mounts", diff(&self.mounts, &before.mounts)),
            ("netns", diff(&self.netns, &before.netns)),
            ("cgroups", diff(&self.cgroups, &before.cgroups)),
            ("links", diff(&self.links, &before.links)),
        ]
        .into_iter()
        .filter(|(_, added)| !added.is_empty())
        .collect()
    }
}

#[test]
fn cluster_up_serves_crds_and_pods_and_cluster_down_leaves_nothing_behind() {
    require_privileges!();
    if !cluster_built() {
        return;
    }
    let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    // A cluster left running by hand would blur the before/after comparison.
    xtask::cluster::down().unwrap();
    let before = HostSnapshot::take(&xtask::cluster::prefix());

    let kubeconfig = xtask::cluster::up(true).unwrap();
    let in_cluster = tokio::runtime::Runtime::new().unwrap().block_on(exercise_cluster(&kubeconfig));
    let during = HostSnapshot::take(&xtask::cluster::prefix());
    xtask::cluster::down().unwrap();
    let after = HostSnapshot::take(&xtask::cluster::prefix());
    in_cluster.unwrap();

    // The comparison can fail: the cluster really did add processes, mounts and cgroups while it ran.
    let added_while_up = during.added_since(&before);
    assert!(added_while_up.contains_key("processes") && added_while_up.contains_key("cgroups"), "{added_while_up:#?}");
    let left_behind = after.added_since(&before);
    assert!(left_behind.is_empty(), "cluster down left behind: {left_behind:#?}");
}

async fn exercise_cluster(kubeconfig: &Path) -> anyhow::Result<()> {
    let config = Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let version = client.apiserver_version().await?;
    assert_eq!(version.minor, "20", "the local cluster is Kubernetes 1.20");

    // CRD: apply, wait for Established.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = Canary::crd();
    crds.patch(&crd.name_any(), &PatchParams::apply("warren-e2e").force(), &Patch::Apply(&crd)).await?;
    tokio::time::timeout(Duration::from_secs(30), await_condition(crds.clone(), &crd.name_any(), conditions::is_crd_established()))
        .await??;

    let ns_name = format!("warren-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace { metadata: ObjectMeta { name: Some(ns_name.clone()), ..Default::default() }, ..Default::default() };
    namespaces.create(&PostParams::default(), &ns).await?;

    // Watch, then create: the watcher must see the object.
    let canaries: Api<Canary> = Api::namespaced(client.clone(), &ns_name);
    let mut events = watcher(canaries.clone(), watcher::Config::default()).applied_objects().boxed();
    canaries.create(&PostParams::default(), &Canary::new("reviews", CanarySpec { service: "reviews".into(), weight: 20 })).await?;
    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(obj) = events.try_next().await? {
            if obj.name_any() == "reviews" {
                return anyhow::Ok(obj);
            }
        }
        anyhow::bail!("watch ended")
    })
    .await??;
    assert_eq!(seen.spec.weight, 20);

    // The structural schema rejects a wrongly typed field.
    let raw: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), &ns_name, &kube::api::ApiResource::erase::<Canary>(&()));
    let bad: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "e2e.warren.dev/v1", "kind": "Canary", "metadata": {"name": "bad"},
        "spec": {"service": "reviews", "weight": "twenty"}
    }))?;
    let rejected = raw.create(&PostParams::default(), &bad).await.expect_err("schema must reject weight: \"twenty\"");
    assert!(rejected.to_string().contains("spec.weight"), "{rejected}");

    // A pod really runs on the node (creates netns, mounts and cgroups that `down` must remove).
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper"},
        "spec": {"containers": [{"name": "c", "image": "docker.io/library/busybox:1.35-local",
                 "imagePullPolicy": "Never", "command": ["sleep", "3600"]}],
                 "terminationGracePeriodSeconds": 1}
    }))?;
    create_pod(&pods, &pod).await?;
    tokio::time::timeout(Duration::from_secs(120), await_condition(pods.clone(), "sleeper", conditions::is_pod_running()))
        .await
        .map_err(|_| anyhow::anyhow!("pod sleeper not Running within 120 s"))??;

    namespaces.delete(&ns_name, &DeleteParams::default()).await?;
    Ok(())
}

/// The agent takes its workloads from the API server: pods on its node, enrolled by their namespace's
/// label (Warren's or Istio ambient's), opted out by a pod label — all live.
#[test]
fn agent_enrolls_pods_from_the_kubernetes_api() {
    require_privileges!();
    if !cluster_built() {
        return;
    }
    let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let kubeconfig = xtask::cluster::up(false).unwrap();
    let result = tokio::runtime::Runtime::new().unwrap().block_on(enrollment_scenario(&kubeconfig));
    xtask::cluster::down().unwrap();
    result.unwrap();
}

async fn enrollment_scenario(kubeconfig: &Path) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Node;
    let config = Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let suffix = std::process::id();
    let (mesh_ns, plain_ns) = (format!("mesh-{suffix}"), format!("plain-{suffix}"));
    let node_name = format!("warren-node-{suffix}");

    // The node object, so that the pod GC keeps pods bound to it.
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": node_name}}))?).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for (name, labels) in [(&mesh_ns, serde_json::json!({"warren.dev/mesh": "enabled"})), (&plain_ns, serde_json::json!({}))] {
        namespaces.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}}))?).await?;
    }

    // Pods as the API knows them; the testbed gives each a netns and cgroup under the same UID, and we
    // write their status as a kubelet would.
    let bed = Testbed::new("k8s-enroll")?;
    let node = bed.add_node("node-1")?;
    let mut pods = vec![];
    for (name, ns) in [("client", &mesh_ns), ("server", &plain_ns)] {
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let object: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeName": node_name, "containers": [{"name": "app", "image": "warren-testapp:local"}]}
        }))?;
        let created = create_pod(&api, &object).await?;
        let pod = node.add_pod_with_uid(name, false, created.metadata.uid.as_deref())?;
        let status = serde_json::json!({"status": {"phase": "Running", "podIP": pod.ip.to_string(),
            "podIPs": [{"ip": pod.ip.to_string()}, {"ip": pod.ip6.to_string()}]}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
        pods.push((api, pod));
    }
    let (client_pod, server_pod) = (pods[0].1.clone(), pods[1].1.clone());
    server_pod.serve("v1")?;
    node.reach_host_port(xtask::cluster::API_PORT)?;
    let agent = node.start_agent_with(warren_testbed::AgentOptions {
        kubeconfig: Some(kubeconfig.to_path_buf()),
        node_name: Some(node_name.clone()),
        ..Default::default()
    })?;
    let timeout = Duration::from_secs(10);

    // client: namespace labelled warren.dev/mesh=enabled → enrolled; server: plain namespace → not.
    agent.wait_enrolled(&client_pod, true, timeout)?;
    agent.wait_enrolled(&server_pod, false, timeout)?;
    let sent = client_pod.send(server_pod.socket(ECHO_PORT), 1 << 20)?;
    assert!(sent.ok && sent.peer.as_deref() == Some("127.0.0.1:15001"), "{sent:?}");

    // Istio ambient's namespace label enrolls too.
    let ambient = serde_json::json!({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}});
    namespaces.patch(&plain_ns, &PatchParams::default(), &Patch::Merge(&ambient)).await?;
    agent.wait_enrolled(&server_pod, true, timeout)?;

    // A pod label opts a pod out, live.
    let opt_out = serde_json::json!({"metadata": {"labels": {"warren.dev/mesh": "disabled"}}});
    pods[0].0.patch("client", &PatchParams::default(), &Patch::Merge(&opt_out)).await?;
    agent.wait_enrolled(&client_pod, false, timeout)?;
    let direct = client_pod.send(server_pod.socket(ECHO_PORT), 1 << 20)?;
    assert!(direct.ok && direct.peer.as_deref() == Some(server_pod.socket(ECHO_PORT).to_string().as_str()), "{direct:?}");
    assert_eq!(agent.metric("warren_tcp_connections_opened_total", &[("direction", "outbound")])?, 1.0);
    assert_eq!(agent.metric("warren_tcp_connections_opened_total", &[("direction", "inbound")])?, 1.0);
    Ok(())
}

/// The real kubelet's pods on this host are enrolled: a warren-agent on the host (as a DaemonSet's, host
/// network and PID) takes the node's pods from the API server, finds the containers containerd runs
/// among the host's processes, and enrolls them by network namespace when their namespace is labelled —
/// running pods, no restart. Their
/// traffic then goes through the agent; unlabelled, they return to plain networking and keep talking.
#[test]
fn the_kubelets_running_pods_are_enrolled_by_labelling_their_namespace() {
    require_privileges!();
    if !cluster_built() {
        return;
    }
    let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let kubeconfig = xtask::cluster::up(true).unwrap();
    let result = tokio::runtime::Runtime::new().unwrap().block_on(kubelet_pods_scenario(&kubeconfig));
    xtask::cluster::down().unwrap();
    result.unwrap();
}

async fn kubelet_pods_scenario(kubeconfig: &Path) -> anyhow::Result<()> {
    let config = Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let ns = format!("kubelet-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?).await?;

    // Two pods that talk before anything is meshed: the client fetches from the server every 200 ms.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let server = busybox_pod(&pods, "server", "exec httpd -f -p 8080 -h /etc").await?;
    let server_ip = server.status.as_ref().and_then(|s| s.pod_ip.clone()).context("server has no IP")?;
    let node_name = server.spec.as_ref().and_then(|s| s.node_name.clone()).context("server has no node")?;
    let client_pod = busybox_pod(&pods, "client", &fetch_loop(&format!("{server_ip}:8080"))).await?;
    let uids = [client_pod.uid().context("uid")?, server.uid().context("uid")?];

    let bed = Testbed::new("kubelet-pods")?;
    let options = AgentOptions { kubeconfig: Some(kubeconfig.to_path_buf()), ..Default::default() };
    let agent = Agent::start_on_host(&bed, &node_name, options)?;
    let timeout = Duration::from_secs(15);
    for uid in &uids {
        agent.wait_uid_enrolled(uid, false, timeout)?;
    }
    let outbound = || agent.metric("warren_tcp_connections_opened_total", &[("direction", "outbound")]);
    assert_eq!(outbound()?, 0.0, "nothing is meshed yet");

    // Label the namespace: the running pods are enrolled, by their netns.
    let label = |value: Option<&str>| serde_json::json!({"metadata": {"labels": {"warren.dev/mesh": value}}});
    namespaces.patch(&ns, &PatchParams::default(), &Patch::Merge(&label(Some("enabled")))).await?;
    for uid in &uids {
        agent.wait_uid_enrolled(uid, true, timeout)?;
    }
    let workloads = agent.workloads()?;
    for uid in &uids {
        let pod = workloads.as_array().and_then(|w| w.iter().find(|p| p["uid"] == uid.as_str())).context("pod")?;
        assert!(pod["netns_cookie"].is_u64(), "enrolled by netns: {pod:#}");
    }
    let through_agent = warren_e2e::eventually(timeout, || (outbound().ok()? >= 3.0).then_some(()));
    assert!(through_agent.is_some(), "the client's requests do not go through the agent: {}", agent.connections()?);
    let connections = agent.connections()?.to_string();
    assert!(connections.contains(&format!("{server_ip}:8080")) && connections.contains(&format!("{ns}/client")), "{connections}");
    let answered_meshed = answered(&pods, "client").await?;

    // Unlabel: back to plain networking, the pods still talk.
    namespaces.patch(&ns, &PatchParams::default(), &Patch::Merge(&label(None))).await?;
    for uid in &uids {
        agent.wait_uid_enrolled(uid, false, timeout)?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_unlabel = outbound()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(outbound()?, after_unlabel, "connections still redirected after unlabelling");
    assert!(answered(&pods, "client").await? > answered_meshed + 3, "the client stopped getting answers once unmeshed");
    let failed = agent.connections()?.to_string();
    assert!(!failed.contains("\"error\":\""), "a proxied connection failed: {failed}");

    namespaces.delete(&ns, &DeleteParams::default()).await?;
    Ok(())
}

/// The images `cargo xtask images` makes without Docker run on the real node: imported into its
/// containerd, a pod of each binary runs `version` to completion. Control: an image that was not imported
/// does not start.
#[test]
fn image_tarballs_run_on_the_local_node() {
    require_privileges!();
    if !cluster_built() {
        return;
    }
    let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let kubeconfig = xtask::cluster::up(true).unwrap();
    let result = tokio::runtime::Runtime::new().unwrap().block_on(images_scenario(&kubeconfig));
    xtask::cluster::down().unwrap();
    result.unwrap();
}

async fn images_scenario(kubeconfig: &Path) -> anyhow::Result<()> {
    // The binaries next to the tests (debug builds: the same libraries as release ones).
    let bin_dir = warren_testbed::bin_path("warren-agent")?.parent().context("bin dir")?.to_path_buf();
    let tag = format!("e2e-{}", std::process::id());
    for image in xtask::images::build(&bin_dir, &tag)? {
        xtask::images::import(&image)?;
    }
    let config = Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let ns = format!("images-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = |name: &str, image: String| -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": image, "imagePullPolicy": "Never", "args": ["version"]}]}
        }))?)
    };
    for binary in xtask::images::BINARIES {
        create_pod(&pods, &pod(binary, format!("{binary}:{tag}"))?).await?;
    }
    create_pod(&pods, &pod("not-imported", format!("warren-agent:not-imported-{tag}"))?).await?;
    let completed = |p: Option<&Pod>| {
        let phase = p.and_then(|p| p.status.as_ref()?.phase.clone());
        matches!(phase.as_deref(), Some("Succeeded" | "Failed"))
    };
    for binary in xtask::images::BINARIES {
        let done = tokio::time::timeout(Duration::from_secs(120), await_condition(pods.clone(), binary, completed))
            .await
            .map_err(|_| anyhow::anyhow!("pod {binary} did not complete within 120 s"))??;
        let phase = done.and_then(|p| p.status).and_then(|s| s.phase);
        assert_eq!(phase.as_deref(), Some("Succeeded"), "{binary}");
        let log = pods.logs(binary, &Default::default()).await?;
        assert!(log.starts_with(&format!("{binary} ")), "{binary} printed {log:?}");
    }
    let refused = pods.get("not-imported").await?;
    let waiting = refused.status.and_then(|s| s.container_statuses).and_then(|c| c.first()?.state.clone()?.waiting);
    let reason = waiting.and_then(|w| w.reason).unwrap_or_default();
    assert_eq!(reason, "ErrImageNeverPull", "an image that was not imported");
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    xtask::images::remove(&tag)?;
    Ok(())
}

/// The controller's CA: root stored in a Secret (and kept across restarts), published in a ConfigMap;
/// an agent authenticated by a token bound to its pod gets certificates only for identities of pods on
/// its own node.
#[test]
fn controller_ca_issues_only_for_pods_on_the_agents_node() {
    require_privileges!();
    if !cluster_built() {
        return;
    }
    let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let kubeconfig = xtask::cluster::up(false).unwrap();
    let result = tokio::runtime::Runtime::new().unwrap().block_on(ca_scenario(&kubeconfig));
    xtask::cluster::down().unwrap();
    result.unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Controller(std::process::Child);
impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_controller(kubeconfig: &Path, port: u16) -> anyhow::Result<Controller> {
    let child = std::process::Command::new(warren_testbed::bin_path("warren-controller")?)
        .args(["run", "--kubeconfig"])
        .arg(kubeconfig)
        .args(["--ca-listen", &format!("127.0.0.1:{port}"), "--push-listen", "127.0.0.1:0", "--monitoring-addr", "127.0.0.1:0"])
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let controller = Controller(child);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the controller did not listen on {port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(controller)
}

/// POST /v1/certificates as an agent would (no client certificate; verifies the controller's identity).
async fn request_certificate(port: u16, root_pem: &str, token: &str, identity: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bundle = warren_identity::tls::TrustBundle::from_pem("cluster.local", root_pem)?;
    let expected = warren_identity::Identity::new("cluster.local", "warren-system", "warren-controller");
    let config = warren_identity::tls::client_config_without_client_auth(&bundle, expected)?;
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?.pem()?;
    let body = serde_json::json!({ "identity": identity, "csr": csr }).to_string();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(tokio_rustls::rustls::pki_types::ServerName::try_from("warren-controller")?, tcp)
        .await?;
    let request = format!(
        "POST /v1/certificates HTTP/1.1\r\nhost: warren-controller\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tls.read_to_string(&mut response).await?;
    let status: u16 = response.split_whitespace().nth(1).unwrap_or("0").parse()?;
    let json = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("null");
    Ok((status, serde_json::from_str(json)?))
}

async fn ca_scenario(kubeconfig: &Path) -> anyhow::Result<()> {
    use k8s_openapi::api::{
        authentication::v1::TokenRequest,
        core::v1::{ConfigMap, Node, Secret, ServiceAccount},
    };
    let config = Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in ["warren-system", "shop"] {
        namespaces.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?).await?;
    }
    let nodes: Api<Node> = Api::all(client.clone());
    for node in ["node-a", "node-b"] {
        nodes.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": node}}))?).await?;
    }
    for (ns, sa) in [("warren-system", "warren-agent"), ("shop", "reviews"), ("shop", "ratings")] {
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        accounts.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": sa}}))?).await?;
    }
    // Agent pods on each node, and one workload on each node.
    let mut uids = std::collections::HashMap::new();
    for (ns, name, sa, node) in [
        ("warren-system", "agent-a", "warren-agent", "node-a"),
        ("warren-system", "agent-b", "warren-agent", "node-b"),
        ("shop", "reviews", "reviews", "node-a"),
        ("shop", "ratings", "ratings", "node-b"),
    ] {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c", "image": "warren:local"}]}
        }))?;
        let created = create_pod(&pods, &pod).await?;
        uids.insert(name, created.metadata.uid.unwrap_or_default());
    }
    // Projected-style tokens bound to a pod, as the kubelet gives a DaemonSet pod.
    let token_for = |ns: &'static str, sa: &'static str, pod: &'static str| {
        let (client, uid) = (client.clone(), uids[pod].clone());
        async move {
            let accounts: Api<ServiceAccount> = Api::namespaced(client, ns);
            let request: TokenRequest = serde_json::from_value(serde_json::json!({
                "spec": {"audiences": [], "expirationSeconds": 3600,
                         "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid}}
            }))?;
            let issued: TokenRequest = accounts.create_subresource("token", sa, &PostParams::default(), &request).await?;
            anyhow::Ok(issued.status.and_then(|s| s.token).unwrap_or_default())
        }
    };
    let agent_a = token_for("warren-system", "warren-agent", "agent-a").await?;
    let workload_token = token_for("shop", "reviews", "reviews").await?;

    let port = free_port();
    let controller = start_controller(kubeconfig, port).await?;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "warren-system");
    let root = configmaps.get("warren-root-cert").await?.data.unwrap_or_default()["root-cert.pem"].clone();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "warren-system");
    assert!(secrets.get_opt("warren-ca").await?.is_some(), "the root is kept in Secret warren-ca");

    // The agent of node-a gets the identity of a pod on node-a...
    let (status, body) = request_certificate(port, &root, &agent_a, "spiffe://cluster.local/ns/shop/sa/reviews").await?;
    assert_eq!(status, 200, "{body}");
    let leaf = body["chain"][0].as_str().unwrap();
    let der: tokio_rustls::rustls::pki_types::CertificateDer =
        tokio_rustls::rustls::pki_types::pem::PemObject::from_pem_slice(leaf.as_bytes())?;
    assert_eq!(warren_identity::tls::spiffe_identity(&der)?.to_string(), "spiffe://cluster.local/ns/shop/sa/reviews");
    // ...but not that of a pod on node-b.
    let (status, body) = request_certificate(port, &root, &agent_a, "spiffe://cluster.local/ns/shop/sa/ratings").await?;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "no pod on node node-a runs as spiffe://cluster.local/ns/shop/sa/ratings");
    // A workload's own token is not an agent's; a made-up token is nobody's.
    let (status, body) = request_certificate(port, &root, &workload_token, "spiffe://cluster.local/ns/shop/sa/reviews").await?;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("is not the agent's service account"), "{body}");
    let (status, _) = request_certificate(port, &root, "not-a-token", "spiffe://cluster.local/ns/shop/sa/reviews").await?;
    assert_eq!(status, 401);

    // A restarted controller keeps the same root.
    drop(controller);
    let port = free_port();
    let _controller = start_controller(kubeconfig, port).await?;
    let again = configmaps.get("warren-root-cert").await?.data.unwrap_or_default()["root-cert.pem"].clone();
    assert_eq!(again, root, "the root survives a restart");
    let (status, body) = request_certificate(port, &root, &agent_a, "spiffe://cluster.local/ns/shop/sa/reviews").await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}

/// The whole identity path: the agent enrolls pods from the API server, gets their certificates from the
/// controller's CA (its key and CSR, its pod-bound token), and carries their traffic as HBONE.
#[test]
fn agent_gets_certificates_from_the_controller_and_carries_hbone() {
    require_privileges!();
    if !cluster_built() {
        return;
    }
    let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let kubeconfig = xtask::cluster::up(false).unwrap();
    let result = tokio::runtime::Runtime::new().unwrap().block_on(controller_identity_scenario(&kubeconfig));
    xtask::cluster::down().unwrap();
    result.unwrap();
}

async fn controller_identity_scenario(kubeconfig: &Path) -> anyhow::Result<()> {
    use k8s_openapi::api::{
        authentication::v1::TokenRequest,
        core::v1::{ConfigMap, Node, ServiceAccount},
    };
    let config = Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let node_name = format!("warren-node-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for (ns, labels) in [("warren-system", serde_json::json!({})), ("shop", serde_json::json!({"warren.dev/mesh": "enabled"}))] {
        namespaces
            .create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": ns, "labels": labels}}))?)
            .await?;
    }
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": node_name}}))?).await?;
    for (ns, sa) in [("warren-system", "warren-agent"), ("shop", "client"), ("shop", "server")] {
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        accounts.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": sa}}))?).await?;
    }
    let pod_object = |name: &str, sa: &str| -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node_name, "serviceAccountName": sa, "containers": [{"name": "c", "image": "warren:local"}]}
        }))?)
    };
    // The agent's own pod (a DaemonSet pod on this node) and its token, bound to that pod.
    let system_pods: Api<Pod> = Api::namespaced(client.clone(), "warren-system");
    let agent_pod = create_pod(&system_pods, &pod_object("warren-agent-x", "warren-agent")?).await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "warren-system");
    let request: TokenRequest = serde_json::from_value(serde_json::json!({"spec": {"audiences": [], "expirationSeconds": 3600,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "warren-agent-x", "uid": agent_pod.metadata.uid}}}))?;
    let token: TokenRequest = accounts.create_subresource("token", "warren-agent", &PostParams::default(), &request).await?;
    let token = token.status.and_then(|s| s.token).unwrap_or_default();

    let ca_port = free_port();
    let _controller = start_controller(kubeconfig, ca_port).await?;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "warren-system");
    let root = configmaps.get("warren-root-cert").await?.data.unwrap_or_default()["root-cert.pem"].clone();

    let bed = Testbed::new("controller-identity")?;
    let node = bed.add_node("node-1")?;
    let shop_pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let mut pods = vec![];
    for name in ["client", "server"] {
        let created = create_pod(&shop_pods, &pod_object(name, name)?).await?;
        let pod = node.add_pod_with_uid(name, true, created.metadata.uid.as_deref())?;
        let status = serde_json::json!({"status": {"phase": "Running", "podIP": pod.ip.to_string(),
            "podIPs": [{"ip": pod.ip.to_string()}, {"ip": pod.ip6.to_string()}]}});
        shop_pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
        pods.push(pod);
    }
    let (client_pod, server_pod) = (pods[0].clone(), pods[1].clone());
    server_pod.serve("v1")?;
    node.reach_host_port(xtask::cluster::API_PORT)?;
    node.reach_host_port(ca_port)?;
    let (root_file, token_file) = (bed.state_dir().join("root.pem"), bed.state_dir().join("agent-token"));
    std::fs::write(&root_file, &root)?;
    std::fs::write(&token_file, &token)?;
    let agent = node.start_agent_with(warren_testbed::AgentOptions {
        kubeconfig: Some(kubeconfig.to_path_buf()),
        node_name: Some(node_name.clone()),
        identity: Some(serde_json::json!({
            "trustDomain": "cluster.local",
            "caCertFile": root_file,
            "controller": {"address": format!("127.0.0.1:{ca_port}"), "tokenFile": token_file},
        })),
        ..Default::default()
    })?;
    agent.wait_enrolled(&client_pod, true, Duration::from_secs(10))?;
    agent.wait_enrolled(&server_pod, true, Duration::from_secs(10))?;

    let sent = client_pod.send(server_pod.socket(ECHO_PORT), 1 << 20)?;
    assert!(sent.ok, "{sent:?}\n{}", agent.log());
    let connections = agent.connections()?;
    let inbound = connections["recently_closed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["direction"] == "inbound")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no inbound connection: {connections:#}"))?;
    assert_eq!(inbound["protocol"], "hbone");
    assert_eq!(inbound["peer_identity"], "spiffe://cluster.local/ns/shop/sa/client");
    let certificates: serde_json::Value = serde_json::from_str(&agent.get("/certificates")?)?;
    let identities: Vec<&str> = certificates.as_array().unwrap().iter().filter_map(|c| c["identity"].as_str()).collect();
    assert_eq!(identities, ["spiffe://cluster.local/ns/shop/sa/client", "spiffe://cluster.local/ns/shop/sa/server"]);
    Ok(())
}
