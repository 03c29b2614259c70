//! What keeps requests flowing when backends fail, as the controller compiles it from Istio's objects and
//! the agent acts on it: a VirtualService rule's `retries` ([`RetryPolicy`]) and a DestinationRule's
//! `trafficPolicy` ([`TrafficPolicy`]: load balancing, connection pool limits, outlier detection, retry
//! budget), with Istio's defaults written down once here so the controller, the agent and the docs agree.
//!
//! Every duration is in milliseconds; every field Istio leaves unset stays `None` and takes Istio's
//! default through the accessor of the same name.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A rule's `retries`, parsed. A rule without `retries` takes [`RetryPolicy::istio_default`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first try (Istio's `attempts`); 0 disables retries.
    pub attempts: u32,
    /// Each try's deadline (the route's `timeout` still bounds them all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    /// The conditions that make a try worth retrying.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<RetryOn>,
    /// Response codes retried under [`RetryOn::RetriableStatusCodes`] (numbers written in `retryOn`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_codes: Vec<u16>,
    /// Retries may go to endpoints in other localities (`retryRemoteLocalities`; Istio: false).
    #[serde(default)]
    pub retry_remote_localities: bool,
    /// `retryIgnorePreviousHosts` (Istio: true): a retry prefers an endpoint not tried yet.
    #[serde(default = "yes")]
    pub ignore_previous_hosts: bool,
    /// Base interval of the jittered exponential backoff between tries (`backoff`; Envoy: 25 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
}

fn yes() -> bool {
    true
}

impl RetryPolicy {
    /// Envoy's base backoff interval.
    pub const DEFAULT_BACKOFF_MS: u64 = 25;

    /// What Istio (1.24 and later) gives a route that sets no `retries`: 2 retries on connect-failure,
    /// refused-stream, unavailable, cancelled and retriable-status-codes — with no status code listed,
    /// so a 503 is not retried.
    pub fn istio_default() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            per_try_timeout_ms: None,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Unavailable,
                RetryOn::Cancelled,
                RetryOn::RetriableStatusCodes,
            ],
            status_codes: vec![],
            retry_remote_localities: false,
            ignore_previous_hosts: true,
            backoff_ms: None,
        }
    }

    /// No retries (`attempts: 0`).
    pub fn disabled() -> RetryPolicy {
        RetryPolicy { attempts: 0, ..RetryPolicy::istio_default() }
    }

    pub fn backoff_ms(&self) -> u64 {
        self.backoff_ms.unwrap_or(Self::DEFAULT_BACKOFF_MS)
    }

    pub fn retries_on(&self, condition: RetryOn) -> bool {
        self.retry_on.contains(&condition)
    }
}

/// One of `retryOn`'s conditions (Envoy's `x-envoy-retry-on` and `x-envoy-retry-grpc-on` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Any 5xx answer, a connect failure, a reset or a per-try timeout.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503, 504 and connect failures, resets, per-try timeouts.
    GatewayError,
    /// The upstream connection reset (or closed) before the response began.
    Reset,
    /// The connection to the endpoint could not be made (or its connect timeout passed).
    ConnectFailure,
    /// 409.
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    /// The HTTP/2 peer refused the stream (REFUSED_STREAM).
    RefusedStream,
    /// The answer's status is one of [`RetryPolicy::status_codes`].
    RetriableStatusCodes,
    /// gRPC status CANCELLED (1) in the answer's headers.
    Cancelled,
    /// gRPC DEADLINE_EXCEEDED (4).
    DeadlineExceeded,
    /// gRPC INTERNAL (13).
    Internal,
    /// gRPC RESOURCE_EXHAUSTED (8).
    ResourceExhausted,
    /// gRPC UNAVAILABLE (14).
    Unavailable,
}

impl RetryOn {
    /// Parses one `retryOn` entry as Istio writes them; `None` for an unknown name (numbers are status
    /// codes, handled by the caller).
    pub fn parse(name: &str) -> Option<RetryOn> {
        Some(match name {
            "5xx" => RetryOn::FiveXx,
            "gateway-error" => RetryOn::GatewayError,
            "reset" => RetryOn::Reset,
            "connect-failure" => RetryOn::ConnectFailure,
            "retriable-4xx" => RetryOn::Retriable4xx,
            "refused-stream" => RetryOn::RefusedStream,
            "retriable-status-codes" => RetryOn::RetriableStatusCodes,
            "cancelled" => RetryOn::Cancelled,
            "deadline-exceeded" => RetryOn::DeadlineExceeded,
            "internal" => RetryOn::Internal,
            "resource-exhausted" => RetryOn::ResourceExhausted,
            "unavailable" => RetryOn::Unavailable,
            _ => return None,
        })
    }

    /// The gRPC status code the condition retries, for the gRPC ones.
    pub fn grpc_code(self) -> Option<u32> {
        Some(match self {
            RetryOn::Cancelled => 1,
            RetryOn::DeadlineExceeded => 4,
            RetryOn::ResourceExhausted => 8,
            RetryOn::Internal => 13,
            RetryOn::Unavailable => 14,
            _ => return None,
        })
    }
}

/// A DestinationRule's `trafficPolicy` (top level or a subset's), the parts the agent acts on. The TLS
/// part stays in the controller (HBONE is the mesh's mTLS).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
    /// `portLevelSettings`: for the port named, these replace the policy's load balancer, pool and
    /// outlier detection as a whole (unset ones fall back to the defaults, not to the outer policy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

/// The policy one (service, subset, port) gets, merged as Istio merges them: the top-level policy with
/// its port-level settings for the port, then the subset's fields over it, then the subset's port-level
/// settings (each replacing all three parts).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
}

impl ClusterPolicy {
    /// The merged policy of `port`, for `subset_policy` (when the subset has one) over `top`.
    pub fn merge(top: Option<&TrafficPolicy>, subset_policy: Option<&TrafficPolicy>, port: u16) -> ClusterPolicy {
        let mut merged = top.map(|t| ClusterPolicy::at_port(t, port)).unwrap_or_default();
        if let Some(subset) = subset_policy {
            if subset.load_balancer.is_some() {
                merged.load_balancer = subset.load_balancer.clone();
            }
            if subset.connection_pool.is_some() {
                merged.connection_pool = subset.connection_pool.clone();
            }
            if subset.outlier_detection.is_some() {
                merged.outlier_detection = subset.outlier_detection.clone();
            }
            if subset.retry_budget.is_some() {
                merged.retry_budget = subset.retry_budget.clone();
            }
            if let Some(p) = subset.port_level_settings.iter().find(|p| p.port == port) {
                merged.replace_with(p);
            }
        }
        merged
    }

    fn at_port(policy: &TrafficPolicy, port: u16) -> ClusterPolicy {
        let mut merged = ClusterPolicy {
            load_balancer: policy.load_balancer.clone(),
            connection_pool: policy.connection_pool.clone(),
            outlier_detection: policy.outlier_detection.clone(),
            retry_budget: policy.retry_budget.clone(),
        };
        if let Some(p) = policy.port_level_settings.iter().find(|p| p.port == port) {
            merged.replace_with(p);
        }
        merged
    }

    fn replace_with(&mut self, port: &PortTrafficPolicy) {
        self.load_balancer = port.load_balancer.clone();
        self.connection_pool = port.connection_pool.clone();
        self.outlier_detection = port.outlier_detection.clone();
    }
}

/// `loadBalancer`: `simple` or `consistentHash` (one of them), with locality settings and warm-up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<SimpleLb>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<LocalityLb>,
    /// `warmupDurationSecs`: a new endpoint's share ramps up over this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_ms: Option<u64>,
}

/// `loadBalancer.simple`. Istio's default (unset, `UNSPECIFIED`, and the deprecated `LEAST_CONN`) is
/// least request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    /// Power of two choices: of two endpoints picked at random, the one with fewer active requests.
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    /// To the address the client connected to (no endpoint choice).
    Passthrough,
}

impl SimpleLb {
    pub fn parse(name: &str) -> Option<SimpleLb> {
        Some(match name {
            "UNSPECIFIED" | "LEAST_REQUEST" | "LEAST_CONN" => SimpleLb::LeastRequest,
            "ROUND_ROBIN" => SimpleLb::RoundRobin,
            "RANDOM" => SimpleLb::Random,
            "PASSTHROUGH" => SimpleLb::Passthrough,
            _ => return None,
        })
    }
}

/// `loadBalancer.consistentHash`: requests with one key go to one endpoint while the set is stable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    pub key: HashKey,
    #[serde(default)]
    pub ring: HashRing,
}

/// What a consistent hash hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    /// `httpHeaderName`: a request header's value (requests without it pick at random).
    Header(String),
    /// `httpCookie`: a cookie's value; with a `ttl`, a request without the cookie gets one issued
    /// (`Set-Cookie` with `Max-Age`, and `Path` when given).
    Cookie {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
    },
    /// `useSourceIp`: the client's address.
    SourceIp,
    /// `httpQueryParameterName`: a query parameter's value.
    QueryParameter(String),
}

/// `ringHash` or `maglev` (Istio's default: ring hash with a minimum of 1024 entries; `minimumRingSize`
/// is the deprecated spelling of the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HashRing {
    RingHash { minimum_ring_size: u64 },
    /// `tableSize` must be prime (Envoy's default 65537).
    Maglev { table_size: u64 },
}

impl Default for HashRing {
    fn default() -> Self {
        HashRing::RingHash { minimum_ring_size: 1024 }
    }
}

/// `localityLbSetting`: how endpoints in the client's own locality are preferred. Istio enables locality
/// load balancing by default, and it acts only where outlier detection is configured (the agent needs to
/// know which endpoints are unhealthy to fail over).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalityLb {
    /// `enabled` (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// `distribute`: traffic from a locality (`from`, `*` wildcards) split by weight over localities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distribute: Vec<LocalityDistribute>,
    /// `failover`: from region `from`, go to region `to` before any other.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<LocalityFailover>,
    /// `failoverPriority`: labels (`topology.kubernetes.io/region`, … or any pod label) whose match with
    /// the client's decides the priority, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover_priority: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalityDistribute {
    pub from: String,
    /// Locality (with `*` wildcards) → weight; the weights sum to 100.
    pub to: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalityFailover {
    pub from: String,
    pub to: String,
}

/// Where a workload runs: `region/zone/subzone` (any part may be empty), from its node's
/// `topology.kubernetes.io/region`, `topology.kubernetes.io/zone` and `topology.istio.io/subzone`
/// labels, or the pod's `istio-locality` label (`region.zone.subzone`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// `region/zone/subzone` (trailing parts may be missing); `None` when empty.
    pub fn parse(text: &str) -> Option<Locality> {
        let mut parts = text.splitn(3, '/').map(str::to_string);
        let locality = Locality {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            subzone: parts.next().unwrap_or_default(),
        };
        (!locality.region.is_empty()).then_some(locality)
    }

    /// Istio's pod label that sets a workload's locality.
    pub const POD_LABEL: &str = "istio-locality";

    /// A pod's locality from its [`Locality::POD_LABEL`] label, when it has one.
    pub fn from_pod_labels(labels: &BTreeMap<String, String>) -> Option<Locality> {
        labels.get(Self::POD_LABEL).and_then(|v| Locality::from_label(v))
    }

    /// The pod label's form, `region.zone.subzone`.
    pub fn from_label(value: &str) -> Option<Locality> {
        Locality::parse(&value.replace('.', "/"))
    }
}

impl std::fmt::Display for Locality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.region)?;
        if !self.zone.is_empty() || !self.subzone.is_empty() {
            write!(f, "/{}", self.zone)?;
        }
        if !self.subzone.is_empty() {
            write!(f, "/{}", self.subzone)?;
        }
        Ok(())
    }
}

/// `connectionPool`; unset limits are unlimited, as in Istio.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    #[serde(default)]
    pub tcp: TcpPool,
    #[serde(default)]
    pub http: HttpPool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpPool {
    /// Connections to the whole (service, subset, port), HTTP/1.1 and HTTP/2 alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `maxConnectionDuration`: a connection is closed (once idle) after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration_ms: Option<u64>,
    /// `idleTimeout` of TCP connections (Istio: 1 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
}

impl TcpPool {
    /// Istio's connect timeout when unset.
    pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;

    pub fn connect_timeout_ms(&self) -> u64 {
        self.connect_timeout_ms.unwrap_or(Self::DEFAULT_CONNECT_TIMEOUT_MS)
    }
}

/// `tcpKeepalive`: SO_KEEPALIVE on upstream connections; unset parts take the kernel's values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpKeepalive {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPool {
    /// Requests waiting for a connection (all connections busy, `maxConnections` reached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<u32>,
    /// Requests in flight to the (service, subset, port), HTTP/1.1 and HTTP/2 alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<u32>,
    /// A connection carries at most this many requests (1: no keep-alive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// Retries in flight to the (service, subset, port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// An upstream connection idle this long is closed (Istio: 1 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    /// `maxConcurrentStreams` on an upstream HTTP/2 connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<u32>,
    /// `useClientProtocol`: the upstream connection speaks the client's HTTP version (what Warren does
    /// anyway unless `h2UpgradePolicy: UPGRADE`).
    #[serde(default)]
    pub use_client_protocol: bool,
}

impl HttpPool {
    /// Istio's idle timeout when unset.
    pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 3_600_000;

    pub fn idle_timeout_ms(&self) -> u64 {
        self.idle_timeout_ms.unwrap_or(Self::DEFAULT_IDLE_TIMEOUT_MS)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    /// The mesh's default (`DO_NOT_UPGRADE`).
    #[default]
    Default,
    DoNotUpgrade,
    /// HTTP/1.1 requests go upstream as HTTP/2.
    Upgrade,
}

/// `outlierDetection`: endpoints that keep failing are ejected for a while. The accessors give Istio's
/// defaults for unset fields once the block is present.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// `consecutive5xxErrors` (default 5; 0 disables). Without `splitExternalLocalOriginErrors`, connect
    /// failures, resets and timeouts count as 5xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx_errors: Option<u32>,
    /// `consecutiveGatewayErrors`: 502, 503, 504 (and local failures); unset or 0: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// `consecutiveLocalOriginFailures` (default 5), counted apart only with
    /// `splitExternalLocalOriginErrors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_local_origin_failures: Option<u32>,
    #[serde(default)]
    pub split_external_local_origin_errors: bool,
    /// `interval` between ejection sweeps (default 10 s): an ejection ends at the first sweep after it
    /// has lasted its time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// `baseEjectionTime` (default 30 s), multiplied by how many times the endpoint was ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time_ms: Option<u64>,
    /// `maxEjectionPercent` (default 10 %; at least one endpoint can always be ejected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// `minHealthPercent` (default 0): below this share of healthy endpoints, ejections are ignored and
    /// every endpoint takes traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_health_percent: Option<u32>,
}

impl OutlierDetection {
    pub fn consecutive_5xx_errors(&self) -> u32 {
        self.consecutive_5xx_errors.unwrap_or(5)
    }
    pub fn consecutive_gateway_errors(&self) -> u32 {
        self.consecutive_gateway_errors.unwrap_or(0)
    }
    pub fn consecutive_local_origin_failures(&self) -> u32 {
        self.consecutive_local_origin_failures.unwrap_or(5)
    }
    pub fn interval_ms(&self) -> u64 {
        self.interval_ms.unwrap_or(10_000)
    }
    pub fn base_ejection_time_ms(&self) -> u64 {
        self.base_ejection_time_ms.unwrap_or(30_000)
    }
    pub fn max_ejection_percent(&self) -> u32 {
        self.max_ejection_percent.unwrap_or(10)
    }
    pub fn min_health_percent(&self) -> u32 {
        self.min_health_percent.unwrap_or(0)
    }
}

/// A limit on retries relative to the traffic they retry. A DestinationRule's `trafficPolicy.retryBudget`
/// (Envoy's semantics: retries in flight at most `percent` of requests in flight, never fewer than
/// `minRetryConcurrency`; with a `budgetInterval`, counted over that window instead of in flight), else
/// the agent's default ([`RetryBudget::warren_default`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retry_concurrency: Option<u32>,
    /// `budgetInterval`: count requests and retries over this window rather than in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_interval_ms: Option<u64>,
}

impl RetryBudget {
    pub fn percent(&self) -> f64 {
        self.percent.unwrap_or(20.0)
    }
    pub fn min_retry_concurrency(&self) -> u32 {
        self.min_retry_concurrency.unwrap_or(3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_default_retries_do_not_retry_503() {
        let d = RetryPolicy::istio_default();
        assert_eq!(d.attempts, 2);
        assert!(d.retries_on(RetryOn::ConnectFailure) && !d.retries_on(RetryOn::FiveXx));
        assert!(d.status_codes.is_empty());
        assert_eq!(d.backoff_ms(), 25);
    }

    #[test]
    fn port_and_subset_policies_merge_as_istio_does() {
        let lb = |s| Some(LoadBalancer { simple: Some(s), ..Default::default() });
        let od = Some(OutlierDetection { consecutive_5xx_errors: Some(1), ..Default::default() });
        let top = TrafficPolicy {
            load_balancer: lb(SimpleLb::Random),
            outlier_detection: od.clone(),
            port_level_settings: vec![PortTrafficPolicy { port: 8080, load_balancer: lb(SimpleLb::RoundRobin), ..Default::default() }],
            ..Default::default()
        };
        let at_80 = ClusterPolicy::merge(Some(&top), None, 80);
        assert_eq!((at_80.load_balancer, at_80.outlier_detection.is_some()), (lb(SimpleLb::Random), true));
        let at_8080 = ClusterPolicy::merge(Some(&top), None, 8080);
        assert_eq!(at_8080.load_balancer, lb(SimpleLb::RoundRobin));
        assert_eq!(at_8080.outlier_detection, None, "a port-level setting replaces all three parts");
        let subset = TrafficPolicy { load_balancer: lb(SimpleLb::LeastRequest), ..Default::default() };
        let v1 = ClusterPolicy::merge(Some(&top), Some(&subset), 80);
        assert_eq!((v1.load_balancer, v1.outlier_detection), (lb(SimpleLb::LeastRequest), od), "subset over top, field by field");
    }

    #[test]
    fn localities_parse_from_labels_and_print_as_istio() {
        let l = Locality::from_label("us-west.zone1.sub1").unwrap();
        assert_eq!((l.region.as_str(), l.zone.as_str(), l.subzone.as_str()), ("us-west", "zone1", "sub1"));
        assert_eq!(l.to_string(), "us-west/zone1/sub1");
        assert_eq!(Locality::parse("eu").unwrap().to_string(), "eu");
        assert_eq!(Locality::parse(""), None);
    }
}
