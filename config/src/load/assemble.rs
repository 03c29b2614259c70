//! Files' objects into one [`ClusterState`], as `kubectl apply -f` of them in order would leave a cluster:
//! one object per kind/namespace/name (the last definition), workloads standing in for their pods, and
//! notices for what was skipped or replaced.
use std::collections::{BTreeMap, HashMap};

use super::{Body, FileRead, Key, Object, POD_TEMPLATES, REDEFINED, SKIPPED_KIND, Template};
use crate::{
    analyze::{Level, Message},
    cluster::ClusterState,
    tables::Origin,
    workloads::Pod,
};

/// Names listed in a per-kind notice before "and N more".
const NAMES_LISTED: usize = 5;

pub(super) fn assemble<'a>(state: &mut ClusterState, reads: impl IntoIterator<Item = &'a FileRead>) {
    let mut skipped: BTreeMap<(String, String), Vec<(String, String)>> = BTreeMap::new();
    let mut workloads = Vec::new();
    for (object, source) in last_definitions(state, reads) {
        match &object.body {
            Body::Skipped => skipped.entry((object.key.group.clone(), object.key.kind.clone())).or_default().push((name(&object.key), source)),
            Body::Workload(template) => workloads.push((object.key.clone(), template.clone(), source)),
            _ => state.insert(object.clone(), source),
        }
    }
    for ((group, kind), objects) in skipped {
        state.notices.push(skipped_notice(&group, &kind, &objects));
    }
    derive_pods(state, workloads);
}

/// Every object of `reads` in order, each with its location, the later of two definitions only (with a
/// notice naming both).
fn last_definitions<'a>(state: &mut ClusterState, reads: impl IntoIterator<Item = &'a FileRead>) -> Vec<(&'a Object, String)> {
    let mut chosen: Vec<Option<(&Object, String)>> = Vec::new();
    let mut at: HashMap<&Key, usize> = HashMap::new();
    for read in reads {
        state.notices.extend(read.notices.iter().cloned());
        for object in &read.objects {
            let source = read.location(object.line);
            if let Some((_, earlier)) = at.insert(&object.key, chosen.len()).and_then(|i| chosen[i].take()) {
                state.notices.push(redefined(&object.key, &earlier, &source));
            }
            chosen.push(Some((object, source)));
        }
    }
    chosen.into_iter().flatten().collect()
}

fn redefined(key: &Key, earlier: &str, later: &str) -> Message {
    Message {
        level: Level::Info,
        code: REDEFINED,
        object: key.origin(),
        field: None,
        text: format!("defined again: the definition at {later} replaces the one at {earlier}, as `kubectl apply -f` would leave it"),
        source: Some(later.into()),
    }
}

fn name(key: &Key) -> String {
    format!("{}/{}", key.namespace, key.name)
}

fn listed(names: impl Iterator<Item = String>, count: usize) -> String {
    let mut text: Vec<String> = names.take(NAMES_LISTED).collect();
    if count > NAMES_LISTED {
        text.push(format!("and {} more", count - NAMES_LISTED));
    }
    text.join(", ")
}

fn plural(count: usize, word: &str) -> String {
    if count == 1 { word.into() } else { format!("{word}s") }
}

fn skipped_notice(group: &str, kind: &str, objects: &[(String, String)]) -> Message {
    let api = if group.is_empty() { String::new() } else { format!(" ({group})") };
    let names = listed(objects.iter().map(|(n, _)| n.clone()), objects.len());
    Message {
        level: Level::Info,
        code: SKIPPED_KIND,
        object: Origin::new(kind, "", "", None),
        field: None,
        text: format!("{} {kind}{api} {} skipped: Warren does not read this kind ({names})", objects.len(), plural(objects.len(), "object")),
        source: objects.first().map(|(_, s)| s.clone()),
    }
}

impl ClusterState {
    /// Adds an object Warren reads, replacing one of the same kind, namespace and name read before (a later
    /// `add_yaml` of the same object).
    fn insert(&mut self, object: Object, source: String) {
        let Key { kind, namespace, name, .. } = object.key.clone();
        let namespace = if super::object::CLUSTER_SCOPED.contains(&kind.as_str()) { String::new() } else { namespace };
        if let Some(earlier) = self.sources.insert((kind.clone(), namespace.clone(), name.clone()), source.clone()) {
            self.remove(&kind, &namespace, &name);
            self.notices.push(redefined(&object.key, &earlier, &source));
        }
        match object.body {
            Body::Namespace(o) => self.namespaces.push(o),
            Body::Pod(o) => self.pods.push(o),
            Body::Service(o) => self.services.push(o),
            Body::Endpoints(o) => self.endpoints.push(o),
            Body::Node(o) => self.nodes.push(o),
            Body::VirtualService(o) => self.virtual_services.push(o),
            Body::DestinationRule(o) => self.destination_rules.push(o),
            Body::Gateway(o) => self.gateways.push(o),
            Body::ServiceEntry(o) => self.service_entries.push(o),
            Body::AuthorizationPolicy(o) => self.authorization_policies.push(o),
            Body::PeerAuthentication(o) => self.peer_authentications.push(o),
            Body::Secret(o) => self.secrets.push(o),
            Body::MeshConfigMap(o) => self.mesh_config_maps.push(o),
            Body::Workload(_) | Body::Skipped => {}
        }
    }

    fn remove(&mut self, kind: &str, namespace: &str, name: &str) {
        fn named<K: kube::Resource>(objects: &mut Vec<K>, namespace: &str, name: &str) {
            objects.retain(|o| !(o.meta().namespace.as_deref() == Some(namespace) && o.meta().name.as_deref() == Some(name)));
        }
        match kind {
            "Namespace" => self.namespaces.retain(|n| n.name != name),
            "Pod" => self.pods.retain(|p| !(p.namespace == namespace && p.name == name)),
            "Service" => named(&mut self.services, namespace, name),
            "Endpoints" => named(&mut self.endpoints, namespace, name),
            "Node" => self.nodes.retain(|n| n.metadata.name.as_deref() != Some(name)),
            "VirtualService" => named(&mut self.virtual_services, namespace, name),
            "DestinationRule" => named(&mut self.destination_rules, namespace, name),
            "Gateway" => named(&mut self.gateways, namespace, name),
            "ServiceEntry" => named(&mut self.service_entries, namespace, name),
            "AuthorizationPolicy" => named(&mut self.authorization_policies, namespace, name),
            "Secret" => named(&mut self.secrets, namespace, name),
            "ConfigMap" => named(&mut self.mesh_config_maps, namespace, name),
            "PeerAuthentication" => self.peer_authentications.retain(|p| !(p.metadata.namespace == namespace && p.metadata.name == name)),
            _ => {}
        }
    }
}

/// Workload controllers stand in for the pods they would run, where the directory has none of theirs: one
/// pod each with the template's labels and service account, no IP, on no node — enough for Services and
/// DestinationRule subsets to resolve (none for `replicas: 0`). ReplicaSets, StatefulSets and DaemonSets go before Deployments, so
/// a Deployment whose ReplicaSet is also in the directory does not get a second pod.
fn derive_pods(state: &mut ClusterState, mut workloads: Vec<(Key, Template, String)>) {
    workloads.sort_by_key(|(key, _, _)| key.kind == "Deployment");
    let mut tally: BTreeMap<String, (usize, usize, Vec<String>)> = BTreeMap::new();
    for (key, template, source) in workloads {
        let entry = tally.entry(key.kind.clone()).or_default();
        entry.0 += 1;
        entry.2.push(name(&key));
        let has_pods = state.pods.iter().any(|p| p.namespace == key.namespace && selects(&template.selector, &p.labels));
        if has_pods || template.replicas == Some(0) {
            continue;
        }
        entry.1 += 1;
        let pod = stand_in(&key, template);
        state.sources.insert(("Pod".into(), pod.namespace.clone(), pod.name.clone()), source);
        state.pods.push(pod);
    }
    for (kind, (count, derived, names)) in tally {
        let text = format!(
            "{count} {kind} {} read only for their pod templates ({}): {derived} stand-in {} derived (no IP, on no node) where the directory has no Pods of theirs",
            plural(count, "object"),
            listed(names.into_iter(), count),
            plural(derived, "pod"),
        );
        let object = Origin::new(&kind, "", "", None);
        state.notices.push(Message { level: Level::Info, code: POD_TEMPLATES, object, field: None, text, source: None });
    }
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn stand_in(key: &Key, template: Template) -> Pod {
    Pod {
        locality: crate::cluster::pod_locality(&template.labels),
        name: format!("{}-0", key.name),
        namespace: key.namespace.clone(),
        uid: synthetic_uid(key),
        ips: Vec::new(),
        labels: template.labels,
        host_network: template.host_network,
        service_account: template.service_account.unwrap_or_else(|| "default".into()),
        // On no node: no agent enrolls it (there is no such pod to enroll).
        node: Some(String::new()),
        workload: Some(key.name.clone()),
    }
}

/// A UUID-shaped uid, the same on every read of the same workload (the agent uses uids as file names).
fn synthetic_uid(key: &Key) -> String {
    let text = format!("{}/{}/{}/{}", key.group, key.kind, key.namespace, key.name);
    let (a, b) = (fnv1a(0xcbf2_9ce4_8422_2325, &text), fnv1a(0x8422_2325_cbf2_9ce4, &text));
    format!("{:08x}-{:04x}-{:04x}-{:04x}-{:012x}", a >> 32, (a >> 16) & 0xffff, a & 0xffff, b >> 48, b & 0xffff_ffff_ffff)
}

pub(super) fn fnv1a(seed: u64, text: &str) -> u64 {
    text.bytes().fold(seed, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3))
}
