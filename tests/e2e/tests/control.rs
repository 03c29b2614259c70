//! The control plane end to end: warren-controller reads Istio's YAML (a directory here; the API server in
//! cluster.rs), compiles per-node tables and pushes them; each agent writes the L4 part into its pinned
//! eBPF maps — read back here straight from bpffs — and routes service traffic by it. Bad config is
//! refused with the field named and changes nothing; a controller outage changes nothing either, and the
//! restart resyncs without stale entries.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, LpmTrie, Map, MapData};
use warren_maps::{AUTHZ_DENY, AuthzEntryKey, AuthzTarget, AuthzVerdict, ServiceKey, ServiceRoute, name_id, names};
use warren_testbed::{AgentOptions, ControllerOptions, ECHO_PORT, Pod, Testbed, bin_path, require_privileges};

const VIP: &str = "10.96.0.10:80";

fn service_route(pin_dir: &Path, vip: SocketAddr) -> Option<ServiceRoute> {
    let data = MapData::from_pin(pin_dir.join(names::SERVICE_ROUTES)).expect("pinned SERVICE_ROUTES");
    let map: BpfHashMap<MapData, ServiceKey, ServiceRoute> = BpfHashMap::try_from(Map::HashMap(data)).unwrap();
    map.get(&ServiceKey::new(vip), 0).ok()
}

/// The pinned L4_AUTHZ trie's entries, as `dst:port from src/len verdict decision-id` lines, sorted.
fn l4_authz(pin_dir: &Path) -> Vec<String> {
    let data = MapData::from_pin(pin_dir.join(names::L4_AUTHZ)).expect("pinned L4_AUTHZ");
    let map: LpmTrie<MapData, AuthzTarget, AuthzVerdict> = LpmTrie::try_from(Map::LpmTrie(data)).unwrap();
    let mut entries: Vec<String> = map
        .iter()
        .map(|entry| {
            let (key, verdict) = entry.unwrap();
            let key = AuthzEntryKey::from_trie_key(&key).expect("a valid L4_AUTHZ key");
            format!("{key} {} {}", if verdict.verdict == AUTHZ_DENY { "deny" } else { "allow" }, verdict.decision_id)
        })
        .collect();
    entries.sort();
    entries
}

/// Polls every pinned map until `check` holds for all of them; returns how long that took.
fn until_all(pin_dirs: &[PathBuf], timeout: Duration, what: &str, check: impl Fn(&Path) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if pin_dirs.iter().all(|d| check(d)) {
            return started.elapsed();
        }
        assert!(started.elapsed() < timeout, "{what}: not on every agent after {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn subsets(route: &ServiceRoute) -> Vec<(u32, u32)> {
    route.destinations[..route.destination_count as usize].iter().map(|d| (d.subset_id, d.weight)).collect()
}

fn subset(name: &str) -> u32 {
    name_id(format!("default/reviews/{name}").as_bytes())
}

fn pod_yaml(pod: &Pod, node: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, uid: {}, labels: {{{labels}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {}, containers: [{{name: app, image: testapp}}]}}\n\
         status: {{phase: Running, podIP: {}}}\n---\n",
        pod.name, pod.uid, pod.name, pod.ip
    )
}

const BASE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {warren.dev/mesh: enabled}}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\n\
    spec: {clusterIP: 10.96.0.10, selector: {app: reviews}, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n\
    apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\n\
    spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}\n";

fn to_v2(weight_v2: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\n\
         spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews, subset: v1}}\n      weight: {}\n    \
         - destination: {{host: reviews, subset: v2}}\n      weight: {weight_v2}\n",
        100 - weight_v2
    )
}

/// The pod that answered an HTTP GET of `vip` from `client` (warren-testapp's HTTP server names itself):
/// the port is declared `http`, so the agent routes each request by the VirtualService.
fn served_by(client: &Pod, vip: SocketAddr) -> String {
    let mut get = std::process::Command::new(bin_path("warren-testapp").unwrap());
    get.args(["http-get", "--to", &vip.to_string()]);
    let out = client.run(get).unwrap();
    let body: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("GET {vip}: {e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    body["pod"].as_str().unwrap_or_default().to_string()
}

#[test]
fn controller_pushes_routes_into_every_agents_maps_and_survives_an_outage() {
    require_privileges!();
    let bed = Testbed::new("control").unwrap();
    let (n1, n2) = (bed.add_node("n1").unwrap(), bed.add_node("n2").unwrap());
    let client = n1.add_pod("client", true).unwrap();
    let v1 = n1.add_pod("reviews-v1", true).unwrap();
    let v2 = n2.add_pod("reviews-v2", true).unwrap();
    let outsider = n2.add_pod("outsider", false).unwrap();
    let _servers: Vec<_> = [&v1, &v2].iter().map(|p| p.serve(&p.name).unwrap()).collect();

    let dir = bed.state_dir().join("mesh-config");
    std::fs::create_dir_all(&dir).unwrap();
    let pods = [
        pod_yaml(&client, "n1", "app: client"),
        pod_yaml(&v1, "n1", "app: reviews, version: v1"),
        pod_yaml(&v2, "n2", "app: reviews, version: v2"),
        pod_yaml(&outsider, "n2", "app: outsider, warren.dev/mesh: disabled"),
    ]
    .concat();
    std::fs::write(dir.join("00-base.yaml"), format!("{BASE}---\n{pods}")).unwrap();
    let controller = bed.start_controller(ControllerOptions { config_dir: Some(dir.clone()), kubeconfig: None, push_port: 0, config_poll_ms: None }).unwrap();
    let push_port = controller.push_port;
    let agent_options = AgentOptions { mtls: true, controller: Some(controller.address()), ..Default::default() };
    for node in [&n1, &n2] {
        node.reach_host_port(push_port).unwrap();
    }
    let a1 = n1.start_agent_with(agent_options.clone()).unwrap();
    let a2 = n2.start_agent_with(agent_options).unwrap();
    let pins = vec![a1.pin_dir.clone(), a2.pin_dir.clone()];
    let vip: SocketAddr = VIP.parse().unwrap();

    // The first snapshot: the service, routed to its own endpoints.
    until_all(&pins, Duration::from_secs(10), "initial sync", |d| service_route(d, vip).is_some_and(|r| subsets(&r) == [(0, 100)]));
    a1.wait_enrolled(&client, true, Duration::from_secs(10)).unwrap();
    assert!(served_by(&client, vip).starts_with("reviews-v"), "client → reviews VIP");

    // A VirtualService: within 1 s both agents' maps hold the split, and traffic follows it.
    std::fs::write(dir.join("10-vs.yaml"), to_v2(100)).unwrap();
    let took = until_all(&pins, Duration::from_secs(5), "VirtualService to v2", |d| {
        service_route(d, vip).is_some_and(|r| subsets(&r) == [(subset("v1"), 0), (subset("v2"), 100)])
    });
    eprintln!("VirtualService in every agent's map after {took:?} (the controller polls its directory every 200 ms)");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    for _ in 0..5 {
        assert_eq!(served_by(&client, vip), "reviews-v2");
    }
    let routes = a1.inspect_live(&["routes"]).unwrap();
    assert!(routes.contains("VirtualService default/reviews") && routes.contains("default/reviews/v2:100%"), "{routes}");

    // A bad edit (a negative weight, a malformed timeout): refused with the field named; nothing changes.
    let version = a1.config().unwrap()["version"].as_u64().unwrap();
    std::fs::write(dir.join("10-vs.yaml"), to_v2(80).replace("weight: 20", "weight: -10").replace("  - route:", "  - timeout: soon\n    route:")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !controller.log().contains("spec.http[0].route[0].weight: -10 is negative") {
        assert!(Instant::now() < deadline, "no validation error in the controller log:\n{}", controller.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(controller.log().contains("spec.http[0].timeout: \"soon\" is not a duration"), "{}", controller.log());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a1.config().unwrap()["version"].as_u64().unwrap(), version, "a bad edit must not produce a new version");
    for d in &pins {
        assert_eq!(subsets(&service_route(d, vip).unwrap()), [(subset("v1"), 0), (subset("v2"), 100)]);
    }
    let analyze = std::process::Command::new(bin_path("warren-controller").unwrap())
        .args(["analyze", "--config-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&analyze.stdout);
    assert!(!analyze.status.success(), "analyze must fail on errors: {report}");
    assert!(report.contains("Error [IST0106] (VirtualService default/reviews 10-vs.yaml:1) spec.http[0].route[0].weight: -10 is negative"), "{report}");

    // Delete: the route goes back to the service's own endpoints on every agent.
    std::fs::remove_file(dir.join("10-vs.yaml")).unwrap();
    until_all(&pins, Duration::from_secs(2), "VirtualService removed", |d| service_route(d, vip).is_some_and(|r| subsets(&r) == [(0, 100)]));

    // An allow-nothing AuthorizationPolicy on reviews-v1: refused in the kernel (sk_lookup), visible in
    // L4_AUTHZ as a deny entry for every client of reviews-v1's address, all ports.
    std::fs::write(
        dir.join("20-deny.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: lock-v1, namespace: default}\n\
         spec: {selector: {matchLabels: {version: v1}}}\n",
    )
    .unwrap();
    let lock_v1 = [format!("{}:* from 0.0.0.0/0 deny 0", v1.ip)];
    until_all(&pins[..1], Duration::from_secs(2), "L4 policy", |d| l4_authz(d) == lock_v1);
    assert!(l4_authz(&pins[1]).is_empty(), "n2 has no pod the policy selects");
    let refused = outsider.send(v1.socket(ECHO_PORT), 1024).unwrap();
    assert!(!refused.ok && refused.error.as_deref().unwrap_or("").contains("refused"), "{refused:?}");
    assert!(outsider.send(v2.socket(ECHO_PORT), 1024).unwrap().ok, "v2 is not locked");
    let policies = a1.inspect_live(&["policies"]).unwrap();
    assert!(policies.contains("default/lock-v1") && policies.contains(&format!("{}:* from 0.0.0.0/0 (no ALLOW policy matches)", v1.ip)), "{policies}");
    std::fs::remove_file(dir.join("20-deny.yaml")).unwrap();

    // Outage: kill the controller; traffic keeps flowing by the last config.
    std::fs::write(dir.join("10-vs.yaml"), to_v2(100)).unwrap();
    until_all(&pins, Duration::from_secs(2), "to v2 again", |d| service_route(d, vip).is_some_and(|r| subsets(&r).get(1) == Some(&(subset("v2"), 100))));
    until_all(&pins[..1], Duration::from_secs(2), "policy gone", |d| l4_authz(d).is_empty());
    controller.kill();
    drop(controller);
    for _ in 0..3 {
        assert_eq!(served_by(&client, vip), "reviews-v2", "traffic during the outage");
    }
    // While it is down: route to v1 instead, and a service that goes away.
    std::fs::write(dir.join("10-vs.yaml"), to_v2(0)).unwrap();
    std::fs::write(
        dir.join("30-extra.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: default}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 81}]}\n",
    )
    .unwrap();
    let extra: SocketAddr = "10.96.0.11:81".parse().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(a1.config().unwrap()["push"]["connected"] == false);
    let restarted = bed
        .start_controller(ControllerOptions { config_dir: Some(dir.clone()), kubeconfig: None, push_port, config_poll_ms: None })
        .unwrap();
    until_all(&pins, Duration::from_secs(10), "resync after restart", |d| {
        service_route(d, vip).is_some_and(|r| subsets(&r) == [(subset("v1"), 100), (subset("v2"), 0)]) && service_route(d, extra).is_some()
    });
    // Remove the extra service: no stale entry survives anywhere.
    std::fs::remove_file(dir.join("30-extra.yaml")).unwrap();
    until_all(&pins, Duration::from_secs(2), "extra removed", |d| service_route(d, extra).is_none());
    let services = a2.inspect_live(&["services", "-o", "json"]).unwrap();
    let services: serde_json::Value = serde_json::from_str(&services).unwrap();
    let names: Vec<&str> = services["services"].as_array().unwrap().iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["default/reviews"], "exactly the configured services, once");
    assert_eq!(served_by(&client, vip), "reviews-v1");
    drop(restarted);
}

// ------------------------------------------------------------------------------------------------
// The same against the real API server: Istio's CRDs, objects applied with kube-rs, status and Events.
// ------------------------------------------------------------------------------------------------

use k8s_openapi::{
    api::core::v1::{Event, Namespace, Pod as K8sPod, Service},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Client, Config, ResourceExt,
    api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{conditions, wait::await_condition},
};
use serde::Deserialize;

/// The `Accepted` condition of an Istio object once `wanted` holds for it (10 s at most).
async fn accepted_condition(api: &Api<DynamicObject>, name: &str, wanted: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let condition = || async {
        let object = api.get_status(name).await.ok()?;
        Some(object.data["status"]["conditions"][0].clone()).filter(|c| wanted(c))
    };
    let found = warren_e2e::eventually_async(Duration::from_secs(10), condition).await;
    found.unwrap_or_else(|| panic!("{name}: no Accepted condition as wanted within 10 s"))
}

/// Waits for a VirtualService Warning Event with `reason` whose message contains `text` (10 s at most).
async fn warning_event(events: &Api<Event>, reason: &str, text: &str) {
    let found = warren_e2e::eventually_async(Duration::from_secs(10), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.type_.as_deref() == Some("Warning")
                    && e.involved_object.kind.as_deref() == Some("VirtualService")
                    && e.message.as_deref().is_some_and(|m| m.contains(text))
            })
            .then_some(())
    })
    .await;
    assert!(found.is_some(), "no {reason} Event naming {text:?}");
}

#[test]
fn controller_compiles_the_api_servers_istio_objects_into_every_agents_maps() {
    require_privileges!();
    if !xtask::cluster::is_built() {
        assert!(!warren_testbed::in_ci(), "CI=true, but the local Kubernetes is not built");
        return eprintln!("SKIPPED: the local Kubernetes is not built (cargo xtask setup --kubernetes)");
    }
    let kubeconfig = xtask::cluster::up(false).unwrap();
    let result = std::panic::catch_unwind(|| tokio::runtime::Runtime::new().unwrap().block_on(api_scenario(&kubeconfig)));
    xtask::cluster::down().unwrap();
    match result {
        Ok(outcome) => outcome.unwrap(),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

async fn install_crds(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/warren/crds/istio.yaml");
    for document in serde_yaml::Deserializer::from_str(&std::fs::read_to_string(path)?) {
        let value = serde_json::Value::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        let crd: CustomResourceDefinition = serde_json::from_value(value)?;
        let name = crd.name_any();
        crds.patch(&name, &PatchParams::apply("warren-e2e").force(), &Patch::Apply(&crd)).await?;
        tokio::time::timeout(Duration::from_secs(30), await_condition(crds.clone(), &name, conditions::is_crd_established())).await??;
    }
    Ok(())
}

/// Polls the pinned maps from a blocking thread.
async fn until_all_async(pins: &[PathBuf], timeout: Duration, what: &'static str, check: fn(&Path, SocketAddr) -> bool, vip: SocketAddr) -> Duration {
    let pins = pins.to_vec();
    tokio::task::spawn_blocking(move || until_all(&pins, timeout, what, |d| check(d, vip))).await.unwrap()
}

async fn api_scenario(kubeconfig: &Path) -> anyhow::Result<()> {
    let config = Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    install_crds(&client).await?;
    let ns = format!("shop-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    // The controller's own namespace (its CA publishes the root there).
    let _ = namespaces.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": "warren-system"}}))?).await;
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": ns, "labels": {"warren.dev/mesh": "enabled"}}}))?)
        .await?;

    let bed = Testbed::new("control-k8s")?;
    let (n1, n2) = (bed.add_node("n1")?, bed.add_node("n2")?);
    let pods_api: Api<K8sPod> = Api::namespaced(client.clone(), &ns);
    let mut pods = Vec::new();
    for (name, node, version) in [("client", &n1, ""), ("reviews-v1", &n1, "v1"), ("reviews-v2", &n2, "v2")] {
        let labels = if version.is_empty() { serde_json::json!({"app": name}) } else { serde_json::json!({"app": "reviews", "version": version}) };
        let object: K8sPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": node.name, "containers": [{"name": "app", "image": "warren-testapp:local"}]}
        }))?;
        let created = warren_e2e::k8s::create_pod(&pods_api, &object).await?;
        let pod = node.add_pod_with_uid(name, false, created.metadata.uid.as_deref())?;
        let status = serde_json::json!({"status": {"phase": "Running", "podIP": pod.ip.to_string()}});
        pods_api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
        pods.push(pod);
    }
    let (client_pod, v1, v2) = (pods[0].clone(), pods[1].clone(), pods[2].clone());
    let _servers = (v1.serve("v1")?, v2.serve("v2")?);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "reviews"},
        "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))?;
    let service = services.create(&PostParams::default(), &service).await?;
    let vip: SocketAddr = format!("{}:80", service.spec.unwrap().cluster_ip.unwrap()).parse()?;

    let istio = |kind: &str| {
        let group = if kind == "AuthorizationPolicy" { "security.istio.io" } else { "networking.istio.io" };
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &ApiResource::from_gvk(&GroupVersionKind::gvk(group, "v1", kind)))
    };
    let dr: DynamicObject = serde_yaml::from_str(&format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: {ns}}}\n\
         spec: {{host: reviews, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}\n"
    ))?;
    istio("DestinationRule").create(&PostParams::default(), &dr).await?;

    let controller = bed.start_controller(ControllerOptions {
        config_dir: None,
        kubeconfig: Some(kubeconfig.to_path_buf()),
        push_port: 0,
        config_poll_ms: None,
    })?;
    let options = AgentOptions { mtls: true, controller: Some(controller.address()), ..Default::default() };
    for node in [&n1, &n2] {
        node.reach_host_port(controller.push_port)?;
    }
    let agents = [n1.start_agent_with(options.clone())?, n2.start_agent_with(options)?];
    let pins: Vec<PathBuf> = agents.iter().map(|a| a.pin_dir.clone()).collect();
    let own = |d: &Path, vip: SocketAddr| service_route(d, vip).is_some_and(|r| subsets(&r) == [(0, 100)]);
    until_all_async(&pins, Duration::from_secs(15), "initial sync", own, vip).await;
    agents[0].wait_enrolled(&client_pod, true, Duration::from_secs(10))?;

    // Apply a VirtualService: every agent's pinned map has it within 1 s, and traffic follows.
    let vs = |v2_weight: u32| -> anyhow::Result<DynamicObject> {
        Ok(serde_yaml::from_str(&format!("metadata: {{name: reviews, namespace: {ns}}}\n{}", to_v2(v2_weight).split_once("metadata: {name: reviews, namespace: default}\n").unwrap().1))
            .map(|mut o: DynamicObject| {
                o.types = Some(kube::api::TypeMeta { api_version: "networking.istio.io/v1".into(), kind: "VirtualService".into() });
                o
            })?)
    };
    let to_v2_only = |d: &Path, vip: SocketAddr| {
        service_route(d, vip).is_some_and(|r| r.destination_count == 2 && r.destinations[1].weight == 100)
    };
    let applied = Instant::now();
    istio("VirtualService").create(&PostParams::default(), &vs(100)?).await?;
    until_all_async(&pins, Duration::from_secs(5), "VirtualService", to_v2_only, vip).await;
    let took = applied.elapsed();
    eprintln!("VirtualService from the API server in every agent's map after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    for route in pins.iter().map(|d| service_route(d, vip).unwrap()) {
        assert_eq!(route.destinations[1].subset_id, name_id(format!("{ns}/reviews/v2").as_bytes()));
    }
    let served = tokio::task::spawn_blocking({
        let client_pod = client_pod.clone();
        move || served_by(&client_pod, vip)
    })
    .await?;
    assert_eq!(served, "reviews-v2");

    // A bad edit: the status condition and a Warning Event name the field; the maps keep the last good route.
    let mut bad = vs(80)?;
    bad.data["spec"]["http"][0]["route"][1]["weight"] = (-10).into();
    bad.data["spec"]["http"][0]["timeout"] = "soon".into();
    istio("VirtualService").patch("reviews", &PatchParams::default(), &Patch::Merge(&serde_json::json!({"spec": bad.data["spec"]}))).await?;
    let condition = accepted_condition(&istio("VirtualService"), "reviews", |c| c["status"] == "False").await;
    let message = condition["message"].as_str().unwrap_or_default();
    assert_eq!(condition["type"], "Accepted");
    assert_eq!(condition["reason"], "Invalid");
    assert!(message.contains("spec.http[0].route[1].weight: -10 is negative"), "{message}");
    assert!(message.contains("spec.http[0].timeout: \"soon\" is not a duration"), "{message}");
    assert!(message.contains("generation 1 stays in force"), "{message}");
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    warning_event(&events, "InvalidConfig", "spec.http[0].route[1].weight: -10 is negative").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for d in &pins {
        let route = service_route(d, vip).unwrap();
        assert!(route.destination_count == 2 && route.destinations[1].weight == 100, "the data plane must not change: {route:?}");
    }

    // `warren-controller analyze` reads the same problems straight from the API server.
    let analyze = std::process::Command::new(bin_path("warren-controller")?).arg("analyze").arg("--kubeconfig").arg(kubeconfig).output()?;
    let report = String::from_utf8_lossy(&analyze.stdout);
    assert!(!analyze.status.success(), "{report}");
    assert!(report.contains(&format!("Error [IST0106] (VirtualService {ns}/reviews) spec.http[0].route[1].weight: -10 is negative")), "{report}");

    // A valid edit with a field Warren does not honour yet: applied without it, and said so (condition,
    // Event, analyze) — never dropped in silence.
    let mut retried = vs(100)?;
    retried.data["spec"]["http"][0]["corsPolicy"] = serde_json::json!({"allowOrigins": [{"exact": "x"}]});
    istio("VirtualService").patch("reviews", &PatchParams::default(), &Patch::Merge(&serde_json::json!({"spec": retried.data["spec"]}))).await?;
    let condition = accepted_condition(&istio("VirtualService"), "reviews", |c| c["reason"] == "Unsupported").await;
    assert_eq!(condition["status"], "True", "{condition:#}");
    let unsupported = "spec.http[0].corsPolicy: is not implemented by the L7 proxy yet";
    assert!(condition["message"].as_str().unwrap_or_default().contains(unsupported), "{condition:#}");
    warning_event(&events, "UnsupportedConfig", "spec.http[0].corsPolicy").await;
    until_all_async(&pins, Duration::from_secs(5), "the route with corsPolicy applied", to_v2_only, vip).await;
    let analyze = std::process::Command::new(bin_path("warren-controller")?).arg("analyze").arg("--kubeconfig").arg(kubeconfig).output()?;
    let report = String::from_utf8_lossy(&analyze.stdout);
    assert!(report.contains(&format!("Warning [WAR0101] (VirtualService {ns}/reviews) {unsupported}")), "{report}");

    // Delete: removed from every agent's route.
    let deleted = Instant::now();
    istio("VirtualService").delete("reviews", &DeleteParams::default()).await?;
    until_all_async(&pins, Duration::from_secs(5), "VirtualService deleted", own, vip).await;
    let took = deleted.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // Istio's request-routing sample, unchanged, from the API server: the agent routes each request by
    // its header match (jason → v2, everyone else → v1).
    let sample = std::fs::read_to_string(warren_testbed::bookinfo::conformance_dir().join("virtual-service-reviews-test-v2.yaml"))?;
    let sample: DynamicObject = serde_yaml::from_str(&sample)?;
    // As `kubectl apply` sends it: in the sample's own API version (v1alpha3).
    let version = sample.types.as_ref().and_then(|t| t.api_version.split_once('/')).map(|(_, v)| v.to_string());
    let gvk = GroupVersionKind::gvk("networking.istio.io", version.as_deref().unwrap_or("v1"), "VirtualService");
    Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &ApiResource::from_gvk(&gvk))
        .create(&PostParams::default(), &sample)
        .await?;
    let by_user = |user: Option<&'static str>| {
        let client_pod = client_pod.clone();
        tokio::task::spawn_blocking(move || served_by_for(&client_pod, vip, user))
    };
    let routed = warren_e2e::eventually_async(Duration::from_secs(5), || async {
        let (jason, others) = (by_user(Some("jason")).await.ok()?, by_user(None).await.ok()?);
        (jason == "reviews-v2" && others == "reviews-v1").then_some(())
    })
    .await;
    assert!(routed.is_some(), "reviews-test-v2 from the API server: jason → v2, others → v1");

    // Controller outage: traffic continues by the last config.
    controller.kill();
    let (jason, others) = (by_user(Some("jason")).await?, by_user(None).await?);
    assert_eq!((jason.as_str(), others.as_str()), ("reviews-v2", "reviews-v1"), "during the outage");
    Ok(())
}

/// [`served_by`] of a request with `end-user: <user>` (when given), as bookinfo's login sets it.
fn served_by_for(client: &Pod, vip: SocketAddr, user: Option<&str>) -> String {
    let mut requests = warren_testbed::HttpRequests::get("/", 1);
    if let Some(user) = user {
        requests = requests.header("end-user", user);
    }
    let result = client.http(vip, &requests).unwrap().remove(0);
    result.body["pod"].as_str().unwrap_or_default().to_string()
}
