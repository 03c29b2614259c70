//! warren-controller's own Prometheus metrics, read from its monitoring endpoint (`--monitoring-addr`) while
//! a directory mesh runs: the agent's push stream and its ACKed pushes, the compiled version, an invalid
//! VirtualService counted by kind (and uncounted once fixed), the agent's stream gone when it stops — and
//! the exposition accepted by `promtool check metrics`.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use warren_e2e::{directory_mesh, eventually, log_tail, namespace_yaml, pod_yaml, promtool};
use warren_testbed::{Controller, Testbed, http_get, require_privileges};

/// The value of the one series `name` whose labels include `labels`; `None` if the exposition has no such
/// series (so "0" and "not exposed" differ).
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, label_text) = series.split_once('{').unwrap_or((series, ""));
        let matches = metric == name && labels.iter().all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
        matches.then(|| value.parse().ok()).flatten()
    })
}

/// Waits until the series `name{labels}` satisfies `want`; its last value either way.
fn settles(controller: &Controller, name: &str, labels: &[(&str, &str)], want: impl Fn(f64) -> bool) -> Result<f64> {
    let mut last = None;
    let reached = eventually(Duration::from_secs(10), || {
        last = series(&controller.metrics().ok()?, name, labels);
        last.filter(|v| want(*v))
    });
    reached.with_context(|| format!("{name}{labels:?} is {last:?} after 10 s"))
}

const BAD_VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: default}\n\
    spec: {hosts: [web], http: [{route: [{destination: {host: web}, weight: -10}]}]}\n";

#[test]
fn the_controller_exports_its_push_compile_and_validation_metrics() -> Result<()> {
    require_privileges!(Ok(()));
    let bed = Testbed::new("controller-metrics")?;
    let node = bed.add_node("node-1")?;
    let web = node.add_pod("web", true)?;
    let dir = bed.state_dir().join("mesh-config");
    std::fs::create_dir_all(&dir)?;
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
        spec: {clusterIP: 10.96.3.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n";
    std::fs::write(dir.join("00-mesh.yaml"), format!("{}{service}{}", namespace_yaml("default"), pod_yaml(&web, "node-1", "app: web")))?;
    let (controller, agents) = directory_mesh(&bed, &dir, &[&node])?;
    let result = steps(&controller, &agents[0], &web, &dir);
    result.map_err(|e| {
        e.context(format!("agent:\n{}\n\ncontroller:\n{}", log_tail(&agents[0].log(), 30), log_tail(&controller.log(), 30)))
    })
}

fn steps(controller: &Controller, agent: &warren_testbed::Agent, web: &warren_testbed::Pod, dir: &std::path::Path) -> Result<()> {
    agent.wait_enrolled(web, true, Duration::from_secs(15))?;
    agent.wait_config(Duration::from_secs(15), |c| c.to_string().contains("default/web"))?;

    // The agent's stream is open and the version it holds was ACKed, with its send → ACK time.
    settles(controller, "warren_controller_connected_agents", &[], |v| v == 1.0)?;
    settles(controller, "warren_controller_pushes_total", &[("result", "ack")], |v| v >= 1.0)?;
    settles(controller, "warren_controller_push_duration_seconds_count", &[], |v| v >= 1.0)?;
    let text = controller.metrics()?;
    let version = series(&text, "warren_controller_config_version", &[]).context("config_version")?;
    let held = agent.config()?["version"].as_u64().context("the agent's version")?;
    ensure!(version == held as f64, "config_version {version}, the agent holds {held}");
    ensure!(series(&text, "warren_controller_compiles_total", &[("result", "ok")]).is_some_and(|v| v >= 1.0), "compiles: {text}");
    for result in ["nack", "error"] {
        ensure!(series(&text, "warren_controller_pushes_total", &[("result", result)]) == Some(0.0), "pushes {result}: {text}");
    }
    // A directory mesh's agents sign their workload certificates with the testbed's CA key themselves: the
    // controller's CA service (Kubernetes mode, TokenReview) is not running, so it issued none and refused
    // none. The counting is tested against an API server in controller/src/ca/server.rs.
    ensure!(series(&text, "warren_controller_certificates_issued_total", &[]) == Some(0.0), "certificates: {text}");
    let refused = series(&text, "warren_controller_certificate_requests_refused_total", &[("reason", "forbidden")]);
    ensure!(refused == Some(0.0), "refused: {text}");
    ensure!(http_get(&controller.monitoring_addr, "/ready")? == "ready\n", "/ready");
    let same = http_get(&controller.monitoring_addr, "/stats/prometheus")?;
    ensure!(same.contains("# TYPE warren_controller_pushes_total counter"), "/stats/prometheus serves the same: {same}");
    check_with_promtool(&text)?;

    // An invalid VirtualService (a negative weight): counted under its kind once the controller rejects it;
    // nothing else is. Control: none before.
    ensure!(series(&text, "warren_controller_invalid_objects", &[("kind", "VirtualService")]) == Some(0.0), "{text}");
    std::fs::write(dir.join(".10-vs.tmp"), BAD_VS)?;
    std::fs::rename(dir.join(".10-vs.tmp"), dir.join("10-vs.yaml"))?;
    settles(controller, "warren_controller_invalid_objects", &[("kind", "VirtualService")], |v| v == 1.0)?;
    ensure!(controller.log().contains("spec.http[0].route[0].weight: -10 is negative"), "the rejection is logged");
    let text = controller.metrics()?;
    for kind in ["DestinationRule", "Gateway", "ServiceEntry", "AuthorizationPolicy", "PeerAuthentication"] {
        ensure!(series(&text, "warren_controller_invalid_objects", &[("kind", kind)]) == Some(0.0), "{kind}: {text}");
    }
    // A gauge of the last validation, not a count of rejections: removed, it is 0 again.
    std::fs::remove_file(dir.join("10-vs.yaml"))?;
    settles(controller, "warren_controller_invalid_objects", &[("kind", "VirtualService")], |v| v == 0.0)?;

    // The agent stops: its stream is no longer counted.
    agent.stop();
    settles(controller, "warren_controller_connected_agents", &[], |v| v == 0.0)?;
    Ok(())
}

/// `promtool check metrics` on the exposition: it parses and has no finding at all; a malformed one fails
/// (the control). A missing promtool fails too (Debian's `prometheus` package; `cargo xtask setup`).
fn check_with_promtool(text: &str) -> Result<()> {
    ensure!(text.contains("# TYPE warren_controller_pushes_total counter"), "Prometheus' text format: {text}");
    let findings = promtool(text)?;
    ensure!(findings.is_empty(), "promtool check metrics: {findings:?}\n{text}");
    let broken = promtool("# TYPE x counter\nx_total{a=\"b} 1\n");
    ensure!(broken.is_err(), "control: a malformed exposition fails promtool: {broken:?}");
    Ok(())
}
