//! Distributed tracing across two hops: productpage → reviews → ratings stand-ins, each app passing the
//! trace headers on (as bookinfo's apps do). Every hop gets a client span from the source's agent and a
//! server span from the destination's, exported over OTLP to a receiver in the test, linked parent to
//! child; the headers' sampling decision is honoured (an unsampled trace exports nothing).
//!
//! The mesh alternates nodes so that each hop crosses them: node-1 has `sleep` (the client) and
//! `reviews`, node-2 `productpage` and `ratings`.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use warren_e2e::{directory_mesh_with, eventually, log_tail, namespace_yaml, pod_yaml};
use warren_testbed::{
    AgentOptions, AppOptions, HttpRequests, Testbed, Upstream, otlp::OtlpReceiver, otlp::ReceivedSpan, require_privileges,
};

const PRODUCTPAGE: &str = "10.96.4.10:9080";
const REVIEWS: &str = "10.96.4.11:9080";
const RATINGS: &str = "10.96.4.12:9080";

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{clusterIP: {ip}, selector: {{app: {name}}}, ports: [{{name: http, port: 9080, targetPort: 9080}}]}}\n---\n"
    )
}

/// The spans of `trace` the receiver has, once there are `count`.
fn spans_of(receiver: &OtlpReceiver, trace: &str, count: usize) -> Result<Vec<ReceivedSpan>> {
    let mut last = vec![];
    eventually(Duration::from_secs(10), || {
        last = receiver.spans().into_iter().filter(|s| s.trace_id == trace).collect();
        (last.len() >= count).then_some(())
    })
    .with_context(|| format!("{} of {count} spans of trace {trace}: {last:#?}", last.len()))?;
    Ok(last)
}

/// The span whose parent is `parent` (exactly one).
fn child<'a>(spans: &'a [ReceivedSpan], parent: &str) -> Result<&'a ReceivedSpan> {
    let children: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.parent_span_id == parent).collect();
    ensure!(children.len() == 1, "one child of {parent}: {children:#?}");
    Ok(children[0])
}

#[test]
fn two_hops_give_linked_client_and_server_spans_from_both_agents() -> Result<()> {
    require_privileges!(Ok(()));
    let receiver = OtlpReceiver::start()?;
    let bed = Testbed::new("tracing")?;
    let (n1, n2) = (bed.add_node("node-1")?, bed.add_node("node-2")?);
    let sleep = n1.add_pod("sleep", true)?;
    let reviews = n1.add_pod("reviews", true)?;
    let productpage = n2.add_pod("productpage", true)?;
    let ratings = n2.add_pod("ratings", true)?;
    let _apps = [
        productpage.serve_app(&AppOptions::new("productpage", "v1").call(Upstream::new("reviews", REVIEWS.parse()?)))?,
        reviews.serve_app(&AppOptions::new("reviews", "v1").call(Upstream::new("ratings", RATINGS.parse()?)))?,
        ratings.serve_app(&AppOptions::new("ratings", "v1"))?,
    ];
    let dir = bed.state_dir().join("mesh-config");
    std::fs::create_dir_all(&dir)?;
    let objects = [
        namespace_yaml("default"),
        service("productpage", "10.96.4.10"),
        service("reviews", "10.96.4.11"),
        service("ratings", "10.96.4.12"),
        pod_yaml(&sleep, "node-1", "app: sleep"),
        pod_yaml(&reviews, "node-1", "app: reviews, version: v1"),
        pod_yaml(&productpage, "node-2", "app: productpage, version: v1"),
        pod_yaml(&ratings, "node-2", "app: ratings, version: v1"),
    ];
    std::fs::write(dir.join("00-mesh.yaml"), objects.concat())?;
    for node in [&n1, &n2] {
        node.reach_host_port(receiver.address.port())?;
    }
    // Only traces the headers say are sampled: requests without a parent start none (0 %).
    let endpoint = format!("http://127.0.0.1:{}", receiver.address.port());
    let telemetry = serde_json::json!({"tracing": {"endpoint": endpoint, "samplingPercent": 0}});
    let options = AgentOptions { ebpf_log_level: "info", telemetry: Some(telemetry), ..Default::default() };
    let (controller, agents) = directory_mesh_with(&bed, &dir, &[&n1, &n2], options)?;
    let steps = || -> Result<()> {
        for agent in &agents {
            agent.wait_config(Duration::from_secs(15), |c| c.to_string().contains("default/ratings"))?;
        }
        agents[0].wait_enrolled(&sleep, true, Duration::from_secs(15))?;
        agents[1].wait_enrolled(&ratings, true, Duration::from_secs(15))?;

        let (trace, root) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
        let sampled = HttpRequests::get("/", 1).header("traceparent", &format!("00-{trace}-{root}-01"));
        let page = sleep.http(PRODUCTPAGE.parse()?, &sampled)?.remove(0);
        ensure!(page.status == 200, "the page: {page:?}");
        let spans = spans_of(&receiver, trace, 6)?;
        ensure!(spans.len() == 6, "two spans per hop, three hops: {spans:#?}");
        // sleep → productpage → reviews → ratings: client (source's node) then server (destination's).
        let hops = [("productpage", "node-1", "node-2"), ("reviews", "node-2", "node-1"), ("ratings", "node-1", "node-2")];
        let mut parent = root.to_string();
        for (service, source_node, destination_node) in hops {
            let client = child(&spans, &parent)?;
            ensure!(client.kind == "client" && client.resource["host.name"] == source_node, "{service} client: {client:#?}");
            ensure!(client.name.ends_with("/*"), "spans are named as Envoy names them: {client:#?}");
            let server = child(&spans, &client.span_id)?;
            ensure!(server.kind == "server" && server.resource["host.name"] == destination_node, "{service} server: {server:#?}");
            ensure!(server.attributes["istio.destination_workload"] == service, "{service}: {server:#?}");
            ensure!(server.attributes["http.response.status_code"] == "200", "{server:#?}");
            parent = server.span_id.clone();
        }

        // Control: the same request unsampled (flags 00) exports no span; B3 headers are honoured alike.
        let unsampled_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
        let unsampled = HttpRequests::get("/", 1).header("traceparent", &format!("00-{unsampled_trace}-{root}-00"));
        ensure!(sleep.http(PRODUCTPAGE.parse()?, &unsampled)?[0].status == 200, "unsampled page");
        let b3 = HttpRequests::get("/", 1)
            .header("x-b3-traceid", "463ac35c9f6413ad")
            .header("x-b3-spanid", "a2fb4a1d1a96d312")
            .header("x-b3-sampled", "1");
        ensure!(sleep.http(PRODUCTPAGE.parse()?, &b3)?[0].status == 200, "B3 page");
        let b3_spans = spans_of(&receiver, "0000000000000000463ac35c9f6413ad", 6)?;
        ensure!(child(&b3_spans, "a2fb4a1d1a96d312")?.kind == "client", "B3's span is the first client span's parent");
        ensure!(receiver.spans().iter().all(|s| s.trace_id != unsampled_trace), "an unsampled trace exports nothing");
        Ok(())
    };
    steps().map_err(|e| {
        e.context(format!(
            "node-1 agent:\n{}\n\nnode-2 agent:\n{}\n\ncontroller:\n{}",
            log_tail(&agents[0].log(), 30),
            log_tail(&agents[1].log(), 30),
            log_tail(&controller.log(), 20)
        ))
    })
}
