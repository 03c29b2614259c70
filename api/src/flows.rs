//! The service graph's data, as an agent tells it (`/graph` on its admin endpoint, `inspect graph`) and
//! as the controller gathers it from every agent for the mesh-wide page: one edge per source workload,
//! destination workload, service and protocol, with rates over the agent's last minute.
use serde::{Deserialize, Serialize};

/// A workload as the metrics name it (`unknown` for a peer outside the registry).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkloadRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowProtocol {
    Http,
    Grpc,
    Tcp,
}

/// Traffic from one workload to another over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowEdge {
    pub source: WorkloadRef,
    pub destination: WorkloadRef,
    /// The service addressed (its FQDN), `unknown` for a workload addressed directly.
    pub service: String,
    pub protocol: FlowProtocol,
    /// Carried over HBONE (mTLS).
    pub mtls: bool,
    /// `source` or `destination`: which end's agent saw it.
    pub reporter: String,
    /// Requests (HTTP, gRPC) or connections (TCP) per second.
    pub rate: f64,
    /// The share of requests answered 5xx or with a response flag (TCP: connections that failed).
    pub error_ratio: f64,
    /// From the window's latency buckets, as `histogram_quantile` would (`None` without requests).
    pub p99_ms: Option<f64>,
    /// Bytes per second, both ways.
    pub bytes_per_second: f64,
}

/// One agent's graph.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowGraph {
    pub node: String,
    pub window_seconds: u64,
    pub edges: Vec<FlowEdge>,
}

impl FlowGraph {
    /// Every workload an edge names, sorted.
    pub fn workloads(&self) -> Vec<&WorkloadRef> {
        let mut all: Vec<&WorkloadRef> = self.edges.iter().flat_map(|e| [&e.source, &e.destination]).collect();
        all.sort();
        all.dedup();
        all
    }

    /// Each edge once: where both agents reported it, the source's report (Kiali's choice too).
    pub fn deduplicated(edges: impl IntoIterator<Item = FlowEdge>) -> Vec<FlowEdge> {
        let mut by_key: std::collections::BTreeMap<(WorkloadRef, WorkloadRef, String, FlowProtocol), FlowEdge> = Default::default();
        for edge in edges {
            let key = (edge.source.clone(), edge.destination.clone(), edge.service.clone(), edge.protocol);
            match by_key.get(&key) {
                Some(kept) if kept.reporter == "source" => {}
                _ => {
                    by_key.insert(key, edge);
                }
            }
        }
        by_key.into_values().collect()
    }
}
