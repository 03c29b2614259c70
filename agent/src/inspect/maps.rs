//! `warren-agent inspect maps`: the pinned eBPF maps.
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use super::{Output, table};
use crate::ebpf::PinnedMaps;

#[derive(Serialize)]
struct EnrolledRow {
    netns_cookie: u64,
    outbound_port: u16,
}

#[derive(Serialize)]
struct OriginalDstRow {
    netns_cookie: u64,
    client: String,
    original_dst: String,
}

#[derive(Serialize)]
struct AuthzRow {
    destination: String,
    /// `*`: every port no other entry for the destination names.
    port: String,
    source: String,
    verdict: &'static str,
    decision_id: u32,
}

#[derive(Serialize)]
struct MapsView {
    pin_dir: PathBuf,
    enrolled_netns: Vec<EnrolledRow>,
    original_destinations: Vec<OriginalDstRow>,
    l4_authz: Vec<AuthzRow>,
    /// Keys in L4_AUTHZ that are no valid entry (0 unless something else wrote the map).
    l4_authz_invalid_keys: usize,
    counters: std::collections::BTreeMap<&'static str, u64>,
}

pub fn render(pin_dir: &Path, output: Output) -> Result<String> {
    let maps = PinnedMaps::open(pin_dir)?;
    let (authz, l4_authz_invalid_keys) = maps.l4_authz()?;
    let view = MapsView {
        pin_dir: pin_dir.to_path_buf(),
        enrolled_netns: maps
            .enrolled_netns()?
            .into_iter()
            .map(|(cookie, e)| EnrolledRow { netns_cookie: cookie, outbound_port: e.outbound_port })
            .collect(),
        original_destinations: maps
            .original_dsts()?
            .into_iter()
            .map(|(k, v)| OriginalDstRow {
                netns_cookie: k.netns_cookie,
                client: k.socket_addr().map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
                original_dst: v.socket_addr().map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
            })
            .collect(),
        l4_authz: authz
            .into_iter()
            .map(|(k, v)| {
                let (src, len) = k.src();
                AuthzRow {
                    destination: k.dst().to_string(),
                    port: if k.port() == 0 { "*".into() } else { k.port().to_string() },
                    source: format!("{src}/{len}"),
                    verdict: match v.verdict {
                        warren_maps::AUTHZ_ALLOW => "allow",
                        warren_maps::AUTHZ_DENY => "deny",
                        _ => "?",
                    },
                    decision_id: v.decision_id,
                }
            })
            .collect(),
        l4_authz_invalid_keys,
        counters: maps.counters()?.into_iter().map(|(c, v)| (c.name(), v)).collect(),
    };
    if let Some(text) = super::structured(&view, output) {
        return text;
    }
    let mut out =
        format!("ENROLLED NETWORK NAMESPACES ({})\n", pin_dir.join(warren_maps::names::ENROLLED_NETNS).display());
    out += &table(
        &["NETNS COOKIE", "OUTBOUND PORT"],
        &view
            .enrolled_netns
            .iter()
            .map(|r| vec![r.netns_cookie.to_string(), r.outbound_port.to_string()])
            .collect::<Vec<_>>(),
    );
    out += &format!("\nORIGINAL DESTINATIONS ({})\n", pin_dir.join(warren_maps::names::ORIGINAL_DST).display());
    out += &table(
        &["NETNS COOKIE", "CLIENT", "ORIGINAL DST"],
        &view
            .original_destinations
            .iter()
            .map(|r| vec![r.netns_cookie.to_string(), r.client.clone(), r.original_dst.clone()])
            .collect::<Vec<_>>(),
    );
    out += &format!("\nL4 AUTHORIZATION ({})\n", pin_dir.join(warren_maps::names::L4_AUTHZ).display());
    out += &table(
        &["DESTINATION", "PORT", "SOURCE", "VERDICT", "DECISION ID"],
        &view
            .l4_authz
            .iter()
            .map(|r| vec![r.destination.clone(), r.port.clone(), r.source.clone(), r.verdict.to_string(), r.decision_id.to_string()])
            .collect::<Vec<_>>(),
    );
    if view.l4_authz_invalid_keys > 0 {
        out += &format!("({} keys that are no valid entry)\n", view.l4_authz_invalid_keys);
    }
    out += "\nEBPF COUNTERS\n";
    out += &table(
        &["EVENT", "COUNT"],
        &view.counters.iter().map(|(k, v)| vec![k.to_string(), v.to_string()]).collect::<Vec<_>>(),
    );
    Ok(out)
}
