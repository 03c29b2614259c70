//! Connection faults, a Warren extension Istio has no field for: annotations on a VirtualService make a
//! share of connects to its hosts' services fail (ECONNREFUSED), or wait before they reach the upstream —
//! decided in the kernel (connect4/6), so an aborted connect never reaches the agent. Annotations keep the
//! object plain Istio YAML (Istio ignores them) with the routes it already carries; see docs/traffic-management.md.
//!
//! - `fault.warren.dev/connect-abort-percent: "30"`
//! - `fault.warren.dev/connect-delay: "200ms"`, with `fault.warren.dev/connect-delay-percent` (100 when
//!   absent).
use std::collections::BTreeMap;

use warren_api::tables::ConnectFault;

use crate::validate::{FieldError, parse_duration};

pub const ABORT_PERCENT: &str = "fault.warren.dev/connect-abort-percent";
pub const DELAY: &str = "fault.warren.dev/connect-delay";
pub const DELAY_PERCENT: &str = "fault.warren.dev/connect-delay-percent";
/// The prefix every connection-fault annotation has (others under it are misspellings).
const PREFIX: &str = "fault.warren.dev/";

fn field(key: &str) -> String {
    format!("metadata.annotations[{key:?}]")
}

fn percent(annotations: &BTreeMap<String, String>, key: &str, errors: &mut Vec<FieldError>) -> Option<f64> {
    let text = annotations.get(key)?;
    match text.trim().parse::<f64>() {
        Ok(value) if (0.0..=100.0).contains(&value) => Some(value),
        _ => {
            errors.push(FieldError { field: field(key), reason: format!("{text:?} is not a percentage between 0 and 100") });
            None
        }
    }
}

/// The connection fault the annotations describe (`None` when they name none), or every error, each
/// naming its annotation.
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Option<ConnectFault>, Vec<FieldError>> {
    let mut errors = Vec::new();
    for key in annotations.keys().filter(|k| k.starts_with(PREFIX)) {
        if ![ABORT_PERCENT, DELAY, DELAY_PERCENT].contains(&key.as_str()) {
            let reason = format!("not a Warren annotation (known: {ABORT_PERCENT}, {DELAY}, {DELAY_PERCENT})");
            errors.push(FieldError { field: field(key), reason });
        }
    }
    let abort_percent = percent(annotations, ABORT_PERCENT, &mut errors);
    let delay_percent = percent(annotations, DELAY_PERCENT, &mut errors);
    let delay = annotations.get(DELAY).and_then(|text| match parse_duration(text) {
        Ok(d) => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        Err(reason) => {
            errors.push(FieldError { field: field(DELAY), reason });
            None
        }
    });
    if delay_percent.is_some() && !annotations.contains_key(DELAY) {
        errors.push(FieldError { field: field(DELAY_PERCENT), reason: format!("needs {DELAY}") });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if abort_percent.is_none() && delay.is_none() {
        return Ok(None);
    }
    Ok(Some(ConnectFault {
        abort_percent: abort_percent.unwrap_or(0.0),
        delay_ms: delay.unwrap_or(0),
        delay_percent: if delay.is_some() { delay_percent.unwrap_or(100.0) } else { 0.0 },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn annotations_describe_aborts_and_delays() {
        assert_eq!(parse(&annotations(&[("other", "x")])), Ok(None));
        let fault = parse(&annotations(&[(ABORT_PERCENT, "30"), (DELAY, "200ms")])).unwrap().unwrap();
        assert_eq!(fault, ConnectFault { abort_percent: 30.0, delay_ms: 200, delay_percent: 100.0 });
        let errors = parse(&annotations(&[(ABORT_PERCENT, "130"), (DELAY, "soon"), ("fault.warren.dev/abort", "1")]))
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors.iter().any(|e| e.starts_with("metadata.annotations[\"fault.warren.dev/connect-abort-percent\"]: \"130\"")));
        assert!(errors.iter().any(|e| e.starts_with("metadata.annotations[\"fault.warren.dev/abort\"]: not a Warren annotation")));
    }
}
