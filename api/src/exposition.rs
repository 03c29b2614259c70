//! Prometheus' text exposition format (0.0.4) from OpenMetrics, for the agent's and the controller's
//! scrape endpoints: prometheus-client writes OpenMetrics, whose counter families are named without
//! `_total` and which has `# UNIT` and `# EOF` lines; Prometheus' older format — what Envoy's
//! `/stats/prometheus` serves and `promtool check metrics` reads — names the family with `_total`.

/// The content type of [`open_metrics_to_prometheus`]'s output.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `text` (OpenMetrics) in Prometheus' text format: counter families renamed with `_total`, `# UNIT` and `# EOF`
/// dropped, `unknown` types written `untyped`; samples unchanged.
pub fn open_metrics_to_prometheus(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len() + counters.len() * 16);
    for line in text.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta.and_then(|(prefix, rest)| rest.split_once(' ').map(|(name, tail)| (prefix, name, tail))) {
            Some((prefix, name, tail)) if counters.contains(name) => {
                out.push_str(&format!("{prefix}{name}_total {tail}\n"));
            }
            Some((prefix, name, "unknown")) if prefix == "# TYPE " => out.push_str(&format!("{prefix}{name} untyped\n")),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn open_metrics_counters_become_prometheus_counters() {
        let open = "# HELP istio_requests Requests.\n# TYPE istio_requests counter\nistio_requests_total{a=\"b\"} 3\n\
            # HELP d Durations.\n# TYPE d histogram\n# UNIT d milliseconds\nd_sum 1.0\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        let text = super::open_metrics_to_prometheus(open);
        assert_eq!(
            text,
            "# HELP istio_requests_total Requests.\n# TYPE istio_requests_total counter\nistio_requests_total{a=\"b\"} 3\n\
             # HELP d Durations.\n# TYPE d histogram\nd_sum 1.0\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}

