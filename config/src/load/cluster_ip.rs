//! Cluster IPs for a directory's Services, as the API server would assign them: a directory stands in for a
//! cluster, and its Services are usually written without `spec.clusterIP` (the API server allocates one on
//! create). Without one a Service has no VIP, and nothing addressed to it is routed. Only directory mode
//! allocates; from an API server every Service already has its address.
//!
//! Each Service with no `clusterIP` (not headless `None`, not `type: ExternalName`) gets an address of
//! [`RANGE`] (kubeadm's default service CIDR) from a hash of its `namespace/name`, probing on past addresses
//! already taken: the explicit `clusterIP`s of the directory first, then the allocations in sorted
//! `namespace/name` order. So the same directory always yields the same addresses, whatever the file order,
//! and a Service keeps its address across reloads unless a Service added later hashes onto the same address
//! and sorts before it (one chance in tens of thousands per Service).
use std::{collections::HashSet, net::Ipv4Addr};

use kube::ResourceExt;

use super::assemble::fnv1a;
use crate::cluster::ClusterState;

/// 10.96.0.0/16: its base address and size.
pub const RANGE: (Ipv4Addr, u32) = (Ipv4Addr::new(10, 96, 0, 0), 1 << 16);

/// The network and broadcast addresses, and the first address (the API server's own `kubernetes` Service).
const RESERVED: [u32; 3] = [0, 1, RANGE.1 - 1];

impl ClusterState {
    /// Gives every Service that needs a cluster IP and has none an address of [`RANGE`] (see the module).
    pub fn allocate_cluster_ips(&mut self) {
        let mut taken: HashSet<u32> = self
            .services
            .iter()
            .filter_map(|s| s.spec.as_ref())
            .flat_map(|spec| spec.cluster_ip.iter().chain(spec.cluster_ips.iter().flatten()))
            .filter_map(|ip| ip.parse::<Ipv4Addr>().ok())
            .filter_map(offset)
            .collect();
        taken.extend(RESERVED);
        let services = &self.services;
        let mut wanting: Vec<usize> = (0..services.len()).filter(|&i| needs_cluster_ip(&services[i])).collect();
        wanting.sort_by_key(|&i| (services[i].namespace().unwrap_or_default(), services[i].name_any()));
        for i in wanting {
            let service = &mut self.services[i];
            let key = format!("{}/{}", service.namespace().unwrap_or_default(), service.name_any());
            let start = (fnv1a(0xcbf2_9ce4_8422_2325, &key) % u64::from(RANGE.1)) as u32;
            // Fewer Services than addresses is all a directory can hold (files are bounded); stop if not.
            let Some(free) = (0..RANGE.1).map(|n| (start + n) % RANGE.1).find(|o| !taken.contains(o)) else { return };
            taken.insert(free);
            let ip = Ipv4Addr::from(u32::from(RANGE.0) + free).to_string();
            let spec = service.spec.get_or_insert_with(Default::default);
            spec.cluster_ip = Some(ip.clone());
            spec.cluster_ips = Some(vec![ip]);
        }
    }
}

/// `ip`'s place in [`RANGE`], if it is in it.
fn offset(ip: Ipv4Addr) -> Option<u32> {
    u32::from(ip).checked_sub(u32::from(RANGE.0)).filter(|o| *o < RANGE.1)
}

/// No address yet (none written, or an empty one), and one is due: not headless, not an ExternalName.
fn needs_cluster_ip(service: &k8s_openapi::api::core::v1::Service) -> bool {
    let spec = service.spec.as_ref();
    let written = spec.and_then(|s| s.cluster_ip.as_deref()).filter(|ip| !ip.is_empty());
    let written_list = spec.and_then(|s| s.cluster_ips.as_ref()).is_some_and(|ips| ips.iter().any(|ip| !ip.is_empty()));
    let external = spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName");
    written.is_none() && !written_list && !external
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(namespace: &str, name: &str, spec: &str) -> String {
        let metadata = format!("{{name: {name}, namespace: {namespace}}}");
        format!("apiVersion: v1\nkind: Service\nmetadata: {metadata}\nspec: {spec}\n---\n")
    }

    fn allocated(yaml: &str) -> Vec<(String, Option<String>)> {
        let mut state = ClusterState::default();
        state.add_yaml(yaml).unwrap();
        state.allocate_cluster_ips();
        let mut ips: Vec<_> = state
            .services
            .iter()
            .map(|s| {
                let name = format!("{}/{}", s.namespace().unwrap(), s.name_any());
                (name, s.spec.as_ref().and_then(|s| s.cluster_ip.clone()))
            })
            .collect();
        ips.sort();
        ips
    }

    #[test]
    fn services_without_an_address_get_one_from_the_range_the_same_whatever_the_order() {
        let a = service("shop", "a", "{ports: [{port: 80}]}");
        let b = service("shop", "b", "{type: NodePort, ports: [{port: 80}]}");
        let headless = service("shop", "h", "{clusterIP: None, ports: [{port: 80}]}");
        let external = service("shop", "x", "{type: ExternalName, externalName: example.com}");
        let fixed = service("shop", "f", "{clusterIP: 10.0.0.5, ports: [{port: 80}]}");
        let one = allocated(&[a.as_str(), &b, &headless, &external, &fixed].concat());
        let other = allocated(&[fixed.as_str(), &external, &headless, &b, &a].concat());
        assert_eq!(one, other, "file order does not matter");
        let ip = |name: &str| one.iter().find(|(n, _)| n == name).unwrap().1.clone();
        for name in ["shop/a", "shop/b"] {
            let address: Ipv4Addr = ip(name).unwrap().parse().unwrap();
            assert!(offset(address).is_some_and(|o| !RESERVED.contains(&o)), "{name}: {address}");
        }
        assert_ne!(ip("shop/a"), ip("shop/b"));
        assert_eq!(ip("shop/h").as_deref(), Some("None"));
        assert_eq!(ip("shop/x"), None);
        assert_eq!(ip("shop/f").as_deref(), Some("10.0.0.5"));
        assert_eq!(allocated(&a), allocated(&a), "stable across reads");
    }

    #[test]
    fn an_explicit_address_is_never_handed_out_again() {
        // Find where `shop/a` would go, then write that address on another Service.
        let a = service("shop", "a", "{ports: [{port: 80}]}");
        let natural = allocated(&a)[0].1.clone().unwrap();
        let taker = service("other", "z", &format!("{{clusterIP: {natural}, ports: [{{port: 80}}]}}"));
        let both = allocated(&[a.as_str(), &taker].concat());
        assert_eq!(both[0], ("other/z".to_string(), Some(natural.clone())));
        let moved = both[1].1.clone().unwrap();
        assert_ne!(moved, natural, "probed past the explicit address");
        assert_eq!(offset(moved.parse().unwrap()), offset(natural.parse().unwrap()).map(|o| (o + 1) % RANGE.1));
        // Nor is one allocation handed out twice: many Services, all distinct.
        let many: String = (0..300).map(|i| service("shop", &format!("s{i}"), "{ports: [{port: 80}]}")).collect();
        let ips: HashSet<_> = allocated(&many).into_iter().map(|(_, ip)| ip.unwrap()).collect();
        assert_eq!(ips.len(), 300);
    }
}
