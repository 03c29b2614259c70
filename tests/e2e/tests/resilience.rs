//! Resilience end to end, on real HTTP between testbed pods through real agents: retries (a rule's and
//! Istio's default), the retry budget, Istio's circuit-breaking task, outlier detection, load balancing
//! and locality failover. Each scenario first shows the behaviour absent (the control), then present.
//!
//! The mesh: on node-1 the client `sleep` and `web-1`; on node-2 `web-2` and `web-3`. One Service `web`
//! (port 80 `http` → 9080) selects the three web pods; what each one does wrong is the scenario's.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use warren_e2e::{apply_config, directory_mesh, eventually, mesh_logs, namespace_yaml, pod_yaml};
use warren_testbed::{Agent, AppOptions, Controller, HttpRequests, HttpResult, Pod, Process, Testbed, app, require_privileges};

const WEB: &str = "10.96.2.10:80";
const WEBS: [&str; 3] = ["web-1", "web-2", "web-3"];

struct Mesh {
    _bed: Testbed,
    dir: PathBuf,
    controller: Controller,
    agents: Vec<Agent>,
    sleep: Pod,
    pods: BTreeMap<&'static str, Pod>,
    apps: BTreeMap<&'static str, Process>,
    client_labels: &'static str,
}

/// Pod labels of the client and of each web pod (`app: web` puts it in the service; `istio-locality`).
struct Layout {
    client_labels: &'static str,
    web_labels: [&'static str; 3],
}

const PLAIN: Layout = Layout { client_labels: "app: sleep", web_labels: ["app: web", "app: web", "app: web"] };
/// Only web-1 is in the service.
const ONE: Layout = Layout { client_labels: "app: sleep", web_labels: ["app: web", "app: other", "app: other"] };

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
    spec: {clusterIP: 10.96.2.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 9080}]}\n---\n";

/// The mesh, each web pod serving with its options (`None`: nothing listens on it).
fn mesh(label: &str, layout: &Layout, webs: [Option<AppOptions>; 3]) -> Result<Mesh> {
    let bed = Testbed::new(label)?;
    let (n1, n2) = (bed.add_node("node-1")?, bed.add_node("node-2")?);
    let sleep = n1.add_pod("sleep", true)?;
    let mut pods = BTreeMap::new();
    for (i, name) in WEBS.iter().enumerate() {
        pods.insert(*name, if i == 0 { n1.add_pod(name, true)? } else { n2.add_pod(name, true)? });
    }
    let mut apps = BTreeMap::new();
    for (name, options) in WEBS.iter().zip(webs) {
        if let Some(options) = options {
            apps.insert(*name, pods[name].serve_app(&options)?);
        }
    }
    let dir = bed.state_dir().join("mesh-config");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("00-mesh.yaml"), mesh_yaml(&sleep, &pods, layout.client_labels, layout.web_labels))?;
    let (controller, agents) = directory_mesh(&bed, &dir, &[&n1, &n2])?;
    agents[0].wait_enrolled(&sleep, true, Duration::from_secs(15))?;
    for agent in &agents {
        agent.wait_config(Duration::from_secs(15), |c| c.to_string().contains("default/web"))?;
    }
    Ok(Mesh { _bed: bed, dir, controller, agents, sleep, pods, apps, client_labels: layout.client_labels })
}

fn mesh_yaml(sleep: &Pod, pods: &BTreeMap<&'static str, Pod>, client_labels: &str, web_labels: [&str; 3]) -> String {
    let mut yaml = format!("{}{SERVICE}{}", namespace_yaml("default"), pod_yaml(sleep, "node-1", client_labels));
    for (i, name) in WEBS.iter().enumerate() {
        yaml += &pod_yaml(&pods[name], if i == 0 { "node-1" } else { "node-2" }, web_labels[i]);
    }
    yaml
}

fn scenario(label: &str, layout: &Layout, webs: [Option<AppOptions>; 3], steps: impl FnOnce(&mut Mesh) -> Result<()>) -> Result<()> {
    let mut mesh = mesh(label, layout, webs)?;
    let result = steps(&mut mesh);
    result.map_err(|e| e.context(mesh_logs(&mesh.agents, &mesh.controller)))
}

fn web(version: &str) -> Option<AppOptions> {
    Some(AppOptions::new("web", version))
}

impl Mesh {
    fn apply(&self, name: &str, yaml: &str) -> Result<()> {
        apply_config(&self.dir, &self.agents, name, yaml)
    }

    fn http(&self, requests: &HttpRequests) -> Result<Vec<HttpResult>> {
        self.sleep.http(WEB.parse()?, requests)
    }

    /// Requests each web app received so far (with the path given).
    fn received(&self, path: &str) -> Result<BTreeMap<&'static str, usize>> {
        let mut counts = BTreeMap::new();
        for (name, process) in &self.apps {
            counts.insert(*name, app::received(process)?.iter().filter(|r| r.path == path).count());
        }
        Ok(counts)
    }

    /// Relabels the web pods (which of them the service selects).
    fn relabel(&self, web_labels: [&str; 3]) -> Result<()> {
        self.apply("00-mesh.yaml", &mesh_yaml(&self.sleep, &self.pods, self.client_labels, web_labels))
    }

    /// Replaces what web pod `name` serves.
    fn serve(&mut self, name: &'static str, options: AppOptions) -> Result<()> {
        if let Some(old) = self.apps.remove(name) {
            old.terminate();
        }
        // The old server's port is free once it has exited.
        let started = eventually(Duration::from_secs(5), || self.pods[name].serve_app(&options).ok());
        self.apps.insert(name, started.with_context(|| format!("restarting {name}'s app"))?);
        Ok(())
    }

    fn ip(&self, name: &str) -> IpAddr {
        IpAddr::V4(self.pods[name].ip)
    }

    /// The client agent's view of the `web` cluster (subset none, port 80).
    fn cluster(&self) -> Result<warren_api::admin::ClusterView> {
        let view = self.agents[0].endpoints()?;
        view.clusters.into_iter().find(|c| c.service == "default/web" && c.subset.is_none()).context("no web cluster in /endpoints")
    }

    fn health(&self, name: &str) -> Result<String> {
        let ip = self.ip(name);
        let cluster = self.cluster()?;
        let endpoint = cluster.endpoints.iter().find(|e| e.address == ip).with_context(|| format!("{name} not in {cluster:?}"))?;
        Ok(endpoint.health.clone())
    }

    /// `inspect endpoints`' locality priority of `name`, ranked from the client's zone.
    fn priority(&self, name: &str) -> Result<Option<u32>> {
        let ip = self.ip(name);
        let cluster = self.cluster()?;
        let endpoint = cluster.endpoints.iter().find(|e| e.address == ip).with_context(|| format!("{name} not in {cluster:?}"))?;
        Ok(endpoint.priority)
    }
}

/// How many of the default budget's windows a phase of `elapsed` can span: the sliding window forgets a
/// request 9 to 10 s after it was seen, so each 9 s of the phase may spend a whole window's budget again.
fn budget_windows(elapsed: Duration) -> usize {
    (elapsed.as_secs_f64() / 9.0).ceil().max(1.0) as usize
}

fn statuses(results: &[HttpResult]) -> BTreeMap<u16, usize> {
    let mut counts = BTreeMap::new();
    for r in results {
        *counts.entry(r.status).or_default() += 1;
    }
    counts
}

fn vs(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: default}}\n\
         spec:\n  hosts: [web]\n  http:\n{http}"
    )
}

fn dr(traffic_policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: default}}\n\
         spec:\n  host: web\n  trafficPolicy:\n{traffic_policy}"
    )
}

#[test]
fn retries_on_5xx_turn_a_flaky_backend_into_full_success_within_the_budget() -> Result<()> {
    require_privileges!(Ok(()));
    let flaky = Some(AppOptions::new("web", "v1").failing(3, 500));
    scenario("res-retries", &ONE, [flaky, None, None], |mesh| {
        let control = mesh.http(&HttpRequests::get("/control", 300))?;
        let failed = control.iter().filter(|r| r.status == 500).count();
        ensure!((90..=110).contains(&failed), "control: Istio's default policy does not retry a 500: {:?}", statuses(&control));
        mesh.apply("10-vs.yaml", &vs("  - route: [{destination: {host: web}}]\n    retries: {attempts: 3, retryOn: 5xx}\n"))?;
        let retried = mesh.http(&HttpRequests::get("/retried", 300))?;
        ensure!(retried.iter().all(|r| r.status == 200), "every request succeeds: {:?}", statuses(&retried));
        let received = app::received(&mesh.apps["web-1"])?;
        let tries: Vec<_> = received.iter().filter(|r| r.path == "/retried").collect();
        // web-1 fails every third try it gets, retries included: 450 tries make 300 successes.
        ensure!((440..=460).contains(&tries.len()), "one retry per failure: {} tries for 300 requests", tries.len());
        let second = tries.iter().filter(|r| r.headers.get("x-envoy-attempt-count").map(String::as_str) == Some("2")).count();
        ensure!((140..=160).contains(&second), "retries carry x-envoy-attempt-count: 2 ({second})");

        // Every try fails: 3 retries each would be 1200 tries; the budget (20 % + 10/s over 10 s) holds it.
        mesh.serve("web-1", AppOptions::new("web", "v1").failing(1, 500))?;
        let started = Instant::now();
        let broken = mesh.http(&HttpRequests::get("/broken", 300))?;
        let windows = budget_windows(started.elapsed());
        ensure!(broken.iter().all(|r| r.status == 500), "{:?}", statuses(&broken));
        let tries = app::received(&mesh.apps["web-1"])?.iter().filter(|r| r.path == "/broken").count();
        let budget = 300 + windows * (300 / 5 + 100);
        ensure!(budget < 1200, "the run took {windows} budget windows: too slow to tell a budget from none");
        ensure!(tries > 300 && tries <= budget + 5, "tries {tries}: more than the requests, within the budget of {budget}");
        let cluster = mesh.cluster()?;
        ensure!(cluster.retry_budget.refused > 0, "the budget's refusals are counted: {:?}", cluster.retry_budget);
        eprintln!("retry budget: {tries} tries for 300 requests that all fail in {windows} window(s) (budget {budget}); {:?}", cluster.retry_budget);
        Ok(())
    })
}

#[test]
fn the_default_policy_retries_a_connect_failure_elsewhere_but_not_a_503() -> Result<()> {
    require_privileges!(Ok(()));
    // web-2 has no server: connecting to it fails. web-3 answers 503 to everything.
    let failing = Some(AppOptions::new("web", "v3").failing(1, 503));
    let two = Layout { client_labels: "app: sleep", web_labels: ["app: web", "app: web", "app: other"] };
    scenario("res-default", &two, [web("v1"), None, failing], |mesh| {
        let results = mesh.http(&HttpRequests::get("/connect", 60))?;
        ensure!(results.iter().all(|r| r.status == 200), "connect failures retried on web-1: {:?}", statuses(&results));
        let tries = app::received(&mesh.apps["web-1"])?;
        let retried = tries.iter().filter(|r| r.path == "/connect" && r.headers.get("x-envoy-attempt-count").map(String::as_str) == Some("2")).count();
        ensure!(retried > 5, "some requests reached web-1 on their second try ({retried} of 60)");

        // Only web-3 (503 to all): Istio ≥ 1.24 does not retry a 503 by default.
        mesh.relabel(["app: other", "app: other", "app: web"])?;
        let results = mesh.http(&HttpRequests::get("/unavailable", 20))?;
        ensure!(results.iter().all(|r| r.status == 503), "{:?}", statuses(&results));
        let tries = mesh.received("/unavailable")?["web-3"];
        ensure!(tries == 20, "each 503 tried once: {tries} tries for 20 requests");
        Ok(())
    })
}

#[test]
fn istios_circuit_breaking_task_overflows_with_uo() -> Result<()> {
    require_privileges!(Ok(()));
    // httpbin's stand-in: one endpoint, a little slow so that concurrent requests meet.
    let httpbin = Some(AppOptions::new("web", "v1").slow(Duration::from_millis(100)).quiet());
    scenario("res-breaker", &ONE, [httpbin, None, None], |mesh| {
        let control = mesh.http(&HttpRequests::get("/get", 30).concurrency(3))?;
        ensure!(control.iter().all(|r| r.status == 200), "control, no limits: {:?}", statuses(&control));
        // The task's DestinationRule, as written there.
        let policy = "    connectionPool:\n      tcp: {maxConnections: 1}\n      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}\n\
            \x20   outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 100}\n";
        mesh.apply("10-dr.yaml", &dr(policy))?;
        let two = mesh.http(&HttpRequests::get("/get", 30).concurrency(2))?;
        let three = mesh.http(&HttpRequests::get("/get", 30).concurrency(3))?;
        let overflowed = three.iter().filter(|r| r.status == 503).count();
        ensure!(overflowed > 0 && overflowed < 30, "with 3 connections a share overflows: {:?}", statuses(&three));
        ensure!(
            three.iter().filter(|r| r.status == 503).all(|r| r.body.as_str().is_some_and(|b| b.contains("overflow"))),
            "overflow answers say so: {:?}", three.iter().find(|r| r.status == 503)
        );
        let cluster = mesh.cluster()?;
        ensure!(cluster.limits.max_connections == Some(1) && cluster.limits.max_pending_requests == Some(1), "{:?}", cluster.limits);
        ensure!(cluster.overflows.pending > 0, "the overflow shows in inspect endpoints: {:?}", cluster.overflows);
        let text = mesh.agents[0].inspect_live(&["endpoints"])?;
        ensure!(text.contains("outbound|80||web.default.svc.cluster.local") && text.contains("overflow (503 UO)"), "{text}");
        let metrics = mesh.agents[0].scrape("/stats/prometheus")?;
        ensure!(metrics.contains("response_flags=\"UO\""), "UO in Istio's metrics");
        eprintln!("circuit breaking: 2 connections {:?}, 3 connections {:?}", statuses(&two), statuses(&three));
        Ok(())
    })
}

#[test]
fn outlier_detection_ejects_a_failing_endpoint_for_its_time_then_takes_it_back() -> Result<()> {
    require_privileges!(Ok(()));
    let bad = Some(AppOptions::new("web", "v1").failing(1, 500));
    scenario("res-outlier", &PLAIN, [bad, web("v2"), web("v3")], |mesh| {
        // Round robin makes the control exact: web-1 answers every third request, all of them 500.
        mesh.apply("10-dr.yaml", &dr("    loadBalancer: {simple: ROUND_ROBIN}\n"))?;
        let control = mesh.http(&HttpRequests::get("/control", 30))?;
        ensure!(control.iter().filter(|r| r.status == 500).count() == 10, "control: web-1 fails its share: {:?}", statuses(&control));
        let policy = "    loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 4s, maxEjectionPercent: 100}\n";
        mesh.apply("10-dr.yaml", &dr(policy))?;
        mesh.http(&HttpRequests::get("/warm", 9))?;
        ensure!(mesh.health("web-1")? == "EJECTED", "ejected after 2 consecutive 5xx: {:?}", mesh.cluster()?);
        let before = mesh.received("/during")?;
        let during = mesh.http(&HttpRequests::get("/during", 30))?;
        ensure!(during.iter().all(|r| r.status == 200), "no request reaches the ejected endpoint: {:?}", statuses(&during));
        ensure!(before.get("web-1") == mesh.received("/during")?.get("web-1"), "web-1 got none while ejected");
        let back = eventually(Duration::from_secs(8), || (mesh.health("web-1").ok()? == "HEALTHY").then_some(()));
        ensure!(back.is_some(), "back after baseEjectionTime: {:?}", mesh.cluster()?);
        mesh.http(&HttpRequests::get("/after", 12))?;
        ensure!(mesh.received("/after")?["web-1"] > 0, "web-1 takes requests again once back");
        let cluster = mesh.cluster()?;
        let web1 = cluster.endpoints.iter().find(|e| e.address == mesh.ip("web-1")).context("web-1")?;
        ensure!(web1.times_ejected == 2, "ejected again, the second time for twice as long: {web1:?}");

        // maxEjectionPercent 30 of 3 endpoints: one at most, even with two failing.
        mesh.serve("web-2", AppOptions::new("web", "v2").failing(1, 500))?;
        let policy = "    loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 30}\n";
        mesh.apply("10-dr.yaml", &dr(policy))?;
        mesh.http(&HttpRequests::get("/two-bad", 30))?;
        let ejected = mesh.cluster()?.endpoints.iter().filter(|e| e.health == "EJECTED").count();
        ensure!(ejected == 1, "maxEjectionPercent 30 %: {ejected} ejected, {:?}", mesh.cluster()?);
        Ok(())
    })
}

#[test]
fn least_request_spares_a_slow_endpoint_round_robin_is_even_and_hashes_stick() -> Result<()> {
    require_privileges!(Ok(()));
    let slow = Some(AppOptions::new("web", "v1").slow(Duration::from_millis(150)));
    scenario("res-balance", &PLAIN, [slow, web("v2"), web("v3")], |mesh| {
        let load = HttpRequests::get("/rr", 150).concurrency(6);
        mesh.apply("10-dr.yaml", &dr("    loadBalancer: {simple: ROUND_ROBIN}\n"))?;
        mesh.http(&load)?;
        let rr = mesh.received("/rr")?;
        ensure!(rr.values().all(|n| (47..=53).contains(n)), "round robin: even within ±5 %: {rr:?}");
        mesh.apply("10-dr.yaml", &dr("    loadBalancer: {simple: LEAST_REQUEST}\n"))?;
        mesh.http(&HttpRequests::get("/lr", 150).concurrency(6))?;
        let lr = mesh.received("/lr")?;
        ensure!(lr["web-1"] * 2 < rr["web-1"], "least request sends the slow endpoint fewer: {lr:?} vs round robin {rr:?}");

        mesh.apply("10-dr.yaml", &dr("    loadBalancer:\n      consistentHash: {httpHeaderName: x-user}\n"))?;
        mesh.http(&HttpRequests::get("/alice", 100).header("x-user", "alice"))?;
        let alice = mesh.received("/alice")?;
        ensure!(alice.values().filter(|n| **n > 0).count() == 1 && alice.values().sum::<usize>() == 100, "one key, one endpoint: {alice:?}");
        let cookie = "    loadBalancer:\n      consistentHash: {httpCookie: {name: session, ttl: 60s, path: /}}\n";
        mesh.apply("10-dr.yaml", &dr(cookie))?;
        let first = mesh.http(&HttpRequests::get("/first", 1))?.remove(0);
        let set = first.headers.get("set-cookie").cloned().context("the cookie is issued")?;
        ensure!(set.starts_with("session=\"") && set.contains("Max-Age=60") && set.contains("Path=/"), "{set}");
        let value = set.split(';').next().unwrap_or_default().to_string();
        let sticky = mesh.http(&HttpRequests::get("/cookie", 30).header("cookie", &value))?;
        ensure!(sticky.iter().all(|r| !r.headers.contains_key("set-cookie")), "no new cookie once the client has one");
        let by_cookie = mesh.received("/cookie")?;
        ensure!(by_cookie.values().filter(|n| **n > 0).count() == 1, "the cookie is honoured: {by_cookie:?}");
        eprintln!("balance: round robin {rr:?}, least request {lr:?} (web-1 150 ms slower)");
        Ok(())
    })
}

#[test]
fn clients_prefer_their_zone_and_fail_over_to_the_next_when_it_is_ejected() -> Result<()> {
    require_privileges!(Ok(()));
    let layout = Layout {
        client_labels: "app: sleep, istio-locality: region1.zone-a",
        web_labels: ["app: web, istio-locality: region1.zone-a", "app: web, istio-locality: region1.zone-b", "app: web, istio-locality: region2.zone-c"],
    };
    scenario("res-locality", &layout, [web("v1"), web("v2"), web("v3")], |mesh| {
        mesh.http(&HttpRequests::get("/control", 30))?;
        let spread = mesh.received("/control")?;
        ensure!(spread.values().filter(|n| **n > 0).count() >= 2, "control, no outlier detection: no locality preference: {spread:?}");
        let policy = "    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}\n";
        mesh.apply("10-dr.yaml", &dr(policy))?;
        mesh.http(&HttpRequests::get("/local", 30))?;
        let local = mesh.received("/local")?;
        ensure!(local["web-1"] == 30, "all in the client's zone: {local:?}");
        let priorities = [mesh.priority("web-1")?, mesh.priority("web-2")?, mesh.priority("web-3")?];
        ensure!(priorities == [Some(0), Some(1), Some(2)], "inspect endpoints ranks from the client's zone: {priorities:?}");
        mesh.serve("web-1", AppOptions::new("web", "v1").failing(1, 500))?;
        mesh.http(&HttpRequests::get("/eject", 3))?;
        ensure!(mesh.health("web-1")? == "EJECTED", "{:?}", mesh.cluster()?);
        mesh.http(&HttpRequests::get("/failover", 30))?;
        let failover = mesh.received("/failover")?;
        ensure!(failover["web-2"] == 30, "the same region's other zone next: {failover:?}");
        Ok(())
    })
}
