//! Who is at each end of a connection, as Istio's telemetry labels name it: the workload (Istio's name
//! for it, [`warren_api::workloads::naming`]), its namespace, app, version, canonical service and
//! revision, principal; and the service addressed. Built once per table version ([`Directory`]) so a
//! request's labels are a few `Arc` clones.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, LazyLock},
};

use warren_api::{
    tables::Service,
    workloads::{Pod, naming},
};

/// The header the source's agent names the service a request was routed to with, for the destination's
/// agent (as Istio's sidecars exchange peer metadata in `x-envoy-peer-metadata`): sent over HBONE only,
/// trusted only from an mTLS peer, and removed before the request reaches the workload.
pub const SERVICE_HEADER: &str = "x-warren-destination-service";

/// What Istio writes for a label it cannot know (an empty label is an absent one to Prometheus, and
/// Kiali drops series that lack one).
pub const UNKNOWN: &str = "unknown";

/// One end's workload labels.
#[derive(Debug, Hash, PartialEq, Eq)]
pub struct WorkloadMeta {
    pub workload: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    /// The SPIFFE identity of the workload's service account (what mTLS proves for it).
    pub principal: Arc<str>,
}

static UNKNOWN_WORKLOAD: LazyLock<Arc<WorkloadMeta>> = LazyLock::new(|| {
    Arc::new(WorkloadMeta {
        workload: UNKNOWN.into(),
        namespace: UNKNOWN.into(),
        app: UNKNOWN.into(),
        version: UNKNOWN.into(),
        canonical_service: UNKNOWN.into(),
        canonical_revision: UNKNOWN.into(),
        principal: UNKNOWN.into(),
    })
});

impl WorkloadMeta {
    pub fn of(pod: &Pod, trust_domain: &str) -> WorkloadMeta {
        let workload = pod.workload_name();
        WorkloadMeta {
            workload: workload.to_string(),
            namespace: pod.namespace.clone(),
            app: naming::app(&pod.labels).unwrap_or(UNKNOWN).to_string(),
            version: naming::version(&pod.labels).unwrap_or(UNKNOWN).to_string(),
            canonical_service: naming::canonical_service(&pod.labels, workload).to_string(),
            canonical_revision: naming::canonical_revision(&pod.labels).to_string(),
            principal: pod.identity(trust_domain).to_string().into(),
        }
    }

    /// A peer outside the registry (or not known to this agent).
    pub fn unknown() -> Arc<WorkloadMeta> {
        UNKNOWN_WORKLOAD.clone()
    }
}

/// The service a request or connection addressed.
#[derive(Debug, Hash, PartialEq, Eq)]
pub struct ServiceMeta {
    /// The FQDN (`reviews.default.svc.cluster.local`): `destination_service`.
    pub host: String,
    pub name: String,
    pub namespace: String,
}

static UNKNOWN_SERVICE: LazyLock<Arc<ServiceMeta>> =
    LazyLock::new(|| Arc::new(ServiceMeta { host: UNKNOWN.into(), name: UNKNOWN.into(), namespace: UNKNOWN.into() }));

/// Traffic to an address no service or workload has: Envoy's PassthroughCluster, as Kiali draws it.
static PASSTHROUGH: LazyLock<Arc<ServiceMeta>> = LazyLock::new(|| {
    Arc::new(ServiceMeta { host: UNKNOWN.into(), name: "PassthroughCluster".into(), namespace: UNKNOWN.into() })
});

impl ServiceMeta {
    pub fn of(service: &Service) -> ServiceMeta {
        ServiceMeta { host: service.hostname.clone(), name: service.name.clone(), namespace: service.namespace.clone() }
    }

    pub fn unknown() -> Arc<ServiceMeta> {
        UNKNOWN_SERVICE.clone()
    }

    pub fn passthrough() -> Arc<ServiceMeta> {
        PASSTHROUGH.clone()
    }

    /// Whether `authority` (a Host header, port and all) names this service: its FQDN, its short name,
    /// or a `name.namespace…` prefix of the FQDN.
    fn named_by(&self, authority: &str) -> bool {
        let host = authority.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()).map_or(authority, |(h, _)| h);
        host == self.host || host == self.name || self.host.strip_prefix(host).is_some_and(|rest| rest.starts_with('.'))
    }
}

/// The workload and service labels of one table version.
#[derive(Debug, Default)]
pub struct Directory {
    by_ip: HashMap<IpAddr, Arc<WorkloadMeta>>,
    by_key: HashMap<String, Arc<WorkloadMeta>>,
    services: HashMap<String, Arc<ServiceMeta>>,
    /// By FQDN: what the source's agent names in [`SERVICE_HEADER`].
    by_host: HashMap<String, Arc<ServiceMeta>>,
    /// Endpoint address (pod IP, target port) → the services it backs there: what a destination agent
    /// can tell of the service a client addressed.
    backed: HashMap<SocketAddr, Vec<Arc<ServiceMeta>>>,
}

impl Directory {
    pub fn new<'a>(
        pods: impl Iterator<Item = &'a Pod>,
        services: impl Iterator<Item = &'a Arc<Service>>,
        trust_domain: &str,
    ) -> Directory {
        let mut directory = Directory::default();
        for pod in pods {
            let meta = Arc::new(WorkloadMeta::of(pod, trust_domain));
            directory.by_ip.extend(pod.ips.iter().map(|ip| (*ip, meta.clone())));
            directory.by_key.insert(pod.key(), meta);
        }
        for service in services {
            let meta = Arc::new(ServiceMeta::of(service));
            for endpoint in &service.endpoints {
                for port in &service.ports {
                    let backed = directory.backed.entry(SocketAddr::new(endpoint.ip, port.target_port)).or_default();
                    if !backed.contains(&meta) {
                        backed.push(meta.clone());
                    }
                }
            }
            directory.by_host.insert(service.hostname.clone(), meta.clone());
            directory.services.insert(service.key(), meta);
        }
        directory
    }

    pub fn workload_at(&self, ip: &IpAddr) -> Option<&Arc<WorkloadMeta>> {
        self.by_ip.get(ip)
    }

    /// By `namespace/name`.
    pub fn workload(&self, key: &str) -> Option<&Arc<WorkloadMeta>> {
        self.by_key.get(key)
    }

    /// By `namespace/name`.
    pub fn service(&self, key: &str) -> Arc<ServiceMeta> {
        self.services.get(key).cloned().unwrap_or_else(ServiceMeta::unknown)
    }

    /// The service named by its FQDN (the source agent's [`SERVICE_HEADER`]).
    pub fn service_by_host(&self, host: &str) -> Option<Arc<ServiceMeta>> {
        self.by_host.get(host).cloned()
    }

    /// The service a connection to `destination` (a workload's address and port) was for: the one the
    /// request's `authority` names, else the first the endpoint backs there.
    pub fn service_backed_by(&self, destination: &SocketAddr, authority: Option<&str>) -> Arc<ServiceMeta> {
        let Some(candidates) = self.backed.get(destination) else {
            return ServiceMeta::unknown();
        };
        let named = authority.and_then(|a| candidates.iter().find(|s| s.named_by(a)));
        named.or(candidates.first()).cloned().unwrap_or_else(ServiceMeta::unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str) -> ServiceMeta {
        ServiceMeta { host: format!("{name}.default.svc.cluster.local"), name: name.into(), namespace: "default".into() }
    }

    #[test]
    fn a_host_header_names_its_service_however_written() {
        let web = service("web");
        for authority in ["web", "web:80", "web.default", "web.default.svc.cluster.local:80"] {
            assert!(web.named_by(authority), "{authority}");
        }
        for authority in ["web-raw", "we", "webx.default", "10.0.0.1:80"] {
            assert!(!web.named_by(authority), "{authority}");
        }
    }

    #[test]
    fn workload_labels_fall_back_to_unknown_and_latest() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "name": "reviews-v1-abc-xyz", "namespace": "shop", "uid": "u", "serviceAccount": "reviews",
            "workload": "reviews-v1", "labels": {"app": "reviews"}
        }))
        .unwrap();
        let meta = WorkloadMeta::of(&pod, "cluster.local");
        assert_eq!(meta.workload, "reviews-v1");
        assert_eq!((meta.app.as_str(), meta.version.as_str()), ("reviews", UNKNOWN));
        assert_eq!((meta.canonical_service.as_str(), meta.canonical_revision.as_str()), ("reviews", "latest"));
        assert_eq!(&*meta.principal, "spiffe://cluster.local/ns/shop/sa/reviews");
    }
}
