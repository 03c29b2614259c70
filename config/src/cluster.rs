//! The controller's input: everything it watches, in one value, from the Kubernetes API (the controller's
//! reflectors) or from a directory of YAML files (the embedded default). Compile and analyze read it.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1 as core;
use kube::ResourceExt;
use serde::Deserialize;

use crate::{
    istio::{AuthorizationPolicy, DestinationRule, Gateway, ServiceEntry, VirtualService},
    workloads::{Namespace, Pod, peer_authentication::PeerAuthentication},
};

#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub services: Vec<core::Service>,
    /// Endpoints objects, used for Services without a selector (others are resolved from pods).
    pub endpoints: Vec<core::Endpoints>,
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    pub gateways: Vec<Gateway>,
    pub service_entries: Vec<ServiceEntry>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    pub peer_authentications: Vec<PeerAuthentication>,
    /// What reading the input found on the way (skipped kinds, unreadable files or objects), for `analyze`
    /// and the controller's log.
    pub notices: Vec<crate::analyze::Message>,
    /// `(kind, namespace, name)` → where the object was read from (`file.yaml:12`), for messages.
    pub sources: std::collections::HashMap<(String, String, String), String>,
}

/// The mesh's view of a pod; `None` for pods that are finished or have no UID.
pub fn pod_from_k8s(pod: &core::Pod) -> Option<Pod> {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    if phase == "Succeeded" || phase == "Failed" {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        ips.extend(status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse::<IpAddr>().ok()));
    }
    let spec = pod.spec.as_ref();
    Some(Pod {
        name: pod.name_any(),
        namespace: pod.namespace().unwrap_or_else(|| "default".into()),
        uid: pod.uid()?,
        ips,
        labels: pod.labels().clone(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        service_account: spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into()),
        // Unscheduled pods are on no node (an empty name).
        node: Some(spec.and_then(|s| s.node_name.clone()).unwrap_or_default()),
    })
}

pub fn namespace_from_k8s(ns: &core::Namespace) -> Namespace {
    Namespace { name: ns.name_any(), labels: ns.labels().clone() }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

impl ClusterState {
    /// Reads every `*.yaml`/`*.yml` file in `dir` (sorted; multi-document files allowed). Objects without
    /// a namespace go to `default`, as `kubectl apply` would put them.
    pub fn from_dir(dir: &Path) -> Result<ClusterState> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading config directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        let mut state = ClusterState::default();
        for file in files {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            state.add_yaml(&text).with_context(|| format!("{}", file.display()))?;
        }
        Ok(state)
    }

    /// Adds every document of a YAML stream.
    pub fn add_yaml(&mut self, text: &str) -> Result<()> {
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = serde_yaml::Value::deserialize(document).with_context(|| format!("document {}", index + 1))?;
            if value.is_null() {
                continue;
            }
            self.add_object(value).with_context(|| format!("document {}", index + 1))?;
        }
        Ok(())
    }

    fn add_object(&mut self, mut value: serde_yaml::Value) -> Result<()> {
        let meta: TypeMeta = serde_yaml::from_value(value.clone()).context("apiVersion/kind")?;
        let group = meta.api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        if !matches!(meta.kind.as_str(), "Namespace" | "List") {
            default_namespace(&mut value);
        }
        fn parse<T: serde::de::DeserializeOwned>(value: serde_yaml::Value, kind: &str) -> Result<T> {
            serde_yaml::from_value(value).with_context(|| format!("invalid {kind}"))
        }
        match (group, meta.kind.as_str()) {
            ("", "Namespace") => self.namespaces.push(namespace_from_k8s(&parse(value, "Namespace")?)),
            ("", "Pod") => {
                let pod: core::Pod = parse(value, "Pod")?;
                match pod_from_k8s(&pod) {
                    Some(pod) => self.pods.push(pod),
                    None => bail!("Pod {}: metadata.uid is required (the agent finds the pod by it)", pod.name_any()),
                }
            }
            ("", "Service") => self.services.push(parse(value, "Service")?),
            ("", "Endpoints") => self.endpoints.push(parse(value, "Endpoints")?),
            ("", "List") => {
                let items = value.get("items").and_then(|v| v.as_sequence()).cloned().unwrap_or_default();
                for item in items {
                    self.add_object(item)?;
                }
            }
            ("networking.istio.io", "VirtualService") => self.virtual_services.push(parse(value, "VirtualService")?),
            ("networking.istio.io", "DestinationRule") => self.destination_rules.push(parse(value, "DestinationRule")?),
            ("networking.istio.io", "Gateway") => self.gateways.push(parse(value, "Gateway")?),
            ("networking.istio.io", "ServiceEntry") => self.service_entries.push(parse(value, "ServiceEntry")?),
            ("security.istio.io", "AuthorizationPolicy") => {
                self.authorization_policies.push(parse(value, "AuthorizationPolicy")?)
            }
            ("security.istio.io", "PeerAuthentication") => {
                self.peer_authentications.push(parse(value, "PeerAuthentication")?)
            }
            (_, kind) => bail!("kind {kind:?} (apiVersion {:?}) is not one Warren reads", meta.api_version),
        }
        Ok(())
    }

    pub fn namespace_labels(&self, namespace: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.iter().find(|n| n.name == namespace).map(|n| &n.labels)
    }
}

impl ClusterState {
    /// Lists everything once from an API server (for `analyze`; the controller watches instead). Istio
    /// kinds whose CRDs are not installed read as empty.
    pub async fn from_kubernetes(client: kube::Client) -> Result<ClusterState> {
        use kube::api::{Api, ListParams};
        async fn list<K>(client: &kube::Client, what: &str) -> Result<Vec<K>>
        where
            K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
            K::DynamicType: Default,
        {
            match Api::<K>::all(client.clone()).list(&ListParams::default()).await {
                Ok(list) => Ok(list.items),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(Vec::new()),
                Err(e) => Err(e).with_context(|| format!("listing {what}")),
            }
        }
        let namespaces = Api::<core::Namespace>::all(client.clone()).list(&ListParams::default()).await.context("listing namespaces")?;
        let pods: Vec<core::Pod> = list(&client, "pods").await?;
        let peer_authentications = {
            let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk("security.istio.io", "v1", "PeerAuthentication"));
            match Api::<kube::api::DynamicObject>::all_with(client.clone(), &resource).list(&ListParams::default()).await {
                Ok(list) => list
                    .items
                    .into_iter()
                    .filter_map(|o| serde_json::to_value(o).ok().and_then(|v| serde_json::from_value(v).ok()))
                    .collect(),
                Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
                Err(e) => return Err(e).context("listing PeerAuthentications"),
            }
        };
        Ok(ClusterState {
            namespaces: namespaces.items.iter().map(namespace_from_k8s).collect(),
            pods: pods.iter().filter_map(pod_from_k8s).collect(),
            services: list(&client, "services").await?,
            endpoints: list(&client, "endpoints").await?,
            virtual_services: list(&client, "VirtualServices").await?,
            destination_rules: list(&client, "DestinationRules").await?,
            gateways: list(&client, "Gateways").await?,
            service_entries: list(&client, "ServiceEntries").await?,
            authorization_policies: list(&client, "AuthorizationPolicies").await?,
            peer_authentications,
            ..Default::default()
        })
    }
}

fn default_namespace(value: &mut serde_yaml::Value) {
    if let Some(metadata) = value.get_mut("metadata").and_then(|m| m.as_mapping_mut()) {
        let key = serde_yaml::Value::from("namespace");
        if !metadata.contains_key(&key) {
            metadata.insert(key, "default".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kubernetes_and_istio_objects_from_yaml() {
        let mut state = ClusterState::default();
        state
            .add_yaml(
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {warren.dev/mesh: enabled}}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop, uid: u1, labels: {app: a}}\n\
                 spec: {containers: [{name: c}], nodeName: n1}\nstatus: {podIP: 10.0.0.1}\n---\n\
                 apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: r}\n\
                 spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1}}]}]}\n",
            )
            .unwrap();
        assert_eq!(state.namespaces[0].name, "shop");
        assert_eq!(state.pods[0].ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(state.pods[0].node.as_deref(), Some("n1"));
        assert_eq!(state.virtual_services[0].namespace().as_deref(), Some("default"));
        let err = state.add_yaml("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n").unwrap_err();
        assert!(format!("{err:#}").contains("Deployment"), "{err:#}");
    }
}
