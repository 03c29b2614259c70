//! Istio's resilience settings as the agent acts on them ([`warren_api::resilience`]): a rule's `retries`,
//! and the DestinationRule traffic policies of a host, merged over its DestinationRules as Istio merges them.
//! Durations become milliseconds; Istio's "0 means unset" for int32 limits is applied here, so the agent
//! sees `None` wherever Istio's default holds. Fields [`crate::support`] reports as not acted on are left out.
use std::collections::BTreeMap;

use warren_api::resilience::{
    ConnectionPool, ConsistentHash, H2UpgradePolicy, HashKey, HashRing, HttpPool, LoadBalancer, LocalityDistribute,
    LocalityFailover, LocalityLb, OutlierDetection, PortTrafficPolicy, RetryBudget, RetryOn, RetryPolicy, SimpleLb,
    TcpKeepalive, TcpPool, TrafficPolicy,
};

use crate::{
    istio,
    tables::{Origin, Service},
    validate::{duration_ms, status_code},
};

/// `retries`: `attempts` 0 (or less) disables retries; an unset or empty `retryOn` takes Istio's default
/// conditions; what else is unset takes Istio's defaults.
pub(super) fn retry_policy(r: &istio::HttpRetry) -> RetryPolicy {
    if r.attempts <= 0 {
        return RetryPolicy::disabled();
    }
    let (retry_on, status_codes) = match r.retry_on.as_deref().filter(|list| !list.is_empty()) {
        None => (RetryPolicy::istio_default().retry_on, Vec::new()),
        Some(list) => retry_conditions(list),
    };
    RetryPolicy {
        attempts: u32::try_from(r.attempts).unwrap_or(u32::MAX),
        per_try_timeout_ms: ms(&r.per_try_timeout),
        retry_on,
        status_codes,
        retry_remote_localities: r.retry_remote_localities.unwrap_or(false),
        ignore_previous_hosts: r.retry_ignore_previous_hosts.unwrap_or(true),
        backoff_ms: ms(&r.backoff),
    }
}

/// `retryOn` as Istio applies it: entries trimmed, numbers are status codes (retried under
/// retriable-status-codes, which is added when only codes are listed). Conditions the agent does not act on
/// are left out ([`crate::support`] names them).
fn retry_conditions(list: &str) -> (Vec<RetryOn>, Vec<u16>) {
    let (mut conditions, mut codes) = (Vec::new(), Vec::new());
    for entry in list.split(',').map(str::trim) {
        if let Some(code) = status_code(entry) {
            if !codes.contains(&code) {
                codes.push(code);
            }
        } else if let Some(condition) = RetryOn::parse(entry)
            && !conditions.contains(&condition)
        {
            conditions.push(condition);
        }
    }
    if !codes.is_empty() && !conditions.contains(&RetryOn::RetriableStatusCodes) {
        conditions.push(RetryOn::RetriableStatusCodes);
    }
    (conditions, codes)
}

fn ms(duration: &Option<String>) -> Option<u64> {
    duration.as_deref().and_then(duration_ms)
}

/// An int32 limit of Istio's: 0, like unset, is Istio's default (unlimited, or Envoy's value).
fn limit(value: Option<i64>) -> Option<u32> {
    value.filter(|n| *n > 0).and_then(|n| u32::try_from(n).ok())
}

/// A UInt32Value count, where 0 is a value of its own (it turns the check off).
fn count(value: Option<i64>) -> Option<u32> {
    value.and_then(|n| u32::try_from(n).ok())
}

/// The traffic policies in force for one host. Istio merges the DestinationRules of a host oldest first:
/// the first rule with a top-level `trafficPolicy` gives it (even one holding only `tls`, which the agent
/// does not see), and a subset's policy comes with the subset (the first rule to define a name gives it).
#[derive(Debug, Default)]
pub(super) struct Policies {
    top_taken: bool,
    top: Option<(TrafficPolicy, Origin)>,
    subsets: BTreeMap<String, TrafficPolicy>,
    subset_origin: Option<Origin>,
}

impl Policies {
    /// A rule's top-level policy; rules come oldest first.
    pub fn add_top(&mut self, policy: Option<&istio::TrafficPolicy>, origin: &Origin) {
        let Some(policy) = policy.filter(|_| !self.top_taken) else { return };
        self.top_taken = true;
        self.top = Some(traffic_policy(policy)).filter(|p| *p != TrafficPolicy::default()).map(|p| (p, origin.clone()));
    }

    /// The policy of a subset this rule is the first to define.
    pub fn add_subset(&mut self, subset: &istio::Subset, origin: &Origin) {
        let Some(policy) = subset.traffic_policy.as_ref().map(traffic_policy) else { return };
        if policy != TrafficPolicy::default() {
            self.subsets.insert(subset.name.clone(), policy);
            self.subset_origin.get_or_insert_with(|| origin.clone());
        }
    }

    /// Sets the service's policies; the origin named is the rule of the top-level policy, else of the
    /// first subset policy.
    pub fn apply(&self, service: &mut Service) {
        service.traffic_policy = self.top.as_ref().map(|(p, _)| p.clone());
        service.subset_policies = self.subsets.clone();
        let top_origin = self.top.as_ref().map(|(_, o)| o.clone());
        service.policy_origin = top_origin.or_else(|| self.subset_origin.clone().filter(|_| !self.subsets.is_empty()));
    }
}

pub(super) fn traffic_policy(p: &istio::TrafficPolicy) -> TrafficPolicy {
    TrafficPolicy {
        load_balancer: p.load_balancer.as_ref().map(load_balancer),
        connection_pool: p.connection_pool.as_ref().map(connection_pool),
        outlier_detection: p.outlier_detection.as_ref().map(outlier_detection),
        retry_budget: p.retry_budget.as_ref().map(retry_budget),
        port_level_settings: p.port_level_settings.iter().filter_map(port_policy).collect(),
    }
}

/// A port's settings; one with only `tls` is kept: in Istio it still replaces the other parts (with their
/// defaults) for its port.
fn port_policy(p: &istio::PortTrafficPolicy) -> Option<PortTrafficPolicy> {
    Some(PortTrafficPolicy {
        port: u16::try_from(p.port.as_ref()?.number).ok()?,
        load_balancer: p.load_balancer.as_ref().map(load_balancer),
        connection_pool: p.connection_pool.as_ref().map(connection_pool),
        outlier_detection: p.outlier_detection.as_ref().map(outlier_detection),
    })
}

/// Kept even when nothing in it is acted on (only `warmup`, say): a subset's or port's load balancer
/// replaces the outer one as a whole.
fn load_balancer(lb: &istio::LoadBalancerSettings) -> LoadBalancer {
    LoadBalancer {
        simple: lb.simple.as_deref().and_then(SimpleLb::parse),
        consistent_hash: lb.consistent_hash.as_ref().and_then(consistent_hash),
        locality: lb.locality_lb_setting.as_ref().map(locality_lb),
        warmup_ms: ms(&lb.warmup_duration_secs),
    }
}

/// `None` without a key: `useSourceIp: false` hashes nothing, and Envoy then picks as it would without one.
fn consistent_hash(hash: &istio::ConsistentHashLb) -> Option<ConsistentHash> {
    let key = if let Some(name) = &hash.http_header_name {
        HashKey::Header(name.clone())
    } else if let Some(cookie) = &hash.http_cookie {
        let path = cookie.path.clone().filter(|p| !p.is_empty());
        HashKey::Cookie { name: cookie.name.clone(), path, ttl_ms: ms(&cookie.ttl) }
    } else if hash.use_source_ip == Some(true) {
        HashKey::SourceIp
    } else {
        HashKey::QueryParameter(hash.http_query_parameter_name.clone()?)
    };
    Some(ConsistentHash { key, ring: hash_ring(hash) })
}

/// Maglev's table size defaults to Envoy's 65537; a ring hash (the default algorithm) to 1024 entries,
/// from `ringHash` or the deprecated `minimumRingSize` (0 is unset in both).
fn hash_ring(hash: &istio::ConsistentHashLb) -> HashRing {
    let set = |n: Option<u64>| n.filter(|n| *n != 0);
    if let Some(maglev) = &hash.maglev {
        return HashRing::Maglev { table_size: set(maglev.table_size).unwrap_or(65537) };
    }
    let written = hash.ring_hash.as_ref().map_or(hash.minimum_ring_size, |r| r.minimum_ring_size);
    set(written).map_or_else(HashRing::default, |minimum_ring_size| HashRing::RingHash { minimum_ring_size })
}

fn locality_lb(l: &istio::LocalityLbSetting) -> LocalityLb {
    let distribute = l.distribute.iter().map(|d| LocalityDistribute {
        from: d.from.clone(),
        to: d.to.iter().filter_map(|(to, w)| Some((to.clone(), u32::try_from(*w).ok()?))).collect(),
    });
    LocalityLb {
        enabled: l.enabled,
        distribute: distribute.collect(),
        failover: l.failover.iter().map(|f| LocalityFailover { from: f.from.clone(), to: f.to.clone() }).collect(),
        failover_priority: l.failover_priority.clone(),
    }
}

fn connection_pool(pool: &istio::ConnectionPoolSettings) -> ConnectionPool {
    ConnectionPool {
        tcp: pool.tcp.as_ref().map(tcp_pool).unwrap_or_default(),
        http: pool.http.as_ref().map(http_pool).unwrap_or_default(),
    }
}

/// TCP's `idleTimeout` is not acted on yet (support says so), so it is not passed on.
fn tcp_pool(tcp: &istio::TcpSettings) -> TcpPool {
    TcpPool {
        max_connections: limit(tcp.max_connections),
        connect_timeout_ms: ms(&tcp.connect_timeout),
        tcp_keepalive: tcp.tcp_keepalive.as_ref().map(|k| TcpKeepalive {
            probes: limit(k.probes),
            time_ms: ms(&k.time),
            interval_ms: ms(&k.interval),
        }),
        max_connection_duration_ms: ms(&tcp.max_connection_duration),
        idle_timeout_ms: None,
    }
}

/// `maxConcurrentStreams` is not acted on yet (support says so), so it is not passed on.
fn http_pool(http: &istio::HttpSettings) -> HttpPool {
    HttpPool {
        http1_max_pending_requests: limit(http.http1_max_pending_requests),
        http2_max_requests: limit(http.http2_max_requests),
        max_requests_per_connection: limit(http.max_requests_per_connection),
        max_retries: limit(http.max_retries),
        idle_timeout_ms: ms(&http.idle_timeout),
        h2_upgrade_policy: http.h2_upgrade_policy.as_deref().and_then(|p| match p {
            "DEFAULT" => Some(H2UpgradePolicy::Default),
            "DO_NOT_UPGRADE" => Some(H2UpgradePolicy::DoNotUpgrade),
            "UPGRADE" => Some(H2UpgradePolicy::Upgrade),
            _ => None,
        }),
        max_concurrent_streams: None,
        use_client_protocol: http.use_client_protocol.unwrap_or(false),
    }
}

/// As Istio configures Envoy: 0 for `maxEjectionPercent` is unset (10%), and local-origin failures count
/// apart only with `splitExternalLocalOriginErrors` (0 there is unset too).
fn outlier_detection(o: &istio::OutlierDetection) -> OutlierDetection {
    let split = o.split_external_local_origin_errors.unwrap_or(false);
    OutlierDetection {
        consecutive_5xx_errors: count(o.consecutive_5xx_errors),
        consecutive_gateway_errors: count(o.consecutive_gateway_errors),
        consecutive_local_origin_failures: limit(o.consecutive_local_origin_failures).filter(|_| split),
        split_external_local_origin_errors: split,
        interval_ms: ms(&o.interval),
        base_ejection_time_ms: ms(&o.base_ejection_time),
        max_ejection_percent: limit(o.max_ejection_percent),
        min_health_percent: count(o.min_health_percent),
    }
}

/// `budgetInterval: 0s` is the default (retries counted against requests in flight).
fn retry_budget(b: &istio::RetryBudget) -> RetryBudget {
    RetryBudget {
        percent: b.percent,
        min_retry_concurrency: limit(b.min_retry_concurrency),
        budget_interval_ms: ms(&b.budget_interval).filter(|ms| *ms > 0),
    }
}

#[cfg(test)]
mod tests {
    use warren_api::resilience::{ClusterPolicy, RetryPolicy};

    use super::*;
    use crate::{check::IstioObject, cluster::ClusterState, tables::Resource};

    const BASE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {warren.dev/mesh: enabled}}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: httpbin, namespace: shop}\n\
        spec: {clusterIP: 10.96.0.20, selector: {app: httpbin}, ports: [{port: 8000, targetPort: 80}, {port: 9080}]}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: httpbin-1, namespace: shop, uid: u1, labels: {app: httpbin, version: v1}}\n\
        spec: {containers: [], nodeName: n1}\nstatus: {podIP: 10.244.1.2}\n";
    const DR: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n";

    fn state(yaml: &str) -> ClusterState {
        let mut state = ClusterState::default();
        state.add_yaml(BASE).unwrap();
        state.add_yaml(yaml).unwrap();
        state
    }

    fn service(state: &ClusterState, key: &str) -> Service {
        match super::super::compile(state).resources[&format!("service/{key}")].as_ref() {
            Resource::Service(s) => s.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn retries(yaml: &str) -> RetryPolicy {
        retry_policy(&serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn retry_on_is_parsed_as_istio_applies_it() {
        let codes = retries("{attempts: 3, retryOn: 'gateway-error, 503,connect-failure,504,503'}");
        assert_eq!(codes.retry_on, [RetryOn::GatewayError, RetryOn::ConnectFailure, RetryOn::RetriableStatusCodes]);
        assert_eq!(codes.status_codes, [503, 504], "numbers are status codes, retried under retriable-status-codes");
        let unset = retries("{attempts: 3}");
        assert_eq!((unset.attempts, unset.retry_on, unset.status_codes), (3, RetryPolicy::istio_default().retry_on, vec![]));
        assert_eq!(retries("{attempts: 3, retryOn: ''}").retry_on, RetryPolicy::istio_default().retry_on, "empty is unset");
        assert_eq!(retries("{attempts: 0}"), RetryPolicy::disabled());
        assert_eq!(retries("{attempts: 0}").attempts, 0);
        let full = retries(
            "{attempts: 2, perTryTimeout: 2s, retryOn: 'retriable-status-codes,409,5xx,envoy-ratelimited', backoff: 100ms, \
             retryRemoteLocalities: true, retryIgnorePreviousHosts: false}",
        );
        let expected = RetryPolicy {
            attempts: 2,
            per_try_timeout_ms: Some(2000),
            retry_on: vec![RetryOn::RetriableStatusCodes, RetryOn::FiveXx],
            status_codes: vec![409],
            retry_remote_localities: true,
            ignore_previous_hosts: false,
            backoff_ms: Some(100),
        };
        assert_eq!(full, expected, "envoy-ratelimited is left out (support names it)");
        assert!(retries("{attempts: 1}").ignore_previous_hosts, "Istio's default");
    }

    #[test]
    fn rules_carry_their_retries_or_none_for_istios_default() {
        let state = state(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: httpbin, namespace: shop}\n\
             spec: {hosts: [httpbin], http: [{retries: {attempts: 5, retryOn: '503'}, route: [{destination: {host: httpbin}}]}, \
             {route: [{destination: {host: httpbin}}]}]}\n",
        );
        let compiled = super::super::compile(&state);
        let Resource::Route(route) = compiled.resources["route/shop/httpbin"].as_ref() else { panic!() };
        let first = route.http[0].retries.as_ref().unwrap();
        assert_eq!((first.attempts, first.status_codes.as_slice()), (5, &[503][..]));
        assert_eq!(route.http[1].retries, None, "no retries written: the agent applies RetryPolicy::istio_default");
    }

    const CIRCUIT_BREAKER: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: httpbin\n  namespace: shop\n\
        spec:\n  host: httpbin\n  trafficPolicy:\n    connectionPool:\n      tcp:\n        maxConnections: 1\n      http:\n\
        \x20       http1MaxPendingRequests: 1\n        maxRequestsPerConnection: 1\n    outlierDetection:\n      consecutive5xxErrors: 1\n\
        \x20     interval: 1s\n      baseEjectionTime: 3m\n      maxEjectionPercent: 100\n";

    #[test]
    fn the_circuit_breaking_task_compiles_to_its_limits() {
        let state = state(CIRCUIT_BREAKER);
        let checked = state.destination_rules[0].check();
        assert_eq!((checked.errors, checked.unsupported), (vec![], vec![]), "valid, and every field is acted on");
        let httpbin = service(&state, "shop/httpbin");
        let pool = ConnectionPool {
            tcp: TcpPool { max_connections: Some(1), ..Default::default() },
            http: HttpPool { http1_max_pending_requests: Some(1), max_requests_per_connection: Some(1), ..Default::default() },
        };
        let outlier = OutlierDetection {
            consecutive_5xx_errors: Some(1),
            interval_ms: Some(1000),
            base_ejection_time_ms: Some(180_000),
            max_ejection_percent: Some(100),
            ..Default::default()
        };
        let expected = TrafficPolicy { connection_pool: Some(pool), outlier_detection: Some(outlier), ..Default::default() };
        assert_eq!(httpbin.traffic_policy, Some(expected));
        assert!(httpbin.subset_policies.is_empty());
        assert_eq!(httpbin.policy_origin.as_ref().map(|o| (o.kind.as_str(), o.name.as_str())), Some(("DestinationRule", "httpbin")));
        let at_8000 = httpbin.cluster_policy(None, 8000);
        assert_eq!(at_8000.outlier_detection.unwrap().consecutive_5xx_errors(), 1);
    }

    #[test]
    fn subset_and_port_level_policies_compile() {
        let httpbin = service(
            &state(&format!(
                "{DR}metadata: {{name: httpbin, namespace: shop}}\nspec:\n  host: httpbin.shop.svc.cluster.local\n  trafficPolicy:\n\
                 \x20   loadBalancer: {{simple: ROUND_ROBIN, warmupDurationSecs: 30s}}\n    retryBudget: {{percent: 25, budgetInterval: 0s}}\n\
                 \x20   portLevelSettings:\n    - port: {{number: 9080}}\n      loadBalancer: {{consistentHash: {{httpCookie: {{name: user, ttl: 0s}}}}}}\n\
                 \x20 subsets:\n  - name: v1\n    labels: {{version: v1}}\n    trafficPolicy:\n\
                 \x20     loadBalancer: {{simple: RANDOM}}\n      connectionPool: {{http: {{http2MaxRequests: 0, maxRetries: 5}}}}\n\
                 \x20 - name: v2\n    labels: {{version: v2}}\n"
            )),
            "shop/httpbin",
        );
        let top = httpbin.traffic_policy.clone().unwrap();
        assert_eq!(top.load_balancer.as_ref().map(|l| (l.simple, l.warmup_ms)), Some((Some(SimpleLb::RoundRobin), Some(30_000))));
        assert_eq!(top.retry_budget, Some(RetryBudget { percent: Some(25.0), min_retry_concurrency: None, budget_interval_ms: None }));
        assert_eq!(httpbin.subset_policies.keys().collect::<Vec<_>>(), ["v1"], "v2 has no policy of its own");
        let cookie = HashKey::Cookie { name: "user".into(), path: None, ttl_ms: Some(0) };
        let hashed = httpbin.cluster_policy(None, 9080).load_balancer.unwrap().consistent_hash.unwrap();
        assert_eq!((hashed.key, hashed.ring), (cookie, HashRing::RingHash { minimum_ring_size: 1024 }), "a session cookie");
        let v1: ClusterPolicy = httpbin.cluster_policy(Some("v1"), 8000);
        assert_eq!(v1.load_balancer.unwrap().simple, Some(SimpleLb::Random));
        let http = v1.connection_pool.unwrap().http;
        assert_eq!((http.http2_max_requests, http.max_retries), (None, Some(5)), "0 is Istio's unlimited");
        assert_eq!(v1.retry_budget.unwrap().percent, Some(25.0), "the top-level budget applies to the subset");
    }

    #[test]
    fn the_oldest_rule_with_a_top_level_policy_gives_it() {
        let rule = |name: &str, time: &str, spec: &str| {
            format!("{DR}metadata: {{name: {name}, namespace: shop, creationTimestamp: '{time}'}}\nspec: {{host: httpbin, {spec}}}\n---\n")
        };
        let subsets_only = rule("a", "2023-01-01T00:00:00Z", "subsets: [{name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}]");
        let younger = rule("c", "2025-01-01T00:00:00Z", "trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}, \
            subsets: [{name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}}]");
        let older = rule("b", "2024-01-01T00:00:00Z", "trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}");
        let httpbin = service(&state(&format!("{younger}{subsets_only}{older}")), "shop/httpbin");
        let simple = |p: Option<&TrafficPolicy>| p.and_then(|p| p.load_balancer.as_ref()?.simple);
        assert_eq!(simple(httpbin.traffic_policy.as_ref()), Some(SimpleLb::RoundRobin), "b: the oldest with a trafficPolicy");
        assert_eq!(httpbin.policy_origin.as_ref().unwrap().name, "b");
        assert_eq!(simple(httpbin.subset_policies.get("v1")), Some(SimpleLb::Random), "v1 is a's");
        let tls_only = rule("t", "2024-06-01T00:00:00Z", "trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}");
        let httpbin = service(&state(&format!("{younger}{tls_only}")), "shop/httpbin");
        assert_eq!(httpbin.traffic_policy, None, "t's policy (tls only) is in force, and has nothing for the agent");
        assert_eq!(simple(httpbin.subset_policies.get("v1")), Some(SimpleLb::Passthrough), "v1 is c's");
        assert_eq!(httpbin.policy_origin.as_ref().unwrap().name, "c", "the origin of the subset policies");
    }

    #[test]
    fn service_entries_get_their_destination_rules_policies() {
        let state = state(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: shop}}\n\
             spec: {{hosts: [api.example.com], ports: [{{number: 443, name: tls, protocol: TLS}}], resolution: DNS}}\n---\n\
             {DR}metadata: {{name: api, namespace: shop}}\n\
             spec: {{host: api.example.com, trafficPolicy: {{outlierDetection: {{consecutiveGatewayErrors: 2}}, connectionPool: {{tcp: {{connectTimeout: 250ms}}}}}}}}\n"
        ));
        let api = service(&state, "shop/api");
        let policy = api.traffic_policy.unwrap();
        assert_eq!(policy.outlier_detection.unwrap().consecutive_gateway_errors, Some(2));
        assert_eq!(policy.connection_pool.unwrap().tcp.connect_timeout_ms, Some(250));
        assert_eq!(api.policy_origin.unwrap().name, "api");
    }

    #[test]
    fn hash_rings_and_limits_take_istios_defaults() {
        let lb = |yaml: &str| load_balancer(&serde_yaml::from_str(yaml).unwrap());
        let ring = |yaml: &str| lb(yaml).consistent_hash.unwrap().ring;
        assert_eq!(ring("{consistentHash: {useSourceIp: true}}"), HashRing::RingHash { minimum_ring_size: 1024 });
        assert_eq!(ring("{consistentHash: {useSourceIp: true, minimumRingSize: 64}}"), HashRing::RingHash { minimum_ring_size: 64 });
        assert_eq!(ring("{consistentHash: {httpHeaderName: x, ringHash: {minimumRingSize: 0}}}"), HashRing::RingHash { minimum_ring_size: 1024 });
        assert_eq!(ring("{consistentHash: {httpQueryParameterName: q, maglev: {tableSize: 7}}}"), HashRing::Maglev { table_size: 7 });
        assert_eq!(lb("{consistentHash: {useSourceIp: false}}").consistent_hash, None, "hashes nothing");
        assert_eq!(lb("{simple: LEAST_CONN}").simple, Some(SimpleLb::LeastRequest), "the deprecated name");
        let locality = lb("{localityLbSetting: {distribute: [{from: 'us/*', to: {'us/a/*': 80, 'eu/*': 20}}]}}").locality.unwrap();
        assert_eq!(locality.distribute[0].to.get("us/a/*"), Some(&80));
        let outlier = outlier_detection(&serde_yaml::from_str("{consecutiveLocalOriginFailures: 3, maxEjectionPercent: 0}").unwrap());
        assert_eq!((outlier.consecutive_local_origin_failures, outlier.max_ejection_percent()), (None, 10), "without split: not counted apart");
    }
}
