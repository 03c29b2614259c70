//! Istio's PeerAuthentication (security.istio.io/v1): which inbound traffic an enrolled workload accepts.
//! STRICT: mTLS (HBONE) only; PERMISSIVE: mTLS or plaintext; DISABLE: plaintext; UNSET: inherit.
//! Precedence as in Istio: a workload policy (selector matching the pod's labels; its portLevelMtls
//! first) over the namespace policy (no selector) over the mesh policy (no selector, in the root
//! namespace); the default is PERMISSIVE.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Pod;

/// Istio's root namespace, where the mesh-wide policy lives.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MutualTls {
    #[serde(default)]
    pub mode: Mode,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Port (as Istio writes it, a string key) → mode; only meaningful with a selector.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

/// A PeerAuthentication as users write it (apiVersion/kind are accepted and ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAuthentication {
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "apiVersion")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: Spec,
}

impl PeerAuthentication {
    fn mode(&self) -> Mode {
        self.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default()
    }

    fn selects(&self, pod: &Pod) -> bool {
        self.spec
            .selector
            .as_ref()
            .is_some_and(|s| s.match_labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
    }
}

/// Of the policies in `namespace` that `keep` accepts, the first by name (several at one level: Istio
/// takes the oldest; we need a deterministic choice without timestamps).
fn first<'a>(
    policies: &'a [PeerAuthentication],
    namespace: &str,
    keep: impl Fn(&PeerAuthentication) -> bool,
) -> Option<&'a PeerAuthentication> {
    policies.iter().filter(|p| p.metadata.namespace == namespace && keep(p)).min_by(|a, b| a.metadata.name.cmp(&b.metadata.name))
}

/// The mode that applies to inbound traffic for `pod` on `port`.
pub fn effective_mode(pod: &Pod, port: u16, policies: &[PeerAuthentication]) -> Mode {
    let workload = first(policies, &pod.namespace, |p| p.selects(pod));
    let namespace = first(policies, &pod.namespace, |p| p.spec.selector.is_none());
    let mesh = first(policies, ROOT_NAMESPACE, |p| p.spec.selector.is_none());
    let port_level = workload.and_then(|w| w.spec.port_level_mtls.get(&port.to_string())).map(|m| m.mode);
    [port_level, workload.map(PeerAuthentication::mode), namespace.map(PeerAuthentication::mode), mesh.map(PeerAuthentication::mode)]
        .into_iter()
        .flatten()
        .find(|m| *m != Mode::Unset)
        .unwrap_or(Mode::Permissive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(labels: &[(&str, &str)]) -> Pod {
        Pod {
            name: "reviews".into(),
            namespace: "bookinfo".into(),
            uid: "u".into(),
            ips: vec![],
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            host_network: false,
            service_account: "default".into(),
            node: None,
        }
    }

    fn policy(yaml: &str) -> PeerAuthentication {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn precedence_follows_istio() {
        let p = pod(&[("app", "reviews")]);
        assert_eq!(effective_mode(&p, 9080, &[]), Mode::Permissive, "default");
        let mesh = policy("metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}");
        assert_eq!(effective_mode(&p, 9080, &[mesh.clone()]), Mode::Strict);
        let namespace = policy("metadata: {name: ns, namespace: bookinfo}\nspec: {mtls: {mode: PERMISSIVE}}");
        assert_eq!(effective_mode(&p, 9080, &[mesh.clone(), namespace.clone()]), Mode::Permissive);
        let workload = policy(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: w, namespace: bookinfo}\n\
             spec:\n  selector: {matchLabels: {app: reviews}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    \"9090\": {mode: DISABLE}\n",
        );
        let all = [mesh.clone(), namespace.clone(), workload.clone()];
        assert_eq!(effective_mode(&p, 9080, &all), Mode::Strict, "workload over namespace");
        assert_eq!(effective_mode(&p, 9090, &all), Mode::Disable, "port level over workload");
        assert_eq!(effective_mode(&pod(&[("app", "ratings")]), 9080, &all), Mode::Permissive, "selector does not match");
        let unset = policy("metadata: {name: w, namespace: bookinfo}\nspec: {selector: {matchLabels: {app: reviews}}, mtls: {mode: UNSET}}");
        assert_eq!(effective_mode(&p, 9080, &[mesh, unset]), Mode::Strict, "UNSET inherits");
    }
}
