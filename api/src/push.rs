//! The controller → agent push protocol, carried on one long-lived HTTP/2 stream over mTLS
//! (`POST /warren.push.v2/stream`; docs/control-plane.md says why plain h2 and not gRPC).
//!
//! Both directions are a sequence of frames: a 4-byte big-endian length, then that many bytes of one
//! protobuf message ([`wire`]: prost, compact — packed addresses — and converted to and from the tables).
//! The version is in the path: an agent and a controller of different protocol versions get a 404 that
//! names both paths, never frames the other side cannot read.
//! The controller sends [`Update`]s: the first on every stream is `full` (the agent replaces everything
//! it holds), later ones carry only what changed. The agent answers each with [`Reply::Ack`] once its
//! eBPF maps and proxy tables hold that version, or [`Reply::Nack`] with the reason, keeping its last
//! good version. The controller diffs the next update against what the agent last ACKed. Between
//! replies, the agent sends its flow summary ([`Reply::Flows`]) for the mesh-wide service graph.
use std::{collections::BTreeMap, sync::Arc};

use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::tables::{Resource, Tables};

pub mod wire;

/// The stream's path; its `v2` is the protocol version (v1 carried JSON).
pub const PATH: &str = "/warren.push.v2/stream";
/// What every version's path starts with: a controller answers a path of another version with a 404 that
/// names its own ([`PATH_HEADER`]).
pub const PATH_PREFIX: &str = "/warren.push.";
/// Response header of a refused stream: the path (protocol version) this controller serves.
pub const PATH_HEADER: &str = "warren-push-path";
/// Header naming the agent's node (the agent's certificate proves it is an agent).
pub const NODE_HEADER: &str = "warren-node";
/// Frames larger than this are refused (a full snapshot of a large mesh fits comfortably).
pub const MAX_FRAME: usize = 512 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Update {
    pub version: u64,
    /// Replace everything held with `upserts`.
    pub full: bool,
    #[serde(default)]
    pub upserts: Vec<Resource>,
    /// Keys (see [`Resource::key`]) to drop.
    #[serde(default)]
    pub removals: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Reply {
    Ack { version: u64 },
    Nack { version: u64, error: String },
    /// The agent's live service graph (every [`FLOW_REPORT_EVERY`]), for the controller's mesh-wide page.
    Flows { graph: crate::flows::FlowGraph },
}

/// How often agents send their [`Reply::Flows`].
pub const FLOW_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// A message of the push: converted to and from its [`wire`] form.
pub trait Frame: Sized {
    /// What the frame holds, in errors.
    const WHAT: &'static str;
    fn encode_body(&self) -> Vec<u8>;
    fn decode_body(body: &[u8]) -> Result<Self, String>;
}

impl Frame for Update {
    const WHAT: &'static str = "update";

    fn encode_body(&self) -> Vec<u8> {
        encode_update(self.version, self.full, &self.upserts, &self.removals)
    }

    fn decode_body(body: &[u8]) -> Result<Self, String> {
        let update = wire::Update::decode(body).map_err(|e| e.to_string())?;
        let upserts = update.upserts.into_iter().map(Resource::try_from).collect::<Result<_, String>>()?;
        Ok(Update { version: update.version, full: update.full, upserts, removals: update.removals })
    }
}

impl Frame for Reply {
    const WHAT: &'static str = "reply";

    fn encode_body(&self) -> Vec<u8> {
        let kind = match self {
            Reply::Ack { version } => wire::reply::Kind::Ack(*version),
            Reply::Nack { version, error } => wire::reply::Kind::Nack(wire::Nack { version: *version, error: error.clone() }),
            Reply::Flows { graph } => wire::reply::Kind::Flows(graph.into()),
        };
        wire::Reply { kind: Some(kind) }.encode_to_vec()
    }

    fn decode_body(body: &[u8]) -> Result<Self, String> {
        Ok(match wire::Reply::decode(body).map_err(|e| e.to_string())?.kind {
            Some(wire::reply::Kind::Ack(version)) => Reply::Ack { version },
            Some(wire::reply::Kind::Nack(wire::Nack { version, error })) => Reply::Nack { version, error },
            Some(wire::reply::Kind::Flows(graph)) => Reply::Flows { graph: graph.try_into()? },
            None => return Err("a reply of no kind (a newer agent's?)".into()),
        })
    }
}

/// An [`Update`]'s body from borrowed resources (a full snapshot is encoded without copying the tables).
pub fn encode_update<'a>(
    version: u64,
    full: bool,
    upserts: impl IntoIterator<Item = &'a Resource>,
    removals: &[String],
) -> Vec<u8> {
    use prost::encoding;
    let mut body = Vec::new();
    if version != 0 {
        encoding::uint64::encode(1, &version, &mut body);
    }
    if full {
        encoding::bool::encode(2, &full, &mut body);
    }
    // One resource's wire form at a time: the snapshot is never held twice.
    for resource in upserts {
        encoding::message::encode(3, &wire::Resource::from(resource), &mut body);
    }
    encoding::string::encode_repeated(4, removals, &mut body);
    body
}

/// `len(4, BE) ++ protobuf`.
pub fn encode<T: Frame>(message: &T) -> Vec<u8> {
    frame(message.encode_body())
}

/// A frame around an encoded body.
pub fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Splits complete frames off the front of `buffer`.
#[derive(Default)]
pub struct FrameReader {
    buffer: Vec<u8>,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete frame decoded, `Ok(None)` when more bytes are needed.
    pub fn next<T: Frame>(&mut self) -> Result<Option<T>, String> {
        if self.buffer.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buffer[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"));
        }
        if self.buffer.len() < 4 + len {
            return Ok(None);
        }
        let message = T::decode_body(&self.buffer[4..4 + len]).map_err(|e| format!("malformed {} frame: {e}", T::WHAT));
        self.buffer.drain(..4 + len);
        // A large frame (a full snapshot) must not keep its buffer for the stream's life.
        if self.buffer.capacity() > 1024 * 1024 && self.buffer.len() < self.buffer.capacity() / 4 {
            self.buffer.shrink_to(self.buffer.len().max(64 * 1024));
        }
        message.map(Some)
    }
}

/// What changed from `acked` to `next`, as an incremental update.
pub fn diff(version: u64, acked: &BTreeMap<String, Arc<Resource>>, next: &BTreeMap<String, Arc<Resource>>) -> Update {
    let upserts = next
        .iter()
        .filter(|(k, v)| acked.get(*k).is_none_or(|old| !Arc::ptr_eq(old, v) && old != *v))
        .map(|(_, v)| (**v).clone())
        .collect();
    let removals = acked.keys().filter(|k| !next.contains_key(*k)).cloned().collect();
    Update { version, full: false, upserts, removals }
}

/// Applies `update` to `held`, returning the new table set: `held` is changed in place (a full update
/// replaces it) and the update's resources move into it, so an edit of one resource copies none of the others.
pub fn apply(held: Tables, update: Update) -> Tables {
    let mut next = if update.full { Tables::new() } else { held };
    for key in &update.removals {
        next.remove(key);
    }
    for resource in update.upserts {
        next.insert(resource.key(), resource);
    }
    next
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::workloads::Namespace;

    fn ns(name: &str, label: &str) -> Arc<Resource> {
        Arc::new(Resource::Namespace(Namespace { name: name.into(), labels: [("l".to_string(), label.to_string())].into() }))
    }

    #[test]
    fn diff_then_apply_reaches_the_next_state() {
        let acked: BTreeMap<_, _> = [("namespace//a".to_string(), ns("a", "1")), ("namespace//b".to_string(), ns("b", "1"))].into();
        let next: BTreeMap<_, _> = [("namespace//a".to_string(), ns("a", "2")), ("namespace//c".to_string(), ns("c", "1"))].into();
        let update = diff(7, &acked, &next);
        assert_eq!(update.upserts.len(), 2);
        assert_eq!(update.removals, ["namespace//b"]);
        let held: Tables = acked.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect();
        let applied = apply(held, update);
        let expected: Tables = next.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect();
        assert_eq!(applied, expected);
    }

    #[test]
    fn frames_split_and_reassemble() {
        let mut reader = FrameReader::default();
        let frame = encode(&Reply::Ack { version: 3 });
        reader.push(&frame[..3]);
        assert_eq!(reader.next::<Reply>(), Ok(None));
        reader.push(&frame[3..]);
        reader.push(&encode(&Reply::Nack { version: 4, error: "x".into() }));
        assert_eq!(reader.next::<Reply>(), Ok(Some(Reply::Ack { version: 3 })));
        assert_eq!(reader.next::<Reply>(), Ok(Some(Reply::Nack { version: 4, error: "x".into() })));
        // Field 1 (an ACK's version, a varint) as a length-delimited field: prost names what failed.
        reader.push(&[0, 0, 0, 2, 0x0a, 0xff]);
        let error = reader.next::<Reply>().unwrap_err();
        assert!(error.starts_with("malformed reply frame: "), "{error}");
        assert!(error.contains("Reply.kind"), "{error}");
    }

    fn rich_service() -> crate::tables::Service {
        use crate::tables::{Endpoint, Origin, Resolution, Service, ServicePort};
        let endpoint = |ip: &str| Endpoint {
            ip: ip.parse().unwrap(),
            workload: None,
            node: None,
            subsets: vec![],
            locality: None,
            hostname: None,
        };
        let policy = crate::resilience::TrafficPolicy::default();
        Service {
            namespace: "shop".into(),
            name: "reviews".into(),
            hostname: "reviews.example.com".into(),
            vips: vec!["10.96.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            ports: vec![
                ServicePort { name: "http".into(), port: 80, target_port: 9080, protocol: "TCP".into(), app_protocol: None },
                ServicePort { name: String::new(), port: 443, target_port: 443, protocol: String::new(), app_protocol: Some("https".into()) },
            ],
            endpoints: vec![
                endpoint("10.0.0.1"),
                Endpoint {
                    workload: Some("shop/reviews-1".into()),
                    node: Some("n1".into()),
                    subsets: vec!["v1".into()],
                    locality: Some("r/z".into()),
                    ..endpoint("fd00::2")
                },
                endpoint("10.0.0.3"),
                Endpoint { hostname: Some("db.example.com".into()), ..endpoint("0.0.0.0") },
            ],
            subsets: vec!["v1".into()],
            origin: Origin::new("ServiceEntry", "shop", "external", Some(3)),
            subset_origin: Some(Origin::new("DestinationRule", "shop", "reviews", Some(2))),
            address_blocks: vec!["192.168.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()],
            resolution: Some(Resolution::Dns),
            traffic_policy: Some(policy.clone()),
            subset_policies: [("v1".to_string(), policy)].into(),
            policy_origin: Some(Origin::new("DestinationRule", "shop", "reviews", None)),
        }
    }

    #[test]
    fn every_kind_survives_the_wire() {
        use crate::{
            tables::{Origin, Route, Service},
            workloads::Pod,
        };
        let kube_service = Service {
            namespace: "bench".into(),
            name: "svc".into(),
            hostname: "svc.bench.svc.cluster.local".into(),
            vips: vec!["10.96.0.2".parse().unwrap()],
            origin: Origin::new("Service", "bench", "svc", Some(1)),
            ..Default::default()
        };
        let pod = Pod {
            name: "p".into(),
            namespace: "shop".into(),
            uid: "u-1".into(),
            ips: vec!["10.0.0.9".parse().unwrap(), "fd00::9".parse().unwrap()],
            labels: [("app".to_string(), "p".to_string())].into(),
            host_network: false,
            service_account: "sa".into(),
            node: Some("n1".into()),
            workload: Some("p-deploy".into()),
            locality: None,
        };
        let route = Route { origin: Origin::new("VirtualService", "shop", "reviews", Some(4)), services: vec!["shop/reviews".into()], ..Default::default() };
        let update = Update {
            version: 9,
            full: true,
            upserts: vec![
                Resource::Service(rich_service()),
                Resource::Service(kube_service),
                Resource::Workload(pod),
                Resource::Route(route),
                (*ns("shop", "x")).clone(),
            ],
            removals: vec!["route/shop/old".into()],
        };
        let mut reader = FrameReader::default();
        reader.push(&encode(&update));
        assert_eq!(reader.next::<Update>(), Ok(Some(update)));
        let graph = crate::flows::FlowGraph {
            node: "n1".into(),
            window_seconds: 60,
            edges: vec![crate::flows::FlowEdge {
                source: crate::flows::WorkloadRef { namespace: "a".into(), name: "b".into() },
                destination: crate::flows::WorkloadRef { namespace: "c".into(), name: "d".into() },
                service: "d.c.svc.cluster.local".into(),
                protocol: crate::flows::FlowProtocol::Grpc,
                mtls: true,
                reporter: "source".into(),
                rate: 1.5,
                error_ratio: 0.25,
                p99_ms: Some(3.0),
                bytes_per_second: 100.0,
            }],
        };
        reader.push(&encode(&Reply::Flows { graph: graph.clone() }));
        assert_eq!(reader.next::<Reply>(), Ok(Some(Reply::Flows { graph })));
    }

    #[test]
    fn addresses_are_packed_and_checked() {
        let ips: Vec<std::net::IpAddr> = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        let (bytes, v6_at) = wire::pack(&ips);
        assert_eq!((bytes.len(), v6_at.as_slice()), (24, &[1][..]));
        assert_eq!(wire::unpack(&bytes, &v6_at, "x"), Ok(ips));
        assert!(wire::unpack(&bytes[..23], &v6_at, "ips").unwrap_err().starts_with("ips: 23 bytes are not whole addresses"));
        assert!(wire::unpack(&bytes, &[5], "ips").unwrap_err().contains("IPv6 position 5"));
        assert!(wire::unpack(&bytes[..8], &[0, 1], "ips").unwrap_err().contains("2 IPv6 positions for 8 bytes"));
        // A service whose endpoint list is cut: the error names the service and the list.
        let mut service = wire::Service::default();
        service.namespace = "shop".into();
        service.name = "reviews".into();
        service.endpoint_ips = vec![10, 0, 0];
        let update = wire::Update { version: 1, full: true, upserts: vec![wire::Resource { kind: Some(wire::resource::Kind::Service(Box::new(service))) }], removals: vec![] };
        let mut reader = FrameReader::default();
        reader.push(&frame(update.encode_to_vec()));
        let error = reader.next::<Update>().unwrap_err();
        assert!(error.starts_with("malformed update frame: service shop/reviews: endpoint addresses: 3 bytes"), "{error}");
    }

    #[test]
    fn a_large_snapshot_is_compact() {
        use crate::tables::{Endpoint, Origin, Service, ServicePort};
        // As `cargo xtask bench control`'s: 10 endpoints a service, from Endpoints objects (no pods).
        let services: Vec<Resource> = (0..1000u32)
            .map(|s| {
                let (namespace, name) = ("bench".to_string(), format!("svc-{s:05}"));
                Resource::Service(Service {
                    hostname: format!("{name}.{namespace}.svc.cluster.local"),
                    vips: vec![std::net::Ipv4Addr::from(0x0a60_0000 + s).into()],
                    ports: vec![ServicePort { name: "http".into(), port: 80, target_port: 8080, protocol: "TCP".into(), app_protocol: None }],
                    endpoints: (0..10)
                        .map(|e| Endpoint {
                            ip: std::net::Ipv4Addr::from(0x0a80_0000 + s * 10 + e).into(),
                            workload: None,
                            node: None,
                            subsets: vec![],
                            locality: None,
                            hostname: None,
                        })
                        .collect(),
                    origin: Origin::new("Service", &namespace, &name, Some(1)),
                    namespace,
                    name,
                    ..Default::default()
                })
            })
            .collect();
        let frame = encode_update(1, true, &services, &[]);
        let json = serde_json::to_vec(&services).unwrap();
        assert!(frame.len() < 100 * services.len(), "{} bytes for {} services ({} as JSON)", frame.len(), services.len(), json.len());
    }

    /// Rewrites fuzz/corpus/push_frame's seeds of the protocol before (JSON frames) as protobuf frames, with
    /// the same chunking header; incomplete frames (a huge length prefix) stay as they are:
    /// `WARREN_SEEDS=fuzz/corpus/push_frame cargo test -p warren-api -- --ignored convert_fuzz_seeds`.
    #[test]
    #[ignore]
    fn convert_fuzz_seeds() {
        let dir = std::path::PathBuf::from(std::env::var("WARREN_SEEDS").expect("WARREN_SEEDS: the seed directory"));
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let Some((&header, rest)) = data.split_first() else { continue };
            let count = ((header & 7) as usize).min(rest.len());
            let (mut out, mut stream) = ([&[header][..], &rest[..count]].concat(), &rest[count..]);
            while stream.len() >= 4 {
                let len = u32::from_be_bytes(stream[..4].try_into().unwrap()) as usize;
                if stream.len() < 4 + len {
                    break;
                }
                let body = &stream[4..4 + len];
                if let Ok(update) = serde_json::from_slice::<Update>(body) {
                    out.extend(encode(&update));
                } else if let Ok(reply) = serde_json::from_slice::<Reply>(body) {
                    out.extend(encode(&reply));
                } else {
                    out.extend_from_slice(&stream[..4 + len]);
                }
                stream = &stream[4 + len..];
            }
            out.extend_from_slice(stream);
            std::fs::write(&path, out).unwrap();
        }
    }
}
