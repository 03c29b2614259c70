//! Istio's PeerAuthentication (security.istio.io/v1): which inbound traffic an enrolled workload accepts.
//! STRICT: mTLS (HBONE) only; PERMISSIVE: mTLS or plaintext; DISABLE: plaintext; UNSET: inherit.
//! Precedence as in Istio: a workload policy (selector matching the pod's labels; its portLevelMtls
//! first) over the namespace policy (no selector) over the mesh policy (no selector, in the root
//! namespace); the default is PERMISSIVE.
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::http::Unknown;

use super::Pod;

/// Istio's root namespace, where the mesh-wide policy lives.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    /// RFC 3339 (as the API server writes it): of several policies at one level Istio takes the oldest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MutualTls {
    #[serde(default)]
    pub mode: Mode,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Port → mode; only meaningful with a selector. Keys as written: Istio's docs write them as integers
    /// (`80: {mode: DISABLE}`), JSON as strings; both are read (and checked by validation).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "port_keys")]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// A map key that YAML may give as a string or an integer.
struct PortKey(String);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a port number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortKey, E> {
                Ok(PortKey(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortKey, E> {
                Ok(PortKey(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortKey, E> {
                Ok(PortKey(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

fn port_keys<'de, D: Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, MutualTls>, D::Error> {
    let keyed: BTreeMap<PortKey, MutualTls> = Deserialize::deserialize(deserializer)?;
    Ok(keyed.into_iter().map(|(k, v)| (k.0, v)).collect())
}

impl PartialEq for PortKey {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for PortKey {}
impl PartialOrd for PortKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for PortKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

/// A PeerAuthentication as users write it (apiVersion/kind are accepted and ignored).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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

/// Of the policies in `namespace` that `keep` accepts, the oldest, then the first by name (as Istio).
fn first<'a>(
    policies: &'a [PeerAuthentication],
    namespace: &str,
    keep: impl Fn(&PeerAuthentication) -> bool,
) -> Option<&'a PeerAuthentication> {
    policies.iter().filter(|p| p.metadata.namespace == namespace && keep(p)).min_by(|a, b| {
        (a.metadata.creation_timestamp.is_none(), &a.metadata.creation_timestamp, &a.metadata.name).cmp(&(
            b.metadata.creation_timestamp.is_none(),
            &b.metadata.creation_timestamp,
            &b.metadata.name,
        ))
    })
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
            workload: None,
            locality: None,
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

    #[test]
    fn port_keys_as_istios_docs_write_them() {
        // Istio's docs write portLevelMtls keys as integers.
        let workload = policy(
            "metadata: {name: w, namespace: bookinfo}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    80: {mode: DISABLE}\n",
        );
        let p = pod(&[("app", "reviews")]);
        assert_eq!(effective_mode(&p, 80, std::slice::from_ref(&workload)), Mode::Disable);
        assert_eq!(effective_mode(&p, 81, &[workload]), Mode::Strict, "control: another port");
    }

    #[test]
    fn the_oldest_policy_at_a_level_wins() {
        let p = pod(&[]);
        let old = policy("metadata: {name: z, namespace: bookinfo, creationTimestamp: '2024-01-01T00:00:00Z'}\nspec: {mtls: {mode: STRICT}}");
        let new = policy("metadata: {name: a, namespace: bookinfo, creationTimestamp: '2025-01-01T00:00:00Z'}\nspec: {mtls: {mode: DISABLE}}");
        assert_eq!(effective_mode(&p, 1, &[new.clone(), old.clone()]), Mode::Strict, "older wins over the first name");
        let same = policy("metadata: {name: a, namespace: bookinfo, creationTimestamp: '2024-01-01T00:00:00Z'}\nspec: {mtls: {mode: DISABLE}}");
        assert_eq!(effective_mode(&p, 1, &[old, same]), Mode::Disable, "same age: first by name");
    }
}
