//! `inspect connections|workloads|certs|services|routes|faults|policies`: read from the running agent's
//! admin endpoint.
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use warren_api::{
    admin::PoliciesView,
    flows::{FlowEdge, FlowGraph, FlowProtocol, WorkloadRef},
};

use super::{Scope, ViewArgs, structured, table};

/// Where a view's agent answers.
#[derive(Clone, Debug)]
pub enum Agent {
    /// This node's admin endpoint.
    Local(SocketAddr),
    /// Another node's, through the API server.
    Remote(super::remote::RemoteNode),
}

/// One runtime for every request a CLI command makes (status makes several).
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(RUNTIME.get_or_init(|| runtime))
}

/// GET `path` from this node's agent (hyper's client), parsed as JSON.
pub fn fetch(admin: SocketAddr, path: &str) -> Result<Value> {
    fetch_from(&Agent::Local(admin), path)
}

/// GET `path` from `agent`, parsed as JSON.
pub fn fetch_from(agent: &Agent, path: &str) -> Result<Value> {
    let body = runtime()?.block_on(async {
        match agent {
            Agent::Local(admin) => get_local(*admin, path).await,
            Agent::Remote(remote) => {
                let what = format!("node {}", remote.node);
                tokio::time::timeout(Duration::from_secs(15), super::remote::get(remote, path))
                    .await
                    .with_context(|| format!("{what}: no answer from its agent in 15 s"))?
            }
        }
    })?;
    serde_json::from_slice(&body).with_context(|| format!("the agent's {path} is not JSON"))
}

async fn get_local(admin: SocketAddr, path: &str) -> Result<bytes::Bytes> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: hyper::Uri = format!("http://{admin}{path}").parse()?;
    let not_answering =
        || format!("no agent answers on {admin} (is warren-agent running on this node? --admin-addr names another, --node another node)");
    let response = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
        .await
        .with_context(not_answering)?
        .with_context(not_answering)?;
    if !response.status().is_success() {
        bail!("the agent answered {path} with {}", response.status());
    }
    let body = tokio::time::timeout(Duration::from_secs(5), http_body_util::BodyExt::collect(response.into_body()))
        .await
        .with_context(|| format!("the agent's {path} did not finish"))??;
    Ok(body.to_bytes())
}

/// Keeps the items of a JSON array for which `keep` holds.
fn retain(list: &mut Value, keep: impl Fn(&Value) -> bool) {
    if let Some(items) = list.as_array_mut() {
        items.retain(keep);
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub fn connections(args: &ViewArgs) -> Result<String> {
    let mut view = fetch_from(&args.agent(), "/connections")?;
    for list in ["open", "recently_closed"] {
        retain(&mut view[list], |c| args.scope.admits_pod(c["pod"].as_str().unwrap_or_default()));
    }
    if let Some(text) = structured(&view, args.output) {
        return text;
    }
    let row = |c: &Value| {
        vec![
            text(&c["id"]),
            text(&c["direction"]),
            text(&c["protocol"]),
            text(&c["pod"]),
            text(&c["client"]),
            text(&c["original_dst"]),
            text(&c["sent_bytes"]),
            text(&c["received_bytes"]),
            if c["closed"] == Value::Bool(true) { "closed".into() } else { "open".into() },
            text(&c["error"]),
        ]
    };
    let rows: Vec<Vec<String>> = view["open"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(view["recently_closed"].as_array().into_iter().flatten().rev())
        .map(row)
        .collect();
    Ok(table(&["ID", "DIRECTION", "PROTOCOL", "POD", "CLIENT", "DESTINATION", "SENT", "RECEIVED", "STATE", "ERROR"], &rows))
}

pub fn workloads(args: &ViewArgs) -> Result<String> {
    let mut view = fetch_from(&args.agent(), "/workloads")?;
    retain(&mut view, |p| args.scope.admits_pod(p["pod"].as_str().unwrap_or_default()));
    if let Some(text) = structured(&view, args.output) {
        return text;
    }
    let rows: Vec<Vec<String>> = view
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let ips = p["ips"].as_array().map(|a| a.iter().map(text).collect::<Vec<_>>().join(",")).unwrap_or_default();
            vec![
                text(&p["pod"]),
                text(&p["uid"]),
                ips,
                if p["enrolled"] == Value::Bool(true) { "yes".into() } else { "no".into() },
                text(&p["netns_cookie"]),
                text(&p["cgroup"]),
                text(&p["error"]),
            ]
        })
        .collect();
    Ok(table(&["POD", "UID", "IPS", "ENROLLED", "NETNS COOKIE", "CGROUP", "ERROR"], &rows))
}

pub fn certificates(args: &ViewArgs) -> Result<String> {
    only_namespace(&args.scope, "certs (a certificate is a service account's, not a pod's)")?;
    let mut view = fetch_from(&args.agent(), "/certificates")?;
    retain(&mut view, |c| args.scope.admits_identity(c["identity"].as_str().unwrap_or_default()));
    if let Some(text) = structured(&view, args.output) {
        return text;
    }
    let when = |v: &Value| {
        let secs = v.as_u64().unwrap_or(0);
        let (days, rest) = (secs / 86_400, secs % 86_400);
        format!("{days}d{:02}:{:02}:{:02} since epoch", rest / 3600, rest % 3600 / 60, rest % 60)
    };
    let rows: Vec<Vec<String>> = view
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                text(&c["identity"]),
                text(&c["serial"]),
                when(&c["not_before_unix"]),
                when(&c["not_after_unix"]),
                format!("{}s", c["renews_in_seconds"].as_u64().unwrap_or(0)),
                format!("{} certificates", c["chain"].as_array().map_or(0, Vec::len)),
            ]
        })
        .collect();
    Ok(table(&["IDENTITY", "SERIAL", "NOT BEFORE", "NOT AFTER", "ROTATES IN", "CHAIN"], &rows))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigView {
    Services,
    Routes,
    Faults,
    Gateways,
}

fn join(v: &Value) -> String {
    match v.as_array() {
        Some(items) if !items.is_empty() => items.iter().map(text).collect::<Vec<_>>().join(","),
        _ => "-".into(),
    }
}

/// Each destination with its share of traffic (weights are relative, as in Istio).
fn destinations(v: &Value) -> String {
    let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
    let total: u64 = items.iter().filter_map(|d| d["weight"].as_u64()).sum();
    items
        .iter()
        .map(|d| {
            let subset = d["subset"].as_str().map(|s| format!("/{s}")).unwrap_or_default();
            let weight = d["weight"].as_u64().unwrap_or(0);
            let share = if total == 0 { 0.0 } else { weight as f64 * 100.0 / total as f64 };
            format!("{}{subset}:{share:.0}%", text(&d["service"]))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A percentage as written: `30`, `12.5`.
fn percent(value: &Value) -> String {
    value.as_f64().map(|p| format!("{p}")).unwrap_or_else(|| text(value))
}

/// The namespace of an origin as the views print it: `VirtualService bookinfo/reviews (generation 2)`.
fn origin_namespace(origin: &Value) -> Option<&str> {
    origin.as_str()?.split(' ').nth(1)?.split_once('/').map(|(namespace, _)| namespace)
}

/// Fails when `--pod` is given to a view that is not per pod.
fn only_namespace(scope: &Scope, view: &str) -> Result<()> {
    if let Some(pod) = &scope.pod {
        bail!("--pod {pod}: {view} is not per pod; use --namespace");
    }
    Ok(())
}

/// The pushed tables, one view at a time; the header line says which version and whether the stream is up.
/// `--namespace` keeps what Istio objects of that namespace (or its Services) made.
pub fn config(args: &ViewArgs, what: ConfigView) -> Result<String> {
    let key = match what {
        ConfigView::Services => "services",
        ConfigView::Routes => "routes",
        ConfigView::Faults => "faults",
        ConfigView::Gateways => "gateways",
    };
    if what != ConfigView::Gateways {
        only_namespace(&args.scope, key)?;
    }
    let mut view = fetch_from(&args.agent(), "/config")?;
    if what == ConfigView::Gateways {
        retain(&mut view[key], |item| item["pod"].as_str().is_some_and(|pod| args.scope.admits_pod(pod)));
    } else if let Some(namespace) = &args.scope.namespace {
        retain(&mut view[key], |item| origin_namespace(&item["origin"]) == Some(namespace.as_str()));
    }
    let selected = serde_json::json!({"version": view["version"], "push": view["push"], key: view[key]});
    if let Some(text) = structured(&selected, args.output) {
        return text;
    }
    let push = &view["push"];
    let mut out = if push.is_null() {
        format!("version {} (no controller configured)\n", text(&view["version"]))
    } else {
        let state =
            if push["connected"] == Value::Bool(true) { "connected" } else { "disconnected, serving the last version" };
        let nack = push["lastNack"].as_str().map(|n| format!("; last NACK: {n}")).unwrap_or_default();
        format!("version {} from {} ({state}){nack}\n", text(&view["version"]), text(&push["controller"]))
    };
    let items = view[key].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = match what {
        ConfigView::Services => items
            .iter()
            .flat_map(|s| {
                let routes = s["l4Routes"].as_array().cloned().unwrap_or_default();
                let base = vec![text(&s["name"]), join(&s["vips"]), text(&s["endpoints"]), join(&s["subsets"])];
                let origin = text(&s["origin"]);
                if routes.is_empty() {
                    return vec![[base, vec!["-".into(), "-".into(), origin]].concat()];
                }
                routes
                    .iter()
                    .map(|r| {
                        let route_origin = r["origin"].as_str().map(String::from).unwrap_or_else(|| origin.clone());
                        [base.clone(), vec![text(&r["vip"]), destinations(&r["destinations"]), route_origin]].concat()
                    })
                    .collect()
            })
            .collect(),
        ConfigView::Routes => items
            .iter()
            .flat_map(|r| {
                let rules = r["http"].as_array().cloned().unwrap_or_default().into_iter().enumerate().map(|(i, h)| {
                    let matched = if h["matches"].as_array().is_some_and(|m| !m.is_empty()) {
                        h["matches"].to_string()
                    } else {
                        "*".into()
                    };
                    (format!("http[{i}]"), matched, destinations(&h["destinations"]))
                });
                let tcp = r["tcp"].as_array().cloned().unwrap_or_default().into_iter().enumerate().map(|(i, t)| {
                    (
                        format!("tcp[{i}]"),
                        t["port"].as_u64().map(|p| format!("port {p}")).unwrap_or("*".into()),
                        destinations(&t["destinations"]),
                    )
                });
                rules
                    .chain(tcp)
                    .map(|(rule, matched, to)| vec![join(&r["hosts"]), rule, matched, to, text(&r["origin"])])
                    .collect::<Vec<_>>()
            })
            .collect(),
        ConfigView::Faults => items
            .iter()
            .map(|f| {
                let fault = &f["fault"];
                let delay = fault["delayMs"]
                    .as_u64()
                    .map(|ms| format!("{ms}ms @{}%", percent(&fault["delayPercent"])))
                    .unwrap_or("-".into());
                let abort = match (fault["abortHttpStatus"].as_u64(), fault["abortGrpcStatus"].as_u64()) {
                    (_, Some(code)) => format!("grpc-status {code} @{}%", percent(&fault["abortPercent"])),
                    (Some(status), None) => format!("{status} @{}%", percent(&fault["abortPercent"])),
                    _ if fault["abortConnect"] == Value::Bool(true) => {
                        format!("ECONNREFUSED @{}%", percent(&fault["abortPercent"]))
                    }
                    _ => "-".into(),
                };
                vec![join(&f["services"]), text(&f["rule"]), delay, abort, f["matches"].to_string(), text(&f["origin"])]
            })
            .collect(),
        ConfigView::Gateways => items
            .iter()
            .flat_map(|g| {
                let servers = g["servers"].as_array().cloned().unwrap_or_default();
                servers
                    .into_iter()
                    .map(|s| {
                        let tls = match (s["tls"].as_str(), s["credential"].as_str()) {
                            (Some(mode), Some(credential)) => format!("{mode} {credential}"),
                            (Some(mode), None) => mode.to_string(),
                            _ => "-".into(),
                        };
                        let status = s["refused"].as_str().map(|r| format!("refused: {r}")).unwrap_or("serving".into());
                        vec![
                            text(&g["pod"]),
                            text(&s["port"]),
                            format!("{} {}", text(&s["gateway"]), text(&s["server"])),
                            text(&s["protocol"]),
                            join(&s["hosts"]),
                            tls,
                            join(&s["virtualServices"]),
                            status,
                        ]
                    })
                    .collect::<Vec<_>>()
            })
            .collect(),
    };
    out += &match what {
        ConfigView::Services => {
            table(&["SERVICE", "VIPS", "ENDPOINTS", "SUBSETS", "VIP:PORT", "L4 ROUTE", "FROM"], &rows)
        }
        ConfigView::Routes => table(&["HOSTS", "RULE", "MATCH", "DESTINATIONS", "FROM"], &rows),
        ConfigView::Faults => table(&["SERVICES", "RULE", "DELAY", "ABORT", "MATCH", "FROM"], &rows),
        ConfigView::Gateways => table(&["POD", "PORT", "GATEWAY", "PROTOCOL", "HOSTS", "TLS", "VIRTUAL SERVICES", "STATUS"], &rows),
    };
    Ok(out)
}

/// `inspect policies [--hits]`: per local workload, the policies in evaluation order; then what the kernel
/// refuses (plaintext clients, by source prefix).
pub fn policies(args: &ViewArgs, hits: bool) -> Result<String> {
    let mut view: PoliciesView =
        serde_json::from_value(fetch_from(&args.agent(), "/policies")?).context("the agent's /policies")?;
    view.workloads.retain(|w| args.scope.admits_pod(&w.workload));
    if let Some(text) = structured(&view, args.output) {
        return text;
    }
    let mut out = format!("version {}\n", view.version);
    let mut rows = Vec::new();
    for workload in &view.workloads {
        for (order, p) in workload.policies.iter().enumerate() {
            let action =
                if p.policy == "-" { "ALLOW (none matched: deny)".to_string() } else { p.action.as_str().to_string() };
            let mut row =
                vec![workload.workload.clone(), (order + 1).to_string(), p.policy.clone(), action, p.rules.to_string()];
            if hits {
                row.extend([p.hits.allowed.to_string(), p.hits.denied.to_string(), p.hits.audited.to_string()]);
            }
            rows.push(row);
        }
    }
    let mut headers = vec!["WORKLOAD", "ORDER", "POLICY", "ACTION", "RULES"];
    if hits {
        headers.extend(["ALLOWED", "DENIED", "AUDITED"]);
    }
    out += &table(&headers, &rows);
    let refused: Vec<String> = view
        .kernel
        .iter()
        .filter(|k| !k.allowed)
        .map(|k| {
            let port = k.port.map(|p| p.to_string()).unwrap_or_else(|| "*".into());
            let by = if k.decided_by == "-" { "no ALLOW policy matches" } else { &k.decided_by };
            format!("{}:{port} from {} ({by})", k.destination, k.source)
        })
        .collect();
    out += &format!(
        "refused in the kernel (L4_AUTHZ): {}\n",
        if refused.is_empty() { "-".into() } else { refused.join(", ") }
    );
    Ok(out)
}

/// `inspect graph`: the node's live workload graph from the agent's own flow data — per source workload,
/// its edges with rate, error ratio, p99 and mTLS. `--namespace` keeps edges with either end in it.
pub fn graph(args: &ViewArgs) -> Result<String> {
    let value = fetch_from(&args.agent(), "/graph")?;
    let mut graph: FlowGraph = serde_json::from_value(value).map_err(|e| anyhow::anyhow!("the agent's /graph: {e}"))?;
    if let Some(namespace) = &args.scope.namespace {
        graph.edges.retain(|e| &e.source.namespace == namespace || &e.destination.namespace == namespace);
    }
    if let Some(text) = structured(&graph, args.output) {
        return text;
    }
    Ok(draw_graph(&graph))
}

/// `inspect endpoints`: per cluster its endpoints and pool, as the agent's `/endpoints` has them.
/// `--namespace` keeps the services of that namespace.
pub fn endpoints(args: &ViewArgs) -> Result<String> {
    let value = fetch_from(&args.agent(), "/endpoints")?;
    let mut view: warren_api::admin::EndpointsView =
        serde_json::from_value(value).map_err(|e| anyhow::anyhow!("the agent's /endpoints: {e}"))?;
    if let Some(namespace) = &args.scope.namespace {
        view.clusters.retain(|c| c.service.split('/').next() == Some(namespace.as_str()));
    }
    if let Some(text) = structured(&view, args.output) {
        return text;
    }
    Ok(draw_endpoints(&view))
}

fn draw_endpoints(view: &warren_api::admin::EndpointsView) -> String {
    let mut out = format!("Endpoints (tables v{})\n", view.version);
    if view.clusters.is_empty() {
        return out + "\n(no requests sent yet)\n";
    }
    let limit = |l: Option<u32>| l.map_or("∞".to_string(), |n| n.to_string());
    for c in &view.clusters {
        let (l, o, x) = (&c.limits, &c.open, &c.overflows);
        out += &format!("\n{}  lb {}  outlier detection {}\n", c.name, c.load_balancer, if c.outlier_detection { "on" } else { "off" });
        out += &format!(
            "  pool: connections {}/{} pending {}/{} requests {}/{} retries {}/{}  per connection {}  connect {} ms  idle {} s\n",
            o.connections, limit(l.max_connections), o.pending, limit(l.max_pending_requests), o.requests,
            limit(l.max_requests), o.retries, limit(l.max_retries), limit(l.max_requests_per_connection),
            l.connect_timeout_ms, l.idle_timeout_ms / 1000
        );
        out += &format!(
            "  overflow (503 UO): connections {} pending {} requests {} retries {}   retry budget {}: {} retries / {} requests, {} refused\n",
            x.connections, x.pending, x.requests, x.retries, c.retry_budget.policy, c.retry_budget.window_retries,
            c.retry_budget.window_requests, c.retry_budget.refused
        );
        out += &format!("  {:<40} {:<20} {:<8} {:>8} {:>6} {:>9} {:>9}\n", "ENDPOINT", "LOCALITY", "HEALTH", "PRIORITY", "ACTIVE", "REQUESTS", "FAILURES");
        for e in &c.endpoints {
            let health = match e.ejected_for_ms {
                Some(ms) => format!("EJECTED {:.1}s ×{}", ms as f64 / 1000.0, e.times_ejected),
                None => e.health.clone(),
            };
            let priority = e.priority.map_or("-".to_string(), |p| p.to_string());
            let locality = e.locality.as_deref().unwrap_or("-");
            out += &format!(
                "  {:<40} {:<20} {:<8} {:>8} {:>6} {:>9} {:>9}\n",
                e.address, locality, health, priority, e.active, e.requests, e.failures
            );
        }
    }
    out
}

fn draw_graph(graph: &FlowGraph) -> String {
    let edges = FlowGraph::deduplicated(graph.edges.clone());
    let mut out = format!("Live service graph of node {} (last {} s, from its agent's traffic)\n", graph.node, graph.window_seconds);
    if edges.is_empty() {
        return out + "\n(no traffic in the window)\n";
    }
    let mut sources: Vec<&WorkloadRef> = edges.iter().map(|e| &e.source).collect();
    sources.dedup();
    for source in sources {
        out += &format!("\n{source}\n");
        let from: Vec<&FlowEdge> = edges.iter().filter(|e| &e.source == source).collect();
        for (i, edge) in from.iter().enumerate() {
            let branch = if i + 1 == from.len() { "└─▶" } else { "├─▶" };
            out += &format!(" {branch} {}\n", describe(edge));
        }
    }
    out
}

fn describe(edge: &FlowEdge) -> String {
    let protocol = match edge.protocol {
        FlowProtocol::Http => "http",
        FlowProtocol::Grpc => "grpc",
        FlowProtocol::Tcp => "tcp",
    };
    let unit = if edge.protocol == FlowProtocol::Tcp { "conn/s" } else { "req/s" };
    let p99 = edge.p99_ms.map(|ms| format!("  p99 {ms:.1} ms")).unwrap_or_default();
    let security = if edge.mtls { "mTLS" } else { "plaintext" };
    format!(
        "{}  via {}  {protocol}  {security}  {:.2} {unit}  {:.1}% errors{p99}  {:.0} B/s",
        edge.destination,
        edge.service,
        edge.rate,
        edge.error_ratio * 100.0,
        edge.bytes_per_second
    )
}
