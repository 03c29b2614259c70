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
use warren_api::{
    admin::{AppliedPolicy, KernelVerdict, PoliciesView, WorkloadHits, WorkloadPolicies as ApiWorkloadPolicies},
    authz::{Action, Connection, DecidedBy, Decision, PlaintextVerdict, Policy, WorkloadPolicies, plaintext_table},
    authz::IpNet,
    tables::{Endpoint, MeshConfig, OutboundTrafficPolicy, Resource, Route, Service, Tables, WeightedDestination},
    workloads::{Namespace, Pod, Workloads, peer_authentication::PeerAuthentication},
};

use super::{gateways::GatewayIndex, http_routes::CompiledRoute};
use crate::telemetry::peers::Directory;
use warren_maps::{
    MAX_ROUTE_DESTINATIONS, ROUTE_FROM_VIRTUAL_SERVICE, ROUTE_HAS_FAULT,
    ROUTE_HAS_HTTP_MATCHES, RouteDestination, ServiceKey, ServiceRoute, name_id,
};

/// The pushed tables at one version, indexed.
#[derive(Debug, Default)]
pub struct MeshTables {
    pub version: u64,
    /// The pushed tables but their services, which are held once, in the index ([`MeshTables::all`] has
    /// every entry).
    pub tables: Tables,
    /// The services and their indexes, shared with the previous version when an update changes no service
    /// (a route or policy edit at 10k services then copies nothing of them).
    svc: Arc<ServiceIndex>,
    /// Routes by the service they route, in name order (the first wins, as Istio merges by age).
    routes: HashMap<String, Vec<Arc<Route>>>,
    /// AuthorizationPolicies, oldest first.
    policies: Vec<Arc<Policy>>,
    /// The policies of each enrolled workload, by its addresses: what inbound connections are authorized by.
    authz: HashMap<IpAddr, Arc<WorkloadAuthz>>,
    /// Kernel decision id → (policy, rule index), for naming the kernel's denials.
    decision_ids: HashMap<u32, (Arc<Policy>, u32)>,
    /// The `http` rules routing each service (by the first VirtualService of its routes), compiled.
    http_routes: HashMap<String, Arc<CompiledRoute>>,
    /// Pods by `namespace/name`: the source of a request, for `sourceLabels` / `sourceNamespace` matches.
    pods: HashMap<String, Arc<Pod>>,
    /// The Gateways this node's gateway pods serve.
    gateways: GatewayIndex,
    mesh_config: MeshConfig,
    /// Workload addresses: with the services' endpoint addresses, what the registry knows as a destination.
    workload_ips: std::collections::HashSet<IpAddr>,
    /// Telemetry's names of workloads and services, built on first use (it needs the trust domain).
    directory: std::sync::OnceLock<Directory>,
}

/// The services of one version and what is indexed from them alone.
#[derive(Debug, Default)]
struct ServiceIndex {
    services: HashMap<String, Arc<Service>>,
    by_vip: HashMap<SocketAddr, Arc<Service>>,
    /// By hostname (a ServiceEntry host may be declared in several namespaces), in key order.
    by_hostname: HashMap<String, Vec<Arc<Service>>>,
    /// Endpoint addresses (pod IP, target port) of service ports declared HTTP: where the inbound stage
    /// can decide per request.
    http_endpoints: std::collections::HashSet<SocketAddr>,
    /// Service endpoint addresses (pods, ServiceEntry endpoints). With REGISTRY_ONLY, only these, workload
    /// addresses, service addresses and `address_blocks` are reachable.
    endpoint_ips: std::collections::HashSet<IpAddr>,
    /// ServiceEntry address blocks (resolution NONE) with their service, checked in order.
    address_blocks: Vec<(IpNet, Arc<Service>)>,
}

impl ServiceIndex {
    /// Indexes `services`, in key order (of two services on one VIP:port the later key wins).
    fn new(services: impl Iterator<Item = Service>) -> Self {
        let mut index = ServiceIndex::default();
        for s in services.map(Arc::new) {
            for port in s.ports.iter().filter(|p| p.app_protocol().is_http()) {
                index.http_endpoints.extend(s.endpoints.iter().map(|e| SocketAddr::new(e.ip, port.target_port)));
            }
            for vip in &s.vips {
                for port in &s.ports {
                    index.by_vip.insert(SocketAddr::new(*vip, port.port), s.clone());
                }
            }
            index.endpoint_ips.extend(s.endpoints.iter().filter(|e| e.hostname.is_none()).map(|e| e.ip));
            index.address_blocks.extend(s.address_blocks.iter().map(|block| (*block, s.clone())));
            index.by_hostname.entry(s.hostname.clone()).or_default().push(s.clone());
            index.services.insert(s.key(), s);
        }
        for services in index.by_hostname.values_mut() {
            services.sort_by_key(|s| s.key());
        }
        index
    }
}

/// One workload's policies, compiled for this version.
#[derive(Debug)]
pub struct WorkloadAuthz {
    /// `namespace/name`.
    pub workload: String,
    pub policies: WorkloadPolicies,
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

fn is_service_key(key: &str) -> bool {
    key.starts_with("service/")
}

impl MeshTables {
    pub fn new(version: u64, mut tables: Tables) -> Result<Self> {
        // Services move out of the table set into the index: at 10k services and 100k endpoints they are
        // most of what an agent holds, and are held once.
        let service_keys: Vec<String> = tables.keys().filter(|k| is_service_key(k)).cloned().collect();
        let services = service_keys.iter().filter_map(|key| match tables.remove(key) {
            Some(Resource::Service(s)) => Some(s),
            _ => None,
        });
        let svc = Arc::new(ServiceIndex::new(services));
        Self::indexed(version, tables, svc)
    }

    /// The next version: `update` applied to these tables. An update that changes no service shares this
    /// version's services and their indexes; one that does is applied to a copy of every entry.
    pub fn updated(&self, update: warren_api::push::Update) -> Result<Self> {
        let version = update.version;
        let touches_services =
            update.removals.iter().any(|k| is_service_key(k)) || update.upserts.iter().any(|r| matches!(r, Resource::Service(_)));
        if update.full || touches_services {
            let held = if update.full { Tables::new() } else { self.all() };
            return Self::new(version, warren_api::push::apply(held, update));
        }
        Self::indexed(version, warren_api::push::apply(self.tables.clone(), update), self.svc.clone())
    }

    /// Indexes `tables` (no services in them) around the services in `svc`.
    fn indexed(version: u64, tables: Tables, svc: Arc<ServiceIndex>) -> Result<Self> {
        let mut index = MeshTables { version, svc, gateways: GatewayIndex::new(&tables), ..Default::default() };
        for resource in tables.values() {
            match resource {
                Resource::Route(r) => {
                    let r = Arc::new(r.clone());
                    for service in &r.services {
                        index.routes.entry(service.clone()).or_default().push(r.clone());
                    }
                }
                Resource::Policy(p) => index.policies.push(Arc::new(p.clone())),
                Resource::Workload(p) => {
                    index.workload_ips.extend(p.ips.iter().copied());
                    index.pods.insert(p.key(), Arc::new(p.clone()));
                }
                Resource::MeshConfig(m) => index.mesh_config = m.clone(),
                _ => {}
            }
        }
        index.tables = tables;
        index.index_authz();
        for (service, routes) in &index.routes {
            if let Some(route) = routes.first().filter(|r| !r.http.is_empty()) {
                let compiled = CompiledRoute::compile(route);
                for error in &compiled.errors {
                    tracing::warn!(origin = %route.origin, "{error}; that match block matches nothing");
                }
                index.http_routes.insert(service.clone(), compiled);
            }
        }
        index.check_route_sizes()?;
        Ok(index)
    }

    /// What the eBPF maps cannot hold is refused (NACK) rather than silently cut. Only a routed service can
    /// have more than one destination: its addresses are the ones checked.
    fn check_route_sizes(&self) -> Result<()> {
        for service in self.routes.keys().filter_map(|key| self.svc.services.get(key)) {
            for vip in service.vips.iter().flat_map(|ip| service.ports.iter().map(|p| SocketAddr::new(*ip, p.port))) {
                if let Some(route) = self.l4_route(&vip)
                    && route.destinations.len() > MAX_ROUTE_DESTINATIONS
                {
                    bail!(
                        "{}: service {} has {} weighted destinations; an L4 route holds at most {MAX_ROUTE_DESTINATIONS}",
                        route.origin.unwrap_or_default(),
                        route.service,
                        route.destinations.len()
                    );
                }
            }
        }
        Ok(())
    }

    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.svc.services.get(key)
    }

    /// The service named `hostname` (an HBONE `:authority`), preferring one in `namespace` — the
    /// destination pod's, as ztunnel prefers — else the first by `namespace/name`.
    pub fn service_by_hostname(&self, hostname: &str, namespace: &str) -> Option<&Arc<Service>> {
        let services = self.svc.by_hostname.get(hostname)?;
        services.iter().find(|s| s.namespace == namespace).or(services.first())
    }

    /// The service at a VIP:port, or the ServiceEntry (resolution NONE) whose address block and port
    /// take it.
    pub fn service_at(&self, vip: &SocketAddr) -> Option<&Arc<Service>> {
        self.svc.by_vip.get(vip).or_else(|| {
            let blocks = self.svc.address_blocks.iter().filter(|(block, s)| block.contains(&vip.ip()) && s.port(vip.port()).is_some());
            // The most specific block wins.
            blocks.max_by_key(|(block, _)| block.prefix_len()).map(|(_, s)| s)
        })
    }

    pub fn gateways(&self) -> &GatewayIndex {
        &self.gateways
    }

    pub fn outbound_traffic_policy(&self) -> OutboundTrafficPolicy {
        self.mesh_config.outbound_traffic_policy
    }

    /// Whether the registry knows `destination`: a service address (or a ServiceEntry's block) and port, or
    /// the address of an endpoint or workload. What REGISTRY_ONLY lets through.
    pub fn registered(&self, destination: &SocketAddr) -> bool {
        self.service_at(destination).is_some() || self.svc.endpoint_ips.contains(&destination.ip()) || self.workload_ips.contains(&destination.ip())
    }

    /// The VirtualService routing `service` when it has `tls` rules.
    pub fn tls_route(&self, service: &str) -> Option<&Arc<Route>> {
        self.routes.get(service).and_then(|r| r.first()).filter(|r| !r.tls.is_empty())
    }

    /// The compiled `http` rules that route `service` (`namespace/name`), if a VirtualService has any.
    pub fn http_route(&self, service: &str) -> Option<&Arc<CompiledRoute>> {
        self.http_routes.get(service)
    }

    /// Whether inbound connections to `destination` (a pod address and port) are authorized per request:
    /// the port is a declared-HTTP port of a service the pod backs, and the pod's policies name request
    /// attributes (otherwise the connection's decision is every request's).
    pub fn authorizes_requests(&self, destination: &SocketAddr) -> bool {
        self.svc.http_endpoints.contains(destination)
            && self.authz.get(&destination.ip()).is_some_and(|a| a.policies.need_requests())
    }

    /// The workload and service names telemetry labels this version's traffic with.
    pub fn directory(&self, trust_domain: &str) -> &Directory {
        self.directory.get_or_init(|| Directory::new(self.pods.values().map(|p| p.as_ref()), self.svc.services.values(), trust_domain))
    }

    /// Whether `destination` (a pod address and port) is a declared-HTTP port of a service the pod backs:
    /// the destination's agent serves it request by request.
    pub fn inbound_http(&self, destination: &SocketAddr) -> bool {
        self.svc.http_endpoints.contains(destination)
    }

    /// [`MeshTables::inbound_http`] for a connection whose client addressed `service_host` (its proxy's
    /// claim in the CONNECT, `name[:port]`): a pod port that two services declare differently (`http` in
    /// one, `tcp-…` in the other) is served per request only when the addressed service's port there is
    /// HTTP — a client of the TCP port gets its bytes through as they are. No claim, or one naming no
    /// service with this pod behind that port: as declared.
    pub fn inbound_http_for(&self, destination: &SocketAddr, service_host: Option<&str>, namespace: &str) -> bool {
        let declared = self.inbound_http(destination);
        let Some(claim) = service_host else { return declared };
        let host = claim.rsplit_once(':').filter(|(_, port)| port.parse::<u16>().is_ok()).map_or(claim, |(host, _)| host);
        let addressed = self
            .service_by_hostname(host, namespace)
            .filter(|s| s.endpoints.iter().any(|e| e.ip == destination.ip()))
            .and_then(|s| s.ports.iter().find(|p| p.target_port == destination.port()));
        addressed.map_or(declared, |port| port.app_protocol().is_http())
    }

    /// A pod by `namespace/name`.
    pub fn pod(&self, key: &str) -> Option<&Arc<Pod>> {
        self.pods.get(key)
    }

    /// Connection-level routing for `vip` (a service address and port): the first TCP rule for the port,
    /// else — on a port declared HTTP, whose requests the L7 proxy routes one by one — the catch-all HTTP
    /// rule (what most requests take, shown in the map), else the service's own endpoints. As in Istio,
    /// `http` rules never route a TCP connection.
    pub fn l4_route(&self, vip: &SocketAddr) -> Option<L4Route> {
        let service = self.svc.by_vip.get(vip)?;
        let key = service.key();
        let own = || vec![WeightedDestination { service: key.clone(), subset: None, port: None, weight: 100, ..Default::default() }];
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
        let declared_http = service.port(vip.port()).is_some_and(|p| p.app_protocol().is_http());
        let http = route.http.iter().filter(|_| declared_http).find(|h| h.matches.is_empty()).map(|h| &h.destinations);
        let destinations = tcp.or(http).cloned().unwrap_or_else(own);
        Some(L4Route { service: key, destinations, origin: Some(route.origin.to_string()), flags })
    }

    /// CONNECT_FAULTS as it must be: every address and port of each service a connection fault's route
    /// routes (shares as parts per million).
    pub fn connect_faults(&self) -> BTreeMap<ServiceKey, warren_maps::ConnectFault> {
        let per_million = |percent: f64| (percent.clamp(0.0, 100.0) * 10_000.0).round() as u32;
        let mut out = BTreeMap::new();
        // From the routes (a few) rather than every address: each routed service's addresses it holds.
        let faulted = self.routes.iter().filter_map(|(key, routes)| Some((self.svc.services.get(key)?, routes.first()?.connect_fault.as_ref()?)));
        let addresses = faulted.flat_map(|(service, fault)| {
            let vips = service.vips.iter().flat_map(|ip| service.ports.iter().map(|p| SocketAddr::new(*ip, p.port)));
            vips.filter(|vip| self.svc.by_vip.get(vip).is_some_and(|s| Arc::ptr_eq(s, service))).map(move |vip| (vip, fault))
        });
        for (vip, fault) in addresses {
            let value = warren_maps::ConnectFault {
                abort_per_million: per_million(fault.abort_percent),
                delay_per_million: per_million(fault.delay_percent),
                delay_ms: u32::try_from(fault.delay_ms).unwrap_or(u32::MAX),
                _pad: 0,
            };
            out.insert(ServiceKey::new(vip), value);
        }
        out
    }

    /// SERVICE_ROUTES as it must be.
    pub fn service_routes(&self) -> BTreeMap<ServiceKey, ServiceRoute> {
        let mut out = BTreeMap::new();
        for vip in self.svc.by_vip.keys() {
            let Some(route) = self.l4_route(vip) else {
                continue;
            };
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

    /// Groups the policies per enrolled workload, once per version (in each group by namespace/name, the
    /// tables' order: which of several matching policies is named does not change the decision).
    fn index_authz(&mut self) {
        for policy in &self.policies {
            let name = policy.name();
            for rule in &policy.rules {
                let id = warren_api::authz::decision_id(&name, rule.index);
                self.decision_ids.entry(id).or_insert_with(|| (policy.clone(), rule.index));
            }
        }
        for pod in self.workloads().enrolled_pods() {
            let entry = Arc::new(WorkloadAuthz {
                workload: pod.key(),
                policies: WorkloadPolicies::for_workload(&self.policies, pod),
            });
            for ip in &pod.ips {
                self.authz.insert(*ip, entry.clone());
            }
        }
    }

    /// The policies of the enrolled workload at `ip`.
    pub fn authz_at(&self, ip: &IpAddr) -> Option<&Arc<WorkloadAuthz>> {
        self.authz.get(ip)
    }

    /// Istio's decision for an inbound connection (no policy, or no enrolled workload there: allowed).
    pub fn authorize(&self, connection: &Connection) -> Decision {
        match self.authz.get(&connection.destination_ip) {
            Some(workload) => workload.policies.evaluate(connection),
            None => Decision { allowed: true, by: DecidedBy::NoPolicy },
        }
    }

    /// The plaintext verdicts the kernel applies (sk_lookup), for the enrolled pods on `node`.
    pub fn l4_authz(&self, node: &str) -> Vec<PlaintextVerdict> {
        self.l4_authz_within(node, warren_maps::MAX_L4_AUTHZ as usize)
    }

    /// [`MeshTables::l4_authz`] in at most `capacity` entries. When the workloads' tables do not all fit, the
    /// largest are left to the agent, which decides their plaintext clients at its inbound listener with the
    /// same evaluation (slower — the connection reaches the agent — but never wider).
    pub fn l4_authz_within(&self, node: &str, capacity: usize) -> Vec<PlaintextVerdict> {
        let workloads = self.workloads();
        let mut tables: Vec<(String, Vec<PlaintextVerdict>)> = workloads
            .enrolled_pods()
            .into_iter()
            .filter(|p| p.is_on(node))
            .filter_map(|pod| {
                let authz = pod.ips.first().and_then(|ip| self.authz.get(ip))?;
                Some((pod.key(), plaintext_table(&authz.policies, &pod.ips)))
            })
            .collect();
        let mut total: usize = tables.iter().map(|(_, t)| t.len()).sum();
        if total > capacity {
            tables.sort_by_key(|(_, t)| std::cmp::Reverse(t.len()));
            while total > capacity {
                let (workload, table) = tables.remove(0);
                total -= table.len();
                tracing::warn!(workload, entries = table.len(), capacity,
                    "AuthorizationPolicy: the kernel table is full; this workload's plaintext clients are decided by the agent");
            }
        }
        tables.into_iter().flat_map(|(_, t)| t).collect()
    }

    /// Who a kernel decision id names (policy `namespace/name`, its action, the rule index), for the
    /// kernel's denial events.
    pub fn decision_named(&self, id: u32) -> Option<(Arc<Policy>, u32)> {
        self.decision_ids.get(&id).cloned()
    }

    /// Every entry of the pushed tables, services included (what the next update applies to).
    pub fn all(&self) -> Tables {
        let services = self.svc.services.iter().map(|(key, s)| (format!("service/{key}"), Resource::Service(Service::clone(s))));
        self.tables.clone().into_iter().chain(services).collect()
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

    /// One endpoint of `service` (or its subset), the `pick`-th modulo their number.
    pub fn endpoint(&self, service: &str, subset: Option<&str>, pick: usize) -> Option<&Endpoint> {
        let s = self.svc.services.get(service)?;
        let endpoints: Vec<_> = s.endpoints_in(subset).collect();
        (!endpoints.is_empty()).then(|| endpoints[pick % endpoints.len()])
    }
}

impl MeshTables {
    /// What `inspect services|routes|faults|policies` shows: every entry with the object it came from.
    pub fn view(&self) -> serde_json::Value {
        use serde_json::json;
        // By name: the same tables always show the same way.
        let by_name: BTreeMap<_, _> = self.svc.services.iter().collect();
        let services: Vec<_> = by_name
            .into_values()
            .map(|s| {
                let routes: Vec<_> = s
                    .vips
                    .iter()
                    .flat_map(|vip| s.ports.iter().map(move |p| SocketAddr::new(*vip, p.port)))
                    .filter_map(|vip| {
                        self.l4_route(&vip).map(
                            |r| json!({"vip": vip.to_string(), "destinations": r.destinations, "origin": r.origin}),
                        )
                    })
                    .collect();
                json!({
                    "name": s.key(), "hostname": s.hostname, "vips": s.vips, "ports": s.ports,
                    "protocols": s.ports.iter().map(|p| (p.port.to_string(), p.app_protocol())).collect::<BTreeMap<_, _>>(),
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
                if let Some(f) = &r.connect_fault {
                    let delay = (f.delay_ms > 0).then_some(f.delay_ms);
                    let fault = json!({"delayMs": delay, "delayPercent": f.delay_percent,
                        "abortConnect": f.abort_percent > 0.0, "abortPercent": f.abort_percent});
                    faults.push(json!({"origin": r.origin.to_string(), "rule": "connect (eBPF)",
                        "services": r.services, "matches": [], "fault": fault}));
                }
            }
        }
        let policies: Vec<_> = self
            .policies
            .iter()
            .map(|p| json!({"origin": p.origin.to_string(), "action": p.action, "meshWide": p.mesh_wide, "selector": p.selector, "rules": p.rules}))
            .collect();
        json!({"version": self.version, "services": services, "routes": routes, "faults": faults, "policies": policies,
            "gateways": self.gateways.view(), "outboundTrafficPolicy": self.mesh_config.outbound_traffic_policy})
    }

    /// What `inspect policies` shows: per enrolled workload on `node`, the policies that apply in evaluation
    /// order with their `hits`; and the kernel's plaintext table.
    /// Where this node's workloads run (the first enrolled pod on `node` with a locality): the client
    /// locality `inspect endpoints` ranks priorities from, as the proxy does per request.
    pub fn node_locality(&self, node: &str) -> Option<warren_api::resilience::Locality> {
        self.workloads().enrolled_pods().into_iter().filter(|p| p.is_on(node)).find_map(Pod::parsed_locality)
    }

    pub fn policies_view(&self, node: &str, hits: &[WorkloadHits]) -> PoliciesView {
        let workloads = self.workloads();
        let mut view = PoliciesView { version: self.version, ..Default::default() };
        for pod in workloads.enrolled_pods().into_iter().filter(|p| p.is_on(node)) {
            let Some(authz) = pod.ips.first().and_then(|ip| self.authz.get(ip)) else {
                continue;
            };
            let hits_of = |policy: &str| {
                hits.iter()
                    .find(|h| h.workload == authz.workload)
                    .and_then(|h| h.policies.get(policy).copied())
                    .unwrap_or_default()
            };
            let mut applied: Vec<AppliedPolicy> = authz
                .policies
                .in_evaluation_order()
                .map(|p| AppliedPolicy {
                    policy: p.name(),
                    action: p.action,
                    rules: p.rules.len(),
                    hits: hits_of(&p.name()),
                })
                .collect();
            if !authz.policies.allow.is_empty() {
                applied.push(AppliedPolicy { policy: "-".into(), action: Action::Allow, rules: 0, hits: hits_of("-") });
            }
            view.workloads.push(ApiWorkloadPolicies {
                workload: authz.workload.clone(),
                addresses: pod.ips.clone(),
                policies: applied,
            });
        }
        view.kernel = self
            .l4_authz(node)
            .into_iter()
            .map(|v| KernelVerdict {
                destination: v.destination,
                port: (v.port != 0).then_some(v.port),
                source: v.source,
                allowed: v.allowed,
                decided_by: match self.decision_named(v.decision_id) {
                    Some((policy, rule)) if !v.allowed => format!("{}#{rule}", policy.name()),
                    _ => "-".into(),
                },
            })
            .collect();
        view
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

    /// Namespace shop, service reviews with its pod r1 on n1 and its subsets, then `yaml`.
    fn state(yaml: &str) -> ClusterState {
        let mut state = ClusterState::default();
        state
            .add_yaml(
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {warren.dev/mesh: enabled}}\n---\n\
                 apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\n\
                 spec: {clusterIP: 10.96.0.10, selector: {app: reviews}, ports: [{name: http, port: 9080}]}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata: {name: r1, namespace: shop, uid: u1, labels: {app: reviews, version: v1}}\n\
                 spec: {containers: [], nodeName: n1}\nstatus: {podIP: 10.244.1.2}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}\n\
                 spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}\n",
            )
            .unwrap();
        state.add_yaml(yaml).unwrap();
        state
    }

    fn tables(yaml: &str) -> MeshTables {
        let state = state(yaml);
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
        let d = |subset: &str, weight| WeightedDestination {
            service: "s".into(),
            subset: Some(subset.into()),
            port: None,
            weight,
            ..Default::default()
        };
        let split = [d("a", 3), d("b", 1)];
        let picks: Vec<_> = (0..8).map(|roll| pick_weighted(&split, roll).unwrap().subset.clone().unwrap()).collect();
        assert_eq!(picks, ["a", "a", "a", "b", "a", "a", "a", "b"], "3:1 of every 4 rolls");
        let zero = [d("a", 0), d("b", 5)];
        assert!(
            (0..10).all(|roll| pick_weighted(&zero, roll).unwrap().subset.as_deref() == Some("b")),
            "weight 0 gets nothing"
        );
    }

    fn policy(spec: &str) -> MeshTables {
        tables(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {spec}\n"
        ))
    }

    /// What the kernel refuses: (port, source prefix) of each deny entry for the pod.
    fn kernel_denies(t: &MeshTables) -> Vec<(u16, String)> {
        t.l4_authz("n1").iter().filter(|v| !v.allowed).map(|v| (v.port, v.source.to_string())).collect()
    }

    fn allowed(t: &MeshTables, client: &str, identity: Option<&str>, port: u16) -> bool {
        let destination = SocketAddr::new("10.244.1.2".parse().unwrap(), port);
        t.authorize(&Connection::new(client.parse().unwrap(), identity, destination)).allowed
    }

    const SLEEP: &str = "spiffe://cluster.local/ns/shop/sa/sleep";
    const EVIL: &str = "spiffe://cluster.local/ns/evil/sa/x";

    #[test]
    fn address_and_port_decisions_go_to_the_kernel() {
        assert!(
            kernel_denies(&tables("")).is_empty() && allowed(&tables(""), "10.0.0.1", None, 9080),
            "no policy: allowed"
        );
        let allow_nothing = policy("{}");
        assert_eq!(kernel_denies(&allow_nothing), [(0, "0.0.0.0/0".to_string())]);
        assert!(!allowed(&allow_nothing, "10.0.0.1", Some(SLEEP), 9080), "HBONE clients too");
        let by_port = policy("{action: DENY, rules: [{to: [{operation: {ports: [\"9080\"]}}]}]}");
        assert_eq!(kernel_denies(&by_port), [(9080, "0.0.0.0/0".to_string())]);
        let by_block = policy("{action: DENY, rules: [{from: [{source: {ipBlocks: [10.1.0.0/16]}}]}]}");
        assert_eq!(kernel_denies(&by_block), [(0, "10.1.0.0/16".to_string())]);
        assert!(!allowed(&by_block, "10.1.0.7", Some(SLEEP), 80) && allowed(&by_block, "10.2.0.7", Some(SLEEP), 80));
    }

    #[test]
    fn what_the_kernel_table_cannot_hold_stays_with_the_agent() {
        let by_block = policy("{action: DENY, rules: [{from: [{source: {ipBlocks: [10.1.0.0/16, 10.2.0.0/16]}}]}]}");
        assert_eq!(by_block.l4_authz_within("n1", 3).len(), 3, "control: it fits (every client, and the two blocks)");
        assert!(by_block.l4_authz_within("n1", 2).is_empty(), "too large: left out of the kernel…");
        assert!(!allowed(&by_block, "10.1.0.7", None, 80), "…and the agent still refuses the client");
    }

    #[test]
    fn identity_decisions_stay_with_the_agent() {
        // DENY from namespace evil: a plaintext client has no namespace, so the kernel refuses nothing…
        let by_namespace = policy("{action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}");
        assert!(kernel_denies(&by_namespace).is_empty());
        assert!(allowed(&by_namespace, "10.0.0.1", None, 9080));
        // …and the agent refuses the HBONE client whose certificate says evil.
        assert!(!allowed(&by_namespace, "10.0.0.1", Some(EVIL), 9080));
        assert!(allowed(&by_namespace, "10.0.0.1", Some(SLEEP), 9080), "control: another namespace");
        // ALLOW only sleep: plaintext clients are refused in the kernel, sleep gets in over HBONE.
        let only_sleep = policy("{rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/sleep]}}]}]}");
        assert_eq!(kernel_denies(&only_sleep), [(0, "0.0.0.0/0".to_string())]);
        assert!(allowed(&only_sleep, "10.0.0.1", Some(SLEEP), 9080));
        assert!(!allowed(&only_sleep, "10.0.0.1", Some(EVIL), 9080));
        let view = only_sleep.policies_view("n1", &[]);
        assert_eq!(view.workloads[0].policies.iter().map(|p| p.policy.as_str()).collect::<Vec<_>>(), ["shop/p", "-"]);
    }

    #[test]
    fn a_hostname_names_the_service_in_the_asking_namespace_first() {
        let entry = |ns: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: db, namespace: {ns}}}\n\
                 spec: {{hosts: [db.example.com], ports: [{{number: 5432, name: tcp, protocol: TCP}}], resolution: DNS}}\n---\n"
            )
        };
        let t = tables(&(namespace("zeta") + &entry("zeta") + &namespace("alpha") + &entry("alpha")));
        let found = |ns: &str| t.service_by_hostname("db.example.com", ns).map(|s| s.key());
        assert_eq!(found("zeta").as_deref(), Some("zeta/db"));
        assert_eq!(found("alpha").as_deref(), Some("alpha/db"));
        assert_eq!(found("shop").as_deref(), Some("alpha/db"), "from elsewhere: the first by namespace/name");
        let reviews = t.service_by_hostname("reviews.shop.svc.cluster.local", "zeta").map(|s| s.key());
        assert_eq!(reviews.as_deref(), Some("shop/reviews"), "a Kubernetes service by its FQDN, from any namespace");
        assert!(t.service_by_hostname("nosuch.example.com", "shop").is_none(), "control: no such host");
        assert!(t.service_by_hostname("reviews", "shop").is_none(), "only the full hostname names a service");
    }

    #[test]
    fn a_pod_port_two_services_declare_differently_follows_the_addressed_one() {
        // reviews declares 9080 `http`; reviews-tcp sends its port 80 to the same pod port as `tcp-…`.
        let t = tables(
            "apiVersion: v1\nkind: Service\nmetadata: {name: reviews-tcp, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.11, selector: {app: reviews}, ports: [{name: tcp-reviews, port: 80, targetPort: 9080}]}\n",
        );
        let pod: SocketAddr = "10.244.1.2:9080".parse().unwrap();
        assert!(t.inbound_http(&pod), "declared HTTP by reviews");
        let http = |claim| t.inbound_http_for(&pod, claim, "shop");
        assert!(!http(Some("reviews-tcp.shop.svc.cluster.local")), "a client of the TCP port: its bytes as they are");
        assert!(!http(Some("reviews-tcp.shop.svc.cluster.local:80")), "the claim may carry the service port");
        assert!(http(Some("reviews.shop.svc.cluster.local")), "control: a client of the HTTP port");
        assert!(http(None), "no claim: as declared");
        assert!(http(Some("nosuch.shop.svc.cluster.local")), "a claim naming no service: as declared");
    }

    /// The compiled tables of the base state plus `yaml`, as the controller would push them.
    fn pushed(yaml: &str) -> std::collections::BTreeMap<String, Arc<Resource>> {
        compile(&state(yaml)).for_node("n1")
    }

    fn split(w: u32) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: shop}}\n\
             spec: {{hosts: [reviews], tcp: [{{route: [{{destination: {{host: reviews}}, weight: {w}}}, {{destination: {{host: ratings}}, weight: {}}}]}}]}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: ratings, namespace: shop}}\nspec: {{clusterIP: 10.96.0.11, ports: [{{port: 9080}}]}}\n",
            100 - w
        )
    }

    /// `updated` with the controller's diff from `before` to `after`, and the same tables indexed afresh.
    fn update_and_fresh(before: &str, after: &str) -> (MeshTables, MeshTables, MeshTables) {
        let (old, new) = (pushed(before), pushed(after));
        let plain = |t: &std::collections::BTreeMap<String, Arc<Resource>>| t.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect();
        let held = MeshTables::new(1, plain(&old)).unwrap();
        let updated = held.updated(warren_api::push::diff(2, &old, &new)).unwrap();
        (held, updated, MeshTables::new(2, plain(&new)).unwrap())
    }

    #[test]
    fn an_update_indexes_what_a_fresh_start_would_and_copies_no_service_it_does_not_change() {
        let (held, updated, fresh) = update_and_fresh(&split(80), &split(30));
        let weights = |t: &MeshTables| {
            let route = t.service_routes()[&ServiceKey::new("10.96.0.10:9080".parse().unwrap())];
            weights_of(&route)
        };
        assert_eq!(weights(&held), [80, 20], "control: the held version's split");
        assert_eq!((weights(&updated), updated.version), (vec![30, 70], 2));
        assert_eq!((updated.service_routes(), updated.connect_faults(), updated.view()), (fresh.service_routes(), fresh.connect_faults(), fresh.view()));
        assert!(Arc::ptr_eq(&held.svc, &updated.svc), "a route edit shares the services");
        // A service's change (a new port) is applied to a copy, and indexed as a fresh start would.
        let (held, updated, fresh) = update_and_fresh(&split(80), &split(80).replace("ports: [{port: 9080}]", "ports: [{port: 9080}, {port: 9090}]"));
        assert!(!Arc::ptr_eq(&held.svc, &updated.svc));
        assert!(updated.service_at(&"10.96.0.11:9090".parse().unwrap()).is_some() && held.service_at(&"10.96.0.11:9090".parse().unwrap()).is_none());
        assert_eq!((updated.service_routes(), updated.view()), (fresh.service_routes(), fresh.view()));
        // A removed route: the service's own endpoints again.
        let (_, updated, fresh) = update_and_fresh(&split(80), "");
        assert_eq!((updated.service_routes(), updated.view()), (fresh.service_routes(), fresh.view()));
        assert_eq!(weights(&updated), [100]);
    }

    fn weights_of(route: &ServiceRoute) -> Vec<u32> {
        route.destinations[..route.destination_count as usize].iter().map(|d| d.weight).collect()
    }

    fn namespace(name: &str) -> String {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n---\n")
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
