//! The node's live service graph, from the agent's own traffic (no Prometheus needed): per edge — source
//! workload, destination workload, service, protocol, reporter — one-second slots over the last minute of
//! requests (or connections), errors, bytes and latency buckets. `/graph` on the admin endpoint,
//! `warren-agent inspect graph`, and the summaries the controller's mesh-wide page draws are read from it.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use warren_api::flows::{FlowEdge, FlowGraph, FlowProtocol, WorkloadRef};

use super::istio::{BUCKETS, Reporter, RequestProtocol, SecurityPolicy, Traffic};

/// The window rates and the p99 are over.
pub const WINDOW: Duration = Duration::from_secs(60);
const SLOTS: usize = WINDOW.as_secs() as usize;

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct EdgeKey {
    reporter: Reporter,
    source: WorkloadRef,
    destination: WorkloadRef,
    service: String,
    protocol: FlowProtocol,
    mtls: bool,
}

/// One second of an edge.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Seconds since the table started; a slot of an older second is stale.
    second: u64,
    count: u64,
    errors: u64,
    bytes: u64,
    /// Per Istio bucket, then +Inf.
    latency: [u64; BUCKETS.len() + 1],
}

/// What one request or connection adds to its edge.
pub struct Observation {
    pub protocol: RequestProtocol,
    pub error: bool,
    /// Requests only.
    pub duration_ms: Option<f64>,
    pub bytes: u64,
}

pub struct FlowTable {
    started: Instant,
    edges: Mutex<HashMap<EdgeKey, Box<[Slot; SLOTS]>>>,
}

impl Default for FlowTable {
    fn default() -> Self {
        FlowTable { started: Instant::now(), edges: Mutex::default() }
    }
}

fn workload(meta: &super::peers::WorkloadMeta) -> WorkloadRef {
    WorkloadRef { namespace: meta.namespace.clone(), name: meta.workload.clone() }
}

impl FlowTable {
    fn now(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    pub fn record(&self, traffic: &Traffic, observation: Observation) {
        let key = EdgeKey {
            reporter: traffic.reporter,
            source: workload(&traffic.source),
            destination: workload(&traffic.destination),
            service: traffic.service.host.clone(),
            protocol: match observation.protocol {
                RequestProtocol::Http => FlowProtocol::Http,
                RequestProtocol::Grpc => FlowProtocol::Grpc,
                RequestProtocol::Tcp => FlowProtocol::Tcp,
            },
            mtls: traffic.security == SecurityPolicy::MutualTls,
        };
        let second = self.now();
        let mut edges = self.edges.lock().unwrap();
        let slots = edges.entry(key).or_insert_with(|| Box::new([Slot::default(); SLOTS]));
        let slot = &mut slots[second as usize % SLOTS];
        if slot.second != second || slot.count == 0 {
            *slot = Slot { second, ..Slot::default() };
        }
        slot.count += 1;
        slot.errors += u64::from(observation.error);
        slot.bytes += observation.bytes;
        if let Some(ms) = observation.duration_ms {
            slot.latency[BUCKETS.iter().position(|bound| ms <= *bound).unwrap_or(BUCKETS.len())] += 1;
        }
    }

    /// The graph over the window; edges with nothing in it are dropped (their memory too).
    pub fn graph(&self, node: &str) -> FlowGraph {
        let now = self.now();
        // Rates over the window, or over the agent's life while it is younger.
        let span = (now + 1).min(SLOTS as u64) as f64;
        let fresh = |slot: &&Slot| slot.count > 0 && now - slot.second < SLOTS as u64;
        let mut edges = self.edges.lock().unwrap();
        edges.retain(|_, slots| slots.iter().any(|s| fresh(&s)));
        let mut out: Vec<FlowEdge> = edges
            .iter()
            .map(|(key, slots)| {
                let live: Vec<&Slot> = slots.iter().filter(fresh).collect();
                let count: u64 = live.iter().map(|s| s.count).sum();
                let errors: u64 = live.iter().map(|s| s.errors).sum();
                let mut latency = [0u64; BUCKETS.len() + 1];
                for slot in &live {
                    for (sum, n) in latency.iter_mut().zip(slot.latency) {
                        *sum += n;
                    }
                }
                FlowEdge {
                    source: key.source.clone(),
                    destination: key.destination.clone(),
                    service: key.service.clone(),
                    protocol: key.protocol,
                    mtls: key.mtls,
                    reporter: key.reporter.as_str().to_string(),
                    rate: count as f64 / span,
                    error_ratio: if count == 0 { 0.0 } else { errors as f64 / count as f64 },
                    p99_ms: quantile(0.99, &latency),
                    bytes_per_second: live.iter().map(|s| s.bytes).sum::<u64>() as f64 / span,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.source, &a.destination, &a.service).cmp(&(&b.source, &b.destination, &b.service)));
        FlowGraph { node: node.to_string(), window_seconds: WINDOW.as_secs(), edges: out }
    }
}

/// `histogram_quantile` over Istio's buckets: linear within the bucket the rank falls in; the largest
/// finite bound for the +Inf bucket.
fn quantile(q: f64, counts: &[u64; BUCKETS.len() + 1]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, count) in counts.iter().enumerate() {
        if (below + count) as f64 >= rank && *count > 0 {
            let Some(upper) = BUCKETS.get(i) else { return Some(BUCKETS[BUCKETS.len() - 1]) };
            let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
            return Some(lower + (upper - lower) * (rank - below as f64) / *count as f64);
        }
        below += count;
    }
    Some(BUCKETS[BUCKETS.len() - 1])
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::telemetry::peers::{ServiceMeta, WorkloadMeta};

    fn traffic(reporter: Reporter) -> Traffic {
        let meta = |name: &str| {
            Arc::new(WorkloadMeta {
                workload: name.into(),
                namespace: "default".into(),
                app: name.into(),
                version: "v1".into(),
                canonical_service: name.into(),
                canonical_revision: "v1".into(),
                principal: "p".into(),
            })
        };
        Traffic {
            reporter,
            source: meta("sleep"),
            source_principal: "p".into(),
            destination: meta("web"),
            destination_principal: "p".into(),
            service: Arc::new(ServiceMeta { host: "web.default.svc.cluster.local".into(), name: "web".into(), namespace: "default".into() }),
            cluster: "Kubernetes".into(),
            security: SecurityPolicy::MutualTls,
        }
    }

    #[test]
    fn an_edge_has_its_rate_errors_and_p99() {
        let table = FlowTable::default();
        for i in 0..100 {
            let observation = Observation { protocol: RequestProtocol::Http, error: i < 5, duration_ms: Some(if i < 98 { 3.0 } else { 40.0 }), bytes: 10 };
            table.record(&traffic(Reporter::Source), observation);
        }
        let graph = table.graph("node-1");
        let [edge] = graph.edges.as_slice() else { panic!("one edge: {graph:?}") };
        assert_eq!((edge.source.name.as_str(), edge.destination.name.as_str(), edge.mtls), ("sleep", "web", true));
        assert!((edge.error_ratio - 0.05).abs() < 1e-9);
        // 98 in (1, 5], 2 in (25, 50]: the 99th of 100 is in (25, 50].
        let p99 = edge.p99_ms.unwrap();
        assert!((25.0..=50.0).contains(&p99), "{p99}");
        assert!(edge.rate >= 100.0 / 2.0, "a young table's rate is over its life: {}", edge.rate);
    }

    #[test]
    fn the_source_report_wins_and_quantiles_need_data() {
        let table = FlowTable::default();
        let tcp = || Observation { protocol: RequestProtocol::Tcp, error: false, duration_ms: None, bytes: 5 };
        table.record(&traffic(Reporter::Destination), tcp());
        table.record(&traffic(Reporter::Source), tcp());
        let graph = table.graph("n");
        assert_eq!(graph.edges.len(), 2);
        let merged = FlowGraph::deduplicated(graph.edges);
        assert_eq!(merged.len(), 1);
        assert_eq!((merged[0].reporter.as_str(), merged[0].p99_ms), ("source", None));
        assert_eq!(quantile(0.99, &[0; BUCKETS.len() + 1]), None);
    }
}
