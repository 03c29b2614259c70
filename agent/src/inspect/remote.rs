//! `inspect … --node NAME`: the same views of any node's agent from a workstation, through the API server
//! (as `istioctl ztunnel-config` does): the warren-agent pod on that node is found by its DaemonSet's label
//! and node name, and its admin endpoint (on the node's loopback, never exposed) is reached by a
//! port-forward, which the kubelet opens inside the pod's — the node's — network namespace.
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Config, ResourceExt,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
};

/// The label the chart's agent DaemonSet selects its pods by.
const AGENT_SELECTOR: &str = "app.kubernetes.io/name=warren-agent";

/// Which node's agent, and how to reach the cluster.
#[derive(Clone, Debug)]
pub struct RemoteNode {
    pub node: String,
    /// `None`: $KUBECONFIG, ~/.kube/config, or the in-cluster account, as kubectl.
    pub kubeconfig: Option<PathBuf>,
    /// Where the chart runs the agents.
    pub namespace: String,
    /// The agent's admin port (on the node's loopback).
    pub port: u16,
}

async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).with_context(|| format!("--kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await.context("no cluster configured (pass --kubeconfig or set KUBECONFIG)")?,
    };
    Ok(Client::try_from(config)?)
}

/// The agent pod on `remote.node`, or an error naming the nodes that have one.
async fn agent_pod(pods: &Api<Pod>, remote: &RemoteNode) -> Result<String> {
    let on_node = ListParams::default().labels(AGENT_SELECTOR).fields(&format!("spec.nodeName={}", remote.node));
    let found = pods.list(&on_node).await.with_context(|| format!("listing warren-agent pods in {}", remote.namespace))?;
    if let Some(pod) = found.items.into_iter().find(|p| p.metadata.deletion_timestamp.is_none()) {
        return Ok(pod.name_any());
    }
    let all = pods.list(&ListParams::default().labels(AGENT_SELECTOR)).await?;
    let mut nodes: Vec<String> = all.items.iter().filter_map(|p| p.spec.as_ref()?.node_name.clone()).collect();
    nodes.sort();
    let nodes = if nodes.is_empty() { format!("none in namespace {}", remote.namespace) } else { nodes.join(", ") };
    bail!("no warren-agent pod on node {:?} (agents run on: {nodes}; --agent-namespace names another namespace)", remote.node)
}

/// GET `path` from the node's agent over a port-forward; the body.
pub async fn get(remote: &RemoteNode, path: &str) -> Result<Bytes> {
    let pods: Api<Pod> = Api::namespaced(client(remote.kubeconfig.as_ref()).await?, &remote.namespace);
    let pod = agent_pod(&pods, remote).await?;
    let mut forwarder = pods.portforward(&pod, &[remote.port]).await.with_context(|| format!("port-forward to {pod}"))?;
    let stream = forwarder.take_stream(remote.port).context("the port-forward has no stream")?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.context("HTTP over the port-forward")?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(http_body_util::Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await.with_context(|| format!("GET {path} from {pod}"))?;
    if !response.status().is_success() {
        bail!("the agent {pod} answered {path} with {}", response.status());
    }
    let body = http_body_util::BodyExt::collect(response.into_body()).await?.to_bytes();
    drop(sender);
    forwarder.abort();
    Ok(body)
}
