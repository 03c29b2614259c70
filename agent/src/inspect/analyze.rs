//! `warren-agent analyze`: what is wrong on one node's data plane, from what its agent holds — the
//! counterpart of `warren-controller analyze` (which checks the configuration itself). Each finding names
//! the object and what to do, with Warren's codes:
//!
//! | code | level | what |
//! |---|---|---|
//! | WAR0201 | Error | a pod that should be enrolled is not (and why) |
//! | WAR0202 | Error | the agent refused (NACKed) a pushed version: it serves an older one |
//! | WAR0203 | Warning | the push stream to the controller is down: the node serves its last version |
//! | WAR0204 | Warning | a service's route sends traffic to a service or subset with no endpoints (503 UH) |
//! | WAR0205 | Error | a gateway server is refused (fail closed) and why |
use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

use super::{ViewArgs, live, structured};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Level {
    Error,
    Warning,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub level: Level,
    pub code: &'static str,
    /// `Kind namespace/name`.
    pub object: String,
    pub text: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} [{}] ({}) {}", self.level, self.code, self.object, self.text)
    }
}

/// The findings for the agent `args` names (this node's, or `--node`'s), in scope; and whether any is an
/// error.
pub fn run(args: &ViewArgs) -> Result<(String, bool)> {
    let agent = args.agent();
    let config = live::fetch_from(&agent, "/config")?;
    let workloads = live::fetch_from(&agent, "/workloads")?;
    let mut findings = findings(&config, &workloads);
    findings.retain(|f| in_scope(&f.object, &args.scope));
    findings.sort_by(|a, b| (&a.level, &a.object).cmp(&(&b.level, &b.object)));
    let failed = findings.iter().any(|f| f.level == Level::Error);
    if let Some(text) = structured(&findings, args.output) {
        return Ok((text?, failed));
    }
    if findings.is_empty() {
        return Ok(("✔ No problems found on this node's data plane.\n".into(), false));
    }
    Ok((findings.iter().map(|f| format!("{f}\n")).collect(), failed))
}

/// `--pod` keeps the findings about that pod; `--namespace` those about objects of that namespace.
fn in_scope(object: &str, scope: &super::Scope) -> bool {
    let (kind, key) = object.split_once(' ').unwrap_or(("", object));
    match (kind, key.split_once('/')) {
        ("Pod", Some(_)) => scope.admits_pod(key),
        _ if scope.pod.is_some() => false,
        (_, Some((namespace, _))) => scope.namespace.as_deref().is_none_or(|n| n == namespace),
        (_, None) => scope.namespace.is_none(),
    }
}

pub fn findings(config: &Value, workloads: &Value) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |level, code, object: String, text: String| out.push(Finding { level, code, object, text });
    for pod in workloads.as_array().into_iter().flatten() {
        if let Some(error) = pod["error"].as_str() {
            add(Level::Error, "WAR0201", format!("Pod {}", text(&pod["pod"])), format!("not enrolled: {error}"));
        }
    }
    let push = &config["push"];
    if let Some(nack) = push["lastNack"].as_str() {
        let message = format!("the agent refused a pushed version and serves version {}: {nack}", text(&config["version"]));
        add(Level::Error, "WAR0202", format!("Controller {}", text(&push["controller"])), message);
    }
    if push.is_object() && push["connected"] != Value::Bool(true) {
        let message = format!("the push stream is down (serving version {}); the agent reconnects with backoff", text(&config["version"]));
        add(Level::Warning, "WAR0203", format!("Controller {}", text(&push["controller"])), message);
    }
    let services = config["services"].as_array().cloned().unwrap_or_default();
    let endpoints_of = |name: &str| services.iter().find(|s| s["name"] == name).and_then(|s| s["endpoints"].as_u64());
    for service in &services {
        for route in service["l4Routes"].as_array().into_iter().flatten() {
            for destination in route["destinations"].as_array().into_iter().flatten() {
                let target = text(&destination["service"]);
                // A subset's endpoints are not in the view: only a whole service with none is certain.
                if endpoints_of(&target) == Some(0) && destination["subset"].is_null() {
                    let message = format!("{} sends traffic to {target}, which has no endpoints: requests get 503 (UH)", text(&route["vip"]));
                    add(Level::Warning, "WAR0204", format!("Service {}", text(&service["name"])), message);
                }
            }
        }
    }
    for gateway in config["gateways"].as_array().into_iter().flatten() {
        for server in gateway["servers"].as_array().into_iter().flatten() {
            if let Some(reason) = server["refused"].as_str() {
                let message = format!("{} port {} on pod {}: refused — {reason}", text(&server["server"]), text(&server["port"]), text(&gateway["pod"]));
                add(Level::Error, "WAR0205", format!("Gateway {}", text(&server["gateway"])), message);
            }
        }
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_problem_is_one_finding_naming_its_object() {
        let config = json!({
            "version": 7,
            "push": {"controller": "10.0.0.1:15010", "connected": false, "lastNack": "service x: too many destinations"},
            "services": [
                {"name": "shop/web", "endpoints": 2, "l4Routes": [{"vip": "10.96.0.1:80", "destinations": [{"service": "shop/empty", "weight": 100}]}]},
                {"name": "shop/empty", "endpoints": 0, "l4Routes": []},
            ],
            "gateways": [{"pod": "istio-system/gw", "servers": [
                {"gateway": "shop/web", "server": "spec.servers[1]", "port": 9000, "refused": "TCP is not served"},
                {"gateway": "shop/web", "server": "spec.servers[0]", "port": 80, "refused": null},
            ]}],
        });
        let workloads = json!([{"pod": "shop/a", "error": "no process found"}, {"pod": "shop/b", "error": null}]);
        let found: Vec<String> = findings(&config, &workloads).iter().map(ToString::to_string).collect();
        assert_eq!(found, [
            "Error [WAR0201] (Pod shop/a) not enrolled: no process found",
            "Error [WAR0202] (Controller 10.0.0.1:15010) the agent refused a pushed version and serves version 7: service x: too many destinations",
            "Warning [WAR0203] (Controller 10.0.0.1:15010) the push stream is down (serving version 7); the agent reconnects with backoff",
            "Warning [WAR0204] (Service shop/web) 10.96.0.1:80 sends traffic to shop/empty, which has no endpoints: requests get 503 (UH)",
            "Error [WAR0205] (Gateway shop/web) spec.servers[1] port 9000 on pod istio-system/gw: refused — TCP is not served",
        ]);
        // Control: a healthy node has nothing to say.
        let healthy = json!({"version": 7, "push": {"controller": "c", "connected": true}, "services": [], "gateways": []});
        assert!(findings(&healthy, &json!([{"pod": "shop/b", "error": null}])).is_empty());
    }
}
