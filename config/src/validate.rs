//! Per-object validation, as Istio's webhook validates (the v1.20 API server has no CEL): each problem
//! names the field (a JSON path below the object) and the value. An object with problems is not compiled,
//! and its last valid version stays in force. Fields Warren does not act on are [`crate::support`]'s
//! business; values are checked here whether or not Warren acts on them yet.
mod resilience;

use std::{net::IpAddr, time::Duration};

pub use resilience::{RETRY_ON, is_retry_condition, status_code};

use crate::{
    istio::{
        AuthorizationPolicySpec, ClientTls, DestinationRuleSpec, FaultAbort, FaultDelay, GatewayServer, GatewaySpec,
        Headers, HttpDirectResponse, HttpRedirect, HttpRewrite, HttpRoute, Percent, RuleSource, ServiceEntrySpec,
        StringMatch, VirtualServiceSpec,
    },
    workloads::peer_authentication::Spec as PeerAuthenticationSpec,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// e.g. `spec.http[0].route[1].weight`.
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), reason: reason.into() });
    }
}

/// protobuf's Duration limit (10,000 years), which Istio's durations share.
const MAX_DURATION_SECS: u64 = 315_576_000_000;

/// Parses a duration as Istio accepts it: decimal numbers with units h, m, s, ms, us, ns ("1.5s", "300ms",
/// "1m30s"), at most protobuf's limit. Exact (integer nanoseconds) and never panics.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (e.g. 1.5s, 300ms)");
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total_ns: u128 = 0;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let (number, after) = rest.split_at(number_end);
        let unit_end = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let unit_ns: u128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" => 1_000,
            "ns" => 1,
            _ => return Err(bad()),
        };
        total_ns = total_ns.saturating_add(decimal_times(number, unit_ns).ok_or_else(bad)?);
        rest = after;
    }
    if total_ns > u128::from(MAX_DURATION_SECS) * 1_000_000_000 {
        return Err(format!("{text:?} exceeds the longest duration ({MAX_DURATION_SECS}s)"));
    }
    let secs = (total_ns / 1_000_000_000) as u64; // bounded by MAX_DURATION_SECS above
    Ok(Duration::new(secs, (total_ns % 1_000_000_000) as u32))
}

/// `number` ("1", "1.5", ".5") times `unit`, saturating; `None` when it is not a decimal number.
fn decimal_times(number: &str, unit: u128) -> Option<u128> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return None;
    }
    let mut total: u128 = 0;
    for digit in whole.bytes() {
        total = total.saturating_mul(10).saturating_add(u128::from(digit - b'0'));
    }
    total = total.saturating_mul(unit);
    let mut scale = unit;
    for digit in fraction.bytes() {
        scale /= 10;
        total = total.saturating_add(u128::from(digit - b'0') * scale);
    }
    Some(total)
}

pub fn duration_ms(text: &str) -> Option<u64> {
    parse_duration(text).ok().map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The percentage a fault applies to: `percentage.value`, else the legacy integer `percent`, else 100.
pub fn fault_percent(percentage: &Option<Percent>, percent: Option<i64>) -> f64 {
    percentage.as_ref().map(|p| p.value).or(percent.map(|p| p as f64)).unwrap_or(100.0)
}

/// gRPC's status names, by code (as Istio's `grpcStatus` takes them).
pub const GRPC_STATUS: [&str; 17] = [
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
];

/// A gRPC status name → its code (`UNAVAILABLE` → 14).
pub fn grpc_code(name: &str) -> Option<u32> {
    GRPC_STATUS.iter().position(|n| *n == name).map(|code| code as u32)
}

/// Protobuf JSON's `bytes`: base64 in the standard or the URL-safe alphabet, with or without padding.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let data = text.trim_end_matches('=');
    if text.len() - data.len() > 2 || data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / 4 * 3 + 2);
    let (mut acc, mut bits) = (0u32, 0u32);
    for byte in data.bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// A host as Istio's `hosts` fields take it: a DNS name whose first label may start with a wildcard (`*`,
/// `*.example.com`, `*example.com`), or an IP address.
fn check_host(errors: &mut Errors, field: String, host: &str) {
    if host.is_empty() {
        return errors.add(field, "must not be empty");
    }
    if host == "*" || host.parse::<IpAddr>().is_ok() {
        return;
    }
    let name = host.strip_prefix('*').unwrap_or(host);
    let name = name.strip_prefix('.').unwrap_or(name);
    let name = name.strip_suffix('.').unwrap_or(name);
    if host.len() > 255 || !name.split('.').all(is_dns_label) {
        errors.add(field, format!("{host:?} is not a host name (a DNS name, optionally starting with \"*\")"));
    }
}

/// A namespace name (DNS-1123 label) as exportTo and gateway references use.
fn check_namespace(errors: &mut Errors, field: String, namespace: &str) {
    if !is_dns_label(namespace) || namespace.bytes().any(|b| b.is_ascii_uppercase()) {
        errors.add(field, format!("{namespace:?} is not a namespace name"));
    }
}

fn check_export_to(errors: &mut Errors, export_to: &[String]) {
    for (i, to) in export_to.iter().enumerate() {
        if to != "*" && to != "." {
            check_namespace(errors, format!("spec.exportTo[{i}]"), to);
        }
    }
    if export_to.len() > 1 && export_to.iter().any(|t| t == "*") {
        errors.add("spec.exportTo", "\"*\" cannot be combined with other namespaces");
    }
}

/// Istio's weights are relative (`weight / sum`): none negative, and with several destinations not all zero.
fn check_weights(errors: &mut Errors, field: &str, weights: &[Option<i64>]) {
    for (i, weight) in weights.iter().enumerate() {
        match weight {
            Some(w) if *w < 0 => errors.add(format!("{field}[{i}].weight"), format!("{w} is negative")),
            Some(w) if *w > i64::from(i32::MAX) => {
                errors.add(format!("{field}[{i}].weight"), format!("{w} exceeds the largest weight ({})", i32::MAX))
            }
            _ => {}
        }
    }
    if weights.len() > 1 && weights.iter().all(|w| w.unwrap_or(0) == 0) {
        errors.add(field, "the weights of several destinations are all 0 (total destination weight = 0)");
    }
}

fn check_percent(errors: &mut Errors, field: String, percentage: &Option<Percent>, percent: Option<i64>) {
    let value = fault_percent(percentage, percent);
    if !(0.0..=100.0).contains(&value) {
        errors.add(field, format!("{value} is not a percentage between 0 and 100"));
    }
}

fn check_duration(errors: &mut Errors, field: String, value: &Option<String>) {
    if let Some(text) = value
        && let Err(reason) = parse_duration(text)
    {
        errors.add(field, reason);
    }
}

fn check_port(errors: &mut Errors, field: String, port: u32) {
    if !(1..=65535).contains(&port) {
        errors.add(field, format!("{port} is not a port (1-65535)"));
    }
}

fn check_destination(errors: &mut Errors, field: &str, destination: &crate::istio::Destination) {
    check_host(errors, format!("{field}.host"), &destination.host);
    if destination.host.contains('*') {
        errors.add(format!("{field}.host"), format!("{:?}: a destination host cannot be a wildcard", destination.host));
    }
    if let Some(port) = &destination.port {
        check_port(errors, format!("{field}.port.number"), port.number);
    }
    if let Some(subset) = &destination.subset
        && !is_dns_label(subset)
    {
        errors.add(format!("{field}.subset"), format!("{subset:?} is not a subset name"));
    }
}

/// Istio's limit on a regex (Envoy's RE2 program size, approximated by the length).
const MAX_REGEX_BYTES: usize = 1024;

/// A regex as Istio takes it: RE2 syntax (which the `regex` crate implements), at most 1024 bytes.
fn check_regex(errors: &mut Errors, field: String, regex: &str) {
    if regex.len() > MAX_REGEX_BYTES {
        return errors.add(field, format!("a regex of {} bytes is longer than {MAX_REGEX_BYTES}", regex.len()));
    }
    if let Err(e) = regex::Regex::new(regex) {
        // The parser's message draws the pattern over several lines; its last line says what is wrong.
        let text = e.to_string();
        let why = text.lines().last().unwrap_or_default().trim();
        let why = why.strip_prefix("error: ").unwrap_or(why);
        errors.add(field, format!("{regex:?} is not a valid regex: {why} (Istio takes RE2 syntax)"));
    }
}

/// `empty_prefix`: whether an empty `prefix` matches (it does for `uri`, not for the other attributes).
fn check_string_match(errors: &mut Errors, field: String, s: &StringMatch, empty_prefix: bool) {
    let set = [&s.exact, &s.prefix, &s.regex].iter().filter(|v| v.is_some()).count();
    if set > 1 {
        errors.add(field.clone(), "only one of exact, prefix, regex may be set");
    }
    if !empty_prefix && s.prefix.as_deref() == Some("") {
        errors.add(format!("{field}.prefix"), "an empty prefix is not a match");
    }
    match s.regex.as_deref() {
        Some("") => errors.add(format!("{field}.regex"), "an empty regex is not a match"),
        Some(regex) => check_regex(errors, format!("{field}.regex"), regex),
        None => {}
    }
}

/// RFC 7230's token characters, which header names are made of.
fn is_header_token(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A header a match reads: a header name, an HTTP/2 pseudo-header, or a JWT claim
/// (`@request.auth.claims.<name>`, `@request.auth.claims[<name>]`).
fn check_match_header(errors: &mut Errors, field: String, name: &str) {
    const PSEUDO: [&str; 5] = [":method", ":scheme", ":authority", ":path", ":status"];
    let claim = name.strip_prefix("@request.auth.claims").is_some_and(|rest| {
        rest.strip_prefix('.').is_some_and(|c| !c.is_empty())
            || rest.strip_prefix('[').and_then(|c| c.strip_suffix(']')).is_some_and(|c| !c.is_empty())
    });
    if !(claim || PSEUDO.contains(&name) || is_header_token(name)) {
        errors.add(field, format!("{name:?} is not a header name"));
    }
}

/// `headers` of a rule or route destination, by Istio's rules: request `set`/`add` may name the authority
/// (`host`, `:authority`), nothing else may name `host` or a pseudo-header; values hold no control characters.
fn check_header_operations(errors: &mut Errors, at: &str, headers: &Headers) {
    let sides = [("request", &headers.request), ("response", &headers.response)];
    for (side, ops) in sides.iter().filter_map(|(side, ops)| Some((*side, ops.as_ref()?))) {
        let authority_allowed = side == "request";
        for (op, entries) in [("set", &ops.set), ("add", &ops.add)] {
            for (name, value) in entries {
                let field = format!("{at}.headers.{side}.{op}.{name}");
                check_operation_header(errors, field.clone(), name, authority_allowed);
                if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                    errors.add(field, format!("{value:?}: a header value cannot hold control characters"));
                }
            }
        }
        for (i, name) in ops.remove.iter().enumerate() {
            check_operation_header(errors, format!("{at}.headers.{side}.remove[{i}]"), name, false);
        }
    }
}

fn check_operation_header(errors: &mut Errors, field: String, name: &str, authority_allowed: bool) {
    let authority = name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case(":authority");
    if name.is_empty() {
        errors.add(field, "a header name cannot be empty");
    } else if authority && !authority_allowed {
        errors.add(field, format!("{name:?}: the Host header can only be set or added on requests"));
    } else if name.starts_with(':') && !(authority && authority_allowed) {
        errors.add(field, format!("{name:?}: a pseudo-header (\":\" prefix) cannot be changed"));
    } else if !name.starts_with(':') && !is_header_token(name) {
        errors.add(field, format!("{name:?} is not a header name"));
    }
}

/// The authority is rewritten in one place only: `rewrite.authority` or a `host`/`:authority` request header.
fn check_authority_rewrite(errors: &mut Errors, at: &str, route: &HttpRoute) {
    let request = route.headers.as_ref().and_then(|h| h.request.as_ref());
    let headers = request.into_iter().flat_map(|r| r.set.iter().chain(r.add.iter()));
    let mut sources: Vec<&str> = route.rewrite.iter().filter_map(|r| r.authority.as_deref()).collect();
    let is_authority = |name: &str| name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case(":authority");
    sources.extend(headers.filter(|(k, _)| is_authority(k)).map(|(_, v)| v.as_str()));
    if sources.len() > 1 {
        errors.add(format!("{at}.headers.request"), format!("the authority is set more than once ({sources:?})"));
    }
}

fn check_redirect(errors: &mut Errors, at: &str, redirect: &HttpRedirect) {
    let at = format!("{at}.redirect");
    let HttpRedirect { uri, authority, port, derive_port, scheme, redirect_code, .. } = redirect;
    if uri.is_none() && authority.is_none() && port.is_none() && derive_port.is_none() && scheme.is_none() {
        errors.add(at.clone(), "must specify uri, authority, scheme or port");
    }
    if let Some(code) = redirect_code
        && *code != 0
        && !(300..=399).contains(code)
    {
        errors.add(format!("{at}.redirectCode"), format!("{code} is not a redirect code (3xx)"));
    }
    if let Some(scheme) = scheme
        && !scheme.is_empty()
        && scheme != "http"
        && scheme != "https"
    {
        errors.add(format!("{at}.scheme"), format!("{scheme:?} is not a redirect scheme (http, https)"));
    }
    match (port, derive_port) {
        (Some(_), Some(_)) => errors.add(at.clone(), "only one of port, derivePort may be set"),
        (Some(port), None) if *port > 0 => check_port(errors, format!("{at}.port"), *port),
        (None, Some(derive)) if derive != "FROM_PROTOCOL_DEFAULT" && derive != "FROM_REQUEST_PORT" => errors.add(
            format!("{at}.derivePort"),
            format!("{derive:?} is not a port selection (FROM_PROTOCOL_DEFAULT, FROM_REQUEST_PORT)"),
        ),
        _ => {}
    }
}

/// Istio's limit on a direct response body (the control plane carries it).
const MAX_BODY_BYTES: usize = 1 << 20;

fn check_direct_response(errors: &mut Errors, at: &str, response: &HttpDirectResponse) {
    let at = format!("{at}.directResponse");
    if !(200..=599).contains(&response.status) {
        errors.add(format!("{at}.status"), format!("{} is not an HTTP status (200-599)", response.status));
    }
    let Some(body) = &response.body else { return };
    let size = match (&body.string, &body.bytes) {
        (Some(_), Some(_)) => return errors.add(format!("{at}.body"), "only one of string, bytes may be set"),
        (Some(text), None) => text.len(),
        (None, Some(encoded)) => match base64_decode(encoded) {
            Some(bytes) => bytes.len(),
            None => return errors.add(format!("{at}.body.bytes"), "is not base64"),
        },
        (None, None) => 0,
    };
    if size > MAX_BODY_BYTES {
        errors.add(format!("{at}.body"), format!("{size} bytes: a direct response body is at most 1 MiB"));
    }
}

fn check_rewrite(errors: &mut Errors, at: &str, rewrite: &HttpRewrite) {
    let at = format!("{at}.rewrite");
    match (&rewrite.uri, &rewrite.uri_regex_rewrite, &rewrite.authority) {
        (Some(_), Some(_), _) => errors.add(at.clone(), "only one of uri, uriRegexRewrite may be set"),
        (None, None, None) => errors.add(at.clone(), "must specify uri, uriRegexRewrite or authority"),
        _ => {}
    }
    if let Some(regex) = &rewrite.uri_regex_rewrite {
        if regex.pattern.is_empty() || regex.rewrite.is_empty() {
            errors.add(format!("{at}.uriRegexRewrite"), "needs both match and rewrite");
        } else {
            check_regex(errors, format!("{at}.uriRegexRewrite.match"), &regex.pattern);
        }
    }
}

fn check_mirrors(errors: &mut Errors, at: &str, route: &HttpRoute) {
    if route.mirror.is_some() && !route.mirrors.is_empty() {
        errors.add(at.to_string(), "only one of mirror, mirrors may be set");
    }
    if let Some(mirror) = &route.mirror {
        check_destination(errors, &format!("{at}.mirror"), mirror);
    }
    if let Some(percent) = route.mirror_percent
        && !(0..=100).contains(&percent)
    {
        errors.add(format!("{at}.mirrorPercent"), format!("{percent} is not a percentage between 0 and 100"));
    }
    if route.mirror_percentage.is_some() {
        check_percent(errors, format!("{at}.mirrorPercentage"), &route.mirror_percentage, None);
    }
    for (i, mirror) in route.mirrors.iter().enumerate() {
        check_destination(errors, &format!("{at}.mirrors[{i}].destination"), &mirror.destination);
        if mirror.percentage.is_some() {
            check_percent(errors, format!("{at}.mirrors[{i}].percentage"), &mirror.percentage, None);
        }
    }
}

fn check_fault(errors: &mut Errors, at: &str, fault: &crate::istio::HttpFault) {
    if fault.delay.is_none() && fault.abort.is_none() {
        errors.add(format!("{at}.fault"), "needs an abort, a delay or both");
    }
    if let Some(FaultDelay { fixed_delay, exponential_delay, percentage, percent, .. }) = &fault.delay {
        match (fixed_delay, exponential_delay) {
            (None, None) => errors.add(format!("{at}.fault.delay.fixedDelay"), "is required"),
            _ => {
                check_duration(errors, format!("{at}.fault.delay.fixedDelay"), fixed_delay);
                check_duration(errors, format!("{at}.fault.delay.exponentialDelay"), exponential_delay);
            }
        }
        if exponential_delay.is_some() {
            errors.add(format!("{at}.fault.delay.exponentialDelay"), "is not supported by Istio yet");
        }
        check_percent(errors, format!("{at}.fault.delay.percentage"), percentage, *percent);
    }
    if let Some(FaultAbort { http_status, grpc_status, http2_error, percentage, percent, .. }) = &fault.abort {
        let set = [http_status.is_some(), grpc_status.is_some(), http2_error.is_some()].iter().filter(|s| **s).count();
        if set > 1 {
            errors.add(format!("{at}.fault.abort"), "only one of httpStatus, grpcStatus, http2Error may be set");
        }
        match (http_status, grpc_status, http2_error) {
            (Some(status), _, _) if !(200..=599).contains(status) => {
                errors.add(format!("{at}.fault.abort.httpStatus"), format!("{status} is not an HTTP status (200-599)"))
            }
            (None, None, None) => errors.add(format!("{at}.fault.abort.httpStatus"), "is required"),
            _ => {}
        }
        if let Some(name) = grpc_status
            && grpc_code(name).is_none()
        {
            let known = GRPC_STATUS.join(", ");
            errors.add(format!("{at}.fault.abort.grpcStatus"), format!("{name:?} is not a gRPC status ({known})"));
        }
        if http2_error.is_some() {
            errors.add(format!("{at}.fault.abort.http2Error"), "is not supported by Istio yet");
        }
        check_percent(errors, format!("{at}.fault.abort.percentage"), percentage, *percent);
    }
}

/// Istio's conflicts: a rule routes, redirects, answers directly or delegates — one of them; a redirect or
/// direct response cannot be combined with fault injection or a rewrite either.
fn check_http_targets(errors: &mut Errors, at: &str, route: &HttpRoute) {
    let routes = !route.route.is_empty();
    let answer = match (&route.redirect, &route.direct_response) {
        (Some(_), Some(_)) => return errors.add(at.to_string(), "cannot contain both redirect and directResponse"),
        (Some(_), None) => Some("redirect"),
        (None, Some(_)) => Some("directResponse"),
        (None, None) => None,
    };
    if let Some(answer) = answer {
        for (set, what) in [(routes, "route"), (route.fault.is_some(), "fault"), (route.rewrite.is_some(), "rewrite")] {
            if set {
                errors.add(at.to_string(), format!("cannot contain both {what} and {answer}"));
            }
        }
    }
    if route.delegate.is_some() && (routes || answer.is_some()) {
        errors.add(at.to_string(), "only one of route, redirect, directResponse, delegate may be set");
    }
    if !routes && answer.is_none() && route.delegate.is_none() {
        errors.add(format!("{at}.route"), "one of route, redirect, directResponse, delegate is required");
    }
}

fn check_http_route(errors: &mut Errors, at: &str, route: &HttpRoute) {
    check_http_targets(errors, at, route);
    for (i, d) in route.route.iter().enumerate() {
        check_destination(errors, &format!("{at}.route[{i}].destination"), &d.destination);
        if let Some(headers) = &d.headers {
            check_header_operations(errors, &format!("{at}.route[{i}]"), headers);
        }
    }
    check_weights(errors, &format!("{at}.route"), &route.route.iter().map(|d| d.weight).collect::<Vec<_>>());
    check_duration(errors, format!("{at}.timeout"), &route.timeout);
    if let Some(retries) = &route.retries {
        resilience::check_retries(errors, at, retries);
    }
    if let Some(fault) = &route.fault {
        check_fault(errors, at, fault);
    }
    if let Some(headers) = &route.headers {
        check_header_operations(errors, at, headers);
    }
    check_authority_rewrite(errors, at, route);
    if let Some(redirect) = &route.redirect {
        check_redirect(errors, at, redirect);
    }
    if let Some(response) = &route.direct_response {
        check_direct_response(errors, at, response);
    }
    if let Some(rewrite) = &route.rewrite {
        check_rewrite(errors, at, rewrite);
    }
    check_mirrors(errors, at, route);
    for (i, m) in route.matches.iter().enumerate() {
        let field = |name: &str| format!("{at}.match[{i}].{name}");
        for (name, s) in [("uri", &m.uri), ("scheme", &m.scheme), ("method", &m.method), ("authority", &m.authority)] {
            if let Some(s) = s {
                check_string_match(errors, field(name), s, name == "uri");
            }
        }
        for (map, entries) in [("headers", &m.headers), ("queryParams", &m.query_params), ("withoutHeaders", &m.without_headers)] {
            for (name, s) in entries {
                if map != "queryParams" {
                    check_match_header(errors, field(&format!("{map}.{name}")), name);
                }
                // In withoutHeaders, `regex: "*"` is not a regex: it means the header is present.
                if map == "withoutHeaders" && s.regex.as_deref() == Some("*") {
                    continue;
                }
                check_string_match(errors, field(&format!("{map}.{name}")), s, false);
            }
        }
        if let Some(port) = m.port {
            check_port(errors, field("port"), port);
        }
        if let Some(namespace) = &m.source_namespace {
            check_namespace(errors, field("sourceNamespace"), namespace);
        }
        check_gateway_refs(errors, &field("gateways"), &m.gateways);
    }
}

/// `gateways` entries: `mesh`, `name`, or `namespace/name`.
fn check_gateway_refs(errors: &mut Errors, field: &str, gateways: &[String]) {
    for (i, gateway) in gateways.iter().enumerate() {
        let name = match gateway.split_once('/') {
            Some((namespace, name)) => {
                check_namespace(errors, format!("{field}[{i}]"), namespace);
                name
            }
            None => gateway.as_str(),
        };
        if !name.split('.').all(is_dns_label) {
            errors.add(format!("{field}[{i}]"), format!("{gateway:?} is not a gateway name (mesh, name or namespace/name)"));
        }
    }
}

/// Warren's annotations on an object of `kind`: a VirtualService's connection faults.
pub fn annotations(kind: &str, annotations: Option<&std::collections::BTreeMap<String, String>>) -> Vec<FieldError> {
    match (kind, annotations) {
        ("VirtualService", Some(annotations)) => crate::connect_fault::parse(annotations).err().unwrap_or_default(),
        _ => Vec::new(),
    }
}

pub fn virtual_service(spec: &VirtualServiceSpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if spec.hosts.is_empty() {
        errors.add("spec.hosts", "at least one host is required");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        check_host(&mut errors, format!("spec.hosts[{i}]"), host);
    }
    check_gateway_refs(&mut errors, "spec.gateways", &spec.gateways);
    check_export_to(&mut errors, &spec.export_to);
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        errors.add("spec", "one of http, tcp, tls is required");
    }
    for (i, route) in spec.http.iter().enumerate() {
        check_http_route(&mut errors, &format!("spec.http[{i}]"), route);
    }
    for (i, route) in spec.tcp.iter().enumerate() {
        let at = format!("spec.tcp[{i}]");
        if route.route.is_empty() {
            errors.add(format!("{at}.route"), "at least one destination is required");
        }
        for (j, d) in route.route.iter().enumerate() {
            check_destination(&mut errors, &format!("{at}.route[{j}].destination"), &d.destination);
        }
        check_weights(&mut errors, &format!("{at}.route"), &route.route.iter().map(|d| d.weight).collect::<Vec<_>>());
        for (j, m) in route.matches.iter().enumerate() {
            if let Some(port) = m.port {
                check_port(&mut errors, format!("{at}.match[{j}].port"), port);
            }
            for (k, subnet) in m.destination_subnets.iter().enumerate() {
                check_ip_block(&mut errors, format!("{at}.match[{j}].destinationSubnets[{k}]"), subnet);
            }
            check_gateway_refs(&mut errors, &format!("{at}.match[{j}].gateways"), &m.gateways);
        }
    }
    for (i, route) in spec.tls.iter().enumerate() {
        check_tls_route(&mut errors, &format!("spec.tls[{i}]"), route);
    }
    errors.0
}

/// A `tls` rule, as Istio's validation: at least one match, each with SNI hosts; destinations as tcp's.
fn check_tls_route(errors: &mut Errors, at: &str, route: &crate::istio::TlsRoute) {
    if route.matches.is_empty() {
        errors.add(format!("{at}.match"), "at least one match is required");
    }
    if route.route.is_empty() {
        errors.add(format!("{at}.route"), "at least one destination is required");
    }
    for (j, d) in route.route.iter().enumerate() {
        check_destination(errors, &format!("{at}.route[{j}].destination"), &d.destination);
    }
    check_weights(errors, &format!("{at}.route"), &route.route.iter().map(|d| d.weight).collect::<Vec<_>>());
    for (j, m) in route.matches.iter().enumerate() {
        if m.sni_hosts.is_empty() {
            errors.add(format!("{at}.match[{j}].sniHosts"), "at least one SNI host is required");
        }
        for (k, host) in m.sni_hosts.iter().enumerate() {
            check_host(errors, format!("{at}.match[{j}].sniHosts[{k}]"), host);
        }
        if let Some(port) = m.port {
            check_port(errors, format!("{at}.match[{j}].port"), port);
        }
        for (k, subnet) in m.destination_subnets.iter().enumerate() {
            check_ip_block(errors, format!("{at}.match[{j}].destinationSubnets[{k}]"), subnet);
        }
        check_gateway_refs(errors, &format!("{at}.match[{j}].gateways"), &m.gateways);
    }
}

/// An IP address or CIDR block whose host bits are zero (`10.0.0.0/8`, `2001:db8::/32`, `1.2.3.4`).
pub fn parse_ip_block(text: &str) -> Result<(IpAddr, u8), String> {
    let bad = |why: &str| format!("{text:?} is not an IP address or CIDR block ({why})");
    let (address, length) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let ip: IpAddr = address.parse().map_err(|_| bad("bad address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let length = match length {
        None => max,
        Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| bad("bad prefix length"))?,
    };
    let bits: u128 = match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
        IpAddr::V6(v6) => u128::from(v6),
    };
    if length < 128 && bits << length != 0 {
        return Err(bad("host bits set"));
    }
    Ok((ip, length))
}

fn check_ip_block(errors: &mut Errors, field: String, text: &str) {
    if let Err(reason) = parse_ip_block(text) {
        errors.add(field, reason);
    }
}

/// `tls` of a traffic policy or a port's (`at` names it).
fn check_client_tls(errors: &mut Errors, at: &str, tls: &ClientTls) {
    let mode = tls.mode.as_deref().unwrap_or("DISABLE");
    if !matches!(mode, "DISABLE" | "SIMPLE" | "MUTUAL" | "ISTIO_MUTUAL") {
        errors.add(format!("{at}.mode"), format!("{mode:?} is not a TLS mode (DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL)"));
    }
    if mode == "MUTUAL" && tls.credential_name.is_none() && (tls.client_certificate.is_none() || tls.private_key.is_none()) {
        errors.add(at.to_string(), "MUTUAL needs credentialName, or clientCertificate and privateKey");
    }
}

pub fn destination_rule(spec: &DestinationRuleSpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    check_host(&mut errors, "spec.host".into(), &spec.host);
    check_export_to(&mut errors, &spec.export_to);
    if let Some(policy) = &spec.traffic_policy {
        resilience::check_traffic_policy(&mut errors, "spec.trafficPolicy", policy);
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        if !is_dns_label(&subset.name) {
            errors.add(format!("spec.subsets[{i}].name"), format!("{:?} is not a subset name (a DNS label)", subset.name));
        } else if !seen.insert(subset.name.as_str()) {
            errors.add(format!("spec.subsets[{i}].name"), format!("{:?} is defined twice", subset.name));
        }
        if let Some(policy) = &subset.traffic_policy {
            resilience::check_traffic_policy(&mut errors, &format!("spec.subsets[{i}].trafficPolicy"), policy);
        }
    }
    errors.0
}

const GATEWAY_PROTOCOLS: &[&str] = &["HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS"];

fn check_gateway_server(errors: &mut Errors, at: &str, server: &GatewayServer) {
    match &server.port {
        None => errors.add(format!("{at}.port"), "is required"),
        Some(port) => {
            check_port(errors, format!("{at}.port.number"), port.number);
            if !GATEWAY_PROTOCOLS.contains(&port.protocol.to_ascii_uppercase().as_str()) {
                errors.add(
                    format!("{at}.port.protocol"),
                    format!("{:?} is not a protocol ({})", port.protocol, GATEWAY_PROTOCOLS.join(", ")),
                );
            }
            let secure = matches!(port.protocol.to_ascii_uppercase().as_str(), "HTTPS");
            if secure && server.tls.is_none() {
                errors.add(format!("{at}.tls"), "is required for HTTPS servers");
            }
        }
    }
    if server.hosts.is_empty() {
        errors.add(format!("{at}.hosts"), "at least one host is required");
    }
    for (i, host) in server.hosts.iter().enumerate() {
        let name = match host.split_once('/') {
            Some((namespace, name)) => {
                if namespace != "*" && namespace != "." && namespace != "~" {
                    check_namespace(errors, format!("{at}.hosts[{i}]"), namespace);
                }
                name
            }
            None => host.as_str(),
        };
        check_host(errors, format!("{at}.hosts[{i}]"), name);
    }
    if let Some(mode) = server.tls.as_ref().and_then(|t| t.mode.as_deref()) {
        let modes = ["PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL"];
        if !modes.contains(&mode) {
            errors.add(format!("{at}.tls.mode"), format!("{mode:?} is not a TLS mode ({})", modes.join(", ")));
        }
    }
}

pub fn gateway(spec: &GatewaySpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if spec.servers.is_empty() {
        errors.add("spec.servers", "at least one server is required");
    }
    for (i, server) in spec.servers.iter().enumerate() {
        check_gateway_server(&mut errors, &format!("spec.servers[{i}]"), server);
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, server) in spec.servers.iter().enumerate() {
        if let Some(name) = server.port.as_ref().map(|p| p.name.as_str()).filter(|n| !n.is_empty())
            && !names.insert((name, server.port.as_ref().map(|p| p.number)))
        {
            errors.add(format!("spec.servers[{i}].port.name"), format!("{name:?} is used by two servers"));
        }
    }
    errors.0
}

pub fn service_entry(spec: &ServiceEntrySpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if spec.hosts.is_empty() {
        errors.add("spec.hosts", "at least one host is required");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        check_host(&mut errors, format!("spec.hosts[{i}]"), host);
        if host == "*" {
            errors.add(format!("spec.hosts[{i}]"), "\"*\" is not allowed in a ServiceEntry");
        }
    }
    for (i, address) in spec.addresses.iter().enumerate() {
        check_ip_block(&mut errors, format!("spec.addresses[{i}]"), address);
    }
    check_export_to(&mut errors, &spec.export_to);
    let mut names = std::collections::BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        check_port(&mut errors, format!("spec.ports[{i}].number"), port.number);
        if let Some(target) = port.target_port {
            check_port(&mut errors, format!("spec.ports[{i}].targetPort"), target);
        }
        if !port.name.is_empty() && !names.insert(port.name.as_str()) {
            errors.add(format!("spec.ports[{i}].name"), format!("{:?} is defined twice", port.name));
        }
    }
    let resolution = spec.resolution.as_deref().unwrap_or("NONE");
    if !matches!(resolution, "NONE" | "STATIC" | "DNS" | "DNS_ROUND_ROBIN") {
        errors.add("spec.resolution", format!("{resolution:?} is not a resolution (NONE, STATIC, DNS, DNS_ROUND_ROBIN)"));
    }
    if let Some(location) = &spec.location
        && !matches!(location.as_str(), "MESH_EXTERNAL" | "MESH_INTERNAL")
    {
        errors.add("spec.location", format!("{location:?} is not a location (MESH_EXTERNAL, MESH_INTERNAL)"));
    }
    match resolution {
        "NONE" if !spec.endpoints.is_empty() => errors.add("spec.endpoints", "no endpoints may be given with resolution NONE"),
        "STATIC" if spec.endpoints.is_empty() && spec.workload_selector.is_none() => {
            errors.add("spec.endpoints", "resolution STATIC needs endpoints (or a workloadSelector)")
        }
        _ => {}
    }
    for (i, endpoint) in spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}].address");
        if resolution == "STATIC" && endpoint.address.parse::<IpAddr>().is_err() && !endpoint.address.starts_with("unix://") {
            errors.add(field, format!("{:?} is not an IP address (resolution STATIC)", endpoint.address));
        } else if resolution != "STATIC" {
            check_host(&mut errors, field, &endpoint.address);
        }
        for (name, port) in &endpoint.ports {
            check_port(&mut errors, format!("spec.endpoints[{i}].ports.{name}"), *port);
            if !names.contains(name.as_str()) {
                errors.add(format!("spec.endpoints[{i}].ports.{name}"), format!("{name:?} names no port of the ServiceEntry"));
            }
        }
    }
    errors.0
}

/// A principal or namespace pattern: exact, `prefix*`, `*suffix` or `*` (Istio allows one `*`, at an end).
fn check_pattern(errors: &mut Errors, field: String, pattern: &str) {
    let stars = pattern.matches('*').count();
    if pattern.is_empty() {
        errors.add(field, "must not be empty");
    } else if stars > 1 || (stars == 1 && !(pattern.starts_with('*') || pattern.ends_with('*'))) {
        errors.add(field, format!("{pattern:?}: a \"*\" may only stand at the start or the end"));
    }
}

fn check_source(errors: &mut Errors, at: &str, source: &RuleSource) {
    let patterns = [
        ("principals", &source.principals),
        ("notPrincipals", &source.not_principals),
        ("requestPrincipals", &source.request_principals),
        ("notRequestPrincipals", &source.not_request_principals),
        ("namespaces", &source.namespaces),
        ("notNamespaces", &source.not_namespaces),
    ];
    let blocks = [
        ("ipBlocks", &source.ip_blocks),
        ("notIpBlocks", &source.not_ip_blocks),
        ("remoteIpBlocks", &source.remote_ip_blocks),
        ("notRemoteIpBlocks", &source.not_remote_ip_blocks),
    ];
    if patterns.iter().chain(&blocks).all(|(_, v)| v.is_empty()) && source.unknown.is_empty() {
        errors.add(at.to_string(), "must not be empty (a source needs at least one field)");
    }
    for (name, values) in patterns {
        for (i, value) in values.iter().enumerate() {
            check_pattern(errors, format!("{at}.{name}[{i}]"), value);
        }
    }
    for (name, values) in blocks {
        for (i, value) in values.iter().enumerate() {
            check_ip_block(errors, format!("{at}.{name}[{i}]"), value);
        }
    }
}

/// `when` keys Istio defines (request.headers[...] and the JWT claims take a name in brackets).
const CONDITION_KEYS: &[&str] = &[
    "source.ip", "remote.ip", "source.namespace", "source.principal", "request.auth.principal", "request.auth.audiences",
    "request.auth.presenter", "destination.ip", "destination.port", "connection.sni", "experimental.envoy.filters",
];

fn check_condition_key(key: &str) -> bool {
    CONDITION_KEYS.contains(&key)
        || ["request.headers[", "request.auth.claims[", "experimental.envoy.filters."]
            .iter()
            .any(|prefix| key.strip_prefix(prefix).is_some_and(|rest| !rest.is_empty() && (prefix.ends_with('.') || rest.ends_with(']'))))
}

pub fn authorization_policy(spec: &AuthorizationPolicySpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    let action = spec.action.as_deref().unwrap_or("ALLOW");
    if !matches!(action, "ALLOW" | "DENY" | "AUDIT" | "CUSTOM") {
        errors.add("spec.action", format!("{action:?} is not an action (ALLOW, DENY, AUDIT, CUSTOM)"));
    }
    match (action, &spec.provider) {
        ("CUSTOM", None) => errors.add("spec.provider", "is required for CUSTOM policies"),
        (a, Some(_)) if a != "CUSTOM" => errors.add("spec.provider", "is only allowed with action CUSTOM"),
        _ => {}
    }
    if spec.selector.is_some() && (spec.target_ref.is_some() || !spec.target_refs.is_empty()) {
        errors.add("spec.selector", "cannot be combined with targetRef/targetRefs");
    }
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            check_source(&mut errors, &format!("{at}.from[{j}].source"), &from.source);
        }
        for (j, to) in rule.to.iter().enumerate() {
            let op = &to.operation;
            let field = |name: &str, k: usize| format!("{at}.to[{j}].operation.{name}[{k}]");
            for (name, ports) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
                for (k, port) in ports.iter().enumerate() {
                    if !port.parse::<u16>().is_ok_and(|p| p > 0) {
                        errors.add(field(name, k), format!("{port:?} is not a port (1-65535)"));
                    }
                }
            }
            for (name, paths) in [("paths", &op.paths), ("notPaths", &op.not_paths)] {
                for (k, path) in paths.iter().enumerate() {
                    check_pattern(&mut errors, field(name, k), path);
                }
            }
            let all = [&op.hosts, &op.not_hosts, &op.ports, &op.not_ports, &op.methods, &op.not_methods, &op.paths, &op.not_paths];
            if all.iter().all(|v| v.is_empty()) && op.unknown.is_empty() {
                errors.add(format!("{at}.to[{j}].operation"), "must not be empty (an operation needs at least one field)");
            }
        }
        for (j, condition) in rule.when.iter().enumerate() {
            if !check_condition_key(&condition.key) {
                errors.add(format!("{at}.when[{j}].key"), format!("{:?} is not a condition key Istio defines", condition.key));
            }
            if condition.values.is_empty() && condition.not_values.is_empty() {
                errors.add(format!("{at}.when[{j}]"), "needs values or notValues");
            }
            if condition.key == "destination.port" {
                for (k, v) in condition.values.iter().chain(&condition.not_values).enumerate() {
                    if !v.parse::<u16>().is_ok_and(|p| p > 0) {
                        errors.add(format!("{at}.when[{j}].values[{k}]"), format!("{v:?} is not a port"));
                    }
                }
            }
            if matches!(condition.key.as_str(), "source.ip" | "remote.ip" | "destination.ip") {
                for (k, v) in condition.values.iter().chain(&condition.not_values).enumerate() {
                    check_ip_block(&mut errors, format!("{at}.when[{j}].values[{k}]"), v);
                }
            }
        }
    }
    errors.0
}

pub fn peer_authentication(spec: &PeerAuthenticationSpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    for port in spec.port_level_mtls.keys() {
        if !port.parse::<u16>().is_ok_and(|p| p > 0) {
            errors.add(format!("spec.portLevelMtls.{port}"), format!("{port:?} is not a port (1-65535)"));
        }
    }
    if !spec.port_level_mtls.is_empty() && spec.selector.as_ref().is_none_or(|s| s.match_labels.is_empty()) {
        errors.add("spec.portLevelMtls", "needs a selector (port-level mTLS applies to selected workloads only)");
    }
    errors.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(yaml: &str) -> Vec<String> {
        let spec: VirtualServiceSpec = serde_yaml::from_str(yaml).unwrap();
        virtual_service(&spec).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn durations_as_istio_writes_them() {
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h0.000000001s"), Ok(Duration::new(3600, 1)));
        for bad in ["", "abc", "5", "1.5 s", "-1s", "s", "1..5s", ".s", " 1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn huge_durations_are_errors_not_panics() {
        let err = parse_duration("100000000000000000000000h").unwrap_err();
        assert!(err.contains("exceeds the longest duration"), "{err}");
        assert!(parse_duration(&format!("{}s", "9".repeat(5000))).is_err());
        assert!(parse_duration("87600000h").is_ok(), "10,000 years is the limit, not below it");
        assert_eq!(
            vs("hosts: [r]\nhttp: [{timeout: 100000000000000000000000h, route: [{destination: {host: r}}]}]"),
            ["spec.http[0].timeout: \"100000000000000000000000h\" exceeds the longest duration (315576000000s)"]
        );
    }

    #[test]
    fn virtual_service_errors_name_the_field() {
        assert_eq!(vs("hosts: [r]\nhttp: [{route: [{destination: {host: r}}]}]"), Vec::<String>::new());
        assert_eq!(
            vs("hosts: [r]\nhttp: [{timeout: soon, route: [{destination: {host: r}}]}]"),
            ["spec.http[0].timeout: \"soon\" is not a duration (e.g. 1.5s, 300ms)"]
        );
        assert_eq!(
            vs("hosts: [r]\nhttp: [{route: [{destination: {host: r}}], fault: {abort: {httpStatus: 700}}}]"),
            ["spec.http[0].fault.abort.httpStatus: 700 is not an HTTP status (200-599)"]
        );
        assert_eq!(vs("hosts: []\ntcp: [{route: [{destination: {host: r}}]}]"), ["spec.hosts: at least one host is required"]);
        assert_eq!(vs("hosts: [r]\ngateways: [bad_name]\ntcp: [{route: [{destination: {host: r}}]}]"),
            ["spec.gateways[0]: \"bad_name\" is not a gateway name (mesh, name or namespace/name)"]);
        assert_eq!(vs("hosts: [r]\nhttp: [{name: x}]"), ["spec.http[0].route: one of route, redirect, directResponse, delegate is required"]);
    }

    #[test]
    fn an_invalid_regex_is_an_error_naming_its_field() {
        let errors = vs("hosts: [r]\nhttp: [{match: [{uri: {regex: '('}}], route: [{destination: {host: r}}]}]");
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].starts_with("spec.http[0].match[0].uri.regex: \"(\" is not a valid regex: "), "{errors:#?}");
        assert!(errors[0].contains("unclosed group"), "the parser's reason: {errors:#?}");
        let every = vs("hosts: [r]\nhttp:\n- match:\n  - {uri: {regex: '/ok/.*'}, scheme: {regex: '['}, method: {regex: '(?P<'}, authority: {regex: 'a{2,1}'}}\n  \
            - {headers: {x-a: {regex: '*'}}, queryParams: {q: {regex: '+'}}, withoutHeaders: {x-b: {regex: ')'}, x-c: {regex: '*'}}}\n  \
            rewrite: {uriRegexRewrite: {match: '(?<', rewrite: /x}}\n  route: [{destination: {host: r}}]\n");
        let fields: Vec<&str> = every.iter().map(|e| e.split(": ").next().unwrap()).collect();
        assert_eq!(fields, [
            "spec.http[0].rewrite.uriRegexRewrite.match",
            "spec.http[0].match[0].scheme.regex",
            "spec.http[0].match[0].method.regex",
            "spec.http[0].match[0].authority.regex",
            "spec.http[0].match[1].headers.x-a.regex",
            "spec.http[0].match[1].queryParams.q.regex",
            "spec.http[0].match[1].withoutHeaders.x-b.regex",
        ], "withoutHeaders' `*` means present: {every:#?}");
        assert!(every.iter().all(|e| e.contains("is not a valid regex")), "{every:#?}");
        // RE2 has no backreferences or lookaround; the regex crate neither.
        assert_eq!(vs("hosts: [r]\nhttp: [{match: [{uri: {regex: '(a)\\1'}}], route: [{destination: {host: r}}]}]").len(), 1);
        assert_eq!(vs("hosts: [r]\nhttp: [{match: [{uri: {regex: '^/api/v[0-9]+/.*$'}}], route: [{destination: {host: r}}]}]"), Vec::<String>::new());
    }

    #[test]
    fn redirects_direct_responses_and_rewrites_as_istio_checks_them() {
        let http = |rule: &str| vs(&format!("hosts: [r]\nhttp: [{rule}]"));
        assert_eq!(http("{redirect: {uri: /x}, route: [{destination: {host: r}}]}"), ["spec.http[0]: cannot contain both route and redirect"]);
        assert_eq!(
            http("{directResponse: {status: 200}, route: [{destination: {host: r}}], rewrite: {uri: /y}}"),
            ["spec.http[0]: cannot contain both route and directResponse", "spec.http[0]: cannot contain both rewrite and directResponse"]
        );
        assert_eq!(http("{redirect: {uri: /x}, directResponse: {status: 200}}"), ["spec.http[0]: cannot contain both redirect and directResponse"]);
        assert_eq!(http("{redirect: {}}"), ["spec.http[0].redirect: must specify uri, authority, scheme or port"]);
        assert_eq!(
            http("{redirect: {uri: /x, redirectCode: 200, scheme: ftp, port: 70000}}"),
            [
                "spec.http[0].redirect.redirectCode: 200 is not a redirect code (3xx)",
                "spec.http[0].redirect.scheme: \"ftp\" is not a redirect scheme (http, https)",
                "spec.http[0].redirect.port: 70000 is not a port (1-65535)",
            ]
        );
        assert_eq!(http("{redirect: {derivePort: FROM_REQUEST_PORT, redirectCode: 302}}"), Vec::<String>::new());
        assert_eq!(http("{directResponse: {status: 600}}"), ["spec.http[0].directResponse.status: 600 is not an HTTP status (200-599)"]);
        assert_eq!(http("{directResponse: {status: 404, body: {bytes: 'not base64!'}}}"), ["spec.http[0].directResponse.body.bytes: is not base64"]);
        assert_eq!(http("{directResponse: {status: 404, body: {string: a, bytes: YQ==}}}"), ["spec.http[0].directResponse.body: only one of string, bytes may be set"]);
        assert_eq!(http("{directResponse: {status: 404, body: {string: gone}}}"), Vec::<String>::new());
        assert_eq!(http("{rewrite: {}, route: [{destination: {host: r}}]}"), ["spec.http[0].rewrite: must specify uri, uriRegexRewrite or authority"]);
        assert_eq!(
            http("{rewrite: {uri: /a, uriRegexRewrite: {match: a, rewrite: b}}, route: [{destination: {host: r}}]}"),
            ["spec.http[0].rewrite: only one of uri, uriRegexRewrite may be set"]
        );
        assert_eq!(
            http("{rewrite: {authority: a}, headers: {request: {set: {Host: b}}}, route: [{destination: {host: r}}]}"),
            ["spec.http[0].headers.request: the authority is set more than once ([\"a\", \"b\"])"]
        );
    }

    #[test]
    fn header_operations_mirrors_and_grpc_aborts_are_checked() {
        let http = |rule: &str| vs(&format!("hosts: [r]\nhttp: [{rule}]"));
        let headers = http(
            "{headers: {request: {set: {':path': /x, host: h, 'bad name': v}, remove: [host]}, response: {add: {x-a: \"a\\nb\"}}}, \
             route: [{destination: {host: r}, headers: {response: {set: {':authority': x}}}}]}",
        );
        assert_eq!(headers, [
            "spec.http[0].route[0].headers.response.set.:authority: \":authority\": the Host header can only be set or added on requests",
            "spec.http[0].headers.request.set.:path: \":path\": a pseudo-header (\":\" prefix) cannot be changed",
            "spec.http[0].headers.request.set.bad name: \"bad name\" is not a header name",
            "spec.http[0].headers.request.remove[0]: \"host\": the Host header can only be set or added on requests",
            "spec.http[0].headers.response.add.x-a: \"a\\nb\": a header value cannot hold control characters",
        ]);
        assert_eq!(
            http("{match: [{headers: {'@request.auth.claims.group': {exact: a}, ':authority': {prefix: x}, 'a b': {exact: c}}}], route: [{destination: {host: r}}]}"),
            ["spec.http[0].match[0].headers.a b: \"a b\" is not a header name"]
        );
        assert_eq!(
            http("{route: [{destination: {host: r}}], mirror: {host: m}, mirrors: [{destination: {host: '*'}, percentage: {value: 101}}], mirrorPercent: 120}"),
            [
                "spec.http[0]: only one of mirror, mirrors may be set",
                "spec.http[0].mirrorPercent: 120 is not a percentage between 0 and 100",
                "spec.http[0].mirrors[0].destination.host: \"*\": a destination host cannot be a wildcard",
                "spec.http[0].mirrors[0].percentage: 101 is not a percentage between 0 and 100",
            ]
        );
        assert_eq!(http("{route: [{destination: {host: r}}], mirror: {host: m}, mirrorPercentage: {value: 0.5}}"), Vec::<String>::new());
        let grpc = http("{route: [{destination: {host: r}}], fault: {abort: {grpcStatus: NOPE}}}");
        assert_eq!(grpc.len(), 1);
        assert!(grpc[0].starts_with("spec.http[0].fault.abort.grpcStatus: \"NOPE\" is not a gRPC status (OK, CANCELLED,"), "{grpc:#?}");
        assert_eq!(http("{route: [{destination: {host: r}}], fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 10}}}}"), Vec::<String>::new());
        assert_eq!(http("{route: [{destination: {host: r}}], fault: {}}"), ["spec.http[0].fault: needs an abort, a delay or both"]);
    }

    #[test]
    fn base64_as_protobuf_json_writes_bytes() {
        assert_eq!(base64_decode("aGVsbG8sIHdvcmxk").unwrap(), b"hello, world");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("YQ").unwrap(), b"a", "padding is optional");
        assert_eq!(base64_decode("-_8=").unwrap(), [0xfb, 0xff], "URL-safe alphabet");
        assert_eq!(base64_decode("+/8=").unwrap(), [0xfb, 0xff]);
        assert_eq!(base64_decode("").unwrap(), b"");
        for bad in ["a", "YQ===", "Y Q=", "é"] {
            assert_eq!(base64_decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn weights_are_relative_as_in_istio() {
        // Istio divides by the sum: 80+10, a lone 50, and 3:1 are all valid.
        for ok in [
            "[{destination: {host: r, subset: a}, weight: 80}, {destination: {host: r}, weight: 10}]",
            "[{destination: {host: r}, weight: 50}]",
            "[{destination: {host: r, subset: a}, weight: 3}, {destination: {host: r}, weight: 1}]",
            "[{destination: {host: r}, weight: 0}]",
        ] {
            assert_eq!(vs(&format!("hosts: [r]\nhttp: [{{route: {ok}}}]")), Vec::<String>::new(), "{ok}");
        }
        assert_eq!(
            vs("hosts: [r]\nhttp: [{route: [{destination: {host: r}, weight: -1}]}]"),
            ["spec.http[0].route[0].weight: -1 is negative"]
        );
        assert_eq!(
            vs("hosts: [r]\ntcp: [{route: [{destination: {host: r, subset: a}}, {destination: {host: r}, weight: 0}]}]"),
            ["spec.tcp[0].route: the weights of several destinations are all 0 (total destination weight = 0)"]
        );
    }

    #[test]
    fn ip_blocks() {
        assert_eq!(parse_ip_block("10.0.0.0/8"), Ok(("10.0.0.0".parse().unwrap(), 8)));
        assert_eq!(parse_ip_block("1.2.3.4"), Ok(("1.2.3.4".parse().unwrap(), 32)));
        assert_eq!(parse_ip_block("2001:db8::/32"), Ok(("2001:db8::".parse().unwrap(), 32)));
        for bad in ["10.0.0.1/8", "10.0.0.0/33", "300.0.0.0/8", "fd00::1/200", "", "10.0.0.0/"] {
            assert!(parse_ip_block(bad).is_err(), "{bad:?}");
        }
    }

    fn errors_of<T: serde::de::DeserializeOwned>(yaml: &str, check: fn(&T) -> Vec<FieldError>) -> Vec<String> {
        check(&serde_yaml::from_str(yaml).unwrap()).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn gateways_service_entries_and_policies_are_checked() {
        let gateway = errors_of(
            "selector: {istio: ingressgateway}\nservers: [{port: {number: 70000, name: http, protocol: HTTQ}, hosts: []}]",
            super::gateway,
        );
        assert_eq!(gateway, [
            "spec.servers[0].port.number: 70000 is not a port (1-65535)",
            "spec.servers[0].port.protocol: \"HTTQ\" is not a protocol (HTTP, HTTPS, GRPC, GRPC-WEB, HTTP2, MONGO, TCP, TLS)",
            "spec.servers[0].hosts: at least one host is required",
        ]);
        assert_eq!(errors_of("selector: {istio: ingressgateway}\nservers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}]", super::gateway), Vec::<String>::new());
        let entry = errors_of("hosts: [api.example.com]\naddresses: [10.1.0.1/16]\nresolution: STATIC\nports: [{number: 443, name: https, protocol: TLS}]", service_entry);
        assert_eq!(entry, [
            "spec.addresses[0]: \"10.1.0.1/16\" is not an IP address or CIDR block (host bits set)",
            "spec.endpoints: resolution STATIC needs endpoints (or a workloadSelector)",
        ]);
        let policy = errors_of(
            "rules: [{from: [{source: {ipBlocks: [10.0.0.300/8], principals: ['a*b']}}], to: [{operation: {ports: ['http']}}]}]",
            authorization_policy,
        );
        assert_eq!(policy, [
            "spec.rules[0].from[0].source.principals[0]: \"a*b\": a \"*\" may only stand at the start or the end",
            "spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.300/8\" is not an IP address or CIDR block (bad address)",
            "spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port (1-65535)",
        ]);
        assert_eq!(errors_of("action: CUSTOM\nrules: [{}]", authorization_policy), ["spec.provider: is required for CUSTOM policies"]);
        assert_eq!(errors_of("portLevelMtls: {'99999': {mode: DISABLE}}", peer_authentication), [
            "spec.portLevelMtls.99999: \"99999\" is not a port (1-65535)",
            "spec.portLevelMtls: needs a selector (port-level mTLS applies to selected workloads only)",
        ]);
    }

    #[test]
    fn traffic_policies_are_validated() {
        let dr = errors_of(
            "host: r\ntrafficPolicy:\n  connectionPool: {tcp: {maxConnections: -1, connectTimeout: fast}}\n  outlierDetection: {maxEjectionPercent: 150}\n  loadBalancer: {simple: FASTEST}\n  tls: {mode: SOMETIMES}\n",
            destination_rule,
        );
        assert_eq!(dr, [
            "spec.trafficPolicy.tls.mode: \"SOMETIMES\" is not a TLS mode (DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL)",
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout: \"fast\" is not a duration (e.g. 1.5s, 300ms)",
            "spec.trafficPolicy.connectionPool.tcp.maxConnections: -1 is not a count (0 or more)",
            "spec.trafficPolicy.loadBalancer.simple: \"FASTEST\" is not a load balancer (UNSPECIFIED, LEAST_CONN, RANDOM, PASSTHROUGH, ROUND_ROBIN, LEAST_REQUEST)",
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent: 150 is not a percentage between 0 and 100",
        ]);
        assert_eq!(errors_of("host: r\ntrafficPolicy: {connectionPool: {tcp: {maxConnections: 100}}, tls: {mode: ISTIO_MUTUAL}}", destination_rule), Vec::<String>::new());
    }

    #[test]
    fn bookinfo_samples_are_valid() {
        let dir = crate::bookinfo_samples().expect("the conformance data (../shared/conformance/istio-bookinfo)");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "yaml")) {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            for document in serde_yaml::Deserializer::from_str(&text) {
                let value = serde_yaml::Value::deserialize(document).unwrap();
                let Some(spec) = value.get("spec").cloned() else { continue };
                let errors = match value.get("kind").and_then(|k| k.as_str()) {
                    Some("VirtualService") => virtual_service(&serde_yaml::from_value(spec).unwrap()),
                    Some("DestinationRule") => destination_rule(&serde_yaml::from_value(spec).unwrap()),
                    Some("Gateway") => gateway(&serde_yaml::from_value(spec).unwrap()),
                    _ => continue,
                };
                assert_eq!(errors, Vec::new(), "{}", entry.path().display());
                checked += 1;
            }
        }
        assert!(checked >= 12, "{checked} Istio objects checked");
    }

    use serde::Deserialize;
}
