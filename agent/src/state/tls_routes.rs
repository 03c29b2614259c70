//! VirtualService `tls` rules: unterminated TLS routed by the ClientHello's SNI, in the source's agent
//! (mesh) or at a gateway's PASSTHROUGH server. The first rule one of whose match blocks takes the
//! connection wins, as in Istio; blocks are OR'ed, conditions within a block AND'ed.
use warren_api::{
    tables::{TlsMatch, TlsRule, qualify_gateway},
    workloads::Pod,
};

use super::gateways::host_matches;

/// Where the connection is and who opened it.
#[derive(Debug, Clone, Copy)]
pub struct TlsContext<'a> {
    /// The SNI, lower case (`None`: the client sent none).
    pub sni: Option<&'a str>,
    /// The service (or gateway server) port the client addressed.
    pub port: u16,
    /// `mesh`, or the gateway's `namespace/name`.
    pub gateway: &'a str,
    /// The VirtualService's namespace, for short gateway names.
    pub namespace: &'a str,
    pub source: Option<&'a Pod>,
}

fn block_matches(m: &TlsMatch, c: &TlsContext) -> bool {
    c.sni.is_some_and(|sni| m.sni_hosts.iter().any(|h| host_matches(h, sni)))
        && m.port.is_none_or(|p| p == c.port)
        && (m.gateways.is_empty() || m.gateways.iter().any(|g| qualify_gateway(g, c.namespace) == c.gateway))
        && m.source_namespace.as_deref().is_none_or(|ns| c.source.is_some_and(|p| p.namespace == ns))
        && m.source_labels.iter().all(|(k, v)| c.source.and_then(|p| p.labels.get(k)) == Some(v))
}

/// The rule that takes the connection, if one does.
pub fn select<'r>(rules: &'r [TlsRule], context: &TlsContext) -> Option<&'r TlsRule> {
    rules.iter().find(|r| r.matches.is_empty() || r.matches.iter().any(|m| block_matches(m, context)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> Vec<TlsRule> {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn the_first_rule_whose_sni_port_and_gateway_match_takes_it() {
        let r = rules(
            "- matches: [{sniHosts: ['*.example.com'], port: 443, gateways: [edge]}]\n  destinations: [{service: a, weight: 100}]\n\
             - matches: [{sniHosts: [api.example.com]}]\n  destinations: [{service: b, weight: 100}]\n",
        );
        let at = |sni: Option<&'static str>, port, gateway| TlsContext { sni, port, gateway, namespace: "shop", source: None };
        let picked = |c| select(&r, &c).map(|r| r.destinations[0].service.clone());
        assert_eq!(picked(at(Some("www.example.com"), 443, "shop/edge")), Some("a".into()));
        assert_eq!(picked(at(Some("api.example.com"), 443, "mesh")), Some("b".into()), "the gateway block does not apply to mesh");
        assert_eq!(picked(at(Some("api.example.com"), 8443, "shop/edge")), Some("b".into()), "port");
        assert_eq!(picked(at(Some("other.org"), 443, "shop/edge")), None, "control: no SNI match");
        assert_eq!(picked(at(None, 443, "shop/edge")), None, "no SNI: no sniHosts match");
    }
}
