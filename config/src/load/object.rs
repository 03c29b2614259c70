//! One object's JSON value → what Warren makes of it: its kind dispatched, its `apiVersion` checked against
//! what the API server serves, its fields parsed into Warren's types (a field of the wrong type names its
//! path), or a notice saying why it was left out.
use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::{Body, FileRead, Key, LIMIT_EXCEEDED, MAX_OBJECT_BYTES, Object, Template, UNREADABLE, UNSERVED_VERSION};
use crate::{analyze::SCHEMA_VALIDATION_ERROR, cluster};

/// The versions served of each API group Warren reads from (Istio's CRDs: deploy/helm/warren/crds/istio.yaml). Other
/// groups are not checked: their objects are skipped anyway.
const SERVED: &[(&str, &[&str])] = &[
    ("", &["v1"]),
    ("apps", &["v1"]),
    ("networking.istio.io", &["v1", "v1beta1", "v1alpha3"]),
    ("security.istio.io", &["v1", "v1beta1"]),
];

/// Kinds without a namespace, of those Warren reads (others keep whatever their metadata says).
pub(super) const CLUSTER_SCOPED: &[&str] = &["Namespace", "Node"];

/// Reads one document's value; `size` is the document's text length (the object's size, for the limit).
pub(super) fn read(read: &mut FileRead, value: Value, line: usize, size: usize) {
    read_value(read, value, line, Some(size))
}

fn read_value(read: &mut FileRead, value: Value, line: usize, size: Option<usize>) {
    let Value::Object(mut map) = value else {
        let what = describe(&value);
        return read.file_error(UNREADABLE, Some(line), format!("a {what}, not a Kubernetes object (a mapping with apiVersion and kind); skipped"));
    };
    let Some(kind) = map.get("kind").and_then(Value::as_str).map(str::to_owned) else {
        return read.file_error(UNREADABLE, Some(line), "not a Kubernetes object: `kind` is missing; skipped".into());
    };
    let api_version = map.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_owned();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
    if kind.ends_with("List") && map.get("items").is_some_and(Value::is_array) {
        return read_list(read, &mut map, line);
    }
    if !CLUSTER_SCOPED.contains(&kind.as_str()) {
        default_namespace(&mut map);
    }
    let Some(key) = key(group, &kind, &map) else {
        return read.file_error(UNREADABLE, Some(line), format!("{kind} without metadata.name; skipped"));
    };
    if let Err(text) = check_version(&api_version, group, version) {
        return read.object_error(UNSERVED_VERSION, key, line, Some("apiVersion".into()), text);
    }
    if let Some(size) = size.filter(|&s| s > MAX_OBJECT_BYTES) {
        let text = format!("{size} bytes; objects are read up to {MAX_OBJECT_BYTES} bytes (1.5 MiB, etcd's default request limit); skipped");
        return read.object_error(LIMIT_EXCEEDED, key, line, None, text);
    }
    match parse(group, &kind, Value::Object(map)) {
        Ok(Some(body)) => read.objects.push(Object { key, line, body }),
        Ok(None) => {}
        Err((field, text)) => read.object_error(SCHEMA_VALIDATION_ERROR, key, line, field, text),
    }
}

/// `kind: List` (and `…List`, as `kubectl get -o yaml` writes them): every item, said to be at the list's line.
fn read_list(read: &mut FileRead, map: &mut Map<String, Value>, line: usize) {
    if let Some(Value::Array(items)) = map.remove("items") {
        for item in items {
            read_value(read, item, line, None);
        }
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "mapping",
    }
}

/// Objects without a namespace go to `default`, as `kubectl apply` would put them.
fn default_namespace(map: &mut Map<String, Value>) {
    if let Some(Value::Object(metadata)) = map.get_mut("metadata") {
        metadata.entry("namespace").or_insert_with(|| "default".into());
    }
}

fn key(group: &str, kind: &str, map: &Map<String, Value>) -> Option<Key> {
    let metadata = map.get("metadata")?;
    let name = metadata.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let namespace = metadata.get("namespace").and_then(Value::as_str).unwrap_or("");
    Some(Key { group: group.into(), kind: kind.into(), namespace: namespace.into(), name: name.into() })
}

fn check_version(api_version: &str, group: &str, version: &str) -> Result<(), String> {
    let Some((_, served)) = SERVED.iter().find(|(g, _)| *g == group) else { return Ok(()) };
    if served.contains(&version) {
        return Ok(());
    }
    let prefix = if group.is_empty() { String::new() } else { format!("{group}/") };
    let served: Vec<String> = served.iter().map(|v| format!("{prefix}{v}")).collect();
    Err(match api_version {
        "" => format!("missing; expected one of {}; skipped", served.join(", ")),
        _ => format!("{api_version:?} is not served (served: {}); skipped", served.join(", ")),
    })
}

type ParseError = (Option<String>, String);

/// The object as Warren's type for its kind; `None` for objects read but not kept (finished pods).
fn parse(group: &str, kind: &str, value: Value) -> Result<Option<Body>, ParseError> {
    Ok(Some(match (group, kind) {
        ("", "Namespace") => Body::Namespace(cluster::namespace_from_k8s(&typed(value)?)),
        ("", "Pod") => return pod(value),
        ("", "Service") => Body::Service(typed(value)?),
        ("", "Endpoints") => Body::Endpoints(typed(value)?),
        ("", "Node") => Body::Node(typed(value)?),
        ("", "Secret") => Body::Secret(typed(value)?),
        ("", "ConfigMap") if value["metadata"]["name"] == crate::compile::MESH_CONFIG_MAP => Body::MeshConfigMap(typed(value)?),
        ("networking.istio.io", "VirtualService") => Body::VirtualService(typed(value)?),
        ("networking.istio.io", "DestinationRule") => Body::DestinationRule(typed(value)?),
        ("networking.istio.io", "Gateway") => Body::Gateway(typed(value)?),
        ("networking.istio.io", "ServiceEntry") => Body::ServiceEntry(typed(value)?),
        ("security.istio.io", "AuthorizationPolicy") => Body::AuthorizationPolicy(typed(value)?),
        ("security.istio.io", "PeerAuthentication") => Body::PeerAuthentication(typed(value)?),
        ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet") => Body::Workload(template(value)?),
        _ => Body::Skipped,
    }))
}

/// Deserializes with the path of the field that failed (`spec.http[0].route[0].weight`).
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, ParseError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        (Some(path).filter(|p| p != "."), e.into_inner().to_string())
    })
}

fn pod(value: Value) -> Result<Option<Body>, ParseError> {
    let pod: k8s_openapi::api::core::v1::Pod = typed(value)?;
    if pod.metadata.uid.as_deref().unwrap_or("").is_empty() {
        return Err((Some("metadata.uid".into()), "required: the agent finds the pod's cgroup and netns by it".into()));
    }
    // Finished pods (Succeeded, Failed) are no part of the mesh.
    Ok(cluster::pod_from_k8s(&pod).map(Body::Pod))
}

fn template(value: Value) -> Result<Template, ParseError> {
    #[derive(serde::Deserialize)]
    struct Workload {
        #[serde(default)]
        spec: Spec,
    }
    #[derive(serde::Deserialize, Default)]
    struct Spec {
        replicas: Option<i64>,
        selector: Option<Selector>,
        template: Option<PodTemplate>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Selector {
        match_labels: Option<BTreeMap<String, String>>,
    }
    #[derive(serde::Deserialize)]
    struct PodTemplate {
        metadata: Option<Labels>,
        spec: Option<PodSpec>,
    }
    #[derive(serde::Deserialize)]
    struct Labels {
        labels: Option<BTreeMap<String, String>>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct PodSpec {
        service_account_name: Option<String>,
        /// Deprecated, still honoured by Kubernetes when serviceAccountName is not set.
        service_account: Option<String>,
        host_network: Option<bool>,
    }
    let spec = typed::<Workload>(value)?.spec;
    let template = spec.template.unwrap_or(PodTemplate { metadata: None, spec: None });
    let labels = template.metadata.and_then(|m| m.labels).unwrap_or_default();
    let pod = template.spec.unwrap_or(PodSpec { service_account_name: None, service_account: None, host_network: None });
    let selector = spec.selector.and_then(|s| s.match_labels).filter(|s| !s.is_empty()).unwrap_or_else(|| labels.clone());
    Ok(Template {
        replicas: spec.replicas,
        selector,
        labels,
        service_account: pod.service_account_name.or(pod.service_account),
        host_network: pod.host_network.unwrap_or(false),
    })
}
