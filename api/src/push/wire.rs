//! The push's wire encoding (protocol v2): protobuf messages, declared here with prost's derive (no protoc,
//! no `.proto` build step), mirroring the tables and converted to and from them.
//!
//! What a large mesh is made of is encoded field by field, compactly: namespaces, workloads and services
//! with their endpoints. Addresses are packed into one `bytes` field per list (4 bytes an IPv4 address, 16
//! an IPv6 one; the positions of the IPv6 ones listed apart), and an endpoint that is only an address costs
//! its 4 bytes; what some endpoints carry (pod, node, subsets, locality, DNS name) is listed apart by
//! position. A service's hostname and origin are left out where they are what a Kubernetes Service's would
//! be. The other kinds — routes, policies, PeerAuthentications, gateways, credentials, the mesh config —
//! and a service's traffic policies are few and nested: they travel as their JSON inside the message.
//!
//! Decoding never panics: prost's errors name the message and field that failed, and conversions name the
//! resource and what in it is out of range.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    flows,
    tables::{self, Origin as TableOrigin},
    workloads,
};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Update {
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(bool, tag = "2")]
    pub full: bool,
    #[prost(message, repeated, tag = "3")]
    pub upserts: Vec<Resource>,
    #[prost(string, repeated, tag = "4")]
    pub removals: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(oneof = "resource::Kind", tags = "1, 2, 3, 15")]
    pub kind: Option<resource::Kind>,
}

pub mod resource {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Namespace(super::Namespace),
        #[prost(message, boxed, tag = "2")]
        Workload(Box<super::Workload>),
        #[prost(message, boxed, tag = "3")]
        Service(Box<super::Service>),
        /// Any other kind: [`crate::tables::Resource`] as JSON.
        #[prost(bytes, tag = "15")]
        Json(Vec<u8>),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Namespace {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(btree_map = "string, string", tag = "2")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Workload {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub uid: String,
    /// Packed addresses (see [`pack`]).
    #[prost(bytes = "vec", tag = "4")]
    pub ips: Vec<u8>,
    #[prost(uint32, repeated, tag = "5")]
    pub ips_v6_at: Vec<u32>,
    #[prost(btree_map = "string, string", tag = "6")]
    pub labels: BTreeMap<String, String>,
    #[prost(bool, tag = "7")]
    pub host_network: bool,
    #[prost(string, tag = "8")]
    pub service_account: String,
    #[prost(string, optional, tag = "9")]
    pub node: Option<String>,
    #[prost(string, optional, tag = "10")]
    pub workload: Option<String>,
    #[prost(string, optional, tag = "11")]
    pub locality: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Service {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub name: String,
    /// `None`: `name.namespace.svc.cluster.local`.
    #[prost(string, optional, tag = "3")]
    pub hostname: Option<String>,
    #[prost(bytes = "vec", tag = "4")]
    pub vips: Vec<u8>,
    #[prost(uint32, repeated, tag = "5")]
    pub vips_v6_at: Vec<u32>,
    #[prost(message, repeated, tag = "6")]
    pub ports: Vec<ServicePort>,
    /// Every endpoint's address, in order, packed.
    #[prost(bytes = "vec", tag = "7")]
    pub endpoint_ips: Vec<u8>,
    #[prost(uint32, repeated, tag = "8")]
    pub endpoint_ips_v6_at: Vec<u32>,
    /// What endpoints carry besides their address, by position (ascending).
    #[prost(message, repeated, tag = "9")]
    pub endpoint_details: Vec<EndpointDetail>,
    #[prost(string, repeated, tag = "10")]
    pub subsets: Vec<String>,
    /// Its unset parts are the service's: kind `Service`, its namespace and name.
    #[prost(message, optional, tag = "11")]
    pub origin: Option<Origin>,
    #[prost(message, optional, tag = "12")]
    pub subset_origin: Option<Origin>,
    #[prost(message, optional, tag = "13")]
    pub policy_origin: Option<Origin>,
    #[prost(message, repeated, tag = "14")]
    pub address_blocks: Vec<IpBlock>,
    /// [`tables::Resolution`]: 1 NONE, 2 STATIC, 3 DNS, 4 DNS_ROUND_ROBIN; unset for Kubernetes Services.
    #[prost(uint32, optional, tag = "15")]
    pub resolution: Option<u32>,
    /// [`crate::resilience::TrafficPolicy`] as JSON.
    #[prost(bytes = "vec", optional, tag = "16")]
    pub traffic_policy: Option<Vec<u8>>,
    #[prost(btree_map = "string, bytes", tag = "17")]
    pub subset_policies: BTreeMap<String, Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ServicePort {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    pub port: u32,
    #[prost(uint32, tag = "3")]
    pub target_port: u32,
    #[prost(string, tag = "4")]
    pub protocol: String,
    #[prost(string, optional, tag = "5")]
    pub app_protocol: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EndpointDetail {
    /// The endpoint's position in the service's endpoint list.
    #[prost(uint32, tag = "1")]
    pub index: u32,
    #[prost(string, optional, tag = "2")]
    pub workload: Option<String>,
    #[prost(string, optional, tag = "3")]
    pub node: Option<String>,
    #[prost(string, repeated, tag = "4")]
    pub subsets: Vec<String>,
    #[prost(string, optional, tag = "5")]
    pub locality: Option<String>,
    #[prost(string, optional, tag = "6")]
    pub hostname: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Origin {
    #[prost(string, optional, tag = "1")]
    pub kind: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub namespace: Option<String>,
    #[prost(string, optional, tag = "3")]
    pub name: Option<String>,
    #[prost(int64, tag = "4")]
    pub generation: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct IpBlock {
    /// 4 or 16 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub addr: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub len: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Reply {
    #[prost(oneof = "reply::Kind", tags = "1, 2, 3")]
    pub kind: Option<reply::Kind>,
}

pub mod reply {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(uint64, tag = "1")]
        Ack(u64),
        #[prost(message, tag = "2")]
        Nack(super::Nack),
        #[prost(message, tag = "3")]
        Flows(super::FlowGraph),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Nack {
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(string, tag = "2")]
    pub error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FlowGraph {
    #[prost(string, tag = "1")]
    pub node: String,
    #[prost(uint64, tag = "2")]
    pub window_seconds: u64,
    #[prost(message, repeated, tag = "3")]
    pub edges: Vec<FlowEdge>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRef {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FlowEdge {
    #[prost(message, optional, tag = "1")]
    pub source: Option<WorkloadRef>,
    #[prost(message, optional, tag = "2")]
    pub destination: Option<WorkloadRef>,
    #[prost(string, tag = "3")]
    pub service: String,
    /// 0 HTTP, 1 gRPC, 2 TCP.
    #[prost(uint32, tag = "4")]
    pub protocol: u32,
    #[prost(bool, tag = "5")]
    pub mtls: bool,
    #[prost(string, tag = "6")]
    pub reporter: String,
    #[prost(double, tag = "7")]
    pub rate: f64,
    #[prost(double, tag = "8")]
    pub error_ratio: f64,
    #[prost(double, optional, tag = "9")]
    pub p99_ms: Option<f64>,
    #[prost(double, tag = "10")]
    pub bytes_per_second: f64,
}

/// Addresses as one byte string (4 bytes each IPv4 address, 16 each IPv6 one) and the positions of the
/// IPv6 ones.
pub fn pack<'a>(ips: impl IntoIterator<Item = &'a IpAddr>) -> (Vec<u8>, Vec<u32>) {
    let (mut bytes, mut v6_at) = (Vec::new(), Vec::new());
    for (i, ip) in ips.into_iter().enumerate() {
        match ip {
            IpAddr::V4(v4) => bytes.extend_from_slice(&v4.octets()),
            IpAddr::V6(v6) => {
                bytes.extend_from_slice(&v6.octets());
                v6_at.push(i as u32);
            }
        }
    }
    (bytes, v6_at)
}

/// [`pack`]'s inverse; `what` names the list in errors.
pub fn unpack(bytes: &[u8], v6_at: &[u32], what: &str) -> Result<Vec<IpAddr>, String> {
    let v6_bytes = v6_at.len().checked_mul(16).filter(|n| *n <= bytes.len()).ok_or_else(|| {
        format!("{what}: {} IPv6 positions for {} bytes of addresses", v6_at.len(), bytes.len())
    })?;
    if (bytes.len() - v6_bytes) % 4 != 0 {
        return Err(format!("{what}: {} bytes are not whole addresses ({} of them IPv6)", bytes.len(), v6_at.len()));
    }
    let count = (bytes.len() - v6_bytes) / 4 + v6_at.len();
    let mut ips = Vec::with_capacity(count);
    let (mut rest, mut next_v6) = (bytes, v6_at.iter().peekable());
    for i in 0..count {
        let v6 = next_v6.next_if(|at| **at as usize == i).is_some();
        let (addr, after) = if v6 {
            let (a, after) = rest.split_at(16);
            (IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(a).expect("16 bytes"))), after)
        } else {
            let (a, after) = rest.split_at(4);
            (IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(a).expect("4 bytes"))), after)
        };
        ips.push(addr);
        rest = after;
    }
    if let Some(at) = next_v6.next() {
        return Err(format!("{what}: IPv6 position {at} is not ascending or not below the {count} addresses"));
    }
    Ok(ips)
}

fn port(value: u32, what: &str) -> Result<u16, String> {
    u16::try_from(value).map_err(|_| format!("{what} {value} is not a port"))
}

fn origin_to(origin: &TableOrigin) -> Origin {
    Origin {
        kind: Some(origin.kind.clone()),
        namespace: Some(origin.namespace.clone()),
        name: Some(origin.name.clone()),
        generation: origin.generation,
    }
}

fn origin_from(origin: Origin, (kind, namespace, name): (&str, &str, &str)) -> TableOrigin {
    TableOrigin {
        kind: origin.kind.unwrap_or_else(|| kind.into()),
        namespace: origin.namespace.unwrap_or_else(|| namespace.into()),
        name: origin.name.unwrap_or_else(|| name.into()),
        generation: origin.generation,
    }
}

fn default_hostname(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.svc.cluster.local")
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("tables serialize")
}

fn resolution_to(resolution: tables::Resolution) -> u32 {
    match resolution {
        tables::Resolution::None => 1,
        tables::Resolution::Static => 2,
        tables::Resolution::Dns => 3,
        tables::Resolution::DnsRoundRobin => 4,
    }
}

fn resolution_from(value: u32) -> Result<tables::Resolution, String> {
    Ok(match value {
        1 => tables::Resolution::None,
        2 => tables::Resolution::Static,
        3 => tables::Resolution::Dns,
        4 => tables::Resolution::DnsRoundRobin,
        other => return Err(format!("resolution {other} is none of 1–4")),
    })
}

impl From<&tables::Resource> for Resource {
    fn from(resource: &tables::Resource) -> Resource {
        let kind = match resource {
            tables::Resource::Namespace(n) => {
                resource::Kind::Namespace(Namespace { name: n.name.clone(), labels: n.labels.clone() })
            }
            tables::Resource::Workload(p) => {
                let (ips, ips_v6_at) = pack(&p.ips);
                resource::Kind::Workload(Box::new(Workload {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    uid: p.uid.clone(),
                    ips,
                    ips_v6_at,
                    labels: p.labels.clone(),
                    host_network: p.host_network,
                    service_account: p.service_account.clone(),
                    node: p.node.clone(),
                    workload: p.workload.clone(),
                    locality: p.locality.clone(),
                }))
            }
            tables::Resource::Service(s) => resource::Kind::Service(Box::new(service_to(s))),
            other => resource::Kind::Json(json(other)),
        };
        Resource { kind: Some(kind) }
    }
}

fn service_to(s: &tables::Service) -> Service {
    let (vips, vips_v6_at) = pack(&s.vips);
    let (endpoint_ips, endpoint_ips_v6_at) = pack(s.endpoints.iter().map(|e| &e.ip));
    let endpoint_details = s
        .endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            e.workload.is_some() || e.node.is_some() || !e.subsets.is_empty() || e.locality.is_some() || e.hostname.is_some()
        })
        .map(|(i, e)| EndpointDetail {
            index: i as u32,
            workload: e.workload.clone(),
            node: e.node.clone(),
            subsets: e.subsets.clone(),
            locality: e.locality.clone(),
            hostname: e.hostname.clone(),
        })
        .collect();
    let own = |o: &TableOrigin| Origin {
        kind: (o.kind != "Service").then(|| o.kind.clone()),
        namespace: (o.namespace != s.namespace).then(|| o.namespace.clone()),
        name: (o.name != s.name).then(|| o.name.clone()),
        generation: o.generation,
    };
    let origin = own(&s.origin);
    Service {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        hostname: (s.hostname != default_hostname(&s.namespace, &s.name)).then(|| s.hostname.clone()),
        vips,
        vips_v6_at,
        ports: s
            .ports
            .iter()
            .map(|p| ServicePort {
                name: p.name.clone(),
                port: p.port.into(),
                target_port: p.target_port.into(),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            })
            .collect(),
        endpoint_ips,
        endpoint_ips_v6_at,
        endpoint_details,
        subsets: s.subsets.clone(),
        origin: (origin != Origin::default()).then_some(origin),
        subset_origin: s.subset_origin.as_ref().map(origin_to),
        policy_origin: s.policy_origin.as_ref().map(origin_to),
        address_blocks: s
            .address_blocks
            .iter()
            .map(|b| IpBlock { addr: pack([&b.addr()]).0, len: b.prefix_len().into() })
            .collect(),
        resolution: s.resolution.map(resolution_to),
        traffic_policy: s.traffic_policy.as_ref().map(json),
        subset_policies: s.subset_policies.iter().map(|(k, v)| (k.clone(), json(v))).collect(),
    }
}

impl TryFrom<Resource> for tables::Resource {
    type Error = String;

    fn try_from(resource: Resource) -> Result<tables::Resource, String> {
        Ok(match resource.kind {
            None => return Err("a resource of no kind (a newer controller's?)".into()),
            Some(resource::Kind::Namespace(n)) => {
                tables::Resource::Namespace(workloads::Namespace { name: n.name, labels: n.labels })
            }
            Some(resource::Kind::Workload(w)) => {
                let what = format!("workload {}/{}", w.namespace, w.name);
                tables::Resource::Workload(workloads::Pod {
                    ips: unpack(&w.ips, &w.ips_v6_at, &format!("{what}: ips"))?,
                    name: w.name,
                    namespace: w.namespace,
                    uid: w.uid,
                    labels: w.labels,
                    host_network: w.host_network,
                    service_account: w.service_account,
                    node: w.node,
                    workload: w.workload,
                    locality: w.locality,
                })
            }
            Some(resource::Kind::Service(s)) => tables::Resource::Service(service_from(*s)?),
            Some(resource::Kind::Json(bytes)) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("a resource's JSON: {e}"))?
            }
        })
    }
}

fn service_from(s: Service) -> Result<tables::Service, String> {
    let what = format!("service {}/{}", s.namespace, s.name);
    let ips = unpack(&s.endpoint_ips, &s.endpoint_ips_v6_at, &format!("{what}: endpoint addresses"))?;
    let count = ips.len();
    let mut endpoints: Vec<tables::Endpoint> = ips
        .into_iter()
        .map(|ip| tables::Endpoint { ip, workload: None, node: None, subsets: vec![], locality: None, hostname: None })
        .collect();
    let mut last = None;
    for detail in s.endpoint_details {
        let index = detail.index as usize;
        if index >= count || last.is_some_and(|l| l >= index) {
            return Err(format!("{what}: endpoint detail {index} is not ascending or not below the {count} endpoints"));
        }
        last = Some(index);
        let e = &mut endpoints[index];
        (e.workload, e.node, e.subsets, e.locality, e.hostname) =
            (detail.workload, detail.node, detail.subsets, detail.locality, detail.hostname);
    }
    let ports = s
        .ports
        .into_iter()
        .map(|p| {
            Ok(tables::ServicePort {
                port: port(p.port, &format!("{what}: port"))?,
                target_port: port(p.target_port, &format!("{what}: target port"))?,
                name: p.name,
                protocol: p.protocol,
                app_protocol: p.app_protocol,
            })
        })
        .collect::<Result<_, String>>()?;
    let address_blocks = s
        .address_blocks
        .into_iter()
        .map(|b| {
            let addr = match b.addr.len() {
                4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&b.addr[..]).expect("4 bytes"))),
                16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&b.addr[..]).expect("16 bytes"))),
                n => return Err(format!("{what}: an address block's address of {n} bytes")),
            };
            let len = u8::try_from(b.len).map_err(|_| format!("{what}: prefix length {}", b.len))?;
            crate::authz::IpNet::new(addr, len).map_err(|e| format!("{what}: {e}"))
        })
        .collect::<Result<_, String>>()?;
    let policy = |bytes: &[u8]| serde_json::from_slice(bytes).map_err(|e| format!("{what}: traffic policy: {e}"));
    let subset_policies =
        s.subset_policies.iter().map(|(k, v)| Ok((k.clone(), policy(v)?))).collect::<Result<_, String>>()?;
    let own = ("Service", s.namespace.as_str(), s.name.as_str());
    Ok(tables::Service {
        hostname: s.hostname.unwrap_or_else(|| default_hostname(&s.namespace, &s.name)),
        vips: unpack(&s.vips, &s.vips_v6_at, &format!("{what}: vips"))?,
        ports,
        endpoints,
        subsets: s.subsets,
        origin: origin_from(s.origin.unwrap_or_default(), own),
        subset_origin: s.subset_origin.map(|o| origin_from(o, ("", "", ""))),
        policy_origin: s.policy_origin.map(|o| origin_from(o, ("", "", ""))),
        address_blocks,
        resolution: s.resolution.map(resolution_from).transpose().map_err(|e| format!("{what}: {e}"))?,
        traffic_policy: s.traffic_policy.as_deref().map(policy).transpose()?,
        subset_policies,
        namespace: s.namespace,
        name: s.name,
    })
}

impl From<&flows::FlowGraph> for FlowGraph {
    fn from(graph: &flows::FlowGraph) -> FlowGraph {
        let workload = |w: &flows::WorkloadRef| Some(WorkloadRef { namespace: w.namespace.clone(), name: w.name.clone() });
        FlowGraph {
            node: graph.node.clone(),
            window_seconds: graph.window_seconds,
            edges: graph
                .edges
                .iter()
                .map(|e| FlowEdge {
                    source: workload(&e.source),
                    destination: workload(&e.destination),
                    service: e.service.clone(),
                    protocol: match e.protocol {
                        flows::FlowProtocol::Http => 0,
                        flows::FlowProtocol::Grpc => 1,
                        flows::FlowProtocol::Tcp => 2,
                    },
                    mtls: e.mtls,
                    reporter: e.reporter.clone(),
                    rate: e.rate,
                    error_ratio: e.error_ratio,
                    p99_ms: e.p99_ms,
                    bytes_per_second: e.bytes_per_second,
                })
                .collect(),
        }
    }
}

impl TryFrom<FlowGraph> for flows::FlowGraph {
    type Error = String;

    fn try_from(graph: FlowGraph) -> Result<flows::FlowGraph, String> {
        let workload = |w: Option<WorkloadRef>| {
            let w = w.unwrap_or_default();
            flows::WorkloadRef { namespace: w.namespace, name: w.name }
        };
        let edges = graph
            .edges
            .into_iter()
            .map(|e| {
                Ok(flows::FlowEdge {
                    source: workload(e.source),
                    destination: workload(e.destination),
                    service: e.service,
                    protocol: match e.protocol {
                        0 => flows::FlowProtocol::Http,
                        1 => flows::FlowProtocol::Grpc,
                        2 => flows::FlowProtocol::Tcp,
                        other => return Err(format!("flow report: protocol {other} is none of 0–2")),
                    },
                    mtls: e.mtls,
                    reporter: e.reporter,
                    rate: e.rate,
                    error_ratio: e.error_ratio,
                    p99_ms: e.p99_ms,
                    bytes_per_second: e.bytes_per_second,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(flows::FlowGraph { node: graph.node, window_seconds: graph.window_seconds, edges })
    }
}
