//! What keeps requests flowing when backends fail, checked as Istio checks it: a route's `retries`
//! (validateHTTPRetry) and a DestinationRule's `trafficPolicy` (validateTrafficPolicy, validateLoadBalancer,
//! validateConnectionPool, validateOutlierDetection, ValidateLocalityLbSetting), with the ranges Istio's CRD
//! schema adds. What Istio only warns about (deprecated fields, failover without outlier detection) is no
//! error here: [`crate::support`] names those fields.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use super::{Errors, check_client_tls, check_duration, check_port, parse_duration};
use crate::istio::{
    ConnectionPoolSettings, ConsistentHashLb, HttpCookie, HttpRetry, HttpSettings, LoadBalancerSettings,
    LocalityLbSetting, OutlierDetection, PortTrafficPolicy, RetryBudget, TcpSettings, TrafficPolicy,
    WarmupConfiguration,
};

/// The `retryOn` conditions Istio accepts (Envoy's `x-envoy-retry-on` and `x-envoy-retry-grpc-on` values);
/// numbers are status codes.
pub const RETRY_ON: &[&str] = &[
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "envoy-ratelimited", "retriable-4xx",
    "refused-stream", "retriable-status-codes", "retriable-headers", "http3-post-connect-failure", "cancelled",
    "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
];

/// The largest value of Istio's int32 and uint32 fields.
const INT32: i64 = i32::MAX as i64;
const UINT32: i64 = u32::MAX as i64;
/// Maglev's table size must be below this (Envoy's limit).
const MAGLEV_MAX: u64 = 5_000_011;
/// The node labels `failoverPriority` may not name together with `failover` (they are what failover uses).
const TOPOLOGY_LABELS: [&str; 3] =
    ["topology.kubernetes.io/region", "topology.kubernetes.io/zone", "topology.istio.io/subzone"];

/// A duration as Istio's ValidateDuration takes it: at least 1ms, in whole milliseconds.
fn check_min_duration(errors: &mut Errors, field: String, value: &Option<String>) {
    let Some(text) = value else { return };
    match parse_duration(text) {
        Err(reason) => errors.add(field, reason),
        Ok(d) if d < Duration::from_millis(1) => {
            errors.add(field, format!("{text:?} is shorter than 1ms (Istio's minimum)"))
        }
        Ok(d) if d.subsec_nanos() % 1_000_000 != 0 => {
            errors.add(field, format!("{text:?}: Istio takes durations in whole milliseconds"))
        }
        Ok(_) => {}
    }
}

/// A timeout where `0s` turns it off, else as [`check_min_duration`].
fn check_timeout_or_zero(errors: &mut Errors, field: String, value: &Option<String>) {
    if value.as_deref().and_then(|t| parse_duration(t).ok()) != Some(Duration::ZERO) {
        check_min_duration(errors, field, value);
    }
}

fn check_count(errors: &mut Errors, field: String, value: Option<i64>, max: i64) {
    match value {
        Some(n) if n < 0 => errors.add(field, format!("{n} is not a count (0 or more)")),
        Some(n) if n > max => errors.add(field, format!("{n} exceeds the largest count ({max})")),
        _ => {}
    }
}

fn check_percent_int(errors: &mut Errors, field: String, value: Option<i64>) {
    if let Some(p) = value
        && !(0..=100).contains(&p)
    {
        errors.add(field, format!("{p} is not a percentage between 0 and 100"));
    }
}

fn check_not_empty(errors: &mut Errors, field: String, value: &Option<String>) {
    if value.as_deref() == Some("") {
        errors.add(field, "must not be empty");
    }
}

/// `retries`: attempts at least 0 (0 disables retries, and then nothing else may be set), durations of at
/// least 1ms, every `retryOn` entry a known condition or an HTTP status code.
pub(super) fn check_retries(errors: &mut Errors, at: &str, retries: &HttpRetry) {
    let at = format!("{at}.retries");
    // An empty `retryOn` is unset, as in Istio.
    let retry_on = retries.retry_on.as_deref().filter(|list| !list.is_empty());
    match retries.attempts {
        n if n < 0 => errors.add(format!("{at}.attempts"), format!("{n} is negative")),
        n if n > INT32 => errors.add(format!("{at}.attempts"), format!("{n} exceeds the largest count ({INT32})")),
        0 if retries.per_try_timeout.is_some() || retry_on.is_some() || retries.retry_remote_localities.is_some() => {
            let set = "perTryTimeout, retryOn and retryRemoteLocalities cannot be set";
            errors.add(at.clone(), format!("attempts is 0 or unset (retries disabled): {set}"))
        }
        _ => {}
    }
    check_min_duration(errors, format!("{at}.perTryTimeout"), &retries.per_try_timeout);
    check_min_duration(errors, format!("{at}.backoff"), &retries.backoff);
    for entry in retry_on.into_iter().flat_map(|list| list.split(',')).map(str::trim) {
        if !is_retry_condition(entry) {
            let known = RETRY_ON.join(", ");
            let reason = format!("{entry:?} is not a retry condition ({known}, or an HTTP status code 100-599)");
            errors.add(format!("{at}.retryOn"), reason);
        }
    }
}

/// Whether a `retryOn` entry is a condition Istio accepts or a status code. Callers trim entries, as Istio
/// does when it applies them (its webhook refuses the spaces; accepting them refuses nothing Istio runs).
pub fn is_retry_condition(entry: &str) -> bool {
    RETRY_ON.contains(&entry) || status_code(entry).is_some()
}

/// A `retryOn` entry that is a status code.
pub fn status_code(entry: &str) -> Option<u16> {
    entry.parse::<u16>().ok().filter(|code| (100..=599).contains(code))
}

pub(super) fn check_traffic_policy(errors: &mut Errors, at: &str, policy: &TrafficPolicy) {
    if *policy == TrafficPolicy::default() {
        errors.add(at.to_string(), "must have at least one field");
    }
    if policy.tunnel.is_some() && policy.proxy_protocol.is_some() {
        errors.add(at.to_string(), "only one of tunnel, proxyProtocol may be set");
    }
    if let Some(tls) = &policy.tls {
        check_client_tls(errors, &format!("{at}.tls"), tls);
    }
    check_parts(errors, at, &policy.connection_pool, &policy.load_balancer, &policy.outlier_detection);
    for (i, port_policy) in policy.port_level_settings.iter().enumerate() {
        check_port_policy(errors, &format!("{at}.portLevelSettings[{i}]"), port_policy);
    }
    if let Some(budget) = &policy.retry_budget {
        check_retry_budget(errors, &format!("{at}.retryBudget"), budget);
    }
}

/// The three parts a policy and its port-level settings share.
fn check_parts(
    errors: &mut Errors,
    at: &str,
    pool: &Option<ConnectionPoolSettings>,
    lb: &Option<LoadBalancerSettings>,
    outlier: &Option<OutlierDetection>,
) {
    if let Some(pool) = pool {
        check_connection_pool(errors, &format!("{at}.connectionPool"), pool);
    }
    if let Some(lb) = lb {
        check_load_balancer(errors, &format!("{at}.loadBalancer"), lb);
    }
    if let Some(outlier) = outlier {
        check_outlier_detection(errors, &format!("{at}.outlierDetection"), outlier);
    }
}

fn check_port_policy(errors: &mut Errors, at: &str, policy: &PortTrafficPolicy) {
    match &policy.port {
        None => errors.add(format!("{at}.port"), "is required"),
        Some(port) => check_port(errors, format!("{at}.port.number"), port.number),
    }
    let PortTrafficPolicy { load_balancer, connection_pool, outlier_detection, tls, unknown, .. } = policy;
    let parts = [load_balancer.is_some(), connection_pool.is_some(), outlier_detection.is_some(), tls.is_some()];
    if !parts.contains(&true) && unknown.is_empty() {
        errors.add(at.to_string(), "must have at least one field besides port");
    }
    if let Some(tls) = tls {
        check_client_tls(errors, &format!("{at}.tls"), tls);
    }
    check_parts(errors, at, connection_pool, load_balancer, outlier_detection);
}

fn check_connection_pool(errors: &mut Errors, at: &str, pool: &ConnectionPoolSettings) {
    if pool.tcp.is_none() && pool.http.is_none() && pool.unknown.is_empty() {
        errors.add(at.to_string(), "must have tcp or http settings");
    }
    if let Some(tcp) = &pool.tcp {
        check_tcp(errors, &format!("{at}.tcp"), tcp);
    }
    if let Some(http) = &pool.http {
        check_http(errors, &format!("{at}.http"), http);
    }
}

fn check_tcp(errors: &mut Errors, at: &str, tcp: &TcpSettings) {
    check_min_duration(errors, format!("{at}.connectTimeout"), &tcp.connect_timeout);
    check_count(errors, format!("{at}.maxConnections"), tcp.max_connections, INT32);
    check_min_duration(errors, format!("{at}.maxConnectionDuration"), &tcp.max_connection_duration);
    check_timeout_or_zero(errors, format!("{at}.idleTimeout"), &tcp.idle_timeout);
    if let Some(keepalive) = &tcp.tcp_keepalive {
        check_count(errors, format!("{at}.tcpKeepalive.probes"), keepalive.probes, UINT32);
        check_min_duration(errors, format!("{at}.tcpKeepalive.time"), &keepalive.time);
        check_min_duration(errors, format!("{at}.tcpKeepalive.interval"), &keepalive.interval);
    }
}

fn check_http(errors: &mut Errors, at: &str, http: &HttpSettings) {
    let counts = [
        ("http1MaxPendingRequests", http.http1_max_pending_requests),
        ("http2MaxRequests", http.http2_max_requests),
        ("maxRequestsPerConnection", http.max_requests_per_connection),
        ("maxRetries", http.max_retries),
        ("maxConcurrentStreams", http.max_concurrent_streams),
    ];
    for (name, value) in counts {
        check_count(errors, format!("{at}.{name}"), value, INT32);
    }
    check_min_duration(errors, format!("{at}.idleTimeout"), &http.idle_timeout);
    match http.h2_upgrade_policy.as_deref() {
        None | Some("DEFAULT" | "DO_NOT_UPGRADE") => {}
        Some("UPGRADE") if http.use_client_protocol == Some(true) => {
            errors.add(format!("{at}.useClientProtocol"), "cannot be true with h2UpgradePolicy UPGRADE")
        }
        Some("UPGRADE") => {}
        Some(other) => errors.add(
            format!("{at}.h2UpgradePolicy"),
            format!("{other:?} is not an upgrade policy (DEFAULT, DO_NOT_UPGRADE, UPGRADE)"),
        ),
    }
    if let Some(keepalive) = &http.http2_keep_alive {
        for (name, value) in [("interval", &keepalive.interval), ("timeout", &keepalive.timeout)] {
            match value {
                None => errors.add(format!("{at}.http2KeepAlive.{name}"), "is required"),
                Some(_) => check_min_duration(errors, format!("{at}.http2KeepAlive.{name}"), value),
            }
        }
    }
}

const SIMPLE_LB: [&str; 6] = ["UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"];

fn check_load_balancer(errors: &mut Errors, at: &str, lb: &LoadBalancerSettings) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        errors.add(at.to_string(), "only one of simple, consistentHash may be set");
    }
    if let Some(simple) = &lb.simple
        && !SIMPLE_LB.contains(&simple.as_str())
    {
        errors.add(format!("{at}.simple"), format!("{simple:?} is not a load balancer ({})", SIMPLE_LB.join(", ")));
    }
    if let Some(hash) = &lb.consistent_hash {
        check_consistent_hash(errors, &format!("{at}.consistentHash"), hash);
    }
    if lb.locality_lb_setting.is_some() && lb.zone_aware_lb_setting.is_some() {
        errors.add(at.to_string(), "only one of localityLbSetting, zoneAwareLbSetting may be set");
    }
    if let Some(locality) = &lb.locality_lb_setting {
        check_locality_lb(errors, &format!("{at}.localityLbSetting"), locality);
    }
    if lb.warmup_duration_secs.is_some() && lb.warmup.is_some() {
        errors.add(at.to_string(), "only one of warmupDurationSecs, warmup may be set");
    }
    check_min_duration(errors, format!("{at}.warmupDurationSecs"), &lb.warmup_duration_secs);
    if let Some(warmup) = &lb.warmup {
        check_warmup(errors, &format!("{at}.warmup"), warmup);
    }
}

fn check_consistent_hash(errors: &mut Errors, at: &str, hash: &ConsistentHashLb) {
    let keys = [
        hash.http_header_name.is_some(),
        hash.http_cookie.is_some(),
        hash.use_source_ip.is_some(),
        hash.http_query_parameter_name.is_some(),
    ];
    if keys.iter().filter(|set| **set).count() != 1 {
        let reason = "needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName";
        errors.add(at.to_string(), reason);
    }
    check_not_empty(errors, format!("{at}.httpHeaderName"), &hash.http_header_name);
    check_not_empty(errors, format!("{at}.httpQueryParameterName"), &hash.http_query_parameter_name);
    if let Some(cookie) = &hash.http_cookie {
        check_cookie(errors, &format!("{at}.httpCookie"), cookie);
    }
    let deprecated = hash.minimum_ring_size.is_some_and(|n| n != 0);
    if [hash.ring_hash.is_some(), hash.maglev.is_some(), deprecated].iter().filter(|set| **set).count() > 1 {
        errors.add(at.to_string(), "only one of ringHash, maglev, minimumRingSize may be set");
    }
    if let Some(maglev) = &hash.maglev {
        let field = format!("{at}.maglev.tableSize");
        match maglev.table_size.unwrap_or(0) {
            0 => errors.add(field, "is required for maglev"),
            n if n >= MAGLEV_MAX => errors.add(field, format!("{n} is not less than {MAGLEV_MAX}")),
            n if !is_prime(n) => errors.add(field, format!("{n} is not a prime number")),
            _ => {}
        }
    }
}

fn check_cookie(errors: &mut Errors, at: &str, cookie: &HttpCookie) {
    if cookie.name.is_empty() {
        errors.add(format!("{at}.name"), "is required");
    }
    // The TTL may be 0s: a session cookie.
    check_duration(errors, format!("{at}.ttl"), &cookie.ttl);
    let mut names = BTreeSet::new();
    for (i, attribute) in cookie.attributes.iter().enumerate() {
        if attribute.name.is_empty() {
            errors.add(format!("{at}.attributes[{i}].name"), "is required");
        } else if !names.insert(attribute.name.as_str()) {
            errors.add(format!("{at}.attributes[{i}].name"), format!("{:?} is given twice", attribute.name));
        }
    }
}

/// Envoy's primality test for Maglev table sizes, which Istio copies (so 1 passes).
fn is_prime(n: u64) -> bool {
    match n {
        0 => false,
        1..=3 => true,
        _ if n.is_multiple_of(2) => false,
        _ => (3..).step_by(2).take_while(|f| *f <= n / f).all(|f| !n.is_multiple_of(f)),
    }
}

fn check_warmup(errors: &mut Errors, at: &str, warmup: &WarmupConfiguration) {
    match &warmup.duration {
        None => errors.add(format!("{at}.duration"), "is required"),
        Some(_) => check_min_duration(errors, format!("{at}.duration"), &warmup.duration),
    }
    if let Some(p) = warmup.minimum_percent
        && !(0.0..=100.0).contains(&p)
    {
        errors.add(format!("{at}.minimumPercent"), format!("{p} is not a percentage between 0 and 100"));
    }
    if let Some(a) = warmup.aggression
        && a <= 0.0
    {
        errors.add(format!("{at}.aggression"), format!("{a} is not greater than 0"));
    }
}

fn check_locality_lb(errors: &mut Errors, at: &str, lb: &LocalityLbSetting) {
    if !lb.distribute.is_empty() && !lb.failover.is_empty() {
        return errors.add(at.to_string(), "only one of distribute, failover may be set");
    }
    if !lb.failover.is_empty()
        && let Some(label) = lb.failover_priority.iter().find(|l| TOPOLOGY_LABELS.contains(&l.as_str()))
    {
        let reason = format!("{label:?}: a topology label cannot be used with failover");
        return errors.add(format!("{at}.failoverPriority"), reason);
    }
    for (i, distribute) in lb.distribute.iter().enumerate() {
        check_distribute_weights(errors, &format!("{at}.distribute[{i}].to"), &distribute.to);
    }
    let from: Vec<&str> = lb.distribute.iter().map(|d| d.from.as_str()).collect();
    check_localities(errors, &format!("{at}.distribute"), &from);
    for (i, failover) in lb.failover.iter().enumerate() {
        let field = format!("{at}.failover[{i}]");
        if failover.from == failover.to {
            errors.add(field.clone(), format!("from and to are the same region ({:?})", failover.from));
        }
        if [&failover.from, &failover.to].iter().any(|r| r.contains('/')) {
            errors.add(field.clone(), "failover names regions only (no \"/\")");
        }
        if [&failover.from, &failover.to].iter().any(|r| r.contains('*')) {
            errors.add(field, "failover regions cannot contain \"*\"");
        }
    }
}

fn check_distribute_weights(errors: &mut Errors, at: &str, to: &BTreeMap<String, i64>) {
    if let Some((locality, weight)) = to.iter().find(|(_, w)| !(1..=100).contains(*w)) {
        return errors.add(format!("{at}.{locality}"), format!("{weight} is not a weight between 1 and 100"));
    }
    let total: i64 = to.values().sum();
    if total != 100 {
        return errors.add(at.to_string(), format!("the weights sum to {total}, not 100"));
    }
    check_localities(errors, at, &to.keys().map(String::as_str).collect::<Vec<_>>());
}

/// Istio's validateLocalities: `region[/zone[/subzone]]` with no empty part, one `*` at most and only at
/// the end, and none overlapping one listed before it (a region, then one of its zones).
fn check_localities(errors: &mut Errors, at: &str, localities: &[&str]) {
    let mut seen = Localities::default();
    for locality in localities {
        let stars = locality.matches('*').count();
        let reason = if stars > 1 || (stars == 1 && !locality.ends_with('*')) {
            Some("a \"*\" may only stand once, at the end")
        } else if locality.split('/').any(str::is_empty) {
            Some("a locality has no empty region, zone or subzone")
        } else if !seen.insert(locality) {
            Some("overlaps a locality listed before it")
        } else {
            None
        };
        if let Some(reason) = reason {
            return errors.add(at.to_string(), format!("{locality:?}: {reason}"));
        }
    }
}

/// Region → zone → subzones, `*` standing for "all" at any level.
#[derive(Default)]
struct Localities<'a>(BTreeMap<&'a str, BTreeMap<&'a str, BTreeSet<&'a str>>>);

impl<'a> Localities<'a> {
    /// Adds `locality`; false when it overlaps one added before (Istio's order-dependent test).
    fn insert(&mut self, locality: &'a str) -> bool {
        if self.0.contains_key("*") {
            return false;
        }
        let parts: Vec<&str> = locality.splitn(3, '/').collect();
        let (region, zone, subzone) = (parts[0], parts.get(1).copied(), parts.get(2).copied());
        let Some(zone) = zone else {
            let fresh = !self.0.contains_key(region);
            self.0.insert(region, BTreeMap::from([("*", BTreeSet::from(["*"]))]));
            return fresh;
        };
        let zones = self.0.entry(region).or_default();
        if zones.contains_key("*") {
            return false;
        }
        let Some(subzone) = subzone else {
            return zones.insert(zone, BTreeSet::from(["*"])).is_none();
        };
        let subzones = zones.entry(zone).or_default();
        !subzones.contains("*") && subzones.insert(subzone)
    }
}

fn check_outlier_detection(errors: &mut Errors, at: &str, outlier: &OutlierDetection) {
    check_min_duration(errors, format!("{at}.interval"), &outlier.interval);
    check_min_duration(errors, format!("{at}.baseEjectionTime"), &outlier.base_ejection_time);
    check_count(errors, format!("{at}.consecutiveErrors"), outlier.consecutive_errors, INT32);
    let counts = [
        ("consecutive5xxErrors", outlier.consecutive_5xx_errors),
        ("consecutiveGatewayErrors", outlier.consecutive_gateway_errors),
        ("consecutiveLocalOriginFailures", outlier.consecutive_local_origin_failures),
    ];
    for (name, value) in counts {
        check_count(errors, format!("{at}.{name}"), value, UINT32);
    }
    let split = outlier.split_external_local_origin_errors == Some(true);
    if outlier.consecutive_local_origin_failures.is_some_and(|n| n > 0) && !split {
        let reason = "is counted only with splitExternalLocalOriginErrors: true";
        errors.add(format!("{at}.consecutiveLocalOriginFailures"), reason);
    }
    check_percent_int(errors, format!("{at}.maxEjectionPercent"), outlier.max_ejection_percent);
    check_percent_int(errors, format!("{at}.minHealthPercent"), outlier.min_health_percent);
    for (i, code) in outlier.outlier_detection_http_error_codes.iter().enumerate() {
        if !(100..=599).contains(code) {
            let field = format!("{at}.outlierDetectionHttpErrorCodes[{i}]");
            errors.add(field, format!("{code} is not an HTTP status (100-599)"));
        }
    }
}

fn check_retry_budget(errors: &mut Errors, at: &str, budget: &RetryBudget) {
    if let Some(p) = budget.percent
        && !(0.0..=100.0).contains(&p)
    {
        errors.add(format!("{at}.percent"), format!("{p} is not a percentage between 0 and 100"));
    }
    check_count(errors, format!("{at}.minRetryConcurrency"), budget.min_retry_concurrency, UINT32);
    // 0s is the default (requests in flight, not a window).
    check_duration(errors, format!("{at}.budgetInterval"), &budget.budget_interval);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{destination_rule, virtual_service};

    fn dr(yaml: &str) -> Vec<String> {
        destination_rule(&serde_yaml::from_str(yaml).unwrap()).iter().map(ToString::to_string).collect()
    }

    fn policy(yaml: &str) -> Vec<String> {
        dr(&format!("host: r\ntrafficPolicy: {yaml}"))
    }

    fn retries(yaml: &str) -> Vec<String> {
        let spec = format!("hosts: [r]\nhttp: [{{route: [{{destination: {{host: r}}}}], retries: {yaml}}}]");
        virtual_service(&serde_yaml::from_str(&spec).unwrap()).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn retry_conditions_are_istios_or_status_codes() {
        let ok = "{attempts: 3, perTryTimeout: 2s, retryOn: 'gateway-error,connect-failure,refused-stream,503', backoff: 50ms}";
        assert_eq!(retries(ok), Vec::<String>::new());
        assert_eq!(retries("{attempts: 2, retryOn: 'reset-before-request, envoy-ratelimited,http3-post-connect-failure'}"), Vec::<String>::new());
        let bad = retries("{attempts: 3, retryOn: '5xx,sometimes,600'}");
        assert_eq!(bad.len(), 2, "{bad:#?}");
        assert!(bad[0].starts_with("spec.http[0].retries.retryOn: \"sometimes\" is not a retry condition (5xx, gateway-error,"), "{bad:#?}");
        assert!(bad[1].starts_with("spec.http[0].retries.retryOn: \"600\" is not a retry condition"), "{bad:#?}");
        assert_eq!(retries("{attempts: 2, retryOn: '5xx,'}").len(), 1, "an empty entry, as Istio");
    }

    #[test]
    fn retry_attempts_and_durations_as_istio() {
        assert_eq!(retries("{attempts: -1}"), ["spec.http[0].retries.attempts: -1 is negative"]);
        assert_eq!(retries("{attempts: 0}"), Vec::<String>::new(), "0 disables retries");
        assert_eq!(
            retries("{attempts: 0, retryOn: 5xx}"),
            ["spec.http[0].retries: attempts is 0 or unset (retries disabled): perTryTimeout, retryOn and retryRemoteLocalities cannot be set"]
        );
        assert_eq!(
            retries("{attempts: 1, perTryTimeout: 0s, backoff: 1.5ms}"),
            [
                "spec.http[0].retries.perTryTimeout: \"0s\" is shorter than 1ms (Istio's minimum)",
                "spec.http[0].retries.backoff: \"1.5ms\": Istio takes durations in whole milliseconds",
            ]
        );
    }

    #[test]
    fn load_balancers_as_istio_checks_them() {
        assert_eq!(policy("{loadBalancer: {simple: ROUND_ROBIN, consistentHash: {useSourceIp: true}}}"), [
            "spec.trafficPolicy.loadBalancer: only one of simple, consistentHash may be set"
        ]);
        assert_eq!(policy("{loadBalancer: {consistentHash: {httpHeaderName: x, useSourceIp: true}}}"), [
            "spec.trafficPolicy.loadBalancer.consistentHash: needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName"
        ]);
        assert_eq!(policy("{loadBalancer: {consistentHash: {httpCookie: {ttl: 0s}}}}"), [
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name: is required"
        ]);
        assert_eq!(policy("{loadBalancer: {consistentHash: {httpHeaderName: x, ringHash: {}, maglev: {tableSize: 65537}}}}"), [
            "spec.trafficPolicy.loadBalancer.consistentHash: only one of ringHash, maglev, minimumRingSize may be set"
        ]);
        assert_eq!(policy("{loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65536}}}}"), [
            "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize: 65536 is not a prime number"
        ]);
        assert_eq!(policy("{loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}, warmupDurationSecs: 60s}}"), Vec::<String>::new());
        assert_eq!(policy("{loadBalancer: {warmupDurationSecs: 0s, warmup: {duration: 10s}}}"), [
            "spec.trafficPolicy.loadBalancer: only one of warmupDurationSecs, warmup may be set",
            "spec.trafficPolicy.loadBalancer.warmupDurationSecs: \"0s\" is shorter than 1ms (Istio's minimum)",
        ]);
        assert!(is_prime(2) && is_prime(65537) && is_prime(5) && is_prime(1) && !is_prime(0) && !is_prime(9) && !is_prime(65535));
        assert!(is_prime(4_999_999) && !is_prime(u64::MAX), "no overflow");
    }

    #[test]
    fn locality_settings_as_istio_checks_them() {
        let lb = |setting: &str| policy(&format!("{{loadBalancer: {{localityLbSetting: {setting}}}}}"));
        let at = "spec.trafficPolicy.loadBalancer.localityLbSetting";
        assert_eq!(lb("{distribute: [{from: 'us/*', to: {'us/a/*': 80, 'eu/*': 20}}]}"), Vec::<String>::new());
        assert_eq!(lb("{distribute: [{from: a, to: {b: 100}}], failover: [{from: a, to: b}]}"), [format!("{at}: only one of distribute, failover may be set")]);
        assert_eq!(lb("{distribute: [{from: a, to: {b: 60, c: 30}}]}"), [format!("{at}.distribute[0].to: the weights sum to 90, not 100")]);
        assert_eq!(lb("{distribute: [{from: a, to: {b: 0, c: 100}}]}"), [format!("{at}.distribute[0].to.b: 0 is not a weight between 1 and 100")]);
        assert_eq!(lb("{distribute: [{from: 'a/*/b', to: {b: 100}}]}"), [format!("{at}.distribute: \"a/*/b\": a \"*\" may only stand once, at the end")]);
        assert_eq!(lb("{distribute: [{from: a, to: {b: 100}}, {from: a/z, to: {b: 100}}]}"), [format!("{at}.distribute: \"a/z\": overlaps a locality listed before it")]);
        assert_eq!(lb("{failover: [{from: us-east, to: us-east}, {from: us/z, to: eu}]}"), [
            format!("{at}.failover[0]: from and to are the same region (\"us-east\")"),
            format!("{at}.failover[1]: failover names regions only (no \"/\")"),
        ]);
        assert_eq!(lb("{failover: [{from: a, to: b}], failoverPriority: [topology.kubernetes.io/zone]}"), [
            format!("{at}.failoverPriority: \"topology.kubernetes.io/zone\": a topology label cannot be used with failover")
        ]);
        assert_eq!(lb("{failover: [{from: a, to: b}], failoverPriority: [my-label]}"), Vec::<String>::new());
        assert_eq!(lb("{failoverPriority: [topology.kubernetes.io/region, topology.kubernetes.io/zone]}"), Vec::<String>::new());
    }

    #[test]
    fn pools_outlier_detection_and_budgets_as_istio_checks_them() {
        let errors = policy(
            "{connectionPool: {tcp: {connectTimeout: 0s, idleTimeout: 0s, tcpKeepalive: {probes: -1}}, \
             http: {http2MaxRequests: -5, h2UpgradePolicy: UPGRADE, useClientProtocol: true, http2KeepAlive: {interval: 1s}}}, \
             outlierDetection: {consecutive5xxErrors: -1, consecutiveLocalOriginFailures: 2, minHealthPercent: 101, baseEjectionTime: 3m}, \
             retryBudget: {percent: 120, budgetInterval: 0s}}",
        );
        assert_eq!(errors, [
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout: \"0s\" is shorter than 1ms (Istio's minimum)",
            "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive.probes: -1 is not a count (0 or more)",
            "spec.trafficPolicy.connectionPool.http.http2MaxRequests: -5 is not a count (0 or more)",
            "spec.trafficPolicy.connectionPool.http.useClientProtocol: cannot be true with h2UpgradePolicy UPGRADE",
            "spec.trafficPolicy.connectionPool.http.http2KeepAlive.timeout: is required",
            "spec.trafficPolicy.outlierDetection.consecutive5xxErrors: -1 is not a count (0 or more)",
            "spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures: is counted only with splitExternalLocalOriginErrors: true",
            "spec.trafficPolicy.outlierDetection.minHealthPercent: 101 is not a percentage between 0 and 100",
            "spec.trafficPolicy.retryBudget.percent: 120 is not a percentage between 0 and 100",
        ]);
        assert_eq!(policy("{connectionPool: {}}"), ["spec.trafficPolicy.connectionPool: must have tcp or http settings"]);
        assert_eq!(dr("host: r\ntrafficPolicy: {}"), ["spec.trafficPolicy: must have at least one field"]);
    }

    #[test]
    fn port_level_settings_and_subsets_are_checked_alike() {
        let errors = dr(
            "host: r\ntrafficPolicy:\n  portLevelSettings:\n  - {port: {number: 80}, loadBalancer: {simple: FASTEST}}\n  - {loadBalancer: {simple: RANDOM}}\n  \
             - port: {number: 9080}\nsubsets:\n- name: v1\n  trafficPolicy: {portLevelSettings: [{port: {number: 0}, outlierDetection: {interval: 1us}}]}\n",
        );
        assert_eq!(errors, [
            "spec.trafficPolicy.portLevelSettings[0].loadBalancer.simple: \"FASTEST\" is not a load balancer (UNSPECIFIED, LEAST_CONN, RANDOM, PASSTHROUGH, ROUND_ROBIN, LEAST_REQUEST)",
            "spec.trafficPolicy.portLevelSettings[1].port: is required",
            "spec.trafficPolicy.portLevelSettings[2]: must have at least one field besides port",
            "spec.subsets[0].trafficPolicy.portLevelSettings[0].port.number: 0 is not a port (1-65535)",
            "spec.subsets[0].trafficPolicy.portLevelSettings[0].outlierDetection.interval: \"1us\" is shorter than 1ms (Istio's minimum)",
        ]);
    }
}
