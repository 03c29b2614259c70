//! ServiceEntry → services: one per host, with the entry's addresses (single ones as VIPs, every one as an
//! address block for resolution NONE), ports, endpoints and resolution.
use std::{collections::HashMap, net::IpAddr};

use kube::ResourceExt;

use super::SubsetsOf;
use crate::{
    istio::{ServiceEntry, WorkloadEntry},
    tables::{Endpoint, Origin, Resolution, Service, ServicePort},
};

pub(super) fn resolution(written: Option<&str>) -> Resolution {
    match written.unwrap_or("NONE") {
        "STATIC" => Resolution::Static,
        "DNS" => Resolution::Dns,
        "DNS_ROUND_ROBIN" => Resolution::DnsRoundRobin,
        _ => Resolution::None,
    }
}

pub(super) fn compile(se: &ServiceEntry, subsets: &HashMap<String, SubsetsOf>) -> Vec<Service> {
    let ns = se.namespace().unwrap_or_default();
    let resolution = resolution(se.spec.resolution.as_deref());
    let ports: Vec<ServicePort> = se
        .spec
        .ports
        .iter()
        .map(|p| ServicePort {
            name: p.name.clone(),
            port: p.number as u16,
            target_port: p.target_port.unwrap_or(p.number) as u16,
            protocol: p.protocol.clone(),
            app_protocol: Some(p.protocol.clone()).filter(|p| !p.is_empty()),
        })
        .collect();
    let address_blocks: Vec<crate::authz::IpNet> = se.spec.addresses.iter().filter_map(|a| a.parse().ok()).collect();
    se.spec
        .hosts
        .iter()
        .map(|host| {
            let name = if se.spec.hosts.len() == 1 { se.name_any() } else { format!("{}-{host}", se.name_any()) };
            let dr = subsets.get(host.as_str());
            let subset_names = |e: &WorkloadEntry| -> Vec<String> {
                dr.map(|d| {
                    d.subsets
                        .iter()
                        .filter(|(_, sel)| sel.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
                        .map(|(n, _)| n.to_string())
                        .collect()
                })
                .unwrap_or_default()
            };
            let mut endpoints: Vec<Endpoint> = se.spec.endpoints.iter().filter_map(|e| endpoint(e, resolution, subset_names(e))).collect();
            // DNS with no endpoints: the host itself is looked up (Istio's usual external-service entry).
            if endpoints.is_empty() && matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin) && !host.starts_with('*') {
                endpoints.push(named_endpoint(host, Vec::new(), None));
            }
            let mut service = Service {
                namespace: ns.clone(),
                name,
                hostname: host.clone(),
                vips: se.spec.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                ports: ports.clone(),
                endpoints,
                subsets: dr.map(|d| d.subsets.iter().map(|(n, _)| n.to_string()).collect()).unwrap_or_default(),
                origin: Origin::new("ServiceEntry", &ns, &se.name_any(), se.metadata.generation),
                subset_origin: dr.map(|d| d.origin.clone()),
                address_blocks: if resolution == Resolution::None { address_blocks.clone() } else { Vec::new() },
                resolution: Some(resolution),
                ..Default::default()
            };
            if let Some(dr) = dr {
                dr.policies.apply(&mut service);
            }
            service
        })
        .collect()
}

/// An endpoint by address; with resolution DNS, a name is looked up when a connection goes to it.
fn endpoint(e: &WorkloadEntry, resolution: Resolution, subsets: Vec<String>) -> Option<Endpoint> {
    if let Ok(ip) = e.address.parse::<IpAddr>() {
        return Some(Endpoint { ip, workload: None, node: None, subsets, locality: e.locality.clone(), hostname: None });
    }
    matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
        .then(|| named_endpoint(&e.address, subsets, e.locality.clone()))
}

fn named_endpoint(host: &str, subsets: Vec<String>, locality: Option<String>) -> Endpoint {
    Endpoint {
        ip: IpAddr::from([0, 0, 0, 0]),
        workload: None,
        node: None,
        subsets,
        locality,
        hostname: Some(host.to_string()),
    }
}
