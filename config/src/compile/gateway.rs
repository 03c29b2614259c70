//! Gateways → what the agents of their pods serve: the pods each selector picks (any namespace, as Istio),
//! each server's ports, hosts and TLS; the `credentialName` Secrets those servers use, addressed to the
//! nodes of those pods only; and Istio's mesh config (`outboundTrafficPolicy`).
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{api::core::v1 as core, apimachinery::pkg::util::intstr::IntOrString};
use kube::ResourceExt;

use super::MESH_CONFIG_MAP;
use crate::{
    cluster::ClusterState,
    istio,
    tables::{
        Credential, Gateway, GatewayProtocol, GatewayServer, MeshConfig, Origin, OutboundTrafficPolicy, ServerTls,
        ServerTlsMode,
    },
    workloads::Pod,
};

pub(super) fn compile(state: &ClusterState) -> (Vec<Gateway>, Vec<Credential>) {
    let mut gateways = Vec::new();
    // (namespace, secret name) → nodes of the gateway pods that use it.
    let mut wanted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for gw in &state.gateways {
        let selector = &gw.spec.selector;
        let pods: Vec<&Pod> = state
            .pods
            .iter()
            .filter(|p| !selector.is_empty() && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .collect();
        let servers: Vec<GatewayServer> =
            gw.spec.servers.iter().enumerate().filter_map(|(i, s)| server(i, s, &pods, &state.services)).collect();
        for credential in servers.iter().filter_map(|s| s.tls.as_ref()?.credential.as_ref()) {
            for pod in &pods {
                let nodes = wanted.entry((pod.namespace.clone(), credential.clone())).or_default();
                nodes.extend(pod.node.clone().filter(|n| !n.is_empty()));
            }
        }
        let ns = gw.namespace().unwrap_or_default();
        gateways.push(Gateway {
            origin: Origin::new("Gateway", &ns, &gw.name_any(), gw.metadata.generation),
            workloads: pods.iter().map(|p| p.key()).collect(),
            servers,
        });
    }
    let credentials = wanted
        .into_iter()
        .filter_map(|((namespace, name), nodes)| credential(state, &namespace, &name, nodes.into_iter().collect()))
        .collect();
    (gateways, credentials)
}

fn server(index: usize, s: &istio::GatewayServer, pods: &[&Pod], services: &[core::Service]) -> Option<GatewayServer> {
    let port = s.port.as_ref()?;
    let number = u16::try_from(port.number).ok()?;
    let (tls, mut refused) = match &s.tls {
        Some(tls) => server_tls(tls),
        None => (None, None),
    };
    let protocol = GatewayProtocol::parse(&port.protocol).unwrap_or_default();
    let passthrough = tls.as_ref().is_some_and(|t| t.mode == ServerTlsMode::Passthrough);
    if refused.is_none() && !protocol.is_http() && !passthrough {
        let reason = "only HTTP servers and TLS PASSTHROUGH are served yet: connections are refused";
        refused = Some(format!("port.protocol {}: {reason}", port.protocol));
    }
    Some(GatewayServer {
        index,
        name: s.name.clone(),
        port: number,
        listen_ports: listen_ports(number, pods, services),
        protocol,
        hosts: s.hosts.clone(),
        tls,
        refused,
    })
}

/// The port itself, and the target port of every Service port `number` that selects one of the pods (a
/// gateway's Service maps 80 → 8080; Istio's Gateway names the Service port).
fn listen_ports(number: u16, pods: &[&Pod], services: &[core::Service]) -> Vec<u16> {
    let mut ports = BTreeSet::from([number]);
    for svc in services {
        let spec = svc.spec.clone().unwrap_or_default();
        let Some(selector) = spec.selector.filter(|s| !s.is_empty()) else { continue };
        let ns = svc.namespace().unwrap_or_default();
        let selects = pods.iter().any(|p| p.namespace == ns && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)));
        if !selects {
            continue;
        }
        for p in spec.ports.iter().flatten().filter(|p| p.port == i32::from(number)) {
            if let Some(IntOrString::Int(target)) = p.target_port
                && let Ok(target) = u16::try_from(target)
            {
                ports.insert(target);
            }
        }
    }
    ports.into_iter().collect()
}

/// `servers[].tls`, and why the server must be refused when it asks for what Warren cannot enforce.
fn server_tls(tls: &istio::ServerTlsSettings) -> (Option<ServerTls>, Option<String>) {
    let mode = match tls.mode.as_deref() {
        None => ServerTlsMode::None,
        Some("SIMPLE") => ServerTlsMode::Simple,
        Some("MUTUAL") => ServerTlsMode::Mutual,
        Some("PASSTHROUGH") => ServerTlsMode::Passthrough,
        Some(other) => {
            let reason = format!("tls.mode {other} is not supported: connections to this server are refused");
            return (None, Some(reason));
        }
    };
    let settings = ServerTls {
        mode,
        credential: tls.credential_name.clone(),
        https_redirect: tls.https_redirect.unwrap_or(false),
        min_version: tls.min_protocol_version.clone().filter(|v| v != "TLS_AUTO"),
        max_version: tls.max_protocol_version.clone().filter(|v| v != "TLS_AUTO"),
    };
    let terminates = matches!(mode, ServerTlsMode::Simple | ServerTlsMode::Mutual);
    let pinned = !tls.subject_alt_names.is_empty()
        || !tls.verify_certificate_spki.is_empty()
        || !tls.verify_certificate_hash.is_empty()
        || tls.ca_crl.is_some();
    let refused = if terminates && settings.credential.is_none() {
        Some("tls: only credentialName is supported for certificates (not files in the pod): connections are refused".to_string())
    } else if mode == ServerTlsMode::Mutual && pinned {
        Some("tls: client-certificate pinning and CRLs (subjectAltNames, verifyCertificate*, caCrl) cannot be enforced: connections are refused".to_string())
    } else if matches!(settings.max_version.as_deref(), Some("TLSV1_0" | "TLSV1_1")) {
        Some("tls.maxProtocolVersion below TLSV1_2 cannot be served: connections are refused".to_string())
    } else {
        None
    };
    (Some(settings), refused)
}

/// The Secret `namespace/name` as a credential: `tls.crt`/`tls.key` (kubernetes.io/tls) or `cert`/`key`
/// (generic), the client CA from `ca.crt`/`cacert` or the `<name>-cacert` Secret, as Istio reads them.
fn credential(state: &ClusterState, namespace: &str, name: &str, nodes: Vec<String>) -> Option<Credential> {
    let find = |name: &str| state.secrets.iter().find(|s| s.namespace().as_deref() == Some(namespace) && s.name_any() == name);
    let secret = find(name)?;
    let value = |secret: &core::Secret, keys: &[&str]| -> Option<String> {
        keys.iter().find_map(|key| {
            let data = secret.data.as_ref().and_then(|d| d.get(*key)).and_then(|b| String::from_utf8(b.0.clone()).ok());
            data.or_else(|| secret.string_data.as_ref().and_then(|d| d.get(*key)).cloned())
        })
    };
    let ca_keys = ["ca.crt", "cacert"];
    let ca_pem = value(secret, &ca_keys).or_else(|| find(&format!("{name}-cacert")).and_then(|s| value(s, &ca_keys)));
    Some(Credential {
        namespace: namespace.into(),
        name: name.into(),
        cert_pem: value(secret, &["tls.crt", "cert"])?,
        key_pem: value(secret, &["tls.key", "key"])?,
        ca_pem,
        nodes,
        origin: Origin::new("Secret", namespace, name, secret.metadata.generation),
    })
}

/// `outboundTrafficPolicy.mode` from the root namespace's `istio` ConfigMap (its `mesh` key, YAML), as
/// Istio reads its mesh config; ALLOW_ANY when there is none — or when it cannot be read, as istiod falls
/// back to the default mesh config (`analyze` reports it: [`mesh_config_error`]).
pub(super) fn mesh_config(state: &ClusterState) -> MeshConfig {
    let Some((origin, mesh)) = mesh_config_map(state) else {
        return MeshConfig::default();
    };
    MeshConfig { outbound_traffic_policy: outbound_traffic_policy(mesh).unwrap_or_default(), origin: Some(origin) }
}

/// The root namespace's `istio` ConfigMap and its `mesh` text.
fn mesh_config_map(state: &ClusterState) -> Option<(Origin, &str)> {
    let root = state.root_namespace();
    let map = state.mesh_config_maps.iter().find(|c| c.namespace().as_deref() == Some(root) && c.name_any() == MESH_CONFIG_MAP)?;
    let origin = Origin::new("ConfigMap", root, MESH_CONFIG_MAP, map.metadata.generation);
    Some((origin, map.data.as_ref().and_then(|d| d.get("mesh")).map(String::as_str).unwrap_or("")))
}

/// Why the mesh config cannot be read as written, naming the field and value.
pub fn mesh_config_error(state: &ClusterState) -> Option<(Origin, String)> {
    let (origin, mesh) = mesh_config_map(state)?;
    outbound_traffic_policy(mesh).err().map(|e| (origin, e))
}

/// The mode in a mesh config text; `Err` names what is wrong (analyze reports it; ALLOW_ANY applies).
pub fn outbound_traffic_policy(mesh: &str) -> Result<OutboundTrafficPolicy, String> {
    let value: serde_json::Value = serde_yaml::from_str(mesh).map_err(|e| format!("mesh: not YAML: {e}"))?;
    match value.pointer("/outboundTrafficPolicy/mode").and_then(serde_json::Value::as_str) {
        None => Ok(OutboundTrafficPolicy::AllowAny),
        Some("ALLOW_ANY") => Ok(OutboundTrafficPolicy::AllowAny),
        Some("REGISTRY_ONLY") => Ok(OutboundTrafficPolicy::RegistryOnly),
        Some(other) => Err(format!("mesh: outboundTrafficPolicy.mode {other:?} is not a mode (ALLOW_ANY, REGISTRY_ONLY)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;

    const STATE: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: gw, namespace: istio-system, uid: g1, labels: {istio: ingressgateway}}\n\
        spec: {containers: [], nodeName: n1}\nstatus: {podIP: 10.244.1.9}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: istio-ingressgateway, namespace: istio-system}\n\
        spec: {selector: {istio: ingressgateway}, ports: [{port: 443, targetPort: 8443}]}\n---\n\
        apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {name: cred, namespace: istio-system}\n\
        stringData: {tls.crt: CERT, tls.key: KEY}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: web, namespace: default}\n\
        spec:\n  selector: {istio: ingressgateway}\n  servers:\n\
        \x20 - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [web.example]\n    tls: {mode: SIMPLE, credentialName: cred}\n\
        \x20 - port: {number: 8080, name: https-files, protocol: HTTPS}\n    hosts: [web.example]\n    tls: {mode: SIMPLE, serverCertificate: /etc/cert.pem, privateKey: /etc/key.pem}\n\
        \x20 - port: {number: 9000, name: tcp, protocol: TCP}\n    hosts: ['*']\n";

    #[test]
    fn gateways_select_pods_map_service_ports_and_refuse_what_they_cannot_serve() {
        let mut state = ClusterState::default();
        state.add_yaml(STATE).unwrap();
        let (gateways, credentials) = super::compile(&state);
        assert_eq!(gateways[0].workloads, ["istio-system/gw"], "the selector, across namespaces");
        let servers = &gateways[0].servers;
        assert_eq!(servers[0].listen_ports, [443, 8443], "the port and its Service's targetPort");
        assert_eq!(servers[0].tls.as_ref().and_then(|t| t.credential.as_deref()), Some("cred"));
        assert!(servers[0].refused.is_none(), "{:?}", servers[0].refused);
        assert!(servers[1].refused.as_deref().is_some_and(|r| r.contains("credentialName")), "certificate files: fail closed");
        assert!(servers[2].refused.as_deref().is_some_and(|r| r.contains("TCP")), "TCP servers are not served yet");
        // The key is looked up in the gateway pod's namespace and goes to its node only.
        assert_eq!((credentials[0].namespace.as_str(), credentials[0].cert_pem.as_str()), ("istio-system", "CERT"));
        let compiled = compile(&state);
        assert!(compiled.for_node("n1").contains_key("credential/istio-system/cred"));
        assert!(!compiled.for_node("n2").contains_key("credential/istio-system/cred"), "never to other nodes");
        assert!(!format!("{:?}", credentials[0]).contains("KEY"), "Debug never prints the key");
    }

    #[test]
    fn outbound_traffic_policy_is_read_from_the_root_namespaces_istio_config_map() {
        assert_eq!(outbound_traffic_policy("outboundTrafficPolicy: {mode: REGISTRY_ONLY}"), Ok(OutboundTrafficPolicy::RegistryOnly));
        assert_eq!(outbound_traffic_policy("defaultConfig: {}"), Ok(OutboundTrafficPolicy::AllowAny), "Istio's default");
        assert!(outbound_traffic_policy("outboundTrafficPolicy: {mode: CLOSED}").unwrap_err().contains("\"CLOSED\""));
        let mut state = ClusterState::default();
        let map = |ns: &str| format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: {ns}}}\ndata: {{mesh: 'outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}'}}\n");
        state.add_yaml(&map("elsewhere")).unwrap();
        assert_eq!(mesh_config(&state).outbound_traffic_policy, OutboundTrafficPolicy::AllowAny, "control: not the root namespace");
        state.add_yaml(&map("istio-system")).unwrap();
        assert_eq!(mesh_config(&state).outbound_traffic_policy, OutboundTrafficPolicy::RegistryOnly);
        assert!(mesh_config_error(&state).is_none(), "a valid mode is no error");
    }
}
