//! The tables an agent holds from the controller's push, indexed for the proxy, and the L4 part as the
//! eBPF maps hold it. One function decides the L4 route of a VIP:port ([`MeshTables::l4_route`]); the
//! proxy and the SERVICE_ROUTES map both come from it, so they cannot disagree.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use anyhow::{Result, bail};
use serde::Serialize;
use warren_config::{
    tables::{Action, Policy, Resource, Route, Service, Tables, WeightedDestination},
    workloads::{Namespace, Pod, Workloads, peer_authentication::PeerAuthentication},
};
use warren_maps::{
    MAX_ROUTE_DESTINATIONS, PolicyKey, PolicyVerdict, ROUTE_FROM_VIRTUAL_SERVICE, ROUTE_HAS_FAULT, ROUTE_HAS_HTTP_MATCHES,
    RouteDestination, ServiceKey, ServiceRoute, VERDICT_DENY, name_id,
};

/// The pushed tables at one version, indexed.
#[derive(Debug, Default)]
pub struct MeshTables {
    pub version: u64,
    pub tables: Tables,
    services: HashMap<String, Arc<Service>>,
    by_vip: HashMap<SocketAddr, Arc<Service>>,
    /// Routes by the service they route, in name order (the first wins, as Istio merges by age).
    routes: HashMap<String, Vec<Arc<Route>>>,
    policies: Vec<Policy>,
}

/// A route decision for one VIP:port, whichever source (a VirtualService or the service itself).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct L4Route {
    pub service: String,
    pub destinations: Vec<WeightedDestination>,
    /// The VirtualService, when one routes it.
    pub origin: Option<String>,
    pub flags: u32,
}

impl MeshTables {
    pub fn new(version: u64, tables: Tables) -> Result<Self> {
        let mut index = MeshTables { version, ..Default::default() };
        for resource in tables.values() {
            match resource {
                Resource::Service(s) => {
                    let s = Arc::new(s.clone());
                    for vip in &s.vips {
                        for port in &s.ports {
                            index.by_vip.insert(SocketAddr::new(*vip, port.port), s.clone());
                        }
                    }
                    index.services.insert(s.key(), s);
                }
                Resource::Route(r) => {
                    let r = Arc::new(r.clone());
                    for service in &r.services {
                        index.routes.entry(service.clone()).or_default().push(r.clone());
                    }
                }
                Resource::Policy(p) => index.policies.push(p.clone()),
                _ => {}
            }
        }
        index.tables = tables;
        // What the eBPF maps cannot hold is refused (NACK) rather than silently cut.
        for (vip, service) in &index.by_vip {
            if let Some(route) = index.l4_route(vip)
                && route.destinations.len() > MAX_ROUTE_DESTINATIONS
            {
                bail!(
                    "{}: service {} has {} weighted destinations; an L4 route holds at most {MAX_ROUTE_DESTINATIONS}",
                    route.origin.unwrap_or_default(),
                    service.key(),
                    route.destinations.len()
                );
            }
        }
        Ok(index)
    }

    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    pub fn service_at(&self, vip: &SocketAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(vip)
    }

    /// Connection-level routing for `vip` (a service address and port): the first TCP rule for the port,
    /// else the catch-all HTTP rule (requests are routed per connection until the L7 proxy takes them),
    /// else the service's own endpoints.
    pub fn l4_route(&self, vip: &SocketAddr) -> Option<L4Route> {
        let service = self.by_vip.get(vip)?;
        let key = service.key();
        let own = || vec![WeightedDestination { service: key.clone(), subset: None, port: None, weight: 100 }];
        let Some(route) = self.routes.get(&key).and_then(|r| r.first()) else {
            return Some(L4Route { service: key.clone(), destinations: own(), origin: None, flags: 0 });
        };
        let mut flags = ROUTE_FROM_VIRTUAL_SERVICE;
        if route.http.iter().any(|h| !h.matches.is_empty()) {
            flags |= ROUTE_HAS_HTTP_MATCHES;
        }
        if route.http.iter().any(|h| h.fault.is_some()) {
            flags |= ROUTE_HAS_FAULT;
        }
        let tcp = route.tcp.iter().find(|t| t.port.is_none_or(|p| p == vip.port())).map(|t| &t.destinations);
        let http = route.http.iter().find(|h| h.matches.is_empty()).map(|h| &h.destinations);
        let destinations = tcp.or(http).cloned().unwrap_or_else(own);
        Some(L4Route { service: key, destinations, origin: Some(route.origin.to_string()), flags })
    }

    /// SERVICE_ROUTES as it must be.
    pub fn service_routes(&self) -> BTreeMap<ServiceKey, ServiceRoute> {
        let mut out = BTreeMap::new();
        for vip in self.by_vip.keys() {
            let Some(route) = self.l4_route(vip) else { continue };
            let mut value = ServiceRoute {
                service_id: name_id(route.service.as_bytes()),
                flags: route.flags,
                destination_count: route.destinations.len().min(MAX_ROUTE_DESTINATIONS) as u32,
                ..Default::default()
            };
            for (slot, d) in value.destinations.iter_mut().zip(&route.destinations) {
                *slot = RouteDestination {
                    service_id: name_id(d.service.as_bytes()),
                    subset_id: d.subset.as_ref().map(|s| subset_id(&d.service, s)).unwrap_or(0),
                    port: d.port.unwrap_or(0),
                    _pad: 0,
                    weight: d.weight,
                };
            }
            out.insert(ServiceKey::new(*vip), value);
        }
        out
    }

    /// Policies that apply to `pod`.
    pub fn policies_for<'a>(&'a self, pod: &'a Pod) -> impl Iterator<Item = &'a Policy> {
        self.policies.iter().filter(move |p| p.selects(pod))
    }

    /// Ports of `pod` on which no connection can be allowed (0: every port): an ALLOW policy without rules
    /// (and no other ALLOW policy), or a DENY rule with no source or condition. Everything that depends on
    /// who the client is stays with the proxy.
    pub fn denied_ports(&self, pod: &Pod) -> Vec<u16> {
        let policies: Vec<&Policy> = self.policies_for(pod).collect();
        let allows: Vec<&&Policy> = policies.iter().filter(|p| p.action == Action::Allow).collect();
        if !allows.is_empty() && allows.iter().all(|p| p.rules.as_ref().is_none_or(Vec::is_empty)) {
            return vec![0];
        }
        let mut ports = Vec::new();
        for policy in policies.iter().filter(|p| p.action == Action::Deny) {
            for rule in policy.rules.iter().flatten() {
                if !rule.from.is_empty() || !rule.when.is_empty() {
                    continue;
                }
                if rule.to.is_empty() {
                    ports.push(0);
                }
                for to in &rule.to {
                    let op = &to.operation;
                    if op.not_ports.is_empty() && op.hosts.is_empty() && op.methods.is_empty() && op.paths.is_empty() {
                        if op.ports.is_empty() {
                            ports.push(0);
                        }
                        ports.extend(op.ports.iter().filter_map(|p| p.parse::<u16>().ok()));
                    }
                }
            }
        }
        ports.sort();
        ports.dedup();
        ports
    }

    /// L4_POLICY as it must be, for the enrolled pods on `node`.
    pub fn l4_policy(&self, node: &str) -> BTreeMap<PolicyKey, PolicyVerdict> {
        let workloads = self.workloads();
        let mut out = BTreeMap::new();
        for pod in workloads.enrolled_pods().into_iter().filter(|p| p.is_on(node)) {
            for port in self.denied_ports(pod) {
                for ip in &pod.ips {
                    out.insert(PolicyKey::new(*ip, port), PolicyVerdict { verdict: VERDICT_DENY, _pad: 0 });
                }
            }
        }
        out
    }

    /// Whether an inbound connection to `destination` (an enrolled pod's address) is refused outright.
    pub fn inbound_denied(&self, pod: &Pod, port: u16) -> bool {
        self.denied_ports(pod).iter().any(|p| *p == 0 || *p == port)
    }

    /// The workloads part, as the in-pod manager consumes it.
    pub fn workloads(&self) -> Workloads {
        let mut workloads = Workloads::default();
        for resource in self.tables.values() {
            match resource {
                Resource::Namespace(n) => workloads.namespaces.push(Namespace::clone(n)),
                Resource::Workload(p) => workloads.pods.push(p.clone()),
                Resource::PeerAuthentication(p) => workloads.peer_authentications.push(PeerAuthentication::clone(p)),
                _ => {}
            }
        }
        workloads
    }

    pub fn endpoint_ip(&self, service: &str, subset: Option<&str>, pick: usize) -> Option<IpAddr> {
        let s = self.services.get(service)?;
        let endpoints: Vec<_> = s.endpoints_in(subset).collect();
        (!endpoints.is_empty()).then(|| endpoints[pick % endpoints.len()].ip)
    }
}

impl MeshTables {
    /// What `inspect services|routes|faults|policies` shows: every entry with the object it came from.
    pub fn view(&self, node: &str) -> serde_json::Value {
        use serde_json::json;
        let services: Vec<_> = self
            .services
            .values()
            .map(|s| {
                let routes: Vec<_> = s
                    .vips
                    .iter()
                    .flat_map(|vip| s.ports.iter().map(move |p| SocketAddr::new(*vip, p.port)))
                    .filter_map(|vip| self.l4_route(&vip).map(|r| json!({"vip": vip.to_string(), "destinations": r.destinations, "origin": r.origin})))
                    .collect();
                json!({
                    "name": s.key(), "hostname": s.hostname, "vips": s.vips, "ports": s.ports,
                    "endpoints": s.endpoints.len(), "subsets": s.subsets, "origin": s.origin.to_string(),
                    "subsetOrigin": s.subset_origin.as_ref().map(ToString::to_string), "l4Routes": routes,
                })
            })
            .collect();
        let mut routes = Vec::new();
        let mut faults = Vec::new();
        for resource in self.tables.values() {
            if let Resource::Route(r) = resource {
                routes.push(json!({"origin": r.origin.to_string(), "hosts": r.hosts, "gateways": r.gateways,
                    "services": r.services, "http": r.http, "tcp": r.tcp}));
                for (i, rule) in r.http.iter().enumerate() {
                    if let Some(fault) = &rule.fault {
                        faults.push(json!({"origin": r.origin.to_string(), "rule": format!("http[{i}]"),
                            "services": r.services, "matches": rule.matches, "fault": fault}));
                    }
                }
            }
        }
        let workloads = self.workloads();
        let policies: Vec<_> = self
            .policies
            .iter()
            .map(|p| {
                let applies_to: Vec<String> = workloads.pods.iter().filter(|pod| pod.is_on(node) && p.selects(pod)).map(|pod| pod.key()).collect();
                json!({"origin": p.origin.to_string(), "action": p.action, "selector": p.selector, "rules": p.rules,
                    "appliesToLocal": applies_to})
            })
            .collect();
        let l4_deny: Vec<_> = self
            .l4_policy(node)
            .keys()
            .map(|k| json!({"ip": k.ip_addr().map(|ip| ip.to_string()), "port": if k.port == 0 { json!("*") } else { json!(k.port) }}))
            .collect();
        json!({"version": self.version, "services": services, "routes": routes, "faults": faults,
            "policies": policies, "l4Deny": l4_deny})
    }
}

pub fn subset_id(service: &str, subset: &str) -> u32 {
    name_id(format!("{service}/{subset}").as_bytes())
}

/// Picks a destination by weight, as Istio does: weights are relative (`weight / sum of weights`); `roll` is
/// uniform over a range much larger than the sum. With every weight 0 the first destination is taken.
pub fn pick_weighted(destinations: &[WeightedDestination], roll: u64) -> Option<&WeightedDestination> {
    let total: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return destinations.first();
    }
    let mut point = roll % total;
    destinations.iter().find(|d| {
        let weight = u64::from(d.weight);
        if point < weight {
            return true;
        }
        point -= weight;
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_config::{cluster::ClusterState, compile::compile};

    fn tables(yaml: &str) -> MeshTables {
        let mut state = ClusterState::default();
        state
            .add_yaml(
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {warren.dev/mesh: enabled}}\n---\n\
                 apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\n\
                 spec: {clusterIP: 10.96.0.10, selector: {app: reviews}, ports: [{port: 9080}]}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata: {name: r1, namespace: shop, uid: u1, labels: {app: reviews, version: v1}}\n\
                 spec: {containers: [], nodeName: n1}\nstatus: {podIP: 10.244.1.2}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}\n\
                 spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}\n",
            )
            .unwrap();
        state.add_yaml(yaml).unwrap();
        MeshTables::new(1, compile(&state).tables_for_node("n1")).unwrap()
    }

    #[test]
    fn l4_route_follows_the_virtual_service() {
        let vip: SocketAddr = "10.96.0.10:9080".parse().unwrap();
        let plain = tables("");
        let route = plain.l4_route(&vip).unwrap();
        assert_eq!((route.destinations.len(), route.destinations[0].weight, route.flags), (1, 100, 0));
        let split = tables(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
             spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1}, weight: 80}, {destination: {host: reviews, subset: v2}, weight: 20}]}]}\n",
        );
        let entries = split.service_routes();
        let value = entries[&ServiceKey::new(vip)];
        assert_eq!(value.flags, ROUTE_FROM_VIRTUAL_SERVICE);
        assert_eq!(value.destination_count, 2);
        assert_eq!((value.destinations[0].weight, value.destinations[1].weight), (80, 20));
        assert_eq!(value.destinations[1].subset_id, subset_id("shop/reviews", "v2"));
        let routed = split.l4_route(&vip).unwrap();
        assert_eq!(pick_weighted(&routed.destinations, 79).unwrap().subset.as_deref(), Some("v1"));
        assert_eq!(pick_weighted(&routed.destinations, 80).unwrap().subset.as_deref(), Some("v2"));
    }

    #[test]
    fn weights_are_relative() {
        let d = |subset: &str, weight| WeightedDestination { service: "s".into(), subset: Some(subset.into()), port: None, weight };
        let split = [d("a", 3), d("b", 1)];
        let picks: Vec<_> = (0..8).map(|roll| pick_weighted(&split, roll).unwrap().subset.clone().unwrap()).collect();
        assert_eq!(picks, ["a", "a", "a", "b", "a", "a", "a", "b"], "3:1 of every 4 rolls");
        let zero = [d("a", 0), d("b", 5)];
        assert!((0..10).all(|roll| pick_weighted(&zero, roll).unwrap().subset.as_deref() == Some("b")), "weight 0 gets nothing");
    }

    #[test]
    fn allow_nothing_and_unconditional_deny_are_l4() {
        let ip: IpAddr = "10.244.1.2".parse().unwrap();
        let none = tables("");
        assert!(none.l4_policy("n1").is_empty());
        let allow_nothing = tables(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: shop}\nspec: {}\n",
        );
        assert_eq!(allow_nothing.l4_policy("n1").keys().cloned().collect::<Vec<_>>(), [PolicyKey::new(ip, 0)]);
        let by_port = tables(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n\
             spec: {action: DENY, rules: [{to: [{operation: {ports: [\"9080\"]}}]}]}\n",
        );
        assert_eq!(by_port.l4_policy("n1").keys().cloned().collect::<Vec<_>>(), [PolicyKey::new(ip, 9080)]);
        let by_source = tables(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n\
             spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}\n",
        );
        // Source rules are not enforced yet: the DENY rule fails closed and applies to every client.
        assert_eq!(by_source.l4_policy("n1").keys().cloned().collect::<Vec<_>>(), [PolicyKey::new(ip, 0)]);
        let allow_principal = tables(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n\
             spec: {rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/sleep]}}]}]}\n",
        );
        // …and an ALLOW rule that needs the client's identity matches nothing: the pod allows no one.
        assert_eq!(allow_principal.l4_policy("n1").keys().cloned().collect::<Vec<_>>(), [PolicyKey::new(ip, 0)]);
    }

    #[test]
    fn routes_the_maps_cannot_hold_are_refused() {
        let destinations: Vec<String> = (0..9)
            .map(|i| format!("{{destination: {{host: reviews, subset: v1}}, weight: {}}}", if i == 0 { 92 } else { 1 }))
            .collect();
        let mut state = ClusterState::default();
        state
            .add_yaml(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: shop}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: 9080}}]}}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: wide, namespace: shop}}\n\
                 spec: {{hosts: [reviews], tcp: [{{route: [{}]}}]}}\n",
                destinations.join(", ")
            ))
            .unwrap();
        let err = MeshTables::new(1, compile(&state).tables_for_node("n1")).unwrap_err();
        assert!(err.to_string().contains("at most 8"), "{err}");
    }
}
