//! Per-object validation: what the API server's schema cannot check (v1.20 has no CEL). Each problem names
//! the field (a JSON path below the object) and the reason; an object with problems is not compiled, and
//! its last valid version stays in force.
use std::time::Duration;

use crate::istio::{
    AuthorizationPolicySpec, DestinationRuleSpec, FaultAbort, FaultDelay, HttpRoute, Percent, RouteDestination,
    VirtualServiceSpec,
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

/// Parses a duration as Istio accepts it: a sequence of decimal numbers with units h, m, s, ms, us, ns
/// ("1.5s", "300ms", "1m30s").
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (e.g. 1.5s, 300ms)");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        if number_end == 0 {
            return Err(bad());
        }
        let number: f64 = rest[..number_end].parse().map_err(|_| bad())?;
        rest = &rest[number_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[unit_end..];
    }
    // Durations beyond u64::MAX seconds (or digits parsing to infinity) would panic `from_secs_f64`.
    Duration::try_from_secs_f64(total).map_err(|_| format!("{text:?} is too long a duration"))
}

pub fn duration_ms(text: &str) -> Option<u64> {
    parse_duration(text).ok().map(|d| d.as_millis() as u64)
}

/// The percentage a fault applies to: `percentage.value`, else the legacy integer `percent`, else 100.
pub fn fault_percent(percentage: &Option<Percent>, percent: Option<i64>) -> f64 {
    percentage.as_ref().map(|p| p.value).or(percent.map(|p| p as f64)).unwrap_or(100.0)
}

fn check_host(errors: &mut Errors, field: String, host: &str) {
    if host.is_empty() {
        errors.add(field, "must not be empty");
    } else if host.contains(' ') || host.contains('/') {
        errors.add(field, format!("{host:?} is not a host name"));
    }
}

fn check_weights<'a>(errors: &mut Errors, field: &str, weights: impl Iterator<Item = (usize, Option<i64>)> + Clone) {
    let count = weights.clone().count();
    for (i, weight) in weights.clone() {
        if let Some(w) = weight
            && !(0..=100).contains(&w)
        {
            errors.add(format!("{field}[{i}].weight"), format!("{w} is not between 0 and 100"));
            return;
        }
    }
    if count > 1 || weights.clone().any(|(_, w)| w.is_some_and(|w| w != 100 && w != 0)) {
        let sum: i64 = weights.map(|(_, w)| w.unwrap_or(0)).sum();
        if sum != 100 {
            errors.add(field.to_string(), format!("weights sum to {sum}, not 100"));
        }
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

fn check_destinations(errors: &mut Errors, field: &str, destinations: &[RouteDestination]) {
    if destinations.is_empty() {
        errors.add(field, "at least one destination is required");
    }
    for (i, d) in destinations.iter().enumerate() {
        check_host(errors, format!("{field}[{i}].destination.host"), &d.destination.host);
        if let Some(port) = &d.destination.port
            && !(1..=65535).contains(&port.number)
        {
            errors.add(format!("{field}[{i}].destination.port.number"), format!("{} is not a port", port.number));
        }
        if d.destination.subset.as_deref() == Some("") {
            errors.add(format!("{field}[{i}].destination.subset"), "must not be empty");
        }
    }
    check_weights(errors, field, destinations.iter().enumerate().map(|(i, d)| (i, d.weight)));
}

fn check_http_route(errors: &mut Errors, at: &str, route: &HttpRoute) {
    let destinations: Vec<RouteDestination> =
        route.route.iter().map(|d| RouteDestination { destination: d.destination.clone(), weight: d.weight }).collect();
    if route.redirect.is_none() {
        check_destinations(errors, &format!("{at}.route"), &destinations);
    }
    check_duration(errors, format!("{at}.timeout"), &route.timeout);
    if let Some(retries) = &route.retries {
        if retries.attempts < 0 {
            errors.add(format!("{at}.retries.attempts"), format!("{} is negative", retries.attempts));
        }
        check_duration(errors, format!("{at}.retries.perTryTimeout"), &retries.per_try_timeout);
    }
    if let Some(fault) = &route.fault {
        if let Some(FaultDelay { fixed_delay, percentage, percent }) = &fault.delay {
            match fixed_delay {
                None => errors.add(format!("{at}.fault.delay.fixedDelay"), "is required"),
                some => check_duration(errors, format!("{at}.fault.delay.fixedDelay"), some),
            }
            check_percent(errors, format!("{at}.fault.delay.percentage"), percentage, *percent);
        }
        if let Some(FaultAbort { http_status, grpc_status, percentage, percent }) = &fault.abort {
            match (http_status, grpc_status) {
                (Some(status), _) if !(200..=599).contains(status) => {
                    errors.add(format!("{at}.fault.abort.httpStatus"), format!("{status} is not an HTTP status (200-599)"))
                }
                (None, None) => errors.add(format!("{at}.fault.abort.httpStatus"), "is required"),
                _ => {}
            }
            check_percent(errors, format!("{at}.fault.abort.percentage"), percentage, *percent);
        }
    }
    for (i, m) in route.matches.iter().enumerate() {
        let string_matches = m.uri.iter().map(|s| ("uri".to_string(), s)).chain(m.method.iter().map(|s| ("method".into(), s)));
        let headers = m.headers.iter().map(|(name, s)| (format!("headers.{name}"), s));
        for (name, s) in string_matches.chain(headers) {
            let set = [&s.exact, &s.prefix, &s.regex].iter().filter(|v| v.is_some()).count();
            if set > 1 {
                errors.add(format!("{at}.match[{i}].{name}"), "only one of exact, prefix, regex may be set");
            }
        }
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
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        errors.add("spec", "one of http, tcp, tls is required");
    }
    for (i, route) in spec.http.iter().enumerate() {
        check_http_route(&mut errors, &format!("spec.http[{i}]"), route);
    }
    for (i, route) in spec.tcp.iter().enumerate() {
        check_destinations(&mut errors, &format!("spec.tcp[{i}].route"), &route.route);
        for (j, m) in route.matches.iter().enumerate() {
            if let Some(port) = m.port
                && !(1..=65535).contains(&port)
            {
                errors.add(format!("spec.tcp[{i}].match[{j}].port"), format!("{port} is not a port"));
            }
        }
    }
    errors.0
}

pub fn destination_rule(spec: &DestinationRuleSpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    check_host(&mut errors, "spec.host".into(), &spec.host);
    let mut seen = std::collections::BTreeSet::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        if subset.name.is_empty() {
            errors.add(format!("spec.subsets[{i}].name"), "must not be empty");
        } else if !seen.insert(subset.name.as_str()) {
            errors.add(format!("spec.subsets[{i}].name"), format!("{:?} is defined twice", subset.name));
        }
    }
    errors.0
}

pub fn authorization_policy(spec: &AuthorizationPolicySpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if let Some(action) = &spec.action
        && !matches!(action.as_str(), "ALLOW" | "DENY" | "AUDIT")
    {
        errors.add("spec.action", format!("{action:?} is not supported (ALLOW, DENY, AUDIT)"));
    }
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        for (j, to) in rule.to.iter().enumerate() {
            for (k, port) in to.operation.ports.iter().chain(&to.operation.not_ports).enumerate() {
                if port.parse::<u16>().is_err() {
                    errors.add(format!("spec.rules[{i}].to[{j}].operation.ports[{k}]"), format!("{port:?} is not a port"));
                }
            }
        }
        if !rule.when.is_empty() {
            errors.add(format!("spec.rules[{i}].when"), "conditions are not supported yet");
        }
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
        for bad in ["", "abc", "5", "1.5 s", "-1s", "s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_too_long_are_errors_not_panics() {
        // Found by fuzz/config_yaml: a perTryTimeout of 130 digits of milliseconds panicked the controller.
        let huge = format!("3{}ms", "4".repeat(130));
        for text in [huge.as_str(), "99999999999999999999h", "18446744073709551616s"] {
            assert_eq!(parse_duration(text), Err(format!("{text:?} is too long a duration")));
        }
        assert_eq!(
            vs(&format!("hosts: [r]\nhttp: [{{retries: {{attempts: 1, perTryTimeout: {huge}}}, route: [{{destination: {{host: r}}}}]}}]")),
            [format!("spec.http[0].retries.perTryTimeout: {huge:?} is too long a duration")]
        );
        assert_eq!(duration_ms(&huge), None);
    }

    #[test]
    fn virtual_service_errors_name_the_field() {
        assert_eq!(vs("hosts: [r]\nhttp: [{route: [{destination: {host: r}}]}]"), Vec::<String>::new());
        assert_eq!(
            vs("hosts: [r]\nhttp: [{route: [{destination: {host: r, subset: v1}, weight: 80}, {destination: {host: r}, weight: 10}]}]"),
            ["spec.http[0].route: weights sum to 90, not 100"]
        );
        assert_eq!(
            vs("hosts: [r]\nhttp: [{timeout: soon, route: [{destination: {host: r}}]}]"),
            ["spec.http[0].timeout: \"soon\" is not a duration (e.g. 1.5s, 300ms)"]
        );
        assert_eq!(
            vs("hosts: [r]\nhttp: [{route: [{destination: {host: r}}], fault: {abort: {httpStatus: 700}}}]"),
            ["spec.http[0].fault.abort.httpStatus: 700 is not an HTTP status (200-599)"]
        );
        assert_eq!(vs("hosts: []\ntcp: [{route: [{destination: {host: r}}]}]"), ["spec.hosts: at least one host is required"]);
        assert_eq!(vs("hosts: [r]\nhttp: [{route: [{destination: {host: r}, weight: 50}]}]"), ["spec.http[0].route: weights sum to 50, not 100"]);
    }

    #[test]
    fn bookinfo_samples_are_valid() {
        let Some(dir) = crate::bookinfo_samples() else {
            return eprintln!("SKIPPED: no conformance data");
        };
        let state = crate::cluster::ClusterState::from_dir(&dir).unwrap();
        assert!(state.virtual_services.len() >= 6 && state.destination_rules.len() >= 4);
        for v in &state.virtual_services {
            assert_eq!(virtual_service(&v.spec), Vec::new(), "{:?}", v.metadata.name);
        }
        for d in &state.destination_rules {
            assert_eq!(destination_rule(&d.spec), Vec::new(), "{:?}", d.metadata.name);
        }
    }
}
