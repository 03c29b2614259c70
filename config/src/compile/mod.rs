//! ClusterState → the tables agents hold. Hosts are resolved the way Istio does (a short name is in the
//! object's namespace: `reviews` in `bookinfo` is `reviews.bookinfo.svc.cluster.local`); endpoints of a
//! Service with a selector come from the pods it selects, with their DestinationRule subsets.
mod gateway;

pub use gateway::mesh_config_error;
pub mod policy;
mod resilience;
mod service_entry;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::{api::core::v1 as core, apimachinery::pkg::util::intstr::IntOrString};
use kube::ResourceExt;

use crate::{
    cluster::ClusterState,
    istio::{self, Destination, HttpRoute, VirtualService},
    tables::{
        DirectResponse, Endpoint, Fault, HeaderOperations, HeaderOps, HttpRule, Mirror, Origin, Redirect, RegexRewrite,
        Resource, Rewrite, Route, Service, ServicePort, Tables, TcpRule, TlsMatch, TlsRule, WeightedDestination,
    },
    validate::{base64_decode, duration_ms, fault_percent, grpc_code},
    workloads::{Pod, is_enrolled},
};

pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Istio's mesh config: the `mesh` key of this ConfigMap in the root namespace.
pub const MESH_CONFIG_MAP: &str = "istio";

/// Every resource of the mesh, shared by the per-node views.
#[derive(Debug, Default)]
pub struct Compiled {
    pub resources: BTreeMap<String, Arc<Resource>>,
}

impl Compiled {
    /// What `node`'s agent gets: its own pods and every enrolled pod elsewhere (HBONE destinations), and
    /// all services, routes and policies.
    pub fn for_node(&self, node: &str) -> BTreeMap<String, Arc<Resource>> {
        self.resources
            .iter()
            .filter(|(_, r)| match r.as_ref() {
                Resource::Workload(pod) => pod.is_on(node) || self.enrolled(pod),
                // Private keys go only where a gateway pod serves them.
                Resource::Credential(credential) => credential.nodes.iter().any(|n| n == node),
                _ => true,
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn enrolled(&self, pod: &Pod) -> bool {
        let key = format!("namespace//{}", pod.namespace);
        let labels = match self.resources.get(&key).map(Arc::as_ref) {
            Some(Resource::Namespace(ns)) => Some(&ns.labels),
            _ => None,
        };
        is_enrolled(pod, labels)
    }

    pub fn tables_for_node(&self, node: &str) -> Tables {
        self.for_node(node).into_iter().map(|(k, v)| (k, (*v).clone())).collect()
    }
}

/// `host` as written in `namespace` → the name Istio resolves it to: a short name (no dot) is a service in
/// the object's namespace; anything with a dot, an IP address or `*` is taken as written (so `reviews.shop`
/// is not `reviews.shop.svc.cluster.local`, as in Istio).
pub fn qualify(host: &str, namespace: &str) -> String {
    if host.contains('.') || host == "*" || host.parse::<IpAddr>().is_ok() || host.contains(':') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.{CLUSTER_DOMAIN}")
    }
}

/// Istio's order among objects that compete for the same host: the oldest first, then by namespace and name.
pub fn istio_order<K: kube::Resource>(a: &K, b: &K) -> std::cmp::Ordering {
    let key = |o: &K| {
        let meta = o.meta();
        (meta.creation_timestamp.is_none(), meta.creation_timestamp.as_ref().map(|t| t.0), meta.namespace.clone(), meta.name.clone())
    };
    key(a).cmp(&key(b))
}

struct SubsetsOf<'a> {
    origin: Origin,
    subsets: Vec<(&'a str, &'a BTreeMap<String, String>)>,
    policies: resilience::Policies,
}

pub fn compile(state: &ClusterState) -> Compiled {
    let mut out = Compiled::default();
    let mut add = |r: Resource| {
        out.resources.insert(r.key(), Arc::new(r));
    };
    for ns in &state.namespaces {
        add(Resource::Namespace(ns.clone()));
    }
    let node_localities = node_localities(state);
    let pods = with_localities(&state.pods, &node_localities);
    for pod in &pods {
        add(Resource::Workload(pod.clone()));
    }

    let subsets = destination_rules(state);
    let pods_by_namespace: HashMap<&str, Vec<&Pod>> = pods.iter().fold(HashMap::new(), |mut m, p| {
        m.entry(p.namespace.as_str()).or_default().push(p);
        m
    });
    let pods_by_key: HashMap<String, &Pod> = pods.iter().map(|p| (p.key(), p)).collect();
    let endpoints_by_service: HashMap<(String, String), &core::Endpoints> =
        state.endpoints.iter().map(|e| ((e.namespace().unwrap_or_default(), e.name_any()), e)).collect();

    let mut services_by_host: HashMap<String, String> = HashMap::new();
    for svc in &state.services {
        let ns = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        let hostname = qualify(&name, &ns);
        let dr = subsets.get(&hostname);
        let spec = svc.spec.clone().unwrap_or_default();
        let mut vips: Vec<IpAddr> =
            spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter()).filter_map(|ip| ip.parse().ok()).collect();
        vips.dedup();
        let ports = spec
            .ports
            .iter()
            .flatten()
            .map(|p| ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: p.port as u16,
                target_port: match &p.target_port {
                    Some(IntOrString::Int(n)) => *n as u16,
                    _ => p.port as u16, // named ports resolve per pod; the service port is the common case
                },
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        let subset_names = |labels: &BTreeMap<String, String>| -> Vec<String> {
            dr.map(|dr| {
                dr.subsets
                    .iter()
                    .filter(|(_, sel)| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
                    .map(|(n, _)| n.to_string())
                    .collect()
            })
            .unwrap_or_default()
        };
        let endpoints: Vec<Endpoint> = match spec.selector.as_ref().filter(|s| !s.is_empty()) {
            Some(selector) => pods_by_namespace
                .get(ns.as_str())
                .into_iter()
                .flatten()
                .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
                .flat_map(|p| {
                    p.ips.iter().map(|ip| Endpoint {
                        ip: *ip,
                        workload: Some(p.key()),
                        node: p.node.clone().filter(|n| !n.is_empty()),
                        subsets: subset_names(&p.labels),
                        locality: p.locality.clone(),
                        hostname: None,
                    })
                })
                .collect(),
            None => endpoints_by_service
                .get(&(ns.clone(), name.clone()))
                .and_then(|e| e.subsets.as_ref())
                .into_iter()
                .flatten()
                .flat_map(|s| s.addresses.iter().flatten())
                .filter_map(|a| {
                    let target = a.target_ref.as_ref();
                    let workload = target.and_then(|t| Some(format!("{}/{}", t.namespace.as_ref()?, t.name.as_ref()?)));
                    // The pod's locality when the address is a pod's, else its node's.
                    let pod_locality = workload.as_ref().and_then(|w| pods_by_key.get(w)?.locality.clone());
                    let node_locality = a.node_name.as_ref().and_then(|n| node_localities.get(n.as_str()).cloned());
                    Some(Endpoint {
                        ip: a.ip.parse().ok()?,
                        workload,
                        node: a.node_name.clone(),
                        subsets: Vec::new(),
                        locality: pod_locality.or(node_locality),
                        hostname: None,
                    })
                })
                .collect(),
        };
        services_by_host.insert(hostname.clone(), format!("{ns}/{name}"));
        let mut service = Service {
            namespace: ns.clone(),
            name: name.clone(),
            hostname,
            vips,
            ports,
            endpoints,
            subsets: dr.map(|d| d.subsets.iter().map(|(n, _)| n.to_string()).collect()).unwrap_or_default(),
            origin: Origin::new("Service", &ns, &name, svc.metadata.generation),
            subset_origin: dr.map(|d| d.origin.clone()),
            ..Default::default()
        };
        if let Some(dr) = dr {
            dr.policies.apply(&mut service);
        }
        add(Resource::Service(service));
    }
    for se in &state.service_entries {
        for service in service_entry::compile(se, &subsets) {
            services_by_host.insert(service.hostname.clone(), service.key());
            add(Resource::Service(service));
        }
    }

    // Several VirtualServices for one service: one naming its host exactly wins over a wildcard host (the
    // more specific, as Istio), then the oldest (Istio's order); analyze reports IST0109.
    let mut virtual_services: Vec<_> = state.virtual_services.iter().collect();
    virtual_services.sort_by(|a, b| istio_order(*a, *b));
    let compiled: Vec<(Route, Vec<String>)> = virtual_services.iter().map(|vs| route(vs, &services_by_host)).collect();
    let mut claimed: HashMap<String, usize> = HashMap::new();
    for wildcard_pass in [false, true] {
        for (i, (route, by_wildcard)) in compiled.iter().enumerate() {
            for service in route.services.iter().filter(|s| by_wildcard.contains(s) == wildcard_pass) {
                claimed.entry(service.clone()).or_insert(i);
            }
        }
    }
    for (i, (mut route, _)) in compiled.into_iter().enumerate() {
        route.services.retain(|service| claimed.get(service) == Some(&i));
        route.services.dedup();
        add(Resource::Route(route));
    }
    for ap in &state.authorization_policies {
        add(Resource::Policy(policy::compile(ap, state.root_namespace())));
    }
    for pa in &state.peer_authentications {
        add(Resource::PeerAuthentication(pa.clone()));
    }
    let (gateways, credentials) = gateway::compile(state);
    for g in gateways {
        add(Resource::Gateway(g));
    }
    for c in credentials {
        add(Resource::Credential(c));
    }
    add(Resource::MeshConfig(gateway::mesh_config(state)));
    out
}

/// DestinationRules by the host they qualify to. Several of one host merge as in Istio: in age order, each
/// adds the subsets not defined yet (with their policies), the first with a top-level policy gives it, and
/// the oldest is named as the subsets' origin.
fn destination_rules(state: &ClusterState) -> HashMap<String, SubsetsOf<'_>> {
    let mut by_host: HashMap<String, SubsetsOf> = HashMap::new();
    let mut rules: Vec<_> = state.destination_rules.iter().collect();
    rules.sort_by(|a, b| istio_order(*a, *b));
    for dr in rules {
        let ns = dr.namespace().unwrap_or_default();
        let origin = Origin::new("DestinationRule", &ns, &dr.name_any(), dr.metadata.generation);
        let merged = by_host.entry(qualify(&dr.spec.host, &ns)).or_insert_with(|| SubsetsOf {
            origin: origin.clone(),
            subsets: Vec::new(),
            policies: resilience::Policies::default(),
        });
        for subset in &dr.spec.subsets {
            if !merged.subsets.iter().any(|(name, _)| *name == subset.name) {
                merged.subsets.push((subset.name.as_str(), &subset.labels));
                merged.policies.add_subset(subset, &origin);
            }
        }
        merged.policies.add_top(dr.spec.traffic_policy.as_ref(), &origin);
    }
    by_host
}

/// Each node's locality, from its topology labels.
fn node_localities(state: &ClusterState) -> HashMap<&str, String> {
    let mut localities = HashMap::new();
    for node in &state.nodes {
        if let (Some(name), Some(locality)) = (node.metadata.name.as_deref(), crate::cluster::node_locality(node)) {
            localities.insert(name, locality);
        }
    }
    localities
}

/// The pods, each with its locality: its own label's (set when it was read), else its node's.
fn with_localities(pods: &[Pod], nodes: &HashMap<&str, String>) -> Vec<Pod> {
    let node_of = |pod: &Pod| pod.node.as_deref().and_then(|n| nodes.get(n).cloned());
    pods.iter().map(|p| Pod { locality: p.locality.clone().or_else(|| node_of(p)), ..p.clone() }).collect()
}

fn destination(d: &Destination, weight: Option<i64>, namespace: &str, services: &HashMap<String, String>) -> WeightedDestination {
    let host = qualify(&d.host, namespace);
    WeightedDestination {
        service: services.get(&host).cloned().unwrap_or(host),
        subset: d.subset.clone(),
        port: d.port.as_ref().map(|p| p.number as u16),
        weight: u32::try_from(weight.unwrap_or(0)).unwrap_or(0),
        ..Default::default()
    }
}

/// Istio's weights are relative; a single destination takes everything whatever its weight.
fn normalize(mut destinations: Vec<WeightedDestination>) -> Vec<WeightedDestination> {
    if destinations.len() == 1 {
        destinations[0].weight = 100;
    }
    destinations
}

/// Whether `host` (a service's hostname) is one `pattern` names: the same name, or a wildcard (`*`, or
/// `*.<suffix>` for any name ending in `.<suffix>`).
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => pattern == host,
    }
}

/// The VirtualService as a route, and which of the services it routes it names by a wildcard host.
fn route(vs: &VirtualService, services: &HashMap<String, String>) -> (Route, Vec<String>) {
    let ns = vs.namespace().unwrap_or_default();
    let mesh = vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh");
    let (mut exact, mut by_wildcard) = (Vec::new(), Vec::new());
    for host in vs.spec.hosts.iter().filter(|_| mesh).map(|h| qualify(h, &ns)) {
        if !host.starts_with('*') {
            exact.extend(services.get(&host).cloned());
            continue;
        }
        let matched = services.iter().filter(|(hostname, _)| host_matches(&host, hostname));
        by_wildcard.extend(matched.map(|(_, key)| key.clone()));
    }
    by_wildcard.sort();
    by_wildcard.dedup();
    // A service named both exactly and by a wildcard is named exactly.
    by_wildcard.retain(|s| !exact.contains(s));
    let resolved: Vec<String> = exact.iter().chain(&by_wildcard).cloned().collect();
    let route = Route {
        origin: Origin::new("VirtualService", &ns, &vs.name_any(), vs.metadata.generation),
        services: resolved,
        hosts: vs.spec.hosts.clone(),
        gateways: vs.spec.gateways.clone(),
        http: vs.spec.http.iter().map(|h| http_rule(h, &ns, services)).collect(),
        tcp: vs.spec.tcp.iter().flat_map(|t| tcp_rules(t, &ns, services)).collect(),
        tls: vs.spec.tls.iter().filter_map(|t| tls_rule(t, &ns, services)).collect(),
        connect_fault: vs.metadata.annotations.as_ref().and_then(|a| crate::connect_fault::parse(a).ok().flatten()),
    };
    (route, by_wildcard)
}

/// One `http` rule as the agent's proxy applies it. A rule that answers itself (`redirect`,
/// `directResponse`) has no destinations, whatever `route` says (validation rejects both together).
fn http_rule(h: &HttpRoute, namespace: &str, services: &HashMap<String, String>) -> HttpRule {
    let answered = h.redirect.is_some() || h.direct_response.is_some();
    let destinations = h.route.iter().filter(|_| !answered).map(|d| WeightedDestination {
        headers: header_operations(&d.headers),
        ..destination(&d.destination, d.weight, namespace, services)
    });
    HttpRule {
        name: h.name.clone(),
        matches: h.matches.clone(),
        destinations: normalize(destinations.collect()),
        timeout_ms: h.timeout.as_deref().and_then(duration_ms),
        retries: h.retries.as_ref().map(resilience::retry_policy),
        fault: h.fault.as_ref().map(|f| Fault {
            delay_ms: f.delay.as_ref().and_then(|d| d.fixed_delay.as_deref()).and_then(duration_ms),
            delay_percent: f.delay.as_ref().map(|d| fault_percent(&d.percentage, d.percent)).unwrap_or(0.0),
            abort_http_status: f.abort.as_ref().and_then(|a| a.http_status).and_then(|s| u16::try_from(s).ok()),
            abort_grpc_status: f.abort.as_ref().and_then(|a| a.grpc_status.as_deref()).and_then(grpc_code),
            abort_percent: f.abort.as_ref().map(|a| fault_percent(&a.percentage, a.percent)).unwrap_or(0.0),
        }),
        headers: header_operations(&h.headers),
        rewrite: h.rewrite.as_ref().map(|r| Rewrite {
            uri: r.uri.clone(),
            uri_regex: r
                .uri_regex_rewrite
                .as_ref()
                .map(|x| RegexRewrite { pattern: x.pattern.clone(), rewrite: x.rewrite.clone() }),
            authority: r.authority.clone(),
        }),
        redirect: h.redirect.as_ref().map(|r| Redirect {
            uri: r.uri.clone(),
            authority: r.authority.clone(),
            port: r.port.and_then(|p| u16::try_from(p).ok()),
            scheme: r.scheme.clone(),
            status: r.redirect_code.and_then(|c| u16::try_from(c).ok()).unwrap_or(301),
        }),
        direct_response: h.direct_response.as_ref().map(|d| DirectResponse {
            status: u16::try_from(d.status).unwrap_or(u16::MAX),
            body: d.body.as_ref().and_then(|b| match (&b.string, &b.bytes) {
                (Some(text), _) => Some(text.clone()),
                (None, Some(encoded)) => base64_decode(encoded).map(|b| String::from_utf8_lossy(&b).into_owned()),
                (None, None) => None,
            }),
        }),
        mirrors: mirrors(h, namespace, services),
    }
}

/// `mirror` (with `mirrorPercentage`, else the legacy `mirrorPercent`, else 100) and then each of
/// `mirrors` (its `percentage`, else 100), resolved like route destinations.
fn mirrors(h: &HttpRoute, namespace: &str, services: &HashMap<String, String>) -> Vec<Mirror> {
    let mirror = |d: &Destination, percent: f64| {
        let to = destination(d, None, namespace, services);
        Mirror { service: to.service, subset: to.subset, port: to.port, percent }
    };
    let single = h.mirror.as_ref().map(|d| mirror(d, fault_percent(&h.mirror_percentage, h.mirror_percent)));
    let listed = h.mirrors.iter().map(|m| mirror(&m.destination, fault_percent(&m.percentage, None)));
    single.into_iter().chain(listed).collect()
}

fn header_operations(headers: &Option<istio::Headers>) -> HeaderOperations {
    let ops = |o: &Option<istio::HeaderOperations>| {
        o.as_ref()
            .map(|o| HeaderOps { set: o.set.clone(), add: o.add.clone(), remove: o.remove.clone() })
            .unwrap_or_default()
    };
    let operations = |h: &istio::Headers| HeaderOperations { request: ops(&h.request), response: ops(&h.response) };
    headers.as_ref().map(operations).unwrap_or_default()
}

/// A tcp route as rules the agent evaluates: one per match (matches are alternatives), the port being the
/// only attribute it checks; a match with others is not applied (support names it), so a route whose
/// matches are all unapplied yields no rule instead of routing every client.
/// A `tls` rule; a match naming `destinationSubnets` (not evaluated) is left out, and a rule whose matches
/// are all left out is not applied (it must not take every connection).
fn tls_rule(t: &crate::istio::TlsRoute, namespace: &str, services: &HashMap<String, String>) -> Option<TlsRule> {
    let destinations = normalize(t.route.iter().map(|d| destination(&d.destination, d.weight, namespace, services)).collect());
    let matches: Vec<TlsMatch> = t
        .matches
        .iter()
        .filter(|m| m.destination_subnets.is_empty())
        .map(|m| TlsMatch {
            sni_hosts: m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            port: m.port.and_then(|p| u16::try_from(p).ok()),
            gateways: m.gateways.clone(),
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
        })
        .collect();
    (t.matches.is_empty() || !matches.is_empty()).then_some(TlsRule { matches, destinations })
}

fn tcp_rules(t: &crate::istio::TcpRoute, namespace: &str, services: &HashMap<String, String>) -> Vec<TcpRule> {
    let destinations = normalize(t.route.iter().map(|d| destination(&d.destination, d.weight, namespace, services)).collect());
    if t.matches.is_empty() {
        return vec![TcpRule { port: None, destinations }];
    }
    t.matches
        .iter()
        .filter(|m| {
            m.destination_subnets.is_empty()
                && m.source_labels.is_empty()
                && m.gateways.is_empty()
                && m.source_namespace.is_none()
                && m.source_subnet.is_none()
        })
        .map(|m| TcpRule { port: m.port.and_then(|p| u16::try_from(p).ok()), destinations: destinations.clone() })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: bookinfo, labels: {warren.dev/mesh: enabled}}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: bookinfo}\n\
        spec: {clusterIP: 10.96.0.10, selector: {app: reviews}, ports: [{port: 9080, targetPort: 9080}]}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: reviews-v1, namespace: bookinfo, uid: u1, labels: {app: reviews, version: v1}}\n\
        spec: {containers: [], nodeName: n1}\nstatus: {podIP: 10.244.1.2}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: reviews-v3, namespace: bookinfo, uid: u3, labels: {app: reviews, version: v3}}\n\
        spec: {containers: [], nodeName: n2}\nstatus: {podIP: 10.244.2.3}\n";

    fn bookinfo(extra: &[&str]) -> ClusterState {
        let mut state = ClusterState::default();
        state.add_yaml(BASE).unwrap();
        let dir = crate::bookinfo_samples().expect("conformance data");
        for file in extra {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            // The samples have no namespace: they go where the user applies them.
            state.add_yaml(&text.replace("metadata:\n", "metadata:\n  namespace: bookinfo\n")).unwrap();
        }
        state
    }

    #[test]
    fn bookinfo_50_v3_splits_reviews_between_subsets() {
        let compiled = compile(&bookinfo(&["destination-rule-all.yaml", "virtual-service-reviews-50-v3.yaml"]));
        let Resource::Service(reviews) = compiled.resources["service/bookinfo/reviews"].as_ref() else { panic!() };
        assert_eq!(reviews.vips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(reviews.endpoints_in(Some("v3")).map(|e| e.ip.to_string()).collect::<Vec<_>>(), ["10.244.2.3"]);
        assert_eq!(reviews.subset_origin.as_ref().unwrap().name, "reviews");
        let Resource::Route(route) = compiled.resources["route/bookinfo/reviews"].as_ref() else { panic!() };
        assert_eq!(route.services, ["bookinfo/reviews"]);
        let split: Vec<_> = route.http[0].destinations.iter().map(|d| (d.subset.clone().unwrap(), d.weight)).collect();
        assert_eq!(split, [("v1".to_string(), 50), ("v3".to_string(), 50)]);
        // Node n1 sees its own pod and the enrolled pod on n2.
        assert!(compiled.for_node("n1").contains_key("workload/bookinfo/reviews-v3"));
    }

    fn compiled(yaml: &str) -> Compiled {
        let mut state = ClusterState::default();
        state.add_yaml(BASE).unwrap();
        state.add_yaml(yaml).unwrap();
        compile(&state)
    }

    fn route_of<'a>(compiled: &'a Compiled, name: &str) -> &'a Route {
        match compiled.resources[&format!("route/bookinfo/{name}")].as_ref() {
            Resource::Route(r) => r,
            _ => panic!(),
        }
    }

    const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\n";
    const DR: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n";

    #[test]
    fn the_oldest_virtual_service_of_a_host_routes_it() {
        let two = |a_time: &str, b_time: &str| {
            compiled(&format!(
                "{VS}metadata: {{name: a, namespace: bookinfo, creationTimestamp: '{a_time}'}}\nspec: {{hosts: [reviews], tcp: [{{route: [{{destination: {{host: reviews, subset: v1}}}}]}}]}}\n---\n\
                 {VS}metadata: {{name: b, namespace: bookinfo, creationTimestamp: '{b_time}'}}\nspec: {{hosts: [reviews.bookinfo.svc.cluster.local], tcp: [{{route: [{{destination: {{host: reviews, subset: v3}}}}]}}]}}\n"
            ))
        };
        let older_a = two("2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z");
        assert_eq!((route_of(&older_a, "a").services.len(), route_of(&older_a, "b").services.len()), (1, 0));
        let older_b = two("2025-01-01T00:00:00Z", "2024-01-01T00:00:00Z");
        assert_eq!((route_of(&older_b, "a").services.len(), route_of(&older_b, "b").services.len()), (0, 1), "control: the other order");
    }

    #[test]
    fn wildcard_hosts_route_the_services_they_name_and_exact_hosts_win() {
        let c = compiled(&format!(
            "{VS}metadata: {{name: all, namespace: bookinfo, creationTimestamp: '2024-01-01T00:00:00Z'}}\n\
             spec: {{hosts: ['*.bookinfo.svc.cluster.local'], http: [{{route: [{{destination: {{host: reviews, subset: v3}}}}]}}]}}\n---\n\
             {VS}metadata: {{name: ratings-wide, namespace: bookinfo, creationTimestamp: '2024-01-01T00:00:00Z'}}\n\
             spec: {{hosts: ['*.other.svc.cluster.local'], http: [{{route: [{{destination: {{host: reviews}}}}]}}]}}\n"
        ));
        assert_eq!(route_of(&c, "all").services, ["bookinfo/reviews"], "the wildcard names reviews");
        assert!(route_of(&c, "ratings-wide").services.is_empty(), "control: another namespace's suffix");
        let both = compiled(&format!(
            "{VS}metadata: {{name: all, namespace: bookinfo, creationTimestamp: '2024-01-01T00:00:00Z'}}\n\
             spec: {{hosts: ['*'], http: [{{route: [{{destination: {{host: reviews, subset: v3}}}}]}}]}}\n---\n\
             {VS}metadata: {{name: reviews, namespace: bookinfo, creationTimestamp: '2025-01-01T00:00:00Z'}}\n\
             spec: {{hosts: [reviews], http: [{{route: [{{destination: {{host: reviews, subset: v1}}}}]}}]}}\n"
        ));
        assert_eq!(route_of(&both, "reviews").services, ["bookinfo/reviews"], "the exact host wins, though younger");
        assert!(route_of(&both, "all").services.is_empty());
        assert!(host_matches("*.a.b", "x.a.b") && !host_matches("*.a.b", "a.b") && host_matches("*", "x"));
    }

    #[test]
    fn destination_rules_of_one_host_merge_in_age_order() {
        let c = compiled(&format!(
            "{DR}metadata: {{name: late, namespace: bookinfo, creationTimestamp: '2025-01-01T00:00:00Z'}}\n\
             spec: {{host: reviews, subsets: [{{name: v1, labels: {{version: v3}}}}, {{name: v3, labels: {{version: v3}}}}]}}\n---\n\
             {DR}metadata: {{name: early, namespace: bookinfo, creationTimestamp: '2024-01-01T00:00:00Z'}}\n\
             spec: {{host: reviews.bookinfo.svc.cluster.local, subsets: [{{name: v1, labels: {{version: v1}}}}]}}\n"
        ));
        let Resource::Service(reviews) = c.resources["service/bookinfo/reviews"].as_ref() else { panic!() };
        assert_eq!(reviews.subsets, ["v1", "v3"], "both rules' subsets");
        assert_eq!(reviews.subset_origin.as_ref().unwrap().name, "early");
        let ips = |subset| reviews.endpoints_in(Some(subset)).map(|e| e.ip.to_string()).collect::<Vec<_>>();
        assert_eq!((ips("v1"), ips("v3")), (vec!["10.244.1.2".to_string()], vec!["10.244.2.3".to_string()]), "v1 is the older rule's");
    }

    #[test]
    fn localities_come_from_pod_labels_else_nodes() {
        let c = compiled(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: n2\n  labels: {topology.kubernetes.io/region: eu-west1, \
             topology.kubernetes.io/zone: eu-west1-b, topology.istio.io/subzone: rack7}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {failure-domain.beta.kubernetes.io/region: us}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: reviews-v2, namespace: bookinfo, uid: u2, \
             labels: {app: reviews, version: v2, istio-locality: us-west.zone1.sub1}}\n\
             spec: {containers: [], nodeName: n1}\nstatus: {podIP: 10.244.1.9}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: legacy, namespace: bookinfo}\nspec: {ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Endpoints\nmetadata: {name: legacy, namespace: bookinfo}\n\
             subsets: [{addresses: [{ip: 10.0.9.1, nodeName: n2}, {ip: 10.0.9.2}], ports: [{port: 80}]}]\n",
        );
        let locality = |key: &str| match c.resources[key].as_ref() {
            Resource::Workload(pod) => pod.locality.clone(),
            _ => panic!(),
        };
        assert_eq!(locality("workload/bookinfo/reviews-v2").as_deref(), Some("us-west/zone1/sub1"), "the pod's label first");
        assert_eq!(locality("workload/bookinfo/reviews-v3").as_deref(), Some("eu-west1/eu-west1-b/rack7"), "else its node's");
        assert_eq!(locality("workload/bookinfo/reviews-v1").as_deref(), Some("us"), "the beta labels too");
        let endpoints = |name: &str| match c.resources[&format!("service/bookinfo/{name}")].as_ref() {
            Resource::Service(s) => s.endpoints.iter().map(|e| (e.ip.to_string(), e.locality.clone())).collect::<Vec<_>>(),
            _ => panic!(),
        };
        let reviews = endpoints("reviews");
        assert!(reviews.contains(&("10.244.1.9".into(), Some("us-west/zone1/sub1".into()))), "{reviews:?}");
        assert!(reviews.contains(&("10.244.2.3".into(), Some("eu-west1/eu-west1-b/rack7".into()))), "{reviews:?}");
        let legacy = [("10.0.9.1".to_string(), Some("eu-west1/eu-west1-b/rack7".to_string())), ("10.0.9.2".to_string(), None)];
        assert_eq!(endpoints("legacy"), legacy, "an Endpoints address: its node's");
        let without_nodes = compiled("");
        assert!(matches!(without_nodes.resources["workload/bookinfo/reviews-v1"].as_ref(), Resource::Workload(p) if p.locality.is_none()));
    }

    #[test]
    fn hosts_qualify_as_istio_and_weights_stay_relative() {
        assert_eq!(qualify("reviews", "shop"), "reviews.shop.svc.cluster.local");
        assert_eq!(qualify("reviews.shop", "x"), "reviews.shop", "a name with a dot is taken as written");
        assert_eq!(qualify("example.com", "x"), "example.com");
        let c = compiled(&format!(
            "{VS}metadata: {{name: r, namespace: bookinfo}}\nspec: {{hosts: [reviews], http: [{{route: [{{destination: {{host: reviews, subset: v1}}, weight: 3}}, {{destination: {{host: reviews, subset: v3}}, weight: 1}}]}}]}}\n"
        ));
        let weights: Vec<u32> = route_of(&c, "r").http[0].destinations.iter().map(|d| d.weight).collect();
        assert_eq!(weights, [3, 1]);
    }

    #[test]
    fn tcp_matches_warren_cannot_evaluate_are_not_applied() {
        let c = compiled(&format!(
            "{VS}metadata: {{name: r, namespace: bookinfo}}\nspec:\n  hosts: [reviews]\n  tcp:\n\
             \x20 - match: [{{sourceLabels: {{app: sleep}}}}]\n    route: [{{destination: {{host: reviews, subset: v3}}}}]\n\
             \x20 - match: [{{port: 9080}}, {{port: 9081}}]\n    route: [{{destination: {{host: reviews, subset: v1}}}}]\n"
        ));
        let rules: Vec<_> = route_of(&c, "r").tcp.iter().map(|t| (t.port, t.destinations[0].subset.clone().unwrap())).collect();
        assert_eq!(rules, [(Some(9080), "v1".to_string()), (Some(9081), "v1".to_string())], "the sourceLabels rule is not applied to everyone");
    }

    fn http_rules(spec: &str) -> Vec<HttpRule> {
        let yaml = format!("{VS}metadata: {{name: r, namespace: bookinfo}}\nspec:\n  hosts: [reviews]\n  http:\n{spec}");
        let c = compiled(&yaml);
        route_of(&c, "r").http.clone()
    }

    fn ops(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> HeaderOps {
        let map = |entries: &[(&str, &str)]| entries.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HeaderOps { set: map(set), add: map(add), remove: remove.iter().map(|r| r.to_string()).collect() }
    }

    #[test]
    fn header_operations_of_rules_and_destinations() {
        let rules = http_rules(
            "  - headers: {request: {set: {x-a: '1'}, add: {x-b: '2'}, remove: [x-c]}, response: {remove: [server]}}\n\
             \x20   route:\n    - destination: {host: reviews, subset: v1}\n      headers: {response: {set: {x-v: v1}}}\n",
        );
        assert_eq!(rules[0].headers.request, ops(&[("x-a", "1")], &[("x-b", "2")], &["x-c"]));
        assert_eq!(rules[0].headers.response, ops(&[], &[], &["server"]));
        let to = &rules[0].destinations[0];
        assert_eq!((to.service.as_str(), to.subset.as_deref(), to.weight), ("bookinfo/reviews", Some("v1"), 100));
        let response = ops(&[("x-v", "v1")], &[], &[]);
        assert_eq!(to.headers, HeaderOperations { request: HeaderOps::default(), response });
    }

    #[test]
    fn matches_timeouts_and_rewrites_are_carried() {
        let rules = http_rules(
            "  - match: [{uri: {prefix: /api/}, headers: {end-user: {exact: jason}}}]\n    timeout: 1.5s\n\
             \x20   rewrite: {uri: /v2/, authority: reviews.example}\n    route: [{destination: {host: reviews}}]\n\
             \x20 - rewrite: {uriRegexRewrite: {match: '^/old/(.*)$', rewrite: '/new/\\1'}}\n    route: [{destination: {host: reviews}}]\n",
        );
        assert_eq!(rules[0].matches[0].uri.as_ref().unwrap().prefix.as_deref(), Some("/api/"));
        assert_eq!(rules[0].matches[0].headers["end-user"].exact.as_deref(), Some("jason"));
        assert_eq!(rules[0].timeout_ms, Some(1500));
        let prefix = Rewrite { uri: Some("/v2/".into()), uri_regex: None, authority: Some("reviews.example".into()) };
        assert_eq!(rules[0].rewrite, Some(prefix));
        let regex = RegexRewrite { pattern: "^/old/(.*)$".into(), rewrite: "/new/\\1".into() };
        assert_eq!(rules[1].rewrite, Some(Rewrite { uri: None, uri_regex: Some(regex), authority: None }));
    }

    #[test]
    fn redirects_and_direct_responses_answer_without_destinations() {
        let rules = http_rules(
            "  - match: [{uri: {exact: /old}}]\n    redirect: {uri: /new, authority: example.com, port: 8080, scheme: https, redirectCode: 308}\n\
             \x20 - redirect: {uri: /elsewhere}\n\
             \x20 - match: [{uri: {prefix: /text}}]\n    directResponse: {status: 503, body: {string: unavailable}}\n\
             \x20 - match: [{uri: {prefix: /bytes}}]\n    directResponse: {status: 200, body: {bytes: aGVsbG8sIHdvcmxk}}\n\
             \x20 - directResponse: {status: 204}\n",
        );
        let redirect = Redirect {
            uri: Some("/new".into()),
            authority: Some("example.com".into()),
            port: Some(8080),
            scheme: Some("https".into()),
            status: 308,
        };
        assert_eq!(rules[0].redirect, Some(redirect));
        let plain = rules[1].redirect.as_ref().map(|r| (r.uri.as_deref(), r.status));
        assert_eq!(plain, Some((Some("/elsewhere"), 301)), "301 by default");
        assert_eq!(rules[2].direct_response, Some(DirectResponse { status: 503, body: Some("unavailable".into()) }));
        let decoded = DirectResponse { status: 200, body: Some("hello, world".into()) };
        assert_eq!(rules[3].direct_response, Some(decoded), "bytes: base64");
        assert_eq!(rules[4].direct_response, Some(DirectResponse { status: 204, body: None }));
        assert!(rules.iter().all(|r| r.destinations.is_empty()), "{rules:#?}");
    }

    #[test]
    fn mirrors_resolve_like_destinations_with_their_percentages() {
        let rules = http_rules(
            "  - route: [{destination: {host: reviews, subset: v1}}]\n    mirror: {host: reviews, subset: v3}\n\
             \x20 - route: [{destination: {host: reviews}}]\n    mirror: {host: shadow.example.com, port: {number: 8080}}\n    mirrorPercentage: {value: 12.5}\n\
             \x20 - route: [{destination: {host: reviews}}]\n    mirror: {host: reviews}\n    mirrorPercent: 30\n\
             \x20 - route: [{destination: {host: reviews}}]\n    mirrors: [{destination: {host: reviews, subset: v3}, percentage: {value: 5}}, {destination: {host: other}}]\n",
        );
        let mirror = |service: &str, subset: Option<&str>, port: Option<u16>, percent: f64| Mirror {
            service: service.into(),
            subset: subset.map(Into::into),
            port,
            percent,
        };
        assert_eq!(rules[0].mirrors, [mirror("bookinfo/reviews", Some("v3"), None, 100.0)], "100% by default");
        assert_eq!(rules[1].mirrors, [mirror("shadow.example.com", None, Some(8080), 12.5)]);
        assert_eq!(rules[2].mirrors, [mirror("bookinfo/reviews", None, None, 30.0)], "the legacy integer");
        let expected =
            [mirror("bookinfo/reviews", Some("v3"), None, 5.0), mirror("other.bookinfo.svc.cluster.local", None, None, 100.0)];
        assert_eq!(rules[3].mirrors, expected, "a host that names no service stays qualified");
    }

    #[test]
    fn faults_carry_http_and_grpc_aborts() {
        let rules = http_rules(
            "  - fault: {delay: {fixedDelay: 7s, percentage: {value: 100}}, abort: {httpStatus: 500, percent: 10}}\n    route: [{destination: {host: reviews}}]\n\
             \x20 - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 50}}}\n    route: [{destination: {host: reviews}}]\n",
        );
        let fault = rules[0].fault.clone().unwrap();
        let http = (fault.delay_ms, fault.delay_percent, fault.abort_http_status, fault.abort_percent);
        assert_eq!(http, (Some(7000), 100.0, Some(500), 10.0));
        let grpc = rules[1].fault.clone().unwrap();
        let code = (grpc.abort_grpc_status, grpc.abort_http_status, grpc.abort_percent, grpc.delay_ms);
        assert_eq!(code, (Some(14), None, 50.0, None));
        assert_eq!(crate::validate::grpc_code("OK"), Some(0));
        assert_eq!(crate::validate::grpc_code("UNAUTHENTICATED"), Some(16));
        assert_eq!(crate::validate::grpc_code("unavailable"), None, "names are upper case, as in Istio");
    }
}
