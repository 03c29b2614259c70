//! Workloads (pods, namespaces, PeerAuthentication) as the agent consumes them, whichever source they came
//! from: the local workloads file, the Kubernetes API, or the controller's push.
mod enrollment;
pub mod naming;
pub mod peer_authentication;

pub use enrollment::{is_enrolled, socket_acceleration, ISTIO_AMBIENT_LABEL, MESH_LABEL, SOCKET_ACCELERATION_LABEL};

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

/// A pod on this node, as a source reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pod {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// metadata.uid: how the agent finds the pod's cgroup and netns in /proc.
    pub uid: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub host_network: bool,
    /// spec.serviceAccountName: the workload's identity.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// spec.nodeName; a pod without one is taken to be on this agent's node.
    #[serde(default)]
    pub node: Option<String>,
    /// The workload the pod belongs to, as Istio names it in telemetry (a Deployment's pods → the
    /// Deployment, [`naming::workload_name`]); `None`: the pod's own name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Where the pod runs, `region/zone/subzone` ([`crate::resilience::Locality`]): its `istio-locality`
    /// label, else its node's topology labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
}

fn default_service_account() -> String {
    "default".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".into()
}

/// Everything a source knows, replaced whole on every change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workloads {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub pods: Vec<Pod>,
    /// Istio PeerAuthentication objects, unchanged from users' YAML.
    #[serde(default)]
    pub peer_authentications: Vec<peer_authentication::PeerAuthentication>,
}

impl Pod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn identity(&self, trust_domain: &str) -> warren_identity::Identity {
        warren_identity::Identity::new(trust_domain, &self.namespace, &self.service_account)
    }

    /// Istio's workload name for the pod (`source_workload`, `destination_workload`).
    pub fn workload_name(&self) -> &str {
        self.workload.as_deref().unwrap_or(&self.name)
    }

    pub fn is_on(&self, node: &str) -> bool {
        self.node.as_deref().is_none_or(|n| n == node)
    }

    /// Where the pod runs: [`Pod::locality`] as the source resolved it, else its `istio-locality` label.
    pub fn parsed_locality(&self) -> Option<crate::resilience::Locality> {
        use crate::resilience::Locality;
        self.locality.as_deref().and_then(Locality::parse).or_else(|| Locality::from_pod_labels(&self.labels))
    }
}

/// Every enrolled workload in the mesh by IP: where HBONE can go, and whom to expect there.
#[derive(Debug, Clone, Default)]
pub struct MeshIndex {
    by_ip: std::collections::HashMap<IpAddr, Pod>,
    peer_authentications: Vec<peer_authentication::PeerAuthentication>,
}

impl MeshIndex {
    pub fn new(workloads: &Workloads) -> Self {
        let by_ip = workloads.enrolled_pods().into_iter().flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.clone()))).collect();
        MeshIndex { by_ip, peer_authentications: workloads.peer_authentications.clone() }
    }

    /// The PeerAuthentication mode for inbound traffic to `destination` (an enrolled pod's address).
    pub fn inbound_mode(&self, destination: &std::net::SocketAddr) -> peer_authentication::Mode {
        match self.by_ip.get(&destination.ip()) {
            Some(pod) => peer_authentication::effective_mode(pod, destination.port(), &self.peer_authentications),
            None => peer_authentication::Mode::Permissive,
        }
    }

    /// The enrolled pod that owns `ip`, if any.
    pub fn enrolled(&self, ip: &IpAddr) -> Option<&Pod> {
        self.by_ip.get(ip)
    }

    /// The enrolled pod `key` (`namespace/name`), if any (a scan: for agents without a controller).
    pub fn pod(&self, key: &str) -> Option<&Pod> {
        self.by_ip.values().find(|p| p.key() == key)
    }
}

impl Workloads {
    /// The pods that must be enrolled now, on any node.
    pub fn enrolled_pods(&self) -> Vec<&Pod> {
        let labels_of = |ns: &str| self.namespaces.iter().find(|n| n.name == ns).map(|n| &n.labels);
        self.pods.iter().filter(|p| is_enrolled(p, labels_of(&p.namespace))).collect()
    }

    /// Field-named problems, for a source that reads user input.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (i, pod) in self.pods.iter().enumerate() {
            if pod.name.is_empty() {
                return Err(format!("pods[{i}].name: must not be empty"));
            }
            if pod.uid.trim().is_empty() {
                return Err(format!("pods[{i}].uid: must not be empty ({})", pod.key()));
            }
            if !seen.insert(pod.uid.clone()) {
                return Err(format!("pods[{i}].uid: {} is used by another pod", pod.uid));
            }
        }
        Ok(())
    }
}
