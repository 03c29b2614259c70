//! Cross-object analysis as `istioctl analyze` does it, with its codes and levels where Istio has a check
//! (istio.io/docs/reference/config/analysis), plus Warren's own notices:
//!
//! | code | level | what |
//! |---|---|---|
//! | IST0101 | Error | a referenced host, subset, gateway or gateway selector does not exist |
//! | IST0102 | Info | a namespace is not enrolled in the mesh |
//! | IST0106 | Error | an invalid field (validation) |
//! | IST0109 | Error | several VirtualServices bound to the mesh define the same host |
//! | IST0127 | Warning | an AuthorizationPolicy's selector matches no workload |
//! | IST0173 | Error | a DestinationRule subset selects no pods |
//! | IST0174 | Warning | a DestinationRule's host matches no service |
//! | WAR0101 | Warning | a field Warren does not honour yet, or one Istio does not define ([`crate::support`]) |
//!
//! Reading the input adds its own notices ([`ClusterState::notices`]). Pods are the state's pods; in a
//! directory those include the pods its Deployments would create, so a directory is analysed as the cluster
//! it describes once applied.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use kube::ResourceExt;

use crate::{
    check::{Checked, IstioObject},
    cluster::ClusterState,
    compile::{istio_order, qualify},
    tables::Origin,
    workloads::{ISTIO_AMBIENT_LABEL, MESH_LABEL, Pod, peer_authentication::ROOT_NAMESPACE},
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
        // As istioctl: `(Kind ns/name file:line)`; cluster-scoped objects without `ns/`, notices about a whole
        // kind or file with what they have.
        let Origin { kind, namespace, name, .. } = &self.object;
        let object = match (namespace.is_empty(), name.is_empty()) {
            (false, _) => format!("{namespace}/{name}"),
            (true, false) => name.clone(),
            (true, true) => String::new(),
        };
        let parts: Vec<&str> = [kind.as_str(), &object, self.source.as_deref().unwrap_or("")].into_iter().filter(|p| !p.is_empty()).collect();
        write!(f, "{level} [{}] ({}) ", self.code, parts.join(" "))?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.text)
    }
}

pub const REFERENCED_RESOURCE_NOT_FOUND: &str = "IST0101";
pub const NAMESPACE_NOT_ENROLLED: &str = "IST0102";
pub const SCHEMA_VALIDATION_ERROR: &str = "IST0106";
pub const CONFLICTING_HOSTS: &str = "IST0109";
pub const NO_MATCHING_WORKLOADS: &str = "IST0127";
pub const SUBSET_SELECTS_NO_PODS: &str = "IST0173";
pub const UNKNOWN_DESTINATION_RULE_HOST: &str = "IST0174";
pub const UNSUPPORTED_FIELD: &str = "WAR0101";
pub const INVALID_MESH_CONFIG: &str = "WAR0102";

/// Namespaces istioctl leaves out of the enrollment check.
const SYSTEM_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease", "local-path-storage", ROOT_NAMESPACE];

struct Report<'a> {
    state: &'a ClusterState,
    out: Vec<Message>,
}

impl Report<'_> {
    fn add(&mut self, level: Level, code: &'static str, object: &Origin, field: Option<String>, text: String) {
        let key = (object.kind.clone(), object.namespace.clone(), object.name.clone());
        let source = self.state.sources.get(&key).cloned();
        self.out.push(Message { level, code, object: object.clone(), field, text, source });
    }

    /// Validation errors and unsupported fields of one Istio object.
    fn object(&mut self, object: &Origin, istio: &impl IstioObject) {
        let Checked { errors, unsupported } = istio.check();
        for e in errors {
            self.add(Level::Error, SCHEMA_VALIDATION_ERROR, object, Some(e.field), e.reason);
        }
        for n in unsupported {
            self.add(Level::Warning, UNSUPPORTED_FIELD, object, Some(n.field), n.reason);
        }
    }
}

fn origin(kind: &str, meta: &kube::api::ObjectMeta) -> Origin {
    Origin::new(kind, meta.namespace.as_deref().unwrap_or("default"), meta.name.as_deref().unwrap_or(""), meta.generation)
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
}

/// Every finding, errors first.
pub fn analyze(state: &ClusterState) -> Vec<Message> {
    let mut report = Report { state, out: state.notices.clone() };
    let hosts = known_hosts(state);
    destination_rules(&mut report, &hosts);
    virtual_services(&mut report, &hosts);
    gateways(&mut report);
    for se in &state.service_entries {
        report.object(&origin("ServiceEntry", &se.metadata), se);
    }
    for ap in &state.authorization_policies {
        let o = origin("AuthorizationPolicy", &ap.metadata);
        report.object(&o, ap);
        if let Some(selector) = ap.spec.selector.as_ref().filter(|s| !s.match_labels.is_empty()) {
            let in_scope = |p: &&Pod| p.namespace == o.namespace || o.namespace == state.root_namespace();
            if !state.pods.iter().filter(in_scope).any(|p| selects(&selector.match_labels, p)) {
                let labels: Vec<String> = selector.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let text = format!("No matching workloads for this resource with the following labels: {}", labels.join(","));
                report.add(Level::Warning, NO_MATCHING_WORKLOADS, &o, Some("spec.selector".into()), text);
            }
        }
    }
    for pa in &state.peer_authentications {
        let o = Origin::new("PeerAuthentication", &pa.metadata.namespace, &pa.metadata.name, None);
        report.object(&o, pa);
    }
    namespaces(&mut report);
    if let Some((object, error)) = crate::compile::mesh_config_error(state) {
        let text = format!("{error}; Warren applies Istio's default mesh config (ALLOW_ANY) until it is fixed, as istiod does");
        report.add(Level::Error, INVALID_MESH_CONFIG, &object, Some("data.mesh".into()), text);
    }
    let mut out = report.out;
    out.sort();
    out
}

/// Hosts that exist: Services (qualified) and ServiceEntry hosts (as written, wildcards included).
fn known_hosts(state: &ClusterState) -> BTreeSet<String> {
    let mut hosts: BTreeSet<String> =
        state.services.iter().map(|s| qualify(&s.name_any(), &s.namespace().unwrap_or_default())).collect();
    hosts.extend(state.service_entries.iter().flat_map(|s| s.spec.hosts.iter().cloned()));
    hosts
}

/// Whether `host` (written in `namespace`) names a known host; ServiceEntry wildcards (`*.example.com`) match.
fn resolves(hosts: &BTreeSet<String>, host: &str, namespace: &str) -> bool {
    let host = qualify(host, namespace);
    hosts.contains(&host)
        || hosts.iter().any(|h| h.strip_prefix('*').is_some_and(|suffix| host.ends_with(suffix) && host.len() > suffix.len()))
}

fn destination_rules(report: &mut Report, hosts: &BTreeSet<String>) {
    let state = report.state;
    for dr in &state.destination_rules {
        let ns = dr.namespace().unwrap_or_default();
        let o = origin("DestinationRule", &dr.metadata);
        report.object(&o, dr);
        if dr.spec.host.is_empty() {
            continue;
        }
        if !resolves(hosts, &dr.spec.host, &ns) {
            let text = format!("The host {} defined in the DestinationRule does not match any services in the mesh.", dr.spec.host);
            report.add(Level::Warning, UNKNOWN_DESTINATION_RULE_HOST, &o, Some("spec.host".into()), text);
            continue;
        }
        // As istioctl: a subset's labels, with the service's selector, must match some pod.
        let host = qualify(&dr.spec.host, &ns);
        let selector = state
            .services
            .iter()
            .find(|s| qualify(&s.name_any(), &s.namespace().unwrap_or_default()) == host)
            .and_then(|s| s.spec.as_ref()?.selector.clone())
            .unwrap_or_default();
        for (i, subset) in dr.spec.subsets.iter().enumerate() {
            let wanted: BTreeMap<String, String> = selector.clone().into_iter().chain(subset.labels.clone()).collect();
            if !state.pods.iter().any(|p| selects(&wanted, p)) {
                let text = format!(
                    "The Subset {} defined in the DestinationRule does not select any pods. Which may lead to 503 UH (NoHealthyUpstream).",
                    subset.name
                );
                report.add(Level::Error, SUBSET_SELECTS_NO_PODS, &o, Some(format!("spec.subsets[{i}]")), text);
            }
        }
    }
}

fn bound_to_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == "mesh")
}

fn virtual_services(report: &mut Report, hosts: &BTreeSet<String>) {
    let state = report.state;
    // Subsets by host: every DestinationRule of the host adds its own (Istio merges them).
    let mut subsets: HashMap<String, BTreeSet<&str>> = HashMap::new();
    for dr in &state.destination_rules {
        let host = qualify(&dr.spec.host, &dr.namespace().unwrap_or_default());
        subsets.entry(host).or_default().extend(dr.spec.subsets.iter().map(|s| s.name.as_str()));
    }
    let gateway_names: BTreeSet<(String, String)> =
        state.gateways.iter().map(|g| (g.namespace().unwrap_or_default(), g.name_any())).collect();
    let mut claimed: BTreeMap<String, Vec<&crate::istio::VirtualService>> = BTreeMap::new();
    for vs in &state.virtual_services {
        let ns = vs.namespace().unwrap_or_default();
        let o = origin("VirtualService", &vs.metadata);
        report.object(&o, vs);
        for (i, gateway) in vs.spec.gateways.iter().enumerate().filter(|(_, g)| *g != "mesh") {
            let (gateway_ns, name) = gateway.split_once('/').unwrap_or((ns.as_str(), gateway));
            if !gateway_names.contains(&(gateway_ns.to_string(), name.to_string())) {
                let text = format!("Referenced gateway not found: {gateway:?}");
                report.add(Level::Error, REFERENCED_RESOURCE_NOT_FOUND, &o, Some(format!("spec.gateways[{i}]")), text);
            }
        }
        if bound_to_mesh(&vs.spec.gateways) {
            for host in vs.spec.hosts.iter().filter(|h| !h.contains('*')) {
                claimed.entry(qualify(host, &ns)).or_default().push(vs);
            }
        }
        for (field, d) in destinations(&vs.spec) {
            if d.host.is_empty() || d.host.contains('*') {
                continue; // a validation error already
            }
            if !resolves(hosts, &d.host, &ns) {
                report.add(Level::Error, REFERENCED_RESOURCE_NOT_FOUND, &o, Some(format!("{field}.host")), format!("Referenced host not found: {:?}", d.host));
            } else if let Some(subset) = &d.subset
                && !subsets.get(&qualify(&d.host, &ns)).is_some_and(|s| s.contains(subset.as_str()))
            {
                let text = format!("Referenced host+subset in destinationrule not found: \"{}+{subset}\"", d.host);
                report.add(Level::Error, REFERENCED_RESOURCE_NOT_FOUND, &o, Some(format!("{field}.subset")), text);
            }
        }
    }
    for (host, mut claimants) in claimed.into_iter().filter(|(_, c)| c.len() > 1) {
        claimants.sort_by(|a, b| istio_order(*a, *b));
        let names: Vec<String> = claimants.iter().map(|v| format!("{}/{}", v.namespace().unwrap_or_default(), v.name_any())).collect();
        let text = format!(
            "The VirtualServices {} associated with mesh gateway define the same host {host} which can lead to undefined behavior. \
             This can be fixed by merging the conflicting VirtualServices into a single resource. (Warren routes {host} by the oldest, {}.)",
            names.join(","),
            names[0]
        );
        for vs in claimants {
            report.add(Level::Error, CONFLICTING_HOSTS, &origin("VirtualService", &vs.metadata), Some("spec.hosts".into()), text.clone());
        }
    }
}

/// Every destination of a VirtualService with its field path.
fn destinations(spec: &crate::istio::VirtualServiceSpec) -> Vec<(String, &crate::istio::Destination)> {
    let http = spec.http.iter().enumerate().flat_map(|(i, h)| {
        h.route.iter().enumerate().map(move |(j, d)| (format!("spec.http[{i}].route[{j}].destination"), &d.destination))
    });
    let tcp = spec.tcp.iter().enumerate().flat_map(|(i, t)| {
        t.route.iter().enumerate().map(move |(j, d)| (format!("spec.tcp[{i}].route[{j}].destination"), &d.destination))
    });
    http.chain(tcp).collect()
}

fn gateways(report: &mut Report) {
    let state = report.state;
    for gw in &state.gateways {
        let o = origin("Gateway", &gw.metadata);
        report.object(&o, gw);
        // As istioctl: the gateway's workload (any namespace) must exist.
        if !gw.spec.selector.is_empty() && !state.pods.iter().any(|p| selects(&gw.spec.selector, p)) {
            let labels: Vec<String> = gw.spec.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let text = format!("Referenced selector not found: {:?}", labels.join(","));
            report.add(Level::Error, REFERENCED_RESOURCE_NOT_FOUND, &o, Some("spec.selector".into()), text);
        }
    }
}

/// As istioctl's injection check: every namespace that is not enrolled, unless it is a system namespace
/// or explicitly marked out of the mesh.
fn namespaces(report: &mut Report) {
    let state = report.state;
    for ns in &state.namespaces {
        let label = |key: &str| ns.labels.get(key).map(String::as_str);
        let enrolled = label(MESH_LABEL) == Some("enabled") || label(ISTIO_AMBIENT_LABEL) == Some("ambient");
        let opted_out = label(MESH_LABEL) == Some("disabled") || label(ISTIO_AMBIENT_LABEL) == Some("none");
        if enrolled || opted_out || SYSTEM_NAMESPACES.contains(&ns.name.as_str()) {
            continue;
        }
        let text = format!(
            "The namespace is not enrolled in the mesh. Run 'kubectl label namespace {0} {MESH_LABEL}=enabled' to enroll it, \
             or 'kubectl label namespace {0} {MESH_LABEL}=disabled' to mark it as not needing it.",
            ns.name
        );
        report.add(Level::Info, NAMESPACE_NOT_ENROLLED, &Origin::new("Namespace", "", &ns.name, None), None, text);
    }
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
        analyze(&state).into_iter().map(|m| Message { source: None, ..m }.to_string()).collect()
    }

    #[test]
    fn a_mesh_config_mode_that_is_not_one_is_an_error() {
        let map = |mode: &str| {
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata: {{mesh: 'outboundTrafficPolicy: {{mode: {mode}}}'}}\n")
        };
        let found = findings(&map("REGISTRY_ONLYY"));
        let line = "Error [WAR0102] (ConfigMap istio-system/istio) data.mesh: mesh: outboundTrafficPolicy.mode \"REGISTRY_ONLYY\" is not a mode (ALLOW_ANY, REGISTRY_ONLY); Warren applies Istio's default mesh config (ALLOW_ANY) until it is fixed, as istiod does";
        assert!(found.iter().any(|f| f == line), "{found:#?}");
        assert!(!findings(&map("REGISTRY_ONLY")).iter().any(|f| f.contains("WAR0102")), "control: a valid mode");
    }

    #[test]
    fn reports_what_istioctl_analyze_would() {
        let found = findings(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: shop}\n\
             spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v3}, weight: -70}, {destination: {host: ratings}, weight: 20}]}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: b, namespace: shop}\n\
             spec: {hosts: [reviews.shop.svc.cluster.local], gateways: [mesh, edge], tcp: [{route: [{destination: {host: reviews}}]}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: c, namespace: other}\n\
             spec: {hosts: [reviews.shop], tcp: [{route: [{destination: {host: reviews.shop}}]}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: typo, namespace: shop}\nspec: {host: reveiws}\n",
        );
        let expect = [
            "Error [IST0106] (VirtualService shop/a) spec.http[0].route[0].weight: -70 is negative",
            "Error [IST0101] (VirtualService shop/a) spec.http[0].route[0].destination.subset: Referenced host+subset in destinationrule not found: \"reviews+v3\"",
            "Error [IST0101] (VirtualService shop/a) spec.http[0].route[1].destination.host: Referenced host not found: \"ratings\"",
            "Error [IST0101] (VirtualService shop/b) spec.gateways[1]: Referenced gateway not found: \"edge\"",
            // `reviews.shop` has a dot: Istio takes it as written, so it is not reviews.shop.svc.cluster.local.
            "Error [IST0101] (VirtualService other/c) spec.tcp[0].route[0].destination.host: Referenced host not found: \"reviews.shop\"",
            "Error [IST0173] (DestinationRule shop/reviews) spec.subsets[1]: The Subset v2 defined in the DestinationRule does not select any pods. Which may lead to 503 UH (NoHealthyUpstream).",
            "Warning [IST0174] (DestinationRule shop/typo) spec.host: The host reveiws defined in the DestinationRule does not match any services in the mesh.",
            "Info [IST0102] (Namespace other) The namespace is not enrolled in the mesh. Run 'kubectl label namespace other warren.dev/mesh=enabled' to enroll it, or 'kubectl label namespace other warren.dev/mesh=disabled' to mark it as not needing it.",
        ];
        for line in expect {
            assert!(found.iter().any(|f| f == line), "missing {line:?} in {found:#?}");
        }
        let conflict = found.iter().filter(|f| f.starts_with("Error [IST0109]")).count();
        assert_eq!(conflict, 2, "a and b both claim reviews.shop.svc.cluster.local: {found:#?}");
        assert!(!found.iter().any(|f| f.contains("VirtualService other/c) spec.hosts")), "VirtualService hosts naming no service are not reported (as Istio)");
        let external = findings(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: shop}\n\
             spec: {hosts: [api.example.com], ports: [{number: 443, name: https, protocol: TLS}], resolution: DNS}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api, namespace: shop}\n\
             spec: {hosts: [api.example.com], tcp: [{route: [{destination: {host: api.example.com}}]}]}\n",
        );
        assert!(!external.iter().any(|f| f.contains("IST0101")), "a dotted ServiceEntry host is not qualified: {external:#?}");
        assert_eq!(findings(""), ["Error [IST0173] (DestinationRule shop/reviews) spec.subsets[1]: The Subset v2 defined in the DestinationRule does not select any pods. Which may lead to 503 UH (NoHealthyUpstream)."], "control");
    }
}
