//! `cargo bench -p warren-api --bench decision` (also run by `cargo xtask bench authz`): the time to authorize
//! one connection against 100 AuthorizationPolicies on a workload (one rule each, as Istio's tasks write
//! them: principals, namespaces, ipBlocks, ports, conditions) — the worst case, where every DENY policy is
//! evaluated and misses and only the last ALLOW policy matches. Criterion measures the mean; a fixed run of
//! timed single decisions gives p50/p99 (target: p99 ≤ 1 µs), written to target/bench-authz-decision.md.
use std::{
    hint::black_box,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::Criterion;
use warren_api::{
    authz::{Connection, Policy, WorkloadPolicies},
    tables::Origin,
    workloads::Pod,
};

const POLICIES: usize = 100;
const TIMED: usize = 200_000;

/// 50 DENY policies (principals, namespaces, ipBlocks, ports, conditions that the client does not match)
/// and 50 ALLOW policies of which only the last admits the client.
fn policies() -> Vec<Arc<Policy>> {
    (0..POLICIES)
        .map(|i| {
            let deny = i < POLICIES / 2;
            let matching = i == POLICIES - 1;
            let principal =
                if matching { "cluster.local/ns/default/sa/sleep".to_string() } else { format!("cluster.local/ns/team-{i}/sa/*") };
            let rules = serde_json::json!([{
                "index": 0,
                "from": [
                    {"principals": [principal, format!("*/sa/robot-{i}")], "notNamespaces": [format!("quarantine-{i}")]},
                    {"ipBlocks": [format!("172.{}.0.0/16", 16 + i % 16)], "namespaces": [format!("ns-{i}")]}
                ],
                "to": [{"ports": [9080, 9090 + i as u16]}],
                "when": [{"key": "destination.port", "notValues": [22]}, {"key": "source.ip", "notValues": [format!("192.0.2.{i}/32")]}]
            }]);
            Arc::new(Policy {
                origin: Origin::new("AuthorizationPolicy", "default", &format!("p{i:03}"), Some(1)),
                action: if deny { warren_api::authz::Action::Deny } else { warren_api::authz::Action::Allow },
                rules: serde_json::from_value(if deny { deny_rules(i) } else { rules }).unwrap(),
                ..Default::default()
            })
        })
        .collect()
}

/// A DENY rule the client misses: on identity (other teams' principals, other namespaces) or on source
/// block, with the port it guards.
fn deny_rules(i: usize) -> serde_json::Value {
    match i % 3 {
        0 => {
            serde_json::json!([{"index": 0, "from": [{"principals": [format!("cluster.local/ns/team-{i}/sa/*"), format!("cluster.local/ns/default/sa/robot-{i}")]}]}])
        }
        1 => {
            serde_json::json!([{"index": 0, "from": [{"namespaces": [format!("ns-{i}"), format!("*-{i}")]}], "to": [{"ports": [9080]}]}])
        }
        _ => {
            serde_json::json!([{"index": 0, "from": [{"ipBlocks": [format!("172.{}.{}.0/24", 16 + i % 16, i)]}], "when": [{"key": "destination.port", "values": [9080, 8080]}]}])
        }
    }
}

fn workload() -> Pod {
    serde_json::from_value(
        serde_json::json!({"name": "httpbin", "namespace": "default", "uid": "u", "ips": ["10.244.0.9"]}),
    )
    .unwrap()
}

fn main() {
    let set = WorkloadPolicies::for_workload(&policies(), &workload());
    assert_eq!(set.deny.len() + set.allow.len(), POLICIES);
    let client: IpAddr = "10.244.1.7".parse().unwrap();
    let destination: SocketAddr = "10.244.0.9:9080".parse().unwrap();
    let identity = "spiffe://cluster.local/ns/default/sa/sleep";
    let decide = || set.evaluate(black_box(&Connection::new(client, Some(identity), destination)));
    assert!(decide().allowed, "the last ALLOW policy admits the client");
    let other = Connection::new(client, Some("spiffe://cluster.local/ns/default/sa/other"), destination);
    assert!(!set.evaluate(&other).allowed, "control: another identity is denied");

    let mut criterion = Criterion::default().configure_from_args().warm_up_time(Duration::from_secs(1));
    criterion.bench_function("authorize one connection against 100 policies", |b| b.iter(decide));
    criterion.bench_function("authorize one connection, no policy", |b| {
        let none = WorkloadPolicies::default();
        b.iter(|| none.evaluate(black_box(&Connection::new(client, Some(identity), destination))))
    });
    criterion.final_summary();

    // Single decisions, timed one by one (the clock's own cost, ~20-40 ns, is included: an upper bound).
    let mut samples: Vec<Duration> = Vec::with_capacity(TIMED);
    for _ in 0..TIMED {
        let started = Instant::now();
        black_box(decide());
        samples.push(started.elapsed());
    }
    samples.sort();
    let at = |q: usize| samples[samples.len() * q / 100].as_secs_f64() * 1e9;
    let (p50, p99) = (at(50), at(99));
    let report = format!(
        "# Authorization decision (100 policies, worst case)\n\n| p50 | p99 | p99 target |\n|---|---|---|\n| {p50:.0} ns | {p99:.0} ns | 1000 ns |\n"
    );
    println!("\n{report}");
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-authz-decision.md");
    let _ = std::fs::write(target, &report);
}
