//! `warren-agent run`: load the datapath, keep enrollment in line with the workload source, proxy, and on
//! SIGTERM drain.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    admin::{self, AdminState},
    config::AgentConfig,
    ebpf::Datapath,
    identity::Certificates,
    inpod::{InpodManager, PortConfig},
    metrics::{EbpfEventsCollector, Metrics},
    proxy::{
        ConnectionTable, ProxyShared,
        authz::{Authorizer, close_newly_denied, record_kernel_denials},
        hbone::pool::Pool,
    },
    sources::{
        self,
        controller::{Applier, PushStatus},
    },
    state::{MeshTables, Workloads},
    sys,
    telemetry::Telemetry,
};

/// How often enrollment is re-checked even without a change (pods whose processes were not there yet).
const RESYNC: Duration = Duration::from_secs(1);

pub async fn run(config: AgentConfig) -> Result<()> {
    let open_files = sys::raise_fd_limit();
    info!(open_files, "file descriptor limit");
    let cgroup2 = sys::cgroup2_mount()?;
    let attach_cgroup = config.cgroup_attach.clone().unwrap_or_else(|| cgroup2.clone());
    let mut datapath = Datapath::load(&config.pin_dir, &attach_cgroup, config.ebpf_log_level, config.ebpf_settings())?;

    let metrics = Arc::new(Metrics::default());
    let connections = ConnectionTable::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(EbpfEventsCollector(datapath.counters())));
    let hbone = match &config.identity {
        Some(identity) => Some(Arc::new(Pool::new(Arc::new(Certificates::load(identity)?)))),
        None => None,
    };
    let certificates = hbone.as_ref().map(|pool| pool.certificates().clone());
    if let Some(certificates) = certificates.clone() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                certificates.renew_due().await;
            }
        });
    }
    let (tables, _) = tokio::sync::watch::channel(Arc::new(MeshTables::default()));
    let push_status: Arc<Mutex<PushStatus>> = Arc::default();
    registry.register_collector(Box::new(crate::metrics::AgentStateCollector {
        maps: datapath.map_sizes(),
        tables: tables.clone(),
        push: config.controller.is_some().then(|| push_status.clone()),
        certificates: certificates.clone(),
        connections: connections.clone(),
    }));
    let authorizer = Arc::new(Authorizer::default());
    authorizer.register(&mut registry);
    tokio::spawn(close_newly_denied(tables.subscribe(), connections.clone(), authorizer.clone()));
    if let Some(denials) = datapath.take_denials()? {
        tokio::spawn(record_kernel_denials(denials, tables.subscribe(), authorizer.clone()));
    }
    let trust_domain = hbone.as_ref().map_or(warren_identity::DEFAULT_TRUST_DOMAIN, |p| p.certificates().trust_domain());
    let telemetry = Arc::new(Telemetry::new(&config.telemetry, trust_domain, &config.node_name)?);
    telemetry.register(&mut registry);
    let clusters = Arc::new(crate::resilience::cluster::Clusters::new(config.retry_budget.budget()));
    let shared = ProxyShared {
        original_dst: datapath.original_dst_lookup(),
        metrics,
        telemetry: telemetry.clone(),
        connections: connections.clone(),
        mesh: Arc::default(),
        tables: tables.clone(),
        authorizer: authorizer.clone(),
        hbone,
        clusters: clusters.clone(),
    };
    let datapath = Arc::new(Mutex::new(datapath));

    let ports = PortConfig { outbound: config.outbound_port, inbound: config.inbound_port };
    let mut manager = InpodManager::new(datapath.clone(), config.node_name.clone(), ports, cgroup2, shared);
    let mut workloads = match (&config.workloads_file, &config.kubernetes, &config.controller) {
        (Some(path), _, _) => sources::file::watch(path.clone())?,
        (None, Some(kubernetes), _) => {
            let client = sources::kubernetes::client(kubernetes.kubeconfig.as_deref()).await?;
            sources::kubernetes::watch(client, config.node_name.clone()).await?
        }
        (None, None, Some(controller)) => {
            let (tx, rx) = tokio::sync::watch::channel(Workloads::default());
            let applier = Arc::new(Applier {
                node: config.node_name.clone(),
                datapath: datapath.clone(),
                tables: tables.clone(),
                workloads: tx,
                status: push_status.clone(),
                telemetry: telemetry.clone(),
            });
            let certificates = certificates.clone().context("controller: needs identity")?;
            sources::controller::spawn(controller.clone(), certificates, applier);
            rx
        }
        (None, None, None) => tokio::sync::watch::channel(Default::default()).1,
    };
    manager.reconcile(&workloads.borrow_and_update().clone()).await;
    manager.drop_stale_state()?;

    let admin_listener = admin::bind(config.admin_addr).await?;
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("metricsAddr: binding the metrics endpoint on {}", config.metrics_addr))?;
    let registry = Arc::new(registry);
    tokio::spawn(admin::serve_metrics(metrics_listener, registry.clone()));
    let state = Arc::new(AdminState {
        registry,
        connections: connections.clone(),
        workloads: manager.status_handle(),
        certificates,
        tables,
        authorizer,
        push: config.controller.is_some().then_some(push_status),
        node: config.node_name.clone(),
        telemetry: telemetry.clone(),
        clusters,
    });
    tokio::spawn(admin::serve(admin_listener, state));

    std::fs::create_dir_all(&config.run_dir).with_context(|| format!("creating {}", config.run_dir.display()))?;
    std::fs::write(config.pid_file(), std::process::id().to_string())
        .with_context(|| format!("writing {}", config.pid_file().display()))?;
    info!(node = %config.node_name, admin = %config.admin_addr, "warren-agent ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut resync = tokio::time::interval(RESYNC);
    let mut idle_memory = IdleMemory::default();
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: draining"); break; }
            _ = int.recv() => { info!("SIGINT: draining"); break; }
            changed = workloads.changed() => {
                if changed.is_err() { continue; }
                let current = workloads.borrow_and_update().clone();
                manager.reconcile(&current).await;
            }
            _ = resync.tick() => {
                let current = workloads.borrow().clone();
                manager.reconcile(&current).await;
                idle_memory.release_if_idle(&connections);
            }
        }
    }

    // The last agent of the node (its DaemonSet is gone) leaves nothing behind; any other keeps its pinned
    // maps and links, so redirect continues for the next agent.
    let last = match crate::uninstall::Owner::from_env() {
        Some(owner) => owner.is_gone().await.unwrap_or_else(|e| {
            warn!("cannot tell an uninstall from a restart, keeping the pinned state: {e:#}");
            false
        }),
        None => false,
    };
    if last {
        info!("the DaemonSet is gone: un-enrolling every pod and removing the pinned programs and maps");
        manager.unenroll_all();
    }
    // Stop accepting; let open connections finish.
    manager.stop_listening();
    let deadline = Instant::now() + Duration::from_secs(config.drain_timeout_seconds);
    while Instant::now() < deadline && connections.open_count() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = connections.open_count();
    info!(open_connections = left, "drained; exiting");
    if last {
        datapath.lock().unwrap().remove_pins()?;
    }
    let _ = std::fs::remove_file(config.pid_file());
    Ok(())
}

/// Gives freed heap back to the OS once the proxy goes idle after carrying connections: glibc keeps the
/// buffers of a burst of connections in its per-thread arenas otherwise, and RSS would stay at the peak.
#[derive(Default)]
struct IdleMemory {
    trimmed_at_total: u64,
}

impl IdleMemory {
    fn release_if_idle(&mut self, connections: &ConnectionTable) {
        let total = connections.total();
        if connections.open_count() == 0 && total != self.trimmed_at_total {
            self.trimmed_at_total = total;
            // SAFETY: malloc_trim only releases free memory; it has no preconditions.
            unsafe { libc::malloc_trim(0) };
        }
    }
}
