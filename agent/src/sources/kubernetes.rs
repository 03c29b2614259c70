//! Workloads from the Kubernetes API: every pod (the agent enrolls those on its node and sends HBONE to
//! enrolled ones anywhere) and every namespace (for the enrollment labels), kept by kube-rs reflectors;
//! each change republishes the whole snapshot. (The controller's per-node push replaces this with just
//! what a node needs.)
use std::{collections::BTreeMap, net::IpAddr, path::Path};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, Config, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::Workloads;
use crate::state;

/// A client from `kubeconfig`, or the usual inference (in-cluster service account, $KUBECONFIG).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await.context("no Kubernetes configuration (in-cluster or $KUBECONFIG)")?,
    };
    Ok(Client::try_from(config)?)
}

/// Starts watching; the receiver holds the first full snapshot once both lists have synced.
pub async fn watch(client: Client, node_name: String) -> Result<watch::Receiver<Workloads>> {
    let pods: Api<Pod> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client);
    let (pod_store, pod_writer) = reflector::store();
    let (ns_store, ns_writer) = reflector::store();
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);

    let pod_changes = changed_tx.clone();
    tokio::spawn(async move {
        let mut stream =
            reflector(pod_writer, watcher(pods, watcher::Config::default())).default_backoff().touched_objects().boxed();
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                warn!("pod watch: {e}");
            }
            let _ = pod_changes.try_send(());
        }
    });
    tokio::spawn(async move {
        let mut stream =
            reflector(ns_writer, watcher(namespaces, watcher::Config::default())).default_backoff().touched_objects().boxed();
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                warn!("namespace watch: {e}");
            }
            let _ = changed_tx.try_send(());
        }
    });

    pod_store.wait_until_ready().await.context("listing this node's pods")?;
    ns_store.wait_until_ready().await.context("listing namespaces")?;
    let snapshot = move || Workloads {
        namespaces: ns_store
            .state()
            .iter()
            .map(|ns| state::Namespace { name: ns.name_any(), labels: ns.labels().clone() })
            .collect(),
        pods: pod_store.state().iter().filter_map(|p| to_pod(p)).collect(),
        // PeerAuthentication objects reach agents through the controller (its CRDs and push).
        peer_authentications: Vec::new(),
    };
    let initial = snapshot();
    let local = initial.pods.iter().filter(|p| p.is_on(&node_name)).count();
    info!(node = %node_name, pods = initial.pods.len(), on_this_node = local, "watching pods and namespaces");
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        while changed.recv().await.is_some() {
            let next = snapshot();
            tx.send_if_modified(|current| {
                let modified = *current != next;
                *current = next;
                modified
            });
        }
    });
    Ok(rx)
}

/// The agent's view of a pod; `None` for pods that are finished.
fn to_pod(pod: &Pod) -> Option<state::Pod> {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    if phase == "Succeeded" || phase == "Failed" {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        ips.extend(status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse::<IpAddr>().ok()));
    }
    let controller = pod.owner_references().iter().find(|o| o.controller == Some(true));
    let controller = controller.map(|o| state::naming::Controller { kind: &o.kind, name: &o.name });
    let workload = state::naming::workload_name(&pod.name_any(), controller, pod.labels());
    Some(state::Pod {
        workload: Some(workload).filter(|w| *w != pod.name_any()),
        name: pod.name_any(),
        namespace: pod.namespace().unwrap_or_default(),
        uid: pod.uid()?,
        ips,
        labels: pod.labels().iter().map(|(k, v)| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>(),
        host_network: pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false),
        service_account: pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into()),
        // Unscheduled pods are on no node (an empty name), never this one.
        node: Some(pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()),
        locality: warren_api::resilience::Locality::from_pod_labels(pod.labels()).map(|l| l.to_string()),
    })
}
