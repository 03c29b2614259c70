//! Cross-object analysis, in the manner of `istioctl analyze` (and with its codes where Istio has one):
//! invalid fields, hosts that match no service, subsets that are not defined or select no pods,
//! namespaces with mesh config that are not enrolled, and hosts claimed by more than one VirtualService.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use kube::ResourceExt;

use crate::{
    cluster::ClusterState,
    compile::qualify,
    tables::Origin,
    validate,
    workloads::{ISTIO_AMBIENT_LABEL, MESH_LABEL},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warning,
    Info,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Message {
    pub level: Level,
    pub code: &'static str,
    pub object: Origin,
    pub field: Option<String>,
    pub text: String,
    /// Where the object was read from, as istioctl prints it (`bookinfo.yaml:12`); `None` for API objects.
    pub source: Option<String>,
}

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let level = match self.level {
            Level::Error => "Error",
            Level::Warning => "Warning",
            Level::Info => "Info",
        };
        write!(f, "{level} [{}] ({} {}/{}", self.code, self.object.kind, self.object.namespace, self.object.name)?;
        if let Some(source) = &self.source {
            write!(f, " {source}")?;
        }
        f.write_str(") ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.text)
    }
}

pub const SCHEMA_VALIDATION_ERROR: &str = "IST0106";
pub const REFERENCED_RESOURCE_NOT_FOUND: &str = "IST0101";
pub const NAMESPACE_NOT_ENROLLED: &str = "IST0102";
pub const CONFLICTING_HOSTS: &str = "IST0109";
pub const SUBSET_SELECTS_NO_PODS: &str = "WRN0001";

/// Every finding, errors first.
pub fn analyze(state: &ClusterState) -> Vec<Message> {
    let mut out = Vec::new();
    let origin = |kind: &str, meta: &kube::api::ObjectMeta| {
        Origin::new(kind, meta.namespace.as_deref().unwrap_or("default"), meta.name.as_deref().unwrap_or(""), meta.generation)
    };
    let mut error = |level, code, object: &Origin, field: Option<String>, text: String| {
        out.push(Message { level, code, object: object.clone(), field, text, source: None })
    };

    // Hosts that exist: Services and ServiceEntry hosts.
    let mut hosts: BTreeSet<String> =
        state.services.iter().map(|s| qualify(&s.name_any(), &s.namespace().unwrap_or_default())).collect();
    hosts.extend(state.service_entries.iter().flat_map(|s| s.spec.hosts.iter().cloned()));
    let known = |host: &str, ns: &str| host.contains('*') || hosts.contains(&qualify(host, ns));
    // Subsets by host, with the pods of the host's service.
    let mut subsets: HashMap<String, (Origin, Vec<(String, BTreeMap<String, String>)>)> = HashMap::new();
    for dr in &state.destination_rules {
        let ns = dr.namespace().unwrap_or_default();
        let o = origin("DestinationRule", &dr.metadata);
        for problem in validate::destination_rule(&dr.spec) {
            error(Level::Error, SCHEMA_VALIDATION_ERROR, &o, Some(problem.field), problem.reason);
        }
        if !known(&dr.spec.host, &ns) {
            error(Level::Error, REFERENCED_RESOURCE_NOT_FOUND, &o, Some("spec.host".into()), format!("host {:?} matches no service", dr.spec.host));
        }
        subsets.entry(qualify(&dr.spec.host, &ns)).or_insert_with(|| {
            (o.clone(), dr.spec.subsets.iter().map(|s| (s.name.clone(), s.labels.clone())).collect())
        });
        // Subsets that select no pod of the service.
        let service = state.services.iter().find(|s| qualify(&s.name_any(), &s.namespace().unwrap_or_default()) == qualify(&dr.spec.host, &ns));
        if let Some(selector) = service.and_then(|s| s.spec.as_ref()).and_then(|s| s.selector.as_ref()) {
            let service_ns = service.and_then(|s| s.namespace()).unwrap_or_default();
            for (i, subset) in dr.spec.subsets.iter().enumerate() {
                let selects = state.pods.iter().any(|p| {
                    p.namespace == service_ns
                        && selector.iter().chain(&subset.labels).all(|(k, v)| p.labels.get(k) == Some(v))
                });
                if !selects {
                    error(Level::Warning, SUBSET_SELECTS_NO_PODS, &o, Some(format!("spec.subsets[{i}]")), format!("subset {:?} selects no pods", subset.name));
                }
            }
        }
    }

    let mut claimed: BTreeMap<String, Vec<Origin>> = BTreeMap::new();
    for vs in &state.virtual_services {
        let ns = vs.namespace().unwrap_or_default();
        let o = origin("VirtualService", &vs.metadata);
        for problem in validate::virtual_service(&vs.spec) {
            error(Level::Error, SCHEMA_VALIDATION_ERROR, &o, Some(problem.field), problem.reason);
        }
        let mesh = vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh");
        for (i, host) in vs.spec.hosts.iter().enumerate() {
            if mesh && !known(host, &ns) {
                error(Level::Error, REFERENCED_RESOURCE_NOT_FOUND, &o, Some(format!("spec.hosts[{i}]")), format!("host {host:?} matches no service"));
            }
            if mesh && !host.contains('*') {
                claimed.entry(qualify(host, &ns)).or_default().push(o.clone());
            }
        }
        let destinations = vs.spec.http.iter().enumerate().flat_map(|(i, h)| {
            h.route.iter().enumerate().map(move |(j, d)| (format!("spec.http[{i}].route[{j}].destination"), &d.destination))
        });
        let tcp = vs.spec.tcp.iter().enumerate().flat_map(|(i, t)| {
            t.route.iter().enumerate().map(move |(j, d)| (format!("spec.tcp[{i}].route[{j}].destination"), &d.destination))
        });
        for (field, d) in destinations.chain(tcp) {
            if d.host.is_empty() {
                continue; // a validation error already
            }
            if !known(&d.host, &ns) {
                error(Level::Error, REFERENCED_RESOURCE_NOT_FOUND, &o, Some(format!("{field}.host")), format!("host {:?} matches no service", d.host));
            } else if let Some(subset) = &d.subset {
                let defined = subsets.get(&qualify(&d.host, &ns)).is_some_and(|(_, s)| s.iter().any(|(n, _)| n == subset));
                if !defined {
                    error(Level::Error, REFERENCED_RESOURCE_NOT_FOUND, &o, Some(format!("{field}.subset")), format!("subset {subset:?} of host {:?} is not defined by any DestinationRule", d.host));
                }
            }
        }
    }
    for (host, claimants) in claimed.iter().filter(|(_, c)| c.len() > 1) {
        let names: Vec<String> = claimants.iter().map(|o| format!("{}/{}", o.namespace, o.name)).collect();
        for o in claimants {
            error(Level::Error, CONFLICTING_HOSTS, o, Some("spec.hosts".into()), format!("host {host:?} is routed by more than one VirtualService: {}", names.join(", ")));
        }
    }
    for ap in &state.authorization_policies {
        let o = origin("AuthorizationPolicy", &ap.metadata);
        for problem in validate::authorization_policy(&ap.spec) {
            error(Level::Error, SCHEMA_VALIDATION_ERROR, &o, Some(problem.field), problem.reason);
        }
    }

    // Namespaces that hold mesh config but whose pods are not enrolled.
    let configured: BTreeSet<String> = state
        .virtual_services
        .iter()
        .map(|v| v.namespace())
        .chain(state.destination_rules.iter().map(|d| d.namespace()))
        .chain(state.authorization_policies.iter().map(|a| a.namespace()))
        .flatten()
        .collect();
    for ns in configured {
        let enrolled = state.namespace_labels(&ns).is_some_and(|l| {
            l.get(MESH_LABEL).is_some_and(|v| v == "enabled") || l.get(ISTIO_AMBIENT_LABEL).is_some_and(|v| v == "ambient")
        });
        if !enrolled && ns != crate::workloads::peer_authentication::ROOT_NAMESPACE {
            let o = Origin::new("Namespace", "", &ns, None);
            error(Level::Warning, NAMESPACE_NOT_ENROLLED, &o, None, format!("namespace {ns:?} has mesh config but is not enrolled (label it {MESH_LABEL}=enabled)"));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings(yaml: &str) -> Vec<String> {
        let mut state = ClusterState::default();
        state
            .add_yaml(
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {warren.dev/mesh: enabled}}\n---\n\
                 apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec: {selector: {app: reviews}, ports: [{port: 9080}]}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata: {name: r1, namespace: shop, uid: u1, labels: {app: reviews, version: v1}}\nspec: {containers: []}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}\n\
                 spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}\n",
            )
            .unwrap();
        state.add_yaml(yaml).unwrap();
        analyze(&state).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn reports_what_istioctl_analyze_would() {
        let found = findings(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: shop}\n\
             spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v3}, weight: 70}, {destination: {host: ratings}, weight: 20}]}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: b, namespace: shop}\n\
             spec: {hosts: [reviews.shop.svc.cluster.local], tcp: [{route: [{destination: {host: reviews}}]}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: c, namespace: other}\n\
             spec: {hosts: [reviews.shop], tcp: [{route: [{destination: {host: reviews.shop}}]}]}\n",
        );
        let expect = [
            "Error [IST0106] (VirtualService shop/a) spec.http[0].route: weights sum to 90, not 100",
            "Error [IST0101] (VirtualService shop/a) spec.http[0].route[0].destination.subset: subset \"v3\" of host \"reviews\" is not defined by any DestinationRule",
            "Error [IST0101] (VirtualService shop/a) spec.http[0].route[1].destination.host: host \"ratings\" matches no service",
            "Error [IST0109] (VirtualService shop/b) spec.hosts: host \"reviews.shop.svc.cluster.local\" is routed by more than one VirtualService: shop/a, shop/b, other/c",
            "Warning [WRN0001] (DestinationRule shop/reviews) spec.subsets[1]: subset \"v2\" selects no pods",
            "Warning [IST0102] (Namespace /other) namespace \"other\" has mesh config but is not enrolled (label it warren.dev/mesh=enabled)",
        ];
        for line in expect {
            assert!(found.iter().any(|f| f == line), "missing {line:?} in {found:#?}");
        }
        assert!(findings("").iter().all(|f| !f.starts_with("Error")), "a clean config has no errors");
    }
}
