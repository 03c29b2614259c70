use std::net::SocketAddr;

use super::*;

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const OTHER: &str = "spiffe://cluster.local/ns/foo/sa/other";

fn policy(name: &str, action: Action, rules: Vec<Rule>) -> Arc<Policy> {
    Arc::new(Policy {
        origin: Origin::new("AuthorizationPolicy", "default", name, Some(1)),
        action,
        rules,
        ..Default::default()
    })
}

fn rule(json: serde_json::Value) -> Rule {
    serde_json::from_value(json).unwrap()
}

fn set(policies: &[Arc<Policy>]) -> WorkloadPolicies {
    let pod = Pod {
        name: "httpbin".into(),
        namespace: "default".into(),
        uid: "u".into(),
        ips: vec![],
        labels: Default::default(),
        host_network: false,
        service_account: "httpbin".into(),
        node: None,
        workload: None,
        locality: None,
    };
    WorkloadPolicies::for_workload(policies, &pod)
}

fn from(client: &str, identity: Option<&str>, port: u16) -> (IpAddr, Option<String>, SocketAddr) {
    (client.parse().unwrap(), identity.map(String::from), SocketAddr::new("10.244.0.9".parse().unwrap(), port))
}

fn allowed(set: &WorkloadPolicies, (client, identity, destination): (IpAddr, Option<String>, SocketAddr)) -> bool {
    set.evaluate(&Connection::new(client, identity.as_deref(), destination)).allowed
}

#[test]
fn no_policy_allows_and_an_allow_policy_without_rules_allows_nothing() {
    let c = from("10.0.0.1", Some(SLEEP), 80);
    assert!(allowed(&set(&[]), c.clone()));
    assert_eq!(set(&[]).evaluate(&Connection::new(c.0, None, c.2)).by, DecidedBy::NoPolicy);
    let deny_all = set(&[policy("deny-all", Action::Allow, vec![])]);
    assert!(!allowed(&deny_all, c.clone()));
    assert_eq!(deny_all.evaluate(&Connection::new(c.0, None, c.2)).by, DecidedBy::NoAllowMatched);
    // An empty rule matches everything.
    assert!(allowed(&set(&[policy("allow-all", Action::Allow, vec![Rule::default()])]), c));
}

#[test]
fn principals_exact_prefix_suffix_and_presence() {
    let only = |principal: &str| {
        set(&[policy("p", Action::Allow, vec![rule(json!({"index": 0, "from": [{"principals": [principal]}]}))])])
    };
    let exact = only("cluster.local/ns/default/sa/sleep");
    assert!(allowed(&exact, from("10.0.0.1", Some(SLEEP), 80)));
    assert!(!allowed(&exact, from("10.0.0.1", Some(OTHER), 80)), "another identity");
    assert!(!allowed(&exact, from("10.0.0.1", None, 80)), "a plaintext client has no principal");
    assert!(allowed(&only("cluster.local/ns/default/*"), from("10.0.0.1", Some(SLEEP), 80)));
    assert!(!allowed(&only("cluster.local/ns/default/*"), from("10.0.0.1", Some(OTHER), 80)));
    assert!(allowed(&only("*/sa/other"), from("10.0.0.1", Some(OTHER), 80)));
    assert!(allowed(&only("*"), from("10.0.0.1", Some(OTHER), 80)), "presence: any authenticated client");
    assert!(!allowed(&only("*"), from("10.0.0.1", None, 80)), "…but not a plaintext one");
}

#[test]
fn namespaces_ip_blocks_and_their_negations() {
    let ns = set(&[policy("p", Action::Allow, vec![rule(json!({"index": 0, "from": [{"namespaces": ["foo"]}]}))])]);
    assert!(allowed(&ns, from("10.0.0.1", Some(OTHER), 80)));
    assert!(!allowed(&ns, from("10.0.0.1", Some(SLEEP), 80)));
    let deny_block =
        set(&[policy("p", Action::Deny, vec![rule(json!({"index": 0, "from": [{"ipBlocks": ["10.1.0.0/16"]}]}))])]);
    assert!(!allowed(&deny_block, from("10.1.2.3", Some(SLEEP), 80)));
    assert!(allowed(&deny_block, from("10.2.2.3", Some(SLEEP), 80)));
    let not_principal = set(&[policy(
        "p",
        Action::Deny,
        vec![rule(json!({"index": 0, "from": [{"notPrincipals": ["cluster.local/ns/default/sa/sleep"]}]}))],
    )]);
    assert!(allowed(&not_principal, from("10.0.0.1", Some(SLEEP), 80)));
    assert!(!allowed(&not_principal, from("10.0.0.1", Some(OTHER), 80)));
    assert!(!allowed(&not_principal, from("10.0.0.1", None, 80)), "no principal is not sleep's: denied");
}

#[test]
fn ports_and_conditions() {
    let only_9080 = set(&[policy("p", Action::Allow, vec![rule(json!({"index": 0, "to": [{"ports": [9080]}]}))])]);
    assert!(allowed(&only_9080, from("10.0.0.1", None, 9080)));
    assert!(!allowed(&only_9080, from("10.0.0.1", None, 9090)));
    let not_ports = set(&[policy("p", Action::Deny, vec![rule(json!({"index": 0, "to": [{"notPorts": [22]}]}))])]);
    assert!(allowed(&not_ports, from("10.0.0.1", None, 22)) && !allowed(&not_ports, from("10.0.0.1", None, 23)));
    let when = set(&[policy(
        "p",
        Action::Allow,
        vec![rule(json!({"index": 3, "when": [
            {"key": "source.namespace", "values": ["default"]},
            {"key": "destination.port", "notValues": [9090]},
            {"key": "source.ip", "values": ["10.0.0.0/8"]}
        ]}))],
    )]);
    assert!(allowed(&when, from("10.0.0.1", Some(SLEEP), 80)));
    assert!(!allowed(&when, from("10.0.0.1", Some(OTHER), 80)), "namespace foo");
    assert!(!allowed(&when, from("10.0.0.1", Some(SLEEP), 9090)), "port 9090");
    assert!(!allowed(&when, from("192.168.0.1", Some(SLEEP), 80)), "outside 10/8");
    let decision =
        when.evaluate(&Connection::new("10.0.0.1".parse().unwrap(), Some(SLEEP), "10.244.0.9:80".parse().unwrap()));
    assert_eq!(
        (decision.policy_name(), decision.action_name(), decision.id()),
        ("default/p".into(), "ALLOW", decision_id("default/p", 3))
    );
}

#[test]
fn deny_comes_first_and_audit_never_decides() {
    let audit = policy("audit", Action::Audit, vec![Rule::default()]);
    let allow = policy("allow", Action::Allow, vec![Rule::default()]);
    let deny = policy("deny", Action::Deny, vec![rule(json!({"index": 1, "to": [{"ports": [80]}]}))]);
    let policies = set(&[audit.clone(), allow, deny]);
    let c = from("10.0.0.1", None, 80);
    let connection = Connection::new(c.0, None, c.2);
    assert_eq!(policies.evaluate(&connection).by, DecidedBy::Rule { policy: policies.deny[0].clone(), rule: 1 });
    assert_eq!(
        policies.audits(&connection).map(|(p, r)| (p.name(), r)).collect::<Vec<_>>(),
        [("default/audit".to_string(), 0)]
    );
    assert!(allowed(&set(&[audit]), from("10.0.0.1", None, 80)), "AUDIT alone allows");
    let names: Vec<_> = policies.in_evaluation_order().map(|p| p.origin.name.as_str()).collect();
    assert_eq!(names, ["deny", "allow", "audit"]);
}

#[test]
fn scope_root_namespace_and_selector() {
    let mut pod = Pod {
        name: "a".into(),
        namespace: "shop".into(),
        uid: "u".into(),
        ips: vec![],
        labels: [("app".to_string(), "reviews".to_string())].into(),
        host_network: false,
        service_account: "a".into(),
        node: None,
        workload: None,
        locality: None,
    };
    let mut p =
        Policy { origin: Origin::new("AuthorizationPolicy", "istio-system", "mesh", None), ..Default::default() };
    assert!(!p.applies_to(&pod), "another namespace, not mesh-wide");
    p.mesh_wide = true;
    assert!(p.applies_to(&pod));
    p.selector = Some([("app".to_string(), "ratings".to_string())].into());
    assert!(!p.applies_to(&pod));
    pod.labels.insert("app".into(), "ratings".into());
    assert!(p.applies_to(&pod));
}

#[test]
fn strings_and_prefixes_parse_as_istio_writes_them() {
    assert_eq!(StringMatch::parse("*"), StringMatch::Present);
    assert_eq!(StringMatch::parse("a*"), StringMatch::Prefix("a".into()));
    assert_eq!(StringMatch::parse("*a"), StringMatch::Suffix("a".into()));
    assert!(!StringMatch::parse("*").matches(Some("")));
    let net: IpNet = "10.1.2.3/16".parse().unwrap();
    assert_eq!(net.to_string(), "10.1.0.0/16", "host bits cleared");
    assert_eq!("10.1.2.3".parse::<IpNet>().unwrap().prefix_len(), 32);
    assert_eq!("2001:db8::1".parse::<IpNet>().unwrap().prefix_len(), 128);
    assert!(
        "10.0.0.0/33".parse::<IpNet>().is_err()
            && "10.0.0/8".parse::<IpNet>().is_err()
            && "x".parse::<IpNet>().is_err()
    );
    assert!(!net.contains(&"::1".parse().unwrap()), "families differ");
    assert!(
        "10.0.0.0/8".parse::<IpNet>().unwrap().contains_net(&net) && !net.contains_net(&"10.0.0.0/8".parse().unwrap())
    );
}

/// The kernel table must decide exactly as [`WorkloadPolicies::evaluate`] does for every plaintext client:
/// checked by looking addresses up the way sk_lookup does (exact port, else port 0; longest prefix).
#[test]
fn the_plaintext_table_decides_like_evaluation() {
    let destination: IpAddr = "10.244.0.9".parse().unwrap();
    let policies = set(&[
        policy(
            "deny-lab",
            Action::Deny,
            vec![rule(json!({"index": 0, "from": [{"ipBlocks": ["10.1.0.0/16"], "notIpBlocks": ["10.1.7.0/24"]}]}))],
        ),
        policy("allow-web", Action::Allow, vec![rule(json!({"index": 0, "to": [{"ports": [9080, 8080]}]}))]),
        policy(
            "allow-admin",
            Action::Allow,
            vec![rule(json!({"index": 2, "from": [{"ipBlocks": ["10.9.0.0/16"]}], "to": [{"ports": [9090]}]}))],
        ),
        policy("allow-principal", Action::Allow, vec![rule(json!({"index": 0, "from": [{"principals": ["*"]}]}))]),
    ]);
    let table = plaintext_table(&policies, &[destination]);
    let lookup = |client: IpAddr, port: u16| -> Option<(bool, u32)> {
        let best = |port: u16| {
            table
                .iter()
                .filter(|e| e.destination == destination && e.port == port && e.source.contains(&client))
                .max_by_key(|e| e.source.prefix_len())
                .map(|e| (e.allowed, e.decision_id))
        };
        best(port).or_else(|| best(0))
    };
    for client in ["10.1.2.3", "10.1.7.1", "10.9.0.1", "10.9.7.1", "192.168.1.1", "10.1.0.0"] {
        let client: IpAddr = client.parse().unwrap();
        for port in [9080, 8080, 9090, 22] {
            let decision = policies.evaluate(&Connection::new(client, None, SocketAddr::new(destination, port)));
            let kernel = lookup(client, port).unwrap_or((true, 0));
            assert_eq!(kernel.0, decision.allowed, "{client} → :{port}: {decision:?} vs table {table:#?}");
            if !decision.allowed {
                assert_eq!(kernel.1, decision.id(), "{client} → :{port}: the decision is named");
            }
        }
    }
    // Control: the table is not trivially "allow" — and without policies it is empty.
    assert!(table.iter().any(|e| !e.allowed) && table.iter().any(|e| e.allowed));
    assert!(plaintext_table(&set(&[]), &[destination]).is_empty());
    // Only the AUDIT policy: nothing for the kernel to refuse.
    assert!(plaintext_table(&set(&[policy("a", Action::Audit, vec![Rule::default()])]), &[destination]).is_empty());
}

#[test]
fn a_deny_on_one_port_is_one_entry() {
    let destination: IpAddr = "10.244.0.9".parse().unwrap();
    let policies = set(&[policy("p", Action::Deny, vec![rule(json!({"index": 0, "to": [{"ports": [9090]}]}))])]);
    let table = plaintext_table(&policies, &[destination]);
    assert_eq!(
        table,
        [PlaintextVerdict {
            destination,
            port: 9090,
            source: IpNet::any_of(&destination),
            allowed: false,
            decision_id: decision_id("default/p", 0)
        }]
    );
}

use serde_json::json;

/// The index must decide exactly as checking every rule does — same verdict, same deciding rule — over many
/// generated policy sets and connections (a fixed-seed generator: reproducible).
#[test]
fn the_index_decides_like_checking_every_rule() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let principals = ["cluster.local/ns/a/sa/x", "cluster.local/ns/a/*", "*/sa/y", "*", "cluster.local/ns/b/sa/y", "c*"];
    let namespaces = ["a", "b", "*", "a*", "*b"];
    let blocks = ["10.0.0.0/8", "10.1.0.0/16", "192.168.0.1"];
    let identities = [None, Some("spiffe://cluster.local/ns/a/sa/x"), Some("spiffe://cluster.local/ns/b/sa/y"), Some("spiffe://other/ns/a/sa/y")];
    let clients = ["10.1.2.3", "10.9.9.9", "192.168.0.1", "172.16.0.1"];
    let mut checked = 0;
    for round in 0..400 {
        let mut policies = Vec::new();
        for p in 0..1 + next(6) {
            let action = [Action::Allow, Action::Deny, Action::Audit][next(3)];
            let rules: Vec<Rule> = (0..next(3))
                .map(|index| {
                    let mut rule = Rule { index: index as u32, ..Default::default() };
                    for _ in 0..next(3) {
                        let mut source = Source::default();
                        let pick = |n: usize, pool: &[&str], next: &mut dyn FnMut(usize) -> usize| -> Vec<String> {
                            (0..n).map(|_| pool[next(pool.len())].to_string()).collect()
                        };
                        let n = next(3);
                        source.principals = pick(n, &principals, &mut next).iter().map(|v| StringMatch::parse(v)).collect();
                        let n = next(2);
                        source.not_principals = pick(n, &principals, &mut next).iter().map(|v| StringMatch::parse(v)).collect();
                        let n = next(3);
                        source.namespaces = pick(n, &namespaces, &mut next).iter().map(|v| StringMatch::parse(v)).collect();
                        let n = next(2);
                        source.ip_blocks = pick(n, &blocks, &mut next).iter().map(|v| v.parse().unwrap()).collect();
                        rule.from.push(source);
                    }
                    if next(2) == 0 {
                        rule.to.push(Operation { ports: vec![80, 9080][..1 + next(2)].to_vec(), not_ports: vec![], ..Default::default() });
                    }
                    rule
                })
                .collect();
            policies.push(policy(&format!("p{round}-{p}"), action, rules));
        }
        let set = set(&policies);
        for identity in identities {
            for client in clients {
                for port in [80, 9080, 22] {
                    let c = Connection::new(client.parse().unwrap(), identity, SocketAddr::new("10.244.0.9".parse().unwrap(), port));
                    assert_eq!(set.evaluate(&c), set.evaluate_every_rule(&c), "{policies:#?}\n{c:?}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 10_000);
}

/// Decides a GET or POST of `path` with `headers` on an HBONE connection from sleep.
fn request_allowed(set: &WorkloadPolicies, method: &str, path: &str, headers: &[(&str, &str)]) -> bool {
    let header = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let request = Request { method, host: "httpbin:8000", path, header: &header };
    let connection = Connection::new("10.0.0.1".parse().unwrap(), Some(SLEEP), "10.244.0.9:8000".parse().unwrap());
    set.evaluate(&connection.with_request(&request)).allowed
}

#[test]
fn request_attributes_decide_per_request_and_fail_closed_without_one() {
    let get_only = set(&[policy("get", Action::Allow, vec![rule(json!({"index": 0, "to": [{"methods": ["GET"]}]}))])]);
    assert!(request_allowed(&get_only, "GET", "/ip", &[]));
    assert!(!request_allowed(&get_only, "POST", "/ip", &[]), "control: another method");
    assert!(!allowed(&get_only, from("10.0.0.1", Some(SLEEP), 8000)), "no request (a TCP port): the ALLOW rule matches nothing");
    let deny_admin = set(&[policy(
        "admin",
        Action::Deny,
        vec![rule(json!({"index": 0, "to": [{"paths": ["/admin*"]}], "when": [{"key": "request.headers", "name": "x-user", "notValues": ["root"]}]}))],
    )]);
    assert!(!request_allowed(&deny_admin, "GET", "/admin/x", &[("x-user", "bob")]));
    assert!(request_allowed(&deny_admin, "GET", "/admin/x", &[("x-user", "root")]), "the header condition");
    assert!(request_allowed(&deny_admin, "GET", "/status", &[]), "another path");
    assert!(!allowed(&deny_admin, from("10.0.0.1", Some(SLEEP), 8000)), "no request: the DENY rule applies without them");
    assert!(get_only.need_requests() && deny_admin.need_requests() && !set(&[]).need_requests());
}
