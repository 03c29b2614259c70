//! The controller's input: everything it watches, in one value, from the Kubernetes API (the controller's
//! reflectors) or from a directory of YAML files (the embedded default). Compile and analyze read it.
use std::{collections::BTreeMap, net::IpAddr, path::Path};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1 as core;
use kube::ResourceExt;

use crate::{
    istio::{AuthorizationPolicy, DestinationRule, Gateway, ServiceEntry, VirtualService},
    workloads::{Namespace, Pod, naming, peer_authentication::PeerAuthentication},
};
use warren_api::resilience::Locality;

#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub services: Vec<core::Service>,
    /// Endpoints objects, used for Services without a selector (others are resolved from pods).
    pub endpoints: Vec<core::Endpoints>,
    /// Nodes: their topology labels are the locality of the pods on them that carry no locality label.
    pub nodes: Vec<core::Node>,
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    pub gateways: Vec<Gateway>,
    pub service_entries: Vec<ServiceEntry>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Secrets: the TLS credentials gateways name (`credentialName`).
    pub secrets: Vec<core::Secret>,
    /// The `istio` ConfigMaps (Istio's mesh config, key `mesh`); the root namespace's applies.
    pub mesh_config_maps: Vec<core::ConfigMap>,
    /// What reading the input found on the way (skipped kinds, unreadable files or objects), for `analyze`
    /// and the controller's log.
    pub notices: Vec<crate::analyze::Message>,
    /// `(kind, namespace, name)` → where the object was read from (`file.yaml:12`), for messages.
    pub sources: std::collections::HashMap<(String, String, String), String>,
    /// Istio's `meshConfig.rootNamespace`: its policies apply to every namespace (`None`: istio-system).
    pub root_namespace: Option<String>,
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
    let controller = pod.owner_references().iter().find(|o| o.controller == Some(true));
    let controller = controller.map(|o| naming::Controller { kind: &o.kind, name: &o.name });
    let workload = naming::workload_name(&pod.name_any(), controller, pod.labels());
    Some(Pod {
        workload: Some(workload).filter(|w| *w != pod.name_any()),
        name: pod.name_any(),
        namespace: pod.namespace().unwrap_or_else(|| "default".into()),
        uid: pod.uid()?,
        ips,
        labels: pod.labels().clone(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        service_account: spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into()),
        // Unscheduled pods are on no node (an empty name).
        node: Some(spec.and_then(|s| s.node_name.clone()).unwrap_or_default()),
        // The node's, when the pod has no label of its own, is added when compiled (nodes are read apart).
        locality: pod_locality(pod.labels()),
    })
}

/// The pod labels Istio reads a workload's locality from, in order: `region.zone.subzone` (labels cannot
/// hold `/`).
pub const LOCALITY_LABELS: [&str; 2] = ["topology.istio.io/locality", "istio-locality"];

/// A pod's locality from its labels, as `region/zone/subzone` ([`Locality`]'s form).
pub fn pod_locality(labels: &BTreeMap<String, String>) -> Option<String> {
    let label = LOCALITY_LABELS.iter().find_map(|name| labels.get(*name))?;
    Locality::from_label(label).map(|l| l.to_string())
}

/// A node's locality from its topology labels (the beta ones Istio also reads, where the GA ones are
/// missing); `None` without a region.
pub fn node_locality(node: &core::Node) -> Option<String> {
    let labels = node.labels();
    let first = |names: &[&str]| names.iter().find_map(|n| labels.get(*n)).cloned().unwrap_or_default();
    let locality = Locality {
        region: first(&["topology.kubernetes.io/region", "failure-domain.beta.kubernetes.io/region"]),
        zone: first(&["topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone"]),
        subzone: first(&["topology.istio.io/subzone"]),
    };
    (!locality.region.is_empty()).then(|| locality.to_string())
}

pub fn namespace_from_k8s(ns: &core::Namespace) -> Namespace {
    Namespace { name: ns.name_any(), labels: ns.labels().clone() }
}

impl ClusterState {
    pub fn root_namespace(&self) -> &str {
        self.root_namespace.as_deref().unwrap_or(crate::workloads::peer_authentication::ROOT_NAMESPACE)
    }

    /// Reads every `*.yaml`/`*.yml` file in `dir` as [`crate::load`] does: what cannot be read is in
    /// `notices`, the rest applies. Fails only when the directory cannot be listed.
    pub fn from_dir(dir: &Path) -> Result<ClusterState> {
        let mut files = crate::load::Directory::new(dir);
        files.refresh()?;
        Ok(files.state())
    }

    /// Adds every object of a YAML stream (named `<input>` in sources and notices), replacing objects of
    /// the same kind, namespace and name added before. What cannot be read is recorded in `notices` and the
    /// rest is added all the same; the result is an error when something was (so callers that expect clean
    /// input see it).
    pub fn add_yaml(&mut self, text: &str) -> Result<()> {
        let read = crate::load::read_text(crate::load::INPUT_NAME, text);
        let errors: Vec<String> = read.notices.iter().filter(|n| n.level == crate::analyze::Level::Error).map(ToString::to_string).collect();
        self.apply_reads([&read]);
        match errors.is_empty() {
            true => Ok(()),
            false => bail!("{}", errors.join("; ")),
        }
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
        // Reading Nodes may be forbidden to whoever runs analyze: then localities come from pod labels only.
        let nodes = Api::<core::Node>::all(client.clone()).list(&ListParams::default()).await;
        let nodes = nodes.map(|l| l.items).unwrap_or_default();
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
            nodes,
            virtual_services: list(&client, "VirtualServices").await?,
            destination_rules: list(&client, "DestinationRules").await?,
            gateways: list(&client, "Gateways").await?,
            service_entries: list(&client, "ServiceEntries").await?,
            authorization_policies: list(&client, "AuthorizationPolicies").await?,
            peer_authentications,
            // Reading Secrets may be forbidden to whoever runs analyze: then credentials are not checked.
            secrets: list(&client, "secrets").await.unwrap_or_default(),
            mesh_config_maps: list::<core::ConfigMap>(&client, "configmaps")
                .await?
                .into_iter()
                .filter(|c| c.metadata.name.as_deref() == Some(crate::compile::MESH_CONFIG_MAP))
                .collect(),
            ..Default::default()
        })
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
        // A kind Warren does not read is no error: it is skipped, with a notice.
        state.add_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").unwrap();
        assert!(state.notices.iter().any(|n| n.code == crate::load::SKIPPED_KIND && n.object.kind == "ConfigMap"), "{:?}", state.notices);
        assert_eq!(state.sources[&("VirtualService".into(), "default".into(), "r".into())], "<input>:11");
    }

    #[test]
    fn pods_take_their_locality_from_istios_labels() {
        let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(pod_locality(&labels(&[("istio-locality", "us-west.zone1.sub1")])).as_deref(), Some("us-west/zone1/sub1"));
        let both = labels(&[("istio-locality", "a.b"), ("topology.istio.io/locality", "eu.eu-1")]);
        assert_eq!(pod_locality(&both).as_deref(), Some("eu/eu-1"), "the newer label first, as Istio");
        assert_eq!(pod_locality(&labels(&[("app", "x")])), None);
        let mut state = ClusterState::default();
        state
            .add_yaml(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop, uid: u1, labels: {istio-locality: r1.z1}}\n\
                 spec: {containers: [{name: c}], nodeName: n1}\nstatus: {podIP: 10.0.0.1}\n---\n\
                 apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: b, namespace: shop}\n\
                 spec: {selector: {matchLabels: {app: b}}, template: {metadata: {labels: {app: b, istio-locality: r2}}}}\n---\n\
                 apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {topology.kubernetes.io/region: r9}}\n",
            )
            .unwrap();
        let of = |name: &str| state.pods.iter().find(|p| p.name == name).and_then(|p| p.locality.clone());
        assert_eq!((of("a").as_deref(), of("b-0").as_deref()), (Some("r1/z1"), Some("r2")), "a pod's, and a stand-in's");
        assert_eq!(state.nodes.len(), 1, "Nodes are read (for their topology labels)");
        assert_eq!(state.nodes[0].metadata.namespace, None, "cluster-scoped");
    }
}
