//! The mesh-wide service graph: every agent's flow summary (sent on its push stream every
//! [`warren_api::push::FLOW_REPORT_EVERY`]) kept by node, merged into one graph (each edge once, the
//! source's report where both ends reported it), served as JSON (`/graph.json`) and drawn by a page that
//! refreshes itself (`/graph`), as Kiali's graph — without Prometheus.
use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Serialize;
use warren_config::flows::{FlowEdge, FlowGraph, WorkloadRef};

/// A node's summary older than this (its agent stopped reporting) is left out.
const STALE_AFTER: Duration = Duration::from_secs(15);

#[derive(Default)]
pub struct FlowStore {
    by_node: Mutex<BTreeMap<String, (Instant, FlowGraph)>>,
}

/// What `/graph.json` answers.
#[derive(Debug, Serialize)]
pub struct MeshGraph {
    /// The nodes whose agents reported within the last 15 s.
    pub nodes: Vec<String>,
    pub workloads: Vec<WorkloadRef>,
    pub edges: Vec<FlowEdge>,
}

impl FlowStore {
    /// Keeps `node`'s latest summary (the stream header named the node; its certificate proved an agent).
    pub fn report(&self, node: &str, mut graph: FlowGraph) {
        graph.node = node.to_string();
        self.by_node.lock().unwrap().insert(node.to_string(), (Instant::now(), graph));
    }

    pub fn mesh(&self) -> MeshGraph {
        let mut by_node = self.by_node.lock().unwrap();
        by_node.retain(|_, (at, _)| at.elapsed() < STALE_AFTER);
        let nodes = by_node.keys().cloned().collect();
        let edges = FlowGraph::deduplicated(by_node.values().flat_map(|(_, g)| g.edges.clone()));
        let mut workloads: Vec<WorkloadRef> = edges.iter().flat_map(|e| [e.source.clone(), e.destination.clone()]).collect();
        workloads.sort();
        workloads.dedup();
        MeshGraph { nodes, workloads, edges }
    }
}

/// The page: an SVG drawn from `/graph.json`, redrawn every 2 s. Workloads are `<g class="workload"
/// data-workload="name.namespace">`, edges `<g class="edge" data-source=… data-destination=…>`, so tools
/// (and the tests) can read the DOM.
pub const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Warren — mesh graph</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #0f1720; color: #e6edf3; }
  header { padding: 12px 20px; border-bottom: 1px solid #243041; display: flex; gap: 24px; align-items: baseline; }
  h1 { font-size: 18px; margin: 0; }
  #status { color: #8b9bb0; font-size: 13px; }
  svg { display: block; width: 100vw; height: calc(100vh - 50px); }
  .workload circle { fill: #1f6feb; stroke: #58a6ff; stroke-width: 2; }
  .workload.unknown circle { fill: #484f58; stroke: #6e7681; }
  .workload text { fill: #e6edf3; font-size: 13px; text-anchor: middle; }
  .edge line { stroke: #3fb950; stroke-width: 2; marker-end: url(#arrow); }
  .edge.errors line { stroke: #f85149; }
  .edge.plaintext line { stroke-dasharray: 6 4; }
  .edge text { fill: #c9d1d9; font-size: 11px; text-anchor: middle; }
</style>
</head>
<body>
<header><h1>Mesh graph</h1><span id="status">loading…</span></header>
<svg id="graph" xmlns="http://www.w3.org/2000/svg">
  <defs><marker id="arrow" viewBox="0 0 10 10" refX="28" refY="5" markerWidth="8" markerHeight="8" orient="auto-start-reverse">
    <path d="M 0 0 L 10 5 L 0 10 z" fill="#8b9bb0"/></marker></defs>
  <g id="edges"></g><g id="workloads"></g>
</svg>
<script>
const NS = "http://www.w3.org/2000/svg";
const key = w => `${w.name}.${w.namespace}`;
function el(name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function draw(graph) {
  const svg = document.getElementById("graph");
  const w = svg.clientWidth || 1200, h = svg.clientHeight || 750;
  const r = Math.max(120, Math.min(w, h) / 2 - 90);
  const at = {};
  graph.workloads.forEach((wl, i) => {
    const a = (2 * Math.PI * i) / Math.max(1, graph.workloads.length) - Math.PI / 2;
    at[key(wl)] = [w / 2 + r * Math.cos(a), h / 2 + r * Math.sin(a)];
  });
  const edges = document.getElementById("edges"), workloads = document.getElementById("workloads");
  edges.replaceChildren(); workloads.replaceChildren();
  for (const e of graph.edges) {
    const [x1, y1] = at[key(e.source)], [x2, y2] = at[key(e.destination)];
    const cls = ["edge", e.error_ratio > 0 ? "errors" : null, e.mtls ? "mtls" : "plaintext"].filter(Boolean).join(" ");
    const g = el("g", { class: cls, "data-source": key(e.source), "data-destination": key(e.destination), "data-protocol": e.protocol });
    g.appendChild(el("line", { x1, y1, x2, y2 }));
    const unit = e.protocol === "tcp" ? "conn/s" : "req/s";
    const p99 = e.p99_ms == null ? "" : ` · p99 ${e.p99_ms.toFixed(1)} ms`;
    const label = `${e.protocol} · ${e.mtls ? "mTLS" : "plaintext"} · ${e.rate.toFixed(2)} ${unit} · ${(e.error_ratio * 100).toFixed(1)}% err${p99}`;
    g.appendChild(el("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6, class: "label" }, label));
    edges.appendChild(g);
  }
  for (const wl of graph.workloads) {
    const [x, y] = at[key(wl)];
    const g = el("g", { class: "workload" + (wl.name === "unknown" ? " unknown" : ""), "data-workload": key(wl) });
    g.appendChild(el("circle", { cx: x, cy: y, r: 18 }));
    g.appendChild(el("text", { x, y: y + 36 }, key(wl)));
    workloads.appendChild(g);
  }
  document.getElementById("status").textContent =
    `${graph.workloads.length} workloads · ${graph.edges.length} edges · nodes: ${graph.nodes.join(", ") || "none"} · ${new Date().toLocaleTimeString()}`;
}
async function refresh() {
  try {
    const answer = await fetch("graph.json", { cache: "no-store" });
    draw(await answer.json());
  } catch (e) {
    document.getElementById("status").textContent = `no answer from the controller: ${e}`;
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"##;

#[cfg(test)]
mod tests {
    use warren_config::flows::FlowProtocol;

    use super::*;

    fn edge(source: &str, destination: &str, reporter: &str) -> FlowEdge {
        let workload = |name: &str| WorkloadRef { namespace: "default".into(), name: name.into() };
        FlowEdge {
            source: workload(source),
            destination: workload(destination),
            service: format!("{destination}.default.svc.cluster.local"),
            protocol: FlowProtocol::Http,
            mtls: true,
            reporter: reporter.into(),
            rate: 1.0,
            error_ratio: 0.0,
            p99_ms: Some(2.0),
            bytes_per_second: 10.0,
        }
    }

    #[test]
    fn the_mesh_graph_merges_nodes_each_edge_once() {
        let store = FlowStore::default();
        store.report("node-1", FlowGraph { node: String::new(), window_seconds: 60, edges: vec![edge("sleep", "web", "source")] });
        let from_destination = vec![edge("sleep", "web", "destination"), edge("outsider", "web", "destination")];
        store.report("node-2", FlowGraph { node: String::new(), window_seconds: 60, edges: from_destination });
        let mesh = store.mesh();
        assert_eq!(mesh.nodes, ["node-1", "node-2"]);
        assert_eq!(mesh.edges.len(), 2, "{:?}", mesh.edges);
        assert!(mesh.edges.iter().any(|e| e.source.name == "sleep" && e.reporter == "source"));
        let names: Vec<String> = mesh.workloads.iter().map(|w| w.name.clone()).collect();
        assert_eq!(names, ["outsider", "sleep", "web"]);
    }
}
