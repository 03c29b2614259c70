//! What the controller compiles and pushes, and what an agent holds: a set of resources, each keyed, each
//! remembering the object (and generation) it came from. An agent turns the L4 part into eBPF maps and
//! keeps the rest for its proxy.
use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

pub use crate::authz::{Action, Policy};
use crate::{
    http::HttpMatchRequest,
    workloads::{Namespace, Pod, peer_authentication::PeerAuthentication},
};

/// The Kubernetes (or file) object an entry was compiled from.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Origin {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub generation: i64,
}

impl Origin {
    pub fn new(kind: &str, namespace: &str, name: &str, generation: Option<i64>) -> Self {
        Origin {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
            generation: generation.unwrap_or(0),
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)?;
        if self.generation > 0 {
            write!(f, " (generation {})", self.generation)?;
        }
        Ok(())
    }
}

/// One pushed entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Resource {
    Namespace(Namespace),
    Workload(Pod),
    Service(Service),
    Route(Route),
    Policy(Policy),
    PeerAuthentication(PeerAuthentication),
    Gateway(Gateway),
    /// A TLS credential (a `credentialName` Secret), pushed only to the nodes of the gateway pods using it.
    Credential(Credential),
    /// The mesh-wide settings of Istio's `meshConfig` Warren honours.
    MeshConfig(MeshConfig),
}

impl Resource {
    /// Unique within a table set: `<type>/<namespace>/<name>`.
    pub fn key(&self) -> String {
        match self {
            Resource::Namespace(n) => format!("namespace//{}", n.name),
            Resource::Workload(p) => format!("workload/{}/{}", p.namespace, p.name),
            Resource::Service(s) => format!("service/{}/{}", s.namespace, s.name),
            Resource::Route(r) => format!("route/{}/{}", r.origin.namespace, r.origin.name),
            Resource::Policy(p) => format!("policy/{}/{}", p.origin.namespace, p.origin.name),
            Resource::PeerAuthentication(p) => {
                format!("peerauthentication/{}/{}", p.metadata.namespace, p.metadata.name)
            }
            Resource::Gateway(g) => format!("gateway/{}/{}", g.origin.namespace, g.origin.name),
            Resource::Credential(c) => format!("credential/{}/{}", c.namespace, c.name),
            Resource::MeshConfig(_) => "meshconfig//mesh".into(),
        }
    }
}

/// Istio's `meshConfig.outboundTrafficPolicy.mode`: where enrolled pods may connect outside the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTrafficPolicy {
    /// Anywhere (Istio's default): destinations the registry does not know pass through.
    #[default]
    AllowAny,
    /// Only to services, ServiceEntries and mesh workloads; anything else is refused.
    RegistryOnly,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    #[serde(default)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// The ConfigMap it was read from (`istio` in the root namespace), when one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// An Istio Gateway, resolved: the pods its selector picks, and its servers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    pub origin: Origin,
    /// `namespace/name` of the pods whose labels the selector matches (any namespace, as Istio).
    #[serde(default)]
    pub workloads: Vec<String>,
    #[serde(default)]
    pub servers: Vec<GatewayServer>,
}

impl Gateway {
    /// `namespace/name`, as VirtualServices' `gateways` name it once qualified.
    pub fn key(&self) -> String {
        format!("{}/{}", self.origin.namespace, self.origin.name)
    }
}

/// What a gateway server's port carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GatewayProtocol {
    #[default]
    Http,
    Https,
    Http2,
    Grpc,
    Tcp,
    Tls,
}

impl GatewayProtocol {
    pub fn parse(name: &str) -> Option<GatewayProtocol> {
        Some(match name.to_ascii_uppercase().as_str() {
            "HTTP" => GatewayProtocol::Http,
            "HTTPS" => GatewayProtocol::Https,
            "HTTP2" => GatewayProtocol::Http2,
            "GRPC" => GatewayProtocol::Grpc,
            "TCP" => GatewayProtocol::Tcp,
            "TLS" => GatewayProtocol::Tls,
            _ => return None,
        })
    }

    /// Requests are routed one by one (VirtualService `http` rules).
    pub fn is_http(self) -> bool {
        matches!(self, GatewayProtocol::Http | GatewayProtocol::Https | GatewayProtocol::Http2 | GatewayProtocol::Grpc)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayServer {
    /// `spec.servers[i]`: where messages point.
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `port.number` as written.
    pub port: u16,
    /// The ports the gateway pods receive it on: the number itself, and the `targetPort` of a Service port
    /// of that number that selects the gateway pods (as Istio maps a gateway Service's ports).
    pub listen_ports: Vec<u16>,
    pub protocol: GatewayProtocol,
    /// `namespace/host` (a bare host is `*/host`), as written.
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    /// Why the server cannot be served as written (a TLS setting Warren cannot enforce): connections to it
    /// are refused (fail closed) rather than served with less security than asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// `servers[].tls`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerTls {
    pub mode: ServerTlsMode,
    /// `credentialName`: a Secret in the gateway pod's namespace (as Istio looks it up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// `httpsRedirect`: plaintext requests are answered 301 to https.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub https_redirect: bool,
    /// `minProtocolVersion` / `maxProtocolVersion`: TLSV1_2 or TLSV1_3 (`None`: both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_version: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerTlsMode {
    /// Not set: only `httpsRedirect` (or nothing).
    #[default]
    None,
    Simple,
    /// SIMPLE, and the client must present a certificate the credential's CA signed.
    Mutual,
    /// Not terminated: routed by the SNI (VirtualService `tls` rules) and sent on as it is.
    Passthrough,
}

/// A TLS credential: the PEM certificate chain and key (`tls.crt`/`tls.key` or `cert`/`key`), and the CA
/// that client certificates must chain to for MUTUAL (`ca.crt`/`cacert`, or the `<name>-cacert` Secret).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credential {
    pub namespace: String,
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Nodes that run a gateway pod using it: the only agents it is pushed to.
    #[serde(default)]
    pub nodes: Vec<String>,
    pub origin: Origin,
}

/// Never prints the key.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("nodes", &self.nodes)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// A Kubernetes Service or ServiceEntry: its addresses, ports and endpoints (with subset membership).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `name.namespace.svc.cluster.local` (or the ServiceEntry host).
    pub hostname: String,
    #[serde(default)]
    pub vips: Vec<IpAddr>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Subset names a DestinationRule defines for this host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<String>,
    pub origin: Origin,
    /// The DestinationRule that defined the subsets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset_origin: Option<Origin>,
    /// A ServiceEntry's `addresses` that are CIDR blocks (and single addresses): with resolution NONE,
    /// connections to any address in them on a service port are the entry's, and go where the client sent
    /// them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub address_blocks: Vec<crate::authz::IpNet>,
    /// A ServiceEntry's `resolution` (`None` for Kubernetes Services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    /// The DestinationRule's `trafficPolicy` for this host ([`crate::resilience`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<crate::resilience::TrafficPolicy>,
    /// Subsets' own `trafficPolicy`, by subset name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subset_policies: BTreeMap<String, crate::resilience::TrafficPolicy>,
    /// The DestinationRule the policies came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_origin: Option<Origin>,
}

/// ServiceEntry `resolution`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// To the address the client connected to.
    None,
    /// To the listed endpoints' addresses.
    Static,
    /// To the addresses the entry's host (or each endpoint's name) resolves to, looked up at connect time.
    Dns,
    DnsRoundRobin,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    /// TCP or UDP (the transport), as in the Service.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    /// The Service port's `appProtocol` (a ServiceEntry port's `protocol`), as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// What a service port carries, by Istio's protocol selection: the port's `appProtocol`, else its name's
/// prefix (`<protocol>[-<suffix>]`, e.g. `http-web`, `grpc`), else unknown — detected from the first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppProtocol {
    Http,
    Http2,
    Grpc,
    GrpcWeb,
    Https,
    Tls,
    Tcp,
    Mongo,
    Mysql,
    Redis,
    Udp,
    /// Neither `appProtocol` nor the name says: Istio sniffs HTTP/1.1 and HTTP/2, else TCP.
    Detect,
}

impl AppProtocol {
    /// Istio's protocol names (case-insensitive), and Kubernetes' `kubernetes.io/h2c`, `ws`, `wss`.
    pub fn parse(name: &str) -> Option<AppProtocol> {
        Some(match name.to_ascii_lowercase().as_str() {
            "http" | "kubernetes.io/ws" => AppProtocol::Http,
            "http2" | "kubernetes.io/h2c" => AppProtocol::Http2,
            "grpc" => AppProtocol::Grpc,
            "grpc-web" => AppProtocol::GrpcWeb,
            "https" | "kubernetes.io/wss" => AppProtocol::Https,
            "tls" => AppProtocol::Tls,
            "tcp" => AppProtocol::Tcp,
            "mongo" => AppProtocol::Mongo,
            "mysql" => AppProtocol::Mysql,
            "redis" => AppProtocol::Redis,
            "udp" => AppProtocol::Udp,
            _ => return None,
        })
    }

    /// Requests the agent can route one by one (VirtualService `http` rules).
    pub fn is_http(self) -> bool {
        matches!(self, AppProtocol::Http | AppProtocol::Http2 | AppProtocol::Grpc | AppProtocol::GrpcWeb)
    }
}

impl ServicePort {
    pub fn app_protocol(&self) -> AppProtocol {
        if let Some(protocol) = self.app_protocol.as_deref().and_then(AppProtocol::parse) {
            return protocol;
        }
        // `grpc-web` is a protocol of its own, not `grpc` with a suffix.
        let name = self.name.to_ascii_lowercase();
        if name == "grpc-web" || name.starts_with("grpc-web-") {
            return AppProtocol::GrpcWeb;
        }
        name.split('-').next().and_then(AppProtocol::parse).unwrap_or(AppProtocol::Detect)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub ip: IpAddr,
    /// `namespace/name` of the pod, when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Subsets (of [`Service::subsets`]) whose labels this endpoint's pod carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    /// A ServiceEntry endpoint written as a DNS name (resolution DNS): looked up at connect time; `ip`
    /// is unspecified until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

impl Service {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// The policy requests to `subset` at service port `port` get (Istio's merge; defaults when none).
    pub fn cluster_policy(&self, subset: Option<&str>, port: u16) -> crate::resilience::ClusterPolicy {
        let subset_policy = subset.and_then(|s| self.subset_policies.get(s));
        crate::resilience::ClusterPolicy::merge(self.traffic_policy.as_ref(), subset_policy, port)
    }

    pub fn endpoints_in(&self, subset: Option<&str>) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().filter(move |e| subset.is_none_or(|s| e.subsets.iter().any(|x| x == s)))
    }
}

/// One VirtualService, resolved: which services it routes, and how.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub origin: Origin,
    /// `namespace/name` of the services its hosts name (mesh traffic; gateway-bound routes have none).
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// As written; [`Route::binds`] resolves them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpRule>,
    /// `tls` rules: unterminated TLS routed by its SNI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<TlsRule>,
    /// Warren's connection faults for the routed services (the VirtualService's `fault.warren.dev/*`
    /// annotations): decided in the kernel, at connect().
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_fault: Option<ConnectFault>,
}

impl Route {
    /// Whether the route applies to `gateway` (`namespace/name`, or `mesh`): a route with no `gateways` is
    /// the mesh's; a short gateway name is in the route's own namespace, as Istio resolves it.
    pub fn binds(&self, gateway: &str) -> bool {
        if self.gateways.is_empty() {
            return gateway == MESH_GATEWAY;
        }
        self.gateways.iter().any(|g| qualify_gateway(g, &self.origin.namespace) == gateway)
    }
}

/// The reserved gateway name of sidecar (here: agent) traffic.
pub const MESH_GATEWAY: &str = "mesh";

/// A VirtualService's `gateways` entry as `namespace/name` (`mesh` stays `mesh`).
pub fn qualify_gateway(gateway: &str, namespace: &str) -> String {
    match gateway {
        MESH_GATEWAY => gateway.to_string(),
        g if g.contains('/') => g.to_string(),
        g => format!("{namespace}/{g}"),
    }
}

/// Connection-level fault injection, a Warren extension: a share of connects to the service fails with
/// ECONNREFUSED, and a share is held `delay_ms` before it reaches the upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectFault {
    #[serde(default)]
    pub abort_percent: f64,
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default)]
    pub delay_percent: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatchRequest>,
    pub destinations: Vec<WeightedDestination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// `retries`; `None`: the rule sets none and gets Istio's default ([`crate::resilience::RetryPolicy::istio_default`]).
    pub retries: Option<crate::resilience::RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Header operations on every request and response of the rule (a destination's add to them).
    #[serde(default, skip_serializing_if = "HeaderOperations::is_empty")]
    pub headers: HeaderOperations,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// Answer with a redirect instead of routing (`destinations` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    /// Answer directly instead of routing (`destinations` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
    /// Copies of each request, sent fire-and-forget (`mirror` and `mirrors`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
}

/// `headers.request` / `headers.response` of a rule or a destination: set (replace), add (append), remove.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOperations {
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub request: HeaderOps,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub response: HeaderOps,
}

impl HeaderOperations {
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderOps {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// `rewrite`: the path (the matched `uri.prefix` replaced, or the whole path for other matches), or by a
/// regex (`uriRegexRewrite`, RE2 syntax, `\1` groups), and the authority (Host).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_regex: Option<RegexRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: String,
    pub rewrite: String,
}

/// `redirect`: each part replaces the request's own; the status is `redirectCode` (301 by default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    pub status: u16,
}

/// `directResponse`: a status and an optional body (its `string`, or `bytes` decoded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// One mirror: where copies go and which share of requests is copied (`mirrorPercentage`, 100 by default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    /// `namespace/name` of the service.
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub percent: f64,
}

/// One `tls` rule: its match blocks (any of them; none: every connection) and where it sends them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<TlsMatch>,
    pub destinations: Vec<WeightedDestination>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsMatch {
    /// Names the ClientHello's SNI must match (`*.example.com` wildcards), lower case.
    pub sni_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// As written; qualified with the route's namespace when matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRule {
    /// Only connections to this service port; `None`: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub destinations: Vec<WeightedDestination>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedDestination {
    /// `namespace/name` of the destination service.
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Percent of traffic (all destinations of a rule sum to 100).
    pub weight: u32,
    /// Header operations for requests sent to (and responses from) this destination.
    #[serde(default, skip_serializing_if = "HeaderOperations::is_empty")]
    pub headers: HeaderOperations,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    #[serde(default)]
    pub delay_percent: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_http_status: Option<u16>,
    /// `abort.grpcStatus` as its numeric code (`UNAVAILABLE` → 14): answered as HTTP 200 with trailers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_grpc_status: Option<u32>,
    #[serde(default)]
    pub abort_percent: f64,
}

/// A whole table set, keyed like the push.
pub type Tables = BTreeMap<String, Resource>;

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, app_protocol: Option<&str>) -> ServicePort {
        ServicePort { name: name.into(), port: 9080, target_port: 9080, protocol: "TCP".into(), app_protocol: app_protocol.map(Into::into) }
    }

    #[test]
    fn protocols_as_istio_selects_them() {
        assert_eq!(port("http", None).app_protocol(), AppProtocol::Http, "bookinfo's port names");
        assert_eq!(port("http-web", None).app_protocol(), AppProtocol::Http);
        assert_eq!(port("grpc-api", None).app_protocol(), AppProtocol::Grpc);
        assert_eq!(port("grpc-web", None).app_protocol(), AppProtocol::GrpcWeb);
        assert_eq!(port("HTTP2", None).app_protocol(), AppProtocol::Http2, "case-insensitive");
        assert_eq!(port("tcp-db", Some("http")).app_protocol(), AppProtocol::Http, "appProtocol wins over the name");
        assert_eq!(port("web", Some("kubernetes.io/h2c")).app_protocol(), AppProtocol::Http2);
        // Control: a name that is no protocol, and no name at all, leave it to detection.
        assert_eq!(port("web", None).app_protocol(), AppProtocol::Detect);
        assert_eq!(port("", None).app_protocol(), AppProtocol::Detect);
        assert_eq!(port("httpx", Some("nonsense")).app_protocol(), AppProtocol::Detect);
        assert!(AppProtocol::Grpc.is_http() && !AppProtocol::Tcp.is_http() && !AppProtocol::Detect.is_http());
    }
}
