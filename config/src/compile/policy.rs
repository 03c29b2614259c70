//! AuthorizationPolicy → [`authz::Policy`], the typed model agents evaluate: values parsed once here
//! (principals and namespaces into matchers, CIDRs into prefixes, ports into numbers), never on the
//! connection path.
//!
//! Request attributes (hosts, methods, paths, `request.headers[…]` conditions) compile into the
//! operation and condition matchers the destination agent checks per request on HTTP ports (on a TCP
//! port, Istio's rule: an ALLOW rule naming them matches nothing, a DENY rule applies without them).
//!
//! What a rule says that the agent cannot check — JWT principals (`requestPrincipals`), conditions on
//! other keys — fails closed, and [`crate::support`] names each such field:
//! - an ALLOW rule that uses one matches nothing (it is left out; an ALLOW policy left without rules
//!   allows nothing, as in Istio);
//! - a DENY (or AUDIT) rule applies without it, on the rest of its match (denies more, never less);
//! - CUSTOM (external authorization, not supported) is enforced as DENY on its rules.
//!
//! A value that does not parse (validation refuses such a policy, so only a policy read around validation
//! gets here) is treated like an attribute the agent cannot check.
use kube::ResourceExt;
use warren_api::authz::{self, Action, Condition, IpNet, Operation, Rule, Source, StringMatch, Values};

use crate::{
    istio::{AuthorizationPolicy, AuthorizationRule, RuleCondition, RuleOperation, RuleSource},
    tables::Origin,
};

/// The condition keys the agent evaluates (and `request.headers[<name>]`, per request).
pub const CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

pub fn compile(ap: &AuthorizationPolicy, root_namespace: &str) -> authz::Policy {
    let namespace = ap.namespace().unwrap_or_default();
    let action = match ap.spec.action.as_deref() {
        Some("DENY" | "CUSTOM") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        _ => Action::Allow,
    };
    let rules = ap.spec.rules.iter().flatten().enumerate().filter_map(|(index, rule)| {
        let compiled = compile_rule(index as u32, rule);
        match action {
            Action::Allow => compiled.complete.then_some(compiled.rule),
            Action::Deny | Action::Audit => Some(compiled.rule),
        }
    });
    authz::Policy {
        origin: Origin::new("AuthorizationPolicy", &namespace, &ap.name_any(), ap.metadata.generation),
        mesh_wide: namespace == root_namespace,
        selector: ap.spec.selector.as_ref().map(|s| s.match_labels.clone()),
        action,
        rules: rules.collect(),
    }
}

/// A rule as far as the agent can check it; `complete`: nothing was left out.
struct Compiled {
    rule: Rule,
    complete: bool,
}

fn compile_rule(index: u32, rule: &AuthorizationRule) -> Compiled {
    let mut complete = rule.unknown.is_empty();
    let mut from = Vec::new();
    for f in &rule.from {
        complete &= f.unknown.is_empty();
        from.push(source(&f.source, &mut complete));
    }
    let mut to = Vec::new();
    for t in &rule.to {
        complete &= t.unknown.is_empty();
        to.push(operation(&t.operation, &mut complete));
    }
    let when = rule.when.iter().filter_map(|c| condition(c, &mut complete)).collect();
    Compiled { rule: Rule { index, from, to, when }, complete }
}

/// Parses every value of one field; on any value that does not parse, the field is left out (unset) and
/// the rule marked incomplete.
fn parsed<T>(values: &[String], parse: impl Fn(&str) -> Option<T>, complete: &mut bool) -> Vec<T> {
    match values.iter().map(|v| parse(v)).collect::<Option<Vec<T>>>() {
        Some(parsed) => parsed,
        None => {
            *complete = false;
            Vec::new()
        }
    }
}

fn strings(values: &[String], complete: &mut bool) -> Vec<StringMatch> {
    parsed(values, |v| Some(StringMatch::parse(v)), complete)
}

fn nets(values: &[String], complete: &mut bool) -> Vec<IpNet> {
    parsed(values, |v| v.parse().ok(), complete)
}

fn ports(values: &[String], complete: &mut bool) -> Vec<u16> {
    parsed(values, |v| v.parse().ok(), complete)
}

fn source(s: &RuleSource, complete: &mut bool) -> Source {
    // JWT principals need the request's token, which Warren does not validate yet.
    *complete &= s.request_principals.is_empty() && s.not_request_principals.is_empty() && s.unknown.is_empty();
    Source {
        principals: strings(&s.principals, complete),
        not_principals: strings(&s.not_principals, complete),
        namespaces: strings(&s.namespaces, complete),
        not_namespaces: strings(&s.not_namespaces, complete),
        ip_blocks: nets(&s.ip_blocks, complete),
        not_ip_blocks: nets(&s.not_ip_blocks, complete),
        remote_ip_blocks: nets(&s.remote_ip_blocks, complete),
        not_remote_ip_blocks: nets(&s.not_remote_ip_blocks, complete),
    }
}

fn operation(o: &RuleOperation, complete: &mut bool) -> Operation {
    *complete &= o.unknown.is_empty();
    // Hosts match case-insensitively: the matchers are lower-case, as the agent lower-cases the Host.
    let hosts = |values: &[String]| values.iter().map(|h| StringMatch::parse(&h.to_ascii_lowercase())).collect();
    Operation {
        ports: ports(&o.ports, complete),
        not_ports: ports(&o.not_ports, complete),
        hosts: hosts(&o.hosts),
        not_hosts: hosts(&o.not_hosts),
        methods: strings(&o.methods, complete),
        not_methods: strings(&o.not_methods, complete),
        paths: strings(&o.paths, complete),
        not_paths: strings(&o.not_paths, complete),
    }
}

/// `request.headers[name]` → the header's lower-case name.
fn request_header(key: &str) -> Option<String> {
    let name = key.strip_prefix("request.headers[")?.strip_suffix(']')?;
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

/// The condition, when its key is one the agent evaluates and its values parse.
fn condition(c: &RuleCondition, complete: &mut bool) -> Option<Condition> {
    let mut ok = c.unknown.is_empty();
    let condition = {
        let ok = &mut ok;
        let (values, not_values) = (&c.values, &c.not_values);
        match c.key.as_str() {
            "source.ip" => Some(Condition::SourceIp(values_of(values, not_values, nets, ok))),
            "remote.ip" => Some(Condition::RemoteIp(values_of(values, not_values, nets, ok))),
            "source.namespace" => Some(Condition::SourceNamespace(values_of(values, not_values, strings, ok))),
            "source.principal" => Some(Condition::SourcePrincipal(values_of(values, not_values, strings, ok))),
            "destination.ip" => Some(Condition::DestinationIp(values_of(values, not_values, nets, ok))),
            "destination.port" => Some(Condition::DestinationPort(values_of(values, not_values, ports, ok))),
            "connection.sni" => Some(Condition::ConnectionSni(values_of(values, not_values, strings, ok))),
            key => request_header(key).map(|name| {
                Condition::RequestHeader(authz::HeaderCondition { name, values: values_of(values, not_values, strings, ok) })
            }),
        }
    };
    if condition.is_none() || !ok {
        *complete = false;
        return None;
    }
    condition
}

fn values_of<T>(
    values: &[String],
    not_values: &[String],
    parse: fn(&[String], &mut bool) -> Vec<T>,
    ok: &mut bool,
) -> Values<T> {
    Values { values: parse(values, ok), not_values: parse(not_values, ok) }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use warren_api::authz::{Connection, DecidedBy, WorkloadPolicies};

    fn policy(yaml: &str) -> (authz::Policy, Vec<String>) {
        let ap: AuthorizationPolicy = serde_yaml::from_str(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n{yaml}"
        ))
        .unwrap();
        let notices = crate::support::review("AuthorizationPolicy", &serde_json::to_value(&ap.spec).unwrap());
        (compile(&ap, "istio-system"), notices.iter().map(|n| n.field.clone()).collect())
    }

    fn decide(policy: authz::Policy, identity: Option<&str>, port: u16) -> bool {
        let pod: crate::workloads::Pod =
            serde_json::from_value(serde_json::json!({"name": "r", "namespace": "shop", "uid": "u"})).unwrap();
        let set = WorkloadPolicies::for_workload(&[std::sync::Arc::new(policy)], &pod);
        let destination: SocketAddr = SocketAddr::new("10.244.0.2".parse().unwrap(), port);
        set.evaluate(&Connection::new("10.244.0.3".parse().unwrap(), identity, destination)).allowed
    }

    const SLEEP: &str = "spiffe://cluster.local/ns/shop/sa/sleep";

    #[test]
    fn sources_operations_and_conditions_are_typed() {
        let (compiled, notices) = policy(
            "  rules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/sleep], ipBlocks: [10.0.0.0/8]}}]\n    to: [{operation: {ports: ['9080']}}]\n    when: [{key: destination.port, notValues: ['22']}]\n",
        );
        assert!(notices.is_empty(), "{notices:?}");
        let rule = &compiled.rules[0];
        assert_eq!(rule.from[0].principals, [StringMatch::Exact("cluster.local/ns/shop/sa/sleep".into())]);
        assert_eq!(rule.from[0].ip_blocks, ["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(rule.to[0].ports, [9080]);
        assert_eq!(rule.when, [Condition::DestinationPort(Values { values: vec![], not_values: vec![22] })]);
        assert!(decide(compiled.clone(), Some(SLEEP), 9080));
        assert!(!decide(compiled.clone(), Some("spiffe://cluster.local/ns/shop/sa/other"), 9080), "another principal");
        assert!(!decide(compiled, Some(SLEEP), 9090), "another port");
    }

    #[test]
    fn allow_rules_that_cannot_be_checked_match_nothing() {
        // Istio's require-jwt: only requests with a JWT principal. Not checked → allows nothing.
        let (compiled, notices) =
            policy("  action: ALLOW\n  rules: [{from: [{source: {requestPrincipals: ['*']}}]}]\n");
        assert!(compiled.rules.is_empty(), "the rule is left out: the ALLOW policy allows nothing");
        assert_eq!(notices, ["spec.rules[0].from[0].source.requestPrincipals"]);
        assert!(!decide(compiled, Some(SLEEP), 80));
        // Unknown condition keys too; the checkable rules beside them stay, with their index — request
        // attributes among them (decided per request).
        let (compiled, _) = policy(
            "  rules:\n  - to: [{operation: {methods: [GET], hosts: [Shop.Example]}}]\n  - when: [{key: 'request.auth.claims[iss]', values: [y]}]\n  - when: [{key: 'request.headers[X-User]', values: [y]}]\n",
        );
        assert_eq!(compiled.rules.iter().map(|r| r.index).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(compiled.rules[0].to[0].methods, [StringMatch::Exact("GET".into())]);
        assert_eq!(compiled.rules[0].to[0].hosts, [StringMatch::Exact("shop.example".into())], "hosts match case-insensitively");
        assert!(matches!(&compiled.rules[1].when[0], Condition::RequestHeader(h) if h.name == "x-user"));
        // Control: an attribute-free rule allows everything, and is kept.
        let (compiled, notices) = policy("  rules: [{}]\n");
        assert_eq!(compiled.rules.len(), 1);
        assert!(notices.is_empty());
        assert!(decide(compiled, None, 80));
    }

    #[test]
    fn deny_rules_apply_without_what_cannot_be_checked() {
        let (compiled, notices) = policy(
            "  action: DENY\n  rules: [{from: [{source: {namespaces: [dev], requestPrincipals: ['*']}}], to: [{operation: {ports: ['9090'], methods: [POST]}}], when: [{key: 'request.auth.claims[iss]', values: [x]}, {key: source.ip, values: [10.0.0.1]}]}]\n",
        );
        let rule = &compiled.rules[0];
        assert_eq!(rule.from[0].namespaces, [StringMatch::Exact("dev".into())], "the source keeps what is checkable");
        assert_eq!((rule.to[0].ports.as_slice(), rule.to[0].methods.len()), ([9090u16].as_slice(), 1), "methods are decided per request");
        assert_eq!(rule.when.len(), 1, "the JWT claim condition is left out, source.ip stays");
        assert_eq!(notices, ["spec.rules[0].from[0].source.requestPrincipals", "spec.rules[0].when[0].key"]);
        let (custom, notices) =
            policy("  action: CUSTOM\n  provider: {name: ext}\n  rules: [{to: [{operation: {paths: [/admin]}}]}]\n");
        assert_eq!(custom.action, Action::Deny, "CUSTOM is enforced as DENY");
        assert!(custom.rules[0].to[0].ports.is_empty() && custom.rules[0].to[0].paths.len() == 1, "…on its paths, every port");
        assert!(notices.contains(&"spec.action".to_string()), "{notices:?}");
        assert!(!decide(custom, Some(SLEEP), 80));
    }

    #[test]
    fn the_root_namespace_makes_a_policy_mesh_wide() {
        let ap: AuthorizationPolicy = serde_yaml::from_str(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: mesh-root}\nspec: {}\n",
        )
        .unwrap();
        assert!(compile(&ap, "mesh-root").mesh_wide);
        assert!(!compile(&ap, "istio-system").mesh_wide, "control: istio-system is not the root here");
        let policy = compile(&ap, "mesh-root");
        assert_eq!(policy.rules, []);
        assert!(!decide(policy.clone(), Some(SLEEP), 80));
        let pod: crate::workloads::Pod =
            serde_json::from_value(serde_json::json!({"name": "r", "namespace": "shop", "uid": "u"})).unwrap();
        let set = WorkloadPolicies::for_workload(&[std::sync::Arc::new(policy)], &pod);
        let decision =
            set.evaluate(&Connection::new("10.0.0.1".parse().unwrap(), None, "10.0.0.2:80".parse().unwrap()));
        assert_eq!(decision.by, DecidedBy::NoAllowMatched);
    }
}
