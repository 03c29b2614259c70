//! `warren-agent run`: load the datapath, enroll the configured pods, proxy until SIGTERM.
use std::{collections::BTreeSet, sync::Arc};

use anyhow::{Context, Result};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use warren_maps::EnrolledCgroup;

use crate::{
    admin::{self, AdminState},
    config::AgentConfig,
    ebpf::Datapath,
    inpod::Netns,
    metrics::{EbpfEventsCollector, Metrics},
    proxy::{
        ConnectionTable,
        outbound::{OutboundPod, ProxyShared},
    },
    sys,
};

pub async fn run(config: AgentConfig) -> Result<()> {
    let attach_cgroup = match &config.cgroup_attach {
        Some(path) => path.clone(),
        None => sys::cgroup2_mount()?,
    };
    let mut datapath = Datapath::load(&config.pin_dir, &attach_cgroup, config.ebpf_log_level)?;

    let metrics = Arc::new(Metrics::default());
    let connections = ConnectionTable::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(EbpfEventsCollector(datapath.counters())));
    let shared = ProxyShared { original_dst: datapath.original_dst_lookup(), metrics, connections: connections.clone() };

    // Listeners first, then the map entry: a pod is redirected only once the agent can accept for it.
    let mut enrolled = BTreeSet::new();
    for pod in config.pods.iter().filter(|p| p.enrolled) {
        let name = format!("{}/{}", pod.namespace, pod.name);
        let netns = Arc::new(Netns::open(&pod.netns)?);
        let outbound = OutboundPod::bind(name.clone(), netns, config.outbound_port)?;
        tokio::spawn(outbound.serve(shared.clone()));
        let cgroup_id = sys::cgroup_id(&pod.cgroup)?;
        datapath.enroll(cgroup_id, EnrolledCgroup { outbound_port: config.outbound_port, ..Default::default() })?;
        enrolled.insert(cgroup_id);
        info!(pod = %name, cgroup_id, cgroup = %pod.cgroup.display(), "pod enrolled");
    }
    datapath.retain_enrolled(&enrolled)?;

    let admin_listener = admin::bind(config.admin_addr).await?;
    tokio::spawn(admin::serve(admin_listener, Arc::new(AdminState { registry, connections })));

    std::fs::create_dir_all(&config.run_dir).with_context(|| format!("creating {}", config.run_dir.display()))?;
    std::fs::write(config.pid_file(), std::process::id().to_string())
        .with_context(|| format!("writing {}", config.pid_file().display()))?;
    info!(node = %config.node_name, admin = %config.admin_addr, pods = enrolled.len(), "warren-agent ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    // The pinned maps stay for the next agent; the programs detach with this process.
    let _ = std::fs::remove_file(config.pid_file());
    drop(datapath);
    Ok(())
}
