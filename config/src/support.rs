//! Which fields of Istio's API Warren acts on — the rule that nothing a user writes is dropped in silence.
//!
//! Every field of every kind Warren reads has an entry here: acted on ([`Support::Field`], [`Support::Map`]),
//! acted on for some values only ([`Support::Values`], [`Support::Check`]), or not yet
//! ([`Support::Unsupported`], with what happens instead). [`review`] walks an object's spec as written and
//! names every field that is set but not honoured, and every field Istio does not define; the controller
//! puts them in the object's `Accepted` condition (reason `Unsupported`) and a Warning Event, and `analyze`
//! prints them. A test derives the field list from the API types (schemars) and fails when a field has no
//! entry, so a field added to [`crate::istio`] cannot be forgotten here.
//!
//! Security fields that cannot be enforced fail closed; [`crate::compile`] applies that (an ALLOW rule that
//! uses one matches nothing, a DENY rule applies without it) and the reasons below say so.
use std::{collections::HashMap, sync::OnceLock};

use serde_json::Value;

use crate::validate::FieldError;

#[derive(Clone, Copy)]
pub enum Support {
    /// Acted on; an object's (or a list of objects') own fields have entries of their own.
    Field,
    /// Acted on; a map whose keys are the user's (labels, header names), not walked.
    Map,
    /// A map whose values are objects with entries under `<path>.*`.
    MapOf,
    /// Acted on for these values; any other value is reported with the reason.
    Values(&'static [&'static str], &'static str),
    /// Acted on when the check returns `None`; otherwise the reason it returns.
    Check(fn(&Value) -> Option<String>),
    /// Set but not acted on: why, and what the data plane does instead.
    Unsupported(&'static str),
}

const CORS: &str = "is not implemented by the L7 proxy yet: requests pass without CORS handling (no preflight answers)";
const DELEGATE: &str = "is not implemented yet: a rule that delegates routes nothing";
const STAT_PREFIX: &str = "is not implemented: Warren's metrics are not named by route";
const DERIVE_PORT: &str = "is not implemented: the redirect keeps the port the request was sent to";
const EXPONENTIAL_DELAY: &str = "is not implemented (Istio does not support it either): no delay is injected";
const HTTP2_ERROR: &str = "is not implemented (Istio does not support it either): no abort is injected";
const TCP_MATCH: &str = "is not evaluated yet: this match is not applied (a rule whose matches are all unapplied is skipped)";
const EXPORT_TO: &str = "only \"*\" (the default) is implemented: the object is visible to every namespace";
const TUNNEL: &str = "is not implemented: connections to the destination are not tunneled";
const PROXY_PROTOCOL: &str = "is not implemented: no PROXY protocol header is sent to the destination";
const COOKIE_ATTRIBUTES: &str = "is not implemented yet: an issued cookie carries only its Path and Max-Age";
const ZONE_AWARE: &str =
    "is not implemented yet: locality load balancing follows localityLbSetting (and Istio's defaults)";
const WARMUP: &str =
    "(the newer form) is not implemented yet: new endpoints get their full share at once; warmupDurationSecs works";
const TCP_IDLE_TIMEOUT: &str =
    "is not implemented yet: connections are not closed for being idle (http.idleTimeout works for HTTP)";
const MAX_CONCURRENT_STREAMS: &str = "is not implemented yet: streams per upstream HTTP/2 connection are not limited";
const HTTP2_KEEPALIVE: &str = "is not implemented yet: no HTTP/2 PINGs are sent on upstream connections";
const CONSECUTIVE_ERRORS: &str =
    "is deprecated and not implemented: use consecutiveGatewayErrors or consecutive5xxErrors";
const ERROR_CODES: &str =
    "is not implemented yet: outlier detection counts 5xx answers (and connection failures) as errors";
const CLIENT_TLS: &str = "is not implemented: the agent uses HBONE mTLS to enrolled destinations and plaintext to others";
const SELECTOR_DR: &str = "is not implemented: the DestinationRule applies to every client";
const SE_ENDPOINT: &str = "is not implemented: endpoints are used by address with the service port, equally";
const ALLOW_CLOSED: &str = "is not enforced yet: fail closed — an ALLOW rule that uses it matches nothing";
const DENY_CLOSED: &str = "is not enforced yet: fail closed — this DENY rule applies without it (denies more, never less)";
const TARGET_REF: &str = "is not supported: fail closed — the policy applies to every workload in its namespace";
const GATEWAY_TLS_FILES: &str = "is not supported (files in the gateway pod): use credentialName; a server that needs it is refused";
const GATEWAY_PINNING: &str = "cannot be enforced: fail closed — connections to this server are refused";
const CIPHER_SUITES: &str = "is not implemented: the gateway offers rustls' default suites (TLS 1.2 AEAD and TLS 1.3 only)";
const BIND: &str = "is not implemented: the gateway serves the port on every address of its pods";

type Table = HashMap<String, Support>;

fn table(entries: &[(&str, Support)]) -> Table {
    entries.iter().map(|(path, support)| (path.to_string(), *support)).collect()
}

/// `entries` once at the top level and once under each of `prefixes` (a DestinationRule's traffic policy
/// appears at the top and in every subset).
fn nested(prefixes: &[&str], entries: &[(&str, Support)]) -> Vec<(String, Support)> {
    prefixes
        .iter()
        .flat_map(|prefix| entries.iter().map(move |(path, s)| (format!("{prefix}{path}"), *s)))
        .collect()
}

fn virtual_service() -> Table {
    use Support::*;
    let mut t = table(&[
        ("hosts", Field),
        ("gateways", Field),
        ("exportTo", Values(&["*"], EXPORT_TO)),
        ("tls", Field),
        ("tls[].match", Field),
        ("tls[].match[].sniHosts", Field),
        ("tls[].match[].port", Field),
        ("tls[].match[].gateways", Field),
        ("tls[].match[].sourceLabels", Map),
        ("tls[].match[].sourceNamespace", Field),
        ("tls[].match[].destinationSubnets", Unsupported(TCP_MATCH)),
        ("tls[].route", Field),
        ("tls[].route[].weight", Field),
        ("tls[].route[].destination", Field),
        ("tls[].route[].destination.host", Field),
        ("tls[].route[].destination.port", Field),
        ("tls[].route[].destination.port.number", Field),
        ("tls[].route[].destination.subset", Field),
        ("http", Field),
        ("http[].name", Field),
        ("http[].route", Field),
        ("http[].route[].weight", Field),
        ("http[].route[].headers", Field),
        ("tcp", Field),
        ("tcp[].match", Field),
        ("tcp[].match[].port", Field),
        ("tcp[].match[].destinationSubnets", Unsupported(TCP_MATCH)),
        ("tcp[].match[].sourceLabels", Unsupported(TCP_MATCH)),
        ("tcp[].match[].gateways", Unsupported(TCP_MATCH)),
        ("tcp[].match[].sourceNamespace", Unsupported(TCP_MATCH)),
        ("tcp[].match[].sourceSubnet", Unsupported(TCP_MATCH)),
        ("tcp[].route", Field),
        ("tcp[].route[].weight", Field),
        // What the agent's L7 proxy applies to each request.
        ("http[].match", Field),
        ("http[].match[].headers", MapOf),
        ("http[].match[].queryParams", MapOf),
        ("http[].match[].withoutHeaders", MapOf),
        ("http[].match[].sourceLabels", Map),
        ("http[].match[].statPrefix", Unsupported(STAT_PREFIX)),
        ("http[].timeout", Field),
        ("http[].retries", Field),
        ("http[].retries.attempts", Field),
        ("http[].retries.perTryTimeout", Field),
        ("http[].retries.retryOn", Check(retry_on)),
        ("http[].retries.retryRemoteLocalities", Field),
        ("http[].retries.retryIgnorePreviousHosts", Field),
        ("http[].retries.backoff", Field),
        ("http[].corsPolicy", Unsupported(CORS)),
        ("http[].delegate", Unsupported(DELEGATE)),
        ("http[].fault", Field),
        ("http[].fault.delay", Field),
        ("http[].fault.delay.exponentialDelay", Unsupported(EXPONENTIAL_DELAY)),
        ("http[].fault.abort", Field),
        ("http[].fault.abort.http2Error", Unsupported(HTTP2_ERROR)),
        ("http[].rewrite", Field),
        ("http[].rewrite.uriRegexRewrite", Field),
        ("http[].redirect", Field),
        ("http[].redirect.derivePort", Unsupported(DERIVE_PORT)),
        ("http[].directResponse", Field),
        ("http[].directResponse.body", Field),
        ("http[].mirror", Field),
        ("http[].mirrors", Field),
        ("http[].mirrors[].destination", Field),
        ("http[].mirrors[].percentage", Field),
        ("http[].mirrors[].percentage.value", Field),
        ("http[].mirrorPercent", Field),
        ("http[].mirrorPercentage", Field),
        ("http[].mirrorPercentage.value", Field),
    ]);
    let match_fields = ["name", "uri", "scheme", "method", "authority", "port", "gateways", "ignoreUriCase", "sourceNamespace"];
    for field in match_fields {
        t.insert(format!("http[].match[].{field}"), Field);
    }
    // String matches: the four attributes, and the values of the three maps.
    for at in ["uri", "scheme", "method", "authority", "headers.*", "queryParams.*", "withoutHeaders.*"] {
        for kind in ["exact", "prefix", "regex"] {
            t.insert(format!("http[].match[].{at}.{kind}"), Field);
        }
    }
    for field in ["fixedDelay", "percentage", "percentage.value", "percent"] {
        t.insert(format!("http[].fault.delay.{field}"), Field);
    }
    for field in ["httpStatus", "grpcStatus", "percentage", "percentage.value", "percent"] {
        t.insert(format!("http[].fault.abort.{field}"), Field);
    }
    for field in ["uri", "authority", "uriRegexRewrite.match", "uriRegexRewrite.rewrite"] {
        t.insert(format!("http[].rewrite.{field}"), Field);
    }
    for field in ["uri", "authority", "port", "scheme", "redirectCode"] {
        t.insert(format!("http[].redirect.{field}"), Field);
    }
    t.insert("http[].directResponse.status".into(), Field);
    t.insert("http[].directResponse.body.string".into(), Field);
    t.insert("http[].directResponse.body.bytes".into(), Check(body_bytes));
    // Header operations: a rule's and a route destination's.
    for at in ["http[]", "http[].route[]"] {
        t.insert(format!("{at}.headers"), Field);
        for side in ["request", "response"] {
            t.insert(format!("{at}.headers.{side}"), Field);
            t.insert(format!("{at}.headers.{side}.set"), Map);
            t.insert(format!("{at}.headers.{side}.add"), Map);
            t.insert(format!("{at}.headers.{side}.remove"), Field);
        }
    }
    for at in ["http[].mirror", "http[].mirrors[].destination"] {
        for field in ["host", "subset", "port", "port.number"] {
            t.insert(format!("{at}.{field}"), Field);
        }
    }
    for route in ["http[].route[]", "tcp[].route[]"] {
        for field in ["destination", "destination.host", "destination.subset", "destination.port", "destination.port.number"] {
            t.insert(format!("{route}.{field}"), Field);
        }
    }
    t
}

/// `directResponse.body.bytes` is sent as text: bytes that are not UTF-8 are named (invalid base64 is a
/// validation error).
fn body_bytes(value: &Value) -> Option<String> {
    let bytes = crate::validate::base64_decode(value.as_str()?)?;
    std::str::from_utf8(&bytes).is_err().then(|| {
        "binary bodies are not supported yet: bytes that are not UTF-8 text are sent with U+FFFD in their place".into()
    })
}

/// `retryOn` conditions Istio takes that the agent does not retry on are named (the others apply; unknown
/// ones are validation errors).
fn retry_on(value: &Value) -> Option<String> {
    let idle = |e: &&str| crate::validate::RETRY_ON.contains(e) && warren_api::resilience::RetryOn::parse(e).is_none();
    let idle: Vec<&str> = value.as_str()?.split(',').map(str::trim).filter(idle).collect();
    let (them, are) = if idle.len() == 1 { ("it", "is") } else { ("them", "are") };
    let reason = format!("{are} not implemented yet: the agent does not retry on {them} (it does on the others)");
    (!idle.is_empty()).then(|| format!("{} {reason}", idle.join(", ")))
}

fn destination_rule() -> Table {
    use Support::*;
    let mut t = table(&[
        ("host", Field),
        ("exportTo", Values(&["*"], EXPORT_TO)),
        ("workloadSelector", Unsupported(SELECTOR_DR)),
        ("subsets", Field),
        ("subsets[].name", Field),
        ("subsets[].labels", Map),
    ]);
    let mut policy = table(&[
        ("trafficPolicy", Field),
        ("trafficPolicy.retryBudget", Field),
        ("trafficPolicy.retryBudget.percent", Field),
        ("trafficPolicy.retryBudget.minRetryConcurrency", Field),
        ("trafficPolicy.retryBudget.budgetInterval", Field),
        ("trafficPolicy.portLevelSettings", Field),
        ("trafficPolicy.portLevelSettings[].port", Field),
        ("trafficPolicy.portLevelSettings[].port.number", Field),
        ("trafficPolicy.tunnel", Unsupported(TUNNEL)),
        ("trafficPolicy.proxyProtocol", Unsupported(PROXY_PROTOCOL)),
    ]);
    // A port's settings have the policy's parts, each replacing the policy's for the port.
    for at in ["trafficPolicy.", "trafficPolicy.portLevelSettings[]."] {
        policy.extend(load_balancer(at));
        policy.extend(connection_pool(at));
        policy.extend(outlier_detection(at));
        policy.extend(client_tls(at));
    }
    let policy: Vec<(&str, Support)> = policy.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    t.extend(nested(&["", "subsets[]."], &policy));
    t
}

/// `tls` at `at` (`trafficPolicy.`, a port's): the mesh's own mTLS is what Warren does between enrolled
/// pods anyway (HBONE).
fn client_tls(at: &str) -> Table {
    use Support::*;
    let mut t = table(&[("tls", Field), ("tls.mode", Values(&["ISTIO_MUTUAL"], CLIENT_TLS))]);
    let fields = [
        "clientCertificate", "privateKey", "caCertificates", "credentialName", "subjectAltNames", "sni",
        "insecureSkipVerify", "caCrl",
    ];
    t.extend(fields.iter().map(|f| (format!("tls.{f}"), Unsupported(CLIENT_TLS))));
    prefixed(at, t)
}

fn prefixed(at: &str, t: Table) -> Table {
    t.into_iter().map(|(path, support)| (format!("{at}{path}"), support)).collect()
}

fn load_balancer(at: &str) -> Table {
    use Support::*;
    let mut t = table(&[
        ("loadBalancer", Field),
        ("loadBalancer.simple", Field),
        ("loadBalancer.consistentHash", Field),
        ("loadBalancer.consistentHash.httpCookie", Field),
        ("loadBalancer.consistentHash.httpCookie.attributes", Unsupported(COOKIE_ATTRIBUTES)),
        ("loadBalancer.consistentHash.ringHash", Field),
        ("loadBalancer.consistentHash.ringHash.minimumRingSize", Field),
        ("loadBalancer.consistentHash.maglev", Field),
        ("loadBalancer.consistentHash.maglev.tableSize", Field),
        ("loadBalancer.localityLbSetting", Field),
        ("loadBalancer.localityLbSetting.distribute[].to", Map),
        ("loadBalancer.zoneAwareLbSetting", Unsupported(ZONE_AWARE)),
        ("loadBalancer.warmupDurationSecs", Field),
        ("loadBalancer.warmup", Unsupported(WARMUP)),
    ]);
    let hash = [
        "httpHeaderName", "useSourceIp", "httpQueryParameterName", "minimumRingSize", "httpCookie.name", "httpCookie.path",
        "httpCookie.ttl",
    ];
    t.extend(hash.iter().map(|f| (format!("loadBalancer.consistentHash.{f}"), Field)));
    let locality =
        ["enabled", "distribute", "distribute[].from", "failover", "failover[].from", "failover[].to", "failoverPriority"];
    t.extend(locality.iter().map(|f| (format!("loadBalancer.localityLbSetting.{f}"), Field)));
    prefixed(at, t)
}

fn connection_pool(at: &str) -> Table {
    use Support::*;
    let mut t = table(&[
        ("connectionPool", Field),
        ("connectionPool.tcp", Field),
        ("connectionPool.tcp.idleTimeout", Unsupported(TCP_IDLE_TIMEOUT)),
        ("connectionPool.http", Field),
        ("connectionPool.http.maxConcurrentStreams", Unsupported(MAX_CONCURRENT_STREAMS)),
        ("connectionPool.http.http2KeepAlive", Unsupported(HTTP2_KEEPALIVE)),
    ]);
    let tcp = [
        "maxConnections", "connectTimeout", "tcpKeepalive", "tcpKeepalive.probes", "tcpKeepalive.time", "tcpKeepalive.interval",
        "maxConnectionDuration",
    ];
    t.extend(tcp.iter().map(|f| (format!("connectionPool.tcp.{f}"), Field)));
    let http = [
        "http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection", "maxRetries", "idleTimeout",
        "h2UpgradePolicy", "useClientProtocol",
    ];
    t.extend(http.iter().map(|f| (format!("connectionPool.http.{f}"), Field)));
    prefixed(at, t)
}

fn outlier_detection(at: &str) -> Table {
    use Support::*;
    let mut t = table(&[
        ("outlierDetection", Field),
        ("outlierDetection.consecutiveErrors", Unsupported(CONSECUTIVE_ERRORS)),
        ("outlierDetection.outlierDetectionHttpErrorCodes", Unsupported(ERROR_CODES)),
    ]);
    let fields = [
        "splitExternalLocalOriginErrors", "consecutiveLocalOriginFailures", "consecutiveGatewayErrors", "consecutive5xxErrors",
        "interval", "baseEjectionTime", "maxEjectionPercent", "minHealthPercent",
    ];
    t.extend(fields.iter().map(|f| (format!("outlierDetection.{f}"), Field)));
    prefixed(at, t)
}

fn gateway() -> Table {
    use Support::*;
    table(&[
        ("selector", Map),
        ("servers", Field),
        ("servers[].port", Field),
        ("servers[].port.number", Field),
        ("servers[].port.name", Field),
        ("servers[].port.protocol", Values(&["HTTP", "HTTPS", "HTTP2", "GRPC", "TLS"], "is not served (HTTP, HTTPS, HTTP2, GRPC, and TLS with PASSTHROUGH are): connections to this server are refused")),
        ("servers[].port.targetPort", Unsupported("is deprecated and not implemented: the gateway listens on the port and the target ports of its Services")),
        ("servers[].bind", Unsupported(BIND)),
        ("servers[].hosts", Field),
        ("servers[].tls", Field),
        ("servers[].tls.mode", Values(&["SIMPLE", "MUTUAL", "PASSTHROUGH"], "is not implemented: fail closed — connections to this server are refused")),
        ("servers[].tls.httpsRedirect", Field),
        ("servers[].tls.credentialName", Field),
        ("servers[].tls.credentialNames", Unsupported(GATEWAY_TLS_FILES)),
        ("servers[].tls.tlsCertificates", Unsupported(GATEWAY_TLS_FILES)),
        ("servers[].tls.serverCertificate", Unsupported(GATEWAY_TLS_FILES)),
        ("servers[].tls.privateKey", Unsupported(GATEWAY_TLS_FILES)),
        ("servers[].tls.caCertificates", Unsupported(GATEWAY_TLS_FILES)),
        ("servers[].tls.caCrl", Unsupported(GATEWAY_PINNING)),
        ("servers[].tls.subjectAltNames", Unsupported(GATEWAY_PINNING)),
        ("servers[].tls.verifyCertificateSpki", Unsupported(GATEWAY_PINNING)),
        ("servers[].tls.verifyCertificateHash", Unsupported(GATEWAY_PINNING)),
        ("servers[].tls.minProtocolVersion", Values(&["TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3"], "is not a TLS version")),
        ("servers[].tls.maxProtocolVersion", Values(&["TLS_AUTO", "TLSV1_2", "TLSV1_3"], "below TLSV1_2 cannot be served: fail closed — connections are refused")),
        ("servers[].tls.cipherSuites", Unsupported(CIPHER_SUITES)),
        ("servers[].defaultEndpoint", Unsupported("is for sidecars only (as in Istio): ignored")),
        ("servers[].name", Field),
    ])
}

fn service_entry() -> Table {
    use Support::*;
    table(&[
        ("hosts", Field),
        ("addresses", Field),
        ("ports", Field),
        ("ports[].number", Field),
        ("ports[].protocol", Field),
        ("ports[].name", Field),
        ("ports[].targetPort", Field),
        ("location", Values(&["MESH_EXTERNAL"], "MESH_INTERNAL is not implemented: endpoints are reached in plaintext, without identities")),
        ("resolution", Field),
        ("endpoints", Field),
        ("endpoints[].address", Field),
        ("endpoints[].labels", Map),
        ("endpoints[].ports", Unsupported(SE_ENDPOINT)),
        ("endpoints[].network", Unsupported(SE_ENDPOINT)),
        ("endpoints[].locality", Unsupported(SE_ENDPOINT)),
        ("endpoints[].weight", Unsupported(SE_ENDPOINT)),
        ("endpoints[].serviceAccount", Unsupported(SE_ENDPOINT)),
        ("workloadSelector", Unsupported("is not implemented: only the listed endpoints serve this ServiceEntry")),
        ("exportTo", Values(&["*"], EXPORT_TO)),
        ("subjectAltNames", Unsupported(CLIENT_TLS)),
    ])
}

fn action(value: &Value) -> Option<String> {
    match value.as_str() {
        Some("ALLOW" | "DENY") => None,
        Some("CUSTOM") => Some(
            "CUSTOM (external authorization) is not supported: fail closed — its rules deny what they match".into(),
        ),
        _ => None, // not an action at all: a validation error
    }
}

/// A `when` key the agent evaluates, or the fail-closed notice for one it does not.
fn condition_key(value: &Value, closed: &str) -> Option<String> {
    let key = value.as_str()?;
    let request_header = key.starts_with("request.headers[") && key.ends_with(']') && key.len() > "request.headers[]".len();
    (!crate::compile::policy::CONDITION_KEYS.contains(&key) && !request_header).then(|| format!("{key:?} {closed}"))
}

fn condition_key_allow(value: &Value) -> Option<String> {
    condition_key(value, ALLOW_CLOSED)
}

fn condition_key_deny(value: &Value) -> Option<String> {
    condition_key(value, DENY_CLOSED)
}

/// How an AuthorizationPolicy is enforced depends on its action (see [`crate::compile`]): what an ALLOW
/// rule cannot check makes it match nothing; a DENY rule is applied without it.
fn authorization_policy(policy_action: &str) -> Table {
    use Support::*;
    let closed = Unsupported(if policy_action == "ALLOW" { ALLOW_CLOSED } else { DENY_CLOSED });
    // AUDIT never blocks: its rules change nothing and need no notice each.
    let rule_field = || if policy_action == "AUDIT" { Field } else { closed };
    let mut t = table(&[
        ("selector", Field),
        ("selector.matchLabels", Map),
        ("targetRef", Unsupported(TARGET_REF)),
        ("targetRefs", Unsupported(TARGET_REF)),
        ("action", Check(action)),
        ("provider", Unsupported("is only for CUSTOM policies, which Warren does not support")),
        ("rules", Field),
        ("rules[].from", Field),
        ("rules[].from[].source", Field),
        ("rules[].to", Field),
        ("rules[].to[].operation", Field),
        ("rules[].to[].operation.ports", Field),
        ("rules[].to[].operation.notPorts", Field),
        ("rules[].when", Field),
        ("rules[].when[].key", match policy_action {
            "AUDIT" => Field,
            "ALLOW" => Check(condition_key_allow),
            _ => Check(condition_key_deny),
        }),
        ("rules[].when[].values", Field),
        ("rules[].when[].notValues", Field),
    ]);
    // What the agent checks on a connection, and per request on HTTP ports (see compile::policy); JWT
    // principals need a proxy that validates tokens.
    for field in ["principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"] {
        t.insert(format!("rules[].from[].source.{field}"), Field);
    }
    for field in ["requestPrincipals", "notRequestPrincipals"] {
        t.insert(format!("rules[].from[].source.{field}"), rule_field());
    }
    for field in ["hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"] {
        t.insert(format!("rules[].to[].operation.{field}"), Field);
    }
    t
}

fn peer_authentication() -> Table {
    use Support::*;
    table(&[
        ("selector", Field),
        ("selector.matchLabels", Map),
        ("mtls", Field),
        ("mtls.mode", Field),
        ("portLevelMtls", MapOf),
        ("portLevelMtls.*.mode", Field),
    ])
}

/// The field table of `kind` (AuthorizationPolicy: for `action`).
pub fn fields_of(kind: &str, action: &str) -> Option<&'static Table> {
    static TABLES: OnceLock<HashMap<&'static str, Table>> = OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        HashMap::from([
            ("VirtualService", virtual_service()),
            ("DestinationRule", destination_rule()),
            ("Gateway", gateway()),
            ("ServiceEntry", service_entry()),
            ("PeerAuthentication", peer_authentication()),
            ("AuthorizationPolicy/ALLOW", authorization_policy("ALLOW")),
            ("AuthorizationPolicy/DENY", authorization_policy("DENY")),
            ("AuthorizationPolicy/AUDIT", authorization_policy("AUDIT")),
            ("AuthorizationPolicy/CUSTOM", authorization_policy("CUSTOM")),
        ])
    });
    match kind {
        "AuthorizationPolicy" => {
            let action = if matches!(action, "DENY" | "AUDIT" | "CUSTOM") { action } else { "ALLOW" };
            tables.get(format!("AuthorizationPolicy/{action}").as_str())
        }
        _ => tables.get(kind),
    }
}

/// Every field of `spec` (an object of `kind`, as JSON) that is set but not honoured, and every field Istio
/// does not define, with the reason; fields are named from the object (`spec.http[0].match`).
pub fn review(kind: &str, spec: &Value) -> Vec<FieldError> {
    let action = spec.get("action").and_then(Value::as_str).unwrap_or("ALLOW");
    let Some(table) = fields_of(kind, action) else { return Vec::new() };
    let mut walk = Walk { kind, table, found: Vec::new() };
    walk.object(spec, "", "spec");
    walk.found
}

struct Walk<'a> {
    kind: &'a str,
    table: &'a Table,
    found: Vec<FieldError>,
}

impl Walk<'_> {
    fn report(&mut self, field: &str, reason: impl Into<String>) {
        self.found.push(FieldError { field: field.to_string(), reason: reason.into() });
    }

    /// The fields of an object at `pattern` (table path) / `path` (the user's path).
    fn object(&mut self, value: &Value, pattern: &str, path: &str) {
        let Value::Object(fields) = value else { return };
        for (key, child) in fields {
            let child_pattern = if pattern.is_empty() { key.clone() } else { format!("{pattern}.{key}") };
            let child_path = format!("{path}.{key}");
            match self.table.get(&child_pattern) {
                Some(support) => self.visit(child, *support, &child_pattern, &child_path),
                None => self.report(
                    &child_path,
                    format!("{key:?} is not a field of Istio's {} API: it is kept, and has no effect", self.kind),
                ),
            }
        }
    }

    fn visit(&mut self, value: &Value, support: Support, pattern: &str, path: &str) {
        if let Value::Array(items) = value
            && !matches!(support, Support::Unsupported(_))
        {
            let item_pattern = format!("{pattern}[]");
            for (i, item) in items.iter().enumerate() {
                self.visit(item, support, &item_pattern, &format!("{path}[{i}]"));
            }
            return;
        }
        match support {
            Support::Field => self.object(value, pattern, path),
            Support::Map => {}
            Support::MapOf => {
                if let Value::Object(entries) = value {
                    for (key, entry) in entries {
                        self.object(entry, &format!("{pattern}.*"), &format!("{path}.{key}"));
                    }
                }
            }
            Support::Values(allowed, reason) => {
                if !value.as_str().is_some_and(|v| allowed.contains(&v)) {
                    self.report(path, format!("{value}: {reason}"));
                }
            }
            Support::Check(check) => {
                if let Some(reason) = check(value) {
                    self.report(path, reason);
                }
            }
            Support::Unsupported(reason) => self.report(path, reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every field path the API type defines, in the tables' notation (`http[].match`, `portLevelMtls.*`).
    fn schema_paths(schema: &Value) -> BTreeSet<String> {
        fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
            match node.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/$defs/")) {
                Some(name) => &root["$defs"][name],
                None => node,
            }
        }
        fn walk(root: &Value, node: &Value, prefix: &str, out: &mut BTreeSet<String>) {
            let node = resolve(root, node);
            for alternative in ["anyOf", "oneOf", "allOf"] {
                for option in node.get(alternative).and_then(Value::as_array).into_iter().flatten() {
                    walk(root, option, prefix, out);
                }
            }
            if let Some(properties) = node.get("properties").and_then(Value::as_object) {
                for (key, child) in properties {
                    let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                    out.insert(path.clone());
                    walk(root, child, &path, out);
                }
            } else if let Some(values) = node.get("additionalProperties").filter(|v| v.is_object()) {
                walk(root, values, &format!("{prefix}.*"), out);
            }
            if let Some(items) = node.get("items") {
                walk(root, items, &format!("{prefix}[]"), out);
            }
        }
        let mut out = BTreeSet::new();
        walk(schema, schema, "", &mut out);
        out
    }

    /// A path is classified when it has an entry, or lies below one that is not walked further.
    fn classified(table: &Table, path: &str) -> bool {
        if table.contains_key(path) {
            return true;
        }
        let mut prefix = path;
        while let Some(cut) = prefix.rfind(['.', '[']) {
            prefix = &prefix[..cut];
            if let Some(support) = table.get(prefix) {
                return !matches!(support, Support::Field);
            }
        }
        false
    }

    fn check_kind(kind: &str, action: &str, schema: schemars::Schema) {
        let table = fields_of(kind, action).unwrap();
        let paths = schema_paths(&serde_json::to_value(schema).unwrap());
        let missing: Vec<&String> = paths.iter().filter(|p| !classified(table, p)).collect();
        assert!(missing.is_empty(), "{kind}: fields with no support entry: {missing:?}");
        let stale: Vec<&String> =
            table.keys().filter(|k| !paths.contains(*k) && !k.contains("*")).collect::<Vec<_>>();
        assert!(stale.is_empty(), "{kind}: entries for fields the type does not have: {stale:?}");
    }

    #[test]
    fn every_field_of_every_kind_is_honoured_or_reported() {
        use crate::istio::*;
        check_kind("VirtualService", "", schemars::schema_for!(VirtualServiceSpec));
        check_kind("DestinationRule", "", schemars::schema_for!(DestinationRuleSpec));
        check_kind("Gateway", "", schemars::schema_for!(GatewaySpec));
        check_kind("ServiceEntry", "", schemars::schema_for!(ServiceEntrySpec));
        for action in ["ALLOW", "DENY", "AUDIT", "CUSTOM"] {
            check_kind("AuthorizationPolicy", action, schemars::schema_for!(AuthorizationPolicySpec));
        }
        check_kind("PeerAuthentication", "", schemars::schema_for!(crate::workloads::peer_authentication::Spec));
    }

    #[test]
    fn the_check_can_fail() {
        // Control: a table without an entry for a typed field is caught.
        let mut table = virtual_service();
        table.remove("http[].timeout");
        let paths = schema_paths(&serde_json::to_value(schemars::schema_for!(crate::istio::VirtualServiceSpec)).unwrap());
        assert!(paths.iter().any(|p| !classified(&table, p)));
    }

    fn reviewed(kind: &str, yaml: &str) -> Vec<String> {
        let spec: Value = serde_yaml::from_str(yaml).unwrap();
        review(kind, &spec).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn fields_that_change_behaviour_are_named() {
        let found = reviewed(
            "VirtualService",
            "hosts: [r]\nhttp:\n- match: [{queryParams: {v: {exact: '1'}}, statPrefix: x}]\n  route: [{destination: {host: r}}]\n  mirror: {host: m}\n\
             \x20 retries: {attempts: 3, retryOn: '5xx,envoy-ratelimited'}\n  corsPolicy: {allowOrigins: [{exact: x}]}\n\
             - route: [{destination: {host: r, subsetz: v1}}]\ntcp: [{match: [{sourceLabels: {app: a}}], route: [{destination: {host: r}}]}]\n",
        );
        let fields: Vec<&str> = found.iter().map(|f| f.split(": ").next().unwrap()).collect();
        assert_eq!(fields, [
            "spec.http[0].corsPolicy",
            "spec.http[0].match[0].statPrefix",
            "spec.http[0].retries.retryOn",
            "spec.http[1].route[0].destination.subsetz",
            "spec.tcp[0].match[0].sourceLabels",
        ], "{found:#?}");
        assert_eq!(found[2], "spec.http[0].retries.retryOn: envoy-ratelimited is not implemented yet: the agent does not retry on it (it does on the others)");
        assert!(found[3].starts_with("spec.http[1].route[0].destination.subsetz: \"subsetz\" is not a field"), "{found:#?}");
        assert!(found[4].starts_with("spec.tcp[0].match[0].sourceLabels: is not evaluated"), "{found:#?}");
        let l7 = reviewed(
            "VirtualService",
            "hosts: [r]\nhttp:\n- redirect: {uri: /x, derivePort: FROM_REQUEST_PORT}\n\
             - directResponse: {status: 200, body: {bytes: /w==}}\n\
             - fault: {delay: {exponentialDelay: 1s}, abort: {http2Error: x}}\n  route: [{destination: {host: r}}]\n",
        );
        let fields: Vec<&str> = l7.iter().map(|f| f.split(": ").next().unwrap()).collect();
        assert_eq!(fields, [
            "spec.http[0].redirect.derivePort",
            "spec.http[1].directResponse.body.bytes",
            "spec.http[2].fault.abort.http2Error",
            "spec.http[2].fault.delay.exponentialDelay",
        ], "{l7:#?}");
        assert!(l7[1].contains("binary bodies are not supported yet"), "{l7:#?}");
        let dr = reviewed(
            "DestinationRule",
            "host: r\ntrafficPolicy:\n  connectionPool: {tcp: {maxConnections: 1, idleTimeout: 1h}, http: {maxConcurrentStreams: 5}}\n  \
             portLevelSettings: [{port: {number: 80}, loadBalancer: {warmup: {duration: 1s}}, tls: {mode: SIMPLE}}]\n  tunnel: {targetHost: x, targetPort: 1}\n\
             subsets: [{name: v1, labels: {version: v1}, trafficPolicy: {outlierDetection: {consecutiveErrors: 1, interval: 1s}, \
             loadBalancer: {consistentHash: {httpCookie: {name: c, attributes: [{name: Secure}]}}}}}]",
        );
        assert_eq!(dr, [
            "spec.subsets[0].trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes: is not implemented yet: an issued cookie carries only its Path and Max-Age",
            "spec.subsets[0].trafficPolicy.outlierDetection.consecutiveErrors: is deprecated and not implemented: use consecutiveGatewayErrors or consecutive5xxErrors",
            "spec.trafficPolicy.connectionPool.http.maxConcurrentStreams: is not implemented yet: streams per upstream HTTP/2 connection are not limited",
            "spec.trafficPolicy.connectionPool.tcp.idleTimeout: is not implemented yet: connections are not closed for being idle (http.idleTimeout works for HTTP)",
            "spec.trafficPolicy.portLevelSettings[0].loadBalancer.warmup: (the newer form) is not implemented yet: new endpoints get their full share at once; warmupDurationSecs works",
            "spec.trafficPolicy.portLevelSettings[0].tls.mode: \"SIMPLE\": is not implemented: the agent uses HBONE mTLS to enrolled destinations and plaintext to others",
            "spec.trafficPolicy.tunnel: is not implemented: connections to the destination are not tunneled",
        ], "{dr:#?}");
        // Control: every resilience field the agent acts on, at the top, in a subset and at a port.
        let parts = "loadBalancer: {consistentHash: {httpCookie: {name: u, path: /, ttl: 0s}, ringHash: {minimumRingSize: 2048}}, \
            localityLbSetting: {enabled: true, failover: [{from: us, to: eu}], failoverPriority: [app]}, warmupDurationSecs: 30s}, \
            connectionPool: {tcp: {maxConnections: 1, connectTimeout: 1s, tcpKeepalive: {probes: 3, time: 1s, interval: 1s}, maxConnectionDuration: 1h}, \
            http: {http1MaxPendingRequests: 1, http2MaxRequests: 1, maxRequestsPerConnection: 1, maxRetries: 1, idleTimeout: 1s, \
            h2UpgradePolicy: UPGRADE, useClientProtocol: false}}, \
            outlierDetection: {splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 1, consecutiveGatewayErrors: 1, \
            consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 1s, maxEjectionPercent: 1, minHealthPercent: 1}";
        let policy = format!(
            "{{{parts}, retryBudget: {{percent: 20, minRetryConcurrency: 3, budgetInterval: 1s}}, \
             portLevelSettings: [{{port: {{number: 80}}, {parts}, tls: {{mode: ISTIO_MUTUAL}}}}]}}"
        );
        let honoured = format!("host: r\ntrafficPolicy: {policy}\nsubsets: [{{name: v1, trafficPolicy: {policy}}}]");
        assert_eq!(reviewed("DestinationRule", &honoured), Vec::<String>::new());
        let hashes = "host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x, minimumRingSize: 8, maglev: {tableSize: 7}}}}\n\
            subsets: [{name: a, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST, localityLbSetting: {distribute: [{from: 'a/*', to: {'b/*': 100}}]}}}}]";
        assert_eq!(reviewed("DestinationRule", hashes), Vec::<String>::new());
        let sources = "hosts: [r]\nhttp: [{route: [{destination: {host: r}}], retries: {attempts: 3, perTryTimeout: 1s, retryOn: '5xx,503', \
            retryRemoteLocalities: true, retryIgnorePreviousHosts: false, backoff: 1s}}]";
        assert_eq!(reviewed("VirtualService", sources), Vec::<String>::new());
        // Control: what Warren honours produces nothing.
        assert_eq!(reviewed("VirtualService", "hosts: [r]\ngateways: [mesh]\nhttp: [{route: [{destination: {host: r, subset: v1}, weight: 3}]}]"), Vec::<String>::new());
        let honoured = "hosts: [r]\nhttp:\n\
            - match: [{uri: {prefix: /a}, scheme: {exact: http}, method: {exact: GET}, authority: {regex: 'r.*'}, \
              headers: {x: {exact: y}}, queryParams: {q: {prefix: p}}, ignoreUriCase: true, withoutHeaders: {z: {regex: '*'}}, \
              port: 80, sourceLabels: {app: a}, sourceNamespace: shop, gateways: [mesh], name: m}]\n  \
              headers: {request: {set: {x-a: b}, add: {x-b: c}, remove: [x-c]}, response: {set: {x-d: e}}}\n  \
              rewrite: {uri: /b, authority: r2}\n  timeout: 1s\n  \
              fault: {delay: {fixedDelay: 1s, percentage: {value: 5}}, abort: {grpcStatus: UNAVAILABLE, percent: 5}}\n  \
              mirror: {host: m, subset: v1, port: {number: 80}}\n  mirrorPercentage: {value: 5}\n  mirrorPercent: 5\n  \
              route: [{destination: {host: r}, headers: {request: {remove: [x-e]}}}]\n\
            - rewrite: {uriRegexRewrite: {match: '^/a', rewrite: /b}}\n  \
              mirrors: [{destination: {host: m}, percentage: {value: 50}}]\n  route: [{destination: {host: r}}]\n\
            - redirect: {uri: /x, authority: a, port: 8080, scheme: https, redirectCode: 302}\n\
            - directResponse: {status: 200, body: {string: ok}}\n\
            - directResponse: {status: 200, body: {bytes: b2s=}}\n";
        assert_eq!(reviewed("VirtualService", honoured), Vec::<String>::new(), "every L7 field the agent applies");
    }

    #[test]
    fn security_fields_say_they_fail_closed() {
        let allow = reviewed("AuthorizationPolicy", "rules: [{from: [{source: {requestPrincipals: ['*']}}]}]");
        assert_eq!(allow, ["spec.rules[0].from[0].source.requestPrincipals: is not enforced yet: fail closed — an ALLOW rule that uses it matches nothing"]);
        let request = reviewed("AuthorizationPolicy", "action: ALLOW\nrules: [{from: [{source: {notRemoteIpBlocks: [10.0.0.0/8]}}], to: [{operation: {notPaths: [/x], notHosts: [h], notMethods: [GET]}}]}]");
        assert_eq!(request, Vec::<String>::new(), "request attributes are enforced per request: {request:#?}");
        let when = reviewed("AuthorizationPolicy", "rules: [{when: [{key: 'request.headers[x]', values: [y]}, {key: 'request.auth.claims[iss]', values: [y]}]}]");
        assert_eq!(when, ["spec.rules[0].when[1].key: \"request.auth.claims[iss]\" is not enforced yet: fail closed — an ALLOW rule that uses it matches nothing"]);
        let deny = reviewed("AuthorizationPolicy", "action: DENY\nrules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]");
        assert_eq!(deny, ["spec.rules[0].from[0].source.notRequestPrincipals: is not enforced yet: fail closed — this DENY rule applies without it (denies more, never less)"]);
        assert_eq!(reviewed("PeerAuthentication", "selector: {matchLabels: {app: a}}\nportLevelMtls: {'80': {mode: DISABLE, mod: x}}"),
            ["spec.portLevelMtls.80.mod: \"mod\" is not a field of Istio's PeerAuthentication API: it is kept, and has no effect"]);
    }
}
