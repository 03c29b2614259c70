//! Istio's bookinfo on the testbed, for scenarios that read like Istio's traffic-management tasks.
//!
//! ```text
//!  node-1:  sleep ──> productpage-v1 ──┬──> details-v1
//!                                      └──> reviews ──────────┐
//!           ratings-v1 <─────────────┐                        │
//!  node-2:                           └── reviews-v2, -v3 <────┤ (reviews-v1 calls no ratings)
//!                                        reviews-v1 <─────────┘
//! ```
//!
//! The controller reads a directory holding the conformance data's `bookinfo.yaml`, unchanged (Services,
//! ServiceAccounts, Deployments), and a generated file with the Pods the Deployments would create: the
//! testbed's real pods with their IPs, nodes, `app`/`version` labels and `bookinfo-<app>` service accounts.
//! The Services have no clusterIP; directory mode allocates one, and the lab reads each VIP from an agent's
//! view. Both nodes' agents run with mTLS, taking everything from the controller. The services are
//! warren-testapp `app` stand-ins with bookinfo's client behaviour: productpage calls details (3 s timeout)
//! then reviews (3 s timeout, one retry), reviews v2 and v3 call ratings (10 s), reviews v1 calls nothing;
//! every app keeps its upstream connections alive, as bookinfo's do.
//!
//! [`BookinfoLab::apply`] adds a networking sample (unchanged) to the directory and waits until both
//! agents hold it; [`BookinfoLab::productpage`] loads the product page from `sleep` as a user would.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use crate::{
    Agent, AgentOptions, AppOptions, Controller, ControllerOptions, HttpRequests, Node, Pod, Process, Testbed, Upstream,
    app::BOOKINFO_PORT,
};

/// The shared conformance data: Istio's bookinfo and its networking samples (`WARREN_CONFORMANCE_DIR`
/// overrides).
pub fn conformance_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    [
        std::env::var_os("WARREN_CONFORMANCE_DIR").map(PathBuf::from),
        Some(manifest.join("../../../shared/conformance/istio-bookinfo")),
        Some(PathBuf::from("/work/shared/conformance/istio-bookinfo")),
    ]
    .into_iter()
    .flatten()
    .find(|d| d.join("bookinfo.yaml").is_file())
    .expect("the conformance data (../shared/conformance/istio-bookinfo)")
}

/// bookinfo.yaml's workloads: (pod, app, version, node).
const WORKLOADS: &[(&str, &str, &str, &str)] = &[
    ("productpage-v1", "productpage", "v1", "node-1"),
    ("details-v1", "details", "v1", "node-1"),
    ("ratings-v1", "ratings", "v1", "node-1"),
    ("reviews-v1", "reviews", "v1", "node-2"),
    ("reviews-v2", "reviews", "v2", "node-2"),
    ("reviews-v3", "reviews", "v3", "node-2"),
];

const SERVICES: &[&str] = &["productpage", "details", "reviews", "ratings"];

/// The user bookinfo's login sets as `end-user` in Istio's tasks.
pub const JASON: &str = "jason";

/// One product page as `sleep` got it.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// productpage's status; 0 when the request got no response (`error`).
    pub status: u16,
    pub error: Option<String>,
    /// productpage's call to details: `Ok(status)` when it answered, else why not.
    pub details: Option<Result<u16, String>>,
    /// The reviews version that answered productpage (`v1`, `v2`, `v3`), or why none did (`timeout`,
    /// `status 503`, a connection error).
    pub reviews: Result<String, String>,
    /// What reviews got from ratings: `Ok(status)` when ratings answered (200, or an injected 500),
    /// `Err(error)` when not; `None` when reviews made no call (v1) or did not answer.
    pub ratings: Option<Result<u16, String>>,
    /// From `sleep`'s request until the whole page was read.
    pub latency: Duration,
}

impl Page {
    pub fn from_result(result: &crate::HttpResult) -> Page {
        let app = result.app();
        let call = |name: &str| app.as_ref().and_then(|a| a.call(name).cloned());
        let (details, reviews) = (call("details"), call("reviews"));
        let reviews_app = reviews.as_ref().filter(|r| r.outcome().is_ok()).and_then(|r| r.response());
        Page {
            status: result.status,
            error: result.error.clone(),
            details: details.map(|d| d.status.ok_or_else(|| d.error.clone().unwrap_or_default())),
            reviews: match (&reviews, &reviews_app) {
                (_, Some(answer)) => Ok(answer.version.clone()),
                (Some(call), None) => Err(call.outcome().err().unwrap_or_else(|| "not an app's answer".into())),
                (None, None) => Err(format!("productpage made no reviews call (status {})", result.status)),
            },
            ratings: reviews_app
                .and_then(|r| r.call("ratings").cloned())
                .map(|c| c.status.ok_or_else(|| c.error.clone().unwrap_or_default())),
            latency: result.latency(),
        }
    }
}

/// How many pages each reviews version (or error) served: `{"v1": 498, "v3": 502}`.
pub fn reviews_tally(pages: &[Page]) -> BTreeMap<String, usize> {
    let mut tally = BTreeMap::new();
    for page in pages {
        let key = match &page.reviews {
            Ok(version) => version.clone(),
            Err(e) => format!("error: {e}"),
        };
        *tally.entry(key).or_default() += 1;
    }
    tally
}

/// Bookinfo on two nodes: see the module documentation.
pub struct BookinfoLab {
    /// The controller's directory.
    pub dir: PathBuf,
    pub controller: Controller,
    /// node-1's agent (productpage, details, ratings, sleep).
    pub agent1: Agent,
    /// node-2's agent (the reviews versions).
    pub agent2: Agent,
    /// The client pod (node-1).
    pub sleep: Pod,
    /// The bookinfo pods by name (`reviews-v2`).
    pub pods: BTreeMap<String, Pod>,
    /// Each bookinfo pod's app, by pod name: [`warren_testbed::app::received`] shows what it was sent.
    pub apps: BTreeMap<String, Process>,
    /// Each service's VIP and port, as the agents hold them (`reviews` → 10.96.x.y:9080).
    pub vips: BTreeMap<String, SocketAddr>,
    /// node-1 and node-2, for scenarios that add pods of their own.
    pub nodes: [Node; 2],
    // Last: torn down after the processes above stopped.
    pub bed: Testbed,
}

fn pod_yaml(pod: &Pod, app: &str, version: &str, node: &str) -> String {
    let account = if app == "sleep" { "sleep".to_string() } else { format!("bookinfo-{app}") };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: default\n  uid: {}\n  \
         labels: {{app: {app}, version: {version}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {account}\n  \
         containers:\n  - name: {app}\n    image: warren-testapp\n    ports: [{{containerPort: {BOOKINFO_PORT}}}]\n\
         status: {{phase: Running, podIP: {}}}\n---\n",
        pod.name, pod.uid, pod.ip
    )
}

/// Writes `text` as `dir/name` at once (a rename), so the controller never reads half of it.
fn write_atomically(dir: &Path, name: &str, text: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What a YAML file must have made of the agents' view: (kind, name, HTTP rules of a VirtualService).
fn objects(text: &str) -> Result<Vec<(String, String, Option<usize>)>> {
    let mut objects = vec![];
    for document in serde_yaml::Deserializer::from_str(text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let name = value["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let http = value["spec"]["http"].as_array().map(Vec::len);
        objects.push((kind, name, http));
    }
    Ok(objects)
}

/// Whether an agent's `/config` view holds `object` as the file has it.
fn holds(view: &serde_json::Value, (kind, name, http): &(String, String, Option<usize>)) -> bool {
    let origin = format!("{kind} default/{name}");
    // "VirtualService default/reviews", with " (generation N)" when the object has one.
    let is_origin =
        |v: &serde_json::Value| v.as_str().is_some_and(|o| o == origin || o.starts_with(&format!("{origin} (")));
    let empty = vec![];
    match kind.as_str() {
        "VirtualService" => view["routes"].as_array().unwrap_or(&empty).iter().any(|r| {
            is_origin(&r["origin"]) && http.is_none_or(|n| r["http"].as_array().is_some_and(|rules| rules.len() == n))
        }),
        "DestinationRule" => {
            view["services"].as_array().unwrap_or(&empty).iter().any(|s| is_origin(&s["subsetOrigin"]))
        }
        _ => true,
    }
}

impl BookinfoLab {
    /// Builds the lab (about 10 s): nodes, pods, controller, agents, the apps; returns once a product page
    /// loads with reviews and details.
    pub fn start(label: &str) -> Result<BookinfoLab> {
        BookinfoLab::start_with(label, &[])
    }

    /// [`BookinfoLab::start`] with conformance files (`destination-rule-all.yaml`, …) in the directory
    /// from the start, in force before any app sends a request.
    pub fn start_with(label: &str, files: &[&str]) -> Result<BookinfoLab> {
        let bed = Testbed::new(label)?;
        let (n1, n2) = (bed.add_node("node-1")?, bed.add_node("node-2")?);
        let dir = bed.state_dir().join("bookinfo");
        std::fs::create_dir_all(&dir)?;
        let mut yaml =
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {warren.dev/mesh: enabled}}\n---\n"
                .to_string();
        let mut pods = BTreeMap::new();
        for (name, app, version, node) in WORKLOADS {
            let pod = if *node == "node-1" { n1.add_pod(name, true)? } else { n2.add_pod(name, true)? };
            yaml += &pod_yaml(&pod, app, version, node);
            pods.insert(name.to_string(), pod);
        }
        let sleep = n1.add_pod("sleep", true)?;
        yaml += &pod_yaml(&sleep, "sleep", "v1", "node-1");
        let bookinfo = std::fs::read(conformance_dir().join("bookinfo.yaml"))?;
        write_atomically(&dir, "bookinfo.yaml", &bookinfo)?;
        write_atomically(&dir, "pods.yaml", yaml.as_bytes())?;
        for file in files {
            let text = std::fs::read(conformance_dir().join(file)).with_context(|| format!("reading {file}"))?;
            write_atomically(&dir, file, &text)?;
        }

        let controller = bed.start_controller(ControllerOptions {
            config_dir: Some(dir.clone()),
            kubeconfig: None,
            push_port: 0,
            config_poll_ms: Some(50),
        })?;
        for node in [&n1, &n2] {
            node.reach_host_port(controller.push_port)?;
        }
        let options = AgentOptions {
            mtls: true,
            controller: Some(controller.address()),
            ebpf_log_level: "info",
            ..Default::default()
        };
        let agent1 = n1.start_agent_with(options.clone())?;
        let agent2 = n2.start_agent_with(options)?;
        let objects: Vec<_> = files
            .iter()
            .map(|f| objects(&std::fs::read_to_string(dir.join(f))?))
            .collect::<Result<Vec<_>>>()?
            .concat();
        for agent in [&agent1, &agent2] {
            agent.wait_config(Duration::from_secs(20), |c| objects.iter().all(|o| holds(c, o)))?;
        }
        let (apps, vips) = (BTreeMap::new(), BTreeMap::new());
        let nodes = [n1, n2];
        let mut lab = BookinfoLab { dir, controller, agent1, agent2, sleep, pods, apps, vips, nodes, bed };
        lab.wait_ready().map_err(|e| e.context(lab.logs()))?;
        Ok(lab)
    }

    fn wait_ready(&mut self) -> Result<()> {
        for (name, _, _, node) in WORKLOADS {
            let agent = if *node == "node-1" { &self.agent1 } else { &self.agent2 };
            agent.wait_enrolled(&self.pods[*name], true, Duration::from_secs(20))?;
        }
        self.agent1.wait_enrolled(&self.sleep, true, Duration::from_secs(20))?;
        // Every service with its VIP and all its endpoints, on both agents.
        let endpoints = |service: &str| WORKLOADS.iter().filter(|w| w.1 == service).count() as u64;
        for agent in [&self.agent1, &self.agent2] {
            let view = agent.wait_config(Duration::from_secs(20), |view| {
                SERVICES.iter().all(|name| {
                    service(view, name).is_some_and(|s| {
                        s["vips"].as_array().is_some_and(|v| !v.is_empty())
                            && s["endpoints"].as_u64() == Some(endpoints(name))
                    })
                })
            })?;
            for name in SERVICES {
                let s = service(&view, name).context("checked above")?;
                let ip: std::net::IpAddr = s["vips"][0].as_str().context("a VIP")?.parse()?;
                let ports = s["ports"].as_array().context("service ports")?;
                let port = ports.iter().find_map(|p| p["port"].as_u64()).context("a service port")?;
                let vip = SocketAddr::new(ip, u16::try_from(port)?);
                if self.vips.insert(name.to_string(), vip).is_some_and(|other| other != vip) {
                    bail!("the agents disagree on {name}'s VIP: {vip} and {other}", other = self.vips[*name]);
                }
            }
        }
        let vip = |name: &str| self.vips[name];
        let three = Duration::from_secs(3);
        let options = |name: &str, app: &str, version: &str| {
            let options = AppOptions::new(app, version);
            match name {
                "productpage-v1" => options
                    .call(Upstream::new("details", vip("details")).timeout(three))
                    .call(Upstream::new("reviews", vip("reviews")).timeout(three).retries(1)),
                "reviews-v2" | "reviews-v3" => {
                    options.call(Upstream::new("ratings", vip("ratings")).timeout(Duration::from_secs(10)))
                }
                _ => options,
            }
        };
        for (name, app, version, _) in WORKLOADS {
            let process = self.pods[*name].serve_app(&options(name, app, version))?;
            self.apps.insert(name.to_string(), process);
        }
        // The whole chain works (certificates issued, HBONE between the nodes) before a scenario starts.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let page = self.productpage(None, 1)?.remove(0);
            if page.status == 200 && page.reviews.is_ok() && page.details == Some(Ok(200)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no product page with reviews and details after 20 s: {page:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A service's VIP:port (`reviews`).
    pub fn vip(&self, service: &str) -> SocketAddr {
        self.vips[service]
    }

    /// Copies the conformance data's `file` (e.g. `virtual-service-all-v1.yaml`) unchanged into the
    /// controller's directory; waits until both agents hold a new version that has it.
    pub fn apply(&self, file: &str) -> Result<()> {
        let text = std::fs::read_to_string(conformance_dir().join(file)).with_context(|| format!("reading {file}"))?;
        self.install(file, &text)
    }

    /// [`BookinfoLab::apply`] of a test's own YAML, written as `<name>.yaml`. The controller reads files in
    /// name order, a later definition of an object replacing an earlier one (as `kubectl apply -f` of the
    /// directory): `virtual-service-ratings-…` replaces `virtual-service-all-v1.yaml`'s `ratings`.
    pub fn apply_yaml(&self, name: &str, yaml: &str) -> Result<()> {
        self.install(&format!("{name}.yaml"), yaml)
    }

    /// Deletes `file` from the controller's directory (as `kubectl delete -f` would its objects); waits
    /// until both agents hold a newer version.
    pub fn remove(&self, file: &str) -> Result<()> {
        let version =
            |agent: &Agent| -> Result<u64> { agent.config()?["version"].as_u64().context("no version in /config") };
        let before = [version(&self.agent1)?, version(&self.agent2)?];
        std::fs::remove_file(self.dir.join(file)).with_context(|| format!("removing {file}"))?;
        for (agent, before) in [&self.agent1, &self.agent2].into_iter().zip(before) {
            agent
                .wait_config(Duration::from_secs(10), |c| c["version"].as_u64().is_some_and(|v| v > before))
                .with_context(|| format!("removing {file} did not reach the agents"))?;
        }
        Ok(())
    }

    fn install(&self, file: &str, text: &str) -> Result<()> {
        let objects = objects(text).with_context(|| format!("parsing {file}"))?;
        let version =
            |agent: &Agent| -> Result<u64> { agent.config()?["version"].as_u64().context("no version in /config") };
        let before = [version(&self.agent1)?, version(&self.agent2)?];
        write_atomically(&self.dir, file, text.as_bytes())?;
        for (agent, before) in [&self.agent1, &self.agent2].into_iter().zip(before) {
            agent
                .wait_config(Duration::from_secs(10), |c| {
                    c["version"].as_u64().is_some_and(|v| v > before)
                        && c["push"]["version"] == c["version"]
                        && objects.iter().all(|o| holds(c, o))
                })
                .with_context(|| format!("{file} did not reach the agents"))?;
        }
        Ok(())
    }

    /// `count` product pages for `user` (header `end-user`, as bookinfo's login sets it; `None`: anonymous),
    /// four at a time, each loaded from `sleep` through productpage's VIP.
    pub fn productpage(&self, user: Option<&str>, count: usize) -> Result<Vec<Page>> {
        self.productpage_with(user, count, 4)
    }

    /// [`BookinfoLab::productpage`] over `concurrency` connections.
    pub fn productpage_with(&self, user: Option<&str>, count: usize, concurrency: usize) -> Result<Vec<Page>> {
        let vip = self.vip("productpage");
        let mut requests = HttpRequests::get("/productpage", count).concurrency(concurrency);
        requests.host = Some(format!("productpage:{}", vip.port()));
        if let Some(user) = user {
            requests = requests.header("end-user", user);
        }
        let results = self.sleep.http(vip, &requests)?;
        Ok(results.iter().map(Page::from_result).collect())
    }

    /// The last lines of both agents' and the controller's logs.
    pub fn logs(&self) -> String {
        format!(
            "agent node-1 (productpage, details, ratings, sleep):\n{}\n\n\
             agent node-2 (reviews):\n{}\n\ncontroller:\n{}",
            tail(&self.agent1.log(), 40),
            tail(&self.agent2.log(), 40),
            tail(&self.controller.log(), 40)
        )
    }

    /// Starts a lab ([`BookinfoLab::start_with`] `files`) and runs `steps` on it; a failure comes with the
    /// tail of every component's log.
    pub fn scenario(label: &str, files: &[&str], steps: impl FnOnce(&BookinfoLab) -> Result<()>) -> Result<()> {
        let lab = BookinfoLab::start_with(label, files)?;
        steps(&lab).map_err(|e| e.context(lab.logs()))
    }
}

fn service<'a>(view: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    view["services"].as_array()?.iter().find(|s| s["name"] == format!("default/{name}").as_str())
}
