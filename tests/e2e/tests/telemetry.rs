//! Istio's telemetry from both agents of every request and connection, checked against known traffic:
//! `istio_requests_total` and the histograms for HTTP (HBONE and plaintext), gRPC, `istio_tcp_*` for L4,
//! bytes counted while a connection is open, the exposition accepted by `promtool check metrics`, and
//! the JSON access log (the same `x-request-id` on both agents, `FI` for a fault, the policy for a denial).
//!
//! The mesh: on node-1 the client `sleep` (a Deployment's pod: its ReplicaSet owns it) and `outsider` (not
//! enrolled: plaintext); on node-2 `web-v1` (HTTP on 9080 behind `web:80`) and `echo` (TCP 7000 behind
//! `echo:7000`).
use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result, ensure};
use warren_e2e::{apply_config, directory_mesh, eventually, mesh_logs, namespace_yaml, pod_yaml, promtool};
use warren_testbed::{
    Agent, AppOptions, Controller, HttpRequests, Load, Node, Pod, Process, Testbed, prometheus::Prometheus, require_privileges,
    sum_metric,
};

const WEB: &str = "10.96.3.10:80";
const ECHO: &str = "10.96.3.11:7000";
/// A second service of web-v1's on the same port: which one a request was for, the destination's agent
/// learns from the source's.
const WEB_ALIAS: &str = "10.96.3.13:80";
/// A service with no endpoints: the proxy answers 503 `UH`.
const NOBODY: &str = "10.96.3.12:80";
const WEB_HOST: &str = "web.default.svc.cluster.local";
const SLEEP_PRINCIPAL: &str = "spiffe://cluster.local/ns/default/sa/sleep";

const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
    spec: {clusterIP: 10.96.3.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 9080}]}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\n\
    spec: {clusterIP: 10.96.3.11, selector: {app: echo}, ports: [{name: tcp-echo, port: 7000, targetPort: 7000}]}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: web-alias, namespace: default}\n\
    spec: {clusterIP: 10.96.3.13, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 9080}]}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: nobody, namespace: default}\n\
    spec: {clusterIP: 10.96.3.12, selector: {app: nobody}, ports: [{name: http, port: 80, targetPort: 9080}]}\n---\n";

struct Mesh {
    _bed: Testbed,
    dir: std::path::PathBuf,
    controller: Controller,
    /// node-1 (the clients'), node-2 (the servers').
    nodes: [Node; 2],
    agents: [Agent; 2],
    sleep: Pod,
    outsider: Pod,
    web: Pod,
    _apps: Vec<Process>,
}

/// `sleep` as a Deployment's pod: owned by ReplicaSet `sleep-5f7b9c` with that `pod-template-hash`.
fn deployment_pod_yaml(pod: &Pod, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-5f7b9c-x2x4p, namespace: default, uid: {uid}, \
         labels: {{app: sleep, pod-template-hash: 5f7b9c}}, \
         ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: sleep-5f7b9c, uid: rs-1, controller: true}}]}}\n\
         spec: {{nodeName: {node}, serviceAccountName: sleep, containers: [{{name: app, image: testapp}}]}}\n\
         status: {{phase: Running, podIP: {ip}}}\n---\n",
        name = pod.name,
        uid = pod.uid,
        ip = pod.ip
    )
}

fn mesh(label: &str) -> Result<Mesh> {
    let bed = Testbed::new(label)?;
    let (n1, n2) = (bed.add_node("node-1")?, bed.add_node("node-2")?);
    let sleep = n1.add_pod("sleep", true)?;
    let outsider = n1.add_pod("outsider", false)?;
    let web = n2.add_pod("web-v1", true)?;
    let echo = n2.add_pod("echo", true)?;
    let apps = vec![web.serve_app(&AppOptions::new("web", "v1"))?, echo.serve_echo(7000)?];
    let dir = bed.state_dir().join("mesh-config");
    std::fs::create_dir_all(&dir)?;
    let pods = [
        deployment_pod_yaml(&sleep, "node-1"),
        pod_yaml(&outsider, "node-1", "app: outsider, warren.dev/mesh: disabled"),
        pod_yaml(&web, "node-2", "app: web, version: v1"),
        pod_yaml(&echo, "node-2", "app: echo"),
    ];
    std::fs::write(dir.join("00-mesh.yaml"), format!("{}{SERVICES}{}", namespace_yaml("default"), pods.concat()))?;
    let (controller, agents) = directory_mesh(&bed, &dir, &[&n1, &n2])?;
    let agents: [Agent; 2] = agents.try_into().map_err(|_| anyhow::anyhow!("two agents"))?;
    agents[1].wait_enrolled(&web, true, Duration::from_secs(15))?;
    for agent in &agents {
        agent.wait_config(Duration::from_secs(15), |c| c.to_string().contains("default/echo"))?;
    }
    agents[0].wait_uid_enrolled(&sleep.uid, true, Duration::from_secs(15))?;
    Ok(Mesh { _bed: bed, dir, controller, nodes: [n1, n2], agents, sleep, outsider, web, _apps: apps })
}

fn scenario(label: &str, steps: impl FnOnce(&Mesh) -> Result<()>) -> Result<()> {
    let mesh = mesh(label)?;
    steps(&mesh).map_err(|e| e.context(mesh_logs(&mesh.agents, &mesh.controller)))
}

impl Mesh {
    fn apply(&self, name: &str, yaml: &str) -> Result<()> {
        apply_config(&self.dir, &self.agents, name, yaml)
    }
}

/// The sum of `name`'s series on `agent`'s Prometheus endpoint whose labels include `labels`, once it
/// equals `want` (requests are counted when their response ends, which the client saw a moment before).
fn settles(agent: &Agent, name: &str, labels: &[(&str, &str)], want: f64) -> Result<()> {
    let mut last = f64::NAN;
    let reached = eventually(Duration::from_secs(5), || {
        last = sum_metric(&agent.scrape("/stats/prometheus").ok()?, name, labels);
        (last == want).then_some(())
    });
    reached.with_context(|| format!("{name}{labels:?}: {last}, want {want}"))
}

const HTTP_SERIES: [(&str, &str); 6] = [
    ("source_workload", "sleep"),
    ("source_workload_namespace", "default"),
    ("destination_workload", "web-v1"),
    ("destination_service", WEB_HOST),
    ("destination_service_name", "web"),
    ("request_protocol", "http"),
];

/// Known HTTP traffic over HBONE: 5 POSTs of 64 bytes answered 200 with 100 bytes, 3 GETs answered 503 —
/// counted exactly, by both agents, with every label Istio writes; a plaintext client's requests are
/// reported by the destination only, as `none`.
#[test]
fn both_agents_report_every_request_with_istios_labels() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("telemetry-http", |mesh| {
        // Control: nothing is reported before any traffic.
        settles(&mesh.agents[0], "istio_requests_total", &HTTP_SERIES, 0.0)?;
        let empty = mesh.agents[0].inspect_live(&["graph"])?;
        ensure!(empty.contains("(no traffic in the window)"), "inspect graph before traffic:\n{empty}");
        let posts = HttpRequests { method: "POST".into(), body_bytes: 64, ..HttpRequests::get("/bytes/100", 5) };
        let ok = mesh.sleep.http(WEB.parse()?, &posts)?;
        ensure!(ok.iter().all(|r| r.status == 200), "POST /bytes/100: {ok:?}");
        let failed = mesh.sleep.http(WEB.parse()?, &HttpRequests::get("/status/503", 3))?;
        ensure!(failed.iter().all(|r| r.status == 503), "GET /status/503: {failed:?}");

        for (agent, reporter) in [(&mesh.agents[0], "source"), (&mesh.agents[1], "destination")] {
            let series = |code: &'static str| {
                let mut labels = HTTP_SERIES.to_vec();
                labels.extend([("reporter", reporter), ("response_code", code), ("response_flags", "-")]);
                labels.extend([("connection_security_policy", "mutual_tls"), ("source_principal", SLEEP_PRINCIPAL)]);
                labels.extend([("source_canonical_service", "sleep"), ("source_canonical_revision", "latest")]);
                labels.extend([("destination_app", "web"), ("destination_version", "v1"), ("source_version", "unknown")]);
                labels.extend([("destination_principal", "spiffe://cluster.local/ns/default/sa/web-v1")]);
                labels.extend([("source_cluster", "Kubernetes"), ("grpc_response_status", "unknown")]);
                labels
            };
            settles(agent, "istio_requests_total", &series("200"), 5.0)?;
            settles(agent, "istio_requests_total", &series("503"), 3.0)?;
            settles(agent, "istio_request_duration_milliseconds_count", &series("200"), 5.0)?;
            settles(agent, "istio_request_bytes_sum", &series("200"), 5.0 * 64.0)?;
            settles(agent, "istio_response_bytes_sum", &series("200"), 5.0 * 100.0)?;
            // Istio's buckets: every 100-byte answer is in le="250" and none in le="10".
            settles(agent, "istio_response_bytes_bucket", &[series("200").as_slice(), &[("le", "250.0")]].concat(), 5.0)?;
            settles(agent, "istio_response_bytes_bucket", &[series("200").as_slice(), &[("le", "10.0")]].concat(), 0.0)?;
        }
        // The node's graph from the agent's own flow data: the edge, its protocol, mTLS, 3 of 8 failed.
        let drawn = mesh.agents[0].inspect_live(&["graph"])?;
        let edge = format!("└─▶ web-v1.default  via {WEB_HOST}  http  mTLS  ");
        ensure!(drawn.contains("\nsleep.default\n") && drawn.contains(&edge) && drawn.contains("37.5% errors  p99 "), "inspect graph:\n{drawn}");
        let json: serde_json::Value = serde_json::from_str(&mesh.agents[1].inspect_live(&["graph", "-o", "json"])?)?;
        let edges = json["edges"].as_array().context("edges")?;
        ensure!(edges.iter().any(|e| e["reporter"] == "destination" && e["source"]["name"] == "sleep" && e["destination"]["name"] == "web-v1"), "{json:#}");

        // The same pod through another service, addressed by IP (no Host naming it): the destination's
        // agent reports the service the source's routed to, and the workload never sees how it learnt it.
        let alias = mesh.sleep.http(WEB_ALIAS.parse()?, &HttpRequests::get("/", 2))?;
        ensure!(alias.iter().all(|r| r.status == 200), "web-alias: {alias:?}");
        let headers = alias[0].app().context("an app answer")?.headers;
        ensure!(!headers.contains_key("x-warren-destination-service"), "the agents' header is removed: {headers:?}");
        for (agent, reporter) in [(&mesh.agents[0], "source"), (&mesh.agents[1], "destination")] {
            let labels = [("reporter", reporter), ("destination_service_name", "web-alias"), ("destination_workload", "web-v1")];
            settles(agent, "istio_requests_total", &labels, 2.0)?;
        }

        // Plaintext from outside the mesh: only the destination reports it, as `none`, principals unknown.
        let plain = mesh.outsider.http(format!("{}:9080", mesh.web.ip).parse()?, &HttpRequests::get("/bytes/10", 2))?;
        ensure!(plain.iter().all(|r| r.status == 200), "plaintext GET: {plain:?}");
        let labels = [
            ("reporter", "destination"),
            ("destination_workload", "web-v1"),
            ("connection_security_policy", "none"),
            ("source_principal", "unknown"),
            ("response_code", "200"),
        ];
        settles(&mesh.agents[1], "istio_requests_total", &labels, 2.0)?;
        settles(&mesh.agents[0], "istio_requests_total", &[("source_workload", "outsider")], 0.0)?;

        // gRPC: the protocol, the status from the trailers, the messages.
        let grpc = HttpRequests { http2: true, body_bytes: 5, ..HttpRequests::get("/echo.Echo/Say", 2) }
            .header("content-type", "application/grpc");
        let answers = mesh.sleep.http(WEB.parse()?, &grpc)?;
        ensure!(answers.iter().all(|r| r.status == 200), "gRPC: {answers:?}");
        let grpc_series = [("reporter", "source"), ("request_protocol", "grpc"), ("grpc_response_status", "0")];
        settles(&mesh.agents[0], "istio_requests_total", &grpc_series, 2.0)?;
        settles(&mesh.agents[0], "istio_response_messages_total", &grpc_series, 2.0)?;
        settles(&mesh.agents[0], "istio_request_messages_total", &grpc_series, 2.0)?;
        Ok(())
    })
}

/// L4: a TCP service's connection counted by both agents, its bytes counted while it is still open.
#[test]
fn tcp_connections_are_reported_by_both_agents_while_they_flow() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("telemetry-tcp", |mesh| {
        let series = |reporter: &'static str| {
            vec![
                ("reporter", reporter),
                ("source_workload", "sleep"),
                ("destination_workload", "echo"),
                ("destination_service", "echo.default.svc.cluster.local"),
                ("request_protocol", "tcp"),
                ("connection_security_policy", "mutual_tls"),
            ]
        };
        settles(&mesh.agents[0], "istio_tcp_connections_opened_total", &series("source"), 0.0)?;
        // 200000 bytes (in 64 KiB writes), held open for 3 s halfway: the first half is in the metrics
        // before the close.
        let (sleep, to) = (mesh.sleep.clone(), ECHO.parse()?);
        let held = std::thread::spawn(move || sleep.send_holding(to, 200_000, Duration::from_secs(3)));
        for (agent, reporter) in [(&mesh.agents[0], "source"), (&mesh.agents[1], "destination")] {
            let flowing = eventually(Duration::from_secs(3), || {
                let text = agent.scrape("/stats/prometheus").ok()?;
                let sent = sum_metric(&text, "istio_tcp_sent_bytes_total", &series(reporter));
                let closed = sum_metric(&text, "istio_tcp_connections_closed_total", &series(reporter));
                (sent >= 100_000.0 && closed == 0.0).then_some(sent)
            });
            let tcp: Vec<String> = agent.scrape("/stats/prometheus")?.lines().filter(|l| l.starts_with("istio_tcp")).map(str::to_string).collect();
            ensure!(flowing.is_some(), "{reporter}: bytes are counted while the connection is open: {tcp:#?}");
        }
        let result = held.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
        ensure!(result.ok && result.received == 200_000, "echoed: {result:?}");
        for (agent, reporter) in [(&mesh.agents[0], "source"), (&mesh.agents[1], "destination")] {
            settles(agent, "istio_tcp_connections_opened_total", &series(reporter), 1.0)?;
            settles(agent, "istio_tcp_connections_closed_total", &series(reporter), 1.0)?;
            settles(agent, "istio_tcp_sent_bytes_total", &series(reporter), 200_000.0)?;
            settles(agent, "istio_tcp_received_bytes_total", &series(reporter), 200_000.0)?;
        }
        Ok(())
    })
}

/// `promtool check metrics` on an agent's exposition after traffic. The only finding it may have is the
/// base-unit lint on Istio's own `istio_request_duration_milliseconds` (Istio's name, which its proxies
/// trip alike); a malformed exposition fails it (the control).
#[test]
fn promtool_accepts_the_exposition() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("telemetry-promtool", |mesh| {
        let answers = mesh.sleep.http(WEB.parse()?, &HttpRequests::get("/bytes/10", 3))?;
        ensure!(answers.iter().all(|r| r.status == 200), "{answers:?}");
        settles(&mesh.agents[1], "istio_requests_total", &[("reporter", "destination")], 3.0)?;
        for agent in &mesh.agents {
            let text = agent.scrape("/stats/prometheus")?;
            ensure!(text.contains("# TYPE istio_requests_total counter"), "Prometheus' text format: {}", &text[..text.len().min(400)]);
            let problems = promtool(&text)?;
            let unexpected: Vec<&str> = problems.iter().map(String::as_str).filter(|p| !p.contains("use base unit \"seconds\"")).collect();
            ensure!(unexpected.is_empty(), "promtool: {unexpected:?}");
            ensure!(agent.scrape("/metrics")? .contains("istio_requests_total"), "/metrics serves the same");
        }
        // Warren's own state metrics: map fill, the tables' version and the push stream, certificates.
        let text = mesh.agents[0].scrape("/stats/prometheus")?;
        let value = |name: &str, labels: &[(&str, &str)]| sum_metric(&text, name, labels);
        let routes = value("warren_ebpf_map_entries", &[("map", "SERVICE_ROUTES")]);
        ensure!(routes >= 2.0 && value("warren_ebpf_map_fill_ratio", &[("map", "SERVICE_ROUTES")]) == routes / 65536.0, "map fill:\n{text}");
        ensure!(value("warren_config_version", &[]) >= 1.0 && value("warren_push_connected", &[]) == 1.0, "push state:\n{text}");
        ensure!(value("warren_push_updates_applied_total", &[]) >= 1.0, "updates applied:\n{text}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as f64;
        let expiry = value("warren_certificate_expiry_timestamp_seconds", &[("identity", SLEEP_PRINCIPAL)]);
        ensure!(expiry > now && expiry < now + 2.0 * 86400.0, "sleep's certificate expires within its lifetime: {expiry}\n{text}");
        ensure!(value("warren_http_requests_active", &[]) == 0.0 && text.contains("warren_proxy_connections_open "), "gauges:\n{text}");
        let broken = promtool("# TYPE x counter\nx_total{a=\"b} 1\n");
        ensure!(broken.is_err(), "control: a malformed exposition fails promtool: {broken:?}");
        Ok(())
    })
}

/// Access logs: one line per request on each agent with the same `x-request-id`; a fault's line says
/// `FI`; a denied request's says which policy denied it; a TCP connection's line has its bytes.
#[test]
fn access_logs_tell_each_request_on_both_agents() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("telemetry-logs", |mesh| {
        let traced = HttpRequests::get("/bytes/7", 1).header("x-request-id", "telemetry-e2e-1");
        ensure!(mesh.sleep.http(WEB.parse()?, &traced)?[0].status == 200, "GET");
        let line = |agent: &Agent, id: &str| {
            eventually(Duration::from_secs(5), || agent.access_log().into_iter().find(|l| l["request_id"] == id))
        };
        let source = line(&mesh.agents[0], "telemetry-e2e-1").context("the source agent logs the request")?;
        let destination = line(&mesh.agents[1], "telemetry-e2e-1").context("the destination agent logs it")?;
        for (entry, reporter) in [(&source, "source"), (&destination, "destination")] {
            ensure!(entry["reporter"] == reporter && entry["response_code"] == 200 && entry["bytes_sent"] == 7, "{entry}");
            ensure!(entry["method"] == "GET" && entry["path"] == "/bytes/7" && entry["response_flags"] == "-", "{entry}");
            ensure!(entry["source_principal"] == SLEEP_PRINCIPAL && entry["destination_workload"] == "web-v1", "{entry}");
        }
        ensure!(source["upstream_cluster"] == format!("outbound|80||{WEB_HOST}"), "{source}");
        // Control: another request id is not there.
        ensure!(mesh.agents[1].access_log().iter().all(|l| l["request_id"] != "telemetry-e2e-2"), "no such line yet");

        let fault = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: default}\n\
            spec: {hosts: [web], http: [{match: [{headers: {x-fail: {exact: 'yes'}}}], fault: {abort: {httpStatus: 418, percentage: {value: 100}}}, route: [{destination: {host: web}}]}, {route: [{destination: {host: web}}]}]}\n---\n\
            apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-private, namespace: default}\n\
            spec: {selector: {matchLabels: {app: web}}, action: DENY, rules: [{to: [{operation: {paths: ['/private*']}}]}]}\n";
        mesh.apply("10-fault-deny.yaml", fault)?;
        let aborted = HttpRequests::get("/", 1).header("x-fail", "yes").header("x-request-id", "telemetry-e2e-2");
        ensure!(mesh.sleep.http(WEB.parse()?, &aborted)?[0].status == 418, "the fault aborts");
        let entry = line(&mesh.agents[0], "telemetry-e2e-2").context("the aborted request is logged")?;
        ensure!(entry["response_flags"] == "FI" && entry["response_code"] == 418, "{entry}");
        let denied = HttpRequests::get("/private/x", 1).header("x-request-id", "telemetry-e2e-3");
        let answer = mesh.sleep.http(WEB.parse()?, &denied)?.remove(0);
        ensure!(answer.status == 403, "the policy denies: {answer:?}");
        let entry = line(&mesh.agents[1], "telemetry-e2e-3").context("the denied request is logged")?;
        ensure!(entry["response_flags"] == "RBAC" && entry["policy"] == "deny default/no-private", "{entry}");

        let sent = mesh.sleep.send(ECHO.parse()?, 1234)?;
        ensure!(sent.ok, "{sent:?}");
        let tcp = eventually(Duration::from_secs(5), || {
            mesh.agents[0].access_log().into_iter().find(|l| l["protocol"] == "TCP" && l["destination_workload"] == "echo")
        })
        .context("the TCP connection is logged")?;
        ensure!(tcp["bytes_received"] == 1234 && tcp["bytes_sent"] == 1234 && tcp["reporter"] == "source", "{tcp}");
        Ok(())
    })
}

/// A real Prometheus scraping both agents answers the PromQL Kiali builds its graph with (HTTP and TCP),
/// a p99 from Istio's duration buckets, and the queries of Istio's Mesh, Service and Workload dashboards
/// (written down here from Istio's dashboards), for the test traffic.
#[test]
fn prometheus_answers_kiali_and_istio_dashboard_queries() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("telemetry-prometheus", |mesh| {
        // Both agents, and the controller (on the host: reached from node-1's loopback).
        let controller_port: u16 = mesh.controller.monitoring_addr.rsplit_once(':').context("an address")?.1.parse()?;
        mesh.nodes[0].reach_host_port(controller_port)?;
        let targets = [
            format!("127.0.0.1:{}", warren_testbed::METRICS_PORT),
            format!("{}:{}", mesh.nodes[1].ip, warren_testbed::METRICS_PORT),
            format!("127.0.0.1:{controller_port}"),
        ];
        let prometheus = Prometheus::start(&mesh.nodes[0], &targets, &mesh.dir.join("../prometheus"))?;
        // Control: no request series before the traffic.
        ensure!(prometheus.query("istio_requests_total")?.is_empty(), "control: no requests yet");
        // Steady traffic while Prometheus scrapes (rate and irate need two samples that differ).
        let load = Load { rps: 50, duration_ms: 8_000, connections: 2, body_bytes: 0, path: "/bytes/100".into(), ..Default::default() };
        let traffic = mesh.sleep.spawn_load(WEB.parse()?, &load)?;
        for _ in 0..4 {
            ensure!(mesh.sleep.send(ECHO.parse()?, 5000)?.ok, "TCP echo");
            ensure!(mesh.sleep.http(NOBODY.parse()?, &HttpRequests::get("/", 1))?[0].status == 503, "no endpoints: 503 UH");
            std::thread::sleep(Duration::from_millis(1500));
        }
        let kiali = "sum(rate(istio_requests_total{reporter=\"source\"}[1m])) by (source_cluster, source_workload_namespace, \
            source_workload, source_canonical_service, source_canonical_revision, destination_cluster, destination_service_namespace, \
            destination_service, destination_service_name, destination_workload_namespace, destination_workload, \
            destination_canonical_service, destination_canonical_revision, request_protocol, response_code, grpc_response_status, \
            response_flags)";
        let edge = [("source_workload", "sleep"), ("destination_workload", "web-v1"), ("destination_service_name", "web"), ("response_code", "200")];
        positive(&prometheus, kiali, &edge)?;
        let kiali_tcp = "sum(rate(istio_tcp_sent_bytes_total{reporter=\"source\"}[1m])) by (source_workload_namespace, source_workload, \
            destination_service_namespace, destination_service_name, destination_workload, response_flags)";
        positive(&prometheus, kiali_tcp, &[("source_workload", "sleep"), ("destination_workload", "echo")])?;
        let p99 = "histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{reporter=\"source\", \
            destination_service_name=\"web\"}[1m])) by (le))";
        let value = positive(&prometheus, p99, &[])?;
        ensure!(value <= 5000.0, "p99 of a local app's answers: {value} ms");
        // Istio's dashboards: Mesh (global request volume, success rate), Service (requests and TCP bytes
        // into a service), Workload (requests into a workload by source, its p50).
        let dashboards = [
            ("mesh volume", "round(sum(irate(istio_requests_total{reporter=\"source\"}[1m])), 0.001)", vec![]),
            ("mesh success rate", "sum(rate(istio_requests_total{reporter=\"source\", response_code!~\"5.*\"}[1m])) / sum(rate(istio_requests_total{reporter=\"source\"}[1m]))", vec![]),
            ("service requests", "sum(irate(istio_requests_total{reporter=\"destination\", destination_service=~\"web.default.svc.cluster.local\"}[1m]))", vec![]),
            ("service TCP bytes", "sum(rate(istio_tcp_received_bytes_total{reporter=\"destination\", destination_service=~\"echo.default.svc.cluster.local\"}[1m]))", vec![]),
            ("workload inbound by source", "sum(irate(istio_requests_total{reporter=\"destination\", destination_workload_namespace=~\"default\", destination_workload=~\"web-v1\"}[1m])) by (source_workload, source_workload_namespace)", vec![("source_workload", "sleep")]),
            ("workload p50", "histogram_quantile(0.50, sum(irate(istio_request_duration_milliseconds_bucket{reporter=\"destination\", destination_workload=\"web-v1\"}[1m])) by (le))", vec![]),
        ];
        for (what, promql, labels) in dashboards {
            positive(&prometheus, promql, &labels).with_context(|| what.to_string())?;
        }
        // Warren's own dashboard (deploy/grafana): every query is valid PromQL and has data.
        let dashboard = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/warren-dashboard.json");
        let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&dashboard)?)?;
        let panels = dashboard["panels"].as_array().context("panels")?;
        let queries: Vec<(&str, &str)> = panels
            .iter()
            .flat_map(|p| p["targets"].as_array().into_iter().flatten().map(move |t| (p["title"].as_str().unwrap_or("?"), t["expr"].as_str().unwrap_or(""))))
            .collect();
        ensure!(queries.len() >= 15, "the dashboard's queries: {queries:?}");
        for (panel, promql) in queries {
            let answered = eventually(Duration::from_secs(10), || prometheus.query(promql).ok().filter(|s| !s.is_empty()));
            ensure!(answered.is_some(), "Warren dashboard, {panel}: {promql} has no data: {:?}", prometheus.query(promql));
        }
        let report = warren_testbed::app::load_report(traffic)?;
        ensure!(report.ok > 0, "the load was answered: {report:?}");
        Ok(())
    })
}

/// The value of the one series of `promql` whose labels include `labels`, once it is positive.
fn positive(prometheus: &Prometheus, promql: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let mut last = vec![];
    let found = eventually(Duration::from_secs(10), || {
        last = prometheus.query(promql).ok()?;
        let series = last.iter().find(|s| labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))?;
        (series.value > 0.0 && series.value.is_finite()).then_some(series.value)
    });
    found.with_context(|| format!("{promql}: no positive series with {labels:?} in {last:?}"))
}

/// The controller's mesh-wide graph page, opened in headless Chromium: the workloads and edges the
/// agents reported (checked in the DOM the page's script built), none before any traffic (the
/// control); a screenshot is kept in `target/test-artifacts/mesh-graph.png`.
#[test]
fn the_controllers_graph_page_draws_the_mesh_in_a_browser() -> Result<()> {
    require_privileges!(Ok(()));
    scenario("telemetry-graph", |mesh| {
        let url = format!("http://{}/graph", mesh.controller.monitoring_addr);
        let before = chromium(&["--dump-dom", &url])?;
        ensure!(before.contains("id=\"graph\"") && !before.contains("class=\"edge"), "control: no edges before traffic:\n{before}");

        ensure!(mesh.sleep.http(WEB.parse()?, &HttpRequests::get("/bytes/10", 10))?.iter().all(|r| r.status == 200), "HTTP");
        ensure!(mesh.sleep.send(ECHO.parse()?, 1000)?.ok, "TCP");
        let json = format!("/graph.json");
        let reported = eventually(Duration::from_secs(10), || {
            let graph: serde_json::Value = serde_json::from_str(&warren_testbed::http_get(&mesh.controller.monitoring_addr, &json).ok()?).ok()?;
            let edges = graph["edges"].as_array()?.clone();
            let has = |to: &str| edges.iter().any(|e| e["source"]["name"] == "sleep" && e["destination"]["name"] == to);
            (has("web-v1") && has("echo") && graph["nodes"].as_array()?.len() == 2).then_some(graph)
        });
        ensure!(reported.is_some(), "both agents' flows reach the controller");

        let dom = chromium(&["--dump-dom", &url])?;
        for workload in ["sleep.default", "web-v1.default", "echo.default"] {
            ensure!(dom.contains(&format!("data-workload=\"{workload}\"")), "{workload} drawn:\n{dom}");
        }
        ensure!(dom.contains("data-source=\"sleep.default\" data-destination=\"web-v1.default\" data-protocol=\"http\""), "the HTTP edge:\n{dom}");
        ensure!(dom.contains("data-source=\"sleep.default\" data-destination=\"echo.default\" data-protocol=\"tcp\""), "the TCP edge:\n{dom}");
        ensure!(dom.contains("class=\"edge mtls\""), "mTLS edges are marked:\n{dom}");

        let artifacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts");
        std::fs::create_dir_all(&artifacts)?;
        let shot = artifacts.join("mesh-graph.png");
        let _ = std::fs::remove_file(&shot);
        chromium(&["--window-size=1200,800", &format!("--screenshot={}", shot.display()), &url])?;
        let png = std::fs::read(&shot).with_context(|| format!("the screenshot {}", shot.display()))?;
        ensure!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a PNG of the page ({} bytes)", png.len());
        Ok(())
    })
}

/// Headless Chromium (Debian's `chromium`) on `args`, after the page's scripts ran: its stdout.
fn chromium(args: &[&str]) -> Result<String> {
    let profile = tempdir("chromium-profile")?;
    let out = std::process::Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stderr(Stdio::null())
        .output()
        .context("chromium (Debian's chromium package; `cargo xtask setup` installs it)")?;
    let _ = std::fs::remove_dir_all(&profile);
    ensure!(out.status.success(), "chromium {args:?}: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tempdir(name: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("warren-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
