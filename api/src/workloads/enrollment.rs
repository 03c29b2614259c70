//! Which pods the mesh takes: the same rule for every source (Kubernetes, local file).

use std::collections::BTreeMap;

use super::Pod;

/// Namespace label `warren.dev/mesh=enabled` enrolls; pod label `warren.dev/mesh=disabled` opts out, and
/// `warren.dev/mesh=enabled` on a pod enrolls it whatever its namespace says (as Istio ambient's pod label:
/// how a gateway's pods join the mesh in a namespace that is not in it).
pub const MESH_LABEL: &str = "warren.dev/mesh";
/// Istio ambient's namespace label, accepted as well: `istio.io/dataplane-mode=ambient`.
pub const ISTIO_AMBIENT_LABEL: &str = "istio.io/dataplane-mode";

/// Pod label `warren.dev/socket-acceleration=false`: the agent does not accelerate this pod's local legs
/// (docs/architecture.md, "Socket acceleration": for a workload that reads and writes one socket from two
/// threads with blocking I/O).
pub const SOCKET_ACCELERATION_LABEL: &str = "warren.dev/socket-acceleration";

/// Whether the pod's local legs may be accelerated: `Err` names a label value that is neither `true` nor
/// `false` (the agent reports it and keeps acceleration on, the default).
pub fn socket_acceleration(pod: &Pod) -> Result<bool, String> {
    match pod.labels.get(SOCKET_ACCELERATION_LABEL).map(String::as_str) {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(format!("label {SOCKET_ACCELERATION_LABEL}={other} on pod {}: expected true or false", pod.key())),
    }
}

pub fn is_enrolled(pod: &Pod, namespace_labels: Option<&BTreeMap<String, String>>) -> bool {
    if pod.host_network || pod.ips.is_empty() {
        return false; // host-network pods share the node's netns; a pod without IPs has no netns yet
    }
    let pod_label = |key: &str| pod.labels.get(key).map(String::as_str);
    if pod_label(MESH_LABEL) == Some("disabled") || pod_label(ISTIO_AMBIENT_LABEL) == Some("none") {
        return false;
    }
    if pod_label(MESH_LABEL) == Some("enabled") || pod_label(ISTIO_AMBIENT_LABEL) == Some("ambient") {
        return true;
    }
    let Some(ns) = namespace_labels else { return false };
    ns.get(MESH_LABEL).is_some_and(|v| v == "enabled") || ns.get(ISTIO_AMBIENT_LABEL).is_some_and(|v| v == "ambient")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(labels: &[(&str, &str)]) -> Pod {
        Pod {
            name: "a".into(),
            namespace: "ns".into(),
            uid: "u".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            host_network: false,
            service_account: "default".into(),
            node: None,
            workload: None,
            locality: None,
        }
    }
    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn socket_acceleration_is_on_unless_the_pod_label_says_false() {
        assert_eq!(socket_acceleration(&pod(&[])), Ok(true));
        assert_eq!(socket_acceleration(&pod(&[(SOCKET_ACCELERATION_LABEL, "true")])), Ok(true));
        assert_eq!(socket_acceleration(&pod(&[(SOCKET_ACCELERATION_LABEL, "false")])), Ok(false));
        assert_eq!(
            socket_acceleration(&pod(&[(SOCKET_ACCELERATION_LABEL, "off")])),
            Err("label warren.dev/socket-acceleration=off on pod ns/a: expected true or false".into())
        );
    }

    #[test]
    fn namespace_label_enrolls_and_pod_label_opts_out() {
        let mesh = labels(&[(MESH_LABEL, "enabled")]);
        assert!(is_enrolled(&pod(&[]), Some(&mesh)));
        assert!(!is_enrolled(&pod(&[(MESH_LABEL, "disabled")]), Some(&mesh)));
        assert!(is_enrolled(&pod(&[]), Some(&labels(&[(ISTIO_AMBIENT_LABEL, "ambient")]))));
        assert!(!is_enrolled(&pod(&[]), Some(&labels(&[(MESH_LABEL, "disabled")]))));
        assert!(!is_enrolled(&pod(&[]), Some(&BTreeMap::new())));
        assert!(!is_enrolled(&pod(&[]), None), "unknown namespace");
        assert!(is_enrolled(&pod(&[(MESH_LABEL, "enabled")]), Some(&BTreeMap::new())), "the pod's own label");
        assert!(is_enrolled(&pod(&[(ISTIO_AMBIENT_LABEL, "ambient")]), None));
        let mut host = pod(&[]);
        host.host_network = true;
        assert!(!is_enrolled(&host, Some(&mesh)), "host-network pods are never enrolled");
    }
}
