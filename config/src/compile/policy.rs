//! AuthorizationPolicy → the policy agents enforce, failing closed on what they cannot enforce yet.
//!
//! The agent enforces, for now, an ALLOW rule only when it has no attributes (it matches every request) and
//! a DENY rule on its `to.operation.ports`. Everything else a rule can say is named by
//! [`crate::support`] and compiled so that access is never wider than Istio would grant:
//! - an ALLOW rule that uses an attribute the agent cannot check matches nothing (it is dropped; an ALLOW
//!   policy left without rules allows nothing, as in Istio);
//! - a DENY rule is applied without such attributes (it denies more, never less);
//! - CUSTOM (external authorization, not supported) is enforced as DENY on its rules.
use kube::ResourceExt;

use crate::{
    istio::{AuthorizationPolicy, AuthorizationRule, RuleOperation, RuleTo},
    tables::{Action, Origin, Policy},
};

pub fn compile(ap: &AuthorizationPolicy) -> Policy {
    let ns = ap.namespace().unwrap_or_default();
    let action = match ap.spec.action.as_deref() {
        Some("DENY" | "CUSTOM") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        _ => Action::Allow,
    };
    let rules = ap.spec.rules.as_ref().map(|rules| match action {
        Action::Allow => rules.iter().filter(|r| allow_rule_is_enforceable(r)).cloned().collect(),
        Action::Deny => rules.iter().map(deny_rule_as_enforced).collect(),
        Action::Audit => rules.clone(),
    });
    Policy {
        origin: Origin::new("AuthorizationPolicy", &ns, &ap.name_any(), ap.metadata.generation),
        selector: ap.spec.selector.as_ref().map(|s| s.match_labels.clone()),
        action,
        rules,
    }
}

/// An ALLOW rule the agent can enforce: one that matches every request.
fn allow_rule_is_enforceable(rule: &AuthorizationRule) -> bool {
    rule.from.is_empty() && rule.to.is_empty() && rule.when.is_empty() && rule.unknown.is_empty()
}

/// The DENY rule the agent enforces: its port lists, nothing else (sources and conditions dropped, so it
/// applies to every client; an operation left empty matches every port).
fn deny_rule_as_enforced(rule: &AuthorizationRule) -> AuthorizationRule {
    AuthorizationRule {
        from: Vec::new(),
        to: rule
            .to
            .iter()
            .map(|to| RuleTo {
                operation: RuleOperation { ports: to.operation.ports.clone(), ..Default::default() },
                ..Default::default()
            })
            .collect(),
        when: Vec::new(),
        unknown: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> (Policy, Vec<String>) {
        let ap: AuthorizationPolicy = serde_yaml::from_str(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n{yaml}"
        ))
        .unwrap();
        let notices = crate::support::review("AuthorizationPolicy", &serde_json::to_value(&ap.spec).unwrap());
        (compile(&ap), notices.iter().map(|n| n.field.clone()).collect())
    }

    #[test]
    fn allow_rules_that_cannot_be_checked_match_nothing() {
        // Istio's require-jwt: only requests with a JWT principal. Not enforced → allows nothing.
        let (compiled, notices) = policy("  action: ALLOW\n  rules: [{from: [{source: {requestPrincipals: ['*']}}]}]\n");
        assert_eq!(compiled.rules, Some(vec![]), "the rule is dropped: the ALLOW policy allows nothing");
        assert_eq!(notices, ["spec.rules[0].from[0].source.requestPrincipals"]);
        // Control: an attribute-free rule allows everything, and is kept.
        let (compiled, notices) = policy("  rules: [{}]\n");
        assert_eq!(compiled.rules.map(|r| r.len()), Some(1));
        assert!(notices.is_empty());
    }

    #[test]
    fn deny_rules_apply_without_what_cannot_be_checked() {
        let (compiled, notices) = policy(
            "  action: DENY\n  rules: [{from: [{source: {namespaces: [dev]}}], to: [{operation: {ports: ['9090'], methods: [POST]}}], when: [{key: source.ip, values: [10.0.0.1]}]}]\n",
        );
        let rule = &compiled.rules.unwrap()[0];
        assert!(rule.from.is_empty() && rule.when.is_empty(), "denies every client on the port");
        assert_eq!((rule.to[0].operation.ports.clone(), rule.to[0].operation.methods.len()), (vec!["9090".to_string()], 0));
        assert_eq!(notices, ["spec.rules[0].from[0].source.namespaces", "spec.rules[0].to[0].operation.methods", "spec.rules[0].when"]);
        let (custom, _) = policy("  action: CUSTOM\n  provider: {name: ext}\n  rules: [{to: [{operation: {paths: [/admin]}}]}]\n");
        assert_eq!(custom.action, Action::Deny, "CUSTOM is enforced as DENY");
        assert!(custom.rules.unwrap()[0].to[0].operation.ports.is_empty(), "…on every port");
    }
}
