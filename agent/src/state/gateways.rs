//! The Istio Gateways this node's gateway pods serve, indexed once per table version: per pod and port the
//! servers listening there (each with its TLS server compiled from the pushed credential), and per gateway
//! the VirtualServices bound to it with their `http` rules compiled.
//!
//! A request picks its server by host (the SNI, then `Host`), then the first bound VirtualService whose
//! hosts take that host and whose namespace the server's `namespace/host` allows, then that
//! VirtualService's first matching rule — as Istio's gateway does.
use std::{collections::HashMap, sync::Arc};

use warren_api::tables::{Credential, Gateway, GatewayServer, Resource, Route, ServerTlsMode, Tables};

use super::http_routes::CompiledRoute;

/// One server of one gateway, ready to serve.
#[derive(Debug)]
pub struct ServerBinding {
    /// `namespace/name` of the Gateway.
    pub gateway: String,
    pub server: GatewayServer,
    /// The TLS server for SIMPLE / MUTUAL, or why it cannot be built (connections are then refused).
    pub tls: Option<Result<Arc<rustls::ServerConfig>, String>>,
}

impl ServerBinding {
    /// Whether the server takes requests (or a TLS handshake) for `host` (lower case, no port).
    pub fn takes(&self, host: &str) -> bool {
        self.server.hosts.iter().any(|h| host_matches(split_host(h).1, host))
    }

    /// Why connections to this server are refused, if they are.
    pub fn refusal(&self) -> Option<String> {
        if let Some(reason) = &self.server.refused {
            return Some(reason.clone());
        }
        match &self.tls {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }

    pub fn terminates_tls(&self) -> bool {
        self.server.tls.as_ref().is_some_and(|t| matches!(t.mode, ServerTlsMode::Simple | ServerTlsMode::Mutual))
    }

    pub fn passthrough(&self) -> bool {
        self.server.tls.as_ref().is_some_and(|t| t.mode == ServerTlsMode::Passthrough)
    }
}

/// The servers on one port of one pod.
#[derive(Debug, Default)]
pub struct PortServers {
    pub servers: Vec<Arc<ServerBinding>>,
}

impl PortServers {
    /// The server for `host`: the first that takes it (servers in the gateways' order).
    pub fn for_host(&self, host: &str) -> Option<&Arc<ServerBinding>> {
        self.servers.iter().find(|s| s.takes(host))
    }

    pub fn terminates_tls(&self) -> bool {
        self.servers.iter().any(|s| s.terminates_tls())
    }

    /// TLS is routed unterminated on this port (a PASSTHROUGH server): the SNI picks the server.
    pub fn passthrough(&self) -> bool {
        self.servers.iter().any(|s| s.passthrough())
    }
}

/// A VirtualService bound to a gateway.
#[derive(Debug)]
pub struct BoundRoute {
    pub namespace: String,
    pub hosts: Vec<String>,
    pub compiled: Arc<CompiledRoute>,
    /// Its `tls` rules, for PASSTHROUGH servers.
    pub tls: Vec<warren_api::tables::TlsRule>,
}

#[derive(Debug, Default)]
pub struct GatewayIndex {
    /// Pod `namespace/name` → port → servers.
    by_pod: HashMap<String, HashMap<u16, Arc<PortServers>>>,
    /// Gateway `namespace/name` → bound VirtualServices, in name order.
    routes: HashMap<String, Vec<BoundRoute>>,
}

impl GatewayIndex {
    pub fn new(tables: &Tables) -> GatewayIndex {
        let mut index = GatewayIndex::default();
        let credentials: HashMap<String, &Credential> = tables
            .values()
            .filter_map(|r| match r {
                Resource::Credential(c) => Some((format!("{}/{}", c.namespace, c.name), c)),
                _ => None,
            })
            .collect();
        let gateways: Vec<&Gateway> = tables.values().filter_map(|r| if let Resource::Gateway(g) = r { Some(g) } else { None }).collect();
        for gateway in &gateways {
            for pod in &gateway.workloads {
                let namespace = pod.split_once('/').map(|(ns, _)| ns).unwrap_or_default();
                for server in &gateway.servers {
                    let binding = Arc::new(bind(gateway, server, namespace, &credentials));
                    for port in &server.listen_ports {
                        let ports = index.by_pod.entry(pod.clone()).or_default();
                        let entry = ports.entry(*port).or_insert_with(|| Arc::new(PortServers::default()));
                        Arc::get_mut(entry).expect("built here, not shared yet").servers.push(binding.clone());
                    }
                }
            }
        }
        for route in tables.values().filter_map(|r| if let Resource::Route(r) = r { Some(r) } else { None }) {
            for gateway in &gateways {
                let key = gateway.key();
                if route.binds(&key) && (!route.http.is_empty() || !route.tls.is_empty()) {
                    index.routes.entry(key).or_default().push(bound(route));
                }
            }
        }
        index
    }

    /// The servers a gateway pod listens with on `port`.
    pub fn servers(&self, pod: &str, port: u16) -> Option<&Arc<PortServers>> {
        self.by_pod.get(pod)?.get(&port)
    }

    /// Whether `pod` is a gateway pod here at all.
    pub fn serves(&self, pod: &str) -> bool {
        self.by_pod.contains_key(pod)
    }

    /// The VirtualService that routes `host` through `binding`'s server: one naming the host exactly wins
    /// over a wildcard, then name order.
    pub fn route_for(&self, binding: &ServerBinding, host: &str) -> Option<&BoundRoute> {
        self.find(binding, host, |r| !r.compiled.rules.is_empty())
    }

    /// [`GatewayIndex::route_for`] among the VirtualServices with `tls` rules (PASSTHROUGH servers).
    pub fn tls_route_for(&self, binding: &ServerBinding, host: &str) -> Option<&BoundRoute> {
        self.find(binding, host, |r| !r.tls.is_empty())
    }

    fn find(&self, binding: &ServerBinding, host: &str, wanted: impl Fn(&BoundRoute) -> bool) -> Option<&BoundRoute> {
        let candidates: Vec<&BoundRoute> = self
            .routes
            .get(&binding.gateway)?
            .iter()
            .filter(|r| wanted(r) && allowed_namespace(binding, &r.namespace, host))
            .collect();
        let exact = candidates.iter().find(|r| r.hosts.iter().any(|h| h == host));
        exact.or_else(|| candidates.iter().find(|r| r.hosts.iter().any(|h| host_matches(h, host)))).copied()
    }

    /// For `inspect gateways`: per gateway pod, the ports and servers (never keys).
    pub fn view(&self) -> serde_json::Value {
        let mut pods: Vec<_> = self.by_pod.iter().collect();
        pods.sort_by(|a, b| a.0.cmp(b.0));
        let pods: Vec<_> = pods
            .into_iter()
            .map(|(pod, ports)| {
                let mut ports: Vec<_> = ports.iter().collect();
                ports.sort_by_key(|(p, _)| **p);
                let servers: Vec<_> = ports
                    .into_iter()
                    .flat_map(|(port, servers)| {
                        servers.servers.iter().map(move |s| {
                            let routes: Vec<String> = self
                                .routes
                                .get(&s.gateway)
                                .into_iter()
                                .flatten()
                                .map(|r| r.compiled.origin.to_string())
                                .collect();
                            serde_json::json!({
                                "port": port, "gateway": s.gateway, "server": format!("spec.servers[{}]", s.server.index),
                                "protocol": s.server.protocol, "hosts": s.server.hosts,
                                "tls": s.server.tls.as_ref().map(|t| t.mode), "credential": s.server.tls.as_ref().and_then(|t| t.credential.clone()),
                                "refused": s.refusal(), "virtualServices": routes,
                            })
                        })
                    })
                    .collect();
                serde_json::json!({"pod": pod, "servers": servers})
            })
            .collect();
        serde_json::Value::Array(pods)
    }
}

fn bind(gateway: &Gateway, server: &GatewayServer, pod_namespace: &str, credentials: &HashMap<String, &Credential>) -> ServerBinding {
    let tls = server.tls.as_ref().filter(|t| matches!(t.mode, ServerTlsMode::Simple | ServerTlsMode::Mutual)).map(|t| {
        let name = t.credential.as_deref().unwrap_or_default();
        let key = format!("{pod_namespace}/{name}");
        let credential = credentials.get(&key).ok_or_else(|| format!("credentialName {name:?}: no Secret {key} (or it has no tls.crt/tls.key)"))?;
        let client_ca = match t.mode {
            ServerTlsMode::Mutual => {
                Some(credential.ca_pem.as_deref().ok_or_else(|| format!("MUTUAL: Secret {key} has no ca.crt (nor {key}-cacert)"))?)
            }
            _ => None,
        };
        let versions = warren_identity::tls::gateway_versions(t.min_version.as_deref(), t.max_version.as_deref())
            .map_err(|e| format!("tls: {e}"))?;
        warren_identity::tls::gateway_server_config(&credential.cert_pem, &credential.key_pem, client_ca, &versions)
            .map(Arc::new)
            .map_err(|e| format!("Secret {key}: {e}"))
    });
    ServerBinding { gateway: gateway.key(), server: server.clone(), tls }
}

fn bound(route: &Route) -> BoundRoute {
    BoundRoute {
        namespace: route.origin.namespace.clone(),
        hosts: route.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        compiled: CompiledRoute::compile(route),
        tls: route.tls.clone(),
    }
}

/// A server host `namespace/dnsName` (a bare name is `*/name`).
fn split_host(host: &str) -> (&str, &str) {
    host.split_once('/').unwrap_or(("*", host))
}

/// Whether a VirtualService in `namespace` may take `host` on this server: one of the server's hosts
/// matching it names that namespace, `*`, or `.` (the Gateway's own).
fn allowed_namespace(binding: &ServerBinding, namespace: &str, host: &str) -> bool {
    let gateway_namespace = binding.gateway.split_once('/').map(|(ns, _)| ns).unwrap_or_default();
    binding.server.hosts.iter().map(|h| split_host(h)).any(|(ns, name)| {
        let ns_ok = ns == "*" || ns == namespace || (ns == "." && namespace == gateway_namespace);
        // A VirtualService's `*` host takes whatever the server's host allows.
        ns_ok && (host_matches(name, host) || name == "*")
    })
}

/// `*` matches every host, `*.example.com` any name ending in `.example.com`; otherwise the same name.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.len() > suffix.len() && host.ends_with(&suffix.to_ascii_lowercase()),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// `Host` / `:authority` / SNI as the server and route hosts are matched: lower case, without the port.
pub fn request_host(authority: &str) -> String {
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or(bracketed),
        None => match authority.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => authority,
        },
    };
    host.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_as_istio_and_lose_their_port() {
        assert!(host_matches("*", "bookinfo.example") && host_matches("*.example", "a.example"));
        assert!(!host_matches("*.example", "example") && !host_matches("a.example", "b.example"));
        assert!(host_matches("Bookinfo.Example", "bookinfo.example"));
        assert_eq!(request_host("Bookinfo.example:8080"), "bookinfo.example");
        assert_eq!(request_host("bookinfo.example"), "bookinfo.example");
        assert_eq!(request_host("[2001:db8::1]:80"), "2001:db8::1");
        assert_eq!(request_host("10.0.0.1:80"), "10.0.0.1");
    }
}
